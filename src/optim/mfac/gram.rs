//! The m×m side of M-FAC, in f64: the Gram matrix K = G Gᵀ, A = mλ·I + K, and B = A⁻¹ kept up
//! to date in O(m²) per step when row/column j of K is replaced, with a backward-error guard and
//! a from-scratch rebuild every m steps. K and B are symmetric: only their lower triangles are
//! stored, packed row after row ([`packed`]): 4 MB each at m = 1024.
//!
//! # One step: one sweep over B (`sweep`)
//! Let b = B e_j (B before the change), a = A's new column j, a₀ = a with a₀ⱼ = 0, and
//! y = B a₀. Removing index j and adding it back with its new row (a Schur downdate, then a
//! bordering) gives, for i, l ≠ j,
//!
//! ```text
//!   cb   = C a₀ = y − b·(y_j / b_jj)          (C = B₋ⱼ₋ⱼ − b bᵀ/b_jj, the inverse without j)
//!   s    = a_jj − a₀ᵀ cb                       (the Schur complement of the new pivot, > 0)
//!   B'ᵢₗ = Bᵢₗ − bᵢ bₗ / b_jj + cbᵢ cbₗ / s,   B'ᵢⱼ = −cbᵢ / s,   B'ⱼⱼ = 1 / s
//! ```
//!
//! (y_j = bᵀa₀, because B is symmetric). So c = B' e_j = (−cb/s, 1/s) needs only y: one
//! product with the *old* B. The change to B' (row and column j set to c, the rank-2 change
//! elsewhere, with b and cb zeroed at j so that it leaves row and column j alone) is kept as a
//! [`Pending`] and applied by the next step's sweep to each row just before that row enters the
//! next product; the same sweep gathers the next b. So a step reads and writes B once (8 MB at
//! m = 1024), on the calling thread only: a busy second core costs it memory bandwidth, never a
//! wait for a thread that is not scheduled.
//!
//! # The guard
//! c's normwise backward error ‖A c − e_j‖∞ / (‖A‖∞ ‖c‖∞) takes one read of K (as much memory
//! traffic as half a sweep), so it is checked every [`CHECK_EVERY`]-th update and on every
//! update that lost ≥ 4 digits to cancellation in y = B a₀, in its downdated column cb or in its
//! pivot s ([`KAPPA_CHECK`]; that loss is what makes one step's c inaccurate, and it is measured
//! — for y, bounded from B's diagonal — in O(m)). Above [`RESIDUAL_TOL`], or when a pivot is not positive (rounding lost definiteness),
//! B is rebuilt from scratch and c taken from it, and the repair is counted
//! ([`GramSolver::repairs`]).
//!
//! # The rebuild, O(m³) once every m steps (`rebuild`)
//! A = L Lᵀ (Cholesky), W = L⁻¹ column by column, B = Wᵀ W: every entry one contiguous dot
//! product, four rows at a time; the last two stages on rayon's pool. 60–80 ms at m = 1024 on
//! our CPU (the loops it replaced took 1.6–2.6 s): under 0.1 ms per step amortised.

mod packed;
mod rebuild;
mod sweep;

use std::time::Instant;

use packed::{column, dot, pack, set_column, tri, unpack};
use sweep::{residual, sweep, Kernels, Pending};

/// Backward error above which the O(m²) solution is replaced by a from-scratch solve.
/// A backward-stable solve of an m×m system gives ~m·ε ≈ 1e-13 at m = 1024.
const RESIDUAL_TOL: f64 = 1e-11;

/// The guard reads K every this many updates (and on every update that cancels, below).
const CHECK_EVERY: usize = 4;

/// An update whose pivot s or downdated column cb came out κ times smaller than the terms they
/// were summed from has lost log10(κ) digits to cancellation, and its c a backward error of
/// about κ·ε (measured over correlated windows, m = 512: η / (κ·ε) ≤ 2, median 0.07; the
/// guard's tests have the data). From κ = 1e4 on (η up to ~2e-12) its c is checked at once;
/// below, what accumulates between checks is caught at the next one.
const KAPPA_CHECK: f64 = 1e4;

