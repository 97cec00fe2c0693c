//! The Kubernetes source: kube-rs watchers on Services, Pods, EndpointSlices
//! (discovery.k8s.io/v1, else v1beta1), VirtualServices and DestinationRules (networking.istio.io,
//! whichever version the server prefers), and the mesh's Namespaces. Objects are
//! converted at this boundary and fed to the same index, compile and apply as the
//! file source. Nothing is written to the kernel before every watcher has listed
//! once, so a start never publishes a half-empty table; while the API server is away
//! the kernel keeps the last good state and the watchers retry with backoff. The
//! Istio kinds are discovered again and again (backoff) until the server serves
//! them, so CRDs installed after the agent, or an API server down at start, only
//! delay the first sync.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::PathBuf,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Namespace, Node, ObjectReference, Pod, Service},
        discovery::v1::EndpointSlice,
        events::v1::Event as KubeEvent,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, PostParams},
    runtime::{WatchStreamExt as _, utils::Backoff as _, watcher},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Event, Invalid, Sourced, Update, UpdateSender};
use crate::model::{
    Diagnostic, Kind, ObjectRef, Resource, Severity,
    convert::{ConvertError, Document},
    istio,
};

/// Where objects come from, as recorded in diagnostics.
pub const ORIGIN: &str = "kubernetes";

/// Who records our Events (`reportingController`).
const CONTROLLER: &str = "mesh-agent";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// A kubeconfig file; else `KUBECONFIG`, `~/.kube/config`, or in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Label selector of the mesh's namespaces.
    pub namespace_selector: String,
    /// This node: its Node alone is watched, for its zone (compile's
    /// `Config::node_name` names the same). `None`: no Node is watched.
    pub node_name: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            namespace_selector: "istio-injection=enabled".to_owned(),
            node_name: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("reading kubeconfig {path}: {source}")]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("configuring the Kubernetes client: {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Why a discovered kind (Istio's, EndpointSlices) cannot be watched (yet).
#[derive(Debug, thiserror::Error)]
enum DiscoveryError {
    #[error("{group} {kind} not served; {hint}", group = group_of(*kind), hint = hint(*kind))]
    NotServed { kind: Kind },
    #[error("discovering {group} {kind}: {source}", group = group_of(*kind))]
    Failed { kind: Kind, source: kube::Error },
}

/// The API group of the kinds found through discovery.
fn group_of(kind: Kind) -> &'static str {
    match kind {
        Kind::VirtualService | Kind::DestinationRule | Kind::Gateway => istio::GROUP,
        Kind::EndpointSlice => ENDPOINT_SLICE_GROUP,
        Kind::Service | Kind::Pod | Kind::Node => "",
    }
}

fn hint(kind: Kind) -> &'static str {
    match kind {
        Kind::VirtualService | Kind::DestinationRule | Kind::Gateway => {
            "install the CRDs (manifests/crds) or Istio"
        }
        _ => "Kubernetes 1.17 or later serves it",
    }
}

const ENDPOINT_SLICE_GROUP: &str = "discovery.k8s.io";

/// The watched things the first reconcile waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Watched {
    Kind(Kind),
    Namespaces,
}

pub async fn client(options: &Options) -> Result<Client, KubeError> {
    let config = match &options.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(config)?)
}

