//! The train stage: run_glue's recipe (`TrainConfig`), HF Trainer's step semantics (`Stepper`),
//! the training loop with evaluation and history (`Trainer`), metrics and progress.

mod checkpoint;
mod config;
mod metrics;
mod progress;
mod step;
mod trainer;

pub use checkpoint::{checkpoint_dir, checkpoints, latest_checkpoint, CHECKPOINT_PREFIX};
pub use config::{Schedule, TrainConfig};
pub use metrics::{accuracy, f1, matthews, pearson, spearman};
pub use progress::Progress;
pub use step::{scalar, Optim, StepRecord, Stepper};
pub use trainer::{EvalRecord, RunHistory, TrainRecord, Trainer};
