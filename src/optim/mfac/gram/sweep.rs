//! The two O(m²) passes of one step over packed lower triangles: the sweep over B (apply the
//! pending rank-2 change, y = B a₀) and the residual over K (A c − e_j and ‖A‖∞).
//!
//! A symmetric product from a lower triangle takes row i twice: as a row (y_i += ⟨B_i, a⟩) and
//! as a column (y_l += B_il·a_i). Rows go four at a time so that the column part loads and
//! stores y once per four rows (the loop is bound by loads and stores, not by arithmetic): the
//! columns the four rows share, then the small triangle where they end, then the last m mod 4
//! rows one by one. The kernel for four rows exists twice, portable and AVX2 (x86-64, chosen
//! at run time); both do the same operations in the same order (mul then add, no FMA), so they
//! give the same bits (tested). The order of every sum depends on m alone, never on whether a
//! change was pending: a run resumed from a flushed copy of B computes the same bits.

// Dense linear algebra on index pairs reads best with explicit indices.
#![allow(clippy::needless_range_loop)]

use super::packed::{rank2, rows4_mut, tri};

/// The last step's change to B, not yet applied to its stored rows: row and column j become c,
/// and every other entry gets the symmetric rank-2 change x ← (x − fᵢ·b) + gᵢ·q (b and q are
/// zero at j, so the rank-2 part leaves row and column j alone).
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub j: usize,
    pub c: Vec<f64>,
    pub b: Vec<f64>,
    pub f: Vec<f64>,
    pub q: Vec<f64>,
    pub g: Vec<f64>,
}

impl Pending {
    /// Sets stored row `i`'s entries in column j (all of it, for row j) to c.
    #[inline(always)]
    fn set_row(&self, i: usize, row: &mut [f64]) {
        let j = self.j;
        if i == j {
            row.copy_from_slice(&self.c[..=i]);
        } else if j < i {
            row[j] = self.c[i];
        }
    }

    /// Applies the whole change to stored row `i` (columns 0..=i).
    #[inline(always)]
    pub fn apply_row(&self, i: usize, row: &mut [f64]) {
        self.set_row(i, row);
        rank2(row, self.f[i], &self.b, self.g[i], &self.q);
    }
}

/// Which four-row kernels run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernels {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernels {
    /// The fastest this CPU runs.
    pub fn detect() -> Kernels {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") {
            return Kernels::Avx2;
        }
        Kernels::Portable
    }
}

/// Four rows' values at column `o`, the rank-2 change applied first when `UPD`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn sweep4_column<const UPD: bool>(
    x: &mut [&mut [f64]; 4],
    o: usize,
    f: [f64; 4],
    b: &[f64],
    g: [f64; 4],
    q: &[f64],
) -> [f64; 4] {
    std::array::from_fn(|r| {
        if UPD {
            x[r][o] = (x[r][o] - f[r] * b[o]) + g[r] * q[o];
        }
        x[r][o]
    })
}

/// Four rows over columns [0, n), n = `a.len()`: when `UPD`, x_r ← (x_r − f_r·b) + g_r·q first;
/// returns ⟨x_r, a⟩ for each row and adds Σ_r s_r·x_r to y. Columns 4k..4k+4 go to lanes
/// 0..4 of each row's sum, the lanes are added as (0 + 1) + (2 + 3), then the last n mod 4
/// columns one by one.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn sweep4_portable<const UPD: bool>(
    mut x: [&mut [f64]; 4],
    f: [f64; 4],
    b: &[f64],
    g: [f64; 4],
    q: &[f64],
    a: &[f64],
    s: [f64; 4],
    y: &mut [f64],
) -> [f64; 4] {
    let n = a.len();
    let mut acc = [[0.0f64; 4]; 4];
    for o in (0..n / 4 * 4).step_by(4) {
        for k in 0..4 {
            let v = sweep4_column::<UPD>(&mut x, o + k, f, b, g, q);
            for r in 0..4 {
                acc[r][k] += v[r] * a[o + k];
            }
            y[o + k] += (s[0] * v[0] + s[1] * v[1]) + (s[2] * v[2] + s[3] * v[3]);
        }
    }
    sweep4_tail::<UPD>(x, f, b, g, q, a, s, y, acc)
}

