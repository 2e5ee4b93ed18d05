//! Sparse M-FAC's window on a CUDA device: the layout, the memory plan, the launches of one step
//! and the selection's host loop — plain code, run on every build by the emulated kernel tests
//! (`sparse_emu_tests.rs`) — and, with the `cuda` feature, the window itself (`sparse_cuda.rs`,
//! kernels in `kernels/sparse.cu`).
//!
//! Layout on the device: row r of the window is k (column u32, value) pairs, columns ascending,
//! at `idx[r·k ..]`, `val[r·k ..]` (u32 columns: any d < 2³², none of the maintained package's
//! int16 block offsets); the error accumulator e and a scratch acc (d, f32 or f64); cbuf (d, the
//! window dtype, zero between steps) for pass 1; u (d, f64) for pass 2. A checkpoint converts the
//! rows to the host's layout (`SparseRows`), so a checkpoint is the same file on both.
//!
//! ```text
//! accumulate  grid min(⌈d/256⌉, 8·SMs)    block 256   acc = e + g, the non-finite flag
//! hist        grid min(⌈d/256⌉, 4·SMs)    block 256   one 12-bit digit; the host picks the bucket
//! count       grid sel_blocks             block 256   per block: above / in the bucket
//! scan        grid 1                      block 32    each block's output position and share
//! compact     grid sel_blocks             block 256   row j, in index order; e = acc − stored
//! scatter     grid min(⌈k/256⌉, 8·SMs)    block 256   row j into cbuf (and back to zero)
//! gram        grid rows                   block 256   K's row, one block per row
//! combine     grid rows·⌈k/4096⌉          block 256   u += c_i·row i (f64 atomics)
//! update      grid min(⌈d/256⌉, 8·SMs)    block 256   u ← m·u, w ← keep·w − lr·u, Σu² per block
//! row_dot     grid min(⌈k/256⌉, 4·SMs)    block 256   ⟨u, row j⟩ per block
//! ```

// Without the `cuda` feature only the tests use the plan and the launches.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use candle_core::DType;

use super::HEADROOM;
use crate::error::{Error, Result};
pub(crate) use crate::gpu::Launch;
use crate::optim::mfac::window::sparse::select::boundary;
use crate::optim::util::human;

/// Threads per block of the sparse kernels (`SP_THREADS` in sparse.cu).
pub(crate) const THREADS: u32 = 256;
/// Bits of a histogram digit (`SP_DIGIT`): 4,096 buckets.
pub(crate) const DIGIT: u32 = 12;
/// Kept entries per block of `combine` (a row takes ⌈k / COMBINE⌉ blocks).
pub(crate) const COMBINE: usize = 4096;
/// Entries per block of the selection's count and compact passes (the grid is ⌈d / this⌉,
/// at most [`MAX_SELECT_BLOCKS`]).
pub(crate) const SELECT_CHUNK: usize = 16384;
/// The selection grid's limit (the scan walks its blocks on one thread).
pub(crate) const MAX_SELECT_BLOCKS: usize = 4096;

/// What a sparse device window of `m` rows of `k` kept entries over `d` parameters needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SparsePlan {
    pub m: usize,
    pub d: usize,
    pub k: usize,
    /// The values' dtype (f32, bf16, f64).
    pub dtype: DType,
    /// Multiprocessors (the grid-stride kernels' grids).
    pub sms: usize,
}

impl SparsePlan {
    pub fn new(m: usize, d: usize, k: usize, dtype: DType, sms: usize) -> Self {
        SparsePlan {
            m,
            d,
            k,
            dtype,
            sms: sms.max(1),
        }
    }

    /// The accumulator's element bytes: f64 with an f64 window, else f32 (as the host's).
    pub fn acc_bytes(&self) -> usize {
        if self.dtype == DType::F64 {
            8
        } else {
            4
        }
    }

