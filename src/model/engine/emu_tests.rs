//! The CUDA pass's kernels (`cuda/kernels/pass.cu`, unchanged) run on the CPU through
//! `crates/cuda-emu`, launched with the shapes of [`super::launch`] (what the cudarc path
//! launches), each under the three schedules of [`Schedule::all`] (which must agree), and
//! checked against the CPU engine's functions where they compute the same thing, else against a
//! formula written out here (or a central difference of an f64 forward formula).
//!
//! Tolerances are relative L2 errors, each with its reason. What differs from the GPU: the
//! harness runs the C library's `expf`/`erff`/`tanhf` (CUDA's are within 2 ulp too, and nvcc
//! contracts `a·b + c` into one FMA where this build rounds twice); what differs from the CPU
//! engine: its own f32 `exp` and Φ (`model::fastmath`, within 2 ulp and 1.2e-7), and the order
//! of f32 sums (warp trees here, 8 lanes there).

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use cuda_emu::{pass, Schedule};

use crate::model::engine::cpu::dropout::Mask;
use crate::model::engine::cpu::{embeddings, gelu, loss, norm};
use crate::model::engine::launch::{self, mix64, site_key, DropSite, Launch, LN_ROWS, THREADS};
use crate::model::engine::TokenIds;
use crate::model::math::Real;
use crate::model::params::{Embeddings, LayerNorm};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig};

const SEED: u64 = 0x5EED_C0DE;

/// Deterministic inputs: SplitMix64.
struct Gen(u64);

impl Gen {
    fn new(seed: u64) -> Self {
        Gen(mix64(seed))
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }
    fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 * (1.0 / 16_777_216.0))
    }
    fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }
    fn below(&mut self, n: u32) -> u32 {
        (self.next() % n as u64) as u32
    }
}

/// The host's prediction of pass.cu's `drop_mult(d, i)`: 0 or `mult` (1 when the site is off).
fn host_mult(d: DropSite, i: u64) -> f32 {
    if d.threshold == 0 {
        return 1.0;
    }
    let u = (mix64(d.key ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03)) >> 32) as u32;
    if u >= d.threshold {
        d.mult
    } else {
        0.0
    }
}

/// The CPU engine's mask of the same site over `n` elements (`None` when off).
fn cpu_mask(d: DropSite, n: usize) -> Option<Mask<f32>> {
    (d.threshold != 0).then(|| Mask {
        keep: (0..n as u64)
            .map(|i| u8::from(host_mult(d, i) != 0.0))
            .collect(),
        mult: d.mult,
    })
}

fn site(step: u64, s: u64, p: f64) -> DropSite {
    DropSite::new(site_key(step, s), p)
}

fn emu(d: DropSite) -> cuda_emu::DropSite {
    cuda_emu::DropSite {
        key: d.key,
        threshold: d.threshold,
        mult: d.mult,
    }
}

/// One launch of `body` with the shape `l`; a harness diagnostic fails the test.
fn run(l: Launch, s: Schedule, body: impl Fn()) {
    l.emulate(s, body)
}

/// `f` under each schedule; the results must be identical (these kernels have no float
/// atomics: every sum has a fixed order). Returns the first.
fn on_all<T: PartialEq>(what: &str, f: impl Fn(Schedule) -> T) -> T {
    let mut outs = Schedule::all(SEED).into_iter().map(|s| (s, f(s)));
    let (_, first) = outs.next().expect("three schedules");
    for (s, o) in outs {
        assert!(o == first, "{what}: {s:?} differs from Schedule::Fixed");
    }
    first
}

/// The CPU engine's view of the embedding tables and their LayerNorm.
fn tables<'a>(
    word: &'a [f32],
    pos: &'a [f32],
    typ: &'a [f32],
    lw: &'a [f32],
    lb: &'a [f32],
) -> Embeddings<&'a [f32]> {
    Embeddings {
        word_embeddings: word,
        position_embeddings: pos,
        token_type_embeddings: typ,
        layer_norm: LayerNorm {
            weight: lw,
            bias: lb,
        },
    }
}

/// A LayerNorm forward's (y, x̂, 1/σ) against the CPU's.
fn close_ln(
    tag: &str,
    (y, xhat, inv): (&[f32], &[f32], &[f32]),
    yc: &[f32],
    saved: &norm::NormSaved<f32>,
) {
    close(&format!("{tag} y"), y, &f64s(yc), LN_FWD_TOL);
    close(&format!("{tag} xhat"), xhat, &f64s(&saved.xhat), LN_FWD_TOL);
    close(&format!("{tag} inv"), inv, &saved.inv, LN_FWD_TOL);
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn rel_l2(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "lengths");
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w).powi(2);
        den += w * w;
    }
    (num / den.max(1e-300)).sqrt()
}

/// Asserts a relative L2 error of at most `tol` (NaN fails).
fn close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    let e = rel_l2(got, want);
    eprintln!("{what}: relative L2 error {e:.2e} (tolerance {tol:.0e})");
    assert!(e <= tol, "{what}: relative L2 error {e:.3e} > {tol:.0e}");
}

/// `x[i] + b[i % cols]` in f32.
fn add_bias(x: &[f32], b: &[f32]) -> Vec<f32> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| v + b[i % b.len()])
        .collect()
}

/// Column sums in f64 of a row-major `[rows, cols]` matrix.
fn col_sums(x: &[f32], cols: usize) -> Vec<f64> {
    let mut s = vec![0f64; cols];
    for (i, &v) in x.iter().enumerate() {
        s[i % cols] += v as f64;
    }
    s
}

