//! Resuming a run exactly: a run stopped at step k and resumed from its checkpoint ends with
//! the same weights (bit for bit), the same metrics and the same history as the run that was
//! never stopped — for AdamW, M-FAC and SGD, f32 and f64, with dropout on, on the CPU.

mod common;

use candle_core::{DType, Device};
use common::fixture;
use mfac_lab::data::mnli_sample;
use mfac_lab::optim::{AdamWConfig, MFacConfig, OptimizerSpec, SgdConfig};
use mfac_lab::prelude::*;
use mfac_lab::train::{checkpoint_dir, latest_checkpoint, EvalRecord, TrainRecord};

fn micro(dtype: DType) -> BertClassifier {
    BertClassifier::from_dir(fixture("bert-micro-random"), 3, &Device::Cpu, dtype).unwrap()
}

fn cfg(spec: OptimizerSpec) -> TrainConfig {
    TrainConfig {
        batch_size: 8,
        num_train_epochs: 2.0,
        max_train_samples: Some(72),
        max_eval_samples: Some(24),
        eval_steps: Some(4),
        optimizer: spec,
        quiet: true,
        ..TrainConfig::default()
    }
}

fn bits(m: &BertClassifier) -> Vec<(String, Vec<u64>)> {
    m.named_vars()
        .iter()
        .map(|(n, v)| {
            let t = v.as_tensor().flatten_all().unwrap();
            let b = match t.dtype() {
                DType::F32 => t
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits() as u64)
                    .collect(),
                _ => t
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            };
            (n.clone(), b)
        })
        .collect()
}

/// The history without wall-clock times (the only thing allowed to differ).
fn untimed(t: &[TrainRecord], e: &[EvalRecord]) -> (Vec<TrainRecord>, Vec<EvalRecord>) {
    let t = t
        .iter()
        .map(|r| TrainRecord {
            elapsed: 0.0,
            train_seconds: 0.0,
            fwd_bwd_seconds: 0.0,
            optim_seconds: 0.0,
            ..r.clone()
        })
        .collect();
    let e = e
        .iter()
        .map(|r| EvalRecord {
            elapsed: 0.0,
            train_seconds: 0.0,
            ..r.clone()
        })
        .collect();
    (t, e)
}

fn stop_and_resume(spec: OptimizerSpec, dtype: DType, stop_at: usize) {
    let data = mnli_sample().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // 72 rows / 8 = 9 steps per epoch, 18 steps; evaluations every 4 steps and at 9 and 18.
    let full_dir = tmp.path().join("full");
    let mut full = Trainer::new(micro(dtype), cfg(spec.clone())).output_dir(&full_dir);
    let want = full.fit(&data).unwrap();
    assert_eq!(want.train.len(), 18);

    let dir = tmp.path().join("stopped");
    let mut first = Trainer::new(micro(dtype), cfg(spec.clone()))
        .output_dir(&dir)
        .stop_at_step(stop_at);
    match first.fit(&data).unwrap_err() {
        Error::Interrupted {
            step,
            total,
            checkpoint,
            resume,
        } => {
            assert_eq!((step, total), (stop_at, 18));
            assert_eq!(checkpoint.as_deref(), Some(&*checkpoint_dir(&dir, stop_at)));
            assert!(resume.contains("--resume_from_checkpoint"), "{resume}");
        }
        e => panic!("expected Interrupted, got {e}"),
    }
    let ckpt = latest_checkpoint(&dir).unwrap().unwrap();
    assert_eq!(ckpt, checkpoint_dir(&dir, stop_at));
    // A fresh model (different weights would do too: the checkpoint's replace them).
    let mut second = Trainer::new(micro(dtype), cfg(spec.clone()))
        .output_dir(&dir)
        .resume_from(&ckpt);
    let got = second.fit(&data).unwrap();

    let label = format!("{} {dtype:?} stopped at {stop_at}", spec.name());
    assert!(
        bits(second.model()) == bits(full.model()),
        "{label}: final weights differ"
    );
    assert_eq!(
        untimed(&got.train, &got.evals),
        untimed(&want.train, &want.evals),
        "{label}: history differs"
    );
    for split in ["validation_matched", "validation_mismatched"] {
        assert_eq!(
            got.final_metric(split, "accuracy"),
            want.final_metric(split, "accuracy")
        );
    }
    // The final files agree too (eval_results.json is written from the same history).
    let read = |d: &std::path::Path| std::fs::read_to_string(d.join("eval_results.json")).unwrap();
    assert_eq!(read(&dir), read(&full_dir), "{label}");
}

