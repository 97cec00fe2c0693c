//! Where a route destination leads: host -> Service -> port -> subset. One
//! function for validation (which rejects a VirtualService whose destination
//! leads nowhere) and for compile (which builds the destination's endpoints).

use k8s_openapi::api::core::v1::ServicePort;

use crate::model::service::Service;

use super::{Entry, Index};
use crate::model::{Fqdn, NamespacedName, istio};

/// The port of the connection being routed, when there is one. Which port of the
/// destination Service to use follows from it (see [`resolve`]).
#[derive(Clone, Copy, Debug)]
pub enum Connecting<'a> {
    /// Validation: no connection; only a port the destination names is checked.
    Nothing,
    /// Compile: a connection to `port` of the Service `service`.
    To {
        service: &'a NamespacedName,
        port: &'a ServicePort,
    },
    /// Compile: a connection to a gateway's `port`.
    Gateway { port: u16 },
}

/// A destination, resolved.
#[derive(Clone, Debug)]
pub struct Resolved<'a> {
    pub fqdn: Fqdn,
    pub name: NamespacedName,
    pub service: &'a Entry<Service>,
    /// The destination Service's port; `None` only with [`Connecting::Nothing`]
    /// and no port named.
    pub port: Option<&'a ServicePort>,
    /// The subset's labels; `None`: every endpoint of the Service.
    pub subset: Option<&'a istio::Subset>,
}

/// Why a destination leads nowhere. [`ResolveError::field`] names the field of
/// the destination at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    #[error("required")]
    NoHost,
    #[error("unknown host {host:?}: no Service {fqdn} (external hosts are not supported)")]
    UnknownHost { host: String, fqdn: Fqdn },
    #[error("Service {fqdn} has no port {port}")]
    NoSuchPort { fqdn: Fqdn, port: u32 },
    #[error("cannot tell which port of {fqdn} to use")]
    WhichPort { fqdn: Fqdn },
    #[error("unknown subset {subset:?} (no DestinationRule defines subsets for {fqdn})")]
    NoDestinationRule { subset: String, fqdn: Fqdn },
    #[error("unknown subset {subset:?} (known subsets: {known})")]
    UnknownSubset { subset: String, known: String },
}

impl ResolveError {
    /// The field of the `destination` at fault.
    pub fn field(&self) -> &'static str {
        match self {
            ResolveError::NoHost | ResolveError::UnknownHost { .. } => "host",
            ResolveError::NoSuchPort { .. } => "port.number",
            ResolveError::WhichPort { .. } => "port",
            ResolveError::NoDestinationRule { .. } | ResolveError::UnknownSubset { .. } => "subset",
        }
    }
}

/// Resolves `destination`, written in an object of `namespace`.
///
/// The port: the one the destination names; else, for a connection to the same
/// Service, that connection's port; else the destination Service's only port;
/// else its port with the connection's number.
pub fn resolve<'a>(
    index: &'a Index,
    destination: &istio::Destination,
    namespace: &str,
    domain: &str,
    connecting: Connecting<'a>,
) -> Result<Resolved<'a>, ResolveError> {
    let host = destination.host.trim();
    if host.is_empty() {
        return Err(ResolveError::NoHost);
    }
    let fqdn = Fqdn::qualify(host, namespace, domain);
    let Some((name, service)) = index.service_by_fqdn(&fqdn, domain) else {
        return Err(ResolveError::UnknownHost {
            host: host.to_owned(),
            fqdn,
        });
    };
    let ports: Vec<&ServicePort> = service.object.ports.iter().collect();
    let named = destination.port.as_ref().and_then(|p| p.number);
    let port = match (named, connecting) {
        (Some(n), _) => Some(
            ports
                .iter()
                .find(|p| u32::try_from(p.port).ok() == Some(n))
                .copied()
                .ok_or_else(|| ResolveError::NoSuchPort {
                    fqdn: fqdn.clone(),
                    port: n,
                })?,
        ),
        (None, Connecting::Nothing) => None,
        (None, Connecting::Gateway { port }) => Some(match ports.as_slice() {
            [only] => *only,
            _ => ports
                .iter()
                .find(|p| p.port == i32::from(port))
                .copied()
                .ok_or_else(|| ResolveError::WhichPort { fqdn: fqdn.clone() })?,
        }),
        (None, Connecting::To { service: s, port }) if *s == name => Some(port),
        (None, Connecting::To { port, .. }) => Some(match ports.as_slice() {
            [only] => *only,
            _ => ports
                .iter()
                .find(|p| p.port == port.port)
                .copied()
                .ok_or_else(|| ResolveError::WhichPort { fqdn: fqdn.clone() })?,
        }),
    };
    let subset = match &destination.subset {
        None => None,
        Some(subset) => {
            let Some(rule) = index.destination_rule_for(&fqdn, domain) else {
                return Err(ResolveError::NoDestinationRule {
                    subset: subset.clone(),
                    fqdn,
                });
            };
            let subsets = &rule.object.spec.subsets;
            Some(subsets.iter().find(|s| &s.name == subset).ok_or_else(|| {
                ResolveError::UnknownSubset {
                    subset: subset.clone(),
                    known: subsets
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                }
            })?)
        }
    };
    Ok(Resolved {
        fqdn,
        name,
        service,
        port,
        subset,
    })
}
