//! The M-FAC authors' model cards (the `M-FAC/bert-tiny-finetuned-*` and
//! `M-FAC/bert-mini-finetuned-*` repos on the hub) as data: for each GLUE task and model, the
//! window (num_grads), the epochs, and the dev-set numbers of HF's default AdamW and of M-FAC,
//! with the ± the card gives (std over 5 runs) and none where it gives none.
//!
//! Both cards' recipe: HF's `run_glue.py`, lr 1e-4, damp 1e-6, batch 32, max_seq_length 128,
//! 5 epochs unless said otherwise. The cards also cover SQuAD v2, which is not a GLUE task: not
//! here yet.

use crate::data::GlueTask;
use crate::error::{Error, Result};
use crate::optim::{MFacConfig, OptimizerSpec, CARD_LR};
use crate::train::TrainConfig;

/// prajjwal1/bert-mini: the other model the cards cover.
pub const BERT_MINI_REPO: &str = "prajjwal1/bert-mini";

/// One number of a card, in percent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CardValue {
    /// The mean over the card's runs (or its one reported value).
    pub value: f64,
    /// The std over the card's 5 runs, where the card gives one.
    pub std: Option<f64>,
}

impl CardValue {
    /// How many runs the number is over, where the card says (5 with a ±).
    pub fn runs(&self) -> Option<u32> {
        self.std.map(|_| 5)
    }

    /// `65.36 ± 0.13` or `77.58` (never an invented ±).
    pub fn text(&self) -> String {
        match self.std {
            Some(sd) => format!("{:.2} ± {:.2}", self.value, sd),
            None => format!("{:.2}", self.value),
        }
    }
}

/// One metric of a card: the eval split, the metric (our names: `accuracy`, `f1`, `pearson`,
/// `spearmanr`), AdamW's number (where the card has one) and M-FAC's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CardMetric {
    /// The eval split (`validation_matched`, `validation`, …).
    pub split: &'static str,
    /// The metric, as our summaries name it.
    pub metric: &'static str,
    /// HF's default AdamW.
    pub adam: Option<CardValue>,
    /// M-FAC (lr 1e-4, damp 1e-6, the card's num_grads).
    pub mfac: CardValue,
}

/// One model card.
#[derive(Debug, Clone, PartialEq)]
pub struct Card {
    /// The task.
    pub task: GlueTask,
    /// The model's hub id.
    pub model: &'static str,
    /// M-FAC's window.
    pub num_grads: usize,
    /// Training epochs.
    pub epochs: f64,
    /// Its numbers.
    pub metrics: Vec<CardMetric>,
}

const fn v(value: f64, std: f64) -> CardValue {
    CardValue {
        value,
        std: Some(std),
    }
}

const fn n(value: f64) -> CardValue {
    CardValue { value, std: None }
}

fn m(
    split: &'static str,
    metric: &'static str,
    adam: Option<CardValue>,
    mfac: CardValue,
) -> CardMetric {
    CardMetric {
        split,
        metric,
        adam,
        mfac,
    }
}

/// Every card, as the issue that brought them in lists them (bert-tiny's MNLI M-FAC best run:
/// 69.55 / 70.58, not in this table).
pub fn all_cards() -> Vec<Card> {
    use crate::model::BERT_TINY_REPO as TINY;
    use GlueTask::*;
    const MINI: &str = BERT_MINI_REPO;
    let (vm, vmm, val) = ("validation_matched", "validation_mismatched", "validation");
    let card = |task, model, num_grads, epochs, metrics| Card {
        task,
        model,
        num_grads,
        epochs,
        metrics,
    };
    vec![
        card(
            Mnli,
            TINY,
            1024,
            5.0,
            vec![
                m(vm, "accuracy", Some(v(65.36, 0.13)), v(68.28, 3.29)),
                m(vmm, "accuracy", Some(v(66.78, 0.15)), v(68.98, 3.05)),
            ],
        ),
        card(
            Mnli,
            MINI,
            1024,
            5.0,
            vec![
                m(vm, "accuracy", Some(v(73.30, 0.20)), v(74.59, 0.41)),
                m(vmm, "accuracy", Some(v(74.85, 0.09)), v(75.95, 0.14)),
            ],
        ),
        card(
            Qqp,
            TINY,
            1024,
            5.0,
            vec![
                m(val, "f1", Some(n(77.58)), n(79.71)),
                m(val, "accuracy", Some(n(81.09)), n(84.29)),
            ],
        ),
        card(
            Qqp,
            MINI,
            1024,
            5.0,
            vec![
                m(val, "f1", Some(n(82.43)), n(82.67)),
                m(val, "accuracy", Some(n(86.45)), n(86.75)),
            ],
        ),
        card(
            Qnli,
            TINY,
            1024,
            5.0,
            vec![m(val, "accuracy", Some(v(77.85, 0.15)), v(81.17, 0.43))],
        ),
        card(
            Qnli,
            MINI,
            1024,
            5.0,
            vec![m(val, "accuracy", Some(v(83.85, 0.10)), v(83.70, 0.13))],
        ),
        card(
            Mrpc,
            TINY,
            512,
            5.0,
            vec![
                m(val, "f1", Some(n(81.68)), n(82.77)),
                m(val, "accuracy", Some(n(69.90)), n(72.94)),
            ],
        ),
        card(
            Mrpc,
            MINI,
            512,
            5.0,
            vec![
                m(val, "f1", Some(n(84.57)), v(85.06, 1.63)),
                m(val, "accuracy", Some(n(76.57)), v(78.87, 2.33)),
            ],
        ),
        card(
            Stsb,
            TINY,
            512,
            5.0,
            vec![
                m(val, "pearson", Some(v(64.39, 5.02)), n(80.15)),
                m(val, "spearmanr", Some(n(66.52)), n(80.62)),
            ],
        ),
        card(
            Stsb,
            MINI,
            512,
            5.0,
            vec![
                m(val, "pearson", Some(n(82.09)), n(84.66)),
                m(val, "spearmanr", Some(n(82.64)), n(84.65)),
            ],
        ),
        card(
            Sst2,
            MINI,
            1024,
            3.0,
            vec![m(val, "accuracy", Some(v(85.46, 0.58)), v(84.20, 0.58))],
        ),
    ]
}

