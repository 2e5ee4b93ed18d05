//! Tokenize once, then batch: per-epoch shuffling from the seed, dynamic padding to the longest
//! pair of each batch (or to max_seq_length), the last partial batch kept.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::model::{Batch, PairTokenizer};

/// A split tokenized once: truncated ids and type ids per example (unpadded), and labels.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedSplit {
    /// Token ids of each example, `[CLS] a [SEP] b [SEP]`, truncated.
    pub ids: Vec<Vec<u32>>,
    /// Token type ids of each example.
    pub type_ids: Vec<Vec<u32>>,
    /// Class ids (zeros for a regression task).
    pub labels: Vec<u32>,
    /// Regression targets (stsb's scores); when set, batches carry these as f32 labels.
    pub scores: Option<Vec<f32>>,
}

impl EncodedSplit {
    /// Tokenizes `pairs` (in parallel) with `tok`'s truncation, without padding.
    ///
    /// ```
    /// use mfac_lab::{data::EncodedSplit, model::PairTokenizer};
    /// let tok = PairTokenizer::bert_base_uncased().unwrap();
    /// let s = EncodedSplit::encode(&tok, &[("a b c", "d"), ("e", "f")], &[0, 1]).unwrap();
    /// assert_eq!(s.ids[0].len(), 7);
    /// assert_eq!(s.ids[1].len(), 5);
    /// ```
    pub fn encode<A: AsRef<str> + Sync, B: AsRef<str> + Sync>(
        tok: &PairTokenizer,
        pairs: &[(A, B)],
        labels: &[u32],
    ) -> Result<Self> {
        if pairs.len() != labels.len() {
            return Err(Error::InvalidArgument(format!(
                "{} pairs but {} labels",
                pairs.len(),
                labels.len()
            )));
        }
        let enc = tok.encode_pairs_unpadded(pairs)?;
        Ok(EncodedSplit {
            ids: enc.iter().map(|e| e.get_ids().to_vec()).collect(),
            type_ids: enc.iter().map(|e| e.get_type_ids().to_vec()).collect(),
            labels: labels.to_vec(),
            scores: None,
        })
    }

    /// Tokenizes `pairs` for a regression task: `scores` become the batches' (f32) labels.
    pub fn encode_scores<A: AsRef<str> + Sync, B: AsRef<str> + Sync>(
        tok: &PairTokenizer,
        pairs: &[(A, B)],
        scores: &[f32],
    ) -> Result<Self> {
        let mut s = Self::encode(tok, pairs, &vec![0; scores.len()])?;
        s.scores = Some(scores.to_vec());
        Ok(s)
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether there are no examples.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The first `n` examples (run_glue's `max_train_samples` / `max_eval_samples`).
    pub fn truncate(&mut self, n: usize) {
        self.ids.truncate(n);
        self.type_ids.truncate(n);
        self.labels.truncate(n);
        if let Some(s) = &mut self.scores {
            s.truncate(n);
        }
    }

    /// Pads the examples at `rows` into one batch: to the longest of them, or to `pad_to` when
    /// given (pad id 0, type id 0, mask 0, on the right).
    pub fn collate(&self, rows: &[usize], pad_to: Option<usize>, device: &Device) -> Result<Batch> {
        if rows.is_empty() {
            return Err(Error::InvalidArgument("an empty batch".into()));
        }
        if let Some(&r) = rows.iter().find(|&&r| r >= self.ids.len()) {
            return Err(Error::InvalidArgument(format!(
                "row {r} is out of range: the split has {} rows (indices 0..{})",
                self.ids.len(),
                self.ids.len()
            )));
        }
        let longest = rows.iter().map(|&r| self.ids[r].len()).max().unwrap_or(0);
        let t = pad_to.unwrap_or(longest).max(longest);
        let b = rows.len();
        let (mut ids, mut types, mut mask) =
            (vec![0u32; b * t], vec![0u32; b * t], vec![0u32; b * t]);
        for (i, &r) in rows.iter().enumerate() {
            let n = self.ids[r].len();
            ids[i * t..i * t + n].copy_from_slice(&self.ids[r]);
            types[i * t..i * t + n].copy_from_slice(&self.type_ids[r]);
            mask[i * t..i * t + n].iter_mut().for_each(|m| *m = 1);
        }
        let labels = match &self.scores {
            Some(s) => {
                Tensor::from_vec(rows.iter().map(|&r| s[r]).collect::<Vec<f32>>(), b, device)?
            }
            None => Tensor::from_vec(
                rows.iter().map(|&r| self.labels[r]).collect::<Vec<u32>>(),
                b,
                device,
            )?,
        };
        Batch::new(
            Tensor::from_vec(ids, (b, t), device)?,
            Tensor::from_vec(types, (b, t), device)?,
            Tensor::from_vec(mask, (b, t), device)?,
            Some(labels),
        )
    }
}

/// The order of the rows in `epoch`: a permutation of 0..n from (seed, epoch), the same for
/// every optimizer given the same seed (so comparisons see the same data order).
///
/// ```
/// use mfac_lab::data::epoch_order;
/// let a = epoch_order(10, 42, 0);
/// assert_eq!(a, epoch_order(10, 42, 0));
/// assert_ne!(a, epoch_order(10, 42, 1));
/// let mut s = a.clone();
/// s.sort();
/// assert_eq!(s, (0..10).collect::<Vec<_>>());
/// ```
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    order.shuffle(&mut rng);
    order
}

/// The batches of one epoch: row indices in shuffled order, cut every `batch_size` (the last
/// batch may be smaller).
pub fn epoch_batches(
    n: usize,
    batch_size: usize,
    seed: u64,
    epoch: u64,
    shuffle: bool,
) -> Vec<Vec<usize>> {
    let order = if shuffle {
        epoch_order(n, seed, epoch)
    } else {
        (0..n).collect()
    };
    order
        .chunks(batch_size.max(1))
        .map(|c| c.to_vec())
        .collect()
}
