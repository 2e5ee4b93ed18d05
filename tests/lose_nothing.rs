//! Nothing of the user's is lost or leaked: output folders keep the user's files, the CLI
//! refuses bad numbers before writing anything, Ctrl-C leaves a checkpoint and the command that
//! resumes it, the hub token never shows in `Debug`, and bad inputs are errors, not panics.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device, Tensor, Var};
use common::{fixture, shared};
use mfac_lab::data::{mnli_sample, EncodedSplit};
use mfac_lab::optim::{AdamW, AdamWConfig, OptimizerSpec};
use mfac_lab::plot::Figure;
use mfac_lab::prelude::*;

const USER_FILE: &str = "my-notes.txt";
const USER_TEXT: &str = "results I wrote by hand";

fn put_user_file(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(USER_FILE), USER_TEXT).unwrap();
}

fn user_file_survived(dir: &Path) {
    assert_eq!(
        std::fs::read_to_string(dir.join(USER_FILE)).unwrap(),
        USER_TEXT,
        "{}",
        dir.display()
    );
}

/// A local MNLI folder (train = the real matched dev rows) for the `glue` command.
fn glue_data(tmp: &Path) -> PathBuf {
    let d = tmp.join("mnli-data");
    std::fs::create_dir_all(&d).unwrap();
    let src = shared().join("data/mnli-textfooler");
    let m = src.join("validation_matched-00000-of-00001.parquet");
    let mm = src.join("validation_mismatched-00000-of-00001.parquet");
    std::fs::copy(&m, d.join("train-00000-of-00001.parquet")).unwrap();
    std::fs::copy(&m, d.join("validation_matched-00000-of-00001.parquet")).unwrap();
    std::fs::copy(&mm, d.join("validation_mismatched-00000-of-00001.parquet")).unwrap();
    d
}

/// `mfac-lab glue` on bert-micro-random and `data`, 4 steps of 8 rows, offline.
fn glue_base(data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mfac-lab"));
    c.arg("glue")
        .args(["--model_name_or_path"])
        .arg(fixture("bert-micro-random"))
        .args(["--task_name", "mnli", "--do_train", "--device", "cpu"])
        .arg("--data_dir")
        .arg(data)
        .args(["--max_train_samples", "32", "--max_eval_samples", "16"])
        .args([
            "--per_device_train_batch_size",
            "8",
            "--num_train_epochs",
            "1",
        ])
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", "http://127.0.0.1:9");
    c
}

fn glue_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = glue_base(data);
    c.arg("--output_dir")
        .arg(out)
        .args(["--learning_rate", "1e-3", "--quiet"])
        .args(extra);
    c
}

fn run(mut c: Command) -> (bool, String) {
    let o = c.output().unwrap();
    (
        o.status.success(),
        format!(
            "{}\n{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[test]
fn glue_keeps_the_users_files_and_needs_overwrite_output_dir_for_a_foreign_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let data = glue_data(tmp.path());
    let out = tmp.path().join("results");
    put_user_file(&out);
    // A folder holding the user's files: refused, naming the flag; nothing written.
    let (ok, text) = run(glue_cmd(&data, &out, &[]));
    assert!(!ok && text.contains("--overwrite_output_dir"), "{text}");
    assert!(!out.join("config.json").exists());
    user_file_survived(&out);
    // With the flag: trains, writes our files beside the user's.
    let (ok, text) = run(glue_cmd(&data, &out, &["--overwrite_output_dir"]));
    assert!(ok, "{text}");
    assert!(out.join("model.safetensors").is_file() && out.join("eval_results.json").is_file());
    user_file_survived(&out);
    // Again, over our own outputs and checkpoints: still only ours are replaced.
    let (ok, text) = run(glue_cmd(&data, &out, &["--overwrite_output_dir"]));
    assert!(ok, "{text}");
    user_file_survived(&out);
    // Without the flag, the user's file still blocks training into the folder.
    let (ok, text) = run(glue_cmd(&data, &out, &[]));
    assert!(!ok && text.contains("--overwrite_output_dir"), "{text}");
}

#[test]
fn save_pretrained_writes_only_its_own_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    put_user_file(&dir);
    std::fs::create_dir(dir.join("subfolder")).unwrap();
    let m = BertClassifier::from_dir(fixture("bert-micro-random"), 3, &Device::Cpu, DType::F32)
        .unwrap();
    m.save_pretrained(&dir).unwrap();
    m.save_pretrained(&dir).unwrap();
    user_file_survived(&dir);
    assert!(dir.join("subfolder").is_dir());
    // No temporary files left behind.
    let stray: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
    BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F32).unwrap();
}

