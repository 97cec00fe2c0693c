//! The seed's story on a real node ([`crate::node`]): its manifests
//! (`manifests/examples/seed`), its pods as `kubectl` reports them, requests
//! from its client pod, and what the agent records of the kernel's tables.
//! Shared by the node tests and `mesh-cluster demo`.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;
use serde_json::Value;

use crate::node::{Node, Permanent, is_ready};

/// `manifests/examples/seed/NAME`.
pub fn manifest(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../manifests/examples/seed")
        .join(name)
}

/// `kubectl apply -f manifests/examples/seed/NAME` (in the kubeconfig's
/// namespace, `default`, as the seed's user applies it).
pub fn apply(node: &Node, name: &str) -> anyhow::Result<String> {
    let path = manifest(name);
    node.kubectl(&["apply", "-f", path.to_str().context("UTF-8 path")?])
}

/// A pod that is Ready.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadyPod {
    pub name: String,
    pub ip: Option<IpAddr>,
}

/// The ready pods of `selector` in `ns`, once there are exactly `n` (for
/// [`crate::node::poll`]). A container that cannot start (bad image, bad
/// config) fails at once, as [`Permanent`]: waiting will not help.
pub fn ready_pods(
    node: &Node,
    ns: &str,
    selector: &str,
    n: usize,
) -> anyhow::Result<Option<Vec<ReadyPod>>> {
    let list = node.kubectl_json(&["get", "pods", "-n", ns, "-l", selector])?;
    let items = list["items"].as_array().context("items")?;
    for p in items {
        for c in p["status"]["containerStatuses"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let waiting = &c["state"]["waiting"];
            if let Some(reason) = waiting["reason"].as_str()
                && matches!(
                    reason,
                    "CreateContainerError"
                        | "CreateContainerConfigError"
                        | "ErrImageNeverPull"
                        | "ErrImagePull"
                        | "ImagePullBackOff"
                        | "InvalidImageName"
                )
            {
                return Err(Permanent(format!(
                    "pod {ns}/{}: {reason}: {}",
                    p["metadata"]["name"].as_str().unwrap_or("?"),
                    waiting["message"].as_str().unwrap_or("")
                ))
                .into());
            }
        }
    }
    let pods: Vec<ReadyPod> = items
        .iter()
        .filter(|p| is_ready(p))
        .filter_map(|p| {
            Some(ReadyPod {
                name: p["metadata"]["name"].as_str()?.to_owned(),
                ip: p["status"]["podIP"].as_str().and_then(|s| s.parse().ok()),
            })
        })
        .collect();
    Ok((pods.len() == n).then_some(pods))
}

/// The names of [`ready_pods`].
pub fn ready_names(
    node: &Node,
    ns: &str,
    selector: &str,
    n: usize,
) -> anyhow::Result<Option<Vec<String>>> {
    Ok(ready_pods(node, ns, selector, n)?.map(|p| p.into_iter().map(|p| p.name).collect()))
}

/// Waits (bounded: 3 minutes, image loads and probes included) for exactly
/// `n` ready pods of `selector` in `ns`: their names.
pub fn wait_ready(node: &Node, ns: &str, selector: &str, n: usize) -> anyhow::Result<Vec<String>> {
    crate::node::poll(
        std::time::Duration::from_secs(180),
        &format!("{n} ready pods of {ns}/{selector}"),
        || ready_names(node, ns, selector, n),
    )
}

