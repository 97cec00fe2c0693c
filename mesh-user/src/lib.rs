//! mesh-agent: the node agent of the eBPF service-mesh data plane.
//!
//! Data flow: `source` (files or Kubernetes) -> [`index`] (objects, validated) ->
//! [`compile`] (pure: desired slot tables + diagnostics) -> [`apply`] (the only
//! writer of the BPF maps) -> kernel (`mesh-ebpf`).

pub mod agent;
pub mod apply;
pub mod compile;
pub mod counters;
pub mod diag;
pub mod index;
pub mod inspect;
pub mod loader;
pub mod model;
pub mod pin;
pub mod record;
pub mod source;
pub mod sys;
pub mod telemetry;
pub mod validate;
