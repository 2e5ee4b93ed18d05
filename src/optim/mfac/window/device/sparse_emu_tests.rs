//! sparse.cu's kernels on the CPU (crates/cuda-emu), launched as `sparse.rs` launches them on the
//! GPU, against the host's sparse window (`window/sparse/`) on the same inputs: the accumulator
//! (and its non-finite flag), the whole selection (histogram passes driven by the same loop as
//! on the GPU, count, scan, compaction: the kept set must be the host's exactly), pass 1 (K's
//! row) and pass 2 (u, the update, the sums). Every case runs in the fixed order and under both
//! adversarial schedules.
//!
//! Tolerances: the accumulator, the kept set, the stored values and what is fed back are one
//! rounding each on both sides: bit for bit. K's row and u are f64 sums of exact products (f32
//! and bf16 values) or of one-rounding products (f64) in another order than the host's (u's
//! additions are atomics in the schedule's order): ≤ 1e-12 relative, far above ~1e-16·√terms and
//! far below any indexing error, which moves a result by O(1). The parameters: one rounding of
//! keep·w − lr·u from the same u up to that 1e-12: ≤ 1 ulp of f32 each (checked as a relative
//! L2 bound of 1e-6 on the moves, exactly where the inputs are f64).

use candle_core::DType;
use cuda_emu::{sparse as k, Schedule};
use half::bf16;

use super::emu_tests::{rel, Rng};
use super::launch as dense_launch;
use super::sparse::{self as sl, Launch, Selector, SparsePlan};
use crate::error::Result;
use crate::optim::mfac::window::sparse::rows::SparseRows;
use crate::optim::mfac::window::sparse::select::{top_k, Magnitude};
use crate::optim::mfac::window::HostWindow;
use crate::optim::util::{bf16_from_f64, Elem};

/// Element types as the kernels see them (bf16 as its bits).
trait Raw: Copy + PartialEq + std::fmt::Debug + 'static {
    const DT: DType;
    fn of(x: f64) -> Self;
    fn f(self) -> f64;
}
impl Raw for f32 {
    const DT: DType = DType::F32;
    fn of(x: f64) -> Self {
        x as f32
    }
    fn f(self) -> f64 {
        self as f64
    }
}
impl Raw for f64 {
    const DT: DType = DType::F64;
    fn of(x: f64) -> Self {
        x
    }
    fn f(self) -> f64 {
        self
    }
}
impl Raw for u16 {
    const DT: DType = DType::BF16;
    fn of(x: f64) -> Self {
        bf16_from_f64(x).to_bits()
    }
    fn f(self) -> f64 {
        bf16::from_bits(self).to_f64()
    }
}

/// Magnitudes over many binades (a gradient's), with a sign.
fn spread(r: &mut Rng) -> f64 {
    let a = r.next();
    a * a * a * 1e-2
}

fn run(l: Launch, s: Schedule, body: impl Fn()) {
    l.emulate(s, body)
}

// ---- the accumulator ---------------------------------------------------------------------------

type Accumulate<A> = unsafe extern "C" fn(*const u64, i32, i64, *const A, *mut A, *mut i32);

