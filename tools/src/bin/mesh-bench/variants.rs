//! The variants under test and the one topology that holds them all: the direct
//! baseline, ours through a VIP with N services, kube-proxy's iptables and
//! nftables layouts, an HAProxy hop, AF_UNIX, and ours with the same-node
//! redirect on and off.

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

/// One row of every table: a client in `ns` (meshed if `cgroup`) dialling `target`.
pub(crate) struct Variant {
    pub(crate) name: String,
    pub(crate) what: &'static str,
    pub(crate) ns: String,
    /// Index into the topology's cgroups: the client is meshed there.
    pub(crate) cgroup: Option<usize>,
    pub(crate) target: String,
}

/// Everything the variants need, alive at once so that rounds can interleave.
/// Field order is drop order.
pub(crate) struct Topology {
    pub(crate) variants: Vec<Variant>,
    _processes: Vec<Killed>,
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

pub(crate) fn load_bin() -> anyhow::Result<PathBuf> {
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
    pub(crate) fn build(counts: &[usize]) -> anyhow::Result<Self> {
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

    pub(crate) fn ns(&self, name: &str) -> anyhow::Result<&Netns> {
        self.node
            .pods
            .iter()
            .map(|p| &p.ns)
            .find(|n| n.name == name)
            .context("no such namespace")
    }
}
