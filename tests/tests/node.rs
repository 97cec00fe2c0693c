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
use mesh_tools::{
    node::{KubeProxy, MeshDeployed, Node, http_get, poll},
    seed::{self, Answers},
};
use serde_json::Value;

mod common;

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
    // The seed's manifests as shipped: redis, then flaskapp v1 (3 pods).
    seed::apply(node, "flaskapp.yaml")?;
    poll(Duration::from_secs(120), "redis ready", || {
        seed::ready_pods(node, "default", "app=redis", 1)
    })?;
    let pods = poll(Duration::from_secs(120), "3 ready flaskapp pods", || {
        seed::ready_pods(node, "default", "app=business", 3)
    })?;
    eprintln!("3 pods ready after {:?}", t1.elapsed());

    // Pod addresses come from the node's range.
    let prefix = node.info("pod_cidr")?.trim_end_matches("0/24").to_owned();
    let pods: Vec<(String, IpAddr)> = pods
        .into_iter()
        .map(|p| Ok((p.name, p.ip.context("a ready pod without an IP")?)))
        .collect::<anyhow::Result<_>>()?;
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

    // Each pod answers from the host with its own name and version. (Its
    // visit count: redis's ClusterIP answers nothing here, neither mesh nor
    // kube-proxy runs, so `visits=error`; the mesh test counts through it.)
    for (name, ip) in &pods {
        let body = http_get(SocketAddr::new(*ip, 5000), Duration::from_secs(5))?;
        assert!(
            body.starts_with(&format!("host={name} version=v1 client="))
                && body.trim_end().ends_with(" visits=error"),
            "{ip}: {body:?}"
        );
    }
    Ok(())
}

/// The seed on the node, as its user applies it (`manifests/examples/seed`,
/// in `default`): redis, flaskapp v1 (3 pods) and v2 (1 pod) behind the
/// Service `flaskapp` (port 5000, selector `app: business`), the client pod;
/// and a second client pod in the namespace `plain`, not labelled.
fn deploy_seed(node: &Node) -> anyhow::Result<()> {
    deploy_seed_apps(node)?;
    node.kubectl(&["create", "namespace", "plain"])?;
    let client = seed::manifest("client.yaml");
    node.kubectl(&[
        "apply",
        "-n",
        "plain",
        "-f",
        client.to_str().context("path")?,
    ])?;
    Ok(())
}

/// The seed's apps and client pod in `default`, labelled.
fn deploy_seed_apps(node: &Node) -> anyhow::Result<()> {
    node.kubectl(&[
        "label",
        "namespace",
        "default",
        "istio-injection=enabled",
        "--overwrite",
    ])?;
    for file in ["flaskapp.yaml", "flaskapp-v2.yaml", "client.yaml"] {
        seed::apply(node, file)?;
    }
    Ok(())
}

/// Polls (bounded) until the agent's record of what the kernel holds for
/// flaskapp's ClusterIP, (weight, backends) per destination, satisfies `done`.
/// The record is in the DaemonSet's run dir, a hostPath the test reads.
fn in_the_kernel(
    mesh: &MeshDeployed,
    what: &str,
    done: impl Fn(&[(u64, usize)]) -> bool,
) -> anyhow::Result<()> {
    seed::in_the_kernel(&mesh.run_dir, "default/flaskapp", what, done)
}

/// `n` requests from the client pod of `default`, none failed, every one
/// meshed: the pods saw the client's own address (kube-proxy, where it runs,
/// shows them the node's).
fn answered(node: &Node, addr: &str, n: u32, what: &str) -> anyhow::Result<Answers> {
    let answers = seed::from_client(node, "default", addr, n)?;
    eprintln!(
        "{what}: {:?}, failed {}",
        answers.by_pod,
        answers.failed.len()
    );
    assert!(
        answers.failed.is_empty(),
        "{what}: failed connections: {:?}",
        answers.failed
    );
    let client = pod_ip(node, "default", "client")?;
    assert_eq!(
        answers.clients,
        BTreeSet::from([client]),
        "{what}: not every connection was meshed"
    );
    Ok(answers)
}

/// The address of pod `ns/name`.
fn pod_ip(node: &Node, ns: &str, name: &str) -> anyhow::Result<IpAddr> {
    let ip = node.kubectl(&[
        "get",
        "pod",
        "-n",
        ns,
        name,
        "-o",
        "jsonpath={.status.podIP}",
    ])?;
    ip.trim()
        .parse()
        .with_context(|| format!("pod {ns}/{name} has no address: {ip:?}"))
}

