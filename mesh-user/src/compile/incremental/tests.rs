//! The incremental compile against the whole one: after any sequence of
//! changes (slices, pods, Services, routes, rules, nodes, in any order), what
//! [`Compiler::update`] holds is what [`super::super::compile`] makes of the
//! same index, and an endpoint change recompiles only the tables it touches.

use std::path::Path;

use proptest::prelude::*;

use super::*;
use crate::{
    index::Index,
    model::{Kind, ObjectRef, Resource},
    source::{Event, Sourced, file::parse},
};

fn one(yaml: &str) -> Resource {
    let (mut objects, diags) = parse(Path::new("t.yaml"), yaml);
    assert!(diags.is_empty(), "{yaml}: {diags:?}");
    assert_eq!(objects.len(), 1, "{yaml}");
    objects.remove(0)
}

fn service(name: &str, ns: &str, ip: &str, selector: Option<&str>, variant: u8) -> String {
    let selector = selector.map_or(String::new(), |pairs| format!("  selector: {{{pairs}}}\n"));
    let ports = match variant {
        0 => "[{name: http, port: 80, targetPort: 8080}]",
        1 => "[{name: http, port: 80, targetPort: 9090}]",
        _ => {
            "[{name: http, port: 80, targetPort: 8080}, {name: tcp-x, port: 81, targetPort: 8081}]"
        }
    };
    let affinity = if variant == 1 {
        "  sessionAffinity: ClientIP\n"
    } else {
        ""
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  clusterIP: {ip}\n{selector}{affinity}  ports: {ports}\n"
    )
}

/// A slice of `service` with endpoints `pods` (index, ready), managed by
/// the controller or not.
fn slice(name: &str, ns: &str, service: &str, eps: &[(u8, bool)], managed: bool) -> String {
    let managed = if managed {
        ", endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io"
    } else {
        ""
    };
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, namespace: {ns}, labels: {{kubernetes.io/service-name: {service}{managed}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}, {{name: tcp-x, port: 8081, protocol: TCP}}]\nendpoints:\n"
    );
    for (i, ready) in eps {
        s.push_str(&format!(
            "  - addresses: [\"10.244.0.{}\"]\n    conditions: {{ready: {ready}}}\n    nodeName: n{}\n    targetRef: {{kind: Pod, name: p{i}, namespace: {ns}}}\n",
            10 + i,
            i % 2
        ));
    }
    s
}

fn pod(i: u8, app: &str, version: &str, ready: bool, node: u8) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: prod, uid: u{i}, labels: {{app: {app}, version: {version}}}, annotations: {{traffic.sidecar.istio.io/excludeInboundPorts: \"{}\"}}}}\nspec: {{nodeName: n{node}}}\nstatus:\n  podIP: 10.244.0.{}\n  conditions: [{{type: Ready, status: \"{}\"}}]\n",
        8000 + u16::from(i),
        10 + i,
        if ready { "True" } else { "False" }
    )
}

fn vs(weight: u8) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: a, namespace: prod}}\nspec:\n  hosts: [a]\n  tcp:\n  - route:\n    - {{destination: {{host: b, subset: v1}}, weight: {weight}}}\n    - {{destination: {{host: b, subset: v2}}, weight: {}}}\n",
        100 - weight
    )
}

fn dr(outlier: bool) -> String {
    let policy = if outlier {
        "  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 2, interval: 1s, baseEjectionTime: 1s}}\n"
    } else {
        ""
    };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: b, namespace: prod}}\nspec:\n  host: b\n{policy}  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}, trafficPolicy: {{loadBalancer: {{simple: LEAST_REQUEST}}}}}}\n"
    )
}

fn node(zone: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: n0, labels: {{topology.kubernetes.io/zone: {zone}}}}}\n"
    )
}

/// One change a source may say.
#[derive(Clone, Debug)]
enum Step {
    Apply(String),
    Delete(Kind, &'static str, &'static str),
}

