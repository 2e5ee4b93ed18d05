//! The CUDA pass: `BertForSequenceClassification`'s forward, loss and every gradient on a CUDA
//! device without candle's graph, and its forward alone for evaluation. The GPU twin of
//! [`super::cpu`]: same maths, same order of operations per row, f32.
//!
//! Why: at bert-tiny's size a step is bound by per-operation overhead, not arithmetic; candle's
//! graph launches hundreds of small kernels and allocates every intermediate. Here:
//! - every buffer is allocated once (grown when a larger batch comes) and reused;
//! - products go through cuBLAS on candle's handle and stream ([`blas`]): Q, K and V as one
//!   product, attention as strided-batched products over head views of the Q|K|V rows (no
//!   split/merge copies), TF32 off;
//! - our kernels (`kernels/pass.cu`, [`device`]) do the rest: embeddings (+ LayerNorm + dropout)
//!   and their scatter-add backward, residual + dropout + LayerNorm both ways (the column sums of
//!   the LayerNorm and the dense bias gradients fused into the backward), exact-erf GELU both
//!   ways, masked softmax with dropout both ways, pooler tanh, cross-entropy / MSE;
//! - dropout masks are never stored: a counter-based hash of (site key, element index) decides,
//!   the backward recomputes it; the step's key is one draw from the model's seeded stream, so
//!   the same seed gives the same masks on the same GPU (they differ from the CPU pass's);
//! - the host waits for the device once per call: to read the loss and the out-of-range flag
//!   (ids, types, labels are checked on the device; a bad one is an error naming it).
//!
//! Gradients land in one flat f32 tensor (allocated zeroed per step) and are handed out as views
//! of it, keyed by the parameters like `loss.backward()`'s. Within it Q/K/V weights are
//! contiguous (so `dW_qkv` is one product) and every tensor starts on a 256-byte boundary.
//!
//! Checked only on a GPU: examples/gpu_pass_check.rs via scripts/gpu-check-pass.sh (logits, loss
//! and every gradient against the CPU pass, dropout statistics, an AdamW replay, timings).

mod blas;
pub(crate) mod device;
pub(crate) mod optim;
mod pass;

use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::cuda_backend::cudarc::cublas::CudaBlas;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::batch::Batch;
use crate::model::config::{BertConfig, HiddenAct};
use crate::model::engine::{Dims, ModelView};
use crate::model::params::{
    Bert, Classifier, DenseNorm, Embeddings, Layer, LayerNorm, Linear, SelfAttention,
};
use crate::rng::SeededRng;

use device::{tensor_ptr, DBuf, Kernels, MAX_HIDDEN};

/// Whether the CUDA pass can run a model of this config (else the graph runs it).
/// True when the environment variable `MFAC_LAB_CUDA_PASS` is `off` or `0`: the graph then
/// runs CUDA models (an A/B switch for GPU checks).
pub(crate) fn switched_off() -> bool {
    matches!(
        std::env::var("MFAC_LAB_CUDA_PASS").as_deref(),
        Ok("0" | "off")
    )
}

/// Whether the GPU of `device` can load pass.cu's fatbin (compute capability ≥ 9.0: sm_90a
/// machine code + compute_90 PTX). On an older GPU (an A100 is 8.0) the graph runs the model,
/// and `with_engine(Engine::CudaPass)` is an error that says why.
pub(crate) fn capable(device: &Device) -> bool {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    let Device::Cuda(d) = device else {
        return false;
    };
    let ctx = d.cuda_stream().context().clone();
    match (
        ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
        ctx.attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
    ) {
        (Ok(major), Ok(minor)) => crate::gpu::runs_our_kernels(major, minor),
        _ => false,
    }
}

pub(crate) fn supports(cfg: &BertConfig) -> bool {
    let h = cfg.hidden_size;
    cfg.activation() == HiddenAct::Gelu
        && h <= MAX_HIDDEN
        && h % 4 == 0
        && cfg.num_attention_heads > 0
        && h % cfg.num_attention_heads == 0
}

/// Capacities the buffers were allocated for (they grow, never shrink).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Caps {
    n: usize,
    tt: usize,
    b: usize,
    h: usize,
    inter: usize,
    layers: usize,
    c: usize,
}

impl Caps {
    fn holds(&self, d: &Dims) -> bool {
        self.h == d.h
            && self.inter == d.inter
            && self.layers == d.layers
            && self.c == d.c
            && self.n >= d.n()
            && self.tt >= d.tt()
            && self.b >= d.b
    }
}

