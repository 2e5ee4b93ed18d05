//! The GPU run of scripts/gpu-check-pass.sh (issue 13): the CUDA pass (`Engine::CudaPass`)
//! checked against the CPU pass, then timed. Every path comes from the command line (the GPU
//! machine has no ../shared and no source tree); a failed check exits non-zero.
//!
//! ```text
//! gpu_pass_check parity [--model DIR]   logits, loss and every gradient, dropout off, against
//!                                       the CPU pass: bert-tiny (random, every parameter
//!                                       perturbed) at B8 with padding and B32 S128, and the
//!                                       fixture in DIR (e.g. bert-micro-random) when given
//! gpu_pass_check dropout                keep rate, independence across sites and neighbours,
//!                                       same seed → same masks
//! gpu_pass_check replay [--steps 20]    an AdamW trajectory (clip 1.0, linear schedule, dropout
//!                                       off) on the CUDA pass against the same on the CPU pass
//! gpu_pass_check bench [--steps 30] [--m 1024]
//!                                       step timings, seq 128 and an MNLI-like length mix, AdamW
//!                                       and M-FAC, the CUDA pass against the graph on CUDA;
//!                                       the eval forward; the 5-epoch projection
//! ```
//! Results: `RESULT` lines on stdout and one JSON object per result appended to `--json FILE`
//! (default results.jsonl; the format of examples/gpu_check.rs, so its `table` lists them).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};
use mfac_lab::model::{Batch, BertClassifier, BertConfig, Engine};
use mfac_lab::optim::{AdamWConfig, MFacConfig, OptimizerSpec};
use mfac_lab::rng::SeededRng;
use mfac_lab::train::{Schedule, Stepper, TrainConfig};

mod gpu_common;
use gpu_common::{cuda, median, rel, Args, Out};

fn f64s(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F64)?
        .to_vec1()?)
}

/// A random model of `cfg` on the CPU and the same weights on `dev`, every parameter perturbed
/// (biases and LayerNorm weights off their zero/one init, so that a swapped or dropped term
/// shows).
fn twin_models(
    cfg: &BertConfig,
    seed: u64,
    dev: &Device,
) -> Result<(BertClassifier, BertClassifier)> {
    let cpu = BertClassifier::random(cfg, 3, seed, &Device::Cpu, DType::F32)?;
    let gpu = BertClassifier::random(cfg, 3, seed, dev, DType::F32)?;
    let mut rng = SeededRng::new(seed ^ 0x5eed);
    for (c, g) in cpu.vars().iter().zip(gpu.vars()) {
        let n = c.elem_count();
        let noise: Vec<f32> = rng
            .normal_vec(n, 0.0, 0.05)
            .into_iter()
            .map(|v| v as f32)
            .collect();
        let noise = Tensor::from_vec(noise, c.shape(), &Device::Cpu)?;
        let v = (c.as_tensor() + noise)?;
        c.set(&v)?;
        g.set(&v.to_device(dev)?)?;
    }
    Ok((cpu, gpu))
}

/// Random token ids with right padding to lengths drawn in [t/4, t] (the first row full), types
/// 0 then 1, labels mod 3.
fn random_batch(b: usize, t: usize, seed: u64, dev: &Device) -> Result<Batch> {
    let mut rng = SeededRng::new(seed);
    let (mut ids, mut types, mut mask) = (vec![0u32; b * t], vec![0u32; b * t], vec![0u32; b * t]);
    for r in 0..b {
        let len = if r == 0 {
            t
        } else {
            (t / 4).max(2) + (rng.next_u64() as usize) % (t - (t / 4).max(2) + 1)
        };
        for j in 0..len {
            ids[r * t + j] = if j == 0 {
                101
            } else {
                1000 + (rng.next_u64() % 29000) as u32
            };
            types[r * t + j] = u32::from(j >= len / 2);
            mask[r * t + j] = 1;
        }
    }
    let labels: Vec<u32> = (0..b as u32).map(|i| i % 3).collect();
    Ok(Batch::new(
        Tensor::from_vec(ids, (b, t), dev)?,
        Tensor::from_vec(types, (b, t), dev)?,
        Tensor::from_vec(mask, (b, t), dev)?,
        Some(Tensor::from_vec(labels, b, dev)?),
    )?)
}

