//! getpeername4/6: the application sees the VIP:port it dialled, not the backend.

use aya_ebpf::{EbpfContext as _, helpers::bpf_get_socket_cookie, programs::SockAddrContext};
use mesh_common::{FAMILY_V4, FAMILY_V6, global_stat};

use crate::{ctx::write_ip6, maps::REVNAT, stats::bump};

/// getpeername hooks cannot fail the syscall; 1 is the only valid answer.
const OK: i32 = 1;

pub fn try_getpeername4(ctx: &SockAddrContext) -> i32 {
    // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: LRU value copied at once.
    if let Some(orig) = unsafe { REVNAT.get(cookie) }.copied()
        && orig.family == FAMILY_V4
    {
        let sa = ctx.sock_addr;
        // SAFETY: user_ip4/user_port are writable in getpeername4.
        unsafe {
            core::ptr::write_volatile(&mut (*sa).user_ip4, orig.addr[0]);
            core::ptr::write_volatile(&mut (*sa).user_port, u32::from(orig.port));
        }
        bump(global_stat::PEER_REWRITTEN);
        #[cfg(feature = "upgrade-test")]
        bump(global_stat::PEER_REWRITTEN_BY_VARIANT);
    }
    OK
}

pub fn try_getpeername6(ctx: &SockAddrContext) -> i32 {
    // SAFETY: as above.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: as above.
    if let Some(orig) = unsafe { REVNAT.get(cookie) }.copied()
        && orig.family == FAMILY_V6
    {
        let sa = ctx.sock_addr;
        // SAFETY: valid context; user_ip6 and user_port are writable in getpeername6.
        unsafe {
            write_ip6(&raw mut (*sa).user_ip6, &orig.addr);
            core::ptr::write_volatile(&mut (*sa).user_port, u32::from(orig.port));
        }
        bump(global_stat::PEER_REWRITTEN);
    }
    OK
}
