//! `compare_optimizers`: the same model source, data and recipe trained with each optimizer and
//! each seed — same initial weights and data order per seed across optimizers, so the comparison
//! is fair — with the history, a mean ± std summary (the model card's layout) and plots.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use polars::prelude::*;

use crate::data::{GlueData, GlueTask};
use crate::error::{Error, Result};
use crate::hub::Hub;
use crate::io::write_bytes_atomic;
use crate::model::{BertClassifier, BertConfig, LoadOptions, PairTokenizer, BERT_TINY_REPO};
use crate::optim::{MFacConfig, OptimizerSpec};
use crate::plot::{smooth, Bar, Figure, Series};
use crate::train::{RunHistory, TrainConfig, Trainer};

mod costs;
pub use costs::CostRow;

/// Where each run's model comes from. Every run loads it afresh, seeded by the run's seed (the
/// classifier head, or all weights for `Random`).
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A hub repo id or a local HF-layout folder (`BertClassifier::from_pretrained`).
    Pretrained(String),
    /// Random weights with this config and the embedded bert-base-uncased tokenizer (offline).
    Random(Box<BertConfig>),
}

impl ModelSource {
    /// prajjwal1/bert-tiny from the hub (the model card's model).
    pub fn bert_tiny() -> Self {
        ModelSource::Pretrained(BERT_TINY_REPO.into())
    }

    /// A randomly initialised bert-tiny: needs no network (the offline demo).
    ///
    /// ```
    /// use mfac_lab::compare::ModelSource;
    /// let m = ModelSource::random_bert_tiny().load(3, 42, &candle_core::Device::Cpu, candle_core::DType::F32)?;
    /// assert_eq!(m.num_labels(), 3);
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn random_bert_tiny() -> Self {
        ModelSource::Random(Box::new(BertConfig::bert_tiny()))
    }

    /// Loads the model for one run.
    pub fn load(
        &self,
        num_labels: usize,
        seed: u64,
        device: &Device,
        dtype: DType,
    ) -> Result<BertClassifier> {
        match self {
            ModelSource::Pretrained(repo) => {
                let opts = LoadOptions::default()
                    .num_labels(num_labels)
                    .device(device.clone())
                    .dtype(dtype)
                    .seed(seed);
                BertClassifier::from_pretrained(repo, &opts)
            }
            ModelSource::Random(cfg) => Ok(BertClassifier::random(
                cfg, num_labels, seed, device, dtype,
            )?
            .with_tokenizer(PairTokenizer::bert_base_uncased()?)),
        }
    }

    /// A short description for logs, summaries and plot titles: the hub id, or a local
    /// folder's name (not its whole path).
    ///
    /// ```
    /// use mfac_lab::compare::ModelSource;
    /// assert_eq!(ModelSource::bert_tiny().describe(), "prajjwal1/bert-tiny");
    /// let dir = tempfile::tempdir().unwrap();
    /// let folder = dir.path().join("my-minilm");
    /// std::fs::create_dir(&folder).unwrap();
    /// let src = ModelSource::Pretrained(folder.display().to_string());
    /// assert_eq!(src.describe(), "my-minilm");
    /// ```
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Pretrained(r) => {
                let path = Path::new(r);
                match path.file_name() {
                    Some(name) if path.is_dir() => name.to_string_lossy().into_owned(),
                    _ => r.clone(),
                }
            }
            ModelSource::Random(_) => RANDOM_SOURCE.into(),
        }
    }

    /// The offline demo's model: the pretrained prajjwal1/bert-tiny (17.8 MB, cached after the
    /// first time) when `hub` delivers it within `wait`, else the seeded random bert-tiny; with a
    /// line saying which and why. An offline hub (`HF_HUB_OFFLINE=1`) makes no request: the
    /// pretrained model only if it is already cached. A download still running after `wait`
    /// carries on in the background (a later run finds it cached).
    ///
    /// ```
    /// use mfac_lab::compare::ModelSource;
    /// use mfac_lab::hub::Hub;
    /// let cache = tempfile::tempdir().unwrap();
    /// let hub = Hub::new("http://127.0.0.1:9", cache.path()).offline(true);
    /// let (source, note) = ModelSource::demo_bert_tiny(&hub, std::time::Duration::from_secs(5));
    /// assert!(matches!(source, ModelSource::Random(_)));
    /// assert!(note.contains("randomly initialised"), "{note}");
    /// ```
    pub fn demo_bert_tiny(hub: &Hub, wait: std::time::Duration) -> (ModelSource, String) {
        let opts = LoadOptions::default().num_labels(3).hub(hub.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let r = BertClassifier::from_pretrained(BERT_TINY_REPO, &opts).map(|_| ());
            let _ = tx.send(r);
        });
        let random = ModelSource::random_bert_tiny();
        match rx.recv_timeout(wait) {
            Ok(Ok(())) => (
                ModelSource::bert_tiny(),
                format!("Model: the pretrained {BERT_TINY_REPO} (from the hub, cached)."),
            ),
            Ok(Err(e)) => (
                random,
                format!(
                    "Model: a randomly initialised bert-tiny (seeded): the pretrained {BERT_TINY_REPO} could not be loaded ({e})."
                ),
            ),
            Err(_) => (
                random,
                format!(
                    "Model: a randomly initialised bert-tiny (seeded): the hub did not deliver {BERT_TINY_REPO} within {} s (HF_HUB_OFFLINE=1 skips the try).",
                    wait.as_secs_f64()
                ),
            ),
        }
    }
}

