//! Per request: the virtual host, the route, the destination and the backend.
//! Pure, apart from the random draw the caller passes in.

use std::net::SocketAddr;

use hyper::header::HOST;
use hyper::{HeaderMap, Request};
use rand::{Rng, RngExt as _};
use regex::Regex;

use super::RouterError;
use crate::compile::DestinationPlan;
use crate::compile::gateway::table::{HttpRoute, HttpTable, RequestMatch, StringMatch};
use crate::model::NamespacedName;

/// An [`HttpTable`] with its regexes compiled.
#[derive(Debug)]
pub(super) struct Table {
    hosts: Vec<Host>,
}

#[derive(Debug)]
struct Host {
    domain: String,
    routes: Vec<Route>,
}

#[derive(Debug)]
pub(super) struct Route {
    pub(super) vs: NamespacedName,
    pub(super) field: String,
    matches: Vec<Match>,
    pub(super) destinations: Vec<DestinationPlan>,
}

#[derive(Debug)]
struct Match {
    uri: Option<Matcher>,
    headers: Vec<(String, Matcher)>,
    method: Option<Matcher>,
    authority: Option<Matcher>,
}

#[derive(Debug)]
enum Matcher {
    Exact(String),
    Prefix(String),
    /// Anchored at both ends: a regex matches the whole value.
    Regex(Regex),
}

/// What routing looks at in a request.
#[derive(Clone, Copy, Debug)]
pub(super) struct Info<'a> {
    pub(super) method: &'a str,
    /// Without the query string.
    pub(super) path: &'a str,
    /// The `Host` header as sent, else the URI's authority.
    pub(super) host: Option<&'a str>,
    pub(super) headers: &'a HeaderMap,
}

impl<'a> Info<'a> {
    pub(super) fn of<B>(req: &'a Request<B>) -> Self {
        let host = req
            .headers()
            .get(HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        Self {
            method: req.method().as_str(),
            path: req.uri().path(),
            host,
            headers: req.headers(),
        }
    }
}

impl Table {
    pub(super) fn compile(table: &HttpTable) -> Result<Self, RouterError> {
        let hosts = table
            .hosts
            .iter()
            .map(|host| {
                Ok(Host {
                    domain: host.domain.to_ascii_lowercase(),
                    routes: host
                        .routes
                        .iter()
                        .map(Route::compile)
                        .collect::<Result<_, _>>()?,
                })
            })
            .collect::<Result<_, RouterError>>()?;
        Ok(Self { hosts })
    }

    /// The first route of the request's virtual host that accepts it.
    pub(super) fn route(&self, info: &Info<'_>) -> Option<&Route> {
        let name = host_name(info.host.unwrap_or_default());
        self.host(&name)?
            .routes
            .iter()
            .find(|route| route.accepts(info))
    }

