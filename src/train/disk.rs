//! The disk plan: what a run's checkpoints and final files will take in the output folder,
//! checked against the free space of its file system before the first step — beside the
//! memory plan that refuses an M-FAC window that does not fit in RAM.
//!
//! An M-FAC checkpoint holds the window (num_grads × d values: 18 GB in f32 at the card's 1024
//! gradients for bert-tiny), and HF's default keeps every checkpoint: the card's 5 epochs would
//! write 90 GB unasked. Without this plan a run finds out when the disk is full, hours in.

use std::path::Path;

use crate::error::{Error, Result};
use crate::train::human_bytes;

/// Bytes of `trainer_state.json` per step recorded (each step's record is kept twice: HF's
/// `log_history` and the resume state; ~200 bytes each as JSON), rounded up.
const STATE_BYTES_PER_STEP: u64 = 512;
/// The model folder's small files (config, tokenizer, eval results), rounded up.
const SMALL_FILES: u64 = 4 << 20;

/// What a run will write to its output folder, and whether it fits.
///
/// ```
/// use mfac_lab::train::DiskPlan;
/// // 10 checkpoints of 1 GB optimizer state, keeping all: 10 at once.
/// let p = DiskPlan::new(100 << 20, 1 << 30, &[100, 200, 300, 400, 500, 600, 700, 800, 900, 1000], 1000, 0, None);
/// assert_eq!(p.at_once, 10);
/// assert!(p.check(Path::new("out"), Some(5 << 30), false).is_err());
/// // Keeping 1: the new one is written before the old one goes, so 2 at once.
/// let p = DiskPlan::new(100 << 20, 1 << 30, &[100, 200, 300], 1000, 0, Some(1));
/// assert_eq!(p.at_once, 2);
/// assert!(p.check(Path::new("out"), Some(5 << 30), false).is_ok());
/// # use std::path::Path;
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct DiskPlan {
    /// Bytes of one checkpoint: the model, the optimizer state, trainer_state.json at its
    /// largest, the small files.
    pub checkpoint_bytes: u64,
    /// The model's weights file.
    pub model_bytes: u64,
    /// The optimizer's state file (about [`crate::optim::Optim::state_bytes`]).
    pub optimizer_bytes: u64,
    /// Checkpoints this run will write (at each evaluation, every `save_steps`).
    pub checkpoints: usize,
    /// The most new checkpoints on disk at one moment (`save_total_limit` counted: a new one
    /// is complete before the oldest is removed).
    pub at_once: usize,
    /// Checkpoints of this run already in the folder (a resumed run).
    pub existing: usize,
    /// The final model, trainer_state.json and eval results.
    pub final_bytes: u64,
    /// All of it at the worst moment.
    pub needed: u64,
    /// For a dense M-FAC run: the optimizer state of the same run with the sparse window at
    /// 1 % (`density: 0.01`), named among the fixes when the plan does not fit.
    pub sparse_optimizer_bytes: Option<u64>,
}

impl DiskPlan {
    /// The plan for a run that writes checkpoints at `steps`, `total` steps in all, with
    /// `existing` checkpoints of its own already in the folder (a resumed run) and at most
    /// `limit` kept.
    pub fn new(
        model_bytes: u64,
        optimizer_bytes: u64,
        steps: &[usize],
        total: usize,
        existing: usize,
        limit: Option<usize>,
    ) -> Self {
        let state = STATE_BYTES_PER_STEP * total as u64;
        let checkpoint_bytes = model_bytes + optimizer_bytes + state + SMALL_FILES;
        let n = steps.len();
        let at_once = at_once(n, existing, limit);
        let final_bytes = model_bytes + state + SMALL_FILES;
        DiskPlan {
            checkpoint_bytes,
            model_bytes,
            optimizer_bytes,
            checkpoints: n,
            existing,
            at_once,
            final_bytes,
            needed: at_once as u64 * checkpoint_bytes + final_bytes,
            sparse_optimizer_bytes: None,
        }
    }

