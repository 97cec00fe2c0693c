//! Who may read `/metrics` in a cluster: the metrics name every service and
//! backend on the node, so the shipped DaemonSet serves them only to bearer
//! tokens the API server authenticates and authorizes for `get /metrics`.

use mesh_tools::{agent::Agent, apiserver::ApiServer, cgroup::Cgroup};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

#[test]
fn metrics_need_a_token_the_api_server_authorizes_and_probes_do_not() -> anyhow::Result<()> {
    mesh_tools::require_root();
    let api = ApiServer::start()?;
    api.install_mesh_crds()?;
    for file in [
        "00-namespace.yaml",
        "10-rbac.yaml",
        "30-metrics-reader.yaml",
    ] {
        api.kubectl(&["apply", "-f", &format!("{ROOT}/manifests/deploy/{file}")])?;
    }
    // The agent on its own ServiceAccount: the shipped RBAC must let it ask.
    let agent_kubeconfig = api.service_account_kubeconfig("mesh-system", "mesh-agent")?;
    let cgroup = Cgroup::create(&mesh_tools::unique("mesh-test-"))?;
    let agent = Agent::start_kubernetes_flags(
        &agent_kubeconfig,
        cgroup.path(),
        &["--metrics-auth", "kubernetes"],
    )?;

    api.kubectl(&["create", "namespace", "monitoring"])?;
    for sa in ["prometheus", "stranger"] {
        api.kubectl(&["create", "serviceaccount", sa, "-n", "monitoring"])?;
    }
    api.kubectl(&[
        "create",
        "clusterrolebinding",
        "prometheus-mesh-metrics",
        "--clusterrole=mesh-metrics-reader",
        "--serviceaccount=monitoring:prometheus",
    ])?;
    let bearer = |sa: &str| -> anyhow::Result<String> {
        let token = api.kubectl(&["create", "token", sa, "-n", "monitoring"])?;
        Ok(format!("Authorization: Bearer {}", token.trim()))
    };

    let (status, _) = agent.http_get("/metrics")?;
    assert_eq!(status, 401, "no token");
    let (status, _) = agent.http_get_with("/metrics", &["Authorization: Bearer not-a-token"])?;
    assert_eq!(status, 401, "a token the API server does not know");
    let (status, body) = agent.http_get_with("/metrics", &[&bearer("stranger")?])?;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("mesh-metrics-reader"), "{body}");
    assert!(
        !body.contains("mesh_"),
        "no metric leaks in a refusal: {body}"
    );
    let (status, body) = agent.http_get_with("/metrics", &[&bearer("prometheus")?])?;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("mesh_config_generation"), "{body}");
    // The kubelet's probes carry no token.
    assert_eq!(agent.http_get("/healthz")?.0, 200);
    assert_eq!(agent.http_get("/readyz")?.0, 200);
    Ok(())
}
