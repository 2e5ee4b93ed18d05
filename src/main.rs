//! The `mfac-lab` command line. The training commands (`glue`, `compare`) arrive with the trainer;
//! for now it can fetch and inspect a model.

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

const USAGE: &str = "mfac-lab — fine-tune BERT-tiny with M-FAC vs Adam (candle)

USAGE:
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

Environment: HF_ENDPOINT, HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE=1 (cache only), HF_TOKEN.
The `compare` command (Adam vs M-FAC) is not implemented yet.";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("help") | Some("--help") | Some("-h") => {
            println!("{USAGE}");
            Ok(())
        }
        Some("glue") => glue(&args[1..]),
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
