//! The benchmark's load: `mesh-load serve` answers, `mesh-load run` measures one
//! workload for a while and prints a JSON [`Measurement`]. Both run as processes
//! inside pods (and cgroups) like any application, pinned to a CPU each. Both
//! speak TCP or, for the floor, an AF_UNIX stream socket (`unix:/path`).
//!
//! Protocol: a connection starts with a 5-byte header, the workload (`c`, `r`,
//! `b`) and a little-endian u32 size; then for `c` one request of `size` bytes and
//! one answer of the same size, and the client closes; for `r` the same exchange
//! repeated on the one connection; for `b` the client streams and the server
//! discards.

use std::{
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::net::{UnixListener, UnixStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Workload {
    /// A new connection per request: connect, request, answer, close.
    Crr,
    /// Request and answer on one kept-alive connection.
    Rr,
    /// One connection streaming as fast as it can.
    Bulk,
}

impl Workload {
    fn tag(self) -> u8 {
        match self {
            Workload::Crr => b'c',
            Workload::Rr => b'r',
            Workload::Bulk => b'b',
        }
    }
}

/// One run of one workload.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Measurement {
    /// Requests (crr, rr) completed in the measured window.
    pub ops: u64,
    pub seconds: f64,
    /// Median and 99th percentile latency of one request, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Bulk: payload bytes per second.
    pub bytes_per_second: f64,
    pub errors: u64,
}

/// Pins the calling process to one CPU (noise control: client and server apart).
pub fn pin_cpu(cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        let mut set = nix::sched::CpuSet::new();
        if set.set(cpu).is_ok() {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
        }
    }
}

fn header(workload: Workload, size: usize) -> [u8; 5] {
    let mut h = [workload.tag(), 0, 0, 0, 0];
    h[1..].copy_from_slice(&(size as u32).to_le_bytes());
    h
}

/// Serves one connection of any workload (TCP or AF_UNIX).
fn serve_one<S: std::io::Read + std::io::Write>(mut s: S) -> std::io::Result<()> {
    let mut h = [0u8; 5];
    s.read_exact(&mut h)?;
    let size = u32::from_le_bytes([h[1], h[2], h[3], h[4]]) as usize;
    let mut buf = vec![0u8; size.max(1 << 16)];
    match h[0] {
        b'c' => {
            s.read_exact(&mut buf[..size])?;
            s.write_all(&buf[..size])
        }
        b'r' => loop {
            if s.read_exact(&mut buf[..size]).is_err() {
                return Ok(());
            }
            s.write_all(&buf[..size])?;
        },
        _ => loop {
            if s.read(&mut buf)? == 0 {
                return Ok(());
            }
        },
    }
}

/// Where `serve` listens and `run` dials: `IP:PORT`, or `unix:/path` for an
/// AF_UNIX stream socket at that path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_prefix("unix:") {
            Some("") => Err("unix: needs a path (unix:/path)".into()),
            Some(path) => Ok(Target::Unix(path.into())),
            None => s
                .parse()
                .map(Target::Tcp)
                .map_err(|e| format!("{s}: neither IP:PORT nor unix:/path ({e})")),
        }
    }
}

/// Serves `listen`, a thread per connection; prints `ready` once listening. A
/// Unix socket's file is replaced if it exists; whoever stops the server
/// removes it (the bench does, after killing it).
pub fn serve(listen: &Target) -> anyhow::Result<()> {
    match listen {
        Target::Tcp(addr) => {
            let listener = TcpListener::bind(addr)?;
            ready()?;
            for stream in listener.incoming().flatten() {
                let _ = stream.set_nodelay(true);
                std::thread::spawn(move || serve_one(stream));
            }
        }
        Target::Unix(path) => {
            let _ = std::fs::remove_file(path);
            let listener = UnixListener::bind(path)?;
            ready()?;
            for stream in listener.incoming().flatten() {
                std::thread::spawn(move || serve_one(stream));
            }
        }
    }
    Ok(())
}

fn ready() -> std::io::Result<()> {
    println!("ready");
    std::io::stdout().flush()
}

