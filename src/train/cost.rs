//! What a run cost: where its seconds went (forward + backward, the optimizer, evaluation) and
//! the memory it held (peak resident memory, the optimizer's state, the GPU's peak).
//!
//! An M-FAC step costs more than an Adam step and its window costs memory Adam does not need:
//! a comparison that shows only accuracy per step flatters it. These are the figures that let
//! a reader weigh the two.

/// Where one run's time went and what memory it held. Built by [`crate::train::Trainer::fit`]
/// (in [`crate::train::RunHistory::cost`]); the time fields are sums over the run's steps,
/// across resumes.
///
/// ```
/// use mfac_lab::train::RunCost;
/// let c = RunCost { steps: 10, train_seconds: 2.0, fwd_bwd_seconds: 1.2, optim_seconds: 0.6,
///                   ..Default::default() };
/// assert_eq!(c.seconds_per_step(), Some(0.2));
/// assert!((c.optimizer_share().unwrap() - 1.0 / 3.0).abs() < 1e-12);
/// assert!((c.other_seconds() - 0.2).abs() < 1e-12);
/// ```
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RunCost {
    /// Optimizer steps done.
    pub steps: usize,
    /// Training seconds, evaluation excluded (the last step's `train_seconds`).
    pub train_seconds: f64,
    /// Seconds in forward and backward passes.
    pub fwd_bwd_seconds: f64,
    /// Seconds in the update: gradient clipping and the optimizer's step (M-FAC's window passes
    /// and its m×m side; AdamW's moments).
    pub optim_seconds: f64,
    /// Seconds spent evaluating.
    pub eval_seconds: f64,
    /// Peak resident memory of the process during the run (Linux's `VmHWM`, reset when the run
    /// starts), bytes; `None` where the system does not say.
    pub peak_rss_bytes: Option<u64>,
    /// Bytes of the optimizer's state (M-FAC's window and m×m matrices, AdamW's moments).
    pub state_bytes: u64,
    /// Peak memory in use on the GPU (sampled after each backward pass and each update; the
    /// whole device), bytes; `None` on the CPU.
    pub device_peak_bytes: Option<u64>,
}

impl RunCost {
    /// Training seconds per step; `None` before the first step.
    pub fn seconds_per_step(&self) -> Option<f64> {
        (self.steps > 0).then(|| self.train_seconds / self.steps as f64)
    }

    /// The optimizer's share of a step's compute: optimizer / (forward + backward + optimizer);
    /// `None` when nothing was timed.
    pub fn optimizer_share(&self) -> Option<f64> {
        let busy = self.fwd_bwd_seconds + self.optim_seconds;
        (busy > 0.0).then(|| self.optim_seconds / busy)
    }

    /// Training seconds outside the passes and the update (batching, logging, checkpoints).
    pub fn other_seconds(&self) -> f64 {
        (self.train_seconds - self.fwd_bwd_seconds - self.optim_seconds).max(0.0)
    }
}

/// Starts a new peak of resident memory for this process (Linux: writes `5` to
/// `/proc/self/clear_refs`, which resets `VmHWM` to the current resident size), so that
/// [`peak_rss_bytes`] measures from now. Whether it could; elsewhere it does nothing.
/// Process-wide: two runs training at once in one process share one peak.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident memory (Linux's `VmHWM`), bytes; `None` where unknown.
///
/// ```
/// if cfg!(target_os = "linux") {
///     let peak = mfac_lab::train::peak_rss_bytes().unwrap();
///     assert!(peak > 1 << 20);
/// }
/// ```
pub fn peak_rss_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes as text with a binary unit: `1.50 GiB`, `12.0 MiB`, `512 B`.
///
/// ```
/// assert_eq!(mfac_lab::train::human_bytes(3 << 29), "1.50 GiB");
/// assert_eq!(mfac_lab::train::human_bytes(512), "512 B");
/// ```
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if b < 1024 {
        return format!("{b} B");
    }
    let mut v = b as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if v < 10.0 {
        format!("{v:.2} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_reset_and_grows_with_an_allocation() {
        if !cfg!(target_os = "linux") {
            return;
        }
        assert!(reset_peak_rss(), "clear_refs should be writable on Linux");
        let before = peak_rss_bytes().unwrap();
        // 256 MiB touched: the peak must rise by about that much (the margins leave room for
        // other tests allocating in this process meanwhile).
        let v = vec![1u8; 256 << 20];
        let after = peak_rss_bytes().unwrap();
        assert!(v.iter().step_by(4096).all(|&x| x == 1));
        assert!(after >= before + (240 << 20), "{before} -> {after}");
        drop(v);
        assert!(reset_peak_rss());
        let reset = peak_rss_bytes().unwrap();
        assert!(reset + (192 << 20) <= after, "reset {reset} vs {after}");
    }

    #[test]
    fn shares_and_units() {
        let c = RunCost::default();
        assert_eq!((c.seconds_per_step(), c.optimizer_share()), (None, None));
        assert_eq!(human_bytes(1024), "1.00 KiB");
        assert_eq!(human_bytes(18_000_000_000), "16.8 GiB");
    }
}
