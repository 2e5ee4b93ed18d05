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
    train.quiet = true;
    CompareConfig {
        train,
        seeds,
        device: Device::Cpu,
        dtype: DType::F32,
        output_dir: None,
        target: None,
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

/// The labels of `specs()`.
const ADAM: &str = "AdamW lr 5e-3";
const MFAC: &str = "M-FAC m=4 (lr 5e-3)";

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
        "train_seconds",
        "fwd_bwd_seconds",
        "optim_seconds",
    ] {
        assert!(
            names.contains(&c.to_string()),
            "missing column {c}: {names:?}"
        );
    }
    let opt = hist.column("optimizer").unwrap().str().unwrap().clone();
    let seed = hist.column("seed").unwrap().u64().unwrap().clone();
    for o in [ADAM, MFAC] {
        for s in [1u64, 2] {
            let n = opt
                .iter()
                .zip(seed.iter())
                .filter(|(a, b)| *a == Some(o) && *b == Some(s))
                .count();
            assert!(n > 4, "({o}, {s}) has {n} history rows");
        }
    }
    // The clocks: training seconds (evaluation excluded) grow with the steps and stay below the
    // wall clock, which counts the evaluations too; an evaluation sees the training seconds
    // of the steps before it.
    for r in &cmp.runs {
        let t = &r.history.train;
        assert!(t
            .windows(2)
            .all(|w| w[0].train_seconds <= w[1].train_seconds));
        assert!(t
            .iter()
            .all(|x| x.train_seconds > 0.0 && x.train_seconds <= x.elapsed));
        for e in &r.history.evals {
            assert!(e.train_seconds <= e.elapsed);
            let before = t.iter().rev().find(|x| x.step <= e.step).unwrap();
            assert!(
                (e.train_seconds - before.train_seconds).abs()
                    < 0.5 * before.train_seconds.max(1.0) + 1.0
            );
            assert!(e.train_seconds >= before.train_seconds);
        }
    }
    // What each run cost: every step timed in two parts that fit inside the training clock;
    // the state's bytes are those of the optimizer's buffers.
    let d = micro()
        .load(3, 1, &Device::Cpu, DType::F32)
        .unwrap()
        .num_parameters() as u64;
    for r in &cmp.runs {
        let (t, c) = (&r.history.train, &r.history.cost);
        assert!(t
            .iter()
            .all(|x| x.fwd_bwd_seconds > 0.0 && x.optim_seconds > 0.0));
        assert_eq!(c.steps, t.len());
        assert!(c.fwd_bwd_seconds + c.optim_seconds <= c.train_seconds);
        assert!(c.eval_seconds > 0.0);
        let last = t.last().unwrap();
        // Wall clock = training seconds + evaluation seconds (+ the final evaluation's).
        assert!(last.elapsed - last.train_seconds <= c.eval_seconds + 1e-9);
        assert!(c.peak_rss_bytes.unwrap() > 1 << 20);
        assert_eq!(c.device_peak_bytes, None);
        let m = 4u64;
        let want = if r.optimizer == ADAM {
            2 * 4 * d // two f32 moments
        } else {
            // f32 window, K and B packed (f64) with B's diagonal, c, and u = F⁻¹g in f64.
            4 * m * d + 8 * (m * (m + 1) + m) + 8 * m + 8 * d
        };
        assert_eq!(c.state_bytes, want, "{}", r.optimizer);
    }
    let costs = cmp.costs();
    assert_eq!(costs.len(), 2);
    let (a, f) = (&costs[0], &costs[1]);
    assert_eq!((a.optimizer.as_str(), a.runs), (ADAM, 2));
    assert!(f.state_bytes > a.state_bytes);
    assert!(a.seconds_per_step.unwrap() > 0.0 && f.optimizer_share.unwrap() > 0.0);
    let mean_sps = |o: &str| {
        let v: Vec<f64> = cmp
            .runs
            .iter()
            .filter(|r| r.optimizer == o)
            .map(|r| r.history.cost.train_seconds / r.history.cost.steps as f64)
            .collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!((f.seconds_per_step.unwrap() - mean_sps(MFAC)).abs() < 1e-12);
    // Two seeds: a spread; the same metric with one seed has no std (null, not 0).
    let summary = cmp.summary().unwrap();
    let std = summary.column("std").unwrap().f64().unwrap().clone();
    let runs = summary.column("runs").unwrap().u32().unwrap().clone();
    assert!(runs.iter().all(|r| r == Some(2)));
    let state = summary
        .column("state_bytes")
        .unwrap()
        .u64()
        .unwrap()
        .clone();
    let opts = summary.column("optimizer").unwrap().str().unwrap().clone();
    for (o, b) in opts.iter().zip(state.iter()) {
        let row = costs
            .iter()
            .find(|c| Some(c.optimizer.as_str()) == o)
            .unwrap();
        assert_eq!(b, Some(row.state_bytes));
    }
    for c in [
        "seconds_per_step",
        "optimizer_share",
        "peak_rss_bytes",
        "device_peak_bytes",
    ] {
        assert!(summary.column(c).is_ok(), "summary lacks {c}");
    }
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
        .all(|s| s.is_none()));
    let md1 = one.to_markdown();
    assert!(md1.contains("(1 seed)") && !md1.contains("±"), "{md1}");
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
    assert_eq!(first(ADAM, 1), first(MFAC, 1));
    assert_ne!(first(ADAM, 1), first(ADAM, 2));
    let md = cmp.to_markdown();
    assert!(
        md.contains("| AdamW lr 5e-3 (2 seeds) |") && md.contains("±"),
        "{md}"
    );
    assert!(
        md.contains("| optimizer | s/step | optimizer share of a step |"),
        "{md}"
    );
    assert!(md.contains(&format!("| {MFAC} | ")), "{md}");
}

