//! End to end against a real kube-apiserver: the example applied with kubectl,
//! endpoints created as the endpointslice controller would, the agent following the
//! API server (`--source kubernetes`), and real connections through the kernel.

mod common;

use std::{net::IpAddr, time::Duration};

use common::{V1, V2, assert_share, vip4};
use mesh_tests::{
    agent::Agent, apiserver::ApiServer, backend::Backend, cgroup::Cgroup, netns::Node, probe,
};

const N: u64 = 2000;
const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

fn endpoint_slice(pods: &[(String, IpAddr, bool)]) -> String {
    let mut s = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: flaskapp-abcde\n  namespace: default\n  labels:\n    kubernetes.io/service-name: flaskapp\naddressType: IPv4\nports:\n  - name: http\n    port: 5000\n    protocol: TCP\nendpoints:\n",
    );
    for (name, ip, ready) in pods {
        s += &format!(
            "  - addresses: [\"{ip}\"]\n    conditions: {{ready: {ready}}}\n    targetRef: {{kind: Pod, name: {name}, namespace: default}}\n"
        );
    }
    s
}

fn pod(name: &str, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: flaskapp, version: {version}}}\nspec:\n  containers: [{{name: flaskapp, image: istio/examples-flaskapp, ports: [{{name: http, containerPort: 5000}}]}}]\n"
    )
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
        mesh_tests::require_root();
        let api = ApiServer::start()?;
        for crd in [
            "manifests/crds/virtualservices.yaml",
            "manifests/crds/destinationrules.yaml",
            "tests/fixtures/endpointslice-v1-crd.yaml",
        ] {
            api.kubectl(&["apply", "-f", &format!("{ROOT}/{crd}")])?;
        }
        api.kubectl(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd",
            "--all",
        ])?;
        api.kubectl(&["label", "namespace", "default", "istio-injection=enabled"])?;
        let mut node = Node::new()?;
        node.add_pod("client", 2)?;
        let mut backends = Vec::new();
        let mut pods = Vec::new();
        for (i, name) in V1.iter().chain([&V2]).enumerate() {
            let version = if name.contains("v2") { "v2" } else { "v1" };
            let p = node.add_pod(name, 11 + i as u8)?;
            backends.push(Backend::spawn(&p.ns, name, version, 5000)?);
            api.apply(&pod(name, version))?;
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
        let cgroup = Cgroup::create(&mesh_tests::unique("mesh-test-"))?;
        let agent = Agent::start_kubernetes(&api.kubeconfig, cgroup.path())?;
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

    let patch = r#"{"spec":{"http":[{"route":[{"destination":{"host":"flaskapp","subset":"v1"},"weight":50},{"destination":{"host":"flaskapp","subset":"v2"},"weight":50}]}]}}"#;
    c.change(&[
        "patch",
        "virtualservice",
        "flaskapp",
        "--type",
        "merge",
        "-p",
        patch,
    ])?;
    let s = c.probe()?;
    assert_share(s.share(V2), 0.50, N, "after kubectl patch 50/50");

    // A bad edit is refused; traffic stays on the last good weights.
    let bad = r#"{"spec":{"http":[{"route":[{"destination":{"host":"flaskapp","subset":"v1"},"weight":50},{"destination":{"host":"flaskapp","subset":"v9"},"weight":50}]}]}}"#;
    c.change(&[
        "patch",
        "virtualservice",
        "flaskapp",
        "--type",
        "merge",
        "-p",
        bad,
    ])?;
    assert!(
        c.agent
            .messages("ERROR")
            .iter()
            .any(|e| e.contains("VirtualService default/flaskapp") && e.contains("subset"))
    );
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
