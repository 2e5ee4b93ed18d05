//! M-FAC's hyper-parameters ([`MFacConfig`]): defaults, the model card's, validation, and the
//! `--optim MFAC --optim_args` keys.

use candle_core::{DType, Var};

use crate::error::{Error, Result};
use crate::optim::args::{count, dtype, number, option_err};
use crate::optim::label::{dtype_name, num};
use crate::optim::seam::{Optim, OptimConfig};
use crate::optim::MFac;

/// M-FAC hyper-parameters.
///
/// ```
/// use mfac_lab::optim::MFacConfig;
/// let card = MFacConfig::model_card();
/// assert_eq!((card.lr, card.num_grads, card.damp), (1e-4, 1024, 1e-6));
/// assert_eq!(MFacConfig::default().damp, 1e-5);
/// ```
#[derive(Clone, Copy, PartialEq)]
pub struct MFacConfig {
    /// Learning rate (read at every step, so schedules work).
    pub lr: f64,
    /// Window size m: how many recent gradients model the curvature.
    pub num_grads: usize,
    /// Damping λ: F = λI + (1/m)GᵀG.
    pub damp: f64,
    /// EMA momentum β on the preconditioned direction (0 = off).
    pub momentum: f64,
    /// Coupled L2 weight decay: wd·w is added to the gradient before it enters the window.
    pub weight_decay: f64,
    /// Storage of the window: F32 (default), BF16 (half the memory and traffic) or F64. With
    /// the sparse window: the kept values' dtype.
    pub window_dtype: DType,
    /// Fraction ρ ∈ (0, 1] of the d entries each window row keeps (Sparse M-FAC: the top-k of
    /// an error-feedback accumulator). 1 (the default) is the dense window; below 1 the window
    /// keeps ⌊ρ·d⌋ entries per row (≈ ρ·(2 + value bytes)/(value bytes) of the dense memory).
    pub density: f64,
    /// With the sparse window: keep ⌈block·ρ⌉ entries in each block of this many parameters
    /// (the maintained package's block top-k) instead of the global top-k. A block larger than
    /// d is clamped to d. Setting it selects the sparse window even at density 1.
    pub block_size: Option<usize>,
}

/// The text checkpoints' fingerprints hold: the dense window's fields as before the sparse
/// window existed (so older checkpoints still resume), `density` and `block_size` only when the
/// window is sparse.
impl std::fmt::Debug for MFacConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut s = f.debug_struct("MFacConfig");
        s.field("lr", &self.lr)
            .field("num_grads", &self.num_grads)
            .field("damp", &self.damp)
            .field("momentum", &self.momentum)
            .field("weight_decay", &self.weight_decay)
            .field("window_dtype", &self.window_dtype);
        if self.is_sparse() {
            s.field("density", &self.density)
                .field("block_size", &self.block_size);
        }
        s.finish()
    }
}

impl Default for MFacConfig {
    /// The authors' defaults: lr 1e-3, 1024 gradients, damp 1e-5, no momentum or decay.
    fn default() -> Self {
        MFacConfig {
            lr: 1e-3,
            num_grads: 1024,
            damp: 1e-5,
            momentum: 0.0,
            weight_decay: 0.0,
            window_dtype: DType::F32,
            density: 1.0,
            block_size: None,
        }
    }
}

impl MFacConfig {
    /// The model card's settings for bert-tiny on MNLI: lr 1e-4, 1024 gradients, damp 1e-6.
    pub fn model_card() -> Self {
        MFacConfig {
            lr: 1e-4,
            num_grads: 1024,
            damp: 1e-6,
            ..Default::default()
        }
    }

