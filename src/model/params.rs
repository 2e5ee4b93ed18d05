//! The model's parameters as a typed tree, one struct per HF module, named level by level as
//! HF's `named_parameters()` names them (`bert.encoder.layer.0.attention.self.query.weight`).
//!
//! Each struct is generic over what it holds at each leaf: `Tensor` for the model's parameters,
//! `&[T]` for the CPU pass's host views of them, `Vec<T>` for the gradients it computes. So an
//! engine reads typed fields (`layer.intermediate.weight`), never string keys, and the order
//! of [`Classifier::leaves`] is HF's parameter order, fixed in one place.
//!
//! Each block mirrors a module of HF transformers' `modeling_bert.py` (v4.46.3, the version of
//! the references in ../shared/fixtures); its doc comment links the lines.

use candle_core::Tensor;

use crate::error::Result;
use crate::model::config::BertConfig;
use crate::model::weights::{Init, Vb};

/// Visits a tree's fields in the order listed (HF's parameter order): `map`, `try_map`,
/// `leaves` and `into_leaves` for each struct, written once. A field is a `leaf` (a parameter),
/// a `sub`-module, or `many` sub-modules (the encoder's layers).
macro_rules! tree {
    ($name:ident { $($field:ident: $kind:ident),* $(,)? }) => {
        impl<P> $name<P> {
            /// The same tree with `f` applied to every leaf, in HF order.
            pub fn map<'s, Q>(&'s self, f: &mut impl FnMut(&'s P) -> Q) -> $name<Q> {
                $name { $($field: tree!(@map $kind, self.$field, f),)* }
            }
            /// Like [`Self::map`], stopping at the first error.
            pub fn try_map<'s, Q, E>(
                &'s self,
                f: &mut impl FnMut(&'s P) -> std::result::Result<Q, E>,
            ) -> std::result::Result<$name<Q>, E> {
                Ok($name { $($field: tree!(@try $kind, self.$field, f),)* })
            }
            /// Every leaf, in HF order.
            pub fn leaves(&self) -> Vec<&P> {
                let mut out = Vec::new();
                self.push_leaves(&mut out);
                out
            }
            #[allow(dead_code)] // reached through `leaves` of the enclosing module
            pub(crate) fn push_leaves<'s>(&'s self, out: &mut Vec<&'s P>) {
                $(tree!(@push $kind, self.$field, out);)*
            }
            /// Every leaf, moved out, in HF order.
            pub fn into_leaves(self) -> Vec<P> {
                let mut out = Vec::new();
                self.push_owned(&mut out);
                out
            }
            #[allow(dead_code)]
            pub(crate) fn push_owned(self, out: &mut Vec<P>) {
                $(tree!(@own $kind, self.$field, out);)*
            }
        }
    };
    (@map leaf, $e:expr, $f:ident) => { $f(&$e) };
    (@map sub, $e:expr, $f:ident) => { $e.map(&mut *$f) };
    (@map many, $e:expr, $f:ident) => { $e.iter().map(|x| x.map(&mut *$f)).collect() };
    (@try leaf, $e:expr, $f:ident) => { $f(&$e)? };
    (@try sub, $e:expr, $f:ident) => { $e.try_map(&mut *$f)? };
    (@try many, $e:expr, $f:ident) => {
        $e.iter().map(|x| x.try_map(&mut *$f)).collect::<std::result::Result<_, E>>()?
    };
    (@push leaf, $e:expr, $out:ident) => { $out.push(&$e) };
    (@push sub, $e:expr, $out:ident) => { $e.push_leaves($out) };
    (@push many, $e:expr, $out:ident) => { for x in &$e { x.push_leaves($out); } };
    (@own leaf, $e:expr, $out:ident) => { $out.push($e) };
    (@own sub, $e:expr, $out:ident) => { $e.push_owned($out) };
    (@own many, $e:expr, $out:ident) => { for x in $e { x.push_owned($out); } };
}

/// `nn.Linear`: `y = x Wᵀ + b`, torch layout (`weight` is `[out, in]`).
#[derive(Debug, Clone)]
pub struct Linear<P> {
    /// `[out, in]`.
    pub weight: P,
    /// `[out]`.
    pub bias: P,
}
tree!(Linear {
    weight: leaf,
    bias: leaf
});

/// `nn.LayerNorm` over the hidden axis (HF keeps TF's capitalised `LayerNorm` name).
#[derive(Debug, Clone)]
pub struct LayerNorm<P> {
    /// Scale `[H]`.
    pub weight: P,
    /// Shift `[H]`.
    pub bias: P,
}
tree!(LayerNorm {
    weight: leaf,
    bias: leaf
});

/// `BertEmbeddings`: word + position + token-type tables, then LayerNorm (and dropout).
/// HF: [`modeling_bert.py#L159-L220`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L159-L220).
#[derive(Debug, Clone)]
pub struct Embeddings<P> {
    /// `[vocab, H]`; the `[PAD]` row gets no gradient (`padding_idx`).
    pub word_embeddings: P,
    /// `[max_position_embeddings, H]`.
    pub position_embeddings: P,
    /// `[type_vocab_size, H]`.
    pub token_type_embeddings: P,
    /// `embeddings.LayerNorm`.
    pub layer_norm: LayerNorm<P>,
}
tree!(Embeddings {
    word_embeddings: leaf,
    position_embeddings: leaf,
    token_type_embeddings: leaf,
    layer_norm: sub,
});

