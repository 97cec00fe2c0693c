//! The kernel's own counters, read (never written) by the agent: for its logs and
//! for `/metrics`, on each scrape.

use aya::maps::{MapData, PerCpuArray, SockHash};
use mesh_common::{SockKey, sock_stat};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

/// Same-node redirection counters (`SOCK_STATS_V1`), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RedirectCounts {
    pub sockets_added: u64,
    pub socket_add_failures: u64,
    pub redirected_messages: u64,
    pub redirected_bytes: u64,
    pub fallback_messages: u64,
    pub fallback_bytes: u64,
    pub excluded_sockets: u64,
}

/// Reader of `SOCK_STATS_V1`, and of `SOCKETS_V1`'s occupancy.
pub struct SockStats {
    map: PerCpuArray<MapData, u64>,
    sockets: SockHash<MapData, SockKey>,
}

impl std::fmt::Debug for SockStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockStats").finish_non_exhaustive()
    }
}

impl SockStats {
    pub fn new(map: PerCpuArray<MapData, u64>, sockets: SockHash<MapData, SockKey>) -> Self {
        Self { map, sockets }
    }

    /// The socket map (`sk_msg` attaches to it).
    pub fn socket_map(&self) -> &SockHash<MapData, SockKey> {
        &self.sockets
    }

    /// Sockets in `SOCKETS_V1` now: a walk of the map, for scrapes. Distinct keys
    /// only, and bounded: a socket closing mid-walk restarts the kernel's
    /// iteration from the first bucket.
    pub fn socket_count(&self) -> usize {
        crate::sys::count_keys(
            std::os::fd::AsFd::as_fd(self.sockets.fd()),
            std::mem::size_of::<SockKey>(),
            2 * mesh_common::MAX_SOCKETS as usize,
        )
        .unwrap_or(0)
    }

    pub fn read(&self) -> RedirectCounts {
        let at = |i: u32| -> u64 {
            self.map
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0)
        };
        RedirectCounts {
            sockets_added: at(sock_stat::ADDED),
            socket_add_failures: at(sock_stat::ADD_FAILED),
            redirected_messages: at(sock_stat::REDIRECTED_MSGS),
            redirected_bytes: at(sock_stat::REDIRECTED_BYTES),
            fallback_messages: at(sock_stat::FALLBACK_MSGS),
            fallback_bytes: at(sock_stat::FALLBACK_BYTES),
            excluded_sockets: at(sock_stat::EXCLUDED),
        }
    }
}

impl Collector for SockStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.read();
        for (name, help, value) in [
            (
                "redirect_sockets_added",
                "Established mesh TCP sockets added to the same-node socket map",
                c.sockets_added,
            ),
            (
                "redirect_socket_add_failures",
                "Established mesh TCP sockets not added (key taken or map full); they use TCP",
                c.socket_add_failures,
            ),
            (
                "redirect_messages",
                "Messages handed straight to a same-node peer socket (handed over; a peer torn down at that instant may still drop one)",
                c.redirected_messages,
            ),
            (
                "redirect_bytes",
                "Bytes handed straight to a same-node peer socket",
                c.redirected_bytes,
            ),
            (
                "redirect_fallback_messages",
                "Messages of mesh sockets sent through TCP/IP: peer not a local mesh socket",
                c.fallback_messages,
            ),
            (
                "redirect_fallback_bytes",
                "Bytes of mesh sockets sent through TCP/IP: peer not a local mesh socket",
                c.fallback_bytes,
            ),
            (
                "redirect_excluded_sockets",
                "Established mesh TCP sockets left to TCP: an end is an excluded endpoint",
                c.excluded_sockets,
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let sockets = ConstGauge::new(i64::try_from(self.socket_count()).unwrap_or(i64::MAX));
        sockets.encode(encoder.encode_descriptor(
            "redirect_sockets",
            "Established mesh TCP sockets in the same-node socket map now",
            None,
            sockets.metric_type(),
        )?)?;
        Ok(())
    }
}

/// Labels for the kernel's per-service and per-backend counters, and map
/// occupancy as the agent's bookkeeping knows it. Published by the reconciler
/// after each apply; read on each scrape.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// (service id, `namespace/name`, `VIP:port/PROTO`).
    pub services: Vec<(u32, String, String)>,
    /// (backend id, `IP:port`, protocol).
    pub backends: Vec<(u32, String, String)>,
    /// (map, entries, capacity).
    pub occupancy: Vec<(&'static str, u64, u64)>,
}

/// Reader of `SERVICE_STATS_V1` and `BACKEND_STATS_V1` (their own handles on the
/// pinned maps: the applier keeps writing through its own).
pub struct Connections {
    services: aya::maps::PerCpuHashMap<MapData, u32, u64>,
    backends: aya::maps::PerCpuHashMap<MapData, u32, mesh_common::BackendStats>,
    view: std::sync::Arc<std::sync::RwLock<View>>,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections").finish_non_exhaustive()
    }
}

impl Connections {
    pub fn open(
        pins: &crate::pin::PinDir,
        view: std::sync::Arc<std::sync::RwLock<View>>,
    ) -> Result<Self, aya::maps::MapError> {
        use aya::maps::Map;
        let open = |name| MapData::from_pin(pins.map(name));
        Ok(Self {
            services: aya::maps::PerCpuHashMap::try_from(Map::PerCpuHashMap(open(
                mesh_common::map_names::SERVICE_STATS,
            )?))?,
            backends: aya::maps::PerCpuHashMap::try_from(Map::PerCpuHashMap(open(
                mesh_common::map_names::BACKEND_STATS,
            )?))?,
            view,
        })
    }
}

impl Collector for Connections {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Ok(view) = self.view.read() else {
            return Ok(());
        };
        let family = ConstCounter::new(0u64).metric_type();
        let mut e = encoder.encode_descriptor(
            "service_connections",
            "Connects to a service port, rewritten or refused (kernel counter)",
            None,
            family,
        )?;
        for (id, service, addr) in &view.services {
            let n: u64 = self.services.get(id, 0).map_or(0, |v| v.iter().sum());
            ConstCounter::new(n).encode(
                e.encode_family(&[("service", service.as_str()), ("address", addr.as_str())])?,
            )?;
        }
        let mut e = encoder.encode_descriptor(
            "backend_connections",
            "Connects rewritten to a backend (kernel counter)",
            None,
            family,
        )?;
        for (id, addr, proto) in &view.backends {
            let n: u64 = self
                .backends
                .get(id, 0)
                .map_or(0, |v| v.iter().map(|s| s.connects).sum());
            ConstCounter::new(n).encode(
                e.encode_family(&[("backend", addr.as_str()), ("protocol", proto.as_str())])?,
            )?;
        }
        let gauge = ConstGauge::new(0i64).metric_type();
        let mut e = encoder.encode_descriptor(
            "map_entries",
            "Entries in a BPF map, as the agent wrote them",
            None,
            gauge,
        )?;
        for (map, entries, _) in &view.occupancy {
            ConstGauge::new(i64::try_from(*entries).unwrap_or(i64::MAX))
                .encode(e.encode_family(&[("map", *map)])?)?;
        }
        let mut e = encoder.encode_descriptor(
            "map_capacity",
            "Capacity (max_entries) of a BPF map",
            None,
            gauge,
        )?;
        for (map, _, capacity) in &view.occupancy {
            ConstGauge::new(i64::try_from(*capacity).unwrap_or(i64::MAX))
                .encode(e.encode_family(&[("map", *map)])?)?;
        }
        Ok(())
    }
}
