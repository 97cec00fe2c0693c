//! The real `mesh-agent` binary as a child process, with its JSON log captured so
//! tests can wait for "config applied" and read its diagnostics.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

/// A binary of this workspace, found next to the running executable (tests run
/// from `target/<profile>/deps`, binaries live in `target/<profile>`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let candidates = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|d| d.join(name))
        .collect::<Vec<_>>();
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!("{name} not found in {candidates:?}: build it first (`cargo xtask test` builds everything)")
    })
}

/// The upgrade test's "new version" of the kernel object (`cargo xtask build-ebpf
/// --upgrade-test`; `cargo xtask test` builds it).
pub fn upgrade_test_object() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "target"))
        .context("the test binary is not under a target directory")?;
    let object = target.join("ebpf-upgrade-test/bpfel-unknown-none/release/mesh-ebpf");
    anyhow::ensure!(
        object.is_file(),
        "{} is missing: run `cargo xtask build-ebpf --upgrade-test` (cargo xtask test does)",
        object.display()
    );
    Ok(object)
}

/// A running `mesh-agent`, with its own bpffs directory and run directory (so
/// tests never share kernel state). Dropping it stops the agent and runs
/// `mesh-agent cleanup`, which detaches and unpins what it left.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    log: Arc<Mutex<Vec<Value>>>,
    /// `run` arguments and environment, for restarts.
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// The cgroup the agent itself runs in (see [`Agent::spawn_kubernetes_meshed`]).
    inside: Option<PathBuf>,
    /// The network namespace the agent runs in, if not the test's.
    netns: Option<std::fs::File>,
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
    /// The agent's own cgroup when no test named one: as a DaemonSet's agent
    /// has its pod's, so what attaches to the agent's cgroup (the router's
    /// sockops) never lands on the machine's root. Last: removed after the
    /// agent stopped.
    _own: Option<crate::cgroup::Cgroup>,
}

impl Agent {
    /// `mesh-agent run --source file:<dir> --cgroup <cgroup> --log-format json`.
    pub fn start(dir: &Path, cgroup: &Path) -> anyhow::Result<Self> {
        Self::start_with(&[format!("file:{}", dir.display())], cgroup)
    }

    /// The same, with more `mesh-agent run` flags (e.g. `--no-redirect`).
    pub fn start_flags(dir: &Path, cgroup: &Path, flags: &[&str]) -> anyhow::Result<Self> {
        Self::start_flags_within(dir, cgroup, flags, Duration::from_secs(20))
    }

    /// The same, waiting up to `timeout` for the first apply (a folder at scale).
    pub fn start_flags_within(
        dir: &Path,
        cgroup: &Path,
        flags: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let mut args = vec![format!("file:{}", dir.display())];
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        Self::start_within(&args, cgroup, timeout)
    }

    /// `mesh-agent run --source kubernetes --kubeconfig <path> ...`.
    pub fn start_kubernetes(kubeconfig: &Path, cgroup: &Path) -> anyhow::Result<Self> {
        Self::start_kubernetes_flags(kubeconfig, cgroup, &[])
    }

    /// The same, with more `mesh-agent run` flags.
    pub fn start_kubernetes_flags(
        kubeconfig: &Path,
        cgroup: &Path,
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args = kubernetes_source(kubeconfig);
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        Self::start_with(&args, cgroup)
    }

    /// `mesh-agent run --source kubernetes` as node `node` (`NODE_NAME`), without
    /// waiting for its first apply: for agents that cannot sync yet (the API
    /// server away, CRDs missing), or several agents started side by side.
    pub fn spawn_kubernetes(kubeconfig: &Path, cgroup: &Path, node: &str) -> anyhow::Result<Self> {
        Self::launch(
            &kubernetes_source(kubeconfig),
            cgroup,
            vec![("NODE_NAME".to_owned(), node.to_owned())],
            None,
            None,
        )
    }

