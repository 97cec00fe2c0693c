//! `mesh-demo` (run by `cargo xtask demo`): the seed's canary release on this
//! machine. Three flaskapp v1 pods and one v2 pod as network namespaces, the real
//! agent on the example manifests, a client in the mesh cgroup calling the Service
//! VIP, the split shown live; then the VirtualService is edited from 80/20 to 50/50
//! and the split moves. Then the seed's gateway: its `gateway.yaml` and
//! `gateway2.yaml` applied as they are, and `curl http://localhost/...` on the
//! node as the seed's user runs it, each path's answers counted; then a live
//! edit of the gateway's weights. Ctrl-C cleans everything up.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Parser;
use mesh_tools::{
    agent::Agent,
    backend::Backend,
    cgroup::Cgroup,
    manifests::ManifestDir,
    netns::Node,
    probe::{self, Summary},
};

#[derive(Debug, Parser)]
struct Args {
    /// The example manifests (Service, Pods, DestinationRule, VirtualService).
    #[arg(long, default_value = "manifests/examples/flaskapp")]
    manifests: PathBuf,
    /// Seconds to show each split.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::Relaxed);
}

/// (pod, version, host number): must match the example Pods' IPs (10.244.0.N).
const PODS: [(&str, &str, u8); 4] = [
    ("flaskapp-v1-0", "v1", 11),
    ("flaskapp-v1-1", "v1", 12),
    ("flaskapp-v1-2", "v1", 13),
    ("flaskapp-v2-0", "v2", 21),
];
const VIP: &str = "10.96.0.80:5000";
/// The node's address on the pods' bridge (the agent runs in the node's
/// namespace, where the gateway serves `localhost` and this address).
const NODE_ADDR: &str = "10.244.0.1";
/// The seed's gateway files.
const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/examples/seed");

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    mesh_tools::require_root();
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(on_sigint),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        nix::sys::signal::sigaction(nix::sys::signal::Signal::SIGINT, &action)?;
    }

    println!("== Setting up: one node, a client pod and four flaskapp pods (network namespaces)");
    let mut node = Node::new()?;
    node.bridge
        .ip(&["addr", "add", &format!("{NODE_ADDR}/24"), "dev", "br0"])?;
    node.add_pod("client", 2)?;
    let mut backends = Vec::new();
    for (name, version, host) in PODS {
        let pod = node.add_pod(name, host)?;
        println!("   pod {name:<14} version {version}  {}", pod.ipv4);
        backends.push(Backend::spawn(&pod.ns, name, version, 5000)?);
    }
    // The agent watches a copy, so the demo's edit never touches the repository.
    let dir = ManifestDir::new()?;
    for entry in std::fs::read_dir(&args.manifests)
        .with_context(|| format!("reading {}", args.manifests.display()))?
    {
        let path = entry?.path();
        if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
            dir.write(name, &std::fs::read_to_string(&path)?)?;
        }
    }
    let cgroup = Cgroup::create(&mesh_tools::unique("mesh-demo-"))?;
    println!(
        "== Starting mesh-agent --source file:{} --cgroup {}",
        dir.path().display(),
        cgroup.path().display()
    );
    let mut agent = Agent::start_in_netns(dir.path(), cgroup.path(), &node.bridge, &[])?;

    println!(
        "\n== VirtualService flaskapp: v1 80%, v2 20%. Client in the mesh cgroup -> http://{VIP}/"
    );
    show_split(&node, &cgroup, args.seconds)?;
    if !INTERRUPTED.load(Ordering::Relaxed) {
        let file = dir.path().join("virtualservice.yaml");
        let edited = std::fs::read_to_string(&file)?
            .replace("weight: 80", "weight: 50")
            .replace("weight: 20", "weight: 50");
        let next = agent.generation() + 1;
        let started = Instant::now();
        dir.write("virtualservice.yaml", &edited)?;
        agent.wait_applied(next, Duration::from_secs(10))?;
        println!(
            "\n== Edited virtualservice.yaml: 80/20 -> 50/50; in the kernel {:.0} ms after the save",
            started.elapsed().as_secs_f64() * 1000.0
        );
        show_split(&node, &cgroup, args.seconds)?;
    }
    if !INTERRUPTED.load(Ordering::Relaxed) {
        gateway(&node, &cgroup, &dir, &mut agent)?;
    }
    if INTERRUPTED.load(Ordering::Relaxed) {
        println!("\ninterrupted");
    }
    println!("== Cleaning up: agent, pods, cgroup");
    drop(agent);
    drop(backends);
    drop((cgroup, node, dir));
    println!("done");
    Ok(())
}

