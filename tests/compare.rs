//! compare_optimizers and the figures, on bert-micro-random and the embedded MNLI sample.

mod common;

use common::fixture;
use mfac_lab::compare::{compare_optimizers, CompareConfig, ModelSource};
use mfac_lab::data::mnli_sample;
use mfac_lab::prelude::*;

fn small_cfg(seeds: Vec<u64>) -> CompareConfig {
    let mut train = TrainConfig::run_glue();
    train.batch_size = 16;
    train.num_train_epochs = 1.0;
    train.max_train_samples = Some(128);
    train.max_eval_samples = Some(200);
    train.learning_rate = 5e-3;
    train.quiet = true;
    CompareConfig {
        train,
        seeds,
        device: Device::Cpu,
        output_dir: None,
    }
}

fn specs() -> Vec<OptimizerSpec> {
    // Large steps, so that runs from different seeds end at different accuracies.
    vec![
        OptimizerSpec::adamw(5e-3),
        OptimizerSpec::mfac(MFacConfig {
            lr: 5e-3,
            num_grads: 4,
            damp: 1e-4,
            ..MFacConfig::default()
        }),
    ]
}

fn micro() -> ModelSource {
    ModelSource::Pretrained(fixture("bert-micro-random").to_string_lossy().into_owned())
}

#[test]
fn two_optimizers_two_seeds_history_summary_and_determinism() {
    let data = mnli_sample().unwrap();
    let cmp = compare_optimizers(&micro(), &data, &specs(), &small_cfg(vec![1, 2])).unwrap();
    assert_eq!(cmp.runs.len(), 4);
    let hist = cmp.history().unwrap();
    let names: Vec<String> = hist
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    for c in [
        "optimizer",
        "seed",
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
    ] {
        assert!(
            names.contains(&c.to_string()),
            "missing column {c}: {names:?}"
        );
    }
    let opt = hist.column("optimizer").unwrap().str().unwrap().clone();
    let seed = hist.column("seed").unwrap().u64().unwrap().clone();
    for o in ["adamw", "mfac"] {
        for s in [1u64, 2] {
            let n = opt
                .iter()
                .zip(seed.iter())
                .filter(|(a, b)| *a == Some(o) && *b == Some(s))
                .count();
            assert!(n > 4, "({o}, {s}) has {n} history rows");
        }
    }
    // Two seeds: a spread; the same metric with one seed has std 0.
    let summary = cmp.summary().unwrap();
    let std = summary.column("std").unwrap().f64().unwrap().clone();
    let runs = summary.column("runs").unwrap().u32().unwrap().clone();
    assert!(runs.iter().all(|r| r == Some(2)));
    assert!(
        std.iter().flatten().any(|s| s > 0.0),
        "two seeds should not agree exactly: {summary}"
    );
    let one = compare_optimizers(&micro(), &data, &specs(), &small_cfg(vec![1])).unwrap();
    let s1 = one.summary().unwrap();
    assert!(s1
        .column("std")
        .unwrap()
        .f64()
        .unwrap()
        .iter()
        .all(|s| s == Some(0.0)));
    // Same seed, same optimizer: the same run (everything but wall-clock time).
    for (a, b) in one.runs.iter().zip(cmp.runs.iter().filter(|r| r.seed == 1)) {
        assert_eq!(a.optimizer, b.optimizer);
        let la: Vec<f64> = a.history.train.iter().map(|t| t.loss).collect();
        let lb: Vec<f64> = b.history.train.iter().map(|t| t.loss).collect();
        assert_eq!(
            la, lb,
            "{}: losses differ between identical runs",
            a.optimizer
        );
        let ea: Vec<_> = a
            .history
            .evals
            .iter()
            .map(|e| (e.step, e.loss, e.metrics.clone()))
            .collect();
        let eb: Vec<_> = b
            .history
            .evals
            .iter()
            .map(|e| (e.step, e.loss, e.metrics.clone()))
            .collect();
        assert_eq!(ea, eb);
    }
    // Fairness: per seed, both optimizers see the same first batch from the same weights.
    let first = |o: &str, s: u64| {
        cmp.runs
            .iter()
            .find(|r| r.optimizer == o && r.seed == s)
            .unwrap()
            .history
            .train[0]
            .loss
    };
    assert_eq!(first("adamw", 1), first("mfac", 1));
    assert_ne!(first("adamw", 1), first("adamw", 2));
    let md = cmp.to_markdown();
    assert!(md.contains("adamw (2 seeds)") && md.contains("±"), "{md}");
}

