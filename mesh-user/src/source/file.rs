//! The file source: a folder of the YAML manifests a cluster would hold (several
//! documents per file, `kind: List` too). Objects of kinds we do not read
//! (Deployments, Namespaces, ...) are passed over, so a folder of real manifests
//! works as it is.
//!
//! Bad input never loses good state: a file that no longer parses keeps the
//! objects last read from it, and an object that no longer converts keeps its
//! last good version; both are reported with file, object and field.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize as _;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Event, SourceError, Sourced, Update, UpdateSender};
use crate::model::{
    DEFAULT_NAMESPACE, Diagnostic, Kind, ObjectRef, Resource, Severity,
    convert::{ConvertError, Document},
};

/// Everything the folder holds now.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Each object with its file.
    pub objects: Vec<Sourced>,
    pub diagnostics: Vec<Diagnostic>,
}

impl From<Snapshot> for Event {
    fn from(s: Snapshot) -> Event {
        Event::Snapshot {
            objects: s.objects,
            diagnostics: s.diagnostics,
        }
    }
}

/// How long a burst of file events is collected before the folder is read
/// again: an editor writes a file in several steps.
const DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(50);

/// A folder being watched; dropping it stops the watch.
#[derive(Debug)]
pub struct Watching {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// How soon an unreadable folder is tried again, at first and at most.
const RETRY: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_millis(500),
    std::time::Duration::from_secs(10),
);

/// Reads `dir` now and on every change, sending each state whole as
/// [`Event::Snapshot`] (the first is followed by [`Event::Synced`]). A folder
/// that cannot be read at start (missing, not mounted yet, no permission) is not
/// an empty one: nothing is sent, so the kernel keeps its tables, until it can
/// be read; it is retried with backoff meanwhile.
pub fn watch(dir: &Path, tx: UpdateSender) -> Watching {
    let dir = dir.to_owned();
    let task = tokio::spawn(async move {
        let mut delay = RETRY.0;
        let mut said = None;
        let (_watcher, mut changed) = loop {
            match start_watching(&dir) {
                Ok(watching) => break watching,
                Err(e) => {
                    let text = e.to_string();
                    if said.as_ref() != Some(&text) {
                        warn!(
                            "{text}; sending nothing until it can be read (the kernel keeps its tables)"
                        );
                        said = Some(text);
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY.1);
                }
            }
        };
        if said.is_some() {
            info!(dir = %dir.display(), "the folder can be read now");
        }
        let mut source = FileSource::new(&dir);
        let mut first = true;
        let mut seen = std::time::Instant::now();
        loop {
            let snapshot = source.load();
            let sent = tx.send(Update {
                seen,
                event: snapshot.into(),
            });
            if sent.is_err() || (first && tx.send(Update::now(Event::Synced)).is_err()) {
                return; // the agent is gone
            }
            first = false;
            if changed.recv().await.is_none() {
                return;
            }
            seen = std::time::Instant::now();
            tokio::time::sleep(DEBOUNCE).await;
            while changed.try_recv().is_ok() {}
            debug!("source changed");
        }
    });
    Watching { task }
}

/// Checks `dir` can be read and watches it: a notification of any change
/// arrives on the receiver.
fn start_watching(
    dir: &Path,
) -> Result<(notify::RecommendedWatcher, mpsc::Receiver<()>), SourceError> {
    use notify::Watcher as _;
    std::fs::read_dir(dir).map_err(|source| SourceError::Unreadable {
        path: dir.to_owned(),
        source,
    })?;
    let (changed_tx, changed) = mpsc::channel::<()>(1);
    let watch_err = |source| SourceError::Watch {
        path: dir.to_owned(),
        source,
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            // A full channel already means "reload pending": dropping this one loses nothing.
            let _ = changed_tx.try_send(());
        }
    })
    .map_err(watch_err)?;
    watcher
        .watch(dir, notify::RecursiveMode::Recursive)
        .map_err(watch_err)?;
    Ok((watcher, changed))
}