/// The lanes' sums and the last n mod 4 columns (shared by both kernels).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn sweep4_tail<const UPD: bool>(
    mut x: [&mut [f64]; 4],
    f: [f64; 4],
    b: &[f64],
    g: [f64; 4],
    q: &[f64],
    a: &[f64],
    s: [f64; 4],
    y: &mut [f64],
    acc: [[f64; 4]; 4],
) -> [f64; 4] {
    let n = a.len();
    let mut out = acc.map(|v| (v[0] + v[1]) + (v[2] + v[3]));
    for o in n / 4 * 4..n {
        let v = sweep4_column::<UPD>(&mut x, o, f, b, g, q);
        for r in 0..4 {
            out[r] += v[r] * a[o];
        }
        y[o] += (s[0] * v[0] + s[1] * v[1]) + (s[2] * v[2] + s[3] * v[3]);
    }
    out
}

/// Four rows over columns [0, n), n = `c.len()`: returns (⟨x_r, c⟩, Σ|x_r|) for each row and
/// adds Σ_r s_r·x_r to y and Σ_r |x_r| to ya. Lanes as in [`sweep4_portable`].
#[inline(always)]
fn resid4_portable(
    x: [&[f64]; 4],
    c: &[f64],
    s: [f64; 4],
    y: &mut [f64],
    ya: &mut [f64],
) -> ([f64; 4], [f64; 4]) {
    let n = c.len();
    let (mut acc, mut abs) = ([[0.0f64; 4]; 4], [[0.0f64; 4]; 4]);
    for o in (0..n / 4 * 4).step_by(4) {
        for k in 0..4 {
            let v: [f64; 4] = std::array::from_fn(|r| x[r][o + k]);
            for r in 0..4 {
                acc[r][k] += v[r] * c[o + k];
                abs[r][k] += v[r].abs();
            }
            y[o + k] += (s[0] * v[0] + s[1] * v[1]) + (s[2] * v[2] + s[3] * v[3]);
            ya[o + k] += (v[0].abs() + v[1].abs()) + (v[2].abs() + v[3].abs());
        }
    }
    resid4_tail(x, c, s, y, ya, acc, abs)
}

/// The lanes' sums and the last n mod 4 columns (shared by both kernels).
#[inline(always)]
fn resid4_tail(
    x: [&[f64]; 4],
    c: &[f64],
    s: [f64; 4],
    y: &mut [f64],
    ya: &mut [f64],
    acc: [[f64; 4]; 4],
    abs: [[f64; 4]; 4],
) -> ([f64; 4], [f64; 4]) {
    let n = c.len();
    let sum4 = |v: [f64; 4]| (v[0] + v[1]) + (v[2] + v[3]);
    let (mut t, mut u) = (acc.map(sum4), abs.map(sum4));
    for o in n / 4 * 4..n {
        let v: [f64; 4] = std::array::from_fn(|r| x[r][o]);
        for r in 0..4 {
            t[r] += v[r] * c[o];
            u[r] += v[r].abs();
        }
        y[o] += (s[0] * v[0] + s[1] * v[1]) + (s[2] * v[2] + s[3] * v[3]);
        ya[o] += (v[0].abs() + v[1].abs()) + (v[2].abs() + v[3].abs());
    }
    (t, u)
}

