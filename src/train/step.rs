//! One training step with HF Trainer's semantics: loss, backward, clip, optimizer step at the
//! scheduled learning rate. The Trainer's loop and the trajectory replay both use this code.

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::model::{Batch, BertClassifier};
use crate::optim::{clip_grad_norm, LinearSchedule, Optim, OptimizerSpec};
use crate::train::config::{Schedule, TrainConfig};

/// What one step measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRecord {
    /// Mean cross-entropy of the batch before the update.
    pub loss: f64,
    /// Learning rate used by the update.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

/// The per-step machinery: config, schedule, optimizer.
pub struct Stepper {
    cfg: TrainConfig,
    schedule: LinearSchedule,
    optim: Box<dyn Optim>,
    peak_lr: f64,
}

impl Stepper {
    /// A stepper for `total_steps` updates. The peak learning rate is the optimizer spec's.
    pub fn new(
        model: &BertClassifier,
        spec: &OptimizerSpec,
        cfg: &TrainConfig,
        total_steps: usize,
    ) -> Result<Self> {
        let peak_lr = spec.lr();
        Ok(Stepper {
            cfg: cfg.clone(),
            schedule: LinearSchedule::new(peak_lr, total_steps),
            optim: spec.build(model.named_vars())?,
            peak_lr,
        })
    }

    /// The learning rate of update `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        match self.cfg.schedule {
            Schedule::Linear => self.schedule.lr_at(step),
            Schedule::Constant => self.peak_lr,
        }
    }

    /// The optimizer (e.g. to inspect M-FAC: `optimizer().downcast_ref::<MFac>()`).
    pub fn optimizer(&self) -> &dyn Optim {
        self.optim.as_ref()
    }

    /// The optimizer, mutable (e.g. to load a checkpoint's state).
    pub fn optimizer_mut(&mut self) -> &mut dyn Optim {
        self.optim.as_mut()
    }

    /// Update `step`: loss of `batch` (dropout per config), backward, clip (HF order: clip,
    /// optimizer step at lr_at(step), then the schedule moves on). A non-finite loss is an
    /// error and leaves the parameters untouched.
    pub fn step(
        &mut self,
        model: &BertClassifier,
        batch: &Batch,
        step: usize,
    ) -> Result<StepRecord> {
        let (loss_value, mut grads) = model.loss_and_grads(batch, self.cfg.dropout)?;
        if !loss_value.is_finite() {
            return Err(Error::NonFiniteLoss {
                step,
                loss: loss_value,
                saved: String::new(),
            });
        }
        let vars = model.vars();
        // Gradients are keyed by tensor id. In evcxr, a model created in another cell can share
        // ids with this cell's tensors: catch the mix-up instead of training on wrong gradients.
        for v in &vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                if g.dims() != v.dims() {
                    return Err(Error::InvalidArgument(format!(
                        "a gradient of shape {:?} was stored for a parameter of shape {:?}: tensor \
                         ids collide (in evcxr, a model made in another cell: call \
                         model.rebind() in this cell, or use Trainer, which does)",
                        g.dims(),
                        v.dims()
                    )));
                }
            }
        }
        let grad_norm = match self.cfg.max_grad_norm {
            Some(max) if max > 0.0 => clip_grad_norm(&mut grads, &vars, max)?,
            _ => crate::optim::grad_norm(&grads, &vars)?,
        };
        let lr = self.lr_at(step);
        self.optim.set_learning_rate(lr);
        self.optim.try_step(&grads)?;
        Ok(StepRecord {
            loss: loss_value,
            lr,
            grad_norm,
        })
    }
}

/// A scalar tensor as f64.
pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}
