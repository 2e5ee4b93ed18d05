//! Vectorisable f32 `exp`, the normal CDF Φ, and the loops of the f32 training pass built on
//! them (GELU both ways, the attention softmax). libm's scalar calls cost 3 ns per element,
//! a third of a bert-tiny step's non-GEMM time; these loops have no calls or branches, so the
//! compiler turns them into SIMD code, with AVX2 + FMA when the CPU has them (checked at run
//! time).
//!
//! Accuracy: `exp` within 2 ulp of the exact value over f32's normal range (flushed to 0 below
//! e^-87); Φ from the erfc approximation of Numerical Recipes §6.2 (a Chebyshev fit; fractional
//! error of the fit below 1.2e-7 everywhere), within 1e-6 relative in f32 for |x| ≲ 2. In f32 the exponent `-z²` carries roundings of
//! up to `z²·2.4e-7`, so far in the lower tail Φ's relative error grows to that (2e-6 at x = -4,
//! where Φ is 3e-5); GELU's output there is below 1e-4 in absolute value.
//! f64 models keep libm's functions.

/// `exp(x)` for f32 without calls or branches: `x = n·ln2 + r`, a degree-7 Taylor polynomial
/// for `e^r` on |r| ≤ ln2/2 (truncation error ≤ 5e-9 relative), and `2^n` built in the
/// exponent bits. Below -87 (where e^x leaves f32's normal range) the result is 0.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| < 2^9 (Cody–Waite).
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer held in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let t = xc.mul_add(LOG2E, MAGIC);
    let n = t - MAGIC;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    let p = r.mul_add(1.0 / 5040.0, 1.0 / 720.0);
    let p = p.mul_add(r, 1.0 / 120.0);
    let p = p.mul_add(r, 1.0 / 24.0);
    let p = p.mul_add(r, 1.0 / 6.0);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    let ni = t.to_bits().wrapping_sub(MAGIC.to_bits()) as i32;
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    let v = p * scale;
    if x < -87.0 {
        0.0
    } else {
        v
    }
}

/// The standard normal CDF `Φ(x) = erfc(-x/√2) / 2`, with erfc from Numerical Recipes' fit
/// (`t·exp(-z² + P(t))`, `t = 1/(1 + |z|/2)`), fractional error below 1.2e-7.
#[inline(always)]
pub fn normal_cdf(x: f32) -> f32 {
    let z = -x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / a.mul_add(0.5, 1.0);
    let mut p = 0.170_872_77f32;
    for c in [
        -0.822_152_23f32,
        1.488_515_9,
        -1.135_204,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_7,
        -1.265_512_2,
    ] {
        p = p.mul_add(t, c);
    }
    let erfc_abs = t * exp(p - a * a);
    let erfc = if z >= 0.0 { erfc_abs } else { 2.0 - erfc_abs };
    0.5 * erfc
}

const INV_SQRT_2PI: f32 = 0.398_942_3;

#[inline(always)]
fn gelu_body(f: &[f32], g: &mut [f32], phi: &mut [f32]) {
    for ((gi, pi), &x) in g.iter_mut().zip(phi.iter_mut()).zip(f) {
        let p = normal_cdf(x);
        *pi = p;
        *gi = x * p;
    }
}

#[inline(always)]
fn gelu_bwd_body(dg: &mut [f32], f: &[f32], phi: &[f32]) {
    for ((d, &x), &p) in dg.iter_mut().zip(f).zip(phi) {
        let pdf = INV_SQRT_2PI * exp(-0.5 * x * x);
        *d *= x.mul_add(pdf, p);
    }
}

/// Reduces `f(i)` over `0..n` with `op` in 8 interleaved lanes (vectorisable; a single running
/// value would be one long dependency chain). Used for f32 rows here and for the f64 sums of
/// the CPU pass's LayerNorm and softmax backward.
#[inline(always)]
pub(crate) fn lanes<T: Copy>(
    n: usize,
    init: T,
    f: impl Fn(usize) -> T,
    op: impl Fn(T, T) -> T,
) -> T {
    let mut acc = [init; 8];
    let full = n / 8 * 8;
    let mut i = 0;
    while i < full {
        for (j, a) in acc.iter_mut().enumerate() {
            *a = op(*a, f(i + j));
        }
        i += 8;
    }
    let mut r = op(
        op(op(acc[0], acc[4]), op(acc[1], acc[5])),
        op(op(acc[2], acc[6]), op(acc[3], acc[7])),
    );
    for k in full..n {
        r = op(r, f(k));
    }
    r
}

