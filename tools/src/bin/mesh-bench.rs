//! `mesh-bench` (run by `cargo xtask bench`): every variant of every workload,
//! side by side, interleaved in a random order over several rounds, on this
//! machine; then the agent's own costs. Prints a markdown report (and writes it
//! with `--write FILE`). Never asserts on time: the numbers are the output.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::IpAddr,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use clap::Parser;
use mesh_tools::{
    agent::Agent,
    cgroup::Cgroup,
    load::{Measurement, Workload},
    manifests::{self, ManifestDir},
    netns::{Netns, Node},
};
use rand::{SeedableRng as _, seq::SliceRandom as _};

#[derive(Debug, Parser)]
struct Args {
    /// A smoke run: fewer service counts, short runs (under two minutes).
    #[arg(long)]
    quick: bool,
    #[arg(long)]
    rounds: Option<usize>,
    /// Write the report here too (e.g. docs/benchmarks.md).
    #[arg(long)]
    write: Option<PathBuf>,
}

const SERVER_HOST: u8 = 10;
const VIP: &str = "10.96.0.80";
const VIP_ON: &str = "10.96.0.81";
const VIP_OFF: &str = "10.96.0.82";
/// Clients on CPU 0, servers (and the proxy) on CPU 1.
const CLIENT_CPU: &str = "0";
const SERVER_CPU: &str = "1";

struct Variant {
    name: String,
    what: &'static str,
    ns: String,
    /// Index into the topology's cgroups: the client is meshed there.
    cgroup: Option<usize>,
    target: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Load {
    Crr64,
    Rr64,
    Rr1k,
    Bulk,
}

impl Load {
    fn all() -> [Load; 4] {
        [Load::Crr64, Load::Rr64, Load::Rr1k, Load::Bulk]
    }

    fn args(self) -> (Workload, usize) {
        match self {
            Load::Crr64 => (Workload::Crr, 64),
            Load::Rr64 => (Workload::Rr, 64),
            Load::Rr1k => (Workload::Rr, 1024),
            Load::Bulk => (Workload::Bulk, 0),
        }
    }

