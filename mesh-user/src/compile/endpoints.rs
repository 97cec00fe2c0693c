//! The ready endpoints of one Service port: from its EndpointSlices when it has any
//! (as kube-proxy does), else from the ready Pods its selector matches (for a
//! folder of manifests with no endpoints controller behind it).

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use k8s_openapi::{
    api::{
        core::v1::{Pod, Service, ServicePort},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::{index::Index, model::NamespacedName};

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One ready endpoint of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: IpAddr,
    pub port: u16,
    /// The pod behind it, if known: its name and labels (for subsets).
    pub pod: Option<String>,
    pub labels: BTreeMap<String, String>,
}

fn protocol(p: Option<&String>) -> &str {
    p.map_or("TCP", String::as_str)
}

/// The index with the two lookups every Service needs, built once per compile:
/// EndpointSlices by Service, Pods by label. (Scanning every slice and pod for
/// each Service is quadratic: 10 s at 10 000 Services.)
#[derive(Debug)]
pub struct Lookup<'a> {
    pub index: &'a Index,
    slices: HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    pods_by_label: HashMap<LabelKey<'a>, Vec<(&'a str, &'a Pod)>>,
}

/// (namespace, label key, label value).
type LabelKey<'a> = (&'a str, &'a str, &'a str);

impl<'a> Lookup<'a> {
    pub fn new(index: &'a Index) -> Self {
        let mut slices: HashMap<_, Vec<_>> = HashMap::new();
        for (key, e) in &index.endpoint_slices {
            if let Some(service) = e
                .object
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
            {
                slices
                    .entry((key.namespace.as_str(), service.as_str()))
                    .or_default()
                    .push(&e.object);
            }
        }
        let mut pods_by_label: HashMap<_, Vec<_>> = HashMap::new();
        for (key, e) in &index.pods {
            for (k, v) in e.object.metadata.labels.iter().flatten() {
                pods_by_label
                    .entry((key.namespace.as_str(), k.as_str(), v.as_str()))
                    .or_default()
                    .push((key.name.as_str(), &e.object));
            }
        }
        Self {
            index,
            slices,
            pods_by_label,
        }
    }
}

/// The ready endpoints of `port` of the Service `name`, sorted.
pub fn ready_endpoints(
    lookup: &Lookup<'_>,
    name: &NamespacedName,
    service: &Service,
    port: &ServicePort,
) -> Vec<Endpoint> {
    let index = lookup.index;
    let namespace = name.namespace.as_str();
    let slices = lookup
        .slices
        .get(&(namespace, name.name.as_str()))
        .map(Vec::as_slice)
        .unwrap_or_default();
    let mut out = if slices.is_empty() {
        from_pods(lookup, namespace, service, port)
    } else {
        let mut out = Vec::new();
        for slice in slices {
            let want_name = port.name.as_deref().unwrap_or("");
            let Some(slice_port) = slice.ports.iter().flatten().find(|p| {
                p.name.as_deref().unwrap_or("") == want_name
                    && protocol(p.protocol.as_ref()) == protocol(port.protocol.as_ref())
            }) else {
                continue;
            };
            let Some(target) = slice_port.port.and_then(|p| u16::try_from(p).ok()) else {
                continue;
            };
            for ep in slice.endpoints.iter().flatten() {
                let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
                if !ready {
                    continue;
                }
                let pod = ep
                    .target_ref
                    .as_ref()
                    .filter(|r| r.kind.as_deref() == Some("Pod"))
                    .and_then(|r| {
                        let ns = r.namespace.as_deref().unwrap_or(namespace);
                        Some(NamespacedName::new(ns, r.name.as_deref()?))
                    });
                let labels = pod
                    .as_ref()
                    .and_then(|k| index.pods.get(k))
                    .and_then(|p| p.object.metadata.labels.clone())
                    .unwrap_or_default();
                for address in &ep.addresses {
                    if let Ok(ip) = address.parse::<IpAddr>() {
                        out.push(Endpoint {
                            ip,
                            port: target,
                            pod: pod.as_ref().map(|p| p.name.clone()),
                            labels: labels.clone(),
                        });
                    }
                }
            }
        }
        out
    };
    out.sort();
    out.dedup_by(|a, b| a.ip == b.ip && a.port == b.port);
    out
}

fn from_pods(
    lookup: &Lookup<'_>,
    namespace: &str,
    service: &Service,
    port: &ServicePort,
) -> Vec<Endpoint> {
    let Some(selector) = service
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // Candidates: the pods with the selector's first label; then all of it.
    let Some((k, v)) = selector.iter().next() else {
        return out;
    };
    let candidates = lookup
        .pods_by_label
        .get(&(namespace, k.as_str(), v.as_str()))
        .map(Vec::as_slice)
        .unwrap_or_default();
    for &(name, pod) in candidates {
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        if !selector.iter().all(|(k, v)| labels.get(k) == Some(v)) || !is_ready(pod) {
            continue;
        }
        let Some(target) = target_port(pod, port) else {
            continue;
        };
        for ip in pod_ips(pod) {
            out.push(Endpoint {
                ip,
                port: target,
                pod: Some(name.to_owned()),
                labels: labels.clone(),
            });
        }
    }
    out
}

/// Ready condition true, and not being deleted.
pub fn is_ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    parse_ips(
        status.pod_ips.iter().flatten().map(|p| p.ip.as_str()),
        status.pod_ip.as_deref(),
    )
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
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| {
                p.name.as_deref() == Some(name.as_str())
                    && protocol(p.protocol.as_ref()) == protocol(port.protocol.as_ref())
            })
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}
