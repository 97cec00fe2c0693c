//! The gateway for clients outside the node, per packet in tc: a client's TCP
//! packets to (node address, gateway port) are translated to a backend chosen by
//! weighted Maglev on the flow's first SYN and kept by a conntrack entry
//! (`GATEWAY_CT_V1`); the backend's replies leaving by the same device get their
//! source translated back, so the client sees answers from what it dialled.
//!
//! - **Conntrack**: an LRU of 262144 entries (`MAX_GATEWAY_CT`), two per flow
//!   (forward: client -> backend; reply: backend -> client), three for a
//!   remote backend (plus the SNAT reply). An entry is over after 6 h idle, or
//!   10 s after FINs both ways or an RST (`GatewayNat::expired`); a SYN on a
//!   closing flow is a new connection and picks again. A packet of a flow
//!   whose entry is gone (evicted, or a map replaced) picks again too: the
//!   Maglev table gives it the same backend (unless the weights changed
//!   since), so an established flow to a local backend survives a conntrack
//!   miss; counted (`NO_FLOW`). A FIN or RST without an entry passes untouched.
//! - **Local backends** (directly connected: this node's pods): destination
//!   translated, then the kernel forwards (IP forwarding must be on).
//! - **Remote backends** (the route to them has a gateway, per
//!   `bpf_fib_lookup`): the source is also translated, to the node's address
//!   towards them and a port of 61000..=65535 (`SNAT_PORT_MIN`), and the packet
//!   leaves by `bpf_redirect_neigh`; their replies, arriving on a gateway
//!   device to that port, get the client back as destination, and the client's
//!   device's egress restores the gateway address as source. A port is taken
//!   again once its flow is over, so one (node address, backend) pair carries
//!   at most 4536 flows that are open or closed less than 10 s ago.
//! - Left alone: IPv4 fragments, IPv6 with extension headers, non-TCP.
//!
//! Both programs return `TC_ACT_UNSPEC` (TCX "next") for what they leave alone
//! and after a rewrite, so that programs attached after them still run; they
//! drop only a SYN whose table slot held no backend of its family, or whose
//! rewrite failed. An address with no table (`slot_count` 0: no backend, or
//! draining after its port stopped being served) lets a SYN through to the
//! node's stack, which refuses it; its flows in progress keep their entries.

use aya_ebpf::{
    EbpfContext as _,
    bindings::{
        BPF_F_PSEUDO_HDR, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_FIB_LOOKUP_SRC, BPF_NOEXIST,
        TC_ACT_UNSPEC, bpf_fib_lookup as FibLookup,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_ns, bpf_redirect_neigh},
    programs::TcContext,
};
use mesh_common::{
    Backend, CT_FIN_BACKEND, CT_FIN_CLIENT, CT_RST, FAMILY_V4, FAMILY_V6, FLOW_FORWARD, FLOW_REPLY,
    FLOW_SNAT_REPLY, GATEWAY_CT_TOUCH_NS, GatewayFlow, GatewayNat, GatewayVip, MaglevKey,
    PROTO_TCP, SNAT_PORT_MIN, SNAT_PORTS, ServiceKey, gateway_stat,
};

use crate::{
    maps::{GATEWAY_CT, GATEWAY_STATS, GATEWAY_VIPS, MAGLEV, SCRATCH},
    stats,
};

