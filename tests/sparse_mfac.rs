//! Sparse M-FAC (top-k window with error feedback) against the authors' code run in float64
//! (../shared/fixtures/sparse-mfac: global top-k from EFCP, block top-k from the maintained
//! package), the density-1 path against dense M-FAC's fixtures, ties, refusals and memory.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use common::{fixture, grads_for, load_st, rel_l2_vec, st_metadata};
use mfac_lab::optim::{MFac, MFacConfig, Optim, OptimizerSpec};

struct Case {
    cfg: MFacConfig,
    params0: Vec<f64>,
    grads: Vec<Vec<f64>>,
    params: Vec<Vec<f64>>,
    error: Vec<Vec<f64>>,
    kept_idx: Vec<Vec<i64>>,
    kept_val: Vec<Vec<f64>>,
    direction: Vec<Vec<f64>>,
}

fn meta(path: &std::path::Path) -> HashMap<String, String> {
    st_metadata(path)
}

fn case(name: &str) -> Case {
    let path = fixture("sparse-mfac").join(format!("case_{name}.safetensors"));
    let t = load_st(&path);
    let meta = meta(&path);
    let num = |k: &str| {
        meta[k]
            .parse::<f64>()
            .unwrap_or_else(|_| panic!("metadata {k}"))
    };
    let rows = |k: &str| t[k].to_vec2::<f64>().unwrap();
    let block_size = (meta["selection"] == "block").then(|| num("block_size") as usize);
    assert_eq!(num("momentum"), 0.0);
    Case {
        cfg: MFacConfig {
            lr: num("lr"),
            num_grads: num("m") as usize,
            damp: num("damp"),
            momentum: 0.0,
            weight_decay: num("weight_decay"),
            window_dtype: DType::F64,
            density: num("density"),
            block_size,
        },
        params0: t["params0"].to_vec1().unwrap(),
        grads: rows("grads"),
        params: rows("params"),
        error: rows("error"),
        kept_idx: t["kept_idx"].to_vec2::<i64>().unwrap(),
        kept_val: rows("kept_val"),
        direction: rows("direction"),
    }
}

/// A parameter vector holding `values` in `dtype`.
fn var_in(values: &[f64], dtype: DType) -> Var {
    let t = Tensor::new(values, &Device::Cpu).unwrap();
    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
}

/// A parameter's values as f64.
fn values(w: &Var) -> Vec<f64> {
    let t = w.as_tensor().to_dtype(DType::F64).unwrap();
    t.to_vec1().unwrap()
}

/// Worst errors over the steps of a case.
#[derive(Debug, Default)]
struct Errors {
    direction: f64,
    direction_quiet: f64,
    moved: f64,
    error: f64,
    kept_val: f64,
}

/// Runs case `name` with parameters and window in `dtype` and returns the worst errors; the
/// kept index sets must equal the reference's at every step (checked here).
fn run(name: &str, dtype: DType) -> Errors {
    let c = case(name);
    assert!(
        c.grads.len() > 2 * c.cfg.num_grads,
        "the ring must wrap at least twice"
    );
    let w = var_in(&c.params0, dtype);
    let p0 = values(&w);
    let mut opt = MFac::try_new(
        vec![w.clone()],
        MFacConfig {
            window_dtype: dtype,
            ..c.cfg
        },
    )
    .unwrap();
    assert!(opt.is_sparse());
    assert_eq!(opt.kept_per_row(), c.kept_idx[0].len(), "case {name}: k");
    let m = c.cfg.num_grads;
    let mut e = Errors::default();
    for (t, g) in c.grads.iter().enumerate() {
        opt.try_step(&grads_for(&w, g)).unwrap();
        let (cols, vals) = opt.kept_entries(t % m).unwrap();
        let want: Vec<u32> = c.kept_idx[t].iter().map(|&i| i as u32).collect();
        assert_eq!(cols, want, "case {name} {dtype:?}: kept set of step {t}");
        e.kept_val = e.kept_val.max(rel_l2_vec(&vals, &c.kept_val[t]));
        e.error = e
            .error
            .max(rel_l2_vec(&opt.error_feedback().unwrap(), &c.error[t]));
        let de = rel_l2_vec(opt.preconditioned_gradient(), &c.direction[t]);
        e.direction = e.direction.max(de);
        // case_e's gradients are scaled by 10^((t mod 5) − 2): the float32 README asks only for
        // the rows with scale ≤ 1.
        if t % 5 <= 2 {
            e.direction_quiet = e.direction_quiet.max(de);
        }
        let now = values(&w);
        let moved: Vec<f64> = now.iter().zip(&p0).map(|(a, b)| a - b).collect();
        let want: Vec<f64> = c.params[t]
            .iter()
            .zip(&c.params0)
            .map(|(a, b)| a - b)
            .collect();
        e.moved = e.moved.max(rel_l2_vec(&moved, &want));
    }
    eprintln!("case {name} {dtype:?}: {e:?}");
    e
}

