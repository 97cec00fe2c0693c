//! Byte-exact transfers for the same-node redirection tests. `mesh-xfer serve` is
//! an echo server and `mesh-xfer send` a client that sends seeded random payloads
//! and checks every byte that comes back; both run as processes inside a pod's
//! network namespace and, when meshed, inside the mesh cgroup (a socket is meshed
//! by the cgroup of the process that made it).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    process::Child,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::{backend::End, cgroup::Cgroup, netns::Netns};

/// The payload of connection `index` of a run seeded with `seed`.
pub fn payload(seed: u64, index: usize, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    StdRng::seed_from_u64(seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .fill_bytes(&mut bytes);
    bytes
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ServeMode {
    /// Write back what arrives, as it arrives (both directions busy at once).
    Echo,
    /// Read everything up to the client's half-close, then send it all back over
    /// the direction that is still open.
    Collect,
    /// Answer one HTTP request as the test backends do (`GET /bytes/N`: N
    /// bytes), from a process that can be meshed (the gateway router's tests).
    Http,
    /// The same answer, then an RST instead of a FIN (a server that answers
    /// and aborts: outlier detection must not count it as a failed connect).
    HttpReset,
    /// Accept, then reset at once, before a byte (`SO_LINGER` 0): a crashed
    /// worker behind a listener that still accepts.
    Reset,
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub mode: ServeMode,
    /// Echo with `splice(2)` through a pipe instead of read/write.
    pub splice: bool,
    /// Echo this many bytes of each connection, then close it mid-stream.
    pub close_after: Option<u64>,
    /// Wait this long after accepting before reading (bytes queue up meanwhile).
    pub delay: Duration,
}

/// Serves until killed; prints `ready` once listening.
pub fn serve(options: &ServeOptions) -> anyhow::Result<()> {
    let listener =
        TcpListener::bind(options.listen).with_context(|| format!("bind {}", options.listen))?;
    println!("ready");
    std::io::stdout().flush()?;
    for stream in listener.incoming() {
        let stream = stream?;
        let options = options.clone();
        std::thread::spawn(move || {
            if let Err(e) = serve_one(stream, &options) {
                eprintln!("mesh-xfer serve: {e:#}");
            }
        });
    }
    Ok(())
}

fn serve_one(mut stream: TcpStream, options: &ServeOptions) -> anyhow::Result<()> {
    std::thread::sleep(options.delay);
    let limit = options.close_after.unwrap_or(u64::MAX);
    match options.mode {
        ServeMode::Http => {
            return Ok(crate::backend::answer(
                stream,
                "mesh-xfer\n",
                End::HalfClose,
            )?);
        }
        ServeMode::HttpReset => {
            return Ok(crate::backend::answer(stream, "mesh-xfer\n", End::Reset)?);
        }
        ServeMode::Reset => {
            socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
            return Ok(());
        }
        ServeMode::Collect => {
            let mut all = Vec::new();
            stream.read_to_end(&mut all)?;
            stream.write_all(&all)?;
        }
        ServeMode::Echo if options.splice => splice_echo(&stream, limit)?,
        ServeMode::Echo => {
            let mut buf = vec![0; 1 << 16];
            let mut done = 0u64;
            while done < limit {
                let want = buf
                    .len()
                    .min(usize::try_from(limit - done).unwrap_or(usize::MAX));
                let n = stream.read(&mut buf[..want])?;
                if n == 0 {
                    break;
                }
                stream.write_all(&buf[..n])?;
                done += n as u64;
            }
        }
    }
    if options.close_after.is_none() {
        stream.shutdown(Shutdown::Write)?;
    }
    // Dropping the stream closes it (mid-stream with `close_after`).
    Ok(())
}

/// socket -> pipe -> socket, no copy through this process.
fn splice_echo(stream: &TcpStream, limit: u64) -> anyhow::Result<()> {
    use nix::fcntl::{SpliceFFlags, splice};
    let (pipe_r, pipe_w) = nix::unistd::pipe()?;
    let mut done = 0u64;
    while done < limit {
        let want = (1usize << 16).min(usize::try_from(limit - done).unwrap_or(usize::MAX));
        let n = splice(
            stream.as_fd(),
            None,
            pipe_w.as_fd(),
            None,
            want,
            SpliceFFlags::SPLICE_F_MOVE,
        )?;
        if n == 0 {
            break;
        }
        let mut left = n;
        while left > 0 {
            left -= splice(
                pipe_r.as_fd(),
                None,
                stream.as_fd(),
                None,
                left,
                SpliceFFlags::SPLICE_F_MOVE,
            )?;
        }
        done += n as u64;
    }
    Ok(())
}

#[derive(Clone, Debug)]
pub struct SendOptions {
    pub target: SocketAddr,
    /// Bind to this address (and port) before connecting.
    pub bind: Option<SocketAddr>,
    /// One connection per size, in bytes.
    pub sizes: Vec<usize>,
    pub concurrency: usize,
    pub seed: u64,
    /// Write in random pieces of 1..=this many bytes; `None`: one `write_all`.
    pub max_write: Option<usize>,
    /// Send from a memfd with `sendfile(2)`.
    pub sendfile: bool,
    /// Wait this long after connecting before sending (to hold connections open
    /// side by side).
    pub hold: Duration,
    /// Per-read and per-write timeout: a stalled transfer fails, never hangs.
    pub timeout: Duration,
}

/// What the client observed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SendReport {
    pub conns: u64,
    /// Connections whose every byte came back, in order, and then EOF.
    pub exact: u64,
    /// Connections that ended early with a correct prefix (peer closed).
    pub short: u64,
    /// Connections that got a wrong byte back (never acceptable).
    pub corrupt: u64,
    /// Errors by operation and errno name (`read:ECONNRESET`).
    pub errors: BTreeMap<String, u64>,
    pub bytes_sent: u64,
    pub bytes_back: u64,
    /// `getpeername` results.
    pub peers: BTreeMap<String, u64>,
    pub elapsed_ms: u64,
}

impl SendReport {
    fn merge(&mut self, other: SendReport) {
        self.conns += other.conns;
        self.exact += other.exact;
        self.short += other.short;
        self.corrupt += other.corrupt;
        self.bytes_sent += other.bytes_sent;
        self.bytes_back += other.bytes_back;
        for (map, from) in [
            (&mut self.errors, other.errors),
            (&mut self.peers, other.peers),
        ] {
            for (k, v) in from {
                *map.entry(k).or_default() += v;
            }
        }
    }
}

/// Runs every connection of the plan and returns what was observed.
pub fn send(options: &SendOptions) -> SendReport {
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..options.concurrency.max(1))
        .map(|_| {
            let (options, next) = (options.clone(), next.clone());
            std::thread::spawn(move || {
                let mut report = SendReport::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&size) = options.sizes.get(i) else {
                        break;
                    };
                    report.merge(one(&options, i, size));
                }
                report
            })
        })
        .collect();
    let mut total = SendReport::default();
    for w in workers {
        if let Ok(r) = w.join() {
            total.merge(r);
        }
    }
    total.elapsed_ms = started.elapsed().as_millis() as u64;
    total
}

