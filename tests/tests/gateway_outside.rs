//! The gateway for clients outside the node (issue 13, 2b): an "outside"
//! namespace joined to the node's namespace by a veth (`up0`), the agent with
//! `--gateway-device up0`; the outside client's packets to the node's address
//! on a kernel-served gateway port are translated in tc to a backend chosen by
//! weighted Maglev, and the replies back to the address it dialled.

mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::mpsc,
    time::Duration,
};

use anyhow::Context as _;
use common::{Canary, Echo, V1, V2, assert_share, seed_gateway, weighted_vs};
use mesh_tools::{netns::Netns, probe};

const N: u64 = 2000;
const OUT4: &str = "192.168.77.1";
const OUT6: &str = "fd00:77::1";
const ECHO_PORT: u16 = 7000;

/// The seed's Gateway (gateway.yaml without its VirtualService).
/// A second gateway port (7000) whose backends are the flaskapp pods' echo
/// servers: connections that can be held open.
fn echo_objects() -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: flaskecho, namespace: default}}
spec:
  clusterIP: 10.96.0.81
  clusterIPs: [10.96.0.81, fd00:10:96::81]
  selector: {{app: flaskapp}}
  ports:
    - {{name: echo, port: {ECHO_PORT}, targetPort: {ECHO_PORT}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: flaskecho, namespace: default}}
spec:
  host: flaskecho
  subsets:
    - {{name: v1, labels: {{version: v1}}}}
    - {{name: v2, labels: {{version: v2}}}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: echo-gateway, namespace: default}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
    - {{port: {{number: {ECHO_PORT}, name: http-echo, protocol: HTTP}}, hosts: [\"*\"]}}
"
    )
}

/// The node with an outside namespace on `up0`, IP forwarding on, and routes
/// from the pods back to the outside network through the node.
fn start() -> anyhow::Result<(Canary, Netns, Vec<Echo>)> {
    let outside = Netns::create(&format!("{}-out", mesh_tools::unique("mt")))?;
    let canary = Canary::start_on_node_prepared(&["--gateway-device", "up0"], |node| {
        link(
            &node.bridge,
            "up0",
            &outside,
            (OUT4, OUT6),
            ("192.168.77.2", "fd00:77::2"),
        )?;
        node.bridge.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.ip_forward=1",
                "net.ipv6.conf.all.forwarding=1",
            ],
        )?;
        for pod in node.pods.iter().filter(|p| p.name.starts_with("flaskapp")) {
            pod.ns
                .ip(&["route", "add", "192.168.77.0/24", "via", common::NODE4])?;
            pod.ns
                .ip(&["-6", "route", "add", "fd00:77::/64", "via", common::NODE6])?;
        }
        Ok(())
    })?;
    let mut echoes = Vec::new();
    for pod in canary
        .node
        .pods
        .iter()
        .filter(|p| p.name.starts_with("flaskapp"))
    {
        echoes.push(Echo::spawn(&pod.ns, &pod.name, ECHO_PORT)?);
    }
    Ok((canary, outside, echoes))
}

#[test]
fn outside_clients_are_split_by_weight_in_tc_and_see_the_address_they_dialled() -> anyhow::Result<()>
{
    let (mut canary, outside, _echoes) = start()?;
    seed_edge(&mut canary)?;
    for target in [format!("{OUT4}:80"), format!("[{OUT6}]:80")] {
        settle(&outside, &target)?;
        let split = probe::probe(&outside, None, &target, N, 4)?;
        eprintln!("{target}: {} ms", split.elapsed_ms);
        common::assert_80_20_seen_as(&split, &target, N);
        eprintln!("{target}: {:?}", split.backends);
    }
    // The tc programs' counters in /metrics: every connection a new flow.
    let flows = canary.agent.metric("mesh_gateway_tc_new_flows_total")?;
    assert!(
        flows >= 2 * N,
        "{flows} new flows for {} connections",
        2 * N
    );
    assert_eq!(
        canary
            .agent
            .metric("mesh_gateway_tc_rewrite_failed_total")?,
        0
    );
    // The Gateway deleted: its addresses are not translated any more, and
    // nothing on the node listens there.
    canary.remove("gateway.yaml")?;
    for target in [format!("{OUT4}:80"), format!("[{OUT6}]:80")] {
        let gone = probe::probe(&outside, None, &target, 5, 1)?;
        assert_eq!(
            gone.errors.get("ECONNREFUSED"),
            Some(&5),
            "{target}: {gone:?}"
        );
    }
    Ok(())
}

