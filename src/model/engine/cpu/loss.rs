//! The mean loss and its gradient with respect to the logits: cross-entropy (HF's
//! single-label classification) or the squared error of a one-output model (regression).

use crate::model::math::Real;

/// The mean loss and its gradient with respect to the logits `[B, C]`.
pub(crate) fn loss_grad<T: Real>(
    logits: &[T],
    targets: &[f64],
    c: usize,
    regression: bool,
) -> (f64, Vec<T>) {
    let b = targets.len();
    let mut dl = vec![T::zero(); logits.len()];
    let mut total = 0.0;
    for (i, &y) in targets.iter().enumerate() {
        let z = &logits[i * c..][..c];
        if regression {
            let e = z[0].to_f64() - y;
            total += e * e;
            dl[i] = T::from_f64(2.0 * e / b as f64);
            continue;
        }
        let max = z
            .iter()
            .map(|v| v.to_f64())
            .fold(f64::NEG_INFINITY, f64::max);
        let sum: f64 = z.iter().map(|v| (v.to_f64() - max).exp()).sum();
        let lse = max + sum.ln();
        total += lse - z[y as usize].to_f64();
        for j in 0..c {
            let p = (z[j].to_f64() - lse).exp();
            let onehot = if j == y as usize { 1.0 } else { 0.0 };
            dl[i * c + j] = T::from_f64((p - onehot) / b as f64);
        }
    }
    (total / b as f64, dl)
}
