//! The small differentiable building blocks of BERT. All of them keep autograd intact: candle's
//! fused `LayerNorm` and `softmax_last_dim` silently cut it, and its `gelu_erf` backward uses a
//! 6-digit constant, so these are written from plain tensor ops.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::model::config::HiddenAct;
use crate::rng::SeededRng;

/// `y = x Wᵀ + b` with a torch-layout weight `[out, in]`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`.
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
}

impl Linear {
    /// Applies the layer to `[..., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.t()?;
        let y = match x.rank() {
            2 => x.matmul(&w)?,
            _ => x.broadcast_matmul(&w)?,
        };
        Ok(y.broadcast_add(&self.bias)?)
    }
}

/// LayerNorm over the last dimension: biased variance, `eps` inside the square root.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// Scale `[H]`.
    pub weight: Tensor,
    /// Shift `[H]`.
    pub bias: Tensor,
    /// Epsilon added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// Normalises `[..., H]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let inv_std = (var + self.eps)?.sqrt()?.recip()?;
        Ok(xc
            .broadcast_mul(&inv_std)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)?)
    }
}

/// Applies the activation. `Gelu` is the exact erf form, differentiated through `erf`.
pub fn activation(x: &Tensor, act: HiddenAct) -> Result<Tensor> {
    Ok(match act {
        HiddenAct::Gelu => {
            let e = x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?.erf()?;
            ((e + 1.0)? * x)?.affine(0.5, 0.0)?
        }
        HiddenAct::GeluTanh => x.gelu()?,
        HiddenAct::Relu => x.relu()?,
    })
}

/// Inverted dropout with our seeded RNG; the identity when `rng` is `None` or `p == 0`.
pub fn dropout(x: &Tensor, p: f64, rng: Option<&mut SeededRng>) -> Result<Tensor> {
    match rng {
        Some(rng) if p > 0.0 => {
            let mask = rng.dropout_mask(x.dims(), p, x.dtype(), x.device())?;
            Ok((x * mask)?)
        }
        _ => Ok(x.clone()),
    }
}

/// The most negative finite value of a float dtype (HF's additive attention mask value).
pub fn dtype_min(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        DType::F32 => f32::MIN as f64,
        DType::F16 => -65504.0,
        DType::BF16 => -3.3895313892515355e38,
        _ => f32::MIN as f64,
    }
}
