//! Open connections per backend, for `LEAST_REQUEST` (fewest active
//! connections): sockops counts a connect the connect hooks rewrote to a
//! backend of such a service from its start (TCP_CONNECT_CB) to its close, per
//! CPU; connect4/6 sum a backend's count over the CPUs when choosing.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    cty::c_void,
    helpers::{bpf_get_socket_cookie, bpf_map_lookup_percpu_elem},
    programs::SockOpsContext,
};
use mesh_common::{EndpointKey, SockKey};

use crate::maps::{ACTIVE, COUNTED, REVNAT};

/// The most CPUs a count is summed over (a bound for the verifier; the
/// kernel answers no value past the last possible CPU).
const MAX_CPUS: u32 = 256;

/// sockops: +1 when a rewritten connect to a counted backend starts, -1 when
/// that socket closes.
#[inline(always)]
pub fn count(ctx: &SockOpsContext, op: u32, key: &SockKey) {
    let closed = op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE;
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && !closed {
        return;
    }
    // SAFETY: the helper accepts a sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if closed {
        // SAFETY: a plain lookup; the value is copied.
        if let Some(backend) = unsafe { COUNTED.get(cookie) }.copied()
            && COUNTED.remove(cookie).is_ok()
        {
            add(&backend, -1);
        }
        return;
    }
    let backend = key.remote_endpoint();
    // Only connects the connect hooks rewrote (a direct connect to a pod is
    // not the service's), to a backend whose connections are counted.
    // SAFETY: existence checks only.
    if unsafe { REVNAT.get(cookie) }.is_none() || ACTIVE.get_ptr(backend).is_none() {
        return;
    }
    if COUNTED.insert(cookie, backend, 0).is_ok() {
        add(&backend, 1);
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

#[inline(always)]
fn add(backend: &EndpointKey, n: i64) {
    if let Some(count) = ACTIVE.get_ptr_mut(backend) {
        // SAFETY: this CPU's value of a live element.
        unsafe { *count += n };
    }
}

/// The backend's open connections, summed over CPUs (`None`: not counted).
#[inline(always)]
pub fn open(backend: &EndpointKey) -> Option<i64> {
    ACTIVE.get_ptr(backend)?;
    let mut total = 0i64;
    let mut cpu = 0u32;
    while cpu < MAX_CPUS {
        // SAFETY: the map is a per-CPU hash of i64 values; the helper returns
        // null past the last possible CPU.
        let value = unsafe {
            bpf_map_lookup_percpu_elem(
                (&raw const ACTIVE).cast::<c_void>().cast_mut(),
                (backend as *const EndpointKey).cast::<c_void>(),
                cpu,
            )
        };
        if value.is_null() {
            break;
        }
        // SAFETY: a non-null value of this map is an i64.
        total += unsafe { *value.cast::<i64>() };
        cpu += 1;
    }
    Some(total)
}