/// `TC_ACT_SHOT` (drop), as the programs return it.
const TC_ACT_SHOT: i32 = 2;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// Tries at a free SNAT port per new remote flow.
const SNAT_TRIES: u16 = 8;
const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// Offsets in the IPv4 header.
const IP4_FRAG: usize = 6;
const IP4_PROTO: usize = 9;
const IP4_CSUM: usize = 10;
const IP4_SADDR: usize = 12;
const IP4_DADDR: usize = 16;
/// Offsets in the IPv6 header (no extension headers: anything else is left alone).
const IP6_NEXT: usize = 6;
const IP6_SADDR: usize = 8;
const IP6_DADDR: usize = 24;
const IP6_HLEN: usize = 40;
/// Offsets in the TCP header.
const TCP_SPORT: usize = 0;
const TCP_DPORT: usize = 2;
const TCP_FLAGS: usize = 13;
const TCP_CSUM: usize = 16;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// A parsed TCP packet: addresses and ports as they are on the wire.
struct Packet {
    family: u8,
    saddr: [u32; 4],
    daddr: [u32; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    /// Offset of the IP header's source address; the destination follows at
    /// +4 (IPv4) or +16 (IPv6).
    l3: usize,
    /// Offset of the TCP header.
    l4: usize,
}

/// The TCP packet in `ctx`, if it is one we may translate (IPv4 unfragmented,
/// or IPv6 with TCP as the first next header).
#[inline(always)]
fn parse(ctx: &TcContext) -> Option<Packet> {
    let proto = u16::from_be(ctx.load::<u16>(12).ok()?);
    if proto == ETH_P_IP {
        let ver_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
        let ihl = ((ver_ihl & 0x0f) as usize) * 4;
        if ver_ihl >> 4 != 4 || !(20..=60).contains(&ihl) {
            return None;
        }
        let l4proto: u8 = ctx.load(ETH_HLEN + IP4_PROTO).ok()?;
        let frag = u16::from_be(ctx.load::<u16>(ETH_HLEN + IP4_FRAG).ok()?);
        if l4proto != PROTO_TCP || frag & 0x3fff != 0 {
            return None;
        }
        let l4 = ETH_HLEN + ihl;
        Some(Packet {
            family: FAMILY_V4,
            saddr: [ctx.load(ETH_HLEN + IP4_SADDR).ok()?, 0, 0, 0],
            daddr: [ctx.load(ETH_HLEN + IP4_DADDR).ok()?, 0, 0, 0],
            sport: ctx.load(l4 + TCP_SPORT).ok()?,
            dport: ctx.load(l4 + TCP_DPORT).ok()?,
            flags: ctx.load(l4 + TCP_FLAGS).ok()?,
            l3: ETH_HLEN + IP4_SADDR,
            l4,
        })
    } else if proto == ETH_P_IPV6 {
        let next: u8 = ctx.load(ETH_HLEN + IP6_NEXT).ok()?;
        if next != PROTO_TCP {
            return None;
        }
        let l4 = ETH_HLEN + IP6_HLEN;
        Some(Packet {
            family: FAMILY_V6,
            saddr: ctx.load(ETH_HLEN + IP6_SADDR).ok()?,
            daddr: ctx.load(ETH_HLEN + IP6_DADDR).ok()?,
            sport: ctx.load(l4 + TCP_SPORT).ok()?,
            dport: ctx.load(l4 + TCP_DPORT).ok()?,
            flags: ctx.load(l4 + TCP_FLAGS).ok()?,
            l3: ETH_HLEN + IP6_SADDR,
            l4,
        })
    } else {
        None
    }
}

/// murmur3's 32-bit finaliser over the flow's words: the flow hash that picks
/// a Maglev slot. Any fixed mix will do: the table, not the hash, is shared
/// across nodes and restarts; this only has to spread flows evenly.
#[inline(always)]
fn flow_hash(p: &Packet) -> u32 {
    let mut h: u32 = 0x9747_b28c;
    let mut i = 0;
    while i < 4 {
        h = mix(h, p.saddr[i]);
        h = mix(h, p.daddr[i]);
        i += 1;
    }
    h = mix(h, ((p.sport as u32) << 16) | p.dport as u32);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

/// Rewrites one address of the packet (`at`: its offset) with the checksums
/// that cover it: IPv4's header checksum, and TCP's pseudo-header sum.
#[inline(always)]
fn rewrite_addr(ctx: &TcContext, p: &Packet, at: usize, old: &[u32; 4], new: &[u32; 4]) -> bool {
    let l4_csum = p.l4 + TCP_CSUM;
    let pseudo = BPF_F_PSEUDO_HDR as u64 | 4;
    if p.family == FAMILY_V4 {
        ctx.l4_csum_replace(l4_csum, old[0] as u64, new[0] as u64, pseudo)
            .is_ok()
            && ctx
                .l3_csum_replace(ETH_HLEN + IP4_CSUM, old[0] as u64, new[0] as u64, 4)
                .is_ok()
            && ctx.store(at, &new[0], 0).is_ok()
    } else {
        let mut i = 0;
        while i < 4 {
            if ctx
                .l4_csum_replace(l4_csum, old[i] as u64, new[i] as u64, pseudo)
                .is_err()
            {
                return false;
            }
            i += 1;
        }
        ctx.store(at, new, 0).is_ok()
    }
}

/// Rewrites one TCP port (`at`: its offset in the TCP header) and the checksum.
#[inline(always)]
fn rewrite_port(ctx: &TcContext, p: &Packet, at: usize, old: u16, new: u16) -> bool {
    ctx.l4_csum_replace(p.l4 + TCP_CSUM, old as u64, new as u64, 2)
        .is_ok()
        && ctx.store(p.l4 + at, &new, 0).is_ok()
}

/// tc ingress of a gateway device: a client's packet to a gateway address.
#[inline(always)]
pub fn try_gateway_ingress(ctx: &TcContext) -> i32 {
    let Some(p) = parse(ctx) else {
        return TC_ACT_UNSPEC;
    };
    let vip_key = ServiceKey {
        addr: p.daddr,
        port: p.dport,
        proto: PROTO_TCP,
        family: p.family,
    };
    // SAFETY: a hash map value, read by copy; the agent replaces values whole.
    let Some(vip) = (unsafe { GATEWAY_VIPS.get(vip_key) }).copied() else {
        if u16::from_be(p.dport) >= SNAT_PORT_MIN {
            return snat_reply(ctx, &p);
        }
        return TC_ACT_UNSPEC;
    };
    let fwd = tuple(&p, FLOW_FORWARD);
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let syn = p.flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    let closing = if p.flags & TCP_RST != 0 {
        CT_RST
    } else if p.flags & TCP_FIN != 0 {
        CT_FIN_CLIENT
    } else {
        0
    };
    let mut to: *const GatewayNat = core::ptr::null();
    if let Some(entry) = GATEWAY_CT.get_ptr_mut(fwd) {
        // SAFETY: a value of the LRU map, valid for this run; racing writers
        // only set flag bits and timestamps, which are advisory.
        let e = unsafe { &mut *entry };
        // A SYN on a flow that was closing is a new connection reusing the
        // tuple: it gets a fresh choice.
        let reused = syn && e.flags != 0;
        if !reused && !e.expired(now) {
            if closing != 0 {
                e.flags |= closing;
            }
            if now.saturating_sub(e.last_seen_ns) > GATEWAY_CT_TOUCH_NS {
                e.last_seen_ns = now;
            }
            to = entry;
        }
    }
    if to.is_null() {
        if !syn {
            // A flow without its entry (evicted from the LRU, or the map
            // replaced): Maglev gives the same backend for the same flow, so
            // it is picked again, as Katran does; a flow to a remote backend
            // lost its SNAT port and cannot be resumed. A closing packet is
            // let through (nothing to resume).
            stats::add(&GATEWAY_STATS, gateway_stat::NO_FLOW, 1);
            if closing != 0 {
                return TC_ACT_UNSPEC;
            }
        }
        to = match new_flow(ctx, &p, &fwd, &vip) {
            Ok(nat) => nat,
            Err(verdict) => return verdict,
        };
    }
    // SAFETY: the flow's conntrack value or this CPU's scratch copy of it,
    // both valid for this run.
    let nat = unsafe { &*to };
    let dst = if p.family == FAMILY_V4 {
        p.l3 + 4
    } else {
        p.l3 + 16
    };
    if !rewrite_port(ctx, &p, TCP_DPORT, p.dport, nat.port)
        || !rewrite_addr(ctx, &p, dst, &p.daddr, &nat.addr)
    {
        stats::add(&GATEWAY_STATS, gateway_stat::REWRITE_FAILED, 1);
        return TC_ACT_SHOT;
    }
    stats::add(&GATEWAY_STATS, gateway_stat::FORWARDED, 1);
    if nat.ifindex == 0 {
        return TC_ACT_UNSPEC;
    }
    // Remote backend: the source too, then straight out of the device
    // towards it (the stack would drop a packet arriving with one of the
    // node's own addresses as its source).
    if !rewrite_port(ctx, &p, TCP_SPORT, p.sport, nat.snat_port)
        || !rewrite_addr(ctx, &p, p.l3, &p.saddr, &nat.snat_addr)
    {
        stats::add(&GATEWAY_STATS, gateway_stat::REWRITE_FAILED, 1);
        return TC_ACT_SHOT;
    }
    // SAFETY: no parameters: the kernel looks the neighbour up itself.
    unsafe { bpf_redirect_neigh(nat.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// The route to `backend` if it is on another node (reached through a
/// gateway): the node's source address towards it and the device; `None` for
/// a directly connected backend (this node's pods) or no route.
#[inline(always)]
fn remote_route(ctx: &TcContext, p: &Packet, backend: &Backend) -> Option<([u32; 4], u32)> {
    // The lookup's 64 bytes live in a per-CPU scratch value, not on the
    // 512-byte stack.
    let params = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch value, valid for this run; nothing else
    // runs on this CPU meanwhile. All-zero is a valid `bpf_fib_lookup`.
    let params: &mut FibLookup = unsafe {
        core::ptr::write_bytes(params, 0, 1);
        &mut (*params).fib
    };
    params.family = if p.family == FAMILY_V4 {
        AF_INET
    } else {
        AF_INET6
    };
    params.l4_protocol = PROTO_TCP;
    params.sport = p.sport;
    params.dport = backend.port;
    // SAFETY: the context's `__sk_buff`, valid for this run.
    params.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    if p.family == FAMILY_V4 {
        params.__bindgen_anon_4.ipv4_dst = backend.addr[0];
    } else {
        params.__bindgen_anon_4.ipv6_dst = backend.addr;
    }
    // SAFETY: `params` is a valid, writable `bpf_fib_lookup` of the size given.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.as_ptr(),
            params,
            core::mem::size_of::<FibLookup>() as i32,
            BPF_FIB_LOOKUP_SRC | BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: union fields of plain integers, written by the helper.
    let (nexthop, src) = unsafe {
        if p.family == FAMILY_V4 {
            (
                [params.__bindgen_anon_4.ipv4_dst, 0, 0, 0],
                [params.__bindgen_anon_3.ipv4_src, 0, 0, 0],
            )
        } else {
            (
                params.__bindgen_anon_4.ipv6_dst,
                params.__bindgen_anon_3.ipv6_src,
            )
        }
    };
    (nexthop != backend.addr).then_some((src, params.ifindex))
}

/// A free SNAT port for a new flow from the client to `backend` seen from
/// `src`: its [`FLOW_SNAT_REPLY`] entry (backend -> node) is created here.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the value is passed by pointer into the scratch map: a copy would take the 512-byte stack"
)]
fn snat_port(p: &Packet, backend: &Backend, src: &[u32; 4], now: u64) -> Option<u16> {
    let scratch = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: this CPU's scratch value, valid for this run (see `remote_route`).
    let client: &mut GatewayNat = unsafe {
        core::ptr::write_bytes(&mut (*scratch).nat, 0, 1);
        &mut (*scratch).nat
    };
    client.addr = p.saddr;
    client.port = p.sport;
    client.family = p.family;
    // What the client dialled: finds the flow's forward entry (`snat_stale`).
    client.snat_addr = p.daddr;
    client.snat_port = p.dport;
    let h = flow_hash(p);
    let mut i: u16 = 0;
    while i < SNAT_TRIES {
        let port = (SNAT_PORT_MIN + ((h as u16).wrapping_add(i) % SNAT_PORTS)).to_be();
        let key = GatewayFlow {
            a: backend.addr,
            b: *src,
            a_port: backend.port,
            b_port: port,
            family: p.family,
            proto: PROTO_TCP,
            dir: FLOW_SNAT_REPLY,
            _pad: 0,
        };
        if GATEWAY_CT.insert(key, &*client, BPF_NOEXIST as u64).is_ok() {
            return Some(port);
        }
        // Taken: by a flow that is over (its forward entry expired, gone, or
        // now using another port), the port is free again.
        if snat_stale(&key, src, port, now) && GATEWAY_CT.insert(key, &*client, 0).is_ok() {
            return Some(port);
        }
        i += 1;
    }
    None
}

/// Whether the SNAT port of `key` belongs to no live flow any more.
#[inline(always)]
fn snat_stale(key: &GatewayFlow, src: &[u32; 4], port: u16, now: u64) -> bool {
    // SAFETY: a value of the LRU map, read by copy.
    let Some(old) = (unsafe { GATEWAY_CT.get(key) }).copied() else {
        return true;
    };
    let fwd = GatewayFlow {
        a: old.addr,
        b: old.snat_addr,
        a_port: old.port,
        b_port: old.snat_port,
        family: key.family,
        proto: PROTO_TCP,
        dir: FLOW_FORWARD,
        _pad: 0,
    };
    // SAFETY: a value of the LRU map, read by copy.
    match unsafe { GATEWAY_CT.get(fwd) } {
        None => true,
        Some(f) => f.expired(now) || f.snat_port != port || f.snat_addr != *src,
    }
}

/// The packet's own tuple (source as `a`), as a conntrack key of `dir`.
#[inline(always)]
fn tuple(p: &Packet, dir: u8) -> GatewayFlow {
    GatewayFlow {
        a: p.saddr,
        b: p.daddr,
        a_port: p.sport,
        b_port: p.dport,
        family: p.family,
        proto: PROTO_TCP,
        dir,
        _pad: 0,
    }
}

/// A remote backend's reply to the node's SNAT address: its destination goes
/// back to the client; the stack forwards it, and the egress of the client's
/// device restores the gateway address as its source.
#[inline(always)]
fn snat_reply(ctx: &TcContext, p: &Packet) -> i32 {
    let key = tuple(p, FLOW_SNAT_REPLY);
    // SAFETY: a value of the LRU map, read by copy.
    let Some(client) = (unsafe { GATEWAY_CT.get(key) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    let dst = if p.family == FAMILY_V4 {
        p.l3 + 4
    } else {
        p.l3 + 16
    };
    if !rewrite_port(ctx, p, TCP_DPORT, p.dport, client.port)
        || !rewrite_addr(ctx, p, dst, &p.daddr, &client.addr)
    {
        stats::add(&GATEWAY_STATS, gateway_stat::REWRITE_FAILED, 1);
        return TC_ACT_SHOT;
    }
    stats::add(&GATEWAY_STATS, gateway_stat::SNAT_REPLIED, 1);
    TC_ACT_UNSPEC
}

/// A SYN without a flow: the backend of its Maglev slot, the conntrack
/// entries of the new flow (forward, reply, and for a backend on another node
/// the SNAT reply), and what to rewrite.
#[inline(always)]
#[expect(
    clippy::needless_borrows_for_generic_args,
    reason = "the value is passed by pointer into the scratch map: a copy would take the 512-byte stack"
)]
fn new_flow(
    ctx: &TcContext,
    p: &Packet,
    fwd: &GatewayFlow,
    vip: &GatewayVip,
) -> Result<*const GatewayNat, i32> {
    // No table: an address draining (its port no longer served), or no
    // backend at all. The node's stack answers the SYN (nothing listens: an
    // RST, so the client fails at once); flows in progress kept theirs.
    if vip.slot_count == 0 {
        stats::add(&GATEWAY_STATS, gateway_stat::NO_BACKEND, 1);
        return Err(TC_ACT_UNSPEC);
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(backend) = pick(p, vip.table_id, vip.slot_count) else {
        stats::add(&GATEWAY_STATS, gateway_stat::NO_BACKEND, 1);
        return Err(TC_ACT_SHOT);
    };
    // A backend on another node: its replies must come back here, so the
    // client's address is replaced by the node's.
    let mut snat = ([0u32; 4], 0u16, 0u32);
    if let Some((src, ifindex)) = remote_route(ctx, p, &backend) {
        let Some(port) = snat_port(p, &backend, &src, now) else {
            stats::add(&GATEWAY_STATS, gateway_stat::SNAT_FAILED, 1);
            return Err(TC_ACT_SHOT);
        };
        snat = (src, port, ifindex);
        stats::add(&GATEWAY_STATS, gateway_stat::SNAT_FLOWS, 1);
    }
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return Err(TC_ACT_SHOT);
    };
    // SAFETY: this CPU's scratch value, valid for this run (see
    // `remote_route`); all-zero is a valid `GatewayNat`.
    let (nat, back) = unsafe {
        core::ptr::write_bytes(&mut (*scratch).fwd, 0, 1);
        core::ptr::write_bytes(&mut (*scratch).back, 0, 1);
        (&mut (*scratch).fwd, &mut (*scratch).back)
    };
    nat.addr = backend.addr;
    nat.port = backend.port;
    nat.family = p.family;
    nat.last_seen_ns = now;
    nat.backend_id = backend.backend_id;
    nat.snat_addr = snat.0;
    nat.snat_port = snat.1;
    nat.ifindex = snat.2;
    back.addr = p.daddr;
    back.port = p.dport;
    back.family = p.family;
    back.last_seen_ns = now;
    let reply = GatewayFlow {
        a: backend.addr,
        b: p.saddr,
        a_port: backend.port,
        b_port: p.sport,
        family: p.family,
        proto: PROTO_TCP,
        dir: FLOW_REPLY,
        _pad: 0,
    };
    // Reply entry first: the backend answers only after the SYN.
    if GATEWAY_CT.insert(reply, &*back, 0).is_err() || GATEWAY_CT.insert(*fwd, &*nat, 0).is_err() {
        stats::add(&GATEWAY_STATS, gateway_stat::REWRITE_FAILED, 1);
        return Err(TC_ACT_SHOT);
    }
    stats::add(&GATEWAY_STATS, gateway_stat::NEW_FLOWS, 1);
    Ok(nat)
}

/// The backend of the flow's Maglev slot, of the packet's family.
#[inline(always)]
fn pick(p: &Packet, table_id: u32, slot_count: u32) -> Option<Backend> {
    if slot_count == 0 {
        return None;
    }
    let key = MaglevKey {
        table_id,
        slot: flow_hash(p) % slot_count,
    };
    // SAFETY: a hash map value, read by copy.
    let backend = unsafe { MAGLEV.get(key) }.copied()?;
    (backend.family == p.family).then_some(backend)
}

/// tc egress of a gateway device: a backend's reply to a client of the gateway.
#[inline(always)]
pub fn try_gateway_egress(ctx: &TcContext) -> i32 {
    let Some(p) = parse(ctx) else {
        return TC_ACT_UNSPEC;
    };
    let reply = tuple(&p, FLOW_REPLY);
    // SAFETY: a value of the LRU map, read by copy.
    let Some(back) = (unsafe { GATEWAY_CT.get(reply) }).copied() else {
        return TC_ACT_UNSPEC;
    };
    if p.flags & (TCP_FIN | TCP_RST) != 0 {
        let fwd = GatewayFlow {
            a: p.daddr,
            b: back.addr,
            a_port: p.dport,
            b_port: back.port,
            family: p.family,
            proto: PROTO_TCP,
            dir: FLOW_FORWARD,
            _pad: 0,
        };
        if let Some(entry) = GATEWAY_CT.get_ptr_mut(fwd) {
            let bit = if p.flags & TCP_RST != 0 {
                CT_RST
            } else {
                CT_FIN_BACKEND
            };
            // SAFETY: a value of the LRU map, valid for this run; flag bits
            // are advisory.
            unsafe { (*entry).flags |= bit };
        }
    }
    if !rewrite_port(ctx, &p, TCP_SPORT, p.sport, back.port)
        || !rewrite_addr(ctx, &p, p.l3, &p.saddr, &back.addr)
    {
        stats::add(&GATEWAY_STATS, gateway_stat::REWRITE_FAILED, 1);
        return TC_ACT_SHOT;
    }
    stats::add(&GATEWAY_STATS, gateway_stat::REPLIED, 1);
    TC_ACT_UNSPEC
}
