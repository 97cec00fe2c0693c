//! `mesh-xfer`: byte-exact transfer endpoints for the redirection tests (see
//! `mesh_tools::xfer`). `serve` echoes; `send` prints a JSON report; `hold` and `push`
//! make a connection whose client half-closes and leaves.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, Subcommand};
use mesh_tools::xfer::{SendOptions, ServeMode, ServeOptions, hold, push, send, serve};

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
    /// Hold one half-closed connection open (see `mesh_tools::xfer::hold`).
    Hold {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Bytes the client sends before half-closing.
        #[arg(long)]
        expect: usize,
        #[arg(long, default_value_t = 20_000)]
        timeout_ms: u64,
    },
    /// Send one payload, half-close, close (see `mesh_tools::xfer::push`).
    Push {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long)]
        bind: Option<SocketAddr>,
        #[arg(long)]
        size: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
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
        Command::Hold {
            listen,
            seed,
            expect,
            timeout_ms,
        } => hold(listen, seed, expect, Duration::from_millis(timeout_ms)),
        Command::Push {
            target,
            bind,
            size,
            seed,
        } => push(target, bind, size, seed),
    }
}
