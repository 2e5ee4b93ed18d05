//! The command line, parsed by clap: `mfac-lab compare`, `glue` (run_glue's flags, with their
//! underscore names) and `info`. Every flag has `--help` text, a mistyped flag gets a suggestion,
//! every number is checked (finite, in range) before anything runs, and every accepted flag does
//! something.

use std::path::PathBuf;

use candle_core::DType;
use clap::{Args, Parser, Subcommand};

use crate::error::{Error, Result};
use crate::optim::OptimizerSpec;
use crate::train::{ReportTo, Schedule, TrainConfig};

/// `mfac-lab`: fine-tune BERT-tiny with M-FAC vs Adam (candle).
#[derive(Debug, Parser)]
#[command(
    name = "mfac-lab",
    version,
    about = "Fine-tune BERT-tiny on GLUE/MNLI with the M-FAC second-order optimizer and compare it with Adam",
    after_help = "Environment: HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1 (cache only), \
                  HF_TOKEN; RUST_LOG=info|debug for more messages."
)]
pub struct Cli {
    /// What to do (no command: this help).
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Adam vs M-FAC: trains each optimizer with each seed, prints the summary (mean ± std) and
    /// writes history, summary and plots. With no flags: an offline demo on the embedded real
    /// MNLI sample and a random bert-tiny.
    Compare(CompareFlags),
    /// Train and/or evaluate like HF's run_glue.py (its flag names).
    Glue(GlueFlags),
    /// Run a model card's experiment (the M-FAC authors' recipe for a task and model) through
    /// `compare`, and print the card beside the results.
    Card(CardFlags),
    /// Load a model (local HF folder or hub id) and describe it.
    Info {
        /// Local HF folder or hub id.
        #[arg(default_value = crate::model::BERT_TINY_REPO)]
        model: String,
    },
}

/// A number that must be finite and ≥ 0.
fn finite(s: &str) -> std::result::Result<f64, String> {
    let x: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !x.is_finite() || x < 0.0 {
        return Err(format!("{s:?} must be a finite number ≥ 0"));
    }
    Ok(x)
}

/// A whole number ≥ 1.
fn positive(s: &str) -> std::result::Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{s:?} must be a whole number ≥ 1")),
    }
}