const CASES: [&str; 7] = ["a", "b", "c", "d", "e", "f", "g"];

// Tolerances: the fixtures' README. f64: `error` and `kept_val` are one rounding (e + g) from
// the inputs (1e-15); the direction and the parameters ≤ 1e-9, except case_e, whose gradients
// span 10^-2..10^2 so the reference itself loses ε·|c|²/(mλ) there (direction ≤ 3e-5,
// parameters ≤ 1e-8; we use the stable form, measured 3.9e-9 by the fixtures' author).
#[test]
fn golden_cases_in_f64() {
    for name in CASES {
        let e = run(name, DType::F64);
        let (dir_tol, moved_tol) = if name == "e" {
            (3e-5, 1e-8)
        } else {
            (1e-9, 1e-9)
        };
        assert!(e.kept_val <= 1e-15, "case {name}: kept values {e:?}");
        assert!(e.error <= 1e-15, "case {name}: error accumulator {e:?}");
        assert!(e.direction <= dir_tol, "case {name}: direction {e:?}");
        assert!(e.moved <= moved_tol, "case {name}: params − params0 {e:?}");
    }
}

// f32 in the stable form (the README): the direction ≤ 2e-6 (case_e 5e-4); params − params0
// is dominated by rounding the f32 parameters themselves: 3× the float32 reference's own error
// (README's third column); the error accumulator ≤ 5e-7 (one f32 rounding of e + g per step).
#[test]
fn golden_cases_in_f32() {
    let moved_ref = [1.2e-4, 2.0e-3, 2.8e-4, 1.6e-4, 4.0e-3, 5.3e-4, 2.1e-3];
    for (name, moved) in CASES.iter().zip(moved_ref) {
        let e = run(name, DType::F32);
        let dir_tol = if *name == "e" { 5e-4 } else { 2e-6 };
        assert!(e.direction <= dir_tol, "case {name}: direction {e:?}");
        assert!(
            e.moved <= 3.0 * moved,
            "case {name}: params − params0 {e:?}"
        );
        assert!(e.error <= 5e-7, "case {name}: error accumulator {e:?}");
        if *name == "e" {
            assert!(e.direction_quiet <= 2e-6, "case e, scale ≤ 1: {e:?}");
        }
    }
}

/// The test can fail: dropping the error feedback (feeding each step's gradient alone, as a
/// plain top-k would) changes the kept sets from the second step on.
#[test]
fn without_error_feedback_the_kept_sets_differ() {
    let c = case("b");
    let w = Var::new(c.params0.as_slice(), &Device::Cpu).unwrap();
    let mut opt = MFac::try_new(vec![w.clone()], c.cfg).unwrap();
    let mut differ = 0;
    for (t, g) in c.grads.iter().enumerate() {
        // Subtract the accumulator so that acc = g: no feedback.
        let e = opt.error_feedback().unwrap();
        let g0: Vec<f64> = g.iter().zip(&e).map(|(g, e)| g - e).collect();
        opt.try_step(&grads_for(&w, &g0)).unwrap();
        let (cols, _) = opt.kept_entries(t % c.cfg.num_grads).unwrap();
        let want: Vec<u32> = c.kept_idx[t].iter().map(|&i| i as u32).collect();
        differ += usize::from(cols != want);
    }
    assert!(differ >= c.grads.len() / 2, "only {differ} steps differ");
}

