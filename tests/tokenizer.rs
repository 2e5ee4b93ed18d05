//! The tokenizer against HF's fast tokenizer: ids, type ids, masks and tokens of the 8 reference
//! pairs (accents, truncation longest-first), from tokenizer.json and from vocab.txt alone.

mod common;

use candle_core::{DType, Device};
use common::{fixture, load_st};
use mfac_lab::prelude::*;

struct Example {
    premise: String,
    hypothesis: String,
    tokens: Vec<String>,
    segment_lens: Vec<usize>,
}

fn examples() -> Vec<Example> {
    let text =
        std::fs::read_to_string(fixture("bert-tiny-random").join("reference_inputs.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Example {
            premise: e["premise"].as_str().unwrap().into(),
            hypothesis: e["hypothesis"].as_str().unwrap().into(),
            tokens: e["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().into())
                .collect(),
            segment_lens: e["segment_lens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as usize)
                .collect(),
        })
        .collect()
}

fn check(tok: &PairTokenizer, what: &str) {
    let ex = examples();
    assert_eq!(ex.len(), 8);
    let pairs: Vec<(&str, &str)> = ex
        .iter()
        .map(|e| (e.premise.as_str(), e.hypothesis.as_str()))
        .collect();
    let r = load_st(&fixture("bert-tiny-random").join("reference.safetensors"));
    let batch = tok.batch(&pairs, None, &Device::Cpu).unwrap();
    for key in ["input_ids", "token_type_ids", "attention_mask"] {
        let ours = match key {
            "input_ids" => &batch.input_ids,
            "token_type_ids" => &batch.token_type_ids,
            _ => &batch.attention_mask,
        };
        let ours: Vec<Vec<i64>> = ours.to_dtype(DType::I64).unwrap().to_vec2().unwrap();
        let theirs: Vec<Vec<i64>> = r[key].to_vec2().unwrap();
        assert_eq!(ours, theirs, "{what}: {key} differs from HF's");
    }
    let enc = tok.encode_pairs(&pairs).unwrap();
    for (i, (e, x)) in enc.iter().zip(&ex).enumerate() {
        let real: Vec<String> = e
            .get_tokens()
            .iter()
            .zip(e.get_attention_mask())
            .filter(|(_, m)| **m == 1)
            .map(|(t, _)| t.clone())
            .collect();
        assert_eq!(real, x.tokens, "{what}: tokens of pair {i}");
        let ones = e.get_type_ids().iter().filter(|t| **t == 1).count();
        // Segment B plus its [SEP] carry type id 1.
        assert_eq!(ones, x.segment_lens[1] + 1, "{what}: type ids of pair {i}");
    }
}

#[test]
fn tokenizer_json_matches_hf_ids_types_masks_and_tokens() {
    let tok =
        PairTokenizer::from_tokenizer_json(fixture("bert-tiny-random").join("tokenizer.json"))
            .unwrap();
    check(&tok, "tokenizer.json");
}

#[test]
fn vocab_txt_alone_matches_hf_ids_types_masks_and_tokens() {
    let tok = PairTokenizer::from_vocab(
        fixture("bert-tiny-random").join("pytorch-bin/vocab.txt"),
        true,
    )
    .unwrap();
    check(&tok, "vocab.txt");
}

#[test]
fn model_folder_tokenizers_match_hf() {
    // The one loaded with a model: tokenizer.json in the HF folder, vocab.txt in pytorch-bin/.
    let m = BertClassifier::from_dir(fixture("bert-micro-random"), 3, &Device::Cpu, DType::F32)
        .unwrap();
    check(m.tokenizer().unwrap(), "model folder");
    let m = BertClassifier::from_dir(
        fixture("bert-micro-random").join("pytorch-bin"),
        3,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    check(m.tokenizer().unwrap(), "pytorch-bin folder");
}

#[test]
fn longest_first_splits_two_long_segments_like_hf() {
    // (159, 128) -> (63, 62) at max_length 128: the shorter gets floor((128-3)/2)... as HF does.
    let tok =
        PairTokenizer::from_tokenizer_json(fixture("bert-tiny-random").join("tokenizer.json"))
            .unwrap();
    let ex = examples();
    let e = &tok
        .encode_pairs(&[(ex[5].premise.as_str(), ex[5].hypothesis.as_str())])
        .unwrap()[0];
    assert_eq!(e.len(), 128);
    let b = e.get_type_ids().iter().filter(|t| **t == 1).count() - 1;
    let a = 128 - 3 - b;
    assert_eq!((a, b), (63, 62));
    // A shorter max length applies too.
    let short = tok.clone().with_max_length(32).unwrap();
    assert_eq!(
        short
            .encode_pairs(&[(ex[5].premise.as_str(), ex[5].hypothesis.as_str())])
            .unwrap()[0]
            .len(),
        32
    );
    assert!(tok.clone().with_max_length(2).is_err());
}

#[test]
fn pad_to_max_length_pads_every_batch_to_128() {
    let tok =
        PairTokenizer::from_tokenizer_json(fixture("bert-tiny-random").join("tokenizer.json"))
            .unwrap()
            .with_pad_to_max_length(true)
            .unwrap();
    let b = tok
        .batch(&[("a b", "c")], Some(&[1]), &Device::Cpu)
        .unwrap();
    assert_eq!(b.input_ids.dims(), &[1, 128]);
    let mask: Vec<u32> = b.attention_mask.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(mask.iter().sum::<u32>(), 6);
}
