//! The sparse window's rows and its two passes.
//!
//! # Layout
//! Each of the m rows holds the same number k of kept entries, ascending by column. Columns are
//! grouped in segments of [`SEG`] = 65,536; an entry stores its column's offset within its
//! segment (u16) and its value (in the window dtype), and each row keeps, per segment, where its
//! entries of that segment start (`start`, u32, m × (segments + 1)). So an entry costs 2 bytes
//! of index (not 4, not EFCP's 8) plus its value: at bert-tiny's size, m = 1024 and 1 %, the
//! window is 0.27 GB with f32 values and 0.18 GB with bf16 ones. A row never written holds k
//! entries at column 0 with value 0 (EFCP's zero rows): they add nothing.
//!
//! # The passes, one segment at a time
//! A segment's f64 slice of a d-length vector is 512 KiB: it stays in L2 (1 MiB here) while the
//! m rows' entries of that segment stream past once. Segments are independent tasks on rayon's
//! pool (a dynamic split: kept entries cluster in some layers), and their results are added in
//! segment order, so the sums do not depend on the number of threads. While a row's piece is
//! worked on, the next row's piece is prefetched at the same pace (`Next`).
//! - Pass 1, K's new row: r_i = ⟨W_i, c⟩ = Σ over row i's entries of v · c[col]. Row j (c
//!   itself) is scattered into a zeroed buffer of the segment in the window's dtype (exact; 256
//!   KiB for f32), every row gathers from it, and the buffer is cleared again (O(entries), not
//!   O(SEG)). A segment where row j has no entry adds nothing and is skipped.
//! - Pass 2, u = scale·Wᵀc: each segment's slice of u (u is padded to whole segments) is zeroed,
//!   every row scatter-adds c_i·v into it in f64, then it is scaled; ‖u‖² and ⟨u, W_j⟩ are
//!   summed while it is in cache.
//!
//! Measured (docs/PERFORMANCE.md): each pass costs about 2.5–3 cycles an entry, twice a plain
//! read of the rows; a layout with each segment's entries contiguous was no faster in a replica.

use rayon::prelude::*;

use crate::optim::mfac::window::HostWindow;
use crate::optim::util::Elem;

/// Bits of a column's offset within its segment.
pub(crate) const SEG_BITS: u32 = 16;
/// Columns per segment.
pub(crate) const SEG: usize = 1 << SEG_BITS;

/// m rows of k kept (column, value) entries (module docs).
#[derive(Debug)]
pub(crate) struct SparseRows {
    m: usize,
    d: usize,
    k: usize,
    segs: usize,
    /// m × k: each entry's column within its segment.
    idx: Vec<u16>,
    /// m × k values in the window dtype.
    val: HostWindow,
    /// m × (segs + 1): row r's entries of segment s are [start[s], start[s + 1]) of the row.
    start: Vec<u32>,
}

/// A zeroed vector, or `None` when the allocation fails (never an abort).
fn try_filled<T: Copy>(n: usize, x: T) -> Option<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).ok()?;
    v.resize(n, x);
    Some(v)
}

impl SparseRows {
    /// Bytes of m rows of k entries over d columns with `value_bytes` per value.
    pub fn bytes_for(m: usize, d: usize, k: usize, value_bytes: usize) -> u128 {
        let segs = d.div_ceil(SEG) as u128;
        m as u128 * k as u128 * (2 + value_bytes as u128) + m as u128 * (segs + 1) * 4
    }

