//! M-FAC's window on a CUDA device: the layout and the memory plan (plain host code, tested on
//! every build) and, with the `cuda` feature, the window itself (`cuda.rs`, kernels in
//! `kernels/mfac.cu`). The sparse window's device side sits beside it: `sparse.rs` (plan,
//! launches, the selection's loop), `sparse_cuda.rs` (`cuda` feature), `kernels/sparse.cu`;
//! both kernel files include `kernels/common.cuh`.
//!
//! Layout: the window G is m rows of `ld` elements, ld = d rounded up to a multiple of
//! [`LD_ALIGN`]; the padding columns are zero in G and in g, so they add nothing to G·g or
//! Gᵀc, and every row starts on a 16-byte boundary (each load of the kernels is one aligned
//! 16-byte vector). A step reads G twice (pass 1: G·g, pass 2: Gᵀc), the m×m work stays on the
//! host in f64 (`crate::optim::mfac::gram`), exactly as on the CPU.
//!
//! Memory on the device: the window m·ld·s bytes, the gradient row ld·s, the momentum d·8 (when
//! momentum > 0), the recorded u d·8 (only when asked for), and O(blocks·m) f64 of partial sums.

// Without the `cuda` feature only the tests use the plan.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(test)]
mod emu_tests;
pub(crate) mod launch;
pub(crate) mod sparse;
#[cfg(feature = "cuda")]
mod sparse_cuda;
#[cfg(test)]
mod sparse_emu_tests;
#[cfg(feature = "cuda")]
pub(crate) use cuda::DeviceWindow;
#[cfg(feature = "cuda")]
pub(crate) use sparse_cuda::DeviceSparseWindow;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::optim::mfac::window::HostWindow;
use crate::optim::util::human;

/// Device time of the parts of the last step, in ms (CUDA events), when profiling is on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepProfile {
    /// Gradients (+ weight decay) into the scratch row, with the non-finite check.
    pub gather_ms: f64,
    /// Pass 1 (row write + G·g) and the reduction of K's row, with its copy to the host.
    pub pass1_ms: f64,
    /// The m×m work on the host (f64), wall clock.
    pub host_ms: f64,
    /// Pass 2 (Gᵀc, momentum, update, sums) with the sums' copy to the host.
    pub pass2_ms: f64,
    /// The whole step, wall clock.
    pub total_ms: f64,
}

/// Row stride granularity, in elements: a multiple of every dtype's unit of columns.
pub(crate) const LD_ALIGN: usize = 512;

/// Threads per block of the passes (8 warps); the kernels are compiled for exactly this.
pub(crate) const THREADS: u32 = 256;

/// The largest window the device passes take: K's row and c live in shared memory (f64).
pub(crate) const MAX_DEVICE_GRADS: usize = 8192;

/// Free device memory left for everything else (the model, its activations, cuBLAS).
pub(crate) const HEADROOM: u128 = 1 << 30;

/// Columns per unit of work of a pass: 32 lanes × one 16-byte vector × the vectors per lane
/// (2 for f32 and bf16, 4 for f64), as in `kernels/mfac.cu`.
pub(crate) fn unit_columns(dtype: DType) -> usize {
    match dtype {
        DType::BF16 => 32 * 8 * 2,
        DType::F64 => 32 * 2 * 4,
        _ => 32 * 4 * 2,
    }
}

/// Dynamic shared memory of pass 1 (K's partial row, f64) and pass 2 (c, then the warps' sums
/// of one unit), in bytes.
pub(crate) fn shared_bytes(dtype: DType, rows: usize) -> (usize, usize) {
    let warps = THREADS as usize / 32;
    (rows * 8, rows * 8 + warps * unit_columns(dtype) * 8)
}

/// What a device window of `num_grads` rows over `d` parameters needs, before anything is
/// allocated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DevicePlan {
    /// Window rows m.
    pub m: usize,
    /// Parameters d.
    pub d: usize,
    /// Row stride: d rounded up to [`LD_ALIGN`].
    pub ld: usize,
    /// Window element type.
    pub dtype: DType,
    /// Whether a momentum buffer (d f64) is kept on the device.
    pub momentum: bool,
    /// Blocks of the passes (partial sums are blocks × m f64).
    pub blocks: usize,
}

