//! `mesh-agent status`, `dump` and `explain`: read-only views of the pinned state,
//! whether an agent runs or not. What is enforced comes from the kernel (pinned
//! links and maps); names, routes and weights come from the agent's record
//! (`record.rs`), which only labels the kernel's tables.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{HashMap, Map, MapData, MapInfo},
    programs::links::{FdLink, PinnedLink},
};
use mesh_common::{Backend, ServiceKey, ServiceValue, SlotKey, map_names};
use serde::Serialize;

use crate::{
    compile::{BackendAddr, Proto, ServiceAddr},
    kernel::{
        codec::{backend_addr, service_addr, slot_destination},
        count_keys, memory,
        pin::PinDir,
        record::{self, AgentRecord, ServiceRecord},
    },
    model::NamespacedName,
};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("no pinned state at {0}: no agent has run with this --pin-dir (or it was cleaned up)")]
    NoState(PathBuf),
    #[error("pinned map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

#[derive(Debug, Serialize)]
pub struct Status {
    pub pin_dir: PathBuf,
    pub agent: Option<AgentStatus>,
    pub programs: Vec<ProgramStatus>,
    pub maps: Vec<MapStatus>,
    pub services: usize,
    pub backends: usize,
    /// The maps' kernel memory, and its share per service port and backend.
    pub memory: memory::Summary,
}

#[derive(Debug, Serialize)]
pub struct AgentStatus {
    pub pid: u32,
    pub running: bool,
    pub version: String,
    pub cgroup: PathBuf,
    /// The agent's own cgroup, whose connects bypass the mesh.
    pub own_cgroup: Option<PathBuf>,
    /// With the pods' scope: meshed and waiting pods.
    pub scope: Option<crate::kernel::record::ScopeRecord>,
    pub redirect: bool,
    pub generation: u64,
    pub applied_at_ms: u64,
    pub seconds_since_apply: f64,
}

#[derive(Debug, Serialize)]
pub struct ProgramStatus {
    pub name: String,
    /// `cg<inode>`: the cgroup the link attaches to.
    pub cgroup: String,
    pub link_id: u32,
    pub program_id: u32,
    pub tag: String,
}

#[derive(Debug, Serialize)]
pub struct MapStatus {
    pub name: String,
    pub id: u32,
    /// `None` for arrays (always full).
    pub entries: Option<usize>,
    pub capacity: u32,
    /// Kernel memory (fdinfo `memlock`); `None` when it could not be read.
    pub bytes: Option<u64>,
}

pub fn status(pins: &PinDir, run_dir: &Path) -> Result<Status, InspectError> {
    if !pins.exists() {
        return Err(InspectError::NoState(pins.root().to_owned()));
    }
    let record = read_record(run_dir)?;
    let agent = record.as_ref().map(|r| AgentStatus {
        pid: r.pid,
        running: Path::new(&format!("/proc/{}", r.pid)).exists()
            && std::fs::read_to_string(format!("/proc/{}/comm", r.pid))
                .is_ok_and(|c| c.trim() == "mesh-agent"),
        version: r.version.clone(),
        cgroup: r.cgroup.clone(),
        own_cgroup: r.own_cgroup.clone(),
        scope: r.scope,
        redirect: r.redirect,
        generation: r.generation,
        applied_at_ms: r.applied_at_ms,
        seconds_since_apply: record::now_ms().saturating_sub(r.applied_at_ms) as f64 / 1e3,
    });
    let mut programs = Vec::new();
    let loaded: Vec<aya::programs::ProgramInfo> =
        aya::programs::loaded_programs().flatten().collect();
    for cgroup in read_dir(&pins.links_dir()) {
        for link_path in read_dir(&cgroup) {
            let Ok(link) = PinnedLink::from_pin(&link_path).map(FdLink::from) else {
                continue;
            };
            let Ok(info) = link.info() else { continue };
            let tag = loaded
                .iter()
                .find(|p| p.id() == info.program_id())
                .map_or_else(String::new, |p| format!("{:016x}", p.tag()));
            programs.push(ProgramStatus {
                name: file_name(&link_path),
                cgroup: file_name(&cgroup),
                link_id: info.id(),
                program_id: info.program_id(),
                tag,
            });
        }
    }
    let mut maps = Vec::new();
    let mut measured = Vec::new();
    for name in map_names::ALL {
        let path = pins.map(name);
        let Ok(info) = MapInfo::from_pin(&path) else {
            continue;
        };
        let is_array = matches!(
            info.map_type(),
            Ok(aya::maps::MapType::Array | aya::maps::MapType::PerCpuArray)
        );
        let entries = if is_array {
            None
        } else {
            count_keys(&info, 2 * info.max_entries() as usize + 1).ok()
        };
        maps.push(MapStatus {
            name: name.to_owned(),
            id: info.id(),
            entries,
            capacity: info.max_entries(),
            bytes: memory::info_bytes(name, &info).ok(),
        });
        if let Some(bytes) = maps.last().and_then(|m| m.bytes) {
            measured.push(memory::MapMemory { map: name, bytes });
        }
    }
    let tables = read_tables(pins)?;
    let backends: std::collections::BTreeSet<BackendAddr> = tables
        .values()
        .flat_map(|t| t.slots.iter().flatten().copied())
        .collect();
    // Service ports: a destination's own table is part of its port's.
    let services = tables.keys().filter(|a| a.destination.is_none()).count();
    Ok(Status {
        pin_dir: pins.root().to_owned(),
        agent,
        programs,
        memory: memory::summarize(&measured, services, backends.len()),
        maps,
        services,
        backends: backends.len(),
    })
}

