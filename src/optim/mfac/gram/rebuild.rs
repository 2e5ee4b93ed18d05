//! A⁻¹ from scratch, O(m³), for the periodic rebuild and the guard's repairs: A = L Lᵀ
//! (Cholesky), W = L⁻¹ column by column (forward solves), A⁻¹ = Wᵀ W. Every entry is one
//! contiguous dot product of rows that are already final, so each can be computed on any
//! thread with the same bits; the last two stages are independent per column / row and run on
//! rayon's pool for large m.

// Dense linear algebra on index pairs reads best with explicit indices.
#![allow(clippy::needless_range_loop)]

use rayon::prelude::*;

use super::packed::{dot, dot4, rows4_at, tri, upper};

/// From this size on, the independent columns and rows run on rayon's pool.
const PARALLEL_FROM: usize = 128;

/// The lower Cholesky factor of A = K + shift·I, both packed lower triangles, row by row:
/// L_ij = (A_ij − ⟨L_i[..j], L_j[..j]⟩) / L_jj. Rows go four at a time, so each finished row j
/// is streamed once per four rows ([`dot4`]). A is SPD (K is a Gram matrix, shift > 0); a pivot
/// that rounding makes non-positive is set to √shift.
pub(crate) fn cholesky(k: &[f64], m: usize, shift: f64) -> Vec<f64> {
    let mut l = vec![0.0f64; tri(m)];
    let blocks = m / 4 * 4;
    for i0 in (0..blocks).step_by(4) {
        let (done, rest) = l.split_at_mut(tri(i0));
        let mut rows = rows4_at(rest, i0);
        for j in 0..i0 {
            let rj = &done[tri(j)..tri(j + 1)];
            let d = dot4(rows.each_ref().map(|r| &r[..j]), &rj[..j]);
            for r in 0..4 {
                rows[r][j] = (k[tri(i0 + r) + j] - d[r]) / rj[j];
            }
        }
        // The corner: rows i0..i0+4 against each other.
        for r in 0..4 {
            let (lo, hi) = rows.split_at_mut(r);
            let ri = &mut hi[0];
            let i = i0 + r;
            for (q, rj) in lo.iter().enumerate() {
                let j = i0 + q;
                ri[j] = (k[tri(i) + j] - dot(&ri[..j], &rj[..j])) / rj[j];
            }
            ri[i] = pivot(k[tri(i) + i] + shift - dot(&ri[..i], &ri[..i]), shift);
        }
    }
    for i in blocks..m {
        let (done, rest) = l.split_at_mut(tri(i));
        let ri = &mut rest[..i + 1];
        for j in 0..i {
            let rj = &done[tri(j)..tri(j + 1)];
            ri[j] = (k[tri(i) + j] - dot(&ri[..j], &rj[..j])) / rj[j];
        }
        ri[i] = pivot(k[tri(i) + i] + shift - dot(&ri[..i], &ri[..i]), shift);
    }
    l
}

/// √s, or √shift where rounding made the pivot s non-positive.
fn pivot(s: f64, shift: f64) -> f64 {
    if s > 0.0 {
        s.sqrt()
    } else {
        shift.sqrt()
    }
}

/// Entries c..m of w = L⁻¹ e_c (the ones before c are zero) for the packed lower factor `l`, by
/// forward substitution: w_k = (δ_kc − ⟨L_k[c..k], w[c..k]⟩) / L_kk. `w[0]` is entry c.
fn forward_unit(l: &[f64], m: usize, c: usize, w: &mut [f64]) {
    for k in c..m {
        let rk = &l[tri(k)..tri(k + 1)];
        let e = if k == c { 1.0 } else { 0.0 };
        w[k - c] = (e - dot(&rk[c..k], &w[..k - c])) / rk[k];
    }
}

