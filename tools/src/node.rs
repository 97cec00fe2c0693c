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

/// This process's turn at the machine's one node, for a test that starts it
/// otherwise (`mesh-cluster`); [`Node::start`] takes it itself.
pub fn one_node() -> MutexGuard<'static, ()> {
    ONE_NODE.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug)]
pub struct Node {
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// `unix://...`: the node's docker, for `docker build`/`docker load`.
    pub docker_host: String,
    /// `key=value` lines of `DIR/info` (node, pod_cidr, gateway, images...).
    pub info: BTreeMap<String, String>,
    /// The mesh deployed by [`Node::deploy_mesh`], removed on drop.
    mesh: Mutex<Option<Mesh>>,
    /// A test's node ([`Node::start`]) is stopped on drop; a cluster's
    /// ([`Node::up`]) is left running for `mesh-cluster down`.
    owned: bool,
    _one: Option<MutexGuard<'static, ()>>,
}

/// The tags the seed's manifests (`manifests/examples/seed`) name: the node's
/// images, tagged so by [`Node::start`] and [`Node::up`].
pub const SEED_IMAGES: [(&str, &str); 2] = [
    ("flaskapp_image", "mesh-seed/flaskapp:local"),
    ("redis_image", "mesh-seed/redis:local"),
];

/// What [`Node::deploy_mesh`] deployed, for its removal.
#[derive(Debug)]
struct Mesh {
    overlay: PathBuf,
    /// The overlay of manifests/uninstall, with the same image and values.
    uninstall: PathBuf,
    agent_binary: PathBuf,
    /// On the host: the agent's bpffs directory and its run directory.
    pin_dir: PathBuf,
    run_dir: PathBuf,
}

/// The agent's image and what the test node's overlay set.
#[derive(Clone, Debug)]
pub struct MeshDeployed {
    /// `mesh-test-node/mesh-agent:<hash of the image's files>`.
    pub image: String,
    /// The overlay directory (`kustomization.yaml` + `node.yaml`).
    pub overlay: PathBuf,
    /// On the host: where the agent pins (`MESH_PIN_DIR`) and records (`/run/mesh`'s hostPath).
    pub pin_dir: PathBuf,
    pub run_dir: PathBuf,
}

