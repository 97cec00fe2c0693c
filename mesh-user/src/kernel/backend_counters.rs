//! Per-backend kernel counters the agent creates and deletes and sockops
//! writes, per CPU: `OUTLIER_V1` (outlier detection: connects' outcomes) and
//! `ACTIVE_V1` (LEAST_REQUEST: open connections). The agent creates an entry
//! (zeroed) for each backend it wants counted and deletes the others.

use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{MapData, MapError, PerCpuHashMap, PerCpuValues};
use mesh_common::{EndpointKey, OutlierStats, map_names};

use super::{
    codec::{endpoint_addr, endpoint_key},
    pin::PinDir,
};
use crate::compile::BackendAddr;

/// A backend's connects as the kernel counted them, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub failures: u64,
    pub successes: u64,
}

impl Counts {
    /// These counts plus one CPU's. Wrapping: a CPU's `successes` may have
    /// wrapped below zero (a connect's success counted on one CPU, taken back
    /// on another when the connect was reset before data); the sum is right.
    pub fn plus_cpu(self, cpu: &OutlierStats) -> Self {
        Self {
            failures: self.failures.wrapping_add(cpu.failures),
            successes: self.successes.wrapping_add(cpu.successes),
        }
    }
}

/// One of the per-backend counter maps.
pub struct BackendCounters<V: aya::Pod + Default> {
    map: PerCpuHashMap<MapData, EndpointKey, V>,
    nr_cpus: usize,
}

/// `OUTLIER_V1`.
pub type Watched = BackendCounters<OutlierStats>;
/// `ACTIVE_V1`.
pub type Active = BackendCounters<i64>;

impl<V: aya::Pod + Default> std::fmt::Debug for BackendCounters<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendCounters").finish_non_exhaustive()
    }
}

impl<V: aya::Pod + Default> BackendCounters<V> {
    fn open_named(pins: &PinDir, name: &'static str) -> Result<Self, MapError> {
        let data = MapData::from_pin(pins.map(name))?;
        let map = PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, io_error)| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error,
            })
        })?;
        Ok(Self { map, nr_cpus })
    }

    /// Counts exactly `backends`: a new one gets a zeroed entry (one already
    /// there keeps its counts), the others are deleted. Returns the failures.
    pub fn sync(&mut self, backends: &BTreeSet<BackendAddr>) -> Vec<(BackendAddr, MapError)> {
        let mut failed = Vec::new();
        let present: BTreeSet<BackendAddr> = self
            .map
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| endpoint_addr(&k))
            .collect();
        for b in backends.difference(&present) {
            let zero = match PerCpuValues::try_from(vec![V::default(); self.nr_cpus]) {
                Ok(zero) => zero,
                Err(io_error) => {
                    let call = "per-cpu values";
                    failed.push((
                        *b,
                        MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
                    ));
                    continue;
                }
            };
            // BPF_NOEXIST: never zero a count sockops already made.
            match self.map.insert(endpoint_key(*b), zero, 1) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => failed.push((*b, e)),
            }
        }
        for b in present.difference(backends) {
            match self.map.remove(&endpoint_key(*b)) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => failed.push((*b, e)),
            }
        }
        failed
    }

    /// Every counted backend's value, folded over CPUs.
    fn fold<T>(&self, init: T, f: impl Fn(T, &V) -> T + Copy) -> BTreeMap<BackendAddr, T>
    where
        T: Copy,
    {
        self.map
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, per_cpu)| Some((endpoint_addr(&k)?, per_cpu.iter().fold(init, f))))
            .collect()
    }
}

impl Watched {
    pub fn open(pins: &PinDir) -> Result<Self, MapError> {
        Self::open_named(pins, map_names::OUTLIER)
    }

    /// Every watched backend's counts.
    pub fn read(&self) -> BTreeMap<BackendAddr, Counts> {
        self.fold(Counts::default(), Counts::plus_cpu)
    }
}

impl Active {
    pub fn open(pins: &PinDir) -> Result<Self, MapError> {
        Self::open_named(pins, map_names::ACTIVE)
    }
}