#[test]
fn a_failing_run_is_reported_and_the_other_runs_are_kept() {
    let data = mnli_sample().unwrap();
    // A learning rate that blows the weights up: the run stops with a non-finite loss.
    let bad = OptimizerSpec::adamw(1e30);
    let specs = vec![OptimizerSpec::adamw(1e-3), bad];
    let cmp = compare_optimizers(&micro(), &data, &specs, &small_cfg(vec![3])).unwrap();
    assert_eq!(cmp.runs.len(), 1);
    assert_eq!(cmp.runs[0].optimizer, "AdamW lr 1e-3");
    assert!(!cmp.runs[0].history.evals.is_empty());
    assert_eq!(cmp.failures.len(), 1);
    // Never silently: the table says so, and check() is the error.
    let md = cmp.to_markdown();
    assert!(
        md.contains("1 run failed") && md.contains("AdamW lr 1e30 seed 3"),
        "{md}"
    );
    let msg = cmp.check().unwrap_err().to_string();
    assert!(
        msg.contains("1 of 2 runs failed")
            && msg.contains("AdamW lr 1e30 seed 3")
            && msg.contains("loss"),
        "{msg}"
    );
    // When every run fails, there is nothing to compare: an error.
    let e = compare_optimizers(&micro(), &data, &specs[1..], &small_cfg(vec![3])).unwrap_err();
    assert!(matches!(e, Error::RunsFailed { .. }), "{e}");
}

#[test]
fn invalid_settings_are_refused_before_any_run() {
    let data = mnli_sample().unwrap();
    let bad = OptimizerSpec::mfac(MFacConfig {
        damp: -1.0,
        ..MFacConfig::default()
    });
    let e = compare_optimizers(
        &micro(),
        &data,
        &[OptimizerSpec::adamw(1e-3), bad],
        &small_cfg(vec![3]),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("damp"), "{e}");
    let mut cfg = small_cfg(vec![3]);
    cfg.train.num_train_epochs = f64::NAN;
    let e = compare_optimizers(&micro(), &data, &[OptimizerSpec::adamw(1e-3)], &cfg)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--num_train_epochs"), "{e}");
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
        ("loss_time", cmp.plot_loss_vs_time()),
        ("accuracy_time", cmp.plot_accuracy_vs_time()),
        ("time", cmp.plot_time_breakdown()),
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
        "loss_time.png",
        "accuracy_time.svg",
        "time.png",
        "time.svg",
    ] {
        assert!(dir.path().join("out").join(f).is_file(), "missing {f}");
    }
}

