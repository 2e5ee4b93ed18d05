//! What our CUDA kernels need of a GPU, as plain checks (tested without one). build.rs compiles
//! both kernel files for sm_90a (machine code) + compute_90 (PTX): a GPU below compute
//! capability 9.0 (an A100 is 8.0) cannot load them, so the device window and the CUDA pass
//! refuse it with a clear message instead of failing at the module load of every step.

use crate::error::{Error, Result};

/// One launch of our kernels: a 1-D grid of `grid` blocks of `block` threads with `shared`
/// bytes of dynamic shared memory. Each layer's `launch.rs` (M-FAC's window, the CUDA pass)
/// builds these; the cudarc code converts them, and the emulated kernel tests run them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Launch {
    pub grid: u32,
    pub block: u32,
    pub shared: u32,
}

impl Launch {
    /// `blocks` blocks (at least one) of `block` threads with `shared` bytes.
    pub(crate) fn new(blocks: usize, block: u32, shared: usize) -> Self {
        Launch {
            grid: blocks.max(1) as u32,
            block,
            shared: shared as u32,
        }
    }

    /// Runs `body` as every thread of this launch on the CPU harness (crates/cuda-emu) under
    /// `schedule`; a harness diagnostic fails the test.
    #[cfg(test)]
    pub(crate) fn emulate(self, schedule: cuda_emu::Schedule, body: impl Fn()) {
        let (grid, block) = ([self.grid, 1, 1], [self.block, 1, 1]);
        if let Err(e) = cuda_emu::launch(grid, block, self.shared as usize, schedule, body) {
            panic!("{schedule:?}: {e}");
        }
    }
}

#[cfg(feature = "cuda")]
impl From<Launch> for candle_core::cuda_backend::cudarc::driver::LaunchConfig {
    fn from(l: Launch) -> Self {
        Self {
            grid_dim: (l.grid, 1, 1),
            block_dim: (l.block, 1, 1),
            shared_mem_bytes: l.shared,
        }
    }
}

/// Bytes in use on `device`'s GPU, the whole device (total − free, after its stream has
/// finished: memory freed asynchronously counts as free only then); `None` on the CPU or when
/// the driver does not say.
///
/// ```
/// assert_eq!(mfac_lab::gpu::device_used_bytes(&candle_core::Device::Cpu), None);
/// ```
pub fn device_used_bytes(device: &candle_core::Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(d) = device {
        let stream = d.cuda_stream();
        stream.synchronize().ok()?;
        let (free, total) = stream.context().mem_get_info().ok()?;
        return Some(total.saturating_sub(free) as u64);
    }
    let _ = device;
    None
}

/// The lowest compute capability our fatbins run on (major, minor).
pub const KERNEL_CAPABILITY: (i32, i32) = (9, 0);

/// Whether a GPU of compute capability `major.minor` can load our kernels.
///
/// ```
/// use mfac_lab::gpu::runs_our_kernels;
/// assert!(runs_our_kernels(9, 0) && runs_our_kernels(10, 0));
/// assert!(!runs_our_kernels(8, 0));
/// ```
pub fn runs_our_kernels(major: i32, minor: i32) -> bool {
    (major, minor) >= KERNEL_CAPABILITY
}

/// An error naming `what` (the window or the pass) and the way out when the GPU cannot load
/// our kernels.
pub fn check_capability(major: i32, minor: i32, what: &str) -> Result<()> {
    if runs_our_kernels(major, minor) {
        return Ok(());
    }
    Err(Error::Cuda {
        op: format!("starting {what}"),
        message: format!(
            "this GPU has compute capability {major}.{minor}; our kernels are built for {}.{} and later (H100/H200: sm_90a + compute_90 PTX). Train on the CPU (--device cpu), or rebuild with build.rs's -gencode set for this GPU",
            KERNEL_CAPABILITY.0, KERNEL_CAPABILITY.1
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_a100_is_refused_with_the_way_out() {
        let e = check_capability(8, 0, "M-FAC's device window")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("compute capability 8.0") && e.contains("--device cpu"),
            "{e}"
        );
        assert!(check_capability(9, 0, "the CUDA pass").is_ok());
    }
}
