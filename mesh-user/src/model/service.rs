//! What the agent reads of a Service: its addresses and ports, and the
//! fields that decide which endpoints a client on this node reaches
//! (kube-proxy's rules, in `compile::endpoints`), typed once here.

use k8s_openapi::api::core::v1::{Service as ApiService, ServicePort, ServiceSpec};

use super::NamespacedName;

/// A Service as the agent keeps it ([`From`] the API's object at the
/// boundary): ~300 bytes where the object was ~1.5 KB with its strings
/// (10 000 Services: 15 MiB -> 3), and nothing an update of fields we do not
/// read would change but the object's identity.
#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub name: NamespacedName,
    /// `spec.clusterIPs`, as written (compile parses them and reports
    /// what does not parse).
    pub cluster_ips: Box<[String]>,
    /// `spec.clusterIP`, read when `clusterIPs` is empty.
    pub cluster_ip: Option<String>,
    pub ports: Box<[ServicePort]>,
    /// `spec.selector`, by key; `None` when absent or empty. (A pair list:
    /// a map's node of one entry is ~550 bytes.)
    pub selector: Option<Box<[(String, String)]>>,
    /// `spec.trafficDistribution` is set (to any value).
    pub traffic_distribution_set: bool,
    pub policy: TrafficPolicy,
    /// What [`TrafficPolicy`] could not read, to be reported.
    pub policy_errors: Vec<PolicyError>,
    pub session_affinity: Result<Option<u32>, PolicyError>,
}

impl Default for Service {
    fn default() -> Self {
        Service::from(ApiService::default())
    }
}

impl From<ApiService> for Service {
    fn from(service: ApiService) -> Self {
        let name = NamespacedName::from_meta(&service.metadata);
        let spec = service.spec.unwrap_or_default();
        let (policy, policy_errors) = TrafficPolicy::parse(&spec);
        Service {
            name,
            session_affinity: parse_session_affinity(&spec),
            traffic_distribution_set: spec.traffic_distribution.is_some(),
            cluster_ips: spec.cluster_ips.unwrap_or_default().into(),
            cluster_ip: spec.cluster_ip,
            ports: spec.ports.unwrap_or_default().into(),
            selector: spec
                .selector
                .filter(|s| !s.is_empty())
                .map(|s| s.into_iter().collect()),
            policy,
            policy_errors,
        }
    }
}

/// `spec.internalTrafficPolicy`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InternalTrafficPolicy {
    #[default]
    Cluster,
    /// Only endpoints on the client's node.
    Local,
}

/// `spec.trafficDistribution`. kube-proxy reads only the hints the
/// EndpointSlice controller derives from it; we read it where we play that
/// controller (endpoints from Pods).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrafficDistribution {
    /// `PreferClose` (its older name) or `PreferSameZone`.
    PreferSameZone,
    PreferSameNode,
}

/// The endpoint selection fields of one Service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrafficPolicy {
    pub internal: InternalTrafficPolicy,
    pub distribution: Option<TrafficDistribution>,
    /// `spec.publishNotReadyAddresses`: every endpoint counts as ready.
    pub publish_not_ready: bool,
}

/// A policy field whose value we do not know (the API server refuses these;
/// a folder of manifests may hold them).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown value {0:?} (Cluster or Local): Cluster is used")]
    InternalTrafficPolicy(String),
    #[error("unknown value {0:?} (PreferClose, PreferSameZone or PreferSameNode): ignored")]
    TrafficDistribution(String),
    #[error("unknown value {0:?} (None or ClientIP): no session affinity")]
    SessionAffinity(String),
    #[error("{0} is not a timeout of 1 to 86400 seconds: no session affinity")]
    AffinityTimeout(i32),
}

impl PolicyError {
    /// The field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            PolicyError::InternalTrafficPolicy(_) => "spec.internalTrafficPolicy",
            PolicyError::TrafficDistribution(_) => "spec.trafficDistribution",
            PolicyError::SessionAffinity(_) => "spec.sessionAffinity",
            PolicyError::AffinityTimeout(_) => "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
        }
    }
}

impl TrafficPolicy {
    /// The policy of `service`; an unknown value falls back to what Kubernetes
    /// does without the field, and is returned to be reported.
    pub fn of(service: &Service) -> (Self, Vec<PolicyError>) {
        (service.policy, service.policy_errors.clone())
    }

