//! The Kubernetes source: kube-rs watchers on Services, Pods, EndpointSlices
//! (discovery.k8s.io/v1), VirtualServices and DestinationRules (networking.istio.io,
//! whichever version the server prefers), and the mesh's Namespaces. Objects are
//! converted at this boundary and fed to the same index, compile and apply as the
//! file source. Nothing is written to the kernel before every watcher has listed
//! once, so a start never publishes a half-empty table; while the API server is away
//! the kernel keeps the last good state and the watchers retry with backoff.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Debug,
    path::PathBuf,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Namespace, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject},
    runtime::{
        WatchStreamExt as _,
        events::{Event, EventType, Recorder, Reporter},
        watcher,
    },
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    agent::Reconciler,
    diag::Diagnostic,
    model::{Kind, ObjectRef, Resource},
};

/// Where objects come from, as recorded in diagnostics.
const ORIGIN: &str = "kubernetes";
const ISTIO_GROUP: &str = "networking.istio.io";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// A kubeconfig file; else `KUBECONFIG`, `~/.kube/config`, or in-cluster.
    pub kubeconfig: Option<PathBuf>,
    /// Label selector of the mesh's namespaces.
    pub namespace_selector: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            namespace_selector: "istio-injection=enabled".to_owned(),
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

/// What the watchers tell the loop.
#[derive(Debug)]
enum Update {
    /// A (re)list of one kind is complete: the index holds exactly these.
    Listed(Kind, Vec<Resource>),
    Apply(Resource),
    Delete(ObjectRef),
    /// The mesh namespaces now.
    Namespaces(BTreeSet<String>),
    /// An object that does not convert: reported, its last good version stays.
    Invalid(ObjectRef, Diagnostic),
}

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

pub async fn run(
    options: &Options,
    reconciler: &mut Reconciler,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), crate::agent::AgentError> {
    let client = client(options).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(watch_typed::<Service>(
        client.clone(),
        tx.clone(),
        Kind::Service,
        |o| Resource::Service(Box::new(o)),
    ));
    tasks.spawn(watch_typed::<Pod>(
        client.clone(),
        tx.clone(),
        Kind::Pod,
        |o| Resource::Pod(Box::new(o)),
    ));
    tasks.spawn(watch_typed::<EndpointSlice>(
        client.clone(),
        tx.clone(),
        Kind::EndpointSlice,
        |o| Resource::EndpointSlice(Box::new(o)),
    ));
    tasks.spawn(watch_namespaces(
        client.clone(),
        tx.clone(),
        options.namespace_selector.clone(),
    ));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "mesh-agent".into(),
            instance: std::env::var("NODE_NAME")
                .ok()
                .or_else(|| nix::unistd::gethostname().ok()?.into_string().ok()),
        },
    );
    let mut istio_versions = BTreeMap::new();
    for kind in [Kind::VirtualService, Kind::DestinationRule] {
        match istio_resource(&client, kind).await {
            Some(resource) => {
                istio_versions.insert(kind, resource.api_version.clone());
                info!(kind = %kind, version = %resource.version, "watching {ISTIO_GROUP}");
                tasks.spawn(watch_istio(client.clone(), tx.clone(), kind, resource));
            }
            None => {
                warn!(
                    "{ISTIO_GROUP} does not serve {kind}: install the CRDs (manifests/crds) or Istio; none are used"
                );
                let _ = tx.send(Update::Listed(kind, Vec::new()));
            }
        }
    }
    drop(tx);

    let mut waiting: BTreeSet<Watched> = [
        Kind::Service,
        Kind::Pod,
        Kind::EndpointSlice,
        Kind::VirtualService,
        Kind::DestinationRule,
    ]
    .into_iter()
    .map(Watched::Kind)
    .chain([Watched::Namespaces])
    .collect();
    let mut invalid: BTreeMap<ObjectRef, Diagnostic> = BTreeMap::new();
    let mut gc = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                tasks.abort_all();
                return Ok(());
            }
            _ = gc.tick() => if waiting.is_empty() { reconciler.tick() },
            update = rx.recv() => {
                let Some(update) = update else { return Ok(()) };
                let started = Instant::now();
                let mut changed = ingest(reconciler, &mut waiting, &mut invalid, update);
                // Take everything already queued: one reconcile per burst.
                while let Ok(update) = rx.try_recv() {
                    changed |= ingest(reconciler, &mut waiting, &mut invalid, update);
                }
                if waiting.is_empty() && changed {
                    let new = reconciler.reconcile(invalid.values().cloned().collect(), started)?;
                    record_events(&recorder, &istio_versions, new);
                } else if !waiting.is_empty() {
                    info!(waiting = ?waiting, "waiting for the initial lists before the first write");
                }
            }
        }
    }
}

/// A Warning Event on each Istio object newly rejected (reason `Rejected`, the
/// field and what is wrong in the note), so `kubectl describe` shows it. Published
/// in the background: the data plane never waits on the API server.
fn record_events(recorder: &Recorder, versions: &BTreeMap<Kind, String>, new: Vec<Diagnostic>) {
    for d in new {
        let Some(object) = d
            .object
            .as_ref()
            .filter(|_| d.severity == crate::diag::Severity::Error)
        else {
            continue;
        };
        let Some(api_version) = versions.get(&object.kind) else {
            continue;
        };
        let reference = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some(api_version.clone()),
            kind: Some(object.kind.to_string()),
            name: Some(object.name.clone()),
            namespace: Some(object.namespace.clone()),
            ..Default::default()
        };
        let mut note = if d.field.is_empty() {
            d.message.clone()
        } else {
            format!("{}: {}", d.field, d.message)
        };
        note.truncate(1000);
        let event = Event {
            type_: EventType::Warning,
            reason: "Rejected".into(),
            note: Some(note),
            action: "Validate".into(),
            secondary: None,
        };
        let recorder = recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                warn!(
                    "recording an Event on {} failed: {e}",
                    reference.name.as_deref().unwrap_or("")
                );
            }
        });
    }
}

