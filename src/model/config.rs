//! `BertConfig`: HF's config.json for BERT, with defaults for what older files (prajjwal1) lack.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The activation function of the feed-forward block (`hidden_act` in config.json).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenAct {
    /// `"gelu"`: the exact erf GELU, `0.5 x (1 + erf(x / sqrt 2))` (BERT's).
    Gelu,
    /// `"gelu_new"`, `"gelu_pytorch_tanh"`, `"gelu_fast"`: the tanh approximation.
    GeluTanh,
    /// `"relu"`.
    Relu,
}

impl HiddenAct {
    /// Parses config.json's `hidden_act`.
    ///
    /// ```
    /// use mfac_lab::model::HiddenAct;
    /// assert_eq!(HiddenAct::parse("gelu"), Some(HiddenAct::Gelu));
    /// assert_eq!(HiddenAct::parse("swish"), None);
    /// ```
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "gelu" => Some(HiddenAct::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(HiddenAct::GeluTanh),
            "relu" => Some(HiddenAct::Relu),
            _ => None,
        }
    }
}

fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_dropout() -> f64 {
    0.1
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_model_type() -> String {
    "bert".into()
}
fn default_position_embedding_type() -> String {
    "absolute".into()
}
fn default_type_vocab_size() -> usize {
    2
}
fn default_max_position_embeddings() -> usize {
    512
}

/// BERT's config.json. Fields follow HF names; unknown keys are ignored, and keys that older
/// files lack (`layer_norm_eps`, `pad_token_id`, `model_type`, `id2label`) get HF's defaults.
///
/// ```
/// use mfac_lab::model::BertConfig;
/// // prajjwal1/bert-tiny's config.json, as published (no layer_norm_eps, no pad_token_id).
/// let cfg = BertConfig::from_json_str(r#"{"hidden_size": 128, "hidden_act": "gelu",
///   "initializer_range": 0.02, "vocab_size": 30522, "hidden_dropout_prob": 0.1,
///   "num_attention_heads": 2, "type_vocab_size": 2, "max_position_embeddings": 512,
///   "num_hidden_layers": 2, "intermediate_size": 512, "attention_probs_dropout_prob": 0.1}"#).unwrap();
/// assert_eq!(cfg.layer_norm_eps, 1e-12);
/// assert_eq!(cfg.pad_token_id, 0);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Size of the WordPiece vocabulary.
    pub vocab_size: usize,
    /// Width of the hidden states (H).
    pub hidden_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer (H must be divisible by it).
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Activation of the feed-forward block (see [`HiddenAct`]).
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    /// Dropout on embeddings, attention output, FFN output (and the classifier by default).
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    /// Dropout on the attention probabilities.
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    /// Dropout before the classifier; `None` = `hidden_dropout_prob`.
    #[serde(default)]
    pub classifier_dropout: Option<f64>,
    /// Number of learned positions.
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// Number of token types (segments).
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: usize,
    /// Std of the normal initialisation of new weights.
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    /// LayerNorm epsilon (inside the square root).
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Id of `[PAD]`.
    #[serde(default)]
    pub pad_token_id: u32,
    /// `"bert"`.
    #[serde(default = "default_model_type")]
    pub model_type: String,
    /// Only `"absolute"` is supported.
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    /// Label names by id (keys are strings in JSON: `"0"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id2label: Option<BTreeMap<String, String>>,
    /// Ids by label name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label2id: Option<BTreeMap<String, usize>>,
}

impl BertConfig {
    /// prajjwal1/bert-tiny's architecture: 2 layers, H = 128, 2 heads, FFN 512, vocab 30522.
    ///
    /// ```
    /// let cfg = mfac_lab::model::BertConfig::bert_tiny();
    /// assert_eq!((cfg.num_hidden_layers, cfg.hidden_size), (2, 128));
    /// ```
    pub fn bert_tiny() -> Self {
        BertConfig {
            vocab_size: 30522,
            hidden_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 512,
            hidden_act: default_hidden_act(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            classifier_dropout: None,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            model_type: default_model_type(),
            position_embedding_type: default_position_embedding_type(),
            id2label: None,
            label2id: None,
        }
    }

    /// Parses config.json text and validates it.
    ///
    /// ```
    /// use mfac_lab::model::BertConfig;
    /// assert!(BertConfig::from_json_str("{not json").is_err());
    /// ```
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::parse_at(text, Path::new("config.json"))
    }

