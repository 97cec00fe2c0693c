//! Counter helpers. Per-CPU values: plain increments are race-free.

use aya_ebpf::maps::PerCpuArray;

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
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU value of an existing entry, valid for the program's run.
        unsafe { (*stats).connects += 1 };
    }
}

#[inline(always)]
pub fn bump_service(service_id: u32) {
    if let Some(connects) = SERVICE_STATS.get_ptr_mut(service_id) {
        // SAFETY: per-CPU value of an existing entry, valid for the program's run.
        unsafe { *connects += 1 };
    }
}
