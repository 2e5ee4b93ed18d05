//! The sizes of one pass, shared by the CPU and the CUDA pass.

use crate::model::config::BertConfig;

/// The sizes of one pass: batch `b`, sequence `t`, hidden `h`, heads `nh` of size `d`, the
/// feed-forward's `inter`, `layers` layers and `c` outputs.
// The CPU pass reads neither `layers` nor `c`: without the `cuda` feature they are unused.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Dims {
    pub b: usize,
    pub t: usize,
    pub h: usize,
    pub nh: usize,
    pub d: usize,
    pub inter: usize,
    pub layers: usize,
    pub c: usize,
}

impl Dims {
    /// The sizes of a pass of a `c`-output model with `cfg` over a `b × t` batch.
    pub(crate) fn new(cfg: &BertConfig, c: usize, b: usize, t: usize) -> Self {
        let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
        Dims {
            b,
            t,
            h,
            nh,
            d: h / nh,
            inter: cfg.intermediate_size,
            layers: cfg.num_hidden_layers,
            c,
        }
    }

    /// Tokens in the batch: `b·t`.
    pub(crate) fn n(&self) -> usize {
        self.b * self.t
    }

    /// Attention probabilities in the batch: `b·nh·t·t`.
    pub(crate) fn tt(&self) -> usize {
        self.b * self.nh * self.t * self.t
    }
}