#[test]
fn compare_and_figures_leave_other_files_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("cmp");
    put_user_file(&out);
    put_user_file(&out.join("runs"));
    let c = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mfac-lab"));
        c.args(["compare", "--seeds", "42", "--num_train_epochs", "1"])
            .args(["--max_train_samples", "16", "--device", "cpu", "--quiet"])
            .arg("--output_dir")
            .arg(&out)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_ENDPOINT", "http://127.0.0.1:9");
        c
    };
    let (ok, text) = run(c());
    assert!(ok, "{text}");
    assert!(out.join("summary.md").is_file());
    // A rerun replaces our files only.
    let (ok, text) = run(c());
    assert!(ok, "{text}");
    user_file_survived(&out);
    user_file_survived(&out.join("runs"));
    // Figure::save replaces its own file and nothing else.
    let fig = Figure::lines("t", "x", "y", vec![]);
    fig.save(out.join("extra.svg")).unwrap();
    user_file_survived(&out);
}

#[test]
fn bad_numbers_on_the_command_line_are_refused_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    let data = glue_data(tmp.path());
    for (flag, v) in [
        ("--learning_rate", "nan"),
        ("--learning_rate", "inf"),
        ("--learning_rate", "-1"),
        ("--weight_decay", "nan"),
        ("--max_grad_norm", "nan"),
        ("--num_train_epochs", "inf"),
        ("--num_train_epochs", "0"),
        ("--per_device_train_batch_size", "0"),
        ("--save_steps", "0"),
    ] {
        let out = tmp.path().join(format!("out{flag}{v}"));
        let (ok, text) = run(glue_cmd(&data, &out, &[flag, v]));
        assert!(!ok, "{flag} {v} was accepted:\n{text}");
        assert!(text.contains(flag), "{flag} {v}: {text}");
        assert!(!out.exists(), "{flag} {v}: the output folder was created");
    }
    // The library checks the same before training.
    let c = TrainConfig {
        optimizer: OptimizerSpec::adamw(f64::NAN),
        ..TrainConfig::run_glue()
    };
    let m = BertClassifier::from_dir(fixture("bert-micro-random"), 3, &Device::Cpu, DType::F32)
        .unwrap();
    let e = Trainer::new(m, c)
        .fit(&mnli_sample().unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("lr"), "{e}");
}

#[test]
fn ctrl_c_finishes_the_step_writes_a_checkpoint_and_prints_the_resume_command() {
    let tmp = tempfile::tempdir().unwrap();
    let data = glue_data(tmp.path());
    let out = tmp.path().join("run");
    // Enough steps that the run is still going when the signal arrives.
    let mut c = glue_cmd(
        &data,
        &out,
        &["--max_train_samples", "800", "--num_train_epochs", "3"],
    );
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    // The command says when Ctrl-C is handled; wait for that line.
    let mut stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    use std::io::Read;
    while !String::from_utf8_lossy(&seen).contains("Ctrl-C") {
        let n = stderr.read(&mut buf).unwrap();
        assert!(n > 0, "exited early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    // SAFETY: sends SIGINT to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    let text = format!("{}{rest}", String::from_utf8_lossy(&seen));
    assert!(!status.success(), "{text}");
    assert!(text.contains("--resume_from_checkpoint"), "{text}");
    let ckpt = mfac_lab::train::latest_checkpoint(&out)
        .unwrap()
        .expect(&text);
    // The printed command resumes and finishes the run.
    let (ok, text) = run(glue_cmd(
        &data,
        &out,
        &[
            "--max_train_samples",
            "800",
            "--num_train_epochs",
            "3",
            "--resume_from_checkpoint",
        ],
    ));
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("Resuming from {}", ckpt.display())),
        "{text}"
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["global_step"], 300);
}

