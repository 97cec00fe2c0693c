//! `mesh-cluster` (`cargo xtask cluster up|down|status`, `cargo xtask demo
//! --cluster`): a real single-node Kubernetes on this machine
//! (`scripts/test-node.sh`: kubelet on docker, every controller, its own API
//! server) that stays up, with the mesh deployed as shipped
//! (`manifests/deploy` through an overlay), and the seed's story on it.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_tools::{
    agent::sibling_binary,
    node::{self, MeshDeployed, Node, poll},
    seed,
};

#[derive(Debug, Parser)]
struct Args {
    /// Where the cluster keeps its state (short: docker's sockets live there).
    #[arg(long, global = true, default_value = "/tmp/mesh-cluster")]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start the node (idempotent), deploy the mesh, print the exports.
    Up,
    /// Uninstall the mesh and stop the node; nothing is left behind.
    Down,
    /// Whether it runs, its node, pods and the exports.
    Status,
    /// The seed's story on the node (brings it up first).
    Demo {
        /// Seconds to show each split.
        #[arg(long, default_value_t = 8)]
        seconds: u64,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Up => {
            up(&args.dir)?;
            print_exports(&args.dir);
            Ok(())
        }
        Cmd::Down => down(&args.dir),
        Cmd::Status => status(&args.dir),
        Cmd::Demo { seconds } => {
            let (node, mesh) = up(&args.dir)?;
            demo(&node, &mesh.run_dir, Duration::from_secs(seconds))?;
            println!();
            println!("The cluster stays up for your own kubectl commands:");
            print_exports(&args.dir);
            println!("Take it down with: cargo xtask cluster down");
            Ok(())
        }
    }
}

fn agent_binary() -> anyhow::Result<PathBuf> {
    sibling_binary("mesh-agent")
}

/// The node up and the mesh on it, its agent Ready.
fn up(dir: &Path) -> anyhow::Result<(Node, MeshDeployed)> {
    let t0 = Instant::now();
    let node = Node::up(dir)?;
    let mesh = node.deploy_mesh(&agent_binary()?)?;
    // Until the DaemonSet's pod runs this image (an `up` after a rebuild
    // rolls it).
    node.agent_rolled_out()
        .with_context(|| node.diagnostics())?;
    let agent = seed::wait_ready(&node, "mesh-system", "app.kubernetes.io/name=mesh-agent", 1)?;
    eprintln!(
        "mesh-cluster: up in {:.1?}: node Ready, agent {} Ready (image {}, pins in {})",
        t0.elapsed(),
        agent[0],
        mesh.image,
        mesh.pin_dir.display()
    );
    Ok((node, mesh))
}

fn down(dir: &Path) -> anyhow::Result<()> {
    // The node stops even when the uninstall failed (its fallback has cleaned
    // the host then); the failure is still reported.
    let uninstalled = match Node::running(dir)? {
        Some(node) => node.remove_deployed_mesh(&agent_binary()?),
        None => Ok(()),
    };
    node::stop(dir)?;
    uninstalled?;
    eprintln!("mesh-cluster: down; nothing of {} is left", dir.display());
    Ok(())
}

fn status(dir: &Path) -> anyhow::Result<()> {
    let Some(node) = Node::running(dir)? else {
        println!("not running (start it with: cargo xtask cluster up)");
        return Ok(());
    };
    for args in [
        &["get", "nodes", "-o", "wide"][..],
        &["get", "pods", "-A", "-o", "wide"],
    ] {
        println!("$ kubectl {}", args.join(" "));
        println!("{}", node.kubectl(args)?);
    }
    print_exports(dir);
    Ok(())
}

fn print_exports(dir: &Path) {
    println!("export KUBECONFIG={}", dir.join("kubeconfig").display());
    println!(
        "export DOCKER_HOST=unix://{}",
        dir.join("docker.sock").display()
    );
}

/// Shows a command, runs it, shows what it printed.
fn kubectl(node: &Node, args: &[&str]) -> anyhow::Result<String> {
    println!("$ kubectl {}", args.join(" "));
    let out = node.kubectl(args)?;
    for line in out.lines() {
        println!("  {line}");
    }
    Ok(out)
}

fn apply(node: &Node, file: &str) -> anyhow::Result<()> {
    let path = format!("manifests/examples/seed/{file}");
    println!("$ kubectl apply -f {path}");
    for line in seed::apply(node, file)?.lines() {
        println!("  {line}");
    }
    Ok(())
}

