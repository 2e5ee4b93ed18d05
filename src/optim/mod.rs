//! Optimizers and their helpers: torch-exact AdamW, gradient clipping, the linear schedule.
//! (M-FAC lands here next.)

mod adamw;
mod clip;
mod schedule;

pub use adamw::{AdamW, AdamWConfig};
pub use clip::{clip_grad_norm, grad_norm};
pub use schedule::LinearSchedule;
