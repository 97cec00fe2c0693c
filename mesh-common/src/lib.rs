//! Types shared by the kernel programs (`mesh-ebpf`) and the agent (`mesh-user`).
//!
//! Every type here is a BPF map key or value: `#[repr(C)]`, explicit padding fields
//! (so no byte is ever uninitialised, which the verifier and the hash of a key both
//! care about), `bytemuck::Pod`, and a compile-time size check. Addresses and ports
//! are kept in **network byte order** end to end, exactly as the kernel hands them to
//! `bpf_sock_addr`, so the hot path never swaps bytes.
//!
//! Map names carry a layout version (`_V1`). A change to any type below must bump the
//! version of every map that uses it, so an old pinned map is never read with a new
//! layout.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// `family` value of an IPv4 [`ServiceKey`] or [`Backend`].
pub const FAMILY_V4: u8 = 4;
/// `family` value of an IPv6 [`ServiceKey`] or [`Backend`].
pub const FAMILY_V6: u8 = 6;
/// `family` value of a slot that deliberately has no backend: a weighted destination
/// whose endpoints are all gone. A connect that draws it fails with `EHOSTUNREACH`,
/// as Envoy answers 503 for a weighted cluster with no healthy host.
pub const FAMILY_NONE: u8 = 0;

/// `proto` values, as in `IPPROTO_*`.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// Most slots one service (VIP, port, protocol) may have. The agent sizes each table
/// to represent the weights exactly when it can, and never beyond this.
pub const MAX_SLOTS_PER_SERVICE: u32 = 4096;
/// Capacity of [`ServiceKey`] map (service ports, one per VIP family).
pub const MAX_SERVICES: u32 = 131_072;
/// Capacity of the slot map: every service's current table plus the tables being
/// replaced at that moment.
pub const MAX_SLOTS: u32 = 1 << 21;
/// Capacity of the per-backend counters.
pub const MAX_BACKENDS: u32 = 262_144;
/// Capacity of the reverse-translation LRU (socket cookie -> dialled VIP).
pub const MAX_REVNAT: u32 = 262_144;
/// Capacity of the session-affinity LRU (client namespace, service port) ->
/// backend: 64 Ki clients x service ports; the least recently used go first
/// (their next connect draws again).
pub const MAX_AFFINITY: u32 = 65_536;
/// Capacity of the backends watched by outlier detection.
pub const MAX_OUTLIER: u32 = 65_536;
/// Capacity of the affinity members (service port, backend) of services with
/// session affinity.
pub const MAX_AFFINITY_MATCH: u32 = 65_536;

/// Capacity of the same-node socket map and its per-socket decisions: established
/// mesh TCP sockets on the node, both ends of each connection.
pub const MAX_SOCKETS: u32 = 131_072;

/// Capacity of the redirect exclusions: endpoints whose connections keep to TCP.
pub const MAX_REDIRECT_EXCLUDED: u32 = 65_536;

/// Capacity of the meshed pods' network namespaces (pods of this node in a
/// mesh namespace).
pub const MAX_MESHED_PODS: u32 = 16_384;

/// [`MeshScope::mode`] values.
pub mod scope {
    /// Every socket under the attach point is meshed (the file source, tests).
    pub const CGROUP: u32 = 0;
    /// Only sockets in a meshed pod's network namespace: its cookie is in
    /// `MESHED_PODS_V1` (Istio's scope: pods of labelled namespaces).
    pub const PODS: u32 = 1;
}

/// Value of `MESH_SCOPE_V1` (one entry): which sockets under the attach point
/// are meshed. Written by the agent at start, before it attaches the programs.
/// Absent or zeroed: [`scope::CGROUP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct MeshScope {
    /// [`scope::CGROUP`] or [`scope::PODS`].
    pub mode: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<MeshScope>() == 8);

/// Map names, versioned with their layout.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES_V1";
    pub const SLOTS: &str = "SLOTS_V1";
    pub const REVNAT: &str = "REVNAT_V1";
    pub const BACKEND_STATS: &str = "BACKEND_STATS_V1";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS_V1";
    pub const SOCKETS: &str = "SOCKETS_V2";
    pub const SOCK_CONN: &str = "SOCK_CONN_V1";
    pub const SOCK_STATS: &str = "SOCK_STATS_V1";
    pub const REDIRECT_EXCLUDED: &str = "REDIRECT_EXCLUDED_V1";
    pub const SERVICE_STATS: &str = "SERVICE_STATS_V1";
    pub const AGENT_CGROUP: &str = "AGENT_CGROUP_V1";
    pub const MESH_SCOPE: &str = "MESH_SCOPE_V1";
    pub const MESHED_PODS: &str = "MESHED_PODS_V1";
    pub const GATEWAY_NETNS: &str = "GATEWAY_NETNS_V1";
    pub const GATEWAY_VIPS: &str = "GATEWAY_VIPS_V1";
    pub const MAGLEV: &str = "MAGLEV_V1";
    pub const GATEWAY_CT: &str = "GATEWAY_CT_V1";
    pub const GATEWAY_STATS: &str = "GATEWAY_STATS_V1";
    pub const ROUTER_MARK: &str = "ROUTER_MARK_V1";
    pub const AFFINITY: &str = "AFFINITY_V1";
    pub const AFFINITY_MATCH: &str = "AFFINITY_MATCH_V1";
    pub const OUTLIER: &str = "OUTLIER_V1";
    pub const SOCKET_POLICY: &str = "SOCKET_POLICY_V1";
    pub const CONNECTING: &str = "CONNECTING_V1";
    pub const ACTIVE: &str = "ACTIVE_V1";
    pub const COUNTED: &str = "COUNTED_V1";

    /// Every map of the object: the ones pinned in bpffs, so that they outlive the
    /// agent. A layout change renames a map (`_V2`), which makes the old pin a
    /// stranger the agent removes once the new programs run.
    /// Keep in step with mesh-ebpf/src/maps.rs: the loader fails on a name the
    /// object lacks.
    pub const ALL: [&str; 26] = [
        SERVICES,
        SLOTS,
        REVNAT,
        BACKEND_STATS,
        SERVICE_STATS,
        GLOBAL_STATS,
        SOCKETS,
        SOCK_CONN,
        SOCK_STATS,
        REDIRECT_EXCLUDED,
        AGENT_CGROUP,
        MESH_SCOPE,
        MESHED_PODS,
        GATEWAY_NETNS,
        GATEWAY_VIPS,
        MAGLEV,
        GATEWAY_CT,
        GATEWAY_STATS,
        ROUTER_MARK,
        AFFINITY,
        AFFINITY_MATCH,
        OUTLIER,
        SOCKET_POLICY,
        CONNECTING,
        ACTIVE,
        COUNTED,
    ];
}