/// What one layer's forward keeps for its backward.
pub(crate) struct LayerBufs {
    pub w3: DBuf<f32>,
    pub b3: DBuf<f32>,
    pub qkv: DBuf<f32>,
    pub probs: DBuf<f32>,
    pub pd: DBuf<f32>,
    pub ctx: DBuf<f32>,
    pub xhat1: DBuf<f32>,
    pub inv1: DBuf<f32>,
    pub y1: DBuf<f32>,
    pub f: DBuf<f32>,
    pub g: DBuf<f32>,
    pub xhat2: DBuf<f32>,
    pub inv2: DBuf<f32>,
    pub y2: DBuf<f32>,
}

/// Every buffer of a pass, allocated for [`Caps`].
pub(crate) struct Buffers {
    caps: Caps,
    pub x0: DBuf<f32>,
    pub xhat0: DBuf<f32>,
    pub inv0: DBuf<f32>,
    pub layers: Vec<LayerBufs>,
    pub lin: DBuf<f32>,
    pub zpool: DBuf<f32>,
    pub pooled: DBuf<f32>,
    pub head_in: DBuf<f32>,
    pub logits: DBuf<f32>,
    pub dlogits: DBuf<f32>,
    pub dhead: DBuf<f32>,
    pub dy: DBuf<f32>,
    pub dy1: DBuf<f32>,
    pub da: DBuf<f32>,
    pub dctx: DBuf<f32>,
    pub dg: DBuf<f32>,
    pub dqkv: DBuf<f32>,
    pub dp: DBuf<f32>,
    pub part: DBuf<f32>,
    pub ones: DBuf<f32>,
    pub loss: DBuf<f64>,
    pub flag: DBuf<i32>,
}

