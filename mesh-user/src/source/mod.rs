//! Sources of objects. Each converts what it reads into [`crate::model::Resource`]s
//! at its boundary; the index never sees YAML or API types.

pub mod file;
pub mod kubernetes;

use std::{path::PathBuf, str::FromStr};

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