    /// The model card's settings with a window of `num_grads` gradients and the learning rate
    /// scaled to it: lr = 1e-4 × 1024 / num_grads, damp 1e-6.
    ///
    /// Why: inside the window's span M-FAC's direction is u = m·Gᵀ(mλI + K)⁻¹e_j. When the
    /// window's gradients have similar norms and mλ ≪ ‖g‖² (the card's λ = 1e-6 against
    /// bert-tiny's gradients), this is ≈ m·g/‖g‖² — for orthogonal gradients exactly
    /// m·g/(mλ + ‖g‖²) — so the step length grows linearly with m. The card's lr 1e-4 is tuned
    /// for m = 1024; with m = 32 it takes steps ~32× shorter and M-FAC hardly moves. Scaling lr
    /// by 1024/m keeps lr·m, hence the step length, at the card's. The assumption fails when
    /// mλ is not small against ‖g‖² (large damp, tiny gradients): then the step length
    /// saturates at lr·‖g‖/λ and the scaled lr overshoots; see docs/MFAC_LR.md.
    ///
    /// ```
    /// use mfac_lab::optim::MFacConfig;
    /// assert_eq!(MFacConfig::model_card_with(1024), MFacConfig::model_card());
    /// let small = MFacConfig::model_card_with(32);
    /// assert_eq!((small.num_grads, small.damp), (32, 1e-6));
    /// assert!((small.lr - 3.2e-3).abs() < 1e-15);
    /// // lr·m is the card's 1e-4 × 1024 for every window.
    /// for m in [1, 8, 32, 256, 4096] {
    ///     assert!((MFacConfig::model_card_with(m).lr * m as f64 - 0.1024).abs() < 1e-15);
    /// }
    /// ```
    pub fn model_card_with(num_grads: usize) -> Self {
        let card = Self::model_card();
        MFacConfig {
            num_grads,
            // 1024 / m first: exact for powers of two, so m = 1024 gives exactly 1e-4.
            lr: card.lr * (card.num_grads as f64 / num_grads.max(1) as f64),
            ..card
        }
    }

    /// The same settings with the sparse window at density `density` (global top-k).
    ///
    /// ```
    /// use mfac_lab::optim::MFacConfig;
    /// let sparse = MFacConfig::model_card().with_density(0.01);
    /// assert!(sparse.is_sparse() && !MFacConfig::model_card().is_sparse());
    /// assert_eq!((sparse.lr, sparse.num_grads, sparse.damp), (1e-4, 1024, 1e-6));
    /// // bert-tiny with a 3-way head: 43,863 kept entries a row, 0.27 GB instead of 18 GB.
    /// assert!(sparse.window_bytes(4_386_307) < 280_000_000);
    /// ```
    pub fn with_density(self, density: f64) -> Self {
        MFacConfig { density, ..self }
    }

    /// Whether the window is sparse: a density below 1, or a block size.
    pub fn is_sparse(&self) -> bool {
        self.density < 1.0 || self.block_size.is_some()
    }

    /// Checks every field; the error names the key.
    ///
    /// ```
    /// let bad = mfac_lab::optim::MFacConfig { damp: 0.0, ..Default::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("damp"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, message: String| Error::OptimizerOption {
            key: key.into(),
            message,
            valid: <Self as OptimConfig>::KEYS.join(", "),
        };
        if self.num_grads < 1 {
            return Err(bad("num_grads", "must be at least 1".into()));
        }
        if !(self.damp > 0.0 && self.damp.is_finite()) {
            return Err(bad(
                "damp",
                format!("{} must be positive and finite", self.damp),
            ));
        }
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return Err(bad("lr", format!("{} must be ≥ 0 and finite", self.lr)));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(bad(
                "momentum",
                format!("{} must be in [0, 1)", self.momentum),
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(bad(
                "weight_decay",
                format!("{} must be ≥ 0", self.weight_decay),
            ));
        }
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(bad(
                "density",
                format!(
                    "{} must be in (0, 1]: the fraction of each gradient the window keeps (1 = dense)",
                    self.density
                ),
            ));
        }
        if self.block_size == Some(0) {
            return Err(bad("block_size", "must be at least 1".into()));
        }
        if self.is_sparse() && self.momentum > 0.0 {
            return Err(bad(
                "momentum",
                format!(
                    "{} is not supported with the sparse window (density < 1 or block_size): neither author's sparse code has a momentum that matches dense M-FAC's; use momentum 0",
                    self.momentum
                ),
            ));
        }
        if !matches!(self.window_dtype, DType::F32 | DType::BF16 | DType::F64) {
            return Err(bad(
                "window_dtype",
                format!("{:?} is not supported: f32, bf16 or f64", self.window_dtype),
            ));
        }
        Ok(())
    }

    /// Bytes of the window for `d` parameters: m × d values, or the sparse window's m rows of
    /// kept (column, value) entries.
    pub fn window_bytes(&self, d: usize) -> u128 {
        if self.is_sparse() {
            return crate::optim::mfac::sparse_window_bytes(self, d);
        }
        self.num_grads as u128 * d as u128 * self.window_dtype.size_in_bytes() as u128
    }

    /// Host memory M-FAC needs for `d` parameters (what the memory plan checks before
    /// allocating): the window, the m×m side (K and its inverse, f64) and the d-sized vectors
    /// of a step (u, and the momentum when momentum > 0; the sparse window's error
    /// accumulator).
    ///
    /// ```
    /// use mfac_lab::optim::MFacConfig;
    /// let d = 4_386_307; // bert-tiny with a 3-way head
    /// let card = MFacConfig::model_card();
    /// assert!(card.host_bytes(d) > 17_900_000_000);
    /// assert!(card.with_density(0.01).host_bytes(d) < 400_000_000);
    /// ```
    pub fn host_bytes(&self, d: usize) -> u128 {
        let m = self.num_grads as u128;
        let m_side = 2 * m * m * 8;
        if self.is_sparse() {
            return crate::optim::mfac::sparse_state_bytes(self, d) + m_side;
        }
        let vectors = if self.momentum > 0.0 { 2 } else { 1 };
        self.window_bytes(d) + m_side + vectors * d as u128 * 8
    }

    /// The density as labels show it, a percentage: `1%`, `0.1%`, `100%`.
    ///
    /// ```
    /// use mfac_lab::optim::MFacConfig;
    /// assert_eq!(MFacConfig::model_card().with_density(0.01).density_percent(), "1%");
    /// assert_eq!(MFacConfig::model_card().with_density(0.005).density_percent(), "0.5%");
    /// ```
    pub fn density_percent(&self) -> String {
        format!("{}%", num(self.density * 100.0, false))
    }
}

