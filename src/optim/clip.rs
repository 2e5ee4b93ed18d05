//! Gradient-norm clipping with torch's semantics (`clip_grad_norm_`).

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Var};

use crate::error::Result;
use crate::optim::host::with_cpu_slice;
use crate::optim::util::Elem;
use rayon::prelude::*;

/// Σ x², accumulated in f64: chunks in parallel, 8 interleaved lanes within a chunk (one running
/// sum would be a single dependency chain).
fn sum_sq<E: Elem>(s: &[E]) -> f64 {
    s.par_chunks(1 << 16)
        .map(|c| {
            let mut acc = [0f64; 8];
            let mut it = c.chunks_exact(8);
            for q in &mut it {
                for (a, x) in acc.iter_mut().zip(q) {
                    let x = x.to_f64();
                    *a += x * x;
                }
            }
            let tail: f64 = it.remainder().iter().map(|x| x.to_f64() * x.to_f64()).sum();
            acc.iter().sum::<f64>() + tail
        })
        .sum()
}

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
                // The store owns its gradients (backward accumulates each into fresh storage):
                // scale contiguous CPU ones in place, others out of place.
                if g.device().is_cpu() && g.is_contiguous() && g.dtype().is_float() {
                    g.inplace_op1(&Scale(coef))?;
                } else {
                    let scaled = (g * coef)?;
                    grads.insert(v.as_tensor(), scaled);
                }
            }
        }
    }
    Ok(norm)
}

/// In place: `g *= coef`.
struct Scale(f64);

impl candle_core::InplaceOp1 for Scale {
    fn name(&self) -> &'static str {
        "clip-scale"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let (a, n, c) = (l.start_offset(), l.shape().elem_count(), self.0);
        fn scale<E: Elem>(g: &mut [E], c: f64) {
            g.par_chunks_mut(1 << 16).for_each(|part| {
                for x in part {
                    *x = E::from_f64(x.to_f64() * c);
                }
            });
        }
        match s {
            CpuStorage::F32(v) => scale(&mut v[a..a + n], c),
            CpuStorage::F64(v) => scale(&mut v[a..a + n], c),
            CpuStorage::BF16(v) => scale(&mut v[a..a + n], c),
            CpuStorage::F16(v) => scale(&mut v[a..a + n], c),
            _ => candle_core::bail!("clip-scale needs a float gradient"),
        }
        Ok(())
    }
}

/// The global L2 norm of the gradients of `vars` (accumulated in f64). Contiguous CPU
/// gradients are summed on the host; the others (a GPU's) as tensors on their device, read back
/// once for all of them (one synchronisation per call, not one per parameter).
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sq = 0.0f64;
    let mut on_device: Vec<candle_core::Tensor> = Vec::new();
    // f32 gradients on a CUDA GPU: pass.cu's sumsq_partial + norm_clip (one launch each and
    // one more, one read-back) instead of three candle ops each.
    #[cfg(feature = "cuda")]
    let mut fused: Vec<candle_core::Tensor> = Vec::new();
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            if g.device().is_cpu() && g.is_contiguous() {
                if let Ok(s) = with_cpu_slice!(g, |s| sum_sq(s)) {
                    sq += s;
                    continue;
                }
            }
            #[cfg(feature = "cuda")]
            if crate::model::engine::cuda::optim::fusable(g)
                && fused
                    .first()
                    .is_none_or(|f| f.device().same_device(g.device()))
            {
                fused.push(g.clone());
                continue;
            }
            on_device.push(g.to_dtype(DType::F64)?.sqr()?.sum_all()?);
        }
    }
    #[cfg(feature = "cuda")]
    {
        sq += crate::model::engine::cuda::optim::sum_sq(&fused)?;
    }
    // One stack per device (a model's gradients share one; a hand-built store may not).
    while let Some(first) = on_device.first() {
        let device = first.device().clone();
        let (same, rest): (Vec<_>, Vec<_>) = on_device
            .into_iter()
            .partition(|t| t.device().same_device(&device));
        sq += candle_core::Tensor::stack(&same, 0)?
            .sum_all()?
            .to_scalar::<f64>()?;
        on_device = rest;
    }
    Ok(sq.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn device_style_sums_equal_the_host_sums() {
        // A transposed (non-contiguous) gradient takes the tensor path; the contiguous one the
        // host loop. Both must give the exact Σ g² (small integers: no rounding).
        let a = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let b = Var::new(&[5.0f32, 6.0], &Device::Cpu).unwrap();
        let mut store = GradStore::default();
        let t = Tensor::new(&[[1.0f32, 3.0], [2.0, 4.0]], &Device::Cpu)
            .unwrap()
            .t()
            .unwrap();
        assert!(!t.is_contiguous());
        store.insert(a.as_tensor(), t);
        store.insert(
            b.as_tensor(),
            Tensor::new(&[5.0f32, 6.0], &Device::Cpu).unwrap(),
        );
        let n = grad_norm(&store, &[a, b]).unwrap();
        assert_eq!(n, (1.0f64 + 4.0 + 9.0 + 16.0 + 25.0 + 36.0).sqrt());
    }
}
