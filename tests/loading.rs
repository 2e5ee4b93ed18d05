//! Loading checkpoints: safetensors vs zip-format pytorch_model.bin (prajjwal1's layout),
//! prefixes, extra keys, a new head, and save → load.

mod common;

use candle_core::{DType, Device};
use common::{fixture, load_st, reference_batch, rel_l2};
use mfac_lab::prelude::*;

fn base_outputs(m: &BertClassifier, batch: &Batch) -> (Tensor, Tensor) {
    let out = m.forward_full(batch, false).unwrap();
    (
        out.bert.last_hidden_state().clone(),
        out.bert.pooled.clone(),
    )
}

#[test]
fn pytorch_bin_gives_the_same_base_outputs_and_reports_the_new_head() {
    for name in ["bert-tiny-random", "bert-micro-random"] {
        let dir = fixture(name);
        let r = load_st(&dir.join("reference.safetensors"));
        let batch = reference_batch(&r);
        let st = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F64).unwrap();
        let bin =
            BertClassifier::from_dir(dir.join("pytorch-bin"), 3, &Device::Cpu, DType::F64).unwrap();
        let (h1, p1) = base_outputs(&st, &batch);
        let (h2, p2) = base_outputs(&bin, &batch);
        // Same float32 weights, same f64 arithmetic: identical.
        assert_eq!(rel_l2(&h2, &h1), 0.0, "{name}: last hidden state");
        assert_eq!(rel_l2(&p2, &p1), 0.0, "{name}: pooled");
        assert!(rel_l2(&p2, &r["pooled_output"]) <= 1e-10);

        let rep = bin.load_report();
        assert_eq!(
            rep.newly_initialized,
            vec!["classifier.weight", "classifier.bias"],
            "{name}"
        );
        let mut expected_unused = vec![
            "cls.predictions.bias",
            "cls.predictions.decoder.bias",
            "cls.predictions.decoder.weight",
            "cls.predictions.transform.LayerNorm.bias",
            "cls.predictions.transform.LayerNorm.weight",
            "cls.predictions.transform.dense.bias",
            "cls.predictions.transform.dense.weight",
            "cls.seq_relationship.bias",
            "cls.seq_relationship.weight",
        ];
        expected_unused.sort();
        assert_eq!(rep.unused, expected_unused, "{name}");
        assert!(st.load_report().newly_initialized.is_empty());
        assert!(st.load_report().unused.is_empty());
    }
}

