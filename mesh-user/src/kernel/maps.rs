//! The maps [`super::apply::Applier`] writes, behind two small traits, so that
//! apply's logic (revision flips, clean-up, id reuse, adoption) is unit-tested
//! against in-memory maps ([`fake`]) and runs on the kernel's pinned maps
//! unchanged.

use std::os::fd::AsFd as _;

use aya::maps::{HashMap, MapData, MapError, PerCpuHashMap};
use mesh_common::{
    AffinityMatch, Backend, BackendStats, EndpointKey, ServiceKey, ServiceValue, SlotKey,
    SocketPolicy,
};

/// A hash map of the kernel's, as apply uses it.
pub trait KernelMap<K, V> {
    fn get(&self, key: &K) -> Option<V>;
    fn insert(&mut self, key: K, value: V) -> Result<(), MapError>;
    /// `MapError::KeyNotFound` when absent.
    fn remove(&mut self, key: &K) -> Result<(), MapError>;
    fn keys(&self) -> Vec<K>;
    /// Writes every entry, in order (one call where the kernel can); on a
    /// failure, how many were written before it, and the error.
    fn insert_all(&mut self, entries: &[(K, V)]) -> Result<(), (usize, MapError)>
    where
        K: Copy,
        V: Copy,
    {
        for (i, (k, v)) in entries.iter().enumerate() {
            self.insert(*k, *v).map_err(|e| (i, e))?;
        }
        Ok(())
    }
}

/// Makes a set-like map (key -> 0) hold exactly `desired`, given `current`,
/// what it holds as far as we know; `current` follows each write that
/// succeeded. Returns the members whose write failed (tried again next time).
pub fn sync_set<T: Ord + Copy, K>(
    map: &mut dyn KernelMap<K, u32>,
    current: &mut std::collections::BTreeSet<T>,
    desired: &std::collections::BTreeSet<T>,
    key: impl Fn(T) -> K,
) -> Vec<(T, MapError)> {
    let zero = |set: &std::collections::BTreeSet<T>| set.iter().map(|t| (*t, 0)).collect();
    let mut held = zero(current);
    let failed = sync_map(map, &mut held, &zero(desired), key);
    *current = held.into_keys().collect();
    failed
}

/// The same for a map whose values matter: writes what is new or changed,
/// removes what is no longer desired.
pub fn sync_map<T: Ord + Copy, K, V: Copy + PartialEq>(
    map: &mut dyn KernelMap<K, V>,
    current: &mut std::collections::BTreeMap<T, V>,
    desired: &std::collections::BTreeMap<T, V>,
    key: impl Fn(T) -> K,
) -> Vec<(T, MapError)> {
    let mut failed = Vec::new();
    let write: Vec<(T, V)> = desired
        .iter()
        .filter(|(t, v)| current.get(t) != Some(v))
        .map(|(t, v)| (*t, *v))
        .collect();
    let remove: Vec<T> = current
        .keys()
        .filter(|t| !desired.contains_key(t))
        .copied()
        .collect();
    for (member, value) in write {
        match map.insert(key(member), value) {
            Ok(()) => {
                current.insert(member, value);
            }
            Err(e) => failed.push((member, e)),
        }
    }
    for member in remove {
        match map.remove(&key(member)) {
            Ok(()) | Err(MapError::KeyNotFound) => {
                current.remove(&member);
            }
            Err(e) => failed.push((member, e)),
        }
    }
    failed
}

/// Per-CPU counters by id (connections per service, per backend). The
/// kernel creates an id's entry on its first count; the agent only reads and
/// deletes them.
pub trait CounterMap {
    /// `MapError::KeyNotFound` when absent (the id never counted anything).
    fn remove(&mut self, id: u32) -> Result<(), MapError>;
    fn ids(&self) -> Vec<u32>;
    /// The id's count, summed over CPUs; `None` until it counts something.
    fn total(&self, id: u32) -> Option<u64>;
}

/// How many entries the maps apply writes can hold (`max_entries`, as loaded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// Service ports: `SERVICES_V1` and `SERVICE_STATS_V1`, the smaller.
    pub services: u32,
    pub slots: u32,
    /// Backend counters: `BACKEND_STATS_V1`.
    pub backends: u32,
    pub redirect_excluded: u32,
}

