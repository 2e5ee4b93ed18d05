//! SGD with torch's exact update (`torch.optim.SGD`, HF's `--optim sgd`), with HF Trainer's
//! parameter groups (no weight decay on biases and LayerNorm weights). The worked example of
//! adding an optimizer through the seam (docs/DESIGN.md).
//!
//! torch's rule for one parameter p with gradient g, step t (torch/optim/sgd.py,
//! `_single_tensor_sgd`):
//!
//! ```text
//! g ← g + wd·p                                   (weight_decay ≠ 0)
//! b ← g                       at the first step  (momentum ≠ 0; no dampening then)
//! b ← μ·b + (1 − τ)·g         afterwards
//! g ← g + μ·b  (nesterov)  or  g ← b
//! p ← p − lr·g
//! ```

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::optim::args::{check, flag, number, option_err};
use crate::optim::label::num;
use crate::optim::seam::{Optim, OptimConfig};
use crate::optim::state::{StateReader, StateWriter};

/// SGD hyper-parameters, torch's names and defaults (lr 1e-3, the rest off).
///
/// ```
/// use mfac_lab::optim::{OptimizerSpec, SgdConfig};
/// let c = SgdConfig { lr: 1e-2, momentum: 0.9, ..Default::default() };
/// assert_eq!((c.dampening, c.nesterov, c.weight_decay), (0.0, false, 0.0));
/// assert_eq!(OptimizerSpec::parse("sgd", "lr: 1e-2, momentum: 0.9").unwrap(), OptimizerSpec::sgd(c));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor μ (0 = plain SGD).
    pub momentum: f64,
    /// Dampening τ of the momentum: b ← μ·b + (1 − τ)·g (not at the first step).
    pub dampening: f64,
    /// Nesterov momentum: the step is g + μ·b instead of b.
    pub nesterov: bool,
    /// L2 penalty added to the gradient: g + wd·p (not on biases and LayerNorm weights).
    pub weight_decay: f64,
}

impl Default for SgdConfig {
    fn default() -> Self {
        SgdConfig {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
        }
    }
}

/// `--optim sgd`: `--optim_args` keys `lr`, `momentum`, `dampening`, `nesterov`,
/// `weight_decay`; torch's checks (nesterov needs a momentum and no dampening).
impl OptimConfig for SgdConfig {
    const KIND: &'static str = "sgd";
    const NAMES: &'static [&'static str] = &["sgd"];
    const KEYS: &'static [&'static str] =
        &["lr", "momentum", "dampening", "nesterov", "weight_decay"];

    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let keys = Self::KEYS;
        match key {
            "lr" | "learning_rate" => self.lr = number(key, value, keys)?,
            "momentum" => self.momentum = number(key, value, keys)?,
            "dampening" => self.dampening = number(key, value, keys)?,
            "nesterov" => self.nesterov = flag(key, value, keys)?,
            "weight_decay" => self.weight_decay = number(key, value, keys)?,
            _ => return Err(option_err(key, "unknown key for SGD", keys)),
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        let keys = Self::KEYS;
        let finite_nonneg = |x: f64| x >= 0.0 && x.is_finite();
        check("lr", finite_nonneg(self.lr), "must be ≥ 0 and finite", keys)?;
        check(
            "momentum",
            finite_nonneg(self.momentum),
            "must be ≥ 0 and finite",
            keys,
        )?;
        check(
            "dampening",
            self.dampening.is_finite(),
            "must be finite",
            keys,
        )?;
        check(
            "weight_decay",
            finite_nonneg(self.weight_decay),
            "must be ≥ 0 and finite",
            keys,
        )?;
        check(
            "nesterov",
            !self.nesterov || (self.momentum > 0.0 && self.dampening == 0.0),
            "Nesterov momentum needs a momentum > 0 and dampening 0 (as torch)",
            keys,
        )
    }

    fn lr(&self) -> f64 {
        self.lr
    }

    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    fn set_hf_weight_decay(&mut self, wd: f64) {
        self.weight_decay = wd;
    }

    fn head(&self) -> String {
        "SGD".into()
    }

    fn fields(&self, full: bool) -> Vec<(&'static str, String)> {
        vec![
            ("lr", num(self.lr, full)),
            ("momentum", num(self.momentum, full)),
            ("dampening", num(self.dampening, full)),
            ("nesterov", self.nesterov.to_string()),
            ("weight_decay", num(self.weight_decay, full)),
        ]
    }

    fn build(&self, vars: &[(String, Var)]) -> Result<Box<dyn Optim>> {
        Ok(Box::new(Sgd::new_named(vars, *self)?))
    }
}

