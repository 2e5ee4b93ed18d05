//! M-FAC's properties: against a dense f64 inverse, first step, scale invariance, the O(m²)
//! path over long runs, non-finite gradients, the memory precheck, option parsing.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{grads_for, rel_l2_vec};
use mfac_lab::optim::{MFac, MFacConfig, OptimKind, OptimizerSpec};
use mfac_lab::rng::SeededRng;
use mfac_lab::Error;

fn f64_cfg(m: usize, damp: f64) -> MFacConfig {
    MFacConfig {
        lr: 1e-3,
        num_grads: m,
        damp,
        window_dtype: DType::F64,
        ..Default::default()
    }
}

/// Correlated gradients: a shared direction plus a slowly drifting one plus noise.
fn correlated(rng: &mut SeededRng, d: usize, t: usize) -> Vec<Vec<f64>> {
    let base = rng.normal_vec(d, 0.0, 1.0);
    let drift = rng.normal_vec(d, 0.0, 1.0);
    (0..t)
        .map(|k| {
            let noise = rng.normal_vec(d, 0.0, 0.3);
            let a = (k as f64 * 0.37).sin();
            (0..d).map(|i| base[i] + a * drift[i] + noise[i]).collect()
        })
        .collect()
}

/// u = (λI + (1/m) Σ gᵢgᵢᵀ)⁻¹ g by dense Gaussian elimination with partial pivoting, in f64.
#[allow(clippy::needless_range_loop)]
fn dense_ihvp(window: &[Vec<f64>], m: usize, damp: f64, g: &[f64]) -> Vec<f64> {
    let d = g.len();
    let mut a = vec![vec![0.0; d + 1]; d];
    for i in 0..d {
        for j in 0..d {
            let s: f64 = window.iter().map(|w| w[i] * w[j]).sum();
            a[i][j] = s / m as f64 + if i == j { damp } else { 0.0 };
        }
        a[i][d] = g[i];
    }
    for col in 0..d {
        let p = (col..d)
            .max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))
            .unwrap();
        a.swap(col, p);
        for r in col + 1..d {
            let f = a[r][col] / a[col][col];
            for c in col..=d {
                a[r][c] -= f * a[col][c];
            }
        }
    }
    let mut x = vec![0.0; d];
    for i in (0..d).rev() {
        let s: f64 = (i + 1..d).map(|j| a[i][j] * x[j]).sum();
        x[i] = (a[i][d] - s) / a[i][i];
    }
    x
}

#[test]
fn matches_a_dense_f64_inverse_with_the_ring_wrapped_several_times() {
    let (d, m, damp) = (24, 5, 1e-2);
    let mut rng = SeededRng::new(9);
    let gs = correlated(&mut rng, d, 7 * m);
    let w = Var::new(vec![0.0f64; d].as_slice(), &Device::Cpu).unwrap();
    let mut opt = MFac::try_new(vec![w.clone()], f64_cfg(m, damp)).unwrap();
    let mut window: Vec<Vec<f64>> = vec![vec![0.0; d]; m];
    let mut worst = 0.0f64;
    for (t, g) in gs.iter().enumerate() {
        opt.try_step(&grads_for(&w, g)).unwrap();
        window[t % m] = g.clone();
        let want = dense_ihvp(&window, m, damp, g);
        worst = worst.max(rel_l2_vec(opt.preconditioned_gradient(), &want));
    }
    // Both sides are f64; the dense system's condition number here is ~1e4, so agreement is
    // at rounding level (~1e-12): 1e-10 catches any algebraic slip (a missing 1/m, a stale row).
    assert!(
        worst <= 1e-10,
        "worst relative error vs dense F⁻¹g: {worst:e}"
    );
}