/// Starts a watcher per kind (and one for the mesh namespaces); their updates go
/// to `tx`, followed by [`Event::Synced`] once every kind has been listed.
/// Returns the tasks (dropping them stops the watches) and the reporter of
/// rejections. Nothing here waits for the API server: it may be down, or lack
/// the Istio CRDs, and come right later.
pub async fn start(
    options: &Options,
    tx: UpdateSender,
) -> Result<(tokio::task::JoinSet<()>, Reporter), KubeError> {
    let client = client(options).await?;
    let (watch_tx, watch_rx) = mpsc::unbounded_channel();
    let seen = Seen::default();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(watch_typed::<Service>(
        client.clone(),
        watch_tx.clone(),
        Kind::Service,
        |o| Resource::Service(Arc::new(crate::model::service::Service::from(o))),
    ));
    let node = options.node_name.clone();
    tasks.spawn(watch_typed::<Pod>(
        client.clone(),
        watch_tx.clone(),
        Kind::Pod,
        move |o| {
            let pod = crate::model::pod::Pod::from(o);
            Resource::Pod(Arc::new(match &node {
                Some(node) => pod.trimmed_for(node),
                None => pod,
            }))
        },
    ));
    tasks.spawn(watch_endpoint_slices(client.clone(), watch_tx.clone()));
    tasks.spawn(watch_namespaces(
        client.clone(),
        watch_tx.clone(),
        options.namespace_selector.clone(),
    ));
    if let Some(node) = &options.node_name {
        tasks.spawn(watch_node(client.clone(), watch_tx.clone(), node.clone()));
    }
    for kind in [Kind::VirtualService, Kind::DestinationRule, Kind::Gateway] {
        tasks.spawn(watch_istio(
            client.clone(),
            watch_tx.clone(),
            kind,
            seen.clone(),
        ));
    }
    drop(watch_tx);
    let gate = SyncGate::new(options.node_name.is_some());
    tasks.spawn(forward(watch_rx, tx, gate));
    let instance = std::env::var("NODE_NAME")
        .ok()
        .or_else(|| nix::unistd::gethostname().ok()?.into_string().ok())
        .unwrap_or_else(|| CONTROLLER.to_owned());
    Ok((
        tasks,
        Reporter {
            client,
            instance,
            seen,
        },
    ))
}

/// Passes the watchers' updates on, and says [`Event::Synced`] once each of them
/// has listed once (nothing is written to the kernel before).
async fn forward(mut from: mpsc::UnboundedReceiver<Update>, to: UpdateSender, mut gate: SyncGate) {
    while let Some(update) = from.recv().await {
        let synced = gate.pass(&update.event);
        if to.send(update).is_err() || (synced && to.send(Update::now(Event::Synced)).is_err()) {
            return;
        }
    }
}

/// Which initial lists are still missing.
#[derive(Debug)]
struct SyncGate {
    waiting: BTreeSet<Watched>,
}

impl SyncGate {
    /// Waits for every kind; for Nodes only if this node's is watched.
    fn new(node: bool) -> Self {
        Self {
            waiting: Kind::ALL
                .into_iter()
                .filter(|&k| node || k != Kind::Node)
                .map(Watched::Kind)
                .chain([Watched::Namespaces])
                .collect(),
        }
    }

    /// Whether `event` completed the initial lists (true once).
    fn pass(&mut self, event: &Event) -> bool {
        let was_waiting = !self.waiting.is_empty();
        let listed = match event {
            Event::Relisted(kind) => self.waiting.remove(&Watched::Kind(*kind)),
            Event::Namespaces(_) => self.waiting.remove(&Watched::Namespaces),
            _ => false,
        };
        // Said when the set shrinks, not on every event that passes meanwhile.
        if listed && !self.waiting.is_empty() {
            info!(waiting = ?self.waiting, "waiting for the initial lists before the first write");
        }
        was_waiting && self.waiting.is_empty()
    }
}

/// The API version, uid and resourceVersion of an Istio object as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Version {
    api_version: String,
    uid: String,
    resource_version: String,
}

impl Version {
    fn of(api_version: &str, meta: &ObjectMeta) -> Self {
        Self {
            api_version: api_version.to_owned(),
            uid: meta.uid.clone().unwrap_or_default(),
            resource_version: meta.resource_version.clone().unwrap_or_default(),
        }
    }
}

/// What the Istio watchers last saw of each object, for the Events on it:
/// diagnostics name objects, Events name versions.
#[derive(Clone, Debug, Default)]
struct Seen(Arc<Mutex<BTreeMap<ObjectRef, Version>>>);

