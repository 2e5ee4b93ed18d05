//! GLUE data: local parquet and TSV, schema errors, the embedded sample, and the hub path.

mod common;

use common::mock_hub::MockHub;
use common::shared;
use mfac_lab::data::{load_glue, load_glue_dir, mnli_sample, read_split, GlueTask, GLUE_REVISION};
use mfac_lab::hub::Hub;
use mfac_lab::Error;
use polars::prelude::*;

fn textfooler() -> std::path::PathBuf {
    shared().join("data/mnli-textfooler")
}

/// A folder laid out like the hub's `mnli/` config, built from the shared rows.
fn glue_folder() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("mnli");
    std::fs::create_dir_all(&d).unwrap();
    let m = textfooler().join("validation_matched-00000-of-00001.parquet");
    let mm = textfooler().join("validation_mismatched-00000-of-00001.parquet");
    std::fs::copy(&m, d.join("train-00000-of-00001.parquet")).unwrap();
    std::fs::copy(&m, d.join("validation_matched-00000-of-00001.parquet")).unwrap();
    std::fs::copy(&mm, d.join("validation_mismatched-00000-of-00001.parquet")).unwrap();
    tmp
}

fn label_counts(labels: &[u32]) -> [usize; 3] {
    let mut c = [0; 3];
    labels.iter().for_each(|&l| c[l as usize] += 1);
    c
}

#[test]
fn local_parquet_and_tsv_of_the_real_mnli_rows() {
    let tmp = glue_folder();
    let data = load_glue_dir(GlueTask::Mnli, tmp.path()).unwrap();
    assert_eq!(data.train.height(), 800);
    assert_eq!(
        data.eval
            .iter()
            .map(|(n, d)| (n.as_str(), d.height()))
            .collect::<Vec<_>>(),
        vec![("validation_matched", 800), ("validation_mismatched", 800)]
    );
    let (pairs, labels) = data.pairs(&data.eval[1].1).unwrap();
    // PROVENANCE.md: label counts 0/1/2 — matched 294/255/251, mismatched 272/261/267.
    assert_eq!(label_counts(&labels), [272, 261, 267]);
    assert!(pairs.iter().all(|(a, b)| !a.is_empty() && !b.is_empty()));
    let (_, ml) = data.pairs(&data.eval[0].1).unwrap();
    assert_eq!(label_counts(&ml), [294, 255, 251]);
    // TextFooler's header-less TSV: the same rows and labels as the parquet file.
    let tsv = read_split(GlueTask::Mnli, textfooler().join("mnli_matched.tsv")).unwrap();
    let (tp, tl) = data.pairs(&tsv).unwrap();
    assert_eq!(tl, ml);
    assert_eq!(tp.len(), 800);
}

#[test]
fn xnli_english_rows_read_as_nli() {
    // CC BY-NC: read here in tests only, never shipped.
    let dir = shared().join("data/xnli-en");
    let mut total = 0;
    for f in std::fs::read_dir(&dir).unwrap() {
        let p = f.unwrap().path();
        if p.extension().is_some_and(|e| e == "parquet") {
            let df =
                read_split(GlueTask::Mnli, &p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            total += df.height();
        }
    }
    assert_eq!(total, 7_500);
}

#[test]
fn a_bad_schema_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("train.parquet");
    let mut df = df!("sentence" => ["a", "b"], "label" => [0i64, 1]).unwrap();
    ParquetWriter::new(std::fs::File::create(&p).unwrap())
        .finish(&mut df)
        .unwrap();
    let e = load_glue_dir(GlueTask::Mnli, tmp.path()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Data { .. }), "{msg}");
    assert!(msg.contains("premise") && msg.contains("sentence"), "{msg}");
    // The right columns, a label of the wrong type.
    let mut df = df!("premise" => ["a"], "hypothesis" => ["b"], "label" => ["x"]).unwrap();
    ParquetWriter::new(std::fs::File::create(&p).unwrap())
        .finish(&mut df)
        .unwrap();
    let e = load_glue_dir(GlueTask::Mnli, tmp.path()).unwrap_err();
    assert!(e.to_string().contains("label"), "{e}");
    // Not a parquet file at all.
    std::fs::write(&p, b"not parquet").unwrap();
    assert!(matches!(
        load_glue_dir(GlueTask::Mnli, tmp.path()).unwrap_err(),
        Error::Data { .. }
    ));
    // A TSV with an unknown label.
    let t = tmp.path().join("bad.tsv");
    std::fs::write(&t, "maybe\tA man.\tA person.\n").unwrap();
    let e = read_split(GlueTask::Mnli, &t).unwrap_err();
    assert!(e.to_string().contains("maybe"), "{e}");
    // No train split, no folder.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        load_glue_dir(GlueTask::Mnli, empty.path()).unwrap_err(),
        Error::MissingFile { .. }
    ));
    assert!(matches!(
        load_glue_dir(GlueTask::Mnli, "/no/such/dir").unwrap_err(),
        Error::MissingDataDir(_)
    ));
}

#[test]
fn embedded_sample_loads_offline_and_splits_deterministically() {
    let d = mnli_sample().unwrap();
    assert_eq!(d.train.height(), 1200);
    assert_eq!(d.eval[0].0, "validation_matched");
    assert_eq!(d.eval[1].0, "validation_mismatched");
    assert_eq!((d.eval[0].1.height(), d.eval[1].1.height()), (200, 200));
    // Train = first 600 matched + first 600 mismatched; eval = the last 200 of each.
    let m = read_split(
        GlueTask::Mnli,
        textfooler().join("validation_matched-00000-of-00001.parquet"),
    )
    .unwrap();
    let (all_m, _) = d.pairs(&m).unwrap();
    let (train, _) = d.pairs(&d.train).unwrap();
    let (ev, _) = d.pairs(&d.eval[0].1).unwrap();
    assert_eq!(train[..600], all_m[..600]);
    assert_eq!(ev[..], all_m[600..]);
    let again = mnli_sample().unwrap();
    assert_eq!(d.pairs(&again.train).unwrap(), d.pairs(&d.train).unwrap());
}

#[test]
fn download_from_the_hub_at_the_pinned_revision_then_offline() {
    let tmp = glue_folder();
    let mut server = MockHub::start(vec![("datasets", "nyu-mll/glue", tmp.path().to_path_buf())]);
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(&server.endpoint, cache.path()).progress(false);
    let data = load_glue(GlueTask::Mnli, &hub).unwrap();
    assert_eq!(data.train.height(), 800);
    assert_eq!(data.eval.len(), 2);
    let log = server.log.lock().unwrap().clone();
    assert!(
        log.iter().any(|l| l.contains(&format!(
            "/datasets/nyu-mll/glue/resolve/{GLUE_REVISION}/mnli/train-00000-of-00001.parquet"
        ))),
        "{log:?}"
    );
    server.stop();
    let n = server.request_count();
    let offline = load_glue(GlueTask::Mnli, &hub.clone().offline(true)).unwrap();
    assert_eq!(server.request_count(), n);
    assert_eq!(offline.train.height(), 800);
}
