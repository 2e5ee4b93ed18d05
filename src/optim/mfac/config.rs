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
#[derive(Debug, Clone, Copy, PartialEq)]
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
    /// Storage of the window: F32 (default), BF16 (half the memory and traffic) or F64.
    pub window_dtype: DType,
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
        if !matches!(self.window_dtype, DType::F32 | DType::BF16 | DType::F64) {
            return Err(bad(
                "window_dtype",
                format!("{:?} is not supported: f32, bf16 or f64", self.window_dtype),
            ));
        }
        Ok(())
    }

    /// Bytes of the m×d window for `d` parameters.
    pub fn window_bytes(&self, d: usize) -> u128 {
        self.num_grads as u128 * d as u128 * self.window_dtype.size_in_bytes() as u128
    }
}

/// `--optim MFAC`: `--optim_args` keys `lr`, `num_grads`, `damp`, `momentum`,
/// `weight_decay` (coupled: added to the gradient) and `window_dtype` (`f32`, `bf16`, `f64`).
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
        format!("M-FAC m={}", self.num_grads)
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
        ]
    }
    fn build(&self, vars: &[(String, Var)]) -> Result<Box<dyn Optim>> {
        Ok(Box::new(MFac::new_named(vars, *self)?))
    }
}
