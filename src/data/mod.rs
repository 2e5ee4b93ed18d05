//! The data stage: GLUE tasks and batching. (Loading the hub's parquet files with polars, and
//! the embedded MNLI sample, arrive with the rest of issue 4.)

mod batching;
mod tasks;

pub use batching::{epoch_batches, epoch_order, EncodedSplit};
pub use tasks::{GlueTask, Metric, ALL_TASKS};