// LayerNorm outputs: both sides form the same f32 row (sum of three table rows in f64 rounded
// to f32; `a + bias` then `·mask + res` in f32), keep mean, variance and x̂ in f64 and round
// once at the end; only the order of the f64 sums differs. So: 1 ulp (1.2e-7), tolerance 1e-6.
const LN_FWD_TOL: f64 = 1e-6;

#[test]
fn launch_shapes_are_the_documented_ones() {
    assert_eq!(
        launch::per_row(70),
        Launch {
            grid: 9,
            block: 256,
            shared: 0
        }
    );
    assert_eq!(launch::per_row(0).grid, 1);
    assert_eq!(launch::elementwise(257).grid, 2);
    assert_eq!(launch::elementwise(1 << 30).grid, 8192);
    // sumsq_partial: at most SUMSQ_BLOCKS partial sums per gradient; norm_clip: one warp.
    assert_eq!(launch::sumsq(3000).grid, 12);
    assert_eq!(launch::sumsq(4_000_000).grid as usize, launch::SUMSQ_BLOCKS);
    assert_eq!(
        (launch::norm_clip().grid, launch::norm_clip().block),
        (1, 32)
    );
    assert_eq!(
        launch::ln_bwd(130, 40),
        Launch {
            grid: 3,
            block: 256,
            shared: 8 * 3 * 40 * 4
        }
    );
    assert_eq!(launch::ln_cols(128).grid, 2);
    assert_eq!(launch::loss(), launch::grid(1, 0));
    assert_eq!(THREADS, 256);
    // pass.cu's struct DropSite and cuda-emu's have the layout of ours.
    assert_eq!(std::mem::size_of::<DropSite>(), 16);
    assert_eq!(
        std::mem::size_of::<DropSite>(),
        std::mem::size_of::<cuda_emu::DropSite>()
    );
    assert_eq!(
        std::mem::align_of::<DropSite>(),
        std::mem::align_of::<cuda_emu::DropSite>()
    );
}

#[test]
fn embed_ln_fwd_matches_the_cpu_embeddings_and_layer_norm() {
    let (vocab, ntype, eps) = (50usize, 2usize, 1e-12f32);
    for (h, b, t) in [(32usize, 7usize, 10usize), (40, 5, 13), (128, 3, 9)] {
        let n = b * t;
        let mut r = Gen::new((h * 1000 + n) as u64);
        let word = r.vec(vocab * h, -1.0, 1.0);
        let pos = r.vec(t * h, -0.5, 0.5);
        let typ = r.vec(ntype * h, -0.5, 0.5);
        let lw = r.vec(h, 0.8, 1.2);
        let lb = r.vec(h, -0.1, 0.1);
        let ids: Vec<u32> = (0..n).map(|_| r.below(vocab as u32)).collect();
        let types: Vec<u32> = (0..n).map(|_| r.below(ntype as u32)).collect();
        let d = site(7, 0, 0.1);
        for bad in [false, true] {
            let (mut ids_k, mut types_k) = (ids.clone(), types.clone());
            if bad {
                ids_k[3] = vocab as u32 + 5;
                types_k[n - 1] = 9;
            }
            let (y, xhat, inv, flag) = on_all("embed_ln_fwd", |s| {
                let (mut y, mut xhat, mut inv, mut flag) = (
                    vec![0f32; n * h],
                    vec![0f32; n * h],
                    vec![0f32; n],
                    vec![0i32],
                );
                let (yp, xp, ip, fp) = (
                    y.as_mut_ptr(),
                    xhat.as_mut_ptr(),
                    inv.as_mut_ptr(),
                    flag.as_mut_ptr(),
                );
                let (idp, tp) = (ids_k.as_ptr(), types_k.as_ptr());
                let (wp, pp, typ_p) = (word.as_ptr(), pos.as_ptr(), typ.as_ptr());
                let (lwp, lbp, de) = (lw.as_ptr(), lb.as_ptr(), emu(d));
                run(launch::per_row(n), s, move || unsafe {
                    pass::embed_ln_fwd(
                        idp,
                        tp,
                        wp,
                        pp,
                        typ_p,
                        lwp,
                        lbp,
                        yp,
                        xp,
                        ip,
                        n as i32,
                        t as i32,
                        h as i32,
                        vocab as i32,
                        ntype as i32,
                        eps,
                        de,
                        fp,
                    )
                });
                (y, xhat, inv, flag[0])
            });
            assert_eq!(flag, if bad { 3 } else { 0 }, "the out-of-range flag");
            // The kernel reads row 0 for an id out of range.
            let fix = |v: &[u32], lim: usize| -> Vec<u32> {
                v.iter()
                    .map(|&i| if i as usize >= lim { 0 } else { i })
                    .collect()
            };
            let tok = TokenIds {
                batch: b,
                seq_len: t,
                ids: fix(&ids_k, vocab),
                type_ids: fix(&types_k, ntype),
            };
            let emb = tables(&word, &pos, &typ, &lw, &lb);
            let e = embeddings::embed(&emb, &tok, h);
            let (yc, saved) = norm::add_norm(
                &e,
                &None,
                None,
                &lw,
                &lb,
                eps as f64,
                &cpu_mask(d, n * h),
                h,
            );
            let tag = format!("embed_ln_fwd h={h} n={n} bad={bad}");
            close_ln(&tag, (&y[..], &xhat[..], &inv[..]), &yc, &saved);
        }
    }
}

