//! The agent's own cgroup v2 directory and its id, which `connect4/6` compare
//! with `bpf_get_current_cgroup_id()` to leave the agent's connects alone.
//!
//! `/proc/self/cgroup` names the cgroup relative to this process's cgroup
//! namespace; `/proc/self/mountinfo` says where cgroup2 is mounted and which
//! part of the hierarchy each mount shows. A candidate directory counts only if
//! its `cgroup.procs` lists this process: a mount that shows another view (a
//! host's hierarchy bind-mounted into a container with a private cgroup
//! namespace) is never mistaken for ours.

use std::{
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum OwnCgroupError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        source: std::io::Error,
    },
    #[error("/proc/self/cgroup has no cgroup v2 line (0::/...)")]
    NoUnifiedLine,
    #[error(
        "no cgroup2 mount shows this process's cgroup {relative} (mount the cgroup v2 hierarchy where the agent runs)"
    )]
    NotVisible { relative: String },
}

/// The agent's cgroup: its directory and its id (the directory's inode number).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OwnCgroup {
    pub path: PathBuf,
    pub id: u64,
}

/// Finds this process's cgroup v2 directory.
pub fn current() -> Result<OwnCgroup, OwnCgroupError> {
    let read = |path: &'static str| {
        std::fs::read_to_string(path).map_err(|source| OwnCgroupError::Read { path, source })
    };
    let relative = unified_path(&read("/proc/self/cgroup")?)
        .ok_or(OwnCgroupError::NoUnifiedLine)?
        .to_owned();
    let pid = std::process::id();
    cgroup2_mounts(&read("/proc/self/mountinfo")?)
        .into_iter()
        .filter_map(|(root, mount_point)| candidate(&relative, &root, &mount_point))
        .find(|dir| lists(dir, pid))
        .and_then(|path| {
            let id = std::fs::metadata(&path).ok()?.ino();
            Some(OwnCgroup { path, id })
        })
        .ok_or(OwnCgroupError::NotVisible { relative })
}

/// The path of the `0::` line of `/proc/<pid>/cgroup`.
fn unified_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::trim_end)
}

/// The top of the cgroup v2 mount that holds `cgroup`: its highest ancestor
/// still on cgroup2. The gateway's default cgroup: with the pods' root
/// (`/host/sys/fs/cgroup/kubepods`), the node's whole tree as the agent's
/// container sees it, so every process of the node is below it.
pub fn tree_root_of(cgroup: &Path) -> Option<PathBuf> {
    let is_cgroup2 = |p: &Path| {
        nix::sys::statfs::statfs(p).is_ok_and(|fs| fs.filesystem_type().0 == 0x6367_7270)
    };
    if !is_cgroup2(cgroup) {
        return None;
    }
    let mut top = cgroup.to_owned();
    while let Some(parent) = top.parent().filter(|p| is_cgroup2(p)) {
        top = parent.to_owned();
    }
    Some(top)
}

/// (root within the hierarchy, mount point) of every cgroup2 mount.
pub(super) fn cgroup2_mounts(mountinfo: &str) -> Vec<(String, PathBuf)> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // "<id> <parent> <maj:min> <root> <mount point> <options> [optional...] - <fstype> ..."
            let (fields, after) = line.split_once(" - ")?;
            if after.split(' ').next()? != "cgroup2" {
                return None;
            }
            let mut fields = fields.split(' ');
            let root = unescape(fields.nth(3)?);
            let mount_point = PathBuf::from(unescape(fields.next()?));
            Some((root, mount_point))
        })
        .collect()
}

/// Where `relative` lies under a mount showing the hierarchy from `root`.
fn candidate(relative: &str, root: &str, mount_point: &Path) -> Option<PathBuf> {
    let rest = if root == "/" {
        relative
    } else {
        relative.strip_prefix(root)?
    };
    Some(mount_point.join(rest.trim_start_matches('/')))
}

fn lists(dir: &Path, pid: u32) -> bool {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .is_ok_and(|procs| procs.lines().any(|l| l.trim().parse() == Ok(pid)))
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u8, |n, c| n.wrapping_mul(8) + (c - b'0')));
        match octal {
            Some(byte) => {
                out.push(byte);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unified_line_is_found_among_v1_lines() {
        let hybrid =
            "12:memory:/kubepods/pod1\n1:name=systemd:/x\n0::/kubepods/besteffort/pod1/abc\n";
        assert_eq!(unified_path(hybrid), Some("/kubepods/besteffort/pod1/abc"));
        assert_eq!(unified_path("3:cpu:/\n"), None);
    }

    #[test]
    fn cgroup2_mounts_are_read_with_their_root_and_escapes() {
        let mountinfo = "\
25 1 0:22 / /sys rw - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw
31 25 0:27 /kubepods/pod1 /host\\040cgroup rw shared:9 - cgroup2 cgroup2 rw
32 25 0:28 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
";
        assert_eq!(
            cgroup2_mounts(mountinfo),
            [
                ("/".to_owned(), PathBuf::from("/sys/fs/cgroup/unified")),
                ("/kubepods/pod1".to_owned(), PathBuf::from("/host cgroup")),
            ]
        );
    }

    #[test]
    fn a_candidate_is_the_relative_path_under_the_mount_of_its_root() {
        let mount = Path::new("/sys/fs/cgroup");
        assert_eq!(
            candidate("/a/b", "/", mount),
            Some(PathBuf::from("/sys/fs/cgroup/a/b"))
        );
        assert_eq!(
            candidate("/a/b", "/a", mount),
            Some(PathBuf::from("/sys/fs/cgroup/b"))
        );
        assert_eq!(candidate("/x/b", "/a", mount), None);
        assert_eq!(
            candidate("/", "/", mount),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn this_process_finds_its_own_cgroup_when_cgroup2_is_mounted() {
        // Skipped only where no cgroup2 is mounted (plain `cargo test` in a
        // minimal container); on this project's machines it always is.
        let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
            return;
        };
        if cgroup2_mounts(&mountinfo).is_empty() {
            return;
        }
        let own = current().expect("own cgroup");
        assert!(lists(&own.path, std::process::id()), "{own:?}");
        assert_ne!(own.id, 0);
    }
}
