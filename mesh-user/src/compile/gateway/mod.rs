//! Gateways: which Istio Gateways this node serves, on which ports, with which
//! bound VirtualService routes; each port served by the kernel alone (one
//! weighted decision per connection) or by the HTTP router (per request).
//! Istio's rules, with their sources, are in docs/gateway-research.md.

pub mod bind;
pub mod maglev;
mod routes;
pub mod table;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

use super::{
    BackendAddr, Config, DestinationPlan, Proto, RouteRef, ServiceAddr, ServicePlan, slots,
};
use crate::{
    index::{Entry, Index},
    model::{Diagnostic, Gateway, Kind, NamespacedName, ObjectRef, VirtualService},
};
use table::HttpTable;

/// What a gateway port speaks, as far as we serve it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Protocol {
    /// HTTP, HTTP2, GRPC, GRPC-Web, HTTP_PROXY: routed by `http:` routes.
    Http,
    /// TCP: routed by `tcp:` routes.
    Tcp,
}

/// One server of one Gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServerRef {
    pub gateway: NamespacedName,
    /// `spec.servers[i]`.
    pub index: usize,
    pub hosts: Vec<String>,
}

impl ServerRef {
    pub fn object(&self) -> ObjectRef {
        ObjectRef::new(Kind::Gateway, self.gateway.clone())
    }
}

impl fmt::Display for ServerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Gateway {} spec.servers[{}]", self.gateway, self.index)
    }
}

/// How a gateway port is served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Serve {
    /// The kernel alone: one weighted choice per connection, at `connect()`.
    Kernel {
        vs: NamespacedName,
        field: String,
        destinations: Vec<DestinationPlan>,
    },
    /// The HTTP router: per request.
    Router { table: HttpTable },
    /// Nothing bound: connects to the port are not translated.
    Nothing,
}

/// One port this node serves as a gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayPort {
    pub port: u16,
    pub protocol: Protocol,
    /// Oldest Gateway first: the servers merged on this port.
    pub servers: Vec<ServerRef>,
    pub serve: Serve,
    /// Why it is served so, in a sentence (for `check` and `explain`).
    pub why: String,
}

/// The gateway settings of this node.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// The labels this node's gateway answers to (`--gateway-labels`).
    pub labels: BTreeMap<String, String>,
    /// The namespace the gateway "workload" lives in, for `exportTo` and
    /// `./host` (Istio's default `istio-system`).
    pub namespace: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            labels: BTreeMap::from([("istio".to_owned(), "ingressgateway".to_owned())]),
            namespace: "istio-system".to_owned(),
        }
    }
}

/// Creation time, then name, then namespace: Istio's order for Gateways and
/// VirtualServices (the older wins a conflict).
fn age_key(
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> (String, String, String) {
    (
        meta.creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default(),
        meta.name.clone().unwrap_or_default(),
        meta.namespace.clone().unwrap_or_default(),
    )
}

/// The Gateways whose selector this node's labels satisfy, oldest first.
fn selected<'a>(index: &'a Index, config: &GatewayConfig) -> Vec<&'a Entry<Gateway>> {
    let mut out: Vec<&Entry<Gateway>> = index
        .gateways
        .values()
        .filter(|g| match &g.object.spec.selector {
            None => true,
            Some(selector) => selector
                .iter()
                .all(|(k, v)| config.labels.get(k) == Some(v)),
        })
        .collect();
    out.sort_by_key(|g| age_key(&g.object.metadata));
    out
}

