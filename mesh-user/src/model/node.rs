//! Nodes: compile needs only the agent's own node's name and zone, so a Node
//! is kept as its name and labels; its status (heartbeats every few seconds)
//! would otherwise recompile everything for nothing.

use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::ObjectMeta};

/// The label naming a node's zone, as kube-proxy reads it.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// `node` with only its name and labels.
pub fn trim(node: Node) -> Node {
    Node {
        metadata: ObjectMeta {
            name: node.metadata.name,
            labels: node.metadata.labels,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The labels naming a node's region and Istio's subzone.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";
pub const SUBZONE_LABEL: &str = "topology.istio.io/subzone";

/// A label of the node, if set and not empty.
pub fn label<'a>(node: &'a Node, key: &str) -> Option<&'a str> {
    node.metadata
        .labels
        .as_ref()?
        .get(key)
        .map(String::as_str)
        .filter(|v| !v.is_empty())
}

/// The node's zone label, if set and not empty.
pub fn zone(node: &Node) -> Option<&str> {
    node.metadata
        .labels
        .as_ref()?
        .get(ZONE_LABEL)
        .map(String::as_str)
        .filter(|z| !z.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Kind, Resource, convert::Document};

    #[test]
    fn a_node_converts_to_its_name_and_labels_without_a_namespace() {
        let value = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "node-a", "resourceVersion": "7",
                         "labels": {"topology.kubernetes.io/zone": "z1"}},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        });
        let Ok(Resource::Node(node)) = Resource::try_from(Document {
            kind: Kind::Node,
            value,
        }) else {
            panic!("does not convert");
        };
        assert_eq!(zone(&node), Some("z1"));
        assert!(node.status.is_none() && node.metadata.resource_version.is_none());
        let r = Resource::Node(node).object_ref();
        assert_eq!(
            (&*r.namespace, r.to_string()),
            ("", "Node node-a".to_owned())
        );
    }
}
