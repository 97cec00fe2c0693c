//! apply: the only writer of the BPF maps. Diffs the desired tables against what
//! the kernel holds and writes the difference, one service at a time, atomically:
//! a new table is written under a new revision, then the service entry is flipped
//! to it, and the old revision is freed after a grace period. A connect in flight
//! sees the old table or the new one, never a mix.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::{Duration, Instant},
};

use aya::maps::MapError;
use mesh_common::{AffinityMatch, Backend, FAMILY_NONE, ServiceValue, SlotKey, SocketPolicy};
use tracing::warn;

mod ids;
#[cfg(test)]
mod tests;

use ids::{IdPool, Taken};

use super::{
    codec::{
        backend_addr, backend_value, destination_slot, endpoint_addr, endpoint_key, service_addr,
        service_key, slot_destination,
    },
    counters::{BackendIds, Occupancy, ServiceLabel, View},
    maps::{CounterMap, Maps},
};
use crate::{
    compile::{BackendAddr, Proto, ServiceAddr, ServicePlan},
    model::NamespacedName,
};

/// How long a replaced table stays readable: far longer than any connect takes
/// between reading the service entry and reading its slot.
pub const GRACE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("service {service} ({addr}): writing the kernel maps failed: {source}")]
    Write {
        service: NamespacedName,
        addr: ServiceAddr,
        source: Box<MapError>,
    },
    #[error(
        "service {service} ({addr}): session affinity to {backend}: writing the kernel map failed: {source}"
    )]
    Affinity {
        service: NamespacedName,
        addr: ServiceAddr,
        backend: BackendAddr,
        source: Box<MapError>,
    },
    #[error("redirect exclusion of {endpoint}: writing the kernel map failed: {source}")]
    Exclusion {
        endpoint: BackendAddr,
        source: Box<MapError>,
    },
    #[error(
        "service {service} ({addr}): its table of {need} slots does not fit ({free} of {capacity} free in {map}); {keeping}"
    )]
    SlotsFull {
        service: NamespacedName,
        addr: ServiceAddr,
        need: usize,
        free: usize,
        capacity: usize,
        map: &'static str,
        keeping: Keeping,
    },
    #[error(
        "service {service} ({addr}): {need} new backends do not fit ({free} of {capacity} backend counters free in {map}); {keeping}"
    )]
    BackendsFull {
        service: NamespacedName,
        addr: ServiceAddr,
        need: usize,
        free: usize,
        capacity: usize,
        map: &'static str,
        keeping: Keeping,
    },
    #[error(
        "service {service} ({addr}): {map} is full ({capacity} service ports); connects to it are not routed by the mesh"
    )]
    ServicesFull {
        service: NamespacedName,
        addr: ServiceAddr,
        capacity: usize,
        map: &'static str,
    },
}

/// What the kernel holds for a service whose new table was not written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keeping {
    /// Its previous table routes on.
    Previous,
    /// A new service: its connects are refused (`EHOSTUNREACH`) until it fits.
    Refused,
}

impl std::fmt::Display for Keeping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Keeping::Previous => "its previous table stays in effect",
            Keeping::Refused => "its connects are refused until it fits",
        })
    }
}

impl ApplyError {
    /// A short, stable reason for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            ApplyError::Write { .. }
            | ApplyError::Exclusion { .. }
            | ApplyError::Affinity { .. } => "map_write",
            ApplyError::SlotsFull { .. } => "slots_full",
            ApplyError::BackendsFull { .. } => "backends_full",
            ApplyError::ServicesFull { .. } => "services_full",
        }
    }
}

/// Tables the kernel held at start that an apply keeps although the desired
/// state differs, because the source cannot say yet what is meant: an
/// unavailable or broken source is not an empty one.
#[derive(Clone, Copy, Debug)]
pub struct Hold<'a> {
    /// Keep these service ports' adopted tables (their routing is undecided).
    pub undecided: &'a BTreeSet<ServiceAddr>,
    /// Keep adopted tables of service ports absent from the desired state (the
    /// source reports objects it cannot read, or holds nothing at all).
    pub absent: bool,
}

impl Hold<'_> {
    /// Nothing held.
    pub const NONE: Hold<'static> = Hold {
        undecided: &BTreeSet::new(),
        absent: false,
    };
}