#[test]
fn first_step_is_m_g_over_m_lambda_plus_g_squared() {
    let (d, m, damp) = (50, 8, 1e-4);
    let g = SeededRng::new(3).normal_vec(d, 0.0, 0.2);
    let w = Var::new(vec![1.0f64; d].as_slice(), &Device::Cpu).unwrap();
    let mut opt = MFac::try_new(vec![w.clone()], f64_cfg(m, damp)).unwrap();
    opt.try_step(&grads_for(&w, &g)).unwrap();
    let g2: f64 = g.iter().map(|x| x * x).sum();
    let want: Vec<f64> = g
        .iter()
        .map(|x| m as f64 * x / (m as f64 * damp + g2))
        .collect();
    assert!(rel_l2_vec(opt.preconditioned_gradient(), &want) <= 1e-13);
    assert_eq!((opt.filled_slots(), opt.ring_index()), (1, 1));
    // The step taken was lr·u.
    let now: Vec<f64> = w.as_tensor().to_vec1().unwrap();
    let moved: Vec<f64> = now.iter().map(|x| (1.0 - x) / 1e-3).collect();
    assert!(rel_l2_vec(&moved, &want) <= 1e-9);
    assert!(
        (opt.last_cosine() - 1.0).abs() < 1e-12,
        "first step is along g"
    );
}

#[test]
fn scaling_all_gradients_by_alpha_scales_the_update_by_one_over_alpha() {
    let (d, m) = (40, 6);
    let mut rng = SeededRng::new(4);
    let gs: Vec<Vec<f64>> = (0..15).map(|_| rng.normal_vec(d, 0.0, 1.0)).collect();
    // The identity is exact for λ → 0: u(αg) = (1/α)·m·Gᵀ(mλ/α² + K)⁻¹e_j, so the damping must
    // be negligible next to α²|g|² ≥ 4e-5 (α = 1e-3, |g|² ≈ 40): λ = 1e-16 leaves 1e-11.
    let damp = 1e-16;
    for alpha in [1e-3, 37.0] {
        let w1 = Var::new(vec![0.0f64; d].as_slice(), &Device::Cpu).unwrap();
        let w2 = Var::new(vec![0.0f64; d].as_slice(), &Device::Cpu).unwrap();
        let mut o1 = MFac::try_new(vec![w1.clone()], f64_cfg(m, damp)).unwrap();
        let mut o2 = MFac::try_new(vec![w2.clone()], f64_cfg(m, damp)).unwrap();
        for g in &gs {
            o1.try_step(&grads_for(&w1, g)).unwrap();
            let ga: Vec<f64> = g.iter().map(|x| x * alpha).collect();
            o2.try_step(&grads_for(&w2, &ga)).unwrap();
            let scaled: Vec<f64> = o2
                .preconditioned_gradient()
                .iter()
                .map(|u| u * alpha)
                .collect();
            let e = rel_l2_vec(&scaled, o1.preconditioned_gradient());
            assert!(e <= 1e-8, "alpha {alpha}: {e:e}");
        }
    }
}

#[test]
fn long_run_keeps_the_o_m2_path_on_the_from_scratch_solve() {
    let (d, m) = (300, 32);
    let steps = 10 * m + 7;
    let mut rng = SeededRng::new(11);
    let gs = correlated(&mut rng, d, steps);
    let w = Var::new(vec![0.0f64; d].as_slice(), &Device::Cpu).unwrap();
    let mut opt = MFac::try_new(
        vec![w.clone()],
        MFacConfig {
            window_dtype: DType::F32,
            ..f64_cfg(m, 1e-6)
        },
    )
    .unwrap();
    let mut worst = 0.0f64;
    for g in &gs {
        opt.try_step(&grads_for(&w, g)).unwrap();
        let e = rel_l2_vec(opt.coefficients(), &opt.coefficients_from_scratch());
        worst = worst.max(e);
    }
    assert!(
        worst <= 1e-9,
        "O(m²) path drifted from the from-scratch solve: {worst:e}"
    );
    // And it is the O(m²) path: full refreshes only about once per m steps.
    let refreshes = opt.refresh_count();
    assert!(
        refreshes <= steps / m + 3,
        "{refreshes} refreshes in {steps} steps"
    );
}