/// Program names (the Rust function names in `mesh-ebpf`).
pub mod program_names {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    pub const GETPEERNAME6: &str = "mesh_getpeername6";
    pub const GATEWAY_CONNECT4: &str = "mesh_gateway_connect4";
    pub const GATEWAY_CONNECT6: &str = "mesh_gateway_connect6";
    pub const SOCKOPS: &str = "mesh_sockops";
    pub const ROUTER_SOCKOPS: &str = "mesh_router_sockops";
    pub const SK_MSG: &str = "mesh_sk_msg";
    pub const GATEWAY_INGRESS: &str = "mesh_gateway_ingress";
    pub const GATEWAY_EGRESS: &str = "mesh_gateway_egress";
}

/// Indexes into the per-CPU `GLOBAL_STATS_V1` array.
pub mod global_stat {
    /// Connects whose destination was a mesh service and were rewritten to a backend.
    pub const REWRITTEN: u32 = 0;
    /// Connects to a mesh service that drew no backend and were refused.
    pub const NO_BACKEND: u32 = 1;
    /// Connects to anything else (left untouched).
    pub const NOT_SERVICE: u32 = 2;
    /// Connects that saw a table being replaced and had to read the service again.
    pub const TABLE_RETRY: u32 = 3;
    /// `getpeername` calls answered with the dialled VIP.
    pub const PEER_REWRITTEN: u32 = 4;
    /// The same, counted only by objects built with mesh-ebpf's `upgrade-test`
    /// feature: the upgrade test's proof that a swapped-in program really runs.
    /// Always 0 with a normal build.
    pub const PEER_REWRITTEN_BY_VARIANT: u32 = 5;
    /// Connects of the agent itself (its cgroup is in `AGENT_CGROUP_V1`) to a
    /// mesh service, left alone.
    pub const AGENT_BYPASSED: u32 = 6;
    /// Connects to a mesh service from a socket outside the mesh scope (a pod
    /// of an unlabelled namespace), left alone.
    pub const NOT_MESHED: u32 = 7;
    /// Connects of a client sent to the backend it drew before
    /// (`sessionAffinity: ClientIP`), without a draw.
    pub const AFFINITY_KEPT: u32 = 8;
    /// Connects refused because their backend had `maxConnections` open.
    pub const POOL_OVERFLOW: u32 = 9;
    pub const COUNT: u32 = 10;
}

/// Indexes into the per-CPU `SOCK_STATS_V1` array (same-node redirection).
pub mod sock_stat {
    /// Established mesh TCP sockets added to `SOCKETS_V2`.
    pub const ADDED: u32 = 0;
    /// Established mesh TCP sockets not added: another live mesh socket holds
    /// their 4-tuple (only possible with overlapping pod IPs; see
    /// [`SockConn`](crate::SockConn)) or a map was full. They use plain TCP.
    pub const ADD_FAILED: u32 = 1;
    /// Messages handed straight to the peer socket, and their bytes.
    pub const REDIRECTED_MSGS: u32 = 2;
    pub const REDIRECTED_BYTES: u32 = 3;
    /// Messages that went through TCP/IP because the peer is not a local mesh
    /// socket (or was not yet when the connection sent its first message), and
    /// their bytes.
    pub const FALLBACK_MSGS: u32 = 4;
    pub const FALLBACK_BYTES: u32 = 5;
    /// Established mesh TCP sockets not added because one end is an endpoint in
    /// `REDIRECT_EXCLUDED_V1`.
    pub const EXCLUDED: u32 = 6;
    /// Established TCP sockets not added because they are outside the mesh
    /// scope (see [`MeshScope`](crate::MeshScope)).
    pub const NOT_MESHED: u32 = 7;
    pub const COUNT: u32 = 8;
}

/// [`SockConn::path`] values: a socket whose first message went through TCP stays
/// there, so that bytes never overtake each other on two paths.
pub mod sock_path {
    /// No message sent yet.
    pub const UNDECIDED: u32 = 0;
    /// Every message so far was redirected (the first was: later ones redirect
    /// again, or fall back once the peer has closed).
    pub const JOINED: u32 = 1;
    pub const TCP: u32 = 2;
}

