//! DestinationRule `trafficPolicy`: what the data plane honours, and every
//! field it does not, reported on the object by field (never applied as
//! something else).
//!
//! Honoured: `loadBalancer.simple` `RANDOM`, `UNSPECIFIED` and `ROUND_ROBIN`.
//! All three give each backend its weighted share of connections, drawn at
//! random per connection: a strict rotation would need a per-service cursor
//! written on every connect, and over many connections it converges to the
//! same shares (Envoy's own round robin is weighted and per proxy, not global).
//! And `loadBalancer.consistentHash.useSourceIp` (with `maglev.tableSize`) at
//! the rule's or a port's level: one weighted Maglev table per service port,
//! indexed by a hash of the client ([`client_hash`]). And `simple:
//! LEAST_REQUEST` (or `LEAST_CONN`) as fewest open connections: the kernel
//! counts each backend's open connections and takes the less loaded of two
//! drawn ([`least_request`]). Not per subset: the port's one table mixes the
//! route's subsets.

use std::time::Duration;

use serde_json::Value;

use super::gateway::maglev;
use crate::{
    index::Entry,
    model::{DestinationRule, Diagnostic, Kind, ObjectRef},
};

/// `consistentHash.useSourceIp`: the Maglev table size to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientHash {
    pub table_size: u32,
}

/// One `trafficPolicy` field of `dr` for service port `port`: the
/// `portLevelSettings` entry of that port's, if it sets it, else the rule's
/// (Istio merges field by field, the port's winning).
pub(super) fn setting<'a>(dr: &'a DestinationRule, port: u16, field: &str) -> Option<&'a Value> {
    let policy = dr.spec.other.get("trafficPolicy")?;
    policy
        .get("portLevelSettings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|p| p.pointer("/port/number").and_then(Value::as_u64) == Some(u64::from(port)))
        .and_then(|p| p.get(field))
        .or_else(|| policy.get(field))
}

/// Whether `dr` asks for `LEAST_REQUEST` (or its old name `LEAST_CONN`) on
/// service port `port`: fewest open connections, of two drawn.
pub fn least_request(dr: &DestinationRule, port: u16) -> bool {
    setting(dr, port, "loadBalancer")
        .and_then(|lb| lb.get("simple"))
        .and_then(Value::as_str)
        .is_some_and(|s| matches!(s, "LEAST_REQUEST" | "LEAST_CONN"))
}

/// The consistent hash `dr` asks for on service port `port`.
pub fn client_hash(dr: &DestinationRule, port: u16) -> Option<ClientHash> {
    let hash = setting(dr, port, "loadBalancer")?.get("consistentHash")?;
    if hash.get("useSourceIp").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    let table_size = hash
        .pointer("/maglev/tableSize")
        .and_then(Value::as_u64)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| maglev::PRIMES.contains(n))
        .unwrap_or(maglev::DEFAULT_SIZE);
    Some(ClientHash { table_size })
}

/// `outlierDetection` at L4: failed connects (refused, unreachable, timed
/// out) count as the errors Istio names; a backend with `threshold` of them
/// in a row is ejected for `base_ejection` times its ejection count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outlier {
    /// The smaller of `consecutive5xxErrors` (Istio's default 5) and
    /// `consecutiveGatewayErrors` (off by default), 0 excluded.
    pub threshold: u64,
    /// `interval` (default 10 s): how often backends are judged.
    pub interval: Duration,
    /// `baseEjectionTime` (default 30 s).
    pub base_ejection: Duration,
    /// `maxEjectionPercent` (default 10): no more is ejected once this share
    /// of the backends is out (Envoy's rule: one can always go while the
    /// share ejected is below it).
    pub max_ejection_percent: u32,
    /// `minHealthPercent` (default 0): below this share of healthy backends,
    /// none is left out.
    pub min_health_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            threshold: 5,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
        }
    }
}