impl Seen {
    fn with<T>(&self, f: impl FnOnce(&mut BTreeMap<ObjectRef, Version>) -> T) -> T {
        // A panic elsewhere leaves a whole map behind: keep using it.
        f(&mut self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }

    fn get(&self, object: &ObjectRef) -> Option<Version> {
        self.with(|m| m.get(object).cloned())
    }

    fn set(&self, object: ObjectRef, version: Version) {
        self.with(|m| m.insert(object, version));
    }

    fn remove(&self, object: &ObjectRef) {
        self.with(|m| m.remove(object));
    }

    /// A relist of `kind`: afterwards exactly `listed` are known of it.
    fn relist(&self, kind: Kind, listed: Vec<(ObjectRef, Version)>) {
        self.with(|m| {
            m.retain(|o, _| o.kind != kind);
            m.extend(listed);
        });
    }
}

/// Publishes rejections as Kubernetes Events.
#[derive(Clone)]
pub struct Reporter {
    client: Client,
    /// This node (`reportingInstance`).
    instance: String,
    seen: Seen,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("instance", &self.instance)
            .finish_non_exhaustive()
    }
}

/// The longest Event note we send; the API server caps notes at 1 kB.
const NOTE_MAX: usize = 1000;

impl Reporter {
    /// A Warning Event on each Istio object newly rejected (reason `Rejected`, the
    /// field and what is wrong in the note), so `kubectl describe` shows it.
    /// Published in the background: the data plane never waits on the API server.
    ///
    /// Every node rejects the same versions, so the Event's name is derived from
    /// the object's uid, resourceVersion and the field: the first node creates it,
    /// the others (and this one again after a restart) get AlreadyExists and
    /// leave it. One Event per rejected version and field, for the whole cluster.
    pub fn report(&self, new: &[Diagnostic]) {
        for d in new {
            let Some(object) = d.object.as_ref().filter(|_| d.severity == Severity::Error) else {
                continue;
            };
            // Only Istio objects are tracked; one already deleted needs no Event.
            let Some(version) = self.seen.get(object) else {
                continue;
            };
            let note = if d.field.is_empty() {
                d.message.clone()
            } else {
                format!("{}: {}", d.field, d.message)
            };
            let event = rejected_event(object, &version, &d.field, note, &self.instance);
            let events = Api::<KubeEvent>::namespaced(self.client.clone(), &object.namespace);
            let object = object.to_string();
            tokio::spawn(async move {
                let name = event.metadata.name.clone().unwrap_or_default();
                match events.create(&PostParams::default(), &event).await {
                    Ok(_) => info!(%object, event = %name, "recorded a Warning Event"),
                    Err(kube::Error::Api(status)) if status.is_already_exists() => info!(
                        %object,
                        event = %name,
                        "Warning Event already recorded (by another node, or before a restart)"
                    ),
                    Err(e) => warn!("recording an Event on {object} failed: {e}"),
                }
            });
        }
    }
}

/// The Event saying this version of `object` is rejected at `field`.
fn rejected_event(
    object: &ObjectRef,
    version: &Version,
    field: &str,
    note: String,
    instance: &str,
) -> KubeEvent {
    KubeEvent {
        metadata: ObjectMeta {
            name: Some(event_name(&object.name, version, field)),
            namespace: Some(object.namespace.to_string()),
            ..Default::default()
        },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        type_: Some("Warning".to_owned()),
        reason: Some("Rejected".to_owned()),
        action: Some("Validate".to_owned()),
        note: Some(truncate(note, NOTE_MAX)),
        // With the uid, `kubectl describe` finds it (it selects on involvedObject.uid).
        regarding: Some(ObjectReference {
            api_version: Some(version.api_version.clone()),
            kind: Some(object.kind.to_string()),
            name: Some(object.name.to_string()),
            namespace: Some(object.namespace.to_string()),
            uid: Some(version.uid.clone()).filter(|u| !u.is_empty()),
            resource_version: Some(version.resource_version.clone()).filter(|v| !v.is_empty()),
            ..Default::default()
        }),
        reporting_controller: Some(CONTROLLER.to_owned()),
        // At most 128 characters (the API server's limit).
        reporting_instance: Some(instance.chars().take(128).collect()),
        ..Default::default()
    }
}