/// Every map apply writes.
pub struct Maps {
    pub capacity: Capacity,
    pub services: Box<dyn KernelMap<ServiceKey, ServiceValue> + Send + Sync>,
    pub slots: Box<dyn KernelMap<SlotKey, Backend> + Send + Sync>,
    pub service_stats: Box<dyn CounterMap + Send + Sync>,
    pub backend_stats: Box<dyn CounterMap + Send + Sync>,
    pub redirect_excluded: Box<dyn KernelMap<EndpointKey, u32> + Send + Sync>,
    /// Members of services with session affinity -> their timeout.
    pub affinity_match: Box<dyn KernelMap<AffinityMatch, u32> + Send + Sync>,
    /// Service id -> its clients' socket options.
    pub socket_policy: Box<dyn KernelMap<u32, SocketPolicy> + Send + Sync>,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps").finish_non_exhaustive()
    }
}

impl<K: aya::Pod, V: aya::Pod> KernelMap<K, V> for HashMap<MapData, K, V> {
    fn get(&self, key: &K) -> Option<V> {
        HashMap::get(self, key, 0).ok()
    }

    fn insert(&mut self, key: K, value: V) -> Result<(), MapError> {
        HashMap::insert(self, key, value, 0)
    }

    fn remove(&mut self, key: &K) -> Result<(), MapError> {
        HashMap::remove(self, key)
    }

    fn keys(&self) -> Vec<K> {
        HashMap::keys(self).filter_map(Result::ok).collect()
    }

    fn insert_all(&mut self, entries: &[(K, V)]) -> Result<(), (usize, MapError)> {
        let keys: Vec<K> = entries.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = entries.iter().map(|(_, v)| *v).collect();
        update_batch(
            aya::maps::IterableMap::map(self),
            pod_bytes(&keys),
            std::mem::size_of::<K>(),
            pod_bytes(&values),
            std::mem::size_of::<V>(),
        )
    }
}

/// [`super::sys::map_update_batch`] on `map`, its error as aya's.
fn update_batch(
    map: &MapData,
    keys: &[u8],
    key_bytes: usize,
    values: &[u8],
    value_bytes: usize,
) -> Result<(), (usize, MapError)> {
    super::sys::map_update_batch(map.fd().as_fd(), keys, key_bytes, values, value_bytes).map_err(
        |(done, io_error)| {
            (
                done,
                MapError::SyscallError(aya::sys::SyscallError {
                    call: "bpf_map_update_batch",
                    io_error,
                }),
            )
        },
    )
}

/// The bytes of plain-old-data values, as the kernel reads them.
fn pod_bytes<T: aya::Pod>(values: &[T]) -> &[u8] {
    // SAFETY: `aya::Pod` types are `Copy`, `repr(C)` and have no padding the
    // kernel could misread (every map type has explicit padding fields); the
    // slice covers exactly `values`.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

/// A per-CPU counter value: what it counts.
pub trait Counter: aya::Pod + Default {
    fn count(&self) -> u64;
}

impl Counter for u64 {
    fn count(&self) -> u64 {
        *self
    }
}

impl Counter for BackendStats {
    fn count(&self) -> u64 {
        self.connects
    }
}

/// A pinned per-CPU hash of counters.
pub struct PerCpuCounters<T: Counter> {
    map: PerCpuHashMap<MapData, u32, T>,
}

impl<T: Counter> std::fmt::Debug for PerCpuCounters<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PerCpuCounters").finish_non_exhaustive()
    }
}

impl<T: Counter> PerCpuCounters<T> {
    pub fn new(map: PerCpuHashMap<MapData, u32, T>) -> Self {
        Self { map }
    }
}

impl<T: Counter> CounterMap for PerCpuCounters<T> {
    fn remove(&mut self, id: u32) -> Result<(), MapError> {
        self.map.remove(&id)
    }

    fn ids(&self) -> Vec<u32> {
        self.map.keys().filter_map(Result::ok).collect()
    }

    fn total(&self, id: u32) -> Option<u64> {
        let values = self.map.get(&id, 0).ok()?;
        Some(values.iter().map(Counter::count).sum())
    }
}

/// In-memory maps with the kernel's capacity behaviour, for unit tests. Each
/// handle shares its contents with its clones, so a test can look inside maps
/// it handed to an applier, or hand the same maps to a second one (a restart).
#[cfg(test)]
pub mod fake {
    use std::{
        collections::BTreeMap,
        sync::{Arc, Mutex},
    };

    use super::*;

    #[derive(Debug)]
    pub struct State<K, V> {
        pub entries: BTreeMap<K, V>,
        pub capacity: usize,
        /// Inserts so far (a test counts rewrites with it).
        pub inserts: usize,
        /// Fail every insert once this many more have succeeded.
        pub fail_after: Option<usize>,
    }