#[test]
fn non_finite_gradient_is_an_error_and_changes_nothing() {
    let (d, m) = (30, 4);
    let mut rng = SeededRng::new(5);
    let gs: Vec<Vec<f64>> = (0..9).map(|_| rng.normal_vec(d, 0.0, 1.0)).collect();
    let cfg = MFacConfig {
        momentum: 0.5,
        weight_decay: 0.01,
        ..f64_cfg(m, 1e-4)
    };
    let wa = Var::new(vec![0.5f64; d].as_slice(), &Device::Cpu).unwrap();
    let wb = Var::new(vec![0.5f64; d].as_slice(), &Device::Cpu).unwrap();
    let mut a = MFac::try_new(vec![wa.clone()], cfg).unwrap();
    let mut b = MFac::try_new(vec![wb.clone()], cfg).unwrap();
    for (t, g) in gs.iter().enumerate() {
        if t == 5 {
            for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                let mut g_bad = g.clone();
                g_bad[7] = bad;
                let before: Vec<f64> = wa.as_tensor().to_vec1().unwrap();
                let e = a.try_step(&grads_for(&wa, &g_bad)).unwrap_err();
                assert!(
                    matches!(e, Error::NonFiniteGradient { index: 0, .. }),
                    "{e}"
                );
                assert!(e.to_string().contains("unchanged"));
                assert_eq!(
                    wa.as_tensor().to_vec1::<f64>().unwrap(),
                    before,
                    "parameters untouched"
                );
                assert_eq!(
                    (a.ring_index(), a.filled_slots(), a.step_count()),
                    (b.ring_index(), b.filled_slots(), b.step_count())
                );
            }
        }
        a.try_step(&grads_for(&wa, g)).unwrap();
        b.try_step(&grads_for(&wb, g)).unwrap();
        // Exactly what it would have been without the bad batch: window, K, momentum, params.
        assert_eq!(
            wa.as_tensor().to_vec1::<f64>().unwrap(),
            wb.as_tensor().to_vec1::<f64>().unwrap()
        );
        assert_eq!(a.preconditioned_gradient(), b.preconditioned_gradient());
        assert_eq!(
            a.gram_matrix().unwrap().to_vec2::<f64>().unwrap(),
            b.gram_matrix().unwrap().to_vec2::<f64>().unwrap()
        );
    }
    // Through candle's Optimizer trait the typed error is wrapped, not lost.
    use candle_nn::Optimizer;
    let mut g_bad = gs[0].clone();
    g_bad[0] = f64::NAN;
    let e = a.step(&grads_for(&wa, &g_bad)).unwrap_err();
    assert!(e.to_string().contains("non-finite gradient"), "{e}");
}

#[test]
fn a_non_finite_weight_is_flagged_when_weight_decay_would_put_it_in_the_window() {
    // Coupled weight decay writes g + wd·w into the window: a NaN weight must not enter it
    // (the device gather flags the same, src/optim/device/emu_tests.rs). Without weight decay
    // the weight never enters the window and the step goes on.
    let d = 12;
    let g = vec![0.1f64; d];
    for wd in [0.0, 0.01] {
        let mut w0 = vec![0.5f64; d];
        w0[3] = f64::NAN;
        let ok = Var::new(vec![0.5f64; d].as_slice(), &Device::Cpu).unwrap();
        let bad = Var::new(w0.as_slice(), &Device::Cpu).unwrap();
        let cfg = MFacConfig {
            weight_decay: wd,
            ..f64_cfg(4, 1e-4)
        };
        let mut opt = MFac::try_new(vec![ok.clone(), bad.clone()], cfg).unwrap();
        let mut store = grads_for(&ok, &g);
        store.insert(
            bad.as_tensor(),
            Tensor::new(g.as_slice(), &Device::Cpu).unwrap(),
        );
        let r = opt.try_step(&store);
        if wd > 0.0 {
            let e = r.unwrap_err();
            assert!(
                matches!(e, Error::NonFiniteGradient { index: 1, .. }),
                "{e}"
            );
            assert_eq!(opt.step_count(), 0);
            assert_eq!(ok.as_tensor().to_vec1::<f64>().unwrap(), vec![0.5; d]);
        } else {
            r.unwrap();
            assert_eq!(opt.step_count(), 1);
        }
    }
}

