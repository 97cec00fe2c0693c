//! compile: a pure function from the index to the desired contents of the kernel
//! maps (one slot table per service VIP, port and protocol), plus diagnostics.

pub mod endpoints;
pub mod gateway;
mod locality;
mod plan;
mod policy;
pub mod redirect;
pub mod routes;
pub mod scope;
pub mod slots;
#[cfg(test)]
mod tests;

use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;

pub use plan::{
    BackendAddr, Compiled, DestinationPlan, OutlierWatch, Proto, RouteRef, ServiceAddr, ServicePlan,
};
pub use policy::Outlier;

use crate::{
    index::{
        Entry, Index,
        resolve::{Connecting, resolve},
    },
    model::{Diagnostic, Fqdn, NamespacedName, VirtualService},
};

#[derive(Clone, Debug)]
pub struct Config {
    /// The cluster DNS domain (`cluster.local`).
    pub cluster_domain: String,
    /// Largest slot table per service port (see [`slots`]).
    pub max_slots: usize,
    /// Which Gateways this node serves.
    pub gateway: gateway::GatewayConfig,
    /// The agent's node: `internalTrafficPolicy: Local` and topology hints
    /// (with the zone of the Node of this name in the index) need it.
    pub node_name: Option<String>,
    /// Backends outlier detection ejected, per service: left out of its
    /// tables (the detector decides; compile only leaves them out).
    pub ejected:
        std::collections::BTreeMap<NamespacedName, std::collections::BTreeSet<BackendAddr>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".to_owned(),
            max_slots: mesh_common::MAX_SLOTS_PER_SERVICE as usize,
            gateway: gateway::GatewayConfig::default(),
            node_name: None,
            ejected: std::collections::BTreeMap::new(),
        }
    }
}

/// One destination of a route: what it is called, its weight, its endpoints.
type Group = slots::Group<endpoints::Endpoint>;

pub fn compile(index: &Index, config: &Config) -> Compiled {
    let mut out = Compiled::default();
    let lookup = endpoints::Lookup::new(index);
    let here = endpoints::Here::of(index, config.node_name.as_deref());
    let domain = config.cluster_domain.as_str();
    for (name, entry) in &index.services {
        if !index.is_meshed(&name.namespace) {
            continue;
        }
        let Some(spec) = &entry.object.spec else {
            continue;
        };
        let vips = service_vips(&entry.object);
        if vips.is_empty() {
            continue; // headless or ExternalName: nothing to translate
        }
        let affinity = match crate::model::service::session_affinity(&entry.object) {
            Ok(affinity) => affinity,
            Err(e) => {
                let me = crate::model::ObjectRef::new(crate::model::Kind::Service, name.clone());
                out.diagnostics.push(
                    Diagnostic::warning(&me, e.field(), e.to_string()).with_origin(&entry.origin),
                );
                None
            }
        };
        let fqdn = Fqdn::of_service(name, domain);
        let rule = index.destination_rule_for(&fqdn, domain);
        let vs = routes::governing_vs(index, &fqdn, domain, &mut out.diagnostics);
        let undecided = vs.is_none() && routes::pending_vs(index, &fqdn, domain);
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
            let chosen = vs.and_then(|vs| {
                let chosen = routes::choose_route(vs, port, &mut out.diagnostics)?;
                Some((vs, chosen))
            });
            let (route, groups) = match chosen {
                Some((vs, chosen)) => (
                    RouteRef::VirtualService {
                        name: NamespacedName::from_meta(&vs.object.metadata),
                        field: chosen.field.clone(),
                    },
                    weighted_groups(
                        &lookup,
                        vs,
                        &chosen,
                        Connecting::To {
                            service: name,
                            port,
                        },
                        config,
                        &mut out.diagnostics,
                    ),
                ),
                // No endpoint: one "no backend" slot, so the connect is
                // refused at once, never passed to the bare VIP.
                None => (
                    RouteRef::Even,
                    vec![(
                        "every ready endpoint".to_owned(),
                        Group {
                            weight: 1,
                            members: endpoints::reachable(
                                &lookup,
                                name,
                                &entry.object,
                                port,
                                here,
                                |_| true,
                                &mut out.diagnostics,
                            ),
                        },
                    )],
                ),
            };
            let hash = rule.and_then(|dr| policy::client_hash(&dr.object, number));
            let least_request = proto == Proto::Tcp
                && rule.is_some_and(|dr| policy::least_request(&dr.object, number));
            let socket = rule
                .and_then(|dr| policy::socket_options(&dr.object, number))
                .filter(|_| proto == Proto::Tcp);
            let mut groups = groups;
            if let Some(policy) = rule.and_then(|dr| policy::outlier(&dr.object, number)) {
                watch_and_eject(&mut out, name, policy, &mut groups, config);
            }
            if let Some(dr) = rule {
                groups = by_locality(index, dr, number, groups, config, &mut out.diagnostics);
            }
            for vip in &vips {
                if undecided && proto == Proto::Tcp {
                    out.undecided.insert(ServiceAddr {
                        vip: *vip,
                        port: number,
                        proto,
                    });
                }
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
                let destinations: Vec<DestinationPlan> = groups
                    .iter()
                    .zip(&family_groups)
                    .map(|((name, _), g)| DestinationPlan {
                        name: name.clone(),
                        weight: g.weight,
                        backends: g.members.clone(),
                    })
                    .collect();
                let slots = match hash {
                    // A destination with no endpoint has no slot here: its
                    // share goes to the others (a hash cannot refuse a share).
                    Some(h) => {
                        let weighted = gateway::maglev::weighted(&destinations, vip.is_ipv4());
                        gateway::maglev::build(&weighted, h.table_size)
                            .into_iter()
                            .map(Some)
                            .collect()
                    }
                    None => slots::build(&family_groups, config.max_slots),
                };
                out.services.insert(
                    ServiceAddr {
                        vip: *vip,
                        port: number,
                        proto,
                    },
                    ServicePlan {
                        service: name.clone(),
                        route: route.clone(),
                        slots,
                        destinations,
                        gateway: false,
                        affinity_timeout_s: affinity,
                        hash_client: hash.is_some(),
                        socket,
                        least_request,
                    },
                );
            }
        }
    }
    for dr in index.destination_rules() {
        out.diagnostics.extend(policy::unhonoured(dr));
    }
    out.gateways = gateway::compile(index, config, &mut out.diagnostics);
    out.redirect_excluded = redirect::excluded_endpoints(index, &mut out.diagnostics);
    out.diagnostics.sort();
    out.diagnostics.dedup();
    out
}

