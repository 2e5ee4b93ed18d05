//! The sparse window on a CUDA device (`cuda` feature): the rows, the accumulator and the step's
//! buffers on candle's device (its context and stream), the kernels of `kernels/sparse.cu`
//! (compiled by build.rs into their own fatbin: sm_90a machine code + compute_90 PTX) and the
//! launches of `sparse.rs`. The m×m side stays the host's (gram/), as for the dense window.

// Kernel launches take their arguments as locals.
#![allow(clippy::too_many_arguments)]

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::CudaDevice;
use candle_core::{DType, Tensor, Var};

use super::cuda::{check_thread, cuda_err, dtype_name, fill_table, open, ptr};
use super::launch as dense_launch;
use super::sparse::{self as sl, Selector, SparsePlan};
use super::{host_bytes, host_bytes_mut};
use crate::error::{Error, Result};
use crate::optim::mfac::window::sparse::rows::SparseRows;
use crate::optim::mfac::window::sparse::{Accumulator, Selection};
use crate::optim::mfac::MFacConfig;

/// The kernels: sm_90a machine code (no JIT at the first step on an H100/H200) + compute_90 PTX.
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sparse.fatbin"));

/// The kernels of one (parameter, accumulator, values) dtype triple.
struct Kernels {
    accumulate: CudaFunction,
    hist: CudaFunction,
    count: CudaFunction,
    scan: CudaFunction,
    compact: CudaFunction,
    scatter: CudaFunction,
    gram: CudaFunction,
    combine: CudaFunction,
    update: CudaFunction,
    row_dot: CudaFunction,
}

/// Sparse M-FAC's rows and the step's buffers on one CUDA device.
pub(crate) struct DeviceSparseWindow {
    stream: Arc<CudaStream>,
    plan: SparsePlan,
    n: usize,
    f: Kernels,
    table: CudaSlice<u64>,
    flag: CudaSlice<i32>,
    idx: CudaSlice<u32>,
    /// m × k values in the window dtype, as bytes.
    val: CudaSlice<u8>,
    /// The accumulator e and the scratch acc (d elements each, f32 or f64), swapped each step.
    e: CudaSlice<u8>,
    acc: CudaSlice<u8>,
    /// d values of the window dtype, zero between steps (pass 1).
    cbuf: CudaSlice<u8>,
    /// u (d, f64): pass 2's sums, then u itself.
    u: CudaSlice<f64>,
    hist: CudaSlice<u32>,
    counts: CudaSlice<u32>,
    offsets: CudaSlice<u32>,
    krow: CudaSlice<f64>,
    c: CudaSlice<f64>,
    sums: CudaSlice<f64>,
    dots: CudaSlice<f64>,
    host_table: Vec<u64>,
    host_ptrs: Vec<u64>,
    /// The row the current step writes (set by `write`).
    j: usize,
    /// candle's CUDA stream is per thread: the window works only on the thread that made it.
    thread: std::thread::ThreadId,
}

impl std::fmt::Debug for DeviceSparseWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceSparseWindow")
            .field("plan", &self.plan)
            .finish()
    }
}

