//! Istio host names: a short name (no dot) resolves in the namespace of the object
//! that wrote it; anything with a dot is taken as written, as Istio does (so use
//! `name.ns.svc.<cluster domain>` across namespaces); `*.suffix` wildcards match by
//! suffix.

/// The fully qualified name of a Service.
pub fn service_fqdn(name: &str, namespace: &str, domain: &str) -> String {
    format!("{name}.{namespace}.svc.{domain}")
}

/// Expands `host` as written in an object of `namespace` to a fully qualified name
/// (wildcards keep their `*.` prefix).
pub fn qualify(host: &str, namespace: &str, domain: &str) -> String {
    let host = host.trim_end_matches('.');
    if host == "*" || host.contains('.') {
        return host.to_owned();
    }
    service_fqdn(host, namespace, domain)
}

/// How well a (qualified) pattern matches a service FQDN: exact beats any wildcard,
/// a longer wildcard beats a shorter one. `None`: no match.
pub fn match_rank(pattern: &str, fqdn: &str) -> Option<usize> {
    if pattern == fqdn {
        return Some(usize::MAX);
    }
    if pattern == "*" {
        return Some(0);
    }
    let suffix = pattern.strip_prefix('*')?;
    fqdn.ends_with(suffix).then_some(suffix.len())
}

/// Splits a Service FQDN of our cluster domain back into (name, namespace).
pub fn split_service_fqdn<'a>(fqdn: &'a str, domain: &str) -> Option<(&'a str, &'a str)> {
    let rest = fqdn.strip_suffix(domain)?.strip_suffix(".svc.")?;
    let (name, namespace) = rest.split_once('.')?;
    (!namespace.contains('.')).then_some((name, namespace))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "cluster.local";

    #[test]
    fn short_names_resolve_in_the_writers_namespace() {
        assert_eq!(
            qualify("flaskapp", "prod", D),
            "flaskapp.prod.svc.cluster.local"
        );
        // Istio expands dot-less names only: `name.ns` is taken as written.
        assert_eq!(qualify("flaskapp.other", "prod", D), "flaskapp.other");
        assert_eq!(
            qualify("flaskapp.other.svc.cluster.local", "prod", D),
            "flaskapp.other.svc.cluster.local"
        );
        assert_eq!(
            qualify("flaskapp.other.svc.cluster.local.", "prod", D),
            "flaskapp.other.svc.cluster.local"
        );
        assert_eq!(qualify("api.example.com", "prod", D), "api.example.com");
    }

    #[test]
    fn exact_beats_wildcard() {
        let fqdn = "a.prod.svc.cluster.local";
        assert_eq!(match_rank(fqdn, fqdn), Some(usize::MAX));
        let narrow = match_rank("*.prod.svc.cluster.local", fqdn);
        let wide = match_rank("*.svc.cluster.local", fqdn);
        assert!(narrow > wide && wide > match_rank("*", fqdn));
        assert_eq!(match_rank("*.dev.svc.cluster.local", fqdn), None);
        assert_eq!(match_rank("b.prod.svc.cluster.local", fqdn), None);
    }

    #[test]
    fn splits_service_names() {
        assert_eq!(
            split_service_fqdn("a.prod.svc.cluster.local", D),
            Some(("a", "prod"))
        );
        assert_eq!(split_service_fqdn("a.prod.svc.example.org", D), None);
        assert_eq!(split_service_fqdn("api.example.com", D), None);
    }
}
