//! Services by a pair of their selector, per namespace: the Services that may
//! select a pod are found from the pod's labels, not by a scan of its
//! namespace (10 000 Services in one namespace made every pod added, at a
//! start or in churn, test 10 000 selectors).

use std::{collections::BTreeMap, sync::Arc};

use crate::model::{NamespacedName, pod::Labels, service::Service};

/// namespace -> label key -> label value -> Service names, by the first pair
/// of each Service's selector (sorted by key); a Service without a selector
/// selects no pod and is not here. The names of one value are a vector: most
/// values are one Service's (a `BTreeSet` of one name took ~300 bytes).
#[derive(Clone, Debug, Default)]
pub(super) struct Selectors(BTreeMap<Arc<str>, BTreeMap<String, ByValue>>);

/// label value -> the names of the Services whose selector's first pair it is.
/// (The names share their strings with the index's keys.)
type ByValue = BTreeMap<String, Vec<Arc<str>>>;

impl Selectors {
    pub(super) fn add(&mut self, key: &NamespacedName, service: &Service) {
        if let Some((k, v)) = first_pair(service) {
            let names = self
                .0
                .entry(key.namespace.clone())
                .or_default()
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default();
            if !names.iter().any(|n| **n == *key.name) {
                names.reserve_exact(1);
                names.push(key.name.clone());
            }
        }
    }

    pub(super) fn remove(&mut self, key: &NamespacedName, service: &Service) {
        let Some((k, v)) = first_pair(service) else {
            return;
        };
        let Some(keys) = self.0.get_mut(&key.namespace) else {
            return;
        };
        if let Some(values) = keys.get_mut(k) {
            if let Some(names) = values.get_mut(v) {
                names.retain(|n| **n != *key.name);
                if names.is_empty() {
                    values.remove(v);
                }
            }
            if values.is_empty() {
                keys.remove(k);
            }
        }
        if keys.is_empty() {
            self.0.remove(&key.namespace);
        }
    }

    /// The Services of `namespace` whose selector's first pair `labels` has:
    /// every Service that selects a pod with these labels is among them.
    pub(super) fn candidates<'a>(
        &'a self,
        namespace: &'a str,
        labels: &'a Labels,
    ) -> impl Iterator<Item = NamespacedName> + 'a {
        let keys = self.0.get(namespace);
        labels
            .iter()
            .filter_map(move |(k, v)| keys?.get(k)?.get(v))
            .flatten()
            .map(move |name| NamespacedName::new(namespace, &**name))
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn first_pair(service: &Service) -> Option<&(String, String)> {
    crate::model::service::selector(service)?.first()
}
