//! mfac.cu's kernels on the CPU (crates/cuda-emu), launched as `launch.rs` launches them on the
//! GPU, against the host window's passes (`window.rs`) on the same inputs: the gather (with the
//! non-finite flag), pass 1 + the reduction (K's row), pass 2 (u, momentum, the update, the sums)
//! and the floor's read. Every case runs in the fixed order and under both adversarial schedules.
//!
//! Tolerances (relative L2 unless said): the emulation is not bitwise the GPU (nvcc contracts
//! a·b + c into fma where the source does not, sums run in another order than the host's), so
//! - f32/f64 windows, f64 sums of products (exact for f32, one rounding each for f64):
//!   ≤ 1e-12, far above the ~1e-16·√(terms) reordering error and far below any indexing error
//!   (which moves a result by O(1));
//! - bf16 windows: each lane sums 16 products in f32 (pass 1) and pass 2 sums 4 rows with c
//!   rounded to f32: ≤ 1e-5 (16 · 2⁻²⁴ ≈ 1e-6 relative per partial, with margin);
//! - the gather and the row write are copies and one rounding each: bit for bit.

use candle_core::DType;
use cuda_emu::{mfac as k, Schedule};
use half::bf16;

use super::launch::{self, Launch};
use super::DevicePlan;
use crate::optim::mfac::window::HostWindow;
use crate::optim::util::bf16_from_f64;

/// The element types as the kernels see them: bf16 travels as its bits (u16).
trait Raw: Copy + PartialEq + std::fmt::Debug + 'static {
    const DT: DType;
    fn of(x: f64) -> Self;
    fn f(self) -> f64;
    /// Relative precision of one rounding.
    const EPS: f64;
}
impl Raw for f32 {
    const DT: DType = DType::F32;
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f(self) -> f64 {
        self as f64
    }
    const EPS: f64 = f32::EPSILON as f64;
}
impl Raw for f64 {
    const DT: DType = DType::F64;
    fn of(x: f64) -> Self {
        x
    }
    fn f(self) -> f64 {
        self
    }
    const EPS: f64 = f64::EPSILON;
}
impl Raw for u16 {
    const DT: DType = DType::BF16;
    fn of(x: f64) -> Self {
        bf16_from_f64(x).to_bits()
    }
    fn f(self) -> f64 {
        bf16::from_bits(self).to_f64()
    }
    const EPS: f64 = 1.0 / 128.0;
}

type Gather<T> = unsafe extern "C" fn(*const u64, i32, i64, i64, f64, *mut T, *mut i32);
type Pass1<T> = unsafe extern "C" fn(*const T, *mut T, i64, i32, i32, *mut f64);
type Pass2<T> = unsafe extern "C" fn(
    *const T,
    i64,
    i32,
    *const f64,
    f64,
    *const T,
    i64,
    *const u64,
    i32,
    *mut f64,
    f64,
    f64,
    *mut f64,
    *mut f64,
);

/// The kernels of one (parameter P, window T) pair, as cuda.rs loads them by name.
struct Kernels<T> {
    gather: Gather<T>,
    pass1: Pass1<T>,
    pass2: Pass2<T>,
}

fn run(l: Launch, s: Schedule, body: impl Fn()) {
    l.emulate(s, body)
}

/// A seeded stream of uniforms in [-1, 1) (shared with sparse_emu_tests.rs).
pub(super) struct Rng(pub(super) u64);
impl Rng {
    pub(super) fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let z = mix(self.0);
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// ‖a − b‖ / ‖b‖ (‖a − b‖ when b is zero).
pub(super) fn rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

fn host_window<T: Raw>(rows: &[Vec<T>], d: usize) -> HostWindow {
    let flat = |f: &dyn Fn(&T) -> f64| -> Vec<f64> {
        rows.iter().flat_map(|r| r[..d].iter().map(f)).collect()
    };
    let v = flat(&|x: &T| x.f());
    match T::DT {
        DType::F32 => HostWindow::F32(v.iter().map(|&x| x as f32).collect()),
        DType::F64 => HostWindow::F64(v),
        _ => HostWindow::BF16(v.iter().map(|&x| bf16::from_f64(x)).collect()),
    }
}

/// One case: parameters of `sizes` (gradient `None` where `no_grad`), a window of `m` rows of
/// which `rows` are filled, the new gradient going to row `j`; `blocks` blocks in the passes.
#[derive(Clone, Copy, Debug)]
struct Case<'a> {
    sizes: &'a [usize],
    no_grad: Option<usize>,
    m: usize,
    rows: usize,
    j: usize,
    wd: f64,
    momentum: bool,
    blocks: usize,
}