#[test]
fn the_hub_token_never_shows_in_debug_output() {
    let hub = Hub::new("http://127.0.0.1:9", "/tmp/cache").token("hf_SECRETTOKEN");
    let opts = LoadOptions::default().hub(hub.clone());
    for shown in [
        format!("{hub:?}"),
        format!("{opts:?}"),
        format!("{opts:#?}"),
    ] {
        assert!(!shown.contains("SECRETTOKEN"), "{shown}");
        assert!(shown.contains("redacted"), "{shown}");
    }
}

#[test]
fn an_stsb_model_saves_as_regression_and_the_tokenizer_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let m = BertClassifier::random(&BertConfig::bert_tiny(), 1, 7, &Device::Cpu, DType::F32)
        .unwrap()
        .with_tokenizer(mfac_lab::model::PairTokenizer::bert_base_uncased().unwrap());
    m.save_pretrained(tmp.path()).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["problem_type"], "regression");
    assert_eq!(cfg["id2label"].as_object().unwrap().len(), 1);
    // Reloaded HF-style (the number of labels from config.json), it is still a regression
    // model: one output, MSE on float labels.
    let back = BertClassifier::from_dir(tmp.path(), 1, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(back.num_labels(), 1);
    let logits = Tensor::new(&[[0.5f32], [1.5]], &Device::Cpu).unwrap();
    let loss =
        BertClassifier::loss(&logits, &Tensor::new(&[1.0f32, 1.0], &Device::Cpu).unwrap()).unwrap();
    assert!((loss.to_scalar::<f32>().unwrap() - 0.25).abs() < 1e-6);
    // A 3-way model stays single-label classification.
    let three = BertClassifier::from_dir(fixture("bert-micro-random"), 3, &Device::Cpu, DType::F32)
        .unwrap();
    let d3 = tmp.path().join("three");
    three.save_pretrained(&d3).unwrap();
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d3.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["problem_type"], "single_label_classification");
    // do_lower_case is what the tokenizer does: the fixture's is uncased; a cased one is not.
    let tc: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("tokenizer_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(tc["do_lower_case"], true);
    let cased = mfac_lab::model::PairTokenizer::from_vocab(
        fixture("bert-micro-random").join("vocab.txt"),
        false,
    )
    .unwrap();
    let m = m.with_tokenizer(cased);
    let d = tmp.path().join("cased");
    m.save_pretrained(&d).unwrap();
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("tokenizer_config.json")).unwrap())
            .unwrap();
    assert_eq!(tc["do_lower_case"], false);
}

