//! The M-FAC gradient window G (m×d, one contiguous buffer) and its two streaming passes.
//!
//! The host implementation reads G column block by column block: each block of the vector
//! (g for pass 1, u for pass 2) stays in cache while all m rows stream past it once, so a pass
//! moves m·d·s bytes (s = element size) and nothing more. The d columns are split across
//! threads. Accumulation is in f64 for f32/f64 windows; bf16 windows accumulate each block (or
//! each sweep of eight rows) in f32 and add those in f64. On x86-64 CPUs with AVX2 and FMA,
//! hand-written kernels are picked at run time for f32 and bf16 windows.

// The pass kernels take the window, the vector and their geometry explicitly.
#![allow(clippy::too_many_arguments)]

use candle_core::DType;
use half::bf16;
use rayon::prelude::*;

use crate::optim::util::threads;
use crate::optim::util::{par_zip_mut, Elem};

/// Columns per block. Long enough (64 KiB of an f32 row) for the hardware prefetchers to ramp
/// up on every row stream; the f64 block of g or u (128 KiB) stays in L2.
const BLOCK: usize = 16384;

/// Storage of the window in its dtype.
#[derive(Debug)]
pub(crate) enum HostWindow {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F64(Vec<f64>),
}

/// A vector of `n` zeros from the zeroing allocator, its pages made resident at once (see
/// [`prefault`]), `None` if it fails.
fn try_zeroed_vec<T: Elem>(n: usize) -> Option<Vec<T>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(n).ok()?;
    // SAFETY: the layout is non-zero-sized; all-zero bits are a valid f32, f64 and bf16 (0.0),
    // and the pointer comes from the global allocator with exactly this layout, as
    // Vec::from_raw_parts requires (length = capacity = n).
    let v = unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut T;
        if p.is_null() {
            return None;
        }
        Vec::from_raw_parts(p, n, n)
    };
    advise_huge_pages(&v);
    let mut v = v;
    prefault(&mut v);
    Some(v)
}

/// Touches every page of `v` (writing the zero it holds), on rayon's pool: the zeroing
/// allocator hands out untouched pages, which would become resident only as the window fills
/// (m steps; 9 GB over the first 1,024 steps at the card's size). Touched now, the memory the
/// plan counted is taken before the first step — a machine short of it fails at once, not an
/// hour in — and resident memory stays flat through the run (the soak benchmark checks it).
fn prefault<T: Elem>(v: &mut [T]) {
    use rayon::prelude::*;
    const PAGE: usize = 4096;
    let per_page = (PAGE / std::mem::size_of::<T>()).max(1);
    let zero = T::from_f64(0.0);
    v.par_chunks_mut(per_page * 512).for_each(|chunk| {
        for x in chunk.iter_mut().step_by(per_page) {
            // SAFETY: a volatile write of the value already there, so that it is not elided.
            unsafe { std::ptr::write_volatile(x, zero) };
        }
    });
}

/// Asks Linux for transparent huge pages on a large buffer. The passes touch all m rows within
/// every column block: with 4 KiB pages that is m·16 pages per block, beyond the TLB's reach
/// from m ≈ 128 on (measured: 1.10× the floor at m = 128, 1.41× at m = 256). With 2 MiB pages
/// each row piece is one page. Harmless where THP is off; the pages are still untouched here.
fn advise_huge_pages<T>(v: &[T]) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let (start, len) = (v.as_ptr() as usize, std::mem::size_of_val(v));
        let aligned = start.div_ceil(HUGE) * HUGE;
        if len >= 2 * HUGE && aligned < start + len {
            let n = (start + len - aligned) / HUGE * HUGE;
            // SAFETY: [aligned, aligned + n) lies inside the live allocation `v`; MADV_HUGEPAGE
            // only changes how the kernel backs those pages, never their contents.
            unsafe {
                libc::madvise(aligned as *mut libc::c_void, n, libc::MADV_HUGEPAGE);
            }
        }
    }
}

