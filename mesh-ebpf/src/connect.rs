//! connect4/connect6: rewrite a connect to a service VIP:port into one to a backend
//! drawn by weight from the service's slot table.

use aya_ebpf::{
    EbpfContext as _,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_prandom_u32,
        bpf_get_socket_cookie, bpf_ktime_get_ns, bpf_set_retval,
    },
    programs::SockAddrContext,
};
use mesh_common::{
    Affinity, AffinityKey, AffinityMatch, Backend, EndpointKey, FAMILY_DESTINATION, FAMILY_NONE,
    FAMILY_V4, FAMILY_V6, OrigDst, PROTO_TCP, SERVICE_FLAG_AFFINITY, SERVICE_FLAG_DESTINATIONS,
    SERVICE_FLAG_GATEWAY, SERVICE_FLAG_HASH_CLIENT, SERVICE_FLAG_LEAST_REQUEST,
    SERVICE_FLAG_SOCKOPTS, ServiceKey, ServiceValue, SlotKey, SocketPolicy, V4_MAPPED_WORD,
    destination_key, fmix64, global_stat, is_v4_mapped,
};

use crate::{
    active,
    ctx::{read_ip6, write_ip6},
    maps::{AFFINITY, AFFINITY_MATCH, AGENT_CGROUP, GATEWAY_NETNS, REVNAT, SERVICES, SLOTS},
    scope, sockopt,
    stats::{bump, bump_backend, bump_service},
};

/// Let the syscall go on (rewritten or not).
const ALLOW: i32 = 1;
/// Fail the syscall; the errno is the one set with `bpf_set_retval`.
const REJECT: i32 = 0;
const EHOSTUNREACH: i32 = 113;
/// `maxConnections` reached: refused as a full server's backlog would.
const ECONNREFUSED: i32 = 111;

/// Which program runs: the mesh's (service VIPs, for meshed sockets) or the
/// gateway's (gateway ports on the node's addresses, for sockets of the node's
/// own network namespace). Both read the same tables; each takes only its own
/// entries, so a socket under both attach points is translated once.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Mesh,
    Gateway,
}

/// What a lookup decided for one connect.
enum Verdict {
    /// Not a mesh service: leave the connect alone.
    Untouched,
    /// A mesh service with no backend to offer: refuse.
    NoBackend,
    /// Go to this backend.
    To(Backend),
    /// The backend drawn has `maxConnections` open: refuse.
    Overflow,
}

pub fn try_connect4(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid bpf_sock_addr; fields are read with 4-byte
    // loads as the verifier requires.
    let (ip, port, proto) = unsafe {
        (
            core::ptr::read_volatile(&(*sa).user_ip4),
            core::ptr::read_volatile(&(*sa).user_port),
            core::ptr::read_volatile(&(*sa).protocol),
        )
    };
    let key = ServiceKey {
        addr: [ip, 0, 0, 0],
        port: port as u16,
        proto: proto as u8,
        family: FAMILY_V4,
    };
    match choose(ctx, &key, hook) {
        Verdict::Untouched => ALLOW,
        Verdict::NoBackend => refuse(),
        Verdict::Overflow => refuse_with(ECONNREFUSED),
        Verdict::To(backend) if backend.family == FAMILY_V4 => {
            remember(ctx, &key);
            // SAFETY: as above; user_ip4/user_port are writable in connect4.
            unsafe {
                core::ptr::write_volatile(&mut (*sa).user_ip4, backend.addr[0]);
                core::ptr::write_volatile(&mut (*sa).user_port, u32::from(backend.port));
            }
            rewritten(&backend)
        }
        // The agent never puts another family in an IPv4 table.
        Verdict::To(_) => ALLOW,
    }
}