/// What one `apply` changed.
#[derive(Debug, Default)]
pub struct Report {
    pub written: usize,
    pub removed: usize,
    pub unchanged: usize,
    /// Tables held from the start although the desired state differs ([`Hold`]).
    pub held: usize,
    /// Services whose write failed: their previous table (if any) stays live.
    pub errors: Vec<ApplyError>,
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
    /// Found in the kernel at start, not written by this agent yet.
    adopted: bool,
    /// `None` for a table adopted from a previous agent, until it is applied again.
    service: Option<NamespacedName>,
    /// The plan's, shared.
    slots: Arc<[Option<BackendAddr>]>,
    /// A table that picks a destination: its slots ([`ServicePlan::to_destinations`]).
    to_destinations: Vec<u8>,
    /// `ServiceValue::flags` as written.
    flags: u32,
}

impl Live {
    /// Slots the table takes.
    fn len(&self) -> usize {
        self.slots.len().max(self.to_destinations.len())
    }

    /// Its slots as a retired table frees them (a destination-picking table
    /// names no backend).
    fn into_retired_slots(self) -> Arc<[Option<BackendAddr>]> {
        let len = self.len();
        if self.slots.len() == len {
            return self.slots;
        }
        let mut slots = self.slots.to_vec();
        slots.resize(len, None);
        slots.into()
    }
}

#[derive(Debug)]
struct Retired {
    service_id: u32,
    revision: u32,
    /// Slots written under this revision (all of them, or as far as a failed write got).
    slots: Arc<[Option<BackendAddr>]>,
    proto: Proto,
    since: Instant,
}

type BackendKey = (BackendAddr, Proto);

/// A backend's counter id, and how many slots name it ([`Applier::backends`]).
#[derive(Clone, Copy, Debug)]
struct BackendUse {
    id: u32,
    refs: u32,
}

/// The view's entries that may differ from the applier's state.
#[derive(Debug, Default)]
struct ViewDirty {
    services: BTreeSet<ServiceAddr>,
    /// Backend counter ids given out (`Some`) or back (`None`), in order: the
    /// last word for an id is the one that holds. A list, not a map: at a
    /// start every backend is here (a map by id took ~60 bytes per backend).
    backends: Vec<(u32, Option<BackendKey>)>,
}

#[derive(Debug)]
pub struct Applier {
    maps: Maps,
    /// Slots the slot map holds now: live tables, and tables waiting to be freed.
    slots_used: usize,
    live: BTreeMap<ServiceAddr, Live>,
    retired: Vec<Retired>,
    service_ids: IdPool,
    /// Each backend's counter id, and how many slots of live and waiting
    /// tables name it: the id goes back when the last table naming it is
    /// freed, so a collection costs what it frees, not what lives.
    backends: HashMap<BackendKey, BackendUse>,
    backend_pool: IdPool,
    /// Backends no table may name any more (their last table freed, or a
    /// write that failed before their slots): their ids go back at the next
    /// collection if nothing names them by then.
    unnamed: Vec<BackendKey>,
    /// The service ids of the live tables.
    live_ids: BTreeSet<u32>,
    /// What changed since the last [`Applier::refresh_view`].
    view_dirty: ViewDirty,
    /// What `REDIRECT_EXCLUDED_V1` holds.
    excluded: BTreeSet<BackendAddr>,
    /// What `AFFINITY_MATCH_V1` holds: members of services with session
    /// affinity, and their timeouts.
    affinity: BTreeMap<AffinityMatch, u32>,
    /// What `SOCKET_POLICY_V1` holds: service id -> its clients' options.
    socket_policies: BTreeMap<u32, SocketPolicy>,
}

impl Applier {
    pub fn new(maps: Maps) -> Self {
        let capacity = maps.capacity;
        Self {
            maps,
            slots_used: 0,
            live: BTreeMap::new(),
            retired: Vec::new(),
            service_ids: IdPool::new(capacity.services),
            backends: HashMap::new(),
            backend_pool: IdPool::new(capacity.backends),
            unnamed: Vec::new(),
            live_ids: BTreeSet::new(),
            view_dirty: ViewDirty::default(),
            excluded: BTreeSet::new(),
            affinity: BTreeMap::new(),
            socket_policies: BTreeMap::new(),
        }
    }