/// Checks a time-to-target value against the range of `task`'s headline metric (accuracy and
/// F1 in [0, 1], correlations in [−1, 1]) before anything runs.
///
/// ```
/// use mfac_lab::compare::check_target;
/// use mfac_lab::data::GlueTask;
/// assert!(check_target(GlueTask::Mnli, 0.65).is_ok());
/// let e = check_target(GlueTask::Mnli, 65.0).unwrap_err().to_string();
/// assert!(e.contains("--target") && e.contains("0.65"), "{e}");
/// assert!(check_target(GlueTask::Stsb, -0.5).is_ok());
/// ```
pub fn check_target(task: GlueTask, target: f64) -> Result<()> {
    let metric = task.metrics()[0];
    let (lo, hi) = match metric {
        crate::data::Metric::Accuracy | crate::data::Metric::F1 => (0.0, 1.0),
        _ => (-1.0, 1.0),
    };
    if (lo..=hi).contains(&target) {
        return Ok(());
    }
    Err(Error::InvalidArgument(format!(
        "--target {target} is outside the range of {}'s {} ([{lo}, {hi}]): give it as a fraction, e.g. --target 0.65 for 65 %",
        task.name(),
        metric.name()
    )))
}

/// How [`ModelSource::describe`] names a randomly initialised model.
const RANDOM_SOURCE: &str = "randomly initialised BERT (seeded)";

/// What a comparison of randomly initialised models shows (printed under its table).
pub const RANDOM_NOTE: &str = "With random weights every optimizer stays at the majority class (the training loss stays near ln 3): these numbers show the pipeline, not which optimizer is better. For real numbers run `mfac-lab compare --task mnli`.";

/// The offline demo's M-FAC window (`mfac-lab compare` with no flags, notebook 02): bert-tiny's
/// window of 1024 gradients takes 18 GB in f32; 32 take 0.56 GB.
pub const DEMO_NUM_GRADS: usize = 32;

/// The default comparison with an M-FAC window of `num_grads`: AdamW at the card's lr 1e-4
/// against M-FAC at [`MFacConfig::model_card_with`]`(num_grads)` — the card's settings with the
/// lr scaled to the window (1e-4 × 1024 / num_grads: M-FAC's step length grows with num_grads,
/// docs/MFAC_LR.md). `mfac-lab compare` uses it with 1024 (`--task`) or
/// [`DEMO_NUM_GRADS`] (the demo).
///
/// ```
/// use mfac_lab::compare::default_specs;
/// use mfac_lab::optim::OptimizerSpec;
/// let labels = OptimizerSpec::labels(&default_specs(32)).unwrap();
/// assert_eq!(labels, ["AdamW", "M-FAC m=32 (lr 3.2e-3)"]);
/// assert_eq!(OptimizerSpec::labels(&default_specs(1024)).unwrap(), ["AdamW", "M-FAC m=1024"]);
/// ```
pub fn default_specs(num_grads: usize) -> Vec<OptimizerSpec> {
    vec![
        OptimizerSpec::adamw(crate::optim::CARD_LR),
        OptimizerSpec::mfac(MFacConfig::model_card_with(num_grads)),
    ]
}

/// The sparse window's density in the offline demo: the card's M-FAC (m = 1024, lr 1e-4,
/// damp 1e-6) with each row the top 1 % of an error-feedback accumulator.
pub const DEMO_DENSITY: f64 = 0.01;

/// The defaults of a comparison, in one place: what `mfac-lab compare` runs when its flags do
/// not say otherwise — the recipe's for real data; for the offline demo a smaller dense window
/// beside the card's window made sparse, two seeds and two epochs.
///
/// ```
/// use mfac_lab::compare::CompareDefaults;
/// let d = CompareDefaults::demo();
/// assert_eq!((d.num_grads, d.seeds.as_slice(), d.num_train_epochs), (32, &[42u64, 43][..], 2.0));
/// assert_eq!(d.sparse_density, Some(0.01));
/// assert_eq!(CompareDefaults::recipe().num_grads, 1024);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct CompareDefaults {
    /// M-FAC's window in the default specs ([`default_specs`]).
    pub num_grads: usize,
    /// Seeds.
    pub seeds: Vec<u64>,
    /// Epochs per run.
    pub num_train_epochs: f64,
    /// Also compare the card's M-FAC with the sparse window at this density.
    pub sparse_density: Option<f64>,
}

impl CompareDefaults {
    /// The offline demo: dense M-FAC m = [`DEMO_NUM_GRADS`] and the card's M-FAC with the sparse
    /// window at [`DEMO_DENSITY`], seeds 42 and 43, 2 epochs.
    pub fn demo() -> Self {
        CompareDefaults {
            num_grads: DEMO_NUM_GRADS,
            seeds: vec![42, 43],
            num_train_epochs: 2.0,
            sparse_density: Some(DEMO_DENSITY),
        }
    }

    /// The model card's recipe: M-FAC m = 1024, seed 42, 5 epochs.
    pub fn recipe() -> Self {
        CompareDefaults {
            num_grads: 1024,
            seeds: vec![42],
            num_train_epochs: TrainConfig::run_glue().num_train_epochs,
            sparse_density: None,
        }
    }

    /// The optimizers compared: [`default_specs`]`(num_grads)`, then the card's M-FAC with the
    /// sparse window when `sparse_density` is set.
    pub fn specs(&self) -> Vec<OptimizerSpec> {
        let mut specs = default_specs(self.num_grads);
        if let Some(rho) = self.sparse_density {
            specs.push(OptimizerSpec::mfac(
                MFacConfig::model_card().with_density(rho),
            ));
        }
        specs
    }
}

