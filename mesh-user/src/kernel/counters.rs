//! The kernel's own counters, read (never written) by the agent: for its logs and
//! for `/metrics`, on each scrape.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
};

use aya::maps::{MapData, MapError, PerCpuArray, PerCpuHashMap, SockHash};
use mesh_common::{ConnKey, sock_stat};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{counter::ConstCounter, gauge::ConstGauge},
};

use super::pin::PinDir;
use crate::{
    compile::{BackendAddr, Proto, ServiceAddr},
    model::NamespacedName,
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
    pub not_meshed_sockets: u64,
}

/// Reader of `SOCK_STATS_V1`, and of `SOCKETS_V2`'s occupancy.
pub struct SockStats {
    map: PerCpuArray<MapData, u64>,
    sockets: SockHash<MapData, ConnKey>,
    /// `SOCKETS_V2`, to walk its keys (a socket map's values cannot be read).
    sockets_info: aya::maps::MapInfo,
}

impl std::fmt::Debug for SockStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SockStats").finish_non_exhaustive()
    }
}

impl SockStats {
    pub fn new(
        map: PerCpuArray<MapData, u64>,
        sockets: SockHash<MapData, ConnKey>,
        sockets_info: aya::maps::MapInfo,
    ) -> Self {
        Self {
            map,
            sockets,
            sockets_info,
        }
    }

    /// The socket map (`sk_msg` attaches to it).
    pub fn socket_map(&self) -> &SockHash<MapData, ConnKey> {
        &self.sockets
    }

    /// Sockets in `SOCKETS_V2` now: a walk of the map, for scrapes. Distinct keys
    /// only, and bounded: a socket closing mid-walk restarts the kernel's
    /// iteration from the first bucket.
    pub fn socket_count(&self) -> usize {
        super::sys::count_keys(&self.sockets_info, 2 * mesh_common::MAX_SOCKETS as usize)
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
            not_meshed_sockets: at(sock_stat::NOT_MESHED),
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
            (
                "redirect_not_meshed_sockets",
                "Established TCP sockets under the attach point but outside the mesh scope (pods of unlabelled namespaces), left alone",
                c.not_meshed_sockets,
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

/// Which service port a service counter id stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLabel {
    pub id: u32,
    pub service: NamespacedName,
    pub addr: ServiceAddr,
}

/// Which backend a backend counter id stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendLabel {
    pub id: u32,
    pub addr: BackendAddr,
    pub proto: Proto,
}

/// Which backend each backend counter id stands for, indexed by id: ids are
/// dense (the lowest free one is given out), so 100 000 backends take ~2 MiB
/// here where a map by address took ~11.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BackendIds(Vec<Option<(BackendAddr, Proto)>>);

impl BackendIds {
    pub fn from_ids(ids: impl IntoIterator<Item = (u32, (BackendAddr, Proto))>) -> Self {
        let mut all = Self::default();
        for (id, key) in ids {
            all.set(id, Some(key));
        }
        all
    }

    /// `id` stands for `key` from now on (`None`: for nothing).
    pub fn set(&mut self, id: u32, key: Option<(BackendAddr, Proto)>) {
        let i = id as usize;
        if key.is_some() && i >= self.0.len() {
            self.0.resize(i + 1, None);
        }
        if let Some(slot) = self.0.get_mut(i) {
            *slot = key;
        }
        // No trailing holes: the same ids make the same value.
        while self.0.last() == Some(&None) {
            self.0.pop();
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = BackendLabel> + '_ {
        self.0.iter().enumerate().filter_map(|(id, key)| {
            let (addr, proto) = (*key)?;
            Some(BackendLabel {
                id: u32::try_from(id).ok()?,
                addr,
                proto,
            })
        })
    }
}

/// Entries in one map we write (a counter map: the ids given out), and its
/// capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Occupancy {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// Labels for the kernel's per-service and per-backend counters, and map
/// occupancy as the agent's bookkeeping knows it. Published by the agent after
/// each apply; read on each scrape.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct View {
    /// Per service port (destinations' tables count for their port).
    pub services: BTreeMap<ServiceAddr, ServiceLabel>,
    pub backends: BackendIds,
    pub occupancy: Vec<Occupancy>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
    address: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
    protocol: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: &'static str,
}

/// The connect hooks' global counters (`GLOBAL_STATS_V1`), summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnectCounts {
    pub rewritten: u64,
    pub no_backend: u64,
    pub not_service: u64,
    pub table_retry: u64,
    pub peer_rewritten: u64,
    pub peer_rewritten_by_variant: u64,
    pub agent_bypassed: u64,
    pub not_meshed: u64,
    /// Connects sent to the backend their client drew before (session affinity).
    pub affinity_kept: u64,
    /// Connects refused: their backend had `maxConnections` open.
    pub pool_overflow: u64,
}

