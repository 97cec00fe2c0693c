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
//! drawn ([`least_request`]). All of these, outlier detection and the
//! connection pool, per subset too: the policy of each destination is merged
//! in Istio's order ([`effective`]), and a route whose destinations differ in
//! policy gets one table per destination (see `compile`).

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

/// The policy that applies to one destination (a subset, or the whole host)
/// on one service port, merged in Istio's order of precedence:
///
/// - a `portLevelSettings` entry for the port replaces the policy it is
///   written in, field for field, absent fields included (Istio: "port
///   level settings do not inherit"; what the entry leaves out is the
///   default, not the rule's);
/// - a subset's policy (after its own port entry) overrides the rule's (after
///   its port entry) for each field it sets, and for all of them when it
///   has an entry for the port.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Effective<'a> {
    pub load_balancer: Option<&'a Value>,
    pub connection_pool: Option<&'a Value>,
    pub outlier_detection: Option<&'a Value>,
    /// Where `load_balancer` is written (for the diagnostics that name it).
    pub load_balancer_at: Option<String>,
}

impl<'a> Effective<'a> {
    /// `policy` (written at `at`) for `port`: its entry for the port if it
    /// has one (and whether it had).
    fn of(policy: &'a Value, at: &str, port: u16) -> (Self, bool) {
        let entry = policy
            .get("portLevelSettings")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
            .find(|(_, p)| {
                p.pointer("/port/number").and_then(Value::as_u64) == Some(u64::from(port))
            });
        let (source, at, by_port) = match entry {
            Some((j, p)) => (p, format!("{at}.portLevelSettings[{j}]"), true),
            None => (policy, at.to_owned(), false),
        };
        let load_balancer = source.get("loadBalancer");
        let effective = Effective {
            load_balancer,
            connection_pool: source.get("connectionPool"),
            outlier_detection: source.get("outlierDetection"),
            load_balancer_at: load_balancer.map(|_| format!("{at}.loadBalancer")),
        };
        (effective, by_port)
    }

    /// `self` overridden by `subset`'s fields (all of them when `whole`).
    fn overridden(self, subset: Self, whole: bool) -> Self {
        let pick = |mine, theirs: Option<&'a Value>| {
            if whole || theirs.is_some() {
                theirs
            } else {
                mine
            }
        };
        let load_balancer_at = if whole || subset.load_balancer.is_some() {
            subset.load_balancer_at.clone()
        } else {
            self.load_balancer_at.clone()
        };
        Effective {
            load_balancer: pick(self.load_balancer, subset.load_balancer),
            connection_pool: pick(self.connection_pool, subset.connection_pool),
            outlier_detection: pick(self.outlier_detection, subset.outlier_detection),
            load_balancer_at,
        }
    }
}

/// The policy of `dr` for destination subset `subset` (`None`: the whole
/// host) on service port `port`.
pub fn effective<'a>(dr: &'a DestinationRule, subset: Option<&str>, port: u16) -> Effective<'a> {
    let rule = dr
        .spec
        .other
        .get("trafficPolicy")
        .map(|p| Effective::of(p, "spec.trafficPolicy", port).0)
        .unwrap_or_default();
    let own = subset.and_then(|name| {
        let (i, s) = dr
            .spec
            .subsets
            .iter()
            .enumerate()
            .find(|(_, s)| s.name == name)?;
        let policy = s.other.get("trafficPolicy")?;
        Some(Effective::of(
            policy,
            &format!("spec.subsets[{i}].trafficPolicy"),
            port,
        ))
    });
    match own {
        Some((own, by_port)) => rule.overridden(own, by_port),
        None => rule,
    }
}

/// Whether `policy` asks for `LEAST_REQUEST` (or its old name `LEAST_CONN`):
/// fewest open connections, of two drawn.
pub fn least_request(policy: &Effective<'_>) -> bool {
    policy
        .load_balancer
        .and_then(|lb| lb.get("simple"))
        .and_then(Value::as_str)
        .is_some_and(|s| matches!(s, "LEAST_REQUEST" | "LEAST_CONN"))
}

