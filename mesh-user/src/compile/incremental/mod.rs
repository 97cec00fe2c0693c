//! compile, redone for what changed: each Service's tables are kept as a part
//! of their own, and an update recompiles only the Services the index's
//! [`Changes`] name, with the Services whose routes read them. The result is
//! the same as compiling everything (a property test holds the two equal);
//! the work is proportional to the change.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    Compiled, Config, OutlierPool, OutlierWatch, ServiceAddr, ServicePlan, compile_service,
    endpoints, gateway, policy, redirect,
};
use crate::{
    index::{Changes, Index},
    model::{Diagnostic, NamespacedName},
};

/// The compiled configuration, kept up to date by [`Compiler::update`].
#[derive(Debug, Default)]
pub struct Compiler {
    started: bool,
    /// Two Services claim one address (a misconfiguration): only a whole
    /// compile decides which keeps it, so every update is one.
    contested: bool,
    /// Each Service's tables and what was said of it.
    parts: BTreeMap<NamespacedName, Part>,
    /// Service -> the Services whose routes read its endpoints.
    readers: BTreeMap<NamespacedName, BTreeSet<NamespacedName>>,
    /// What is said beside the Services' own: DestinationRules' unhonoured
    /// fields, Gateways, redirect exclusions.
    rules: Vec<Diagnostic>,
    gateways: Vec<Diagnostic>,
    redirect: Vec<Diagnostic>,
    /// Tables that are not a Service's (the gateway's ports), added by
    /// [`Compiler::add_others`] and taken out at the next update.
    others: BTreeSet<ServiceAddr>,
    compiled: Compiled,
}

#[derive(Debug, Default)]
struct Part {
    addrs: Vec<ServiceAddr>,
    outlier: BTreeMap<OutlierPool, OutlierWatch>,
    diagnostics: Vec<Diagnostic>,
    reads: BTreeSet<NamespacedName>,
}

/// Which tables may differ from those of the last update.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// Any of them (every Service was compiled).
    pub all: bool,
    /// Else these (changed, new or gone).
    pub addrs: BTreeSet<ServiceAddr>,
    /// Pods changed (or all did): what reads pods was redone.
    pub pods: bool,
}

impl Compiler {
    pub fn compiled(&self) -> &Compiled {
        &self.compiled
    }

    pub fn into_compiled(self) -> Compiled {
        self.compiled
    }

    /// Brings the compiled configuration up to date with `index`, given what
    /// changed in it since the last update.
    pub fn update(&mut self, index: &Index, config: &Config, changes: Changes) -> Delta {
        let mut delta = Delta {
            all: changes.all || !self.started,
            addrs: std::mem::take(&mut self.others).into_iter().collect(),
            pods: changes.pods || changes.all || !self.started,
        };
        for addr in &delta.addrs {
            self.compiled.services.remove(addr);
        }
        self.started = true;
        let lookup = endpoints::Lookup::new(index);
        delta.all |= self.contested;
        if !delta.all && !self.patch(&lookup, config, &changes.services, &mut delta.addrs) {
            delta.all = true;
        }
        if delta.all {
            self.parts.clear();
            self.readers.clear();
            self.compiled.services.clear();
            self.compiled.undecided.clear();
            self.contested = false;
            for (name, entry) in &index.services {
                let (part, out) = self.compile_one(&lookup, name, entry, config);
                self.contested |= out
                    .services
                    .keys()
                    .any(|a| self.compiled.services.contains_key(a));
                // In name order: the last Service to claim an address keeps it.
                self.compiled.services.extend(out.services);
                self.compiled.undecided.extend(out.undecided);
                self.parts.insert(name.clone(), part);
            }
            self.merge_outlier();
        }
        self.rules = index
            .destination_rules()
            .flat_map(policy::unhonoured)
            .collect();
        self.gateways.clear();
        self.compiled.gateways = gateway::compile(index, config, &mut self.gateways);
        if delta.pods {
            self.redirect.clear();
            self.compiled.redirect_excluded =
                redirect::excluded_endpoints(index, &mut self.redirect);
        }
        self.collect_diagnostics();
        delta
    }

