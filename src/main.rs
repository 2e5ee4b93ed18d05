//! The `mfac-lab` command line: `compare` (Adam vs M-FAC, the main job), `glue` (run_glue's
//! flags), `info`.

use std::path::PathBuf;

use anyhow::Result;
use mfac_lab::cli::{select_device, GlueArgs};
use mfac_lab::data::GlueTask;
use mfac_lab::prelude::*;

fn print_metrics(title: &str, evals: &[mfac_lab::train::EvalRecord]) {
    println!("***** {title} metrics *****");
    for e in evals {
        let suffix = if e.split == "validation_mismatched" {
            "_mm"
        } else {
            ""
        };
        println!("  eval_loss{suffix:<12} = {:.4}", e.loss);
        for (m, v) in &e.metrics {
            println!("  eval_{m}{suffix:<8} = {v:.4}");
        }
    }
}

fn glue(args: &[String]) -> Result<()> {
    let a = GlueArgs::parse(args)?;
    let task = GlueTask::parse(&a.task_name)?;
    let device = select_device(&a.device)?;
    let opts = LoadOptions::default()
        .num_labels(task.num_labels())
        .device(device)
        .dtype(a.dtype)
        .seed(a.train.seed)
        .max_seq_length(a.train.max_seq_length);
    let model = BertClassifier::from_pretrained(&a.model_name_or_path, &opts)?;
    let data = match &a.data_dir {
        Some(d) => load_glue_dir(task, d)?,
        None => load_glue(task, &Hub::default())?,
    };
    let mut trainer = Trainer::new(model, a.train.clone());
    if let Some(o) = &a.output_dir {
        trainer = trainer.output_dir(o);
    }
    match &a.resume_from_checkpoint {
        Some(Some(dir)) => trainer = trainer.resume_from(dir),
        Some(None) => {
            let out = a.output_dir.as_deref().expect("checked by GlueArgs::parse");
            match mfac_lab::train::latest_checkpoint(out)? {
                Some(dir) => {
                    println!("Resuming from {}", dir.display());
                    trainer = trainer.resume_from(dir)
                }
                None => anyhow::bail!(
                    "--resume_from_checkpoint: no checkpoint in {} (checkpoint-<step> folders are written at each evaluation and every --save_steps)",
                    out.display()
                ),
            }
        }
        None => {}
    }
    if a.do_train {
        // Ctrl-C: finish the current step, write a checkpoint, exit non-zero with the command
        // that resumes. A second Ctrl-C exits at once.
        let stop = trainer.stop_handle();
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, std::sync::atomic::Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nStopping after this step (Ctrl-C again to quit at once)…");
        });
        eprintln!(
            "Training. Ctrl-C stops after the current step and writes a checkpoint to resume from."
        );
        let history = match trainer.fit(&data) {
            Ok(h) => h,
            Err(mfac_lab::Error::Interrupted {
                step,
                total,
                checkpoint: Some(c),
                ..
            }) => {
                let mut cmd: Vec<String> = std::env::args().collect();
                if !cmd
                    .iter()
                    .any(|x| x.starts_with("--resume_from_checkpoint"))
                {
                    cmd.push("--resume_from_checkpoint".into());
                    cmd.push(c.display().to_string());
                }
                anyhow::bail!(
                    "training stopped at step {step} of {total}; checkpoint written to {}. Resume with:\n  {}",
                    c.display(),
                    cmd.join(" ")
                );
            }
            Err(e) => return Err(e.into()),
        };
        let last_step = history.train.last().map(|r| r.step).unwrap_or(0);
        let finals: Vec<_> = history
            .evals
            .iter()
            .filter(|e| e.step == last_step)
            .cloned()
            .collect();
        print_metrics("eval", &finals);
    } else if a.do_eval {
        print_metrics("eval", &trainer.evaluate(&data)?);
    } else {
        anyhow::bail!("nothing to do: pass --do_train and/or --do_eval");
    }
    Ok(())
}

const DEMO_OUT: &str = "mfac-lab-results";

fn flag_values(args: &[String], name: &str) -> Vec<String> {
    let mut out = vec![];
    let mut i = 0;
    while i < args.len() {
        if args[i] == name {
            if let Some(v) = args.get(i + 1) {
                out.push(v.clone());
            }
            i += 2;
        } else if let Some(v) = args[i].strip_prefix(&format!("{name}=")) {
            out.push(v.to_string());
            i += 1;
        } else {
            i += 1;
        }
    }
    out
}

