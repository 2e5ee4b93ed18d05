//! stsb, GLUE's regression task: float labels, MSE loss, Pearson / Spearman, end to end.

mod common;

use common::fixture;
use mfac_lab::data::{load_glue_dir, mnli_sample, GlueTask};
use mfac_lab::prelude::*;

/// A small stsb-shaped TSV (sentence1, sentence2, label as a 0–5 score) made from real MNLI pairs:
/// entailment 4.5, neutral 2.5, contradiction 0.5, so there is something to learn.
fn write_stsb(dir: &std::path::Path, rows: usize, skip: usize, name: &str) {
    let data = mnli_sample().unwrap();
    let (pairs, labels) = data.pairs(&data.train).unwrap();
    let mut s = String::from("sentence1\tsentence2\tlabel\n");
    for i in skip..skip + rows {
        let score = [4.5, 2.5, 0.5][labels[i] as usize];
        s += &format!("{}\t{}\t{score}\n", pairs[i].0, pairs[i].1);
    }
    std::fs::write(dir.join(name), s).unwrap();
}

#[test]
fn stsb_trains_with_mse_and_reports_pearson_and_spearman() {
    let dir = tempfile::tempdir().unwrap();
    write_stsb(dir.path(), 256, 0, "train.tsv");
    write_stsb(dir.path(), 128, 600, "validation.tsv");
    let data = load_glue_dir(GlueTask::Stsb, dir.path()).unwrap();
    assert!(data.train.column("label").unwrap().dtype().is_float());
    // Classification-style access is refused with a pointer to the right one.
    let e = data.pairs(&data.train).unwrap_err().to_string();
    assert!(e.contains("scores"), "{e}");
    let scores = data.scores(&data.train).unwrap();
    assert_eq!(scores.len(), 256);
    assert!(scores.iter().all(|s| [4.5, 2.5, 0.5].contains(s)));

    // The base checkpoint (no classifier): a fresh 1-output regression head, as HF does.
    let model = BertClassifier::from_dir(
        fixture("bert-micro-random").join("pytorch-bin"),
        1,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let mut cfg = TrainConfig::run_glue();
    cfg.batch_size = 16;
    cfg.num_train_epochs = 3.0;
    cfg.quiet = true;
    let out = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(model, cfg)
        .optimizer(OptimizerSpec::adamw(5e-3))
        .output_dir(out.path());
    let h = trainer.fit(&data).unwrap();
    // MSE on scores in [0.5, 4.5]: it must fall well below the start (targets' spread).
    let n = h.train.len();
    let first: f64 = h.train[..5].iter().map(|t| t.loss).sum::<f64>() / 5.0;
    let last: f64 = h.train[n - 5..].iter().map(|t| t.loss).sum::<f64>() / 5.0;
    assert!(last < 0.7 * first, "MSE did not go down: {first} → {last}");
    for m in ["pearson", "spearmanr"] {
        let v = h.final_metric("validation", m).unwrap();
        assert!(v.is_finite() && (-1.0..=1.0).contains(&v), "{m} = {v}");
    }
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("eval_results.json")).unwrap(),
    )
    .unwrap();
    assert!(
        results["eval_pearson"].is_f64() && results["eval_spearmanr"].is_f64(),
        "{results}"
    );
}

#[test]
fn mse_loss_is_the_squared_error_of_the_single_output() {
    let logits = Tensor::new(&[[1.0f64], [3.0], [-1.0]], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[0.5f32, 3.0, 1.0], &Device::Cpu).unwrap();
    let per: Vec<f64> = BertClassifier::per_example_loss(&logits, &labels)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(per, vec![0.25, 0.0, 4.0]);
    let mean: f64 = BertClassifier::loss(&logits, &labels)
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!((mean - 4.25 / 3.0).abs() < 1e-12);
}

#[test]
fn a_non_numeric_stsb_label_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("train.tsv"),
        "sentence1\tsentence2\tlabel\na\tb\thigh\n",
    )
    .unwrap();
    let e = load_glue_dir(GlueTask::Stsb, dir.path())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a number") && e.contains("line 2"), "{e}");
}
