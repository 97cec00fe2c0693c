//! Entries only the kernel writes, carried from a map the loader replaces into
//! its successor. The agent rebuilds every other map from its source; these it
//! cannot: `REVNAT` (socket cookie -> the VIP it dialled: without it a socket
//! connected before the upgrade answers `getpeername` with its backend) and the
//! connection counters (without them `/metrics` would fall back to zero).
//!
//! Only a map replaced for its capacity is carried: same type, key, value and
//! flags. One of another layout (renamed `_V2`, or a build with other types)
//! holds bytes the new code would misread; carrying it needs a conversion
//! written for that change, so it starts empty.
//!
//! The order, against the programs the loader swaps (connect4, getpeername4,
//! connect6, getpeername6, each one `BPF_LINK_UPDATE`):
//! - counters: copied at load, before the agent reads or prunes them, so
//!   `/metrics` never goes backwards; after the swap, what the old programs
//!   counted in between is added (a read and a write per counter: an increment
//!   the kernel makes between the two is lost, never counted twice).
//! - `REVNAT`: copied at load, again just before the swap (nothing reads the
//!   new map yet), and again just after it, for the records the old connect
//!   programs wrote meanwhile, never over a record the new ones wrote
//!   (`BPF_NOEXIST`). What is left, for a `getpeername` in that instant only:
//!   a socket connected by the new connect4 in the one swap before getpeername4
//!   is swapped, asking before that swap, reads the old map and sees its
//!   backend; so does one connected by the old connect4 just before its swap
//!   (after the copy before the swap passed its record), asking between the
//!   getpeername4 swap and the end of the copy after it (one walk of the old
//!   map). No order of two separate link updates closes both; once the last
//!   copy ends, every record is there. At most one socket per connecting thread
//!   per window: under a storm of 4 threads connecting and asking at once, 0 to
//!   3 per upgrade were seen in 8 runs (tests/tests/operate.rs).

use std::collections::BTreeMap;

use aya::maps::{HashMap, Map, MapData, MapError, PerCpuHashMap, PerCpuValues};
use mesh_common::{OrigDst, map_names};
use tracing::{info, warn};

use super::pin::{MapSpec, PinDir};

/// `BPF_NOEXIST` and `BPF_EXIST` (`bpf_map_update_elem` flags).
const NOEXIST: u64 = 1;
const EXIST: u64 = 2;

/// The counter maps: `u32` id -> per-CPU `u64`s (`BackendStats` is one `u64`).
const COUNTERS: [&str; 2] = [map_names::BACKEND_STATS, map_names::SERVICE_STATS];

type Counters = PerCpuHashMap<MapData, u32, u64>;
type RevNat = HashMap<MapData, u64, OrigDst>;

/// Per-CPU values of each counter, as copied.
type Snapshot = BTreeMap<u32, Vec<u64>>;

/// A replaced map, and its kernel id (to tell it from its successor).
struct Old<M> {
    map: M,
    id: u32,
}

