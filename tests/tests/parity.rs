//! kube-proxy parity through the real kernel: which endpoints a meshed pod's
//! connect to a Service VIP may reach, as kube-proxy would choose them
//! (`internalTrafficPolicy`, terminating endpoints, `trafficDistribution` and
//! topology hints), from EndpointSlices in the agent's folder, with the agent
//! told its node (`--node-name node-a`).

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::{Canary, TARGET_PORT, V1, V2, VIP4, VIP6, assert_share, vip4};
use mesh_tools::probe::{self, Summary};

const N: u64 = 1000;

/// One endpoint of the flaskapp slice: pod, node, zone hint, and conditions
/// (ready, serving, terminating).
struct Ep {
    pod: &'static str,
    node: &'static str,
    hint: Option<&'static str>,
    conditions: (bool, bool, bool),
}

const READY: (bool, bool, bool) = (true, true, false);
const TERMINATING: (bool, bool, bool) = (false, true, true);
const GONE: (bool, bool, bool) = (false, false, true);

fn ep(pod: &'static str, node: &'static str, conditions: (bool, bool, bool)) -> Ep {
    Ep {
        pod,
        node,
        hint: None,
        conditions,
    }
}

/// The flaskapp Service, with more `spec` lines (policies).
fn service(extra: &str) -> String {
    format!(
        "apiVersion: v1
kind: Service
metadata: {{name: flaskapp, namespace: default}}
spec:
  clusterIP: {VIP4}
  clusterIPs: [{VIP4}, {VIP6}]
  selector: {{app: flaskapp}}
  ports: [{{name: http, port: 80, targetPort: {TARGET_PORT}}}]
{extra}"
    )
}

/// The flaskapp Service's IPv4 EndpointSlice, as the EndpointSlice controller
/// writes it.
fn slice(canary: &Canary, endpoints: &[Ep]) -> String {
    let mut out = format!(
        "apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: flaskapp-x1
  namespace: default
  labels: {{kubernetes.io/service-name: flaskapp}}
addressType: IPv4
ports: [{{name: http, port: {TARGET_PORT}, protocol: TCP}}]
endpoints:
"
    );
    for e in endpoints {
        let ip = canary
            .pods
            .iter()
            .find(|p| p.0 == e.pod)
            .and_then(|p| p.2.iter().find(|a| a.is_ipv4()))
            .expect("a pod of the topology");
        let (ready, serving, terminating) = e.conditions;
        out.push_str(&format!(
            "  - addresses: [\"{ip}\"]
    nodeName: {node}
    conditions: {{ready: {ready}, serving: {serving}, terminating: {terminating}}}
    targetRef: {{kind: Pod, name: {pod}, namespace: default}}
",
            node = e.node,
            pod = e.pod,
        ));
        if let Some(zone) = e.hint {
            out.push_str(&format!("    hints: {{forZones: [{{name: {zone}}}]}}\n"));
        }
    }
    out
}

/// This node's Node object, in zone `zone`.
fn node_a(zone: &str) -> String {
    format!(
        "apiVersion: v1
kind: Node
metadata:
  name: node-a
  labels: {{topology.kubernetes.io/zone: {zone}}}
"
    )
}

/// `N` connects from the client pod; the pods that answered.
fn answered(canary: &Canary) -> anyhow::Result<(Summary, BTreeSet<String>)> {
    let seen = canary.probe(&vip4(), N)?;
    let pods = seen.backends.keys().cloned().collect();
    Ok((seen, pods))
}

fn set(pods: &[&str]) -> BTreeSet<String> {
    pods.iter().map(|p| (*p).to_owned()).collect()
}

#[test]
fn internal_traffic_policy_local_keeps_to_this_nodes_endpoints_and_refuses_without_one()
-> anyhow::Result<()> {
    let mut canary = Canary::start_flags(None, &["--node-name", "node-a"])?;
    let two_nodes = [
        ep(V1[0], "node-a", READY),
        ep(V1[1], "node-a", READY),
        ep(V1[2], "node-b", READY),
        ep(V2, "node-b", READY),
    ];
    canary.write("slice.yaml", &slice(&canary, &two_nodes))?;
    canary.write("service.yaml", &service("  internalTrafficPolicy: Local\n"))?;
    let (seen, pods) = answered(&canary)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_eq!(pods, set(&[V1[0], V1[1]]), "{seen:?}");
    assert_share(seen.share(V1[0]), 0.5, N, "node-a's first endpoint");

    // None of them on this node: refused at once, as kube-proxy drops.
    let elsewhere = [ep(V1[2], "node-b", READY), ep(V2, "node-b", READY)];
    canary.write("slice.yaml", &slice(&canary, &elsewhere))?;
    let refused = canary.probe(&vip4(), 20)?;
    assert_eq!(refused.errors.get("EHOSTUNREACH"), Some(&20), "{refused:?}");
    assert!(refused.elapsed_ms < 2000, "refused at once: {refused:?}");

    // Cluster (the default): every ready endpoint, wherever it runs.
    canary.write("slice.yaml", &slice(&canary, &two_nodes))?;
    canary.write("service.yaml", &service(""))?;
    let (seen, pods) = answered(&canary)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_eq!(pods, set(&[V1[0], V1[1], V1[2], V2]), "{seen:?}");
    Ok(())
}