fn compare(args: &[String]) -> Result<()> {
    const FLAGS: &[&str] = &[
        "--task",
        "--model_name_or_path",
        "--optim",
        "--optim_args",
        "--seeds",
        "--num_train_epochs",
        "--max_train_samples",
        "--device",
        "--output_dir",
        "--data_dir",
        "--quiet",
    ];
    for a in args.iter().filter(|a| a.starts_with("--")) {
        let name = a.split('=').next().unwrap_or(a);
        if !FLAGS.contains(&name) {
            anyhow::bail!("unknown flag {name}; valid flags: {}", FLAGS.join(", "));
        }
    }
    let one = |name: &str| flag_values(args, name).pop();
    let quiet = args.iter().any(|a| a == "--quiet");
    let task = one("--task");
    let demo = task.is_none() && one("--data_dir").is_none();
    let task = GlueTask::parse(task.as_deref().unwrap_or("mnli"))?;
    let device = select_device(one("--device").as_deref().unwrap_or("auto"))?;
    let data = if let Some(d) = one("--data_dir") {
        load_glue_dir(task, d)?
    } else if demo {
        mnli_sample()?
    } else {
        load_glue(task, &Hub::default())?
    };
    let source = match one("--model_name_or_path") {
        Some(m) => ModelSource::Pretrained(m),
        None if demo => ModelSource::random_bert_tiny(),
        None => ModelSource::bert_tiny(),
    };
    let optims = flag_values(args, "--optim");
    let optim_args = flag_values(args, "--optim_args");
    let mut specs = vec![];
    if optims.is_empty() {
        // The card's M-FAC keeps 1024 gradients (18 GB in f32 for bert-tiny); the demo keeps 32,
        // with the lr scaled to its window (docs/MFAC_LR.md).
        specs = default_specs(if demo {
            mfac_lab::compare::DEMO_NUM_GRADS
        } else {
            1024
        });
    } else {
        // Unless --optim_args sets lr: AdamW 1e-4, M-FAC 1e-4 × 1024 / num_grads.
        for (i, o) in optims.iter().enumerate() {
            specs.push(OptimizerSpec::parse_scaled_lr(
                o,
                optim_args.get(i).map(String::as_str).unwrap_or(""),
            )?);
        }
    }
    let seeds: Vec<u64> = match one("--seeds") {
        Some(s) => s
            .split(',')
            .map(|x| x.trim().parse::<u64>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| {
                anyhow::anyhow!("--seeds wants a comma-separated list of integers: {e}")
            })?,
        None if demo => vec![42, 43],
        None => vec![42],
    };
    let mut train = TrainConfig::run_glue();
    train.quiet = quiet;
    train.num_train_epochs = match one("--num_train_epochs") {
        Some(e) => e
            .parse()
            .map_err(|e| anyhow::anyhow!("--num_train_epochs: {e}"))?,
        None if demo => 2.0,
        None => train.num_train_epochs,
    };
    if let Some(n) = one("--max_train_samples") {
        train.max_train_samples = Some(
            n.parse()
                .map_err(|e| anyhow::anyhow!("--max_train_samples: {e}"))?,
        );
    }
    let out = PathBuf::from(one("--output_dir").unwrap_or_else(|| DEMO_OUT.into()));
    if demo {
        println!(
            "Offline demo: Adam vs M-FAC (num_grads 32, lr 3.2e-3: the card's 1e-4 scaled by \
             1024/32, docs/MFAC_LR.md) on the embedded real MNLI sample (1,200 training pairs), with a randomly initialised bert-tiny (seeded), seeds 42 and 43, 2 \
             epochs. These numbers are NOT the model card's: for real ones run \
             `mfac-lab compare --task mnli` (downloads prajjwal1/bert-tiny and GLUE/MNLI from the \
             hub; M-FAC with 1024 gradients wants a GPU or ~18 GB of RAM)."
        );
    }
    let cfg = CompareConfig {
        train,
        seeds,
        device,
        output_dir: Some(out.join("runs")),
        ..CompareConfig::default()
    };
    let (cmp, failed) = match compare_optimizers(&source, &data, &specs, &cfg) {
        Ok(c) => (c, None),
        Err(mfac_lab::Error::RunsFailed {
            partial,
            failed,
            total,
        }) => (
            *partial,
            Some(format!(
                "{} of {total} runs failed: {}",
                failed.len(),
                failed.join("; ")
            )),
        ),
        Err(e) => return Err(e.into()),
    };
    if !cmp.runs.is_empty() {
        cmp.save(&out)?;
        println!("\n{}", cmp.to_markdown());
        println!(
            "Wrote {}: history.parquet/.csv, summary.md/.csv, loss/accuracy/final .png and .svg, runs/",
            out.display()
        );
    }
    if let Some(msg) = failed {
        anyhow::bail!(msg);
    }
    Ok(())
}

