//! run_glue's `--optim_args` text: `key: value, …`, `key=value,…` or a JSON object, split into
//! (key, value) pairs, and the value readers every optimizer's config uses for its own keys.

use candle_core::DType;

use crate::error::{Error, Result};

/// An [`Error::OptimizerOption`] naming `key` and listing the `valid` keys (or names).
pub(crate) fn option_err(key: &str, message: impl Into<String>, valid: &[&str]) -> Error {
    Error::OptimizerOption {
        key: key.into(),
        message: message.into(),
        valid: valid.join(", "),
    }
}

/// Splits `a: 1, b: 2` / `a=1,b=2` / a JSON object into (key, value text) pairs; `valid` only
/// names the keys in the error of a malformed text.
pub(crate) fn pairs(args: &str, valid: &[&str]) -> Result<Vec<(String, String)>> {
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

/// Whether `args` sets the learning rate (`lr` or `learning_rate`).
pub(crate) fn sets_lr(args: &str, valid: &[&str]) -> Result<bool> {
    Ok(pairs(args, valid)?
        .iter()
        .any(|(k, _)| k == "lr" || k == "learning_rate"))
}

/// A finite number.
pub(crate) fn number(key: &str, v: &str, valid: &[&str]) -> Result<f64> {
    let x: f64 = v
        .parse()
        .map_err(|_| option_err(key, format!("{v:?} is not a number"), valid))?;
    if !x.is_finite() {
        return Err(option_err(key, format!("{v:?} is not finite"), valid));
    }
    Ok(x)
}

/// A whole number ≥ 1 (written `1024` or `1024.0`).
pub(crate) fn count(key: &str, v: &str, valid: &[&str]) -> Result<usize> {
    let n = number(key, v, valid)?;
    if n < 1.0 || n.fract() != 0.0 || n > u32::MAX as f64 {
        return Err(option_err(
            key,
            format!("{v:?} must be a whole number ≥ 1"),
            valid,
        ));
    }
    Ok(n as usize)
}

/// `true` / `false` (also `1` / `0`, any case).
pub(crate) fn flag(key: &str, v: &str, valid: &[&str]) -> Result<bool> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(option_err(
            key,
            format!("{v:?} is not true or false"),
            valid,
        )),
    }
}

/// A floating-point storage type: `f32`, `bf16` or `f64` (torch's names too).
pub(crate) fn dtype(key: &str, v: &str, valid: &[&str]) -> Result<DType> {
    match v.to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f64" | "float64" | "fp64" => Ok(DType::F64),
        _ => Err(option_err(
            key,
            format!("{v:?} is not a window dtype (f32, bf16, f64)"),
            valid,
        )),
    }
}

/// `ok`, or an option error for `key` saying `message`.
pub(crate) fn check(key: &str, ok: bool, message: &str, valid: &[&str]) -> Result<()> {
    if ok {
        Ok(())
    } else {
        Err(option_err(key, message, valid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_spellings_give_the_same_pairs() {
        let want = vec![
            ("lr".to_string(), "1e-4".to_string()),
            ("num_grads".to_string(), "8".to_string()),
        ];
        assert_eq!(pairs("lr: 1e-4, num_grads: 8", &[]).unwrap(), want);
        assert_eq!(pairs("lr=1e-4,num_grads=8", &[]).unwrap(), want);
        assert_eq!(
            pairs(r#"{"lr": "1e-4", "num_grads": 8}"#, &[]).unwrap(),
            want
        );
        assert!(pairs("lr 1e-4", &["lr"])
            .unwrap_err()
            .to_string()
            .contains("key: value"));
        assert!(sets_lr("learning_rate: 1", &[]).unwrap());
        assert!(!sets_lr("momentum: 0.9", &[]).unwrap());
    }

    #[test]
    fn values_are_read_or_refused_by_name() {
        assert_eq!(count("n", "1024.0", &[]).unwrap(), 1024);
        assert!(count("n", "0.5", &[]).is_err());
        assert!(flag("nesterov", "True", &[]).unwrap());
        assert!(flag("nesterov", "yes", &["nesterov"])
            .unwrap_err()
            .to_string()
            .contains("nesterov"));
        assert!(number("lr", "inf", &[]).is_err());
        assert_eq!(dtype("w", "bfloat16", &[]).unwrap(), DType::BF16);
    }
}
