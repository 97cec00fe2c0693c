//! The agent's loop: a source's events into the index; on each change,
//! validate, compile and apply; the programs attached after the first full sync.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use tracing::{debug, error, info, warn};

use crate::{
    compile::{
        self, Compiler, ServiceAddr,
        gateway::{self, RouterAddrs, Serve},
    },
    index::Index,
    kernel::{
        apply::{Applier, ApplyError, Hold},
        counters::{Connections, SockStats},
        loader, own_cgroup,
        pin::PinDir,
        record::{self, AgentRecord, GatewayRecord, ServiceRecords},
        scope::{PodScope, Scope},
    },
    model::{Diagnostic, Severity},
    router::Router,
    source::{self, Event, SourceSpec},
    telemetry::Telemetry,
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
    /// Map capacities other than the object's.
    pub map_capacity: loader::MapCapacities,
    /// Who may read /metrics.
    pub metrics_auth: crate::telemetry::auth::MetricsAuth,
    /// Which sockets the mesh takes.
    pub scope: Scope,
    /// The cgroup whose processes' connects to gateway ports are translated
    /// (the node's processes); `None`: no gateway.
    pub gateway_cgroup: Option<PathBuf>,
    /// gateway-tc: the devices whose outside clients the gateway serves in tc
    /// (with a gateway only).
    pub gateway_devices: crate::kernel::ingress::Devices,
    /// The `SO_MARK` of the router's connections to backends, which joins
    /// them to backends on this node by the shortcut; 0: not joined.
    pub router_mark: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    #[error("serving metrics: {0}")]
    Metrics(#[from] std::io::Error),
    #[error("starting the record's writer: {0}")]
    Record(#[source] std::io::Error),
    #[error(transparent)]
    Source(#[from] source::SourceError),
}

/// How often replaced tables are freed and failed writes retried.
const TICK: Duration = Duration::from_secs(1);

/// Loads the object (adopting what a previous agent pinned), then keeps the kernel
/// in step with the source until `shutdown` resolves. The programs are attached
/// (or swapped) only after the first full sync is in the maps, and stay attached
/// when the agent exits: `mesh-agent cleanup` removes them.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), AgentError> {
    info!(
        version = env!("CARGO_PKG_VERSION"),
        source = ?config.source,
        cgroup = %config.cgroup.display(),
        pins = %config.pin_dir.display(),
        "mesh-agent starting"
    );
    let object = loader::object_bytes(config.ebpf_object.as_deref())?;
    let pins = PinDir::new(&config.pin_dir);
    pins.prepare().map_err(loader::LoadError::from)?;
    let _lock = pins.lock().map_err(loader::LoadError::from)?;
    let (mut loaded, maps, sock_stats) = loader::load(&pins, &object, &config.map_capacity)?;
    // Before the first dial of the API server: the agent must reach it the way
    // kube-proxy routes it, never through tables only it can repair.
    let pods = set_scope(&mut loaded, &config.scope, &config.cgroup)?;
    if config.gateway_cgroup.is_some() {
        // The gateway translates connects made in the agent's own network
        // namespace: the node's (a DaemonSet on the host network).
        match crate::kernel::netns::cookie_here() {
            Ok(cookie) => loaded.set_gateway_netns(cookie)?,
            Err(e) => warn!(
                "cannot read the node's network namespace cookie; the gateway's connect hooks stay off: {e}"
            ),
        }
    }
    // gateway-tc: the gateway's clients outside the node, on these devices.
    let devices = if config.gateway_cgroup.is_some() {
        config.gateway_devices.resolve()
    } else {
        Vec::new()
    };
    let outside = if devices.is_empty() {
        None
    } else {
        info!(devices = ?devices, "the gateway serves clients outside the node on these devices (tc)");
        crate::kernel::ingress::warn_if_not_forwarding();
        let (vips, maglev) = loaded.take_gateway_maps()?;
        Some(crate::kernel::ingress::Outside::new(
            Box::new(vips),
            Box::new(maglev),
            Instant::now(),
        ))
    };
    let own_cgroup = match own_cgroup::current() {
        Ok(own) => {
            loaded.set_agent_cgroup(own.id)?;
            info!(cgroup = %own.path.display(), id = own.id, "the agent's own connects bypass the mesh");
            Some(own.path)
        }
        Err(e) => {
            warn!(
                error = %e,
                "cannot find the agent's own cgroup; its connects go through the mesh it programs"
            );
            None
        }
    };
    let mut applier = Applier::new(maps);
    let adopted = applier.adopt(Instant::now());
    info!(
        pins = %config.pin_dir.display(),
        services = adopted.services,
        backends = adopted.backends,
        stray_slots = adopted.stray_slots,
        "kernel object loaded; pinned state adopted"
    );
    let sock_stats = Arc::new(sock_stats);
    let view = Arc::new(RwLock::new(applier.view()));
    let connections = Arc::new(
        Connections::open(&pins, view.clone())
            .map_err(|(name, source)| loader::LoadError::Map { name, source })?,
    );
    let object_label = config
        .ebpf_object
        .as_ref()
        .map_or_else(|| "embedded".to_owned(), |p| p.display().to_string());
    let (router_mark, shortcut) = router_shortcut(&config, own_cgroup.as_deref());
    if let Some(mark) = router_mark {
        loaded.set_router_mark(mark)?;
    }
    let router = config
        .gateway_cgroup
        .is_some()
        .then(|| Router::with_mark(router_mark));
    let mut collectors: Vec<Box<dyn prometheus_client::collector::Collector>> =
        vec![Box::new(sock_stats.clone()), Box::new(connections.clone())];
    if let Some(router) = &router {
        collectors.push(Box::new(crate::telemetry::RouterRequests(
            router.stats_handle(),
        )));
    }
    if outside.is_some() {
        match crate::kernel::ingress::GatewayCounters::open(&pins) {
            Ok(counters) => collectors.push(Box::new(counters)),
            Err(e) => warn!("the gateway's tc counters are not in /metrics: {e}"),
        }
    }
    let outlier_backends = crate::telemetry::OutlierBackends::default();
    collectors.push(Box::new(outlier_backends.clone()));
    let telemetry = Telemetry::new(collectors, view, &object_label);
    if let Some(addr) = config.metrics_addr {
        let auth = match config.metrics_auth {
            crate::telemetry::auth::MetricsAuth::None => None,
            crate::telemetry::auth::MetricsAuth::Kubernetes => {
                let options = match &config.source {
                    SourceSpec::Kubernetes(options) => options.clone(),
                    SourceSpec::File(_) => Default::default(),
                };
                let client = source::kubernetes::client(&options)
                    .await
                    .map_err(source::SourceError::from)?;
                Some(Arc::new(crate::telemetry::auth::Authorizer::new(client)))
            }
        };
        crate::telemetry::serve(addr, telemetry.clone(), auth).await?;
    }
    let mut source = source::start(&config.source).await?;
    let mut reconciler = Reconciler {
        index: Index::default(),
        record: AgentRecord {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            cgroup: config.cgroup.clone(),
            own_cgroup: own_cgroup.clone(),
            redirect: config.redirect,
            pin_dir: config.pin_dir.clone(),
            ..Default::default()
        },
        record_writer: record::Writer::start(config.run_dir.clone()).map_err(AgentError::Record)?,
        applier,
        reported: BTreeSet::new(),
        generation: 0,
        compile: compile::Config {
            sockops: config.redirect,
            ..config.compile.clone()
        },
        compiler: Compiler::default(),
        recompile_all: false,
        record_rebuild: Rebuild::default(),
        record_services: ServiceRecords::default(),
        counted_addrs: BTreeSet::new(),
        failures: BTreeSet::new(),
        holding: false,
        pods,
        telemetry,
        attach: Some(PendingAttach {
            loaded,
            cgroup: config.cgroup.clone(),
            redirect: config.redirect,
            sock_stats: sock_stats.clone(),
            gateway: config.gateway_cgroup.clone(),
            router: router_mark.and(own_cgroup.clone()),
            devices,
        }),
        shortcut,
        outside,
        gateway: router,
        router_addrs: BTreeMap::new(),
        outlier: match crate::kernel::backend_counters::Watched::open(&pins) {
            Ok(map) => Some(map),
            Err(e) => {
                warn!("outlier detection is off: {e}");
                None
            }
        },
        detector: crate::outlier::Detector::default(),
        active: match crate::kernel::backend_counters::Active::open(&pins) {
            Ok(map) => Some(map),
            Err(e) => {
                warn!("LEAST_REQUEST balances at random: {e}");
                None
            }
        },
        outlier_backends,
    };
    let mut tick = tokio::time::interval(TICK);
    let mut synced = false;
    tokio::pin!(shutdown);
    let result = loop {
        reconciler.telemetry.beat();
        tokio::select! {
            _ = &mut shutdown => break Ok(()),
            _ = tick.tick() => if synced { reconciler.tick() },
            update = source.updates.recv() => {
                let Some(first) = update else { break Ok(()) };
                let seen = first.seen;
                let mut changed = false;
                // Take everything already queued: one reconcile per burst.
                let mut next = Some(first);
                while let Some(update) = next {
                    synced |= update.event == Event::Synced;
                    changed |= reconciler.index.apply_event(update.event);
                    next = source.updates.try_recv().ok();
                }
                if synced && (changed || reconciler.generation == 0) {
                    match reconciler.reconcile(seen) {
                        Ok(new) => {
                            if let Some(reporter) = &source.reporter {
                                reporter.report(&new);
                            }
                        }
                        Err(e) => break Err(e),
                    }
                }
            }
        }
    };
    reconciler.flush(true);
    reconciler.record_writer.finish();
    log_counters(&connections, &sock_stats);
    // gateway-tc: the outside clients' counters.
    if reconciler.outside.is_some() {
        crate::kernel::ingress::log_stats(&pins);
    }
    info!("exiting; programs and maps stay pinned (mesh-agent cleanup removes them)");
    result
}

/// Tells the kernel which sockets are meshed (before anything is attached);
/// with the pods' scope, returns its writer and this node's name.
fn set_scope(
    loaded: &mut loader::Loaded,
    scope: &Scope,
    cgroup: &std::path::Path,
) -> Result<Option<(String, PodScope)>, AgentError> {
    match scope {
        Scope::Cgroup => {
            loaded.set_mesh_scope(mesh_common::MeshScope {
                mode: mesh_common::scope::CGROUP,
                _pad: 0,
            })?;
            info!(cgroup = %cgroup.display(), "mesh scope: every process in the cgroup");
            Ok(None)
        }
        Scope::Pods { node } => {
            loaded.set_mesh_scope(mesh_common::MeshScope {
                mode: mesh_common::scope::PODS,
                _pad: 0,
            })?;
            info!(%node, pods = %cgroup.display(), "mesh scope: pods of mesh namespaces on this node");
            let map = Box::new(loaded.take_meshed_pods()?);
            Ok(Some((node.clone(), PodScope::new(map, cgroup.to_owned()))))
        }
    }
}

/// What the first successful apply attaches.
struct PendingAttach {
    loaded: loader::Loaded,
    cgroup: PathBuf,
    redirect: bool,
    sock_stats: Arc<SockStats>,
    gateway: Option<PathBuf>,
    /// The agent's own cgroup, for the router's sockops (`None`: not joined).
    router: Option<PathBuf>,
    /// gateway-tc: the gateway devices.
    devices: Vec<String>,
}

impl std::fmt::Debug for PendingAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAttach")
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

/// index -> compile -> apply, and the bookkeeping around it.
#[derive(Debug)]
struct Reconciler {
    index: Index,
    applier: Applier,
    reported: BTreeSet<Diagnostic>,
    generation: u64,
    compile: compile::Config,
    /// The compiled state, kept up to date with the index (and kept to
    /// retry failed writes).
    compiler: Compiler,
    /// Something compile reads beside the index changed (the ejected
    /// backends): the next compile redoes every Service.
    recompile_all: bool,
    /// The record: made whole, deferred when that costs more than an
    /// apply ([`Rebuild`]), written by a thread of its own.
    record_rebuild: Rebuild,
    record_writer: record::Writer,
    /// The record's services, following the compiled tables by change.
    record_services: ServiceRecords,
    /// The tables whose backends' open connections the kernel counts.
    counted_addrs: BTreeSet<ServiceAddr>,
    /// What the last apply could not write (each logged once, retried each tick).
    failures: BTreeSet<String>,
    /// Whether the last apply kept tables from the start ([`Hold`]).
    holding: bool,
    /// With the pods' scope: this node's name and the meshed pods' writer.
    pods: Option<(String, PodScope)>,
    telemetry: Arc<Telemetry>,
    /// Until the first apply: the programs to attach once the maps are full.
    attach: Option<PendingAttach>,
    /// What `status`, `dump` and `explain` read (its services are made
    /// from the compiled state when it is written).
    record: AgentRecord,
    /// The gateway's HTTP router (`None`: no gateway).
    gateway: Option<Router>,
    /// Where the router listens, per gateway port.
    router_addrs: BTreeMap<u16, RouterAddrs>,
    /// Whether the router is joined to local backends, for the records.
    shortcut: String,
    /// gateway-tc: the writer of the outside clients' tables (`None`: no
    /// gateway device).
    outside: Option<crate::kernel::ingress::Outside>,
    /// Outlier detection: the kernel's counts (`None`: the map could not be
    /// opened) and the decisions made from them.
    outlier: Option<crate::kernel::backend_counters::Watched>,
    detector: crate::outlier::Detector,
    /// LEAST_REQUEST: the backends whose open connections the kernel counts.
    active: Option<crate::kernel::backend_counters::Active>,
    /// What `/metrics` shows of the detector.
    outlier_backends: crate::telemetry::OutlierBackends,
}

impl Reconciler {
    /// Validates, compiles and applies the index as it is now. `seen` is when the
    /// change that led here was seen (the propagation latency is measured from
    /// it). Returns the diagnostics that are new since the last round; fails only
    /// if the programs cannot be attached after the first apply.
    fn reconcile(&mut self, seen: Instant) -> Result<Vec<Diagnostic>, AgentError> {
        self.generation += 1;
        let mut diagnostics: Vec<Diagnostic> = self.index.source_diagnostics().cloned().collect();
        diagnostics.extend(self.index.revalidate(&self.compile.cluster_domain));
        let mut changes = self.index.take_changes();
        changes.all |= std::mem::take(&mut self.recompile_all);
        let compile_started = Instant::now();
        let mut delta = self.compiler.update(&self.index, &self.compile, changes);
        let compile_us = compile_started.elapsed().as_micros() as u64;
        diagnostics.extend(self.compiler.compiled().diagnostics.iter().cloned());
        delta.addrs.extend(self.serve_gateways(&mut diagnostics));
        self.record_services.sync(
            &self.compiler.compiled().services,
            (!delta.all).then_some(&delta.addrs),
        );
        self.watch_outliers();
        self.count_open_connections(&delta);
        let new = report(&diagnostics, &mut self.reported);
        // Before the first attach: the pods meshed from the first connect on.
        if let (Some((node, pods)), true) = (&mut self.pods, delta.pods) {
            pods.set(compile::scope::meshed_pods(&self.index, node));
            self.record.scope = Some(pods.record());
        }
        self.apply(seen, compile_us, &delta)?;
        self.telemetry.set_rejected(&diagnostics);
        self.record.generation = self.generation;
        self.record.applied_at_ms = crate::kernel::record::now_ms();
        self.record_rebuild.pending = true;
        self.flush(false);
        self.telemetry
            .applied(seen.elapsed().as_secs_f64(), self.generation);
        Ok(new)
    }

    /// Brings the metrics' view up to date (what changed only), and
    /// writes the record if it is due ([`Rebuild::due`]; `force`: if
    /// pending at all).
    fn flush(&mut self, force: bool) {
        if let Ok(mut view) = self.telemetry.view.write() {
            self.applier.refresh_view(&mut view);
        }
        if self.record_rebuild.due(force) {
            let started = Instant::now();
            self.write_record();
            self.record_rebuild.done(started);
            debug!(took_us = started.elapsed().as_micros(), "record made");
        }
    }

    /// The gateway ports: the router serves the tables that need it, then
    /// each port's kernel tables (its routes, or the router's listener) join
    /// the services. Without a gateway, Gateways are reported as not served.
    fn serve_gateways(&mut self, diagnostics: &mut Vec<Diagnostic>) -> Vec<ServiceAddr> {
        let Some(router) = &mut self.gateway else {
            self.record.gateways.clear();
            return Vec::new();
        };
        let compiled = self.compiler.compiled();
        let tables: Vec<_> = compiled
            .gateways
            .iter()
            .filter_map(|p| match &p.serve {
                Serve::Router { table } => Some(table.clone()),
                _ => None,
            })
            .collect();
        match router.update(tables) {
            Ok(addrs) => {
                // The node's own processes dial the router on loopback.
                let local = |a: std::net::SocketAddr| {
                    let ip = match a.ip() {
                        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                    };
                    std::net::SocketAddr::new(ip, a.port())
                };
                self.router_addrs = addrs
                    .into_iter()
                    .map(|(port, l)| {
                        (
                            port,
                            RouterAddrs {
                                v4: Some(local(l.v4)),
                                v6: l.v6.map(local),
                            },
                        )
                    })
                    .collect();
            }
            // Not an object's fault: logged each time (the ports keep the
            // listeners they had).
            Err(e) => error!("the gateway's router: {e}"),
        }
        let node = node_addresses();
        // gateway-tc: the outside clients' Maglev tables, before the attach.
        if let Some(outside) = &mut self.outside {
            let ports = gateway::outside_ports(&compiled.gateways, &node, &self.router_addrs);
            for e in outside.update(&ports, &node, Instant::now()) {
                error!("{e}");
            }
        }
        for p in &compiled.gateways {
            if let (Some(who), Some(server)) = (bound_elsewhere(p.port), p.servers.first()) {
                diagnostics.push(Diagnostic::warning(
                    &server.object(),
                    format!("spec.servers[{}].port.number", server.index),
                    format!("port {} is also bound on the node by {who}: the node's own connects to it go to the gateway, others reach that process", p.port),
                ));
            }
        }
        let plans = gateway::service_plans(
            &compiled.gateways,
            &node,
            &self.router_addrs,
            self.compile.max_slots,
        );
        self.record.gateways = compiled
            .gateways
            .iter()
            .map(|p| {
                let mut record = GatewayRecord::of(p, self.router_addrs.get(&p.port));
                if matches!(p.serve, Serve::Router { .. }) {
                    record.shortcut = Some(self.shortcut.clone());
                }
                record
            })
            .collect();
        for (addr, plan) in self.compiler.add_others(plans) {
            let gateway =
                crate::model::ObjectRef::new(crate::model::Kind::Gateway, plan.service.clone());
            diagnostics.push(Diagnostic::error(
                &gateway,
                "spec.servers",
                format!("{addr} is also a Service's address; the Service keeps it"),
            ));
        }
        self.compiler.others().iter().copied().collect()
    }

    /// What `status`, `dump` and `explain` read, to the writer's thread.
    /// Its services are made from the compiled tables for the write only: at
    /// 10 000 services they are megabytes.
    fn write_record(&mut self) {
        self.record_writer.submit(AgentRecord {
            services: self.record_services.snapshot(),
            ..self.record.clone()
        });
    }

    /// Follows the services compile says outlier detection watches: their
    /// backends get kernel counters.
    fn watch_outliers(&mut self) {
        self.detector
            .watch(&self.compiler.compiled().outlier, Instant::now());
        if let Some(map) = &mut self.outlier {
            for (backend, e) in map.sync(&self.detector.watched()) {
                warn!(%backend, "outlier detection cannot watch the backend: {e}");
            }
        }
    }

    /// LEAST_REQUEST and maxConnections: the kernel counts the open
    /// connections of the backends of such service ports.
    fn count_open_connections(&mut self, delta: &compile::Delta) {
        let compiled = self.compiler.compiled();
        let counts = |p: &compile::ServicePlan| {
            p.least_request || p.socket.is_some_and(|s| s.max_connections > 0)
        };
        // Only a table that counts (or counted: it is in the live set) can
        // change what is counted.
        let touched = delta.all
            || delta.addrs.iter().any(|a| {
                compiled.services.get(a).is_some_and(counts) || self.counted_addrs.contains(a)
            });
        if !touched {
            return;
        }
        self.counted_addrs = compiled
            .services
            .iter()
            .filter(|(_, p)| counts(p))
            .map(|(a, _)| *a)
            .collect();
        let counted: BTreeSet<crate::compile::BackendAddr> = compiled
            .services
            .values()
            .filter(|p| p.least_request || p.socket.is_some_and(|s| s.max_connections > 0))
            .flat_map(|p| p.slots.iter().flatten().copied())
            .collect();
        if let Some(active) = &mut self.active {
            for (backend, e) in active.sync(&counted) {
                warn!(%backend, "cannot count the backend's open connections: {e}");
            }
        }
    }

    /// Reads the kernel's connect counts of watched backends; when an ejection
    /// or a return changes what the tables hold, compiles and applies again.
    fn judge_outliers(&mut self) {
        let Some(map) = &self.outlier else {
            return;
        };
        if self.detector.is_empty() {
            return;
        }
        let now = Instant::now();
        let counts = map.read();
        let changed = self.detector.judge(now, &counts);
        let records = self.detector.records(now, &counts);
        if let Ok(mut shown) = self.outlier_backends.0.write() {
            *shown = records.clone();
        }
        if self.record.outliers != records {
            self.record.outliers = records;
            self.write_record();
        }
        if !changed {
            return;
        }
        let ejected = self.detector.ejected();
        for (pool, backends) in &ejected {
            for b in backends {
                if !self
                    .compile
                    .ejected
                    .get(pool)
                    .is_some_and(|s| s.contains(b))
                {
                    warn!(%pool, backend = %b, "outlier detection ejected a backend: failed connects in a row");
                }
            }
        }
        self.compile.ejected = ejected;
        self.recompile_all = true;
        if let Err(e) = self.reconcile(now) {
            error!("{e}");
        }
    }

    /// Once a second: free replaced tables, and retry writes that failed.
    fn tick(&mut self) {
        self.judge_outliers();
        self.applier.collect_garbage(Instant::now());
        if let Some(outside) = &mut self.outside {
            outside.collect_garbage(Instant::now());
        }
        if let Some((_, pods)) = &mut self.pods {
            pods.retry();
            let scope = Some(pods.record());
            if self.record.scope != scope {
                self.record.scope = scope;
                self.write_record();
            }
        }
        if !self.failures.is_empty() {
            // Attaching is done by now: this cannot fail.
            let every = compile::Delta {
                all: true,
                ..Default::default()
            };
            if let Err(e) = self.apply(Instant::now(), 0, &every) {
                error!("{e}");
            }
        }
        self.flush(false);
    }

    /// Writes `desired` to the kernel, attaches the programs after the first
    /// write (so that from "config applied" on the kernel routes by this
    /// configuration), and reports what could not be written.
    fn apply(
        &mut self,
        seen: Instant,
        compile_us: u64,
        delta: &compile::Delta,
    ) -> Result<(), AgentError> {
        let apply_started = Instant::now();
        let desired = self.compiler.compiled();
        // An unavailable or broken source is not an empty one: tables the kernel
        // held at start stay until the source can say what replaces them.
        let hold = Hold {
            undecided: &desired.undecided,
            absent: self.index.source_has_errors() || self.index.is_empty(),
        };
        // While tables from the start are held, every apply looks at all of
        // them: the change that makes the source whole may touch none.
        let whole = delta.all || self.holding;
        let result = self.applier.apply(
            &desired.services,
            (!whole).then_some(&delta.addrs),
            hold,
            apply_started,
        );
        if result.held > 0 && !self.holding {
            warn!(
                held = result.held,
                "keeping service tables the kernel held at start: their objects are broken, undecided or absent in the source; they are replaced once valid versions arrive (mesh-agent cleanup empties the node)"
            );
        }
        self.holding = result.held > 0;
        let exclusion_errors = self.applier.apply_excluded(&desired.redirect_excluded);
        let apply_us = apply_started.elapsed().as_micros() as u64;
        attach_pending(&mut self.attach)?;
        let errors: Vec<&ApplyError> = result.errors.iter().chain(&exclusion_errors).collect();
        let now: BTreeSet<String> = errors.iter().map(ToString::to_string).collect();
        for e in now.difference(&self.failures) {
            error!("{e}");
        }
        for e in self.failures.difference(&now) {
            info!("resolved: {e}");
        }
        self.telemetry
            .apply_failed(errors.iter().map(|e| e.reason()), result.errors.len());
        self.telemetry.synced();
        self.failures = now;
        info!(
            generation = self.generation,
            services = self.applier.live_services(),
            written = result.written,
            removed = result.removed,
            held = result.held,
            redirect_excluded = desired.redirect_excluded.len(),
            changed = if delta.all {
                desired.services.len()
            } else {
                delta.addrs.len()
            },
            failed = errors.len(),
            compile_us,
            apply_us,
            elapsed_us = seen.elapsed().as_micros() as u64,
            "config applied"
        );
        Ok(())
    }
}

/// Something rebuilt whole after an apply (the record for `status`, `dump`
/// and `explain`): at once while that takes under
/// [`Rebuild::CHEAP`], else at most once per [`Rebuild::PERIOD`] or 50 times
/// what the last rebuild took, whichever is longer (and on the agent's tick),
/// so that a stream of small changes spends at most ~2% of its time
/// rewriting all of them: at 10 000 Services the record takes tens of
/// milliseconds, during which changes wait.
#[derive(Debug)]
struct Rebuild {
    /// Something changed since the last rebuild.
    pending: bool,
    /// How long the last rebuild took, and when it started.
    took: Duration,
    at: Instant,
}

impl Default for Rebuild {
    fn default() -> Self {
        Self {
            pending: false,
            took: Duration::ZERO,
            at: Instant::now(),
        }
    }
}

impl Rebuild {
    const CHEAP: Duration = Duration::from_millis(1);
    const PERIOD: Duration = Duration::from_millis(250);

    /// Whether to rebuild now (`force`: whenever something is pending).
    fn due(&self, force: bool) -> bool {
        self.pending
            && (force
                || self.took < Self::CHEAP
                || self.at.elapsed() >= Self::PERIOD.max(self.took * 50))
    }

    fn done(&mut self, started: Instant) {
        self.pending = false;
        self.took = started.elapsed();
        self.at = started;
    }
}

/// The kernel's counters, as the agent reads them (per-CPU values summed).
fn log_counters(connections: &Connections, redirect: &SockStats) {
    for (backend, connects) in connections.per_backend() {
        info!(backend = %backend.addr, proto = %backend.proto, connects, "backend connections");
    }
    let g = connections.global();
    info!(
        rewritten = g.rewritten,
        no_backend = g.no_backend,
        not_service = g.not_service,
        table_retry = g.table_retry,
        peer_rewritten = g.peer_rewritten,
        peer_rewritten_by_variant = g.peer_rewritten_by_variant,
        agent_bypassed = g.agent_bypassed,
        not_meshed = g.not_meshed,
        affinity_kept = g.affinity_kept,
        pool_overflow = g.pool_overflow,
        "connect counters"
    );
    let r = redirect.read();
    info!(
        sockets_added = r.sockets_added,
        socket_add_failures = r.socket_add_failures,
        redirected_messages = r.redirected_messages,
        redirected_bytes = r.redirected_bytes,
        fallback_messages = r.fallback_messages,
        fallback_bytes = r.fallback_bytes,
        excluded_sockets = r.excluded_sockets,
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
            pending.gateway.as_deref(),
            pending.router.as_deref(),
        )?;
        // gateway-tc: the gateway devices' tc programs (none: unpins any).
        for (device, program, how) in loader::attach_devices(&mut pending.loaded, &pending.devices)?
        {
            info!(program, %device, how = ?how, "gateway tc program");
        }
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

/// The router's mark, when its connections can be joined to backends on this
/// node (the shortcut on, the agent's cgroup known, the mark settable), and
/// what the records say about it.
fn router_shortcut(config: &Config, own_cgroup: Option<&std::path::Path>) -> (Option<u32>, String) {
    let not = |why: &str| {
        (
            None,
            format!("not joined to backends on this node by the shortcut: {why}"),
        )
    };
    if config.gateway_cgroup.is_none() {
        return not("no gateway");
    }
    if !config.redirect {
        return not("--no-redirect");
    }
    if config.router_mark == 0 {
        return not("--router-mark 0");
    }
    if own_cgroup.is_none() {
        return not("the agent's own cgroup is unknown");
    }
    if let Err(e) = crate::router::can_set_mark(config.router_mark) {
        warn!("the router's connections are not joined to backends on this node: SO_MARK: {e}");
        return not(&format!("SO_MARK cannot be set ({e})"));
    }
    let mark = config.router_mark;
    (
        Some(mark),
        format!("joined to backends on this node by the same-node shortcut (SO_MARK {mark:#x})"),
    )
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

/// The node's addresses a gateway port is served on, besides loopback: every
/// address of an interface of this network namespace (IPv6 link-local left
/// out: it needs a scope).
fn node_addresses() -> Vec<std::net::IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    let mut out: Vec<std::net::IpAddr> = addrs
        .filter_map(|a| a.address)
        .filter_map(|a| {
            if let Some(v4) = a.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6()
                    .map(|v6| std::net::IpAddr::V6(v6.ip()))
                    .filter(
                        |ip| !matches!(ip, std::net::IpAddr::V6(v6) if v6.is_unicast_link_local()),
                    )
            }
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether a process of this network namespace listens on TCP `port`
/// (`/proc/net/tcp{,6}`, state 0A): who, as the socket's inode.
fn bound_elsewhere(port: u16) -> Option<String> {
    let hex = format!("{port:04X}");
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            if *state == "0A" && local.rsplit(':').next() == Some(hex.as_str()) {
                return Some(format!("a listening socket (inode {inode}, {table})"));
            }
        }
    }
    None
}