    /// Makes the kernel hold exactly `desired`, looking only at the tables
    /// `only` names when it names some (what changed since the last call;
    /// the others are as they were). A service whose write fails keeps its
    /// previous table and is reported; the others are applied regardless.
    /// `now` starts the grace period of the tables replaced.
    pub fn apply(
        &mut self,
        desired: &BTreeMap<ServiceAddr, ServicePlan>,
        only: Option<&BTreeSet<ServiceAddr>>,
        hold: Hold<'_>,
        now: Instant,
    ) -> Report {
        let mut report = Report::default();
        let looked_at: Vec<(&ServiceAddr, &ServicePlan)> = match only {
            Some(only) => only
                .iter()
                .filter_map(|a| desired.get_key_value(a))
                .collect(),
            None => desired.iter().collect(),
        };
        // Affinity members and socket policies are synced whole: only when a
        // table that has (or had) them is looked at.
        let had =
            |a: &ServiceAddr, flag: u32| self.live.get(a).is_some_and(|l| l.flags & flag != 0);
        let (affinity, socket) = match only {
            None => (true, true),
            Some(only) => (
                only.iter().any(|a| {
                    had(a, mesh_common::SERVICE_FLAG_AFFINITY)
                        || desired
                            .get(a)
                            .is_some_and(|p| p.affinity_timeout_s.is_some())
                }),
                only.iter().any(|a| {
                    self.live
                        .get(a)
                        .is_some_and(|l| self.socket_policies.contains_key(&l.service_id))
                        || desired.get(a).is_some_and(|p| p.socket.is_some())
                }),
            ),
        };
        // Destinations' tables first: a port's table that picks them is
        // flipped only once they are in place.
        let (destinations, ports): (Vec<_>, Vec<_>) = looked_at
            .into_iter()
            .partition(|(a, _)| a.destination.is_some());
        for (addr, plan) in destinations.into_iter().chain(ports) {
            if let Some(live) = self.live.get_mut(addr) {
                if live.service.as_ref() != Some(&plan.service) {
                    self.view_dirty.services.insert(*addr);
                }
                if live.slots == plan.slots
                    && live.to_destinations == plan.to_destinations
                    && live.flags == plan.flags()
                {
                    live.service = Some(plan.service.clone());
                    live.adopted = false;
                    report.unchanged += 1;
                    continue;
                }
                if live.adopted && hold.undecided.contains(addr) {
                    live.service = Some(plan.service.clone());
                    report.held += 1;
                    continue;
                }
            }
            match self.write_service(*addr, plan, now) {
                Ok(()) => report.written += 1,
                Err(e) => report.errors.push(e),
            }
        }
        let candidates: Vec<ServiceAddr> = match only {
            Some(only) => only
                .iter()
                .filter(|a| self.live.contains_key(a))
                .copied()
                .collect(),
            None => self.live.keys().copied().collect(),
        };
        let gone: Vec<ServiceAddr> = candidates
            .into_iter()
            .filter(|a| !desired.contains_key(a))
            .filter(|a| {
                let keep = hold.absent && self.live.get(a).is_some_and(|l| l.adopted);
                report.held += usize::from(keep);
                !keep
            })
            .collect();
        for addr in gone {
            match self.remove_service(addr, now) {
                Ok(()) => report.removed += 1,
                Err(e) => report.errors.push(e),
            }
        }
        if affinity {
            report.errors.extend(self.sync_affinity(desired));
        }
        if socket {
            report.errors.extend(self.sync_socket_policies(desired));
        }
        // Tables replaced now are freed after the grace period, by the
        // agent's tick: a full sweep here would make each small change cost
        // as much as the whole configuration.
        if only.is_none() {
            self.collect_garbage(now);
        }
        report
    }

    /// Makes `SOCKET_POLICY_V1` hold the socket options of the live service
    /// ports that have some (after the flips: a connect in between gets the
    /// socket's own options).
    fn sync_socket_policies(
        &mut self,
        desired: &BTreeMap<ServiceAddr, ServicePlan>,
    ) -> Vec<ApplyError> {
        let mut want = BTreeMap::new();
        for (addr, plan) in desired {
            if let (Some(options), Some(live)) = (plan.socket, self.live.get(addr)) {
                want.insert(live.service_id, (options, (*addr, plan.service.clone())));
            }
        }
        sync_owned(
            &mut *self.maps.socket_policy,
            &mut self.socket_policies,
            want,
            |id| id,
            |(addr, service), source| ApplyError::Write {
                service,
                addr,
                source: Box::new(source),
            },
        )
    }

