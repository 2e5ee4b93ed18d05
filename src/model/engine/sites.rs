//! The dropout sites of `BertForSequenceClassification`, in the order the graph draws them: the
//! one list the three engines follow. The graph and the CPU pass draw their masks from the
//! model's seeded stream in this order (so they draw the same masks); the CUDA pass keys its
//! counter-based masks by each site's [`Site::index`].
//!
//! | index | site | probability |
//! |---|---|---|
//! | 0 | the embeddings' output | `hidden_dropout_prob` |
//! | 1 + 3l | layer l's attention probabilities | `attention_probs_dropout_prob` |
//! | 2 + 3l | layer l's attention output (before its residual) | `hidden_dropout_prob` |
//! | 3 + 3l | layer l's feed-forward output (before its residual) | `hidden_dropout_prob` |
//! | 1 + 3L | the classifier's input (the pooled `[CLS]`) | `classifier_dropout`, else `hidden_dropout_prob` |

use crate::model::config::BertConfig;

/// One dropout site of a pass (see the module's table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Site {
    /// The embeddings' output.
    Embeddings,
    /// Layer l's attention probabilities.
    AttentionProbs(usize),
    /// Layer l's attention output.
    AttentionOutput(usize),
    /// Layer l's feed-forward output.
    Output(usize),
    /// The classifier's input.
    Classifier,
}

impl Site {
    /// Every site of a model with `layers` layers, in the order the graph draws them.
    // The CPU pass and the graph follow this order in code; the CUDA pass builds its sites
    // from the list.
    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    pub(crate) fn all(layers: usize) -> Vec<Site> {
        let mut v = vec![Site::Embeddings];
        for l in 0..layers {
            v.extend([
                Site::AttentionProbs(l),
                Site::AttentionOutput(l),
                Site::Output(l),
            ]);
        }
        v.push(Site::Classifier);
        v
    }

    /// The site's position in [`Site::all`] (the CUDA pass's key) for a model of `layers`
    /// layers.
    #[cfg_attr(not(any(test, feature = "cuda")), allow(dead_code))]
    pub(crate) fn index(self, layers: usize) -> usize {
        match self {
            Site::Embeddings => 0,
            Site::AttentionProbs(l) => 1 + 3 * l,
            Site::AttentionOutput(l) => 2 + 3 * l,
            Site::Output(l) => 3 + 3 * l,
            Site::Classifier => 1 + 3 * layers,
        }
    }

    /// The site's dropout probability in `cfg`.
    pub(crate) fn p(self, cfg: &BertConfig) -> f64 {
        match self {
            Site::AttentionProbs(_) => cfg.attention_probs_dropout_prob,
            Site::Classifier => cfg.classifier_dropout_prob(),
            Site::Embeddings | Site::AttentionOutput(_) | Site::Output(_) => {
                cfg.hidden_dropout_prob
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_is_indexed_in_draw_order_with_each_sites_probability() {
        let cfg = BertConfig {
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.2,
            classifier_dropout: Some(0.3),
            ..BertConfig::bert_tiny()
        };
        let all = Site::all(2);
        assert_eq!(all.len(), 2 + 3 * 2);
        for (i, s) in all.iter().enumerate() {
            assert_eq!(s.index(2), i, "{s:?}");
        }
        let ps: Vec<f64> = all.iter().map(|s| s.p(&cfg)).collect();
        assert_eq!(ps, [0.1, 0.2, 0.1, 0.1, 0.2, 0.1, 0.1, 0.3]);
    }
}
