//! End to end against a real kube-apiserver: the example applied with kubectl,
//! endpoints created as the endpointslice controller would, the agent following the
//! API server (`--source kubernetes`), and real connections through the kernel.

mod common;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use common::{V1, V2, VIP4, assert_share};
use mesh_tools::{
    agent::Agent,
    apiserver::{ApiProxy, ApiServer},
    backend::Backend,
    cgroup::Cgroup,
    netns::Node,
    probe,
};

const N: u64 = 2000;
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

/// Each flaskapp pod: name, address, ready.
type Pods = Vec<(String, IpAddr, bool)>;

/// Writes the EndpointSlice of the flaskapp pods (in one API version).
type SliceWriter = fn(&[(String, IpAddr, bool)]) -> String;

fn endpoint_slice(pods: &[(String, IpAddr, bool)]) -> String {
    mesh_tools::apiserver::endpoint_slice("flaskapp", 5000, pods)
}

/// The slice as Kubernetes 1.17-1.20's controller writes it: v1beta1, the node
/// in `topology`.
fn endpoint_slice_v1beta1(pods: &[(String, IpAddr, bool)]) -> String {
    endpoint_slice(pods)
        .replace(
            "apiVersion: discovery.k8s.io/v1\n",
            "apiVersion: discovery.k8s.io/v1beta1\n",
        )
        .replace(
            "    targetRef:",
            "    topology: {kubernetes.io/hostname: node-a}\n    targetRef:",
        )
}

struct Cluster {
    agent: Agent,
    _backends: Vec<Backend>,
    cgroup: Cgroup,
    node: Node,
    api: ApiServer,
    pods: Pods,
}

/// The example's flaskapp pods (backends in their own namespaces, running Pods
/// and their EndpointSlice in the API server) and its Service; with `istio`, its
/// DestinationRule and VirtualService too.
fn topology(api: &ApiServer, istio: bool) -> anyhow::Result<(Node, Vec<Backend>, Pods)> {
    topology_with(api, istio, Some(endpoint_slice))
}

/// The same, with the EndpointSlice written by `slice` (a version's writer;
/// none: the server's controllers write what they write).
fn topology_with(
    api: &ApiServer,
    istio: bool,
    slice: Option<SliceWriter>,
) -> anyhow::Result<(Node, Vec<Backend>, Pods)> {
    let mut node = Node::new()?;
    node.add_pod("client", 2)?;
    let mut backends = Vec::new();
    let mut pods = Vec::new();
    for (i, name) in V1.iter().chain([&V2]).enumerate() {
        let version = if name.contains("v2") { "v2" } else { "v1" };
        let p = node.add_pod(name, 11 + i as u8)?;
        backends.push(Backend::spawn(&p.ns, name, version, 5000)?);
        // The seed's label, which the example Service selects.
        api.running_pod(name, "business", version, p.ipv4)?;
        pods.push((name.to_string(), p.ipv4, true));
    }
    api.kubectl(&["apply", "-f", &example("service.yaml")])?;
    if istio {
        apply_istio_example(api)?;
    }
    if let Some(slice) = slice {
        api.apply(&slice(&pods))?;
    }
    Ok((node, backends, pods))
}

/// The example Service's VIP and port (the seed's: 5000).
const EXAMPLE_PORT: u16 = 5000;

fn vip4() -> String {
    format!("{VIP4}:{EXAMPLE_PORT}")
}

fn example(file: &str) -> String {
    format!("{ROOT}/manifests/examples/flaskapp/{file}")
}

/// The example's DestinationRule and VirtualService (80/20), with kubectl.
fn apply_istio_example(api: &ApiServer) -> anyhow::Result<()> {
    for file in ["destinationrule.yaml", "virtualservice.yaml"] {
        api.kubectl(&["apply", "-f", &example(file)])?;
    }
    Ok(())
}

