//! A pod's network namespace cookie, the key of `MESHED_PODS_V1`: what both
//! the connect hooks and sockops can read of any socket. Found from the pod's
//! cgroup: a process in it (the sandbox's pause process, at least) lives in the
//! pod's network namespace, and a socket made there tells the cookie
//! (`SO_NETNS_COOKIE`). The agent needs the host's PID namespace for this
//! (`cgroup.procs` names processes in the reader's PID namespace).

use std::{
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::Path,
};

/// A network namespace as the agent knows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Netns {
    /// Its cookie: the key of `MESHED_PODS_V1` (never reused while the
    /// system runs).
    pub cookie: u64,
    /// The process it was read from, which holds it: while that process
    /// lives, the namespace is the same. (Cheaper to check than the cookie,
    /// which takes a setns; and unlike the namespace's nsfs inode, a
    /// process's pid and start time are not reused at once: a sandbox
    /// recreated right after its namespace was freed may get the same inode.)
    pub holder: Holder,
}

/// A process, told apart from a later one with the same pid by its start
/// time (`/proc/<pid>/stat`, field 22, in clock ticks since boot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder {
    pub pid: u32,
    pub start: u64,
}

impl Holder {
    fn of(pid: u32) -> std::io::Result<Self> {
        let (_, start) = Self::stat(pid)?;
        Ok(Self { pid, start })
    }

    /// The state letter and start time of `/proc/<pid>/stat`. The command
    /// name (field 2) is in parentheses and may hold spaces: fields are
    /// counted from the last ')'.
    fn stat(pid: u32) -> std::io::Result<(char, u64)> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let state = fields.first().and_then(|f| f.chars().next());
        let start = fields.get(19).and_then(|f| f.parse().ok());
        state.zip(start).ok_or_else(|| {
            std::io::Error::other(format!("/proc/{pid}/stat: no state or start time"))
        })
    }

    /// Whether the process still runs (a zombie no longer holds namespaces).
    pub fn alive(&self) -> bool {
        Self::stat(self.pid)
            .is_ok_and(|(state, start)| start == self.start && !matches!(state, 'Z' | 'X'))
    }
}

/// The network namespace of the first process found in `cgroup` or below (at
/// most three levels: pod, container); `None` when it holds no process yet.
/// An error when no process's namespace could be read (without
/// CAP_SYS_PTRACE and CAP_SYS_ADMIN, or without the host's PIDs).
pub fn of_cgroup(cgroup: &Path) -> std::io::Result<Option<Netns>> {
    let mut last = None;
    for pid in pids(cgroup, 3) {
        match of_process(pid) {
            Ok(netns) => return Ok(Some(netns)),
            Err(e) => last = Some(e),
        }
    }
    last.map_or(Ok(None), Err)
}

fn pids(dir: &Path, depth: u32) -> Vec<u32> {
    let mut found: Vec<u32> = std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|&pid| pid != 0)
        .collect();
    if depth > 0 {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                found.extend(pids(&entry.path(), depth - 1));
            }
        }
    }
    found
}

/// Process `pid`'s network namespace: a short-lived thread enters it (setns
/// affects only the calling thread) and asks a socket for the cookie.
pub fn of_process(pid: u32) -> std::io::Result<Netns> {
    let holder = Holder::of(pid)?;
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
    let cookie = std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
        cookie_here()
    })
    .join()
    .map_err(|_| std::io::Error::other("the netns thread panicked"))??;
    // The pid may have been reused between the two reads: then the holder
    // is not that process, and the next check looks again.
    Ok(Netns { cookie, holder })
}

/// The cookie of the calling thread's network namespace.
pub fn cookie_here() -> std::io::Result<u64> {
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd nobody else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_of_this_namespace_has_its_cookie() -> std::io::Result<()> {
        let here = cookie_here()?;
        assert_ne!(here, 0);
        assert_eq!(of_process(std::process::id())?.cookie, here);
        Ok(())
    }
}