/// Splits 0..d into `t` contiguous ranges, aligned to BLOCK.
fn ranges(d: usize, t: usize) -> Vec<(usize, usize)> {
    let blocks = d.div_ceil(BLOCK);
    let per = blocks.div_ceil(t.max(1));
    (0..t)
        .map(|i| ((i * per * BLOCK).min(d), ((i + 1) * per * BLOCK).min(d)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// out[r] += Σ_k G_r[k]·y[k] for the (up to) four rows `g`, over one column block. Four rows
/// share each load of y; four lanes per row keep the sums independent so the loop vectorises.
#[inline(always)]
fn dot4<E: Elem>(g: [&[E]; 4], y: &[f64], out: &mut [f64; 4]) {
    let n = y.len();
    let g = [&g[0][..n], &g[1][..n], &g[2][..n], &g[3][..n]];
    let mut acc = [[0.0f64; 4]; 4];
    let n4 = n / 4 * 4;
    let mut k = 0;
    while k < n4 {
        let yk = [y[k], y[k + 1], y[k + 2], y[k + 3]];
        for r in 0..4 {
            let gr = &g[r][k..k + 4];
            for l in 0..4 {
                acc[r][l] += gr[l].to_f64() * yk[l];
            }
        }
        k += 4;
    }
    for r in 0..4 {
        let mut s = (acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]);
        for k in n4..n {
            s += g[r][k].to_f64() * y[k];
        }
        out[r] += s;
    }
}

/// u[k] += Σ_r c[r]·G_r[k] over four rows at once (one load and store of u per four rows).
#[inline(always)]
fn axpy4<E: Elem>(c: [f64; 4], g: [&[E]; 4], u: &mut [f64]) {
    let n = u.len();
    let g = [&g[0][..n], &g[1][..n], &g[2][..n], &g[3][..n]];
    for k in 0..n {
        u[k] += (c[0] * g[0][k].to_f64() + c[1] * g[1][k].to_f64())
            + (c[2] * g[2][k].to_f64() + c[3] * g[3][k].to_f64());
    }
}

/// Pass 1 over one thread's columns [a, b): partial dots of the first `rows` rows with row j.
#[inline(always)]
fn pass1_range<E: Elem>(g: &[E], j: usize, rows: usize, d: usize, a: usize, b: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; rows.div_ceil(4) * 4];
    let zero: Vec<E> = vec![E::from_f64(0.0); BLOCK];
    let mut gj = vec![0.0f64; BLOCK];
    let mut c0 = a;
    while c0 < b {
        let c1 = (c0 + BLOCK).min(b);
        let n = c1 - c0;
        for (x, y) in gj[..n].iter_mut().zip(&g[j * d + c0..j * d + c1]) {
            *x = y.to_f64();
        }
        let row = |i: usize| {
            if i < rows {
                &g[i * d + c0..i * d + c1]
            } else {
                &zero[..n]
            }
        };
        for i in (0..rows).step_by(4) {
            let mut o = [0.0; 4];
            dot4(
                [row(i), row(i + 1), row(i + 2), row(i + 3)],
                &gj[..n],
                &mut o,
            );
            for r in 0..4 {
                out[i + r] += o[r];
            }
        }
        c0 = c1;
    }
    out.truncate(rows);
    out
}

/// (Σ u², Σ u·x) with independent lanes (vectorisable).
#[inline(always)]
fn norm_and_dot<E: Elem>(u: &[f64], x: &[E]) -> (f64, f64) {
    let n = u.len();
    let x = &x[..n];
    let (mut uu, mut ux) = ([0.0f64; 4], [0.0f64; 4]);
    let n4 = n / 4 * 4;
    for k in (0..n4).step_by(4) {
        for l in 0..4 {
            let v = u[k + l];
            uu[l] += v * v;
            ux[l] += v * x[k + l].to_f64();
        }
    }
    let (mut a, mut b) = (
        (uu[0] + uu[1]) + (uu[2] + uu[3]),
        (ux[0] + ux[1]) + (ux[2] + ux[3]),
    );
    for k in n4..n {
        a += u[k] * u[k];
        b += u[k] * x[k].to_f64();
    }
    (a, b)
}

/// Pass 2 over one thread's columns: u[a..b] = scale·Σ_i c[i]·G_i[a..b]; returns
/// (Σ u², Σ u·G_j) over those columns, computed while the blocks are in cache.
#[inline(always)]
fn pass2_range<E: Elem>(
    g: &[E],
    c: &[f64],
    rows: usize,
    d: usize,
    scale: f64,
    j: usize,
    a: usize,
    mine: &mut [f64],
) -> (f64, f64) {
    let b = a + mine.len();
    let mut stats = (0.0, 0.0);
    let zero: Vec<E> = vec![E::from_f64(0.0); BLOCK];
    let mut c0 = a;
    while c0 < b {
        let c1 = (c0 + BLOCK).min(b);
        let n = c1 - c0;
        let out = &mut mine[c0 - a..c1 - a];
        out.iter_mut().for_each(|x| *x = 0.0);
        let row = |i: usize| {
            if i < rows {
                &g[i * d + c0..i * d + c1]
            } else {
                &zero[..n]
            }
        };
        let ci = |i: usize| if i < rows { c[i] } else { 0.0 };
        for i in (0..rows).step_by(4) {
            axpy4(
                [ci(i), ci(i + 1), ci(i + 2), ci(i + 3)],
                [row(i), row(i + 1), row(i + 2), row(i + 3)],
                out,
            );
        }
        out.iter_mut().for_each(|x| *x *= scale);
        let (uu, ug) = norm_and_dot(out, &g[j * d + c0..j * d + c1]);
        stats = (stats.0 + uu, stats.1 + ug);
        c0 = c1;
    }
    stats
}

/// The kernels compiled for AVX2 + FMA, chosen at run time when the CPU has them.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pass1<E: Elem>(
        g: &[E],
        j: usize,
        rows: usize,
        d: usize,
        a: usize,
        b: usize,
    ) -> Vec<f64> {
        pass1_range(g, j, rows, d, a, b)
    }
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pass2<E: Elem>(
        g: &[E],
        c: &[f64],
        rows: usize,
        d: usize,
        scale: f64,
        j: usize,
        a: usize,
        mine: &mut [f64],
    ) -> (f64, f64) {
        pass2_range(g, c, rows, d, scale, j, a, mine)
    }
}