fn ingest(
    reconciler: &mut Reconciler,
    waiting: &mut BTreeSet<Watched>,
    invalid: &mut BTreeMap<ObjectRef, Diagnostic>,
    update: Update,
) -> bool {
    let index = &mut reconciler.index;
    match update {
        Update::Listed(kind, objects) => {
            waiting.remove(&Watched::Kind(kind));
            // Objects listed valid are no longer invalid.
            invalid.retain(|r, _| r.kind != kind || !objects.iter().any(|o| o.object_ref() == *r));
            index.replace_kind(kind, ORIGIN, objects);
            true
        }
        Update::Apply(object) => {
            invalid.remove(&object.object_ref());
            index.apply(ORIGIN, object)
        }
        Update::Delete(object) => {
            invalid.remove(&object);
            index.delete(&object)
        }
        Update::Namespaces(set) => {
            waiting.remove(&Watched::Namespaces);
            let changed = index.mesh_namespaces.as_ref() != Some(&set);
            index.mesh_namespaces = Some(set);
            changed
        }
        Update::Invalid(object, diagnostic) => {
            invalid.insert(object, diagnostic);
            true
        }
    }
}

/// Runs a watcher with backoff forever, turning its events into updates: a relist
/// is buffered from `Init` to `InitDone` and sent whole.
async fn watch_events<K, F>(
    api: Api<K>,
    config: watcher::Config,
    tx: mpsc::UnboundedSender<Update>,
    kind: Kind,
    convert: F,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: Fn(K) -> Result<Resource, Box<(ObjectRef, Diagnostic)>>,
{
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut buffer: Option<Vec<Resource>> = None;
    while let Some(event) = stream.next().await {
        let update = match event {
            Err(e) => {
                warn!(kind = %kind, "watch failed, retrying with backoff: {e}");
                continue;
            }
            Ok(watcher::Event::Init) => {
                buffer = Some(Vec::new());
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                match convert(object) {
                    Ok(resource) => buffer.get_or_insert_with(Vec::new).push(resource),
                    Err(bad) => {
                        let (r, d) = *bad;
                        let _ = tx.send(Update::Invalid(r, d));
                    }
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => Update::Listed(kind, buffer.take().unwrap_or_default()),
            Ok(watcher::Event::Apply(object)) => match convert(object) {
                Ok(resource) => Update::Apply(resource),
                Err(bad) => Update::Invalid(bad.0, bad.1),
            },
            Ok(watcher::Event::Delete(object)) => {
                Update::Delete(ObjectRef::from_meta(kind, object.meta()))
            }
        };
        if tx.send(update).is_err() {
            return;
        }
    }
}

async fn watch_typed<K>(
    client: Client,
    tx: mpsc::UnboundedSender<Update>,
    kind: Kind,
    wrap: fn(K) -> Resource,
) where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug
        + Send
        + 'static,
    K::DynamicType: Default,
{
    watch_events(
        Api::<K>::all(client),
        watcher::Config::default(),
        tx,
        kind,
        |o| Ok(wrap(o)),
    )
    .await;
}

async fn watch_istio(
    client: Client,
    tx: mpsc::UnboundedSender<Update>,
    kind: Kind,
    resource: ApiResource,
) {
    let api = Api::<DynamicObject>::all_with(client, &resource);
    watch_events(
        api,
        watcher::Config::default(),
        tx,
        kind,
        move |object: DynamicObject| {
            let r = ObjectRef::from_meta(kind, &object.metadata);
            let value = serde_json::to_value(&object).map_err(|e| {
                Box::new((
                    r.clone(),
                    Diagnostic::error(&r, "", e.to_string()).with_origin(ORIGIN),
                ))
            })?;
            crate::source::file::convert(kind, value).map_err(|(field, message)| {
                let d = Diagnostic::error(
                    &r,
                    field,
                    format!("{message}; keeping its last good version"),
                )
                .with_origin(ORIGIN);
                Box::new((r, d))
            })
        },
    )
    .await;
}

/// The mesh namespaces, sent whole on every change.
async fn watch_namespaces(client: Client, tx: mpsc::UnboundedSender<Update>, selector: String) {
    let config = watcher::Config::default().labels(&selector);
    let mut stream = watcher(Api::<Namespace>::all(client), config)
        .default_backoff()
        .boxed();
    let mut current: BTreeSet<String> = BTreeSet::new();
    let mut listing: Option<BTreeSet<String>> = None;
    while let Some(event) = stream.next().await {
        let name = |ns: &Namespace| ns.metadata.name.clone().unwrap_or_default();
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
        if listing.is_none() && tx.send(Update::Namespaces(current.clone())).is_err() {
            return;
        }
    }
}

/// The version of an Istio kind the server prefers (v1, v1beta1 or v1alpha3).
async fn istio_resource(client: &Client, kind: Kind) -> Option<ApiResource> {
    let discovery = kube::Discovery::new(client.clone())
        .filter(&[ISTIO_GROUP])
        .run()
        .await;
    let discovery = match discovery {
        Ok(d) => d,
        Err(e) => {
            warn!("discovering {ISTIO_GROUP}: {e}");
            return None;
        }
    };
    let group = discovery.get(ISTIO_GROUP)?;
    group
        .recommended_kind(kind.as_str())
        .map(|(resource, _)| resource)
}