/// Runs one M-FAC step's kernels on the emulator under `s` and checks each against the host.
fn step<P: Raw, T: Raw>(kern: &Kernels<T>, c: Case, s: Schedule, seed: u64) {
    let tag = format!("P {:?} T {:?} {c:?} {s:?}", P::DT, T::DT);
    let mut rng = Rng(seed);
    let n = c.sizes.len();
    let d: usize = c.sizes.iter().sum();
    let plan = DevicePlan::new(c.m, d, T::DT, c.momentum, c.blocks);
    let ld = plan.ld;
    // Parameters and gradients.
    let mut params: Vec<Vec<P>> = c
        .sizes
        .iter()
        .map(|&z| (0..z).map(|_| P::of(rng.next())).collect())
        .collect();
    let grads: Vec<Option<Vec<P>>> = c
        .sizes
        .iter()
        .enumerate()
        .map(|(i, &z)| (c.no_grad != Some(i)).then(|| (0..z).map(|_| P::of(rng.next())).collect()))
        .collect();
    let w0: Vec<f64> = params.iter().flatten().map(|x| x.f()).collect();
    let g0: Vec<f64> = grads
        .iter()
        .zip(c.sizes)
        .flat_map(|(g, &z)| match g {
            Some(g) => g.iter().map(|x| x.f()).collect::<Vec<_>>(),
            None => vec![0.0; z],
        })
        .collect();
    let gptr: Vec<u64> = grads
        .iter()
        .map(|g| g.as_ref().map_or(0, |g| g.as_ptr() as u64))
        .collect();
    let pptr: Vec<u64> = params.iter_mut().map(|p| p.as_mut_ptr() as u64).collect();
    let mut table = Vec::new();
    launch::param_table(c.sizes.iter().copied(), &gptr, &pptr, &mut table);

    // Gather: scratch starts as garbage (the padding must come out zero).
    let mut scratch: Vec<T> = vec![T::of(f64::NAN); ld];
    let mut flag = i32::MAX;
    let (tp, sp, fp) = (table.as_ptr(), scratch.as_mut_ptr(), &mut flag as *mut i32);
    let (gather, wd) = (kern.gather, c.wd);
    run(launch::gather(&plan, 2), s, || unsafe {
        gather(tp, n as i32, d as i64, ld as i64, wd, sp, fp)
    });
    assert_eq!(flag, i32::MAX, "{tag}: flag set on finite gradients");
    for k in 0..ld {
        // The host's gather: T(g + wd·w) in f64, one rounding (mfac.rs's step, window.rs).
        let want = if k < d {
            T::of(if wd > 0.0 { g0[k] + wd * w0[k] } else { g0[k] })
        } else {
            T::of(0.0)
        };
        assert_eq!(scratch[k], want, "{tag}: gathered column {k}");
    }

    // Pass 1 + reduce. Window rows: random where filled (row j: garbage, overwritten), zero
    // padding, as the device keeps it.
    let mut win: Vec<Vec<T>> = (0..c.m)
        .map(|i| {
            (0..ld)
                .map(|k| {
                    if k < d && i < c.rows {
                        T::of(if i == c.j { 7.0 } else { rng.next() })
                    } else {
                        T::of(0.0)
                    }
                })
                .collect()
        })
        .collect();
    let mut flat: Vec<T> = win.iter().flatten().copied().collect();
    let l1 = launch::pass1(&plan, c.rows);
    let mut partial = vec![f64::NAN; plan.blocks * c.m];
    let mut krow = vec![f64::NAN; c.m];
    let (gp, wp, pp, kp) = (
        scratch.as_ptr(),
        flat.as_mut_ptr(),
        partial.as_mut_ptr(),
        krow.as_mut_ptr(),
    );
    let (pass1, rows, j) = (kern.pass1, c.rows as i32, c.j as i32);
    run(l1, s, || unsafe { pass1(gp, wp, ld as i64, rows, j, pp) });
    let blocks = l1.grid as i32;
    run(launch::reduce(c.rows), s, || unsafe {
        k::mfac_reduce_rows(pp, blocks, rows, kp)
    });
    win[c.j] = scratch.clone();
    for (i, row) in win.iter().enumerate() {
        assert!(
            flat[i * ld..(i + 1) * ld] == row[..],
            "{tag}: window row {i} after pass 1"
        );
    }
    let host = host_window(&win, d);
    let want = host.gram_row(c.j, c.rows, d);
    let tol = if T::DT == DType::BF16 { 1e-5 } else { 1e-12 };
    let e = rel(&krow[..c.rows], &want);
    assert!(e <= tol, "{tag}: K's row, rel L2 {e:e}");

    // Pass 2.
    let cvec: Vec<f64> = (0..c.rows).map(|_| rng.next()).collect();
    let (scale, beta, lr) = (c.m as f64, 0.9, 0.05);
    let mut v: Vec<f64> = (0..d).map(|_| rng.next()).collect();
    let v0 = v.clone();
    let mut u = vec![f64::NAN; d];
    let l2 = launch::pass2(&plan, c.rows);
    let mut sums = vec![f64::NAN; 2 * l2.grid as usize];
    let vp = if c.momentum {
        v.as_mut_ptr()
    } else {
        std::ptr::null_mut()
    };
    let (cp, up, smp) = (cvec.as_ptr(), u.as_mut_ptr(), sums.as_mut_ptr());
    let pass2 = kern.pass2;
    run(l2, s, || unsafe {
        pass2(
            wp, ld as i64, rows, cp, scale, gp, d as i64, tp, n as i32, vp, beta, lr, up, smp,
        )
    });
    let mut want_u = vec![0.0; d];
    host.combine(&cvec, c.rows, d, scale, c.j, &mut want_u);
    let e = rel(&u, &want_u);
    assert!(e <= tol, "{tag}: u, rel L2 {e:e}");
    let dir: Vec<f64> = if c.momentum {
        let want_v: Vec<f64> = v0
            .iter()
            .zip(&want_u)
            .map(|(a, b)| beta * a + (1.0 - beta) * b)
            .collect();
        let e = rel(&v, &want_v);
        assert!(e <= tol, "{tag}: momentum, rel L2 {e:e}");
        want_v
    } else {
        assert_eq!(v, v0, "{tag}: momentum touched without momentum");
        want_u
    };
    let gj: Vec<f64> = scratch[..d].iter().map(|x| x.f()).collect();
    let dd: f64 = dir.iter().map(|x| x * x).sum();
    let dg: f64 = dir.iter().zip(&gj).map(|(a, b)| a * b).sum();
    let (got_dd, got_dg) = sums
        .chunks_exact(2)
        .fold((0.0, 0.0), |(a, b), p| (a + p[0], b + p[1]));
    assert!(
        rel(&[got_dd], &[dd]) <= tol,
        "{tag}: ‖dir‖² {got_dd} vs {dd}"
    );
    // ⟨dir, g⟩ may cancel: relative to ‖dir‖·‖g‖.
    let gn = gj.iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(
        (got_dg - dg).abs() <= tol * dd.sqrt() * gn + 1e-300,
        "{tag}: ⟨dir, g⟩ {got_dg} vs {dg}"
    );
    // The update w − lr·dir, rounded once to P: one rounding of slack, plus dir's error
    // (within tol of ‖dir‖, so at most tol·max|dir| in any one element).
    let w1: Vec<f64> = params.iter().flatten().map(|x| x.f()).collect();
    let dmax = dir.iter().fold(0.0f64, |a, b| a.max(b.abs()));
    for (k, ((a, w), dk)) in w1.iter().zip(&w0).zip(&dir).enumerate() {
        let want = w - lr * dk;
        let slack = 2.0 * P::EPS * want.abs().max(1e-30) + tol * lr * dmax;
        assert!(
            (a - want).abs() <= slack,
            "{tag}: parameter {k}: {a} vs {want}"
        );
    }
}

