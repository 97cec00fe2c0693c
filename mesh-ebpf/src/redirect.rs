//! Same-node shortcut: `sockops` adds each established mesh TCP socket to
//! `SOCKETS_V1`; `sk_msg` (attached to that map, so it runs on every `sendmsg` of
//! those sockets) hands the message straight to the peer socket's receive queue
//! when the peer is a local mesh socket too, skipping TCP/IP both ways.
//!
//! Ordering: a connection's first message decides its path for good
//! (`SOCK_PATH_V1`). Without that, a client that writes before the server end is
//! added (the server's handshake completes a few microseconds after the client's)
//! would send its first bytes through TCP and later ones around it, and the later
//! ones could be read first.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_ANY, BPF_F_INGRESS, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, sk_action::SK_PASS,
    },
    helpers::bpf_get_netns_cookie,
    programs::{SkMsgContext, SockOpsContext},
};
use mesh_common::{SockKey, sock_path, sock_stat};

use crate::{
    maps::{REDIRECT_EXCLUDED, SOCK_PATH, SOCK_STATS, SOCKETS},
    stats::add,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// sockops: on both ends' "established", add the socket under its own key.
pub fn try_sockops(ctx: &SockOpsContext) -> u32 {
    let op = ctx.op();
    if op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB {
        return 1;
    }
    // SAFETY: the helper accepts a sock_ops context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // bpf_sock_ops gives the local port in host order and the remote port in network
    // order in the upper 16 bits; the key holds both in network order.
    let (local_port, remote_port) = (
        (ctx.local_port() as u16).to_be(),
        (ctx.remote_port() >> 16) as u16,
    );
    let mut key = match ctx.family() {
        AF_INET => SockKey::v4(
            ctx.local_ip4(),
            ctx.remote_ip4(),
            local_port,
            remote_port,
            netns,
        ),
        AF_INET6 => SockKey::v6(
            ctx.local_ip6(),
            ctx.remote_ip6(),
            local_port,
            remote_port,
            netns,
        ),
        _ => return 1,
    };
    // SAFETY: existence checks only.
    if unsafe {
        REDIRECT_EXCLUDED.get(key.local_endpoint()).is_some()
            || REDIRECT_EXCLUDED.get(key.remote_endpoint()).is_some()
    } {
        add(&SOCK_STATS, sock_stat::EXCLUDED, 1);
        return 1;
    }
    // A key is reused only after its previous socket is gone: forget that one's path.
    let _ = SOCK_PATH.remove(key);
    // SAFETY: the kernel hands a valid bpf_sock_ops.
    let ops = unsafe { &mut *ctx.ops };
    // BPF_NOEXIST: never displace a live socket that has the same key; this one
    // simply keeps to TCP.
    match SOCKETS.update(&mut key, ops, u64::from(BPF_NOEXIST)) {
        Ok(()) => add(&SOCK_STATS, sock_stat::ADDED, 1),
        Err(_) => add(&SOCK_STATS, sock_stat::ADD_FAILED, 1),
    }
    1
}

/// sk_msg: redirect to the peer when it is a local mesh socket, else let TCP carry
/// the message. Never drops: the answer is always `SK_PASS`.
pub fn try_sk_msg(ctx: &SkMsgContext) -> u32 {
    let pass = SK_PASS;
    let Some(key) = msg_key(ctx) else {
        return pass;
    };
    let size = u64::from(ctx.size());
    // SAFETY: value copied at once.
    let decided = unsafe { SOCK_PATH.get(key) }.copied();
    if decided == Some(sock_path::TCP) {
        add(&SOCK_STATS, sock_stat::FALLBACK_MSGS, 1);
        add(&SOCK_STATS, sock_stat::FALLBACK_BYTES, size);
        return pass;
    }
    let mut peer = key.peer();
    let redirected =
        SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS);
    if decided.is_none() {
        let path = if redirected {
            sock_path::REDIRECT
        } else {
            sock_path::TCP
        };
        let _ = SOCK_PATH.insert(key, path, u64::from(BPF_ANY));
    }
    if redirected {
        add(&SOCK_STATS, sock_stat::REDIRECTED_MSGS, 1);
        add(&SOCK_STATS, sock_stat::REDIRECTED_BYTES, size);
    } else {
        // Decided "redirect" earlier and the peer is gone now (it closed): TCP
        // carries the rest, and answers as a closed peer does.
        add(&SOCK_STATS, sock_stat::FALLBACK_MSGS, 1);
        add(&SOCK_STATS, sock_stat::FALLBACK_BYTES, size);
    }
    pass
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
                read6(&(*md).local_ip6),
                read6(&(*md).remote_ip6),
                local_port,
                remote_port,
                netns,
            )),
            _ => None,
        }
    }
}

/// Context fields must be read one 4-byte word at a time.
#[inline(always)]
fn read6(words: &[u32; 4]) -> [u32; 4] {
    // SAFETY: reads of a context field the caller holds.
    unsafe {
        [
            core::ptr::read_volatile(&words[0]),
            core::ptr::read_volatile(&words[1]),
            core::ptr::read_volatile(&words[2]),
            core::ptr::read_volatile(&words[3]),
        ]
    }
}
