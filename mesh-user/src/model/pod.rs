//! What the agent reads of a Pod: a projection made at every source's
//! boundary (issue 15). A Pod object is ~2.5 KB before its strings (its spec
//! alone ~1.5 KB); the agent reads its labels, where it runs, whether it is
//! ready or finished, its addresses, its named container ports and two
//! annotations. At 100 000 pods that is the difference between hundreds of
//! MiB and a few tens.

use std::{
    collections::{BTreeMap, HashSet},
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
/// pods do), see [`crate::index::Index`].
pub type Labels = Arc<BTreeMap<String, String>>;

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
    pub node: Option<Box<str>>,
    pub host_network: bool,
    /// `status.phase` is Succeeded or Failed: its containers will not run again.
    pub finished: bool,
    /// Its `Ready` condition is `True`.
    pub ready: bool,
    /// `status.podIPs`, and `status.podIP` (the first of them, kept for
    /// compatibility), without repeats; unparsable ones skipped.
    pub ips: Box<[IpAddr]>,
    /// Its containers' named ports, for a Service's named `targetPort`.
    pub ports: Box<[NamedPort]>,
}

/// Label sets, each once: a ReplicaSet's pods have the same, and one
/// `BTreeMap` of a few labels costs more than the rest of a pod.
#[derive(Clone, Debug, Default)]
pub struct LabelSets(HashSet<Labels>);

impl LabelSets {
    /// `pod` with the label set an earlier pod had, if one had the same (a
    /// pod no one else holds is changed in place).
    pub fn share(&mut self, mut pod: Arc<Pod>) -> Arc<Pod> {
        match self.0.get(&pod.labels) {
            Some(shared) if !Arc::ptr_eq(shared, &pod.labels) => {
                Arc::make_mut(&mut pod).labels = shared.clone();
            }
            Some(_) => {}
            None => {
                self.0.insert(pod.labels.clone());
            }
        }
        pod
    }

    /// Drops `labels` if no one but the caller and this set holds it.
    pub fn forget(&mut self, labels: &Labels) {
        if Arc::strong_count(labels) <= 2 {
            self.0.remove(labels);
        }
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq)]
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
}

impl From<v1::Pod> for Pod {
    fn from(pod: v1::Pod) -> Self {
        let meta = pod.metadata;
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
            name: NamespacedName::new(
                meta.namespace
                    .as_deref()
                    .unwrap_or(super::DEFAULT_NAMESPACE),
                meta.name.as_deref().unwrap_or_default(),
            ),
            uid: meta
                .uid
                .filter(|u| !u.is_empty())
                .map(String::into_boxed_str),
            labels: Arc::new(meta.labels.unwrap_or_default()),
            annotations,
            terminating: meta.deletion_timestamp.is_some(),
            node: spec.node_name.map(String::into_boxed_str),
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
