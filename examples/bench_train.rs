//! Throughput of one bert-tiny training step on this machine (forward, backward, clip, update).
//!
//! ```sh
//! cargo run --release --example bench_train -- [--steps 10]
//! ```
//! Cases: batch 32 at a fixed sequence length of 128 (run_glue's padding), and batch 32 of real
//! MNLI pairs from the embedded sample with dynamic padding; AdamW, M-FAC (m = 32, f32) and the
//! card's M-FAC with the sparse window (m = 1024, 1 %, f32 values), timed once its window is
//! full (`--fill`, default 1024 steps first; the step's parts are printed too).
//! Prints the median seconds per step, and of the forward + backward pass alone (the CPU pass
//! and, for comparison, candle's graph), and of the evaluation forward on both engines. The
//! PyTorch baseline: scripts/bench_pytorch.py.

use std::time::Instant;

use anyhow::Result;
use mfac_lab::data::{epoch_batches, mnli_sample, EncodedSplit};
use mfac_lab::model::{Engine, PairTokenizer};
use mfac_lab::optim::{MFac, MFacConfig, OptimizerSpec};
use mfac_lab::prelude::*;
use mfac_lab::train::Stepper;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |key: &str, default: usize| -> Result<usize> {
        Ok(args
            .iter()
            .position(|a| a == key)
            .and_then(|i| args.get(i + 1))
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(default))
    };
    let steps = flag("--steps", 10)?;
    let fill = flag("--fill", 1024)?;
    let vocab = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/fixtures/bert-tiny-random/vocab.txt");
    let tok = PairTokenizer::from_vocab(&vocab, true)?;
    let data = mnli_sample()?;
    let (pairs, labels) = data.pairs(&data.train)?;
    let split = EncodedSplit::encode(&tok, &pairs, &labels)?;
    let batches = epoch_batches(split.len(), 32, 42, 0, true);
    println!(
        "bert-tiny training step, batch 32, {} threads, median of {steps} steps after 2 warm-up",
        rayon::current_num_threads()
    );
    println!("| optimizer | padding | mean padded length | s per step |");
    println!("|---|---|---|---|");
    for spec in [
        OptimizerSpec::adamw(1e-4),
        OptimizerSpec::mfac(MFacConfig {
            num_grads: 32,
            ..MFacConfig::model_card()
        }),
        OptimizerSpec::mfac(MFacConfig::model_card().with_density(0.01)),
    ] {
        let sparse = spec.display_name().contains('%');
        for pad_to in [Some(128), None] {
            let model =
                BertClassifier::random(&BertConfig::bert_tiny(), 3, 42, &Device::Cpu, DType::F32)?;
            let cfg = TrainConfig::run_glue();
            let mut stepper = Stepper::new(&model, &spec, &cfg, 1000)?;
            let mut times = vec![];
            let mut parts: Vec<[f64; 7]> = vec![];
            let mut tokens = 0usize;
            // The sparse window is timed full: `fill` steps first.
            let warm = if sparse { fill.max(2) } else { 2 };
            for k in 0..steps + warm {
                let rows = &batches[k % batches.len()];
                let batch = split.collate(rows, pad_to, &Device::Cpu)?;
                let before = stepper
                    .optimizer()
                    .downcast_ref::<MFac>()
                    .map(|o| o.gram_timing());
                let t0 = Instant::now();
                stepper.step(&model, &batch, k)?;
                if k >= warm {
                    times.push(t0.elapsed().as_secs_f64());
                    tokens += batch.seq_len();
                    if let Some(o) = stepper.optimizer().downcast_ref::<MFac>() {
                        if let (Some(p), Some(b)) = (o.sparse_profile(), before) {
                            let g = o.gram_timing().since(&b);
                            parts.push([
                                p.accumulate_ms,
                                p.select_ms,
                                p.row_ms,
                                p.pass1_ms,
                                g.seconds * 1e3,
                                p.pass2_ms,
                                p.update_ms,
                            ]);
                        }
                    }
                }
            }
            times.sort_by(f64::total_cmp);
            if !parts.is_empty() {
                let part = |i: usize| {
                    let mut v: Vec<f64> = parts.iter().map(|p| p[i]).collect();
                    v.sort_by(f64::total_cmp);
                    v[v.len() / 2]
                };
                println!(
                    "  {} ({}): median ms — accumulator {:.2}, selection {:.2}, row write {:.2}, pass 1 {:.2}, m×m {:.2}, pass 2 {:.2}, update {:.2}",
                    spec.display_name(),
                    if pad_to.is_some() { "fixed 128" } else { "MNLI mix" },
                    part(0), part(1), part(2), part(3), part(4), part(5), part(6)
                );
            }
            println!(
                "| {} | {} | {} | {:.3} |",
                spec.display_name(),
                if pad_to.is_some() {
                    "fixed 128"
                } else {
                    "dynamic (MNLI mix)"
                },
                tokens / steps,
                times[times.len() / 2]
            );
        }
    }
    // The forward + backward pass alone (no clip, no update), at seq 128.
    let model = BertClassifier::random(&BertConfig::bert_tiny(), 3, 42, &Device::Cpu, DType::F32)?;
    let batch = split.collate(&batches[0], Some(128), &Device::Cpu)?;
    let pass = median_secs(steps, 2, || {
        model.loss_and_grads(&batch, true)?;
        Ok(())
    })?;
    println!("forward + backward alone, seq 128: {pass:.3} s (the CPU pass)");
    // The same through candle's autograd graph (what other devices run).
    let graph = median_secs(steps.min(5), 1, || {
        let logits = model.forward(&batch, true)?;
        let loss = BertClassifier::loss(&logits, batch.labels.as_ref().unwrap())?;
        loss.backward()?;
        Ok(())
    })?;
    println!(
        "forward + backward alone, seq 128: {graph:.3} s (candle graph: the reference engine)"
    );
    // Evaluation: the pass's forward alone against the graph's forward.
    let eval_pass = median_secs(steps, 2, || {
        model.logits(&batch)?;
        Ok(())
    })?;
    let graph_model = model.rebind()?.with_engine(Engine::Graph)?;
    let eval_graph = median_secs(steps.min(5), 1, || {
        graph_model.logits(&batch)?;
        Ok(())
    })?;
    println!("evaluation forward, seq 128: {eval_pass:.3} s (the CPU pass), {eval_graph:.3} s (candle graph)");
    Ok(())
}

/// The median seconds of `runs` calls of `f`, after `warmup` untimed ones.
fn median_secs(runs: usize, warmup: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = (0..runs)
        .map(|_| {
            let t0 = Instant::now();
            f().map(|_| t0.elapsed().as_secs_f64())
        })
        .collect::<Result<Vec<f64>>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
