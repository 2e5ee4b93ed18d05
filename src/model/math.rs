//! The element type of the model's hand-written passes, and the scalar maths they share:
//! Φ, the GELU slope, one softmax row both ways, column sums and 8-lane reductions.
//!
//! One trait, [`Real`], for f32 and f64. Each function is written once: f64 models use the exact
//! libm forms (the 1e-10 parity with HF's float64 references); f32 models override the loops
//! with the vectorised ones of [`crate::model::fastmath`] (torch's f32 softmax, Φ within 1.2e-7).

use std::sync::Mutex;

use candle_core::WithDType;
use rayon::prelude::*;

use crate::model::fastmath;

/// The element types of the CPU pass: f32 and f64.
///
/// `exp` and `erf` are computed at the type's own precision (f32 data get the f32 functions,
/// several times faster and exact to f32 rounding); sums are accumulated in f64.
pub(crate) trait Real: WithDType + Send + Sync + 'static {
    /// `exp(x)` computed in this type.
    fn exp_n(x: f64) -> f64;
    /// `erf(x)` computed in this type.
    fn erf_n(x: f64) -> f64;
    /// The pool that keeps this type's activation buffers between passes.
    fn pool() -> &'static Mutex<Vec<Vec<Self>>>;

    /// `g = f · Φ(f)` and `phi = Φ(f)` over a chunk.
    fn gelu_chunk(f: &[Self], g: &mut [Self], phi: &mut [Self]) {
        for ((gi, pi), fi) in g.iter_mut().zip(phi.iter_mut()).zip(f) {
            let v = fi.to_f64();
            let p = normal_cdf::<Self>(v);
            *pi = Self::from_f64(p);
            *gi = Self::from_f64(v * p);
        }
    }

    /// `dg ← dg · (Φ(f) + f · φ(f))` over a chunk.
    fn gelu_bwd_chunk(dg: &mut [Self], f: &[Self], phi: &[Self]) {
        for ((d, fi), pi) in dg.iter_mut().zip(f).zip(phi) {
            let slope = gelu_slope::<Self>(fi.to_f64(), pi.to_f64());
            *d = Self::from_f64(d.to_f64() * slope);
        }
    }

    /// `row ← softmax(row · scale + mask)` (one attention row), in f64 with `tmp` (row-sized).
    fn softmax_row(row: &mut [Self], mask: &[Self], scale: f64, tmp: &mut [f64]) {
        softmax_f64(row, mask, scale, tmp);
        for (r, s) in row.iter_mut().zip(tmp.iter()) {
            *r = Self::from_f64(*s);
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
}

static POOL_F32: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
static POOL_F64: Mutex<Vec<Vec<f64>>> = Mutex::new(Vec::new());

/// f32: the vectorised loops of [`crate::model::fastmath`].
impl Real for f32 {
    fn exp_n(x: f64) -> f64 {
        (x as f32).exp() as f64
    }
    fn erf_n(x: f64) -> f64 {
        libm::erff(x as f32) as f64
    }
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

/// f64: the exact libm forms (the trait's defaults).
impl Real for f64 {
    fn exp_n(x: f64) -> f64 {
        x.exp()
    }
    fn erf_n(x: f64) -> f64 {
        libm::erf(x)
    }
    fn pool() -> &'static Mutex<Vec<Vec<f64>>> {
        &POOL_F64
    }
}

/// `Φ(x) = ½ (1 + erf(x / √2))`, with `erf` at `T`'s precision.
#[inline]
pub(crate) fn normal_cdf<T: Real>(x: f64) -> f64 {
    0.5 * (1.0 + T::erf_n(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// The GELU's derivative `Φ(x) + x · φ(x)`, given `phi = Φ(x)`.
#[inline]
pub(crate) fn gelu_slope<T: Real>(x: f64, phi: f64) -> f64 {
    const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;
    phi + x * (INV_SQRT_2PI * T::exp_n(-0.5 * x * x))
}

/// `p = softmax(s · scale + mask)` of one row, in f64 (`exp` at `T`'s precision).
pub(crate) fn softmax_f64<T: Real>(s: &[T], mask: &[T], scale: f64, p: &mut [f64]) {
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

/// Sum of `f(i)` over `0..n` in f64, in 8 lanes ([`fastmath::lanes`]): a single running sum
/// over a 128-wide row is a 128-long dependency chain.
#[inline(always)]
pub(crate) fn lane_sum(n: usize, f: impl Fn(usize) -> f64) -> f64 {
    fastmath::lanes(n, 0.0, f, |a, b| a + b)
}

/// Rows per parallel task for rows of `cols` elements: enough work per task to amortise
/// rayon's scheduling.
pub(crate) fn task_rows(cols: usize) -> usize {
    (16384 / cols.max(1)).max(1)
}

/// Column sums of a contiguous row-major `[n, c]` matrix, accumulated in f64 over row blocks
/// in parallel (the bias gradients).
pub(crate) fn col_sum<T: Real>(g: &[T], c: usize) -> Vec<T> {
    let block_rows = (8192 / c.max(1)).max(1) * 4;
    let partial: Vec<Vec<f64>> = g
        .par_chunks(block_rows * c)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_cdf_and_gelu_slope_match_their_definitions() {
        // Φ(0) = ½, Φ(1.96) ≈ 0.975; slope(0) = ½; slope'(x) = Φ + xφ by a central difference.
        assert!((normal_cdf::<f64>(0.0) - 0.5).abs() < 1e-16);
        assert!((normal_cdf::<f64>(1.959_963_984_540_054) - 0.975).abs() < 1e-12);
        let gelu = |x: f64| x * normal_cdf::<f64>(x);
        for x in [-3.0, -0.7, 0.0, 0.4, 2.5] {
            let h = 1e-5;
            let numeric = (gelu(x + h) - gelu(x - h)) / (2.0 * h);
            let exact = gelu_slope::<f64>(x, normal_cdf::<f64>(x));
            // Central difference: truncation O(h²) ≈ 1e-10, rounding ≈ 1e-16/h = 1e-11.
            assert!(
                (numeric - exact).abs() < 1e-9,
                "x = {x}: {numeric} vs {exact}"
            );
        }
    }

    #[test]
    fn softmax_row_sums_to_one_and_respects_the_mask() {
        let s = [1.0f64, 2.0, 3.0, 4.0];
        let mask = [0.0, 0.0, 0.0, f64::MIN];
        let mut p = [0f64; 4];
        softmax_f64(&s, &mask, 0.5, &mut p);
        assert!((p.iter().sum::<f64>() - 1.0).abs() < 1e-15);
        assert_eq!(p[3], 0.0);
        let e = [0.5f64.exp(), 1f64.exp(), 1.5f64.exp()];
        let z: f64 = e.iter().sum();
        for j in 0..3 {
            assert!((p[j] - e[j] / z).abs() < 1e-15);
        }
        // The f32 loop agrees with the f64 one to f32 rounding.
        let (mut r32, m32) = ([1.0f32, 2.0, 3.0, 4.0], [0.0f32, 0.0, 0.0, f32::MIN]);
        f32::softmax_row(&mut r32, &m32, 0.5, &mut [0.0; 4]);
        for j in 0..4 {
            assert!((r32[j] as f64 - p[j]).abs() < 1e-6, "{j}");
        }
    }

    #[test]
    fn col_sum_adds_every_row() {
        let (n, c) = (1000, 3);
        let g: Vec<f64> = (0..n * c).map(|i| (i % c) as f64 + 0.5).collect();
        assert_eq!(col_sum(&g, c), vec![500.0, 1500.0, 2500.0]);
    }
}
