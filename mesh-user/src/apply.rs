//! apply: the only writer of the BPF maps. Diffs the desired tables against what
//! the kernel holds and writes the difference, one service at a time, atomically:
//! a new table is written under a new revision, then the service entry is flipped
//! to it, and the old revision is freed after a grace period. A connect in flight
//! sees the old table or the new one, never a mix.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use aya::maps::{MapError, PerCpuValues};
use mesh_common::{
    Backend, BackendStats, EndpointKey, FAMILY_NONE, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP,
    ServiceKey, ServiceValue, SlotKey,
};

use crate::{
    compile::{BackendAddr, Proto, ServiceAddr, ServicePlan},
    loader::Maps,
};

/// How long a replaced table stays readable: far longer than any connect takes
/// between reading the service entry and reading its slot.
pub const GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("service {service} ({addr}): writing the kernel maps failed: {source}")]
    Write {
        service: String,
        addr: ServiceAddr,
        source: MapError,
    },
    #[error("redirect exclusion of {endpoint}: writing the kernel map failed: {source}")]
    Exclusion {
        endpoint: BackendAddr,
        source: MapError,
    },
    #[error("service {service} ({addr}): out of {what} ids")]
    Exhausted {
        service: String,
        addr: ServiceAddr,
        what: &'static str,
    },
}

/// What one `apply` changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub written: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Services whose write failed: their previous table (if any) stays live.
    pub errors: Vec<String>,
}

/// What [`Applier::adopt`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Adopted {
    pub services: usize,
    pub backends: usize,
    pub stray_slots: usize,
}

#[derive(Debug)]
struct Live {
    service_id: u32,
    revision: u32,
    service: String,
    slots: Vec<Option<BackendAddr>>,
}

#[derive(Debug)]
struct Retired {
    service_id: u32,
    revision: u32,
    /// Slots written under this revision (all of them, or as far as a failed write got).
    slots: Vec<Option<BackendAddr>>,
    proto: Proto,
    since: Instant,
}

type BackendKey = (BackendAddr, Proto);

#[derive(Debug)]
pub struct Applier {
    maps: Maps,
    nr_cpus: usize,
    live: BTreeMap<ServiceAddr, Live>,
    retired: Vec<Retired>,
    service_ids: IdPool,
    backend_ids: BTreeMap<BackendKey, u32>,
    backend_pool: IdPool,
    /// What `REDIRECT_EXCLUDED_V1` holds.
    excluded: BTreeSet<BackendAddr>,
}

impl Applier {
    pub fn new(maps: Maps) -> Result<Self, std::io::Error> {
        let nr_cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        Ok(Self {
            maps,
            nr_cpus,
            live: BTreeMap::new(),
            retired: Vec::new(),
            service_ids: IdPool::new(mesh_common::MAX_SERVICES),
            backend_ids: BTreeMap::new(),
            backend_pool: IdPool::new(mesh_common::MAX_BACKENDS),
            excluded: BTreeSet::new(),
        })
    }