#[test]
fn add_ln_fwd_matches_the_cpu_add_norm() {
    let eps = 1e-12f32;
    for (h, n, p) in [(32usize, 70usize, 0.1), (40, 37, 0.0), (128, 19, 0.1)] {
        let mut r = Gen::new((h * 7 + n) as u64);
        let a = r.vec(n * h, -2.0, 2.0);
        let bias = r.vec(h, -0.5, 0.5);
        let res = r.vec(n * h, -1.0, 1.0);
        let lw = r.vec(h, 0.8, 1.2);
        let lb = r.vec(h, -0.1, 0.1);
        let d = site(11, 2, p);
        let (y, xhat, inv) = on_all("add_ln_fwd", |s| {
            let (mut y, mut xhat, mut inv) = (vec![0f32; n * h], vec![0f32; n * h], vec![0f32; n]);
            let (yp, xp, ip) = (y.as_mut_ptr(), xhat.as_mut_ptr(), inv.as_mut_ptr());
            let (ap, bp, rp, lwp, lbp, de) = (
                a.as_ptr(),
                bias.as_ptr(),
                res.as_ptr(),
                lw.as_ptr(),
                lb.as_ptr(),
                emu(d),
            );
            run(launch::per_row(n), s, move || unsafe {
                pass::add_ln_fwd(
                    ap, bp, de, rp, lwp, lbp, yp, xp, ip, n as i32, h as i32, eps,
                )
            });
            (y, xhat, inv)
        });
        let ab = add_bias(&a, &bias);
        let (yc, saved) = norm::add_norm(
            &ab,
            &cpu_mask(d, n * h),
            Some(&res),
            &lw,
            &lb,
            eps as f64,
            &None,
            h,
        );
        let tag = format!("add_ln_fwd h={h} n={n} p={p}");
        close_ln(&tag, (&y[..], &xhat[..], &inv[..]), &yc, &saved);
    }
}

#[test]
fn ln_bwd_and_ln_cols_finish_match_the_cpu_add_norm_bwd() {
    let eps = 1e-12f64;
    // (h, rows, dropout on the output's gradient, on the input side, dense bias gradient)
    let cases = [
        (32usize, 70usize, 0.1, 0.1, true),
        (40, 130, 0.1, 0.0, false),
        (128, 100, 0.0, 0.1, true),
        (40, 64, 0.0, 0.0, true),
    ];
    for (h, n, p_out, p_in, with_da) in cases {
        let mut r = Gen::new((h * 13 + n) as u64);
        let a = r.vec(n * h, -2.0, 2.0);
        let res = r.vec(n * h, -1.0, 1.0);
        let lw = r.vec(h, 0.8, 1.2);
        let lb = r.vec(h, -0.1, 0.1);
        let dy = r.vec(n * h, -1.0, 1.0);
        let (d_out, d_in) = (site(5, 1, p_out), site(5, 2, p_in));
        let (m_out, m_in) = (cpu_mask(d_out, n * h), cpu_mask(d_in, n * h));
        // The forward's saved values (the CPU's), given to both backwards.
        let (_, saved) = norm::add_norm(&a, &m_in, Some(&res), &lw, &lb, eps, &None, h);
        let xhat: Vec<f32> = saved.xhat.to_vec();
        let inv: Vec<f32> = saved.inv.iter().map(|&v| v as f32).collect();
        let shape = launch::ln_bwd(n, h);
        let blocks = n.div_ceil(LN_ROWS);
        let (dr, da, dw, db, dbias) = on_all("ln_bwd", |s| {
            let (mut dr, mut da, mut part) = (
                vec![0f32; n * h],
                vec![0f32; n * h],
                vec![0f32; shape.grid as usize * 3 * h],
            );
            let (mut dw, mut db, mut dbias) = (vec![0f32; h], vec![0f32; h], vec![0f32; h]);
            let (drp, pp) = (dr.as_mut_ptr(), part.as_mut_ptr());
            let dap = if with_da {
                da.as_mut_ptr()
            } else {
                std::ptr::null_mut()
            };
            let (dyp, xp, ip, wp) = (dy.as_ptr(), xhat.as_ptr(), inv.as_ptr(), lw.as_ptr());
            let (eo, ei) = (emu(d_out), emu(d_in));
            run(shape, s, move || unsafe {
                pass::ln_bwd(
                    dyp,
                    eo,
                    xp,
                    ip,
                    wp,
                    drp,
                    ei,
                    dap,
                    pp,
                    n as i32,
                    h as i32,
                    LN_ROWS as i32,
                )
            });
            let (dwp, dbp) = (dw.as_mut_ptr(), db.as_mut_ptr());
            let dbiasp = if with_da {
                dbias.as_mut_ptr()
            } else {
                std::ptr::null_mut()
            };
            let pc = part.as_ptr();
            run(launch::ln_cols(h), s, move || unsafe {
                pass::ln_cols_finish(pc, blocks as i32, h as i32, dwp, dbp, dbiasp)
            });
            (dr, da, dw, db, dbias)
        });
        let (drc, dac, dwc, dbc) = norm::add_norm_bwd(&dy, &saved, &lw, &m_in, &m_out, h);
        let dac: Vec<f32> = dac.map(|v| v.to_vec()).unwrap_or_else(|| drc.to_vec());
        let tag = format!("ln_bwd h={h} n={n} p_out={p_out} p_in={p_in}");
        // dr, da: per element the same f64 formula from the same f32 inputs (1/σ rounded to
        // f32 for the kernel: 6e-8), rounded once; the row means' f64 order differs.
        close(&format!("{tag} dr"), &dr, &f64s(&drc), 1e-6);
        if with_da {
            close(&format!("{tag} da"), &da, &f64s(&dac), 1e-6);
            // The dense bias's gradient: Σ over rows of da. The kernel sums in f32 per warp
            // (≤ 8 rows) and over its 8 warps, then in f64 over blocks: ~16 f32 roundings of
            // partial sums that cancel (inputs of both signs), so 1e-5.
            close(&format!("{tag} dbias"), &dbias, &col_sums(&dac, h), 1e-5);
        } else {
            assert!(da.iter().all(|&v| v == 0.0), "{tag}: da written when null");
            assert!(dbias.iter().all(|&v| v == 0.0), "{tag}: dbias written");
        }
        // dw, db: the same f32 partial sums as dbias against the CPU's f64 sums.
        close(&format!("{tag} dw"), &dw, &f64s(&dwc), 1e-5);
        close(&format!("{tag} db"), &db, &f64s(&dbc), 1e-5);
    }
}

