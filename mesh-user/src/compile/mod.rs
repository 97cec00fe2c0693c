//! compile: a pure function from the index to the desired contents of the kernel
//! maps (one slot table per service VIP, port and protocol), plus diagnostics.

pub mod endpoints;
pub mod hosts;
pub mod redirect;
pub mod routes;
pub mod slots;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use k8s_openapi::api::core::v1::{Service, ServicePort};

use crate::{
    diag::Diagnostic,
    index::{Entry, Index},
    model::{DEFAULT_NAMESPACE, VirtualService},
};

#[derive(Clone, Debug)]
pub struct Config {
    /// The cluster DNS domain (`cluster.local`).
    pub cluster_domain: String,
    /// Largest slot table per service port (see [`slots`]).
    pub max_slots: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".to_owned(),
            max_slots: mesh_common::MAX_SLOTS_PER_SERVICE as usize,
        }
    }
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
        })
    }
}

/// A service port on one VIP: the key of a slot table.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct ServiceAddr {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            std::net::SocketAddr::new(self.vip, self.port),
            self.proto
        )
    }
}

/// Where a connection goes.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        std::net::SocketAddr::new(self.ip, self.port).fmt(f)
    }
}

/// The desired table of one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePlan {
    /// `namespace/name` of the Service.
    pub service: String,
    /// What decided the table: a VirtualService route, or even balancing.
    pub route: String,
    /// The slot table; `None` slots refuse the connect. Empty: no backend at all.
    pub slots: Vec<Option<BackendAddr>>,
    /// What the table was built from: each destination of the route (a subset,
    /// or every endpoint), its weight, and its ready endpoints of this family.
    pub destinations: Vec<Destination>,
}

/// One weighted destination of a route.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Destination {
    /// `host subset NAME`, or `every ready endpoint`.
    pub name: String,
    pub weight: u64,
    pub backends: Vec<BackendAddr>,
}

#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub services: BTreeMap<ServiceAddr, ServicePlan>,
    /// Endpoints whose connections the same-node redirect leaves to TCP.
    pub redirect_excluded: BTreeSet<BackendAddr>,
    pub diagnostics: Vec<Diagnostic>,
}

pub fn compile(index: &Index, config: &Config) -> Compiled {
    let mut out = Compiled::default();
    let lookup = endpoints::Lookup::new(index);
    let domain = config.cluster_domain.as_str();
    for ((namespace, name), entry) in &index.services {
        if index
            .mesh_namespaces
            .as_ref()
            .is_some_and(|m| !m.contains(namespace))
        {
            continue; // not a mesh namespace
        }
        let Some(spec) = &entry.object.spec else {
            continue;
        };
        let vips = service_vips(&entry.object);
        if vips.is_empty() {
            continue; // headless or ExternalName: nothing to translate
        }
        let fqdn = hosts::service_fqdn(name, namespace, domain);
        let vs = routes::governing_vs(index, &fqdn, domain, &mut out.diagnostics);
        for port in spec.ports.iter().flatten() {
            let proto = match port.protocol.as_deref().unwrap_or("TCP") {
                "TCP" => Proto::Tcp,
                "UDP" => Proto::Udp,
                _ => continue, // SCTP: not handled by the sock_addr hooks we attach
            };
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            // Istio's sidecars route TCP only; UDP service ports balance evenly.
            let vs = vs.filter(|_| proto == Proto::Tcp);
            let (route, groups) = match vs
                .and_then(|vs| Some((vs, routes::choose_route(vs, port, &mut out.diagnostics)?)))
            {
                Some((vs, chosen)) => (
                    format!("{} {}", routes::vs_ref(&vs.object), chosen.field),
                    weighted_groups(
                        &lookup,
                        vs,
                        &chosen,
                        entry,
                        port,
                        config,
                        &mut out.diagnostics,
                    ),
                ),
                None => {
                    let all =
                        endpoints::ready_endpoints(&lookup, namespace, name, &entry.object, port);
                    (
                        "no VirtualService route: even balancing".to_owned(),
                        vec![(
                            "every ready endpoint".to_owned(),
                            Group {
                                weight: 1,
                                members: all,
                            },
                        )],
                    )
                }
            };
            for vip in &vips {
                let family_groups: Vec<slots::Group<BackendAddr>> = groups
                    .iter()
                    .map(|(_, g)| slots::Group {
                        weight: g.weight,
                        members: g
                            .members
                            .iter()
                            .filter(|e| e.ip.is_ipv4() == vip.is_ipv4())
                            .map(|e| BackendAddr {
                                ip: e.ip,
                                port: e.port,
                            })
                            .collect(),
                    })
                    .collect();
                out.services.insert(
                    ServiceAddr {
                        vip: *vip,
                        port: number,
                        proto,
                    },
                    ServicePlan {
                        service: format!("{namespace}/{name}"),
                        route: route.clone(),
                        slots: slots::build(&family_groups, config.max_slots),
                        destinations: groups
                            .iter()
                            .zip(&family_groups)
                            .map(|((name, _), g)| Destination {
                                name: name.clone(),
                                weight: g.weight,
                                backends: g.members.clone(),
                            })
                            .collect(),
                    },
                );
            }
        }
    }
    out.redirect_excluded = redirect::excluded_endpoints(index, &mut out.diagnostics);
    out.diagnostics.sort();
    out.diagnostics.dedup();
    out
}