#[test]
fn every_spec_keeps_its_own_label_rows_and_run_folder() {
    // Adam and two M-FAC windows: before labels, both M-FAC configs were `mfac`, averaged
    // together, and the second overwrote the first's run folder.
    let data = mnli_sample().unwrap();
    let mut cfg = small_cfg(vec![7]);
    cfg.train.max_train_samples = Some(32);
    cfg.train.max_eval_samples = Some(32);
    let out = tempfile::tempdir().unwrap();
    cfg.output_dir = Some(out.path().join("runs"));
    let specs = vec![
        OptimizerSpec::adamw(1e-4),
        OptimizerSpec::mfac(MFacConfig::model_card_with(4)),
        OptimizerSpec::mfac(MFacConfig {
            num_grads: 8,
            ..MFacConfig::model_card()
        }),
    ];
    let cmp = compare_optimizers(&micro(), &data, &specs, &cfg).unwrap();
    let labels = ["AdamW", "M-FAC m=4 (lr 2.56e-2)", "M-FAC m=8"];
    let got: Vec<&str> = cmp.runs.iter().map(|r| r.optimizer.as_str()).collect();
    assert_eq!(got, labels);
    // Three summary rows for every (split, metric), one per label.
    let summary = cmp.summary().unwrap();
    let col = |name: &str| -> Vec<String> {
        summary
            .column(name)
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .map(|s| s.unwrap().to_string())
            .collect()
    };
    let (opt, split, metric) = (col("optimizer"), col("split"), col("metric"));
    assert!(!opt.is_empty());
    for i in 0..opt.len() {
        let mut same: Vec<&str> = (0..opt.len())
            .filter(|&k| split[k] == split[i] && metric[k] == metric[i])
            .map(|k| opt[k].as_str())
            .collect();
        same.sort();
        let mut want = labels.to_vec();
        want.sort();
        assert_eq!(same, want, "{} {}: {summary}", split[i], metric[i]);
    }
    // The history and the Markdown table say which run is which.
    let hist = cmp.history().unwrap();
    let names: std::collections::BTreeSet<String> = hist
        .column("optimizer")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|s| s.unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let md = cmp.to_markdown();
    for l in labels {
        assert!(md.contains(&format!("| {l} (1 seed) |")), "{md}");
    }
    assert!(cmp
        .plot_accuracy()
        .names()
        .iter()
        .any(|n| n.starts_with("M-FAC m=8 ·")));
    // Three run folders, each with its own results.
    for dir in ["adamw-seed7", "mfac-m4-lr2.56e-2-seed7", "mfac-m8-seed7"] {
        assert!(
            out.path()
                .join("runs")
                .join(dir)
                .join("eval_results.json")
                .is_file(),
            "missing run folder {dir}"
        );
    }
    assert_eq!(
        std::fs::read_dir(out.path().join("runs")).unwrap().count(),
        3
    );
}

#[test]
fn two_specs_with_one_label_are_refused_before_any_run() {
    let data = mnli_sample().unwrap();
    let out = tempfile::tempdir().unwrap();
    let mut cfg = small_cfg(vec![1]);
    cfg.output_dir = Some(out.path().join("runs"));
    let card32 = || {
        OptimizerSpec::mfac(MFacConfig {
            num_grads: 32,
            ..MFacConfig::model_card()
        })
    };
    // The same settings twice; a hand-given label used twice; a hand-given label equal to a
    // derived one; two labels with the same run folder.
    for specs in [
        vec![card32(), card32()],
        vec![
            OptimizerSpec::adamw(1e-4).label("mine"),
            card32().label("mine"),
        ],
        vec![OptimizerSpec::adamw(3e-4), card32().label("AdamW lr 3e-4")],
        vec![
            card32().label("A b"),
            OptimizerSpec::adamw(1e-4).label("a-b"),
        ],
    ] {
        let err = compare_optimizers(&micro(), &data, &specs, &cfg).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let msg = err.to_string();
        assert!(msg.contains("label"), "{msg}");
        assert!(!out.path().join("runs").exists(), "a run started: {msg}");
    }
    // Specs of one kind that differ elsewhere than m and lr get the differing field.
    let specs = vec![
        card32(),
        OptimizerSpec::mfac(MFacConfig {
            num_grads: 32,
            damp: 1e-4,
            ..MFacConfig::model_card()
        }),
        OptimizerSpec::adamw(1e-4).label("Adam (HF defaults)"),
    ];
    assert_eq!(
        OptimizerSpec::labels(&specs).unwrap(),
        [
            "M-FAC m=32 (damp 1e-6)",
            "M-FAC m=32 (damp 1e-4)",
            "Adam (HF defaults)"
        ]
    );
}

