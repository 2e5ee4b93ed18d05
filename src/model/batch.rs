//! `Batch`: the tensors one forward pass takes.

use candle_core::{Device, Tensor};
use tokenizers::Encoding;

use crate::error::{Error, Result};

/// One batch of tokenized pairs: `u32` tensors `[B, T]` (labels `[B]`).
///
/// ```
/// use mfac_lab::prelude::*;
/// let ids = Tensor::new(&[[101u32, 7, 102, 0]], &Device::Cpu).unwrap();
/// let b = Batch::new(ids.clone(), ids.zeros_like().unwrap(), ids.ne(0u32).unwrap().to_dtype(DType::U32).unwrap(), None).unwrap();
/// assert_eq!(b.len(), 1);
/// ```
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids.
    pub input_ids: Tensor,
    /// 0 for `[CLS] a [SEP]`, 1 for `b [SEP]`, 0 for padding.
    pub token_type_ids: Tensor,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Class ids, when known.
    pub labels: Option<Tensor>,
}

impl Batch {
    /// A batch from tensors; shapes are checked.
    pub fn new(
        input_ids: Tensor,
        token_type_ids: Tensor,
        attention_mask: Tensor,
        labels: Option<Tensor>,
    ) -> Result<Self> {
        let b = Batch {
            input_ids,
            token_type_ids,
            attention_mask,
            labels,
        };
        b.validate()?;
        Ok(b)
    }

    /// Checks the shapes and dtypes (the fields are public, so a batch may be built by hand):
    /// three integer tensors `[B, T]` with B, T ≥ 1 on one device, labels `[B]`. Every model
    /// entry point calls this first, so a bad batch is an error, never a panic.
    ///
    /// ```
    /// use mfac_lab::prelude::*;
    /// let ids = Tensor::new(&[[101u32, 7, 102]], &Device::Cpu).unwrap();
    /// let bad = Batch { input_ids: ids.clone(), token_type_ids: ids.narrow(1, 0, 2).unwrap(), attention_mask: ids, labels: None };
    /// assert!(bad.validate().unwrap_err().to_string().contains("token_type_ids"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let dims = self.input_ids.dims().to_vec();
        if dims.len() != 2
            || dims.contains(&0)
            || self.token_type_ids.dims() != dims
            || self.attention_mask.dims() != dims
        {
            return Err(Error::InvalidArgument(format!(
                "batch tensors must all be [B, T] with B, T ≥ 1: input_ids {:?}, token_type_ids {:?}, attention_mask {:?}",
                self.input_ids.dims(),
                self.token_type_ids.dims(),
                self.attention_mask.dims()
            )));
        }
        for (name, t) in [
            ("input_ids", &self.input_ids),
            ("token_type_ids", &self.token_type_ids),
            ("attention_mask", &self.attention_mask),
        ] {
            if !t.dtype().is_int() {
                return Err(Error::InvalidArgument(format!(
                    "batch {name} is {:?}: token tensors must be integers (u32)",
                    t.dtype()
                )));
            }
            if !t.device().same_device(self.input_ids.device()) {
                return Err(Error::InvalidArgument(format!(
                    "batch {name} is on another device than input_ids"
                )));
            }
        }
        if let Some(l) = &self.labels {
            if l.dims() != [dims[0]] {
                return Err(Error::InvalidArgument(format!(
                    "labels {:?} must be [B] = [{}]",
                    l.dims(),
                    dims[0]
                )));
            }
        }
        Ok(())
    }

    /// Packs tokenizer encodings (all of one length) into a batch on `device`.
    pub fn from_encodings(
        enc: &[Encoding],
        labels: Option<&[u32]>,
        device: &Device,
    ) -> Result<Self> {
        let b = enc.len();
        if b == 0 {
            return Err(Error::InvalidArgument("an empty batch".into()));
        }
        let t = enc[0].len();
        if enc.iter().any(|e| e.len() != t) {
            return Err(Error::InvalidArgument(
                "encodings of different lengths: pad them first".into(),
            ));
        }
        let flat = |f: &dyn Fn(&Encoding) -> &[u32]| -> Result<Tensor> {
            let v: Vec<u32> = enc.iter().flat_map(|e| f(e).iter().copied()).collect();
            Ok(Tensor::from_vec(v, (b, t), device)?)
        };
        let labels = match labels {
            Some(l) if l.len() != b => {
                return Err(Error::InvalidArgument(format!(
                    "{} labels for {b} pairs",
                    l.len()
                )));
            }
            Some(l) => Some(Tensor::from_slice(l, b, device)?),
            None => None,
        };
        Batch::new(
            flat(&|e| e.get_ids())?,
            flat(&|e| e.get_type_ids())?,
            flat(&|e| e.get_attention_mask())?,
            labels,
        )
    }

    /// Number of pairs.
    pub fn len(&self) -> usize {
        self.input_ids.dims()[0]
    }

    /// Whether the batch has no pairs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Padded sequence length T.
    pub fn seq_len(&self) -> usize {
        self.input_ids.dims()[1]
    }
}
