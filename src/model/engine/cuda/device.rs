//! The device side of the CUDA pass: our kernels (`kernels/pass.cu`, compiled by build.rs into a
//! fatbin with sm_90a machine code and compute_90 PTX, embedded here and loaded once on candle's
//! context), launches on candle's stream, buffers allocated once and grown when a larger batch
//! comes, and raw device addresses of candle tensors.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    result as drv, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError,
    LaunchConfig,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};
use candle_core::{DType, Storage, Tensor};

use crate::error::{Error, Result};

/// The kernels: sm_90a machine code (nothing JIT-compiled on an H100/H200) + compute_90 PTX.
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pass.fatbin"));

/// Threads per block of every launch (8 warps).
pub(crate) const THREADS: u32 = 256;

/// Rows of one block of `ln_bwd` (8 warps × 8 rows).
pub(crate) const LN_ROWS: usize = 64;

/// The largest hidden size `ln_bwd`'s shared memory takes (8 warps × 3 × H floats ≤ 48 KiB).
pub(crate) const MAX_HIDDEN: usize = 512;

pub(crate) fn cuda_err(op: impl Into<String>) -> impl FnOnce(DriverError) -> Error {
    let op = op.into();
    move |e| Error::Cuda {
        op,
        message: format!("{e:?}"),
    }
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

// SAFETY: a plain `#[repr(C)]` struct of the same layout as pass.cu's `DropSite` (u64, u32, f32).
unsafe impl DeviceRepr for DropSite {}

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

/// Launches `$f` on `$stream` with `$cfg`, the arguments bound to locals first (the launch
/// builder keeps references to them).
macro_rules! launch {
    ($stream:expr, $f:expr, $cfg:expr, $what:expr; $($arg:expr),* $(,)?) => {{
        #[allow(unused_imports)]
        use candle_core::cuda_backend::cudarc::driver::PushKernelArg as _;
        let mut builder = $stream.launch_builder($f);
        $crate::model::engine::cuda::device::push_args!(builder; $($arg),*);
        // SAFETY: the arguments match the kernel's parameters in order and type (checked by
        // review against pass.cu), every address is a live allocation on this stream.
        unsafe { builder.launch($cfg) }
            .map(|_| ())
            .map_err($crate::model::engine::cuda::device::cuda_err(format!("launching {}", $what)))
    }};
}

/// Binds each argument to a local (alive until the end of the launch's block) and pushes it.
macro_rules! push_args {
    ($b:ident; ) => {};
    ($b:ident; $head:expr $(, $tail:expr)*) => {
        let value = $head;
        $b.arg(&value);
        $crate::model::engine::cuda::device::push_args!($b; $($tail),*);
    };
}
pub(crate) use launch;
pub(crate) use push_args;

/// A grid of `blocks` blocks of [`THREADS`] threads.
pub(crate) fn grid(blocks: usize, shared: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared,
    }
}

/// One warp per row over `rows` rows.
pub(crate) fn per_row(rows: usize) -> LaunchConfig {
    grid(rows.div_ceil(THREADS as usize / 32), 0)
}

/// A grid-stride loop over `n` elements.
pub(crate) fn elementwise(n: usize) -> LaunchConfig {
    grid(n.div_ceil(THREADS as usize).min(8192), 0)
}

/// The functions of pass.cu.
pub(crate) struct Kernels {
    pub embed_ln_fwd: CudaFunction,
    pub add_ln_fwd: CudaFunction,
    pub ln_bwd: CudaFunction,
    pub ln_cols_finish: CudaFunction,
    pub bias_add: CudaFunction,
    pub softmax_fwd: CudaFunction,
    pub softmax_bwd: CudaFunction,
    pub gelu_fwd: CudaFunction,
    pub gelu_bwd: CudaFunction,
    pub pool_fwd: CudaFunction,
    pub pool_bwd: CudaFunction,
    pub loss_fwd_bwd: CudaFunction,
    pub embed_bwd: CudaFunction,
    pub qkv_stack: CudaFunction,
    pub fill_f32: CudaFunction,
    pub drop_count: CudaFunction,
}