impl DevicePlan {
    /// The plan for `m` rows of `d` parameters in `dtype`.
    pub fn new(m: usize, d: usize, dtype: DType, momentum: bool, blocks: usize) -> Self {
        DevicePlan {
            m,
            d,
            ld: d.div_ceil(LD_ALIGN).max(1) * LD_ALIGN,
            dtype,
            momentum,
            blocks: blocks.max(1),
        }
    }

    /// Bytes of the window alone (m · ld · s).
    pub fn window_bytes(&self) -> u128 {
        self.m as u128 * self.ld as u128 * self.dtype.size_in_bytes() as u128
    }

    /// Bytes of everything the device window allocates (not the recorded u, which is asked for
    /// separately).
    pub fn needed(&self) -> u128 {
        let s = self.dtype.size_in_bytes() as u128;
        let (m, d, ld, b) = (
            self.m as u128,
            self.d as u128,
            self.ld as u128,
            self.blocks as u128,
        );
        let momentum = if self.momentum { d * 8 } else { 0 };
        self.window_bytes() + ld * s + momentum + (b * m + 2 * m + 2 * b) * 8
    }

    /// The largest number of gradients whose window fits in `free` bytes with this dtype.
    pub fn largest_m(&self, free: u128, dtype: DType) -> usize {
        let one = DevicePlan {
            m: 1,
            dtype,
            ..*self
        };
        let fixed = one.needed() - one.window_bytes() - (one.blocks as u128 + 2) * 8;
        let per_row =
            self.ld as u128 * dtype.size_in_bytes() as u128 + (self.blocks as u128 + 2) * 8;
        let avail = free.saturating_sub(HEADROOM).saturating_sub(fixed);
        (avail / per_row).min(MAX_DEVICE_GRADS as u128) as usize
    }

    /// Checks the window size against the device's limits and its free memory (`free`, from
    /// the driver), keeping [`HEADROOM`] for the rest; the error says how much is needed and
    /// what fits instead (a bf16 window, fewer gradients).
    pub fn check(&self, free: u128) -> Result<()> {
        if self.m > MAX_DEVICE_GRADS {
            return Err(Error::OptimizerOption {
                key: "num_grads".into(),
                message: format!(
                    "{} is more than the CUDA window takes ({MAX_DEVICE_GRADS}); use num_grads ≤ {MAX_DEVICE_GRADS} or keep the model on the CPU",
                    self.m
                ),
                valid: <crate::optim::MFacConfig as crate::optim::OptimConfig>::KEYS.join(", "),
            });
        }
        let needed = self.needed();
        if needed + HEADROOM <= free {
            return Ok(());
        }
        let mut fix = Vec::new();
        if self.dtype != DType::BF16 {
            let bf16 = DevicePlan {
                dtype: DType::BF16,
                ..*self
            };
            if bf16.needed() + HEADROOM <= free {
                fix.push(format!(
                    "a bf16 window (window_dtype: bf16) needs {} and fits",
                    human(bf16.needed())
                ));
            } else {
                let m = self.largest_m(free, DType::BF16);
                if m > 0 {
                    fix.push(format!("a bf16 window fits with num_grads ≤ {m}"));
                }
            }
        }
        let m = self.largest_m(free, self.dtype);
        if m > 0 {
            fix.push(format!(
                "num_grads ≤ {m} fits with the {:?} window",
                self.dtype
            ));
        }
        if fix.is_empty() {
            fix.push("free GPU memory (other processes: nvidia-smi) or train on the CPU".into());
        }
        Err(Error::OutOfMemory {
            what: format!(
                "the M-FAC window on the GPU (num_grads {} × {} parameters × {} bytes, {:?}) and its buffers",
                self.m,
                self.d,
                self.dtype.size_in_bytes(),
                self.dtype
            ),
            needed: format!("{} (+ {} headroom)", human(needed), human(HEADROOM)),
            available: format!("{} free on the GPU", human(free)),
            fix: fix.join("; or "),
        })
    }
}

