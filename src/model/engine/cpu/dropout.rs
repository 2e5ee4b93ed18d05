//! Dropout sites: keep flags drawn from the model's seeded stream, in the graph's order, and
//! the mask values as the graph rounds them.

use crate::model::math::Real;
use crate::rng::SeededRng;

/// A dropout site: keep flags and the `1/(1-p)` multiplier, or nothing (identity).
pub(crate) struct Mask<T> {
    pub(crate) keep: Vec<u8>,
    pub(crate) mult: T,
}

pub(crate) fn draw<T: Real>(rng: &mut Option<&mut SeededRng>, n: usize, p: f64) -> Option<Mask<T>> {
    match rng {
        Some(r) if p > 0.0 => Some(Mask {
            keep: r.keep_flags(n, p),
            // The graph's mask is `keep · (1/(1-p))` in the model's dtype.
            mult: T::from_f64(1.0 / (1.0 - p)),
        }),
        _ => None,
    }
}

/// The mask multipliers of one row as values of `T` (`keep · 1/(1-p)`), into `out`.
#[inline(always)]
pub(crate) fn row_mask<T: Real>(d: &Mask<T>, base: usize, out: &mut [T]) {
    let n = out.len();
    for (o, &k) in out.iter_mut().zip(&d.keep[base..base + n]) {
        *o = T::from_f64(k as f64) * d.mult;
    }
}

/// `x · mask` as the graph computes it (the mask value rounded to `T` first).
#[inline]
pub(crate) fn dropped<T: Real>(x: T, d: &Option<Mask<T>>, i: usize) -> T {
    match d {
        Some(d) => x * (T::from_f64(d.keep[i] as f64) * d.mult),
        None => x,
    }
}
