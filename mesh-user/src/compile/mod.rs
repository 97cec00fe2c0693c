//! compile: a pure function from the index to the desired contents of the kernel
//! maps (one slot table per service VIP, port and protocol), plus diagnostics.

pub mod endpoints;
pub mod gateway;
mod incremental;
mod locality;
mod plan;
mod policy;
pub mod redirect;
pub mod routes;
pub mod scope;
pub mod slots;
mod sockops;
mod tables;
#[cfg(test)]
mod tests;

use std::{collections::BTreeSet, net::IpAddr};

use crate::model::service::Service;

pub use incremental::{Compiler, Delta};
pub use plan::{
    BackendAddr, Compiled, DestinationPlan, OutlierPool, OutlierWatch, Proto, RouteRef,
    ServiceAddr, ServicePlan,
};
pub use policy::Outlier;

use crate::{
    index::{
        Changes, Entry, Index,
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
    pub ejected: std::collections::BTreeMap<OutlierPool, std::collections::BTreeSet<BackendAddr>>,
    /// Whether sockops runs (not `--no-redirect`): without it what it counts
    /// or clears is left out of the tables, and said ([`sockops`]).
    pub sockops: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".to_owned(),
            max_slots: mesh_common::MAX_SLOTS_PER_SERVICE as usize,
            gateway: gateway::GatewayConfig::default(),
            node_name: None,
            ejected: std::collections::BTreeMap::new(),
            sockops: true,
        }
    }
}

/// One destination of a route: what it is called, its weight, its endpoints.
type Group = slots::Group<endpoints::Endpoint>;

pub fn compile(index: &Index, config: &Config) -> Compiled {
    let mut compiler = Compiler::default();
    compiler.update(index, config, Changes::everything());
    compiler.into_compiled()
}

