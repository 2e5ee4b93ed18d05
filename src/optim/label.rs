//! The pieces of optimizer labels (`AdamW lr 3e-4`, `M-FAC m=32 (lr 3.2e-3)`): numbers, dtypes,
//! the card's lr that labels leave out. A leaf of src/optim.

use candle_core::DType;

/// The learning rate of the model card's recipe (`--learning_rate 1e-4`): labels show `lr` only
/// when a spec's differs.
pub const CARD_LR: f64 = 1e-4;

/// A number in a label: up to 4 significant digits, trailing zeros dropped (`3.2e-3`, `1e-4`,
/// `2.56e-2`, `0.9`); `full` keeps every digit (to tell apart values that only differ further down).
pub(crate) fn num(x: f64, full: bool) -> String {
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

/// A storage type in a label.
pub(crate) fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F64 => "f64",
        DType::F16 => "f16",
        _ => "other",
    }
}
