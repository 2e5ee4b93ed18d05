//! `PairTokenizer`: BERT WordPiece for sentence pairs, `[CLS] a [SEP] b [SEP]`, truncated
//! longest-first and padded to the longest in the batch, as HF's fast tokenizer does.

use std::path::Path;

use candle_core::Device;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{
    AddedToken, Encoding, PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer,
    TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::{Error, Result};
use crate::model::batch::Batch;

/// The special tokens of BERT's vocabulary.
const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// A BERT tokenizer for (premise, hypothesis) pairs.
///
/// ```
/// use mfac_lab::model::PairTokenizer;
/// let dir = tempfile::tempdir().unwrap();
/// let vocab = dir.path().join("vocab.txt");
/// std::fs::write(&vocab, "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nman\nplays\n.\nsomeone\n").unwrap();
/// let tok = PairTokenizer::from_vocab(&vocab, true).unwrap();
/// let enc = tok.encode_pairs(&[("A man plays.", "Someone plays.")]).unwrap();
/// assert_eq!(enc[0].get_tokens(), ["[CLS]", "a", "man", "plays", ".", "[SEP]", "someone", "plays", ".", "[SEP]"]);
/// assert_eq!(enc[0].get_tokens()[0], "[CLS]");
/// assert_eq!(enc[0].get_type_ids().last(), Some(&1));
/// ```
#[derive(Clone)]
pub struct PairTokenizer {
    inner: Tokenizer,
    max_length: usize,
    pad_id: u32,
    pad_to_max_length: bool,
}

impl std::fmt::Debug for PairTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PairTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("max_length", &self.max_length)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

impl PairTokenizer {
    /// Loads a `tokenizer.json`. Truncation and padding baked into the file are replaced by ours.
    pub fn from_tokenizer_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let inner =
            Tokenizer::from_file(path).map_err(|e| tok_err(format!("{}: {e}", path.display())))?;
        Self::wrap(inner)
    }

    /// Builds an uncased (if `lowercase`) BERT WordPiece tokenizer from `vocab.txt` alone, as
    /// HF's `BertTokenizerFast` does: BertNormalizer (clean text, Chinese chars, accents stripped
    /// when lowercasing), BertPreTokenizer, WordPiece (`[UNK]`, `##`, 100 chars per word).
    pub fn from_vocab(vocab: impl AsRef<Path>, lowercase: bool) -> Result<Self> {
        let vocab = vocab.as_ref();
        if !vocab.is_file() {
            return Err(Error::io(
                "reading",
                vocab,
                std::io::ErrorKind::NotFound.into(),
            ));
        }
        let map = WordPiece::read_file(&vocab.to_string_lossy())
            .map_err(|e| tok_err(format!("{}: {e}", vocab.display())))?;
        Self::from_vocab_map(map, &vocab.display().to_string(), lowercase)
    }

    /// The uncased BERT WordPiece tokenizer with the bert-base-uncased vocabulary embedded in
    /// the crate (what prajjwal1/bert-tiny uses); needs no files.
    ///
    /// ```
    /// let tok = mfac_lab::model::PairTokenizer::bert_base_uncased()?;
    /// let b = tok.batch(&[("A man sleeps.", "Nobody sleeps.")], None, &candle_core::Device::Cpu)?;
    /// assert_eq!(b.input_ids.dims()[0], 1);
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn bert_base_uncased() -> Result<Self> {
        const VOCAB: &str = include_str!("../../data/vocab/bert-base-uncased-vocab.txt");
        let map = VOCAB
            .lines()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        Self::from_vocab_map(map, "the embedded bert-base-uncased vocab", true)
    }

    fn from_vocab_map(
        map: ahash::AHashMap<String, u32>,
        source: &str,
        lowercase: bool,
    ) -> Result<Self> {
        let id = |t: &str| {
            map.get(t)
                .copied()
                .ok_or_else(|| tok_err(format!("{source} has no {t} token")))
        };
        let (cls, sep) = (id("[CLS]")?, id("[SEP]")?);
        id("[UNK]")?;
        let wp = WordPiece::builder()
            .vocab(map.clone())
            .unk_token("[UNK]".into())
            .continuing_subword_prefix("##".into())
            .max_input_chars_per_word(100)
            .build()
            .map_err(tok_err)?;
        let mut inner = Tokenizer::new(wp);
        inner
            .with_normalizer(Some(BertNormalizer::new(true, true, None, lowercase)))
            .with_pre_tokenizer(Some(BertPreTokenizer))
            .with_post_processor(Some(BertProcessing::new(
                ("[SEP]".into(), sep),
                ("[CLS]".into(), cls),
            )))
            .with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
        let specials: Vec<AddedToken> = SPECIALS
            .iter()
            .filter(|t| map.contains_key(**t))
            .map(|t| AddedToken::from(*t, true))
            .collect();
        inner.add_special_tokens(&specials);
        Self::wrap(inner)
    }

    fn wrap(inner: Tokenizer) -> Result<Self> {
        let pad_id = inner.token_to_id("[PAD]").unwrap_or(0);
        let mut t = PairTokenizer {
            inner,
            max_length: 128,
            pad_id,
            pad_to_max_length: false,
        };
        t.configure()?;
        Ok(t)
    }

    fn configure(&mut self) -> Result<()> {
        self.inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: self.max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(tok_err)?;
        self.inner.with_padding(Some(PaddingParams {
            strategy: if self.pad_to_max_length {
                PaddingStrategy::Fixed(self.max_length)
            } else {
                PaddingStrategy::BatchLongest
            },
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id: self.pad_id,
            pad_type_id: 0,
            pad_token: "[PAD]".into(),
        }));
        Ok(())
    }

    /// Sets `max_seq_length` (default 128); pairs longer than it are truncated longest-first.
    ///
    /// ```
    /// let tok = mfac_lab::model::PairTokenizer::bert_base_uncased().unwrap()
    ///     .with_max_length(8).unwrap();
    /// let enc = tok.encode_pairs(&[("one two three four five", "six seven eight")]).unwrap();
    /// assert_eq!(enc[0].len(), 8);
    /// ```
    pub fn with_max_length(mut self, max_length: usize) -> Result<Self> {
        if max_length < 4 {
            return Err(Error::InvalidArgument(format!(
                "max_seq_length {max_length} is too short for a pair (needs ≥ 4)"
            )));
        }
        self.max_length = max_length;
        self.configure()?;
        Ok(self)
    }

    /// Pads every batch to `max_seq_length` instead of the longest pair (run_glue's default;
    /// results are the same up to rounding, dynamic padding is faster).
    pub fn with_pad_to_max_length(mut self, on: bool) -> Result<Self> {
        self.pad_to_max_length = on;
        self.configure()?;
        Ok(self)
    }

    /// The truncation length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The underlying `tokenizers::Tokenizer` (with our truncation and padding set).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Tokenizes pairs (in parallel), truncated and padded together.
    pub fn encode_pairs<A: AsRef<str>, B: AsRef<str>>(
        &self,
        pairs: &[(A, B)],
    ) -> Result<Vec<Encoding>> {
        let inputs: Vec<tokenizers::EncodeInput> = pairs
            .iter()
            .map(|(a, b)| (a.as_ref().to_string(), b.as_ref().to_string()).into())
            .collect();
        self.inner.encode_batch(inputs, true).map_err(tok_err)
    }

    /// Tokenizes pairs (in parallel), truncated but not padded (for datasets tokenized once and
    /// padded per batch later).
    pub fn encode_pairs_unpadded<A: AsRef<str>, B: AsRef<str>>(
        &self,
        pairs: &[(A, B)],
    ) -> Result<Vec<Encoding>> {
        let mut plain = self.inner.clone();
        plain.with_padding(None);
        let inputs: Vec<tokenizers::EncodeInput> = pairs
            .iter()
            .map(|(a, b)| (a.as_ref().to_string(), b.as_ref().to_string()).into())
            .collect();
        plain.encode_batch(inputs, true).map_err(tok_err)
    }

    /// Tokenizes pairs into a [`Batch`] of `u32` tensors on `device`, with optional labels.
    ///
    /// ```
    /// use mfac_lab::prelude::*;
    /// let tok = PairTokenizer::bert_base_uncased().unwrap();
    /// let b = tok.batch(&[("a b", "c"), ("a", "b")], Some(&[0, 2]), &Device::Cpu).unwrap();
    /// assert_eq!(b.input_ids.dims(), &[2, 6]);
    /// ```
    pub fn batch<A: AsRef<str>, B: AsRef<str>>(
        &self,
        pairs: &[(A, B)],
        labels: Option<&[u32]>,
        device: &Device,
    ) -> Result<Batch> {
        let enc = self.encode_pairs(pairs)?;
        Batch::from_encodings(&enc, labels, device)
    }

    /// Writes `tokenizer.json` (without our truncation/padding, like HF) and `vocab.txt`.
    pub(crate) fn save(&self, dir: &Path) -> Result<()> {
        let mut plain = self.inner.clone();
        plain.with_truncation(None).map_err(tok_err)?;
        plain.with_padding(None);
        let json = dir.join("tokenizer.json");
        let text = plain
            .to_string(false)
            .map_err(|e| tok_err(format!("writing {}: {e}", json.display())))?;
        crate::io::write_bytes_atomic(&json, text.as_bytes())?;
        let mut vocab: Vec<(String, u32)> = self.inner.get_vocab(false).into_iter().collect();
        vocab.sort_by_key(|(_, id)| *id);
        let mut text = String::new();
        for (tok, _) in vocab {
            text.push_str(&tok);
            text.push('\n');
        }
        crate::io::write_bytes_atomic(&dir.join("vocab.txt"), text.as_bytes())
    }

    /// Whether the tokenizer lowercases its input (an uncased model: `do_lower_case` in HF's
    /// tokenizer_config.json), read off its normalizer.
    ///
    /// ```
    /// let tok = mfac_lab::model::PairTokenizer::bert_base_uncased()?;
    /// assert!(tok.lowercases());
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn lowercases(&self) -> bool {
        fn find(v: &serde_json::Value) -> bool {
            match v {
                serde_json::Value::Object(o) => {
                    match o.get("type").and_then(|t| t.as_str()) {
                        Some("Lowercase") => return true,
                        Some("BertNormalizer") => {
                            return o.get("lowercase").and_then(|l| l.as_bool()) == Some(true)
                        }
                        _ => {}
                    }
                    o.values().any(find)
                }
                serde_json::Value::Array(a) => a.iter().any(find),
                _ => false,
            }
        }
        self.inner
            .get_normalizer()
            .and_then(|n| serde_json::to_value(n).ok())
            .is_some_and(|v| find(&v))
    }
}