/// Every gateway port of this node, with what serves it; problems reported by
/// object and field.
pub fn compile(index: &Index, config: &Config, diags: &mut Vec<Diagnostic>) -> Vec<GatewayPort> {
    let mut ports: BTreeMap<u16, (Protocol, Vec<ServerRef>)> = BTreeMap::new();
    for gateway in selected(index, &config.gateway) {
        let name = NamespacedName::from_meta(&gateway.object.metadata);
        let me = ObjectRef::new(Kind::Gateway, name.clone());
        let report = |d: Diagnostic| d.with_origin(&gateway.origin);
        for key in gateway.object.spec.other.keys() {
            diags.push(report(Diagnostic::warning(
                &me,
                format!("spec.{key}"),
                "not read by this data plane; ignored",
            )));
        }
        for (i, server) in gateway.object.spec.servers.iter().enumerate() {
            let field = format!("spec.servers[{i}]");
            let Some((port, protocol)) = server_port(server, &me, &field, diags) else {
                continue;
            };
            if server.hosts.is_empty() {
                diags.push(report(Diagnostic::error(
                    &me,
                    format!("{field}.hosts"),
                    "at least one host is required; server not served",
                )));
                continue;
            }
            for key in server.other.keys() {
                diags.push(report(Diagnostic::warning(
                    &me,
                    format!("{field}.{key}"),
                    "not read by this data plane; ignored",
                )));
            }
            let this = ServerRef {
                gateway: name.clone(),
                index: i,
                hosts: server.hosts.clone(),
            };
            match ports.get_mut(&port) {
                None => {
                    ports.insert(port, (protocol, vec![this]));
                }
                // Plain HTTP servers on one port merge (Istio: one route table).
                Some((Protocol::Http, servers)) if protocol == Protocol::Http => servers.push(this),
                Some((_, servers)) => {
                    let winner = servers.first().map(ToString::to_string).unwrap_or_default();
                    diags.push(report(Diagnostic::error(
                        &me,
                        format!("{field}.port.number"),
                        format!("port {port} is already served by the older {winner}; this server is not served (the older wins, as in Istio)"),
                    )));
                }
            }
        }
    }
    let vses = bound_virtual_services(index, config);
    ports
        .into_iter()
        .map(|(port, (protocol, servers))| {
            let (serve, why) = match protocol {
                Protocol::Http => routes::http_port(index, config, port, &servers, &vses, diags),
                Protocol::Tcp => routes::tcp_port(index, config, port, &servers, &vses, diags),
            };
            GatewayPort {
                port,
                protocol,
                servers,
                serve,
                why,
            }
        })
        .collect()
}

/// The port and protocol of a server we can serve; `None` (reported) otherwise.
fn server_port(
    server: &crate::model::istio::Server,
    me: &ObjectRef,
    field: &str,
    diags: &mut Vec<Diagnostic>,
) -> Option<(u16, Protocol)> {
    let Some(port) = u16::try_from(server.port.number).ok().filter(|p| *p != 0) else {
        diags.push(Diagnostic::error(
            me,
            format!("{field}.port.number"),
            format!(
                "{} is not a port number (1-65535); server not served",
                server.port.number
            ),
        ));
        return None;
    };
    let protocol = match server.port.protocol.to_ascii_uppercase().as_str() {
        "HTTP" | "HTTP2" | "GRPC" | "GRPC-WEB" | "HTTP_PROXY" => Protocol::Http,
        "TCP" => Protocol::Tcp,
        "HTTPS" | "TLS" => {
            diags.push(Diagnostic::error(me, format!("{field}.port.protocol"), format!("{} servers (TLS termination or passthrough) are not served by this data plane yet; port {port} not served", server.port.protocol)));
            return None;
        }
        other => {
            diags.push(Diagnostic::error(me, format!("{field}.port.protocol"), format!("protocol {other:?} is not served (HTTP, HTTP2, GRPC or TCP); port {port} not served")));
            return None;
        }
    };
    if server.tls.is_some() {
        diags.push(Diagnostic::error(me, format!("{field}.tls"), format!("TLS settings (httpsRedirect, ...) are not honoured yet; port {port} not served rather than served without them")));
        return None;
    }
    if let Some(bind) = &server.bind {
        diags.push(Diagnostic::error(me, format!("{field}.bind"), format!("binding to {bind} is not supported (the gateway serves the node's addresses); port {port} not served")));
        return None;
    }
    Some((port, protocol))
}

/// A VirtualService bound to Gateways, with the Gateways it names.
struct Bound<'a> {
    entry: &'a Entry<VirtualService>,
    gateways: BTreeSet<NamespacedName>,
}

/// Accepted VirtualServices visible to the gateway (`exportTo`) that name a
/// Gateway, oldest first.
fn bound_virtual_services<'a>(index: &'a Index, config: &Config) -> Vec<Bound<'a>> {
    let mut out: Vec<Bound<'a>> = index
        .virtual_services()
        .filter(|vs| exported_to(&vs.object, &config.gateway.namespace))
        .filter_map(|vs| {
            let ns = NamespacedName::from_meta(&vs.object.metadata).namespace;
            let gateways: BTreeSet<NamespacedName> = vs
                .object
                .spec
                .gateways
                .iter()
                .filter_map(|g| bind::gateway_name(g, &ns))
                .collect();
            (!gateways.is_empty()).then_some(Bound {
                entry: vs,
                gateways,
            })
        })
        .collect();
    out.sort_by_key(|b| age_key(&b.entry.object.metadata));
    out
}

/// `exportTo`: absent or `*` is everywhere, `.` the VirtualService's own
/// namespace, `~` nowhere, a name that namespace.
fn exported_to(vs: &VirtualService, namespace: &str) -> bool {
    let Some(list) = vs.spec.other.get("exportTo").and_then(|v| v.as_array()) else {
        return true;
    };
    let own = vs
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(crate::model::DEFAULT_NAMESPACE);
    list.iter().filter_map(|v| v.as_str()).any(|e| match e {
        "*" => true,
        "." => own == namespace,
        "~" => false,
        ns => ns == namespace,
    })
}

