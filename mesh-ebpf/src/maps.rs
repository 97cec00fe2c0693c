//! The maps, one static each. Names carry the layout version (see `mesh-common`).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
};
use mesh_common::{
    Affinity, AffinityKey, AffinityMatch, Backend, BackendStats, ConnKey, EndpointKey, GatewayFlow,
    GatewayNat, GatewayVip, MAX_AFFINITY, MAX_AFFINITY_MATCH, MAX_BACKENDS, MAX_CONNECTING,
    MAX_COUNTED, MAX_GATEWAY_CT, MAX_GATEWAY_VIPS, MAX_MAGLEV_SLOTS, MAX_MESHED_PODS, MAX_OUTLIER,
    MAX_REDIRECT_EXCLUDED, MAX_REVNAT, MAX_SERVICES, MAX_SLOTS, MAX_SOCKETS, MaglevKey, MeshScope,
    OrigDst, OutlierStats, ServiceKey, ServiceValue, SlotKey, SockConn, SockKey, SocketPolicy,
    gateway_stat, global_stat, sock_stat,
};

/// (VIP, port, protocol) -> live table of that service port.
/// Writer: agent. `BPF_F_NO_PREALLOC` so that replacing a value is RCU-safe: a
/// concurrent reader sees the old value or the new one, never a recycled element.
#[map(name = "SERVICES_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// (service id, revision, slot) -> backend. Writer: agent, which fills a whole new
/// revision before flipping `SERVICES_V1` to it and frees the old one after a grace
/// period.
#[map(name = "SLOTS_V1")]
pub static SLOTS: HashMap<SlotKey, Backend> =
    HashMap::with_max_entries(MAX_SLOTS, BPF_F_NO_PREALLOC);

/// Socket cookie -> the VIP:port the application dialled. Writer: `connect4/6`;
/// reader: `getpeername4/6`. LRU: entries of closed sockets age out.
#[map(name = "REVNAT_V1")]
pub static REVNAT: LruHashMap<u64, OrigDst> = LruHashMap::with_max_entries(MAX_REVNAT, 0);

/// (client network namespace, service id) -> the backend it drew and when it
/// last connected: `sessionAffinity: ClientIP`. Writer: `connect4/6` (LRU:
/// idle clients age out; the agent never writes it).
#[map(name = "AFFINITY_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, Affinity> =
    LruHashMap::with_max_entries(MAX_AFFINITY, 0);

/// (service id, backend id) -> the service's affinity timeout in seconds, for
/// each backend of each service with session affinity. Writer: agent. A
/// client's affinity holds only while its backend is here.
#[map(name = "AFFINITY_MATCH_V1")]
pub static AFFINITY_MATCH: HashMap<AffinityMatch, u32> =
    HashMap::with_max_entries(MAX_AFFINITY_MATCH, BPF_F_NO_PREALLOC);

/// A backend watched by outlier detection (its endpoint) -> per-CPU counts of
/// its connects' outcomes. Writer: agent (creates zeroed, deletes) and sockops
/// (counts). Not LRU: a watched backend never loses its count.
#[map(name = "OUTLIER_V1")]
pub static OUTLIER: PerCpuHashMap<EndpointKey, OutlierStats> =
    PerCpuHashMap::with_max_entries(MAX_OUTLIER, BPF_F_NO_PREALLOC);

/// Service id -> the socket options its clients' TCP sockets get at
/// `connect()` (`connectTimeout`, `tcpKeepalive`). Writer: agent.
#[map(name = "SOCKET_POLICY_V1")]
pub static SOCKET_POLICY: HashMap<u32, SocketPolicy> =
    HashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Socket cookie -> 1 for a connect whose `TCP_USER_TIMEOUT` connect4/6 set
/// (the connect timeout); sockops clears the option at ESTABLISHED, so it
/// never applies to the established connection. Writer: connect4/6 (insert),
/// sockops (delete). LRU: a connect that never completes ages out.
#[map(name = "CONNECTING_V1")]
pub static CONNECTING: LruHashMap<u64, u32> = LruHashMap::with_max_entries(MAX_CONNECTING, 0);