#[test]
fn adamw_names_stay_with_their_variables_when_non_float_ones_are_skipped() {
    let dev = Device::Cpu;
    let vars = vec![
        ("step_counter".to_string(), Var::new(&[3u32], &dev).unwrap()),
        (
            "encoder.dense.bias".to_string(),
            Var::new(&[1.0f32], &dev).unwrap(),
        ),
        (
            "encoder.dense.weight".to_string(),
            Var::new(&[1.0f32], &dev).unwrap(),
        ),
    ];
    let opt = AdamW::new_named(
        &vars,
        AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(
        opt.decay_flags(),
        vec![
            ("encoder.dense.bias".to_string(), false),
            ("encoder.dense.weight".to_string(), true)
        ]
    );
}

#[test]
fn bad_batches_rows_and_figure_sizes_are_errors_not_panics() {
    let m = BertClassifier::from_dir(fixture("bert-micro-random"), 3, &Device::Cpu, DType::F32)
        .unwrap();
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[101u32, 7, 102], [101, 8, 102]], &dev).unwrap();
    // Built by hand with mismatched shapes (the fields are public).
    let bad = Batch {
        input_ids: ids.clone(),
        token_type_ids: ids.narrow(1, 0, 2).unwrap(),
        attention_mask: ids.ones_like().unwrap(),
        labels: Some(Tensor::new(&[0u32, 1], &dev).unwrap()),
    };
    assert!(m.forward(&bad, false).is_err());
    assert!(m.loss_and_grads(&bad, true).is_err());
    let bad_labels = Batch {
        labels: Some(Tensor::new(&[0u32, 1, 2], &dev).unwrap()),
        token_type_ids: ids.zeros_like().unwrap(),
        ..bad
    };
    assert!(m.loss_and_grads(&bad_labels, true).is_err());
    // collate with a row index past the end.
    let tok = m.tokenizer().unwrap();
    let split = EncodedSplit::encode(tok, &[("a", "b"), ("c", "d")], &[0, 1]).unwrap();
    let e = split.collate(&[0, 5], None, &dev).unwrap_err().to_string();
    assert!(e.contains("row 5"), "{e}");
    // A figure too large to draw (w·h·3 overflows u32).
    let mut fig = Figure::lines("t", "x", "y", vec![]);
    fig.size = (100_000, 100_000);
    assert!(fig
        .to_png()
        .unwrap_err()
        .to_string()
        .contains("figure size"));
    assert!(fig.to_svg().is_err());
    fig.size = (0, 10);
    assert!(fig.to_png().is_err());
}