pub fn try_connect6(ctx: &SockAddrContext, hook: Hook) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands a valid bpf_sock_addr; fields are read with 4-byte
    // loads as the verifier requires.
    let (ip, port, proto) = unsafe {
        (
            read_ip6(&raw const (*sa).user_ip6),
            core::ptr::read_volatile(&(*sa).user_port),
            core::ptr::read_volatile(&(*sa).protocol),
        )
    };
    // A dual-stack socket dialling ::ffff:a.b.c.d is an IPv4 connect in disguise:
    // route it by the IPv4 table and answer in the same disguise.
    let mapped = is_v4_mapped(&ip);
    let key = if mapped {
        ServiceKey {
            addr: [ip[3], 0, 0, 0],
            port: port as u16,
            proto: proto as u8,
            family: FAMILY_V4,
        }
    } else {
        ServiceKey {
            addr: ip,
            port: port as u16,
            proto: proto as u8,
            family: FAMILY_V6,
        }
    };
    match choose(ctx, &key, hook) {
        Verdict::Untouched => ALLOW,
        Verdict::NoBackend => refuse(),
        Verdict::Overflow => refuse_with(ECONNREFUSED),
        Verdict::To(backend) => {
            let new_ip = match (mapped, backend.family) {
                (false, FAMILY_V6) => backend.addr,
                (true, FAMILY_V4) => [0, 0, V4_MAPPED_WORD, backend.addr[0]],
                _ => return ALLOW,
            };
            // Remember what was dialled, in the form it was dialled.
            let dialled = ServiceKey {
                addr: ip,
                port: key.port,
                proto: key.proto,
                family: FAMILY_V6,
            };
            remember(ctx, &dialled);
            // SAFETY: valid context; user_ip6 and user_port are writable in connect6.
            unsafe {
                write_ip6(&raw mut (*sa).user_ip6, &new_ip);
                core::ptr::write_volatile(&mut (*sa).user_port, u32::from(backend.port));
            }
            rewritten(&backend)
        }
    }
}

/// Is the caller the agent (or a process it started)? Its connects to services
/// (the API server's, above all) go as kube-proxy routes them, never through
/// the tables it writes.
#[inline(always)]
fn from_agent() -> bool {
    let Some(&agent) = AGENT_CGROUP.get(0) else {
        return false;
    };
    // SAFETY: helper without preconditions, allowed for cgroup sock_addr programs.
    if agent == 0 || agent != unsafe { bpf_get_current_cgroup_id() } {
        return false;
    }
    bump(global_stat::AGENT_BYPASSED);
    true
}

/// Looks the service up and draws a slot: `random % slot_count`, O(1) whatever the
/// number of services or backends. A port whose route's destinations have
/// tables of their own draws the destination first, then a slot of its table.
#[inline(always)]
fn choose(ctx: &SockAddrContext, key: &ServiceKey, hook: Hook) -> Verdict {
    // Two tries: if the agent flipped the service to a new table between our two
    // lookups and already freed the old one, the second read sees the new table.
    for attempt in 0..2u32 {
        // SAFETY: SERVICES is BPF_F_NO_PREALLOC, so the value is RCU-protected and
        // cannot be recycled under us; we copy it at once.
        let Some(port) = (unsafe { SERVICES.get(key) }).copied() else {
            if attempt == 0 {
                bump(global_stat::NOT_SERVICE);
                return Verdict::Untouched;
            }
            // The service was deleted while we looked: it is gone, let it be.
            return Verdict::Untouched;
        };
        let gateway = port.flags & SERVICE_FLAG_GATEWAY != 0;
        if gateway != (hook == Hook::Gateway) {
            return Verdict::Untouched;
        }
        // The agent and the scope are checked only for service connects:
        // everything else pays one lookup, as before.
        if attempt == 0 && (from_agent() || !in_scope(ctx, hook)) {
            return Verdict::Untouched;
        }
        if port.slot_count == 0 {
            bump_service(port.service_id);
            return Verdict::NoBackend;
        }
        let table = if port.flags & SERVICE_FLAG_DESTINATIONS != 0 {
            match destination(ctx, key, &port) {
                Pick::Table(table) => table,
                Pick::Refuse => {
                    bump_service(port.service_id);
                    return Verdict::NoBackend;
                }
                Pick::Retry => {
                    bump(global_stat::TABLE_RETRY);
                    continue;
                }
            }
        } else {
            port
        };
        if let Some(verdict) = from_table(ctx, key, &table) {
            // Counted for the port, whichever table chose.
            bump_service(port.service_id);
            return verdict;
        }
        bump(global_stat::TABLE_RETRY);
    }
    // Two misses in a row: never send a mesh connect to the bare VIP.
    Verdict::NoBackend
}

