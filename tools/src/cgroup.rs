//! A child cgroup v2 as the mesh scope; removed on drop (its processes killed).

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};

/// Where cgroup v2 is mounted: `/sys/fs/cgroup/unified` on hybrid systems (these
/// machines), `/sys/fs/cgroup` on unified ones.
pub fn cgroup2_root() -> anyhow::Result<PathBuf> {
    let mounts = fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .next()
        .context("no cgroup2 filesystem is mounted")
}

#[derive(Debug)]
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn create(name: &str) -> anyhow::Result<Self> {
        let path = cgroup2_root()?.join(name);
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// A child cgroup (dropped before its parent when declared after it).
    pub fn child(&self, name: &str) -> anyhow::Result<Self> {
        let path = self.path.join(name);
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Cgroup { path })
    }

    /// `cgroup.procs`, opened for writing: a child writes "0" to it to join.
    pub fn procs(&self) -> anyhow::Result<File> {
        fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .context("opening cgroup.procs")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::write(self.path.join("cgroup.kill"), "1");
        for _ in 0..100 {
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// Fails unless `path` is gone (for tests of the guards themselves).
pub fn assert_gone(path: &Path) -> anyhow::Result<()> {
    if path.exists() {
        bail!("{} still exists", path.display());
    }
    Ok(())
}
