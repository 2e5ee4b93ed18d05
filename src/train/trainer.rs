//! `Trainer`: run_glue's training loop — epochs of shuffled batches, HF's step semantics,
//! evaluation with the task's metrics, history, and HF-style output files.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, D};
use polars::prelude::*;

use crate::data::{epoch_batches, EncodedSplit, GlueData, GlueTask, Metric};
use crate::error::{Error, Result};
use crate::io::write_json_atomic;
use crate::model::BertClassifier;
use crate::optim::{OptimKind, OptimizerSpec};
use crate::rng::RngState;
use crate::train::checkpoint::{
    self, OPTIMIZER_FILE, RESULTS_FILE, RESUME_KEY, RNG_FILE, STATE_FILE,
};
use crate::train::config::{ReportTo, TrainConfig};
use crate::train::disk::{checkpoint_steps, free_bytes, DiskPlan};
use crate::train::history::{EvalRecord, RunHistory, TrainRecord};
use crate::train::metrics::{accuracy, f1, matthews, pearson, spearman};
use crate::train::progress::Progress;
use crate::train::step::{scalar, Stepper};
use crate::train::tensorboard::EventWriter;

/// Trains a [`BertClassifier`] on GLUE data with HF Trainer's semantics.
///
/// ```no_run
/// use mfac_lab::prelude::*;
/// let data = mfac_lab::data::mnli_sample()?;
/// let model = load_bert_tiny()?;
/// let history = Trainer::new(model, TrainConfig::run_glue())
///     .optimizer(OptimizerSpec::mfac(MFacConfig::model_card()))
///     .output_dir("out")
///     .fit(&data)?;
/// // Later, after an interruption: the same call, continued from the newest checkpoint.
/// # let model = load_bert_tiny()?;
/// let history = Trainer::new(model, TrainConfig::run_glue())
///     .optimizer(OptimizerSpec::mfac(MFacConfig::model_card()))
///     .output_dir("out")
///     .resume_from(mfac_lab::train::latest_checkpoint("out".as_ref())?.expect("a checkpoint"))
///     .fit(&data)?;
/// # Ok::<(), mfac_lab::Error>(())
/// ```
pub struct Trainer {
    model: BertClassifier,
    cfg: TrainConfig,
    output_dir: Option<PathBuf>,
    resume: Option<PathBuf>,
    stop: Arc<AtomicBool>,
    stop_at: Option<usize>,
}

/// What a resumed run must agree on with the run that wrote the checkpoint.
fn fingerprint(
    cfg: &TrainConfig,
    model: &BertClassifier,
    task: GlueTask,
    train_rows: usize,
    total: usize,
) -> serde_json::Value {
    serde_json::json!({
        "task": task.name(),
        "train_rows": train_rows,
        "max_steps": total,
        "train_batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "optimizer": format!("{:?}", cfg.optimizer),
        "max_grad_norm": cfg.max_grad_norm,
        "schedule": format!("{:?}", cfg.schedule),
        "dropout": cfg.dropout,
        "max_seq_length": cfg.max_seq_length,
        "pad_to_max_length": cfg.pad_to_max_length,
        "dtype": format!("{:?}", model.dtype()),
        "num_parameters": model.num_parameters(),
    })
}

/// What a checkpoint restores besides the model and the optimizer.
struct Resumed {
    step: usize,
    records: Vec<TrainRecord>,
    evals: Vec<EvalRecord>,
    last_eval: Option<usize>,
    elapsed: f64,
    eval_seconds: f64,
    /// The TensorBoard run folder's name (under `<output_dir>/runs/`), when it logged there.
    tensorboard_run: Option<String>,
}

/// Copies the weights of `model.safetensors` in `dir` into the model's variables, exactly.
fn load_weights(model: &BertClassifier, dir: &Path) -> Result<()> {
    let path = dir.join("model.safetensors");
    let tensors =
        candle_core::safetensors::load(&path, &candle_core::Device::Cpu).map_err(|e| {
            Error::Weights {
                path: path.clone(),
                message: e.to_string(),
            }
        })?;
    for (name, var) in model.named_vars() {
        let t = tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: path.clone(),
            name: name.clone(),
        })?;
        if t.dims() != var.dims() || t.dtype() != var.dtype() {
            return Err(Error::InvalidArgument(format!(
                "{}: {name} is {:?} {:?} but the model's is {:?} {:?}; resume with the same model and dtype",
                path.display(),
                t.dtype(),
                t.dims(),
                var.dtype(),
                var.dims()
            )));
        }
        var.set(&t.to_device(var.device())?)?;
    }
    Ok(())
}

