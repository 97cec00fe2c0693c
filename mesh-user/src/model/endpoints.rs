//! Core `Endpoints` read as an EndpointSlice, for servers that serve neither
//! `discovery.k8s.io/v1` nor `v1beta1`: what Kubernetes' EndpointSlice
//! mirroring controller makes of them, one slice per Endpoints object. A slice
//! has one port list for all its endpoints, so an Endpoints object whose
//! subsets differ in ports (pods resolving a named port differently) is
//! rejected by field, never read as something else.

use k8s_openapi::{
    api::{
        core::v1::{EndpointAddress, Endpoints},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::convert::ConvertError;

/// The label naming a slice's Service.
const SERVICE_NAME: &str = "kubernetes.io/service-name";

pub fn as_slice(endpoints: Endpoints) -> Result<EndpointSlice, ConvertError> {
    let name = endpoints.metadata.name.clone().unwrap_or_default();
    let subsets = endpoints.subsets.unwrap_or_default();
    let mut ports: Option<Vec<EndpointPort>> = None;
    let mut out = Vec::new();
    for (i, subset) in subsets.into_iter().enumerate() {
        let these: Vec<EndpointPort> = subset
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| EndpointPort {
                name: p.name,
                port: Some(p.port),
                protocol: p.protocol,
                app_protocol: p.app_protocol,
            })
            .collect();
        match &ports {
            Some(first) if !same_ports(first, &these) => {
                return Err(ConvertError {
                    field: format!("subsets[{i}].ports"),
                    message: "differ from subsets[0].ports; one slice has one port list (serve discovery.k8s.io EndpointSlices)".to_owned(),
                });
            }
            Some(_) => {}
            None => ports = Some(these),
        }
        let ready = subset
            .addresses
            .unwrap_or_default()
            .into_iter()
            .map(|a| (a, true));
        let not_ready = subset
            .not_ready_addresses
            .unwrap_or_default()
            .into_iter()
            .map(|a| (a, false));
        out.extend(ready.chain(not_ready).map(|(a, ready)| endpoint(a, ready)));
    }
    let v6 = out
        .first()
        .and_then(|e| e.addresses.first())
        .is_some_and(|a| a.contains(':'));
    // One family per slice, as the mirroring controller makes them.
    out.retain(|e| e.addresses.first().is_some_and(|a| a.contains(':') == v6));
    Ok(EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: endpoints.metadata.namespace,
            labels: Some([(SERVICE_NAME.to_owned(), name)].into()),
            ..Default::default()
        },
        address_type: if v6 { "IPv6" } else { "IPv4" }.to_owned(),
        endpoints: Some(out),
        ports,
    })
}

fn endpoint(address: EndpointAddress, ready: bool) -> Endpoint {
    Endpoint {
        addresses: vec![address.ip],
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(ready),
            terminating: Some(false),
        }),
        hostname: address.hostname,
        node_name: address.node_name,
        target_ref: address.target_ref,
        ..Default::default()
    }
}

fn same_ports(a: &[EndpointPort], b: &[EndpointPort]) -> bool {
    let key = |p: &EndpointPort| (p.name.clone(), p.port, p.protocol.clone());
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(subsets: serde_json::Value) -> Endpoints {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "flaskapp", "namespace": "default"},
            "subsets": subsets,
        }))
        .expect("valid Endpoints")
    }

    #[test]
    fn endpoints_read_as_the_slice_the_mirroring_controller_makes() {
        let e = endpoints(serde_json::json!([
            {"addresses": [{"ip": "10.244.0.11", "nodeName": "node-a", "targetRef": {"kind": "Pod", "name": "v1-0"}}],
             "notReadyAddresses": [{"ip": "10.244.0.12"}],
             "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}]},
            {"addresses": [{"ip": "10.244.0.21"}],
             "ports": [{"name": "http", "port": 5000, "protocol": "TCP"}]}
        ]));
        let slice = as_slice(e).expect("converts");
        assert_eq!(slice.address_type, "IPv4");
        assert_eq!(
            slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME))
                .map(String::as_str),
            Some("flaskapp")
        );
        let seen: Vec<(String, Option<bool>, Option<String>)> = slice
            .endpoints
            .iter()
            .flatten()
            .map(|e| {
                (
                    e.addresses[0].clone(),
                    e.conditions.as_ref().and_then(|c| c.ready),
                    e.node_name.clone(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                ("10.244.0.11".into(), Some(true), Some("node-a".into())),
                ("10.244.0.12".into(), Some(false), None),
                ("10.244.0.21".into(), Some(true), None),
            ]
        );
        assert_eq!(slice.ports.map(|p| p.len()), Some(1));
    }

    #[test]
    fn subsets_with_other_ports_are_rejected_by_field() {
        let e = endpoints(serde_json::json!([
            {"addresses": [{"ip": "10.244.0.11"}], "ports": [{"name": "http", "port": 5000}]},
            {"addresses": [{"ip": "10.244.0.12"}], "ports": [{"name": "http", "port": 8080}]}
        ]));
        assert_eq!(
            as_slice(e).err().map(|e| e.field),
            Some("subsets[1].ports".to_owned())
        );
    }
}
