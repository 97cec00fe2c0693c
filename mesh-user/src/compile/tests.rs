//! compile, end to end from YAML: Istio semantics at L4, and errors.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use super::{BackendAddr, Compiled, Config, Proto, ServiceAddr, compile};
use crate::{
    index::Index,
    model::{Diagnostic, Severity},
    source::file::parse,
};

const BASE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec:
  clusterIP: 10.96.1.1
  selector: {app: web}
  ports:
    - {name: http, port: 80, targetPort: 8080}
    - {name: http-admin, port: 9000, targetPort: 9000}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: prod}
spec:
  clusterIP: 10.96.1.2
  selector: {app: db}
  ports:
    - {name: tcp-db, port: 5432}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: prod}
spec:
  host: web
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
"#;

fn pod(name: &str, app: &str, version: &str, ip: &str, ready: bool) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: prod, labels: {{app: {app}, version: {version}}}}}\nstatus:\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"{}\"}}]\n",
        if ready { "True" } else { "False" }
    )
}

fn pods() -> String {
    [
        pod("web-v1-a", "web", "v1", "10.244.1.1", true),
        pod("web-v1-b", "web", "v1", "10.244.1.2", true),
        pod("web-v2-a", "web", "v2", "10.244.1.3", true),
        pod("db-0", "db", "v1", "10.244.1.9", true),
    ]
    .join("---\n")
}

fn index_of(docs: &[&str]) -> (Index, Vec<Diagnostic>) {
    let mut index = Index::default();
    let mut diags = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let (objects, d) = parse(Path::new(&format!("f{i}.yaml")), doc);
        diags.extend(d);
        for o in objects {
            index.apply(&format!("f{i}.yaml"), o);
        }
    }
    diags.extend(index.revalidate("cluster.local"));
    (index, diags)
}

fn build(docs: &[&str]) -> Compiled {
    let (index, diags) = index_of(docs);
    let mut compiled = compile(&index, &Config::default());
    compiled.diagnostics.extend(diags);
    compiled
}

/// Share of each backend IP in the table of `vip:port`.
fn shares(c: &Compiled, vip: &str, port: u16) -> BTreeMap<String, f64> {
    let addr = ServiceAddr {
        destination: None,
        vip: vip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        port,
        proto: Proto::Tcp,
    };
    let plan = c
        .services
        .get(&addr)
        .unwrap_or_else(|| panic!("no table for {addr}: {:?}", c.services.keys()));
    let mut out = BTreeMap::new();
    for slot in plan.slots.iter() {
        let key = slot.map_or("none".to_owned(), |b: BackendAddr| b.ip.to_string());
        *out.entry(key).or_default() += 1.0 / plan.slots.len() as f64;
    }
    out
}

fn approx(map: &BTreeMap<String, f64>, key: &str) -> f64 {
    (map.get(key).copied().unwrap_or(0.0) * 1000.0).round() / 1000.0
}

fn errors(c: &Compiled) -> Vec<String> {
    c.diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .map(ToString::to_string)
        .collect()
}

fn warnings(c: &Compiled) -> Vec<String> {
    c.diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Warning)
        .map(ToString::to_string)
        .collect()
}

fn vs(body: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {{name: web, namespace: prod}}\nspec:\n{body}"
    )
}

const SPLIT_80_20: &str = "  hosts: [web]\n  http:\n    - route:\n        - {destination: {host: web, subset: v1}, weight: 80}\n        - {destination: {host: web, subset: v2}, weight: 20}\n";

#[test]
fn no_virtualservice_balances_evenly_over_ready_endpoints_at_the_target_port() {
    let c = build(&[BASE, &pods()]);
    let s = shares(&c, "10.96.1.1", 80);
    assert_eq!(s.len(), 3);
    assert_eq!(approx(&s, "10.244.1.1"), 0.333);
    let plan = &c.services[&ServiceAddr {
        destination: None,
        vip: "10.96.1.1".parse().unwrap_or(IpAddr::from([0; 4])),
        port: 80,
        proto: Proto::Tcp,
    }];
    assert!(plan.slots.iter().flatten().all(|b| b.port == 8080));
}

#[test]
fn weights_split_subsets_and_endpoints_share_their_subset_evenly() {
    let c = build(&[BASE, &pods(), &vs(SPLIT_80_20)]);
    assert!(errors(&c).is_empty(), "{:?}", errors(&c));
    let s = shares(&c, "10.96.1.1", 80);
    assert_eq!(
        (
            approx(&s, "10.244.1.1"),
            approx(&s, "10.244.1.2"),
            approx(&s, "10.244.1.3")
        ),
        (0.4, 0.4, 0.2)
    );
}

#[test]
fn weights_that_do_not_sum_to_100_are_proportions() {
    let body = "  hosts: [web]\n  http:\n    - route:\n        - {destination: {host: web, subset: v1}, weight: 1}\n        - {destination: {host: web, subset: v2}, weight: 3}\n";
    let s = shares(&build(&[BASE, &pods(), &vs(body)]), "10.96.1.1", 80);
    assert_eq!(approx(&s, "10.244.1.3"), 0.75);
}

