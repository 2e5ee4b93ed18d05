//! The ways to run the model. A [`BertClassifier`](crate::model::BertClassifier) is its typed
//! parameters, config and tokenizer;
//! an [`Engine`] computes with them:
//!
//! | engine | where | what it does |
//! |---|---|---|
//! | [`Engine::Graph`] ([`graph`]) | any device | plain candle ops with autograd: the reference, and what a hand-written loop (`forward` then `loss.backward()`) runs |
//! | [`Engine::CpuPass`] ([`cpu`]) | CPU, f32/f64, exact GELU | forward, loss and every gradient by hand, no graph; its forward alone for evaluation |
//! | `Engine::CudaPass` (`cuda`, `cuda` feature) | CUDA, f32, exact GELU | the same on the GPU: cuBLAS products and our kernels over buffers allocated once, no graph |
//!
//! [`Engine::runs`] says what each engine covers, in one `match`; [`Engine::for_model`] takes
//! the first that runs a model; `BertClassifier::loss_and_grads` and
//! `BertClassifier::logits` run the chosen one (through a [`ModelView`]: the engines never see
//! the classifier itself). A new engine is one more variant, one arm in
//! `runs` and in the two dispatching matches below, and a module beside these.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod dims;
#[cfg(test)]
mod emu_tests;
pub(crate) mod graph;
pub(crate) mod launch;
pub(crate) mod loss;
pub(crate) mod sites;
mod view;

pub(crate) use dims::Dims;
pub use graph::{BertOutput, ClassifierOutput};
pub(crate) use view::ModelView;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::batch::Batch;
use crate::model::config::{BertConfig, HiddenAct};
use crate::model::math::Real;
use crate::rng::SeededRng;

/// How a model is run: the graph (candle ops with autograd, any device: the reference, and what
/// `forward` + `loss.backward()` runs) or a hand-written pass without a graph (the CPU pass;
/// with the `cuda` feature the CUDA pass). [`Engine::runs`] says what each covers; docs/DESIGN.md
/// has the map and where a new engine goes.
///
/// ```
/// use mfac_lab::prelude::*;
/// use mfac_lab::model::Engine;
/// let m = BertClassifier::random(&BertConfig::bert_tiny(), 3, 0, &Device::Cpu, DType::F32)?;
/// assert_eq!(m.engine(), Engine::CpuPass);
/// let m = m.with_engine(Engine::Graph)?; // e.g. to check one engine against the other
/// assert_eq!(m.engine(), Engine::Graph);
/// # Ok::<(), mfac_lab::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// candle's ops and autograd graph, on any device and dtype.
    Graph,
    /// The hand-written CPU pass (f32 or f64, exact GELU).
    CpuPass,
    /// The hand-written CUDA pass (f32, exact GELU; cuBLAS and our kernels, no graph).
    #[cfg(feature = "cuda")]
    CudaPass,
}

impl Engine {
    /// Whether this engine can run a model on `device` in `dtype` with `cfg`: the one place
    /// where what each engine covers is written down.
    pub fn runs(self, device: &Device, dtype: DType, cfg: &BertConfig) -> bool {
        let gelu = cfg.activation() == HiddenAct::Gelu;
        match self {
            Engine::Graph => true,
            Engine::CpuPass => device.is_cpu() && matches!(dtype, DType::F32 | DType::F64) && gelu,
            #[cfg(feature = "cuda")]
            Engine::CudaPass => {
                device.is_cuda()
                    && dtype == DType::F32
                    && cuda::supports(cfg)
                    && cuda::capable(device)
            }
        }
    }

    /// The fastest engine that runs a model on `device` in `dtype` with `cfg`: the first of
    /// the CUDA pass, the CPU pass and the graph that [`Engine::runs`] it. The environment
    /// variable `MFAC_LAB_CUDA_PASS=off` (or `0`) leaves the CUDA pass out (an A/B switch for
    /// GPU checks).
    ///
    /// ```
    /// use mfac_lab::model::Engine;
    /// use mfac_lab::prelude::*;
    /// let cfg = BertConfig::bert_tiny();
    /// assert_eq!(Engine::for_model(&Device::Cpu, DType::F32, &cfg), Engine::CpuPass);
    /// assert_eq!(Engine::for_model(&Device::Cpu, DType::BF16, &cfg), Engine::Graph);
    /// ```
    pub fn for_model(device: &Device, dtype: DType, cfg: &BertConfig) -> Engine {
        let candidates = [
            #[cfg(feature = "cuda")]
            Some(Engine::CudaPass).filter(|_| !cuda::switched_off()),
            Some(Engine::CpuPass),
        ];
        candidates
            .into_iter()
            .flatten()
            .find(|e| e.runs(device, dtype, cfg))
            .unwrap_or(Engine::Graph)
    }

    /// An error naming what `self` covers, if it cannot run `model`.
    pub(crate) fn check(self, model: &ModelView<'_>) -> Result<()> {
        if self.runs(model.device(), model.dtype(), model.config()) {
            return Ok(());
        }
        let covers = match self {
            Engine::Graph => "every model",
            Engine::CpuPass => "f32/f64 models with the exact GELU on the CPU",
            #[cfg(feature = "cuda")]
            Engine::CudaPass => {
                "f32 models with the exact GELU and a hidden size of at most 512 (a multiple of 4 \
                 and of the head count) on a CUDA GPU of compute capability ≥ 9.0 (H100/H200)"
            }
        };
        Err(Error::InvalidArgument(format!(
            "{self:?} runs {covers}, not a {:?} model with {:?} on {:?}: use Engine::Graph",
            model.dtype(),
            model.config().activation(),
            model.device()
        )))
    }

