//! `OptimizerSpec`: which optimizer a run uses, parsed from run_glue's `--optim` / `--optim_args`.

use candle_core::DType;

use crate::error::{Error, Result};
use crate::optim::{AdamWConfig, MFacConfig};

/// Keys M-FAC accepts in `--optim_args`.
pub const MFAC_KEYS: [&str; 6] = [
    "lr",
    "num_grads",
    "damp",
    "momentum",
    "weight_decay",
    "window_dtype",
];
/// Keys AdamW accepts in `--optim_args`.
pub const ADAMW_KEYS: [&str; 5] = ["lr", "beta1", "beta2", "eps", "weight_decay"];
/// Optimizer names `--optim` accepts.
pub const OPTIM_NAMES: [&str; 5] = [
    "MFAC",
    "adamw_torch",
    "adamw_torch_fused",
    "adamw_hf",
    "adamw",
];

/// The optimizer of a run.
///
/// ```
/// use mfac_lab::optim::{OptimizerSpec, MFacConfig};
/// let spec = OptimizerSpec::parse("MFAC", "lr: 1e-4, num_grads: 1024, damp: 1e-6").unwrap();
/// assert_eq!(spec, OptimizerSpec::mfac(MFacConfig::model_card()));
/// let json = OptimizerSpec::parse("MFAC", r#"{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}"#).unwrap();
/// assert_eq!(json, spec);
/// assert_eq!(OptimizerSpec::parse("adamw_torch", "").unwrap(), OptimizerSpec::adamw(5e-5));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptimizerSpec {
    /// torch AdamW (HF Trainer's default optimizer).
    AdamW(AdamWConfig),
    /// M-FAC.
    MFac(MFacConfig),
}

fn option_err(key: &str, message: impl Into<String>, valid: &[&str]) -> Error {
    Error::OptimizerOption {
        key: key.into(),
        message: message.into(),
        valid: valid.join(", "),
    }
}

/// Splits `a: 1, b: 2` / `a=1,b=2` / a JSON object into (key, value text) pairs.
fn pairs(args: &str, valid: &[&str]) -> Result<Vec<(String, String)>> {
    let t = args.trim();
    if t.is_empty() {
        return Ok(vec![]);
    }
    if t.starts_with('{') || t.starts_with('[') {
        let v: serde_json::Value = serde_json::from_str(t)
            .map_err(|e| option_err("<json>", format!("not valid JSON: {e}"), valid))?;
        let obj = v
            .as_object()
            .ok_or_else(|| option_err("<json>", "expected a JSON object", valid))?;
        return Ok(obj
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect());
    }
    t.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            let (k, v) = p
                .split_once(':')
                .or_else(|| p.split_once('='))
                .ok_or_else(|| {
                    option_err(p.trim(), "expected `key: value` or `key=value`", valid)
                })?;
            Ok((
                k.trim().to_string(),
                v.trim().trim_matches(['"', '\'']).to_string(),
            ))
        })
        .collect()
}

fn number(key: &str, v: &str, valid: &[&str]) -> Result<f64> {
    let x: f64 = v
        .parse()
        .map_err(|_| option_err(key, format!("{v:?} is not a number"), valid))?;
    if !x.is_finite() {
        return Err(option_err(key, format!("{v:?} is not finite"), valid));
    }
    Ok(x)
}

fn dtype(key: &str, v: &str) -> Result<DType> {
    match v.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f64" | "float64" | "fp64" => Ok(DType::F64),
        _ => Err(option_err(
            key,
            format!("{v:?} is not a window dtype (f32, bf16, f64)"),
            &MFAC_KEYS,
        )),
    }
}

impl OptimizerSpec {
    /// AdamW with HF Trainer's defaults and this learning rate.
    pub fn adamw(lr: f64) -> Self {
        OptimizerSpec::AdamW(AdamWConfig {
            lr,
            ..Default::default()
        })
    }

    /// M-FAC with this config.
    pub fn mfac(cfg: MFacConfig) -> Self {
        OptimizerSpec::MFac(cfg)
    }