/// Hand-written AVX2 + FMA kernels for the f32 window (the default): f32 rows widened to f64
/// and accumulated with FMA, four rows per sweep.
#[cfg(target_arch = "x86_64")]
mod avx2_f32 {
    use std::arch::x86_64::*;

    /// Partial dots of rows `g[r]` (n f32 each) with `y` (n f64), added to `out`; eight rows
    /// share each load of y.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot8(g: [*const f32; 8], y: *const f64, n: usize, out: &mut [f64; 8]) {
        let mut acc = [_mm256_setzero_pd(); 8];
        let mut k = 0;
        while k + 4 <= n {
            let yv = _mm256_loadu_pd(y.add(k));
            for r in 0..8 {
                acc[r] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(g[r].add(k))), yv, acc[r]);
            }
            k += 4;
        }
        for r in 0..8 {
            let mut lanes = [0.0f64; 4];
            _mm256_storeu_pd(lanes.as_mut_ptr(), acc[r]);
            let mut s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
            for t in k..n {
                s += *g[r].add(t) as f64 * *y.add(t);
            }
            out[r] += s;
        }
    }

    /// u[k] += Σ_r c[r]·g[r][k] for k < n, eight rows per sweep (one load and store of u).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy8(c: [f64; 8], g: [*const f32; 8], u: *mut f64, n: usize) {
        let mut cv = [_mm256_setzero_pd(); 8];
        for r in 0..8 {
            cv[r] = _mm256_set1_pd(c[r]);
        }
        let mut k = 0;
        while k + 4 <= n {
            let mut a0 = _mm256_loadu_pd(u.add(k));
            let mut a1 = _mm256_setzero_pd();
            for r in (0..8).step_by(2) {
                a0 = _mm256_fmadd_pd(cv[r], _mm256_cvtps_pd(_mm_loadu_ps(g[r].add(k))), a0);
                a1 = _mm256_fmadd_pd(
                    cv[r + 1],
                    _mm256_cvtps_pd(_mm_loadu_ps(g[r + 1].add(k))),
                    a1,
                );
            }
            _mm256_storeu_pd(u.add(k), _mm256_add_pd(a0, a1));
            k += 4;
        }
        while k < n {
            let mut s = *u.add(k);
            for r in 0..8 {
                s += c[r] * *g[r].add(k) as f64;
            }
            *u.add(k) = s;
            k += 1;
        }
    }
}

