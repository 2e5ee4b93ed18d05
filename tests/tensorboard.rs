//! `--report_to tensorboard`: the event files are read back by an independent reader (the
//! `crc32c` crate's CRC, `prost`'s protobuf decoder over event.proto's fields) and must hold
//! every logged value; a resumed run continues in the same TensorBoard run.

mod common;

use std::path::{Path, PathBuf};

use common::fixture;
use mfac_lab::data::mnli_sample;
use mfac_lab::prelude::*;
use mfac_lab::train::{latest_checkpoint, ReportTo};

/// tensorflow/core/util/event.proto's `Event` (the `what` oneof read as plain fields).
#[derive(Clone, PartialEq, prost::Message)]
struct Event {
    #[prost(double, tag = "1")]
    wall_time: f64,
    #[prost(int64, tag = "2")]
    step: i64,
    #[prost(string, optional, tag = "3")]
    file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    summary: Option<Summary>,
    #[prost(message, optional, tag = "6")]
    session_log: Option<SessionLog>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Summary {
    #[prost(message, repeated, tag = "1")]
    value: Vec<Value>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(string, tag = "1")]
    tag: String,
    #[prost(float, optional, tag = "2")]
    simple_value: Option<f32>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct SessionLog {
    #[prost(int32, tag = "1")]
    status: i32,
}

fn masked(crc: u32) -> u32 {
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Every event of a TFRecord file, each record's two CRCs checked.
fn read_events(path: &Path) -> Vec<Event> {
    use prost::Message;
    let bytes = std::fs::read(path).unwrap();
    let (mut at, mut out) = (0, vec![]);
    let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().unwrap());
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        assert_eq!(
            u32_at(at + 8),
            masked(crc32c::crc32c(len_bytes)),
            "length CRC"
        );
        let data = &bytes[at + 12..at + 12 + len];
        assert_eq!(
            u32_at(at + 12 + len),
            masked(crc32c::crc32c(data)),
            "data CRC"
        );
        out.push(Event::decode(data).unwrap());
        at += 16 + len;
    }
    assert_eq!(at, bytes.len(), "trailing bytes");
    out
}

/// The event files under `dir`, recursively, sorted.
fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(event_files(&p));
        } else if p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains("tfevents")
        {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// (step, tag) → value of every scalar in `events`.
fn scalars(events: &[Event]) -> Vec<(i64, String, f32)> {
    events
        .iter()
        .filter_map(|e| e.summary.as_ref().map(|s| (e.step, s)))
        .flat_map(|(step, s)| {
            s.value
                .iter()
                .map(move |v| (step, v.tag.clone(), v.simple_value.unwrap()))
        })
        .collect()
}

fn cfg() -> TrainConfig {
    TrainConfig {
        batch_size: 16,
        num_train_epochs: 2.0,
        max_train_samples: Some(48),
        max_eval_samples: Some(32),
        optimizer: OptimizerSpec::adamw(1e-3),
        quiet: true,
        report_to: ReportTo::TensorBoard,
        ..TrainConfig::default()
    }
}

fn micro() -> BertClassifier {
    BertClassifier::from_dir(fixture("bert-micro-random"), 3, &Device::Cpu, DType::F32).unwrap()
}

#[test]
fn event_files_hold_every_logged_value_and_a_resume_continues_the_run() {
    let data = mnli_sample().unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("run");
    let h = Trainer::new(micro(), cfg())
        .output_dir(&dir)
        .fit(&data)
        .unwrap();
    let files = event_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].starts_with(dir.join("runs")));
    let events = read_events(&files[0]);
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events.iter().all(|e| e.wall_time > 1.6e9));
    let got = scalars(&events);
    let has = |step: usize, tag: &str, v: f64| {
        got.iter()
            .any(|(s, t, x)| *s == step as i64 && t == tag && *x == v as f32)
    };
    assert_eq!(h.train.len(), 6);
    for r in &h.train {
        for (tag, v) in [
            ("train/loss", r.loss),
            ("train/learning_rate", r.lr),
            ("train/grad_norm", r.grad_norm),
            ("train/epoch", r.epoch),
        ] {
            assert!(has(r.step, tag, v), "step {}: {tag} = {v} missing", r.step);
        }
    }
    assert_eq!(h.evals.len(), 4, "two epoch ends × two MNLI splits");
    for e in &h.evals {
        assert!(has(e.step, &format!("eval/{}/loss", e.split), e.loss));
        for (m, v) in &e.metrics {
            assert!(has(e.step, &format!("eval/{}/{m}", e.split), *v), "{m}");
        }
    }
    assert_eq!(got.len(), 6 * 4 + 4 * 2);

    // Stopped after step 2, then resumed: the second process writes a second file in the same
    // run folder, starting with a SessionLog START at step 2 (TensorBoard drops what the first
    // process logged after it), and logs steps 3 to 6.
    let dir2 = out.path().join("resumed");
    let stopped = Trainer::new(micro(), cfg())
        .output_dir(&dir2)
        .stop_at_step(2)
        .fit(&data);
    assert!(matches!(stopped, Err(Error::Interrupted { step: 2, .. })));
    let ckpt = latest_checkpoint(&dir2).unwrap().unwrap();
    Trainer::new(micro(), cfg())
        .output_dir(&dir2)
        .resume_from(ckpt)
        .fit(&data)
        .unwrap();
    let files = event_files(&dir2);
    assert_eq!(files.len(), 2, "{files:?}");
    assert_eq!(files[0].parent(), files[1].parent(), "one TensorBoard run");
    let (first, second) = (read_events(&files[0]), read_events(&files[1]));
    let steps = |ev: &[Event]| {
        let mut s: Vec<i64> = scalars(ev)
            .iter()
            .filter(|(_, t, _)| t == "train/loss")
            .map(|x| x.0)
            .collect();
        s.dedup();
        s
    };
    assert_eq!(steps(&first), [1, 2]);
    assert_eq!(steps(&second), [3, 4, 5, 6]);
    let start = second.iter().find(|e| e.session_log.is_some()).unwrap();
    assert_eq!(
        (start.step, start.session_log.as_ref().unwrap().status),
        (2, 1)
    );
}

#[test]
fn tensorboard_without_an_output_folder_is_refused_before_training() {
    let data = mnli_sample().unwrap();
    let e = Trainer::new(micro(), cfg()).fit(&data).unwrap_err();
    assert!(e.to_string().contains("--report_to tensorboard"), "{e}");
}

#[test]
fn report_to_an_integration_we_do_not_write_names_the_ones_we_do() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in ["glue", "compare"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_mfac-lab"))
            .args([cmd, "--report_to", "wandb", "--output_dir"])
            .arg(dir.path().join("out"))
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd}");
        assert!(
            stderr.contains("--report_to \"wandb\"") && stderr.contains("none, tensorboard"),
            "{cmd}: {stderr}"
        );
        assert!(
            !dir.path().join("out").exists(),
            "{cmd}: nothing may be written"
        );
    }
}
