//! The hand-written CPU training pass (`BertClassifier::loss_and_grads`) against HF's float64
//! references and against candle's autograd graph, dropout included.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixture, load_st, reference_batch};
use mfac_lab::model::Engine;
use mfac_lab::prelude::*;

/// The graph's loss and gradients (forward, loss, `backward()`), for comparison.
fn graph_pass(model: &BertClassifier, batch: &Batch, train: bool) -> (f64, GradStore) {
    let logits = model.forward(batch, train).unwrap();
    let loss = BertClassifier::loss(&logits, batch.labels.as_ref().unwrap()).unwrap();
    let value = loss
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (value, loss.backward().unwrap())
}

use candle_core::backprop::GradStore;

fn micro_config() -> BertConfig {
    BertConfig::from_file(fixture("bert-micro-random").join("config.json")).unwrap()
}

fn check_against_hf(name: &str, dtype: DType, tol: f64) {
    let dir = fixture(name);
    let r = load_st(&dir.join("reference.safetensors"));
    let model = BertClassifier::from_dir(&dir, 3, &Device::Cpu, dtype).unwrap();
    let batch = reference_batch(&r);
    let (loss, grads) = model.loss_and_grads(&batch, false).unwrap();
    let ref_loss = r["loss"].to_vec1::<f64>().unwrap()[0];
    assert!(
        ((loss - ref_loss) / ref_loss).abs() <= tol,
        "{name} {dtype:?} loss {loss} vs HF {ref_loss}"
    );
    let global = r["grad_global_norm"].to_vec1::<f64>().unwrap()[0];
    let mut failures = vec![];
    for (n, v) in model.named_vars() {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {n}"));
        let e = common::grad_err(g, &r[&format!("grad.{n}")], global);
        if e.is_nan() || e > tol {
            failures.push(format!("grad.{n}: error {e:e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "{name} {dtype:?}: the CPU pass differs from HF:\n{}",
        failures.join("\n")
    );
}

// f64 against HF's f64: the same arithmetic in another order, so only accumulated rounding
// (~1e-15) separates them; 1e-10 is the bound bert_parity.rs uses for the graph, and any real
// slip (a missing mask, a wrong LayerNorm term) moves gradients by far more.
#[test]
fn tiny_f64_pass_matches_hf_loss_and_all_41_gradients() {
    check_against_hf("bert-tiny-random", DType::F64, 1e-10);
}

#[test]
fn micro_f64_pass_matches_hf_loss_and_all_gradients() {
    check_against_hf("bert-micro-random", DType::F64, 1e-10);
}

// f32: the graph's f32 bound (bert_parity.rs): ~6e-8 per op through softmax and LayerNorm
// backward stays below 1e-4 relative.
#[test]
fn tiny_f32_pass_matches_hf() {
    check_against_hf("bert-tiny-random", DType::F32, 1e-4);
}

/// The worst gradient error over every parameter: relative L2, except for gradients that are
/// analytically zero (the key bias's: softmax ignores a per-row shift), which hold only rounding
/// noise on both sides. Those (norm below `floor` × the global norm: 1e-12 in f64, as in
/// [`common::grad_err`]; 1e-5 in f32, whose noise is ~1e-7) are measured against the global norm.
fn max_grad_diff(
    ma: &BertClassifier,
    a: &GradStore,
    mb: &BertClassifier,
    b: &GradStore,
    floor: f64,
) -> (f64, String) {
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let global = norm(
        &mb.named_vars()
            .iter()
            .flat_map(|(_, v)| common::f64s(b.get(v.as_tensor()).unwrap()))
            .collect::<Vec<_>>(),
    );
    let mut worst = (0.0, String::new());
    for ((n, va), (_, vb)) in ma.named_vars().iter().zip(mb.named_vars()) {
        let ga = common::f64s(a.get(va.as_tensor()).unwrap());
        let gb = common::f64s(b.get(vb.as_tensor()).unwrap());
        let diff: Vec<f64> = ga.iter().zip(&gb).map(|(x, y)| x - y).collect();
        let e = if norm(&gb) <= floor * global {
            norm(&diff) / global
        } else {
            norm(&diff) / norm(&gb)
        };
        if e.is_nan() || e > worst.0 {
            worst = (e, n.clone());
        }
    }
    worst
}

/// With dropout on, the pass draws the same masks in the same order as the graph, so two models
/// with the same dropout seed give the same loss and gradients, step after step.
#[test]
fn pass_equals_graph_with_dropout_on() {
    for name in ["bert-micro-random", "bert-tiny-random"] {
        let dir = fixture(name);
        let r = load_st(&dir.join("reference.safetensors"));
        let batch = reference_batch(&r);
        let a = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F64).unwrap();
        let b = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F64).unwrap();
        a.set_dropout_seed(11);
        b.set_dropout_seed(11);
        let (eval_loss, _) = a.loss_and_grads(&batch, false).unwrap();
        for call in 0..2 {
            let (la, ga) = a.loss_and_grads(&batch, true).unwrap();
            let (lb, gb) = graph_pass(&b, &batch, true);
            // Dropout is really on: the loss moves away from the eval loss.
            assert!(
                (la - eval_loss).abs() > 1e-6,
                "{name}: dropout had no effect"
            );
            // Both are f64 with the same masks: rounding-level agreement (1e-12).
            assert!(
                ((la - lb) / lb).abs() < 1e-12,
                "{name} call {call}: loss {la} vs graph {lb}"
            );
            let (e, which) = max_grad_diff(&a, &ga, &b, &gb, 1e-12);
            assert!(
                e < 1e-12,
                "{name} call {call}: grad {which} differs by {e:e}"
            );
        }
    }
}

/// The f32 pass has its own kernels (vectorised softmax both ways with the dropout multipliers,
/// Φ, f32 accumulation): with dropout on it must agree with the f32 graph, whose kernels
/// accumulate in f64 with libm's functions.
#[test]
fn f32_pass_equals_f32_graph_with_dropout_on() {
    let dir = fixture("bert-tiny-random");
    let r = load_st(&dir.join("reference.safetensors"));
    let batch = reference_batch(&r);
    let a = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F32).unwrap();
    let b = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F32).unwrap();
    a.set_dropout_seed(5);
    b.set_dropout_seed(5);
    let (la, ga) = a.loss_and_grads(&batch, true).unwrap();
    let (lb, gb) = graph_pass(&b, &batch, true);
    // Two f32 computations of the same function: ~6e-8 per op, through two layers and their
    // backward, stays below 1e-4 (the bound bert_parity.rs uses for f32 gradients against
    // HF); a wrong mask or a missed dropout site moves gradients by far more (≥ 1e-2).
    assert!(((la - lb) / lb).abs() < 1e-5, "loss {la} vs graph {lb}");
    let (e, which) = max_grad_diff(&a, &ga, &b, &gb, 1e-5);
    assert!(e < 1e-4, "grad {which} differs by {e:e}");
}

