//! The routes of one gateway port: the bound VirtualServices' `http:` routes
//! in Istio's order (Gateways oldest first, VirtualServices oldest first,
//! routes as written, catch-alls last), or the first bound `tcp:` route.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::{
    Bound, Serve, ServerRef, bind,
    table::{HttpRoute, HttpTable, RequestMatch, StringMatch, VirtualHost},
};
use crate::{
    compile::{
        BackendAddr, Config, DestinationPlan, endpoints::Lookup, route_destinations, routes::Chosen,
    },
    index::{Index, resolve::Connecting},
    model::{
        Diagnostic, Fqdn, Kind, NamespacedName, ObjectRef,
        istio::{HttpMatch, RouteDestination},
    },
};

/// Route fields whose absence would change what the client gets: a route
/// with one is not served rather than served as something else.
const CHANGES_THE_ANSWER: [&str; 4] = ["redirect", "directResponse", "rewrite", "delegate"];

pub(super) fn http_port(
    index: &Index,
    config: &Config,
    port: u16,
    servers: &[ServerRef],
    vses: &[Bound<'_>],
    diags: &mut Vec<Diagnostic>,
) -> (Serve, String) {
    let lookup = Lookup::new(index);
    let mut hosts: BTreeMap<String, Vec<HttpRoute>> = BTreeMap::new();
    let mut seen: BTreeSet<(NamespacedName, String)> = BTreeSet::new();
    for server in servers {
        for b in vses.iter().filter(|b| b.gateways.contains(&server.gateway)) {
            let name = NamespacedName::from_meta(&b.entry.object.metadata);
            let domains = domains(server, b, config);
            if domains.is_empty() {
                continue;
            }
            let routes = http_routes(&lookup, b, &server.gateway, port, config, diags);
            for d in domains {
                if seen.insert((name.clone(), d.clone())) {
                    hosts.entry(d).or_default().extend(routes.iter().cloned());
                }
            }
        }
    }
    for routes in hosts.values_mut() {
        // Stable: the relative order of the others is kept.
        routes.sort_by_key(is_catch_all);
    }
    if hosts.is_empty() {
        let why = "no VirtualService route is bound to it: the router answers 404, as Istio's gateway does";
        return (
            Serve::Router {
                table: HttpTable {
                    port,
                    hosts: Vec::new(),
                },
            },
            why.to_owned(),
        );
    }
    if hosts.len() == 1
        && let Some(first) = hosts.get("*").and_then(|r| r.first())
        && is_catch_all(first)
    {
        let why = format!(
            "its first route takes every request of every host (VirtualService {} {}): one weighted choice per connection, in the kernel",
            first.vs, first.field
        );
        let serve = Serve::Kernel {
            vs: first.vs.clone(),
            field: first.field.clone(),
            destinations: first.destinations.clone(),
        };
        return (serve, why);
    }
    let why = if hosts.len() > 1 || !hosts.contains_key("*") {
        "its routes depend on the Host header: per request, by the HTTP router"
    } else {
        "its routes match on the request (uri, headers, method or authority): per request, by the HTTP router"
    };
    let table = HttpTable {
        port,
        hosts: hosts
            .into_iter()
            .map(|(domain, routes)| VirtualHost { domain, routes })
            .collect(),
    };
    (Serve::Router { table }, why.to_owned())
}

pub(super) fn tcp_port(
    index: &Index,
    config: &Config,
    port: u16,
    servers: &[ServerRef],
    vses: &[Bound<'_>],
    diags: &mut Vec<Diagnostic>,
) -> (Serve, String) {
    let lookup = Lookup::new(index);
    for server in servers {
        for b in vses.iter().filter(|b| b.gateways.contains(&server.gateway)) {
            if domains(server, b, config).is_empty() {
                continue;
            }
            let ns = NamespacedName::from_meta(&b.entry.object.metadata);
            for (i, route) in b.entry.object.spec.tcp.iter().enumerate() {
                let applies = route.matches.is_empty()
                    || route.matches.iter().any(|m| {
                        m.port.is_none_or(|p| p == u32::from(port))
                            && names_gateway(&m.gateways, &ns.namespace, &server.gateway)
                    });
                if !applies {
                    continue;
                }
                let field = format!("spec.tcp[{i}]");
                let destinations =
                    destinations(&lookup, b, port, &field, &route.route, config, diags);
                let why = format!(
                    "TCP: the first bound tcp route (VirtualService {ns} {field}), per connection in the kernel"
                );
                return (
                    Serve::Kernel {
                        vs: ns,
                        field,
                        destinations,
                    },
                    why,
                );
            }
        }
    }
    (
        Serve::Nothing,
        "TCP server with no bound VirtualService tcp route: connects to it are not translated"
            .to_owned(),
    )
}

/// The hosts a VirtualService serves on a server: the intersection of both.
fn domains(server: &ServerRef, b: &Bound<'_>, config: &Config) -> Vec<String> {
    let ns = NamespacedName::from_meta(&b.entry.object.metadata).namespace;
    let server_hosts = bind::server_hosts_for(&server.hosts, &server.gateway.namespace, &ns);
    let vs_hosts: Vec<String> = b
        .entry
        .object
        .spec
        .hosts
        .iter()
        .map(|h| {
            Fqdn::qualify(h, &ns, &config.cluster_domain)
                .as_str()
                .to_owned()
        })
        .collect();
    bind::intersect(&server_hosts, &vs_hosts)
}

/// Whether a match's `gateways` (empty: the VirtualService's) allow `gateway`.
fn names_gateway(gateways: &[String], vs_namespace: &str, gateway: &NamespacedName) -> bool {
    gateways.is_empty()
        || gateways
            .iter()
            .any(|g| bind::gateway_name(g, vs_namespace).as_ref() == Some(gateway))
}

fn is_catch_all(route: &HttpRoute) -> bool {
    route.matches.is_empty() || route.matches.iter().any(RequestMatch::is_catch_all)
}

/// A VirtualService's `http:` routes that apply on `gateway`'s `port`.
fn http_routes(
    lookup: &Lookup<'_>,
    b: &Bound<'_>,
    gateway: &NamespacedName,
    port: u16,
    config: &Config,
    diags: &mut Vec<Diagnostic>,
) -> Vec<HttpRoute> {
    let vs = NamespacedName::from_meta(&b.entry.object.metadata);
    let me = ObjectRef::new(Kind::VirtualService, vs.clone());
    let report = |d: Diagnostic| d.with_origin(&b.entry.origin);
    let mut out = Vec::new();
    for (i, route) in b.entry.object.spec.http.iter().enumerate() {
        let field = format!("spec.http[{i}]");
        if let Some(key) = CHANGES_THE_ANSWER
            .iter()
            .find(|k| route.other.contains_key(**k))
        {
            diags.push(report(Diagnostic::error(
                &me,
                format!("{field}.{key}"),
                "not implemented by the gateway's router; this route is not served",
            )));
            continue;
        }
        for key in route.other.keys() {
            diags.push(report(Diagnostic::warning(
                &me,
                format!("{field}.{key}"),
                "not implemented by the gateway's router; the route is served without it",
            )));
        }
        let mut matches = Vec::new();
        for (j, m) in route.matches.iter().enumerate() {
            let at = format!("{field}.match[{j}]");
            if !names_gateway(&m.gateways, &vs.namespace, gateway)
                || m.port.is_some_and(|p| p != u32::from(port))
            {
                continue;
            }
            match request_match(m, config) {
                Ok(Some(rm)) => matches.push(rm),
                Ok(None) => {}
                Err((key, why)) => diags.push(report(Diagnostic::error(
                    &me,
                    format!("{at}.{key}"),
                    format!("{why}; this match is not served"),
                ))),
            }
        }
        if !route.matches.is_empty() && matches.is_empty() {
            continue; // no alternative applies here
        }
        let destinations = destinations(lookup, b, port, &field, &route.route, config, diags);
        let route = HttpRoute {
            vs: vs.clone(),
            field,
            matches,
            destinations,
        };
        let last = is_catch_all(&route);
        out.push(route);
        if last {
            break; // Istio drops a VirtualService's routes after its first catch-all
        }
    }
    out
}

/// One `HTTPMatchRequest`; `Ok(None)`: it cannot match on this gateway (its
/// `sourceLabels`/`sourceNamespace` are not the gateway's).
fn request_match(m: &HttpMatch, config: &Config) -> Result<Option<RequestMatch>, (String, String)> {
    let gw = &config.gateway;
    if !m
        .source_labels
        .iter()
        .all(|(k, v)| gw.labels.get(k) == Some(v))
        || m.source_namespace
            .as_ref()
            .is_some_and(|ns| *ns != gw.namespace)
    {
        return Ok(None);
    }
    let mut out = RequestMatch::default();
    for (key, value) in &m.l7 {
        match key.as_str() {
            "uri" => out.uri = Some(string_match(value).map_err(|e| (key.clone(), e))?),
            "method" => out.method = Some(string_match(value).map_err(|e| (key.clone(), e))?),
            "authority" => out.authority = Some(string_match(value).map_err(|e| (key.clone(), e))?),
            "headers" => {
                let Some(headers) = value.as_object() else {
                    return Err((
                        key.clone(),
                        "must map header names to string matches".to_owned(),
                    ));
                };
                for (name, v) in headers {
                    let sm = string_match(v).map_err(|e| (format!("headers.{name}"), e))?;
                    out.headers.push((name.to_ascii_lowercase(), sm));
                }
            }
            _ => {
                return Err((
                    key.clone(),
                    "not implemented by the gateway's router".to_owned(),
                ));
            }
        }
    }
    Ok(Some(out))
}

/// Istio's `StringMatch`: exactly one of `exact`, `prefix`, `regex`.
fn string_match(value: &Value) -> Result<StringMatch, String> {
    let Some(object) = value.as_object().filter(|o| o.len() == 1) else {
        return Err("must be one of {exact, prefix, regex}".to_owned());
    };
    let Some((kind, Value::String(s))) = object.iter().next() else {
        return Err("the match value must be a string".to_owned());
    };
    match kind.as_str() {
        "exact" => Ok(StringMatch::Exact(s.clone())),
        "prefix" => Ok(StringMatch::Prefix(s.clone())),
        "regex" => match regex::Regex::new(&format!("^(?:{s})$")) {
            Ok(_) => Ok(StringMatch::Regex(s.clone())),
            Err(e) => Err(format!("regex {s:?} does not parse: {e}")),
        },
        other => Err(format!("{other:?} is not one of exact, prefix, regex")),
    }
}

/// A route's weighted destinations, resolved to ready endpoints (both families).
fn destinations(
    lookup: &Lookup<'_>,
    b: &Bound<'_>,
    port: u16,
    field: &str,
    route: &[RouteDestination],
    config: &Config,
    diags: &mut Vec<Diagnostic>,
) -> Vec<DestinationPlan> {
    let chosen = Chosen {
        field: field.to_owned(),
        destinations: route,
    };
    route_destinations(
        lookup,
        b.entry,
        &chosen,
        Connecting::Gateway { port },
        config,
        diags,
    )
    .into_iter()
    .map(|r| DestinationPlan {
        name: r.name,
        weight: r.group.weight,
        backends: r
            .group
            .members
            .iter()
            .map(|e| BackendAddr {
                ip: e.ip,
                port: e.port,
            })
            .collect(),
    })
    .collect()
}