#[test]
fn a_single_destination_takes_everything_whatever_its_weight() {
    let body = "  hosts: [web]\n  http:\n    - route:\n        - {destination: {host: web, subset: v2}, weight: 10}\n";
    let s = shares(&build(&[BASE, &pods(), &vs(body)]), "10.96.1.1", 80);
    assert_eq!(approx(&s, "10.244.1.3"), 1.0);
}

#[test]
fn short_hosts_resolve_in_the_virtualservice_namespace() {
    // The same VirtualService in namespace `other` names other's `web`, which does
    // not exist: it is rejected and prod/web stays evenly balanced.
    let c = build(&[
        BASE,
        &pods(),
        &vs(SPLIT_80_20).replace("namespace: prod", "namespace: other"),
    ]);
    assert!(
        errors(&c)
            .iter()
            .any(|e| e.contains("web.other.svc.cluster.local")),
        "{:?}",
        errors(&c)
    );
    assert_eq!(shares(&c, "10.96.1.1", 80).len(), 3);
    // With fully qualified names it governs prod/web from anywhere.
    let fqdn = SPLIT_80_20
        .replace("host: web", "host: web.prod.svc.cluster.local")
        .replace("[web]", "[web.prod.svc.cluster.local]");
    let c = build(&[
        BASE,
        &pods(),
        &vs(&fqdn).replace("namespace: prod", "namespace: other"),
    ]);
    assert!(errors(&c).is_empty(), "{:?}", errors(&c));
    assert_eq!(approx(&shares(&c, "10.96.1.1", 80), "10.244.1.3"), 0.2);
}

#[test]
fn a_virtualservice_bound_only_to_a_gateway_leaves_mesh_traffic_alone() {
    let gw = SPLIT_80_20.replace(
        "  hosts: [web]\n",
        "  hosts: [web]\n  gateways: [ingress]\n",
    );
    assert_eq!(
        shares(&build(&[BASE, &pods(), &vs(&gw)]), "10.96.1.1", 80).len(),
        3
    );
    let both = SPLIT_80_20.replace(
        "  hosts: [web]\n",
        "  hosts: [web]\n  gateways: [ingress, mesh]\n",
    );
    assert_eq!(
        approx(
            &shares(&build(&[BASE, &pods(), &vs(&both)]), "10.96.1.1", 80),
            "10.244.1.3"
        ),
        0.2
    );
}

#[test]
fn routes_are_tried_in_order_and_port_matches_are_honoured() {
    let body = "  hosts: [web]\n  http:\n    - match: [{port: 9000}]\n      route: [{destination: {host: web, subset: v2}}]\n    - route: [{destination: {host: web, subset: v1}}]\n    - route: [{destination: {host: web, subset: v2}}]\n";
    let c = build(&[BASE, &pods(), &vs(body)]);
    let admin = shares(&c, "10.96.1.1", 9000);
    assert_eq!(
        approx(&admin, "10.244.1.3"),
        1.0,
        "port 9000 takes the first route"
    );
    let main = shares(&c, "10.96.1.1", 80);
    assert_eq!(
        (approx(&main, "10.244.1.1"), approx(&main, "10.244.1.3")),
        (0.5, 0.0),
        "port 80 takes the second"
    );
}

#[test]
fn l7_matches_are_reported_and_skipped_never_applied_as_something_else() {
    let body = "  hosts: [web]\n  http:\n    - match: [{uri: {prefix: /v2}}]\n      route: [{destination: {host: web, subset: v2}}]\n    - route: [{destination: {host: web, subset: v1}}]\n";
    let c = build(&[BASE, &pods(), &vs(body)]);
    assert!(
        warnings(&c)
            .iter()
            .any(|w| w.contains("spec.http[0]") && w.contains("uri") && w.contains("skipped")),
        "{:?}",
        warnings(&c)
    );
    assert_eq!(approx(&shares(&c, "10.96.1.1", 80), "10.244.1.3"), 0.0);
}

#[test]
fn tcp_routes_serve_tcp_ports() {
    let body = "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: db, namespace: prod}\nspec:\n  hosts: [db]\n  tcp:\n    - match: [{port: 5432}]\n      route: [{destination: {host: web, port: {number: 80}}}]\n";
    let c = build(&[BASE, &pods(), body]);
    assert!(errors(&c).is_empty(), "{:?}", errors(&c));
    // db's VIP now sends to web's endpoints on web's target port.
    let s = shares(&c, "10.96.1.2", 5432);
    assert_eq!(s.len(), 3, "{s:?}");
}

