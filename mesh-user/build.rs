//! Builds the kernel programs (mesh-ebpf) with the nightly toolchain and bpf-linker
//! and leaves the object in OUT_DIR, where `src/loader.rs` embeds it.
//!
//! Missing toolchain pieces? `cargo xtask setup` installs them.

use anyhow::Context as _;

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("mesh-user has a parent directory")?
        .join("mesh-ebpf");
    let root = root.to_str().context("workspace path is UTF-8")?;
    aya_build::build_ebpf(
        [aya_build::Package { name: "mesh-ebpf", root_dir: root, ..Default::default() }],
        aya_build::Toolchain::Nightly,
    )
    .context("building the kernel programs failed; `cargo xtask setup` installs the toolchain (nightly rust-src, bpf-linker with LLVM 22)")
}