/// The offline demo's specs ([`CompareDefaults::demo`]): AdamW, `M-FAC m=32 (lr 3.2e-3)` and
/// the card's window made sparse, `M-FAC m=1024 1%`.
///
/// ```
/// use mfac_lab::optim::OptimizerSpec;
/// let labels = OptimizerSpec::labels(&mfac_lab::compare::demo_specs()).unwrap();
/// assert_eq!(labels, ["AdamW", "M-FAC m=32 (lr 3.2e-3)", "M-FAC m=1024 1%"]);
/// ```
pub fn demo_specs() -> Vec<OptimizerSpec> {
    CompareDefaults::demo().specs()
}

/// A file-name-safe form of a run label, for run folders: lower case, `M-FAC` → `mfac`, a value
/// joined to its key, other words joined by `-`, only `[a-z0-9._-]`.
///
/// ```
/// use mfac_lab::compare::label_slug;
/// assert_eq!(label_slug("M-FAC m=32 (lr 3.2e-3)"), "mfac-m32-lr3.2e-3");
/// assert_eq!(label_slug("AdamW"), "adamw");
/// assert_eq!(label_slug("AdamW lr 3e-4, weight_decay 0.01"), "adamw-lr3e-4-weight_decay0.01");
/// assert_eq!(label_slug("../my run/β"), "my-run");
/// // The sparse window's density: a percentage.
/// assert_eq!(label_slug("M-FAC m=1024 1%"), "mfac-m1024-1pct");
/// assert_eq!(label_slug("M-FAC m=64 0.5% block 4096"), "mfac-m64-0.5pct-block4096");
/// ```
pub fn label_slug(label: &str) -> String {
    let lower = label
        .to_lowercase()
        .replace("m-fac", "mfac")
        .replace('%', "pct");
    let mut parts: Vec<String> = vec![];
    let seps = |c: char| c.is_whitespace() || ",()[]{}/\\:;|\"'".contains(c);
    for tok in lower.split(seps) {
        let mut t = String::new();
        for c in tok.chars().filter(|&c| c != '=') {
            let c = if c.is_ascii_alphanumeric() || matches!(c, '.' | '_') {
                c
            } else {
                '-'
            };
            if !(c == '-' && t.ends_with('-')) {
                t.push(c);
            }
        }
        let t = t.trim_matches(|c| c == '-' || c == '.');
        if t.is_empty() {
            continue;
        }
        match parts.last_mut() {
            // A value joins its key: `lr 3.2e-3` → `lr3.2e-3` (not a part that already holds
            // its value: `m1024 1pct` stays two parts).
            Some(last)
                if t.starts_with(|c: char| c.is_ascii_digit())
                    && !last.ends_with(|c: char| c.is_ascii_digit()) =>
            {
                last.push_str(t)
            }
            _ => parts.push(t.to_string()),
        }
    }
    if parts.is_empty() {
        "run".into()
    } else {
        parts.join("-")
    }
}

/// How to compare: the recipe each run uses (its `seed` is replaced by each of `seeds`), the
/// seeds, the device, and an optional output folder for each run's files.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// The training recipe shared by all runs.
    pub train: TrainConfig,
    /// One run per seed and optimizer.
    pub seeds: Vec<u64>,
    /// Where the models train; default [`best_device`](crate::model::best_device): CUDA when
    /// built with the `cuda` feature and a GPU is present (as HF Trainer picks the GPU), else
    /// the CPU.
    pub device: Device,
    /// The models' parameter dtype: F32 (default) or F64.
    pub dtype: DType,
    /// If set, each run writes its HF-style outputs to `<dir>/<slug>-seed<seed>/`, the slug
    /// being the run's label made file-name safe ([`label_slug`], e.g.
    /// `mfac-m32-lr3.2e-3-seed42`).
    pub output_dir: Option<PathBuf>,
    /// The value of the task's headline metric to time each optimizer to (0.65 = 65 %
    /// accuracy); `None`: the first optimizer's final mean. Checked by [`check_target`].
    pub target: Option<f64>,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            train: TrainConfig::run_glue(),
            seeds: vec![42],
            device: crate::model::best_device(),
            dtype: DType::F32,
            output_dir: None,
            target: None,
        }
    }
}

/// One finished run.
#[derive(Debug, Clone)]
pub struct Run {
    /// The optimizer's label ([`OptimizerSpec::labels`], e.g. `AdamW`, `M-FAC m=32 (lr 3.2e-3)`).
    pub optimizer: String,
    /// The run's seed.
    pub seed: u64,
    /// What it recorded.
    pub history: RunHistory,
}

/// One failed run and why.
#[derive(Debug, Clone)]
pub struct RunFailure {
    /// The optimizer's label.
    pub optimizer: String,
    /// The run's seed.
    pub seed: u64,
    /// The error, as text.
    pub message: String,
}

/// [`Comparison::time_to_target`]: the target and one row per optimizer.
#[derive(Debug, Clone, PartialEq)]
pub struct TimeToTarget {
    /// The eval split measured (the task's first).
    pub split: String,
    /// The metric measured (the task's headline metric).
    pub metric: String,
    /// The value to reach (or pass).
    pub target: f64,
    /// One row per optimizer, in the comparison's order.
    pub rows: Vec<TargetRow>,
    /// True when every run's metric on the split stayed at its first value at every one of its
    /// (two or more) evaluations: each model predicted one class throughout (the majority
    /// class, as a random or not-yet-trained model does). Then no run counts as having reached
    /// anything: the rows hold no steps, and the table says so instead of a target "reached" at
    /// the first evaluation.
    pub flat: bool,
}

