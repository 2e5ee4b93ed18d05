//! The M-FAC gradient window G (m×d, one contiguous buffer) and its two streaming passes.
//!
//! The host implementation reads G column block by column block: each block of the vector
//! (g for pass 1, u for pass 2) stays in cache while all m rows stream past it once, so a pass
//! moves m·d·s bytes (s = element size) and nothing more. The d columns are split across
//! threads. Accumulation is in f64 for f32/f64 windows; bf16 windows accumulate each block in
//! f32 and add blocks in f64.

use candle_core::DType;
use half::bf16;

/// Columns per block: 2048 f64 accumulators (16 KiB) plus the streamed rows fit in L1/L2.
const BLOCK: usize = 2048;

/// Storage of the window in its dtype.
#[derive(Debug)]
pub(crate) enum HostWindow {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    F64(Vec<f64>),
}

/// An element type of the window.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}
impl Elem for f32 {
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
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
}
impl Elem for bf16 {
    #[inline(always)]
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self.to_f32() as f64
    }
}

/// A vector of `n` zeros from the zeroing allocator, `None` if it fails.
fn try_zeroed_vec<T: Elem>(n: usize) -> Option<Vec<T>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<T>(n).ok()?;
    // SAFETY: the layout is non-zero-sized; all-zero bits are a valid f32, f64 and bf16 (0.0),
    // and the pointer comes from the global allocator with exactly this layout, as
    // Vec::from_raw_parts requires (length = capacity = n).
    unsafe {
        let p = std::alloc::alloc_zeroed(layout) as *mut T;
        if p.is_null() {
            return None;
        }
        Some(Vec::from_raw_parts(p, n, n))
    }
}

pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(64)
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

/// Σ x[k]·y[k] in f64 with 8 independent accumulators (so the loop vectorises).
#[inline(always)]
fn dot<E: Elem>(x: &[E], y: &[f64]) -> f64 {
    let mut acc = [0.0f64; 8];
    let n8 = x.len() / 8 * 8;
    for (xc, yc) in x[..n8].chunks_exact(8).zip(y[..n8].chunks_exact(8)) {
        for k in 0..8 {
            acc[k] += xc[k].to_f64() * yc[k];
        }
    }
    let mut s = 0.0;
    for k in n8..x.len() {
        s += x[k].to_f64() * y[k];
    }
    acc.iter().sum::<f64>() + s
}

/// u[k] += c · x[k].
#[inline(always)]
fn axpy<E: Elem>(c: f64, x: &[E], u: &mut [f64]) {
    for (uk, xk) in u.iter_mut().zip(x) {
        *uk += c * xk.to_f64();
    }
}

/// bf16 dot with an f32 accumulator per block (exact products: bf16·bf16 fits f32's mantissa
/// for the first factor; the other factor is rounded to f32).
#[inline(always)]
fn dot_bf16(x: &[bf16], y: &[f32]) -> f64 {
    let mut acc = [0.0f32; 16];
    let n = x.len() / 16 * 16;
    for (xc, yc) in x[..n].chunks_exact(16).zip(y[..n].chunks_exact(16)) {
        for k in 0..16 {
            acc[k] += xc[k].to_f32() * yc[k];
        }
    }
    let mut s = 0.0f64;
    for k in n..x.len() {
        s += (x[k].to_f32() * y[k]) as f64;
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + s
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

    /// Writes row `j` in place from `src(k)` for k in 0..d.
    pub fn write_row(&mut self, j: usize, d: usize, src: &[f64]) {
        fn w<E: Elem>(v: &mut [E], j: usize, d: usize, src: &[f64]) {
            for (x, s) in v[j * d..(j + 1) * d].iter_mut().zip(src) {
                *x = E::from_f64(*s);
            }
        }
        match self {
            HostWindow::F32(v) => w(v, j, d, src),
            HostWindow::BF16(v) => w(v, j, d, src),
            HostWindow::F64(v) => w(v, j, d, src),
        }
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
            HostWindow::BF16(v) => gram_row_bf16(v, j, rows, d),
        }
    }

    /// Pass 2: u = scale · Σ_i c[i] G_i over the first `rows` rows, into `u` (length d).
    pub fn combine(&self, c: &[f64], rows: usize, d: usize, scale: f64, u: &mut [f64]) {
        match self {
            HostWindow::F32(v) => combine_generic(v, c, rows, d, scale, u),
            HostWindow::F64(v) => combine_generic(v, c, rows, d, scale, u),
            HostWindow::BF16(v) => combine_generic(v, c, rows, d, scale, u),
        }
    }
}