#[test]
fn logging_steps_prints_hf_log_lines() {
    // Every accepted flag does something: --logging_steps N logs every N steps.
    let tmp = tempfile::tempdir().unwrap();
    let data = glue_data(tmp.path());
    let out = glue_base(&data)
        .args(["--logging_steps", "2"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // 32 rows / 8 = 4 steps: lines at steps 2 and 4.
    assert_eq!(err.matches("{'loss': ").count(), 2, "{err}");
    assert!(
        err.contains("'learning_rate': ") && err.contains("'epoch': 1.00"),
        "{err}"
    );
}

/// The entries of `dir` whose names hold `part`.
fn entries_with(dir: &Path, part: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(part))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `out` holds the temporary folder of checkpoint `step` with the optimizer state
/// being written in it (the model file already complete), and returns that folder. Panics if
/// the checkpoint finished first (the state of M-FAC's window takes ~0.2–1 s to write and sync).
fn wait_for_optimizer_write(out: &Path, step: usize, child: &mut std::process::Child) -> PathBuf {
    let start = std::time::Instant::now();
    loop {
        for tmp in entries_with(out, &format!(".checkpoint-{step}.tmp-")) {
            let tmp = out.join(tmp);
            if !entries_with(&tmp, ".optimizer.safetensors.tmp-").is_empty() {
                return tmp;
            }
        }
        assert!(
            !out.join(format!("checkpoint-{step}")).exists(),
            "checkpoint-{step} was complete before its write was seen"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended ({status}) before checkpoint-{step} was written");
        }
        assert!(
            start.elapsed().as_secs() < 300,
            "no checkpoint-{step} write seen"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// An M-FAC run whose checkpoints take a while to write: a 64-gradient window over
/// bert-micro-random's ~1M parameters is 256 MB.
fn slow_checkpoint_cmd(data: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut args = vec!["--optim", "MFAC", "--optim_args", "num_grads: 64, lr: 1e-3"];
    args.extend_from_slice(extra);
    glue_cmd(data, out, &args)
}

#[test]
fn the_disk_plan_refuses_with_numbers_before_the_first_step() {
    // The defect this guards against: a 300 MB disk, M-FAC keeping its window in every
    // checkpoint (three epochs, three checkpoints of ~256 MB): the run used to train an epoch,
    // then fail writing. Now it stops before the first step, with the plan's numbers (logged
    // with RUST_LOG=info) and the fixes.
    let tmp = tempfile::tempdir().unwrap();
    let data = glue_data(tmp.path());
    let out = tmp.path().join("run");
    let mut c = slow_checkpoint_cmd(&data, &out, &["--num_train_epochs", "3"]);
    c.env("MFAC_LAB_FREE_BYTES", "300000000")
        .env("RUST_LOG", "info");
    let (ok, text) = run(c);
    assert!(!ok, "{text}");
    for want in [
        "disk plan for",
        "not enough disk space",
        "3 checkpoints of",
        "286.1 MiB is free",
        "--save_total_limit 1",
        "window_dtype: bf16",
        "the sparse window (`density: 0.01` in --optim_args) keeps",
        "another --output_dir",
    ] {
        assert!(text.contains(want), "{want:?} not in:\n{text}");
    }
    assert!(!text.contains("step 1"), "{text}");
    assert!(entries_with(&out, "checkpoint").is_empty(), "{text}");
}

#[test]
fn a_sigkill_during_a_checkpoint_write_leaves_the_previous_one_whole_and_resumable() {
    let tmp = tempfile::tempdir().unwrap();
    let data = glue_data(tmp.path());
    let out = tmp.path().join("run");
    // 4 steps, a checkpoint every 2: killed while checkpoint-4 writes its optimizer state.
    let flags = ["--save_steps", "2"];
    let mut child = slow_checkpoint_cmd(&data, &out, &flags)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let half = wait_for_optimizer_write(&out, 4, &mut child);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The weights of the uninterrupted run at step 4: the killed checkpoint's model file, which
    // is complete (written and renamed before the optimizer state was begun).
    let uninterrupted = std::fs::read(half.join("model.safetensors")).unwrap();
    let listed: Vec<usize> = mfac_lab::train::checkpoints(&out)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(listed, [2], "only complete checkpoints are listed");
    let resumed = mfac_lab::train::latest_checkpoint(&out).unwrap().unwrap();
    assert_eq!(resumed, out.join("checkpoint-2"));
    // Resuming picks checkpoint-2, removes the dead process's half-written folder and ends
    // with the uninterrupted run's weights, bit for bit.
    let mut c = slow_checkpoint_cmd(&data, &out, &flags);
    c.arg("--resume_from_checkpoint");
    let (ok, text) = run(c);
    assert!(ok, "{text}");
    assert!(text.contains("Resuming from"), "{text}");
    assert!(!half.exists(), "the stale temporary folder is removed");
    assert!(entries_with(&out, ".tmp-").is_empty());
    let after = std::fs::read(out.join("checkpoint-4/model.safetensors")).unwrap();
    assert!(
        after == uninterrupted,
        "resumed weights differ from the uninterrupted run's"
    );
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), after);
}

#[test]
fn ctrl_c_during_a_checkpoint_write_finishes_it_then_stops_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = glue_data(tmp.path());
    let out = tmp.path().join("run");
    // 8 steps, a checkpoint every 2: Ctrl-C while checkpoint-2 writes.
    let flags = ["--save_steps", "2", "--num_train_epochs", "2"];
    let mut child = slow_checkpoint_cmd(&data, &out, &flags)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_optimizer_write(&out, 2, &mut child);
    // SAFETY: sends SIGINT to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let o = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{text}");
    assert!(text.contains("--resume_from_checkpoint"), "{text}");
    // Checkpoint-2 was finished, the run stopped after the next step with one more; nothing
    // half-written is left, and each checkpoint is whole (its optimizer state loads).
    let listed: Vec<usize> = mfac_lab::train::checkpoints(&out)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(listed, [2, 3], "{text}");
    assert!(entries_with(&out, ".tmp-").is_empty());
    for s in listed {
        let st = out.join(format!("checkpoint-{s}/optimizer.safetensors"));
        let bytes = std::fs::read(&st).unwrap();
        safetensors::SafeTensors::deserialize(&bytes).unwrap();
    }
    let (ok, text) = run({
        let mut c = slow_checkpoint_cmd(&data, &out, &flags);
        c.arg("--resume_from_checkpoint");
        c
    });
    assert!(ok, "{text}");
}