#[test]
fn gelu_fwd_and_bwd_match_the_cpu_gelu_and_the_exact_formula() {
    // (rows, cols, a grid smaller than elementwise's to exercise the grid-stride loop)
    for (n, cols, small_grid) in [(37usize, 100usize, false), (9, 512, true)] {
        let total = n * cols;
        let mut r = Gen::new(total as u64);
        let f0 = r.vec(total, -5.0, 5.0);
        let bias = r.vec(cols, -0.5, 0.5);
        let dg0 = r.vec(total, -1.0, 1.0);
        let shape = if small_grid {
            launch::grid(3, 0)
        } else {
            launch::elementwise(total)
        };
        let (f, g, df) = on_all("gelu", |s| {
            let (mut f, mut g, mut dg) = (f0.clone(), vec![0f32; total], dg0.clone());
            let (fp, gp, dgp, bp) = (
                f.as_mut_ptr(),
                g.as_mut_ptr(),
                dg.as_mut_ptr(),
                bias.as_ptr(),
            );
            run(shape, s, move || unsafe {
                pass::gelu_fwd(fp, bp, gp, n as i32, cols as i32)
            });
            let fc = f.as_ptr();
            run(launch::elementwise(total), s, move || unsafe {
                pass::gelu_bwd(dgp, fc, total)
            });
            (f, g, dg)
        });
        let fb = add_bias(&f0, &bias);
        assert!(f == fb, "gelu_fwd: f + bias (f32) kept in f");
        let (gc, phi) = gelu::gelu(&fb);
        let mut dfc = dg0.clone();
        gelu::gelu_bwd(&mut dfc, &fb, &phi);
        let tag = format!("gelu n={n} cols={cols}");
        // erff vs the CPU's Φ fit (1.2e-7 fractional) and f32 products: a few 1e-7.
        close(&format!("{tag} fwd vs cpu"), &g, &f64s(&gc), 1e-6);
        close(&format!("{tag} bwd vs cpu"), &df, &f64s(&dfc), 1e-6);
        // The exact forms in f64 (libm's erf and exp) from the same f32 inputs.
        let exact_g: Vec<f64> = fb
            .iter()
            .map(|&x| {
                let x = x as f64;
                x * 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2))
            })
            .collect();
        let exact_df: Vec<f64> = fb
            .iter()
            .zip(&dg0)
            .map(|(&x, &d)| {
                let x = x as f64;
                let phi = 0.5 * (1.0 + libm::erf(x * std::f64::consts::FRAC_1_SQRT_2));
                let dens = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
                d as f64 * (phi + x * dens)
            })
            .collect();
        close(&format!("{tag} fwd vs f64"), &g, &exact_g, 1e-6);
        close(&format!("{tag} bwd vs f64"), &df, &exact_df, 1e-6);
    }
}

#[test]
fn softmax_fwd_and_bwd_match_the_cpu_rows_and_the_host_dropout_masks() {
    // (batch, heads, t: not a multiple of 32, below 32, a multiple, dropout)
    for (b, nh, t, p) in [
        (2usize, 2usize, 37usize, 0.1),
        (3, 2, 5, 0.1),
        (1, 2, 64, 0.0),
    ] {
        let rows = b * nh * t;
        let mut r = Gen::new((rows * 31 + t) as u64);
        let s0 = r.vec(rows * t, -4.0, 4.0);
        let dp0 = r.vec(rows * t, -1.0, 1.0);
        // Per batch row a mask with some keys off (never all).
        let mask: Vec<u32> = (0..b * t)
            .map(|i| u32::from(i % t == 0 || r.below(4) != 0))
            .collect();
        let scale = 0.25f32;
        let d = site(3, 1, p);
        let keep_pd = p > 0.0;
        let (pr, pd, ds) = on_all("softmax", |s| {
            let (mut sv, mut pd, mut dp) = (s0.clone(), vec![0f32; rows * t], dp0.clone());
            let (sp, dpp, mp) = (sv.as_mut_ptr(), dp.as_mut_ptr(), mask.as_ptr());
            let pdp = if keep_pd {
                pd.as_mut_ptr()
            } else {
                std::ptr::null_mut()
            };
            let de = emu(d);
            run(launch::per_row(rows), s, move || unsafe {
                pass::softmax_fwd(sp, pdp, mp, rows as i32, t as i32, nh as i32, scale, de)
            });
            let pc = sv.as_ptr();
            run(launch::per_row(rows), s, move || unsafe {
                pass::softmax_bwd(dpp, pc, rows as i32, t as i32, scale, de)
            });
            (sv, pd, dp)
        });
        // The CPU rows: HF's additive mask (mask − 1)·(−f32::MIN), softmax in f32.
        let mut pc = s0.clone();
        for (row, chunk) in pc.chunks_mut(t).enumerate() {
            let bi = row / (nh * t);
            let madd: Vec<f32> = mask[bi * t..][..t]
                .iter()
                .map(|&k| (k as f32 - 1.0) * -f32::MIN)
                .collect();
            <f32 as Real>::softmax_row(chunk, &madd, scale as f64, &mut vec![0f64; t]);
        }
        let tag = format!("softmax b={b} nh={nh} t={t} p={p}");
        // expf vs the CPU's exp (both within 2 ulp), sums in another order: a few 1e-7.
        close(&format!("{tag} fwd"), &pr, &f64s(&pc), 1e-6);
        // Masked keys get exactly 0.
        for (row, chunk) in pr.chunks(t).enumerate() {
            let bi = row / (nh * t);
            for (j, &v) in chunk.iter().enumerate() {
                if mask[bi * t + j] == 0 {
                    assert_eq!(v, 0.0, "{tag}: masked key {j} of row {row}");
                }
            }
        }
        // The dropped probabilities: the kernel's p times the host's prediction, bit for bit.
        if keep_pd {
            for (i, (&v, &pv)) in pd.iter().zip(&pr).enumerate() {
                assert_eq!(
                    v.to_bits(),
                    (pv * host_mult(d, i as u64)).to_bits(),
                    "{tag}: pd[{i}]"
                );
            }
        }
        // Backward: the CPU row with the same p (the kernel's) and the same mask.
        let m = cpu_mask(d, rows * t);
        let mut dsc = dp0.clone();
        for (row, chunk) in dsc.chunks_mut(t).enumerate() {
            let mk = m.as_ref().map(|m| (&m.keep[row * t..][..t], m.mult));
            <f32 as Real>::softmax_bwd_row(chunk, &pr[row * t..][..t], mk, scale as f64);
        }
        // f32 throughout; Σ g·p in another order enters every element's g − Σ g·p: 1e-6 of
        // its size, more where g ≈ Σ g·p, so 1e-5.
        close(&format!("{tag} bwd"), &ds, &f64s(&dsc), 1e-5);
    }
}