#[test]
fn a_failing_optimizer_is_a_clear_error_and_other_runs_are_kept() {
    let data = mnli_sample().unwrap();
    let bad = OptimizerSpec::mfac(MFacConfig {
        damp: -1.0,
        ..MFacConfig::default()
    });
    let specs = vec![OptimizerSpec::adamw(1e-3), bad];
    let err = compare_optimizers(&micro(), &data, &specs, &small_cfg(vec![3])).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("1 of 2 runs failed") && msg.contains("mfac seed 3"),
        "{msg}"
    );
    assert!(
        msg.contains("damp"),
        "the error should name the bad option: {msg}"
    );
    match err {
        Error::RunsFailed { partial, .. } => {
            assert_eq!(partial.runs.len(), 1);
            assert_eq!(partial.runs[0].optimizer, "adamw");
            assert!(!partial.runs[0].history.evals.is_empty());
            assert_eq!(partial.failures.len(), 1);
        }
        other => panic!("expected RunsFailed, got {other}"),
    }
}

#[test]
fn figures_render_as_svg_png_and_evcxr_blocks() {
    let data = mnli_sample().unwrap();
    let cmp = compare_optimizers(&micro(), &data, &specs(), &small_cfg(vec![5])).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for (name, fig) in [
        ("loss", cmp.plot_loss()),
        ("accuracy", cmp.plot_accuracy()),
        ("final", cmp.plot_final()),
        ("run-loss", cmp.runs[0].history.plot_loss()),
        ("run-acc", cmp.runs[0].history.plot_accuracy()),
    ] {
        let svg = fig.to_svg().unwrap();
        let doc = roxmltree::Document::parse(&svg)
            .unwrap_or_else(|e| panic!("{name}: SVG is not XML: {e}"));
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let text: String = doc
            .descendants()
            .filter_map(|n| n.text())
            .collect::<Vec<_>>()
            .join(" ");
        for series in fig
            .names()
            .iter()
            .filter(|n| !n.ends_with("(raw)") && *n != "raw")
        {
            assert!(
                text.contains(series.as_str()),
                "{name}: legend lacks {series}"
            );
        }
        assert!(text.contains(&fig.title), "{name}: no title");
        let png = fig.to_png().unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), fig.size);
        // Non-blank: a good share of pixels are not the white background, and there are
        // dark (text/axis) pixels, which need the embedded font and the axes drawn.
        let non_white = img.pixels().filter(|p| p.0 != [255, 255, 255]).count();
        let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
        assert!(
            non_white > 2000 && dark > 200,
            "{name}: blank PNG ({non_white}, {dark})"
        );
        fig.save(dir.path().join(format!("{name}.png"))).unwrap();
        fig.save(dir.path().join(format!("{name}.svg"))).unwrap();
        let block = fig.evcxr_block().unwrap();
        assert!(block.starts_with("EVCXR_BEGIN_CONTENT image/svg+xml\n<svg"));
        assert!(block.ends_with("</svg>\nEVCXR_END_CONTENT"));
    }
    assert!(cmp.runs[0]
        .history
        .plot_loss()
        .save(dir.path().join("x.jpg"))
        .is_err());
    cmp.save(dir.path().join("out")).unwrap();
    for f in [
        "history.parquet",
        "history.csv",
        "summary.md",
        "summary.csv",
        "loss.png",
        "loss.svg",
        "accuracy.png",
        "accuracy.svg",
        "final.png",
        "final.svg",
    ] {
        assert!(dir.path().join("out").join(f).is_file(), "missing {f}");
    }
}
