//! SGD through the optimizer seam: torch.optim.SGD's update rule written out in f64
//! (torch/optim/sgd.py, `_single_tensor_sgd`) against ours, for plain SGD, momentum (its first
//! step included), dampening, Nesterov and weight decay with HF Trainer's parameter groups; its
//! options; `--optim sgd` in `compare`.

use std::process::Command;

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer as _;
use mfac_lab::optim::{OptimizerSpec, Sgd, SgdConfig};
use mfac_lab::Error;

/// torch's rule for one parameter over a sequence of gradients (decay on or off for it).
fn torch_sgd(p0: &[f64], grads: &[Vec<f64>], c: &SgdConfig, decay: bool) -> Vec<f64> {
    let mut p = p0.to_vec();
    let mut buf: Option<Vec<f64>> = None;
    for g in grads {
        // d_p = d_p.add(param, alpha=weight_decay)
        let mut d: Vec<f64> = if c.weight_decay != 0.0 && decay {
            g.iter()
                .zip(&p)
                .map(|(g, p)| g + p * c.weight_decay)
                .collect()
        } else {
            g.clone()
        };
        if c.momentum != 0.0 {
            let b = match buf.take() {
                // buf = torch.clone(d_p).detach()
                None => d.clone(),
                // buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
                Some(b) => b
                    .iter()
                    .zip(&d)
                    .map(|(b, d)| b * c.momentum + d * (1.0 - c.dampening))
                    .collect(),
            };
            d = if c.nesterov {
                // d_p = d_p.add(buf, alpha=momentum)
                d.iter().zip(&b).map(|(d, b)| d + b * c.momentum).collect()
            } else {
                b.clone()
            };
            buf = Some(b);
        }
        // param.add_(d_p, alpha=-lr)
        for (p, d) in p.iter_mut().zip(&d) {
            *p -= d * c.lr;
        }
    }
    p
}