fn errno_name(e: &std::io::Error) -> String {
    e.raw_os_error().map_or_else(
        || e.kind().to_string(),
        |n| format!("{:?}", nix::errno::Errno::from_raw(n)),
    )
}

fn connect(options: &SendOptions) -> std::io::Result<TcpStream> {
    let Some(bind) = options.bind else {
        return if options.timeout.is_zero() {
            TcpStream::connect(options.target)
        } else {
            TcpStream::connect_timeout(&options.target, options.timeout)
        };
    };
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, setsockopt, socket, sockopt,
    };
    let family = if bind.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(bind))?;
    nix::sys::socket::connect(fd.as_raw_fd(), &SockaddrStorage::from(options.target))?;
    Ok(TcpStream::from(fd))
}

fn one(options: &SendOptions, index: usize, size: usize) -> SendReport {
    let mut report = SendReport {
        conns: 1,
        ..Default::default()
    };
    let error = |report: &mut SendReport, op: &str, e: &std::io::Error| {
        *report
            .errors
            .entry(format!("{op}:{}", errno_name(e)))
            .or_default() += 1;
    };
    let stream = match connect(options) {
        Ok(s) => s,
        Err(e) => {
            error(&mut report, "connect", &e);
            return report;
        }
    };
    if let Ok(peer) = stream.peer_addr() {
        *report.peers.entry(peer.to_string()).or_default() += 1;
    }
    std::thread::sleep(options.hold);
    // Non-blocking with poll, as Go, Java NIO, Tokio, Envoy and nginx do: with the
    // redirect, a blocking recv can fail with EAGAIN when it is woken without data
    // (see docs/design.md), which these runtimes treat as "poll again".
    if let Err(e) = stream.set_nonblocking(true) {
        error(&mut report, "connect", &e);
        return report;
    }
    let payload = Arc::new(payload(options.seed, index, size));
    let writer = {
        let (payload, options) = (payload.clone(), options.clone());
        let stream = stream.try_clone();
        std::thread::spawn(move || -> std::io::Result<u64> {
            let mut stream = stream?;
            let sent = if options.sendfile {
                send_file(&stream, &payload, options.timeout)?
            } else {
                write_pieces(
                    &mut stream,
                    &payload,
                    options.max_write,
                    options.seed ^ index as u64,
                    options.timeout,
                )?
            };
            stream.shutdown(Shutdown::Write)?;
            Ok(sent)
        })
    };
    // Read and check, while the writer writes.
    let reader = stream;
    let mut buf = vec![0; 1 << 16];
    let mut back = 0usize;
    let mut corrupt = false;
    let read_result = loop {
        match retry(&reader, PollFlags::POLLIN, options.timeout, || {
            (&reader).read(&mut buf)
        }) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if back + n > payload.len() || buf[..n] != payload[back..back + n] {
                    corrupt = true;
                }
                back += n;
            }
            Err(e) => break Err(e),
        }
    };
    let write_result = writer
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("writer panicked")));
    report.bytes_back = back as u64;
    match &write_result {
        Ok(sent) => report.bytes_sent = *sent,
        Err(e) => error(&mut report, "write", e),
    }
    if let Err(e) = &read_result {
        error(&mut report, "read", e);
    }
    if corrupt {
        report.corrupt = 1;
    } else if back == payload.len() && read_result.is_ok() && write_result.is_ok() {
        report.exact = 1;
    } else {
        report.short = 1;
    }
    report
}

