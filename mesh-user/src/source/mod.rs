//! Sources of objects. Each turns its world (a folder of YAML, an API server) into
//! typed [`Event`]s on a channel, converting at its boundary
//! ([`crate::model::convert`]); none knows the agent, the index or the kernel.

pub mod file;
pub mod kubernetes;

use std::{collections::BTreeSet, path::PathBuf, str::FromStr, time::Instant};

use tokio::sync::mpsc;

use crate::model::{Diagnostic, Kind, ObjectRef, Resource};

/// `--source`: where the agent reads objects from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSpec {
    /// `file:DIR`: a folder of YAML manifests, watched for changes.
    File(PathBuf),
    /// `kubernetes`: watch an API server (in-cluster, `--kubeconfig` or `KUBECONFIG`).
    Kubernetes(kubernetes::Options),
}

#[derive(Debug, thiserror::Error)]
pub enum SourceSpecError {
    #[error("--source file: needs a directory, as in file:/etc/mesh/manifests")]
    EmptyPath,
    #[error("unknown --source {0:?}: expected file:DIR or kubernetes")]
    Unknown(String),
}

impl FromStr for SourceSpec {
    type Err = SourceSpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err(SourceSpecError::EmptyPath);
            }
            return Ok(SourceSpec::File(PathBuf::from(path)));
        }
        if s == "kubernetes" {
            return Ok(SourceSpec::Kubernetes(kubernetes::Options::default()));
        }
        Err(SourceSpecError::Unknown(s.to_owned()))
    }
}

/// An object and where it came from (a file path, or `kubernetes`).
#[derive(Clone, Debug, PartialEq)]
pub struct Sourced {
    pub origin: String,
    pub object: Resource,
}

/// An object whose newest version does not convert: reported, and its last good
/// version (if the index has one) stays in use.
#[derive(Clone, Debug, PartialEq)]
pub struct Invalid {
    pub object: ObjectRef,
    pub diagnostic: Diagnostic,
}

/// What a source tells the agent.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// Everything the source holds now (the file source): afterwards the index
    /// holds exactly these objects; `diagnostics` are the source's own (files that
    /// do not parse, objects that do not convert, duplicates).
    Snapshot {
        objects: Vec<Sourced>,
        diagnostics: Vec<Diagnostic>,
    },
    /// A (re)list of one kind begins: the [`Event::Applied`] and
    /// [`Event::Invalid`] of that kind until [`Event::Relisted`] are its whole
    /// content. Streamed, so a relist never holds a kind twice (a buffer and
    /// the index).
    Relisting(Kind),
    /// The (re)list of the kind is complete: afterwards the index holds
    /// exactly the objects it gave, and the last good versions of those it
    /// gave as invalid.
    Relisted(Kind),
    Applied(Sourced),
    Deleted(ObjectRef),
    Invalid(Invalid),
    /// The namespaces whose Services are meshed (a source that says nothing of
    /// namespaces meshes all).
    Namespaces(BTreeSet<String>),
    /// Every kind has been listed once: the configuration is whole and may be
    /// written to the kernel. Sent once.
    Synced,
}

/// An event and when the change behind it was seen (the propagation latency is
/// measured from there).
#[derive(Clone, Debug)]
pub struct Update {
    pub seen: Instant,
    pub event: Event,
}

impl Update {
    pub fn now(event: Event) -> Self {
        Self {
            seen: Instant::now(),
            event,
        }
    }
}

pub type UpdateSender = mpsc::UnboundedSender<Update>;
pub type UpdateReceiver = mpsc::UnboundedReceiver<Update>;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(transparent)]
    Kubernetes(#[from] kubernetes::KubeError),
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
    #[error("cannot read {path}: {source}")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A started source: its updates, and where to report rejections back.
#[derive(Debug)]
pub struct Running {
    pub updates: UpdateReceiver,
    /// Publishes rejected objects where the source's users look (Kubernetes
    /// Events); `None` for a folder.
    pub reporter: Option<kubernetes::Reporter>,
    /// The source's tasks: dropping them stops the source.
    _file: Option<file::Watching>,
    _kubernetes: Option<tokio::task::JoinSet<()>>,
}

/// Starts reading `spec` in the background.
pub async fn start(spec: &SourceSpec) -> Result<Running, SourceError> {
    let (tx, updates) = mpsc::unbounded_channel();
    Ok(match spec {
        SourceSpec::File(dir) => Running {
            updates,
            reporter: None,
            _file: Some(file::watch(dir, tx)),
            _kubernetes: None,
        },
        SourceSpec::Kubernetes(options) => {
            let (tasks, reporter) = kubernetes::start(options, tx).await?;
            Running {
                updates,
                reporter: Some(reporter),
                _file: None,
                _kubernetes: Some(tasks),
            }
        }
    })
}