/// AVX2 + FMA kernels for the bf16 window: bf16 widened to f32 (a shift), products accumulated
/// in f32 within a block (errors ~1e-6, far below bf16's own 2^-9), blocks added in f64.
#[cfg(target_arch = "x86_64")]
mod avx2_bf16 {
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn load8(p: *const half::bf16) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot8(
        g: [*const half::bf16; 8],
        y: *const f32,
        n: usize,
        out: &mut [f64; 8],
    ) {
        let mut acc = [_mm256_setzero_ps(); 8];
        let mut k = 0;
        while k + 8 <= n {
            let yv = _mm256_loadu_ps(y.add(k));
            for r in 0..8 {
                acc[r] = _mm256_fmadd_ps(load8(g[r].add(k)), yv, acc[r]);
            }
            k += 8;
        }
        for r in 0..8 {
            let mut lanes = [0.0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), acc[r]);
            let mut s: f64 = lanes.iter().map(|&x| x as f64).sum();
            for t in k..n {
                s += ((*g[r].add(t)).to_f32() * *y.add(t)) as f64;
            }
            out[r] += s;
        }
    }

    /// u[k] += Σ_r c[r]·g[r][k] (the eight-row sum in f32, added to u in f64).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy8(c: [f64; 8], g: [*const half::bf16; 8], u: *mut f64, n: usize) {
        let mut cv = [_mm256_setzero_ps(); 8];
        for r in 0..8 {
            cv[r] = _mm256_set1_ps(c[r] as f32);
        }
        let mut k = 0;
        while k + 8 <= n {
            let mut t0 = _mm256_mul_ps(cv[0], load8(g[0].add(k)));
            let mut t1 = _mm256_mul_ps(cv[1], load8(g[1].add(k)));
            for r in (2..8).step_by(2) {
                t0 = _mm256_fmadd_ps(cv[r], load8(g[r].add(k)), t0);
                t1 = _mm256_fmadd_ps(cv[r + 1], load8(g[r + 1].add(k)), t1);
            }
            let t = _mm256_add_ps(t0, t1);
            let lo = _mm256_add_pd(
                _mm256_loadu_pd(u.add(k)),
                _mm256_cvtps_pd(_mm256_castps256_ps128(t)),
            );
            let hi = _mm256_add_pd(
                _mm256_loadu_pd(u.add(k + 4)),
                _mm256_cvtps_pd(_mm256_extractf128_ps(t, 1)),
            );
            _mm256_storeu_pd(u.add(k), lo);
            _mm256_storeu_pd(u.add(k + 4), hi);
            k += 8;
        }
        while k < n {
            let mut s = 0.0f32;
            for r in 0..8 {
                s += c[r] as f32 * (*g[r].add(k)).to_f32();
            }
            *u.add(k) += s as f64;
            k += 1;
        }
    }
}