/// One optimizer's time to the target.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetRow {
    /// The optimizer's label.
    pub optimizer: String,
    /// Its finished runs.
    pub runs: usize,
    /// How many of them reached the target.
    pub reached: usize,
    /// Mean step of the first evaluation at or above the target, over the runs that reached it.
    pub steps: Option<f64>,
    /// Mean training seconds then (evaluation excluded, AlgoPerf's rule), likewise.
    pub seconds: Option<f64>,
}

impl TimeToTarget {
    /// A Markdown table: steps and seconds to the target, "not reached" where no run got there.
    pub fn to_markdown(&self) -> String {
        if self.flat {
            return format!(
                "Time to target: none. Every run's {} {} stayed where it started at every evaluation — each model predicted one class for every example (the majority class: nothing learned yet) — so no optimizer reached a target.\n",
                self.split, self.metric
            );
        }
        let mut s = format!(
            "Time to target ({} {} ≥ {:.2} %):\n\n| optimizer | runs that reached it | steps | seconds |\n|---|---|---|---|\n",
            self.split,
            self.metric,
            100.0 * self.target
        );
        for r in &self.rows {
            let (steps, secs) = match (r.steps, r.seconds) {
                (Some(st), Some(se)) => (format!("{st:.0}"), format!("{se:.1}")),
                _ => ("not reached".into(), "not reached".into()),
            };
            s += &format!(
                "| {} | {} of {} | {steps} | {secs} |\n",
                r.optimizer, r.reached, r.runs
            );
        }
        s
    }
}

/// What the x axis of a curve counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Axis {
    Step,
    TrainSeconds,
}

impl Axis {
    fn of(self, step: usize, train_seconds: f64) -> f64 {
        match self {
            Axis::Step => step as f64,
            Axis::TrainSeconds => train_seconds,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Axis::Step => "step",
            Axis::TrainSeconds => "training seconds (evaluation excluded)",
        }
    }
}

/// What [`compare_optimizers`] produced.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// Finished runs, in (seed, optimizer) order.
    pub runs: Vec<Run>,
    /// Runs that failed (their error); the others are complete.
    pub failures: Vec<RunFailure>,
    /// The task's headline metric (e.g. `accuracy`).
    pub metric: String,
    /// Where the models came from.
    pub source: String,
    /// The task, when known: with [`Comparison::source`] it picks the model card shown beside
    /// the results ([`crate::cards::card_for`]).
    pub task: Option<GlueTask>,
    /// The time-to-target value ([`CompareConfig::target`]); `None`: the default.
    pub target: Option<f64>,
}

fn df_err(e: PolarsError) -> Error {
    Error::Data {
        source_name: "comparison".into(),
        message: e.to_string(),
    }
}

/// Trains every (seed, optimizer) pair and collects the results. Each optimizer is known by its
/// label ([`OptimizerSpec::labels`]: `AdamW`, `M-FAC m=32 (lr 3.2e-3)`, or one given with
/// [`OptimizerSpec::label`]) in the summary, history, tables, plots and run folders; two
/// optimizers with the same label (or the same run folder) are an [`Error::InvalidArgument`]
/// before anything runs, and so is an invalid config or optimizer setting. A run that fails
/// does not stop the others: the comparison of the runs that finished is returned with the
/// failures in [`Comparison::failures`] (logged as warnings, listed under the Markdown table;
/// [`Comparison::check`] turns them into an error). When every run failed, the error is
/// [`Error::RunsFailed`], naming each.
///
/// ```no_run
/// use mfac_lab::prelude::*;
/// let data = mnli_sample()?;
/// let specs = [OptimizerSpec::adamw(1e-4), OptimizerSpec::mfac(MFacConfig::model_card_with(32))];
/// let cmp = compare_optimizers(&ModelSource::random_bert_tiny(), &data, &specs, &CompareConfig::default())?;
/// println!("{}", cmp.to_markdown());
/// cmp.plot_accuracy().save("accuracy.png")?;
/// # Ok::<(), mfac_lab::Error>(())
/// ```
pub fn compare_optimizers(
    source: &ModelSource,
    data: &GlueData,
    specs: &[OptimizerSpec],
    cfg: &CompareConfig,
) -> Result<Comparison> {
    if specs.is_empty() || cfg.seeds.is_empty() {
        return Err(Error::InvalidArgument(
            "compare_optimizers needs at least one optimizer and one seed".into(),
        ));
    }
    cfg.train.validate()?;
    for spec in specs {
        spec.validate()?;
    }
    if let Some(t) = cfg.target {
        check_target(data.task, t)?;
    }
    let labels = OptimizerSpec::labels(specs)?;
    let slugs: Vec<String> = labels.iter().map(|l| label_slug(l)).collect();
    for i in 0..slugs.len() {
        if let Some(j) = (0..i).find(|&j| slugs[j] == slugs[i]) {
            return Err(Error::InvalidArgument(format!(
                "optimizers {:?} and {:?} would share the run folder name {:?}: give one a \
                 different label with OptimizerSpec::label(..)",
                labels[j], labels[i], slugs[i]
            )));
        }
    }
    let mut cmp = Comparison {
        runs: vec![],
        failures: vec![],
        metric: data.task.metrics()[0].name().to_string(),
        source: source.describe(),
        task: Some(data.task),
        target: cfg.target,
    };
    let total = cfg.seeds.len() * specs.len();
    let mut k = 0;
    let start = std::time::Instant::now();
    for &seed in &cfg.seeds {
        for ((spec, name), slug) in specs.iter().zip(&labels).zip(&slugs) {
            k += 1;
            let name = name.clone();
            log::info!("run {k}/{total}: {name}, seed {seed}");
            if !cfg.train.quiet {
                // Each run's own progress follows; this line says where the comparison is.
                eprintln!("{}", run_line(k, total, &name, seed, start.elapsed()));
            }
            let result = (|| -> Result<RunHistory> {
                let model = source.load(data.task.num_labels(), seed, &cfg.device, cfg.dtype)?;
                let mut tc = cfg.train.clone();
                tc.seed = seed;
                // The run folders are the comparison's own: rerunning it replaces its files
                // (and only those), and one checkpoint per run is enough to resume it.
                tc.overwrite_output_dir = true;
                tc.save_total_limit = tc.save_total_limit.or(Some(1));
                let mut trainer = Trainer::new(model, tc).optimizer(spec.clone());
                if let Some(dir) = &cfg.output_dir {
                    trainer = trainer.output_dir(dir.join(format!("{slug}-seed{seed}")));
                }
                trainer.fit(data)
            })();
            match result {
                Ok(history) => cmp.runs.push(Run {
                    optimizer: name,
                    seed,
                    history,
                }),
                Err(e) => {
                    log::warn!("run {k}/{total} ({name}, seed {seed}) failed: {e}");
                    cmp.failures.push(RunFailure {
                        optimizer: name,
                        seed,
                        message: e.to_string(),
                    });
                }
            }
        }
    }
    if cmp.runs.is_empty() {
        return cmp.check().map(|()| cmp);
    }
    Ok(cmp)
}

