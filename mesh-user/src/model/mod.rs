//! The objects the agent reads, whatever the source: Kubernetes core types from
//! k8s-openapi, the Istio networking types we honour ([`istio`]), the names that
//! identify them, and the diagnostics said about them. Every later stage speaks
//! these types; nothing here does I/O.

pub mod convert;
pub mod diag;
pub mod endpoints;
pub mod host;
pub mod istio;
pub mod node;
pub mod pod;
pub mod service;
pub mod slice;

use std::{
    collections::HashSet,
    fmt,
    str::FromStr,
    sync::{Arc, LazyLock, Mutex, PoisonError},
};

use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::ObjectMeta};

pub use diag::{Diagnostic, Severity};
pub use host::Fqdn;
pub use istio::{DestinationRule, Gateway, VirtualService};

/// One object of a kind we watch, shared (a source that keeps what it read,
/// as the file source does, shares it with the index).
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    /// What the agent reads of it ([`service::Service`]).
    Service(Arc<service::Service>),
    /// What the agent reads of it ([`pod::Pod`]).
    Pod(Arc<pod::Pod>),
    /// What the agent reads of it ([`slice::EndpointSlice`]).
    EndpointSlice(Arc<slice::EndpointSlice>),
    VirtualService(Arc<VirtualService>),
    DestinationRule(Arc<DestinationRule>),
    Gateway(Arc<Gateway>),
    /// Trimmed to name and labels ([`node::trim`]): heartbeats change nothing.
    Node(Arc<Node>),
}