/// A window element with hand-written AVX2 kernels; pass 1 widens row j to `Y`.
#[cfg(target_arch = "x86_64")]
trait Simd8: Elem {
    type Y: Copy + Default;
    fn widen(self) -> Self::Y;
    /// out[r] += ⟨g[r][..n], y[..n]⟩ for eight rows.
    /// SAFETY (caller): each pointer addresses n valid values; the CPU has AVX2 and FMA.
    unsafe fn dot8(g: [*const Self; 8], y: *const Self::Y, n: usize, out: &mut [f64; 8]);
    /// u[..n] += Σ_r c[r]·g[r][..n]. SAFETY (caller): as for `dot8`; u holds n values.
    unsafe fn axpy8(c: [f64; 8], g: [*const Self; 8], u: *mut f64, n: usize);
}

#[cfg(target_arch = "x86_64")]
impl Simd8 for f32 {
    type Y = f64;
    fn widen(self) -> f64 {
        self as f64
    }
    unsafe fn dot8(g: [*const f32; 8], y: *const f64, n: usize, out: &mut [f64; 8]) {
        avx2_f32::dot8(g, y, n, out)
    }
    unsafe fn axpy8(c: [f64; 8], g: [*const f32; 8], u: *mut f64, n: usize) {
        avx2_f32::axpy8(c, g, u, n)
    }
}

#[cfg(target_arch = "x86_64")]
impl Simd8 for bf16 {
    type Y = f32;
    fn widen(self) -> f32 {
        self.to_f32()
    }
    unsafe fn dot8(g: [*const bf16; 8], y: *const f32, n: usize, out: &mut [f64; 8]) {
        avx2_bf16::dot8(g, y, n, out)
    }
    unsafe fn axpy8(c: [f64; 8], g: [*const bf16; 8], u: *mut f64, n: usize) {
        avx2_bf16::axpy8(c, g, u, n)
    }
}

/// Pass 1 with the AVX2 kernels over one thread's columns (same blocking as the generic one).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::useless_vec)] // 128 KiB block buffers belong on the heap, not a worker's stack
fn pass1_simd<E: Simd8>(g: &[E], j: usize, rows: usize, d: usize, a: usize, b: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; rows.div_ceil(8) * 8];
    let zero = vec![E::from_f64(0.0); BLOCK];
    let mut gj = vec![E::Y::default(); BLOCK];
    let mut c0 = a;
    while c0 < b {
        let c1 = (c0 + BLOCK).min(b);
        let n = c1 - c0;
        for (x, y) in gj[..n].iter_mut().zip(&g[j * d + c0..j * d + c1]) {
            *x = y.widen();
        }
        let row = |i: usize| {
            if i < rows {
                g[i * d + c0..i * d + c1].as_ptr()
            } else {
                zero.as_ptr()
            }
        };
        for i in (0..rows).step_by(8) {
            let mut o = [0.0; 8];
            let ps: [*const E; 8] = std::array::from_fn(|r| row(i + r));
            // SAFETY: each pointer addresses n valid values (a row block, or the zero block of
            // BLOCK ≥ n); gj holds n values; the dispatcher checked AVX2 and FMA.
            unsafe { E::dot8(ps, gj.as_ptr(), n, &mut o) };
            for r in 0..8 {
                out[i + r] += o[r];
            }
        }
        c0 = c1;
    }
    out.truncate(rows);
    out
}

