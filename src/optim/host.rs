//! Direct access to the data of CPU tensors, for the optimizers' fused host loops.

/// Runs `$body` with `$s` bound to the contiguous CPU data of `t` as a typed slice (f32, f64,
/// bf16 or f16); an error for other dtypes or devices. `t` must be contiguous.
///
/// Runs `f` on the contiguous CPU data of `t` as a typed slice.
macro_rules! with_cpu_slice {
    ($t:expr, |$s:ident| $body:expr) => {{
        let t: &candle_core::Tensor = $t;
        let (storage, layout) = t.storage_and_layout();
        let (a, n) = (layout.start_offset(), t.elem_count());
        match &*storage {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                let $s = &v[a..a + n];
                Ok($body)
            }
            candle_core::Storage::Cpu(candle_core::CpuStorage::F64(v)) => {
                let $s = &v[a..a + n];
                Ok($body)
            }
            candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(v)) => {
                let $s = &v[a..a + n];
                Ok($body)
            }
            candle_core::Storage::Cpu(candle_core::CpuStorage::F16(v)) => {
                let $s = &v[a..a + n];
                Ok($body)
            }
            _ => Err($crate::error::Error::InvalidArgument(format!(
                "needs float tensors on the CPU, got {:?} on {:?}",
                t.dtype(),
                t.device()
            ))),
        }
    }};
}

pub(crate) use with_cpu_slice;