/// Waits until connections to `target` from `outside` are answered at once.
/// IPv6 in fresh namespaces loses the very first SYNs for about a second
/// (neighbour discovery while the link-local addresses are still tentative):
/// seen just the same without any translation, by connecting from outside
/// straight to a pod's address through the node.
fn settle(outside: &Netns, target: &str) -> anyhow::Result<()> {
    for _ in 0..20 {
        let warm = probe::probe(outside, None, target, 4, 4)?;
        if warm.ok == 4 && warm.elapsed_ms < 500 {
            return Ok(());
        }
    }
    anyhow::bail!("{target}: never answered at once")
}

/// What a thread of the outside namespace holding connections reports.
enum Held {
    /// The pods each connection reached, in order.
    Opened(Vec<String>),
    /// Per connection: whether every byte came back after the events.
    Echoed(Vec<Result<(), String>>),
}

/// Holds `n` connections to `target` from `outside`: reports the pods they
/// reached, waits for `go`, then pushes `bytes` through each and checks the
/// echo.
fn hold(
    outside: &Netns,
    target: SocketAddr,
    n: usize,
    bytes: usize,
) -> anyhow::Result<(mpsc::Receiver<anyhow::Result<Held>>, mpsc::Sender<()>)> {
    let ns = outside.open()?;
    let (tx, rx) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    std::thread::spawn(move || {
        let run = || -> anyhow::Result<()> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let mut conns = Vec::new();
            let mut pods = Vec::new();
            for _ in 0..n {
                let s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut reader = BufReader::new(s.try_clone()?);
                let mut line = String::new();
                reader.read_line(&mut line)?;
                pods.push(line.trim().to_owned());
                conns.push((s, reader));
            }
            let _ = tx.send(Ok(Held::Opened(pods)));
            go_rx.recv()?;
            let payload: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
            let mut results = Vec::new();
            for (mut s, mut reader) in conns {
                let r = (|| -> std::io::Result<()> {
                    s.write_all(&payload)?;
                    let mut back = vec![0u8; bytes];
                    reader.read_exact(&mut back)?;
                    if back != payload {
                        return Err(std::io::Error::other("corrupt echo"));
                    }
                    Ok(())
                })();
                results.push(r.map_err(|e| e.to_string()));
            }
            let _ = tx.send(Ok(Held::Echoed(results)));
            Ok(())
        };
        if let Err(e) = run() {
            let _ = tx.send(Err(e));
        }
    });
    Ok((rx, go_tx))
}

/// Opens `n` fresh connections to the echo port and returns the pods reached.
fn pods_reached(outside: &Netns, target: SocketAddr, n: usize) -> anyhow::Result<Vec<String>> {
    let ns = outside.open()?;
    std::thread::spawn(move || -> anyhow::Result<Vec<String>> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let mut pods = Vec::new();
        for _ in 0..n {
            let s = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            pods.push(line.trim().to_owned());
        }
        Ok(pods)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))?
}