/// Slot `n` of `table`'s revision (`None`: the table was freed under us).
#[inline(always)]
fn slot_of(table: &ServiceValue, n: u32) -> Option<Backend> {
    let key = SlotKey {
        service_id: table.service_id,
        revision: table.revision,
        slot: n,
    };
    // SAFETY: SLOTS is BPF_F_NO_PREALLOC, so the value is RCU-protected and
    // cannot be recycled under us; we copy it at once.
    unsafe { SLOTS.get(key) }.copied()
}

/// What the draw of a destination gave.
enum Pick {
    /// The destination's own table.
    Table(ServiceValue),
    /// A destination that leads nowhere: its share is refused.
    Refuse,
    /// A table replaced under us: read the port again.
    Retry,
}

/// Draws one of the route's destinations from the port's table (by weight;
/// by a hash of the client when the port asks for it, so a client keeps its
/// destination while the route's weights stay) and reads its table.
#[inline(always)]
fn destination(ctx: &SockAddrContext, key: &ServiceKey, port: &ServiceValue) -> Pick {
    let draw = if port.flags & SERVICE_FLAG_HASH_CLIENT != 0 {
        // Another mix than the destination's own draw from the same client.
        (fmix64(client_id(ctx)) >> 32) as u32
    } else {
        // SAFETY: helper without preconditions.
        unsafe { bpf_get_prandom_u32() }
    };
    let Some(slot) = slot_of(port, draw % port.slot_count) else {
        return Pick::Retry;
    };
    if slot.family != FAMILY_DESTINATION {
        return Pick::Refuse;
    }
    // SAFETY: as for SERVICES.
    match (unsafe { SERVICES.get(destination_key(key, slot.addr[0])) }).copied() {
        Some(table) if table.slot_count == 0 => Pick::Refuse,
        Some(table) => Pick::Table(table),
        None => Pick::Retry,
    }
}

/// Draws a backend from `svc`'s table under its policies; `None` when the
/// table was replaced under us (read the port again).
#[inline(always)]
fn from_table(ctx: &SockAddrContext, key: &ServiceKey, svc: &ServiceValue) -> Option<Verdict> {
    // The connection pool's policy, read once for this connect.
    let pool = (svc.flags & SERVICE_FLAG_SOCKOPTS != 0)
        .then(|| sockopt::policy(svc.service_id))
        .flatten();
    let mut affinity = (svc.flags & SERVICE_FLAG_AFFINITY != 0).then(|| Client::of(ctx, svc));
    if let Some(backend) = affinity.as_mut().and_then(Client::backend) {
        socket_options(ctx, key, pool.as_ref());
        return Some(Verdict::To(backend));
    }
    let draw = match &affinity {
        Some(client) => client.draw(svc),
        None if svc.flags & SERVICE_FLAG_HASH_CLIENT != 0 => fmix64(client_id(ctx)) as u32,
        // SAFETY: helper without preconditions.
        None => unsafe { bpf_get_prandom_u32() },
    };
    let slot = draw % svc.slot_count;
    let backend = slot_of(svc, slot)?;
    if backend.family == FAMILY_NONE {
        return Some(Verdict::NoBackend);
    }
    let backend = if affinity.is_none() && svc.flags & SERVICE_FLAG_LEAST_REQUEST != 0 {
        least_loaded(svc, slot, backend)
    } else {
        backend
    };
    if pool
        .as_ref()
        .is_some_and(|p| sockopt::full(p, &endpoint(&backend)))
    {
        bump(global_stat::POOL_OVERFLOW);
        return Some(Verdict::Overflow);
    }
    if let Some(client) = &affinity {
        client.remember(backend);
    }
    socket_options(ctx, key, pool.as_ref());
    Some(Verdict::To(backend))
}