#[test]
fn terminating_endpoints_serve_only_while_no_endpoint_is_ready() -> anyhow::Result<()> {
    let mut canary = Canary::start_flags(None, &["--node-name", "node-a"])?;
    let one_ready = [
        ep(V1[0], "node-a", READY),
        ep(V1[1], "node-a", TERMINATING),
        ep(V1[2], "node-a", TERMINATING),
        ep(V2, "node-a", GONE),
    ];
    canary.write("slice.yaml", &slice(&canary, &one_ready))?;
    let (seen, pods) = answered(&canary)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_eq!(pods, set(&[V1[0]]), "the ready one alone: {seen:?}");

    // The ready one goes: the serving, terminating ones take over (not the
    // one that stopped serving).
    let none_ready = [
        ep(V1[0], "node-a", GONE),
        ep(V1[1], "node-a", TERMINATING),
        ep(V1[2], "node-a", TERMINATING),
        ep(V2, "node-a", GONE),
    ];
    canary.write("slice.yaml", &slice(&canary, &none_ready))?;
    let (seen, pods) = answered(&canary)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_eq!(pods, set(&[V1[1], V1[2]]), "{seen:?}");
    assert_share(seen.share(V1[1]), 0.5, N, "a terminating endpoint");
    Ok(())
}

#[test]
fn prefer_close_keeps_to_this_zone_and_takes_every_endpoint_when_it_has_none() -> anyhow::Result<()>
{
    let mut canary = Canary::start_flags(None, &["--node-name", "node-a"])?;
    canary.write("node.yaml", &node_a("zone-1"))?;
    let hinted = |pod, node, zone| Ep {
        hint: Some(zone),
        ..ep(pod, node, READY)
    };
    let zones = [
        hinted(V1[0], "node-a", "zone-1"),
        hinted(V1[1], "node-c", "zone-1"),
        hinted(V1[2], "node-b", "zone-2"),
        hinted(V2, "node-b", "zone-2"),
    ];
    canary.write("slice.yaml", &slice(&canary, &zones))?;
    canary.write(
        "service.yaml",
        &service("  trafficDistribution: PreferClose\n"),
    )?;
    let (seen, pods) = answered(&canary)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_eq!(pods, set(&[V1[0], V1[1]]), "zone-1's endpoints: {seen:?}");

    // This node moves to a zone no endpoint is hinted for: all of them.
    canary.write("node.yaml", &node_a("zone-3"))?;
    let (seen, pods) = answered(&canary)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_eq!(pods, set(&[V1[0], V1[1], V1[2], V2]), "{seen:?}");
    Ok(())
}

/// `sessionAffinity: ClientIP` with this timeout.
fn sticky(timeout_s: u32) -> String {
    service(&format!(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {{clientIP: {{timeoutSeconds: {timeout_s}}}}}\n"
    ))
}

/// `count` connects from pod `pod`, meshed; the pods that answered.
fn from(canary: &Canary, pod: &str, count: u64) -> anyhow::Result<Summary> {
    let seen = probe::probe(
        &canary.node.pod(pod).ns,
        Some(&canary.cgroup),
        &vip4(),
        count,
        4,
    )?;
    anyhow::ensure!(seen.failed() == 0, "{pod}: {seen:?}");
    Ok(seen)
}

#[test]
fn session_affinity_keeps_each_client_on_one_backend_until_it_idles_past_the_timeout()
-> anyhow::Result<()> {
    let mut canary = Canary::start(None)?;
    canary.node.add_pod("client-b", 3)?;
    canary.node.add_pod("client-c", 4)?;
    canary.write("service.yaml", &sticky(1))?;
    let mut pinned = BTreeSet::new();
    for client in ["client", "client-b", "client-c"] {
        let seen = from(&canary, client, N)?;
        assert_eq!(
            seen.backends.len(),
            1,
            "{client} kept one backend: {seen:?}"
        );
        pinned.extend(seen.backends.into_keys());
    }
    eprintln!("three clients pinned to {pinned:?}");

    // Idle longer than the timeout between connects: each draws anew, so ten
    // of them reach more than one backend (all on one: 1 in 262 144).
    let mut drawn = BTreeSet::new();
    for _ in 0..10 {
        drawn.extend(from(&canary, "client", 1)?.backends.into_keys());
        std::thread::sleep(Duration::from_millis(1300));
    }
    assert!(drawn.len() > 1, "drew {drawn:?} after idling past 1 s");

    // Without affinity (the Service edited back): one client spreads at once.
    canary.write("service.yaml", &service(""))?;
    let seen = from(&canary, "client", N)?;
    assert_eq!(seen.backends.len(), 4, "{seen:?}");
    Ok(())
}

