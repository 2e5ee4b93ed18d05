//! Row-major f32 matrix products through cuBLAS (candle's handle, hence candle's stream), on
//! raw device addresses. TF32 is never used: the compute type is plain `CUBLAS_COMPUTE_32F`
//! (HF parity; torch's default for f32 matmuls).
//!
//! cuBLAS is column-major. A row-major `r × c` matrix with row stride `ld` is, read
//! column-major, its transpose (`c × r`, leading dimension `ld`). So the row-major product
//! `C = op(A)·op(B)` (`M × N`) is the column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: cuBLAS gets B first,
//! with B's transpose flag, then A with A's, and `m = N`, `n = M`.

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::cublas::{result, sys, CudaBlas};

use crate::error::{Error, Result};

/// A row-major matrix operand at a raw device address: `rows × cols` of the stored matrix, row
/// stride `ld`, transposed in the product when `t`, and (for batched products) `stride`
/// elements between consecutive matrices.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Mat {
    pub ptr: u64,
    pub ld: usize,
    pub t: bool,
    pub stride: usize,
}

impl Mat {
    /// A stored matrix with row stride `ld`, used as is.
    pub(crate) fn n(ptr: u64, ld: usize) -> Self {
        Mat {
            ptr,
            ld,
            t: false,
            stride: 0,
        }
    }

    /// A stored matrix with row stride `ld`, transposed in the product.
    pub(crate) fn t(ptr: u64, ld: usize) -> Self {
        Mat {
            ptr,
            ld,
            t: true,
            stride: 0,
        }
    }

    /// The same operand, `stride` elements apart in a batched product.
    pub(crate) fn every(self, stride: usize) -> Self {
        Mat { stride, ..self }
    }
}

fn op(t: bool) -> sys::cublasOperation_t {
    if t {
        sys::cublasOperation_t::CUBLAS_OP_T
    } else {
        sys::cublasOperation_t::CUBLAS_OP_N
    }
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Cuda {
        op: format!("a cuBLAS product ({what} = {v})"),
        message: "larger than cuBLAS's 32-bit sizes".into(),
    })
}

/// `C = α·op(A)·op(B) + β·C`, row-major, `C` being `m × n` with row stride `c.ld` and `k` the
/// inner size; `batch` products at the operands' strides (one when `batch == 1`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    blas: &CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    a: Mat,
    b: Mat,
    c: Mat,
    alpha: f32,
    beta: f32,
    batch: usize,
) -> Result<()> {
    if m == 0 || n == 0 || batch == 0 {
        return Ok(());
    }
    let (mi, ni, ki) = (int(m, "m")?, int(n, "n")?, int(k, "k")?);
    let (lda, ldb, ldc) = (int(a.ld, "lda")?, int(b.ld, "ldb")?, int(c.ld, "ldc")?);
    let f32t = sys::cudaDataType_t::CUDA_R_32F;
    let compute = sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
    let algo = sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
    let alpha_p = &alpha as *const f32 as *const c_void;
    let beta_p = &beta as *const f32 as *const c_void;
    // SAFETY: the addresses are live device allocations of the pass (the workspace, the
    // parameters, the gradient buffer), each at least as large as the view described, on the
    // stream the handle is bound to; alpha and beta live across the call (host pointer mode).
    let r = unsafe {
        if batch == 1 {
            result::gemm_ex(
                *blas.handle(),
                op(b.t),
                op(a.t),
                ni,
                mi,
                ki,
                alpha_p,
                b.ptr as *const c_void,
                f32t,
                ldb,
                a.ptr as *const c_void,
                f32t,
                lda,
                beta_p,
                c.ptr as *mut c_void,
                f32t,
                ldc,
                compute,
                algo,
            )
        } else {
            result::gemm_strided_batched_ex(
                *blas.handle(),
                op(b.t),
                op(a.t),
                ni,
                mi,
                ki,
                alpha_p,
                b.ptr as *const c_void,
                f32t,
                ldb,
                b.stride as i64,
                a.ptr as *const c_void,
                f32t,
                lda,
                a.stride as i64,
                beta_p,
                c.ptr as *mut c_void,
                f32t,
                ldc,
                c.stride as i64,
                int(batch, "batch")?,
                compute,
                algo,
            )
        }
    };
    r.map_err(|e| Error::Cuda {
        op: format!("cuBLAS sgemm {m}×{n}×{k} (batch {batch})"),
        message: format!("{e:?}"),
    })
}

/// Pins the handle to the default (non-TF32) math mode, whatever set it before.
pub(crate) fn no_tf32(blas: &CudaBlas) -> Result<()> {
    // SAFETY: a valid handle (candle's), a valid enum value.
    let status =
        unsafe { sys::cublasSetMathMode(*blas.handle(), sys::cublasMath_t::CUBLAS_DEFAULT_MATH) };
    status.result().map_err(|e| Error::Cuda {
        op: "setting cuBLAS's math mode (no TF32)".into(),
        message: format!("{e:?}"),
    })
}
