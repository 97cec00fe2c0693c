//! DestinationRule `trafficPolicy`: what the data plane honours, and every
//! field it does not, reported on the object by field (never applied as
//! something else).
//!
//! Honoured: `loadBalancer.simple` `RANDOM`, `UNSPECIFIED` and `ROUND_ROBIN`.
//! All three give each backend its weighted share of connections, drawn at
//! random per connection: a strict rotation would need a per-service cursor
//! written on every connect, and over many connections it converges to the
//! same shares (Envoy's own round robin is weighted and per proxy, not global).

use serde_json::Value;

use crate::{
    index::Entry,
    model::{DestinationRule, Diagnostic, Kind, ObjectRef},
};

/// What is not honoured, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unhonoured {
    /// A load balancer other than weighted random.
    Balancer,
    /// Pools, outlier detection, TLS...: not in this data plane yet.
    NotYet,
    /// TLS settings: the data plane does not terminate or originate TLS.
    Tls,
    /// A field Istio does not define.
    Unknown,
}

impl Unhonoured {
    fn message(self, what: &str) -> String {
        match self {
            Unhonoured::Balancer => {
                format!("{what} is not honoured yet: connections are balanced by weight, at random")
            }
            Unhonoured::NotYet => format!("{what} is not honoured yet: ignored"),
            Unhonoured::Tls => {
                format!(
                    "{what}: the data plane carries TCP as it is and neither originates nor terminates TLS: ignored"
                )
            }
            Unhonoured::Unknown => format!("unknown field {what}: ignored"),
        }
    }
}

/// Every `trafficPolicy` field of `dr` (the rule's, its ports', its subsets')
/// that is not honoured, as warnings on the object.
pub fn unhonoured(dr: &Entry<DestinationRule>) -> Vec<Diagnostic> {
    let me = ObjectRef::from_meta(Kind::DestinationRule, &dr.object.metadata);
    let mut found = Vec::new();
    if let Some(policy) = dr.object.spec.other.get("trafficPolicy") {
        walk_policy(policy, "spec.trafficPolicy", true, &mut found);
    }
    for (i, subset) in dr.object.spec.subsets.iter().enumerate() {
        if let Some(policy) = subset.other.get("trafficPolicy") {
            walk_policy(
                policy,
                &format!("spec.subsets[{i}].trafficPolicy"),
                true,
                &mut found,
            );
        }
    }
    found
        .into_iter()
        .map(|(field, why)| {
            let what = field.rsplit('.').next().unwrap_or(&field).to_owned();
            Diagnostic::warning(&me, &field, why.message(&what)).with_origin(&dr.origin)
        })
        .collect()
}

/// One policy object at `at`; `ports`: whether `portLevelSettings` may appear
/// (not inside a port's own settings).
fn walk_policy(policy: &Value, at: &str, ports: bool, found: &mut Vec<(String, Unhonoured)>) {
    let Some(fields) = policy.as_object() else {
        return;
    };
    for (key, value) in fields {
        let field = format!("{at}.{key}");
        match key.as_str() {
            "loadBalancer" => load_balancer(value, &field, found),
            "portLevelSettings" if ports => {
                for (j, port) in value.as_array().into_iter().flatten().enumerate() {
                    let at = format!("{field}[{j}]");
                    let mut settings = port.clone();
                    if let Some(o) = settings.as_object_mut() {
                        o.remove("port");
                    }
                    walk_policy(&settings, &at, false, found);
                }
            }
            "connectionPool" | "outlierDetection" | "proxyProtocol" | "tunnel" => {
                found.push((field, Unhonoured::NotYet));
            }
            "tls" => found.push((field, Unhonoured::Tls)),
            _ => found.push((field, Unhonoured::Unknown)),
        }
    }
}

fn load_balancer(lb: &Value, at: &str, found: &mut Vec<(String, Unhonoured)>) {
    let Some(fields) = lb.as_object() else {
        return;
    };
    for (key, value) in fields {
        let field = format!("{at}.{key}");
        let honoured = key == "simple"
            && matches!(
                value.as_str(),
                Some("RANDOM" | "ROUND_ROBIN" | "UNSPECIFIED")
            );
        if !honoured {
            found.push((field, Unhonoured::Balancer));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(yaml: &str) -> Entry<DestinationRule> {
        Entry {
            origin: "dr.yaml".to_owned(),
            object: serde_yaml_ng::from_str(yaml).expect("a DestinationRule"),
        }
    }

    fn fields(dr: &Entry<DestinationRule>) -> Vec<(String, String)> {
        unhonoured(dr)
            .into_iter()
            .map(|d| (d.field.clone(), d.message.clone()))
            .collect()
    }

    #[test]
    fn weighted_random_balancers_are_honoured_silently() {
        for simple in ["RANDOM", "ROUND_ROBIN", "UNSPECIFIED"] {
            let dr = rule(&format!(
                "metadata: {{name: web, namespace: prod}}
spec:
  host: web
  trafficPolicy: {{loadBalancer: {{simple: {simple}}}}}
"
            ));
            assert_eq!(fields(&dr), [], "{simple}");
        }
    }

    #[test]
    fn every_other_policy_field_is_reported_where_it_is_written() {
        let dr = rule(
            "metadata: {name: web, namespace: prod}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {consistentHash: {useSourceIp: true}}
    connectionPool: {tcp: {maxConnections: 10}}
    portLevelSettings:
      - port: {number: 80}
        loadBalancer: {simple: LEAST_REQUEST}
        outlierDetection: {consecutive5xxErrors: 3}
  subsets:
    - name: v1
      labels: {version: v1}
      trafficPolicy: {tls: {mode: ISTIO_MUTUAL}, speed: fast}
",
        );
        let got: Vec<String> = fields(&dr).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            got,
            [
                "spec.trafficPolicy.connectionPool",
                "spec.trafficPolicy.loadBalancer.consistentHash",
                "spec.trafficPolicy.portLevelSettings[0].loadBalancer.simple",
                "spec.trafficPolicy.portLevelSettings[0].outlierDetection",
                "spec.subsets[0].trafficPolicy.speed",
                "spec.subsets[0].trafficPolicy.tls",
            ]
        );
        let messages: Vec<String> = fields(&dr).into_iter().map(|(_, m)| m).collect();
        assert!(
            messages[1].contains(
                "consistentHash is not honoured yet: connections are balanced by weight, at random"
            ),
            "{messages:?}"
        );
        assert!(messages[4].contains("unknown field speed"), "{messages:?}");
    }
}
