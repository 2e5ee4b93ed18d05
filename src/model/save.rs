//! `save_pretrained`: HF layout. Each file is written atomically (temporary file, then rename)
//! and every other file in the folder is left untouched.

use std::collections::HashMap;
use std::path::Path;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::io::{write_atomic_with, write_bytes_atomic};
use crate::model::classifier::BertClassifier;

fn config_json(model: &BertClassifier) -> Result<serde_json::Value> {
    let names = model.config().label_names(model.num_labels());
    let mut cfg = model.config().clone();
    cfg.id2label = Some(
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (i.to_string(), n.clone()))
            .collect(),
    );
    cfg.label2id = Some(
        names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect(),
    );
    cfg.model_type = "bert".into();
    let mut v = serde_json::to_value(&cfg)?;
    let obj = v.as_object_mut().expect("a struct serialises to an object");
    obj.insert(
        "architectures".into(),
        serde_json::json!(["BertForSequenceClassification"]),
    );
    let dtype = if model.dtype() == DType::F64 {
        "float64"
    } else {
        "float32"
    };
    obj.insert("torch_dtype".into(), dtype.into());
    // HF's rule (modeling_bert.py, BertForSequenceClassification.forward): one output is
    // regression (MSE, stsb), more are single-label classification.
    let problem = if model.num_labels() == 1 {
        "regression"
    } else {
        "single_label_classification"
    };
    obj.insert("problem_type".into(), problem.into());
    Ok(v)
}

/// Writes the model's files into the existing folder `dir`, each atomically.
pub(crate) fn write_all(model: &BertClassifier, dir: &Path) -> Result<()> {
    let write = |name: &str, bytes: &[u8]| write_bytes_atomic(&dir.join(name), bytes);
    write(
        "config.json",
        serde_json::to_string_pretty(&config_json(model)?)?.as_bytes(),
    )?;
    let tensors: Vec<(String, candle_core::Tensor)> = model
        .named_vars()
        .iter()
        .map(|(n, v)| {
            Ok((
                n.clone(),
                v.as_tensor().to_device(&candle_core::Device::Cpu)?,
            ))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let path = dir.join("model.safetensors");
    write_atomic_with(&path, |tmp| {
        safetensors::serialize_to_file(
            tensors.iter().map(|(n, t)| (n.as_str(), t)),
            Some(meta),
            tmp,
        )
        .map_err(|e| Error::cannot_write(&path, format!("writing the model: {e}")))
    })?;
    if let Ok(tok) = model.tokenizer() {
        tok.save(dir)?;
        let tc = serde_json::json!({
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": tok.lowercases(),
            "model_max_length": tok.max_length(),
            "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
            "unk_token": "[UNK]", "mask_token": "[MASK]"
        });
        write(
            "tokenizer_config.json",
            serde_json::to_string_pretty(&tc)?.as_bytes(),
        )?;
    }
    Ok(())
}

/// The files [`write_all`] writes (what an output folder may hold of ours).
pub(crate) const MODEL_FILES: [&str; 5] = [
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
];

impl BertClassifier {
    /// Writes the model in HF layout (config.json, model.safetensors, tokenizer files), loadable
    /// by transformers. Each file is written to a temporary file and renamed into place, so a
    /// crash never leaves a half-written file; the model files already in `dir` are replaced and
    /// every other file there is left untouched.
    ///
    /// ```
    /// use mfac_lab::prelude::*;
    /// let dir = tempfile::tempdir().unwrap();
    /// let m = BertClassifier::random(&BertConfig::bert_tiny(), 3, 0, &Device::Cpu, DType::F32)?
    ///     .with_tokenizer(PairTokenizer::bert_base_uncased()?);
    /// m.save_pretrained(dir.path())?;
    /// assert!(dir.path().join("model.safetensors").is_file());
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        if dir.exists() && !dir.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{} exists and is not a folder",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        write_all(self, dir)
    }
}