#[test]
fn a_client_pinned_to_a_backend_that_leaves_moves_at_once_and_stays_moved() -> anyhow::Result<()> {
    let mut canary = Canary::start(None)?;
    canary.write("service.yaml", &sticky(3600))?;
    let explained = canary.agent.cli(&["explain", &vip4()])?;
    assert!(
        explained.contains("session affinity ClientIP: a client (pod) keeps its backend while it stays, until idle 3600 s"),
        "{explained}"
    );
    let seen = from(&canary, "client", 200)?;
    let first = seen.backends.keys().next().cloned().unwrap_or_default();
    assert_eq!(seen.backends.len(), 1, "{seen:?}");
    canary.set_ready(&first, false)?;
    let seen = from(&canary, "client", 200)?;
    assert_eq!(seen.backends.len(), 1, "pinned anew: {seen:?}");
    assert!(
        !seen.backends.contains_key(&first),
        "{first} left: {seen:?}"
    );
    Ok(())
}

/// The first of the client pod's extra addresses (`CLIENTS` of them).
const FIRST_CLIENT: &str = "fd00:10:244::1:0";
const CLIENTS: u32 = 1000;

/// `CLIENTS` more addresses on the client pod's interface. Each backend pod
/// knows them as neighbours for good: found by solicitation, 1 000 clients x
/// 4 backends would overflow the kernel's neighbour table (1 024 entries for
/// all namespaces; permanent entries are not counted), and connects would
/// time out for a reason that is not ours.
fn add_client_addresses(canary: &Canary) -> anyhow::Result<()> {
    let first: std::net::Ipv6Addr = FIRST_CLIENT.parse()?;
    let addresses: Vec<std::net::Ipv6Addr> = (0..CLIENTS)
        .map(|i| std::net::Ipv6Addr::from(u128::from(first) + u128::from(i)))
        .collect();
    let client = &canary.node.pod("client").ns;
    let batch = |name: &str, line: &dyn Fn(&std::net::Ipv6Addr) -> String| {
        let file = canary.dir.path().join(name);
        std::fs::write(&file, addresses.iter().map(line).collect::<String>())?;
        anyhow::Ok(file.display().to_string())
    };
    let adds = batch("addresses.batch", &|a| {
        format!("address add {a}/64 dev eth0 nodad\n")
    })?;
    client.ip(&["-6", "-batch", &adds])?;
    let link: serde_json::Value =
        serde_json::from_str(&client.ip(&["-j", "link", "show", "eth0"])?)?;
    let mac = link[0]["address"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("no MAC for the client's eth0: {link}"))?
        .to_owned();
    let neighbours = batch("neighbours.batch", &|a| {
        format!("neigh replace {a} lladdr {mac} dev eth0 nud permanent\n")
    })?;
    for pod in V1.iter().chain([&V2]) {
        canary.node.pod(pod).ns.ip(&["-6", "-batch", &neighbours])?;
    }
    Ok(())
}

/// Two connects from each of the client pod's `CLIENTS` addresses to the
/// IPv6 VIP: each address's pod (it must reach one only).
fn by_client(canary: &Canary) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let sources = format!("{FIRST_CLIENT}+{CLIENTS}");
    let seen = probe::finish(probe::spawn(
        &canary.node.pod("client").ns,
        Some(&canary.cgroup),
        &[
            "--target",
            &common::vip6(),
            "--count",
            &(2 * CLIENTS).to_string(),
            "--concurrency",
            "4",
            "--sources",
            &sources,
        ]
        .map(str::to_owned),
    )?)?;
    anyhow::ensure!(
        seen.failed() == 0 && seen.by_source.len() == CLIENTS as usize,
        "{} clients answered; failures {:?}, pods {:?}",
        seen.by_source.len(),
        seen.errors,
        seen.backends
    );
    seen.by_source
        .into_iter()
        .map(|(client, pods)| {
            anyhow::ensure!(pods.len() == 1, "{client} reached {pods:?}");
            let pod = pods.into_keys().next().unwrap_or_default();
            Ok((client, pod))
        })
        .collect()
}

