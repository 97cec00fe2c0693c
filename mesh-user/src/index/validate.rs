//! Validation of Istio objects before they are used. Context-free checks mirror what
//! Istio's admission webhook rejects; context checks (does the destination Service
//! exist, does the subset) reject what we could not route.

use super::{
    Index,
    resolve::{Connecting, resolve},
};
use crate::model::{
    DestinationRule, Diagnostic, Kind, ObjectRef, VirtualService,
    istio::{self, RouteDestination},
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
    let mesh_bound = istio::binds_mesh(&vs.spec.gateways);
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
        if let Err(e) = resolve(
            index,
            &dest.destination,
            &me.namespace,
            domain,
            Connecting::Nothing,
        ) {
            out.push(Diagnostic::error(
                me,
                format!("{field}.destination.{}", e.field()),
                e.to_string(),
            ));
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
