//! Which VirtualService governs a Service port, and which of its routes applies at
//! connect time. Istio's rules, restricted to what is knowable at `connect()`:
//! the destination port. L7 conditions (uri, headers, ...) and source conditions are
//! reported and the route is skipped, never guessed.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ServicePort;

use crate::{
    index::{Entry, Index},
    model::{
        Diagnostic, Fqdn, Kind, NamespacedName, ObjectRef, VirtualService,
        istio::{self, HttpMatch, HttpRoute, L4Match, RouteDestination, TcpRoute},
    },
};

pub fn vs_ref(vs: &VirtualService) -> ObjectRef {
    ObjectRef::from_meta(Kind::VirtualService, &vs.metadata)
}

/// The accepted VirtualService for `fqdn`: the best host match among those bound
/// to the mesh; ties go to the oldest (then by namespace/name), as Istio does,
/// with a warning for each one that loses.
pub fn governing_vs<'a>(
    index: &'a Index,
    fqdn: &Fqdn,
    domain: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<&'a Entry<VirtualService>> {
    let mut candidates: Vec<(usize, &Entry<VirtualService>)> = index
        .virtual_services()
        .filter_map(|e| Some((mesh_host_rank(e, fqdn, domain)?, e)))
        .collect();
    candidates.sort_by(|(ra, a), (rb, b)| {
        rb.cmp(ra)
            .then_with(|| {
                a.object
                    .metadata
                    .creation_timestamp
                    .cmp(&b.object.metadata.creation_timestamp)
            })
            .then_with(|| vs_ref(&a.object).cmp(&vs_ref(&b.object)))
    });
    let (best_rank, best) = *candidates.first()?;
    for (rank, other) in &candidates[1..] {
        if *rank == best_rank {
            diags.push(
                Diagnostic::warning(
                    &vs_ref(&other.object),
                    "spec.hosts",
                    format!(
                        "{} is already routed by {}; this VirtualService is ignored for it",
                        fqdn,
                        vs_ref(&best.object)
                    ),
                )
                .with_origin(&other.origin),
            );
        }
    }
    Some(best)
}

/// How well a mesh-bound VirtualService's hosts match `fqdn`, if at all.
fn mesh_host_rank(e: &Entry<VirtualService>, fqdn: &Fqdn, domain: &str) -> Option<usize> {
    if !istio::binds_mesh(&e.object.spec.gateways) {
        return None;
    }
    let ns = NamespacedName::from_meta(&e.object.metadata).namespace;
    e.object
        .spec
        .hosts
        .iter()
        .filter_map(|h| Fqdn::qualify(h, &ns, domain).match_rank(fqdn))
        .max()
}

/// Whether a VirtualService that has never been accepted names `fqdn`: its
/// routing is undecided until a valid version arrives.
pub fn pending_vs(index: &Index, fqdn: &Fqdn, domain: &str) -> bool {
    index
        .pending_virtual_services()
        .any(|e| mesh_host_rank(e, fqdn, domain).is_some())
}

/// Whether a port carries HTTP by Istio's protocol selection (appProtocol, or the
/// port name `http`, `http2`, `grpc`, ... with an optional `-suffix`).
fn declared_protocol(port: &ServicePort) -> Option<bool> {
    const HTTP: [&str; 5] = ["http", "http2", "grpc", "grpc-web", "h2c"];
    let named = port.app_protocol.as_deref().or(port.name.as_deref())?;
    let prefix = named
        .split('-')
        .next()
        .unwrap_or(named)
        .to_ascii_lowercase();
    if HTTP.contains(&named.to_ascii_lowercase().as_str()) || HTTP.contains(&prefix.as_str()) {
        return Some(true);
    }
    const OTHER: [&str; 8] = [
        "tcp", "tls", "https", "mongo", "mysql", "redis", "udp", "thrift",
    ];
    OTHER.contains(&prefix.as_str()).then_some(false)
}

/// The route that applies, with its field path, or `None` (balance evenly).
#[derive(Debug)]
pub struct Chosen<'a> {
    pub field: String,
    pub destinations: &'a [RouteDestination],
}

pub fn choose_route<'a>(
    entry: &'a Entry<VirtualService>,
    port: &ServicePort,
    diags: &mut Vec<Diagnostic>,
) -> Option<Chosen<'a>> {
    let vs = &entry.object;
    let me = vs_ref(vs);
    let number = u32::try_from(port.port).unwrap_or(0);
    let warn = |diags: &mut Vec<Diagnostic>, field: String, message: String| {
        diags.push(Diagnostic::warning(&me, field, message).with_origin(&entry.origin));
    };
    if !vs.spec.tls.is_empty() {
        warn(
            diags,
            "spec.tls".into(),
            "TLS routes match on SNI, which is not visible at connect time; ignored".into(),
        );
    }
    let use_http = match declared_protocol(port) {
        Some(http) => http,
        // Undeclared: Istio sniffs the protocol; we cannot, and take the http
        // routes when there are any.
        None => !vs.spec.http.is_empty() || vs.spec.tcp.is_empty(),
    };
    let candidates: Vec<Candidate<'_>> = if use_http {
        vs.spec
            .http
            .iter()
            .enumerate()
            .map(http_candidate)
            .collect()
    } else {
        vs.spec.tcp.iter().enumerate().map(tcp_candidate).collect()
    };
    let chosen = first_route(candidates, number, &me, &entry.origin, diags);
    if chosen.is_none() && (!vs.spec.http.is_empty() || !vs.spec.tcp.is_empty()) {
        warn(
            diags,
            if use_http { "spec.http" } else { "spec.tcp" }.into(),
            format!(
                "no route applies to port {number} at connect time; connections are balanced evenly over all endpoints"
            ),
        );
    }
    chosen
}

