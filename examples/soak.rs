//! The soak benchmark at the model card's size (issue 24): MNLI's 392,702 training pairs,
//! bert-tiny, M-FAC at num_grads 1024 with the bf16 window (8.98 GB), on the CPU.
//!
//! ```sh
//! cargo build --release --bins --examples && target/release/examples/soak [--steps 1100] [--extra 50] [--dir target/soak]
//! ```
//!
//! 1. Builds a GLUE-shaped MNLI train split of 392,702 rows from the embedded real sample
//!    (1,200 pairs): row i takes pair k = i mod 1,200 and, by round r = i div 1,200, keeps its
//!    premise (r mod 3 = 0), appends the premise of pair (k + r) mod 1,200 to it (r mod 3 = 1,
//!    long: many reach the 128-token cut), or keeps the premise's first half of words
//!    (r mod 3 = 2, short); hypothesis and label are pair k's. Written as the hub's parquet
//!    (premise, hypothesis, label, idx), with the sample's matched/mismatched rows as eval splits.
//! 2. Times loading and tokenizing the whole split (max_length 128) as the trainer does.
//! 3. Runs `mfac-lab glue` on it (a random bert-tiny saved to a folder: the hub is not
//!    reachable here): `--steps` + `--extra` steps, a checkpoint at `--steps`, and samples the
//!    process's resident memory at every logging line (every 25 steps). When the next
//!    checkpoint (at `--steps` + `--extra`) is writing its optimizer state, it copies that
//!    checkpoint's model file (complete: written before the state) — the uninterrupted run's
//!    weights at that step — and SIGKILLs the process.
//! 4. Resumes with `--resume_from_checkpoint` (the newest complete checkpoint), trains the
//!    `--extra` steps again and compares the weights with the uninterrupted run's, bit for bit.
//!
//! Prints: load + tokenize time, resident memory over the steps (first, last, min, max, growth),
//! seconds per step, the checkpoint's size and write time, the resume time, the comparison, and
//! the projected time of the card's 5 epochs (61,360 steps) on this machine.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mfac_lab::compare::ModelSource;
use mfac_lab::data::{load_glue_dir, mnli_sample, EncodedSplit, GlueTask};
use mfac_lab::prelude::*;
use polars::prelude::*;

const ROWS: usize = 392_702;
const LOG_EVERY: usize = 25;
/// M-FAC's window (the card's num_grads).
const NUM_GRADS: usize = 1024;

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The synthetic train split (see the module's doc) as the hub's MNLI columns.
fn train_frame(sample: &DataFrame) -> Result<DataFrame> {
    let col = |n: &str| -> Result<Vec<String>> {
        Ok(sample
            .column(n)?
            .str()?
            .iter()
            .map(|s| s.unwrap_or("").to_string())
            .collect())
    };
    let (prem, hyp) = (col("premise")?, col("hypothesis")?);
    let labels: Vec<i64> = sample
        .column("label")?
        .cast(&DataType::Int64)?
        .i64()?
        .iter()
        .map(|v| v.unwrap_or(0))
        .collect();
    let n = prem.len();
    let (mut p, mut h, mut l, mut idx) = (vec![], vec![], vec![], vec![]);
    for i in 0..ROWS {
        let (k, r) = (i % n, i / n);
        p.push(match r % 3 {
            0 => prem[k].clone(),
            1 => format!("{} {}", prem[k], prem[(k + r) % n]),
            _ => {
                let w: Vec<&str> = prem[k].split_whitespace().collect();
                w[..w.len().div_ceil(2)].join(" ")
            }
        });
        h.push(hyp[k].clone());
        l.push(labels[k]);
        idx.push(i as i32);
    }
    Ok(DataFrame::new_infer_height(vec![
        Column::new("premise".into(), p),
        Column::new("hypothesis".into(), h),
        Column::new("label".into(), l),
        Column::new("idx".into(), idx),
    ])?)
}

fn write_parquet(df: &mut DataFrame, path: &Path) -> Result<()> {
    let f = std::fs::File::create(path)?;
    ParquetWriter::new(f).finish(df)?;
    Ok(())
}

/// Resident memory of process `pid`, bytes.
fn rss(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// The names in `dir` holding `part`.
fn names_with(dir: &Path, part: &str) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.file_name().unwrap().to_string_lossy().contains(part))
                .collect()
        })
        .unwrap_or_default()
}

/// One run of the CLI: its stderr lines with their arrival times, resident memory sampled at
/// each logging line (step, bytes).
struct Watch {
    lines: mpsc::Receiver<(Instant, String)>,
}

