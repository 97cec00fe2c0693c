//! The endpoints of one Service port that a client on this node reaches,
//! chosen as kube-proxy chooses them (k8s.io/kubernetes pkg/proxy/topology.go,
//! `CategorizeEndpoints`): from the Service's EndpointSlices when it has any,
//! else from the Pods its selector matches, described as the EndpointSlice
//! controller would describe them (a folder of manifests has no controller).
//! [`select`] is the rule itself, a pure function over those [`Candidate`]s.

#[cfg(test)]
mod tests;

use std::{collections::HashMap, net::IpAddr};

use k8s_openapi::{api::core::v1::ServicePort, apimachinery::pkg::util::intstr::IntOrString};

use crate::{
    index::Index,
    model::{
        Diagnostic, Kind, NamespacedName, ObjectRef, node,
        pod::Pod,
        service::{InternalTrafficPolicy, Service, TrafficDistribution, TrafficPolicy},
    },
};

pub use crate::model::slice::{Conditions, SERVICE_NAME_LABEL};

/// One endpoint of a Service port a client may be sent to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// The pod behind it, if known: its name and labels (for subsets).
    pub pod: Option<std::sync::Arc<str>>,
    pub labels: crate::model::pod::Labels,
    /// Its node, and the zone its EndpointSlice gives (locality load
    /// balancing reads the node's labels first).
    pub node: Option<std::sync::Arc<str>>,
    pub zone: Option<String>,
}

/// One endpoint before selection: what kube-proxy's rules read of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub endpoint: Endpoint,
    pub conditions: Conditions,
    /// `nodeName`.
    pub node: Option<std::sync::Arc<str>>,
    /// `hints.forZones[].name`; empty: no zone hint.
    pub zone_hints: Vec<String>,
    /// `hints.forNodes[].name`; empty: no node hint.
    pub node_hints: Vec<String>,
}

/// Where the connecting client is: this agent's node, and that node's zone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Here<'a> {
    pub node: Option<&'a str>,
    pub zone: Option<&'a str>,
}

impl<'a> Here<'a> {
    /// `node`, and its zone from the Node of that name in the index.
    pub fn of(index: &'a Index, node: Option<&'a str>) -> Self {
        let zone = node
            .and_then(|n| index.node(n))
            .and_then(|e| node::zone(&e.object));
        Self { node, zone }
    }
}

/// What kube-proxy would have done that this agent cannot; every endpoint is
/// used instead (a bigger set, never a wrong empty one).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, thiserror::Error)]
pub enum Unhonoured {
    #[error(
        "Local needs this node's name (--node-name or NODE_NAME), which the agent was not given: every endpoint is used, as with Cluster"
    )]
    LocalWithoutNode,
    #[error(
        "its endpoints carry topology hints, but the agent was not given this node's name (--node-name or NODE_NAME): every endpoint is used"
    )]
    HintsWithoutNode,
    #[error(
        "its endpoints carry zone hints, but this node's zone is unknown (no Node {node} with label {label}): every endpoint is used",
        label = node::ZONE_LABEL
    )]
    ZoneUnknown { node: String },
    #[error(
        "the zone of {} is unknown (no Node of that name with label {label}): its pods get no zone hint, so every endpoint is used",
        .node.as_ref().map_or("a pod without spec.nodeName".to_owned(), |n| format!("node {n}")),
        label = node::ZONE_LABEL
    )]
    PodZoneUnknown { node: Option<String> },
}

impl Unhonoured {
    /// The field of `service` this is about.
    fn field(&self, service: &Service) -> &'static str {
        match self {
            Unhonoured::LocalWithoutNode => "spec.internalTrafficPolicy",
            _ if service.traffic_distribution_set => "spec.trafficDistribution",
            // Hints asked for the older way, or left by the controller.
            _ => "metadata.annotations[service.kubernetes.io/topology-mode]",
        }
    }
}

/// The endpoints a client here reaches, and what could not be honoured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selection {
    pub endpoints: Vec<Endpoint>,
    pub unhonoured: Vec<Unhonoured>,
}

