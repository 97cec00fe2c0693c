//! `OUTLIER_V1`: the backends outlier detection watches, and the kernel's
//! counts of their connects' outcomes. The agent creates an entry (zeroed) for
//! each watched backend and deletes the others; sockops counts, per CPU.

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

/// The agent's handle on `OUTLIER_V1`.
pub struct Watched {
    map: PerCpuHashMap<MapData, EndpointKey, OutlierStats>,
    nr_cpus: usize,
}

impl std::fmt::Debug for Watched {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched").finish_non_exhaustive()
    }
}

impl Watched {
    pub fn open(pins: &PinDir) -> Result<Self, MapError> {
        let data = MapData::from_pin(pins.map(map_names::OUTLIER))?;
        let map = PerCpuHashMap::try_from(aya::maps::Map::PerCpuHashMap(data))?;
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, io_error)| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error,
            })
        })?;
        Ok(Self { map, nr_cpus })
    }

    /// Watches exactly `backends`: a new one gets a zeroed entry (one already
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
            let zero = match PerCpuValues::try_from(vec![OutlierStats::default(); self.nr_cpus]) {
                Ok(zero) => zero,
                Err(e) => {
                    failed.push((
                        *b,
                        MapError::SyscallError(aya::sys::SyscallError {
                            call: "per-cpu values",
                            io_error: e,
                        }),
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

    /// Every watched backend's counts.
    pub fn read(&self) -> BTreeMap<BackendAddr, Counts> {
        self.map
            .iter()
            .filter_map(Result::ok)
            .filter_map(|(k, per_cpu)| {
                let addr = endpoint_addr(&k)?;
                let counts = per_cpu.iter().fold(Counts::default(), |c, s| Counts {
                    failures: c.failures + s.failures,
                    successes: c.successes + s.successes,
                });
                Some((addr, counts))
            })
            .collect()
    }
}
