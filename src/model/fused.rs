//! Fused CPU kernels, with their backward passes, for the blocks of BERT that dominate a
//! training step besides the matrix products: Linear, LayerNorm, the exact-erf GELU, the
//! attention probabilities (scale, mask, softmax, dropout) and the embeddings. Written from plain
//! tensor ops, each is several candle graph nodes, and candle's backward gives every node a
//! zero-filled buffer and an add; fused, each is one node and one multi-threaded pass each way.
//!
//! Every kernel accumulates in f64 and stores in the tensor's dtype (f32 or f64; `exp`/`erf` at
//! that dtype's precision), so the f64 model still matches HF's float64 references to ~1e-12.
//! On other devices or dtypes the callers in [`crate::model::layers`] use the composed ops.

use candle_core::{
    backend::BackendStorage, CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape,
    Tensor, WithDType,
};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

type CResult<T> = candle_core::Result<T>;

thread_local! {
    static DISABLED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True when the fused kernels can run on `t` (CPU, f32 or f64) and are not switched off on
/// this thread by [`with_composed_ops`].
pub fn supported(t: &Tensor) -> bool {
    enabled() && t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)
}

/// True unless the fused kernels are switched off on this thread by [`with_composed_ops`].
pub fn enabled() -> bool {
    !DISABLED.with(|d| d.get())
}

/// Runs `f` with the fused kernels switched off on this thread, so the model uses the composed
/// tensor ops it uses on other devices (to check that path on the CPU).
///
/// ```
/// use mfac_lab::prelude::*;
/// let m = BertClassifier::random(&BertConfig::bert_tiny(), 3, 0, &Device::Cpu, DType::F64)?;
/// let ids = Tensor::new(&[[101u32, 7592, 102]], &Device::Cpu)?;
/// let (types, mask) = (ids.zeros_like()?, ids.ones_like()?);
/// let fused = m.encode(&ids, &types, &mask)?;
/// let composed = mfac_lab::model::fused::with_composed_ops(|| m.encode(&ids, &types, &mask))?;
/// let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f64>()?;
/// assert!(diff < 1e-12);
/// # Ok::<(), mfac_lab::Error>(())
/// ```
pub fn with_composed_ops<R>(f: impl FnOnce() -> R) -> R {
    let before = DISABLED.with(|d| d.replace(true));
    let r = f();
    DISABLED.with(|d| d.set(before));
    r
}

fn slice<'a, T: WithDType>(v: &'a [T], l: &Layout, op: &'static str) -> CResult<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => Err(candle_core::Error::RequiresContiguous { op }),
    }
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// Rows per rayon task: enough work per task to amortise scheduling.
fn rows_per_task(cols: usize) -> usize {
    (8192 / cols.max(1)).max(1)
}

/// Applies `f` to each storage of a single-input op, generic over f32/f64.
macro_rules! dispatch {
    ($s:expr, $op:expr, |$v:ident| $body:expr) => {
        match $s {
            CpuStorage::F32($v) => $body,
            CpuStorage::F64($v) => $body,
            other => Err(candle_core::Error::UnsupportedDTypeForOp(
                other.dtype(),
                $op,
            )),
        }
    };
}

/// Matches three storages of one float dtype (f32 or f64), binds their contiguous slices to
/// `$a, $b, $c` and wraps `$body` (a `Vec` of that dtype) back into a storage.
macro_rules! same_dtype3 {
    ($op:expr, ($s1:expr, $l1:expr), ($s2:expr, $l2:expr), ($s3:expr, $l3:expr), |$a:ident, $b:ident, $c:ident| $body:expr) => {
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(z)) => {
                let ($a, $b, $c) = (
                    slice(x, $l1, $op)?,
                    slice(y, $l2, $op)?,
                    slice(z, $l3, $op)?,
                );
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(x), CpuStorage::F64(y), CpuStorage::F64(z)) => {
                let ($a, $b, $c) = (
                    slice(x, $l1, $op)?,
                    slice(y, $l2, $op)?,
                    slice(z, $l3, $op)?,
                );
                CpuStorage::F64($body)
            }
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp($s1.dtype(), $op)),
        }
    };
}

