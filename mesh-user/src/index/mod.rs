//! The index of everything the sources have said: one entry per object, with
//! `apply` and `delete` per resource and [`Index::apply_event`] for a source's
//! [`Event`]s. Nothing here does I/O, so every path (a relist, an object that
//! stops converting) is unit-tested without a kernel.
//!
//! VirtualServices and DestinationRules are *validated* before use, in the context
//! of the rest of the index: the index keeps the latest version the source gave and
//! the last version that was accepted. A bad new version is rejected and the last
//! good one keeps routing, as an admission webhook would have left the cluster.

mod changes;
pub mod resolve;
mod selectors;
#[cfg(test)]
mod tests;
mod validate;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
};

use k8s_openapi::api::core::v1::Node;

use crate::model::service::Service;

pub use changes::Changes;

use crate::{
    model::{
        DestinationRule, Diagnostic, Fqdn, Gateway, Kind, NamespacedName, ObjectRef, Resource,
        VirtualService,
        pod::{Pod, PodShapes},
        slice::EndpointSlice,
    },
    source::{Event, Invalid, Sourced},
};

/// An object and where it came from (both shared: a source that keeps what
/// it read shares it, and every object of a file or an API server shares
/// its origin).
#[derive(Clone, Debug)]
pub struct Entry<T> {
    pub origin: Arc<str>,
    pub object: Arc<T>,
}

impl<T: PartialEq> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        self.origin == other.origin
            && (Arc::ptr_eq(&self.object, &other.object) || self.object == other.object)
    }
}

/// A validated kind: the latest version, and the one in use.
#[derive(Clone, Debug)]
struct Validated<T> {
    latest: Entry<T>,
    accepted: Option<Entry<T>>,
}

#[derive(Clone, Debug, Default)]
pub struct Index {
    pub services: BTreeMap<NamespacedName, Entry<Service>>,
    pub pods: BTreeMap<NamespacedName, Entry<Pod>>,
    pub endpoint_slices: BTreeMap<NamespacedName, Entry<EndpointSlice>>,
    virtual_services: BTreeMap<NamespacedName, Validated<VirtualService>>,
    destination_rules: BTreeMap<NamespacedName, Validated<DestinationRule>>,
    /// Istio Gateways: checked by compile (a bad server is reported and skipped,
    /// the rest served), so no accepted version is kept.
    pub gateways: BTreeMap<NamespacedName, Entry<Gateway>>,
    /// Nodes, by name (empty namespace), trimmed to name and labels: compile
    /// reads this node's zone. The Kubernetes source watches only this node.
    pub nodes: BTreeMap<NamespacedName, Entry<Node>>,
    /// Namespaces whose Services are meshed; `None`: all (the file source).
    pub mesh_namespaces: Option<BTreeSet<String>>,
    /// Objects whose newest version did not convert (their last good version, if
    /// any, stays above), with why.
    invalid: BTreeMap<ObjectRef, Diagnostic>,
    /// The source's own diagnostics from its last snapshot.
    source_diagnostics: Vec<Diagnostic>,
    /// Each Service's EndpointSlices (by the slice's service-name label), kept
    /// with the slices: compile reads a Service's endpoints without a scan.
    slices_by_service: BTreeMap<NamespacedName, Vec<NamespacedName>>,
    /// Services by their selectors, for the Services a pod's change touches.
    selectors: selectors::Selectors,
    /// Slices no controller manages that name pods (see [`Changes`]).
    unmanaged_pod_refs: usize,
    /// What changed since [`Index::take_changes`].
    changes: Changes,
    /// Every origin, once.
    origins: HashSet<Arc<str>>,
    /// Every pod label set and list of ports, once: a ReplicaSet's pods
    /// share theirs.
    shapes: PodShapes,
    /// Kinds being relisted, and the objects the relist has given so far.
    relisting: BTreeMap<Kind, BTreeSet<NamespacedName>>,
}