const USAGE: &str = "mfac-lab — fine-tune BERT-tiny with M-FAC vs Adam (candle)

USAGE:
    mfac-lab compare [flags]         Adam vs M-FAC: trains each optimizer with each seed, prints
                                     the summary (mean ± std) and writes history, summary and plots.
        With no flags: an offline demo on the embedded real MNLI sample and a random bert-tiny.
        --task mnli (hub data and prajjwal1/bert-tiny), --data_dir DIR, --model_name_or_path M,
        --optim NAME [--optim_args ARGS] (repeatable, paired in order; an M-FAC without lr
        gets 1e-4 × 1024 / num_grads), --seeds 42,43,44,
        --num_train_epochs N, --max_train_samples N, --device cpu|cuda|auto,
        --output_dir DIR (default mfac-lab-results), --quiet
    mfac-lab glue [run_glue flags]   train and/or evaluate like HF's run_glue.py, e.g.
        --seed 42 --model_name_or_path prajjwal1/bert-tiny --task_name mnli --do_train --do_eval
        --max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 1e-4
        --num_train_epochs 5 --output_dir out_dir --optim MFAC
        --optim_args \"lr: 1e-4, num_grads: 1024, damp: 1e-6\"
      also: --data_dir DIR (local parquet/TSV), --device cpu|cuda|auto, --dtype f32|f64,
            --max_steps N, --max_train_samples N, --max_eval_samples N, --eval_steps N,
            --pad_to_max_length, --quiet,
            --save_steps N (a checkpoint every N steps, besides one at each evaluation),
            --save_total_limit K (keep the K newest checkpoints),
            --resume_from_checkpoint [DIR] (continue exactly; no DIR: the newest checkpoint
              in --output_dir), --overwrite_output_dir (train into a folder holding other
              files; only mfac-lab's own files are replaced)
      Ctrl-C finishes the current step, writes a checkpoint and prints the resume command.
    mfac-lab info [MODEL]            load MODEL (local HF folder or hub id; default
                                     prajjwal1/bert-tiny) and describe it
    mfac-lab help                    this text

Environment: HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1 (cache only), HF_TOKEN.";

/// The library logs through the `log` crate and prints nothing itself; the command shows its
/// warnings (and, with `RUST_LOG=debug` or `info`, more) on stderr.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::max_level()
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            eprintln!("{}: {}", r.level().as_str().to_lowercase(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> Result<()> {
    let level = match std::env::var("RUST_LOG").as_deref() {
        Ok("error") => log::LevelFilter::Error,
        Ok("info") => log::LevelFilter::Info,
        Ok("debug") | Ok("trace") => log::LevelFilter::Debug,
        Ok("off") => log::LevelFilter::Off,
        _ => log::LevelFilter::Warn,
    };
    if log::set_logger(&StderrLog).is_ok() {
        log::set_max_level(level);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("help") | Some("--help") | Some("-h") => {
            println!("{USAGE}");
            Ok(())
        }
        Some("glue") => glue(&args[1..]),
        Some("compare") => compare(&args[1..]),
        Some("info") => {
            let src = args
                .get(1)
                .map(String::as_str)
                .unwrap_or(mfac_lab::model::BERT_TINY_REPO);
            let model = BertClassifier::from_pretrained(src, &LoadOptions::default())?;
            println!("{model:?}");
            println!("{:#?}", model.load_report());
            Ok(())
        }
        Some(other) => {
            eprintln!("{USAGE}");
            anyhow::bail!("unknown command {other:?}")
        }
    }
}