/// `<object name>.<16 hex digits>`, the digits a hash of uid, resourceVersion
/// and field: the same on every node, and a valid name (at most 253 characters).
fn event_name(object_name: &str, version: &Version, field: &str) -> String {
    let hash = fnv1a(&[&version.uid, &version.resource_version, field]);
    // Object names are DNS subdomains already; only the length needs care.
    let prefix: String = object_name.chars().take(253 - 17).collect();
    let prefix = prefix.trim_end_matches(['.', '-']);
    format!("{prefix}.{hash:016x}")
}

/// FNV-1a, 64 bits, over `parts` (each followed by a 0 byte): a hash that is the
/// same in every build and on every node, which std's hashers do not promise.
fn fnv1a(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in part.bytes().chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// At most `max` bytes of `s`, cut at a character boundary.
fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let cut = (0..=max)
            .rev()
            .find(|&i| s.is_char_boundary(i))
            .unwrap_or(0);
        s.truncate(cut);
    }
    s
}

/// The first wait after a failure (watch, list or discovery).
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// The longest: a CRD installed, or an API server back, is seen within this.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Exponential backoff from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], for the watchers
/// (reset by their first success) and discovery. Not kube's default: its jitter
/// stretches its 30 s cap to 60 s.
#[derive(Clone, Debug)]
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Backoff {
    fn delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(BACKOFF_MAX);
        // Up to a quarter less, at random, so that nodes cut off together (an
        // API server restart) do not come back in step.
        let random =
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), ());
        delay.mul_f64(1.0 - (random % 1024) as f64 / 4096.0)
    }
}

impl Iterator for Backoff {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.delay())
    }
}

impl kube::runtime::utils::Backoff for Backoff {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// Why a watcher stopped.
#[derive(Debug, PartialEq, Eq)]
enum Ended {
    /// The agent is gone.
    Closed,
    /// The API server does not serve this resource (404): discover it again.
    NotServed,
}

/// Whether a watch error says the resource is not served (a CRD deleted, or a
/// version gone), rather than that the server is away.
fn not_served(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s))
            if s.is_not_found()
    )
}

/// Runs a watcher with backoff until the resource is not served, turning its
/// events into updates: a relist is streamed from `Init` ([`Event::Relisting`])
/// to `InitDone` ([`Event::Relisted`]), never buffered. `track`: the Istio
/// kinds' versions, for their Events.
async fn watch_events<K, F>(
    api: Api<K>,
    config: watcher::Config,
    tx: &UpdateSender,
    kind: Kind,
    convert: F,
    track: Option<(&Seen, &str)>,
) -> Ended
where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: Fn(K) -> Result<Sourced, Box<Invalid>>,
{
    let mut stream = watcher(api, config).backoff(Backoff::default()).boxed();
    let mut listed = (0usize, 0usize);
    let mut listed_versions = Vec::new();
    let version = |object: &K| {
        let meta = object.meta();
        track.map(|(_, api_version)| {
            (
                ObjectRef::from_meta(kind, meta),
                Version::of(api_version, meta),
            )
        })
    };
    while let Some(event) = stream.next().await {
        let event = match event {
            Err(e) if not_served(&e) => return Ended::NotServed,
            Err(e) => {
                warn!(kind = %kind, "watch failed, retrying with backoff: {e}");
                continue;
            }
            Ok(watcher::Event::Init) => {
                listed = (0, 0);
                listed_versions.clear();
                Event::Relisting(kind)
            }
            Ok(watcher::Event::InitApply(object)) => {
                listed_versions.extend(version(&object));
                match convert(object) {
                    Ok(sourced) => {
                        listed.0 += 1;
                        Event::Applied(sourced)
                    }
                    Err(bad) => {
                        listed.1 += 1;
                        Event::Invalid(*bad)
                    }
                }
            }
            Ok(watcher::Event::InitDone) => {
                if let Some((seen, _)) = track {
                    seen.relist(kind, std::mem::take(&mut listed_versions));
                }
                // A relist (after 410 Gone, or a restart of the API server) is
                // worth a line: it replaces the kind whole.
                info!(kind = %kind, objects = listed.0, invalid = listed.1, "listed");
                Event::Relisted(kind)
            }
            Ok(watcher::Event::Apply(object)) => {
                if let (Some((seen, _)), Some((r, v))) = (track, version(&object)) {
                    seen.set(r, v);
                }
                match convert(object) {
                    Ok(sourced) => Event::Applied(sourced),
                    Err(bad) => Event::Invalid(*bad),
                }
            }
            Ok(watcher::Event::Delete(object)) => {
                let r = ObjectRef::from_meta(kind, object.meta());
                if let Some((seen, _)) = track {
                    seen.remove(&r);
                }
                Event::Deleted(r)
            }
        };
        if tx.send(Update::now(event)).is_err() {
            return Ended::Closed;
        }
    }
    // The stream of a watcher with backoff never ends; if it did, nothing to do.
    Ended::Closed
}

