//! M-FAC (Frantar, Kurtic, Alistarh, NeurIPS 2021): a matrix-free inverse-Fisher preconditioner
//! over a sliding window of the last m gradients. See ../shared/docs/mfac.md for the algorithm;
//! this is its stable form: u = m·Gᵀc with (mλI + K)c = e_j, the m×m work in f64.
//!
//! With `density` < 1 (or a `block_size`) the window is sparse (Sparse M-FAC, Modoranu et al.,
//! ICML 2024; ../shared/docs/sparse-mfac.md): each row keeps the top-k of an error-feedback
//! accumulator, and the same step preconditions that compressed vector (window/sparse/).

mod config;
mod gram;
mod state;
mod window;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};

pub use config::MFacConfig;
pub use gram::GramTiming;
pub use window::sparse::SparseProfile;
pub(crate) use window::sparse::{
    state_bytes as sparse_state_bytes, window_bytes as sparse_window_bytes,
};
pub use window::StepProfile;

use crate::error::{Error, Result};
use crate::optim::seam::{Optim, OptimConfig};
use crate::optim::util::ms_since;
use gram::GramSolver;
use window::{Update, Window};

/// What one step did (also kept for introspection).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MFacStep {
    /// The slot the gradient was written to.
    pub slot: usize,
    /// ‖lr · direction‖: how far the parameters moved.
    pub update_norm: f64,
    /// cos(direction, gradient): 1 = the plain gradient-descent direction. The gradient is the
    /// one that entered the window (with coupled weight decay, in the window's precision).
    pub cosine: f64,
    /// ‖gradient‖ of that same vector (√K_jj).
    pub grad_norm: f64,
}

/// The M-FAC optimizer. Implements `candle_nn::Optimizer`.
///
/// ```
/// use candle_core::{Device, Var};
/// use candle_nn::Optimizer;
/// use mfac_lab::optim::{MFac, MFacConfig};
/// let w = Var::new(&[1.0f64, -2.0, 0.5], &Device::Cpu)?;
/// let cfg = MFacConfig { lr: 0.1, num_grads: 4, damp: 1e-3, ..Default::default() };
/// let mut opt = MFac::new(vec![w.clone()], cfg)?;
/// let loss = w.as_tensor().sqr()?.sum_all()?;
/// opt.backward_step(&loss)?;
/// assert_eq!(opt.filled_slots(), 1);
/// // First step: u = m·g/(mλ + |g|²).
/// let g = [2.0, -4.0, 1.0];
/// let g2: f64 = g.iter().map(|x| x * x).sum();
/// let want: Vec<f64> = [1.0, -2.0, 0.5].iter().zip(g).map(|(w, g)| w - 0.1 * 4.0 * g / (4.0 * 1e-3 + g2)).collect();
/// let got: Vec<f64> = w.as_tensor().to_vec1()?;
/// assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct MFac {
    cfg: MFacConfig,
    vars: Vec<Var>,
    names: Vec<String>,
    d: usize,
    /// The window (host or device) and the d-sized vectors of a step.
    window: Window,
    gram: GramSolver,
    ring: usize,
    filled: usize,
    steps: u64,
    last_c: Vec<f64>,
    last: Option<MFacStep>,
}

impl std::fmt::Debug for MFac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MFac")
            .field("config", &self.cfg)
            .field("d", &self.d)
            .field("filled", &self.filled)
            .field("ring_index", &self.ring)
            .field("steps", &self.steps)
            .finish()
    }
}

impl MFac {
    /// M-FAC over `vars` (in that fixed order). Checks the config, then that the window fits in
    /// memory before allocating it.
    pub fn try_new(vars: Vec<Var>, cfg: MFacConfig) -> Result<Self> {
        let names = vars.iter().map(|v| format!("{:?}", v.dims())).collect();
        Self::build(vars, names, cfg)
    }

    /// Like [`MFac::try_new`], with parameter names (used in error messages).
    pub fn new_named(vars: &[(String, Var)], cfg: MFacConfig) -> Result<Self> {
        Self::build(
            vars.iter().map(|(_, v)| v.clone()).collect(),
            vars.iter().map(|(n, _)| n.clone()).collect(),
            cfg,
        )
    }

