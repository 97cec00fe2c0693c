//! The folder walk: which files a reload reads, at a bounded cost.
//!
//! Symlinks are followed, to files and to directories alike: a git-sync checkout
//! or a ConfigMap volume (`file.yaml -> ..data/file.yaml`, `..data -> ..2024_..`)
//! is read as the folder it stands for. Every directory and every file is read
//! once, by the first path found to it (names taken in sorted order): a symlink back
//! to a directory being walked (a loop) or to one already read is reported and
//! skipped, so neither loops nor symlinks that fan out can make the walk endless
//! or exponential. Names starting with `.` are skipped (editors' swap files,
//! ConfigMap's `..data`; the visible links into them are read). A walk looks at
//! [`Limits::entries`](super::Limits) entries at most.

use std::{
    collections::HashMap,
    ffi::OsString,
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use crate::model::{Diagnostic, Severity};

/// A file or directory, whatever path reached it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    pub fn of(meta: &fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

/// Why a walk stopped. The caller keeps every object it had: part of a folder
/// is not the folder.
#[derive(Debug, thiserror::Error)]
pub enum WalkError {
    #[error("cannot read directory {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("more than {limit} entries (symlinks followed): not read further")]
    TooManyEntries { limit: usize },
}

/// What a walk found.
#[derive(Debug, Default)]
pub struct Walk {
    /// Manifest files to read, sorted.
    pub files: Vec<PathBuf>,
    /// The directories read, each by the path that reached it first.
    pub dirs: Vec<(PathBuf, FileId)>,
    /// Loops, repeats and files that are not regular files.
    pub diagnostics: Vec<Diagnostic>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn warning(path: &Path, message: String) -> Diagnostic {
    Diagnostic {
        severity: Severity::Warning,
        origin: path.display().to_string(),
        object: None,
        field: String::new(),
        message,
    }
}

/// Walks `root`, reading each directory and file once and at most `max_entries`
/// directory entries in all.
pub fn walk(root: &Path, max_entries: usize) -> Result<Walk, WalkError> {
    let read_err = |path: &Path| {
        let path = path.to_owned();
        move |source| WalkError::Read { path, source }
    };
    let root_id = FileId::of(&fs::metadata(root).map_err(read_err(root))?);
    let mut out = Walk::default();
    // Every directory or file read, with the path that reached it.
    let mut seen: HashMap<FileId, PathBuf> = HashMap::from([(root_id, root.to_owned())]);
    // Directories read: (id, parent's index), to tell a loop from a repeat.
    let mut dirs: Vec<(FileId, Option<usize>)> = vec![(root_id, None)];
    // Depth first; children pushed in reverse so that paths are taken in order.
    // Each with its id and its index in `dirs`.
    let mut stack: Vec<(PathBuf, FileId, usize)> = vec![(root.to_owned(), root_id, 0)];
    let mut entries = 0usize;
    while let Some((dir, dir_id, index)) = stack.pop() {
        out.dirs.push((dir.clone(), dir_id));
        let mut names: Vec<OsString> = Vec::new();
        for entry in fs::read_dir(&dir).map_err(read_err(&dir))? {
            entries += 1;
            if entries > max_entries {
                return Err(WalkError::TooManyEntries { limit: max_entries });
            }
            names.push(entry.map_err(read_err(&dir))?.file_name());
        }
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            if name.as_encoded_bytes().starts_with(b".") {
                continue; // editors' swap files, hidden folders, ConfigMap's ..data
            }
            let path = dir.join(&name);
            // Follows symlinks. A broken link named as a manifest is still
            // listed: reading it reports why, and its last objects are kept (a
            // ConfigMap's links are briefly dangling while it is updated).
            let meta = match fs::metadata(&path) {
                Ok(meta) => meta,
                Err(_) => {
                    if is_manifest(&path) {
                        out.files.push(path);
                    }
                    continue;
                }
            };
            let id = FileId::of(&meta);
            if !meta.is_dir() && !is_manifest(&path) {
                continue;
            }
            if let Some(first) = seen.get(&id) {
                let message = if meta.is_dir() && is_ancestor(&dirs, index, id) {
                    format!(
                        "a symlink loop: leads back to {}, which contains it; skipped",
                        first.display()
                    )
                } else {
                    format!("the same as {}, read there; skipped", first.display())
                };
                out.diagnostics.push(warning(&path, message));
                continue;
            }
            if meta.is_dir() {
                seen.insert(id, path.clone());
                dirs.push((id, Some(index)));
                subdirs.push((path, id, dirs.len() - 1));
            } else if meta.is_file() {
                seen.insert(id, path.clone());
                out.files.push(path);
            } else {
                // A FIFO would block the reload until something writes to it.
                out.diagnostics.push(warning(
                    &path,
                    "not a regular file (a pipe, socket or device); skipped".to_owned(),
                ));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    out.files.sort();
    Ok(out)
}

/// Whether `id` is the directory at `index` or one of its parents.
fn is_ancestor(dirs: &[(FileId, Option<usize>)], mut index: usize, id: FileId) -> bool {
    loop {
        let Some(&(dir, parent)) = dirs.get(index) else {
            return false;
        };
        if dir == id {
            return true;
        }
        match parent {
            Some(p) => index = p,
            None => return false,
        }
    }
}
