//! A real `curl` in a pod's (or the node's) network namespace, and what it got:
//! answers per pod (`Hello World by <pod> ...`) and status codes.

use std::{
    collections::BTreeMap,
    path::Path,
    process::{Command, Stdio},
};

use crate::{cgroup::Cgroup, netns::Netns};

/// What `count` requests of one `curl` got.
#[derive(Debug, Default)]
pub struct Curled {
    /// Answers per pod, from the backends' `Hello World by <pod>` bodies (the
    /// test backends) or `host=<pod> ...` (the seed's flaskapp image).
    pub pods: BTreeMap<String, u64>,
    pub codes: BTreeMap<u16, u64>,
}

impl Curled {
    /// The share of answers from pods whose name starts with `prefix`.
    pub fn share(&self, prefix: &str) -> f64 {
        let total: u64 = self.pods.values().sum();
        let hits: u64 = self
            .pods
            .iter()
            .filter(|(p, _)| p.starts_with(prefix))
            .map(|(_, n)| n)
            .sum();
        hits as f64 / total.max(1) as f64
    }
}

/// One `curl` making `count` requests to `url` from `ns` (inside `cgroup`
/// when given). curl keeps its connection alive between them, so a router
/// decides per request.
pub fn curl(ns: &Netns, cgroup: Option<&Cgroup>, url: &str, count: u64) -> anyhow::Result<Curled> {
    let args = args(url, count);
    let child = crate::spawn_in_pod(Path::new("curl"), ns, cgroup, &args)?;
    collect(child, url, count)
}

/// The same from this process's own network namespace and cgroup (the
/// node's, on a real node).
pub fn curl_here(url: &str, count: u64) -> anyhow::Result<Curled> {
    let child = Command::new("curl")
        .args(args(url, count))
        .stdout(Stdio::piped())
        .spawn()?;
    collect(child, url, count)
}

fn args(url: &str, count: u64) -> Vec<&str> {
    let mut args = vec!["-sS", "--max-time", "60", "-w", "\ncode=%{http_code}\n"];
    args.extend(std::iter::repeat_n(url, count as usize));
    args
}

fn collect(child: std::process::Child, url: &str, count: u64) -> anyhow::Result<Curled> {
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut curled = Curled::default();
    for line in text.lines() {
        if let Some(code) = line.strip_prefix("code=") {
            *curled.codes.entry(code.trim().parse()?).or_default() += 1;
        } else if let Some(rest) = line
            .strip_prefix("Hello World by ")
            .or_else(|| line.strip_prefix("host="))
        {
            let pod = rest.split_whitespace().next().unwrap_or_default();
            *curled.pods.entry(pod.to_owned()).or_default() += 1;
        }
    }
    let answered: u64 = curled.codes.values().sum();
    anyhow::ensure!(
        answered == count,
        "curl {url}: {answered} answers of {count} ({}): {text:.400}",
        out.status
    );
    Ok(curled)
}