impl Trainer {
    /// A trainer with the config's optimizer (AdamW at the recipe's learning rate unless
    /// [`Trainer::optimizer`] says otherwise).
    pub fn new(model: BertClassifier, cfg: TrainConfig) -> Self {
        Trainer {
            model,
            cfg,
            output_dir: None,
            resume: None,
            stop: Arc::new(AtomicBool::new(false)),
            stop_at: None,
        }
    }

    /// The optimizer to use, with its learning rate (it replaces `TrainConfig::optimizer`).
    pub fn optimizer(mut self, spec: OptimizerSpec) -> Self {
        self.cfg.optimizer = spec;
        self
    }

    /// Where to write the model, trainer_state.json, eval_results.json and the checkpoints
    /// (like HF). A folder holding other files is refused unless
    /// `TrainConfig::overwrite_output_dir` is set; other files are never touched.
    pub fn output_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.output_dir = Some(dir.into());
        self
    }

    /// Continue the run saved in checkpoint folder `dir` (HF's `resume_from_checkpoint`):
    /// weights, optimizer state, schedule, dropout stream, data order and history are restored,
    /// so the run ends exactly as if it had never stopped. The config, data and optimizer must
    /// be those of the saved run (checked).
    pub fn resume_from(mut self, dir: impl Into<PathBuf>) -> Self {
        self.resume = Some(dir.into());
        self
    }

    /// A flag that stops training after the current step when set (e.g. from a Ctrl-C
    /// handler): a checkpoint is written and [`Trainer::fit`] returns [`Error::Interrupted`].
    pub fn stop_handle(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Stop after `step` steps as if interrupted (a checkpoint, then [`Error::Interrupted`]):
    /// to train in pieces, e.g. within a time budget per notebook cell.
    pub fn stop_at_step(mut self, step: usize) -> Self {
        self.stop_at = Some(step);
        self
    }

    /// The training config.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
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
            .map(|(n, s)| self.eval_split(data.task, n, s, 0, 0.0, (0.0, 0.0)))
            .collect()
    }

    fn eval_split(
        &self,
        task: GlueTask,
        name: &str,
        split: &EncodedSplit,
        step: usize,
        epoch: f64,
        (elapsed, train_seconds): (f64, f64),
    ) -> Result<EvalRecord> {
        let (mut preds, mut loss_sum) = (Vec::with_capacity(split.len()), 0.0);
        let mut outputs: Vec<f64> = Vec::with_capacity(split.len());
        let pad_to = self
            .cfg
            .pad_to_max_length
            .then_some(self.cfg.max_seq_length);
        for rows in epoch_batches(split.len(), self.cfg.eval_batch_size, 0, 0, false) {
            let batch = split.collate(&rows, pad_to, self.model.device())?;
            let logits = self.model.logits(&batch)?;
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
            train_seconds,
        })
    }

    /// Trains on `data.train`, evaluating every `eval_steps` and at each epoch end; returns the
    /// history. With an output folder, writes a checkpoint at each evaluation (and every
    /// `save_steps`), and at the end the model, trainer_state.json and eval_results.json, each
    /// file atomically. A non-finite loss stops training with [`Error::NonFiniteLoss`], naming
    /// the last good checkpoint; a stop request with [`Error::Interrupted`], after writing one.
    pub fn fit(&mut self, data: &GlueData) -> Result<RunHistory> {
        let mut run = self.begin(data)?;
        let cfg = self.cfg.clone();
        let pad_to = cfg.pad_to_max_length.then_some(cfg.max_seq_length);
        while run.step < run.total {
            // Epoch e's batches depend only on (seed, e): a resumed run skips the ones done.
            let epoch = (run.step / run.per_epoch) as u64;
            let skip = run.step % run.per_epoch;
            for rows in epoch_batches(run.train.len(), cfg.batch_size, cfg.seed, epoch, true)
                .into_iter()
                .skip(skip)
            {
                if run.step >= run.total {
                    break;
                }
                let batch = run.train.collate(&rows, pad_to, self.model.device())?;
                let rec = match run.stepper.step(&self.model, &batch, run.step) {
                    Ok(r) => r,
                    Err(Error::NonFiniteLoss { step, loss, .. }) => {
                        run.progress.finish();
                        let saved = self.last_good_checkpoint(&run);
                        return Err(Error::NonFiniteLoss { step, loss, saved });
                    }
                    Err(e) => return Err(e),
                };
                run.record(&rec, cfg.logging_steps)?;
                let step = run.step;
                let mut save = cfg.save_steps.is_some_and(|n| step % n == 0);
                let epoch_end = step % run.per_epoch == 0 || step == run.total;
                if cfg.eval_steps.is_some_and(|n| step % n == 0) || epoch_end {
                    // A checkpoint at each evaluation whose losses are finite: what a later
                    // non-finite loss falls back to.
                    save |= self.evaluate_now(&mut run, true)? && rec.loss.is_finite();
                }
                let stop = self.stop.load(Ordering::SeqCst) || self.stop_at == Some(step);
                let stop = stop && step < run.total;
                if let (Some(dir), true) = (&self.output_dir, save || stop) {
                    if let Err(e) = self.write_checkpoint(dir, &run) {
                        run.progress.finish();
                        let last = match run.last_checkpoint {
                            Some(at) => format!(
                                "the last complete checkpoint, {}, is untouched: resume from it (--resume_from_checkpoint) once there is room",
                                checkpoint::checkpoint_dir(dir, at).display()
                            ),
                            None => "no checkpoint was complete before it".into(),
                        };
                        return Err(Error::CheckpointWrite {
                            step,
                            source: Box::new(e),
                            last,
                        });
                    }
                    run.last_checkpoint = Some(step);
                }
                if stop {
                    run.progress.finish();
                    return Err(self.interrupted(step, run.total));
                }
            }
        }
        self.finish(run)
    }

    /// Everything before the first step: checks, encoding, the output folder, the optimizer,
    /// the dropout stream and, when resuming, the checkpoint's state.
    fn begin(&mut self, data: &GlueData) -> Result<Run> {
        let task = data.task;
        self.cfg.validate()?;
        if self.model.num_labels() != task.num_labels() {
            return Err(Error::InvalidArgument(format!(
                "the model has {} labels but {} has {}",
                self.model.num_labels(),
                task.name(),
                task.num_labels()
            )));
        }
        if self.cfg.report_to == ReportTo::TensorBoard && self.output_dir.is_none() {
            return Err(Error::InvalidArgument(
                "--report_to tensorboard writes event files under the output folder: set one (--output_dir, Trainer::output_dir)".into(),
            ));
        }
        let (train, evals) = self.encode(data)?;
        if train.is_empty() {
            return Err(Error::InvalidArgument("no training rows".into()));
        }
        let cfg = self.cfg.clone();
        let total = cfg.total_steps(train.len());
        let per_epoch = train.len().div_ceil(cfg.batch_size.max(1));
        let fingerprint = fingerprint(&cfg, &self.model, task, train.len(), total);
        if let Some(dir) = &self.output_dir {
            checkpoint::prepare_output_dir(dir, cfg.overwrite_output_dir, self.resume.is_some())?;
        }
        // Fresh variables for this call's copy of candle (see BertClassifier::rebind: in
        // evcxr, a model from another cell would otherwise share tensor ids with this one's).
        self.model = self.model.rebind()?;
        let mut stepper = Stepper::new(&self.model, &cfg.optimizer, &cfg, total)?;
        self.model.set_dropout_seed(cfg.seed);
        let resumed = match self.resume.clone() {
            Some(dir) => {
                let t0 = Instant::now();
                let r = self.restore(&dir, &mut stepper, &fingerprint)?;
                log::info!(
                    "resumed from {} (step {}) in {:.2} s",
                    dir.display(),
                    r.step,
                    t0.elapsed().as_secs_f64()
                );
                Some(r)
            }
            None => None,
        };
        if let Some(dir) = &self.output_dir {
            let done = resumed.as_ref().map_or(0, |r| r.step);
            self.check_disk(dir, &stepper, done, total, per_epoch)?;
        }
        let label = format!("{} {}", cfg.optimizer.name(), task.name());
        let mut run = Run {
            task,
            train,
            evals,
            total,
            per_epoch,
            fingerprint,
            stepper,
            step: 0,
            records: vec![],
            eval_records: vec![],
            last_eval: None,
            last_checkpoint: None,
            offset: 0.0,
            eval_seconds: 0.0,
            start: Instant::now(),
            progress: Progress::new(&label, total, cfg.quiet),
            peak_rss: crate::train::reset_peak_rss(),
            tensorboard: None,
        };
        let tensorboard_run = resumed.as_ref().and_then(|r| r.tensorboard_run.clone());
        if let (ReportTo::TensorBoard, Some(dir)) = (cfg.report_to, &self.output_dir) {
            // A resumed run logs into its first process's folder (one run to TensorBoard).
            let name = tensorboard_run.unwrap_or_else(|| {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                format!("{secs}-{}", std::process::id())
            });
            let at = resumed.as_ref().map(|r| r.step);
            let writer = EventWriter::create(
                &dir.join(crate::train::tensorboard::RUNS_DIR).join(&name),
                at,
            )?;
            log::info!("TensorBoard events: {}", writer.path().display());
            run.tensorboard = Some((name, writer));
        }
        if let Some(r) = resumed {
            (run.step, run.records, run.eval_records) = (r.step, r.records, r.evals);
            (run.last_eval, run.offset) = (r.last_eval, r.elapsed);
            run.eval_seconds = r.eval_seconds;
            run.last_checkpoint = Some(r.step);
            if r.step > 0 {
                run.progress.update(r.step, "resumed");
            }
        }
        Ok(run)
    }

    /// The disk plan ([`DiskPlan`]): the checkpoints this run will write from step `done` on
    /// and its final files against the free space of `dir`'s disk; logged, and an error with
    /// the numbers and the fixes when they do not fit.
    fn check_disk(
        &self,
        dir: &Path,
        stepper: &Stepper,
        done: usize,
        total: usize,
        per_epoch: usize,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let steps = checkpoint_steps(done, total, per_epoch, cfg.eval_steps, cfg.save_steps);
        let existing = if self.resume.is_some() {
            checkpoint::checkpoints(dir)?.len()
        } else {
            0
        };
        let model_bytes = (self.model.num_parameters() * self.model.dtype().size_in_bytes()) as u64;
        // A dense M-FAC run is told what the sparse window at 1 % would keep instead.
        let sparse = match cfg.optimizer.kind() {
            OptimKind::MFac(c) if !c.is_sparse() => {
                let s = c.with_density(0.01);
                Some(s.host_bytes(self.model.num_parameters()) as u64)
            }
            _ => None,
        };
        let plan = DiskPlan::new(
            model_bytes,
            stepper.optimizer().state_bytes(),
            &steps,
            total,
            existing,
            cfg.save_total_limit,
        )
        .with_sparse_alternative(sparse);
        log::info!("disk plan for {}: {}", dir.display(), plan.describe());
        let bf16_would_help =
            matches!(cfg.optimizer.kind(), OptimKind::MFac(c) if c.window_dtype != DType::BF16);
        plan.check(dir, free_bytes(dir), bf16_would_help)
    }

    /// Evaluates every eval split at the current step (printing the results when `log`);
    /// whether every loss was finite.
    fn evaluate_now(&self, run: &mut Run, log: bool) -> Result<bool> {
        let (step, ep) = (run.step, run.epoch());
        let mut finite = true;
        let t0 = Instant::now();
        let now = run.elapsed();
        let clocks = (now, now - run.eval_seconds);
        for (name, s) in &run.evals {
            let r = self.eval_split(run.task, name, s, step, ep, clocks)?;
            if log {
                run.progress.println(&format!(
                    "step {step} (epoch {ep:.2}) {name}: loss {:.4}, {}",
                    r.loss,
                    r.metrics
                        .iter()
                        .map(|(m, v)| format!("{m} {v:.4}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            finite &= r.loss.is_finite();
            if let Some((_, tb)) = &mut run.tensorboard {
                let tags: Vec<(String, f64)> = std::iter::once(("loss".to_string(), r.loss))
                    .chain(r.metrics.iter().cloned())
                    .map(|(m, v)| (format!("eval/{name}/{m}"), v))
                    .collect();
                let tags: Vec<(&str, f64)> = tags.iter().map(|(t, v)| (t.as_str(), *v)).collect();
                tb.scalars(step, &tags)?;
            }
            run.eval_records.push(r);
        }
        run.last_eval = Some(step);
        run.eval_seconds += t0.elapsed().as_secs_f64();
        Ok(finite)
    }

    /// The tail of a non-finite-loss error: where the last good checkpoint is, if any.
    fn last_good_checkpoint(&self, run: &Run) -> String {
        match (&self.output_dir, run.last_checkpoint) {
            (Some(dir), Some(at)) => format!(
                "; the last good checkpoint (step {at}) is {} (an HF model folder: start a new run from it, e.g. with a lower learning rate)",
                checkpoint::checkpoint_dir(dir, at).display()
            ),
            (Some(_), None) => {
                "; no checkpoint was written yet (one is written at each evaluation with a finite loss)".into()
            }
            (None, _) => "; set an output folder to keep checkpoints".into(),
        }
    }

    /// The error of a run stopped at `step`, saying how to continue it.
    fn interrupted(&self, step: usize, total: usize) -> Error {
        let checkpoint = self
            .output_dir
            .as_ref()
            .map(|d| checkpoint::checkpoint_dir(d, step));
        let resume = match &checkpoint {
            Some(c) => format!(
                "; checkpoint written to {}: continue with `--resume_from_checkpoint {}` (Trainer::resume_from)",
                c.display(),
                c.display()
            ),
            None => "; no output folder was set, so nothing was saved".into(),
        };
        Error::Interrupted {
            step,
            total,
            checkpoint,
            resume,
        }
    }

    /// After the last step: the final evaluation (unless one just ran), the history and the
    /// output files.
    fn finish(&mut self, mut run: Run) -> Result<RunHistory> {
        if run.last_eval != Some(run.step) {
            self.evaluate_now(&mut run, false)?;
        }
        run.progress.finish();
        let mut history =
            RunHistory::build(self.cfg.optimizer.name(), run.records, run.eval_records)?;
        history.cost.eval_seconds = run.eval_seconds;
        history.cost.peak_rss_bytes = run.peak_rss.then(crate::train::peak_rss_bytes).flatten();
        history.cost.state_bytes = run.stepper.optimizer().state_bytes();
        history.cost.device_peak_bytes = run.stepper.device_peak_bytes();
        if let Some(dir) = self.output_dir.clone() {
            self.write_outputs(&dir, run.task, &history, run.total, run.per_epoch)?;
        }
        Ok(history)
    }

    /// Loads checkpoint `dir` into the model, the optimizer and the dropout stream.
    fn restore(
        &self,
        dir: &Path,
        stepper: &mut Stepper,
        fp: &serde_json::Value,
    ) -> Result<Resumed> {
        if !dir.join(STATE_FILE).is_file() {
            return Err(Error::MissingFile {
                dir: dir.to_path_buf(),
                file: STATE_FILE.into(),
                hint: "; resume from a checkpoint-<step> folder written by mfac-lab".into(),
            });
        }
        let path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io("reading", &path, e))?;
        let state: serde_json::Value = serde_json::from_str(&text)?;
        let ours = state.get(RESUME_KEY).ok_or_else(|| Error::Config {
            path: path.clone(),
            message: "no resume state (`mfac_lab`): not a checkpoint written by mfac-lab".into(),
        })?;
        let saved_fp = &ours["fingerprint"];
        if saved_fp != fp {
            let mut diffs = vec![];
            if let (Some(a), Some(b)) = (saved_fp.as_object(), fp.as_object()) {
                for (k, v) in b {
                    if a.get(k) != Some(v) {
                        diffs.push(format!(
                            "{k}: checkpoint {} vs now {v}",
                            a.get(k).cloned().unwrap_or_default()
                        ));
                    }
                }
            }
            return Err(Error::InvalidArgument(format!(
                "{} was written by a different run ({}); resume with the same model, data, optimizer and training flags",
                dir.display(),
                diffs.join("; ")
            )));
        }
        let bad = |m: String| Error::Config {
            path: path.clone(),
            message: m,
        };
        let step = ours["step"].as_u64().ok_or_else(|| bad("no step".into()))? as usize;
        let records: Vec<TrainRecord> = serde_json::from_value(ours["records"].clone())?;
        let evals: Vec<EvalRecord> = serde_json::from_value(ours["evals"].clone())?;
        let last_eval = ours["last_eval"].as_u64().map(|s| s as usize);
        let elapsed = ours["elapsed"].as_f64().unwrap_or(0.0);
        let eval_seconds = ours["eval_seconds"].as_f64().unwrap_or(0.0);
        let tensorboard_run = ours["tensorboard_run"].as_str().map(str::to_string);
        if records.len() != step {
            return Err(bad(format!(
                "{} step records for step {step}",
                records.len()
            )));
        }
        load_weights(&self.model, dir)?;
        stepper
            .optimizer_mut()
            .load_state(&dir.join(OPTIMIZER_FILE))?;
        let rng_path = dir.join(RNG_FILE);
        let rng_text =
            std::fs::read_to_string(&rng_path).map_err(|e| Error::io("reading", &rng_path, e))?;
        let rng = RngState::from_json(&serde_json::from_str(&rng_text)?).ok_or_else(|| {
            Error::Config {
                path: rng_path.clone(),
                message: "not a dropout stream state written by mfac-lab".into(),
            }
        })?;
        self.model.set_dropout_rng_state(&rng)?;
        Ok(Resumed {
            step,
            records,
            evals,
            last_eval,
            elapsed,
            eval_seconds,
            tensorboard_run,
        })
    }

    fn write_checkpoint(&self, dir: &Path, run: &Run) -> Result<()> {
        let elapsed = run.elapsed();
        let t0 = Instant::now();
        let written = checkpoint::write_checkpoint(dir, run.step, |tmp| {
            crate::model::save_model_files(&self.model, tmp)?;
            run.stepper
                .optimizer()
                .save_state(&tmp.join(OPTIMIZER_FILE))?;
            write_json_atomic(
                &tmp.join(RNG_FILE),
                &self.model.dropout_rng_state()?.to_json(),
            )?;
            let mut state = trainer_state(
                &self.cfg,
                &run.records,
                &run.eval_records,
                run.total,
                run.per_epoch,
                run.step,
            );
            state[RESUME_KEY] = serde_json::json!({
                "fingerprint": run.fingerprint,
                "step": run.step,
                "records": run.records,
                "evals": run.eval_records,
                "last_eval": run.last_eval,
                "elapsed": elapsed,
                "eval_seconds": run.eval_seconds,
                "tensorboard_run": run.tensorboard.as_ref().map(|t| &t.0),
            });
            write_json_atomic(&tmp.join(STATE_FILE), &state)
        })?;
        log::info!(
            "{} written in {:.2} s ({} bytes)",
            written.display(),
            t0.elapsed().as_secs_f64(),
            checkpoint::folder_bytes(&written)
        );
        checkpoint::rotate(dir, self.cfg.save_total_limit)
    }

    fn write_outputs(
        &self,
        dir: &Path,
        task: GlueTask,
        h: &RunHistory,
        total: usize,
        per_epoch: usize,
    ) -> Result<()> {
        self.model.save_pretrained(dir)?;
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
        write_json_atomic(&dir.join(RESULTS_FILE), &serde_json::Value::Object(results))?;
        let state = trainer_state(
            &self.cfg,
            &h.train,
            &h.evals,
            total,
            per_epoch,
            h.train.len(),
        );
        write_json_atomic(&dir.join(STATE_FILE), &state)
    }
}

/// What a checkpoint's trainer_state.json records for resuming.
/// One call of [`Trainer::fit`] in progress: its data, its sizes, its optimizer and what it has
/// recorded so far.
struct Run {
    task: GlueTask,
    train: EncodedSplit,
    evals: Vec<(String, EncodedSplit)>,
    total: usize,
    per_epoch: usize,
    /// What a resumed run must agree on (see `fingerprint`).
    fingerprint: serde_json::Value,
    stepper: Stepper,
    /// Steps done.
    step: usize,
    records: Vec<TrainRecord>,
    eval_records: Vec<EvalRecord>,
    last_eval: Option<usize>,
    last_checkpoint: Option<usize>,
    /// Seconds of the run before it was resumed.
    offset: f64,
    /// Seconds spent evaluating so far (across resumes).
    eval_seconds: f64,
    start: Instant,
    progress: Progress,
    /// Whether the process's resident peak was reset at the start (so it is this run's).
    peak_rss: bool,
    /// `--report_to tensorboard`: the run folder's name and its event writer.
    tensorboard: Option<(String, EventWriter)>,
}

impl Run {
    /// Seconds since the run's start (across resumes).
    fn elapsed(&self) -> f64 {
        self.offset + self.start.elapsed().as_secs_f64()
    }

    /// Epochs done, fractional.
    fn epoch(&self) -> f64 {
        self.step as f64 / self.per_epoch as f64
    }

    /// Counts a finished step: its record, the progress line and, every `logging_steps`,
    /// HF's log line.
    fn record(
        &mut self,
        rec: &crate::train::StepRecord,
        logging_steps: Option<usize>,
    ) -> Result<()> {
        self.step += 1;
        let (step, ep, now) = (self.step, self.epoch(), self.elapsed());
        self.records.push(TrainRecord {
            step,
            epoch: ep,
            loss: rec.loss,
            lr: rec.lr,
            grad_norm: rec.grad_norm,
            elapsed: now,
            train_seconds: now - self.eval_seconds,
            fwd_bwd_seconds: rec.fwd_bwd_seconds,
            optim_seconds: rec.optim_seconds,
        });
        self.progress
            .update(step, &format!("loss {:.4} · lr {:.2e}", rec.loss, rec.lr));
        if logging_steps.is_some_and(|n| step % n == 0) {
            self.progress.println(&format!(
                "{{'loss': {:.4}, 'grad_norm': {:.4}, 'learning_rate': {:.3e}, 'epoch': {ep:.2}}}",
                rec.loss, rec.grad_norm, rec.lr
            ));
        }
        if let Some((_, tb)) = &mut self.tensorboard {
            tb.scalars(
                step,
                &[
                    ("train/loss", rec.loss),
                    ("train/learning_rate", rec.lr),
                    ("train/grad_norm", rec.grad_norm),
                    ("train/epoch", ep),
                ],
            )?;
        }
        Ok(())
    }
}

/// HF's trainer_state.json: global step, epoch, log history.
fn trainer_state(
    cfg: &TrainConfig,
    train: &[TrainRecord],
    evals: &[EvalRecord],
    total: usize,
    per_epoch: usize,
    step: usize,
) -> serde_json::Value {
    let mut log = vec![];
    for r in train {
        log.push(serde_json::json!({"step": r.step, "epoch": r.epoch, "loss": r.loss, "learning_rate": r.lr, "grad_norm": r.grad_norm}));
    }
    for e in evals {
        let mut o = serde_json::json!({"step": e.step, "epoch": e.epoch, "split": e.split, "eval_loss": e.loss});
        for (m, v) in &e.metrics {
            o[format!("eval_{m}")] = (*v).into();
        }
        log.push(o);
    }
    serde_json::json!({
        "global_step": step,
        "max_steps": total,
        "epoch": step as f64 / per_epoch as f64,
        "num_train_epochs": cfg.num_train_epochs,
        "train_batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "optimizer": cfg.optimizer.name(),
        "optimizer_config": format!("{:?}", cfg.optimizer),
        "log_history": log,
    })
}
