//! Operating the agent: SIGKILL and restart, a config changed while it was down,
//! an upgrade that brings other program code, SIGTERM, and `mesh-agent cleanup`;
//! through the real kernel, with a client connecting as fast as it can meanwhile.

mod common;

use std::time::Duration;

use common::{Canary, V2, VIP4, assert_share, vip4};
use mesh_tools::{manifests, probe};

/// A meshed client in the client pod connecting to the VIP for `ms`, 4 at a time.
fn background_probe(canary: &Canary, ms: u64) -> anyhow::Result<std::process::Child> {
    probe::spawn(
        &canary.node.pod("client").ns,
        Some(&canary.cgroup),
        &[
            "--target".into(),
            vip4(),
            "--duration-ms".into(),
            ms.to_string(),
            "--concurrency".into(),
            "4".into(),
        ],
    )
}

fn field(record: Option<&serde_json::Value>, name: &str) -> Option<u64> {
    record.and_then(|r| r[name].as_u64())
}

#[test]
fn sigkill_and_restart_lose_no_connection_and_keep_the_split() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    let client = background_probe(&canary, 4000)?;
    std::thread::sleep(Duration::from_millis(1000));
    canary.agent.kill()?;
    // Nobody home for a second: the pinned programs and maps keep routing.
    std::thread::sleep(Duration::from_millis(1000));
    canary.agent.restart(&[])?;
    let seen = probe::finish(client)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert!(seen.ok > 1000, "{seen:?}");
    assert_share(
        seen.share(V2),
        0.20,
        seen.ok,
        "80/20 across the kill and restart",
    );

    // The new agent took the kernel's tables over and rewrote nothing.
    let adopted = canary
        .agent
        .records("kernel object loaded; pinned state adopted");
    assert_eq!(field(adopted.first(), "services"), Some(2), "{adopted:?}");
    let applied = canary.agent.records("config applied");
    assert_eq!(field(applied.first(), "written"), Some(0), "{applied:?}");
    // connect4/6, getpeername4/6, sockops, the gateway's connect4/6 and the
    // router's sockops.
    assert_eq!(canary.agent.records("program unchanged").len(), 8);
    Ok(())
}

#[test]
fn a_change_made_while_the_agent_was_down_applies_without_a_gap() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    canary.agent.kill()?;
    canary.dir.write(
        "virtualservice.yaml",
        &manifests::virtual_service("flaskapp", &[("v1", 50), ("v2", 50)]),
    )?;
    let client = background_probe(&canary, 3000)?;
    std::thread::sleep(Duration::from_millis(500));
    canary.agent.restart(&[])?;
    let across = probe::finish(client)?;
    assert_eq!(across.failed(), 0, "{across:?}");
    let applied = canary.agent.records("config applied");
    assert_eq!(
        field(applied.first(), "written"),
        Some(2),
        "both VIPs: {applied:?}"
    );
    let after = canary.probe(&vip4(), 2000)?;
    assert_eq!(after.failed(), 0, "{after:?}");
    assert_share(
        after.share(V2),
        0.50,
        after.ok,
        "the change made while down",
    );
    Ok(())
}

#[test]
fn an_upgrade_swaps_changed_programs_live() -> anyhow::Result<()> {
    let variant = mesh_tools::agent::upgrade_test_object()?;
    let mut canary = Canary::start(Some((80, 20)))?;
    let client = background_probe(&canary, 4000)?;
    std::thread::sleep(Duration::from_millis(1000));
    canary.agent.stop()?;
    canary
        .agent
        .restart(&["--ebpf-object", &variant.display().to_string()])?;
    let seen = probe::finish(client)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_eq!(
        seen.peers.keys().collect::<Vec<_>>(),
        [&vip4()],
        "getpeername answered the VIP before, during and after the swap"
    );
    // Only getpeername4 differs in the new object; it was swapped in place.
    let swapped = swapped_programs(&canary.agent);
    assert_eq!(swapped, ["mesh_getpeername4"]);
    assert_eq!(canary.agent.records("program unchanged").len(), 7);

    // The kernel runs the new code: only it counts PEER_REWRITTEN_BY_VARIANT.
    let after = canary.probe(&vip4(), 200)?;
    assert_eq!(after.ok, 200, "{after:?}");
    canary.agent.stop()?;
    let counters = canary.agent.records("connect counters");
    let by_variant = field(counters.first(), "peer_rewritten_by_variant").unwrap_or(0);
    assert!(by_variant >= 200, "{counters:?}");
    Ok(())
}