fn sourced(object: Resource) -> Sourced {
    Sourced {
        origin: ORIGIN.to_owned(),
        object,
    }
}

async fn watch_typed<K>(
    client: Client,
    tx: UpdateSender,
    kind: Kind,
    wrap: impl Fn(K) -> Resource + Send + 'static,
) where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + 'static,
    K::DynamicType: Default,
{
    let mut backoff = Backoff::default();
    loop {
        let ended = watch_events(
            Api::<K>::all(client.clone()),
            watcher::Config::default(),
            &tx,
            kind,
            |o| Ok(sourced(wrap(o))),
            None,
        )
        .await;
        if ended == Ended::Closed {
            return;
        }
        // Until it is served, this kind is not listed: no first write.
        let delay = backoff.delay();
        warn!(
            "{} {kind} not served by the API server; retrying in {delay:?}",
            K::api_version(&K::DynamicType::default())
        );
        tokio::time::sleep(delay).await;
    }
}

/// This node's Node alone (`metadata.name` field selector), trimmed to its
/// name and labels: its status heartbeats never reach the index.
async fn watch_node(client: Client, tx: UpdateSender, name: String) {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let convert = |o| {
        Ok(sourced(Resource::Node(Arc::new(crate::model::node::trim(
            o,
        )))))
    };
    let mut backoff = Backoff::default();
    while watch_events(
        Api::<Node>::all(client.clone()),
        config.clone(),
        &tx,
        Kind::Node,
        convert,
        None,
    )
    .await
        != Ended::Closed
    {
        // Core v1 is always served; a 404 here is a server in trouble.
        let delay = backoff.delay();
        warn!("v1 Node not served by the API server; retrying in {delay:?}");
        tokio::time::sleep(delay).await;
    }
}

/// EndpointSlices in the version the server prefers: `discovery.k8s.io/v1`
/// (typed), else `v1beta1` (Kubernetes 1.17 to 1.20, whose controller writes
/// only that; converted at the model's boundary, `topology` to `nodeName` and
/// `zone`), else, where neither is served, core `Endpoints` read as slices
/// (`model::endpoints`). Discovered again if the version stops being served
/// (a server upgraded under the agent).
async fn watch_endpoint_slices(client: Client, tx: UpdateSender) {
    let kind = Kind::EndpointSlice;
    watch_discovered(&client, kind, |served| {
        let (client, tx) = (client.clone(), tx.clone());
        async move {
            let config = watcher::Config::default();
            match served {
                Some(resource) if resource.version == "v1" => {
                    let api = Api::<EndpointSlice>::all(client);
                    let convert =
                        |o: EndpointSlice| Ok(sourced(Resource::EndpointSlice(Arc::new(o.into()))));
                    watch_events(api, config, &tx, kind, convert, None).await
                }
                Some(resource) => {
                    let api = Api::<DynamicObject>::all_with(client, &resource);
                    let convert = move |object: DynamicObject| convert_dynamic(kind, &object);
                    watch_events(api, config, &tx, kind, convert, None).await
                }
                None => {
                    warn!(
                        "{ENDPOINT_SLICE_GROUP} EndpointSlices not served; reading core Endpoints"
                    );
                    let api = Api::<Endpoints>::all(client);
                    watch_events(api, config, &tx, kind, convert_endpoints, None).await
                }
            }
        }
    })
    .await;
}

