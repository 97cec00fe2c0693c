//! Weighted connect-time routing through the real kernel programs: real TCP
//! connections from a process in the mesh cgroup to the flaskapp VIP, answered by
//! real backends in their own network namespaces.

mod common;

use common::{Canary, PORT, V1, V2, VIP4, VIP6, assert_share, vip4, vip6};

const N: u64 = 2000;

#[test]
fn canary_split_follows_the_virtualservice_and_moves_when_edited() -> anyhow::Result<()> {
    let mut canary = Canary::start(Some((80, 20)))?;

    let before = canary.probe(&vip4(), N)?;
    assert_eq!(before.failed(), 0, "{before:?}");
    assert_eq!(before.ok, N);
    assert_share(before.share("flaskapp-v2"), 0.20, N, "v2 at 80/20");
    for pod in V1 {
        // 80% shared evenly by three pods.
        assert_share(before.share(pod), 0.80 / 3.0, N, pod);
    }
    // getpeername shows the VIP the application dialled, on every connection.
    assert_eq!(
        before.peers.keys().collect::<Vec<_>>(),
        vec![&vip4()],
        "{before:?}"
    );

    let took = canary.set_weights(50, 50)?;
    eprintln!("weight change applied {took:?} after the file was written");
    let after = canary.probe(&vip4(), N)?;
    assert_eq!(after.failed(), 0, "{after:?}");
    assert_share(after.share("flaskapp-v2"), 0.50, N, "v2 at 50/50");

    // The agent reports itself healthy, ready, and how fast syncs reached the kernel.
    assert_eq!(canary.agent.http_get("/healthz")?.0, 200);
    assert_eq!(canary.agent.http_get("/readyz")?.0, 200);
    let (status, metrics) = canary.agent.http_get("/metrics")?;
    assert_eq!(status, 200);
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("mesh_config_sync_latency_seconds_count "))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(count.is_some_and(|n| n >= 2), "{metrics}");
    assert!(
        metrics.contains(&format!(
            "mesh_config_generation {}",
            canary.agent.generation()
        )),
        "{metrics}"
    );

    canary.set_weights(0, 100)?;
    let all_v2 = canary.probe(&vip4(), 200)?;
    assert_eq!(all_v2.backends.get(V2), Some(&200), "{all_v2:?}");
    Ok(())
}

#[test]
fn without_a_virtualservice_connections_balance_evenly_and_backends_see_them() -> anyhow::Result<()>
{
    let canary = Canary::start(None)?;
    let summary = canary.probe(&vip4(), N)?;
    assert_eq!(summary.failed(), 0, "{summary:?}");
    for pod in V1.iter().chain([&V2]) {
        assert_share(summary.share(pod), 0.25, N, pod);
    }
    // The backends really accepted those connections (not the probe's say-so).
    let served: u64 = canary.backends.iter().map(|b| b.served()).sum();
    assert_eq!(served, N);
    Ok(())
}

#[test]
fn ipv6_vip_routes_to_ipv6_backends_and_getpeername_shows_it() -> anyhow::Result<()> {
    let canary = Canary::start(Some((80, 20)))?;
    let summary = canary.probe(&vip6(), N)?;
    assert_eq!(summary.failed(), 0, "{summary:?}");
    assert_share(summary.share("flaskapp-v2"), 0.20, N, "v2 over IPv6");
    assert_eq!(summary.peers.keys().collect::<Vec<_>>(), vec![&vip6()]);

    // A dual-stack socket dialling the IPv4 VIP as ::ffff:a.b.c.d is routed too,
    // and sees the address in the form it dialled.
    let mapped = format!("[::ffff:{VIP4}]:{PORT}");
    let summary = canary.probe(&mapped, 400)?;
    assert_eq!(summary.failed(), 0, "{summary:?}");
    assert_eq!(summary.peers.keys().collect::<Vec<_>>(), vec![&mapped]);
    let _ = VIP6;
    Ok(())
}

#[test]
fn non_mesh_destinations_and_processes_outside_the_cgroup_are_untouched() -> anyhow::Result<()> {
    let canary = Canary::start(Some((80, 20)))?;
    // A pod IP is not a service: the connect goes exactly where it was aimed.
    let v2 = canary.node.pod(V2);
    let direct = canary.probe(&format!("{}:5000", v2.ipv4), 200)?;
    assert_eq!(direct.backends.get(V2), Some(&200), "{direct:?}");
    assert_eq!(
        direct.peers.keys().collect::<Vec<_>>(),
        vec![&format!("{}:5000", v2.ipv4)]
    );

    // The VIP on a port the Service does not have is not a service either: left
    // alone, it has nowhere to go (no route off the node).
    let other_port = canary.probe(&format!("{VIP4}:81"), 5)?;
    assert_eq!(
        other_port.errors.get("ENETUNREACH"),
        Some(&5),
        "{other_port:?}"
    );

    // A process outside the mesh cgroup dialling the VIP is not rewritten.
    let outside = canary.probe_unmeshed(&vip4(), 5)?;
    assert_eq!(outside.errors.get("ENETUNREACH"), Some(&5), "{outside:?}");
    Ok(())
}
