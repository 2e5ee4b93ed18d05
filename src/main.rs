//! The `mfac-lab` command line: `compare` (Adam vs M-FAC, the main job), `glue` (run_glue's
//! flags), `info`.

use anyhow::Result;
use clap::{CommandFactory, Parser};
use mfac_lab::cli::{select_device, Cli, Command, CompareFlags, GlueArgs};
use mfac_lab::compare::CompareDefaults;
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

fn glue(a: GlueArgs) -> Result<()> {
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

/// `mfac-lab card`: a model card's recipe through `compare`, the card beside the results.
fn card(f: mfac_lab::cli::CardFlags) -> Result<()> {
    let card = mfac_lab::cards::find(&f.task, &f.model)?;
    let report_to = ReportTo::parse(&f.report_to)?;
    let (specs, mut train) = mfac_lab::cards::recipe_with_density(&card, f.density)?;
    let seeds = if f.seeds.is_empty() {
        vec![42, 43, 44, 45, 46]
    } else {
        f.seeds.clone()
    };
    println!(
        "{}\nRecipe: {} on {}, {} and {} (damp 1e-6, num_grads {}), lr 1e-4, batch {}, max_seq_length {}, {} epochs, seeds {seeds:?}.",
        mfac_lab::cards::card_markdown(&card),
        card.model,
        card.task.name(),
        specs[0].display_name(),
        specs[1].display_name(),
        card.num_grads,
        train.batch_size,
        train.max_seq_length,
        train.num_train_epochs,
    );
    if let Some(note) = mfac_lab::cards::sparse_note(&specs) {
        println!("{note}");
    }
    if f.dry_run {
        return Ok(());
    }
    train.quiet = f.quiet;
    train.report_to = report_to;
    let cfg = CompareConfig {
        train,
        seeds,
        device: select_device(&f.device)?,
        output_dir: Some(f.output_dir.join("runs")),
        ..CompareConfig::default()
    };
    let data = load_glue(card.task, &Hub::default())?;
    let cmp = compare_optimizers(
        &ModelSource::Pretrained(card.model.into()),
        &data,
        &specs,
        &cfg,
    )?;
    cmp.save(&f.output_dir)?;
    println!("\n{}", cmp.to_markdown());
    cmp.check()?;
    Ok(())
}

fn compare(f: CompareFlags) -> Result<()> {
    let demo = f.task.is_none() && f.data_dir.is_none();
    let defaults = if demo {
        CompareDefaults::demo()
    } else {
        CompareDefaults::recipe()
    };
    let task = GlueTask::parse(f.task.as_deref().unwrap_or("mnli"))?;
    if let Some(t) = f.target {
        mfac_lab::compare::check_target(task, t)?;
    }
    let mut specs = vec![];
    // Unless --optim_args sets lr: AdamW 1e-4, M-FAC 1e-4 × 1024 / num_grads.
    for (i, o) in f.optim.iter().enumerate() {
        specs.push(OptimizerSpec::parse_scaled_lr(
            o,
            f.optim_args.get(i).map(String::as_str).unwrap_or(""),
        )?);
    }
    if specs.is_empty() {
        // The card's M-FAC keeps 1024 gradients (18 GB in f32 for bert-tiny); the demo keeps 32,
        // with the lr scaled to its window (docs/MFAC_LR.md).
        specs = defaults.specs();
    }
    let seeds = if f.seeds.is_empty() {
        defaults.seeds.clone()
    } else {
        f.seeds.clone()
    };
    let mut train = TrainConfig::run_glue();
    train.quiet = f.quiet;
    train.num_train_epochs = f.num_train_epochs.unwrap_or(defaults.num_train_epochs);
    train.max_train_samples = f.max_train_samples;
    train.report_to = ReportTo::parse(&f.report_to)?;
    train.validate()?;
    let device = select_device(&f.device)?;
    let data = if let Some(d) = &f.data_dir {
        load_glue_dir(task, d)?
    } else if demo {
        mnli_sample()?
    } else {
        load_glue(task, &Hub::default())?
    };
    let (source, model_note) = match &f.model_name_or_path {
        Some(m) => (ModelSource::Pretrained(m.clone()), None),
        // The pretrained bert-tiny when the hub delivers it within a few seconds (cached after),
        // else the seeded random one; HF_HUB_OFFLINE=1 makes no request.
        None if demo => {
            let (s, note) =
                ModelSource::demo_bert_tiny(&Hub::default(), std::time::Duration::from_secs(5));
            (s, Some(note))
        }
        None => (ModelSource::bert_tiny(), None),
    };
    let out = f.output_dir.clone();
    if demo {
        let labels = OptimizerSpec::labels(&specs)?;
        println!(
            "Offline demo: {} on the embedded real MNLI sample (1,200 training pairs), seeds \
             {seeds:?}, {e} epochs. Dense M-FAC with {m} gradients takes the card's lr 1e-4 scaled \
             by 1024/{m} (docs/MFAC_LR.md); `M-FAC m=1024 1%` is the card's own M-FAC (1,024 \
             gradients, lr 1e-4, damp 1e-6) with the sparse window: each row the top 1 % of an \
             error-feedback accumulator, ≈ 0.33 GB of state where the dense window needs 18 GB. \
             {}\nThese numbers are NOT the model card's: for real ones run `mfac-lab compare \
             --task mnli` (GLUE/MNLI from the hub), or `mfac-lab card --density 0.01`.",
            labels.join(", "),
            model_note.unwrap_or_default(),
            m = defaults.num_grads,
            e = train.num_train_epochs,
        );
    }
    let cfg = CompareConfig {
        train,
        seeds,
        device,
        output_dir: Some(out.join("runs")),
        target: f.target,
        ..CompareConfig::default()
    };
    // A failed run does not stop the others: what finished is written, then the command exits
    // non-zero naming the failures.
    let cmp = compare_optimizers(&source, &data, &specs, &cfg)?;
    cmp.save(&out)?;
    println!("\n{}", cmp.to_markdown());
    println!(
        "Wrote {}: history.parquet/.csv, summary.md/.csv, loss/accuracy (per step and per training second)/final/time (where the time went) .png and .svg, runs/",
        out.display()
    );
    cmp.check()?;
    Ok(())
}

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
    // clap prints --help (for `mfac-lab` and each command) and usage errors, with a suggestion
    // for a mistyped flag, and exits (0 for help, 2 for an error).
    let cli = Cli::parse();
    match cli.command {
        None => {
            let _ = Cli::command().print_help();
            println!();
            Ok(())
        }
        Some(Command::Glue(flags)) => glue(GlueArgs::from_flags(flags)?),
        Some(Command::Compare(flags)) => {
            flags.check()?;
            compare(flags)
        }
        Some(Command::Card(flags)) => card(flags),
        Some(Command::Info { model }) => {
            let model = BertClassifier::from_pretrained(&model, &LoadOptions::default())?;
            println!("{model:?}");
            println!("{:#?}", model.load_report());
            Ok(())
        }
    }
}