fn put<T: PartialEq>(
    map: &mut BTreeMap<NamespacedName, Entry<T>>,
    key: NamespacedName,
    entry: Entry<T>,
) -> bool {
    if map.get(&key) == Some(&entry) {
        return false;
    }
    map.insert(key, entry);
    true
}

fn put_validated<T: PartialEq>(
    map: &mut BTreeMap<NamespacedName, Validated<T>>,
    key: NamespacedName,
    latest: Entry<T>,
) -> bool {
    match map.get_mut(&key) {
        Some(v) if v.latest == latest => false,
        Some(v) => {
            v.latest = latest;
            true
        }
        None => {
            map.insert(
                key,
                Validated {
                    latest,
                    accepted: None,
                },
            );
            true
        }
    }
}

impl Index {
    /// Adds or replaces one object. Returns whether anything changed.
    pub fn apply(&mut self, origin: &str, resource: Resource) -> bool {
        let key = resource.object_ref().namespaced_name();
        let origin = self.origin(origin);
        match resource {
            Resource::Service(o) => {
                let entry = Entry { origin, object: o };
                if self.services.get(&key) == Some(&entry) {
                    return false;
                }
                let old = self.services.insert(key.clone(), entry);
                if let Some(old) = &old {
                    self.selectors.remove(&key, &old.object);
                }
                self.selectors.add(&key, &self.services[&key].object);
                match old {
                    Some(_) => {
                        self.changes.services.insert(key);
                    }
                    // A new name changes what hosts resolve to.
                    None => self.changes.all = true,
                }
                true
            }
            Resource::Pod(o) => {
                let entry = Entry {
                    origin,
                    object: self.shapes.share(o),
                };
                let Some(old) = self.pods.get(&key) else {
                    self.pod_changed(&key, None, Some(&entry.object));
                    self.pods.insert(key, entry);
                    return true;
                };
                if old == &entry {
                    return false;
                }
                let old = old.object.clone();
                self.pod_changed(&key, Some(&old), Some(&entry.object));
                self.pods.insert(key, entry);
                self.shapes.forget(&old);
                true
            }
            Resource::EndpointSlice(o) => {
                let entry = Entry { origin, object: o };
                if self.endpoint_slices.get(&key) == Some(&entry) {
                    return false;
                }
                if let Some(old) = self.endpoint_slices.remove(&key) {
                    self.slice_removed(&key, &old.object);
                }
                self.slice_added(&key, &entry.object);
                self.endpoint_slices.insert(key, entry);
                true
            }
            Resource::VirtualService(o) => {
                let changed =
                    put_validated(&mut self.virtual_services, key, Entry { origin, object: o });
                self.everything_if(changed)
            }
            Resource::DestinationRule(o) => {
                let changed = put_validated(
                    &mut self.destination_rules,
                    key,
                    Entry { origin, object: o },
                );
                self.everything_if(changed)
            }
            Resource::Gateway(o) => {
                let changed = put(&mut self.gateways, key, Entry { origin, object: o });
                self.everything_if(changed)
            }
            Resource::Node(o) => {
                let changed = put(&mut self.nodes, key, Entry { origin, object: o });
                self.everything_if(changed)
            }
        }
    }

    fn origin(&mut self, origin: &str) -> Arc<str> {
        if let Some(o) = self.origins.get(origin) {
            return o.clone();
        }
        let o: Arc<str> = Arc::from(origin);
        self.origins.insert(o.clone());
        o
    }

    fn everything_if(&mut self, changed: bool) -> bool {
        self.changes.all |= changed;
        changed
    }

    /// What changed since the last call (see [`Changes`]).
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Each Service's slices, by name.
    pub fn slices_of(
        &self,
        service: &NamespacedName,
    ) -> impl Iterator<Item = &Entry<EndpointSlice>> {
        self.slices_by_service
            .get(service)
            .into_iter()
            .flatten()
            .filter_map(|k| self.endpoint_slices.get(k))
    }

