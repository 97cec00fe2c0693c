//! The agent's main loop: source -> index -> compile -> apply, again on every change.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::{
    apply::Applier,
    compile::{self, Compiled},
    diag::{Diagnostic, Severity},
    index::Index,
    loader,
    model::ObjectRef,
    source::{SourceSpec, file::FileSource},
};

#[derive(Clone, Debug)]
pub struct Config {
    pub source: SourceSpec,
    pub cgroup: PathBuf,
    pub compile: compile::Config,
    /// Where to serve /healthz, /readyz and /metrics; `None`: nowhere.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Same-node socket redirection (sockops + sk_msg).
    pub redirect: bool,
    /// Our directory in bpffs (maps and links pinned there outlive the agent).
    pub pin_dir: PathBuf,
    /// Where the agent records what it applied, for `status`, `dump`, `explain`.
    pub run_dir: PathBuf,
    /// A kernel object to load instead of the embedded one.
    pub ebpf_object: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error("reading the number of possible CPUs: {0}")]
    Cpus(#[from] std::io::Error),
    #[error(transparent)]
    Kubernetes(#[from] crate::source::kubernetes::KubeError),
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// Loads the object (adopting what a previous agent pinned), then keeps the kernel
/// in step with the source until `shutdown` resolves. The programs are attached
/// (or swapped) only after the first full sync is in the maps, and stay attached
/// when the agent exits: `mesh-agent cleanup` removes them.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let object = loader::object_bytes(config.ebpf_object.as_deref())?;
    let pins = crate::pin::PinDir::new(&config.pin_dir);
    let (loaded, maps, sock_stats) = loader::load(&pins, &object)?;
    let mut applier = Applier::new(maps)?;
    let adopted = applier.adopt();
    info!(
        pins = %config.pin_dir.display(),
        services = adopted.services,
        backends = adopted.backends,
        stray_slots = adopted.stray_slots,
        "kernel object loaded; pinned state adopted"
    );
    let sock_stats = std::sync::Arc::new(sock_stats);
    let view = std::sync::Arc::new(std::sync::RwLock::new(applier.view()));
    let connections =
        crate::counters::Connections::open(&pins, view.clone()).map_err(|source| {
            loader::LoadError::Map {
                name: "SERVICE_STATS_V1 / BACKEND_STATS_V1",
                source,
            }
        })?;
    let object_label = config
        .ebpf_object
        .as_ref()
        .map_or_else(|| "embedded".to_owned(), |p| p.display().to_string());
    let telemetry = crate::telemetry::Telemetry::new(
        vec![Box::new(sock_stats.clone()), Box::new(connections)],
        view,
        &object_label,
    );
    if let Some(addr) = config.metrics_addr {
        crate::telemetry::serve(addr, telemetry.clone()).await?;
    }
    let mut reconciler = Reconciler {
        index: Index::default(),
        record: crate::record::AgentRecord {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cgroup: config.cgroup.clone(),
            redirect: config.redirect,
            pin_dir: config.pin_dir.clone(),
            ..Default::default()
        },
        run_dir: config.run_dir.clone(),
        applier,
        reported: BTreeSet::new(),
        generation: 0,
        compile: config.compile.clone(),
        desired: Compiled::default(),
        failed: false,
        telemetry,
        attach: Some(PendingAttach {
            loaded,
            cgroup: config.cgroup.clone(),
            redirect: config.redirect,
            sock_stats: sock_stats.clone(),
        }),
    };
    let result = match &config.source {
        SourceSpec::File(dir) => run_file(dir, &mut reconciler, shutdown).await,
        SourceSpec::Kubernetes(options) => {
            crate::source::kubernetes::run(options, &mut reconciler, shutdown).await
        }
    };
    log_counters(&reconciler.applier, &sock_stats.read());
    info!("exiting; programs and maps stay pinned (mesh-agent cleanup removes them)");
    result
}

/// What the first successful apply attaches.
struct PendingAttach {
    loaded: loader::Loaded,
    cgroup: PathBuf,
    redirect: bool,
    sock_stats: std::sync::Arc<crate::counters::SockStats>,
}

impl std::fmt::Debug for PendingAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAttach")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

/// index -> compile -> apply, and the bookkeeping around it; sources drive it.
#[derive(Debug)]
pub struct Reconciler {
    pub index: Index,
    applier: Applier,
    reported: BTreeSet<Diagnostic>,
    generation: u64,
    compile: compile::Config,
    /// The last compiled state (kept to retry failed writes).
    desired: Compiled,
    failed: bool,
    telemetry: std::sync::Arc<crate::telemetry::Telemetry>,
    /// Until the first apply: the programs to attach once the maps are full.
    attach: Option<PendingAttach>,
    /// What `status`, `dump` and `explain` read, and where.
    record: crate::record::AgentRecord,
    run_dir: PathBuf,
}

impl Reconciler {
    /// Validates, compiles and applies the index as it is now. `started` is when
    /// the change that led here was seen (the propagation latency is measured from
    /// it); `diagnostics` are the source's own.
    /// Returns the diagnostics that are new since the last round; fails only if the
    /// programs cannot be attached after the first apply.
    pub fn reconcile(
        &mut self,
        mut diagnostics: Vec<Diagnostic>,
        started: Instant,
    ) -> Result<Vec<Diagnostic>, AgentError> {
        self.generation += 1;
        diagnostics.extend(self.index.revalidate(&self.compile.cluster_domain));
        let compile_started = Instant::now();
        let compiled = compile::compile(&self.index, &self.compile);
        let compile_us = compile_started.elapsed().as_micros() as u64;
        diagnostics.extend(compiled.diagnostics.iter().cloned());
        let new = report(&diagnostics, &mut self.reported);
        self.desired = compiled;
        // The programs go on (first round) before "config applied": from that line
        // on the kernel routes by this configuration.
        let attach = &mut self.attach;
        self.failed = apply_logged(
            &mut self.applier,
            &self.desired,
            self.generation,
            started,
            compile_us,
            || attach_pending(attach),
        )?;
        self.telemetry.set_rejected(&diagnostics);
        if let Ok(mut view) = self.telemetry.view.write() {
            *view = self.applier.view();
        }
        self.record.generation = self.generation;
        self.record.applied_at_ms = crate::record::now_ms();
        self.record.services = crate::record::AgentRecord::services_from(&self.desired.services);
        if let Err(e) = self.record.write(&self.run_dir) {
            warn!(run_dir = %self.run_dir.display(), "cannot record the applied state: {e}");
        }
        self.telemetry
            .applied(started.elapsed().as_secs_f64(), self.generation);
        Ok(new)
    }

    /// Once a second: free replaced tables, and retry writes that failed.
    pub fn tick(&mut self) {
        self.applier.collect_garbage();
        if self.failed {
            self.failed = apply_logged(
                &mut self.applier,
                &self.desired,
                self.generation,
                Instant::now(),
                0,
                || Ok(()),
            )
            .unwrap_or(true);
        }
    }

    pub fn cluster_domain(&self) -> &str {
        &self.compile.cluster_domain
    }
}

async fn run_file(
    dir: &std::path::Path,
    reconciler: &mut Reconciler,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    let mut source = FileSource::new(dir);
    let (tx, mut changes) = mpsc::channel::<()>(1);
    let _watcher = watch(dir, tx)?;
    let mut gc = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    let mut started = Instant::now();
    loop {
        let snapshot = source.load();
        sync_index(&mut reconciler.index, &snapshot.objects);
        reconciler.reconcile(snapshot.diagnostics, started)?;
        // Wait for a change, collecting bursts (an editor writes a file in steps).
        loop {
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = gc.tick() => reconciler.tick(),
                Some(()) = changes.recv() => {
                    started = Instant::now();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    while changes.try_recv().is_ok() {}
                    debug!("source changed");
                    break;
                }
            }
        }
    }
}