#[test]
fn sigterm_keeps_routing_and_cleanup_removes_everything_of_ours() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    let status: serde_json::Value =
        serde_json::from_str(&canary.agent.cli(&["status", "--output", "json"])?)?;
    let program_ids: Vec<u32> = status["programs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["program_id"].as_u64().and_then(|i| u32::try_from(i).ok()))
        .collect();
    let map_ids: Vec<u32> = status["maps"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_u64().and_then(|i| u32::try_from(i).ok()))
        .collect();
    assert_eq!(
        (program_ids.len(), map_ids.len()),
        (8, mesh_common::map_names::ALL.len()),
        "{status}"
    );

    // Something else in bpffs, next to ours: cleanup must leave it alone.
    let neighbour =
        std::path::PathBuf::from(format!("/sys/fs/bpf/{}", mesh_tools::unique("mesh-test-")));
    std::fs::create_dir(&neighbour)?;
    let _neighbour_guard = RemoveDir(neighbour.clone());

    canary.agent.stop()?;
    let after_stop = canary.probe(&vip4(), 400)?;
    assert_eq!(
        after_stop.ok, 400,
        "still routed after SIGTERM: {after_stop:?}"
    );

    let out = canary.agent.cli(&["cleanup"])?;
    assert!(out.contains("unpinned"), "{out}");
    assert!(!canary.agent.pin_dir.exists(), "pin dir left behind");
    assert!(!canary.agent.run_dir.exists(), "run dir left behind");
    assert!(neighbour.exists(), "cleanup touched something not ours");
    let gone = probe::probe(
        &canary.node.pod("client").ns,
        Some(&canary.cgroup),
        &format!("{VIP4}:80"),
        5,
        1,
    )?;
    assert_eq!(gone.errors.get("ENETUNREACH"), Some(&5), "{gone:?}");
    // The kernel frees programs and maps once nothing holds them (RCU): wait.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let programs: Vec<u32> = aya::programs::loaded_programs()
            .flatten()
            .map(|p| p.id())
            .filter(|id| program_ids.contains(id))
            .collect();
        let maps: Vec<u32> = aya::maps::loaded_maps()
            .flatten()
            .map(|m| m.id())
            .filter(|id| map_ids.contains(id))
            .collect();
        if programs.is_empty() && maps.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still loaded: programs {programs:?}, maps {maps:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

#[test]
fn one_agent_per_pin_dir_and_cleanup_refuses_under_a_running_agent() -> anyhow::Result<()> {
    let canary = Canary::start(Some((80, 20)))?;
    let second_run_dir = tempdir_for(&canary.agent.run_dir);
    let second = std::process::Command::new(mesh_tools::agent::sibling_binary("mesh-agent")?)
        .args([
            "run",
            "--metrics-addr",
            "off",
            "--log-format",
            "text",
            "--source",
        ])
        .arg(format!("file:{}", canary.dir.path().display()))
        .arg("--cgroup")
        .arg(canary.cgroup.path())
        .arg("--pin-dir")
        .arg(&canary.agent.pin_dir)
        .arg("--run-dir")
        .arg(&second_run_dir)
        .output()?;
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "a second agent started: {stderr}");
    assert!(
        stderr.contains("another mesh-agent is running on"),
        "{stderr}"
    );
    assert!(!second_run_dir.exists(), "the second agent wrote a record");
    // Its log went to a pipe, not a terminal: no colour codes for `kubectl logs`.
    assert!(stderr.contains("mesh-agent starting"), "{stderr}");
    assert!(
        !stderr.contains('\x1b'),
        "ANSI escapes in a piped log: {stderr:?}"
    );

    // cleanup under the running agent is refused, and nothing is detached.
    let refused = canary.agent.cli(&["cleanup"]).err().map(|e| e.to_string());
    assert!(
        refused
            .as_deref()
            .is_some_and(|e| e.contains("another mesh-agent is running on")),
        "{refused:?}"
    );
    assert!(canary.agent.pin_dir.exists());
    let still = canary.probe(&vip4(), 200)?;
    assert_eq!(still.ok, 200, "{still:?}");
    assert_share(still.share(V2), 0.20, still.ok, "the first agent routes on");

    // --force does it anyway.
    let out = canary.agent.cli(&["cleanup", "--force"])?;
    assert!(out.contains("unpinned"), "{out}");
    assert!(!canary.agent.pin_dir.exists());
    Ok(())
}

fn tempdir_for(run_dir: &std::path::Path) -> std::path::PathBuf {
    let mut name = run_dir.as_os_str().to_owned();
    name.push("-second");
    std::path::PathBuf::from(name)
}

#[test]
fn replacing_the_service_or_the_slot_map_alone_fails_no_connect() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    // A capacity change is an upgrade that replaces one map and keeps the rest.
    for capacity in ["SLOTS_V1=1048576", "SLOTS_V1=1048576,SERVICES_V1=65536"] {
        let client = background_probe(&canary, 3000)?;
        std::thread::sleep(Duration::from_millis(500));
        canary.agent.kill()?;
        canary.agent.restart(&["--map-capacity", capacity])?;
        let across = probe::finish(client)?;
        assert_eq!(across.failed(), 0, "{capacity}: {across:?}");
        assert!(across.ok > 500, "{capacity}: {across:?}");
        assert_share(across.share(V2), 0.20, across.ok, capacity);
        let replaced = canary.agent.messages("INFO").join("\n");
        assert!(
            replaced.contains("read together with a replaced map"),
            "{capacity}: {}",
            canary.agent.log_text()
        );
    }
    Ok(())
}

