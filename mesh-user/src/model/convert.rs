//! The boundary where a source's document becomes a typed [`Resource`]: one
//! conversion for every source (a file's YAML, an API server's dynamic object),
//! failing with the path of the field at fault.

use serde_json::Value;

use super::{DEFAULT_NAMESPACE, Kind, Resource};

/// A document of a kind we read, not yet typed.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    pub kind: Kind,
    pub value: Value,
}

/// Why a document does not convert: the field at fault (e.g.
/// `spec.http[0].route[0].weight`, empty for the document itself) and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ConvertError {
    pub field: String,
    pub message: String,
}

impl TryFrom<Document> for Resource {
    type Error = ConvertError;

    fn try_from(Document { kind, mut value }: Document) -> Result<Self, Self::Error> {
        // Fill in the namespace as `kubectl apply` would, so every namespaced
        // object has one.
        if let Some(meta) = value
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .filter(|_| kind.is_namespaced())
        {
            meta.entry("namespace")
                .or_insert_with(|| Value::String(DEFAULT_NAMESPACE.to_owned()));
        }
        fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T, ConvertError> {
            serde_path_to_error::deserialize::<_, T>(value).map_err(|e| ConvertError {
                field: e.path().to_string(),
                message: e.into_inner().to_string(),
            })
        }
        use std::sync::Arc;
        Ok(match kind {
            Kind::Service => Resource::Service(Arc::new(super::service::Service::from(typed::<
                k8s_openapi::api::core::v1::Service,
            >(
                value
            )?))),
            Kind::Pod => Resource::Pod(Arc::new(
                typed::<k8s_openapi::api::core::v1::Pod>(value)?.into(),
            )),
            Kind::EndpointSlice => {
                v1beta1_as_v1(&mut value);
                Resource::EndpointSlice(Arc::new(
                    typed::<k8s_openapi::api::discovery::v1::EndpointSlice>(value)?.into(),
                ))
            }
            Kind::VirtualService => Resource::VirtualService(Arc::new(typed(value)?)),
            Kind::DestinationRule => Resource::DestinationRule(Arc::new(typed(value)?)),
            Kind::Gateway => Resource::Gateway(Arc::new(typed(value)?)),
            Kind::Node => Resource::Node(Arc::new(super::node::trim(typed(value)?))),
        })
    }
}

/// `discovery.k8s.io/v1beta1` (what Kubernetes 1.17-1.20 write) names an
/// endpoint's node and zone in `topology`; v1 has `nodeName` and `zone`, which
/// win where both are set. The rest of the schema is the same for the fields
/// we read, so a v1beta1 slice reads as v1 after this. (v1 has no `topology`
/// field, so this never touches a v1 slice.)
fn v1beta1_as_v1(slice: &mut Value) {
    if let Some(object) = slice.as_object_mut() {
        // The typed v1 slice checks its apiVersion; a dynamic watch's items
        // may carry none.
        object.insert("apiVersion".into(), "discovery.k8s.io/v1".into());
        object.insert("kind".into(), "EndpointSlice".into());
    }
    let Some(endpoints) = slice.get_mut("endpoints").and_then(Value::as_array_mut) else {
        return;
    };
    for endpoint in endpoints.iter_mut().filter_map(Value::as_object_mut) {
        let Some(Value::Object(topology)) = endpoint.remove("topology") else {
            continue;
        };
        for (label, field) in [
            ("kubernetes.io/hostname", "nodeName"),
            ("topology.kubernetes.io/zone", "zone"),
        ] {
            if let Some(Value::String(v)) = topology.get(label) {
                endpoint
                    .entry(field)
                    .or_insert_with(|| Value::String(v.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_of_the_wrong_type_is_named() {
        let value = serde_json::json!({
            "metadata": {"name": "web"},
            "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}, "weight": "lots"}]}]}
        });
        let err = Resource::try_from(Document {
            kind: Kind::VirtualService,
            value,
        })
        .err();
        assert_eq!(
            err.map(|e| e.field),
            Some("spec.http[0].route[0].weight".to_owned())
        );
    }

    #[test]
    fn objects_without_a_namespace_land_in_default() {
        let value = serde_json::json!({"metadata": {"name": "web"}});
        let resource = Resource::try_from(Document {
            kind: Kind::Service,
            value,
        });
        assert_eq!(
            resource.map(|r| r.object_ref().to_string()).ok(),
            Some("Service default/web".to_owned())
        );
    }

    #[test]
    fn a_v1beta1_endpoint_slice_reads_as_v1_with_its_node_and_zone() {
        let value = serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1",
            "kind": "EndpointSlice",
            "metadata": {"name": "flaskapp-x7k2p", "labels": {"kubernetes.io/service-name": "flaskapp"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.0.5"], "conditions": {"ready": true},
                 "topology": {"kubernetes.io/hostname": "node-a", "topology.kubernetes.io/zone": "z1"}},
                {"addresses": ["10.244.0.6"], "conditions": {"ready": false}, "nodeName": "node-b",
                 "topology": {"kubernetes.io/hostname": "ignored"}}
            ]
        });
        let Ok(Resource::EndpointSlice(slice)) = Resource::try_from(Document {
            kind: Kind::EndpointSlice,
            value,
        }) else {
            panic!("does not convert");
        };
        let endpoints = &slice.endpoints;
        let nodes: Vec<_> = endpoints
            .iter()
            .map(|e| (e.node.as_deref(), e.zone()))
            .collect();
        assert_eq!(
            nodes,
            [(Some("node-a"), Some("z1")), (Some("node-b"), None)]
        );
        assert_eq!(slice.ports.len(), 1);
        assert!(!endpoints[1].conditions.ready);
    }
}