/// The line before run `k` of `total` of a comparison: which run, and after the first one, the
/// comparison's elapsed time and ETA (the runs so far, averaged).
fn run_line(k: usize, total: usize, name: &str, seed: u64, elapsed: std::time::Duration) -> String {
    let mut line = format!("compare: run {k}/{total}: {name}, seed {seed}");
    if k > 1 {
        let el = elapsed.as_secs_f64();
        let eta = el / (k - 1) as f64 * (total + 1 - k) as f64;
        line += &format!(
            " · elapsed {} · ETA {} for the comparison",
            crate::train::progress::hms(el),
            crate::train::progress::hms(eta)
        );
    }
    line
}

/// Mean and sample standard deviation over seeds, as model cards report "mean ± std"; no std
/// for a single run (a spread of one value is not 0, it is unknown).
fn mean_std(v: &[f64]) -> (f64, Option<f64>) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, None);
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, Some(var.sqrt()))
}

/// The best of the runs (every GLUE metric is better when higher), as the cards' "best run".
fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// A summary cell in percent: `68.47` for one run, `68.28 ± 3.29 (best 69.55)` for several.
fn cell(v: &[f64]) -> String {
    match mean_std(v) {
        (m, None) => format!("{:.2}", 100.0 * m),
        (m, Some(sd)) => format!(
            "{:.2} ± {:.2} (best {:.2})",
            100.0 * m,
            100.0 * sd,
            100.0 * best(v)
        ),
    }
}

impl Comparison {
    /// `Ok` when every run finished, else [`Error::RunsFailed`] naming each failed run (the
    /// finished ones stay in `self`).
    ///
    /// ```
    /// let cmp = mfac_lab::compare::Comparison {
    ///     runs: vec![], failures: vec![], metric: "accuracy".into(), source: "demo".into(),
    ///     task: None, target: None,
    /// };
    /// assert!(cmp.check().is_ok());
    /// ```
    pub fn check(&self) -> Result<()> {
        if self.failures.is_empty() {
            return Ok(());
        }
        Err(Error::RunsFailed {
            failed: self
                .failures
                .iter()
                .map(|f| format!("{} seed {}: {}", f.optimizer, f.seed, f.message))
                .collect(),
            total: self.runs.len() + self.failures.len(),
        })
    }