/// The kernel's counters, as the agent reads them (per-CPU values summed).
fn log_counters(applier: &Applier, redirect: &crate::counters::RedirectCounts) {
    for ((backend, proto), connects) in applier.backend_connects() {
        info!(backend = %backend, proto = %proto, connects, "backend connections");
    }
    let g = applier.global_stats();
    let at = |i: u32| g.get(i as usize).copied().unwrap_or(0);
    use mesh_common::global_stat as gs;
    info!(
        rewritten = at(gs::REWRITTEN),
        no_backend = at(gs::NO_BACKEND),
        not_service = at(gs::NOT_SERVICE),
        table_retry = at(gs::TABLE_RETRY),
        peer_rewritten = at(gs::PEER_REWRITTEN),
        peer_rewritten_by_variant = at(gs::PEER_REWRITTEN_BY_VARIANT),
        "connect counters"
    );
    info!(
        sockets_added = redirect.sockets_added,
        socket_add_failures = redirect.socket_add_failures,
        redirected_messages = redirect.redirected_messages,
        redirected_bytes = redirect.redirected_bytes,
        fallback_messages = redirect.fallback_messages,
        fallback_bytes = redirect.fallback_bytes,
        excluded_sockets = redirect.excluded_sockets,
        "redirect counters"
    );
}

