//! The train stage: run_glue's recipe (`TrainConfig`), HF Trainer's step semantics (`Stepper`),
//! the training loop with evaluation and history (`Trainer`), metrics and progress.

mod checkpoint;
mod config;
mod history;
mod metrics;
mod progress;
mod step;
mod trainer;

pub use checkpoint::{checkpoint_dir, checkpoints, latest_checkpoint, CHECKPOINT_PREFIX};
pub use config::{Schedule, TrainConfig};
pub use history::{EvalRecord, RunHistory, TrainRecord};
pub use metrics::{accuracy, f1, matthews, pearson, spearman};
pub use progress::Progress;
pub use step::{scalar, StepRecord, Stepper};
pub use trainer::Trainer;