/// A backend of a service with LEAST_REQUEST (its endpoint) -> per-CPU counts
/// of its open connections (signed: one CPU's +1 may be another's -1; the sum
/// is the count). Writer: agent (creates zeroed, deletes) and sockops (+1 when
/// a rewritten connect starts, -1 when it closes). connect4/6 sum the CPUs.
#[map(name = "ACTIVE_V1")]
pub static ACTIVE: PerCpuHashMap<EndpointKey, i64> =
    PerCpuHashMap::with_max_entries(MAX_OUTLIER, BPF_F_NO_PREALLOC);

/// Socket cookie -> the backend its connection counts for in `ACTIVE_V1`:
/// the count is lowered once, when the socket closes and its record goes.
/// Writer: sockops. Not LRU: a lost record would leave a count up for good.
#[map(name = "COUNTED_V1")]
pub static COUNTED: HashMap<u64, EndpointKey> =
    HashMap::with_max_entries(MAX_COUNTED, BPF_F_NO_PREALLOC);

/// Backend id -> per-CPU counters. Writer: connect4/6, which create an id's
/// entry on its first connect (`stats::count`); the agent deletes the entry
/// when it frees the id and again when it hands the id out anew.
#[map(name = "BACKEND_STATS_V1")]
pub static BACKEND_STATS: PerCpuHashMap<u32, BackendStats> =
    PerCpuHashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// Service id -> per-CPU count of connects to that service port (rewritten or
/// refused). Writer: connect4/6, which create an id's entry on its first
/// connect; the agent deletes the entry when it hands a freed id out anew.
#[map(name = "SERVICE_STATS_V1")]
pub static SERVICE_STATS: PerCpuHashMap<u32, u64> =
    PerCpuHashMap::with_max_entries(MAX_SERVICES, BPF_F_NO_PREALLOC);

/// Per-CPU global counters, indexed by `mesh_common::global_stat`. Writer: kernel.
#[map(name = "GLOBAL_STATS_V1")]
pub static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(global_stat::COUNT, 0);

/// Established mesh TCP sockets of this node, each under its own [`ConnKey`]
/// (4-tuple and both initial sequence numbers). Writer: `sockops` (the kernel
/// removes a socket when it closes); the `sk_msg` program is attached to this map
/// and redirects into it.
#[map(name = "SOCKETS_V2")]
pub static SOCKETS: SockHash<ConnKey> = SockHash::with_max_entries(MAX_SOCKETS, 0);

/// A mesh socket's 4-tuple -> its record (sequence numbers for its [`ConnKey`],
/// path decision, owner's cookie): the socket in `SOCKETS_V2` with that tuple
/// owns it. Writer: `sockops` (creates it before adding the socket, deletes it
/// when the owner closes) and `sk_msg` (marks a socket whose first message found
/// no local peer as TCP for good). Not LRU: an evicted record would let another
/// socket take the tuple while its owner still redirects.
#[map(name = "SOCK_CONN_V1")]
pub static SOCK_CONN: HashMap<SockKey, SockConn> =
    HashMap::with_max_entries(MAX_SOCKETS, BPF_F_NO_PREALLOC);

/// Per-CPU redirection counters, indexed by `mesh_common::sock_stat`. Writer: kernel.
#[map(name = "SOCK_STATS_V1")]
pub static SOCK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(sock_stat::COUNT, 0);

/// Endpoints (pod IP, port) whose connections keep to TCP. Writer: agent.
#[map(name = "REDIRECT_EXCLUDED_V1")]
pub static REDIRECT_EXCLUDED: HashMap<EndpointKey, u32> =
    HashMap::with_max_entries(MAX_REDIRECT_EXCLUDED, BPF_F_NO_PREALLOC);

/// Index 0: the cgroup id (the cgroup v2 directory's inode number, host byte
/// order) of the agent holding this pin dir; 0 for none. Writer: agent, at start,
/// before it dials the API server. `connect4/6` leave that cgroup's connects
/// alone, so the agent never depends on its own tables to reach the API server
/// (an emptied `kubernetes` EndpointSlice must not lock it out of the restore).
#[map(name = "AGENT_CGROUP_V1")]
pub static AGENT_CGROUP: Array<u64> = Array::with_max_entries(1, 0);

