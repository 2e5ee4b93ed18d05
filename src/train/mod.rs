//! The train stage: run_glue's recipe (`TrainConfig`), HF Trainer's step semantics (`Stepper`),
//! the training loop with evaluation and history (`Trainer`), metrics and progress.

mod checkpoint;
mod config;
mod cost;
mod disk;
mod history;
mod metrics;
pub(crate) mod progress;
mod step;
pub mod tensorboard;
mod trainer;

pub use checkpoint::{checkpoint_dir, checkpoints, latest_checkpoint, CHECKPOINT_PREFIX};
pub use config::{ReportTo, Schedule, TrainConfig};
pub use cost::{human_bytes, peak_rss_bytes, reset_peak_rss, RunCost};
pub use disk::{checkpoint_steps, free_bytes, DiskPlan};
pub use history::{EvalRecord, RunHistory, TrainRecord};
pub use metrics::{accuracy, f1, matthews, pearson, spearman};
pub use progress::Progress;
pub use step::{scalar, StepRecord, Stepper};
pub use trainer::Trainer;