macro_rules! kernels {
    ($g:ident, $p1:ident, $p2:ident) => {
        Kernels {
            gather: k::$g,
            pass1: k::$p1,
            pass2: k::$p2,
        }
    };
}

/// Several tensors (one empty, one without a gradient), d = 3,071: not a multiple of a unit.
const SIZES: [usize; 5] = [1200, 0, 700, 1, 1170];

fn cases() -> Vec<Case<'static>> {
    vec![
        // m = 1: the only row is the new one.
        Case {
            sizes: &SIZES,
            no_grad: Some(3),
            m: 1,
            rows: 1,
            j: 0,
            wd: 0.0,
            momentum: false,
            blocks: 3,
        },
        // A partly filled window, weight decay, momentum, more blocks than units of columns.
        Case {
            sizes: &SIZES,
            no_grad: Some(3),
            m: 13,
            rows: 9,
            j: 4,
            wd: 0.01,
            momentum: true,
            blocks: 7,
        },
    ]
}

fn dtype_pairs(s: Schedule) {
    // (P, T) → gather_P_T, pass1_T, pass2_T_P: the names cuda.rs loads.
    macro_rules! pairs {
        ($c:expr, $seed:expr; $($p:ty, $t:ty: $g:ident, $p1:ident, $p2:ident;)*) => {$(
            step::<$p, $t>(&kernels!($g, $p1, $p2), $c, s, $seed);
        )*};
    }
    for (i, c) in cases().into_iter().enumerate() {
        pairs! { c, 17 + i as u64;
            f32, f32: mfac_gather_f32_f32, mfac_pass1_f32, mfac_pass2_f32_f32;
            f32, u16: mfac_gather_f32_bf16, mfac_pass1_bf16, mfac_pass2_bf16_f32;
            f32, f64: mfac_gather_f32_f64, mfac_pass1_f64, mfac_pass2_f64_f32;
            f64, f32: mfac_gather_f64_f32, mfac_pass1_f32, mfac_pass2_f32_f64;
            f64, u16: mfac_gather_f64_bf16, mfac_pass1_bf16, mfac_pass2_bf16_f64;
            f64, f64: mfac_gather_f64_f64, mfac_pass1_f64, mfac_pass2_f64_f64;
            u16, f32: mfac_gather_bf16_f32, mfac_pass1_f32, mfac_pass2_f32_bf16;
            u16, u16: mfac_gather_bf16_bf16, mfac_pass1_bf16, mfac_pass2_bf16_bf16;
            u16, f64: mfac_gather_bf16_f64, mfac_pass1_f64, mfac_pass2_f64_bf16;
        }
    }
}