    /// How fast each optimizer reached `target` on the headline metric of the first eval split
    /// (AlgoPerf's question): per optimizer, how many of its runs reached it and, over those,
    /// the mean step and the mean seconds of the first evaluation at or above it. The target
    /// defaults to the first optimizer's final mean ([`Comparison::default_target`]).
    ///
    /// ```
    /// use mfac_lab::compare::Comparison;
    /// use mfac_lab::train::{EvalRecord, RunHistory};
    /// let run = |name: &str, accs: &[f64]| mfac_lab::compare::Run {
    ///     optimizer: name.into(), seed: 1,
    ///     history: RunHistory::build("x", vec![], accs.iter().enumerate().map(|(i, a)| EvalRecord {
    ///         step: 10 * (i + 1), epoch: 0.0, split: "validation".into(), loss: 0.0,
    ///         metrics: vec![("accuracy".into(), *a)], elapsed: 0.0, train_seconds: (i + 1) as f64 })
    ///         .collect()).unwrap(),
    /// };
    /// let cmp = Comparison { runs: vec![run("AdamW", &[0.5, 0.6]), run("M-FAC", &[0.62, 0.7])],
    ///     failures: vec![], metric: "accuracy".into(), source: "x".into(), task: None,
    ///     target: None };
    /// let t = cmp.time_to_target(None).unwrap();
    /// assert_eq!(t.target, 0.6);
    /// assert_eq!((t.rows[0].reached, t.rows[0].steps), (1, Some(20.0)));
    /// assert_eq!((t.rows[1].reached, t.rows[1].steps), (1, Some(10.0)));
    /// ```
    pub fn time_to_target(&self, target: Option<f64>) -> Option<TimeToTarget> {
        let split = self.splits().into_iter().next()?;
        let target = match target {
            Some(t) => t,
            None => self.default_target()?,
        };
        // Every run at one value at each of its evaluations: nothing moved (see `flat`).
        let series: Vec<Vec<f64>> = self
            .runs
            .iter()
            .map(|r| {
                r.history
                    .evals
                    .iter()
                    .filter(|e| e.split == split)
                    .filter_map(|e| {
                        e.metrics
                            .iter()
                            .find(|(m, _)| *m == self.metric)
                            .map(|x| x.1)
                    })
                    .collect()
            })
            .collect();
        let flat = series.iter().any(|v| v.len() > 1)
            && series.iter().all(|v| v.iter().all(|x| *x == v[0]));
        let rows = self
            .optimizers()
            .into_iter()
            .map(|o| {
                let runs: Vec<&Run> = self.runs.iter().filter(|r| r.optimizer == o).collect();
                let hits: Vec<(usize, f64)> = if flat {
                    vec![]
                } else {
                    runs.iter()
                        .filter_map(|r| r.history.reached(&split, &self.metric, target))
                        .collect()
                };
                let mean = |f: &dyn Fn(&(usize, f64)) -> f64| {
                    (!hits.is_empty()).then(|| hits.iter().map(f).sum::<f64>() / hits.len() as f64)
                };
                TargetRow {
                    optimizer: o,
                    runs: runs.len(),
                    reached: hits.len(),
                    steps: mean(&|h| h.0 as f64),
                    seconds: mean(&|h| h.1),
                }
            })
            .collect();
        Some(TimeToTarget {
            split,
            metric: self.metric.clone(),
            target,
            rows,
            flat,
        })
    }

    /// The default target of [`Comparison::time_to_target`]: the first optimizer's final mean
    /// of the headline metric on the first eval split.
    pub fn default_target(&self) -> Option<f64> {
        let split = self.splits().into_iter().next()?;
        let first = self.optimizers().into_iter().next()?;
        let vals = self.finals(&first, &split, &self.metric);
        (!vals.is_empty()).then(|| mean_std(&vals).0)
    }

    /// The authors' model card for this task and model, when there is one (never for a
    /// random or local model): [`Comparison::to_markdown`] shows it under the results.
    pub fn card(&self) -> Option<crate::cards::Card> {
        crate::cards::card_for(self.task?, &self.source)
    }

    fn optimizers(&self) -> Vec<String> {
        let mut out: Vec<String> = vec![];
        for r in &self.runs {
            if !out.contains(&r.optimizer) {
                out.push(r.optimizer.clone());
            }
        }
        out
    }

    /// The final value of `metric` on `split` of every finished run of `optimizer`.
    fn finals(&self, optimizer: &str, split: &str, metric: &str) -> Vec<f64> {
        self.runs
            .iter()
            .filter(|r| r.optimizer == optimizer)
            .filter_map(|r| r.history.final_metric(split, metric))
            .collect()
    }

    fn splits(&self) -> Vec<String> {
        let mut out: Vec<String> = vec![];
        for e in self.runs.iter().flat_map(|r| &r.history.evals) {
            if !out.contains(&e.split) {
                out.push(e.split.clone());
            }
        }
        out
    }

    /// Every run's history in one long DataFrame, with `optimizer` and `seed` columns first.
    pub fn history(&self) -> Result<DataFrame> {
        let mut out: Option<DataFrame> = None;
        for r in &self.runs {
            let n = r.history.df.height();
            let mut df = r.history.df.clone();
            df.insert_column(
                0,
                Column::new("optimizer".into(), vec![r.optimizer.clone(); n]),
            )
            .map_err(df_err)?;
            df.insert_column(1, Column::new("seed".into(), vec![r.seed; n]))
                .map_err(df_err)?;
            out = Some(match out {
                None => df,
                Some(acc) => acc.vstack(&df).map_err(df_err)?,
            });
        }
        match out {
            Some(df) => Ok(df),
            None => Err(Error::InvalidArgument("no finished runs".into())),
        }
    }