    fn title(self) -> &'static str {
        match self {
            Load::Crr64 => "New connection per request (connect, 64 B request, 64 B answer, close)",
            Load::Rr64 => "Request/response on a kept-alive connection, 64 B",
            Load::Rr1k => "Request/response on a kept-alive connection, 1 KiB",
            Load::Bulk => "Bulk throughput, one connection",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mesh_tools::require_root();
    let rounds = args.rounds.unwrap_or(5).max(1);
    let (warmup, duration) = if args.quick {
        (Duration::from_millis(50), Duration::from_millis(250))
    } else {
        (Duration::from_millis(200), Duration::from_millis(1000))
    };
    let counts: Vec<usize> = if args.quick {
        vec![1, 1000]
    } else {
        vec![1, 1000, 10_000, 50_000]
    };
    let started = Instant::now();
    let mut report = String::new();
    header(&mut report, &args, rounds, duration)?;

    let bench = Topology::build(&counts)?;
    eprintln!("topology ready in {:.1} s", started.elapsed().as_secs_f64());
    let results = bench.run(rounds, warmup, duration)?;
    tables(&mut report, &bench.variants, &results);
    drop(bench);

    agent_costs(&mut report, args.quick)?;
    method(&mut report);
    print!("{report}");
    if let Some(path) = args.write {
        std::fs::write(&path, &report).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Everything the variants need, alive at once so that rounds can interleave.
/// Field order is drop order.
struct Topology {
    variants: Vec<Variant>,
    _processes: Vec<Killed>,
    _agents: Vec<Agent>,
    cgroups: Vec<Cgroup>,
    _dirs: Vec<ManifestDir>,
    node: Node,
}

/// A child process killed on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn load_bin() -> anyhow::Result<PathBuf> {
    mesh_tools::agent::sibling_binary("mesh-load")
}

/// `mesh-load serve` in `ns` (and `cgroup`), pinned to the server CPU.
fn serve(ns: &Netns, cgroup: Option<&Cgroup>, port: u16) -> anyhow::Result<Killed> {
    let listen = format!("[::]:{port}");
    let mut child = mesh_tools::spawn_in_pod(
        &load_bin()?,
        ns,
        cgroup,
        &["--cpu", SERVER_CPU, "serve", "--listen", &listen],
    )?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    if line.trim() != "ready" {
        bail!("mesh-load serve on {port} did not start");
    }
    Ok(Killed(child))
}

/// Sysctls of a client namespace: many short connections need ports.
fn client_sysctls(ns: &Netns) -> anyhow::Result<()> {
    for kv in [
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65000",
    ] {
        mesh_tools::sh("ip", &["netns", "exec", &ns.name, "sysctl", "-q", "-w", kv])?;
    }
    Ok(())
}

/// A file-source folder: the target Service (VIP:80 -> server:port) and `fillers`
/// more Services (no endpoints: table entries only).
fn services_dir(
    vip: &str,
    port: u16,
    fillers: usize,
    server: IpAddr,
) -> anyhow::Result<ManifestDir> {
    let dir = ManifestDir::new()?;
    dir.write(
        "service.yaml",
        &manifests::service("bench", &[vip.parse()?], 80, port),
    )?;
    dir.write(
        "pod.yaml",
        &manifests::pod("bench-0", "bench", "v1", &[server], true),
    )?;
    let mut fill = String::new();
    for i in 0..fillers {
        let vip = filler_vip(i);
        let _ = writeln!(
            fill,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: filler-{i}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  selector: {{app: filler-{i}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]"
        );
    }
    if fillers > 0 {
        dir.write("fillers.yaml", &fill)?;
    }
    Ok(dir)
}

/// Service `i` of a variant with N: the target (last) at VIP -> `target`, the
/// others filler VIPs -> filler backends. (VIP, backend IP, backend port.)
fn service_i(i: usize, n: usize, target: (&str, u16)) -> (String, String, u16) {
    if i + 1 == n {
        (VIP.to_owned(), target.0.to_owned(), target.1)
    } else {
        (
            filler_vip(i),
            format!("10.98.{}.{}", i / 250, 1 + i % 250),
            8080,
        )
    }
}

fn filler_vip(i: usize) -> String {
    format!("10.97.{}.{}", i / 250, 1 + i % 250)
}

/// Feeds `rules` to `command` (`iptables-restore`, `nft -f -`) on stdin, inside `ns`.
fn load_rules(ns: &Netns, command: &str, rules: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(command.split_whitespace())
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {command}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{command}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// kube-proxy's iptables layout for `n` services, the target last in KUBE-SERVICES.
fn iptables_rules(n: usize, backend_ip: &str, backend_port: u16) -> String {
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut chains = String::new();
    let mut rules = String::new();
    for i in 0..n {
        let (vip, ip, port) = service_i(i, n, (backend_ip, backend_port));
        let dest = format!("{ip}:{port}");
        let _ = writeln!(chains, ":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i}\n-A KUBE-SVC-{i} -m statistic --mode random --probability 1.0 -j KUBE-SEP-{i}\n-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {dest}"
        );
    }
    r.push_str(&chains);
    r.push_str(&rules);
    r.push_str("-A OUTPUT -j KUBE-SERVICES\nCOMMIT\n");
    r
}

/// An nftables verdict map with `n` services (a hash lookup, as kube-proxy's
/// nftables mode does).
fn nft_rules(n: usize, backend_ip: &str, backend_port: u16) -> String {
    let mut chains = String::new();
    let mut elements = Vec::new();
    for i in 0..n {
        let (vip, ip, port) = service_i(i, n, (backend_ip, backend_port));
        let _ = writeln!(
            chains,
            "  chain svc{i} {{ meta l4proto tcp dnat to {ip}:{port}; }}"
        );
        elements.push(format!("{vip} . 80 : jump svc{i}"));
    }
    format!(
        "table ip mesh_bench {{\n{chains}  map services {{ type ipv4_addr . inet_service : verdict; elements = {{ {} }}; }}\n  chain out {{ type nat hook output priority -100; ip daddr . tcp dport vmap @services; }}\n}}\n",
        elements.join(", ")
    )
}

impl Topology {
    fn build(counts: &[usize]) -> anyhow::Result<Self> {
        let mut node = Node::new()?;
        let server = node.add_pod("server", SERVER_HOST)?.ipv4;
        node.add_pod("client", 2)?;
        node.add_pod("proxy", 3)?;
        for (i, n) in counts.iter().enumerate() {
            node.add_pod(&format!("ipt-{n}"), 30 + i as u8)?;
            node.add_pod(&format!("nft-{n}"), 40 + i as u8)?;
        }
        for pod in &node.pods {
            if pod.name != "server" {
                client_sysctls(&pod.ns)?;
                // A route for the service range, as every node has: locally made
                // packets are routed before iptables/nftables rewrite them.
                pod.ns
                    .ip(&["route", "add", "10.96.0.0/12", "dev", "eth0"])?;
            }
        }
        let mut processes = vec![serve(&node.pod("server").ns, None, 7001)?];
        let mut cgroups = Vec::new();
        let mut agents = Vec::new();
        let mut dirs = Vec::new();
        let mut variants = vec![Variant {
            name: "direct".into(),
            what: "client -> pod IP, no mesh (the baseline)",
            ns: node.pod("client").ns.name.clone(),
            cgroup: None,
            target: format!("{server}:7001"),
        }];
        // Ours, connect-time routing only (redirect off), with N services loaded.
        for &n in counts {
            let cgroup = Cgroup::create(&mesh_tools::unique("mesh-bench-"))?;
            let dir = services_dir(VIP, 7001, n - 1, server)?;
            let t = Instant::now();
            agents.push(Agent::start_flags(
                dir.path(),
                cgroup.path(),
                &["--no-redirect"],
            )?);
            eprintln!(
                "agent with {n} services ready in {:.1} s",
                t.elapsed().as_secs_f64()
            );
            cgroups.push(cgroup);
            variants.push(Variant {
                name: format!("ours VIP, {n} svc"),
                what: "meshed client -> VIP, rewritten at connect()",
                ns: node.pod("client").ns.name.clone(),
                cgroup: Some(cgroups.len() - 1),
                target: format!("{VIP}:80"),
            });
            dirs.push(dir);
        }
        for &n in counts {
            let ns = &node.pod(&format!("ipt-{n}")).ns;
            load_rules(
                ns,
                "iptables-restore",
                &iptables_rules(n, &server.to_string(), 7001),
            )?;
            variants.push(Variant {
                name: format!("iptables, {n} svc"),
                what: "kube-proxy iptables layout: DNAT, target service last",
                ns: ns.name.clone(),
                cgroup: None,
                target: format!("{VIP}:80"),
            });
        }
        for &n in counts {
            let ns = &node.pod(&format!("nft-{n}")).ns;
            load_rules(ns, "nft -f -", &nft_rules(n, &server.to_string(), 7001))?;
            variants.push(Variant {
                name: format!("nftables map, {n} svc"),
                what: "nftables verdict map (hash) + DNAT",
                ns: ns.name.clone(),
                cgroup: None,
                target: format!("{VIP}:80"),
            });
        }
        // A userspace proxy hop in the client pod: the sidecar's stand-in.
        let cfg = std::env::temp_dir().join(mesh_tools::unique("mesh-bench-haproxy-"));
        std::fs::write(
            &cfg,
            format!(
                "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nlisten sidecar\n  bind 127.0.0.1:15001\n  server backend {server}:7001\n"
            ),
        )?;
        let proxy_ns = node.pod("proxy").ns.name.clone();
        let haproxy = Command::new("ip")
            .args([
                "netns", "exec", &proxy_ns, "taskset", "-c", SERVER_CPU, "haproxy", "-db", "-f",
            ])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("spawning haproxy (apt-get install haproxy; cargo xtask bench does)")?;
        processes.push(Killed(haproxy));
        std::thread::sleep(Duration::from_millis(300));
        variants.push(Variant {
            name: "HAProxy hop".into(),
            what: "client -> userspace TCP proxy in the pod -> pod IP (sidecar stand-in)",
            ns: proxy_ns,
            cgroup: None,
            target: "127.0.0.1:15001".into(),
        });
        variants.push(Variant {
            name: "AF_UNIX".into(),
            what: "a Unix stream socket in one pod (the floor)",
            ns: node.pod("client").ns.name.clone(),
            cgroup: None,
            target: "unix".into(),
        });
        // Ours with and without the same-node shortcut: client and server meshed.
        for (on, vip, port) in [(true, VIP_ON, 7002u16), (false, VIP_OFF, 7003)] {
            let cgroup = Cgroup::create(&mesh_tools::unique("mesh-bench-"))?;
            let dir = services_dir(vip, port, 0, server)?;
            let flags: &[&str] = if on { &[] } else { &["--no-redirect"] };
            agents.push(Agent::start_flags(dir.path(), cgroup.path(), flags)?);
            processes.push(serve(&node.pod("server").ns, Some(&cgroup), port)?);
            variants.push(Variant {
                name: format!("ours, redirect {}", if on { "on" } else { "off" }),
                what: if on {
                    "both pods meshed, VIP, same-node shortcut (sockops + sk_msg)"
                } else {
                    "both pods meshed, VIP, through TCP/IP (--no-redirect)"
                },
                ns: node.pod("client").ns.name.clone(),
                cgroup: Some(cgroups.len()),
                target: format!("{vip}:80"),
            });
            cgroups.push(cgroup);
            dirs.push(dir);
        }
        let _ = std::fs::remove_file(&cfg);
        Ok(Topology {
            variants,
            _processes: processes,
            _agents: agents,
            cgroups,
            _dirs: dirs,
            node,
        })
    }

    fn ns(&self, name: &str) -> anyhow::Result<&Netns> {
        self.node
            .pods
            .iter()
            .map(|p| &p.ns)
            .find(|n| n.name == name)
            .context("no such namespace")
    }

    /// Every (variant, workload) once per round, in a new random order each round.
    fn run(
        &self,
        rounds: usize,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<BTreeMap<(usize, Load), Vec<Measurement>>> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x6d65_7368);
        let mut results: BTreeMap<(usize, Load), Vec<Measurement>> = BTreeMap::new();
        let mut order: Vec<(usize, Load)> = (0..self.variants.len())
            .flat_map(|v| Load::all().map(move |l| (v, l)))
            .collect();
        for round in 0..rounds {
            order.shuffle(&mut rng);
            eprintln!("round {}/{rounds}: {} runs", round + 1, order.len());
            for &(v, load) in &order {
                let m = self.measure(&self.variants[v], load, warmup, duration)?;
                results.entry((v, load)).or_default().push(m);
            }
        }
        Ok(results)
    }

    fn measure(
        &self,
        variant: &Variant,
        load: Load,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<Measurement> {
        let (workload, size) = load.args();
        let child = mesh_tools::spawn_in_pod(
            &load_bin()?,
            self.ns(&variant.ns)?,
            variant.cgroup.map(|i| &self.cgroups[i]),
            &[
                "--cpu",
                CLIENT_CPU,
                "run",
                "--target",
                &variant.target,
                "--workload",
                match workload {
                    Workload::Crr => "crr",
                    Workload::Rr => "rr",
                    Workload::Bulk => "bulk",
                },
                "--size",
                &size.to_string(),
                "--warmup-ms",
                &warmup.as_millis().to_string(),
                "--duration-ms",
                &duration.as_millis().to_string(),
            ],
        );
        let out = child?.wait_with_output()?;
        let text = String::from_utf8(out.stdout)?;
        let line = text.lines().last().context("mesh-load printed nothing")?;
        Ok(serde_json::from_str(line)?)
    }
}

fn median(v: &mut [f64]) -> f64 {
    quantile(v, 0.5)
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let pos = (v.len() - 1) as f64 * q;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

fn header(r: &mut String, args: &Args, rounds: usize, duration: Duration) -> anyhow::Result<()> {
    let uname = mesh_tools::sh("uname", &["-srm"])?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(r, "# Benchmarks\n");
    let _ = writeln!(
        r,
        "Generated by `cargo xtask bench{}` on {} (`{}`, {cpus} CPUs: {cpu}). {rounds} rounds; each run {} ms after a warm-up, every variant and workload once per round in a new random order. Medians over rounds, with the interquartile range; the ratio is each round's value divided by `direct` in the same round, then the median of those ratios (latency: lower is better; throughput and rate: higher is better).\n",
        if args.quick { " --quick" } else { "" },
        chrono_like_now(),
        uname.trim(),
        duration.as_millis()
    );
    Ok(())
}

/// UTC date and time, from the system clock.
fn chrono_like_now() -> String {
    mesh_tools::sh("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

fn tables(
    r: &mut String,
    variants: &[Variant],
    results: &BTreeMap<(usize, Load), Vec<Measurement>>,
) {
    let direct = 0usize;
    for load in Load::all() {
        let _ = writeln!(r, "## {}\n", load.title());
        let bulk = load == Load::Bulk;
        if bulk {
            let _ = writeln!(
                r,
                "| variant | Gbit/s (IQR) | ratio to direct | what it measures |\n|---|---|---|---|"
            );
        } else {
            let _ = writeln!(
                r,
                "| variant | median latency µs (IQR) | p99 µs | {} | ratio to direct (latency) | what it measures |\n|---|---|---|---|---|---|",
                if load == Load::Crr64 {
                    "connections/s"
                } else {
                    "requests/s"
                }
            );
        }
        let base: Vec<&Measurement> = results
            .get(&(direct, load))
            .map(|v| v.iter().collect())
            .unwrap_or_default();
        for (i, v) in variants.iter().enumerate() {
            let Some(ms) = results.get(&(i, load)) else {
                continue;
            };
            let value = |m: &Measurement| {
                if bulk {
                    m.bytes_per_second * 8.0 / 1e9
                } else {
                    m.p50_us
                }
            };
            let mut values: Vec<f64> = ms.iter().map(value).collect();
            let mut ratios: Vec<f64> = ms
                .iter()
                .zip(&base)
                .map(|(m, b)| value(m) / value(b))
                .collect();
            let errors: u64 = ms.iter().map(|m| m.errors).sum();
            let (q1, q3) = (quantile(&mut values, 0.25), quantile(&mut values, 0.75));
            let med = median(&mut values);
            let note = if errors > 0 {
                format!(" ({errors} errors)")
            } else {
                String::new()
            };
            if bulk {
                let _ = writeln!(
                    r,
                    "| {} | {med:.2} ({q1:.2}–{q3:.2}){note} | {:.2} | {} |",
                    v.name,
                    median(&mut ratios),
                    v.what
                );
            } else {
                let mut p99: Vec<f64> = ms.iter().map(|m| m.p99_us).collect();
                let mut rate: Vec<f64> = ms
                    .iter()
                    .map(|m| m.ops as f64 / m.seconds.max(1e-9))
                    .collect();
                let _ = writeln!(
                    r,
                    "| {} | {med:.1} ({q1:.1}–{q3:.1}){note} | {:.1} | {:.0} | {:.2} | {} |",
                    v.name,
                    median(&mut p99),
                    median(&mut rate),
                    median(&mut ratios),
                    v.what
                );
            }
        }
        let _ = writeln!(r);
    }
}

/// The agent's own costs: compile + apply and memory at 10k services / 100k
/// endpoints, and how fast a weight edit reaches the kernel.
fn agent_costs(r: &mut String, quick: bool) -> anyhow::Result<()> {
    let (services, per) = if quick { (1000, 10) } else { (10_000, 10) };
    let _ = writeln!(r, "## The agent\n");
    let dir = ManifestDir::new()?;
    let mut yaml = String::new();
    for i in 0..services {
        let vip = format!("10.99.{}.{}", i / 250, 1 + i % 250);
        let _ = writeln!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  selector: {{app: s{i}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:"
        );
        for e in 0..per {
            let n = i * per + e;
            let _ = writeln!(
                yaml,
                "  - addresses: [\"10.{}.{}.{}\"]\n    conditions: {{ready: true}}",
                100 + n / 65_000,
                (n / 250) % 260,
                1 + n % 250
            );
        }
    }
    dir.write("scale.yaml", &yaml)?;
    let cgroup = Cgroup::create(&mesh_tools::unique("mesh-bench-"))?;
    let t = Instant::now();
    let agent = Agent::start_flags(dir.path(), cgroup.path(), &["--no-redirect"])?;
    let ready = t.elapsed();
    let applied = agent.records("config applied");
    let first = applied.first().cloned().unwrap_or_default();
    let pid = agent.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> String {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or_else(|| "?".to_owned(), |kb| format!("{:.0} MiB", kb / 1024.0))
    };
    let _ = writeln!(
        r,
        "{services} Services and {} endpoints (EndpointSlices), file source, one process:\n\n| measure | value |\n|---|---|\n| start to first apply (read, parse, compile, write the maps, attach) | {:.2} s |\n| compile (index to slot tables) | {:.1} ms |\n| apply (write {services} tables into the maps) | {:.1} ms |\n| resident memory after the first apply (VmRSS) | {} |\n| peak resident memory (VmHWM) | {} |\n",
        services * per,
        ready.as_secs_f64(),
        first["compile_us"].as_f64().unwrap_or(f64::NAN) / 1e3,
        first["apply_us"].as_f64().unwrap_or(f64::NAN) / 1e3,
        field("VmRSS:"),
        field("VmHWM:"),
    );
    drop(agent);
    drop(cgroup);
    drop(dir);

    // Weight edits through the file source: write the file, wait for the kernel.
    let dir = ManifestDir::new()?;
    let server: IpAddr = "10.244.0.10".parse()?;
    dir.write(
        "service.yaml",
        &manifests::service("bench", &["10.96.0.90".parse()?], 80, 7001),
    )?;
    dir.write(
        "pods.yaml",
        &[
            manifests::pod("bench-v1", "bench", "v1", &[server], true),
            manifests::pod("bench-v2", "bench", "v2", &["10.244.0.11".parse()?], true),
        ]
        .join("---\n"),
    )?;
    dir.write(
        "dr.yaml",
        &manifests::destination_rule("bench", &["v1", "v2"]),
    )?;
    dir.write(
        "vs.yaml",
        &manifests::virtual_service("bench", &[("v1", 80), ("v2", 20)]),
    )?;
    let cgroup = Cgroup::create(&mesh_tools::unique("mesh-bench-"))?;
    let mut agent = Agent::start_flags(dir.path(), cgroup.path(), &["--no-redirect"])?;
    let mut edits = Vec::new();
    for i in 0..if quick { 5 } else { 20 } {
        let next = agent.generation() + 1;
        let w = 10 + (i * 7) % 80;
        let t = Instant::now();
        dir.write(
            "vs.yaml",
            &manifests::virtual_service("bench", &[("v1", w), ("v2", 100 - w)]),
        )?;
        agent.wait_applied(next, Duration::from_secs(10))?;
        edits.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(120));
    }
    let (q1, q3) = (quantile(&mut edits, 0.25), quantile(&mut edits, 0.75));
    let max = edits.iter().copied().fold(0.0, f64::max);
    let _ = writeln!(
        r,
        "Weight edit to the kernel, file source ({} edits: the file rewritten, until the agent has written the maps; includes the deliberate 50 ms debounce for editors' multi-step saves): median {:.1} ms (IQR {q1:.1}–{q3:.1}), max {max:.1} ms.\n",
        edits.len(),
        median(&mut edits)
    );
    drop(agent);
    kube_propagation(r, if quick { 5 } else { 20 })
}

/// The same edit through a real kube-apiserver: `kubectl patch` of the
/// VirtualService, until the agent (`--source kubernetes`) has written the maps.
fn kube_propagation(r: &mut String, edits: usize) -> anyhow::Result<()> {
    use mesh_tools::apiserver::{ApiServer, endpoint_slice};
    let api = match ApiServer::start() {
        Ok(api) => api,
        Err(e) => {
            let _ = writeln!(
                r,
                "Weight edit to the kernel, Kubernetes source: not measured ({e}).\n"
            );
            return Ok(());
        }
    };
    api.install_mesh_crds()?;
    let mut pods = Vec::new();
    for (name, version, ip) in [
        ("bench-v1", "v1", "10.244.0.10"),
        ("bench-v2", "v2", "10.244.0.11"),
    ] {
        let ip: IpAddr = ip.parse()?;
        api.running_pod(name, "bench", version, ip)?;
        pods.push((name.to_owned(), ip, true));
    }
    api.apply(&manifests::service(
        "bench",
        &["10.96.0.90".parse()?],
        80,
        7001,
    ))?;
    api.apply(&endpoint_slice("bench", 7001, &pods))?;
    api.apply(&manifests::destination_rule("bench", &["v1", "v2"]))?;
    api.apply(&manifests::virtual_service(
        "bench",
        &[("v1", 80), ("v2", 20)],
    ))?;
    let cgroup = Cgroup::create(&mesh_tools::unique("mesh-bench-"))?;
    let agent = Agent::start_kubernetes(&api.kubeconfig, cgroup.path())?;
    let mut kubectl_ms = Vec::new();
    let mut to_kernel_ms = Vec::new();
    let mut generations = Vec::new();
    for i in 0..edits {
        let w = 10 + (i * 7) % 80;
        let patch = format!(
            r#"{{"spec":{{"http":[{{"route":[{{"destination":{{"host":"bench","subset":"v1"}},"weight":{w}}},{{"destination":{{"host":"bench","subset":"v2"}},"weight":{}}}]}}]}}}}"#,
            100 - w
        );
        let next = agent.generation() + 1;
        let t0 = Instant::now();
        // Watch for the apply from another thread (1 ms polls) while kubectl runs.
        let applied_at = std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                while agent.generation() < next && t0.elapsed() < Duration::from_secs(20) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Instant::now()
            });
            let result = api.kubectl(&[
                "patch",
                "virtualservice",
                "bench",
                "--type",
                "merge",
                "-p",
                &patch,
            ]);
            kubectl_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            result.map(|_| watcher.join().unwrap_or_else(|_| Instant::now()))
        })?;
        to_kernel_ms.push(applied_at.duration_since(t0).as_secs_f64() * 1e3);
        generations.push(next);
        std::thread::sleep(Duration::from_millis(100));
    }
    // The agent's own part: from the watch event in hand to the maps written.
    let mut agent_ms: Vec<f64> = agent
        .records("config applied")
        .iter()
        .filter(|r| {
            r["generation"]
                .as_u64()
                .is_some_and(|g| generations.contains(&g))
        })
        .filter_map(|r| r["elapsed_us"].as_f64())
        .map(|us| us / 1e3)
        .collect();
    let _ = writeln!(
        r,
        "Weight edit to the kernel, Kubernetes source (kube-apiserver 1.20 on loopback, {edits} `kubectl patch` edits of the VirtualService): from starting `kubectl patch` to the maps written, median {:.1} ms (IQR {:.1}–{:.1}); `kubectl patch` itself (process start-up, discovery, the request) took a median {:.1} ms{}. The agent's part, from the watch event to the maps written: median {:.2} ms.\n",
        median(&mut to_kernel_ms),
        quantile(&mut to_kernel_ms, 0.25),
        quantile(&mut to_kernel_ms, 0.75),
        median(&mut kubectl_ms.clone()),
        if median(&mut to_kernel_ms.clone()) < median(&mut kubectl_ms.clone()) {
            ": the change was in the kernel before kubectl returned"
        } else {
            ""
        },
        median(&mut agent_ms),
    );
    Ok(())
}

fn method(r: &mut String) {
    let _ = writeln!(
        r,
        "## Method\n
- **Topology**: network namespaces as pods on a bridge in a `node` namespace (the tests' harness): a client pod, a server pod, a proxy pod, one pod per iptables/nftables variant (their rules live in the client's namespace, `OUTPUT` hook, so only that variant sees them). Nothing leaves the machine.
- **CPU pinning**: every client on CPU 0; servers and HAProxy on CPU 1. On a 2-CPU VM the agents (idle during runs) and the kernel's softirq work share those CPUs.
- **Warm-up**: each run starts with a warm-up whose requests are not counted; every variant's server and rules are in place before the first round.
- **Interleaving**: all variants exist at once; each round runs every (variant, workload) once, in a new random order, so drift in the machine spreads across variants instead of biasing one. Ratios are taken within a round.
- **direct**: an unmeshed client to the server's pod IP: the kernel's plain TCP path through veth and a bridge. **ours VIP, N svc**: a meshed client dials the VIP; `connect4` finds it among N services (hash map) and rewrites the destination; redirect off, to isolate connect-time routing. **iptables, N svc**: kube-proxy's layout (`KUBE-SERVICES` -> `KUBE-SVC` with a `statistic` match -> `KUBE-SEP` DNAT), the target service last, so a new connection walks N rules; established connections skip them (conntrack), which is why only the new-connection workload should move. **nftables map**: one verdict-map lookup and DNAT. **HAProxy hop**: a userspace TCP proxy in the client's pod, the stand-in for a sidecar (no Envoy in reachable registries); a real sidecar mesh adds such a hop on both sides. **AF_UNIX**: a Unix stream socket inside one process, the floor for request/response. **ours, redirect on/off**: both pods in a mesh cgroup, through a VIP; with the same-node shortcut (sockops + sk_msg) and without.
- **Workloads**: `mesh-load` (tools/src/load.rs): one client thread; a new connection per request (connect, 64 B, 64 B back, close), or request/response on one connection (64 B, 1 KiB), or one connection writing 64 KiB chunks to a discarding server.
- **Known noise**: a shared 2-vCPU VM; runs of a second or less; the IQR shows what the rounds disagreed on. `--quick` (CI's smoke run) uses 250 ms runs and fewer service counts: read its numbers as a smoke test, not a result.
"
    );
}