/// Dense M-FAC's fixtures through the sparse code path at density 1 (every entry kept): the
/// sparse path is dense M-FAC on compressed vectors, nothing else. Cases a, b, d (case c has
/// momentum, which the sparse window refuses, and coupled weight decay). Tolerances are the
/// dense fixtures' (docs/mfac.md): f64 ≤ 1e-9 (d, mixed scales: 1e-6), an f32 window in the
/// stable form ≤ 1e-5 (d: 3e-5).
#[test]
fn density_one_equals_dense_mfac_on_its_fixtures() {
    for (name, dtype, tol) in [
        ("a", DType::F64, 1e-9),
        ("b", DType::F64, 1e-9),
        ("d", DType::F64, 1e-6),
        ("a", DType::F32, 1e-5),
        ("b", DType::F32, 1e-5),
        ("d", DType::F32, 3e-5),
    ] {
        let path = fixture("mfac").join(format!("case_{name}.safetensors"));
        let t = load_st(&path);
        let meta = meta(&path);
        let num = |k: &str| meta[k].parse::<f64>().unwrap();
        assert_eq!((num("momentum"), num("weight_decay")), (0.0, 0.0));
        let cfg = MFacConfig {
            lr: num("lr"),
            num_grads: num("m") as usize,
            damp: num("damp"),
            window_dtype: dtype,
            ..Default::default()
        };
        let p0: Vec<f64> = t["params0"].to_vec1().unwrap();
        let grads: Vec<Vec<f64>> = t["grads"].to_vec2().unwrap();
        let ihvp: Vec<Vec<f64>> = t["ihvp"].to_vec2().unwrap();
        let params: Vec<Vec<f64>> = t["params"].to_vec2().unwrap();
        let w = var_in(&p0, dtype);
        let w0 = values(&w);
        let mut opt = MFac::try_new_sparse(vec![w.clone()], cfg).unwrap();
        assert!(opt.is_sparse() && opt.kept_per_row() == p0.len());
        let (mut e_u, mut e_p) = (0.0f64, 0.0f64);
        for (s, g) in grads.iter().enumerate() {
            opt.try_step(&grads_for(&w, g)).unwrap();
            e_u = e_u.max(rel_l2_vec(opt.preconditioned_gradient(), &ihvp[s]));
            let now = values(&w);
            let moved: Vec<f64> = now.iter().zip(&w0).map(|(a, b)| a - b).collect();
            let want: Vec<f64> = params[s].iter().zip(&p0).map(|(a, b)| a - b).collect();
            e_p = e_p.max(rel_l2_vec(&moved, &want));
            // Everything kept: nothing is left to feed back.
            if dtype == DType::F64 {
                assert!(opt.error_feedback().unwrap().iter().all(|x| *x == 0.0));
            }
        }
        eprintln!("dense case {name} {dtype:?} at density 1: ihvp {e_u:.2e}, moved {e_p:.2e}");
        // f32 parameters add their own rounding to params − params0 (≈ ε₃₂·|w|/|Δw|): bounded as
        // the dense golden test bounds its f32 window (same tolerance for both).
        assert!(e_u <= tol, "case {name} {dtype:?}: ihvp {e_u:e} > {tol:e}");
        if dtype == DType::F64 {
            assert!(
                e_p <= tol,
                "case {name}: params − params0 {e_p:e} > {tol:e}"
            );
        }
    }
}

