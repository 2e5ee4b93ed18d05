//! Dropout: off in eval, inverted and seeded in training, unbiased on average.

mod common;

use candle_core::{DType, Device};
use common::{fixture, load_st, reference_batch, rel_l2};
use mfac_lab::prelude::*;
use mfac_lab::rng::SeededRng;

fn micro(p: Option<f64>) -> BertClassifier {
    let mut cfg = BertConfig::from_file(fixture("bert-micro-random").join("config.json")).unwrap();
    if let Some(p) = p {
        cfg.hidden_dropout_prob = p;
        cfg.attention_probs_dropout_prob = p;
    }
    BertClassifier::random(&cfg, 3, 3, &Device::Cpu, DType::F64).unwrap()
}

fn batch() -> Batch {
    reference_batch(&load_st(
        &fixture("bert-micro-random").join("reference.safetensors"),
    ))
}

#[test]
fn with_p_zero_train_equals_eval() {
    let m = micro(Some(0.0));
    let b = batch();
    let train = m.forward(&b, true).unwrap();
    let eval = m.forward(&b, false).unwrap();
    assert_eq!(rel_l2(&train, &eval), 0.0);
}

#[test]
fn train_passes_differ_and_the_same_seed_repeats() {
    let m = micro(None);
    let b = batch();
    let eval = m.forward(&b, false).unwrap();
    assert_eq!(
        rel_l2(&m.forward(&b, false).unwrap(), &eval),
        0.0,
        "eval is deterministic"
    );
    m.set_dropout_seed(11);
    let t1 = m.forward(&b, true).unwrap();
    let t2 = m.forward(&b, true).unwrap();
    assert!(rel_l2(&t1, &t2) > 1e-3, "two training passes must differ");
    assert!(rel_l2(&t1, &eval) > 1e-3, "training differs from eval");
    m.set_dropout_seed(11);
    let t1b = m.forward(&b, true).unwrap();
    assert_eq!(rel_l2(&t1b, &t1), 0.0, "same seed, same masks");
    // Two models loaded with the same seed see the same masks too.
    let other = micro(None);
    other.set_dropout_seed(11);
    assert_eq!(rel_l2(&other.forward(&b, true).unwrap(), &t1), 0.0);
}

#[test]
fn inverted_dropout_mask_is_unbiased() {
    let mut rng = SeededRng::new(5);
    let n = 200_000;
    for p in [0.1, 0.5] {
        let m: Vec<f64> = rng
            .dropout_mask(&[n], p, DType::F64, &Device::Cpu)
            .unwrap()
            .to_vec1()
            .unwrap();
        let kept = m.iter().filter(|&&x| x != 0.0).count() as f64 / n as f64;
        let mean = m.iter().sum::<f64>() / n as f64;
        // Binomial: std of the kept fraction is sqrt(p(1-p)/n) ≤ 0.0012; allow 5 sigma.
        assert!((kept - (1.0 - p)).abs() < 0.006, "p {p}: kept {kept}");
        assert!((mean - 1.0).abs() < 0.006 / (1.0 - p), "p {p}: mean {mean}");
        assert!(m
            .iter()
            .all(|&x| x == 0.0 || (x - 1.0 / (1.0 - p)).abs() < 1e-15));
    }
}

#[test]
fn mean_of_many_training_passes_approaches_eval() {
    let m = micro(None);
    let b = batch();
    let eval = m.forward(&b, false).unwrap();
    m.set_dropout_seed(1);
    let n = 120;
    let mut sum = eval.zeros_like().unwrap();
    let mut single = 0.0;
    for _ in 0..n {
        let t = m.forward(&b, true).unwrap();
        single += rel_l2(&t, &eval);
        sum = (sum + t).unwrap();
    }
    let mean = (sum / n as f64).unwrap();
    let single = single / n as f64;
    let avg_err = rel_l2(&mean, &eval);
    // The network is nonlinear, so the mean is not exactly the eval output, but averaging 120
    // passes removes most of the per-pass noise: it must be far closer than one pass is.
    assert!(
        avg_err < 0.25 * single,
        "mean of passes {avg_err:e} vs one pass {single:e}"
    );
}
