//! `mesh-bench` (run by `cargo xtask bench`): every variant of every workload,
//! side by side, interleaved in a random order over several rounds, on this
//! machine; then the agent's own costs. Prints a markdown report (and writes it
//! with `--write FILE`). Never asserts on time: the numbers are the output.
//!
//! - [`variants`]: what is compared, all set up at once ([`variants::Topology`])
//! - [`services`]: the N services a variant holds (agent, iptables, nftables)
//! - [`workloads`]: the kinds of load, and the rounds that measure them
//! - [`report`]: medians and quantiles, the tables, the same-node rows against
//!   the floor, the method
//! - [`mod@gateway`]: the gateway for the node's own clients (kernel path,
//!   router path) against direct, an iptables NodePort and HAProxy
//! - [`mod@policies`]: the per-connect cost of each load-balancing policy
//! - [`mod@agent_costs`]: the agent's own compile, apply, memory and propagation
//! - [`mod@agent_kube`]: the agent's Kubernetes source at scale against a real
//!   kube-apiserver, and under endpoint churn

mod agent_costs;
mod agent_kube;
mod gateway;
mod policies;
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
    agent_kube::agent_kube,
    gateway::gateway,
    policies::policies,
    report::{floor, header, method, tables},
    variants::Topology,
};

#[derive(Debug, Parser)]
struct Args {
    /// A smoke run: fewer service counts, short runs, a small cluster for
    /// agent-kube (about two and a half minutes).
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    rounds: Option<usize>,
    /// Write the report here too (e.g. docs/benchmarks.md).
    #[arg(long)]
    write: Option<PathBuf>,
    /// Run only this section (the report then holds only it).
    #[arg(long, value_enum)]
    only: Option<Section>,
    #[command(subcommand)]
    internal: Option<Internal>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Section {
    /// The gateway: direct, kernel path, router path, iptables NodePort, HAProxy.
    Gateway,
    /// Load-balancing policies: the connect program's cost per call.
    Policies,
    /// The agent at scale: first apply, memory, edit propagation.
    Agent,
    /// The agent's Kubernetes source at scale (a real kube-apiserver): first
    /// apply, memory, and CPU and latency under endpoint churn.
    AgentKube,
    /// The same-node rows (direct, the shortcut on and off, AF_UNIX), apart
    /// and on one CPU, against the floor.
    SameNode,
}

#[derive(Debug, clap::Subcommand)]
enum Internal {
    /// The gateway section's client, which the bench runs inside the node's
    /// namespace and the gateway cgroup.
    #[command(hide = true)]
    GatewayClient(gateway::ClientArgs),
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Internal::GatewayClient(client)) = &args.internal {
        return gateway::client(client);
    }
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

    match args.only {
        Some(Section::Gateway) => {
            gateway(&mut report, args.quick, rounds)?;
            return finish(&report, args.write.as_deref(), started);
        }
        Some(Section::Policies) => {
            policies(&mut report, args.quick, rounds)?;
            return finish(&report, args.write.as_deref(), started);
        }
        Some(Section::Agent) => {
            agent_costs(&mut report, args.quick)?;
            return finish(&report, args.write.as_deref(), started);
        }
        Some(Section::AgentKube) => {
            agent_kube(&mut report, args.quick)?;
            return finish(&report, args.write.as_deref(), started);
        }
        Some(Section::SameNode) => {
            let bench = Topology::build(&[], false)?;
            let results = bench.run(rounds, warmup, duration)?;
            floor(&mut report, &bench.variants, &results);
            tables(&mut report, "###", &bench.variants, &results);
            drop(bench);
            return finish(&report, args.write.as_deref(), started);
        }
        None => {}
    }
    let bench = Topology::build(&counts, true)?;
    eprintln!("topology ready in {:.1} s", started.elapsed().as_secs_f64());
    let results = bench.run(rounds, warmup, duration)?;
    tables(&mut report, "##", &bench.variants, &results);
    floor(&mut report, &bench.variants, &results);
    drop(bench);

    gateway(&mut report, args.quick, rounds)?;
    policies(&mut report, args.quick, rounds)?;
    agent_costs(&mut report, args.quick)?;
    agent_kube(&mut report, args.quick)?;
    method(&mut report);
    finish(&report, args.write.as_deref(), started)
}

/// Prints the report, writes it to `write` if given.
fn finish(report: &str, write: Option<&std::path::Path>, started: Instant) -> anyhow::Result<()> {
    print!("{report}");
    if let Some(path) = write {
        std::fs::write(path, report).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