/// A run whose only evaluation ends with `acc` on both MNLI splits.
fn finished(optimizer: &str, seed: u64, acc: f64) -> mfac_lab::compare::Run {
    use mfac_lab::train::{EvalRecord, RunHistory};
    let evals = ["validation_matched", "validation_mismatched"]
        .iter()
        .map(|split| EvalRecord {
            step: 10,
            epoch: 1.0,
            split: split.to_string(),
            loss: 1.0,
            metrics: vec![("accuracy".into(), acc)],
            elapsed: 1.0,
            train_seconds: 1.0,
        })
        .collect();
    mfac_lab::compare::Run {
        optimizer: optimizer.into(),
        seed,
        history: RunHistory::build("adamw", vec![], evals).unwrap(),
    }
}

#[test]
fn the_summary_gives_mean_std_and_the_best_run_on_known_numbers() {
    use mfac_lab::compare::Comparison;
    let cmp = Comparison {
        runs: vec![
            finished("M-FAC m=1024", 1, 0.60),
            finished("M-FAC m=1024", 2, 0.70),
            finished("M-FAC m=1024", 3, 0.65),
            finished("AdamW", 1, 0.6536),
        ],
        failures: vec![],
        metric: "accuracy".into(),
        source: "prajjwal1/bert-tiny".into(),
        task: None,
        target: None,
    };
    let summary = cmp.summary().unwrap();
    let f = |c: &str| -> Vec<Option<f64>> {
        summary.column(c).unwrap().f64().unwrap().iter().collect()
    };
    // Rows: M-FAC on both splits, then AdamW on both.
    let (mean, std, best) = (f("mean"), f("std"), f("best"));
    assert!((mean[0].unwrap() - 0.65).abs() < 1e-12);
    assert!(
        (std[0].unwrap() - 0.05).abs() < 1e-12,
        "sample std of .60 .70 .65"
    );
    assert_eq!(best[0], Some(0.70));
    assert_eq!(
        (mean[2], std[2], best[2]),
        (Some(0.6536), None, Some(0.6536))
    );
    let md = cmp.to_markdown();
    assert!(
        md.contains("| M-FAC m=1024 (3 seeds) | 65.00 ± 5.00 (best 70.00) |"),
        "{md}"
    );
    assert!(md.contains("| AdamW (1 seed) | 65.36 | 65.36 |"), "{md}");
    assert!(
        !md.contains("majority class"),
        "a real model gets no random-weights note"
    );
    let random = Comparison {
        source: mfac_lab::compare::ModelSource::random_bert_tiny().describe(),
        ..cmp
    };
    assert!(random
        .to_markdown()
        .contains(mfac_lab::compare::RANDOM_NOTE));
}

#[test]
fn the_model_card_shows_exactly_when_task_and_model_match() {
    use mfac_lab::compare::{Comparison, ModelSource};
    use mfac_lab::data::GlueTask;
    let with = |task: Option<GlueTask>, source: &str| Comparison {
        runs: vec![finished("AdamW", 1, 0.65)],
        failures: vec![],
        metric: "accuracy".into(),
        source: source.into(),
        task,
        target: None,
    };
    let md = with(Some(GlueTask::Mnli), "prajjwal1/bert-tiny").to_markdown();
    assert!(
        md.contains("Model card (prajjwal1/bert-tiny on mnli, M-FAC num_grads 1024"),
        "{md}"
    );
    assert!(
        md.contains("| AdamW (card) | 65.36 ± 0.13 | 66.78 ± 0.15 |"),
        "{md}"
    );
    assert!(
        md.contains("| M-FAC (card) | 68.28 ± 3.29 | 68.98 ± 3.05 |"),
        "{md}"
    );
    let mini = with(Some(GlueTask::Mrpc), "prajjwal1/bert-mini").to_markdown();
    // A number the card gives without a ± shows without one.
    assert!(mini.contains("| AdamW (card) | 84.57 | 76.57 |"), "{mini}");
    for (task, source) in [
        (
            Some(GlueTask::Mnli),
            ModelSource::random_bert_tiny().describe(),
        ),
        (Some(GlueTask::Sst2), "prajjwal1/bert-tiny".to_string()),
        (Some(GlueTask::Cola), "prajjwal1/bert-mini".to_string()),
        (Some(GlueTask::Mnli), "my-minilm".to_string()),
        (None, "prajjwal1/bert-tiny".to_string()),
    ] {
        let md = with(task, &source).to_markdown();
        assert!(!md.contains("Model card"), "{task:?} {source}: {md}");
    }
}