    /// The final value of each metric per optimizer and eval split: mean and std over seeds
    /// (sample std; null with one seed), the best run's value, and the number of runs; then
    /// the optimizer's cost ([`Comparison::costs`]): seconds per step, the optimizer's share
    /// of a step, peak resident memory, the optimizer state's bytes and the GPU's peak; then,
    /// on the rows of the time-to-target's split and metric (null elsewhere, and with one
    /// optimizer), [`Comparison::time_to_target`] at the comparison's target: `target`,
    /// `runs_reached_target`, `steps_to_target`, `seconds_to_target` (null when no run
    /// reached it, or when every run stayed at one class: see [`TimeToTarget::flat`]).
    pub fn summary(&self) -> Result<DataFrame> {
        let (mut opt, mut split, mut metric, mut mean, mut std, mut runs) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let mut top = vec![];
        let costs = self.costs();
        let (mut sps, mut share, mut rss, mut state, mut gpu) =
            (vec![], vec![], vec![], vec![], vec![]);
        // Time to target, on the rows of its split and metric (null elsewhere).
        let ttt = if self.optimizers().len() > 1 {
            self.time_to_target(self.target)
        } else {
            None
        };
        let (mut t_target, mut t_reached, mut t_steps, mut t_secs) =
            (vec![], vec![], vec![], vec![]);
        for o in self.optimizers() {
            for s in self.splits() {
                let mut names: Vec<String> = vec![];
                for r in self.runs.iter().filter(|r| r.optimizer == o) {
                    if let Some(e) = r.history.evals.iter().rev().find(|e| e.split == s) {
                        for (m, _) in &e.metrics {
                            if !names.contains(m) {
                                names.push(m.clone());
                            }
                        }
                    }
                }
                for m in names {
                    let vals = self.finals(&o, &s, &m);
                    if vals.is_empty() {
                        continue;
                    }
                    let (mu, sd) = mean_std(&vals);
                    opt.push(o.clone());
                    split.push(s.clone());
                    metric.push(m);
                    mean.push(mu);
                    std.push(sd);
                    top.push(best(&vals));
                    runs.push(vals.len() as u32);
                    let c = costs.iter().find(|c| c.optimizer == o);
                    sps.push(c.and_then(|c| c.seconds_per_step));
                    share.push(c.and_then(|c| c.optimizer_share));
                    rss.push(c.and_then(|c| c.peak_rss_bytes));
                    state.push(c.map(|c| c.state_bytes));
                    gpu.push(c.and_then(|c| c.device_peak_bytes));
                    let t = ttt.as_ref().filter(|t| {
                        t.split == s && t.metric == *metric.last().unwrap_or(&String::new())
                    });
                    let row = t.and_then(|t| t.rows.iter().find(|r| r.optimizer == o));
                    t_target.push(t.map(|t| t.target));
                    t_reached.push(row.map(|r| r.reached as u32));
                    t_steps.push(row.and_then(|r| r.steps));
                    t_secs.push(row.and_then(|r| r.seconds));
                }
            }
        }
        DataFrame::new_infer_height(vec![
            Column::new("optimizer".into(), opt),
            Column::new("split".into(), split),
            Column::new("metric".into(), metric),
            Column::new("mean".into(), mean),
            Column::new("std".into(), std),
            Column::new("best".into(), top),
            Column::new("runs".into(), runs),
            Column::new("seconds_per_step".into(), sps),
            Column::new("optimizer_share".into(), share),
            Column::new("peak_rss_bytes".into(), rss),
            Column::new("state_bytes".into(), state),
            Column::new("device_peak_bytes".into(), gpu),
            Column::new("target".into(), t_target),
            Column::new("runs_reached_target".into(), t_reached),
            Column::new("steps_to_target".into(), t_steps),
            Column::new("seconds_to_target".into(), t_secs),
        ])
        .map_err(df_err)
    }