    /// Blocks of the selection's count and compact passes.
    pub fn select_blocks(&self) -> usize {
        self.d.div_ceil(SELECT_CHUNK).clamp(1, MAX_SELECT_BLOCKS)
    }

    /// Bytes of the rows: m·k·(4 + value bytes).
    pub fn rows_bytes(&self) -> u128 {
        self.m as u128 * self.k as u128 * (4 + self.dtype.size_in_bytes() as u128)
    }

    /// Bytes of everything the window allocates on the device: the rows, e and acc, cbuf, u,
    /// the histogram, the selection's counts and offsets, K's row, c and the sums.
    pub fn needed(&self) -> u128 {
        let (d, m) = (self.d as u128, self.m as u128);
        let small = (1u128 << DIGIT) * 4
            + 4 * self.select_blocks() as u128 * 4
            + 2 * m * 8
            + 2 * (self.d.div_ceil(THREADS as usize) as u128) * 8;
        self.rows_bytes()
            + 2 * d * self.acc_bytes() as u128
            + d * self.dtype.size_in_bytes() as u128
            + d * 8
            + small
    }

    /// Checks the window against the device's free memory (`free`), keeping [`HEADROOM`] for
    /// the rest; the error says what is needed and what fits instead.
    pub fn check(&self, free: u128) -> Result<()> {
        let needed = self.needed();
        if needed + HEADROOM <= free {
            return Ok(());
        }
        let per_row = self.k as u128 * (4 + self.dtype.size_in_bytes() as u128) + 16;
        let fixed = needed - self.rows_bytes();
        let m = free.saturating_sub(HEADROOM + fixed) / per_row.max(1);
        Err(Error::OutOfMemory {
            what: format!(
                "the sparse M-FAC window on the GPU (num_grads {} × {} kept of {} parameters, {:?} values) and its buffers",
                self.m, self.k, self.d, self.dtype
            ),
            needed: format!("{} (+ {} headroom)", human(needed), human(HEADROOM)),
            available: format!("{} free on the GPU", human(free)),
            fix: if m > 0 {
                format!("num_grads ≤ {m} fits, or a lower density")
            } else {
                "free GPU memory (other processes: nvidia-smi) or train on the CPU".into()
            },
        })
    }
}

fn of(grid: usize, threads: u32) -> Launch {
    Launch::new(grid, threads, 0)
}

/// The accumulator pass over d.
pub(crate) fn accumulate(p: &SparsePlan) -> Launch {
    of(p.d.div_ceil(THREADS as usize).min(8 * p.sms), THREADS)
}

/// One histogram pass over d.
pub(crate) fn hist(p: &SparsePlan) -> Launch {
    of(p.d.div_ceil(THREADS as usize).min(4 * p.sms), THREADS)
}

/// The count and the compaction (the same grid: block b owns the same chunk in both).
pub(crate) fn select(p: &SparsePlan) -> Launch {
    of(p.select_blocks(), THREADS)
}

/// The scan of the selection's counts: one warp (thread 0 works).
pub(crate) fn scan() -> Launch {
    of(1, 32)
}

/// Row j into cbuf and back.
pub(crate) fn scatter(p: &SparsePlan) -> Launch {
    of(p.k.div_ceil(THREADS as usize).min(8 * p.sms), THREADS)
}

/// K's row over the first `rows` rows: one block per row.
pub(crate) fn gram(rows: usize) -> Launch {
    of(rows, THREADS)
}

/// Blocks per row of `combine`.
pub(crate) fn per_row(k: usize) -> usize {
    k.div_ceil(COMBINE).max(1)
}

/// Pass 2 over the first `rows` rows.
pub(crate) fn combine(p: &SparsePlan, rows: usize) -> Launch {
    of(rows * per_row(p.k), THREADS)
}

/// The update over d (its grid is the number of partial sums).
pub(crate) fn update(p: &SparsePlan) -> Launch {
    accumulate(p)
}

