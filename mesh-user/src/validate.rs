//! Validation of Istio objects before they are used. Context-free checks mirror what
//! Istio's admission webhook rejects; context checks (does the destination Service
//! exist, does the subset) reject what we could not route.

use k8s_openapi::api::core::v1::Service;

use crate::{
    compile::hosts,
    diag::Diagnostic,
    index::Index,
    model::{DestinationRule, Kind, ObjectRef, VirtualService, istio::RouteDestination},
};

pub fn destination_rule(dr: &DestinationRule) -> Vec<Diagnostic> {
    let me = ObjectRef::from_meta(Kind::DestinationRule, &dr.metadata);
    let mut out = Vec::new();
    if me.name.is_empty() {
        out.push(Diagnostic::error(&me, "metadata.name", "required"));
    }
    if dr.spec.host.trim().is_empty() {
        out.push(Diagnostic::error(&me, "spec.host", "required"));
    }
    for (i, subset) in dr.spec.subsets.iter().enumerate() {
        if subset.name.is_empty() {
            out.push(Diagnostic::error(
                &me,
                format!("spec.subsets[{i}].name"),
                "required",
            ));
        } else if dr.spec.subsets[..i].iter().any(|s| s.name == subset.name) {
            out.push(Diagnostic::error(
                &me,
                format!("spec.subsets[{i}].name"),
                format!("subset {:?} is defined twice", subset.name),
            ));
        }
    }
    out
}

pub fn virtual_service(vs: &VirtualService, index: &Index, domain: &str) -> Vec<Diagnostic> {
    let me = ObjectRef::from_meta(Kind::VirtualService, &vs.metadata);
    let mut out = Vec::new();
    if me.name.is_empty() {
        out.push(Diagnostic::error(&me, "metadata.name", "required"));
    }
    if vs.spec.hosts.is_empty() {
        out.push(Diagnostic::error(
            &me,
            "spec.hosts",
            "at least one host is required",
        ));
    }
    let mesh_bound = vs.spec.gateways.is_empty() || vs.spec.gateways.iter().any(|g| g == "mesh");
    for (i, host) in vs.spec.hosts.iter().enumerate() {
        if host.trim().is_empty() {
            out.push(Diagnostic::error(
                &me,
                format!("spec.hosts[{i}]"),
                "empty host",
            ));
        } else if host.trim() == "*" && mesh_bound {
            // As Istio: a catch-all for the mesh would capture every service.
            out.push(Diagnostic::error(
                &me,
                format!("spec.hosts[{i}]"),
                "wildcard host * is not allowed for the mesh",
            ));
        }
    }
    // (field, destinations, match ports, whether it answers without a destination)
    let http = vs.spec.http.iter().enumerate().map(|(i, r)| {
        let answers = r.other.contains_key("redirect") || r.other.contains_key("directResponse");
        (
            format!("spec.http[{i}]"),
            &r.route,
            r.matches.iter().map(|m| m.port).collect::<Vec<_>>(),
            answers,
        )
    });
    let tcp = vs.spec.tcp.iter().enumerate().map(|(i, r)| {
        (
            format!("spec.tcp[{i}]"),
            &r.route,
            r.matches.iter().map(|m| m.port).collect(),
            false,
        )
    });
    for (field, route, ports, answers) in http.chain(tcp) {
        if route.is_empty() && !answers {
            out.push(Diagnostic::error(
                &me,
                format!("{field}.route"),
                "a route needs at least one destination",
            ));
        }
        for (j, port) in ports.into_iter().enumerate() {
            check_port(&me, &format!("{field}.match[{j}].port"), port, &mut out);
        }
        destinations(&me, &field, route, index, domain, &mut out);
    }
    out
}

fn check_port(me: &ObjectRef, field: &str, port: Option<u32>, out: &mut Vec<Diagnostic>) {
    if let Some(port) = port
        && !(1..=65535).contains(&port)
    {
        out.push(Diagnostic::error(
            me,
            field,
            format!("port {port} is not in 1..65535"),
        ));
    }
}

fn destinations(
    me: &ObjectRef,
    field: &str,
    route: &[RouteDestination],
    index: &Index,
    domain: &str,
    out: &mut Vec<Diagnostic>,
) {
    let mut total: i64 = 0;
    for (j, dest) in route.iter().enumerate() {
        let field = format!("{field}.route[{j}]");
        let weight = dest.weight.unwrap_or(0);
        if weight < 0 {
            out.push(Diagnostic::error(
                me,
                format!("{field}.weight"),
                format!("weight {weight} is negative"),
            ));
        } else if weight > i64::from(u32::MAX) {
            out.push(Diagnostic::error(
                me,
                format!("{field}.weight"),
                format!("weight {weight} is too large"),
            ));
        } else {
            total += weight;
        }
        let host = dest.destination.host.trim();
        if host.is_empty() {
            out.push(Diagnostic::error(
                me,
                format!("{field}.destination.host"),
                "required",
            ));
            continue;
        }
        let fqdn = hosts::qualify(host, &me.namespace, domain);
        let Some(service) = index.service_by_fqdn(&fqdn, domain) else {
            out.push(Diagnostic::error(
                me,
                format!("{field}.destination.host"),
                format!(
                    "unknown host {host:?}: no Service {fqdn} (external hosts are not supported)"
                ),
            ));
            continue;
        };
        if let Some(port) = dest.destination.port.as_ref().and_then(|p| p.number)
            && !service_ports(&service.object).any(|p| p == port)
        {
            out.push(Diagnostic::error(
                me,
                format!("{field}.destination.port.number"),
                format!("Service {fqdn} has no port {port}"),
            ));
        }
        if let Some(subset) = &dest.destination.subset {
            let rule = index.destination_rule_for(&fqdn, domain);
            let known: Vec<&str> = rule
                .map(|r| {
                    r.object
                        .spec
                        .subsets
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect()
                })
                .unwrap_or_default();
            if !known.contains(&subset.as_str()) {
                let why = match rule {
                    None => format!("no DestinationRule defines subsets for {fqdn}"),
                    Some(_) => format!("known subsets: {}", known.join(", ")),
                };
                out.push(Diagnostic::error(
                    me,
                    format!("{field}.destination.subset"),
                    format!("unknown subset {subset:?} ({why})"),
                ));
            }
        }
    }
    let inside = format!("{field}.");
    if route.len() > 1 && total == 0 && !out.iter().any(|d| d.field.starts_with(&inside)) {
        out.push(Diagnostic::error(
            me,
            format!("{field}.route"),
            "every destination has weight 0: no destination would receive traffic",
        ));
    }
}

fn service_ports(service: &Service) -> impl Iterator<Item = u32> + '_ {
    service
        .spec
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .filter_map(|p| u32::try_from(p.port).ok())
}
