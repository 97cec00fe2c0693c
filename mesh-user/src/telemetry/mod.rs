//! `/healthz`, `/readyz` and `/metrics` (Prometheus text, prometheus-client).
//! Ready once the first full sync reached the kernel. Metrics: the config sync
//! latency (change seen -> maps written), the applied generation, rejected
//! objects by kind and reason, build info, and on each scrape the kernel's own
//! counters (connections per service and backend, redirection) and map
//! occupancy and kernel memory (see `counters`).

pub mod auth;

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tracing::info;

use crate::{
    kernel::counters::View,
    model::{Diagnostic, Severity},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
    ebpf_object: String,
}

/// A rejected object's kind (`file` for a whole file) and the field at fault,
/// without indexes (`spec.http.route.weight`): few values, each a reason.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
struct RejectedLabels {
    kind: String,
    reason: String,
}

impl RejectedLabels {
    fn of(d: &Diagnostic) -> Self {
        let kind = d
            .object
            .as_ref()
            .map_or_else(|| "file".to_owned(), |o| o.kind.to_string());
        let mut reason = String::new();
        let mut depth = 0;
        for c in d.field.chars() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                c if depth == 0 => reason.push(c),
                _ => {}
            }
        }
        if reason.is_empty() {
            reason = "document".to_owned();
        }
        Self { kind, reason }
    }
}

#[derive(Debug)]
pub struct Telemetry {
    registry: Registry,
    sync_latency: Histogram,
    generation: Gauge,
    rejected: Family<RejectedLabels, Gauge>,
    apply_failures: Family<ReasonLabels, Counter>,
    not_applied: Gauge,
    /// Labels for the kernel counters (see `kernel::counters::Connections`).
    pub view: Arc<std::sync::RwLock<View>>,
    ready: AtomicBool,
    /// When the agent's loop last ran, in ms since `started`: /healthz fails when
    /// it stops running (a stuck walk or apply), so the kubelet restarts it.
    heartbeat_ms: AtomicU64,
    started: Instant,
}

/// How long the loop may go without running before /healthz fails. It runs at
/// least once a second; an apply at 10 000 services takes about 1.5 s.
pub const STALL: Duration = Duration::from_secs(30);

impl Telemetry {
    /// `kernel`: collectors that read the kernel's counters on each scrape.
    pub fn new(
        kernel: Vec<Box<dyn prometheus_client::collector::Collector>>,
        view: Arc<std::sync::RwLock<View>>,
        object: &str,
    ) -> Arc<Self> {
        let mut registry = Registry::with_prefix("mesh");
        for collector in kernel {
            registry.register_collector(collector);
        }
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                ebpf_object: object.to_owned(),
            })
            .set(1);
        registry.register("build_info", "The agent's version and kernel object", build);
        let rejected = Family::<RejectedLabels, Gauge>::default();
        registry.register(
            "rejected_objects",
            "Objects (or versions) not in use now, by kind and the field at fault",
            rejected.clone(),
        );
        // 100 µs .. ~3 s.
        let sync_latency = Histogram::new(
            prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
        );
        registry.register(
            "config_sync_latency_seconds",
            "From a change seen by the source to the kernel maps written",
            sync_latency.clone(),
        );
        let apply_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "apply_failures",
            "Service tables (or redirect exclusions) not written to the kernel, by reason, counted at each attempt",
            apply_failures.clone(),
        );
        let not_applied = Gauge::default();
        registry.register(
            "services_not_applied",
            "Service ports whose desired table is not in the kernel now (log: which, and why)",
            not_applied.clone(),
        );
        let generation = Gauge::default();
        registry.register(
            "config_generation",
            "Configuration generations applied",
            generation.clone(),
        );
        Arc::new(Self {
            registry,
            sync_latency,
            generation,
            rejected,
            apply_failures,
            not_applied,
            view,
            ready: AtomicBool::new(false),
            heartbeat_ms: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    /// The failures of one apply attempt, and how many service ports it left
    /// without their desired table: ready only when none.
    pub fn apply_failed<'a>(&self, reasons: impl Iterator<Item = &'a str>, services: usize) {
        for reason in reasons {
            self.apply_failures
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .inc();
        }
        self.not_applied
            .set(i64::try_from(services).unwrap_or(i64::MAX));
    }

    /// The agent's loop ran (it calls this at least once a second).
    pub fn beat(&self) {
        let ms = self.started.elapsed().as_millis();
        self.heartbeat_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// How long the loop has not run as of `now`, if longer than [`STALL`].
    pub fn stalled(&self, now: Instant) -> Option<Duration> {
        let last = self.started + Duration::from_millis(self.heartbeat_ms.load(Ordering::Relaxed));
        let quiet = now.saturating_duration_since(last);
        (quiet > STALL).then_some(quiet)
    }

    /// One apply: its latency in seconds and generation.
    pub fn applied(&self, latency_seconds: f64, generation: u64) {
        self.sync_latency.observe(latency_seconds);
        self.generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
    }

    /// The first full sync is in the kernel: ready (unless services are not
    /// applied, see [`Telemetry::apply_failed`]). Said before the agent logs
    /// "config applied", so that whoever waits for that line finds it ready.
    pub fn synced(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// The current errors, counted by kind and field (see [`RejectedLabels`]).
    pub fn set_rejected(&self, diagnostics: &[Diagnostic]) {
        let mut counts: std::collections::BTreeMap<RejectedLabels, i64> = Default::default();
        for d in diagnostics.iter().filter(|d| d.severity == Severity::Error) {
            *counts.entry(RejectedLabels::of(d)).or_default() += 1;
        }
        self.rejected.clear();
        for (labels, n) in counts {
            self.rejected.get_or_create(&labels).set(n);
        }
    }

    fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!("encoding metrics: {e}");
        }
        out
    }
}

