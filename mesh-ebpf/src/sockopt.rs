//! DestinationRule `connectionPool.tcp`: `connectTimeout` and `tcpKeepalive`
//! applied to a client's TCP socket at `connect()`, where the service is
//! known (`SOCKET_POLICY_V1`). An option the application set itself is left
//! as it is.
//!
//! `connectTimeout` is `TCP_USER_TIMEOUT` while connecting: it bounds the
//! handshake (the kernel fails the connect with ETIMEDOUT once the SYN has
//! gone unanswered that long), where `TCP_SYNCNT` only counts retries of
//! doubling length (1 s, 3 s, 7 s...). Left on, it would also abort an
//! established connection with data unacknowledged that long, so sockops
//! clears it at ESTABLISHED (`CONNECTING_V1` says which sockets are ours).

use aya_ebpf::{
    EbpfContext,
    cty::c_void,
    helpers::{bpf_get_socket_cookie, bpf_getsockopt, bpf_setsockopt},
};
use mesh_common::SocketPolicy;

use crate::maps::{CONNECTING, SOCKET_POLICY};

const SOL_SOCKET: i32 = 1;
const SO_KEEPALIVE: i32 = 9;
const SOL_TCP: i32 = 6;
const TCP_KEEPIDLE: i32 = 4;
const TCP_KEEPINTVL: i32 = 5;
const TCP_KEEPCNT: i32 = 6;
const TCP_USER_TIMEOUT: i32 = 18;

/// The connection pool's policy of service `service_id`.
#[inline(always)]
pub fn policy(service_id: u32) -> Option<SocketPolicy> {
    // SAFETY: a plain lookup; the value is copied.
    unsafe { SOCKET_POLICY.get(service_id) }.copied()
}

/// connect4/6: the service's socket options on the connecting TCP socket.
#[inline(always)]
pub fn apply<C: EbpfContext>(ctx: &C, policy: &SocketPolicy) {
    connect_timeout(ctx, policy);
    keepalive(ctx, policy);
}

#[inline(always)]
fn connect_timeout<C: EbpfContext>(ctx: &C, policy: &SocketPolicy) {
    if policy.connect_timeout_ms == 0 || get(ctx, SOL_TCP, TCP_USER_TIMEOUT) != Some(0) {
        return;
    }
    if set(
        ctx,
        SOL_TCP,
        TCP_USER_TIMEOUT,
        policy.connect_timeout_ms as i32,
    ) {
        // SAFETY: the helper accepts a sock_addr context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // A full LRU forgets an old connect: its option stays until it ends.
        let _ = CONNECTING.insert(cookie, 1, 0);
    }
}

#[inline(always)]
fn keepalive<C: EbpfContext>(ctx: &C, policy: &SocketPolicy) {
    if policy.keepalive_time_s == 0 || get(ctx, SOL_SOCKET, SO_KEEPALIVE) != Some(0) {
        return;
    }
    if !set(ctx, SOL_SOCKET, SO_KEEPALIVE, 1) {
        return;
    }
    set(ctx, SOL_TCP, TCP_KEEPIDLE, policy.keepalive_time_s as i32);
    if policy.keepalive_interval_s != 0 {
        set(
            ctx,
            SOL_TCP,
            TCP_KEEPINTVL,
            policy.keepalive_interval_s as i32,
        );
    }
    if policy.keepalive_probes != 0 {
        set(ctx, SOL_TCP, TCP_KEEPCNT, policy.keepalive_probes as i32);
    }
}

/// Whether `backend` has the policy's `maxConnections` open already.
#[inline(always)]
pub fn full(policy: &SocketPolicy, backend: &mesh_common::EndpointKey) -> bool {
    let max = policy.max_connections;
    max != 0 && crate::active::open(backend).is_some_and(|open| open >= i64::from(max))
}

/// sockops at ACTIVE_ESTABLISHED: clears the connect timeout connect4/6 set.
#[inline(always)]
pub fn established<C: EbpfContext>(ctx: &C) {
    // SAFETY: the helper accepts a sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: existence check only.
    if unsafe { CONNECTING.get(cookie) }.is_none() {
        return;
    }
    let _ = CONNECTING.remove(cookie);
    set(ctx, SOL_TCP, TCP_USER_TIMEOUT, 0);
}

#[inline(always)]
fn get<C: EbpfContext>(ctx: &C, level: i32, name: i32) -> Option<i32> {
    let mut value: i32 = 0;
    // SAFETY: the helper writes at most `optlen` bytes into `value`.
    let rc = unsafe {
        bpf_getsockopt(
            ctx.as_ptr(),
            level,
            name,
            (&raw mut value).cast::<c_void>(),
            4,
        )
    };
    (rc == 0).then_some(value)
}

#[inline(always)]
fn set<C: EbpfContext>(ctx: &C, level: i32, name: i32, value: i32) -> bool {
    let mut value = value;
    // SAFETY: the helper reads `optlen` bytes from `value`.
    let rc = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            level,
            name,
            (&raw mut value).cast::<c_void>(),
            4,
        )
    };
    rc == 0
}
