//! The sparse window (Sparse M-FAC: Modoranu et al., "Error Feedback Can Accurately Compress
//! Preconditioners", ICML 2024; ../shared/docs/sparse-mfac.md): each window row is the top-k of
//! an error-feedback accumulator instead of the whole gradient.
//!
//! One step, as both of the authors' codes compute it (doc §1, §2.2, §3.2):
//! 1. acc = e + g (no learning rate);
//! 2. keep the k entries of largest |acc| — over all of d (EFCP, the default) or per block
//!    (the maintained package, `block_size`) — ties to the lower index ([`select`]);
//! 3. row j of the window := acc on the kept set (c, in the window dtype); e := acc − c;
//! 4. K's row j = W·c (pass 1), c' = (mλI + K)⁻¹e_j (the shared m×m side), u = m·Wᵀc' (pass 2):
//!    the stable form of u = F⁻¹c with F = λI + (1/m)WᵀW;
//! 5. w ← (1 − lr·wd)·w − lr·u (decoupled weight decay, as the maintained package).
//!
//! The optimizer's step (mod.rs of M-FAC), the m×m side (gram/) and the checkpoint's scalars are
//! the dense window's; only the window's storage, its passes and the error accumulator are here.
//! Nothing in this module assumes where the rows live beyond host memory: a device variant sits
//! beside it as `Window::Device` sits beside `Window::Host`.

pub(crate) mod rows;
pub(crate) mod select;

use candle_core::{DType, Tensor, Var};

use super::{Descend, Update};
use crate::error::{Error, Result};
use crate::optim::host::with_cpu_slice;
use crate::optim::mfac::MFacConfig;
use crate::optim::state::{StateReader, StateWriter};
use crate::optim::util::{all_finite, available_memory, human, par_zip_mut, Elem};
use rows::SparseRows;
use select::{top_k, top_k_blocks, Blocks, Magnitude};

/// How the kept entries are chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Selection {
    /// The k = ⌊ρ·d⌋ largest of all d (EFCP).
    Global { k: usize },
    /// Per block (the maintained package).
    Blocks(Blocks),
}

impl Selection {
    /// The selection `cfg` asks for over d parameters; an error naming `density` when it would
    /// keep nothing.
    pub fn new(cfg: &MFacConfig, d: usize) -> Result<Self> {
        if d > u32::MAX as usize {
            return Err(Error::InvalidArgument(format!(
                "the sparse M-FAC window indexes parameters with 32 bits; this model has {d}"
            )));
        }
        match cfg.block_size {
            Some(b) => Ok(Selection::Blocks(Blocks::new(d, b, cfg.density))),
            None => {
                let k = (cfg.density * d as f64).floor() as usize;
                if k == 0 {
                    return Err(Error::OptimizerOption {
                        key: "density".into(),
                        message: format!(
                            "{} keeps ⌊{} × {d}⌋ = 0 of the {d} parameters; use a density of at least {:.3e} (1/d)",
                            cfg.density, cfg.density, 1.0 / d as f64
                        ),
                        valid: <MFacConfig as crate::optim::seam::OptimConfig>::KEYS.join(", "),
                    });
                }
                Ok(Selection::Global { k: k.min(d) })
            }
        }
    }

    /// Entries kept per step.
    pub fn kept(&self) -> usize {
        match self {
            Selection::Global { k } => *k,
            Selection::Blocks(b) => b.kept(),
        }
    }

    /// The kept indices of `acc`, ascending.
    fn select<E: Magnitude>(&self, acc: &[E]) -> Vec<u32> {
        match self {
            Selection::Global { k } => top_k(acc, *k),
            Selection::Blocks(b) => top_k_blocks(acc, b),
        }
    }
}