impl Buffers {
    fn new(stream: &Arc<CudaStream>, k: &Kernels, caps: Caps) -> Result<Self> {
        let f = |len: usize, what: &str| DBuf::<f32>::zeros(stream, len, what);
        let Caps {
            n,
            tt,
            b,
            h,
            inter,
            layers,
            c,
        } = caps;
        let layers = (0..layers)
            .map(|_| -> Result<LayerBufs> {
                Ok(LayerBufs {
                    w3: f(3 * h * h, "stacked QKV weights")?,
                    b3: f(3 * h, "stacked QKV biases")?,
                    qkv: f(n * 3 * h, "Q|K|V")?,
                    probs: f(tt, "attention probabilities")?,
                    pd: f(tt, "dropped attention probabilities")?,
                    ctx: f(n * h, "attention context")?,
                    xhat1: f(n * h, "normalised attention output")?,
                    inv1: f(n, "1/σ")?,
                    y1: f(n * h, "attention block output")?,
                    f: f(n * inter, "intermediate pre-activation")?,
                    g: f(n * inter, "GELU output")?,
                    xhat2: f(n * h, "normalised layer output")?,
                    inv2: f(n, "1/σ")?,
                    y2: f(n * h, "layer output")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let ln_blocks = n.div_ceil(device::LN_ROWS);
        let ones_len = n.max(b);
        let bufs = Buffers {
            caps,
            x0: f(n * h, "embeddings output")?,
            xhat0: f(n * h, "normalised embeddings")?,
            inv0: f(n, "1/σ")?,
            layers,
            lin: f(n * h, "dense output")?,
            zpool: f(b * h, "pooler pre-activation")?,
            pooled: f(b * h, "pooled output")?,
            head_in: f(b * h, "classifier input")?,
            logits: f(b * c, "logits")?,
            dlogits: f(b * c, "logits' gradient")?,
            dhead: f(b * h, "classifier input's gradient")?,
            dy: f(n * h, "hidden gradient")?,
            dy1: f(n * h, "hidden gradient")?,
            da: f(n * h, "dense output's gradient")?,
            dctx: f(n * h, "context gradient")?,
            dg: f(n * inter, "intermediate gradient")?,
            dqkv: f(n * 3 * h, "Q|K|V gradient")?,
            dp: f(tt, "attention gradient")?,
            part: f(ln_blocks * 3 * h, "LayerNorm column partial sums")?,
            ones: f(ones_len, "ones")?,
            loss: DBuf::<f64>::zeros(stream, 1, "the loss")?,
            flag: DBuf::<i32>::zeros(stream, 1, "the input check flag")?,
        };
        device::launch!(stream, &k.fill_f32, device::elementwise(ones_len), "fill_f32";
            bufs.ones.ptr, 1.0f32, ones_len)?;
        Ok(bufs)
    }
}

/// Everything the pass keeps on one device: its kernels, handle, stream and buffers.
pub(crate) struct State {
    id: DeviceId,
    pub stream: Arc<CudaStream>,
    pub blas: Arc<CudaBlas>,
    pub k: Kernels,
    bufs: Option<Buffers>,
    /// candle's CUDA stream is per thread: the state works only on the thread that made it.
    thread: std::thread::ThreadId,
}

// SAFETY: the state is only ever used under the STATES mutex; the cuBLAS handle and the driver
// objects it holds are used from one thread at a time.
unsafe impl Send for State {}

static STATES: Mutex<Vec<State>> = Mutex::new(Vec::new());

/// Runs `f` on the pass state of `dev` (created at the first call), with buffers for `dims`.
pub(crate) fn with_state<R>(
    dev: &CudaDevice,
    dims: Option<Dims>,
    f: impl FnOnce(&State, Option<&Buffers>) -> Result<R>,
) -> Result<R> {
    let mut states = STATES
        .lock()
        .map_err(|_| Error::InvalidArgument("the CUDA pass's state is poisoned".into()))?;
    let i = match states.iter().position(|s| s.id == dev.id()) {
        Some(i) => i,
        None => {
            // An error left by an earlier asynchronous operation would otherwise surface under
            // the name of the pass's first call.
            dev.cuda_stream()
                .context()
                .check_err()
                .map_err(device::cuda_err(
                    "an earlier CUDA operation (before the CUDA pass)",
                ))?;
            let blas = dev.cublas_handle();
            blas::no_tf32(&blas)?;
            states.push(State {
                id: dev.id(),
                stream: dev.cuda_stream(),
                blas,
                k: Kernels::load(dev)?,
                bufs: None,
                thread: std::thread::current().id(),
            });
            states.len() - 1
        }
    };
    let st = &mut states[i];
    if st.thread != std::thread::current().id() {
        return Err(Error::InvalidArgument(format!(
            "the CUDA pass was set up on thread {:?} and called from {:?}: candle's CUDA stream is per thread, so this call would not wait for the other thread's work; train the model on one thread",
            st.thread,
            std::thread::current().id()
        )));
    }
    if let Some(d) = dims {
        let fits = st.bufs.as_ref().is_some_and(|b| b.caps.holds(&d));
        if !fits {
            let old = st.bufs.as_ref().map(|b| b.caps);
            let grow = |now: usize, old: Option<usize>| now.max(old.unwrap_or(0));
            let same_arch = old.is_some_and(|o| o.h == d.h && o.layers == d.layers);
            let caps = Caps {
                n: grow(d.n(), old.filter(|_| same_arch).map(|o| o.n)),
                tt: grow(d.tt(), old.filter(|_| same_arch).map(|o| o.tt)),
                b: grow(d.b, old.filter(|_| same_arch).map(|o| o.b)),
                h: d.h,
                inter: d.inter,
                layers: d.layers,
                c: d.c,
            };
            st.bufs = None; // free the old buffers first
            st.bufs = Some(Buffers::new(&st.stream, &st.k, caps)?);
        }
    }
    let st = &states[i];
    f(st, st.bufs.as_ref())
}

/// The model's CUDA device.
fn cuda_device(model: &ModelView<'_>) -> Result<CudaDevice> {
    match model.device() {
        Device::Cuda(d) => Ok(d.clone()),
        other => Err(Error::InvalidArgument(format!(
            "the CUDA pass runs models on a CUDA device, not on {other:?}: use Engine::Graph"
        ))),
    }
}

fn check_model(model: &ModelView<'_>) -> Result<()> {
    if model.dtype() != DType::F32 {
        return Err(Error::InvalidArgument(format!(
            "the CUDA pass runs f32 models, not {:?}: use Engine::Graph",
            model.dtype()
        )));
    }
    if !supports(model.config()) {
        return Err(Error::InvalidArgument(format!(
            "the CUDA pass needs the exact GELU and a hidden size ≤ {MAX_HIDDEN}, a multiple of 4 \
             and of the head count: use Engine::Graph"
        )));
    }
    Ok(())
}

/// A batch's tensors on the device in the pass's dtypes (u32 ids, f32 labels), contiguous.
pub(crate) struct DeviceBatch {
    pub ids: Tensor,
    pub types: Tensor,
    pub mask: Tensor,
    pub labels: Option<Tensor>,
    pub regression: bool,
}

impl DeviceBatch {
    fn new(batch: &Batch, device: &Device, c: usize, cfg: &BertConfig) -> Result<Self> {
        let t = batch.seq_len();
        if t > cfg.max_position_embeddings {
            return Err(Error::InvalidArgument(format!(
                "sequence length {t} exceeds max_position_embeddings {}",
                cfg.max_position_embeddings
            )));
        }
        let u32s = |x: &Tensor| -> Result<Tensor> {
            Ok(x.to_device(device)?.to_dtype(DType::U32)?.contiguous()?)
        };
        let regression = c == 1 && batch.labels.as_ref().is_some_and(|l| l.dtype().is_float());
        let labels = match &batch.labels {
            Some(l) => Some(l.to_device(device)?.to_dtype(DType::F32)?.contiguous()?),
            None => None,
        };
        Ok(DeviceBatch {
            ids: u32s(&batch.input_ids)?,
            types: u32s(&batch.token_type_ids)?,
            mask: u32s(&batch.attention_mask)?,
            labels,
            regression,
        })
    }
}

/// The input check's flag bits, as an error naming what was out of range.
fn flag_error(flag: i32, cfg: &BertConfig, c: usize) -> Result<()> {
    if flag & 1 != 0 {
        return Err(Error::InvalidArgument(format!(
            "a token id is out of the vocabulary (size {})",
            cfg.vocab_size
        )));
    }
    if flag & 2 != 0 {
        return Err(Error::InvalidArgument(format!(
            "a token type id is out of range (type_vocab_size {})",
            cfg.type_vocab_size
        )));
    }
    if flag & 4 != 0 {
        return Err(Error::InvalidArgument(format!(
            "a label is out of range for {c} classes (labels must be class ids 0..{c})"
        )));
    }
    Ok(())
}

/// Offsets (in f32 elements) of every gradient in the flat buffer, as a parameter tree, and
/// its total length. Q, K, V weights are contiguous, and so are their biases; every tensor
/// starts on a multiple of 64 elements (256 bytes).
pub(crate) fn grad_layout(sizes: &Classifier<usize>) -> (Classifier<usize>, usize) {
    let mut cur = 0usize;
    let mut take = |n: usize| {
        let o = cur;
        cur += n.div_ceil(64) * 64;
        o
    };
    let lin = |l: &Linear<usize>, take: &mut dyn FnMut(usize) -> usize| Linear {
        weight: take(l.weight),
        bias: take(l.bias),
    };
    let ln = |l: &LayerNorm<usize>, take: &mut dyn FnMut(usize) -> usize| LayerNorm {
        weight: take(l.weight),
        bias: take(l.bias),
    };
    let e = &sizes.bert.embeddings;
    let embeddings = Embeddings {
        word_embeddings: take(e.word_embeddings),
        position_embeddings: take(e.position_embeddings),
        token_type_embeddings: take(e.token_type_embeddings),
        layer_norm: ln(&e.layer_norm, &mut take),
    };
    let layers = sizes
        .bert
        .layers
        .iter()
        .map(|l| {
            let a = &l.attention;
            let (wq, bq) = (a.query.weight, a.query.bias);
            // Three equal products stacked: no padding between them.
            let w = take(3 * wq);
            let b = take(3 * bq);
            Layer {
                attention: SelfAttention {
                    query: Linear { weight: w, bias: b },
                    key: Linear {
                        weight: w + wq,
                        bias: b + bq,
                    },
                    value: Linear {
                        weight: w + 2 * wq,
                        bias: b + 2 * bq,
                    },
                },
                attention_output: DenseNorm {
                    dense: lin(&l.attention_output.dense, &mut take),
                    layer_norm: ln(&l.attention_output.layer_norm, &mut take),
                },
                intermediate: lin(&l.intermediate, &mut take),
                output: DenseNorm {
                    dense: lin(&l.output.dense, &mut take),
                    layer_norm: ln(&l.output.layer_norm, &mut take),
                },
            }
        })
        .collect();
    let pooler = lin(&sizes.bert.pooler, &mut take);
    let classifier = lin(&sizes.classifier, &mut take);
    let offsets = Classifier {
        bert: Bert {
            embeddings,
            layers,
            pooler,
        },
        classifier,
    };
    (offsets, cur)
}

/// Device addresses of the model's parameters, as a tree.
fn param_ptrs(model: &ModelView<'_>, stream: &Arc<CudaStream>) -> Result<Classifier<u64>> {
    model
        .params()
        .try_map(&mut |t| tensor_ptr(t, stream, "a parameter of the model"))
}

/// Mean loss of a labelled `batch` and the gradient of every parameter. Dropout draws its
/// step key from `rng` when given.
pub(crate) fn loss_and_grads(
    model: &ModelView<'_>,
    batch: &Batch,
    rng: Option<&mut SeededRng>,
) -> Result<(f64, GradStore)> {
    check_model(model)?;
    let dev = cuda_device(model)?;
    let device = model.device().clone();
    let cfg = model.config();
    let c = model.num_labels();
    if batch.labels.is_none() {
        return Err(Error::InvalidArgument(
            "a training batch needs labels".into(),
        ));
    }
    let db = DeviceBatch::new(batch, &device, c, cfg)?;
    let dims = Dims::new(cfg, c, batch.len(), batch.seq_len());
    let step_key = rng.map(|r| r.next_u64());
    let sizes = model.params().map(&mut |t| t.elem_count());
    let (offsets, total) = grad_layout(&sizes);
    let flat = Tensor::zeros(total, DType::F32, &device)?;
    let (loss, flag) = with_state(&dev, Some(dims), |st, bufs| {
        let bufs = bufs.expect("with_state allocates for dims");
        let p = param_ptrs(model, &st.stream)?;
        let base = tensor_ptr(&flat, &st.stream, "the gradient buffer")?;
        let gptr = offsets.map(&mut |&o| base + (o * 4) as u64);
        let run = pass::Run::new(st, bufs, dims, cfg, &db, step_key)?;
        run.forward(&p, true)?;
        run.backward(&p, &gptr)?;
        let loss = bufs.loss.read(&st.stream, 1)?[0];
        let flag = bufs.flag.read(&st.stream, 1)?[0];
        Ok((loss, flag))
    })?;
    flag_error(flag, cfg, c)?;
    let mut store = GradStore::default();
    for (param, &off) in model.params().leaves().into_iter().zip(offsets.leaves()) {
        let view = flat
            .narrow(0, off, param.elem_count())?
            .reshape(param.shape())?;
        store.insert(param, view);
    }
    Ok((loss, store))
}

/// The logits `[B, C]` of `batch` in evaluation mode (no dropout), through the pass's forward.
pub(crate) fn logits(model: &ModelView<'_>, batch: &Batch) -> Result<Tensor> {
    check_model(model)?;
    let dev = cuda_device(model)?;
    let device = model.device().clone();
    let cfg = model.config();
    let c = model.num_labels();
    let db = DeviceBatch::new(batch, &device, c, cfg)?;
    let dims = Dims::new(cfg, c, batch.len(), batch.seq_len());
    let out = Tensor::zeros((dims.b, c), DType::F32, &device)?;
    let flag = with_state(&dev, Some(dims), |st, bufs| {
        let bufs = bufs.expect("with_state allocates for dims");
        let p = param_ptrs(model, &st.stream)?;
        let run = pass::Run::new(st, bufs, dims, cfg, &db, None)?;
        run.forward(&p, false)?;
        run.logits_bias(&p)?;
        let dst = tensor_ptr(&out, &st.stream, "the logits")?;
        device::copy_bytes(&st.stream, dst, bufs.logits.ptr, dims.b * c * 4)?;
        Ok(bufs.flag.read(&st.stream, 1)?[0])
    })?;
    flag_error(flag, cfg, c)?;
    Ok(out)
}

/// The GPU check's look at the dropout generator: over `n` elements of two sites (`sites`,
/// probability `p`, the step keyed `step_key`), the counts of (a kept, b kept, both kept,
/// a's neighbours i and i+1 both kept).
pub(crate) fn dropout_counts(
    device: &Device,
    step_key: u64,
    sites: (u64, u64),
    p: f64,
    n: u64,
) -> Result<[u64; 4]> {
    let Device::Cuda(dev) = device else {
        return Err(Error::InvalidArgument(
            "the dropout probe needs a CUDA device".into(),
        ));
    };
    with_state(dev, None, |st, _| {
        let kept = DBuf::<u64>::zeros(&st.stream, 4, "the keep counts")?;
        let a = device::DropSite::new(device::site_key(step_key, sites.0), p);
        let b = device::DropSite::new(device::site_key(step_key, sites.1), p);
        let cfg = device::elementwise(n as usize);
        device::launch!(st.stream, &st.k.drop_count, cfg, "drop_count"; a, b, n, kept.ptr)?;
        let v = kept.read(&st.stream, 4)?;
        Ok([v[0], v[1], v[2], v[3]])
    })
}