/// The consistent hash `policy` asks for.
pub fn client_hash(policy: &Effective<'_>) -> Option<ClientHash> {
    let hash = policy.load_balancer?.get("consistentHash")?;
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
/// out, or reset before the backend sent a byte) count as the errors Istio
/// names; a backend with `threshold` of them
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

/// The outlier detection `policy` asks for (`None`: none,
/// or one whose thresholds are all 0: off).
pub fn outlier(policy: &Effective<'_>) -> Option<Outlier> {
    let od = policy.outlier_detection?;
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
pub fn socket_options(policy: &Effective<'_>) -> Option<mesh_common::SocketPolicy> {
    let tcp = policy.connection_pool?.get("tcp")?;
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
    /// A duration Istio would not accept.
    Duration,
    /// Locality failover without outlier detection (Istio needs both).
    FailoverWithoutOutlier,
    /// A `failoverPriority` label of the client's pod: a node's tables serve
    /// all its pods.
    ClientLabel,
    /// `failover` beside `failoverPriority` (Istio allows one of them).
    FailoverBesidePriority,
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
            Unhonoured::FailoverWithoutOutlier => format!(
                "{what} needs outlierDetection on the same rule or port (as in Istio): not honoured"
            ),
            Unhonoured::ClientLabel => format!(
                "{what}: a label of the client's pod, which a node's tables (shared by its pods) cannot match; the list is honoured up to the item before it (write key=value to compare endpoints with a value)"
            ),
            Unhonoured::FailoverBesidePriority => format!(
                "{what}: failoverPriority is set too (Istio allows one of them): failoverPriority is honoured"
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
        walk_policy(policy, "spec.trafficPolicy", false, &mut found);
    }
    for (i, subset) in dr.object.spec.subsets.iter().enumerate() {
        if let Some(policy) = subset.other.get("trafficPolicy") {
            walk_policy(
                policy,
                &format!("spec.subsets[{i}].trafficPolicy"),
                false,
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

/// One policy object at `at` (`in_port`: a `portLevelSettings` entry, which
/// has no ports of its own).
fn walk_policy(policy: &Value, at: &str, in_port: bool, found: &mut Vec<(String, Unhonoured)>) {
    let Some(fields) = policy.as_object() else {
        return;
    };
    for (key, value) in fields {
        let field = format!("{at}.{key}");
        match key.as_str() {
            "loadBalancer" => {
                let outlier = fields.contains_key("outlierDetection");
                load_balancer(value, &field, outlier, found);
            }
            "portLevelSettings" if !in_port => {
                for (j, port) in value.as_array().into_iter().flatten().enumerate() {
                    let at = format!("{field}[{j}]");
                    let mut settings = port.clone();
                    if let Some(o) = settings.as_object_mut() {
                        o.remove("port");
                    }
                    walk_policy(&settings, &at, true, found);
                }
            }
            "outlierDetection" => outlier_fields(value, &field, found),
            "connectionPool" => connection_pool(value, &field, found),
            "proxyProtocol" | "tunnel" => {
                found.push((field, Unhonoured::NotYet));
            }
            "tls" => found.push((field, Unhonoured::Tls)),
            _ => found.push((field, Unhonoured::Unknown)),
        }
    }
}

fn load_balancer(lb: &Value, at: &str, outlier: bool, found: &mut Vec<(String, Unhonoured)>) {
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
            "simple" if matches!(value.as_str(), Some("LEAST_REQUEST" | "LEAST_CONN")) => {}
            "consistentHash" => consistent_hash(value, &field, found),
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
    let priority = lls.get("failoverPriority");
    for (key, value) in lls.as_object().into_iter().flatten() {
        let field = format!("{at}.{key}");
        match key.as_str() {
            "enabled" | "distribute" => {}
            "failover" | "failoverPriority" if !outlier => {
                found.push((field, Unhonoured::FailoverWithoutOutlier));
            }
            "failover" if priority.is_some() => {
                found.push((field, Unhonoured::FailoverBesidePriority));
            }
            "failover" => {}
            "failoverPriority" => {
                let items = value.as_array().into_iter().flatten().enumerate();
                let first_unknown = items
                    .filter(|(_, item)| {
                        item.as_str()
                            .and_then(super::locality::Priority::parse)
                            .is_none()
                    })
                    .map(|(i, _)| i)
                    .next();
                if let Some(i) = first_unknown {
                    found.push((format!("{field}[{i}]"), Unhonoured::ClientLabel));
                }
            }
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
            origin: "dr.yaml".into(),
            object: std::sync::Arc::new(serde_yaml_ng::from_str(yaml).expect("a DestinationRule")),
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
    fn a_source_ip_hash_is_honoured_on_the_rule_its_port_and_its_subsets() {
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
        let at = |port| client_hash(&effective(&dr.object, None, port)).map(|h| h.table_size);
        assert_eq!(at(80), Some(maglev::DEFAULT_SIZE));
        assert_eq!(at(8080), Some(65521));
        assert_eq!(at(9090), Some(maglev::DEFAULT_SIZE));
        assert_eq!(at(7070), None);
        // The subset's own hash on a port whose rule entry says RANDOM.
        let v1 = client_hash(&effective(&dr.object, Some("v1"), 7070));
        assert_eq!(v1.map(|h| h.table_size), Some(maglev::DEFAULT_SIZE));
        let got: Vec<String> = fields(&dr).into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            got,
            [
                "spec.trafficPolicy.portLevelSettings[1].loadBalancer.consistentHash.maglev.tableSize"
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
        let at = |port| outlier(&effective(&dr.object, None, port));
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
        // Istio: a port's entry does not inherit what it leaves out.
        assert_eq!(at(7070), None, "the port's entry has none");
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
            socket_options(&effective(&dr.object, None, 80)),
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
        assert!(fields(&dr)[1].1.contains("needs outlierDetection"));
    }

    #[test]
    fn failover_priority_is_honoured_up_to_a_label_of_the_clients_pod() {
        let dr = rule(
            "metadata: {name: web, namespace: prod}
spec:
  host: web
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3}
    loadBalancer:
      localityLbSetting:
        failover: [{from: r1, to: r2}]
        failoverPriority:
          - topology.istio.io/network
          - topology.kubernetes.io/region
          - version=v2
          - app
          - topology.kubernetes.io/zone
",
        );
        let got = fields(&dr);
        let at: Vec<&str> = got.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(
            at,
            [
                "spec.trafficPolicy.loadBalancer.localityLbSetting.failover",
                "spec.trafficPolicy.loadBalancer.localityLbSetting.failoverPriority[3]",
            ]
        );
        assert!(got[0].1.contains("failoverPriority is honoured"), "{got:?}");
        assert!(got[1].1.contains("label of the client's pod"), "{got:?}");
        let p = effective(&dr.object, None, 80);
        assert_eq!(
            super::super::locality::setting(p.load_balancer, true),
            Some(super::super::locality::Setting::Priority(vec![
                super::super::locality::Priority::Everywhere,
                super::super::locality::Priority::Region(None),
                super::super::locality::Priority::Label {
                    key: "version".to_owned(),
                    value: "v2".to_owned()
                },
            ]))
        );
    }

    /// Istio's `MergeSubsetTrafficPolicy`: ports replace whole policies,
    /// subsets override by field (by all fields when they have the port).
    #[test]
    fn subset_and_port_policies_merge_in_istios_order() {
        let dr = rule(
            "metadata: {name: web, namespace: prod}
spec:
  host: web
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
    outlierDetection: {consecutive5xxErrors: 3}
    connectionPool: {tcp: {maxConnections: 100}}
    portLevelSettings:
      - port: {number: 8080}
        connectionPool: {tcp: {maxConnections: 8}}
  subsets:
    - name: v1
      labels: {version: v1}
    - name: v2
      labels: {version: v2}
      trafficPolicy:
        loadBalancer: {consistentHash: {useSourceIp: true}}
        portLevelSettings:
          - port: {number: 9090}
            outlierDetection: {consecutive5xxErrors: 7}
",
        );
        let max = |p: &Effective<'_>| socket_options(p).map(|s| s.max_connections);
        let threshold = |p: &Effective<'_>| outlier(p).map(|o| o.threshold);
        // The rule's policy, and v1 (no policy of its own) follows it.
        for subset in [None, Some("v1"), Some("unknown")] {
            let p = effective(&dr.object, subset, 80);
            assert!(least_request(&p), "{subset:?}");
            assert_eq!((max(&p), threshold(&p)), (Some(100), Some(3)), "{subset:?}");
        }
        // The rule's port entry replaces all of the rule's policy there.
        let p = effective(&dr.object, None, 8080);
        assert!(!least_request(&p));
        assert_eq!((max(&p), threshold(&p)), (Some(8), None));
        // v2 overrides the load balancer only; the rest is the rule's.
        let p = effective(&dr.object, Some("v2"), 80);
        assert!(!least_request(&p) && client_hash(&p).is_some());
        assert_eq!((max(&p), threshold(&p)), (Some(100), Some(3)));
        assert_eq!(
            p.load_balancer_at.as_deref(),
            Some("spec.subsets[1].trafficPolicy.loadBalancer")
        );
        // v2 on the rule's port 8080: the rule's entry, then v2's balancer.
        let p = effective(&dr.object, Some("v2"), 8080);
        assert!(client_hash(&p).is_some());
        assert_eq!((max(&p), threshold(&p)), (Some(8), None));
        // v2's own port entry replaces every field, even those it leaves out.
        let p = effective(&dr.object, Some("v2"), 9090);
        assert!(!least_request(&p) && client_hash(&p).is_none());
        assert_eq!((max(&p), threshold(&p)), (None, Some(7)));
        assert_eq!(fields(&dr), []);
    }
}
