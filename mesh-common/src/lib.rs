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

/// Map names, versioned with their layout.
pub mod map_names {
    pub const SERVICES: &str = "SERVICES_V1";
    pub const SLOTS: &str = "SLOTS_V1";
    pub const REVNAT: &str = "REVNAT_V1";
    pub const BACKEND_STATS: &str = "BACKEND_STATS_V1";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS_V1";
}

/// Program names (the Rust function names in `mesh-ebpf`).
pub mod program_names {
    pub const CONNECT4: &str = "mesh_connect4";
    pub const CONNECT6: &str = "mesh_connect6";
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    pub const GETPEERNAME6: &str = "mesh_getpeername6";
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
    pub const COUNT: u32 = 5;
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
    /// Reserved for flags; zero.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

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

/// Value of the per-CPU `BACKEND_STATS_V1` (key: `backend_id`). The kernel increments
/// existing entries only; the agent creates an entry (zeroed) when it assigns an id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BackendStats {
    /// Connects rewritten to this backend.
    pub connects: u64,
}
const _: () = assert!(core::mem::size_of::<BackendStats>() == 8);

#[cfg(feature = "user")]
mod user {
    // SAFETY: all of these are `bytemuck::Pod`: plain old data, no padding bytes.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::SlotKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::OrigDst {}
    unsafe impl aya::Pod for super::BackendStats {}
}