/// `mfac-lab glue` flags, as clap reads them (see [`GlueArgs`] for the checked result). As with
/// run_glue's argparse, a flag given twice takes its last value.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case", args_override_self = true)]
pub struct GlueFlags {
    /// Hub id or local HF-layout folder.
    #[arg(long, default_value = crate::model::BERT_TINY_REPO)]
    pub model_name_or_path: String,
    /// GLUE task: mnli, qnli, qqp, sst2, cola, rte, mrpc, stsb, wnli.
    #[arg(long, default_value = "mnli")]
    pub task_name: String,
    /// Train (evaluating at each epoch end and every --eval_steps).
    #[arg(long)]
    pub do_train: bool,
    /// Evaluate: alone, the model as loaded; with --do_train, training evaluates at each epoch
    /// end (and every --eval_steps) in any case, as run_glue with an evaluation strategy does.
    #[arg(long)]
    pub do_eval: bool,
    /// Truncation length of the pairs.
    #[arg(long, default_value = "128", value_parser = positive)]
    pub max_seq_length: usize,
    /// Training batch size.
    #[arg(long, default_value = "8", value_parser = positive)]
    pub per_device_train_batch_size: usize,
    /// Evaluation batch size.
    #[arg(long, default_value = "64", value_parser = positive)]
    pub per_device_eval_batch_size: usize,
    /// Peak learning rate (an `lr` in --optim_args wins over it).
    #[arg(long, default_value = "5e-5", value_parser = finite, allow_negative_numbers = true)]
    pub learning_rate: f64,
    /// Weight decay of AdamW (decoupled) and SGD (added to the gradient), biases and LayerNorm
    /// excluded; M-FAC takes `weight_decay` in --optim_args.
    #[arg(long, default_value = "0", value_parser = finite, allow_negative_numbers = true)]
    pub weight_decay: f64,
    /// Epochs (may be fractional).
    #[arg(long, default_value = "3", value_parser = finite, allow_negative_numbers = true)]
    pub num_train_epochs: f64,
    /// Stop after N optimizer steps (overrides the epochs; the schedule decays over N).
    #[arg(long, value_parser = positive)]
    pub max_steps: Option<usize>,
    /// Use only the first N training rows.
    #[arg(long, value_parser = positive)]
    pub max_train_samples: Option<usize>,
    /// Use only the first N rows of each eval split.
    #[arg(long, value_parser = positive)]
    pub max_eval_samples: Option<usize>,
    /// Also evaluate (and checkpoint) every N steps.
    #[arg(long, value_parser = positive)]
    pub eval_steps: Option<usize>,
    /// Print the loss, learning rate and gradient norm every N steps.
    #[arg(long, value_parser = positive)]
    pub logging_steps: Option<usize>,
    /// Gradient clipping norm (0 turns clipping off).
    #[arg(long, default_value = "1", value_parser = finite, allow_negative_numbers = true)]
    pub max_grad_norm: f64,
    /// Learning-rate schedule.
    #[arg(long, default_value = "linear", value_parser = ["linear", "constant"])]
    pub lr_scheduler_type: String,
    /// Seed of data order, dropout and a new head.
    #[arg(long, default_value = "42")]
    pub seed: u64,
    /// Where the model, results and checkpoints go.
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    /// Train into an output folder that holds other files (only mfac-lab's files are replaced),
    /// or start over in one that holds checkpoints (they are removed).
    #[arg(long)]
    pub overwrite_output_dir: bool,
    /// Continue exactly from a checkpoint folder; without DIR, the newest in --output_dir.
    #[arg(long, value_name = "DIR", num_args = 0..=1)]
    pub resume_from_checkpoint: Option<Option<PathBuf>>,
    /// Also write a checkpoint every N steps.
    #[arg(long, value_parser = positive)]
    pub save_steps: Option<usize>,
    /// Keep only the K newest checkpoints.
    #[arg(long, value_parser = positive)]
    pub save_total_limit: Option<usize>,
    /// Optimizer: adamw_torch (also adamw, adamw_hf, adamw_torch_fused), MFAC or sgd.
    #[arg(long, default_value = "adamw_torch")]
    pub optim: String,
    /// Optimizer options: `key: value, …`, `key=value,…` or JSON, e.g.
    /// "lr: 1e-4, num_grads: 1024, damp: 1e-6".
    #[arg(long, default_value = "")]
    pub optim_args: String,
    /// Where to train.
    #[arg(long, default_value = "auto", value_parser = ["cpu", "cuda", "auto"])]
    pub device: String,
    /// Parameter dtype.
    #[arg(long, default_value = "f32", value_parser = ["f32", "float32", "f64", "float64"])]
    pub dtype: String,
    /// A local folder with the task's parquet/TSV files instead of the hub.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Pad every batch to --max_seq_length (run_glue's default) instead of the longest pair.
    #[arg(long)]
    pub pad_to_max_length: bool,
    /// Also write the logs for: `none` or `tensorboard` (event files under the output
    /// folder's runs/; `tensorboard --logdir <output_dir>`).
    #[arg(long, default_value = "none")]
    pub report_to: String,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

/// `mfac-lab glue`, checked: the model, data and device flags, and the whole training config
/// with its optimizer.
#[derive(Debug, Clone, PartialEq)]
pub struct GlueArgs {
    /// `--model_name_or_path`: hub id or local HF folder.
    pub model_name_or_path: String,
    /// `--task_name`.
    pub task_name: String,
    /// `--do_train`.
    pub do_train: bool,
    /// `--do_eval`.
    pub do_eval: bool,
    /// `--output_dir`.
    pub output_dir: Option<PathBuf>,
    /// `--data_dir`: a local folder with the task's parquet/TSV files instead of the hub.
    pub data_dir: Option<PathBuf>,
    /// `--device cpu|cuda|auto`.
    pub device: String,
    /// `--dtype f32|f64`: the model's parameter dtype.
    pub dtype: DType,
    /// `--resume_from_checkpoint [DIR]`: `Some(None)` = the newest checkpoint in `--output_dir`.
    pub resume_from_checkpoint: Option<Option<PathBuf>>,
    /// Everything else, with the optimizer (`--optim`, `--optim_args`, `--learning_rate`,
    /// `--weight_decay`) in `train.optimizer`.
    pub train: TrainConfig,
}

fn bad(flag: &str, msg: impl std::fmt::Display) -> Error {
    Error::InvalidArgument(format!("{flag}: {msg}"))
}

/// The device for `--device cpu|cuda|auto`: `auto` = CUDA when built with it and a GPU is
/// there; `cuda` without either is an error.
pub fn select_device(name: &str) -> Result<candle_core::Device> {
    match name {
        "cpu" => Ok(candle_core::Device::Cpu),
        "auto" => Ok(crate::model::best_device()),
        "cuda" => candle_core::Device::new_cuda(0).map_err(|e| {
            Error::InvalidArgument(format!(
                "--device cuda: {e} (build with `--features cuda` on a machine with an NVIDIA GPU, or use --device cpu)"
            ))
        }),
        other => Err(bad("--device", format!("{other:?}: use cpu, cuda or auto"))),
    }
}

/// Parses `args` (without the program and subcommand names) as the flags of `cmd`; clap's
/// message (with its suggestion for a mistyped flag) becomes the error.
fn parse_flags<T: clap::FromArgMatches + Args, S: AsRef<str>>(
    cmd: &'static str,
    args: &[S],
) -> Result<T> {
    let command = T::augment_args(clap::Command::new(cmd).bin_name(format!("mfac-lab {cmd}")));
    let matches = command
        .try_get_matches_from(
            std::iter::once(cmd.to_string()).chain(args.iter().map(|a| a.as_ref().to_string())),
        )
        .map_err(|e| Error::InvalidArgument(e.render().to_string().trim().to_string()))?;
    T::from_arg_matches(&matches).map_err(|e| Error::InvalidArgument(e.to_string()))
}

impl GlueArgs {
    /// Parses the arguments after `glue` (`--flag value` or `--flag=value`).
    ///
    /// ```
    /// let a = mfac_lab::cli::GlueArgs::parse(&["--task_name", "mnli", "--optim", "MFAC",
    ///     "--optim_args", "lr: 1e-4, num_grads: 1024, damp: 1e-6"]).unwrap();
    /// assert_eq!(a.train.optimizer.name(), "mfac");
    /// // A mistyped flag gets a suggestion.
    /// let e = mfac_lab::cli::GlueArgs::parse(&["--learning_rat", "1e-4"]).unwrap_err();
    /// assert!(e.to_string().contains("--learning_rate"));
    /// ```
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Self> {
        Self::from_flags(parse_flags::<GlueFlags, S>("glue", args)?)
    }

