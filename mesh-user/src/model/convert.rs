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
        // Fill in the namespace as `kubectl apply` would, so every object has one.
        if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.entry("namespace")
                .or_insert_with(|| Value::String(DEFAULT_NAMESPACE.to_owned()));
        }
        fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<Box<T>, ConvertError> {
            serde_path_to_error::deserialize::<_, T>(value)
                .map(Box::new)
                .map_err(|e| ConvertError {
                    field: e.path().to_string(),
                    message: e.into_inner().to_string(),
                })
        }
        Ok(match kind {
            Kind::Service => Resource::Service(typed(value)?),
            Kind::Pod => Resource::Pod(typed(value)?),
            Kind::EndpointSlice => Resource::EndpointSlice(typed(value)?),
            Kind::VirtualService => Resource::VirtualService(typed(value)?),
            Kind::DestinationRule => Resource::DestinationRule(typed(value)?),
        })
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
}
