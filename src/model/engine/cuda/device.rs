//! The device side of the CUDA pass: our kernels (`kernels/pass.cu`, compiled by build.rs into a
//! fatbin with sm_90a machine code and compute_90 PTX, embedded here and loaded once on candle's
//! context), launches on candle's stream, buffers allocated once and grown when a larger batch
//! comes, and raw device addresses of candle tensors.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    result as drv, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, DriverError,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};
use candle_core::{DType, Storage, Tensor};

use crate::error::{Error, Result};
// The launch arithmetic and the dropout sites are plain Rust in `engine::launch` (the emulated
// kernel tests use them without the `cuda` feature); re-exported here under their old paths.
pub(crate) use crate::model::engine::launch::{
    elementwise, per_row, site_key, DropSite, LN_ROWS, MAX_HIDDEN,
};

/// The kernels: sm_90a machine code (nothing JIT-compiled on an H100/H200) + compute_90 PTX.
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/pass.fatbin"));

pub(crate) fn cuda_err(op: impl Into<String>) -> impl FnOnce(DriverError) -> Error {
    let op = op.into();
    move |e| Error::Cuda {
        op,
        message: format!("{e:?}"),
    }
}

// SAFETY: a plain `#[repr(C)]` struct of the same layout as pass.cu's `DropSite` (u64, u32, f32).
unsafe impl DeviceRepr for DropSite {}

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
        unsafe {
            builder.launch(candle_core::cuda_backend::cudarc::driver::LaunchConfig::from($cfg))
        }
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
    pub sumsq_partial: CudaFunction,
    pub norm_clip: CudaFunction,
    pub adamw_flat: CudaFunction,
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
            sumsq_partial: f("sumsq_partial")?,
            norm_clip: f("norm_clip")?,
            adamw_flat: f("adamw_flat")?,
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

    /// A buffer holding a copy of `data`.
    pub(crate) fn from_host(stream: &Arc<CudaStream>, data: &[T], what: &str) -> Result<Self> {
        let slice = stream
            .clone_htod(data)
            .map_err(cuda_err(format!("copying {what} to the device")))?;
        let ptr = slice.device_ptr(stream).0;
        Ok(DBuf {
            _slice: slice,
            ptr,
            len: data.len(),
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