/// All `n` requests answered, and `pods` answered `expected` of them
/// (within the binomial tolerance of `common::assert_share`).
fn assert_share_of(answers: &Answers, pods: &[String], n: u32, expected: f64, what: &str) {
    let (hit, total) = answers.share(pods);
    assert_eq!(total, n, "{what}: {:?}", answers.by_pod);
    common::assert_share(f64::from(hit) / f64::from(n), expected, u64::from(n), what);
}

/// The agent pod, once one is Ready (other than `not`, a pod deleted).
fn agent_ready(node: &Node, not: Option<&str>) -> anyhow::Result<String> {
    poll(Duration::from_secs(120), "an agent pod Ready", || {
        Ok(
            seed::ready_names(node, "mesh-system", "app.kubernetes.io/name=mesh-agent", 1)?
                .filter(|v| Some(v[0].as_str()) != not)
                .map(|mut v| v.remove(0)),
        )
    })
}

/// The agent pod's `/metrics` as Prometheus would scrape it: with the token
/// of a ServiceAccount bound to the shipped `mesh-metrics-reader`
/// ClusterRole. Checks first that no token gets 401 and the token of an
/// account without the binding 403.
fn scrape_metrics(node: &Node, agent_pod: &str) -> anyhow::Result<String> {
    node.kubectl(&["create", "serviceaccount", "-n", "default", "prometheus"])?;
    node.kubectl(&[
        "create",
        "clusterrolebinding",
        "prometheus-mesh-metrics",
        "--clusterrole=mesh-metrics-reader",
        "--serviceaccount=default:prometheus",
    ])?;
    // Kubernetes 1.20: the token controller writes each account's token
    // into a Secret.
    let token = |account: &str| {
        poll(Duration::from_secs(60), "a ServiceAccount token", || {
            let secret = node.kubectl(&[
                "get",
                "serviceaccount",
                "-n",
                "default",
                account,
                "-o",
                "jsonpath={.secrets[0].name}",
            ])?;
            if secret.trim().is_empty() {
                return Ok(None);
            }
            let encoded = node.kubectl(&[
                "get",
                "secret",
                "-n",
                "default",
                secret.trim(),
                "-o",
                "jsonpath={.data.token}",
            ])?;
            let mut cmd = std::process::Command::new("base64");
            cmd.arg("-d");
            Ok(Some(mesh_tools::checked_output(cmd, Some(encoded.trim()))?))
        })
    };
    let url = format!(
        "http://{}:9090/metrics",
        pod_ip(node, "mesh-system", agent_pod)?
    );
    let get = |token: Option<&str>| -> anyhow::Result<(String, String)> {
        let mut args = vec!["-s", "-m", "10", "-w", "\n%{http_code}"];
        let header;
        if let Some(t) = token {
            header = format!("Authorization: Bearer {t}");
            args.extend(["-H", &header]);
        }
        args.push(&url);
        let out = mesh_tools::sh("curl", &args)?;
        let (body, code) = out.rsplit_once('\n').context("curl's status line")?;
        Ok((code.to_owned(), body.to_owned()))
    };
    assert_eq!(get(None)?.0, "401", "/metrics without a token");
    let stranger = token("default")?;
    assert_eq!(
        get(Some(&stranger))?.0,
        "403",
        "/metrics for an account without the role"
    );
    let (code, body) = get(Some(&token("prometheus")?))?;
    assert_eq!(code, "200", "{body}");
    Ok(body)
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
    let (node, (mesh, progs)) = on_a_node(KubeProxy::Iptables, mesh_on_the_node)?;
    // Uninstalled as a user does: the DaemonSet deleted, then
    // manifests/uninstall (`mesh-agent cleanup` on the node, in the agent's
    // image) until its pod is Ready, then deleted. Nothing of the agent's is
    // left on the host: its pin dir and run dir (hostPaths), and the programs
    // it attached to the pods' cgroup.
    let t = Instant::now();
    node.explain_failure(node.uninstall_mesh())?;
    eprintln!("uninstalled with manifests/uninstall in {:?}", t.elapsed());
    for dir in [&mesh.pin_dir, &mesh.run_dir] {
        assert!(!dir.exists(), "{} left", dir.display());
    }
    for id in progs {
        assert!(
            mesh_tools::sh("bpftool", &["prog", "show", "id", &id]).is_err(),
            "program {id} still loaded"
        );
    }
    Ok(())
}

