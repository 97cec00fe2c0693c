//! A real kube-apiserver (with etcd and kube-controller-manager) on loopback, from
//! `scripts/test-apiserver.sh`, stopped on drop; kubectl against it; and a relay
//! in front of it that a test can cut.

use std::{
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, bail};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/test-apiserver.sh")
}

#[derive(Debug)]
pub struct ApiServer {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
}

impl ApiServer {
    /// Starts one (the binaries must be built: `scripts/test-apiserver.sh build`,
    /// which `cargo xtask test` runs). Tests start several at once, and two
    /// starts can pick the same free port between checking it and binding it:
    /// a start that fails is cleaned up and tried again with new ports.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_env(&[])
    }

    /// One that serves `discovery.k8s.io/v1beta1` EndpointSlices, as a 1.20
    /// cluster does (and no v1: do not install the v1 CRD on it).
    pub fn start_serving_v1beta1_slices() -> anyhow::Result<Self> {
        Self::start_env(&[("MESH_TEST_APISERVER_V1BETA1", "true")])
    }

    fn start_env(env: &[(&str, &str)]) -> anyhow::Result<Self> {
        const ATTEMPTS: usize = 3;
        for attempt in 1..=ATTEMPTS {
            let dir = std::env::temp_dir().join(crate::unique("mesh-apiserver-"));
            let out = Command::new("bash")
                .arg(script())
                .arg("start")
                .arg(&dir)
                .envs(env.iter().copied())
                .stderr(Stdio::inherit())
                .output()?;
            if out.status.success() {
                let kubeconfig = PathBuf::from(String::from_utf8(out.stdout)?.trim());
                return Ok(ApiServer { dir, kubeconfig });
            }
            let stopped = Command::new("bash")
                .arg(script())
                .arg("stop")
                .arg(&dir)
                .status();
            if !stopped.is_ok_and(|s| s.success()) {
                eprintln!("stopping the failed test API server in {}", dir.display());
            }
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    eprintln!("removing {}: {e}", dir.display());
                }
                _ => {}
            }
            eprintln!("test API server start {attempt}/{ATTEMPTS} failed");
        }
        bail!("test API server did not start (build it with `scripts/test-apiserver.sh build`)")
    }

    /// Where the API server listens (the admin kubeconfig's `server`).
    pub fn server_addr(&self) -> anyhow::Result<SocketAddr> {
        let text = std::fs::read_to_string(&self.kubeconfig)?;
        let server = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("server: "))
            .context("no server in the kubeconfig")?;
        Ok(server
            .trim()
            .strip_prefix("https://")
            .context("the server is not https://ADDR")?
            .parse()?)
    }

    /// A copy of the admin kubeconfig that dials `addr` (a relay, or the
    /// `kubernetes` Service's VIP as an in-cluster client does).
    pub fn kubeconfig_via(&self, addr: SocketAddr) -> anyhow::Result<PathBuf> {
        let text = std::fs::read_to_string(&self.kubeconfig)?;
        let server = format!("https://{}", self.server_addr()?);
        let path = self
            .dir
            .join(format!("{}.kubeconfig", crate::unique("via-")));
        std::fs::write(&path, text.replace(&server, &format!("https://{addr}")))?;
        Ok(path)
    }

    /// A kubeconfig next to the admin one that acts as the ServiceAccount
    /// `namespace/name` (a token from the TokenRequest API).
    pub fn service_account_kubeconfig(
        &self,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<PathBuf> {
        let token = self.kubectl(&["create", "token", name, "-n", namespace])?;
        let path = self.dir.join(format!("{namespace}-{name}.kubeconfig"));
        std::fs::copy(&self.kubeconfig, &path)?;
        let kc = path.display().to_string();
        self.kubectl(&[
            "--kubeconfig",
            &kc,
            "config",
            "set-credentials",
            name,
            &format!("--token={}", token.trim()),
        ])?;
        self.kubectl(&[
            "--kubeconfig",
            &kc,
            "config",
            "set-context",
            "--current",
            &format!("--user={name}"),
        ])?;
        Ok(path)
    }

    /// The Istio CRDs we ship, `discovery.k8s.io/v1` EndpointSlices (this 1.20
    /// server serves v1beta1 only; a CRD stands in), and `default` labelled as a
    /// mesh namespace.
    pub fn install_mesh_crds(&self) -> anyhow::Result<()> {
        self.install_cluster_basics()?;
        self.install_istio_crds()
    }

    /// What any cluster has: `discovery.k8s.io/v1` EndpointSlices (a CRD stands
    /// in on this 1.20 server), and `default` labelled as a mesh namespace.
    pub fn install_cluster_basics(&self) -> anyhow::Result<()> {
        self.install_crds(&["tools/fixtures/endpointslice-v1-crd.yaml"])?;
        self.kubectl(&["label", "namespace", "default", "istio-injection=enabled"])?;
        Ok(())
    }

    /// The Istio CRDs we ship (manifests/crds), established.
    pub fn install_istio_crds(&self) -> anyhow::Result<()> {
        self.install_crds(&[
            "manifests/crds/virtualservices.yaml",
            "manifests/crds/destinationrules.yaml",
            "manifests/crds/gateways.yaml",
        ])
    }

    fn install_crds(&self, files: &[&str]) -> anyhow::Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for crd in files {
            self.kubectl(&["apply", "-f", &root.join(crd).display().to_string()])?;
        }
        self.kubectl(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd",
            "--all",
        ])?;
        Ok(())
    }

    /// A Pod of `app`/`version` in `default`, running and ready at `ip`, as the
    /// kubelet would report it (pods/status).
    pub fn running_pod(
        &self,
        name: &str,
        app: &str,
        version: &str,
        ip: std::net::IpAddr,
    ) -> anyhow::Result<()> {
        self.apply(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {app}, version: {version}}}\nspec:\n  containers: [{{name: flaskapp, image: istio/examples-flaskapp, ports: [{{name: http, containerPort: 5000}}]}}]\n"
        ))?;
        let status = format!(
            r#"{{"status":{{"phase":"Running","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"conditions":[{{"type":"Ready","status":"True"}}]}}}}"#
        );
        self.kubectl(&[
            "patch",
            "pod",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
            &status,
        ])?;
        Ok(())
    }

    /// The pid of one of its processes (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`), from the script's pid file, while it runs.
    pub fn pid(&self, process: &str) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.dir.join(format!("run/{process}.pid")))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
    }

    /// An outage: kube-apiserver alone stops (`up: false`) or comes back as it was.
    pub fn set_up(&self, up: bool) -> anyhow::Result<()> {
        let verb = if up {
            "start-apiserver"
        } else {
            "stop-apiserver"
        };
        let status = Command::new("bash")
            .arg(script())
            .arg(verb)
            .arg(&self.dir)
            .status()?;
        if !status.success() {
            bail!("{verb} failed");
        }
        Ok(())
    }

    /// A crash: kube-apiserver alone is SIGKILLed (no graceful shutdown: clients'
    /// connections are reset). `set_up(true)` starts it again as it was. (A
    /// graceful `set_up(false)` takes 10 s here: kube-apiserver 1.20 does not
    /// exit on SIGTERM within the script's wait, and is then SIGKILLed anyway.)
    pub fn crash(&self) -> anyhow::Result<()> {
        let pidfile = self.dir.join("run/kube-apiserver.pid");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .with_context(|| format!("reading {}", pidfile.display()))?
            .trim()
            .parse()?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        // The script sees it gone and forgets its pid file.
        self.set_up(false)
    }

    /// `kubectl ARGS`, failing with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.kubectl_stdin(args, None)
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<String> {
        self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml))
    }

    /// `kubectl replace -f -` of `yaml` (for CRD-served built-in kinds, where
    /// kubectl's strategic-merge apply is refused).
    pub fn replace(&self, yaml: &str) -> anyhow::Result<String> {
        self.kubectl_stdin(&["replace", "-f", "-"], Some(yaml))
    }

    /// `kubectl ARGS` with `stdin` on its standard input.
    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> anyhow::Result<String> {
        crate::kubectl(&self.kubeconfig, args, stdin)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A TCP relay on loopback in front of the API server that a test can cut
/// (every connection closed, new ones closed as they come) and restore: a
/// partition between one client and a server that stays up for everyone else.
/// TLS passes through untouched (the server's certificate names 127.0.0.1).
#[derive(Debug)]
pub struct ApiProxy {
    /// The API server's kubeconfig, pointed at the relay.
    pub kubeconfig: PathBuf,
    addr: SocketAddr,
    state: Arc<ProxyState>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct ProxyState {
    cut: AtomicBool,
    stop: AtomicBool,
    /// Both ends of every relayed connection, to close them on a cut.
    open: Mutex<Vec<TcpStream>>,
}

impl ProxyState {
    fn close_all(&self) {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        for s in open.drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl ApiProxy {
    pub fn start(api: &ApiServer) -> anyhow::Result<Self> {
        let upstream = api.server_addr()?;
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let kubeconfig = api.kubeconfig_via(addr)?;
        let state = Arc::new(ProxyState::default());
        let acceptor = std::thread::spawn({
            let state = state.clone();
            move || {
                for down in listener.incoming() {
                    if state.stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let Ok(down) = down else { continue };
                    if state.cut.load(Ordering::SeqCst) {
                        continue; // dropped: closed at once
                    }
                    let Ok(up) = TcpStream::connect(upstream) else {
                        continue;
                    };
                    let (Ok(down2), Ok(up2)) = (down.try_clone(), up.try_clone()) else {
                        continue;
                    };
                    if let (Ok(a), Ok(b)) = (down.try_clone(), up.try_clone()) {
                        state
                            .open
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .extend([a, b]);
                    }
                    std::thread::spawn(move || relay(down, up));
                    std::thread::spawn(move || relay(up2, down2));
                }
            }
        });
        Ok(ApiProxy {
            kubeconfig,
            addr,
            state,
            acceptor: Some(acceptor),
        })
    }

    /// Closes every relayed connection; new ones are closed as they come.
    pub fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        self.state.close_all();
    }

    /// Relays again.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

/// Copies one direction until either end closes, then closes the other's writing half.
fn relay(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

impl Drop for ApiProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.state.close_all();
        // Wakes the acceptor, which then sees `stop`.
        let _ = TcpStream::connect(self.addr);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// The EndpointSlice the controller would make for `service`: (pod, IP, ready).
pub fn endpoint_slice(
    service: &str,
    port: u16,
    pods: &[(String, std::net::IpAddr, bool)],
) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-abcde\n  namespace: default\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n  - name: http\n    port: {port}\n    protocol: TCP\nendpoints:\n"
    );
    for (name, ip, ready) in pods {
        s += &format!(
            "  - addresses: [\"{ip}\"]\n    conditions: {{ready: {ready}}}\n    targetRef: {{kind: Pod, name: {name}, namespace: default}}\n"
        );
    }
    s
}
