//! What the agent reads of a Pod: a projection made at every source's
//! boundary (issue 15). A Pod object is ~2.5 KB before its strings (its spec
//! alone ~1.5 KB); the agent reads its labels, where it runs, whether it is
//! ready or finished, its addresses, its named container ports and two
//! annotations. At 100 000 pods that is the difference between hundreds of
//! MiB and a few tens.

use std::{
    collections::{BTreeMap, HashSet},
    hash::Hash,
    net::IpAddr,
    sync::Arc,
};

use k8s_openapi::api::core::v1;

use super::NamespacedName;

/// Istio's per-pod opt-out, as a label (current) or an annotation (older).
pub const INJECT: &str = "sidecar.istio.io/inject";
/// Istio's inbound exclusion, which the same-node redirect honours too.
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";

/// A pod's labels: shared by the pods that have the same (a ReplicaSet's
/// pods do), see [`PodShapes`].
pub type Labels = Arc<BTreeMap<String, String>>;

/// A pod's named container ports: shared like its labels.
pub type Ports = Arc<[NamedPort]>;

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    pub name: NamespacedName,
    /// `metadata.uid`: names its cgroup.
    pub uid: Option<Box<str>>,
    pub labels: Labels,
    /// The annotations the agent reads ([`INJECT`], [`EXCLUDE_INBOUND_PORTS`]).
    pub annotations: Box<[(Box<str>, Box<str>)]>,
    /// `metadata.deletionTimestamp` is set.
    pub terminating: bool,
    /// `spec.nodeName`.
    /// Shared by every pod and endpoint of the node ([`super::shared_name`]).
    pub node: Option<Arc<str>>,
    pub host_network: bool,
    /// `status.phase` is Succeeded or Failed: its containers will not run again.
    pub finished: bool,
    /// Its `Ready` condition is `True`.
    pub ready: bool,
    /// `status.podIPs`, and `status.podIP` (the first of them, kept for
    /// compatibility), without repeats; unparsable ones skipped.
    pub ips: Box<[IpAddr]>,
    /// Its containers' named ports, for a Service's named `targetPort`.
    pub ports: Ports,
}

/// What the pods of one template have alike, each once: their label sets and
/// their named ports. A ReplicaSet's pods have the same; one `BTreeMap` of a
/// few labels costs more than the rest of a pod, a list of ports with its
/// strings ~110 bytes.
#[derive(Clone, Debug, Default)]
pub struct PodShapes {
    labels: HashSet<Labels>,
    ports: HashSet<Ports>,
}

impl PodShapes {
    /// `pod` with the labels and ports an earlier pod had, where one had the
    /// same. A pod someone else holds too (the file source keeps what it
    /// read) stays as it is: sharing would copy it whole.
    pub fn share(&mut self, mut pod: Arc<Pod>) -> Arc<Pod> {
        let labels = shared(&mut self.labels, &pod.labels);
        let ports = shared(&mut self.ports, &pod.ports);
        if let Some(pod) = Arc::get_mut(&mut pod) {
            if let Some(labels) = labels {
                pod.labels = labels;
            }
            if let Some(ports) = ports {
                pod.ports = ports;
            }
        }
        pod
    }

    /// Drops what `pod` shares if no one but the caller (holding `pod`) and
    /// this set holds it.
    pub fn forget(&mut self, pod: &Pod) {
        forget(&mut self.labels, &pod.labels);
        forget(&mut self.ports, &pod.ports);
    }

    /// How many label sets and lists of ports are kept.
    pub fn len(&self) -> (usize, usize) {
        (self.labels.len(), self.ports.len())
    }
}

/// Drops `value` from `set` if it is the very one kept (an equal one that
/// was not shared is not) and only the caller holds it besides.
fn forget<T: Hash + Eq + ?Sized>(set: &mut HashSet<Arc<T>>, value: &Arc<T>) {
    if Arc::strong_count(value) <= 2 && set.get(value).is_some_and(|k| Arc::ptr_eq(k, value)) {
        set.remove(value);
    }
}

/// The one of `set` equal to `value`, if that is not `value` itself; else
/// `None`, `value` joining the set if it was not there.
fn shared<T: Hash + Eq + ?Sized>(set: &mut HashSet<Arc<T>>, value: &Arc<T>) -> Option<Arc<T>> {
    match set.get(value) {
        Some(kept) if !Arc::ptr_eq(kept, value) => Some(kept.clone()),
        Some(_) => None,
        None => {
            set.insert(value.clone());
            None
        }
    }
}

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NamedPort {
    pub name: Box<str>,
    /// `TCP` unless set.
    pub protocol: Box<str>,
    pub port: u16,
}

impl Pod {
    /// One of the annotations the agent reads.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations
            .iter()
            .find(|(k, _)| &**k == key)
            .map(|(_, v)| &**v)
    }

    /// What the agent of node `node` needs of it: the uid names a cgroup on
    /// the pod's own node only (~50 bytes a pod of every other node).
    #[must_use]
    pub fn trimmed_for(mut self, node: &str) -> Self {
        if self.node.as_deref() != Some(node) {
            self.uid = None;
        }
        self
    }
}

impl From<v1::Pod> for Pod {
    fn from(pod: v1::Pod) -> Self {
        let meta = pod.metadata;
        let name = NamespacedName::from_meta(&meta);
        let spec = pod.spec.unwrap_or_default();
        let status = pod.status.unwrap_or_default();
        let annotations = meta
            .annotations
            .into_iter()
            .flatten()
            .filter(|(k, _)| k == INJECT || k == EXCLUDE_INBOUND_PORTS)
            .map(|(k, v)| (k.into_boxed_str(), v.into_boxed_str()))
            .collect();
        let ports = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                Some(NamedPort {
                    name: p.name.clone()?.into_boxed_str(),
                    protocol: p.protocol.as_deref().unwrap_or("TCP").into(),
                    port: u16::try_from(p.container_port).ok()?,
                })
            })
            .collect();
        Pod {
            name,
            uid: meta
                .uid
                .filter(|u| !u.is_empty())
                .map(String::into_boxed_str),
            labels: Arc::new(meta.labels.unwrap_or_default()),
            annotations,
            terminating: meta.deletion_timestamp.is_some(),
            node: spec.node_name.as_deref().map(super::shared_name),
            host_network: spec.host_network == Some(true),
            finished: matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")),
            ready: status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            ips: crate::compile::endpoints::parse_ips(
                status.pod_ips.iter().flatten().map(|p| p.ip.as_str()),
                status.pod_ip.as_deref(),
            )
            .into(),
            ports,
        }
    }
}