    /// Reads and validates a config.json file.
    ///
    /// ```no_run
    /// let cfg = mfac_lab::model::BertConfig::from_file("my-model/config.json").unwrap();
    /// ```
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
        Self::parse_at(&text, path)
    }

    fn parse_at(text: &str, path: &Path) -> Result<Self> {
        let cfg: BertConfig = serde_json::from_str(text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate().map_err(|message| Error::Config {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(cfg)
    }

    /// Checks that the config describes a BERT we can build; the message says what is wrong.
    ///
    /// ```
    /// let mut cfg = mfac_lab::model::BertConfig::bert_tiny();
    /// cfg.hidden_act = "swish".into();
    /// assert!(cfg.validate().unwrap_err().contains("hidden_act"));
    /// ```
    pub fn validate(&self) -> std::result::Result<(), String> {
        if HiddenAct::parse(&self.hidden_act).is_none() {
            return Err(format!(
                "unknown hidden_act {:?}; supported: \"gelu\" (exact erf), \"gelu_new\", \"gelu_pytorch_tanh\", \"gelu_fast\", \"relu\"",
                self.hidden_act
            ));
        }
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        let p = [
            ("hidden_dropout_prob", Some(self.hidden_dropout_prob)),
            (
                "attention_probs_dropout_prob",
                Some(self.attention_probs_dropout_prob),
            ),
            ("classifier_dropout", self.classifier_dropout),
        ];
        for (name, v) in p {
            if let Some(v) = v {
                if !(0.0..1.0).contains(&v) {
                    return Err(format!("{name} = {v} is not in [0, 1)"));
                }
            }
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return Err(format!(
                "layer_norm_eps = {} must be positive",
                self.layer_norm_eps
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(format!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                self.position_embedding_type
            ));
        }
        if self.pad_token_id as usize >= self.vocab_size {
            return Err(format!(
                "pad_token_id {} is outside the vocabulary",
                self.pad_token_id
            ));
        }
        Ok(())
    }

    /// The activation, parsed (validated configs always have one).
    pub fn activation(&self) -> HiddenAct {
        HiddenAct::parse(&self.hidden_act).unwrap_or(HiddenAct::Gelu)
    }

    /// The classifier's dropout: `classifier_dropout` if set, else `hidden_dropout_prob`.
    pub fn classifier_dropout_prob(&self) -> f64 {
        self.classifier_dropout.unwrap_or(self.hidden_dropout_prob)
    }

    /// Head size: `hidden_size / num_attention_heads`.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Label names in id order: config's `id2label` when it has `num_labels` entries, else MNLI's
    /// names for 3 labels, else `LABEL_i` (as HF does).
    ///
    /// ```
    /// let cfg = mfac_lab::model::BertConfig::bert_tiny();
    /// assert_eq!(cfg.label_names(3), vec!["entailment", "neutral", "contradiction"]);
    /// assert_eq!(cfg.label_names(2), vec!["LABEL_0", "LABEL_1"]);
    /// ```
    pub fn label_names(&self, num_labels: usize) -> Vec<String> {
        if let Some(map) = &self.id2label {
            let names: Option<Vec<String>> = (0..num_labels)
                .map(|i| map.get(&i.to_string()).cloned())
                .collect();
            if let Some(names) = names {
                if map.len() == num_labels && !names.iter().all(|n| n.starts_with("LABEL_")) {
                    return names;
                }
            }
        }
        if num_labels == 3 {
            return ["entailment", "neutral", "contradiction"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        }
        (0..num_labels).map(|i| format!("LABEL_{i}")).collect()
    }
}