#[test]
fn pool_fwd_and_bwd_match_tanh_and_its_central_difference() {
    for (n, h) in [(5usize, 128usize), (7, 40)] {
        let total = n * h;
        let mut r = Gen::new(total as u64 + 99);
        let z = r.vec(total, -2.0, 2.0);
        let bias = r.vec(h, -0.2, 0.2);
        let dh0 = r.vec(total, -1.0, 1.0);
        let d = site(9, 7, 0.1);
        let (pooled, head_in, dz) = on_all("pool", |s| {
            let (mut pooled, mut head_in, mut dh) =
                (vec![0f32; total], vec![0f32; total], dh0.clone());
            let (pp, hp, dhp) = (pooled.as_mut_ptr(), head_in.as_mut_ptr(), dh.as_mut_ptr());
            let (zp, bp, de) = (z.as_ptr(), bias.as_ptr(), emu(d));
            run(launch::elementwise(total), s, move || unsafe {
                pass::pool_fwd(zp, bp, pp, hp, n as i32, h as i32, de)
            });
            let pc = pooled.as_ptr();
            run(launch::elementwise(total), s, move || unsafe {
                pass::pool_bwd(dhp, pc, total as i32, de)
            });
            (pooled, head_in, dh)
        });
        let zb = add_bias(&z, &bias);
        let tag = format!("pool n={n} h={h}");
        let y: Vec<f64> = zb.iter().map(|&v| (v as f64).tanh()).collect();
        // tanhf within 2 ulp.
        close(&format!("{tag} fwd vs f64 tanh"), &pooled, &y, 1e-6);
        for (i, (&v, &pv)) in head_in.iter().zip(&pooled).enumerate() {
            assert_eq!(
                v.to_bits(),
                (pv * host_mult(d, i as u64)).to_bits(),
                "{tag}: head_in[{i}]"
            );
        }
        // The formula from the kernel's own pooled values: one f32 rounding.
        let formula: Vec<f64> = (0..total)
            .map(|i| {
                let y = pooled[i] as f64;
                (dh0[i] * host_mult(d, i as u64)) as f64 * (1.0 - y * y)
            })
            .collect();
        close(&format!("{tag} bwd vs formula"), &dz, &formula, 1e-6);
        // Central difference of the f64 tanh (step 1e-4: truncation ~1e-9, rounding ~1e-12).
        // The kernel's 1 − y² uses y rounded to f32: relative 2y²/(1−y²)·6e-8 ≤ 3e-6 here.
        let e = 1e-4;
        let fd: Vec<f64> = (0..total)
            .map(|i| {
                let x = zb[i] as f64;
                let slope = ((x + e).tanh() - (x - e).tanh()) / (2.0 * e);
                (dh0[i] * host_mult(d, i as u64)) as f64 * slope
            })
            .collect();
        close(&format!("{tag} bwd vs central difference"), &dz, &fd, 1e-5);
    }
}