/// One established TCP socket's 4-tuple, as seen from its own end: the key of
/// `SOCK_CONN_V1`, and the first part of [`ConnKey`]. Built by `sockops` when the
/// connection is established and by `sk_msg` on every message, the same way
/// ([`SockKey::v4`], [`SockKey::v6`]).
///
/// Why `netns` is not always set: a socket cannot learn its peer's network
/// namespace, so a key the peer must be able to build names it only by the
/// 4-tuple. Between two pods that is enough, because pod IPs are unique on a node.
/// Traffic inside one namespace (loopback, or a pod dialling its own IP) is
/// different: every pod can produce the very same tuple, so those keys carry the
/// namespace's cookie, which both ends share.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct SockKey {
    /// This end's address, network byte order; IPv4 (also IPv4-mapped IPv6) in
    /// `local[0]`, rest zero.
    pub local: [u32; 4],
    /// The peer's address, same encoding.
    pub remote: [u32; 4],
    /// This end's port, network byte order.
    pub local_port: u16,
    /// The peer's port, network byte order.
    pub remote_port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`] (of the connection, not the socket: a dual
    /// stack socket talking IPv4 is `FAMILY_V4`, as its IPv4 peer sees it).
    pub family: u8,
    pub _pad: [u8; 3],
    /// `bpf_get_netns_cookie` of the socket's namespace for namespace-local
    /// connections (loopback, or both ends on one address), else 0.
    pub netns: u64,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 48);

/// Key of `SOCKETS_V2` (a sockhash): one established TCP socket of one
/// connection. Written by `sockops` (the kernel removes the socket when it
/// closes); `sk_msg` redirects to the [`ConnKey::peer`] of its own key.
///
/// Why the sequence numbers: with overlapping pod IPs (two namespace pairs with
/// the same addresses on one node) two connections can share a 4-tuple, and a
/// 4-tuple alone would let a socket redirect into another connection's socket
/// that holds the peer tuple (say, a half-closed server whose client has left,
/// when another pod pair reuses the tuple). Both ends of one TCP connection, and
/// no one else, know its two initial sequence numbers when the handshake
/// completes, so each end can build the key its own peer was added under, and
/// only that one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct ConnKey {
    /// The socket's 4-tuple (and namespace for namespace-local connections).
    pub sock: SockKey,
    /// This end's initial sequence number + 1, host byte order (`snd_una` of
    /// `bpf_sock_ops` at the established callback, as `sockops` reads it).
    pub local_seq: u32,
    /// The peer's initial sequence number + 1, host byte order (`rcv_nxt` there).
    pub remote_seq: u32,
}
const _: () = assert!(core::mem::size_of::<ConnKey>() == 56);

impl ConnKey {
    /// The key the other end of this connection was added under.
    pub fn peer(&self) -> Self {
        Self {
            sock: self.sock.peer(),
            local_seq: self.remote_seq,
            remote_seq: self.local_seq,
        }
    }
}

/// Value of `SOCK_CONN_V1` (key: the socket's [`SockKey`]): what `sk_msg` needs
/// to know about the sending socket that its context does not say.
///
/// Written by `sockops` with `BPF_NOEXIST` before it adds the socket to
/// `SOCKETS_V2` (a socket whose tuple has a record already is not added at all),
/// and deleted by `sockops` when that very socket (`cookie`) closes: every socket
/// in `SOCKETS_V2` owns the record of its tuple for as long as it is there, so
/// the record `sk_msg` finds under its own tuple is its own. `path` is written by
/// `sk_msg` (under the socket's lock), and by `sockops` for Fast Open clients;
/// `received` by the peer's `sk_msg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SockConn {
    /// [`ConnKey::local_seq`] of the socket.
    pub local_seq: u32,
    /// [`ConnKey::remote_seq`] of the socket.
    pub remote_seq: u32,
    /// [`sock_path::UNDECIDED`], [`sock_path::JOINED`] or [`sock_path::TCP`].
    pub path: u32,
    /// 1 once the peer's `sk_msg` redirected a message into this socket (its
    /// first one): bytes TCP's counters of this socket do not see (outlier
    /// detection reads it). Was padding (0) before: same layout.
    pub received: u32,
    /// `bpf_get_socket_cookie` of the socket that owns the record (written by
    /// `sockops`; only the owner's close deletes it).
    pub cookie: u64,
}
const _: () = assert!(core::mem::size_of::<SockConn>() == 24);

impl SockConn {
    /// The record of a socket whose connection's handshake just completed.
    pub fn new(local_seq: u32, remote_seq: u32, path: u32, cookie: u64) -> Self {
        Self {
            local_seq,
            remote_seq,
            path,
            received: 0,
            cookie,
        }
    }

    /// The `SOCKETS_V2` key of the socket that owns this record under `sock`.
    pub fn key(&self, sock: SockKey) -> ConnKey {
        ConnKey {
            sock,
            local_seq: self.local_seq,
            remote_seq: self.remote_seq,
        }
    }
}

/// Key of `REDIRECT_EXCLUDED_V1` (value: `u32`, reserved, 0): an endpoint (pod IP,
/// port) whose connections must not be redirected, e.g. a server that reads with
/// `splice(2)`, which does not see redirected bytes. Written by the agent from the
/// pods' `traffic.sidecar.istio.io/excludeInboundPorts`; read by `sockops`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct EndpointKey {
    /// Network byte order; IPv4 in `addr[0]`, rest zero.
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<EndpointKey>() == 20);

