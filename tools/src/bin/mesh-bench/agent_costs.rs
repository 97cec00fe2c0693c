//! The agent's own costs: compile, apply and memory at scale, and how fast a
//! weight edit reaches the kernel through the file source and through a real
//! kube-apiserver.

use std::{
    fmt::Write as _,
    net::IpAddr,
    time::{Duration, Instant},
};

use mesh_tools::{
    agent::Agent,
    cgroup::Cgroup,
    manifests::{self, ManifestDir},
};

use crate::{
    agent_kube::{kib, mib},
    report::{median, quantile},
    services::SERVICES_PER_FILE,
};

/// The agent's own costs: compile + apply and memory at 10k services / 100k
/// endpoints, and how fast a weight edit reaches the kernel.
pub(crate) fn agent_costs(r: &mut String, quick: bool) -> anyhow::Result<()> {
    let (services, per) = if quick { (1000, 10) } else { (10_000, 10) };
    let _ = writeln!(r, "## The agent\n");
    let _ = writeln!(
        r,
        "{services} Services and {} endpoints (EndpointSlices), file source, one process; the second column with the endpoints' {} Pods in the folder too (labels `app: s<i>`, a named port, running, ready: what the Kubernetes source holds of the cluster below):\n\n| measure | Services and slices | with their Pods |\n|---|---|---|",
        services * per,
        services * per,
    );
    let without = start_at_scale(services, per, false)?;
    let with = start_at_scale(services, per, true)?;
    for (i, measure) in [
        "start to first apply (read, parse, compile, write the maps, attach)",
        "compile (index to slot tables)",
        "apply (write the tables into the maps)",
        "resident memory after the first apply (VmRSS)",
        "peak resident memory (VmHWM)",
    ]
    .into_iter()
    .enumerate()
    {
        let _ = writeln!(r, "| {measure} | {} | {} |", without[i], with[i]);
    }
    let _ = writeln!(r);

    // Weight edits through the file source: write the file, wait for the kernel.
    let dir = ManifestDir::new()?;
    let server: IpAddr = "10.244.0.10".parse()?;
    dir.write(
        "service.yaml",
        &manifests::service("bench", &["10.96.0.90".parse()?], 80, 7001),
    )?;
    dir.write(
        "pods.yaml",
        &[
            manifests::pod("bench-v1", "bench", "v1", &[server], true),
            manifests::pod("bench-v2", "bench", "v2", &["10.244.0.11".parse()?], true),
        ]
        .join("---\n"),
    )?;
    dir.write(
        "dr.yaml",
        &manifests::destination_rule("bench", &["v1", "v2"]),
    )?;
    dir.write(
        "vs.yaml",
        &manifests::virtual_service("bench", &[("v1", 80), ("v2", 20)]),
    )?;
    let cgroup = Cgroup::create(&mesh_tools::unique("mesh-bench-"))?;
    let mut agent = Agent::start_flags(dir.path(), cgroup.path(), &["--no-redirect"])?;
    let mut edits = Vec::new();
    for i in 0..if quick { 5 } else { 20 } {
        let next = agent.generation() + 1;
        let w = 10 + (i * 7) % 80;
        let t = Instant::now();
        dir.write(
            "vs.yaml",
            &manifests::virtual_service("bench", &[("v1", w), ("v2", 100 - w)]),
        )?;
        agent.wait_applied(next, Duration::from_secs(10))?;
        edits.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(120));
    }
    let (q1, q3) = (quantile(&mut edits, 0.25), quantile(&mut edits, 0.75));
    let max = edits.iter().copied().fold(0.0, f64::max);
    let _ = writeln!(
        r,
        "Weight edit to the kernel, file source ({} edits: the file rewritten, until the agent has written the maps; includes the deliberate 50 ms debounce for editors' multi-step saves): median {:.1} ms (IQR {q1:.1}–{q3:.1}), max {max:.1} ms.\n",
        edits.len(),
        median(&mut edits)
    );
    drop(agent);
    kube_propagation(r, if quick { 5 } else { 20 })
}