/// Which endpoints topology hints leave (kube-proxy's topology mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology<'a> {
    All,
    SameNode(&'a str),
    SameZone(&'a str),
}

/// kube-proxy's rule for a client on this node. `Local`: the ready endpoints
/// on this node, else those serving while terminating there; none: empty,
/// and the connect is refused. `Cluster`: the ready endpoints the hints leave
/// for this node or its zone (all of them unless every ready endpoint has a
/// hint and one names us), else every serving and terminating endpoint.
pub fn select(
    candidates: &[Candidate],
    policy: InternalTrafficPolicy,
    here: Here<'_>,
) -> Selection {
    let mut unhonoured = Vec::new();
    let pick = |keep: &dyn Fn(&Candidate) -> bool| -> Vec<Endpoint> {
        candidates
            .iter()
            .filter(|c| keep(c))
            .map(|c| c.endpoint.clone())
            .collect()
    };
    let local = match (policy, here.node) {
        (InternalTrafficPolicy::Local, Some(node)) => Some(node),
        (InternalTrafficPolicy::Local, None) => {
            unhonoured.push(Unhonoured::LocalWithoutNode);
            None
        }
        (InternalTrafficPolicy::Cluster, _) => None,
    };
    let mut endpoints = if let Some(node) = local {
        let on_node = |c: &Candidate| c.node.as_deref() == Some(node);
        let ready = pick(&|c| on_node(c) && c.conditions.ready);
        if ready.is_empty() {
            pick(&|c| on_node(c) && c.conditions.draining())
        } else {
            ready
        }
    } else {
        let topology = topology(candidates, here, &mut unhonoured);
        let ready = pick(&|c| {
            c.conditions.ready
                && match topology {
                    Topology::All => true,
                    Topology::SameNode(n) => c.node_hints.iter().any(|h| h == n),
                    Topology::SameZone(z) => c.zone_hints.iter().any(|h| h == z),
                }
        });
        // Hints never leave nothing while something is ready (topology()
        // checked), so an empty list means nothing is ready anywhere.
        if ready.is_empty() {
            pick(&|c| c.conditions.draining())
        } else {
            ready
        }
    };
    endpoints.sort();
    endpoints.dedup_by(|a, b| a.ip == b.ip && a.port == b.port);
    Selection {
        endpoints,
        unhonoured,
    }
}

/// kube-proxy's `topologyModeFromHints`: hints count only when every ready
/// endpoint has one (node hints first, then zone hints) and some endpoint is
/// hinted for us; else every endpoint.
fn topology<'a>(
    candidates: &[Candidate],
    here: Here<'a>,
    unhonoured: &mut Vec<Unhonoured>,
) -> Topology<'a> {
    let ready: Vec<&Candidate> = candidates.iter().filter(|c| c.conditions.ready).collect();
    if ready.is_empty() {
        return Topology::All;
    }
    let node_hinted = ready.iter().all(|c| !c.node_hints.is_empty());
    let zone_hinted = ready.iter().all(|c| !c.zone_hints.is_empty());
    let Some(node) = here.node else {
        if node_hinted || zone_hinted {
            unhonoured.push(Unhonoured::HintsWithoutNode);
        }
        return Topology::All;
    };
    if node_hinted && ready.iter().any(|c| c.node_hints.iter().any(|h| h == node)) {
        return Topology::SameNode(node);
    }
    if zone_hinted {
        match here.zone {
            Some(zone) if ready.iter().any(|c| c.zone_hints.iter().any(|h| h == zone)) => {
                return Topology::SameZone(zone);
            }
            // This zone has no endpoint: every endpoint, as kube-proxy.
            Some(_) => {}
            None => unhonoured.push(Unhonoured::ZoneUnknown {
                node: node.to_owned(),
            }),
        }
    }
    Topology::All
}

fn protocol(p: Option<&String>) -> &str {
    p.map_or("TCP", String::as_str)
}