#[test]
fn outside_flows_keep_their_backend_across_a_weight_edit_and_an_agent_restart() -> anyhow::Result<()>
{
    let (mut canary, outside, _echoes) = start()?;
    seed_edge(&mut canary)?;
    canary.write("echo.yaml", &echo_objects())?;
    canary.write(
        "echo-edge.yaml",
        &weighted_vs("echo-edge", "echo-gateway", "flaskecho", 80, 20),
    )?;
    for target in [
        SocketAddr::new(OUT4.parse()?, ECHO_PORT),
        SocketAddr::new(OUT6.parse()?, ECHO_PORT),
    ] {
        let (rx, go) = hold(&outside, target, 20, 256 * 1024)?;
        let opened = match rx.recv_timeout(Duration::from_secs(30))?? {
            Held::Opened(pods) => pods,
            Held::Echoed(_) => anyhow::bail!("echoed before opening"),
        };
        let on_v1 = opened
            .iter()
            .filter(|p| p.starts_with("flaskapp-v1"))
            .count();
        assert!(on_v1 > 0, "{target}: no held connection on v1: {opened:?}");

        // All new connections to v2, the held ones stay where they are.
        canary.write(
            "echo-edge.yaml",
            &weighted_vs("echo-edge", "echo-gateway", "flaskecho", 0, 100),
        )?;
        canary.write(
            "edge.yaml",
            &weighted_vs("flaskapp-edge", "flaskapp-gateway", "flaskapp", 0, 100),
        )?;
        let fresh = pods_reached(&outside, target, 50)?;
        assert!(fresh.iter().all(|p| p == V2), "{target}: {fresh:?}");
        let http = probe::probe(
            &outside,
            None,
            &SocketAddr::new(target.ip(), 80).to_string(),
            200,
            4,
        )?;
        assert_eq!(http.backends.get(V2), Some(&200), "{target}: {http:?}");

        // The agent killed and started again: the pinned programs, tables
        // and conntrack carry on.
        canary.agent.kill()?;
        canary.agent.restart(&[])?;
        let fresh = pods_reached(&outside, target, 20)?;
        assert!(fresh.iter().all(|p| p == V2), "{target}: {fresh:?}");

        // The port no longer served (its Gateway deleted): new connections
        // are refused at once, flows in progress drain.
        let without_gateway: Vec<String> = echo_objects()
            .split("---\n")
            .filter(|d| !d.contains("kind: Gateway"))
            .map(str::to_owned)
            .collect();
        canary.write("echo.yaml", &without_gateway.join("---\n"))?;
        let refused = probe::probe(&outside, None, &target.to_string(), 5, 1)?;
        assert_eq!(
            refused.errors.get("ECONNREFUSED"),
            Some(&5),
            "{target}: {refused:?}"
        );

        go.send(())?;
        all_echoed(&rx, target, &opened, "held connections broke")?;
        eprintln!(
            "{target}: {on_v1} of 20 held connections on v1 survived 0/100, a restart and their Gateway deleted"
        );

        // The Gateway back, at 80/20, for the other family.
        canary.write("echo.yaml", &echo_objects())?;
        canary.write(
            "echo-edge.yaml",
            &weighted_vs("echo-edge", "echo-gateway", "flaskecho", 80, 20),
        )?;
        canary.write(
            "edge.yaml",
            &weighted_vs("flaskapp-edge", "flaskapp-gateway", "flaskapp", 80, 20),
        )?;
    }
    // `cleanup` detaches the tc programs (TCX links pinned by the agent).
    assert_eq!(tcx_programs(&canary.node.bridge)?, 2);
    canary.agent.stop()?;
    // The counters it logs on the way out: every flow had a backend but the
    // 5 + 5 refused while draining, and every rewrite worked (20 held,
    // 50 + 200 + 20 new, per family).
    let counted = canary.agent.records("gateway tc counters");
    let counted = counted.last().context("no gateway tc counters logged")?;
    eprintln!("gateway tc counters: {counted}");
    let n = |k: &str| counted[k].as_u64().unwrap_or(u64::MAX);
    assert!(n("new_flows") >= 580, "{counted}");
    assert!(n("forwarded") > n("new_flows"), "{counted}");
    assert!(n("replied") > 0, "{counted}");
    assert_eq!((n("no_backend"), n("rewrite_failed")), (10, 0), "{counted}");
    canary.agent.cli(&["cleanup"])?;
    assert_eq!(tcx_programs(&canary.node.bridge)?, 0);
    Ok(())
}

