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
        .dtype(a.train.dtype)
        .seed(a.train.seed)
        .max_seq_length(a.train.max_seq_length);
    let model = BertClassifier::from_pretrained(&a.model_name_or_path, &opts)?;
    let data = match &a.data_dir {
        Some(d) => load_glue_dir(task, d)?,
        None => load_glue(task, &Hub::default())?,
    };
    let mut trainer = Trainer::new(model, a.train.clone()).optimizer(a.optimizer);
    if let Some(o) = &a.output_dir {
        trainer = trainer.output_dir(o);
    }
    if a.do_train {
        let history = trainer.fit(&data)?;
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
        specs.push(OptimizerSpec::adamw(1e-4));
        // The card's M-FAC keeps 1024 gradients (18 GB in f32 for bert-tiny); the demo keeps 32.
        let m = if demo { 32 } else { 1024 };
        specs.push(OptimizerSpec::mfac(MFacConfig {
            num_grads: m,
            ..MFacConfig::model_card()
        }));
    } else {
        for (i, o) in optims.iter().enumerate() {
            specs.push(OptimizerSpec::parse_with_lr(
                o,
                optim_args.get(i).map(String::as_str).unwrap_or(""),
                1e-4,
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
            "Offline demo: Adam vs M-FAC (num_grads 32) on the embedded real MNLI sample (1,200 \
             training pairs), with a randomly initialised bert-tiny (seeded), seeds 42 and 43, 2 \
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
        --optim NAME [--optim_args ARGS] (repeatable, paired in order), --seeds 42,43,44,
        --num_train_epochs N, --max_train_samples N, --device cpu|cuda|auto,
        --output_dir DIR (default mfac-lab-results), --quiet
    mfac-lab glue [run_glue flags]   train and/or evaluate like HF's run_glue.py, e.g.
        --seed 42 --model_name_or_path prajjwal1/bert-tiny --task_name mnli --do_train --do_eval
        --max_seq_length 128 --per_device_train_batch_size 32 --learning_rate 1e-4
        --num_train_epochs 5 --output_dir out_dir --optim MFAC
        --optim_args \"lr: 1e-4, num_grads: 1024, damp: 1e-6\"
      also: --data_dir DIR (local parquet/TSV), --device cpu|cuda|auto, --dtype f32|f64,
            --max_steps N, --max_train_samples N, --max_eval_samples N, --eval_steps N,
            --pad_to_max_length, --quiet
    mfac-lab info [MODEL]            load MODEL (local HF folder or hub id; default
                                     prajjwal1/bert-tiny) and describe it
    mfac-lab help                    this text

Environment: HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1 (cache only), HF_TOKEN.";

fn main() -> Result<()> {
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
