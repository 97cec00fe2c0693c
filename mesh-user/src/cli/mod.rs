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
    match std::fs::remove_dir_all(run_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(PinError::Io {
                path: run_dir.to_owned(),
                source,
            });
        }
    }
    Ok(removed)
}