/// The window's storage as bytes (native endianness), for copies to and from the device.
pub(crate) fn host_bytes(w: &HostWindow) -> &[u8] {
    fn b<T>(v: &[T]) -> &[u8] {
        // SAFETY: f32, bf16 and f64 have no padding; the byte view covers exactly the slice.
        unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
    }
    match w {
        HostWindow::F32(v) => b(v),
        HostWindow::BF16(v) => b(v),
        HostWindow::F64(v) => b(v),
    }
}

/// As [`host_bytes`], writable.
pub(crate) fn host_bytes_mut(w: &mut HostWindow) -> &mut [u8] {
    fn b<T>(v: &mut [T]) -> &mut [u8] {
        // SAFETY: as in `host_bytes`; every bit pattern is a valid f32, bf16 or f64.
        unsafe {
            std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v))
        }
    }
    match w {
        HostWindow::F32(v) => b(v),
        HostWindow::BF16(v) => b(v),
        HostWindow::F64(v) => b(v),
    }
}

/// In place: m rows of stride `ld` → m rows of `d` (the padding dropped, length m·d).
pub(crate) fn compact_rows(w: &mut HostWindow, m: usize, ld: usize, d: usize) {
    fn f<T: Copy>(v: &mut Vec<T>, m: usize, ld: usize, d: usize) {
        for i in 1..m {
            v.copy_within(i * ld..i * ld + d, i * d);
        }
        v.truncate(m * d);
    }
    match w {
        HostWindow::F32(v) => f(v, m, ld, d),
        HostWindow::BF16(v) => f(v, m, ld, d),
        HostWindow::F64(v) => f(v, m, ld, d),
    }
}

