//! Small helpers the optimizers share, with no dependency on any of them (a leaf of
//! src/optim): the stored float types ([`Elem`]), parallel element-wise zips, finite checks,
//! byte counts for messages, free memory and timers.

use half::bf16;
use rayon::prelude::*;

/// A stored float of the optimizers: an element of the M-FAC window, of AdamW's moments, of a
/// gradient, of an optimizer checkpoint (f32, f64, bf16, f16). Arithmetic is done in f64.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    /// How it is stored in a safetensors file (optimizer checkpoints, little-endian bytes).
    const DTYPE: safetensors::Dtype;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}
impl Elem for f32 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::F32;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
}
impl Elem for f64 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::F64;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}
impl Elem for half::f16 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::F16;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        half::f16::from_f64(x)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
}
impl Elem for bf16 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::BF16;
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        bf16_from_f64(x)
    }
    /// A shift of the bits (exact for every value; a NaN stays a NaN). `half`'s `to_f32`
    /// branches to quiet NaNs, which keeps the sparse window's gathers from vectorising.
    #[inline(always)]
    fn to_f64(self) -> f64 {
        f32::from_bits((self.to_bits() as u32) << 16) as f64
    }
}

/// f64 → bf16 with one rounding to nearest even, as the GPU's `cvt.rn.bf16.f64`
/// (`__double2bfloat16`, which the device gather uses). `half::bf16::from_f64` drops the low 32
/// bits first, so a value just above a tie rounds down there. Here: round to f32 *to odd*
/// (truncate, then set the last bit when inexact), then to bf16 to nearest even; f32 keeps 16
/// more bits than bf16 (≥ 2 are enough), so the two roundings give the single one.
pub(crate) fn bf16_from_f64(x: f64) -> bf16 {
    let f = x as f32;
    if f as f64 == x || x.is_nan() {
        return bf16::from_f32(f);
    }
    // Toward zero: one step down in magnitude when the nearest f32 was away from zero (∞ → MAX).
    let t = if f.abs() as f64 > x.abs() {
        f.to_bits() - 1
    } else {
        f.to_bits()
    };
    bf16::from_f32(f32::from_bits(t | 1))
}

/// Runs `f` on matching pieces of `out` and `src` (equal lengths) across the threads; d-sized
/// element-wise work is memory-bound, and one core alone does not saturate memory.
pub(crate) fn par_zip_mut<T: Send, U: Sync>(
    out: &mut [T],
    src: &[U],
    f: impl Fn(&mut [T], &[U]) + Sync,
) {
    let t = threads();
    if t == 1 || out.len() < 1 << 16 {
        return f(out, src);
    }
    let chunk = out.len().div_ceil(t);
    out.par_chunks_mut(chunk)
        .zip(src.par_chunks(chunk))
        .for_each(|(o, i)| f(o, i));
}

/// Whether every value is finite, in one vectorisable sweep (x·0 is 0 for finite x, NaN else).
pub(crate) fn all_finite<E: Elem>(s: &[E]) -> bool {
    let mut acc = [0.0f64; 8];
    let chunks = s.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l].to_f64() * 0.0;
        }
    }
    acc.iter().all(|a| *a == 0.0) && tail.iter().all(|x| x.to_f64().is_finite())
}

/// The pieces the passes split into: one per thread of rayon's pool (so `RAYON_NUM_THREADS`
/// and a caller's `ThreadPool::install` apply), at most 64.
pub(crate) fn threads() -> usize {
    rayon::current_num_threads().clamp(1, 64)
}

/// A byte count for messages: `18.00 GB`, `4.2 MB`, `512 B`.
pub(crate) fn human(bytes: u128) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{bytes} B")
    }
}

/// `MemAvailable` of /proc/meminfo, when known.
pub(crate) fn available_memory() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Wall-clock milliseconds since `t` (profiles' host parts).
pub(crate) fn ms_since(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}