    /// Makes the kernel hold exactly `desired`. A service whose write fails keeps its
    /// previous table and is reported; the others are applied regardless.
    pub fn apply(&mut self, desired: &BTreeMap<ServiceAddr, ServicePlan>) -> Report {
        let mut report = Report::default();
        for (addr, plan) in desired {
            if let Some(live) = self.live.get_mut(addr)
                && live.slots == plan.slots
            {
                plan.service.clone_into(&mut live.service);
                report.unchanged += 1;
                continue;
            }
            match self.write_service(*addr, plan) {
                Ok(()) => report.written += 1,
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        let gone: Vec<ServiceAddr> = self
            .live
            .keys()
            .filter(|a| !desired.contains_key(a))
            .copied()
            .collect();
        for addr in gone {
            match self.remove_service(addr) {
                Ok(()) => report.removed += 1,
                Err(e) => report.errors.push(e.to_string()),
            }
        }
        self.collect_garbage();
        report
    }

    fn write_service(&mut self, addr: ServiceAddr, plan: &ServicePlan) -> Result<(), ApplyError> {
        let err = |source| ApplyError::Write {
            service: plan.service.clone(),
            addr,
            source,
        };
        let exhausted = |what| ApplyError::Exhausted {
            service: plan.service.clone(),
            addr,
            what,
        };
        let (service_id, revision) = match self.live.get(&addr) {
            Some(live) => (live.service_id, live.revision.wrapping_add(1)),
            None => {
                let id = self
                    .service_ids
                    .take()
                    .ok_or_else(|| exhausted("service"))?;
                // A reused id starts counting from zero.
                let zero = PerCpuValues::try_from(vec![0u64; self.nr_cpus]);
                if let Ok(zero) = zero {
                    let _ = self.maps.service_stats.insert(id, zero, 0);
                }
                (id, 1)
            }
        };
        let mut written = 0u32;
        let result = (|| {
            for (slot, target) in plan.slots.iter().enumerate() {
                let backend = match target {
                    Some(b) => {
                        let id = self
                            .backend_id(*b, addr.proto)
                            .ok_or_else(|| exhausted("backend"))?;
                        backend_value(*b, id)
                    }
                    None => Backend {
                        family: FAMILY_NONE,
                        ..bytemuck::Zeroable::zeroed()
                    },
                };
                let key = SlotKey {
                    service_id,
                    revision,
                    slot: slot as u32,
                };
                self.maps.slots.insert(key, backend, 0).map_err(err)?;
                written += 1;
            }
            // The flip: from here on new connects draw from the new revision.
            let value = ServiceValue {
                service_id,
                revision,
                slot_count: plan.slots.len() as u32,
                flags: 0,
            };
            self.maps
                .services
                .insert(service_key(addr), value, 0)
                .map_err(err)
        })();
        if let Err(e) = result {
            // Free the partial table at the next collection (nothing reads it: the
            // entry was not flipped); the live one, if any, is untouched. A new
            // service's id goes back to the pool then.
            self.retired.push(Retired {
                service_id,
                revision,
                slots: plan.slots[..written as usize].to_vec(),
                proto: addr.proto,
                since: Instant::now()
                    .checked_sub(GRACE)
                    .unwrap_or_else(Instant::now),
            });
            return Err(e);
        }
        let previous = self.live.insert(
            addr,
            Live {
                service_id,
                revision,
                service: plan.service.clone(),
                slots: plan.slots.clone(),
            },
        );
        if let Some(old) = previous {
            self.retired.push(Retired {
                service_id,
                revision: old.revision,
                slots: old.slots,
                proto: addr.proto,
                since: Instant::now(),
            });
        }
        Ok(())
    }

    fn remove_service(&mut self, addr: ServiceAddr) -> Result<(), ApplyError> {
        let Some(live) = self.live.get(&addr) else {
            return Ok(());
        };
        match self.maps.services.remove(&service_key(addr)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(ApplyError::Write {
                    service: live.service.clone(),
                    addr,
                    source,
                });
            }
        }
        if let Some(live) = self.live.remove(&addr) {
            self.retired.push(Retired {
                service_id: live.service_id,
                revision: live.revision,
                slots: live.slots,
                proto: addr.proto,
                since: Instant::now(),
            });
            // The id is reused only once its last table is freed (see collect_garbage).
        }
        Ok(())
    }

    /// Frees tables retired more than [`GRACE`] ago, then the service and backend
    /// ids that no live or waiting table refers to any more. Call it now and then
    /// (the agent does each second).
    pub fn collect_garbage(&mut self) {
        let now = Instant::now();
        let (due, keep): (Vec<Retired>, Vec<Retired>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|r| now.duration_since(r.since) >= GRACE);
        self.retired = keep;
        if due.is_empty() {
            return;
        }
        for r in &due {
            for slot in 0..r.slots.len() as u32 {
                let _ = self.maps.slots.remove(&SlotKey {
                    service_id: r.service_id,
                    revision: r.revision,
                    slot,
                });
            }
        }
        // Ids go back only after every due table is freed, once each, and only if
        // nothing live or still waiting uses them.
        let due_ids: BTreeSet<u32> = due.iter().map(|r| r.service_id).collect();
        for id in due_ids {
            let in_use = self.live.values().any(|l| l.service_id == id)
                || self.retired.iter().any(|r| r.service_id == id);
            if !in_use {
                self.service_ids.give(id);
            }
        }
        let used: BTreeSet<BackendKey> = self
            .live
            .iter()
            .flat_map(|(addr, l)| l.slots.iter().flatten().map(move |b| (*b, addr.proto)))
            .chain(
                self.retired
                    .iter()
                    .flat_map(|r| r.slots.iter().flatten().map(move |b| (*b, r.proto))),
            )
            .collect();
        let stale: Vec<BackendKey> = self
            .backend_ids
            .keys()
            .filter(|k| !used.contains(k))
            .copied()
            .collect();
        for k in stale {
            if let Some(id) = self.backend_ids.remove(&k) {
                let _ = self.maps.backend_stats.remove(&id);
                self.backend_pool.give(id);
            }
        }
    }

    /// Whether replaced tables are still waiting for their grace period.
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Takes over what a previous agent left in the pinned maps: every service's
    /// live table (so an unchanged service is not rewritten: no gap, no flip), the
    /// ids it used, the per-backend counters, the redirect exclusions. Tables and
    /// counters nothing points to (an agent killed mid-update) are freed.
    pub fn adopt(&mut self) -> Adopted {
        let mut adopted = Adopted::default();
        let services: Vec<(ServiceKey, ServiceValue)> =
            self.maps.services.iter().filter_map(Result::ok).collect();
        for (key, value) in services {
            let Some(addr) = service_addr(&key) else {
                let _ = self.maps.services.remove(&key);
                continue;
            };
            let mut slots = Vec::with_capacity(value.slot_count as usize);
            for slot in 0..value.slot_count {
                let key = SlotKey {
                    service_id: value.service_id,
                    revision: value.revision,
                    slot,
                };
                let backend = self.maps.slots.get(&key, 0).ok();
                let target = backend.and_then(|b| {
                    let ip = ip_from_words(b.addr, b.family)?;
                    let target = BackendAddr {
                        ip,
                        port: u16::from_be(b.port),
                    };
                    self.backend_ids.insert((target, addr.proto), b.backend_id);
                    self.backend_pool.reserve(b.backend_id);
                    Some(target)
                });
                slots.push(target);
            }
            self.service_ids.reserve(value.service_id);
            self.live.insert(
                addr,
                Live {
                    service_id: value.service_id,
                    revision: value.revision,
                    service: "(adopted)".to_owned(),
                    slots,
                },
            );
            adopted.services += 1;
        }
        let live: BTreeSet<(u32, u32)> = self
            .live
            .values()
            .map(|l| (l.service_id, l.revision))
            .collect();
        // Tables no live entry points to: a revision written but not flipped to by
        // an agent that died, one retired but not yet freed, or the tables of a
        // service map just replaced (another layout), which the old programs
        // still read until they are swapped out. Freed after the grace period,
        // like any retired table, their ids held until then.
        let mut stray: BTreeMap<(u32, u32), u32> = BTreeMap::new();
        for k in self.maps.slots.keys().filter_map(Result::ok) {
            if !live.contains(&(k.service_id, k.revision)) {
                let len = stray.entry((k.service_id, k.revision)).or_default();
                *len = (*len).max(k.slot + 1);
                adopted.stray_slots += 1;
            }
        }
        for ((service_id, revision), len) in stray {
            self.service_ids.reserve(service_id);
            self.retired.push(Retired {
                service_id,
                revision,
                slots: vec![None; len as usize],
                proto: Proto::Tcp,
                since: Instant::now(),
            });
        }
        let used: BTreeSet<u32> = self.backend_ids.values().copied().collect();
        for id in self
            .maps
            .backend_stats
            .keys()
            .filter_map(Result::ok)
            .collect::<Vec<_>>()
        {
            if !used.contains(&id) {
                let _ = self.maps.backend_stats.remove(&id);
            }
        }
        let service_ids: BTreeSet<u32> = self.live.values().map(|l| l.service_id).collect();
        for id in self
            .maps
            .service_stats
            .keys()
            .filter_map(Result::ok)
            .collect::<Vec<_>>()
        {
            if !service_ids.contains(&id) {
                let _ = self.maps.service_stats.remove(&id);
            }
        }
        adopted.backends = self.backend_ids.len();
        self.excluded = self
            .maps
            .redirect_excluded
            .keys()
            .filter_map(Result::ok)
            .filter_map(|k| {
                Some(BackendAddr {
                    ip: ip_from_words(k.addr, k.family)?,
                    port: u16::from_be(k.port),
                })
            })
            .collect();
        adopted
    }

    fn backend_id(&mut self, backend: BackendAddr, proto: Proto) -> Option<u32> {
        if let Some(id) = self.backend_ids.get(&(backend, proto)) {
            return Some(*id);
        }
        let id = self.backend_pool.take()?;
        let zero = PerCpuValues::try_from(vec![BackendStats::default(); self.nr_cpus]);
        if zero
            .map(|zero| self.maps.backend_stats.insert(id, zero, 0))
            .is_ok_and(|r| r.is_ok())
        {
            self.backend_ids.insert((backend, proto), id);
            return Some(id);
        }
        self.backend_pool.give(id);
        None
    }

    /// Connects the kernel has sent to each backend since it got its id, summed over
    /// CPUs.
    pub fn backend_connects(&self) -> BTreeMap<(BackendAddr, Proto), u64> {
        self.backend_ids
            .iter()
            .filter_map(|(k, id)| {
                let values = self.maps.backend_stats.get(id, 0).ok()?;
                Some((*k, values.iter().map(|v| v.connects).sum()))
            })
            .collect()
    }

    /// The global per-CPU counters summed (index: `mesh_common::global_stat`).
    pub fn global_stats(&self) -> Vec<u64> {
        (0..mesh_common::global_stat::COUNT)
            .map(|i| {
                self.maps
                    .global_stats
                    .get(&i, 0)
                    .map(|v| v.iter().sum())
                    .unwrap_or(0)
            })
            .collect()
    }

    /// Makes the kernel's redirect exclusions exactly `desired`; a failed write is
    /// reported and tried again on the next call.
    pub fn apply_excluded(&mut self, desired: &BTreeSet<BackendAddr>) -> Vec<ApplyError> {
        let mut errors = Vec::new();
        let add: Vec<BackendAddr> = desired.difference(&self.excluded).copied().collect();
        let remove: Vec<BackendAddr> = self.excluded.difference(desired).copied().collect();
        for endpoint in add {
            match self
                .maps
                .redirect_excluded
                .insert(endpoint_key(endpoint), 0, 0)
            {
                Ok(()) => {
                    self.excluded.insert(endpoint);
                }
                Err(source) => errors.push(ApplyError::Exclusion { endpoint, source }),
            }
        }
        for endpoint in remove {
            match self.maps.redirect_excluded.remove(&endpoint_key(endpoint)) {
                Ok(()) | Err(MapError::KeyNotFound) => {
                    self.excluded.remove(&endpoint);
                }
                Err(source) => errors.push(ApplyError::Exclusion { endpoint, source }),
            }
        }
        errors
    }

    /// Labels of the kernel's counters and the occupancy of the maps we write.
    pub fn view(&self) -> crate::counters::View {
        use mesh_common::{self as c, map_names as m};
        let slots: usize = self.live.values().map(|l| l.slots.len()).sum::<usize>()
            + self.retired.iter().map(|r| r.slots.len()).sum::<usize>();
        let service_ids: BTreeSet<u32> = self
            .live
            .values()
            .map(|l| l.service_id)
            .chain(self.retired.iter().map(|r| r.service_id))
            .collect();
        crate::counters::View {
            services: self
                .live
                .iter()
                .map(|(addr, l)| (l.service_id, l.service.clone(), addr.to_string()))
                .collect(),
            backends: self
                .backend_ids
                .iter()
                .map(|((b, proto), id)| (*id, b.to_string(), proto.to_string()))
                .collect(),
            occupancy: vec![
                (
                    m::SERVICES,
                    self.live.len() as u64,
                    u64::from(c::MAX_SERVICES),
                ),
                (m::SLOTS, slots as u64, u64::from(c::MAX_SLOTS)),
                (
                    m::BACKEND_STATS,
                    self.backend_ids.len() as u64,
                    u64::from(c::MAX_BACKENDS),
                ),
                (
                    m::SERVICE_STATS,
                    service_ids.len() as u64,
                    u64::from(c::MAX_SERVICES),
                ),
                (
                    m::REDIRECT_EXCLUDED,
                    self.excluded.len() as u64,
                    u64::from(c::MAX_REDIRECT_EXCLUDED),
                ),
            ],
        }
    }

    /// Service ports the kernel holds now.
    pub fn live_services(&self) -> usize {
        self.live.len()
    }
}

/// Conversions at the boundary: network byte order, as the kernel reads them.
pub fn service_key(addr: ServiceAddr) -> ServiceKey {
    let (words, family) = ip_words(addr.vip);
    ServiceKey {
        addr: words,
        port: addr.port.to_be(),
        proto: match addr.proto {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        },
        family,
    }
}

fn endpoint_key(endpoint: BackendAddr) -> EndpointKey {
    let (addr, family) = ip_words(endpoint.ip);
    EndpointKey {
        addr,
        port: endpoint.port.to_be(),
        family,
        _pad: 0,
    }
}

fn backend_value(b: BackendAddr, backend_id: u32) -> Backend {
    let (addr, family) = ip_words(b.ip);
    Backend {
        addr,
        port: b.port.to_be(),
        family,
        _pad: 0,
        backend_id,
    }
}

/// The inverse of [`service_key`]; `None` for a key we would never write.
pub fn service_addr(key: &ServiceKey) -> Option<ServiceAddr> {
    Some(ServiceAddr {
        vip: ip_from_words(key.addr, key.family)?,
        port: u16::from_be(key.port),
        proto: match key.proto {
            PROTO_TCP => Proto::Tcp,
            PROTO_UDP => Proto::Udp,
            _ => return None,
        },
    })
}

/// The inverse of [`ip_words`]; `None` for another family (a "no backend" slot).
pub fn ip_from_words(words: [u32; 4], family: u8) -> Option<IpAddr> {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match family {
        FAMILY_V4 => Some(IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])),
        FAMILY_V6 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

/// An address as the kernel's `__u32` words hold it (bytes in network order).
fn ip_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], FAMILY_V4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], FAMILY_V6)
        }
    }
}

