//! Optimizers and their helpers: M-FAC, torch-exact AdamW, gradient clipping, the linear
//! schedule, and `OptimizerSpec` (run_glue's `--optim` / `--optim_args`).

mod adamw;
mod clip;
mod device;
mod gram;
mod host;
mod mfac;
mod schedule;
pub(crate) mod spec;
mod state;
mod window;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, grad_norm};
pub use device::StepProfile;
pub use gram::GramTiming;
pub use mfac::{MFac, MFacConfig, MFacStep};
pub use schedule::LinearSchedule;
pub use spec::{OptimizerSpec, ADAMW_KEYS, CARD_LR, MFAC_KEYS, OPTIM_NAMES};
