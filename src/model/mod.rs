//! The model stage: BERT for sequence classification, its config, tokenizer and I/O.

mod batch;
mod bert;
mod classifier;
mod config;
mod fastmath;
pub mod fused;
mod layers;
mod native;
mod save;
mod tokenizer;
mod weights;

pub use batch::Batch;
pub use bert::{BertModel, BertOutput};
pub use classifier::{
    best_device, BertClassifier, ClassifierOutput, LoadOptions, LoadReport, BERT_TINY_REPO,
    BERT_TINY_REVISION,
};
pub use config::{BertConfig, HiddenAct};
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
