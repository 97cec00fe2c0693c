//! The in-memory index of everything the sources have told us: one entry per
//! object, with `apply` and `delete` per resource. Sources convert at their boundary
//! and call these; nothing here does I/O.
//!
//! VirtualServices and DestinationRules are *validated* before use, in the context
//! of the rest of the index: the index keeps the latest version the source gave and
//! the last version that was accepted. A bad new version is rejected and the last
//! good one keeps routing, as an admission webhook would have left the cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{Pod, Service},
    discovery::v1::EndpointSlice,
};

use crate::{
    diag::Diagnostic,
    model::{DestinationRule, Kind, ObjectRef, Resource, VirtualService},
    validate,
};

/// `namespace/name`.
pub type NsName = (String, String);

/// An object and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry<T> {
    pub origin: String,
    pub object: T,
}

/// A validated kind: the latest version, and the one in use.
#[derive(Clone, Debug)]
struct Validated<T> {
    latest: Entry<T>,
    accepted: Option<Entry<T>>,
    /// Why `latest` is not accepted (empty when it is).
    rejection: Vec<Diagnostic>,
}

#[derive(Clone, Debug, Default)]
pub struct Index {
    pub services: BTreeMap<NsName, Entry<Service>>,
    pub pods: BTreeMap<NsName, Entry<Pod>>,
    pub endpoint_slices: BTreeMap<NsName, Entry<EndpointSlice>>,
    virtual_services: BTreeMap<NsName, Validated<VirtualService>>,
    destination_rules: BTreeMap<NsName, Validated<DestinationRule>>,
    /// Namespaces whose Services are meshed; `None`: all (the file source).
    pub mesh_namespaces: Option<std::collections::BTreeSet<String>>,
}

fn key(object: &ObjectRef) -> NsName {
    (object.namespace.clone(), object.name.clone())
}

impl Index {
    /// Adds or replaces one object. Returns whether anything changed.
    pub fn apply(&mut self, origin: &str, resource: Resource) -> bool {
        let object = resource.object_ref();
        let k = key(&object);
        fn put<T: PartialEq>(
            map: &mut BTreeMap<NsName, Entry<T>>,
            k: NsName,
            origin: &str,
            object: T,
        ) -> bool {
            let entry = Entry {
                origin: origin.to_owned(),
                object,
            };
            if map.get(&k) == Some(&entry) {
                return false;
            }
            map.insert(k, entry);
            true
        }
        fn put_validated<T: PartialEq + Clone>(
            map: &mut BTreeMap<NsName, Validated<T>>,
            k: NsName,
            origin: &str,
            object: T,
        ) -> bool {
            let latest = Entry {
                origin: origin.to_owned(),
                object,
            };
            match map.get_mut(&k) {
                Some(v) if v.latest == latest => false,
                Some(v) => {
                    v.latest = latest;
                    true
                }
                None => {
                    map.insert(
                        k,
                        Validated {
                            latest,
                            accepted: None,
                            rejection: Vec::new(),
                        },
                    );
                    true
                }
            }
        }
        match resource {
            Resource::Service(o) => put(&mut self.services, k, origin, *o),
            Resource::Pod(o) => put(&mut self.pods, k, origin, *o),
            Resource::EndpointSlice(o) => put(&mut self.endpoint_slices, k, origin, *o),
            Resource::VirtualService(o) => put_validated(&mut self.virtual_services, k, origin, *o),
            Resource::DestinationRule(o) => {
                put_validated(&mut self.destination_rules, k, origin, *o)
            }
        }
    }

    /// Removes one object. Returns whether it was there.
    pub fn delete(&mut self, object: &ObjectRef) -> bool {
        let k = key(object);
        match object.kind {
            Kind::Service => self.services.remove(&k).is_some(),
            Kind::Pod => self.pods.remove(&k).is_some(),
            Kind::EndpointSlice => self.endpoint_slices.remove(&k).is_some(),
            Kind::VirtualService => self.virtual_services.remove(&k).is_some(),
            Kind::DestinationRule => self.destination_rules.remove(&k).is_some(),
        }
    }

    /// Makes the index hold exactly `objects` of `kind` (a relist).
    pub fn replace_kind(&mut self, kind: Kind, origin: &str, objects: Vec<Resource>) {
        let keep: std::collections::BTreeSet<ObjectRef> =
            objects.iter().map(Resource::object_ref).collect();
        for gone in self
            .object_refs()
            .into_iter()
            .filter(|r| r.kind == kind && !keep.contains(r))
        {
            self.delete(&gone);
        }
        for object in objects {
            self.apply(origin, object);
        }
    }

