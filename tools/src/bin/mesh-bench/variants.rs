//! The variants under test and the one topology that holds them all: the direct
//! baseline, ours through a VIP with N services, kube-proxy's iptables and
//! nftables layouts, an HAProxy hop, AF_UNIX, and ours with the same-node
//! redirect on and off; and the same-node ones (direct, the shortcut, AF_UNIX)
//! again with client and server on one CPU.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tools::{
    agent::Agent,
    cgroup::Cgroup,
    manifests::ManifestDir,
    netns::{Netns, Node},
};

use crate::services::{iptables_rules, load_rules, nft_rules, services_dir};

const SERVER_HOST: u8 = 10;
pub(crate) const VIP: &str = "10.96.0.80";
const VIP_ON: &str = "10.96.0.81";
const VIP_OFF: &str = "10.96.0.82";
/// Clients on CPU 0, servers (and the proxy) on CPU 1.
pub(crate) const CLIENT_CPU: &str = "0";
pub(crate) const SERVER_CPU: &str = "1";

/// Where a variant's client runs relative to its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Client on [`CLIENT_CPU`], server on [`SERVER_CPU`].
    Apart,
    /// Client on [`SERVER_CPU`], beside its server.
    SameCpu,
}

impl Placement {
    pub(crate) fn client_cpu(self) -> &'static str {
        match self {
            Placement::Apart => CLIENT_CPU,
            Placement::SameCpu => SERVER_CPU,
        }
    }
}

/// What a row is to the same-node comparison (the report's floor table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// The baseline of its placement: the ratio column divides by it.
    Direct,
    /// Ours with the same-node shortcut.
    Shortcut,
    /// AF_UNIX between two processes: the floor.
    Unix,
    Other,
}

/// One row of every table: a client in `ns` (meshed if `cgroup`) dialling `target`.
pub(crate) struct Variant {
    pub(crate) name: String,
    pub(crate) what: &'static str,
    pub(crate) ns: String,
    /// Index into the topology's cgroups: the client is meshed there.
    pub(crate) cgroup: Option<usize>,
    pub(crate) target: String,
    pub(crate) placement: Placement,
    pub(crate) role: Role,
}

/// Everything the variants need, alive at once so that rounds can interleave.
/// Field order is drop order.
pub(crate) struct Topology {
    pub(crate) variants: Vec<Variant>,
    _processes: Vec<Killed>,
    /// Files the processes use (a Unix socket, HAProxy's configuration),
    /// removed once the processes are gone.
    _files: Vec<Removed>,
    _agents: Vec<Agent>,
    pub(crate) cgroups: Vec<Cgroup>,
    _dirs: Vec<ManifestDir>,
    node: Node,
}