impl SockKey {
    /// This end of the connection as an endpoint.
    pub fn local_endpoint(&self) -> EndpointKey {
        EndpointKey {
            addr: self.local,
            port: self.local_port,
            family: self.family,
            _pad: 0,
        }
    }

    /// The peer's end.
    pub fn remote_endpoint(&self) -> EndpointKey {
        EndpointKey {
            addr: self.remote,
            port: self.remote_port,
            family: self.family,
            _pad: 0,
        }
    }
}

/// `::ffff:0:0/96`'s third word, network byte order: an IPv4-mapped IPv6
/// address is `[0, 0, V4_MAPPED_WORD, ipv4]`.
pub const V4_MAPPED_WORD: u32 = 0x0000_ffffu32.to_be();

impl SockKey {
    /// An IPv4 connection; addresses and ports in network byte order.
    pub fn v4(local: u32, remote: u32, local_port: u16, remote_port: u16, netns: u64) -> Self {
        let ns_local = is_loopback4(local) || is_loopback4(remote) || local == remote;
        Self {
            local: [local, 0, 0, 0],
            remote: [remote, 0, 0, 0],
            local_port,
            remote_port,
            family: FAMILY_V4,
            _pad: [0; 3],
            netns: if ns_local { netns } else { 0 },
        }
    }

    /// An IPv6 socket's connection; IPv4-mapped addresses give the IPv4 key its
    /// IPv4 peer builds.
    pub fn v6(
        local: [u32; 4],
        remote: [u32; 4],
        local_port: u16,
        remote_port: u16,
        netns: u64,
    ) -> Self {
        if is_v4_mapped(&local) && is_v4_mapped(&remote) {
            return Self::v4(local[3], remote[3], local_port, remote_port, netns);
        }
        let ns_local = is_loopback6(&local) || is_loopback6(&remote) || local == remote;
        Self {
            local,
            remote,
            local_port,
            remote_port,
            family: FAMILY_V6,
            _pad: [0; 3],
            netns: if ns_local { netns } else { 0 },
        }
    }

    /// The key the other end of this connection was added under.
    pub fn peer(&self) -> Self {
        Self {
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
            ..*self
        }
    }
}

fn is_loopback4(addr: u32) -> bool {
    u32::from_be(addr) >> 24 == 127
}

fn is_loopback6(addr: &[u32; 4]) -> bool {
    *addr == [0, 0, 0, 1u32.to_be()]
}

/// murmur3's 64-bit finalizer: every input bit moves every output bit. Shared
/// by the kernel's client hashes and the agent's Maglev permutations.
#[inline(always)]
pub const fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Whether an address (words in network byte order) is IPv4-mapped.
pub fn is_v4_mapped(addr: &[u32; 4]) -> bool {
    addr[0] == 0 && addr[1] == 0 && addr[2] == V4_MAPPED_WORD
}

/// Key of `SERVICES_V1`: one service port on one VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct ServiceKey {
    /// VIP, network byte order. IPv4 uses `addr[0]` and leaves the rest zero.
    pub addr: [u32; 4],
    /// Service port, network byte order.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

/// Value of `SERVICES_V1`. Written by the agent only, after the slots of `revision`
/// are all in place: this write is the atomic flip from the old table to the new.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct ServiceValue {
    /// Agent-assigned id, stable for the life of the service port.
    pub service_id: u32,
    /// Revision of the live slot table; bumps on every change of the table.
    pub revision: u32,
    /// Number of slots in the live table; 0 means "no backend": refuse the connect.
    pub slot_count: u32,
    /// `SERVICE_FLAG_*` bits; the others zero.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

/// [`ServiceValue::flags`]: a gateway port on one of the node's addresses
/// (`127.0.0.1:80`, a node IP). Only the gateway's connect hooks translate it,
/// and only for sockets in the node's network namespace (`GATEWAY_NETNS_V1`);
/// the mesh hooks leave it alone, so a pod's own `localhost:80` is untouched.
pub const SERVICE_FLAG_GATEWAY: u32 = 1;

/// [`ServiceValue::flags`]: `sessionAffinity: ClientIP`. A client (a network
/// namespace: one pod, or the node) keeps the backend it drew
/// (`AFFINITY_V1`) while it stays a member of the service
/// (`AFFINITY_MATCH_V1`) and the client was not idle longer than the
/// service's timeout.
pub const SERVICE_FLAG_AFFINITY: u32 = 2;

/// [`ServiceValue::flags`]: DestinationRule `consistentHash.useSourceIp`. The
/// slot is a hash of the client, not a random draw, over a weighted Maglev
/// table: one client keeps its backend, and a backend added or removed moves
/// about its own share of clients. The client is the socket's bound source
/// address if it has one, else its network namespace (a pod).
pub const SERVICE_FLAG_HASH_CLIENT: u32 = 4;

