//! The gateway for clients outside the node (tc, per packet): the only writer
//! of `GATEWAY_VIPS_V1` and `MAGLEV_V1`, and the gateway devices' settings.
//!
//! Each kernel-served gateway port gets one weighted Maglev table per address
//! family ([`crate::compile::gateway::maglev`]), shared by every node address of
//! that family. A table is written whole under a fresh id before the port's
//! `GATEWAY_VIPS_V1` entries flip to it, and is deleted only [`GRACE`] after
//! nothing names it, so a flow's first packet never sees a half-written table.
//! Flows that exist keep their backend through the conntrack (`GATEWAY_CT_V1`,
//! written by the kernel), whatever the tables become.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use mesh_common::{Backend, GatewayVip, MaglevKey, ServiceKey};
use tracing::{info, warn};

use super::{codec, maps::KernelMap};
use crate::compile::{
    BackendAddr, Proto, ServiceAddr,
    gateway::{GatewayPort, Serve, maglev},
};

/// How long a replaced table stays after its last reader was flipped away: a
/// program that read the old `GATEWAY_VIPS_V1` value finishes long before.
pub const GRACE: Duration = Duration::from_secs(2);

/// One port's table for one family.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Table {
    id: u32,
    size: u32,
    weighted: Vec<(BackendAddr, u64)>,
}

/// The writer of the gateway's VIP and Maglev maps.
pub struct Outside {
    vips: Box<dyn KernelMap<ServiceKey, GatewayVip> + Send + Sync>,
    maglev: Box<dyn KernelMap<MaglevKey, Backend> + Send + Sync>,
    /// Live tables by (port, IPv4?).
    tables: BTreeMap<(u16, bool), Table>,
    /// Tables no entry names any more: (id, size) -> since when.
    retired: BTreeMap<(u32, u32), Instant>,
    /// Addresses no longer served, kept as "no new flow" entries so that
    /// flows in progress keep their translation: since when.
    draining: BTreeMap<ServiceKey, Instant>,
    next_id: u32,
}

/// How long an address no longer served keeps translating its flows in
/// progress: the conntrack's idle timeout, so only a flow busy for longer
/// than that is cut (its next packet reaches the node's stack: an RST).
pub const DRAIN: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// A draining address: no table, so a SYN passes to the node's stack
/// (nothing listens: RST), while conntrack still carries flows in progress.
const NO_NEW_FLOWS: GatewayVip = GatewayVip {
    table_id: 0,
    slot_count: 0,
};

impl std::fmt::Debug for Outside {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outside")
            .field("tables", &self.tables)
            .field("retired", &self.retired)
            .finish_non_exhaustive()
    }
}

impl Outside {
    /// Takes over the maps as a previous agent left them: the tables found
    /// stay until the first [`Outside::update`] flips every entry to new ones
    /// (the same content: Maglev is deterministic), then go after [`GRACE`].
    pub fn new(
        vips: Box<dyn KernelMap<ServiceKey, GatewayVip> + Send + Sync>,
        maglev: Box<dyn KernelMap<MaglevKey, Backend> + Send + Sync>,
        now: Instant,
    ) -> Self {
        let mut found: BTreeMap<u32, u32> = BTreeMap::new();
        for key in maglev.keys() {
            let size = found.entry(key.table_id).or_default();
            *size = (*size).max(key.slot + 1);
        }
        let next_id = found
            .keys()
            .next_back()
            .map_or(1, |id| id.wrapping_add(1).max(1));
        let retired = found
            .into_iter()
            .map(|(id, size)| ((id, size), now))
            .collect();
        Self {
            vips,
            maglev,
            tables: BTreeMap::new(),
            retired,
            draining: BTreeMap::new(),
            next_id,
        }
    }