/// The same kernels with AVX2 (4 f64 lanes = the portable kernels' 4 lanes).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// As `sweep4_portable`. SAFETY (caller): the CPU has AVX2; x, y (and b, q when `UPD`)
    /// hold at least `a.len()` values.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn sweep4<const UPD: bool>(
        mut x: [&mut [f64]; 4],
        f: [f64; 4],
        b: &[f64],
        g: [f64; 4],
        q: &[f64],
        a: &[f64],
        s: [f64; 4],
        y: &mut [f64],
    ) -> [f64; 4] {
        let n = a.len();
        let xp: [*mut f64; 4] = std::array::from_fn(|r| x[r].as_mut_ptr());
        let (ap, yp, bp, qp) = (a.as_ptr(), y.as_mut_ptr(), b.as_ptr(), q.as_ptr());
        // (No closures around intrinsics: before Rust 1.86 they did not inherit AVX2.)
        let (mut fv, mut gv, mut sv) = (
            [_mm256_setzero_pd(); 4],
            [_mm256_setzero_pd(); 4],
            [_mm256_setzero_pd(); 4],
        );
        for r in 0..4 {
            fv[r] = _mm256_set1_pd(f[r]);
            gv[r] = _mm256_set1_pd(g[r]);
            sv[r] = _mm256_set1_pd(s[r]);
        }
        let mut acc = [_mm256_setzero_pd(); 4];
        let mut o = 0;
        while o + 4 <= n {
            let av = _mm256_loadu_pd(ap.add(o));
            let mut v = [_mm256_setzero_pd(); 4];
            for r in 0..4 {
                v[r] = _mm256_loadu_pd(xp[r].add(o));
            }
            if UPD {
                let (bv, qv) = (_mm256_loadu_pd(bp.add(o)), _mm256_loadu_pd(qp.add(o)));
                for r in 0..4 {
                    let t = _mm256_sub_pd(v[r], _mm256_mul_pd(fv[r], bv));
                    v[r] = _mm256_add_pd(t, _mm256_mul_pd(gv[r], qv));
                    _mm256_storeu_pd(xp[r].add(o), v[r]);
                }
            }
            for r in 0..4 {
                acc[r] = _mm256_add_pd(acc[r], _mm256_mul_pd(v[r], av));
            }
            let t01 = _mm256_add_pd(_mm256_mul_pd(sv[0], v[0]), _mm256_mul_pd(sv[1], v[1]));
            let t23 = _mm256_add_pd(_mm256_mul_pd(sv[2], v[2]), _mm256_mul_pd(sv[3], v[3]));
            let yv = _mm256_loadu_pd(yp.add(o));
            _mm256_storeu_pd(yp.add(o), _mm256_add_pd(yv, _mm256_add_pd(t01, t23)));
            o += 4;
        }
        super::sweep4_tail::<UPD>(x, f, b, g, q, a, s, y, acc.map(lanes))
    }

    /// As `resid4_portable`. SAFETY (caller): the CPU has AVX2; x, y, ya hold at least
    /// `c.len()` values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn resid4(
        x: [&[f64]; 4],
        c: &[f64],
        s: [f64; 4],
        y: &mut [f64],
        ya: &mut [f64],
    ) -> ([f64; 4], [f64; 4]) {
        let n = c.len();
        let xp: [*const f64; 4] = x.map(|r| r.as_ptr());
        let (cp, yp, yap) = (c.as_ptr(), y.as_mut_ptr(), ya.as_mut_ptr());
        let mut sv = [_mm256_setzero_pd(); 4];
        for r in 0..4 {
            sv[r] = _mm256_set1_pd(s[r]);
        }
        let sign = _mm256_set1_pd(-0.0);
        let (mut acc, mut abs) = ([_mm256_setzero_pd(); 4], [_mm256_setzero_pd(); 4]);
        let mut o = 0;
        while o + 4 <= n {
            let cv = _mm256_loadu_pd(cp.add(o));
            let (mut v, mut va) = ([_mm256_setzero_pd(); 4], [_mm256_setzero_pd(); 4]);
            for r in 0..4 {
                v[r] = _mm256_loadu_pd(xp[r].add(o));
                va[r] = _mm256_andnot_pd(sign, v[r]);
            }
            for r in 0..4 {
                acc[r] = _mm256_add_pd(acc[r], _mm256_mul_pd(v[r], cv));
                abs[r] = _mm256_add_pd(abs[r], va[r]);
            }
            let t01 = _mm256_add_pd(_mm256_mul_pd(sv[0], v[0]), _mm256_mul_pd(sv[1], v[1]));
            let t23 = _mm256_add_pd(_mm256_mul_pd(sv[2], v[2]), _mm256_mul_pd(sv[3], v[3]));
            let yv = _mm256_loadu_pd(yp.add(o));
            _mm256_storeu_pd(yp.add(o), _mm256_add_pd(yv, _mm256_add_pd(t01, t23)));
            let a01 = _mm256_add_pd(va[0], va[1]);
            let a23 = _mm256_add_pd(va[2], va[3]);
            let yav = _mm256_loadu_pd(yap.add(o));
            _mm256_storeu_pd(yap.add(o), _mm256_add_pd(yav, _mm256_add_pd(a01, a23)));
            o += 4;
        }
        super::resid4_tail(x, c, s, y, ya, acc.map(lanes), abs.map(lanes))
    }

    /// The four lanes of `v`, lane 0 first.
    fn lanes(v: __m256d) -> [f64; 4] {
        // SAFETY: __m256d is four f64 lanes, lane 0 at the lowest address.
        unsafe { std::mem::transmute::<__m256d, [f64; 4]>(v) }
    }
}

