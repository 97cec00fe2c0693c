//! The Service fields that decide which endpoints a client on this node
//! reaches (kube-proxy's rules, in `compile::endpoints`), typed once here.

use k8s_openapi::api::core::v1::Service;

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
}

impl PolicyError {
    /// The field at fault.
    pub fn field(&self) -> &'static str {
        match self {
            PolicyError::InternalTrafficPolicy(_) => "spec.internalTrafficPolicy",
            PolicyError::TrafficDistribution(_) => "spec.trafficDistribution",
        }
    }
}

impl TrafficPolicy {
    /// The policy of `service`; an unknown value falls back to what Kubernetes
    /// does without the field, and is returned to be reported.
    pub fn of(service: &Service) -> (Self, Vec<PolicyError>) {
        let mut errors = Vec::new();
        let Some(spec) = &service.spec else {
            return (Self::default(), errors);
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    fn service(spec: serde_json::Value) -> Service {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "web"}, "spec": spec}))
            .expect("valid Service")
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
}
