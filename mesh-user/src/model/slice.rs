//! What the agent reads of an EndpointSlice: a projection made at every
//! source's boundary (issue 15). An endpoint of the API's type is ~350 bytes
//! before its strings; here it is its addresses, conditions, pod, node, zone
//! and hints. The API's defaults are applied once, here.

use std::{net::IpAddr, sync::Arc};

use k8s_openapi::api::discovery::v1;

use super::NamespacedName;

/// The label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label the EndpointSlice controller marks its slices with, and its value.
const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const CONTROLLER: &str = "endpointslice-controller.k8s.io";

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointSlice {
    pub name: NamespacedName,
    /// [`SERVICE_NAME_LABEL`]: the Service it belongs to.
    pub service: Option<Box<str>>,
    /// Made by the EndpointSlice controller (from its Service's selector).
    pub managed: bool,
    pub ports: Box<[Port]>,
    pub endpoints: Box<[Endpoint]>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Port {
    /// Empty when unnamed.
    pub name: Box<str>,
    /// `TCP` unless set.
    pub protocol: Box<str>,
    /// `None`: unset or out of range (no port for this slice).
    pub port: Option<u16>,
}

/// One endpoint, ~80 bytes: what most have inline, the rest boxed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The first address (an endpoint without one that parses is left out).
    pub address: IpAddr,
    pub conditions: Conditions,
    /// `targetRef` when it names a Pod.
    pub pod: Option<Box<str>>,
    /// `nodeName`.
    /// Shared by every endpoint and pod of the node ([`super::shared_name`]).
    pub node: Option<Arc<str>>,
    /// What few endpoints have.
    pub more: Option<Box<More>>,
}

/// The rarer parts of an endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct More {
    /// Its other addresses (the API allows up to 100).
    pub addresses: Box<[IpAddr]>,
    /// The pod's namespace, when not the slice's.
    pub pod_namespace: Option<Box<str>>,
    pub zone: Option<Box<str>>,
    /// `hints.forZones[].name`, `hints.forNodes[].name`.
    pub zone_hints: Box<[Box<str>]>,
    pub node_hints: Box<[Box<str>]>,
}

/// An endpoint's conditions, unset ones read as the API defines them (ready
/// and serving true, terminating false), as kube-proxy reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conditions {
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

impl Conditions {
    pub const READY: Self = Self {
        ready: true,
        serving: true,
        terminating: false,
    };

    /// kube-proxy's fallback when nothing is ready: still serving while it
    /// terminates (graceful termination).
    pub fn draining(self) -> bool {
        self.serving && self.terminating
    }
}

impl EndpointSlice {
    /// The Service it belongs to.
    pub fn service_name(&self) -> Option<NamespacedName> {
        let service = self.service.as_deref()?;
        Some(NamespacedName::new(self.name.namespace.clone(), service))
    }
}

impl Endpoint {
    /// The pod behind it, in the slice's namespace unless it says another.
    pub fn pod_name(&self, namespace: &str) -> Option<NamespacedName> {
        let name = self.pod.as_deref()?;
        let ns = self.more.as_ref().and_then(|m| m.pod_namespace.as_deref());
        Some(NamespacedName::new(ns.unwrap_or(namespace), name))
    }

    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let more = self.more.iter().flat_map(|m| m.addresses.iter().copied());
        std::iter::once(self.address).chain(more)
    }

    pub fn zone(&self) -> Option<&str> {
        self.more.as_ref()?.zone.as_deref()
    }

    pub fn zone_hints(&self) -> &[Box<str>] {
        self.more.as_ref().map_or(&[], |m| &m.zone_hints)
    }

    pub fn node_hints(&self) -> &[Box<str>] {
        self.more.as_ref().map_or(&[], |m| &m.node_hints)
    }
}

fn boxed(v: Option<Vec<String>>) -> Box<[Box<str>]> {
    v.into_iter()
        .flatten()
        .map(String::into_boxed_str)
        .collect()
}

impl From<v1::EndpointSlice> for EndpointSlice {
    fn from(slice: v1::EndpointSlice) -> Self {
        let meta = slice.metadata;
        let name = NamespacedName::from_meta(&meta);
        let labels = meta.labels.unwrap_or_default();
        let endpoints = slice
            .endpoints
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let c = e.conditions.unwrap_or_default();
                let hints = e.hints.unwrap_or_default();
                let (pod_namespace, pod) =
                    match e.target_ref.filter(|r| r.kind.as_deref() == Some("Pod")) {
                        Some(r) => (
                            r.namespace
                                .filter(|ns| **ns != *name.namespace)
                                .map(String::into_boxed_str),
                            r.name.map(String::into_boxed_str),
                        ),
                        None => (None, None),
                    };
                let mut addresses = e.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok());
                let address = addresses.next()?;
                let more = More {
                    addresses: addresses.collect(),
                    pod_namespace,
                    zone: e.zone.map(String::into_boxed_str),
                    zone_hints: boxed(
                        hints
                            .for_zones
                            .map(|z| z.into_iter().map(|z| z.name).collect()),
                    ),
                    node_hints: boxed(
                        hints
                            .for_nodes
                            .map(|n| n.into_iter().map(|n| n.name).collect()),
                    ),
                };
                Some(Endpoint {
                    address,
                    conditions: Conditions {
                        ready: c.ready.unwrap_or(true),
                        serving: c.serving.unwrap_or(true),
                        terminating: c.terminating.unwrap_or(false),
                    },
                    pod,
                    node: e.node_name.as_deref().map(super::shared_name),
                    more: (more != More::default()).then(|| Box::new(more)),
                })
            })
            .collect();
        EndpointSlice {
            service: labels
                .get(SERVICE_NAME_LABEL)
                .map(|s| s.clone().into_boxed_str()),
            managed: labels.get(MANAGED_BY).is_some_and(|m| m == CONTROLLER),
            name,
            ports: slice
                .ports
                .into_iter()
                .flatten()
                .map(|p| Port {
                    name: p.name.unwrap_or_default().into_boxed_str(),
                    protocol: p.protocol.as_deref().unwrap_or("TCP").into(),
                    port: p.port.and_then(|p| u16::try_from(p).ok()),
                })
                .collect(),
            endpoints,
        }
    }
}
