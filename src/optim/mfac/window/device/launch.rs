//! The launches of M-FAC's device step as plain functions: grid, block and dynamic shared bytes
//! of each kernel, and the parameter table's layout. The CUDA path (`cuda.rs`) and the emulated
//! kernel tests (`emu_tests.rs`, on the CPU) both call these, so the tests check the launches
//! the GPU gets, not a copy of them.
//!
//! ```text
//! gather   grid min(⌈ld/256⌉, 8·SMs)   block 256   shared 0
//! pass 1   grid blocks                block 256   shared rows·8            (K's partial row)
//! reduce   grid ⌈rows/256⌉            block 256   shared 0
//! pass 2   grid blocks                block 256   shared rows·8 + 8·W·8    (c, the warps' sums)
//! floor    grid min(blocks, 65536)    block 256   shared 0
//! ```
//! `blocks` is the resident grid (SMs × blocks per SM from the occupancy, 1–4): the passes split
//! the ld/W units of columns evenly over it, so no block waits for a second wave.

// Without the `cuda` feature only the tests launch.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use super::{shared_bytes, DevicePlan, THREADS};
pub(crate) use crate::gpu::Launch;

/// `grid` blocks of the passes' [`THREADS`] with `shared` bytes.
fn of(grid: usize, shared: usize) -> Launch {
    Launch::new(grid, THREADS, shared)
}

/// The passes' grid: `sms` multiprocessors × `per_sm` resident blocks (the occupancy, kept in
/// 1..=4).
pub(crate) fn resident_blocks(sms: usize, per_sm: usize) -> usize {
    (sms * per_sm.clamp(1, 4)).max(1)
}

/// The gather: a grid-stride loop over the ld columns, at most 8 blocks per multiprocessor.
pub(crate) fn gather(plan: &DevicePlan, sms: usize) -> Launch {
    of(plan.ld.div_ceil(THREADS as usize).min(sms * 8), 0)
}

/// Pass 1 over the first `rows` rows (row j written, K's partial row per block).
pub(crate) fn pass1(plan: &DevicePlan, rows: usize) -> Launch {
    of(plan.blocks, shared_bytes(plan.dtype, rows).0)
}

/// The reduction of pass 1's partial rows: one thread per row.
pub(crate) fn reduce(rows: usize) -> Launch {
    of(rows.div_ceil(THREADS as usize), 0)
}

/// Pass 2 over the first `rows` rows.
pub(crate) fn pass2(plan: &DevicePlan, rows: usize) -> Launch {
    of(plan.blocks, shared_bytes(plan.dtype, rows).1)
}

/// The floor's plain read of the window.
pub(crate) fn floor(plan: &DevicePlan) -> Launch {
    of(plan.blocks.clamp(1, 65536), 0)
}

/// Words of the parameter table for `n` parameters: starts[0..=n], n gradient and n parameter
/// addresses.
pub(crate) fn table_len(n: usize) -> usize {
    3 * n + 1
}

/// The parameter table the gather and pass 2 read (`find_param` in mfac.cu): the flat start of
/// each parameter and d at the end (`sizes` in order), then each gradient's address (0: no
/// gradient, read as zeros), then each parameter's address. Written into `out` (cleared first).
pub(crate) fn param_table(
    sizes: impl IntoIterator<Item = usize>,
    grads: &[u64],
    params: &[u64],
    out: &mut Vec<u64>,
) {
    out.clear();
    let mut start = 0u64;
    for s in sizes {
        out.push(start);
        start += s as u64;
    }
    out.push(start);
    debug_assert!(grads.len() == out.len() - 1 && params.len() == out.len() - 1);
    out.extend_from_slice(grads);
    out.extend_from_slice(params);
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    #[test]
    fn the_table_holds_starts_then_gradients_then_parameters() {
        let mut t = Vec::new();
        param_table([3, 0, 5], &[10, 0, 30], &[1, 2, 3], &mut t);
        assert_eq!(t, vec![0, 3, 3, 8, 10, 0, 30, 1, 2, 3]);
        assert_eq!(t.len(), table_len(3));
    }

    #[test]
    fn launches_cover_the_columns_and_ask_for_the_shared_memory_the_kernels_index() {
        let plan = DevicePlan::new(64, 4_386_307, DType::BF16, false, resident_blocks(132, 2));
        assert_eq!(plan.blocks, 264);
        assert_eq!(gather(&plan, 132).grid, 132 * 8);
        assert_eq!(pass1(&plan, 64).shared, 64 * 8);
        assert_eq!(pass2(&plan, 64).shared, 64 * 8 + 8 * 512 * 8);
        assert_eq!(reduce(257).grid, 2);
        let small = DevicePlan::new(4, 1, DType::F32, false, resident_blocks(1, 9));
        assert_eq!(small.blocks, 4);
        assert_eq!(gather(&small, 1).grid, 2);
        assert_eq!(floor(&small).grid, 4);
    }
}