    /// The same plan, naming the sparse window (its optimizer state `bytes` per checkpoint)
    /// among the fixes when it does not fit.
    pub fn with_sparse_alternative(self, bytes: Option<u64>) -> Self {
        DiskPlan {
            sparse_optimizer_bytes: bytes,
            ..self
        }
    }

    /// One line for the log: the numbers behind `needed`.
    pub fn describe(&self) -> String {
        format!(
            "{} checkpoint{} of {} each (model {}, optimizer state {}), at most {} on disk at once, plus the final model and state ({}): {} in all",
            self.checkpoints,
            if self.checkpoints == 1 { "" } else { "s" },
            human_bytes(self.checkpoint_bytes),
            human_bytes(self.model_bytes),
            human_bytes(self.optimizer_bytes),
            self.at_once,
            human_bytes(self.final_bytes),
            human_bytes(self.needed)
        )
    }

    /// `Ok` when `free` bytes (of `dir`'s file system; `None`: unknown, not checked) hold the
    /// plan; else [`Error::NotEnoughDisk`] with the numbers and the fixes (`mfac` adds the bf16
    /// window to them).
    pub fn check(&self, dir: &Path, free: Option<u64>, bf16_would_help: bool) -> Result<()> {
        let Some(free) = free else { return Ok(()) };
        if self.needed <= free {
            return Ok(());
        }
        let mut fixes = vec![];
        let one = at_once(self.checkpoints, self.existing, Some(1));
        if one < self.at_once {
            let need = self.final_bytes + one as u64 * self.checkpoint_bytes;
            fixes.push(format!(
                "--save_total_limit 1 (TrainConfig::save_total_limit; needs about {})",
                human_bytes(need)
            ));
        }
        if bf16_would_help {
            fixes.push(
                "a bf16 window (`window_dtype: bf16` in --optim_args) halves M-FAC's state".into(),
            );
        }
        if let Some(sparse) = self.sparse_optimizer_bytes {
            let need = self.needed - self.at_once as u64 * self.optimizer_bytes
                + self.at_once as u64 * sparse;
            fixes.push(format!(
                "the sparse window (`density: 0.01` in --optim_args) keeps {} of M-FAC state per checkpoint instead of {} (the run needs about {})",
                human_bytes(sparse),
                human_bytes(self.optimizer_bytes),
                human_bytes(need)
            ));
        }
        fixes.push("another --output_dir on a disk with more room".into());
        Err(Error::NotEnoughDisk {
            dir: dir.to_path_buf(),
            detail: format!(
                "it needs about {} ({}) but {} is free. Fixes: {}",
                human_bytes(self.needed),
                self.describe(),
                human_bytes(free),
                fixes.join("; ")
            ),
        })
    }
}

/// The most new checkpoints on disk at one moment: `n` written, `existing` there before, at
/// most `limit` kept. After the i-th new one is written (before rotation) the folder holds
/// min(existing + i − 1, K) + 1, of which `existing` were there before.
fn at_once(n: usize, existing: usize, limit: Option<usize>) -> usize {
    match limit {
        Some(k) if n > 0 => ((existing + n - 1).min(k.max(1)) + 1).saturating_sub(existing),
        _ => n,
    }
}

/// Free bytes for us on the file system holding `path` (or its nearest existing ancestor);
/// `None` where unknown. `MFAC_LAB_FREE_BYTES` replaces the figure (for tests of the plan
/// through the command line; never set it otherwise).
pub fn free_bytes(path: &Path) -> Option<u64> {
    if let Some(v) = std::env::var("MFAC_LAB_FREE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Some(v);
    }
    let mut p = path;
    while !p.exists() {
        p = p.parent().filter(|q| !q.as_os_str().is_empty())?;
    }
    statvfs_free(p)
}

#[cfg(target_os = "linux")]
fn statvfs_free(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized, writable struct.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some(s.f_bavail as u64 * s.f_frsize as u64)
}

#[cfg(not(target_os = "linux"))]
fn statvfs_free(_p: &Path) -> Option<u64> {
    None
}

