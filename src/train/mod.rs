//! The train stage: run_glue's recipe (`TrainConfig`), HF Trainer's step semantics (`Stepper`),
//! the training loop with evaluation and history (`Trainer`), metrics and progress.

mod config;
mod metrics;
mod progress;
mod step;
mod trainer;

pub use config::{Schedule, TrainConfig};
pub use metrics::{accuracy, f1, matthews, pearson, spearman};
pub use progress::Progress;
pub use step::{scalar, Optim, StepRecord, Stepper};
pub use trainer::{
    write_bytes_atomic, write_json_atomic, EvalRecord, RunHistory, TrainRecord, Trainer,
};