pub fn print_status(s: &Status) {
    println!("pinned state: {}", s.pin_dir.display());
    match &s.agent {
        Some(a) => {
            println!(
                "agent: pid {} ({}), version {}, cgroup {}, redirect {}",
                a.pid,
                if a.running { "running" } else { "not running" },
                a.version,
                a.cgroup.display(),
                if a.redirect { "on" } else { "off" }
            );
            match &a.scope {
                Some(s) => println!(
                    "mesh scope: pods of mesh namespaces on this node: {} meshed, {} waiting (no sandbox yet, or its namespace unreadable: see the log)",
                    s.meshed_pods, s.waiting_pods
                ),
                None => println!("mesh scope: every process in cgroup {}", a.cgroup.display()),
            }
            match &a.own_cgroup {
                Some(own) => println!(
                    "agent's own connects bypass the mesh: cgroup {}",
                    own.display()
                ),
                None => {
                    println!("agent's own connects go through the mesh (its cgroup was not found)")
                }
            }
            println!(
                "last sync: generation {}, {:.1} s ago",
                a.generation, a.seconds_since_apply
            );
        }
        None => println!("agent: no record (never ran with this --run-dir)"),
    }
    println!("programs attached (pinned links):");
    for p in &s.programs {
        println!(
            "  {:<18} {}  link {:<5} program {:<6} tag {}",
            p.name, p.cgroup, p.link_id, p.program_id, p.tag
        );
    }
    println!("maps:");
    for m in &s.maps {
        let entries = m
            .entries
            .map_or_else(|| "array".to_owned(), |e| e.to_string());
        let bytes = m.bytes.map_or_else(|| "?".to_owned(), mib);
        println!(
            "  {:<22} {:>9} / {:<9} {:>11}",
            m.name, entries, m.capacity, bytes
        );
    }
    println!(
        "services: {} service ports, {} distinct backends",
        s.services, s.backends
    );
    let per = |bytes: Option<u64>| bytes.map_or_else(|| "-".to_owned(), |b| format!("{b} B"));
    let mem = &s.memory;
    println!(
        "kernel memory of the maps: {} ({} follow service ports: {} per port; {} follow backends: {} per backend; {} other: capacity, LRUs, sockets, gateway)",
        mib(mem.total_bytes),
        mib(mem.services_bytes),
        per(mem.per_service),
        mib(mem.endpoints_bytes),
        per(mem.per_endpoint),
        mib(mem.other_bytes),
    );
}

/// Bytes as MiB with one decimal.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// One service port as the kernel holds it, labelled from the record.
#[derive(Debug, Serialize)]
pub struct ServiceDump {
    pub vip: std::net::IpAddr,
    pub port: u16,
    pub proto: Proto,
    /// The table of this destination of the port's route (reached through
    /// the port's own table, which picks it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destination: Option<u8>,
    /// `None`: the agent's record does not know this table.
    pub service: Option<NamespacedName>,
    pub route: String,
    pub revision: u32,
    pub slot_count: u32,
    pub destinations: Vec<DestinationDump>,
    /// A gateway port on a node address: the gateway's port, as recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<record::GatewayRecord>,
    /// Session affinity in the kernel (`ClientIP`), with the recorded timeout.
    pub affinity: Option<Affinity>,
    /// The slot is a hash of the client over a Maglev table (DestinationRule
    /// `consistentHash.useSourceIp`).
    pub hash_client: bool,
    /// The less loaded of two drawn slots (DestinationRule LEAST_REQUEST).
    pub least_request: bool,
    /// The service's backends outlier detection watches (as recorded).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outliers: Vec<crate::outlier::BackendRecord>,
}

