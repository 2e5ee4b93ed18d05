//! GLUE metrics: accuracy, F1 (positive class), Matthews correlation.

/// Fraction of predictions equal to the labels.
///
/// ```
/// assert_eq!(mfac_lab::train::accuracy(&[0, 1, 2, 2], &[0, 1, 1, 2]), 0.75);
/// ```
pub fn accuracy(pred: &[u32], labels: &[u32]) -> f64 {
    if labels.is_empty() {
        return 0.0;
    }
    pred.iter().zip(labels).filter(|(p, l)| p == l).count() as f64 / labels.len() as f64
}

/// F1 of class 1 (binary tasks: mrpc, qqp).
///
/// ```
/// let f1 = mfac_lab::train::f1(&[1, 1, 0, 0], &[1, 0, 1, 0]);
/// assert!((f1 - 0.5).abs() < 1e-12);
/// ```
pub fn f1(pred: &[u32], labels: &[u32]) -> f64 {
    let tp = pred
        .iter()
        .zip(labels)
        .filter(|(p, l)| **p == 1 && **l == 1)
        .count() as f64;
    let fp = pred
        .iter()
        .zip(labels)
        .filter(|(p, l)| **p == 1 && **l != 1)
        .count() as f64;
    let fne = pred
        .iter()
        .zip(labels)
        .filter(|(p, l)| **p != 1 && **l == 1)
        .count() as f64;
    if tp == 0.0 {
        0.0
    } else {
        2.0 * tp / (2.0 * tp + fp + fne)
    }
}

/// Matthews correlation of a binary prediction (cola).
///
/// ```
/// assert_eq!(mfac_lab::train::matthews(&[1, 0, 1, 0], &[1, 0, 1, 0]), 1.0);
/// ```
pub fn matthews(pred: &[u32], labels: &[u32]) -> f64 {
    let c = |p: u32, l: u32| {
        pred.iter()
            .zip(labels)
            .filter(|(a, b)| **a == p && **b == l)
            .count() as f64
    };
    let (tp, tn, fp, fne) = (c(1, 1), c(0, 0), c(1, 0), c(0, 1));
    let den = ((tp + fp) * (tp + fne) * (tn + fp) * (tn + fne)).sqrt();
    if den == 0.0 {
        0.0
    } else {
        (tp * tn - fp * fne) / den
    }
}