/// `BertSelfAttention`: the query, key and value projections.
/// HF: [`modeling_bert.py#L223-L354`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L223-L354).
#[derive(Debug, Clone)]
pub struct SelfAttention<P> {
    /// `attention.self.query`.
    pub query: Linear<P>,
    /// `attention.self.key`.
    pub key: Linear<P>,
    /// `attention.self.value`.
    pub value: Linear<P>,
}
tree!(SelfAttention {
    query: sub,
    key: sub,
    value: sub
});

/// `BertSelfOutput` and `BertOutput`: a dense layer, dropout, the residual and LayerNorm.
/// HF: [`modeling_bert.py#L458-L475`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L458-L475) and
/// [`#L544-L555`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L544-L555).
#[derive(Debug, Clone)]
pub struct DenseNorm<P> {
    /// `dense`.
    pub dense: Linear<P>,
    /// `LayerNorm`.
    pub layer_norm: LayerNorm<P>,
}
tree!(DenseNorm {
    dense: sub,
    layer_norm: sub
});

/// `BertLayer`: `BertAttention` (self-attention and its output), `BertIntermediate` (dense +
/// GELU) and `BertOutput`. HF: [`modeling_bert.py#L558-L641`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L558-L641)
/// (`BertAttention` [`#L478-L526`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L478-L526), `BertIntermediate`
/// [`#L529-L541`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L529-L541)).
#[derive(Debug, Clone)]
pub struct Layer<P> {
    /// `attention.self`.
    pub attention: SelfAttention<P>,
    /// `attention.output`.
    pub attention_output: DenseNorm<P>,
    /// `intermediate.dense`.
    pub intermediate: Linear<P>,
    /// `output`.
    pub output: DenseNorm<P>,
}
tree!(Layer {
    attention: sub,
    attention_output: sub,
    intermediate: sub,
    output: sub,
});

/// `BertModel`: embeddings, the encoder's layers and `BertPooler` (dense + tanh on `[CLS]`).
/// HF: [`modeling_bert.py#L957-L1176`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L957-L1176) (`BertPooler`
/// [`#L737-L749`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L737-L749)).
#[derive(Debug, Clone)]
pub struct Bert<P> {
    /// `bert.embeddings`.
    pub embeddings: Embeddings<P>,
    /// `bert.encoder.layer.{i}`.
    pub layers: Vec<Layer<P>>,
    /// `bert.pooler.dense`.
    pub pooler: Linear<P>,
}
tree!(Bert {
    embeddings: sub,
    layers: many,
    pooler: sub
});

/// `BertForSequenceClassification`: the encoder and the `classifier` head.
/// HF: [`modeling_bert.py#L1623-L1725`](https://github.com/huggingface/transformers/blob/v4.46.3/src/transformers/models/bert/modeling_bert.py#L1623-L1725).
#[derive(Debug, Clone)]
pub struct Classifier<P> {
    /// `bert`.
    pub bert: Bert<P>,
    /// `classifier`: `[num_labels, H]`.
    pub classifier: Linear<P>,
}
tree!(Classifier {
    bert: sub,
    classifier: sub
});

impl Linear<Tensor> {
    fn load(vb: &Vb, out_dim: usize, in_dim: usize, optional: bool) -> Result<Self> {
        Ok(Linear {
            weight: vb.param("weight", &[out_dim, in_dim], Init::Normal(None), optional)?,
            bias: vb.param("bias", &[out_dim], Init::Zeros, optional)?,
        })
    }
}

impl LayerNorm<Tensor> {
    fn load(vb: &Vb, h: usize) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.param("weight", &[h], Init::Ones, false)?,
            bias: vb.param("bias", &[h], Init::Zeros, false)?,
        })
    }
}

impl Embeddings<Tensor> {
    fn load(vb: &Vb, cfg: &BertConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        let pad = Some(cfg.pad_token_id as usize);
        Ok(Embeddings {
            word_embeddings: vb.pp("word_embeddings").param(
                "weight",
                &[cfg.vocab_size, h],
                Init::Normal(pad),
                false,
            )?,
            position_embeddings: vb.pp("position_embeddings").param(
                "weight",
                &[cfg.max_position_embeddings, h],
                Init::Normal(None),
                false,
            )?,
            token_type_embeddings: vb.pp("token_type_embeddings").param(
                "weight",
                &[cfg.type_vocab_size, h],
                Init::Normal(None),
                false,
            )?,
            layer_norm: LayerNorm::load(&vb.pp("LayerNorm"), h)?,
        })
    }
}