#[test]
fn every_dtype_pair_matches_the_host_passes_in_the_fixed_order() {
    dtype_pairs(Schedule::Fixed);
}

#[test]
fn every_dtype_pair_matches_the_host_passes_under_a_shuffled_schedule() {
    dtype_pairs(Schedule::Shuffled(0x51));
}

#[test]
fn every_dtype_pair_matches_the_host_passes_with_warps_run_one_by_one() {
    dtype_pairs(Schedule::WarpSerial(0x52));
}

#[test]
fn edge_sizes_and_the_largest_test_window_match_the_host() {
    let f32k = kernels!(mfac_gather_f32_f32, mfac_pass1_f32, mfac_pass2_f32_f32);
    let bfk = kernels!(mfac_gather_bf16_bf16, mfac_pass1_bf16, mfac_pass2_bf16_bf16);
    // d = 1, exactly one LD_ALIGN (512), 1000; m = 64 over ~50k parameters.
    let one: &[usize] = &[1];
    let five12: &[usize] = &[500, 12];
    let thousand: &[usize] = &[1000];
    let big: &[usize] = &[20_000, 0, 17_000, 12_003];
    for (i, (sizes, m, rows, j, blocks)) in [
        (one, 2, 2, 1, 5),
        (five12, 3, 3, 2, 2),
        (thousand, 5, 4, 0, 4),
        (big, 64, 64, 63, 6),
    ]
    .into_iter()
    .enumerate()
    {
        let c = Case {
            sizes,
            no_grad: None,
            m,
            rows,
            j,
            wd: 0.0,
            momentum: i % 2 == 0,
            blocks,
        };
        for s in Schedule::all(90 + i as u64) {
            step::<f32, f32>(&f32k, c, s, 5 + i as u64);
            step::<u16, u16>(&bfk, c, s, 5 + i as u64);
        }
    }
}