    /// Makes the maps serve `ports` (only [`Serve::Kernel`] ones) on the
    /// node's addresses `node` (loopback left out: the connect hooks serve
    /// it). Returns what could not be written or built, in sentences.
    pub fn update(&mut self, ports: &[GatewayPort], node: &[IpAddr], now: Instant) -> Vec<String> {
        let mut errors = Vec::new();
        let mut desired: BTreeMap<ServiceKey, GatewayVip> = BTreeMap::new();
        let mut live: BTreeSet<(u16, bool)> = BTreeSet::new();
        for p in ports {
            let Serve::Kernel { destinations, .. } = &p.serve else {
                continue;
            };
            for v4 in [true, false] {
                let weighted = maglev::weighted(destinations, v4);
                if weighted.is_empty() {
                    continue;
                }
                let Some(table) = self.table(p.port, v4, weighted, now, &mut errors) else {
                    continue;
                };
                live.insert((p.port, v4));
                for ip in node
                    .iter()
                    .filter(|ip| ip.is_ipv4() == v4 && !ip.is_loopback())
                {
                    let key = codec::service_key(ServiceAddr::port(*ip, p.port, Proto::Tcp));
                    desired.insert(
                        key,
                        GatewayVip {
                            table_id: table.id,
                            slot_count: table.size,
                        },
                    );
                }
            }
        }
        for (key, value) in &desired {
            if self.vips.get(key) != Some(*value)
                && let Err(e) = self.vips.insert(*key, *value)
            {
                errors.push(format!(
                    "gateway address {:?}: cannot write GATEWAY_VIPS_V1: {e}",
                    codec::service_addr(key)
                ));
            }
        }
        // Addresses no longer served (a Gateway deleted, a port now the
        // router's): no new flow, flows in progress drain (see [`DRAIN`]).
        self.draining.retain(|key, _| !desired.contains_key(key));
        for key in self.vips.keys() {
            if desired.contains_key(&key) {
                continue;
            }
            let since = *self.draining.entry(key).or_insert(now);
            if now.duration_since(since) >= DRAIN {
                let _ = self.vips.remove(&key);
                self.draining.remove(&key);
            } else if self.vips.get(&key) != Some(NO_NEW_FLOWS)
                && let Err(e) = self.vips.insert(key, NO_NEW_FLOWS)
            {
                errors.push(format!(
                    "gateway address {:?}: cannot mark it draining in GATEWAY_VIPS_V1: {e}",
                    codec::service_addr(&key)
                ));
            }
        }
        let gone: Vec<(u16, bool)> = self
            .tables
            .keys()
            .filter(|k| !live.contains(k))
            .copied()
            .collect();
        for k in gone {
            if let Some(t) = self.tables.remove(&k) {
                self.retired.insert((t.id, t.size), now);
            }
        }
        errors
    }

    /// The live table of (port, family) for `weighted`: the one there is if
    /// its weights are the same, else a new one written whole (the old one
    /// retired). `None` if it cannot be built or written.
    fn table(
        &mut self,
        port: u16,
        v4: bool,
        weighted: Vec<(BackendAddr, u64)>,
        now: Instant,
        errors: &mut Vec<String>,
    ) -> Option<Table> {
        if let Some(t) = self.tables.get(&(port, v4))
            && t.weighted == weighted
        {
            return Some(t.clone());
        }
        let size = match maglev::table_size(weighted.len()) {
            Ok(size) => size,
            Err(e) => {
                errors.push(format!("gateway port {port}: {e}"));
                return None;
            }
        };
        let slots = maglev::build(&weighted, size);
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        for (slot, backend) in slots.iter().enumerate() {
            let key = MaglevKey {
                table_id: id,
                slot: slot as u32,
            };
            if let Err(e) = self.maglev.insert(key, codec::backend_value(*backend, 0)) {
                errors.push(format!(
                    "gateway port {port}: cannot write MAGLEV_V1 (table {id}): {e}"
                ));
                self.retired.insert((id, size), now);
                return None;
            }
        }
        let table = Table { id, size, weighted };
        info!(
            port,
            family = if v4 { "IPv4" } else { "IPv6" },
            table = id,
            slots = size,
            backends = table.weighted.len(),
            "gateway Maglev table written"
        );
        if let Some(old) = self.tables.insert((port, v4), table.clone()) {
            self.retired.insert((old.id, old.size), now);
        }
        Some(table)
    }