/// The kinds we watch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    Pod,
    EndpointSlice,
    VirtualService,
    DestinationRule,
    Gateway,
    Node,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Service,
        Kind::Pod,
        Kind::EndpointSlice,
        Kind::VirtualService,
        Kind::DestinationRule,
        Kind::Gateway,
        Kind::Node,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::VirtualService => "VirtualService",
            Kind::DestinationRule => "DestinationRule",
            Kind::Gateway => "Gateway",
            Kind::Node => "Node",
        }
    }

    /// Whether objects of this kind live in a namespace (a Node does not).
    pub fn is_namespaced(self) -> bool {
        self != Kind::Node
    }

    /// The kind named by a manifest's `apiVersion` and `kind`, if it is one we read.
    /// Istio's networking API is served as v1, v1beta1 and v1alpha3; all are the same
    /// schema for the fields we use.
    pub fn from_manifest(api_version: &str, kind: &str) -> Option<Kind> {
        let group = api_version.rsplit_once('/').map_or("", |(group, _)| group);
        match (group, kind) {
            ("", "Service") => Some(Kind::Service),
            ("", "Pod") => Some(Kind::Pod),
            ("", "Node") => Some(Kind::Node),
            ("discovery.k8s.io", "EndpointSlice") => Some(Kind::EndpointSlice),
            (istio::GROUP, "VirtualService") => Some(Kind::VirtualService),
            (istio::GROUP, "DestinationRule") => Some(Kind::DestinationRule),
            (istio::GROUP, "Gateway") => Some(Kind::Gateway),
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Namespace objects without one land in, as `kubectl apply` would put them.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `namespace/name`: names an object within its kind. Serialised as that string.
#[derive(
    Clone,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(into = "String", try_from = "String")]
pub struct NamespacedName {
    /// Shared (`Arc`), as is `name`: every map of the index and the compiler is
    /// keyed by names, and a clone then costs two counts instead of two strings
    /// (at 100 000 Pods, ~100 bytes a Pod).
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl NamespacedName {
    pub fn new(namespace: impl Into<Arc<str>>, name: impl Into<Arc<str>>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The object `meta` describes; no namespace means `default`, as kubectl does.
    /// The namespace is [`shared_name`]'s: the sources convert every object
    /// through here.
    pub fn from_meta(meta: &ObjectMeta) -> Self {
        Self::new(
            shared_name(meta.namespace.as_deref().unwrap_or(DEFAULT_NAMESPACE)),
            meta.name.as_deref().unwrap_or_default(),
        )
    }
}

/// One string per namespace or node name for every object converted: a cluster
/// has a few namespaces and nodes and 100 000 Pods and endpoints, each of which
/// would otherwise keep its own copy (32 bytes with the allocator's).
pub fn shared_name(name: &str) -> Arc<str> {
    static NAMES: LazyLock<Mutex<Interner>> = LazyLock::new(Mutex::default);
    // A panic elsewhere while holding it leaves the set whole: take it anyway.
    NAMES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(name)
}

/// Strings handed out once each. Those nobody else holds any more are dropped
/// whenever the set has doubled since the last sweep, so it stays within
/// about twice the strings in use, whatever a source sends.
#[derive(Debug, Default)]
struct Interner {
    names: HashSet<Arc<str>>,
    swept_at: usize,
}

impl Interner {
    fn get(&mut self, name: &str) -> Arc<str> {
        if let Some(name) = self.names.get(name) {
            return name.clone();
        }
        if self.names.len() >= 2 * self.swept_at.max(32) {
            self.names.retain(|n| Arc::strong_count(n) > 1);
            self.swept_at = self.names.len();
        }
        let name: Arc<str> = name.into();
        self.names.insert(name.clone());
        name
    }
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not namespace/name")]
pub struct NamespacedNameError(String);

impl FromStr for NamespacedName {
    type Err = NamespacedNameError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((namespace, name)) if !name.contains('/') => Ok(Self::new(namespace, name)),
            _ => Err(NamespacedNameError(s.to_owned())),
        }
    }
}

impl From<NamespacedName> for String {
    fn from(n: NamespacedName) -> String {
        n.to_string()
    }
}

impl TryFrom<String> for NamespacedName {
    type Error = NamespacedNameError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// Names one object: kind, namespace, name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    pub kind: Kind,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectRef {
    pub fn new(kind: Kind, name: NamespacedName) -> Self {
        ObjectRef {
            kind,
            namespace: name.namespace,
            name: name.name,
        }
    }

    /// The object `meta` describes; no namespace means `default`, as kubectl
    /// does, and a cluster-scoped kind has none (empty).
    pub fn from_meta(kind: Kind, meta: &ObjectMeta) -> Self {
        if kind.is_namespaced() {
            Self::new(kind, NamespacedName::from_meta(meta))
        } else {
            Self::new(
                kind,
                NamespacedName::new("", meta.name.as_deref().unwrap_or_default()),
            )
        }
    }

    pub fn namespaced_name(&self) -> NamespacedName {
        NamespacedName::new(self.namespace.clone(), self.name.clone())
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() && !self.kind.is_namespaced() {
            return write!(f, "{} {}", self.kind, self.name);
        }
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self {
            Resource::Service(_) => Kind::Service,
            Resource::Pod(_) => Kind::Pod,
            Resource::EndpointSlice(_) => Kind::EndpointSlice,
            Resource::VirtualService(_) => Kind::VirtualService,
            Resource::DestinationRule(_) => Kind::DestinationRule,
            Resource::Gateway(_) => Kind::Gateway,
            Resource::Node(_) => Kind::Node,
        }
    }

    pub fn object_ref(&self) -> ObjectRef {
        let meta = match self {
            Resource::Service(o) => return ObjectRef::new(Kind::Service, o.name.clone()),
            Resource::Pod(o) => return ObjectRef::new(Kind::Pod, o.name.clone()),
            Resource::EndpointSlice(o) => {
                return ObjectRef::new(Kind::EndpointSlice, o.name.clone());
            }
            Resource::VirtualService(o) => &o.metadata,
            Resource::DestinationRule(o) => &o.metadata,
            Resource::Gateway(o) => &o.metadata,
            Resource::Node(o) => &o.metadata,
        };
        ObjectRef::from_meta(self.kind(), meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_shared_and_the_unused_ones_dropped() {
        let meta = |ns: &str, name: &str| ObjectMeta {
            namespace: Some(ns.into()),
            name: Some(name.into()),
            ..ObjectMeta::default()
        };
        let (a, b) = (
            NamespacedName::from_meta(&meta("shop", "a")),
            NamespacedName::from_meta(&meta("shop", "b")),
        );
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));

        let mut interner = Interner::default();
        let kept: Vec<_> = (0..40)
            .map(|i| interner.get(&format!("kept-{i}")))
            .collect();
        for i in 0..100_000 {
            drop(interner.get(&format!("gone-{i}")));
        }
        assert!(
            interner.names.len() <= 2 * 2 * kept.len(),
            "{}",
            interner.names.len()
        );
        for (i, name) in kept.iter().enumerate() {
            assert!(Arc::ptr_eq(name, &interner.get(&format!("kept-{i}"))));
        }
    }

    #[test]
    fn namespaced_names_round_trip_as_strings() {
        let n = NamespacedName::new("prod", "web");
        assert_eq!(n.to_string(), "prod/web");
        assert_eq!("prod/web".parse::<NamespacedName>().ok(), Some(n.clone()));
        let json = serde_json::to_string(&n).unwrap_or_default();
        assert_eq!(json, "\"prod/web\"");
        assert!("web".parse::<NamespacedName>().is_err());
        assert!("a/b/c".parse::<NamespacedName>().is_err());
    }
}
