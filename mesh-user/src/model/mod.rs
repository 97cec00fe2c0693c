//! The objects the agent reads, whatever the source: Kubernetes core types from
//! k8s-openapi, and the Istio networking types we honour (see [`istio`]).

pub mod istio;

use std::fmt;

use k8s_openapi::api::{core::v1::Pod, core::v1::Service, discovery::v1::EndpointSlice};

pub use istio::{DestinationRule, VirtualService};

/// One object of a kind we watch.
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    Service(Box<Service>),
    Pod(Box<Pod>),
    EndpointSlice(Box<EndpointSlice>),
    VirtualService(Box<VirtualService>),
    DestinationRule(Box<DestinationRule>),
}

/// The kinds we watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    Pod,
    EndpointSlice,
    VirtualService,
    DestinationRule,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
        }
    }

    /// The kind named by a manifest's `apiVersion` and `kind`, if it is one we read.
    /// Istio's networking API is served as v1, v1beta1 and v1alpha3; all are the same
    /// schema for the fields we use.
    pub fn from_manifest(api_version: &str, kind: &str) -> Option<Kind> {
        let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
        match (group, kind) {
            ("", "Service") => Some(Kind::Service),
            ("", "Pod") => Some(Kind::Pod),
            ("discovery.k8s.io", "EndpointSlice") => Some(Kind::EndpointSlice),
            ("networking.istio.io", "VirtualService") => Some(Kind::VirtualService),
            ("networking.istio.io", "DestinationRule") => Some(Kind::DestinationRule),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Names one object: kind, namespace, name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl ObjectRef {
    /// The object `meta` describes; no namespace means `default`, as kubectl does.
    pub fn from_meta(
        kind: Kind,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> Self {
        ObjectRef {
            kind,
            namespace: meta
                .namespace
                .clone()
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// Namespace objects without one land in, as `kubectl apply` would put them.
pub const DEFAULT_NAMESPACE: &str = "default";

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Service(_) => Kind::Service,
            Resource::Pod(_) => Kind::Pod,
            Resource::EndpointSlice(_) => Kind::EndpointSlice,
            Resource::VirtualService(_) => Kind::VirtualService,
            Resource::DestinationRule(_) => Kind::DestinationRule,
        }
    }

    fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            Resource::Service(o) => &o.metadata,
            Resource::Pod(o) => &o.metadata,
            Resource::EndpointSlice(o) => &o.metadata,
            Resource::VirtualService(o) => &o.metadata,
            Resource::DestinationRule(o) => &o.metadata,
        }
    }

    pub fn object_ref(&self) -> ObjectRef {
        ObjectRef::from_meta(self.kind(), self.metadata())
    }
}