/// Per-CPU value of `OUTLIER_V1` (key: the backend's [`EndpointKey`]): the
/// connects of meshed clients to a backend watched by a DestinationRule's
/// `outlierDetection`. The agent creates the entry (zeroed: it marks the
/// backend watched) and deletes it when no rule watches the backend; `sockops`
/// counts on its CPU (no atomics: the agent sums the CPUs with wrapping
/// arithmetic and derives consecutive failures from what changed between two
/// reads, the change of `successes` taken as signed).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct OutlierStats {
    /// Connects that failed: before ESTABLISHED (SYN_SENT to CLOSE: refused,
    /// unreachable, timed out), or established and then reset before a byte
    /// was received (ESTABLISHED to CLOSE with `bytes_received` 0: an
    /// accept-then-RST backend).
    pub failures: u64,
    /// Connects that reached ESTABLISHED, less those of them then reset
    /// before a byte was received. A reset is counted on its own CPU, maybe
    /// not the one that counted the connect's success: one CPU's value may
    /// wrap below zero; the wrapping sum over CPUs does not (unless the
    /// connect was established before its backend was watched). An agent
    /// that read the success before the reset sees it taken back at its next
    /// read: the success ended a run of failures in the first (the one
    /// approximation).
    pub successes: u64,
}
const _: () = assert!(core::mem::size_of::<OutlierStats>() == 16);

/// [`ServiceValue::flags`]: DestinationRule `connectionPool.tcp`
/// `connectTimeout` / `tcpKeepalive` / `maxConnections`. connect4/6 apply the
/// service's [`SocketPolicy`] (`SOCKET_POLICY_V1`) to the client's TCP socket.
pub const SERVICE_FLAG_SOCKOPTS: u32 = 8;

/// Value of `SOCKET_POLICY_V1` (key: service id, `u32`): socket options for
/// the clients of a service port, each 0 for "leave the socket's own". Written
/// by the agent. Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct SocketPolicy {
    /// `connectTimeout`: `TCP_USER_TIMEOUT` while connecting (unless the
    /// application set one), cleared by sockops at ESTABLISHED.
    pub connect_timeout_ms: u32,
    /// `tcpKeepalive.time`: `SO_KEEPALIVE` on and `TCP_KEEPIDLE` (unless the
    /// application turned keepalive on itself).
    pub keepalive_time_s: u32,
    /// `tcpKeepalive.interval`: `TCP_KEEPINTVL` (0: the kernel's).
    pub keepalive_interval_s: u32,
    /// `tcpKeepalive.probes`: `TCP_KEEPCNT` (0: the kernel's).
    pub keepalive_probes: u32,
    /// `maxConnections`, per backend: a connect drawn to a backend with this
    /// many connections open (`ACTIVE_V1`) is refused with ECONNREFUSED at
    /// once (0: no limit).
    pub max_connections: u32,
}
const _: () = assert!(core::mem::size_of::<SocketPolicy>() == 20);

/// Capacity of the connects waiting for ESTABLISHED with a connect timeout
/// set by connect4/6 (`CONNECTING_V1`, LRU).
pub const MAX_CONNECTING: u32 = 65_536;

/// [`ServiceValue::flags`]: DestinationRule `loadBalancer.simple:
/// LEAST_REQUEST`, as fewest active connections: connect4/6 draw two slots
/// and take the backend with fewer connections open (`ACTIVE_V1`).
pub const SERVICE_FLAG_LEAST_REQUEST: u32 = 16;

/// [`ServiceValue::flags`]: the table picks one of the route's destinations,
/// not a backend (a route whose destinations have traffic policies of their
/// own: a DestinationRule subset's `trafficPolicy`, or `LEAST_REQUEST`, whose
/// second draw must stay within the destination the first one chose). Each
/// slot is a [`Backend`] of family [`FAMILY_DESTINATION`] with the
/// destination's index in `addr[0]`; its table, with its own flags, is the
/// `SERVICES_V1` entry at [`destination_key`].
pub const SERVICE_FLAG_DESTINATIONS: u32 = 32;

/// [`Backend::family`] of a slot of a [`SERVICE_FLAG_DESTINATIONS`] table.
pub const FAMILY_DESTINATION: u8 = 0x7f;

/// Most destinations of one route with a table each (indices `0..64`).
pub const MAX_DESTINATIONS: u32 = 64;

/// The `SERVICES_V1` key of destination `index`'s table of the service port
/// `key`: the same address, port and protocol, and a family no connect can
/// have (`0x80`, `0x40` for IPv6, the index in the low six bits), so it is
/// only ever reached through the port's own table.
#[inline(always)]
pub fn destination_key(key: &ServiceKey, index: u32) -> ServiceKey {
    let v6 = if key.family == FAMILY_V6 { 0x40 } else { 0 };
    ServiceKey {
        addr: key.addr,
        port: key.port,
        proto: key.proto,
        family: 0x80 | v6 | (index as u8 & 0x3f),
    }
}

/// The inverse of [`destination_key`]: the family of the port's own key and
/// the destination's index; `None` for a key a connect can have.
pub fn destination_of(family: u8) -> Option<(u8, u32)> {
    if family & 0x80 == 0 {
        return None;
    }
    let own = if family & 0x40 != 0 {
        FAMILY_V6
    } else {
        FAMILY_V4
    };
    Some((own, u32::from(family & 0x3f)))
}

/// Capacity of the connections counted in `ACTIVE_V1` (`COUNTED_V1`: socket
/// cookie -> backend); when full, new connections are not counted.
pub const MAX_COUNTED: u32 = 262_144;

/// Key of `AFFINITY_V1`: one client of one service port.
///
/// The client is its network namespace's cookie, not its address: at
/// `connect()` the socket has no source address yet, and a pod's namespace is
/// one address (as Cilium's socket load balancer does).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct AffinityKey {
    /// `bpf_get_netns_cookie` of the connecting socket (host byte order).
    pub netns: u64,
    pub service_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);