fn accumulate_case<P: Raw, A: Raw>(kern: Accumulate<A>, s: Schedule, seed: u64) {
    let sizes = [700usize, 0, 1300, 257];
    let d: usize = sizes.iter().sum();
    let mut rng = Rng(seed);
    let mut params: Vec<Vec<P>> = sizes
        .iter()
        .map(|&z| (0..z).map(|_| P::of(rng.next())).collect())
        .collect();
    let mut grads: Vec<Option<Vec<P>>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &z)| (i != 2).then(|| (0..z).map(|_| P::of(spread(&mut rng))).collect()))
        .collect();
    let e: Vec<A> = (0..d).map(|_| A::of(spread(&mut rng))).collect();
    let plan = SparsePlan::new(4, d, 10, A::DT, 2);
    let table = |grads: &[Option<Vec<P>>], params: &mut [Vec<P>]| {
        let gp: Vec<u64> = grads
            .iter()
            .map(|g| g.as_ref().map_or(0, |g| g.as_ptr() as u64))
            .collect();
        let pp: Vec<u64> = params.iter_mut().map(|p| p.as_mut_ptr() as u64).collect();
        let mut t = Vec::new();
        dense_launch::param_table(sizes.iter().copied(), &gp, &pp, &mut t);
        t
    };
    let t = table(&grads, &mut params);
    let mut acc = vec![A::of(f64::NAN); d];
    let mut flag = i32::MAX;
    let (tp, ep, ap, fp) = (
        t.as_ptr(),
        e.as_ptr(),
        acc.as_mut_ptr(),
        &mut flag as *mut i32,
    );
    run(sl::accumulate(&plan), s, || unsafe {
        kern(tp, sizes.len() as i32, d as i64, ep, ap, fp)
    });
    assert_eq!(flag, i32::MAX, "{s:?}: flag on finite gradients");
    let g: Vec<f64> = grads
        .iter()
        .zip(sizes)
        .flat_map(|(g, z)| match g {
            Some(g) => g.iter().map(|x| x.f()).collect(),
            None => vec![0.0; z],
        })
        .collect();
    for i in 0..d {
        // The host's accumulate: one rounding of the f64 sum (window/sparse/mod.rs).
        assert_eq!(acc[i], A::of(e[i].f() + g[i]), "{s:?}: acc[{i}]");
    }
    // A NaN in parameter 3's gradient: flagged with its index; e is never written.
    grads[3].as_mut().unwrap()[5] = P::of(f64::NAN);
    let t = table(&grads, &mut params);
    let tp = t.as_ptr();
    run(sl::accumulate(&plan), s, || unsafe {
        kern(tp, sizes.len() as i32, d as i64, ep, ap, fp)
    });
    assert_eq!(flag, 3, "{s:?}: the non-finite gradient's parameter");
}

#[test]
fn the_accumulator_is_the_hosts_bit_for_bit_and_flags_non_finite_gradients() {
    for (i, s) in Schedule::all(11).into_iter().enumerate() {
        let seed = 100 + i as u64;
        accumulate_case::<f32, f32>(k::spm_accumulate_f32_f32, s, seed);
        accumulate_case::<f64, f32>(k::spm_accumulate_f64_f32, s, seed);
        accumulate_case::<u16, f32>(k::spm_accumulate_bf16_f32, s, seed);
        accumulate_case::<f32, f64>(k::spm_accumulate_f32_f64, s, seed);
        accumulate_case::<f64, f64>(k::spm_accumulate_f64_f64, s, seed);
        accumulate_case::<u16, f64>(k::spm_accumulate_bf16_f64, s, seed);
    }
}

// ---- the selection ---------------------------------------------------------------------------

type Hist<A> = unsafe extern "C" fn(*const A, i64, i32, u64, i32, i32, *mut u32);
type Count<A> = unsafe extern "C" fn(*const A, i64, u64, u64, *mut u32);
type Compact<A, T> = unsafe extern "C" fn(*mut A, i64, u64, u64, *const u32, *mut u32, *mut T);

/// The selection's kernels for one (accumulator, values) pair.
struct SelectKernels<A, T> {
    hist: Hist<A>,
    count: Count<A>,
    compact: Compact<A, T>,
}

/// The device side of the selection, emulated: the same loop (`select_top_k`) drives it.
struct Emu<'a, A, T> {
    kern: &'a SelectKernels<A, T>,
    plan: SparsePlan,
    s: Schedule,
    acc: &'a mut [A],
    idx: &'a mut [u32],
    val: &'a mut [T],
    passes: usize,
}

