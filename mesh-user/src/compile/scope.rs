//! The mesh's clients on this node, as Istio defines them: pods in a mesh
//! namespace (`istio-injection=enabled`), scheduled here, not opted out with
//! `sidecar.istio.io/inject: "false"` (label or annotation), not on the host's
//! network (Istio never injects those), and not finished.

use std::collections::BTreeMap;

use crate::{
    index::Index,
    model::{
        NamespacedName,
        pod::{INJECT, Pod},
    },
};

/// A pod's `metadata.uid`, which names its cgroup (`pod<uid>`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodUid(pub String);

impl std::fmt::Display for PodUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The meshed pods of node `node`, by uid.
pub fn meshed_pods(index: &Index, node: &str) -> BTreeMap<PodUid, NamespacedName> {
    index
        .pods
        .iter()
        .filter(|(name, _)| index.is_meshed(&name.namespace))
        .filter_map(|(name, entry)| Some((meshed_uid(&entry.object, node)?, name.clone())))
        .collect()
}

fn meshed_uid(pod: &Pod, node: &str) -> Option<PodUid> {
    if pod.node.as_deref() != Some(node) || pod.host_network {
        return None;
    }
    let opted_out = pod.labels.get(INJECT).map(String::as_str) == Some("false")
        || pod.annotation(INJECT) == Some("false");
    if opted_out || pod.finished {
        return None;
    }
    pod.uid.as_deref().map(|u| PodUid(u.to_owned()))
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeSet, path::Path};

    use super::*;
    use crate::source::file::parse;

    fn pod(name: &str, namespace: &str, extra_meta: &str, spec: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {namespace}, uid: uid-{name}{extra_meta}}}\nspec: {{{spec}}}\n"
        )
    }

    fn index(docs: &[String], mesh_namespaces: &[&str]) -> Index {
        let mut index = Index::default();
        for doc in docs {
            let (objects, diags) = parse(Path::new("pods.yaml"), doc);
            assert!(diags.is_empty(), "{diags:?}");
            for o in objects {
                index.apply("pods.yaml", o);
            }
        }
        index.mesh_namespaces = Some(mesh_namespaces.iter().map(|n| (*n).to_owned()).collect());
        index
    }

    fn names(index: &Index) -> BTreeSet<String> {
        meshed_pods(index, "node-a")
            .into_iter()
            .map(|(uid, name)| format!("{name} {uid}"))
            .collect()
    }

    #[test]
    fn pods_of_mesh_namespaces_on_this_node_are_meshed_and_no_others() {
        let docs = [
            pod("web", "prod", "", "nodeName: node-a"),
            pod("elsewhere", "prod", "", "nodeName: node-b"),
            pod("pending", "prod", "", "containers: []"),
            pod("plain", "default", "", "nodeName: node-a"),
            pod("host", "prod", "", "nodeName: node-a, hostNetwork: true"),
            pod(
                "opted-out",
                "prod",
                ", labels: {sidecar.istio.io/inject: \"false\"}",
                "nodeName: node-a",
            ),
            pod(
                "opted-out-old",
                "prod",
                ", annotations: {sidecar.istio.io/inject: \"false\"}",
                "nodeName: node-a",
            ),
            pod(
                "opted-in",
                "prod",
                ", labels: {sidecar.istio.io/inject: \"true\"}",
                "nodeName: node-a",
            ),
        ];
        let index = index(&docs, &["prod"]);
        assert_eq!(
            names(&index),
            BTreeSet::from([
                "prod/opted-in uid-opted-in".to_owned(),
                "prod/web uid-web".to_owned()
            ])
        );
    }

    #[test]
    fn pods_trimmed_for_this_node_keep_the_uid_its_own_need() {
        let docs = [
            pod("web", "prod", "", "nodeName: node-a"),
            pod("elsewhere", "prod", "", "nodeName: node-b"),
            pod("pending", "prod", "", "containers: []"),
        ];
        let mut uids = BTreeMap::new();
        let mut index = Index::default();
        for doc in &docs {
            for o in parse(Path::new("pods.yaml"), doc).0 {
                let crate::model::Resource::Pod(pod) = o else {
                    panic!("a pod: {o:?}");
                };
                let pod = std::sync::Arc::unwrap_or_clone(pod).trimmed_for("node-a");
                uids.insert(pod.name.to_string(), pod.uid.clone());
                index.apply("pods.yaml", crate::model::Resource::Pod(pod.into()));
            }
        }
        assert_eq!(
            uids,
            BTreeMap::from([
                ("prod/elsewhere".to_owned(), None),
                ("prod/pending".to_owned(), None),
                ("prod/web".to_owned(), Some("uid-web".into())),
            ])
        );
        index.mesh_namespaces = Some(BTreeSet::from(["prod".to_owned()]));
        assert_eq!(
            names(&index),
            BTreeSet::from(["prod/web uid-web".to_owned()])
        );
    }

    #[test]
    fn a_finished_pod_leaves_the_mesh_and_a_labelled_namespace_joins_it() {
        let done = format!(
            "{}status: {{phase: Succeeded}}\n",
            pod("job", "prod", "", "nodeName: node-a")
        );
        let docs = [done, pod("plain", "default", "", "nodeName: node-a")];
        let mut index = index(&docs, &["prod"]);
        assert!(names(&index).is_empty());
        index.mesh_namespaces = Some(BTreeSet::from(["prod".to_owned(), "default".to_owned()]));
        assert_eq!(
            names(&index),
            BTreeSet::from(["default/plain uid-plain".to_owned()])
        );
    }
}
