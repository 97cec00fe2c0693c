//! The soak's cluster, as `tests/tests/kubernetes.rs` builds it: a real
//! kube-apiserver with the CRDs and the flaskapp example applied, a client pod
//! and five flaskapp pods (three v1, two v2) as network namespaces with backends
//! that listen for the whole run, their Pods running and ready (pods/status), an
//! EndpointSlice written as the controller would, and the agent on
//! `--source kubernetes`. Dropping it removes everything, in reverse order.

use std::{net::IpAddr, time::Instant};

use mesh_tools::{
    agent::Agent, apiserver::ApiServer, backend::Backend, cgroup::Cgroup, netns::Node,
};

pub const HOST: &str = "flaskapp";
/// What `apiserver::endpoint_slice` names the Service's slice.
pub const SLICE: &str = "flaskapp-abcde";
pub const VIP: &str = "10.96.0.80:5000";
pub const TARGET_PORT: u16 = 5000;
/// The pods' `app` label, which the example Service selects (the seed's).
const APP: &str = "business";
/// (pod, version, host number).
pub const PODS: [(&str, &str, u8); 5] = [
    ("flaskapp-v1-0", "v1", 11),
    ("flaskapp-v1-1", "v1", 12),
    ("flaskapp-v1-2", "v1", 13),
    ("flaskapp-v2-0", "v2", 21),
    ("flaskapp-v2-1", "v2", 22),
];
const EXAMPLE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../manifests/examples/flaskapp"
);

/// A backend pod, as the churn sees it.
#[derive(Clone, Debug)]
pub struct PodInfo {
    pub name: String,
    pub version: String,
    pub ip: IpAddr,
}

// Field order is drop order: the agent detaches first, then the backends stop,
// the cgroup (and the storm client in it) goes, the namespaces, the API server.
#[derive(Debug)]
pub struct Cluster {
    pub agent: Agent,
    pub backends: Vec<Backend>,
    pub cgroup: Cgroup,
    pub node: Node,
    pub api: ApiServer,
    pub pods: Vec<PodInfo>,
}

impl Cluster {
    pub fn start() -> anyhow::Result<Self> {
        let started = Instant::now();
        println!(
            "== Setting up: a kube-apiserver (etcd, controller manager), the CRDs, the flaskapp example"
        );
        // The script picks free ports by looking, so a server started elsewhere
        // at the same moment can take one first: try again.
        let api = ApiServer::start()
            .or_else(|_| ApiServer::start())
            .or_else(|_| ApiServer::start())?;
        api.install_mesh_crds()?;
        for file in [
            "service.yaml",
            "destinationrule.yaml",
            "virtualservice.yaml",
        ] {
            api.kubectl(&["apply", "-f", &format!("{EXAMPLE}/{file}")])?;
        }
        println!(
            "== A client pod and {} flaskapp pods (network namespaces), ready",
            PODS.len()
        );
        let mut node = Node::new()?;
        node.add_pod("client", 2)?;
        let (mut backends, mut pods) = (Vec::new(), Vec::new());
        for (name, version, host) in PODS {
            let pod = node.add_pod(name, host)?;
            backends.push(Backend::spawn(&pod.ns, name, version, TARGET_PORT)?);
            api.running_pod(name, APP, version, pod.ipv4)?;
            println!("   pod {name:<14} version {version}  {}", pod.ipv4);
            pods.push(PodInfo {
                name: name.to_owned(),
                version: version.to_owned(),
                ip: pod.ipv4,
            });
        }
        let endpoints: Vec<(String, IpAddr, bool)> =
            pods.iter().map(|p| (p.name.clone(), p.ip, true)).collect();
        api.apply(&mesh_tools::apiserver::endpoint_slice(
            HOST,
            TARGET_PORT,
            &endpoints,
        ))?;
        let cgroup = Cgroup::create(&mesh_tools::unique("mesh-soak-"))?;
        println!(
            "== mesh-agent run --source kubernetes --cgroup {}",
            cgroup.path().display()
        );
        let agent = Agent::start_kubernetes(&api.kubeconfig, cgroup.path())?;
        println!("   set up in {:.1} s", started.elapsed().as_secs_f64());
        Ok(Cluster {
            agent,
            backends,
            cgroup,
            node,
            api,
            pods,
        })
    }

    /// Connections each backend accepted (its own count).
    pub fn accepted(&self) -> Vec<u64> {
        self.backends.iter().map(Backend::served).collect()
    }
}
