//! The soak's own client of the test API server: what the kubelet (pods/status),
//! the endpointslice controller (EndpointSlices) and a user (the VirtualService)
//! would write, each a merge patch, and the final configuration read back.
//! Blocking calls on a runtime of its own; every call gives up after 5 s, so an
//! API server that is away costs a churn step, never the run.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::{IpAddr, SocketAddr},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::verify::Config;

const TIMEOUT: Duration = Duration::from_secs(5);
const NAMESPACE: &str = "default";

pub struct ApiClient {
    runtime: tokio::runtime::Runtime,
    pods: Api<Pod>,
    services: Api<Service>,
    slices: Api<EndpointSlice>,
    virtual_services: Api<DynamicObject>,
}

impl std::fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiClient").finish_non_exhaustive()
    }
}

impl ApiClient {
    pub fn connect(kubeconfig: &Path) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let client = runtime.block_on(async {
            let file = kube::config::Kubeconfig::read_from(kubeconfig)?;
            let config = kube::Config::from_custom_kubeconfig(file, &Default::default()).await?;
            anyhow::Ok(Client::try_from(config)?)
        })?;
        let vs = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("networking.istio.io", "v1", "VirtualService"),
            "virtualservices",
        );
        Ok(ApiClient {
            runtime,
            pods: Api::namespaced(client.clone(), NAMESPACE),
            services: Api::namespaced(client.clone(), NAMESPACE),
            slices: Api::namespaced(client.clone(), NAMESPACE),
            virtual_services: Api::namespaced_with(client, NAMESPACE, &vs),
        })
    }

    fn call<T>(&self, f: impl Future<Output = Result<T, kube::Error>>) -> anyhow::Result<T> {
        let out = self
            .runtime
            .block_on(async { tokio::time::timeout(TIMEOUT, f).await })
            .context("no answer within 5 s")?;
        Ok(out?)
    }

    /// The pod's Ready condition, as its kubelet reports it.
    pub fn set_pod_ready(&self, pod: &str, ready: bool) -> anyhow::Result<()> {
        let status = if ready { "True" } else { "False" };
        let patch = json!({"status": {"conditions": [{"type": "Ready", "status": status}]}});
        self.call(
            self.pods
                .patch_status(pod, &PatchParams::default(), &Patch::Merge(&patch)),
        )?;
        Ok(())
    }

    /// The slice's endpoints, whole (a merge patch replaces the list), as the
    /// endpointslice controller writes them: (pod, address, ready).
    pub fn set_endpoints(
        &self,
        slice: &str,
        endpoints: &[(&str, IpAddr, bool)],
    ) -> anyhow::Result<()> {
        let endpoints: Vec<_> = endpoints
            .iter()
            .map(|(pod, ip, ready)| {
                json!({
                    "addresses": [ip.to_string()],
                    "conditions": {"ready": ready},
                    "targetRef": {"kind": "Pod", "name": pod, "namespace": NAMESPACE},
                })
            })
            .collect();
        let patch = json!({ "endpoints": endpoints });
        self.call(
            self.slices
                .patch(slice, &PatchParams::default(), &Patch::Merge(&patch)),
        )?;
        Ok(())
    }

    /// The VirtualService `host`'s single route: these subsets at these weights.
    pub fn set_weights(&self, host: &str, weights: &[(&str, u64)]) -> anyhow::Result<()> {
        let route: Vec<_> = weights
            .iter()
            .map(|(subset, weight)| {
                json!({"destination": {"host": host, "subset": subset}, "weight": weight})
            })
            .collect();
        let patch = json!({"spec": {"http": [{"route": route}]}});
        self.call(self.virtual_services.patch(
            host,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        ))?;
        Ok(())
    }

    /// The configuration of `host` as the API server holds it now.
    pub fn config(&self, host: &str, slice: &str) -> anyhow::Result<Config> {
        let vs = self.call(self.virtual_services.get(host))?;
        let weights = vs.data["spec"]["http"][0]["route"]
            .as_array()
            .context("the VirtualService has no route")?
            .iter()
            .map(|d| {
                let subset = d["destination"]["subset"].as_str().context("subset")?;
                Ok((subset.to_owned(), d["weight"].as_u64().context("weight")?))
            })
            .collect::<anyhow::Result<_>>()?;
        let slice = self.call(self.slices.get(slice))?;
        let endpoints = slice
            .endpoints
            .iter()
            .flatten()
            .map(|e| {
                let pod = e.target_ref.as_ref().and_then(|r| r.name.clone());
                let ip = e
                    .addresses
                    .first()
                    .context("an endpoint without an address")?;
                // Kubernetes reads an unknown readiness as ready.
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                Ok((pod.unwrap_or_default(), ip.parse()?, ready))
            })
            .collect::<anyhow::Result<_>>()?;
        let versions = self
            .call(self.pods.list(&ListParams::default()))?
            .into_iter()
            .filter_map(|p| {
                let version = p.metadata.labels?.get("version")?.clone();
                Some((p.metadata.name?, version))
            })
            .collect::<BTreeMap<_, _>>();
        let mut services = BTreeSet::new();
        for s in self.call(self.services.list(&ListParams::default()))? {
            let spec = s.spec.unwrap_or_default();
            // Headless Services ("None") have no VIP.
            for ip in spec
                .cluster_ips
                .iter()
                .flatten()
                .filter_map(|ip| ip.parse().ok())
            {
                for port in spec.ports.iter().flatten() {
                    services.insert(SocketAddr::new(ip, u16::try_from(port.port)?));
                }
            }
        }
        Ok(Config {
            weights,
            endpoints,
            versions,
            services,
        })
    }
}
