//! Output folders and checkpoints, with HF Trainer's names and rules, and nothing lost:
//!
//! - an output folder that holds anything besides our own files is refused unless
//!   `overwrite_output_dir` is set; even then only the files we write are replaced;
//! - a checkpoint is `checkpoint-<step>/` in the output folder: the model (HF layout),
//!   `optimizer.safetensors` (the optimizer's whole state), `rng_state.json` (the dropout
//!   stream) and `trainer_state.json` (step, history, and what a resumed run must agree on).
//!   It is built in a temporary folder and renamed into place, so a failed write leaves the
//!   previous checkpoint valid;
//! - `save_total_limit` deletes the oldest checkpoints, never the newest.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The prefix of checkpoint folders, as HF's (`checkpoint-500`).
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";

/// The files a checkpoint holds besides the model's.
pub(crate) const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub(crate) const RNG_FILE: &str = "rng_state.json";
pub(crate) const STATE_FILE: &str = "trainer_state.json";
pub(crate) const RESULTS_FILE: &str = "eval_results.json";

/// The folder of the checkpoint at `step` in `output_dir`.
pub fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("{CHECKPOINT_PREFIX}{step}"))
}

/// The step of a checkpoint folder name (`checkpoint-120` → 120).
fn checkpoint_step(name: &str) -> Option<usize> {
    name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()
}

/// Whether the folder `dir` is a complete checkpoint written by mfac-lab: its trainer_state.json
/// has our resume section. An HF Trainer checkpoint of the same name is not ours: it is never
/// listed, rotated, resumed from or removed.
fn is_our_checkpoint(dir: &Path) -> bool {
    std::fs::read(dir.join(STATE_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v.get(RESUME_KEY).is_some())
}

/// The key of our resume state in a checkpoint's trainer_state.json.
pub(crate) const RESUME_KEY: &str = "mfac_lab";

/// The complete checkpoints mfac-lab wrote in `output_dir`, by step.
pub fn checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = vec![];
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(Error::io("reading", output_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("reading", output_dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(step) = checkpoint_step(&name) {
            let p = entry.path();
            if is_our_checkpoint(&p) {
                out.push((step, p));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint in `output_dir` (HF's `get_last_checkpoint`).
///
/// ```
/// let dir = tempfile::tempdir()?;
/// assert!(mfac_lab::train::latest_checkpoint(dir.path())?.is_none());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn latest_checkpoint(output_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(checkpoints(output_dir)?.pop().map(|(_, p)| p))
}

/// Whether `name` (an entry of the output folder `dir`) is something this crate writes there.
fn is_ours(dir: &Path, name: &str) -> bool {
    crate::model::MODEL_FILES.contains(&name)
        || [STATE_FILE, RESULTS_FILE].contains(&name)
        || (checkpoint_step(name).is_some() && is_our_checkpoint(&dir.join(name)))
        || (name.starts_with('.') && name.contains(".tmp-"))
        || (name == crate::train::tensorboard::RUNS_DIR && holds_only_event_files(&dir.join(name)))
}

/// Whether `runs` holds only run folders of TensorBoard event files (`--report_to
/// tensorboard`). Never removed, even by `--overwrite_output_dir`: a new run adds a folder.
fn holds_only_event_files(runs: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(runs) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).all(|run| {
        std::fs::read_dir(run.path()).is_ok_and(|files| {
            files.filter_map(|f| f.ok()).all(|f| {
                f.path().is_file() && f.file_name().to_string_lossy().contains(".tfevents.")
            })
        })
    })
}

/// Removes `dir/name` when it is one of our temporary files or folders (`.NAME.tmp-PID-N`, see
/// `io::temp_sibling`) left by a process that no longer runs (killed while writing, e.g. a
/// checkpoint: an M-FAC one can weigh gigabytes). Linux only (where a process's liveness is
/// known); a temporary of a running process, ours included, is left alone.
fn remove_if_stale(dir: &Path, name: &str) {
    if !cfg!(target_os = "linux") || !name.starts_with('.') {
        return;
    }
    let Some(pid) = name
        .rsplit_once(".tmp-")
        .and_then(|(_, rest)| rest.split('-').next())
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return;
    };
    if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
        return;
    }
    let path = dir.join(name);
    let removed = if path.is_dir() {
        std::fs::remove_dir_all(&path)
    } else {
        std::fs::remove_file(&path)
    };
    match removed {
        Ok(()) => log::info!(
            "removed {}, left by process {pid} (no longer running) while writing",
            path.display()
        ),
        Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
    }
}

/// HF's rule for an output folder, before anything is written: a folder holding anything
/// besides our own files needs `overwrite` (and even then only our files are replaced); one
/// holding checkpoints of an earlier run needs `resuming` (to continue it) or `overwrite` (to
/// start over, which removes those checkpoints).
pub(crate) fn prepare_output_dir(dir: &Path, overwrite: bool, resuming: bool) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "output folder {} exists and is not a folder",
            dir.display()
        )));
    }
    let entries: Vec<String> = match std::fs::read_dir(dir) {
        Ok(e) => e
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => vec![],
    };
    let foreign: Vec<&String> = entries.iter().filter(|n| !is_ours(dir, n)).collect();
    if !foreign.is_empty() && !overwrite {
        let mut shown: Vec<&str> = foreign.iter().take(5).map(|s| s.as_str()).collect();
        shown.sort();
        return Err(Error::InvalidArgument(format!(
            "output folder {} already exists and is not empty (it holds {}{}). Use \
             --overwrite_output_dir (TrainConfig::overwrite_output_dir) to train into it anyway \
             (only the files mfac-lab writes are replaced; yours are left alone), or choose \
             another --output_dir",
            dir.display(),
            shown.join(", "),
            if foreign.len() > 5 { ", …" } else { "" }
        )));
    }
    for name in &entries {
        remove_if_stale(dir, name);
    }
    let old = checkpoints(dir)?;
    if !old.is_empty() && !resuming {
        if !overwrite {
            return Err(Error::InvalidArgument(format!(
                "output folder {} holds checkpoints of an earlier run (latest: {}). Pass \
                 --resume_from_checkpoint to continue it (Trainer::resume_from), or \
                 --overwrite_output_dir to start over (its checkpoints are then removed)",
                dir.display(),
                old[old.len() - 1].1.display()
            )));
        }
        for (_, p) in old {
            std::fs::remove_dir_all(&p).map_err(|e| Error::io("removing", &p, e))?;
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))
}

