//! What the agent applied, written to `<run-dir>/state.json` after each apply so
//! that `status`, `dump` and `explain` can name what the kernel's tables mean
//! (service names, routes, subsets, weights), with or without a running agent.
//! The kernel maps stay the source of truth for what is enforced; this file only
//! labels them. Written atomically (temporary file, then rename).

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    path::{Path, PathBuf},
    sync::{Arc, Condvar, Mutex, PoisonError},
    time::Instant,
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{
    compile::{
        DestinationPlan, ServiceAddr, ServicePlan,
        gateway::{GatewayPort, Protocol, RouterAddrs, Serve},
    },
    model::NamespacedName,
};

pub const FILE: &str = "state.json";

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub pid: u32,
    pub version: String,
    pub cgroup: PathBuf,
    /// The agent's own cgroup, whose connects the hooks leave alone (`None`
    /// when it could not be found).
    #[serde(default)]
    pub own_cgroup: Option<PathBuf>,
    /// With the pods' scope (`--mesh-scope pods`): how many pods are meshed.
    #[serde(default)]
    pub scope: Option<ScopeRecord>,
    pub redirect: bool,
    pub pin_dir: PathBuf,
    pub generation: u64,
    /// Unix time of the last apply, in milliseconds.
    pub applied_at_ms: u64,
    /// Shared with [`ServiceRecords`] (serialised as the records).
    pub services: Vec<Arc<ServiceRecord>>,
    /// This node's gateway ports (empty with the gateway off).
    #[serde(default)]
    pub gateways: Vec<GatewayRecord>,
    /// Backends outlier detection watches, as it last judged them.
    #[serde(default)]
    pub outliers: Vec<crate::outlier::BackendRecord>,
}

/// One gateway port, as `check`, `dump` and `explain` show it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GatewayRecord {
    pub port: u16,
    /// `HTTP` or `TCP`.
    pub protocol: String,
    /// `Gateway ns/name spec.servers[i]`, oldest first.
    pub servers: Vec<String>,
    /// `kernel`, `router` or `nothing`.
    pub served_by: String,
    pub why: String,
    /// Where the router listens for this port (router only).
    pub router: Vec<String>,
    /// Whether the router's connections to backends on this node take the
    /// same-node shortcut, and why not (router only).
    #[serde(default)]
    pub shortcut: Option<String>,
    /// The routes in the order they are tried: `host: VirtualService ns/name
    /// spec.http[i] (matches) -> destinations`.
    pub routes: Vec<String>,
}

/// The meshed pods of this node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScopeRecord {
    /// In `MESHED_PODS_V1`.
    pub meshed_pods: usize,
    /// Meshed by their namespace, but their cgroup is not there yet.
    pub waiting_pods: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    pub addr: ServiceAddr,
    pub service: NamespacedName,
    /// What decided the table, as `explain` prints it.
    pub route: String,
    pub destinations: Arc<[DestinationPlan]>,
    /// `sessionAffinity: ClientIP`'s timeout, in seconds.
    #[serde(default)]
    pub affinity_timeout_s: Option<u32>,
}

impl ServiceRecord {
    fn of(addr: ServiceAddr, plan: &ServicePlan) -> Self {
        ServiceRecord {
            addr,
            service: plan.service.clone(),
            route: plan.route.to_string(),
            destinations: plan.destinations.clone(),
            affinity_timeout_s: plan.affinity_timeout_s,
        }
    }
}

/// The record's services, kept by change: made whole on each write they
/// took the agent's loop 12-32 ms at 10 000 Services (measured), where a
/// copy of these pointers takes a fraction of one.
#[derive(Debug, Default, PartialEq)]
pub struct ServiceRecords(BTreeMap<ServiceAddr, Arc<ServiceRecord>>);

