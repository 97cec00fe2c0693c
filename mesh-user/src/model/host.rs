//! Istio host names. A short name (no dot) resolves in the namespace of the object
//! that wrote it; anything with a dot is taken as written, as Istio does (so use
//! `name.ns.svc.<cluster domain>` across namespaces); `*.suffix` wildcards match by
//! suffix.

use std::fmt;

use super::NamespacedName;

/// A host as Istio qualifies it: a Service's `name.ns.svc.<domain>`, another DNS
/// name as written, or a `*.suffix` / `*` pattern.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fqdn(String);

impl Fqdn {
    /// The fully qualified name of a Service.
    pub fn of_service(service: &NamespacedName, domain: &str) -> Self {
        Self(format!(
            "{}.{}.svc.{domain}",
            service.name, service.namespace
        ))
    }

    /// Expands `host` as written in an object of `namespace` (wildcards keep their
    /// `*.` prefix).
    pub fn qualify(host: &str, namespace: &str, domain: &str) -> Self {
        let host = host.trim().trim_end_matches('.');
        if host == "*" || host.contains('.') {
            return Self(host.to_owned());
        }
        Self::of_service(&NamespacedName::new(namespace, host), domain)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// How well this (pattern) matches a service's name: exact beats any wildcard,
    /// a longer wildcard beats a shorter one. `None`: no match.
    pub fn match_rank(&self, service: &Fqdn) -> Option<usize> {
        if self == service {
            return Some(usize::MAX);
        }
        if self.0 == "*" {
            return Some(0);
        }
        let suffix = self.0.strip_prefix('*')?;
        service.0.ends_with(suffix).then_some(suffix.len())
    }

    /// The Service this names, if it is a Service name of our cluster domain.
    pub fn service(&self, domain: &str) -> Option<NamespacedName> {
        let rest = self.0.strip_suffix(domain)?.strip_suffix(".svc.")?;
        let (name, namespace) = rest.split_once('.')?;
        (!namespace.contains('.')).then(|| NamespacedName::new(namespace, name))
    }
}

impl fmt::Display for Fqdn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "cluster.local";

    fn q(host: &str) -> String {
        Fqdn::qualify(host, "prod", D).to_string()
    }

    #[test]
    fn short_names_resolve_in_the_writers_namespace() {
        assert_eq!(q("flaskapp"), "flaskapp.prod.svc.cluster.local");
        // Istio expands dot-less names only: `name.ns` is taken as written.
        assert_eq!(q("flaskapp.other"), "flaskapp.other");
        assert_eq!(
            q("flaskapp.other.svc.cluster.local"),
            "flaskapp.other.svc.cluster.local"
        );
        assert_eq!(
            q("flaskapp.other.svc.cluster.local."),
            "flaskapp.other.svc.cluster.local"
        );
        assert_eq!(q("api.example.com"), "api.example.com");
    }

    #[test]
    fn exact_beats_wildcard() {
        let fqdn = Fqdn::qualify("a.prod.svc.cluster.local", "x", D);
        assert_eq!(fqdn.match_rank(&fqdn), Some(usize::MAX));
        let rank = |pattern: &str| Fqdn::qualify(pattern, "x", D).match_rank(&fqdn);
        let narrow = rank("*.prod.svc.cluster.local");
        let wide = rank("*.svc.cluster.local");
        assert!(narrow > wide && wide > rank("*"));
        assert_eq!(rank("*.dev.svc.cluster.local"), None);
        assert_eq!(rank("b.prod.svc.cluster.local"), None);
    }

    #[test]
    fn splits_service_names() {
        let service = |s: &str| Fqdn::qualify(s, "x", D).service(D);
        assert_eq!(
            service("a.prod.svc.cluster.local"),
            Some(NamespacedName::new("prod", "a"))
        );
        assert_eq!(service("a.prod.svc.example.org"), None);
        assert_eq!(service("api.example.com"), None);
    }
}
