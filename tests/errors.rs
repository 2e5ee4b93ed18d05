//! Bad input: each case is a clear, typed error, never a panic.

mod common;

use std::path::Path;

use candle_core::{DType, Device};
use common::{fixture, load_st};
use mfac_lab::prelude::*;

fn load(dir: &Path) -> Result<BertClassifier> {
    BertClassifier::from_dir(dir, 3, &Device::Cpu, DType::F32)
}

/// A writable copy of bert-micro-random's HF folder.
fn copy_micro() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
    ] {
        std::fs::copy(fixture("bert-micro-random").join(f), tmp.path().join(f)).unwrap();
    }
    tmp
}

#[test]
fn missing_folder() {
    let e = load(Path::new("/definitely/not/here")).unwrap_err();
    assert!(matches!(e, Error::MissingDir(_)), "{e}");
    assert!(e.to_string().contains("/definitely/not/here"));
    let e =
        BertClassifier::from_pretrained("./not/here", &LoadOptions::default().device(Device::Cpu))
            .unwrap_err();
    assert!(matches!(e, Error::MissingDir(_)), "{e}");
}

#[test]
fn a_missing_data_folder_is_named_as_the_data_folder() {
    let e = mfac_lab::data::load_glue_dir(mfac_lab::data::GlueTask::Mnli, "/nonexistent/glue")
        .unwrap_err();
    assert!(matches!(e, Error::MissingDataDir(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.starts_with("data folder /nonexistent/glue does not exist"),
        "{msg}"
    );
    assert!(!msg.contains("model folder"), "{msg}");
    // The command line says the same, before any training.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mfac-lab"))
        .args(["compare", "--data_dir", "/nonexistent", "--quiet"])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("data folder /nonexistent does not exist"),
        "{stderr}"
    );
}

#[test]
fn missing_config() {
    let tmp = copy_micro();
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, Error::MissingFile { file, .. } if file == "config.json"),
        "{e}"
    );
}

#[test]
fn malformed_config_json() {
    let tmp = copy_micro();
    std::fs::write(tmp.path().join("config.json"), "{\"hidden_size\": 32,").unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    assert!(e.to_string().contains("config.json"), "{e}");
}

#[test]
fn unknown_hidden_act() {
    let tmp = copy_micro();
    let text = std::fs::read_to_string(tmp.path().join("config.json")).unwrap();
    std::fs::write(
        tmp.path().join("config.json"),
        text.replace("\"gelu\"", "\"swishy\""),
    )
    .unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    assert!(
        e.to_string().contains("swishy") && e.to_string().contains("hidden_act"),
        "{e}"
    );
}

#[test]
fn missing_weights() {
    let tmp = copy_micro();
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, Error::MissingFile { file, .. } if file.contains("model.safetensors")),
        "{e}"
    );
}

#[test]
fn truncated_safetensors() {
    let tmp = copy_micro();
    let p = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(matches!(e, Error::Weights { .. }), "{e}");
    assert!(e.to_string().contains("model.safetensors"), "{e}");
}

#[test]
fn tensor_with_the_wrong_shape_is_named() {
    let tmp = copy_micro();
    let mut st = load_st(&tmp.path().join("model.safetensors"));
    let name = "bert.encoder.layer.1.intermediate.dense.weight";
    st.insert(
        name.into(),
        Tensor::zeros((64, 31), DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&st, tmp.path().join("model.safetensors")).unwrap();
    let e = load(tmp.path()).unwrap_err();
    match &e {
        Error::ShapeMismatch {
            name: n,
            expected,
            found,
        } => {
            assert_eq!(n, name);
            assert_eq!(expected, &vec![64, 32]);
            assert_eq!(found, &vec![64, 31]);
        }
        other => panic!("expected ShapeMismatch, got {other}"),
    }
    assert!(e.to_string().contains(name));
}

#[test]
fn missing_base_tensor_is_named() {
    let tmp = copy_micro();
    let mut st = load_st(&tmp.path().join("model.safetensors"));
    st.remove("bert.encoder.layer.0.output.LayerNorm.bias");
    candle_core::safetensors::save(&st, tmp.path().join("model.safetensors")).unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(
        matches!(&e, Error::MissingTensor { name, .. } if name == "bert.encoder.layer.0.output.LayerNorm.bias"),
        "{e}"
    );
}

#[test]
fn legacy_pickle_says_how_to_convert() {
    let e = load(&fixture("bert-micro-random").join("pytorch-bin-legacy")).unwrap_err();
    assert!(matches!(e, Error::Weights { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("legacy") && msg.contains("safetensors") && msg.contains("pytorch_model.bin"),
        "{msg}"
    );
}

#[test]
fn garbage_pickle_is_an_error_not_a_panic() {
    let tmp = copy_micro();
    std::fs::remove_file(tmp.path().join("model.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("pytorch_model.bin"),
        b"PK\x03\x04 not really a zip",
    )
    .unwrap();
    let e = load(tmp.path()).unwrap_err();
    assert!(matches!(e, Error::Weights { .. }), "{e}");
}

#[test]
fn zero_labels() {
    let e = BertClassifier::from_dir(fixture("bert-micro-random"), 0, &Device::Cpu, DType::F32)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("num_labels"));
    let e = BertClassifier::random(&BertConfig::bert_tiny(), 0, 1, &Device::Cpu, DType::F32)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

#[test]
fn a_head_of_another_size_is_a_shape_error() {
    let e = BertClassifier::from_dir(fixture("bert-micro-random"), 2, &Device::Cpu, DType::F32)
        .unwrap_err();
    assert!(
        matches!(&e, Error::ShapeMismatch { name, .. } if name == "classifier.weight"),
        "{e}"
    );
}

#[test]
fn unsupported_dtype() {
    let e = BertClassifier::from_dir(fixture("bert-micro-random"), 3, &Device::Cpu, DType::U8)
        .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

#[test]
fn unwritable_output_folder_leaves_nothing_behind() {
    let m = load(&fixture("bert-micro-random")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // A regular file where a parent folder should be: not writable even as root.
    let blocker = tmp.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let e = m.save_pretrained(blocker.join("model")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(e.to_string().contains("blocker"), "{e}");
    // The target itself is a file: refused, file untouched.
    let e = m.save_pretrained(&blocker).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert_eq!(std::fs::read(&blocker).unwrap(), b"x");
    // /proc refuses new folders for everyone.
    assert!(m.save_pretrained("/proc/mfac-lab-test/model").is_err());
    let entries: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        entries,
        vec![std::ffi::OsString::from("blocker")],
        "nothing left behind"
    );
}

#[test]
fn batch_shape_errors() {
    let ids = Tensor::zeros((2, 5), DType::U32, &Device::Cpu).unwrap();
    let bad = Tensor::zeros((2, 4), DType::U32, &Device::Cpu).unwrap();
    assert!(Batch::new(ids.clone(), bad, ids.clone(), None).is_err());
    let labels = Tensor::zeros(3, DType::U32, &Device::Cpu).unwrap();
    assert!(Batch::new(ids.clone(), ids.clone(), ids, Some(labels)).is_err());
}
