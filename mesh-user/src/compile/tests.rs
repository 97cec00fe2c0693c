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
        vip: vip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        port,
        proto: Proto::Tcp,
    };
    let plan = c
        .services
        .get(&addr)
        .unwrap_or_else(|| panic!("no table for {addr}: {:?}", c.services.keys()));
    let mut out = BTreeMap::new();
    for slot in &plan.slots {
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