    /// Makes `AFFINITY_MATCH_V1` hold the backends of the live tables of the
    /// services with session affinity. After the flips: a backend that left is
    /// removed once no live table holds it, so a client pinned to it draws
    /// again; a new one counts from its first connect.
    fn sync_affinity(&mut self, desired: &BTreeMap<ServiceAddr, ServicePlan>) -> Vec<ApplyError> {
        let mut want = BTreeMap::new();
        for (addr, plan) in desired {
            let (Some(timeout), Some(live)) = (plan.affinity_timeout_s, self.live.get(addr)) else {
                continue;
            };
            for backend in live.slots.iter().flatten() {
                let member = AffinityMatch::of(live.service_id, &backend_value(*backend, 0));
                want.insert(member, (timeout, (*addr, plan.service.clone(), *backend)));
            }
        }
        sync_owned(
            &mut *self.maps.affinity_match,
            &mut self.affinity,
            want,
            |m| m,
            |(addr, service, backend), source| ApplyError::Affinity {
                service,
                addr,
                backend,
                source: Box::new(source),
            },
        )
    }

    fn write_service(
        &mut self,
        addr: ServiceAddr,
        plan: &ServicePlan,
        now: Instant,
    ) -> Result<(), ApplyError> {
        let err = |source| ApplyError::Write {
            service: plan.service.clone(),
            addr,
            source: Box::new(source),
        };
        let (service_id, revision) = match self.live.get(&addr) {
            Some(live) => (live.service_id, self.next_revision(live)),
            None => {
                let Some(taken) = self.service_ids.take() else {
                    return Err(ApplyError::ServicesFull {
                        service: plan.service.clone(),
                        addr,
                        capacity: self.maps.capacity.services as usize,
                        map: mesh_common::map_names::SERVICES,
                    });
                };
                // A reused id starts counting from zero (the kernel creates
                // the entry at the next connect).
                if taken.reused {
                    remove_counter(&mut *self.maps.service_stats, taken.id);
                }
                (taken.id, 1)
            }
        };
        // Admission: the whole table or nothing, so that a table that does not
        // fit never takes the room of those after it.
        if let Err(e) = self.admit(addr, plan) {
            if !self.live.contains_key(&addr) {
                self.refuse_new(addr, plan, service_id)?;
            }
            return Err(e);
        }
        let mut written = 0u32;
        let result = (|| {
            // The new backends' ids, then the whole table in one call
            // (BPF_MAP_UPDATE_BATCH): a first apply of 10k services is 10k
            // calls, not one per slot.
            self.count_new_backends(plan, addr.proto).map_err(err)?;
            let key = |slot: usize| SlotKey {
                service_id,
                revision,
                slot: slot as u32,
            };
            let entries: Vec<(SlotKey, Backend)> = if plan.to_destinations.is_empty() {
                plan.slots
                    .iter()
                    .enumerate()
                    .map(|(slot, target)| {
                        let backend = match target {
                            Some(b) => backend_value(*b, self.backends[&(*b, addr.proto)].id),
                            None => Backend {
                                family: FAMILY_NONE,
                                ..bytemuck::Zeroable::zeroed()
                            },
                        };
                        (key(slot), backend)
                    })
                    .collect()
            } else {
                plan.to_destinations
                    .iter()
                    .enumerate()
                    .map(|(slot, &index)| (key(slot), destination_slot(index)))
                    .collect()
            };
            match self.maps.slots.insert_all(&entries) {
                Ok(()) => written = entries.len() as u32,
                Err((done, e)) => {
                    written = done as u32;
                    return Err(err(e));
                }
            }
            // The flip: from here on new connects draw from the new revision.
            let value = ServiceValue {
                service_id,
                revision,
                slot_count: plan.slot_count() as u32,
                flags: plan.flags(),
            };
            self.maps
                .services
                .insert(service_key(addr), value)
                .map_err(err)
        })();
        self.slots_used += written as usize;
        if let Err(e) = result {
            // Free the partial table at the next collection (nothing reads it: the
            // entry was not flipped); the live one, if any, is untouched. A new
            // service's id goes back to the pool then.
            let mut slots = plan.slots.to_vec();
            slots.resize(plan.slot_count(), None);
            slots.truncate(written as usize);
            self.name_backends(&slots, addr.proto);
            // Backends given an id for this table and named by no other.
            self.unnamed
                .extend(plan.slots.iter().flatten().map(|b| (*b, addr.proto)));
            self.retired.push(Retired {
                service_id,
                revision,
                slots: slots.into(),
                proto: addr.proto,
                since: now.checked_sub(GRACE).unwrap_or(now),
            });
            return Err(e);
        }
        self.name_backends(&plan.slots, addr.proto);
        self.live_ids.insert(service_id);
        self.view_dirty.services.insert(addr);
        let previous = self.live.insert(
            addr,
            Live {
                service_id,
                revision,
                adopted: false,
                service: Some(plan.service.clone()),
                slots: plan.slots.clone(),
                to_destinations: plan.to_destinations.clone(),
                flags: plan.flags(),
            },
        );
        if let Some(old) = previous {
            self.retired.push(Retired {
                service_id,
                revision: old.revision,
                slots: old.into_retired_slots(),
                proto: addr.proto,
                since: now,
            });
        }
        Ok(())
    }