/// A service port's session affinity, as the kernel holds it.
#[derive(Debug, Serialize)]
pub struct Affinity {
    /// Seconds a client may idle and keep its backend (`None`: not recorded).
    pub timeout_s: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct DestinationDump {
    pub name: String,
    pub weight: Option<u64>,
    pub backends: Vec<BackendDump>,
    /// The destination has a table of its own (the route's destinations
    /// differ in policy): the port's slots that pick it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<PickDump>,
}

#[derive(Debug, Serialize)]
pub struct PickDump {
    /// Its table: [`ServiceDump::destination`].
    pub destination: u8,
    pub slots: u32,
    pub share: f64,
}

#[derive(Debug, Serialize)]
pub struct BackendDump {
    /// `None`: slots that refuse the connect (a destination with no endpoint).
    pub addr: Option<BackendAddr>,
    pub slots: u32,
    pub share: f64,
}

struct Table {
    value: ServiceValue,
    slots: Vec<Option<BackendAddr>>,
    /// A table that picks a destination: the destination of each slot.
    to_destinations: Vec<u8>,
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    pins: &PinDir,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, InspectError> {
    let map = MapData::from_pin(pins.map(name))
        .and_then(|data| HashMap::try_from(Map::HashMap(data)))
        .map_err(|source| InspectError::Map { name, source })?;
    Ok(map)
}

fn read_tables(pins: &PinDir) -> Result<BTreeMap<ServiceAddr, Table>, InspectError> {
    let services: HashMap<MapData, ServiceKey, ServiceValue> =
        open_hash(pins, map_names::SERVICES)?;
    let slots: HashMap<MapData, SlotKey, Backend> = open_hash(pins, map_names::SLOTS)?;
    let mut out = BTreeMap::new();
    for (key, value) in services.iter().flatten() {
        let Some(addr) = service_addr(&key) else {
            continue;
        };
        let read: Vec<Option<Backend>> = (0..value.slot_count)
            .map(|slot| {
                slots
                    .get(
                        &SlotKey {
                            service_id: value.service_id,
                            revision: value.revision,
                            slot,
                        },
                        0,
                    )
                    .ok()
            })
            .collect();
        let picks = value.flags & mesh_common::SERVICE_FLAG_DESTINATIONS != 0;
        let table = Table {
            value,
            slots: if picks {
                Vec::new()
            } else {
                read.iter()
                    .map(|b| b.as_ref().and_then(backend_addr))
                    .collect()
            },
            to_destinations: if picks {
                read.iter().flatten().filter_map(slot_destination).collect()
            } else {
                Vec::new()
            },
        };
        out.insert(addr, table);
    }
    Ok(out)
}

fn read_record(run_dir: &Path) -> Result<Option<AgentRecord>, InspectError> {
    AgentRecord::read(run_dir).map_err(|source| InspectError::Io {
        path: run_dir.join(record::FILE),
        source,
    })
}

/// Every service port the kernel holds (or those of `only`: a VIP and port).
pub fn dump(
    pins: &PinDir,
    run_dir: &Path,
    only: Option<SocketAddr>,
) -> Result<Vec<ServiceDump>, InspectError> {
    if !pins.exists() {
        return Err(InspectError::NoState(pins.root().to_owned()));
    }
    let record = read_record(run_dir)?.unwrap_or_default();
    let labels: BTreeMap<ServiceAddr, &ServiceRecord> =
        record.services.iter().map(|s| (s.addr, &**s)).collect();
    let mut out = Vec::new();
    for (addr, table) in read_tables(pins)? {
        if only.is_some_and(|o| o.ip() != addr.vip || o.port() != addr.port) {
            continue;
        }
        let mut counts: BTreeMap<Option<BackendAddr>, u32> = BTreeMap::new();
        for slot in &table.slots {
            *counts.entry(*slot).or_default() += 1;
        }
        let total = table.slots.len().max(1) as f64;
        let label = labels.get(&addr);
        let mut destinations: Vec<DestinationDump> = Vec::new();
        for (i, d) in (0u8..).zip(label.map(|l| &*l.destinations).unwrap_or_default()) {
            if !table.to_destinations.is_empty() {
                let n = table.to_destinations.iter().filter(|&&p| p == i).count() as u32;
                destinations.push(DestinationDump {
                    name: d.name.clone(),
                    weight: Some(d.weight),
                    backends: Vec::new(),
                    table: Some(PickDump {
                        destination: i,
                        slots: n,
                        share: f64::from(n) / table.to_destinations.len() as f64,
                    }),
                });
                continue;
            }
            let backends = d
                .backends
                .iter()
                .map(|b| {
                    let n = counts.remove(&Some(*b)).unwrap_or(0);
                    BackendDump {
                        addr: Some(*b),
                        slots: n,
                        share: f64::from(n) / total,
                    }
                })
                .collect::<Vec<_>>();
            let mut backends = backends;
            // A destination without endpoints owns the refusing slots.
            if d.backends.is_empty()
                && let Some(n) = counts.remove(&None)
            {
                backends.push(BackendDump {
                    addr: None,
                    slots: n,
                    share: f64::from(n) / total,
                });
            }
            destinations.push(DestinationDump {
                name: d.name.clone(),
                weight: Some(d.weight),
                backends,
                table: None,
            });
        }
        if !counts.is_empty() {
            destinations.push(DestinationDump {
                name: "(not in the agent's record)".to_owned(),
                weight: None,
                table: None,
                backends: counts
                    .into_iter()
                    .map(|(addr, n)| BackendDump {
                        addr,
                        slots: n,
                        share: f64::from(n) / total,
                    })
                    .collect(),
            });
        }
        let gateway = (table.value.flags & mesh_common::SERVICE_FLAG_GATEWAY != 0)
            .then(|| {
                record
                    .gateways
                    .iter()
                    .find(|g| g.port == addr.port)
                    .cloned()
            })
            .flatten();
        out.push(ServiceDump {
            vip: addr.vip,
            port: addr.port,
            proto: addr.proto,
            destination: addr.destination,
            service: label.map(|l| l.service.clone()),
            route: label.map_or_else(String::new, |l| l.route.clone()),
            revision: table.value.revision,
            slot_count: table.value.slot_count,
            destinations,
            gateway,
            hash_client: table.value.flags & mesh_common::SERVICE_FLAG_HASH_CLIENT != 0,
            least_request: table.value.flags & mesh_common::SERVICE_FLAG_LEAST_REQUEST != 0,
            outliers: record
                .outliers
                .iter()
                .filter(|o| label.is_some_and(|l| l.service == o.service))
                .cloned()
                .collect(),
            affinity: (table.value.flags & mesh_common::SERVICE_FLAG_AFFINITY != 0).then(|| {
                Affinity {
                    timeout_s: label.and_then(|l| l.affinity_timeout_s),
                }
            }),
        });
    }
    Ok(out)
}

pub fn print_dump(services: &[ServiceDump]) {
    for s in services {
        println!(
            "{}/{}{}  {}  [{}]  {} slots, revision {}",
            SocketAddr::new(s.vip, s.port),
            s.proto,
            s.destination
                .map_or_else(String::new, |i| format!(" destination {i}")),
            service_name(s),
            s.route,
            s.slot_count,
            s.revision
        );
        print_affinity(s);
        print_destinations(s);
        print_outliers(s);
        print_gateway(s);
    }
}

/// Outlier detection's view of the service's backends.
fn print_outliers(s: &ServiceDump) {
    if s.outliers.is_empty() {
        return;
    }
    println!(
        "    outlier detection (failed connects in a row; ejected backends are out of the table):"
    );
    for o in &s.outliers {
        let state = match o.ejected_for_ms {
            Some(ms) => format!("EJECTED, back in {:.1} s", ms as f64 / 1e3),
            None => "serving".to_owned(),
        };
        println!(
            "        {:<26} {state}; {} failed, {} succeeded, {} in a row, ejected {} time(s)",
            o.backend.to_string(),
            o.failures,
            o.successes,
            o.consecutive,
            o.ejections
        );
    }
}

/// How a connect picks its slot, when it is not a random draw.
fn print_affinity(s: &ServiceDump) {
    if s.least_request {
        println!(
            "    least request (DestinationRule LEAST_REQUEST): of two slots drawn, the backend with fewer connections open"
        );
    }
    if s.hash_client && s.destinations.iter().any(|d| d.table.is_some()) {
        println!(
            "    the destination is a hash of the client: a client (its bound address, else its pod) keeps its destination while the weights stay"
        );
    } else if s.hash_client {
        println!(
            "    consistent hash of the client (DestinationRule consistentHash.useSourceIp): a weighted Maglev table of {} slots; a client (its bound address, else its pod) keeps its backend",
            s.slot_count
        );
    }
    if let Some(a) = &s.affinity {
        let timeout = a
            .timeout_s
            .map_or_else(|| "a timeout not recorded".to_owned(), |t| format!("{t} s"));
        println!(
            "    session affinity ClientIP: a client (pod) keeps its backend while it stays, until idle {timeout}"
        );
    }
}

/// A gateway port: which Gateway servers, who serves it and why, its routes.
fn print_gateway(s: &ServiceDump) {
    let Some(g) = &s.gateway else {
        return;
    };
    println!(
        "    gateway port {}/{} of {}: served by the {}: {}",
        g.port,
        g.protocol,
        g.servers.join(", "),
        g.served_by,
        g.why
    );
    if !g.router.is_empty() {
        println!("    the router listens on {}", g.router.join(", "));
    }
    if let Some(shortcut) = &g.shortcut {
        println!("    {shortcut}");
    }
    for r in &g.routes {
        println!("      {r}");
    }
}

fn print_destinations(s: &ServiceDump) {
    if s.slot_count == 0 {
        println!("    no backend: every connect fails with EHOSTUNREACH");
    }
    for d in &s.destinations {
        let weight = d.weight.map_or_else(|| "-".to_owned(), |w| w.to_string());
        println!("    {:<52} weight {weight}", d.name);
        if let Some(t) = &d.table {
            println!(
                "        its own table (destination {}) {:>4}/{} slots  {:6.2}%",
                t.destination,
                t.slots,
                s.slot_count,
                100.0 * t.share
            );
            continue;
        }
        if d.backends.is_empty() {
            println!("        (no ready endpoint of this family)");
        }
        for b in &d.backends {
            let addr = b
                .addr
                .map_or_else(|| "refused (EHOSTUNREACH)".to_owned(), |a| a.to_string());
            println!(
                "        {addr:<26} {:>4}/{} slots  {:6.2}%",
                b.slots,
                s.slot_count,
                100.0 * b.share
            );
        }
    }
}

/// `explain VIP:PORT`: which route applies and why, and the shares.
pub fn print_explain(target: SocketAddr, services: &[ServiceDump]) {
    if services.is_empty() {
        println!(
            "{target} is not a mesh service port: connects to it are left alone (no rewrite)."
        );
        return;
    }
    for s in services {
        if s.gateway.is_some() {
            println!(
                "{target}/{} is a gateway port of {}, for the node's own processes.",
                s.proto,
                service_name(s)
            );
            print_gateway(s);
        } else if let Some(i) = s.destination {
            println!(
                "{target}/{} destination {i} of service {}: a table of its own, with its own policy.",
                s.proto,
                service_name(s)
            );
        } else {
            println!("{target}/{} is service {}.", s.proto, service_name(s));
        }
        print_affinity(s);
        print_outliers(s);
        println!("route: {}", s.route);
        let total: u64 = s.destinations.iter().filter_map(|d| d.weight).sum();
        if s.destinations.len() > 1 {
            println!(
                "weights are proportions of their sum ({total}); each destination's share is split evenly over its ready endpoints."
            );
        }
        if s.destinations.iter().any(|d| d.table.is_some()) {
            println!(
                "the route's destinations differ in policy: the kernel draws a destination (one of {} slots, revision {}), then a backend from that destination's own table (below):",
                s.slot_count, s.revision
            );
        } else {
            println!(
                "the kernel draws one of {} slots uniformly at each connect (revision {}):",
                s.slot_count, s.revision
            );
        }
        print_destinations(s);
    }
}

fn service_name(s: &ServiceDump) -> String {
    s.service
        .as_ref()
        .map_or_else(|| "(unknown)".to_owned(), ToString::to_string)
}

fn read_dir(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