/// The card of `task` for `model` (a hub id; a local folder named like one of the cards' models
/// does not count), if the authors published one.
///
/// ```
/// use mfac_lab::cards::card_for;
/// use mfac_lab::data::GlueTask;
/// let c = card_for(GlueTask::Mnli, "prajjwal1/bert-tiny").unwrap();
/// assert_eq!((c.num_grads, c.metrics[0].mfac.text()), (1024, "68.28 ± 3.29".to_string()));
/// assert!(card_for(GlueTask::Sst2, "prajjwal1/bert-tiny").is_none()); // no such card
/// assert!(card_for(GlueTask::Mnli, "randomly initialised BERT (seeded)").is_none());
/// ```
pub fn card_for(task: GlueTask, model: &str) -> Option<Card> {
    all_cards()
        .into_iter()
        .find(|c| c.task == task && c.model == model)
}

/// The card of `task` (a GLUE task name, or `squad_v2`) for `model` (`bert-tiny`, `bert-mini`
/// or their hub ids), with an error that names what exists when there is none.
///
/// ```
/// use mfac_lab::cards::find;
/// assert_eq!(find("mrpc", "bert-mini").unwrap().num_grads, 512);
/// assert!(find("squad_v2", "bert-tiny").unwrap_err().to_string().contains("not supported yet"));
/// assert!(find("sst2", "bert-tiny").unwrap_err().to_string().contains("bert-mini"));
/// ```
pub fn find(task: &str, model: &str) -> Result<Card> {
    let t = task.trim().to_ascii_lowercase();
    if t == "squad_v2" || t == "squad" {
        return Err(Error::InvalidArgument(
            concat!(
                "the cards' SQuAD v2 runs are not supported yet: SQuAD is question answering, ",
                "not a GLUE task (mfac-lab trains sequence classification); use --task mnli, ",
                "qqp, qnli, mrpc, stsb or sst2"
            )
            .into(),
        ));
    }
    let task = GlueTask::parse(&t)?;
    let model = match model.trim() {
        "bert-tiny" => crate::model::BERT_TINY_REPO,
        "bert-mini" => BERT_MINI_REPO,
        other => other,
    };
    card_for(task, model).ok_or_else(|| {
        let have: Vec<String> = all_cards()
            .iter()
            .filter(|c| c.task == task)
            .map(|c| c.model.to_string())
            .collect();
        Error::InvalidArgument(format!(
            "the M-FAC authors published no card for {model} on {}{}",
            task.name(),
            if have.is_empty() {
                " (cards exist for mnli, qqp, qnli, mrpc, stsb and sst2)".to_string()
            } else {
                format!(": there is one for {}", have.join(", "))
            }
        ))
    })
}

/// The card's recipe for `compare`: HF's default AdamW at lr 1e-4 and M-FAC at lr 1e-4, damp
/// 1e-6 with the card's num_grads; run_glue's batch 32, max_seq_length 128, the card's epochs.
///
/// ```
/// use mfac_lab::cards::{find, recipe};
/// let (specs, train) = recipe(&find("mnli", "bert-tiny").unwrap());
/// assert_eq!(specs[1].display_name(), "M-FAC m=1024");
/// assert_eq!((train.batch_size, train.max_seq_length, train.num_train_epochs), (32, 128, 5.0));
/// ```
pub fn recipe(card: &Card) -> (Vec<OptimizerSpec>, TrainConfig) {
    let specs = vec![
        OptimizerSpec::adamw(CARD_LR),
        OptimizerSpec::mfac(MFacConfig {
            lr: CARD_LR,
            num_grads: card.num_grads,
            damp: 1e-6,
            ..MFacConfig::default()
        }),
    ];
    let train = TrainConfig {
        num_train_epochs: card.epochs,
        ..TrainConfig::run_glue()
    };
    (specs, train)
}

