//! What the Kubernetes source receives: JSON objects (one, or a list under
//! `items`), deserialised as kube does (typed for the core kinds, a
//! `DynamicObject` for the Istio kinds), converted as the source converts them,
//! then validated and compiled. Every object also goes through
//! `TryFrom<Document> for Resource` as each kind.
#![no_main]

use std::sync::Arc;

use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::api::DynamicObject;
use libfuzzer_sys::fuzz_target;
use mesh_user::{
    compile,
    index::Index,
    model::{Kind, Resource, convert::Document},
    source::{Event, Sourced, kubernetes},
};
use serde_json::Value;

/// Deserialised as kube does (`T`), projected as the source projects it
/// (`U`: the agent's own Pod and EndpointSlice).
fn typed<T: serde::de::DeserializeOwned, U: From<T>>(
    value: &Value,
    wrap: fn(Arc<U>) -> Resource,
) -> Option<Resource> {
    serde_json::from_value::<T>(value.clone())
        .ok()
        .map(|o| wrap(Arc::new(U::from(o))))
}

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let items = match value.get("items").and_then(Value::as_array) {
        Some(items) => items.clone(),
        None => vec![value],
    };
    let mut index = Index::default();
    for item in &items {
        for kind in Kind::ALL {
            let _ = Resource::try_from(Document {
                kind,
                value: item.clone(),
            });
        }
        let api_version = item.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = item.get("kind").and_then(Value::as_str).unwrap_or("");
        let resource = match Kind::from_manifest(api_version, kind) {
            Some(Kind::Service) => typed::<Service, _>(item, Resource::Service),
            Some(Kind::Pod) => typed::<Pod, _>(item, Resource::Pod),
            Some(Kind::EndpointSlice) => typed::<EndpointSlice, _>(item, Resource::EndpointSlice),
            Some(Kind::Node) => typed::<Node, _>(item, Resource::Node),
            Some(kind @ (Kind::VirtualService | Kind::DestinationRule | Kind::Gateway)) => {
                serde_json::from_value::<DynamicObject>(item.clone())
                    .ok()
                    .and_then(|object| kubernetes::convert_dynamic(kind, &object).ok())
                    .map(|sourced| sourced.object)
            }
            None => None,
        };
        if let Some(object) = resource {
            index.apply_event(Event::Applied(Sourced {
                origin: kubernetes::ORIGIN.to_owned(),
                object,
            }));
        }
    }
    let config = compile::Config::default();
    index.revalidate(&config.cluster_domain);
    let _ = compile::compile(&index, &config);
});
