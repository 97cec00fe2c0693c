//! Which endpoints the same-node redirect must leave alone. Istio's
//! `traffic.sidecar.istio.io/excludeInboundPorts` pod annotation says "traffic to
//! these ports of this pod bypasses the mesh"; we honour it for the redirect too.
//! The case it exists for here: a server that reads with `splice(2)` (HAProxy with
//! splicing, for one) never sees bytes that were redirected into its socket.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use super::BackendAddr;
use crate::{
    index::Index,
    model::{Diagnostic, Kind, ObjectRef},
};

pub use crate::model::pod::EXCLUDE_INBOUND_PORTS;

/// Every (pod IP, port) of a mesh pod that excludes that port. Entries that are not
/// port numbers are reported and skipped; the rest of the list still applies.
pub fn excluded_endpoints(
    index: &Index,
    diagnostics: &mut Vec<Diagnostic>,
) -> BTreeSet<BackendAddr> {
    let mut out = BTreeSet::new();
    for (name, entry) in &index.pods {
        if !index.is_meshed(&name.namespace) {
            continue;
        }
        let pod = &entry.object;
        let Some(list) = pod.annotation(EXCLUDE_INBOUND_PORTS) else {
            continue;
        };
        let ips = &pod.ips;
        for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.parse::<u16>() {
                Ok(port) if port > 0 => {
                    out.extend(ips.iter().map(|&ip| BackendAddr { ip, port }));
                    // Address zero: the same port over loopback, inside any pod
                    // (the kernel checks these for namespace-local connections only).
                    for any in [Ipv4Addr::UNSPECIFIED.into(), Ipv6Addr::UNSPECIFIED.into()] {
                        out.insert(BackendAddr { ip: any, port });
                    }
                }
                _ => diagnostics.push(
                    Diagnostic::warning(
                        &ObjectRef::new(Kind::Pod, name.clone()),
                        format!("metadata.annotations[{EXCLUDE_INBOUND_PORTS}]"),
                        format!("{item:?} is not a port number (1-65535); ignored"),
                    )
                    .with_origin(&entry.origin),
                ),
            }
        }
    }
    out
}
