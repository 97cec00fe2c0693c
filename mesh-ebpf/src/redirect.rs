//! Same-node shortcut: `sockops` adds each established mesh TCP socket to
//! `SOCKETS_V2`; `sk_msg` (attached to that map, so it runs on every `sendmsg` of
//! those sockets) hands the message straight to the peer socket's receive queue
//! when the peer is a local mesh socket too, skipping TCP/IP both ways.
//!
//! Only the very peer: a socket's key ([`ConnKey`]) holds its 4-tuple and both
//! initial sequence numbers of its connection, which its peer alone shares, so
//! the peer key it builds names its own peer and no socket of another connection
//! that happens to have the same 4-tuple (overlapping pod IPs). `sk_msg` cannot
//! read sequence numbers; it finds them in its tuple's record (`SOCK_CONN_V1`),
//! which `sockops` creates with `BPF_NOEXIST` before adding the socket and
//! deletes when that socket closes: a socket is in `SOCKETS_V2` only while it owns
//! its tuple's record, so the record `sk_msg` reads is its own.
//!
//! Two sockops programs share this code: `mesh_sockops` on the mesh's cgroup
//! adds meshed pods' sockets; `mesh_router_sockops` on the agent's own cgroup
//! adds only the gateway router's sockets to backends (those carrying
//! `ROUTER_MARK_V1`), so a router and a backend on this node are joined too.
//! Where both run on one socket (the agent's cgroup below the mesh's), the
//! second finds the socket already added and leaves it.
//!
//! Ordering: a connection whose first message goes through TCP stays on TCP
//! (`path` of the record). Without that, a client that writes before the server
//! end is added (the server's handshake completes a few microseconds after the
//! client's) would send its first bytes through TCP and later ones around it, and
//! the later ones could be read first.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        BPF_TCP_CLOSE, sk_action::SK_PASS,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{EndpointKey, SockConn, SockKey, sock_path, sock_stat};

use crate::{
    active,
    ctx::read_ip6,
    maps::{REDIRECT_EXCLUDED, ROUTER_MARK, SOCK_CONN, SOCK_STATS, SOCKETS},
    outlier, scope, sockopt,
    stats::add,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Which sockops program runs: which sockets it may add.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Adds {
    /// Sockets of meshed pods (`MESH_SCOPE_V1`), on the mesh's cgroup.
    Meshed,
    /// The router's sockets (`ROUTER_MARK_V1`), on the agent's own cgroup.
    Router,
}

/// sockops: on both ends' "established", record the socket's connection under
/// its tuple and add it under its own key; when a socket of ours closes, delete
/// its record.
pub fn try_sockops(ctx: &SockOpsContext, adds: Adds) -> u32 {
    let op = ctx.op();
    let Some(key) = ops_key(ctx) else {
        return 1;
    };
    if adds == Adds::Meshed {
        outlier::count(ctx, op, &key);
        active::count(ctx, op, &key);
    }
    if op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
        sockopt::established(ctx);
    }
    let established =
        op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB || op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB;
    let closed = op == BPF_SOCK_OPS_STATE_CB && ctx.arg(1) == BPF_TCP_CLOSE;
    if !established && !closed {
        return 1;
    }
    // SAFETY: the helper accepts a sock_ops context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if closed {
        // Only the owner's close deletes a record (another sockops program on
        // the cgroup may ask for state changes of sockets we never added).
        if owns(key, cookie) {
            let _ = SOCK_CONN.remove(key);
        }
        return 1;
    }
    // SAFETY: the kernel hands a valid bpf_sock_ops.
    let ops = unsafe { &mut *ctx.ops };
    let ours = match adds {
        // The router's sockets are few and marked: others are not counted.
        Adds::Router => {
            if !router_socket(ops) {
                return 1;
            }
            true
        }
        // SAFETY: the helper accepts a sock_ops context. (The key's netns is 0
        // for some tuples; the scope needs the namespace itself.)
        Adds::Meshed => scope::meshed(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }),
    };
    // The other program added it already.
    if owns(key, cookie) {
        return 1;
    }
    if excluded(&key) {
        add(&SOCK_STATS, sock_stat::EXCLUDED, 1);
        return 1;
    }
    if !ours {
        add(&SOCK_STATS, sock_stat::NOT_MESHED, 1);
        return 1;
    }
    // With TCP Fast Open the client's first bytes rode in the SYN, through TCP:
    // later bytes must not overtake them.
    let sent_in_syn = op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && ops.data_segs_out > 0;
    // At the established callbacks (before any data) snd_una is this end's
    // ISN + 1 and rcv_nxt the peer's ISN + 1; the peer reads the same two, the
    // other way round.
    let conn = SockConn::new(
        ops.snd_una,
        ops.rcv_nxt,
        if sent_in_syn {
            sock_path::TCP
        } else {
            sock_path::UNDECIDED
        },
        cookie,
    );
    // BPF_NOEXIST: a tuple has one owner. Another live socket with this tuple
    // (overlapping pod IPs) keeps its record; this one keeps to TCP.
    if SOCK_CONN.insert(key, conn, u64::from(BPF_NOEXIST)).is_err() {
        add(&SOCK_STATS, sock_stat::ADD_FAILED, 1);
        return 1;
    }
    let mut conn_key = conn.key(key);
    if SOCKETS
        .update(&mut conn_key, &mut *ops, u64::from(BPF_NOEXIST))
        .is_err()
    {
        // The record is ours (just created): give the tuple back.
        let _ = SOCK_CONN.remove(key);
        add(&SOCK_STATS, sock_stat::ADD_FAILED, 1);
        return 1;
    }
    add(&SOCK_STATS, sock_stat::ADDED, 1);
    // Ask for state changes, to delete the record when this socket closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    1
}

