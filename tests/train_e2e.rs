//! End to end on bert-micro-random and the embedded real MNLI sample: AdamW and M-FAC train,
//! evaluate both mnli splits, write HF-style outputs, and the checkpoint reloads.

mod common;

use candle_core::{DType, Device};
use common::fixture;
use mfac_lab::cli::GlueArgs;
use mfac_lab::data::mnli_sample;
use mfac_lab::optim::{MFacConfig, OptimizerSpec};
use mfac_lab::prelude::*;

fn micro() -> BertClassifier {
    BertClassifier::from_dir(fixture("bert-micro-random"), 3, &Device::Cpu, DType::F32).unwrap()
}

fn cfg() -> TrainConfig {
    TrainConfig {
        batch_size: 16,
        num_train_epochs: 3.0,
        max_train_samples: Some(160),
        max_eval_samples: Some(64),
        optimizer: OptimizerSpec::adamw(1e-3),
        quiet: true,
        ..TrainConfig::default()
    }
}

fn run(spec: OptimizerSpec) {
    let data = mnli_sample().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("run");
    let mut trainer = Trainer::new(micro(), cfg())
        .optimizer(spec.clone())
        .output_dir(&dir);
    let h = trainer.fit(&data).unwrap();
    // 160 rows / 16 = 10 steps per epoch, 3 epochs.
    assert_eq!(h.train.len(), 30);
    // Linear decay: the last of 30 updates runs at lr/30; the first at the full lr.
    assert_eq!(h.train[0].lr, spec.lr());
    assert!((h.train.last().unwrap().lr - spec.lr() / 30.0).abs() < 1e-18);
    // Training loss goes down: the last epoch's mean below the first's.
    let mean =
        |r: &[mfac_lab::train::TrainRecord]| r.iter().map(|x| x.loss).sum::<f64>() / r.len() as f64;
    let (first, last) = (mean(&h.train[..10]), mean(&h.train[20..]));
    assert!(
        last < first,
        "{}: loss {first:.4} -> {last:.4}",
        spec.name()
    );
    // Both mnli splits evaluated at each epoch end.
    for split in ["validation_matched", "validation_mismatched"] {
        assert_eq!(
            h.evals.iter().filter(|e| e.split == split).count(),
            3,
            "{split}"
        );
        // The reported accuracy is the trained model's, recounted here by hand: the first 64
        // pairs of the split, argmax of the logits against the labels.
        let acc = h.final_metric(split, "accuracy").unwrap();
        let df = &data.eval.iter().find(|(n, _)| n == split).unwrap().1;
        let (pairs, labels) = data.pairs(df).unwrap();
        let model = trainer.model();
        let mut right = 0;
        for (chunk, labs) in pairs[..64].chunks(16).zip(labels[..64].chunks(16)) {
            let b = model
                .tokenizer()
                .unwrap()
                .batch(chunk, None, &Device::Cpu)
                .unwrap();
            let preds: Vec<u32> = model
                .forward(&b, false)
                .unwrap()
                .argmax(1)
                .unwrap()
                .to_vec1()
                .unwrap();
            right += preds.iter().zip(labs).filter(|(p, l)| p == l).count();
        }
        assert_eq!(acc, right as f64 / 64.0, "{split}");
    }
    // The history DataFrame has the documented columns.
    let cols: Vec<String> =
        h.df.get_column_names()
            .iter()
            .map(|s| s.to_string())
            .collect();
    assert_eq!(
        cols,
        [
            "step",
            "epoch",
            "kind",
            "loss",
            "lr",
            "grad_norm",
            "split",
            "metric",
            "value",
            "elapsed",
            "train_seconds",
            "fwd_bwd_seconds",
            "optim_seconds"
        ]
    );
    assert_eq!(h.df.height(), 30 + 6);
    // HF-style outputs.
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval_results.json")).unwrap())
            .unwrap();
    let acc = results["eval_accuracy"].as_f64().unwrap();
    assert_eq!(
        acc,
        h.final_metric("validation_matched", "accuracy").unwrap()
    );
    assert_eq!(
        results["eval_accuracy_mm"].as_f64().unwrap(),
        h.final_metric("validation_mismatched", "accuracy").unwrap()
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["global_step"], 30);
    // The checkpoint reloads with the same eval accuracy.
    let reloaded = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F32).unwrap();
    let again = Trainer::new(reloaded, cfg()).evaluate(&data).unwrap();
    assert_eq!(again[0].metrics[0].1, acc);
    assert_eq!(
        again[0].loss,
        h.evals
            .iter()
            .rev()
            .find(|e| e.split == "validation_matched")
            .unwrap()
            .loss
    );
}

#[test]
fn adamw_end_to_end() {
    run(OptimizerSpec::adamw(1e-3));
}