#[test]
fn bad_virtualservices_are_rejected_with_the_field_named() {
    let cases = [
        (
            "  hosts: [web]\n  http:\n    - route:\n        - {destination: {host: web, subset: v1}, weight: -5}\n        - {destination: {host: web, subset: v2}, weight: 20}\n",
            "spec.http[0].route[0].weight",
        ),
        (
            "  hosts: [web]\n  http:\n    - route:\n        - {destination: {host: web, subset: v9}, weight: 50}\n        - {destination: {host: web, subset: v2}, weight: 50}\n",
            "spec.http[0].route[0].destination.subset",
        ),
        (
            "  hosts: [web]\n  http:\n    - route:\n        - {destination: {host: nowhere}}\n",
            "spec.http[0].route[0].destination.host",
        ),
        (
            "  http:\n    - route:\n        - {destination: {host: web}}\n",
            "spec.hosts",
        ),
        (
            "  hosts: [web]\n  http:\n    - route:\n        - {destination: {host: web, subset: v1}, weight: 0}\n        - {destination: {host: web, subset: v2}, weight: 0}\n",
            "spec.http[0].route",
        ),
    ];
    for (body, field) in cases {
        let c = build(&[BASE, &pods(), &vs(body)]);
        let errs = errors(&c);
        assert!(
            errs.iter()
                .any(|e| e.contains("VirtualService prod/web") && e.contains(field)),
            "{field}: {errs:?}"
        );
        // Never applied: prod/web stays evenly balanced.
        assert_eq!(shares(&c, "10.96.1.1", 80).len(), 3, "{field}");
    }
}

#[test]
fn a_rejected_update_keeps_the_last_accepted_version() {
    let (mut index, _) = index_of(&[BASE, &pods(), &vs(SPLIT_80_20)]);
    let (bad, _) = parse(
        Path::new("vs.yaml"),
        &vs(&SPLIT_80_20.replace("weight: 20", "weight: -20")),
    );
    for o in bad {
        index.apply("vs.yaml", o);
    }
    let rejections = index.revalidate("cluster.local");
    assert!(
        rejections
            .iter()
            .any(|d| d.message.contains("last accepted version stays")),
        "{rejections:?}"
    );
    let c = compile(&index, &Config::default());
    assert_eq!(approx(&shares(&c, "10.96.1.1", 80), "10.244.1.3"), 0.2);
}

#[test]
fn a_virtualservice_waiting_for_its_destinationrule_is_accepted_once_it_arrives() {
    let base_without_dr = BASE
        .split("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule")
        .next()
        .unwrap_or(BASE);
    let (mut index, diags) = index_of(&[base_without_dr, &pods(), &vs(SPLIT_80_20)]);
    assert!(
        diags
            .iter()
            .any(|d| d.message.contains("no DestinationRule")),
        "{diags:?}"
    );
    let dr = BASE.split("---\n").nth(2).unwrap_or("");
    for o in parse(Path::new("dr.yaml"), dr).0 {
        index.apply("dr.yaml", o);
    }
    assert!(index.revalidate("cluster.local").is_empty());
    let c = compile(&index, &Config::default());
    assert_eq!(approx(&shares(&c, "10.96.1.1", 80), "10.244.1.3"), 0.2);
}

#[test]
fn endpointslices_win_over_pods_and_not_ready_endpoints_are_left_out() {
    let slice = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-abc, namespace: prod, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
  - addresses: [10.244.1.1]
    conditions: {ready: true}
    targetRef: {kind: Pod, name: web-v1-a, namespace: prod}
  - addresses: [10.244.1.3]
    conditions: {ready: false}
    targetRef: {kind: Pod, name: web-v2-a, namespace: prod}
  - addresses: [10.244.1.7]
    targetRef: {kind: Pod, name: web-v2-b, namespace: prod}
"#;
    let extra_pod = pod("web-v2-b", "web", "v2", "10.244.1.7", true);
    let c = build(&[BASE, &pods(), &extra_pod, slice, &vs(SPLIT_80_20)]);
    let s = shares(&c, "10.96.1.1", 80);
    // 10.244.1.2 has a ready pod but is not in the slice; .3 is not ready; .7 has
    // no condition, which means ready. Subsets still come from pod labels.
    assert_eq!(
        (approx(&s, "10.244.1.1"), approx(&s, "10.244.1.7")),
        (0.8, 0.2),
        "{s:?}"
    );
}

#[test]
fn a_not_ready_pod_is_not_an_endpoint() {
    let not_ready = [
        pod("web-v1-a", "web", "v1", "10.244.1.1", true),
        pod("web-v1-b", "web", "v1", "10.244.1.2", false),
    ]
    .join("---\n");
    let s = shares(&build(&[BASE, &not_ready]), "10.96.1.1", 80);
    assert_eq!(s.keys().collect::<Vec<_>>(), vec!["10.244.1.1"]);
}

#[test]
fn match_alternatives_are_ored_so_a_decidable_one_carries_the_route() {
    // [{uri}, {port: 80}]: on port 80 the route takes every connection (Istio ORs
    // alternatives); on port 9000 only uri requests would, which a connect cannot
    // tell: skipped there, with a warning.
    let body = "  hosts: [web]\n  http:\n    - match: [{uri: {prefix: /v2}}, {port: 80}]\n      route: [{destination: {host: web, subset: v2}}]\n    - route: [{destination: {host: web, subset: v1}}]\n";
    let c = build(&[BASE, &pods(), &vs(body)]);
    assert_eq!(approx(&shares(&c, "10.96.1.1", 80), "10.244.1.3"), 1.0);
    assert_eq!(approx(&shares(&c, "10.96.1.1", 9000), "10.244.1.3"), 0.0);
    assert!(
        warnings(&c)
            .iter()
            .any(|w| w.contains("spec.http[0]") && w.contains("skipped")),
        "{:?}",
        warnings(&c)
    );
}