    fn slice_added(&mut self, key: &NamespacedName, slice: &EndpointSlice) {
        if let Some(service) = slice.service_name() {
            // Sorted, as a set; a Vec, since a Service has a slice or a few
            // (grown by one: a first push reserves four, 144 bytes unused).
            let slices = self.slices_by_service.entry(service.clone()).or_default();
            if let Err(at) = slices.binary_search(key) {
                slices.reserve_exact(1);
                slices.insert(at, key.clone());
            }
            self.changes.services.insert(service);
        }
        self.unmanaged_pod_refs += usize::from(unmanaged_pod_refs(slice));
    }

    fn slice_removed(&mut self, key: &NamespacedName, slice: &EndpointSlice) {
        if let Some(service) = slice.service_name() {
            if let Some(set) = self.slices_by_service.get_mut(&service) {
                set.retain(|k| k != key);
                if set.is_empty() {
                    self.slices_by_service.remove(&service);
                }
            }
            self.changes.services.insert(service);
        }
        self.unmanaged_pod_refs -= usize::from(unmanaged_pod_refs(slice));
    }

    /// Records what a Pod's change touches (see [`Changes`]).
    fn pod_changed(&mut self, key: &NamespacedName, old: Option<&Pod>, new: Option<&Pod>) {
        self.changes.pods = true;
        let labels = |p: Option<&Pod>| p.map(|p| p.labels.clone());
        let node = |p: Option<&Pod>| p.and_then(|p| p.node.clone());
        let moved =
            old.is_none() || new.is_none() || labels(old) != labels(new) || node(old) != node(new);
        if moved && self.unmanaged_pod_refs > 0 {
            self.changes.all = true;
        }
        if self.changes.all {
            // Every Service is compiled anyway (at a start, after the first
            // new Service): no need to find which.
            return;
        }
        let namespace = &*key.namespace;
        let selecting: Vec<NamespacedName> = [old, new]
            .into_iter()
            .flatten()
            .flat_map(|p| self.selectors.candidates(namespace, &p.labels))
            .filter(|k| moved || !self.slices_by_service.contains_key(k))
            .filter(|k| {
                self.services.get(k).is_some_and(|e| {
                    [old, new]
                        .into_iter()
                        .flatten()
                        .any(|p| selects(&e.object, p))
                })
            })
            .collect();
        self.changes.services.extend(selecting);
    }

    /// Removes one object. Returns whether it was there.
    pub fn delete(&mut self, object: &ObjectRef) -> bool {
        let key = object.namespaced_name();
        match object.kind {
            Kind::Service => {
                let gone = self.services.remove(&key);
                if let Some(old) = &gone {
                    self.selectors.remove(&key, &old.object);
                }
                self.everything_if(gone.is_some())
            }
            Kind::Pod => {
                let Some(old) = self.pods.remove(&key) else {
                    return false;
                };
                self.pod_changed(&key, Some(&old.object), None);
                self.shapes.forget(&old.object);
                true
            }
            Kind::EndpointSlice => {
                let Some(old) = self.endpoint_slices.remove(&key) else {
                    return false;
                };
                self.slice_removed(&key, &old.object);
                true
            }
            Kind::VirtualService => {
                let gone = self.virtual_services.remove(&key).is_some();
                self.everything_if(gone)
            }
            Kind::DestinationRule => {
                let gone = self.destination_rules.remove(&key).is_some();
                self.everything_if(gone)
            }
            Kind::Gateway => {
                let gone = self.gateways.remove(&key).is_some();
                self.everything_if(gone)
            }
            Kind::Node => {
                let gone = self.nodes.remove(&key).is_some();
                self.everything_if(gone)
            }
        }
    }