/// Where the time of the m×m side went, since the solver was made (wall clock).
///
/// ```
/// use mfac_lab::optim::GramTiming;
/// let t = GramTiming { steps: 1024, seconds: 0.6, checks: 256, rebuilds: 1, rebuild_seconds: 0.08 };
/// assert!((t.per_step_ms() - 0.6 / 1024.0 * 1e3).abs() < 1e-12);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GramTiming {
    /// Steps (row/column replacements).
    pub steps: u64,
    /// Seconds spent in them, rebuilds included.
    pub seconds: f64,
    /// Full backward-error checks (reads of K) by the guard.
    pub checks: u64,
    /// From-scratch rebuilds: the periodic ones and the guard's repairs.
    pub rebuilds: u64,
    /// Seconds spent in those rebuilds.
    pub rebuild_seconds: f64,
}

impl GramTiming {
    /// Mean milliseconds per step, rebuilds included (amortised).
    pub fn per_step_ms(&self) -> f64 {
        if self.steps == 0 {
            0.0
        } else {
            self.seconds / self.steps as f64 * 1e3
        }
    }

    /// The difference `self − earlier` (the time of the steps in between).
    pub fn since(&self, earlier: &GramTiming) -> GramTiming {
        GramTiming {
            steps: self.steps - earlier.steps,
            seconds: self.seconds - earlier.seconds,
            checks: self.checks - earlier.checks,
            rebuilds: self.rebuilds - earlier.rebuilds,
            rebuild_seconds: self.rebuild_seconds - earlier.rebuild_seconds,
        }
    }
}

/// `A = mλ·I + K` and B = A⁻¹, both as packed lower triangles (B plus its pending change), f64.
#[derive(Debug, Clone)]
pub(crate) struct GramSolver {
    m: usize,
    /// mλ, added to the diagonal.
    shift: f64,
    /// K = G Gᵀ, packed lower triangle.
    k: Vec<f64>,
    /// B, packed lower triangle, current once `pending` is applied.
    inv: Vec<f64>,
    /// B's diagonal, current (pending change included): the guard's bound on y's cancellation
    /// reads it every step, and gathering it from the packed rows costs m cache misses.
    diag: Vec<f64>,
    /// The last step's rank-2 change on the indices other than its j (row and column j of
    /// `inv` already hold their new values; b and q are zero at j).
    pending: Option<Pending>,
    kernels: Kernels,
    /// Updates since the last rebuild.
    since_refresh: usize,
    /// How many rebuilds happened (periodic and repairs).
    refreshes: usize,
    /// How many of them the guard forced (lost accuracy or definiteness).
    repairs: usize,
    timing: GramTiming,
}

impl GramSolver {
    pub fn new(m: usize, damp: f64) -> Self {
        let shift = m as f64 * damp;
        let mut inv = vec![0.0; tri(m)];
        for i in 0..m {
            inv[tri(i) + i] = 1.0 / shift;
        }
        GramSolver {
            m,
            shift,
            k: vec![0.0; tri(m)],
            diag: vec![1.0 / shift; m],
            inv,
            pending: None,
            kernels: Kernels::detect(),
            since_refresh: 0,
            refreshes: 0,
            repairs: 0,
            timing: GramTiming::default(),
        }
    }

    /// Replaces row and column `j` of K with `row` (= G g after writing g into slot j) and
    /// returns c = A⁻¹ e_j.
    pub fn replace(&mut self, j: usize, row: &[f64]) -> Vec<f64> {
        let t0 = Instant::now();
        set_column(&mut self.k, self.m, j, row);
        self.since_refresh += 1;
        let c = if self.since_refresh >= self.m {
            self.rebuild();
            self.column(j)
        } else {
            match self.update(j, row) {
                Some((c, kappa)) => {
                    // The guard (module docs): every CHECK_EVERY-th update, and every update
                    // that cancelled 4 digits or more.
                    let check = self.since_refresh % CHECK_EVERY == 0 || kappa > KAPPA_CHECK;
                    if check {
                        self.timing.checks += 1;
                    }
                    if check && self.backward_error(j, &c) > RESIDUAL_TOL {
                        self.repair(j)
                    } else {
                        c
                    }
                }
                None => self.repair(j),
            }
        };
        self.timing.steps += 1;
        self.timing.seconds += t0.elapsed().as_secs_f64();
        c
    }