/// The f32 gather's flag over `params` and `grads` (all 0.5 and 0.25 unless `spoil` changes
/// them) with weight decay `wd`; the parameters must come out untouched.
fn gather_flag(
    sizes: &[usize],
    wd: f64,
    s: Schedule,
    spoil: impl Fn(&mut [Vec<f32>], &mut [Vec<f32>]),
) -> i32 {
    let d: usize = sizes.iter().sum();
    let plan = DevicePlan::new(2, d, DType::F32, false, 3);
    let mut params: Vec<Vec<f32>> = sizes.iter().map(|&z| vec![0.5; z]).collect();
    let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&z| vec![0.25; z]).collect();
    spoil(&mut params, &mut grads);
    let before = params.clone();
    let gptr: Vec<u64> = grads.iter().map(|g| g.as_ptr() as u64).collect();
    let pptr: Vec<u64> = params.iter_mut().map(|p| p.as_mut_ptr() as u64).collect();
    let mut table = Vec::new();
    launch::param_table(sizes.iter().copied(), &gptr, &pptr, &mut table);
    let mut out = vec![0f32; plan.ld];
    let mut flag = i32::MAX;
    let (tp, op, fp, n) = (
        table.as_ptr(),
        out.as_mut_ptr(),
        &mut flag as *mut i32,
        sizes.len() as i32,
    );
    run(launch::gather(&plan, 1), s, || unsafe {
        k::mfac_gather_f32_f32(tp, n, d as i64, plan.ld as i64, wd, op, fp)
    });
    let same = params
        .iter()
        .flatten()
        .zip(before.iter().flatten())
        .all(|(a, b)| a.to_bits() == b.to_bits());
    assert!(same, "{s:?}: the gather wrote a parameter");
    flag
}

#[test]
fn a_non_finite_gradient_sets_the_flag_to_the_first_such_parameter() {
    for s in Schedule::all(3) {
        let flag = gather_flag(&[300, 400, 500], 0.0, s, |_, g| {
            g[2][499] = f32::NAN;
            g[1][7] = f32::INFINITY;
        });
        assert_eq!(flag, 1, "{s:?}");
    }
}

#[test]
fn a_non_finite_weight_is_flagged_only_with_weight_decay() {
    // With wd > 0 the gather adds wd·w: a NaN weight would enter the window (as on the host,
    // tests/mfac_props.rs). Without weight decay the weight is not read.
    for (wd, want) in [(0.0, i32::MAX), (0.01, 1)] {
        for s in Schedule::all(8) {
            let flag = gather_flag(&[300, 400], wd, s, |w, _| w[1][123] = f32::NAN);
            assert_eq!(flag, want, "wd {wd} {s:?}");
        }
    }
}

#[test]
fn the_floor_reads_every_vector_once() {
    // XOR of the blocks' words = XOR of every 32-bit word of the buffer.
    let words: Vec<[u32; 4]> = (0..3001u64)
        .map(|i| {
            [
                mix(i) as u32,
                mix(i + 9) as u32,
                (i * 7) as u32,
                !(i as u32),
            ]
        })
        .collect();
    let want = words.iter().flatten().fold(0u32, |a, b| a ^ b);
    let plan = DevicePlan::new(1, 512, DType::F32, false, 5);
    let l = launch::floor(&plan);
    for s in Schedule::all(4) {
        let mut sink = vec![0u32; l.grid as usize];
        let (p, o) = (words.as_ptr(), sink.as_mut_ptr());
        run(l, s, || unsafe {
            k::mfac_read_floor(p, words.len() as i64, o)
        });
        assert_eq!(sink.iter().fold(0, |a, b| a ^ b), want, "{s:?}");
    }
}