/// ⟨u, row j⟩ (its grid is the number of partial sums).
pub(crate) fn row_dot(p: &SparsePlan) -> Launch {
    of(p.k.div_ceil(THREADS as usize).min(4 * p.sms), THREADS)
}

/// What the selection's loop asks of the device: one histogram pass, and the final count, scan
/// and compaction. The CUDA window and the emulated tests implement it, so both run
/// [`select`]'s loop.
pub(crate) trait Selector {
    /// Zeroes the histogram, runs `spm_hist` with these arguments and returns the 2^`bits`
    /// counts.
    fn hist(&mut self, shift: u32, prefix: u64, below: u32, bits: u32) -> Result<Vec<u32>>;
    /// Runs `spm_count`, `spm_scan` and `spm_compact`: keep every key ≥ `hi` and the first
    /// `need` keys in [lo, hi) by index.
    fn finish(&mut self, lo: u64, hi: u64, need: u32) -> Result<()>;
}

/// The exact top-k on the device (`key_bits`: 31 for f32, 63 for f64): digit by digit from the
/// top, each histogram read back and its boundary bucket taken by the host's own rule
/// ([`boundary`]), until the bucket is one exact key (ties: the lowest indices, in the compaction's
/// index order) or is kept whole. The same set as the host's `top_k`: the k largest |acc|, ties to
/// the lower index. `k` ≤ n.
pub(crate) fn select_top_k<S: Selector>(s: &mut S, key_bits: u32, k: usize) -> Result<()> {
    let (mut prefix, mut shift, mut need) = (0u64, key_bits, k);
    loop {
        let bits = shift.min(DIGIT);
        let below = shift - bits;
        let h = s.hist(shift, prefix, below, bits)?;
        let (bucket, above, count) = boundary(&h, need);
        need -= above;
        prefix = (prefix << bits) | bucket as u64;
        shift = below;
        if shift == 0 || count == need {
            break;
        }
    }
    s.finish(prefix << shift, (prefix + 1) << shift, need as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BERT_TINY: usize = 4_386_307;

    #[test]
    fn the_cards_sparse_window_fits_a_small_gpu() {
        let k = BERT_TINY / 100;
        let p = SparsePlan::new(1024, BERT_TINY, k, DType::F32, 132);
        // u32 columns + f32 values: 0.36 GB of rows (the issue's figure), the rest ≈ 0.1 GB.
        let rows = p.rows_bytes() as f64 / 1e9;
        assert!((rows - 0.359).abs() < 0.001, "{rows}");
        assert!(p.needed() - p.rows_bytes() < 110_000_000);
        assert!(p.check(2_000_000_000).is_ok());
        let e = p.check(1_200_000_000).unwrap_err().to_string();
        assert!(
            e.contains("num_grads ≤") && e.contains("free on the GPU"),
            "{e}"
        );
        let bf = SparsePlan::new(1024, BERT_TINY, k, DType::BF16, 132);
        assert_eq!(bf.acc_bytes(), 4);
        assert!(bf.rows_bytes() < p.rows_bytes());
    }

    #[test]
    fn launches_cover_their_work() {
        let p = SparsePlan::new(1024, BERT_TINY, BERT_TINY / 100, DType::F32, 132);
        assert_eq!(accumulate(&p).grid, 132 * 8);
        assert_eq!(select(&p).grid as usize, BERT_TINY.div_ceil(SELECT_CHUNK));
        assert_eq!(per_row(43_863), 11);
        assert_eq!(combine(&p, 1024).grid, 1024 * 11);
        assert_eq!(gram(7).grid, 7);
        let tiny = SparsePlan::new(4, 10, 1, DType::F64, 1);
        assert_eq!(
            (select(&tiny).grid, scatter(&tiny).grid, row_dot(&tiny).grid),
            (1, 1, 1)
        );
        assert_eq!(scan().block, 32);
    }
}