/// Reader of `SERVICE_STATS_V1`, `BACKEND_STATS_V1` and `GLOBAL_STATS_V1` (its
/// own handles on the pinned maps: the applier writes through its own).
pub struct Connections {
    services: PerCpuHashMap<MapData, u32, u64>,
    backends: PerCpuHashMap<MapData, u32, mesh_common::BackendStats>,
    global: PerCpuArray<MapData, u64>,
    view: Arc<RwLock<View>>,
    /// To read each pinned map's kernel memory on a scrape.
    pins: PinDir,
}

impl std::fmt::Debug for Connections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connections").finish_non_exhaustive()
    }
}

impl Connections {
    pub fn open(pins: &PinDir, view: Arc<RwLock<View>>) -> Result<Self, (&'static str, MapError)> {
        use aya::maps::Map;
        use mesh_common::map_names as m;
        fn open<T: TryFrom<Map, Error = MapError>>(
            pins: &PinDir,
            name: &'static str,
            kind: fn(MapData) -> Map,
        ) -> Result<T, (&'static str, MapError)> {
            MapData::from_pin(pins.map(name))
                .and_then(|data| T::try_from(kind(data)))
                .map_err(|e| (name, e))
        }
        Ok(Self {
            services: open(pins, m::SERVICE_STATS, Map::PerCpuHashMap)?,
            backends: open(pins, m::BACKEND_STATS, Map::PerCpuHashMap)?,
            global: open(pins, m::GLOBAL_STATS, Map::PerCpuArray)?,
            view,
            pins: pins.clone(),
        })
    }

    pub fn global(&self) -> ConnectCounts {
        use mesh_common::global_stat as g;
        let at = |i: u32| -> u64 { self.global.get(&i, 0).map_or(0, |v| v.iter().sum()) };
        ConnectCounts {
            rewritten: at(g::REWRITTEN),
            no_backend: at(g::NO_BACKEND),
            not_service: at(g::NOT_SERVICE),
            table_retry: at(g::TABLE_RETRY),
            peer_rewritten: at(g::PEER_REWRITTEN),
            peer_rewritten_by_variant: at(g::PEER_REWRITTEN_BY_VARIANT),
            agent_bypassed: at(g::AGENT_BYPASSED),
            not_meshed: at(g::NOT_MESHED),
            affinity_kept: at(g::AFFINITY_KEPT),
            pool_overflow: at(g::POOL_OVERFLOW),
        }
    }

    /// The backends the kernel sent connects to since they got their ids,
    /// and how many (the others, most of 100 000 at scale, are left out).
    pub fn per_backend(&self) -> Vec<(BackendLabel, u64)> {
        let Ok(view) = self.view.read() else {
            return Vec::new();
        };
        view.backends
            .iter()
            .map(|b| (b, self.backend_total(b.id)))
            .filter(|&(_, connects)| connects > 0)
            .collect()
    }

    fn backend_total(&self, id: u32) -> u64 {
        self.backends
            .get(&id, 0)
            .map_or(0, |v| v.iter().map(|s| s.connects).sum())
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
        for s in view.services.values() {
            let n: u64 = self.services.get(&s.id, 0).map_or(0, |v| v.iter().sum());
            ConstCounter::new(n).encode(e.encode_family(&ServiceLabels {
                service: s.service.to_string(),
                address: s.addr.to_string(),
            })?)?;
        }
        let mut e = encoder.encode_descriptor(
            "backend_connections",
            "Connects rewritten to a backend (kernel counter)",
            None,
            family,
        )?;
        for b in view.backends.iter() {
            ConstCounter::new(self.backend_total(b.id)).encode(e.encode_family(
                &BackendLabels {
                    backend: b.addr.to_string(),
                    protocol: b.proto.to_string(),
                },
            )?)?;
        }
        let gauge = ConstGauge::new(0i64).metric_type();
        let mut e = encoder.encode_descriptor(
            "map_entries",
            "Entries in a BPF map, as the agent wrote them (the counter maps: ids given out; the kernel creates an id's entry at its first connect)",
            None,
            gauge,
        )?;
        for o in &view.occupancy {
            ConstGauge::new(i64::try_from(o.entries).unwrap_or(i64::MAX))
                .encode(e.encode_family(&MapLabels { map: o.map })?)?;
        }
        let mut e = encoder.encode_descriptor(
            "map_capacity",
            "Capacity (max_entries) of a BPF map",
            None,
            gauge,
        )?;
        for o in &view.occupancy {
            ConstGauge::new(i64::try_from(o.capacity).unwrap_or(i64::MAX))
                .encode(e.encode_family(&MapLabels { map: o.map })?)?;
        }
        let mut e = encoder.encode_descriptor(
            "map_memory_bytes",
            "Kernel memory of a pinned BPF map (its fdinfo memlock: buckets for the whole capacity, elements present or preallocated, per-CPU values per possible CPU)",
            None,
            gauge,
        )?;
        for map in super::memory::pinned(&self.pins).into_iter().flatten() {
            ConstGauge::new(i64::try_from(map.bytes).unwrap_or(i64::MAX))
                .encode(e.encode_family(&MapLabels { map: map.map })?)?;
        }
        Ok(())
    }
}
