//! Writing files without losing anything: every file we write goes through a temporary file in
//! the same folder and a rename, so a crash or a full disk never leaves a half-written file and
//! never touches a file we were not asked to write. Used by `save_pretrained`, the trainer's
//! outputs and checkpoints, `Comparison::save` and `Figure::save`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};

/// A unique temporary sibling of `path`: `.NAME.tmp-PID-N` in the same folder (so the final
/// rename stays on one file system and is atomic).
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// Writes the file at `path` with `write` (which receives a temporary path in the same
/// folder), then renames it into place. On any error the temporary file is removed and `path`
/// is left as it was.
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
    }
    if path.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{} is a folder; a file was to be written there (choose another path)",
            path.display()
        )));
    }
    let tmp = temp_sibling(path);
    let result = write(&tmp).and_then(|()| {
        // The data reaches the disk before the rename makes it visible.
        if let Ok(f) = std::fs::File::open(&tmp) {
            let _ = f.sync_all();
        }
        std::fs::rename(&tmp, path).map_err(|e| Error::io("renaming into", path, e))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Writes `bytes` to `path` atomically (temporary file in the same folder, then rename).
///
/// ```
/// let dir = tempfile::tempdir()?;
/// let p = dir.path().join("a.txt");
/// mfac_lab::io::write_bytes_atomic(&p, b"hello")?;
/// assert_eq!(std::fs::read(&p)?, b"hello");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        std::fs::write(tmp, bytes).map_err(|e| Error::cannot_write(path, e))
    })
}

/// Writes `value` as pretty JSON to `path` atomically.
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_bytes_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())
}

/// Moves the finished folder `tmp` to `dest` (a folder of ours, e.g. a checkpoint). An existing
/// `dest` is moved aside first and removed only once `tmp` is in place, so at every moment one
/// complete copy exists.
pub(crate) fn replace_dir(tmp: &Path, dest: &Path) -> Result<()> {
    let old = dest.exists().then(|| temp_sibling(dest));
    if let Some(old) = &old {
        std::fs::rename(dest, old).map_err(|e| Error::io("moving aside", dest, e))?;
    }
    if let Err(e) = std::fs::rename(tmp, dest) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, dest);
        }
        return Err(Error::io("renaming into", dest, e));
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}