impl DeviceSparseWindow {
    /// A window of `cfg.num_grads` empty rows of the global top-k over `vars` (d in all) on
    /// `dev`, after checking the plan against the device's free memory. The block top-k
    /// (`block_size`) runs on the host only.
    pub fn new(dev: &CudaDevice, vars: &[Var], cfg: &MFacConfig) -> Result<Self> {
        if cfg.block_size.is_some() {
            return Err(Error::OptimizerOption {
                key: "block_size".into(),
                message: "the block top-k runs on the CPU only; on a GPU use the global top-k (no block_size)".into(),
                valid: <MFacConfig as crate::optim::OptimConfig>::KEYS.join(", "),
            });
        }
        let (stream, param_dtype) = open(dev, vars, "M-FAC's sparse device window")?;
        let ctx = stream.context().clone();
        let dtype = cfg.window_dtype;
        let (pn, tn) = (dtype_name(param_dtype)?, dtype_name(dtype)?);
        let an = if dtype == DType::F64 { "f64" } else { "f32" };
        let d: usize = vars.iter().map(|v| v.elem_count()).sum();
        let k = Selection::new(cfg, d)?.kept();
        let module = ctx
            .load_module(Ptx::from_binary(FATBIN.to_vec()))
            .map_err(cuda_err(
                "loading the sparse M-FAC kernels (sm_90a / compute_90 fatbin)",
            ))?;
        let load = |name: String| {
            module
                .load_function(&name)
                .map_err(cuda_err(&format!("finding kernel {name}")))
        };
        let f = Kernels {
            accumulate: load(format!("spm_accumulate_{pn}_{an}"))?,
            hist: load(format!("spm_hist_{an}"))?,
            count: load(format!("spm_count_{an}"))?,
            scan: load("spm_scan".into())?,
            compact: load(format!("spm_compact_{an}_{tn}"))?,
            scatter: load(format!("spm_scatter_{tn}"))?,
            gram: load(format!("spm_gram_{tn}"))?,
            combine: load(format!("spm_combine_{tn}"))?,
            update: load(format!("spm_update_{pn}"))?,
            row_dot: load(format!("spm_row_dot_{tn}"))?,
        };
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("reading the multiprocessor count"))? as usize;
        let m = cfg.num_grads;
        let plan = SparsePlan::new(m, d, k, dtype, sms);
        stream
            .synchronize()
            .map_err(cuda_err("synchronizing before reading the free memory"))?;
        let (free, _total) = ctx
            .mem_get_info()
            .map_err(cuda_err("reading the free device memory"))?;
        plan.check(free as u128)?;
        let bytes = |n: usize, what: &str| {
            stream
                .alloc_zeros::<u8>(n.max(1))
                .map_err(cuda_err(&format!("allocating {what}")))
        };
        let u32s = |n: usize, what: &str| {
            stream
                .alloc_zeros::<u32>(n.max(1))
                .map_err(cuda_err(&format!("allocating {what}")))
        };
        let f64s = |n: usize, what: &str| {
            stream
                .alloc_zeros::<f64>(n.max(1))
                .map_err(cuda_err(&format!("allocating {what}")))
        };
        let (s, a) = (dtype.size_in_bytes(), plan.acc_bytes());
        let n = vars.len();
        let blocks = sl::select(&plan).grid as usize;
        Ok(DeviceSparseWindow {
            f,
            n,
            table: stream
                .alloc_zeros::<u64>(dense_launch::table_len(n))
                .map_err(cuda_err("allocating the parameter table"))?,
            flag: stream
                .alloc_zeros::<i32>(1)
                .map_err(cuda_err("allocating the flag"))?,
            idx: u32s(m * k, "the sparse window's columns")?,
            val: bytes(m * k * s, "the sparse window's values")?,
            e: bytes(d * a, "the error accumulator")?,
            acc: bytes(d * a, "the accumulator's scratch")?,
            cbuf: bytes(d * s, "pass 1's dense row")?,
            u: f64s(d, "u")?,
            hist: u32s(1 << sl::DIGIT, "the histogram")?,
            counts: u32s(2 * blocks, "the selection's counts")?,
            offsets: u32s(2 * blocks, "the selection's offsets")?,
            krow: f64s(m, "K's row")?,
            c: f64s(m, "c")?,
            sums: f64s(sl::update(&plan).grid as usize, "the sums")?,
            dots: f64s(sl::row_dot(&plan).grid as usize, "the dot products")?,
            host_table: Vec::with_capacity(dense_launch::table_len(n)),
            host_ptrs: Vec::with_capacity(2 * n),
            j: 0,
            thread: std::thread::current().id(),
            plan,
            stream,
        })
    }

    fn sync(&self, what: &str) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err(what))
    }

    /// Launches `b`'s kernel with `l`.
    fn go(b: &mut LaunchArgs<'_>, l: sl::Launch, what: &str) -> Result<()> {
        // SAFETY: every caller pushes exactly the arguments of the named kernel of sparse.cu,
        // in order and with the kernel's types: pointers (u64) to live allocations of the sizes
        // the kernel indexes, on this stream, i32 for `int`, u32 for `unsigned`, i64 for `i64`,
        // u64 for `u64`, f64 for `double`.
        unsafe { b.launch(LaunchConfig::from(l)) }.map_err(cuda_err(what))?;
        Ok(())
    }

    /// Steps 1–3 for row `j`: the parameter table, acc = e + g (and the non-finite flag, read
    /// back before anything is written: on a bad gradient its parameter's index is returned and
    /// the window is untouched), the exact top-k into row j, e = acc − stored.
    pub fn write(
        &mut self,
        j: usize,
        vars: &[Var],
        names: &[String],
        grads: &[Option<Tensor>],
    ) -> Result<Option<usize>> {
        check_thread(self.thread)?;
        let n = self.n;
        fill_table(
            &self.stream,
            vars,
            names,
            grads,
            &mut self.host_ptrs,
            &mut self.host_table,
        )?;
        self.stream
            .memcpy_htod(self.host_table.as_slice(), &mut self.table)
            .map_err(cuda_err("copying the parameter table"))?;
        self.stream
            .memcpy_htod(&[i32::MAX][..], &mut self.flag)
            .map_err(cuda_err("resetting the flag"))?;
        let s = &self.stream;
        let (table, e, acc, flag) = (
            ptr(&self.table, s),
            ptr(&self.e, s),
            ptr(&self.acc, s),
            ptr(&self.flag, s),
        );
        let (n_i, d_i) = (n as i32, self.plan.d as i64);
        let mut b = self.stream.launch_builder(&self.f.accumulate);
        b.arg(&table)
            .arg(&n_i)
            .arg(&d_i)
            .arg(&e)
            .arg(&acc)
            .arg(&flag);
        // spm_accumulate_<P>_<A>(table, n, d, e, acc, flag)
        Self::go(
            &mut b,
            sl::accumulate(&self.plan),
            "launching the accumulator",
        )?;
        let bad = self
            .stream
            .clone_dtoh(&self.flag)
            .map_err(cuda_err("reading the non-finite flag"))?;
        self.sync("the accumulator")?;
        if bad[0] != i32::MAX {
            return Ok(Some(bad[0] as usize));
        }
        self.j = j;
        let bits = if self.plan.dtype == DType::F64 {
            63
        } else {
            31
        };
        sl::select_top_k(self, bits, self.plan.k)?;
        // acc now holds acc − stored: it is the new e.
        std::mem::swap(&mut self.e, &mut self.acc);
        Ok(None)
    }

    fn row_ptrs(&self, j: usize) -> (u64, u64) {
        let (k, s) = (self.plan.k as u64, self.plan.dtype.size_in_bytes() as u64);
        (
            ptr(&self.idx, &self.stream) + j as u64 * k * 4,
            ptr(&self.val, &self.stream) + j as u64 * k * s,
        )
    }

    /// Pass 1: K's row ⟨W_i, W_j⟩ for the first `rows` rows (row j as written by `write`).
    pub fn gram_row(&mut self, j: usize, rows: usize) -> Result<Vec<f64>> {
        let (ij, vj) = self.row_ptrs(j);
        let s = &self.stream;
        let (idx, val, cbuf, krow) = (
            ptr(&self.idx, s),
            ptr(&self.val, s),
            ptr(&self.cbuf, s),
            ptr(&self.krow, s),
        );
        let k_i = self.plan.k as i64;
        let ls = sl::scatter(&self.plan);
        let (set, clear) = (0i32, 1i32);
        // spm_scatter_<T>(idx, val, k, buf, clear): row j into cbuf.
        let mut b = self.stream.launch_builder(&self.f.scatter);
        b.arg(&ij).arg(&vj).arg(&k_i).arg(&cbuf).arg(&set);
        Self::go(&mut b, ls, "launching the row scatter")?;
        // spm_gram_<T>(idx, val, k, buf, out): one block per row.
        let mut b = self.stream.launch_builder(&self.f.gram);
        b.arg(&idx).arg(&val).arg(&k_i).arg(&cbuf).arg(&krow);
        Self::go(&mut b, sl::gram(rows), "launching pass 1")?;
        // The same scatter with `clear`: cbuf back to zero.
        let mut b = self.stream.launch_builder(&self.f.scatter);
        b.arg(&ij).arg(&vj).arg(&k_i).arg(&cbuf).arg(&clear);
        Self::go(&mut b, ls, "launching the row clear")?;
        let mut out = vec![0.0f64; rows];
        self.stream
            .memcpy_dtoh(&self.krow.slice(0..rows), out.as_mut_slice())
            .map_err(cuda_err("copying K's row"))?;
        self.sync("pass 1")?;
        Ok(out)
    }

    /// Pass 2 and the update: u = scale·Wᵀc over the first `c.len()` rows, then
    /// w ← (1 − decay)·w − lr·u. Returns (‖u‖², ⟨u, W_j⟩).
    pub fn update(
        &mut self,
        c: &[f64],
        scale: f64,
        j: usize,
        lr: f64,
        decay: f64,
    ) -> Result<(f64, f64)> {
        let rows = c.len();
        self.stream
            .memcpy_htod(c, &mut self.c)
            .map_err(cuda_err("copying c"))?;
        self.stream
            .memset_zeros(&mut self.u)
            .map_err(cuda_err("zeroing u"))?;
        let (ij, vj) = self.row_ptrs(j);
        let s = &self.stream;
        let (idx, val, cp, u, table, sums, dots) = (
            ptr(&self.idx, s),
            ptr(&self.val, s),
            ptr(&self.c, s),
            ptr(&self.u, s),
            ptr(&self.table, s),
            ptr(&self.sums, s),
            ptr(&self.dots, s),
        );
        let (k_i, d_i) = (self.plan.k as i64, self.plan.d as i64);
        let per_row = sl::per_row(self.plan.k) as i32;
        // spm_combine_<T>(idx, val, k, c, per_row, u)
        let mut b = self.stream.launch_builder(&self.f.combine);
        b.arg(&idx)
            .arg(&val)
            .arg(&k_i)
            .arg(&cp)
            .arg(&per_row)
            .arg(&u);
        Self::go(&mut b, sl::combine(&self.plan, rows), "launching pass 2")?;
        // spm_update_<P>(u, scale, d, table, n, lr, keep, sums)
        let (n_i, keep) = (self.n as i32, 1.0 - decay);
        let mut b = self.stream.launch_builder(&self.f.update);
        b.arg(&u)
            .arg(&scale)
            .arg(&d_i)
            .arg(&table)
            .arg(&n_i)
            .arg(&lr)
            .arg(&keep)
            .arg(&sums);
        Self::go(&mut b, sl::update(&self.plan), "launching the update")?;
        // spm_row_dot_<T>(idx, val, k, u, out)
        let mut b = self.stream.launch_builder(&self.f.row_dot);
        b.arg(&ij).arg(&vj).arg(&k_i).arg(&u).arg(&dots);
        Self::go(&mut b, sl::row_dot(&self.plan), "launching ⟨u, c⟩")?;
        let parts = self
            .stream
            .clone_dtoh(&self.sums)
            .map_err(cuda_err("copying ‖u‖²"))?;
        let dparts = self
            .stream
            .clone_dtoh(&self.dots)
            .map_err(cuda_err("copying ⟨u, c⟩"))?;
        self.sync("pass 2")?;
        Ok((parts.iter().sum(), dparts.iter().sum()))
    }

    /// u of the last step (d).
    pub fn u_to_host(&self) -> Result<Vec<f64>> {
        let out = self
            .stream
            .clone_dtoh(&self.u)
            .map_err(cuda_err("copying u"))?;
        self.sync("copying u")?;
        Ok(out[..self.plan.d].to_vec())
    }

    /// Entries kept per row.
    pub fn kept(&self) -> usize {
        self.plan.k
    }

    /// Bytes of the rows, and of everything the window holds on the device.
    pub fn bytes(&self) -> (u128, u128) {
        (self.plan.rows_bytes(), self.plan.needed())
    }

    /// The rows and the accumulator in the host's format (for checkpoints and introspection).
    pub fn to_host(&self) -> Result<(SparseRows, Accumulator)> {
        let p = &self.plan;
        let mut rows = SparseRows::try_new(p.dtype, p.m, p.d, p.k).ok_or_else(|| {
            Error::InvalidArgument("no host memory for a copy of the sparse window".into())
        })?;
        let idx = self
            .stream
            .clone_dtoh(&self.idx)
            .map_err(cuda_err("copying the sparse window's columns"))?;
        self.stream
            .memcpy_dtoh(&self.val, host_bytes_mut(rows.values_store_mut()))
            .map_err(cuda_err("copying the sparse window's values"))?;
        let mut e = Accumulator::zeros(p.dtype, p.d);
        match &mut e {
            Accumulator::F32(v) => self.stream.memcpy_dtoh(&self.e, as_bytes_mut(v)),
            Accumulator::F64(v) => self.stream.memcpy_dtoh(&self.e, as_bytes_mut(v)),
        }
        .map_err(cuda_err("copying the error accumulator"))?;
        self.sync("copying the sparse window to the host")?;
        rows.set_absolute_columns(&idx[..p.m * p.k]);
        Ok((rows, e))
    }

    /// Replaces the rows and the accumulator with host ones (resuming).
    pub fn load_host(&mut self, rows: &SparseRows, e: &Accumulator) -> Result<()> {
        let idx = rows.absolute_columns();
        self.stream
            .memcpy_htod(idx.as_slice(), &mut self.idx)
            .map_err(cuda_err("copying the sparse window's columns"))?;
        self.stream
            .memcpy_htod(host_bytes(rows.values_store()), &mut self.val)
            .map_err(cuda_err("copying the sparse window's values"))?;
        match e {
            Accumulator::F32(v) => self.stream.memcpy_htod(as_bytes(v), &mut self.e),
            Accumulator::F64(v) => self.stream.memcpy_htod(as_bytes(v), &mut self.e),
        }
        .map_err(cuda_err("copying the error accumulator"))?;
        self.sync("copying the sparse window to the device")
    }

    /// An empty host copy of this window's shape (to read a checkpoint into).
    pub fn host_shape(&self) -> Result<(SparseRows, Accumulator)> {
        let p = &self.plan;
        let rows = SparseRows::try_new(p.dtype, p.m, p.d, p.k).ok_or_else(|| {
            Error::InvalidArgument("no host memory for a copy of the sparse window".into())
        })?;
        Ok((rows, Accumulator::zeros(p.dtype, p.d)))
    }
}

