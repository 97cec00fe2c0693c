//! The probe: a client that opens real TCP connections to a target, one HTTP
//! request each, and reports what a user would observe: which pod answered, which
//! peer address `getpeername` showed, and which errors occurred. The `mesh-probe`
//! binary runs it; tests start that binary inside a pod's namespace and, when it is
//! meant to be meshed, inside the mesh cgroup.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream},
    process::Child,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::{cgroup::Cgroup, netns::Netns};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Connections that got a full answer.
    pub ok: u64,
    /// Failures by errno name (`EHOSTUNREACH`, ...) or `bad-response`.
    pub errors: BTreeMap<String, u64>,
    /// Answers per pod name.
    pub backends: BTreeMap<String, u64>,
    /// `getpeername` results.
    pub peers: BTreeMap<String, u64>,
    pub elapsed_ms: u64,
    /// Set on the periodic lines of `--interval-ms`; the last line is the total.
    #[serde(default)]
    pub interval: bool,
    /// With [`Plan::sources`]: answers per source address, per pod.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub by_source: BTreeMap<String, BTreeMap<String, u64>>,
}

impl Summary {
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Share of answers from pods whose name starts with `prefix`.
    pub fn share(&self, prefix: &str) -> f64 {
        let n: u64 = self
            .backends
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v)
            .sum();
        n as f64 / self.ok.max(1) as f64
    }

    fn merge(&mut self, other: &Summary) {
        self.ok += other.ok;
        for (map, from) in [
            (&mut self.errors, &other.errors),
            (&mut self.backends, &other.backends),
            (&mut self.peers, &other.peers),
        ] {
            for (k, v) in from {
                *map.entry(k.clone()).or_default() += v;
            }
        }
        for (source, pods) in &other.by_source {
            let mine = self.by_source.entry(source.clone()).or_default();
            for (pod, n) in pods {
                *mine.entry(pod.clone()).or_default() += n;
            }
        }
    }
}

/// `n` client addresses from `first` on: connection `i` binds to the
/// `i % n`-th (addresses the client's interface holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sources {
    pub first: IpAddr,
    pub n: u32,
}

impl Sources {
    fn nth(&self, i: u64) -> IpAddr {
        let k = (i % u64::from(self.n.max(1))) as u32;
        match self.first {
            IpAddr::V4(a) => IpAddr::V4(u32::from(a).wrapping_add(k).into()),
            IpAddr::V6(a) => IpAddr::V6(u128::from(a).wrapping_add(u128::from(k)).into()),
        }
    }
}

impl std::str::FromStr for Sources {
    type Err = anyhow::Error;

    /// `FIRST+N`, e.g. `fd00:10:244::1:0+1000`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (first, n) = s
            .rsplit_once('+')
            .context("expected FIRST+N, e.g. fd00:10:244::1:0+1000")?;
        Ok(Self {
            first: first.parse()?,
            n: n.parse()?,
        })
    }
}

/// What the probe does.
#[derive(Clone, Debug)]
pub struct Plan {
    pub target: SocketAddr,
    /// Stop after this many connections in all...
    pub count: Option<u64>,
    /// ...or after this long.
    pub duration: Option<Duration>,
    pub concurrency: usize,
    pub timeout: Duration,
    /// Print a summary of each interval (the demo's live view).
    pub interval: Option<Duration>,
    /// Bind each connection to one of these addresses first.
    pub sources: Option<Sources>,
}

/// One request on a connected `stream` to `target`, and the whole answer (the
/// backend closes the connection after it).
pub fn exchange(
    stream: &mut TcpStream,
    target: SocketAddr,
    timeout: Duration,
) -> std::io::Result<String> {
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(
        format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer)
}

/// One connection: connect, request, read the answer.
/// A connection from `source` (bound first), or from wherever the kernel picks.
fn connect(
    target: SocketAddr,
    source: Option<IpAddr>,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect_timeout(&target, timeout);
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect_timeout(&target.into(), timeout)?;
    Ok(socket.into())
}

