//! The hub path with the real hf-hub client against a local server that answers like the hub.

mod common;

use candle_core::{DType, Device};
use common::mock_hub::{MockHub, COMMIT};
use common::{fixture, load_st, reference_batch, rel_l2, shared};
use mfac_lab::hub::{Hub, RepoKind};
use mfac_lab::prelude::*;

fn serve_bert_tiny() -> MockHub {
    MockHub::start(vec![
        (
            "models",
            "prajjwal1/bert-tiny",
            fixture("bert-tiny-random").join("pytorch-bin"),
        ),
        (
            "datasets",
            "nyu-mll/glue",
            shared().join("data/mnli-textfooler"),
        ),
    ])
}

fn pooled(m: &BertClassifier) -> Tensor {
    let r = load_st(&fixture("bert-tiny-random").join("reference.safetensors"));
    m.forward_full(&reference_batch(&r), false)
        .unwrap()
        .bert
        .pooled
}

#[test]
fn download_load_then_load_offline_with_the_server_stopped() {
    let mut server = serve_bert_tiny();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(&server.endpoint, cache.path());
    let opts = LoadOptions::default()
        .device(Device::Cpu)
        .dtype(DType::F64)
        .hub(hub.clone());

    let online = BertClassifier::from_pretrained("prajjwal1/bert-tiny", &opts).unwrap();
    assert_eq!(online.load_report().source, "prajjwal1/bert-tiny@main");
    assert_eq!(
        online.load_report().newly_initialized,
        vec!["classifier.weight", "classifier.bias"]
    );
    let log = server.log.lock().unwrap().clone();
    assert!(
        log.iter().any(|l| l.starts_with("GET /cdn/")),
        "the .bin came through the CDN redirect: {log:?}"
    );
    // Same outputs as loading the served folder directly.
    let local = BertClassifier::from_dir(
        fixture("bert-tiny-random").join("pytorch-bin"),
        3,
        &Device::Cpu,
        DType::F64,
    )
    .unwrap();
    assert_eq!(rel_l2(&pooled(&online), &pooled(&local)), 0.0);
    // The cache has HF's layout, blobs named by the LFS sha256.
    let repo_dir = cache.path().join("models--prajjwal1--bert-tiny");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main"))
            .unwrap()
            .trim(),
        COMMIT
    );
    assert!(repo_dir
        .join("snapshots")
        .join(COMMIT)
        .join("pytorch_model.bin")
        .exists());

    server.stop();
    let before = server.request_count();
    let offline = BertClassifier::from_pretrained(
        "prajjwal1/bert-tiny",
        &opts.clone().hub(hub.clone().offline(true)),
    )
    .unwrap();
    assert_eq!(
        server.request_count(),
        before,
        "offline must not make a request"
    );
    assert_eq!(rel_l2(&pooled(&offline), &pooled(&online)), 0.0);
    // A pinned commit resolves from the cache too.
    let pinned = opts.hub(hub.offline(true)).revision(COMMIT);
    BertClassifier::from_pretrained("prajjwal1/bert-tiny", &pinned).unwrap();
}

#[test]
fn missing_file_names_repo_revision_and_file() {
    let server = serve_bert_tiny();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(&server.endpoint, cache.path()).progress(false);
    let e = hub
        .model_file("prajjwal1/bert-tiny", "main", "tf_model.h5")
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Hub { .. }), "{e}");
    assert!(
        msg.contains("prajjwal1/bert-tiny") && msg.contains("main") && msg.contains("tf_model.h5"),
        "{msg}"
    );
    assert!(hub
        .try_file(
            RepoKind::Model,
            "prajjwal1/bert-tiny",
            "main",
            "tf_model.h5"
        )
        .unwrap()
        .is_none());
    // Offline and not cached: the same kind of error, and no request.
    let n = server.request_count();
    let e = hub
        .clone()
        .offline(true)
        .model_file("prajjwal1/bert-tiny", "main", "config.json")
        .unwrap_err();
    assert!(e.to_string().contains("offline"), "{e}");
    assert_eq!(server.request_count(), n);
    // An unknown repository and a bad id.
    let e = hub
        .model_file("nobody/nothing", "main", "config.json")
        .unwrap_err();
    assert!(e.to_string().contains("nobody/nothing"), "{e}");
    assert!(hub.model_file("not-an-id", "main", "config.json").is_err());
    // A repository without weights.
    let e = BertClassifier::from_pretrained(
        "nobody/nothing",
        &LoadOptions::default().device(Device::Cpu).hub(hub),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Hub { .. }), "{e}");
}

