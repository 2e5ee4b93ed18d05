//! The optimizer seam: what the trainer, checkpoints and comparisons need from an optimizer
//! ([`Optim`]), and what `--optim` / `--optim_args` need from its config ([`OptimConfig`]).
//!
//! Adding an optimizer is one file (its config implementing [`OptimConfig`], the optimizer
//! implementing [`Optim`] and `candle_nn::Optimizer`) plus one line in the registry of
//! src/optim/spec.rs; docs/DESIGN.md walks through it with SGD.

use std::any::Any;
use std::fmt::Debug;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::Var;

use crate::error::Result;
use crate::optim::label::{num, CARD_LR};

/// An optimizer as a training run uses it: one step over a gradient store at the learning rate
/// the schedule sets, and its whole state to and from a checkpoint file. AdamW, M-FAC and SGD
/// implement it (and `candle_nn::Optimizer`, for plain candle loops).
///
/// ```
/// use candle_core::{Device, Var};
/// use mfac_lab::optim::{Optim, OptimizerSpec};
/// let w = Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
/// let spec = OptimizerSpec::parse("sgd", "lr: 0.5")?;
/// let mut opt: Box<dyn Optim> = spec.build(&[("w".to_string(), w.clone())])?;
/// let loss = w.as_tensor().sqr()?.sum_all()?; // gradient 2w
/// opt.try_step(&loss.backward()?)?;
/// assert_eq!(w.as_tensor().to_vec1::<f64>()?, [0.0, 0.0]);
/// assert_eq!((opt.kind(), opt.label().as_str()), ("sgd", "SGD lr 0.5"));
/// # Ok::<(), mfac_lab::Error>(())
/// ```
pub trait Optim: AsAny {
    /// The kind's short name: `adamw`, `mfac` or `sgd` (also in checkpoints and histories).
    fn kind(&self) -> &'static str;
    /// A label derived from its settings (as [`crate::optim::OptimizerSpec::display_name`]).
    fn label(&self) -> String;
    /// The learning rate of the next step.
    fn learning_rate(&self) -> f64;
    /// Sets the learning rate of the next step (the schedule calls this before each step).
    fn set_learning_rate(&mut self, lr: f64);
    /// One update from `grads`. Parameters without a gradient are left as they are.
    fn try_step(&mut self, grads: &GradStore) -> Result<()>;
    /// Writes the whole state to `path` (a safetensors file, atomically), so that
    /// [`Optim::load_state`] into an optimizer built the same way continues bit for bit.
    fn save_state(&self, path: &Path) -> Result<()>;
    /// Restores a state written by [`Optim::save_state`]; an error names the mismatch when the
    /// file was written by another kind, other settings or other parameters.
    fn load_state(&mut self, path: &Path) -> Result<()>;
    /// Bytes of the state it keeps between steps (AdamW's two moments; M-FAC's window, its
    /// m×m matrices and d-sized vectors; SGD's momentum buffers once made): what a comparison
    /// reports beside the time, and about what a checkpoint's optimizer file weighs.
    fn state_bytes(&self) -> u64;
}

/// A value as `dyn Any`, for every `'static` type: what lets a `dyn Optim` be downcast to the
/// optimizer it is (`<dyn Optim>::downcast_ref`).
pub trait AsAny: Any {
    /// The value itself.
    fn as_any(&self) -> &dyn Any;
    /// The value itself, mutable.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

impl<T: Any> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl dyn Optim {
    /// The concrete optimizer, when it is a `T`.
    ///
    /// ```
    /// use candle_core::{Device, Var};
    /// use mfac_lab::optim::{MFac, MFacConfig, OptimizerSpec};
    /// let w = Var::new(&[1.0f64, 2.0], &Device::Cpu)?;
    /// let opt = OptimizerSpec::mfac(MFacConfig { num_grads: 4, ..Default::default() })
    ///     .build(&[("w".into(), w)])?;
    /// assert_eq!(opt.downcast_ref::<MFac>().unwrap().filled_slots(), 0);
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn downcast_ref<T: 'static>(&self) -> Option<&T> {
        self.as_any().downcast_ref()
    }

    /// The concrete optimizer, mutable, when it is a `T`.
    pub fn downcast_mut<T: 'static>(&mut self) -> Option<&mut T> {
        self.as_any_mut().downcast_mut()
    }
}