impl Kernels {
    pub(crate) fn load(dev: &CudaDevice) -> Result<Self> {
        let stream = dev.cuda_stream();
        let module = stream
            .context()
            .load_module(Ptx::from_binary(FATBIN.to_vec()))
            .map_err(cuda_err(
                "loading the CUDA pass's kernels (sm_90a / compute_90 fatbin)",
            ))?;
        let f = |name: &str| {
            module
                .load_function(name)
                .map_err(cuda_err(format!("finding kernel {name} in pass.fatbin")))
        };
        Ok(Kernels {
            embed_ln_fwd: f("embed_ln_fwd")?,
            add_ln_fwd: f("add_ln_fwd")?,
            ln_bwd: f("ln_bwd")?,
            ln_cols_finish: f("ln_cols_finish")?,
            bias_add: f("bias_add")?,
            softmax_fwd: f("softmax_fwd")?,
            softmax_bwd: f("softmax_bwd")?,
            gelu_fwd: f("gelu_fwd")?,
            gelu_bwd: f("gelu_bwd")?,
            pool_fwd: f("pool_fwd")?,
            pool_bwd: f("pool_bwd")?,
            loss_fwd_bwd: f("loss_fwd_bwd")?,
            embed_bwd: f("embed_bwd")?,
            qkv_stack: f("qkv_stack")?,
            fill_f32: f("fill_f32")?,
            drop_count: f("drop_count")?,
        })
    }
}

/// A device buffer and its address (taken once: the buffer never moves).
pub(crate) struct DBuf<T> {
    _slice: CudaSlice<T>,
    pub ptr: u64,
    pub len: usize,
}

impl<T: DeviceRepr + candle_core::cuda_backend::cudarc::driver::ValidAsZeroBits> DBuf<T> {
    pub(crate) fn zeros(stream: &Arc<CudaStream>, len: usize, what: &str) -> Result<Self> {
        let slice = stream
            .alloc_zeros::<T>(len.max(1))
            .map_err(cuda_err(format!(
                "allocating {what} ({len} elements) for the CUDA pass"
            )))?;
        let ptr = slice.device_ptr(stream).0;
        Ok(DBuf {
            _slice: slice,
            ptr,
            len,
        })
    }

    /// The address of element `i`.
    pub(crate) fn at(&self, i: usize) -> u64 {
        self.ptr + (i * std::mem::size_of::<T>()) as u64
    }

    /// Copies the first `n` elements to the host (waits for the stream).
    pub(crate) fn read(&self, stream: &Arc<CudaStream>, n: usize) -> Result<Vec<T>>
    where
        T: Default + Clone,
    {
        let n = n.min(self.len);
        let view = self._slice.slice(0..n);
        let mut host = vec![T::default(); n];
        stream
            .memcpy_dtoh(&view, &mut host)
            .map_err(cuda_err("copying a result of the CUDA pass to the host"))?;
        Ok(host)
    }
}

/// Zeroes `bytes` bytes at `ptr` on `stream` (stream-ordered).
pub(crate) fn zero_bytes(stream: &Arc<CudaStream>, ptr: u64, bytes: usize) -> Result<()> {
    // SAFETY: `ptr` is a live allocation of at least `bytes` bytes on this stream.
    unsafe { drv::memset_d8_async(ptr, 0, bytes, stream.cu_stream()) }
        .map_err(cuda_err("zeroing a buffer of the CUDA pass"))
}

/// Copies `bytes` bytes from `src` to `dst` on `stream` (stream-ordered).
pub(crate) fn copy_bytes(stream: &Arc<CudaStream>, dst: u64, src: u64, bytes: usize) -> Result<()> {
    // SAFETY: both are live allocations of at least `bytes` bytes on this stream.
    unsafe { drv::memcpy_dtod_async(dst, src, bytes, stream.cu_stream()) }
        .map_err(cuda_err("copying on the device in the CUDA pass"))
}

/// The device address of a contiguous f32 or u32 CUDA tensor's first element.
pub(crate) fn tensor_ptr(t: &Tensor, stream: &Arc<CudaStream>, what: &str) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(Error::InvalidArgument(format!(
            "the CUDA pass needs {what} on the CUDA device, not on {:?}",
            t.device()
        )));
    };
    let (a, _) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::InvalidArgument(format!("the CUDA pass needs {what} contiguous")))?;
    let base = match &cs.slice {
        CudaStorageSlice::F32(s) => s.device_ptr(stream).0,
        CudaStorageSlice::U32(s) => s.device_ptr(stream).0,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "the CUDA pass needs {what} in f32 (u32 for token ids), not {:?}",
                t.dtype()
            )))
        }
    };
    debug_assert!(matches!(t.dtype(), DType::F32 | DType::U32));
    Ok(base + (a * 4) as u64)
}