fn write_pieces(
    stream: &mut TcpStream,
    payload: &[u8],
    max_write: Option<usize>,
    seed: u64,
    timeout: Duration,
) -> std::io::Result<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut at = 0;
    while at < payload.len() {
        let piece = max_write.map_or(payload.len(), |max| {
            rng.next_u32() as usize % max.max(1) + 1
        });
        let end = (at + piece).min(payload.len());
        // One write of the piece, completed the way a runtime completes it.
        while at < end {
            at += retry(stream, PollFlags::POLLOUT, timeout, || {
                (&*stream).write(&payload[at..end])
            })?;
        }
    }
    Ok(at as u64)
}

fn send_file(stream: &TcpStream, payload: &[u8], timeout: Duration) -> std::io::Result<u64> {
    // SAFETY: memfd_create with a valid C string; the fd is owned from here on.
    let fd = unsafe { libc::memfd_create(c"mesh-xfer".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor that nothing else owns.
    let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.write_all(payload)?;
    let mut offset: libc::off_t = 0;
    while (offset as usize) < payload.len() {
        let left = payload.len() - offset as usize;
        let n = retry(stream, PollFlags::POLLOUT, timeout, || {
            Ok(nix::sys::sendfile::sendfile(
                stream.as_fd(),
                file.as_fd(),
                Some(&mut offset),
                left,
            )?)
        })?;
        if n == 0 {
            return Err(std::io::Error::other("sendfile wrote nothing"));
        }
    }
    Ok(offset as u64)
}

/// Runs a non-blocking operation until it does not answer "would block", polling
/// for `events` in between; fails with `TimedOut` after `timeout` of silence
/// (zero: no limit).
fn retry<T>(
    stream: &TcpStream,
    events: PollFlags,
    timeout: Duration,
    mut op: impl FnMut() -> std::io::Result<T>,
) -> std::io::Result<T> {
    loop {
        match op() {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let limit = if timeout.is_zero() {
                    PollTimeout::NONE
                } else {
                    PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX)
                };
                let mut fds = [PollFd::new(stream.as_fd(), events)];
                if poll(&mut fds, limit)? == 0 {
                    return Err(std::io::ErrorKind::TimedOut.into());
                }
            }
            other => return other,
        }
    }
}

