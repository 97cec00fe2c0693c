//! `/healthz`, `/readyz` and `/metrics` (Prometheus text, prometheus-client).
//! Ready once the first full sync reached the kernel. Metrics: the config sync
//! latency (change seen -> maps written), the applied generation, rejected
//! objects by kind and reason, build info, and on each scrape the kernel's own
//! counters (connections per service and backend, redirection) and map
//! occupancy (see `counters`).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tracing::info;

use crate::{
    kernel::counters::View,
    model::{Diagnostic, Severity},
};

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
    /// Labels for the kernel counters (see `kernel::counters::Connections`).
    pub view: Arc<std::sync::RwLock<View>>,
    ready: AtomicBool,
}

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
            view,
            ready: AtomicBool::new(false),
        })
    }

    /// One apply: its latency in seconds and generation; the agent is ready from the first.
    pub fn applied(&self, latency_seconds: f64, generation: u64) {
        self.sync_latency.observe(latency_seconds);
        self.generation
            .set(i64::try_from(generation).unwrap_or(i64::MAX));
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

/// Serves on `addr` in the background; returns the bound address (port 0 picks one).
pub async fn serve(addr: SocketAddr, telemetry: Arc<Telemetry>) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(|State(t): State<Arc<Telemetry>>| async move {
                if t.ready.load(Ordering::Relaxed) {
                    (StatusCode::OK, "ready\n")
                } else {
                    (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "waiting for the first sync\n",
                    )
                }
            }),
        )
        .route(
            "/metrics",
            get(|State(t): State<Arc<Telemetry>>| async move { t.render() }),
        )
        .with_state(telemetry);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("metrics server: {e}");
        }
    });
    info!(addr = %bound, "metrics listening");
    Ok(bound)
}