impl ServiceRecords {
    /// Follows `plans` at the addresses `changed` names (`None`: at all).
    pub fn sync(
        &mut self,
        plans: &BTreeMap<ServiceAddr, ServicePlan>,
        changed: Option<&BTreeSet<ServiceAddr>>,
    ) {
        let Some(changed) = changed else {
            self.0 = plans
                .iter()
                .map(|(addr, plan)| (*addr, Arc::new(ServiceRecord::of(*addr, plan))))
                .collect();
            return;
        };
        for addr in changed {
            match plans.get(addr) {
                Some(plan) => {
                    self.0
                        .insert(*addr, Arc::new(ServiceRecord::of(*addr, plan)));
                }
                None => {
                    self.0.remove(addr);
                }
            }
        }
    }

    pub fn snapshot(&self) -> Vec<Arc<ServiceRecord>> {
        self.0.values().cloned().collect()
    }
}

impl AgentRecord {
    pub fn write(&self, run_dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(run_dir)?;
        let tmp = run_dir.join(format!(".{FILE}.tmp"));
        // Streamed: at 10 000 services the record is megabytes, and a copy of
        // it in memory would be the agent's largest allocation.
        let mut file = io::BufWriter::new(std::fs::File::create(&tmp)?);
        serde_json::to_writer(&mut file, self)?;
        io::Write::flush(&mut file)?;
        drop(file);
        std::fs::rename(&tmp, run_dir.join(FILE))
    }