// ---------------------------------------------------------------- LayerNorm

/// `y = (x − mean) / sqrt(var + eps) · w + b` over the last axis (biased variance).
#[derive(Debug, Clone, Copy)]
pub struct LayerNormOp {
    /// Added to the variance.
    pub eps: f64,
}

fn ln_stats<T: WithDType>(row: &[T], eps: f64) -> (f64, f64) {
    let n = row.len() as f64;
    let mean = row.iter().map(|v| v.to_f64()).sum::<f64>() / n;
    let var = row
        .iter()
        .map(|v| {
            let d = v.to_f64() - mean;
            d * d
        })
        .sum::<f64>()
        / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn ln_fwd<T: WithDType>(x: &[T], w: &[T], b: &[T], h: usize, eps: f64) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    let chunk = rows_per_task(h) * h;
    y.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(h).zip(xc.chunks(h)) {
                let (mean, inv) = ln_stats(xr, eps);
                for i in 0..h {
                    let xh = (xr[i].to_f64() - mean) * inv;
                    yr[i] = T::from_f64(xh * w[i].to_f64() + b[i].to_f64());
                }
            }
        });
    y
}

/// The gradients of LayerNorm: `[dx (N·H) | dw (H) | db (H)]` in one buffer.
fn ln_bwd<T: WithDType>(x: &[T], w: &[T], g: &[T], h: usize, eps: f64) -> Vec<T> {
    let rows = x.len() / h;
    let mut out = vec![T::zero(); x.len() + 2 * h];
    let (dx, _) = out.split_at_mut(x.len());
    let chunk = rows_per_task(h);
    // dx per row; dw, db as per-task partial sums, added up afterwards.
    let partials: Vec<(Vec<f64>, Vec<f64>)> = dx
        .par_chunks_mut(chunk * h)
        .enumerate()
        .map(|(t, dxc)| {
            let (mut dw, mut db) = (vec![0f64; h], vec![0f64; h]);
            let mut xh = vec![0f64; h];
            let mut gw = vec![0f64; h];
            for (r, dxr) in dxc.chunks_mut(h).enumerate() {
                let row = t * chunk + r;
                let xr = &x[row * h..(row + 1) * h];
                let gr = &g[row * h..(row + 1) * h];
                let (mean, inv) = ln_stats(xr, eps);
                let (mut s_gw, mut s_gwxh) = (0.0, 0.0);
                for i in 0..h {
                    xh[i] = (xr[i].to_f64() - mean) * inv;
                    let gi = gr[i].to_f64();
                    gw[i] = gi * w[i].to_f64();
                    s_gw += gw[i];
                    s_gwxh += gw[i] * xh[i];
                    dw[i] += gi * xh[i];
                    db[i] += gi;
                }
                let (m_gw, m_gwxh) = (s_gw / h as f64, s_gwxh / h as f64);
                for i in 0..h {
                    dxr[i] = T::from_f64(inv * (gw[i] - m_gw - xh[i] * m_gwxh));
                }
            }
            (dw, db)
        })
        .collect();
    debug_assert_eq!(rows.div_ceil(chunk), partials.len());
    let tail = &mut out[x.len()..];
    for i in 0..h {
        let (mut sw, mut sb) = (0.0, 0.0);
        for (dw, db) in &partials {
            sw += dw[i];
            sb += db[i];
        }
        tail[i] = T::from_f64(sw);
        tail[h + i] = T::from_f64(sb);
    }
    out
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let h = last_dim(l1);
        let out = same_dtype3!(
            "layer-norm",
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, b| ln_fwd(x, w, b, h, self.eps)
        );
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = x.dim(candle_core::D::Minus1)?;
        let n = x.elem_count();
        let all = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LayerNormBwd { eps: self.eps })?;
        let dx = all.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = all.narrow(0, n, h)?;
        let db = all.narrow(0, n + h, h)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

struct LayerNormBwd {
    eps: f64,
}

