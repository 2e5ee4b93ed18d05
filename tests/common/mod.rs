//! Test helpers: the one way tests find `../shared`, and numeric comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// `../shared` beside the crate root. Fails loudly when it is missing: tests never skip silently.
pub fn shared() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    assert!(
        p.join("fixtures").is_dir(),
        "../shared (read-only fixtures and data) must sit beside the crate root; not found at {}",
        p.display()
    );
    p
}

/// A fixture folder, e.g. `fixture("bert-tiny-random")`.
pub fn fixture(name: &str) -> PathBuf {
    shared().join("fixtures").join(name)
}

/// Every tensor of a safetensors file, on the CPU.
pub fn load_st(path: &std::path::Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A tensor's values, flattened, as f64.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// ‖a − b‖ / ‖b‖ computed in f64 (‖a − b‖ when b is all zeros).
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    rel_l2_vec(&f64s(a), &f64s(b))
}

/// The reference's int64 inputs as a u32 Batch.
pub fn reference_batch(r: &HashMap<String, Tensor>) -> mfac_lab::model::Batch {
    let u = |k: &str| r[k].to_dtype(DType::U32).unwrap();
    mfac_lab::model::Batch::new(
        u("input_ids"),
        u("token_type_ids"),
        u("attention_mask"),
        Some(u("labels")),
    )
    .unwrap()
}

/// Error of a gradient against its reference. Relative L2, except for gradients that are
/// analytically zero: the key bias adds the same constant to every score of a softmax row, so
/// its exact gradient is 0 and the reference holds only rounding noise (~1e-20 for a global norm
/// ~1). A relative error of noise against noise means nothing; for those (reference norm below
/// 1e-12 of the global gradient norm) the difference is measured against the global norm
/// instead, which still requires ours to be zero up to rounding.
pub fn grad_err(ours: &Tensor, reference: &Tensor, global_norm: f64) -> f64 {
    let r = f64s(reference);
    if r.iter().map(|x| x * x).sum::<f64>().sqrt() <= 1e-12 * global_norm {
        let zeros = vec![0.0; r.len()];
        let diff: Vec<f64> = f64s(ours).iter().zip(&r).map(|(o, x)| o - x).collect();
        rel_l2_vec(&diff, &zeros) / global_norm
    } else {
        rel_l2(ours, reference)
    }
}
pub mod mock_hub;

/// The `__metadata__` of a safetensors file (string to string).
pub fn st_metadata(path: &std::path::Path) -> HashMap<String, String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).unwrap();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).unwrap();
    let mut header = vec![0u8; u64::from_le_bytes(n) as usize];
    f.read_exact(&mut header).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&header).unwrap();
    v["__metadata__"]
        .as_object()
        .map(|o| {
            o.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Relative L2 of two f64 slices (‖a − b‖ when b is all zeros).
pub fn rel_l2_vec(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    let nb: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    if nb == 0.0 {
        diff
    } else {
        diff / nb
    }
}

/// A GradStore whose gradient for `w` is exactly `g` (d/dw Σ w·g = g), in w's dtype (g rounded
/// to it once).
pub fn grads_for(w: &candle_core::Var, g: &[f64]) -> candle_core::backprop::GradStore {
    let gt = Tensor::new(g, &Device::Cpu)
        .unwrap()
        .to_dtype(w.dtype())
        .unwrap();
    (w.as_tensor() * &gt)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap()
}