fn rel_l2(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// Runs ours for `steps` steps with known gradients (loss = Σ w ⊙ c_t gives gradient c_t) on
/// a weight (decayed) and a bias (not decayed, HF's grouping); compares with torch's rule.
fn check(c: SgdConfig, steps: usize) -> f64 {
    let dev = Device::Cpu;
    let (w0, b0) = (values(12, 1), values(3, 2));
    let w = Var::from_tensor(&Tensor::from_vec(w0.clone(), (4, 3), &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::from_vec(b0.clone(), 3, &dev).unwrap()).unwrap();
    let named = vec![
        ("layer.dense.weight".to_string(), w.clone()),
        ("layer.dense.bias".to_string(), b.clone()),
    ];
    let mut opt = OptimizerSpec::sgd(c).build(&named).unwrap();
    let (mut gw, mut gb) = (vec![], vec![]);
    for t in 0..steps {
        let cw = values(12, 10 + t as u64);
        let cb = values(3, 100 + t as u64);
        let loss = ((w.as_tensor() * Tensor::from_vec(cw.clone(), (4, 3), &dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            + (b.as_tensor() * Tensor::from_vec(cb.clone(), 3, &dev).unwrap())
                .unwrap()
                .sum_all()
                .unwrap())
        .unwrap();
        opt.try_step(&loss.backward().unwrap()).unwrap();
        gw.push(cw);
        gb.push(cb);
    }
    let got_w: Vec<f64> = w.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
    let got_b: Vec<f64> = b.as_tensor().to_vec1().unwrap();
    let ew = rel_l2(&got_w, &torch_sgd(&w0, &gw, &c, true));
    let eb = rel_l2(&got_b, &torch_sgd(&b0, &gb, &c, false));
    ew.max(eb)
}

/// The same formula evaluated in the same order in f64: only a fused multiply-add (≤ ½ ulp
/// per operation) can tell the two apart, over 6 steps of ~5 operations: ≤ 1e-14 relative.
/// A wrong rule (missing first-step rule, dampening, decay grouping) moves the result by ≥ 1e-3.
const TOL: f64 = 1e-14;

#[test]
fn plain_momentum_dampening_nesterov_and_weight_decay_follow_torchs_rule() {
    let base = SgdConfig {
        lr: 0.05,
        ..Default::default()
    };
    let cases = [
        ("plain", base),
        (
            "momentum",
            SgdConfig {
                momentum: 0.9,
                ..base
            },
        ),
        (
            "momentum + dampening",
            SgdConfig {
                momentum: 0.9,
                dampening: 0.3,
                ..base
            },
        ),
        (
            "nesterov",
            SgdConfig {
                momentum: 0.8,
                nesterov: true,
                ..base
            },
        ),
        (
            "weight decay",
            SgdConfig {
                weight_decay: 0.1,
                ..base
            },
        ),
        (
            "everything",
            SgdConfig {
                momentum: 0.7,
                nesterov: true,
                weight_decay: 0.05,
                ..base
            },
        ),
    ];
    for (name, c) in cases {
        let e = check(c, 6);
        assert!(e <= TOL, "{name}: relative L2 {e:e}");
    }
}

#[test]
fn the_first_momentum_step_is_the_gradient_undamped() {
    // torch: buf = clone(d_p) at the first step, so dampening does not apply to it.
    let c = SgdConfig {
        lr: 1.0,
        momentum: 0.9,
        dampening: 0.5,
        ..Default::default()
    };
    let w = Var::new(&[0.0f64, 0.0], &Device::Cpu).unwrap();
    let mut opt = Sgd::new(vec![w.clone()], c).unwrap();
    let g = Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
    opt.backward_step(&(w.as_tensor() * &g).unwrap().sum_all().unwrap())
        .unwrap();
    assert_eq!(w.as_tensor().to_vec1::<f64>().unwrap(), [-1.0, 2.0]);
    // Second step: buf = 0.9·g + 0.5·g = 1.4·g; w = −g − 1.4·g.
    opt.backward_step(&(w.as_tensor() * &g).unwrap().sum_all().unwrap())
        .unwrap();
    let got = w.as_tensor().to_vec1::<f64>().unwrap();
    assert!(
        (got[0] + 2.4).abs() < 1e-15 && (got[1] - 4.8).abs() < 1e-15,
        "{got:?}"
    );
}

#[test]
fn options_parse_and_bad_ones_name_their_key() {
    let spec = OptimizerSpec::parse(
        "sgd",
        "lr: 1e-2, momentum: 0.9, dampening: 0, nesterov: true, weight_decay: 0.01",
    )
    .unwrap();
    assert_eq!(
        spec,
        OptimizerSpec::sgd(SgdConfig {
            lr: 1e-2,
            momentum: 0.9,
            dampening: 0.0,
            nesterov: true,
            weight_decay: 0.01
        })
    );
    assert_eq!(spec.name(), "sgd");
    assert_eq!(spec.display_name(), "SGD lr 1e-2");
    for (args, key) in [
        ("lr: -1", "lr"),
        ("momentum: -0.5", "momentum"),
        ("weight_decay: -1", "weight_decay"),
        ("nesterov: true", "nesterov"),
        ("nesterov: true, momentum: 0.9, dampening: 0.1", "nesterov"),
        ("nesterov: maybe", "nesterov"),
        ("num_grads: 8", "num_grads"),
    ] {
        let e = OptimizerSpec::parse("SGD", args).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(&e, Error::OptimizerOption { key: k, .. } if k == key),
            "{args:?}: {msg}"
        );
        assert!(
            msg.contains("dampening"),
            "the valid keys are listed: {msg}"
        );
    }
    // run_glue's --learning_rate and --weight_decay reach SGD like AdamW.
    let a = mfac_lab::cli::GlueArgs::parse(&[
        "--optim",
        "sgd",
        "--optim_args",
        "momentum: 0.9",
        "--learning_rate",
        "3e-2",
        "--weight_decay",
        "0.01",
    ])
    .unwrap();
    assert_eq!(
        a.train.optimizer,
        OptimizerSpec::sgd(SgdConfig {
            lr: 3e-2,
            momentum: 0.9,
            weight_decay: 0.01,
            ..Default::default()
        })
    );
    // compare's default lr for a kind without its own rule: the card's 1e-4.
    assert_eq!(
        OptimizerSpec::parse_scaled_lr("sgd", "").unwrap().lr(),
        1e-4
    );
}

#[test]
fn an_unknown_optim_names_the_known_ones() {
    let e = mfac_lab::cli::GlueArgs::parse(&["--optim", "lion"]).unwrap_err();
    let msg = e.to_string();
    for name in OptimizerSpec::known_names() {
        assert!(msg.contains(name), "{name} missing from: {msg}");
    }
    assert!(msg.contains("lion"), "{msg}");
}

#[test]
fn compare_runs_sgd_beside_adamw_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_mfac-lab"))
        .args([
            "compare",
            "--optim",
            "sgd",
            "--optim_args",
            "lr: 1e-2, momentum: 0.9",
            "--optim",
            "adamw_torch",
            "--seeds",
            "42",
            "--num_train_epochs",
            "1",
            "--max_train_samples",
            "64",
            "--quiet",
            "--output_dir",
        ])
        .arg(dir.path().join("res"))
        .current_dir(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("| SGD lr 1e-2 (1 seed"), "{stdout}");
    assert!(dir
        .path()
        .join("res/runs/sgd-lr1e-2-seed42/eval_results.json")
        .is_file());
}
