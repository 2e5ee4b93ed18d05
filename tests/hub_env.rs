//! `load_bert_tiny()` and `Hub::default()` read HF_ENDPOINT / HF_HOME / HF_HUB_OFFLINE.
//! One test in its own binary, so setting the environment races with nothing.

mod common;

use common::fixture;
use common::mock_hub::MockHub;
use mfac_lab::prelude::*;

#[test]
fn load_bert_tiny_uses_the_environment_online_then_offline() {
    let mut server = MockHub::start(vec![(
        "models",
        "prajjwal1/bert-tiny",
        fixture("bert-tiny-random").join("pytorch-bin"),
    )]);
    let home = tempfile::tempdir().unwrap();
    std::env::set_var("HF_ENDPOINT", &server.endpoint);
    std::env::set_var("HF_HOME", home.path());
    std::env::remove_var("HF_HUB_CACHE");
    std::env::remove_var("HUGGINGFACE_HUB_CACHE");
    std::env::remove_var("HF_HUB_OFFLINE");
    let hub = Hub::default();
    assert_eq!(hub.endpoint(), server.endpoint);
    assert_eq!(hub.cache_dir(), home.path().join("hub"));
    assert!(!hub.is_offline());

    let m = load_bert_tiny().unwrap();
    assert_eq!(m.num_parameters(), 4_386_307);
    assert_eq!(m.num_labels(), 3);
    assert!(home
        .path()
        .join("hub/models--prajjwal1--bert-tiny")
        .is_dir());

    server.stop();
    let n = server.request_count();
    std::env::set_var("HF_HUB_OFFLINE", "1");
    assert!(Hub::default().is_offline());
    let again = load_bert_tiny().unwrap();
    assert_eq!(
        server.request_count(),
        n,
        "HF_HUB_OFFLINE=1 makes no request"
    );
    assert_eq!(again.num_parameters(), m.num_parameters());
}