/// The outlier detection `dr` asks for on service port `port` (`None`: none,
/// or one whose thresholds are all 0: off).
pub fn outlier(dr: &DestinationRule, port: u16) -> Option<Outlier> {
    let od = setting(dr, port, "outlierDetection")?;
    let mut o = Outlier::default();
    let number = |key: &str| od.get(key).and_then(Value::as_u64);
    let five = number("consecutive5xxErrors").unwrap_or(o.threshold);
    let gateway = number("consecutiveGatewayErrors").unwrap_or(0);
    o.threshold = [five, gateway].into_iter().filter(|n| *n > 0).min()?;
    let duration = |key: &str| od.get(key).and_then(Value::as_str).and_then(parse_duration);
    o.interval = duration("interval").unwrap_or(o.interval);
    o.base_ejection = duration("baseEjectionTime").unwrap_or(o.base_ejection);
    let percent = |key: &str, default: u32| {
        number(key)
            .and_then(|n| u32::try_from(n).ok())
            .map_or(default, |n| n.min(100))
    };
    o.max_ejection_percent = percent("maxEjectionPercent", o.max_ejection_percent);
    o.min_health_percent = percent("minHealthPercent", o.min_health_percent);
    Some(o)
}

/// A duration as Istio writes them: `30s`, `1.5s`, `100ms`, `1m`, `1h`.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = number.parse().ok()?;
    let seconds = match unit {
        "ms" => n / 1e3,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    (seconds.is_finite() && seconds > 0.0).then(|| Duration::from_secs_f64(seconds))
}

/// `connectionPool.tcp` `connectTimeout`, `tcpKeepalive` and
/// `maxConnections` (per backend) for the clients' sockets (`None`: none set).
pub fn socket_options(dr: &DestinationRule, port: u16) -> Option<mesh_common::SocketPolicy> {
    let tcp = setting(dr, port, "connectionPool")?.get("tcp")?;
    let seconds = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .and_then(parse_duration)
            .map_or(0, |d| u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX))
    };
    let keepalive = tcp.get("tcpKeepalive");
    let options = mesh_common::SocketPolicy {
        connect_timeout_ms: tcp
            .get("connectTimeout")
            .and_then(Value::as_str)
            .and_then(parse_duration)
            .map_or(0, |d| {
                u32::try_from(d.as_millis().max(1)).unwrap_or(u32::MAX)
            }),
        // Istio's default keepalive time is the kernel's (7200 s).
        keepalive_time_s: keepalive.map_or(0, |k| match seconds(k.get("time")) {
            0 => 7200,
            t => t,
        }),
        keepalive_interval_s: seconds(keepalive.and_then(|k| k.get("interval"))),
        keepalive_probes: keepalive
            .and_then(|k| k.get("probes"))
            .and_then(Value::as_u64)
            .map_or(0, |p| u32::try_from(p).unwrap_or(u32::MAX)),
        max_connections: tcp
            .get("maxConnections")
            .and_then(Value::as_u64)
            .map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
    };
    (options != mesh_common::SocketPolicy::default()).then_some(options)
}

/// What is not honoured, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Unhonoured {
    /// A load balancer other than weighted random.
    Balancer,
    /// A `simple` load balancer other than weighted random: its value.
    Simple(String),
    /// A consistent hash on something else than the client's address.
    HashKey,
    /// A Maglev table size we do not build.
    TableSize,
    /// A consistent hash on a subset: the port's one table mixes subsets.
    SubsetHash,
    /// Outlier detection per subset: backends are judged per service port.
    SubsetOutlier,
    /// A duration Istio would not accept.
    Duration,
    /// Locality failover without outlier detection (Istio needs both).
    FailoverWithoutOutlier,
    /// Pools, outlier detection, TLS...: not in this data plane yet.
    NotYet,
    /// TLS settings: the data plane does not terminate or originate TLS.
    Tls,
    /// A field Istio does not define.
    Unknown,
}