/// Pass 2 with the AVX2 kernels over one thread's columns; returns (Σ u², Σ u·G_j).
#[cfg(target_arch = "x86_64")]
#[allow(clippy::useless_vec)] // as in pass1_simd
fn pass2_simd<E: Simd8>(
    g: &[E],
    c: &[f64],
    rows: usize,
    d: usize,
    scale: f64,
    j: usize,
    a: usize,
    mine: &mut [f64],
) -> (f64, f64) {
    let b = a + mine.len();
    let mut stats = (0.0, 0.0);
    let zero = vec![E::from_f64(0.0); BLOCK];
    let mut c0 = a;
    while c0 < b {
        let c1 = (c0 + BLOCK).min(b);
        let n = c1 - c0;
        let out = &mut mine[c0 - a..c1 - a];
        out.iter_mut().for_each(|x| *x = 0.0);
        let row = |i: usize| {
            if i < rows {
                g[i * d + c0..i * d + c1].as_ptr()
            } else {
                zero.as_ptr()
            }
        };
        let ci = |i: usize| if i < rows { c[i] } else { 0.0 };
        for i in (0..rows).step_by(8) {
            let cs: [f64; 8] = std::array::from_fn(|r| ci(i + r));
            let ps: [*const E; 8] = std::array::from_fn(|r| row(i + r));
            // SAFETY: as in pass1_simd; `out` holds n f64.
            unsafe { E::axpy8(cs, ps, out.as_mut_ptr(), n) };
        }
        out.iter_mut().for_each(|x| *x *= scale);
        let (uu, ug) = norm_and_dot(out, &g[j * d + c0..j * d + c1]);
        stats = (stats.0 + uu, stats.1 + ug);
        c0 = c1;
    }
    stats
}

/// `g` as `&[f32]` when E is f32.
fn as_f32<E: Elem>(g: &[E]) -> Option<&[f32]> {
    if std::any::TypeId::of::<E>() == std::any::TypeId::of::<f32>() {
        // SAFETY: E is f32 (same type id), so the slice is a slice of f32.
        Some(unsafe { std::slice::from_raw_parts(g.as_ptr() as *const f32, g.len()) })
    } else {
        None
    }
}

/// `g` as `&[bf16]` when E is bf16.
fn as_bf16<E: Elem>(g: &[E]) -> Option<&[bf16]> {
    if std::any::TypeId::of::<E>() == std::any::TypeId::of::<bf16>() {
        // SAFETY: E is bf16 (same type id).
        Some(unsafe { std::slice::from_raw_parts(g.as_ptr() as *const bf16, g.len()) })
    } else {
        None
    }
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn pass1_dispatch<E: Elem>(
    g: &[E],
    j: usize,
    rows: usize,
    d: usize,
    a: usize,
    b: usize,
) -> Vec<f64> {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        if let Some(g32) = as_f32(g) {
            return pass1_simd(g32, j, rows, d, a, b);
        }
        if let Some(g16) = as_bf16(g) {
            return pass1_simd(g16, j, rows, d, a, b);
        }
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { avx2::pass1(g, j, rows, d, a, b) };
    }
    pass1_range(g, j, rows, d, a, b)
}

fn pass2_dispatch<E: Elem>(
    g: &[E],
    c: &[f64],
    rows: usize,
    d: usize,
    scale: f64,
    j: usize,
    a: usize,
    mine: &mut [f64],
) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        if let Some(g32) = as_f32(g) {
            return pass2_simd(g32, c, rows, d, scale, j, a, mine);
        }
        if let Some(g16) = as_bf16(g) {
            return pass2_simd(g16, c, rows, d, scale, j, a, mine);
        }
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        return unsafe { avx2::pass2(g, c, rows, d, scale, j, a, mine) };
    }
    pass2_range(g, c, rows, d, scale, j, a, mine)
}

impl HostWindow {
    /// A zeroed m×d window, or `None` when the allocation fails (never an abort). Zeroed
    /// pages are mapped lazily, so this is fast even for gigabytes.
    pub fn try_zeros(dtype: DType, m: usize, d: usize) -> Option<Self> {
        let n = m.checked_mul(d)?;
        Some(match dtype {
            DType::BF16 => HostWindow::BF16(try_zeroed_vec(n)?),
            DType::F64 => HostWindow::F64(try_zeroed_vec(n)?),
            _ => HostWindow::F32(try_zeroed_vec(n)?),
        })
    }

    /// Row `j` as f64 (for checks and introspection).
    pub fn row(&self, j: usize, d: usize) -> Vec<f64> {
        match self {
            HostWindow::F32(v) => v[j * d..(j + 1) * d].iter().map(|x| x.to_f64()).collect(),
            HostWindow::BF16(v) => v[j * d..(j + 1) * d].iter().map(|x| x.to_f64()).collect(),
            HostWindow::F64(v) => v[j * d..(j + 1) * d].iter().map(|x| x.to_f64()).collect(),
        }
    }