#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    /// Objects last read successfully, per file.
    last_good: BTreeMap<PathBuf, Vec<Resource>>,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            last_good: BTreeMap::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the whole folder.
    pub fn load(&mut self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let mut files = Vec::new();
        if let Err(e) = collect_files(&self.dir, &mut files) {
            snapshot
                .diagnostics
                .push(file_error(&self.dir, format!("cannot read directory: {e}")));
            // Keep everything we had: an unreadable folder is not an empty one.
            for (file, objects) in &self.last_good {
                let origin = file.display().to_string();
                snapshot.objects.extend(objects.iter().map(|o| Sourced {
                    origin: origin.clone(),
                    object: o.clone(),
                }));
            }
            return snapshot;
        }
        files.sort();
        let mut next_good = BTreeMap::new();
        for file in files {
            let origin = file.display().to_string();
            let previous = self.last_good.remove(&file).unwrap_or_default();
            let objects = match std::fs::read_to_string(&file) {
                Err(e) => {
                    snapshot.diagnostics.push(file_error(
                        &file,
                        format!(
                            "cannot read: {e}; keeping {} objects last read from it",
                            previous.len()
                        ),
                    ));
                    previous
                }
                Ok(text) => parse_file(&file, &text, &previous, &mut snapshot.diagnostics),
            };
            snapshot.objects.extend(objects.iter().map(|o| Sourced {
                origin: origin.clone(),
                object: o.clone(),
            }));
            next_good.insert(file, objects);
        }
        self.last_good = next_good;
        dedup(&mut snapshot);
        snapshot
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            continue; // editor swap files, hidden folders
        }
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
    Ok(())
}

fn file_error(path: &Path, message: String) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        origin: path.display().to_string(),
        object: None,
        field: String::new(),
        message,
    }
}

/// Parses manifests text (one or more YAML documents) as if read from `file`.
pub fn parse(file: &Path, text: &str) -> (Vec<Resource>, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let objects = parse_file(file, text, &[], &mut diags);
    (objects, diags)
}

/// Parses one file. On a YAML syntax error the file's previous objects stand.
fn parse_file(
    file: &Path,
    text: &str,
    previous: &[Resource],
    diags: &mut Vec<Diagnostic>,
) -> Vec<Resource> {
    // An empty file that held objects is most likely being rewritten in place
    // (truncate, then write): keep its objects until the content arrives. Deleting
    // the file is how objects are removed.
    if text.trim().is_empty() && !previous.is_empty() {
        diags.push(Diagnostic {
            severity: Severity::Warning,
            ..file_error(
                file,
                format!(
                    "empty; keeping the {} objects last read from it (delete the file to remove them)",
                    previous.len()
                ),
            )
        });
        return previous.to_vec();
    }
    let mut documents = Vec::new();
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        match Value::deserialize(document) {
            Ok(value) => documents.push(value),
            Err(e) => {
                diags.push(file_error(
                    file,
                    format!(
                        "invalid YAML: {e}; keeping the {} objects last read from this file",
                        previous.len()
                    ),
                ));
                return previous.to_vec();
            }
        }
    }
    let mut out = Vec::new();
    for (i, document) in documents.into_iter().enumerate() {
        convert_document(file, i, document, previous, &mut out, diags);
    }
    out
}