fn share(map: &std::collections::BTreeMap<String, String>, prefix: &str) -> f64 {
    map.values().filter(|p| p.starts_with(prefix)).count() as f64 / map.len().max(1) as f64
}

#[test]
fn consistent_hash_keeps_each_client_address_and_a_backend_removed_moves_only_its_clients()
-> anyhow::Result<()> {
    let mut canary = Canary::start(None)?;
    add_client_addresses(&canary)?;
    canary.write(
        "destinationrule.yaml",
        &with_policy(
            "{loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 16381}}}}",
        ),
    )?;
    let explained = canary.agent.cli(&["explain", &common::vip6()])?;
    assert!(
        explained.contains("consistent hash of the client") && explained.contains("16381 slots"),
        "{explained}"
    );

    // Each address keeps one pod; the addresses spread evenly over the four.
    let before = by_client(&canary)?;
    for pod in V1.iter().chain([&V2]) {
        assert_share(share(&before, pod), 0.25, u64::from(CLIENTS), pod);
    }

    // One of four backends goes: its clients move, about no other does.
    canary.set_ready(V1[0], false)?;
    let after = by_client(&canary)?;
    let moved: Vec<&String> = before
        .keys()
        .filter(|c| before.get(*c) != after.get(*c))
        .collect();
    let others = moved.iter().filter(|c| before[**c] != V1[0]).count();
    eprintln!(
        "backend {} removed: {} of {CLIENTS} clients moved, {others} of them not its own",
        V1[0],
        moved.len()
    );
    assert!(
        moved.len() as f64 <= f64::from(CLIENTS) * (0.25 + 0.02),
        "{} moved",
        moved.len()
    );
    assert!(after.values().all(|p| p != V1[0]), "{after:?}");

    // Weights hold across clients: 80/20 by subset.
    canary.set_ready(V1[0], true)?;
    canary.set_weights(80, 20)?;
    let weighted = by_client(&canary)?;
    assert_share(
        share(&weighted, V2),
        0.20,
        u64::from(CLIENTS),
        "v2 at 80/20",
    );
    Ok(())
}

/// The canary's DestinationRule with outlier detection: 3 failed connects in
/// a row eject, checked each second, for 2 s times the ejections.
fn watched(max_ejection_percent: u32) -> String {
    with_policy(&format!(
        "{{outlierDetection: {{consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 2s, maxEjectionPercent: {max_ejection_percent}}}}}"
    ))
}

/// Stops the HTTP server of `pod`: its port is closed, connects to it are
/// refused.
fn close_port(canary: &mut Canary, pod: &str) {
    canary.backends.retain(|b| b.pod != pod);
}

/// The agent's outlier metric `name` for `pod`'s IPv4 backend.
fn outlier_metric(canary: &Canary, name: &str, pod: &str) -> anyhow::Result<u64> {
    let ip = canary
        .pods
        .iter()
        .find(|p| p.0 == pod)
        .and_then(|p| p.2.iter().find(|a| a.is_ipv4()))
        .ok_or_else(|| anyhow::anyhow!("no pod {pod}"))?;
    canary.agent.metric_with(
        name,
        &[
            &format!("backend=\"{ip}:{TARGET_PORT}\""),
            "service=\"default/flaskapp\"",
        ],
    )
}

#[test]
fn outlier_detection_ejects_a_backend_whose_port_is_closed_and_lets_it_back_after_its_time()
-> anyhow::Result<()> {
    let mut canary = Canary::start(None)?;
    canary.write("destinationrule.yaml", &watched(100))?;
    close_port(&mut canary, V1[0]);
    // Until it is ejected, its share of connects is refused.
    let before = canary.probe(&vip4(), 200)?;
    let refused = before.errors.get("ECONNREFUSED").copied().unwrap_or(0);
    assert!(refused >= 3, "{before:?}");
    assert_eq!(before.failed(), refused, "{before:?}");
    // The kernel counted each refused connect (the agent reads each second).
    mesh_tools::node::poll(Duration::from_secs(5), "the failures counted", || {
        let failed = outlier_metric(&canary, "mesh_outlier_failed_connects_total", V1[0])?;
        Ok((failed == refused).then_some(()))
    })?;
    mesh_tools::node::poll(Duration::from_secs(5), "the ejection", || {
        Ok((outlier_metric(&canary, "mesh_outlier_ejected", V1[0])? == 1).then_some(()))
    })?;
    let explained = canary.agent.cli(&["explain", &vip4()])?;
    assert!(explained.contains("EJECTED, back in"), "{explained}");

    // Ejected: no connect fails, none reaches it.
    let during = canary.probe(&vip4(), 400)?;
    assert_eq!(during.failed(), 0, "{during:?}");
    assert!(!during.backends.contains_key(V1[0]), "{during:?}");

    // Back after its 2 s (at the next sweep); still closed, so ejected again,
    // for twice as long.
    mesh_tools::node::poll(Duration::from_secs(10), "its return", || {
        Ok((outlier_metric(&canary, "mesh_outlier_ejected", V1[0])? == 0).then_some(()))
    })?;
    let back = canary.probe(&vip4(), 200)?;
    assert!(back.errors.contains_key("ECONNREFUSED"), "{back:?}");
    mesh_tools::node::poll(Duration::from_secs(5), "the second ejection", || {
        Ok((outlier_metric(&canary, "mesh_outlier_ejections_total", V1[0])? == 2).then_some(()))
    })?;
    Ok(())
}

