//! The training pass of [`BertClassifier`] written out by hand for the CPU: forward, loss and
//! every gradient, on plain buffers, without candle's autograd graph.
//!
//! Why: candle's backward gives every graph node a zero-filled gradient buffer and an add, and
//! allocates every intermediate afresh; at bert-tiny's size that bookkeeping costs more than the
//! arithmetic. Here each block is one pass each way: Q, K and V are one product, attention runs
//! per batch row with its head views read in place (no split/merge copies), dropout, residual and
//! LayerNorm are fused, and gradients of a product are accumulated into their destination.
//!
//! It computes exactly what the graph computes: the same dropout draws in the same order (from
//! the model's seeded stream), the same masking, the same loss (cross-entropy, or MSE for a
//! one-output model with float labels). `tests/native_pass.rs` checks it against HF's float64
//! gradients and against the graph path with dropout on. Other devices, dtypes, activations, or
//! a thread inside [`crate::model::fused::with_composed_ops`], use the graph.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::batch::Batch;
use crate::model::classifier::BertClassifier;
use crate::model::config::HiddenAct;
use crate::model::fastmath;
use crate::model::fused::{self, NativeMath};
use crate::model::layers::dtype_min;
use crate::rng::SeededRng;

/// True when [`loss_and_grads`] can run `model`: CPU, f32 or f64, exact GELU, fused kernels on.
pub(crate) fn supported(model: &BertClassifier) -> bool {
    model.device().is_cpu()
        && matches!(model.dtype(), DType::F32 | DType::F64)
        && model.config().activation() == HiddenAct::Gelu
        && fused::enabled()
}

/// The element types of the pass.
trait Real: NativeMath + Send + Sync + 'static {
    /// Buffers of this type kept between passes.
    fn pool() -> &'static Mutex<Vec<Vec<Self>>>;
    /// `g = f · Φ(f)` and `phi = Φ(f)` over a chunk.
    fn gelu_chunk(f: &[Self], g: &mut [Self], phi: &mut [Self]) {
        for ((gi, pi), fi) in g.iter_mut().zip(phi.iter_mut()).zip(f) {
            let v = fi.to_f64();
            let p = fused::normal_cdf::<Self>(v);
            *pi = Self::from_f64(p);
            *gi = Self::from_f64(v * p);
        }
    }
    /// `dg ← dg · (Φ(f) + f · φ(f))` over a chunk.
    fn gelu_bwd_chunk(dg: &mut [Self], f: &[Self], phi: &[Self]) {
        for ((d, fi), pi) in dg.iter_mut().zip(f).zip(phi) {
            let slope = fused::gelu_slope::<Self>(fi.to_f64(), pi.to_f64());
            *d = Self::from_f64(d.to_f64() * slope);
        }
    }
    /// The backward of one attention row: `g ← scale · p ∘ (g' − Σ g'·p)` with `g' = g ∘ mask`
    /// (the dropout multipliers `keep · mult`, when given).
    fn softmax_bwd_row(g: &mut [Self], p: &[Self], mask: Option<(&[u8], Self)>, scale: f64) {
        let t = g.len();
        let mut gm = vec![0f64; t];
        match mask {
            Some((keep, mult)) => {
                for ((o, &v), &k) in gm.iter_mut().zip(g.iter()).zip(keep) {
                    *o = v.to_f64() * (Self::from_f64(k as f64) * mult).to_f64();
                }
            }
            None => {
                for (o, &v) in gm.iter_mut().zip(g.iter()) {
                    *o = v.to_f64();
                }
            }
        }
        let dot = lane_sum(t, |j| gm[j] * p[j].to_f64());
        for ((o, &gj), &pj) in g.iter_mut().zip(&gm).zip(p) {
            *o = Self::from_f64(scale * pj.to_f64() * (gj - dot));
        }
    }
    /// `row ← softmax(row · scale + mask)` (one attention row), in f64 with `tmp` (row-sized).
    fn softmax_row(row: &mut [Self], mask: &[Self], scale: f64, tmp: &mut [f64]) {
        fused::softmax_f64(row, mask, scale, tmp);
        for (r, s) in row.iter_mut().zip(tmp.iter()) {
            *r = Self::from_f64(*s);
        }
    }
}

static POOL_F32: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
static POOL_F64: Mutex<Vec<Vec<f64>>> = Mutex::new(Vec::new());

/// f32 models use the vectorised loops of [`crate::model::fastmath`] (torch's f32 softmax, Φ
/// within 1.2e-7); f64 models the exact libm forms above (the 1e-10 parity with HF).
impl Real for f32 {
    fn pool() -> &'static Mutex<Vec<Vec<f32>>> {
        &POOL_F32
    }
    fn gelu_chunk(f: &[f32], g: &mut [f32], phi: &mut [f32]) {
        fastmath::gelu(f, g, phi)
    }
    fn gelu_bwd_chunk(dg: &mut [f32], f: &[f32], phi: &[f32]) {
        fastmath::gelu_bwd(dg, f, phi)
    }
    fn softmax_row(row: &mut [f32], mask: &[f32], scale: f64, _tmp: &mut [f64]) {
        fastmath::softmax_row(row, mask, scale as f32)
    }
    fn softmax_bwd_row(g: &mut [f32], p: &[f32], mask: Option<(&[u8], f32)>, scale: f64) {
        fastmath::softmax_bwd_row(g, p, mask, scale as f32)
    }
}
impl Real for f64 {
    fn pool() -> &'static Mutex<Vec<Vec<f64>>> {
        &POOL_F64
    }
}

