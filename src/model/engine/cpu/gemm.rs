//! Matrix products on strided views of plain slices (gemm called directly), and the linear
//! layer both ways.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::model::engine::cpu::buf::Buf;
use crate::model::math::{col_sum, task_rows, Real};

/// A strided matrix inside a slice: element (i, j) is at `off + i·rs + j·cs`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct View {
    pub(crate) off: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl View {
    /// Row-major `rows × cols` with row stride `rs`, starting at `off`.
    pub(crate) fn rows(off: usize, rows: usize, cols: usize, rs: usize) -> Self {
        View {
            off,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose (same memory).
    pub(crate) fn t(self) -> Self {
        View {
            off: self.off,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// One past the last element touched.
    pub(crate) fn end(&self) -> usize {
        if self.rows == 0 || self.cols == 0 {
            self.off
        } else {
            self.off + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        }
    }
}

/// `dst = a · b`, or `dst += a · b` with `acc`. Bounds are checked, so the unsafe call only sees
/// memory inside the slices.
#[allow(clippy::too_many_arguments)] // three (slice, view) pairs: the call sites read as `dst = a · b`
pub(crate) fn matmul<T: Real>(
    dst: &mut [T],
    dv: View,
    acc: bool,
    a: &[T],
    av: View,
    b: &[T],
    bv: View,
    par: Parallelism,
) {
    let (m, n, k) = (dv.rows, dv.cols, av.cols);
    assert!(
        av.rows == m && bv.rows == k && bv.cols == n,
        "matmul shapes"
    );
    assert!(dv.end() <= dst.len() && av.end() <= a.len() && bv.end() <= b.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !acc {
            for i in 0..m {
                for j in 0..n {
                    dst[dv.off + i * dv.rs + j * dv.cs] = T::zero();
                }
            }
        }
        return;
    }
    // SAFETY: every index the product touches is inside its slice (checked above); `dst` is
    // borrowed mutably, so it does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(dv.off),
            dv.cs as isize,
            dv.rs as isize,
            acc,
            a.as_ptr().add(av.off),
            av.cs as isize,
            av.rs as isize,
            b.as_ptr().add(bv.off),
            bv.cs as isize,
            bv.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            par,
        );
    }
}

pub(crate) const ALL: Parallelism = Parallelism::Rayon(0);

/// `y[n, out] = x[n, in] · Wᵀ + b` (W `[out, in]`).
pub(crate) fn linear<T: Real>(x: &[T], w: &[T], b: &[T], n: usize, k: usize) -> Buf<T> {
    let out = b.len();
    let mut y = Buf::dirty(n * out);
    matmul(
        &mut y,
        View::rows(0, n, out, out),
        false,
        x,
        View::rows(0, n, k, k),
        w,
        View::rows(0, out, k, k).t(),
        ALL,
    );
    y.par_chunks_mut(task_rows(out) * out).for_each(|c| {
        for row in c.chunks_mut(out) {
            for (v, &bi) in row.iter_mut().zip(b) {
                *v += bi;
            }
        }
    });
    y
}

/// The gradients of [`linear`]: `(dW, db)`, and `dx` written (or added, with `acc`) into `dx`.
pub(crate) fn linear_bwd<T: Real>(
    x: &[T],
    w: &[T],
    dy: &[T],
    n: usize,
    k: usize,
    dx: Option<(&mut [T], bool)>,
) -> (Vec<T>, Vec<T>) {
    let out = w.len() / k;
    let mut dw = vec![T::zero(); out * k];
    matmul(
        &mut dw,
        View::rows(0, out, k, k),
        false,
        dy,
        View::rows(0, n, out, out).t(),
        x,
        View::rows(0, n, k, k),
        ALL,
    );
    if let Some((dx, acc)) = dx {
        matmul(
            dx,
            View::rows(0, n, k, k),
            acc,
            dy,
            View::rows(0, n, out, out),
            w,
            View::rows(0, out, k, k),
            ALL,
        );
    }
    (dw, col_sum(dy, out))
}
