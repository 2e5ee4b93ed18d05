//! The graph engine: `BertForSequenceClassification` written with plain candle ops, on any
//! device and dtype, with autograd intact. It is the reference the other engines are checked
//! against, and what a hand-written loop (`forward`, then `loss.backward()`) runs.
//!
//! Every block keeps autograd: candle's fused `LayerNorm` and `softmax_last_dim` silently cut
//! it, and its `gelu_erf` backward uses a 6-digit constant, so LayerNorm and the exact GELU are
//! composed from differentiable ops here. Each function names the HF module it mirrors
//! (`modeling_bert.py`, see [`crate::model::params`]).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::model::batch::Batch;
use crate::model::config::HiddenAct;
use crate::model::engine::sites::Site;
use crate::model::engine::ModelView;
use crate::model::engine::{dtype_min, TokenIds};
use crate::model::params::{DenseNorm, Embeddings, Layer, LayerNorm, Linear};
use crate::rng::SeededRng;

/// Everything a forward pass computes.
#[derive(Debug, Clone)]
pub struct ClassifierOutput {
    /// The encoder's outputs (hidden states per layer, pooled `[CLS]`).
    pub bert: BertOutput,
    /// `[B, num_labels]`.
    pub logits: Tensor,
}

/// Everything the encoder computes.
#[derive(Debug, Clone)]
pub struct BertOutput {
    /// Embedding output, then the output of each layer: `[B, T, H]` each (HF's `hidden_states`).
    pub hidden_states: Vec<Tensor>,
    /// `tanh(dense(last_hidden_state[:, 0]))`: `[B, H]`.
    pub pooled: Tensor,
}

impl BertOutput {
    /// The last layer's output `[B, T, H]`.
    pub fn last_hidden_state(&self) -> &Tensor {
        self.hidden_states
            .last()
            .expect("at least the embedding output")
    }
}

/// `nn.Linear`: `x Wᵀ + b` over the last axis. Leading dimensions are flattened into one GEMM:
/// a broadcast (batched) matmul would make the weight's gradient B small products plus a
/// reduction instead of one product.
fn linear(l: &Linear<Tensor>, x: &Tensor) -> Result<Tensor> {
    let w = l.weight.t()?;
    let dims = x.dims();
    let inner = *dims.last().unwrap_or(&1);
    let rows = x.elem_count() / inner.max(1);
    let y = x
        .reshape((rows, inner))?
        .matmul(&w)?
        .broadcast_add(&l.bias)?;
    let mut out = dims.to_vec();
    if let Some(last) = out.last_mut() {
        *last = w.dim(1)?;
    }
    Ok(y.reshape(out)?)
}

/// `nn.LayerNorm` over the last axis: biased variance, `eps` inside the square root.
fn layer_norm(n: &LayerNorm<Tensor>, x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let inv_std = (var + eps)?.sqrt()?.recip()?;
    Ok(xc
        .broadcast_mul(&inv_std)?
        .broadcast_mul(&n.weight)?
        .broadcast_add(&n.bias)?)
}

/// The activation; `Gelu` is the exact erf form, differentiated through `erf`.
fn activation(x: &Tensor, act: HiddenAct) -> Result<Tensor> {
    Ok(match act {
        HiddenAct::Gelu => {
            let e = x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()?;
            ((e + 1.0)? * x)?.affine(0.5, 0.0)?
        }
        HiddenAct::GeluTanh => x.gelu()?,
        HiddenAct::Relu => x.relu()?,
    })
}

/// Inverted dropout with the model's seeded stream; the identity when `rng` is `None` or
/// `p == 0`.
fn dropout(x: &Tensor, p: f64, rng: &mut Option<&mut SeededRng>) -> Result<Tensor> {
    match rng.as_deref_mut() {
        Some(rng) if p > 0.0 => {
            let mask = rng.dropout_mask(x.dims(), p, x.dtype(), x.device())?;
            Ok((x * mask)?)
        }
        _ => Ok(x.clone()),
    }
}

/// `BertEmbeddings.forward` ([`modeling_bert.py#L181-L220`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L181-L220)): word +
/// position + token-type rows, LayerNorm, dropout.
fn embeddings(
    e: &Embeddings<Tensor>,
    batch: &Batch,
    model: &ModelView<'_>,
    rng: &mut Option<&mut SeededRng>,
) -> Result<Tensor> {
    let cfg = model.config();
    // Ids are checked on the host: an out-of-range index on a device is not an error there.
    TokenIds::read(batch, cfg)?;
    let device = model.device();
    let input_ids = batch.input_ids.to_device(device)?;
    let (b, t) = input_ids.dims2()?;
    let h = cfg.hidden_size;
    let ids = input_ids.flatten_all()?;
    // nn.Embedding(padding_idx): the [PAD] row gets no gradient. Same values, but the lookups
    // of pad tokens go through a detached copy of the table.
    let words = e.word_embeddings.index_select(&ids, 0)?;
    let is_pad = ids.eq(cfg.pad_token_id)?;
    let words = if is_pad.max_all()?.to_scalar::<u8>()? > 0 {
        let frozen = e.word_embeddings.detach().index_select(&ids, 0)?;
        is_pad
            .unsqueeze(1)?
            .broadcast_as(words.shape())?
            .where_cond(&frozen, &words)?
    } else {
        words
    };
    let words = words.reshape((b, t, h))?;
    let positions = e.position_embeddings.narrow(0, 0, t)?;
    let types = e
        .token_type_embeddings
        .index_select(&batch.token_type_ids.to_device(device)?.flatten_all()?, 0)?
        .reshape((b, t, h))?;
    let x = words.broadcast_add(&positions)?.add(&types)?;
    let x = layer_norm(&e.layer_norm, &x, cfg.layer_norm_eps)?;
    dropout(&x, Site::Embeddings.p(cfg), rng)
}