/// Most buffers a pool keeps (a pass of a 2-layer model uses about 40).
const POOL_MAX: usize = 256;

/// An activation buffer that goes back to its pool when dropped, so the next pass reuses this
/// pass's memory. Fresh allocations of this size come from `mmap`, and each step would fault in
/// and zero every page again (measured: ~10 % of a bert-tiny step in the kernel).
struct Buf<T: Real>(Vec<T>);

impl<T: Real> Buf<T> {
    /// A buffer of `n` zeros.
    fn zeroed(n: usize) -> Self {
        let mut v = Self::take(n);
        v.clear();
        v.resize(n, T::zero());
        Buf(v)
    }

    /// A buffer of `n` initialised but arbitrary values, for outputs written in full.
    fn dirty(n: usize) -> Self {
        let mut v = Self::take(n);
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, T::zero());
        }
        Buf(v)
    }

    /// The smallest pooled vector that holds `n` values, or a new one.
    fn take(n: usize) -> Vec<T> {
        if let Ok(mut pool) = T::pool().lock() {
            let best = pool
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= n)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            if let Some(i) = best {
                return pool.swap_remove(i);
            }
        }
        Vec::with_capacity(n)
    }
}

impl<T: Real> std::ops::Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: Real> std::ops::DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}

impl<T: Real> Drop for Buf<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() > 0 {
            if let Ok(mut pool) = T::pool().lock() {
                if pool.len() < POOL_MAX {
                    pool.push(v);
                }
            }
        }
    }
}

/// Mean loss of `batch` and the gradient of every parameter. Dropout draws from `rng` when given.
pub(crate) fn loss_and_grads(
    model: &BertClassifier,
    batch: &Batch,
    rng: Option<&mut SeededRng>,
) -> Result<(f64, GradStore)> {
    match model.dtype() {
        DType::F32 => run::<f32>(model, batch, rng),
        DType::F64 => run::<f64>(model, batch, rng),
        d => Err(Error::InvalidArgument(format!(
            "the CPU training pass needs f32 or f64, not {d:?}"
        ))),
    }
}

// ---------------------------------------------------------------- products

