//! The m×m side of M-FAC, in f64: the Gram matrix K = G Gᵀ, A = mλ·I + K, and A⁻¹ kept up to
//! date in O(m²) per step when one row/column of K is replaced, with a residual check and a
//! periodic from-scratch refresh (Cholesky, O(m³), once every m steps: O(m²) amortised).

// Dense linear algebra on index pairs reads best with explicit indices.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

/// From this size on, the row loops of an update and the columns of a refresh run on rayon's
/// pool. Rows (columns) are independent and each is computed exactly as in the sequential loop,
/// so the results are the same bits either way; below this size the pool costs more than it
/// saves. (At m = 1024 a sequential update took 6–13 ms and a refresh 6 s on our CPU: more
/// than a whole M-FAC step on an H200.)
const PARALLEL_FROM: usize = 256;

/// Runs `f(i, row_i)` for every row of the m×m row-major `b`, in parallel for large m.
fn for_rows(b: &mut [f64], m: usize, f: impl Fn(usize, &mut [f64]) + Sync) {
    if m >= PARALLEL_FROM {
        b.par_chunks_mut(m).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        b.chunks_mut(m).enumerate().for_each(|(i, r)| f(i, r));
    }
}

/// `f(i)` for i in 0..m, collected in order, in parallel for large m.
fn map_rows<T: Send>(m: usize, f: impl Fn(usize) -> T + Sync + Send) -> Vec<T> {
    if m >= PARALLEL_FROM {
        (0..m).into_par_iter().map(f).collect()
    } else {
        (0..m).map(f).collect()
    }
}

/// `A = mλ·I + K` and its inverse, both m×m row-major f64.
#[derive(Debug, Clone)]
pub(crate) struct GramSolver {
    m: usize,
    /// mλ, added to the diagonal.
    shift: f64,
    /// K = G Gᵀ.
    pub k: Vec<f64>,
    /// A⁻¹.
    pub(crate) inv: Vec<f64>,
    /// Updates since the last refresh.
    pub(crate) since_refresh: usize,
    /// How many full refreshes happened (introspection).
    pub refreshes: usize,
}

/// Backward error above which the O(m²) solution is replaced by a from-scratch solve.
/// A backward-stable solve of an m×m system gives ~m·ε ≈ 1e-13 at m = 1024.
const RESIDUAL_TOL: f64 = 1e-11;

impl GramSolver {
    pub fn new(m: usize, damp: f64) -> Self {
        let shift = m as f64 * damp;
        let mut inv = vec![0.0; m * m];
        for i in 0..m {
            inv[i * m + i] = 1.0 / shift;
        }
        GramSolver {
            m,
            shift,
            k: vec![0.0; m * m],
            inv,
            since_refresh: 0,
            refreshes: 0,
        }
    }

    fn a(&self, i: usize, j: usize) -> f64 {
        self.k[i * self.m + j] + if i == j { self.shift } else { 0.0 }
    }

    /// Replaces row and column `j` of K with `row` (= G g after writing g into slot j) and
    /// returns c = A⁻¹ e_j.
    pub fn replace(&mut self, j: usize, row: &[f64]) -> Vec<f64> {
        let m = self.m;
        for i in 0..m {
            self.k[j * m + i] = row[i];
            self.k[i * m + j] = row[i];
        }
        self.since_refresh += 1;
        if self.since_refresh >= m {
            self.refresh();
        } else {
            self.update_inverse(j);
        }
        let mut c: Vec<f64> = (0..m).map(|i| self.inv[i * m + j]).collect();
        if self.backward_error(j, &c) > RESIDUAL_TOL {
            self.refresh();
            c = (0..m).map(|i| self.inv[i * m + j]).collect();
        }
        c
    }

    /// A⁻¹ after row/column j of A changed, from the old inverse: first the inverse of A with
    /// index j removed (Schur downdate), then index j added back with its new row (bordering).
    fn update_inverse(&mut self, j: usize) {
        let m = self.m;
        let b = &mut self.inv;
        // 1. C = B₋ⱼ₋ⱼ − B₋ⱼ,ⱼ Bⱼ,₋ⱼ / Bⱼⱼ  (the inverse of A without index j), in place.
        let bjj = b[j * m + j];
        let col: Vec<f64> = (0..m).map(|i| b[i * m + j]).collect();
        for_rows(b, m, |i, row| {
            if i == j {
                return;
            }
            let f = col[i] / bjj;
            for (l, x) in row.iter_mut().enumerate() {
                *x -= f * col[l];
            }
        });
        // 2. Bordering with the new column a = A[:, j]: Cb = C·a₋ⱼ, s = aⱼⱼ − a₋ⱼᵀ C a₋ⱼ.
        let a: Vec<f64> = (0..m)
            .map(|i| if i == j { 0.0 } else { self.k[i * m + j] })
            .collect();
        let ajj = self.k[j * m + j] + self.shift;
        let cb: Vec<f64> = map_rows(m, |i| {
            if i == j {
                return 0.0;
            }
            let row = &b[i * m..(i + 1) * m];
            let mut s = 0.0;
            for l in 0..m {
                if l != j {
                    s += row[l] * a[l];
                }
            }
            s
        });
        let s = ajj
            - (0..m)
                .filter(|&i| i != j)
                .map(|i| a[i] * cb[i])
                .sum::<f64>();
        if s.is_nan() || s <= 0.0 {
            // Lost positive definiteness to rounding: start over from scratch.
            self.refresh();
            return;
        }
        for_rows(b, m, |i, row| {
            if i == j {
                return;
            }
            let fi = cb[i] / s;
            for l in 0..m {
                if l != j {
                    row[l] += fi * cb[l];
                }
            }
            row[j] = -fi;
        });
        for l in 0..m {
            b[j * m + l] = if l == j { 1.0 / s } else { -cb[l] / s };
        }
    }