    fn parse(spec: &ServiceSpec) -> (Self, Vec<PolicyError>) {
        let mut errors = Vec::new();
        let internal = match spec.internal_traffic_policy.as_deref() {
            None | Some("Cluster") => InternalTrafficPolicy::Cluster,
            Some("Local") => InternalTrafficPolicy::Local,
            Some(other) => {
                errors.push(PolicyError::InternalTrafficPolicy(other.to_owned()));
                InternalTrafficPolicy::Cluster
            }
        };
        let distribution = match spec.traffic_distribution.as_deref() {
            None => None,
            Some("PreferClose" | "PreferSameZone") => Some(TrafficDistribution::PreferSameZone),
            Some("PreferSameNode") => Some(TrafficDistribution::PreferSameNode),
            Some(other) => {
                errors.push(PolicyError::TrafficDistribution(other.to_owned()));
                None
            }
        };
        let policy = Self {
            internal,
            distribution,
            publish_not_ready: spec.publish_not_ready_addresses.unwrap_or(false),
        };
        (policy, errors)
    }
}

/// `sessionAffinity: ClientIP`'s timeout when Kubernetes gives none (3 h).
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The longest timeout Kubernetes accepts (1 day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// `spec.sessionAffinity`: `Some(timeout in seconds)` for `ClientIP`. A value
/// the API server would refuse means no affinity, returned to be reported.
pub fn session_affinity(service: &Service) -> Result<Option<u32>, PolicyError> {
    service.session_affinity.clone()
}

fn parse_session_affinity(spec: &ServiceSpec) -> Result<Option<u32>, PolicyError> {
    match spec.session_affinity.as_deref() {
        None | Some("None") => return Ok(None),
        Some("ClientIP") => {}
        Some(other) => return Err(PolicyError::SessionAffinity(other.to_owned())),
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    match timeout {
        None => Ok(Some(DEFAULT_AFFINITY_TIMEOUT_S)),
        Some(t) => u32::try_from(t)
            .ok()
            .filter(|t| (1..=MAX_AFFINITY_TIMEOUT_S).contains(t))
            .map(Some)
            .ok_or(PolicyError::AffinityTimeout(t)),
    }
}

/// A Service's pod selector; `None` when it has none (or an empty one): its
/// endpoints are whatever its slices say.
pub fn selector(service: &Service) -> Option<&[(String, String)]> {
    service.selector.as_deref()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(spec: serde_json::Value) -> Service {
        let api: ApiService =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "web"}, "spec": spec}))
                .expect("valid Service");
        Service::from(api)
    }

    #[test]
    fn policies_read_typed_with_kubernetes_defaults() {
        assert_eq!(
            TrafficPolicy::of(&service(serde_json::json!({}))),
            (TrafficPolicy::default(), Vec::new())
        );
        let (p, errors) = TrafficPolicy::of(&service(serde_json::json!({
            "internalTrafficPolicy": "Local",
            "trafficDistribution": "PreferClose",
            "publishNotReadyAddresses": true,
        })));
        assert!(errors.is_empty());
        assert_eq!(
            p,
            TrafficPolicy {
                internal: InternalTrafficPolicy::Local,
                distribution: Some(TrafficDistribution::PreferSameZone),
                publish_not_ready: true,
            }
        );
    }

    #[test]
    fn unknown_values_fall_back_and_are_named_by_field() {
        let (p, errors) = TrafficPolicy::of(&service(serde_json::json!({
            "internalTrafficPolicy": "Nearby",
            "trafficDistribution": "PreferFar",
        })));
        assert_eq!(p, TrafficPolicy::default());
        let fields: Vec<_> = errors.iter().map(PolicyError::field).collect();
        assert_eq!(
            fields,
            ["spec.internalTrafficPolicy", "spec.trafficDistribution"]
        );
    }

    #[test]
    fn session_affinity_reads_client_ip_with_kubernetes_default_and_bounds() {
        let affinity = |spec| session_affinity(&service(spec));
        assert_eq!(affinity(serde_json::json!({})), Ok(None));
        assert_eq!(
            affinity(serde_json::json!({"sessionAffinity": "None"})),
            Ok(None)
        );
        assert_eq!(
            affinity(serde_json::json!({"sessionAffinity": "ClientIP"})),
            Ok(Some(DEFAULT_AFFINITY_TIMEOUT_S))
        );
        assert_eq!(
            affinity(serde_json::json!({"sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 5}}})),
            Ok(Some(5))
        );
        for bad in [0, -1, 86_401] {
            let err = affinity(serde_json::json!({"sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": bad}}}))
            .expect_err("out of range");
            assert_eq!(
                err.field(),
                "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
            );
        }
        let err = affinity(serde_json::json!({"sessionAffinity": "Cookie"})).expect_err("unknown");
        assert_eq!(err.field(), "spec.sessionAffinity");
    }
}