    /// Pass 1: out[i] = ⟨G_i, G_j⟩ for the first `rows` rows (the stored row j, as stored).
    pub fn gram_row(&self, j: usize, rows: usize, d: usize) -> Vec<f64> {
        match self {
            HostWindow::F32(v) => gram_row_generic(v, j, rows, d),
            HostWindow::F64(v) => gram_row_generic(v, j, rows, d),
            HostWindow::BF16(v) => gram_row_generic(v, j, rows, d),
        }
    }

    /// Pass 2: u = scale · Σ_i c[i] G_i over the first `rows` rows, into `u` (length d).
    /// Returns (‖u‖², ⟨u, G_j⟩), gathered on the way.
    pub fn combine(
        &self,
        c: &[f64],
        rows: usize,
        d: usize,
        scale: f64,
        j: usize,
        u: &mut [f64],
    ) -> (f64, f64) {
        match self {
            HostWindow::F32(v) => combine_generic(v, c, rows, d, scale, j, u),
            HostWindow::F64(v) => combine_generic(v, c, rows, d, scale, j, u),
            HostWindow::BF16(v) => combine_generic(v, c, rows, d, scale, j, u),
        }
    }

    /// ⟨G_j, x⟩ (one read of row j).
    pub fn row_dot(&self, j: usize, d: usize, x: &[f64]) -> f64 {
        fn f<E: Elem>(v: &[E], j: usize, d: usize, x: &[f64]) -> f64 {
            norm_and_dot(x, &v[j * d..(j + 1) * d]).1
        }
        match self {
            HostWindow::F32(v) => f(v, j, d, x),
            HostWindow::F64(v) => f(v, j, d, x),
            HostWindow::BF16(v) => f(v, j, d, x),
        }
    }

    /// Writes `src` (any float slice) into row `j` at column `offset`, converting.
    pub fn write_segment<T: Elem>(&mut self, j: usize, d: usize, offset: usize, src: &[T]) {
        fn w<E: Elem, T: Elem>(v: &mut [E], start: usize, src: &[T]) {
            par_zip_mut(&mut v[start..start + src.len()], src, |o, i| {
                for (x, s) in o.iter_mut().zip(i) {
                    *x = E::from_f64(s.to_f64());
                }
            });
        }
        let start = j * d + offset;
        match self {
            HostWindow::F32(v) => match as_f32(src) {
                // f32 → f32 is a plain copy.
                Some(s32) => par_zip_mut(&mut v[start..start + s32.len()], s32, |o, i| {
                    o.copy_from_slice(i)
                }),
                None => w(v, start, src),
            },
            HostWindow::F64(v) => w(v, start, src),
            HostWindow::BF16(v) => match as_f32(src) {
                Some(s32) => par_zip_mut(&mut v[start..start + s32.len()], s32, |o, i| {
                    for (x, s) in o.iter_mut().zip(i) {
                        *x = bf16::from_f32(*s);
                    }
                }),
                None => w(v, start, src),
            },
        }
    }
}

fn gram_row_generic<E: Elem>(g: &[E], j: usize, rows: usize, d: usize) -> Vec<f64> {
    // An indexed collect keeps the ranges' order, so the sums below are deterministic.
    let parts: Vec<Vec<f64>> = ranges(d, threads())
        .into_par_iter()
        .map(|(a, b)| pass1_dispatch(g, j, rows, d, a, b))
        .collect();
    let mut out = vec![0.0; rows];
    for p in parts {
        for (o, x) in out.iter_mut().zip(p) {
            *o += x;
        }
    }
    out
}