#[test]
fn the_harness_rounds_f64_to_bf16_as_the_host_window_does() {
    // The device gather's __double2bfloat16 (one rounding) against util.rs's bf16_from_f64,
    // on random values over the whole range (subnormals, overflow) and on exact ties ± 1 ulp.
    let mut r = 0x1234u64;
    for i in 0..200_000u64 {
        r = mix(r.wrapping_add(i));
        let x = match i % 4 {
            0 => f64::from_bits(r),
            1 => {
                f64::from_bits((r & 0x800F_FFFF_FFFF_FFFF) | ((1023 + (r >> 52) % 280 - 140) << 52))
            }
            _ => {
                // A tie between two bf16 neighbours, nudged by −1, 0 or +1 ulp of f64.
                let b = bf16::from_bits((r as u16) & 0x7e7f | ((r >> 20) as u16 & 0x8000));
                let mid =
                    b.to_f64() + (f64::from(bf16::from_bits(b.to_bits() + 1)) - b.to_f64()) / 2.0;
                let k = (r >> 40) % 3;
                f64::from_bits((mid.to_bits() as i64 + k as i64 - 1) as u64)
            }
        };
        let got = cuda_emu::double_to_bf16_bits(x);
        let want = bf16_from_f64(x).to_bits();
        if x.is_nan() {
            assert!(bf16::from_bits(got).is_nan() && bf16::from_bits(want).is_nan());
        } else {
            assert_eq!(got, want, "{x:e} ({:#018x})", x.to_bits());
        }
    }
}

#[test]
fn bf16_from_f64_is_the_nearest_bf16_ties_to_even() {
    // An independent truth: the two bf16 neighbours L ≤ |x| < U (from f32 truncation toward
    // zero, bf16 ⊂ f32), compared exactly in f64 (their distances to x are exact: Sterbenz).
    fn truth(x: f64) -> u16 {
        let (a, sign) = (x.abs(), if x.is_sign_negative() { 0x8000u16 } else { 0 });
        let mut f = a as f32;
        if f as f64 > a {
            f = f32::from_bits(f.to_bits() - 1);
        }
        let lo = (f.to_bits() >> 16) as u16;
        let l = bf16::from_bits(lo).to_f64();
        // Above the largest finite bf16, U is 2^128 (where ∞ starts once rounded).
        let u = if lo == 0x7f7f {
            2f64.powi(128)
        } else {
            bf16::from_bits(lo + 1).to_f64()
        };
        let pick = match (a - l).partial_cmp(&(u - a)).unwrap() {
            std::cmp::Ordering::Less => lo,
            std::cmp::Ordering::Greater => lo + 1,
            std::cmp::Ordering::Equal => lo + (lo & 1),
        };
        sign | pick.min(0x7f80)
    }
    let mut r = 99u64;
    let mut tested = 0;
    for i in 0..300_000u64 {
        r = mix(r.wrapping_add(i));
        // Exponents from bf16's subnormals (2^-133) to past its overflow (2^128).
        let e = 1023 + (r >> 52) % 270;
        let mut x = f64::from_bits((r & 0x800F_FFFF_FFFF_FFFF) | ((e - 135) << 52));
        if i % 3 == 0 {
            // Exactly a tie in bf16's last place, or one f64 ulp off it.
            let keep = x.to_bits() & !((1u64 << 45) - 1);
            x = f64::from_bits((keep | (1u64 << 44)) + (r >> 7) % 3 - 1);
        }
        assert_eq!(
            bf16_from_f64(x).to_bits(),
            truth(x),
            "{x:e} ({:#018x})",
            x.to_bits()
        );
        tested += 1;
    }
    assert_eq!(tested, 300_000);
    for (x, bits) in [
        (0.0, 0u16),
        (-0.0, 0x8000),
        (f64::INFINITY, 0x7f80),
        (f64::MAX, 0x7f80),
        (1e-300, 0),
    ] {
        assert_eq!(bf16_from_f64(x).to_bits(), bits, "{x:e}");
    }
    assert!(bf16_from_f64(f64::NAN).is_nan());
}
