//! Installs what is missing, idempotently; each step says what it runs.
//!
//! Versions are pinned here, in one place: LLVM 22 (the major version rustc's
//! nightly uses, which bpf-linker must match) and bpf-linker 0.13.0.

use std::process::Command;

use anyhow::bail;

use crate::run;

const LLVM: &str = "22";
const BPF_LINKER_VERSION: &str = "0.13.0";
// bpftool: the gateway tests read and flush the kernel's conntrack map with
// it (a fresh machine of this kind lacks it: gateway_outside failed in CI).
const APT_PACKAGES: [&str; 5] = [
    "llvm-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "iproute2",
    "bpftool",
];

pub fn ensure_all() -> anyhow::Result<()> {
    apt_packages()?;
    nightly_rust_src()?;
    bpf_linker()
}

fn ok(cmd: &mut Command) -> bool {
    cmd.output().is_ok_and(|o| o.status.success())
}

/// What `cargo xtask bench` compares against: kube-proxy's iptables and
/// nftables layouts, and HAProxy as the userspace proxy hop.
const BENCH_PACKAGES: &[&str] = &["haproxy", "iptables", "nftables", "util-linux"];

pub fn ensure_bench_tools() -> anyhow::Result<()> {
    install_missing(BENCH_PACKAGES)
}

fn apt_packages() -> anyhow::Result<()> {
    install_missing(&APT_PACKAGES)
}

fn install_missing(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", p])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let install = format!("apt-get update && apt-get install -y {}", missing.join(" "));
    if !ok(Command::new("apt-get").arg("--version")) {
        bail!("missing packages {missing:?}; install them (Debian: `{install}`)");
    }
    eprintln!("setup: {install}");
    run(Command::new("sh").args(["-c", &format!("DEBIAN_FRONTEND=noninteractive {install}")]))
        .map_err(|e| anyhow::anyhow!("{e}\nrun as root: {install}"))
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: rustup component add rust-src --toolchain nightly");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
        .map_err(|e| anyhow::anyhow!("{e}\nthe kernel programs need the nightly toolchain with rust-src: `rustup toolchain install nightly --component rust-src`"))
}

fn bpf_linker() -> anyhow::Result<()> {
    let version = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    if version
        .as_deref()
        .is_ok_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        return Ok(());
    }
    let prefix = format!("/usr/lib/llvm-{LLVM}");
    let args = [
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--no-default-features",
        "--features",
        "llvm-22",
    ];
    eprintln!(
        "setup: LLVM_PREFIX={prefix} cargo {} (about a minute)",
        args.join(" ")
    );
    // Without LLVM_PREFIX it finds Debian's default llvm-config (14) and fails to link.
    run(Command::new("cargo").args(args).env("LLVM_PREFIX", &prefix))
}
