//! The pass itself: the forward of `BertForSequenceClassification` over host views of the
//! parameters, keeping what the backward needs, and the backward into a typed gradient tree.
//! The dropout draws follow the graph's order, the sites of engine/sites.rs.

use crate::model::config::BertConfig;
use crate::model::engine::cpu::attention::{attention, attention_bwd};
use crate::model::engine::cpu::buf::Buf;
use crate::model::engine::cpu::dropout::{draw, dropped, Mask};
use crate::model::engine::cpu::embeddings::{embed, embed_bwd};
use crate::model::engine::cpu::gelu::{gelu, gelu_bwd};
use crate::model::engine::cpu::gemm::{linear, linear_bwd};
use crate::model::engine::cpu::norm::{add_norm, add_norm_bwd, NormSaved};
use crate::model::engine::sites::Site;
use crate::model::engine::Dims;
use crate::model::engine::TokenIds;
use crate::model::math::Real;
use crate::model::params::{
    Bert, Classifier, DenseNorm, Embeddings, Layer, LayerNorm, Linear, SelfAttention,
};
use crate::rng::SeededRng;

/// Everything one pass reads besides the parameters.
pub(crate) struct Inputs<'a, T> {
    pub cfg: &'a BertConfig,
    pub ids: &'a TokenIds,
    /// HF's additive mask `(mask − 1) · (−min)` per token, in the model's dtype.
    pub mask_add: &'a [T],
    pub dims: Dims,
}

/// Q, K and V of one layer stacked into one `[3H, H]` product.
pub(crate) struct Qkv<T> {
    w: Vec<T>,
    b: Vec<T>,
}

impl<T: Real> Qkv<T> {
    pub(crate) fn stack(a: &SelfAttention<&[T]>) -> Self {
        let mut w = Vec::with_capacity(3 * a.query.weight.len());
        let mut b = Vec::with_capacity(3 * a.query.bias.len());
        for part in [&a.query, &a.key, &a.value] {
            w.extend_from_slice(part.weight);
            b.extend_from_slice(part.bias);
        }
        Qkv { w, b }
    }

    /// `dW`, `db` of the stacked product split back into query, key and value.
    fn split(dw: &[T], db: &[T], h: usize) -> SelfAttention<Vec<T>> {
        let part = |k: usize| Linear {
            weight: dw[k * h * h..][..h * h].to_vec(),
            bias: db[k * h..][..h].to_vec(),
        };
        SelfAttention {
            query: part(0),
            key: part(1),
            value: part(2),
        }
    }
}

/// What one layer's forward keeps for its backward.
struct LayerSaved<T: Real> {
    qkv: Buf<T>,
    probs: Buf<T>,
    attn_drop: Option<Mask<T>>,
    ctx: Buf<T>,
    drop1: Option<Mask<T>>,
    norm1: NormSaved<T>,
    y1: Buf<T>,
    f: Buf<T>,
    phi: Buf<T>,
    g: Buf<T>,
    drop2: Option<Mask<T>>,
    norm2: NormSaved<T>,
}

/// What the forward keeps for the backward.
pub(crate) struct Saved<T: Real> {
    drop0: Option<Mask<T>>,
    norm0: NormSaved<T>,
    /// The embeddings' output, then each layer's input after the first.
    xs: Vec<Buf<T>>,
    layers: Vec<LayerSaved<T>>,
    cls: Vec<T>,
    pooled: Vec<T>,
    drop_c: Option<Mask<T>>,
    head_in: Vec<T>,
}