    /// Envoy's order: the exact domain, the longest `*.suffix`, then `*`.
    fn host(&self, name: &str) -> Option<&Host> {
        self.hosts
            .iter()
            .find(|h| h.domain == name)
            .or_else(|| {
                self.hosts
                    .iter()
                    .filter(|h| wildcard_matches(&h.domain, name))
                    .max_by_key(|h| h.domain.len())
            })
            .or_else(|| self.hosts.iter().find(|h| h.domain == "*"))
    }
}

/// `*.example.com` matches `a.example.com` and `a.b.example.com`, not
/// `example.com`.
fn wildcard_matches(domain: &str, name: &str) -> bool {
    domain.strip_prefix('*').is_some_and(|suffix| {
        suffix.starts_with('.') && name.len() > suffix.len() && name.ends_with(suffix)
    })
}

/// The host part of a `Host` header, lower case: `A.com:80` -> `a.com`,
/// `[::1]:80` -> `[::1]`.
fn host_name(host: &str) -> String {
    let name = if host.starts_with('[') {
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    name.to_ascii_lowercase()
}

impl Route {
    fn compile(route: &HttpRoute) -> Result<Self, RouterError> {
        Ok(Self {
            vs: route.vs.clone(),
            field: route.field.clone(),
            matches: route
                .matches
                .iter()
                .map(|m| Match::compile(m, route))
                .collect::<Result<_, _>>()?,
            destinations: route.destinations.clone(),
        })
    }

    fn accepts(&self, info: &Info<'_>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.accepts(info))
    }
}

impl Match {
    fn compile(m: &RequestMatch, route: &HttpRoute) -> Result<Self, RouterError> {
        let one =
            |m: &Option<StringMatch>| m.as_ref().map(|m| Matcher::compile(m, route)).transpose();
        Ok(Self {
            uri: one(&m.uri)?,
            headers: m
                .headers
                .iter()
                .map(|(name, m)| Ok((name.to_ascii_lowercase(), Matcher::compile(m, route)?)))
                .collect::<Result<_, RouterError>>()?,
            method: one(&m.method)?,
            authority: one(&m.authority)?,
        })
    }

    /// Every condition set holds.
    fn accepts(&self, info: &Info<'_>) -> bool {
        let holds = |m: &Option<Matcher>, value: Option<&str>| {
            m.as_ref()
                .is_none_or(|m| value.is_some_and(|v| m.matches(v)))
        };
        holds(&self.uri, Some(info.path))
            && holds(&self.method, Some(info.method))
            && holds(&self.authority, info.host)
            && self.headers.iter().all(|(name, m)| {
                // A header sent several times: any of its values may match.
                info.headers
                    .get_all(name.as_str())
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
            })
    }
}

impl Matcher {
    fn compile(m: &StringMatch, route: &HttpRoute) -> Result<Self, RouterError> {
        Ok(match m {
            StringMatch::Exact(s) => Self::Exact(s.clone()),
            StringMatch::Prefix(s) => Self::Prefix(s.clone()),
            StringMatch::Regex(re) => {
                Self::Regex(Regex::new(&format!("^(?:{re})$")).map_err(|source| {
                    RouterError::BadRegex {
                        vs: route.vs.clone(),
                        field: route.field.clone(),
                        regex: re.clone(),
                        source: Box::new(source),
                    }
                })?)
            }
        })
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Self::Exact(s) => value == s,
            Self::Prefix(s) => value.starts_with(s.as_str()),
            Self::Regex(re) => re.is_match(value),
        }
    }
}

/// A destination drawn by weight, then one of its backends uniformly. `None`:
/// no healthy upstream (no destination to draw, or one without backends).
pub(super) fn pick_backend<R: Rng + ?Sized>(
    destinations: &[DestinationPlan],
    rng: &mut R,
) -> Option<SocketAddr> {
    let destination = pick_destination(destinations, rng)?;
    if destination.backends.is_empty() {
        return None;
    }
    let backend = destination
        .backends
        .get(rng.random_range(0..destination.backends.len()))?;
    Some(SocketAddr::new(backend.ip, backend.port))
}

fn pick_destination<'a, R: Rng + ?Sized>(
    destinations: &'a [DestinationPlan],
    rng: &mut R,
) -> Option<&'a DestinationPlan> {
    let total = destinations
        .iter()
        .fold(0u64, |sum, d| sum.saturating_add(d.weight));
    if total == 0 {
        // A lone destination without a weight takes everything.
        return match destinations {
            [only] => Some(only),
            _ => None,
        };
    }
    let mut draw = rng.random_range(0..total);
    destinations.iter().find(|d| {
        if draw < d.weight {
            return true;
        }
        draw -= d.weight;
        false
    })
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use rand::SeedableRng as _;
    use rand::rngs::StdRng;

    use super::*;
    use crate::compile::BackendAddr;
    use crate::compile::gateway::table::VirtualHost;

    fn route(field: &str, matches: Vec<RequestMatch>) -> HttpRoute {
        HttpRoute {
            vs: NamespacedName::new("ns", "vs"),
            field: field.to_owned(),
            matches,
            destinations: Vec::new(),
        }
    }

    fn table(hosts: Vec<(&str, Vec<HttpRoute>)>) -> Table {
        let hosts = hosts
            .into_iter()
            .map(|(domain, routes)| VirtualHost {
                domain: domain.to_owned(),
                routes,
            })
            .collect();
        Table::compile(&HttpTable { port: 80, hosts }).expect("table compiles")
    }

    /// The field of the route `req` takes, if any.
    fn routed(table: &Table, req: &Request<()>) -> Option<String> {
        table.route(&Info::of(req)).map(|r| r.field.clone())
    }

    fn get(host: &str, uri: &str) -> Request<()> {
        Request::builder()
            .uri(uri)
            .header(HOST, host)
            .body(())
            .expect("request")
    }

    fn uri(m: StringMatch) -> RequestMatch {
        RequestMatch {
            uri: Some(m),
            ..RequestMatch::default()
        }
    }

    #[test]
    fn vhost_exact_then_longest_suffix_then_star() {
        let t = table(vec![
            ("*", vec![route("star", vec![])]),
            ("*.example.com", vec![route("short", vec![])]),
            ("*.b.example.com", vec![route("long", vec![])]),
            ("a.b.example.com", vec![route("exact", vec![])]),
        ]);
        let at = |host| routed(&t, &get(host, "/"));
        assert_eq!(at("a.b.example.com").as_deref(), Some("exact"));
        assert_eq!(at("A.B.Example.com:8080").as_deref(), Some("exact"));
        assert_eq!(at("c.b.example.com").as_deref(), Some("long"));
        assert_eq!(at("x.c.example.com").as_deref(), Some("short"));
        assert_eq!(at("example.com").as_deref(), Some("star"));
        assert_eq!(at("other.org").as_deref(), Some("star"));
    }

    #[test]
    fn no_vhost_no_route() {
        let t = table(vec![(
            "a.com",
            vec![route("r", vec![uri(StringMatch::Prefix("/x".into()))])],
        )]);
        assert_eq!(routed(&t, &get("b.com", "/x")), None);
        assert_eq!(routed(&t, &get("a.com", "/y")), None);
        assert_eq!(routed(&t, &get("a.com", "/x")).as_deref(), Some("r"));
        // `*.a.com` does not match `a.com`.
        let t = table(vec![("*.a.com", vec![route("r", vec![])])]);
        assert_eq!(routed(&t, &get("a.com", "/")), None);
    }

    #[test]
    fn host_name_strips_port() {
        assert_eq!(host_name("A.com:80"), "a.com");
        assert_eq!(host_name("a.com"), "a.com");
        assert_eq!(host_name("[::1]:80"), "[::1]");
        assert_eq!(host_name("[::1]"), "[::1]");
    }

    #[test]
    fn first_matching_route_wins_and_empty_matches_catch_all() {
        let t = table(vec![(
            "*",
            vec![
                route("a", vec![uri(StringMatch::Prefix("/a".into()))]),
                route("ab", vec![uri(StringMatch::Prefix("/ab".into()))]),
                route("all", vec![]),
                route("never", vec![uri(StringMatch::Prefix("/n".into()))]),
            ],
        )]);
        assert_eq!(routed(&t, &get("h", "/abc")).as_deref(), Some("a"));
        assert_eq!(routed(&t, &get("h", "/n")).as_deref(), Some("all"));
    }

    #[test]
    fn uri_exact_prefix_regex_without_query() {
        let t = table(vec![(
            "*",
            vec![
                route("exact", vec![uri(StringMatch::Exact("/e".into()))]),
                route("regex", vec![uri(StringMatch::Regex("/a.*".into()))]),
                route("prefix", vec![uri(StringMatch::Prefix("/p".into()))]),
            ],
        )]);
        let at = |u| routed(&t, &get("h", u));
        assert_eq!(at("/e").as_deref(), Some("exact"));
        assert_eq!(at("/e?x=1").as_deref(), Some("exact"));
        assert_eq!(at("/ex"), None);
        assert_eq!(at("/abc").as_deref(), Some("regex"));
        // Full match: `/a.*` is not found inside `/ba`.
        assert_eq!(at("/ba"), None);
        assert_eq!(at("/pq?z").as_deref(), Some("prefix"));
        assert_eq!(at("/q"), None);
    }

    #[test]
    fn any_match_of_a_route_and_all_its_conditions() {
        let both = RequestMatch {
            uri: Some(StringMatch::Prefix("/".into())),
            method: Some(StringMatch::Exact("POST".into())),
            ..RequestMatch::default()
        };
        let t = table(vec![(
            "*",
            vec![route("r", vec![uri(StringMatch::Exact("/x".into())), both])],
        )]);
        let post = Request::builder()
            .method("POST")
            .uri("/y")
            .header(HOST, "h")
            .body(())
            .expect("request");
        assert_eq!(routed(&t, &post).as_deref(), Some("r"));
        assert_eq!(routed(&t, &get("h", "/x")).as_deref(), Some("r"));
        assert_eq!(routed(&t, &get("h", "/y")), None);
    }

    #[test]
    fn header_present_and_matching() {
        let m = RequestMatch {
            headers: vec![("X-User".into(), StringMatch::Regex("jo.".into()))],
            ..RequestMatch::default()
        };
        let t = table(vec![("*", vec![route("r", vec![m])])]);
        let with = |v: &str| {
            Request::builder()
                .uri("/")
                .header("x-user", v)
                .body(())
                .expect("request")
        };
        assert_eq!(routed(&t, &with("joe")).as_deref(), Some("r"));
        assert_eq!(routed(&t, &with("joey")), None);
        assert_eq!(routed(&t, &get("h", "/")), None);
    }

    #[test]
    fn method_and_authority() {
        let m = RequestMatch {
            method: Some(StringMatch::Exact("GET".into())),
            authority: Some(StringMatch::Exact("a.com:8080".into())),
            ..RequestMatch::default()
        };
        let t = table(vec![("*", vec![route("r", vec![m])])]);
        assert_eq!(routed(&t, &get("a.com:8080", "/")).as_deref(), Some("r"));
        // The authority is matched as sent, port included.
        assert_eq!(routed(&t, &get("a.com", "/")), None);
        let put = Request::builder()
            .method("PUT")
            .uri("/")
            .header(HOST, "a.com:8080")
            .body(())
            .expect("request");
        assert_eq!(routed(&t, &put), None);
    }

    #[test]
    fn bad_regex_names_the_route() {
        let hosts = vec![VirtualHost {
            domain: "*".into(),
            routes: vec![route(
                "spec.http[3]",
                vec![uri(StringMatch::Regex("(".into()))],
            )],
        }];
        let err = Table::compile(&HttpTable { port: 80, hosts }).expect_err("bad regex rejected");
        assert!(
            matches!(&err, RouterError::BadRegex { vs, field, .. } if &*vs.name == "vs" && field == "spec.http[3]"),
            "{err}"
        );
    }

    fn dest(name: &str, weight: u64, ports: &[u16]) -> DestinationPlan {
        DestinationPlan {
            name: name.into(),
            weight,
            backends: ports
                .iter()
                .map(|&port| BackendAddr {
                    ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                    port,
                })
                .collect(),
        }
    }

    #[test]
    fn destinations_by_weight() {
        let mut rng = StdRng::seed_from_u64(7);
        let dests = [dest("a", 0, &[1]), dest("b", 5, &[2, 3])];
        for _ in 0..100 {
            let port = pick_backend(&dests, &mut rng).expect("a backend").port();
            assert!(port == 2 || port == 3);
        }
        // All weights zero: only a lone destination is drawn.
        assert_eq!(
            pick_backend(&[dest("a", 0, &[1])], &mut rng).map(|a| a.port()),
            Some(1)
        );
        assert_eq!(
            pick_backend(&[dest("a", 0, &[1]), dest("b", 0, &[2])], &mut rng),
            None
        );
        assert_eq!(pick_backend(&[dest("a", 1, &[])], &mut rng), None);
        assert_eq!(pick_backend(&[], &mut rng), None);
    }
}