impl Kernels {
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    fn sweep4<const UPD: bool>(
        self,
        x: [&mut [f64]; 4],
        f: [f64; 4],
        b: &[f64],
        g: [f64; 4],
        q: &[f64],
        a: &[f64],
        s: [f64; 4],
        y: &mut [f64],
    ) -> [f64; 4] {
        let n = a.len();
        assert!(x.iter().all(|r| r.len() >= n) && y.len() >= n);
        assert!(!UPD || (b.len() >= n && q.len() >= n));
        match self {
            Kernels::Portable => sweep4_portable::<UPD>(x, f, b, g, q, a, s, y),
            // SAFETY: chosen only where the CPU has AVX2 (`detect`); lengths asserted above.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => unsafe { avx2::sweep4::<UPD>(x, f, b, g, q, a, s, y) },
        }
    }

    #[inline(always)]
    fn resid4(
        self,
        x: [&[f64]; 4],
        c: &[f64],
        s: [f64; 4],
        y: &mut [f64],
        ya: &mut [f64],
    ) -> ([f64; 4], [f64; 4]) {
        let n = c.len();
        assert!(x.iter().all(|r| r.len() >= n) && y.len() >= n && ya.len() >= n);
        match self {
            Kernels::Portable => resid4_portable(x, c, s, y, ya),
            // SAFETY: chosen only where the CPU has AVX2 (`detect`); lengths asserted above.
            #[cfg(target_arch = "x86_64")]
            Kernels::Avx2 => unsafe { avx2::resid4(x, c, s, y, ya) },
        }
    }
}

/// Applies `pending` to every row of B's packed lower triangle `inv` and returns y = B a₀ and
/// column `jn` of the updated B, gathered while its rows go by: one read and one write of each
/// stored value (one read without a change).
pub(crate) fn sweep(
    kern: Kernels,
    inv: &mut [f64],
    m: usize,
    pending: Option<&Pending>,
    a0: &[f64],
    jn: usize,
) -> (Vec<f64>, Vec<f64>) {
    let (mut y, mut col) = (vec![0.0f64; m], vec![0.0f64; m]);
    // Column jn of the (updated) row i: row jn whole, then entry jn of the rows below it.
    let gather = |i: usize, row: &[f64], col: &mut [f64]| {
        if i == jn {
            col[..=i].copy_from_slice(row);
        } else if i > jn {
            col[i] = row[jn];
        }
    };
    let blocks = m / 4 * 4;
    for i0 in (0..blocks).step_by(4) {
        let mut rows = rows4_mut(inv, i0);
        let s: [f64; 4] = a0[i0..i0 + 4].try_into().unwrap();
        let (a, yh) = (&a0[..i0], &mut y[..i0]);
        if let Some(p) = pending {
            for (r, row) in rows.iter_mut().enumerate() {
                p.set_row(i0 + r, row);
            }
        }
        let [r0, r1, r2, r3] = &mut rows;
        let x = [&mut r0[..i0], &mut r1[..i0], &mut r2[..i0], &mut r3[..i0]];
        let acc = match pending {
            Some(p) => {
                let f = p.f[i0..i0 + 4].try_into().unwrap();
                let g = p.g[i0..i0 + 4].try_into().unwrap();
                let acc = kern.sweep4::<true>(x, f, &p.b, g, &p.q, a, s, yh);
                // The corner: row i0 + r, columns i0..=i0 + r.
                for (r, row) in rows.iter_mut().enumerate() {
                    rank2(&mut row[i0..], f[r], &p.b[i0..], g[r], &p.q[i0..]);
                }
                acc
            }
            None => kern.sweep4::<false>(x, [0.0; 4], &[], [0.0; 4], &[], a, s, yh),
        };
        for (r, row) in rows.iter().enumerate() {
            let i = i0 + r;
            let mut t = acc[r];
            for l in i0..i {
                t += row[l] * a0[l];
                y[l] += a0[i] * row[l];
            }
            y[i] += t + row[i] * a0[i];
            gather(i, row, &mut col);
        }
    }
    for i in blocks..m {
        let row = &mut inv[tri(i)..tri(i + 1)];
        if let Some(p) = pending {
            p.apply_row(i, row);
        }
        for l in 0..i {
            y[i] += row[l] * a0[l];
            y[l] += a0[i] * row[l];
        }
        y[i] += row[i] * a0[i];
        gather(i, row, &mut col);
    }
    (y, col)
}