/// Serves on `addr` in the background; returns the bound address (port 0 picks
/// one). `/healthz` and `/readyz` answer anyone (the kubelet probes them);
/// `/metrics` answers whom `auth` allows.
pub async fn serve(
    addr: SocketAddr,
    telemetry: Arc<Telemetry>,
    auth: Option<Arc<crate::telemetry::auth::Authorizer>>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let metrics = get(
        |State(t): State<Arc<Telemetry>>, headers: axum::http::HeaderMap| async move {
            use crate::telemetry::auth::Verdict;
            let verdict = match &auth {
                None => Verdict::Allowed,
                Some(auth) => {
                    let header = headers
                        .get(axum::http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok());
                    auth.check(header).await
                }
            };
            match verdict {
                Verdict::Allowed => (StatusCode::OK, t.render()),
                Verdict::Unauthenticated => (
                    StatusCode::UNAUTHORIZED,
                    "a bearer token the API server authenticates is required\n".to_owned(),
                ),
                Verdict::Forbidden => (
                    StatusCode::FORBIDDEN,
                    "this identity may not get /metrics (bind it to the ClusterRole mesh-metrics-reader)\n"
                        .to_owned(),
                ),
            }
        },
    );
    let app = Router::new()
        .route(
            "/healthz",
            get(|State(t): State<Arc<Telemetry>>| async move {
                match t.stalled(Instant::now()) {
                    None => (StatusCode::OK, "ok\n".to_owned()),
                    Some(quiet) => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("the agent's loop has not run for {} s\n", quiet.as_secs()),
                    ),
                }
            }),
        )
        .route(
            "/readyz",
            get(|State(t): State<Arc<Telemetry>>| async move {
                let not_applied = t.not_applied.get();
                if !t.ready.load(Ordering::Relaxed) {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "waiting for the first sync\n".to_owned(),
                    )
                } else if not_applied > 0 {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "{not_applied} service ports not applied (see the log and mesh_apply_failures_total)\n"
                        ),
                    )
                } else {
                    (StatusCode::OK, "ready\n".to_owned())
                }
            }),
        )
        .route("/metrics", metrics)
        .with_state(telemetry);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server: {e}");
        }
    });
    info!(addr = %bound, "metrics listening");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn telemetry() -> Arc<Telemetry> {
        Telemetry::new(Vec::new(), Default::default(), "test")
    }

    #[test]
    fn health_fails_once_the_loop_stops_beating() {
        let t = telemetry();
        t.beat();
        let now = Instant::now();
        assert_eq!(t.stalled(now), None);
        assert_eq!(t.stalled(now + STALL / 2), None);
        let quiet = t.stalled(now + STALL + Duration::from_secs(5));
        assert!(quiet.is_some_and(|q| q > STALL), "{quiet:?}");
    }

    #[test]
    fn rejected_objects_are_counted_by_kind_and_field_without_indexes() {
        use crate::model::{Kind, ObjectRef};
        let vs = ObjectRef::new(
            Kind::VirtualService,
            crate::model::NamespacedName::new("a", "b"),
        );
        let d = |field: &str| Diagnostic::error(&vs, field, "bad");
        let t = telemetry();
        t.set_rejected(&[
            d("spec.http[0].route[1].weight"),
            d("spec.http[2].route[0].weight"),
            d(""),
            Diagnostic::warning(&vs, "spec.tls", "ignored"),
        ]);
        let text = t.render();
        assert!(
            text.contains(
                r#"mesh_rejected_objects{kind="VirtualService",reason="spec.http.route.weight"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"mesh_rejected_objects{kind="VirtualService",reason="document"} 1"#),
            "{text}"
        );
        assert!(!text.contains("spec.tls"), "{text}");
    }
}