#[test]
fn a_mesh_wide_wildcard_host_is_rejected() {
    let c = build(&[BASE, &pods(), &vs(&SPLIT_80_20.replace("[web]", "[\"*\"]"))]);
    assert!(
        errors(&c).iter().any(|e| e.contains("spec.hosts[0]")),
        "{:?}",
        errors(&c)
    );
    assert_eq!(shares(&c, "10.96.1.1", 80).len(), 3);
}

#[test]
fn udp_ports_balance_evenly_as_sidecars_do_not_route_udp() {
    let udp = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: prod}\nspec:\n  clusterIP: 10.96.1.1\n  selector: {app: web}\n  ports:\n    - {name: dns, port: 53, protocol: UDP}\n";
    let c = build(&[
        udp,
        &pods(),
        &vs(SPLIT_80_20),
        BASE.split("---\n").nth(2).unwrap_or(""),
    ]);
    let addr = ServiceAddr {
        destination: None,
        vip: "10.96.1.1".parse().unwrap_or(IpAddr::from([0; 4])),
        port: 53,
        proto: Proto::Udp,
    };
    assert_eq!(c.services[&addr].slots.len(), 3);
}

#[test]
fn exclude_inbound_ports_keeps_those_endpoints_off_the_redirect() {
    let annotated = r#"
apiVersion: v1
kind: Pod
metadata:
  name: haproxy-0
  namespace: prod
  labels: {app: lb}
  annotations: {traffic.sidecar.istio.io/excludeInboundPorts: "8080, 8443,http,0"}
status:
  podIP: 10.244.1.7
  podIPs: [{ip: 10.244.1.7}, {ip: "fd00::7"}]
  conditions: [{type: Ready, status: "True"}]
"#;
    let c = build(&[BASE, &pods(), annotated]);
    let excluded: Vec<String> = c
        .redirect_excluded
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        excluded,
        [
            "0.0.0.0:8080",
            "0.0.0.0:8443",
            "10.244.1.7:8080",
            "10.244.1.7:8443",
            "[::]:8080",
            "[::]:8443",
            "[fd00::7]:8080",
            "[fd00::7]:8443"
        ]
    );
    let w = warnings(&c);
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w.iter().all(|w| w.contains("Pod prod/haproxy-0")
            && w.contains("metadata.annotations[traffic.sidecar.istio.io/excludeInboundPorts]")),
        "{w:?}"
    );
    assert!(
        w.iter()
            .any(|w| w.contains("\"http\" is not a port number")),
        "{w:?}"
    );
}

#[test]
fn a_service_whose_only_virtualservice_was_never_accepted_is_undecided() {
    let bad = vs(
        "  hosts: [web]\n  http:\n    - route:\n        - {destination: {host: web, subset: v1}, weight: -1}\n",
    );
    let c = build(&[BASE, &pods(), &bad]);
    let web = ServiceAddr {
        destination: None,
        vip: "10.96.1.1".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        port: 80,
        proto: Proto::Tcp,
    };
    assert!(c.undecided.contains(&web), "{:?}", c.undecided);
    assert_eq!(
        c.undecided.len(),
        2,
        "both ports of web, not db: {:?}",
        c.undecided
    );
    // With an accepted version, a later rejected one is not undecided: the
    // accepted one routes.
    let (mut index, _) = index_of(&[BASE, &pods(), &vs(SPLIT_80_20)]);
    for o in parse(Path::new("f9.yaml"), &bad).0 {
        index.apply("f9.yaml", o);
    }
    index.revalidate("cluster.local");
    assert!(compile(&index, &Config::default()).undecided.is_empty());
}

// kube-proxy parity: which endpoints a client on this node reaches.

/// A Service `app` at `ip`, port 80 to `target`, with more `spec` lines.
fn svc(app: &str, ip: &str, target: &str, spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {app}, namespace: prod}}\nspec:\n  clusterIP: {ip}\n  selector: {{app: {app}}}\n  ports: [{{name: http, port: 80, targetPort: {target}}}]\n{spec}"
    )
}

/// A pod of `app` on `node`; `deleting`: it has a deletionTimestamp.
fn pod_on(name: &str, app: &str, ip: &str, node: &str, ready: bool, deleting: bool) -> String {
    let deletion = if deleting {
        ", deletionTimestamp: \"2026-11-30T00:00:00Z\""
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: prod, labels: {{app: {app}}}{deletion}}}\nspec:\n  nodeName: {node}\n  containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]\nstatus:\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"{}\"}}]\n",
        if ready { "True" } else { "False" }
    )
}

fn node(name: &str, zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n"
    )
}

/// compile as the agent on `node` would.
fn build_on(node: Option<&str>, docs: &[&str]) -> Compiled {
    let (index, diags) = index_of(docs);
    let config = Config {
        node_name: node.map(str::to_owned),
        ..Config::default()
    };
    let mut compiled = compile(&index, &config);
    compiled.diagnostics.extend(diags);
    compiled
}