/// The logits `[B, C]`, and with `keep` what the backward needs. Dropout draws from `rng`
/// when given.
pub(crate) fn forward<T: Real>(
    p: &Classifier<&[T]>,
    qkv: &[Qkv<T>],
    inp: &Inputs<T>,
    mut rng: Option<&mut SeededRng>,
    keep: bool,
) -> (Buf<T>, Option<Saved<T>>) {
    let cfg = inp.cfg;
    let dm = inp.dims;
    let (b, t, h, n) = (dm.b, dm.t, dm.h, dm.n());
    let eps = cfg.layer_norm_eps;
    let scale = (dm.d as f64).powf(-0.5);
    let bert = &p.bert;

    let emb = embed(&bert.embeddings, inp.ids, h);
    let ln0 = &bert.embeddings.layer_norm;
    // Dropout in the graph's order (engine/sites.rs).
    let drop0 = draw::<T>(&mut rng, n * h, Site::Embeddings.p(cfg));
    let (x0, norm0) = add_norm(&emb, &None, None, ln0.weight, ln0.bias, eps, &drop0, h);
    drop(emb);

    let mut xs: Vec<Buf<T>> = vec![x0];
    let mut layers = Vec::with_capacity(if keep { bert.layers.len() } else { 0 });
    for (l, (lw, qkv_w)) in bert.layers.iter().zip(qkv).enumerate() {
        let x = xs.last().expect("the embeddings' output");
        let qkv = linear(x, &qkv_w.w, &qkv_w.b, n, h);
        let attn_drop = draw::<T>(&mut rng, dm.tt(), Site::AttentionProbs(l).p(cfg));
        let (ctx, probs) = attention(&qkv, inp.mask_add, &attn_drop, scale, dm);
        let ao = &lw.attention_output;
        let a = linear(&ctx, ao.dense.weight, ao.dense.bias, n, h);
        let drop1 = draw::<T>(&mut rng, n * h, Site::AttentionOutput(l).p(cfg));
        let ln1 = &ao.layer_norm;
        let (y1, norm1) = add_norm(&a, &drop1, Some(x), ln1.weight, ln1.bias, eps, &None, h);
        let it = &lw.intermediate;
        let f = linear(&y1, it.weight, it.bias, n, h);
        let (g, phi) = gelu(&f);
        let out = &lw.output;
        let o = linear(&g, out.dense.weight, out.dense.bias, n, dm.inter);
        let drop2 = draw::<T>(&mut rng, n * h, Site::Output(l).p(cfg));
        let ln2 = &out.layer_norm;
        let (y2, norm2) = add_norm(&o, &drop2, Some(&y1), ln2.weight, ln2.bias, eps, &None, h);
        if keep {
            xs.push(y2);
            layers.push(LayerSaved {
                qkv,
                probs,
                attn_drop,
                ctx,
                drop1,
                norm1,
                y1,
                f,
                phi,
                g,
                drop2,
                norm2,
            });
        } else {
            xs = vec![y2];
        }
    }

    // Pooler (dense + tanh on [CLS]), dropout, head.
    let last = xs.last().expect("the encoder's output");
    let mut cls = Vec::with_capacity(b * h);
    for bi in 0..b {
        cls.extend_from_slice(&last[bi * t * h..][..h]);
    }
    let pool = &bert.pooler;
    let pooled: Vec<T> = linear(&cls, pool.weight, pool.bias, b, h)
        .iter()
        .map(|z| T::from_f64(z.to_f64().tanh()))
        .collect();
    let drop_c = draw::<T>(&mut rng, b * h, Site::Classifier.p(cfg));
    let head_in: Vec<T> = (0..b * h).map(|i| dropped(pooled[i], &drop_c, i)).collect();
    let head = &p.classifier;
    let logits = linear(&head_in, head.weight, head.bias, b, h);
    if !keep {
        return (logits, None);
    }
    // The last layer's output is not an input of any layer: the backward starts from `cls`.
    xs.pop();
    let saved = Saved {
        drop0,
        norm0,
        xs,
        layers,
        cls,
        pooled,
        drop_c,
        head_in,
    };
    (logits, Some(saved))
}