/// Value of `AFFINITY_V1`: the backend a client drew and when it last
/// connected. Written by `connect4/6` only (LRU: idle clients age out).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Affinity {
    pub backend: Backend,
    /// `bpf_ktime_get_ns` of the client's last connect to the service.
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Affinity>() == 32);

/// Key of `AFFINITY_MATCH_V1`: a backend that is a member of a service port
/// with session affinity; the value is the service's timeout in seconds.
/// Written by the agent only: a backend leaving the service is deleted after
/// the table without it is live, so a client pinned to it draws again. By
/// address, not backend id: ids are reused for other backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct AffinityMatch {
    pub service_id: u32,
    /// As [`Backend::addr`]: network byte order, IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    /// As [`Backend::port`]: network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<AffinityMatch>() == 24);

impl AffinityMatch {
    /// `backend` as a member of service port `service_id`.
    pub fn of(service_id: u32, backend: &Backend) -> Self {
        Self {
            service_id,
            addr: backend.addr,
            port: backend.port,
            family: backend.family,
            _pad: 0,
        }
    }
}

/// Key of `SLOTS_V1`: one slot of one revision of one service's table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct SlotKey {
    pub service_id: u32,
    pub revision: u32,
    /// `0..slot_count`.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 12);

/// Value of `SLOTS_V1`: the backend a connect that draws this slot goes to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct Backend {
    /// Backend address, network byte order; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    /// Backend port (the target port), network byte order.
    pub port: u16,
    /// [`FAMILY_V4`], [`FAMILY_V6`], or [`FAMILY_NONE`] for "no backend".
    pub family: u8,
    pub _pad: u8,
    /// Agent-assigned id, the index of this backend's counters in `BACKEND_STATS_V1`.
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 24);

/// Value of `REVNAT_V1` (key: socket cookie, `u64`): what the application dialled,
/// so `getpeername` can answer with it. Written by `connect4/6`, read by
/// `getpeername4/6`; entries age out of the LRU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct OrigDst {
    /// Dialled VIP, network byte order; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    /// Dialled port, network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<OrigDst>() == 20);

/// Value of the per-CPU `BACKEND_STATS_V1` (key: `backend_id`, host byte order).
/// Written by connect4/6, which create the entry on the id's first connect
/// (this CPU's value 1, the others zeroed by the kernel); the agent only reads
/// and deletes entries.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendStats {
    /// Connects rewritten to this backend.
    pub connects: u64,
}
const _: () = assert!(core::mem::size_of::<BackendStats>() == 8);

// ---- The gateway for clients outside the node (tc, per packet) ----

/// Capacity of `GATEWAY_VIPS_V1`: (node address, gateway port) pairs.
pub const MAX_GATEWAY_VIPS: u32 = 4096;
/// Capacity of `MAGLEV_V1`: every live Maglev table's slots plus the tables
/// being replaced (64 tables of the default 16381 slots).
pub const MAX_MAGLEV_SLOTS: u32 = 1 << 20;
/// Capacity of the gateway's conntrack LRU (`GATEWAY_CT_V1`): two entries per
/// flow (forward and reverse), so 131072 flows before the LRU evicts the
/// least recently used.
pub const MAX_GATEWAY_CT: u32 = 262_144;

/// Idle lifetime of a gateway conntrack entry: an established TCP flow with no
/// packet for this long is forgotten (as Cilium's TCP established timeout).
pub const GATEWAY_CT_IDLE_NS: u64 = 6 * 3600 * 1_000_000_000;
/// Lifetime of an entry after a FIN was seen both ways or an RST either way.
pub const GATEWAY_CT_CLOSE_NS: u64 = 10 * 1_000_000_000;
/// `last_seen_ns` is rewritten at most this often (a write per packet would
/// bounce the entry's cache line between CPUs).
pub const GATEWAY_CT_TOUCH_NS: u64 = 1_000_000_000;

/// Value of `GATEWAY_VIPS_V1` (key: [`ServiceKey`], the node address and
/// gateway port a client outside the node dials; `proto` TCP). Written by the
/// agent only, after every slot of `table_id` is in `MAGLEV_V1`: this write
/// flips the port to its new table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct GatewayVip {
    /// Agent-assigned id of the live Maglev table (a new id per new table).
    pub table_id: u32,
    /// Slots of that table, a prime M; 0: no table (no backend, or the address
    /// draining): a SYN goes on to the node's stack, flows in progress keep
    /// their conntrack entries.
    pub slot_count: u32,
}
const _: () = assert!(core::mem::size_of::<GatewayVip>() == 8);

/// Key of `MAGLEV_V1` (value: [`Backend`]). Written by the agent only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct MaglevKey {
    /// [`GatewayVip::table_id`].
    pub table_id: u32,
    /// `0..slot_count`, host byte order.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<MaglevKey>() == 8);

/// [`GatewayFlow::dir`]: a client's packet towards the gateway address.
pub const FLOW_FORWARD: u8 = 1;
/// [`GatewayFlow::dir`]: a backend's reply towards the client.
pub const FLOW_REPLY: u8 = 2;