/// A strided matrix inside a slice: element (i, j) is at `off + i·rs + j·cs`.
#[derive(Debug, Clone, Copy)]
struct View {
    off: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl View {
    /// Row-major `rows × cols` with row stride `rs`, starting at `off`.
    fn rows(off: usize, rows: usize, cols: usize, rs: usize) -> Self {
        View {
            off,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose (same memory).
    fn t(self) -> Self {
        View {
            off: self.off,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// One past the last element touched.
    fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            self.off
        } else {
            self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// `dst = a · b`, or `dst += a · b` with `acc`. Bounds are checked, so the unsafe call only sees
/// memory inside the slices.
#[allow(clippy::too_many_arguments)] // three (slice, view) pairs: the call sites read as `dst = a · b`
fn matmul<T: Real>(
    dst: &mut [T],
    dv: View,
    acc: bool,
    a: &[T],
    av: View,
    b: &[T],
    bv: View,
    par: Parallelism,
) {
    let (m, n, k) = (dv.rows, dv.cols, av.cols);
    assert!(
        av.rows == m && bv.rows == k && bv.cols == n,
        "matmul shapes"
    );
    assert!(dv.end() <= dst.len() && av.end() <= a.len() && bv.end() <= b.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                for j in 0..n {
                    dst[dv.off + i * dv.rs + j * dv.cs] = T::zero();
                }
            }
        }
        return;
    }
    // SAFETY: every index the product touches is inside its slice (checked above); `dst` is
    // borrowed mutably, so it does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(dv.off),
            dv.cs as isize,
            dv.rs as isize,
            acc,
            a.as_ptr().add(av.off),
            av.cs as isize,
            av.rs as isize,
            b.as_ptr().add(bv.off),
            bv.cs as isize,
            bv.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

const ALL: Parallelism = Parallelism::Rayon(0);

/// Rows per parallel task for rows of `cols` elements.
fn task_rows(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

/// `y[n, out] = x[n, in] · Wᵀ + b` (W `[out, in]`).
fn linear<T: Real>(x: &[T], w: &[T], b: &[T], n: usize, k: usize) -> Buf<T> {
    let out = b.len();
    let mut y = Buf::dirty(n * out);
    matmul(
        &mut y,
        View::rows(0, n, out, out),
        false,
        x,
        View::rows(0, n, k, k),
        w,
        View::rows(0, out, k, k).t(),
        ALL,
    );
    y.par_chunks_mut(task_rows(out) * out).for_each(|c| {
        for row in c.chunks_mut(out) {
            for (v, &bi) in row.iter_mut().zip(b) {
                *v += bi;
            }
        }
    });
    y
}

/// The gradients of [`linear`]: `(dW, db)`, and `dx` written (or added, with `acc`) into `dx`.
fn linear_bwd<T: Real>(
    x: &[T],
    w: &[T],
    dy: &[T],
    n: usize,
    k: usize,
    dx: Option<(&mut [T], bool)>,
) -> (Vec<T>, Vec<T>) {
    let out = w.len() / k;
    let mut dw = vec![T::zero(); out * k];
    matmul(
        &mut dw,
        View::rows(0, out, k, k),
        false,
        dy,
        View::rows(0, n, out, out).t(),
        x,
        View::rows(0, n, k, k),
        ALL,
    );
    if let Some((dx, acc)) = dx {
        matmul(
            dx,
            View::rows(0, n, k, k),
            acc,
            dy,
            View::rows(0, n, out, out),
            w,
            View::rows(0, out, k, k),
            ALL,
        );
    }
    (dw, fused::col_sum(dy, out))
}

// ---------------------------------------------------------------- dropout, residual, LayerNorm

/// A dropout site: keep flags and the `1/(1-p)` multiplier, or nothing (identity).
struct Mask<T> {
    keep: Vec<u8>,
    mult: T,
}

fn draw<T: Real>(rng: &mut Option<&mut SeededRng>, n: usize, p: f64) -> Option<Mask<T>> {
    match rng {
        Some(r) if p > 0.0 => Some(Mask {
            keep: r.keep_flags(n, p),
            // The graph's mask is `keep · (1/(1-p))` in the model's dtype.
            mult: T::from_f64(1.0 / (1.0 - p)),
        }),
        _ => None,
    }
}

/// Sum of `f(i)` over `0..n` in f64, in 8 lanes ([`fastmath::lanes`]).
#[inline(always)]
fn lane_sum(n: usize, f: impl Fn(usize) -> f64) -> f64 {
    fastmath::lanes(n, 0.0, f, |a, b| a + b)
}

/// The mask multipliers of one row as values of `T` (`keep · 1/(1-p)`), into `out`.
#[inline(always)]
fn row_mask<T: Real>(d: &Mask<T>, base: usize, out: &mut [T]) {
    let n = out.len();
    for (o, &k) in out.iter_mut().zip(&d.keep[base..base + n]) {
        *o = T::from_f64(k as f64) * d.mult;
    }
}

/// `x · mask` as the graph computes it (the mask value rounded to `T` first).
#[inline]
fn dropped<T: Real>(x: T, d: &Option<Mask<T>>, i: usize) -> T {
    match d {
        Some(d) => x * (T::from_f64(d.keep[i] as f64) * d.mult),
        None => x,
    }
}

/// What the backward of a LayerNorm needs: the normalised input and `1/σ` per row.
struct NormSaved<T: Real> {
    xhat: Buf<T>,
    inv: Vec<f64>,
}

/// `y = LN(drop(a) + res)` over rows of `h`, then (for the embeddings) `drop_out(y)`.
#[allow(clippy::too_many_arguments)]
fn add_norm<T: Real>(
    a: &[T],
    drop: &Option<Mask<T>>,
    res: Option<&[T]>,
    w: &[T],
    b: &[T],
    eps: f64,
    drop_out: &Option<Mask<T>>,
    h: usize,
) -> (Buf<T>, NormSaved<T>) {
    let n = a.len();
    let mut y = Buf::dirty(n);
    let mut xhat = Buf::dirty(n);
    let mut inv = vec![0f64; n / h];
    let rows = task_rows(h);
    y.par_chunks_mut(rows * h)
        .zip(xhat.par_chunks_mut(rows * h))
        .zip(inv.par_chunks_mut(rows))
        .enumerate()
        .for_each(|(c, ((yc, xc), ic))| {
            let mut r = vec![0f64; h];
            let mut m = vec![T::zero(); h];
            for (k, inv_k) in ic.iter_mut().enumerate() {
                let base = (c * rows + k) * h;
                let ar = &a[base..base + h];
                match drop {
                    Some(d) => {
                        row_mask(d, base, &mut m);
                        for ((ri, &ai), &mi) in r.iter_mut().zip(ar).zip(&m) {
                            *ri = (ai * mi).to_f64();
                        }
                    }
                    None => {
                        for (ri, &ai) in r.iter_mut().zip(ar) {
                            *ri = ai.to_f64();
                        }
                    }
                }
                if let Some(res) = res {
                    // In T, as the graph adds the two tensors.
                    for ((ri, &ai), &si) in r.iter_mut().zip(ar).zip(&res[base..base + h]) {
                        let v = match drop {
                            Some(_) => T::from_f64(*ri),
                            None => ai,
                        };
                        *ri = (v + si).to_f64();
                    }
                }
                let mean = lane_sum(h, |i| r[i]) / h as f64;
                let var = lane_sum(h, |i| (r[i] - mean) * (r[i] - mean)) / h as f64;
                let s = 1.0 / (var + eps).sqrt();
                *inv_k = s;
                let (xo, yo) = (&mut xc[k * h..(k + 1) * h], &mut yc[k * h..(k + 1) * h]);
                for ((((xo, yo), &ri), &wi), &bi) in
                    xo.iter_mut().zip(yo.iter_mut()).zip(&r).zip(w).zip(b)
                {
                    let xh = (ri - mean) * s;
                    *xo = T::from_f64(xh);
                    *yo = T::from_f64(xh * wi.to_f64() + bi.to_f64());
                }
                if let Some(d) = drop_out {
                    row_mask(d, base, &mut m);
                    for (yo, &mi) in yo.iter_mut().zip(&m) {
                        *yo *= mi;
                    }
                }
            }
        });
    (y, NormSaved { xhat, inv })
}

/// Backward of [`add_norm`] for the gradient `dy` of its output (before `drop_out`, applied
/// here): returns `dr` (the gradient of `drop(a) + res`, which is `res`'s), `da` (`a`'s, when
/// `drop` is active; else it equals `dr`), and `(dw, db)`.
fn add_norm_bwd<T: Real>(
    dy: &[T],
    saved: &NormSaved<T>,
    w: &[T],
    drop: &Option<Mask<T>>,
    drop_out: &Option<Mask<T>>,
    h: usize,
) -> (Buf<T>, Option<Buf<T>>, Vec<T>, Vec<T>) {
    let n = dy.len();
    let mut dr = Buf::dirty(n);
    let mut da = drop.as_ref().map(|_| Buf::dirty(n));
    let rows = task_rows(h);
    let xhat = &saved.xhat;
    let body = |c: usize, drc: &mut [T], mut dac: Option<&mut [T]>| -> (Vec<f64>, Vec<f64>) {
        let (mut dw, mut db) = (vec![0f64; h], vec![0f64; h]);
        let (mut g, mut gw, mut xh) = (vec![0f64; h], vec![0f64; h], vec![0f64; h]);
        let mut m = vec![T::zero(); h];
        for k in 0..drc.len() / h {
            let row = c * rows + k;
            let base = row * h;
            let dyr = &dy[base..base + h];
            match drop_out {
                Some(d) => {
                    row_mask(d, base, &mut m);
                    for ((gi, &v), &mi) in g.iter_mut().zip(dyr).zip(&m) {
                        *gi = (v * mi).to_f64();
                    }
                }
                None => {
                    for (gi, &v) in g.iter_mut().zip(dyr) {
                        *gi = v.to_f64();
                    }
                }
            }
            for (x, &v) in xh.iter_mut().zip(&xhat[base..base + h]) {
                *x = v.to_f64();
            }
            for i in 0..h {
                gw[i] = g[i] * w[i].to_f64();
                dw[i] += g[i] * xh[i];
                db[i] += g[i];
            }
            let m1 = lane_sum(h, |i| gw[i]) / h as f64;
            let m2 = lane_sum(h, |i| gw[i] * xh[i]) / h as f64;
            let inv = saved.inv[row];
            let dro = &mut drc[k * h..(k + 1) * h];
            for ((o, &gwi), &x) in dro.iter_mut().zip(&gw).zip(&xh) {
                *o = T::from_f64(inv * (gwi - m1 - x * m2));
            }
            if let (Some(dac), Some(d)) = (dac.as_deref_mut(), drop) {
                row_mask(d, base, &mut m);
                for ((o, &v), &mi) in dac[k * h..(k + 1) * h].iter_mut().zip(dro.iter()).zip(&m) {
                    *o = v * mi;
                }
            }
        }
        (dw, db)
    };
    let parts: Vec<(Vec<f64>, Vec<f64>)> = match da.as_mut() {
        Some(da) => dr
            .par_chunks_mut(rows * h)
            .zip(da.par_chunks_mut(rows * h))
            .enumerate()
            .map(|(c, (drc, dac))| body(c, drc, Some(dac)))
            .collect(),
        None => dr
            .par_chunks_mut(rows * h)
            .enumerate()
            .map(|(c, drc)| body(c, drc, None))
            .collect(),
    };
    let dw = (0..h)
        .map(|i| T::from_f64(parts.iter().map(|p| p.0[i]).sum()))
        .collect();
    let db = (0..h)
        .map(|i| T::from_f64(parts.iter().map(|p| p.1[i]).sum()))
        .collect();
    (dr, da, dw, db)
}

// ---------------------------------------------------------------- GELU

const CHUNK: usize = 16384;

/// `g = f · Φ(f)`, keeping Φ for the backward.
fn gelu<T: Real>(f: &[T]) -> (Buf<T>, Buf<T>) {
    let mut g = Buf::dirty(f.len());
    let mut phi = Buf::dirty(f.len());
    g.par_chunks_mut(CHUNK)
        .zip(phi.par_chunks_mut(CHUNK))
        .zip(f.par_chunks(CHUNK))
        .for_each(|((gc, pc), fc)| T::gelu_chunk(fc, gc, pc));
    (g, phi)
}

/// `df = dg · (Φ(f) + f · φ(f))`, in place of `dg`.
fn gelu_bwd<T: Real>(dg: &mut [T], f: &[T], phi: &[T]) {
    dg.par_chunks_mut(CHUNK)
        .zip(f.par_chunks(CHUNK))
        .zip(phi.par_chunks(CHUNK))
        .for_each(|((dc, fc), pc)| T::gelu_bwd_chunk(dc, fc, pc));
}

// ---------------------------------------------------------------- attention

/// Sizes of one pass.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    nh: usize,
    d: usize,
    inter: usize,
}

impl Dims {
    fn n(&self) -> usize {
        self.b * self.t
    }
}

/// Attention over `qkv` `[B·T, 3H]` (Q | K | V, heads side by side): returns the context
/// `[B·T, H]` and the probabilities before dropout `[B, nh, T, T]`. One task per batch row.
fn attention<T: Real>(
    qkv: &[T],
    mask_add: &[T],
    drop: &Option<Mask<T>>,
    scale: f64,
    dm: Dims,
) -> (Buf<T>, Buf<T>) {
    let Dims { t, h, nh, d, .. } = dm;
    let tt = t * t;
    let mut ctx = Buf::dirty(dm.n() * h);
    let mut probs = Buf::dirty(dm.b * nh * tt);
    ctx.par_chunks_mut(t * h)
        .zip(probs.par_chunks_mut(nh * tt))
        .enumerate()
        .for_each(|(bi, (cx, pr))| {
            let rows = &qkv[bi * t * 3 * h..][..t * 3 * h];
            let madd = &mask_add[bi * t..][..t];
            let mut pd = vec![T::zero(); if drop.is_some() { tt } else { 0 }];
            let mut s = vec![0f64; t];
            for hh in 0..nh {
                let p = &mut pr[hh * tt..][..tt];
                matmul(
                    p,
                    View::rows(0, t, t, t),
                    false,
                    rows,
                    View::rows(hh * d, t, d, 3 * h),
                    rows,
                    View::rows(h + hh * d, t, d, 3 * h).t(),
                    Parallelism::None,
                );
                let base = (bi * nh + hh) * tt;
                for prow in p.chunks_mut(t) {
                    T::softmax_row(prow, madd, scale, &mut s);
                }
                if let Some(dr) = drop {
                    let keep = &dr.keep[base..][..tt];
                    for ((o, &pv), &k) in pd.iter_mut().zip(p.iter()).zip(keep) {
                        *o = pv * (T::from_f64(k as f64) * dr.mult);
                    }
                }
                let src: &[T] = if drop.is_some() { &pd } else { p };
                matmul(
                    cx,
                    View::rows(hh * d, t, d, h),
                    false,
                    src,
                    View::rows(0, t, t, t),
                    rows,
                    View::rows(2 * h + hh * d, t, d, 3 * h),
                    Parallelism::None,
                );
            }
        });
    (ctx, probs)
}

/// Backward of [`attention`]: the gradient of `qkv` from the context's gradient `dctx`.
fn attention_bwd<T: Real>(
    qkv: &[T],
    probs: &[T],
    dctx: &[T],
    drop: &Option<Mask<T>>,
    scale: f64,
    dm: Dims,
) -> Buf<T> {
    let Dims { t, h, nh, d, .. } = dm;
    let tt = t * t;
    let mut dqkv = Buf::dirty(dm.n() * 3 * h);
    dqkv.par_chunks_mut(t * 3 * h)
        .zip(dctx.par_chunks(t * h))
        .enumerate()
        .for_each(|(bi, (dq, dc))| {
            let rows = &qkv[bi * t * 3 * h..][..t * 3 * h];
            let mut pd = vec![T::zero(); if drop.is_some() { tt } else { 0 }];
            let mut dp = vec![T::zero(); tt];
            for hh in 0..nh {
                let base = (bi * nh + hh) * tt;
                let p = &probs[base..][..tt];
                // dPd = dctx · Vᵀ
                matmul(
                    &mut dp,
                    View::rows(0, t, t, t),
                    false,
                    dc,
                    View::rows(hh * d, t, d, h),
                    rows,
                    View::rows(2 * h + hh * d, t, d, 3 * h).t(),
                    Parallelism::None,
                );
                if let Some(dr) = drop {
                    for (i, v) in pd.iter_mut().enumerate() {
                        *v = p[i] * (T::from_f64(dr.keep[base + i] as f64) * dr.mult);
                    }
                }
                let pdr: &[T] = if drop.is_some() { &pd } else { p };
                // dV = Pdᵀ · dctx
                matmul(
                    dq,
                    View::rows(2 * h + hh * d, t, d, 3 * h),
                    false,
                    pdr,
                    View::rows(0, t, t, t).t(),
                    dc,
                    View::rows(hh * d, t, d, h),
                    Parallelism::None,
                );
                // dS = scale · P ∘ (g − Σ g·P), g = dPd ∘ mask
                for (i, row) in dp.chunks_mut(t).enumerate() {
                    let mask = drop
                        .as_ref()
                        .map(|dr| (&dr.keep[base + i * t..][..t], dr.mult));
                    T::softmax_bwd_row(row, &p[i * t..][..t], mask, scale);
                }
                // dQ = dS · K, dK = dSᵀ · Q
                matmul(
                    dq,
                    View::rows(hh * d, t, d, 3 * h),
                    false,
                    &dp,
                    View::rows(0, t, t, t),
                    rows,
                    View::rows(h + hh * d, t, d, 3 * h),
                    Parallelism::None,
                );
                matmul(
                    dq,
                    View::rows(h + hh * d, t, d, 3 * h),
                    false,
                    &dp,
                    View::rows(0, t, t, t).t(),
                    rows,
                    View::rows(hh * d, t, d, 3 * h),
                    Parallelism::None,
                );
            }
        });
    dqkv
}

// ---------------------------------------------------------------- parameters

/// The parameters as host slices, by HF name (read guards held by the caller).
struct Params<'a, T> {
    by_name: HashMap<&'a str, &'a [T]>,
}

impl<'a, T: Real> Params<'a, T> {
    fn get(&self, name: &str) -> Result<&'a [T]> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::InvalidArgument(format!("the model has no parameter {name}")))
    }
}

/// One encoder layer's weights, Q/K/V stacked into one `[3H, H]` product.
struct LayerW<'a, T> {
    qkv_w: Vec<T>,
    qkv_b: Vec<T>,
    o_w: &'a [T],
    o_b: &'a [T],
    ln1: (&'a [T], &'a [T]),
    i_w: &'a [T],
    i_b: &'a [T],
    f_w: &'a [T],
    f_b: &'a [T],
    ln2: (&'a [T], &'a [T]),
}

fn layer_weights<'a, T: Real>(p: &Params<'a, T>, i: usize) -> Result<LayerW<'a, T>> {
    let n = |s: &str| format!("bert.encoder.layer.{i}.{s}");
    let mut qkv_w = Vec::new();
    let mut qkv_b = Vec::new();
    for part in ["query", "key", "value"] {
        qkv_w.extend_from_slice(p.get(&n(&format!("attention.self.{part}.weight")))?);
        qkv_b.extend_from_slice(p.get(&n(&format!("attention.self.{part}.bias")))?);
    }
    Ok(LayerW {
        qkv_w,
        qkv_b,
        o_w: p.get(&n("attention.output.dense.weight"))?,
        o_b: p.get(&n("attention.output.dense.bias"))?,
        ln1: (
            p.get(&n("attention.output.LayerNorm.weight"))?,
            p.get(&n("attention.output.LayerNorm.bias"))?,
        ),
        i_w: p.get(&n("intermediate.dense.weight"))?,
        i_b: p.get(&n("intermediate.dense.bias"))?,
        f_w: p.get(&n("output.dense.weight"))?,
        f_b: p.get(&n("output.dense.bias"))?,
        ln2: (
            p.get(&n("output.LayerNorm.weight"))?,
            p.get(&n("output.LayerNorm.bias"))?,
        ),
    })
}