impl CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let h = last_dim(l1);
        let n = l1.shape().elem_count();
        let out = same_dtype3!("layer-norm-bwd", (s1, l1), (s2, l2), (s3, l3), |x, w, g| {
            ln_bwd(x, w, g, h, self.eps)
        });
        Ok((out, Shape::from(n + 2 * h)))
    }
}

// ---------------------------------------------------------------- GELU

/// `exp` and `erf` at the storage's own precision: f32 data get the f32 functions (several
/// times faster, and exact to f32 rounding), f64 data the f64 ones (the parity tests' 1e-10).
pub trait NativeMath: WithDType {
    /// `exp(x)` computed in this type.
    fn exp_n(x: f64) -> f64;
    /// `erf(x)` computed in this type.
    fn erf_n(x: f64) -> f64;
}

impl NativeMath for f32 {
    fn exp_n(x: f64) -> f64 {
        (x as f32).exp() as f64
    }
    fn erf_n(x: f64) -> f64 {
        libm::erff(x as f32) as f64
    }
}

impl NativeMath for f64 {
    fn exp_n(x: f64) -> f64 {
        x.exp()
    }
    fn erf_n(x: f64) -> f64 {
        libm::erf(x)
    }
}

/// `Φ(x) = ½ (1 + erf(x / √2))`, with `erf` at `T`'s precision.
#[inline]
pub(crate) fn normal_cdf<T: NativeMath>(x: f64) -> f64 {
    0.5 * (1.0 + T::erf_n(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// The GELU's derivative `Φ(x) + x · φ(x)`, given `phi = Φ(x)`.
#[inline]
pub(crate) fn gelu_slope<T: NativeMath>(x: f64, phi: f64) -> f64 {
    const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
    phi + x * (INV_SQRT_2PI * T::exp_n(-0.5 * x * x))
}

/// `p = softmax(s · scale + mask)` of one row, in f64 (`exp` at `T`'s precision).
pub(crate) fn softmax_f64<T: NativeMath>(s: &[T], mask: &[T], scale: f64, p: &mut [f64]) {
    let mut max = f64::NEG_INFINITY;
    for ((pj, sj), mj) in p.iter_mut().zip(s).zip(mask) {
        *pj = sj.to_f64() * scale + mj.to_f64();
        max = max.max(*pj);
    }
    let mut sum = 0.0;
    for pj in p.iter_mut() {
        *pj = T::exp_n(*pj - max);
        sum += *pj;
    }
    let inv = 1.0 / sum;
    for pj in p.iter_mut() {
        *pj *= inv;
    }
}

/// The exact GELU, `x · Φ(x) = 0.5 · x · (1 + erf(x / √2))`. The forward keeps Φ(x) for the
/// backward, which then needs no second `erf`.
#[derive(Debug, Default)]
pub struct GeluErfOp {
    cdf: Mutex<Option<Arc<CpuStorage>>>,
}

const PAR_CHUNK: usize = 16384;

fn gelu_fwd<T: NativeMath>(x: &[T]) -> (Vec<T>, Vec<T>) {
    let mut y = vec![T::zero(); x.len()];
    let mut cdf = vec![T::zero(); x.len()];
    y.par_chunks_mut(PAR_CHUNK)
        .zip(cdf.par_chunks_mut(PAR_CHUNK))
        .zip(x.par_chunks(PAR_CHUNK))
        .for_each(|((yc, cc), xc)| {
            for ((yi, ci), xi) in yc.iter_mut().zip(cc.iter_mut()).zip(xc) {
                let v = xi.to_f64();
                let phi = normal_cdf::<T>(v);
                *ci = T::from_f64(phi);
                *yi = T::from_f64(v * phi);
            }
        });
    (y, cdf)
}

impl CustomOp1 for GeluErfOp {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let (y, cdf) = match s {
            CpuStorage::F32(v) => {
                let (y, c) = gelu_fwd(slice(v, l, "gelu-erf")?);
                (CpuStorage::F32(y), CpuStorage::F32(c))
            }
            CpuStorage::F64(v) => {
                let (y, c) = gelu_fwd(slice(v, l, "gelu-erf")?);
                (CpuStorage::F64(y), CpuStorage::F64(c))
            }
            other => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    other.dtype(),
                    "gelu-erf",
                ))
            }
        };
        if let Ok(mut saved) = self.cdf.lock() {
            *saved = Some(Arc::new(cdf));
        }
        Ok((y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let cdf = self.cdf.lock().ok().and_then(|c| c.clone());
        Ok(Some(x.contiguous()?.apply_op2_no_bwd(
            &grad.contiguous()?,
            &GeluErfBwd { cdf },
        )?))
    }
}

/// `dx = g · (Φ(x) + x · φ(x))`, with Φ from the forward when kept.
struct GeluErfBwd {
    cdf: Option<Arc<CpuStorage>>,
}

fn gelu_bwd<T: NativeMath>(x: &[T], g: &[T], cdf: Option<&[T]>) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(PAR_CHUNK)
        .enumerate()
        .for_each(|(k, dc)| {
            let a = k * PAR_CHUNK;
            for (i, di) in dc.iter_mut().enumerate() {
                let v = x[a + i].to_f64();
                let phi = match cdf {
                    Some(c) => c[a + i].to_f64(),
                    None => normal_cdf::<T>(v),
                };
                *di = T::from_f64(g[a + i].to_f64() * gelu_slope::<T>(v, phi));
            }
        });
    dx
}