impl Node {
    /// Starts one and waits until it is Ready (the binaries and images must be
    /// built: `scripts/test-node.sh build`). Stopped on drop. No kube-proxy:
    /// ClusterIPs answer meshed pods only.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(KubeProxy::None)
    }

    /// The same, with `kube_proxy`.
    pub fn start_with(kube_proxy: KubeProxy) -> anyhow::Result<Self> {
        let one = one_node();
        stop_stale();
        // A start can fail for a reason of the moment (a port taken between
        // the script's check and a server's bind): tried once more.
        const ATTEMPTS: usize = 2;
        let mut attempt = 1;
        let (dir, kubeconfig) = loop {
            // Short: dockerd's and containerd's unix sockets live under it.
            let dir = PathBuf::from("/tmp").join(crate::unique("mesh-node-"));
            match run_start(&dir, kube_proxy) {
                Ok(k) => break (dir, k),
                Err(e) => {
                    // `start` cleans up after itself on failure; make sure,
                    // if it got as far as making DIR/run. (Not before: it
                    // refused to start, e.g. because another node runs, and
                    // `stop` would kill that node's pods: it kills whatever
                    // runs in the kubepods cgroups.)
                    if dir.join("run").exists() {
                        let _ = Command::new("bash")
                            .arg(script())
                            .arg("stop")
                            .arg(&dir)
                            .status();
                    }
                    let _ = std::fs::remove_dir_all(&dir);
                    if attempt == ATTEMPTS {
                        return Err(e);
                    }
                    eprintln!("the test node did not start ({e:#}); trying again");
                    attempt += 1;
                }
            }
        };
        let node = Self::attach(dir, kubeconfig, true, Some(one))?;
        node.tag_seed_images()?;
        Ok(node)
    }

    /// The node of `dir`, started unless it already runs there (idempotent),
    /// and left running when dropped: `mesh-cluster up`. With kube-proxy, as a
    /// real cluster runs it beside a mesh.
    pub fn up(dir: &Path) -> anyhow::Result<Self> {
        let kubeconfig = run_start(dir, KubeProxy::Iptables)?;
        let node = Self::attach(dir.to_owned(), kubeconfig, false, None)?;
        node.tag_seed_images()?;
        Ok(node)
    }

    /// The node of `dir` when it runs and answers, else `None`.
    pub fn running(dir: &Path) -> anyhow::Result<Option<Self>> {
        let kubeconfig = dir.join("kubeconfig");
        if !kubeconfig.exists() || !dir.join("info").exists() {
            return Ok(None);
        }
        let node = Self::attach(dir.to_owned(), kubeconfig, false, None)?;
        Ok(node.kubectl(&["get", "nodes"]).is_ok().then_some(node))
    }

    fn attach(
        dir: PathBuf,
        kubeconfig: PathBuf,
        owned: bool,
        one: Option<MutexGuard<'static, ()>>,
    ) -> anyhow::Result<Self> {
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
            mesh: Mutex::new(None),
            owned,
            _one: one,
        })
    }

    /// The node's images under the names the seed's manifests use.
    fn tag_seed_images(&self) -> anyhow::Result<()> {
        for (key, seed) in SEED_IMAGES {
            if let Some(image) = self.info.get(key) {
                self.docker(&["tag", image, seed])?;
            }
        }
        Ok(())
    }

    /// A value of `DIR/info`.
    pub fn info(&self, key: &str) -> anyhow::Result<&str> {
        self.info
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("no {key} in the node's info"))
    }

    /// The cached image of the flaskapp stand-in (HTTP on $PORT, default 5000,
    /// answering `host=<pod> version=<$VERSION> client=<ip>:<port> visits=<N>`,
    /// images/flaskapp).
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
        crate::kubectl(&self.kubeconfig, args, stdin)
    }

    /// What a failed test prints to say why: the node (conditions, taints,
    /// allocatable), every pod and event, and the tails of the node's logs.
    pub fn diagnostics(&self) -> String {
        let mut out = String::new();
        for args in [
            &["describe", "nodes"][..],
            &["get", "pods", "-A", "-o", "wide"],
            &["get", "events", "-A", "--sort-by=.lastTimestamp"],
        ] {
            let got = self.kubectl(args).unwrap_or_else(|e| format!("{e:#}"));
            out += &format!("---- kubectl {} ----\n{got}\n", args.join(" "));
        }
        for log in ["kube-scheduler", "kubelet", "dockerd"] {
            let path = self.dir.join("logs").join(format!("{log}.log"));
            let text = std::fs::read_to_string(&path).unwrap_or_else(|e| format!("{e}"));
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            out += &format!("---- tail of {} ----\n{tail}\n", path.display());
        }
        out
    }

    /// `result`, with [`Node::diagnostics`] printed first when it failed.
    pub fn explain_failure<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        if result.is_err() {
            eprintln!("{}", self.diagnostics());
        }
        result
    }
}

/// The shipped manifests, as a user applies them.
fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

impl Node {
    /// `docker ARGS` on the node's dockerd, failing with its stderr.
    pub fn docker(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("docker");
        cmd.args(args)
            .env("DOCKER_HOST", &self.docker_host)
            .env("DOCKER_BUILDKIT", "0");
        crate::checked_output(cmd, None)
    }

