//! `compare_optimizers`: the same model source, data and recipe trained with each optimizer and
//! each seed — same initial weights and data order per seed across optimizers, so the comparison
//! is fair — with the history, a mean ± std summary (the model card's layout) and plots.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use polars::prelude::*;

use crate::data::GlueData;
use crate::error::{Error, Result};
use crate::model::{BertClassifier, BertConfig, LoadOptions, PairTokenizer, BERT_TINY_REPO};
use crate::optim::OptimizerSpec;
use crate::plot::{smooth, Bar, Figure, Series};
use crate::train::{write_bytes_atomic, RunHistory, TrainConfig, Trainer};

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

    /// A short description for logs and summaries.
    pub fn describe(&self) -> String {
        match self {
            ModelSource::Pretrained(r) => r.clone(),
            ModelSource::Random(_) => "randomly initialised BERT (seeded)".into(),
        }
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
    /// Where the models train.
    pub device: Device,
    /// If set, each run writes its HF-style outputs to `<dir>/<optimizer>-seed<seed>/`.
    pub output_dir: Option<PathBuf>,
}

impl Default for CompareConfig {
    fn default() -> Self {
        CompareConfig {
            train: TrainConfig::run_glue(),
            seeds: vec![42],
            device: Device::Cpu,
            output_dir: None,
        }
    }
}

/// One finished run.
#[derive(Debug, Clone)]
pub struct Run {
    /// The optimizer's name (`adamw`, `mfac`).
    pub optimizer: String,
    /// The run's seed.
    pub seed: u64,
    /// What it recorded.
    pub history: RunHistory,
}

/// One failed run and why.
#[derive(Debug, Clone)]
pub struct RunFailure {
    /// The optimizer's name.
    pub optimizer: String,
    /// The run's seed.
    pub seed: u64,
    /// The error, as text.
    pub message: String,
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
}

fn df_err(e: PolarsError) -> Error {
    Error::Data {
        source_name: "comparison".into(),
        message: e.to_string(),
    }
}