/// Index 0: which sockets under the attach point are meshed. Writer: agent, at
/// start. Readers: connect4/6 (for service connects only) and sockops.
#[map(name = "MESH_SCOPE_V1")]
pub static MESH_SCOPE: Array<MeshScope> = Array::with_max_entries(1, 0);

/// Network namespace cookies (host byte order) of this node's meshed pods
/// -> 0. Writer: agent, as pods come, go and their namespace's label changes.
#[map(name = "MESHED_PODS_V1")]
pub static MESHED_PODS: HashMap<u64, u32> =
    HashMap::with_max_entries(MAX_MESHED_PODS, BPF_F_NO_PREALLOC);

/// Index 0: the network namespace cookie (host byte order) of the node's own
/// namespace, where the gateway's connect hooks translate gateway ports; 0: none.
/// Writer: agent, at start.
#[map(name = "GATEWAY_NETNS_V1")]
pub static GATEWAY_NETNS: Array<u64> = Array::with_max_entries(1, 0);

/// Index 0: the `SO_MARK` (host byte order) the agent's gateway router sets on
/// its sockets to backends; 0: none. Writer: agent, at start. Reader:
/// `mesh_router_sockops`, on the agent's own cgroup, which adds only sockets
/// with that mark to `SOCKETS_V2` (the agent's other sockets stay on TCP).
#[map(name = "ROUTER_MARK_V1")]
pub static ROUTER_MARK: Array<u32> = Array::with_max_entries(1, 0);

/// (node address, gateway port, TCP, family) -> the live Maglev table of that
/// gateway port, for clients outside the node (tc). Writer: agent, which
/// fills a new table in `MAGLEV_V1` before flipping the entry to it.
#[map(name = "GATEWAY_VIPS_V1")]
pub static GATEWAY_VIPS: HashMap<ServiceKey, GatewayVip> =
    HashMap::with_max_entries(MAX_GATEWAY_VIPS, BPF_F_NO_PREALLOC);

/// (table id, slot) -> backend: the gateway's weighted Maglev tables. Writer:
/// agent (a table is never changed once a `GATEWAY_VIPS_V1` entry names it;
/// it is deleted a few seconds after none does).
#[map(name = "MAGLEV_V1")]
pub static MAGLEV: HashMap<MaglevKey, Backend> =
    HashMap::with_max_entries(MAX_MAGLEV_SLOTS, BPF_F_NO_PREALLOC);

/// The gateway's conntrack: each flow's forward entry (client -> gateway
/// address: the backend) and reply entry (backend -> client: the gateway
/// address). Writers: the tc programs only. LRU: under pressure the least
/// recently used flows are forgotten; lifetimes are in `mesh_common`
/// (`GATEWAY_CT_*_NS`).
#[map(name = "GATEWAY_CT_V1")]
pub static GATEWAY_CT: LruHashMap<GatewayFlow, GatewayNat> =
    LruHashMap::with_max_entries(MAX_GATEWAY_CT, 0);

/// Per-CPU counters of the tc programs, indexed by `mesh_common::gateway_stat`.
/// Writer: kernel.
#[map(name = "GATEWAY_STATS_V1")]
pub static GATEWAY_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(gateway_stat::COUNT, 0);

/// Per-CPU scratch space of the gateway's tc programs (values too large for
/// the 512-byte stack). Not pinned, no writer but the program running on that
/// CPU, nothing kept between runs.
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// [`SCRATCH`]'s value.
#[repr(C)]
pub struct Scratch {
    /// `bpf_fib_lookup`'s parameters (`remote_route`).
    pub fib: aya_ebpf::bindings::bpf_fib_lookup,
    /// A conntrack value being built (`snat_port`).
    pub nat: GatewayNat,
    /// A new flow's forward and reply values (`new_flow`).
    pub fwd: GatewayNat,
    pub back: GatewayNat,
}