/// Endpoints, as the slice the EndpointSlice mirroring controller would make.
fn convert_endpoints(endpoints: Endpoints) -> Result<Sourced, Box<Invalid>> {
    let r = ObjectRef::from_meta(Kind::EndpointSlice, &endpoints.metadata);
    crate::model::endpoints::as_slice(endpoints)
        .map(|slice| sourced(Resource::EndpointSlice(Arc::new(slice.into()))))
        .map_err(|e| rejected(&r, e))
}

/// An object that did not convert: the index keeps its last good version.
fn rejected(object: &ObjectRef, ConvertError { field, message }: ConvertError) -> Box<Invalid> {
    Box::new(Invalid {
        object: object.clone(),
        diagnostic: Diagnostic::error(
            object,
            field,
            format!("{message}; keeping its last good version"),
        )
        .with_origin(ORIGIN),
    })
}

/// An Istio kind in the version the server prefers; its objects' versions are
/// tracked for the Events on them.
async fn watch_istio(client: Client, tx: UpdateSender, kind: Kind, seen: Seen) {
    watch_discovered(&client, kind, |served| {
        let (client, tx, seen) = (client.clone(), tx.clone(), seen.clone());
        async move {
            // Not served: discover again (CRDs installed later).
            let Some(resource) = served else {
                return Ended::NotServed;
            };
            let api = Api::<DynamicObject>::all_with(client, &resource);
            let convert = move |object: DynamicObject| convert_dynamic(kind, &object);
            let track = Some((&seen, resource.api_version.as_str()));
            watch_events(api, watcher::Config::default(), &tx, kind, convert, track).await
        }
    })
    .await;
}

/// Discovers `kind` (retrying with backoff, saying what is missing each time),
/// then runs `watch` on the served version, or on `None` if the server does not
/// serve the kind (a fallback, or `Ended::NotServed` to look again); again
/// whenever it stops being served (its objects stay as last seen until it is
/// back). Until it has been listed, its `Listed` is not sent, so the agent
/// makes no first write without it.
async fn watch_discovered<F, W>(client: &Client, kind: Kind, mut watch: F)
where
    F: FnMut(Option<ApiResource>) -> W,
    W: std::future::Future<Output = Ended>,
{
    let mut backoff = Backoff::default();
    loop {
        let missing = match served_resource(client, kind).await {
            Ok(resource) => {
                backoff.reset();
                info!(kind = %kind, version = %resource.version, "watching {}", group_of(kind));
                if watch(Some(resource)).await == Ended::Closed {
                    return;
                }
                DiscoveryError::NotServed { kind }
            }
            Err(DiscoveryError::NotServed { .. }) => {
                if watch(None).await == Ended::Closed {
                    return;
                }
                DiscoveryError::NotServed { kind }
            }
            Err(e) => e,
        };
        let delay = backoff.delay();
        warn!("{missing}; retrying in {delay:?}");
        tokio::time::sleep(delay).await;
    }
}

/// An object watched untyped (Istio's kinds, v1beta1 EndpointSlices), typed as
/// the file source types it. Public for the fuzz targets (`fuzz/`), which feed
/// it what a server could send.
pub fn convert_dynamic(kind: Kind, object: &DynamicObject) -> Result<Sourced, Box<Invalid>> {
    let r = ObjectRef::from_meta(kind, &object.metadata);
    let value = serde_json::to_value(object).map_err(|e| {
        rejected(
            &r,
            ConvertError {
                field: String::new(),
                message: e.to_string(),
            },
        )
    })?;
    Resource::try_from(Document { kind, value })
        .map(sourced)
        .map_err(|e| rejected(&r, e))
}