/// A child process killed on drop.
pub(crate) struct Killed(pub(crate) std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A file removed on drop.
struct Removed(PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

pub(crate) fn load_bin() -> anyhow::Result<PathBuf> {
    mesh_tools::agent::sibling_binary("mesh-load")
}

/// `mesh-load serve --listen LISTEN` (`[::]:PORT` or `unix:/path`) in `ns`
/// (and `cgroup`), pinned to the server CPU.
fn serve(ns: &Netns, cgroup: Option<&Cgroup>, listen: &str) -> anyhow::Result<Killed> {
    let mut child = mesh_tools::spawn_in_pod(
        &load_bin()?,
        ns,
        cgroup,
        &["--cpu", SERVER_CPU, "serve", "--listen", listen],
    )?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    if line.trim() != "ready" {
        bail!("mesh-load serve --listen {listen} did not start");
    }
    Ok(Killed(child))
}

/// Sysctls of a client namespace: many short connections need ports.
pub(crate) fn client_sysctls(ns: &Netns) -> anyhow::Result<()> {
    for kv in [
        "net.ipv4.tcp_tw_reuse=1",
        "net.ipv4.ip_local_port_range=1024 65000",
    ] {
        mesh_tools::sh("ip", &["netns", "exec", &ns.name, "sysctl", "-q", "-w", kv])?;
    }
    Ok(())
}

impl Topology {
    /// Every variant, ours and the rule sets with each of `counts` services;
    /// with `proxy`, the HAProxy hop. `build(&[], false)` holds only the
    /// same-node rows (direct, AF_UNIX, ours with redirect on and off, and the
    /// same-CPU placement of direct, the shortcut and AF_UNIX).
    pub(crate) fn build(counts: &[usize], proxy: bool) -> anyhow::Result<Self> {
        let mut node = Node::new()?;
        let server = node.add_pod("server", SERVER_HOST)?.ipv4;
        node.add_pod("client", 2)?;
        if proxy {
            node.add_pod("proxy", 3)?;
        }
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
        let mut processes = vec![serve(&node.pod("server").ns, None, "[::]:7001")?];
        let mut files = Vec::new();
        let mut cgroups = Vec::new();
        let mut agents = Vec::new();
        let mut dirs = Vec::new();
        let client = node.pod("client").ns.name.clone();
        let mut variants = vec![Variant {
            name: "direct".into(),
            what: "client -> pod IP, no mesh (the baseline)",
            ns: client.clone(),
            cgroup: None,
            target: format!("{server}:7001"),
            placement: Placement::Apart,
            role: Role::Direct,
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
                ns: client.clone(),
                cgroup: Some(cgroups.len() - 1),
                target: format!("{VIP}:80"),
                placement: Placement::Apart,
                role: Role::Other,
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
                placement: Placement::Apart,
                role: Role::Other,
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
                placement: Placement::Apart,
                role: Role::Other,
            });
        }
        if proxy {
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
            files.push(Removed(cfg));
            std::thread::sleep(Duration::from_millis(300));
            variants.push(Variant {
                name: "HAProxy hop".into(),
                what: "client -> userspace TCP proxy in the pod -> pod IP (sidecar stand-in)",
                ns: proxy_ns,
                cgroup: None,
                target: "127.0.0.1:15001".into(),
                placement: Placement::Apart,
                role: Role::Other,
            });
        }
        // AF_UNIX: a server process in the client's pod, on the servers' CPU
        // like every TCP server (a thread of the client would run on the
        // client's CPU).
        let unix = std::env::temp_dir().join(format!("{}.sock", mesh_tools::unique("mesh-bench-")));
        let listen = format!("unix:{}", unix.display());
        processes.push(serve(&node.pod("client").ns, None, &listen)?);
        files.push(Removed(unix));
        variants.push(Variant {
            name: "AF_UNIX".into(),
            what: "a Unix stream socket between two processes in one pod (the floor)",
            ns: client.clone(),
            cgroup: None,
            target: listen.clone(),
            placement: Placement::Apart,
            role: Role::Unix,
        });
        // Ours with and without the same-node shortcut: client and server meshed.
        for (on, vip, port) in [(true, VIP_ON, 7002u16), (false, VIP_OFF, 7003)] {
            let cgroup = Cgroup::create(&mesh_tools::unique("mesh-bench-"))?;
            let dir = services_dir(vip, port, 0, server)?;
            let flags: &[&str] = if on { &[] } else { &["--no-redirect"] };
            agents.push(Agent::start_flags(dir.path(), cgroup.path(), flags)?);
            processes.push(serve(
                &node.pod("server").ns,
                Some(&cgroup),
                &format!("[::]:{port}"),
            )?);
            variants.push(Variant {
                name: format!("ours, redirect {}", if on { "on" } else { "off" }),
                what: if on {
                    "both pods meshed, VIP, same-node shortcut (sockops + sk_msg)"
                } else {
                    "both pods meshed, VIP, through TCP/IP (--no-redirect)"
                },
                ns: client.clone(),
                cgroup: Some(cgroups.len()),
                target: format!("{vip}:80"),
                placement: Placement::Apart,
                role: if on { Role::Shortcut } else { Role::Other },
            });
            cgroups.push(cgroup);
            dirs.push(dir);
        }
        // The same-node rows again with the client beside its server on the
        // servers' CPU: the same servers, agents and cgroups.
        let same_cpu: Vec<Variant> = variants
            .iter()
            .filter(|v| v.role != Role::Other)
            .map(|v| Variant {
                name: format!("{} (same CPU)", v.name),
                what: match v.role {
                    Role::Direct => "as direct, client beside the server on its CPU",
                    Role::Shortcut => "as ours, redirect on, client beside the server on its CPU",
                    _ => "as AF_UNIX, client beside the server on its CPU",
                },
                ns: v.ns.clone(),
                cgroup: v.cgroup,
                target: v.target.clone(),
                placement: Placement::SameCpu,
                role: v.role,
            })
            .collect();
        variants.extend(same_cpu);
        Ok(Topology {
            variants,
            _processes: processes,
            _files: files,
            _agents: agents,
            cgroups,
            _dirs: dirs,
            node,
        })
    }

    pub(crate) fn ns(&self, name: &str) -> anyhow::Result<&Netns> {
        self.node
            .pods
            .iter()
            .map(|p| &p.ns)
            .find(|n| n.name == name)
            .context("no such namespace")
    }
}
