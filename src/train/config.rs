//! `TrainConfig`: run_glue's training arguments, with the model card's recipe as a preset.

use candle_core::DType;

/// How the learning rate moves over training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// HF's default: linear decay from the peak to 0, no warmup.
    Linear,
    /// Constant learning rate.
    Constant,
}

/// run_glue's training arguments (the subset this crate uses).
///
/// ```
/// use mfac_lab::train::TrainConfig;
/// let c = TrainConfig::run_glue();
/// assert_eq!((c.batch_size, c.learning_rate, c.num_train_epochs, c.seed), (32, 1e-4, 5.0, 42));
/// assert_eq!(c.max_grad_norm, Some(1.0));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// `per_device_train_batch_size`.
    pub batch_size: usize,
    /// Peak learning rate (`--learning_rate`); M-FAC's `lr` in `--optim_args` overrides it.
    pub learning_rate: f64,
    /// `--num_train_epochs`.
    pub num_train_epochs: f64,
    /// Stop after this many optimizer steps (`--max_steps`), overriding the epochs.
    pub max_steps: Option<usize>,
    /// Truncation length.
    pub max_seq_length: usize,
    /// Seed for shuffling, dropout and a new head.
    pub seed: u64,
    /// Gradient clipping (`--max_grad_norm`, HF default 1.0); `None` turns it off.
    pub max_grad_norm: Option<f64>,
    /// The learning-rate schedule (HF default linear).
    pub schedule: Schedule,
    /// Dropout during training (the model's own rates); off makes a step deterministic.
    pub dropout: bool,
    /// Parameter dtype: F32 (default) or F64.
    pub dtype: DType,
    /// Evaluate every this many steps (besides each epoch end).
    pub eval_steps: Option<usize>,
    /// Use only the first N training rows (`--max_train_samples`).
    pub max_train_samples: Option<usize>,
    /// Use only the first N rows of each eval split (`--max_eval_samples`).
    pub max_eval_samples: Option<usize>,
    /// Pad every batch to max_seq_length (run_glue's default) instead of the longest pair.
    pub pad_to_max_length: bool,
    /// Batch size for evaluation.
    pub eval_batch_size: usize,
    /// Print no progress.
    pub quiet: bool,
}

impl Default for TrainConfig {
    /// HF `TrainingArguments` defaults: batch 8, lr 5e-5, 3 epochs, seed 42, clip 1.0, linear.
    fn default() -> Self {
        TrainConfig {
            batch_size: 8,
            learning_rate: 5e-5,
            num_train_epochs: 3.0,
            max_steps: None,
            max_seq_length: 128,
            seed: 42,
            max_grad_norm: Some(1.0),
            schedule: Schedule::Linear,
            dropout: true,
            dtype: DType::F32,
            eval_steps: None,
            max_train_samples: None,
            max_eval_samples: None,
            pad_to_max_length: false,
            eval_batch_size: 64,
            quiet: false,
        }
    }
}

impl TrainConfig {
    /// The M-FAC model card's recipe: batch 32, lr 1e-4, 5 epochs, seq 128, seed 42, clip 1.0,
    /// linear decay to 0 without warmup.
    pub fn run_glue() -> Self {
        TrainConfig {
            batch_size: 32,
            learning_rate: 1e-4,
            num_train_epochs: 5.0,
            ..Default::default()
        }
    }

    /// Total optimizer steps for `train_rows` examples (HF: ceil(rows / batch) per epoch).
    ///
    /// ```
    /// let c = mfac_lab::train::TrainConfig::run_glue();
    /// assert_eq!(c.total_steps(392_702), 5 * 12_272);
    /// ```
    pub fn total_steps(&self, train_rows: usize) -> usize {
        if let Some(s) = self.max_steps {
            return s;
        }
        let per_epoch = train_rows.div_ceil(self.batch_size.max(1));
        (per_epoch as f64 * self.num_train_epochs).ceil() as usize
    }
}