    /// Deletes the tables retired more than [`GRACE`] ago that no entry names.
    pub fn collect_garbage(&mut self, now: Instant) {
        let named: BTreeSet<u32> = self.tables.values().map(|t| t.id).collect();
        let due: Vec<(u32, u32)> = self
            .retired
            .iter()
            .filter(|(_, since)| now.duration_since(**since) >= GRACE)
            .map(|(k, _)| *k)
            .collect();
        for (id, size) in due {
            self.retired.remove(&(id, size));
            if named.contains(&id) {
                continue;
            }
            for slot in 0..size {
                let _ = self.maglev.remove(&MaglevKey { table_id: id, slot });
            }
        }
    }
}

/// `--gateway-device`: which devices carry the gateway's outside clients.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Devices {
    /// Every non-loopback interface holding one of the node's addresses,
    /// bridges left out (see `is_bridge`).
    #[default]
    Auto,
    /// None: outside clients are not served.
    None,
    /// These, by name.
    Named(Vec<String>),
}

impl std::str::FromStr for Devices {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.trim() {
            "auto" => Self::Auto,
            "none" | "off" | "" => Self::None,
            list => Self::Named(
                list.split(',')
                    .map(str::trim)
                    .filter(|d| !d.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
        })
    }
}

impl Devices {
    /// The device names, resolved in this network namespace.
    pub fn resolve(&self) -> Vec<String> {
        match self {
            Self::None => Vec::new(),
            Self::Named(names) => names.clone(),
            Self::Auto => {
                let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
                    return Vec::new();
                };
                let mut out: Vec<String> = addrs
                    .filter(|a| {
                        !a.flags
                            .contains(nix::net::if_::InterfaceFlags::IFF_LOOPBACK)
                            && a.address.is_some_and(|s| {
                                s.as_sockaddr_in().is_some()
                                    || s.as_sockaddr_in6()
                                        .is_some_and(|v6| !v6.ip().is_unicast_link_local())
                            })
                    })
                    .map(|a| a.interface_name)
                    .filter(|d| !is_bridge(d))
                    .collect();
                out.sort();
                out.dedup();
                out
            }
        }
    }
}

/// The tc programs' counters (`GATEWAY_STATS_V1`, per CPU, summed): for
/// /metrics and the agent's exit log.
pub struct GatewayCounters {
    map: aya::maps::PerCpuArray<aya::maps::MapData, u64>,
}

impl std::fmt::Debug for GatewayCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayCounters").finish_non_exhaustive()
    }
}

/// (index, name, help) of each counter.
const COUNTERS: [(u32, &str, &str); 9] = {
    use mesh_common::gateway_stat as g;
    [
        (
            g::FORWARDED,
            "forwarded",
            "Client packets translated to a backend",
        ),
        (
            g::NEW_FLOWS,
            "new_flows",
            "Conntrack flows created (a SYN, or a flow picked again)",
        ),
        (
            g::NO_FLOW,
            "no_flow",
            "Client packets of a flow without its conntrack entry",
        ),
        (
            g::NO_BACKEND,
            "no_backend",
            "Flows that drew no backend (no table: refused by the node)",
        ),
        (
            g::REPLIED,
            "replied",
            "Replies translated back to the gateway address",
        ),
        (
            g::REWRITE_FAILED,
            "rewrite_failed",
            "Packets that could not be rewritten",
        ),
        (
            g::SNAT_FLOWS,
            "snat_flows",
            "New flows to a backend on another node",
        ),
        (
            g::SNAT_REPLIED,
            "snat_replied",
            "Replies of backends on other nodes translated back",
        ),
        (
            g::SNAT_FAILED,
            "snat_failed",
            "SYNs to a remote backend with no SNAT port or route",
        ),
    ]
};

impl GatewayCounters {
    pub fn open(pins: &super::pin::PinDir) -> Result<Self, aya::maps::MapError> {
        use aya::maps::{Map, MapData, PerCpuArray};
        let data = MapData::from_pin(pins.map(mesh_common::map_names::GATEWAY_STATS))?;
        Ok(Self {
            map: PerCpuArray::try_from(Map::PerCpuArray(data))?,
        })
    }