    /// Takes in one event of a source. Returns whether anything changed.
    pub fn apply_event(&mut self, event: Event) -> bool {
        match event {
            Event::Snapshot {
                objects,
                diagnostics,
            } => {
                let mut changed = self.source_diagnostics != diagnostics;
                self.source_diagnostics = diagnostics;
                let keep: BTreeSet<ObjectRef> =
                    objects.iter().map(|s| s.object.object_ref()).collect();
                for gone in self.object_refs().into_iter().filter(|r| !keep.contains(r)) {
                    changed |= self.delete(&gone);
                }
                for Sourced { origin, object } in objects {
                    changed |= self.apply(&origin, object);
                }
                changed
            }
            Event::Relisting(kind) => {
                self.relisting.insert(kind, BTreeSet::new());
                false
            }
            Event::Relisted(kind) => self.relisted(kind),
            Event::Applied(Sourced { origin, object }) => {
                let r = object.object_ref();
                if let Some(seen) = self.relisting.get_mut(&r.kind) {
                    seen.insert(r.namespaced_name());
                }
                let was_invalid = self.invalid.remove(&r).is_some();
                self.apply(&origin, object) | was_invalid
            }
            Event::Deleted(object) => {
                let was_invalid = self.invalid.remove(&object).is_some();
                self.delete(&object) | was_invalid
            }
            Event::Invalid(Invalid { object, diagnostic }) => {
                if let Some(seen) = self.relisting.get_mut(&object.kind) {
                    seen.insert(object.namespaced_name());
                }
                self.invalid.insert(object, diagnostic.clone()) != Some(diagnostic)
            }
            Event::Namespaces(set) => {
                let changed = self.mesh_namespaces.as_ref() != Some(&set);
                self.mesh_namespaces = Some(set);
                self.everything_if(changed)
            }
            Event::Synced => false,
        }
    }

    /// Ends a relist of `kind`: what it did not give is gone (objects, and
    /// reports of objects that did not convert).
    fn relisted(&mut self, kind: Kind) -> bool {
        let Some(seen) = self.relisting.remove(&kind) else {
            return false;
        };
        let mut changed = false;
        for gone in self
            .object_refs()
            .into_iter()
            .filter(|r| r.kind == kind && !seen.contains(&r.namespaced_name()))
        {
            changed |= self.delete(&gone);
        }
        let before = self.invalid.len();
        self.invalid
            .retain(|r, _| r.kind != kind || seen.contains(&r.namespaced_name()));
        changed | (before != self.invalid.len())
    }

