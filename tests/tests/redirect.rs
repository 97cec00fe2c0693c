//! Same-node socket redirection (sockops + sk_msg) through the real kernel: every
//! byte checked, the shortcut proven by the namespaces' own TCP segment counters,
//! and the one key collision namespaces can really produce (identical loopback
//! tuples) shown never to cross.

use std::net::IpAddr;

use mesh_tools::{
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
    _dir: ManifestDir,
}

impl SameNode {
    fn start(agent_flags: &[&str]) -> anyhow::Result<Self> {
        Self::start_annotated(agent_flags, &[])
    }

    /// With annotations on pod `echo-1`.
    fn start_annotated(agent_flags: &[&str], echo1: &[(&str, &str)]) -> anyhow::Result<Self> {
        mesh_tools::require_root();
        let mut node = Node::new()?;
        node.add_pod("client", 2)?;
        let dir = ManifestDir::new()?;
        let mut pods = Vec::new();
        for (i, name) in ["echo-0", "echo-1"].iter().enumerate() {
            let pod = node.add_pod(name, 21 + i as u8)?;
            let annotations = if *name == "echo-1" { echo1 } else { &[] };
            pods.push(manifests::pod_annotated(
                name,
                "echo",
                "v1",
                &[pod.ipv4, pod.ipv6],
                true,
                annotations,
            ));
        }
        dir.write("pods.yaml", &pods.join("---\n"))?;
        let vip: IpAddr = VIP.parse()?;
        dir.write(
            "service.yaml",
            &manifests::service("echo", &[vip], 80, SERVE_PORT),
        )?;
        let cgroup = Cgroup::create(&mesh_tools::unique("mesh-test-"))?;
        let agent = Agent::start_flags(dir.path(), cgroup.path(), agent_flags)?;
        Ok(SameNode {
            servers: Vec::new(),
            agent: Some(agent),
            cgroup,
            node,
            _dir: dir,
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

    /// `mesh-xfer send ARGS` from the client pod, meshed.
    fn send(&self, args: &[&str]) -> anyhow::Result<SendReport> {
        send_from(self.ns("client"), Some(&self.cgroup), args)
    }

    /// One connection per size to `target` (more `mesh-xfer send` flags in
    /// `extra`): checks that every byte came back, and returns what the client saw
    /// and how the redirection counters moved meanwhile.
    fn exchange(
        &self,
        target: &str,
        sizes: &[usize],
        extra: &[&str],
    ) -> anyhow::Result<(SendReport, Counts)> {
        let before = self.redirect()?;
        let sizes_csv = csv(sizes);
        let mut args = vec!["--target", target, "--sizes", &sizes_csv];
        args.extend_from_slice(extra);
        let report = self.send(&args)?;
        assert_exact(&report, sizes);
        Ok((report, self.redirect()?.since(before)))
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
    excluded: u64,
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
            excluded: agent.metric("mesh_redirect_excluded_sockets_total")?,
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
            excluded: self.excluded - before.excluded,
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

/// Payload sizes: the edges (1 byte, around a page, an MSS, a 64 KiB message,
/// a sk_msg's scatterlist), then random sizes up to `max`.
fn sizes(seed: u64, random: usize, max: usize) -> Vec<usize> {
    use rand::{Rng as _, SeedableRng as _};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut sizes = vec![1, 2, 63, 1448, 4095, 4096, 4097, 65535, 65536, 65537, 69633];
    sizes.extend((0..random).map(|_| 1 + rng.next_u32() as usize % max));
    sizes
}

fn total(sizes: &[usize]) -> u64 {
    sizes.iter().map(|&s| s as u64).sum()
}

/// Both directions of every connection went socket to socket, none through TCP.
fn assert_redirected(counts: &Counts, conns: usize, bytes_each_way: u64) {
    assert_eq!(
        counts.added,
        2 * conns as u64,
        "both ends of each connection are added: {counts:?}"
    );
    assert_eq!(counts.add_failed, 0, "{counts:?}");
    assert_eq!(counts.bytes, 2 * bytes_each_way, "{counts:?}");
    assert_eq!(counts.fallback_bytes, 0, "{counts:?}");
}

fn pod_to_pod(v6: bool) -> anyhow::Result<()> {
    let mut node = SameNode::start(&[])?;
    node.serve("echo-0", &[])?;
    let pod = node.node.pod("echo-0");
    let target = std::net::SocketAddr::new(if v6 { pod.ipv6 } else { pod.ipv4 }, SERVE_PORT);
    let target = target.to_string();

    // Large writes, many connections at once, both directions busy.
    let big = sizes(if v6 { 6 } else { 4 }, 24, 4 << 20);
    let (report, counts) = node.exchange(&target, &big, &["--concurrency", "8"])?;
    assert_eq!(
        report.peers.keys().collect::<Vec<_>>(),
        [&target],
        "{report:?}"
    );
    assert_redirected(&counts, big.len(), total(&big));

    // Small writes: each a message of its own (1..=97 bytes).
    let small = sizes(if v6 { 7 } else { 5 }, 8, 256 << 10);
    let (_, counts) = node.exchange(
        &target,
        &small,
        &["--concurrency", "4", "--max-write", "97"],
    )?;
    assert_redirected(&counts, small.len(), total(&small));
    assert!(
        counts.msgs >= total(&small) / 97,
        "one message per write at least: {counts:?}"
    );

    // Every closed socket has left the map.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while node.agent().metric("mesh_redirect_sockets")? != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "sockets stayed in the map after closing"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn pod_to_pod_ipv4_every_byte_arrives_socket_to_socket() -> anyhow::Result<()> {
    pod_to_pod(false)
}

#[test]
fn pod_to_pod_ipv6_every_byte_arrives_socket_to_socket() -> anyhow::Result<()> {
    pod_to_pod(true)
}

/// 64 MiB each way on one connection. The proof that the bytes skipped TCP/IP
/// comes from the kernel's own TCP counters in the client's namespace, not from
/// ours: a handful of segments (handshake, FIN) with the redirect, tens of
/// thousands without it (`--no-redirect`, same pods, same transfer).
#[test]
fn bulk_64mib_barely_touches_tcp_and_no_redirect_turns_it_off() -> anyhow::Result<()> {
    let size = [64usize << 20];
    let mut segments = Vec::new();
    for flags in [&[][..], &["--no-redirect"][..]] {
        let mut node = SameNode::start(flags)?;
        node.serve("echo-0", &[])?;
        let target = format!("{}:{SERVE_PORT}", node.node.pod("echo-0").ipv4);
        let client = node.ns("client");
        let segs = |ns: &Netns| -> anyhow::Result<u64> {
            Ok(ns.snmp("Tcp", "OutSegs")? + ns.snmp("Tcp", "InSegs")?)
        };
        let (segs_before, before) = (segs(client)?, node.redirect()?);
        let report = node.send(&["--target", &target, "--sizes", &csv(&size)])?;
        let (used, counts) = (segs(client)? - segs_before, node.redirect()?.since(before));
        assert_exact(&report, &size);
        if flags.is_empty() {
            assert_redirected(&counts, 1, total(&size));
        } else {
            assert_eq!(
                counts.added + counts.bytes + counts.fallback_bytes,
                0,
                "{counts:?}"
            );
        }
        segments.push(used);
    }
    eprintln!(
        "TCP segments in and out of the client pod for 64 MiB each way: redirect {} / no redirect {}",
        segments[0], segments[1]
    );
    assert!(
        segments[0] < 50,
        "with the redirect: {} segments",
        segments[0]
    );
    // 64 MiB each way through TCP: ~49 000 segments in and out here (GSO counts
    // MSS-sized segments); anything near that means the bytes took TCP.
    assert!(
        segments[1] > 40_000,
        "without the redirect: {} segments",
        segments[1]
    );
    Ok(())
}

/// Dialling the Service VIP: connect-time routing picks a backend on this node,
/// and the connection then takes the shortcut; the application still sees the VIP.
#[test]
fn vip_connections_take_the_shortcut_and_still_see_the_vip() -> anyhow::Result<()> {
    let mut node = SameNode::start(&[])?;
    node.serve("echo-0", &[])?;
    node.serve("echo-1", &[])?;
    let vip = format!("{VIP}:80");
    let sizes = sizes(8, 30, 1 << 20);
    let (report, counts) = node.exchange(&vip, &sizes, &["--concurrency", "6"])?;
    assert_eq!(
        report.peers.keys().collect::<Vec<_>>(),
        [&vip],
        "getpeername shows the VIP: {report:?}"
    );
    assert_redirected(&counts, sizes.len(), total(&sizes));
    Ok(())
}

/// Half-close: the client sends everything and shuts its sending side; the server
/// reads to that EOF, then answers over the direction still open.
#[test]
fn data_flows_back_after_one_direction_is_shut_down() -> anyhow::Result<()> {
    let mut node = SameNode::start(&[])?;
    node.serve("echo-0", &["--mode", "collect"])?;
    let target = format!("{}:{SERVE_PORT}", node.node.pod("echo-0").ipv4);
    let sizes = [1usize, 1000, 65536, 1 << 20, 8 << 20];
    let (_, counts) = node.exchange(&target, &sizes, &["--concurrency", "5"])?;
    assert_redirected(&counts, sizes.len(), total(&sizes));
    Ok(())
}

/// The server closes each connection after echoing 1 MiB of the 16 MiB the client
/// sends: the client ends (no hang), and what it got back is exactly the first
/// bytes it sent.
#[test]
fn a_peer_closing_mid_stream_ends_the_transfer_cleanly() -> anyhow::Result<()> {
    let mut node = SameNode::start(&[])?;
    let cut = 1u64 << 20;
    node.serve("echo-0", &["--close-after", &cut.to_string()])?;
    let target = format!("{}:{SERVE_PORT}", node.node.pod("echo-0").ipv4);
    let sizes = [16usize << 20; 4];
    let report = node.send(&[
        "--target",
        &target,
        "--sizes",
        &csv(&sizes),
        "--concurrency",
        "4",
    ])?;
    assert_eq!(report.conns, 4, "{report:?}");
    assert_eq!(report.corrupt, 0, "wrong bytes came back: {report:?}");
    assert_eq!(report.short, 4, "every transfer was cut: {report:?}");
    assert!(report.bytes_back <= 4 * cut, "{report:?}");
    // Through TCP, closing with unread bytes answers RST (ECONNRESET, EPIPE). With
    // the redirect the unread bytes sit in the socket's message queue, not its TCP
    // queue, so the close is a plain FIN and the client may see only EOF.
    let expected = ["write:EPIPE", "write:ECONNRESET", "read:ECONNRESET"];
    assert!(
        report.errors.keys().all(|e| expected.contains(&e.as_str())),
        "the client saw a closed peer, nothing else: {report:?}"
    );
    Ok(())
}

/// `sendfile(2)` goes through `sk_msg` like any send and is redirected. `splice(2)`
/// on the receiving side reads only the TCP queue and would never see redirected
/// bytes (a kernel limitation), so a server that splices opts out with Istio's
/// `traffic.sidecar.istio.io/excludeInboundPorts`: both ends keep to TCP and every
/// byte arrives.
#[test]
fn sendfile_is_redirected_and_splicing_servers_opt_out() -> anyhow::Result<()> {
    let exclude = [("traffic.sidecar.istio.io/excludeInboundPorts", "7000")];
    let mut node = SameNode::start_annotated(&[], &exclude)?;
    node.serve("echo-0", &[])?;
    node.serve("echo-1", &["--splice"])?;
    let sizes = sizes(9, 6, 8 << 20);
    let extra = ["--concurrency", "4", "--sendfile"];

    let plain = format!("{}:{SERVE_PORT}", node.node.pod("echo-0").ipv4);
    let (_, counts) = node.exchange(&plain, &sizes, &extra)?;
    assert_redirected(&counts, sizes.len(), total(&sizes));

    let splicing = format!("{}:{SERVE_PORT}", node.node.pod("echo-1").ipv4);
    let (_, counts) = node.exchange(&splicing, &sizes, &extra)?;
    assert_eq!(
        counts.excluded,
        2 * sizes.len() as u64,
        "both ends left alone: {counts:?}"
    );
    assert_eq!(
        counts.added + counts.bytes + counts.fallback_bytes,
        0,
        "{counts:?}"
    );
    Ok(())
}

/// The one collision namespaces really produce: the same loopback tuple in two
/// pods at the same time (both serve on 127.0.0.1:7000, both clients bind
/// 127.0.0.1:40000). Both pairs take the shortcut (four sockets added, none
/// refused) and each client gets back exactly its own bytes.
#[test]
fn identical_loopback_tuples_in_two_pods_never_cross() -> anyhow::Result<()> {
    let mut node = SameNode::start(&[])?;
    let loopback = format!("127.0.0.1:{SERVE_PORT}");
    for pod in ["echo-0", "echo-1"] {
        let server = Server::start(node.ns(pod), Some(&node.cgroup), &["--listen", &loopback])?;
        node.servers.push(server);
    }
    let size = (8usize << 20).to_string();
    let before = node.redirect()?;
    let clients: Vec<_> = [("echo-0", "101"), ("echo-1", "202")]
        .into_iter()
        .map(|(pod, seed)| {
            mesh_tools::spawn_in_pod(
                &mesh_tools::xfer::binary()?,
                node.ns(pod),
                Some(&node.cgroup),
                &[
                    "send",
                    "--target",
                    &loopback,
                    "--bind",
                    "127.0.0.1:40000",
                    "--sizes",
                    &size,
                    "--seed",
                    seed,
                    "--hold-ms",
                    "500",
                ],
            )
        })
        .collect::<anyhow::Result<_>>()?;
    for client in clients {
        let report = mesh_tools::xfer::finish(client)?;
        assert_exact(&report, &[8 << 20]);
    }
    let counts = node.redirect()?.since(before);
    assert_redirected(&counts, 2, 2 * (8 << 20));
    Ok(())
}

/// A client outside the mesh cgroup talking to a meshed server: its socket is never
/// added, the server's answers find no mesh peer and go through TCP, and every
/// byte still arrives.
#[test]
fn sockets_outside_the_mesh_are_untouched() -> anyhow::Result<()> {
    let mut node = SameNode::start(&[])?;
    node.serve("echo-0", &[])?;
    let target = format!("{}:{SERVE_PORT}", node.node.pod("echo-0").ipv4);
    let sizes = [1usize, 65536, 4 << 20];
    let before = node.redirect()?;
    let segs = node.ns("client").snmp("Tcp", "OutSegs")?;
    let report = send_from(
        node.ns("client"),
        None,
        &["--target", &target, "--sizes", &csv(&sizes)],
    )?;
    let segs = node.ns("client").snmp("Tcp", "OutSegs")? - segs;
    assert_exact(&report, &sizes);
    let counts = node.redirect()?.since(before);
    assert_eq!(
        counts.added,
        sizes.len() as u64,
        "only the server ends: {counts:?}"
    );
    assert_eq!(counts.bytes, 0, "{counts:?}");
    assert_eq!(counts.fallback_bytes, total(&sizes), "{counts:?}");
    assert!(
        segs > 1000,
        "the unmeshed client's bytes went through TCP: {segs} segments"
    );
    Ok(())
}

/// The agent stops while 1 MiB sits redirected but unread in a server socket (the
/// server waits 3 s before reading). Those bytes are not lost: the socket map lives
/// on with the sockets in it, and the connection finishes byte-exact; the next
/// connection, made after the agent is gone, goes through TCP.
#[test]
fn stopping_the_agent_loses_no_queued_byte() -> anyhow::Result<()> {
    let mut node = SameNode::start(&[])?;
    node.serve("echo-0", &["--delay-ms", "3000"])?;
    let target = format!("{}:{SERVE_PORT}", node.node.pod("echo-0").ipv4);
    let sizes = [1usize << 20, 1000];
    let client = mesh_tools::spawn_in_pod(
        &mesh_tools::xfer::binary()?,
        node.ns("client"),
        Some(&node.cgroup),
        &["send", "--target", &target, "--sizes", &csv(&sizes)],
    )?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while node.redirect()?.bytes < 1 << 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "the first MiB was never redirected"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        node.agent().metric("mesh_redirect_sockets")?,
        2,
        "both ends of the open connection are in the map"
    );
    node.agent.take().expect("agent running").stop()?;
    let report = mesh_tools::xfer::finish(client)?;
    assert_exact(&report, &sizes);
    Ok(())
}

/// Reads one line of a spawned tool's stdout.
fn line(out: &mut impl std::io::BufRead) -> anyhow::Result<String> {
    let mut line = String::new();
    out.read_line(&mut line)?;
    Ok(line.trim().to_owned())
}

/// Overlapping pod IPs (two pod pairs on two bridges with the same addresses, as
/// kind-in-pod or docker-in-docker CI runners make) give two connections the very
/// same 4-tuple. Connection A (pair 1) is half-closed by its client, which then
/// leaves, while A's server holds its end open; connection B (pair 2) then reuses
/// the tuple (its client binds the same source port). B's bytes must all come back
/// to B, byte for byte, and A's server must receive none of them.
#[test]
fn a_reused_tuple_never_reaches_a_half_closed_socket_of_another_pod() -> anyhow::Result<()> {
    use std::io::BufReader;

    let node = SameNode::start(&[])?;
    let mut other = Node::new()?;
    other.add_pod("client", 2)?;
    other.add_pod("echo-0", 21)?;
    let (client, server) = (node.node.pod("client"), node.node.pod("echo-0"));
    assert_eq!(
        (client.ipv4, server.ipv4),
        (other.pod("client").ipv4, other.pod("echo-0").ipv4),
        "the second pair overlaps the first"
    );
    let target = format!("{}:{SERVE_PORT}", server.ipv4);
    let bind = format!("{}:40000", client.ipv4);
    let xfer = mesh_tools::xfer::binary()?;

    // A: the server holds its end; the client sends, half-closes and leaves.
    let a_size = 100_000usize;
    let mut a_server = mesh_tools::spawn_in_pod(
        &xfer,
        node.ns("echo-0"),
        Some(&node.cgroup),
        &[
            "hold",
            "--listen",
            &format!("0.0.0.0:{SERVE_PORT}"),
            "--seed",
            "11",
            "--expect",
            &a_size.to_string(),
            "--timeout-ms",
            "60000",
        ],
    )?;
    // Killed on any early return; its normal end is its own exit.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut a_out = BufReader::new(a_server.stdout.take().expect("piped"));
    let a_server = Kill(a_server);
    assert_eq!(line(&mut a_out)?, "ready");
    let pushed = mesh_tools::spawn_in_pod(
        &xfer,
        node.ns("client"),
        Some(&node.cgroup),
        &[
            "push",
            "--target",
            &target,
            "--bind",
            &bind,
            "--size",
            &a_size.to_string(),
            "--seed",
            "11",
        ],
    )?
    .wait_with_output()?;
    assert!(pushed.status.success(), "A's client failed: {pushed:?}");
    assert_eq!(
        line(&mut a_out)?,
        format!("eof {a_size} true"),
        "A's server got A's bytes, then A's half-close"
    );

    // B: same addresses, same ports, in the other pair; an echo both ways.
    let b_server = Server::start(
        &other.pod("echo-0").ns,
        Some(&node.cgroup),
        &["--listen", &target],
    )?;
    let b_size = 4usize << 20;
    let report = send_from(
        &other.pod("client").ns,
        Some(&node.cgroup),
        &[
            "--target",
            &target,
            "--bind",
            &bind,
            "--sizes",
            &b_size.to_string(),
            "--seed",
            "22",
            "--timeout-ms",
            "5000",
        ],
    )?;
    drop(b_server);

    // Release A's server: it reports what reached its half-closed end since.
    let released = send_from(
        node.ns("client"),
        None,
        &["--target", &target, "--sizes", "0"],
    );
    assert_eq!(
        line(&mut a_out)?,
        "late 0",
        "A's server received B's bytes (B saw {report:?}; release: {released:?})"
    );
    assert_exact(&report, &[b_size]);
    drop(a_server);
    Ok(())
}
