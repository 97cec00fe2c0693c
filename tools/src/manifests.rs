//! Manifests for the file source, written the way a user would write them, into a
//! temporary folder that is removed on drop.

use std::{
    fmt::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context as _;

#[derive(Debug)]
pub struct ManifestDir {
    pub path: PathBuf,
}

impl ManifestDir {
    pub fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(crate::unique("mesh-manifests-"));
        std::fs::create_dir_all(&path)?;
        Ok(ManifestDir { path })
    }

    /// Writes `file` whole, as an editor saving it would (write aside, rename).
    pub fn write(&self, file: &str, content: &str) -> anyhow::Result<()> {
        let tmp = self.path.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, self.path.join(file)).context("rename")
    }

    pub fn remove(&self, file: &str) -> anyhow::Result<()> {
        Ok(std::fs::remove_file(self.path.join(file))?)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A Service selecting `app=<name>`, on one or two cluster IPs.
pub fn service(name: &str, vips: &[IpAddr], port: u16, target_port: u16) -> String {
    let ips: Vec<String> = vips.iter().map(ToString::to_string).collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  clusterIP: {first}\n  clusterIPs: [{all}]\n  selector:\n    app: {name}\n  ports:\n    - name: http\n      port: {port}\n      targetPort: {target_port}\n",
        first = ips[0],
        all = ips.join(", "),
    )
}

/// A pod of `app`, `version`, with its IPs and Ready condition.
pub fn pod(name: &str, app: &str, version: &str, ips: &[IpAddr], ready: bool) -> String {
    pod_annotated(name, app, version, ips, ready, &[])
}

/// The same, with annotations.
pub fn pod_annotated(
    name: &str,
    app: &str,
    version: &str,
    ips: &[IpAddr],
    ready: bool,
    annotations: &[(&str, &str)],
) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    app: {app}\n    version: {version}\n"
    );
    if !annotations.is_empty() {
        s.push_str("  annotations:\n");
        for (k, v) in annotations {
            let _ = writeln!(s, "    {k}: \"{v}\"");
        }
    }
    let _ = write!(
        s,
        "status:\n  phase: Running\n  podIP: {}\n  podIPs:\n",
        ips[0]
    );
    for ip in ips {
        let _ = writeln!(s, "    - ip: {ip}");
    }
    let _ = write!(
        s,
        "  conditions:\n    - type: Ready\n      status: \"{}\"\n",
        if ready { "True" } else { "False" }
    );
    s
}

/// A DestinationRule with one subset per `version`.
pub fn destination_rule(host: &str, versions: &[&str]) -> String {
    let mut s = format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: DestinationRule\nmetadata:\n  name: {host}\n  namespace: default\nspec:\n  host: {host}\n  subsets:\n"
    );
    for v in versions {
        let _ = write!(s, "    - name: {v}\n      labels:\n        version: {v}\n");
    }
    s
}

/// A VirtualService splitting `host` over subsets by weight.
pub fn virtual_service(host: &str, weights: &[(&str, i64)]) -> String {
    let mut s = format!(
        "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata:\n  name: {host}\n  namespace: default\nspec:\n  hosts:\n    - {host}\n  http:\n    - route:\n"
    );
    for (subset, weight) in weights {
        let _ = write!(
            s,
            "        - destination:\n            host: {host}\n            subset: {subset}\n          weight: {weight}\n"
        );
    }
    s
}
