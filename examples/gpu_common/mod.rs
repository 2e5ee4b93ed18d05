//! What the two GPU check binaries share (examples/gpu_check.rs, examples/gpu_pass_check.rs):
//! `--key value` arguments, the `RESULT` lines and the results file (one JSON object per
//! result, the format `gpu_check table` reads), the CUDA device, relative errors and medians. Each binary uses a part.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use candle_core::Device;

/// `STAGE [--key value]...`.
pub struct Args {
    pub stage: String,
    pub kv: HashMap<String, String>,
}

impl Args {
    /// The command line of `program`.
    pub fn parse(program: &str) -> Result<Self> {
        let mut it = std::env::args().skip(1);
        let stage = it
            .next()
            .ok_or_else(|| anyhow!("usage: {program} STAGE [--key value]..."))?;
        let mut kv = HashMap::new();
        while let Some(k) = it.next() {
            let key = k
                .strip_prefix("--")
                .ok_or_else(|| anyhow!("expected --key, got {k}"))?;
            let v = it.next().ok_or_else(|| anyhow!("--{key} needs a value"))?;
            kv.insert(key.to_string(), v);
        }
        Ok(Args { stage, kv })
    }
    pub fn path(&self, k: &str) -> Result<PathBuf> {
        Ok(PathBuf::from(
            self.kv
                .get(k)
                .ok_or_else(|| anyhow!("--{k} PATH is required"))?,
        ))
    }
    pub fn num<T: std::str::FromStr>(&self, k: &str, default: T) -> Result<T> {
        match self.kv.get(k) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| anyhow!("--{k} {v}: not a number")),
        }
    }
    pub fn str(&self, k: &str, default: &str) -> String {
        self.kv
            .get(k)
            .cloned()
            .unwrap_or_else(|| default.to_string())
    }
}

/// The results: `RESULT` lines, the results file, the failed checks.
pub struct Out {
    pub json: PathBuf,
    pub failed: Vec<String>,
}

impl Out {
    /// Results appended to `json`.
    pub fn new(json: PathBuf) -> Self {
        Out {
            json,
            failed: vec![],
        }
    }
    /// Records a result: `value` against `limit` when it is a check (value ≤ limit passes).
    pub fn record(&mut self, name: &str, value: f64, unit: &str, limit: Option<f64>, note: &str) {
        let pass = limit.map(|l| value <= l && value.is_finite());
        let status = match pass {
            Some(true) => "ok",
            Some(false) => "FAIL",
            None => "",
        };
        println!(
            "RESULT {name:<52} {value:>12.4e} {unit:<6} {} {status} {note}",
            limit
                .map(|l| format!("(limit {l:.1e})"))
                .unwrap_or_default()
        );
        if pass == Some(false) {
            self.failed.push(format!("{name} = {value:e} > {limit:?}"));
        }
        let line = serde_json::json!({
            "name": name, "value": value, "unit": unit, "limit": limit,
            "pass": pass, "note": note,
        });
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.json)
        {
            let _ = writeln!(f, "{line}");
        }
    }
    pub fn check(&mut self, name: &str, ok: bool, note: &str) {
        self.record(name, if ok { 0.0 } else { 1.0 }, "bool", Some(0.5), note);
    }
}

/// The first CUDA device.
pub fn cuda() -> Result<Device> {
    Device::new_cuda(0).context("no CUDA device (this is the GPU check)")
}

/// ‖a − b‖ / ‖b‖ (or ‖a − b‖ when b is 0).
pub fn rel(a: &[f64], b: &[f64]) -> f64 {
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// The median (NaN for no values).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}
