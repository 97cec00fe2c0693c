//! `mesh-bench` (run by `cargo xtask bench`): every variant of every workload,
//! side by side, interleaved in a random order over several rounds, on this
//! machine; then the agent's own costs. Prints a markdown report (and writes it
//! with `--write FILE`). Never asserts on time: the numbers are the output.
//!
//! - [`variants`]: what is compared, all set up at once ([`variants::Topology`])
//! - [`services`]: the N services a variant holds (agent, iptables, nftables)
//! - [`workloads`]: the kinds of load, and the rounds that measure them
//! - [`report`]: medians and quantiles, the tables, the method
//! - [`mod@agent_costs`]: the agent's own compile, apply, memory and propagation

mod agent_costs;
mod report;
mod services;
mod variants;
mod workloads;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;

use crate::{
    agent_costs::agent_costs,
    report::{header, method, tables},
    variants::Topology,
};

#[derive(Debug, Parser)]
struct Args {
    /// A smoke run: fewer service counts, short runs (under two minutes).
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    rounds: Option<usize>,
    /// Write the report here too (e.g. docs/benchmarks.md).
    #[arg(long)]
    write: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mesh_tools::require_root();
    let rounds = args.rounds.unwrap_or(5).max(1);
    let (warmup, duration) = if args.quick {
        (Duration::from_millis(50), Duration::from_millis(250))
    } else {
        (Duration::from_millis(200), Duration::from_millis(1000))
    };
    let counts: Vec<usize> = if args.quick {
        vec![1, 1000]
    } else {
        vec![1, 1000, 10_000, 50_000]
    };
    let started = Instant::now();
    let mut report = String::new();
    header(&mut report, &args, rounds, duration)?;

    let bench = Topology::build(&counts)?;
    eprintln!("topology ready in {:.1} s", started.elapsed().as_secs_f64());
    let results = bench.run(rounds, warmup, duration)?;
    tables(&mut report, &bench.variants, &results);
    drop(bench);

    agent_costs(&mut report, args.quick)?;
    method(&mut report);
    print!("{report}");
    if let Some(path) = args.write {
        std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