fn to_dev(batch: &Batch, dev: &Device) -> Result<Batch> {
    Ok(Batch::new(
        batch.input_ids.to_device(dev)?,
        batch.token_type_ids.to_device(dev)?,
        batch.attention_mask.to_device(dev)?,
        batch
            .labels
            .as_ref()
            .map(|l| l.to_device(dev))
            .transpose()?,
    )?)
}

/// The pass on `gpu` against the CPU pass on `cpu` for one batch, dropout off.
fn compare(
    out: &mut Out,
    label: &str,
    cpu: &BertClassifier,
    gpu: &BertClassifier,
    batch: &Batch,
    tol: f64,
) -> Result<()> {
    let dev = gpu.device().clone();
    let gb = to_dev(batch, &dev)?;
    let lc = f64s(&cpu.logits(batch)?)?;
    let lg = f64s(&gpu.logits(&gb)?)?;
    out.record(
        &format!("{label}: eval logits rel err"),
        rel(&lg, &lc),
        "rel",
        Some(tol),
        "",
    );
    let (loss_c, gc) = cpu.loss_and_grads(batch, false)?;
    let (loss_g, gg) = gpu.loss_and_grads(&gb, false)?;
    out.record(
        &format!("{label}: loss rel err"),
        ((loss_g - loss_c) / loss_c).abs(),
        "rel",
        Some(tol),
        &format!("cpu {loss_c:.8} gpu {loss_g:.8}"),
    );
    let global: f64 = grads_sq(cpu, &gc)?.sqrt();
    let mut worst: (f64, String) = (0.0, String::new());
    for ((name, vc), vg) in cpu.named_vars().iter().zip(gpu.vars()) {
        let a = f64s(
            gc.get(vc.as_tensor())
                .ok_or_else(|| anyhow!("no CPU grad {name}"))?,
        )?;
        let b = f64s(
            gg.get(vg.as_tensor())
                .ok_or_else(|| anyhow!("no GPU grad {name}"))?,
        )?;
        let norm = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        // Analytically zero gradients (the key bias's) hold rounding noise on both sides:
        // measured against the global norm, as tests/native_pass.rs does.
        let e = if norm < 1e-6 * global {
            rel(&b, &a) * norm.max(1e-30) / global
        } else {
            rel(&b, &a)
        };
        println!("  {label}: grad {name:<58} rel err {e:.3e}");
        if e.is_nan() || e > worst.0 {
            worst = (e, name.clone());
        }
    }
    out.record(
        &format!("{label}: worst gradient rel err (41 tensors)"),
        worst.0,
        "rel",
        Some(tol),
        &worst.1,
    );
    Ok(())
}

fn grads_sq(model: &BertClassifier, g: &GradStore) -> Result<f64> {
    let mut s = 0.0;
    for v in model.vars() {
        if let Some(t) = g.get(v.as_tensor()) {
            s += f64s(t)?.iter().map(|x| x * x).sum::<f64>();
        }
    }
    Ok(s)
}

