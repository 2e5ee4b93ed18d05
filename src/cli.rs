//! Command-line arguments of `mfac-lab glue`: run_glue's flags (the subset that matters here),
//! parsed without panics into a [`GlueArgs`].

use std::path::PathBuf;

use candle_core::DType;

use crate::error::{Error, Result};
use crate::optim::OptimizerSpec;
use crate::train::{Schedule, TrainConfig};

/// `mfac-lab glue` arguments.
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

/// The flags `glue` accepts, for help and errors.
pub const GLUE_FLAGS: &str = "--model_name_or_path --task_name --do_train --do_eval --max_seq_length \
--per_device_train_batch_size --per_device_eval_batch_size --learning_rate --weight_decay --num_train_epochs \
--max_steps --max_train_samples --max_eval_samples --eval_steps --max_grad_norm --lr_scheduler_type --seed \
--output_dir --overwrite_output_dir --resume_from_checkpoint --save_steps --save_total_limit --optim \
--optim_args --device --dtype --data_dir --pad_to_max_length --logging_steps --quiet";

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

impl GlueArgs {
    /// Parses the arguments after `glue` (`--flag value` or `--flag=value`).
    ///
    /// ```
    /// let a = mfac_lab::cli::GlueArgs::parse(&["--task_name", "mnli", "--optim", "MFAC",
    ///     "--optim_args", "lr: 1e-4, num_grads: 1024, damp: 1e-6"]).unwrap();
    /// assert_eq!(a.train.optimizer.name(), "mfac");
    /// ```
    pub fn parse<S: AsRef<str>>(args: &[S]) -> Result<Self> {
        let mut model = crate::model::BERT_TINY_REPO.to_string();
        let mut task = "mnli".to_string();
        let (mut do_train, mut do_eval) = (false, false);
        let (mut output_dir, mut data_dir) = (None, None);
        let mut device = "auto".to_string();
        let mut dtype = DType::F32;
        let mut resume = None;
        let (mut optim, mut optim_args) = ("adamw_torch".to_string(), String::new());
        let mut weight_decay = 0.0;
        let mut learning_rate = 5e-5;
        let mut cfg = TrainConfig::default();
        let mut it = args.iter().map(|s| s.as_ref().to_string()).peekable();
        while let Some(arg) = it.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let value = |it: &mut std::iter::Peekable<_>| -> Result<String> {
                match &inline {
                    Some(v) => Ok(v.clone()),
                    None => it.next().ok_or_else(|| bad(&flag, "needs a value")),
                }
            };
            fn num<T: std::str::FromStr>(flag: &str, v: String) -> Result<T> {
                v.parse()
                    .map_err(|_| bad(flag, format!("{v:?} is not a valid number")))
            }
            // A float flag: finite and ≥ 0 (each flag's own range is checked by
            // TrainConfig::validate and the optimizer's config).
            fn real(flag: &str, v: String) -> Result<f64> {
                let x: f64 = num(flag, v.clone())?;
                if !x.is_finite() || x < 0.0 {
                    return Err(bad(flag, format!("{v:?} must be a finite number ≥ 0")));
                }
                Ok(x)
            }
            match flag.as_str() {
                "--model_name_or_path" => model = value(&mut it)?,
                "--task_name" => task = value(&mut it)?,
                "--do_train" => do_train = true,
                "--do_eval" => do_eval = true,
                "--quiet" => cfg.quiet = true,
                "--overwrite_output_dir" => cfg.overwrite_output_dir = true,
                "--resume_from_checkpoint" => {
                    // run_glue takes a path; without one (or with `true`), the newest
                    // checkpoint in --output_dir.
                    let v = match &inline {
                        Some(v) => Some(v.clone()),
                        None => it.next_if(|n| !n.starts_with("--")),
                    };
                    resume = Some(v.filter(|v| v != "true").map(PathBuf::from));
                }
                "--save_steps" => cfg.save_steps = Some(num(&flag, value(&mut it)?)?),
                "--save_total_limit" => cfg.save_total_limit = Some(num(&flag, value(&mut it)?)?),
                "--pad_to_max_length" => cfg.pad_to_max_length = true,
                "--output_dir" => output_dir = Some(PathBuf::from(value(&mut it)?)),
                "--data_dir" => data_dir = Some(PathBuf::from(value(&mut it)?)),
                "--device" => device = value(&mut it)?,
                "--optim" => optim = value(&mut it)?,
                "--optim_args" => optim_args = value(&mut it)?,
                "--max_seq_length" => cfg.max_seq_length = num(&flag, value(&mut it)?)?,
                "--per_device_train_batch_size" => cfg.batch_size = num(&flag, value(&mut it)?)?,
                "--per_device_eval_batch_size" => {
                    cfg.eval_batch_size = num(&flag, value(&mut it)?)?
                }
                "--learning_rate" => learning_rate = real(&flag, value(&mut it)?)?,
                "--weight_decay" => weight_decay = real(&flag, value(&mut it)?)?,
                "--num_train_epochs" => cfg.num_train_epochs = real(&flag, value(&mut it)?)?,
                "--max_steps" => cfg.max_steps = Some(num(&flag, value(&mut it)?)?),
                "--max_train_samples" => cfg.max_train_samples = Some(num(&flag, value(&mut it)?)?),
                "--max_eval_samples" => cfg.max_eval_samples = Some(num(&flag, value(&mut it)?)?),
                "--eval_steps" => cfg.eval_steps = Some(num(&flag, value(&mut it)?)?),
                "--logging_steps" => {
                    let _: usize = num(&flag, value(&mut it)?)?;
                }
                "--seed" => cfg.seed = num(&flag, value(&mut it)?)?,
                "--max_grad_norm" => {
                    let v = real(&flag, value(&mut it)?)?;
                    cfg.max_grad_norm = (v > 0.0).then_some(v);
                }
                "--lr_scheduler_type" => {
                    cfg.schedule = match value(&mut it)?.as_str() {
                        "linear" => Schedule::Linear,
                        "constant" => Schedule::Constant,
                        other => {
                            return Err(bad(&flag, format!("{other:?}: use linear or constant")))
                        }
                    }
                }
                "--dtype" => {
                    dtype = match value(&mut it)?.as_str() {
                        "f32" | "float32" => DType::F32,
                        "f64" | "float64" => DType::F64,
                        other => return Err(bad(&flag, format!("{other:?}: use f32 or f64"))),
                    }
                }
                _ => return Err(bad(&flag, format!("unknown flag; accepted: {GLUE_FLAGS}"))),
            }
        }
        if !matches!(device.as_str(), "cpu" | "cuda" | "auto") {
            return Err(bad(
                "--device",
                format!("{device:?}: use cpu, cuda or auto"),
            ));
        }
        let mut optimizer = OptimizerSpec::parse_with_lr(&optim, &optim_args, learning_rate)?;
        if let OptimizerSpec::AdamW(c) = &mut optimizer {
            if weight_decay > 0.0 {
                c.weight_decay = weight_decay;
            }
        }
        cfg.optimizer = optimizer;
        cfg.validate()?;
        if resume == Some(None) && output_dir.is_none() {
            return Err(bad(
                "--resume_from_checkpoint",
                "without a folder it resumes from the newest checkpoint in --output_dir: pass --output_dir (or the checkpoint folder)",
            ));
        }
        Ok(GlueArgs {
            model_name_or_path: model,
            task_name: task,
            do_train,
            do_eval,
            output_dir,
            data_dir,
            device,
            dtype,
            resume_from_checkpoint: resume,
            train: cfg,
        })
    }
}