/// `--optim MFAC`: `--optim_args` keys `lr`, `num_grads`, `damp`, `momentum`,
/// `weight_decay` (coupled: added to the gradient; with the sparse window decoupled:
/// w ← (1 − lr·wd)·w), `window_dtype` (`f32`, `bf16`, `f64`), `density` (in (0, 1]; below 1
/// the sparse window) and `block_size` (block top-k).
impl OptimConfig for MFacConfig {
    const KIND: &'static str = "mfac";
    const NAMES: &'static [&'static str] = &["MFAC", "m-fac"];
    const KEYS: &'static [&'static str] = &[
        "lr",
        "num_grads",
        "damp",
        "momentum",
        "weight_decay",
        "window_dtype",
        "density",
        "block_size",
    ];

    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let keys = Self::KEYS;
        match key {
            "lr" => self.lr = number(key, value, keys)?,
            "num_grads" | "ngrads" => self.num_grads = count(key, value, keys)?,
            "damp" => self.damp = number(key, value, keys)?,
            "momentum" => self.momentum = number(key, value, keys)?,
            "weight_decay" => self.weight_decay = number(key, value, keys)?,
            "window_dtype" => self.window_dtype = dtype(key, value, keys)?,
            "density" => self.density = number(key, value, keys)?,
            "block_size" => self.block_size = Some(count(key, value, keys)?),
            _ => return Err(option_err(key, "unknown key for MFAC", keys)),
        }
        Ok(())
    }
    fn validate(&self) -> Result<()> {
        MFacConfig::validate(self)
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    /// The card's lr scaled to the window: [`MFacConfig::model_card_with`].
    fn compare_lr(&self) -> f64 {
        MFacConfig::model_card_with(self.num_grads).lr
    }
    fn head(&self) -> String {
        match (self.is_sparse(), self.block_size) {
            (false, _) => format!("M-FAC m={}", self.num_grads),
            (true, None) => format!("M-FAC m={} {}", self.num_grads, self.density_percent()),
            (true, Some(b)) => format!(
                "M-FAC m={} {} block {b}",
                self.num_grads,
                self.density_percent()
            ),
        }
    }
    fn compose(&self, extras: &[String]) -> String {
        if extras.is_empty() {
            self.head()
        } else {
            format!("{} ({})", self.head(), extras.join(", "))
        }
    }
    fn fields(&self, full: bool) -> Vec<(&'static str, String)> {
        vec![
            ("lr", num(self.lr, full)),
            ("damp", num(self.damp, full)),
            ("momentum", num(self.momentum, full)),
            ("weight_decay", num(self.weight_decay, full)),
            ("window_dtype", dtype_name(self.window_dtype).into()),
            ("density", num(self.density, full)),
            (
                "block_size",
                self.block_size.map_or("global".into(), |b| b.to_string()),
            ),
        ]
    }
    fn build(&self, vars: &[(String, Var)]) -> Result<Box<dyn Optim>> {
        Ok(Box::new(MFac::new_named(vars, *self)?))
    }
}