    /// M-FAC over `vars` with the sparse window whatever the density: at density 1 it keeps
    /// every entry, so the sparse code path computes dense M-FAC (with decoupled weight decay).
    /// For checks of that path; [`MFac::try_new`] picks the sparse window by itself when
    /// density < 1 or a block size is set.
    #[doc(hidden)]
    pub fn try_new_sparse(vars: Vec<Var>, cfg: MFacConfig) -> Result<Self> {
        let names = vars.iter().map(|v| format!("{:?}", v.dims())).collect();
        Self::build_with(vars, names, cfg, true)
    }

    fn build(vars: Vec<Var>, names: Vec<String>, cfg: MFacConfig) -> Result<Self> {
        Self::build_with(vars, names, cfg, false)
    }

    fn build_with(
        vars: Vec<Var>,
        names: Vec<String>,
        cfg: MFacConfig,
        sparse: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        if vars.is_empty() {
            return Err(Error::InvalidArgument(
                "M-FAC needs at least one parameter".into(),
            ));
        }
        for v in &vars {
            if !v.dtype().is_float() {
                return Err(Error::InvalidArgument(format!(
                    "M-FAC needs float parameters, got {:?}",
                    v.dtype()
                )));
            }
        }
        let mut offsets = Vec::with_capacity(vars.len() + 1);
        let mut d = 0usize;
        for v in &vars {
            offsets.push(d);
            d += v.elem_count();
        }
        offsets.push(d);
        let m = cfg.num_grads;
        let window = if sparse {
            Window::new_sparse(&vars, &cfg, offsets)?
        } else {
            Window::new(&vars, &cfg, offsets)?
        };
        Ok(MFac {
            window,
            cfg,
            vars,
            names,
            d,
            gram: GramSolver::new(m, cfg.damp),
            ring: 0,
            filled: 0,
            steps: 0,
            last_c: vec![0.0; m],
            last: None,
        })
    }

    /// The gradients of the parameters, contiguous, each of its parameter's size (`None` where
    /// `grads` holds none).
    fn gradients(&self, grads: &GradStore) -> Result<Vec<Option<Tensor>>> {
        let mut gs = Vec::with_capacity(self.vars.len());
        for (var, name) in self.vars.iter().zip(&self.names) {
            gs.push(match grads.get(var.as_tensor()) {
                Some(g) if g.elem_count() != var.elem_count() => {
                    return Err(Error::InvalidArgument(format!(
                        "gradient of {name} has the wrong size"
                    )))
                }
                Some(g) if g.is_contiguous() => Some(g.clone()),
                Some(g) => Some(g.contiguous()?),
                None => None,
            });
        }
        Ok(gs)
    }

    /// One M-FAC step from the gradients in `grads` (missing ones count as zero). On a
    /// non-finite gradient it returns [`Error::NonFiniteGradient`] and changes nothing.
    ///
    /// The same steps wherever the window lives (window/mod.rs): g into slot j, pass 1 gives
    /// row j of K = G·g, the m×m side here in f64 gives c = (mλI + K)⁻¹e_j, pass 2 gives
    /// u = m·Gᵀc, then the momentum and w −= lr·dir. The sparse window writes the top-k of its
    /// error-feedback accumulator instead of g, and its weight decay is decoupled
    /// (w ← (1 − lr·wd)·w − lr·u) where the dense window's is coupled (g + wd·w enters G).
    pub fn try_step(&mut self, grads: &GradStore) -> Result<MFacStep> {
        let t0 = std::time::Instant::now();
        let m = self.cfg.num_grads;
        let gs = self.gradients(grads)?;
        let j = self.ring;
        let wd = self.cfg.weight_decay;
        let (coupled, decoupled) = if self.window.is_sparse() {
            (0.0, wd)
        } else {
            (wd, 0.0)
        };
        self.window
            .write(j, &self.vars, &self.names, &gs, coupled)?;
        // Row/column j of K over the filled rows (the rest are zero).
        let rows = self.filled.max(j + 1);
        let mut krow = self.window.gram_row(j, rows)?;
        krow.resize(m, 0.0);
        let th = std::time::Instant::now();
        let c = self.gram.replace(j, &krow);
        self.window.record_host_ms(ms_since(th));
        let lr = self.cfg.lr;
        let update = Update {
            rows,
            scale: m as f64,
            j,
            beta: self.cfg.momentum,
            lr,
            decay: lr * decoupled,
        };
        let (dd, dg) = self.window.update(&c, update, &self.vars)?;
        self.window.record_total_ms(ms_since(t0));
        self.last_c = c;
        Ok(self.finish_step(j, rows, lr, (dd, dg, krow[j])))
    }