/// LEAST_REQUEST: of the backend at `slot` and the one at another slot drawn
/// at random, the one with fewer connections open (the first on a tie, or
/// when a count is missing). Two distinct slots, so with two backends the
/// less loaded one always wins.
#[inline(always)]
fn least_loaded(svc: &ServiceValue, slot: u32, first: Backend) -> Backend {
    if svc.slot_count < 2 {
        return first;
    }
    // SAFETY: helper without preconditions.
    let other =
        (slot + 1 + unsafe { bpf_get_prandom_u32() } % (svc.slot_count - 1)) % svc.slot_count;
    let Some(second) = slot_of(svc, other) else {
        return first;
    };
    if second.family == FAMILY_NONE {
        return first;
    }
    match (
        active::open(&endpoint(&first)),
        active::open(&endpoint(&second)),
    ) {
        (Some(a), Some(b)) if b < a => second,
        _ => first,
    }
}

/// A backend as an endpoint (the key of the per-backend maps).
#[inline(always)]
fn endpoint(b: &Backend) -> EndpointKey {
    EndpointKey {
        addr: b.addr,
        port: b.port,
        family: b.family,
        _pad: 0,
    }
}

/// DestinationRule `connectionPool.tcp` options on a TCP client's socket.
#[inline(always)]
fn socket_options(ctx: &SockAddrContext, key: &ServiceKey, pool: Option<&SocketPolicy>) {
    if let Some(policy) = pool.filter(|_| key.proto == PROTO_TCP) {
        sockopt::apply(ctx, policy);
    }
}

/// A client of a service with session affinity: its network namespace (one
/// pod, or the node) and the time of this connect.
struct Client {
    key: AffinityKey,
    now: u64,
    /// `last_used_ns` of an entry that no longer holds (idle too long,
    /// backend gone); 0 for none.
    stale: u64,
}

impl Client {
    #[inline(always)]
    fn of(ctx: &SockAddrContext, svc: &ServiceValue) -> Self {
        Client {
            key: AffinityKey {
                // SAFETY: the helper accepts a sock_addr context.
                netns: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
                service_id: svc.service_id,
                _pad: 0,
            },
            // SAFETY: helper without preconditions.
            now: unsafe { bpf_ktime_get_ns() },
            stale: 0,
        }
    }

    /// The backend this client drew before, if it is still a member of the
    /// service and the client was not idle longer than the service's timeout
    /// (kube-proxy's rule: the timeout runs from the last connection).
    #[inline(always)]
    fn backend(&mut self) -> Option<Backend> {
        let entry = AFFINITY.get_ptr_mut(self.key)?;
        // SAFETY: a live LRU element; another CPU may write `last_used_ns` at
        // once, which only moves the deadline.
        let entry = unsafe { &mut *entry };
        self.stale = entry.last_used_ns;
        let member = AffinityMatch::of(self.key.service_id, &entry.backend);
        // SAFETY: a plain lookup; the value is copied.
        let timeout_s = unsafe { AFFINITY_MATCH.get(member) }.copied()?;
        if self.now.saturating_sub(entry.last_used_ns) > u64::from(timeout_s) * 1_000_000_000 {
            return None;
        }
        entry.last_used_ns = self.now;
        bump(global_stat::AFFINITY_KEPT);
        Some(entry.backend)
    }

