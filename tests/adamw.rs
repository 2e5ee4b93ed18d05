//! One AdamW step (torch semantics) from HF's reference gradients, against torch's results.

mod common;

use candle_core::{DType, Device};
use common::{fixture, load_st, reference_batch, rel_l2};
use mfac_lab::optim::{clip_grad_norm, AdamW, AdamWConfig};
use mfac_lab::prelude::*;

/// A model at the reference start point and a GradStore holding exactly the reference gradients.
fn setup() -> (
    BertClassifier,
    candle_core::backprop::GradStore,
    std::collections::HashMap<String, Tensor>,
) {
    let dir = fixture("bert-tiny-random");
    let r = load_st(&dir.join("reference.safetensors"));
    let m = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F64).unwrap();
    let batch = reference_batch(&r);
    let loss = BertClassifier::loss(
        &m.forward(&batch, false).unwrap(),
        batch.labels.as_ref().unwrap(),
    )
    .unwrap();
    let mut grads = loss.backward().unwrap();
    for (n, v) in m.named_vars() {
        grads.insert(v.as_tensor(), r[&format!("grad.{n}")].clone());
    }
    (m, grads, r)
}

fn param(m: &BertClassifier, name: &str) -> Tensor {
    m.named_vars()
        .iter()
        .find(|(n, _)| n == name)
        .unwrap()
        .1
        .as_tensor()
        .clone()
}

// The update is lr·m̂/(sqrt(v̂)+eps) on float64 values; the only differences from torch are the
// order of a handful of f64 operations, so agreement is at rounding level (≤ 1e-12 relative).
const TOL: f64 = 1e-12;

#[test]
fn one_step_matches_torch_adamw() {
    let (m, grads, r) = setup();
    let start = param(&m, "bert.embeddings.word_embeddings.weight")
        .copy()
        .unwrap();
    let mut opt = AdamW::new(
        m.vars(),
        AdamWConfig {
            lr: 1e-4,
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&grads).unwrap();
    for name in [
        "classifier.weight",
        "classifier.bias",
        "bert.embeddings.word_embeddings.weight",
    ] {
        let e = rel_l2(&param(&m, name), &r[&format!("adamw.{name}")]);
        assert!(e <= TOL, "adamw.{name}: {e:e}");
    }
    // Exactly the batch's token rows moved; all others are bit-identical.
    let after = param(&m, "bert.embeddings.word_embeddings.weight");
    let changed: Vec<i64> = (0..start.dim(0).unwrap())
        .filter(|&i| {
            let a: Vec<f64> = start.get(i).unwrap().to_vec1().unwrap();
            let b: Vec<f64> = after.get(i).unwrap().to_vec1().unwrap();
            a != b
        })
        .map(|i| i as i64)
        .collect();
    let expected: Vec<i64> = r["adamw.word_embeddings_changed_rows"].to_vec1().unwrap();
    assert_eq!(changed, expected);
}

#[test]
fn one_step_with_weight_decay_matches_torch() {
    let (m, grads, r) = setup();
    let cfg = AdamWConfig {
        lr: 1e-4,
        weight_decay: 0.01,
        ..Default::default()
    };
    let mut opt = AdamW::new(m.vars(), cfg).unwrap();
    opt.step(&grads).unwrap();
    let e = rel_l2(
        &param(&m, "classifier.weight"),
        &r["adamw_wd0.01.classifier.weight"],
    );
    assert!(e <= TOL, "{e:e}");
    // And it differs from the step without decay (the test can fail).
    assert!(
        rel_l2(
            &r["adamw_wd0.01.classifier.weight"],
            &r["adamw.classifier.weight"]
        ) > 1e-9
    );
}

#[test]
fn one_step_after_clipping_matches_torch() {
    let (m, mut grads, r) = setup();
    let norm = clip_grad_norm(&mut grads, &m.vars(), 1.0).unwrap();
    let ref_norm = r["grad_global_norm"].to_vec1::<f64>().unwrap()[0];
    assert!((norm - ref_norm).abs() <= 1e-12 * ref_norm);
    let mut opt = AdamW::new(
        m.vars(),
        AdamWConfig {
            lr: 1e-4,
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&grads).unwrap();
    let e = rel_l2(
        &param(&m, "classifier.weight"),
        &r["adamw_clip1.classifier.weight"],
    );
    assert!(e <= TOL, "{e:e}");
}

#[test]
fn hf_grouping_skips_decay_for_biases_and_layernorm() {
    let (m, _, _) = setup();
    // Zero gradients: only weight decay can move a parameter.
    let loss = (param(&m, "classifier.weight").sum_all().unwrap() * 0.0).unwrap();
    let mut grads = loss.backward().unwrap();
    for (_, v) in m.named_vars() {
        grads.insert(v.as_tensor(), v.as_tensor().zeros_like().unwrap());
    }
    let before: Vec<Tensor> = m
        .vars()
        .iter()
        .map(|v| v.as_tensor().copy().unwrap())
        .collect();
    let mut opt = AdamW::new_named(
        m.named_vars(),
        AdamWConfig {
            lr: 0.1,
            weight_decay: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&grads).unwrap();
    for ((n, v), b) in m.named_vars().iter().zip(&before) {
        let moved = rel_l2(v.as_tensor(), b) > 0.0;
        let exempt = n.ends_with(".bias") || n.contains("LayerNorm");
        assert_eq!(moved, !exempt, "{n}");
    }
}