    /// Checks parsed flags and builds the training config and optimizer from them.
    pub fn from_flags(f: GlueFlags) -> Result<Self> {
        let mut optimizer = OptimizerSpec::parse_with_lr(&f.optim, &f.optim_args, f.learning_rate)?;
        if f.weight_decay > 0.0 {
            optimizer.set_hf_weight_decay(f.weight_decay);
        }
        let train = TrainConfig {
            batch_size: f.per_device_train_batch_size,
            optimizer,
            num_train_epochs: f.num_train_epochs,
            max_steps: f.max_steps,
            max_seq_length: f.max_seq_length,
            seed: f.seed,
            max_grad_norm: (f.max_grad_norm > 0.0).then_some(f.max_grad_norm),
            schedule: if f.lr_scheduler_type == "constant" {
                Schedule::Constant
            } else {
                Schedule::Linear
            },
            eval_steps: f.eval_steps,
            logging_steps: f.logging_steps,
            max_train_samples: f.max_train_samples,
            max_eval_samples: f.max_eval_samples,
            pad_to_max_length: f.pad_to_max_length,
            eval_batch_size: f.per_device_eval_batch_size,
            quiet: f.quiet,
            save_steps: f.save_steps,
            save_total_limit: f.save_total_limit,
            overwrite_output_dir: f.overwrite_output_dir,
            report_to: ReportTo::parse(&f.report_to)?,
            ..TrainConfig::default()
        };
        train.validate()?;
        if f.resume_from_checkpoint == Some(None) && f.output_dir.is_none() {
            return Err(bad(
                "--resume_from_checkpoint",
                "without a folder it resumes from the newest checkpoint in --output_dir: pass --output_dir (or the checkpoint folder)",
            ));
        }
        Ok(GlueArgs {
            model_name_or_path: f.model_name_or_path,
            task_name: f.task_name,
            do_train: f.do_train,
            do_eval: f.do_eval,
            output_dir: f.output_dir,
            data_dir: f.data_dir,
            device: f.device,
            dtype: if f.dtype.starts_with("f64") || f.dtype == "float64" {
                DType::F64
            } else {
                DType::F32
            },
            resume_from_checkpoint: f.resume_from_checkpoint,
            train,
        })
    }
}

/// `mfac-lab compare` flags. Defaults left unset here are the demo's or the recipe's, chosen
/// in one place: [`crate::compare::CompareDefaults`].
#[derive(Debug, Clone, Default, Args)]
#[command(rename_all = "snake_case")]
pub struct CompareFlags {
    /// GLUE task from the hub (without it and without --data_dir: the offline demo).
    #[arg(long)]
    pub task: Option<String>,
    /// A local folder with the task's parquet/TSV files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Hub id or local folder (default: prajjwal1/bert-tiny, or a random bert-tiny in the demo).
    #[arg(long)]
    pub model_name_or_path: Option<String>,
    /// An optimizer (repeatable; paired in order with --optim_args). Default: Adam vs M-FAC.
    #[arg(long)]
    pub optim: Vec<String>,
    /// Options of the --optim at the same position. Without `lr`: the card's 1e-4, which M-FAC
    /// scales to its num_grads (docs/MFAC_LR.md).
    #[arg(long)]
    pub optim_args: Vec<String>,
    /// Seeds, comma-separated (default 42; the demo 42,43).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// The value of the task's headline metric to time each optimizer to (e.g. 0.65 for 65 %
    /// accuracy); default: the first optimizer's final mean.
    #[arg(long, value_parser = finite, allow_negative_numbers = true)]
    pub target: Option<f64>,
    /// Epochs per run (default the recipe's 5; the demo 2).
    #[arg(long, value_parser = finite, allow_negative_numbers = true)]
    pub num_train_epochs: Option<f64>,
    /// Use only the first N training rows.
    #[arg(long, value_parser = positive)]
    pub max_train_samples: Option<usize>,
    /// Where to train.
    #[arg(long, default_value = "auto", value_parser = ["cpu", "cuda", "auto"])]
    pub device: String,
    /// Where the summary, history, plots and runs/ go.
    #[arg(long, default_value = "mfac-lab-results")]
    pub output_dir: PathBuf,
    /// Also write the logs for: `none` or `tensorboard` (event files under the output
    /// folder's runs/; `tensorboard --logdir <output_dir>`).
    #[arg(long, default_value = "none")]
    pub report_to: String,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

/// `mfac-lab card` flags.
#[derive(Debug, Clone, Args)]
#[command(rename_all = "snake_case")]
pub struct CardFlags {
    /// The card's task: mnli, qqp, qnli, mrpc, stsb or sst2.
    #[arg(long, default_value = "mnli")]
    pub task: String,
    /// The card's model: bert-tiny or bert-mini (or their hub ids).
    #[arg(long, default_value = "bert-tiny")]
    pub model: String,
    /// Seeds, comma-separated (default: five, 42 to 46, as the cards' 5 runs).
    #[arg(long, value_delimiter = ',')]
    pub seeds: Vec<u64>,
    /// Run the card's M-FAC with the sparse window at this density in (0, 1) (the top-k of an
    /// error-feedback accumulator: the card's 1,024 gradients in ≈ 0.3 GB at 0.01), instead of
    /// the card's dense window (18 GB for bert-tiny).
    #[arg(long, value_parser = finite)]
    pub density: Option<f64>,
    /// Print the card and its recipe, train nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Where to train.
    #[arg(long, default_value = "auto", value_parser = ["cpu", "cuda", "auto"])]
    pub device: String,
    /// Where the summary, history, plots and runs/ go.
    #[arg(long, default_value = "mfac-lab-card")]
    pub output_dir: PathBuf,
    /// Also write the logs for: `none` or `tensorboard` (event files under the output
    /// folder's runs/; `tensorboard --logdir <output_dir>`).
    #[arg(long, default_value = "none")]
    pub report_to: String,
    /// No progress output.
    #[arg(long)]
    pub quiet: bool,
}

impl CompareFlags {
    /// Parses the arguments after `compare`.
    ///
    /// ```
    /// let f = mfac_lab::cli::CompareFlags::parse(&["--seeds", "1,2", "--optim", "MFAC"]).unwrap();
    /// assert_eq!(f.seeds, [1, 2]);
    /// assert!(mfac_lab::cli::CompareFlags::parse(&["--lr", "3"]).is_err());
    /// ```
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Self> {
        let f: Self = parse_flags("compare", args)?;
        f.check()?;
        Ok(f)
    }

    /// What clap cannot say: each `--optim_args` pairs with an `--optim`; `--report_to` is
    /// one we write.
    pub fn check(&self) -> Result<()> {
        ReportTo::parse(&self.report_to)?;
        if self.optim_args.len() > self.optim.len() {
            return Err(bad(
                "--optim_args",
                "each --optim_args pairs with the --optim before it: give an --optim for each",
            ));
        }
        Ok(())
    }
}
