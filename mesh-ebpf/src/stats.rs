//! Counter helpers. Per-CPU values: plain increments are race-free.

use crate::maps::{BACKEND_STATS, GLOBAL_STATS};

#[inline(always)]
pub fn bump(index: u32) {
    if let Some(counter) = GLOBAL_STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot of an array map, valid for the program's run.
        unsafe { *counter += 1 };
    }
}

#[inline(always)]
pub fn bump_backend(backend_id: u32) {
    if let Some(stats) = BACKEND_STATS.get_ptr_mut(backend_id) {
        // SAFETY: per-CPU value of an existing entry, valid for the program's run.
        unsafe { (*stats).connects += 1 };
    }
}