    /// Builds the agent's image into the node's docker: `FROM scratch`, the
    /// binary (debug info stripped) at `/mesh-agent` and the shared libraries
    /// `ldd` names at their paths. Tagged by a hash of those files, so an
    /// unchanged binary is not built again.
    pub fn build_agent_image(&self, agent_binary: &Path) -> anyhow::Result<String> {
        let ctx = self.dir.join("agent-image");
        let _ = std::fs::remove_dir_all(&ctx);
        let root = ctx.join("rootfs");
        std::fs::create_dir_all(&root)?;
        let status = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(root.join("mesh-agent"))
            .arg(agent_binary)
            .status()
            .context("strip")?;
        if !status.success() {
            bail!("strip {} failed", agent_binary.display());
        }
        let ldd = Command::new("ldd").arg(agent_binary).output()?;
        let mut files = vec![PathBuf::from("mesh-agent")];
        for line in String::from_utf8_lossy(&ldd.stdout).lines() {
            // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)",
            // "/lib64/ld-linux-x86-64.so.2 (0x...)", "linux-vdso.so.1 (0x...)".
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            let Some(path) = path.filter(|p| p.starts_with('/')) else {
                continue;
            };
            let rel = PathBuf::from(path.trim_start_matches('/'));
            let dest = root.join(&rel);
            std::fs::create_dir_all(dest.parent().context("a library's directory")?)?;
            // Follows symlinks: the image gets the library itself under the
            // name the loader looks for.
            std::fs::copy(path, &dest).with_context(|| format!("copying {path}"))?;
            files.push(rel);
        }
        files.sort();
        let sums = Command::new("sh")
            .args(["-c", "sha256sum \"$@\" | sha256sum", "sh"])
            .args(&files)
            .current_dir(&root)
            .output()
            .context("sha256sum")?;
        if !sums.status.success() {
            bail!("sha256sum: {}", String::from_utf8_lossy(&sums.stderr));
        }
        let digest: String = String::from_utf8_lossy(&sums.stdout)
            .chars()
            .take(12)
            .collect();
        let image = format!("mesh-test-node/mesh-agent:{digest}");
        if self.docker(&["image", "inspect", &image]).is_ok() {
            return Ok(image);
        }
        std::fs::write(
            ctx.join("Dockerfile"),
            "FROM scratch\nCOPY rootfs/ /\nENTRYPOINT [\"/mesh-agent\"]\n",
        )?;
        let ctx_arg = ctx.to_str().context("UTF-8 path")?;
        self.docker(&["build", "-q", "-t", &image, ctx_arg])?;
        let _ = std::fs::remove_dir_all(&root);
        Ok(image)
    }