/// Polls `done` (bounded by `timeout`) until it holds.
fn wait_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let started = Instant::now();
    while !done()? {
        anyhow::ensure!(started.elapsed() < timeout, "no {what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

impl Cluster {
    fn start() -> anyhow::Result<Self> {
        Self::start_as(|api| Ok(api.kubeconfig.clone()))
    }

    /// The same, with the agent's kubeconfig chosen by `agent_kubeconfig`.
    fn start_as(
        agent_kubeconfig: impl Fn(&ApiServer) -> anyhow::Result<std::path::PathBuf>,
    ) -> anyhow::Result<Self> {
        mesh_tools::require_root();
        let api = ApiServer::start()?;
        api.install_mesh_crds()?;
        let (node, backends, pods) = topology(&api, true)?;
        let cgroup = Cgroup::create(&mesh_tools::unique("mesh-test-"))?;
        let agent = Agent::start_kubernetes(&agent_kubeconfig(&api)?, cgroup.path())?;
        Ok(Cluster {
            agent,
            _backends: backends,
            cgroup,
            node,
            api,
            pods,
        })
    }

    /// The API server with the mesh's CRDs (`istio`: the Istio ones too) and the
    /// topology, and an agent started on `kubeconfig` (the API server's own, or
    /// `proxied` through an [`ApiProxy`]) that has not necessarily synced: the
    /// API server may be made unreachable first (`down`).
    fn spawn(istio: bool, down: bool, proxied: bool) -> anyhow::Result<(Self, Option<ApiProxy>)> {
        mesh_tools::require_root();
        let api = ApiServer::start()?;
        api.install_cluster_basics()?;
        if istio {
            api.install_istio_crds()?;
        }
        let (node, backends, pods) = topology(&api, istio)?;
        let cgroup = Cgroup::create(&mesh_tools::unique("mesh-test-"))?;
        let proxy = proxied.then(|| ApiProxy::start(&api)).transpose()?;
        let kubeconfig = proxy.as_ref().map_or(&api.kubeconfig, |p| &p.kubeconfig);
        if down {
            api.set_up(false)?;
        }
        let agent = Agent::spawn_kubernetes(kubeconfig, cgroup.path(), "node-a")?;
        Ok((
            Cluster {
                agent,
                _backends: backends,
                cgroup,
                node,
                api,
                pods,
            },
            proxy,
        ))
    }

    /// Whether the kernel's table for flaskapp follows the VirtualService (as
    /// `mesh-agent dump` reads it from the pinned maps).
    fn routed_by_virtual_service(&self) -> anyhow::Result<bool> {
        Ok(self
            .agent
            .cli(&["dump"])?
            .contains("VirtualService default/flaskapp"))
    }

    /// Asserts that the agent has written nothing and is not ready.
    fn assert_not_synced(&self) -> anyhow::Result<()> {
        assert_eq!(self.agent.generation(), 0, "{}", self.agent.log_text());
        let (status, body) = self.agent.http_get("/readyz")?;
        assert_eq!(status, 503, "/readyz: {body}");
        Ok(())
    }

    fn probe(&self) -> anyhow::Result<probe::Summary> {
        probe::probe(
            &self.node.pod("client").ns,
            Some(&self.cgroup),
            &vip4(),
            N,
            4,
        )
    }

    /// `kubectl patch` of the VirtualService's single http route: these subsets of
    /// flaskapp, with these weights (none: no weight field), then waits for it.
    fn patch_weights(&mut self, destinations: &[(&str, Option<i64>)]) -> anyhow::Result<()> {
        let route: Vec<serde_json::Value> = destinations
            .iter()
            .map(|(subset, weight)| {
                let mut d =
                    serde_json::json!({"destination": {"host": "flaskapp", "subset": subset}});
                if let Some(w) = weight {
                    d["weight"] = serde_json::json!(w);
                }
                d
            })
            .collect();
        let patch = serde_json::json!({"spec": {"http": [{"route": route}]}}).to_string();
        self.change(&[
            "patch",
            "virtualservice",
            "flaskapp",
            "--type",
            "merge",
            "-p",
            &patch,
        ])
    }

    /// Runs a kubectl change and waits until the agent has applied what follows.
    fn change(&mut self, args: &[&str]) -> anyhow::Result<()> {
        let next = self.agent.generation() + 1;
        self.api.kubectl(args)?;
        self.agent.wait_applied(next, Duration::from_secs(20))?;
        Ok(())
    }
}

#[test]
fn kubectl_changes_move_the_split_through_the_api_server() -> anyhow::Result<()> {
    let mut c = Cluster::start()?;
    let s = c.probe()?;
    assert_eq!(s.failed(), 0, "{s:?}\n{}", c.agent.log_text());
    assert_share(s.share(V2), 0.20, N, "80/20 from the API server");

    // `kubectl edit` as a user does it, with a scripted editor.
    let editor = c.api.dir.join("editor.sh");
    std::fs::write(
        &editor,
        "#!/bin/sh\nsed -i 's/weight: 80/weight: 30/; s/weight: 20/weight: 70/' \"$1\"\n",
    )?;
    std::fs::set_permissions(&editor, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let next = c.agent.generation() + 1;
    let out = std::process::Command::new("kubectl")
        .args(["edit", "virtualservice", "flaskapp"])
        .env("KUBECONFIG", &c.api.kubeconfig)
        .env("EDITOR", &editor)
        .output()?;
    assert!(
        out.status.success(),
        "kubectl edit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.agent.wait_applied(next, Duration::from_secs(20))?;
    let s = c.probe()?;
    assert_share(s.share(V2), 0.70, N, "after kubectl edit 30/70");

    c.patch_weights(&[("v1", Some(50)), ("v2", Some(50))])?;
    let s = c.probe()?;
    assert_share(s.share(V2), 0.50, N, "after kubectl patch 50/50");

    // A bad edit is refused; traffic stays on the last good weights.
    c.patch_weights(&[("v1", Some(50)), ("v9", Some(50))])?;
    assert!(
        c.agent
            .messages("ERROR")
            .iter()
            .any(|e| e.contains("VirtualService default/flaskapp") && e.contains("subset"))
    );
    // ... and recorded as a Warning Event on the VirtualService, for `kubectl describe`.
    let started = std::time::Instant::now();
    loop {
        let events = c
            .api
            .kubectl(&["get", "events", "-n", "default", "-o", "json"])?;
        if events.contains("\"Rejected\"") && events.contains("v9") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no Rejected event: {events}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = c.probe()?;
    assert_eq!(s.failed(), 0, "{s:?}");
    assert_share(s.share(V2), 0.50, N, "last good 50/50");

    // A pod goes not-ready in its EndpointSlice: it leaves the table.
    c.pods[3].2 = false;
    let next = c.agent.generation() + 1;
    c.api.replace(&endpoint_slice(&c.pods))?;
    c.agent.wait_applied(next, Duration::from_secs(20))?;
    let s = c.probe()?;
    assert_eq!(s.backends.get(V2), None, "{s:?}");

    // Deleting the VirtualService returns to even balancing over the ready pods.
    c.change(&["delete", "virtualservice", "flaskapp"])?;
    let s = c.probe()?;
    assert_eq!(s.failed(), 0, "{s:?}");
    for pod in V1 {
        assert_share(s.share(pod), 1.0 / 3.0, N, pod);
    }
    Ok(())
}

/// A kubeconfig for the mesh-agent ServiceAccount of manifests/deploy (its RBAC
/// applied for real), next to the admin one.
fn service_account_kubeconfig(api: &ApiServer) -> anyhow::Result<std::path::PathBuf> {
    for file in ["00-namespace.yaml", "10-rbac.yaml"] {
        api.kubectl(&["apply", "-f", &format!("{ROOT}/manifests/deploy/{file}")])?;
    }
    api.service_account_kubeconfig("mesh-system", "mesh-agent")
}

#[test]
fn manifests_pass_server_dry_run_and_the_agent_works_with_its_least_privilege_account()
-> anyhow::Result<()> {
    let c = Cluster::start_as(service_account_kubeconfig)?;
    // Every manifest we ship is accepted by a real API server, applied as a
    // user applies it (the deployment through its kustomization).
    for (how, dir) in [
        ("-f", "manifests/crds"),
        ("-k", "manifests/deploy"),
        ("-k", "manifests/uninstall"),
        ("-f", "manifests/examples/flaskapp"),
    ] {
        c.api
            .kubectl(&["apply", "--dry-run=server", how, &format!("{ROOT}/{dir}")])?;
    }
    // The seed's manifests for a cluster name the same Service as the
    // file-source ones (which this cluster holds, with a fixed clusterIP):
    // checked in a namespace of their own (they name none, as the seed's).
    c.api.kubectl(&["create", "namespace", "dryrun"])?;
    c.api.kubectl(&[
        "apply",
        "--dry-run=server",
        "-n",
        "dryrun",
        "-f",
        &format!("{ROOT}/manifests/examples/seed"),
    ])?;
    // The agent, with only its ServiceAccount's rights, follows the cluster.
    let s = c.probe()?;
    assert_eq!(s.failed(), 0, "{s:?}\n{}", c.agent.log_text());
    assert_share(s.share(V2), 0.20, N, "80/20 with the ServiceAccount token");
    // ... and those rights do not reach further than reading.
    let kc = c
        .api
        .dir
        .join("mesh-system-mesh-agent.kubeconfig")
        .display()
        .to_string();
    // `kubectl auth can-i` prints yes (exit 0) or no (exit 1).
    let can = |verb: &str, resource: &str| {
        c.api
            .kubectl(&["--kubeconfig", &kc, "auth", "can-i", verb, resource])
            .is_ok_and(|a| a.trim() == "yes")
    };
    assert!(
        can("watch", "virtualservices.networking.istio.io"),
        "the agent's account must read what it watches"
    );
    assert!(
        can("create", "events.events.k8s.io"),
        "the agent's account must record events"
    );
    assert!(
        !can("patch", "events.events.k8s.io"),
        "the agent's account only creates events"
    );
    for verb in ["update", "patch", "delete", "create"] {
        assert!(
            !can(verb, "services"),
            "the agent's account can {verb} services"
        );
        assert!(
            !can(verb, "virtualservices.networking.istio.io"),
            "the agent's account can {verb} virtualservices"
        );
    }
    let patched = c
        .api
        .kubectl(&["--kubeconfig", &kc, "label", "service", "flaskapp", "x=y"]);
    assert!(
        patched.is_err_and(|e| e.to_string().contains("Forbidden")),
        "the agent's account could modify a Service"
    );
    Ok(())
}

#[test]
fn an_api_server_outage_fails_no_connection_and_changes_arrive_after_it() -> anyhow::Result<()> {
    let mut c = Cluster::start()?;
    let args: Vec<String> = [
        "--target",
        &vip4(),
        "--duration-ms",
        "6000",
        "--concurrency",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let client = probe::spawn(&c.node.pod("client").ns, Some(&c.cgroup), &args)?;
    std::thread::sleep(Duration::from_millis(1000));
    c.api.set_up(false)?;
    std::thread::sleep(Duration::from_millis(3000));
    c.api.set_up(true)?;
    let during = probe::finish(client)?;
    assert_eq!(during.failed(), 0, "{during:?}");
    assert!(during.ok > 100, "{during:?}");
    assert_share(
        during.share(V2),
        0.20,
        during.ok,
        "80/20 held through the outage",
    );

    // The watchers reconnect: a change made now reaches the kernel. (Their relists
    // after the outage also bump the generation, so the generation alone cannot
    // tell that this change is in: wait, bounded, until connections follow it.)
    c.patch_weights(&[("v2", None)])?;
    let started = std::time::Instant::now();
    loop {
        let s = probe::probe(&c.node.pod("client").ns, Some(&c.cgroup), &vip4(), 20, 1)?;
        if s.backends.get(V2) == Some(&20) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the change did not arrive: {s:?}\n{}",
            c.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let s = c.probe()?;
    assert_eq!(s.backends.get(V2), Some(&N), "{s:?}");
    Ok(())
}

#[test]
fn istio_crds_installed_after_the_agent_are_picked_up() -> anyhow::Result<()> {
    let (mut c, _) = Cluster::spawn(false, false, false)?;
    // Every other kind lists; the agent says what is missing and writes nothing
    // (no "no VirtualService" over what the kernel holds), and is not ready.
    wait_until(
        "warning naming the missing kinds",
        Duration::from_secs(30),
        || {
            let warnings = c.agent.messages("WARN");
            Ok(["VirtualService", "DestinationRule"].iter().all(|kind| {
                warnings.iter().any(|w| {
                    w.contains(&format!(
                        "networking.istio.io {kind} not served; install the CRDs"
                    ))
                })
            }))
        },
    )
    .with_context(|| c.agent.log_text())?;
    wait_until("list of the other kinds", Duration::from_secs(30), || {
        let listed = c.agent.records("listed");
        Ok(["Service", "Pod", "EndpointSlice"]
            .iter()
            .all(|kind| listed.iter().any(|r| r["kind"] == *kind)))
    })
    .with_context(|| c.agent.log_text())?;
    c.assert_not_synced()?;

    // The CRDs and the example arrive: the agent finds them and routes 80/20.
    c.api.install_istio_crds()?;
    apply_istio_example(&c.api)?;
    c.agent.wait_applied(1, Duration::from_secs(60))?;
    wait_until(
        "VirtualService in the kernel",
        Duration::from_secs(30),
        || c.routed_by_virtual_service(),
    )
    .with_context(|| c.agent.log_text())?;
    let (status, _) = c.agent.http_get("/readyz")?;
    assert_eq!(status, 200);
    let s = c.probe()?;
    assert_eq!(s.failed(), 0, "{s:?}");
    assert_share(s.share(V2), 0.20, N, "80/20 once the CRDs are installed");
    Ok(())
}

#[test]
fn an_api_server_down_when_the_agent_starts_is_waited_for() -> anyhow::Result<()> {
    let (mut c, _) = Cluster::spawn(true, true, false)?;
    // It tries, fails, says so, and writes nothing.
    wait_until(
        "warning that discovery failed",
        Duration::from_secs(30),
        || {
            Ok(c.agent
                .messages("WARN")
                .iter()
                .any(|w| w.contains("discovering networking.istio.io VirtualService")))
        },
    )
    .with_context(|| c.agent.log_text())?;
    c.assert_not_synced()?;

    // The API server comes up: the first write holds the VirtualService.
    c.api.set_up(true)?;
    c.agent.wait_applied(1, Duration::from_secs(60))?;
    assert!(
        c.routed_by_virtual_service()?,
        "{}",
        c.agent.cli(&["dump"])?
    );
    let s = c.probe()?;
    assert_eq!(s.failed(), 0, "{s:?}");
    assert_share(s.share(V2), 0.20, N, "80/20 after a late API server");
    Ok(())
}

#[test]
fn a_relist_keeps_the_last_good_version_of_an_object_that_stops_converting() -> anyhow::Result<()> {
    let (mut c, proxy) = Cluster::spawn(true, false, true)?;
    let proxy = proxy.context("no proxy")?;
    c.agent.wait_applied(1, Duration::from_secs(30))?;
    let s = c.probe()?;
    assert_share(s.share(V2), 0.20, N, "80/20 before");

    // The agent loses the API server; meanwhile the VirtualService is replaced
    // by a version that does not convert (the CRD keeps any spec), and the API
    // server restarts: its watch cache starts after the agent's last
    // resourceVersion, so the agent cannot resume its watch (410 Gone) and lists
    // again, this version among the objects.
    proxy.cut();
    let patch = serde_json::json!({"spec": {"http": [{"route": [
        {"destination": {"host": "flaskapp", "subset": "v1"}, "weight": "lots"},
        {"destination": {"host": "flaskapp", "subset": "v2"}, "weight": 20},
    ]}]}})
    .to_string();
    c.api.kubectl(&[
        "patch",
        "virtualservice",
        "flaskapp",
        "--type",
        "merge",
        "-p",
        &patch,
    ])?;
    c.api.set_up(false)?;
    c.api.set_up(true)?;
    let relists = |c: &Cluster| {
        c.agent
            .records("listed")
            .iter()
            .filter(|r| r["kind"] == "VirtualService" && r["invalid"] == 1)
            .count()
    };
    assert_eq!(relists(&c), 0);
    proxy.restore();
    // Two backoff waits at most (30 s each): the retry pending since the cut,
    // and the one after 410 Gone.
    wait_until(
        "relist with the VirtualService that does not convert",
        Duration::from_secs(90),
        || Ok(relists(&c) == 1),
    )
    .with_context(|| c.agent.log_text())?;
    wait_until("rejection", Duration::from_secs(20), || {
        Ok(c.agent.messages("ERROR").iter().any(|e| {
            e.contains("VirtualService default/flaskapp")
                && e.contains("spec.http[0].route[0].weight")
                && e.contains("keeping its last good version")
        }))
    })
    .with_context(|| c.agent.log_text())?;
    let s = c.probe()?;
    assert_eq!(s.failed(), 0, "{s:?}");
    assert_share(s.share(V2), 0.20, N, "the last good 80/20 after the relist");
    Ok(())
}

/// The Rejected Events on the flaskapp VirtualService (core/v1, as `kubectl
/// describe` reads them).
fn rejected_events(api: &ApiServer) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = api.kubectl(&[
        "get",
        "events",
        "-n",
        "default",
        "--field-selector",
        "involvedObject.kind=VirtualService,involvedObject.name=flaskapp,reason=Rejected",
        "-o",
        "json",
    ])?;
    let list: serde_json::Value = serde_json::from_str(&out)?;
    Ok(list["items"].as_array().cloned().unwrap_or_default())
}

/// How many times `agent` has recorded, or found recorded, an Event on flaskapp.
fn event_attempts(agent: &Agent) -> (usize, usize) {
    let on_flaskapp = |message: &str| {
        agent
            .records(message)
            .iter()
            .filter(|r| r["object"] == "VirtualService default/flaskapp")
            .count()
    };
    (
        on_flaskapp("recorded a Warning Event"),
        on_flaskapp("Warning Event already recorded (by another node, or before a restart)"),
    )
}

#[test]
fn two_nodes_record_one_event_per_rejected_version() -> anyhow::Result<()> {
    mesh_tools::require_root();
    let api = ApiServer::start()?;
    api.install_mesh_crds()?;
    let (_node, _backends, _pods) = topology(&api, true)?;
    let cgroups = [
        Cgroup::create(&mesh_tools::unique("mesh-test-"))?,
        Cgroup::create(&mesh_tools::unique("mesh-test-"))?,
    ];
    let mut a = Agent::spawn_kubernetes(&api.kubeconfig, cgroups[0].path(), "node-a")?;
    let mut b = Agent::spawn_kubernetes(&api.kubeconfig, cgroups[1].path(), "node-b")?;
    a.wait_applied(1, Duration::from_secs(30))?;
    b.wait_applied(1, Duration::from_secs(30))?;

    // Both nodes reject the same version: one Event for the cluster.
    let bad = serde_json::json!({"spec": {"http": [{"route": [
        {"destination": {"host": "flaskapp", "subset": "v1"}, "weight": 50},
        {"destination": {"host": "flaskapp", "subset": "v9"}, "weight": 50},
    ]}]}})
    .to_string();
    let patch = [
        "patch",
        "virtualservice",
        "flaskapp",
        "--type",
        "merge",
        "-p",
    ];
    api.kubectl(&[&patch[..], &[bad.as_str()]].concat())?;
    let tried = |agent: &Agent, n: usize| {
        let (recorded, found) = event_attempts(agent);
        recorded + found >= n
    };
    wait_until(
        "an Event attempt by both nodes",
        Duration::from_secs(30),
        || Ok(tried(&a, 1) && tried(&b, 1)),
    )
    .with_context(|| format!("{}\n{}", a.log_text(), b.log_text()))?;
    let events = rejected_events(&api)?;
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(event_attempts(&a).0 + event_attempts(&b).0, 1);
    let note = events[0]["message"].as_str().unwrap_or_default();
    assert!(
        note.contains("spec.http[0].route[1].destination.subset") && note.contains("v9"),
        "{note}"
    );
    // `kubectl describe` shows it (it finds Events by the object's uid).
    let described = api.kubectl(&["describe", "virtualservice", "flaskapp"])?;
    let events_section = described.split("Events:").nth(1).unwrap_or_default();
    assert!(
        events_section.contains("Rejected") && events_section.contains("v9"),
        "{described}"
    );

    // A rollout: node-b restarts, rejects the same version again, and finds its
    // Event already there.
    b.stop()?;
    b.restart(&[])?;
    wait_until(
        "node-b's attempt after its restart",
        Duration::from_secs(30),
        || Ok(tried(&b, 1)),
    )
    .with_context(|| b.log_text())?;
    assert_eq!(event_attempts(&b), (0, 1), "{}", b.log_text());
    assert_eq!(rejected_events(&api)?.len(), 1);

    // A new version, rejected too: one more Event, again one for the cluster.
    let worse = bad.replace("v9", "v8");
    api.kubectl(&[&patch[..], &[worse.as_str()]].concat())?;
    wait_until(
        "Event attempts on the new version",
        Duration::from_secs(30),
        || Ok(tried(&a, 2) && tried(&b, 2)),
    )
    .with_context(|| format!("{}\n{}", a.log_text(), b.log_text()))?;
    let events = rejected_events(&api)?;
    assert_eq!(events.len(), 2, "{events:#?}");
    Ok(())
}

/// The `kubernetes` Service's VIP (first address of the test server's service
/// range), which in-cluster clients dial.
const KUBERNETES_VIP: &str = "10.96.0.1:443";

/// The `kubernetes` EndpointSlice the API server's reconciler would write:
/// `api` when given, none when emptied.
fn kubernetes_slice(api: Option<std::net::SocketAddr>) -> String {
    let mut s = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: kubernetes\n  namespace: default\n  labels:\n    kubernetes.io/service-name: kubernetes\naddressType: IPv4\n",
    );
    match api {
        Some(api) => {
            s += &format!(
                "ports:\n  - name: https\n    port: {}\n    protocol: TCP\nendpoints:\n  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n",
                api.port(),
                api.ip()
            );
        }
        None => s += "ports: []\nendpoints: []\n",
    }
    s
}

/// `curl https://<kubernetes VIP>/version` from inside the meshed cgroup:
/// whether the API server answered (curl's exit 7 is a refused connect).
fn api_answers_through_the_mesh(cgroup: &Cgroup) -> anyhow::Result<bool> {
    let url = format!("https://{KUBERNETES_VIP}/version");
    let out = mesh_tools::run_in_cgroup("curl", cgroup, &["-sk", "--max-time", "5", &url])?;
    let body = String::from_utf8_lossy(&out.stdout);
    Ok(out.status.success() && body.contains("gitVersion"))
}

#[test]
fn the_agent_reaches_the_api_server_around_its_own_data_plane() -> anyhow::Result<()> {
    mesh_tools::require_root();
    let api = ApiServer::start()?;
    api.install_mesh_crds()?;
    let server = api.server_addr()?;
    // kube-proxy's route for the VIP, which the agent's own connects take.
    let vip: std::net::SocketAddr = KUBERNETES_VIP.parse()?;
    let _kube_proxy = mesh_tools::kube_proxy::ServiceDnat::tcp(vip, server)?;
    api.apply(&kubernetes_slice(Some(server)))?;
    // The agent dials the VIP, as in a pod, and is a pod of the meshed
    // hierarchy (its own cgroup below the meshed one, as the clients are).
    let kubeconfig = api.kubeconfig_via(vip)?;
    let cgroup = Cgroup::create(&mesh_tools::unique("mesh-test-"))?;
    let agent_cgroup = cgroup.child("agent")?;
    let mut agent =
        Agent::spawn_kubernetes_meshed(&kubeconfig, cgroup.path(), agent_cgroup.path(), "node-a")?;
    agent.wait_applied(1, Duration::from_secs(60))?;
    assert_eq!(
        agent
            .records("the agent's own connects bypass the mesh")
            .len(),
        1,
        "{}",
        agent.log_text()
    );
    wait_until(
        "the API server through the mesh",
        Duration::from_secs(30),
        || api_answers_through_the_mesh(&cgroup),
    )?;

    // The slice emptied (a botched edit, a control-plane migration): the mesh
    // refuses the VIP to everyone it meshes...
    api.replace(&kubernetes_slice(None))?;
    wait_until("the VIP refused", Duration::from_secs(30), || {
        Ok(!api_answers_through_the_mesh(&cgroup)?)
    })
    .with_context(|| agent.cli(&["dump"]).unwrap_or_default())?;
    // ... and an agent that restarts now must still list, or it never sees
    // the repair.
    agent.kill()?;
    agent.respawn(&[])?;
    agent
        .wait_applied(1, Duration::from_secs(60))
        .context("the restarted agent never reached the API server")?;
    api.replace(&kubernetes_slice(Some(server)))?;
    wait_until(
        "the repaired slice applied",
        Duration::from_secs(30),
        || api_answers_through_the_mesh(&cgroup),
    )
    .with_context(|| agent.log_text())?;
    // The kernel counted the agent's connects as left alone.
    agent.stop()?;
    let counters = agent.records("connect counters");
    let bypassed = counters.first().and_then(|r| r["agent_bypassed"].as_u64());
    assert!(bypassed.is_some_and(|n| n > 0), "{counters:?}");
    Ok(())
}

#[test]
fn a_server_serving_only_v1beta1_endpoint_slices_is_followed() -> anyhow::Result<()> {
    mesh_tools::require_root();
    // As a 1.20 cluster: its controller writes discovery.k8s.io/v1beta1 only.
    let api = ApiServer::start_serving_v1beta1_slices()?;
    api.kubectl(&["label", "namespace", "default", "istio-injection=enabled"])?;
    api.install_istio_crds()?;
    let (node, _backends, mut pods) = topology_with(&api, true, Some(endpoint_slice_v1beta1))?;
    let cgroup = Cgroup::create(&mesh_tools::unique("mesh-test-"))?;
    let mut agent = Agent::start_kubernetes(&api.kubeconfig, cgroup.path())?;
    let watching = agent.records("watching discovery.k8s.io");
    assert_eq!(
        watching
            .iter()
            .find(|r| r["kind"] == "EndpointSlice")
            .and_then(|r| r["version"].as_str()),
        Some("v1beta1"),
        "{}",
        agent.log_text()
    );
    let probe = |what: &str| -> anyhow::Result<probe::Summary> {
        let s = probe::probe(&node.pod("client").ns, Some(&cgroup), &vip4(), N, 4)?;
        assert_eq!(s.failed(), 0, "{what}: {s:?}");
        Ok(s)
    };
    let s = probe("80/20")?;
    assert_share(s.share(V2), 0.20, N, "80/20 over v1beta1 slices");

    // A v1beta1 update (a v1 pod not ready) is followed too.
    if let Some(v1) = pods.iter_mut().find(|p| p.0 == V1[0]) {
        v1.2 = false;
    }
    let next = agent.generation() + 1;
    api.replace(&endpoint_slice_v1beta1(&pods))?;
    agent.wait_applied(next, Duration::from_secs(20))?;
    let s = probe("a v1 pod not ready")?;
    assert_eq!(s.backends.get(V1[0]), None, "{s:?}");
    assert_share(s.share(V2), 0.20, N, "v2 keeps 20%");
    Ok(())
}

/// A client pod of node-a in `namespace`, as the kubelet would run it: a Pod
/// object (the API server assigns its uid and QoS class, BestEffort), its
/// cgroup where the cgroupfs driver puts it below the pods' root `kubepods`,
/// its own network namespace (`host`: its address on the node), a sandbox
/// process holding that namespace, and kube-proxy's rule there for the VIP
/// (to `kube_proxy_to`): what the mesh leaves alone lands there.
struct ClientPod {
    cgroup: Cgroup,
    _qos: Cgroup,
    _sandbox: std::process::Child,
}

fn client_pod(
    api: &ApiServer,
    node: &mut Node,
    kubepods: &Cgroup,
    namespace: &str,
    host: u8,
    kube_proxy_to: IpAddr,
) -> anyhow::Result<ClientPod> {
    api.apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: client, namespace: {namespace}}}\nspec:\n  nodeName: node-a\n  containers: [{{name: client, image: client}}]\n"
    ))?;
    let uid = api.kubectl(&[
        "get",
        "pod",
        "client",
        "-n",
        namespace,
        "-o",
        "jsonpath={.metadata.uid}",
    ])?;
    let qos = kubepods.child(&format!("besteffort-{namespace}"))?;
    let cgroup = qos.child(&format!("pod{}", uid.trim()))?;
    let ns = &node.add_pod(&format!("client-{namespace}"), host)?.ns;
    // The service range routed to the pod network, as a cluster routes it.
    ns.ip(&["route", "add", "10.96.0.0/16", "dev", "eth0"])?;
    ns.exec(
        "iptables",
        &[
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            VIP4,
            "--dport",
            "5000",
            "-j",
            "DNAT",
            "--to-destination",
            &format!("{kube_proxy_to}:5000"),
        ],
    )?;
    let sandbox = mesh_tools::spawn_in_pod(
        std::path::Path::new("/bin/sleep"),
        ns,
        Some(&cgroup),
        &["600"],
    )?;
    Ok(ClientPod {
        cgroup,
        _qos: qos,
        _sandbox: sandbox,
    })
}

#[test]
fn only_pods_of_labelled_namespaces_are_meshed() -> anyhow::Result<()> {
    mesh_tools::require_root();
    let api = ApiServer::start()?;
    api.install_mesh_crds()?;
    let (mut node, _backends, pods) = topology(&api, true)?;
    api.kubectl(&["create", "namespace", "plain"])?;
    let kubepods = Cgroup::create(&mesh_tools::unique("mesh-test-"))?;
    let v1_0 = pods.iter().find(|p| p.0 == V1[0]).context("no v1 pod")?.1;
    let meshed = client_pod(&api, &mut node, &kubepods, "default", 3, v1_0)?;
    let plain = client_pod(&api, &mut node, &kubepods, "plain", 4, v1_0)?;
    let agent = Agent::start_kubernetes_flags(
        &api.kubeconfig,
        kubepods.path(),
        &["--mesh-scope", "pods", "--node-name", "node-a"],
    )?;
    let probe = |namespace: &str, pod: &ClientPod| {
        let ns = &node.pod(&format!("client-{namespace}")).ns;
        probe::probe(ns, Some(&pod.cgroup), &vip4(), N, 4)
    };
    let pods_meshed = |n: usize| -> anyhow::Result<()> {
        wait_until("the pods meshed", Duration::from_secs(10), || {
            Ok(agent
                .cli(&["status"])?
                .contains(&format!("{n} meshed, 0 waiting")))
        })
        .with_context(|| agent.log_text())
    };
    pods_meshed(1)?;

    // The same-node shortcut takes a socket only in the mesh: (added, left alone).
    let sockets = || -> anyhow::Result<(u64, u64)> {
        Ok((
            agent.metric("mesh_redirect_sockets_added_total")?,
            agent.metric("mesh_redirect_not_meshed_sockets_total")?,
        ))
    };
    let s = probe("default", &meshed)?;
    assert_eq!(s.failed(), 0, "{s:?}");
    assert_share(s.share(V2), 0.20, N, "a pod of a labelled namespace: 80/20");
    let (added, left) = sockets()?;
    assert!(added >= N && left == 0, "{added} added, {left} left alone");
    let s = probe("plain", &plain)?;
    assert_eq!(s.failed(), 0, "{s:?}");
    assert_eq!(
        s.backends.keys().collect::<Vec<_>>(),
        [V1[0]],
        "a pod of an unlabelled namespace keeps kube-proxy's choice: {s:?}"
    );
    let (added_after, left) = sockets()?;
    assert!(
        added_after == added && left >= N,
        "{added_after} added, {left} left alone"
    );

    // Labelling its namespace meshes it, without restarting anything.
    api.kubectl(&["label", "namespace", "plain", "istio-injection=enabled"])?;
    pods_meshed(2)?;
    let s = probe("plain", &plain)?;
    assert_eq!(s.failed(), 0, "{s:?}");
    assert_share(s.share(V2), 0.20, N, "labelled: 80/20");
    let (added_labelled, _) = sockets()?;
    assert!(added_labelled >= added + N, "{added_labelled} added");
    Ok(())
}

#[test]
fn a_server_without_endpoint_slices_is_read_through_endpoints() -> anyhow::Result<()> {
    mesh_tools::require_root();
    // Neither discovery.k8s.io version served (no v1 CRD, v1beta1 off): the
    // endpoints controller's core Endpoints are all there is.
    let api = ApiServer::start()?;
    api.kubectl(&["label", "namespace", "default", "istio-injection=enabled"])?;
    api.install_istio_crds()?;
    let (node, _backends, _pods) = topology_with(&api, true, None)?;
    let cgroup = Cgroup::create(&mesh_tools::unique("mesh-test-"))?;
    let agent = Agent::start_kubernetes(&api.kubeconfig, cgroup.path())?;
    assert!(
        agent
            .messages("WARN")
            .iter()
            .any(|m| m.contains("reading core Endpoints")),
        "{}",
        agent.log_text()
    );
    let s = probe::probe(&node.pod("client").ns, Some(&cgroup), &vip4(), N, 4)?;
    assert_eq!(s.failed(), 0, "{s:?}");
    assert_share(s.share(V2), 0.20, N, "80/20 over Endpoints");
    Ok(())
}