/// A one-output model with float labels trains on the squared error, as in the graph (stsb).
#[test]
fn regression_pass_equals_graph() {
    let model = BertClassifier::random(&micro_config(), 1, 5, &Device::Cpu, DType::F64).unwrap();
    let ids = Tensor::new(
        &[[101u32, 2054, 2003, 102, 0], [101, 7592, 2088, 2003, 102]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = ids.ne(0u32).unwrap().to_dtype(DType::U32).unwrap();
    let labels = Tensor::new(&[3.5f32, 0.25], &Device::Cpu).unwrap();
    let batch = Batch::new(ids.clone(), ids.zeros_like().unwrap(), mask, Some(labels)).unwrap();
    let (la, ga) = model.loss_and_grads(&batch, false).unwrap();
    let (lb, gb) = graph_pass(&model, &batch, false);
    assert!(((la - lb) / lb).abs() < 1e-12, "mse {la} vs graph {lb}");
    let (e, which) = max_grad_diff(&model, &ga, &model, &gb, 1e-12);
    assert!(e < 1e-12, "grad {which} differs by {e:e}");
}

/// The same call on the graph engine (what other devices run) gives the same result; the
/// evaluation forwards of both engines agree too.
#[test]
fn the_graph_engine_gives_the_same_pass() {
    let dir = fixture("bert-micro-random");
    let r = load_st(&dir.join("reference.safetensors"));
    let batch = reference_batch(&r);
    let model = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F64).unwrap();
    assert_eq!(model.engine(), Engine::CpuPass);
    let graph = model.rebind().unwrap().with_engine(Engine::Graph).unwrap();
    let (la, ga) = model.loss_and_grads(&batch, false).unwrap();
    let (lb, gb) = graph.loss_and_grads(&batch, false).unwrap();
    // f64 both ways, same operations in another order: rounding only.
    assert!(((la - lb) / lb).abs() < 1e-12);
    let (e, which) = max_grad_diff(&model, &ga, &graph, &gb, 1e-12);
    assert!(e < 1e-12, "grad {which} differs by {e:e}");
    let (a, b) = (model.logits(&batch).unwrap(), graph.logits(&batch).unwrap());
    let e = common::rel_l2(&a, &b);
    assert!(e < 1e-12, "logits differ by {e:e}");
}

/// An engine that cannot run a model is refused with a message naming the way out.
#[test]
fn the_cpu_pass_refuses_what_it_cannot_run() {
    let cfg = BertConfig {
        hidden_act: "relu".into(),
        ..micro_config()
    };
    let model = BertClassifier::random(&cfg, 3, 1, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(model.engine(), Engine::Graph);
    let e = model.with_engine(Engine::CpuPass).unwrap_err();
    assert!(e.to_string().contains("Engine::Graph"), "{e}");
}

#[test]
fn bad_batches_are_errors() {
    let pass = BertClassifier::random(&micro_config(), 3, 1, &Device::Cpu, DType::F32).unwrap();
    let graph = pass.rebind().unwrap().with_engine(Engine::Graph).unwrap();
    let ids = Tensor::new(&[[101u32, 7, 102]], &Device::Cpu).unwrap();
    let types = ids.zeros_like().unwrap();
    let mask = ids.ones_like().unwrap();
    let with = |ids: &Tensor, label: u32| {
        let l = Tensor::new(&[label], &Device::Cpu).unwrap();
        Batch::new(ids.clone(), types.clone(), mask.clone(), Some(l)).unwrap()
    };
    // The same errors from every engine (the checks are shared), never a panic.
    for model in [&pass, &graph] {
        let e = model.loss_and_grads(&with(&ids, 3), true).unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        let big = Tensor::new(&[[101u32, 999_999, 102]], &Device::Cpu).unwrap();
        let e = model.loss_and_grads(&with(&big, 0), true).unwrap_err();
        assert!(e.to_string().contains("vocabulary"), "{e}");
        let e = model.logits(&with(&big, 0)).unwrap_err();
        assert!(e.to_string().contains("vocabulary"), "{e}");
        let unlabelled = Batch::new(ids.clone(), types.clone(), mask.clone(), None).unwrap();
        let e = model.loss_and_grads(&unlabelled, true).unwrap_err();
        assert!(e.to_string().contains("labels"), "{e}");
    }
}
