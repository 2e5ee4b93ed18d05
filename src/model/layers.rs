//! The small differentiable building blocks of BERT. All of them keep autograd intact: candle's
//! fused `LayerNorm` and `softmax_last_dim` silently cut it, and its `gelu_erf` backward uses a
//! 6-digit constant. On the CPU they run our own fused kernels with exact backward passes
//! ([`crate::model::fused`]); elsewhere they are written from plain tensor ops.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::model::config::HiddenAct;
use crate::model::fused;
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
        if fused::supported(x) && self.weight.dtype() == x.dtype() {
            return Ok(x.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                fused::LinearOp::default(),
            )?);
        }
        // Leading dimensions are flattened into one GEMM: a broadcast (batched) matmul would
        // make the weight's gradient B small products plus a reduction instead of one product.
        let w = self.weight.t()?;
        let dims = x.dims();
        let inner = *dims.last().unwrap_or(&1);
        let rows = x.elem_count() / inner.max(1);
        let y = x
            .reshape((rows, inner))?
            .matmul(&w)?
            .broadcast_add(&self.bias)?;
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = w.dim(1)?;
        }
        Ok(y.reshape(out)?)
    }
}

impl Linear {
    /// The fused CPU form with an attention layout on either side (see [`fused::LinearOp`]).
    pub fn forward_op(&self, x: &Tensor, op: fused::LinearOp) -> Result<Tensor> {
        Ok(x.contiguous()?
            .apply_op3(&self.weight.contiguous()?, &self.bias.contiguous()?, op)?)
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
        if fused::supported(x) && self.weight.dtype() == x.dtype() {
            let op = fused::LayerNormOp { eps: self.eps };
            return Ok(x.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &self.bias.contiguous()?,
                op,
            )?);
        }
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
        HiddenAct::Gelu if fused::supported(x) => {
            x.contiguous()?.apply_op1(fused::GeluErfOp::default())?
        }
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

/// Softmax over the last axis, differentiable (the composed path; on the CPU the attention uses
/// the fused [`fused::AttnProbsOp`] instead).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}
