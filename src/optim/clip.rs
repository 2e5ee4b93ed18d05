//! Gradient-norm clipping with torch's semantics (`clip_grad_norm_`).

use candle_core::backprop::GradStore;
use candle_core::{DType, Var};

use crate::error::Result;

/// Scales all gradients of `vars` by `min(1, max_norm / (total_norm + 1e-6))` and returns the
/// total L2 norm before clipping (what HF logs as `grad_norm`).
///
/// ```
/// use candle_core::{Device, Var};
/// let w = Var::new(&[3.0f64, 4.0], &Device::Cpu)?;
/// let mut grads = w.as_tensor().sqr()?.sum_all()?.affine(0.5, 0.0)?.backward()?; // grad = w
/// let norm = mfac_lab::optim::clip_grad_norm(&mut grads, &[w.clone()], 1.0)?;
/// assert!((norm - 5.0).abs() < 1e-12);
/// let g: Vec<f64> = grads.get(w.as_tensor()).unwrap().to_vec1()?;
/// assert!((g[0] - 0.6).abs() < 1e-6);
/// # Ok::<(), mfac_lab::Error>(())
/// ```
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(grads, vars)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * coef)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// The global L2 norm of the gradients of `vars` (accumulated in f64).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sq = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g
                .to_dtype(DType::F64)?
                .sqr()?
                .sum_all()?
                .to_scalar::<f64>()?;
        }
    }
    Ok(sq.sqrt())
}