#[test]
fn new_head_is_hf_initialised_and_seeded() {
    let dir = fixture("bert-tiny-random").join("pytorch-bin");
    let opts = LoadOptions::default().device(Device::Cpu).dtype(DType::F64);
    let a = BertClassifier::from_pretrained(dir.to_str().unwrap(), &opts.clone().seed(1)).unwrap();
    let b = BertClassifier::from_pretrained(dir.to_str().unwrap(), &opts.clone().seed(1)).unwrap();
    let c = BertClassifier::from_pretrained(dir.to_str().unwrap(), &opts.seed(2)).unwrap();
    let head = |m: &BertClassifier| -> (Vec<f64>, Vec<f64>) {
        let v = m.named_vars();
        let w = v
            .iter()
            .find(|(n, _)| n == "classifier.weight")
            .unwrap()
            .1
            .as_tensor()
            .flatten_all()
            .unwrap();
        let bias = v
            .iter()
            .find(|(n, _)| n == "classifier.bias")
            .unwrap()
            .1
            .as_tensor()
            .to_vec1()
            .unwrap();
        (w.to_vec1().unwrap(), bias)
    };
    let (wa, ba) = head(&a);
    assert_eq!(head(&b).0, wa, "same seed, same head");
    assert_ne!(head(&c).0, wa, "different seed, different head");
    assert!(ba.iter().all(|&x| x == 0.0), "bias starts at zero");
    let n = wa.len() as f64;
    let mean = wa.iter().sum::<f64>() / n;
    let std = (wa.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt();
    // 384 draws of N(0, 0.02): the sample std is within ±15% of 0.02 with overwhelming probability.
    assert!((std - 0.02).abs() < 0.003, "std {std}");
    assert!(mean.abs() < 0.004, "mean {mean}");
}

#[test]
fn unprefixed_names_load_like_prefixed_ones() {
    // A bare BertModel export has no `bert.` prefix: write one and load it.
    let dir = fixture("bert-micro-random");
    let tmp = tempfile::tempdir().unwrap();
    let st = load_st(&dir.join("model.safetensors"));
    let bare: std::collections::HashMap<String, Tensor> = st
        .into_iter()
        .filter(|(k, _)| k.starts_with("bert."))
        .map(|(k, v)| (k.trim_start_matches("bert.").to_string(), v))
        .collect();
    candle_core::safetensors::save(&bare, tmp.path().join("model.safetensors")).unwrap();
    std::fs::copy(dir.join("config.json"), tmp.path().join("config.json")).unwrap();
    std::fs::copy(dir.join("vocab.txt"), tmp.path().join("vocab.txt")).unwrap();
    let bare_model = BertClassifier::from_dir(tmp.path(), 3, &Device::Cpu, DType::F64).unwrap();
    let full = BertClassifier::from_dir(&dir, 3, &Device::Cpu, DType::F64).unwrap();
    let r = load_st(&dir.join("reference.safetensors"));
    let batch = reference_batch(&r);
    let (h1, p1) = base_outputs(&bare_model, &batch);
    let (h2, p2) = base_outputs(&full, &batch);
    assert_eq!(rel_l2(&h1, &h2), 0.0);
    assert_eq!(rel_l2(&p1, &p2), 0.0);
    assert_eq!(
        bare_model.load_report().newly_initialized,
        vec!["classifier.weight", "classifier.bias"]
    );
}

#[test]
fn save_then_load_gives_identical_logits() {
    for dtype in [DType::F32, DType::F64] {
        let dir = fixture("bert-micro-random").join("pytorch-bin");
        let m = BertClassifier::from_dir(&dir, 3, &Device::Cpu, dtype).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("saved");
        m.save_pretrained(&out).unwrap();
        // Saving over an existing model replaces it.
        m.save_pretrained(&out).unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(
            leftovers,
            vec![std::ffi::OsString::from("saved")],
            "no temporary folders left"
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], "bert");
        assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
        assert_eq!(cfg["id2label"]["1"], "neutral");
        assert_eq!(cfg["label2id"]["contradiction"], 2);
        for f in [
            "model.safetensors",
            "vocab.txt",
            "tokenizer.json",
            "tokenizer_config.json",
        ] {
            assert!(out.join(f).is_file(), "{f} missing");
        }
        // HF names with the `bert.` prefix.
        let saved = load_st(&out.join("model.safetensors"));
        assert!(saved.contains_key("bert.embeddings.word_embeddings.weight"));
        assert!(saved.contains_key("classifier.weight"));
        assert_eq!(saved.len(), 41);

        let back = BertClassifier::from_dir(&out, 3, &Device::Cpu, dtype).unwrap();
        assert!(back.load_report().newly_initialized.is_empty());
        let pairs = [
            ("A man is playing a guitar.", "Music is played."),
            ("Naïve résumé", "Short"),
        ];
        let b1 = m
            .tokenizer()
            .unwrap()
            .batch(&pairs, None, &Device::Cpu)
            .unwrap();
        let b2 = back
            .tokenizer()
            .unwrap()
            .batch(&pairs, None, &Device::Cpu)
            .unwrap();
        assert_eq!(
            b1.input_ids.to_vec2::<u32>().unwrap(),
            b2.input_ids.to_vec2::<u32>().unwrap()
        );
        let l1 = m.forward(&b1, false).unwrap();
        let l2 = back.forward(&b2, false).unwrap();
        assert_eq!(rel_l2(&l1, &l2), 0.0, "{dtype:?}: logits after save → load");
    }
}

#[test]
fn random_model_is_reproducible_from_its_seed() {
    let cfg = BertConfig::bert_tiny();
    let a = BertClassifier::random(&cfg, 3, 5, &Device::Cpu, DType::F32).unwrap();
    let b = BertClassifier::random(&cfg, 3, 5, &Device::Cpu, DType::F32).unwrap();
    let c = BertClassifier::random(&cfg, 3, 6, &Device::Cpu, DType::F32).unwrap();
    let w = |m: &BertClassifier| {
        m.vars()[5]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert_eq!(w(&a), w(&b));
    assert_ne!(w(&a), w(&c));
    // [PAD] row is zero (nn.Embedding padding_idx), LayerNorm weight one.
    let pad: Vec<f32> = a.vars()[0].as_tensor().get(0).unwrap().to_vec1().unwrap();
    assert!(pad.iter().all(|&x| x == 0.0));
    let ln: Vec<f32> = a.vars()[3].as_tensor().to_vec1().unwrap();
    assert!(ln.iter().all(|&x| x == 1.0));
}