    /// The same, with the agent itself in `inside`, a cgroup below the meshed
    /// `cgroup`, as a DaemonSet's agent is a pod in the meshed hierarchy: its own
    /// connects meet the hooks it attaches.
    pub fn spawn_kubernetes_meshed(
        kubeconfig: &Path,
        cgroup: &Path,
        inside: &Path,
        node: &str,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            inside.starts_with(cgroup),
            "{} is not below {}",
            inside.display(),
            cgroup.display()
        );
        Self::launch(
            &kubernetes_source(kubeconfig),
            cgroup,
            vec![("NODE_NAME".to_owned(), node.to_owned())],
            Some(inside),
            None,
        )
    }

    /// `start_flags` with the agent in network namespace `netns`: the node's,
    /// for the gateway (which serves the agent's own namespace).
    pub fn start_in_netns(
        dir: &Path,
        cgroup: &Path,
        netns: &crate::netns::Netns,
        flags: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args = vec![format!("file:{}", dir.display())];
        args.extend(flags.iter().map(|f| (*f).to_owned()));
        let mut agent = Self::launch(&args, cgroup, Vec::new(), None, Some(netns))?;
        agent.wait_applied(1, Duration::from_secs(20))?;
        Ok(agent)
    }

    fn start_with(source: &[String], cgroup: &Path) -> anyhow::Result<Self> {
        Self::start_within(source, cgroup, Duration::from_secs(20))
    }

    fn start_within(source: &[String], cgroup: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let mut agent = Self::launch(source, cgroup, Vec::new(), None, None)?;
        agent.wait_applied(1, timeout)?;
        Ok(agent)
    }

    fn launch(
        source: &[String],
        cgroup: &Path,
        env: Vec<(String, String)>,
        inside: Option<&Path>,
        netns: Option<&crate::netns::Netns>,
    ) -> anyhow::Result<Self> {
        crate::sweep_stale();
        ensure_bpffs()?;
        let name = crate::unique("mesh-test-");
        let mut args: Vec<String> = [
            "run",
            "--log-format",
            "json",
            "--metrics-addr",
            "127.0.0.1:0",
            "--source",
        ]
        .map(str::to_owned)
        .to_vec();
        args.extend(source.iter().cloned());
        args.extend(["--cgroup".to_owned(), cgroup.display().to_string()]);
        // The gateway's hooks go on the test's cgroup, never on the machine's
        // root (the default), unless a test says otherwise.
        if !source.iter().any(|a| a == "--gateway-cgroup") {
            args.extend(["--gateway-cgroup".to_owned(), cgroup.display().to_string()]);
        }
        // The gateway's tc programs go on no device (the default is every
        // interface with an address: the machine's own, for an agent in the
        // host's namespace), unless a test names one.
        if !source.iter().any(|a| a == "--gateway-device") {
            args.extend(["--gateway-device".to_owned(), "none".to_owned()]);
        }
        // Tests stand pods in for network namespaces in one cgroup: every process
        // there is a mesh client, unless a test asks for Istio's pod scope.
        if source.first().is_some_and(|s| s == "kubernetes")
            && !source.iter().any(|a| a == "--mesh-scope")
        {
            args.extend(["--mesh-scope".to_owned(), "cgroup".to_owned()]);
        }
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/{name}"));
        let run_dir = std::env::temp_dir().join(format!("{name}-run"));
        let netns_file = netns.map(crate::netns::Netns::open).transpose()?;
        let own = match inside {
            Some(_) => None,
            None => Some(crate::cgroup::Cgroup::create(&format!("{name}-agent"))?),
        };
        let inside = inside.or(own.as_ref().map(crate::cgroup::Cgroup::path));
        let (child, log) = spawn(&args, &env, &pin_dir, &run_dir, inside, netns_file.as_ref())?;
        Ok(Agent {
            child,
            log,
            args,
            env,
            inside: inside.map(Path::to_owned),
            netns: netns_file,
            pin_dir,
            run_dir,
            _own: own,
        })
    }

    /// Starts the agent again on the same pinned state (after [`Agent::kill`] or
    /// [`Agent::stop`]), with `extra` flags, and waits for its first apply.
    pub fn restart(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        self.respawn(extra)?;
        self.wait_applied(1, Duration::from_secs(20))?;
        Ok(())
    }

    /// Starts the agent again on the same pinned state without waiting for an
    /// apply (its source may not be readable yet).
    pub fn respawn(&mut self, extra: &[&str]) -> anyhow::Result<()> {
        if matches!(self.child.try_wait(), Ok(None)) {
            bail!("the agent is still running");
        }
        let mut args = self.args.clone();
        args.extend(extra.iter().map(|f| (*f).to_owned()));
        let (child, log) = spawn(
            &args,
            &self.env,
            &self.pin_dir,
            &self.run_dir,
            self.inside.as_deref(),
            self.netns.as_ref(),
        )?;
        self.child = child;
        self.log = log;
        Ok(())
    }

    /// Waits until the agent logged a message at `level` containing `text`.
    pub fn wait_logged(
        &mut self,
        level: &str,
        text: &str,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.messages(level).iter().any(|m| m.contains(text)) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("mesh-agent exited ({status}); log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "mesh-agent logged no {level} {text:?} within {timeout:?}; log:\n{}",
            self.log_text()
        )
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no code of the agent runs on the way out.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// `mesh-agent ARGS --pin-dir <ours> --run-dir <ours>` (status, dump, explain,
    /// cleanup): its stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(sibling_binary("mesh-agent")?)
            .args(args)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .output()?;
        if !out.status.success() {
            bail!(
                "mesh-agent {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// The newest generation applied.
    pub fn generation(&self) -> u64 {
        self.log.lock().map_or(0, |log| {
            log.iter()
                .filter(|v| message(v) == "config applied")
                .filter_map(|v| v["fields"]["generation"].as_u64())
                .max()
                .unwrap_or(0)
        })
    }

    /// Waits until generation `at_least` is applied.
    pub fn wait_applied(&mut self, at_least: u64, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.generation() >= at_least {
                return Ok(started.elapsed());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("mesh-agent exited ({status}); log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!(
            "mesh-agent did not apply generation {at_least} within {timeout:?}; log:\n{}",
            self.log_text()
        )
    }

    /// `GET path` from the agent's /healthz, /readyz, /metrics server: (status, body).
    pub fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.http_get_with(path, &[])
    }

    /// The same, with request headers (`"Authorization: Bearer ..."`).
    pub fn http_get_with(&self, path: &str, headers: &[&str]) -> anyhow::Result<(u16, String)> {
        use std::io::{Read as _, Write as _};
        let addr = self
            .records("metrics listening")
            .first()
            .and_then(|f| f["addr"].as_str().map(str::to_owned))
            .context("the agent logged no metrics address")?;
        let extra: String = headers.iter().map(|h| format!("{h}\r\n")).collect();
        let exchange = || -> anyhow::Result<String> {
            let mut stream = std::net::TcpStream::connect(&addr)?;
            write!(
                stream,
                "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n"
            )?;
            let mut response = String::new();
            stream.read_to_string(&mut response)?;
            Ok(response)
        };
        // An agent in another network namespace listens there: ask from a
        // thread that joined it.
        let response = match &self.netns {
            None => exchange()?,
            Some(ns) => std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                        exchange()
                    })
                    .join()
                    .map_err(|_| anyhow::anyhow!("the request thread panicked"))?
            })?,
        };
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no status")?;
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// The value of an unlabelled metric from `/metrics` (e.g.
    /// `mesh_redirect_bytes_total`).
    pub fn metric(&self, name: &str) -> anyhow::Result<u64> {
        let (status, body) = self.http_get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .with_context(|| format!("no metric {name} in:\n{body}"))?
            .trim()
            .parse()
            .with_context(|| format!("metric {name}"))
    }

    /// The value of the sample `name{labels}` from `/metrics`, labels given as
    /// `key="value"` pairs in any order (e.g. `&[r#"map="SLOTS_V1""#]`).
    pub fn metric_with(&self, name: &str, labels: &[&str]) -> anyhow::Result<u64> {
        let (status, body) = self.http_get("/metrics")?;
        if status != 200 {
            bail!("/metrics answered {status}");
        }
        body.lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .find(|l| labels.iter().all(|p| l.contains(p)))
            .and_then(|l| l.rsplit(' ').next())
            .with_context(|| format!("no sample {name}{labels:?} in:\n{body}"))?
            .trim()
            .parse()
            .with_context(|| format!("metric {name}"))
    }

    /// Log messages at `level` (ERROR, WARN, INFO).
    pub fn messages(&self, level: &str) -> Vec<String> {
        self.log.lock().map_or_else(
            |_| Vec::new(),
            |log| {
                log.iter()
                    .filter(|v| v["level"] == level)
                    .map(|v| message(v).to_owned())
                    .collect()
            },
        )
    }

    pub fn log_text(&self) -> String {
        self.log.lock().map_or_else(
            |_| String::new(),
            |log| {
                log.iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            },
        )
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        self.terminate()
    }

    /// The `fields` of every log line with this message (e.g. the counters the
    /// agent logs when it stops).
    pub fn records(&self, message_text: &str) -> Vec<Value> {
        self.log.lock().map_or_else(
            |_| Vec::new(),
            |log| {
                log.iter()
                    .filter(|v| message(v) == message_text)
                    .map(|v| v["fields"].clone())
                    .collect()
            },
        )
    }

    fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child.kill()?;
        let _ = self.child.wait();
        bail!("mesh-agent ignored SIGTERM for 10 s")
    }
}

