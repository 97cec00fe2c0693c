//! mesh-agent: the node agent of the eBPF service-mesh data plane.
//!
//! The modules are the stages of the data flow, each importing only earlier ones:
//!
//! ```text
//! model   the objects we read, their names, diagnostics (no I/O)
//! source  a folder or an API server -> typed events on a channel
//! index   events -> objects, validated; last accepted versions (pure)
//! compile index -> desired slot tables + diagnostics (pure)
//! router  the HTTP router of gateway ports whose routes need a per-request decision
//! kernel  the programs, the pinned maps, and apply: the only writer of the maps
//! agent   the loop: events in, index, compile, apply
//! cli     check, status, dump, explain, cleanup
//! ```

pub mod agent;
pub mod cli;
pub mod compile;
pub mod index;
pub mod kernel;
pub mod model;
pub mod outlier;
pub mod router;
pub mod source;
pub mod telemetry;