/// The same edit through a real kube-apiserver: `kubectl patch` of the
/// VirtualService, until the agent (`--source kubernetes`) has written the maps.
fn kube_propagation(r: &mut String, edits: usize) -> anyhow::Result<()> {
    use mesh_tools::apiserver::{ApiServer, endpoint_slice};
    let api = match ApiServer::start() {
        Ok(api) => api,
        Err(e) => {
            let _ = writeln!(
                r,
                "Weight edit to the kernel, Kubernetes source: not measured ({e}).\n"
            );
            return Ok(());
        }
    };
    api.install_mesh_crds()?;
    let mut pods = Vec::new();
    for (name, version, ip) in [
        ("bench-v1", "v1", "10.244.0.10"),
        ("bench-v2", "v2", "10.244.0.11"),
    ] {
        let ip: IpAddr = ip.parse()?;
        api.running_pod(name, "bench", version, ip)?;
        pods.push((name.to_owned(), ip, true));
    }
    api.apply(&manifests::service(
        "bench",
        &["10.96.0.90".parse()?],
        80,
        7001,
    ))?;
    api.apply(&endpoint_slice("bench", 7001, &pods))?;
    api.apply(&manifests::destination_rule("bench", &["v1", "v2"]))?;
    api.apply(&manifests::virtual_service(
        "bench",
        &[("v1", 80), ("v2", 20)],
    ))?;
    let cgroup = Cgroup::create(&mesh_tools::unique("mesh-bench-"))?;
    let agent = Agent::start_kubernetes(&api.kubeconfig, cgroup.path())?;
    let mut kubectl_ms = Vec::new();
    let mut to_kernel_ms = Vec::new();
    let mut generations = Vec::new();
    for i in 0..edits {
        let w = 10 + (i * 7) % 80;
        let patch = format!(
            r#"{{"spec":{{"http":[{{"route":[{{"destination":{{"host":"bench","subset":"v1"}},"weight":{w}}},{{"destination":{{"host":"bench","subset":"v2"}},"weight":{}}}]}}]}}}}"#,
            100 - w
        );
        let next = agent.generation() + 1;
        let t0 = Instant::now();
        // Watch for the apply from another thread (1 ms polls) while kubectl runs.
        let applied_at = std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                while agent.generation() < next && t0.elapsed() < Duration::from_secs(20) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Instant::now()
            });
            let result = api.kubectl(&[
                "patch",
                "virtualservice",
                "bench",
                "--type",
                "merge",
                "-p",
                &patch,
            ]);
            kubectl_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            result.map(|_| watcher.join().unwrap_or_else(|_| Instant::now()))
        })?;
        to_kernel_ms.push(applied_at.duration_since(t0).as_secs_f64() * 1e3);
        generations.push(next);
        std::thread::sleep(Duration::from_millis(100));
    }
    // The agent's own part: from the watch event in hand to the maps written.
    let mut agent_ms: Vec<f64> = agent
        .records("config applied")
        .iter()
        .filter(|r| {
            r["generation"]
                .as_u64()
                .is_some_and(|g| generations.contains(&g))
        })
        .filter_map(|r| r["elapsed_us"].as_f64())
        .map(|us| us / 1e3)
        .collect();
    let _ = writeln!(
        r,
        "Weight edit to the kernel, Kubernetes source (kube-apiserver 1.20 on loopback, {edits} `kubectl patch` edits of the VirtualService): from starting `kubectl patch` to the maps written, median {:.1} ms (IQR {:.1}–{:.1}); `kubectl patch` itself (process start-up, discovery, the request) took a median {:.1} ms{}. The agent's part, from the watch event to the maps written: median {:.2} ms.\n",
        median(&mut to_kernel_ms),
        quantile(&mut to_kernel_ms, 0.25),
        quantile(&mut to_kernel_ms, 0.75),
        median(&mut kubectl_ms.clone()),
        if median(&mut to_kernel_ms.clone()) < median(&mut kubectl_ms.clone()) {
            ": the change was in the kernel before kubectl returned"
        } else {
            ""
        },
        median(&mut agent_ms),
    );
    Ok(())
}

/// A folder of `services` Services with `per` endpoints each (and their Pods),
/// an agent started on it: the measures of [`agent_costs`]'s table, as text.
fn start_at_scale(services: usize, per: usize, pods: bool) -> anyhow::Result<[String; 5]> {
    let dir = ManifestDir::new()?;
    // With its Pods a Service is ~5 KB of YAML: fewer per file, under the file
    // source's 4 MiB per file.
    let per_file = if pods {
        SERVICES_PER_FILE / 4
    } else {
        SERVICES_PER_FILE
    };
    let mut yaml = String::new();
    for i in 0..services {
        let vip = format!("10.99.{}.{}", i / 250, 1 + i % 250);
        let _ = writeln!(
            yaml,
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  selector: {{app: s{i}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints:"
        );
        let mut pod_yaml = String::new();
        for e in 0..per {
            let n = i * per + e;
            // 250 hosts a third octet, 256 of those a second: unique and valid
            // (a third octet of 256-259 was refused).
            let ip = format!(
                "10.{}.{}.{}",
                100 + n / 64_000,
                (n / 250) % 256,
                1 + n % 250
            );
            let _ = writeln!(
                yaml,
                "  - addresses: [\"{ip}\"]\n    conditions: {{ready: true}}\n    targetRef: {{kind: Pod, name: s{i}-{e}, namespace: default}}"
            );
            if pods {
                let _ = writeln!(
                    pod_yaml,
                    "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: s{i}-{e}, namespace: default, uid: 0d8a7f3c-1b2e-4c5d-9e6f-{n:012}, labels: {{app: s{i}}}}}\nspec:\n  containers: [{{name: app, image: registry.example/app:1, ports: [{{name: http, containerPort: 8080}}]}}]\nstatus:\n  phase: Running\n  podIP: {ip}\n  podIPs: [{{ip: {ip}}}]\n  conditions: [{{type: Ready, status: 'True'}}]"
                );
            }
        }
        yaml.push_str(&pod_yaml);
        if (i + 1) % per_file == 0 || i + 1 == services {
            let file = format!("scale-{:03}.yaml", i / per_file);
            dir.write(&file, &std::mem::take(&mut yaml))?;
        }
    }
    let cgroup = Cgroup::create(&mesh_tools::unique("mesh-bench-"))?;
    let t = Instant::now();
    let agent = Agent::start_flags_within(
        dir.path(),
        cgroup.path(),
        &["--no-redirect"],
        Duration::from_secs(120),
    )?;
    let ready = t.elapsed();
    let applied = agent.records("config applied");
    let first = applied.first().cloned().unwrap_or_default();
    let ms = |key: &str| format!("{:.1} ms", first[key].as_f64().unwrap_or(f64::NAN) / 1e3);
    Ok([
        format!("{:.2} s", ready.as_secs_f64()),
        ms("compile_us"),
        ms("apply_us"),
        mib(kib(agent.pid(), "VmRSS:")),
        mib(kib(agent.pid(), "VmHWM:")),
    ])
}
