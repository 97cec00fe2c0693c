//! `mesh-soak` (run by `cargo xtask soak`): ordinary faults, all at once, for a
//! while, against the real agent following a real kube-apiserver; then whether
//! anything broke.
//!
//! At once: pods flipping readiness and VirtualService weight edits through the
//! API server ([`churn`]), the agent and kube-apiserver SIGKILLed and started
//! again ([`chaos`]), and a client in the mesh connecting
//! to the VIP as fast as it can ([`storm`]). Then it prints connections made,
//! failed connects (every backend listens throughout and every subset keeps a
//! ready pod, so any failure counts), connections that reached a pod after it
//! went not-ready ([`timeline`], not failures: propagation takes time), the
//! restarts survived, and whether the kernel's final tables equal the final
//! configuration ([`verify`]). Exits non-zero if a connect failed or the final
//! state differs. Never asserts on time. Ctrl-C cleans everything up.
//!
//! `mesh-soak storm` is the storm's client; the soak starts it in the client pod.

mod api;
mod chaos;
mod churn;
mod clock;
mod cluster;
mod report;
mod run;
mod settle;
mod storm;
mod timeline;
mod verify;

use std::{
    process::ExitCode,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};

use crate::{
    api::ApiClient,
    cluster::{Cluster, VIP},
    report::Summary,
    run::{INTERRUPTED, Run},
};

#[derive(Debug, Parser)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    soak: Args,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The connect storm's client (the soak runs it inside the client pod).
    #[command(hide = true)]
    Storm(storm::StormArgs),
}

#[derive(Debug, clap::Args)]
struct Args {
    /// How long the churn runs.
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// The same in minutes (wins over --seconds).
    #[arg(long)]
    minutes: Option<u64>,
    /// A readiness flip this often (ms).
    #[arg(long, default_value_t = 300)]
    flip_ms: u64,
    /// A weight edit every this many flips.
    #[arg(long, default_value_t = 4)]
    weights_every: u32,
    /// SIGKILL the agent about this often (s, ±30%).
    #[arg(long, default_value_t = 10)]
    kill_every: u64,
    /// API server restarts in the run (default: 1 under 3 minutes, else 2).
    #[arg(long)]
    api_restarts: Option<u32>,
    /// How long the API server stays down before it is started again (ms; it
    /// then takes a few seconds more to be ready).
    #[arg(long, default_value_t = 3000)]
    api_down_ms: u64,
    /// Also SIGKILL the agent as the API server stops, and start it while the
    /// API server is away.
    #[arg(long)]
    kill_during_outage: bool,
    /// The storm's connections at a time.
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    /// Seed of the churn's and the kills' choices (printed; default: the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// How long the kernel may take to equal the final configuration (s).
    #[arg(long, default_value_t = 60)]
    settle: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Command::Storm(args)) => storm::client(args).map(|()| true),
        None => soak(&cli.soak),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("mesh-soak: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn soak(args: &Args) -> anyhow::Result<bool> {
    mesh_tools::require_root();
    run::stop_on_signals()?;
    let duration = Duration::from_secs(args.minutes.map_or(args.seconds, |m| m * 60));
    let seed = args.seed.unwrap_or_else(clock::now_us);
    let mut cluster = Cluster::start()?;
    let api = ApiClient::connect(&cluster.api.kubeconfig)?;
    let storm = storm::start(&cluster, args.concurrency)?;
    let churn = churn::Plan {
        flip: Duration::from_millis(args.flip_ms),
        weights_every: args.weights_every,
        seed,
    };
    let faults = chaos::Plan {
        kill_every: Duration::from_secs(args.kill_every),
        api_at: api_restarts(duration, args.api_restarts),
        api_down: Duration::from_millis(args.api_down_ms),
        kill_during_outage: args.kill_during_outage,
        seed: seed ^ 0x6b69_6c6c,
    };
    println!(
        "\n== Soak for {} s (seed {seed}): a readiness flip every {} ms, a weight edit every {} flips, \
         SIGKILL of the agent every ~{} s, SIGKILL of kube-apiserver at {:?} s (started again {:.1} s later){}; \
         the storm: {} connections at a time to http://{VIP}/",
        duration.as_secs(),
        args.flip_ms,
        args.weights_every,
        args.kill_every,
        faults
            .api_at
            .iter()
            .map(Duration::as_secs)
            .collect::<Vec<_>>(),
        args.api_down_ms as f64 / 1000.0,
        if args.kill_during_outage {
            " (and of the agent during each)"
        } else {
            ""
        },
        args.concurrency,
    );

    let run = Run::new(duration);
    let Cluster {
        agent,
        api: server,
        pods,
        ..
    } = &mut cluster;
    std::thread::scope(|s| {
        s.spawn(|| churn::churn(&api, pods, churn, &run));
        s.spawn(|| run::progress(&run, &storm));
        // The faults restart the agent: on this thread, which outlives it.
        chaos::faults(agent, server, &faults, &run);
    });
    let seconds = run.started.elapsed().as_secs_f64();
    let churn_stopped = Instant::now();
    let seen = storm.finish()?;
    let last = if run.stopped() {
        None
    } else {
        let settle = Duration::from_secs(args.settle);
        Some(settle::final_check(&cluster, &api, churn_stopped, settle)?)
    };
    let record = run
        .record
        .into_inner()
        .map_err(|_| anyhow::anyhow!("poisoned"))?;
    let summary = Summary {
        seconds,
        seed,
        started_us: run.started_us,
        pods: cluster.pods.iter().map(|p| p.name.clone()).collect(),
        late: timeline::classify(
            &seen.connections,
            &record.transitions,
            cluster.pods.len(),
            &record.agent_outages,
            &record.api_outages,
        ),
        seen: &seen,
        accepted: cluster.accepted(),
        record: &record,
        last,
    };
    print!("{}", summary.text());
    if INTERRUPTED.load(Ordering::Relaxed) {
        println!("   interrupted");
    }
    println!("== Cleaning up: agent, pods, cgroup, API server");
    drop(cluster);
    Ok(summary.passed())
}

/// When the API server crashes: at 1/3 of the run for one, at 1/5 and 3/5 for
/// two...; each leaves time for it to start again (tens of seconds on a busy
/// machine) and for churn after it. Default: one under 3 minutes, else two.
fn api_restarts(duration: Duration, count: Option<u32>) -> Vec<Duration> {
    let n = count.unwrap_or(if duration < Duration::from_secs(180) {
        1
    } else {
        2
    });
    (1..=n)
        .map(|i| duration.mul_f64(f64::from(2 * i - 1) / f64::from(2 * n + 1)))
        .collect()
}