/// What one layer's forward keeps for its backward.
struct LayerSaved<T: Real> {
    qkv: Buf<T>,
    probs: Buf<T>,
    attn_drop: Option<Mask<T>>,
    ctx: Buf<T>,
    drop1: Option<Mask<T>>,
    norm1: NormSaved<T>,
    y1: Buf<T>,
    f: Buf<T>,
    phi: Buf<T>,
    g: Buf<T>,
    drop2: Option<Mask<T>>,
    norm2: NormSaved<T>,
}

fn ids_of(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?)
}

// ---------------------------------------------------------------- the pass

fn run<T: Real>(
    model: &BertClassifier,
    batch: &Batch,
    mut rng: Option<&mut SeededRng>,
) -> Result<(f64, GradStore)> {
    let cfg = model.config();
    let (b, t) = batch.input_ids.dims2()?;
    let (h, nh) = (cfg.hidden_size, cfg.num_attention_heads);
    if nh == 0 || h % nh != 0 {
        return Err(Error::InvalidArgument(format!(
            "hidden_size {h} does not split into {nh} heads"
        )));
    }
    let dm = Dims {
        b,
        t,
        h,
        nh,
        d: h / nh,
        inter: cfg.intermediate_size,
    };
    let n = dm.n();
    let c = model.num_labels();
    let labels = batch
        .labels
        .as_ref()
        .ok_or_else(|| Error::InvalidArgument("a training batch needs labels".into()))?;
    let regression = c == 1 && labels.dtype().is_float();
    let targets: Vec<f64> = labels.to_dtype(DType::F64)?.to_vec1()?;
    if targets.len() != b {
        return Err(Error::InvalidArgument(format!(
            "{} labels for a batch of {b}",
            targets.len()
        )));
    }
    if !regression {
        if let Some(l) = targets.iter().find(|&&l| l < 0.0 || l as usize >= c) {
            return Err(Error::InvalidArgument(format!(
                "label {l} is out of range for {c} classes"
            )));
        }
    }
    let ids = ids_of(&batch.input_ids)?;
    let type_ids = ids_of(&batch.token_type_ids)?;
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
    // HF's additive mask, in the model's dtype: (mask − 1) · (−min).
    let big = T::from_f64(-dtype_min(model.dtype()));
    let mask_add: Vec<T> = batch
        .attention_mask
        .to_dtype(model.dtype())?
        .flatten_all()?
        .to_vec1::<T>()?
        .into_iter()
        .map(|k| (k - T::one()) * big)
        .collect();

    // Host views of the parameters; the guards live until the gradients are built.
    let vars = model.named_vars();
    let guards: Vec<_> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().storage_and_layout())
        .collect();
    let mut by_name = HashMap::new();
    for ((name, _), (storage, layout)) in vars.iter().zip(&guards) {
        let Storage::Cpu(cpu) = &**storage else {
            return Err(Error::InvalidArgument(
                "the CPU training pass needs CPU parameters".into(),
            ));
        };
        let all = T::cpu_storage_as_slice(cpu)?;
        let (a, e) = layout
            .contiguous_offsets()
            .ok_or_else(|| Error::InvalidArgument(format!("parameter {name} is not contiguous")))?;
        by_name.insert(name.as_str(), &all[a..e]);
    }
    let p = Params { by_name };
    let eps = cfg.layer_norm_eps;
    let (p_hid, p_attn) = (cfg.hidden_dropout_prob, cfg.attention_probs_dropout_prob);
    let scale = (dm.d as f64).powf(-0.5);

    // Embeddings.
    let word = p.get("bert.embeddings.word_embeddings.weight")?;
    let pos = p.get("bert.embeddings.position_embeddings.weight")?;
    let typ = p.get("bert.embeddings.token_type_embeddings.weight")?;
    let mut emb = Buf::dirty(n * h);
    emb.par_chunks_mut(h).enumerate().for_each(|(r, o)| {
        let (wr, pr, tr) = (
            &word[ids[r] as usize * h..][..h],
            &pos[(r % t) * h..][..h],
            &typ[type_ids[r] as usize * h..][..h],
        );
        for i in 0..h {
            o[i] = T::from_f64(wr[i].to_f64() + pr[i].to_f64() + tr[i].to_f64());
        }
    });
    let ln0 = (
        p.get("bert.embeddings.LayerNorm.weight")?,
        p.get("bert.embeddings.LayerNorm.bias")?,
    );
    let drop0 = draw::<T>(&mut rng, n * h, p_hid);
    let (x0, norm0) = add_norm(&emb, &None, None, ln0.0, ln0.1, eps, &drop0, h);
    drop(emb);

    // Encoder.
    let weights: Vec<LayerW<T>> = (0..cfg.num_hidden_layers)
        .map(|i| layer_weights(&p, i))
        .collect::<Result<_>>()?;
    let mut xs: Vec<Buf<T>> = vec![x0];
    let mut saved: Vec<LayerSaved<T>> = Vec::with_capacity(weights.len());
    for lw in &weights {
        let x = xs.last().expect("the embeddings' output");
        let qkv = linear(x, &lw.qkv_w, &lw.qkv_b, n, h);
        let attn_drop = draw::<T>(&mut rng, dm.b * nh * t * t, p_attn);
        let (ctx, probs) = attention(&qkv, &mask_add, &attn_drop, scale, dm);
        let a = linear(&ctx, lw.o_w, lw.o_b, n, h);
        let drop1 = draw::<T>(&mut rng, n * h, p_hid);
        let (y1, norm1) = add_norm(&a, &drop1, Some(x), lw.ln1.0, lw.ln1.1, eps, &None, h);
        let f = linear(&y1, lw.i_w, lw.i_b, n, h);
        let (g, phi) = gelu(&f);
        let o = linear(&g, lw.f_w, lw.f_b, n, dm.inter);
        let drop2 = draw::<T>(&mut rng, n * h, p_hid);
        let (y2, norm2) = add_norm(&o, &drop2, Some(&y1), lw.ln2.0, lw.ln2.1, eps, &None, h);
        xs.push(y2);
        saved.push(LayerSaved {
            qkv,
            probs,
            attn_drop,
            ctx,
            drop1,
            norm1,
            y1,
            f,
            phi,
            g,
            drop2,
            norm2,
        });
    }

    // Pooler, dropout, head, loss.
    let last = xs.last().expect("the encoder's output");
    let mut cls = Vec::with_capacity(b * h);
    for bi in 0..b {
        cls.extend_from_slice(&last[bi * t * h..][..h]);
    }
    let (pool_w, pool_b) = (
        p.get("bert.pooler.dense.weight")?,
        p.get("bert.pooler.dense.bias")?,
    );
    let pooled: Vec<T> = linear(&cls, pool_w, pool_b, b, h)
        .iter()
        .map(|z| T::from_f64(z.to_f64().tanh()))
        .collect();
    let drop_c = draw::<T>(&mut rng, b * h, cfg.classifier_dropout_prob());
    let head_in: Vec<T> = (0..b * h).map(|i| dropped(pooled[i], &drop_c, i)).collect();
    let (cls_w, cls_b) = (p.get("classifier.weight")?, p.get("classifier.bias")?);
    let logits = linear(&head_in, cls_w, cls_b, b, h);
    let (loss, dlogits) = loss_grad(&logits, &targets, c, regression);

    // Backward: head and pooler.
    let mut grads: Vec<(&str, Vec<T>)> = Vec::new();
    let mut dhead = vec![T::zero(); b * h];
    let (dw, db) = linear_bwd(&head_in, cls_w, &dlogits, b, h, Some((&mut dhead, false)));
    grads.push(("classifier.weight", dw));
    grads.push(("classifier.bias", db));
    let dz: Vec<T> = (0..b * h)
        .map(|i| {
            let y = pooled[i].to_f64();
            T::from_f64(dropped(dhead[i], &drop_c, i).to_f64() * (1.0 - y * y))
        })
        .collect();
    let mut dcls = vec![T::zero(); b * h];
    let (dw, db) = linear_bwd(&cls, pool_w, &dz, b, h, Some((&mut dcls, false)));
    grads.push(("bert.pooler.dense.weight", dw));
    grads.push(("bert.pooler.dense.bias", db));
    let mut dy = Buf::zeroed(n * h);
    for bi in 0..b {
        dy[bi * t * h..][..h].copy_from_slice(&dcls[bi * h..][..h]);
    }

    // Backward: the encoder, last layer first.
    for (li, (lw, s)) in weights.iter().zip(&saved).enumerate().rev() {
        let pre = format!("bert.encoder.layer.{li}");
        let x = &xs[li];
        let (mut dy1, do_, dw2, db2) = add_norm_bwd(&dy, &s.norm2, lw.ln2.0, &s.drop2, &None, h);
        let mut dg = Buf::dirty(n * dm.inter);
        let do_ref = do_.as_deref().unwrap_or(&dy1);
        let (dwf, dbf) = linear_bwd(&s.g, lw.f_w, do_ref, n, dm.inter, Some((&mut dg, false)));
        drop(do_);
        gelu_bwd(&mut dg, &s.f, &s.phi);
        let (dwi, dbi) = linear_bwd(&s.y1, lw.i_w, &dg, n, h, Some((&mut dy1, true)));
        drop(dg);
        let (mut dx, da, dw1, db1) = add_norm_bwd(&dy1, &s.norm1, lw.ln1.0, &s.drop1, &None, h);
        let mut dctx = Buf::dirty(n * h);
        let da_ref = da.as_deref().unwrap_or(&dx);
        let (dwo, dbo) = linear_bwd(&s.ctx, lw.o_w, da_ref, n, h, Some((&mut dctx, false)));
        drop(da);
        let dqkv = attention_bwd(&s.qkv, &s.probs, &dctx, &s.attn_drop, scale, dm);
        let (dwqkv, dbqkv) = linear_bwd(x, &lw.qkv_w, &dqkv, n, h, Some((&mut dx, true)));
        let mut layer: Vec<(String, Vec<T>)> = Vec::new();
        for (k, part) in ["query", "key", "value"].iter().enumerate() {
            layer.push((
                format!("{pre}.attention.self.{part}.weight"),
                dwqkv[k * h * h..][..h * h].to_vec(),
            ));
            layer.push((
                format!("{pre}.attention.self.{part}.bias"),
                dbqkv[k * h..][..h].to_vec(),
            ));
        }
        for (name, g) in [
            ("attention.output.dense.weight", dwo),
            ("attention.output.dense.bias", dbo),
            ("attention.output.LayerNorm.weight", dw1),
            ("attention.output.LayerNorm.bias", db1),
            ("intermediate.dense.weight", dwi),
            ("intermediate.dense.bias", dbi),
            ("output.dense.weight", dwf),
            ("output.dense.bias", dbf),
            ("output.LayerNorm.weight", dw2),
            ("output.LayerNorm.bias", db2),
        ] {
            layer.push((format!("{pre}.{name}"), g));
        }
        for (name, g) in layer {
            let key = p
                .by_name
                .get_key_value(name.as_str())
                .map(|(k, _)| *k)
                .ok_or_else(|| Error::InvalidArgument(format!("no parameter {name}")))?;
            grads.push((key, g));
        }
        dy = dx;
    }

    // Backward: embeddings (the [PAD] row of the word table gets no gradient).
    let (de, _, dln_w, dln_b) = add_norm_bwd(&dy, &norm0, ln0.0, &None, &drop0, h);
    grads.push(("bert.embeddings.LayerNorm.weight", dln_w));
    grads.push(("bert.embeddings.LayerNorm.bias", dln_b));
    let mut dword = vec![T::zero(); word.len()];
    let mut dpos = vec![T::zero(); pos.len()];
    let mut dtyp = vec![T::zero(); typ.len()];
    let pad = cfg.pad_token_id;
    for r in 0..n {
        let g = &de[r * h..][..h];
        let rows: [(&mut Vec<T>, Option<usize>); 3] = [
            (&mut dword, (ids[r] != pad).then_some(ids[r] as usize)),
            (&mut dpos, Some(r % t)),
            (&mut dtyp, Some(type_ids[r] as usize)),
        ];
        for (table, row) in rows {
            if let Some(row) = row {
                for (o, v) in table[row * h..][..h].iter_mut().zip(g) {
                    *o += *v;
                }
            }
        }
    }
    grads.push(("bert.embeddings.word_embeddings.weight", dword));
    grads.push(("bert.embeddings.position_embeddings.weight", dpos));
    grads.push(("bert.embeddings.token_type_embeddings.weight", dtyp));

    let mut by_grad: HashMap<&str, Vec<T>> = grads.into_iter().collect();
    let mut store = GradStore::default();
    for (name, var) in vars {
        let g = by_grad
            .remove(name.as_str())
            .ok_or_else(|| Error::InvalidArgument(format!("no gradient for {name}")))?;
        store.insert(
            var.as_tensor(),
            Tensor::from_vec(g, var.shape(), &Device::Cpu)?,
        );
    }
    Ok((loss, store))
}

/// The mean loss and its gradient with respect to the logits `[B, C]`.
fn loss_grad<T: Real>(logits: &[T], targets: &[f64], c: usize, regression: bool) -> (f64, Vec<T>) {
    let b = targets.len();
    let mut dl = vec![T::zero(); logits.len()];
    let mut total = 0.0;
    for (i, &y) in targets.iter().enumerate() {
        let z = &logits[i * c..][..c];
        if regression {
            let e = z[0].to_f64() - y;
            total += e * e;
            dl[i] = T::from_f64(2.0 * e / b as f64);
            continue;
        }
        let max = z
            .iter()
            .map(|v| v.to_f64())
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v.to_f64() - max).exp()).sum();
        let lse = max + sum.ln();
        total += lse - z[y as usize].to_f64();
        for j in 0..c {
            let p = (z[j].to_f64() - lse).exp();
            let onehot = if j == y as usize { 1.0 } else { 0.0 };
            dl[i * c + j] = T::from_f64((p - onehot) / b as f64);
        }
    }
    (total / b as f64, dl)
}
