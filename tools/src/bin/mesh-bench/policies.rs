//! The per-connect cost of each load-balancing policy beside plain weighted
//! random: the connect4 program's own run time per call, from the kernel's BPF
//! run-time statistics (switched on for this section only, through a
//! `BPF_ENABLE_STATS` descriptor held meanwhile), and the client's connects
//! per second beside it. The program's time is what a policy adds to a
//! connect; the rate is the whole connect, where the policy is lost in noise.
//!
//! One topology: a client pod and four pods of one Service on its IPv4 VIP,
//! the agent with the file source; each round applies every policy in a random
//! order (rewriting the Service and its DestinationRule, waiting for the
//! apply), then makes `CONNECTS` connections from the client with each.

use std::{fmt::Write as _, time::Duration};

use mesh_tools::{
    agent::Agent,
    backend::Backend,
    cgroup::Cgroup,
    manifests::{self, ManifestDir},
    netns::Node,
    probe,
};
use rand::{SeedableRng as _, seq::SliceRandom as _};

use crate::report::median;

const VIP: &str = "10.96.0.80";
const PORT: u16 = 5000;
const PODS: [&str; 4] = ["pod-0", "pod-1", "pod-2", "pod-3"];

/// One policy: the Service's extra `spec` lines, the DestinationRule's
/// `trafficPolicy` (YAML flow), or none, and its subsets' lines with a
/// VirtualService splitting 50/50 between subsets v1 and v2, or none.
struct Policy {
    name: &'static str,
    service: &'static str,
    traffic_policy: Option<&'static str>,
    subsets: Option<&'static str>,
}

const POLICIES: [Policy; 7] = [
    Policy {
        name: "weighted random (no policy)",
        service: "",
        traffic_policy: None,
        subsets: None,
    },
    Policy {
        name: "sessionAffinity: ClientIP",
        service: "  sessionAffinity: ClientIP\n",
        traffic_policy: None,
        subsets: None,
    },
    Policy {
        name: "consistentHash.useSourceIp (Maglev, 16381 slots)",
        service: "",
        traffic_policy: Some("{loadBalancer: {consistentHash: {useSourceIp: true}}}"),
        subsets: None,
    },
    Policy {
        name: "LEAST_REQUEST (open connections, two drawn)",
        service: "",
        traffic_policy: Some("{loadBalancer: {simple: LEAST_REQUEST}}"),
        subsets: None,
    },
    Policy {
        name: "connectionPool.tcp (connectTimeout, keepalive, maxConnections)",
        service: "",
        traffic_policy: Some(
            "{connectionPool: {tcp: {connectTimeout: 5s, maxConnections: 100000, tcpKeepalive: {time: 60s}}}}",
        ),
        subsets: None,
    },
    Policy {
        name: "a 50/50 route over subsets v1/v2 (one table)",
        service: "",
        traffic_policy: None,
        subsets: Some(
            "    - {name: v1, labels: {version: v1}}\n    - {name: v2, labels: {version: v2}}\n",
        ),
    },
    Policy {
        name: "the same route, v1 hashing its clients (a table per destination)",
        service: "",
        traffic_policy: None,
        subsets: Some(
            "    - {name: v1, labels: {version: v1}, trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}}\n    - {name: v2, labels: {version: v2}}\n",
        ),
    },
];