    /// Deploys the mesh as a user does: the agent's image built into the
    /// node's docker ([`Node::build_agent_image`]), `manifests/crds` applied,
    /// and `manifests/deploy` applied as shipped through an overlay
    /// (`kubectl apply -k`) that sets only what this node needs: the image, the
    /// pods' cgroup root (cgroupfs driver on hybrid cgroups), the API server's
    /// address (no kube-proxy here, so the `kubernetes` Service's ClusterIP
    /// does not answer), and a pin dir and run dir of this node's own. Does not
    /// wait for the agent to be Ready. Removed on drop, before the node stops.
    pub fn deploy_mesh(&self, agent_binary: &Path) -> anyhow::Result<MeshDeployed> {
        let image = self.build_agent_image(agent_binary)?;
        let crds = manifests().join("crds");
        self.kubectl(&["apply", "-f", crds.to_str().context("UTF-8 path")?])?;
        for crd in [
            "virtualservices.networking.istio.io",
            "destinationrules.networking.istio.io",
            "gateways.networking.istio.io",
        ] {
            self.kubectl(&[
                "wait",
                "--for=condition=Established",
                "--timeout=60s",
                &format!("crd/{crd}"),
            ])?;
        }
        // Without kube-proxy the `kubernetes` Service's ClusterIP answers
        // nobody: the agent is given the API server's own address.
        let api_server = if self.info.get("kube_proxy").is_some_and(|m| m != "none") {
            String::new()
        } else {
            let server = self.kubectl(&[
                "config",
                "view",
                "--minify",
                "-o",
                "jsonpath={.clusters[0].cluster.server}",
            ])?;
            let hostport = server
                .trim()
                .strip_prefix("https://")
                .with_context(|| format!("API server {server:?}"))?;
            let (host, port) = hostport
                .rsplit_once(':')
                .with_context(|| format!("API server {server:?}"))?;
            format!(
                r#"            # No kube-proxy on this node: the API server's own address,
            # not the kubernetes Service's ClusterIP.
            - name: KUBERNETES_SERVICE_HOST
              value: "{host}"
            - name: KUBERNETES_SERVICE_PORT
              value: "{port}"
"#
            )
        };
        let Mesh {
            overlay,
            uninstall,
            pin_dir,
            run_dir,
            ..
        } = self.mesh_at(agent_binary)?;
        write_kustomization(&overlay, "deploy", &image)?;
        std::fs::write(
            overlay.join("node.yaml"),
            format!(
                r#"# What differs on the test node (scripts/test-node.sh).
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: mesh-agent
  namespace: mesh-system
spec:
  template:
    spec:
      containers:
        - name: agent
          env:
{api_server}            # This node's own, so that nothing else on the machine shares it.
            - name: MESH_PIN_DIR
              value: {pin_dir}
            # The test node is this machine's host network: its real
            # interfaces carry the machine's own traffic and no outside client,
            # so the gateway's per-packet programs stay off them (the node's
            # own processes are still served, at connect).
            - name: MESH_GATEWAY_DEVICE
              value: none
      volumes:
        - name: run
          hostPath:
            path: {run_dir}
"#,
                pin_dir = pin_dir.display(),
                run_dir = run_dir.display()
            ),
        )?;
        // The uninstall as shipped, with the same values.
        write_kustomization(&uninstall, "uninstall", &image)?;
        std::fs::write(
            uninstall.join("node.yaml"),
            format!(
                r#"# What differs on the test node (tools/src/node.rs).
apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: mesh-cleanup
  namespace: mesh-system
spec:
  template:
    spec:
      initContainers:
        - name: cleanup
          env: [{{name: MESH_PIN_DIR, value: {pin_dir}}}]
      containers:
        - name: done
          env: [{{name: MESH_PIN_DIR, value: {pin_dir}}}]
      volumes:
        - name: run
          hostPath:
            path: {run_dir}
"#,
                pin_dir = pin_dir.display(),
                run_dir = run_dir.display()
            ),
        )?;
        *self.mesh.lock().unwrap_or_else(PoisonError::into_inner) = Some(Mesh {
            overlay: overlay.clone(),
            uninstall,
            agent_binary: agent_binary.to_owned(),
            pin_dir: pin_dir.clone(),
            run_dir: run_dir.clone(),
        });
        self.kubectl(&["apply", "-k", overlay.to_str().context("UTF-8 path")?])?;
        Ok(MeshDeployed {
            image,
            overlay,
            pin_dir,
            run_dir,
        })
    }

    /// Waits (bounded) until the agent's DaemonSet has rolled out: its pod
    /// runs the current template and is available.
    pub fn agent_rolled_out(&self) -> anyhow::Result<()> {
        self.kubectl(&[
            "rollout",
            "status",
            "-n",
            "mesh-system",
            "daemonset/mesh-agent",
            "--timeout=180s",
        ])
        .map(drop)
    }

    /// Where [`Node::deploy_mesh`] puts the mesh of this node: the overlay in
    /// the node's directory, a pin dir and run dir named after it.
    fn mesh_at(&self, agent_binary: &Path) -> anyhow::Result<Mesh> {
        let name = self
            .dir
            .file_name()
            .and_then(|n| n.to_str())
            .context("node dir name")?;
        Ok(Mesh {
            overlay: self.dir.join("mesh-overlay"),
            uninstall: self.dir.join("mesh-uninstall"),
            agent_binary: agent_binary.to_owned(),
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/{name}")),
            run_dir: PathBuf::from(format!("/run/{name}")),
        })
    }

    /// Uninstalls a mesh that [`Node::deploy_mesh`] deployed, from any
    /// process (`mesh-cluster down`); nothing to do when none was.
    pub fn remove_deployed_mesh(&self, agent_binary: &Path) -> anyhow::Result<()> {
        let mesh = self.mesh_at(agent_binary)?;
        if mesh.overlay.exists() || mesh.pin_dir.exists() {
            self.remove_mesh(&mesh)?;
        }
        Ok(())
    }

