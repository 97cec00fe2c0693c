//! The gateway, side by side: a client in the node's network namespace (inside
//! the gateway cgroup, as the node's own processes are) against HTTP pods,
//! directly, through the gateway's kernel path (`127.0.0.1:80`, rewritten at
//! `connect()`), through its HTTP router (`127.0.0.1:8080`), through a
//! kube-proxy NodePort-style iptables DNAT, and through HAProxy as an ingress
//! (`mode http` and `mode tcp`). All set up at once, interleaved over rounds.
//!
//! The client is this binary again (`mesh-bench gateway-client`, hidden), run
//! inside the node's namespace and the cgroup; the pods' HTTP servers are
//! threads of this process inside the pods' namespaces.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    path::PathBuf,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tools::{
    agent::Agent,
    cgroup::Cgroup,
    load::Measurement,
    manifests::{self, ManifestDir},
    netns::{Netns, Node},
};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use rand::{SeedableRng as _, seq::SliceRandom as _};

use crate::{
    report::{median, quantile},
    services::load_rules,
    variants::{CLIENT_CPU, Killed, SERVER_CPU, client_sysctls},
};

/// The node's address on the pods' bridge (as the gateway tests give it).
const NODE4: &str = "10.244.0.1";
const NODE6: &str = "fd00:10:244::1";
/// The pods' HTTP port (the seed's flaskapp port).
const POD_PORT: u16 = 5000;
/// The gateway port served by the kernel (pure weights) and by the router.
const KERNEL_PORT: u16 = 80;
const ROUTER_PORT: u16 = 8080;
/// kube-proxy's stand-in: a NodePort on the node's address.
const NODE_PORT: u16 = 30080;
/// HAProxy's listeners on the node's loopback.
const HAPROXY_HTTP: u16 = 18080;
const HAPROXY_TCP: u16 = 18081;
/// The Service's cluster IP (never dialled: the gateway resolves to endpoints).
const SERVICE_VIP: &str = "10.96.0.90";
const PODS: usize = 2;

/// How much one run does.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sizes {
    /// Per-connection runs: connections measured, after `warmup` more.
    connections: u64,
    warmup: u64,
    /// Bulk runs: `bulk_count` HTTP responses of `bulk_bytes` each.
    bulk_bytes: u64,
    bulk_count: u64,
}