/// `row = softmax(row · scale + mask)`, in f32 as torch computes it.
#[inline(always)]
fn softmax_body(row: &mut [f32], mask: &[f32], scale: f32) {
    for (v, &m) in row.iter_mut().zip(mask) {
        *v = v.mul_add(scale, m);
    }
    let max = lanes(row.len(), f32::NEG_INFINITY, |j| row[j], f32::max);
    for v in row.iter_mut() {
        *v = exp(*v - max);
    }
    let inv = 1.0 / lanes(row.len(), 0.0, |j| row[j], |a, b| a + b);
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// The softmax backward of one row: `g ← scale · p ∘ (g' − Σ g'·p)`, `g' = g ∘ keep · mult`.
#[inline(always)]
fn softmax_bwd_body(g: &mut [f32], p: &[f32], mask: Option<(&[u8], f32)>, scale: f32) {
    if let Some((keep, mult)) = mask {
        for (v, &k) in g.iter_mut().zip(keep) {
            *v *= k as f32 * mult;
        }
    }
    let dot = lanes(g.len(), 0.0, |j| g[j] * p[j], |a, b| a + b);
    for (v, &pj) in g.iter_mut().zip(p) {
        *v = scale * pj * (*v - dot);
    }
}

/// Defines a public function that runs `$body` compiled for AVX2 + FMA when the CPU has them,
/// else for the baseline target.
macro_rules! simd_dispatch {
    ($(#[$doc:meta])* $name:ident, $avx:ident, $body:ident, ($($arg:ident: $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx($($arg: $ty),*) {
            $body($($arg),*)
        }

        $(#[$doc])*
        pub fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { $avx($($arg),*) };
            }
            $body($($arg),*)
        }
    };
}

simd_dispatch!(
    /// GELU: `g = f · Φ(f)`, keeping `phi = Φ(f)` for the backward.
    gelu, gelu_avx2, gelu_body, (f: &[f32], g: &mut [f32], phi: &mut [f32])
);
simd_dispatch!(
    /// GELU's backward in place: `dg ← dg · (Φ(f) + f · φ(f))`.
    gelu_bwd, gelu_bwd_avx2, gelu_bwd_body, (dg: &mut [f32], f: &[f32], phi: &[f32])
);
simd_dispatch!(
    /// The backward of one attention row's softmax and dropout, in place of the gradient.
    softmax_bwd_row, softmax_bwd_row_avx2, softmax_bwd_body,
    (g: &mut [f32], p: &[f32], mask: Option<(&[u8], f32)>, scale: f32)
);
simd_dispatch!(
    /// A masked, scaled softmax of one attention row, in place.
    softmax_row, softmax_row_avx2, softmax_body, (row: &mut [f32], mask: &[f32], scale: f32)
);

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_2_ulp_over_the_normal_range() {
        let mut worst = 0;
        let mut x = -87.0f32;
        while x < 88.0 {
            let exact = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp(x), exact));
            x += 0.001_3;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp(-1e30), 0.0);
        assert_eq!(exp(f32::MIN), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn normal_cdf_matches_libm_erfc_within_its_error_bound() {
        let mut x = -12.0f32;
        while x < 8.0 {
            let exact = 0.5 * libm::erfc(-(x as f64) / std::f64::consts::SQRT_2);
            let ours = normal_cdf(x) as f64;
            // The error budget in f32: NR's fit (1.2e-7), `exp` (2 ulp: 2.4e-7), Horner's nine
            // roundings of P (|P| ≤ 1.3: up to 6e-7 absolute in the exponent), the last few
            // products (~1.2e-7): 1e-6 relative; plus the roundings of the exponent's −z²
            // (z = x/√2 rounded counts twice, the square and the subtraction once each:
            // 4 · 6e-8 · z²).
            let z2 = (x as f64) * (x as f64) / 2.0;
            let tol = (1e-6 + 2.4e-7 * z2) * exact + 1e-30;
            assert!((ours - exact).abs() <= tol, "x={x}: {ours} vs {exact}");
            x += 0.000_7;
        }
    }

    #[test]
    fn dispatched_loops_match_the_scalar_forms() {
        let f: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) / 60.0).collect();
        let (mut g, mut phi) = (vec![0.0; 1000], vec![0.0; 1000]);
        gelu(&f, &mut g, &mut phi);
        for i in 0..1000 {
            assert_eq!(phi[i], normal_cdf(f[i]));
            assert_eq!(g[i], f[i] * phi[i]);
        }
        let mut row: Vec<f32> = (0..128).map(|i| (i as f32).sin() * 4.0).collect();
        let mut mask = vec![0.0f32; 128];
        mask[100..].iter_mut().for_each(|m| *m = f32::MIN);
        let plain = row.clone();
        softmax_row(&mut row, &mask, 0.125);
        let max = plain[..100]
            .iter()
            .map(|v| v * 0.125)
            .fold(f32::MIN, f32::max);
        let sum: f64 = plain[..100]
            .iter()
            .map(|v| ((v * 0.125 - max) as f64).exp())
            .sum();
        for j in 0..128 {
            let want = if j < 100 {
                ((plain[j] * 0.125 - max) as f64).exp() / sum
            } else {
                0.0
            };
            assert!((row[j] as f64 - want).abs() <= 1e-6 * want + 1e-12, "{j}");
        }
    }
}