/// The index with the lookup Services without slices need: Pods by label,
/// built on first use in a compile (scanning every pod for each Service is
/// quadratic: 10 s at 10 000 Services). A Service's slices the index keeps.
#[derive(Debug)]
pub struct Lookup<'a> {
    pub index: &'a Index,
    pods_by_label: std::cell::OnceCell<HashMap<LabelKey<'a>, Vec<&'a Pod>>>,
}

/// (namespace, label key, label value).
type LabelKey<'a> = (&'a str, &'a str, &'a str);

impl<'a> Lookup<'a> {
    pub fn new(index: &'a Index) -> Self {
        Self {
            index,
            pods_by_label: std::cell::OnceCell::new(),
        }
    }

    fn pods_by_label(&self) -> &HashMap<LabelKey<'a>, Vec<&'a Pod>> {
        self.pods_by_label.get_or_init(|| {
            let mut pods_by_label: HashMap<_, Vec<_>> = HashMap::new();
            for (key, e) in &self.index.pods {
                for (k, v) in e.object.labels.iter() {
                    pods_by_label
                        .entry((&*key.namespace, k.as_str(), v.as_str()))
                        .or_default()
                        .push(&*e.object);
                }
            }
            pods_by_label
        })
    }
}

/// The endpoints of `port` of the Service `name` a client `here` reaches,
/// sorted: the candidates `keep` accepts (a subset's labels), then
/// [`select`]. What cannot be honoured is reported on the Service.
pub fn reachable(
    lookup: &Lookup<'_>,
    name: &NamespacedName,
    service: &Service,
    port: &ServicePort,
    here: Here<'_>,
    keep: impl Fn(&Endpoint) -> bool,
    diags: &mut Vec<Diagnostic>,
) -> Vec<Endpoint> {
    let (policy, errors) = TrafficPolicy::of(service);
    let mut unhonoured = Vec::new();
    let mut candidates = candidates(lookup, name, service, port, policy, &mut unhonoured);
    candidates.retain(|c| keep(&c.endpoint));
    let selection = select(&candidates, policy.internal, here);
    unhonoured.extend(selection.unhonoured);
    if errors.is_empty() && unhonoured.is_empty() {
        return selection.endpoints;
    }
    let me = ObjectRef::new(Kind::Service, name.clone());
    let origin = lookup.index.services.get(name).map_or("", |e| &*e.origin);
    let said = errors
        .iter()
        .map(|e| (e.field(), e.to_string()))
        .chain(unhonoured.iter().map(|u| (u.field(service), u.to_string())));
    for (field, message) in said {
        diags.push(Diagnostic::warning(&me, field, message).with_origin(origin));
    }
    selection.endpoints
}

/// Every endpoint of the Service port, whatever its conditions: from its
/// EndpointSlices, else from its Pods.
fn candidates(
    lookup: &Lookup<'_>,
    name: &NamespacedName,
    service: &Service,
    port: &ServicePort,
    policy: TrafficPolicy,
    unhonoured: &mut Vec<Unhonoured>,
) -> Vec<Candidate> {
    let index = lookup.index;
    let namespace = &*name.namespace;
    let mut slices = index.slices_of(name).map(|e| &e.object).peekable();
    if slices.peek().is_none() {
        return from_pods(lookup, namespace, service, port, policy, unhonoured);
    }
    let mut out = Vec::new();
    for slice in slices {
        let want_name = port.name.as_deref().unwrap_or("");
        // The controller resolves a named targetPort per pod and puts pods
        // that resolve it alike in one slice: each slice has its own port.
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| &*p.name == want_name && &*p.protocol == protocol(port.protocol.as_ref()))
        else {
            continue;
        };
        let Some(target) = slice_port.port else {
            continue;
        };
        for ep in &slice.endpoints {
            let pod = ep.pod_name(namespace);
            let labels = pod
                .as_ref()
                .and_then(|k| index.pods.get(k))
                .map(|p| p.object.labels.clone())
                .unwrap_or_default();
            let node = ep.node.clone();
            let zone_hints: Vec<String> = ep.zone_hints().iter().map(|z| z.to_string()).collect();
            let node_hints: Vec<String> = ep.node_hints().iter().map(|n| n.to_string()).collect();
            for ip in ep.addresses() {
                out.push(Candidate {
                    endpoint: Endpoint {
                        ip,
                        port: target,
                        pod: pod.as_ref().map(|p| p.name.clone()),
                        labels: labels.clone(),
                        node: node.clone(),
                        zone: ep.zone().map(str::to_owned),
                    },
                    conditions: ep.conditions,
                    node: node.clone(),
                    zone_hints: zone_hints.clone(),
                    node_hints: node_hints.clone(),
                });
            }
        }
    }
    out
}