/// Mounts bpffs at /sys/fs/bpf once, before any agent starts: agents started in
/// parallel on a machine without it would each mount one, on top of each other.
fn ensure_bpffs() -> anyhow::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let mounts = std::fs::read_to_string("/proc/self/mounts").map_err(|e| e.to_string())?;
        if mounts
            .lines()
            .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.starts_with("bpf "))
        {
            return Ok(());
        }
        crate::sh("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

type Log = Arc<Mutex<Vec<Value>>>;

/// `--source` arguments for the Kubernetes source.
fn kubernetes_source(kubeconfig: &Path) -> Vec<String> {
    vec![
        "kubernetes".to_owned(),
        "--kubeconfig".to_owned(),
        kubeconfig.display().to_string(),
    ]
}

/// Starts `mesh-agent ARGS` with our state directories; its JSON log is collected.
fn spawn(
    args: &[String],
    env: &[(String, String)],
    pin_dir: &Path,
    run_dir: &Path,
    inside: Option<&Path>,
    netns: Option<&std::fs::File>,
) -> anyhow::Result<(Child, Log)> {
    let procs = inside
        .map(|cgroup| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(cgroup.join("cgroup.procs"))
        })
        .transpose()
        .context("opening the agent's cgroup")?;
    let mut command = Command::new(sibling_binary("mesh-agent")?);
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .arg("--pin-dir")
        .arg(pin_dir)
        .arg("--run-dir")
        .arg(run_dir)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // If the test process dies without unwinding (SIGKILL), the agent goes too.
    // SAFETY: prctl is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    crate::join_before_exec(
        &mut command,
        netns.map(std::os::fd::AsRawFd::as_raw_fd),
        procs.as_ref().map(std::os::fd::AsRawFd::as_raw_fd),
    );
    let mut child = command.spawn().context("spawning mesh-agent")?;
    drop(procs);
    let stderr = child.stderr.take().context("no stderr")?;
    let log = Arc::new(Mutex::new(Vec::new()));
    std::thread::spawn({
        let log = log.clone();
        move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line).unwrap_or(Value::String(line));
                if let Ok(mut log) = log.lock() {
                    log.push(value);
                }
            }
        }
    });
    Ok((child, log))
}

fn message(v: &Value) -> &str {
    v["fields"]["message"].as_str().unwrap_or("")
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate();
        }
        // The agent leaves its programs attached and its maps pinned by design.
        if self.pin_dir.exists()
            && let Err(e) = self.cli(&["cleanup"])
        {
            eprintln!("warning: mesh-agent cleanup: {e}");
        }
    }
}