fn parity(args: &Args, out: &mut Out) -> Result<()> {
    let dev = cuda()?;
    let (cpu, gpu) = twin_models(&BertConfig::bert_tiny(), 7, &dev)?;
    out.check(
        "bert-tiny f32 on CUDA runs Engine::CudaPass",
        gpu.engine() == Engine::CudaPass,
        &format!("{:?} (MFAC_LAB_CUDA_PASS unset?)", gpu.engine()),
    );
    // f32 against f32 in another order (cuBLAS, atomics in the embeddings' backward): the
    // CPU pass's own bound against HF (tests/native_pass.rs).
    let tol = 1e-4;
    compare(
        out,
        "tiny B8 padded",
        &cpu,
        &gpu,
        &random_batch(8, 48, 1, &Device::Cpu)?,
        tol,
    )?;
    compare(
        out,
        "tiny B32 S128",
        &cpu,
        &gpu,
        &random_batch(32, 128, 2, &Device::Cpu)?,
        tol,
    )?;
    // The graph on CUDA against the CPU pass, for scale.
    let graph = gpu.rebind()?.with_engine(Engine::Graph)?;
    let b = random_batch(8, 48, 1, &Device::Cpu)?;
    let (lc, _) = cpu.loss_and_grads(&b, false)?;
    let (lg, _) = graph.loss_and_grads(&to_dev(&b, &dev)?, false)?;
    out.record(
        "tiny B8: graph on CUDA vs CPU pass, loss rel err",
        ((lg - lc) / lc).abs(),
        "rel",
        None,
        "calibration",
    );
    if let Some(dir) = args.kv.get("model") {
        let c = BertClassifier::from_dir(dir, 3, &Device::Cpu, DType::F32)?;
        let g = BertClassifier::from_dir(dir, 3, &dev, DType::F32)?;
        let t = c.config().max_position_embeddings.min(40);
        compare(
            out,
            "fixture B8 padded",
            &c,
            &g,
            &random_batch(8, t, 3, &Device::Cpu)?,
            tol,
        )?;
    }
    // Ids out of range are an error, not a device fault.
    let mut bad = random_batch(2, 8, 4, &Device::Cpu)?;
    bad.input_ids = (bad.input_ids.ones_like()? * 40_000f64)?;
    let r = gpu.loss_and_grads(&to_dev(&bad, &dev)?, false);
    out.check(
        "token id out of range → error",
        r.as_ref()
            .err()
            .is_some_and(|e| e.to_string().contains("vocabulary")),
        &format!("{:?}", r.err().map(|e| e.to_string())),
    );
    Ok(())
}

fn dropout(out: &mut Out) -> Result<()> {
    let dev = cuda()?;
    let n: u64 = 1 << 26;
    for &p in &[0.1, 0.5] {
        let [ka, kb, kab, kaa] = Engine::cuda_dropout_counts(&dev, 12345, (1, 2), p, n)?;
        let q = 1.0 - p;
        let nf = n as f64;
        let sd = (q * (1.0 - q) / nf).sqrt();
        let sd2 = (q * q * (1.0 - q * q) / nf).sqrt();
        for (what, got, want, s) in [
            ("keep rate site a", ka as f64 / nf, q, sd),
            ("keep rate site b", kb as f64 / nf, q, sd),
            ("both sites kept", kab as f64 / nf, q * q, sd2),
            ("neighbours kept", kaa as f64 / nf, q * q, sd2),
        ] {
            out.record(
                &format!("dropout p={p}: {what}, |z|"),
                (got - want).abs() / s,
                "sigma",
                Some(6.0),
                &format!("{got:.6} vs {want:.6}"),
            );
        }
        let again = Engine::cuda_dropout_counts(&dev, 12345, (1, 2), p, n)?;
        out.check(
            &format!("dropout p={p}: same key → same masks"),
            again == [ka, kb, kab, kaa],
            "",
        );
        let other = Engine::cuda_dropout_counts(&dev, 54321, (1, 2), p, n)?;
        out.check(
            &format!("dropout p={p}: another key → other masks"),
            other[0] != ka,
            "",
        );
    }
    // Through the model: the same dropout seed gives the same gradients (up to the order of
    // the embeddings' atomic adds); another seed gives others.
    let (_, gpu) = twin_models(&BertConfig::bert_tiny(), 7, &dev)?;
    let b = to_dev(&random_batch(8, 48, 1, &Device::Cpu)?, &dev)?;
    let run = |seed: u64| -> Result<(f64, Vec<f64>)> {
        gpu.set_dropout_seed(seed);
        let (l, g) = gpu.loss_and_grads(&b, true)?;
        let w = gpu.vars()[5].clone(); // layer 0 query weight
        Ok((
            l,
            f64s(g.get(w.as_tensor()).ok_or_else(|| anyhow!("no grad"))?)?,
        ))
    };
    let (l1, g1) = run(1)?;
    let (l1b, g1b) = run(1)?;
    let (l2, g2) = run(2)?;
    out.record(
        "dropout: same seed, grad rel diff",
        rel(&g1b, &g1),
        "rel",
        Some(1e-6),
        &format!("loss {l1} / {l1b}"),
    );
    out.check(
        "dropout: another seed, other loss",
        l2 != l1 && rel(&g2, &g1) > 1e-3,
        &format!("loss {l2}"),
    );
    Ok(())
}

