//! `save_pretrained`: HF layout, written atomically (temporary folder, then rename).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::error::{Error, Result};
use crate::model::classifier::BertClassifier;

/// A sibling path of `dir` with a unique suffix.
fn sibling(dir: &Path, tag: &str) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    dir.with_file_name(format!(".{name}.{tag}-{}-{nanos}", std::process::id()))
}

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
    obj.insert("problem_type".into(), "single_label_classification".into());
    Ok(v)
}

fn write_all(model: &BertClassifier, tmp: &Path) -> Result<()> {
    let write = |name: &str, bytes: &[u8]| {
        let p = tmp.join(name);
        std::fs::write(&p, bytes).map_err(|e| Error::io("writing", p, e))
    };
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
    let path = tmp.join("model.safetensors");
    safetensors::serialize_to_file(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(meta),
        &path,
    )
    .map_err(|e| Error::Weights {
        path: path.clone(),
        message: e.to_string(),
    })?;
    if let Ok(tok) = model.tokenizer() {
        tok.save(tmp)?;
        let tc = serde_json::json!({
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": true,
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

pub(crate) fn save_pretrained(model: &BertClassifier, dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::InvalidArgument(format!(
            "{} exists and is not a folder",
            dir.display()
        )));
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("creating", parent, e))?;
    }
    let tmp = sibling(dir, "tmp");
    std::fs::create_dir(&tmp).map_err(|e| Error::io("creating", &tmp, e))?;
    if let Err(e) = write_all(model, &tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    // Swap into place: an existing folder is moved aside first and removed only afterwards.
    let old = dir.exists().then(|| sibling(dir, "old"));
    if let Some(old) = &old {
        if let Err(e) = std::fs::rename(dir, old) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::io("moving aside", dir, e));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, dir) {
        if let Some(old) = &old {
            let _ = std::fs::rename(old, dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::io("renaming into", dir, e));
    }
    if let Some(old) = old {
        let _ = std::fs::remove_dir_all(old);
    }
    Ok(())
}