    /// Every object the index holds, by reference.
    pub fn object_refs(&self) -> Vec<ObjectRef> {
        fn refs<V>(kind: Kind, map: &BTreeMap<NsName, V>) -> impl Iterator<Item = ObjectRef> + '_ {
            map.keys().map(move |(namespace, name)| ObjectRef {
                kind,
                namespace: namespace.clone(),
                name: name.clone(),
            })
        }
        refs(Kind::Service, &self.services)
            .chain(refs(Kind::Pod, &self.pods))
            .chain(refs(Kind::EndpointSlice, &self.endpoint_slices))
            .chain(refs(Kind::VirtualService, &self.virtual_services))
            .chain(refs(Kind::DestinationRule, &self.destination_rules))
            .collect()
    }

    /// Validates every VirtualService and DestinationRule whose latest version is
    /// not the accepted one, accepting those that pass. Returns the reasons of every
    /// current rejection (a rejected version is tried again on every call, so one
    /// that only lacked context, say a DestinationRule applied after it, is accepted
    /// as soon as that context arrives).
    pub fn revalidate(&mut self, cluster_domain: &str) -> Vec<Diagnostic> {
        let mut rejections = Vec::new();
        for v in self.destination_rules.values_mut() {
            if v.accepted.as_ref() != Some(&v.latest) {
                let problems = validate::destination_rule(&v.latest.object);
                settle(v, problems, &mut rejections);
            }
        }
        let keys: Vec<NsName> = self.virtual_services.keys().cloned().collect();
        for k in keys {
            let Some(v) = self.virtual_services.get(&k) else {
                continue;
            };
            if v.accepted.as_ref() == Some(&v.latest) {
                continue;
            }
            let problems = validate::virtual_service(&v.latest.object, self, cluster_domain);
            if let Some(v) = self.virtual_services.get_mut(&k) {
                settle(v, problems, &mut rejections);
            }
        }
        rejections
    }

    /// Accepted VirtualServices.
    pub fn virtual_services(&self) -> impl Iterator<Item = &Entry<VirtualService>> {
        self.virtual_services
            .values()
            .filter_map(|v| v.accepted.as_ref())
    }

    /// Accepted DestinationRules.
    pub fn destination_rules(&self) -> impl Iterator<Item = &Entry<DestinationRule>> {
        self.destination_rules
            .values()
            .filter_map(|v| v.accepted.as_ref())
    }
}

fn settle<T: Clone>(
    v: &mut Validated<T>,
    problems: Vec<Diagnostic>,
    rejections: &mut Vec<Diagnostic>,
) {
    if problems.is_empty() {
        v.accepted = Some(v.latest.clone());
        v.rejection.clear();
    } else {
        let keeping = if v.accepted.is_some() {
            "the last accepted version stays in effect"
        } else {
            "not applied"
        };
        v.rejection = problems
            .into_iter()
            .map(|d| {
                let message = format!("{} (rejected; {keeping})", d.message);
                Diagnostic { message, ..d }.with_origin(&v.latest.origin)
            })
            .collect();
        rejections.extend(v.rejection.iter().cloned());
    }
}

/// Queries the compiler and the validator share.
impl Index {
    /// The Service a fully qualified host names, if any.
    pub fn service_by_fqdn(&self, fqdn: &str, cluster_domain: &str) -> Option<&Entry<Service>> {
        let (name, namespace) = crate::compile::hosts::split_service_fqdn(fqdn, cluster_domain)?;
        self.services.get(&(namespace.to_owned(), name.to_owned()))
    }

    /// The accepted DestinationRule for a Service FQDN: a rule in the Service's own
    /// namespace first (Istio looks there before elsewhere), then the best host match.
    pub fn destination_rule_for(
        &self,
        fqdn: &str,
        cluster_domain: &str,
    ) -> Option<&Entry<DestinationRule>> {
        let service_ns =
            crate::compile::hosts::split_service_fqdn(fqdn, cluster_domain).map(|(_, ns)| ns);
        self.destination_rules()
            .filter_map(|entry| {
                let meta = &entry.object.metadata;
                let ns = meta
                    .namespace
                    .as_deref()
                    .unwrap_or(crate::model::DEFAULT_NAMESPACE);
                let pattern =
                    crate::compile::hosts::qualify(&entry.object.spec.host, ns, cluster_domain);
                let rank = crate::compile::hosts::match_rank(&pattern, fqdn)?;
                Some(((Some(ns) == service_ns, rank), entry))
            })
            .collect::<Vec<_>>()
            .into_iter()
            // max_by_key keeps the last of equals; iterate in reverse so the first
            // (by namespace/name) wins ties.
            .rev()
            .max_by_key(|(rank, _)| *rank)
            .map(|(_, entry)| entry)
    }
}