    /// The draw of a client with no backend that holds: a hash of the client,
    /// the table and the entry that no longer holds, not a random number, so
    /// connects of one client racing on several CPUs draw the same slot (each
    /// records the same backend). Uniform over clients, so weights hold across
    /// them; a new draw after a timeout (another `last_used_ns`) is a fresh one.
    #[inline(always)]
    fn draw(&self, svc: &ServiceValue) -> u32 {
        let table = (u64::from(svc.service_id) << 32) | u64::from(svc.revision);
        fmix64(self.key.netns ^ table.rotate_left(17) ^ self.stale.rotate_left(41)) as u32
    }

    /// Records the backend this client just drew (racing connects of the
    /// client drew the same one). A full LRU evicts the least recent client,
    /// whose next connect draws.
    #[inline(always)]
    fn remember(&self, backend: Backend) {
        let value = Affinity {
            backend,
            last_used_ns: self.now,
        };
        let _ = AFFINITY.insert(self.key, value, 0);
    }
}

/// Who the client of a consistent-hash service is: the socket's bound source
/// address (an application that binds, or many addresses of one pod), else
/// its network namespace (a pod has one address; at `connect()` an unbound
/// socket has none yet).
#[inline(always)]
fn client_id(ctx: &SockAddrContext) -> u64 {
    // SAFETY: in connect4/6 `sk` is the kernel's full socket of the call;
    // `family` and the source fields are readable fields of `bpf_sock`.
    let (family, v4, v6) = unsafe {
        let sk = (*ctx.sock_addr).__bindgen_anon_1.sk;
        (
            core::ptr::read_volatile(&(*sk).family),
            core::ptr::read_volatile(&(*sk).src_ip4),
            read_ip6(&raw const (*sk).src_ip6),
        )
    };
    let bound = if family == 2 {
        u64::from(v4)
    } else {
        (u64::from(v6[0]) << 32 | u64::from(v6[1]))
            ^ (u64::from(v6[2]) << 32 | u64::from(v6[3])).rotate_left(29)
    };
    if bound != 0 {
        return bound;
    }
    // SAFETY: the helper accepts a sock_addr context.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// Whether the connecting socket is one this hook translates: in the mesh scope
/// (see `scope`), or, for the gateway, in the node's network namespace (a pod
/// dialling its own `127.0.0.1:80` is left alone).
#[inline(always)]
fn in_scope(ctx: &SockAddrContext, hook: Hook) -> bool {
    // SAFETY: the helper accepts a sock_addr context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let inside = match hook {
        Hook::Mesh => scope::meshed(netns),
        Hook::Gateway => GATEWAY_NETNS
            .get(0)
            .is_some_and(|&node| node != 0 && node == netns),
    };
    if !inside {
        bump(global_stat::NOT_MESHED);
    }
    inside
}

/// Fails the connect with `EHOSTUNREACH`, as Cilium does for a service without
/// backends: the application gets an immediate, explicit error instead of a hang.
#[inline(always)]
fn refuse() -> i32 {
    bump(global_stat::NO_BACKEND);
    refuse_with(EHOSTUNREACH)
}

/// Fails the connect with `errno`.
#[inline(always)]
fn refuse_with(errno: i32) -> i32 {
    // SAFETY: helper allowed for connect hooks; a negative errno is the contract.
    unsafe { bpf_set_retval(-errno) };
    REJECT
}

#[inline(always)]
fn rewritten(backend: &Backend) -> i32 {
    bump(global_stat::REWRITTEN);
    bump_backend(backend.backend_id);
    ALLOW
}

/// Records socket cookie -> dialled VIP:port for `getpeername`.
#[inline(always)]
fn remember(ctx: &SockAddrContext, dialled: &ServiceKey) {
    // SAFETY: bpf_get_socket_cookie accepts a sock_addr context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        addr: dialled.addr,
        port: dialled.port,
        family: dialled.family,
        _pad: 0,
    };
    // A full LRU evicts an old entry; an error here only costs the VIP in getpeername.
    let _ = REVNAT.insert(cookie, orig, 0);
}