    /// The guard's repair: a rebuild, and c from it.
    fn repair(&mut self, j: usize) -> Vec<f64> {
        self.repairs += 1;
        self.rebuild();
        self.column(j)
    }

    /// The O(m²) update after row/column j of K became `row` (module docs): one sweep, then
    /// O(m) work. Returns c and the step's cancellation factor κ (how many times larger the
    /// terms of y, cb and s were than y, cb and s); `None` when a pivot is not positive (rounding
    /// lost definiteness).
    fn update(&mut self, j: usize, row: &[f64]) -> Option<(Vec<f64>, f64)> {
        let m = self.m;
        let mut a0 = row[..m].to_vec();
        let ajj = a0[j] + self.shift;
        a0[j] = 0.0;
        let pending = self.pending.take();
        // y = B a₀ and b = column j of B, B with the last step's change applied on the way.
        let (y, mut b) = sweep(self.kernels, &mut self.inv, m, pending.as_ref(), &a0, j);
        let (bjj, yj) = (b[j], y[j]);
        let h = yj / bjj;
        let mut q: Vec<f64> = y.iter().zip(&b).map(|(yi, bi)| yi - bi * h).collect();
        q[j] = 0.0;
        let s = ajj - dot(&a0, &q);
        if s.is_nan() || s <= 0.0 || bjj.is_nan() || bjj <= 0.0 {
            return None;
        }
        // κ: the terms of s against s, and of cb = y − b·h against cb.
        let terms_s = ajj + a0.iter().zip(&q).map(|(a, q)| (a * q).abs()).sum::<f64>();
        let terms_q = y
            .iter()
            .zip(&b)
            .map(|(y, b)| y.abs() + (b * h).abs())
            .fold(0.0, f64::max);
        let max_q = q.iter().fold(0.0f64, |x, v| x.max(v.abs()));
        // And of y = B a₀ itself: its terms Σₗ |Bᵢₗ a₀ₗ| are at most √Bᵢᵢ · Σₗ √Bₗₗ |a₀ₗ| (B is
        // positive definite, so |Bᵢₗ| ≤ √(Bᵢᵢ Bₗₗ)): an O(m) bound from B's diagonal. Without
        // it a window of nearly collinear gradients loses every digit of y unseen (the guard's
        // test: κ of s and cb 4e3, y's 1e13, c's backward error 9e-5).
        let sd: Vec<f64> = self.diag.iter().map(|x| x.max(0.0).sqrt()).collect();
        let terms_y = sd.iter().fold(0.0f64, |x, v| x.max(*v))
            * sd.iter().zip(&a0).map(|(s, a)| s * a.abs()).sum::<f64>();
        let max_y = y.iter().fold(0.0f64, |x, v| x.max(v.abs()));
        let ratio = |terms: f64, max: f64| if max > 0.0 { terms / max } else { 1.0 };
        let kappa = (terms_s / s)
            .max(ratio(terms_q, max_q))
            .max(ratio(terms_y, max_y));
        let inv_s = 1.0 / s;
        let mut c: Vec<f64> = q.iter().map(|qi| -qi * inv_s).collect();
        c[j] = inv_s;
        b[j] = 0.0;
        let inv_bjj = 1.0 / bjj;
        let f: Vec<f64> = b.iter().map(|x| x * inv_bjj).collect();
        let g: Vec<f64> = q.iter().map(|x| x * inv_s).collect();
        // The diagonal after the change, as the sweep will apply it (b, q are zero at j).
        for (l, x) in self.diag.iter_mut().enumerate() {
            *x = (*x - f[l] * b[l]) + g[l] * q[l];
        }
        self.diag[j] = c[j];
        self.pending = Some(Pending {
            j,
            c: c.clone(),
            f,
            b,
            g,
            q,
        });
        Some((c, kappa))
    }

