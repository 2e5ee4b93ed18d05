//! The model stage: BERT for sequence classification = typed parameters ([`params`]) + config
//! + tokenizer, and the engines that run it ([`Engine`]: candle's graph, the CPU pass).
//!
//! | file | what |
//! |---|---|
//! | `classifier.rs` | [`BertClassifier`]: loading, the loss, the entry points |
//! | `params.rs` | the parameters, one struct per HF module, named as HF names them |
//! | `engine/` | `graph.rs` (candle ops, autograd), `cpu/` (the hand-written pass), the choice |
//! | `math.rs`, `fastmath.rs` | the one float trait and the scalar maths the passes share |
//! | `config.rs`, `tokenizer.rs`, `batch.rs`, `weights.rs`, `save.rs` | HF config, tokenizer, batches, checkpoint I/O |

mod batch;
mod classifier;
mod config;
pub(crate) mod engine;
mod fastmath;
mod math;
pub mod params;
mod save;
mod tokenizer;
mod weights;

pub use batch::Batch;
pub use classifier::{
    best_device, describe_device, device_report, BertClassifier, DeviceReport, LoadOptions,
    LoadReport, BERT_TINY_REPO, BERT_TINY_REVISION,
};
pub use config::{BertConfig, HiddenAct};
pub use engine::{BertOutput, ClassifierOutput, Engine};
pub(crate) use save::{write_all as save_model_files, MODEL_FILES};
pub use tokenizer::PairTokenizer;
pub use weights::WeightMap;

use crate::error::Result;

/// prajjwal1/bert-tiny with a fresh 3-way head (MNLI), f32, on the best device; from the hub
/// (through the cache; `HF_HUB_OFFLINE=1` for cache only).
///
/// ```no_run
/// let model = mfac_lab::prelude::load_bert_tiny()?;
/// # Ok::<(), mfac_lab::Error>(())
/// ```
pub fn load_bert_tiny() -> Result<BertClassifier> {
    let opts = LoadOptions::default().revision(BERT_TINY_REVISION);
    BertClassifier::from_pretrained(BERT_TINY_REPO, &opts)
}
