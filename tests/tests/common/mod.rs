//! The seed's canary topology, shared by the routing tests: a client pod, three
//! flaskapp v1 pods and one v2 pod on one node, the flaskapp Service on a dual-stack
//! VIP, its DestinationRule, and a VirtualService; the real agent attached to a
//! fresh cgroup. Everything is torn down on drop, in reverse order of creation.

#![allow(dead_code)]

use std::{net::IpAddr, time::Duration};

use mesh_tools::{
    agent::Agent,
    backend::Backend,
    cgroup::Cgroup,
    manifests::{self, ManifestDir},
    netns::Node,
    probe::{self, Summary},
};

pub const VIP4: &str = "10.96.0.80";
pub const VIP6: &str = "fd00:10:96::80";
pub const PORT: u16 = 80;
pub const TARGET_PORT: u16 = 5000;

/// The node's addresses on the pods' bridge (with [`Canary::start_on_node`]).
pub const NODE4: &str = "10.244.0.1";
pub const NODE6: &str = "fd00:10:244::1";

pub const V1: [&str; 3] = ["flaskapp-v1-0", "flaskapp-v1-1", "flaskapp-v1-2"];
pub const V2: &str = "flaskapp-v2-0";

// Field order is drop order: the agent detaches first, then backends stop, then
// the cgroup, the namespaces and the manifests go.
pub struct Canary {
    pub agent: Agent,
    pub backends: Vec<Backend>,
    /// (name, version, addresses, ready) of each flaskapp pod, as pods.yaml says.
    pub pods: Vec<(String, String, Vec<IpAddr>, bool)>,
    pub cgroup: Cgroup,
    pub node: Node,
    pub dir: ManifestDir,
}

impl Canary {
    /// The topology with a VirtualService at `weights` (v1, v2), or none.
    pub fn start(weights: Option<(i64, i64)>) -> anyhow::Result<Self> {
        Self::start_flags(weights, &[])
    }

    /// The same, with more `mesh-agent run` flags.
    pub fn start_flags(weights: Option<(i64, i64)>, flags: &[&str]) -> anyhow::Result<Self> {
        Self::start_where(weights, flags, None::<fn(&mut Node) -> anyhow::Result<()>>)
    }

    /// The topology with the agent in the node's network namespace, which has
    /// addresses on the pods' bridge ([`NODE4`], [`NODE6`]): the gateway's view.
    pub fn start_on_node(flags: &[&str]) -> anyhow::Result<Self> {
        Self::start_on_node_prepared(flags, |_| Ok(()))
    }

    /// The same, with `prepare` run on the node (more namespaces, links,
    /// sysctls) before the agent starts.
    pub fn start_on_node_prepared(
        flags: &[&str],
        prepare: impl FnOnce(&mut Node) -> anyhow::Result<()>,
    ) -> anyhow::Result<Self> {
        Self::start_where(None, flags, Some(prepare))
    }

