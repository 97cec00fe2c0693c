//! What a user sees when things go wrong: no backend, live weight flips under load,
//! bad input, the agent going away, and the harness cleaning up after a failure.

mod common;

use std::time::Duration;

use common::{Canary, V1, V2, VIP4, assert_share, vip4};
use mesh_tools::{cgroup::Cgroup, manifests, netns::Node, probe};

const N: u64 = 2000;

#[test]
fn a_service_without_ready_backends_fails_at_once_with_ehostunreach() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    // A Service whose selector matches no pod.
    canary.write(
        "empty.yaml",
        &manifests::service("empty", &["10.96.0.81".parse()?], 80, 8080),
    )?;
    let empty = canary.probe("10.96.0.81:80", 20)?;
    assert_eq!(empty.errors.get("EHOSTUNREACH"), Some(&20), "{empty:?}");

    // v2's only pod goes not-ready: its 20% share has no backend; as Envoy answers
    // 503 for a weighted cluster with no healthy host, those connects are refused.
    canary.set_ready(V2, false)?;
    let summary = canary.probe(&vip4(), N)?;
    assert_eq!(summary.backends.get(V2), None, "{summary:?}");
    let refused = *summary.errors.get("EHOSTUNREACH").unwrap_or(&0);
    assert_eq!(summary.failed(), refused, "only EHOSTUNREACH: {summary:?}");
    assert_share(refused as f64 / N as f64, 0.20, N, "refused share");

    // Back to ready: the pod is back in the table.
    canary.set_ready(V2, true)?;
    let summary = canary.probe(&vip4(), N)?;
    assert_eq!(summary.failed(), 0, "{summary:?}");
    assert_share(summary.share(V2), 0.20, N, "v2 back");
    Ok(())
}

#[test]
fn a_v1_pod_going_not_ready_leaves_the_table() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    canary.set_ready(V1[2], false)?;
    let summary = canary.probe(&vip4(), N)?;
    assert_eq!(summary.failed(), 0, "{summary:?}");
    assert_eq!(summary.backends.get(V1[2]), None, "{summary:?}");
    assert_share(summary.share(V1[0]), 0.40, N, "v1-0 takes half of v1's 80%");
    assert_share(summary.share(V2), 0.20, N, "v2 keeps 20%");
    Ok(())
}

