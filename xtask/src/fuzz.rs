//! `cargo xtask fuzz`: runs each fuzz target of `fuzz/` (cargo-fuzz, libFuzzer,
//! nightly) for a bounded time, failing if any input crashes, hangs or blows the
//! memory limit. Committed seeds are in `fuzz/seeds/<target>`; what libFuzzer
//! learns goes to `fuzz/corpus/<target>` and what it finds to
//! `fuzz/artifacts/<target>` (both ignored by git).
//!
//! The targets are built without a sanitizer and with debug assertions and
//! overflow checks ([`BUILD_FLAGS`]): the code fuzzed is safe Rust, so what we
//! hunt is panics (an index, a slice, a byte truncation, an `unwrap`), overflows,
//! hangs and unbounded memory, which need no sanitizer. Measured on the 2-core
//! machine: AddressSanitizer made the cold build only ~10% costlier (13.2 against
//! 12.0 CPU-minutes: release builds of the dependencies are the cost), but
//! `file_parse` ran 5.4 times slower (1322 against 7205 inputs/s) and 7 times
//! larger (296 against 40 MB). The build goes to a cache outside the repository,
//! one directory per nightly rustc, cargo-fuzz version and `fuzz/Cargo.lock`
//! ([`target_dir`]), so a second run on the same machine only rebuilds what
//! changed in the tree.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, bail};

use crate::{run, workspace};

/// Every target in `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 3] = ["file_parse", "compile", "kubernetes"];

/// A single input running longer than this is a failure (a hang).
const INPUT_TIMEOUT_SECONDS: u32 = 25;

/// Memory (RSS) over this is a failure: input must have a bounded cost.
const RSS_LIMIT_MB: u32 = 2048;

/// Pinned, as setup pins its tools.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// `cargo fuzz build` and `run` options (the same for both, or `run` rebuilds):
/// release optimizations (cargo-fuzz's default), debug assertions and overflow
/// checks on, no sanitizer.
const BUILD_FLAGS: [&str; 3] = ["--sanitizer", "none", "--debug-assertions"];

/// Where the fuzz builds are cached (`MESH_FUZZ_CACHE` overrides).
const CACHE_ROOT: &str = "/var/cache/mesh-fuzz";

/// Cache directories unused this long are removed when another is used.
const CACHE_KEEP: Duration = Duration::from_secs(14 * 24 * 3600);

pub fn fuzz(seconds: u64) -> anyhow::Result<()> {
    ensure_cargo_fuzz()?;
    let dir = workspace().join("fuzz");
    let target_dir = target_dir()?;
    let cargo_fuzz = |sub: &str| {
        let mut cmd = Command::new("cargo");
        cmd.args(["+nightly", "fuzz", sub])
            .args(BUILD_FLAGS)
            .args(
                target_dir
                    .iter()
                    .flat_map(|d| [Path::new("--target-dir"), d]),
            )
            .current_dir(workspace());
        cmd
    };
    // One build for all the targets.
    println!("== building the fuzz targets ({})", BUILD_FLAGS.join(" "));
    run(&mut cargo_fuzz("build"))?;
    let mut failed = Vec::new();
    for target in TARGETS {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        println!("== fuzzing {target} for {seconds} s");
        // New inputs are written to the first corpus folder, so the seeds stay
        // as committed.
        let status = cargo_fuzz("run")
            .arg(target)
            .arg(&corpus)
            .arg(dir.join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            .arg(format!("-timeout={INPUT_TIMEOUT_SECONDS}"))
            .arg(format!("-rss_limit_mb={RSS_LIMIT_MB}"))
            .arg(format!("-dict={}", dir.join("yaml.dict").display()))
            .arg("-print_final_stats=1")
            // CI's runs are reproducible (a fixed seed): a red CI is a real
            // finding to replay, never luck; local runs explore anew each time.
            .args(std::env::var_os("CI").map(|_| "-seed=20261130"))
            // In CI, no line per new input (thousands a minute): the final stats,
            // and a crash's report, are printed whatever the verbosity.
            .args(std::env::var_os("CI").map(|_| "-verbosity=0"))
            .status()?;
        if !status.success() {
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        let dir_flag = target_dir
            .map(|d| format!(" --target-dir {}", d.display()))
            .unwrap_or_default();
        bail!(
            "fuzzing found inputs that crash {failed:?}: they are in fuzz/artifacts/<target>/ \
             (`cargo +nightly fuzz fmt {}{dir_flag} <target> <file>` shows one); make each a regression test in mesh-user",
            BUILD_FLAGS.join(" ")
        );
    }
    println!("fuzzing: no crash in {} targets", TARGETS.len());
    Ok(())
}

/// The build's target directory: `<cache>/<key>/`, the key naming the nightly
/// rustc (its commit), the cargo-fuzz version and a hash of `fuzz/Cargo.lock`,
/// so that no two of them share (or invalidate) a build. `None` (cargo-fuzz's
/// own `fuzz/target`) when the cache cannot be created, e.g. not as root.
fn target_dir() -> anyhow::Result<Option<PathBuf>> {
    let root = std::env::var_os("MESH_FUZZ_CACHE").map_or_else(|| CACHE_ROOT.into(), PathBuf::from);
    let rustc = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let field = |name: &str| {
        rustc
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("unknown")
            .to_owned()
    };
    let lock = output(Command::new("sha256sum").arg(workspace().join("fuzz/Cargo.lock")))?;
    let key = format!(
        "nightly-{}-{}-cargo-fuzz-{CARGO_FUZZ_VERSION}-lock-{}",
        field("commit-date:"),
        field("commit-hash:").get(..9).unwrap_or("unknown"),
        lock.get(..16).context("sha256sum printed no hash")?,
    );
    let dir = root.join(key);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        println!(
            "fuzz: no build cache ({}: {e}); building in fuzz/target",
            dir.display()
        );
        return Ok(None);
    }
    // Its modification time says when it was last used.
    std::fs::write(dir.join(".last-used"), "")?;
    println!("fuzz: build cache {}", dir.display());
    prune(&root, &dir);
    Ok(Some(dir))
}

/// Removes the cache's other directories that were not used for [`CACHE_KEEP`]
/// (an old nightly's or lock file's build).
fn prune(root: &Path, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let used = std::fs::metadata(path.join(".last-used"))
            .and_then(|m| m.modified())
            .or_else(|_| entry.metadata().and_then(|m| m.modified()));
        let stale = used.is_ok_and(|t| {
            SystemTime::now()
                .duration_since(t)
                .is_ok_and(|age| age > CACHE_KEEP)
        });
        if path != keep && path.is_dir() && stale {
            println!("fuzz: removing the stale build cache {}", path.display());
            if let Err(e) = std::fs::remove_dir_all(&path) {
                println!("fuzz: could not remove {}: {e}", path.display());
            }
        }
    }
}

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// cargo-fuzz from crates.io when missing or of another version (built with the
/// stable toolchain; it drives nightly, which libFuzzer's flags need).
fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).trim()
                    == format!("cargo-fuzz {CARGO_FUZZ_VERSION}")
        });
    if !installed {
        println!(
            "installing cargo-fuzz: cargo install cargo-fuzz --locked --version {CARGO_FUZZ_VERSION}"
        );
        run(Command::new("cargo").args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ]))?;
    }
    Ok(())
}