/// The steps at which a run writes checkpoints, after `done` and up to `total`: every
/// evaluation (every `eval_steps` and each epoch end, `per_epoch` steps each) and every
/// `save_steps` (the trainer's rule in `Trainer::fit`).
///
/// ```
/// // 10 steps per epoch, 2 epochs, save every 4: evaluations at 10 and 20, saves at 4, 8, 12, 16.
/// let s = mfac_lab::train::checkpoint_steps(0, 20, 10, None, Some(4));
/// assert_eq!(s, [4, 8, 10, 12, 16, 20]);
/// ```
pub fn checkpoint_steps(
    done: usize,
    total: usize,
    per_epoch: usize,
    eval_steps: Option<usize>,
    save_steps: Option<usize>,
) -> Vec<usize> {
    let every = |n: Option<usize>, s: usize| n.is_some_and(|n| s % n == 0);
    (done + 1..=total)
        .filter(|&s| {
            every(save_steps, s) || every(eval_steps, s) || s % per_epoch.max(1) == 0 || s == total
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_names_the_numbers_and_the_fixes() {
        // The card's M-FAC run: 5 epochs of 12,272 steps, a checkpoint per epoch, the f32 window
        // (17.97 GB) in each; 100 GB free is not enough, 60 GB with --save_total_limit 1 is.
        let steps = checkpoint_steps(0, 61_360, 12_272, None, None);
        assert_eq!(steps, [12_272, 24_544, 36_816, 49_088, 61_360]);
        let window = 1024 * 4_386_307 * 4;
        let p = DiskPlan::new(17_545_228, window, &steps, 61_360, 0, None);
        assert_eq!(p.at_once, 5);
        assert!(p.needed > 5 * window);
        let e = p
            .check(Path::new("/data/out"), Some(80_000_000_000), true)
            .unwrap_err()
            .to_string();
        for want in [
            "/data/out",
            "74.5 GiB is free",
            "5 checkpoints of 16.8 GiB",
            "--save_total_limit 1",
            "window_dtype: bf16",
            "another --output_dir",
        ] {
            assert!(e.contains(want), "{want:?} not in: {e}");
        }
        // The limit's figure in the fix is the plan with the limit.
        let one = DiskPlan::new(17_545_228, window, &steps, 61_360, 0, Some(1));
        assert_eq!(one.at_once, 2);
        assert!(
            e.contains(&format!("needs about {}", human_bytes(one.needed))),
            "{e}"
        );
        assert!(one
            .check(Path::new("/data/out"), Some(80_000_000_000), true)
            .is_ok());
        // Unknown free space: not checked.
        assert!(p.check(Path::new("x"), None, true).is_ok());
    }

    #[test]
    fn a_resumed_run_counts_the_checkpoints_already_there() {
        // Two of ours on disk, keep 2: each new one is written beside them, then the oldest goes.
        let p = DiskPlan::new(1, 1, &[30, 40], 40, 2, Some(2));
        assert_eq!(p.at_once, 1);
        // None on disk, keep 3, five to write: at most 4 at once.
        assert_eq!(
            DiskPlan::new(1, 1, &[1, 2, 3, 4, 5], 5, 0, Some(3)).at_once,
            4
        );
        assert_eq!(DiskPlan::new(1, 1, &[], 5, 0, Some(3)).at_once, 0);
        assert_eq!(checkpoint_steps(15, 20, 10, Some(3), None), [18, 20]);
    }

    #[test]
    fn free_space_of_a_missing_folder_is_its_parents() {
        let dir = tempfile::tempdir().unwrap();
        if std::env::var("MFAC_LAB_FREE_BYTES").is_ok() || !cfg!(target_os = "linux") {
            return;
        }
        let deep = free_bytes(&dir.path().join("a/b/c")).unwrap();
        let here = free_bytes(dir.path()).unwrap();
        assert!(
            deep > 0 && deep.abs_diff(here) < 1 << 30,
            "{deep} vs {here}"
        );
    }
}
