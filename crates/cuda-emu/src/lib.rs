//! Test-only: runs mfac-lab's CUDA C kernels on the CPU.
//!
//! build.rs compiles `src/optim/mfac/window/device/kernels/mfac.cu`, `…/kernels/sparse.cu` and
//! `src/model/engine/cuda/kernels/pass.cu` — the files nvcc compiles, unchanged — as C++ with
//! `include/emu.h` force-included. Every CUDA thread is a fiber; a block's fibers run on the
//! calling OS thread and switch only at yield points (`__syncthreads`, `__syncwarp`, warp
//! shuffles and votes, atomics), in one of three [`Schedule`]s. Launches report the kernel
//! mistakes a GPU would hide or turn into garbage as an `Err` naming file, line, block and
//! thread: a `__syncthreads` reached from different lines or after some threads exited, a warp
//! operation after lanes exited or with different lanes at different operations, deadlock,
//! misaligned vector loads (alignment sanitizer), writes past the launched dynamic shared size
//! (the region is filled with NaN bytes before each block, so reads past it show as NaN).
//!
//! ```
//! // Any Rust closure can be the body of a thread (here: no kernel at all).
//! use std::cell::Cell;
//! let n = Cell::new(0);
//! cuda_emu::launch([2, 1, 1], [64, 1, 1], 0, cuda_emu::Schedule::Fixed, || n.set(n.get() + 1))
//!     .unwrap();
//! assert_eq!(n.get(), 128);
//! ```
//!
//! Not emulated: partial warp masks, cooperative groups, the memory model across blocks (blocks
//! run one after another), timing.

use std::ffi::{c_char, c_void, CStr};

/// The order in which the threads of a block run between yield points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Thread 0, 1, … each to its next yield point, round and round; blocks in order.
    Fixed,
    /// At every yield point a runnable thread at random (from the seed); blocks in random order.
    Shuffled(u64),
    /// The warps in random order, each run alone to its next `__syncthreads` (or its end), its
    /// lanes in random order: shows a missing barrier between warps that round-robin hides.
    WarpSerial(u64),
}

impl Schedule {
    /// The fixed order and both adversarial ones from `seed`: what each kernel test runs.
    pub fn all(seed: u64) -> [Schedule; 3] {
        [
            Schedule::Fixed,
            Schedule::Shuffled(seed),
            Schedule::WarpSerial(seed ^ 0x5eed),
        ]
    }
}

extern "C" {
    fn emu_launch(
        grid: *const u32,
        block: *const u32,
        shared: usize,
        sched: i32,
        seed: u64,
        body: extern "C" fn(*mut c_void),
        ctx: *mut c_void,
        err: *mut c_char,
        err_len: usize,
    ) -> i32;
    fn emu_double2bfloat16(v: f64) -> u16;
    fn emu_float2bfloat16(v: f32) -> u16;
}

extern "C" fn trampoline<F: Fn()>(ctx: *mut c_void) {
    // SAFETY: `ctx` is the `&F` that `launch` passed, alive for the whole launch.
    let f = unsafe { &*(ctx as *const F) };
    f();
}