impl Sizes {
    pub(crate) fn new(quick: bool) -> Self {
        if quick {
            Sizes {
                connections: 300,
                warmup: 30,
                bulk_bytes: 64 << 20,
                bulk_count: 1,
            }
        } else {
            Sizes {
                connections: 5000,
                warmup: 200,
                bulk_bytes: 256 << 20,
                bulk_count: 3,
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub(crate) enum Mode {
    /// Connect, one `GET /`, read the answer to the server's close.
    Latency,
    /// One `GET /bytes/N`: an N-byte response, read to the end.
    Bulk,
}

/// `mesh-bench gateway-client`: the measuring client, run by the bench inside
/// the node's namespace and the gateway cgroup. Prints one JSON [`Measurement`].
#[derive(Debug, clap::Args)]
pub(crate) struct ClientArgs {
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Latency: connections measured. Bulk: transfers measured.
    #[arg(long)]
    count: u64,
    /// Connections (or transfers, of an eighth of the size) not counted.
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Bulk: the response's size.
    #[arg(long, default_value_t = 0)]
    bytes: u64,
    #[arg(long)]
    cpu: Option<usize>,
}

/// The client's side of one connection: connect, send `GET path`, read to the
/// server's close; checks the status and the body's length. Body bytes.
fn exchange(target: SocketAddr, path: &str, timeout: Duration) -> anyhow::Result<u64> {
    let mut s = TcpStream::connect_timeout(&target, timeout)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: bench.gateway\r\nUser-Agent: mesh-bench\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = vec![0u8; 256 << 10];
    let mut head = Vec::new();
    let (status, length, mut body) = loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            bail!("closed before the answer's header");
        }
        head.extend_from_slice(&buf[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            let text = String::from_utf8_lossy(&head[..end]).to_ascii_lowercase();
            let status: u16 = text
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .context("no status")?;
            let length: Option<u64> = text
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok());
            break (status, length, (head.len() - end - 4) as u64);
        }
        anyhow::ensure!(head.len() < 64 << 10, "header too long");
    };
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        body += n as u64;
    }
    anyhow::ensure!(
        status == 200,
        "status {status}: {}",
        String::from_utf8_lossy(&head[..head.len().min(300)])
    );
    if let Some(length) = length {
        anyhow::ensure!(body == length, "{body} body bytes of {length}");
    }
    Ok(body)
}

pub(crate) fn client(args: &ClientArgs) -> anyhow::Result<()> {
    mesh_tools::load::pin_cpu(args.cpu);
    let mut m = Measurement::default();
    match args.mode {
        Mode::Latency => {
            let mut latencies: Vec<u32> = Vec::with_capacity(args.count as usize);
            let timeout = Duration::from_secs(5);
            for i in 0..args.warmup + args.count {
                let t = Instant::now();
                let got = exchange(args.target, "/", timeout);
                let took = t.elapsed();
                if let Err(e) = &got
                    && m.errors == 0
                {
                    eprintln!("gateway-client {}: {e:#}", args.target);
                }
                let ok = got.is_ok_and(|n| n > 0);
                if i < args.warmup {
                    continue;
                }
                if ok {
                    m.ops += 1;
                    m.seconds += took.as_secs_f64();
                    latencies.push(u32::try_from(took.as_nanos()).unwrap_or(u32::MAX));
                } else {
                    m.errors += 1;
                }
            }
            latencies.sort_unstable();
            let at = |q: f64| -> f64 {
                latencies
                    .get(((latencies.len() as f64 - 1.0) * q).round() as usize)
                    .map_or(f64::NAN, |&ns| f64::from(ns) / 1e3)
            };
            m.p50_us = at(0.5);
            m.p99_us = at(0.99);
        }
        Mode::Bulk => {
            let timeout = Duration::from_secs(20);
            for _ in 0..args.warmup {
                let _ = exchange(args.target, &format!("/bytes/{}", args.bytes / 8), timeout);
            }
            let mut bytes = 0u64;
            for _ in 0..args.count {
                let t = Instant::now();
                match exchange(args.target, &format!("/bytes/{}", args.bytes), timeout) {
                    Ok(n) if n == args.bytes => {
                        m.ops += 1;
                        bytes += n;
                        m.seconds += t.elapsed().as_secs_f64();
                    }
                    Ok(n) => {
                        eprintln!(
                            "gateway-client {}: {n} bytes of {}",
                            args.target, args.bytes
                        );
                        m.errors += 1;
                    }
                    Err(e) => {
                        eprintln!("gateway-client {}: {e:#}", args.target);
                        m.errors += 1;
                    }
                }
            }
            m.bytes_per_second = bytes as f64 / m.seconds.max(1e-9);
        }
    }
    println!("{}", serde_json::to_string(&m)?);
    Ok(())
}

/// An HTTP/1.1 server in a pod, on a thread of this process inside the pod's
/// namespace (pinned to the servers' CPU): `GET /bytes/N` answers N bytes,
/// anything else a greeting; every answer `Connection: close`. One connection
/// at a time, as the clients are sequential. Stopped on drop.
struct HttpPod {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpPod {
    fn spawn(ns: &Netns, pod: &str, port: u16) -> anyhow::Result<Self> {
        let file = ns.open()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let greeting = format!("Hello from {pod}\n");
        let cpu: usize = SERVER_CPU.parse()?;
        let thread = std::thread::Builder::new()
            .name(format!("http-{pod}"))
            .spawn({
                let stop = stop.clone();
                move || {
                    mesh_tools::load::pin_cpu(Some(cpu));
                    let listener = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                        .map_err(anyhow::Error::from)
                        .and_then(|()| Ok(TcpListener::bind(SocketAddr::from(([0u16; 8], port)))?));
                    let listener = match listener {
                        Ok(l) => {
                            let _ = tx.send(Ok(()));
                            l
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                            return;
                        }
                    };
                    let chunk = vec![b'x'; 1 << 20];
                    while !stop.load(Ordering::Relaxed) {
                        let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
                        if !matches!(poll(&mut fds, PollTimeout::from(50u8)), Ok(n) if n > 0) {
                            continue;
                        }
                        if let Ok((stream, _)) = listener.accept() {
                            let _ = answer(stream, &greeting, &chunk);
                        }
                    }
                }
            })?;
        rx.recv()??;
        Ok(HttpPod {
            stop,
            thread: Some(thread),
        })
    }
}

fn answer(mut s: TcpStream, greeting: &str, chunk: &[u8]) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    let mut request = Vec::new();
    let mut buf = [0u8; 2048];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16 << 10 {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        request.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&request);
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
        )?;
        let mut left = n;
        while left > 0 {
            let k = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..k])?;
            left -= k as u64;
        }
    } else {
        write!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{greeting}",
            greeting.len()
        )?;
    }
    s.shutdown(std::net::Shutdown::Write)
}