    /// Whether `plan`'s whole table fits now: its slots in the slot map (the
    /// table it replaces is held until its grace period ends), and a counter for
    /// each backend it adds. Checked before any write.
    fn admit(&self, addr: ServiceAddr, plan: &ServicePlan) -> Result<(), ApplyError> {
        let keeping = if self.live.contains_key(&addr) {
            Keeping::Previous
        } else {
            Keeping::Refused
        };
        let capacity = self.maps.capacity.slots as usize;
        let free = capacity.saturating_sub(self.slots_used);
        if plan.slot_count() > free {
            return Err(ApplyError::SlotsFull {
                service: plan.service.clone(),
                addr,
                need: plan.slot_count(),
                free,
                capacity,
                map: mesh_common::map_names::SLOTS,
                keeping,
            });
        }
        let new: BTreeSet<&BackendAddr> = plan
            .slots
            .iter()
            .flatten()
            .filter(|b| !self.backends.contains_key(&(**b, addr.proto)))
            .collect();
        let free = self.backend_pool.available();
        if new.len() > free {
            return Err(ApplyError::BackendsFull {
                service: plan.service.clone(),
                addr,
                need: new.len(),
                free,
                capacity: self.maps.capacity.backends as usize,
                map: mesh_common::map_names::BACKEND_STATS,
                keeping,
            });
        }
        Ok(())
    }

    /// A new service whose table does not fit: an entry with no slots, so its
    /// connects are refused (`EHOSTUNREACH`) rather than sent to the bare VIP.
    fn refuse_new(
        &mut self,
        addr: ServiceAddr,
        plan: &ServicePlan,
        service_id: u32,
    ) -> Result<(), ApplyError> {
        let value = ServiceValue {
            service_id,
            revision: 0,
            slot_count: 0,
            flags: plan.flags(),
        };
        if let Err(source) = self.maps.services.insert(service_key(addr), value) {
            self.service_ids.give(service_id);
            return Err(ApplyError::Write {
                service: plan.service.clone(),
                addr,
                source: Box::new(source),
            });
        }
        self.live_ids.insert(service_id);
        self.view_dirty.services.insert(addr);
        self.live.insert(
            addr,
            Live {
                service_id,
                revision: 0,
                adopted: false,
                service: Some(plan.service.clone()),
                slots: Arc::new([]),
                to_destinations: Vec::new(),
                flags: plan.flags(),
            },
        );
        Ok(())
    }

    /// The revision after `live`'s that no table waiting to be freed uses: a
    /// stray table adopted after a restart may hold the very next one, and
    /// writing over it would have the new live table freed with it.
    fn next_revision(&self, live: &Live) -> u32 {
        let mut revision = live.revision.wrapping_add(1);
        while self
            .retired
            .iter()
            .any(|r| r.service_id == live.service_id && r.revision == revision)
        {
            revision = revision.wrapping_add(1);
        }
        revision
    }

