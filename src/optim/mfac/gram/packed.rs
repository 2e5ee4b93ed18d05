//! Packed triangles (B and K are symmetric: only the lower triangle is stored, row after row)
//! and the small f64 vector loops the m×m side is built of.

// Dense linear algebra on index pairs reads best with explicit indices.
#![allow(clippy::needless_range_loop)]

/// Offset of row i in a packed lower triangle (row i holds columns 0..=i).
///
/// ```text
/// row 0: [0]   row 1: [1 2]   row 2: [3 4 5]   ...   tri(m) = m(m+1)/2 values in all
/// ```
#[inline(always)]
pub(crate) fn tri(i: usize) -> usize {
    i * (i + 1) / 2
}

/// Offset of row c in a packed upper triangle of order m (row c holds columns c..m).
#[inline(always)]
pub(crate) fn upper(m: usize, c: usize) -> usize {
    c * m - c * c.saturating_sub(1) / 2
}

/// Rows i0..i0+4 of a packed lower triangle, each as its own mutable slice.
#[inline(always)]
pub(crate) fn rows4_mut(p: &mut [f64], i0: usize) -> [&mut [f64]; 4] {
    rows4_at(&mut p[tri(i0)..], i0)
}

/// Rows i0..i0+4 of a packed lower triangle from `block`, which starts at row i0.
#[inline(always)]
pub(crate) fn rows4_at(block: &mut [f64], i0: usize) -> [&mut [f64]; 4] {
    let (r0, rest) = block.split_at_mut(i0 + 1);
    let (r1, rest) = rest.split_at_mut(i0 + 2);
    let (r2, rest) = rest.split_at_mut(i0 + 3);
    [r0, r1, r2, &mut rest[..i0 + 4]]
}

/// Column j of the symmetric matrix whose packed lower triangle is `p`.
pub(crate) fn column(p: &[f64], m: usize, j: usize) -> Vec<f64> {
    let mut c = p[tri(j)..tri(j + 1)].to_vec();
    c.extend((j + 1..m).map(|i| p[tri(i) + j]));
    c
}

/// Sets row and column j of the symmetric matrix whose packed lower triangle is `p` to `v`.
pub(crate) fn set_column(p: &mut [f64], m: usize, j: usize, v: &[f64]) {
    p[tri(j)..tri(j + 1)].copy_from_slice(&v[..j + 1]);
    for i in j + 1..m {
        p[tri(i) + j] = v[i];
    }
}

/// The full m×m row-major matrix of a packed lower triangle (mirrored).
pub(crate) fn unpack(p: &[f64], m: usize) -> Vec<f64> {
    let mut f = vec![0.0f64; m * m];
    for i in 0..m {
        for l in 0..=i {
            let v = p[tri(i) + l];
            f[i * m + l] = v;
            f[l * m + i] = v;
        }
    }
    f
}

/// The packed lower triangle of a full m×m row-major matrix (its lower part is read).
pub(crate) fn pack(full: &[f64], m: usize) -> Vec<f64> {
    let mut p = Vec::with_capacity(tri(m));
    for i in 0..m {
        p.extend_from_slice(&full[i * m..i * m + i + 1]);
    }
    p
}

/// `x ← (x − f·b) + g·q` elementwise: a symmetric rank-2 change applied to one row. The same
/// expression wherever a change is applied, so a flushed copy equals what a sweep computes.
#[inline(always)]
pub(crate) fn rank2(x: &mut [f64], f: f64, b: &[f64], g: f64, q: &[f64]) {
    let (b, q) = (&b[..x.len()], &q[..x.len()]);
    for ((x, b), q) in x.iter_mut().zip(b).zip(q) {
        *x = (*x - f * b) + g * q;
    }
}

/// The 8 lanes' sum, in a fixed order.
#[inline(always)]
fn lanes_sum(v: [f64; 8]) -> f64 {
    ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]))
}

