//! Which sockets are meshed: everything under the attach point, or only those
//! in a meshed pod's network namespace (`MESH_SCOPE_V1`). Both the connect
//! hooks and sockops can read a socket's network namespace cookie (sockops
//! runs in softirq for most sockets, where the current task is not the
//! socket's, and cannot read a socket's cgroup).

use mesh_common::scope;

use crate::maps::{MESH_SCOPE, MESHED_PODS};

/// Whether a socket in the network namespace `netns` (its cookie) is meshed.
#[inline(always)]
pub fn meshed(netns: u64) -> bool {
    let Some(config) = MESH_SCOPE.get(0) else {
        return true;
    };
    // SAFETY: a plain lookup; the value is not kept.
    config.mode != scope::PODS || unsafe { MESHED_PODS.get(netns) }.is_some()
}
