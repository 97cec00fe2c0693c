//! The index as the sources drive it: relists, objects that stop converting,
//! snapshots, namespaces; built from small object builders.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::*;
use crate::model::istio::{Destination, HttpRoute, RouteDestination, VirtualServiceSpec};

fn meta(namespace: &str, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: Some(namespace.to_owned()),
        name: Some(name.to_owned()),
        ..Default::default()
    }
}

fn service(namespace: &str, name: &str) -> Resource {
    Resource::Service(std::sync::Arc::new(Service {
        name: NamespacedName::new(namespace, name),
        ..Default::default()
    }))
}

/// A VirtualService sending everything to `host`.
fn vs(name: &str, host: &str) -> Resource {
    Resource::VirtualService(std::sync::Arc::new(VirtualService {
        metadata: meta("prod", name),
        spec: VirtualServiceSpec {
            hosts: vec![host.to_owned()],
            http: vec![HttpRoute {
                route: vec![RouteDestination {
                    destination: Destination {
                        host: host.to_owned(),
                        ..Default::default()
                    },
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        },
    }))
}

fn sourced(object: Resource) -> Sourced {
    Sourced {
        origin: "kubernetes".to_owned(),
        object,
    }
}

fn invalid(object: &Resource) -> Invalid {
    let object = object.object_ref();
    Invalid {
        diagnostic: Diagnostic::error(&object, "spec.http[0].route[0].weight", "not a number"),
        object,
    }
}

/// The accepted VirtualServices' hosts.
fn routed_hosts(index: &mut Index) -> Vec<String> {
    index.revalidate("cluster.local");
    index
        .virtual_services()
        .flat_map(|e| e.object.spec.hosts.clone())
        .collect()
}

/// A relist as the Kubernetes source streams it; whether anything changed.
fn relist(index: &mut Index, kind: Kind, objects: Vec<Sourced>, invalid: Vec<Invalid>) -> bool {
    let events = std::iter::once(Event::Relisting(kind))
        .chain(objects.into_iter().map(Event::Applied))
        .chain(invalid.into_iter().map(Event::Invalid))
        .chain([Event::Relisted(kind)]);
    events.fold(false, |changed, e| index.apply_event(e) | changed)
}

fn with_web() -> Index {
    let mut index = Index::default();
    relist(
        &mut index,
        Kind::Service,
        vec![
            sourced(service("prod", "web")),
            sourced(service("prod", "db")),
        ],
        Vec::new(),
    );
    index
}

#[test]
fn a_relist_keeps_the_last_good_version_of_an_object_that_no_longer_converts() {
    let mut index = with_web();
    let good = vs("web", "web");
    assert!(index.apply_event(Event::Applied(sourced(good.clone()))));
    assert_eq!(routed_hosts(&mut index), ["web"]);
    // The watch is gone for a while (410 Gone); meanwhile the object was edited
    // into something that does not convert. The relist says so.
    assert!(relist(
        &mut index,
        Kind::VirtualService,
        Vec::new(),
        vec![invalid(&good)]
    ));
    assert_eq!(
        routed_hosts(&mut index),
        ["web"],
        "the last good version routes"
    );
    let reported: Vec<String> = index
        .source_diagnostics()
        .map(ToString::to_string)
        .collect();
    assert_eq!(reported.len(), 1, "{reported:?}");
    assert!(reported[0].contains("VirtualService prod/web"));
    // A valid version clears the report.
    assert!(index.apply_event(Event::Applied(sourced(vs("web", "db")))));
    assert_eq!(routed_hosts(&mut index), ["db"]);
    assert_eq!(index.source_diagnostics().count(), 0);
}

#[test]
fn a_relist_removes_what_is_gone_and_clears_what_it_lists_valid() {
    let mut index = with_web();
    let (a, b) = (vs("a", "web"), vs("b", "db"));
    index.apply_event(Event::Applied(sourced(a.clone())));
    index.apply_event(Event::Invalid(invalid(&b)));
    assert_eq!(index.source_diagnostics().count(), 1);
    // Relisted: `a` was deleted while the watch was away, `b` is valid now.
    assert!(relist(
        &mut index,
        Kind::VirtualService,
        vec![sourced(b)],
        Vec::new()
    ));
    assert_eq!(routed_hosts(&mut index), ["db"]);
    assert_eq!(index.source_diagnostics().count(), 0);
    // Another kind's relist leaves these alone.
    assert!(!relist(
        &mut index,
        Kind::Service,
        vec![
            sourced(service("prod", "web")),
            sourced(service("prod", "db"))
        ],
        Vec::new()
    ));
    assert_eq!(routed_hosts(&mut index), ["db"]);
}

#[test]
fn an_invalid_report_of_a_deleted_object_goes_with_it() {
    let mut index = with_web();
    let a = vs("a", "web");
    index.apply_event(Event::Applied(sourced(a.clone())));
    assert!(index.apply_event(Event::Invalid(invalid(&a))));
    assert!(
        !index.apply_event(Event::Invalid(invalid(&a))),
        "the same report twice is no change"
    );
    assert_eq!(routed_hosts(&mut index), ["web"]);
    assert!(index.apply_event(Event::Deleted(a.object_ref())));
    assert!(routed_hosts(&mut index).is_empty());
    assert_eq!(index.source_diagnostics().count(), 0);
}

#[test]
fn a_snapshot_makes_the_index_hold_exactly_it() {
    let mut index = with_web();
    let snapshot = |objects: Vec<Resource>| Event::Snapshot {
        objects: objects
            .into_iter()
            .map(|object| Sourced {
                origin: "a.yaml".to_owned(),
                object,
            })
            .collect(),
        diagnostics: Vec::new(),
    };
    assert!(index.apply_event(snapshot(vec![service("prod", "web"), vs("a", "web")])));
    assert!(!index.apply_event(snapshot(vec![service("prod", "web"), vs("a", "web")])));
    let refs: Vec<String> = index
        .object_refs()
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(refs, ["Service prod/web", "VirtualService prod/a"]);
}

#[test]
fn namespaces_decide_what_is_meshed() {
    let mut index = Index::default();
    assert!(
        index.is_meshed("anything"),
        "a folder meshes every namespace"
    );
    assert!(index.apply_event(Event::Namespaces(BTreeSet::from(["prod".to_owned()]))));
    assert!(index.is_meshed("prod") && !index.is_meshed("dev"));
    assert!(!index.apply_event(Event::Namespaces(BTreeSet::from(["prod".to_owned()]))));
    assert!(!index.apply_event(Event::Synced));
}

/// A Node `name` in `zone`, with a heartbeat at `beat` in its status.
fn node(name: &str, zone: &str, beat: &str) -> Resource {
    let node: k8s_openapi::api::core::v1::Node = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"conditions": [{"type": "Ready", "status": "True", "lastHeartbeatTime": beat}]}
    }))
    .unwrap_or_default();
    Resource::Node(std::sync::Arc::new(crate::model::node::trim(node)))
}

