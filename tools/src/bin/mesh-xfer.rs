//! `mesh-xfer`: byte-exact transfer endpoints for the redirection tests (see
//! `mesh_tools::xfer`). `serve` echoes; `send` prints a JSON report.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};
use mesh_tools::xfer::{SendOptions, ServeMode, ServeOptions, send, serve};

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    Serve {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, value_enum, default_value = "echo")]
        mode: ServeMode,
        #[arg(long)]
        splice: bool,
        #[arg(long)]
        close_after: Option<u64>,
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
    },
    Send {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        bind: Option<SocketAddr>,
        /// Comma-separated payload sizes in bytes, one connection each.
        #[arg(long, value_delimiter = ',', required = true)]
        sizes: Vec<usize>,
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long)]
        max_write: Option<usize>,
        #[arg(long)]
        sendfile: bool,
        #[arg(long, default_value_t = 0)]
        hold_ms: u64,
        /// Per-operation timeout; 0: none.
        #[arg(long, default_value_t = 20_000)]
        timeout_ms: u64,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Serve {
            listen,
            mode,
            splice,
            close_after,
            delay_ms,
        } => serve(&ServeOptions {
            listen,
            mode,
            splice,
            close_after,
            delay: Duration::from_millis(delay_ms),
        }),
        Command::Send {
            target,
            bind,
            sizes,
            concurrency,
            seed,
            max_write,
            sendfile,
            hold_ms,
            timeout_ms,
        } => {
            let report = send(&SendOptions {
                target,
                bind,
                sizes,
                concurrency,
                seed,
                max_write,
                sendfile,
                hold: Duration::from_millis(hold_ms),
                timeout: Duration::from_millis(timeout_ms),
            });
            println!("{}", serde_json::to_string(&report)?);
            Ok(())
        }
    }
}
