//! The train stage: run_glue's recipe (`TrainConfig`) and HF Trainer's step semantics.
//! (The epoch loop, evaluation, history and checkpoints arrive with the rest of issue 4.)

mod config;
mod step;

pub use config::{Schedule, TrainConfig};
pub use step::{scalar, Optim, StepRecord, Stepper};
