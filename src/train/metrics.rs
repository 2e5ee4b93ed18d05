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

/// Pearson correlation of predictions and targets (stsb); 0 when either is constant.
///
/// ```
/// let r = mfac_lab::train::pearson(&[1.0, 2.0, 3.0, 4.0, 5.0], &[2.0, 1.0, 4.0, 3.0, 5.0]);
/// assert!((r - 0.8).abs() < 1e-12);
/// ```
pub fn pearson(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len().min(y.len());
    if n == 0 {
        return 0.0;
    }
    let (mx, my) = (
        x[..n].iter().sum::<f64>() / n as f64,
        y[..n].iter().sum::<f64>() / n as f64,
    );
    let (mut sxy, mut sxx, mut syy) = (0.0, 0.0, 0.0);
    for (a, b) in x[..n].iter().zip(&y[..n]) {
        let (dx, dy) = (a - mx, b - my);
        sxy += dx * dy;
        sxx += dx * dx;
        syy += dy * dy;
    }
    if sxx == 0.0 || syy == 0.0 {
        return 0.0;
    }
    sxy / (sxx.sqrt() * syy.sqrt())
}

/// Ranks 1..n, ties getting their average rank (as scipy's `rankdata`).
fn ranks(v: &[f64]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Spearman rank correlation (Pearson of the ranks, ties averaged), as scipy's `spearmanr`.
///
/// ```
/// // Ranks of x with a tie: [1, 2.5, 2.5, 4].
/// let r = mfac_lab::train::spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 2.0, 3.0, 4.0]);
/// assert!((r - 0.9486832980505138).abs() < 1e-12);
/// ```
pub fn spearman(x: &[f64], y: &[f64]) -> f64 {
    pearson(&ranks(x), &ranks(y))
}