/// [`forward_unit`] for columns c0..c0+4 at once (`w[r]` holds entries c0+r..m): each row of L
/// is streamed once per four columns. The sums over the columns the four share (from c0+3 on)
/// go through [`dot4`]; the first few terms of each are added after them.
fn forward_unit4(l: &[f64], m: usize, c0: usize, w: &mut [&mut [f64]]) {
    for k in c0..m {
        let rk = &l[tri(k)..tri(k + 1)];
        let shared = if k > c0 + 3 {
            let x: [&[f64]; 4] = std::array::from_fn(|r| &w[r][3 - r..k - c0 - r]);
            dot4(x, &rk[c0 + 3..k])
        } else {
            [0.0; 4]
        };
        for r in 0..4 {
            let c = c0 + r;
            if k < c {
                continue;
            }
            let head_end = k.min(c0 + 3);
            let mut s = shared[r];
            for t in c..head_end {
                s += rk[t] * w[r][t - c];
            }
            let e = if k == c { 1.0 } else { 0.0 };
            w[r][k - c] = (e - s) / rk[k];
        }
    }
}

/// Rows i0..i0+4 of B = Wᵀ W (their lower parts, `out[r]` = row i0+r) from `wt` = Wᵀ as a
/// packed upper triangle (row c = column c of W from entry c on):
/// B_il = Σ_{k≥i} W_ki W_kl = ⟨wt_i[i..], wt_l[i..]⟩, l ≤ i. For l ≤ i0 the four rows share
/// wt_l's stream (the sums from k = i0+3 on through [`dot4`], the first terms after them).
fn gram_rows4(wt: &[f64], m: usize, i0: usize, out: &mut [&mut [f64]]) {
    let row = |c: usize| &wt[upper(m, c)..upper(m, c + 1)];
    let x: [&[f64]; 4] = std::array::from_fn(|r| &row(i0 + r)[3 - r..]);
    for l in 0..=i0 {
        let wl = row(l);
        let d = dot4(x, &wl[i0 + 3 - l..]);
        for r in 0..4 {
            let i = i0 + r;
            let wi = row(i);
            let mut s = d[r];
            for t in i..(i0 + 3) {
                s += wi[t - i] * wl[t - l];
            }
            out[r][l] = s;
        }
    }
    // The corner: l in i0+1..=i.
    for r in 1..4 {
        let i = i0 + r;
        for l in i0 + 1..=i {
            out[r][l] = dot(row(i), &row(l)[i - l..]);
        }
    }
}

/// Row i of B = Wᵀ W (as [`gram_rows4`], one row).
fn gram_row(wt: &[f64], m: usize, i: usize, out: &mut [f64]) {
    let wi = &wt[upper(m, i)..upper(m, i + 1)];
    for (l, o) in out.iter_mut().enumerate() {
        let a = upper(m, l) + (i - l);
        *o = dot(wi, &wt[a..a + (m - i)]);
    }
}

/// Splits a packed triangle into its rows, of the given lengths.
fn rows_mut(mut p: &mut [f64], lens: impl Iterator<Item = usize>) -> Vec<&mut [f64]> {
    lens.map(|n| {
        let (row, rest) = std::mem::take(&mut p).split_at_mut(n);
        p = rest;
        row
    })
    .collect()
}

/// Runs `f(first, rows)` on groups of four rows (the last group may be shorter), on rayon's
/// pool for large m.
fn each_group(rows: &mut [&mut [f64]], m: usize, f: impl Fn(usize, &mut [&mut [f64]]) + Sync) {
    if m >= PARALLEL_FROM {
        rows.par_chunks_mut(4)
            .enumerate()
            .for_each(|(g, r)| f(4 * g, r));
    } else {
        rows.chunks_mut(4)
            .enumerate()
            .for_each(|(g, r)| f(4 * g, r));
    }
}