#[test]
fn loss_fwd_bwd_matches_the_cpu_loss_and_flags_bad_labels() {
    // (batch, classes, regression, labels out of range)
    let cases = [
        (13usize, 3usize, false, false),
        (300, 2, false, false),
        (9, 1, true, false),
        (6, 3, false, true),
    ];
    for (b, c, regression, bad) in cases {
        let mut r = Gen::new((b * 10 + c) as u64);
        let logits0 = r.vec(b * c, -3.0, 3.0);
        let bias = r.vec(c, -0.5, 0.5);
        let mut labels: Vec<f32> = if regression {
            r.vec(b, -2.0, 2.0)
        } else {
            (0..b).map(|_| r.below(c as u32) as f32).collect()
        };
        if bad {
            labels[1] = c as f32;
            labels[2] = -1.0;
            labels[4] = 1.5;
        }
        let (logits, dl, dbias, out, flag) = on_all("loss_fwd_bwd", |s| {
            let (mut z, mut dl, mut dbias) = (logits0.clone(), vec![0f32; b * c], vec![0f32; c]);
            let (mut out, mut flag) = (vec![0f64], vec![0i32]);
            let (zp, dlp, dbp, op, fp) = (
                z.as_mut_ptr(),
                dl.as_mut_ptr(),
                dbias.as_mut_ptr(),
                out.as_mut_ptr(),
                flag.as_mut_ptr(),
            );
            let (bp, lp) = (bias.as_ptr(), labels.as_ptr());
            run(launch::loss(), s, move || unsafe {
                pass::loss_fwd_bwd(
                    zp,
                    bp,
                    lp,
                    dlp,
                    dbp,
                    op,
                    fp,
                    b as i32,
                    c as i32,
                    i32::from(regression),
                )
            });
            (z, dl, dbias, out[0], flag[0])
        });
        let tag = format!("loss b={b} c={c} regression={regression} bad={bad}");
        assert_eq!(flag, if bad { 4 } else { 0 }, "{tag}: flag");
        let zb = add_bias(&logits0, &bias);
        assert!(logits == zb, "{tag}: the bias added in place");
        // The kernel reads class 0 for a bad label.
        let targets: Vec<f64> = labels
            .iter()
            .map(|&l| {
                let ok = regression || (l >= 0.0 && (l as usize) < c && l.fract() == 0.0);
                if ok {
                    l as f64
                } else {
                    0.0
                }
            })
            .collect();
        let (lc, dlc) = loss::loss_grad(&zb, &targets, c, regression);
        // Both in f64 from the same f32 logits; only the order of the batch sum differs.
        assert!(
            (out - lc).abs() <= 1e-12 * lc.abs(),
            "{tag}: loss {out} vs {lc}"
        );
        // The same f64 value rounded to f32 on both sides (exp/log of two libms: 1 ulp).
        close(&format!("{tag} dlogits"), &dl, &f64s(&dlc), 1e-6);
        close(&format!("{tag} dbias"), &dbias, &col_sums(&dlc, c), 1e-6);
    }
}