/// (‖A c − e_j‖∞, ‖A‖∞) for A = K + shift·I, from K's packed lower triangle `k`: one read of
/// it, rows four at a time as in [`sweep`].
pub(crate) fn residual(
    kern: Kernels,
    k: &[f64],
    m: usize,
    shift: f64,
    j: usize,
    c: &[f64],
) -> (f64, f64) {
    let (mut r, mut ra) = (vec![0.0f64; m], vec![0.0f64; m]);
    let blocks = m / 4 * 4;
    for i0 in (0..blocks).step_by(4) {
        let rows: [&[f64]; 4] = std::array::from_fn(|q| &k[tri(i0 + q)..tri(i0 + q + 1)]);
        let s: [f64; 4] = c[i0..i0 + 4].try_into().unwrap();
        let heads = rows.map(|row| &row[..i0]);
        let (t, u) = kern.resid4(heads, &c[..i0], s, &mut r[..i0], &mut ra[..i0]);
        for (q, row) in rows.iter().enumerate() {
            let i = i0 + q;
            let (mut t, mut u) = (t[q], u[q]);
            for l in i0..i {
                t += row[l] * c[l];
                u += row[l].abs();
                r[l] += c[i] * row[l];
                ra[l] += row[l].abs();
            }
            r[i] += t + row[i] * c[i];
            ra[i] += u + row[i].abs();
        }
    }
    for i in blocks..m {
        let row = &k[tri(i)..tri(i + 1)];
        for l in 0..i {
            r[i] += row[l] * c[l];
            ra[i] += row[l].abs();
            r[l] += c[i] * row[l];
            ra[l] += row[l].abs();
        }
        r[i] += row[i] * c[i];
        ra[i] += row[i].abs();
    }
    let (mut r_max, mut a_norm) = (0.0f64, 0.0f64);
    for i in 0..m {
        let ri = r[i] + shift * c[i] - if i == j { 1.0 } else { 0.0 };
        // K_ii ≥ 0 and shift > 0: |A_ii| = |K_ii| + shift.
        r_max = r_max.max(ri.abs());
        a_norm = a_norm.max(ra[i] + shift);
    }
    (r_max, a_norm)
}

#[cfg(test)]
mod tests {
    use super::super::packed::{pack, unpack};
    use super::*;
    use crate::rng::SeededRng;

    fn kernels() -> Vec<Kernels> {
        let mut k = vec![Kernels::Portable];
        if Kernels::detect() != Kernels::Portable {
            k.push(Kernels::detect());
        }
        k
    }

    fn symmetric(rng: &mut SeededRng, m: usize) -> Vec<f64> {
        let mut full = rng.normal_vec(m * m, 0.0, 1.0);
        for i in 0..m {
            for l in 0..i {
                full[l * m + i] = full[i * m + l];
            }
        }
        full
    }