#[test]
fn adamw_f32_resumes_bit_identically() {
    // Mid-epoch, after an evaluation at step 4.
    stop_and_resume(OptimizerSpec::adamw(1e-3), DType::F32, 6);
}

#[test]
fn sgd_f32_resumes_bit_identically_with_nesterov_momentum_and_weight_decay() {
    // The momentum buffers are state: stopped mid-epoch, after they exist.
    let spec = OptimizerSpec::sgd(SgdConfig {
        lr: 1e-2,
        momentum: 0.9,
        nesterov: true,
        weight_decay: 0.01,
        ..Default::default()
    });
    stop_and_resume(spec, DType::F32, 6);
}

#[test]
fn adamw_f64_resumes_bit_identically_with_weight_decay() {
    let spec = OptimizerSpec::new(AdamWConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        ..Default::default()
    });
    // Exactly at an epoch boundary (9 steps an epoch).
    stop_and_resume(spec, DType::F64, 9);
}

fn mfac(window_dtype: DType, momentum: f64) -> OptimizerSpec {
    OptimizerSpec::mfac(MFacConfig {
        lr: 1e-3,
        // A small window: by the stop it has wrapped around and the m×m inverse has been
        // refreshed from scratch, so the slot pointer and the inverse state both matter.
        num_grads: 4,
        damp: 1e-4,
        momentum,
        weight_decay: 0.0,
        window_dtype,
        ..Default::default()
    })
}

#[test]
fn mfac_f32_resumes_bit_identically() {
    stop_and_resume(mfac(DType::F32, 0.0), DType::F32, 6);
}

#[test]
fn mfac_f64_with_momentum_resumes_bit_identically() {
    // With m = 4 the inverse is rebuilt from scratch every 4 steps (at 4, 8, 12, 16). Stopping
    // at 10 makes the resumed step 11 update the saved inverse in O(m²): without the saved A⁻¹
    // (or the refresh counter) the f64 weights differ in their last bits and this test fails.
    stop_and_resume(mfac(DType::F64, 0.5), DType::F64, 10);
}

#[test]
fn mfac_bf16_window_resumes_bit_identically() {
    stop_and_resume(mfac(DType::BF16, 0.0), DType::F32, 5);
}

fn sparse(window_dtype: DType, block_size: Option<usize>) -> OptimizerSpec {
    OptimizerSpec::mfac(MFacConfig {
        lr: 1e-3,
        num_grads: 4,
        damp: 1e-4,
        // Decoupled with the sparse window: the factor (1 − lr·wd) is part of every step.
        weight_decay: 0.01,
        window_dtype,
        density: 0.05,
        block_size,
        ..Default::default()
    })
}

#[test]
fn sparse_mfac_f32_resumes_bit_identically() {
    // Stopped at 6: the window has wrapped (m = 4) and the error accumulator holds what six
    // steps did not keep; without it (or the rows) the resumed weights differ.
    stop_and_resume(sparse(DType::F32, None), DType::F32, 6);
}

#[test]
fn sparse_mfac_bf16_block_window_resumes_bit_identically() {
    // bf16 values feed their rounding error back through the accumulator: it is state too.
    stop_and_resume(sparse(DType::BF16, Some(4096)), DType::F32, 10);
}

