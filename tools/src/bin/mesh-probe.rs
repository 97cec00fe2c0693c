//! `mesh-probe`: opens TCP connections to a target and prints a JSON summary of
//! what it observed (see `mesh_tools::probe`); with `--hold N`, holds N
//! connections open instead and reports what `getpeername` says for them
//! before and after an event (see `mesh_tools::probe::hold`).

use std::time::Duration;

use clap::Parser;
use mesh_tools::probe::{Plan, run};

#[derive(Debug, Parser)]
struct Args {
    /// VIP:PORT or IP:PORT (IPv6 as [addr]:port).
    #[arg(long)]
    target: std::net::SocketAddr,
    #[arg(long)]
    count: Option<u64>,
    #[arg(long)]
    duration_ms: Option<u64>,
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
    /// Print a JSON line for each interval before the total.
    #[arg(long)]
    interval_ms: Option<u64>,
    /// Hold this many connections open (each asks once and reads the answer).
    #[arg(long, requires = "until")]
    hold: Option<usize>,
    /// With --hold: report the peers again once this file exists.
    #[arg(long)]
    until: Option<std::path::PathBuf>,
    /// Bind connection i to the (i mod N)-th address from FIRST: FIRST+N.
    #[arg(long)]
    sources: Option<mesh_tools::probe::Sources>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let (Some(n), Some(until)) = (args.hold, &args.until) {
        return mesh_tools::probe::hold(args.target, n, until);
    }
    let plan = Plan {
        target: args.target,
        count: args.count,
        duration: args.duration_ms.map(Duration::from_millis),
        concurrency: args.concurrency,
        timeout: Duration::from_millis(args.timeout_ms),
        interval: args.interval_ms.map(Duration::from_millis),
        sources: args.sources,
    };
    if plan.count.is_none() && plan.duration.is_none() {
        anyhow::bail!("give --count or --duration-ms");
    }
    let total = run(&plan, |s| {
        if let Ok(line) = serde_json::to_string(s) {
            println!("{line}");
        }
    });
    println!("{}", serde_json::to_string(&total)?);
    Ok(())
}