/// The gateway's programs attached to `up0` by TCX (ingress and egress).
fn tcx_programs(node: &Netns) -> anyhow::Result<usize> {
    use aya::programs::{SchedClassifier, TcAttachType};
    let ns = node.open()?;
    std::thread::spawn(move || -> anyhow::Result<usize> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        let mut n = 0;
        for at in [TcAttachType::Ingress, TcAttachType::Egress] {
            let (_, programs) = SchedClassifier::query_tcx("up0", at)?;
            n += programs
                .iter()
                .filter(|p| {
                    p.name_as_str()
                        .is_some_and(|n| n.starts_with("mesh_gateway"))
                })
                .count();
        }
        Ok(n)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("thread panicked"))?
}

/// A second node (its own namespace, joined to ours by `peer0`) with one v2
/// pod, `flaskapp-v2-1`, on its own pod network (10.245.0.0/24,
/// fd00:10:245::/64), routed from our node through the second node's address.
struct RemoteNode {
    _pod: Netns,
    _node: Netns,
    _backend: mesh_tools::backend::Backend,
}

const REMOTE_POD: &str = "flaskapp-v2-1";

fn start_with_remote() -> anyhow::Result<(Canary, Netns, RemoteNode)> {
    let outside = Netns::create(&format!("{}-out", mesh_tools::unique("mt")))?;
    let node_b = Netns::create(&format!("{}-nodeb", mesh_tools::unique("mt")))?;
    let pod = Netns::create(&format!("{}-rpod", mesh_tools::unique("mt")))?;
    let canary = Canary::start_on_node_prepared(&["--gateway-device", "up0,peer0"], |node| {
        let a = &node.bridge;
        link(
            a,
            "up0",
            &outside,
            (OUT4, OUT6),
            ("192.168.77.2", "fd00:77::2"),
        )?;
        // Our node <-> node B.
        link(
            a,
            "peer0",
            &node_b,
            ("172.20.0.1", "fd00:20::1"),
            ("172.20.0.2", "fd00:20::2"),
        )?;
        a.ip(&["route", "add", "10.245.0.0/24", "via", "172.20.0.2"])?;
        a.ip(&[
            "-6",
            "route",
            "add",
            "fd00:10:245::/64",
            "via",
            "fd00:20::2",
        ])?;
        // Node B's pod.
        node_b.ip(&[
            "link", "add", "v21", "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
        ])?;
        node_b.ip(&["addr", "add", "10.245.0.1/24", "dev", "v21"])?;
        node_b.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:10:245::1/64",
            "dev",
            "v21",
            "nodad",
        ])?;
        node_b.ip(&["link", "set", "v21", "up"])?;
        pod.ip(&["addr", "add", "10.245.0.21/24", "dev", "eth0"])?;
        pod.ip(&[
            "-6",
            "addr",
            "add",
            "fd00:10:245::21/64",
            "dev",
            "eth0",
            "nodad",
        ])?;
        pod.ip(&["link", "set", "eth0", "up"])?;
        pod.ip(&["route", "add", "default", "via", "10.245.0.1"])?;
        pod.ip(&["-6", "route", "add", "default", "via", "fd00:10:245::1"])?;
        for ns in [a, &node_b] {
            ns.exec(
                "sysctl",
                &[
                    "-qw",
                    "net.ipv4.ip_forward=1",
                    "net.ipv6.conf.all.forwarding=1",
                ],
            )?;
        }
        for p in node.pods.iter().filter(|p| p.name.starts_with("flaskapp")) {
            p.ns.ip(&["route", "add", "192.168.77.0/24", "via", common::NODE4])?;
            p.ns.ip(&["-6", "route", "add", "fd00:77::/64", "via", common::NODE6])?;
        }
        Ok(())
    })?;
    let backend = mesh_tools::backend::Backend::spawn(&pod, REMOTE_POD, "v2", common::TARGET_PORT)?;
    let mut canary = canary;
    canary.pods.push((
        REMOTE_POD.to_owned(),
        "v2".to_owned(),
        vec!["10.245.0.21".parse()?, "fd00:10:245::21".parse()?],
        false,
    ));
    canary.set_ready(REMOTE_POD, true)?;
    Ok((
        canary,
        outside,
        RemoteNode {
            _pod: pod,
            _node: node_b,
            _backend: backend,
        },
    ))
}

