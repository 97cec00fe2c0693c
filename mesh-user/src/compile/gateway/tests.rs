//! The seed's gateway files, compiled as the agent would from a folder.

use std::{collections::BTreeMap, path::PathBuf};

use super::{GatewayPort, RouterAddrs, Serve, service_plans};
use crate::{
    compile::{self, Compiled, RouteRef},
    index::Index,
    model::Severity,
    source::{Event, file::FileSource},
};

const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../manifests/examples/seed");

/// The seed's Service (port 5000, `app: business`), three v1 pods and one v2.
const FLASKAPP: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: flaskapp, namespace: default}
spec:
  clusterIP: 10.96.0.50
  selector: {app: business}
  ports: [{name: http, port: 5000, targetPort: 5000}]
"#;

fn pod(name: &str, version: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: business, version: {version}}}}}\n\
         status: {{phase: Running, podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n"
    )
}

/// Compiles the folder made of `extra` YAML documents and seed files.
fn compile_with(seed_files: &[&str], extra: &[String]) -> Compiled {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("mesh-gw-test-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    for f in seed_files {
        std::fs::copy(format!("{SEED}/{f}"), dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
    }
    let mut docs = vec![FLASKAPP.to_owned()];
    docs.extend(extra.iter().cloned());
    for (i, name) in ["flaskapp-v1-a", "flaskapp-v1-b", "flaskapp-v1-c"]
        .iter()
        .enumerate()
    {
        docs.push(pod(name, "v1", &format!("10.244.0.{}", 11 + i)));
    }
    docs.push(pod("flaskapp-v2-a", "v2", "10.244.0.21"));
    std::fs::write(dir.join("objects.yaml"), docs.join("---\n")).unwrap_or_else(|e| panic!("{e}"));
    let mut index = Index::default();
    index.apply_event(Event::from(FileSource::new(&dir).load()));
    let config = compile::Config::default();
    let rejected = index.revalidate(&config.cluster_domain);
    assert!(rejected.is_empty(), "{rejected:?}");
    let _ = std::fs::remove_dir_all(&dir);
    compile::compile(&index, &config)
}

fn only_port(c: &Compiled) -> &GatewayPort {
    let errors: Vec<_> = c
        .diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(c.gateways.len(), 1, "{:?}", c.gateways);
    &c.gateways[0]
}

#[test]
fn the_seed_gateway_is_routed_per_request_with_its_one_exact_route() {
    let c = compile_with(&["gateway.yaml", "destinationrule.yaml"], &[]);
    let port = only_port(&c);
    assert_eq!(port.port, 80);
    let Serve::Router { table } = &port.serve else {
        panic!("{:?}", port.serve);
    };
    assert_eq!(table.hosts.len(), 1);
    assert_eq!(table.hosts[0].domain, "*");
    let routes = &table.hosts[0].routes;
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].field, "spec.http[0]");
    // `/` reaches every pod of the Service: 3 v1 and 1 v2.
    assert_eq!(routes[0].destinations.len(), 1);
    assert_eq!(routes[0].destinations[0].backends.len(), 4);
}

#[test]
fn the_seed_gateway2_keeps_the_exact_route_first_and_the_80_20_catch_all_last() {
    let c = compile_with(&["gateway2.yaml", "destinationrule.yaml"], &[]);
    let port = only_port(&c);
    let Serve::Router { table } = &port.serve else {
        panic!("{:?}", port.serve);
    };
    let routes = &table.hosts[0].routes;
    let fields: Vec<&str> = routes.iter().map(|r| r.field.as_str()).collect();
    assert_eq!(fields, ["spec.http[0]", "spec.http[1]"]);
    let split: Vec<(u64, usize)> = routes[1]
        .destinations
        .iter()
        .map(|d| (d.weight, d.backends.len()))
        .collect();
    assert_eq!(split, [(80, 3), (20, 1)]);
}

#[test]
fn a_pure_weight_route_is_served_by_the_kernel_on_every_node_address() {
    let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: flaskapp, namespace: default}
spec:
  hosts: ["*"]
  gateways: [flaskapp-gateway]
  http:
    - route:
        - {destination: {host: flaskapp, subset: v1, port: {number: 5000}}, weight: 80}
        - {destination: {host: flaskapp, subset: v2, port: {number: 5000}}, weight: 20}
