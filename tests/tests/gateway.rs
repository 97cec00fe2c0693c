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
