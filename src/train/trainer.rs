//! `Trainer`: run_glue's training loop — epochs of shuffled batches, HF's step semantics,
//! evaluation with the task's metrics, history, and HF-style output files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, D};
use polars::prelude::*;

use crate::data::{epoch_batches, EncodedSplit, GlueData, GlueTask, Metric};
use crate::error::{Error, Result};
use crate::model::BertClassifier;
use crate::optim::OptimizerSpec;
use crate::train::config::TrainConfig;
use crate::train::metrics::{accuracy, f1, matthews, pearson, spearman};
use crate::train::progress::Progress;
use crate::train::step::{scalar, Stepper};

/// The sub-folder of the output folder holding the checkpoint of the last evaluation.
pub const CHECKPOINT: &str = "checkpoint-last";

/// One logged training step.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainRecord {
    /// Optimizer step, 1-based like HF's `global_step` after the update.
    pub step: usize,
    /// Fractional epoch at the end of the step.
    pub epoch: f64,
    /// Batch loss before the update.
    pub loss: f64,
    /// Learning rate of the update.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Seconds since training started.
    pub elapsed: f64,
}

/// One evaluation of one split.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRecord {
    /// Steps done when evaluated.
    pub step: usize,
    /// Fractional epoch.
    pub epoch: f64,
    /// Split name, e.g. `validation_matched`.
    pub split: String,
    /// Mean loss over the split.
    pub loss: f64,
    /// (metric name, value), e.g. ("accuracy", 0.61).
    pub metrics: Vec<(String, f64)>,
    /// Seconds since training started.
    pub elapsed: f64,
}

/// What a run produced, with its history as a polars DataFrame.
#[derive(Debug, Clone)]
pub struct RunHistory {
    /// `adamw` or `mfac`.
    pub optimizer: String,
    /// Every training step.
    pub train: Vec<TrainRecord>,
    /// Every evaluation.
    pub evals: Vec<EvalRecord>,
    /// Long format: step, epoch, kind ("train" | "eval"), loss, lr, grad_norm, split, metric,
    /// value, elapsed (nulls where a column does not apply).
    pub df: DataFrame,
}

impl RunHistory {
    fn build(optimizer: &str, train: Vec<TrainRecord>, evals: Vec<EvalRecord>) -> Result<Self> {
        let (mut step, mut epoch, mut kind, mut loss, mut lr, mut gn) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut split, mut metric, mut value, mut elapsed) = (vec![], vec![], vec![], vec![]);
        for r in &train {
            step.push(r.step as u64);
            epoch.push(r.epoch);
            kind.push("train".to_string());
            loss.push(Some(r.loss));
            lr.push(Some(r.lr));
            gn.push(Some(r.grad_norm));
            split.push(None::<String>);
            metric.push(None::<String>);
            value.push(None::<f64>);
            elapsed.push(r.elapsed);
        }
        for e in &evals {
            for (m, v) in &e.metrics {
                step.push(e.step as u64);
                epoch.push(e.epoch);
                kind.push("eval".to_string());
                loss.push(Some(e.loss));
                lr.push(None);
                gn.push(None);
                split.push(Some(e.split.clone()));
                metric.push(Some(m.clone()));
                value.push(Some(*v));
                elapsed.push(e.elapsed);
            }
        }
        let df = DataFrame::new_infer_height(vec![
            Column::new("step".into(), step),
            Column::new("epoch".into(), epoch),
            Column::new("kind".into(), kind),
            Column::new("loss".into(), loss),
            Column::new("lr".into(), lr),
            Column::new("grad_norm".into(), gn),
            Column::new("split".into(), split),
            Column::new("metric".into(), metric),
            Column::new("value".into(), value),
            Column::new("elapsed".into(), elapsed),
        ])
        .map_err(|e| Error::Data {
            source_name: "history".into(),
            message: e.to_string(),
        })?;
        Ok(RunHistory {
            optimizer: optimizer.into(),
            train,
            evals,
            df,
        })
    }

    /// The last value of `metric` on `split`.
    pub fn final_metric(&self, split: &str, metric: &str) -> Option<f64> {
        self.evals
            .iter()
            .rev()
            .find(|e| e.split == split)
            .and_then(|e| e.metrics.iter().find(|(m, _)| m == metric).map(|(_, v)| *v))
    }
}

