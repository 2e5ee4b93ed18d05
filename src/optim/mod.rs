//! Optimizers and their helpers: M-FAC, torch-exact AdamW, gradient clipping, the linear
//! schedule, and `OptimizerSpec` (run_glue's `--optim` / `--optim_args`).

mod adamw;
mod clip;
mod gram;
mod host;
mod mfac;
mod schedule;
pub(crate) mod spec;
mod window;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, grad_norm};
pub use mfac::{MFac, MFacConfig, MFacStep};
pub use schedule::LinearSchedule;
pub use spec::{OptimizerSpec, ADAMW_KEYS, MFAC_KEYS, OPTIM_NAMES};

/// Two plain streaming reads' worth of work over a buffer: the floor an M-FAC step is measured
/// against in benchmarks (returns a checksum).
pub fn streaming_read(buf: &[f32]) -> f64 {
    window::streaming_read(buf)
}