fn gram_row_generic<E: Elem>(g: &[E], j: usize, rows: usize, d: usize) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranges(d, threads())
            .into_iter()
            .map(|(a, b)| {
                s.spawn(move || {
                    let mut out = vec![0.0f64; rows];
                    let mut gj = vec![0.0f64; BLOCK];
                    let mut c0 = a;
                    while c0 < b {
                        let c1 = (c0 + BLOCK).min(b);
                        let n = c1 - c0;
                        for (x, y) in gj[..n].iter_mut().zip(&g[j * d + c0..j * d + c1]) {
                            *x = y.to_f64();
                        }
                        for (i, o) in out.iter_mut().enumerate() {
                            *o += dot(&g[i * d + c0..i * d + c1], &gj[..n]);
                        }
                        c0 = c1;
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("M-FAC pass 1 worker")).collect()
    });
    sum_parts(parts, rows)
}

fn gram_row_bf16(g: &[bf16], j: usize, rows: usize, d: usize) -> Vec<f64> {
    let parts: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = ranges(d, threads())
            .into_iter()
            .map(|(a, b)| {
                s.spawn(move || {
                    let mut out = vec![0.0f64; rows];
                    let mut gj = vec![0.0f32; BLOCK];
                    let mut c0 = a;
                    while c0 < b {
                        let c1 = (c0 + BLOCK).min(b);
                        let n = c1 - c0;
                        for (x, y) in gj[..n].iter_mut().zip(&g[j * d + c0..j * d + c1]) {
                            *x = y.to_f32();
                        }
                        for (i, o) in out.iter_mut().enumerate() {
                            *o += dot_bf16(&g[i * d + c0..i * d + c1], &gj[..n]);
                        }
                        c0 = c1;
                    }
                    out
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("M-FAC pass 1 worker")).collect()
    });
    sum_parts(parts, rows)
}

fn sum_parts(parts: Vec<Vec<f64>>, rows: usize) -> Vec<f64> {
    let mut out = vec![0.0; rows];
    for p in parts {
        for (o, x) in out.iter_mut().zip(p) {
            *o += x;
        }
    }
    out
}

fn combine_generic<E: Elem>(g: &[E], c: &[f64], rows: usize, d: usize, scale: f64, u: &mut [f64]) {
    let rs = ranges(d, threads());
    std::thread::scope(|s| {
        let mut rest: &mut [f64] = u;
        let mut start = 0;
        for (a, b) in rs {
            let (_, tail) = rest.split_at_mut(a - start);
            let (mine, tail) = tail.split_at_mut(b - a);
            rest = tail;
            start = b;
            s.spawn(move || {
                let mut c0 = a;
                while c0 < b {
                    let c1 = (c0 + BLOCK).min(b);
                    let out = &mut mine[c0 - a..c1 - a];
                    out.iter_mut().for_each(|x| *x = 0.0);
                    for (i, &ci) in c[..rows].iter().enumerate() {
                        if ci != 0.0 {
                            axpy(ci, &g[i * d + c0..i * d + c1], out);
                        }
                    }
                    out.iter_mut().for_each(|x| *x *= scale);
                    c0 = c1;
                }
            });
        }
    });
}

/// Two plain streaming reads of `bytes` (the floor an M-FAC step is compared with): the sum of
/// a buffer of f32, split across the same threads. Returns the checksum (to keep it honest).
pub fn streaming_read(buf: &[f32]) -> f64 {
    let t = threads();
    let chunk = buf.len().div_ceil(t.max(1)).max(1);
    std::thread::scope(|s| {
        let hs: Vec<_> = buf
            .chunks(chunk)
            .map(|c| {
                s.spawn(move || {
                    let mut acc = [0.0f32; 16];
                    for x in c.chunks_exact(16) {
                        for k in 0..16 {
                            acc[k] += x[k];
                        }
                    }
                    acc.iter().map(|&a| a as f64).sum::<f64>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
    })
}