"#;
    let gw = std::fs::read_to_string(format!("{SEED}/gateway.yaml")).unwrap_or_default();
    let gateway_only = gw.split("---").next().unwrap_or_default().to_owned();
    let c = compile_with(&["destinationrule.yaml"], &[gateway_only, vs.to_owned()]);
    let port = only_port(&c);
    let Serve::Kernel {
        field,
        destinations,
        ..
    } = &port.serve
    else {
        panic!("{:?}", port.serve);
    };
    assert_eq!(field, "spec.http[0]");
    assert_eq!(
        destinations.iter().map(|d| d.weight).collect::<Vec<_>>(),
        [80, 20]
    );
    let node = ["10.0.0.7".parse().unwrap_or_else(|e| panic!("{e}"))];
    let plans = service_plans(&c.gateways, &node, &BTreeMap::new(), 100);
    let keys: Vec<String> = plans.keys().map(ToString::to_string).collect();
    assert_eq!(
        keys,
        ["10.0.0.7:80/TCP", "127.0.0.1:80/TCP", "[::1]:80/TCP"]
    );
    let v4 = &plans[plans.keys().nth(1).unwrap_or_else(|| panic!("no plan"))];
    assert!(v4.gateway);
    // 80/20 over 3 + 1 pods, in slots.
    let to_v2 = v4
        .slots
        .iter()
        .flatten()
        .filter(|b| b.ip.to_string() == "10.244.0.21")
        .count();
    assert_eq!(to_v2 * 5, v4.slots.len(), "{:?}", v4.slots);
    // IPv6 has no endpoint here: its connects are refused, never sent on.
    let v6 = &plans[plans.keys().nth(2).unwrap_or_else(|| panic!("no plan"))];
    assert!(v6.slots.iter().all(Option::is_none), "{:?}", v6.slots);
}

#[test]
fn router_ports_point_the_kernel_at_the_router_once_it_listens() {
    let c = compile_with(&["gateway2.yaml", "destinationrule.yaml"], &[]);
    assert!(service_plans(&c.gateways, &[], &BTreeMap::new(), 100).is_empty());
    let listens = RouterAddrs {
        v4: "127.0.0.1:40001".parse().ok(),
        v6: None,
    };
    let plans = service_plans(&c.gateways, &[], &BTreeMap::from([(80, listens)]), 100);
    let (addr, plan) = plans.iter().next().unwrap_or_else(|| panic!("no plan"));
    assert_eq!(addr.to_string(), "127.0.0.1:80/TCP");
    assert_eq!(plan.route, RouteRef::Router { port: 80 });
    assert_eq!(
        plan.slots
            .iter()
            .flatten()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["127.0.0.1:40001"]
    );
    assert_eq!(plans.len(), 1, "no v6 listener: no v6 entry");
}

#[test]
fn tls_servers_and_a_later_tcp_server_on_a_taken_port_are_reported() {
    let gws = r#"
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: a-old, namespace: edge, creationTimestamp: "2026-01-01T00:00:00Z"}
spec:
  selector: {istio: ingressgateway}
  servers:
    - {port: {number: 9000, name: tcp, protocol: TCP}, hosts: ["*"]}
    - {port: {number: 443, name: https, protocol: HTTPS}, hosts: ["*"], tls: {mode: SIMPLE}}
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: b-new, namespace: edge, creationTimestamp: "2026-02-01T00:00:00Z"}
spec:
  selector: {istio: ingressgateway}
  servers:
    - {port: {number: 9000, name: http, protocol: HTTP}, hosts: ["*"]}
---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: elsewhere, namespace: edge}
spec:
  selector: {istio: eastwestgateway}
  servers:
    - {port: {number: 15443, name: tls, protocol: TLS}, hosts: ["*"]}
"#;
    let c = compile_with(&[], &[gws.to_owned()]);
    let said: Vec<String> = c.diagnostics.iter().map(ToString::to_string).collect();
    let has = |needle: &str| said.iter().any(|d| d.contains(needle));
    assert!(
        has("Gateway edge/a-old: spec.servers[1].port.protocol"),
        "{said:#?}"
    );
    assert!(
        has("Gateway edge/b-new: spec.servers[0].port.number"),
        "{said:#?}"
    );
    assert!(has("older Gateway edge/a-old spec.servers[0]"), "{said:#?}");
    // Not selected by this node's labels: not served, not reported.
    assert!(!has("elsewhere"), "{said:#?}");
    let ports: Vec<u16> = c.gateways.iter().map(|p| p.port).collect();
    assert_eq!(ports, [9000]);
    assert_eq!(c.gateways[0].serve, Serve::Nothing);
}

fn gateway(name: &str, created: &str, port: u16, hosts: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: default, creationTimestamp: \"{created}\"}}\n\
         spec:\n  selector: {{istio: ingressgateway}}\n  servers:\n    - {{port: {{number: {port}, name: http, protocol: HTTP}}, hosts: {hosts}}}\n"
    )
}

fn vs(name: &str, created: &str, extra: &str, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: default, creationTimestamp: \"{created}\"}}\n\
         spec:\n  hosts: [\"*\"]\n{extra}  http:\n{http}"
    )
}

fn router_table(port: &GatewayPort) -> &super::table::HttpTable {
    match &port.serve {
        Serve::Router { table } => table,
        other => panic!("not the router: {other:?}"),
    }
}