fn convert_document(
    file: &Path,
    i: usize,
    document: Value,
    previous: &[Resource],
    out: &mut Vec<Resource>,
    diags: &mut Vec<Diagnostic>,
) {
    let origin = file.display().to_string();
    let Value::Object(map) = &document else {
        if !document.is_null() {
            diags.push(file_error(
                file,
                format!("document {i}: not a Kubernetes object (expected a mapping)"),
            ));
        }
        return;
    };
    let text = |key: &str| {
        map.get(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let (api_version, kind_name) = (text("apiVersion"), text("kind"));
    if kind_name == "List" {
        if let Some(Value::Array(items)) = map.get("items") {
            for item in items.clone() {
                convert_document(file, i, item, previous, out, diags);
            }
        }
        return;
    }
    let Some(kind) = Kind::from_manifest(&api_version, &kind_name) else {
        if api_version.is_empty() || kind_name.is_empty() {
            diags.push(file_error(
                file,
                format!("document {i}: apiVersion and kind are required"),
            ));
        } else if api_version.starts_with("networking.istio.io/") {
            // Gateway, ServiceEntry, Sidecar... or a typo: either way, say so.
            diags.push(Diagnostic {
                severity: Severity::Warning,
                ..file_error(
                    file,
                    format!("document {i}: {kind_name} ({api_version}) is not supported by this data plane; ignored"),
                )
            });
        }
        return; // a kind we do not read (Deployment, Namespace, ...)
    };
    let meta = map.get("metadata");
    let object = ObjectRef {
        kind,
        namespace: meta
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .unwrap_or(DEFAULT_NAMESPACE)
            .to_owned(),
        name: meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
    };
    if object.name.is_empty() {
        diags.push(Diagnostic::error(&object, "metadata.name", "required").with_origin(&origin));
        return;
    }
    match Resource::try_from(Document {
        kind,
        value: document,
    }) {
        Ok(resource) => out.push(resource),
        Err(ConvertError { field, message }) => {
            let last = previous.iter().find(|r| r.object_ref() == object).cloned();
            let keeping = if last.is_some() {
                "keeping its last good version"
            } else {
                "skipped"
            };
            diags.push(
                Diagnostic::error(&object, field, format!("{message}; {keeping}"))
                    .with_origin(&origin),
            );
            out.extend(last);
        }
    }
}

/// Later definitions of the same object (by kind, namespace, name) win, with a
/// warning naming both files.
fn dedup(snapshot: &mut Snapshot) {
    let mut seen: BTreeMap<ObjectRef, usize> = BTreeMap::new();
    let mut keep = vec![true; snapshot.objects.len()];
    for (i, Sourced { origin, object }) in snapshot.objects.iter().enumerate() {
        let r = object.object_ref();
        if let Some(prev) = seen.insert(r.clone(), i) {
            keep[prev] = false;
            snapshot.diagnostics.push(
                Diagnostic::warning(
                    &r,
                    "",
                    format!(
                        "also defined in {}; this definition wins",
                        snapshot.objects[prev].origin
                    ),
                )
                .with_origin(origin),
            );
        }
    }
    let mut i = 0;
    snapshot.objects.retain(|_| {
        i += 1;
        keep[i - 1]
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    const VS: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  hosts: [web]\n  http:\n    - route:\n        - {destination: {host: web}, weight: 100}\n";
    const SVC: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn dir() -> Dir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-file-source-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("tempdir");
        Dir(path)
    }

    fn names(snapshot: &Snapshot) -> Vec<String> {
        let mut out: Vec<String> = snapshot
            .objects
            .iter()
            .map(|o| o.object.object_ref().to_string())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn reads_several_documents_lists_and_skips_other_kinds() {
        let d = dir();
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n  - {}\n",
            serde_json::to_string(&serde_yaml_ng::from_str::<Value>(SVC).expect("yaml"))
                .expect("json")
        );
        std::fs::write(
            d.0.join("a.yaml"),
            format!("{VS}---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n"),
        )
        .expect("write");
        std::fs::write(d.0.join("b.yml"), list).expect("write");
        std::fs::write(d.0.join(".swap.yaml"), "not: [yaml").expect("write");
        let snapshot = FileSource::new(&d.0).load();
        assert!(
            snapshot.diagnostics.is_empty(),
            "{:?}",
            snapshot.diagnostics
        );
        assert_eq!(
            names(&snapshot),
            vec!["Service default/web", "VirtualService default/web"]
        );
    }

    #[test]
    fn a_file_that_stops_parsing_keeps_its_last_good_objects() {
        let d = dir();
        let file = d.0.join("vs.yaml");
        std::fs::write(&file, VS).expect("write");
        let mut source = FileSource::new(&d.0);
        assert_eq!(names(&source.load()), vec!["VirtualService default/web"]);
        std::fs::write(&file, "spec: [unclosed").expect("write");
        let snapshot = source.load();
        assert_eq!(names(&snapshot), vec!["VirtualService default/web"]);
        assert!(
            snapshot.diagnostics[0]
                .to_string()
                .contains("vs.yaml: invalid YAML"),
            "{:?}",
            snapshot.diagnostics
        );
    }

    #[test]
    fn an_object_of_the_wrong_shape_keeps_its_last_good_version_and_names_the_field() {
        let d = dir();
        let file = d.0.join("vs.yaml");
        std::fs::write(&file, VS).expect("write");
        let mut source = FileSource::new(&d.0);
        let good = source.load().objects;
        std::fs::write(&file, VS.replace("weight: 100", "weight: lots")).expect("write");
        let snapshot = source.load();
        assert_eq!(snapshot.objects, good);
        let message = snapshot.diagnostics[0].to_string();
        assert!(
            message.contains("VirtualService default/web")
                && message.contains("spec.http[0].route[0].weight")
                && message.contains("last good"),
            "{message}"
        );
    }

    #[test]
    fn a_file_emptied_in_place_keeps_its_objects_until_rewritten() {
        let d = dir();
        let file = d.0.join("vs.yaml");
        std::fs::write(&file, VS).expect("write");
        let mut source = FileSource::new(&d.0);
        let good = source.load().objects;
        std::fs::write(&file, "").expect("truncate");
        let snapshot = source.load();
        assert_eq!(snapshot.objects, good);
        assert!(
            snapshot.diagnostics[0].message.contains("empty; keeping"),
            "{:?}",
            snapshot.diagnostics
        );
    }

    #[test]
    fn unsupported_istio_kinds_are_reported() {
        let d = dir();
        std::fs::write(
            d.0.join("se.yaml"),
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x}\n",
        )
        .expect("write");
        let snapshot = FileSource::new(&d.0).load();
        assert!(snapshot.objects.is_empty());
        assert!(
            snapshot.diagnostics[0].message.contains("ServiceEntry"),
            "{:?}",
            snapshot.diagnostics
        );
    }

    #[test]
    fn a_deleted_file_deletes_its_objects_and_duplicates_are_reported() {
        let d = dir();
        std::fs::write(d.0.join("a.yaml"), SVC).expect("write");
        std::fs::write(d.0.join("b.yaml"), SVC).expect("write");
        let mut source = FileSource::new(&d.0);
        let snapshot = source.load();
        assert_eq!(names(&snapshot), vec!["Service default/web"]);
        assert!(
            snapshot
                .diagnostics
                .iter()
                .any(|d| d.message.contains("also defined in")),
            "{:?}",
            snapshot.diagnostics
        );
        std::fs::remove_file(d.0.join("a.yaml")).expect("rm");
        std::fs::remove_file(d.0.join("b.yaml")).expect("rm");
        assert!(source.load().objects.is_empty());
    }

    #[tokio::test]
    async fn a_folder_missing_at_start_sends_nothing_until_it_can_be_read() {
        let d = dir();
        let missing = d.0.join("not-yet");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let _watching = watch(&missing, tx);
        // git-sync or a volume mount has not produced the folder yet.
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), rx.recv()).await;
        assert!(early.is_err(), "sent while unreadable: {early:?}");
        std::fs::create_dir(&missing).expect("mkdir");
        std::fs::write(missing.join("svc.yaml"), SVC).expect("write");
        let first = tokio::time::timeout(std::time::Duration::from_secs(20), rx.recv())
            .await
            .ok()
            .flatten()
            .map(|u| u.event);
        let Some(Event::Snapshot { objects, .. }) = first else {
            panic!("expected the folder's snapshot, got {first:?}");
        };
        assert_eq!(objects.len(), 1);
        let synced = rx.recv().await.map(|u| u.event);
        assert_eq!(synced, Some(Event::Synced));
    }
}