/// Where the last step of the sparse window spent its time (wall clock, ms): the parts of
/// [`crate::optim::MFac::sparse_profile`]. The m×m side is in [`crate::optim::GramTiming`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SparseProfile {
    /// acc = e + g (one d-length pass: read e and g, write e), with the finite check.
    pub accumulate_ms: f64,
    /// The top-k selection over d (histogram passes and the collection).
    pub select_ms: f64,
    /// Writing row j and e := acc − c on the kept set (O(k)).
    pub row_ms: f64,
    /// Pass 1: K's row, gathers over the rows' kept entries.
    pub pass1_ms: f64,
    /// Pass 2: u = m·Wᵀc, scatter-adds over the rows' kept entries, with ‖u‖² and ⟨u, c⟩.
    pub pass2_ms: f64,
    /// w ← (1 − lr·wd)·w − lr·u (one d-length pass).
    pub update_ms: f64,
}

/// The error-feedback accumulator e: f64 with an f64 window, else f32 (as both authors' codes).
#[derive(Debug)]
pub(crate) enum Accumulator {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

impl Accumulator {
    /// d zeros: f64 with an f64 window, else f32.
    pub fn zeros(dtype: DType, d: usize) -> Self {
        if dtype == DType::F64 {
            Accumulator::F64(vec![0.0; d])
        } else {
            Accumulator::F32(vec![0.0; d])
        }
    }

    /// As f64.
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            Accumulator::F32(v) => v.iter().map(|x| *x as f64).collect(),
            Accumulator::F64(v) => v.clone(),
        }
    }

    fn bytes_per(dtype: DType) -> usize {
        if dtype == DType::F64 {
            8
        } else {
            4
        }
    }
}

/// The sparse window and the d-sized vectors of its step.
#[derive(Debug)]
pub(crate) struct SparseStep {
    rows: SparseRows,
    selection: Selection,
    e: Accumulator,
    offsets: Vec<usize>,
    /// u = F⁻¹c of the last step (d, then zeros to whole segments).
    u: Vec<f64>,
    d: usize,
    profile: SparseProfile,
}

fn ms(a: std::time::Instant, b: std::time::Instant) -> f64 {
    (b - a).as_secs_f64() * 1e3
}

/// Bytes of the sparse window's state for `cfg` over `d` parameters: the rows, the error
/// accumulator and u (the m×m side is counted by the caller).
pub(crate) fn state_bytes(cfg: &MFacConfig, d: usize) -> u128 {
    let k = Selection::new(cfg, d).map(|s| s.kept()).unwrap_or(1);
    SparseRows::bytes_for(cfg.num_grads, d, k, cfg.window_dtype.size_in_bytes())
        + (d * Accumulator::bytes_per(cfg.window_dtype) + padded(d) * 8) as u128
}

/// d rounded up to whole segments: u's length (pass 2 works on whole segments).
fn padded(d: usize) -> usize {
    d.div_ceil(rows::SEG).max(1) * rows::SEG
}

/// Bytes of the sparse rows alone.
pub(crate) fn window_bytes(cfg: &MFacConfig, d: usize) -> u128 {
    let k = Selection::new(cfg, d).map(|s| s.kept()).unwrap_or(1);
    SparseRows::bytes_for(cfg.num_grads, d, k, cfg.window_dtype.size_in_bytes())
}

impl SparseStep {
    /// Allocates the sparse window after checking that it, the accumulator and the step's
    /// vectors fit in free memory.
    pub fn new(cfg: &MFacConfig, offsets: Vec<usize>) -> Result<Self> {
        let (m, d) = (cfg.num_grads, *offsets.last().unwrap_or(&0));
        let selection = Selection::new(cfg, d)?;
        let k = selection.kept();
        let needed = cfg.host_bytes(d);
        let fix =
            "use a lower density, fewer gradients (num_grads) or bf16 values (window_dtype: bf16)";
        let what = || {
            format!(
                "the sparse M-FAC window (num_grads {m} × {k} kept of {d} parameters, {:?} values) and its state",
                cfg.window_dtype
            )
        };
        if let Some(avail) = available_memory() {
            if needed > avail {
                return Err(Error::OutOfMemory {
                    what: what(),
                    needed: human(needed),
                    available: human(avail),
                    fix: fix.into(),
                });
            }
        }
        let oom = || Error::OutOfMemory {
            what: what(),
            needed: human(needed),
            available: "less (the allocation failed)".into(),
            fix: fix.into(),
        };
        let rows = SparseRows::try_new(cfg.window_dtype, m, d, k).ok_or_else(oom)?;
        let e = Accumulator::zeros(cfg.window_dtype, d);
        Ok(SparseStep {
            rows,
            selection,
            e,
            offsets,
            u: vec![0.0; padded(d)],
            d,
            profile: SparseProfile::default(),
        })
    }