/// Key of `GATEWAY_CT_V1`, the gateway's conntrack (LRU). Written by the tc
/// programs only. A flow has two entries: [`FLOW_FORWARD`] keyed as the
/// client's packets arrive (`a` = client, `b` = gateway address), whose value
/// is the backend; [`FLOW_REPLY`] keyed as the backend's replies leave (`a` =
/// backend, `b` = client), whose value is the gateway address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Pod, Zeroable)]
pub struct GatewayFlow {
    /// Source address of the packet, network byte order; IPv4 in `a[0]`.
    pub a: [u32; 4],
    /// Destination address of the packet, same encoding.
    pub b: [u32; 4],
    /// Source port, network byte order.
    pub a_port: u16,
    /// Destination port, network byte order.
    pub b_port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    /// [`PROTO_TCP`].
    pub proto: u8,
    /// [`FLOW_FORWARD`] or [`FLOW_REPLY`].
    pub dir: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<GatewayFlow>() == 40);

/// [`GatewayNat::flags`]: the client sent a FIN.
pub const CT_FIN_CLIENT: u32 = 1;
/// [`GatewayNat::flags`]: the backend sent a FIN.
pub const CT_FIN_BACKEND: u32 = 2;
/// [`GatewayNat::flags`]: either side sent an RST.
pub const CT_RST: u32 = 4;

/// Value of `GATEWAY_CT_V1`: what the packet's destination (forward) or
/// source (reply) is rewritten to. Written by the tc programs only.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct GatewayNat {
    /// Forward: the backend's address; reply: the gateway address the client
    /// dialled. Network byte order; IPv4 in `addr[0]`.
    pub addr: [u32; 4],
    /// The port to match `addr`, network byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: u8,
    /// `CT_*` bits, kept on the forward entry (the reply path sets them there).
    pub flags: u32,
    /// `bpf_ktime_get_ns` of the last packet (refreshed at most every
    /// [`GATEWAY_CT_TOUCH_NS`]); entries idle for [`GATEWAY_CT_IDLE_NS`], or
    /// closed for [`GATEWAY_CT_CLOSE_NS`], count as absent.
    pub last_seen_ns: u64,
    /// Backend id of the chosen backend (forward entry), for counters; 0 for
    /// reply entries.
    pub backend_id: u32,
    pub _pad2: u32,
    /// Forward entry of a backend on another node: the client's packets also
    /// get this source address (the node's, towards that backend), network
    /// byte order; zero otherwise.
    pub snat_addr: [u32; 4],
    /// With `snat_addr`: the source port, from [`SNAT_PORT_MIN`]..+[`SNAT_PORTS`],
    /// network byte order.
    pub snat_port: u16,
    pub _pad3: u16,
    /// With `snat_addr`: the device the packets are redirected out of
    /// (`bpf_redirect_neigh`); 0: a backend on this node (the kernel routes).
    pub ifindex: u32,
}
const _: () = assert!(core::mem::size_of::<GatewayNat>() == 64);

/// [`GatewayFlow::dir`]: a remote backend's reply to the node's SNAT address
/// and port (`a` = backend, `b` = node address); the value is the client
/// (`addr`, `port`), with the gateway address it dialled in `snat_addr` and
/// `snat_port` (to find the flow's forward entry: a port whose flow is over
/// is taken again).
pub const FLOW_SNAT_REPLY: u8 = 3;
/// First source port of the SNAT towards backends on other nodes: above the
/// default `ip_local_port_range` (32768..60999), so never a local socket's.
pub const SNAT_PORT_MIN: u16 = 61000;
/// Number of SNAT source ports (61000..=65535).
pub const SNAT_PORTS: u16 = 4536;

impl GatewayNat {
    /// Whether this forward entry is over: idle too long, or closed (FIN both
    /// ways, or an RST) for longer than the close grace.
    pub fn expired(&self, now_ns: u64) -> bool {
        let idle = now_ns.saturating_sub(self.last_seen_ns);
        let closed = self.flags & CT_RST != 0
            || self.flags & (CT_FIN_CLIENT | CT_FIN_BACKEND) == CT_FIN_CLIENT | CT_FIN_BACKEND;
        idle > GATEWAY_CT_IDLE_NS || (closed && idle > GATEWAY_CT_CLOSE_NS)
    }
}

/// Indexes into the per-CPU `GATEWAY_STATS_V1` array (the tc programs).
pub mod gateway_stat {
    /// Client packets translated to a backend (forward).
    pub const FORWARDED: u32 = 0;
    /// New flows (conntrack entries created: a SYN, or a flow picked again).
    pub const NEW_FLOWS: u32 = 1;
    /// Packets to a gateway address:port that were not SYNs and had no
    /// conntrack entry: picked again by Maglev (a FIN or RST: passed
    /// untouched).
    pub const NO_FLOW: u32 = 2;
    /// Flows that drew no backend: an address with no table (passed to the
    /// node's stack, which refuses it), or a slot missing during a table swap
    /// (dropped, the client retries).
    pub const NO_BACKEND: u32 = 3;
    /// Replies translated back to the gateway address.
    pub const REPLIED: u32 = 4;
    /// Packets that could not be rewritten (helper error).
    pub const REWRITE_FAILED: u32 = 5;
    /// New flows to a backend on another node (source-translated).
    pub const SNAT_FLOWS: u32 = 6;
    /// Remote backends' replies translated back to the client (destination).
    pub const SNAT_REPLIED: u32 = 7;
    /// SYNs to a remote backend with no free SNAT port or no route: dropped.
    pub const SNAT_FAILED: u32 = 8;
    pub const COUNT: u32 = 9;
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `bytemuck::Pod`: plain old data, no padding bytes.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::SlotKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::BackendStats {}
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::SockConn {}
    unsafe impl aya::Pod for super::EndpointKey {}
    unsafe impl aya::Pod for super::MeshScope {}
    unsafe impl aya::Pod for super::GatewayVip {}
    unsafe impl aya::Pod for super::MaglevKey {}
    unsafe impl aya::Pod for super::GatewayFlow {}
    unsafe impl aya::Pod for super::GatewayNat {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::Affinity {}
    unsafe impl aya::Pod for super::AffinityMatch {}
    unsafe impl aya::Pod for super::OutlierStats {}
    unsafe impl aya::Pod for super::SocketPolicy {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    fn mapped(a: [u8; 4]) -> [u32; 4] {
        [0, 0, V4_MAPPED_WORD, v4(a)]
    }