/// In place: m rows of `d` → m rows of stride `ld`, the padding zero. `None` when the memory
/// for the longer buffer cannot be had.
pub(crate) fn expand_rows(w: &mut HostWindow, m: usize, d: usize, ld: usize) -> Option<()> {
    fn f<T: Copy + Default>(v: &mut Vec<T>, m: usize, d: usize, ld: usize) -> Option<()> {
        v.try_reserve_exact((m * ld).saturating_sub(v.len())).ok()?;
        v.resize(m * ld, T::default());
        for i in (0..m).rev() {
            v.copy_within(i * d..i * d + d, i * ld);
            v[i * ld + d..(i + 1) * ld].fill(T::default());
        }
        Some(())
    }
    match w {
        HostWindow::F32(v) => f(v, m, d, ld),
        HostWindow::BF16(v) => f(v, m, d, ld),
        HostWindow::F64(v) => f(v, m, d, ld),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BERT_TINY: usize = 4_386_307;

    #[test]
    fn rows_are_padded_to_whole_units() {
        for dtype in [DType::F32, DType::BF16, DType::F64] {
            let p = DevicePlan::new(1024, BERT_TINY, dtype, false, 264);
            assert!(p.ld >= p.d && p.ld - p.d < LD_ALIGN);
            assert_eq!(p.ld % unit_columns(dtype), 0, "{dtype:?}");
            // 16-byte aligned rows.
            assert_eq!((p.ld * dtype.size_in_bytes()) % 16, 0);
        }
        assert_eq!(DevicePlan::new(1, 1, DType::F32, false, 1).ld, LD_ALIGN);
        assert_eq!(DevicePlan::new(1, 512, DType::F32, false, 1).ld, 512);
    }

    #[test]
    fn the_card_window_is_the_documented_size() {
        // mfac.md: G = 17.97 GB in f32 at m = 1024 for bert-tiny; the padding adds < 0.02 %.
        let p = DevicePlan::new(1024, BERT_TINY, DType::F32, false, 264);
        let gb = p.window_bytes() as f64 / 1e9;
        assert!((gb - 17.97).abs() < 0.01, "{gb}");
        let bf = DevicePlan::new(1024, BERT_TINY, DType::BF16, false, 264);
        assert_eq!(bf.window_bytes() * 2, p.window_bytes());
        // Everything else is small: the gradient row, partial sums, K's row, c.
        assert!(p.needed() - p.window_bytes() < 25_000_000);
        let mom = DevicePlan::new(1024, BERT_TINY, DType::F32, true, 264);
        assert_eq!(mom.needed() - p.needed(), BERT_TINY as u128 * 8);
    }

    #[test]
    fn a_window_that_fits_passes_the_check() {
        let p = DevicePlan::new(1024, BERT_TINY, DType::F32, false, 264);
        // An H200: ~140 GB free.
        assert!(p.check(140_000_000_000).is_ok());
    }

    #[test]
    fn a_window_too_large_says_what_is_needed_and_what_fits() {
        let p = DevicePlan::new(1024, BERT_TINY, DType::F32, false, 264);
        // A 16 GB card with 15 GB free: f32 (18 GB) does not fit, bf16 (9 GB) does.
        let e = p.check(15_000_000_000).unwrap_err();
        let text = e.to_string();
        assert!(matches!(e, Error::OutOfMemory { .. }), "{text}");
        assert!(text.contains("17.9"), "{text}");
        assert!(text.contains("15.00 GB free on the GPU"), "{text}");
        assert!(text.contains("bf16"), "{text}");
        assert!(text.contains("num_grads ≤"), "{text}");
        // The suggested num_grads really fits.
        let m = p.largest_m(15_000_000_000, DType::F32);
        assert!(m > 0 && m < 1024);
        assert!(DevicePlan { m, ..p }.check(15_000_000_000).is_ok());
        assert!(DevicePlan { m: m + 1, ..p }.check(15_000_000_000).is_err());
        // Too little for even a bf16 window of 1024: the bf16 bound is given instead.
        let e = p.check(6_000_000_000).unwrap_err().to_string();
        assert!(e.contains("a bf16 window fits with num_grads ≤"), "{e}");
        // Nothing fits at all.
        let e = p.check(1 << 20).unwrap_err().to_string();
        assert!(e.contains("nvidia-smi"), "{e}");
    }

    #[test]
    fn windows_beyond_the_kernels_limit_are_refused_by_name() {
        let p = DevicePlan::new(MAX_DEVICE_GRADS + 1, 1000, DType::F32, false, 8);
        let e = p.check(u128::MAX / 2).unwrap_err().to_string();
        assert!(e.contains("num_grads") && e.contains("8192"), "{e}");
    }

    #[test]
    fn shared_memory_stays_within_what_a_block_may_ask_for() {
        // Hopper: 227 KiB of dynamic shared memory per block.
        for dtype in [DType::F32, DType::BF16, DType::F64] {
            let (a, b) = shared_bytes(dtype, MAX_DEVICE_GRADS);
            assert!(a <= 227 * 1024 && b <= 227 * 1024, "{dtype:?}: {a} {b}");
        }
        // The card's m = 1024 stays under the default 48 KiB.
        let (a, b) = shared_bytes(DType::BF16, 1024);
        assert!(a <= 48 * 1024 && b <= 48 * 1024);
    }

    fn f32s(w: &HostWindow) -> &[f32] {
        match w {
            HostWindow::F32(v) => v,
            other => panic!("an f32 window stays f32, got {other:?}"),
        }
    }

    #[test]
    fn padded_rows_round_trip_through_the_host() {
        let (m, d, ld) = (3, 5, 8);
        let data: Vec<f32> = (0..m * d).map(|x| x as f32 + 0.5).collect();
        let mut w = HostWindow::F32(data.clone());
        expand_rows(&mut w, m, d, ld).unwrap();
        let v = f32s(&w);
        assert_eq!(v.len(), m * ld);
        for i in 0..m {
            assert_eq!(&v[i * ld..i * ld + d], &data[i * d..(i + 1) * d]);
            assert!(v[i * ld + d..(i + 1) * ld].iter().all(|x| *x == 0.0));
        }
        assert_eq!(host_bytes(&w).len(), m * ld * 4);
        compact_rows(&mut w, m, ld, d);
        assert_eq!(f32s(&w), &data);
        let mut b = HostWindow::BF16(vec![half::bf16::ONE; 4]);
        assert_eq!(host_bytes_mut(&mut b).len(), 8);
    }
}