/// The mesh namespaces, sent whole on every change.
async fn watch_namespaces(client: Client, tx: UpdateSender, selector: String) {
    let config = watcher::Config::default().labels(&selector);
    // Their names are all we read: metadata only.
    let api = Api::<kube::core::PartialObjectMeta<Namespace>>::all(client);
    let mut stream = watcher(api, config).backoff(Backoff::default()).boxed();
    let mut current: BTreeSet<String> = BTreeSet::new();
    let mut listing: Option<BTreeSet<String>> = None;
    while let Some(event) = stream.next().await {
        let name = |ns: &kube::core::PartialObjectMeta<Namespace>| {
            ns.metadata.name.clone().unwrap_or_default()
        };
        match event {
            Err(e) => {
                warn!("watching namespaces failed, retrying with backoff: {e}");
                continue;
            }
            Ok(watcher::Event::Init) => listing = Some(BTreeSet::new()),
            Ok(watcher::Event::InitApply(ns)) => {
                listing.get_or_insert_with(BTreeSet::new).insert(name(&ns));
            }
            Ok(watcher::Event::InitDone) => current = listing.take().unwrap_or_default(),
            Ok(watcher::Event::Apply(ns)) => {
                current.insert(name(&ns));
            }
            Ok(watcher::Event::Delete(ns)) => {
                current.remove(&name(&ns));
            }
        }
        if listing.is_none()
            && tx
                .send(Update::now(Event::Namespaces(current.clone())))
                .is_err()
        {
            return;
        }
    }
}

