//! Who may read `/metrics`. The metrics name every service and backend on the
//! node, so in a cluster they are served only to callers the API server
//! vouches for, as kube-rbac-proxy does: the bearer token is checked with a
//! TokenReview, then the caller's right to `get` the non-resource URL
//! `/metrics` with a SubjectAccessReview. Prometheus gets that right through
//! the `mesh-metrics-reader` ClusterRole (manifests/deploy). Decisions are
//! cached for a minute, so a scrape costs the API server nothing most times.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    authorization::v1::{NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec},
};
use kube::{Api, Client, api::PostParams};

/// `--metrics-auth`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum MetricsAuth {
    /// Anyone who can connect (the default listens on 127.0.0.1 only).
    None,
    /// A bearer token the API server authenticates and authorizes for `get /metrics`.
    Kubernetes,
}

/// The answer to one request for `/metrics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No token, or one the API server does not authenticate: 401.
    Unauthenticated,
    /// Authenticated, not allowed to `get /metrics`: 403.
    Forbidden,
}

const CACHE_FOR: Duration = Duration::from_secs(60);
/// Tokens remembered at most (a flood of bad tokens must not grow memory).
const CACHE_MAX: usize = 1024;

/// Checks tokens with the API server.
pub struct Authorizer {
    client: Client,
    cache: Mutex<HashMap<String, (Instant, Verdict)>>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer").finish_non_exhaustive()
    }
}

impl Authorizer {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The verdict for an `Authorization` header value.
    pub async fn check(&self, authorization: Option<&str>) -> Verdict {
        let Some(token) = authorization
            .and_then(|h| h.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
        else {
            return Verdict::Unauthenticated;
        };
        if let Some(v) = self.cached(token) {
            return v;
        }
        let verdict = match self.review(token).await {
            Ok(v) => v,
            Err(e) => {
                // Not cached: the API server may be back at the next scrape.
                tracing::warn!("checking a /metrics token with the API server: {e}");
                return Verdict::Unauthenticated;
            }
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_MAX {
                cache.clear();
            }
            cache.insert(token.to_owned(), (Instant::now(), verdict));
        }
        verdict
    }

    fn cached(&self, token: &str) -> Option<Verdict> {
        let cache = self.cache.lock().ok()?;
        let (at, verdict) = cache.get(token)?;
        (at.elapsed() < CACHE_FOR).then_some(*verdict)
    }

    async fn review(&self, token: &str) -> Result<Verdict, kube::Error> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_owned(),
                ..Default::default()
            },
            ..Default::default()
        };
        let reviewed = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await?;
        let status = reviewed.status.unwrap_or_default();
        let Some(user) = status.user.filter(|_| status.authenticated == Some(true)) else {
            return Ok(Verdict::Unauthenticated);
        };
        let access = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: user.username,
                groups: user.groups,
                uid: user.uid,
                extra: user.extra,
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some("/metrics".to_owned()),
                    verb: Some("get".to_owned()),
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let decided = Api::<SubjectAccessReview>::all(self.client.clone())
            .create(&PostParams::default(), &access)
            .await?;
        Ok(if decided.status.is_some_and(|s| s.allowed) {
            Verdict::Allowed
        } else {
            Verdict::Forbidden
        })
    }
}