/// Small ids, reused after release.
#[derive(Debug)]
struct IdPool {
    next: u32,
    max: u32,
    free: BTreeSet<u32>,
}

impl IdPool {
    fn new(max: u32) -> Self {
        Self {
            next: 0,
            max,
            free: BTreeSet::new(),
        }
    }

    fn take(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next < self.max).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// Marks `id` as taken (adopted from a previous agent).
    fn reserve(&mut self, id: u32) {
        if id >= self.max {
            return;
        }
        while self.next <= id {
            self.free.insert(self.next);
            self.next += 1;
        }
        self.free.remove(&id);
    }

    /// Returns an id; giving one twice is harmless (it is handed out once).
    fn give(&mut self, id: u32) {
        if id < self.next {
            self.free.insert(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    #[test]
    fn keys_are_in_network_byte_order() {
        let key = service_key(ServiceAddr {
            vip: IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1)),
            port: 80,
            proto: Proto::Tcp,
        });
        assert_eq!(bytemuck::bytes_of(&key.addr[0]), &[10, 96, 0, 1]);
        assert_eq!(bytemuck::bytes_of(&key.port), &[0, 80]);
        assert_eq!((key.proto, key.family), (PROTO_TCP, FAMILY_V4));
        let v6: Ipv6Addr = "fd00::1:2".parse().unwrap_or(Ipv6Addr::LOCALHOST);
        let key = service_key(ServiceAddr {
            vip: IpAddr::V6(v6),
            port: 443,
            proto: Proto::Udp,
        });
        assert_eq!(bytemuck::bytes_of(&key.addr), &v6.octets());
        assert_eq!(key.family, FAMILY_V6);
    }

    #[test]
    fn adopted_ids_are_never_handed_out_again() {
        let mut pool = IdPool::new(10);
        pool.reserve(3);
        pool.reserve(1);
        let taken: Vec<u32> = std::iter::from_fn(|| pool.take()).collect();
        assert_eq!(taken, [0, 2, 4, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn keys_decode_back() {
        for (vip, proto) in [("10.96.0.1", Proto::Tcp), ("fd00::1:2", Proto::Udp)] {
            let addr = ServiceAddr {
                vip: vip.parse().unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
                port: 8080,
                proto,
            };
            assert_eq!(service_addr(&service_key(addr)), Some(addr));
        }
    }

    #[test]
    fn ids_are_reused() {
        let mut pool = IdPool::new(2);
        assert_eq!(
            (pool.take(), pool.take(), pool.take()),
            (Some(0), Some(1), None)
        );
        pool.give(0);
        pool.give(0);
        assert_eq!((pool.take(), pool.take()), (Some(0), None));
    }
}
