//! What compile hands the HTTP router for one gateway port: virtual hosts, each
//! an ordered list of routes with their request matches and weighted
//! destinations (already resolved to endpoints). Plain data: the router
//! compiles the regexes (compile has checked they parse) and serves it.

use serde::Serialize;

use super::super::DestinationPlan;
use crate::model::NamespacedName;

/// The HTTP routes of one gateway port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HttpTable {
    pub port: u16,
    /// One per host domain; the router picks one per request by the `Host`
    /// header as Envoy does: exact, then the longest `*.suffix`, then `*`.
    /// No host matches: 404.
    pub hosts: Vec<VirtualHost>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct VirtualHost {
    /// `example.com`, `*.example.com` or `*` (lower case, no port).
    pub domain: String,
    /// In order: the first route whose matches accept the request serves it.
    /// No route accepts it: 404.
    pub routes: Vec<HttpRoute>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HttpRoute {
    /// The VirtualService and field the route comes from (`spec.http[1]`).
    pub vs: NamespacedName,
    pub field: String,
    /// ORed; empty: every request.
    pub matches: Vec<RequestMatch>,
    /// Weighted, as in the route; a request draws one by weight, then an
    /// endpoint of it uniformly. A destination without endpoints answers 503.
    pub destinations: Vec<DestinationPlan>,
}

/// One `HTTPMatchRequest`: every condition set must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestMatch {
    /// On the path, without the query string.
    pub uri: Option<StringMatch>,
    /// Header names lower case; each must be present and match.
    pub headers: Vec<(String, StringMatch)>,
    pub method: Option<StringMatch>,
    /// On the `Host` header (or `:authority`), port included if sent.
    pub authority: Option<StringMatch>,
}

impl RequestMatch {
    /// A match that accepts every request (no condition, or `uri: prefix: /`).
    pub fn is_catch_all(&self) -> bool {
        self.headers.is_empty()
            && self.method.is_none()
            && self.authority.is_none()
            && match &self.uri {
                None => true,
                Some(StringMatch::Prefix(p)) => p == "/" || p.is_empty(),
                Some(StringMatch::Regex(r)) => r == ".*",
                Some(StringMatch::Exact(_)) => false,
            }
    }
}

/// Istio's `StringMatch`. Regexes are RE2 syntax, matched against the whole
/// value (Envoy's `safe_regex`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

impl std::fmt::Display for StringMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StringMatch::Exact(s) => write!(f, "exact {s:?}"),
            StringMatch::Prefix(s) => write!(f, "prefix {s:?}"),
            StringMatch::Regex(s) => write!(f, "regex {s:?}"),
        }
    }
}

/// `uri exact "/" and header x-user exact "a"`; `every request` when empty.
impl std::fmt::Display for RequestMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(m) = &self.uri {
            parts.push(format!("uri {m}"));
        }
        if let Some(m) = &self.method {
            parts.push(format!("method {m}"));
        }
        if let Some(m) = &self.authority {
            parts.push(format!("authority {m}"));
        }
        for (name, m) in &self.headers {
            parts.push(format!("header {name} {m}"));
        }
        if parts.is_empty() {
            return f.write_str("every request");
        }
        f.write_str(&parts.join(" and "))
    }
}
