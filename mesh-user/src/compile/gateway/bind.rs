//! Which VirtualServices bind to which Gateway server, by Istio's rules
//! (pilot `resolveGatewayName`, `sanitizeServerHostNamespace`,
//! `host.NamesForNamespace` and `Intersection`; sources in
//! docs/gateway-research.md §1).

use crate::model::{NamespacedName, istio::MESH_GATEWAY};

/// The Gateway a VirtualService of `vs_namespace` names in `gateways[]`:
/// `name` and `./name` are in the VirtualService's namespace, `ns/name` as
/// written, `name.ns.svc.<domain>` (legacy) is `ns/name`; `mesh` is no
/// Gateway.
pub fn gateway_name(reference: &str, vs_namespace: &str) -> Option<NamespacedName> {
    let reference = reference.trim();
    if reference.is_empty() || reference == MESH_GATEWAY {
        return None;
    }
    if let Some((ns, name)) = reference.split_once('/') {
        let ns = if ns == "." { vs_namespace } else { ns };
        return Some(NamespacedName::new(ns, name));
    }
    match reference.split_once('.') {
        Some((name, rest)) => {
            let ns = rest.split('.').next().unwrap_or(vs_namespace);
            Some(NamespacedName::new(ns, name))
        }
        None => Some(NamespacedName::new(vs_namespace, reference)),
    }
}

/// A server's `hosts` as seen by a VirtualService of `vs_namespace`:
/// `ns/host` only for that namespace (`./host`: the Gateway's), `*/host` for
/// all; the prefix dropped, lower case.
pub fn server_hosts_for(
    hosts: &[String],
    gateway_namespace: &str,
    vs_namespace: &str,
) -> Vec<String> {
    hosts
        .iter()
        .filter_map(|h| {
            let h = h.trim().to_ascii_lowercase();
            match h.split_once('/') {
                None => Some(h),
                Some(("*", host)) => Some(host.to_owned()),
                Some((".", host)) => (gateway_namespace == vs_namespace).then(|| host.to_owned()),
                Some((ns, host)) => (ns == vs_namespace).then(|| host.to_owned()),
            }
        })
        .collect()
}

/// Whether host pattern `general` covers `specific` (`*` covers all,
/// `*.x.com` covers `a.x.com` and `*.a.x.com`, not `x.com`).
fn covers(general: &str, specific: &str) -> bool {
    if general == "*" || general == specific {
        return true;
    }
    match general.strip_prefix('*') {
        Some(suffix) => specific.ends_with(suffix) && specific.len() > suffix.len(),
        None => false,
    }
}

/// The hosts served where a server's hosts meet a VirtualService's: for each
/// pair where one covers the other, the more specific one. Sorted, unique.
pub fn intersect(server: &[String], vs: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for s in server {
        for v in vs {
            let v = v.to_ascii_lowercase();
            if covers(s, &v) {
                out.push(v);
            } else if covers(&v, s) {
                out.push(s.clone());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn gateway_names_resolve_as_istio_does() {
        let n = |ns: &str, name: &str| Some(NamespacedName::new(ns, name));
        assert_eq!(
            gateway_name("flaskapp-gateway", "default"),
            n("default", "flaskapp-gateway")
        );
        assert_eq!(gateway_name("./gw", "prod"), n("prod", "gw"));
        assert_eq!(
            gateway_name("istio-system/gw", "prod"),
            n("istio-system", "gw")
        );
        assert_eq!(
            gateway_name("gw.edge.svc.cluster.local", "prod"),
            n("edge", "gw")
        );
        assert_eq!(gateway_name("mesh", "prod"), None);
    }

    #[test]
    fn server_hosts_are_filtered_by_namespace() {
        let hosts = strings(&["*", "prod/a.com", "./b.com", "*/C.com", "dev/d.com"]);
        assert_eq!(
            server_hosts_for(&hosts, "edge", "prod"),
            strings(&["*", "a.com", "c.com"])
        );
        assert_eq!(
            server_hosts_for(&hosts, "edge", "edge"),
            strings(&["*", "b.com", "c.com"])
        );
    }

    #[test]
    fn intersection_keeps_the_more_specific_host() {
        assert_eq!(
            intersect(&strings(&["*"]), &strings(&["*"])),
            strings(&["*"])
        );
        assert_eq!(
            intersect(&strings(&["*"]), &strings(&["foo.com"])),
            strings(&["foo.com"])
        );
        assert_eq!(
            intersect(&strings(&["*.ex.com"]), &strings(&["*"])),
            strings(&["*.ex.com"])
        );
        assert_eq!(
            intersect(&strings(&["*.ex.com"]), &strings(&["ex.com"])),
            Vec::<String>::new()
        );
        assert_eq!(
            intersect(&strings(&["a.com"]), &strings(&["b.com"])),
            Vec::<String>::new()
        );
    }
}