/// Runs `body` on a node of its own, with the agent's binary to deploy; when
/// it fails, prints the agent's logs and the node's state first.
fn on_a_node<T>(
    kube_proxy: KubeProxy,
    body: impl FnOnce(&Node, &std::path::Path) -> anyhow::Result<T>,
) -> anyhow::Result<(Node, T)> {
    mesh_tools::require_root();
    let agent_binary = mesh_tools::agent::sibling_binary("mesh-agent")?;
    let node = Node::start_with(kube_proxy)?;
    let result = body(&node, &agent_binary);
    if result.is_err() {
        eprintln!("---- agent logs ----\n{}", agent_logs(&node));
    }
    let value = node.explain_failure(result)?;
    Ok((node, value))
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
    deploy_seed(node)?;

    let t0 = Instant::now();
    let mesh = node.deploy_mesh(agent_binary)?;
    eprintln!(
        "agent image {} built and applied after {:?}",
        mesh.image,
        t0.elapsed()
    );
    let agent_pod = agent_ready(node, None)?;
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

    seed::apply(node, "destinationrule.yaml")?;
    seed::apply(node, "virtualservice.yaml")?;
    let v1 = seed::wait_ready(node, "default", "app=business,version=v1", 3)?;
    let v2 = seed::wait_ready(node, "default", "app=business,version=v2", 1)?;
    seed::wait_ready(node, "default", "app=redis", 1)?;
    for ns in ["default", "plain"] {
        seed::wait_ready(node, ns, "app=client", 1)?;
    }
    let addr = format!("{}:5000", seed::cluster_ip(node, "default", "flaskapp")?);
    let client = pod_ip(node, "default", "client")?;
    let bridge: IpAddr = node.info("gateway")?.parse()?;

    // kube-proxy runs beside the mesh, as in a real cluster: the host's own
    // processes are not meshed (--mesh-scope pods), so kube-proxy answers
    // them (the pod sees the node's address: --masquerade-all).
    // (Polled: kube-proxy syncs its rules at most once a second.)
    let body = poll(
        Duration::from_secs(30),
        "kube-proxy to answer the host",
        || Ok(http_get(addr.parse()?, Duration::from_secs(5)).ok()),
    )?;
    assert!(
        body.contains(&format!("client={bridge}:")),
        "the host's request to {addr} was not kube-proxy's: {body}"
    );

    // The client pod meshed (found under the pods' cgroup): the mesh connects
    // it to the pods directly, so they see its own address; and the weights
    // are in the kernel: both v1 and v2 answer.
    let t1 = Instant::now();
    poll(
        Duration::from_secs(60),
        "the client pod's connections meshed, reaching v1 and v2",
        || {
            let answers = seed::from_client(node, "default", &addr, 40)?;
            Ok((answers.clients == BTreeSet::from([client])
                && answers.share(&v1).0 > 0
                && answers.share(&v2).0 > 0)
                .then_some(()))
        },
    )?;
    eprintln!("client meshed {:?} after the pods were ready", t1.elapsed());
    // `kubectl logs` reads the agent (JSON lines): it found the meshed pods.
    let logs = node.kubectl(&["logs", "-n", "mesh-system", &agent_pod])?;
    let meshed: Vec<&str> = logs.lines().filter(|l| l.contains("pod meshed")).collect();
    assert!(
        meshed.len() >= 6,
        "4 flaskapp pods, redis and the client: {logs}"
    );
    assert!(
        !meshed.iter().any(|l| l.contains("mesh-system")),
        "the unlabelled mesh-system namespace is meshed: {meshed:?}"
    );
    if let Some(line) = meshed.first() {
        eprintln!("agent log: {line}");
    }

    let n = 500;
    let answers = answered(node, &addr, n, "80/20")?;
    let (hit, total) = answers.share(&v2);
    assert_eq!(total, n);
    assert_eq!(
        answers.share(&v1).0 + hit,
        n,
        "only flaskapp pods answer: {:?}",
        answers.by_pod
    );
    for pod in &v1 {
        assert!(
            answers.by_pod.contains_key(pod),
            "{pod} never answered: {:?}",
            answers.by_pod
        );
    }
    common::assert_share(
        f64::from(hit) / f64::from(n),
        0.2,
        u64::from(n),
        "v2 at 80/20",
    );
    // flaskapp counted each visit in redis, through redis's ClusterIP, which
    // only the mesh answers here: the pods' own connections are meshed too.
    let visits: u64 = answers
        .last_visits
        .as_deref()
        .context("no visits= in the answers")?
        .parse()
        .with_context(|| format!("visits {:?}: redis not reached", answers.last_visits))?;
    assert!(visits >= u64::from(n), "{visits} visits after {n} requests");

    // The agent's /metrics, read as the shipped `mesh-metrics-reader`
    // ClusterRole lets a ServiceAccount bound to it (30-metrics-reader.yaml's
    // own instructions); anyone else is refused. The kernel counted the
    // client's connects to flaskapp and flaskapp's to redis.
    let metrics = scrape_metrics(node, &agent_pod)?;
    let connects = |service: &str| -> u64 {
        metrics
            .lines()
            .filter(|l| {
                l.starts_with("mesh_service_connections_total{")
                    && l.contains(&format!("service=\"{service}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    eprintln!(
        "/metrics: {} connects to flaskapp, {} to redis",
        connects("default/flaskapp"),
        connects("default/redis")
    );
    assert!(connects("default/flaskapp") >= u64::from(n), "{metrics}");
    assert!(connects("default/redis") >= u64::from(n), "{metrics}");

    // A pod of a namespace without the label is not meshed: kube-proxy
    // connects it (the pods see the node's address). Labelling the namespace
    // meshes it, without a restart: the pods see its own address.
    let plain = seed::from_client(node, "plain", &addr, 4)?;
    assert!(
        plain.failed.is_empty() && plain.clients == BTreeSet::from([bridge]),
        "the unlabelled namespace's client was meshed: {plain:?}"
    );
    let plain_ip = pod_ip(node, "plain", "client")?;
    node.kubectl(&["label", "namespace", "plain", "istio-injection=enabled"])?;
    let t2 = Instant::now();
    poll(
        Duration::from_secs(60),
        "the newly labelled namespace's client meshed",
        || {
            let answers = seed::from_client(node, "plain", &addr, 1)?;
            Ok((answers.clients == BTreeSet::from([plain_ip])).then_some(()))
        },
    )?;
    eprintln!(
        "namespace plain labelled: its client meshed within {:?}",
        t2.elapsed()
    );

    // The client pod's sandbox recreated (its pause container killed: the
    // kubelet makes a new network namespace, and restarts the container in
    // it): meshed again, without the pod changing.
    let sandbox = |node: &Node| -> anyhow::Result<String> {
        Ok(node
            .docker(&[
                "ps",
                "-q",
                "--filter",
                "label=io.kubernetes.pod.namespace=default",
                "--filter",
                "label=io.kubernetes.pod.name=client",
                "--filter",
                "label=io.kubernetes.docker.type=podsandbox",
            ])?
            .trim()
            .to_owned())
    };
    let old_sandbox = sandbox(node)?;
    node.docker(&["kill", &old_sandbox])?;
    let t = Instant::now();
    poll(
        Duration::from_secs(120),
        "the client meshed in its new sandbox",
        || {
            let now = sandbox(node)?;
            if now.is_empty() || now == old_sandbox {
                return Ok(None);
            }
            let ip = pod_ip(node, "default", "client")?;
            let answers = seed::from_client(node, "default", &addr, 4)?;
            Ok(
                (answers.failed.is_empty() && answers.clients == BTreeSet::from([ip]))
                    .then_some(()),
            )
        },
    )?;
    eprintln!(
        "client sandbox recreated: meshed again {:?} after the kill (address {})",
        t.elapsed(),
        pod_ip(node, "default", "client")?
    );

    // The live edit, as the seed's user makes it: `kubectl edit`.
    seed::edit(
        node,
        "virtualservice/flaskapp",
        &[("weight: 80", "weight: 50"), ("weight: 20", "weight: 50")],
    )?;
    in_the_kernel(&mesh, "the 50/50 edit", |d| d == [(50, 3), (50, 1)])?;
    let answers = answered(node, &addr, n, "50/50")?;
    assert_share_of(&answers, &v2, n, 0.5, "v2 at 50/50");

    // `kubectl delete pod`: the Deployment replaces it; new connections reach
    // only the ready pods, never the deleted one.
    let deleted = &v1[0];
    node.kubectl(&["delete", "pod", "-n", "default", deleted, "--wait=false"])?;
    let v1_now = poll(
        Duration::from_secs(120),
        "a replacement v1 pod ready",
        || {
            Ok(
                seed::ready_names(node, "default", "app=business,version=v1", 3)?
                    .filter(|names| !names.contains(deleted)),
            )
        },
    )?;
    in_the_kernel(&mesh, "the deleted pod replaced", |d| {
        d == [(50, 3), (50, 1)]
    })?;
    let answers = answered(node, &addr, n, "v1 pod deleted and replaced")?;
    let pods: BTreeSet<&String> = answers.by_pod.keys().collect();
    let expected: BTreeSet<&String> = v1_now.iter().chain(&v2).collect();
    assert_eq!(pods, expected, "only the ready pods answer");

    // `kubectl scale` down: the next connections reach only the pods left.
    node.kubectl(&[
        "scale",
        "deployment",
        "-n",
        "default",
        "flaskapp",
        "--replicas=1",
    ])?;
    let left = poll(Duration::from_secs(60), "one v1 pod left", || {
        seed::ready_names(node, "default", "app=business,version=v1", 1)
    })?;
    in_the_kernel(&mesh, "v1 scaled to one pod", |d| d == [(50, 1), (50, 1)])?;
    let answers = answered(node, &addr, n, "v1 scaled to 1")?;
    let pods: BTreeSet<&String> = answers.by_pod.keys().collect();
    let expected: BTreeSet<&String> = left.iter().chain(&v2).collect();
    assert_eq!(pods, expected, "only the pods left answer");
    assert_share_of(&answers, &v2, n, 0.5, "v2 at 50/50 with one v1 pod");

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
    answered(node, &addr, 200, "agent pod deleted")?;
    let new_pod = agent_ready(node, Some(&agent_pod))?;
    eprintln!(
        "new agent pod {new_pod} Ready {:?} after the delete",
        t3.elapsed()
    );
    let answers = answered(node, &addr, n, "50/50 after the restart")?;
    assert_share_of(
        &answers,
        &v2,
        n,
        0.5,
        "v2 at 50/50 after the agent's restart",
    );

    // The seed's gateway: `kubectl apply -f gateway.yaml` (its VirtualService
    // replaces the mesh one, same name), then `curl http://localhost/` on the
    // node, as the seed's user runs it: the node's processes reach the pods
    // through the agent's router (the route matches `uri: exact /`).
    let ready: BTreeSet<String> = left.iter().chain(&v2).cloned().collect();
    seed::apply(node, "gateway.yaml")?;
    let root = poll(
        Duration::from_secs(60),
        "curl http://localhost/ served",
        || {
            Ok(mesh_tools::curl::curl_here("http://localhost/", 200)
                .ok()
                .filter(|c| c.codes.get(&200) == Some(&200)))
        },
    )?;
    let pods: BTreeSet<String> = root.pods.keys().cloned().collect();
    assert_eq!(pods, ready, "every ready pod answers /: {root:?}");
    let other = mesh_tools::curl::curl_here("http://localhost/other", 20)?;
    assert_eq!(other.codes.get(&404), Some(&20), "{other:?}");
    // gateway2.yaml: any other path takes the 80/20 route.
    seed::apply(node, "gateway2.yaml")?;
    let split = poll(Duration::from_secs(60), "gateway2.yaml served", || {
        Ok(
            mesh_tools::curl::curl_here("http://localhost/other", u64::from(n))
                .ok()
                .filter(|c| c.codes.get(&200) == Some(&u64::from(n))),
        )
    })?;
    common::assert_share(
        split.share(&v2[0]),
        0.2,
        u64::from(n),
        "gateway2 /other: v2 at 80/20",
    );
    eprintln!(
        "the seed's gateway on the node: / {:?}, /other {:?}",
        root.pods, split.pods
    );
    // The router reaches the pods on this node by the same-node shortcut.
    let explained = node.kubectl(&[
        "exec",
        "-n",
        "mesh-system",
        &new_pod,
        "--",
        "/mesh-agent",
        "explain",
        "127.0.0.1:80",
    ])?;
    assert!(
        explained.contains("joined to backends on this node by the same-node shortcut"),
        "{explained}"
    );
    let gateway_progs = attached("/sys/fs/cgroup/unified")?;
    assert!(
        gateway_progs
            .iter()
            .any(|(_, t)| t.contains("cgroup_inet4_connect")),
        "no gateway connect program on the node's cgroup root: {gateway_progs:?}"
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
    Ok((
        mesh,
        progs
            .into_iter()
            .chain(gateway_progs)
            .map(|(id, _)| id)
            .collect(),
    ))
}

/// Rolling restarts under a connect storm from a meshed pod: of the
/// application (`kubectl rollout restart deployment/flaskapp`, with readiness
/// probes: new pods get connections once ready, old ones none once
/// terminating) and of the agent (`kubectl rollout restart daemonset`: the
/// kernel keeps routing on the pinned state while the agent is replaced).
/// Not one connection fails.
#[test]
fn rolling_restarts_under_a_connect_storm_fail_no_connection() -> anyhow::Result<()> {
    // No kube-proxy: a connect the mesh did not rewrite fails, so any
    // failure of the mesh shows.
    on_a_node(KubeProxy::None, restarts_under_storm).map(drop)
}

fn restarts_under_storm(node: &Node, agent_binary: &std::path::Path) -> anyhow::Result<()> {
    deploy_seed_apps(node)?;
    let mesh = node.deploy_mesh(agent_binary)?;
    let agent_pod = agent_ready(node, None)?;
    seed::apply(node, "destinationrule.yaml")?;
    seed::apply(node, "virtualservice.yaml")?;
    let v1 = seed::wait_ready(node, "default", "app=business,version=v1", 3)?;
    seed::wait_ready(node, "default", "app=client", 1)?;
    let addr = format!("{}:5000", seed::cluster_ip(node, "default", "flaskapp")?);
    poll(Duration::from_secs(60), "the client pod meshed", || {
        let answers = seed::from_client(node, "default", &addr, 10)?;
        Ok((answers.failed.is_empty() && answers.by_pod.len() > 1).then_some(()))
    })?;
    in_the_kernel(&mesh, "80/20 in the kernel", |d| d == [(80, 3), (20, 1)])?;

    // The application's rolling restart.
    seed::start_storm(node, "default", &addr, 4)?;
    let t0 = Instant::now();
    node.kubectl(&["rollout", "restart", "deployment/flaskapp"])?;
    node.kubectl(&["rollout", "status", "deployment/flaskapp", "--timeout=180s"])?;
    let v1_new = poll(Duration::from_secs(120), "3 new v1 pods alone", || {
        Ok(
            seed::ready_names(node, "default", "app=business,version=v1", 3)?
                .filter(|names| names.iter().all(|n| !v1.contains(n))),
        )
    })?;
    in_the_kernel(&mesh, "the new v1 pods in the kernel", |d| {
        d == [(80, 3), (20, 1)]
    })?;
    // A few more connections to the new pods before the storm stops.
    let _ = answered(node, &addr, 20, "after the rollout")?;
    let storm = seed::stop_storm(node, "default")?;
    eprintln!("deployment rollout ({:?}): {storm:?}", t0.elapsed());
    assert_eq!(storm.failed, 0, "failed connections: {:?}", storm.errors);
    assert!(storm.ok > 100, "the storm barely ran: {storm:?}");
    for pod in v1.iter().chain(&v1_new) {
        assert!(
            storm.by_pod.contains_key(pod),
            "{pod} (old or new) never answered the storm: {:?}",
            storm.by_pod
        );
    }

    // The agent's rolling restart.
    seed::start_storm(node, "default", &addr, 4)?;
    let t1 = Instant::now();
    node.kubectl(&[
        "rollout",
        "restart",
        "-n",
        "mesh-system",
        "daemonset/mesh-agent",
    ])?;
    node.agent_rolled_out()?;
    let new_agent = agent_ready(node, Some(&agent_pod))?;
    // The new agent adopted the tables and applies changes again.
    node.kubectl(&["scale", "deployment", "flaskapp", "--replicas=2"])?;
    in_the_kernel(&mesh, "the new agent applied a scale-down", |d| {
        d == [(80, 2), (20, 1)]
    })?;
    let storm = seed::stop_storm(node, "default")?;
    eprintln!(
        "daemonset rollout ({:?}, new agent {new_agent}): {storm:?}",
        t1.elapsed()
    );
    assert_eq!(storm.failed, 0, "failed connections: {:?}", storm.errors);
    assert!(storm.ok > 100, "the storm barely ran: {storm:?}");
    Ok(())
}

/// `cargo xtask cluster up|status|down` and `cargo xtask demo --cluster`
/// (the `mesh-cluster` program they run): up is idempotent, the demo tells
/// the seed's story on the node and shows each split, down leaves nothing.
#[test]
fn the_cluster_comes_up_tells_the_seed_and_goes_down() -> anyhow::Result<()> {
    mesh_tools::require_root();
    let _one = mesh_tools::node::one_node();
    let cluster = mesh_tools::agent::sibling_binary("mesh-cluster")?;
    // Named as a test's node: swept if this process dies.
    let dir = std::path::PathBuf::from("/tmp").join(mesh_tools::unique("mesh-node-"));
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let mut cmd = std::process::Command::new(&cluster);
        cmd.arg("--dir").arg(&dir).args(args);
        mesh_tools::checked_output(cmd, None)
    };
    // A failed assertion must not leave the cluster up (the next node test
    // could not start): the closure's panic is caught, `down` runs, then it
    // goes on.
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> anyhow::Result<()> {
            let t0 = Instant::now();
            let up = run(&["up"])?;
            eprintln!("up in {:?}", t0.elapsed());
            let exports = format!("export KUBECONFIG={}/kubeconfig", dir.display());
            assert!(up.contains(&exports), "{up}");
            let t1 = Instant::now();
            run(&["up"])?;
            eprintln!("up again (idempotent) in {:?}", t1.elapsed());

            let demo = run(&["demo", "--seconds", "4"])?;
            eprintln!("{demo}");
            let split = |step: &str| -> anyhow::Result<(f64, u64)> {
                let part = demo
                    .split("\n# ")
                    .find(|p| p.starts_with(step))
                    .with_context(|| format!("no step {step} in the demo"))?;
                let last = part
                    .lines()
                    .rfind(|l| l.contains(" connections: "))
                    .with_context(|| format!("no split in step {step}"))?;
                assert!(last.contains("failed 0"), "{last}");
                let words: Vec<&str> = last.split_whitespace().collect();
                let n: u64 = words[1].parse()?;
                let v2 = words
                    .iter()
                    .position(|w| *w == "v2")
                    .with_context(|| format!("no v2 in {last:?}"))?;
                let share: f64 = words[v2 + 1].trim_end_matches('%').parse()?;
                Ok((share / 100.0, n))
            };
            let (even, n) = split("2.")?;
            common::assert_share(even, 0.25, n, "v2 of 4 pods without a VirtualService");
            let (canary, n) = split("3.")?;
            common::assert_share(canary, 0.2, n, "v2 at 80/20");
            let (edited, n) = split("4.")?;
            common::assert_share(edited, 0.5, n, "v2 at 50/50 after kubectl edit");
            assert!(demo.contains("in the kernel"), "{demo}");
            // The seed's gateway on the node: `/` answered, `/other` 404 under
            // gateway.yaml, then answered under gateway2.yaml.
            let step = |s: &str| {
                demo.split("\n# ")
                    .find(|p| p.starts_with(s))
                    .unwrap_or_default()
            };
            assert!(
                step("5.").contains("200 x 200") && step("5.").contains("200 x 404"),
                "{demo}"
            );
            assert!(
                !step("6.").contains("x 404") && step("6.").contains("200 x 200"),
                "{demo}"
            );

            let status = run(&["status"])?;
            assert!(status.contains(" Ready "), "{status}");
            Ok(())
        }));
    let down = run(&["down"]);
    let result = result.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
    result?;
    down?;
    assert!(!dir.exists(), "{} left after down", dir.display());
    let name = dir.file_name().context("name")?;
    for left in [
        std::path::Path::new("/sys/fs/bpf").join(name),
        std::path::Path::new("/run").join(name),
    ] {
        assert!(!left.exists(), "{} left after down", left.display());
    }
    let status = run(&["status"])?;
    assert!(status.contains("not running"), "{status}");
    Ok(())
}