/// The card's recipe ([`recipe`]) with M-FAC's window made sparse at `density` (`None`: the
/// card's dense window). The density is checked as `--optim_args` checks it.
///
/// ```
/// use mfac_lab::cards::{find, recipe_with_density};
/// let card = find("mnli", "bert-tiny").unwrap();
/// let (specs, _) = recipe_with_density(&card, Some(0.01)).unwrap();
/// assert_eq!(specs[1].display_name(), "M-FAC m=1024 1%");
/// assert!(recipe_with_density(&card, Some(0.0)).unwrap_err().to_string().contains("density"));
/// ```
pub fn recipe_with_density(
    card: &Card,
    density: Option<f64>,
) -> crate::Result<(Vec<OptimizerSpec>, TrainConfig)> {
    let (mut specs, train) = recipe(card);
    if let Some(rho) = density {
        let cfg = match specs[1].kind() {
            crate::optim::OptimKind::MFac(c) => c.with_density(rho),
            _ => unreachable!("the recipe's second optimizer is M-FAC"),
        };
        cfg.validate()?;
        specs[1] = OptimizerSpec::mfac(cfg);
    }
    Ok((specs, train))
}

/// What the card's recipe run with the sparse window says beside the card: which window, and
/// the memory it needs for bert-tiny against the card's dense one.
pub fn sparse_note(specs: &[OptimizerSpec]) -> Option<String> {
    let cfg = specs.iter().find_map(|s| match s.kind() {
        crate::optim::OptimKind::MFac(c) if c.is_sparse() => Some(*c),
        _ => None,
    })?;
    let d = 4_386_307; // bert-tiny with a 3-way head
    let dense = MFacConfig {
        density: 1.0,
        block_size: None,
        ..cfg
    };
    Some(format!(
        "Not the card's window: {} keeps the top {} of an error-feedback accumulator in each of its {} rows (Sparse M-FAC, Modoranu et al., ICML 2024), {:.2} GB of optimizer state for bert-tiny where the card's dense window needs {:.1} GB.",
        specs
            .iter()
            .find(|s| matches!(s.kind(), crate::optim::OptimKind::MFac(c) if c.is_sparse()))
            .map(|s| s.display_name())
            .unwrap_or_default(),
        cfg.density_percent(),
        cfg.num_grads,
        cfg.host_bytes(d) as f64 / 1e9,
        dense.host_bytes(d) as f64 / 1e9,
    ))
}

/// The card as a Markdown table (one row per optimizer, one column per metric), with where it
/// comes from.
pub fn card_markdown(card: &Card) -> String {
    let heads: Vec<String> = card
        .metrics
        .iter()
        .map(|x| format!("{} {}", x.split, x.metric))
        .collect();
    let row = |name: &str, cells: Vec<String>| format!("| {name} | {} |\n", cells.join(" | "));
    let mut s = format!(
        "Model card ({} on {}, M-FAC num_grads {}, {} epochs; ± = std over 5 runs where the card gives it):\n\n| optimizer | {} |\n|---|{}\n",
        card.model,
        card.task.name(),
        card.num_grads,
        card.epochs,
        heads.join(" | "),
        "---|".repeat(heads.len())
    );
    s += &row(
        "AdamW (card)",
        card.metrics
            .iter()
            .map(|x| x.adam.map(|a| a.text()).unwrap_or_else(|| "–".into()))
            .collect(),
    );
    s += &row(
        "M-FAC (card)",
        card.metrics.iter().map(|x| x.mfac.text()).collect(),
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_card_names_its_tasks_metrics_and_splits() {
        for c in all_cards() {
            for x in &c.metrics {
                assert!(c.task.eval_splits().contains(&x.split), "{c:?}");
                assert!(
                    c.task.metrics().iter().any(|m| m.name() == x.metric),
                    "{:?} has no metric {}",
                    c.task,
                    x.metric
                );
            }
        }
        // The numbers the issue gives, spot-checked, with and without ±.
        let mini_mrpc = card_for(GlueTask::Mrpc, BERT_MINI_REPO).unwrap();
        assert_eq!(mini_mrpc.num_grads, 512);
        assert_eq!(mini_mrpc.metrics[1].mfac, v(78.87, 2.33));
        assert_eq!(mini_mrpc.metrics[1].adam.unwrap().std, None);
        assert_eq!(mini_mrpc.metrics[1].adam.unwrap().runs(), None);
        assert_eq!(mini_mrpc.metrics[1].mfac.runs(), Some(5));
        let sst2 = card_for(GlueTask::Sst2, BERT_MINI_REPO).unwrap();
        assert_eq!(sst2.epochs, 3.0);
        assert_eq!(all_cards().len(), 11);
    }
}
