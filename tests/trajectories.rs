//! Replays HF Trainer's float64 fine-tuning trajectories (../shared/fixtures/trajectories)
//! through the trainer's own step code: every loss, lr and pre-clip gradient norm, and the final
//! parameters. Turning clipping off or making the schedule constant must break the match.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{fixture, load_st, st_metadata};
use mfac_lab::model::{Batch, BertClassifier};
use mfac_lab::optim::{AdamWConfig, MFacConfig, OptimKind, OptimizerSpec};
use mfac_lab::train::{scalar, Schedule, Stepper, TrainConfig};

struct Traj {
    model_folder: String,
    spec: OptimizerSpec,
    steps: usize,
    t: HashMap<String, Tensor>,
}

fn load(name: &str) -> Traj {
    let path = fixture("trajectories").join(format!("{name}.safetensors"));
    let meta: serde_json::Value = serde_json::from_str(&st_metadata(&path)["meta"]).unwrap();
    let hp = &meta["hyperparameters"];
    let f = |k: &str| hp[k].as_f64().unwrap();
    let spec = match meta["optimizer"].as_str().unwrap() {
        "adamw" => OptimizerSpec::new(AdamWConfig {
            lr: f("lr"),
            beta1: hp["betas"][0].as_f64().unwrap(),
            beta2: hp["betas"][1].as_f64().unwrap(),
            eps: f("eps"),
            weight_decay: f("weight_decay"),
        }),
        "mfac" => OptimizerSpec::new(MFacConfig {
            lr: f("lr"),
            num_grads: f("ngrads") as usize,
            damp: f("damp"),
            momentum: f("momentum"),
            weight_decay: f("weight_decay"),
            // The reference window is float64.
            window_dtype: DType::F64,
            ..Default::default()
        }),
        other => panic!("unknown optimizer {other}"),
    };
    Traj {
        model_folder: meta["model_folder"].as_str().unwrap().into(),
        spec,
        steps: meta["num_steps"].as_u64().unwrap() as usize,
        t: load_st(&path),
    }
}

fn batch(t: &HashMap<String, Tensor>, prefix: &str) -> Batch {
    let u = |k: &str| t[&format!("{prefix}.{k}")].to_dtype(DType::U32).unwrap();
    Batch::new(
        u("input_ids"),
        u("token_type_ids"),
        u("attention_mask"),
        Some(u("labels")),
    )
    .unwrap()
}

/// Worst errors of a replay.
#[derive(Debug, Default)]
struct Errs {
    loss: f64,
    lr: f64,
    grad_norm: f64,
    params: f64,
    eval_after: f64,
}

fn replay(tr: &Traj, edit: impl Fn(&mut TrainConfig)) -> Errs {
    let model =
        BertClassifier::from_dir(fixture(&tr.model_folder), 3, &Device::Cpu, DType::F64).unwrap();
    let mut cfg = TrainConfig {
        dropout: false,
        ..TrainConfig::default()
    };
    edit(&mut cfg);
    let mut stepper = Stepper::new(&model, &tr.spec, &cfg, tr.steps).unwrap();
    let rel = |a: f64, b: f64| ((a - b) / b).abs();
    let vec = |k: &str| tr.t[k].to_vec1::<f64>().unwrap();
    let (loss, lr, gn) = (vec("loss"), vec("lr"), vec("grad_norm"));
    let mut e = Errs::default();
    // Eval loss before training: the same model, no update yet.
    let eval = batch(&tr.t, "eval");
    let eval_loss = |m: &BertClassifier| {
        scalar(
            &BertClassifier::loss(
                &m.forward(&eval, false).unwrap(),
                eval.labels.as_ref().unwrap(),
            )
            .unwrap(),
        )
        .unwrap()
    };
    assert!(
        rel(
            eval_loss(&model),
            tr.t["eval_loss_before"].to_vec1::<f64>().unwrap()[0]
        ) <= 1e-10
    );
    for k in 0..tr.steps {
        let r = stepper
            .step(&model, &batch(&tr.t, &format!("batch_{k}")), k)
            .unwrap();
        e.loss = e.loss.max(rel(r.loss, loss[k]));
        e.lr = e.lr.max(rel(r.lr, lr[k]));
        e.grad_norm = e.grad_norm.max(rel(r.grad_norm, gn[k]));
    }
    e.eval_after = (eval_loss(&model) - tr.t["eval_loss_after"].to_vec1::<f64>().unwrap()[0]).abs();
    for (name, v) in model.named_vars() {
        if let Some(fin) = tr.t.get(&format!("final.{name}")) {
            let init = &tr.t[&format!("init.{name}")];
            let want = (fin - init).unwrap();
            let got = (v.as_tensor() - init).unwrap();
            e.params = e.params.max(common::rel_l2(&got, &want));
        }
    }
    e
}

/// (loss, grad_norm, eval loss, final − init) tolerances. The README's measured noise floor of a
/// correct float64 port is ~1e-15 for AdamW and ~1e-12 (loss) / 1e-10 (parameters) for M-FAC,
/// whose damp 1e-6 amplifies rounding by |g|²/(m·damp) ~ 1e5; the smallest semantic mistake moves
/// losses by ≥ 1e-3. The bounds sit 1e3 above the noise and far below any mistake.
fn tolerances(spec: &OptimizerSpec) -> (f64, f64, f64, f64) {
    match spec.kind() {
        OptimKind::MFac(_) => (1e-8, 1e-8, 1e-8, 1e-6),
        _ => (1e-10, 1e-10, 1e-10, 1e-8),
    }
}

fn check(name: &str) {
    let tr = load(name);
    let e = replay(&tr, |_| {});
    eprintln!("{name}: {e:?}");
    let (tl, tg, te, tp) = tolerances(&tr.spec);
    assert!(e.loss <= tl, "{name}: loss {e:?}");
    assert!(e.lr <= 1e-15, "{name}: lr {e:?}");
    assert!(e.grad_norm <= tg, "{name}: grad_norm {e:?}");
    assert!(e.eval_after <= te, "{name}: eval loss after {e:?}");
    assert!(e.params <= tp, "{name}: final − init {e:?}");
}

#[test]
fn case1_micro_adamw() {
    check("case1_micro_adamw");
}
#[test]
fn case2_micro_mfac() {
    check("case2_micro_mfac");
}
#[test]
fn case3_tiny_adamw() {
    check("case3_tiny_adamw");
}
#[test]
fn case4_tiny_mfac() {
    check("case4_tiny_mfac");
}
#[test]
fn case5_micro_mfac_momentum_weight_decay() {
    check("case5_micro_mfac_mom_wd");
}

#[test]
fn clipping_off_or_a_constant_schedule_breaks_the_replay() {
    // case2 clips 2 of 30 steps, case3 9 of 12 (README): without clipping both must miss.
    for name in ["case2_micro_mfac", "case3_tiny_adamw"] {
        let tr = load(name);
        let (tl, ..) = tolerances(&tr.spec);
        let e = replay(&tr, |c| c.max_grad_norm = None);
        assert!(
            e.loss > 100.0 * tl,
            "{name} without clipping still matches: {e:?}"
        );
    }
    let tr = load("case2_micro_mfac");
    let e = replay(&tr, |c| c.schedule = Schedule::Constant);
    assert!(
        e.lr > 1e-3 && e.loss > 1e-6,
        "a constant schedule still matches: {e:?}"
    );
}