/// The gateway router's request counts, as `mesh_gateway_requests_total`.
#[derive(Debug)]
pub struct RouterRequests(pub crate::router::StatsHandle);

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct RouteLabels {
    port: u16,
    /// `ns/name` of the VirtualService; empty when no route matched.
    virtual_service: String,
    /// `spec.http[i]`; empty when no route matched.
    route: String,
    code: u16,
}

impl prometheus_client::collector::Collector for RouterRequests {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        let counter = prometheus_client::metrics::counter::ConstCounter::new(0u64);
        let mut e = encoder.encode_descriptor(
            "gateway_requests",
            "Requests the gateway's HTTP router answered, by port, route and status code",
            None,
            counter.metric_type(),
        )?;
        for s in self.0.snapshot() {
            let vs = if s.field.is_empty() {
                String::new()
            } else {
                s.vs.to_string()
            };
            prometheus_client::metrics::counter::ConstCounter::new(s.requests).encode(
                e.encode_family(&RouteLabels {
                    port: s.port,
                    virtual_service: vs,
                    route: s.field,
                    code: s.code,
                })?,
            )?;
        }
        Ok(())
    }
}

/// One counter of an outlier record.
type OutlierValue = fn(&crate::outlier::BackendRecord) -> u64;

/// Outlier detection's backends, as the detector last judged them.
#[derive(Clone, Debug, Default)]
pub struct OutlierBackends(pub Arc<std::sync::RwLock<Vec<crate::outlier::BackendRecord>>>);

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct OutlierLabels {
    /// `ns/name` of the Service.
    service: String,
    /// `IP:port`.
    backend: String,
}

impl prometheus_client::collector::Collector for OutlierBackends {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric as _;
        use prometheus_client::metrics::{counter::ConstCounter, gauge::ConstGauge};
        let Ok(records) = self.0.read() else {
            return Ok(());
        };
        let labels = |r: &crate::outlier::BackendRecord| OutlierLabels {
            service: r.service.to_string(),
            backend: r.backend.to_string(),
        };
        let counters: [(&str, &str, OutlierValue); 3] = [
            (
                "outlier_failed_connects",
                "Connects to a backend watched by outlier detection that failed before ESTABLISHED or were reset before any byte (kernel counter)",
                |r| r.failures,
            ),
            (
                "outlier_successful_connects",
                "Connects to a backend watched by outlier detection that reached ESTABLISHED and were not reset before any byte (kernel counter)",
                |r| r.successes,
            ),
            (
                "outlier_ejections",
                "Times outlier detection ejected the backend from the service (lowered while it behaves)",
                |r| u64::from(r.ejections),
            ),
        ];
        for (name, help, value) in counters {
            let mut e = encoder.encode_descriptor(
                name,
                help,
                None,
                ConstCounter::new(0u64).metric_type(),
            )?;
            for r in records.iter() {
                ConstCounter::new(value(r)).encode(e.encode_family(&labels(r))?)?;
            }
        }
        let mut e = encoder.encode_descriptor(
            "outlier_ejected",
            "1 while outlier detection keeps the backend out of the service's tables",
            None,
            ConstGauge::new(0i64).metric_type(),
        )?;
        for r in records.iter() {
            ConstGauge::new(i64::from(r.ejected_for_ms.is_some()))
                .encode(e.encode_family(&labels(r))?)?;
        }
        Ok(())
    }
}
