//! HF's linear learning-rate schedule (no warmup): from `lr` at step 0 down to 0 at the end.

/// `lr_at(step) = lr · max(0, total − step) / total`, HF's `get_linear_schedule_with_warmup`
/// with 0 warmup steps.
///
/// ```
/// let s = mfac_lab::optim::LinearSchedule::new(1e-4, 100);
/// assert_eq!(s.lr_at(0), 1e-4);
/// assert!((s.lr_at(50) - 5e-5).abs() < 1e-18);
/// assert_eq!(s.lr_at(100), 0.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearSchedule {
    /// The peak (initial) learning rate.
    pub lr: f64,
    /// Total optimizer steps.
    pub total_steps: usize,
}

impl LinearSchedule {
    /// A schedule over `total_steps` steps.
    pub fn new(lr: f64, total_steps: usize) -> Self {
        LinearSchedule { lr, total_steps }
    }

    /// The learning rate used for optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        let total = self.total_steps.max(1) as f64;
        self.lr * (self.total_steps.saturating_sub(step) as f64 / total).max(0.0)
    }
}
