//! What compile produces: the desired table of each service port, and the
//! addresses that key them. The kernel layer turns these into map entries.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use crate::model::{Diagnostic, NamespacedName};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceAddr {
    pub vip: IpAddr,
    pub port: u16,
    pub proto: Proto,
    /// `Some(i)`: the table of the port's route's `i`-th destination, which
    /// connects reach only through the port's own table (one that picks a
    /// destination: [`ServicePlan::to_destinations`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<u8>,
}

impl ServiceAddr {
    /// The port's own table (the one connects look up).
    pub fn port(vip: IpAddr, port: u16, proto: Proto) -> Self {
        Self {
            vip,
            port,
            proto,
            destination: None,
        }
    }

    /// The table of destination `index` of this port's route.
    pub fn destination(self, index: u8) -> Self {
        Self {
            destination: Some(index),
            ..self
        }
    }
}

impl fmt::Display for ServiceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", SocketAddr::new(self.vip, self.port), self.proto)?;
        match self.destination {
            Some(i) => write!(f, " destination {i}"),
            None => Ok(()),
        }
    }
}

/// Where a connection goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BackendAddr {
    pub ip: IpAddr,
    pub port: u16,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SocketAddr::new(self.ip, self.port).fmt(f)
    }
}

/// What decided a service port's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RouteRef {
    /// A route of a VirtualService, by field path (`spec.http[0]`).
    VirtualService { name: NamespacedName, field: String },
    /// No VirtualService route applies: even balancing over the ready endpoints.
    Even,
    /// A gateway port whose routes are decided per request: to the HTTP router.
    Router { port: u16 },
}

impl fmt::Display for RouteRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteRef::VirtualService { name, field } => write!(f, "VirtualService {name} {field}"),
            RouteRef::Even => f.write_str("no VirtualService route: even balancing"),
            RouteRef::Router { port } => {
                write!(
                    f,
                    "gateway port {port}: routes decided per request by the HTTP router"
                )
            }
        }
    }
}

/// The desired table of one service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePlan {
    pub service: NamespacedName,
    pub route: RouteRef,
    /// The slot table; `None` slots refuse the connect. Empty: no backend at
    /// all (or a table that picks a destination). Shared with the applier's
    /// live table.
    pub slots: Arc<[Option<BackendAddr>]>,
    /// A table that picks one of the route's destinations, each with a table
    /// of its own (destinations whose policies differ): each slot the index
    /// of a destination ([`ServiceAddr::destination`]); `slots` is empty.
    pub to_destinations: Vec<u8>,
    /// What the table was built from: each destination of the route (a subset,
    /// or every endpoint), its weight, and its ready endpoints of this family.
    /// Shared with the record (`state.json`).
    pub destinations: Arc<[DestinationPlan]>,
    /// A gateway port on a node address: translated only for sockets of the
    /// node's own network namespace, by the gateway's programs.
    pub gateway: bool,
    /// `sessionAffinity: ClientIP`: a client keeps its backend until idle this
    /// many seconds (or the backend leaves).
    pub affinity_timeout_s: Option<u32>,
    /// DestinationRule `consistentHash.useSourceIp`: `slots` is a weighted
    /// Maglev table indexed by a hash of the client.
    pub hash_client: bool,
    /// DestinationRule `connectionPool.tcp` `connectTimeout`/`tcpKeepalive`
    /// for the clients' sockets.
    pub socket: Option<mesh_common::SocketPolicy>,
    /// DestinationRule `LEAST_REQUEST`: the less loaded of two drawn slots.
    pub least_request: bool,
}

impl ServicePlan {
    /// `ServiceValue::flags` of this table.
    pub fn flags(&self) -> u32 {
        let mut flags = 0;
        if self.gateway {
            flags |= mesh_common::SERVICE_FLAG_GATEWAY;
        }
        if self.affinity_timeout_s.is_some() {
            flags |= mesh_common::SERVICE_FLAG_AFFINITY;
        }
        if self.hash_client {
            flags |= mesh_common::SERVICE_FLAG_HASH_CLIENT;
        }
        if self.socket.is_some() {
            flags |= mesh_common::SERVICE_FLAG_SOCKOPTS;
        }
        if self.least_request {
            flags |= mesh_common::SERVICE_FLAG_LEAST_REQUEST;
        }
        if !self.to_destinations.is_empty() {
            flags |= mesh_common::SERVICE_FLAG_DESTINATIONS;
        }
        flags
    }

    /// Slots the table takes in the kernel.
    pub fn slot_count(&self) -> usize {
        self.slots.len().max(self.to_destinations.len())
    }
}

/// One weighted destination of a route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DestinationPlan {
    /// `host subset NAME`, `host`, or `every ready endpoint`.
    pub name: String,
    pub weight: u64,
    pub backends: Vec<BackendAddr>,
}

#[derive(Clone, Debug, Default)]
pub struct Compiled {
    pub services: BTreeMap<ServiceAddr, ServicePlan>,
    /// This node's gateway ports and what serves each (their kernel tables are
    /// added by [`super::gateway::service_plans`] once the router listens).
    pub gateways: Vec<super::gateway::GatewayPort>,
    /// Endpoints whose connections the same-node redirect leaves to TCP.
    pub redirect_excluded: BTreeSet<BackendAddr>,
    /// Service ports with no accepted VirtualService but a rejected one that was
    /// never accepted: their plan is even balancing, but what the user meant is
    /// not known yet (a table the kernel held at start is better kept).
    pub undecided: BTreeSet<ServiceAddr>,
    /// Services with outlier detection: the policy and every backend it
    /// judges (ejected ones included), for the detector.
    pub outlier: BTreeMap<OutlierPool, OutlierWatch>,
    pub diagnostics: Vec<Diagnostic>,
}

/// What outlier detection judges as one: a Service's endpoints, or one
/// subset of them (Envoy judges per cluster, and a subset is a cluster of its
/// own).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OutlierPool {
    pub service: NamespacedName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
}

impl fmt::Display for OutlierPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subset {
            Some(subset) => write!(f, "{} subset {subset}", self.service),
            None => self.service.fmt(f),
        }
    }
}

/// One pool's outlier detection: its policy (of the first of its ports
/// that has one) and its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierWatch {
    pub policy: super::policy::Outlier,
    pub backends: BTreeSet<BackendAddr>,
}

#[cfg(test)]
impl ServicePlan {
    /// A test's table of Service `prod/name`: even balancing over `backends`
    /// (host parts of 10.244.0.x, port 5000), one slot each.
    pub(crate) fn even_over(name: &str, backends: &[u8]) -> Self {
        let backends: Vec<BackendAddr> = backends
            .iter()
            .map(|&b| BackendAddr {
                ip: IpAddr::from([10, 244, 0, b]),
                port: 5000,
            })
            .collect();
        ServicePlan {
            service: NamespacedName::new("prod", name),
            route: RouteRef::Even,
            slots: backends.iter().copied().map(Some).collect(),
            destinations: vec![DestinationPlan {
                name: "every ready endpoint".to_owned(),
                weight: 1,
                backends,
            }]
            .into(),
            gateway: false,
            affinity_timeout_s: None,
            hash_client: false,
            socket: None,
            least_request: false,
            to_destinations: Vec::new(),
        }
    }
}