/// The backend IPs of `vip:80`, sorted, without repeats.
fn backends(c: &Compiled, vip: &str) -> Vec<String> {
    shares(c, vip, 80).into_keys().collect()
}

const VIP: &str = "10.96.2.1";

#[test]
fn publish_not_ready_addresses_makes_every_pod_an_endpoint() {
    let pods = [
        pod_on("api-0", "api", "10.244.2.1", "node-a", true, false),
        pod_on("api-1", "api", "10.244.2.2", "node-a", false, false),
    ]
    .join("---\n");
    let plain = svc("api", VIP, "8080", "");
    assert_eq!(backends(&build(&[&plain, &pods]), VIP), ["10.244.2.1"]);
    let publish = svc("api", VIP, "8080", "  publishNotReadyAddresses: true\n");
    assert_eq!(
        backends(&build(&[&publish, &pods]), VIP),
        ["10.244.2.1", "10.244.2.2"]
    );
}

#[test]
fn endpoint_slices_are_read_by_ready_as_the_controller_marks_published_ones() {
    // The controller marks a published not-ready pod ready (serving false):
    // `ready` decides, as in kube-proxy.
    let slice = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: prod, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.244.2.1], conditions: {ready: true, serving: false, terminating: false}}
  - {addresses: [10.244.2.2], conditions: {ready: false, serving: false, terminating: false}}
"#;
    let publish = svc("api", VIP, "8080", "  publishNotReadyAddresses: true\n");
    assert_eq!(backends(&build(&[&publish, slice]), VIP), ["10.244.2.1"]);
}

#[test]
fn terminating_pods_take_traffic_only_while_no_pod_is_ready() {
    let service = svc("api", VIP, "8080", "");
    let ready = pod_on("api-0", "api", "10.244.2.1", "node-a", true, false);
    let draining = pod_on("api-1", "api", "10.244.2.2", "node-a", true, true);
    let gone = pod_on("api-2", "api", "10.244.2.3", "node-a", false, true);
    assert_eq!(
        backends(&build(&[&service, &ready, &draining, &gone]), VIP),
        ["10.244.2.1"]
    );
    assert_eq!(
        backends(&build(&[&service, &draining, &gone]), VIP),
        ["10.244.2.2"]
    );
}

#[test]
fn terminating_slice_endpoints_take_traffic_only_while_none_is_ready() {
    let slice = |first_ready: bool| {
        format!(
            r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: api-1, namespace: prod, labels: {{kubernetes.io/service-name: api}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
  - {{addresses: [10.244.2.1], conditions: {{ready: {first_ready}}}}}
  - {{addresses: [10.244.2.2], conditions: {{ready: false, serving: true, terminating: true}}}}
  - {{addresses: [10.244.2.3], conditions: {{ready: false, serving: false, terminating: true}}}}
"#
        )
    };
    let service = svc("api", VIP, "8080", "");
    assert_eq!(
        backends(&build(&[&service, &slice(true)]), VIP),
        ["10.244.2.1"]
    );
    assert_eq!(
        backends(&build(&[&service, &slice(false)]), VIP),
        ["10.244.2.2"]
    );
}

fn local_pods() -> String {
    [
        pod_on("api-a", "api", "10.244.2.1", "node-a", true, false),
        pod_on("api-b", "api", "10.244.2.2", "node-b", true, false),
        pod_on("api-a2", "api", "10.244.2.3", "node-a", true, false),
    ]
    .join("---\n")
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
    let local = svc("api", VIP, "8080", "  internalTrafficPolicy: Local\n");
    let pods = local_pods();
    assert_eq!(
        backends(&build_on(Some("node-a"), &[&local, &pods]), VIP),
        ["10.244.2.1", "10.244.2.3"]
    );
    assert_eq!(
        backends(&build_on(Some("node-b"), &[&local, &pods]), VIP),
        ["10.244.2.2"]
    );
    // Cluster (the default) on the same node: all of them.
    let cluster = svc("api", VIP, "8080", "");
    assert_eq!(
        backends(&build_on(Some("node-b"), &[&cluster, &pods]), VIP).len(),
        3
    );
}

#[test]
fn local_with_no_endpoint_on_this_node_compiles_to_a_table_that_refuses() {
    let local = svc("api", VIP, "8080", "  internalTrafficPolicy: Local\n");
    let c = build_on(Some("node-c"), &[&local, &local_pods()]);
    let addr = ServiceAddr {
        destination: None,
        vip: VIP.parse().unwrap_or(IpAddr::from([0; 4])),
        port: 80,
        proto: Proto::Tcp,
    };
    // An entry (a miss would let the connect through to the bare VIP) whose
    // every slot is "no backend": the kernel fails the connect at once.
    let plan = c.services.get(&addr).expect("a table for the VIP");
    assert!(!plan.slots.is_empty() && plan.slots.iter().all(Option::is_none));
    assert!(plan.destinations.iter().all(|d| d.backends.is_empty()));
    assert!(warnings(&c).is_empty(), "{:?}", warnings(&c));
}

#[test]
fn local_without_a_node_name_warns_on_the_field_and_serves_as_cluster() {
    let local = svc("api", VIP, "8080", "  internalTrafficPolicy: Local\n");
    let c = build_on(None, &[&local, &local_pods()]);
    assert_eq!(backends(&c, VIP).len(), 3);
    let w = warnings(&c);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("Service prod/api") && w[0].contains("spec.internalTrafficPolicy"),
        "{w:?}"
    );
}

