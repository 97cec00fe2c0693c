//! tables: a service port's route, its destinations and their policies, to
//! the tables of one VIP. One table when every destination follows the same
//! policy (the common case: one lookup per connect); else one table per
//! destination, each with its own policy, behind the port's table, which
//! picks the destination by the route's weights (as Envoy picks a weighted
//! cluster, then a host by the cluster's own balancer).

use std::net::IpAddr;

use mesh_common::SocketPolicy;

use super::{
    BackendAddr, DestinationPlan, Group, RouteRef, ServiceAddr, ServicePlan, gateway::maglev,
    policy::ClientHash, slots,
};
use crate::model::NamespacedName;

/// What one table does beyond a weighted random draw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TablePolicy {
    /// `consistentHash.useSourceIp`: a weighted Maglev table read by a hash
    /// of the client.
    pub hash: Option<ClientHash>,
    /// `LEAST_REQUEST`: the less loaded of two slots drawn.
    pub least_request: bool,
    /// `connectionPool.tcp` options for the clients' sockets.
    pub socket: Option<SocketPolicy>,
}

/// A destination of a route with its policy applied: its endpoints (split
/// by locality when `distribute` says so) and what its table does.
#[derive(Clone, Debug)]
pub struct Destination {
    /// `host subset NAME`, `host`, or `every ready endpoint`.
    pub name: String,
    pub groups: Vec<(String, Group)>,
    pub policy: TablePolicy,
}

impl Destination {
    /// Its weight in the route: what its groups weigh together (locality
    /// splits a destination's weight over its groups).
    fn weight(&self) -> u64 {
        self.groups.iter().map(|(_, g)| g.weight).sum()
    }
}

/// What every table of a service port shares.
#[derive(Clone, Debug)]
pub struct Port {
    pub service: NamespacedName,
    pub route: RouteRef,
    pub affinity_timeout_s: Option<u32>,
    pub max_slots: usize,
}

/// Whether the route's destinations need tables of their own: they differ
/// in policy, or they balance by load (LEAST_REQUEST's second draw must stay
/// in the destination the first chose, or the route's weights would bend
/// toward the idler destination).
pub fn per_destination(destinations: &[Destination]) -> bool {
    let Some(first) = destinations.first() else {
        return false;
    };
    destinations.len() > 1
        && destinations.len() <= mesh_common::MAX_DESTINATIONS as usize
        && destinations
            .iter()
            .any(|d| d.policy != first.policy || d.policy.least_request)
}

/// The tables of `vip`: the port's own, then (when [`per_destination`]) one
/// per destination.
pub fn plans(
    port: &Port,
    addr: ServiceAddr,
    destinations: &[Destination],
) -> Vec<(ServiceAddr, ServicePlan)> {
    if !per_destination(destinations) {
        let groups: Vec<(String, Group)> = destinations
            .iter()
            .flat_map(|d| d.groups.iter().cloned())
            .collect();
        let policy = destinations.first().map(|d| d.policy).unwrap_or_default();
        return vec![(addr, table(port, addr.vip, &groups, policy))];
    }
    let mut out = Vec::with_capacity(destinations.len() + 1);
    let picks: Vec<slots::Group<u8>> = (0u8..)
        .zip(destinations)
        .map(|(i, d)| slots::Group {
            weight: d.weight(),
            members: vec![i],
        })
        .collect();
    let mut own = table(port, addr.vip, &[], TablePolicy::default());
    // Every slot names a destination: each group has its one member.
    own.to_destinations = slots::build(&picks, port.max_slots)
        .into_iter()
        .flatten()
        .collect();
    // A client keeps its destination where it keeps its backend (session
    // affinity, or a hash in every destination).
    own.hash_client =
        port.affinity_timeout_s.is_some() || destinations.iter().all(|d| d.policy.hash.is_some());
    own.affinity_timeout_s = None;
    own.destinations = (0u8..)
        .zip(destinations)
        .map(|(i, d)| {
            let plan = table(port, addr.vip, &d.groups, d.policy);
            let summary = DestinationPlan {
                name: d.name.clone(),
                weight: d.weight(),
                backends: plan
                    .destinations
                    .iter()
                    .flat_map(|p| p.backends.clone())
                    .collect(),
            };
            out.push((addr.destination(i), plan));
            summary
        })
        .collect();
    out.insert(0, (addr, own));
    out
}

/// One table over `groups`, under `policy`, for the endpoints of `vip`'s
/// family.
fn table(port: &Port, vip: IpAddr, groups: &[(String, Group)], policy: TablePolicy) -> ServicePlan {
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
    let slots = match policy.hash {
        // A destination with no endpoint has no slot here: its share goes to
        // the others (a hash cannot refuse a share).
        Some(h) => {
            let weighted = maglev::weighted(&destinations, vip.is_ipv4());
            maglev::build(&weighted, h.table_size)
                .into_iter()
                .map(Some)
                .collect()
        }
        None => slots::build(&family_groups, port.max_slots),
    };
    ServicePlan {
        service: port.service.clone(),
        route: port.route.clone(),
        slots: slots.into(),
        to_destinations: Vec::new(),
        destinations: destinations.into(),
        gateway: false,
        affinity_timeout_s: port.affinity_timeout_s,
        hash_client: policy.hash.is_some(),
        socket: policy.socket,
        least_request: policy.least_request,
    }
}
