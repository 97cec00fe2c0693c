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
        events::{self, EventType, Recorder},
        watcher,
    },
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
/// rejections.
pub async fn start(
    options: &Options,
    tx: UpdateSender,
) -> Result<(tokio::task::JoinSet<()>, Reporter), KubeError> {
    let client = client(options).await?;
    let (watch_tx, watch_rx) = mpsc::unbounded_channel();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(watch_typed::<Service>(
        client.clone(),
        watch_tx.clone(),
        Kind::Service,
        |o| Resource::Service(Box::new(o)),
    ));
    tasks.spawn(watch_typed::<Pod>(
        client.clone(),
        watch_tx.clone(),
        Kind::Pod,
        |o| Resource::Pod(Box::new(o)),
    ));
    tasks.spawn(watch_typed::<EndpointSlice>(
        client.clone(),
        watch_tx.clone(),
        Kind::EndpointSlice,
        |o| Resource::EndpointSlice(Box::new(o)),
    ));
    tasks.spawn(watch_namespaces(
        client.clone(),
        watch_tx.clone(),
        options.namespace_selector.clone(),
    ));
    let recorder = Recorder::new(
        client.clone(),
        events::Reporter {
            controller: "mesh-agent".into(),
            instance: std::env::var("NODE_NAME")
                .ok()
                .or_else(|| nix::unistd::gethostname().ok()?.into_string().ok()),
        },
    );
    let mut versions = BTreeMap::new();
    for kind in [Kind::VirtualService, Kind::DestinationRule] {
        match istio_resource(&client, kind).await {
            Some(resource) => {
                versions.insert(kind, resource.api_version.clone());
                info!(kind = %kind, version = %resource.version, "watching {}", istio::GROUP);
                tasks.spawn(watch_istio(
                    client.clone(),
                    watch_tx.clone(),
                    kind,
                    resource,
                ));
            }
            None => {
                warn!(
                    "{} does not serve {kind}: install the CRDs (manifests/crds) or Istio; none are used",
                    istio::GROUP
                );
                // The receiver is ours, a few lines down: this cannot fail.
                let _ = watch_tx.send(Update::now(Event::Listed {
                    kind,
                    objects: Vec::new(),
                    invalid: Vec::new(),
                }));
            }
        }
    }
    drop(watch_tx);
    tasks.spawn(forward(watch_rx, tx));
    Ok((tasks, Reporter { recorder, versions }))
}

/// Passes the watchers' updates on, and says [`Event::Synced`] once each of them
/// has listed once (nothing is written to the kernel before).
async fn forward(mut from: mpsc::UnboundedReceiver<Update>, to: UpdateSender) {
    let mut gate = SyncGate::default();
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

impl Default for SyncGate {
    fn default() -> Self {
        Self {
            waiting: Kind::ALL
                .into_iter()
                .map(Watched::Kind)
                .chain([Watched::Namespaces])
                .collect(),
        }
    }
}

impl SyncGate {
    /// Whether `event` completed the initial lists (true once).
    fn pass(&mut self, event: &Event) -> bool {
        let was_waiting = !self.waiting.is_empty();
        match event {
            Event::Listed { kind, .. } => self.waiting.remove(&Watched::Kind(*kind)),
            Event::Namespaces(_) => self.waiting.remove(&Watched::Namespaces),
            _ => false,
        };
        if was_waiting && !self.waiting.is_empty() {
            info!(waiting = ?self.waiting, "waiting for the initial lists before the first write");
        }
        was_waiting && self.waiting.is_empty()
    }
}

/// Publishes rejections as Kubernetes Events.
#[derive(Clone)]
pub struct Reporter {
    recorder: Recorder,
    /// The API version served for each Istio kind (Events name it).
    versions: BTreeMap<Kind, String>,
}

impl std::fmt::Debug for Reporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reporter")
            .field("versions", &self.versions)
            .finish_non_exhaustive()
    }
}

/// The longest Event note we send; the API server caps notes at 1 kB.
const NOTE_MAX: usize = 1000;

