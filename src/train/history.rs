//! What a run recorded: every training step and evaluation, as records and as a long polars
//! DataFrame, with its plots.

use polars::prelude::*;

use crate::error::{Error, Result};
use crate::plot::{smooth, Figure, Series};
use crate::train::cost::RunCost;

/// One logged training step.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// Training seconds since the start, evaluation excluded (AlgoPerf's clock): what time
    /// axes and time to target use. 0 in histories written before it existed.
    #[serde(default)]
    pub train_seconds: f64,
    /// Seconds of this step's forward and backward pass (0 in histories written before).
    #[serde(default)]
    pub fwd_bwd_seconds: f64,
    /// Seconds of this step's update: clipping and the optimizer's step (0 in histories
    /// written before).
    #[serde(default)]
    pub optim_seconds: f64,
}

/// One evaluation of one split.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// Training seconds before this evaluation (evaluation excluded).
    #[serde(default)]
    pub train_seconds: f64,
}

/// What a run produced, with its history as a polars DataFrame.
#[derive(Debug, Clone)]
pub struct RunHistory {
    /// The optimizer's kind: `adamw`, `mfac` or `sgd`.
    pub optimizer: String,
    /// Every training step.
    pub train: Vec<TrainRecord>,
    /// Every evaluation.
    pub evals: Vec<EvalRecord>,
    /// Long format: step, epoch, kind ("train" | "eval"), loss, lr, grad_norm, split, metric,
    /// value, elapsed, train_seconds, fwd_bwd_seconds, optim_seconds (nulls where a column
    /// does not apply).
    pub df: DataFrame,
    /// What the run cost: time per part, memory. [`RunHistory::build`] sums the steps' times;
    /// the trainer adds evaluation time and memory.
    pub cost: RunCost,
}

impl RunHistory {
    /// A history from its records (what [`crate::train::Trainer::fit`] returns; also for
    /// hand-made histories in tests and notebooks): the long-format DataFrame is built from them.
    ///
    /// ```
    /// use mfac_lab::train::{EvalRecord, RunHistory};
    /// let e = EvalRecord { step: 1, epoch: 1.0, split: "validation".into(), loss: 0.7,
    ///                      metrics: vec![("accuracy".into(), 0.5)], elapsed: 0.1, train_seconds: 0.1 };
    /// let h = RunHistory::build("sgd", vec![], vec![e])?;
    /// assert_eq!(h.final_metric("validation", "accuracy"), Some(0.5));
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn build(optimizer: &str, train: Vec<TrainRecord>, evals: Vec<EvalRecord>) -> Result<Self> {
        let (mut step, mut epoch, mut kind, mut loss, mut lr, mut gn) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut split, mut metric, mut value, mut elapsed) = (vec![], vec![], vec![], vec![]);
        let mut train_seconds = vec![];
        let (mut fwd_bwd, mut optim) = (vec![], vec![]);
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
            train_seconds.push(r.train_seconds);
            fwd_bwd.push(Some(r.fwd_bwd_seconds));
            optim.push(Some(r.optim_seconds));
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
                train_seconds.push(e.train_seconds);
                fwd_bwd.push(None::<f64>);
                optim.push(None::<f64>);
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
            Column::new("train_seconds".into(), train_seconds),
            Column::new("fwd_bwd_seconds".into(), fwd_bwd),
            Column::new("optim_seconds".into(), optim),
        ])
        .map_err(|e| Error::Data {
            source_name: "history".into(),
            message: e.to_string(),
        })?;
        let cost = RunCost {
            steps: train.last().map_or(0, |r| r.step),
            train_seconds: train.last().map_or(0.0, |r| r.train_seconds),
            fwd_bwd_seconds: train.iter().map(|r| r.fwd_bwd_seconds).sum(),
            optim_seconds: train.iter().map(|r| r.optim_seconds).sum(),
            ..RunCost::default()
        };
        Ok(RunHistory {
            optimizer: optimizer.into(),
            train,
            evals,
            df,
            cost,
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

    /// The first evaluation on `split` whose `metric` is at least `target`: its step and the
    /// run's training seconds then (`EvalRecord::train_seconds`, evaluation excluded); `None`
    /// when no evaluation reached it.
    ///
    /// ```
    /// use mfac_lab::train::{EvalRecord, RunHistory};
    /// let e = |step, acc| EvalRecord { step, epoch: 0.0, split: "validation".into(), loss: 0.0,
    ///     metrics: vec![("accuracy".into(), acc)], elapsed: 0.0, train_seconds: step as f64 / 10.0 };
    /// let h = RunHistory::build("adamw", vec![], vec![e(10, 0.5), e(20, 0.7), e(30, 0.6)])?;
    /// assert_eq!(h.reached("validation", "accuracy", 0.65), Some((20, 2.0)));
    /// assert_eq!(h.reached("validation", "accuracy", 0.8), None);
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn reached(&self, split: &str, metric: &str, target: f64) -> Option<(usize, f64)> {
        self.evals
            .iter()
            .filter(|e| e.split == split)
            .find(|e| e.metrics.iter().any(|(m, v)| m == metric && *v >= target))
            .map(|e| (e.step, e.train_seconds))
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