fn replay(args: &Args, out: &mut Out) -> Result<()> {
    let steps = args.num("steps", 20usize)?;
    let dev = cuda()?;
    let (cpu, gpu) = twin_models(&BertConfig::bert_tiny(), 11, &dev)?;
    let mut cfg = TrainConfig::run_glue();
    cfg.dropout = false;
    cfg.schedule = Schedule::Linear;
    let spec = OptimizerSpec::new(AdamWConfig {
        lr: 1e-3,
        weight_decay: 0.01,
        ..AdamWConfig::default()
    });
    let mut sc = Stepper::new(&cpu, &spec, &cfg, steps)?;
    let mut sg = Stepper::new(&gpu, &spec, &cfg, steps)?;
    let mut worst_loss: f64 = 0.0;
    for k in 0..steps {
        let b = random_batch(16, 64, 100 + k as u64, &Device::Cpu)?;
        let rc = sc.step(&cpu, &b, k)?;
        let rg = sg.step(&gpu, &to_dev(&b, &dev)?, k)?;
        let e = ((rg.loss - rc.loss) / rc.loss).abs();
        println!(
            "  step {k:>3}: loss cpu {:.7} gpu {:.7} (rel {e:.2e}), grad norm cpu {:.5} gpu {:.5}",
            rc.loss, rg.loss, rc.grad_norm, rg.grad_norm
        );
        worst_loss = worst_loss.max(e);
    }
    out.record(
        "AdamW replay: worst loss rel err",
        worst_loss,
        "rel",
        Some(1e-3),
        &format!("{steps} steps, lr 1e-3"),
    );
    let (mut num, mut den) = (0.0, 0.0);
    for (c, g) in cpu.vars().iter().zip(gpu.vars()) {
        let (a, b) = (f64s(c.as_tensor())?, f64s(g.as_tensor())?);
        for (x, y) in b.iter().zip(&a) {
            num += (x - y) * (x - y);
            den += y * y;
        }
    }
    out.record(
        "AdamW replay: final weights rel err",
        (num / den).sqrt(),
        "rel",
        Some(1e-4),
        "",
    );
    Ok(())
}

/// Median ms of `n` steps after 3 warm-up steps, over `batches` in turn.
fn time_steps(
    st: &mut Stepper,
    model: &BertClassifier,
    batches: &[Batch],
    n: usize,
) -> Result<f64> {
    let dev = model.device().clone();
    for k in 0..3 {
        st.step(model, &batches[k % batches.len()], k)?;
    }
    dev.synchronize()?;
    let mut t = vec![];
    for k in 0..n {
        let s = Instant::now();
        st.step(model, &batches[k % batches.len()], 3 + k)?;
        dev.synchronize()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(t))
}

/// Batches of 32 with MNLI-like lengths: each row ~ N(40, 15²) tokens in [8, 128], the batch
/// padded to its longest row (dynamic padding), as the Trainer pads.
fn mnli_mix(dev: &Device) -> Result<Vec<Batch>> {
    let mut rng = SeededRng::new(99);
    (0..16)
        .map(|i| {
            let lens = rng.normal_vec(32, 40.0, 15.0);
            let t = lens.iter().fold(8.0f64, |a, &b| a.max(b)).min(128.0) as usize;
            to_dev(&random_batch(32, t, 500 + i, &Device::Cpu)?, dev)
        })
        .collect()
}

