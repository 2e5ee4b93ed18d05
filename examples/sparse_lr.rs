//! Does the sparse window's step length follow num_grads as the dense window's does? The
//! measurement behind docs/MFAC_LR.md's sparse section: notebook 03's step-length experiment
//! (the demo's random bert-tiny, weights held fixed, the same batches of 16 embedded MNLI pairs
//! for every window, ‖u‖ averaged over the last 8 steps after the window filled) for dense
//! windows and for sparse ones at the given density, up to the card's 1,024 gradients. Unlike
//! the notebook's cycle of consecutive rows (75 distinct batches: a window longer than that
//! would hold copies), each batch is 16 rows drawn at random (seeded), so every step's gradient
//! is a new one, as in training.
//!
//! ```sh
//! cargo run --release --example sparse_lr -- [--density 0.01] [--dense 8,16,32,64] [--sparse 8,32,128,512,1024]
//! ```
//! `--dense 1024` is the card's own window, with bf16 values (9 GB, ≈ 12 min here).

use anyhow::Result;
use mfac_lab::prelude::*;

fn list(args: &[String], key: &str, default: &str) -> Vec<usize> {
    args.iter()
        .position(|a| a == key)
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
        .unwrap_or(default)
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let density: f64 = args
        .iter()
        .position(|a| a == "--density")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(0.01);
    let data = mnli_sample()?;
    let model = ModelSource::random_bert_tiny().load(3, 42, &Device::Cpu, DType::F32)?;
    let tok = model.tokenizer()?.clone();
    let (pairs, labels) = data.pairs(&data.train)?;
    println!("| window | num_grads | ‖u‖ (mean of the last 8 steps) | ‖c‖ (the row written) | step at lr 1e-4 | step at lr 1e-4 × 1024/m |");
    println!("|---|---|---|---|---|---|");
    let runs = list(&args, "--dense", "8,16,32,64")
        .into_iter()
        .map(|m| (m, 1.0))
        .chain(
            list(&args, "--sparse", "8,32,128,512,1024")
                .into_iter()
                .map(|m| (m, density)),
        );
    // Step k's rows: 16 drawn from the 1,200 (a seeded xorshift), the same for every window.
    let batch_rows = |k: usize| -> Vec<usize> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (k as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
        (0..16)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % pairs.len() as u64) as usize
            })
            .collect()
    };
    for (m, rho) in runs {
        // A dense window of 512 or more keeps bf16 values (9 GB at 1,024): its direction is
        // within ~2e-3 of the f32 window's (tests/mfac_golden.rs), far below what is compared.
        let window_dtype = if rho == 1.0 && m >= 512 {
            DType::BF16
        } else {
            DType::F32
        };
        let card = MFacConfig {
            lr: 0.0,
            window_dtype,
            ..MFacConfig::model_card_with(m).with_density(rho)
        };
        let mut opt = MFac::new(model.vars(), card)?;
        let n_steps = m + 8;
        let (mut norms, mut rows) = (vec![], vec![]);
        for k in 0..n_steps {
            let idx = batch_rows(k);
            let p: Vec<(String, String)> = idx.iter().map(|&i| pairs[i].clone()).collect();
            let l: Vec<u32> = idx.iter().map(|&i| labels[i]).collect();
            let batch = tok.batch(&p, Some(&l), &Device::Cpu)?;
            let (_, grads) = model.loss_and_grads(&batch, false)?;
            let s = opt.try_step(&grads)?;
            if k + 8 >= n_steps {
                let u = opt.preconditioned_gradient();
                norms.push(u.iter().map(|x| x * x).sum::<f64>().sqrt());
                rows.push(s.grad_norm);
            }
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let u = mean(&norms);
        let scaled = 1e-4 * 1024.0 / m as f64;
        println!(
            "| {} | {m} | {u:.4e} | {:.4} | {:.3e} | {:.3e} |",
            if rho < 1.0 {
                format!("sparse {}", card.density_percent())
            } else if window_dtype == DType::BF16 {
                "dense (bf16)".into()
            } else {
                "dense".into()
            },
            mean(&rows),
            1e-4 * u,
            scaled * u
        );
    }
    Ok(())
}