#[test]
fn a_backend_on_another_node_is_reached_through_snat_and_answers_from_the_dialled_address()
-> anyhow::Result<()> {
    let (mut canary, outside, _remote) = start_with_remote()?;
    canary.write("gateway.yaml", &seed_gateway()?)?;
    // v2: one pod here, one on node B.
    canary.write(
        "edge.yaml",
        &weighted_vs("flaskapp-edge", "flaskapp-gateway", "flaskapp", 0, 100),
    )?;
    let n = 1000;
    for target in [format!("{OUT4}:80"), format!("[{OUT6}]:80")] {
        settle(&outside, &target)?;
        let split = probe::probe(&outside, None, &target, n, 4)?;
        eprintln!("{target}: {} ms", split.elapsed_ms);
        assert_eq!(split.failed(), 0, "{target}: {split:?}");
        assert_share(split.share(V2), 0.5, n, &format!("{V2} through {target}"));
        assert_share(
            split.share(REMOTE_POD),
            0.5,
            n,
            &format!("{REMOTE_POD} through {target}"),
        );
        assert_eq!(
            split.peers.keys().collect::<Vec<_>>(),
            vec![&target],
            "{split:?}"
        );
        eprintln!("{target}: {:?}", split.backends);
    }
    canary.agent.stop()?;
    let counted = canary.agent.records("gateway tc counters");
    let counted = counted.last().context("no gateway tc counters logged")?;
    eprintln!("gateway tc counters: {counted}");
    let c = |k: &str| counted[k].as_u64().unwrap_or(0);
    assert!(c("snat_flows") > 0 && c("snat_replied") > 0, "{counted}");
    assert_eq!(c("snat_failed"), 0, "{counted}");
    Ok(())
}

#[test]
fn the_seed_gateway2_is_routed_per_request_for_clients_outside_the_node() -> anyhow::Result<()> {
    let (mut canary, outside, _echoes) = start()?;
    // The seed's Service (port 5000, which its VirtualService names) and its
    // gateway2.yaml verbatim: routes on the path, so the router serves them;
    // tc hands outside clients' flows to it on the node's address.
    let vips = [common::VIP4.parse()?, common::VIP6.parse()?];
    canary.write(
        "service.yaml",
        &mesh_tools::manifests::service("flaskapp", &vips, 5000, 5000),
    )?;
    let gateway2 = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../manifests/examples/seed/gateway2.yaml"
    ))?;
    canary.write("gateway.yaml", &gateway2)?;
    for host in [OUT4.to_owned(), format!("[{OUT6}]")] {
        settle(&outside, &format!("{host}:80"))?;
        let root = mesh_tools::curl::curl(&outside, None, &format!("http://{host}/"), 1000)?;
        assert_eq!(root.codes.get(&200), Some(&1000), "{host}: {root:?}");
        for pod in V1.iter().chain([&V2]) {
            assert_share(
                root.share(pod),
                0.25,
                1000,
                &format!("{pod} through {host}/"),
            );
        }
        let other = mesh_tools::curl::curl(&outside, None, &format!("http://{host}/other"), 1000)?;
        assert_eq!(other.codes.get(&200), Some(&1000), "{host}: {other:?}");
        assert_share(
            other.share("flaskapp-v2"),
            0.20,
            1000,
            &format!("v2 through {host}/other"),
        );
        eprintln!("{host}: / {:?}, /other {:?}", root.pods, other.pods);
    }
    Ok(())
}

/// Deletes every entry of the gateway's conntrack map (as an LRU eviction or
/// a replaced map would lose them), with bpftool; returns how many.
fn flush_conntrack(canary: &Canary) -> anyhow::Result<usize> {
    let pinned = canary
        .agent
        .pin_dir
        .join("maps")
        .join(mesh_common::map_names::GATEWAY_CT);
    let pinned = pinned.to_str().context("UTF-8 path")?;
    let dump = mesh_tools::sh("bpftool", &["-j", "map", "dump", "pinned", pinned])?;
    let entries: serde_json::Value = serde_json::from_str(&dump)?;
    let mut n = 0;
    for e in entries.as_array().into_iter().flatten() {
        let key: Vec<String> = e["key"]
            .as_array()
            .context("no key")?
            .iter()
            .filter_map(|b| b.as_str().map(|s| s.trim_start_matches("0x").to_owned()))
            .collect();
        let mut args = vec!["map", "delete", "pinned", pinned, "key", "hex"];
        args.extend(key.iter().map(String::as_str));
        mesh_tools::sh("bpftool", &args)?;
        n += 1;
    }
    Ok(n)
}

