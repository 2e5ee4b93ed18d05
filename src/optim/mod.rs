//! Optimizers and their helpers: M-FAC, torch-exact AdamW and SGD behind one seam ([`Optim`],
//! [`OptimConfig`]), gradient clipping, the linear schedule, and `OptimizerSpec` (run_glue's
//! `--optim` / `--optim_args`).

mod adamw;
mod args;
mod clip;
mod host;
mod label;
mod mfac;
mod schedule;
mod seam;
mod sgd;
pub(crate) mod spec;
mod state;
mod util;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, grad_norm};
pub use label::CARD_LR;
pub use mfac::{GramTiming, MFac, MFacConfig, MFacStep, SparseProfile, StepProfile};
pub use schedule::LinearSchedule;
pub use seam::{AsAny, Optim, OptimConfig};
pub use sgd::{Sgd, SgdConfig};
pub use spec::{OptimKind, OptimizerSpec, ADAMW_KEYS, MFAC_KEYS, SGD_KEYS};
