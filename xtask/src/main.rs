//! Developer workflows. Each installs what it needs that is missing (or says the
//! exact command when it cannot), then does its job:
//!
//! - `cargo xtask setup`      toolchain pieces and packages (idempotent)
//! - `cargo xtask build-ebpf` the kernel object alone
//! - `cargo xtask demo`       the seed's 80/20 canary, observed live (root);
//!   `--cluster` on the real node
//! - `cargo xtask cluster`    up | down | status: a real node with the mesh (root)
//! - `cargo xtask test`       every test: unit, property, and privileged (root)
//! - `cargo xtask fuzz`       each fuzz target for a bounded time (nightly)
//! - `cargo xtask soak`       faults and churn at once, then a check (root)

mod fuzz;
mod setup;
mod soak;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Install what building and testing need: LLVM 22 dev files, nightly rust-src, bpf-linker, iproute2.
    Setup,
    /// Build the kernel object (target/bpfel-unknown-none/release/mesh-ebpf).
    BuildEbpf {
        /// Build the upgrade test's "new version" instead (feature `upgrade-test`,
        /// into target/ebpf-upgrade-test/).
        #[arg(long)]
        upgrade_test: bool,
    },
    /// Run the canary demo: 80/20, then 50/50 after a live edit.
    Demo {
        /// Seconds to show each split.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        /// On the real node (`cargo xtask cluster up`, which it runs): the
        /// seed's pods, Deployments and `kubectl edit`, as its user types them.
        #[arg(long)]
        cluster: bool,
    },
    /// A real single-node Kubernetes on this machine with the mesh deployed
    /// as shipped (kubelet on docker, every controller; docs/node.md).
    Cluster {
        #[command(subcommand)]
        action: ClusterCmd,
    },
    /// Benchmarks side by side (docs/benchmarks.md): ours vs direct, iptables,
    /// nftables, a proxy hop, AF_UNIX; plus the agent's own costs.
    Bench {
        /// A smoke run (about two and a half minutes); does not rewrite docs/benchmarks.md.
        #[arg(long)]
        quick: bool,
        /// Rounds (default 5).
        #[arg(long)]
        rounds: Option<usize>,
        /// Run the dev profile's binaries (the ones `cargo xtask test` builds):
        /// for a smoke run whose numbers are not read, so that CI builds once.
        #[arg(long)]
        dev: bool,
    },
    /// Fuzz what the agent reads (a folder's YAML, an API server's objects) with
    /// cargo-fuzz, each target for a bounded time; fails if an input crashes.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// The soak: endpoint churn, weight edits, agent SIGKILLs, API server
    /// restarts and a connect storm at once; fails on a failed connect or a final
    /// kernel state that differs from the configuration.
    Soak {
        /// How long the churn runs (default 10; CI: 1).
        #[arg(long, conflicts_with = "seconds")]
        minutes: Option<u64>,
        #[arg(long)]
        seconds: Option<u64>,
        /// Run the dev profile's binaries (the ones `cargo xtask test` builds),
        /// as CI does: the soak checks connects and state, not speed.
        #[arg(long)]
        dev: bool,
        /// More `mesh-soak` flags (after `--`; `--help` lists them).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run all tests (the privileged ones need root, BPF, cgroup v2 and netns).
    Test {
        /// Extra arguments for `cargo test` (after `--`).
        #[arg(last = true)]
        args: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
enum ClusterCmd {
    /// Start it (idempotent), deploy the mesh, print `export KUBECONFIG=...`
    /// and `export DOCKER_HOST=...`.
    Up,
    /// Uninstall the mesh and stop the node; nothing is left behind.
    Down,
    /// Whether it runs, its pods, the exports.
    Status,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::ensure_all(),
        Cmd::BuildEbpf { upgrade_test } => {
            setup::ensure_all()?;
            build_ebpf(upgrade_test)
        }
        Cmd::Demo {
            seconds,
            cluster: true,
        } => cluster(&["demo", "--seconds", &seconds.to_string()]),
        Cmd::Cluster { action } => cluster(&[match action {
            ClusterCmd::Up => "up",
            ClusterCmd::Down => "down",
            ClusterCmd::Status => "status",
        }]),
        Cmd::Demo {
            seconds,
            cluster: false,
        } => {
            setup::ensure_all()?;
            require_root("the demo creates network namespaces and cgroups and loads BPF programs")?;
            run(Command::new(build_bins(false)?.join("mesh-demo"))
                .args(["--seconds", &seconds.to_string()])
                .current_dir(workspace()))
        }
        Cmd::Bench { quick, rounds, dev } => {
            setup::ensure_all()?;
            setup::ensure_bench_tools()?;
            require_root(
                "the benchmark creates network namespaces and cgroups and loads BPF programs",
            )?;
            // The Kubernetes propagation measurement uses the tests' API server.
            run(Command::new("bash")
                .arg(workspace().join("scripts/test-apiserver.sh"))
                .arg("build"))?;
            let mut cmd = Command::new(build_bins(dev)?.join("mesh-bench"));
            if quick {
                cmd.arg("--quick");
            } else {
                cmd.args(["--write", "docs/benchmarks.md"]);
            }
            if let Some(r) = rounds {
                cmd.args(["--rounds", &r.to_string()]);
            }
            run(cmd.current_dir(workspace()))
        }
        Cmd::Fuzz { seconds } => {
            // The targets build mesh-user, whose build script builds the kernel programs.
            setup::ensure_all()?;
            fuzz::fuzz(seconds)
        }
        Cmd::Soak {
            minutes,
            seconds,
            dev,
            args,
        } => soak::soak(seconds.unwrap_or(minutes.unwrap_or(10) * 60), dev, &args),
        Cmd::Test { args } => {
            setup::ensure_all()?;
            require_root(
                "the integration tests load BPF programs into cgroups and create network namespaces",
            )?;
            // A real kube-apiserver for the Kubernetes tests: built once from
            // Debian's sources and cached by version outside the repository.
            run(Command::new("bash")
                .arg(workspace().join("scripts/test-apiserver.sh"))
                .arg("build"))?;
            // A real node (kubelet on docker, scheduler, CNI, images) for the
            // node tests: built once and cached the same way.
            run(Command::new("bash")
                .arg(workspace().join("scripts/test-node.sh"))
                .arg("build"))?;
            // The privileged tests run the real binaries (mesh-agent, and
            // mesh-tools' clients); build them first. (The default members:
            // mesh-ebpf only builds for the BPF target, through mesh-user's build
            // script.)
            cargo(&["build", "--bins"])?;
            // The upgrade test swaps this object in for the embedded one.
            build_ebpf(true)?;
            // Every crate's tests, including mesh-tests, which is not a default
            // member (plain `cargo test` runs only what needs no privileges).
            let mut all = vec!["test", "--workspace", "--exclude", "mesh-ebpf"];
            if !args.is_empty() {
                all.push("--");
                all.extend(args.iter().map(String::as_str));
            }
            cargo_test(&all)
        }
    }
}

/// `mesh-cluster ARGS` (tools/src/bin/mesh-cluster.rs), after building what
/// it runs: the node's binaries and images (cached by version), the release
/// binaries (the agent's image is made of the release `mesh-agent`).
fn cluster(args: &[&str]) -> anyhow::Result<()> {
    setup::ensure_all()?;
    require_root("the cluster runs a kubelet, docker and BPF programs on this machine")?;
    if args != ["down"] && args != ["status"] {
        for script in ["scripts/test-apiserver.sh", "scripts/test-node.sh"] {
            run(Command::new("bash")
                .arg(workspace().join(script))
                .arg("build"))?;
        }
    }
    run(Command::new(build_bins(false)?.join("mesh-cluster"))
        .args(args)
        .current_dir(workspace()))
}

/// Builds the workspace's binaries, release or (`dev`) the dev profile the
/// tests use, and returns the folder they are in.
pub fn build_bins(dev: bool) -> anyhow::Result<PathBuf> {
    if dev {
        cargo(&["build", "--bins"])?;
        Ok(workspace().join("target/debug"))
    } else {
        cargo(&["build", "--release", "--bins"])?;
        Ok(workspace().join("target/release"))
    }
}

/// The kernel object on its own, built exactly as mesh-user's build script does.
/// Where `build-ebpf --upgrade-test` puts its object.
pub const UPGRADE_TEST_TARGET: &str = "target/ebpf-upgrade-test";

fn build_ebpf(upgrade_test: bool) -> anyhow::Result<()> {
    let mut cmd = Command::new("cargo");
    cmd.args([
        "+nightly",
        "build",
        "--package",
        "mesh-ebpf",
        "--bins",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ]);
    let target = if upgrade_test {
        cmd.args([
            "--features",
            "upgrade-test",
            "--target-dir",
            UPGRADE_TEST_TARGET,
        ]);
        UPGRADE_TEST_TARGET
    } else {
        "target"
    };
    cmd.env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!(
            "--cfg=bpf_target_arch=\"{}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf",
            std::env::consts::ARCH
        ),
    )
    .current_dir(workspace());
    run(&mut cmd)?;
    println!(
        "kernel object: {}",
        workspace()
            .join(target)
            .join("bpfel-unknown-none/release/mesh-ebpf")
            .display()
    );
    Ok(())
}

pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_default()
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(args)
            .current_dir(workspace()),
    )
}

/// `cargo test`, streamed, then one closing line that totals every test binary's
/// `test result:` line (cargo's own last line is often a crate with no doc-tests).
fn cargo_test(args: &[&str]) -> anyhow::Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    for line in BufReader::new(child.stdout.take().context("cargo test stdout")?).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| {
                rest.split(';').find_map(|part| {
                    part.trim()
                        .strip_suffix(word)?
                        .trim()
                        .rsplit(' ')
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
            };
            passed += count(" passed").unwrap_or(0);
            failed += count(" failed").unwrap_or(0);
        }
    }
    let status = child.wait()?;
    println!("{passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed");
    }
    if passed == 0 {
        bail!("no test ran");
    }
    Ok(())
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn require_root(why: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions. (xtask keeps its dependencies minimal.)
    if unsafe { geteuid() } != 0 {
        bail!("this needs root: {why}. Run it as root, e.g. `sudo -E cargo xtask ...`");
    }
    Ok(())
}

unsafe extern "C" {
    fn geteuid() -> u32;
}
