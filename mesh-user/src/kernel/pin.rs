//! Our directory in bpffs. Maps and program links pinned here outlive the agent:
//! a crash, a SIGTERM or an upgrade leaves the kernel routing as last configured,
//! and the next agent adopts what it finds.
//!
//! ```text
//! <root>/maps/<MAP_NAME_Vn>          every map of the object
//! <root>/links/cg<ino>/<program>     a bpf_link per program, per cgroup (inode)
//! <root>/links/tc-<dev>/<program>    the gateway's tc programs, per device (TCX)
//! ```
//!
//! Nothing outside `<root>` is ever touched.

use std::{
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use tracing::{info, warn};

/// Where bpffs lives on every distribution we know.
pub const BPFFS: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path} is not on a bpf filesystem (mount one: mount -t bpf bpf {BPFFS})")]
    NotBpffs { path: PathBuf },
    #[error("mounting bpffs at {BPFFS}: {0}")]
    Mount(nix::Error),
    #[error(
        "another mesh-agent is running on {path} (one agent per --pin-dir: two would hand out the same table ids); stop it first"
    )]
    Locked { path: PathBuf },
    #[error("locking {path}: {source}")]
    Lock { path: PathBuf, source: nix::Error },
}

/// Held by the running agent for its whole life: an exclusive `flock` on the
/// pin directory. The kernel drops it when the process exits, however it exits
/// (SIGKILL included), so a crashed agent never leaves a stale lock behind.
#[derive(Debug)]
pub struct PinLock(#[allow(dead_code, reason = "held for its Drop")] nix::fcntl::Flock<fs::File>);

/// Maps a hook reads one after the other for one decision: the connect hook's
/// service entry and slot table; `sk_msg`'s socket record and socket map.
const READ_TOGETHER: [[&str; 2]; 2] = [
    [
        mesh_common::map_names::SERVICES,
        mesh_common::map_names::SLOTS,
    ],
    [
        mesh_common::map_names::SOCK_CONN,
        mesh_common::map_names::SOCKETS,
    ],
];

/// A pinned map whose layout is not the one the object declares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub map: String,
    pub pinned: String,
    pub expected: String,
}

/// What the object declares for a map (type, key and value sizes, capacity, flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

impl std::fmt::Display for MapSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {} key {} B value {} B max {} flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.flags
        )
    }
}

#[derive(Clone, Debug)]
pub struct PinDir {
    root: PathBuf,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PinError + '_ {
    move |source| PinError::Io {
        path: path.to_owned(),
        source,
    }
}

impl PinDir {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root.join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    /// Links of the programs attached to one cgroup, named by its inode number
    /// (stable while the cgroup exists, and distinct from any other cgroup's).
    pub fn cgroup_links(&self, cgroup_ino: u64) -> PathBuf {
        self.links_dir().join(format!("cg{cgroup_ino}"))
    }

    /// Whether an agent has left anything here.
    pub fn exists(&self) -> bool {
        self.root.exists()
    }