    #[derive(Debug)]
    pub struct FakeMap<K, V>(pub Arc<Mutex<State<K, V>>>);

    impl<K, V> Clone for FakeMap<K, V> {
        fn clone(&self) -> Self {
            Self(self.0.clone())
        }
    }

    impl<K: Ord, V> FakeMap<K, V> {
        pub fn with_capacity(capacity: usize) -> Self {
            Self(Arc::new(Mutex::new(State {
                entries: BTreeMap::new(),
                capacity,
                inserts: 0,
                fail_after: None,
            })))
        }

        pub fn state(&self) -> std::sync::MutexGuard<'_, State<K, V>> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        }
    }

    fn errno(call: &'static str, code: i32) -> MapError {
        MapError::SyscallError(aya::sys::SyscallError {
            call,
            io_error: std::io::Error::from_raw_os_error(code),
        })
    }

    impl<K: Ord + Clone, V: Clone> KernelMap<K, V> for FakeMap<K, V> {
        fn get(&self, key: &K) -> Option<V> {
            self.state().entries.get(key).cloned()
        }

        fn insert(&mut self, key: K, value: V) -> Result<(), MapError> {
            let mut s = self.state();
            match &mut s.fail_after {
                Some(0) => return Err(errno("bpf_map_update_elem", libc::EIO)),
                Some(n) => *n -= 1,
                None => {}
            }
            if !s.entries.contains_key(&key) && s.entries.len() >= s.capacity {
                // What the kernel answers for a full hash map.
                return Err(errno("bpf_map_update_elem", libc::E2BIG));
            }
            s.inserts += 1;
            s.entries.insert(key, value);
            Ok(())
        }

        fn remove(&mut self, key: &K) -> Result<(), MapError> {
            self.state()
                .entries
                .remove(key)
                .map(drop)
                .ok_or(MapError::KeyNotFound)
        }

        fn keys(&self) -> Vec<K> {
            self.state().entries.keys().cloned().collect()
        }
    }

    impl CounterMap for FakeMap<u32, u64> {
        fn remove(&mut self, id: u32) -> Result<(), MapError> {
            KernelMap::remove(self, &id)
        }

        fn ids(&self) -> Vec<u32> {
            self.keys()
        }

        fn total(&self, id: u32) -> Option<u64> {
            self.get(&id)
        }
    }

    /// A set of fake maps, and the handles a test keeps to look inside.
    #[derive(Clone, Debug)]
    pub struct FakeMaps {
        pub services: FakeMap<ServiceKey, ServiceValue>,
        pub slots: FakeMap<SlotKey, Backend>,
        pub service_stats: FakeMap<u32, u64>,
        pub backend_stats: FakeMap<u32, u64>,
        pub redirect_excluded: FakeMap<EndpointKey, u32>,
        pub affinity_match: FakeMap<AffinityMatch, u32>,
        pub socket_policy: FakeMap<u32, SocketPolicy>,
    }

    impl FakeMaps {
        /// Room for `services` service ports and `slots` slots (and as many
        /// backends).
        pub fn new(services: usize, slots: usize) -> Self {
            Self::with_backends(services, slots, slots)
        }

        pub fn with_backends(services: usize, slots: usize, backends: usize) -> Self {
            Self {
                services: FakeMap::with_capacity(services),
                slots: FakeMap::with_capacity(slots),
                service_stats: FakeMap::with_capacity(services),
                backend_stats: FakeMap::with_capacity(backends),
                redirect_excluded: FakeMap::with_capacity(64),
                affinity_match: FakeMap::with_capacity(backends),
                socket_policy: FakeMap::with_capacity(services),
            }
        }

        pub fn maps(&self) -> Maps {
            let cap = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
            Maps {
                capacity: Capacity {
                    services: cap(self.services.state().capacity),
                    slots: cap(self.slots.state().capacity),
                    backends: cap(self.backend_stats.state().capacity),
                    redirect_excluded: cap(self.redirect_excluded.state().capacity),
                },
                services: Box::new(self.services.clone()),
                slots: Box::new(self.slots.clone()),
                service_stats: Box::new(self.service_stats.clone()),
                backend_stats: Box::new(self.backend_stats.clone()),
                redirect_excluded: Box::new(self.redirect_excluded.clone()),
                affinity_match: Box::new(self.affinity_match.clone()),
                socket_policy: Box::new(self.socket_policy.clone()),
            }
        }
    }
}
