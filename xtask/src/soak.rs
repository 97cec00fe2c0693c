//! `cargo xtask soak [--minutes N | --seconds N]`: the soak (tools/src/bin/mesh-soak)
//! against the test API server. CI runs `cargo xtask soak --minutes 1`; a longer
//! run's figures are in docs/soak.md.

use std::process::Command;

use crate::{build_bins, require_root, run, setup, workspace};

pub fn soak(seconds: u64, dev: bool, args: &[String]) -> anyhow::Result<()> {
    setup::ensure_all()?;
    require_root(
        "the soak creates network namespaces and cgroups, loads BPF programs and runs an API server",
    )?;
    // The API server the agent follows (built once, cached).
    run(Command::new("bash")
        .arg(workspace().join("scripts/test-apiserver.sh"))
        .arg("build"))?;
    run(Command::new(build_bins(dev)?.join("mesh-soak"))
        .args(["--seconds", &seconds.to_string()])
        .args(args)
        .current_dir(workspace()))
}
