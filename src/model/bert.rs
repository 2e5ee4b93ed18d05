//! The BERT encoder with pooler, written to match HF transformers' `BertModel` numerically.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::config::{BertConfig, HiddenAct};
use crate::model::fused;
use crate::model::layers::{activation, dropout, dtype_min, softmax_last, LayerNorm, Linear};
use crate::model::weights::{Init, ParamBuilder};
use crate::rng::SeededRng;

fn linear(
    pb: &mut ParamBuilder,
    name: &str,
    out_dim: usize,
    in_dim: usize,
    optional: bool,
) -> Result<Linear> {
    Ok(Linear {
        weight: pb.param(
            &format!("{name}.weight"),
            &[out_dim, in_dim],
            Init::Normal(None),
            optional,
        )?,
        bias: pb.param(&format!("{name}.bias"), &[out_dim], Init::Zeros, optional)?,
    })
}

fn layer_norm(pb: &mut ParamBuilder, name: &str, h: usize, eps: f64) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: pb.param(&format!("{name}.weight"), &[h], Init::Ones, false)?,
        bias: pb.param(&format!("{name}.bias"), &[h], Init::Zeros, false)?,
        eps,
    })
}

/// Word + position + token-type embeddings, then LayerNorm and dropout.
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
    pad_token_id: u32,
    p: f64,
}

impl BertEmbeddings {
    fn load(pb: &mut ParamBuilder, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let pad = Some(cfg.pad_token_id as usize);
        Ok(BertEmbeddings {
            word: pb.param(
                "bert.embeddings.word_embeddings.weight",
                &[cfg.vocab_size, h],
                Init::Normal(pad),
                false,
            )?,
            position: pb.param(
                "bert.embeddings.position_embeddings.weight",
                &[cfg.max_position_embeddings, h],
                Init::Normal(None),
                false,
            )?,
            token_type: pb.param(
                "bert.embeddings.token_type_embeddings.weight",
                &[cfg.type_vocab_size, h],
                Init::Normal(None),
                false,
            )?,
            norm: layer_norm(pb, "bert.embeddings.LayerNorm", h, cfg.layer_norm_eps)?,
            pad_token_id: cfg.pad_token_id,
            p: cfg.hidden_dropout_prob,
        })
    }

    fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        rng: &mut Option<&mut SeededRng>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let h = self.word.dim(1)?;
        if fused::supported(&self.word) {
            let to_u32 = |t: &Tensor| -> Result<Vec<u32>> {
                Ok(t.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?)
            };
            let op = fused::EmbeddingsOp {
                ids: to_u32(input_ids)?,
                type_ids: to_u32(token_type_ids)?,
                seq_len: t,
                pad: self.pad_token_id,
            };
            let x = self.word.contiguous()?.apply_op3(
                &self.position.contiguous()?,
                &self.token_type.contiguous()?,
                op,
            )?;
            let x = self.norm.forward(&x)?;
            return dropout(&x, self.p, rng.as_deref_mut());
        }
        let ids = input_ids.flatten_all()?;
        // nn.Embedding(padding_idx): the [PAD] row gets no gradient. Same values, but the lookups
        // of pad tokens go through a detached copy of the table.
        let words = self.word.index_select(&ids, 0)?;
        let is_pad = ids.eq(self.pad_token_id)?;
        let words = if is_pad.max_all()?.to_scalar::<u8>()? > 0 {
            let frozen = self.word.detach().index_select(&ids, 0)?;
            is_pad
                .unsqueeze(1)?
                .broadcast_as(words.shape())?
                .where_cond(&frozen, &words)?
        } else {
            words
        };
        let words = words.reshape((b, t, h))?;
        let positions = self.position.narrow(0, 0, t)?;
        let types = self
            .token_type
            .index_select(&token_type_ids.flatten_all()?, 0)?
            .reshape((b, t, h))?;
        let x = words.broadcast_add(&positions)?.add(&types)?;
        let x = self.norm.forward(&x)?;
        dropout(&x, self.p, rng.as_deref_mut())
    }
}

#[derive(Debug, Clone)]
struct BertLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
    heads: usize,
    act: HiddenAct,
    p_hidden: f64,
    p_attn: f64,
}