#[test]
fn outside_flows_keep_their_backend_across_a_conntrack_miss() -> anyhow::Result<()> {
    let (mut canary, outside, _echoes) = start()?;
    canary.write("echo.yaml", &echo_objects())?;
    canary.write(
        "echo-edge.yaml",
        &weighted_vs("echo-edge", "echo-gateway", "flaskecho", 80, 20),
    )?;
    for target in [
        SocketAddr::new(OUT4.parse()?, ECHO_PORT),
        SocketAddr::new(OUT6.parse()?, ECHO_PORT),
    ] {
        settle_echo(&outside, target)?;
        let (rx, go) = hold(&outside, target, 20, 256 * 1024)?;
        let opened = match rx.recv_timeout(Duration::from_secs(30))?? {
            Held::Opened(pods) => pods,
            Held::Echoed(_) => anyhow::bail!("echoed before opening"),
        };
        // Every conntrack entry gone: the held flows' next packets find
        // none, and Maglev gives each the backend it had.
        let flushed = flush_conntrack(&canary)?;
        assert!(flushed >= 40, "{target}: {flushed} entries for 20 flows");
        go.send(())?;
        all_echoed(&rx, target, &opened, "flows broke after a conntrack miss")?;
        eprintln!(
            "{target}: 20 held flows ({opened:?}) survived losing {flushed} conntrack entries"
        );
    }
    Ok(())
}

/// `settle` for the echo port: a few connections reach a pod at once.
fn settle_echo(outside: &Netns, target: SocketAddr) -> anyhow::Result<()> {
    for _ in 0..20 {
        if pods_reached(outside, target, 4).is_ok_and(|p| p.len() == 4) {
            return Ok(());
        }
    }
    anyhow::bail!("{target}: never answered")
}

/// Waits for the held connections' echo and asserts every one came back
/// whole (`what` says what they went through).
fn all_echoed(
    rx: &mpsc::Receiver<anyhow::Result<Held>>,
    target: SocketAddr,
    opened: &[String],
    what: &str,
) -> anyhow::Result<()> {
    match rx.recv_timeout(Duration::from_secs(60))?? {
        Held::Echoed(results) => {
            let failed: Vec<_> = results.iter().filter(|r| r.is_err()).collect();
            assert!(
                failed.is_empty(),
                "{target}: {what}: {failed:?} (of {opened:?})"
            );
            Ok(())
        }
        Held::Opened(_) => anyhow::bail!("opened twice"),
    }
}

/// A veth pair: `dev` in `a` and `eth0` in `b`, with these (IPv4 /24, IPv6
/// /64) addresses at each end, both up.
fn link(
    a: &Netns,
    dev: &str,
    b: &Netns,
    at_a: (&str, &str),
    at_b: (&str, &str),
) -> anyhow::Result<()> {
    a.ip(&[
        "link", "add", dev, "type", "veth", "peer", "name", "eth0", "netns", &b.name,
    ])?;
    for (ns, name, (v4, v6)) in [(a, dev, at_a), (b, "eth0", at_b)] {
        ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", name])?;
        ns.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{v6}/64"),
            "dev",
            name,
            "nodad",
        ])?;
        ns.ip(&["link", "set", name, "up"])?;
    }
    Ok(())
}

/// The seed's Gateway and a pure-weight VirtualService (80/20) bound to it.
fn seed_edge(canary: &mut Canary) -> anyhow::Result<()> {
    canary.write("gateway.yaml", &seed_gateway()?)?;
    canary.write(
        "edge.yaml",
        &weighted_vs("flaskapp-edge", "flaskapp-gateway", "flaskapp", 80, 20),
    )?;
    Ok(())
}