/// The replaced maps, opened before their pins go (the old programs keep them
/// alive until they are swapped out, but nothing else could find them).
#[derive(Default)]
pub struct Carry {
    revnat: Option<Old<RevNat>>,
    counters: Vec<(&'static str, Old<Counters>, Snapshot)>,
    /// Bound on a walk of a map the kernel writes meanwhile: a key deleted under
    /// the walk restarts it from the first key, so it could go round for ever.
    bound: usize,
}

impl std::fmt::Debug for Carry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Carry")
            .field("revnat", &self.revnat.is_some())
            .field(
                "counters",
                &self.counters.iter().map(|c| c.0).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Carry {
    /// Opens the pinned maps that `expected` replaces for their capacity alone.
    /// Call it before the mismatched pins are removed.
    pub fn open(pins: &PinDir, expected: &[(&'static str, MapSpec)]) -> Self {
        let mut carry = Self::default();
        for &(name, spec) in expected {
            let carried = name == map_names::REVNAT || COUNTERS.contains(&name);
            let Some(old) = carried.then(|| resized(pins, name, spec)).flatten() else {
                continue;
            };
            carry.bound = carry.bound.max(2 * old.max_entries as usize + 64);
            let (map, id) = (Map::from_map_data(old.map), old.id);
            let opened = if name == map_names::REVNAT {
                map.and_then(RevNat::try_from)
                    .map(|map| carry.revnat = Some(Old { map, id }))
            } else {
                map.and_then(Counters::try_from).map(|map| {
                    carry
                        .counters
                        .push((name, Old { map, id }, Snapshot::new()))
                })
            };
            if let Err(e) = opened {
                warn!(
                    map = name,
                    "cannot open the replaced map; its entries are not carried over: {e}"
                );
            }
        }
        carry
    }

    /// Copies into the new maps (still empty: just created): the counters,
    /// remembering what was copied, and a first time `REVNAT`, so that an agent
    /// stopped before the swap leaves the records in the pinned successor (the
    /// old map is unpinned: the next agent could not find it). Call it before
    /// anything reads the new maps.
    pub fn at_load(&mut self, pins: &PinDir) {
        if let Some(old) = &self.revnat {
            self.copy_revnat(pins, old, "at load");
        }
        for (name, old, snapshot) in &mut self.counters {
            let copied = open_new::<Counters>(pins, name, old.id)
                .and_then(|mut new| copy_counters(&old.map, &mut new, self.bound));
            match copied {
                Ok(copied) => {
                    info!(
                        map = *name,
                        counters = copied.len(),
                        "counters carried over from the replaced map"
                    );
                    *snapshot = copied;
                }
                Err(e) => warn!(
                    map = *name,
                    "carrying the counters over failed; they start from zero: {e}"
                ),
            }
        }
    }

    /// `REVNAT` again just before the programs are swapped: what the old
    /// connect programs wrote since the load (the first sync can take a while).
    pub fn before_swap(&self, pins: &PinDir) {
        if let Some(old) = &self.revnat {
            self.copy_revnat(pins, old, "before the swap");
        }
    }

    /// After the connect and getpeername programs are swapped: the records and
    /// counts the old programs made since the first copy. Closes the old maps.
    pub fn after_swap(self, pins: &PinDir) {
        if let Some(old) = &self.revnat {
            self.copy_revnat(pins, old, "after the swap");
        }
        for (name, old, snapshot) in &self.counters {
            let added = open_new::<Counters>(pins, name, old.id)
                .and_then(|mut new| add_increments(&old.map, &mut new, snapshot, self.bound));
            match added {
                Ok(n) => info!(
                    map = *name,
                    counters = n,
                    "counts made by the old programs since the copy added"
                ),
                Err(e) => warn!(
                    map = *name,
                    "adding the old programs' last counts failed: {e}"
                ),
            }
        }
    }

    fn copy_revnat(&self, pins: &PinDir, old: &Old<RevNat>, when: &str) {
        let copied = open_new::<RevNat>(pins, map_names::REVNAT, old.id)
            .and_then(|mut new| copy_records(&old.map, &mut new, self.bound));
        match copied {
            Ok(n) => info!(
                map = map_names::REVNAT,
                records = n,
                when,
                "socket records carried over from the replaced map"
            ),
            Err(e) => warn!(
                map = map_names::REVNAT,
                when,
                "carrying socket records over failed (those sockets' getpeername shows the backend): {e}"
            ),
        }
    }
}

struct Pinned {
    map: MapData,
    id: u32,
    max_entries: u32,
}

/// The map pinned as `name` if it differs from `spec` in its capacity alone.
fn resized(pins: &PinDir, name: &str, spec: MapSpec) -> Option<Pinned> {
    let map = MapData::from_pin(pins.map(name)).ok()?;
    let info = map.info().ok()?;
    let pinned = MapSpec {
        map_type: info.map_type().map_or(u32::MAX, |t| t as u32),
        key_size: info.key_size(),
        value_size: info.value_size(),
        max_entries: spec.max_entries,
        flags: info.map_flags(),
    };
    (pinned == spec && info.max_entries() != spec.max_entries).then_some(Pinned {
        map,
        id: info.id(),
        max_entries: info.max_entries(),
    })
}

/// The successor pinned as `name`; an error if it is the replaced map itself
/// (its pin could not be removed): adding a map's counts to itself doubles them.
fn open_new<M>(pins: &PinDir, name: &str, old_id: u32) -> Result<M, MapError>
where
    M: TryFrom<Map, Error = MapError>,
{
    let new = MapData::from_pin(pins.map(name))?;
    if new.info()?.id() == old_id {
        return Err(MapError::SyscallError(aya::sys::SyscallError {
            call: "the replaced map is still pinned",
            io_error: std::io::Error::from_raw_os_error(libc::EEXIST),
        }));
    }
    M::try_from(Map::from_map_data(new)?)
}

/// Copies every record of `old` that `new` lacks; returns how many.
fn copy_records(old: &RevNat, new: &mut RevNat, bound: usize) -> Result<usize, MapError> {
    let mut copied = 0;
    for entry in old.iter().take(bound) {
        let (cookie, dialled) = entry?;
        match new.insert(cookie, dialled, NOEXIST) {
            Ok(()) => copied += 1,
            // The new connect program wrote it since: newer than ours.
            Err(e) if errno(&e) == Some(libc::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(copied)
}

fn copy_counters(old: &Counters, new: &mut Counters, bound: usize) -> Result<Snapshot, MapError> {
    let mut snapshot = Snapshot::new();
    for entry in old.iter().take(bound) {
        let (id, values) = entry?;
        let values: Vec<u64> = values.iter().copied().collect();
        new.insert(id, per_cpu(values.clone())?, 0)?;
        snapshot.insert(id, values);
    }
    Ok(snapshot)
}

/// Adds to `new` what each counter of `old` gained since `snapshot`. A
/// counter `new` lacks is created with those counts (the kernel creates
/// counters on their first connect, so one the old programs made since the
/// copy has no entry in `new` yet); the agent prunes those nothing refers to.
fn add_increments(
    old: &Counters,
    new: &mut Counters,
    snapshot: &Snapshot,
    bound: usize,
) -> Result<usize, MapError> {
    let mut added = 0;
    for entry in old.iter().take(bound) {
        let (id, now) = entry?;
        let before = snapshot.get(&id).map_or(&[][..], Vec::as_slice);
        let gained: Vec<u64> = now
            .iter()
            .enumerate()
            .map(|(cpu, n)| n.wrapping_sub(before.get(cpu).copied().unwrap_or(0)))
            .collect();
        if gained.iter().all(|g| *g == 0) {
            continue;
        }
        let current = match new.get(&id, 0) {
            Ok(current) => current,
            Err(MapError::KeyNotFound) => match new.insert(id, per_cpu(gained.clone())?, NOEXIST) {
                Ok(()) => {
                    added += 1;
                    continue;
                }
                // The new programs created it meanwhile: add to theirs.
                Err(e) if errno(&e) == Some(libc::EEXIST) => new.get(&id, 0)?,
                Err(e) => return Err(e),
            },
            Err(e) => return Err(e),
        };
        let sum = current
            .iter()
            .zip(&gained)
            .map(|(c, g)| c.wrapping_add(*g))
            .collect();
        match new.insert(id, per_cpu(sum)?, EXIST) {
            Ok(()) => added += 1,
            // Removed since (the agent freed the id): nothing to count.
            Err(e) if errno(&e) == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(added)
}

fn per_cpu(values: Vec<u64>) -> Result<PerCpuValues<u64>, MapError> {
    PerCpuValues::try_from(values).map_err(|io_error| {
        MapError::SyscallError(aya::sys::SyscallError {
            call: "per-CPU values",
            io_error,
        })
    })
}

fn errno(e: &MapError) -> Option<i32> {
    match e {
        MapError::SyscallError(s) => s.io_error.raw_os_error(),
        _ => None,
    }
}