#[test]
fn dataset_files_with_nested_paths() {
    let server = serve_bert_tiny();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(&server.endpoint, cache.path()).progress(false);
    let p = hub
        .dataset_file("nyu-mll/glue", "main", "mnli_matched.tsv")
        .unwrap();
    let want = std::fs::read(shared().join("data/mnli-textfooler/mnli_matched.tsv")).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), want);
    assert!(p.starts_with(cache.path().join("datasets--nyu-mll--glue")));
    assert!(hub
        .dataset_file("nyu-mll/glue", "main", "mnli/none.parquet")
        .is_err());
}

#[test]
fn unreachable_endpoint_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let hub = Hub::new(format!("http://127.0.0.1:{port}"), cache.path()).progress(false);
    let e = hub
        .model_file("prajjwal1/bert-tiny", "main", "config.json")
        .unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("prajjwal1/bert-tiny") && msg.contains("HF_HUB_OFFLINE"),
        "{msg}"
    );
}

/// The offline demo's model, both ways against the local mock hub: the pretrained bert-tiny
/// when the hub delivers it within the wait (then cached, so an offline hub finds it), the
/// seeded random one when nothing answers (a refused connection, a server that accepts and never
/// replies), saying which.
#[test]
fn the_demo_takes_the_pretrained_bert_tiny_when_the_hub_answers_else_a_random_one() {
    use mfac_lab::compare::ModelSource;
    use std::time::{Duration, Instant};
    let server = serve_bert_tiny();
    let cache = tempfile::tempdir().unwrap();
    let hub = Hub::new(&server.endpoint, cache.path());
    let (source, note) = ModelSource::demo_bert_tiny(&hub, Duration::from_secs(30));
    assert!(
        matches!(&source, ModelSource::Pretrained(r) if r == "prajjwal1/bert-tiny"),
        "{note}"
    );
    assert!(note.contains("pretrained prajjwal1/bert-tiny"), "{note}");
    // Cached now: offline, no request, still the pretrained one.
    let before = server.request_count();
    let (source, _) =
        ModelSource::demo_bert_tiny(&hub.clone().offline(true), Duration::from_secs(30));
    assert!(matches!(source, ModelSource::Pretrained(_)));
    assert_eq!(server.request_count(), before, "offline means no request");

    // Nothing listens: the random model, with the reason.
    let empty = tempfile::tempdir().unwrap();
    let refused = Hub::new("http://127.0.0.1:9", empty.path());
    let (source, note) = ModelSource::demo_bert_tiny(&refused, Duration::from_secs(30));
    assert!(matches!(source, ModelSource::Random(_)), "{note}");
    assert!(
        note.contains("randomly initialised") && note.contains("could not be loaded"),
        "{note}"
    );

    // A server that accepts and never answers: the random model once the wait is over.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        let conns: Vec<_> = listener.incoming().take(1).collect();
        std::thread::sleep(Duration::from_secs(5));
        drop(conns);
    });
    let silent = Hub::new(format!("http://{addr}"), empty.path());
    let t0 = Instant::now();
    let (source, note) = ModelSource::demo_bert_tiny(&silent, Duration::from_millis(1500));
    assert!(matches!(source, ModelSource::Random(_)), "{note}");
    assert!(
        note.contains("did not deliver") && note.contains("HF_HUB_OFFLINE=1"),
        "{note}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "it waited {:?}",
        t0.elapsed()
    );
    held.join().unwrap();
}