fn spawn(cmd: &mut Command) -> Result<(Child, Watch)> {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env("RUST_LOG", "info")
        .spawn()?;
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    Ok((child, Watch { lines: rx }))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let steps: usize = arg(&args, "--steps", 1100);
    let extra: usize = arg(&args, "--extra", 50);
    let dir = PathBuf::from(arg(&args, "--dir", "target/soak".to_string()));
    let exe = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("mfac-lab"))
        .context("locating the mfac-lab binary")?;
    if !exe.is_file() {
        bail!("{} is missing: cargo build --release --bins", exe.display());
    }
    // The folder is the benchmark's own (marked): an existing folder without the mark is the
    // user's, and nothing in it is removed.
    let marker = dir.join(".mfac-lab-soak");
    if dir.exists() && std::fs::read_dir(&dir)?.next().is_some() && !marker.exists() {
        bail!(
            "{} exists and was not made by this benchmark: pass another --dir",
            dir.display()
        );
    }
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        &marker,
        "made by examples/soak.rs; its subfolders are rewritten each run\n",
    )?;
    for sub in ["data", "model", "run", "uninterrupted.safetensors"] {
        let p = dir.join(sub);
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else if p.exists() {
            std::fs::remove_file(&p)?;
        }
    }
    let data_dir = dir.join("data");
    std::fs::create_dir_all(&data_dir)?;

    // 1. The split.
    let sample = mnli_sample()?;
    let mut train = train_frame(&sample.train)?;
    write_parquet(&mut train, &data_dir.join("train-00000-of-00001.parquet"))?;
    for (name, df) in &sample.eval {
        write_parquet(
            &mut df.clone(),
            &data_dir.join(format!("{name}-00000-of-00001.parquet")),
        )?;
    }
    drop(train);
    let model_dir = dir.join("model");
    ModelSource::random_bert_tiny()
        .load(3, 42, &Device::Cpu, DType::F32)?
        .save_pretrained(&model_dir)?;

    // 2. Load + tokenize, as the trainer does.
    let t0 = Instant::now();
    let data = load_glue_dir(GlueTask::Mnli, &data_dir)?;
    let t_load = t0.elapsed().as_secs_f64();
    let model = BertClassifier::from_dir(&model_dir, 3, &Device::Cpu, DType::F32)?;
    let tok = model.tokenizer()?.clone().with_max_length(128)?;
    let (pairs, labels) = data.pairs(&data.train)?;
    let split = EncodedSplit::encode(&tok, &pairs, &labels)?;
    let t_all = t0.elapsed().as_secs_f64();
    let lens: Vec<usize> = split.ids.iter().map(Vec::len).collect();
    let mean = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
    let at_cut = lens.iter().filter(|&&l| l >= 128).count();
    println!(
        "load + tokenize {} rows: {t_all:.2} s (parquet {t_load:.2} s, tokenize {:.2} s; {:.0} rows/s); tokens per pair: mean {mean:.1}, min {}, max {}, {:.1} % at the 128 cut",
        split.len(),
        t_all - t_load,
        split.len() as f64 / t_all,
        lens.iter().min().unwrap(),
        lens.iter().max().unwrap(),
        100.0 * at_cut as f64 / lens.len() as f64
    );
    drop((split, pairs, labels, data, model));

    // 3. The run, killed while writing its second checkpoint.
    let run_dir = dir.join("run");
    let total = steps + extra;
    let glue = || {
        let mut c = Command::new(&exe);
        c.arg("glue")
            .arg("--model_name_or_path")
            .arg(&model_dir)
            .args(["--task_name", "mnli", "--do_train", "--device", "cpu"])
            .arg("--data_dir")
            .arg(&data_dir)
            .args([
                "--max_seq_length",
                "128",
                "--per_device_train_batch_size",
                "32",
            ])
            .args(["--learning_rate", "1e-4", "--num_train_epochs", "5"])
            .args([
                "--max_steps",
                &total.to_string(),
                "--save_steps",
                &steps.to_string(),
            ])
            .args([
                "--save_total_limit",
                "1",
                "--logging_steps",
                &LOG_EVERY.to_string(),
            ])
            .args(["--max_eval_samples", "256", "--seed", "42", "--output_dir"])
            .arg(&run_dir)
            .args(["--optim", "MFAC", "--optim_args"])
            .arg("lr: 1e-4, num_grads: 1024, damp: 1e-6, window_dtype: bf16");
        c
    };
    let started = Instant::now();
    let (mut child, watch) = spawn(&mut glue())?;
    let pid = child.id();
    let mut samples: Vec<(usize, f64, u64)> = vec![]; // (step, seconds, rss)
    let mut logged = 0;
    let mut info = vec![];
    let uninterrupted = dir.join("uninterrupted.safetensors");
    let killed_at = loop {
        while let Ok((t, line)) = watch.lines.try_recv() {
            if line.starts_with("{'loss'") {
                logged += 1;
                let at = (t - started).as_secs_f64();
                samples.push((logged * LOG_EVERY, at, rss(pid).unwrap_or(0)));
                if logged % 4 == 0 {
                    let (s, _, r) = samples[samples.len() - 1];
                    eprintln!("step {s}: {at:.0} s, resident {:.2} GB", r as f64 / 1e9);
                }
            } else if line.contains("written in") || line.contains("disk plan") {
                eprintln!("{line}");
                info.push(line);
            }
        }
        if let Some(tmp) = names_with(&run_dir, &format!(".checkpoint-{total}.tmp-")).first() {
            let writing = names_with(tmp, ".optimizer.safetensors.tmp-");
            let size = writing
                .first()
                .and_then(|p| p.metadata().ok())
                .map(|m| m.len());
            if size.is_some_and(|s| s > 1 << 30) {
                std::fs::copy(tmp.join("model.safetensors"), &uninterrupted)?;
                child.kill()?; // SIGKILL
                child.wait()?;
                break size.unwrap();
            }
        }
        if let Some(st) = child.try_wait()? {
            bail!("the run ended ({st}) before checkpoint-{total} could be interrupted");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    println!(
        "killed during checkpoint-{total}'s optimizer write ({:.2} GB of it on disk); complete checkpoints: {:?}",
        killed_at as f64 / 1e9,
        mfac_lab::train::checkpoints(&run_dir)?.iter().map(|c| c.0).collect::<Vec<_>>()
    );

    // Resident memory and step time over the run.
    let steady: Vec<&(usize, f64, u64)> = samples.iter().collect();
    let (first, last) = (steady[0], steady[steady.len() - 1]);
    let min = steady.iter().map(|s| s.2).min().unwrap();
    let max = steady.iter().map(|s| s.2).max().unwrap();
    println!(
        "resident memory, steps {}–{} ({} samples): first {:.3} GB, last {:.3} GB, min {:.3}, max {:.3}; growth first→last {:+.2} %, max over min {:+.2} %",
        first.0,
        last.0,
        steady.len(),
        first.2 as f64 / 1e9,
        last.2 as f64 / 1e9,
        min as f64 / 1e9,
        max as f64 / 1e9,
        100.0 * (last.2 as f64 / first.2 as f64 - 1.0),
        100.0 * (max as f64 / min as f64 - 1.0)
    );
    // An M-FAC step reads the filled rows: it grows until the window is full (step 1,024);
    // the steady figure is from the intervals after that, the checkpoint's interval left out.
    let interval = |w: &[(usize, f64, u64)]| (w[1].1 - w[0].1) / (w[1].0 - w[0].0) as f64;
    let clean = |w: &&[(usize, f64, u64)]| !(w[0].0 <= steps && steps < w[1].0);
    let mut per_step: Vec<f64> = samples
        .windows(2)
        .filter(clean)
        .filter(|w| w[0].0 >= NUM_GRADS)
        .map(interval)
        .collect();
    let full = !per_step.is_empty();
    if !full {
        per_step = samples.windows(2).filter(clean).map(interval).collect();
    }
    per_step.sort_by(f64::total_cmp);
    let s_step = per_step[per_step.len() / 2];
    println!(
        "seconds per step{}: median {s_step:.3} (of {} intervals of {LOG_EVERY} steps; min {:.3}, max {:.3})",
        if full { " with the window full" } else { " (the window still filling: an underestimate)" },
        per_step.len(),
        per_step[0],
        per_step[per_step.len() - 1]
    );
    let filling: Vec<String> = samples
        .windows(2)
        .filter(clean)
        .filter(|w| w[1].0 % 200 == 0)
        .map(|w| format!("{}: {:.3}", w[1].0, interval(w)))
        .collect();
    println!(
        "seconds per step as the window fills (step: s): {}",
        filling.join(", ")
    );
    println!(
        "projected: the card's 5 epochs (61,360 steps) ≈ {:.1} h of training on this machine (evaluation excluded)",
        61_360.0 * s_step / 3600.0
    );

    for l in &info {
        println!("{l}");
    }

    // 4. Resume and compare.
    let t = Instant::now();
    let (mut child, watch) = spawn(glue().arg("--resume_from_checkpoint"))?;
    let status = child.wait()?;
    let resume_wall = t.elapsed().as_secs_f64();
    for (_, line) in watch.lines.try_iter() {
        if line.contains("resumed from") || line.contains("written in") || line.contains("rror") {
            println!("{line}");
        }
    }
    if !status.success() {
        bail!("the resumed run failed ({status})");
    }
    let a = std::fs::read(&uninterrupted)?;
    let b = std::fs::read(run_dir.join(format!("checkpoint-{total}/model.safetensors")))?;
    println!(
        "resumed run: {resume_wall:.1} s for {extra} steps + checkpoint; weights at step {total} vs the uninterrupted run's: {}",
        if a == b { "bit-identical" } else { "DIFFERENT" }
    );
    println!(
        "stale temporary folders left: {:?}",
        names_with(&run_dir, ".tmp-")
    );
    if a != b {
        bail!("the resumed weights differ");
    }
    Ok(())
}