    /// Every object the index holds, by reference.
    pub fn object_refs(&self) -> Vec<ObjectRef> {
        fn refs<V>(
            kind: Kind,
            map: &BTreeMap<NamespacedName, V>,
        ) -> impl Iterator<Item = ObjectRef> + '_ {
            map.keys().map(move |k| ObjectRef::new(kind, k.clone()))
        }
        refs(Kind::Service, &self.services)
            .chain(refs(Kind::Pod, &self.pods))
            .chain(refs(Kind::EndpointSlice, &self.endpoint_slices))
            .chain(refs(Kind::VirtualService, &self.virtual_services))
            .chain(refs(Kind::DestinationRule, &self.destination_rules))
            .chain(refs(Kind::Gateway, &self.gateways))
            .chain(refs(Kind::Node, &self.nodes))
            .collect()
    }

    /// What the sources said is wrong: files that do not parse, objects that do
    /// not convert.
    pub fn source_diagnostics(&self) -> impl Iterator<Item = &Diagnostic> {
        self.source_diagnostics.iter().chain(self.invalid.values())
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
                self.changes.all |= settle(v, problems, &mut rejections);
            }
        }
        let keys: Vec<NamespacedName> = self.virtual_services.keys().cloned().collect();
        for k in keys {
            let Some(v) = self.virtual_services.get(&k) else {
                continue;
            };
            if v.accepted.as_ref() == Some(&v.latest) {
                continue;
            }
            let problems = validate::virtual_service(&v.latest.object, self, cluster_domain);
            if let Some(v) = self.virtual_services.get_mut(&k) {
                self.changes.all |= settle(v, problems, &mut rejections);
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

    /// VirtualServices that have never had an accepted version: rejected, so what
    /// they mean for routing is not known yet.
    pub fn pending_virtual_services(&self) -> impl Iterator<Item = &Entry<VirtualService>> {
        self.virtual_services
            .values()
            .filter(|v| v.accepted.is_none())
            .map(|v| &v.latest)
    }

    /// Whether the sources report objects they could not read: files that do not
    /// parse, objects that do not convert.
    pub fn source_has_errors(&self) -> bool {
        self.source_diagnostics()
            .any(|d| d.severity == crate::model::Severity::Error)
    }

    /// Whether the index holds no object at all (a Node alone configures
    /// nothing, so Nodes are not counted).
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
            && self.pods.is_empty()
            && self.endpoint_slices.is_empty()
            && self.virtual_services.is_empty()
            && self.destination_rules.is_empty()
    }

    /// Accepted DestinationRules.
    pub fn destination_rules(&self) -> impl Iterator<Item = &Entry<DestinationRule>> {
        self.destination_rules
            .values()
            .filter_map(|v| v.accepted.as_ref())
    }

    /// The Node called `name`, if the sources gave it.
    pub fn node(&self, name: &str) -> Option<&Entry<Node>> {
        self.nodes.get(&NamespacedName::new("", name))
    }

    /// Whether Services of `namespace` are meshed.
    pub fn is_meshed(&self, namespace: &str) -> bool {
        self.mesh_namespaces
            .as_ref()
            .is_none_or(|m| m.contains(namespace))
    }

    /// The Service a fully qualified host names, if any.
    pub fn service_by_fqdn(
        &self,
        fqdn: &Fqdn,
        cluster_domain: &str,
    ) -> Option<(NamespacedName, &Entry<Service>)> {
        let name = fqdn.service(cluster_domain)?;
        let entry = self.services.get(&name)?;
        Some((name, entry))
    }

    /// The accepted DestinationRule for a Service FQDN: a rule in the Service's own
    /// namespace first (Istio looks there before elsewhere), then the best host match.
    pub fn destination_rule_for(
        &self,
        fqdn: &Fqdn,
        cluster_domain: &str,
    ) -> Option<&Entry<DestinationRule>> {
        let service_ns = fqdn.service(cluster_domain).map(|s| s.namespace);
        self.destination_rules()
            .filter_map(|entry| {
                let ns = NamespacedName::from_meta(&entry.object.metadata).namespace;
                let pattern = Fqdn::qualify(&entry.object.spec.host, &ns, cluster_domain);
                let rank = pattern.match_rank(fqdn)?;
                Some(((Some(&ns) == service_ns.as_ref(), rank), entry))
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

/// Accepts the latest version if it has no problem (returns true), else
/// records why not.
fn settle<T: Clone>(
    v: &mut Validated<T>,
    problems: Vec<Diagnostic>,
    rejections: &mut Vec<Diagnostic>,
) -> bool {
    if problems.is_empty() {
        v.accepted = Some(v.latest.clone());
        true
    } else {
        let keeping = if v.accepted.is_some() {
            "the last accepted version stays in effect"
        } else {
            "not applied"
        };
        rejections.extend(problems.into_iter().map(|d| {
            let message = format!("{} (rejected; {keeping})", d.message);
            Diagnostic { message, ..d }.with_origin(&v.latest.origin)
        }));
        false
    }
}

/// Whether a slice names pods without the EndpointSlice controller having
/// made it from its Service's selector.
fn unmanaged_pod_refs(slice: &EndpointSlice) -> bool {
    !slice.managed && slice.endpoints.iter().any(|e| e.pod.is_some())
}

/// Whether a Service's selector selects the pod.
fn selects(service: &Service, pod: &Pod) -> bool {
    crate::model::service::selector(service)
        .is_some_and(|selector| selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)))
}