/// Whether the socket `cookie` owns the record of its tuple `key`.
fn owns(key: SockKey, cookie: u64) -> bool {
    SOCK_CONN
        .get_ptr(key)
        // SAFETY: a live entry of a map value type we own; read only.
        .is_some_and(|conn| unsafe { (*conn).cookie } == cookie)
}

/// Whether the socket carries the router's mark (none configured: no socket).
fn router_socket(ops: &aya_ebpf::bindings::bpf_sock_ops) -> bool {
    let Some(&mark) = ROUTER_MARK.get(0) else {
        return false;
    };
    // SAFETY: `sk` is the kernel's socket pointer of this context (null for a
    // request socket); `mark` is a readable field of `bpf_sock`.
    let sk = unsafe { ops.__bindgen_anon_2.sk };
    mark != 0 && !sk.is_null() && unsafe { (*sk).mark } == mark
}

/// The socket's own key, from a sock_ops context.
fn ops_key(ctx: &SockOpsContext) -> Option<SockKey> {
    // SAFETY: the helper accepts a sock_ops context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // bpf_sock_ops gives the local port in host order and the remote port in network
    // order in the upper 16 bits; the key holds both in network order.
    let (local_port, remote_port) = (
        (ctx.local_port() as u16).to_be(),
        (ctx.remote_port() >> 16) as u16,
    );
    match ctx.family() {
        AF_INET => Some(SockKey::v4(
            ctx.local_ip4(),
            ctx.remote_ip4(),
            local_port,
            remote_port,
            netns,
        )),
        AF_INET6 => Some(SockKey::v6(
            ctx.local_ip6(),
            ctx.remote_ip6(),
            local_port,
            remote_port,
            netns,
        )),
        _ => None,
    }
}

