//! Outlier detection's counting: for each connect of a meshed client to a
//! watched backend (`OUTLIER_V1`), whether it failed before ESTABLISHED
//! (refused, unreachable, timed out: SYN_SENT to CLOSE) or succeeded, counted
//! per CPU. The agent reads the counts every `interval` and ejects by
//! rewriting the service's tables; the kernel only counts.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_SYN_SENT,
    },
    programs::SockOpsContext,
};
use mesh_common::SockKey;

use crate::maps::OUTLIER;

/// Counts the outcome of a client's connect to a watched backend; `key` is
/// the socket's own (its remote end is the backend the connect went to).
#[inline(always)]
pub fn count(ctx: &SockOpsContext, op: u32, key: &SockKey) {
    let is_close = op == BPF_SOCK_OPS_STATE_CB
        && ctx.arg(0) == BPF_TCP_SYN_SENT
        && ctx.arg(1) == BPF_TCP_CLOSE;
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && !is_close {
        return;
    }
    let Some(stats) = OUTLIER.get_ptr_mut(key.remote_endpoint()) else {
        return;
    };
    if op == BPF_SOCK_OPS_TCP_CONNECT_CB {
        // Before the SYN: ask to hear how this connect ends.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        return;
    }
    // SAFETY: this CPU's value of a live element, valid for the program's run.
    unsafe {
        if is_close {
            (*stats).failures += 1;
        } else {
            (*stats).successes += 1;
        }
    }
}