#[test]
fn nodes_are_kept_by_name_and_a_heartbeat_changes_nothing() {
    let mut index = Index::default();
    assert!(relist(
        &mut index,
        Kind::Node,
        vec![sourced(node("node-a", "z1", "2026-11-30T00:00:00Z"))],
        Vec::new()
    ));
    assert!(!index.apply_event(Event::Applied(sourced(node(
        "node-a",
        "z1",
        "2026-11-30T00:00:10Z"
    )))));
    let zone = |index: &Index| {
        index
            .node("node-a")
            .and_then(|e| crate::model::node::zone(&e.object))
            .map(str::to_owned)
    };
    assert_eq!(zone(&index).as_deref(), Some("z1"));
    assert!(index.apply_event(Event::Applied(sourced(node(
        "node-a",
        "z2",
        "2026-11-30T00:00:20Z"
    )))));
    assert_eq!(zone(&index).as_deref(), Some("z2"));
    assert!(index.is_empty(), "a Node alone configures nothing");
    assert!(relist(&mut index, Kind::Node, Vec::new(), Vec::new()));
    assert_eq!(zone(&index), None);
}

#[test]
fn pods_of_one_template_share_labels_and_ports_until_the_last_goes() {
    let template = |name: &str, version: &str, port: u16| {
        let (mut objects, _) = crate::source::file::parse(
            std::path::Path::new("p.yaml"),
            &format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: prod, labels: {{app: web, version: {version}}}}}\nspec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {port}}}]}}]}}\n"
            ),
        );
        objects.remove(0)
    };
    let mut index = Index::default();
    index.apply("p.yaml", template("a", "v1", 8080));
    index.apply("p.yaml", template("b", "v1", 8080));
    index.apply("p.yaml", template("c", "v2", 9090));
    let pod = |name: &str| {
        index.pods[&NamespacedName::new("prod", name)]
            .object
            .clone()
    };
    assert!(std::sync::Arc::ptr_eq(&pod("a").labels, &pod("b").labels));
    assert!(std::sync::Arc::ptr_eq(&pod("a").ports, &pod("b").ports));
    assert!(!std::sync::Arc::ptr_eq(&pod("a").labels, &pod("c").labels));
    assert_eq!(pod("c").ports[0].port, 9090);
    assert_eq!(index.shapes.len(), (2, 2));
    index.delete(&ObjectRef::new(Kind::Pod, NamespacedName::new("prod", "c")));
    assert_eq!(index.shapes.len(), (1, 1));
    index.delete(&ObjectRef::new(Kind::Pod, NamespacedName::new("prod", "a")));
    assert_eq!(index.shapes.len(), (1, 1));
    index.delete(&ObjectRef::new(Kind::Pod, NamespacedName::new("prod", "b")));
    assert_eq!(index.shapes.len(), (0, 0));

    // A pod its source holds too (the file source keeps what it read, and
    // shares within a file only) is kept as it is, not copied to share; and
    // deleting it keeps the set the other pods share.
    index.apply("p.yaml", template("a", "v1", 8080));
    let b = template("b", "v1", 8080);
    let Resource::Pod(held) = &b else {
        panic!("a pod");
    };
    let held = held.clone();
    index.apply("p.yaml", b);
    let kept = |index: &Index, name: &str| {
        index.pods[&NamespacedName::new("prod", name)]
            .object
            .clone()
    };
    assert!(std::sync::Arc::ptr_eq(&kept(&index, "b"), &held));
    assert_eq!(index.shapes.len(), (1, 1));
    drop(held);
    index.delete(&ObjectRef::new(Kind::Pod, NamespacedName::new("prod", "b")));
    assert_eq!(index.shapes.len(), (1, 1));
    let a = kept(&index, "a");
    index.apply("p.yaml", template("c", "v1", 8080));
    assert!(std::sync::Arc::ptr_eq(&kept(&index, "c").labels, &a.labels));
    assert!(std::sync::Arc::ptr_eq(&kept(&index, "c").ports, &a.ports));
}

