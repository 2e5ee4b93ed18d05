//! `TrainConfig`: run_glue's training arguments, with the model card's recipe as a preset.

use crate::error::{Error, Result};
use crate::optim::OptimizerSpec;

/// How the learning rate moves over training.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// HF's default: linear decay from the peak to 0, no warmup.
    Linear,
    /// Constant learning rate.
    Constant,
}

/// Where a run reports its logs besides the history (HF's `--report_to`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReportTo {
    /// Only the history and the output files (HF 5's default).
    #[default]
    None,
    /// TensorBoard event files under `<output_dir>/runs/` (see
    /// [`crate::train::tensorboard`]): `tensorboard --logdir <output_dir>` shows them.
    TensorBoard,
}

impl ReportTo {
    /// The values `--report_to` takes.
    pub const VALUES: &'static [&'static str] = &["none", "tensorboard"];

    /// Parses HF's `--report_to` value (one integration, or a comma-separated list of them);
    /// an integration we do not write (e.g. `wandb`) is an error naming the ones we do.
    ///
    /// ```
    /// use mfac_lab::train::ReportTo;
    /// assert_eq!(ReportTo::parse("tensorboard")?, ReportTo::TensorBoard);
    /// assert_eq!(ReportTo::parse("none")?, ReportTo::None);
    /// let e = ReportTo::parse("wandb").unwrap_err().to_string();
    /// assert!(e.contains("wandb") && e.contains("none, tensorboard"), "{e}");
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn parse(value: &str) -> Result<Self> {
        let mut out = ReportTo::None;
        for v in value.split(',').map(str::trim) {
            match v.to_ascii_lowercase().as_str() {
                "none" | "" => {}
                "tensorboard" => out = ReportTo::TensorBoard,
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "--report_to {other:?}: mfac-lab writes only {} (TensorBoard event files under <output_dir>/runs/); other integrations are not supported",
                        Self::VALUES.join(", ")
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// run_glue's training arguments (the subset this crate uses).
///
/// ```
/// use mfac_lab::train::TrainConfig;
/// let c = TrainConfig::run_glue();
/// assert_eq!((c.batch_size, c.optimizer.lr(), c.num_train_epochs, c.seed), (32, 1e-4, 5.0, 42));
/// assert_eq!(c.max_grad_norm, Some(1.0));
/// ```
///
/// One source of truth each: the learning rate lives in [`TrainConfig::optimizer`] (run_glue's
/// `--learning_rate` becomes the spec's `lr` unless `--optim_args` sets one;
/// [`crate::train::Trainer::optimizer`] replaces the spec), and the parameter dtype is the
/// model's own (`LoadOptions::dtype`, `CompareConfig::dtype`).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// `per_device_train_batch_size`.
    pub batch_size: usize,
    /// The optimizer and its peak learning rate (`--optim`, `--optim_args`, `--learning_rate`).
    pub optimizer: OptimizerSpec,
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
    /// Evaluate every this many steps (besides each epoch end).
    pub eval_steps: Option<usize>,
    /// Report the loss, learning rate and gradient norm every N steps (`--logging_steps`), as a
    /// line through the progress output.
    pub logging_steps: Option<usize>,
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
    /// Also write a checkpoint every this many steps (`--save_steps`); checkpoints are always
    /// written at each evaluation when an output folder is set.
    pub save_steps: Option<usize>,
    /// Keep at most this many checkpoints, deleting the oldest (`--save_total_limit`); `None`
    /// keeps all (HF's default). An M-FAC checkpoint holds the window: m × d values.
    pub save_total_limit: Option<usize>,
    /// Train into an output folder that holds files other than ours (`--overwrite_output_dir`).
    /// Even then only the files this crate writes are replaced; nothing else is touched.
    pub overwrite_output_dir: bool,
    /// Where the logs also go (`--report_to none|tensorboard`); TensorBoard needs an output
    /// folder.
    pub report_to: ReportTo,
}

impl Default for TrainConfig {
    /// HF `TrainingArguments` defaults: batch 8, lr 5e-5, 3 epochs, seed 42, clip 1.0, linear.
    fn default() -> Self {
        TrainConfig {
            batch_size: 8,
            optimizer: OptimizerSpec::adamw(5e-5),
            num_train_epochs: 3.0,
            max_steps: None,
            max_seq_length: 128,
            seed: 42,
            max_grad_norm: Some(1.0),
            schedule: Schedule::Linear,
            dropout: true,
            eval_steps: None,
            logging_steps: None,
            max_train_samples: None,
            max_eval_samples: None,
            pad_to_max_length: false,
            eval_batch_size: 64,
            quiet: false,
            save_steps: None,
            save_total_limit: None,
            overwrite_output_dir: false,
            report_to: ReportTo::None,
        }
    }
}

impl TrainConfig {
    /// The M-FAC model card's recipe: batch 32, lr 1e-4, 5 epochs, seq 128, seed 42, clip 1.0,
    /// linear decay to 0 without warmup.
    pub fn run_glue() -> Self {
        TrainConfig {
            batch_size: 32,
            optimizer: OptimizerSpec::adamw(1e-4),
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

    /// Checks every field (positive sizes, finite numbers, a valid optimizer); the error names
    /// the run_glue flag. [`crate::train::Trainer::fit`] calls it before anything is written.
    ///
    /// ```
    /// let mut c = mfac_lab::train::TrainConfig::run_glue();
    /// assert!(c.validate().is_ok());
    /// c.num_train_epochs = f64::NAN;
    /// assert!(c.validate().unwrap_err().to_string().contains("--num_train_epochs"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, msg: String| Err(Error::InvalidArgument(format!("{flag}: {msg}")));
        let at_least_one = |flag: &str, v: usize| {
            if v == 0 {
                bad(flag, "must be at least 1".into())
            } else {
                Ok(())
            }
        };
        at_least_one("--per_device_train_batch_size", self.batch_size)?;
        at_least_one("--per_device_eval_batch_size", self.eval_batch_size)?;
        at_least_one("--max_seq_length", self.max_seq_length)?;
        for (flag, v) in [
            ("--max_steps", self.max_steps),
            ("--eval_steps", self.eval_steps),
            ("--logging_steps", self.logging_steps),
            ("--save_steps", self.save_steps),
            ("--save_total_limit", self.save_total_limit),
            ("--max_train_samples", self.max_train_samples),
            ("--max_eval_samples", self.max_eval_samples),
        ] {
            if let Some(v) = v {
                at_least_one(flag, v)?;
            }
        }
        let e = self.num_train_epochs;
        if self.max_steps.is_none() && !(e.is_finite() && e > 0.0) {
            return bad(
                "--num_train_epochs",
                format!("{e} must be positive and finite"),
            );
        }
        if let Some(g) = self.max_grad_norm {
            if !(g.is_finite() && g > 0.0) {
                return bad(
                    "--max_grad_norm",
                    format!("{g} must be positive and finite (None turns clipping off)"),
                );
            }
        }
        self.optimizer.validate()
    }
}