#[test]
fn a_restart_keeps_the_kernels_tables_while_the_source_is_unreadable_or_broken()
-> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    let still_80_20 = |canary: &Canary, what: &str| -> anyhow::Result<()> {
        let seen = canary.probe(&vip4(), 1000)?;
        assert_eq!(seen.failed(), 0, "{what}: {seen:?}");
        assert_share(seen.share(V2), 0.20, seen.ok, what);
        Ok(())
    };

    // The folder is not there when the agent starts (a volume not mounted yet).
    canary.agent.kill()?;
    let away = MovedAway::new(canary.dir.path())?;
    canary.agent.respawn(&[])?;
    canary.agent.wait_logged(
        "WARN",
        "sending nothing until it can be read",
        Duration::from_secs(10),
    )?;
    still_80_20(&canary, "while the folder is missing")?;
    assert_eq!(
        canary.agent.generation(),
        0,
        "nothing applied from an unreadable folder"
    );
    drop(away);
    canary.agent.wait_applied(1, Duration::from_secs(20))?;
    still_80_20(&canary, "once the folder is back")?;

    // A VirtualService this agent never saw valid: the kernel's table stays.
    canary.agent.kill()?;
    canary.dir.write(
        "virtualservice.yaml",
        &manifests::virtual_service("flaskapp", &[("v1", -1), ("v2", 20)]),
    )?;
    canary.agent.restart(&[])?;
    still_80_20(&canary, "with a broken VirtualService at start")?;
    let applied = canary.agent.records("config applied");
    assert_eq!(field(applied.last(), "held"), Some(2), "{applied:?}");
    assert!(
        canary
            .agent
            .messages("ERROR")
            .iter()
            .any(|m| m.contains("weight -1 is negative")),
        "{}",
        canary.agent.log_text()
    );
    // A valid version replaces it.
    canary.set_weights(50, 50)?;
    let seen = canary.probe(&vip4(), 1000)?;
    assert_share(
        seen.share(V2),
        0.50,
        seen.ok,
        "the fixed VirtualService applies",
    );

    // The Service's own file does not parse at start: its tables stay too.
    canary.agent.kill()?;
    canary.dir.write("service.yaml", "kind: [unclosed")?;
    canary.agent.restart(&[])?;
    let seen = canary.probe(&vip4(), 1000)?;
    assert_eq!(seen.failed(), 0, "{seen:?}");
    assert_share(
        seen.share(V2),
        0.50,
        seen.ok,
        "with an unparsable Service file at start",
    );
    let applied = canary.agent.records("config applied");
    assert_eq!(field(applied.last(), "held"), Some(2), "{applied:?}");
    Ok(())
}

