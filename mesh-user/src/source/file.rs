//! The file source: a folder of the YAML manifests a cluster would hold (several
//! documents per file, `kind: List` too). Objects of kinds we do not read
//! (Deployments, Namespaces, ...) are passed over, so a folder of real manifests
//! works as it is.
//!
//! Bad input never loses good state: a file that no longer parses keeps the
//! objects last read from it, and an object that no longer converts keeps its
//! last good version; both are reported with file, object and field.
//!
//! Whatever the folder holds, a reload has a bounded cost ([`Limits`]): symlinks
//! are followed without loops (`walk`), files are read up to a size, and YAML
//! aliases expand within a budget per file ([`yaml`]).

mod walk;
pub mod yaml;

use std::{
    collections::BTreeMap,
    io::Read as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Event, SourceError, Sourced, Update, UpdateSender};
use crate::model::{
    DEFAULT_NAMESPACE, Diagnostic, Kind, ObjectRef, Resource, Severity,
    convert::{ConvertError, Document},
    pod::PodShapes,
    shared_name,
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

/// What one reload may cost; [`Limits::default`] holds the documented limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The largest file read, in bytes. A larger one is reported and keeps the
    /// objects last read from it.
    pub file_bytes: u64,
    /// YAML nodes (mappings, sequences, scalars, keys) the documents of one file
    /// may hold once their aliases are expanded. Only documents of kinds we read
    /// (and `List`s) are expanded, so only they count.
    pub nodes: usize,
    /// Bytes of text (keys and strings) those documents may hold, aliases
    /// expanded.
    pub text_bytes: usize,
    /// Directory entries one walk of the folder looks at, symlinks followed.
    pub entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            // Manifests are kilobytes; the largest CRD bundles a few hundred.
            file_bytes: 4 << 20,
            // Twice what 4 MiB of Pods hold (~9 bytes a node). Expanding that many
            // takes under 100 MB (measured), less than the typed objects of a
            // 4 MiB file of Pods (about 230 MB).
            nodes: 1 << 20,
            // Twice the text a file under the size limit holds without aliases.
            text_bytes: 8 << 20,
            entries: 100_000,
        }
    }
}

/// Why a file was not read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("{size} bytes, over the limit of {limit} bytes per file")]
    TooLarge { size: u64, limit: u64 },
    #[error("not a regular file")]
    NotRegular,
    #[error("not UTF-8 text: {0}")]
    NotUtf8(#[from] std::string::FromUtf8Error),
}

/// Reads a manifest file, at most `limit` bytes of it.
fn read_file(path: &Path, limit: u64) -> Result<String, ReadError> {
    // Non-blocking, so that a FIFO put in place after the walk cannot stall the
    // reload (it is refused below); no effect on a regular file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular);
    }
    if meta.len() > limit {
        return Err(ReadError::TooLarge {
            size: meta.len(),
            limit,
        });
    }
    // The file may grow while it is read: never read past the limit.
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    let size = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    if size > limit {
        return Err(ReadError::TooLarge { size, limit });
    }
    Ok(String::from_utf8(bytes)?)
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
///
/// The directories a reload read are watched, and only those (each once,
/// non-recursively): the watch follows the symlinks the reads follow, and never
/// walks the folder on its own.
pub fn watch(dir: &Path, tx: UpdateSender) -> Watching {
    watch_source(FileSource::new(dir), tx)
}

