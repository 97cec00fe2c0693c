//! `cargo xtask fuzz`: runs each fuzz target of `fuzz/` (cargo-fuzz, libFuzzer,
//! nightly) for a bounded time, failing if any input crashes, hangs or blows the
//! memory limit. Committed seeds are in `fuzz/seeds/<target>`; what libFuzzer
//! learns goes to `fuzz/corpus/<target>` and what it finds to
//! `fuzz/artifacts/<target>` (both ignored by git).

use std::process::Command;

use anyhow::bail;

use crate::{run, workspace};

/// Every target in `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 3] = ["file_parse", "compile", "kubernetes"];

/// A single input running longer than this is a failure (a hang).
const INPUT_TIMEOUT_SECONDS: u32 = 25;

/// Memory (RSS) over this is a failure: input must have a bounded cost.
const RSS_LIMIT_MB: u32 = 2048;

/// Pinned, as setup pins its tools.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

pub fn fuzz(seconds: u64) -> anyhow::Result<()> {
    ensure_cargo_fuzz()?;
    let dir = workspace().join("fuzz");
    // One build for all the targets.
    run(Command::new("cargo")
        .args(["+nightly", "fuzz", "build"])
        .current_dir(workspace()))?;
    let mut failed = Vec::new();
    for target in TARGETS {
        let corpus = dir.join("corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        println!("== fuzzing {target} for {seconds} s");
        // New inputs are written to the first corpus folder, so the seeds stay
        // as committed.
        let status = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", target])
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
            .current_dir(workspace())
            .status()?;
        if !status.success() {
            failed.push(target);
        }
    }
    if !failed.is_empty() {
        bail!(
            "fuzzing found inputs that crash {failed:?}: they are in fuzz/artifacts/<target>/ \
             (`cargo +nightly fuzz fmt <target> <file>` shows one); make each a regression test in mesh-user"
        );
    }
    println!("fuzzing: no crash in {} targets", TARGETS.len());
    Ok(())
}

/// cargo-fuzz from crates.io when missing or of another version (built with the
/// stable toolchain; it drives nightly, which the sanitizer flags need).
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
