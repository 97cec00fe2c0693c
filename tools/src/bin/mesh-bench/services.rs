//! The N services a variant holds, the target among fillers: as the agent's
//! file-source folder, kube-proxy's iptables rules, or an nftables map.

use std::{fmt::Write as _, net::IpAddr, process::Command};

use anyhow::{Context as _, bail};
use mesh_tools::{
    manifests::{self, ManifestDir},
    netns::Netns,
};

use crate::variants::VIP;

/// A file-source folder: the target Service (VIP:80 -> server:port) and `fillers`
/// more Services (no endpoints: table entries only).
pub(crate) fn services_dir(
    vip: &str,
    port: u16,
    fillers: usize,
    server: IpAddr,
) -> anyhow::Result<ManifestDir> {
    let dir = ManifestDir::new()?;
    dir.write(
        "service.yaml",
        &manifests::service("bench", &[vip.parse()?], 80, port),
    )?;
    dir.write(
        "pod.yaml",
        &manifests::pod("bench-0", "bench", "v1", &[server], true),
    )?;
    // Files of at most SERVICES_PER_FILE Services: the file source reads at most
    // 4 MiB per file (mesh-user's `Limits`), and 50k fillers are ~10 MB.
    for (k, start) in (0..fillers).step_by(SERVICES_PER_FILE).enumerate() {
        let mut fill = String::new();
        for i in start..fillers.min(start + SERVICES_PER_FILE) {
            let vip = filler_vip(i);
            let _ = writeln!(
                fill,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: filler-{i}, namespace: default}}\nspec:\n  clusterIP: {vip}\n  selector: {{app: filler-{i}}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]"
            );
        }
        dir.write(&format!("fillers-{k:03}.yaml"), &fill)?;
    }
    Ok(dir)
}

/// Services per file of a generated folder: ~0.2 MB of fillers, ~1 MB of
/// Services with ten endpoints each, well under the file source's 4 MiB per file.
pub(crate) const SERVICES_PER_FILE: usize = 1000;

/// Service `i` of a variant with N: the target (last) at VIP -> `target`, the
/// others filler VIPs -> filler backends. (VIP, backend IP, backend port.)
fn service_i(i: usize, n: usize, target: (&str, u16)) -> (String, String, u16) {
    if i + 1 == n {
        (VIP.to_owned(), target.0.to_owned(), target.1)
    } else {
        (
            filler_vip(i),
            format!("10.98.{}.{}", i / 250, 1 + i % 250),
            8080,
        )
    }
}

fn filler_vip(i: usize) -> String {
    format!("10.97.{}.{}", i / 250, 1 + i % 250)
}

/// Feeds `rules` to `command` (`iptables-restore`, `nft -f -`) on stdin, inside `ns`.
pub(crate) fn load_rules(ns: &Netns, command: &str, rules: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(command.split_whitespace())
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {command}"))?;
    child
        .stdin
        .take()
        .context("no stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{command}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// kube-proxy's iptables layout for `n` services, the target last in KUBE-SERVICES.
pub(crate) fn iptables_rules(n: usize, backend_ip: &str, backend_port: u16) -> String {
    let mut r = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut chains = String::new();
    let mut rules = String::new();
    for i in 0..n {
        let (vip, ip, port) = service_i(i, n, (backend_ip, backend_port));
        let dest = format!("{ip}:{port}");
        let _ = writeln!(chains, ":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i}\n-A KUBE-SVC-{i} -m statistic --mode random --probability 1.0 -j KUBE-SEP-{i}\n-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {dest}"
        );
    }
    r.push_str(&chains);
    r.push_str(&rules);
    r.push_str("-A OUTPUT -j KUBE-SERVICES\nCOMMIT\n");
    r
}

/// An nftables verdict map with `n` services (a hash lookup, as kube-proxy's
/// nftables mode does).
pub(crate) fn nft_rules(n: usize, backend_ip: &str, backend_port: u16) -> String {
    let mut chains = String::new();
    let mut elements = Vec::new();
    for i in 0..n {
        let (vip, ip, port) = service_i(i, n, (backend_ip, backend_port));
        let _ = writeln!(
            chains,
            "  chain svc{i} {{ meta l4proto tcp dnat to {ip}:{port}; }}"
        );
        elements.push(format!("{vip} . 80 : jump svc{i}"));
    }
    format!(
        "table ip mesh_bench {{\n{chains}  map services {{ type ipv4_addr . inet_service : verdict; elements = {{ {} }}; }}\n  chain out {{ type nat hook output priority -100; ip daddr . tcp dport vmap @services; }}\n}}\n",
        elements.join(", ")
    )
}
