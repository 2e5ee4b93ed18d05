//! Self-attention over the stacked Q|K|V rows, one task per batch row, heads read in place as
//! strided views (no split or merge copies); masked softmax and dropout fused.

use gemm::Parallelism;
use rayon::prelude::*;

use crate::model::engine::cpu::buf::Buf;
use crate::model::engine::cpu::dropout::Mask;
use crate::model::engine::cpu::gemm::{matmul, View};
use crate::model::engine::Dims;
use crate::model::math::Real;

/// Attention over `qkv` `[B·T, 3H]` (Q | K | V, heads side by side): returns the context
/// `[B·T, H]` and the probabilities before dropout `[B, nh, T, T]`. One task per batch row.
pub(crate) fn attention<T: Real>(
    qkv: &[T],
    mask_add: &[T],
    drop: &Option<Mask<T>>,
    scale: f64,
    dm: Dims,
) -> (Buf<T>, Buf<T>) {
    let Dims { t, h, nh, d, .. } = dm;
    let tt = t * t;
    let mut ctx = Buf::dirty(dm.n() * h);
    let mut probs = Buf::dirty(dm.b * nh * tt);
    ctx.par_chunks_mut(t * h)
        .zip(probs.par_chunks_mut(nh * tt))
        .enumerate()
        .for_each(|(bi, (cx, pr))| {
            let rows = &qkv[bi * t * 3 * h..][..t * 3 * h];
            let madd = &mask_add[bi * t..][..t];
            let mut pd = vec![T::zero(); if drop.is_some() { tt } else { 0 }];
            let mut s = vec![0f64; t];
            for hh in 0..nh {
                let p = &mut pr[hh * tt..][..tt];
                matmul(
                    p,
                    View::rows(0, t, t, t),
                    false,
                    rows,
                    View::rows(hh * d, t, d, 3 * h),
                    rows,
                    View::rows(h + hh * d, t, d, 3 * h).t(),
                    Parallelism::None,
                );
                let base = (bi * nh + hh) * tt;
                for prow in p.chunks_mut(t) {
                    T::softmax_row(prow, madd, scale, &mut s);
                }
                if let Some(dr) = drop {
                    let keep = &dr.keep[base..][..tt];
                    for ((o, &pv), &k) in pd.iter_mut().zip(p.iter()).zip(keep) {
                        *o = pv * (T::from_f64(k as f64) * dr.mult);
                    }
                }
                let src: &[T] = if drop.is_some() { &pd } else { p };
                matmul(
                    cx,
                    View::rows(hh * d, t, d, h),
                    false,
                    src,
                    View::rows(0, t, t, t),
                    rows,
                    View::rows(2 * h + hh * d, t, d, 3 * h),
                    Parallelism::None,
                );
            }
        });
    (ctx, probs)
}

/// Backward of [`attention`]: the gradient of `qkv` from the context's gradient `dctx`.
pub(crate) fn attention_bwd<T: Real>(
    qkv: &[T],
    probs: &[T],
    dctx: &[T],
    drop: &Option<Mask<T>>,
    scale: f64,
    dm: Dims,
) -> Buf<T> {
    let Dims { t, h, nh, d, .. } = dm;
    let tt = t * t;
    let mut dqkv = Buf::dirty(dm.n() * 3 * h);
    dqkv.par_chunks_mut(t * 3 * h)
        .zip(dctx.par_chunks(t * h))
        .enumerate()
        .for_each(|(bi, (dq, dc))| {
            let rows = &qkv[bi * t * 3 * h..][..t * 3 * h];
            let mut pd = vec![T::zero(); if drop.is_some() { tt } else { 0 }];
            let mut dp = vec![T::zero(); tt];
            for hh in 0..nh {
                let base = (bi * nh + hh) * tt;
                let p = &probs[base..][..tt];
                // dPd = dctx · Vᵀ
                matmul(
                    &mut dp,
                    View::rows(0, t, t, t),
                    false,
                    dc,
                    View::rows(hh * d, t, d, h),
                    rows,
                    View::rows(2 * h + hh * d, t, d, 3 * h).t(),
                    Parallelism::None,
                );
                if let Some(dr) = drop {
                    for (i, v) in pd.iter_mut().enumerate() {
                        *v = p[i] * (T::from_f64(dr.keep[base + i] as f64) * dr.mult);
                    }
                }
                let pdr: &[T] = if drop.is_some() { &pd } else { p };
                // dV = Pdᵀ · dctx
                matmul(
                    dq,
                    View::rows(2 * h + hh * d, t, d, 3 * h),
                    false,
                    pdr,
                    View::rows(0, t, t, t).t(),
                    dc,
                    View::rows(hh * d, t, d, h),
                    Parallelism::None,
                );
                // dS = scale · P ∘ (g − Σ g·P), g = dPd ∘ mask
                for (i, row) in dp.chunks_mut(t).enumerate() {
                    let mask = drop
                        .as_ref()
                        .map(|dr| (&dr.keep[base + i * t..][..t], dr.mult));
                    T::softmax_bwd_row(row, &p[i * t..][..t], mask, scale);
                }
                // dQ = dS · K, dK = dSᵀ · Q
                matmul(
                    dq,
                    View::rows(hh * d, t, d, 3 * h),
                    false,
                    &dp,
                    View::rows(0, t, t, t),
                    rows,
                    View::rows(h + hh * d, t, d, 3 * h),
                    Parallelism::None,
                );
                matmul(
                    dq,
                    View::rows(h + hh * d, t, d, 3 * h),
                    false,
                    &dp,
                    View::rows(0, t, t, t).t(),
                    rows,
                    View::rows(hh * d, t, d, 3 * h),
                    Parallelism::None,
                );
            }
        });
    dqkv
}