    fn start_where(
        weights: Option<(i64, i64)>,
        flags: &[&str],
        on_node: Option<impl FnOnce(&mut Node) -> anyhow::Result<()>>,
    ) -> anyhow::Result<Self> {
        mesh_tools::require_root();
        let mut node = Node::new()?;
        if on_node.is_some() {
            node.bridge
                .ip(&["addr", "add", &format!("{NODE4}/24"), "dev", "br0"])?;
            node.bridge.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{NODE6}/64"),
                "dev",
                "br0",
                "nodad",
            ])?;
        }
        node.add_pod("client", 2)?;
        let mut backends = Vec::new();
        let dir = ManifestDir::new()?;
        let vips: Vec<IpAddr> = vec![VIP4.parse()?, VIP6.parse()?];
        dir.write(
            "service.yaml",
            &manifests::service("flaskapp", &vips, PORT, TARGET_PORT),
        )?;
        let mut pods = Vec::new();
        for (i, name) in V1.iter().chain([&V2]).enumerate() {
            let version = if name.contains("v2") { "v2" } else { "v1" };
            let pod = node.add_pod(name, 11 + i as u8)?;
            backends.push(Backend::spawn(&pod.ns, name, version, TARGET_PORT)?);
            pods.push((
                name.to_string(),
                version.to_owned(),
                vec![pod.ipv4, pod.ipv6],
                true,
            ));
        }
        write_pods(&dir, &pods)?;
        dir.write(
            "destinationrule.yaml",
            &manifests::destination_rule("flaskapp", &["v1", "v2"]),
        )?;
        if let Some((v1, v2)) = weights {
            dir.write(
                "virtualservice.yaml",
                &manifests::virtual_service("flaskapp", &[("v1", v1), ("v2", v2)]),
            )?;
        }
        let cgroup = Cgroup::create(&mesh_tools::unique("mesh-test-"))?;
        let agent = match on_node {
            Some(prepare) => {
                prepare(&mut node)?;
                Agent::start_in_netns(dir.path(), cgroup.path(), &node.bridge, flags)?
            }
            None => Agent::start_flags(dir.path(), cgroup.path(), flags)?,
        };
        Ok(Canary {
            agent,
            backends,
            pods,
            cgroup,
            node,
            dir,
        })
    }

    /// Marks a pod ready or not (as its readiness probe would) and waits for the
    /// agent to apply it.
    pub fn set_ready(&mut self, name: &str, ready: bool) -> anyhow::Result<()> {
        for pod in &mut self.pods {
            if pod.0 == name {
                pod.3 = ready;
            }
        }
        let next = self.agent.generation() + 1;
        write_pods(&self.dir, &self.pods)?;
        self.agent.wait_applied(next, Duration::from_secs(10))?;
        Ok(())
    }

    /// Removes a file of the manifest folder and waits until the agent applied it.
    pub fn remove(&mut self, file: &str) -> anyhow::Result<Duration> {
        let next = self.agent.generation() + 1;
        std::fs::remove_file(self.dir.path().join(file))?;
        self.agent.wait_applied(next, Duration::from_secs(10))
    }

    /// Writes a file into the manifest folder and waits until the agent applied it.
    pub fn write(&mut self, file: &str, content: &str) -> anyhow::Result<Duration> {
        let next = self.agent.generation() + 1;
        self.dir.write(file, content)?;
        self.agent.wait_applied(next, Duration::from_secs(10))
    }

    /// `count` connections from the client pod inside the mesh cgroup.
    pub fn probe(&self, target: &str, count: u64) -> anyhow::Result<Summary> {
        probe::probe(
            &self.node.pod("client").ns,
            Some(&self.cgroup),
            target,
            count,
            4,
        )
    }

    /// `count` connections from a process of the node's network namespace,
    /// inside the cgroup (the gateway's clients).
    pub fn probe_from_node(&self, target: &str, count: u64) -> anyhow::Result<Summary> {
        probe::probe(&self.node.bridge, Some(&self.cgroup), target, count, 4)
    }

    /// The same, from a process of the client pod that is not in the mesh cgroup.
    pub fn probe_unmeshed(&self, target: &str, count: u64) -> anyhow::Result<Summary> {
        probe::probe(&self.node.pod("client").ns, None, target, count, 1)
    }

    /// Rewrites the VirtualService and waits until the agent has applied it.
    pub fn set_weights(&mut self, v1: i64, v2: i64) -> anyhow::Result<Duration> {
        self.write(
            "virtualservice.yaml",
            &manifests::virtual_service("flaskapp", &[("v1", v1), ("v2", v2)]),
        )
    }
}

fn write_pods(
    dir: &ManifestDir,
    pods: &[(String, String, Vec<IpAddr>, bool)],
) -> anyhow::Result<()> {
    let docs: Vec<String> = pods
        .iter()
        .map(|(name, version, ips, ready)| manifests::pod(name, "flaskapp", version, ips, *ready))
        .collect();
    dir.write("pods.yaml", &docs.join("---\n"))
}