    /// Entries kept per step.
    pub fn kept(&self) -> usize {
        self.selection.kept()
    }

    /// Bytes held: the rows, the accumulator and u.
    pub fn bytes(&self) -> u128 {
        let e = match &self.e {
            Accumulator::F32(v) => v.len() * 4,
            Accumulator::F64(v) => v.len() * 8,
        };
        self.rows.bytes() + (e + self.u.len() * 8) as u128
    }

    /// Bytes of the rows alone.
    pub fn window_bytes(&self) -> u128 {
        self.rows.bytes()
    }

    /// Steps 1–3: acc = e + g, the kept set, row j := c, e := acc − c. Every gradient is
    /// checked first: on a non-finite one it returns [`Error::NonFiniteGradient`] and changes
    /// nothing. A missing gradient counts as zero.
    pub fn write(&mut self, j: usize, names: &[String], gs: &[Option<Tensor>]) -> Result<()> {
        let t0 = std::time::Instant::now();
        for (i, g) in gs.iter().enumerate() {
            if let Some(g) = g {
                if !with_cpu_slice!(g, |s| all_finite(s))? {
                    return Err(Error::NonFiniteGradient {
                        index: i,
                        param: names[i].clone(),
                    });
                }
            }
        }
        fn accumulate<A: Elem, G: Elem>(e: &mut [A], g: &[G]) {
            // One rounding to A of an exact f64 sum: for f32 + f32 this is f32 addition.
            par_zip_mut(e, g, |o, i| {
                for (x, gk) in o.iter_mut().zip(i) {
                    *x = A::from_f64(x.to_f64() + gk.to_f64());
                }
            });
        }
        for (i, g) in gs.iter().enumerate() {
            let Some(g) = g else { continue };
            let (a, b) = (self.offsets[i], self.offsets[i + 1]);
            match &mut self.e {
                Accumulator::F32(e) => with_cpu_slice!(g, |s| accumulate(&mut e[a..b], s))?,
                Accumulator::F64(e) => with_cpu_slice!(g, |s| accumulate(&mut e[a..b], s))?,
            }
        }
        let t1 = std::time::Instant::now();
        let kept = match &self.e {
            Accumulator::F32(e) => self.selection.select(e),
            Accumulator::F64(e) => self.selection.select(e),
        };
        let t2 = std::time::Instant::now();
        match &mut self.e {
            Accumulator::F32(e) => self.rows.set_row(j, &kept, e),
            Accumulator::F64(e) => self.rows.set_row(j, &kept, e),
        }
        self.profile.accumulate_ms = ms(t0, t1);
        self.profile.select_ms = ms(t1, t2);
        self.profile.row_ms = ms(t2, std::time::Instant::now());
        Ok(())
    }

    /// Pass 1: row j of K = W·c over the first `rows` rows.
    pub fn gram_row(&mut self, j: usize, rows: usize) -> Vec<f64> {
        let t0 = std::time::Instant::now();
        let r = self.rows.gram_row(j, rows);
        self.profile.pass1_ms = ms(t0, std::time::Instant::now());
        r
    }