/// Ties at the top-k boundary go to the lower index, and the whole step is the same bits on
/// every thread count.
#[test]
fn ties_go_to_the_lower_index_on_every_thread_count() {
    // d = 200,000 (over the plain selection's size, so the threaded radix select runs): every
    // |g| equal but a few, so the boundary is one value shared by ~all entries.
    let d = 200_000;
    let k_frac = 0.05; // k = 10,000
    let mut g: Vec<f64> = (0..d)
        .map(|i| if i % 3 == 0 { -0.25 } else { 0.25 })
        .collect();
    for i in [7, 123_456, 199_999] {
        g[i] = 1.0;
    }
    let mut results = vec![];
    for threads in [1, 2, 3, 5] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let out = pool.install(|| {
            let w = Var::new(vec![0.5f32; d].as_slice(), &Device::Cpu).unwrap();
            let cfg = MFacConfig {
                num_grads: 4,
                ..MFacConfig::model_card().with_density(k_frac)
            };
            let mut opt = MFac::try_new(vec![w.clone()], cfg).unwrap();
            opt.try_step(&grads_for(&w, &g)).unwrap();
            let (cols, _) = opt.kept_entries(0).unwrap();
            // A second step with the same gradient: the fed-back entries now lead.
            opt.try_step(&grads_for(&w, &g)).unwrap();
            let (cols2, _) = opt.kept_entries(1).unwrap();
            let wv: Vec<f32> = w.as_tensor().to_vec1().unwrap();
            (
                cols,
                cols2,
                wv.iter().map(|x| x.to_bits()).collect::<Vec<u32>>(),
            )
        });
        results.push(out);
    }
    let (cols, cols2, _) = &results[0];
    let k = 10_000;
    let mut want: Vec<u32> = vec![7, 123_456, 199_999];
    want.extend(
        (0..d as u32)
            .filter(|i| ![7, 123_456, 199_999].contains(i))
            .take(k - 3),
    );
    want.sort_unstable();
    assert!(
        cols == &want,
        "step 1 keeps the three large entries and the lowest indices"
    );
    // Step 2: acc = e + g is 0.5 in magnitude on the entries not kept before (twice their
    // gradient), 0.25 on the kept ones, 1 on the three large ones: those three, then the next
    // 9,997 unkept indices in order.
    let kept1: std::collections::HashSet<u32> = want.iter().copied().collect();
    let mut want2: Vec<u32> = vec![7, 123_456, 199_999];
    want2.extend((0..d as u32).filter(|i| !kept1.contains(i)).take(k - 3));
    want2.sort_unstable();
    assert!(
        cols2 == &want2,
        "step 2 keeps the fed-back entries, lowest indices first"
    );
    for (i, r) in results[1..].iter().enumerate() {
        assert!(
            r == &results[0],
            "run {} differs: the same bits on every thread count",
            i + 1
        );
    }
}