impl CustomOp2 for GeluErfBwd {
    fn name(&self) -> &'static str {
        "gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let op = "gelu-erf-bwd";
        let n = l1.shape().elem_count();
        let out = match (s1, s2, self.cdf.as_deref()) {
            (CpuStorage::F32(x), CpuStorage::F32(g), c) => {
                let c = match c {
                    Some(CpuStorage::F32(c)) if c.len() == n => Some(c.as_slice()),
                    _ => None,
                };
                CpuStorage::F32(gelu_bwd(slice(x, l1, op)?, slice(g, l2, op)?, c))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), c) => {
                let c = match c {
                    Some(CpuStorage::F64(c)) if c.len() == n => Some(c.as_slice()),
                    _ => None,
                };
                CpuStorage::F64(gelu_bwd(slice(x, l1, op)?, slice(g, l2, op)?, c))
            }
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(s1.dtype(), op)),
        };
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------- Linear

/// `y = x Wᵀ + b` for `x` `[..., in]`, `W` `[out, in]`, `b` `[out]`, as one graph node: the
/// composed form (reshape, transpose, matmul, broadcast, add, reshape) costs a zero-fill and an
/// add over the activations per node in candle's backward.
///
/// For attention it can also take its input as heads (`[B, nh, T, d]`, merged into rows) and
/// give its output as heads (`[B, nh, T, d]`, or `[B, nh, d, T]` for the keys), so the head
/// split and merge cost no graph nodes either.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinearOp {
    /// The input is `[B, nh, T, d]` (the attention context), read as `[B·T, nh·d]` rows.
    pub heads_in: bool,
    /// `Some((nh, false))`: output `[B, nh, T, d]`; `Some((nh, true))`: `[B, nh, d, T]`.
    pub heads_out: Option<(usize, bool)>,
}

fn add_bias<T: WithDType>(y: &mut [T], b: &[T]) {
    let out = b.len();
    y.par_chunks_mut(rows_per_task(out) * out).for_each(|c| {
        for row in c.chunks_mut(out) {
            for (yi, bi) in row.iter_mut().zip(b) {
                *yi += *bi;
            }
        }
    });
}

/// `[B, nh, T, d]` → rows `[B·T, nh·d]`.
fn heads_to_rows<T: WithDType>(x: &[T], b: usize, nh: usize, t: usize, d: usize) -> Vec<T> {
    debug_assert_eq!(x.len(), b * nh * t * d);
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(t * nh * d)
        .enumerate()
        .for_each(|(bi, ob)| {
            for h in 0..nh {
                for ti in 0..t {
                    let src = &x[((bi * nh + h) * t + ti) * d..][..d];
                    ob[ti * nh * d + h * d..][..d].copy_from_slice(src);
                }
            }
        });
    out
}