#[test]
fn a_burst_of_connections_during_repeated_weight_flips_never_fails() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    let args: Vec<String> = [
        "--target",
        &vip4(),
        "--duration-ms",
        "4000",
        "--concurrency",
        "4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let client = probe::spawn(&canary.node.pod("client").ns, Some(&canary.cgroup), &args)?;
    let mut flips = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_millis(3500) {
        let (v1, v2) = if flips % 2 == 0 { (20, 80) } else { (80, 20) };
        canary.set_weights(v1, v2)?;
        flips += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let summary = probe::finish(client)?;
    eprintln!("{flips} weight flips under {} connections", summary.ok);
    assert!(flips >= 10, "only {flips} flips");
    assert_eq!(summary.failed(), 0, "{summary:?}");
    assert!(summary.ok > 500, "{summary:?}");
    assert!(
        summary.backends.contains_key(V2) && summary.backends.contains_key(V1[0]),
        "{summary:?}"
    );
    Ok(())
}

#[test]
fn bad_input_is_reported_by_file_object_and_field_and_the_last_good_state_stays()
-> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;
    // Another service, to prove it keeps working while flaskapp's rule is bad.
    canary.write(
        "stable.yaml",
        &manifests::service("stable", &["10.96.0.82".parse()?], 80, 5000)
            .replace("    app: stable\n", "    app: flaskapp\n    version: v1\n"),
    )?;

    let cases = [
        (
            "negative weight",
            manifests::virtual_service("flaskapp", &[("v1", 120), ("v2", -20)]),
            "spec.http[0].route[1].weight",
        ),
        (
            "unknown subset",
            manifests::virtual_service("flaskapp", &[("v1", 50), ("v3", 50)]),
            "spec.http[0].route[1].destination.subset",
        ),
        (
            "unparsable YAML",
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\nspec: [unclosed\n"
                .to_owned(),
            "invalid YAML",
        ),
        (
            "wrong type",
            manifests::virtual_service("flaskapp", &[("v1", 50), ("v2", 50)])
                .replace("weight: 50", "weight: half"),
            "spec.http[0].route[0].weight",
        ),
    ];
    for (what, content, field) in cases {
        canary.write("virtualservice.yaml", &content)?;
        let errors = canary.agent.messages("ERROR");
        assert!(
            errors
                .iter()
                .any(|e| e.contains("virtualservice.yaml") && e.contains(field)),
            "{what}: no error naming the file and {field}: {errors:#?}"
        );
        let summary = canary.probe(&vip4(), N)?;
        assert_eq!(summary.failed(), 0, "{what}: {summary:?}");
        assert_share(
            summary.share(V2),
            0.20,
            N,
            &format!("{what}: last good 80/20"),
        );
        let stable = canary.probe("10.96.0.82:80", 100)?;
        assert_eq!(stable.failed(), 0, "{what}: {stable:?}");
        assert!(
            stable.backends.keys().all(|k| k.contains("v1")),
            "{what}: {stable:?}"
        );
    }
    // The error names the object too.
    assert!(
        canary
            .agent
            .messages("ERROR")
            .iter()
            .any(|e| e.contains("VirtualService default/flaskapp"))
    );

    // While the rule is bad, other changes still apply: a v1 pod leaves.
    canary.set_ready(V1[2], false)?;
    let summary = canary.probe(&vip4(), N)?;
    assert_eq!(summary.backends.get(V1[2]), None, "{summary:?}");
    assert_share(summary.share(V2), 0.20, N, "still the last good 80/20");

    // Fixed: the new version applies.
    canary.set_weights(50, 50)?;
    let summary = canary.probe(&vip4(), N)?;
    assert_share(summary.share(V2), 0.50, N, "fixed rule");
    Ok(())
}

#[test]
fn kernel_counters_agree_with_the_client_and_routing_outlives_the_agent() -> anyhow::Result<()> {
    let canary = Canary::start(Some((80, 20)))?;
    let seen = canary.probe(&vip4(), 600)?;
    assert_eq!(seen.ok, 600, "{seen:?}");
    let Canary {
        mut agent,
        node,
        cgroup,
        backends,
        dir,
        ..
    } = canary;
    let status = agent.stop()?;
    assert!(status.success(), "agent exit: {status}");

    // The per-CPU counters the kernel kept, as the agent read them at exit, match
    // what the client saw backend by backend.
    let counters = agent.records("backend connections");
    for (pod, n) in &seen.backends {
        let ip = node.pod(pod).ipv4.to_string();
        let kernel: u64 = counters
            .iter()
            .filter(|f| {
                f["backend"]
                    .as_str()
                    .is_some_and(|b| b.starts_with(&format!("{ip}:")))
            })
            .filter_map(|f| f["connects"].as_u64())
            .sum();
        assert_eq!(
            kernel, *n,
            "{pod}: kernel counted {kernel}, client saw {n}; {counters:?}"
        );
    }
    let global = agent.records("connect counters");
    assert_eq!(
        global.first().and_then(|g| g["rewritten"].as_u64()),
        Some(600),
        "{global:?}"
    );
    assert_eq!(
        global.first().and_then(|g| g["peer_rewritten"].as_u64()),
        Some(600),
        "{global:?}"
    );

    // The programs stay attached after the agent exits (operate.rs covers
    // restarts and cleanup): the VIP still routes.
    let after = probe::probe(
        &node.pod("client").ns,
        Some(&cgroup),
        &format!("{VIP4}:80"),
        5,
        1,
    )?;
    assert_eq!(after.ok, 5, "{after:?}");
    drop((agent, backends, dir));
    Ok(())
}

#[test]
fn the_harness_removes_namespaces_and_cgroups_even_when_a_test_panics() -> anyhow::Result<()> {
    mesh_tools::require_root();
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::panic::catch_unwind(move || {
        let mut node = Node::new().expect("node");
        node.add_pod("a", 3).expect("pod");
        let cgroup = Cgroup::create(&mesh_tools::unique("mesh-test-")).expect("cgroup");
        let names: Vec<String> = node
            .pods
            .iter()
            .map(|p| p.ns.name.clone())
            .chain([node.bridge.name.clone()])
            .collect();
        tx.send((names, cgroup.path.clone())).expect("send");
        panic!("a failing test");
    });
    assert!(result.is_err());
    let (names, cgroup) = rx.recv()?;
    let listed = mesh_tools::sh("ip", &["netns", "list"])?;
    for name in names {
        assert!(
            !listed
                .lines()
                .any(|l| l.split_whitespace().next() == Some(name.as_str())),
            "{name} left behind"
        );
    }
    mesh_tools::cgroup::assert_gone(&cgroup)?;
    Ok(())
}

/// A Service on one IPv4 VIP whose selector is `app: flaskapp` plus `extra`.
fn flaskapp_subset_service(name: &str, vip: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  selector: {{app: flaskapp{extra}}}\n  ports: [{{name: http, port: 80, targetPort: 5000}}]\n"
    )
}

