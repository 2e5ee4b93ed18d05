//! The GLUE tasks: their text columns, labels, metrics and evaluation splits.

use crate::error::{Error, Result};

/// A GLUE task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GlueTask {
    /// Multi-genre NLI (3 labels), evaluated on validation_matched and validation_mismatched.
    Mnli,
    /// Question NLI.
    Qnli,
    /// Quora question pairs.
    Qqp,
    /// Stanford sentiment (single sentence).
    Sst2,
    /// Recognising textual entailment.
    Rte,
    /// Microsoft paraphrase corpus.
    Mrpc,
    /// Linguistic acceptability (single sentence).
    Cola,
    /// Semantic textual similarity (regression).
    Stsb,
    /// Winograd NLI.
    Wnli,
}

/// How a task is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Fraction of correct labels.
    Accuracy,
    /// F1 of the positive class.
    F1,
    /// Matthews correlation.
    Matthews,
    /// Pearson correlation (regression).
    Pearson,
    /// Spearman rank correlation (regression).
    Spearman,
}

impl Metric {
    /// HF's name for the metric (`eval_<name>` in eval_results.json).
    pub fn name(&self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::F1 => "f1",
            Metric::Matthews => "matthews_correlation",
            Metric::Pearson => "pearson",
            Metric::Spearman => "spearmanr",
        }
    }
}

/// Every task, in GLUE's order.
pub const ALL_TASKS: [GlueTask; 9] = [
    GlueTask::Cola,
    GlueTask::Sst2,
    GlueTask::Mrpc,
    GlueTask::Qqp,
    GlueTask::Stsb,
    GlueTask::Mnli,
    GlueTask::Qnli,
    GlueTask::Rte,
    GlueTask::Wnli,
];

impl GlueTask {
    /// Parses run_glue's `--task_name`.
    ///
    /// ```
    /// use mfac_lab::data::GlueTask;
    /// assert_eq!(GlueTask::parse("MNLI").unwrap(), GlueTask::Mnli);
    /// assert!(GlueTask::parse("squad").unwrap_err().to_string().contains("mnli"));
    /// ```
    pub fn parse(name: &str) -> Result<Self> {
        let n = name.trim().to_ascii_lowercase().replace('-', "");
        ALL_TASKS
            .iter()
            .copied()
            .find(|t| t.name() == n)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown GLUE task {name:?}; one of: {}",
                    ALL_TASKS
                        .iter()
                        .map(|t| t.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// The config name on the hub (`nyu-mll/glue/<name>/…`).
    pub fn name(&self) -> &'static str {
        match self {
            GlueTask::Mnli => "mnli",
            GlueTask::Qnli => "qnli",
            GlueTask::Qqp => "qqp",
            GlueTask::Sst2 => "sst2",
            GlueTask::Rte => "rte",
            GlueTask::Mrpc => "mrpc",
            GlueTask::Cola => "cola",
            GlueTask::Stsb => "stsb",
            GlueTask::Wnli => "wnli",
        }
    }

    /// The text columns: (first, second) — the second is `None` for single-sentence tasks.
    pub fn text_columns(&self) -> (&'static str, Option<&'static str>) {
        match self {
            GlueTask::Mnli => ("premise", Some("hypothesis")),
            GlueTask::Qnli => ("question", Some("sentence")),
            GlueTask::Qqp => ("question1", Some("question2")),
            GlueTask::Sst2 | GlueTask::Cola => ("sentence", None),
            GlueTask::Rte | GlueTask::Mrpc | GlueTask::Stsb | GlueTask::Wnli => {
                ("sentence1", Some("sentence2"))
            }
        }
    }

    /// Number of classes; 1 for the regression task (stsb).
    pub fn num_labels(&self) -> usize {
        match self {
            GlueTask::Mnli => 3,
            GlueTask::Stsb => 1,
            _ => 2,
        }
    }

    /// Whether the label is a real number (stsb).
    pub fn is_regression(&self) -> bool {
        matches!(self, GlueTask::Stsb)
    }

    /// Metrics reported, as run_glue does (the first is the main one).
    pub fn metrics(&self) -> &'static [Metric] {
        match self {
            GlueTask::Mrpc | GlueTask::Qqp => &[Metric::Accuracy, Metric::F1],
            GlueTask::Cola => &[Metric::Matthews],
            GlueTask::Stsb => &[Metric::Pearson, Metric::Spearman],
            _ => &[Metric::Accuracy],
        }
    }

    /// Evaluation splits: mnli has two.
    pub fn eval_splits(&self) -> &'static [&'static str] {
        match self {
            GlueTask::Mnli => &["validation_matched", "validation_mismatched"],
            _ => &["validation"],
        }
    }

    /// Label names by id (`id2label`).
    pub fn label_names(&self) -> Vec<&'static str> {
        match self {
            GlueTask::Mnli => vec!["entailment", "neutral", "contradiction"],
            GlueTask::Qnli | GlueTask::Rte => vec!["entailment", "not_entailment"],
            GlueTask::Qqp => vec!["not_duplicate", "duplicate"],
            GlueTask::Mrpc => vec!["not_equivalent", "equivalent"],
            GlueTask::Sst2 => vec!["negative", "positive"],
            GlueTask::Cola => vec!["unacceptable", "acceptable"],
            GlueTask::Wnli => vec!["not_entailment", "entailment"],
            GlueTask::Stsb => vec!["score"],
        }
    }
}