impl Unhonoured {
    fn message(&self, what: &str) -> String {
        match self {
            Unhonoured::Simple(value) => format!(
                "{what} {value} is not honoured yet: connections are balanced by weight, at random"
            ),
            Unhonoured::Balancer => {
                format!("{what} is not honoured yet: connections are balanced by weight, at random")
            }
            Unhonoured::HashKey => format!(
                "{what}: only useSourceIp is honoured; connections are balanced by weight, at random"
            ),
            Unhonoured::TableSize => format!(
                "{what}: not one of the table sizes built ({sizes:?}): {default} slots",
                sizes = maglev::PRIMES,
                default = maglev::DEFAULT_SIZE
            ),
            Unhonoured::SubsetHash => format!(
                "{what} per subset is not honoured: a service port has one table for all its subsets; set it on the rule or its port"
            ),
            Unhonoured::SubsetOutlier => format!(
                "{what} per subset is not honoured: backends are judged per service port; set it on the rule or its port"
            ),
            Unhonoured::FailoverWithoutOutlier => format!(
                "{what} needs outlierDetection on the same rule or port (as in Istio): not honoured"
            ),
            Unhonoured::Duration => {
                format!("{what}: not a duration (e.g. 30s, 1.5s, 100ms, 1m): the default is used")
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
        walk_policy(policy, "spec.trafficPolicy", Level::Rule, &mut found);
    }
    for (i, subset) in dr.object.spec.subsets.iter().enumerate() {
        if let Some(policy) = subset.other.get("trafficPolicy") {
            walk_policy(
                policy,
                &format!("spec.subsets[{i}].trafficPolicy"),
                Level::Subset,
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

/// Where a policy object is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Rule,
    Port,
    Subset,
}

/// One policy object at `at`.
fn walk_policy(policy: &Value, at: &str, level: Level, found: &mut Vec<(String, Unhonoured)>) {
    let Some(fields) = policy.as_object() else {
        return;
    };
    for (key, value) in fields {
        let field = format!("{at}.{key}");
        match key.as_str() {
            "loadBalancer" => {
                let outlier = fields.contains_key("outlierDetection");
                load_balancer(value, &field, level, outlier, found);
            }
            "portLevelSettings" if level != Level::Port => {
                for (j, port) in value.as_array().into_iter().flatten().enumerate() {
                    let at = format!("{field}[{j}]");
                    let mut settings = port.clone();
                    if let Some(o) = settings.as_object_mut() {
                        o.remove("port");
                    }
                    let level = match level {
                        Level::Subset => Level::Subset,
                        _ => Level::Port,
                    };
                    walk_policy(&settings, &at, level, found);
                }
            }
            "outlierDetection" if level == Level::Subset => {
                found.push((field, Unhonoured::SubsetOutlier));
            }
            "outlierDetection" => outlier_fields(value, &field, found),
            "connectionPool" if level == Level::Subset => {
                found.push((field, Unhonoured::NotYet));
            }
            "connectionPool" => connection_pool(value, &field, found),
            "proxyProtocol" | "tunnel" => {
                found.push((field, Unhonoured::NotYet));
            }
            "tls" => found.push((field, Unhonoured::Tls)),
            _ => found.push((field, Unhonoured::Unknown)),
        }
    }
}

fn load_balancer(
    lb: &Value,
    at: &str,
    level: Level,
    outlier: bool,
    found: &mut Vec<(String, Unhonoured)>,
) {
    let Some(fields) = lb.as_object() else {
        return;
    };
    for (key, value) in fields {
        let field = format!("{at}.{key}");
        match key.as_str() {
            "simple"
                if matches!(
                    value.as_str(),
                    Some("RANDOM" | "ROUND_ROBIN" | "UNSPECIFIED")
                ) => {}
            "consistentHash" if level == Level::Subset => {
                found.push((field, Unhonoured::SubsetHash));
            }
            "simple"
                if level != Level::Subset
                    && matches!(value.as_str(), Some("LEAST_REQUEST" | "LEAST_CONN")) => {}
            "consistentHash" => consistent_hash(value, &field, found),
            "localityLbSetting" if level == Level::Subset => {
                found.push((field, Unhonoured::NotYet));
            }
            "localityLbSetting" => locality_fields(value, &field, outlier, found),
            "simple" => {
                let value = value.as_str().unwrap_or("?").to_owned();
                found.push((field, Unhonoured::Simple(value)));
            }
            _ => found.push((field, Unhonoured::Balancer)),
        }
    }
}

/// `localityLbSetting`: `enabled`, `distribute` and `failover` honoured
/// (failover only with outlier detection, as Istio); the rest reported.
fn locality_fields(lls: &Value, at: &str, outlier: bool, found: &mut Vec<(String, Unhonoured)>) {
    for (key, _) in lls.as_object().into_iter().flatten() {
        let field = format!("{at}.{key}");
        match key.as_str() {
            "enabled" | "distribute" => {}
            "failover" if outlier => {}
            "failover" => found.push((field, Unhonoured::FailoverWithoutOutlier)),
            _ => found.push((field, Unhonoured::NotYet)),
        }
    }
}

/// `outlierDetection`: the fields of connect failures honoured, the others
/// (local-origin splitting, per-error-kind tuning) reported.
fn outlier_fields(od: &Value, at: &str, found: &mut Vec<(String, Unhonoured)>) {
    for (key, value) in od.as_object().into_iter().flatten() {
        let field = format!("{at}.{key}");
        match key.as_str() {
            "consecutive5xxErrors"
            | "consecutiveGatewayErrors"
            | "maxEjectionPercent"
            | "minHealthPercent" => {}
            "interval" | "baseEjectionTime" => {
                if value.as_str().and_then(parse_duration).is_none() {
                    found.push((field, Unhonoured::Duration));
                }
            }
            _ => found.push((field, Unhonoured::NotYet)),
        }
    }
}

/// `connectionPool`: `tcp.connectTimeout`, `tcp.tcpKeepalive` and
/// `tcp.maxConnections` honoured, the others reported.
fn connection_pool(pool: &Value, at: &str, found: &mut Vec<(String, Unhonoured)>) {
    for (key, value) in pool.as_object().into_iter().flatten() {
        let field = format!("{at}.{key}");
        if key != "tcp" {
            found.push((field, Unhonoured::NotYet));
            continue;
        }
        for (key, value) in value.as_object().into_iter().flatten() {
            let field = format!("{field}.{key}");
            match key.as_str() {
                "maxConnections" => {
                    if value.as_u64().is_none() {
                        found.push((field, Unhonoured::NotYet));
                    }
                }
                "connectTimeout" => {
                    if value.as_str().and_then(parse_duration).is_none() {
                        found.push((field, Unhonoured::Duration));
                    }
                }
                "tcpKeepalive" => {
                    for (key, value) in value.as_object().into_iter().flatten() {
                        let field = format!("{field}.{key}");
                        let ok = match key.as_str() {
                            "time" | "interval" => {
                                value.as_str().and_then(parse_duration).is_some()
                            }
                            "probes" => value.as_u64().is_some(),
                            _ => false,
                        };
                        if !ok {
                            found.push((field, Unhonoured::Duration));
                        }
                    }
                }
                _ => found.push((field, Unhonoured::NotYet)),
            }
        }
    }
}

/// `consistentHash`: `useSourceIp: true` with `maglev.tableSize` honoured.
fn consistent_hash(hash: &Value, at: &str, found: &mut Vec<(String, Unhonoured)>) {
    if hash.get("useSourceIp").and_then(Value::as_bool) != Some(true) {
        found.push((at.to_owned(), Unhonoured::HashKey));
        return;
    }
    for (key, value) in hash.as_object().into_iter().flatten() {
        let field = format!("{at}.{key}");
        match key.as_str() {
            "useSourceIp" => {}
            "maglev" => {
                let size = value.get("tableSize").and_then(Value::as_u64);
                let listed = size
                    .is_none_or(|n| u32::try_from(n).is_ok_and(|n| maglev::PRIMES.contains(&n)));
                if !listed {
                    found.push((format!("{field}.tableSize"), Unhonoured::TableSize));
                }
            }
            _ => found.push((field, Unhonoured::HashKey)),
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
    loadBalancer: {consistentHash: {httpHeaderName: x-user}}
    connectionPool: {tcp: {maxConnections: 10, noDelay: true}}
    portLevelSettings:
      - port: {number: 80}
        loadBalancer: {simple: PASSTHROUGH}
        outlierDetection: {consecutive5xxErrors: 3, splitExternalLocalOriginErrors: true, interval: soon}
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
                "spec.trafficPolicy.connectionPool.tcp.noDelay",
                "spec.trafficPolicy.loadBalancer.consistentHash",
                "spec.trafficPolicy.portLevelSettings[0].loadBalancer.simple",
                "spec.trafficPolicy.portLevelSettings[0].outlierDetection.interval",
                "spec.trafficPolicy.portLevelSettings[0].outlierDetection.splitExternalLocalOriginErrors",
                "spec.subsets[0].trafficPolicy.speed",
                "spec.subsets[0].trafficPolicy.tls",
            ]
        );
        let messages: Vec<String> = fields(&dr).into_iter().map(|(_, m)| m).collect();
        assert!(
            messages[1].contains("consistentHash: only useSourceIp is honoured"),
            "{messages:?}"
        );
        assert!(messages[5].contains("unknown field speed"), "{messages:?}");
        assert_eq!(
            messages[2],
            "simple PASSTHROUGH is not honoured yet: connections are balanced by weight, at random"
        );
    }

    #[test]
    fn a_source_ip_hash_is_honoured_on_the_rule_or_its_port_and_reported_per_subset() {
        let dr = rule(
            "metadata: {name: web, namespace: prod}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {consistentHash: {useSourceIp: true}}
    portLevelSettings:
      - port: {number: 8080}
        loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 65521}}}
      - port: {number: 9090}
        loadBalancer: {consistentHash: {useSourceIp: true, maglev: {tableSize: 1000}}}
      - port: {number: 7070}
        loadBalancer: {simple: RANDOM}
  subsets:
    - name: v1
      labels: {version: v1}
      trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
",
        );
        let at = |port| client_hash(&dr.object, port).map(|h| h.table_size);
        assert_eq!(at(80), Some(maglev::DEFAULT_SIZE));
        assert_eq!(at(8080), Some(65521));
        assert_eq!(at(9090), Some(maglev::DEFAULT_SIZE));
        assert_eq!(at(7070), None);
        let got: Vec<String> = fields(&dr).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            got,
            [
                "spec.trafficPolicy.portLevelSettings[1].loadBalancer.consistentHash.maglev.tableSize",
                "spec.subsets[0].trafficPolicy.loadBalancer.consistentHash",
            ]
        );
    }