#[test]
fn a_window_that_cannot_fit_fails_before_allocating() {
    let w = Var::zeros(100_000, DType::F32, &Device::Cpu).unwrap();
    // 1e7 × 1e5 × 4 bytes = 4 PB: no machine has that.
    let cfg = MFacConfig {
        num_grads: 10_000_000,
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let e = MFac::try_new(vec![w], cfg).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::OutOfMemory { .. }), "{msg}");
    assert!(
        msg.contains("num_grads") && msg.contains("bf16") && msg.contains("available"),
        "{msg}"
    );
    assert!(
        t.elapsed().as_secs_f64() < 1.0,
        "it must not try to allocate"
    );
}

#[test]
fn config_is_validated() {
    let w = || vec![Var::zeros(10, DType::F32, &Device::Cpu).unwrap()];
    for (cfg, key) in [
        (
            MFacConfig {
                num_grads: 0,
                ..Default::default()
            },
            "num_grads",
        ),
        (
            MFacConfig {
                damp: 0.0,
                ..Default::default()
            },
            "damp",
        ),
        (
            MFacConfig {
                damp: f64::INFINITY,
                ..Default::default()
            },
            "damp",
        ),
        (
            MFacConfig {
                lr: -1.0,
                ..Default::default()
            },
            "lr",
        ),
        (
            MFacConfig {
                momentum: 1.0,
                ..Default::default()
            },
            "momentum",
        ),
        (
            MFacConfig {
                weight_decay: -0.1,
                ..Default::default()
            },
            "weight_decay",
        ),
        (
            MFacConfig {
                window_dtype: DType::U8,
                ..Default::default()
            },
            "window_dtype",
        ),
    ] {
        let e = MFac::try_new(w(), cfg).unwrap_err();
        assert!(
            matches!(&e, Error::OptimizerOption { key: k, .. } if k == key),
            "{key}: {e}"
        );
    }
    assert!(MFac::try_new(vec![], MFacConfig::default()).is_err());
}