impl<A: Raw, T: Raw> Selector for Emu<'_, A, T> {
    fn hist(&mut self, shift: u32, prefix: u64, below: u32, bits: u32) -> Result<Vec<u32>> {
        let mut h = vec![0u32; 1 << bits];
        let (ap, hp, n, f) = (
            self.acc.as_ptr(),
            h.as_mut_ptr(),
            self.acc.len() as i64,
            self.kern.hist,
        );
        run(sl::hist(&self.plan), self.s, || unsafe {
            f(ap, n, shift as i32, prefix, below as i32, bits as i32, hp)
        });
        self.passes += 1;
        Ok(h)
    }

    fn finish(&mut self, lo: u64, hi: u64, need: u32) -> Result<()> {
        let blocks = sl::select(&self.plan).grid as usize;
        let mut counts = vec![u32::MAX; 2 * blocks];
        let mut offsets = vec![u32::MAX; 2 * blocks];
        let n = self.acc.len() as i64;
        let (ap, cp) = (self.acc.as_mut_ptr(), counts.as_mut_ptr());
        let count = self.kern.count;
        run(sl::select(&self.plan), self.s, || unsafe {
            count(ap, n, lo, hi, cp)
        });
        let (cp, op) = (counts.as_ptr(), offsets.as_mut_ptr());
        run(sl::scan(), self.s, || unsafe {
            k::spm_scan(cp, blocks as i32, need, op)
        });
        let (op, ip, vp) = (
            offsets.as_ptr(),
            self.idx.as_mut_ptr(),
            self.val.as_mut_ptr(),
        );
        let compact = self.kern.compact;
        run(sl::select(&self.plan), self.s, || unsafe {
            compact(ap, n, lo, hi, op, ip, vp)
        });
        Ok(())
    }
}

/// Runs the device selection on `x` (as the accumulator) keeping `kk`, and checks it against the
/// host: the kept set (ascending), the stored values, and what is left in the accumulator.
fn select_case<A: Raw + Magnitude + Elem, T: Raw>(
    kern: &SelectKernels<A, T>,
    x: &[A],
    kk: usize,
    s: Schedule,
    tag: &str,
) -> usize {
    let n = x.len();
    let plan = SparsePlan::new(1, n, kk, T::DT, 2);
    let mut acc = x.to_vec();
    let (mut idx, mut val) = (vec![u32::MAX; kk], vec![T::of(f64::NAN); kk]);
    let mut emu = Emu {
        kern,
        plan,
        s,
        acc: &mut acc,
        idx: &mut idx,
        val: &mut val,
        passes: 0,
    };
    let bits = if A::DT == DType::F64 { 63 } else { 31 };
    sl::select_top_k(&mut emu, bits, kk).unwrap();
    let passes = emu.passes;
    // The host: the same top-k, row written through SparseRows::set_row.
    let want = top_k(x, kk);
    assert!(
        idx == want,
        "{tag} {s:?}: the kept set differs from the host's"
    );
    let mut rows = SparseRows::try_new(T::DT, 1, n, kk).unwrap();
    let mut host_acc = x.to_vec();
    rows.set_row(0, &want, &mut host_acc);
    let stored: Vec<f64> = val.iter().map(|v| v.f()).collect();
    assert_eq!(stored, rows.values(0), "{tag} {s:?}: stored values");
    assert!(
        acc.iter()
            .zip(&host_acc)
            .all(|(a, b)| a.f().to_bits() == b.f().to_bits()),
        "{tag} {s:?}: the accumulator after the row"
    );
    passes
}