/// A⁻¹ for A = K + shift·I (`k` and the result packed lower triangles).
pub(crate) fn inverse(k: &[f64], m: usize, shift: f64) -> Vec<f64> {
    let l = cholesky(k, m, shift);
    let mut wt = vec![0.0f64; tri(m)];
    each_group(&mut rows_mut(&mut wt, (0..m).map(|c| m - c)), m, |c0, w| {
        if w.len() == 4 {
            forward_unit4(&l, m, c0, w);
        } else {
            for (r, wr) in w.iter_mut().enumerate() {
                forward_unit(&l, m, c0 + r, wr);
            }
        }
    });
    let mut inv = vec![0.0f64; tri(m)];
    each_group(
        &mut rows_mut(&mut inv, (0..m).map(|i| i + 1)),
        m,
        |i0, o| {
            if o.len() == 4 {
                gram_rows4(&wt, m, i0, o);
            } else {
                for (r, or) in o.iter_mut().enumerate() {
                    gram_row(&wt, m, i0 + r, or);
                }
            }
        },
    );
    inv
}

/// x = A⁻¹ e_j for A = K + shift·I: Cholesky, L w = e_j, Lᵀ x = w (for checks).
pub(crate) fn solve_unit(k: &[f64], m: usize, shift: f64, j: usize) -> Vec<f64> {
    let l = cholesky(k, m, shift);
    let mut x = vec![0.0f64; m];
    forward_unit(&l, m, j, &mut x[j..]);
    // Lᵀ x = w, by columns of Lᵀ (= rows of L, contiguous).
    for k in (0..m).rev() {
        x[k] /= l[tri(k) + k];
        let xk = x[k];
        for (xq, lq) in x[..k].iter_mut().zip(&l[tri(k)..tri(k) + k]) {
            *xq -= lq * xk;
        }
    }
    x
}

#[cfg(test)]
mod tests {
    use super::super::packed::{pack, unpack};
    use super::*;
    use crate::rng::SeededRng;

    /// K = G Gᵀ for n random rows of length d (rank min(n, d)).
    fn gram(rng: &mut SeededRng, m: usize, d: usize) -> Vec<f64> {
        let g = rng.normal_vec(m * d, 0.0, 1.0);
        let mut k = vec![0.0; m * m];
        for i in 0..m {
            for l in 0..m {
                k[i * m + l] = (0..d).map(|t| g[i * d + t] * g[l * d + t]).sum();
            }
        }
        k
    }

    #[test]
    fn the_inverse_times_a_is_the_identity() {
        // Around the pool's threshold, full rank and rank-deficient (d < m: A = K + shift·I
        // is then as ill-conditioned as the shift makes it).
        for (m, d, shift) in [(1, 3, 1e-3), (5, 9, 1e-3), (40, 13, 1e-2), (130, 200, 1.0)] {
            let mut rng = SeededRng::new(m as u64);
            let k = gram(&mut rng, m, d);
            let inv = unpack(&inverse(&pack(&k, m), m, shift), m);
            let mut worst = 0.0f64;
            for i in 0..m {
                for l in 0..m {
                    let mut s: f64 = (0..m).map(|t| k[i * m + t] * inv[t * m + l]).sum();
                    s += shift * inv[i * m + l] - if i == l { 1.0 } else { 0.0 };
                    worst = worst.max(s.abs());
                }
            }
            let a_norm = (0..m)
                .map(|i| (0..m).map(|l| k[i * m + l].abs()).sum::<f64>() + shift)
                .fold(0.0, f64::max);
            let inv_norm = (0..m)
                .map(|i| (0..m).map(|l| inv[i * m + l].abs()).sum::<f64>())
                .fold(0.0, f64::max);
            // A backward-stable inverse: ‖A X − I‖ ≲ m·ε·‖A‖‖X‖.
            let e = worst / (a_norm * inv_norm);
            assert!(e <= 1e-14 * m as f64, "m = {m}: {e:e}");
            // One column by the direct solve.
            let j = m / 2;
            let x = solve_unit(&pack(&k, m), m, shift, j);
            let col: Vec<f64> = (0..m).map(|i| inv[i * m + j]).collect();
            let rel = x
                .iter()
                .zip(&col)
                .map(|(a, b)| (a - b).powi(2))
                .sum::<f64>()
                .sqrt()
                / col.iter().map(|b| b * b).sum::<f64>().sqrt();
            assert!(rel <= 1e-9, "m = {m}: column {j} off by {rel:e}");
        }
    }
}