impl Reporter {
    /// A Warning Event on each Istio object newly rejected (reason `Rejected`, the
    /// field and what is wrong in the note), so `kubectl describe` shows it.
    /// Published in the background: the data plane never waits on the API server.
    pub fn report(&self, new: &[Diagnostic]) {
        for d in new {
            let Some(object) = d.object.as_ref().filter(|_| d.severity == Severity::Error) else {
                continue;
            };
            let Some(api_version) = self.versions.get(&object.kind) else {
                continue;
            };
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some(api_version.clone()),
                kind: Some(object.kind.to_string()),
                name: Some(object.name.clone()),
                namespace: Some(object.namespace.clone()),
                ..Default::default()
            };
            let note = if d.field.is_empty() {
                d.message.clone()
            } else {
                format!("{}: {}", d.field, d.message)
            };
            let event = events::Event {
                type_: EventType::Warning,
                reason: "Rejected".into(),
                note: Some(truncate(note, NOTE_MAX)),
                action: "Validate".into(),
                secondary: None,
            };
            let recorder = self.recorder.clone();
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

/// Runs a watcher with backoff forever, turning its events into updates: a relist
/// is buffered from `Init` to `InitDone` and sent whole.
async fn watch_events<K, F>(
    api: Api<K>,
    config: watcher::Config,
    tx: UpdateSender,
    kind: Kind,
    convert: F,
) where
    K: kube::Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: Fn(K) -> Result<Sourced, Box<Invalid>>,
{
    let mut stream = watcher(api, config).default_backoff().boxed();
    let mut listing: Option<(Vec<Sourced>, Vec<Invalid>)> = None;
    while let Some(event) = stream.next().await {
        let event = match event {
            Err(e) => {
                warn!(kind = %kind, "watch failed, retrying with backoff: {e}");
                continue;
            }
            Ok(watcher::Event::Init) => {
                listing = Some(Default::default());
                continue;
            }
            Ok(watcher::Event::InitApply(object)) => {
                let (objects, invalid) = listing.get_or_insert_with(Default::default);
                match convert(object) {
                    Ok(sourced) => objects.push(sourced),
                    Err(bad) => invalid.push(*bad),
                }
                continue;
            }
            Ok(watcher::Event::InitDone) => {
                let (objects, invalid) = listing.take().unwrap_or_default();
                Event::Listed {
                    kind,
                    objects,
                    invalid,
                }
            }
            Ok(watcher::Event::Apply(object)) => match convert(object) {
                Ok(sourced) => Event::Applied(sourced),
                Err(bad) => Event::Invalid(*bad),
            },
            Ok(watcher::Event::Delete(object)) => {
                Event::Deleted(ObjectRef::from_meta(kind, object.meta()))
            }
        };
        if tx.send(Update::now(event)).is_err() {
            return;
        }
    }
}

fn sourced(object: Resource) -> Sourced {
    Sourced {
        origin: ORIGIN.to_owned(),
        object,
    }
}

async fn watch_typed<K>(client: Client, tx: UpdateSender, kind: Kind, wrap: fn(K) -> Resource)
where
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
        |o| Ok(sourced(wrap(o))),
    )
    .await;
}

async fn watch_istio(client: Client, tx: UpdateSender, kind: Kind, resource: ApiResource) {
    let api = Api::<DynamicObject>::all_with(client, &resource);
    watch_events(api, watcher::Config::default(), tx, kind, move |object| {
        convert_istio(kind, &object)
    })
    .await;
}

/// An Istio object from the API server, typed as the file source types it.
/// Public for the fuzz targets (`fuzz/`), which feed it what a server could send.
pub fn convert_istio(kind: Kind, object: &DynamicObject) -> Result<Sourced, Box<Invalid>> {
    let r = ObjectRef::from_meta(kind, &object.metadata);
    let invalid = |field: String, message: String| {
        Box::new(Invalid {
            object: r.clone(),
            diagnostic: Diagnostic::error(
                &r,
                field,
                format!("{message}; keeping its last good version"),
            )
            .with_origin(ORIGIN),
        })
    };
    let value = serde_json::to_value(object).map_err(|e| invalid(String::new(), e.to_string()))?;
    Resource::try_from(Document { kind, value })
        .map(sourced)
        .map_err(|ConvertError { field, message }| invalid(field, message))
}

/// The mesh namespaces, sent whole on every change.
async fn watch_namespaces(client: Client, tx: UpdateSender, selector: String) {
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
        if listing.is_none()
            && tx
                .send(Update::now(Event::Namespaces(current.clone())))
                .is_err()
        {
            return;
        }
    }
}

/// The version of an Istio kind the server prefers (v1, v1beta1 or v1alpha3).
async fn istio_resource(client: &Client, kind: Kind) -> Option<ApiResource> {
    let discovery = kube::Discovery::new(client.clone())
        .filter(&[istio::GROUP])
        .run()
        .await;
    let discovery = match discovery {
        Ok(d) => d,
        Err(e) => {
            warn!("discovering {}: {e}", istio::GROUP);
            return None;
        }
    };
    let group = discovery.get(istio::GROUP)?;
    group
        .recommended_kind(kind.as_str())
        .map(|(resource, _)| resource)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(kind: Kind) -> Event {
        Event::Listed {
            kind,
            objects: Vec::new(),
            invalid: Vec::new(),
        }
    }

    #[test]
    fn synced_once_every_kind_and_the_namespaces_are_listed() {
        let mut gate = SyncGate::default();
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
    fn event_notes_are_cut_at_a_character_boundary() {
        let note = "日".repeat(400); // 1200 bytes
        let cut = truncate(note, NOTE_MAX);
        assert_eq!(cut.len(), 999);
        assert!(cut.chars().all(|c| c == '日'));
        assert_eq!(truncate("short".into(), NOTE_MAX), "short");
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
        let Err(bad) = convert_istio(Kind::VirtualService, &object) else {
            panic!("converted");
        };
        assert_eq!(bad.object.to_string(), "VirtualService prod/web");
        assert_eq!(bad.diagnostic.field, "spec.http[0].route[0].weight");
        assert!(bad.diagnostic.message.contains("last good"));
    }
}