    #[test]
    fn outlier_detection_reads_istio_fields_defaults_and_the_port_first() {
        let dr = rule(
            "metadata: {name: web, namespace: prod}
spec:
  host: web
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, interval: 1s, baseEjectionTime: 1.5s, maxEjectionPercent: 50}
    portLevelSettings:
      - port: {number: 8080}
        outlierDetection: {consecutiveGatewayErrors: 7, interval: 100ms}
      - port: {number: 9090}
        outlierDetection: {consecutive5xxErrors: 0}
      - port: {number: 7070}
        loadBalancer: {simple: RANDOM}
",
        );
        let at = |port| outlier(&dr.object, port);
        assert_eq!(
            at(80),
            Some(Outlier {
                threshold: 2,
                interval: Duration::from_secs(1),
                base_ejection: Duration::from_millis(1500),
                max_ejection_percent: 50,
                min_health_percent: 0,
            })
        );
        // The port's own settings, Istio's defaults for what it leaves out.
        assert_eq!(
            at(8080),
            Some(Outlier {
                threshold: 5,
                interval: Duration::from_millis(100),
                ..Outlier::default()
            })
        );
        assert_eq!(at(9090), None, "every threshold 0: off");
        assert_eq!(at(7070).map(|o| o.threshold), Some(2), "the rule's");
        assert_eq!(fields(&dr), []);
    }

    #[test]
    fn connection_pool_tcp_options_become_socket_options_and_the_rest_is_reported() {
        let dr = rule(
            "metadata: {name: web, namespace: prod}
spec:
  host: web
  trafficPolicy:
    connectionPool:
      tcp: {connectTimeout: 250ms, tcpKeepalive: {interval: 5s}, maxConnections: 10}
      http: {http1MaxPendingRequests: 5}
",
        );
        assert_eq!(
            socket_options(&dr.object, 80),
            Some(mesh_common::SocketPolicy {
                connect_timeout_ms: 250,
                keepalive_time_s: 7200,
                keepalive_interval_s: 5,
                keepalive_probes: 0,
                max_connections: 10,
            })
        );
        let got: Vec<String> = fields(&dr).into_iter().map(|(f, _)| f).collect();
        assert_eq!(got, ["spec.trafficPolicy.connectionPool.http"]);
    }

    #[test]
    fn locality_settings_are_honoured_and_failover_needs_outlier_detection() {
        let dr = rule(
            "metadata: {name: web, namespace: prod}
spec:
  host: web
  trafficPolicy:
    loadBalancer:
      localityLbSetting:
        enabled: true
        distribute: [{from: r1/*, to: {r1/*: 100}}]
        failover: [{from: r1, to: r2}]
        failoverPriority: [topology.kubernetes.io/region]
",
        );
        let got: Vec<String> = fields(&dr).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            got,
            [
                "spec.trafficPolicy.loadBalancer.localityLbSetting.failover",
                "spec.trafficPolicy.loadBalancer.localityLbSetting.failoverPriority",
            ]
        );
        assert!(fields(&dr)[0].1.contains("needs outlierDetection"));
    }
}
