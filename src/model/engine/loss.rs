//! The loss of `BertForSequenceClassification` (HF's rule): cross-entropy over the classes, or
//! the squared error for a one-output model with float labels (regression, stsb). Used by the
//! graph engine and by `BertClassifier::loss` / `per_example_loss`.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// Per-example loss `[B]` of `logits` `[B, C]` against `labels` `[B]`.
pub(crate) fn per_example(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    // HF's rule: one output and float labels is regression (MSE), else classification.
    if logits.dim(D::Minus1)? == 1 && labels.dtype().is_float() {
        let target = labels
            .to_device(logits.device())?
            .to_dtype(logits.dtype())?;
        return Ok((logits.squeeze(D::Minus1)? - target)?.sqr()?);
    }
    let labels = labels.to_device(logits.device())?.to_dtype(DType::U32)?;
    let log_probs = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(log_probs
        .gather(&labels.unsqueeze(1)?, 1)?
        .squeeze(1)?
        .neg()?)
}

/// The mean of [`per_example`] over the batch, a scalar.
pub(crate) fn mean(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    Ok(per_example(logits, labels)?.mean_all()?)
}