struct Slot {
    var: Var,
    name: String,
    /// Whether weight decay applies (HF's grouping).
    decay: bool,
    /// torch's `momentum_buffer`: none until the parameter's first step with momentum.
    buffer: Option<Tensor>,
}

/// torch SGD. Implements [`Optim`] and `candle_nn::Optimizer`; runs wherever the parameters
/// live (tensor ops), in their dtype.
///
/// ```
/// use candle_core::{Device, Var};
/// use candle_nn::Optimizer;
/// use mfac_lab::optim::{Sgd, SgdConfig};
/// let w = Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
/// let mut opt = Sgd::new(vec![w.clone()], SgdConfig { lr: 0.1, momentum: 0.9, ..Default::default() })?;
/// for _ in 0..2 {
///     opt.backward_step(&w.as_tensor().sqr()?.sum_all()?)?; // gradient 2w
/// }
/// // b₁ = g₁ = 2w₀; w₁ = 0.8·w₀; b₂ = 0.9·b₁ + g₂ = 3.4·w₀; w₂ = w₁ − 0.34·w₀ = 0.46·w₀.
/// let got = w.as_tensor().to_vec1::<f64>()?;
/// assert!((got[0] - 0.46).abs() < 1e-15 && (got[1] + 0.92).abs() < 1e-15);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct Sgd {
    slots: Vec<Slot>,
    cfg: SgdConfig,
    t: u64,
}

