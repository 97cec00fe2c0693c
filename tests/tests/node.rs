//! A real node (`scripts/test-node.sh`): kubelet on docker makes the seed's
//! flaskapp pods, the real EndpointSlice controller of Kubernetes 1.20 lists
//! them (`discovery.k8s.io/v1beta1`), and they answer on their pod addresses.
//!
//! It needs `scripts/test-node.sh build` (kubelet, kube-scheduler and two
//! images, cached by version), which `cargo xtask test` runs.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_tools::node::{Node, http_get, poll};
use serde_json::Value;

mod common;

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
    node.explain_failure(pods_answer(&node))
}

fn pods_answer(node: &Node) -> anyhow::Result<()> {
    let t1 = Instant::now();
    node.apply(&flaskapp(node.flaskapp_image()?))?;
    let pods = poll(Duration::from_secs(120), "3 ready flaskapp pods", || {
        ready_pods(node, 3)
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
        || Ok((slice_addresses(node)? == want).then_some(())),
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

/// The seed's canary on the node: flaskapp v1 (3 pods) and v2 (1 pod) behind
/// the Service `flaskapp` (port 5000, selector `app: business`), and a client
/// pod (the flaskapp image has `/client`), all in `default`.
fn canary(image: &str) -> String {
    let deployment = |version: &str, replicas: u32| {
        format!(
            r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: flaskapp-{version}
  namespace: default
spec:
  replicas: {replicas}
  selector:
    matchLabels: {{app: business, version: {version}}}
  template:
    metadata:
      labels: {{app: business, version: {version}}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: flaskapp
        image: {image}
        imagePullPolicy: Never
        env: [{{name: VERSION, value: {version}}}]
        ports: [{{name: http, containerPort: 5000}}]
        readinessProbe:
          tcpSocket: {{port: 5000}}
          periodSeconds: 1
---
"#
        )
    };
    format!(
        r#"{v1}{v2}apiVersion: v1
kind: Service
metadata:
  name: flaskapp
  namespace: default
  labels: {{app: business}}
spec:
  selector: {{app: business}}
  ports: [{{name: http, port: 5000, targetPort: 5000}}]
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: default
  labels: {{app: client}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: {image}
    imagePullPolicy: Never
    env: [{{name: VERSION, value: client}}]
---
apiVersion: v1
kind: Namespace
metadata:
  name: plain
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: plain
  labels: {{app: client}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: {image}
    imagePullPolicy: Never
    env: [{{name: VERSION, value: client}}]
"#,
        v1 = deployment("v1", 3),
        v2 = deployment("v2", 1),
    )
}

const DESTINATION_RULE: &str = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: flaskapp
  namespace: default
spec:
  host: flaskapp
  subsets:
    - name: v1
      labels: {version: v1}
    - name: v2
      labels: {version: v2}
"#;

fn virtual_service(v1: u32, v2: u32) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: flaskapp
  namespace: default
spec:
  hosts: [flaskapp]
  http:
    - route:
        - destination: {{host: flaskapp, subset: v1}}
          weight: {v1}
        - destination: {{host: flaskapp, subset: v2}}
          weight: {v2}
"#
    )
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The ready pods of `selector` in `ns`, by name, once there are `n`.
fn ready_named(
    node: &Node,
    ns: &str,
    selector: &str,
    n: usize,
) -> anyhow::Result<Option<Vec<String>>> {
    let list = node.kubectl_json(&["get", "pods", "-n", ns, "-l", selector])?;
    for p in list["items"].as_array().into_iter().flatten() {
        for c in p["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let waiting = &c["state"]["waiting"];
            if let Some(reason) = waiting["reason"].as_str()
                && matches!(
                    reason,
                    "CreateContainerError" | "CreateContainerConfigError" | "ErrImageNeverPull"
                )
            {
                // poll() retries errors: this one will not go away.
                panic!(
                    "{}: {reason}: {}",
                    p["metadata"]["name"], waiting["message"]
                );
            }
        }
    }
    let names: Vec<String> = list["items"]
        .as_array()
        .context("items")?
        .iter()
        .filter(|p| is_ready(p))
        .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_owned))
        .collect();
    Ok((names.len() == n).then_some(names))
}

/// `n` connections from the client pod to `addr`, one after another: how many
/// each flaskapp pod answered, and the failures.
fn from_client(
    node: &Node,
    addr: &str,
    n: u32,
) -> anyhow::Result<(BTreeMap<String, u32>, Vec<String>)> {
    from_client_in(node, "default", addr, n)
}

/// The same from the pod `client` of namespace `ns`.
fn from_client_in(
    node: &Node,
    ns: &str,
    addr: &str,
    n: u32,
) -> anyhow::Result<(BTreeMap<String, u32>, Vec<String>)> {
    let (ip, port) = addr.split_once(':').context("addr")?;
    let n = n.to_string();
    // /client exits 1 when a connection failed: its output says which.
    let out = std::process::Command::new("kubectl")
        .args(["exec", "-n", ns, "client", "--", "/client", ip, port, &n])
        .env("KUBECONFIG", &node.kubeconfig)
        .output()?;
    let mut by_pod = BTreeMap::new();
    let mut failed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        match line
            .strip_prefix("host=")
            .and_then(|l| l.split_whitespace().next())
        {
            Some(host) => *by_pod.entry(host.to_owned()).or_insert(0) += 1,
            None => failed.push(line.to_owned()),
        }
    }
    if by_pod.is_empty() && failed.is_empty() {
        anyhow::bail!(
            "kubectl exec client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok((by_pod, failed))
}

/// Polls (bounded) until the agent's record of what the kernel holds for
/// flaskapp's ClusterIP, (weight, backends) per destination, satisfies `done`.
/// The record is in the DaemonSet's run dir, a hostPath the test reads.
fn in_the_kernel(
    mesh: &mesh_tools::node::MeshDeployed,
    what: &str,
    done: impl Fn(&[(u64, usize)]) -> bool,
) -> anyhow::Result<()> {
    let destinations = || -> Option<Vec<(u64, usize)>> {
        let text = std::fs::read_to_string(mesh.run_dir.join("state.json")).ok()?;
        let record: Value = serde_json::from_str(&text).ok()?;
        let service = record["services"]
            .as_array()?
            .iter()
            .find(|s| s["service"] == "default/flaskapp")?;
        service["destinations"]
            .as_array()?
            .iter()
            .map(|d| Some((d["weight"].as_u64()?, d["backends"].as_array()?.len())))
            .collect()
    };
    poll(Duration::from_secs(30), what, || {
        Ok(destinations().filter(|d| done(d)).map(drop))
    })
    .with_context(|| format!("the agent's record: {:?}", destinations()))
}

/// `n` connections from the client pod, none failed: how many each pod answered.
fn answered(node: &Node, addr: &str, n: u32, what: &str) -> anyhow::Result<BTreeMap<String, u32>> {
    let (by_pod, failed) = from_client(node, addr, n)?;
    eprintln!("{what}: {by_pod:?}, failed {}", failed.len());
    assert!(failed.is_empty(), "{what}: failed connections: {failed:?}");
    Ok(by_pod)
}

/// All `n` connections answered, and `pods` answered `expected` of them
/// (within the binomial tolerance of `common::assert_share`).
fn assert_share_of(
    by_pod: &BTreeMap<String, u32>,
    pods: &[String],
    n: u32,
    expected: f64,
    what: &str,
) {
    let (hit, total) = share(by_pod, pods);
    assert_eq!(total, n, "{what}: {by_pod:?}");
    common::assert_share(f64::from(hit) / f64::from(n), expected, u64::from(n), what);
}

/// Share of connections answered by `pods`.
fn share(by_pod: &BTreeMap<String, u32>, pods: &[String]) -> (u32, u32) {
    let total = by_pod.values().sum();
    let hit = pods.iter().filter_map(|p| by_pod.get(p)).sum();
    (hit, total)
}

fn agent_logs(node: &Node) -> String {
    node.kubectl(&[
        "logs",
        "-n",
        "mesh-system",
        "daemonset/mesh-agent",
        "--tail=60",
    ])
    .unwrap_or_else(|e| format!("{e:#}"))
}

/// The DaemonSet as shipped (manifests/deploy through an overlay that sets only
/// the image and this node's values) runs on the real node with its
/// ServiceAccount, RBAC, capabilities and limits, becomes Ready, and meshes the
/// pods of the labelled namespace: a client pod's connections to the
/// flaskapp Service's ClusterIP (which nothing else answers here: no
/// kube-proxy) split 80/20 between the v1 and v2 pods, then 50/50 after a
/// `kubectl patch` of the VirtualService.
#[test]
fn the_shipped_daemonset_meshes_real_pods_80_20_then_50_50() -> anyhow::Result<()> {
    mesh_tools::require_root();
    let agent_binary = mesh_tools::agent::sibling_binary("mesh-agent")?;
    let node = Node::start()?;
    let result = mesh_on_the_node(&node, &agent_binary);
    if let Ok((mesh, progs)) = &result {
        // Removed with the node: the DaemonSet deleted, `mesh-agent cleanup`
        // on the host, the node stopped. Nothing of the agent's is left on the
        // host: its pin dir and run dir (hostPaths), and the programs it
        // attached to the pods' cgroup.
        drop(node);
        for dir in [&mesh.pin_dir, &mesh.run_dir] {
            assert!(!dir.exists(), "{} left", dir.display());
        }
        for id in progs {
            assert!(
                mesh_tools::sh("bpftool", &["prog", "show", "id", id]).is_err(),
                "program {id} still loaded"
            );
        }
        return Ok(());
    }
    if result.is_err() {
        eprintln!("---- agent logs ----\n{}", agent_logs(&node));
    }
    node.explain_failure(result).map(|_| ())
}

/// The ids of the programs attached to `cgroup` (bpftool).
fn attached(cgroup: &str) -> anyhow::Result<Vec<(String, String)>> {
    let out = mesh_tools::sh("bpftool", &["-j", "cgroup", "show", cgroup])?;
    let list: Value = serde_json::from_str(if out.trim().is_empty() { "[]" } else { &out })?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["id"].to_string(),
                p["attach_type"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect())
}

/// The test's body: what the agent deployed and the ids of the programs it
/// attached.
fn mesh_on_the_node(
    node: &Node,
    agent_binary: &std::path::Path,
) -> anyhow::Result<(mesh_tools::node::MeshDeployed, Vec<String>)> {
    node.kubectl(&[
        "label",
        "namespace",
        "default",
        "istio-injection=enabled",
        "--overwrite",
    ])?;
    node.apply(&canary(node.flaskapp_image()?))?;

    let t0 = Instant::now();
    let mesh = node.deploy_mesh(agent_binary)?;
    eprintln!(
        "agent image {} built and applied after {:?}",
        mesh.image,
        t0.elapsed()
    );
    let agent_pod = poll(Duration::from_secs(120), "the agent pod Ready", || {
        Ok(
            ready_named(node, "mesh-system", "app.kubernetes.io/name=mesh-agent", 1)?
                .map(|mut v| v.remove(0)),
        )
    })?;
    eprintln!(
        "agent pod {agent_pod} Ready {:?} after the apply",
        t0.elapsed()
    );

    // It runs as shipped: the ServiceAccount, the container's securityContext
    // and resources of manifests/deploy, not privileged.
    let shipped: Value = {
        let base = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/deploy");
        let all = node.kubectl(&["kustomize", base.to_str().context("path")?])?;
        let ds = all
            .split("\n---\n")
            .find(|d| d.contains("kind: DaemonSet"))
            .context("no DaemonSet in manifests/deploy")?;
        let json = node.kubectl_stdin(
            &["create", "--dry-run=client", "-o", "json", "-f", "-"],
            Some(ds),
        )?;
        serde_json::from_str(&json)?
    };
    let live = node.kubectl_json(&["get", "pod", "-n", "mesh-system", &agent_pod])?;
    assert_eq!(live["spec"]["serviceAccountName"], "mesh-agent");
    let shipped_c = &shipped["spec"]["template"]["spec"]["containers"][0];
    let live_c = &live["spec"]["containers"][0];
    assert_eq!(live_c["securityContext"], shipped_c["securityContext"]);
    assert_ne!(live_c["securityContext"]["privileged"], Value::Bool(true));
    assert_eq!(live_c["resources"], shipped_c["resources"]);
    assert_eq!(live_c["image"], mesh.image.as_str());

    node.apply(DESTINATION_RULE)?;
    node.apply(&virtual_service(80, 20))?;
    let v1 = poll(Duration::from_secs(120), "3 ready v1 pods", || {
        ready_named(node, "default", "app=business,version=v1", 3)
    })?;
    let v2 = poll(Duration::from_secs(120), "1 ready v2 pod", || {
        ready_named(node, "default", "app=business,version=v2", 1)
    })?;
    for ns in ["default", "plain"] {
        poll(Duration::from_secs(120), "the client pods ready", || {
            ready_named(node, ns, "app=client", 1)
        })?;
    }
    let vip = node.kubectl(&[
        "get",
        "service",
        "-n",
        "default",
        "flaskapp",
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    let addr = format!("{}:5000", vip.trim());

    // Nothing but the mesh answers the ClusterIP here, and the host's own
    // processes are not meshed (--mesh-scope pods).
    assert!(
        http_get(addr.parse()?, Duration::from_secs(2)).is_err(),
        "{addr} answered the host: is a kube-proxy running?"
    );

    // The client pod meshed (found under the pods' cgroup) and the weights in
    // the kernel: both v1 and v2 answer.
    let t1 = Instant::now();
    poll(
        Duration::from_secs(60),
        "the client pod's connections to reach v1 and v2",
        || {
            let (by_pod, _) = from_client(node, &addr, 40)?;
            Ok((share(&by_pod, &v1).0 > 0 && share(&by_pod, &v2).0 > 0).then_some(()))
        },
    )?;
    eprintln!("client meshed {:?} after the pods were ready", t1.elapsed());
    // `kubectl logs` reads the agent (JSON lines): it found the meshed pods.
    let logs = node.kubectl(&["logs", "-n", "mesh-system", &agent_pod])?;
    let meshed: Vec<&str> = logs.lines().filter(|l| l.contains("pod meshed")).collect();
    assert!(meshed.len() >= 5, "4 flaskapp pods and the client: {logs}");
    assert!(
        !meshed.iter().any(|l| l.contains("mesh-system")),
        "the unlabelled mesh-system namespace is meshed: {meshed:?}"
    );
    if let Some(line) = logs.lines().find(|l| l.contains("pod meshed")) {
        eprintln!("agent log: {line}");
    }

    let n = 500;
    let (by_pod, failed) = from_client(node, &addr, n)?;
    eprintln!("80/20: {by_pod:?}, failed {}", failed.len());
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    let (hit, total) = share(&by_pod, &v2);
    assert_eq!(total, n);
    assert_eq!(
        share(&by_pod, &v1).0 + hit,
        n,
        "only flaskapp pods answer: {by_pod:?}"
    );
    for pod in &v1 {
        assert!(by_pod.contains_key(pod), "{pod} never answered: {by_pod:?}");
    }
    common::assert_share(
        f64::from(hit) / f64::from(n),
        0.2,
        u64::from(n),
        "v2 at 80/20",
    );

    // A pod of a namespace without the label is not meshed: the ClusterIP
    // does not answer it. Labelling the namespace meshes it, without a restart.
    let (by_pod, failed) = from_client_in(node, "plain", &addr, 2)?;
    assert!(
        by_pod.is_empty() && failed.len() == 2,
        "the unlabelled namespace's client reached {by_pod:?}"
    );
    node.kubectl(&["label", "namespace", "plain", "istio-injection=enabled"])?;
    let t2 = Instant::now();
    poll(
        Duration::from_secs(60),
        "the newly labelled namespace's client meshed",
        || {
            let (by_pod, _) = from_client_in(node, "plain", &addr, 1)?;
            Ok((!by_pod.is_empty()).then_some(()))
        },
    )?;
    eprintln!(
        "namespace plain labelled: its client meshed within {:?}",
        t2.elapsed()
    );

    // The live edit.
    node.kubectl(&[
        "patch",
        "virtualservice",
        "-n",
        "default",
        "flaskapp",
        "--type=json",
        "-p",
        r#"[{"op":"replace","path":"/spec/http/0/route/0/weight","value":50},{"op":"replace","path":"/spec/http/0/route/1/weight","value":50}]"#,
    ])?;
    in_the_kernel(&mesh, "the 50/50 edit", |d| d == [(50, 3), (50, 1)])?;
    let by_pod = answered(node, &addr, n, "50/50")?;
    assert_share_of(&by_pod, &v2, n, 0.5, "v2 at 50/50");

    // `kubectl scale` down: the next connections reach only the pods left.
    node.kubectl(&[
        "scale",
        "deployment",
        "-n",
        "default",
        "flaskapp-v1",
        "--replicas=1",
    ])?;
    let left = poll(Duration::from_secs(60), "one v1 pod left", || {
        ready_named(node, "default", "app=business,version=v1", 1)
    })?;
    in_the_kernel(&mesh, "v1 scaled to one pod", |d| d == [(50, 1), (50, 1)])?;
    let by_pod = answered(node, &addr, n, "v1 scaled to 1")?;
    let pods: BTreeSet<&String> = by_pod.keys().collect();
    let expected: BTreeSet<&String> = left.iter().chain(&v2).collect();
    assert_eq!(pods, expected, "only the pods left answer");
    assert_share_of(&by_pod, &v2, n, 0.5, "v2 at 50/50 with one v1 pod");

    // The agent pod deleted: connections keep working on the pinned state
    // while the DaemonSet makes a new pod, which adopts it.
    node.kubectl(&[
        "delete",
        "pod",
        "-n",
        "mesh-system",
        &agent_pod,
        "--wait=false",
    ])?;
    let t3 = Instant::now();
    let (by_pod, failed) = from_client(node, &addr, 200)?;
    eprintln!("agent pod deleted: {by_pod:?}, failed {}", failed.len());
    assert!(failed.is_empty(), "failed connections: {failed:?}");
    poll(
        Duration::from_secs(60),
        "the deleted agent pod gone",
        || {
            let pods = node.kubectl_json(&["get", "pods", "-n", "mesh-system"])?;
            Ok((!pods["items"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["metadata"]["name"] == agent_pod.as_str()))
            .then_some(()))
        },
    )?;
    eprintln!("deleted agent pod gone {:?} after the delete", t3.elapsed());
    let new_pod = poll(Duration::from_secs(120), "a new agent pod Ready", || {
        Ok(
            ready_named(node, "mesh-system", "app.kubernetes.io/name=mesh-agent", 1)?
                .filter(|v| v[0] != agent_pod)
                .map(|mut v| v.remove(0)),
        )
    })?;
    eprintln!(
        "new agent pod {new_pod} Ready {:?} after the delete",
        t3.elapsed()
    );
    let by_pod = answered(node, &addr, n, "50/50 after the restart")?;
    assert_share_of(
        &by_pod,
        &v2,
        n,
        0.5,
        "v2 at 50/50 after the agent's restart",
    );

    // The kernel programs sit on the pods' cgroup (cgroup v2 of this hybrid
    // host), pinned in the pin dir the overlay gave.
    let progs = attached("/sys/fs/cgroup/unified/kubepods")?;
    eprintln!("attached to kubepods: {progs:?}");
    for kind in ["cgroup_inet4_connect", "cgroup_sock_ops"] {
        assert!(
            progs.iter().any(|(_, t)| t.contains(kind)),
            "no {kind} program: {progs:?}"
        );
    }
    assert!(mesh.pin_dir.is_dir(), "{} missing", mesh.pin_dir.display());
    Ok((mesh, progs.into_iter().map(|(id, _)| id).collect()))
}
