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
///
/// Every spec has a label that tells it apart in comparisons (tables, legends, run folders):
/// derived from its settings ([`OptimizerSpec::display_name`], [`OptimizerSpec::labels`]) or
/// given by hand ([`OptimizerSpec::label`]).
#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerSpec {
    /// torch AdamW (HF Trainer's default optimizer).
    AdamW(AdamWConfig),
    /// M-FAC.
    MFac(MFacConfig),
    /// A spec named by hand (see [`OptimizerSpec::label`]); it trains like the spec inside.
    Labeled(Box<OptimizerSpec>, String),
}

/// The learning rate of the model card's recipe (`--learning_rate 1e-4`): labels show `lr` only
/// when a spec's differs.
pub const CARD_LR: f64 = 1e-4;

/// A number in a label: up to 4 significant digits, trailing zeros dropped (`3.2e-3`, `1e-4`,
/// `2.56e-2`, `0.9`); `full` keeps every digit (to tell apart values that only differ further down).
fn num(x: f64, full: bool) -> String {
    if x == 0.0 {
        return "0".into();
    }
    let e = if full {
        format!("{x:e}")
    } else {
        format!("{x:.3e}")
    };
    let (mant, exp) = e.split_once('e').unwrap_or((e.as_str(), "0"));
    let mant = if mant.contains('.') {
        mant.trim_end_matches('0').trim_end_matches('.')
    } else {
        mant
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-1..=3).contains(&exp) {
        // Plain decimals for values near 1 (0.9, 0.999, 32); learning rates stay scientific.
        let v: f64 = format!("{mant}e{exp}").parse().unwrap_or(x);
        format!("{v}")
    } else {
        format!("{mant}e{exp}")
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        DType::F16 => "f16",
        _ => "other",
    }
}

/// The (key, value) fields of a spec that may tell it apart, in label order, with `lr` first.
fn fields(spec: &OptimizerSpec, full: bool) -> Vec<(&'static str, String)> {
    match spec.base() {
        OptimizerSpec::AdamW(c) => vec![
            ("lr", num(c.lr, full)),
            ("beta1", num(c.beta1, full)),
            ("beta2", num(c.beta2, full)),
            ("eps", num(c.eps, full)),
            ("weight_decay", num(c.weight_decay, full)),
        ],
        OptimizerSpec::MFac(c) => vec![
            ("lr", num(c.lr, full)),
            ("damp", num(c.damp, full)),
            ("momentum", num(c.momentum, full)),
            ("weight_decay", num(c.weight_decay, full)),
            ("window_dtype", dtype_name(c.window_dtype).into()),
        ],
        OptimizerSpec::Labeled(..) => unreachable!("base() unwraps labels"),
    }
}