trait Conn: std::io::Read + std::io::Write + Sized {}
impl Conn for TcpStream {}
impl Conn for UnixStream {}

/// Measures `workload` against `target` for `warmup` (discarded) then `duration`.
pub fn run(
    target: &Target,
    workload: Workload,
    size: usize,
    warmup: Duration,
    duration: Duration,
) -> Measurement {
    match target {
        Target::Tcp(addr) => {
            let addr = *addr;
            measure(workload, size, warmup, duration, move || {
                let s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                Ok(s)
            })
        }
        Target::Unix(path) => measure(workload, size, warmup, duration, || {
            UnixStream::connect(path)
        }),
    }
}

fn measure<C: Conn>(
    workload: Workload,
    size: usize,
    warmup: Duration,
    duration: Duration,
    connect: impl Fn() -> std::io::Result<C>,
) -> Measurement {
    let mut m = Measurement::default();
    let request = vec![7u8; size];
    let mut answer = vec![0u8; size];
    let mut latencies: Vec<u32> = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    let measured_from = start + warmup;
    let end = measured_from + duration;
    match workload {
        Workload::Crr => {
            while Instant::now() < end {
                let t = Instant::now();
                let ok = (|| -> std::io::Result<()> {
                    let mut c = connect()?;
                    c.write_all(&header(workload, size))?;
                    c.write_all(&request)?;
                    c.read_exact(&mut answer)?;
                    Ok(())
                })();
                record(&mut m, &mut latencies, t, measured_from, ok.is_ok());
            }
        }
        Workload::Rr => {
            let Ok(mut c) = connect() else {
                m.errors += 1;
                return m;
            };
            if c.write_all(&header(workload, size)).is_err() {
                m.errors += 1;
                return m;
            }
            while Instant::now() < end {
                let t = Instant::now();
                let ok = c
                    .write_all(&request)
                    .and_then(|()| c.read_exact(&mut answer));
                record(&mut m, &mut latencies, t, measured_from, ok.is_ok());
                if ok.is_err() {
                    break;
                }
            }
        }
        Workload::Bulk => {
            let chunk = vec![7u8; 1 << 16];
            let Ok(mut c) = connect() else {
                m.errors += 1;
                return m;
            };
            let _ = c.write_all(&header(workload, 0));
            let mut bytes = 0u64;
            let mut counting = false;
            let mut t0 = Instant::now();
            while Instant::now() < end {
                if !counting && Instant::now() >= measured_from {
                    counting = true;
                    t0 = Instant::now();
                }
                if c.write_all(&chunk).is_err() {
                    m.errors += 1;
                    break;
                }
                if counting {
                    bytes += chunk.len() as u64;
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            m.seconds = secs;
            m.bytes_per_second = bytes as f64 / secs.max(1e-9);
            return m;
        }
    }
    m.seconds = duration.as_secs_f64();
    latencies.sort_unstable();
    let at = |q: f64| -> f64 {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
            .map_or(0.0, |&ns| f64::from(ns) / 1e3)
    };
    m.p50_us = at(0.5);
    m.p99_us = at(0.99);
    m
}

fn record(m: &mut Measurement, latencies: &mut Vec<u32>, t: Instant, from: Instant, ok: bool) {
    if t < from {
        return;
    }
    if ok {
        m.ops += 1;
        latencies.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
    } else {
        m.errors += 1;
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

    use super::Target;

    #[test]
    fn targets_are_ip_port_or_a_unix_path() {
        assert_eq!(
            "unix:/tmp/mesh-bench-1x0.sock".parse(),
            Ok(Target::Unix("/tmp/mesh-bench-1x0.sock".into()))
        );
        assert_eq!(
            "10.244.0.10:7001".parse(),
            Ok(Target::Tcp(SocketAddr::from((
                Ipv4Addr::new(10, 244, 0, 10),
                7001
            ))))
        );
        assert_eq!(
            "[::]:7001".parse(),
            Ok(Target::Tcp(SocketAddr::from((Ipv6Addr::UNSPECIFIED, 7001))))
        );
        assert!("unix:".parse::<Target>().is_err());
        assert!("unix".parse::<Target>().is_err());
    }
}