#[test]
fn bad_sparse_options_are_refused_naming_the_key() {
    for (args, key) in [
        ("density: 0", "density"),
        ("density: 1.5", "density"),
        ("density: -0.1", "density"),
        ("density: NaN", "density"),
        ("density: 0.01, block_size: 0", "block_size"),
        ("density: 0.01, block_size: 2.5", "block_size"),
        ("density: 0.01, momentum: 0.9", "momentum"),
        ("block_size: 64, momentum: 0.5", "momentum"),
    ] {
        let e = OptimizerSpec::parse("MFAC", args).unwrap_err().to_string();
        assert!(e.contains(&format!("{key:?}")), "{args}: {e}");
    }
    // A density that keeps nothing of this model is refused when the optimizer is built.
    let w = Var::new(&[1.0f32; 100], &Device::Cpu).unwrap();
    let cfg = MFacConfig::model_card().with_density(0.005);
    let e = MFac::try_new(vec![w], cfg).unwrap_err().to_string();
    assert!(e.contains("density") && e.contains("1.000e-2"), "{e}");
    // Good ones parse, and the label names the window.
    let spec = OptimizerSpec::parse("MFAC", "lr: 1e-4, num_grads: 1024, density: 0.01").unwrap();
    assert_eq!(spec.display_name(), "M-FAC m=1024 1%");
    let spec = OptimizerSpec::parse(
        "MFAC",
        "num_grads: 64, density: 0.05, block_size: 4096, lr: 1e-3",
    )
    .unwrap();
    assert_eq!(spec.display_name(), "M-FAC m=64 5% block 4096 (lr 1e-3)");
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// bert-tiny's size (d = 4,386,307 with a 3-way head), the card's m = 1024, density 1 %: the
/// state (rows, error accumulator, u, the m×m side) ≤ 0.40 GB with f32 values and ≤ 0.25 GB
/// with bf16 ones — and building it does not allocate a dense window (18 GB): resident memory
/// grows by about the state, not more.
#[test]
fn the_cards_window_at_one_percent_fits_in_a_quarter_gigabyte() {
    let d = 4_386_307;
    let w = Var::from_tensor(&Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap()).unwrap();
    for (dtype, limit) in [(DType::F32, 0.40e9), (DType::BF16, 0.25e9)] {
        let before = rss_bytes();
        let cfg = MFacConfig {
            window_dtype: dtype,
            ..MFacConfig::model_card().with_density(0.01)
        };
        let mut opt = MFac::try_new(vec![w.clone()], cfg).unwrap();
        let grown = rss_bytes().saturating_sub(before);
        let state = Optim::state_bytes(&opt);
        eprintln!(
            "{dtype:?}: state {state} bytes (window {}), resident +{grown} bytes",
            opt.window_bytes()
        );
        assert_eq!(opt.kept_per_row(), 43_863);
        assert!((state as f64) <= limit, "{dtype:?}: {state} > {limit}");
        // The memory plan counts at least what the optimizer then holds.
        assert!(cfg.host_bytes(d) >= state as u128);
        assert!(
            grown < 1_000_000_000,
            "{dtype:?}: resident memory grew by {grown}"
        );
        // The window works at this size: two steps of a dense gradient.
        let g: Vec<f64> = (0..d)
            .map(|i| ((i * 7919) % 1000) as f64 * 1e-6 - 5e-4)
            .collect();
        for _ in 0..2 {
            opt.try_step(&grads_for(&w, &g)).unwrap();
        }
        assert_eq!(opt.filled_slots(), 2);
    }
}

/// Bad sparse options through the command line (`glue`, `compare` and `card`): a clear error
/// naming the key, a failing exit, and nothing written.
#[test]
fn bad_sparse_options_on_the_command_line_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let model = fixture("bert-tiny-random");
    let glue = [
        "glue",
        "--task_name",
        "mnli",
        "--do_train",
        "--optim",
        "MFAC",
    ];
    let compare = ["compare", "--optim", "MFAC"];
    for (cmd, args, key) in [
        (&glue[..], "num_grads: 1024, density: 0", "density"),
        (&glue[..], "density: 1.01", "density"),
        (&compare[..], "density: nan", "density"),
        (&compare[..], "density: 0.01, block_size: 0", "block_size"),
        (&glue[..], "density: 0.01, momentum: 0.9", "momentum"),
    ] {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_mfac-lab"))
            .args(cmd)
            .args(["--optim_args", args, "--model_name_or_path"])
            .arg(&model)
            .arg("--output_dir")
            .arg(&out)
            .current_dir(dir.path())
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{cmd:?} {args}: {stderr}");
        assert!(
            stderr.contains(&format!("{key:?}")),
            "{cmd:?} {args}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            !out.exists(),
            "{cmd:?} {args}: the output folder was created"
        );
    }
    // `card --density` is checked the same way.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_mfac-lab"))
        .args(["card", "--density", "0", "--dry_run", "--output_dir"])
        .arg(&out)
        .current_dir(dir.path())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("density"),
        "{stderr}"
    );
    assert!(!out.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

/// When the dense window does not fit, the refusal names the sparse window with its size (and
/// nothing is allocated): bert-tiny's size with 8,192 gradients needs 144 GB dense, ≈ 3.3 GB
/// sparse at 1 %.
#[test]
fn a_dense_window_that_does_not_fit_names_the_sparse_one() {
    let d = 4_386_307;
    let w = Var::from_tensor(&Tensor::zeros(d, DType::F32, &Device::Cpu).unwrap()).unwrap();
    let cfg = MFacConfig {
        num_grads: 8192,
        ..MFacConfig::model_card()
    };
    let e = MFac::try_new(vec![w], cfg).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, mfac_lab::Error::OutOfMemory { .. }), "{msg}");
    let sparse = cfg.with_density(0.01).host_bytes(d) as f64 / 1e9;
    assert!(
        msg.contains(&format!(
            "sparse window (density: 0.01; {sparse:.2} GB with the same num_grads)"
        )),
        "{msg}"
    );
    assert!(msg.contains("window_dtype: bf16"), "{msg}");
}