/// The ClusterIP of Service `ns/name`.
pub fn cluster_ip(node: &Node, ns: &str, name: &str) -> anyhow::Result<IpAddr> {
    let ip = node.kubectl(&[
        "get",
        "service",
        "-n",
        ns,
        name,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    ip.trim()
        .parse()
        .with_context(|| format!("service {ns}/{name} has no ClusterIP: {ip:?}"))
}

/// What the flaskapp pods answered a client pod's requests.
#[derive(Clone, Debug, Default)]
pub struct Answers {
    /// Answers per flaskapp pod (its host name).
    pub by_pod: BTreeMap<String, u32>,
    /// Answers per version (`version=` of the answer).
    pub by_version: BTreeMap<String, u32>,
    /// The client addresses the pods saw (`client=<ip>:<port>`): the client
    /// pod's own when the mesh connected it, the node's bridge address when
    /// kube-proxy (`--masquerade-all`) did.
    pub clients: std::collections::BTreeSet<IpAddr>,
    /// The last visit count redis gave (`visits=`), if any answer had one.
    pub last_visits: Option<String>,
    /// Failed requests, as `/client` reported them (`error ...`).
    pub failed: Vec<String>,
}

impl Answers {
    /// Answers given by `pods`, and all answers.
    pub fn share(&self, pods: &[String]) -> (u32, u32) {
        let total = self.by_pod.values().sum();
        let hit = pods.iter().filter_map(|p| self.by_pod.get(p)).sum();
        (hit, total)
    }

    fn add(&mut self, line: &str) {
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .map(str::to_owned)
        };
        match field("host=") {
            Some(host) => {
                *self.by_pod.entry(host).or_insert(0) += 1;
                let version = field("version=").unwrap_or_else(|| "?".into());
                *self.by_version.entry(version).or_insert(0) += 1;
                if let Some(v) = field("visits=") {
                    self.last_visits = Some(v);
                }
                if let Some(addr) =
                    field("client=").and_then(|c| c.parse::<std::net::SocketAddr>().ok())
                {
                    self.clients.insert(addr.ip());
                }
            }
            None => self.failed.push(line.to_owned()),
        }
    }
}

/// `n` requests, one connection each, one after another, from the pod
/// `client` of `ns` to `addr` (`/client` of the flaskapp image).
pub fn from_client(node: &Node, ns: &str, addr: &str, n: u32) -> anyhow::Result<Answers> {
    let (ip, port) = addr.split_once(':').context("addr")?;
    // /client exits 1 when a request failed: its output says which.
    let out = client(node, ns, &[ip, port, &n.to_string()])?;
    let mut answers = Answers::default();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        answers.add(line);
    }
    if answers.by_pod.is_empty() && answers.failed.is_empty() {
        anyhow::bail!(
            "kubectl exec client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(answers)
}

/// What the agent recorded (`state.json` in its run dir, a hostPath) of the
/// kernel's table for `service` (`ns/name`): (weight, backends) per
/// destination; `None` while it has none.
pub fn kernel_destinations(run_dir: &Path, service: &str) -> Option<Vec<(u64, usize)>> {
    let text = std::fs::read_to_string(run_dir.join("state.json")).ok()?;
    let record: Value = serde_json::from_str(&text).ok()?;
    let entry = record["services"]
        .as_array()?
        .iter()
        .find(|s| s["service"] == service)?;
    entry["destinations"]
        .as_array()?
        .iter()
        .map(|d| Some((d["weight"].as_u64()?, d["backends"].as_array()?.len())))
        .collect()
}

/// `kubectl edit RESOURCE` as a user makes it, with an editor that replaces
/// each `(from, to)` on the lines of the object as kubectl shows it.
pub fn edit(node: &Node, resource: &str, replace: &[(&str, &str)]) -> anyhow::Result<()> {
    let editor = node.dir.join("editor.sh");
    let mut script = String::from("#!/bin/sh\nset -e\n");
    for (from, to) in replace {
        script += &format!("sed -i 's/^\\( *\\){from}$/\\1{to}/' \"$1\"\n");
    }
    std::fs::write(&editor, script)?;
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "chmod +x {0} && KUBE_EDITOR={0} kubectl edit {resource}",
            editor.display()
        ))
        .env("KUBECONFIG", &node.kubeconfig)
        .status()?;
    anyhow::ensure!(status.success(), "kubectl edit {resource} failed");
    Ok(())
}

/// What a storm of `/client --storm` counted.
#[derive(Clone, Debug, Default)]
pub struct Storm {
    pub ok: u64,
    pub failed: u64,
    /// `error <what> <count>` lines: each failure reason and how often.
    pub errors: Vec<String>,
    /// Answers per flaskapp pod.
    pub by_pod: BTreeMap<String, u64>,
}

const STORM_OUT: &str = "/tmp/storm";

/// Starts a connect storm from the pod `client` of `ns` to `addr`: `threads`
/// loops of connect + `GET /`, in the background until [`stop_storm`].
pub fn start_storm(node: &Node, ns: &str, addr: &str, threads: u32) -> anyhow::Result<()> {
    let (ip, port) = addr.split_once(':').context("addr")?;
    let threads = threads.to_string();
    let out = client(
        node,
        ns,
        &[
            "--storm",
            "0",
            "--threads",
            &threads,
            "--daemon",
            "--out",
            STORM_OUT,
            ip,
            port,
        ],
    )?;
    anyhow::ensure!(
        out.status.success(),
        "starting the storm: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Stops the storm [`start_storm`] started and reads what it counted.
pub fn stop_storm(node: &Node, ns: &str) -> anyhow::Result<Storm> {
    // Exits 1 when a request failed: the summary says which.
    let out = client(node, ns, &["--stop-storm", STORM_OUT])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut storm = Storm::default();
    let mut summary = false;
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [ok, failed] if ok.starts_with("ok=") && failed.starts_with("failed=") => {
                storm.ok = ok["ok=".len()..].parse()?;
                storm.failed = failed["failed=".len()..].parse()?;
                summary = true;
            }
            ["host", name, count] => {
                storm.by_pod.insert((*name).to_owned(), count.parse()?);
            }
            ["error", ..] => storm.errors.push(line.to_owned()),
            _ => {}
        }
    }
    anyhow::ensure!(
        summary,
        "no storm summary from the client pod: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(storm)
}

/// `kubectl exec -n NS client -- /client ARGS`, whatever its exit status.
fn client(node: &Node, ns: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(Command::new("kubectl")
        .args(["exec", "-n", ns, "client", "--", "/client"])
        .args(args)
        .env("KUBECONFIG", &node.kubeconfig)
        .output()?)
}

/// Polls (bounded: 30 s) until the agent's record of `service`'s table
/// ([`kernel_destinations`]) satisfies `done`.
pub fn in_the_kernel(
    run_dir: &Path,
    service: &str,
    what: &str,
    done: impl Fn(&[(u64, usize)]) -> bool,
) -> anyhow::Result<()> {
    let destinations = || kernel_destinations(run_dir, service);
    crate::node::poll(std::time::Duration::from_secs(30), what, || {
        Ok(destinations().filter(|d| done(d)).map(drop))
    })
    .with_context(|| format!("the agent's record: {:?}", destinations()))
}
