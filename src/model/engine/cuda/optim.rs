//! The optimizers' fused kernels on the CUDA pass's device: pass.cu's `sumsq_partial` and
//! `norm_clip` give the global gradient norm in one launch per gradient plus one, read back
//! once; `adamw_flat` is torch's AdamW on one parameter in one launch (candle's ops take about
//! ten per parameter). f32 contiguous CUDA tensors only: the callers (optim/clip.rs,
//! optim/adamw.rs) keep candle's ops for anything else. The launch shapes are
//! `engine::launch::{sumsq, norm_clip, adamw}`, which the emulated kernel tests use too.

use candle_core::{DType, Device, Tensor};

use super::device::{self, tensor_ptr, DBuf};
use super::with_state;
use crate::error::{Error, Result};
use crate::model::engine::launch;

/// Whether the fused kernels take `t`: f32, contiguous, on a CUDA device.
pub(crate) fn fusable(t: &Tensor) -> bool {
    t.device().is_cuda() && t.dtype() == DType::F32 && t.is_contiguous()
}

fn cuda_of(t: &Tensor) -> Result<candle_core::cuda_backend::CudaDevice> {
    match t.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => Err(Error::InvalidArgument(format!(
            "the fused optimizer kernels run on a CUDA device, not on {other:?}"
        ))),
    }
}

/// Σ g² in f64 over `grads` (all [`fusable`], on one CUDA device): `sumsq_partial` per
/// gradient into one buffer of block sums, `norm_clip` adds them in order, one read-back.
pub(crate) fn sum_sq(grads: &[Tensor]) -> Result<f64> {
    let Some(first) = grads.first() else {
        return Ok(0.0);
    };
    let dev = cuda_of(first)?;
    with_state(&dev, None, |st, _| {
        let shapes: Vec<_> = grads
            .iter()
            .map(|g| launch::sumsq(g.elem_count()))
            .collect();
        let total: usize = shapes.iter().map(|l| l.grid as usize).sum();
        let part = DBuf::<f64>::zeros(&st.stream, total, "the gradients' partial sums")?;
        let out = DBuf::<f64>::zeros(&st.stream, 2, "the gradient norm")?;
        let mut at = 0;
        for (g, l) in grads.iter().zip(&shapes) {
            let gp = tensor_ptr(g, &st.stream, "a gradient")?;
            device::launch!(st.stream, &st.k.sumsq_partial, *l, "sumsq_partial";
                gp, g.elem_count(), part.at(at))?;
            at += l.grid as usize;
        }
        // max_norm 0: out[1] is 1, out[0] = √Σ; the caller adds other devices' sums.
        device::launch!(st.stream, &st.k.norm_clip, launch::norm_clip(), "norm_clip";
            part.ptr, total as i32, 0.0f64, out.ptr)?;
        let norm = out.read(&st.stream, 1)?[0];
        Ok(norm * norm)
    })
}

/// One parameter of a fused AdamW step: weights, gradient, first and second moments (all
/// [`fusable`], the same size, on one device) and its `1 − lr·wd`.
pub(crate) struct AdamWSlot<'a> {
    pub w: &'a Tensor,
    pub g: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub decay: f64,
}

/// torch's AdamW on every slot, in place (`adamw_flat`: m ← m + (1−β₁)(g − m),
/// v ← β₂v + (1−β₂)g², w ← w·decay − step·m / (√v / bc2 + eps)); the clip factor it reads is
/// 1 (the gradients were clipped before, as in HF's order).
pub(crate) fn adamw(
    slots: &[AdamWSlot],
    (beta1, beta2, step, bc2, eps): (f64, f64, f64, f64, f64),
) -> Result<()> {
    let Some(first) = slots.first() else {
        return Ok(());
    };
    let dev = cuda_of(first.w)?;
    with_state(&dev, None, |st, _| {
        let unit = DBuf::<f64>::from_host(&st.stream, &[0.0, 1.0], "the unit clip factor")?;
        for s in slots {
            let n = s.w.elem_count();
            if [s.g, s.m, s.v].iter().any(|t| t.elem_count() != n) {
                return Err(Error::InvalidArgument(
                    "AdamW: a gradient or moment differs in size from its parameter".into(),
                ));
            }
            let (w, g) = (
                tensor_ptr(s.w, &st.stream, "a parameter")?,
                tensor_ptr(s.g, &st.stream, "a gradient")?,
            );
            let (m, v) = (
                tensor_ptr(s.m, &st.stream, "a first moment")?,
                tensor_ptr(s.v, &st.stream, "a second moment")?,
            );
            device::launch!(st.stream, &st.k.adamw_flat, launch::adamw(n), "adamw_flat";
                w, g, m, v, n, unit.ptr, beta1 as f32, beta2 as f32, s.decay as f32,
                step as f32, bc2 as f32, eps as f32)?;
        }
        Ok(())
    })
}