/// The version of `kind` the server prefers (Istio's v1, v1beta1 or v1alpha3;
/// EndpointSlice's v1 or v1beta1).
async fn served_resource(client: &Client, kind: Kind) -> Result<ApiResource, DiscoveryError> {
    let group = match kube::discovery::group(client, group_of(kind)).await {
        Ok(group) => group,
        Err(kube::Error::Discovery(kube::error::DiscoveryError::MissingApiGroup(_))) => {
            return Err(DiscoveryError::NotServed { kind });
        }
        Err(source) => return Err(DiscoveryError::Failed { kind, source }),
    };
    group
        .recommended_kind(kind.as_str())
        .map(|(resource, _)| resource)
        .ok_or(DiscoveryError::NotServed { kind })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NamespacedName;

    fn listed(kind: Kind) -> Event {
        Event::Relisted(kind)
    }

    #[test]
    fn synced_once_every_kind_and_the_namespaces_are_listed() {
        let mut gate = SyncGate::new(true);
        for kind in Kind::ALL {
            assert!(!gate.pass(&listed(kind)), "{kind}");
        }
        assert!(!gate.pass(&Event::Deleted(ObjectRef::from_meta(
            Kind::Pod,
            &Default::default()
        ))));
        assert!(gate.pass(&Event::Namespaces(BTreeSet::new())));
        // A relist later does not say it again.
        assert!(!gate.pass(&listed(Kind::Service)));
    }

    #[test]
    fn without_a_node_name_no_node_list_is_awaited() {
        let mut gate = SyncGate::new(false);
        for kind in Kind::ALL.into_iter().filter(|&k| k != Kind::Node) {
            assert!(!gate.pass(&listed(kind)), "{kind}");
        }
        assert!(gate.pass(&Event::Namespaces(BTreeSet::new())));
    }

    #[test]
    fn event_notes_are_cut_at_a_character_boundary() {
        let note = "日".repeat(400); // 1200 bytes
        let cut = truncate(note, NOTE_MAX);
        assert_eq!(cut.len(), 999);
        assert!(cut.chars().all(|c| c == '日'));
        assert_eq!(truncate("short".into(), NOTE_MAX), "short");
    }

    fn version(resource_version: &str) -> Version {
        Version {
            api_version: "networking.istio.io/v1".into(),
            uid: "0b7e2c3a-5d0e-4a53-9a4f-8f4f5a0d1c2e".into(),
            resource_version: resource_version.into(),
        }
    }

    #[test]
    fn event_names_are_the_same_on_every_node_and_one_per_version_and_field() {
        let name = event_name("flaskapp", &version("100"), "spec.http[0].route[1]");
        assert_eq!(
            name,
            event_name("flaskapp", &version("100"), "spec.http[0].route[1]")
        );
        // Pinned: agents of two releases side by side (a rollout) must agree.
        assert_eq!(name, "flaskapp.1c8277cc6ea83bea");
        assert_ne!(
            name,
            event_name("flaskapp", &version("101"), "spec.http[0].route[1]")
        );
        assert_ne!(
            name,
            event_name("flaskapp", &version("100"), "spec.http[0].route[0]")
        );
        // The longest object name still gives a valid Event name.
        let long = format!("{}-{}", "a".repeat(235), "b".repeat(17));
        let name = event_name(&long, &version("1"), "");
        assert!(name.len() <= 253, "{}", name.len());
        assert!(!name.contains("-."), "{name}");
    }

    #[test]
    fn a_rejection_event_names_the_version_and_the_field() {
        let object = ObjectRef::new(Kind::VirtualService, NamespacedName::new("prod", "web"));
        let note = format!("spec.http[0].route[0].weight: {}", "x".repeat(2000));
        let event = rejected_event(
            &object,
            &version("7"),
            "spec.http[0].route[0].weight",
            note,
            "node-a",
        );
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.reason.as_deref(), Some("Rejected"));
        assert_eq!(event.metadata.namespace.as_deref(), Some("prod"));
        assert!(event.note.as_ref().is_some_and(|n| n.len() <= NOTE_MAX));
        let regarding = event.regarding.unwrap_or_default();
        assert_eq!(regarding.kind.as_deref(), Some("VirtualService"));
        assert_eq!(regarding.uid.as_deref(), Some(version("7").uid.as_str()));
        assert_eq!(regarding.resource_version.as_deref(), Some("7"));
        assert_eq!(event.reporting_instance.as_deref(), Some("node-a"));
    }

    #[test]
    fn a_relist_forgets_the_versions_of_objects_gone_meanwhile() {
        let seen = Seen::default();
        let a = ObjectRef::new(Kind::VirtualService, NamespacedName::new("prod", "a"));
        let b = ObjectRef::new(Kind::VirtualService, NamespacedName::new("prod", "b"));
        let rule = ObjectRef::new(Kind::DestinationRule, NamespacedName::new("prod", "a"));
        seen.set(a.clone(), version("1"));
        seen.set(rule.clone(), version("2"));
        seen.relist(Kind::VirtualService, vec![(b.clone(), version("3"))]);
        assert_eq!(seen.get(&a), None);
        assert_eq!(seen.get(&b), Some(version("3")));
        assert_eq!(seen.get(&rule), Some(version("2")));
        seen.remove(&b);
        assert_eq!(seen.get(&b), None);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::default();
        let delays: Vec<Duration> = (&mut backoff).take(10).collect();
        for (i, d) in delays.iter().enumerate() {
            let ceiling = (BACKOFF_MIN * 2u32.pow(i as u32)).min(BACKOFF_MAX);
            assert!(*d <= ceiling && *d >= ceiling * 3 / 4, "{i}: {d:?}");
        }
        assert!(delays[9] >= BACKOFF_MAX * 3 / 4);
        backoff.reset();
        assert!(backoff.delay() <= BACKOFF_MIN);
    }

    #[test]
    fn only_a_404_means_not_served() {
        let api = |code: u16, reason: &str| {
            kube::Error::Api(
                kube::core::Status::failure("x", reason)
                    .with_code(code)
                    .boxed(),
            )
        };
        assert!(not_served(&watcher::Error::InitialListFailed(api(
            404, "NotFound"
        ))));
        assert!(not_served(&watcher::Error::WatchStartFailed(api(
            404, "NotFound"
        ))));
        assert!(!not_served(&watcher::Error::InitialListFailed(api(
            403,
            "Forbidden"
        ))));
        assert!(!not_served(&watcher::Error::NoResourceVersion));
    }

    #[test]
    fn an_istio_object_that_does_not_convert_names_the_field_and_keeps_the_last_good() {
        let object: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "web", "namespace": "prod"},
            "spec": {"hosts": ["web"], "http": [{"route": [{"destination": {"host": "web"}, "weight": "lots"}]}]}
        }))
        .unwrap_or_else(|_| DynamicObject::new("web", &ApiResource::erase::<Namespace>(&())));
        let Err(bad) = convert_dynamic(Kind::VirtualService, &object) else {
            panic!("converted");
        };
        assert_eq!(bad.object.to_string(), "VirtualService prod/web");
        assert_eq!(bad.diagnostic.field, "spec.http[0].route[0].weight");
        assert!(bad.diagnostic.message.contains("last good"));
    }
}