    /// The summary as a Markdown table in the model card's layout: one row per optimizer, one
    /// column per eval split, the headline metric in percent as `mean ± std (best b)` over
    /// several seeds, the value alone for one.
    pub fn to_markdown(&self) -> String {
        let splits = self.splits();
        let mut s = format!(
            "| optimizer | {} |\n|---|{}\n",
            splits
                .iter()
                .map(|x| format!("{x} {}", self.metric))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(splits.len())
        );
        for o in self.optimizers() {
            let mut cells = vec![];
            for sp in &splits {
                let vals = self.finals(&o, sp, &self.metric);
                cells.push(if vals.is_empty() {
                    "–".to_string()
                } else {
                    cell(&vals)
                });
            }
            let n = self.runs.iter().filter(|r| r.optimizer == o).count();
            s += &format!(
                "| {o} ({n} seed{}) | {} |\n",
                if n == 1 { "" } else { "s" },
                cells.join(" | ")
            );
        }
        if self.source == RANDOM_SOURCE {
            s += &format!("\n{RANDOM_NOTE}\n");
        }
        if self.optimizers().len() > 1 {
            if let Some(t) = self.time_to_target(self.target) {
                s += &format!("\n{}", t.to_markdown());
            }
        }
        if !self.runs.is_empty() {
            s += &format!("\n{}", self.costs_markdown());
        }
        if let Some(card) = self.card() {
            s += &format!("\n{}", crate::cards::card_markdown(&card));
            if self
                .optimizers()
                .iter()
                .any(|o| o.starts_with("M-FAC") && o.contains('%'))
            {
                s += "\nM-FAC rows with a percentage ran the sparse window (each row the top-k of an error-feedback accumulator, Sparse M-FAC); the card's M-FAC kept whole gradients.\n";
            }
        }
        if !self.failures.is_empty() {
            s += &format!(
                "\n**{} run{} failed** (not in the table): {}\n",
                self.failures.len(),
                if self.failures.len() == 1 { "" } else { "s" },
                self.failures
                    .iter()
                    .map(|f| format!("{} seed {}: {}", f.optimizer, f.seed, f.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        s
    }

    fn color(&self, optimizer: &str) -> usize {
        self.optimizers()
            .iter()
            .position(|o| o == optimizer)
            .unwrap_or(0)
    }

    /// Training loss vs step: each run raw (faint) and smoothed, one colour per optimizer.
    pub fn plot_loss(&self) -> Figure {
        self.loss_curves(Axis::Step)
    }

    /// Training loss vs training seconds (evaluation excluded): what a step costs shows here
    /// (an M-FAC step costs more than an Adam step; a curve per step flatters it).
    pub fn plot_loss_vs_time(&self) -> Figure {
        self.loss_curves(Axis::TrainSeconds)
    }

    fn loss_curves(&self, axis: Axis) -> Figure {
        let mut series = vec![];
        for r in &self.runs {
            let raw: Vec<(f64, f64)> = r
                .history
                .train
                .iter()
                .map(|t| (axis.of(t.step, t.train_seconds), t.loss))
                .collect();
            let c = self.color(&r.optimizer);
            series.push(Series {
                name: format!("{} seed {} (raw)", r.optimizer, r.seed),
                points: raw.clone(),
                color: c,
                dashed: false,
                faint: true,
            });
            series.push(Series {
                name: format!("{} seed {}", r.optimizer, r.seed),
                points: smooth(&raw, 0.9),
                color: c,
                dashed: false,
                faint: false,
            });
        }
        Figure::lines(
            &format!("Training loss ({})", self.source),
            axis.label(),
            "cross-entropy loss (smoothed, raw faint)",
            series,
        )
    }

    /// Eval metric vs step per optimizer (mean over seeds): solid for the first eval split
    /// (matched), dashed for the second (mismatched).
    pub fn plot_accuracy(&self) -> Figure {
        self.metric_curves(Axis::Step)
    }

    /// Eval metric vs training seconds (evaluation excluded; mean over seeds of both the
    /// metric and the seconds at each evaluation): who gets there first on the clock.
    pub fn plot_accuracy_vs_time(&self) -> Figure {
        self.metric_curves(Axis::TrainSeconds)
    }

    fn metric_curves(&self, axis: Axis) -> Figure {
        let mut series = vec![];
        for o in self.optimizers() {
            for (i, sp) in self.splits().iter().enumerate() {
                let mut by_step: std::collections::BTreeMap<usize, Vec<(f64, f64)>> =
                    Default::default();
                for r in self.runs.iter().filter(|r| r.optimizer == o) {
                    for e in r.history.evals.iter().filter(|e| &e.split == sp) {
                        if let Some((_, v)) = e.metrics.iter().find(|(m, _)| *m == self.metric) {
                            let x = axis.of(e.step, e.train_seconds);
                            by_step.entry(e.step).or_default().push((x, *v));
                        }
                    }
                }
                let mean = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
                    v.iter().map(f).sum::<f64>() / v.len() as f64
                };
                series.push(Series {
                    name: format!("{o} · {sp}"),
                    points: by_step
                        .values()
                        .map(|v| (mean(v, |p| p.0), mean(v, |p| p.1)))
                        .collect(),
                    color: self.color(&o),
                    dashed: i % 2 == 1,
                    faint: false,
                });
            }
        }
        Figure::lines(
            &format!("Eval {} (mean over seeds)", self.metric),
            axis.label(),
            &self.metric,
            series,
        )
    }

    /// Final metric per optimizer and eval split, mean with ± std bars over seeds.
    pub fn plot_final(&self) -> Figure {
        let mut bars = vec![];
        for o in self.optimizers() {
            for sp in self.splits() {
                let vals = self.finals(&o, &sp, &self.metric);
                if vals.is_empty() {
                    continue;
                }
                let (m, sd) = mean_std(&vals);
                bars.push(Bar {
                    group: sp.clone(),
                    name: o.clone(),
                    value: m,
                    // One run: no error bar (its spread is unknown, not 0).
                    err: sd.unwrap_or(0.0),
                    color: self.color(&o),
                });
            }
        }
        Figure::bars(
            &format!("Final {} (mean ± std over seeds)", self.metric),
            &self.metric,
            bars,
        )
    }

    /// Writes `history.parquet`, `history.csv`, `summary.csv`, `summary.md` and the plots
    /// (`loss`, `accuracy` against the step, `loss_time`, `accuracy_time` against the training
    /// seconds, `final`, `time` (where the time went); each `.png` and `.svg`) into `dir`, each
    /// file atomically.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
        let mut hist = self.history()?;
        let mut buf = Vec::new();
        ParquetWriter::new(&mut buf)
            .finish(&mut hist)
            .map_err(df_err)?;
        write_bytes_atomic(&dir.join("history.parquet"), &buf)?;
        let write_csv = |df: &mut DataFrame, name: &str| -> Result<()> {
            let mut buf = Vec::new();
            CsvWriter::new(&mut buf).finish(df).map_err(df_err)?;
            write_bytes_atomic(&dir.join(name), &buf)
        };
        write_csv(&mut hist, "history.csv")?;
        write_csv(&mut self.summary()?, "summary.csv")?;
        write_bytes_atomic(&dir.join("summary.md"), self.to_markdown().as_bytes())?;
        for (name, fig) in [
            ("loss", self.plot_loss()),
            ("accuracy", self.plot_accuracy()),
            ("loss_time", self.plot_loss_vs_time()),
            ("accuracy_time", self.plot_accuracy_vs_time()),
            ("final", self.plot_final()),
            ("time", self.plot_time_breakdown()),
        ] {
            fig.save(dir.join(format!("{name}.png")))?;
            fig.save(dir.join(format!("{name}.svg")))?;
        }
        Ok(())
    }

    /// Shows the summary table inline in evcxr (as HTML-rendered Markdown text).
    pub fn evcxr_display(&self) {
        println!("{}", self.to_markdown());
    }
}

#[cfg(test)]
mod tests {
    use super::run_line;
    use std::time::Duration;

    #[test]
    fn the_run_line_gives_the_comparisons_eta_from_the_runs_so_far() {
        assert_eq!(
            run_line(1, 6, "AdamW", 42, Duration::ZERO),
            "compare: run 1/6: AdamW, seed 42"
        );
        // Two runs took 100 s: 50 s a run, 4 runs left with this one.
        assert_eq!(
            run_line(3, 6, "M-FAC m=1024 1%", 43, Duration::from_secs(100)),
            "compare: run 3/6: M-FAC m=1024 1%, seed 43 · elapsed 0:01:40 · ETA 0:03:20 for the comparison"
        );
    }
}
