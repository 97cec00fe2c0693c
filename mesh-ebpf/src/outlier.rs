//! Outlier detection's counting: for each connect of a meshed client to a
//! watched backend (`OUTLIER_V1`), whether it failed or succeeded, counted
//! per CPU. The agent reads the counts every `interval` and ejects by
//! rewriting the service's tables; the kernel only counts.
//!
//! A connect fails when it ends before ESTABLISHED (SYN_SENT to CLOSE:
//! refused, unreachable, timed out), or when it ends straight from
//! ESTABLISHED (to CLOSE: a reset; a graceful close goes through FIN_WAIT or
//! CLOSE_WAIT) before the backend sent a byte: an accept-then-RST server (a
//! crashed worker, an `SO_LINGER` 0 close). It succeeds when it reaches
//! ESTABLISHED; a reset before data takes that success back (on its own CPU,
//! which may differ from the one that counted it: a CPU's `successes` may
//! wrap; the agent sums with wrapping arithmetic).
//!
//! Also counted as such a reset, as the kernel cannot tell them apart here:
//! the client's own abort (`SO_LINGER` 0) and an established connection that
//! timed out, each before receiving a byte. Not counted: a reset of a
//! connection into which the same-node shortcut delivered bytes (its record's
//! `received`, set by the backend's `sk_msg`): those bytes are not TCP's
//! `bytes_received`, and a healthy backend that answered and then reset must
//! not be judged failed.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_SOCK_OPS_TCP_CONNECT_CB, BPF_TCP_CLOSE, BPF_TCP_ESTABLISHED, BPF_TCP_SYN_SENT,
    },
    programs::SockOpsContext,
};
use mesh_common::SockKey;

use crate::maps::{OUTLIER, SOCK_CONN};

/// What a sockops callback tells of a connect.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Event {
    /// Before the SYN.
    Connect,
    /// The handshake completed.
    Established,
    /// SYN_SENT to CLOSE.
    Failed,
    /// ESTABLISHED to CLOSE with no byte received.
    ResetBeforeData,
}

/// Counts the outcome of a client's connect to a watched backend; `key` is
/// the socket's own (its remote end is the backend the connect went to).
///
/// The state changes come from `BPF_SOCK_OPS_STATE_CB_FLAG`, asked for at
/// TCP_CONNECT_CB; every program that sets the socket's flags later
/// (`redirect`, `active`) adds to them, so it stays set past ESTABLISHED.
#[inline(always)]
pub fn count(ctx: &SockOpsContext, op: u32, key: &SockKey) {
    let Some(event) = event(ctx, op, key) else {
        return;
    };
    let Some(stats) = OUTLIER.get_ptr_mut(key.remote_endpoint()) else {
        return;
    };
    // SAFETY: this CPU's value of a live element, valid for the program's run.
    let stats = unsafe { &mut *stats };
    match event {
        Event::Connect => {
            // Ask to hear how this connect ends.
            let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
        }
        Event::Established => stats.successes += 1,
        Event::Failed => stats.failures += 1,
        Event::ResetBeforeData => {
            stats.failures += 1;
            // Taken back from the count at ESTABLISHED, maybe on another CPU.
            stats.successes = stats.successes.wrapping_sub(1);
        }
    }
}

/// The callback's event, if it is one outlier detection counts.
#[inline(always)]
fn event(ctx: &SockOpsContext, op: u32, key: &SockKey) -> Option<Event> {
    match op {
        BPF_SOCK_OPS_TCP_CONNECT_CB => Some(Event::Connect),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => Some(Event::Established),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => match ctx.arg(0) {
            BPF_TCP_SYN_SENT => Some(Event::Failed),
            BPF_TCP_ESTABLISHED if bytes_received(ctx) == 0 && on_tcp(key) => {
                Some(Event::ResetBeforeData)
            }
            _ => None,
        },
        _ => None,
    }
}

/// Whether every byte the socket received came through TCP: the same-node
/// shortcut delivered none into it.
#[inline(always)]
fn on_tcp(key: &SockKey) -> bool {
    // SAFETY: a plain lookup; the value is read at once.
    unsafe { SOCK_CONN.get(key) }.is_none_or(|c| c.received == 0)
}

/// The payload bytes TCP received on the socket so far.
#[inline(always)]
fn bytes_received(ctx: &SockOpsContext) -> u64 {
    // SAFETY: the kernel hands a valid bpf_sock_ops; one 8-byte context load
    // of a field sockops may read.
    unsafe { core::ptr::read_volatile(&raw const (*ctx.ops).bytes_received) }
}
