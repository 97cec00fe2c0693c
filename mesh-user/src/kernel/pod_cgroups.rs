//! Where the kubelet put each pod's cgroup, below the pods' root (`--cgroup`):
//! `pod<uid>` with the cgroupfs driver, `kubepods[-<qos>]-pod<uid, _ for ->.slice`
//! with systemd's; right under the root for Guaranteed pods, one level down
//! (`burstable`, `besteffort`) for the others. A pod's cgroup appears when the
//! kubelet creates its sandbox, after the Pod object names the node: until
//! then it is "waiting".

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use super::own_cgroup;
use crate::compile::scope::PodUid;

/// A pod's cgroup: its directory and id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    pub path: PathBuf,
    pub id: u64,
}

/// Finds the cgroups of `pods` below `root` (at most two levels down).
pub fn find(root: &Path, pods: &BTreeSet<PodUid>) -> BTreeMap<PodUid, PodCgroup> {
    let names: BTreeMap<String, &PodUid> = pods
        .iter()
        .flat_map(|uid| {
            let systemd = uid.0.replace('-', "_");
            [(format!("pod{}", uid.0), uid), (systemd, uid)]
        })
        .collect();
    let matches = |dir: &Path| -> Option<&PodUid> {
        let name = dir.file_name()?.to_str()?;
        if let Some(uid) = names.get(name) {
            return Some(*uid); // cgroupfs: pod<uid>
        }
        // systemd: kubepods-burstable-pod<uid_>.slice
        let inner = name.strip_suffix(".slice")?.rsplit_once("-pod")?.1;
        names.get(inner).copied()
    };
    let mut found = BTreeMap::new();
    for dir in subdirs(root) {
        if let Some(uid) = matches(&dir) {
            found.extend(cgroup(&dir).map(|c| (uid.clone(), c)));
            continue;
        }
        for dir in subdirs(&dir) {
            if let Some(uid) = matches(&dir) {
                found.extend(cgroup(&dir).map(|c| (uid.clone(), c)));
            }
        }
    }
    found
}

fn subdirs(dir: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| e.path())
}

fn cgroup(dir: &Path) -> Option<PodCgroup> {
    let id = std::fs::metadata(dir).ok()?.ino();
    Some(PodCgroup {
        path: dir.to_owned(),
        id,
    })
}

/// The kubelet's names for the pods' cgroup root: systemd's driver, cgroupfs'.
const POD_ROOTS: [&str; 2] = ["kubepods.slice", "kubepods"];

#[derive(Debug, thiserror::Error)]
#[error(
    "no kubepods.slice or kubepods directory at the top of a cgroup v2 mount (looked in: {looked}); give --cgroup"
)]
pub struct DetectError {
    looked: String,
}

/// The pods' cgroup root of this node: `kubepods.slice` or `kubepods` at the
/// top of a cgroup2 mount this process sees (the host's, mounted into the
/// agent's container; unified or hybrid layout alike).
pub fn detect_root() -> Result<PathBuf, DetectError> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts: Vec<PathBuf> = own_cgroup::cgroup2_mounts(&mountinfo)
        .into_iter()
        .map(|(_, mount_point)| mount_point)
        .collect();
    mounts
        .iter()
        .flat_map(|m| POD_ROOTS.map(|name| m.join(name)))
        .find(|dir| dir.is_dir())
        .ok_or_else(|| DetectError {
            looked: mounts
                .iter()
                .map(|m| m.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_are_found_in_either_driver_layout_at_either_depth() -> std::io::Result<()> {
        let root = std::env::temp_dir().join(format!("mesh-pod-cgroups-{}", std::process::id()));
        let dirs = [
            "pod11111111-aaaa",
            "besteffort/pod22222222-bbbb",
            "kubepods-burstable.slice/kubepods-burstable-pod33333333_cccc.slice",
            "kubepods-pod44444444_dddd.slice",
            "besteffort/pod55555555-eeee/container",
        ];
        for d in dirs {
            std::fs::create_dir_all(root.join(d))?;
        }
        let uid = |u: &str| PodUid(u.to_owned());
        let wanted: BTreeSet<PodUid> = [
            "11111111-aaaa",
            "22222222-bbbb",
            "33333333-cccc",
            "44444444-dddd",
            "99999999-ffff",
        ]
        .map(uid)
        .into();
        let found = find(&root, &wanted);
        let paths: BTreeMap<String, String> = found
            .iter()
            .map(|(u, c)| {
                let rel = c.path.strip_prefix(&root).unwrap_or(&c.path);
                (u.0.clone(), rel.display().to_string())
            })
            .collect();
        std::fs::remove_dir_all(&root)?;
        assert_eq!(
            paths,
            BTreeMap::from(
                [
                    ("11111111-aaaa", "pod11111111-aaaa"),
                    ("22222222-bbbb", "besteffort/pod22222222-bbbb"),
                    (
                        "33333333-cccc",
                        "kubepods-burstable.slice/kubepods-burstable-pod33333333_cccc.slice"
                    ),
                    ("44444444-dddd", "kubepods-pod44444444_dddd.slice"),
                ]
                .map(|(a, b)| (a.to_owned(), b.to_owned()))
            )
        );
        Ok(())
    }
}