/// DestinationRule `localityLbSetting` on a route's destinations, from this
/// node's locality (which needs `--node-name` and its Node).
fn by_locality(
    index: &Index,
    dr: &Entry<crate::model::DestinationRule>,
    port: u16,
    groups: Vec<(String, Group)>,
    config: &Config,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(String, Group)> {
    let outlier = policy::outlier(&dr.object, port).is_some();
    let Some(setting) = locality::setting(locality::load_balancer(&dr.object, port), outlier)
    else {
        return groups;
    };
    let here = config
        .node_name
        .as_deref()
        .and_then(|n| locality::Locality::of_node(index, n));
    let Some(here) = here else {
        // Failover is Istio's default with outlier detection: only a setting
        // the rule writes is reported.
        let written = locality::load_balancer(&dr.object, port)
            .is_some_and(|lb| lb.get("localityLbSetting").is_some());
        if !written {
            return groups;
        }
        let me = crate::model::ObjectRef::from_meta(
            crate::model::Kind::DestinationRule,
            &dr.object.metadata,
        );
        diags.push(
            Diagnostic::warning(
                &me,
                "spec.trafficPolicy.loadBalancer.localityLbSetting",
                "this node's locality is unknown (--node-name and its Node's labels): not honoured",
            )
            .with_origin(&dr.origin),
        );
        return groups;
    };
    locality::apply(groups, &setting, &here, |e| {
        locality::Locality::of_endpoint(index, e)
    })
}

/// Records the backends outlier detection judges for `service`, then leaves
/// out those it ejected.
fn watch_and_eject(
    out: &mut Compiled,
    service: &NamespacedName,
    policy: policy::Outlier,
    groups: &mut [(String, Group)],
    config: &Config,
) {
    let addr = |e: &endpoints::Endpoint| BackendAddr {
        ip: e.ip,
        port: e.port,
    };
    let watch = out
        .outlier
        .entry(service.clone())
        .or_insert_with(|| OutlierWatch {
            policy,
            backends: Default::default(),
        });
    watch
        .backends
        .extend(groups.iter().flat_map(|(_, g)| g.members.iter().map(addr)));
    if let Some(ejected) = config.ejected.get(service) {
        for (_, g) in groups.iter_mut() {
            g.members.retain(|e| !ejected.contains(&addr(e)));
        }
    }
}

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

/// The route's destinations as weighted groups of ready endpoints. A destination
/// that leads nowhere keeps its weight with no endpoint: its share is refused.
fn weighted_groups(
    lookup: &endpoints::Lookup<'_>,
    vs: &Entry<VirtualService>,
    chosen: &routes::Chosen<'_>,
    connecting: Connecting<'_>,
    config: &Config,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(String, Group)> {
    let domain = config.cluster_domain.as_str();
    let here = endpoints::Here::of(lookup.index, config.node_name.as_deref());
    let me = routes::vs_ref(&vs.object);
    let single = chosen.destinations.len() == 1;
    let mut groups = Vec::new();
    for (j, dest) in chosen.destinations.iter().enumerate() {
        // One destination takes all the traffic whatever its weight (Istio).
        let weight = if single {
            1
        } else {
            u64::try_from(dest.weight.unwrap_or(0)).unwrap_or(0)
        };
        let host = Fqdn::qualify(&dest.destination.host, &me.namespace, domain);
        let name = match &dest.destination.subset {
            Some(subset) => format!("{host} subset {subset}"),
            None => host.to_string(),
        };
        let members = match resolve(
            lookup.index,
            &dest.destination,
            &me.namespace,
            domain,
            connecting,
        ) {
            // The subset first, then kube-proxy's rules within it: a subset
            // whose endpoints are all terminating still drains to them.
            Ok(resolved) => match resolved.port {
                Some(port) => endpoints::reachable(
                    lookup,
                    &resolved.name,
                    &resolved.service.object,
                    port,
                    here,
                    |e| {
                        resolved.subset.is_none_or(|subset| {
                            subset
                                .labels
                                .iter()
                                .all(|(k, v)| e.labels.get(k) == Some(v))
                        })
                    },
                    diags,
                ),
                None => Vec::new(),
            },
            Err(e) => {
                diags.push(
                    Diagnostic::error(
                        &me,
                        format!("{}.route[{j}].destination.{}", chosen.field, e.field()),
                        format!("{e}; its share of connections fails with EHOSTUNREACH"),
                    )
                    .with_origin(&vs.origin),
                );
                Vec::new()
            }
        };
        groups.push((name, Group { weight, members }));
    }
    groups
}