fn watch_source(mut source: FileSource, tx: UpdateSender) -> Watching {
    let dir = source.dir.clone();
    let task = tokio::spawn(async move {
        let mut delay = RETRY.0;
        let mut said = None;
        let (mut watches, mut changed, again) = loop {
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
        let mut first = true;
        let mut seen = std::time::Instant::now();
        loop {
            // Off the async workers: a reload is bounded, but reads files, and
            // the agent's other tasks (its HTTP endpoints) share those workers.
            let Ok((back, mut snapshot)) = tokio::task::spawn_blocking(move || {
                let snapshot = source.load();
                (source, snapshot)
            })
            .await
            else {
                return; // the reload panicked, or the runtime is shutting down
            };
            source = back;
            if watches.update(&source.dirs, &mut snapshot.diagnostics) {
                // A directory watched only now may have changed after it was read.
                let _ = again.try_send(());
            }
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

/// Checks `dir` can be read and watches it (the folder itself; what lies below
/// is watched as the reads find it): a notification of any change arrives on
/// the receiver, and the sender asks for another reload.
fn start_watching(
    dir: &Path,
) -> Result<(Watches, mpsc::Receiver<()>, mpsc::Sender<()>), SourceError> {
    use notify::Watcher as _;
    std::fs::read_dir(dir).map_err(|source| SourceError::Unreadable {
        path: dir.to_owned(),
        source,
    })?;
    let (changed_tx, changed) = mpsc::channel::<()>(1);
    let again = changed_tx.clone();
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
    // The folder itself is watched before it is first read, so that no change is
    // missed.
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(watch_err)?;
    let watches = Watches {
        watcher,
        root: dir.to_owned(),
        watched: std::fs::metadata(dir)
            .map(|meta| BTreeMap::from([(dir.to_owned(), walk::FileId::of(&meta))]))
            .unwrap_or_default(),
    };
    Ok((watches, changed, again))
}

/// The directories watched: the path the reads took, and what it led to.
struct Watches {
    watcher: notify::RecommendedWatcher,
    /// The folder: watched always, also while a walk of it fails.
    root: PathBuf,
    watched: BTreeMap<PathBuf, walk::FileId>,
}

impl Watches {
    /// Watches `dirs` (the last walk's; the previous one's if it failed) and the
    /// folder, nothing else. Returns whether one is new (or its path leads to
    /// another directory now), so may have changed unseen.
    fn update(
        &mut self,
        dirs: &[(PathBuf, walk::FileId)],
        diagnostics: &mut Vec<Diagnostic>,
    ) -> bool {
        use notify::Watcher as _;
        let keep: BTreeMap<&Path, walk::FileId> =
            dirs.iter().map(|(p, id)| (p.as_path(), *id)).collect();
        let gone: Vec<PathBuf> = self
            .watched
            .keys()
            .filter(|p| **p != self.root && !keep.contains_key(p.as_path()))
            .cloned()
            .collect();
        for path in gone {
            // Fails when the directory is gone, which removed its watch already.
            let _ = self.watcher.unwatch(&path);
            self.watched.remove(&path);
        }
        let mut new = false;
        for (path, id) in dirs {
            // Every time, not only for new paths: a path whose directory was
            // replaced (a symlink swapped, a directory recreated) needs its watch
            // placed anew; for a directory already watched it changes nothing.
            match self
                .watcher
                .watch(path, notify::RecursiveMode::NonRecursive)
            {
                Ok(()) => new |= self.watched.insert(path.clone(), *id) != Some(*id),
                Err(e) => {
                    self.watched.remove(path);
                    diagnostics.push(Diagnostic {
                        severity: Severity::Warning,
                        ..file_error(
                            path,
                            format!("cannot watch: {e}; its changes are seen at the next reload"),
                        )
                    });
                }
            }
        }
        new
    }
}

#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    limits: Limits,
    /// Objects last read successfully, per file.
    last_good: BTreeMap<PathBuf, FileRead>,
    /// The directories the last walk read: what [`watch`] watches.
    dirs: Vec<(PathBuf, walk::FileId)>,
}

impl FileSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self::with_limits(dir, Limits::default())
    }

    pub fn with_limits(dir: impl Into<PathBuf>, limits: Limits) -> Self {
        Self {
            dir: dir.into(),
            limits,
            last_good: BTreeMap::new(),
            dirs: Vec::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the whole folder.
    pub fn load(&mut self) -> Snapshot {
        let mut snapshot = Snapshot::default();
        let walk = match walk::walk(&self.dir, self.limits.entries) {
            Ok(walk) => walk,
            Err(e) => {
                snapshot.diagnostics.push(file_error(
                    &self.dir,
                    format!("{e}; keeping every object last read"),
                ));
                // Keep everything we had: an unreadable folder is not an empty one.
                for (file, read) in &self.last_good {
                    let origin = file.display().to_string();
                    snapshot
                        .objects
                        .extend(read.objects.iter().map(|o| Sourced {
                            origin: origin.clone(),
                            object: o.clone(),
                        }));
                }
                return snapshot;
            }
        };
        self.dirs = walk.dirs;
        snapshot.diagnostics.extend(walk.diagnostics);
        let mut next_good = BTreeMap::new();
        let jobs: Vec<(PathBuf, FileRead)> = walk
            .files
            .into_iter()
            .map(|file| {
                let previous = self.last_good.remove(&file).unwrap_or_default();
                (file, previous)
            })
            .collect();
        let limits = &self.limits;
        let reads = in_parallel(jobs, |(file, previous)| {
            let read = read_one(&file, previous, limits);
            (file, read)
        });
        for (file, read) in reads {
            let origin = file.display().to_string();
            snapshot
                .diagnostics
                .extend(read.diagnostics.iter().cloned());
            // Shared with the index (objects are reference-counted).
            snapshot
                .objects
                .extend(read.objects.iter().map(|o| Sourced {
                    origin: origin.clone(),
                    object: o.clone(),
                }));
            next_good.insert(file, read);
        }
        self.last_good = next_good;
        dedup(&mut snapshot);
        snapshot
    }
}

/// Reads and parses one file, unless its content is what `previous` was
/// read from.
fn read_one(file: &Path, previous: FileRead, limits: &Limits) -> FileRead {
    match read_file(file, limits.file_bytes) {
        Err(e) => FileRead {
            diagnostics: vec![file_error(
                file,
                format!(
                    "{e}; keeping the {} objects last read from it",
                    previous.objects.len()
                ),
            )],
            digest: None,
            objects: previous.objects,
        },
        Ok(text) => {
            let digest = digest(&text);
            // Unchanged since the last read: the same objects (a change to
            // one file of many parses that file alone).
            if previous.digest == Some(digest) {
                return previous;
            }
            let mut diagnostics = Vec::new();
            let objects = parse_file(file, &text, limits, &previous.objects, &mut diagnostics);
            FileRead {
                digest: Some(digest),
                objects,
                diagnostics,
            }
        }
    }
}

/// `f` over `jobs` on as many threads as there are CPUs (at 10 000 Services
/// parsing is most of the first read), results in the jobs' order.
fn in_parallel<T: Send, U: Send>(jobs: Vec<T>, f: impl Fn(T) -> U + Sync) -> Vec<U> {
    let threads = std::thread::available_parallelism()
        .map_or(1, std::num::NonZeroUsize::get)
        .min(jobs.len());
    if threads <= 1 {
        return jobs.into_iter().map(f).collect();
    }
    // Round robin, so that files of similar sizes spread evenly.
    let mut shares: Vec<Vec<(usize, T)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, job) in jobs.into_iter().enumerate() {
        shares[i % threads].push((i, job));
    }
    let f = &f;
    let mut done: Vec<(usize, U)> = std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .map(|share| {
                scope.spawn(move || {
                    share
                        .into_iter()
                        .map(|(i, job)| (i, f(job)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, u)| u).collect()
}

/// What one file gave at its last read.
#[derive(Debug, Default)]
struct FileRead {
    /// Of its text; `None`: it could not be read (its objects are older).
    digest: Option<u64>,
    objects: Vec<Resource>,
    diagnostics: Vec<Diagnostic>,
}

fn digest(text: &str) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
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

/// Parses manifests text (one or more YAML documents) as if read from `file`,
/// within the default [`Limits`].
pub fn parse(file: &Path, text: &str) -> (Vec<Resource>, Vec<Diagnostic>) {
    let mut diags = Vec::new();
    let objects = parse_file(file, text, &Limits::default(), &[], &mut diags);
    (objects, diags)
}

/// Whether documents of this apiVersion and kind are expanded and converted.
fn is_read(api_version: &str, kind: &str) -> bool {
    kind == "List" || Kind::from_manifest(api_version, kind).is_some()
}

/// Parses one file. On a YAML error, or a document over the limits, the file's
/// previous objects stand.
fn parse_file(
    file: &Path,
    text: &str,
    limits: &Limits,
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
    // Each document is converted before the next is expanded; an error in a
    // later one drops what the earlier ones made: the file stands or falls whole.
    let error = |e: yaml::YamlError, diags: &mut Vec<Diagnostic>| {
        diags.push(file_error(
            file,
            format!(
                "{e}; keeping the {} objects last read from this file",
                previous.len()
            ),
        ));
        previous.to_vec()
    };
    let documents = match yaml::documents(text, limits, is_read) {
        Ok(documents) => documents,
        Err(e) => return error(e, diags),
    };
    let mut out = Vec::new();
    // The documents' diagnostics, kept until the file stands.
    let mut pending = Vec::new();
    for (i, document) in documents.enumerate() {
        match document {
            Err(e) => {
                // Diagnostics of documents dropped with the file go too.
                return error(e, diags);
            }
            Ok(yaml::Doc::Empty) => {}
            Ok(yaml::Doc::NotMapping) => pending.push(not_an_object(file, i)),
            Ok(yaml::Doc::Skipped { api_version, kind }) => {
                report_unread(file, i, &api_version, &kind, &mut pending);
            }
            Ok(yaml::Doc::Expanded(value)) => {
                convert_document(file, i, value, previous, &mut out, &mut pending);
            }
        }
    }
    diags.append(&mut pending);
    // Pods of one file that have the same labels (ports) share them, so the
    // index (which shares them the same way) need not copy a pod the source
    // keeps.
    let mut shapes = PodShapes::default();
    out.into_iter()
        .map(|object| match object {
            Resource::Pod(pod) => Resource::Pod(shapes.share(pod)),
            other => other,
        })
        .collect()
}

fn not_an_object(file: &Path, i: usize) -> Diagnostic {
    file_error(
        file,
        format!("document {i}: not a Kubernetes object (expected a mapping)"),
    )
}

/// Reports a document of a kind we do not read, where that deserves a word.
fn report_unread(
    file: &Path,
    i: usize,
    api_version: &str,
    kind: &str,
    diags: &mut Vec<Diagnostic>,
) {
    if api_version.is_empty() || kind.is_empty() {
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
                format!(
                    "document {i}: {kind} ({api_version}) is not supported by this data plane; ignored"
                ),
            )
        });
    }
    // Else a kind we do not read (Deployment, Namespace, ...): passed over.
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
    let mut map = match document {
        Value::Object(map) => map,
        Value::Null => return,
        _ => {
            diags.push(not_an_object(file, i));
            return;
        }
    };
    let text = |map: &Map<String, Value>, key: &str| {
        map.get(key)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    let (api_version, kind_name) = (text(&map, "apiVersion"), text(&map, "kind"));
    if kind_name == "List" {
        if let Some(Value::Array(items)) = map.remove("items") {
            for item in items {
                convert_document(file, i, item, previous, out, diags);
            }
        }
        return;
    }
    let Some(kind) = Kind::from_manifest(&api_version, &kind_name) else {
        report_unread(file, i, &api_version, &kind_name, diags);
        return;
    };
    let meta = map.get("metadata");
    let object = ObjectRef {
        kind,
        namespace: shared_name(
            meta.and_then(|m| m.get("namespace"))
                .and_then(Value::as_str)
                .unwrap_or(DEFAULT_NAMESPACE),
        ),
        name: meta
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .into(),
    };
    if object.name.is_empty() {
        diags.push(Diagnostic::error(&object, "metadata.name", "required").with_origin(&origin));
        return;
    }
    match Resource::try_from(Document {
        kind,
        value: Value::Object(map),
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

    fn symlink(target: impl AsRef<Path>, link: impl AsRef<Path>) {
        std::os::unix::fs::symlink(target, link).expect("symlink");
    }

    fn warnings_with(snapshot: &Snapshot, text: &str) -> usize {
        snapshot
            .diagnostics
            .iter()
            .filter(|d| d.message.contains(text))
            .count()
    }

    #[test]
    fn two_symlinks_to_the_folder_itself_neither_hang_the_reload_nor_hide_its_manifests() {
        let d = dir();
        std::fs::write(d.0.join("vs.yaml"), VS).expect("write");
        symlink(".", d.0.join("again"));
        symlink(".", d.0.join("more"));
        let snapshot = FileSource::new(&d.0).load();
        assert_eq!(names(&snapshot), vec!["VirtualService default/web"]);
        // Each loop reported once, as a warning naming the link.
        assert_eq!(
            warnings_with(&snapshot, "a symlink loop"),
            2,
            "{:?}",
            snapshot.diagnostics
        );
        assert!(
            snapshot
                .diagnostics
                .iter()
                .all(|d| d.severity == Severity::Warning
                    && (d.origin.ends_with("again") || d.origin.ends_with("more"))),
            "{:?}",
            snapshot.diagnostics
        );
    }

    /// `d0/{a,b} -> d1`, `d1/{a,b} -> d2`, ...: 2^depth paths lead to the last
    /// directory, without any loop.
    fn fan_out(root: &Path, depth: usize) -> PathBuf {
        for level in 0..depth {
            let here = root.join(format!("d{level}"));
            std::fs::create_dir_all(&here).expect("mkdir");
            for link in ["a", "b"] {
                symlink(format!("../d{}", level + 1), here.join(link));
            }
        }
        let last = root.join(format!("d{depth}"));
        std::fs::create_dir_all(&last).expect("mkdir");
        last
    }

    #[test]
    fn symlinks_that_fan_out_read_each_directory_once() {
        let d = dir();
        let last = fan_out(&d.0, 24);
        std::fs::write(last.join("vs.yaml"), VS).expect("write");
        let snapshot = FileSource::new(&d.0).load();
        assert_eq!(names(&snapshot), vec!["VirtualService default/web"]);
        assert_eq!(warnings_with(&snapshot, "also defined in"), 0);
        assert!(warnings_with(&snapshot, "read there; skipped") > 0);
    }

    #[test]
    fn a_configmap_volume_is_read_once_through_its_visible_links() {
        let d = dir();
        // As the kubelet lays out a ConfigMap volume, and updates it: a new
        // hidden directory, then `..data` swapped to it in one rename.
        let version = |name: &str, vs: &str| {
            let data = d.0.join(name);
            std::fs::create_dir_all(&data).expect("mkdir");
            std::fs::write(data.join("vs.yaml"), vs).expect("write");
            std::fs::write(data.join("svc.yaml"), SVC).expect("write");
            symlink(name, d.0.join("..data_tmp"));
            std::fs::rename(d.0.join("..data_tmp"), d.0.join("..data")).expect("swap");
        };
        version("..2024_01_01_00_00_00.1", VS);
        for file in ["vs.yaml", "svc.yaml"] {
            symlink(format!("..data/{file}"), d.0.join(file));
        }
        let mut source = FileSource::new(&d.0);
        let snapshot = source.load();
        assert!(
            snapshot.diagnostics.is_empty(),
            "{:?}",
            snapshot.diagnostics
        );
        assert_eq!(
            names(&snapshot),
            vec!["Service default/web", "VirtualService default/web"]
        );
        let origins: Vec<&str> = snapshot.objects.iter().map(|o| o.origin.as_str()).collect();
        assert!(
            origins.iter().all(|o| !o.contains("..")),
            "read through the visible links: {origins:?}"
        );
        version(
            "..2024_01_01_00_00_01.2",
            &VS.replace("name: web}", "name: web2}"),
        );
        std::fs::remove_dir_all(d.0.join("..2024_01_01_00_00_00.1")).expect("rm");
        let snapshot = source.load();
        assert!(
            snapshot.diagnostics.is_empty(),
            "{:?}",
            snapshot.diagnostics
        );
        assert_eq!(
            names(&snapshot),
            vec!["Service default/web", "VirtualService default/web2"]
        );
    }

    #[test]
    fn a_symlinked_file_and_a_symlinked_directory_are_read() {
        let d = dir();
        let elsewhere = dir();
        std::fs::create_dir_all(elsewhere.0.join("services")).expect("mkdir");
        std::fs::write(elsewhere.0.join("services/svc.yaml"), SVC).expect("write");
        std::fs::write(elsewhere.0.join("vs.yaml"), VS).expect("write");
        symlink(elsewhere.0.join("services"), d.0.join("services"));
        symlink(elsewhere.0.join("vs.yaml"), d.0.join("vs.yaml"));
        // The same file by a second name is read once.
        symlink("vs.yaml", d.0.join("vs-again.yaml"));
        let snapshot = FileSource::new(&d.0).load();
        assert_eq!(
            names(&snapshot),
            vec!["Service default/web", "VirtualService default/web"]
        );
        assert_eq!(warnings_with(&snapshot, "also defined in"), 0);
        assert_eq!(warnings_with(&snapshot, "read there; skipped"), 1);
    }

    #[test]
    fn a_fifo_named_like_a_manifest_is_skipped_not_waited_on() {
        let d = dir();
        std::fs::write(d.0.join("vs.yaml"), VS).expect("write");
        nix::unistd::mkfifo(
            &d.0.join("pipe.yaml"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .expect("mkfifo");
        let snapshot = FileSource::new(&d.0).load();
        assert_eq!(names(&snapshot), vec!["VirtualService default/web"]);
        assert_eq!(
            warnings_with(&snapshot, "not a regular file"),
            1,
            "{:?}",
            snapshot.diagnostics
        );
    }

    #[test]
    fn a_folder_over_the_entry_limit_keeps_every_object() {
        let d = dir();
        std::fs::write(d.0.join("vs.yaml"), VS).expect("write");
        std::fs::write(d.0.join("svc.yaml"), SVC).expect("write");
        let limits = Limits {
            entries: 4,
            ..Limits::default()
        };
        let mut source = FileSource::with_limits(&d.0, limits);
        let good = source.load().objects;
        assert_eq!(good.len(), 2);
        // vs.yaml and four more: five entries.
        for i in 0..4 {
            std::fs::write(d.0.join(format!("other-{i}.txt")), "").expect("write");
        }
        std::fs::remove_file(d.0.join("svc.yaml")).expect("rm");
        let snapshot = source.load();
        // The walk stopped: the Service is not taken as deleted.
        assert_eq!(snapshot.objects, good);
        assert!(
            snapshot.diagnostics[0]
                .message
                .contains("more than 4 entries"),
            "{:?}",
            snapshot.diagnostics
        );
    }

    #[test]
    fn a_file_over_the_size_limit_is_refused_and_keeps_its_last_good_objects() {
        let d = dir();
        let file = d.0.join("vs.yaml");
        std::fs::write(&file, VS).expect("write");
        let mut source = FileSource::new(&d.0);
        let good = source.load().objects;
        let limit = Limits::default().file_bytes;
        let padding = "#".repeat(usize::try_from(limit).expect("fits"));
        std::fs::write(&file, format!("{VS}{padding}\n")).expect("write");
        let snapshot = source.load();
        assert_eq!(snapshot.objects, good);
        let message = snapshot.diagnostics[0].to_string();
        assert!(
            message.starts_with(&file.display().to_string())
                && message.contains("over the limit of 4194304 bytes per file")
                && message.contains("keeping the 1 objects"),
            "{message}"
        );
    }

    /// `spec.a` anchors `n` scalars and `spec.b` repeats it `m` times: n*m nodes
    /// from about 2n + 3m bytes (the shape that reached 1 GB from 15 KB).
    fn wide_bomb(kind: &str, n: usize, m: usize) -> String {
        let api = if kind == "VirtualService" {
            "networking.istio.io/v1"
        } else {
            "v1"
        };
        format!(
            "apiVersion: {api}\nkind: {kind}\nmetadata: {{name: web}}\nspec:\n  a: &a [{}]\n  b: [{}]\n",
            vec!["x"; n].join(","),
            vec!["*a"; m].join(",")
        )
    }

    /// The classic "billion laughs": ten levels of nine aliases to the level below.
    fn laughs() -> String {
        let mut text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: web}\nspec:\n  l0: &l0 \"lol\"\n".to_owned();
        for level in 1..=10 {
            let aliases = vec![format!("*l{}", level - 1); 9].join(",");
            text.push_str(&format!("  l{level}: &l{level} [{aliases}]\n"));
        }
        text
    }

    #[test]
    fn alias_bombs_are_refused_and_keep_the_files_last_good_objects() {
        let d = dir();
        let file = d.0.join("vs.yaml");
        std::fs::write(&file, VS).expect("write");
        let mut source = FileSource::new(&d.0);
        let good = source.load().objects;
        let bombs = [
            // 15 KB and 30 KB: about 8 M and 33 M nodes expanded.
            (
                wide_bomb("VirtualService", 2500, 3300),
                "more than 1048576 YAML nodes with its aliases expanded (the limit per file)",
            ),
            (
                wide_bomb("VirtualService", 5000, 6600),
                "more than 1048576 YAML nodes with its aliases expanded (the limit per file)",
            ),
            // serde_yaml_ng's own limit on following aliases stops this shape first.
            (laughs(), "repetition limit exceeded"),
            // Documents are converted one by one: a good one (with a warning
            // of its own) before the bomb goes with the file, warning included.
            (
                format!(
                    "{SVC}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\n---\n{}",
                    wide_bomb("VirtualService", 2500, 3300)
                ),
                "document 2: more than 1048576 YAML nodes",
            ),
        ];
        for (bomb, reason) in bombs {
            std::fs::write(&file, &bomb).expect("write");
            let snapshot = source.load();
            assert_eq!(snapshot.objects, good, "{} bytes", bomb.len());
            assert_eq!(snapshot.diagnostics.len(), 1, "{:?}", snapshot.diagnostics);
            let message = snapshot.diagnostics[0].to_string();
            assert!(
                message.starts_with(&file.display().to_string()) && message.contains(reason),
                "{message}"
            );
        }
    }

    #[test]
    fn an_alias_bomb_of_a_kind_we_do_not_read_is_passed_over_unexpanded() {
        let d = dir();
        std::fs::write(
            d.0.join("all.yaml"),
            format!("{VS}---\n{}", wide_bomb("ConfigMap", 5000, 6600)),
        )
        .expect("write");
        let snapshot = FileSource::new(&d.0).load();
        assert!(
            snapshot.diagnostics.is_empty(),
            "{:?}",
            snapshot.diagnostics
        );
        assert_eq!(names(&snapshot), vec!["VirtualService default/web"]);
    }

    /// The label sets of the pods `text` holds, in order.
    fn pod_labels(text: &str) -> Vec<crate::model::pod::Labels> {
        let (objects, diags) = parse(Path::new("pods.yaml"), text);
        assert!(diags.is_empty(), "{diags:?}");
        objects
            .iter()
            .filter_map(|o| match o {
                Resource::Pod(p) => Some(p.labels.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn anchors_and_aliases_within_the_budget_are_read() {
        let labels = pod_labels(
            "apiVersion: v1\nkind: List\nitems:\n  - {apiVersion: v1, kind: Pod, metadata: {name: a, labels: &l {app: web}}}\n  - {apiVersion: v1, kind: Pod, metadata: {name: b, labels: *l}}\n",
        );
        assert_eq!(labels.len(), 2);
        assert_eq!(labels[0], labels[1]);
    }

    #[test]
    fn pods_of_a_file_with_the_same_labels_share_them() {
        let labels = pod_labels(
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {app: web}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: b, labels: {app: web}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: c, labels: {app: db}}\n",
        );
        // One copy of `app: web` for a and b (the index then keeps these very
        // pods instead of copies of its own); c's is another.
        assert!(std::sync::Arc::ptr_eq(&labels[0], &labels[1]));
        assert!(!std::sync::Arc::ptr_eq(&labels[0], &labels[2]));
        assert_eq!(labels[2].get("app").map(String::as_str), Some("db"));
    }

    mod watching {
        use std::time::Duration;

        use super::*;
        use crate::source::UpdateReceiver;

        /// The next snapshot whose objects `want` accepts. The timeout only turns
        /// a lost change into a failure.
        async fn snapshot_where(
            rx: &mut UpdateReceiver,
            want: impl Fn(&[Sourced]) -> bool,
        ) -> Vec<Sourced> {
            let wait = async {
                while let Some(update) = rx.recv().await {
                    if let Event::Snapshot { objects, .. } = update.event
                        && want(&objects)
                    {
                        return Some(objects);
                    }
                }
                None
            };
            tokio::time::timeout(Duration::from_secs(60), wait)
                .await
                .ok()
                .flatten()
                .expect("the snapshot awaited")
        }

        fn has(name: &'static str) -> impl Fn(&[Sourced]) -> bool {
            move |objects| {
                objects
                    .iter()
                    .any(|o| o.object.object_ref().to_string() == name)
            }
        }

        #[tokio::test]
        async fn a_folder_with_loops_and_fan_out_is_watched_through_its_symlinks() {
            let d = dir();
            symlink(".", d.0.join("again"));
            let last = fan_out(&d.0, 24);
            std::fs::write(last.join("vs.yaml"), VS).expect("write");
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let _watching = watch(&d.0, tx);
            snapshot_where(&mut rx, has("VirtualService default/web")).await;
            // An edit in the directory reached only through symlinks is seen.
            std::fs::write(
                last.join("vs.yaml"),
                VS.replace("name: web}", "name: web2}"),
            )
            .expect("write");
            snapshot_where(&mut rx, has("VirtualService default/web2")).await;
        }

        #[tokio::test]
        async fn a_folder_whose_first_walk_fails_is_still_watched() {
            let d = dir();
            std::fs::write(d.0.join("vs.yaml"), VS).expect("write");
            for i in 0..2 {
                std::fs::write(d.0.join(format!("other-{i}.txt")), "").expect("write");
            }
            let limits = Limits {
                entries: 2,
                ..Limits::default()
            };
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let _watching = watch_source(FileSource::with_limits(&d.0, limits), tx);
            let first = tokio::time::timeout(Duration::from_secs(60), rx.recv())
                .await
                .ok()
                .flatten()
                .expect("the first snapshot");
            let Event::Snapshot {
                objects,
                diagnostics,
            } = first.event
            else {
                panic!("a snapshot first");
            };
            assert!(objects.is_empty());
            assert!(diagnostics[0].message.contains("more than 2 entries"));
            for i in 0..2 {
                std::fs::remove_file(d.0.join(format!("other-{i}.txt"))).expect("rm");
            }
            snapshot_where(&mut rx, has("VirtualService default/web")).await;
        }

        #[tokio::test]
        async fn a_directory_made_after_the_start_is_watched() {
            let d = dir();
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let _watching = watch(&d.0, tx);
            snapshot_where(&mut rx, |objects| objects.is_empty()).await;
            let sub = d.0.join("sub");
            std::fs::create_dir_all(&sub).expect("mkdir");
            std::fs::write(sub.join("vs.yaml"), VS).expect("write");
            snapshot_where(&mut rx, has("VirtualService default/web")).await;
            std::fs::write(sub.join("vs.yaml"), VS.replace("name: web}", "name: web2}"))
                .expect("write");
            snapshot_where(&mut rx, has("VirtualService default/web2")).await;
        }
    }
}