#[test]
fn http_gateways_on_one_port_merge_and_catch_alls_go_last_across_virtual_services() {
    let docs = [
        gateway("gw-old", "2026-01-01T00:00:00Z", 80, "[\"*\"]"),
        gateway("gw-new", "2026-02-01T00:00:00Z", 80, "[\"*\"]"),
        vs(
            "a-older",
            "2026-01-01T00:00:00Z",
            "  gateways: [gw-new]\n",
            "    - route: [{destination: {host: flaskapp}}]\n    - match: [{uri: {exact: /dropped}}]\n      route: [{destination: {host: flaskapp}}]\n",
        ),
        vs(
            "b-newer",
            "2026-03-01T00:00:00Z",
            "  gateways: [gw-old]\n",
            "    - match: [{uri: {prefix: /b}}]\n      route: [{destination: {host: flaskapp, subset: v2}}]\n",
        ),
    ];
    let c = compile_with(&["destinationrule.yaml"], &docs);
    let port = only_port(&c);
    let servers: Vec<&str> = port.servers.iter().map(|s| &*s.gateway.name).collect();
    assert_eq!(servers, ["gw-old", "gw-new"], "merged, oldest first");
    let routes = &router_table(port).hosts[0].routes;
    let order: Vec<(&str, &str)> = routes
        .iter()
        .map(|r| (&*r.vs.name, r.field.as_str()))
        .collect();
    // b-newer's match comes first: a-older's catch-all moved to the end, and
    // its routes after that catch-all were dropped, as Istio does.
    assert_eq!(
        order,
        [("b-newer", "spec.http[0]"), ("a-older", "spec.http[0]")]
    );
}

#[test]
fn a_host_specific_server_needs_the_router_and_export_to_is_honoured() {
    let docs = [
        gateway("gw", "2026-01-01T00:00:00Z", 80, "[\"shop.example.com\"]"),
        vs(
            "shop",
            "2026-01-01T00:00:00Z",
            "  gateways: [gw]\n",
            "    - route: [{destination: {host: flaskapp}}]\n",
        ),
        vs(
            "private",
            "2026-01-02T00:00:00Z",
            "  gateways: [gw]\n  exportTo: [\".\"]\n",
            "    - match: [{uri: {exact: /p}}]\n      route: [{destination: {host: flaskapp}}]\n",
        ),
    ];
    let c = compile_with(&["destinationrule.yaml"], &docs);
    let port = only_port(&c);
    let table = router_table(port);
    let hosts: Vec<&str> = table.hosts.iter().map(|h| h.domain.as_str()).collect();
    assert_eq!(
        hosts,
        ["shop.example.com"],
        "a request for another host gets 404"
    );
    // `private` is exported to its own namespace only, not the gateway's.
    let from: Vec<&str> = table.hosts[0].routes.iter().map(|r| &*r.vs.name).collect();
    assert_eq!(from, ["shop"]);
}

#[test]
fn route_features_the_router_lacks_are_reported_and_answer_changing_ones_not_served() {
    let docs = [
        gateway("gw", "2026-01-01T00:00:00Z", 80, "[\"*\"]"),
        vs(
            "edge",
            "2026-01-01T00:00:00Z",
            "  gateways: [gw]\n",
            "    - match: [{uri: {exact: /old}}]\n      redirect: {uri: /new}\n    - match: [{uri: {regex: \"/x[\"}}]\n      route: [{destination: {host: flaskapp}}]\n    - match: [{queryParams: {a: {exact: b}}}]\n      route: [{destination: {host: flaskapp}}]\n    - retries: {attempts: 3}\n      route: [{destination: {host: flaskapp}}]\n",
        ),
    ];
    let c = compile_with(&["destinationrule.yaml"], &docs);
    let has = |severity: Severity, needle: &str| {
        c.diagnostics
            .iter()
            .any(|d| d.severity == severity && d.to_string().contains(needle))
    };
    let said = &c.diagnostics;
    for field in [
        "spec.http[0].redirect",
        "spec.http[1].match[0].uri",
        "spec.http[2].match[0].queryParams",
    ] {
        let needle = format!("VirtualService default/edge: {field}");
        assert!(has(Severity::Error, &needle), "{needle}: {said:#?}");
    }
    assert!(
        has(
            Severity::Warning,
            "VirtualService default/edge: spec.http[3].retries"
        ),
        "{said:#?}"
    );
    assert_eq!(c.gateways.len(), 1);
    // Only the route with retries is served (without them): a catch-all, so
    // the kernel serves the port.
    let Serve::Kernel { field, .. } = &c.gateways[0].serve else {
        panic!("{:?}", c.gateways[0].serve);
    };
    assert_eq!(field, "spec.http[3]");
}