#[test]
fn a_sparse_checkpoint_is_the_size_of_the_sparse_state() {
    let data = mnli_sample().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let spec = sparse(DType::F32, None);
    let mut t = Trainer::new(micro(DType::F32), cfg(spec.clone()))
        .output_dir(&dir)
        .stop_at_step(5);
    let _ = t.fit(&data).unwrap_err();
    let file = checkpoint_dir(&dir, 5).join("optimizer.safetensors");
    let size = std::fs::metadata(&file).unwrap().len();
    let d: usize = micro(DType::F32)
        .named_vars()
        .iter()
        .map(|(_, v)| v.elem_count())
        .sum();
    let cfg = match spec.kind() {
        mfac_lab::optim::OptimKind::MFac(c) => *c,
        _ => unreachable!(),
    };
    // Rows (k = ⌊0.05·d⌋ entries of a u16 column and an f32 value, per row), the f32 error
    // accumulator (4·d), K and its inverse (2·m²·8) and a header: about 4.6·d bytes here, where
    // the dense window alone would be m·d·4 = 16·d.
    let k = (0.05 * d as f64).floor() as u64;
    let want = 4 * k * 6 + 4 * d as u64 + 2 * 16 * 8;
    assert!(size >= want && size < want + 64 * 1024, "{size} vs {want}");
    let dense = MFacConfig {
        density: 1.0,
        ..cfg
    }
    .window_bytes(d) as u64;
    assert!(size * 3 < dense, "{size} vs the dense window's {dense}");
}

#[test]
fn save_steps_and_save_total_limit_keep_the_newest_checkpoints() {
    let data = mnli_sample().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let c = TrainConfig {
        eval_steps: None,
        save_steps: Some(2),
        save_total_limit: Some(2),
        ..cfg(OptimizerSpec::adamw(1e-3))
    };
    Trainer::new(micro(DType::F32), c)
        .output_dir(&dir)
        .fit(&data)
        .unwrap();
    let steps: Vec<usize> = mfac_lab::train::checkpoints(&dir)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    // Checkpoints at 2, 4, 6, 8, 9 (epoch end), 10, …, 16, 18 (the end): the two newest stay.
    assert_eq!(steps, [16, 18]);
    for f in [
        "model.safetensors",
        "config.json",
        "optimizer.safetensors",
        "rng_state.json",
        "trainer_state.json",
    ] {
        assert!(checkpoint_dir(&dir, 18).join(f).is_file(), "{f}");
    }
    // A checkpoint is an HF model folder too.
    BertClassifier::from_dir(checkpoint_dir(&dir, 16), 3, &Device::Cpu, DType::F32).unwrap();
}

#[test]
fn resuming_with_other_settings_is_refused_with_the_difference_named() {
    let data = mnli_sample().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let spec = OptimizerSpec::adamw(1e-3);
    let _ = Trainer::new(micro(DType::F32), cfg(spec))
        .output_dir(&dir)
        .stop_at_step(3)
        .fit(&data)
        .unwrap_err();
    let ckpt = latest_checkpoint(&dir).unwrap().unwrap();
    let e = Trainer::new(micro(DType::F32), cfg(OptimizerSpec::adamw(2e-3)))
        .output_dir(&dir)
        .resume_from(&ckpt)
        .fit(&data)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("optimizer") && e.contains("different run"),
        "{e}"
    );
    // An M-FAC run cannot load an AdamW checkpoint's state either (caught by the same check).
    let e = Trainer::new(micro(DType::F32), cfg(mfac(DType::F32, 0.0)))
        .output_dir(&dir)
        .resume_from(&ckpt)
        .fit(&data)
        .unwrap_err()
        .to_string();
    assert!(e.contains("different run"), "{e}");
    // Without a decision, a folder holding checkpoints is not trained into again.
    let e = Trainer::new(micro(DType::F32), cfg(OptimizerSpec::adamw(1e-3)))
        .output_dir(&dir)
        .fit(&data)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume_from_checkpoint"), "{e}");
}