    #[test]
    fn pod_to_pod_keys_pair_up_across_namespaces() {
        let client = SockKey::v4(v4([10, 244, 0, 1]), v4([10, 244, 0, 2]), 4000, 80, 111);
        let server = SockKey::v4(v4([10, 244, 0, 2]), v4([10, 244, 0, 1]), 80, 4000, 222);
        assert_eq!(client.netns, 0);
        assert_eq!(client.peer(), server);
        assert_eq!(server.peer(), client);
    }

    #[test]
    fn namespace_local_keys_carry_the_namespace() {
        let lo = v4([127, 0, 0, 1]);
        let a = SockKey::v4(lo, lo, 40000, 7000, 111);
        let b = SockKey::v4(lo, lo, 40000, 7000, 222);
        assert_ne!(a, b, "same tuple in two namespaces must not collide");
        assert_eq!(a.peer().netns, 111);
        let own = v4([10, 244, 0, 1]);
        assert_eq!(SockKey::v4(own, own, 1, 2, 7).netns, 7);
        let six = [0, 0, 0, 1u32.to_be()];
        assert_eq!(SockKey::v6(six, six, 1, 2, 9).netns, 9);
    }

    #[test]
    fn ipv4_mapped_sockets_meet_their_ipv4_peer() {
        let dual = SockKey::v6(
            mapped([10, 244, 0, 1]),
            mapped([10, 244, 0, 2]),
            4000,
            80,
            5,
        );
        let plain = SockKey::v4(v4([10, 244, 0, 2]), v4([10, 244, 0, 1]), 80, 4000, 6);
        assert_eq!(dual.family, FAMILY_V4);
        assert_eq!(dual.peer(), plain);
    }

    /// A connection's two ends as `sockops` sees them at the established
    /// callbacks: (snd_una, rcv_nxt) = (own ISN + 1, peer's ISN + 1).
    fn ends(isn_client: u32, isn_server: u32) -> (ConnKey, ConnKey) {
        let client = SockKey::v4(v4([10, 244, 0, 2]), v4([10, 244, 0, 21]), 40000, 7000, 1);
        let server = SockKey::v4(v4([10, 244, 0, 21]), v4([10, 244, 0, 2]), 7000, 40000, 2);
        let (c, s) = (isn_client.wrapping_add(1), isn_server.wrapping_add(1));
        (
            SockConn::new(c, s, sock_path::UNDECIDED, 11).key(client),
            SockConn::new(s, c, sock_path::UNDECIDED, 12).key(server),
        )
    }

    #[test]
    fn the_ends_of_one_connection_name_each_other() {
        let (client, server) = ends(1000, u32::MAX);
        assert_eq!(client.peer(), server);
        assert_eq!(server.peer(), client);
        assert_eq!(client.peer().peer(), client);
    }

    /// The review's scenario: connection A's server is still in the map when
    /// connection B (another pod pair, same addresses) reuses A's 4-tuple. B's
    /// client must not name A's server as its peer, only B's server.
    #[test]
    fn a_reused_tuple_names_only_its_own_connection() {
        let (_, a_server) = ends(1000, 5000);
        let (b_client, b_server) = ends(1001, 5000);
        assert_eq!(a_server.sock, b_server.sock, "the same 4-tuple");
        assert_ne!(b_client.peer(), a_server);
        assert_eq!(b_client.peer(), b_server);
        let (c_client, _) = ends(1000, 5001);
        assert_ne!(
            c_client.peer(),
            a_server,
            "a different server ISN is enough"
        );
    }

    #[test]
    fn a_record_gives_back_the_key_it_was_made_for() {
        let sock = SockKey::v4(v4([10, 244, 0, 2]), v4([10, 244, 0, 21]), 1, 2, 0);
        let conn = SockConn::new(7, 9, sock_path::TCP, 42);
        let key = conn.key(sock);
        assert_eq!((key.sock, key.local_seq, key.remote_seq), (sock, 7, 9));
    }

    #[test]
    fn a_destination_key_is_never_a_dialled_one_and_decodes_back() {
        for family in [FAMILY_V4, FAMILY_V6] {
            let port = ServiceKey {
                addr: [1, 2, 3, 4],
                port: 80u16.to_be(),
                proto: PROTO_TCP,
                family,
            };
            assert_eq!(destination_of(port.family), None);
            for index in [0, 1, MAX_DESTINATIONS - 1] {
                let key = destination_key(&port, index);
                assert_ne!(key.family, FAMILY_V4);
                assert_ne!(key.family, FAMILY_V6);
                assert_eq!(destination_of(key.family), Some((family, index)));
                assert_eq!(
                    (key.addr, key.port, key.proto),
                    (port.addr, port.port, port.proto)
                );
            }
        }
    }
}