/// The seed's gateway, as its user runs it: `kubectl apply -f gateway.yaml`,
/// `curl http://localhost/`; then `gateway2.yaml`, and a live weight edit.
fn gateway(
    node: &Node,
    cgroup: &Cgroup,
    dir: &ManifestDir,
    agent: &mut Agent,
) -> anyhow::Result<()> {
    let apply = |agent: &mut Agent, file: &str, text: &str| -> anyhow::Result<()> {
        let next = agent.generation() + 1;
        dir.write(file, text)?;
        agent.wait_applied(next, Duration::from_secs(10))?;
        Ok(())
    };
    let seed = |name: &str| std::fs::read_to_string(format!("{SEED}/{name}"));
    // The seed's gateway VirtualService is named flaskapp too: it replaces
    // the mesh one, as `kubectl apply` does in the seed.
    std::fs::remove_file(dir.path().join("virtualservice.yaml"))?;
    println!(
        "\n== The seed's gateway.yaml (Gateway flaskapp-gateway, port 80; VirtualService: uri exact / -> flaskapp:5000)"
    );
    apply(agent, "gateway.yaml", &seed("gateway.yaml")?)?;
    curl_show(node, cgroup, "http://localhost/")?;
    curl_show(node, cgroup, "http://localhost/other")?;
    println!("\n== The seed's gateway2.yaml (adds a route for every other path: v1 80%, v2 20%)");
    apply(agent, "gateway.yaml", &seed("gateway2.yaml")?)?;
    curl_show(node, cgroup, "http://localhost/")?;
    curl_show(node, cgroup, "http://localhost/other")?;
    curl_show(node, cgroup, &format!("http://{NODE_ADDR}/hello"))?;
    println!("\n   mesh-agent explain 127.0.0.1:80 says:");
    for line in agent.cli(&["explain", "127.0.0.1:80"])?.lines() {
        println!("   | {line}");
    }
    if INTERRUPTED.load(Ordering::Relaxed) {
        return Ok(());
    }
    let started = Instant::now();
    let edited = seed("gateway2.yaml")?
        .replace("weight: 80", "weight: 50")
        .replace("weight: 20", "weight: 50");
    apply(agent, "gateway.yaml", &edited)?;
    println!(
        "\n== kubectl edit virtualservice flaskapp: 80/20 -> 50/50; served {:.0} ms after the save",
        started.elapsed().as_secs_f64() * 1000.0
    );
    curl_show(node, cgroup, "http://localhost/other")?;
    Ok(())
}

/// 200 requests of one real `curl` on the node; who answered, how often.
fn curl_show(node: &Node, cgroup: &Cgroup, url: &str) -> anyhow::Result<()> {
    const N: u64 = 200;
    let got = mesh_tools::curl::curl(&node.bridge, Some(cgroup), url, N)?;
    let codes: Vec<String> = got
        .codes
        .iter()
        .map(|(c, n)| format!("{n} x {c}"))
        .collect();
    println!("   $ curl {url}   ({N} requests: {})", codes.join(", "));
    for (pod, n) in &got.pods {
        println!(
            "          {pod:<14} {n:>4}  {:5.1}%",
            100.0 * *n as f64 / N as f64
        );
    }
    Ok(())
}

/// Runs the probe for `seconds`, printing each second's split and the total.
fn show_split(node: &Node, cgroup: &Cgroup, seconds: u64) -> anyhow::Result<()> {
    let args: Vec<String> = [
        "--target",
        VIP,
        "--duration-ms",
        &(seconds * 1000).to_string(),
        "--interval-ms",
        "1000",
        "--concurrency",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut child = probe::spawn(&node.pod("client").ns, Some(cgroup), &args)?;
    let stdout = child.stdout.take().context("probe stdout")?;
    let mut total = None;
    for line in BufReader::new(stdout).lines() {
        let summary: Summary = serde_json::from_str(&line?)?;
        if summary.interval {
            println!(
                "   t={:>2}s  {}",
                (summary.elapsed_ms + 500) / 1000,
                describe(&summary)
            );
        } else {
            total = Some(summary);
        }
        if INTERRUPTED.load(Ordering::Relaxed) {
            let _ = child.kill();
            break;
        }
    }
    let _ = child.wait();
    if let Some(total) = total {
        println!("   total  {}", describe(&total));
        for (pod, n) in &total.backends {
            println!(
                "          {pod:<14} {n:>6}  {:5.1}%",
                100.0 * *n as f64 / total.ok.max(1) as f64
            );
        }
        let peers: Vec<&String> = total.peers.keys().collect();
        println!("          getpeername() saw {peers:?}");
    }
    Ok(())
}

fn describe(s: &Summary) -> String {
    format!(
        "v1 {:5.1}%  v2 {:5.1}%  ({} connections, {} failed)",
        100.0 * s.share("flaskapp-v1"),
        100.0 * s.share("flaskapp-v2"),
        s.ok,
        s.failed()
    )
}
