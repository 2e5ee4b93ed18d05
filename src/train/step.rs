//! One training step with HF Trainer's semantics: loss, backward, clip, optimizer step at the
//! scheduled learning rate. The Trainer's loop and the trajectory replay both use this code.

use std::time::Instant;

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
    /// Seconds of the forward and backward pass (the loss and its gradients).
    pub fwd_bwd_seconds: f64,
    /// Seconds of the update: gradient clipping and the optimizer's step (on a GPU, until the
    /// device has finished it).
    pub optim_seconds: f64,
}

/// The per-step machinery: config, schedule, optimizer.
pub struct Stepper {
    cfg: TrainConfig,
    schedule: LinearSchedule,
    optim: Box<dyn Optim>,
    peak_lr: f64,
    /// The most device memory seen in use (GPU only; see [`Stepper::device_peak_bytes`]).
    device_peak: Option<u64>,
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
            device_peak: None,
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

    /// The most memory seen in use on the model's GPU (device-wide: total − free), sampled
    /// after each step's backward pass (gradients alive) and after its update; `None` on the
    /// CPU. A sample misses what is freed within a pass, so this is a lower bound of the peak.
    pub fn device_peak_bytes(&self) -> Option<u64> {
        self.device_peak
    }

    fn sample_device(&mut self, device: &candle_core::Device) {
        if let Some(used) = crate::gpu::device_used_bytes(device) {
            self.device_peak = Some(self.device_peak.map_or(used, |p| p.max(used)));
        }
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
        let device = model.device();
        let t0 = Instant::now();
        let (loss_value, mut grads) = model.loss_and_grads(batch, self.cfg.dropout)?;
        // On a GPU the work is asynchronous: wait for it, so that each part's time is its own.
        device.synchronize()?;
        let fwd_bwd_seconds = t0.elapsed().as_secs_f64();
        self.sample_device(device);
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
        let t1 = Instant::now();
        let grad_norm = match self.cfg.max_grad_norm {
            Some(max) if max > 0.0 => clip_grad_norm(&mut grads, &vars, max)?,
            _ => crate::optim::grad_norm(&grads, &vars)?,
        };
        let lr = self.lr_at(step);
        self.optim.set_learning_rate(lr);
        self.optim.try_step(&grads)?;
        device.synchronize()?;
        let optim_seconds = t1.elapsed().as_secs_f64();
        self.sample_device(device);
        Ok(StepRecord {
            loss: loss_value,
            lr,
            grad_norm,
            fwd_bwd_seconds,
            optim_seconds,
        })
    }
}

/// A scalar tensor as f64.
pub fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}
