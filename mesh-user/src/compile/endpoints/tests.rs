//! kube-proxy's endpoint rules ([`select`]), one by one, on endpoints built
//! here: conditions, nodes and hints.

use super::*;

/// An endpoint at `10.244.0.<n>:8080`, ready, on no node, without hints.
fn ep(n: u8) -> Candidate {
    Candidate {
        endpoint: Endpoint {
            ip: IpAddr::from([10, 244, 0, n]),
            port: 8080,
            pod: None,
            labels: Default::default(),
            node: None,
            zone: None,
        },
        conditions: Conditions::READY,
        node: None,
        zone_hints: Vec::new(),
        node_hints: Vec::new(),
    }
}

impl Candidate {
    fn on(mut self, node: &str) -> Self {
        self.node = Some(node.into());
        self
    }

    fn not_ready(mut self) -> Self {
        self.conditions = Conditions {
            ready: false,
            serving: false,
            terminating: false,
        };
        self
    }

    /// Deleted, still serving (`serving`) or not.
    fn terminating(mut self, serving: bool) -> Self {
        self.conditions = Conditions {
            ready: false,
            serving,
            terminating: true,
        };
        self
    }

    fn for_zone(mut self, zone: &str) -> Self {
        self.zone_hints.push(zone.to_owned());
        self
    }

    fn for_node(mut self, node: &str) -> Self {
        self.node_hints.push(node.to_owned());
        self
    }
}

const CLUSTER: InternalTrafficPolicy = InternalTrafficPolicy::Cluster;
const LOCAL: InternalTrafficPolicy = InternalTrafficPolicy::Local;

fn here<'a>(node: Option<&'a str>, zone: Option<&'a str>) -> Here<'a> {
    Here { node, zone }
}

/// The last octets of the selected endpoints, and what was not honoured.
fn chosen(
    candidates: &[Candidate],
    policy: InternalTrafficPolicy,
    here: Here<'_>,
) -> (Vec<u8>, Vec<Unhonoured>) {
    let s = select(candidates, policy, here);
    let octets = s
        .endpoints
        .iter()
        .map(|e| match e.ip {
            IpAddr::V4(v4) => v4.octets()[3],
            IpAddr::V6(_) => 0,
        })
        .collect();
    (octets, s.unhonoured)
}

#[test]
fn ready_endpoints_are_used_and_not_ready_ones_left_out() {
    let eps = [ep(1), ep(2).not_ready(), ep(3), ep(4).terminating(true)];
    assert_eq!(
        chosen(&eps, CLUSTER, here(None, None)),
        (vec![1, 3], vec![])
    );
}

#[test]
fn with_nothing_ready_serving_terminating_endpoints_take_the_traffic() {
    let eps = [
        ep(1).not_ready(),
        ep(2).terminating(true),
        ep(3).terminating(false),
        ep(4).terminating(true),
    ];
    assert_eq!(chosen(&eps, CLUSTER, here(None, None)).0, [2, 4]);
    // Nothing serving at all: nothing.
    let eps = [ep(1).not_ready(), ep(3).terminating(false)];
    assert!(chosen(&eps, CLUSTER, here(None, None)).0.is_empty());
}

#[test]
fn local_keeps_this_nodes_endpoints_on_either_node() {
    let eps = [
        ep(1).on("node-a"),
        ep(2).on("node-b"),
        ep(3).on("node-a"),
        ep(4),
    ];
    let node_a = chosen(&eps, LOCAL, here(Some("node-a"), None));
    assert_eq!(node_a, (vec![1, 3], vec![]));
    let node_b = chosen(&eps, LOCAL, here(Some("node-b"), None));
    assert_eq!(node_b, (vec![2], vec![]));
}

#[test]
fn local_with_none_on_this_node_leaves_nothing_not_the_other_nodes() {
    let eps = [ep(1).on("node-a"), ep(2).on("node-b")];
    assert_eq!(
        chosen(&eps, LOCAL, here(Some("node-c"), None)),
        (vec![], vec![])
    );
    // Not ready here, ready elsewhere: still nothing (kube-proxy drops).
    let eps = [ep(1).on("node-a"), ep(2).on("node-c").not_ready()];
    assert!(chosen(&eps, LOCAL, here(Some("node-c"), None)).0.is_empty());
}

#[test]
fn local_falls_back_to_this_nodes_terminating_endpoints_only() {
    let eps = [
        ep(1).on("node-a"),
        ep(2).on("node-c").terminating(true),
        ep(3).on("node-c").terminating(false),
    ];
    assert_eq!(chosen(&eps, LOCAL, here(Some("node-c"), None)).0, [2]);
}