    /// m empty rows (every entry at column 0, value 0); `None` when memory is short.
    pub fn try_new(dtype: candle_core::DType, m: usize, d: usize, k: usize) -> Option<Self> {
        let segs = d.div_ceil(SEG).max(1);
        let n = m.checked_mul(k)?;
        let val = HostWindow::try_zeros(dtype, m, k)?;
        let idx = try_filled(n, 0u16)?;
        let mut start = try_filled(m.checked_mul(segs + 1)?, k as u32)?;
        for r in 0..m {
            start[r * (segs + 1)] = 0;
        }
        Some(SparseRows {
            m,
            d,
            k,
            segs,
            idx,
            val,
            start,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> u128 {
        (self.idx.len() * 2 + self.start.len() * 4) as u128
            + match &self.val {
                HostWindow::F32(v) => v.len() as u128 * 4,
                HostWindow::BF16(v) => v.len() as u128 * 2,
                HostWindow::F64(v) => v.len() as u128 * 8,
            }
    }

    /// Row r's entries of segment s: [a, b) within the row.
    #[inline(always)]
    fn range(&self, r: usize, s: usize) -> (usize, usize) {
        let o = r * (self.segs + 1) + s;
        (self.start[o] as usize, self.start[o + 1] as usize)
    }

    /// Writes row j: the columns `kept` (ascending, k of them) with the values of `acc` there
    /// rounded to the window dtype, and leaves in `acc` what the row did not take (acc − stored:
    /// zero on the kept columns for an f32 or f64 window; bf16's rounding error for a bf16
    /// window, so error feedback carries it to the next step).
    pub fn set_row<A: Elem>(&mut self, j: usize, kept: &[u32], acc: &mut [A]) {
        debug_assert_eq!(kept.len(), self.k);
        let (k, segs) = (self.k, self.segs);
        let ix = &mut self.idx[j * k..(j + 1) * k];
        for (o, &c) in ix.iter_mut().zip(kept) {
            *o = (c as usize & (SEG - 1)) as u16;
        }
        fn take<E: Elem, A: Elem>(out: &mut [E], kept: &[u32], acc: &mut [A]) {
            for (o, &c) in out.iter_mut().zip(kept) {
                let a = acc[c as usize].to_f64();
                let s = E::from_f64(a);
                *o = s;
                acc[c as usize] = A::from_f64(a - s.to_f64());
            }
        }
        match &mut self.val {
            HostWindow::F32(v) => take(&mut v[j * k..(j + 1) * k], kept, acc),
            HostWindow::BF16(v) => take(&mut v[j * k..(j + 1) * k], kept, acc),
            HostWindow::F64(v) => take(&mut v[j * k..(j + 1) * k], kept, acc),
        }
        Self::segment_starts(
            kept,
            &mut self.start[j * (segs + 1)..(j + 1) * (segs + 1)],
            k,
        );
    }

    /// Row j's kept columns, ascending (absolute).
    pub fn columns(&self, j: usize) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.k);
        for s in 0..self.segs {
            let (a, b) = self.range(j, s);
            let base = (s * SEG) as u32;
            out.extend(
                self.idx[j * self.k + a..j * self.k + b]
                    .iter()
                    .map(|&o| base + o as u32),
            );
        }
        out
    }

    /// Every row's columns as absolute u32 (m × k, each row ascending): the device window's
    /// layout, for moving a window between the host format and the device.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn absolute_columns(&self) -> Vec<u32> {
        (0..self.m).flat_map(|j| self.columns(j)).collect()
    }