fn one(target: SocketAddr, source: Option<IpAddr>, timeout: Duration, into: &mut Summary) {
    let result = (|| -> std::io::Result<(String, String)> {
        let mut stream = connect(target, source, timeout)?;
        let peer = stream.peer_addr()?.to_string();
        let answer = exchange(&mut stream, target, timeout)?;
        Ok((peer, answer))
    })();
    match result {
        Ok((peer, answer)) => match answer
            .split("Hello World by ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
        {
            Some(pod) => {
                into.ok += 1;
                *into.backends.entry(pod.to_owned()).or_default() += 1;
                *into.peers.entry(peer).or_default() += 1;
                if let Some(source) = source {
                    *into
                        .by_source
                        .entry(source.to_string())
                        .or_default()
                        .entry(pod.to_owned())
                        .or_default() += 1;
                }
            }
            None => *into.errors.entry("bad-response".to_owned()).or_default() += 1,
        },
        Err(e) => {
            let name = e.raw_os_error().map_or_else(
                || e.kind().to_string(),
                |n| format!("{:?}", nix::errno::Errno::from_raw(n)),
            );
            *into.errors.entry(name).or_default() += 1;
        }
    }
}

/// Runs the plan in this process; `on_interval` sees each interval's summary.
pub fn run(plan: &Plan, mut on_interval: impl FnMut(&Summary)) -> Summary {
    let started = Instant::now();
    let issued = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let window = Arc::new(Mutex::new(Summary::default()));
    let workers: Vec<_> = (0..plan.concurrency.max(1))
        .map(|_| {
            let (plan, issued, window) = (plan.clone(), issued.clone(), window.clone());
            std::thread::spawn(move || {
                let mut total = Summary::default();
                loop {
                    let i = issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if plan.count.is_some_and(|count| i >= count) {
                        break;
                    }
                    if plan.duration.is_some_and(|d| started.elapsed() >= d) {
                        break;
                    }
                    let mut one_result = Summary::default();
                    let source = plan.sources.map(|s| s.nth(i));
                    one(plan.target, source, plan.timeout, &mut one_result);
                    total.merge(&one_result);
                    if let Ok(mut w) = window.lock() {
                        w.merge(&one_result);
                    }
                }
                total
            })
        })
        .collect();
    if let Some(interval) = plan.interval {
        while !workers.iter().all(|w| w.is_finished()) {
            std::thread::sleep(interval);
            if let Ok(mut w) = window.lock() {
                let mut s = std::mem::take(&mut *w);
                s.interval = true;
                s.elapsed_ms = started.elapsed().as_millis() as u64;
                on_interval(&s);
            }
        }
    }
    let mut total = Summary::default();
    for w in workers {
        if let Ok(s) = w.join() {
            total.merge(&s);
        }
    }
    total.elapsed_ms = started.elapsed().as_millis() as u64;
    total
}

/// Opens `n` connections to `target`, each asking once and reading the answer
/// (a backend serves one connection at a time, then half-closes it), and
/// prints `held peers: <getpeername of each>`; once the file `until` exists
/// (bounded: 60 s), prints it again. For tests of what outlives an event
/// (an upgrade) on open sockets.
pub fn hold(target: SocketAddr, n: usize, until: &std::path::Path) -> anyhow::Result<()> {
    let timeout = Duration::from_secs(5);
    let sockets = (0..n)
        .map(|_| {
            let mut s = TcpStream::connect_timeout(&target, timeout)?;
            exchange(&mut s, target, timeout)?;
            Ok(s)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let report = || {
        let peers: Vec<String> = sockets
            .iter()
            .map(|s| {
                s.peer_addr()
                    .map_or_else(|e| e.to_string(), |a| a.to_string())
            })
            .collect();
        println!("held peers: {}", peers.join(" "));
    };
    report();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !until.exists() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{} never appeared",
            until.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    report();
    Ok(())
}

/// Path of the `mesh-probe` binary (next to the test executable's directory).
pub fn binary() -> anyhow::Result<std::path::PathBuf> {
    crate::agent::sibling_binary("mesh-probe")
}

/// Starts `mesh-probe ARGS` inside `ns`, and inside `cgroup` when given.
pub fn spawn(ns: &Netns, cgroup: Option<&Cgroup>, args: &[String]) -> anyhow::Result<Child> {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    crate::spawn_in_pod(&binary()?, ns, cgroup, &args)
}

/// Runs `mesh-probe` to completion and returns its total.
pub fn probe(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    target: &str,
    count: u64,
    concurrency: usize,
) -> anyhow::Result<Summary> {
    let args = [
        "--target",
        target,
        "--count",
        &count.to_string(),
        "--concurrency",
        &concurrency.to_string(),
    ];
    finish(spawn(ns, cgroup, &args.map(str::to_owned))?)
}

/// Waits for a spawned probe and parses its last line.
pub fn finish(child: Child) -> anyhow::Result<Summary> {
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("mesh-probe failed: {}", out.status);
    }
    let text = String::from_utf8(out.stdout)?;
    let last = text.lines().last().context("mesh-probe printed nothing")?;
    Ok(serde_json::from_str(last)?)
}