    /// Records step `j`'s introspection from `(‖u‖², ⟨u, g⟩, ‖g‖²)` and advances the ring.
    fn finish_step(&mut self, j: usize, rows: usize, lr: f64, sums: (f64, f64, f64)) -> MFacStep {
        let (dd, dg, gg) = sums;
        let cosine = if dd > 0.0 && gg > 0.0 {
            dg / (dd.sqrt() * gg.sqrt())
        } else {
            0.0
        };
        let step = MFacStep {
            slot: j,
            update_norm: lr * dd.sqrt(),
            cosine,
            grad_norm: gg.sqrt(),
        };
        self.ring = (j + 1) % self.cfg.num_grads;
        self.filled = rows;
        self.steps += 1;
        self.last = Some(step);
        step
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &MFacConfig {
        &self.cfg
    }
    /// Number of parameters d.
    pub fn num_params(&self) -> usize {
        self.d
    }
    /// Slots of the window holding a gradient (≤ num_grads).
    pub fn filled_slots(&self) -> usize {
        self.filled
    }
    /// The slot the next gradient goes to.
    pub fn ring_index(&self) -> usize {
        self.ring
    }
    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.steps
    }
    /// What the last step did.
    pub fn last_step(&self) -> Option<MFacStep> {
        self.last
    }
    /// ‖lr·direction‖ of the last step (0 before the first).
    pub fn last_update_norm(&self) -> f64 {
        self.last.map(|s| s.update_norm).unwrap_or(0.0)
    }
    /// cos(direction, gradient) of the last step.
    pub fn last_cosine(&self) -> f64 {
        self.last.map(|s| s.cosine).unwrap_or(0.0)
    }
    /// u = F⁻¹g of the last step (before momentum and lr), flattened in the vars' order.
    /// With the window on a CUDA device it is copied back only after
    /// [`MFac::record_preconditioned`]`(true)` (else it is empty).
    pub fn preconditioned_gradient(&self) -> &[f64] {
        self.window.preconditioned()
    }

    /// With the window on a CUDA device: keep u = F⁻¹g of every step there (d f64) and copy it
    /// back after each step, for [`MFac::preconditioned_gradient`] (checks; it costs a d-sized
    /// write and copy per step). On the CPU u is always kept; this does nothing.
    ///
    /// ```
    /// use candle_core::{Device, Var};
    /// use mfac_lab::optim::{MFac, MFacConfig};
    /// let w = Var::new(&[1.0f32, 2.0], &Device::Cpu)?;
    /// let mut opt = MFac::try_new(vec![w], MFacConfig { num_grads: 2, ..Default::default() })?;
    /// opt.record_preconditioned(true)?;
    /// assert!(!opt.on_device());
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn record_preconditioned(&mut self, on: bool) -> Result<()> {
        self.window.record_preconditioned(on)
    }

    /// Whether the window lives on a CUDA device (the parameters' device).
    pub fn on_device(&self) -> bool {
        self.window.on_device()
    }

    /// Times the parts of every step (device window only; CUDA events, which add a few
    /// synchronisations): read them with [`MFac::last_profile`].
    pub fn profile_steps(&mut self, on: bool) {
        self.window.profile_steps(on)
    }

    /// The parts of the last step (gather, pass 1, host m×m work, pass 2), when profiling a
    /// device window; `None` on the CPU.
    pub fn last_profile(&self) -> Option<StepProfile> {
        self.window.last_profile()
    }