    #[test]
    fn the_sweep_is_the_pending_change_then_the_product() {
        // Sizes around the four-row blocks and the kernels' 4-column lanes; the changed column
        // j and the gathered column jn at the start, the end and inside a block.
        for m in [1, 2, 3, 4, 5, 7, 8, 9, 13, 33] {
            for (j, jn) in [(0, m - 1), (m - 1, 0), (m / 2, m / 3)] {
                let mut rng = SeededRng::new(m as u64);
                let full = symmetric(&mut rng, m);
                let a = rng.normal_vec(m, 0.0, 1.0);
                let mut p = Pending {
                    j,
                    c: rng.normal_vec(m, 0.0, 1.0),
                    b: rng.normal_vec(m, 0.0, 1.0),
                    f: rng.normal_vec(m, 0.0, 1.0),
                    q: rng.normal_vec(m, 0.0, 1.0),
                    g: rng.normal_vec(m, 0.0, 1.0),
                };
                (p.b[j], p.q[j]) = (0.0, 0.0);
                (p.f[j], p.g[j]) = (0.0, 0.0);
                // By hand: row and column j = c; elsewhere B_il − f_i b_l + g_i q_l; mirrored.
                let mut want_b = full.clone();
                for i in 0..m {
                    for l in 0..=i {
                        let v = if i == j {
                            p.c[l]
                        } else if l == j {
                            p.c[i]
                        } else {
                            (full[i * m + l] - p.f[i] * p.b[l]) + p.g[i] * p.q[l]
                        };
                        want_b[i * m + l] = v;
                        want_b[l * m + i] = v;
                    }
                }
                let want_y: Vec<f64> = (0..m)
                    .map(|i| (0..m).map(|l| want_b[i * m + l] * a[l]).sum())
                    .collect();
                let want_col: Vec<f64> = (0..m).map(|i| want_b[i * m + jn]).collect();
                let mut bits = vec![];
                for kern in kernels() {
                    let tag = format!("m = {m}, j = {j}, jn = {jn}, {kern:?}");
                    let mut inv = pack(&full, m);
                    let (y, col) = sweep(kern, &mut inv, m, Some(&p), &a, jn);
                    assert_eq!(unpack(&inv, m), want_b, "{tag}: B'");
                    assert_eq!(col, want_col, "{tag}: column jn");
                    let e = y
                        .iter()
                        .zip(&want_y)
                        .map(|(u, v)| (u - v).abs())
                        .fold(0.0, f64::max);
                    assert!(e <= 1e-12 * m as f64, "{tag}: y off by {e:e}");
                    // Without a change: the same product of the same matrix, to the bit.
                    let (y2, col2) = sweep(kern, &mut inv, m, None, &a, jn);
                    assert_eq!((&y, &col), (&y2, &col2), "{tag}: with and without a change");
                    bits.push(y);
                }
                assert!(
                    bits.windows(2).all(|w| w[0] == w[1]),
                    "m = {m}: kernels differ"
                );
            }
        }
    }

    #[test]
    fn the_residual_is_a_c_minus_e_j_and_the_row_norm() {
        for m in [1, 3, 4, 6, 9, 17] {
            let mut rng = SeededRng::new(100 + m as u64);
            let full = symmetric(&mut rng, m);
            let c = rng.normal_vec(m, 0.0, 1.0);
            let (shift, j) = (0.25, m / 2);
            let mut want_r = 0.0f64;
            let mut want_a = 0.0f64;
            for i in 0..m {
                let mut s: f64 = (0..m).map(|l| full[i * m + l] * c[l]).sum();
                s += shift * c[i] - if i == j { 1.0 } else { 0.0 };
                want_r = want_r.max(s.abs());
                let row: f64 = (0..m).map(|l| full[i * m + l].abs()).sum::<f64>();
                // K's diagonal here may be negative; the solver's never is (a Gram matrix).
                want_a = want_a.max(row + shift);
            }
            let k = pack(&full, m);
            let mut got = vec![];
            for kern in kernels() {
                let (r, a) = residual(kern, &k, m, shift, j, &c);
                assert!(
                    (r - want_r).abs() <= 1e-13 * m as f64,
                    "m = {m}: {r} vs {want_r}"
                );
                assert!(
                    (a - want_a).abs() <= 1e-13 * m as f64,
                    "m = {m}: {a} vs {want_a}"
                );
                got.push((r.to_bits(), a.to_bits()));
            }
            assert!(
                got.windows(2).all(|w| w[0] == w[1]),
                "m = {m}: kernels differ"
            );
        }
    }
}