#[test]
fn max_ejection_percent_leaves_the_second_failing_backend_in() -> anyhow::Result<()> {
    let mut canary = Canary::start(None)?;
    // 25%: once one of four is out, no other goes.
    canary.write("destinationrule.yaml", &watched(25))?;
    close_port(&mut canary, V1[0]);
    close_port(&mut canary, V1[1]);
    let seen = canary.probe(&vip4(), 400)?;
    assert!(seen.failed() > 0, "{seen:?}");
    mesh_tools::node::poll(Duration::from_secs(5), "one ejection", || {
        let out = outlier_metric(&canary, "mesh_outlier_ejected", V1[0])?
            + outlier_metric(&canary, "mesh_outlier_ejected", V1[1])?;
        Ok((out == 1).then_some(()))
    })?;
    // The other stays in: its share keeps failing, and it is never ejected.
    let after = canary.probe(&vip4(), 400)?;
    assert!(after.errors.contains_key("ECONNREFUSED"), "{after:?}");
    let out = outlier_metric(&canary, "mesh_outlier_ejected", V1[0])?
        + outlier_metric(&canary, "mesh_outlier_ejected", V1[1])?;
    assert_eq!(out, 1, "maxEjectionPercent 25 of 4 backends");
    Ok(())
}

/// `n` connections from the client pod (meshed) to the IPv4 VIP, held open
/// (after their answer) until released; made once the client's namespace
/// shows all of them.
struct Held {
    child: std::process::Child,
    until: std::path::PathBuf,
}

fn hold(canary: &Canary, n: usize) -> anyhow::Result<Held> {
    let until = canary.dir.path().join(format!("release-{n}"));
    let child = probe::spawn(
        &canary.node.pod("client").ns,
        Some(&canary.cgroup),
        &[
            "--target".to_owned(),
            vip4(),
            "--hold".to_owned(),
            n.to_string(),
            "--until".to_owned(),
            until.display().to_string(),
        ],
    )?;
    let held = Held { child, until };
    mesh_tools::node::poll(Duration::from_secs(5), "the held connections", || {
        Ok((client_sockets(canary)?.len() == n).then_some(()))
    })?;
    Ok(held)
}

impl Held {
    fn release(self) -> anyhow::Result<()> {
        std::fs::write(&self.until, "")?;
        let status = self.child.wait_with_output()?.status;
        anyhow::ensure!(status.success(), "mesh-probe --hold: {status}");
        Ok(())
    }
}

/// The client pod's TCP sockets to the pods' port, as `ss -tnoa` lists them.
fn client_sockets(canary: &Canary) -> anyhow::Result<Vec<String>> {
    let ss = canary.node.pod("client").ns.exec("ss", &["-tnoa"])?;
    Ok(ss
        .lines()
        .filter(|l| l.contains(&format!(":{TARGET_PORT} ")))
        .map(str::to_owned)
        .collect())
}

#[test]
fn connect_timeout_fails_an_unanswered_connect_in_time_and_keepalive_is_set() -> anyhow::Result<()>
{
    let mut canary = Canary::start(None)?;
    canary.write(
        "destinationrule.yaml",
        &with_policy(
            "{connectionPool: {tcp: {connectTimeout: 1s, tcpKeepalive: {time: 30s, interval: 5s, probes: 3}}}}",
        ),
    )?;
    let client = &canary.node.pod("client").ns;

    // Keepalive: connections held open carry the keepalive timer (30 s idle;
    // held after their answer: CLOSE-WAIT, the servers closed).
    let held = hold(&canary, 4)?;
    let sockets = client_sockets(&canary)?;
    assert!(
        sockets
            .iter()
            .all(|t| t.contains("timer:(keepalive,29sec") || t.contains("timer:(keepalive,30sec")),
        "{sockets:?}"
    );
    held.release()?;

    // connectTimeout: v1-0 drops SYNs; connects drawn to it fail with the
    // kernel's ETIMEDOUT after about 1 s, long before the client's own 10 s.
    canary.node.pod(V1[0]).ns.exec(
        "iptables",
        &[
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            &TARGET_PORT.to_string(),
            "-j",
            "DROP",
        ],
    )?;
    let seen = probe::finish(probe::spawn(
        client,
        Some(&canary.cgroup),
        &[
            "--target",
            &vip4(),
            "--count",
            "40",
            "--concurrency",
            "4",
            "--timeout-ms",
            "10000",
        ]
        .map(str::to_owned),
    )?)?;
    let timed_out = seen.errors.get("ETIMEDOUT").copied().unwrap_or(0);
    assert!(timed_out > 0, "{seen:?}");
    assert_eq!(
        seen.failed(),
        timed_out,
        "only the kernel's ETIMEDOUT: {seen:?}"
    );
    // Each failed connect waited about 1 s, four at a time.
    assert!(
        seen.elapsed_ms < 1000 * (timed_out / 4 + 3),
        "{timed_out} timed out in {} ms",
        seen.elapsed_ms
    );
    Ok(())
}