fn zoned_pods() -> String {
    [
        pod_on("api-a", "api", "10.244.2.1", "node-a", true, false),
        pod_on("api-b", "api", "10.244.2.2", "node-b", true, false),
    ]
    .join("---\n")
}

#[test]
fn prefer_close_from_pods_prefers_this_zone_by_the_nodes_labels() {
    let close = svc("api", VIP, "8080", "  trafficDistribution: PreferClose\n");
    let (pods, a, b) = (zoned_pods(), node("node-a", "z1"), node("node-b", "z2"));
    // This node (node-c) is in z1, as node-a.
    let z1 = node("node-c", "z1");
    let c = build_on(Some("node-c"), &[&close, &pods, &a, &b, &z1]);
    assert_eq!(backends(&c, VIP), ["10.244.2.1"]);
    assert!(warnings(&c).is_empty(), "{:?}", warnings(&c));
    // A zone without endpoints: all of them.
    let z3 = node("node-c", "z3");
    let c = build_on(Some("node-c"), &[&close, &pods, &a, &b, &z3]);
    assert_eq!(backends(&c, VIP).len(), 2);
    // Without trafficDistribution no zone is preferred.
    let plain = svc("api", VIP, "8080", "");
    let c = build_on(Some("node-c"), &[&plain, &pods, &a, &b, &z1]);
    assert_eq!(backends(&c, VIP).len(), 2);
}

#[test]
fn prefer_close_with_a_pods_zone_unknown_warns_and_uses_every_endpoint() {
    let close = svc("api", VIP, "8080", "  trafficDistribution: PreferClose\n");
    let (a, z1) = (node("node-a", "z1"), node("node-c", "z1"));
    let c = build_on(Some("node-c"), &[&close, &zoned_pods(), &a, &z1]);
    assert_eq!(backends(&c, VIP).len(), 2);
    let w = warnings(&c);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("spec.trafficDistribution") && w[0].contains("node node-b"),
        "{w:?}"
    );
}

const HINTED_SLICE: &str = r#"
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-1, namespace: prod, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
  - {addresses: [10.244.2.1], nodeName: node-a, zone: z1, hints: {forZones: [{name: z1}]}}
  - {addresses: [10.244.2.2], nodeName: node-b, zone: z2, hints: {forZones: [{name: z2}]}}
  - {addresses: [10.244.2.3], nodeName: node-c, zone: z1, hints: {forZones: [{name: z1}]}}
"#;

#[test]
fn slice_zone_hints_follow_this_nodes_zone() {
    let close = svc("api", VIP, "8080", "  trafficDistribution: PreferClose\n");
    let me = node("node-x", "z1");
    let c = build_on(Some("node-x"), &[&close, HINTED_SLICE, &me]);
    assert_eq!(backends(&c, VIP), ["10.244.2.1", "10.244.2.3"]);
    assert!(warnings(&c).is_empty(), "{:?}", warnings(&c));
    // Partial hints: every endpoint.
    let partial = HINTED_SLICE.replace(", hints: {forZones: [{name: z2}]}", "");
    let c = build_on(Some("node-x"), &[&close, &partial, &me]);
    assert_eq!(backends(&c, VIP).len(), 3);
}

#[test]
fn slice_zone_hints_without_this_nodes_zone_warn_and_use_every_endpoint() {
    let close = svc("api", VIP, "8080", "  trafficDistribution: PreferClose\n");
    // No Node object for node-x.
    let c = build_on(Some("node-x"), &[&close, HINTED_SLICE]);
    assert_eq!(backends(&c, VIP).len(), 3);
    let w = warnings(&c);
    assert!(
        w.len() == 1 && w[0].contains("spec.trafficDistribution") && w[0].contains("node-x"),
        "{w:?}"
    );
    // No node name at all.
    let c = build_on(None, &[&close, HINTED_SLICE]);
    assert_eq!(backends(&c, VIP).len(), 3);
    assert!(
        warnings(&c)
            .iter()
            .any(|w| w.contains("spec.trafficDistribution") && w.contains("NODE_NAME")),
        "{:?}",
        warnings(&c)
    );
}

#[test]
fn unknown_policy_values_are_reported_by_field() {
    let odd = svc(
        "api",
        VIP,
        "8080",
        "  internalTrafficPolicy: Nearby\n  trafficDistribution: PreferFar\n",
    );
    let c = build_on(Some("node-a"), &[&odd, &local_pods()]);
    assert_eq!(backends(&c, VIP).len(), 3);
    let w = warnings(&c);
    assert!(
        w.iter().any(|w| w.contains("spec.internalTrafficPolicy"))
            && w.iter().any(|w| w.contains("spec.trafficDistribution")),
        "{w:?}"
    );
}