/// Requests from the client pod for `how_long`, in batches, the split by
/// version after each.
fn watch_split(node: &Node, addr: &str, how_long: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let mut total = seed::Answers::default();
    let mut shown = Duration::ZERO;
    while t0.elapsed() < how_long {
        let batch = seed::from_client(node, "default", addr, 50)?;
        for (version, n) in &batch.by_version {
            *total.by_version.entry(version.clone()).or_insert(0) += n;
        }
        total.failed.extend(batch.failed);
        // About a line a second, and the last one.
        let done = t0.elapsed() >= how_long;
        if t0.elapsed() < shown + Duration::from_secs(1) && !done {
            continue;
        }
        shown = t0.elapsed();
        let all: u32 = total.by_version.values().sum();
        let shares: Vec<String> = total
            .by_version
            .iter()
            .map(|(v, n)| format!("{v} {:5.1}%", 100.0 * f64::from(*n) / f64::from(all.max(1))))
            .collect();
        println!(
            "  {:>5.1}s  {} connections: {}  failed {}  (visits in redis: {})",
            t0.elapsed().as_secs_f64(),
            all,
            shares.join("  "),
            total.failed.len(),
            batch.last_visits.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// The seed, step by step, as its user types it.
fn demo(node: &Node, run_dir: &Path, each: Duration) -> anyhow::Result<()> {
    // A second run starts the story again.
    for what in [
        "virtualservice/flaskapp",
        "destinationrule/flaskapp",
        "deployment/flaskapp-v2",
        "gateway/flaskapp-gateway",
    ] {
        node.kubectl(&["delete", what, "--ignore-not-found", "--wait=true"])?;
    }
    println!("\n# 1. Mesh the namespace, run flaskapp (3 pods of v1) and redis");
    kubectl(
        node,
        &[
            "label",
            "namespace",
            "default",
            "istio-injection=enabled",
            "--overwrite",
        ],
    )?;
    apply(node, "flaskapp.yaml")?;
    apply(node, "client.yaml")?;
    seed::wait_ready(node, "default", "app=redis", 1)?;
    seed::wait_ready(node, "default", "app=business,version=v1", 3)?;
    seed::wait_ready(node, "default", "app=client", 1)?;
    let addr = format!("{}:5000", seed::cluster_ip(node, "default", "flaskapp")?);
    println!(
        "$ kubectl exec client -- /client {} 3",
        addr.replace(':', " ")
    );
    poll(Duration::from_secs(60), "the client pod meshed", || {
        let a = seed::from_client(node, "default", &addr, 1)?;
        Ok(a.failed.is_empty().then_some(()))
    })?;
    let out = node.kubectl(&[
        "exec",
        "client",
        "--",
        "/client",
        addr.split(':').next().unwrap_or_default(),
        "5000",
        "3",
    ])?;
    for line in out.lines() {
        println!("  {line}");
    }

    println!("\n# 2. Deploy flaskapp-v2: without a VirtualService, even over 4 pods");
    apply(node, "flaskapp-v2.yaml")?;
    seed::wait_ready(node, "default", "app=business,version=v2", 1)?;
    watch_split(node, &addr, each)?;

    println!("\n# 3. The canary: a DestinationRule (subsets) and the VirtualService at 80/20");
    apply(node, "destinationrule.yaml")?;
    apply(node, "virtualservice.yaml")?;
    seed::in_the_kernel(run_dir, "default/flaskapp", "80/20 in the kernel", |d| {
        d.iter().map(|(w, _)| *w).eq([80, 20])
    })?;
    watch_split(node, &addr, each)?;

    println!("\n# 4. Change it live: kubectl edit virtualservice flaskapp (80/20 -> 50/50)");
    let t = Instant::now();
    seed::edit(
        node,
        "virtualservice/flaskapp",
        &[("weight: 80", "weight: 50"), ("weight: 20", "weight: 50")],
    )?;
    seed::in_the_kernel(run_dir, "default/flaskapp", "50/50 in the kernel", |d| {
        d.iter().map(|(w, _)| *w).eq([50, 50])
    })?;
    println!("  in the kernel {:.0?} after the edit", t.elapsed());
    watch_split(node, &addr, each)?;

    println!("\n# 5. The seed's gateway: kubectl apply -f gateway.yaml, then curl on the node");
    apply(node, "gateway.yaml")?;
    curl_localhost("http://localhost/", 200)?;
    curl_localhost("http://localhost/other", 404)?;
    println!("\n# 6. gateway2.yaml: / as before, every other path 80/20 between v1 and v2");
    apply(node, "gateway2.yaml")?;
    curl_localhost("http://localhost/", 200)?;
    curl_localhost("http://localhost/other", 200)?;
    println!("\n# 7. kubectl edit virtualservice flaskapp (the gateway's: 80/20 -> 50/50)");
    seed::edit(
        node,
        "virtualservice/flaskapp",
        &[("weight: 80", "weight: 50"), ("weight: 20", "weight: 50")],
    )?;
    curl_localhost("http://localhost/other", 200)?;
    Ok(())
}

/// `curl` on the node, as the seed's user runs it: 200 requests, once every
/// one gets `expect` (the agents apply the Gateway and its VirtualService as
/// they arrive: for a moment the port may have no route yet, a 404, as in
/// Istio): who answered how often.
fn curl_localhost(url: &str, expect: u16) -> anyhow::Result<()> {
    const N: u64 = 200;
    let what = format!("every request to {url} answered {expect}");
    let got = poll(Duration::from_secs(60), &what, || {
        Ok(mesh_tools::curl::curl_here(url, N)
            .ok()
            .filter(|c| c.codes.get(&expect) == Some(&N)))
    })?;
    let codes: Vec<String> = got
        .codes
        .iter()
        .map(|(c, n)| format!("{n} x {c}"))
        .collect();
    println!("$ curl {url}   ({N} requests: {})", codes.join(", "));
    for (pod, n) in &got.pods {
        println!("  {pod:<36} {n:>4}  {:5.1}%", 100.0 * *n as f64 / N as f64);
    }
    Ok(())
}