#[test]
fn least_request_sends_new_connections_to_the_backend_with_fewer_open() -> anyhow::Result<()> {
    let mut canary = Canary::start(None)?;
    canary.write(
        "destinationrule.yaml",
        &with_policy("{loadBalancer: {simple: LEAST_REQUEST}}"),
    )?;
    let explained = canary.agent.cli(&["explain", &vip4()])?;
    assert!(explained.contains("least request"), "{explained}");
    // Ten connections held open on v1-0, the only ready pod then.
    for pod in [V1[1], V1[2], V2] {
        canary.set_ready(pod, false)?;
    }
    let held = hold(&canary, 10)?;
    // v1-1 joins: every new connection goes to it, the one with none open
    // (at random, half would go to v1-0).
    canary.set_ready(V1[1], true)?;
    let seen = canary.probe(&vip4(), 200)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_eq!(seen.backends.get(V1[1]), Some(&200), "{seen:?}");
    // Released: both have none open; new ones spread over both.
    held.release()?;
    let seen = canary.probe(&vip4(), 400)?;
    assert_eq!(seen.backends.len(), 2, "{seen:?}");
    Ok(())
}

/// The canary's DestinationRule with a policy of its own on subset v1.
fn v1_policy(policy: &str) -> String {
    with_policy("{}").replace(
        "    - {name: v1, labels: {version: v1}}\n",
        &format!("    - {{name: v1, labels: {{version: v1}}, trafficPolicy: {policy}}}\n"),
    )
}

#[test]
fn a_subsets_own_balancer_holds_within_it_while_the_route_keeps_its_weights() -> anyhow::Result<()>
{
    let mut canary = Canary::start(Some((80, 20)))?;
    // v1 hashes its clients; v2 (and the route) draw at random.
    canary.write(
        "destinationrule.yaml",
        &v1_policy("{loadBalancer: {consistentHash: {useSourceIp: true}}}"),
    )?;
    let explained = canary.agent.cli(&["explain", &vip4()])?;
    assert!(
        explained.contains("its own table (destination 0)"),
        "{explained}"
    );
    let seen = canary.probe(&vip4(), N)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    // One client (its pod): all its v1 connects on one v1 pod.
    let v1: Vec<&u64> = V1.iter().filter_map(|p| seen.backends.get(*p)).collect();
    assert_eq!(v1.len(), 1, "v1 hashes the client to one pod: {seen:?}");
    let v2 = seen.backends.get(V2).copied().unwrap_or(0);
    assert_share(v2 as f64 / N as f64, 0.20, N, "v2 at 80/20");
    Ok(())
}

#[test]
fn least_request_across_subsets_keeps_the_routes_weights() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((100, 0)))?;
    canary.write(
        "destinationrule.yaml",
        &with_policy("{loadBalancer: {simple: LEAST_REQUEST}}"),
    )?;
    // Ten open on v1's pods, none on v2's.
    let held = hold(&canary, 10)?;
    canary.set_weights(50, 50)?;
    // Within each subset the less loaded pod; between them the route's
    // 50/50. One table for both would send v2 (idle) three in four: the
    // second draw would pull toward it.
    let seen = canary.probe(&vip4(), 400)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    let v2 = seen.backends.get(V2).copied().unwrap_or(0);
    assert_share(v2 as f64 / 400.0, 0.50, 400, "v2 at 50/50");
    held.release()?;
    Ok(())
}