    /// Sets every row's columns from absolute ones (m × k, each row ascending, as
    /// [`SparseRows::absolute_columns`] gives), the values left as they are.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn set_absolute_columns(&mut self, idx: &[u32]) {
        let (k, segs) = (self.k, self.segs);
        for j in 0..self.m {
            let kept = &idx[j * k..(j + 1) * k];
            for (o, &c) in self.idx[j * k..(j + 1) * k].iter_mut().zip(kept) {
                *o = (c as usize & (SEG - 1)) as u16;
            }
            Self::segment_starts(
                kept,
                &mut self.start[j * (segs + 1)..(j + 1) * (segs + 1)],
                k,
            );
        }
    }

    /// st[s] = how many of the ascending columns `kept` lie in segments before s; st[segs] = k.
    fn segment_starts(kept: &[u32], st: &mut [u32], k: usize) {
        let segs = st.len() - 1;
        let mut p = 0usize;
        for (s, o) in st.iter_mut().enumerate() {
            while p < kept.len() && (kept[p] as usize >> SEG_BITS) < s {
                p += 1;
            }
            *o = p as u32;
        }
        st[segs] = k as u32;
    }

    /// The values' storage (m × k in the window dtype).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn values_store(&self) -> &HostWindow {
        &self.val
    }

    /// As [`SparseRows::values_store`], writable.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub fn values_store_mut(&mut self) -> &mut HostWindow {
        &mut self.val
    }

    /// Row j's kept values (aligned with [`SparseRows::columns`]), as f64.
    pub fn values(&self, j: usize) -> Vec<f64> {
        self.val.row(j, self.k)
    }

    /// Row j as a dense f64 vector of length d.
    pub fn dense_row(&self, j: usize) -> Vec<f64> {
        let mut out = vec![0.0; self.d];
        for (c, v) in self.columns(j).into_iter().zip(self.values(j)) {
            out[c as usize] += v;
        }
        out
    }

    /// Pass 1: r_i = ⟨W_i, W_j⟩ for the first `rows` rows.
    pub fn gram_row(&self, j: usize, rows: usize) -> Vec<f64> {
        match &self.val {
            HostWindow::F32(v) => self.gram_row_in(v, j, rows),
            HostWindow::BF16(v) => self.gram_row_in(v, j, rows),
            HostWindow::F64(v) => self.gram_row_in(v, j, rows),
        }
    }

    fn gram_row_in<E: Elem>(&self, val: &[E], j: usize, rows: usize) -> Vec<f64> {
        let parts: Vec<Option<Vec<f64>>> = (0..self.segs)
            .into_par_iter()
            .map_init(
                || vec![E::from_f64(0.0); SEG],
                |buf, s| {
                    let buf: &mut [E; SEG] = buf.as_mut_slice().try_into().expect("SEG long");
                    self.gram_segment(val, j, rows, s, buf)
                },
            )
            .collect();
        let mut out = vec![0.0; rows];
        for p in parts.into_iter().flatten() {
            for (o, x) in out.iter_mut().zip(p) {
                *o += x;
            }
        }
        out
    }

    /// Pass 1 over segment s (`buf`: SEG zeros, left zeroed). Row j's entries go into `buf` in
    /// the window's own dtype (exact: they are stored in it).
    fn gram_segment<E: Elem>(
        &self,
        val: &[E],
        j: usize,
        rows: usize,
        s: usize,
        buf: &mut [E; SEG],
    ) -> Option<Vec<f64>> {
        let k = self.k;
        let (ja, jb) = self.range(j, s);
        if ja == jb {
            return None;
        }
        let (jx, jv) = (
            &self.idx[j * k + ja..j * k + jb],
            &val[j * k + ja..j * k + jb],
        );
        for (&o, v) in jx.iter().zip(jv) {
            buf[o as usize & (SEG - 1)] = *v;
        }
        let mut out = vec![0.0; rows];
        for (i, o) in out.iter_mut().enumerate() {
            let (a, b) = self.range(i, s);
            let next = self.next(val, (i + 1).min(rows - 1), s);
            *o = gather_dot(
                &self.idx[i * k + a..i * k + b],
                &val[i * k + a..i * k + b],
                buf,
                next,
            );
        }
        let zero = E::from_f64(0.0);
        for &o in jx {
            buf[o as usize & (SEG - 1)] = zero;
        }
        Some(out)
    }

    /// Where row r's entries of segment s start (its columns, its values): the pass prefetches
    /// row i + 1 while it works on row i (see [`Next`]).
    #[inline(always)]
    fn next<E>(&self, val: &[E], r: usize, s: usize) -> Next<E> {
        let a = r * self.k + self.start[r * (self.segs + 1) + s] as usize;
        Next {
            cols: self.idx.as_ptr().wrapping_add(a),
            vals: val.as_ptr().wrapping_add(a),
        }
    }

    /// Pass 2: u = scale·Σ_{i < rows} c_i W_i into `u` (length ≥ d, a multiple of [`SEG`]: the
    /// columns past d stay zero). Returns (‖u‖², ⟨u, W_j⟩).
    pub fn combine(
        &self,
        c: &[f64],
        rows: usize,
        scale: f64,
        j: usize,
        u: &mut [f64],
    ) -> (f64, f64) {
        debug_assert!(u.len() == self.segs * SEG);
        match &self.val {
            HostWindow::F32(v) => self.combine_in(v, c, rows, scale, j, u),
            HostWindow::BF16(v) => self.combine_in(v, c, rows, scale, j, u),
            HostWindow::F64(v) => self.combine_in(v, c, rows, scale, j, u),
        }
    }

    fn combine_in<E: Elem>(
        &self,
        val: &[E],
        c: &[f64],
        rows: usize,
        scale: f64,
        j: usize,
        u: &mut [f64],
    ) -> (f64, f64) {
        let k = self.k;
        let sums: Vec<(f64, f64)> = u
            .par_chunks_mut(SEG)
            .enumerate()
            .map(|(s, us)| {
                let us: &mut [f64; SEG] = us.try_into().expect("u is whole segments");
                us.iter_mut().for_each(|x| *x = 0.0);
                for (i, &ci) in c[..rows].iter().enumerate() {
                    let (a, b) = self.range(i, s);
                    let next = self.next(val, (i + 1).min(rows - 1), s);
                    scatter_add(
                        ci,
                        &self.idx[i * k + a..i * k + b],
                        &val[i * k + a..i * k + b],
                        us,
                        next,
                    );
                }
                let mut uu = [0.0f64; 4];
                for q in us.chunks_exact_mut(4) {
                    for (l, x) in q.iter_mut().enumerate() {
                        *x *= scale;
                        uu[l] += *x * *x;
                    }
                }
                let (a, b) = self.range(j, s);
                let uj = gather_dot(
                    &self.idx[j * k + a..j * k + b],
                    &val[j * k + a..j * k + b],
                    us,
                    Next::none(),
                );
                ((uu[0] + uu[1]) + (uu[2] + uu[3]), uj)
            })
            .collect();
        sums.into_iter()
            .fold((0.0, 0.0), |x, y| (x.0 + y.0, x.1 + y.1))
    }

    /// The rows' arrays for a checkpoint: (columns within segments, values, segment starts).
    pub fn arrays(&self) -> (&[u16], &HostWindow, &[u32]) {
        (&self.idx, &self.val, &self.start)
    }

    /// The same, to read a checkpoint into.
    pub fn arrays_mut(&mut self) -> (&mut [u16], &mut HostWindow, &mut [u32]) {
        (&mut self.idx, &mut self.val, &mut self.start)
    }

    /// Checks a restored table: every row's starts ascend from 0 to k. (A corrupt file could
    /// otherwise make a pass index out of its row.)
    pub fn check(&self) -> Result<(), String> {
        let w = self.segs + 1;
        for r in 0..self.m {
            let st = &self.start[r * w..(r + 1) * w];
            if st[0] != 0 || st[self.segs] as usize != self.k || st.windows(2).any(|p| p[0] > p[1])
            {
                return Err(format!(
                    "row {r}'s segment table is not ascending from 0 to {}",
                    self.k
                ));
            }
            // The last segment may be short: its offsets must stay below d.
            let last = self.segs - 1;
            let (a, b) = self.range(r, last);
            let limit = self.d - last * SEG;
            if self.idx[r * self.k + a..r * self.k + b]
                .iter()
                .any(|&o| o as usize >= limit)
            {
                return Err(format!(
                    "row {r} has a column beyond the {} parameters",
                    self.d
                ));
            }
        }
        Ok(())
    }
}

