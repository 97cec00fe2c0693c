//! `mesh-agent check --source file:DIR`: reads a folder as the agent would,
//! reports what is wrong with it, and prints each service port's table as
//! shares per backend, without touching the kernel.

use std::{collections::BTreeMap, path::Path};

use crate::{
    compile::{self, BackendAddr, Compiled},
    index::Index,
    model::{Diagnostic, Severity},
    source::{Event, file::FileSource},
};

/// What `check` found: its report, and whether there were errors.
#[derive(Debug)]
pub struct Checked {
    pub report: String,
    pub errors: bool,
}

pub fn check(dir: &Path, config: &compile::Config) -> Checked {
    let mut index = Index::default();
    index.apply_event(Event::from(FileSource::new(dir).load()));
    let mut diagnostics: Vec<Diagnostic> = index.source_diagnostics().cloned().collect();
    diagnostics.extend(index.revalidate(&config.cluster_domain));
    let compiled = compile::compile(&index, config);
    diagnostics.extend(compiled.diagnostics.iter().cloned());
    let mut lines = Vec::new();
    for d in &diagnostics {
        let level = match d.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        lines.push(format!("{level}: {d}"));
    }
    tables(&compiled, &mut lines);
    Checked {
        report: lines.iter().map(|l| format!("{l}\n")).collect(),
        errors: diagnostics.iter().any(|d| d.severity == Severity::Error),
    }
}

fn tables(compiled: &Compiled, out: &mut Vec<String>) {
    for (addr, plan) in &compiled.services {
        out.push(format!("{addr}  {}  [{}]", plan.service, plan.route));
        if let Some(policy) = policy(plan) {
            out.push(format!("    {policy}"));
        }
        if !plan.to_destinations.is_empty() {
            let total = plan.to_destinations.len();
            for (i, d) in (0u8..).zip(plan.destinations.iter()) {
                let n = plan.to_destinations.iter().filter(|&&p| p == i).count();
                let pct = 100.0 * n as f64 / total as f64;
                out.push(format!(
                    "    {:<24} {pct:6.2}%  ({n}/{total} slots; its own table: destination {i})",
                    d.name
                ));
            }
            continue;
        }
        let mut shares: BTreeMap<Option<BackendAddr>, usize> = BTreeMap::new();
        for slot in plan.slots.iter() {
            *shares.entry(*slot).or_default() += 1;
        }
        if shares.is_empty() {
            out.push("    no backend: connects fail with EHOSTUNREACH".to_owned());
        }
        let total = plan.slots.len();
        for (backend, n) in shares {
            let pct = 100.0 * n as f64 / total as f64;
            out.push(match backend {
                Some(b) => format!("    {b:<24} {pct:6.2}%  ({n}/{total} slots)"),
                None => format!(
                    "    {:<24} {pct:6.2}%  (no ready endpoint: EHOSTUNREACH)",
                    "-"
                ),
            });
        }
    }
    for p in &compiled.gateways {
        let r = crate::kernel::record::GatewayRecord::of(p, None);
        out.push(format!(
            "gateway port {}/{}  served by {}  [{}]",
            r.port,
            r.protocol,
            r.served_by,
            r.servers.join(", ")
        ));
        out.push(format!("    {}", r.why));
        out.extend(r.routes.iter().map(|route| format!("    {route}")));
    }
    for endpoint in &compiled.redirect_excluded {
        out.push(format!(
            "{endpoint}  same-node redirect off (excludeInboundPorts)"
        ));
    }
}

/// What a table does beyond a weighted random draw, if anything.
fn policy(plan: &crate::compile::ServicePlan) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(t) = plan.affinity_timeout_s {
        parts.push(format!("session affinity ClientIP ({t} s)"));
    }
    if plan.hash_client {
        parts.push("consistent hash of the client".to_owned());
    }
    if plan.least_request {
        parts.push("LEAST_REQUEST".to_owned());
    }
    if let Some(s) = plan.socket {
        if s.max_connections > 0 {
            parts.push(format!("maxConnections {} per backend", s.max_connections));
        }
        if s.connect_timeout_ms > 0 {
            parts.push(format!("connectTimeout {} ms", s.connect_timeout_ms));
        }
        if s.keepalive_time_s > 0 {
            parts.push(format!("tcpKeepalive after {} s", s.keepalive_time_s));
        }
    }
    (!parts.is_empty()).then(|| format!("policy: {}", parts.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_checks_clean_and_shows_the_80_20_split() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/examples/flaskapp");
        let checked = check(&dir, &compile::Config::default());
        assert!(!checked.errors, "{}", checked.report);
        assert!(
            checked.report.contains(
                "10.96.0.80:5000/TCP  default/flaskapp  [VirtualService default/flaskapp spec.http[0]]"
            ),
            "{}",
            checked.report
        );
        assert!(
            checked.report.contains("20.00%  (3/15 slots)"),
            "{}",
            checked.report
        );
    }
}