fn step() -> impl Strategy<Value = Step> {
    let eps = proptest::collection::vec((0u8..6, any::<bool>()), 0..4);
    prop_oneof![
        (0u8..3).prop_map(|v| Step::Apply(service("a", "prod", "10.96.0.1", Some("app: a"), v))),
        (0u8..3).prop_map(|v| Step::Apply(service("b", "prod", "10.96.0.2", Some("app: b"), v))),
        // A selector that comes, goes and changes (its first pair too).
        (
            0u8..2,
            prop_oneof![
                Just(None),
                Just(Some("version: v1")),
                Just(Some("app: b, version: v2"))
            ]
        )
            .prop_map(|(v, selector)| Step::Apply(service(
                "c",
                "prod",
                "10.96.0.3",
                selector,
                v
            ))),
        // One address claimed twice: the whole compile decides.
        Just(Step::Apply(service(
            "d",
            "prod",
            "10.96.0.1",
            Some("app: a"),
            0
        ))),
        (eps.clone(), any::<bool>())
            .prop_map(|(e, m)| Step::Apply(slice("a-1", "prod", "a", &e, m))),
        (eps.clone(), any::<bool>())
            .prop_map(|(e, m)| Step::Apply(slice("b-1", "prod", "b", &e, m))),
        (eps.clone(), any::<bool>())
            .prop_map(|(e, m)| Step::Apply(slice("b-2", "prod", "b", &e, m))),
        // A slice that changes Service.
        (eps.clone(), any::<bool>(), any::<bool>()).prop_map(|(e, m, b)| Step::Apply(slice(
            "x-1",
            "prod",
            if b { "b" } else { "c" },
            &e,
            m
        ))),
        (0u8..6, any::<bool>(), any::<bool>(), any::<bool>(), 0u8..2).prop_map(
            |(i, a, v1, ready, node)| Step::Apply(pod(
                i,
                if a { "a" } else { "b" },
                if v1 { "v1" } else { "v2" },
                ready,
                node
            ))
        ),
        (0u8..100).prop_map(|w| Step::Apply(vs(w))),
        any::<bool>().prop_map(|o| Step::Apply(dr(o))),
        prop_oneof![Just("z1"), Just("z2")].prop_map(|z| Step::Apply(node(z))),
        prop_oneof![
            Just(Step::Delete(Kind::Service, "prod", "a")),
            Just(Step::Delete(Kind::Service, "prod", "b")),
            Just(Step::Delete(Kind::Service, "prod", "d")),
            Just(Step::Delete(Kind::EndpointSlice, "prod", "b-1")),
            Just(Step::Delete(Kind::EndpointSlice, "prod", "x-1")),
            Just(Step::Delete(Kind::Pod, "prod", "p1")),
            Just(Step::Delete(Kind::Pod, "prod", "p2")),
            Just(Step::Delete(Kind::VirtualService, "prod", "a")),
            Just(Step::Delete(Kind::DestinationRule, "prod", "b")),
        ],
    ]
}

fn event(step: &Step) -> Event {
    match step {
        Step::Apply(yaml) => Event::Applied(Sourced {
            origin: "t.yaml".to_owned(),
            object: one(yaml),
        }),
        Step::Delete(kind, ns, name) => Event::Deleted(ObjectRef::new(
            *kind,
            crate::model::NamespacedName::new(*ns, *name),
        )),
    }
}

fn config() -> Config {
    Config {
        node_name: Some("n0".to_owned()),
        ..Config::default()
    }
}

fn assert_same(incremental: &Compiled, whole: &Compiled) {
    assert_eq!(incremental.services, whole.services);
    assert_eq!(incremental.undecided, whole.undecided);
    assert_eq!(incremental.outlier, whole.outlier);
    assert_eq!(incremental.redirect_excluded, whole.redirect_excluded);
    assert_eq!(incremental.diagnostics, whole.diagnostics);
    assert_eq!(
        format!("{:?}", incremental.gateways),
        format!("{:?}", whole.gateways)
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn incremental_compile_is_the_whole_compile(steps in proptest::collection::vec(step(), 1..40)) {
        let mut index = Index::default();
        let mut compiler = Compiler::default();
        let config = config();
        for step in &steps {
            index.apply_event(event(step));
            let _ = index.revalidate(&config.cluster_domain);
            let changes = index.take_changes();
            compiler.update(&index, &config, changes);
            assert_same(compiler.compiled(), &crate::compile::compile(&index, &config));
            // The index's slices by Service, against a scan.
            for name in ["a", "b", "c"] {
                let service = crate::model::NamespacedName::new("prod", name);
                let kept: Vec<_> = index.slices_of(&service).map(|e| e.object.name.clone()).collect();
                let scanned: Vec<_> = index
                    .endpoint_slices
                    .values()
                    .filter(|e| e.object.service.as_deref() == Some(name))
                    .map(|e| e.object.name.clone())
                    .collect();
                prop_assert_eq!(kept, scanned);
            }
        }
    }
}

#[test]
fn an_endpoint_change_recompiles_only_its_service() {
    let mut index = Index::default();
    let mut compiler = Compiler::default();
    let config = config();
    for i in 0..50u8 {
        let name = format!("s{i}");
        index.apply(
            "t.yaml",
            one(&service(
                &name,
                "prod",
                &format!("10.96.1.{i}"),
                Some(&format!("app: {name}")),
                0,
            )),
        );
        index.apply(
            "t.yaml",
            one(&slice(
                &format!("{name}-1"),
                "prod",
                &name,
                &[(1, true)],
                true,
            )),
        );
    }
    let changes = index.take_changes();
    let first = compiler.update(&index, &config, changes);
    assert!(first.all);
    assert_eq!(compiler.compiled().services.len(), 50);
    index.apply_event(event(&Step::Apply(slice(
        "s7-1",
        "prod",
        "s7",
        &[(1, true), (2, true)],
        true,
    ))));
    let changes = index.take_changes();
    let delta = compiler.update(&index, &config, changes);
    assert!(!delta.all);
    let addr = ServiceAddr::port(
        "10.96.1.7"
            .parse()
            .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
        80,
        super::super::Proto::Tcp,
    );
    assert_eq!(delta.addrs, [addr].into());
    let plan = &compiler.compiled().services[&addr];
    assert_eq!(plan.slots.iter().flatten().count(), 2, "{plan:?}");
    assert_same(
        compiler.compiled(),
        &crate::compile::compile(&index, &config),
    );
}