/// A folder moved aside, and put back on drop (also when the test fails).
struct MovedAway {
    path: std::path::PathBuf,
    aside: std::path::PathBuf,
}

impl MovedAway {
    fn new(path: &std::path::Path) -> anyhow::Result<Self> {
        let aside = path.with_extension("aside");
        std::fs::rename(path, &aside)?;
        Ok(Self {
            path: path.to_owned(),
            aside,
        })
    }
}

impl Drop for MovedAway {
    fn drop(&mut self) {
        if let Err(e) = std::fs::rename(&self.aside, &self.path) {
            eprintln!("putting {} back: {e}", self.path.display());
        }
    }
}

struct RemoveDir(std::path::PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[test]
fn metrics_agree_with_what_the_client_saw() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    let seen = canary.probe(&vip4(), 600)?;
    assert_eq!(seen.ok, 600, "{seen:?}");
    let agent = &canary.agent;
    let service = r#"service="default/flaskapp""#;
    let address = format!(r#"address="{VIP4}:80/TCP""#);
    assert_eq!(
        agent.metric_with("mesh_service_connections_total", &[service, &address])?,
        600
    );
    for (pod, n) in &seen.backends {
        let backend = format!(r#"backend="{}:5000""#, canary.node.pod(pod).ipv4);
        assert_eq!(
            agent.metric_with("mesh_backend_connections_total", &[&backend])?,
            *n,
            "{pod}"
        );
    }
    // Two service ports (IPv4 and IPv6 VIP), 15-slot tables each.
    assert_eq!(
        agent.metric_with("mesh_map_entries", &[r#"map="SERVICES_V1""#])?,
        2
    );
    assert_eq!(
        agent.metric_with("mesh_map_entries", &[r#"map="SLOTS_V1""#])?,
        30
    );
    assert_eq!(
        agent.metric_with("mesh_map_capacity", &[r#"map="SERVICES_V1""#])?,
        131_072
    );
    assert_eq!(
        agent.metric_with("mesh_build_info", &[r#"ebpf_object="embedded""#])?,
        1
    );
    let latency = agent.metric("mesh_config_sync_latency_seconds_count")?;
    assert!(latency >= 1, "{latency}");

    // A rejected VirtualService shows up by kind and reason, and goes when fixed.
    canary.write(
        "virtualservice.yaml",
        &manifests::virtual_service("flaskapp", &[("v1", -5), ("v2", 20)]),
    )?;
    let rejected = [
        r#"kind="VirtualService""#,
        r#"reason="spec.http.route.weight""#,
    ];
    assert_eq!(
        canary
            .agent
            .metric_with("mesh_rejected_objects", &rejected)?,
        1
    );
    canary.set_weights(50, 50)?;
    // Cleared once fixed (a write can be seen as two changes: poll, bounded).
    mesh_tools::node::poll(Duration::from_secs(10), "the rejection cleared", || {
        Ok(canary
            .agent
            .metric_with("mesh_rejected_objects", &rejected)
            .is_err()
            .then_some(()))
    })?;
    Ok(())
}

#[test]
fn status_dump_and_explain_read_the_pinned_state_with_or_without_an_agent() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    for running in [true, false] {
        let agent = &canary.agent;
        let status: serde_json::Value =
            serde_json::from_str(&agent.cli(&["status", "--output", "json"])?)?;
        assert_eq!(status["agent"]["running"], running, "{status}");
        assert_eq!(status["programs"].as_array().map(Vec::len), Some(8));
        assert_eq!(status["services"], 2, "{status}");
        assert_eq!(status["backends"], 8, "4 pods, IPv4 and IPv6: {status}");
        let slots = status["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == "SLOTS_V1")
            .and_then(|m| m["entries"].as_u64());
        assert_eq!(slots, Some(30), "{status}");
        // Kernel memory, from the maps' fdinfo: a hash map pays 16 B per bucket
        // for its whole capacity, then each slot its key and value (16 + 24 B)
        // and the kernel's element header on top.
        let map = |name: &str| {
            status["maps"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|m| m["name"] == name)
                .cloned()
                .unwrap_or_default()
        };
        let slot_map = map("SLOTS_V1");
        let buckets = slot_map["capacity"]
            .as_u64()
            .map_or(0, u64::next_power_of_two);
        let slot_bytes = slot_map["bytes"].as_u64().unwrap_or(0);
        assert!(slot_bytes >= 16 * buckets + 30 * 40, "{status}");
        let total: u64 = status["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["bytes"].as_u64())
            .sum();
        assert_eq!(status["memory"]["total_bytes"].as_u64(), Some(total));
        let services_bytes: u64 = ["SERVICES_V1", "SERVICE_STATS_V1", "SOCKET_POLICY_V1"]
            .iter()
            .filter_map(|m| map(m)["bytes"].as_u64())
            .sum();
        assert_eq!(
            status["memory"]["per_service"].as_u64(),
            Some(services_bytes / 2),
            "{status}"
        );
        if running {
            assert_eq!(
                agent.metric_with("mesh_map_memory_bytes", &[r#"map="SLOTS_V1""#])?,
                slot_bytes,
                "/metrics and status read the same kernel account"
            );
        }

        let dump: serde_json::Value =
            serde_json::from_str(&agent.cli(&["dump", "--output", "json"])?)?;
        let v4 = dump
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["vip"] == VIP4)
            .cloned()
            .unwrap_or_default();
        assert_eq!(v4["service"], "default/flaskapp", "{dump}");
        assert_eq!(v4["slot_count"], 15, "{dump}");
        let destinations: Vec<(String, u64, Vec<u64>)> = v4["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                (
                    d["name"].as_str().unwrap_or("").to_owned(),
                    d["weight"].as_u64().unwrap_or(0),
                    d["backends"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|b| b["slots"].as_u64())
                        .collect(),
                )
            })
            .collect();
        assert_eq!(
            destinations,
            [
                (
                    "flaskapp.default.svc.cluster.local subset v1".to_owned(),
                    80,
                    vec![4, 4, 4]
                ),
                (
                    "flaskapp.default.svc.cluster.local subset v2".to_owned(),
                    20,
                    vec![3]
                ),
            ]
        );

        let explain = agent.cli(&["explain", &vip4()])?;
        assert!(
            explain.contains("route: VirtualService default/flaskapp spec.http[0]")
                && explain.contains("26.67%")
                && explain.contains("20.00%"),
            "{explain}"
        );
        let elsewhere = agent.cli(&["explain", "10.96.0.99:80"])?;
        assert!(elsewhere.contains("not a mesh service port"), "{elsewhere}");
        if running {
            canary.agent.stop()?;
        }
    }
    let missing = std::process::Command::new(mesh_tools::agent::sibling_binary("mesh-agent")?)
        .args(["status", "--pin-dir", "/sys/fs/bpf/mesh-test-none"])
        .output()?;
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("no pinned state at /sys/fs/bpf/mesh-test-none"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn a_pinned_map_of_another_layout_is_replaced_never_misread() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    canary.agent.stop()?;
    // Where SERVICES_V1 is pinned, put a map of another layout (value 4 bytes,
    // 65 536 entries), as a build with other types under the same name would.
    let maps = canary.agent.pin_dir.join("maps");
    std::fs::remove_file(maps.join("SERVICES_V1"))?;
    aya::maps::MapData::from_pin(maps.join("REDIRECT_EXCLUDED_V1"))?
        .pin(maps.join("SERVICES_V1"))?;
    let client = background_probe(&canary, 3000)?;
    std::thread::sleep(Duration::from_millis(500));
    canary.agent.restart(&[])?;
    let across = probe::finish(client)?;
    assert_eq!(across.failed(), 0, "{across:?}");
    let replaced = canary.agent.records(
        "pinned map has another layout; replacing it (its contents are rebuilt from the source)",
    );
    assert_eq!(
        replaced.first().and_then(|r| r["map"].as_str()),
        Some("SERVICES_V1"),
        "{replaced:?}"
    );
    // The programs that read the map now read the new one: swapped in place.
    let swapped = swapped_programs(&canary.agent);
    assert_eq!(
        swapped,
        [
            "mesh_connect4",
            "mesh_connect6",
            "mesh_gateway_connect4",
            "mesh_gateway_connect6"
        ]
    );
    let after = canary.probe(&vip4(), 2000)?;
    assert_eq!(after.failed(), 0, "{after:?}");
    assert_share(after.share(V2), 0.20, after.ok, "80/20 on the new map");
    Ok(())
}

/// Connections held open in the client pod (in the mesh cgroup) across an
/// upgrade, by `mesh-probe --hold`: it prints what `getpeername` says for each
/// before, and again once told to.
struct HeldSockets {
    child: std::process::Child,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    go: std::path::PathBuf,
}

const HELD: usize = 8;

impl HeldSockets {
    /// Opens the sockets and returns what `getpeername` says for each.
    fn open(canary: &Canary) -> anyhow::Result<(Self, Vec<String>)> {
        use std::io::BufRead as _;
        let go = std::env::temp_dir().join(mesh_tools::unique("mesh-test-hold-"));
        let args = [
            "--target".to_owned(),
            vip4(),
            "--hold".to_owned(),
            HELD.to_string(),
            "--until".to_owned(),
            go.display().to_string(),
        ];
        let mut child = probe::spawn(&canary.node.pod("client").ns, Some(&canary.cgroup), &args)?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut held = Self {
            child,
            lines: std::io::BufReader::new(stdout).lines(),
            go,
        };
        let before = held.peers()?;
        Ok((held, before))
    }

    /// Tells the prober to look again, and returns what it saw.
    fn peers_again(mut self) -> anyhow::Result<Vec<String>> {
        std::fs::write(&self.go, "")?;
        let after = self.peers();
        let _ = std::fs::remove_file(&self.go);
        after
    }

    fn peers(&mut self) -> anyhow::Result<Vec<String>> {
        for line in self.lines.by_ref() {
            if let Some(peers) = line?.strip_prefix("held peers: ") {
                return Ok(peers.split(' ').map(str::to_owned).collect());
            }
        }
        anyhow::bail!("mesh-probe --hold ended without a report")
    }
}

impl Drop for HeldSockets {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.go);
    }
}

/// The value of `mesh_service_connections_total` of the IPv4 VIP, and the sum
/// of `mesh_backend_connections_total` over the IPv4 backends.
fn connection_counters(canary: &Canary) -> anyhow::Result<(u64, u64)> {
    let service = canary.agent.metric_with(
        "mesh_service_connections_total",
        &[
            r#"service="default/flaskapp""#,
            &format!(r#"address="{VIP4}:80/TCP""#),
        ],
    )?;
    let mut backends = 0;
    for (name, _, ips, _) in &canary.pods {
        let backend = format!(r#"backend="{}:5000""#, ips[0]);
        backends += canary
            .agent
            .metric_with("mesh_backend_connections_total", &[&backend])
            .map_err(|e| anyhow::anyhow!("{name}: {e}"))?;
    }
    Ok((service, backends))
}

/// Maps named in the agent's log as replaced: for their layout (or capacity),
/// or for being read together with one.
fn replaced_maps(canary: &Canary) -> Vec<String> {
    let mut maps: Vec<String> = [
        "pinned map has another layout; replacing it (its contents are rebuilt from the source)",
        "replacing it too: it is read together with a replaced map",
    ]
    .iter()
    .flat_map(|m| canary.agent.records(m))
    .filter_map(|r| r["map"].as_str().map(str::to_owned))
    .collect();
    maps.sort();
    maps
}

#[test]
fn replacing_revnat_alone_fails_no_connect_and_keeps_the_vip_of_open_sockets() -> anyhow::Result<()>
{
    let mut canary = Canary::start(Some((80, 20)))?;
    let (held, before) = HeldSockets::open(&canary)?;
    assert_eq!(before, vec![vip4(); HELD]);
    let client = background_probe(&canary, 3000)?;
    std::thread::sleep(Duration::from_millis(500));
    canary.agent.kill()?;
    canary
        .agent
        .restart(&["--map-capacity", "REVNAT_V1=131072"])?;
    let across = probe::finish(client)?;
    assert_eq!(across.failed(), 0, "{across:?}");
    assert!(across.ok > 500, "{across:?}");
    assert_eq!(replaced_maps(&canary), ["REVNAT_V1"]);
    // Sockets connected long before the upgrade still see the VIP: their
    // records went over to the new map.
    assert_eq!(held.peers_again()?, vec![vip4(); HELD]);
    let carried = canary
        .agent
        .records("socket records carried over from the replaced map");
    let when: Vec<&str> = carried.iter().filter_map(|r| r["when"].as_str()).collect();
    assert_eq!(
        when,
        ["at load", "before the swap", "after the swap"],
        "{carried:?}"
    );
    let first = field(carried.first(), "records").unwrap_or(0);
    assert!(first >= HELD as u64, "{carried:?}");
    // The storm's own getpeername, right after each connect, saw the VIP but
    // for the few that asked in the one-swap window kernel/carry.rs describes:
    // at most one per prober thread in each of its two windows.
    let vip = across.peers.get(&vip4()).copied().unwrap_or(0);
    assert!(across.ok - vip <= 8, "{across:?}");
    let swapped = swapped_programs(&canary.agent);
    assert_eq!(
        swapped,
        [
            "mesh_connect4",
            "mesh_connect6",
            "mesh_gateway_connect4",
            "mesh_gateway_connect6",
            "mesh_getpeername4",
            "mesh_getpeername6",
            "mesh_router_sockops",
            "mesh_sockops",
        ]
    );
    Ok(())
}

#[test]
fn replacing_any_other_map_alone_fails_no_connect_and_keeps_the_counters() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    // One more map of another capacity each time; the earlier ones keep theirs,
    // so that only this one is replaced (and what is read together with it).
    let steps: [(&str, &[&str]); 5] = [
        ("BACKEND_STATS_V1=131072", &["BACKEND_STATS_V1"]),
        ("SERVICE_STATS_V1=65536", &["SERVICE_STATS_V1"]),
        ("REDIRECT_EXCLUDED_V1=32768", &["REDIRECT_EXCLUDED_V1"]),
        ("SOCK_CONN_V1=65536", &["SOCKETS_V2", "SOCK_CONN_V1"]),
        ("SOCKETS_V2=65536", &["SOCKETS_V2", "SOCK_CONN_V1"]),
    ];
    let mut capacities: Vec<&str> = Vec::new();
    for (capacity, replaced) in steps {
        capacities.push(capacity);
        let flag = capacities.join(",");
        let (service0, backends0) = connection_counters(&canary)?;
        let client = background_probe(&canary, 2000)?;
        std::thread::sleep(Duration::from_millis(500));
        canary.agent.kill()?;
        canary.agent.restart(&["--map-capacity", &flag])?;
        let across = probe::finish(client)?;
        assert_eq!(across.failed(), 0, "{capacity}: {across:?}");
        assert!(across.ok > 200, "{capacity}: {across:?}");
        assert_share(across.share(V2), 0.20, across.ok, capacity);
        assert_eq!(replaced_maps(&canary), replaced, "{capacity}");
        let name = capacity.split('=').next().unwrap_or_default();
        let pinned = aya::maps::MapInfo::from_pin(canary.agent.pin_dir.join("maps").join(name))?;
        assert_eq!(
            capacity.split('=').nth(1).and_then(|n| n.parse().ok()),
            Some(pinned.max_entries()),
            "{capacity}"
        );
        // Every connect of the storm counted once, across the replacement (an
        // increment can be lost only in the microseconds the agent adds the
        // old programs' last counts).
        let (service1, backends1) = connection_counters(&canary)?;
        for (what, before, after) in [
            ("service", service0, service1),
            ("backends", backends0, backends1),
        ] {
            assert!(
                after <= before + across.ok && after + 3 >= before + across.ok,
                "{capacity}: {what} counted {before} -> {after} for {} connects",
                across.ok
            );
        }
    }
    Ok(())
}

/// Every map of the object, sorted.
fn all_maps() -> Vec<&'static str> {
    let mut all = mesh_common::map_names::ALL.to_vec();
    all.sort_unstable();
    all
}

#[test]
fn a_map_renamed_by_an_upgrade_is_made_anew_and_its_old_pin_removed() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    let maps = canary.agent.pin_dir.join("maps");
    // The previous version's map under its old name (`_V0`), still used by the
    // attached programs; the new version knows only `_V1`.
    let steps = [
        (
            "SLOTS_V1",
            "SLOTS_V0",
            &["SERVICES_V1"][..],
            &[
                "mesh_connect4",
                "mesh_connect6",
                "mesh_gateway_connect4",
                "mesh_gateway_connect6",
            ][..],
        ),
        (
            "SERVICES_V1",
            "SERVICES_V0",
            &["SLOTS_V1"],
            &[
                "mesh_connect4",
                "mesh_connect6",
                "mesh_gateway_connect4",
                "mesh_gateway_connect6",
            ],
        ),
        (
            "REVNAT_V1",
            "REVNAT_V0",
            &[],
            // sockops reads it too (LEAST_REQUEST counts rewritten connects).
            &[
                "mesh_connect4",
                "mesh_connect6",
                "mesh_gateway_connect4",
                "mesh_gateway_connect6",
                "mesh_getpeername4",
                "mesh_getpeername6",
                "mesh_router_sockops",
                "mesh_sockops",
            ],
        ),
    ];
    for (current, previous, also_replaced, swapped) in steps {
        canary.agent.stop()?;
        std::fs::rename(maps.join(current), maps.join(previous))?;
        let client = background_probe(&canary, 2000)?;
        std::thread::sleep(Duration::from_millis(500));
        canary.agent.restart(&[])?;
        let across = probe::finish(client)?;
        assert_eq!(across.failed(), 0, "{previous}: {across:?}");
        assert!(across.ok > 200, "{previous}: {across:?}");
        assert_share(across.share(V2), 0.20, across.ok, previous);

        assert_eq!(replaced_maps(&canary), also_replaced, "{previous}");
        let unpinned: Vec<String> = canary
            .agent
            .records("unpinned a map of an older layout")
            .iter()
            .filter_map(|r| r["map"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(unpinned, [previous], "{}", canary.agent.log_text());
        let programs = swapped_programs(&canary.agent);
        assert_eq!(programs, swapped, "{previous}");
        // Only the current names are left, each once.
        let mut left: Vec<String> = std::fs::read_dir(&maps)?
            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        left.sort();
        assert_eq!(left, all_maps(), "{previous}");
    }
    let after = canary.probe(&vip4(), 1000)?;
    assert_eq!(after.failed(), 0, "{after:?}");
    assert_share(after.share(V2), 0.20, after.ok, "after the renames");
    Ok(())
}

/// The programs the agent swapped in place (`program swapped`), sorted.
fn swapped_programs(agent: &mesh_tools::agent::Agent) -> Vec<String> {
    let mut swapped: Vec<String> = agent
        .records("program swapped")
        .iter()
        .map(|r| r["program"].as_str().unwrap_or("").to_owned())
        .collect();
    swapped.sort();
    swapped
}
