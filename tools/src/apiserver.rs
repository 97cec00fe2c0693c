//! A real kube-apiserver (with etcd and kube-controller-manager) on loopback, from
//! `scripts/test-apiserver.sh`, stopped on drop; and kubectl against it.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
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
    /// which `cargo xtask test` runs).
    pub fn start() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(crate::unique("mesh-apiserver-"));
        let out = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            let _ = Command::new("bash")
                .arg(script())
                .arg("stop")
                .arg(&dir)
                .status();
            // No guard exists yet to remove it.
            let _ = std::fs::remove_dir_all(&dir);
            bail!(
                "test API server did not start (build it with `scripts/test-apiserver.sh build`)"
            );
        }
        let kubeconfig = PathBuf::from(String::from_utf8(out.stdout)?.trim());
        Ok(ApiServer { dir, kubeconfig })
    }

    /// The Istio CRDs we ship, `discovery.k8s.io/v1` EndpointSlices (this 1.20
    /// server serves v1beta1 only; a CRD stands in), and `default` labelled as a
    /// mesh namespace.
    pub fn install_mesh_crds(&self) -> anyhow::Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for crd in [
            "manifests/crds/virtualservices.yaml",
            "manifests/crds/destinationrules.yaml",
            "tools/fixtures/endpointslice-v1-crd.yaml",
        ] {
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
        self.kubectl(&["label", "namespace", "default", "istio-injection=enabled"])?;
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
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {app}, version: {version}}}\nspec:\n  containers: [{{name: {app}, image: istio/examples-flaskapp, ports: [{{name: http, containerPort: 5000}}]}}]\n"
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
