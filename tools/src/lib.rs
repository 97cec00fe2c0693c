//! The mesh's test harness, and the programs built on it.
//!
//! The library runs the data plane on one machine: network namespaces as pods on
//! a bridge ([`netns`]), a cgroup v2 as the mesh scope ([`cgroup`]), HTTP
//! backends inside pods ([`backend`]), clients ([`probe`], [`load`], [`xfer`]),
//! manifests for the file source ([`manifests`]), a real kube-apiserver
//! ([`apiserver`]), and the real `mesh-agent` process ([`agent`]). Every resource
//! is an RAII guard that removes what it made, also when a test panics.
//!
//! Its users: the privileged integration tests (the `mesh-tests` package) and
//! this crate's binaries, `mesh-demo` (`cargo xtask demo`), `mesh-bench`
//! (`cargo xtask bench`), and the clients that those and the tests run inside
//! pods: `mesh-probe`, `mesh-load` and `mesh-xfer`. Most of it needs root;
//! building it does not.

pub mod agent;
pub mod apiserver;
pub mod backend;
pub mod cgroup;
pub mod curl;
pub mod kube_proxy;
pub mod load;
pub mod manifests;
pub mod netns;
pub mod node;
pub mod probe;
pub mod seed;
pub mod xfer;

use std::{
    os::{fd::AsRawFd as _, unix::process::CommandExt as _},
    path::Path,
    process::{Child, Command, Stdio},
};

use anyhow::{Context as _, bail};

/// Runs a command, failing with its stderr.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(program);
    cmd.args(args);
    checked_output(cmd, None)
}

/// Runs `program ARGS` (with `input` on its standard input, if any) and
/// returns its standard output; fails with its standard error.
pub fn checked_output(mut cmd: Command, input: Option<&str>) -> anyhow::Result<String> {
    use std::io::Write as _;
    let what = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    if let Some(text) = input {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl ARGS` on `kubeconfig`, with `input` on its standard input.
pub fn kubectl(kubeconfig: &Path, args: &[&str], input: Option<&str>) -> anyhow::Result<String> {
    let mut cmd = Command::new("kubectl");
    cmd.args(args).env("KUBECONFIG", kubeconfig);
    checked_output(cmd, input)
}

/// A name prefix unique to this process and call, so parallel tests never collide.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Whether this process may do what the privileged tests need.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this needs root (BPF, cgroups, network namespaces): run it with sudo or as root, as CI does"
    );
}

/// Removes what an earlier run left behind when it was killed without unwinding
/// (SIGKILL, OOM): network namespaces and cgroups named after a process that is no
/// longer alive. Runs once per process, before the first namespace is made.
pub fn sweep_stale() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Names are `<prefix><pid>x<n>...`; the pid tells whose they are.
        let dead = |name: &str, prefix: &str| -> bool {
            let Some(rest) = name.strip_prefix(prefix) else {
                return false;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            !pid.is_empty()
                && rest[pid.len()..].starts_with('x')
                && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        };
        if let Ok(list) = sh("ip", &["netns", "list"]) {
            for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
                if dead(name, "mt") {
                    let _ = sh("ip", &["netns", "del", name]);
                }
            }
        }
        // kube-proxy stand-ins' DNAT rules (`kube_proxy::ServiceDnat`).
        if let Ok(rules) = sh("iptables", &["-t", "nat", "-S", "OUTPUT"]) {
            for rule in rules.lines().filter_map(|r| r.strip_prefix("-A ")) {
                let stale = rule
                    .split_once("--comment ")
                    .and_then(|(_, c)| c.split_whitespace().next())
                    .is_some_and(|c| dead(c.trim_matches('"'), "mesh-test-"));
                if stale {
                    let mut args = vec!["-t", "nat", "-D"];
                    args.extend(rule.split_whitespace().map(|a| a.trim_matches('"')));
                    let _ = sh("iptables", &args);
                }
            }
        }
        // Agents' bpffs directories and run directories.
        for (dir, prefix) in [
            (std::path::PathBuf::from("/sys/fs/bpf"), "mesh-test-"),
            (std::env::temp_dir(), "mesh-test-"),
        ] {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if dead(&name, prefix) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        if let Ok(root) = cgroup::cgroup2_root()
            && let Ok(entries) = std::fs::read_dir(&root)
        {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if dead(&name, "mesh-test-")
                    || dead(&name, "mesh-demo-")
                    || dead(&name, "mesh-bench-")
                    || dead(&name, "mesh-soak-")
                {
                    let _ = std::fs::write(entry.path().join("cgroup.kill"), "1");
                    let _ = std::fs::remove_dir(entry.path());
                }
            }
        }
    });
}

/// Runs `program ARGS` to completion in this network namespace, inside `cgroup`
/// (joined before exec, so its first socket is already meshed).
pub fn run_in_cgroup(
    program: &str,
    cgroup: &cgroup::Cgroup,
    args: &[&str],
) -> anyhow::Result<std::process::Output> {
    let procs = cgroup.procs()?;
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    join_before_exec(&mut cmd, None, Some(procs.as_raw_fd()));
    let out = cmd.output().with_context(|| format!("running {program}"))?;
    drop(procs);
    Ok(out)
}

/// Starts `program ARGS` inside the network namespace `ns`, and inside `cgroup`
/// when given (the child joins both before exec, so its first socket is already
/// meshed). Its stdout is piped.
pub fn spawn_in_pod(
    program: &Path,
    ns: &netns::Netns,
    cgroup: Option<&cgroup::Cgroup>,
    args: &[&str],
) -> anyhow::Result<Child> {
    let ns_file = ns.open()?;
    let procs = cgroup.map(cgroup::Cgroup::procs).transpose()?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    join_before_exec(
        &mut cmd,
        Some(ns_file.as_raw_fd()),
        procs.as_ref().map(|f| f.as_raw_fd()),
    );
    let child = cmd
        .spawn()
        .with_context(|| format!("spawning {}", program.display()))?;
    drop((ns_file, procs));
    Ok(child)
}

/// Makes the child join the network namespace `ns_fd` and the cgroup whose
/// `cgroup.procs` is open as `procs_fd` between fork and exec. Both fds must
/// stay open until the child is spawned.
pub(crate) fn join_before_exec(
    cmd: &mut Command,
    ns_fd: Option<std::os::fd::RawFd>,
    procs_fd: Option<std::os::fd::RawFd>,
) {
    // SAFETY: only async-signal-safe calls (setns, write) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(fd) = ns_fd
                && libc::setns(fd, libc::CLONE_NEWNET) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if let Some(fd) = procs_fd
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