/// A label from a kind's head (`AdamW`, `M-FAC m=32`) and the extra `key value` fields.
fn compose(spec: &OptimizerSpec, extras: &[String]) -> String {
    match spec.base() {
        OptimizerSpec::MFac(c) => {
            let head = format!("M-FAC m={}", c.num_grads);
            if extras.is_empty() {
                head
            } else {
                format!("{head} ({})", extras.join(", "))
            }
        }
        _ => {
            if extras.is_empty() {
                "AdamW".into()
            } else {
                format!("AdamW {}", extras.join(", "))
            }
        }
    }
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

    /// The same spec, named `text` in comparisons (tables, legends, run folders) instead of
    /// the label derived from its settings. Labelling a labelled spec replaces the label.
    ///
    /// ```
    /// use mfac_lab::optim::{MFacConfig, OptimizerSpec};
    /// let spec = OptimizerSpec::mfac(MFacConfig::model_card()).label("M-FAC (card)");
    /// assert_eq!(spec.display_name(), "M-FAC (card)");
    /// assert_eq!((spec.name(), spec.lr()), ("mfac", 1e-4));
    /// assert_eq!(spec.base(), &OptimizerSpec::mfac(MFacConfig::model_card()));
    /// ```
    pub fn label(self, text: impl Into<String>) -> Self {
        let base = match self {
            OptimizerSpec::Labeled(inner, _) => *inner,
            other => other,
        };
        OptimizerSpec::Labeled(Box::new(base), text.into())
    }

    /// Checks every field of the config (finite, in range); the error names the key.
    ///
    /// ```
    /// use mfac_lab::optim::OptimizerSpec;
    /// assert!(OptimizerSpec::adamw(f64::NAN).label("x").validate().is_err());
    /// assert!(OptimizerSpec::adamw(1e-4).validate().is_ok());
    /// ```
    pub fn validate(&self) -> Result<()> {
        match self.base() {
            OptimizerSpec::AdamW(c) => c.validate(),
            OptimizerSpec::MFac(c) => c.validate(),
            OptimizerSpec::Labeled(..) => unreachable!("base() unwraps labels"),
        }
    }

    /// The spec without its hand-given label (itself when it has none): always `AdamW` or `MFac`.
    pub fn base(&self) -> &OptimizerSpec {
        match self {
            OptimizerSpec::Labeled(inner, _) => inner.base(),
            other => other,
        }
    }

    /// The spec's label on its own: the hand-given one, else derived from its settings —
    /// M-FAC always shows m and shows lr when it differs from the card's 1e-4
    /// ([`CARD_LR`]); AdamW shows its lr when it differs. Specs compared together may need more
    /// fields to tell them apart: [`OptimizerSpec::labels`] adds them.
    ///
    /// ```
    /// use mfac_lab::optim::{MFacConfig, OptimizerSpec};
    /// assert_eq!(OptimizerSpec::adamw(1e-4).display_name(), "AdamW");
    /// assert_eq!(OptimizerSpec::adamw(3e-4).display_name(), "AdamW lr 3e-4");
    /// assert_eq!(OptimizerSpec::mfac(MFacConfig::model_card()).display_name(), "M-FAC m=1024");
    /// assert_eq!(
    ///     OptimizerSpec::mfac(MFacConfig::model_card_with(32)).display_name(),
    ///     "M-FAC m=32 (lr 3.2e-3)"
    /// );
    /// ```
    pub fn display_name(&self) -> String {
        if let OptimizerSpec::Labeled(_, text) = self {
            return text.clone();
        }
        let lr = self.lr();
        let extras = if num(lr, false) == num(CARD_LR, false) {
            vec![]
        } else {
            vec![format!("lr {}", num(lr, false))]
        };
        compose(self, &extras)
    }

    /// The labels of specs compared together, one per spec, all different. Each starts as
    /// [`OptimizerSpec::display_name`]; derived labels that still collide gain the other fields
    /// that differ among them (e.g. `M-FAC m=32 (damp 1e-5)` beside `M-FAC m=32 (damp 1e-6)`).
    /// Two specs that still share a label (the same settings twice, or a hand-given label used
    /// twice or equal to another's) are an [`Error::InvalidArgument`] naming the label.
    ///
    /// ```
    /// use mfac_lab::optim::{MFacConfig, OptimizerSpec};
    /// let specs = [
    ///     OptimizerSpec::adamw(1e-4),
    ///     OptimizerSpec::mfac(MFacConfig { num_grads: 32, ..MFacConfig::model_card() }),
    ///     OptimizerSpec::mfac(MFacConfig { num_grads: 32, damp: 1e-5, ..MFacConfig::model_card() }),
    /// ];
    /// assert_eq!(
    ///     OptimizerSpec::labels(&specs).unwrap(),
    ///     ["AdamW", "M-FAC m=32 (damp 1e-6)", "M-FAC m=32 (damp 1e-5)"]
    /// );
    /// let twice = [OptimizerSpec::adamw(1e-4), OptimizerSpec::adamw(1e-4)];
    /// assert!(OptimizerSpec::labels(&twice).unwrap_err().to_string().contains("AdamW"));
    /// ```
    pub fn labels(specs: &[OptimizerSpec]) -> Result<Vec<String>> {
        let mut out: Vec<String> = specs.iter().map(|s| s.display_name()).collect();
        let derived = |i: usize| !matches!(specs[i], OptimizerSpec::Labeled(..));
        // Derived labels that collide: add the fields that differ within the group (rounded
        // first, then with every digit if rounding hides the difference).
        for full in [false, true] {
            let first = out.clone();
            for i in 0..specs.len() {
                if !derived(i) {
                    continue;
                }
                let group: Vec<usize> = (0..specs.len())
                    .filter(|&k| derived(k) && first[k] == first[i])
                    .collect();
                if group.len() < 2 {
                    continue;
                }
                // lr stays when the label showed it (it differs from the card's).
                let lr_shown = num(specs[i].lr(), false) != num(CARD_LR, false);
                let mine = fields(&specs[i], full);
                let extras: Vec<String> = mine
                    .iter()
                    .enumerate()
                    .filter(|(f, (key, value))| {
                        let differs = group
                            .iter()
                            .any(|&k| fields(&specs[k], full).get(*f).map(|x| &x.1) != Some(value));
                        differs || (*key == "lr" && lr_shown)
                    })
                    .map(|(_, (key, value))| format!("{key} {value}"))
                    .collect();
                out[i] = compose(&specs[i], &extras);
            }
        }
        for i in 0..out.len() {
            if let Some(j) = (0..i).find(|&j| out[j] == out[i]) {
                return Err(Error::InvalidArgument(format!(
                    "optimizers {} and {} (of {}) share the label {:?}: give one a different \
                     label with OptimizerSpec::label(..), or drop the duplicate",
                    j + 1,
                    i + 1,
                    out.len(),
                    out[i]
                )));
            }
        }
        Ok(out)
    }

    /// A short name of the kind: `adamw` or `mfac` (also for a labelled spec).
    pub fn name(&self) -> &'static str {
        match self.base() {
            OptimizerSpec::MFac(_) => "mfac",
            _ => "adamw",
        }
    }

    /// The (peak) learning rate.
    pub fn lr(&self) -> f64 {
        match self.base() {
            OptimizerSpec::MFac(c) => c.lr,
            OptimizerSpec::AdamW(c) => c.lr,
            OptimizerSpec::Labeled(..) => unreachable!("base() unwraps labels"),
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
                OptimizerSpec::Labeled(..) => unreachable!("parse gives no label"),
            }
        }
        Ok(spec)
    }

    /// Like [`OptimizerSpec::parse`] for `compare`: unless ARGS sets `lr`, AdamW gets the
    /// card's lr 1e-4 and M-FAC gets it scaled to its window,
    /// [`MFacConfig::model_card_with`]`(num_grads).lr` = 1e-4 × 1024 / num_grads (M-FAC's step
    /// length grows with num_grads; docs/MFAC_LR.md).
    ///
    /// ```
    /// use mfac_lab::optim::OptimizerSpec;
    /// let scaled = OptimizerSpec::parse_scaled_lr("MFAC", "num_grads: 32").unwrap();
    /// assert!((scaled.lr() - 3.2e-3).abs() < 1e-15);
    /// assert_eq!(OptimizerSpec::parse_scaled_lr("MFAC", "num_grads: 32, lr: 1e-4").unwrap().lr(), 1e-4);
    /// assert_eq!(OptimizerSpec::parse_scaled_lr("adamw_torch", "").unwrap().lr(), 1e-4);
    /// ```
    pub fn parse_scaled_lr(name: &str, args: &str) -> Result<Self> {
        let mut spec = Self::parse_with_lr(name, args, CARD_LR)?;
        let sets_lr = match &spec {
            OptimizerSpec::MFac(_) => pairs(args, &MFAC_KEYS)?
                .iter()
                .any(|(k, _)| k == "lr" || k == "learning_rate"),
            _ => true,
        };
        if let (OptimizerSpec::MFac(c), false) = (&mut spec, sets_lr) {
            c.lr = MFacConfig::model_card_with(c.num_grads).lr;
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