    /// (name, help, value) of every counter.
    pub fn read(&self) -> Vec<(&'static str, &'static str, u64)> {
        COUNTERS
            .iter()
            .map(|&(i, name, help)| {
                let value = self.map.get(&i, 0).map_or(0, |v| v.iter().sum());
                (name, help, value)
            })
            .collect()
    }
}

impl prometheus_client::collector::Collector for GatewayCounters {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::{encoding::EncodeMetric as _, metrics::counter::ConstCounter};
        for (name, help, value) in self.read() {
            let counter = ConstCounter::new(value);
            let full = format!("gateway_tc_{name}");
            let metric = encoder.encode_descriptor(&full, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}

/// Logs the tc programs' counters (at exit).
pub fn log_stats(pins: &super::pin::PinDir) {
    let counters = match GatewayCounters::open(pins) {
        Ok(c) => c.read(),
        Err(e) => {
            warn!("cannot read the gateway's tc counters: {e}");
            return;
        }
    };
    let at = |name: &str| counters.iter().find(|c| c.0 == name).map_or(0, |c| c.2);
    info!(
        forwarded = at("forwarded"),
        new_flows = at("new_flows"),
        no_flow = at("no_flow"),
        no_backend = at("no_backend"),
        replied = at("replied"),
        rewrite_failed = at("rewrite_failed"),
        snat_flows = at("snat_flows"),
        snat_replied = at("snat_replied"),
        snat_failed = at("snat_failed"),
        "gateway tc counters"
    );
}

/// Whether `device` is a bridge (`/sys/class/net/<device>/bridge`): the pods'
/// own bridge holds a node address, but a pod's reply to another pod on it is
/// bridged, never leaving by the bridge device's egress, so it could not be
/// translated back.
fn is_bridge(device: &str) -> bool {
    std::path::Path::new("/sys/class/net")
        .join(device)
        .join("bridge")
        .exists()
}

/// Warns when this namespace does not forward IP packets: a translated
/// packet then never reaches a pod.
pub fn warn_if_not_forwarding() {
    for (path, what) in [
        ("/proc/sys/net/ipv4/ip_forward", "net.ipv4.ip_forward"),
        (
            "/proc/sys/net/ipv6/conf/all/forwarding",
            "net.ipv6.conf.all.forwarding",
        ),
    ] {
        match std::fs::read_to_string(path) {
            Ok(v) if v.trim() == "0" => warn!(
                "{what} is 0 in the agent's network namespace: the gateway translates outside clients' packets to pods, but the kernel will not forward them (sysctl -w {what}=1)"
            ),
            Ok(_) => {}
            Err(e) => warn!("cannot read {path}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use aya::maps::MapError;

    use super::*;
    use crate::compile::{DestinationPlan, gateway::Protocol};

    /// An in-memory map shared with the test.
    #[derive(Clone)]
    struct Fake<K, V>(Arc<Mutex<BTreeMap<K, V>>>);

    impl<K, V> Fake<K, V> {
        fn new() -> Self {
            Self(Arc::new(Mutex::new(BTreeMap::new())))
        }
    }

    impl<K: Ord + Copy, V: Copy> KernelMap<K, V> for Fake<K, V> {
        fn get(&self, key: &K) -> Option<V> {
            self.0.lock().ok()?.get(key).copied()
        }
        fn insert(&mut self, key: K, value: V) -> Result<(), MapError> {
            if let Ok(mut m) = self.0.lock() {
                m.insert(key, value);
            }
            Ok(())
        }
        fn remove(&mut self, key: &K) -> Result<(), MapError> {
            match self.0.lock().ok().and_then(|mut m| m.remove(key)) {
                Some(_) => Ok(()),
                None => Err(MapError::KeyNotFound),
            }
        }
        fn keys(&self) -> Vec<K> {
            self.0
                .lock()
                .map(|m| m.keys().copied().collect())
                .unwrap_or_default()
        }
    }

    fn port(v1: u64, v2: u64) -> GatewayPort {
        let b = |last: u8| BackendAddr {
            ip: IpAddr::from([10, 244, 0, last]),
            port: 5000,
        };
        GatewayPort {
            port: 80,
            protocol: Protocol::Http,
            servers: Vec::new(),
            serve: Serve::Kernel {
                vs: Default::default(),
                field: "spec.http[0]".into(),
                destinations: vec![
                    DestinationPlan {
                        name: "v1".into(),
                        weight: v1,
                        backends: vec![b(11), b(12), b(13)],
                    },
                    DestinationPlan {
                        name: "v2".into(),
                        weight: v2,
                        backends: vec![b(14)],
                    },
                ],
            },
            why: String::new(),
        }
    }

    #[test]
    fn a_new_weight_set_is_a_new_table_flipped_to_then_the_old_one_goes() {
        let vips = Fake::new();
        let maglev = Fake::new();
        let t0 = Instant::now();
        let mut o = Outside::new(Box::new(vips.clone()), Box::new(maglev.clone()), t0);
        let node = [
            IpAddr::from([192, 168, 77, 1]),
            std::net::Ipv6Addr::from([0xfd00, 0x77, 0, 0, 0, 0, 0, 1]).into(),
        ];
        assert!(o.update(&[port(80, 20)], &node, t0).is_empty());
        let first: Vec<GatewayVip> = vips
            .0
            .lock()
            .expect("not poisoned")
            .values()
            .copied()
            .collect();
        assert_eq!(first.len(), 1, "one IPv4 address, no IPv6 backend");
        assert_eq!(first[0].slot_count, maglev::DEFAULT_SIZE);
        assert_eq!(maglev.keys().len(), maglev::DEFAULT_SIZE as usize);
        // The same weights: nothing rewritten.
        assert!(o.update(&[port(80, 20)], &node, t0).is_empty());
        assert_eq!(maglev.keys().len(), maglev::DEFAULT_SIZE as usize);
        // New weights: a second table, the entry flipped, the first kept
        // until the grace is over.
        assert!(o.update(&[port(0, 100)], &node, t0).is_empty());
        let second: Vec<GatewayVip> = vips
            .0
            .lock()
            .expect("not poisoned")
            .values()
            .copied()
            .collect();
        assert_ne!(second[0].table_id, first[0].table_id);
        assert_eq!(maglev.keys().len(), 2 * maglev::DEFAULT_SIZE as usize);
        o.collect_garbage(t0 + GRACE / 2);
        assert_eq!(maglev.keys().len(), 2 * maglev::DEFAULT_SIZE as usize);
        o.collect_garbage(t0 + GRACE);
        assert_eq!(maglev.keys().len(), maglev::DEFAULT_SIZE as usize);
        // A restarted writer keeps what it finds until it has flipped away.
        let mut again = Outside::new(Box::new(vips.clone()), Box::new(maglev.clone()), t0);
        assert!(again.update(&[port(0, 100)], &node, t0).is_empty());
        let third: Vec<GatewayVip> = vips
            .0
            .lock()
            .expect("not poisoned")
            .values()
            .copied()
            .collect();
        assert!(third[0].table_id > second[0].table_id);
        again.collect_garbage(t0 + GRACE);
        assert_eq!(maglev.keys().len(), maglev::DEFAULT_SIZE as usize);
        // The port gone: its address drains (no new flow, no table named),
        // then goes after DRAIN.
        assert!(again.update(&[], &node, t0).is_empty());
        let draining: Vec<GatewayVip> = vips
            .0
            .lock()
            .expect("not poisoned")
            .values()
            .copied()
            .collect();
        assert_eq!(draining, [NO_NEW_FLOWS]);
        again.collect_garbage(t0 + 2 * GRACE);
        assert!(maglev.keys().is_empty(), "the drained port's table freed");
        assert!(again.update(&[], &node, t0 + DRAIN / 2).is_empty());
        assert_eq!(vips.keys().len(), 1);
        assert!(again.update(&[], &node, t0 + DRAIN).is_empty());
        assert!(vips.keys().is_empty());
    }
}