/// Rows `[B·T, nh·d]` → `[B, nh, T, d]`, or `[B, nh, d, T]` when `transposed`.
fn rows_to_heads<T: WithDType>(
    y: &[T],
    b: usize,
    t: usize,
    nh: usize,
    d: usize,
    transposed: bool,
) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    out.par_chunks_mut(nh * t * d)
        .enumerate()
        .for_each(|(bi, ob)| {
            for ti in 0..t {
                let row = &y[(bi * t + ti) * nh * d..][..nh * d];
                for h in 0..nh {
                    for j in 0..d {
                        let dst = if transposed {
                            (h * d + j) * t + ti
                        } else {
                            (h * t + ti) * d + j
                        };
                        ob[dst] = row[h * d + j];
                    }
                }
            }
        });
    debug_assert_eq!(out.len(), b * t * nh * d);
    out
}

impl LinearOp {
    /// (B, T) of the input.
    fn batch_time(&self, dims: &[usize]) -> CResult<(usize, usize)> {
        match (self.heads_in, dims) {
            (true, [b, _, t, _]) => Ok((*b, *t)),
            (false, [b, t, _]) => Ok((*b, *t)),
            (false, _) if self.heads_out.is_none() => Ok((1, 1)),
            _ => candle_core::bail!("linear: unexpected input shape {dims:?} for a heads layout"),
        }
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let Some((wa, _)) = l2.contiguous_offsets() else {
            return Err(candle_core::Error::RequiresContiguous { op: "linear" });
        };
        let dims = l1.dims();
        let k = if self.heads_in {
            dims.get(1).copied().unwrap_or(1) * dims.get(3).copied().unwrap_or(1)
        } else {
            last_dim(l1)
        };
        let n = l1.shape().elem_count() / k.max(1);
        let (out, wk) = l2.shape().dims2()?;
        if wk != k {
            candle_core::bail!("linear: input has {k} features, the weight expects {wk}");
        }
        if let Some((nh, _)) = self.heads_out {
            if nh == 0 || out % nh != 0 {
                candle_core::bail!("linear: {out} outputs do not split into {nh} heads");
            }
        }
        let lwt = Layout::contiguous_with_offset((out, k), wa).transpose(0, 1)?;
        let (b, t) = self.batch_time(dims)?;
        let op = "linear";
        // Rows of the input: the storage itself, or the heads merged into a new buffer.
        let merged;
        let (xs, lx) = if self.heads_in {
            let (nh, d) = (dims[1], dims[3]);
            merged = match s1 {
                CpuStorage::F32(x) => {
                    CpuStorage::F32(heads_to_rows(slice(x, l1, op)?, b, nh, t, d))
                }
                CpuStorage::F64(x) => {
                    CpuStorage::F64(heads_to_rows(slice(x, l1, op)?, b, nh, t, d))
                }
                _ => return Err(candle_core::Error::UnsupportedDTypeForOp(s1.dtype(), op)),
            };
            (&merged, Layout::contiguous((n, k)))
        } else {
            let Some((xa, _)) = l1.contiguous_offsets() else {
                return Err(candle_core::Error::RequiresContiguous { op });
            };
            (s1, Layout::contiguous_with_offset((n, k), xa))
        };
        let mut y = xs.matmul(s2, (1, n, out, k), &lx, &lwt)?;
        let heads = |y: &mut CpuStorage| -> CResult<()> {
            if let Some((nh, tr)) = self.heads_out {
                *y = match &*y {
                    CpuStorage::F32(v) => CpuStorage::F32(rows_to_heads(v, b, t, nh, out / nh, tr)),
                    CpuStorage::F64(v) => CpuStorage::F64(rows_to_heads(v, b, t, nh, out / nh, tr)),
                    _ => return Err(candle_core::Error::UnsupportedDTypeForOp(s1.dtype(), op)),
                };
            }
            Ok(())
        };
        match (&mut y, s3) {
            (CpuStorage::F32(y), CpuStorage::F32(bias)) => add_bias(y, slice(bias, l3, op)?),
            (CpuStorage::F64(y), CpuStorage::F64(bias)) => add_bias(y, slice(bias, l3, op)?),
            _ => return Err(candle_core::Error::UnsupportedDTypeForOp(s1.dtype(), op)),
        }
        heads(&mut y)?;
        let out_dims: Vec<usize> = match self.heads_out {
            Some((nh, false)) => vec![b, nh, t, out / nh],
            Some((nh, true)) => vec![b, nh, out / nh, t],
            None if self.heads_in => vec![b, t, out],
            None => {
                let mut d = dims.to_vec();
                if let Some(last) = d.last_mut() {
                    *last = out;
                }
                d
            }
        };
        Ok((y, Shape::from(out_dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, k) = w.dims2()?;
        let n = x.elem_count() / k;
        let g = match self.heads_out {
            Some((_, false)) => grad.transpose(1, 2)?.contiguous()?.reshape((n, out))?,
            Some((_, true)) => grad
                .permute((0, 3, 1, 2))?
                .contiguous()?
                .reshape((n, out))?,
            None => grad.contiguous()?.reshape((n, out))?,
        };
        let x2 = if self.heads_in {
            x.transpose(1, 2)?.contiguous()?.reshape((n, k))?
        } else {
            x.reshape((n, k))?
        };
        let dx = g.matmul(w)?;
        let dx = if self.heads_in {
            let (b, nh, t, d) = x.dims4()?;
            dx.reshape((b, t, nh, d))?.transpose(1, 2)?.contiguous()?
        } else {
            dx.reshape(x.shape())?
        };
        let dw = g.t()?.matmul(&x2)?;
        let db = g.apply_op1_no_bwd(&ColSum)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

// ---------------------------------------------------------------- attention probabilities

/// `dropout(softmax(scores · scale + mask))` for scores `[B, heads, Tq, Tk]` and an additive mask
/// `[B, 1, 1, Tk]`, as one graph node (the composed form is five). The dropout mask (already
/// scaled by `1/(1-p)`) has the scores' shape. Gradient only for the scores.
#[derive(Debug, Clone)]
pub struct AttnProbsOp {
    /// Multiplies the scores before the mask is added.
    pub scale: f64,
    /// Inverted-dropout multipliers, contiguous, same shape and dtype as the scores.
    pub dropout: Option<Tensor>,
}

fn attn_probs<T: NativeMath>(
    s: &[T],
    mask: &[T],
    drop: Option<&[T]>,
    scale: f64,
    tk: usize,
    bwd_grad: Option<&[T]>,
) -> Vec<T> {
    let batches = mask.len() / tk;
    let rows_per_batch = s.len() / tk / batches.max(1);
    let mut out = vec![T::zero(); s.len()];
    let chunk = rows_per_task(tk);
    out.par_chunks_mut(chunk * tk)
        .enumerate()
        .for_each(|(t, oc)| {
            let mut p = vec![0f64; tk];
            for (r, orow) in oc.chunks_mut(tk).enumerate() {
                let row = t * chunk + r;
                let (a, b) = (row * tk, (row + 1) * tk);
                let m = &mask[(row / rows_per_batch) * tk..][..tk];
                softmax_f64(&s[a..b], m, scale, &mut p);
                let d = drop.map(|d| &d[a..b]);
                match bwd_grad {
                    None => {
                        for j in 0..tk {
                            let keep = d.map_or(1.0, |d| d[j].to_f64());
                            orow[j] = T::from_f64(p[j] * keep);
                        }
                    }
                    Some(g) => {
                        // g' = g · dropout; ds = scale · p · (g' − Σ g'·p).
                        let g = &g[a..b];
                        let mut dot = 0.0;
                        for j in 0..tk {
                            let gj = g[j].to_f64() * d.map_or(1.0, |d| d[j].to_f64());
                            dot += gj * p[j];
                        }
                        for j in 0..tk {
                            let gj = g[j].to_f64() * d.map_or(1.0, |d| d[j].to_f64());
                            orow[j] = T::from_f64(scale * p[j] * (gj - dot));
                        }
                    }
                }
            }
        });
    out
}

impl AttnProbsOp {
    fn run(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        grad: Option<(&CpuStorage, &Layout)>,
    ) -> CResult<(CpuStorage, Shape)> {
        let tk = last_dim(l1);
        let drop = self.dropout.as_ref().map(|d| d.storage_and_layout());
        macro_rules! go {
            ($variant:ident) => {{
                let (CpuStorage::$variant(s), CpuStorage::$variant(m)) = (s1, s2) else {
                    return Err(candle_core::Error::UnsupportedDTypeForOp(
                        s1.dtype(),
                        "attn-probs",
                    ));
                };
                let d = match &drop {
                    Some((st, l)) => match &**st {
                        candle_core::Storage::Cpu(CpuStorage::$variant(v)) => {
                            Some(slice(v, l, "attn-probs")?)
                        }
                        _ => candle_core::bail!(
                            "attn-probs: dropout mask of another dtype or device"
                        ),
                    },
                    None => None,
                };
                let g = match grad {
                    Some((CpuStorage::$variant(g), gl)) => Some(slice(g, gl, "attn-probs")?),
                    Some(_) => candle_core::bail!("attn-probs: gradient of another dtype"),
                    None => None,
                };
                CpuStorage::$variant(attn_probs(
                    slice(s, l1, "attn-probs")?,
                    slice(m, l2, "attn-probs")?,
                    d,
                    self.scale,
                    tk,
                    g,
                ))
            }};
        }
        let out = match s1 {
            CpuStorage::F32(_) => go!(F32),
            CpuStorage::F64(_) => go!(F64),
            _ => {
                return Err(candle_core::Error::UnsupportedDTypeForOp(
                    s1.dtype(),
                    "attn-probs",
                ))
            }
        };
        Ok((out, l1.shape().clone()))
    }
}

impl CustomOp2 for AttnProbsOp {
    fn name(&self) -> &'static str {
        "attn-probs"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        self.run(s1, l1, s2, l2, None)
    }

    fn bwd(
        &self,
        scores: &Tensor,
        mask: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>)> {
        let ds = scores.apply_op3_no_bwd(mask, &grad.contiguous()?, &AttnProbsBwd(self.clone()))?;
        Ok((Some(ds), None))
    }
}

struct AttnProbsBwd(AttnProbsOp);

impl CustomOp3 for AttnProbsBwd {
    fn name(&self) -> &'static str {
        "attn-probs-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        self.0.run(s1, l1, s2, l2, Some((s3, l3)))
    }
}

/// The bias gradient as a graph op: [`col_sum`] of a contiguous `[n, c]` matrix.
struct ColSum;

/// Column sums of a contiguous row-major `[n, c]` matrix, accumulated in f64 over row blocks
/// in parallel (also the CPU training pass's bias gradients).
pub(crate) fn col_sum<T: WithDType>(g: &[T], c: usize) -> Vec<T> {
    let partial: Vec<Vec<f64>> = g
        .par_chunks(rows_per_task(c) * c * 4)
        .map(|block| {
            let mut acc = vec![0f64; c];
            for row in block.chunks(c) {
                for (a, v) in acc.iter_mut().zip(row) {
                    *a += v.to_f64();
                }
            }
            acc
        })
        .collect();
    (0..c)
        .map(|j| T::from_f64(partial.iter().map(|p| p[j]).sum()))
        .collect()
}

impl CustomOp1 for ColSum {
    fn name(&self) -> &'static str {
        "col-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let c = last_dim(l);
        let out = dispatch!(s, "col-sum", |v| Ok(WithDType::to_cpu_storage_owned(
            col_sum(slice(v, l, "col-sum")?, c)
        )))?;
        Ok((out, Shape::from(c)))
    }
}

// ---------------------------------------------------------------- embeddings

/// `word[ids] + position[0..T] + token_type[type_ids]`, `[B, T, H]`, as one graph node whose
/// backward scatters into the three tables directly. Like `nn.Embedding(padding_idx)`, the
/// `pad` row of the word table gets no gradient.
#[derive(Debug, Clone)]
pub struct EmbeddingsOp {
    /// Token ids, row-major `[B, T]`.
    pub ids: Vec<u32>,
    /// Token-type ids, row-major `[B, T]`.
    pub type_ids: Vec<u32>,
    /// Sequence length `T`.
    pub seq_len: usize,
    /// The padding token id.
    pub pad: u32,
}

impl EmbeddingsOp {
    fn check(&self, vocab: usize, positions: usize, types: usize) -> CResult<()> {
        if self.seq_len > positions {
            candle_core::bail!(
                "sequence length {} exceeds max_position_embeddings {positions}",
                self.seq_len
            );
        }
        if let Some(&id) = self.ids.iter().find(|&&i| i as usize >= vocab) {
            candle_core::bail!("token id {id} is out of the vocabulary (size {vocab})");
        }
        if let Some(&id) = self.type_ids.iter().find(|&&i| i as usize >= types) {
            candle_core::bail!("token type id {id} is out of range (type_vocab_size {types})");
        }
        Ok(())
    }