    /// Makes the directories, mounting bpffs at [`BPFFS`] first if the root is
    /// under it and nothing is mounted there.
    pub fn prepare(&self) -> Result<(), PinError> {
        if self.root.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
            info!("mounting bpffs at {BPFFS}");
            nix::mount::mount(
                Some("bpf"),
                BPFFS,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(PinError::Mount)?;
        }
        for dir in [self.maps_dir(), self.links_dir()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        if !is_bpffs(&self.root) {
            return Err(PinError::NotBpffs {
                path: self.root.clone(),
            });
        }
        Ok(())
    }

    /// Takes the pin directory for this process (see [`PinLock`]); fails at
    /// once if another process holds it. Call [`PinDir::prepare`] first.
    pub fn lock(&self) -> Result<PinLock, PinError> {
        use nix::{
            errno::Errno,
            fcntl::{Flock, FlockArg},
        };
        let dir = fs::File::open(&self.root).map_err(io_err(&self.root))?;
        match Flock::lock(dir, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(PinLock(lock)),
            Err((_, Errno::EWOULDBLOCK)) => Err(PinError::Locked {
                path: self.root.clone(),
            }),
            Err((_, source)) => Err(PinError::Lock {
                path: self.root.clone(),
                source,
            }),
        }
    }

    /// Removes every pinned map whose layout differs from `expected`, so that the
    /// loader creates it anew instead of reading it with the wrong layout. Returns
    /// what was replaced.
    pub fn drop_mismatched_maps(&self, expected: &[(&str, MapSpec)]) -> Vec<Mismatch> {
        let mut replaced = self.drop_each_mismatched(expected);
        // Maps a program reads together are replaced together: the programs
        // still attached until the swap read the old pair, the new ones the new
        // pair, and neither ever mixes an old map with a new one (a service entry
        // flipped to a revision its slot map never held refuses the connect).
        // A member with no pin at all is created anew too: after a `_V2` rename
        // the old programs read the old pin's map under its old name, so its
        // partner must not be shared either.
        for group in READ_TOGETHER {
            let Some(anew) = group
                .iter()
                .find(|m| replaced.iter().any(|r| r.map == **m) || !self.map(m).exists())
            else {
                continue;
            };
            for name in group {
                let path = self.map(name);
                if replaced.iter().all(|r| r.map != *name) && path.exists() {
                    match fs::remove_file(&path) {
                        Ok(()) => {
                            info!(map = %name, with = %anew, "replacing it too: it is read together with a replaced map");
                            replaced.push(Mismatch {
                                map: (*name).to_owned(),
                                pinned: format!("read together with {anew}, replaced"),
                                expected: String::new(),
                            });
                        }
                        Err(e) => warn!(map = %name, "cannot remove {}: {e}", path.display()),
                    }
                }
            }
        }
        replaced
    }

    fn drop_each_mismatched(&self, expected: &[(&str, MapSpec)]) -> Vec<Mismatch> {
        let mut replaced = Vec::new();
        for (name, spec) in expected {
            let path = self.map(name);
            if !path.exists() {
                continue;
            }
            let pinned = aya::maps::MapInfo::from_pin(&path).map(|i| MapSpec {
                map_type: i.map_type().map_or(u32::MAX, |t| t as u32),
                key_size: i.key_size(),
                value_size: i.value_size(),
                max_entries: i.max_entries(),
                flags: i.map_flags(),
            });
            let pinned_text = match &pinned {
                Ok(p) if p == spec => continue,
                Ok(p) => p.to_string(),
                Err(e) => format!("unreadable ({e})"),
            };
            warn!(map = %name, pinned = %pinned_text, expected = %spec, "pinned map has another layout; replacing it (its contents are rebuilt from the source)");
            if let Err(e) = fs::remove_file(&path) {
                warn!(map = %name, "cannot remove {}: {e}", path.display());
            }
            replaced.push(Mismatch {
                map: (*name).to_owned(),
                pinned: pinned_text,
                expected: spec.to_string(),
            });
        }
        replaced
    }

    /// Unpins maps that are not in `current` (layouts of an older version, now
    /// replaced by a renamed map). Programs still using them keep them alive until
    /// they are swapped out.
    pub fn remove_stray_maps(&self, current: &[&str]) -> Vec<String> {
        let mut removed = Vec::new();
        for entry in fs::read_dir(self.maps_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !current.contains(&name.as_str()) && fs::remove_file(entry.path()).is_ok() {
                info!(map = %name, "unpinned a map of an older layout");
                removed.push(name);
            }
        }
        removed
    }

    /// Links of the gateway's tc programs on one network device (TCX), named
    /// by the device's name: `<root>/links/tc-<device>/<program>`.
    pub fn device_links(&self, device: &str) -> PathBuf {
        self.links_dir().join(format!("tc-{device}"))
    }

    /// Unpins the tc links of devices other than `keep` (no longer gateway
    /// devices), which detaches their programs. Returns those removed.
    pub fn unpin_other_devices(&self, keep: &[PathBuf]) -> Vec<PathBuf> {
        self.unpin_other_links("tc-", keep)
    }

    /// Unpins the link directories of cgroups other than `keep` (the agent moved
    /// to another cgroup), which detaches their programs. Returns those removed.
    pub fn unpin_other_cgroups(&self, keep: &[PathBuf]) -> Vec<PathBuf> {
        self.unpin_other_links("cg", keep)
    }

    /// Unpins the link directories named `<prefix>...` (cgroups' `cg<inode>`,
    /// devices' `tc-<name>`) other than `keep`.
    fn unpin_other_links(&self, prefix: &str, keep: &[PathBuf]) -> Vec<PathBuf> {
        fs::read_dir(self.links_dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .filter(|p| !keep.contains(p) && remove_tree(p, &mut Vec::new()).is_ok())
            .collect()
    }

    /// Unpins everything: links first (which detaches the programs), then maps,
    /// then the directories. Returns the objects unpinned.
    pub fn remove_all(&self) -> Result<Vec<PathBuf>, PinError> {
        let mut removed = Vec::new();
        for dir in [self.links_dir(), self.maps_dir()] {
            remove_tree(&dir, &mut removed)?;
        }
        if self.root.exists() {
            fs::remove_dir(&self.root).map_err(io_err(&self.root))?;
        }
        Ok(removed)
    }
}

fn remove_tree(dir: &Path, removed: &mut Vec<PathBuf>) -> Result<(), PinError> {
    if !dir.exists() {
        return Ok(());
    }
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() {
            remove_tree(&path, removed)?;
        } else {
            fs::remove_file(&path).map_err(io_err(&path))?;
            removed.push(path);
        }
    }
    fs::remove_dir(dir).map_err(io_err(dir))
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// The inode number of a directory (a cgroup's id).
pub fn inode(path: &Path) -> Result<u64, PinError> {
    fs::metadata(path).map(|m| m.ino()).map_err(io_err(path))
}