#[test]
fn a_named_target_port_resolves_per_pod() {
    let named = svc("api", VIP, "http", "");
    let other_port = pod_on("api-1", "api", "10.244.2.2", "node-a", true, false)
        .replace("containerPort: 8080", "containerPort: 9090");
    let unnamed =
        pod_on("api-2", "api", "10.244.2.3", "node-a", true, false).replace("name: http, ", "");
    // Its `http` is a UDP port; the Service's is TCP.
    let udp = pod_on("api-3", "api", "10.244.2.4", "node-a", true, false)
        .replace("containerPort: 8080", "containerPort: 8080, protocol: UDP");
    let pods = [
        pod_on("api-0", "api", "10.244.2.1", "node-a", true, false),
        other_port,
        unnamed,
        udp,
    ]
    .join("---\n");
    let c = build(&[&named, &pods]);
    let got = targets_at_80(&c);
    // api-2 names no port `http`, api-3 no TCP one: no endpoint, as the
    // controller leaves them out.
    assert_eq!(got, ["10.244.2.1:8080", "10.244.2.2:9090"]);
}

#[test]
fn slices_resolving_a_named_port_differently_keep_each_its_port() {
    let slice = |name: &str, port: u16, ip: &str| {
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: prod, labels: {{kubernetes.io/service-name: api}}}}\naddressType: IPv4\nports: [{{name: http, port: {port}}}]\nendpoints: [{{addresses: [{ip}]}}]\n"
        )
    };
    let named = svc("api", VIP, "http", "");
    let c = build(&[
        &named,
        &slice("api-1", 8080, "10.244.2.1"),
        &slice("api-2", 9090, "10.244.2.2"),
    ]);
    assert_eq!(targets_at_80(&c), ["10.244.2.1:8080", "10.244.2.2:9090"]);
}

/// The distinct targets of the table of `VIP:80/TCP`, sorted.
fn targets_at_80(c: &Compiled) -> Vec<String> {
    let addr = ServiceAddr {
        destination: None,
        vip: VIP.parse().unwrap_or(IpAddr::from([0; 4])),
        port: 80,
        proto: Proto::Tcp,
    };
    let mut got: Vec<String> = c.services[&addr]
        .slots
        .iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    got.sort();
    got.dedup();
    got
}

#[test]
fn a_subset_whose_pods_all_terminate_drains_to_them_while_the_other_is_ready() {
    let versioned = |name: &str, version: &str, ip: &str, deleting: bool| {
        pod_on(name, "web", ip, "node-a", true, deleting).replace(
            "labels: {app: web}",
            &format!("labels: {{app: web, version: {version}}}"),
        )
    };
    let pods = [
        versioned("web-v1-a", "v1", "10.244.1.1", false),
        versioned("web-v2-a", "v2", "10.244.1.3", true),
    ]
    .join("---\n");
    let c = build(&[BASE, &pods, &vs(SPLIT_80_20)]);
    assert!(errors(&c).is_empty(), "{:?}", errors(&c));
    // kube-proxy's rules apply within each subset: v2's share goes to its
    // draining pod rather than failing.
    let s = shares(&c, "10.96.1.1", 80);
    assert_eq!(
        (approx(&s, "10.244.1.1"), approx(&s, "10.244.1.3")),
        (0.8, 0.2),
        "{s:?}"
    );
    // Without the route, the Service as a whole has a ready pod: only it.
    assert_eq!(
        backends(&build(&[BASE, &pods]), "10.96.1.1"),
        ["10.244.1.1"]
    );
}

#[test]
fn locality_is_reported_only_where_a_rule_writes_it() {
    let api = svc("api", VIP, "8080", "");
    let rule = |policy: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: api, namespace: prod}}\nspec:\n  host: api\n  trafficPolicy: {policy}\n"
        )
    };
    let about_locality = |c: &Compiled| {
        c.diagnostics
            .iter()
            .filter(|d| d.field.contains("localityLbSetting"))
            .count()
    };
    // Failover is Istio's default with outlier detection: nothing to say
    // when this node's locality is unknown.
    let implied = rule("{outlierDetection: {consecutive5xxErrors: 3}}");
    assert_eq!(about_locality(&build(&[&api, &implied])), 0);
    let written =
        rule("{loadBalancer: {localityLbSetting: {distribute: [{from: r1/*, to: {r1/*: 100}}]}}}");
    assert_eq!(about_locality(&build(&[&api, &written])), 1);
}

/// BASE's `web` DestinationRule with `extra` under `spec:` (policies), in
/// place of the one BASE defines.
fn web_rule(extra: &str) -> String {
    BASE.replace(
        "  subsets:\n    - {name: v1, labels: {version: v1}}\n    - {name: v2, labels: {version: v2}}\n",
        extra,
    )
}

fn port_addr(vip: &str, port: u16) -> ServiceAddr {
    ServiceAddr::port(
        vip.parse().unwrap_or(IpAddr::from([0; 4])),
        port,
        Proto::Tcp,
    )
}