    /// Median device time (ms) of one plain read of the whole window, over `reps` reads: half
    /// of the step's floor (a step reads the window twice). `None` on the CPU.
    pub fn window_read_ms(&self, reps: usize) -> Result<Option<f64>> {
        self.window.read_ms(reps)
    }
    /// The m×m Gram matrix K = G Gᵀ (f64, CPU).
    pub fn gram_matrix(&self) -> Result<Tensor> {
        let m = self.cfg.num_grads;
        Ok(Tensor::from_vec(self.gram.gram(), (m, m), &Device::Cpu)?)
    }
    /// Row `slot` of the window, as f64 (what the window stores, in its dtype's precision).
    pub fn window_row(&self, slot: usize) -> Result<Vec<f64>> {
        if slot >= self.cfg.num_grads {
            return Err(Error::InvalidArgument(format!(
                "slot {slot} ≥ num_grads {}",
                self.cfg.num_grads
            )));
        }
        self.window.row(slot)
    }
    /// c of the last step, from the O(m²) path.
    pub fn coefficients(&self) -> &[f64] {
        &self.last_c
    }
    /// c of the last step solved from scratch (Cholesky of mλI + K): for checks.
    pub fn coefficients_from_scratch(&self) -> Vec<f64> {
        let m = self.cfg.num_grads;
        self.gram.solve_from_scratch((self.ring + m - 1) % m)
    }
    /// How many times the inverse was rebuilt from scratch.
    pub fn refresh_count(&self) -> usize {
        self.gram.refreshes()
    }
    /// How many of those rebuilds the backward-error guard forced (a loss of accuracy in the
    /// O(m²) update, repaired in the same step).
    pub fn repair_count(&self) -> usize {
        self.gram.repairs()
    }
    /// Where the m×m side's time went since the optimizer was made (steps, seconds, rebuilds):
    /// the host's f64 work, on the CPU and with a device window alike.
    pub fn gram_timing(&self) -> GramTiming {
        self.gram.timing()
    }
    /// Bytes held by the window (m × d elements; a device window pads its rows by < 512; the
    /// sparse window's m rows of kept entries).
    pub fn window_bytes(&self) -> u128 {
        match self.window.sparse_sizes() {
            Some((_, rows, _)) => rows,
            None => self.cfg.window_bytes(self.d),
        }
    }

    /// Whether the window is sparse (top-k rows with error feedback).
    pub fn is_sparse(&self) -> bool {
        self.window.is_sparse()
    }

    /// Entries each window row keeps: d for the dense window, k for the sparse one.
    pub fn kept_per_row(&self) -> usize {
        self.window.sparse_sizes().map_or(self.d, |s| s.0)
    }

    /// The sparse window's row `slot`: its kept columns (ascending, in the vars' flattened
    /// order) and values (as stored, as f64). `None` for the dense window or a slot ≥ num_grads.
    pub fn kept_entries(&self, slot: usize) -> Option<(Vec<u32>, Vec<f64>)> {
        if slot >= self.cfg.num_grads {
            return None;
        }
        self.window.sparse_kept(slot)
    }

    /// Where the sparse window's last step spent its time (accumulator, selection, row write,
    /// the two passes, the update); `None` for the dense window. The m×m side is in
    /// [`MFac::gram_timing`].
    pub fn sparse_profile(&self) -> Option<SparseProfile> {
        self.window.sparse().map(|s| s.profile())
    }

    /// The sparse window's error-feedback accumulator e (what the rows have not taken yet),
    /// flattened in the vars' order, as f64. `None` for the dense window.
    pub fn error_feedback(&self) -> Option<Vec<f64>> {
        self.window.sparse_error()
    }
}

impl Optim for MFac {
    fn kind(&self) -> &'static str {
        <MFacConfig as OptimConfig>::KIND
    }
    fn label(&self) -> String {
        OptimConfig::label(&self.cfg)
    }
    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
    fn try_step(&mut self, grads: &GradStore) -> Result<()> {
        MFac::try_step(self, grads).map(|_| ())
    }
    fn save_state(&self, path: &std::path::Path) -> Result<()> {
        MFac::save_state(self, path)
    }
    fn load_state(&mut self, path: &std::path::Path) -> Result<()> {
        MFac::load_state(self, path)
    }
    /// The window (m × d in its dtype), the m×m side (K, B and B's diagonal, f64) and the
    /// d-sized f64 vectors of a step (u = F⁻¹g, and the momentum buffer when momentum > 0).
    /// The sparse window: its rows, the error accumulator, u and the same m×m side.
    fn state_bytes(&self) -> u64 {
        let m_side = self.gram.bytes() + 8 * self.last_c.len() as u64;
        if let Some((_, _, state)) = self.window.sparse_sizes() {
            return state as u64 + m_side;
        }
        let vectors = if self.cfg.momentum > 0.0 { 2 } else { 1 };
        self.window_bytes() as u64 + m_side + vectors * 8 * self.d as u64
    }
}

impl candle_nn::Optimizer for MFac {
    type Config = MFacConfig;

    fn new(vars: Vec<Var>, cfg: MFacConfig) -> candle_core::Result<Self> {
        MFac::try_new(vars, cfg).map_err(candle_core::Error::wrap)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.try_step(grads)
            .map(|_| ())
            .map_err(candle_core::Error::wrap)
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}