pub fn policies(r: &mut String, quick: bool, rounds: usize) -> anyhow::Result<()> {
    let connects: u64 = if quick { 300 } else { 3000 };
    let mut node = Node::new()?;
    node.add_pod("client", 2)?;
    let dir = ManifestDir::new()?;
    let mut backends = Vec::new();
    let mut pods = Vec::new();
    for (i, name) in PODS.iter().enumerate() {
        let pod = node.add_pod(name, 11 + i as u8)?;
        backends.push(Backend::spawn(&pod.ns, name, "v1", PORT)?);
        let version = if i < 2 { "v1" } else { "v2" };
        pods.push(manifests::pod(name, "bench", version, &[pod.ipv4], true));
    }
    dir.write("pods.yaml", &pods.join("---\n"))?;
    let cgroup = Cgroup::create(&mesh_tools::unique("mesh-bench-"))?;
    write_policy(&dir, &POLICIES[0])?;
    // The shortcut on: LEAST_REQUEST's and maxConnections' counts are sockops'.
    let mut agent = Agent::start_flags(dir.path(), cgroup.path(), &[])?;
    let connect4 = program_id(&agent, "mesh_connect4")?;
    // Statistics run while this descriptor is open, for this section only.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;

    let mut ns_per_run = vec![Vec::new(); POLICIES.len()];
    let mut rates = vec![Vec::new(); POLICIES.len()];
    let mut rng = rand::rngs::StdRng::seed_from_u64(14);
    let mut order: Vec<usize> = (0..POLICIES.len()).collect();
    let mut applied = 0;
    for _ in 0..rounds {
        order.shuffle(&mut rng);
        for &i in &order {
            if i != applied {
                let next = agent.generation() + 1;
                write_policy(&dir, &POLICIES[i])?;
                agent.wait_applied(next, Duration::from_secs(10))?;
                applied = i;
            }
            let before = run_stats(connect4)?;
            let seen = probe::probe(
                &node.pod("client").ns,
                Some(&cgroup),
                &format!("{VIP}:80"),
                connects,
                1,
            )?;
            let after = run_stats(connect4)?;
            anyhow::ensure!(seen.failed() == 0, "{}: {seen:?}", POLICIES[i].name);
            let (time, runs) = (after.0 - before.0, after.1 - before.1);
            ns_per_run[i].push(time.as_nanos() as f64 / runs.max(1) as f64);
            rates[i].push(seen.ok as f64 / (seen.elapsed_ms.max(1) as f64 / 1e3));
        }
    }
    drop(agent);
    drop(backends);

    let _ = writeln!(
        r,
        "\n## Load-balancing policies: the cost per connect\n\nThe connect4 program's own run time per call (the kernel's BPF run-time statistics), and the client's connects per second, {connects} connections per policy and round, {rounds} rounds, policies in a random order each round; medians. A client pod, four pods of one Service (IPv4 VIP), the same-node shortcut on (the pods' servers are not meshed, so no connection is redirected; sockops runs and counts).\n\n| policy | connect4 ns per call | vs weighted random | connects/s |\n|---|---|---|---|"
    );
    let base = median(&mut ns_per_run[0].clone());
    for (i, policy) in POLICIES.iter().enumerate() {
        let ns = median(&mut ns_per_run[i]);
        let _ = writeln!(
            r,
            "| {} | {ns:.0} | {:.2}x | {:.0} |",
            policy.name,
            ns / base,
            median(&mut rates[i])
        );
    }
    Ok(())
}

/// The Service (with the policy's lines) and its DestinationRule, in one
/// file: one change, one apply.
fn write_policy(dir: &ManifestDir, policy: &Policy) -> anyhow::Result<()> {
    let traffic = policy
        .traffic_policy
        .map_or_else(String::new, |p| format!("  trafficPolicy: {p}\n"));
    let split = policy.subsets.map_or_else(String::new, |subsets| {
        format!(
            "  subsets:\n{subsets}---\n{}",
            manifests::virtual_service("bench", &[("v1", 50), ("v2", 50)])
        )
    });
    dir.write(
        "policy.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: bench, namespace: default}}\nspec:\n  clusterIP: {VIP}\n  selector: {{app: bench}}\n  ports: [{{name: http, port: 80, targetPort: {PORT}}}]\n{}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: bench, namespace: default}}\nspec:\n  host: bench\n{traffic}{split}",
            policy.service
        ),
    )
}

/// The id of the agent's program `name`, as `mesh-agent status` reports it.
fn program_id(agent: &Agent, name: &str) -> anyhow::Result<u32> {
    let status: serde_json::Value =
        serde_json::from_str(&agent.cli(&["status", "--output", "json"])?)?;
    status["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["program_id"].as_u64())
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| anyhow::anyhow!("no program {name} in the agent's status: {status}"))
}

/// The program's accumulated run time and run count.
fn run_stats(id: u32) -> anyhow::Result<(Duration, u64)> {
    for info in aya::programs::loaded_programs() {
        let info = info?;
        if info.id() == id {
            return Ok((info.run_time(), info.run_count()));
        }
    }
    anyhow::bail!("program {id} is not loaded")
}