#[test]
fn embed_bwd_matches_the_cpu_scatter_add() {
    let (vocab, ntype, pad) = (12usize, 2usize, 0u32);
    for (b, t, h, bad) in [(3usize, 9usize, 40usize, false), (2, 11, 32, true)] {
        let n = b * t;
        let mut r = Gen::new((n * h) as u64 + 5);
        let de = r.vec(n * h, -1.0, 1.0);
        // A small vocabulary: rows collide (atomics), the pad id appears.
        let mut ids: Vec<u32> = (0..n).map(|_| r.below(vocab as u32)).collect();
        ids[0] = pad;
        let mut types: Vec<u32> = (0..n).map(|_| r.below(ntype as u32)).collect();
        if bad {
            ids[4] = vocab as u32 + 1;
            types[6] = 5;
        }
        let run_once = |s: Schedule| {
            let (mut dword, mut dpos, mut dtyp) = (
                vec![0f32; vocab * h],
                vec![0f32; t * h],
                vec![0f32; ntype * h],
            );
            let (wp, pp, tp) = (dword.as_mut_ptr(), dpos.as_mut_ptr(), dtyp.as_mut_ptr());
            let (dep, ip, typ_p) = (de.as_ptr(), ids.as_ptr(), types.as_ptr());
            run(launch::elementwise(n * h), s, move || unsafe {
                pass::embed_bwd(
                    dep,
                    ip,
                    typ_p,
                    wp,
                    pp,
                    tp,
                    n as i32,
                    t as i32,
                    h as i32,
                    pad,
                    vocab as i32,
                    ntype as i32,
                )
            });
            (dword, dpos, dtyp)
        };
        // The reference: the CPU's, or for bad ids written out here (a bad id or type adds
        // nothing to its table, the position still gets the row).
        let (rw, rp, rt) = if bad {
            let (mut w, mut p, mut ty) = (
                vec![0f64; vocab * h],
                vec![0f64; t * h],
                vec![0f64; ntype * h],
            );
            for row in 0..n {
                for c in 0..h {
                    let g = de[row * h + c] as f64;
                    let (id, tt) = (ids[row] as usize, types[row] as usize);
                    if id < vocab && id != pad as usize {
                        w[id * h + c] += g;
                    }
                    p[(row % t) * h + c] += g;
                    if tt < ntype {
                        ty[tt * h + c] += g;
                    }
                }
            }
            (w, p, ty)
        } else {
            let (word, pos, typ) = (
                vec![0f32; vocab * h],
                vec![0f32; t * h],
                vec![0f32; ntype * h],
            );
            let (lw, lb) = (vec![1f32; h], vec![0f32; h]);
            let emb = tables(&word, &pos, &typ, &lw, &lb);
            let tok = TokenIds {
                batch: b,
                seq_len: t,
                ids: ids.clone(),
                type_ids: types.clone(),
            };
            let (w, p, ty) = embeddings::embed_bwd(&de, &emb, &tok, pad, h);
            (f64s(&w), f64s(&p), f64s(&ty))
        };
        assert!(
            rw[pad as usize * h..][..h].iter().all(|&v| v == 0.0),
            "the reference's pad row"
        );
        let tag = format!("embed_bwd b={b} t={t} h={h} bad={bad}");
        // Atomic f32 adds in an order that differs by schedule (as on a GPU): ≤ 22 terms per
        // sum, so each schedule within 1e-6 of the f64 sums (and the pad row exactly 0).
        for s in Schedule::all(SEED) {
            let (w, p, ty) = run_once(s);
            close(&format!("{tag} {s:?} dword"), &w, &rw, 1e-6);
            close(&format!("{tag} {s:?} dpos"), &p, &rp, 1e-6);
            close(&format!("{tag} {s:?} dtyp"), &ty, &rt, 1e-6);
            assert!(w[pad as usize * h..][..h].iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn qkv_stack_bias_add_and_fill_are_exact() {
    for h in [32usize, 40] {
        let mut r = Gen::new(h as u64 + 1234);
        let (wq, wk, wv) = (
            r.vec(h * h, -1.0, 1.0),
            r.vec(h * h, -1.0, 1.0),
            r.vec(h * h, -1.0, 1.0),
        );
        let (bq, bk, bv) = (
            r.vec(h, -1.0, 1.0),
            r.vec(h, -1.0, 1.0),
            r.vec(h, -1.0, 1.0),
        );
        let (w3, b3) = on_all("qkv_stack", |s| {
            let (mut w3, mut b3) = (vec![0f32; 3 * h * h], vec![0f32; 3 * h]);
            let (w3p, b3p) = (w3.as_mut_ptr(), b3.as_mut_ptr());
            let (q, k, v) = (wq.as_ptr(), wk.as_ptr(), wv.as_ptr());
            let (bqp, bkp, bvp) = (bq.as_ptr(), bk.as_ptr(), bv.as_ptr());
            run(launch::elementwise(3 * h * h + 3 * h), s, move || unsafe {
                pass::qkv_stack(w3p, b3p, q, k, v, bqp, bkp, bvp, h as i32)
            });
            (w3, b3)
        });
        assert!(
            w3 == [wq.clone(), wk.clone(), wv.clone()].concat(),
            "qkv_stack h={h}: W₃"
        );
        assert!(
            b3 == [bq.clone(), bk.clone(), bv.clone()].concat(),
            "qkv_stack h={h}: b₃"
        );
    }
    for (n, cols, shape) in [
        (37usize, 120usize, launch::elementwise(37 * 120)),
        (37, 120, launch::grid(2, 0)),
        (4, 3, launch::elementwise(12)),
    ] {
        let mut r = Gen::new((n * cols) as u64);
        let (x0, bias) = (r.vec(n * cols, -1.0, 1.0), r.vec(cols, -1.0, 1.0));
        let x = on_all("bias_add", |s| {
            let mut x = x0.clone();
            let (xp, bp) = (x.as_mut_ptr(), bias.as_ptr());
            run(shape, s, move || unsafe {
                pass::bias_add(xp, bp, n as i32, cols as i32)
            });
            x
        });
        assert!(
            x == add_bias(&x0, &bias),
            "bias_add n={n} cols={cols} {shape:?}"
        );
    }
    for (n, v) in [(1000usize, 1.0f32), (77, -3.5)] {
        let x = on_all("fill_f32", |s| {
            let mut x = vec![f32::NAN; n];
            let xp = x.as_mut_ptr();
            run(launch::elementwise(n), s, move || unsafe {
                pass::fill_f32(xp, v, n)
            });
            x
        });
        assert!(x.iter().all(|&e| e == v), "fill_f32 n={n}");
    }
}

#[test]
fn dropout_masks_equal_the_host_prediction_and_repeat_per_key() {
    assert_eq!(DropSite::new(123, 0.0), DropSite::OFF);
    let d = DropSite::new(123, 0.1);
    assert_eq!(d.threshold, (0.1f64 * 4_294_967_296.0).round() as u32);
    assert_eq!(d.mult, (1.0f64 / 0.9) as f32);
    let (n, h) = (8usize, 250usize);
    let total = n * h;
    let z = Gen::new(77).vec(total, -1.0, 1.0);
    let bias = vec![0f32; h];
    let pool = |d: DropSite| {
        on_all("pool_fwd", |s| {
            let (mut pooled, mut head_in) = (vec![0f32; total], vec![0f32; total]);
            let (pp, hp) = (pooled.as_mut_ptr(), head_in.as_mut_ptr());
            let (zp, bp, de) = (z.as_ptr(), bias.as_ptr(), emu(d));
            run(launch::elementwise(total), s, move || unsafe {
                pass::pool_fwd(zp, bp, pp, hp, n as i32, h as i32, de)
            });
            (pooled, head_in)
        })
    };
    let p = 0.25;
    let (a, b) = (site(1, 3, p), site(2, 3, p));
    let (pooled, ha) = pool(a);
    // Value for value the host's prediction.
    for (i, (&v, &y)) in ha.iter().zip(&pooled).enumerate() {
        assert_eq!(
            v.to_bits(),
            (y * host_mult(a, i as u64)).to_bits(),
            "head_in[{i}]"
        );
    }
    // The same key, the same mask; another step's key, another mask; off: the identity.
    assert!(pool(a).1 == ha, "the same key gives the same mask");
    let (_, hb) = pool(b);
    let differ = ha
        .iter()
        .zip(&hb)
        .filter(|(x, y)| (**x == 0.0) != (**y == 0.0))
        .count();
    // Independent masks differ in 2p(1−p) = 37.5 % of places (±5σ = ±5.4 %).
    let frac = differ as f64 / total as f64;
    assert!(
        (frac - 0.375).abs() < 0.054,
        "masks of two keys differ in {frac}"
    );
    let kept = ha.iter().filter(|&&v| v != 0.0).count() as f64 / total as f64;
    assert!((kept - 0.75).abs() < 0.05, "kept fraction {kept}");
    assert!(
        pool(DropSite::OFF).1 == pooled,
        "no dropout: head_in = pooled"
    );

    // drop_count's four counts equal the host's.
    let count = 5000u64;
    let (sa, sb) = (site(42, 0, 0.1), site(42, 1, 0.1));
    let kept = on_all("drop_count", |s| {
        let mut kept = vec![0u64; 4];
        let kp = kept.as_mut_ptr();
        let (ea, eb) = (emu(sa), emu(sb));
        run(launch::elementwise(count as usize), s, move || unsafe {
            pass::drop_count(ea, eb, count, kp)
        });
        kept
    });
    let k = |d: DropSite, i: u64| host_mult(d, i) != 0.0;
    let mut want = [0u64; 4];
    for i in 0..count {
        want[0] += u64::from(k(sa, i));
        want[1] += u64::from(k(sb, i));
        want[2] += u64::from(k(sa, i) && k(sb, i));
        want[3] += u64::from(k(sa, i) && k(sa, i + 1));
    }
    assert_eq!(kept, want.to_vec(), "drop_count");
}

#[test]
fn sumsq_norm_clip_and_adamw_flat_match_the_cpu_clip_and_adamw() {
    let n = 3000usize;
    let mut r = Gen::new(2024);
    let w0 = r.vec(n, -1.0, 1.0);
    let cfg = AdamWConfig {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    };
    let var = Var::from_slice(&w0, n, &Device::Cpu).expect("var");
    let mut opt = AdamW::new(vec![var.clone()], cfg).expect("adamw");
    let (mut w, mut m, mut v) = (w0.clone(), vec![0f32; n], vec![0f32; n]);
    // Step 1 clips (‖g‖ ≈ 32 > 1), step 2 does not (100), on a grid smaller than elementwise's.
    for (step, max_norm, shape) in [
        (1i32, 1.0f64, launch::sumsq(n)),
        (2, 100.0, launch::grid(3, 0)),
    ] {
        let g = r.vec(n, -1.0, 1.0);
        let blocks = shape.grid as usize;
        let bc1 = 1.0 - cfg.beta1.powi(step);
        let bc2 = (1.0 - cfg.beta2.powi(step)).sqrt();
        let (w_new, m_new, v_new, norm) = on_all("sumsq/norm_clip/adamw_flat", |s| {
            let (mut w, mut m, mut v) = (w.clone(), m.clone(), v.clone());
            let (mut part, mut out) = (vec![0f64; blocks], vec![0f64; 2]);
            let (gp, pp, op) = (g.as_ptr(), part.as_mut_ptr(), out.as_mut_ptr());
            run(shape, s, move || unsafe { pass::sumsq_partial(gp, n, pp) });
            let pc = part.as_ptr();
            run(launch::norm_clip(), s, move || unsafe {
                pass::norm_clip(pc, blocks as i32, max_norm, op)
            });
            let (wp, mp, vp, oc) = (w.as_mut_ptr(), m.as_mut_ptr(), v.as_mut_ptr(), out.as_ptr());
            run(launch::adamw(n), s, move || unsafe {
                pass::adamw_flat(
                    wp,
                    gp,
                    mp,
                    vp,
                    n,
                    oc,
                    cfg.beta1 as f32,
                    cfg.beta2 as f32,
                    (1.0 - cfg.lr * cfg.weight_decay) as f32,
                    (cfg.lr / bc1) as f32,
                    bc2 as f32,
                    cfg.eps as f32,
                )
            });
            (w, m, v, out)
        });
        // The CPU: clip_grad_norm on the gradient store, then AdamW's step.
        let mut grads = GradStore::default();
        grads.insert(
            var.as_tensor(),
            Tensor::from_slice(&g, n, &Device::Cpu).expect("grad"),
        );
        let cpu_norm =
            clip_grad_norm(&mut grads, std::slice::from_ref(&var), max_norm).expect("clip");
        opt.step(&grads).expect("step");
        let w_cpu: Vec<f32> = var.as_tensor().to_vec1().expect("w");
        // ‖g‖ in f64 both ways (sums in another order).
        let tag = format!("adamw step {step}");
        assert!(
            (norm[0] - cpu_norm).abs() <= 1e-12 * cpu_norm,
            "{tag}: norm {} vs {cpu_norm}",
            norm[0]
        );
        let coef = (max_norm / (cpu_norm + 1e-6)).min(1.0);
        assert!(
            (norm[1] - coef).abs() <= 1e-12,
            "{tag}: clip {} vs {coef}",
            norm[1]
        );
        // The same f32 update formula; the clipped gradient is g·f32(coef) in f32 on the
        // device, f32(g·coef) from f64 on the host (1 ulp), which m/(√v/bc2 + eps) mostly
        // cancels: the updates agree to 1e-5.
        let du: Vec<f32> = w_new.iter().zip(&w).map(|(a, b)| a - b).collect();
        let du_cpu: Vec<f64> = w_cpu.iter().zip(&w).map(|(a, b)| (a - b) as f64).collect();
        close(&format!("{tag} update"), &du, &du_cpu, 1e-5);
        (w, m, v) = (w_new, m_new, v_new);
    }
    // max_norm ≤ 0: no clipping (clip factor 1).
    let out = on_all("norm_clip off", |s| {
        let (part, mut out) = (vec![4.0f64, 5.0], vec![0f64; 2]);
        let (pc, op) = (part.as_ptr(), out.as_mut_ptr());
        run(launch::grid(1, 0), s, move || unsafe {
            pass::norm_clip(pc, 2, 0.0, op)
        });
        out
    });
    assert_eq!(out, vec![3.0, 1.0]);
}