    /// B's diagonal from the stored rows (after a rebuild or a restore: no pending change).
    fn refresh_diag(&mut self) {
        self.diag = (0..self.m).map(|l| self.inv[tri(l) + l]).collect();
    }

    /// Column j of B, right after a rebuild (no pending change).
    fn column(&self, j: usize) -> Vec<f64> {
        column(&self.inv, self.m, j)
    }

    /// ‖A c − e_j‖∞ / (‖A‖∞ ‖c‖∞): the normwise backward error of c as a solution.
    fn backward_error(&self, j: usize, c: &[f64]) -> f64 {
        let (r_max, a_norm) = residual(self.kernels, &self.k, self.m, self.shift, j, c);
        let c_norm = c.iter().fold(0.0f64, |x, y| x.max(y.abs()));
        let e = r_max / (a_norm * c_norm);
        if e.is_finite() {
            e
        } else {
            f64::INFINITY
        }
    }

    /// Rebuilds B = A⁻¹ from scratch (module docs), dropping any pending change.
    fn rebuild(&mut self) {
        let t0 = Instant::now();
        self.inv = rebuild::inverse(&self.k, self.m, self.shift);
        self.refresh_diag();
        self.pending = None;
        self.since_refresh = 0;
        self.refreshes += 1;
        self.timing.rebuilds += 1;
        self.timing.rebuild_seconds += t0.elapsed().as_secs_f64();
    }

    /// c = A⁻¹ e_j solved from scratch (Cholesky, then L w = e_j and Lᵀ x = w): for checks.
    pub fn solve_from_scratch(&self, j: usize) -> Vec<f64> {
        rebuild::solve_unit(&self.k, self.m, self.shift, j)
    }

    /// K as a full m×m row-major matrix.
    pub fn gram(&self) -> Vec<f64> {
        unpack(&self.k, self.m)
    }

    /// B = A⁻¹ as a full symmetric m×m row-major matrix with the pending change applied (for
    /// saving: [`GramSolver::restore`] of it continues bit for bit).
    pub fn inverse(&self) -> Vec<f64> {
        let mut flushed = self.inv.clone();
        if let Some(p) = &self.pending {
            for i in 0..self.m {
                p.apply_row(i, &mut flushed[tri(i)..tri(i + 1)]);
            }
        }
        unpack(&flushed, self.m)
    }

    /// Restores the state that [`GramSolver::gram`], [`GramSolver::inverse`] and the counters
    /// gave (full m×m matrices; their lower triangles are used).
    pub fn restore(&mut self, k: &[f64], inv: &[f64], since_refresh: usize, refreshes: usize) {
        self.k = pack(k, self.m);
        self.inv = pack(inv, self.m);
        self.refresh_diag();
        self.pending = None;
        self.since_refresh = since_refresh;
        self.refreshes = refreshes;
    }

    /// Rebuilds so far (periodic and repairs).
    pub fn refreshes(&self) -> usize {
        self.refreshes
    }

    /// Updates since the last rebuild.
    pub fn since_refresh(&self) -> usize {
        self.since_refresh
    }

    /// Rebuilds the guard forced so far.
    pub fn repairs(&self) -> usize {
        self.repairs
    }

    /// Bytes held: K, B (packed triangles) and B's diagonal, f64.
    pub fn bytes(&self) -> u64 {
        8 * (self.k.len() + self.inv.len() + self.diag.len()) as u64
    }

