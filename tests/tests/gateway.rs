//! The gateway through the real kernel: Istio Gateway + VirtualService, the
//! node's own processes dialling `127.0.0.1:80`, `[::1]:80` or the node's
//! address, with the agent in the tests' node namespace.

mod common;

use std::collections::BTreeMap;

use common::{Canary, NODE4, NODE6, V1, V2, VIP4, VIP6, assert_share, seed_gateway};
use mesh_tools::{curl::Curled, manifests};

const N: u64 = 2000;

/// The seed's gateway files, verbatim.
fn seed_file(name: &str) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(format!(
        "{}/../manifests/examples/seed/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))?)
}

/// `count` requests of a real `curl` from the node's namespace, in the cgroup.
fn curl(canary: &Canary, url: &str, count: u64) -> anyhow::Result<Curled> {
    mesh_tools::curl::curl(&canary.node.bridge, Some(&canary.cgroup), url, count)
}

/// The gateway-bound VirtualService of these tests, at these weights.
fn edge_vs(v1: u32, v2: u32) -> String {
    common::weighted_vs("flaskapp-edge", "flaskapp-gateway", "flaskapp", v1, v2)
}

#[test]
fn a_pure_weight_gateway_route_is_split_in_the_kernel_for_the_nodes_own_clients()
-> anyhow::Result<()> {
    let mut canary = Canary::start_on_node(&[])?;
    canary.write("gateway.yaml", &seed_gateway()?)?;
    canary.write("edge.yaml", &edge_vs(80, 20))?;

    for target in [
        "127.0.0.1:80".to_owned(),
        "[::1]:80".to_owned(),
        format!("{NODE4}:80"),
        format!("[{NODE6}]:80"),
    ] {
        let split = canary.probe_from_node(&target, N)?;
        common::assert_80_20_seen_as(&split, &target, N);
    }

    // A pod's own localhost is its own: not the gateway.
    let in_pod = canary.probe("127.0.0.1:80", 5)?;
    assert_eq!(in_pod.errors.get("ECONNREFUSED"), Some(&5), "{in_pod:?}");

    // explain answers for the gateway's address.
    let explained = canary.agent.cli(&["explain", "127.0.0.1:80"])?;
    assert!(
        explained.contains("default/flaskapp-gateway"),
        "{explained}"
    );
    assert!(
        explained.contains("VirtualService default/flaskapp-edge spec.http[0]"),
        "{explained}"
    );

    // A live edit moves new connections.
    canary.write("edge.yaml", &edge_vs(0, 100))?;
    let all_v2 = canary.probe_from_node("127.0.0.1:80", 200)?;
    assert_eq!(all_v2.backends.get(V2), Some(&200), "{all_v2:?}");

    // The Gateway deleted: its port is not served any more (nothing listens
    // on the node's port 80 in this namespace).
    canary.remove("gateway.yaml")?;
    let gone = canary.probe_from_node("127.0.0.1:80", 5)?;
    assert_eq!(gone.errors.get("ECONNREFUSED"), Some(&5), "{gone:?}");
    Ok(())
}

#[test]
fn a_gateway_selected_by_other_labels_or_with_tls_is_not_served_and_says_why() -> anyhow::Result<()>
{
    let mut canary = Canary::start_on_node(&["--gateway-labels", "istio=edge"])?;
    canary.write("gateway.yaml", &seed_gateway()?)?;
    canary.write("edge.yaml", &edge_vs(80, 20))?;
    // The seed's Gateway selects istio=ingressgateway: not this node.
    let other = canary.probe_from_node("127.0.0.1:80", 5)?;
    assert_eq!(other.errors.get("ECONNREFUSED"), Some(&5), "{other:?}");

    let tls = "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: secure, namespace: default}
spec:
  selector: {istio: edge}
  servers:
    - {port: {number: 443, name: https, protocol: HTTPS}, hosts: [\"*\"], tls: {mode: SIMPLE}}
";
    canary.write("tls.yaml", tls)?;
    let said = canary.agent.messages("ERROR").join("\n");
    assert!(
        said.contains("Gateway default/secure: spec.servers[0].port.protocol"),
        "{said}"
    );
    let refused = canary.probe_from_node("127.0.0.1:443", 5)?;
    assert_eq!(refused.errors.get("ECONNREFUSED"), Some(&5), "{refused:?}");
    Ok(())
}

#[test]
fn the_seed_gateway_files_route_real_curl_per_request() -> anyhow::Result<()> {
    let mut canary = Canary::start_on_node(&[])?;
    // The seed's Service: port 5000, as its VirtualService names.
    let vips = [VIP4.parse()?, VIP6.parse()?];
    canary.write(
        "service.yaml",
        &manifests::service("flaskapp", &vips, 5000, 5000),
    )?;
    canary.write("gateway.yaml", &seed_file("gateway.yaml")?)?;

    // gateway.yaml: `/` reaches every pod evenly; nothing else is routed.
    let root = curl(&canary, "http://localhost/", 1000)?;
    assert_eq!(root.codes, BTreeMap::from([(200, 1000)]), "{root:?}");
    for pod in V1.iter().chain([&V2]) {
        assert_share(root.share(pod), 0.25, 1000, pod);
    }
    let other = curl(&canary, "http://localhost/other", 20)?;
    assert_eq!(other.codes, BTreeMap::from([(404, 20)]), "{other:?}");
    let explained = canary.agent.cli(&["explain", "127.0.0.1:80"])?;
    assert!(explained.contains("served by the router"), "{explained}");
    // The router counted them, by route and status code.
    let counted = |route: &str, code: &str| {
        canary.agent.metric_with(
            "mesh_gateway_requests_total",
            &[&format!("route=\"{route}\""), &format!("code=\"{code}\"")],
        )
    };
    assert_eq!(counted("spec.http[0]", "200")?, 1000);
    assert_eq!(counted("", "404")?, 20);
    assert!(
        explained.contains("VirtualService default/flaskapp spec.http[0]"),
        "{explained}"
    );

    // gateway2.yaml, applied over it: `/` as before, anything else 80/20.
    canary.write("gateway.yaml", &seed_file("gateway2.yaml")?)?;
    let root = curl(&canary, "http://localhost/", 1000)?;
    assert_eq!(root.codes, BTreeMap::from([(200, 1000)]), "{root:?}");
    for pod in V1.iter().chain([&V2]) {
        assert_share(root.share(pod), 0.25, 1000, pod);
    }
    for url in [
        "http://localhost/other".to_owned(),
        format!("http://{NODE4}/other"),
        format!("http://[{NODE6}]/x/y"),
    ] {
        let split = curl(&canary, &url, 1000)?;
        assert_eq!(
            split.codes,
            BTreeMap::from([(200, 1000)]),
            "{url}: {split:?}"
        );
        assert_share(
            split.share("flaskapp-v2"),
            0.20,
            1000,
            &format!("v2 through {url}"),
        );
        for pod in V1 {
            assert_share(split.share(pod), 0.80 / 3.0, 1000, pod);
        }
    }
    // SIGTERM: the agent exits promptly, its router's connections with it.
    let t = std::time::Instant::now();
    let status = canary.agent.stop()?;
    assert!(status.success(), "{status}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    Ok(())
}

#[test]
fn a_gateway_port_a_node_process_listens_on_is_reported_and_the_cgroup_still_reaches_the_gateway()
-> anyhow::Result<()> {
    let mut canary = Canary::start_on_node(&[])?;
    // A process of the node already listens on the port a Gateway then asks for.
    let _squatter =
        mesh_tools::backend::Backend::spawn(&canary.node.bridge, "node-process", "none", 8081)?;
    let gateway = seed_gateway()?.replace("number: 80", "number: 8081");
    canary.write("gateway.yaml", &gateway)?;
    canary.write("edge.yaml", &edge_vs(80, 20))?;
    let warned = canary.agent.messages("WARN").join("\n");
    assert!(
        warned.contains(
            "Gateway default/flaskapp-gateway: spec.servers[0].port.number: port 8081 is also bound on the node"
        ),
        "{warned}"
    );
    // The node's processes in the gateway cgroup reach the gateway...
    let served = canary.probe_from_node("127.0.0.1:8081", 400)?;
    assert_eq!(served.failed(), 0, "{served:?}");
    assert_eq!(served.backends.get("node-process"), None, "{served:?}");
    assert_share(
        served.share("flaskapp-v2"),
        0.20,
        400,
        "v2 through the gateway",
    );
    // ...the others reach the process that listens there.
    let others = mesh_tools::probe::probe(&canary.node.bridge, None, "127.0.0.1:8081", 20, 1)?;
    assert_eq!(others.backends.get("node-process"), Some(&20), "{others:?}");
    Ok(())
}

/// A Service of one port (5001) whose only endpoint is flaskapp-v2, and a
/// route of the seed's Gateway to it for `/bytes/` (an L7 match: the router).
const BULK: &str = "apiVersion: v1
kind: Service
metadata: {name: bulk, namespace: default}
spec:
  clusterIP: 10.96.0.90
  selector: {app: flaskapp, version: v2}
  ports: [{name: http, port: 5001, targetPort: 5001}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bulk, namespace: default}
spec:
  hosts: [\"*\"]
  gateways: [flaskapp-gateway]
  http:
    - match: [{uri: {prefix: /bytes/}}]
      route: [{destination: {host: bulk}}]
";

/// The router and a backend on this node are joined by the same-node
/// shortcut: answers of 16 MiB from a meshed pod reach `curl` through the
/// router while the pod's namespace sees a few TCP segments per request (the
/// kernel's own counters); with `--router-mark 0` the same answers take TCP.
#[test]
fn the_router_reaches_a_backend_on_this_node_by_the_shortcut() -> anyhow::Result<()> {
    const SIZE: u64 = 16 << 20;
    const REQUESTS: usize = 4;
    let mut segments = Vec::new();
    for flags in [&[][..], &["--router-mark", "0"][..]] {
        let mut canary = Canary::start_on_node(flags)?;
        canary.write("gateway.yaml", &format!("{}\n---\n{BULK}", seed_gateway()?))?;
        let pod = &canary.node.pod(V2).ns;
        // A process in the pod's namespace and the mesh cgroup: meshed.
        let _server = mesh_tools::xfer::Server::start(
            pod,
            Some(&canary.cgroup),
            &["--listen", "[::]:5001", "--mode", "http"],
        )?;
        let explained = canary.agent.cli(&["explain", "127.0.0.1:80"])?;
        let segs = || -> anyhow::Result<u64> {
            Ok(pod.snmp("Tcp", "InSegs")? + pod.snmp("Tcp", "OutSegs")?)
        };
        let (segs_before, bytes_before) =
            (segs()?, canary.agent.metric("mesh_redirect_bytes_total")?);
        let url = format!("http://localhost/bytes/{SIZE}");
        let got = download(&canary, &[url.as_str(); REQUESTS])?;
        let used = segs()? - segs_before;
        let redirected = canary.agent.metric("mesh_redirect_bytes_total")? - bytes_before;
        assert_eq!(got, vec![(200, SIZE); REQUESTS], "{flags:?}");
        if flags.is_empty() {
            assert!(
                explained.contains("joined to backends on this node by the same-node shortcut"),
                "{explained}"
            );
            assert!(
                redirected >= REQUESTS as u64 * SIZE,
                "{redirected} bytes redirected"
            );
        } else {
            assert!(
                explained.contains(
                    "not joined to backends on this node by the shortcut: --router-mark 0"
                ),
                "{explained}"
            );
            assert!(redirected < SIZE, "{redirected} bytes redirected");
        }
        segments.push(used);
    }
    eprintln!(
        "TCP segments in and out of the backend pod for {REQUESTS} x 16 MiB through the router: joined {} / not joined {}",
        segments[0], segments[1]
    );
    // Per request: the handshake and the FINs (~8); 16 MiB through TCP is
    // ~11 600 segments out alone (1448-byte MSS).
    assert!(segments[0] < 20 * REQUESTS as u64, "joined: {segments:?}");
    assert!(
        segments[1] > 10_000 * REQUESTS as u64,
        "not joined: {segments:?}"
    );
    Ok(())
}

/// One `curl` fetching each of `urls` from the node's namespace (in the
/// cgroup), body discarded: (status, bytes) per URL.
fn download(canary: &Canary, urls: &[&str]) -> anyhow::Result<Vec<(u16, u64)>> {
    let mut args = vec![
        "-sS",
        "--max-time",
        "60",
        "-w",
        "%{http_code} %{size_download}\n",
    ];
    for url in urls {
        args.extend(["-o", "/dev/null", url]);
    }
    let child = mesh_tools::spawn_in_pod(
        std::path::Path::new("curl"),
        &canary.node.bridge,
        Some(&canary.cgroup),
        &args,
    )?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "curl: {}", out.status);
    String::from_utf8(out.stdout)?
        .lines()
        .map(|line| {
            let (code, size) = line
                .split_once(' ')
                .ok_or_else(|| anyhow::anyhow!("curl printed {line:?}"))?;
            Ok((code.parse()?, size.parse()?))
        })
        .collect()
}