/// The Pods the selector matches, as the EndpointSlice controller describes
/// them: every pod with an address that has not finished (terminating ones
/// too); serving when Ready, terminating when deleted, ready when serving and
/// not terminating, or always with `publishNotReadyAddresses`; hinted for its
/// node's zone (and node) when `trafficDistribution` asks for it.
fn from_pods(
    lookup: &Lookup<'_>,
    namespace: &str,
    service: &Service,
    port: &ServicePort,
    policy: TrafficPolicy,
    unhonoured: &mut Vec<Unhonoured>,
) -> Vec<Candidate> {
    let Some(selector) = crate::model::service::selector(service) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // Candidates: the pods with the selector's first label; then all of it.
    let Some((k, v)) = selector.iter().next() else {
        return out;
    };
    let candidates = lookup
        .pods_by_label()
        .get(&(namespace, k.as_str(), v.as_str()))
        .map(Vec::as_slice)
        .unwrap_or_default();
    for &pod in candidates {
        let labels = pod.labels.clone();
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) || pod.finished {
            continue;
        }
        let Some(target) = target_port(pod, port) else {
            continue;
        };
        let serving = pod.ready;
        let terminating = pod.terminating;
        let conditions = Conditions {
            ready: policy.publish_not_ready || (serving && !terminating),
            serving,
            terminating,
        };
        let node = pod.node.clone();
        let (mut zone_hints, mut node_hints) = (Vec::new(), Vec::new());
        // The controller hints ready endpoints only.
        if let Some(distribution) = policy.distribution.filter(|_| conditions.ready) {
            let zone = node
                .as_deref()
                .and_then(|n| lookup.index.node(n))
                .and_then(|e| node::zone(&e.object));
            match zone {
                Some(zone) => zone_hints.push(zone.to_owned()),
                None => unhonoured.push(Unhonoured::PodZoneUnknown {
                    node: node.as_deref().map(str::to_owned),
                }),
            }
            if distribution == TrafficDistribution::PreferSameNode {
                node_hints.extend(node.as_deref().map(str::to_owned));
            }
        }
        for &ip in &pod.ips {
            out.push(Candidate {
                endpoint: Endpoint {
                    ip,
                    port: target,
                    pod: Some(pod.name.name.clone()),
                    labels: labels.clone(),
                    node: node.clone(),
                    zone: None,
                },
                conditions,
                node: node.clone(),
                zone_hints: zone_hints.clone(),
                node_hints: node_hints.clone(),
            });
        }
    }
    out
}

/// Parses a list of addresses and the primary one (Kubernetes keeps both: the
/// plural field for dual-stack, the singular for compatibility), without repeats;
/// unparsable entries are skipped.
pub fn parse_ips<'a>(all: impl Iterator<Item = &'a str>, primary: Option<&str>) -> Vec<IpAddr> {
    let mut ips: Vec<IpAddr> = all.filter_map(|ip| ip.parse().ok()).collect();
    if let Some(ip) = primary.and_then(|ip| ip.parse().ok())
        && !ips.contains(&ip)
    {
        ips.push(ip);
    }
    ips
}

/// A Service port's target on this pod: a number, a named container port, or the
/// service port itself when unset.
fn target_port(pod: &Pod, port: &ServicePort) -> Option<u16> {
    match &port.target_port {
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        Some(IntOrString::String(name)) => pod
            .ports
            .iter()
            .find(|p| &*p.name == name.as_str() && &*p.protocol == protocol(port.protocol.as_ref()))
            .map(|p| p.port),
    }
}