/// Attaches the programs once, after the first apply filled the maps.
fn attach_pending(attach: &mut Option<PendingAttach>) -> Result<(), AgentError> {
    if let Some(mut pending) = attach.take() {
        let linked = loader::attach(
            &mut pending.loaded,
            &pending.cgroup,
            pending.redirect,
            pending.sock_stats.socket_map(),
        )?;
        let cgroup = pending.cgroup.display();
        for (program, how) in linked {
            match how {
                loader::Linked::Attached => info!(program, %cgroup, "program attached"),
                loader::Linked::Unchanged => info!(program, %cgroup, "program unchanged"),
                loader::Linked::Detached => info!(program, %cgroup, "program detached"),
                loader::Linked::Swapped { from, to } => info!(
                    program,
                    %cgroup,
                    from = format!("{from:016x}"),
                    to = format!("{to:016x}"),
                    "program swapped"
                ),
            }
        }
    }
    Ok(())
}

/// Applies, runs `then` (the first attach), and logs; returns whether any service
/// failed to apply.
fn apply_logged(
    applier: &mut Applier,
    desired: &Compiled,
    generation: u64,
    started: Instant,
    compile_us: u64,
    then: impl FnOnce() -> Result<(), AgentError>,
) -> Result<bool, AgentError> {
    let apply_started = Instant::now();
    let result = applier.apply(&desired.services);
    for e in &result.errors {
        error!("{e}");
    }
    let exclusion_errors = applier.apply_excluded(&desired.redirect_excluded);
    for e in &exclusion_errors {
        error!("{e}");
    }
    let apply_us = apply_started.elapsed().as_micros() as u64;
    then()?;
    info!(
        generation,
        services = applier.live_services(),
        written = result.written,
        removed = result.removed,
        redirect_excluded = desired.redirect_excluded.len(),
        failed = result.errors.len() + exclusion_errors.len(),
        compile_us,
        apply_us,
        elapsed_us = started.elapsed().as_micros() as u64,
        "config applied"
    );
    Ok(!result.errors.is_empty() || !exclusion_errors.is_empty())
}

/// Makes the index hold exactly `objects`.
fn sync_index(index: &mut Index, objects: &[(String, crate::model::Resource)]) {
    let present: BTreeSet<ObjectRef> = objects.iter().map(|(_, o)| o.object_ref()).collect();
    for gone in index
        .object_refs()
        .into_iter()
        .filter(|r| !present.contains(r))
    {
        index.delete(&gone);
    }
    for (origin, object) in objects {
        index.apply(origin, object.clone());
    }
}

/// Logs diagnostics that are new since the last round (each once, not every
/// round), and returns them.
fn report(diagnostics: &[Diagnostic], reported: &mut BTreeSet<Diagnostic>) -> Vec<Diagnostic> {
    let now: BTreeSet<Diagnostic> = diagnostics.iter().cloned().collect();
    let new: Vec<Diagnostic> = now.difference(reported).cloned().collect();
    for d in &new {
        match d.severity {
            Severity::Error => error!("{d}"),
            Severity::Warning => warn!("{d}"),
        }
    }
    *reported = now;
    new
}

fn watch(
    dir: &std::path::Path,
    tx: mpsc::Sender<()>,
) -> Result<notify::RecommendedWatcher, AgentError> {
    use notify::Watcher as _;
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // A full channel already means "reload pending".
            let _ = tx.try_send(());
        }
    })
    .map_err(|source| AgentError::Watch {
        path: dir.to_owned(),
        source,
    })?;
    watcher
        .watch(dir, notify::RecursiveMode::Recursive)
        .map_err(|source| AgentError::Watch {
            path: dir.to_owned(),
            source,
        })?;
    Ok(watcher)
}
