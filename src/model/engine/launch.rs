//! The CUDA pass's launch arithmetic and dropout sites as plain Rust, without the `cuda`
//! feature: the cudarc path (`cuda/device.rs`, `cuda/pass.rs`) launches `kernels/pass.cu` with
//! these shapes, and the emulated kernel tests (`emu_tests.rs`, through `crates/cuda-emu`) run
//! the same kernels on the CPU with the same shapes and the same `DropSite`s.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

/// Threads per block of every launch (8 warps).
pub(crate) const THREADS: u32 = 256;

/// Rows of one block of `ln_bwd` (8 warps × 8 rows).
pub(crate) const LN_ROWS: usize = 64;

/// The largest hidden size `ln_bwd`'s shared memory takes (8 warps × 3 × H floats ≤ 48 KiB).
pub(crate) const MAX_HIDDEN: usize = 512;

// What the kernels assume of the block size, checked where it is set: `ln_bwd` indexes the
// partial sums of exactly 8 warps, and `loss_fwd_bwd`'s tree reduction halves a power-of-two
// block into its 256-entry shared array.
const _: () = assert!(
    THREADS == 256,
    "ln_bwd is written for exactly 8 warps per block"
);
const _: () = assert!(
    THREADS.is_power_of_two() && THREADS <= 256,
    "loss_fwd_bwd needs a power-of-two block of at most 256 threads"
);

pub(crate) use crate::gpu::Launch;

/// A grid of `blocks` blocks (at least one) of [`THREADS`] threads.
pub(crate) fn grid(blocks: usize, shared: u32) -> Launch {
    Launch::new(blocks, THREADS, shared as usize)
}

/// One warp per row over `rows` rows.
pub(crate) fn per_row(rows: usize) -> Launch {
    grid(rows.div_ceil(THREADS as usize / 32), 0)
}

/// A grid-stride loop over `n` elements.
pub(crate) fn elementwise(n: usize) -> Launch {
    grid(n.div_ceil(THREADS as usize).min(8192), 0)
}

/// `ln_bwd` over `n` rows of `h`: [`LN_ROWS`] rows per block of 8 warps, each warp with its
/// `3 × h` f32 column partial sums in dynamic shared memory.
pub(crate) fn ln_bwd(n: usize, h: usize) -> Launch {
    debug_assert!(
        h <= MAX_HIDDEN,
        "ln_bwd's shared memory holds H ≤ {MAX_HIDDEN}"
    );
    grid(n.div_ceil(LN_ROWS), (8 * 3 * h * 4) as u32)
}

/// `ln_cols_finish` over the `3 × h` columns of `ln_bwd`'s partial sums.
pub(crate) fn ln_cols(h: usize) -> Launch {
    grid((3 * h).div_ceil(THREADS as usize), 0)
}

/// `loss_fwd_bwd`: one block (its reduction needs a power-of-two block of at most 256).
pub(crate) fn loss() -> Launch {
    grid(1, 0)
}

/// The most blocks of one `sumsq_partial` launch (its partial sums, one f64 per block, are
/// added in block order by `norm_clip`).
pub(crate) const SUMSQ_BLOCKS: usize = 64;

/// `sumsq_partial` over `n` elements: a grid-stride loop, at most [`SUMSQ_BLOCKS`] blocks of
/// [`THREADS`] (its tree reduction halves a power-of-two block into 256 shared doubles).
pub(crate) fn sumsq(n: usize) -> Launch {
    grid(n.div_ceil(THREADS as usize).min(SUMSQ_BLOCKS), 0)
}

/// `norm_clip`: one thread does the sum in block order.
pub(crate) fn norm_clip() -> Launch {
    Launch {
        grid: 1,
        block: 32,
        shared: 0,
    }
}

/// `adamw_flat` over one parameter of `n` elements (grid-stride).
pub(crate) fn adamw(n: usize) -> Launch {
    elementwise(n)
}

/// One dropout site as the kernels take it (`struct DropSite` in pass.cu): element i is kept
/// when the high 32 bits of a hash of `(key, i)` are ≥ `threshold` = round(p·2³²), and a kept
/// value is multiplied by `mult` = f32(1/(1−p)). `threshold == 0` is the identity.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct DropSite {
    pub key: u64,
    pub threshold: u32,
    pub mult: f32,
}

impl DropSite {
    /// No dropout.
    pub(crate) const OFF: DropSite = DropSite {
        key: 0,
        threshold: 0,
        mult: 1.0,
    };

    /// The site with probability `p` and key `key` (the identity when `p` is 0).
    pub(crate) fn new(key: u64, p: f64) -> Self {
        if p <= 0.0 {
            return Self::OFF;
        }
        let threshold = (p * 4_294_967_296.0).round().clamp(1.0, 4_294_967_295.0) as u32;
        DropSite {
            key,
            threshold,
            // The graph's mask value: 1/(1−p) rounded to the model's dtype.
            mult: (1.0 / (1.0 - p)) as f32,
        }
    }
}

/// SplitMix64's finaliser (the host side of the kernels' `mix64`).
pub(crate) fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The key of dropout site `site` in the step keyed `step_key`.
pub(crate) fn site_key(step_key: u64, site: u64) -> u64 {
    mix64(step_key ^ mix64(site.wrapping_mul(0x632B_E59B_D9B4_E019)))
}
