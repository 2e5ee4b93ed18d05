//! The model against HF transformers' float64 references (outputs, loss, every gradient).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, load_st, reference_batch, rel_l2};
use mfac_lab::model::Engine;
use mfac_lab::prelude::*;

fn check_f64(name: &str) {
    let dir = fixture(name);
    let r = load_st(&dir.join("reference.safetensors"));
    let model = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F64).unwrap();
    let batch = reference_batch(&r);
    let out = model.forward_full(&batch, false).unwrap();

    // f64 against f64: both sides do the same float64 arithmetic in a different order, so
    // differences are accumulated rounding (~1e-15 relative); 1e-10 leaves room for that and
    // still catches any real deviation (a wrong eps, GELU or mask moves results by ≥ 1e-7).
    let tol = 1e-10;
    let mut failures = vec![];
    let mut check = |what: &str, a: &Tensor, b: &Tensor| {
        let e = rel_l2(a, b);
        if e.is_nan() || e > tol {
            failures.push(format!("{what}: rel L2 {e:e}"));
        }
    };
    for (i, h) in out.bert.hidden_states.iter().enumerate() {
        check(
            &format!("hidden_states.{i}"),
            h,
            &r[&format!("hidden_states.{i}")],
        );
    }
    check(
        "last_hidden_state",
        out.bert.last_hidden_state(),
        &r["last_hidden_state"],
    );
    check("pooled_output", &out.bert.pooled, &r["pooled_output"]);
    check("logits_f64", &out.logits, &r["logits_f64"]);
    let labels = batch.labels.as_ref().unwrap();
    let per = BertClassifier::per_example_loss(&out.logits, labels).unwrap();
    check("loss_per_example", &per, &r["loss_per_example"]);
    let loss = BertClassifier::loss(&out.logits, labels).unwrap();
    check("loss", &loss.reshape(1).unwrap(), &r["loss"]);

    let grads = loss.backward().unwrap();
    let named = model.named_vars();
    assert_eq!(named.len(), 41);
    let global = r["grad_global_norm"].to_vec1::<f64>().unwrap()[0];
    for (n, v) in named {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {n}"));
        let e = common::grad_err(g, &r[&format!("grad.{n}")], global);
        if e.is_nan() || e > tol {
            failures.push(format!("grad.{n}: error {e:e}"));
        }
    }
    // The global norm clip_grad_norm sees.
    let norm = mfac_lab::optim::grad_norm(&grads, &model.vars()).unwrap();
    let ref_norm = r["grad_global_norm"].to_vec1::<f64>().unwrap()[0];
    assert!(
        ((norm - ref_norm) / ref_norm).abs() <= tol,
        "grad_global_norm {norm} vs {ref_norm}"
    );
    assert!(
        failures.is_empty(),
        "{name} f64 parity failures:\n{}",
        failures.join("\n")
    );
}

fn check_f32(name: &str) {
    let dir = fixture(name);
    let r = load_st(&dir.join("reference.safetensors"));
    let model = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F32).unwrap();
    let batch = reference_batch(&r);
    let logits = model.forward(&batch, false).unwrap();
    // f32 rounding (~6e-8 per op) accumulated over two layers of 128-wide dot products and
    // softmaxes stays well below 1e-5 for logits and loss; gradients pass through more ops
    // (backward of softmax, LayerNorm) and get 1e-4.
    let e = rel_l2(&logits, &r["logits_f32"]);
    assert!(e <= 1e-5, "{name} f32 logits vs HF f32 logits: {e:e}");
    let e = rel_l2(&logits, &r["logits_f64"]);
    assert!(e <= 1e-5, "{name} f32 logits vs f64 reference: {e:e}");
    let loss = BertClassifier::loss(&logits, batch.labels.as_ref().unwrap()).unwrap();
    let e = rel_l2(&loss.reshape(1).unwrap(), &r["loss"]);
    assert!(e <= 1e-5, "{name} f32 loss: {e:e}");
    let grads = loss.backward().unwrap();
    let global = r["grad_global_norm"].to_vec1::<f64>().unwrap()[0];
    for (n, v) in model.named_vars() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {n}"));
        let e = common::grad_err(g, &r[&format!("grad.{n}")], global);
        assert!(e <= 1e-4, "{name} f32 grad.{n}: {e:e}");
    }
}

#[test]
fn tiny_f64_matches_hf_outputs_loss_and_all_41_gradients() {
    check_f64("bert-tiny-random");
}

#[test]
fn micro_f64_matches_hf_outputs_loss_and_all_gradients() {
    check_f64("bert-micro-random");
}

/// The CPU pass's evaluation forward (`BertClassifier::logits`, no graph) matches HF too: f64
/// within the same 1e-10 as the graph (same arithmetic, another order), f32 within 1e-5 (f32
/// rounding, as for the graph's logits below).
#[test]
fn cpu_pass_logits_match_hf() {
    for name in ["bert-tiny-random", "bert-micro-random"] {
        let dir = fixture(name);
        let r = load_st(&dir.join("reference.safetensors"));
        let batch = reference_batch(&r);
        let model = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F64).unwrap();
        assert_eq!(model.engine(), Engine::CpuPass);
        let e = rel_l2(&model.logits(&batch).unwrap(), &r["logits_f64"]);
        assert!(e <= 1e-10, "{name} f64 pass logits: {e:e}");
        let model = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F32).unwrap();
        let e = rel_l2(&model.logits(&batch).unwrap(), &r["logits_f64"]);
        assert!(e <= 1e-5, "{name} f32 pass logits: {e:e}");
    }
}

#[test]
fn tiny_f32_matches_hf() {
    check_f32("bert-tiny-random");
}

#[test]
fn micro_f32_matches_hf() {
    check_f32("bert-micro-random");
}

#[test]
fn every_parameter_gets_a_nonzero_gradient_and_pad_row_gets_none() {
    let dir = fixture("bert-tiny-random");
    let r = load_st(&dir.join("reference.safetensors"));
    let model = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F32).unwrap();
    let batch = reference_batch(&r);
    let logits = model.forward(&batch, true).unwrap();
    let loss = BertClassifier::loss(&logits, batch.labels.as_ref().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    assert_eq!(model.vars().len(), 41);
    for (n, v) in model.named_vars() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{n}: no gradient (autograd cut?)"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(norm > 0.0, "{n}: zero gradient");
    }
    let word = &model.named_vars()[0];
    assert_eq!(word.0, "bert.embeddings.word_embeddings.weight");
    let g = grads.get(word.1.as_tensor()).unwrap();
    let pad_row: Vec<f32> = g.get(0).unwrap().to_vec1().unwrap();
    assert!(
        pad_row.iter().all(|&x| x == 0.0),
        "the [PAD] row has a gradient: padding leaks"
    );
}

#[test]
fn bert_tiny_has_4_386_307_parameters_in_hf_order() {
    let m =
        BertClassifier::from_dir(fixture("bert-tiny-random"), 3, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(m.num_parameters(), 4_386_307);
    let r = load_st(&fixture("bert-tiny-random").join("reference.safetensors"));
    // The reference's grad.* names, in the README's order, are HF's named_parameters() order.
    let readme = std::fs::read_to_string(fixture("bert-tiny-random").join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("Gradient tensor names:"))
        .unwrap();
    let names: Vec<&str> = line
        .split('`')
        .filter(|s| s.starts_with("grad."))
        .map(|s| &s[5..])
        .collect();
    let ours: Vec<&str> = m.named_vars().iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(ours, names);
    assert!(names.iter().all(|n| r.contains_key(&format!("grad.{n}"))));
}
