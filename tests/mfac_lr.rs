//! M-FAC's step length grows with num_grads, and `MFacConfig::model_card_with` scales lr to
//! keep it: measured on gradients whose rows are orthogonal and of equal norm, where the
//! update is known exactly.
//!
//! For orthogonal rows of norm a the window's Gram matrix is K = a²I (slots not yet filled are
//! zero rows and drop out), so c = (mλI + K)⁻¹e_j = e_j/(mλ + a²) and u = m·Gᵀc =
//! m·g/(mλ + a²): the update lr·u has norm lr·m·a/(mλ + a²), ≈ lr·m/a when mλ ≪ a².

mod common;

use candle_core::{Device, Var};
use common::grads_for;
use mfac_lab::compare::{default_specs, demo_specs, DEMO_NUM_GRADS};
use mfac_lab::optim::{MFac, MFacConfig, OptimKind, OptimizerSpec};

const D: usize = 2048;
/// Entries ±1/32 (exact in f32 and bf16): ‖row‖² = 2048/1024 = 2.
const SCALE: f64 = 1.0 / 32.0;

/// Row k of the 2048×2048 Sylvester–Hadamard matrix, times SCALE: rows are orthogonal.
fn hadamard_row(k: usize) -> Vec<f64> {
    (0..D)
        .map(|i| {
            if (k & i).count_ones() % 2 == 0 {
                SCALE
            } else {
                -SCALE
            }
        })
        .collect()
}

/// The update norms of `steps` steps on Hadamard rows 1, 2, … (all different, so orthogonal).
fn update_norms(cfg: MFacConfig, steps: usize) -> Vec<f64> {
    let w = Var::new(vec![0.0f64; D], &Device::Cpu).unwrap();
    let mut opt = MFac::try_new(vec![w.clone()], cfg).unwrap();
    (0..steps)
        .map(|k| {
            let s = opt.try_step(&grads_for(&w, &hadamard_row(k + 1))).unwrap();
            assert_eq!(s.update_norm, opt.last_update_norm());
            s.update_norm
        })
        .collect()
}

fn row_norm() -> f64 {
    (D as f64 * SCALE * SCALE).sqrt()
}

#[test]
fn update_norm_on_orthogonal_rows_is_lr_m_norm_over_m_damp_plus_norm_squared() {
    let a2 = D as f64 * SCALE * SCALE;
    assert_eq!(a2, 2.0);
    let a = row_norm();
    // Damping small and large against a² = 2, and the window wrapping around (steps > m).
    for (m, damp, lr, steps) in [
        (1usize, 1e-6, 1e-4, 4usize),
        (8, 1e-6, 1e-4, 2 * 8 + 3),
        (32, 1e-2, 1e-3, 2 * 32 + 3),
        (32, 1e-6, 3.2e-3, 40),
        // Slots not yet filled drop out of K, so a part-filled window obeys the formula too.
        (1024, 1e-3, 1e-4, 24),
    ] {
        let cfg = MFacConfig {
            lr,
            num_grads: m,
            damp,
            ..MFacConfig::model_card()
        };
        let want = lr * m as f64 * a / (m as f64 * damp + a2);
        for (k, got) in update_norms(cfg, steps).into_iter().enumerate() {
            assert!(
                (got - want).abs() <= 1e-9 * want,
                "m {m}, damp {damp:e}, step {k}: ‖Δw‖ {got:e}, want lr·m·a/(mλ + a²) = {want:e}"
            );
        }
    }
}

#[test]
fn scaled_lr_keeps_the_step_length_across_windows() {
    // Step 40: the m = 32 window has wrapped, the m = 1024 one is mostly empty (empty slots
    // drop out of K, so the fill does not matter).
    let norm = |cfg: MFacConfig| *update_norms(cfg, 40).last().unwrap();
    let at32 = norm(MFacConfig::model_card_with(32));
    let at1024 = norm(MFacConfig::model_card_with(1024));
    assert!(
        (at32 / at1024 - 1.0).abs() < 0.10,
        "scaled lr: ‖Δw‖ {at32:e} at m = 32 vs {at1024:e} at m = 1024"
    );
    // At the card's fixed lr 1e-4 the m = 32 step is ~32× shorter than the m = 1024 one.
    let fixed32 = norm(MFacConfig {
        num_grads: 32,
        ..MFacConfig::model_card()
    });
    let ratio = at1024 / fixed32;
    assert!(
        (ratio / 32.0 - 1.0).abs() < 0.01,
        "fixed lr: m = 1024 / m = 32 step length {ratio}, want ~32"
    );
}

#[test]
fn model_card_with_scales_lr_and_keeps_the_card_otherwise() {
    for m in [1usize, 4, 32, 100, 1024, 2048] {
        let c = MFacConfig::model_card_with(m);
        assert_eq!(c.num_grads, m);
        assert!((c.lr - 1e-4 * 1024.0 / m as f64).abs() <= 1e-15 * c.lr.max(1.0));
        assert_eq!(
            MFacConfig {
                lr: 1e-4,
                num_grads: 1024,
                ..c
            },
            MFacConfig::model_card()
        );
    }
    assert_eq!(MFacConfig::model_card_with(1024).lr, 1e-4);
}

#[test]
fn the_demo_runs_mfac_with_the_scaled_lr() {
    let specs = demo_specs();
    assert_eq!(specs[..2], default_specs(DEMO_NUM_GRADS)[..]);
    // Third, the card's own M-FAC (m = 1024, lr 1e-4, damp 1e-6) with the sparse window.
    assert_eq!(
        specs[2],
        mfac_lab::optim::OptimizerSpec::mfac(MFacConfig::model_card().with_density(0.01))
    );
    assert_eq!(DEMO_NUM_GRADS, 32);
    let mfac = specs
        .iter()
        .find_map(|s| match s.kind() {
            OptimKind::MFac(c) => Some(*c),
            _ => None,
        })
        .expect("the demo compares against M-FAC");
    assert_eq!(mfac, MFacConfig::model_card_with(32));
    assert!((mfac.lr - 3.2e-3).abs() < 1e-15, "{}", mfac.lr);
    assert_eq!(
        OptimizerSpec::labels(&specs).unwrap(),
        ["AdamW", "M-FAC m=32 (lr 3.2e-3)", "M-FAC m=1024 1%"]
    );
    // The card's full-size comparison keeps lr 1e-4.
    assert_eq!(
        default_specs(1024)[1],
        OptimizerSpec::mfac(MFacConfig::model_card())
    );
}

#[test]
fn an_explicit_lr_always_wins() {
    // compare's --optim MFAC --optim_args: lr scaled to num_grads unless ARGS sets it.
    let scaled = OptimizerSpec::parse_scaled_lr("MFAC", "num_grads: 32, damp: 1e-6").unwrap();
    assert!((scaled.lr() - 3.2e-3).abs() < 1e-15);
    let set = OptimizerSpec::parse_scaled_lr("MFAC", "num_grads: 32, lr: 1e-4").unwrap();
    assert_eq!(set.lr(), 1e-4);
    assert_eq!(set.display_name(), "M-FAC m=32");
    assert_eq!(
        OptimizerSpec::parse_scaled_lr("adamw_torch", "").unwrap(),
        OptimizerSpec::adamw(1e-4)
    );
    // An MFacConfig's lr is what runs.
    let cfg = MFacConfig {
        lr: 5e-4,
        ..MFacConfig::model_card_with(32)
    };
    assert_eq!(OptimizerSpec::mfac(cfg).lr(), 5e-4);
}