/// Either end is an excluded endpoint. Namespace-local connections (loopback)
/// also match an excluded port whatever the address (the agent writes those as
/// address zero): a pod's own client of its splicing server must be left alone too.
fn excluded(key: &SockKey) -> bool {
    let (mut local, mut remote) = (key.local_endpoint(), key.remote_endpoint());
    // SAFETY: existence checks only.
    let hit = |e: &EndpointKey| unsafe { REDIRECT_EXCLUDED.get(e).is_some() };
    if hit(&local) || hit(&remote) {
        return true;
    }
    if key.netns == 0 {
        return false;
    }
    local.addr = [0; 4];
    remote.addr = [0; 4];
    hit(&local) || hit(&remote)
}

/// sk_msg: redirect to the peer when it is a local mesh socket, else let TCP carry
/// the message. Never drops: the answer is always `SK_PASS`.
///
/// Only a "TCP" decision is stored: a connection whose first message found no
/// peer keeps to TCP for good. One whose first message was redirected needs no
/// mark: later messages redirect again, or fall back once the peer has closed.
/// The peer key comes from the socket's own record; a socket without one (not
/// possible while it is in `SOCKETS_V2`) is never redirected.
pub fn try_sk_msg(ctx: &SkMsgContext) -> u32 {
    let size = u64::from(ctx.size());
    let redirected = msg_key(ctx).is_some_and(|key| redirect(ctx, key));
    if redirected {
        add(&SOCK_STATS, sock_stat::REDIRECTED_MSGS, 1);
        add(&SOCK_STATS, sock_stat::REDIRECTED_BYTES, size);
    } else {
        add(&SOCK_STATS, sock_stat::FALLBACK_MSGS, 1);
        add(&SOCK_STATS, sock_stat::FALLBACK_BYTES, size);
    }
    SK_PASS
}

/// Redirects the message to the peer of the socket whose tuple is `key`, if that
/// peer is in `SOCKETS_V2`; else marks the socket TCP for good.
fn redirect(ctx: &SkMsgContext, key: SockKey) -> bool {
    let Some(conn) = SOCK_CONN.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: a live entry of this socket's own record; only this socket (under
    // its lock, here) writes `path` and only its close deletes the record.
    let conn = unsafe { &mut *conn };
    if conn.path == sock_path::TCP {
        return false;
    }
    let mut peer = conn.key(key).peer();
    let redirected =
        SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS);
    if !redirected {
        conn.path = sock_path::TCP;
    } else if conn.path == sock_path::UNDECIDED {
        // The first message joined: tell the peer's record once (outlier
        // detection must not read its TCP byte counts as all it received).
        conn.path = sock_path::JOINED;
        if let Some(theirs) = SOCK_CONN.get_ptr_mut(peer.sock) {
            // SAFETY: a live entry; only this word is written, by this socket.
            unsafe { core::ptr::write_volatile(&raw mut (*theirs).received, 1) };
        }
    }
    redirected
}

/// The sending socket's own key, built exactly as `sockops` built it.
fn msg_key(ctx: &SkMsgContext) -> Option<SockKey> {
    let md = ctx.msg;
    // SAFETY: the kernel hands a valid sk_msg_md; 4-byte context loads.
    let (family, local_port, remote_port) = unsafe {
        (
            core::ptr::read_volatile(&(*md).family),
            core::ptr::read_volatile(&(*md).local_port),
            core::ptr::read_volatile(&(*md).remote_port),
        )
    };
    // SAFETY: the helper accepts an sk_msg context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let (local_port, remote_port) = ((local_port as u16).to_be(), (remote_port >> 16) as u16);
    // SAFETY: as above.
    unsafe {
        match family {
            AF_INET => Some(SockKey::v4(
                core::ptr::read_volatile(&(*md).local_ip4),
                core::ptr::read_volatile(&(*md).remote_ip4),
                local_port,
                remote_port,
                netns,
            )),
            AF_INET6 => Some(SockKey::v6(
                read_ip6(&raw const (*md).local_ip6),
                read_ip6(&raw const (*md).remote_ip6),
                local_port,
                remote_port,
                netns,
            )),
            _ => None,
        }
    }
}
