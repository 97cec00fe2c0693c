//! The connect storm. `mesh-soak storm` is the client: it runs in the client pod's
//! network namespace and in the mesh cgroup (the soak starts it there), opens
//! connections to the VIP as fast as it can, one HTTP request each, and prints a
//! line per connection: `<µs on CLOCK_MONOTONIC> <pod that answered>`, or
//! `<µs> !<error>`. It stops on SIGTERM or SIGINT. The soak reads the lines as
//! they come ([`Reader`]); every connection is kept, so the end of the run can
//! place each one between the readiness changes of the pod it reached.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    net::{SocketAddr, TcpStream},
    process::{Child, ChildStdout},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::Context as _;

use crate::{
    clock::now_us,
    cluster::{Cluster, VIP},
    run::INTERRUPTED,
};

#[derive(Debug, clap::Args)]
pub struct StormArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 2)]
    concurrency: usize,
    #[arg(long, default_value_t = 2000)]
    timeout_ms: u64,
}

/// The client's main: connect until told to stop, a line per connection.
pub fn client(args: &StormArgs) -> anyhow::Result<()> {
    crate::run::stop_on_signals()?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let (tx, rx) = mpsc::channel::<(u64, Result<String, String>)>();
    let workers: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (tx, target) = (tx.clone(), args.target);
            std::thread::spawn(move || {
                while !INTERRUPTED.load(Ordering::Relaxed) {
                    let t = now_us();
                    if tx.send((t, one(target, timeout))).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    drop(tx);
    let mut out = BufWriter::new(std::io::stdout().lock());
    // Flushed every 100 ms, so the soak's progress lines stay current.
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok((t, Ok(pod))) => writeln!(out, "{t} {pod}")?,
            Ok((t, Err(e))) => writeln!(out, "{t} !{e}")?,
            Err(mpsc::RecvTimeoutError::Timeout) => out.flush()?,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for w in workers {
        let _ = w.join();
    }
    out.flush()?;
    Ok(())
}

/// One connection: connect, request, read the answer; the pod that answered, or
/// what went wrong (an errno name, `timed out`, `bad-response`).
fn one(target: SocketAddr, timeout: Duration) -> Result<String, String> {
    let answer = (|| -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&target, timeout)?;
        mesh_tools::probe::exchange(&mut stream, target, timeout)
    })()
    .map_err(|e| {
        e.raw_os_error().map_or_else(
            || e.kind().to_string(),
            |n| format!("{:?}", nix::errno::Errno::from_raw(n)),
        )
    })?;
    answer
        .split("Hello World by ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .ok_or_else(|| "bad-response".to_owned())
}

/// Starts the client in the client pod, inside the mesh cgroup (it is this
/// program, `mesh-soak storm`).
pub fn start(cluster: &Cluster, concurrency: usize) -> anyhow::Result<Reader> {
    let child = mesh_tools::spawn_in_pod(
        &std::env::current_exe()?,
        &cluster.node.pod("client").ns,
        Some(&cluster.cgroup),
        &[
            "storm",
            "--target",
            VIP,
            "--concurrency",
            &concurrency.to_string(),
        ],
    )?;
    Reader::start(child, cluster.pods.iter().map(|p| p.name.clone()).collect())
}

/// What the soak keeps of the storm.
#[derive(Debug, Default)]
pub struct Seen {
    /// Each answered connection: `(start µs << 8) | pod index`, in arrival order.
    pub connections: Vec<u64>,
    /// Each failed one: (start µs, what went wrong).
    pub failures: Vec<(u64, String)>,
}

impl Seen {
    pub fn unpack(packed: u64) -> (u64, usize) {
        (packed >> 8, (packed & 0xff) as usize)
    }

    pub fn errors(&self) -> BTreeMap<&str, u64> {
        let mut by = BTreeMap::new();
        for (_, e) in &self.failures {
            *by.entry(e.as_str()).or_default() += 1;
        }
        by
    }
}

/// Reads the client's lines on a thread of its own; counts are live for the
/// progress lines, the rest is handed over by [`Reader::finish`].
#[derive(Debug)]
pub struct Reader {
    pub made: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    child: Child,
    thread: JoinHandle<anyhow::Result<Seen>>,
}

impl Reader {
    /// `pods`: the backends' names; a line's pod is stored as its index here.
    pub fn start(mut child: Child, pods: Vec<String>) -> anyhow::Result<Self> {
        let stdout = child.stdout.take().context("the storm's stdout")?;
        let (made, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let thread = std::thread::spawn({
            let (made, failed) = (made.clone(), failed.clone());
            move || read(stdout, &pods, &made, &failed)
        });
        Ok(Reader {
            made,
            failed,
            child,
            thread,
        })
    }

    /// SIGTERM to the client; waits for its last line.
    pub fn finish(mut self) -> anyhow::Result<Seen> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let status = self.child.wait()?;
        let seen = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the storm reader panicked"))??;
        anyhow::ensure!(status.success(), "the storm client failed: {status}");
        Ok(seen)
    }
}

fn read(
    stdout: ChildStdout,
    pods: &[String],
    made: &AtomicU64,
    failed: &AtomicU64,
) -> anyhow::Result<Seen> {
    let mut seen = Seen::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let (t, what) = line
            .split_once(' ')
            .context("a storm line without a space")?;
        let t: u64 = t.parse().with_context(|| format!("storm line {line:?}"))?;
        match what.strip_prefix('!') {
            Some(error) => {
                failed.fetch_add(1, Ordering::Relaxed);
                seen.failures.push((t, error.to_owned()));
            }
            None => match pods.iter().position(|p| p == what) {
                Some(i) => {
                    made.fetch_add(1, Ordering::Relaxed);
                    seen.connections.push((t << 8) | i as u64);
                }
                // An answer from no pod of ours is as wrong as no answer.
                None => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    seen.failures.push((t, format!("unknown pod {what}")));
                }
            },
        }
    }
    Ok(seen)
}
