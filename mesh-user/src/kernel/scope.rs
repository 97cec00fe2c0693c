//! The only writer of `MESHED_PODS_V1`: the network namespace cookies of this
//! node's meshed pods (see `compile::scope` for which pods, `pod_cgroups` for
//! where their cgroups are, `netns` for a cgroup's namespace). A pod whose
//! cgroup or process is not there yet (the kubelet has not made its sandbox)
//! waits and is looked for again on every tick. A found pod's namespace is
//! checked on every tick by the process it was read from (its pid and start
//! time): when that process is gone (the sandbox recreated under the same pod:
//! its pause container died; or a container restarted), the namespace is
//! looked up again, and a cookie that changed is replaced in the map.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use aya::maps::MapError;
use tracing::{debug, info, warn};

use super::{
    maps::{KernelMap, sync_set},
    netns, pod_cgroups,
    record::ScopeRecord,
};
use crate::{compile::scope::PodUid, model::NamespacedName};

/// Which sockets the mesh takes (`--mesh-scope`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Every process under the attach point (the file source, tests).
    Cgroup,
    /// Istio's: pods of this node (`node`) in a mesh namespace.
    Pods { node: String },
}

pub struct PodScope {
    map: Box<dyn KernelMap<u64, u32> + Send + Sync>,
    /// The pods' cgroup root (`--cgroup`).
    root: PathBuf,
    /// The meshed pods, and their network namespace once found.
    pods: BTreeMap<PodUid, (NamespacedName, Option<Found>)>,
    /// The ids the map holds, as far as we know.
    written: BTreeSet<u64>,
    /// The last write failed somewhere: try again on the next tick.
    failed: bool,
    /// Pods whose namespace could not be read (warned about once).
    unreadable: BTreeSet<PodUid>,
}

impl std::fmt::Debug for PodScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodScope")
            .field("root", &self.root)
            .field("pods", &self.pods.len())
            .finish_non_exhaustive()
    }
}

/// Where a meshed pod was found.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Found {
    cgroup: PathBuf,
    netns: netns::Netns,
}

/// A write to `MESHED_PODS_V1` that failed (tried again on the next change or tick).
#[derive(Debug, thiserror::Error)]
#[error("meshed pod network namespace {id}: {source}")]
pub struct ScopeError {
    pub id: u64,
    pub source: MapError,
}

impl PodScope {
    /// Adopts what the map holds (a restart keeps meshing the pods it meshed
    /// until the source says otherwise).
    pub fn new(map: Box<dyn KernelMap<u64, u32> + Send + Sync>, root: PathBuf) -> Self {
        let written = map.keys().into_iter().collect();
        Self {
            map,
            root,
            pods: BTreeMap::new(),
            written,
            failed: false,
            unreadable: BTreeSet::new(),
        }
    }

    /// The meshed pods are now `pods`: finds the cgroups of new ones and
    /// writes the map.
    pub fn set(&mut self, pods: BTreeMap<PodUid, NamespacedName>) -> Vec<ScopeError> {
        for (uid, (name, cgroup)) in &self.pods {
            if !pods.contains_key(uid) && cgroup.is_some() {
                info!(pod = %name, %uid, "pod left the mesh");
            }
        }
        let mut previous = std::mem::take(&mut self.pods);
        self.pods = pods
            .into_iter()
            .map(|(uid, name)| {
                let cgroup = previous.remove(&uid).and_then(|(_, c)| c);
                (uid, (name, cgroup))
            })
            .collect();
        self.sync()
    }

    /// Looks again for the cgroups of waiting pods, and again for the
    /// namespace of pods whose namespace changed.
    pub fn retry(&mut self) -> Vec<ScopeError> {
        let changed = self.forget_replaced();
        if self.waiting() == 0 && !self.failed && !changed {
            return Vec::new();
        }
        self.sync()
    }

    /// Found pods whose namespace's holder process is gone: looked for again
    /// (`sync` logs the pod again, with its cookie). Whether any was.
    fn forget_replaced(&mut self) -> bool {
        let mut changed = false;
        for (uid, (name, found)) in &mut self.pods {
            let Some(f) = found else { continue };
            if !f.netns.holder.alive() {
                debug!(
                    pod = %name, %uid, netns = f.netns.cookie, pid = f.netns.holder.pid,
                    "the process holding a meshed pod's network namespace is gone: looking it up again"
                );
                *found = None;
                changed = true;
            }
        }
        changed
    }

    /// Meshed pods whose cgroup was not found yet.
    pub fn waiting(&self) -> usize {
        self.pods.values().filter(|(_, c)| c.is_none()).count()
    }

    /// Meshed pods in the map.
    pub fn meshed(&self) -> usize {
        self.pods.len() - self.waiting()
    }

    /// How many pods are meshed and waiting, for the agent's record.
    pub fn record(&self) -> ScopeRecord {
        ScopeRecord {
            meshed_pods: self.meshed(),
            waiting_pods: self.waiting(),
        }
    }

