//! The kernel side of the agent: loading and attaching the programs
//! ([`loader`]), our directory in bpffs ([`pin`]), the maps and the only code
//! that writes them ([`apply`], through [`maps`] and [`codec`]), the raw
//! syscalls aya lacks ([`sys`]), the kernel-written entries an upgrade carries
//! into a replaced map ([`carry`]), the kernel's counters ([`counters`]), the
//! agent's record of what the tables mean ([`record`]), and the agent's own
//! cgroup, whose connects the hooks leave alone ([`own_cgroup`]), the pods'
//! cgroups, which scope the mesh ([`pod_cgroups`], written by [`scope`]), and
//! the per-backend counters sockops keeps for outlier detection and least
//! request ([`backend_counters`]), and what the maps cost the kernel
//! ([`memory`]).

pub mod apply;
pub mod backend_counters;
mod carry;
pub mod codec;
pub mod counters;
pub mod ingress;
pub mod loader;
pub mod maps;
pub mod memory;
pub mod netns;
pub mod own_cgroup;
pub mod pin;
pub mod pod_cgroups;
pub mod record;
pub mod scope;
mod sys;

pub use sys::count_keys;
