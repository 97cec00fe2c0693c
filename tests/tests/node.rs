//! A real node (`scripts/test-node.sh`): kubelet on docker makes the seed's
//! flaskapp pods, the real EndpointSlice controller of Kubernetes 1.20 lists
//! them (`discovery.k8s.io/v1beta1`), and they answer on their pod addresses.
//!
//! It needs `scripts/test-node.sh build` (kubelet, kube-scheduler and two
//! images, cached by version), which `cargo xtask test` runs.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_tools::node::{Node, http_get, poll};
use serde_json::Value;

fn flaskapp(image: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: flaskapp
  namespace: default
spec:
  replicas: 3
  selector:
    matchLabels: {{app: business, version: v1}}
  template:
    metadata:
      labels: {{app: business, version: v1}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: flaskapp
        image: {image}
        imagePullPolicy: Never
        env: [{{name: VERSION, value: v1}}]
        ports: [{{name: http, containerPort: 5000}}]
        readinessProbe:
          tcpSocket: {{port: 5000}}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata:
  name: flaskapp
  namespace: default
  labels: {{app: business}}
spec:
  selector: {{app: business}}
  ports: [{{name: http, port: 5000, targetPort: 5000}}]
"#
    )
}

/// (name, IP) of the ready flaskapp pods, once there are `n`.
fn ready_pods(node: &Node, n: usize) -> anyhow::Result<Option<Vec<(String, IpAddr)>>> {
    let list = node.kubectl_json(&["get", "pods", "-n", "default", "-l", "app=business"])?;
    let mut pods = Vec::new();
    for p in list["items"].as_array().context("items")? {
        let ready = p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        let ip = p["status"]["podIP"].as_str().and_then(|s| s.parse().ok());
        if let (true, Some(ip)) = (ready, ip) {
            pods.push((
                p["metadata"]["name"].as_str().context("name")?.to_owned(),
                ip,
            ));
        }
    }
    Ok((pods.len() == n).then_some(pods))
}

/// Ready addresses of the flaskapp Service's v1beta1 EndpointSlices.
fn slice_addresses(node: &Node) -> anyhow::Result<BTreeSet<IpAddr>> {
    let list = node.kubectl_json(&[
        "get",
        "endpointslices.v1beta1.discovery.k8s.io",
        "-n",
        "default",
        "-l",
        "kubernetes.io/service-name=flaskapp",
    ])?;
    let mut out = BTreeSet::new();
    for s in list["items"].as_array().context("items")? {
        assert_eq!(s["apiVersion"], "discovery.k8s.io/v1beta1");
        for e in s["endpoints"].as_array().into_iter().flatten() {
            if e["conditions"]["ready"] == Value::Bool(true) {
                for a in e["addresses"].as_array().into_iter().flatten() {
                    out.insert(a.as_str().context("address")?.parse()?);
                }
            }
        }
    }
    Ok(out)
}

#[test]
fn flaskapp_pods_run_answer_and_fill_the_endpointslice() -> anyhow::Result<()> {
    mesh_tools::require_root();
    let t0 = Instant::now();
    let node = Node::start()?;
    eprintln!("node Ready after {:?}", t0.elapsed());

    let t1 = Instant::now();
    node.apply(&flaskapp(node.flaskapp_image()?))?;
    let pods = poll(Duration::from_secs(120), "3 ready flaskapp pods", || {
        ready_pods(&node, 3)
    })?;
    eprintln!("3 pods ready after {:?}", t1.elapsed());

    // Pod addresses come from the node's range.
    let prefix = node.info("pod_cidr")?.trim_end_matches("0/24").to_owned();
    for (name, ip) in &pods {
        assert!(ip.to_string().starts_with(&prefix), "{name} at {ip}");
    }

    // The real EndpointSlice controller lists exactly the pods, ready.
    let want: BTreeSet<IpAddr> = pods.iter().map(|(_, ip)| *ip).collect();
    let t2 = Instant::now();
    poll(
        Duration::from_secs(60),
        "the EndpointSlice to list the pods",
        || Ok((slice_addresses(&node)? == want).then_some(())),
    )?;
    eprintln!(
        "EndpointSlice lists them {:?} after they are ready",
        t2.elapsed()
    );

    // Each pod answers from the host with its own name and version.
    for (name, ip) in &pods {
        let body = http_get(SocketAddr::new(*ip, 5000), Duration::from_secs(5))?;
        assert!(
            body.starts_with(&format!("host={name} version=v1 client=")),
            "{ip}: {body:?}"
        );
    }
    Ok(())
}
