//! A real single-node Kubernetes from `scripts/test-node.sh`: kubelet on its own
//! dockerd (dockershim), kube-scheduler, a CNI bridge, and its own kube-apiserver
//! with every controller (EndpointSlices written by the real controller, as
//! `discovery.k8s.io/v1beta1`). Stopped on drop; the script's `stop` removes
//! everything it made on the host and says what, if anything, was left.
//!
//! One node per machine (the kubelet hardcodes some host paths, and the pods'
//! cgroups are `/kubepods`): [`Node::start`] holds a process-wide lock, and the
//! script refuses a second node started by another process.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Mutex, MutexGuard, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-node.sh")
}

static ONE_NODE: Mutex<()> = Mutex::new(());

#[derive(Debug)]
pub struct Node {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// `unix://...`: the node's docker, for `docker build`/`docker load`.
    pub docker_host: String,
    /// `key=value` lines of `DIR/info` (node, pod_cidr, gateway, images...).
    pub info: BTreeMap<String, String>,
    _one: MutexGuard<'static, ()>,
}

impl Node {
    /// Starts one and waits until it is Ready (the binaries and images must be
    /// built: `scripts/test-node.sh build`).
    pub fn start() -> anyhow::Result<Self> {
        let one = ONE_NODE.lock().unwrap_or_else(PoisonError::into_inner);
        stop_stale();
        // Short: dockerd's and containerd's unix sockets live under it.
        let dir = PathBuf::from("/tmp").join(crate::unique("mesh-node-"));
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            // `start` cleans up after itself on failure; make sure.
            let _ = Command::new("bash")
                .arg(script())
                .arg("stop")
                .arg(&dir)
                .status();
            let _ = std::fs::remove_dir_all(&dir);
            bail!("test node did not start (build it with `scripts/test-node.sh build`)");
        }
        let kubeconfig = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        let info: BTreeMap<String, String> = std::fs::read_to_string(dir.join("info"))?
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        let docker_host = info
            .get("docker_host")
            .context("no docker_host in the node's info")?
            .clone();
        Ok(Node {
            dir,
            kubeconfig,
            docker_host,
            info,
            _one: one,
        })
    }

    /// A value of `DIR/info`.
    pub fn info(&self, key: &str) -> anyhow::Result<&str> {
        self.info
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("no {key} in the node's info"))
    }

    /// The cached image of the flaskapp stand-in (HTTP on $PORT, default 5000,
    /// answering `host=<pod> version=<$VERSION> client=<ip>:<port>`).
    pub fn flaskapp_image(&self) -> anyhow::Result<&str> {
        self.info("flaskapp_image")
    }

    /// `kubectl ARGS`, failing with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_stdin(args, None)
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml))
    }

    /// `kubectl ARGS -o json`, parsed.
    pub fn kubectl_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&all)?)?)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        let mut child = Command::new("kubectl")
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("kubectl")?;
        if let Some(text) = stdin {
            child
                .stdin
                .take()
                .context("stdin")?
                .write_all(text.as_bytes())?;
        }
        drop(child.stdin.take());
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let ok = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!(
                "test node in {} was not stopped cleanly; its state is kept",
                self.dir.display()
            );
        }
    }
}

/// A node left running by a test process that was killed without unwinding
/// (its directory is `/tmp/mesh-node-<pid>x<n>` and that pid is gone): stopped,
/// so that this process may start one.
fn stop_stale() {
    let Ok(owner) = std::fs::read_to_string("/run/mesh-test-node.owner") else {
        return;
    };
    let dir = PathBuf::from(owner.trim());
    let Some(rest) = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("mesh-node-"))
    else {
        return;
    };
    let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if pid.is_empty() || Path::new(&format!("/proc/{pid}")).exists() {
        return;
    }
    eprintln!("stopping a stale test node in {}", dir.display());
    if Command::new("bash")
        .arg(script())
        .arg("stop")
        .arg(&dir)
        .status()
        .is_ok_and(|s| s.success())
    {
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Polls `f` every 200 ms until it returns `Some`, for at most `timeout`;
/// fails with `what` and the last error `f` returned.
pub fn poll<T>(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(e),
        }
        if Instant::now() >= deadline {
            match last {
                Some(e) => bail!("timed out after {timeout:?} waiting for {what}: {e:#}"),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `GET /` over HTTP/1.0 to `addr`: the response body.
pub fn http_get(addr: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp
        .split_once("\r\n\r\n")
        .with_context(|| format!("no HTTP response from {addr}: {resp:?}"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        bail!("{addr} answered {head:?}");
    }
    Ok(body.to_owned())
}