    fn sync(&mut self) -> Vec<ScopeError> {
        let missing: BTreeSet<PodUid> = self
            .pods
            .iter()
            .filter(|(_, (_, c))| c.is_none())
            .map(|(uid, _)| uid.clone())
            .collect();
        if !missing.is_empty() {
            for (uid, cgroup) in pod_cgroups::find(&self.root, &missing) {
                let netns = match netns::of_cgroup(&cgroup.path) {
                    Ok(Some(netns)) => netns,
                    Ok(None) => continue, // no process yet: next tick
                    Err(e) => {
                        // Said once per pod: it is looked for again every tick.
                        if self.unreadable.insert(uid.clone()) {
                            warn!(
                                %uid, cgroup = %cgroup.path.display(),
                                "cannot read the network namespace of a meshed pod (the agent needs CAP_SYS_PTRACE, CAP_SYS_ADMIN and the host's PIDs): {e}"
                            );
                        }
                        continue;
                    }
                };
                if let Some((name, found)) = self.pods.get_mut(&uid) {
                    info!(pod = %name, %uid, cgroup = %cgroup.path.display(), netns = netns.cookie, "pod meshed");
                    *found = Some(Found {
                        cgroup: cgroup.path,
                        netns,
                    });
                }
            }
        }
        let desired: BTreeSet<u64> = self
            .pods
            .values()
            .filter_map(|(_, f)| f.as_ref().map(|f| f.netns.cookie))
            .collect();
        let failed = sync_set(&mut *self.map, &mut self.written, &desired, |id| id);
        for (id, e) in &failed {
            warn!(id, "writing a meshed pod's cgroup failed: {e}");
        }
        self.failed = !failed.is_empty();
        failed
            .into_iter()
            .map(|(id, source)| ScopeError { id, source })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::maps::fake::FakeMap;

    #[test]
    fn pods_are_written_once_found_with_a_process_and_removed_when_they_go() -> anyhow::Result<()> {
        // Real cgroups: a pod is found by a process in its cgroup.
        let root = crate::kernel::own_cgroup::current()?
            .path
            .join(format!("mesh-pod-scope-{}", std::process::id()));
        if std::fs::create_dir(&root).is_err() {
            return Ok(()); // not root, or no cgroup2: the privileged tests cover it
        }
        let result = (|| -> anyhow::Result<()> {
            std::fs::create_dir_all(root.join("besteffort/poda"))?;
            std::fs::create_dir_all(root.join("podb"))?;
            let mut sleeper = std::process::Command::new("sleep").arg("30").spawn()?;
            std::fs::write(
                root.join("besteffort/poda/cgroup.procs"),
                sleeper.id().to_string(),
            )?;
            let map: FakeMap<u64, u32> = FakeMap::with_capacity(8);
            let mut scope = PodScope::new(Box::new(map.clone()), root.clone());
            let pod = |uid: &str| {
                (
                    PodUid(uid.to_owned()),
                    NamespacedName::new("prod", format!("pod-{uid}")),
                )
            };
            assert!(scope.set(BTreeMap::from([pod("a"), pod("b")])).is_empty());
            // b has a cgroup but no process yet: it waits.
            assert_eq!((scope.meshed(), scope.waiting()), (1, 1));
            let here = netns::of_process(std::process::id())?.cookie;
            assert_eq!(map.keys(), [here]);
            // Its sandbox recreated: the process replaced by one in a new
            // network namespace. The next tick finds the new namespace.
            sleeper.kill()?;
            sleeper.wait()?;
            let mut sandbox = std::process::Command::new("unshare")
                .args(["--net", "sleep", "30"])
                .spawn()?;
            std::fs::write(
                root.join("besteffort/poda/cgroup.procs"),
                sandbox.id().to_string(),
            )?;
            // unshare(1) execs sleep once the namespace is made: wait for it.
            let new = (0..100)
                .find_map(|_| {
                    let ns = netns::of_process(sandbox.id()).ok()?.cookie;
                    if ns == here {
                        std::thread::sleep(std::time::Duration::from_millis(10));
                        return None;
                    }
                    Some(ns)
                })
                .expect("unshare --net made no namespace");
            assert!(scope.retry().is_empty());
            assert_eq!(map.keys(), [new], "the new namespace replaces the old");
            assert_eq!((scope.meshed(), scope.waiting()), (1, 1));
            sandbox.kill()?;
            sandbox.wait()?;
            // No process left (the sandbox gone, not yet recreated): waiting.
            assert!(scope.retry().is_empty());
            assert!(map.keys().is_empty(), "a gone namespace is not kept");
            assert_eq!((scope.meshed(), scope.waiting()), (0, 2));
            let mut sleeper = std::process::Command::new("sleep").arg("30").spawn()?;
            std::fs::write(
                root.join("besteffort/poda/cgroup.procs"),
                sleeper.id().to_string(),
            )?;
            assert!(scope.retry().is_empty());
            assert_eq!(map.keys(), [here]);
            // a leaves (deleted, or its namespace unlabelled).
            assert!(scope.set(BTreeMap::from([pod("b")])).is_empty());
            assert!(map.keys().is_empty());
            // A restart adopts what the map holds.
            assert!(scope.set(BTreeMap::from([pod("a")])).is_empty());
            let again = PodScope::new(Box::new(map.clone()), root.clone());
            assert_eq!(again.written, BTreeSet::from([here]));
            sleeper.kill()?;
            sleeper.wait()?;
            Ok(())
        })();
        for dir in ["besteffort/poda", "besteffort", "podb", ""] {
            let _ = std::fs::remove_dir(root.join(dir));
        }
        result
    }
}