/// The next row's piece of a segment, prefetched while the current one is worked on: each row's
/// piece is a short stream (≈ 650 entries at 1 %, 1.3 KB of columns and 2.6 KB of f32 values),
/// too short for the hardware prefetcher to ramp up, and a pass hops over m of them per segment.
/// Asking for the next row's lines at the pace the current row is consumed keeps its data
/// arriving in time (measured: a pass over bert-tiny's 1 % window at m = 1024 took 40 % less).
/// Only addresses are computed (wrapping), never dereferenced: a prefetch is a hint that does
/// not fault.
#[derive(Clone, Copy)]
struct Next<E> {
    cols: *const u16,
    vals: *const E,
}

impl<E> Next<E> {
    fn none() -> Self {
        Next {
            cols: std::ptr::null(),
            vals: std::ptr::null(),
        }
    }

    /// Prefetches the lines of entries [p, p + 16) of the next piece.
    #[inline(always)]
    fn block(&self, p: usize) {
        #[cfg(target_arch = "x86_64")]
        if !self.cols.is_null() {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let size = std::mem::size_of::<E>();
            // SAFETY: prefetches never fault; the addresses are only computed.
            unsafe {
                if p % 32 == 0 {
                    _mm_prefetch(self.cols.wrapping_add(p) as *const i8, _MM_HINT_T0);
                }
                if (p * size) % 64 == 0 {
                    _mm_prefetch(self.vals.wrapping_add(p) as *const i8, _MM_HINT_T0);
                }
                if size == 8 {
                    _mm_prefetch(self.vals.wrapping_add(p + 8) as *const i8, _MM_HINT_T0);
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = p;
    }
}

/// Σ v_p · buf[col_p] with four independent lanes (`buf` any stored float), prefetching `next`.
#[inline(always)]
fn gather_dot<E: Elem, B: Elem>(cols: &[u16], vals: &[E], buf: &[B; SEG], next: Next<E>) -> f64 {
    let n = cols.len();
    let vals = &vals[..n];
    let at = |p: usize| buf[cols[p] as usize & (SEG - 1)].to_f64();
    let mut acc = [0.0f64; 4];
    let n16 = n / 16 * 16;
    let mut p = 0;
    while p < n16 {
        next.block(p);
        for q in (p..p + 16).step_by(4) {
            for l in 0..4 {
                acc[l] += vals[q + l].to_f64() * at(q + l);
            }
        }
        p += 16;
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    while p < n {
        s += vals[p].to_f64() * at(p);
        p += 1;
    }
    s
}

/// u[col_p] += c · v_p for the entries of one row piece (columns distinct within a row),
/// prefetching `next`.
#[inline(always)]
fn scatter_add<E: Elem>(c: f64, cols: &[u16], vals: &[E], u: &mut [f64; SEG], next: Next<E>) {
    let n = cols.len();
    let vals = &vals[..n];
    let n16 = n / 16 * 16;
    let mut p = 0;
    while p < n16 {
        next.block(p);
        for q in p..p + 16 {
            u[cols[q] as usize & (SEG - 1)] += c * vals[q].to_f64();
        }
        p += 16;
    }
    while p < n {
        u[cols[p] as usize & (SEG - 1)] += c * vals[p].to_f64();
        p += 1;
    }
}