/// Trains a [`BertClassifier`] on GLUE data with HF Trainer's semantics.
///
/// ```no_run
/// use mfac_lab::prelude::*;
/// let data = mfac_lab::data::mnli_sample()?;
/// let model = load_bert_tiny()?;
/// let history = Trainer::new(model, TrainConfig::run_glue())
///     .optimizer(OptimizerSpec::mfac(MFacConfig::model_card()))
///     .fit(&data)?;
/// # Ok::<(), mfac_lab::Error>(())
/// ```
pub struct Trainer {
    model: BertClassifier,
    cfg: TrainConfig,
    spec: OptimizerSpec,
    output_dir: Option<PathBuf>,
}

/// Writes `value` as pretty JSON to `path` atomically (temporary file, then rename).
pub fn write_json_atomic(path: &Path, value: &serde_json::Value) -> Result<()> {
    write_bytes_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// crash never leaves a half-written file.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io("renaming into", path, e)
    })
}

impl Trainer {
    /// A trainer with AdamW at the config's learning rate until [`Trainer::optimizer`] says otherwise.
    pub fn new(model: BertClassifier, cfg: TrainConfig) -> Self {
        let spec = OptimizerSpec::adamw(cfg.learning_rate);
        Trainer {
            model,
            cfg,
            spec,
            output_dir: None,
        }
    }

    /// The optimizer to use.
    pub fn optimizer(mut self, spec: OptimizerSpec) -> Self {
        self.spec = spec;
        self
    }