/// One Service's tables (each VIP, port and protocol) and what compile says
/// of it, into `out`. Returns the other Services whose endpoints its routes
/// read (a change to them changes these tables).
fn compile_service(
    lookup: &endpoints::Lookup<'_>,
    name: &NamespacedName,
    entry: &Entry<Service>,
    config: &Config,
    out: &mut Compiled,
) -> BTreeSet<NamespacedName> {
    let index = lookup.index;
    let here = endpoints::Here::of(index, config.node_name.as_deref());
    let domain = config.cluster_domain.as_str();
    let mut reads = BTreeSet::new();
    if !index.is_meshed(&name.namespace) {
        return reads;
    }
    let vips = service_vips(&entry.object);
    if vips.is_empty() {
        return reads; // headless or ExternalName: nothing to translate
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
    for (i, port) in entry.object.ports.iter().enumerate() {
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
        if let Some((vs, chosen)) = &chosen {
            let namespace = NamespacedName::from_meta(&vs.object.metadata).namespace;
            reads.extend(chosen.destinations.iter().filter_map(|d| {
                Fqdn::qualify(&d.destination.host, &namespace, domain).service(domain)
            }));
        }
        let (route, routed) = match chosen {
            Some((vs, chosen)) => (
                RouteRef::VirtualService {
                    name: NamespacedName::from_meta(&vs.object.metadata),
                    field: chosen.field.clone(),
                },
                route_destinations(
                    lookup,
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
                vec![Routed {
                    name: "every ready endpoint".to_owned(),
                    group: Group {
                        weight: 1,
                        members: endpoints::reachable(
                            lookup,
                            name,
                            &entry.object,
                            port,
                            here,
                            |_| true,
                            &mut out.diagnostics,
                        ),
                    },
                    pool: OutlierPool {
                        service: name.clone(),
                        subset: None,
                    },
                    port: number,
                    rule,
                }],
            ),
        };
        let destinations: Vec<tables::Destination> = routed
            .into_iter()
            .map(|r| with_policy(index, r, proto, config, out))
            .collect();
        if destinations.len() > mesh_common::MAX_DESTINATIONS as usize {
            let me = crate::model::ObjectRef::new(crate::model::Kind::Service, name.clone());
            out.diagnostics.push(Diagnostic::warning(
                &me,
                format!("spec.ports[{i}]"),
                format!(
                    "its route has more than {} destinations: one table for all, under the first destination's policy",
                    mesh_common::MAX_DESTINATIONS
                ),
            ));
        }
        let table_port = tables::Port {
            service: name.clone(),
            route,
            affinity_timeout_s: affinity,
            max_slots: config.max_slots,
        };
        for vip in &vips {
            let addr = ServiceAddr::port(*vip, number, proto);
            if undecided && proto == Proto::Tcp {
                out.undecided.insert(addr);
            }
            out.services
                .extend(tables::plans(&table_port, addr, &destinations));
        }
    }
    if !config.sockops {
        sockops::leave_out(out);
    }
    reads.remove(name);
    reads
}

/// A route's destination before its policy: its endpoints, and what says
/// which DestinationRule policy applies to it.
pub(crate) struct Routed<'a> {
    /// `host subset NAME`, `host`, or `every ready endpoint`.
    pub name: String,
    pub group: Group,
    /// The destination's Service and subset (outlier detection judges them
    /// as one).
    pool: OutlierPool,
    /// The destination Service's port (the key of `portLevelSettings`).
    port: u16,
    /// The DestinationRule of the destination's host.
    rule: Option<&'a Entry<crate::model::DestinationRule>>,
}

/// Applies the destination's DestinationRule policy (Istio's precedence:
/// [`policy::effective`]): outlier detection leaves out what it ejected,
/// locality picks or splits the endpoints, and the rest is what its table
/// does.
fn with_policy(
    index: &Index,
    routed: Routed<'_>,
    proto: Proto,
    config: &Config,
    out: &mut Compiled,
) -> tables::Destination {
    let Routed {
        name,
        mut group,
        pool,
        port,
        rule,
    } = routed;
    let Some(dr) = rule else {
        return tables::Destination {
            groups: vec![(name.clone(), group)],
            name,
            policy: tables::TablePolicy::default(),
        };
    };
    let effective = policy::effective(&dr.object, pool.subset.as_deref(), port);
    let outlier = policy::outlier(&effective);
    if let Some(outlier) = outlier {
        watch_and_eject(out, pool, outlier, &mut group, config);
    }
    let tcp = proto == Proto::Tcp;
    let table = tables::TablePolicy {
        hash: policy::client_hash(&effective),
        least_request: tcp && policy::least_request(&effective),
        socket: policy::socket_options(&effective).filter(|_| tcp),
    };
    let groups = by_locality(
        index,
        dr,
        &effective,
        outlier.is_some(),
        (name.clone(), group),
        config,
        &mut out.diagnostics,
    );
    tables::Destination {
        name,
        groups,
        policy: table,
    }
}

/// DestinationRule `localityLbSetting` on one destination, from this node's
/// locality (which needs `--node-name` and its Node).
fn by_locality(
    index: &Index,
    dr: &Entry<crate::model::DestinationRule>,
    effective: &policy::Effective<'_>,
    outlier: bool,
    group: (String, Group),
    config: &Config,
    diags: &mut Vec<Diagnostic>,
) -> Vec<(String, Group)> {
    let Some(setting) = locality::setting(effective.load_balancer, outlier) else {
        return vec![group];
    };
    let here = config
        .node_name
        .as_deref()
        .and_then(|n| locality::Locality::of_node(index, n));
    let Some(here) = here else {
        // Failover is Istio's default with outlier detection: only a setting
        // the rule writes is reported.
        let written = effective
            .load_balancer
            .is_some_and(|lb| lb.get("localityLbSetting").is_some());
        if let (true, Some(at)) = (written, &effective.load_balancer_at) {
            let me = crate::model::ObjectRef::from_meta(
                crate::model::Kind::DestinationRule,
                &dr.object.metadata,
            );
            diags.push(
                Diagnostic::warning(
                    &me,
                    format!("{at}.localityLbSetting"),
                    "this node's locality is unknown (--node-name and its Node's labels): not honoured",
                )
                .with_origin(&dr.origin),
            );
        }
        return vec![group];
    };
    locality::apply(vec![group], &setting, &here, |e| {
        locality::Locality::of_endpoint(index, e)
    })
}

/// Records the backends outlier detection judges for `pool`, then leaves
/// out those it ejected.
fn watch_and_eject(
    out: &mut Compiled,
    pool: OutlierPool,
    policy: policy::Outlier,
    group: &mut Group,
    config: &Config,
) {
    let addr = |e: &endpoints::Endpoint| BackendAddr {
        ip: e.ip,
        port: e.port,
    };
    let ejected = config.ejected.get(&pool);
    let watch = out.outlier.entry(pool).or_insert_with(|| OutlierWatch {
        policy,
        backends: Default::default(),
    });
    // Every backend it judges, the ejected ones included.
    watch.backends.extend(group.members.iter().map(addr));
    if let Some(ejected) = ejected {
        group.members.retain(|e| !ejected.contains(&addr(e)));
    }
}

/// The cluster IPs of a Service (both families when dual-stack).
fn service_vips(service: &Service) -> Vec<IpAddr> {
    endpoints::parse_ips(
        service.cluster_ips.iter().map(String::as_str),
        service.cluster_ip.as_deref(),
    )
}

/// The route's destinations: their weights, ready endpoints and
/// DestinationRules. A destination that leads nowhere keeps its weight with
/// no endpoint: its share is refused.
pub(crate) fn route_destinations<'a>(
    lookup: &endpoints::Lookup<'a>,
    vs: &Entry<VirtualService>,
    chosen: &routes::Chosen<'_>,
    connecting: Connecting<'_>,
    config: &Config,
    diags: &mut Vec<Diagnostic>,
) -> Vec<Routed<'a>> {
    let domain = config.cluster_domain.as_str();
    let here = endpoints::Here::of(lookup.index, config.node_name.as_deref());
    let me = routes::vs_ref(&vs.object);
    let single = chosen.destinations.len() == 1;
    let mut out = Vec::new();
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
        let subset = dest.destination.subset.clone();
        let mut routed = Routed {
            name,
            group: Group {
                weight,
                members: Vec::new(),
            },
            pool: OutlierPool {
                service: NamespacedName::default(),
                subset: subset.clone(),
            },
            port: 0,
            rule: None,
        };
        routed.group.members = match resolve(
            lookup.index,
            &dest.destination,
            &me.namespace,
            domain,
            connecting,
        ) {
            // The subset first, then kube-proxy's rules within it: a subset
            // whose endpoints are all terminating still drains to them.
            Ok(resolved) => {
                routed.pool.service = resolved.name.clone();
                routed.rule = lookup.index.destination_rule_for(&resolved.fqdn, domain);
                match resolved.port {
                    Some(port) => {
                        routed.port = u16::try_from(port.port).unwrap_or(0);
                        endpoints::reachable(
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
                        )
                    }
                    None => Vec::new(),
                }
            }
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
        out.push(routed);
    }
    out
}
