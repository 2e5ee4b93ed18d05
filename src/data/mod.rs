//! The data stage: GLUE tasks, loading (hub, local folder, the embedded MNLI sample) and
//! batching.

mod batching;
mod glue;
mod tasks;

pub use batching::{epoch_batches, epoch_order, EncodedSplit};
pub use glue::{
    load_glue, load_glue_at, load_glue_dir, load_mnli, mnli_sample, read_split, GlueData,
    GLUE_REPO, GLUE_REVISION,
};
pub use tasks::{GlueTask, Metric, ALL_TASKS};