type Group = slots::Group<endpoints::Endpoint>;

/// The cluster IPs of a Service (both families when dual-stack).
fn service_vips(service: &Service) -> Vec<IpAddr> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    endpoints::parse_ips(
        spec.cluster_ips.iter().flatten().map(String::as_str),
        spec.cluster_ip.as_deref(),
    )
}

/// The route's destinations as weighted groups of ready endpoints.
fn weighted_groups(
    lookup: &endpoints::Lookup<'_>,
    vs: &Entry<VirtualService>,
    chosen: &routes::Chosen<'_>,
    this_service: &Entry<Service>,
    this_port: &ServicePort,
    config: &Config,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(String, Group)> {
    let domain = config.cluster_domain.as_str();
    let vs_ns = vs
        .object
        .metadata
        .namespace
        .as_deref()
        .unwrap_or(DEFAULT_NAMESPACE);
    let me = routes::vs_ref(&vs.object);
    let single = chosen.destinations.len() == 1;
    let mut groups = Vec::new();
    for (j, dest) in chosen.destinations.iter().enumerate() {
        let field = format!("{}.route[{j}].destination", chosen.field);
        // One destination takes all the traffic whatever its weight (Istio).
        let weight = if single {
            1
        } else {
            u64::try_from(dest.weight.unwrap_or(0)).unwrap_or(0)
        };
        let mut problem = |field: String, message: String| {
            diags.push(
                Diagnostic::error(
                    &me,
                    field,
                    format!("{message}; its share of connections fails with EHOSTUNREACH"),
                )
                .with_origin(&vs.origin),
            );
            Group {
                weight,
                members: Vec::new(),
            }
        };
        let fqdn = hosts::qualify(&dest.destination.host, vs_ns, domain);
        let name = match &dest.destination.subset {
            Some(subset) => format!("{fqdn} subset {subset}"),
            None => fqdn.clone(),
        };
        let Some(target) = lookup.index.service_by_fqdn(&fqdn, domain) else {
            groups.push((
                name,
                problem(format!("{field}.host"), format!("no Service {fqdn}")),
            ));
            continue;
        };
        let target_ports: Vec<&ServicePort> = target
            .object
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .collect();
        let wanted = dest.destination.port.as_ref().and_then(|p| p.number);
        let same_service = std::ptr::eq(target, this_service);
        let port = match wanted {
            Some(n) => target_ports
                .iter()
                .find(|p| u32::try_from(p.port).ok() == Some(n))
                .copied(),
            None if same_service => Some(this_port),
            None if target_ports.len() == 1 => Some(target_ports[0]),
            None => target_ports
                .iter()
                .find(|p| p.port == this_port.port)
                .copied(),
        };
        let Some(port) = port else {
            groups.push((
                name,
                problem(
                    format!("{field}.port"),
                    format!("cannot tell which port of {fqdn} to use"),
                ),
            ));
            continue;
        };
        let (t_name, t_ns) = hosts::split_service_fqdn(&fqdn, domain).unwrap_or_default();
        let mut members = endpoints::ready_endpoints(lookup, t_ns, t_name, &target.object, port);
        if let Some(subset) = &dest.destination.subset {
            let labels = lookup
                .index
                .destination_rule_for(&fqdn, domain)
                .and_then(|dr| dr.object.spec.subsets.iter().find(|s| &s.name == subset))
                .map(|s| s.labels.clone());
            let Some(labels) = labels else {
                groups.push((
                    name,
                    problem(
                        format!("{field}.subset"),
                        format!("subset {subset:?} of {fqdn} is no longer defined"),
                    ),
                ));
                continue;
            };
            members.retain(|e| labels.iter().all(|(k, v)| e.labels.get(k) == Some(v)));
        }
        groups.push((name, Group { weight, members }));
    }
    groups
}