    /// Uninstalls the mesh [`Node::deploy_mesh`] deployed, as a user does
    /// (below), and checks that nothing of it is left on the host. Also done
    /// on drop; a test that calls it sees its errors.
    pub fn uninstall_mesh(&self) -> anyhow::Result<()> {
        let mesh = self
            .mesh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match mesh {
            Some(mesh) => self.remove_mesh(&mesh),
            None => Ok(()),
        }
    }

    /// As a user uninstalls: the agent's DaemonSet deleted (its pod gone),
    /// then manifests/uninstall applied (`mesh-agent cleanup` on the node)
    /// until its pod is Ready, then both deleted. Should that fail (the API
    /// server gone), `mesh-agent cleanup` runs on the host instead, and the
    /// failure is still returned.
    fn remove_mesh(&self, mesh: &Mesh) -> anyhow::Result<()> {
        let shipped = self.delete_agent().and_then(|()| self.run_uninstall(mesh));
        for dir in [&mesh.uninstall, &mesh.overlay] {
            let _ = self.kubectl(&[
                "delete",
                "-k",
                dir.to_str().context("UTF-8 path")?,
                "--ignore-not-found",
                "--wait=false",
            ]);
        }
        if shipped.is_err() {
            let out = Command::new(&mesh.agent_binary)
                .arg("cleanup")
                .arg("--pin-dir")
                .arg(&mesh.pin_dir)
                .arg("--run-dir")
                .arg(&mesh.run_dir)
                .output()
                .context("mesh-agent cleanup")?;
            if !out.status.success() {
                bail!(
                    "mesh-agent cleanup: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        // The hostPath directories the kubelet made (DirectoryOrCreate).
        let _ = std::fs::remove_dir(&mesh.run_dir);
        let _ = std::fs::remove_dir(&mesh.pin_dir);
        shipped.context("uninstalling with manifests/uninstall")?;
        for dir in [&mesh.pin_dir, &mesh.run_dir] {
            if dir.exists() {
                bail!("{} is left after the uninstall", dir.display());
            }
        }
        Ok(())
    }

    /// `kubectl delete daemonset mesh-agent`, until its pods are gone.
    fn delete_agent(&self) -> anyhow::Result<()> {
        self.kubectl(&[
            "delete",
            "daemonset",
            "-n",
            "mesh-system",
            "mesh-agent",
            "--ignore-not-found",
            "--wait=true",
            "--timeout=60s",
        ])?;
        // The kubelet kills a container still there after its 30 s grace
        // period; a loaded machine's docker may take a while more to reap it.
        poll(Duration::from_secs(120), "the agent pods to go", || {
            Ok(self
                .pods("app.kubernetes.io/name=mesh-agent")?
                .is_empty()
                .then_some(()))
        })
    }

    /// manifests/uninstall through its overlay, until its pod is Ready (its
    /// init container cleaned up), then deleted.
    fn run_uninstall(&self, mesh: &Mesh) -> anyhow::Result<()> {
        let dir = mesh.uninstall.to_str().context("UTF-8 path")?;
        self.kubectl(&["apply", "-k", dir])?;
        poll(Duration::from_secs(120), "the cleanup pod Ready", || {
            let pods = self.pods("app.kubernetes.io/name=mesh-cleanup")?;
            Ok(pods.iter().any(is_ready).then_some(()))
        })?;
        self.kubectl(&["delete", "-k", dir, "--wait=true", "--timeout=60s"])?;
        Ok(())
    }

    /// The pods of `selector` in mesh-system.
    fn pods(&self, selector: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        let list = self.kubectl_json(&["get", "pods", "-n", "mesh-system", "-l", selector])?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }
}

/// `DIR/kustomization.yaml`: the shipped `manifests/NAME` as its only
/// resource, the agent's image set, and `node.yaml` as a patch.
fn write_kustomization(dir: &Path, name: &str, image: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    // kustomize takes only relative paths to a base.
    let base = manifests().join(name).canonicalize()?;
    let up = "../".repeat(dir.canonicalize()?.components().count() - 1);
    let base = format!(
        "{up}{}",
        base.strip_prefix("/").context("absolute")?.display()
    );
    let (image_name, tag) = image.rsplit_once(':').context("image tag")?;
    std::fs::write(
        dir.join("kustomization.yaml"),
        format!(
            r#"# The test node's overlay of the shipped manifests/{name} (tools/src/node.rs).
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {base}
images:
  - name: mesh-agent
    newName: {image_name}
    newTag: "{tag}"
patches:
  - path: node.yaml
"#,
        ),
    )?;
    Ok(())
}

impl Drop for Node {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Some(mesh) = self
            .mesh
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            && let Err(e) = self.remove_mesh(&mesh)
        {
            eprintln!("removing the mesh from the test node: {e:#}");
        }
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

/// Stops the node of `dir` (if any runs) and removes what it made, `dir`
/// included: `mesh-cluster down`. Remove its mesh first
/// ([`Node::remove_deployed_mesh`]).
pub fn stop(dir: &Path) -> anyhow::Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let ok = Command::new("bash")
        .arg(script())
        .arg("stop")
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!(
            "the node in {} was not stopped cleanly; its state is kept",
            dir.display()
        );
    }
    std::fs::remove_dir_all(dir)?;
    Ok(())
}

/// Whether the node runs kube-proxy (`MESH_TEST_NODE_KUBE_PROXY`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KubeProxy {
    None,
    /// iptables mode, `--masquerade-all`: a backend reached through it sees
    /// the node's bridge address as the client (docs/node.md).
    Iptables,
}

/// `test-node.sh start DIR`: the kubeconfig it prints once the node is Ready.
fn run_start(dir: &Path, kube_proxy: KubeProxy) -> anyhow::Result<PathBuf> {
    let mode = match kube_proxy {
        KubeProxy::None => "none",
        KubeProxy::Iptables => "iptables",
    };
    let out = Command::new("bash")
        .arg(script())
        .arg("start")
        .arg(dir)
        .env("MESH_TEST_NODE_KUBE_PROXY", mode)
        .stderr(Stdio::inherit())
        .output()?;
    if !out.status.success() {
        bail!("the node did not start (build it with `scripts/test-node.sh build`)");
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

/// A node left running by a test process that was killed without unwinding
/// (its directory is `/tmp/mesh-node-<pid>x<n>` and that pid is gone): stopped,
/// so that this process may start one.
fn stop_stale() {
    stop_stale_node();
    sweep_agent_dirs();
}

fn stop_stale_node() {
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
    if pid.is_empty() || alive(&pid) {
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

/// An agent's pin dir and run dir (deploy_mesh) of a node whose test process
/// is gone, however the node was stopped: removing the pins is what
/// `mesh-agent cleanup` does (links go with their last reference, and the
/// programs detach).
fn sweep_agent_dirs() {
    for dir in ["/sys/fs/bpf", "/run"] {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("mesh-node-") else {
                continue;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            if !pid.is_empty() && rest[pid.len()..].starts_with('x') && !alive(&pid) {
                eprintln!(
                    "removing {} of a stale node's agent",
                    entry.path().display()
                );
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Process `pid` runs (a zombie does not: a test process SIGKILLed whose parent
/// has not reaped it yet).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'))
    })
}

/// Whether a pod (as `kubectl get -o json` shows it) is Ready.
pub fn is_ready(pod: &serde_json::Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// An error that waiting will not mend: [`poll`] fails at once on it.
#[derive(Debug)]
pub struct Permanent(pub String);

impl std::fmt::Display for Permanent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Permanent {}

/// Polls `f` every 200 ms until it returns `Some`, for at most `timeout`;
/// fails with `what` and the last error `f` returned (at once if that is
/// [`Permanent`]).
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
            Err(e) if e.downcast_ref::<Permanent>().is_some() => {
                return Err(e.context(format!("waiting for {what}")));
            }
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