/// An `http` or `tcp` route, reduced to what a connect can know.
struct Candidate<'a> {
    field: String,
    alternatives: Vec<Alternative<'a>>,
    /// Actions that answer without a destination (redirect, directResponse).
    actions: Vec<&'static str>,
    /// Fields of the route that are not enforced at L4 (retries, timeout, ...).
    ignored: Vec<&'a str>,
    destinations: &'a [RouteDestination],
    /// What a connect cannot decide about this kind of route, for the warning.
    undecidable: &'static str,
}

fn http_candidate((i, route): (usize, &HttpRoute)) -> Candidate<'_> {
    Candidate {
        field: format!("spec.http[{i}]"),
        alternatives: route.matches.iter().map(Alternative::from).collect(),
        actions: ["redirect", "directResponse"]
            .into_iter()
            .filter(|a| route.other.contains_key(*a))
            .collect(),
        ignored: route.other.keys().map(String::as_str).collect(),
        destinations: &route.route,
        undecidable: "L7 conditions or actions cannot be decided at connect time",
    }
}

fn tcp_candidate((i, route): (usize, &TcpRoute)) -> Candidate<'_> {
    Candidate {
        field: format!("spec.tcp[{i}]"),
        alternatives: route.matches.iter().map(Alternative::from).collect(),
        actions: Vec::new(),
        ignored: Vec::new(),
        destinations: &route.route,
        undecidable: "conditions not decidable at connect time",
    }
}

/// The first route that applies to a connection to `port`, in order; routes
/// skipped for conditions or actions a connect cannot decide are reported.
fn first_route<'a>(
    candidates: Vec<Candidate<'a>>,
    port: u32,
    me: &ObjectRef,
    origin: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<Chosen<'a>> {
    for route in candidates {
        let (matched, mut undecided) = evaluate(route.alternatives, port);
        if matched && route.actions.is_empty() {
            if !route.ignored.is_empty() {
                diags.push(
                    Diagnostic::warning(
                        me,
                        route.field.clone(),
                        format!("not enforced at L4, ignored: {}", route.ignored.join(", ")),
                    )
                    .with_origin(origin),
                );
            }
            return Some(Chosen {
                field: route.field,
                destinations: route.destinations,
            });
        }
        if matched {
            undecided.push(route.actions.join(", "));
        }
        if !undecided.is_empty() {
            diags.push(
                Diagnostic::warning(
                    me,
                    route.field,
                    format!(
                        "{} ({}); this route is skipped",
                        route.undecidable,
                        undecided.join("; ")
                    ),
                )
                .with_origin(origin),
            );
        }
    }
    None
}

/// One match alternative of a route, reduced to what a connect can know.
struct Alternative<'a> {
    port: Option<u32>,
    gateways: &'a [String],
    /// Conditions a connect cannot decide (uri, headers, source...).
    undecidable: Vec<String>,
}

impl<'a> From<&'a HttpMatch> for Alternative<'a> {
    fn from(m: &'a HttpMatch) -> Self {
        let source = (&m.source_labels, m.source_namespace.as_ref());
        Self::new(m.port, &m.gateways, m.l7.keys(), source)
    }
}

impl<'a> From<&'a L4Match> for Alternative<'a> {
    fn from(m: &'a L4Match) -> Self {
        let source = (&m.source_labels, m.source_namespace.as_ref());
        Self::new(m.port, &m.gateways, m.other.keys(), source)
    }
}

impl<'a> Alternative<'a> {
    /// `other`: the match's fields beyond port and gateways (uri, headers, ...);
    /// `source`: its source labels and namespace.
    fn new(
        port: Option<u32>,
        gateways: &'a [String],
        other: impl Iterator<Item = &'a String>,
        (source_labels, source_namespace): (&BTreeMap<String, String>, Option<&String>),
    ) -> Self {
        let mut undecidable: Vec<String> = other.cloned().collect();
        if !source_labels.is_empty() {
            undecidable.push("sourceLabels".into());
        }
        if source_namespace.is_some() {
            undecidable.push("sourceNamespace".into());
        }
        Self {
            port,
            gateways,
            undecidable,
        }
    }
}

/// Istio ORs a route's match alternatives and ANDs the conditions inside one.
/// Returns whether some decidable alternative matches `port` (the route then
/// applies to every connection to it; no alternatives at all also match), and the
/// undecidable alternatives that could match. Alternatives for another port, or
/// bound to gateways only, never apply.
fn evaluate(alternatives: Vec<Alternative<'_>>, port: u32) -> (bool, Vec<String>) {
    let mut any = false;
    let mut matched = false;
    let mut undecided = Vec::new();
    for (j, alt) in alternatives.into_iter().enumerate() {
        any = true;
        if !istio::binds_mesh(alt.gateways) || alt.port.is_some_and(|p| p != port) {
            continue;
        }
        if alt.undecidable.is_empty() {
            matched = true;
        } else {
            undecided.push(format!("match[{j}]: {}", alt.undecidable.join(", ")));
        }
    }
    (matched || !any, undecided)
}