    /// Where the time went.
    pub fn timing(&self) -> GramTiming {
        self.timing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SeededRng;

    /// A ring-buffer window of `d`-long rows and the K rows a step hands the solver.
    struct Window {
        m: usize,
        d: usize,
        g: Vec<f64>,
        steps: usize,
    }

    impl Window {
        fn new(m: usize, d: usize) -> Self {
            Window {
                m,
                d,
                g: vec![0.0; m * d],
                steps: 0,
            }
        }

        /// Writes `row` into the next slot; returns (j, K's new row j).
        fn push(&mut self, row: &[f64]) -> (usize, Vec<f64>) {
            let (m, d) = (self.m, self.d);
            let j = self.steps % m;
            self.steps += 1;
            self.g[j * d..(j + 1) * d].copy_from_slice(row);
            let k = (0..m)
                .map(|i| (0..d).map(|t| self.g[i * d + t] * row[t]).sum())
                .collect();
            (j, k)
        }
    }

    /// ‖A c − e_j‖∞ / (‖A‖∞ ‖c‖∞) from the full K, written out independently of the solver.
    fn backward_error(s: &GramSolver, j: usize, c: &[f64]) -> f64 {
        let (m, k) = (s.m, s.gram());
        let (mut r, mut a) = (0.0f64, 0.0f64);
        for i in 0..m {
            let mut t: f64 = (0..m).map(|l| k[i * m + l] * c[l]).sum();
            t += s.shift * c[i] - if i == j { 1.0 } else { 0.0 };
            r = r.max(t.abs());
            a = a.max((0..m).map(|l| k[i * m + l].abs()).sum::<f64>() + s.shift);
        }
        r / (a * c.iter().fold(0.0f64, |x, y| x.max(y.abs())))
    }

    fn rel(a: &[f64], b: &[f64]) -> f64 {
        let n: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        let d: f64 = b.iter().map(|y| y * y).sum();
        (n / d).sqrt()
    }

    #[test]
    fn the_o_m2_update_matches_the_from_scratch_solve() {
        // m not a multiple of 4 (the sweeps' last rows), three wraps of the ring (a periodic
        // rebuild in between), correlated rows (a shared direction in every gradient).
        let (m, d) = (37, 60);
        let mut rng = SeededRng::new(7);
        let base = rng.normal_vec(d, 0.0, 1.0);
        let mut w = Window::new(m, d);
        let mut s = GramSolver::new(m, 1e-4);
        for _ in 0..3 * m + 5 {
            let noise = rng.normal_vec(d, 0.0, 1.0);
            let row: Vec<f64> = base.iter().zip(&noise).map(|(b, n)| 0.8 * b + n).collect();
            let (j, k) = w.push(&row);
            let c = s.replace(j, &k);
            assert!(rel(&c, &s.solve_from_scratch(j)) <= 1e-12);
            assert!(backward_error(&s, j, &c) <= RESIDUAL_TOL);
            // The diagonal kept beside B is B's (pending change applied), bit for bit.
            let full = s.inverse();
            for l in 0..m {
                assert_eq!(
                    s.diag[l].to_bits(),
                    full[l * m + l].to_bits(),
                    "step {j}, {l}"
                );
            }
        }
        assert_eq!(
            (s.refreshes(), s.repairs()),
            (3, 0),
            "rebuilds only every m steps"
        );
        assert_eq!(s.timing().steps, 3 * m as u64 + 5);
    }

    #[test]
    fn a_loss_of_accuracy_is_caught_and_repaired_at_the_next_check() {
        let (m, d) = (24, 40);
        let mut rng = SeededRng::new(8);
        let mut w = Window::new(m, d);
        let mut s = GramSolver::new(m, 1e-3);
        for _ in 0..m / 2 {
            let (j, k) = w.push(&rng.normal_vec(d, 0.0, 1.0));
            s.replace(j, &k);
        }
        assert_eq!(s.repairs(), 0);
        // Drift, as rounding could leave it after many updates: B off by 1e-7 relative. (The
        // well-conditioned updates that follow cancel little, so it is the periodic check
        // that must find it, within CHECK_EVERY updates.)
        for (t, x) in s.inv.iter_mut().enumerate() {
            *x *= 1.0 + 1e-7 * ((t % 7) as f64 - 3.0);
        }
        let mut steps = 0;
        while s.repairs() == 0 {
            assert!(
                steps < CHECK_EVERY,
                "no check found the drift in {steps} updates"
            );
            let (j, k) = w.push(&rng.normal_vec(d, 0.0, 1.0));
            let c = s.replace(j, &k);
            steps += 1;
            if s.repairs() == 1 {
                assert!(
                    backward_error(&s, j, &c) <= 1e-14,
                    "the c it returns is repaired"
                );
                assert!(rel(&c, &s.solve_from_scratch(j)) <= 1e-12);
            }
        }
        // From the rebuilt inverse on, the O(m²) path is accurate again.
        for _ in 0..m {
            let (j, k) = w.push(&rng.normal_vec(d, 0.0, 1.0));
            let c = s.replace(j, &k);
            assert!(backward_error(&s, j, &c) <= RESIDUAL_TOL);
        }
        assert_eq!(s.repairs(), 1);
    }

    #[test]
    fn an_ill_conditioned_window_makes_the_guard_repair() {
        // Nearly collinear gradients (each 1e-6 off one shared direction) and a tiny damping:
        // A's condition number is ~1e16, the O(m²) update loses every digit of the pivot s,
        // and the guard must repair; every c the solver returns, also between the periodic
        // checks, must still be a backward-stable solution (the cancellation check's job).
        let (m, d) = (16, 32);
        let mut rng = SeededRng::new(9);
        let base = rng.normal_vec(d, 0.0, 1.0);
        let mut w = Window::new(m, d);
        let mut s = GramSolver::new(m, 1e-16);
        for _ in 0..3 * m {
            let noise = rng.normal_vec(d, 0.0, 1e-6);
            let row: Vec<f64> = base.iter().zip(&noise).map(|(b, n)| b + n).collect();
            let (j, k) = w.push(&row);
            let c = s.replace(j, &k);
            let e = backward_error(&s, j, &c);
            assert!(e <= RESIDUAL_TOL, "step {}: backward error {e:e}", w.steps);
        }
        assert!(s.repairs() > 0, "this window must make the guard repair");
    }

    #[test]
    fn a_restored_solver_continues_bit_for_bit() {
        let (m, d) = (10, 20);
        let mut rng = SeededRng::new(10);
        let rows: Vec<Vec<f64>> = (0..4 * m).map(|_| rng.normal_vec(d, 0.0, 1.0)).collect();
        let mut w = Window::new(m, d);
        let mut a = GramSolver::new(m, 1e-3);
        // Stop with a pending change, after a periodic rebuild.
        for row in &rows[..m + 3] {
            let (j, k) = w.push(row);
            a.replace(j, &k);
        }
        assert!(a.pending.is_some());
        let mut b = GramSolver::new(m, 1e-3);
        b.restore(&a.gram(), &a.inverse(), a.since_refresh(), a.refreshes());
        for row in &rows[m + 3..] {
            let (j, k) = w.push(row);
            let (ca, cb) = (a.replace(j, &k), b.replace(j, &k));
            assert_eq!(ca, cb, "step {}", w.steps);
        }
        assert_eq!(a.inverse(), b.inverse());
        assert_eq!(a.refreshes(), b.refreshes());
    }

    #[test]
    fn the_inverse_it_saves_is_full_and_symmetric() {
        let (m, d) = (6, 9);
        let mut rng = SeededRng::new(11);
        let mut w = Window::new(m, d);
        let mut s = GramSolver::new(m, 1e-2);
        for _ in 0..4 {
            let (j, k) = w.push(&rng.normal_vec(d, 0.0, 1.0));
            s.replace(j, &k);
        }
        let (k, inv) = (s.gram(), s.inverse());
        for i in 0..m {
            for l in 0..m {
                assert_eq!(inv[i * m + l], inv[l * m + i]);
                let mut t: f64 = (0..m).map(|q| k[i * m + q] * inv[q * m + l]).sum();
                t += s.shift * inv[i * m + l] - if i == l { 1.0 } else { 0.0 };
                assert!(t.abs() <= 1e-12, "(A B − I)[{i}][{l}] = {t:e}");
            }
        }
    }
}