/// The gradient of every parameter from the gradient `dlogits` of the mean loss.
pub(crate) fn backward<T: Real>(
    p: &Classifier<&[T]>,
    qkv: &[Qkv<T>],
    inp: &Inputs<T>,
    s: &Saved<T>,
    dlogits: &[T],
) -> Classifier<Vec<T>> {
    let dm = inp.dims;
    let (b, t, h, n) = (dm.b, dm.t, dm.h, dm.n());
    let scale = (dm.d as f64).powf(-0.5);
    let bert = &p.bert;

    // Head and pooler.
    let mut dhead = vec![T::zero(); b * h];
    let (dw, db) = linear_bwd(
        &s.head_in,
        p.classifier.weight,
        dlogits,
        b,
        h,
        Some((&mut dhead, false)),
    );
    let classifier = Linear {
        weight: dw,
        bias: db,
    };
    let dz: Vec<T> = (0..b * h)
        .map(|i| {
            let y = s.pooled[i].to_f64();
            T::from_f64(dropped(dhead[i], &s.drop_c, i).to_f64() * (1.0 - y * y))
        })
        .collect();
    let mut dcls = vec![T::zero(); b * h];
    let (dw, db) = linear_bwd(
        &s.cls,
        bert.pooler.weight,
        &dz,
        b,
        h,
        Some((&mut dcls, false)),
    );
    let pooler = Linear {
        weight: dw,
        bias: db,
    };
    let mut dy = Buf::zeroed(n * h);
    for bi in 0..b {
        dy[bi * t * h..][..h].copy_from_slice(&dcls[bi * h..][..h]);
    }

    // The encoder, last layer first.
    let mut layers = Vec::with_capacity(bert.layers.len());
    for ((lw, qkv_w), (sl, x)) in bert
        .layers
        .iter()
        .zip(qkv)
        .zip(s.layers.iter().zip(&s.xs))
        .rev()
    {
        let (ao, out) = (&lw.attention_output, &lw.output);
        let ln2w = out.layer_norm.weight;
        let (mut dy1, do_, dw2, db2) = add_norm_bwd(&dy, &sl.norm2, ln2w, &sl.drop2, &None, h);
        let mut dg = Buf::dirty(n * dm.inter);
        let do_ref = do_.as_deref().unwrap_or(&dy1);
        let (dwf, dbf) = linear_bwd(
            &sl.g,
            out.dense.weight,
            do_ref,
            n,
            dm.inter,
            Some((&mut dg, false)),
        );
        drop(do_);
        gelu_bwd(&mut dg, &sl.f, &sl.phi);
        let iw = lw.intermediate.weight;
        let (dwi, dbi) = linear_bwd(&sl.y1, iw, &dg, n, h, Some((&mut dy1, true)));
        drop(dg);
        let ln1w = ao.layer_norm.weight;
        let (mut dx, da, dw1, db1) = add_norm_bwd(&dy1, &sl.norm1, ln1w, &sl.drop1, &None, h);
        let mut dctx = Buf::dirty(n * h);
        let da_ref = da.as_deref().unwrap_or(&dx);
        let ow = ao.dense.weight;
        let (dwo, dbo) = linear_bwd(&sl.ctx, ow, da_ref, n, h, Some((&mut dctx, false)));
        drop(da);
        let dqkv = attention_bwd(&sl.qkv, &sl.probs, &dctx, &sl.attn_drop, scale, dm);
        let (dwqkv, dbqkv) = linear_bwd(x, &qkv_w.w, &dqkv, n, h, Some((&mut dx, true)));
        layers.push(Layer {
            attention: Qkv::split(&dwqkv, &dbqkv, h),
            attention_output: DenseNorm {
                dense: Linear {
                    weight: dwo,
                    bias: dbo,
                },
                layer_norm: LayerNorm {
                    weight: dw1,
                    bias: db1,
                },
            },
            intermediate: Linear {
                weight: dwi,
                bias: dbi,
            },
            output: DenseNorm {
                dense: Linear {
                    weight: dwf,
                    bias: dbf,
                },
                layer_norm: LayerNorm {
                    weight: dw2,
                    bias: db2,
                },
            },
        });
        dy = dx;
    }
    layers.reverse();

    // Embeddings.
    let e = &bert.embeddings;
    let (de, _, dln_w, dln_b) =
        add_norm_bwd(&dy, &s.norm0, e.layer_norm.weight, &None, &s.drop0, h);
    let (dword, dpos, dtyp) = embed_bwd(&de, e, inp.ids, inp.cfg.pad_token_id, h);
    Classifier {
        bert: Bert {
            embeddings: Embeddings {
                word_embeddings: dword,
                position_embeddings: dpos,
                token_type_embeddings: dtyp,
                layer_norm: LayerNorm {
                    weight: dln_w,
                    bias: dln_b,
                },
            },
            layers,
            pooler,
        },
        classifier,
    }
}