    fn remove_service(&mut self, addr: ServiceAddr, now: Instant) -> Result<(), ApplyError> {
        let Some(live) = self.live.get(&addr) else {
            return Ok(());
        };
        match self.maps.services.remove(&service_key(addr)) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(ApplyError::Write {
                    service: live.service.clone().unwrap_or_default(),
                    addr,
                    source: Box::new(source),
                });
            }
        }
        if let Some(live) = self.live.remove(&addr) {
            self.live_ids.remove(&live.service_id);
            self.view_dirty.services.insert(addr);
            self.retired.push(Retired {
                service_id: live.service_id,
                revision: live.revision,
                slots: live.into_retired_slots(),
                proto: addr.proto,
                since: now,
            });
            // The id is reused only once its last table is freed (see collect_garbage).
        }
        Ok(())
    }

    /// Frees tables retired more than [`GRACE`] before `now`, then the service and
    /// backend ids that no live or waiting table refers to any more. Call it now
    /// and then (the agent does each second).
    pub fn collect_garbage(&mut self, now: Instant) {
        let (due, keep): (Vec<Retired>, Vec<Retired>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|r| now.duration_since(r.since) >= GRACE);
        self.retired = keep;
        for r in &due {
            self.slots_used = self.slots_used.saturating_sub(r.slots.len());
            for slot in 0..r.slots.len() as u32 {
                let key = SlotKey {
                    service_id: r.service_id,
                    revision: r.revision,
                    slot,
                };
                match self.maps.slots.remove(&key) {
                    // Absent: a partial table, or a stray one counted by its largest slot.
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => warn!(?key, "cannot free a replaced table's slot: {e}"),
                }
            }
            self.unname_backends(&r.slots, r.proto);
        }
        // Ids go back only after every due table is freed, once each, and only if
        // nothing live or still waiting uses them.
        let due_ids: BTreeSet<u32> = due.iter().map(|r| r.service_id).collect();
        for id in due_ids {
            let in_use =
                self.live_ids.contains(&id) || self.retired.iter().any(|r| r.service_id == id);
            if !in_use {
                remove_counter(&mut *self.maps.service_stats, id);
                self.service_ids.give(id);
            }
        }
        for k in std::mem::take(&mut self.unnamed) {
            if let Some(&BackendUse { id, refs: 0 }) = self.backends.get(&k) {
                self.backends.remove(&k);
                remove_counter(&mut *self.maps.backend_stats, id);
                self.backend_pool.give(id);
                self.view_dirty.backends.push((id, None));
            }
        }
    }

    /// Counts the backends `slots` name as named once more (a table made
    /// live, or a partial one waiting to be freed); they have their ids
    /// ([`Applier::count_new_backends`]).
    fn name_backends(&mut self, slots: &[Option<BackendAddr>], proto: Proto) {
        for b in slots.iter().flatten() {
            if let Some(backend) = self.backends.get_mut(&(*b, proto)) {
                backend.refs += 1;
            }
        }
    }

    /// The reverse of [`Applier::name_backends`], when a table is freed.
    fn unname_backends(&mut self, slots: &[Option<BackendAddr>], proto: Proto) {
        for b in slots.iter().flatten() {
            let key = (*b, proto);
            if let Some(backend) = self.backends.get_mut(&key)
                && backend.refs > 0
            {
                backend.refs -= 1;
                if backend.refs == 0 {
                    self.unnamed.push(key);
                }
            }
        }
    }

    /// Takes over what a previous agent left in the pinned maps: every service's
    /// live table (so an unchanged service is not rewritten: no gap, no flip), the
    /// ids it used, the per-backend counters, the redirect exclusions. Tables and
    /// counters nothing points to (an agent killed mid-update) are freed.
    pub fn adopt(&mut self, now: Instant) -> Adopted {
        let mut adopted = Adopted::default();
        for key in self.maps.services.keys() {
            let Some(value) = self.maps.services.get(&key) else {
                continue; // removed since the walk
            };
            let Some(addr) = service_addr(&key) else {
                if let Err(e) = self.maps.services.remove(&key) {
                    warn!(
                        ?key,
                        "cannot remove a service entry we would never write: {e}"
                    );
                }
                continue;
            };
            let mut slots = Vec::with_capacity(value.slot_count as usize);
            let mut to_destinations = Vec::new();
            for slot in 0..value.slot_count {
                let key = SlotKey {
                    service_id: value.service_id,
                    revision: value.revision,
                    slot,
                };
                let found = self.maps.slots.get(&key);
                if value.flags & mesh_common::SERVICE_FLAG_DESTINATIONS != 0 {
                    to_destinations.extend(found.as_ref().and_then(slot_destination));
                    continue;
                }
                let target = found.and_then(|b| {
                    let target = backend_addr(&b)?;
                    // An id we would never give out: the slot is rewritten.
                    if b.backend_id >= self.maps.capacity.backends {
                        return None;
                    }
                    let key = (target, addr.proto);
                    self.backends
                        .entry(key)
                        .or_insert(BackendUse { id: 0, refs: 0 })
                        .id = b.backend_id;
                    self.view_dirty.backends.push((b.backend_id, Some(key)));
                    self.backend_pool.reserve(b.backend_id);
                    Some(target)
                });
                slots.push(target);
            }
            self.service_ids.reserve(value.service_id);
            self.name_backends(&slots, addr.proto);
            self.live_ids.insert(value.service_id);
            self.view_dirty.services.insert(addr);
            self.live.insert(
                addr,
                Live {
                    service_id: value.service_id,
                    revision: value.revision,
                    adopted: true,
                    service: None,
                    slots: slots.into(),
                    to_destinations,
                    flags: value.flags,
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
        for k in self.maps.slots.keys() {
            if !live.contains(&(k.service_id, k.revision)) {
                let len = stray.entry((k.service_id, k.revision)).or_default();
                *len = (*len).max(k.slot + 1);
                adopted.stray_slots += 1;
            }
        }
        self.slots_used = self.live.values().map(Live::len).sum::<usize>()
            + stray.values().map(|&len| len as usize).sum::<usize>();
        for ((service_id, revision), len) in stray {
            self.service_ids.reserve(service_id);
            self.retired.push(Retired {
                service_id,
                revision,
                slots: vec![None; len as usize].into(),
                proto: Proto::Tcp,
                since: now,
            });
        }
        // Counters nothing refers to any more.
        let backend_ids: BTreeSet<u32> = self.backends.values().map(|b| b.id).collect();
        prune_counters(&mut *self.maps.backend_stats, &backend_ids);
        let service_ids: BTreeSet<u32> = self.live.values().map(|l| l.service_id).collect();
        prune_counters(&mut *self.maps.service_stats, &service_ids);
        adopted.backends = self.backends.len();
        self.excluded = self
            .maps
            .redirect_excluded
            .keys()
            .iter()
            .filter_map(endpoint_addr)
            .collect();
        // The next applies keep what still holds and remove the rest.
        self.socket_policies = self
            .maps
            .socket_policy
            .keys()
            .into_iter()
            .filter_map(|k| Some((k, self.maps.socket_policy.get(&k)?)))
            .collect();
        self.affinity = self
            .maps
            .affinity_match
            .keys()
            .into_iter()
            .filter_map(|k| Some((k, self.maps.affinity_match.get(&k)?)))
            .collect();
        adopted
    }

    /// Gives each backend of `plan` not counted yet an id ([`Applier::admit`]
    /// checked there is room). Its counter is the kernel's to create, at its
    /// first connect: creating 100 000 per-CPU entries here took the kernel
    /// ~1.2 s of a first apply. A reused id's entry is deleted: a connect
    /// through a table freed with its last holder may have counted after
    /// the agent deleted it.
    fn count_new_backends(&mut self, plan: &ServicePlan, proto: Proto) -> Result<(), MapError> {
        let new: BTreeSet<BackendAddr> = plan
            .slots
            .iter()
            .flatten()
            .filter(|b| !self.backends.contains_key(&(**b, proto)))
            .copied()
            .collect();
        let mut taken: Vec<Taken> = Vec::with_capacity(new.len());
        for _ in &new {
            let Some(t) = self.backend_pool.take() else {
                for t in taken {
                    self.backend_pool.give(t.id);
                }
                return Err(MapError::SyscallError(aya::sys::SyscallError {
                    call: "backend id",
                    io_error: std::io::Error::from_raw_os_error(libc::E2BIG),
                }));
            };
            taken.push(t);
        }
        for (backend, t) in new.into_iter().zip(taken) {
            if t.reused {
                remove_counter(&mut *self.maps.backend_stats, t.id);
            }
            self.backends
                .insert((backend, proto), BackendUse { id: t.id, refs: 0 });
            self.view_dirty
                .backends
                .push((t.id, Some((backend, proto))));
        }
        Ok(())
    }

    /// Makes the kernel's redirect exclusions exactly `desired`; a failed write is
    /// reported and tried again on the next call.
    pub fn apply_excluded(&mut self, desired: &BTreeSet<BackendAddr>) -> Vec<ApplyError> {
        super::maps::sync_set(
            &mut *self.maps.redirect_excluded,
            &mut self.excluded,
            desired,
            endpoint_key,
        )
        .into_iter()
        .map(|(endpoint, source)| ApplyError::Exclusion {
            endpoint,
            source: Box::new(source),
        })
        .collect()
    }

    /// Labels of the kernel's counters and the occupancy of the maps we
    /// write, made whole (at start; [`Applier::refresh_view`] keeps it).
    pub fn view(&self) -> View {
        View {
            services: self
                .live
                .keys()
                .filter_map(|a| Some((*a, self.service_label(*a)?)))
                .collect(),
            backends: BackendIds::from_ids(self.backends.iter().map(|(&key, b)| (b.id, key))),
            occupancy: self.occupancy(),
        }
    }

    /// Brings `view` (made by [`Applier::view`]) up to date: what changed
    /// since the last call, not the whole state (at 100 000 backends a
    /// whole view took milliseconds of the agent's loop).
    pub fn refresh_view(&mut self, view: &mut View) {
        let dirty = std::mem::take(&mut self.view_dirty);
        for addr in dirty.services {
            match self.service_label(addr) {
                Some(label) => view.services.insert(addr, label),
                None => view.services.remove(&addr),
            };
        }
        for (id, key) in dirty.backends {
            view.backends.set(id, key);
        }
        view.occupancy = self.occupancy();
    }

    /// The label of a live service port's counter; connects count for the
    /// port (a destination's table is part of it).
    fn service_label(&self, addr: ServiceAddr) -> Option<ServiceLabel> {
        if addr.destination.is_some() {
            return None;
        }
        let live = self.live.get(&addr)?;
        Some(ServiceLabel {
            id: live.service_id,
            service: live.service.clone()?,
            addr,
        })
    }

    fn occupancy(&self) -> Vec<Occupancy> {
        use mesh_common::map_names as m;
        let occupancy = |map, entries: usize, capacity: u32| Occupancy {
            map,
            entries: entries as u64,
            capacity: u64::from(capacity),
        };
        // Service counters: live ids and those of tables waiting to be freed.
        let waiting: BTreeSet<u32> = self
            .retired
            .iter()
            .map(|r| r.service_id)
            .filter(|id| !self.live_ids.contains(id))
            .collect();
        let capacity = self.maps.capacity;
        vec![
            occupancy(m::SERVICES, self.live.len(), capacity.services),
            occupancy(m::SLOTS, self.slots_used, capacity.slots),
            occupancy(m::BACKEND_STATS, self.backends.len(), capacity.backends),
            occupancy(
                m::SERVICE_STATS,
                self.live_ids.len() + waiting.len(),
                capacity.services,
            ),
            occupancy(
                m::REDIRECT_EXCLUDED,
                self.excluded.len(),
                capacity.redirect_excluded,
            ),
        ]
    }

    /// Service ports the kernel holds now.
    pub fn live_services(&self) -> usize {
        self.live.len()
    }
}

/// Removes the counters of every id not in `keep`.
fn prune_counters(map: &mut dyn CounterMap, keep: &BTreeSet<u32>) {
    for id in map.ids() {
        if !keep.contains(&id) {
            remove_counter(map, id);
        }
    }
}

fn remove_counter(map: &mut dyn CounterMap, id: u32) {
    match map.remove(id) {
        Ok(()) | Err(MapError::KeyNotFound) => {}
        Err(e) => warn!(id, "cannot remove a connection counter: {e}"),
    }
}

/// Syncs one of the maps derived from the live tables: `want` holds each
/// entry's value and whom it serves; a failed write is that owner's error, a
/// failed removal (an entry nothing wants any more) is only logged.
fn sync_owned<T: Ord + Copy + std::fmt::Debug, K, V: Copy + PartialEq, O>(
    map: &mut dyn super::maps::KernelMap<K, V>,
    current: &mut BTreeMap<T, V>,
    want: BTreeMap<T, (V, O)>,
    key: impl Fn(T) -> K,
    error: impl Fn(O, MapError) -> ApplyError,
) -> Vec<ApplyError> {
    let values: BTreeMap<T, V> = want.iter().map(|(t, (v, _))| (*t, *v)).collect();
    let mut owners: BTreeMap<T, O> = want.into_iter().map(|(t, (_, o))| (t, o)).collect();
    super::maps::sync_map(map, current, &values, key)
        .into_iter()
        .filter_map(|(entry, source)| match owners.remove(&entry) {
            Some(owner) => Some(error(owner, source)),
            None => {
                warn!(
                    ?entry,
                    "cannot remove an entry no table needs any more: {source}"
                );
                None
            }
        })
        .collect()
}
