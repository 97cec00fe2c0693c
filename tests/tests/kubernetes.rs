//! End to end against a real kube-apiserver: the example applied with kubectl,
//! endpoints created as the endpointslice controller would, the agent following the
//! API server (`--source kubernetes`), and real connections through the kernel.

mod common;

use std::{net::IpAddr, time::Duration};

use common::{V1, V2, assert_share, vip4};
use mesh_tools::{
    agent::Agent, apiserver::ApiServer, backend::Backend, cgroup::Cgroup, netns::Node, probe,
};

const N: u64 = 2000;
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn endpoint_slice(pods: &[(String, IpAddr, bool)]) -> String {
    mesh_tools::apiserver::endpoint_slice("flaskapp", 5000, pods)
}

struct Cluster {
    agent: Agent,
    _backends: Vec<Backend>,
    cgroup: Cgroup,
    node: Node,
    api: ApiServer,
    pods: Vec<(String, IpAddr, bool)>,
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
        let mut node = Node::new()?;
        node.add_pod("client", 2)?;
        let mut backends = Vec::new();
        let mut pods = Vec::new();
        for (i, name) in V1.iter().chain([&V2]).enumerate() {
            let version = if name.contains("v2") { "v2" } else { "v1" };
            let p = node.add_pod(name, 11 + i as u8)?;
            backends.push(Backend::spawn(&p.ns, name, version, 5000)?);
            api.running_pod(name, "flaskapp", version, p.ipv4)?;
            pods.push((name.to_string(), p.ipv4, true));
        }
        let example = format!("{ROOT}/manifests/examples/flaskapp");
        for file in [
            "service.yaml",
            "destinationrule.yaml",
            "virtualservice.yaml",
        ] {
            api.kubectl(&["apply", "-f", &format!("{example}/{file}")])?;
        }
        api.apply(&endpoint_slice(&pods))?;
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
    let token = api.kubectl(&["create", "token", "mesh-agent", "-n", "mesh-system"])?;
    let path = api.dir.join("mesh-agent.kubeconfig");
    std::fs::copy(&api.kubeconfig, &path)?;
    let kc = path.display().to_string();
    api.kubectl(&[
        "--kubeconfig",
        &kc,
        "config",
        "set-credentials",
        "mesh-agent",
        &format!("--token={}", token.trim()),
    ])?;
    api.kubectl(&[
        "--kubeconfig",
        &kc,
        "config",
        "set-context",
        "--current",
        "--user=mesh-agent",
    ])?;
    Ok(path)
}

#[test]
fn manifests_pass_server_dry_run_and_the_agent_works_with_its_least_privilege_account()
-> anyhow::Result<()> {
    let c = Cluster::start_as(service_account_kubeconfig)?;
    // Every manifest we ship is accepted by a real API server.
    for dir in [
        "manifests/crds",
        "manifests/deploy",
        "manifests/uninstall",
        "manifests/examples/flaskapp",
    ] {
        c.api
            .kubectl(&["apply", "--dry-run=server", "-f", &format!("{ROOT}/{dir}")])?;
    }
    // The cluster example names the same Service as the file-source one (which
    // this cluster holds, with a fixed clusterIP): check it in a namespace of its own.
    c.api.kubectl(&["create", "namespace", "dryrun"])?;
    let example = std::fs::read_to_string(format!(
        "{ROOT}/manifests/examples/kubernetes/flaskapp.yaml"
    ))?;
    let example = example.replace("namespace: default", "namespace: dryrun");
    c.api
        .kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], Some(&example))?;
    // The agent, with only its ServiceAccount's rights, follows the cluster.
    let s = c.probe()?;
    assert_eq!(s.failed(), 0, "{s:?}\n{}", c.agent.log_text());
    assert_share(s.share(V2), 0.20, N, "80/20 with the ServiceAccount token");
    // ... and those rights do not reach further than reading.
    let kc = c
        .api
        .dir
        .join("mesh-agent.kubeconfig")
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
        can("create", "events"),
        "the agent's account must record events"
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
