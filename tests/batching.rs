//! Batching: collation equals the tokenizer's own padding; shuffling is seeded and complete.

mod common;

use candle_core::Device;
use common::{fixture, shared};
use mfac_lab::data::{epoch_batches, epoch_order, EncodedSplit, GlueTask};
use mfac_lab::model::PairTokenizer;

/// (premise, hypothesis, label) rows of the real MNLI sample (TSV: label name, premise, hypothesis).
fn rows() -> Vec<(String, String, u32)> {
    let text =
        std::fs::read_to_string(shared().join("data/mnli-textfooler/mnli_matched.tsv")).unwrap();
    let names = GlueTask::Mnli.label_names();
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let label = names.iter().position(|n| *n == f[0]).unwrap() as u32;
            (f[1].to_string(), f[2].to_string(), label)
        })
        .collect()
}

fn tok() -> PairTokenizer {
    PairTokenizer::from_tokenizer_json(fixture("bert-tiny-random").join("tokenizer.json")).unwrap()
}

#[test]
fn collated_batches_equal_the_tokenizers_padded_batches() {
    let rows = rows();
    assert_eq!(rows.len(), 800);
    let pairs: Vec<(&str, &str)> = rows
        .iter()
        .map(|(a, b, _)| (a.as_str(), b.as_str()))
        .collect();
    let labels: Vec<u32> = rows.iter().map(|r| r.2).collect();
    let tok = tok();
    let split = EncodedSplit::encode(&tok, &pairs, &labels).unwrap();
    assert_eq!(split.len(), 800);
    for batch_rows in epoch_batches(800, 32, 7, 0, true).iter().take(5) {
        let ours = split.collate(batch_rows, None, &Device::Cpu).unwrap();
        let sel: Vec<(&str, &str)> = batch_rows.iter().map(|&r| pairs[r]).collect();
        let lab: Vec<u32> = batch_rows.iter().map(|&r| labels[r]).collect();
        let theirs = tok.batch(&sel, Some(&lab), &Device::Cpu).unwrap();
        assert_eq!(
            ours.input_ids.to_vec2::<u32>().unwrap(),
            theirs.input_ids.to_vec2::<u32>().unwrap()
        );
        assert_eq!(
            ours.token_type_ids.to_vec2::<u32>().unwrap(),
            theirs.token_type_ids.to_vec2::<u32>().unwrap()
        );
        assert_eq!(
            ours.attention_mask.to_vec2::<u32>().unwrap(),
            theirs.attention_mask.to_vec2::<u32>().unwrap()
        );
        assert_eq!(ours.labels.unwrap().to_vec1::<u32>().unwrap(), lab);
        // Padded to max_seq_length when asked.
        let fixed = split.collate(batch_rows, Some(128), &Device::Cpu).unwrap();
        assert_eq!(fixed.seq_len(), 128);
    }
    // Truncation to max_seq_length happens at tokenization: nothing is longer than 128.
    assert!(split.ids.iter().all(|x| x.len() <= 128));
}

#[test]
fn shuffling_is_seeded_and_covers_every_row_once_per_epoch() {
    let n = 1_000;
    assert_eq!(
        epoch_order(n, 42, 0),
        epoch_order(n, 42, 0),
        "same seed, same order"
    );
    assert_ne!(
        epoch_order(n, 42, 0),
        epoch_order(n, 43, 0),
        "different seed, different order"
    );
    assert_ne!(
        epoch_order(n, 42, 0),
        epoch_order(n, 42, 1),
        "a new order every epoch"
    );
    assert_ne!(
        epoch_order(n, 42, 0),
        (0..n).collect::<Vec<_>>(),
        "actually shuffled"
    );
    for epoch in 0..3 {
        let batches = epoch_batches(n, 32, 42, epoch, true);
        assert_eq!(batches.len(), 32, "ceil(1000 / 32) batches");
        assert_eq!(
            batches.last().unwrap().len(),
            1000 - 31 * 32,
            "the last partial batch is kept"
        );
        let mut all: Vec<usize> = batches.concat();
        all.sort();
        assert_eq!(all, (0..n).collect::<Vec<_>>(), "every row exactly once");
    }
    let plain = epoch_batches(10, 4, 1, 0, false);
    assert_eq!(plain, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7], vec![8, 9]]);
}

#[test]
fn glue_task_table() {
    let m = GlueTask::parse("mnli").unwrap();
    assert_eq!(
        m.eval_splits(),
        &["validation_matched", "validation_mismatched"]
    );
    assert_eq!(m.text_columns(), ("premise", Some("hypothesis")));
    assert_eq!(m.num_labels(), 3);
    assert_eq!(GlueTask::parse("mrpc").unwrap().metrics()[1].name(), "f1");
    assert_eq!(
        GlueTask::parse("cola").unwrap().metrics()[0].name(),
        "matthews_correlation"
    );
    assert!(GlueTask::parse("stsb").unwrap().is_regression());
    assert_eq!(GlueTask::parse("sst2").unwrap().text_columns().1, None);
    assert!(GlueTask::parse("squad").is_err());
}