/// Path of the `mesh-xfer` binary.
pub fn binary() -> anyhow::Result<std::path::PathBuf> {
    crate::agent::sibling_binary("mesh-xfer")
}

/// A `mesh-xfer serve` process in a pod; killed on drop.
#[derive(Debug)]
pub struct Server {
    child: Child,
}

impl Server {
    /// Starts the server in `ns` (and `cgroup`) and waits until it listens.
    pub fn start(ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> anyhow::Result<Self> {
        let mut all = vec!["serve"];
        all.extend_from_slice(args);
        let mut child = crate::spawn_in_pod(&binary()?, ns, cgroup, &all)?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut server = Server { child };
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        if line.trim() != "ready" {
            let status = server.child.try_wait()?;
            bail!("mesh-xfer serve did not start ({status:?})");
        }
        Ok(server)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `mesh-xfer send ARGS` in `ns` (and `cgroup`) to completion.
pub fn send_from(ns: &Netns, cgroup: Option<&Cgroup>, args: &[&str]) -> anyhow::Result<SendReport> {
    let mut all = vec!["send"];
    all.extend_from_slice(args);
    finish(crate::spawn_in_pod(&binary()?, ns, cgroup, &all)?)
}

/// Waits for a spawned `mesh-xfer send` and parses its report.
pub fn finish(child: Child) -> anyhow::Result<SendReport> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("mesh-xfer send failed: {}", out.status);
    }
    let text = String::from_utf8(out.stdout)?;
    let last = text
        .lines()
        .last()
        .context("mesh-xfer send printed nothing")?;
    Ok(serde_json::from_str(last)?)
}

/// `mesh-xfer hold`: the server end of a connection its client half-closes. It
/// accepts one connection, reads it to the client's EOF and prints
/// `eof <bytes> <exact>` (`exact`: the bytes are `payload(seed, 0, expect)`), then
/// keeps that connection open, half-closed, without ever writing or closing it.
/// The next connection to the listener is the signal to stop: it reads whatever
/// reached the held connection since its EOF, prints `late <bytes>` and exits.
/// Every wait is bounded by `timeout`.
pub fn hold(listen: SocketAddr, seed: u64, expect: usize, timeout: Duration) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("bind {listen}"))?;
    listener.set_nonblocking(true)?;
    println!("ready");
    std::io::stdout().flush()?;
    let accept = || -> anyhow::Result<TcpStream> {
        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
        let limit = PollTimeout::try_from(timeout).unwrap_or(PollTimeout::MAX);
        if poll(&mut fds, limit)? == 0 {
            bail!("no connection within {timeout:?}");
        }
        Ok(listener.accept()?.0)
    };
    let held = accept()?;
    held.set_nonblocking(true)?;
    let mut got = Vec::new();
    let mut buf = vec![0; 1 << 16];
    loop {
        let n = retry(&held, PollFlags::POLLIN, timeout, || (&held).read(&mut buf))?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let exact = got == payload(seed, 0, expect);
    println!("eof {} {exact}", got.len());
    std::io::stdout().flush()?;
    let _release = accept()?;
    // Whatever reached the held connection after its EOF is queued by now: a
    // redirected message lands in the receive queue during the sender's send.
    let mut late = 0usize;
    loop {
        match (&held).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => late += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e.into()),
        }
    }
    println!("late {late}");
    std::io::stdout().flush()?;
    Ok(())
}

/// `mesh-xfer push`: connects (from `bind` when given), sends
/// `payload(seed, 0, size)`, shuts its sending side down and closes: the client
/// of a connection it half-closes and then leaves.
pub fn push(
    target: SocketAddr,
    bind: Option<SocketAddr>,
    size: usize,
    seed: u64,
) -> anyhow::Result<()> {
    let options = SendOptions {
        target,
        bind,
        sizes: vec![size],
        concurrency: 1,
        seed,
        max_write: None,
        sendfile: false,
        hold: Duration::ZERO,
        timeout: Duration::from_secs(20),
    };
    let mut stream = connect(&options).with_context(|| format!("connect {target}"))?;
    stream.set_write_timeout(Some(options.timeout))?;
    stream.write_all(&payload(seed, 0, size))?;
    stream.shutdown(Shutdown::Write)?;
    println!("pushed {size}");
    Ok(())
}
