//! Dropout, residual and LayerNorm fused into one pass each way (biased variance, `eps` inside
//! the square root, statistics in f64).

use rayon::prelude::*;

use crate::model::engine::cpu::buf::Buf;
use crate::model::engine::cpu::dropout::{row_mask, Mask};
use crate::model::math::{lane_sum, task_rows, Real};

/// What the backward of a LayerNorm needs: the normalised input and `1/σ` per row.
pub(crate) struct NormSaved<T: Real> {
    pub(crate) xhat: Buf<T>,
    pub(crate) inv: Vec<f64>,
}

/// `y = LN(drop(a) + res)` over rows of `h`, then (for the embeddings) `drop_out(y)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn add_norm<T: Real>(
    a: &[T],
    drop: &Option<Mask<T>>,
    res: Option<&[T]>,
    w: &[T],
    b: &[T],
    eps: f64,
    drop_out: &Option<Mask<T>>,
    h: usize,
) -> (Buf<T>, NormSaved<T>) {
    let n = a.len();
    let mut y = Buf::dirty(n);
    let mut xhat = Buf::dirty(n);
    let mut inv = vec![0f64; n / h];
    let rows = task_rows(h);
    y.par_chunks_mut(rows * h)
        .zip(xhat.par_chunks_mut(rows * h))
        .zip(inv.par_chunks_mut(rows))
        .enumerate()
        .for_each(|(c, ((yc, xc), ic))| {
            let mut r = vec![0f64; h];
            let mut m = vec![T::zero(); h];
            for (k, inv_k) in ic.iter_mut().enumerate() {
                let base = (c * rows + k) * h;
                let ar = &a[base..base + h];
                match drop {
                    Some(d) => {
                        row_mask(d, base, &mut m);
                        for ((ri, &ai), &mi) in r.iter_mut().zip(ar).zip(&m) {
                            *ri = (ai * mi).to_f64();
                        }
                    }
                    None => {
                        for (ri, &ai) in r.iter_mut().zip(ar) {
                            *ri = ai.to_f64();
                        }
                    }
                }
                if let Some(res) = res {
                    // In T, as the graph adds the two tensors.
                    for ((ri, &ai), &si) in r.iter_mut().zip(ar).zip(&res[base..base + h]) {
                        let v = match drop {
                            Some(_) => T::from_f64(*ri),
                            None => ai,
                        };
                        *ri = (v + si).to_f64();
                    }
                }
                let mean = lane_sum(h, |i| r[i]) / h as f64;
                let var = lane_sum(h, |i| (r[i] - mean) * (r[i] - mean)) / h as f64;
                let s = 1.0 / (var + eps).sqrt();
                *inv_k = s;
                let (xo, yo) = (&mut xc[k * h..(k + 1) * h], &mut yc[k * h..(k + 1) * h]);
                for ((((xo, yo), &ri), &wi), &bi) in
                    xo.iter_mut().zip(yo.iter_mut()).zip(&r).zip(w).zip(b)
                {
                    let xh = (ri - mean) * s;
                    *xo = T::from_f64(xh);
                    *yo = T::from_f64(xh * wi.to_f64() + bi.to_f64());
                }
                if let Some(d) = drop_out {
                    row_mask(d, base, &mut m);
                    for (yo, &mi) in yo.iter_mut().zip(&m) {
                        *yo *= mi;
                    }
                }
            }
        });
    (y, NormSaved { xhat, inv })
}

/// Backward of [`add_norm`] for the gradient `dy` of its output (before `drop_out`, applied
/// here): returns `dr` (the gradient of `drop(a) + res`, which is `res`'s), `da` (`a`'s, when
/// `drop` is active; else it equals `dr`), and `(dw, db)`.
pub(crate) fn add_norm_bwd<T: Real>(
    dy: &[T],
    saved: &NormSaved<T>,
    w: &[T],
    drop: &Option<Mask<T>>,
    drop_out: &Option<Mask<T>>,
    h: usize,
) -> (Buf<T>, Option<Buf<T>>, Vec<T>, Vec<T>) {
    let n = dy.len();
    let mut dr = Buf::dirty(n);
    let mut da = drop.as_ref().map(|_| Buf::dirty(n));
    let rows = task_rows(h);
    let xhat = &saved.xhat;
    let body = |c: usize, drc: &mut [T], mut dac: Option<&mut [T]>| -> (Vec<f64>, Vec<f64>) {
        let (mut dw, mut db) = (vec![0f64; h], vec![0f64; h]);
        let (mut g, mut gw, mut xh) = (vec![0f64; h], vec![0f64; h], vec![0f64; h]);
        let mut m = vec![T::zero(); h];
        for k in 0..drc.len() / h {
            let row = c * rows + k;
            let base = row * h;
            let dyr = &dy[base..base + h];
            match drop_out {
                Some(d) => {
                    row_mask(d, base, &mut m);
                    for ((gi, &v), &mi) in g.iter_mut().zip(dyr).zip(&m) {
                        *gi = (v * mi).to_f64();
                    }
                }
                None => {
                    for (gi, &v) in g.iter_mut().zip(dyr) {
                        *gi = v.to_f64();
                    }
                }
            }
            for (x, &v) in xh.iter_mut().zip(&xhat[base..base + h]) {
                *x = v.to_f64();
            }
            for i in 0..h {
                gw[i] = g[i] * w[i].to_f64();
                dw[i] += g[i] * xh[i];
                db[i] += g[i];
            }
            let m1 = lane_sum(h, |i| gw[i]) / h as f64;
            let m2 = lane_sum(h, |i| gw[i] * xh[i]) / h as f64;
            let inv = saved.inv[row];
            let dro = &mut drc[k * h..(k + 1) * h];
            for ((o, &gwi), &x) in dro.iter_mut().zip(&gw).zip(&xh) {
                *o = T::from_f64(inv * (gwi - m1 - x * m2));
            }
            if let (Some(dac), Some(d)) = (dac.as_deref_mut(), drop) {
                row_mask(d, base, &mut m);
                for ((o, &v), &mi) in dac[k * h..(k + 1) * h].iter_mut().zip(dro.iter()).zip(&m) {
                    *o = v * mi;
                }
            }
        }
        (dw, db)
    };
    let parts: Vec<(Vec<f64>, Vec<f64>)> = match da.as_mut() {
        Some(da) => dr
            .par_chunks_mut(rows * h)
            .zip(da.par_chunks_mut(rows * h))
            .enumerate()
            .map(|(c, (drc, dac))| body(c, drc, Some(dac)))
            .collect(),
        None => dr
            .par_chunks_mut(rows * h)
            .enumerate()
            .map(|(c, drc)| body(c, drc, None))
            .collect(),
    };
    let dw = (0..h)
        .map(|i| T::from_f64(parts.iter().map(|p| p.0[i]).sum()))
        .collect();
    let db = (0..h)
        .map(|i| T::from_f64(parts.iter().map(|p| p.1[i]).sum()))
        .collect();
    (dr, da, dw, db)
}