    fn fwd<T: WithDType>(&self, w: &[T], p: &[T], ty: &[T], h: usize) -> Vec<T> {
        let mut out = vec![T::zero(); self.ids.len() * h];
        out.par_chunks_mut(h).enumerate().for_each(|(r, o)| {
            let (wi, pi, ti) = (
                self.ids[r] as usize,
                r % self.seq_len,
                self.type_ids[r] as usize,
            );
            let (wr, pr, tr) = (&w[wi * h..][..h], &p[pi * h..][..h], &ty[ti * h..][..h]);
            for i in 0..h {
                o[i] = T::from_f64(wr[i].to_f64() + pr[i].to_f64() + tr[i].to_f64());
            }
        });
        out
    }
}

impl CustomOp3 for EmbeddingsOp {
    fn name(&self) -> &'static str {
        "bert-embeddings"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (vocab, h) = l1.shape().dims2()?;
        self.check(vocab, l2.shape().dims2()?.0, l3.shape().dims2()?.0)?;
        let out = same_dtype3!(
            "bert-embeddings",
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |w, p, t| self.fwd(w, p, t, h)
        );
        let b = self.ids.len() / self.seq_len.max(1);
        Ok((out, Shape::from((b, self.seq_len, h))))
    }

    fn bwd(
        &self,
        word: &Tensor,
        pos: &Tensor,
        types: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad.contiguous()?;
        let scatter = |table: &Tensor, index: Vec<Option<u32>>| -> CResult<Tensor> {
            let rows = table.dim(0)?;
            g.apply_op1_no_bwd(&ScatterRows { rows, index })
        };
        let dw = scatter(
            word,
            self.ids
                .iter()
                .map(|&i| (i != self.pad).then_some(i))
                .collect(),
        )?;
        let dp = scatter(
            pos,
            (0..self.ids.len())
                .map(|r| Some((r % self.seq_len) as u32))
                .collect(),
        )?;
        let dt = scatter(types, self.type_ids.iter().map(|&i| Some(i)).collect())?;
        Ok((Some(dw), Some(dp), Some(dt)))
    }
}

/// `out[index[r]] += g[r]` for the rows `r` of `g` `[N, H]` (skipping `None`): the gradient of a
/// table lookup, written straight into a zeroed `[rows, H]` table.
struct ScatterRows {
    rows: usize,
    index: Vec<Option<u32>>,
}

impl ScatterRows {
    fn run<T: WithDType>(&self, g: &[T], h: usize) -> Vec<T> {
        let mut out = vec![T::zero(); self.rows * h];
        for (gr, i) in g.chunks(h).zip(&self.index) {
            if let Some(i) = *i {
                for (o, v) in out[i as usize * h..][..h].iter_mut().zip(gr) {
                    *o += *v;
                }
            }
        }
        out
    }
}

impl CustomOp1 for ScatterRows {
    fn name(&self) -> &'static str {
        "scatter-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let h = last_dim(l);
        let out = dispatch!(s, "scatter-rows", |v| Ok(WithDType::to_cpu_storage_owned(
            self.run(slice(v, l, "scatter-rows")?, h)
        )))?;
        Ok((out, Shape::from((self.rows, h))))
    }
}