fn combine_generic<E: Elem>(
    g: &[E],
    c: &[f64],
    rows: usize,
    d: usize,
    scale: f64,
    j: usize,
    u: &mut [f64],
) -> (f64, f64) {
    let rs = ranges(d, threads());
    // Each range's slice of u, split off in order (the ranges are contiguous from 0).
    let mut pieces: Vec<(usize, &mut [f64])> = Vec::with_capacity(rs.len());
    let mut rest: &mut [f64] = u;
    let mut start = 0;
    for (a, b) in rs {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(a - start);
        let (mine, tail) = tail.split_at_mut(b - a);
        rest = tail;
        start = b;
        pieces.push((a, mine));
    }
    let stats: Vec<(f64, f64)> = pieces
        .into_par_iter()
        .map(|(a, mine)| pass2_dispatch(g, c, rows, d, scale, j, a, mine))
        .collect();
    stats
        .into_iter()
        .fold((0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) (a 64-bit LCG), as the window's dtype.
    fn values<E: Elem>(n: usize, seed: u64) -> Vec<E> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                E::from_f64((x >> 11) as f64 / (1u64 << 52) as f64 - 1.0)
            })
            .collect()
    }

    fn rel(a: &[f64], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den).sqrt()
    }

    /// The portable passes (what a CPU without AVX2 + FMA runs; CI's CPUs have both, so these
    /// are never dispatched there) against the dispatched ones, on two column blocks plus a
    /// tail, a partly filled window and a row count that is not a multiple of 4 or 8.
    /// Tolerances: f32 and f64 windows accumulate in f64 on both paths, in different orders
    /// (≈ 1e-15 relative). bf16 sums each block of up to 16384 products in f32 on the SIMD path:
    /// with terms of random sign the relative error of such a sum is about ε_f32·√n·Σ|t|/|Σt|
    /// ≈ 6e-8 · 128 · O(10) ≈ 1e-4 at most for these rows (measured: 6e-6).
    fn generic_equals_dispatched<E: Elem>(tol: f64) {
        let (m, d) = (11, 2 * BLOCK + 123);
        let g: Vec<E> = values(m * d, 3);
        let (rows, j) = (10, 4);
        let generic = pass1_range(&g, j, rows, d, 0, d);
        let fast = pass1_dispatch(&g, j, rows, d, 0, d);
        assert!(
            rel(&generic, &fast) < tol,
            "pass 1: {}",
            rel(&generic, &fast)
        );
        let c: Vec<f64> = values::<f64>(rows, 5);
        let (mut u1, mut u2) = (vec![1.0; d], vec![2.0; d]);
        let s1 = pass2_range(&g, &c, rows, d, 3.0, j, 0, &mut u1);
        let s2 = pass2_dispatch(&g, &c, rows, d, 3.0, j, 0, &mut u2);
        assert!(rel(&u1, &u2) < tol, "pass 2: {}", rel(&u1, &u2));
        assert!(rel(&[s1.0, s1.1], &[s2.0, s2.1]) < tol);
        // A column range that starts inside the window (a thread's share).
        let (a, b) = (BLOCK - 7, d - 5);
        let generic = pass1_range(&g, j, rows, d, a, b);
        let fast = pass1_dispatch(&g, j, rows, d, a, b);
        assert!(rel(&generic, &fast) < tol);
    }

    #[test]
    fn portable_passes_equal_the_simd_ones() {
        if !has_avx2() {
            eprintln!("no AVX2 + FMA here: the dispatched passes are the portable ones too");
        }
        generic_equals_dispatched::<f32>(1e-12);
        generic_equals_dispatched::<f64>(1e-12);
        generic_equals_dispatched::<bf16>(1e-4);
    }

    #[test]
    fn the_pieces_follow_rayons_pool() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        assert_eq!(pool.install(threads), 3);
        // The passes give the same result whatever the number of pieces (up to rounding).
        let d = 3 * BLOCK + 11;
        let g: Vec<f32> = values(4 * d, 9);
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let a = one.install(|| gram_row_generic(&g, 1, 4, d));
        let b = pool.install(|| gram_row_generic(&g, 1, 4, d));
        assert!(rel(&a, &b) < 1e-12);
    }
}