#[test]
fn mfac_end_to_end() {
    run(OptimizerSpec::mfac(MFacConfig {
        lr: 1e-3,
        num_grads: 8,
        damp: 1e-6,
        ..Default::default()
    }));
}

#[test]
fn same_seed_same_history() {
    let data = mnli_sample().unwrap();
    let c = TrainConfig {
        max_steps: Some(6),
        ..cfg()
    };
    let a = Trainer::new(micro(), c.clone()).fit(&data).unwrap();
    let b = Trainer::new(micro(), c).fit(&data).unwrap();
    assert_eq!(
        a.train.iter().map(|r| r.loss).collect::<Vec<_>>(),
        b.train.iter().map(|r| r.loss).collect::<Vec<_>>()
    );
}

#[test]
fn the_seeds_exact_command_line_parses() {
    let line = r#"--seed 42 --model_name_or_path prajjwal1/bert-tiny --task_name mnli --do_train --do_eval --max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 1e-4 --num_train_epochs 5 --output_dir out_dir --optim MFAC --optim_args"#;
    let mut args: Vec<String> = line.split_whitespace().map(String::from).collect();
    args.push("lr: 1e-4, num_grads: 1024, damp: 1e-6".into());
    let a = GlueArgs::parse(&args).unwrap();
    assert_eq!(a.model_name_or_path, "prajjwal1/bert-tiny");
    assert_eq!(a.task_name, "mnli");
    assert!(a.do_train && a.do_eval);
    assert_eq!(
        a.output_dir.as_deref(),
        Some(std::path::Path::new("out_dir"))
    );
    assert_eq!(
        a.train.optimizer,
        OptimizerSpec::mfac(MFacConfig::model_card())
    );
    let t = &a.train;
    assert_eq!(
        (
            t.seed,
            t.max_seq_length,
            t.batch_size,
            t.optimizer.lr(),
            t.num_train_epochs
        ),
        (42, 128, 32, 1e-4, 5.0)
    );
    assert_eq!(t.max_grad_norm, Some(1.0));
    // `--flag=value` works; unknown flags and bad numbers are errors naming the flag.
    assert_eq!(
        GlueArgs::parse(&["--max_steps=7"]).unwrap().train.max_steps,
        Some(7)
    );
    assert!(GlueArgs::parse(&["--bogus", "1"])
        .unwrap_err()
        .to_string()
        .contains("--bogus"));
    assert!(GlueArgs::parse(&["--learning_rate", "fast"])
        .unwrap_err()
        .to_string()
        .contains("--learning_rate"));
    assert!(
        GlueArgs::parse(&["--optim", "MFAC", "--optim_args", "damp: 0"])
            .unwrap_err()
            .to_string()
            .contains("damp")
    );
    assert!(GlueArgs::parse(&["--device", "tpu"]).is_err());
}

#[test]
fn a_non_finite_loss_stops_with_a_clear_error() {
    let data = mnli_sample().unwrap();
    let out = tempfile::tempdir().unwrap();
    // An absurd learning rate blows the weights up after the first update.
    let c = TrainConfig {
        max_steps: Some(20),
        eval_steps: Some(1),
        ..cfg()
    };
    let e = Trainer::new(micro(), c)
        .optimizer(OptimizerSpec::adamw(1e30))
        .output_dir(out.path().join("run"))
        .fit(&data)
        .unwrap_err();
    match &e {
        Error::NonFiniteLoss { step, loss, saved } => {
            assert_eq!(*step, 1, "step 0 starts from finite weights");
            assert!(!loss.is_finite());
            // The evaluation after the bad update saw non-finite losses: no checkpoint of it.
            assert!(saved.contains("no checkpoint"), "{e}");
        }
        other => panic!("expected NonFiniteLoss, got {other}"),
    }
    assert!(mfac_lab::train::checkpoints(&out.path().join("run"))
        .unwrap()
        .is_empty());
}

#[test]
fn a_checkpoint_is_kept_at_each_evaluation() {
    let data = mnli_sample().unwrap();
    let out = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        max_steps: Some(4),
        eval_steps: Some(2),
        ..cfg()
    };
    let mut t = Trainer::new(micro(), c).output_dir(out.path().join("run"));
    let h = t.fit(&data).unwrap();
    let listing: Vec<_> = std::fs::read_dir(out.path().join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let ckpt = BertClassifier::from_dir(
        out.path().join("run/checkpoint-4"),
        3,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap_or_else(|e| panic!("{e}: {listing:?}"));
    // The last evaluation was at step 4, the end: the checkpoint is the final model.
    let again = Trainer::new(ckpt, cfg()).evaluate(&data).unwrap();
    assert_eq!(
        again[0].loss,
        h.evals
            .iter()
            .rev()
            .find(|e| e.split == "validation_matched")
            .unwrap()
            .loss
    );
}