    /// Where to write the model, trainer_state.json and eval_results.json (like HF).
    pub fn output_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.output_dir = Some(dir.into());
        self
    }

    /// The model (trained after [`Trainer::fit`]).
    pub fn model(&self) -> &BertClassifier {
        &self.model
    }

    /// Gives the model back.
    pub fn into_model(self) -> BertClassifier {
        self.model
    }

    fn encode(&self, data: &GlueData) -> Result<(EncodedSplit, Vec<(String, EncodedSplit)>)> {
        let tok = self
            .model
            .tokenizer()?
            .clone()
            .with_max_length(self.cfg.max_seq_length)?;
        let encode = |df: &DataFrame| -> Result<EncodedSplit> {
            if data.task.is_regression() {
                EncodedSplit::encode_scores(&tok, &data.texts(df)?, &data.scores(df)?)
            } else {
                let (pairs, labels) = data.pairs(df)?;
                EncodedSplit::encode(&tok, &pairs, &labels)
            }
        };
        let mut train = encode(&data.train)?;
        if let Some(n) = self.cfg.max_train_samples {
            train.truncate(n);
        }
        let mut evals = vec![];
        for (name, df) in &data.eval {
            let mut s = encode(df)?;
            if let Some(n) = self.cfg.max_eval_samples {
                s.truncate(n);
            }
            evals.push((name.clone(), s));
        }
        Ok((train, evals))
    }

    /// Evaluates every eval split of `data`: mean loss and the task's metrics.
    pub fn evaluate(&self, data: &GlueData) -> Result<Vec<EvalRecord>> {
        let (_, evals) = self.encode(data)?;
        evals
            .iter()
            .map(|(n, s)| self.eval_split(data.task, n, s, 0, 0.0, 0.0))
            .collect()
    }

    fn eval_split(
        &self,
        task: GlueTask,
        name: &str,
        split: &EncodedSplit,
        step: usize,
        epoch: f64,
        elapsed: f64,
    ) -> Result<EvalRecord> {
        let (mut preds, mut loss_sum) = (Vec::with_capacity(split.len()), 0.0);
        let mut outputs: Vec<f64> = Vec::with_capacity(split.len());
        let pad_to = self
            .cfg
            .pad_to_max_length
            .then_some(self.cfg.max_seq_length);
        for rows in epoch_batches(split.len(), self.cfg.eval_batch_size, 0, 0, false) {
            let batch = split.collate(&rows, pad_to, self.model.device())?;
            let logits = self.model.forward(&batch, false)?;
            let per = BertClassifier::per_example_loss(
                &logits,
                batch.labels.as_ref().expect("collate sets labels"),
            )?;
            loss_sum += scalar(&per.to_dtype(DType::F64)?.sum_all()?)?;
            if task.is_regression() {
                outputs.extend(
                    logits
                        .squeeze(D::Minus1)?
                        .to_dtype(DType::F64)?
                        .to_vec1::<f64>()?,
                );
            } else {
                preds.extend(
                    logits
                        .argmax(D::Minus1)?
                        .to_dtype(DType::U32)?
                        .to_vec1::<u32>()?,
                );
            }
        }
        let labels = &split.labels[..preds.len()];
        let targets: Vec<f64> = split
            .scores
            .as_deref()
            .unwrap_or(&[])
            .iter()
            .take(outputs.len())
            .map(|&v| v as f64)
            .collect();
        let metrics = task
            .metrics()
            .iter()
            .map(|m| {
                let v = match m {
                    Metric::Accuracy => accuracy(&preds, labels),
                    Metric::F1 => f1(&preds, labels),
                    Metric::Matthews => matthews(&preds, labels),
                    Metric::Pearson => pearson(&outputs, &targets),
                    Metric::Spearman => spearman(&outputs, &targets),
                };
                (m.name().to_string(), v)
            })
            .collect();
        Ok(EvalRecord {
            step,
            epoch,
            split: name.to_string(),
            loss: loss_sum / split.len().max(1) as f64,
            metrics,
            elapsed,
        })
    }

    /// Trains on `data.train`, evaluating every `eval_steps` and at each epoch end; returns the
    /// history. With an output folder, writes the model, trainer_state.json and
    /// eval_results.json there (atomically). A non-finite loss stops training with
    /// [`Error::NonFiniteLoss`], after saving the last good model when an output folder is set.
    pub fn fit(&mut self, data: &GlueData) -> Result<RunHistory> {
        let task = data.task;
        if self.model.num_labels() != task.num_labels() {
            return Err(Error::InvalidArgument(format!(
                "the model has {} labels but {} has {}",
                self.model.num_labels(),
                task.name(),
                task.num_labels()
            )));
        }
        // Fresh variables for this call's copy of candle (see BertClassifier::rebind: in
        // evcxr, a model from another cell would otherwise share tensor ids with this one's).
        self.model = self.model.rebind()?;
        let (train, evals) = self.encode(data)?;
        if train.is_empty() {
            return Err(Error::InvalidArgument("no training rows".into()));
        }
        let cfg = self.cfg.clone();
        let total = cfg.total_steps(train.len());
        let per_epoch = train.len().div_ceil(cfg.batch_size.max(1));
        let mut stepper = Stepper::new(&self.model, &self.spec, &cfg, total)?;
        self.model.set_dropout_seed(cfg.seed);
        let pad_to = cfg.pad_to_max_length.then_some(cfg.max_seq_length);
        let label = format!("{} {}", self.spec.name(), task.name());
        let mut progress = Progress::new(&label, total, cfg.quiet);
        let start = Instant::now();
        let (mut records, mut eval_records) = (Vec::<TrainRecord>::new(), Vec::<EvalRecord>::new());
        let mut step = 0usize;
        let mut last_eval = usize::MAX;
        let mut last_checkpoint: Option<usize> = None;
        let mut epoch = 0u64;
        while step < total {
            for rows in epoch_batches(train.len(), cfg.batch_size, cfg.seed, epoch, true) {
                if step >= total {
                    break;
                }
                let batch = train.collate(&rows, pad_to, self.model.device())?;
                let rec = match stepper.step(&self.model, &batch, step) {
                    Ok(r) => r,
                    Err(Error::NonFiniteLoss { step, loss, .. }) => {
                        let saved = match (&self.output_dir, last_checkpoint) {
                            (Some(dir), Some(at)) => format!(
                                "; the last good checkpoint (step {at}) is in {}",
                                dir.join(CHECKPOINT).display()
                            ),
                            (Some(_), None) => {
                                "; no checkpoint was written yet (one is written at each evaluation with a finite loss)".into()
                            }
                            (None, _) => "; set an output folder to keep checkpoints".into(),
                        };
                        progress.finish();
                        return Err(Error::NonFiniteLoss { step, loss, saved });
                    }
                    Err(e) => return Err(e),
                };
                step += 1;
                let ep = step as f64 / per_epoch as f64;
                let elapsed = start.elapsed().as_secs_f64();
                records.push(TrainRecord {
                    step,
                    epoch: ep,
                    loss: rec.loss,
                    lr: rec.lr,
                    grad_norm: rec.grad_norm,
                    elapsed,
                });
                progress.update(step, &format!("loss {:.4} · lr {:.2e}", rec.loss, rec.lr));
                let epoch_end = step % per_epoch == 0 || step == total;
                if cfg.eval_steps.is_some_and(|n| n > 0 && step % n == 0) || epoch_end {
                    for (name, s) in &evals {
                        let r = self.eval_split(
                            task,
                            name,
                            s,
                            step,
                            ep,
                            start.elapsed().as_secs_f64(),
                        )?;
                        progress.println(&format!(
                            "step {step} (epoch {ep:.2}) {name}: loss {:.4}, {}",
                            r.loss,
                            r.metrics
                                .iter()
                                .map(|(m, v)| format!("{m} {v:.4}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        ));
                        eval_records.push(r);
                    }
                    last_eval = step;
                    // A checkpoint at each evaluation whose losses are finite: what a later
                    // non-finite loss falls back to.
                    let finite = eval_records
                        .iter()
                        .rev()
                        .take(evals.len())
                        .all(|e| e.loss.is_finite())
                        && rec.loss.is_finite();
                    if let (Some(dir), true) = (&self.output_dir, finite) {
                        self.model.save_pretrained(dir.join(CHECKPOINT))?;
                        last_checkpoint = Some(step);
                    }
                }
            }
            epoch += 1;
        }
        if last_eval != step {
            for (name, s) in &evals {
                eval_records.push(self.eval_split(
                    task,
                    name,
                    s,
                    step,
                    step as f64 / per_epoch as f64,
                    start.elapsed().as_secs_f64(),
                )?);
            }
        }
        progress.finish();
        let history = RunHistory::build(self.spec.name(), records, eval_records)?;
        if let Some(dir) = self.output_dir.clone() {
            self.write_outputs(&dir, task, &history, total, per_epoch)?;
        }
        Ok(history)
    }

    fn write_outputs(
        &self,
        dir: &Path,
        task: GlueTask,
        h: &RunHistory,
        total: usize,
        per_epoch: usize,
    ) -> Result<()> {
        // save_pretrained replaces the folder as a whole: keep the checkpoint across it.
        let ckpt = dir.join(CHECKPOINT);
        let aside = dir.with_file_name(format!(
            ".{}.{CHECKPOINT}-{}",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let moved = ckpt.is_dir() && std::fs::rename(&ckpt, &aside).is_ok();
        let saved = self.model.save_pretrained(dir);
        if moved {
            std::fs::rename(&aside, &ckpt).map_err(|e| Error::io("restoring", &ckpt, e))?;
        }
        saved?;
        let epoch = total as f64 / per_epoch as f64;
        // eval_results.json: HF's keys; mnli's mismatched split gets the `_mm` suffix.
        let mut results = serde_json::Map::new();
        results.insert("epoch".into(), epoch.into());
        for split in task.eval_splits() {
            if let Some(e) = h.evals.iter().rev().find(|e| e.split == *split) {
                let suffix = if *split == "validation_mismatched" {
                    "_mm"
                } else {
                    ""
                };
                results.insert(format!("eval_loss{suffix}"), e.loss.into());
                for (m, v) in &e.metrics {
                    results.insert(format!("eval_{m}{suffix}"), (*v).into());
                }
            }
        }
        write_json_atomic(
            &dir.join("eval_results.json"),
            &serde_json::Value::Object(results),
        )?;
        let mut log = vec![];
        for r in &h.train {
            log.push(serde_json::json!({"step": r.step, "epoch": r.epoch, "loss": r.loss, "learning_rate": r.lr, "grad_norm": r.grad_norm}));
        }
        for e in &h.evals {
            let mut o = serde_json::json!({"step": e.step, "epoch": e.epoch, "split": e.split, "eval_loss": e.loss});
            for (m, v) in &e.metrics {
                o[format!("eval_{m}")] = (*v).into();
            }
            log.push(o);
        }
        let state = serde_json::json!({
            "global_step": h.train.len(),
            "max_steps": total,
            "epoch": epoch,
            "num_train_epochs": self.cfg.num_train_epochs,
            "train_batch_size": self.cfg.batch_size,
            "seed": self.cfg.seed,
            "optimizer": self.spec.name(),
            "log_history": log,
        });
        write_json_atomic(&dir.join("trainer_state.json"), &state)
    }
}