    /// Adds tables that are not a Service's (the gateway's ports) until the
    /// next update; a Service keeps an address it holds (those are returned).
    pub fn add_others(
        &mut self,
        plans: BTreeMap<ServiceAddr, ServicePlan>,
    ) -> Vec<(ServiceAddr, ServicePlan)> {
        let mut refused = Vec::new();
        for (addr, plan) in plans {
            if self.compiled.services.contains_key(&addr) {
                refused.push((addr, plan));
                continue;
            }
            self.others.insert(addr);
            self.compiled.services.insert(addr, plan);
        }
        refused
    }

    /// The tables added by [`Compiler::add_others`].
    pub fn others(&self) -> &BTreeSet<ServiceAddr> {
        &self.others
    }

    /// Recompiles the Services `changed` names and those whose routes read
    /// them. Returns false where only a whole compile is sure to be right
    /// (two Services claim one address: the whole compile decides by name).
    fn patch(
        &mut self,
        lookup: &endpoints::Lookup<'_>,
        config: &Config,
        changed: &BTreeSet<NamespacedName>,
        addrs: &mut BTreeSet<ServiceAddr>,
    ) -> bool {
        let index = lookup.index;
        let mut dirty = changed.clone();
        for name in changed {
            dirty.extend(self.readers.get(name).into_iter().flatten().cloned());
        }
        let mut outlier = false;
        for name in &dirty {
            if let Some(old) = self.parts.remove(name) {
                for addr in &old.addrs {
                    if self
                        .compiled
                        .services
                        .get(addr)
                        .is_some_and(|p| &p.service != name)
                    {
                        return false;
                    }
                    self.compiled.services.remove(addr);
                    self.compiled.undecided.remove(addr);
                }
                addrs.extend(old.addrs.iter().copied());
                for read in &old.reads {
                    if let Some(r) = self.readers.get_mut(read) {
                        r.remove(name);
                        if r.is_empty() {
                            self.readers.remove(read);
                        }
                    }
                }
                outlier |= !old.outlier.is_empty();
            }
            let Some(entry) = index.services.get(name) else {
                continue;
            };
            let (part, out) = self.compile_one(lookup, name, entry, config);
            if part
                .addrs
                .iter()
                .any(|a| self.compiled.services.contains_key(a))
            {
                return false;
            }
            self.compiled.services.extend(out.services);
            self.compiled.undecided.extend(out.undecided);
            addrs.extend(part.addrs.iter().copied());
            outlier |= !part.outlier.is_empty();
            self.parts.insert(name.clone(), part);
        }
        if outlier {
            self.merge_outlier();
        }
        true
    }

    /// Compiles one Service: its part, and its tables (not yet in the
    /// configuration).
    fn compile_one(
        &mut self,
        lookup: &endpoints::Lookup<'_>,
        name: &NamespacedName,
        entry: &crate::index::Entry<crate::model::service::Service>,
        config: &Config,
    ) -> (Part, Compiled) {
        let mut out = Compiled::default();
        let reads = compile_service(lookup, name, entry, config, &mut out);
        for read in &reads {
            self.readers
                .entry(read.clone())
                .or_default()
                .insert(name.clone());
        }
        let part = Part {
            addrs: out.services.keys().copied().collect(),
            outlier: std::mem::take(&mut out.outlier),
            diagnostics: std::mem::take(&mut out.diagnostics),
            reads,
        };
        (part, out)
    }

    /// Outlier detection judges a pool as one, whichever routes lead to it:
    /// the backends every part watches in it, under the first part's policy.
    fn merge_outlier(&mut self) {
        let mut merged: BTreeMap<OutlierPool, OutlierWatch> = BTreeMap::new();
        for (pool, watch) in self.parts.values().flat_map(|p| &p.outlier) {
            merged
                .entry(pool.clone())
                .or_insert_with(|| OutlierWatch {
                    policy: watch.policy,
                    backends: Default::default(),
                })
                .backends
                .extend(watch.backends.iter().copied());
        }
        self.compiled.outlier = merged;
    }

    fn collect_diagnostics(&mut self) {
        let mut all: Vec<Diagnostic> = self
            .parts
            .values()
            .flat_map(|p| p.diagnostics.iter())
            .chain(&self.rules)
            .chain(&self.gateways)
            .chain(&self.redirect)
            .cloned()
            .collect();
        all.sort();
        all.dedup();
        self.compiled.diagnostics = all;
    }
}

#[cfg(test)]
mod tests;
