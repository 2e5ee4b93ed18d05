//! The CPU pass: `BertForSequenceClassification`'s forward, loss and every gradient written out
//! by hand over plain buffers, without candle's autograd graph; and its forward alone, which
//! evaluation uses.
//!
//! Why: candle's backward gives every graph node a zero-filled gradient buffer and an add, and
//! allocates every intermediate afresh; at bert-tiny's size that bookkeeping costs more than the
//! arithmetic. Here each block is one pass each way: Q, K and V are one product, attention runs
//! per batch row with its head views read in place (no split/merge copies), dropout, residual and
//! LayerNorm are fused, and gradients of a product are accumulated into their destination.
//!
//! It computes what the graph computes: the same dropout draws in the same order (from the
//! model's seeded stream), the same masking, the same loss (cross-entropy, or MSE for a
//! one-output model with float labels). `tests/native_pass.rs` checks it against HF's float64
//! gradients and against the graph with dropout on.
//!
//! Files by concern: [`buf`] (recycled buffers), [`gemm`] (products, linear layers),
//! [`dropout`], [`norm`] (residual + LayerNorm), [`gelu`], [`attention`], [`embeddings`],
//! [`loss`], and [`pass`], which strings them together.

mod attention;
mod buf;
pub(crate) mod dropout;
pub(crate) mod embeddings;
pub(crate) mod gelu;
mod gemm;
pub(crate) mod loss;
pub(crate) mod norm;
mod pass;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Storage, Tensor};

use crate::error::{Error, Result};
use crate::model::batch::Batch;
use crate::model::engine::ModelView;
use crate::model::engine::{additive_mask, Targets, TokenIds};
use crate::model::math::Real;
use crate::model::params::Classifier;
use crate::rng::SeededRng;

use crate::model::engine::Dims;
use pass::{Inputs, Qkv};

/// Mean loss of a labelled `batch` (its `targets` checked) and the gradient of every
/// parameter. Dropout draws from `rng` when given.
pub(crate) fn loss_and_grads(
    model: &ModelView<'_>,
    batch: &Batch,
    targets: &Targets,
    rng: Option<&mut SeededRng>,
) -> Result<(f64, GradStore)> {
    match model.dtype() {
        DType::F32 => train::<f32>(model, batch, targets, rng),
        DType::F64 => train::<f64>(model, batch, targets, rng),
        d => Err(Error::InvalidArgument(format!(
            "the CPU pass needs f32 or f64, not {d:?}"
        ))),
    }
}

/// The logits `[B, C]` of `batch` in evaluation mode (no dropout, nothing kept).
pub(crate) fn logits(model: &ModelView<'_>, batch: &Batch) -> Result<Tensor> {
    match model.dtype() {
        DType::F32 => eval::<f32>(model, batch),
        DType::F64 => eval::<f64>(model, batch),
        d => Err(Error::InvalidArgument(format!(
            "the CPU pass needs f32 or f64, not {d:?}"
        ))),
    }
}

/// Runs `f` on host views of the model's parameters, a typed tree of slices (read guards held
/// for the call).
fn with_params<T: Real, R>(
    model: &ModelView<'_>,
    f: impl FnOnce(&Classifier<&[T]>) -> Result<R>,
) -> Result<R> {
    let guards = model.params().map(&mut |t| t.storage_and_layout());
    let views = guards.try_map(&mut |(storage, layout)| -> Result<&[T]> {
        let Storage::Cpu(cpu) = &**storage else {
            return Err(Error::InvalidArgument(
                "the CPU pass needs the model's parameters on the CPU".into(),
            ));
        };
        let all = T::cpu_storage_as_slice(cpu)?;
        // The parameters are created contiguous and are only ever replaced whole.
        let (a, e) = layout.contiguous_offsets().ok_or_else(|| {
            Error::InvalidArgument("a parameter of the model is not contiguous".into())
        })?;
        Ok(&all[a..e])
    })?;
    f(&views)
}

/// The sizes of a pass over `ids`.
fn dims(model: &ModelView<'_>, ids: &TokenIds) -> Dims {
    Dims::new(model.config(), model.num_labels(), ids.batch, ids.seq_len)
}

/// Runs `f` with everything a pass over `batch` reads: the parameters' host views, each layer's
/// stacked Q|K|V, and the batch's ids, mask and sizes.
fn with_pass<T: Real, R>(
    model: &ModelView<'_>,
    batch: &Batch,
    f: impl FnOnce(&Classifier<&[T]>, &[Qkv<T>], &Inputs<T>) -> Result<R>,
) -> Result<R> {
    let ids = TokenIds::read(batch, model.config())?;
    let mask_add = additive_mask::<T>(batch, model.dtype())?;
    let inp = Inputs {
        cfg: model.config(),
        ids: &ids,
        mask_add: &mask_add,
        dims: dims(model, &ids),
    };
    with_params::<T, _>(model, |p| {
        let qkv: Vec<Qkv<T>> = p
            .bert
            .layers
            .iter()
            .map(|l| Qkv::stack(&l.attention))
            .collect();
        f(p, &qkv, &inp)
    })
}

fn train<T: Real>(
    model: &ModelView<'_>,
    batch: &Batch,
    targets: &Targets,
    rng: Option<&mut SeededRng>,
) -> Result<(f64, GradStore)> {
    let c = model.num_labels();
    let (loss, grads) = with_pass::<T, _>(model, batch, |p, qkv, inp| {
        let (logits, saved) = pass::forward(p, qkv, inp, rng, true);
        let saved = saved.expect("the forward keeps what the backward needs");
        let (loss, dlogits) = loss::loss_grad(&logits, &targets.values, c, targets.regression);
        drop(logits);
        Ok((loss, pass::backward(p, qkv, inp, &saved, &dlogits)))
    })?;
    let mut store = GradStore::default();
    let params = model.params().leaves();
    let grads = grads.into_leaves();
    debug_assert_eq!(params.len(), grads.len(), "one gradient per parameter");
    for (param, g) in params.into_iter().zip(grads) {
        debug_assert_eq!(param.elem_count(), g.len(), "gradient size");
        store.insert(param, Tensor::from_vec(g, param.shape(), &Device::Cpu)?);
    }
    Ok((loss, store))
}

fn eval<T: Real>(model: &ModelView<'_>, batch: &Batch) -> Result<Tensor> {
    let logits = with_pass::<T, _>(model, batch, |p, qkv, inp| {
        Ok(pass::forward(p, qkv, inp, None, false).0.to_vec())
    })?;
    let b = batch.input_ids.dim(0)?;
    Ok(Tensor::from_vec(
        logits,
        (b, model.num_labels()),
        &Device::Cpu,
    )?)
}
