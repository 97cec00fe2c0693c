//! The commands besides `run`: `check` (a folder, compiled, no kernel), the
//! read-only views of the pinned state (`status`, `dump`, `explain`), and
//! `cleanup`.

pub mod check;
pub mod inspect;

use std::path::{Path, PathBuf};

use crate::kernel::pin::{PinDir, PinError};

/// `cleanup`: unpins everything under `pins` (which detaches the programs) and
/// removes the agent's record. Refuses while an agent runs on `pins` (it would
/// go on reporting ready with nothing attached), unless `force`. Returns the
/// objects unpinned.
pub fn cleanup(pins: &PinDir, run_dir: &Path, force: bool) -> Result<Vec<PathBuf>, PinError> {
    // Held until the end: no agent can start on this directory meanwhile.
    let _lock = match pins.exists().then(|| pins.lock()) {
        Some(Err(PinError::Locked { .. })) if force => None,
        Some(Err(e)) => return Err(e),
        Some(Ok(lock)) => Some(lock),
        None => None,
    };
    let removed = pins.remove_all()?;
    remove_run_dir(run_dir).map_err(|source| PinError::Io {
        path: run_dir.to_owned(),
        source,
    })?;
    Ok(removed)
}

/// Removes the agent's record: the run dir's contents, then the directory,
/// unless it is a mount point (a hostPath volume in a container whose root is
/// read-only: EBUSY or EROFS), which is left empty.
fn remove_run_dir(run_dir: &Path) -> std::io::Result<()> {
    use std::io::ErrorKind;
    let entries = match std::fs::read_dir(run_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            std::fs::remove_dir_all(entry.path())?;
        } else {
            std::fs::remove_file(entry.path())?;
        }
    }
    match std::fs::remove_dir(run_dir) {
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::ResourceBusy | ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_dir_goes_and_a_mount_point_is_left_empty() -> std::io::Result<()> {
        let base = std::env::temp_dir().join(format!("mesh-run-dir-{}", std::process::id()));
        let run = base.join("run");
        std::fs::create_dir_all(run.join("sub"))?;
        std::fs::write(run.join("state.json"), "{}")?;
        std::fs::write(run.join("sub/x"), "")?;
        remove_run_dir(&run)?;
        assert!(!run.exists());
        remove_run_dir(&run)?; // gone already: fine
        // A mount point (as root: a tmpfs on it): emptied, kept.
        std::fs::create_dir_all(&run)?;
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(&run)
            .status()
            .is_ok_and(|s| s.success());
        if mounted {
            std::fs::write(run.join("state.json"), "{}")?;
            let result = remove_run_dir(&run);
            let left: Vec<_> = std::fs::read_dir(&run)?.collect();
            let _ = std::process::Command::new("umount").arg(&run).status();
            result?;
            assert!(left.is_empty(), "{left:?}");
        }
        std::fs::remove_dir_all(&base)
    }
}