#[test]
fn a_pod_change_marks_the_services_that_select_it_and_no_other() {
    let parse = |yaml: String| {
        let (mut objects, diags) =
            crate::source::file::parse(std::path::Path::new("t.yaml"), &yaml);
        assert!(diags.is_empty(), "{diags:?}");
        objects.remove(0)
    };
    let service = |name: &str, selector: &str| {
        parse(format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: prod}}\nspec: {{clusterIP: 10.96.0.{}, selector: {{{selector}}}, ports: [{{port: 80}}]}}\n",
            name.len()
        ))
    };
    let pod = |labels: &str| {
        parse(format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: p, namespace: prod, labels: {{{labels}}}}}\n"
        ))
    };
    let mut index = Index::default();
    index.apply("t.yaml", service("web", "app: web"));
    index.apply("t.yaml", service("canary", "app: web, version: v2"));
    // First pair `tier`, sorted before `version`.
    index.apply("t.yaml", service("front", "tier: front, version: v2"));
    index.apply("t.yaml", service("db", "app: db"));
    let _ = index.take_changes();
    let marked = |index: &mut Index, labels: &str| -> Vec<String> {
        index.apply("t.yaml", pod(labels));
        let changes = index.take_changes();
        assert!(!changes.all && changes.pods);
        changes
            .services
            .into_iter()
            .map(|s| s.name.to_string())
            .collect()
    };
    assert_eq!(marked(&mut index, "app: web, version: v1"), ["web"]);
    // The pod's old labels and its new ones: both Services it leaves and joins.
    assert_eq!(
        marked(&mut index, "app: web, version: v2, tier: front"),
        ["canary", "front", "web"]
    );
    assert_eq!(
        marked(&mut index, "app: db"),
        ["canary", "db", "front", "web"]
    );
    // A Service's selector changed: the pod is found by the new one only.
    index.apply("t.yaml", service("db", "app: cache"));
    let _ = index.take_changes();
    assert_eq!(marked(&mut index, "app: db, x: y"), Vec::<String>::new());
    for name in ["web", "canary", "front", "db"] {
        index.delete(&ObjectRef::new(
            Kind::Service,
            NamespacedName::new("prod", name),
        ));
    }
    assert!(index.selectors.is_empty());
}