/// Trains every (seed, optimizer) pair and collects the results. A run that fails does not stop
/// the others: when any failed, the error is [`Error::RunsFailed`], which names each failed run
/// and carries the results of the others.
///
/// ```no_run
/// use mfac_lab::prelude::*;
/// let data = mnli_sample()?;
/// let specs = [OptimizerSpec::adamw(1e-4), OptimizerSpec::mfac(MFacConfig { num_grads: 32, ..MFacConfig::model_card() })];
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
    let mut cmp = Comparison {
        runs: vec![],
        failures: vec![],
        metric: data.task.metrics()[0].name().to_string(),
        source: source.describe(),
    };
    let total = cfg.seeds.len() * specs.len();
    let mut k = 0;
    for &seed in &cfg.seeds {
        for spec in specs {
            k += 1;
            let name = spec.name().to_string();
            if !cfg.train.quiet {
                println!("run {k}/{total}: {name}, seed {seed}");
            }
            let result = (|| -> Result<RunHistory> {
                let model =
                    source.load(data.task.num_labels(), seed, &cfg.device, cfg.train.dtype)?;
                let mut tc = cfg.train.clone();
                tc.seed = seed;
                let mut trainer = Trainer::new(model, tc).optimizer(*spec);
                if let Some(dir) = &cfg.output_dir {
                    trainer = trainer.output_dir(dir.join(format!("{name}-seed{seed}")));
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
                    eprintln!("run {k}/{total} ({name}, seed {seed}) failed: {e}");
                    cmp.failures.push(RunFailure {
                        optimizer: name,
                        seed,
                        message: e.to_string(),
                    });
                }
            }
        }
    }
    if cmp.failures.is_empty() {
        Ok(cmp)
    } else {
        let failed = cmp
            .failures
            .iter()
            .map(|f| format!("{} seed {}: {}", f.optimizer, f.seed, f.message))
            .collect();
        Err(Error::RunsFailed {
            failed,
            total,
            partial: Box::new(cmp),
        })
    }
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    if v.len() < 2 {
        return (mean, 0.0);
    }
    // Sample standard deviation over seeds, as model cards report "mean ± std".
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

impl Comparison {
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
    /// (sample std; 0 with one seed), and the number of runs.
    pub fn summary(&self) -> Result<DataFrame> {
        let (mut opt, mut split, mut metric, mut mean, mut std, mut runs) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
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
                    runs.push(vals.len() as u32);
                }
            }
        }
        DataFrame::new_infer_height(vec![
            Column::new("optimizer".into(), opt),
            Column::new("split".into(), split),
            Column::new("metric".into(), metric),
            Column::new("mean".into(), mean),
            Column::new("std".into(), std),
            Column::new("runs".into(), runs),
        ])
        .map_err(df_err)
    }

    /// The summary as a Markdown table in the model card's layout: one row per optimizer, one
    /// column per eval split, the headline metric in percent as `mean ± std`.
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
                    let (m, sd) = mean_std(&vals);
                    format!("{:.2} ± {:.2}", 100.0 * m, 100.0 * sd)
                });
            }
            let n = self.runs.iter().filter(|r| r.optimizer == o).count();
            s += &format!(
                "| {o} ({n} seed{}) | {} |\n",
                if n == 1 { "" } else { "s" },
                cells.join(" | ")
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
        let mut series = vec![];
        for r in &self.runs {
            let raw: Vec<(f64, f64)> = r
                .history
                .train
                .iter()
                .map(|t| (t.step as f64, t.loss))
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
            "step",
            "cross-entropy loss (smoothed, raw faint)",
            series,
        )
    }

    /// Eval metric vs step per optimizer (mean over seeds): solid for the first eval split
    /// (matched), dashed for the second (mismatched).
    pub fn plot_accuracy(&self) -> Figure {
        let mut series = vec![];
        for o in self.optimizers() {
            for (i, sp) in self.splits().iter().enumerate() {
                let mut by_step: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
                for r in self.runs.iter().filter(|r| r.optimizer == o) {
                    for e in r.history.evals.iter().filter(|e| &e.split == sp) {
                        if let Some((_, v)) = e.metrics.iter().find(|(m, _)| *m == self.metric) {
                            by_step.entry(e.step).or_default().push(*v);
                        }
                    }
                }
                series.push(Series {
                    name: format!("{o} · {sp}"),
                    points: by_step
                        .iter()
                        .map(|(s, v)| (*s as f64, v.iter().sum::<f64>() / v.len() as f64))
                        .collect(),
                    color: self.color(&o),
                    dashed: i % 2 == 1,
                    faint: false,
                });
            }
        }
        Figure::lines(
            &format!("Eval {} (mean over seeds)", self.metric),
            "step",
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
                    err: sd,
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

    /// Writes `history.parquet`, `history.csv`, `summary.csv`, `summary.md` and the three plots
    /// (`loss`, `accuracy`, `final`, each `.png` and `.svg`) into `dir`, each file atomically.
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
            ("final", self.plot_final()),
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

impl RunHistory {
    /// Training loss vs step, raw (faint) and smoothed.
    pub fn plot_loss(&self) -> Figure {
        let raw: Vec<(f64, f64)> = self.train.iter().map(|t| (t.step as f64, t.loss)).collect();
        Figure::lines(
            &format!("Training loss ({})", self.optimizer),
            "step",
            "cross-entropy loss",
            vec![
                Series {
                    name: "raw".into(),
                    points: raw.clone(),
                    color: 0,
                    dashed: false,
                    faint: true,
                },
                Series {
                    name: format!("{} (smoothed)", self.optimizer),
                    points: smooth(&raw, 0.9),
                    color: 0,
                    dashed: false,
                    faint: false,
                },
            ],
        )
    }

    /// Every eval metric vs step, one line per split and metric.
    pub fn plot_accuracy(&self) -> Figure {
        let mut keys: Vec<(String, String)> = vec![];
        for e in &self.evals {
            for (m, _) in &e.metrics {
                let k = (e.split.clone(), m.clone());
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
        }
        let series = keys
            .iter()
            .enumerate()
            .map(|(i, (sp, m))| Series {
                name: format!("{sp} {m}"),
                points: self
                    .evals
                    .iter()
                    .filter(|e| &e.split == sp)
                    .filter_map(|e| {
                        e.metrics
                            .iter()
                            .find(|(n, _)| n == m)
                            .map(|(_, v)| (e.step as f64, *v))
                    })
                    .collect(),
                color: i,
                dashed: false,
                faint: false,
            })
            .collect();
        Figure::lines(
            &format!("Evaluation ({})", self.optimizer),
            "step",
            "metric",
            series,
        )
    }
}
