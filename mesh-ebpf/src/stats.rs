//! Counter helpers. Per-CPU values: plain increments are race-free.

use aya_ebpf::{bindings::BPF_NOEXIST, maps::PerCpuArray, maps::PerCpuHashMap};
use mesh_common::BackendStats;

use crate::maps::{BACKEND_STATS, GLOBAL_STATS, SERVICE_STATS};

/// Adds `n` to this CPU's slot `index` of a per-CPU counter array.
#[inline(always)]
pub fn add(counters: &PerCpuArray<u64>, index: u32, n: u64) {
    if let Some(counter) = counters.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of an array map, valid for the program's run.
        unsafe { *counter += n };
    }
}

#[inline(always)]
pub fn bump(index: u32) {
    add(&GLOBAL_STATS, index, 1);
}

#[inline(always)]
pub fn bump_backend(backend_id: u32) {
    count(
        &BACKEND_STATS,
        backend_id,
        BackendStats { connects: 1 },
        |s| s.connects += 1,
    );
}

#[inline(always)]
pub fn bump_service(service_id: u32) {
    count(&SERVICE_STATS, service_id, 1, |n| *n += 1);
}

/// Counts one event for `id` in a per-CPU counter hash, creating the id's
/// entry on its first event: the agent does not create counters (creating
/// 100 000 per-CPU entries from user space took the kernel ~1.2 s per first
/// apply). A program's update sets this CPU's value to `first` and zeroes
/// every other CPU's (`pcpu_init_value`). `BPF_NOEXIST`: when another CPU
/// created the entry in between, this one increments it instead of
/// overwriting that CPU's count. A full map (ids are below its capacity, so
/// only stale entries could fill it) loses the event.
#[inline(always)]
fn count<V>(map: &PerCpuHashMap<u32, V>, id: u32, first: V, increment: impl Fn(&mut V)) {
    if let Some(value) = map.get_ptr_mut(id) {
        // SAFETY: this CPU's value of an entry, valid for the program's run.
        unsafe { increment(&mut *value) };
        return;
    }
    if map.insert(id, first, u64::from(BPF_NOEXIST)).is_ok() {
        return;
    }
    if let Some(value) = map.get_ptr_mut(id) {
        // SAFETY: as above.
        unsafe { increment(&mut *value) };
    }
}