    /// ‖A c − e_j‖∞ / (‖A‖∞ ‖c‖∞): the normwise backward error of c as a solution.
    fn backward_error(&self, j: usize, c: &[f64]) -> f64 {
        let m = self.m;
        let (mut r_max, mut a_norm) = (0.0f64, 0.0f64);
        // Per row in parallel (same sums in the same order); max is exact in any order.
        let per_row = map_rows(m, |i| {
            let (mut s, mut row_abs) = (0.0, 0.0);
            for l in 0..m {
                let a = self.a(i, l);
                s += a * c[l];
                row_abs += a.abs();
            }
            if i == j {
                s -= 1.0;
            }
            (s, row_abs)
        });
        for (s, row_abs) in per_row {
            r_max = r_max.max(s.abs());
            a_norm = a_norm.max(row_abs);
        }
        let c_norm = c.iter().fold(0.0f64, |x, y| x.max(y.abs()));
        let e = r_max / (a_norm * c_norm);
        if e.is_finite() {
            e
        } else {
            f64::INFINITY
        }
    }

    /// Recomputes A⁻¹ from scratch (Cholesky).
    pub fn refresh(&mut self) {
        self.inv = self.inverse_from_scratch();
        self.since_refresh = 0;
        self.refreshes += 1;
    }

    /// A⁻¹ by Cholesky factorisation, O(m³).
    pub fn inverse_from_scratch(&self) -> Vec<f64> {
        let m = self.m;
        let l = self.cholesky();
        // Solve A X = I column by column: L y = e_c, Lᵀ x = y (columns are independent).
        let columns: Vec<Vec<f64>> = map_rows(m, |c| {
            let mut y = vec![0.0; m];
            for i in 0..m {
                let mut s = if i == c { 1.0 } else { 0.0 };
                for k in 0..i {
                    s -= l[i * m + k] * y[k];
                }
                y[i] = s / l[i * m + i];
            }
            let mut x = vec![0.0; m];
            for i in (0..m).rev() {
                let mut s = y[i];
                for k in i + 1..m {
                    s -= l[k * m + i] * x[k];
                }
                x[i] = s / l[i * m + i];
            }
            x
        });
        let mut inv = vec![0.0; m * m];
        for (c, x) in columns.iter().enumerate() {
            for (i, v) in x.iter().enumerate() {
                inv[i * m + c] = *v;
            }
        }
        inv
    }

    /// c = A⁻¹ e_j solved from scratch (for checks and introspection).
    pub fn solve_from_scratch(&self, j: usize) -> Vec<f64> {
        let m = self.m;
        let l = self.cholesky();
        let mut y = vec![0.0; m];
        for i in 0..m {
            let mut s = if i == j { 1.0 } else { 0.0 };
            for k in 0..i {
                s -= l[i * m + k] * y[k];
            }
            y[i] = s / l[i * m + i];
        }
        let mut x = vec![0.0; m];
        for i in (0..m).rev() {
            let mut s = y[i];
            for k in i + 1..m {
                s -= l[k * m + i] * x[k];
            }
            x[i] = s / l[i * m + i];
        }
        x
    }

    /// Lower Cholesky factor of A (row-major). A is SPD: K is a Gram matrix and mλ > 0.
    fn cholesky(&self) -> Vec<f64> {
        let m = self.m;
        let mut l = vec![0.0; m * m];
        for i in 0..m {
            for j in 0..=i {
                let mut s = self.a(i, j);
                let (ri, rj) = (&l[i * m..i * m + j], &l[j * m..j * m + j]);
                for k in 0..j {
                    s -= ri[k] * rj[k];
                }
                if i == j {
                    // Rounding can only make a tiny pivot non-positive; keep it at the damping.
                    l[i * m + i] = if s > 0.0 { s.sqrt() } else { self.shift.sqrt() };
                } else {
                    l[i * m + j] = s / l[j * m + j];
                }
            }
        }
        l
    }
}
