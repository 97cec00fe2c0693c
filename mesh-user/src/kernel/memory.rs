//! What the pinned BPF maps cost the kernel, as the kernel accounts it: the
//! `memlock` line of a map descriptor's fdinfo, which since Linux 6.5 is the
//! map type's own count of its memory (`map_mem_usage`: a hash map's buckets
//! for its whole capacity, its elements present (or all of them, when
//! preallocated), and per-CPU values once per possible CPU).

use std::os::fd::{AsFd as _, AsRawFd as _};

use mesh_common::map_names as m;
use serde::Serialize;

use super::pin::PinDir;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("pinned map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("reading the fdinfo of map {name}: {source}")]
    FdInfo {
        name: &'static str,
        source: std::io::Error,
    },
    #[error("the fdinfo of map {name} has no memlock line")]
    NoMemlock { name: &'static str },
}

/// What a map's size follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scale {
    /// Service ports: their entries, counters, socket options.
    Services,
    /// Backends: slots (one or more per backend) and per-backend counters.
    Endpoints,
    /// Neither: preallocated LRUs, per-socket and gateway maps, arrays, and
    /// every hash map's buckets (paid for its capacity, empty or not).
    Other,
}

/// Which of [`Scale`] a map's entries follow.
pub fn scale(map: &str) -> Scale {
    match map {
        m::SERVICES | m::SERVICE_STATS | m::SOCKET_POLICY => Scale::Services,
        m::SLOTS | m::BACKEND_STATS | m::AFFINITY_MATCH | m::OUTLIER | m::ACTIVE => {
            Scale::Endpoints
        }
        _ => Scale::Other,
    }
}

/// One map's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MapMemory {
    pub map: &'static str,
    pub bytes: u64,
}

/// Every pinned map's memory, in bytes (a map not pinned is left out).
pub fn pinned(pins: &PinDir) -> Vec<Result<MapMemory, MemoryError>> {
    m::ALL
        .iter()
        .filter(|name| pins.map(name).exists())
        .map(|&name| map_bytes(pins, name).map(|bytes| MapMemory { map: name, bytes }))
        .collect()
}

/// The kernel's account of one pinned map's memory.
pub fn map_bytes(pins: &PinDir, name: &'static str) -> Result<u64, MemoryError> {
    let info = aya::maps::MapInfo::from_pin(pins.map(name))
        .map_err(|source| MemoryError::Map { name, source })?;
    info_bytes(name, &info)
}

/// The kernel's account of the memory of the map `info` describes.
pub fn info_bytes(name: &'static str, info: &aya::maps::MapInfo) -> Result<u64, MemoryError> {
    let fd = info
        .fd()
        .map_err(|source| MemoryError::Map { name, source })?;
    let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
    let text =
        std::fs::read_to_string(path).map_err(|source| MemoryError::FdInfo { name, source })?;
    parse_memlock(&text).ok_or(MemoryError::NoMemlock { name })
}

/// The `memlock:` value of a map's fdinfo (bytes).
pub fn parse_memlock(fdinfo: &str) -> Option<u64> {
    fdinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "memlock")
            .then(|| value.trim().parse().ok())
            .flatten()
    })
}

/// The maps' memory in total and split by what it follows, and the share of
/// one service port and one backend at the current occupancy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub total_bytes: u64,
    /// Maps whose entries follow service ports ([`Scale::Services`]).
    pub services_bytes: u64,
    /// Maps whose entries follow backends ([`Scale::Endpoints`]).
    pub endpoints_bytes: u64,
    pub other_bytes: u64,
    /// `services_bytes` per service port; `None` without service ports.
    pub per_service: Option<u64>,
    /// `endpoints_bytes` per backend; `None` without backends.
    pub per_endpoint: Option<u64>,
}

/// Sums `maps` by [`scale`] and divides by the service ports and backends the
/// kernel holds. A hash map's buckets (its capacity) are in its bytes, so the
/// shares fall as occupancy grows.
pub fn summarize(maps: &[MapMemory], services: usize, endpoints: usize) -> Summary {
    let mut s = Summary::default();
    for map in maps {
        s.total_bytes += map.bytes;
        match scale(map.map) {
            Scale::Services => s.services_bytes += map.bytes,
            Scale::Endpoints => s.endpoints_bytes += map.bytes,
            Scale::Other => s.other_bytes += map.bytes,
        }
    }
    let share = |bytes: u64, n: usize| (n > 0).then(|| bytes / n as u64);
    s.per_service = share(s.services_bytes, services);
    s.per_endpoint = share(s.endpoints_bytes, endpoints);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memlock_is_read_from_a_maps_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t2061\n\
                      map_type:\t5\nkey_size:\t4\nvalue_size:\t8\nmax_entries:\t262144\n\
                      map_flags:\t0x1\nmap_extra:\t0x0\nmemlock:\t4329472\nmap_id:\t42\n";
        assert_eq!(parse_memlock(fdinfo), Some(4_329_472));
        assert_eq!(parse_memlock("pos:\t0\nmap_id:\t42\n"), None);
        assert_eq!(parse_memlock("memlock:\tlots\n"), None);
    }

    #[test]
    fn memory_is_split_by_what_it_follows_and_shared_out() {
        let maps = [
            MapMemory {
                map: m::SERVICES,
                bytes: 1000,
            },
            MapMemory {
                map: m::SERVICE_STATS,
                bytes: 500,
            },
            MapMemory {
                map: m::SLOTS,
                bytes: 9000,
            },
            MapMemory {
                map: m::BACKEND_STATS,
                bytes: 3000,
            },
            MapMemory {
                map: m::REVNAT,
                bytes: 7,
            },
        ];
        let s = summarize(&maps, 10, 40);
        assert_eq!(
            s,
            Summary {
                total_bytes: 13_507,
                services_bytes: 1500,
                endpoints_bytes: 12_000,
                other_bytes: 7,
                per_service: Some(150),
                per_endpoint: Some(300),
            }
        );
        let empty = summarize(&maps, 0, 0);
        assert_eq!((empty.per_service, empty.per_endpoint), (None, None));
    }
}