impl Selector for DeviceSparseWindow {
    fn hist(&mut self, shift: u32, prefix: u64, below: u32, bits: u32) -> Result<Vec<u32>> {
        self.stream
            .memset_zeros(&mut self.hist)
            .map_err(cuda_err("zeroing the histogram"))?;
        let (acc, h) = (ptr(&self.acc, &self.stream), ptr(&self.hist, &self.stream));
        let d_i = self.plan.d as i64;
        let (sh, be, bi) = (shift as i32, below as i32, bits as i32);
        // spm_hist_<A>(acc, n, shift, prefix, below, bits, out)
        let mut b = self.stream.launch_builder(&self.f.hist);
        b.arg(&acc)
            .arg(&d_i)
            .arg(&sh)
            .arg(&prefix)
            .arg(&be)
            .arg(&bi)
            .arg(&h);
        Self::go(&mut b, sl::hist(&self.plan), "launching a histogram pass")?;
        let mut out = vec![0u32; 1 << bits];
        self.stream
            .memcpy_dtoh(&self.hist.slice(0..out.len()), out.as_mut_slice())
            .map_err(cuda_err("copying the histogram"))?;
        self.sync("a histogram pass")?;
        Ok(out)
    }

    fn finish(&mut self, lo: u64, hi: u64, need: u32) -> Result<()> {
        let s = &self.stream;
        let (acc, counts, offsets) = (
            ptr(&self.acc, s),
            ptr(&self.counts, s),
            ptr(&self.offsets, s),
        );
        let (ij, vj) = self.row_ptrs(self.j);
        let d_i = self.plan.d as i64;
        let ls = sl::select(&self.plan);
        // spm_count_<A>(acc, n, lo, hi, counts)
        let mut b = self.stream.launch_builder(&self.f.count);
        b.arg(&acc).arg(&d_i).arg(&lo).arg(&hi).arg(&counts);
        Self::go(&mut b, ls, "launching the selection's count")?;
        // spm_scan(counts, blocks, need, offsets)
        let blocks = ls.grid as i32;
        let mut b = self.stream.launch_builder(&self.f.scan);
        b.arg(&counts).arg(&blocks).arg(&need).arg(&offsets);
        Self::go(&mut b, sl::scan(), "launching the selection's scan")?;
        // spm_compact_<A>_<T>(acc, n, lo, hi, offsets, idx, val)
        let mut b = self.stream.launch_builder(&self.f.compact);
        b.arg(&acc)
            .arg(&d_i)
            .arg(&lo)
            .arg(&hi)
            .arg(&offsets)
            .arg(&ij)
            .arg(&vj);
        Self::go(&mut b, ls, "launching the selection's compaction")
    }
}

fn as_bytes<T>(v: &[T]) -> &[u8] {
    // SAFETY: f32 and f64 have no padding; the byte view covers exactly the slice.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn as_bytes_mut<T>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; every bit pattern is a valid f32 or f64.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
}