#[test]
fn max_connections_refuses_a_connect_over_the_limit_at_once() -> anyhow::Result<()> {
    let mut canary = Canary::start(None)?;
    canary.write(
        "destinationrule.yaml",
        &with_policy("{connectionPool: {tcp: {maxConnections: 5}}}"),
    )?;
    for pod in [V1[1], V1[2], V2] {
        canary.set_ready(pod, false)?;
    }
    // Five open on v1-0, the only ready pod: its limit.
    let held = hold(&canary, 5)?;
    let over = canary.probe(&vip4(), 20)?;
    assert_eq!(over.errors.get("ECONNREFUSED"), Some(&20), "{over:?}");
    assert!(over.elapsed_ms < 2000, "refused at once: {over:?}");
    // Released: room again.
    held.release()?;
    let under = canary.probe(&vip4(), 20)?;
    assert_eq!(under.ok, 20, "{under:?}");
    Ok(())
}

#[test]
fn publish_not_ready_addresses_keeps_a_not_ready_pod_in_the_table() -> anyhow::Result<()> {
    let mut canary = Canary::start(None)?;
    canary.set_ready(V1[0], false)?;
    let (seen, pods) = answered(&canary)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert!(!pods.contains(V1[0]), "not ready: left out: {seen:?}");
    canary.write(
        "service.yaml",
        &service("  publishNotReadyAddresses: true\n"),
    )?;
    let (seen, pods) = answered(&canary)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_eq!(pods, set(&[V1[0], V1[1], V1[2], V2]), "{seen:?}");
    Ok(())
}

/// Node `name` in `region` and `zone`.
fn located(name: &str, region: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1
kind: Node
metadata:
  name: {name}
  labels: {{topology.kubernetes.io/region: {region}, topology.kubernetes.io/zone: {zone}}}
"
    )
}

/// The canary's DestinationRule with this `trafficPolicy` (YAML flow).
fn with_policy(policy: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: flaskapp, namespace: default}}
spec:
  host: flaskapp
  trafficPolicy: {policy}
  subsets:
    - {{name: v1, labels: {{version: v1}}}}
    - {{name: v2, labels: {{version: v2}}}}
"
    )
}

/// This node (node-a) and two others: node-a r1/z1, node-b r1/z2, node-c
/// r2/z3; v1-0 and v1-1 on node-a, v1-2 on node-b, v2 on node-c.
fn three_localities(canary: &mut Canary, state: [(bool, bool, bool); 4]) -> anyhow::Result<()> {
    let nodes = [
        located("node-a", "r1", "z1"),
        located("node-b", "r1", "z2"),
        located("node-c", "r2", "z3"),
    ];
    if !canary.dir.path().join("nodes.yaml").exists() {
        canary.write("nodes.yaml", &nodes.join("---\n"))?;
    }
    let eps = [
        ep(V1[0], "node-a", state[0]),
        ep(V1[1], "node-a", state[1]),
        ep(V1[2], "node-b", state[2]),
        ep(V2, "node-c", state[3]),
    ];
    canary.write("slice.yaml", &slice(canary, &eps))?;
    Ok(())
}

#[test]
fn locality_distribute_splits_by_the_localities_weights() -> anyhow::Result<()> {
    let mut canary = Canary::start_flags(None, &["--node-name", "node-a"])?;
    three_localities(&mut canary, [READY; 4])?;
    canary.write(
        "destinationrule.yaml",
        &with_policy(
            "{loadBalancer: {localityLbSetting: {distribute: [{from: r1/z1/*, to: {r1/z1/*: 80, r1/z2/*: 20}}]}}}",
        ),
    )?;
    let (seen, pods) = answered(&canary)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert!(!pods.contains(V2), "r2 is not in `to`: {seen:?}");
    assert_share(seen.share(V1[0]), 0.40, N, "z1's first");
    assert_share(seen.share(V1[1]), 0.40, N, "z1's second");
    assert_share(seen.share(V1[2]), 0.20, N, "z2's");
    Ok(())
}

#[test]
fn locality_failover_serves_from_the_closest_endpoints_then_the_next() -> anyhow::Result<()> {
    let mut canary = Canary::start_flags(None, &["--node-name", "node-a"])?;
    three_localities(&mut canary, [READY; 4])?;
    canary.write(
        "destinationrule.yaml",
        &with_policy(
            "{outlierDetection: {consecutive5xxErrors: 5}, loadBalancer: {localityLbSetting: {failover: [{from: r1, to: r2}]}}}",
        ),
    )?;
    let (seen, pods) = answered(&canary)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_eq!(pods, set(&[V1[0], V1[1]]), "this zone's: {seen:?}");
    // This zone's endpoints go: the region's other zone.
    three_localities(&mut canary, [GONE, GONE, READY, READY])?;
    let (seen, pods) = answered(&canary)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_eq!(pods, set(&[V1[2]]), "r1's other zone: {seen:?}");
    // The region's go too: the failover region.
    three_localities(&mut canary, [GONE, GONE, GONE, READY])?;
    let (seen, pods) = answered(&canary)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_eq!(pods, set(&[V2]), "r2, the failover region: {seen:?}");
    Ok(())
}

