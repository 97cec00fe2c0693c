//! The maps, one static each. Names carry the layout version (see `mesh-common`).

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, SockHash},
};
use mesh_common::{
    Backend, BackendStats, ConnKey, EndpointKey, MAX_BACKENDS, MAX_MESHED_PODS,
    MAX_REDIRECT_EXCLUDED, MAX_REVNAT, MAX_SERVICES, MAX_SLOTS, MAX_SOCKETS, MeshScope, OrigDst,
    ServiceKey, ServiceValue, SlotKey, SockConn, SockKey, global_stat, sock_stat,
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

/// Backend id -> per-CPU counters. The agent creates (zeroed) entries; the kernel
/// only increments existing ones.
#[map(name = "BACKEND_STATS_V1")]
pub static BACKEND_STATS: PerCpuHashMap<u32, BackendStats> =
    PerCpuHashMap::with_max_entries(MAX_BACKENDS, BPF_F_NO_PREALLOC);

/// Service id -> per-CPU count of connects to that service port (rewritten or
/// refused). The agent creates (zeroed) entries when it assigns an id; the kernel
/// only increments existing ones.
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