impl Layer<Tensor> {
    fn load(vb: &Vb, cfg: &BertConfig) -> Result<Self> {
        let (h, inter) = (cfg.hidden_size, cfg.intermediate_size);
        let att = vb.pp("attention");
        let dense_norm = |vb: Vb, in_dim: usize| -> Result<DenseNorm<Tensor>> {
            Ok(DenseNorm {
                dense: Linear::load(&vb.pp("dense"), h, in_dim, false)?,
                layer_norm: LayerNorm::load(&vb.pp("LayerNorm"), h)?,
            })
        };
        let sa = att.pp("self");
        Ok(Layer {
            attention: SelfAttention {
                query: Linear::load(&sa.pp("query"), h, h, false)?,
                key: Linear::load(&sa.pp("key"), h, h, false)?,
                value: Linear::load(&sa.pp("value"), h, h, false)?,
            },
            attention_output: dense_norm(att.pp("output"), h)?,
            intermediate: Linear::load(&vb.pp("intermediate").pp("dense"), inter, h, false)?,
            output: dense_norm(vb.pp("output"), inter)?,
        })
    }
}

impl Classifier<Tensor> {
    /// Creates every parameter in HF order under its HF name, from the checkpoint behind `vb`
    /// or freshly initialised. A bare encoder export may lack the pooler and every base
    /// checkpoint lacks the head: those two are optional (HF initialises them).
    pub(crate) fn load(vb: &Vb, cfg: &BertConfig, num_labels: usize) -> Result<Self> {
        let bert = vb.pp("bert");
        let embeddings = Embeddings::load(&bert.pp("embeddings"), cfg)?;
        let enc = bert.pp("encoder").pp("layer");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::load(&enc.pp(i), cfg))
            .collect::<Result<_>>()?;
        let h = cfg.hidden_size;
        let pooler = Linear::load(&bert.pp("pooler").pp("dense"), h, h, true)?;
        let classifier = Linear::load(&vb.pp("classifier"), num_labels, h, true)?;
        Ok(Classifier {
            bert: Bert {
                embeddings,
                layers,
                pooler,
            },
            classifier,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(layers: usize) -> Classifier<String> {
        let lin = |p: &str| Linear {
            weight: format!("{p}.weight"),
            bias: format!("{p}.bias"),
        };
        let ln = |p: &str| LayerNorm {
            weight: format!("{p}.weight"),
            bias: format!("{p}.bias"),
        };
        let dn = |p: &str| DenseNorm {
            dense: lin(&format!("{p}.dense")),
            layer_norm: ln(&format!("{p}.LayerNorm")),
        };
        Classifier {
            bert: Bert {
                embeddings: Embeddings {
                    word_embeddings: "bert.embeddings.word_embeddings.weight".into(),
                    position_embeddings: "bert.embeddings.position_embeddings.weight".into(),
                    token_type_embeddings: "bert.embeddings.token_type_embeddings.weight".into(),
                    layer_norm: ln("bert.embeddings.LayerNorm"),
                },
                layers: (0..layers)
                    .map(|i| {
                        let p = format!("bert.encoder.layer.{i}");
                        Layer {
                            attention: SelfAttention {
                                query: lin(&format!("{p}.attention.self.query")),
                                key: lin(&format!("{p}.attention.self.key")),
                                value: lin(&format!("{p}.attention.self.value")),
                            },
                            attention_output: dn(&format!("{p}.attention.output")),
                            intermediate: lin(&format!("{p}.intermediate.dense")),
                            output: dn(&format!("{p}.output")),
                        }
                    })
                    .collect(),
                pooler: lin("bert.pooler.dense"),
            },
            classifier: lin("classifier"),
        }
    }

    #[test]
    fn leaves_come_in_hf_named_parameters_order() {
        // HF's order for BertForSequenceClassification with 2 layers (41 parameters), written
        // out from `model.named_parameters()`.
        let tree = names(2);
        let got: Vec<&str> = tree.leaves().into_iter().map(|s| s.as_str()).collect();
        assert_eq!(got.len(), 41);
        assert_eq!(got[0], "bert.embeddings.word_embeddings.weight");
        assert_eq!(got[4], "bert.embeddings.LayerNorm.bias");
        assert_eq!(got[5], "bert.encoder.layer.0.attention.self.query.weight");
        assert_eq!(got[9], "bert.encoder.layer.0.attention.self.value.weight");
        assert_eq!(got[12], "bert.encoder.layer.0.attention.output.dense.bias");
        assert_eq!(
            got[14],
            "bert.encoder.layer.0.attention.output.LayerNorm.bias"
        );
        assert_eq!(got[15], "bert.encoder.layer.0.intermediate.dense.weight");
        assert_eq!(got[19], "bert.encoder.layer.0.output.LayerNorm.weight");
        assert_eq!(got[20], "bert.encoder.layer.0.output.LayerNorm.bias");
        assert_eq!(got[21], "bert.encoder.layer.1.attention.self.query.weight");
        assert_eq!(got[37], "bert.pooler.dense.weight");
        assert_eq!(got[40], "classifier.bias");
        let mapped = tree.map(&mut |s| s.len());
        assert_eq!(mapped.into_leaves()[40], "classifier.bias".len());
    }
}