/// `BertSelfOutput` / `BertOutput` ([`#L465-L475`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L465-L475),
/// [`#L551-L555`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L551-L555)): dense, dropout, the residual, LayerNorm.
fn dense_norm(
    l: &DenseNorm<Tensor>,
    x: &Tensor,
    residual: &Tensor,
    p: f64,
    eps: f64,
    rng: &mut Option<&mut SeededRng>,
) -> Result<Tensor> {
    let y = dropout(&linear(&l.dense, x)?, p, rng)?;
    layer_norm(&l.layer_norm, &(y + residual)?, eps)
}

/// `BertLayer.forward`: `BertSelfAttention` ([`#L255-L354`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L255-L354), eager
/// attention), `BertSelfOutput`, `BertIntermediate` ([`#L538-L541`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L538-L541)), `BertOutput`.
fn layer(
    l: &Layer<Tensor>,
    index: usize,
    model: &ModelView<'_>,
    x: &Tensor,
    mask: &Tensor,
    rng: &mut Option<&mut SeededRng>,
) -> Result<Tensor> {
    let cfg = model.config();
    let (b, t, h) = x.dims3()?;
    let heads = cfg.num_attention_heads;
    let d = h / heads;
    let split = |y: Tensor| -> Result<Tensor> {
        Ok(y.reshape((b, t, heads, d))?.transpose(1, 2)?.contiguous()?)
    };
    let q = split(linear(&l.attention.query, x)?)?;
    let k = split(linear(&l.attention.key, x)?)?;
    let v = split(linear(&l.attention.value, x)?)?;
    let scale = (d as f64).powf(-0.5);
    let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
    let probs = dropout(&probs, Site::AttentionProbs(index).p(cfg), rng)?;
    let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
    let eps = cfg.layer_norm_eps;
    let p = Site::AttentionOutput(index).p(cfg);
    let a = dense_norm(&l.attention_output, &ctx, x, p, eps, rng)?;
    let f = activation(&linear(&l.intermediate, &a)?, cfg.activation())?;
    dense_norm(&l.output, &f, &a, Site::Output(index).p(cfg), eps, rng)
}

/// `BertForSequenceClassification.forward` up to the logits
/// ([`#L1647-L1725`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L1647-L1725)): the encoder (`BertModel.forward`
/// [`#L1007-L1176`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L1007-L1176): the extended mask, embeddings, layers, `BertPooler`
/// [`#L743-L749`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L743-L749)), dropout and the classifier.
pub(crate) fn forward(
    model: &ModelView<'_>,
    batch: &Batch,
    mut rng: Option<&mut SeededRng>,
) -> Result<ClassifierOutput> {
    let p = model.params();
    let (device, dtype) = (model.device(), model.dtype());
    let (b, t) = batch.input_ids.dims2()?;
    // HF's extended mask: (1 - mask) * finfo(dtype).min, broadcast over heads and queries.
    let keep = batch.attention_mask.to_device(device)?.to_dtype(dtype)?;
    let mask = ((keep - 1.0)? * (-dtype_min(dtype)))?.reshape((b, 1, 1, t))?;
    let mut x = embeddings(&p.bert.embeddings, batch, model, &mut rng)?;
    let mut hidden_states = vec![x.clone()];
    for (i, l) in p.bert.layers.iter().enumerate() {
        x = layer(l, i, model, &x, &mask, &mut rng)?;
        hidden_states.push(x.clone());
    }
    let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
    let pooled = linear(&p.bert.pooler, &cls)?.tanh()?;
    let head_in = dropout(&pooled, Site::Classifier.p(model.config()), &mut rng)?;
    let logits = linear(&p.classifier, &head_in)?;
    Ok(ClassifierOutput {
        bert: BertOutput {
            hidden_states,
            pooled,
        },
        logits,
    })
}

/// Mean loss and every gradient through the graph (`loss.backward()`), for a batch whose
/// labels are checked ([`crate::model::engine::Targets`]).
pub(crate) fn loss_and_grads(
    model: &ModelView<'_>,
    batch: &Batch,
    labels: &Tensor,
    rng: Option<&mut SeededRng>,
) -> Result<(f64, GradStore)> {
    let loss = crate::model::engine::loss::mean(&forward(model, batch, rng)?.logits, labels)?;
    let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    Ok((value, loss.backward()?))
}