impl Sgd {
    /// SGD over named parameters with HF Trainer's grouping: biases and LayerNorm weights get
    /// no weight decay. Non-float variables are skipped.
    pub fn new_named(vars: &[(String, Var)], cfg: SgdConfig) -> Result<Self> {
        OptimConfig::validate(&cfg)?;
        let slots = vars
            .iter()
            .filter(|(_, v)| v.dtype().is_float())
            .map(|(name, var)| Slot {
                var: var.clone(),
                name: name.clone(),
                decay: !(name.ends_with(".bias") || name.contains("LayerNorm")),
                buffer: None,
            })
            .collect();
        Ok(Sgd { slots, cfg, t: 0 })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &SgdConfig {
        &self.cfg
    }

    /// Number of steps taken.
    pub fn step_count(&self) -> u64 {
        self.t
    }

    /// Whether each parameter gets weight decay, with its name, in order.
    pub fn decay_flags(&self) -> Vec<(String, bool)> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), s.decay))
            .collect()
    }

    fn update(&mut self, grads: &GradStore) -> Result<()> {
        let SgdConfig {
            lr,
            momentum,
            dampening,
            nesterov,
            weight_decay,
        } = self.cfg;
        for s in &mut self.slots {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            let p = s.var.as_tensor();
            let mut d = g.to_dtype(p.dtype())?;
            if weight_decay != 0.0 && s.decay {
                d = (d + p.affine(weight_decay, 0.0)?)?;
            }
            if momentum != 0.0 {
                let b = match s.buffer.take() {
                    None => d.copy()?,
                    Some(b) => (b.affine(momentum, 0.0)? + d.affine(1.0 - dampening, 0.0)?)?,
                };
                d = if nesterov {
                    (d + b.affine(momentum, 0.0)?)?
                } else {
                    b.clone()
                };
                s.buffer = Some(b);
            }
            s.var.set(&(p - d.affine(lr, 0.0)?)?)?;
        }
        self.t += 1;
        Ok(())
    }

    /// Writes the state (step count and each momentum buffer, as f64: exact for f32, bf16 and
    /// f64 parameters) to `path`, atomically. [`Sgd::load_state`] restores it exactly.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut host: Vec<(String, Vec<f64>)> = vec![];
        for (i, s) in self.slots.iter().enumerate() {
            if let Some(b) = &s.buffer {
                host.push((
                    format!("momentum_buffer.{i}"),
                    b.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?,
                ));
            }
        }
        let mut w = StateWriter::default();
        for (n, v) in &host {
            w.add(n.clone(), v, &[]);
        }
        let names: Vec<&str> = self.slots.iter().map(|s| s.name.as_str()).collect();
        let buffers: Vec<bool> = self.slots.iter().map(|s| s.buffer.is_some()).collect();
        w.write(
            path,
            &serde_json::json!({"optimizer": "sgd", "step": self.t, "names": names, "buffers": buffers}),
        )
    }

    /// Restores a state written by [`Sgd::save_state`] for the same parameters.
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let mut r = StateReader::open(path)?;
        let kind: String = r.scalar("optimizer")?;
        let mine: Vec<&str> = self.slots.iter().map(|s| s.name.as_str()).collect();
        let names: Vec<String> = if kind == "sgd" {
            r.scalar("names")?
        } else {
            vec![]
        };
        if kind != "sgd" || names != mine {
            return Err(Error::InvalidArgument(format!(
                "{}: this checkpoint's optimizer ({kind}, {} parameters) does not match the run's (sgd, {} parameters); resume with the same optimizer and model",
                path.display(),
                names.len(),
                mine.len()
            )));
        }
        let buffers: Vec<bool> = r.scalar("buffers")?;
        if buffers.len() != self.slots.len()
            || (self.cfg.momentum == 0.0 && buffers.contains(&true))
        {
            return Err(Error::InvalidArgument(format!(
                "{}: the checkpoint's momentum buffers do not match the run's momentum {}; resume with the same optimizer settings",
                path.display(),
                self.cfg.momentum
            )));
        }
        let t: u64 = r.scalar("step")?;
        for (i, (s, has)) in self.slots.iter_mut().zip(buffers).enumerate() {
            s.buffer = if has {
                let p = s.var.as_tensor();
                let mut x = vec![0.0f64; p.elem_count()];
                r.read_into(&format!("momentum_buffer.{i}"), &mut x)?;
                Some(
                    Tensor::from_vec(x, p.shape(), &candle_core::Device::Cpu)?
                        .to_dtype(p.dtype())?
                        .to_device(p.device())?,
                )
            } else {
                None
            };
        }
        self.t = t;
        Ok(())
    }
}

impl Optim for Sgd {
    fn kind(&self) -> &'static str {
        <SgdConfig as OptimConfig>::KIND
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
        self.update(grads)
    }
    fn save_state(&self, path: &Path) -> Result<()> {
        Sgd::save_state(self, path)
    }
    fn load_state(&mut self, path: &Path) -> Result<()> {
        Sgd::load_state(self, path)
    }
    fn state_bytes(&self) -> u64 {
        self.slots
            .iter()
            .filter_map(|s| s.buffer.as_ref())
            .map(|b| (b.elem_count() * b.dtype().size_in_bytes()) as u64)
            .sum()
    }
}

impl candle_nn::Optimizer for Sgd {
    type Config = SgdConfig;

    /// SGD over unnamed parameters: every one gets the weight decay (torch's single group).
    fn new(vars: Vec<Var>, cfg: SgdConfig) -> candle_core::Result<Self> {
        let named: Vec<(String, Var)> = vars
            .into_iter()
            .enumerate()
            .map(|(i, v)| (format!("param{i}"), v))
            .collect();
        Sgd::new_named(&named, cfg).map_err(candle_core::Error::wrap)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.update(grads).map_err(candle_core::Error::wrap)
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}