/// A run with one evaluation per (step, accuracy) on validation_matched, 10 s apart.
fn curve(optimizer: &str, seed: u64, accs: &[(usize, f64)]) -> mfac_lab::compare::Run {
    use mfac_lab::train::{EvalRecord, RunHistory};
    let evals = accs
        .iter()
        .enumerate()
        .map(|(i, &(step, acc))| EvalRecord {
            step,
            epoch: 0.0,
            split: "validation_matched".into(),
            loss: 1.0,
            metrics: vec![("accuracy".into(), acc)],
            // Wall clock with evaluations; training seconds without (10 s a stretch).
            elapsed: 15.0 * (i + 1) as f64,
            train_seconds: 10.0 * (i + 1) as f64,
        })
        .collect();
    mfac_lab::compare::Run {
        optimizer: optimizer.into(),
        seed,
        history: RunHistory::build("x", vec![], evals).unwrap(),
    }
}

#[test]
fn time_to_target_on_hand_made_histories() {
    use mfac_lab::compare::Comparison;
    let cmp = Comparison {
        runs: vec![
            // AdamW ends at 0.60 and 0.64: the default target is their mean, 0.62.
            curve("AdamW", 1, &[(100, 0.50), (200, 0.60)]),
            curve("AdamW", 2, &[(100, 0.55), (200, 0.64)]),
            // M-FAC: one run past it at the first evaluation, one at the second.
            curve("M-FAC", 1, &[(100, 0.63), (200, 0.70)]),
            curve("M-FAC", 2, &[(100, 0.58), (200, 0.66)]),
            // SGD never gets there.
            curve("SGD", 1, &[(100, 0.40), (200, 0.45)]),
        ],
        failures: vec![],
        metric: "accuracy".into(),
        source: "x".into(),
        task: None,
        target: None,
    };
    let t = cmp.time_to_target(None).unwrap();
    assert_eq!(t.split, "validation_matched");
    assert!((t.target - 0.62).abs() < 1e-12);
    let row = |i: usize| {
        (
            t.rows[i].reached,
            t.rows[i].runs,
            t.rows[i].steps,
            t.rows[i].seconds,
        )
    };
    // AdamW: only seed 2 reached 0.62 (at step 200, its second evaluation, 20 s).
    assert_eq!(row(0), (1, 2, Some(200.0), Some(20.0)));
    // M-FAC: steps 100 (first evaluation) and 200: mean 150 steps, 15 s.
    assert_eq!(row(1), (2, 2, Some(150.0), Some(15.0)));
    assert_eq!(row(2), (0, 1, None, None));
    let md = t.to_markdown();
    assert!(md.contains("≥ 62.00 %"), "{md}");
    assert!(
        md.contains("| SGD | 0 of 1 | not reached | not reached |"),
        "{md}"
    );
    assert!(md.contains("| M-FAC | 2 of 2 | 150 | 15.0 |"), "{md}");
    // An explicit target, reached by everyone at the first evaluation.
    let low = cmp.time_to_target(Some(0.3)).unwrap();
    assert!(low
        .rows
        .iter()
        .all(|r| r.reached == r.runs && r.steps == Some(100.0)));
    // The time axis: the same curves against the training seconds.
    let fig = cmp.plot_accuracy_vs_time();
    assert_eq!(fig.x_label, "training seconds (evaluation excluded)");
    assert_eq!(cmp.plot_accuracy().x_label, "step");
    assert_eq!(fig.names(), cmp.plot_accuracy().names());
    let svg = fig.to_svg().unwrap();
    assert!(svg.contains("training seconds"), "the axis is labelled");
    // The printed summary carries the default target's table.
    assert!(cmp
        .to_markdown()
        .contains("Time to target (validation_matched accuracy ≥ 62.00 %)"));
}