    /// A short name: `adamw` or `mfac`.
    pub fn name(&self) -> &'static str {
        match self {
            OptimizerSpec::AdamW(_) => "adamw",
            OptimizerSpec::MFac(_) => "mfac",
        }
    }

    /// The (peak) learning rate.
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerSpec::AdamW(c) => c.lr,
            OptimizerSpec::MFac(c) => c.lr,
        }
    }

    /// Like [`OptimizerSpec::parse`], with `lr` (run_glue's `--learning_rate`) used unless ARGS
    /// sets `lr` itself.
    ///
    /// ```
    /// use mfac_lab::optim::OptimizerSpec;
    /// assert_eq!(OptimizerSpec::parse_with_lr("MFAC", "num_grads: 8", 3e-4).unwrap().lr(), 3e-4);
    /// assert_eq!(OptimizerSpec::parse_with_lr("MFAC", "lr: 1e-4", 3e-4).unwrap().lr(), 1e-4);
    /// ```
    pub fn parse_with_lr(name: &str, args: &str, lr: f64) -> Result<Self> {
        let mut spec = Self::parse(name, args)?;
        let valid: &[&str] = if matches!(spec, OptimizerSpec::MFac(_)) {
            &MFAC_KEYS
        } else {
            &ADAMW_KEYS
        };
        let sets_lr = pairs(args, valid)?
            .iter()
            .any(|(k, _)| k == "lr" || k == "learning_rate");
        if !sets_lr {
            match &mut spec {
                OptimizerSpec::AdamW(c) => c.lr = lr,
                OptimizerSpec::MFac(c) => c.lr = lr,
            }
        }
        Ok(spec)
    }

    /// Parses run_glue's `--optim NAME --optim_args ARGS`. ARGS is `key: value, …`,
    /// `key=value,…` or a JSON object; missing keys keep the defaults (AdamW: HF Trainer's;
    /// M-FAC: the authors'). An unknown key, a bad number or an out-of-range value is an error
    /// naming the key and listing the valid ones.
    pub fn parse(name: &str, args: &str) -> Result<Self> {
        let lname = name.trim().to_ascii_lowercase();
        match lname.as_str() {
            "mfac" | "m-fac" => {
                let mut c = MFacConfig::default();
                for (k, v) in pairs(args, &MFAC_KEYS)? {
                    match k.as_str() {
                        "lr" => c.lr = number(&k, &v, &MFAC_KEYS)?,
                        "num_grads" | "ngrads" => {
                            let n = number(&k, &v, &MFAC_KEYS)?;
                            if n < 1.0 || n.fract() != 0.0 || n > u32::MAX as f64 {
                                return Err(option_err(
                                    &k,
                                    format!("{v:?} must be a whole number ≥ 1"),
                                    &MFAC_KEYS,
                                ));
                            }
                            c.num_grads = n as usize;
                        }
                        "damp" => c.damp = number(&k, &v, &MFAC_KEYS)?,
                        "momentum" => c.momentum = number(&k, &v, &MFAC_KEYS)?,
                        "weight_decay" => c.weight_decay = number(&k, &v, &MFAC_KEYS)?,
                        "window_dtype" => c.window_dtype = dtype(&k, &v)?,
                        _ => return Err(option_err(&k, "unknown key for MFAC", &MFAC_KEYS)),
                    }
                }
                c.validate()?;
                Ok(OptimizerSpec::MFac(c))
            }
            "adamw_torch" | "adamw_torch_fused" | "adamw_hf" | "adamw" => {
                let mut c = AdamWConfig::default();
                for (k, v) in pairs(args, &ADAMW_KEYS)? {
                    let x = number(&k, &v, &ADAMW_KEYS)?;
                    match k.as_str() {
                        "lr" | "learning_rate" => c.lr = x,
                        "beta1" | "adam_beta1" => c.beta1 = x,
                        "beta2" | "adam_beta2" => c.beta2 = x,
                        "eps" | "adam_epsilon" => c.eps = x,
                        "weight_decay" => c.weight_decay = x,
                        _ => return Err(option_err(&k, "unknown key for AdamW", &ADAMW_KEYS)),
                    }
                }
                let check = |key: &str, ok: bool, msg: &str| {
                    if ok {
                        Ok(())
                    } else {
                        Err(option_err(key, msg, &ADAMW_KEYS))
                    }
                };
                check("lr", c.lr >= 0.0, "must be ≥ 0")?;
                check("beta1", (0.0..1.0).contains(&c.beta1), "must be in [0, 1)")?;
                check("beta2", (0.0..1.0).contains(&c.beta2), "must be in [0, 1)")?;
                check("eps", c.eps > 0.0, "must be > 0")?;
                check("weight_decay", c.weight_decay >= 0.0, "must be ≥ 0")?;
                Ok(OptimizerSpec::AdamW(c))
            }
            _ => Err(option_err(name, "unknown optimizer", &OPTIM_NAMES)),
        }
    }
}