    /// `None` when no agent has written one.
    pub fn read(run_dir: &Path) -> io::Result<Option<Self>> {
        match std::fs::read(run_dir.join(FILE)) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl GatewayRecord {
    /// The record of one gateway port; `router`: where the router listens for
    /// it, if it does.
    pub fn of(p: &GatewayPort, router: Option<&RouterAddrs>) -> Self {
        let (served_by, routes) = match &p.serve {
            Serve::Kernel {
                vs,
                field,
                destinations,
            } => (
                "kernel",
                vec![format!(
                    "*: VirtualService {vs} {field} -> {}",
                    describe(destinations)
                )],
            ),
            Serve::Router { table } => (
                "router",
                table
                    .hosts
                    .iter()
                    .flat_map(|h| {
                        h.routes.iter().map(move |r| {
                            format!(
                                "{}: VirtualService {} {} ({}) -> {}",
                                h.domain,
                                r.vs,
                                r.field,
                                if r.matches.is_empty() {
                                    "every request".to_owned()
                                } else {
                                    r.matches
                                        .iter()
                                        .map(ToString::to_string)
                                        .collect::<Vec<_>>()
                                        .join(" or ")
                                },
                                describe(&r.destinations)
                            )
                        })
                    })
                    .collect(),
            ),
            Serve::Nothing => ("nothing", Vec::new()),
        };
        GatewayRecord {
            port: p.port,
            protocol: match p.protocol {
                Protocol::Http => "HTTP",
                Protocol::Tcp => "TCP",
            }
            .to_owned(),
            servers: p.servers.iter().map(ToString::to_string).collect(),
            served_by: served_by.to_owned(),
            why: p.why.clone(),
            router: router
                .into_iter()
                .flat_map(|a| a.v4.into_iter().chain(a.v6))
                .map(|a| a.to_string())
                .collect(),
            shortcut: None,
            routes,
        }
    }
}

/// `name (weight w, n endpoints), ...`.
fn describe(destinations: &[DestinationPlan]) -> String {
    destinations
        .iter()
        .map(|d| {
            format!(
                "{} (weight {}, {} endpoints)",
                d.name,
                d.weight,
                d.backends.len()
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// After a write that took `t`, the next waits `t` times this (what waits
/// meanwhile is replaced by what comes later): at 10 000 Services a write is
/// tens of milliseconds of CPU, and written every 250 ms under churn the
/// agent's CPU went from 11% to 27% of a core; this keeps writes near 2%.
const PAUSE_PER_WRITE: u32 = 49;

/// Writes records on a thread of its own: at 10 000 services one takes tens
/// of milliseconds, which the agent's loop must not spend while changes
/// wait. Only the latest record submitted is written (one written later never
/// predates it); [`Writer::finish`] writes what is pending, then stops.
pub struct Writer {
    shared: Arc<(Mutex<Pending>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct Pending {
    next: Option<AgentRecord>,
    closed: bool,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    pub fn start(run_dir: PathBuf) -> io::Result<Self> {
        let shared = Arc::new((Mutex::new(Pending::default()), Condvar::new()));
        let theirs = shared.clone();
        let thread = std::thread::Builder::new()
            .name("mesh-record".into())
            .spawn(move || {
                let (lock, ready) = &*theirs;
                let mut next_at = Instant::now();
                loop {
                    let record = {
                        let mut pending = lock.lock().unwrap_or_else(PoisonError::into_inner);
                        loop {
                            // Until `next_at`, only closing takes what waits.
                            let due = pending.closed || Instant::now() >= next_at;
                            if due && let Some(record) = pending.next.take() {
                                break record;
                            }
                            if pending.closed {
                                return;
                            }
                            if pending.next.is_none() {
                                pending =
                                    ready.wait(pending).unwrap_or_else(PoisonError::into_inner);
                                continue;
                            }
                            // A record waits for `next_at` (zero: due by now).
                            let wait = next_at.saturating_duration_since(Instant::now());
                            pending = match ready.wait_timeout(pending, wait) {
                                Ok((p, _)) => p,
                                Err(e) => e.into_inner().0,
                            };
                        }
                    };
                    let started = Instant::now();
                    if let Err(e) = record.write(&run_dir) {
                        warn!(run_dir = %run_dir.display(), "cannot record the applied state: {e}");
                    }
                    next_at = Instant::now() + started.elapsed() * PAUSE_PER_WRITE;
                }
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Replaces what is waiting to be written, if anything, by `record`.
    pub fn submit(&self, record: AgentRecord) {
        let (lock, ready) = &*self.shared;
        lock.lock().unwrap_or_else(PoisonError::into_inner).next = Some(record);
        ready.notify_one();
    }

    /// Writes what was submitted and not written yet, then stops the thread.
    pub fn finish(&mut self) {
        let (lock, ready) = &*self.shared;
        lock.lock().unwrap_or_else(PoisonError::into_inner).closed = true;
        ready.notify_one();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            warn!("the record's writer panicked");
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;
    use crate::compile::Proto;

    fn addr(host: u8) -> ServiceAddr {
        ServiceAddr {
            destination: None,
            vip: IpAddr::from([10, 96, 0, host]),
            port: 80,
            proto: Proto::Tcp,
        }
    }

    fn plan(name: &str, backends: &[u8]) -> ServicePlan {
        ServicePlan::even_over(name, backends)
    }

    #[test]
    fn records_kept_by_change_are_the_whole_records() {
        let mut plans = BTreeMap::from([
            (addr(1), plan("a", &[1, 2])),
            (addr(2), plan("b", &[3])),
            (addr(3), plan("c", &[4])),
        ]);
        let mut kept = ServiceRecords::default();
        kept.sync(&plans, None);
        // Changed, removed, added; and one changed that the delta does not
        // name, which must stay as it was.
        plans.insert(addr(1), plan("a", &[2]));
        plans.remove(&addr(2));
        plans.insert(addr(4), plan("d", &[5]));
        plans.insert(addr(3), plan("c", &[6]));
        kept.sync(&plans, Some(&BTreeSet::from([addr(1), addr(2), addr(4)])));
        let mut expected = plans.clone();
        expected.insert(addr(3), plan("c", &[4]));
        let mut whole = ServiceRecords::default();
        whole.sync(&expected, None);
        assert_eq!(kept, whole);
        let names: Vec<String> = kept
            .snapshot()
            .iter()
            .map(|s| s.service.name.to_string())
            .collect();
        assert_eq!(names, ["a", "c", "d"]);
    }
}