/// An optimizer's config as `--optim` / `--optim_args` and comparisons see it: its names, its
/// keys and how to read each, its validation (the only one), the fields that tell two runs apart
/// in labels, and how to build the optimizer.
pub trait OptimConfig: Debug + Clone + PartialEq + Default + 'static {
    /// The kind's short name (`adamw`, `mfac`, `sgd`).
    const KIND: &'static str;
    /// The `--optim` names that select it (matched without regard to case).
    const NAMES: &'static [&'static str];
    /// The keys `--optim_args` accepts.
    const KEYS: &'static [&'static str];

    /// Reads one `--optim_args` entry (aliases included); an unknown key or a bad value is an
    /// error naming the key and listing [`OptimConfig::KEYS`].
    fn set(&mut self, key: &str, value: &str) -> Result<()>;
    /// Checks every field (finite, in range); the error names the key.
    fn validate(&self) -> Result<()>;
    /// The (peak) learning rate.
    fn lr(&self) -> f64;
    /// Sets the (peak) learning rate.
    fn set_lr(&mut self, lr: f64);
    /// The learning rate of `compare` when `--optim_args` sets none: the card's 1e-4 (M-FAC
    /// scales it to its window).
    fn compare_lr(&self) -> f64 {
        CARD_LR
    }
    /// run_glue's `--weight_decay` flag, for kinds that take it as HF Trainer's decoupled
    /// decay of its parameter groups (AdamW, SGD); others ignore it.
    fn set_hf_weight_decay(&mut self, _wd: f64) {}
    /// The head of its labels: `AdamW`, `M-FAC m=32`, `SGD`.
    fn head(&self) -> String;
    /// A label from the head and the `key value` fields that tell it apart.
    fn compose(&self, extras: &[String]) -> String {
        if extras.is_empty() {
            self.head()
        } else {
            format!("{} {}", self.head(), extras.join(", "))
        }
    }
    /// The label derived from its settings: the head, and the lr when it differs from the
    /// card's ([`crate::optim::CARD_LR`]), e.g. `AdamW lr 3e-4`, `M-FAC m=32 (lr 3.2e-3)`.
    fn label(&self) -> String {
        let lr = self.lr();
        let extras = if num(lr, false) == num(CARD_LR, false) {
            vec![]
        } else {
            vec![format!("lr {}", num(lr, false))]
        };
        self.compose(&extras)
    }
    /// The (key, value text) fields that may tell two specs apart, `lr` first; `full` keeps
    /// every digit (labels round to 4 significant digits first).
    fn fields(&self, full: bool) -> Vec<(&'static str, String)>;
    /// The optimizer over named parameters (names as `BertClassifier::named_vars` gives them).
    fn build(&self, vars: &[(String, Var)]) -> Result<Box<dyn Optim>>;
}

/// The object-safe face of [`OptimConfig`], so that the registry dispatches to any config.
pub(crate) trait DynConfig {
    fn kind(&self) -> &'static str;
    fn keys(&self) -> &'static [&'static str];
    fn validate(&self) -> Result<()>;
    fn lr(&self) -> f64;
    fn set_lr(&mut self, lr: f64);
    fn compare_lr(&self) -> f64;
    fn set_hf_weight_decay(&mut self, wd: f64);
    fn compose(&self, extras: &[String]) -> String;
    fn label(&self) -> String;
    fn fields(&self, full: bool) -> Vec<(&'static str, String)>;
    fn build(&self, vars: &[(String, Var)]) -> Result<Box<dyn Optim>>;
}

impl<C: OptimConfig> DynConfig for C {
    fn kind(&self) -> &'static str {
        C::KIND
    }
    fn keys(&self) -> &'static [&'static str] {
        C::KEYS
    }
    fn validate(&self) -> Result<()> {
        OptimConfig::validate(self)
    }
    fn lr(&self) -> f64 {
        OptimConfig::lr(self)
    }
    fn set_lr(&mut self, lr: f64) {
        OptimConfig::set_lr(self, lr)
    }
    fn compare_lr(&self) -> f64 {
        OptimConfig::compare_lr(self)
    }
    fn set_hf_weight_decay(&mut self, wd: f64) {
        OptimConfig::set_hf_weight_decay(self, wd)
    }
    fn compose(&self, extras: &[String]) -> String {
        OptimConfig::compose(self, extras)
    }
    fn label(&self) -> String {
        OptimConfig::label(self)
    }
    fn fields(&self, full: bool) -> Vec<(&'static str, String)> {
        OptimConfig::fields(self, full)
    }
    fn build(&self, vars: &[(String, Var)]) -> Result<Box<dyn Optim>> {
        OptimConfig::build(self, vars)
    }
}

/// A config of kind `C` from `--optim_args` text: defaults, then each entry, then one
/// validation.
pub(crate) fn parse_config<C: OptimConfig>(args: &str) -> Result<C> {
    let mut c = C::default();
    for (k, v) in crate::optim::args::pairs(args, C::KEYS)? {
        c.set(&k, &v)?;
    }
    c.validate()?;
    Ok(c)
}