#[test]
fn a_target_outside_the_metrics_range_is_refused_before_any_run() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mfac-lab"))
        .args(["compare", "--target", "65", "--quiet", "--output_dir"])
        .arg(dir.path().join("res"))
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("--target 65 is outside"), "{stderr}");
    assert!(!dir.path().join("res").exists(), "nothing may be written");
}

#[test]
fn training_seconds_leave_the_evaluations_out() {
    // Evaluations every 2 steps: after the first one, the wall clock runs ahead of the
    // training clock by the time spent evaluating, and the gap only grows.
    let data = mnli_sample().unwrap();
    let mut cfg = small_cfg(vec![1]);
    cfg.train.eval_steps = Some(2);
    let cmp = compare_optimizers(&micro(), &data, &specs()[..1], &cfg).unwrap();
    let t = &cmp.runs[0].history.train;
    assert_eq!(t.len(), 8);
    let gaps: Vec<f64> = t.iter().map(|x| x.elapsed - x.train_seconds).collect();
    assert!(
        gaps[..2].iter().all(|g| g.abs() < 1e-9),
        "no evaluation yet: {gaps:?}"
    );
    assert!(gaps[2..].iter().all(|g| *g > 0.0), "{gaps:?}");
    assert!(gaps.windows(2).all(|w| w[1] >= w[0] - 1e-12), "{gaps:?}");
}

/// Every run at one accuracy at every evaluation (a model predicting one class, as random
/// weights do): no target counts as "reached" at the first evaluation; the table says why, and
/// summary.csv's time-to-target columns stay empty. With movement, the columns carry the table.
#[test]
fn time_to_target_says_so_when_every_run_stays_at_one_class() {
    use mfac_lab::compare::Comparison;
    // Each run predicts one class throughout (different seeds, different classes).
    let flat = Comparison {
        runs: vec![
            curve("AdamW", 1, &[(100, 0.354), (200, 0.354)]),
            curve("AdamW", 2, &[(100, 0.469), (200, 0.469)]),
            curve("M-FAC", 1, &[(100, 0.354), (200, 0.354)]),
        ],
        failures: vec![],
        metric: "accuracy".into(),
        source: "x".into(),
        task: None,
        target: None,
    };
    let t = flat.time_to_target(None).unwrap();
    assert!(t.flat);
    assert!(t.rows.iter().all(|r| r.reached == 0 && r.steps.is_none()));
    let md = t.to_markdown();
    assert!(
        md.contains("majority class") && md.contains("stayed where it started"),
        "{md}"
    );
    assert!(!md.contains("| AdamW |"), "{md}");
    let s = flat.summary().unwrap();
    assert_eq!(
        s.column("steps_to_target").unwrap().null_count(),
        s.height()
    );
    // Movement: the same columns hold the table's numbers on the target's split and metric.
    let moving = Comparison {
        runs: vec![
            curve("AdamW", 1, &[(100, 0.50), (200, 0.60)]),
            curve("M-FAC", 1, &[(100, 0.63), (200, 0.70)]),
        ],
        ..flat.clone()
    };
    let t = moving.time_to_target(None).unwrap();
    assert!(!t.flat);
    let s = moving.summary().unwrap();
    let opt: Vec<String> = s
        .column("optimizer")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|x| x.unwrap().to_string())
        .collect();
    let f64s = |name: &str| -> Vec<Option<f64>> {
        s.column(name).unwrap().f64().unwrap().iter().collect()
    };
    let (steps, target) = (f64s("steps_to_target"), f64s("target"));
    let i = opt.iter().position(|o| o == "M-FAC").unwrap();
    assert_eq!(steps[i], Some(100.0));
    assert!((target[i].unwrap() - 0.60).abs() < 1e-12);
    let a = opt.iter().position(|o| o == "AdamW").unwrap();
    assert_eq!(steps[a], Some(200.0));
}