pub fn vip4() -> String {
    format!("{VIP4}:{PORT}")
}

pub fn vip6() -> String {
    format!("[{VIP6}]:{PORT}")
}

/// Asserts an observed share is within `k` standard deviations of `expected` for
/// `n` independent draws (binomial), with k = 5: a correct data plane fails this
/// about once in 1.7 million runs; a wrong split of a few percent fails it always.
pub fn assert_share(observed: f64, expected: f64, n: u64, what: &str) {
    let sd = (expected * (1.0 - expected) / n as f64).sqrt();
    let tolerance = 5.0 * sd;
    assert!(
        (observed - expected).abs() <= tolerance,
        "{what}: observed {:.2}% over {n} connections, expected {:.2}% ± {:.2}%",
        observed * 100.0,
        expected * 100.0,
        tolerance * 100.0
    );
}

// ---- the gateway ----

/// The seed's Gateway (the first document of its gateway.yaml).
pub fn seed_gateway() -> anyhow::Result<String> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/examples/seed/gateway.yaml"
    ))?;
    Ok(text.split("\n---\n").next().unwrap_or_default().to_owned())
}

/// A gateway-bound VirtualService `name` with one route and no L7 match:
/// `host`'s subsets v1 and v2 at these weights.
pub fn weighted_vs(name: &str, gateway: &str, host: &str, v1: u32, v2: u32) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [\"*\"]
  gateways: [{gateway}]
  http:
    - route:
        - {{destination: {{host: {host}, subset: v1}}, weight: {v1}}}
        - {{destination: {{host: {host}, subset: v2}}, weight: {v2}}}
"
    )
}

/// A TCP server in a pod that first sends its pod's name and a newline, then
/// echoes what it reads until EOF: a connection that can be held open and
/// tells which pod it reached. Stops on drop.
pub struct Echo {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Echo {
    pub fn spawn(ns: &mesh_tools::netns::Netns, pod: &str, port: u16) -> anyhow::Result<Self> {
        use std::{
            io::{Read as _, Write as _},
            os::fd::AsFd as _,
            sync::atomic::Ordering,
        };
        let file = ns.open()?;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (tx, rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let pod = pod.to_owned();
        let thread = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let listener = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(anyhow::Error::from)
                    .and_then(|()| {
                        Ok(std::net::TcpListener::bind(std::net::SocketAddr::from((
                            [0u16; 8], port,
                        )))?)
                    });
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
                while !stop.load(Ordering::Relaxed) {
                    let mut fds = [nix::poll::PollFd::new(
                        listener.as_fd(),
                        nix::poll::PollFlags::POLLIN,
                    )];
                    if !matches!(nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u8)), Ok(n) if n > 0)
                    {
                        continue;
                    }
                    let Ok((mut stream, _)) = listener.accept() else {
                        continue;
                    };
                    let pod = pod.clone();
                    std::thread::spawn(move || {
                        let _ = stream.write_all(format!("{pod}\n").as_bytes());
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = stream.read(&mut buf) {
                            if n == 0 || stream.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            }
        });
        rx.recv()??;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `split` (of `n` connections to `target`) is the canary's 80/20 with no
/// failure: v2 at 20%, each of the three v1 pods at 80/3%, and every
/// `getpeername` answering what the client dialled.
pub fn assert_80_20_seen_as(split: &Summary, target: &str, n: u64) {
    assert_eq!(split.failed(), 0, "{target}: {split:?}");
    assert_eq!(split.ok, n, "{target}: {split:?}");
    assert_share(
        split.share("flaskapp-v2"),
        0.20,
        n,
        &format!("v2 through {target}"),
    );
    for pod in V1 {
        assert_share(split.share(pod), 0.80 / 3.0, n, pod);
    }
    assert_eq!(
        split.peers.keys().collect::<Vec<_>>(),
        vec![target],
        "{split:?}"
    );
}