#[test]
fn the_device_keeps_exactly_the_hosts_set_ties_to_the_lower_index() {
    let f32_f32 = SelectKernels::<f32, f32> {
        hist: k::spm_hist_f32,
        count: k::spm_count_f32,
        compact: k::spm_compact_f32_f32,
    };
    let f32_bf16 = SelectKernels::<f32, u16> {
        hist: k::spm_hist_f32,
        count: k::spm_count_f32,
        compact: k::spm_compact_f32_bf16,
    };
    let f64_f64 = SelectKernels::<f64, f64> {
        hist: k::spm_hist_f64,
        count: k::spm_count_f64,
        compact: k::spm_compact_f64_f64,
    };
    for (i, s) in Schedule::all(23).into_iter().enumerate() {
        let mut rng = Rng(7 + i as u64);
        // 40,000 entries: three selection blocks; magnitudes over many binades, exact zeros.
        let x: Vec<f32> = (0..40_000)
            .map(|j| {
                if j % 9 == 0 {
                    0.0
                } else {
                    spread(&mut rng) as f32
                }
            })
            .collect();
        select_case(&f32_f32, &x, 400, s, "f32 1 %");
        select_case(&f32_bf16, &x, 4000, s, "bf16 values 10 %");
        select_case(&f32_f32, &x, 1, s, "k = 1");
        select_case(&f32_f32, &x, x.len(), s, "k = d (density 1)");
        // Ties across the blocks: 30,000 entries of one magnitude (signs alternating) and a few
        // larger; k cuts through the ties, which must go to the lowest indices.
        let mut t: Vec<f32> = (0..30_000)
            .map(|j| if j % 2 == 0 { 0.5 } else { -0.5 })
            .collect();
        for j in [3, 17_000, 29_999] {
            t[j] = 2.0;
        }
        let passes = select_case(&f32_f32, &t, 20_000, s, "ties");
        assert_eq!(passes, 3, "f32 keys take three digits to an exact key");
        let x64: Vec<f64> = (0..20_000).map(|_| spread(&mut rng)).collect();
        select_case(&f64_f64, &x64, 200, s, "f64");
        let t64: Vec<f64> = (0..20_000)
            .map(|j| if j % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        select_case(&f64_f64, &t64, 7_001, s, "f64 ties");
    }
}

// ---- the passes --------------------------------------------------------------------------------

type Scatter<T> = unsafe extern "C" fn(*const u32, *const T, i64, *mut T, i32);
type Gram<T> = unsafe extern "C" fn(*const u32, *const T, i64, *const T, *mut f64);
type Combine<T> = unsafe extern "C" fn(*const u32, *const T, i64, *const f64, i32, *mut f64);
type RowDot<T> = unsafe extern "C" fn(*const u32, *const T, i64, *const f64, *mut f64);
type Update = unsafe extern "C" fn(*mut f64, f64, i64, *const u64, i32, f64, f64, *mut f64);

struct PassKernels<T> {
    scatter: Scatter<T>,
    gram: Gram<T>,
    combine: Combine<T>,
    row_dot: RowDot<T>,
}

/// A host window of `m` rows over d (rows filled with the top-k of random accumulators) and its
/// device arrays.
fn window<T: Raw>(m: usize, d: usize, kk: usize, seed: u64) -> (SparseRows, Vec<u32>, Vec<T>) {
    let mut rng = Rng(seed);
    let mut rows = SparseRows::try_new(T::DT, m, d, kk).unwrap();
    for j in 0..m {
        let mut acc: Vec<f64> = (0..d).map(|_| spread(&mut rng)).collect();
        let kept = top_k(&acc, kk);
        rows.set_row(j, &kept, &mut acc);
    }
    let idx = rows.absolute_columns();
    let val: Vec<T> = (0..m).flat_map(|j| rows.values(j)).map(T::of).collect();
    (rows, idx, val)
}

fn passes_case<T: Raw>(kern: &PassKernels<T>, update: Update, s: Schedule, seed: u64) {
    // d over two host segments (65,536 columns), m = 5 rows of which 4 are filled.
    let (m, d, kk, rows_used, j) = (5usize, 70_000usize, 300usize, 4usize, 2usize);
    let (host, idx, val) = window::<T>(m, d, kk, seed);
    let plan = SparsePlan::new(m, d, kk, T::DT, 2);
    let tag = format!("{:?} {s:?}", T::DT);
    // Pass 1: row j into cbuf, K's row, cbuf back to zero.
    let mut cbuf = vec![T::of(0.0); d];
    let mut krow = vec![f64::NAN; rows_used];
    let (ij, vj) = (idx[j * kk..].as_ptr(), val[j * kk..].as_ptr());
    let (cb, kr) = (cbuf.as_mut_ptr(), krow.as_mut_ptr());
    let (ip, vp) = (idx.as_ptr(), val.as_ptr());
    let (scatter, gram) = (kern.scatter, kern.gram);
    run(sl::scatter(&plan), s, || unsafe {
        scatter(ij, vj, kk as i64, cb, 0)
    });
    run(sl::gram(rows_used), s, || unsafe {
        gram(ip, vp, kk as i64, cb, kr)
    });
    run(sl::scatter(&plan), s, || unsafe {
        scatter(ij, vj, kk as i64, cb, 1)
    });
    assert!(cbuf.iter().all(|x| x.f() == 0.0), "{tag}: cbuf cleared");
    let want = host.gram_row(j, rows_used);
    assert!(
        rel(&krow, &want) <= 1e-12,
        "{tag}: K's row {}",
        rel(&krow, &want)
    );

    // Pass 2: u = m·Σ c_i W_i, the update (decoupled decay), ‖u‖², ⟨u, row j⟩.
    let mut rng = Rng(seed ^ 77);
    let c: Vec<f64> = (0..rows_used).map(|_| rng.next()).collect();
    let scale = m as f64;
    let (lr, keep) = (1e-3, 1.0 - 1e-3 * 0.01);
    let sizes = [40_000usize, 30_000];
    let mut params: Vec<Vec<f64>> = sizes
        .iter()
        .map(|&z| (0..z).map(|_| rng.next()).collect())
        .collect();
    let w0: Vec<f64> = params.iter().flatten().copied().collect();
    let pp: Vec<u64> = params.iter_mut().map(|p| p.as_mut_ptr() as u64).collect();
    let mut table = Vec::new();
    dense_launch::param_table(sizes, &[0, 0], &pp, &mut table);
    let mut u = vec![0.0f64; d];
    let nsum = sl::update(&plan).grid as usize;
    let mut sums = vec![f64::NAN; nsum];
    let mut dots = vec![f64::NAN; sl::row_dot(&plan).grid as usize];
    let (up, cp, sp, dp, tp) = (
        u.as_mut_ptr(),
        c.as_ptr(),
        sums.as_mut_ptr(),
        dots.as_mut_ptr(),
        table.as_ptr(),
    );
    let (combine, row_dot) = (kern.combine, kern.row_dot);
    let per_row = sl::per_row(kk) as i32;
    run(sl::combine(&plan, rows_used), s, || unsafe {
        combine(ip, vp, kk as i64, cp, per_row, up)
    });
    run(sl::update(&plan), s, || unsafe {
        update(up, scale, d as i64, tp, 2, lr, keep, sp)
    });
    run(sl::row_dot(&plan), s, || unsafe {
        row_dot(ij, vj, kk as i64, up, dp)
    });
    let mut host_u = vec![0.0f64; d.div_ceil(65536) * 65536];
    let (uu, uc) = host.combine(&c, rows_used, scale, j, &mut host_u);
    assert!(
        rel(&u, &host_u[..d]) <= 1e-12,
        "{tag}: u {}",
        rel(&u, &host_u[..d])
    );
    let dev_uu: f64 = sums.iter().sum();
    let dev_uc: f64 = dots.iter().sum();
    assert!(
        ((dev_uu - uu) / uu).abs() <= 1e-12,
        "{tag}: ‖u‖² {dev_uu} vs {uu}"
    );
    assert!(
        ((dev_uc - uc) / uc).abs() <= 1e-12,
        "{tag}: ⟨u, c⟩ {dev_uc} vs {uc}"
    );
    // w ← keep·w − lr·u (the host's Descend with keep = 1 − lr·wd), f64 parameters.
    let moved: Vec<f64> = params
        .iter()
        .flatten()
        .zip(&w0)
        .map(|(a, b)| a - b)
        .collect();
    let want: Vec<f64> = w0
        .iter()
        .zip(&host_u)
        .map(|(w, u)| keep * w - lr * u - w)
        .collect();
    assert!(
        rel(&moved, &want) <= 1e-10,
        "{tag}: the update {}",
        rel(&moved, &want)
    );
}

#[test]
fn the_passes_equal_the_hosts_on_the_same_window() {
    let f32k = PassKernels::<f32> {
        scatter: k::spm_scatter_f32,
        gram: k::spm_gram_f32,
        combine: k::spm_combine_f32,
        row_dot: k::spm_row_dot_f32,
    };
    let bf16k = PassKernels::<u16> {
        scatter: k::spm_scatter_bf16,
        gram: k::spm_gram_bf16,
        combine: k::spm_combine_bf16,
        row_dot: k::spm_row_dot_bf16,
    };
    let f64k = PassKernels::<f64> {
        scatter: k::spm_scatter_f64,
        gram: k::spm_gram_f64,
        combine: k::spm_combine_f64,
        row_dot: k::spm_row_dot_f64,
    };
    for (i, s) in Schedule::all(31).into_iter().enumerate() {
        let seed = 1000 + i as u64;
        passes_case(&f32k, k::spm_update_f64, s, seed);
        passes_case(&bf16k, k::spm_update_f64, s, seed);
        passes_case(&f64k, k::spm_update_f64, s, seed);
    }
}

/// The f32 and bf16 parameter updates: one rounding of keep·w − lr·u.
#[test]
fn the_update_rounds_once_into_f32_and_bf16_parameters() {
    for (i, s) in Schedule::all(41).into_iter().enumerate() {
        let mut rng = Rng(50 + i as u64);
        let d = 3000;
        let plan = SparsePlan::new(1, d, 1, DType::F32, 2);
        let u0: Vec<f64> = (0..d).map(|_| rng.next()).collect();
        let (lr, keep, scale) = (1e-2, 0.999, 3.0);
        let mut w32: Vec<f32> = (0..d).map(|_| rng.next() as f32).collect();
        let mut w16: Vec<u16> = (0..d).map(|_| u16::of(rng.next())).collect();
        let (a32, a16) = (w32.clone(), w16.clone());
        for (ptr, kern) in [
            (w32.as_mut_ptr() as u64, k::spm_update_f32 as Update),
            (w16.as_mut_ptr() as u64, k::spm_update_bf16 as Update),
        ] {
            let mut table = Vec::new();
            dense_launch::param_table([d], &[0], &[ptr], &mut table);
            let mut u = u0.clone();
            let mut sums = vec![0.0; sl::update(&plan).grid as usize];
            let (up, tp, sp) = (u.as_mut_ptr(), table.as_ptr(), sums.as_mut_ptr());
            run(sl::update(&plan), s, || unsafe {
                kern(up, scale, d as i64, tp, 1, lr, keep, sp)
            });
        }
        for i in 0..d {
            let u = scale * u0[i];
            assert_eq!(
                w32[i],
                (keep * a32[i] as f64 - lr * u) as f32,
                "{s:?} f32 [{i}]"
            );
            assert_eq!(
                w16[i],
                u16::of(keep * a16[i].f() - lr * u),
                "{s:?} bf16 [{i}]"
            );
        }
    }
}

/// A host window's values, as the test's element type (a check on the helper itself).
#[test]
fn the_device_layout_round_trips_through_the_host_rows() {
    let (mut rows, idx, _) = window::<f32>(3, 70_000, 50, 5);
    let before: Vec<Vec<u32>> = (0..3).map(|j| rows.columns(j)).collect();
    rows.set_absolute_columns(&idx);
    assert_eq!(rows.absolute_columns(), idx);
    for (j, cols) in before.iter().enumerate() {
        assert_eq!(&rows.columns(j), cols);
    }
    assert!(rows.check().is_ok());
    assert!(matches!(rows.values_store(), HostWindow::F32(_)));
}