#[test]
fn local_without_a_node_name_is_reported_and_served_as_cluster() {
    let eps = [ep(1).on("node-a"), ep(2).on("node-b")];
    assert_eq!(
        chosen(&eps, LOCAL, here(None, None)),
        (vec![1, 2], vec![Unhonoured::LocalWithoutNode])
    );
}

#[test]
fn local_ignores_topology_hints() {
    let eps = [
        ep(1).on("node-a").for_zone("z2"),
        ep(2).on("node-b").for_zone("z1"),
    ];
    assert_eq!(chosen(&eps, LOCAL, here(Some("node-a"), Some("z1"))).0, [1]);
}

#[test]
fn zone_hints_keep_this_zones_endpoints() {
    let eps = [
        ep(1).for_zone("z1"),
        ep(2).for_zone("z2"),
        ep(3).for_zone("z1"),
    ];
    assert_eq!(
        chosen(&eps, CLUSTER, here(Some("node-a"), Some("z1"))),
        (vec![1, 3], vec![])
    );
}

#[test]
fn a_zone_without_endpoints_gets_every_endpoint() {
    let eps = [ep(1).for_zone("z1"), ep(2).for_zone("z2")];
    assert_eq!(
        chosen(&eps, CLUSTER, here(Some("node-a"), Some("z3"))),
        (vec![1, 2], vec![])
    );
}

#[test]
fn partial_hints_are_ignored_but_not_ready_endpoints_need_none() {
    // One ready endpoint without a hint: every endpoint, as kube-proxy.
    let eps = [ep(1).for_zone("z1"), ep(2), ep(3).for_zone("z2")];
    assert_eq!(
        chosen(&eps, CLUSTER, here(Some("node-a"), Some("z1"))).0,
        [1, 2, 3]
    );
    // Only ready endpoints count: a not-ready one without a hint is no gap.
    let eps = [
        ep(1).for_zone("z1"),
        ep(2).not_ready(),
        ep(3).for_zone("z2"),
    ];
    assert_eq!(
        chosen(&eps, CLUSTER, here(Some("node-a"), Some("z1"))).0,
        [1]
    );
}

#[test]
fn hints_for_this_zone_whose_endpoints_all_terminate_fall_back_to_every_draining_one() {
    let eps = [
        ep(1).for_zone("z1").terminating(true),
        ep(2).for_zone("z2").terminating(true),
    ];
    assert_eq!(
        chosen(&eps, CLUSTER, here(Some("node-a"), Some("z1"))).0,
        [1, 2]
    );
}

#[test]
fn an_unknown_zone_or_node_is_reported_and_every_endpoint_used() {
    let eps = [ep(1).for_zone("z1"), ep(2).for_zone("z2")];
    assert_eq!(
        chosen(&eps, CLUSTER, here(Some("node-a"), None)),
        (
            vec![1, 2],
            vec![Unhonoured::ZoneUnknown {
                node: "node-a".to_owned()
            }]
        )
    );
    assert_eq!(
        chosen(&eps, CLUSTER, here(None, None)),
        (vec![1, 2], vec![Unhonoured::HintsWithoutNode])
    );
    // Without hints nothing is missing: no report.
    assert_eq!(
        chosen(&[ep(1), ep(2)], CLUSTER, here(None, None)),
        (vec![1, 2], vec![])
    );
}

#[test]
fn node_hints_win_over_zone_hints_when_one_names_this_node() {
    let eps = [
        ep(1).for_node("node-a").for_zone("z1"),
        ep(2).for_node("node-b").for_zone("z1"),
        ep(3).for_node("node-c").for_zone("z2"),
    ];
    assert_eq!(
        chosen(&eps, CLUSTER, here(Some("node-a"), Some("z1"))).0,
        [1]
    );
    // None for node-d: its zone's.
    assert_eq!(
        chosen(&eps, CLUSTER, here(Some("node-d"), Some("z1"))).0,
        [1, 2]
    );
}

#[test]
fn unhonoured_rules_name_the_field_that_asked_for_them() {
    let service = |spec: serde_json::Value| -> Service {
        let api: k8s_openapi::api::core::v1::Service =
            serde_json::from_value(serde_json::json!({"spec": spec})).unwrap_or_default();
        Service::from(api)
    };
    let td = service(serde_json::json!({"trafficDistribution": "PreferClose"}));
    let plain = service(serde_json::json!({}));
    assert_eq!(
        Unhonoured::LocalWithoutNode.field(&td),
        "spec.internalTrafficPolicy"
    );
    assert_eq!(
        Unhonoured::HintsWithoutNode.field(&td),
        "spec.trafficDistribution"
    );
    assert_eq!(
        Unhonoured::HintsWithoutNode.field(&plain),
        "metadata.annotations[service.kubernetes.io/topology-mode]"
    );
}