    /// Mean loss and every gradient of a labelled batch (dropout from `rng` when given).
    pub(crate) fn loss_and_grads(
        self,
        model: &ModelView<'_>,
        batch: &Batch,
        rng: Option<&mut SeededRng>,
    ) -> Result<(f64, candle_core::backprop::GradStore)> {
        let targets = || Targets::read(batch, model.num_labels());
        match self {
            Engine::CpuPass => cpu::loss_and_grads(model, batch, &targets()?, rng),
            // The pass checks the labels on the device (the loss kernel's flag, read with the
            // loss): no copy of the labels to the host, no extra sync per step.
            #[cfg(feature = "cuda")]
            Engine::CudaPass => cuda::loss_and_grads(model, batch, rng),
            Engine::Graph => graph::loss_and_grads(model, batch, &targets()?.labels, rng),
        }
    }

    /// Evaluation-mode logits `[B, C]`, without a graph.
    pub(crate) fn logits(self, model: &ModelView<'_>, batch: &Batch) -> Result<Tensor> {
        match self {
            Engine::CpuPass => cpu::logits(model, batch),
            #[cfg(feature = "cuda")]
            Engine::CudaPass => cuda::logits(model, batch),
            Engine::Graph => Ok(graph::forward(model, batch, None)?.logits.detach()),
        }
    }
}

#[cfg(feature = "cuda")]
impl Engine {
    /// For the GPU check (examples/gpu_pass_check.rs): over `n` elements of two dropout
    /// sites of the CUDA pass (probability `p`, the step keyed `step_key`), the counts of
    /// [a kept, b kept, both kept, a's neighbours i and i+1 both kept]. Not a stable API.
    #[doc(hidden)]
    pub fn cuda_dropout_counts(
        device: &candle_core::Device,
        step_key: u64,
        sites: (u64, u64),
        p: f64,
        n: u64,
    ) -> Result<[u64; 4]> {
        cuda::dropout_counts(device, step_key, sites, p, n)
    }
}

/// A training batch's labels, checked once for every engine: present, and class ids in
/// `0..num_labels` (a one-output model with float labels is regression, as in HF).
pub(crate) struct Targets {
    /// The labels as the batch holds them.
    pub labels: Tensor,
    /// The labels as f64 on the host.
    pub values: Vec<f64>,
    /// MSE instead of cross-entropy.
    pub regression: bool,
}

impl Targets {
    pub(crate) fn read(batch: &Batch, num_labels: usize) -> Result<Self> {
        let labels = batch
            .labels
            .clone()
            .ok_or_else(|| Error::InvalidArgument("a training batch needs labels".into()))?;
        let regression = num_labels == 1 && labels.dtype().is_float();
        let values: Vec<f64> = labels.to_dtype(DType::F64)?.to_vec1()?;
        if !regression {
            if let Some(l) = values
                .iter()
                .find(|&&l| l < 0.0 || l as usize >= num_labels || l.fract() != 0.0)
            {
                return Err(Error::InvalidArgument(format!(
                    "label {l} is out of range for {num_labels} classes (class ids 0..{num_labels})"
                )));
            }
        }
        Ok(Targets {
            labels,
            values,
            regression,
        })
    }
}

/// A batch's token ids and token-type ids on the host, checked against the model's tables
/// (an id out of range is an error naming it, on every engine).
pub(crate) struct TokenIds {
    pub batch: usize,
    pub seq_len: usize,
    /// `[B·T]`.
    pub ids: Vec<u32>,
    /// `[B·T]`.
    pub type_ids: Vec<u32>,
}

impl TokenIds {
    pub(crate) fn read(batch: &Batch, cfg: &BertConfig) -> Result<Self> {
        let (b, t) = batch.input_ids.dims2()?;
        let host = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?)
        };
        let (ids, type_ids) = (host(&batch.input_ids)?, host(&batch.token_type_ids)?);
        if t > cfg.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "sequence length {t} exceeds max_position_embeddings {}",
                cfg.max_position_embeddings
            )));
        }
        if let Some(&id) = ids.iter().find(|&&i| i as usize >= cfg.vocab_size) {
            return Err(Error::InvalidArgument(format!(
                "token id {id} is out of the vocabulary (size {})",
                cfg.vocab_size
            )));
        }
        if let Some(&id) = type_ids
            .iter()
            .find(|&&i| i as usize >= cfg.type_vocab_size)
        {
            return Err(Error::InvalidArgument(format!(
                "token type id {id} is out of range (type_vocab_size {})",
                cfg.type_vocab_size
            )));
        }
        Ok(TokenIds {
            batch: b,
            seq_len: t,
            ids,
            type_ids,
        })
    }
}

/// The most negative finite value of a float dtype (HF's additive attention mask value).
pub(crate) fn dtype_min(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN,
        DType::F32 => f32::MIN as f64,
        DType::F16 => -65504.0,
        DType::BF16 => -3.3895313892515355e38,
        _ => f32::MIN as f64,
    }
}

/// HF's extended attention mask `(mask − 1) · (−min)` per token `[B·T]`, in the model's dtype.
pub(crate) fn additive_mask<T: Real>(batch: &Batch, dtype: DType) -> Result<Vec<T>> {
    let big = T::from_f64(-dtype_min(dtype));
    Ok(batch
        .attention_mask
        .to_dtype(dtype)?
        .flatten_all()?
        .to_vec1::<T>()?
        .into_iter()
        .map(|k| (k - T::one()) * big)
        .collect())
}