    /// Pass 2 and the update: u = scale·Wᵀc over the first `rows` rows, then
    /// w ← (1 − decay)·w − lr·u (decay = lr·weight_decay, decoupled). Returns (‖u‖², ⟨u, c_j⟩).
    pub fn update(&mut self, c: &[f64], a: Update, vars: &[Var]) -> Result<(f64, f64)> {
        let t0 = std::time::Instant::now();
        let sums = self
            .rows
            .combine(&c[..a.rows], a.rows, a.scale, a.j, &mut self.u);
        let t1 = std::time::Instant::now();
        for (i, var) in vars.iter().enumerate() {
            let (s, t) = (self.offsets[i], self.offsets[i + 1]);
            var.as_tensor().inplace_op1(&Descend {
                dir: &self.u[s..t],
                lr: a.lr,
                keep: 1.0 - a.decay,
            })?;
        }
        self.profile.pass2_ms = ms(t0, t1);
        self.profile.update_ms = ms(t1, std::time::Instant::now());
        Ok(sums)
    }

    /// Where the last step spent its time.
    pub fn profile(&self) -> SparseProfile {
        self.profile
    }

    /// u = F⁻¹c of the last step.
    pub fn preconditioned(&self) -> &[f64] {
        &self.u[..self.d]
    }

    /// Row `slot` as a dense f64 vector.
    pub fn row(&self, slot: usize) -> Vec<f64> {
        self.rows.dense_row(slot)
    }

    /// Row `slot`'s kept columns (ascending) and values.
    pub fn kept_entries(&self, slot: usize) -> (Vec<u32>, Vec<f64>) {
        (self.rows.columns(slot), self.rows.values(slot))
    }

    /// The error accumulator e, as f64.
    pub fn error(&self) -> Vec<f64> {
        self.e.to_f64()
    }

    /// Adds the window's arrays to a checkpoint ([`save_parts`]).
    pub fn save<'a>(&'a self, w: &mut StateWriter<'a>, m: usize) {
        save_parts(w, &self.rows, &self.e, m);
    }

    /// Reads a checkpoint's rows and accumulator into place ([`load_parts`]).
    pub fn load(&mut self, r: &mut StateReader, path: &std::path::Path) -> Result<()> {
        load_parts(r, &mut self.rows, &mut self.e, path)
    }
}

/// Adds a sparse window's arrays to a checkpoint: the rows (columns within segments, values,
/// segment starts) and the accumulator. The host window and the device one (through a host
/// copy) write the same file.
pub(crate) fn save_parts<'a>(
    w: &mut StateWriter<'a>,
    rows: &'a SparseRows,
    e: &'a Accumulator,
    m: usize,
) {
    let (idx, val, start) = rows.arrays();
    let k = idx.len() / m.max(1);
    w.add("sparse_columns", idx, &[m, k]);
    match val {
        super::HostWindow::F32(v) => w.add("sparse_values", v, &[m, k]),
        super::HostWindow::BF16(v) => w.add("sparse_values", v, &[m, k]),
        super::HostWindow::F64(v) => w.add("sparse_values", v, &[m, k]),
    }
    w.add("sparse_segments", start, &[m, start.len() / m.max(1)]);
    match e {
        Accumulator::F32(v) => w.add("error_feedback", v, &[]),
        Accumulator::F64(v) => w.add("error_feedback", v, &[]),
    }
}

/// Reads a checkpoint's rows and accumulator into place, then checks the segment table (a
/// corrupt file could otherwise make a pass index out of its row).
pub(crate) fn load_parts(
    r: &mut StateReader,
    rows: &mut SparseRows,
    e: &mut Accumulator,
    path: &std::path::Path,
) -> Result<()> {
    let (idx, val, start) = rows.arrays_mut();
    r.read_into("sparse_columns", idx)?;
    match val {
        super::HostWindow::F32(v) => r.read_into("sparse_values", v)?,
        super::HostWindow::BF16(v) => r.read_into("sparse_values", v)?,
        super::HostWindow::F64(v) => r.read_into("sparse_values", v)?,
    }
    r.read_into("sparse_segments", start)?;
    match e {
        Accumulator::F32(v) => r.read_into("error_feedback", v)?,
        Accumulator::F64(v) => r.read_into("error_feedback", v)?,
    }
    rows.check().map_err(|message| Error::Weights {
        path: path.to_path_buf(),
        message: format!("the sparse M-FAC window: {message}"),
    })
}
