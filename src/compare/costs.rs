//! What each optimizer's runs cost, side by side: seconds per step, the optimizer's share of a
//! step, peak memory, the optimizer state's bytes, and where the time went (a bar chart).

use polars::prelude::*;

use super::{df_err, Comparison};
use crate::error::Result;
use crate::plot::{Bar, Figure};
use crate::train::{human_bytes, RunCost};

/// One optimizer's cost, the mean over its finished runs ([`Comparison::costs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CostRow {
    /// The optimizer's label.
    pub optimizer: String,
    /// Its finished runs.
    pub runs: usize,
    /// Training seconds per step (evaluation excluded).
    pub seconds_per_step: Option<f64>,
    /// The optimizer's share of forward + backward + optimizer.
    pub optimizer_share: Option<f64>,
    /// Per run: seconds in forward + backward passes, in the optimizer, evaluating, and the
    /// rest of training (batching, logging, checkpoints).
    pub fwd_bwd_seconds: f64,
    /// See `fwd_bwd_seconds`.
    pub optim_seconds: f64,
    /// See `fwd_bwd_seconds`.
    pub eval_seconds: f64,
    /// See `fwd_bwd_seconds`.
    pub other_seconds: f64,
    /// Peak resident memory of the process while a run trained (the largest over runs).
    pub peak_rss_bytes: Option<u64>,
    /// The optimizer state's bytes.
    pub state_bytes: u64,
    /// Peak GPU memory in use (the largest over runs); `None` on the CPU.
    pub device_peak_bytes: Option<u64>,
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = v.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

impl Comparison {
    /// Per optimizer, what its runs cost: means over its runs of the seconds per step, the
    /// optimizer's share and each part's seconds; the largest peak memory; the state's bytes.
    ///
    /// ```
    /// use mfac_lab::compare::{Comparison, Run};
    /// use mfac_lab::train::{RunCost, RunHistory};
    /// let mut h = RunHistory::build("adamw", vec![], vec![])?;
    /// h.cost = RunCost { steps: 4, train_seconds: 2.0, fwd_bwd_seconds: 1.5, optim_seconds: 0.5,
    ///                    state_bytes: 64, ..Default::default() };
    /// let cmp = Comparison { runs: vec![Run { optimizer: "AdamW".into(), seed: 42, history: h }],
    ///     failures: vec![], metric: "accuracy".into(), source: "demo".into(), task: None, target: None };
    /// let row = &cmp.costs()[0];
    /// assert_eq!((row.seconds_per_step, row.optimizer_share), (Some(0.5), Some(0.25)));
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn costs(&self) -> Vec<CostRow> {
        self.optimizers()
            .into_iter()
            .map(|o| {
                let c: Vec<&RunCost> = self
                    .runs
                    .iter()
                    .filter(|r| r.optimizer == o)
                    .map(|r| &r.history.cost)
                    .collect();
                let max = |f: fn(&RunCost) -> Option<u64>| c.iter().filter_map(|x| f(x)).max();
                CostRow {
                    optimizer: o.clone(),
                    runs: c.len(),
                    seconds_per_step: mean(c.iter().filter_map(|x| x.seconds_per_step())),
                    optimizer_share: mean(c.iter().filter_map(|x| x.optimizer_share())),
                    fwd_bwd_seconds: mean(c.iter().map(|x| x.fwd_bwd_seconds)).unwrap_or(0.0),
                    optim_seconds: mean(c.iter().map(|x| x.optim_seconds)).unwrap_or(0.0),
                    eval_seconds: mean(c.iter().map(|x| x.eval_seconds)).unwrap_or(0.0),
                    other_seconds: mean(c.iter().map(|x| x.other_seconds())).unwrap_or(0.0),
                    peak_rss_bytes: max(|x| x.peak_rss_bytes),
                    state_bytes: c.iter().map(|x| x.state_bytes).max().unwrap_or(0),
                    device_peak_bytes: max(|x| x.device_peak_bytes),
                }
            })
            .collect()
    }

    /// [`Comparison::costs`] as a DataFrame (one row per optimizer; bytes as integers).
    pub fn costs_df(&self) -> Result<DataFrame> {
        let rows = self.costs();
        let col = |name: &str, f: &dyn Fn(&CostRow) -> Option<f64>| {
            Column::new(name.into(), rows.iter().map(f).collect::<Vec<_>>())
        };
        let bytes = |name: &str, f: &dyn Fn(&CostRow) -> Option<u64>| {
            Column::new(name.into(), rows.iter().map(f).collect::<Vec<_>>())
        };
        DataFrame::new_infer_height(vec![
            Column::new(
                "optimizer".into(),
                rows.iter().map(|r| r.optimizer.clone()).collect::<Vec<_>>(),
            ),
            Column::new(
                "runs".into(),
                rows.iter().map(|r| r.runs as u32).collect::<Vec<_>>(),
            ),
            col("seconds_per_step", &|r| r.seconds_per_step),
            col("optimizer_share", &|r| r.optimizer_share),
            col("fwd_bwd_seconds", &|r| Some(r.fwd_bwd_seconds)),
            col("optim_seconds", &|r| Some(r.optim_seconds)),
            col("eval_seconds", &|r| Some(r.eval_seconds)),
            col("other_seconds", &|r| Some(r.other_seconds)),
            bytes("peak_rss_bytes", &|r| r.peak_rss_bytes),
            bytes("state_bytes", &|r| Some(r.state_bytes)),
            bytes("device_peak_bytes", &|r| r.device_peak_bytes),
        ])
        .map_err(df_err)
    }

    /// The cost table in Markdown: s/step, the optimizer's share, peak memory, state bytes.
    pub fn costs_markdown(&self) -> String {
        let dash = || "–".to_string();
        let mut s = "Cost (mean over runs; memory: the largest):\n\n| optimizer | s/step | optimizer share of a step | peak resident memory | optimizer state | GPU peak |\n|---|---|---|---|---|---|\n".to_string();
        for r in self.costs() {
            s += &format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.optimizer,
                r.seconds_per_step.map_or_else(dash, |v| format!("{v:.3}")),
                r.optimizer_share
                    .map_or_else(dash, |v| format!("{:.0} %", 100.0 * v)),
                r.peak_rss_bytes.map_or_else(dash, human_bytes),
                human_bytes(r.state_bytes),
                r.device_peak_bytes.map_or_else(dash, human_bytes),
            );
        }
        s
    }

    /// Where each optimizer's time went, per run (mean over its runs): forward + backward, the
    /// optimizer, evaluation and the rest — one group of bars per optimizer.
    pub fn plot_time_breakdown(&self) -> Figure {
        let mut bars = vec![];
        for r in self.costs() {
            for (i, (name, v)) in [
                ("forward + backward", r.fwd_bwd_seconds),
                ("optimizer", r.optim_seconds),
                ("evaluation", r.eval_seconds),
                ("other (batching, logging, checkpoints)", r.other_seconds),
            ]
            .into_iter()
            .enumerate()
            {
                bars.push(Bar {
                    group: r.optimizer.clone(),
                    name: name.into(),
                    value: v,
                    err: 0.0,
                    color: i,
                });
            }
        }
        Figure::bars(
            "Where the time went (seconds per run, mean over seeds)",
            "seconds",
            bars,
        )
    }
}