/// Builds a checkpoint with `fill` (which writes the files into the folder it is given) in a
/// temporary folder beside its final place, then renames it into `checkpoint-<step>`.
pub(crate) fn write_checkpoint(
    output_dir: &Path,
    step: usize,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dest = checkpoint_dir(output_dir, step);
    if dest.exists() && !is_our_checkpoint(&dest) {
        return Err(Error::InvalidArgument(format!(
            "{} exists and was not written by mfac-lab (an HF Trainer checkpoint?); it is left as it is: move it, or choose another --output_dir",
            dest.display()
        )));
    }
    let tmp = crate::io::temp_sibling(&dest);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if let Err(e) = crate::io::replace_dir(&tmp, &dest) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(dest)
}

/// Bytes of the files directly in `dir` (a checkpoint folder).
pub(crate) fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Deletes the oldest checkpoints until at most `limit` remain (the newest is always kept).
pub(crate) fn rotate(output_dir: &Path, limit: Option<usize>) -> Result<()> {
    let Some(limit) = limit else { return Ok(()) };
    let all = checkpoints(output_dir)?;
    let extra = all.len().saturating_sub(limit.max(1));
    for (_, p) in all.into_iter().take(extra) {
        std::fs::remove_dir_all(&p).map_err(|e| Error::io("removing", &p, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn foreign_files_need_overwrite_and_survive_it() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("notes.txt"), "mine").unwrap();
        std::fs::write(out.join("config.json"), "{}").unwrap();
        let e = prepare_output_dir(&out, false, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--overwrite_output_dir") && e.contains("notes.txt"),
            "{e}"
        );
        prepare_output_dir(&out, true, false).unwrap();
        assert_eq!(
            std::fs::read_to_string(out.join("notes.txt")).unwrap(),
            "mine"
        );
        // Only our own files: no flag needed.
        let ours = dir.path().join("ours");
        std::fs::create_dir(&ours).unwrap();
        std::fs::write(ours.join("eval_results.json"), "{}").unwrap();
        prepare_output_dir(&ours, false, false).unwrap();
    }

    #[test]
    fn checkpoints_of_an_earlier_run_need_a_decision_and_rotation_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        for s in [5, 10, 15] {
            write_checkpoint(dir.path(), s, |p| {
                std::fs::write(p.join(STATE_FILE), r#"{"mfac_lab": {}}"#)
                    .map_err(|e| Error::io("w", p, e))
            })
            .unwrap();
        }
        let e = prepare_output_dir(dir.path(), false, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--resume_from_checkpoint") && e.contains("checkpoint-15"),
            "{e}"
        );
        prepare_output_dir(dir.path(), false, true).unwrap();
        rotate(dir.path(), Some(2)).unwrap();
        let left: Vec<usize> = checkpoints(dir.path())
            .unwrap()
            .iter()
            .map(|c| c.0)
            .collect();
        assert_eq!(left, [10, 15]);
        assert_eq!(
            latest_checkpoint(dir.path()).unwrap().unwrap(),
            checkpoint_dir(dir.path(), 15)
        );
        prepare_output_dir(dir.path(), true, false).unwrap();
        assert!(checkpoints(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn an_hf_checkpoint_of_the_same_name_is_the_users() {
        let dir = tempfile::tempdir().unwrap();
        let hf = checkpoint_dir(dir.path(), 500);
        std::fs::create_dir(&hf).unwrap();
        std::fs::write(hf.join(STATE_FILE), r#"{"global_step": 500}"#).unwrap();
        // Not listed, so never resumed from or rotated away; and a foreign entry of the folder.
        assert!(checkpoints(dir.path()).unwrap().is_empty());
        let e = prepare_output_dir(dir.path(), false, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--overwrite_output_dir") && e.contains("checkpoint-500"),
            "{e}"
        );
        // Starting over with the flag removes our checkpoints only.
        prepare_output_dir(dir.path(), true, false).unwrap();
        rotate(dir.path(), Some(1)).unwrap();
        assert!(hf.join(STATE_FILE).is_file());
        // Nor is it replaced by ours of the same step.
        let e = write_checkpoint(dir.path(), 500, |_| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not written by mfac-lab"), "{e}");
        assert_eq!(
            std::fs::read_to_string(hf.join(STATE_FILE)).unwrap(),
            r#"{"global_step": 500}"#
        );
    }
}