#[test]
fn works_as_a_candle_optimizer_on_f32_parameters_with_a_bf16_window() {
    use candle_nn::Optimizer;
    // Minimise ‖Aw − b‖² with several parameters of different shapes.
    let a = Var::new(&[[1.0f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let b = Var::new(&[0.5f32, -0.5], &Device::Cpu).unwrap();
    let loss = |a: &Var, b: &Var| {
        let x = Tensor::new(&[[1.0f32], [1.0]], &Device::Cpu).unwrap();
        (a.as_tensor().matmul(&x).unwrap().squeeze(1).unwrap() + b.as_tensor())
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let cfg = MFacConfig {
        lr: 0.5,
        num_grads: 4,
        damp: 1e-2,
        window_dtype: DType::BF16,
        ..Default::default()
    };
    let mut opt = MFac::new(vec![a.clone(), b.clone()], cfg).unwrap();
    let l0 = loss(&a, &b).to_scalar::<f32>().unwrap();
    for _ in 0..30 {
        opt.backward_step(&loss(&a, &b)).unwrap();
    }
    let l1 = loss(&a, &b).to_scalar::<f32>().unwrap();
    // The empirical Fisher of a squared residual s² is ggᵀ, so M-FAC moves s by ~lr/(2s) per
    // step here: slow but steady. What matters is that the trait path trains every parameter.
    assert!(l1 < 0.9 * l0, "loss {l0} -> {l1}");
    opt.set_learning_rate(0.0);
    assert_eq!(opt.learning_rate(), 0.0);
    let before = a.as_tensor().to_vec2::<f32>().unwrap();
    opt.backward_step(&loss(&a, &b)).unwrap();
    assert_eq!(
        a.as_tensor().to_vec2::<f32>().unwrap(),
        before,
        "lr 0 moves nothing"
    );
    assert_eq!(opt.num_params(), 6);
    assert_eq!(opt.gram_matrix().unwrap().dims(), &[4, 4]);
    assert!(opt.last_update_norm() == 0.0);
}

#[test]
fn option_parsing() {
    // The seed's exact string, the JSON form and HF's key=value form.
    let want = OptimizerSpec::mfac(MFacConfig::model_card());
    assert_eq!(
        OptimizerSpec::parse("MFAC", "lr: 1e-4, num_grads: 1024, damp: 1e-6").unwrap(),
        want
    );
    assert_eq!(
        OptimizerSpec::parse("MFAC", r#"{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}"#).unwrap(),
        want
    );
    assert_eq!(
        OptimizerSpec::parse("mfac", "lr=1e-4,num_grads=1024,damp=1e-6").unwrap(),
        want
    );
    let full = OptimizerSpec::parse(
        "MFAC",
        "lr: 0.01, num_grads: 8, damp: 1e-3, momentum: 0.9, weight_decay: 0.1, window_dtype: bf16",
    )
    .unwrap();
    assert_eq!(
        full,
        OptimizerSpec::mfac(MFacConfig {
            lr: 0.01,
            num_grads: 8,
            damp: 1e-3,
            momentum: 0.9,
            weight_decay: 0.1,
            window_dtype: DType::BF16,
            ..Default::default()
        })
    );
    assert_eq!(
        OptimizerSpec::parse("MFAC", "").unwrap(),
        OptimizerSpec::mfac(MFacConfig::default())
    );
    match OptimizerSpec::parse("adamw_torch", "lr: 2e-5, weight_decay: 0.01")
        .unwrap()
        .kind()
    {
        OptimKind::AdamW(c) => assert_eq!((c.lr, c.weight_decay, c.beta2), (2e-5, 0.01, 0.999)),
        other => panic!("{other:?}"),
    }
    assert_eq!(OptimizerSpec::parse("adamw", "").unwrap().name(), "adamw");

    // Each bad form: an error naming the key and listing the valid keys.
    for (name, args, key) in [
        ("MFAC", "lr: 1e-4, foo: 3", "foo"),
        ("MFAC", "lr: abc", "lr"),
        ("MFAC", "lr: 1e-4 damp: 1e-6", "lr"),
        ("MFAC", "num_grads: 0", "num_grads"),
        ("MFAC", "num_grads: 12.5", "num_grads"),
        ("MFAC", "num_grads: -3", "num_grads"),
        ("MFAC", "damp: 0", "damp"),
        ("MFAC", "damp: -1e-6", "damp"),
        ("MFAC", "momentum: 1", "momentum"),
        ("MFAC", "lr: -1", "lr"),
        ("MFAC", "lr: inf", "lr"),
        ("MFAC", "window_dtype: int8", "window_dtype"),
        ("MFAC", "lr 1e-4", "lr 1e-4"),
        ("MFAC", "{\"lr\": ", "<json>"),
        ("MFAC", "[1, 2]", "<json>"),
        ("adamw_torch", "beta2: 1.5", "beta2"),
        ("adamw_torch", "num_grads: 8", "num_grads"),
    ] {
        let e = OptimizerSpec::parse(name, args).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(&e, Error::OptimizerOption { key: k, .. } if k == key),
            "{name} {args:?}: {msg}"
        );
        assert!(msg.contains("valid keys"), "{msg}");
        let listed = if name == "MFAC" { "num_grads" } else { "beta1" };
        assert!(msg.contains(listed), "{msg}");
    }
    let e = OptimizerSpec::parse("lion", "").unwrap_err();
    assert!(
        e.to_string().contains("MFAC") && e.to_string().contains("adamw_torch"),
        "{e}"
    );
}