impl Drop for HttpPod {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A file removed on drop (HAProxy's configuration).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One row of the gateway tables: the node's client dialling `target`.
pub(crate) struct GatewayVariant {
    name: &'static str,
    what: &'static str,
    target: SocketAddr,
}

/// Everything the gateway variants need, alive at once. Field order is drop
/// order: HAProxy killed, the agent stopped (its hooks detached), the pods'
/// servers stopped, then the cgroup, the manifests and the namespaces (with
/// them the node's iptables rules).
pub(crate) struct GatewayBench {
    variants: Vec<GatewayVariant>,
    _haproxy: Killed,
    _haproxy_cfg: TempFile,
    _agent: Agent,
    _pods: Vec<HttpPod>,
    cgroup: Cgroup,
    _dir: ManifestDir,
    node: Node,
    sizes: Sizes,
}

/// The Gateways: port 80 with one weightless route (the kernel's), port 8080
/// with a uri match first (the router's).
fn gateway_manifests() -> String {
    let dest = format!("{{destination: {{host: bench, port: {{number: {POD_PORT}}}}}}}");
    format!(
        "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bench-kernel, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
    - {{port: {{number: {KERNEL_PORT}, name: http, protocol: HTTP}}, hosts: [\"*\"]}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: bench-router, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
    - {{port: {{number: {ROUTER_PORT}, name: http-router, protocol: HTTP}}, hosts: [\"*\"]}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bench-kernel, namespace: default}}
spec:
  hosts: [\"*\"]
  gateways: [bench-kernel]
  http:
    - route: [{dest}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: bench-router, namespace: default}}
spec:
  hosts: [\"*\"]
  gateways: [bench-router]
  http:
    - match: [{{uri: {{exact: /never}}}}]
      route: [{dest}]
    - match: [{{uri: {{prefix: /}}}}]
      route: [{dest}]
"
    )
}

/// kube-proxy's NodePort layout in the node's `nat OUTPUT`: KUBE-SERVICES ->
/// KUBE-NODEPORTS (local destinations) -> KUBE-SVC (`statistic`) -> KUBE-SEP DNAT.
fn nodeport_rules(pods: &[IpAddr]) -> String {
    let mut r = String::from(
        "*nat\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n:KUBE-SVC-BENCH - [0:0]\n",
    );
    for i in 0..pods.len() {
        let _ = writeln!(r, ":KUBE-SEP-BENCH{i} - [0:0]");
    }
    let _ = writeln!(
        r,
        "-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A KUBE-SERVICES -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n-A KUBE-NODEPORTS -p tcp -m tcp --dport {NODE_PORT} -j KUBE-SVC-BENCH"
    );
    for (i, ip) in pods.iter().enumerate() {
        let left = pods.len() - i;
        if left > 1 {
            let _ = writeln!(
                r,
                "-A KUBE-SVC-BENCH -m statistic --mode random --probability {:.5} -j KUBE-SEP-BENCH{i}",
                1.0 / left as f64
            );
        } else {
            let _ = writeln!(r, "-A KUBE-SVC-BENCH -j KUBE-SEP-BENCH{i}");
        }
        let _ = writeln!(
            r,
            "-A KUBE-SEP-BENCH{i} -p tcp -m tcp -j DNAT --to-destination {ip}:{POD_PORT}"
        );
    }
    r.push_str("COMMIT\n");
    r
}

fn haproxy_config(pods: &[IpAddr]) -> String {
    let mut servers = String::new();
    for (i, ip) in pods.iter().enumerate() {
        let _ = writeln!(servers, "  server pod{i} {ip}:{POD_PORT}");
    }
    format!(
        "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nlisten ingress-http\n  mode http\n  bind 127.0.0.1:{HAPROXY_HTTP}\n  balance roundrobin\n{servers}listen ingress-tcp\n  mode tcp\n  bind 127.0.0.1:{HAPROXY_TCP}\n  balance roundrobin\n{servers}"
    )
}

impl GatewayBench {
    pub(crate) fn build(sizes: Sizes) -> anyhow::Result<Self> {
        let mut node = Node::new()?;
        node.bridge
            .ip(&["addr", "add", &format!("{NODE4}/24"), "dev", "br0"])?;
        // The pods are dual-stack: the router may pick an IPv6 endpoint.
        node.bridge.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{NODE6}/64"),
            "dev",
            "br0",
            "nodad",
        ])?;
        client_sysctls(&node.bridge)?;
        let mut pods = Vec::new();
        let mut ips = Vec::new();
        for i in 0..PODS {
            let name = format!("gw-{i}");
            let pod = node.add_pod(&name, 11 + i as u8)?;
            ips.push(pod.ipv4);
            pods.push(HttpPod::spawn(&pod.ns, &name, POD_PORT)?);
        }
        let dir = ManifestDir::new()?;
        dir.write(
            "service.yaml",
            &manifests::service("bench", &[SERVICE_VIP.parse()?], POD_PORT, POD_PORT),
        )?;
        let docs: Vec<String> = node
            .pods
            .iter()
            .map(|p| manifests::pod(&p.name, "bench", "v1", &[p.ipv4, p.ipv6], true))
            .collect();
        dir.write("pods.yaml", &docs.join("---\n"))?;
        dir.write("gateway.yaml", &gateway_manifests())?;
        let cgroup = Cgroup::create(&mesh_tools::unique("mesh-bench-"))?;
        let t = Instant::now();
        let agent = Agent::start_in_netns(dir.path(), cgroup.path(), &node.bridge, &[])?;
        eprintln!(
            "gateway: agent in the node's namespace ready in {:.1} s",
            t.elapsed().as_secs_f64()
        );
        // Which path serves which port, as `mesh-agent check` and the running
        // agent's `explain` say.
        let check = mesh_tools::sh(
            &mesh_tools::agent::sibling_binary("mesh-agent")?.to_string_lossy(),
            &[
                "check",
                "--source",
                &format!("file:{}", dir.path().display()),
            ],
        )?;
        for (port, by) in [(KERNEL_PORT, "kernel"), (ROUTER_PORT, "router")] {
            anyhow::ensure!(
                check.contains(&format!("gateway port {port}/HTTP  served by {by}")),
                "gateway port {port} is not served by the {by}:\n{check}"
            );
        }
        let kernel = agent.cli(&["explain", &format!("127.0.0.1:{KERNEL_PORT}")])?;
        let router = agent.cli(&["explain", &format!("127.0.0.1:{ROUTER_PORT}")])?;
        anyhow::ensure!(
            !kernel.contains("router"),
            "127.0.0.1:{KERNEL_PORT} goes to the router:\n{kernel}"
        );
        anyhow::ensure!(
            router.contains("router"),
            "127.0.0.1:{ROUTER_PORT} does not go to the router:\n{router}"
        );

        load_rules(&node.bridge, "iptables-restore", &nodeport_rules(&ips))?;

        let cfg = TempFile(std::env::temp_dir().join(mesh_tools::unique("mesh-bench-haproxy-")));
        std::fs::write(&cfg.0, haproxy_config(&ips))?;
        let haproxy = Command::new("ip")
            .args([
                "netns",
                "exec",
                &node.bridge.name,
                "taskset",
                "-c",
                SERVER_CPU,
                "haproxy",
                "-db",
                "-f",
            ])
            .arg(&cfg.0)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("spawning haproxy (apt-get install haproxy; cargo xtask bench does)")?;
        let haproxy = Killed(haproxy);
        std::thread::sleep(Duration::from_millis(300));

        let loopback = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        let variants = vec![
            GatewayVariant {
                name: "direct",
                what: "client -> a pod's IP:5000, no rewrite, no proxy (the baseline)",
                target: SocketAddr::new(ips[0], POD_PORT),
            },
            GatewayVariant {
                name: "gateway, kernel path",
                what: "127.0.0.1:80, pure-weight Gateway + VirtualService: rewritten to a pod at connect()",
                target: loopback(KERNEL_PORT),
            },
            GatewayVariant {
                name: "gateway, router path",
                what: "127.0.0.1:8080, uri-matched routes: rewritten to the agent's HTTP router (hyper), which forwards per request",
                target: loopback(ROUTER_PORT),
            },
            GatewayVariant {
                name: "iptables NodePort",
                what: "node address:30080, kube-proxy's NodePort chains in nat OUTPUT (DNAT, conntrack)",
                target: SocketAddr::new(NODE4.parse()?, NODE_PORT),
            },
            GatewayVariant {
                name: "HAProxy, mode http",
                what: "127.0.0.1:18080, HAProxy as an HTTP ingress (1 thread), round robin over the pods",
                target: loopback(HAPROXY_HTTP),
            },
            GatewayVariant {
                name: "HAProxy, mode tcp",
                what: "127.0.0.1:18081, HAProxy as a TCP ingress (1 thread), round robin over the pods",
                target: loopback(HAPROXY_TCP),
            },
        ];
        let bench = GatewayBench {
            variants,
            _haproxy: haproxy,
            _haproxy_cfg: cfg,
            _agent: agent,
            _pods: pods,
            cgroup,
            _dir: dir,
            node,
            sizes,
        };
        // Every variant answers before anything is measured.
        for v in &bench.variants {
            let m = bench.client(v, Mode::Latency, 5, 0)?;
            if m.errors > 0 || m.ops != 5 {
                bail!(
                    "gateway variant {:?} ({}) does not answer",
                    v.name,
                    v.target
                );
            }
        }
        Ok(bench)
    }

    fn client(
        &self,
        v: &GatewayVariant,
        mode: Mode,
        count: u64,
        warmup: u64,
    ) -> anyhow::Result<Measurement> {
        let exe = std::env::current_exe()?;
        let child = mesh_tools::spawn_in_pod(
            &exe,
            &self.node.bridge,
            Some(&self.cgroup),
            &[
                "gateway-client",
                "--target",
                &v.target.to_string(),
                "--mode",
                match mode {
                    Mode::Latency => "latency",
                    Mode::Bulk => "bulk",
                },
                "--count",
                &count.to_string(),
                "--warmup",
                &warmup.to_string(),
                "--bytes",
                &self.sizes.bulk_bytes.to_string(),
                "--cpu",
                CLIENT_CPU,
            ],
        )?;
        let out = child.wait_with_output()?;
        let text = String::from_utf8(out.stdout)?;
        let line = text
            .lines()
            .last()
            .with_context(|| format!("gateway-client printed nothing ({})", out.status))?;
        Ok(serde_json::from_str(line)?)
    }

    /// Every (variant, mode) once per round, in a new random order each round.
    pub(crate) fn run(
        &self,
        rounds: usize,
    ) -> anyhow::Result<BTreeMap<(usize, Mode), Vec<Measurement>>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6761_7465);
        let mut results: BTreeMap<(usize, Mode), Vec<Measurement>> = BTreeMap::new();
        let mut order: Vec<(usize, Mode)> = (0..self.variants.len())
            .flat_map(|v| [(v, Mode::Latency), (v, Mode::Bulk)])
            .collect();
        for round in 0..rounds {
            order.shuffle(&mut rng);
            eprintln!("gateway round {}/{rounds}: {} runs", round + 1, order.len());
            for &(v, mode) in &order {
                let m = match mode {
                    Mode::Latency => self.client(
                        &self.variants[v],
                        mode,
                        self.sizes.connections,
                        self.sizes.warmup,
                    )?,
                    Mode::Bulk => self.client(&self.variants[v], mode, self.sizes.bulk_count, 1)?,
                };
                results.entry((v, mode)).or_default().push(m);
            }
        }
        Ok(results)
    }
}

/// The gateway section: build, run `rounds`, write the tables and the method.
pub(crate) fn gateway(r: &mut String, quick: bool, rounds: usize) -> anyhow::Result<()> {
    let sizes = Sizes::new(quick);
    let t = Instant::now();
    let bench = GatewayBench::build(sizes)?;
    let results = bench.run(rounds)?;
    tables(r, &bench.variants, &results, sizes, rounds);
    drop(bench);
    eprintln!("gateway section in {:.0} s", t.elapsed().as_secs_f64());
    Ok(())
}

fn tables(
    r: &mut String,
    variants: &[GatewayVariant],
    results: &BTreeMap<(usize, Mode), Vec<Measurement>>,
    sizes: Sizes,
    rounds: usize,
) {
    let _ = writeln!(r, "## Gateway: the node's own clients to HTTP pods\n");
    let _ = writeln!(
        r,
        "One client process in the node's network namespace, inside the gateway cgroup (`--gateway-cgroup`, as the node's own processes are), CPU 0; two HTTP/1.1 pods (`Connection: close` on every answer), their servers and HAProxy on CPU 1; the agent (`mesh-agent run` in the node's namespace, its router inside it) unpinned. Every variant below exists at once and all of them serve the same two pods; {rounds} rounds, each running every (variant, workload) once in a new random order. Per round: {} new connections per variant (after {} not counted), each `connect()`, one `GET /` with `Connection: close`, the answer (~100 B) read to the server's close, then closed; and {} times a `GET` of a {} MiB body, each on a new connection read to its end (after one of an eighth of that), throughput = bytes / time from `connect()` to the end. `direct` dials one of the pods, the others spread over both; the two pods are identical threads of one process. Medians over rounds (interquartile range in brackets); the ratio is each round's value divided by `direct`'s in the same round, then the median of those ratios. The absolute numbers are of a shared 2-vCPU VM (other builds run beside it) and move between runs; the ratios, measured in the same minutes, are what to read. The p99 and the bulk figures are dominated by that VM's stalls (milliseconds when a vCPU is taken away), so their ratios swing both ways between runs; the p50 ratios are the stable result.\n",
        sizes.connections,
        sizes.warmup,
        sizes.bulk_count,
        sizes.bulk_bytes >> 20
    );
    let _ = writeln!(
        r,
        "- **direct**: the client dials a pod's IP:5000: the kernel's plain TCP path over a veth and a bridge.\n- **gateway, kernel path**: the seed's gateway shape (Gateway on port 80, a gateway-bound VirtualService whose one route has no match): `mesh-agent check` says `served by kernel`; `connect()` to `127.0.0.1:80` is rewritten to a pod, then it is the direct path.\n- **gateway, router path**: a second Gateway on port 8080 whose VirtualService has an exact `/never` route before a `prefix: /` one, so `mesh-agent check` says `served by router` (and the running agent's `explain 127.0.0.1:8080` points at the router): `connect()` is rewritten to the agent's router on loopback, which parses the request, picks the route and forwards it over a second connection to a pod (a userspace HTTP hop, as Istio's Envoy gateway is).\n- **iptables NodePort**: kube-proxy's NodePort layout (`KUBE-SERVICES` -> `KUBE-NODEPORTS` on local addresses -> `KUBE-SVC` with `statistic` -> `KUBE-SEP` DNAT) in the node namespace's `nat OUTPUT`; the client dials the node's address:30080. Loading a nat table turns on conntrack in the node namespace, so every variant here runs with it (as on a real node with kube-proxy).\n- **HAProxy, mode http / mode tcp**: HAProxy 1 thread in the node namespace on 127.0.0.1 as an ingress proxy, round robin over the pods: an HTTP-parsing and a TCP-splicing userspace hop.\n"
    );
    let base_lat = results.get(&(0, Mode::Latency));
    let _ = writeln!(
        r,
        "### Per connection: connect, one HTTP request and answer, close\n\n| variant | p50 µs (IQR) | p99 µs | ratio to direct (p50) | ratio to direct (p99) | what it is |\n|---|---|---|---|---|---|"
    );
    for (i, v) in variants.iter().enumerate() {
        let Some(ms) = results.get(&(i, Mode::Latency)) else {
            continue;
        };
        let mut p50: Vec<f64> = ms.iter().map(|m| m.p50_us).collect();
        let mut p99: Vec<f64> = ms.iter().map(|m| m.p99_us).collect();
        let ratio = |f: fn(&Measurement) -> f64| -> f64 {
            let mut v: Vec<f64> = base_lat
                .map(|b| ms.iter().zip(b).map(|(m, b)| f(m) / f(b)).collect())
                .unwrap_or_default();
            median(&mut v)
        };
        let (r50, r99) = (ratio(|m| m.p50_us), ratio(|m| m.p99_us));
        let errors: u64 = ms.iter().map(|m| m.errors).sum();
        let note = if errors > 0 {
            format!(" ({errors} errors)")
        } else {
            String::new()
        };
        let (q1, q3) = (quantile(&mut p50, 0.25), quantile(&mut p50, 0.75));
        let _ = writeln!(
            r,
            "| {} | {:.0} ({q1:.0}–{q3:.0}){note} | {:.0} | {r50:.2} | {r99:.2} | {} |",
            v.name,
            median(&mut p50),
            median(&mut p99),
            v.what
        );
    }
    let base_bulk = results.get(&(0, Mode::Bulk));
    let _ = writeln!(
        r,
        "\n### Bulk: {} MiB HTTP responses, one connection each\n\n| variant | MiB/s (IQR) | ratio to direct | what it is |\n|---|---|---|---|",
        sizes.bulk_bytes >> 20
    );
    for (i, v) in variants.iter().enumerate() {
        let Some(ms) = results.get(&(i, Mode::Bulk)) else {
            continue;
        };
        let mibs = |m: &Measurement| m.bytes_per_second / f64::from(1u32 << 20);
        let mut values: Vec<f64> = ms.iter().map(mibs).collect();
        let mut ratios: Vec<f64> = base_bulk
            .map(|b| ms.iter().zip(b).map(|(m, b)| mibs(m) / mibs(b)).collect())
            .unwrap_or_default();
        let errors: u64 = ms.iter().map(|m| m.errors).sum();
        let note = if errors > 0 {
            format!(" ({errors} errors)")
        } else {
            String::new()
        };
        let (q1, q3) = (quantile(&mut values, 0.25), quantile(&mut values, 0.75));
        let _ = writeln!(
            r,
            "| {} | {:.0} ({q1:.0}–{q3:.0}){note} | {:.2} | {} |",
            v.name,
            median(&mut values),
            median(&mut ratios),
            v.what
        );
    }
    let _ = writeln!(r);
}