/// The addresses a gateway port is served on: loopback and the node's.
pub fn addresses(node: &[IpAddr]) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = [
        IpAddr::from([127, 0, 0, 1]),
        IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
    ]
    .into_iter()
    .chain(node.iter().copied())
    .collect();
    out.sort();
    out.dedup();
    out
}

/// Where the router listens for one port: per family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouterAddrs {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
}

/// The kernel's tables for the gateway ports: for each port and node address,
/// the kernel route's weighted backends, or the router's listener. Ports
/// served by the router but not listened on yet (`router` has no entry) are
/// left out.
pub fn service_plans(
    ports: &[GatewayPort],
    node: &[IpAddr],
    router: &BTreeMap<u16, RouterAddrs>,
    max_slots: usize,
) -> BTreeMap<ServiceAddr, ServicePlan> {
    let mut out = BTreeMap::new();
    for p in ports {
        let owner = p
            .servers
            .first()
            .map(|s| s.gateway.clone())
            .unwrap_or_default();
        for vip in addresses(node) {
            let (route, destinations) = match &p.serve {
                Serve::Nothing => continue,
                Serve::Kernel {
                    vs,
                    field,
                    destinations,
                } => (
                    RouteRef::VirtualService {
                        name: vs.clone(),
                        field: field.clone(),
                    },
                    destinations
                        .iter()
                        .map(|d| DestinationPlan {
                            name: d.name.clone(),
                            weight: d.weight,
                            backends: d
                                .backends
                                .iter()
                                .filter(|b| b.ip.is_ipv4() == vip.is_ipv4())
                                .copied()
                                .collect(),
                        })
                        .collect::<Vec<_>>(),
                ),
                Serve::Router { .. } => {
                    let Some(addrs) = router.get(&p.port) else {
                        continue;
                    };
                    let Some(listener) = (if vip.is_ipv4() { addrs.v4 } else { addrs.v6 }) else {
                        continue;
                    };
                    (
                        RouteRef::Router { port: p.port },
                        vec![DestinationPlan {
                            name: "the gateway's HTTP router".to_owned(),
                            weight: 1,
                            backends: vec![BackendAddr {
                                ip: listener.ip(),
                                port: listener.port(),
                            }],
                        }],
                    )
                }
            };
            let groups: Vec<slots::Group<BackendAddr>> = destinations
                .iter()
                .map(|d| slots::Group {
                    weight: d.weight,
                    members: d.backends.clone(),
                })
                .collect();
            out.insert(
                ServiceAddr::port(vip, p.port, Proto::Tcp),
                ServicePlan {
                    service: owner.clone(),
                    route,
                    slots: slots::build(&groups, max_slots).into(),
                    destinations: destinations.into(),
                    gateway: true,
                    affinity_timeout_s: None,
                    hash_client: false,
                    socket: None,
                    least_request: false,
                    to_destinations: Vec::new(),
                },
            );
        }
    }
    out
}

/// The gateway ports as the per-packet path serves them to clients outside
/// the node: a kernel port as it is; a router port as one destination, the
/// router's listener on a node address of each family (a local delivery: the
/// router listens on every address), once it listens.
pub fn outside_ports(
    ports: &[GatewayPort],
    node: &[IpAddr],
    router: &BTreeMap<u16, RouterAddrs>,
) -> Vec<GatewayPort> {
    let first = |v4: bool| {
        node.iter()
            .find(|ip| ip.is_ipv4() == v4 && !ip.is_loopback())
    };
    ports
        .iter()
        .filter_map(|p| {
            let Serve::Router { .. } = &p.serve else {
                return Some(p.clone());
            };
            let addrs = router.get(&p.port)?;
            let backends = [(first(true), addrs.v4), (first(false), addrs.v6)]
                .into_iter()
                .filter_map(|(ip, listener)| {
                    Some(BackendAddr {
                        ip: *ip?,
                        port: listener?.port(),
                    })
                })
                .collect();
            let owner = p
                .servers
                .first()
                .map(|s| s.gateway.clone())
                .unwrap_or_default();
            Some(GatewayPort {
                serve: Serve::Kernel {
                    vs: owner,
                    field: String::new(),
                    destinations: vec![DestinationPlan {
                        name: "the gateway's HTTP router".to_owned(),
                        weight: 1,
                        backends,
                    }],
                },
                ..p.clone()
            })
        })
        .collect()
}