impl BertLayer {
    fn load(pb: &mut ParamBuilder, cfg: &BertConfig, i: usize) -> Result<Self> {
        let (h, inter, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.layer_norm_eps);
        let pre = format!("bert.encoder.layer.{i}");
        Ok(BertLayer {
            query: linear(pb, &format!("{pre}.attention.self.query"), h, h, false)?,
            key: linear(pb, &format!("{pre}.attention.self.key"), h, h, false)?,
            value: linear(pb, &format!("{pre}.attention.self.value"), h, h, false)?,
            attn_out: linear(pb, &format!("{pre}.attention.output.dense"), h, h, false)?,
            attn_norm: layer_norm(pb, &format!("{pre}.attention.output.LayerNorm"), h, eps)?,
            intermediate: linear(pb, &format!("{pre}.intermediate.dense"), inter, h, false)?,
            output: linear(pb, &format!("{pre}.output.dense"), h, inter, false)?,
            out_norm: layer_norm(pb, &format!("{pre}.output.LayerNorm"), h, eps)?,
            heads: cfg.num_attention_heads,
            act: cfg.activation(),
            p_hidden: cfg.hidden_dropout_prob,
            p_attn: cfg.attention_probs_dropout_prob,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: &Tensor,
        rng: &mut Option<&mut SeededRng>,
    ) -> Result<Tensor> {
        let (b, t, h) = x.dims3()?;
        let d = h / self.heads;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((b, t, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let scale = (d as f64).powf(-0.5);
        let fused_path = fused::supported(x) && mask.dtype() == x.dtype();
        let attn = if fused_path {
            // Projections straight into the heads layout (keys transposed), the probabilities
            // in one op, and the output projection reading the heads: no layout nodes.
            let heads = |tr| fused::LinearOp {
                heads_in: false,
                heads_out: Some((self.heads, tr)),
            };
            let q = self.query.forward_op(x, heads(false))?;
            let kt = self.key.forward_op(x, heads(true))?;
            let v = self.value.forward_op(x, heads(false))?;
            let scores = q.matmul(&kt)?;
            let keep = match rng.as_deref_mut() {
                Some(r) if self.p_attn > 0.0 => Some(r.dropout_mask(
                    scores.dims(),
                    self.p_attn,
                    scores.dtype(),
                    scores.device(),
                )?),
                _ => None,
            };
            let op = fused::AttnProbsOp {
                scale,
                dropout: keep,
            };
            let probs = scores.apply_op2(&mask.contiguous()?, op)?;
            let ctx = probs.matmul(&v)?;
            self.attn_out.forward_op(
                &ctx,
                fused::LinearOp {
                    heads_in: true,
                    heads_out: None,
                },
            )?
        } else {
            let q = split(self.query.forward(x)?)?;
            let k = split(self.key.forward(x)?)?;
            let v = split(self.value.forward(x)?)?;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(mask)?;
            let probs = softmax_last(&scores)?;
            let probs = dropout(&probs, self.p_attn, rng.as_deref_mut())?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, h))?;
            self.attn_out.forward(&ctx)?
        };
        let a = dropout(&attn, self.p_hidden, rng.as_deref_mut())?;
        let a = self.attn_norm.forward(&(a + x)?)?;
        let f = activation(&self.intermediate.forward(&a)?, self.act)?;
        let f = dropout(&self.output.forward(&f)?, self.p_hidden, rng.as_deref_mut())?;
        self.out_norm.forward(&(f + a)?)
    }
}

/// Everything [`BertModel::forward`] computes.
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

/// BERT: embeddings, a post-LN encoder and the [CLS] pooler.
#[derive(Debug, Clone)]
pub struct BertModel {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    pooler: Linear,
    dtype: DType,
    device: Device,
}

impl BertModel {
    pub(crate) fn load(pb: &mut ParamBuilder, cfg: &BertConfig) -> Result<Self> {
        let embeddings = BertEmbeddings::load(pb, cfg)?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| BertLayer::load(pb, cfg, i))
            .collect::<Result<_>>()?;
        // A bare encoder export may lack the pooler; HF initialises it then.
        let pooler = linear(
            pb,
            "bert.pooler.dense",
            cfg.hidden_size,
            cfg.hidden_size,
            true,
        )?;
        Ok(BertModel {
            embeddings,
            layers,
            pooler,
            dtype: pb.dtype,
            device: pb.device.clone(),
        })
    }

    /// Runs the encoder and pooler. Ids are `u32`/`i64` `[B, T]`; `attention_mask` is 1 for real
    /// tokens and 0 for padding. Dropout is applied only when `rng` is given.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
        mut rng: Option<&mut SeededRng>,
    ) -> Result<BertOutput> {
        let input_ids = input_ids.to_device(&self.device)?;
        let token_type_ids = token_type_ids.to_device(&self.device)?;
        let (b, t) = input_ids.dims2()?;
        // HF's extended mask: (1 - mask) * finfo(dtype).min, broadcast over heads and queries.
        let keep = attention_mask
            .to_device(&self.device)?
            .to_dtype(self.dtype)?;
        let mask = ((keep - 1.0)? * (-dtype_min(self.dtype)))?.reshape((b, 1, 1, t))?;
        let mut x = self
            .embeddings
            .forward(&input_ids, &token_type_ids, &mut rng)?;
        let mut hidden_states = vec![x.clone()];
        for layer in &self.layers {
            x = layer.forward(&x, &mask, &mut rng)?;
            hidden_states.push(x.clone());
        }
        let cls = x.narrow(1, 0, 1)?.squeeze(1)?;
        let pooled = self.pooler.forward(&cls)?.tanh()?;
        Ok(BertOutput {
            hidden_states,
            pooled,
        })
    }
}