/// Runs `body` as every thread of a `grid` of `block`s with `shared` bytes of dynamic shared
/// memory. Inside `body`, call a kernel (see [`mfac`] and [`pass`]); `body` must not panic (a
/// panic cannot unwind through the fibers: the process aborts).
pub fn launch<F: Fn()>(
    grid: [u32; 3],
    block: [u32; 3],
    shared: usize,
    schedule: Schedule,
    body: F,
) -> Result<(), String> {
    let (sched, seed) = match schedule {
        Schedule::Fixed => (0, 0),
        Schedule::Shuffled(s) => (1, s),
        Schedule::WarpSerial(s) => (2, s),
    };
    let mut err = vec![0 as c_char; 2048];
    // SAFETY: grid and block are 3 u32 each; `body` outlives the call; err has err.len() bytes.
    let rc = unsafe {
        emu_launch(
            grid.as_ptr(),
            block.as_ptr(),
            shared,
            sched,
            seed,
            trampoline::<F>,
            &body as *const F as *mut c_void,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc == 0 {
        return Ok(());
    }
    // SAFETY: emu_launch wrote a NUL-terminated message into err.
    Err(unsafe { CStr::from_ptr(err.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// The harness's f64 → bf16 conversion (one rounding to nearest even, as the GPU's), as bits.
pub fn double_to_bf16_bits(v: f64) -> u16 {
    // SAFETY: a pure function.
    unsafe { emu_double2bfloat16(v) }
}

/// The harness's f32 → bf16 conversion (round to nearest even), as bits.
pub fn float_to_bf16_bits(v: f32) -> u16 {
    // SAFETY: a pure function.
    unsafe { emu_float2bfloat16(v) }
}

/// mfac.cu's entry points (`extern "C"`, pointers are host pointers). bf16 is `u16` bits.
#[allow(missing_docs)]
pub mod mfac {
    macro_rules! gathers {
        ($($name:ident: $p:ty => $t:ty;)*) => { extern "C" { $(
            pub fn $name(table: *const u64, n: i32, d: i64, ld: i64, wd: f64, out: *mut $t, flag: *mut i32);
        )* } };
    }
    gathers! {
        mfac_gather_f32_f32: f32 => f32; mfac_gather_f32_bf16: f32 => u16; mfac_gather_f32_f64: f32 => f64;
        mfac_gather_f64_f32: f64 => f32; mfac_gather_f64_bf16: f64 => u16; mfac_gather_f64_f64: f64 => f64;
        mfac_gather_bf16_f32: u16 => f32; mfac_gather_bf16_bf16: u16 => u16; mfac_gather_bf16_f64: u16 => f64;
    }
    macro_rules! pass1s {
        ($($name:ident: $t:ty;)*) => { extern "C" { $(
            pub fn $name(g: *const $t, w: *mut $t, ld: i64, rows: i32, j: i32, partial: *mut f64);
        )* } };
    }
    pass1s! { mfac_pass1_f32: f32; mfac_pass1_bf16: u16; mfac_pass1_f64: f64; }
    macro_rules! pass2s {
        ($($name:ident: $t:ty;)*) => { extern "C" { $(
            pub fn $name(w: *const $t, ld: i64, rows: i32, c: *const f64, scale: f64, g: *const $t,
                d: i64, table: *const u64, n: i32, v: *mut f64, beta: f64, lr: f64,
                u_out: *mut f64, sums: *mut f64);
        )* } };
    }
    pass2s! {
        mfac_pass2_f32_f32: f32; mfac_pass2_f32_f64: f32; mfac_pass2_f32_bf16: f32;
        mfac_pass2_bf16_f32: u16; mfac_pass2_bf16_f64: u16; mfac_pass2_bf16_bf16: u16;
        mfac_pass2_f64_f32: f64; mfac_pass2_f64_f64: f64; mfac_pass2_f64_bf16: f64;
    }
    extern "C" {
        pub fn mfac_reduce_rows(partial: *const f64, blocks: i32, rows: i32, out: *mut f64);
        pub fn mfac_read_floor(p: *const [u32; 4], n16: i64, out: *mut u32);
    }
}

/// sparse.cu's entry points (`extern "C"`, pointers are host pointers). bf16 is `u16` bits;
/// the accumulator is f32 or f64, the window's values f32, bf16 or f64.
#[allow(missing_docs)]
pub mod sparse {
    macro_rules! accumulates {
        ($($name:ident: $p:ty => $a:ty;)*) => { extern "C" { $(
            pub fn $name(table: *const u64, n: i32, d: i64, e: *const $a, acc: *mut $a, flag: *mut i32);
        )* } };
    }
    accumulates! {
        spm_accumulate_f32_f32: f32 => f32; spm_accumulate_f64_f32: f64 => f32;
        spm_accumulate_bf16_f32: u16 => f32; spm_accumulate_f32_f64: f32 => f64;
        spm_accumulate_f64_f64: f64 => f64; spm_accumulate_bf16_f64: u16 => f64;
    }
    macro_rules! selects {
        ($($hist:ident, $count:ident: $a:ty;)*) => { extern "C" { $(
            pub fn $hist(acc: *const $a, n: i64, shift: i32, prefix: u64, below: i32, bits: i32, out: *mut u32);
            pub fn $count(acc: *const $a, n: i64, lo: u64, hi: u64, counts: *mut u32);
        )* } };
    }
    selects! { spm_hist_f32, spm_count_f32: f32; spm_hist_f64, spm_count_f64: f64; }
    macro_rules! compacts {
        ($($name:ident: $a:ty => $t:ty;)*) => { extern "C" { $(
            pub fn $name(acc: *mut $a, n: i64, lo: u64, hi: u64, offsets: *const u32, idx: *mut u32, val: *mut $t);
        )* } };
    }
    compacts! {
        spm_compact_f32_f32: f32 => f32; spm_compact_f32_bf16: f32 => u16; spm_compact_f64_f64: f64 => f64;
    }
    macro_rules! rows {
        ($($scatter:ident, $gram:ident, $combine:ident, $row_dot:ident: $t:ty;)*) => { extern "C" { $(
            pub fn $scatter(idx: *const u32, val: *const $t, k: i64, buf: *mut $t, clear: i32);
            pub fn $gram(idx: *const u32, val: *const $t, k: i64, buf: *const $t, out: *mut f64);
            pub fn $combine(idx: *const u32, val: *const $t, k: i64, c: *const f64, per_row: i32, u: *mut f64);
            pub fn $row_dot(idx: *const u32, val: *const $t, k: i64, u: *const f64, out: *mut f64);
        )* } };
    }
    rows! {
        spm_scatter_f32, spm_gram_f32, spm_combine_f32, spm_row_dot_f32: f32;
        spm_scatter_bf16, spm_gram_bf16, spm_combine_bf16, spm_row_dot_bf16: u16;
        spm_scatter_f64, spm_gram_f64, spm_combine_f64, spm_row_dot_f64: f64;
    }
    macro_rules! updates {
        ($($name:ident;)*) => { extern "C" { $(
            pub fn $name(u: *mut f64, scale: f64, d: i64, table: *const u64, n: i32, lr: f64, keep: f64, sums: *mut f64);
        )* } };
    }
    updates! { spm_update_f32; spm_update_f64; spm_update_bf16; }
    extern "C" {
        pub fn spm_scan(counts: *const u32, blocks: i32, need: u32, offsets: *mut u32);
    }
}

/// pass.cu's `struct DropSite` (u64 key, u32 threshold, f32 mult).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropSite {
    pub key: u64,
    pub threshold: u32,
    pub mult: f32,
}

/// pass.cu's entry points (`extern "C"`, pointers are host pointers).
#[allow(missing_docs)]
pub mod pass {
    use super::DropSite;
    extern "C" {
        pub fn embed_ln_fwd(
            ids: *const u32,
            types: *const u32,
            word: *const f32,
            pos: *const f32,
            typ: *const f32,
            lw: *const f32,
            lb: *const f32,
            y: *mut f32,
            xhat: *mut f32,
            inv: *mut f32,
            n: i32,
            t: i32,
            h: i32,
            vocab: i32,
            ntype: i32,
            eps: f32,
            d_out: DropSite,
            flag: *mut i32,
        );
        pub fn add_ln_fwd(
            a: *const f32,
            bias_a: *const f32,
            d_in: DropSite,
            res: *const f32,
            lw: *const f32,
            lb: *const f32,
            y: *mut f32,
            xhat: *mut f32,
            inv: *mut f32,
            n: i32,
            h: i32,
            eps: f32,
        );
        pub fn ln_bwd(
            dy: *const f32,
            d_out: DropSite,
            xhat: *const f32,
            inv: *const f32,
            lw: *const f32,
            dr: *mut f32,
            d_in: DropSite,
            da: *mut f32,
            part: *mut f32,
            n: i32,
            h: i32,
            rows_per_block: i32,
        );
        pub fn ln_cols_finish(
            part: *const f32,
            blocks: i32,
            h: i32,
            dw: *mut f32,
            db: *mut f32,
            dbias: *mut f32,
        );
        pub fn bias_add(x: *mut f32, b: *const f32, n: i32, cols: i32);
        pub fn softmax_fwd(
            s: *mut f32,
            pd: *mut f32,
            mask: *const u32,
            rows: i32,
            t: i32,
            nh: i32,
            scale: f32,
            d: DropSite,
        );
        pub fn softmax_bwd(dp: *mut f32, p: *const f32, rows: i32, t: i32, scale: f32, d: DropSite);
        pub fn gelu_fwd(f: *mut f32, bias: *const f32, g: *mut f32, n: i32, cols: i32);
        pub fn gelu_bwd(dg: *mut f32, f: *const f32, total: usize);
        pub fn pool_fwd(
            z: *const f32,
            bias: *const f32,
            pooled: *mut f32,
            head_in: *mut f32,
            n: i32,
            h: i32,
            d: DropSite,
        );
        pub fn pool_bwd(dh: *mut f32, pooled: *const f32, total: i32, d: DropSite);
        pub fn loss_fwd_bwd(
            logits: *mut f32,
            bias: *const f32,
            labels: *const f32,
            dlogits: *mut f32,
            dbias: *mut f32,
            out: *mut f64,
            flag: *mut i32,
            b: i32,
            c: i32,
            regression: i32,
        );
        pub fn embed_bwd(
            de: *const f32,
            ids: *const u32,
            types: *const u32,
            dword: *mut f32,
            dpos: *mut f32,
            dtyp: *mut f32,
            n: i32,
            t: i32,
            h: i32,
            pad: u32,
            vocab: i32,
            ntype: i32,
        );
        pub fn qkv_stack(
            w3: *mut f32,
            b3: *mut f32,
            wq: *const f32,
            wk: *const f32,
            wv: *const f32,
            bq: *const f32,
            bk: *const f32,
            bv: *const f32,
            h: i32,
        );
        pub fn fill_f32(x: *mut f32, v: f32, n: usize);
        pub fn drop_count(a: DropSite, b: DropSite, n: u64, kept: *mut u64);
        pub fn sumsq_partial(g: *const f32, n: usize, part: *mut f64);
        pub fn norm_clip(part: *const f64, blocks: i32, max_norm: f64, out: *mut f64);
        pub fn adamw_flat(
            w: *mut f32,
            g: *const f32,
            m: *mut f32,
            v: *mut f32,
            n: usize,
            clip: *const f64,
            beta1: f32,
            beta2: f32,
            decay: f32,
            step: f32,
            bc2: f32,
            eps: f32,
        );
    }
}

/// The harness's own test kernels (src/selftest.cu): every primitive, and one mistake per
/// diagnostic.
#[allow(missing_docs)]
pub mod selftest {
    extern "C" {
        pub fn st_warp_ops(out: *mut i32);
        pub fn st_block_sum(input: *const i32, block_out: *mut i32, total: *mut i32);
        pub fn st_divergent_barrier();
        pub fn st_barrier_after_exit();
        pub fn st_shuffle_after_exit(out: *mut f32);
        pub fn st_deadlock(out: *mut f32);
        pub fn st_misaligned_vector(p: *const f32, out: *mut f32);
        pub fn st_misaligned_ldcs(p: *const f32, out: *mut f32);
        pub fn st_shared_overflow(n: i32);
        pub fn st_shared_uninit(out: *mut f64);
        pub fn st_zero_then_add(barrier: i32, out: *mut f64);
        pub fn st_unordered_write_read(out: *mut i32);
    }
}