/// Polls `check` (bounded) until it holds.
fn eventually(what: &str, mut check: impl FnMut() -> anyhow::Result<bool>) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !check()? {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{what}: not within 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn a_table_that_does_not_fit_is_admitted_whole_or_not_at_all() -> anyhow::Result<()> {
    // 16 slots. 50/50 over three v1 pods and one v2 pod is 6 slots per VIP family:
    // 12 in use, 4 free. 80/20 needs 15 per family.
    let mut canary = Canary::start_flags(Some((50, 50)), &["--map-capacity", "SLOTS_V1=16"])?;
    assert_eq!(canary.agent.http_get("/readyz")?.0, 200);

    canary.set_weights(80, 20)?;
    // The change does not fit: the 50/50 tables route on, whole.
    let summary = canary.probe(&vip4(), N)?;
    assert_eq!(summary.failed(), 0, "{summary:?}");
    assert_share(summary.share(V2), 0.50, N, "the previous table routes on");
    let errors = canary.agent.messages("ERROR").join("\n");
    assert!(
        errors.contains("default/flaskapp") && errors.contains("does not fit"),
        "{errors}"
    );
    assert_eq!(canary.agent.metric("mesh_services_not_applied")?, 2);
    assert!(
        canary
            .agent
            .metric_with("mesh_apply_failures_total", &[r#"reason="slots_full""#])?
            >= 2
    );
    let (status, body) = canary.agent.http_get("/readyz")?;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("2 service ports not applied"), "{body}");

    // Other services still apply: one slot fits.
    canary.write(
        "solo.yaml",
        &flaskapp_subset_service("solo", "10.96.0.91", ", version: v2"),
    )?;
    let solo = canary.probe("10.96.0.91:80", 50)?;
    assert_eq!(
        (solo.ok, solo.backends.get(V2)),
        (50, Some(&50)),
        "{solo:?}"
    );

    // A new service that does not fit (4 endpoints, 3 free) is refused, never
    // sent to the bare VIP (which would say ENETUNREACH in this sandbox).
    canary.write(
        "wide.yaml",
        &flaskapp_subset_service("wide", "10.96.0.92", ""),
    )?;
    let wide = canary.probe("10.96.0.92:80", 20)?;
    assert_eq!(wide.errors.get("EHOSTUNREACH"), Some(&20), "{wide:?}");

    // The weights go back: flaskapp is whole again; room frees up when solo
    // goes (after the grace period), and wide gets its table on a retry.
    canary.set_weights(50, 50)?;
    assert_eq!(canary.agent.metric("mesh_services_not_applied")?, 1);
    canary.dir.remove("solo.yaml")?;
    eventually("wide applied", || {
        Ok(canary.agent.http_get("/readyz")?.0 == 200)
    })?;
    assert_eq!(canary.agent.metric("mesh_services_not_applied")?, 0);
    let wide = canary.probe("10.96.0.92:80", 200)?;
    assert_eq!(wide.ok, 200, "{wide:?}");
    assert_eq!(wide.backends.len(), 4, "{wide:?}");
    let resolved = canary.agent.messages("INFO").join("\n");
    assert!(resolved.contains("resolved:"), "{resolved}");
    Ok(())
}