#[test]
fn destinations_that_differ_in_policy_get_tables_of_their_own_behind_the_routes_weights() {
    let rule = web_rule(
        "  trafficPolicy: {connectionPool: {tcp: {maxConnections: 50}}}
  subsets:
    - name: v1
      labels: {version: v1}
      trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
    - name: v2
      labels: {version: v2}
      trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
",
    );
    let c = build(&[&rule, &pods(), &vs(SPLIT_80_20)]);
    assert_eq!(warnings(&c), Vec::<String>::new());
    let own = port_addr("10.96.1.1", 80);
    let plan = &c.services[&own];
    assert!(plan.slots.is_empty());
    let picks = |i: u8| plan.to_destinations.iter().filter(|&&p| p == i).count();
    assert_eq!(picks(0) * 20, picks(1) * 80, "{:?}", plan.to_destinations);
    assert!(
        !plan.hash_client,
        "v1 does not hash: the destination is drawn"
    );
    assert_eq!(
        plan.flags() & mesh_common::SERVICE_FLAG_DESTINATIONS,
        mesh_common::SERVICE_FLAG_DESTINATIONS
    );
    let v1 = &c.services[&own.destination(0)];
    assert!(v1.least_request && !v1.hash_client);
    let v1_ips: std::collections::BTreeSet<String> = v1
        .slots
        .iter()
        .flatten()
        .map(|b| b.ip.to_string())
        .collect();
    assert_eq!(
        v1_ips,
        ["10.244.1.1", "10.244.1.2"].map(String::from).into()
    );
    // The rule's pool, merged into each subset's policy.
    assert_eq!(v1.socket.map(|s| s.max_connections), Some(50));
    let v2 = &c.services[&own.destination(1)];
    assert!(v2.hash_client && !v2.least_request);
    assert_eq!(v2.socket.map(|s| s.max_connections), Some(50));
    assert!(
        v2.slots
            .iter()
            .flatten()
            .all(|b| b.ip.to_string() == "10.244.1.3")
    );
    // A service without a route of several destinations: one table.
    let db = &c.services[&port_addr("10.96.1.2", 5432)];
    assert!(db.to_destinations.is_empty() && !db.slots.is_empty());
    assert!(
        !c.services
            .contains_key(&port_addr("10.96.1.2", 5432).destination(0))
    );
}

#[test]
fn least_request_over_several_destinations_keeps_each_draw_within_its_destination() {
    // The same policy everywhere, but a second draw across destinations
    // would bend the route's 80/20 toward the idler one.
    let rule = web_rule(
        "  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  subsets:
    - {name: v1, labels: {version: v1}}
    - {name: v2, labels: {version: v2}}
",
    );
    let c = build(&[&rule, &pods(), &vs(SPLIT_80_20)]);
    let own = port_addr("10.96.1.1", 80);
    assert!(!c.services[&own].to_destinations.is_empty());
    assert!(c.services[&own.destination(0)].least_request);
    assert!(c.services[&own.destination(1)].least_request);
}

#[test]
fn destinations_with_one_policy_share_one_table() {
    let rule = web_rule(
        "  trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
  subsets:
    - {name: v1, labels: {version: v1}}
    - name: v2
      labels: {version: v2}
      trafficPolicy: {loadBalancer: {consistentHash: {useSourceIp: true}}}
",
    );
    let c = build(&[&rule, &pods(), &vs(SPLIT_80_20)]);
    let own = port_addr("10.96.1.1", 80);
    let plan = &c.services[&own];
    assert!(plan.to_destinations.is_empty() && plan.hash_client);
    assert!(!c.services.contains_key(&own.destination(0)));
    let s = shares(&c, "10.96.1.1", 80);
    assert!((approx(&s, "10.244.1.3") - 0.2).abs() < 0.01, "{s:?}");
}

#[test]
fn a_subsets_outlier_detection_judges_that_subset_alone() {
    let rule = web_rule(
        "  subsets:
    - {name: v1, labels: {version: v1}}
    - name: v2
      labels: {version: v2}
      trafficPolicy: {outlierDetection: {consecutive5xxErrors: 2}}
",
    );
    let (index, _) = index_of(&[&rule, &pods(), &vs(SPLIT_80_20)]);
    let c = compile(&index, &Config::default());
    let pools: Vec<String> = c.outlier.keys().map(ToString::to_string).collect();
    assert_eq!(pools, ["prod/web subset v2"]);
    let watch = &c.outlier.values().next().map(|w| w.backends.clone());
    let ips: std::collections::BTreeSet<String> =
        watch.iter().flatten().map(|b| b.ip.to_string()).collect();
    assert_eq!(ips, ["10.244.1.3".to_owned()].into());
    // Outlier detection changes no table's policy: one table. Ejected
    // from v2 (its only pod), v2's share is refused; v1 is untouched.
    let mut config = Config::default();
    config.ejected.insert(
        c.outlier
            .keys()
            .next()
            .cloned()
            .unwrap_or_else(|| unreachable!()),
        watch.iter().flatten().copied().collect(),
    );
    let c = compile(&index, &config);
    assert!(
        !c.services
            .contains_key(&port_addr("10.96.1.1", 80).destination(0))
    );
    let s = shares(&c, "10.96.1.1", 80);
    assert_eq!(
        (
            approx(&s, "none"),
            approx(&s, "10.244.1.1"),
            approx(&s, "10.244.1.3")
        ),
        (0.2, 0.4, 0.0)
    );
}