fn bench(args: &Args, out: &mut Out) -> Result<()> {
    let n = args.num("steps", 30usize)?;
    let m = args.num("m", 1024usize)?;
    let dev = cuda()?;
    let cfg = TrainConfig::run_glue();
    let total = cfg.total_steps(392_702);
    let s128 = vec![to_dev(&random_batch(32, 128, 7, &Device::Cpu)?, &dev)?];
    let mix = mnli_mix(&dev)?;
    let mean_t = mix.iter().map(|b| b.seq_len() as f64).sum::<f64>() / mix.len() as f64;
    let adamw = OptimizerSpec::new(AdamWConfig {
        lr: 1e-4,
        ..AdamWConfig::default()
    });
    let mfac = OptimizerSpec::mfac(MFacConfig::model_card_with(m));
    let mut ms = HashMap::new();
    for engine in [Engine::CudaPass, Engine::Graph] {
        let model = BertClassifier::random(&BertConfig::bert_tiny(), 3, 42, &dev, DType::F32)?
            .with_engine(engine)?;
        for (oname, spec) in [("AdamW", &adamw), ("M-FAC", &mfac)] {
            if engine == Engine::Graph && oname == "M-FAC" {
                continue; // the graph's M-FAC step is gpu_check's `train` stage
            }
            for (bname, batches) in [("S128", &s128), ("MNLI mix", &mix)] {
                let mut st = Stepper::new(&model, spec, &cfg, total)?;
                let t = time_steps(&mut st, &model, batches, n)?;
                let note = match (oname, bname) {
                    ("AdamW", "S128") => "HF torch eager: 8.4 ms; target ≤ 8.4, aim 3".to_string(),
                    (_, "MNLI mix") => format!("mean padded T {mean_t:.0}"),
                    _ => "window filling (first steps)".to_string(),
                };
                out.record(
                    &format!("step B32 {bname}, {oname}, {engine:?}"),
                    t,
                    "ms",
                    None,
                    &note,
                );
                ms.insert((format!("{engine:?}"), oname, bname), t);
            }
        }
        // Evaluation forward at the run's eval batch size.
        let eb = to_dev(
            &random_batch(cfg.eval_batch_size, 128, 8, &Device::Cpu)?,
            &dev,
        )?;
        let mut t = vec![];
        for k in 0..n + 3 {
            let s = Instant::now();
            let l = model.logits(&eb)?;
            let _ = l.sum_all()?.to_scalar::<f32>()?;
            if k >= 3 {
                t.push(s.elapsed().as_secs_f64() * 1e3);
            }
        }
        let e = median(t);
        out.record(
            &format!("eval forward B{} S128, {engine:?}", cfg.eval_batch_size),
            e,
            "ms",
            None,
            "HF: 1.7 ms (B32)",
        );
        ms.insert((format!("{engine:?}"), "eval", "S128"), e);
    }
    let evals = 5.0
        * ((9815f64 / cfg.eval_batch_size as f64).ceil()
            + (9832f64 / cfg.eval_batch_size as f64).ceil());
    let e = ms[&("CudaPass".to_string(), "eval", "S128")];
    for (oname, limit) in [("AdamW", 5.0), ("M-FAC", 15.0)] {
        let step = ms[&("CudaPass".to_string(), oname, "MNLI mix")];
        let minutes = (total as f64 * step + evals * e) / 6e4;
        out.record(
            &format!("projected 5-epoch MNLI, {oname}, CudaPass (MNLI mix)"),
            minutes,
            "min",
            None,
            &format!("target ≤ {limit} min; {total} steps"),
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse("gpu_pass_check")?;
    let mut out = Out::new(PathBuf::from(args.str("json", "results.jsonl")));
    match args.stage.as_str() {
        "parity" => parity(&args, &mut out)?,
        "dropout" => dropout(&mut out)?,
        "replay" => replay(&args, &mut out)?,
        "bench" => bench(&args, &mut out)?,
        s => bail!("unknown stage {s}: parity, dropout, replay, bench"),
    }
    if !out.failed.is_empty() {
        bail!("failed: {}", out.failed.join("; "));
    }
    Ok(())
}