/// Σ x·y in 8 interleaved lanes (a single running sum would be one long dependency chain).
#[inline(always)]
pub(crate) fn dot(x: &[f64], y: &[f64]) -> f64 {
    let y = &y[..x.len()];
    let mut acc = [0.0f64; 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (xv, yv) in xc.zip(yc) {
        for k in 0..8 {
            acc[k] += xv[k] * yv[k];
        }
    }
    let mut s = lanes_sum(acc);
    for (a, b) in xr.iter().zip(yr) {
        s += a * b;
    }
    s
}

/// ⟨x_r, v⟩ for four rows at once (one load of v for four rows; the rebuild's loops are bound by
/// the rows they stream, not by arithmetic). Columns 4k..4k+4 go to lanes 0..4 of each row's
/// sum, the lanes are added as (0 + 1) + (2 + 3), then the last n mod 4 columns one by one;
/// the AVX2 version does the same operations in the same order (same bits).
#[inline(always)]
pub(crate) fn dot4(x: [&[f64]; 4], v: &[f64]) -> [f64; 4] {
    let n = v.len();
    assert!(x.iter().all(|r| r.len() >= n));
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2; every row holds at least n values (asserted).
        return unsafe { avx2::dot4(x, v) };
    }
    let mut acc = [[0.0f64; 4]; 4];
    for o in (0..n / 4 * 4).step_by(4) {
        for k in 0..4 {
            for r in 0..4 {
                acc[r][k] += x[r][o + k] * v[o + k];
            }
        }
    }
    dot4_tail(x, v, acc)
}

/// The lanes' sums and the last n mod 4 columns of [`dot4`].
#[inline(always)]
fn dot4_tail(x: [&[f64]; 4], v: &[f64], acc: [[f64; 4]; 4]) -> [f64; 4] {
    let n = v.len();
    let mut out = acc.map(|a| (a[0] + a[1]) + (a[2] + a[3]));
    for o in n / 4 * 4..n {
        for r in 0..4 {
            out[r] += x[r][o] * v[o];
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// As the portable `dot4`. SAFETY (caller): the CPU has AVX2; rows hold ≥ `v.len()` values.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn dot4(x: [&[f64]; 4], v: &[f64]) -> [f64; 4] {
        let n = v.len();
        let xp: [*const f64; 4] = x.map(|r| r.as_ptr());
        let vp = v.as_ptr();
        let mut acc = [_mm256_setzero_pd(); 4];
        let mut o = 0;
        while o + 4 <= n {
            let vv = _mm256_loadu_pd(vp.add(o));
            for r in 0..4 {
                acc[r] = _mm256_add_pd(acc[r], _mm256_mul_pd(_mm256_loadu_pd(xp[r].add(o)), vv));
            }
            o += 4;
        }
        // SAFETY: __m256d is four f64 lanes, lane 0 at the lowest address.
        let acc = acc.map(|a| unsafe { std::mem::transmute::<__m256d, [f64; 4]>(a) });
        super::dot4_tail(x, v, acc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_layouts_round_trip() {
        let m = 7;
        let mut full = vec![0.0; m * m];
        for i in 0..m {
            for l in 0..=i {
                let v = (10 * i + l) as f64;
                full[i * m + l] = v;
                full[l * m + i] = v;
            }
        }
        let p = pack(&full, m);
        assert_eq!(p.len(), tri(m));
        assert_eq!(unpack(&p, m), full);
        for j in 0..m {
            assert_eq!(column(&p, m, j), full[j * m..(j + 1) * m].to_vec());
        }
        let mut q = p.clone();
        let v: Vec<f64> = (0..m).map(|i| -(i as f64)).collect();
        set_column(&mut q, m, 3, &v);
        assert_eq!(column(&q, m, 3), v);
        assert_eq!(column(&q, m, 4)[5], full[4 * m + 5]);
        // Upper rows: row c holds m − c values, one after the other.
        assert_eq!(
            (0..=m).map(|c| upper(m, c)).collect::<Vec<_>>(),
            [0, 7, 13, 18, 22, 25, 27, 28]
        );
    }

    #[test]
    fn dot4_is_four_dots_with_the_same_bits_on_every_path() {
        let mut rng = crate::rng::SeededRng::new(3);
        for n in [0, 1, 3, 4, 5, 8, 13, 100] {
            let rows: Vec<Vec<f64>> = (0..4).map(|_| rng.normal_vec(n + 2, 0.0, 1.0)).collect();
            let v = rng.normal_vec(n, 0.0, 1.0);
            let x = [&rows[0][..], &rows[1][..], &rows[2][..], &rows[3][..]];
            let got = dot4(x, &v);
            // The portable loop, written out.
            let mut acc = [[0.0f64; 4]; 4];
            for o in (0..n / 4 * 4).step_by(4) {
                for k in 0..4 {
                    for r in 0..4 {
                        acc[r][k] += x[r][o + k] * v[o + k];
                    }
                }
            }
            assert_eq!(got, dot4_tail(x, &v, acc), "n = {n}");
            for r in 0..4 {
                let plain: f64 = (0..n).map(|k| x[r][k] * v[k]).sum();
                assert!(
                    (got[r] - plain).abs() <= 1e-13 * (n as f64 + 1.0),
                    "n = {n}"
                );
            }
        }
    }
}
