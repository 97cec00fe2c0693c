//! Kernel programs of the mesh data plane.
//!
//! Entry points are thin: each calls a `try_*` function in the module that owns the
//! logic. The agent (`mesh-agent`) is the only writer of the maps in [`maps`] except
//! where a map's doc says otherwise.
#![no_std]
#![no_main]

mod active;
mod connect;
mod ctx;
mod ingress;
mod maps;
mod outlier;
mod peer;
mod redirect;
mod scope;
mod sockopt;
mod stats;

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier, sk_msg, sock_ops},
    programs::{SkMsgContext, SockAddrContext, SockOpsContext, TcContext},
};

/// `connect()` of an IPv4 socket (TCP or UDP) in the attached cgroup.
#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    connect::try_connect4(&ctx, connect::Hook::Mesh)
}

/// `connect()` of an IPv6 socket, including IPv4-mapped destinations of dual-stack
/// sockets.
#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    connect::try_connect6(&ctx, connect::Hook::Mesh)
}

/// `connect()` of an IPv4 socket below the gateway's cgroup (the node's
/// processes): gateway ports on the node's addresses.
#[cgroup_sock_addr(connect4)]
pub fn mesh_gateway_connect4(ctx: SockAddrContext) -> i32 {
    connect::try_connect4(&ctx, connect::Hook::Gateway)
}

/// `connect()` of an IPv6 socket below the gateway's cgroup.
#[cgroup_sock_addr(connect6)]
pub fn mesh_gateway_connect6(ctx: SockAddrContext) -> i32 {
    connect::try_connect6(&ctx, connect::Hook::Gateway)
}

/// `getpeername()` of an IPv4 socket: answer with the VIP the application dialled.
#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    peer::try_getpeername4(&ctx)
}

/// `getpeername()` of an IPv6 socket.
#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    peer::try_getpeername6(&ctx)
}

/// TCP socket events in the attached cgroup: adds established sockets to the
/// same-node socket map. (Named apart from its section: `fn sockops` fails to link.)
#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    redirect::try_sockops(&ctx, redirect::Adds::Meshed)
}

/// TCP socket events in the agent's own cgroup: adds the gateway router's
/// sockets to backends (marked), so the router and a backend on this node are
/// joined by the same-node shortcut.
#[sock_ops]
pub fn mesh_router_sockops(ctx: SockOpsContext) -> u32 {
    redirect::try_sockops(&ctx, redirect::Adds::Router)
}

/// Every message sent on a socket of the same-node socket map.
#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    redirect::try_sk_msg(&ctx)
}

/// tc ingress of a gateway device: clients outside the node dialling a
/// gateway port of a node address are translated to a Maglev-chosen backend.
#[classifier]
pub fn mesh_gateway_ingress(ctx: TcContext) -> i32 {
    ingress::try_gateway_ingress(&ctx)
}

/// tc egress of a gateway device: the backends' replies to those clients are
/// translated back to the gateway address.
#[classifier]
pub fn mesh_gateway_egress(ctx: TcContext) -> i32 {
    ingress::try_gateway_egress(&ctx)
}

// Only on the BPF target: host checks (clippy) link std, which has its own.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