/// A `mesh-xfer serve` in `pod` on the pods' port, in `mode`; meshed (its
/// sockets under the mesh's cgroup) or not.
fn xfer_server(
    canary: &Canary,
    pod: &str,
    mode: &str,
    meshed: bool,
) -> anyhow::Result<mesh_tools::xfer::Server> {
    let listen = format!("[::]:{TARGET_PORT}");
    // The port of the backend just stopped may take a moment to be free.
    mesh_tools::node::poll(Duration::from_secs(3), "mesh-xfer listening", || {
        Ok(mesh_tools::xfer::Server::start(
            &canary.node.pod(pod).ns,
            meshed.then_some(&canary.cgroup),
            &["--listen", &listen, "--mode", mode],
        )
        .ok())
    })
}

#[test]
fn outlier_detection_counts_a_connect_reset_before_any_byte_as_failed_and_ejects_its_backend()
-> anyhow::Result<()> {
    let mut canary = Canary::start(None)?;
    canary.write("destinationrule.yaml", &watched(100))?;
    // v1-0 accepts and resets: every connect to it is established, then reset.
    close_port(&mut canary, V1[0]);
    let _resetter = xfer_server(&canary, V1[0], "reset", false)?;
    let before = canary.probe(&vip4(), 200)?;
    // Each connect to it failed in the client (its error depends on where
    // the reset met it), and none was refused.
    let reset = before.failed();
    assert!(reset >= 3, "{before:?}");
    assert!(!before.backends.contains_key(V1[0]), "{before:?}");
    assert!(!before.errors.contains_key("ECONNREFUSED"), "{before:?}");
    // The kernel counted each reset as a failed connect, and took back the
    // success it had counted at ESTABLISHED.
    mesh_tools::node::poll(Duration::from_secs(5), "the resets counted", || {
        let failed = outlier_metric(&canary, "mesh_outlier_failed_connects_total", V1[0])?;
        Ok((failed == reset).then_some(()))
    })?;
    assert_eq!(
        outlier_metric(&canary, "mesh_outlier_successful_connects_total", V1[0])?,
        0
    );
    mesh_tools::node::poll(Duration::from_secs(5), "the ejection", || {
        Ok((outlier_metric(&canary, "mesh_outlier_ejected", V1[0])? == 1).then_some(()))
    })?;

    // Ejected: new connects go to the healthy backends; none fails, none
    // reaches the resetting one.
    let during = canary.probe(&vip4(), 400)?;
    assert_eq!(during.failed(), 0, "{during:?}");
    assert!(!during.backends.contains_key(V1[0]), "{during:?}");
    assert_eq!(
        outlier_metric(&canary, "mesh_outlier_failed_connects_total", V1[0])?,
        reset
    );
    Ok(())
}

#[test]
fn a_backend_that_answers_through_the_shortcut_and_then_resets_is_not_judged_failed()
-> anyhow::Result<()> {
    let mut canary = Canary::start(None)?;
    canary.write("destinationrule.yaml", &watched(100))?;
    // v1-0 is a meshed pod on this node: its answers reach the client through
    // the same-node shortcut (not TCP), then it resets instead of closing.
    close_port(&mut canary, V1[0]);
    let _server = xfer_server(&canary, V1[0], "http-reset", true)?;
    let redirected = canary.agent.metric("mesh_redirect_bytes_total")?;
    let seen = canary.probe(&vip4(), 200)?;
    // Its connects: answered, or failed on the RST overtaking the client's
    // read (as over TCP); no other backend fails.
    let to_it = seen.failed() + seen.backends.get("mesh-xfer").copied().unwrap_or(0);
    assert!(to_it >= 3, "{seen:?}");
    assert!(!seen.errors.contains_key("ECONNREFUSED"), "{seen:?}");
    assert!(
        canary.agent.metric("mesh_redirect_bytes_total")? > redirected,
        "its answers went through the shortcut"
    );
    // The client's TCP received no byte of them, yet none is a reset before
    // data: none counted failed, none ejected.
    mesh_tools::node::poll(Duration::from_secs(5), "its connects counted", || {
        let ok = outlier_metric(&canary, "mesh_outlier_successful_connects_total", V1[0])?;
        Ok((ok >= to_it).then_some(()))
    })?;
    assert_eq!(
        outlier_metric(&canary, "mesh_outlier_failed_connects_total", V1[0])?,
        0
    );
    assert_eq!(outlier_metric(&canary, "mesh_outlier_ejected", V1[0])?, 0);
    Ok(())
}
