//! `mesh-load`: the benchmark's server and client (see `mesh_tools::load`).

use std::time::Duration;

use clap::{Parser, Subcommand};
use mesh_tools::load::{Target, Workload, pin_cpu, run, serve};

#[derive(Debug, Parser)]
struct Cli {
    /// Pin this process to one CPU.
    #[arg(long, global = true)]
    cpu: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Serve {
        /// IP:PORT, or `unix:/path` for an AF_UNIX stream socket (a file there
        /// is replaced).
        #[arg(long)]
        listen: Target,
    },
    Run {
        /// IP:PORT, or `unix:/path` for an AF_UNIX stream socket.
        #[arg(long)]
        target: Target,
        #[arg(long, value_enum)]
        workload: Workload,
        /// Request and answer size, bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 200)]
        warmup_ms: u64,
        #[arg(long, default_value_t = 1000)]
        duration_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    pin_cpu(cli.cpu);
    match cli.command {
        Command::Serve { listen } => serve(&listen),
        Command::Run {
            target,
            workload,
            size,
            warmup_ms,
            duration_ms,
        } => {
            let m = run(
                &target,
                workload,
                size,
                Duration::from_millis(warmup_ms),
                Duration::from_millis(duration_ms),
            );
            println!("{}", serde_json::to_string(&m)?);
            Ok(())
        }
    }
}
