//! The device window: buffers on candle's CUDA device (its context and its stream, no second
//! context), our kernels (`kernels/mfac.cu`, compiled by build.rs into a fatbin with sm_90a
//! machine code and compute_90 PTX, embedded here) and the launches of one step.

// Kernel launches take their arguments as locals; the step functions mirror the kernels'.
#![allow(clippy::too_many_arguments)]

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaStream, DevicePtr, DriverError, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{CudaDevice, CudaStorageSlice};
use candle_core::{DType, Device, Storage, Tensor, Var};

use super::launch::{self, Launch};
use super::{
    compact_rows, expand_rows, host_bytes, host_bytes_mut, shared_bytes, DevicePlan, StepProfile,
    THREADS,
};
use crate::error::{Error, Result};
use crate::optim::mfac::window::HostWindow;

/// The kernels: sm_90a machine code (no JIT at the first step on an H100/H200) + compute_90 PTX.
static FATBIN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mfac.fatbin"));

pub(super) fn cuda_err(op: &str) -> impl Fn(DriverError) -> Error + '_ {
    move |e| Error::Cuda {
        op: op.to_string(),
        message: format!("{e:?}"),
    }
}

pub(super) fn dtype_name(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("f32"),
        DType::F64 => Ok("f64"),
        DType::BF16 => Ok("bf16"),
        other => Err(Error::InvalidArgument(format!(
            "M-FAC on CUDA takes f32, f64 or bf16, got {other:?}"
        ))),
    }
}

/// The raw device address of a contiguous CUDA tensor's first element.
pub(super) fn tensor_ptr(t: &Tensor, stream: &Arc<CudaStream>, what: &str) -> Result<u64> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(Error::InvalidArgument(format!(
            "{what} is on {:?}, not on the CUDA device of the M-FAC window",
            t.device()
        )));
    };
    if !layout.is_contiguous() {
        return Err(Error::InvalidArgument(format!("{what} is not contiguous")));
    }
    let off = layout.start_offset() as u64;
    let (base, size) = match &cs.slice {
        CudaStorageSlice::F32(s) => (s.device_ptr(stream).0, 4),
        CudaStorageSlice::F64(s) => (s.device_ptr(stream).0, 8),
        CudaStorageSlice::BF16(s) => (s.device_ptr(stream).0, 2),
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{what} has dtype {:?}; M-FAC on CUDA takes f32, f64 or bf16",
                t.dtype()
            )))
        }
    };
    Ok(base + off * size)
}

pub(super) fn ptr<T>(s: &CudaSlice<T>, stream: &Arc<CudaStream>) -> u64 {
    s.device_ptr(stream).0
}

/// The checks every M-FAC device window makes first, on `dev` for `vars`: no CUDA error left by
/// an earlier operation (it would otherwise surface under the name of our first call), compute
/// capability ≥ 9.0 (our fatbins), one parameter dtype. Returns the device's stream and that
/// dtype.
pub(super) fn open(dev: &CudaDevice, vars: &[Var], what: &str) -> Result<(Arc<CudaStream>, DType)> {
    let stream = dev.cuda_stream();
    let ctx = stream.context().clone();
    ctx.check_err().map_err(cuda_err(&format!(
        "an earlier CUDA operation (before {what})"
    )))?;
    let cap = |a, what: &str| ctx.attribute(a).map_err(cuda_err(what));
    crate::gpu::check_capability(
        cap(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            "reading the compute capability",
        )?,
        cap(
            sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            "reading the compute capability",
        )?,
        what,
    )?;
    let param_dtype = vars[0].dtype();
    if vars.iter().any(|v| v.dtype() != param_dtype) {
        return Err(Error::InvalidArgument(
            "M-FAC on CUDA needs all parameters in one dtype".into(),
        ));
    }
    Ok((stream, param_dtype))
}

/// Fills `table` (host side) with this step's parameter table (`launch::param_table`): the
/// gradients' device addresses (0 where a parameter has none) and the parameters', checked to
/// be contiguous tensors on the window's device. `ptrs` is scratch.
pub(super) fn fill_table(
    stream: &Arc<CudaStream>,
    vars: &[Var],
    names: &[String],
    grads: &[Option<Tensor>],
    ptrs: &mut Vec<u64>,
    table: &mut Vec<u64>,
) -> Result<()> {
    let n = vars.len();
    ptrs.clear();
    for (i, g) in grads.iter().enumerate() {
        ptrs.push(match g {
            Some(g) => tensor_ptr(g, stream, &format!("the gradient of {}", names[i]))?,
            None => 0,
        });
    }
    for (i, v) in vars.iter().enumerate() {
        ptrs.push(tensor_ptr(v.as_tensor(), stream, &names[i])?);
    }
    let sizes = vars.iter().map(|v| v.elem_count());
    launch::param_table(sizes, &ptrs[..n], &ptrs[n..], table);
    Ok(())
}

/// The error for a window stepped from another thread than the one that built it.
pub(super) fn check_thread(built: std::thread::ThreadId) -> Result<()> {
    if std::thread::current().id() != built {
        return Err(Error::InvalidArgument(format!(
            "M-FAC's CUDA window was created on thread {:?} and stepped from {:?}: candle's CUDA stream is per thread, so the step would not wait for the work queued on the other one; step the optimizer on the thread that built it",
            built,
            std::thread::current().id()
        )));
    }
    Ok(())
}

/// M-FAC's window G (m × ld) and the step's buffers, on one CUDA device.
pub(crate) struct DeviceWindow {
    stream: Arc<CudaStream>,
    plan: DevicePlan,
    n: usize,
    gather: CudaFunction,
    pass1: CudaFunction,
    reduce: CudaFunction,
    pass2: CudaFunction,
    floor: CudaFunction,
    gather_launch: Launch,
    host_ptrs: Vec<u64>,
    window: CudaSlice<u8>,
    scratch: CudaSlice<u8>,
    table: CudaSlice<u64>,
    flag: CudaSlice<i32>,
    partial: CudaSlice<f64>,
    krow: CudaSlice<f64>,
    c: CudaSlice<f64>,
    sums: CudaSlice<f64>,
    v: Option<CudaSlice<f64>>,
    u: Option<CudaSlice<f64>>,
    sink: CudaSlice<u32>,
    profile: Option<StepProfile>,
    profiling: bool,
    host_table: Vec<u64>,
    /// candle's CUDA stream is per thread: the window works only on the thread that made it.
    thread: std::thread::ThreadId,
}

impl std::fmt::Debug for DeviceWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceWindow")
            .field("plan", &self.plan)
            .finish()
    }
}

impl DeviceWindow {
    /// The CUDA device all `vars` live on, or `None` when they are all on the CPU; an error
    /// for a mix or another device.
    pub fn device_of(vars: &[Var]) -> Result<Option<CudaDevice>> {
        let first = vars[0].device();
        if vars.iter().any(|v| !v.device().same_device(first)) {
            return Err(Error::InvalidArgument(
                "M-FAC's parameters must all live on one device".into(),
            ));
        }
        match first {
            Device::Cpu => Ok(None),
            Device::Cuda(d) => Ok(Some(d.clone())),
            other => Err(Error::InvalidArgument(format!(
                "M-FAC's window on {other:?} is not implemented; use the CPU or a CUDA device"
            ))),
        }
    }

    /// A zeroed window of `m` rows over `vars` (flattened in order, d in all) in `dtype`, after
    /// checking the plan against the device's free memory.
    pub fn new(
        dev: &CudaDevice,
        vars: &[Var],
        m: usize,
        dtype: DType,
        momentum: bool,
    ) -> Result<Self> {
        let (stream, param_dtype) = open(dev, vars, "M-FAC's device window")?;
        let ctx = stream.context().clone();
        let (pn, tn) = (dtype_name(param_dtype)?, dtype_name(dtype)?);
        let d: usize = vars.iter().map(|v| v.elem_count()).sum();
        let module = ctx
            .load_module(Ptx::from_binary(FATBIN.to_vec()))
            .map_err(cuda_err(
                "loading the M-FAC kernels (sm_90a / compute_90 fatbin)",
            ))?;
        let load = |name: String| {
            module
                .load_function(&name)
                .map_err(cuda_err(&format!("finding kernel {name}")))
        };
        let gather = load(format!("mfac_gather_{pn}_{tn}"))?;
        let pass1 = load(format!("mfac_pass1_{tn}"))?;
        let reduce = load("mfac_reduce_rows".into())?;
        let pass2 = load(format!("mfac_pass2_{tn}_{pn}"))?;
        let floor = load("mfac_read_floor".into())?;
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(cuda_err("reading the multiprocessor count"))? as usize;
        // Dynamic shared memory is asked for per kernel, always: without it the limit is 48 KiB
        // minus the kernel's static shared memory (pass 2's 128 B of block sums), so e.g. a
        // bf16 window of 2048 rows (exactly 48 KiB dynamic) would fail to launch (m up to 8192).
        let (s1, s2) = shared_bytes(dtype, m);
        for (f, bytes, name) in [(&pass1, s1, "pass 1"), (&pass2, s2, "pass 2")] {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as i32,
            )
            .map_err(cuda_err(&format!(
                "{name}: asking for {bytes} B of shared memory"
            )))?;
        }
        // A grid resident at once: the passes split the columns evenly over its blocks.
        let occ = |f: &CudaFunction, bytes: usize| {
            f.occupancy_max_active_blocks_per_multiprocessor(THREADS, bytes, None)
                .map_err(cuda_err("asking the occupancy"))
        };
        let per_sm = occ(&pass1, s1)?.min(occ(&pass2, s2)?) as usize;
        let blocks = launch::resident_blocks(sms, per_sm);
        let plan = DevicePlan::new(m, d, dtype, momentum, blocks);
        // Memory freed with cuMemFreeAsync (e.g. a window being rebuilt) stays in the stream's
        // pool until the stream is synchronized: without this it would count as used.
        stream
            .synchronize()
            .map_err(cuda_err("synchronizing before reading the free memory"))?;
        let (free, _total) = ctx
            .mem_get_info()
            .map_err(cuda_err("reading the free device memory"))?;
        plan.check(free as u128)?;
        let alloc_f64 = |n: usize, what: &str| {
            stream
                .alloc_zeros::<f64>(n.max(1))
                .map_err(cuda_err(&format!("allocating {what}")))
        };
        let s = dtype.size_in_bytes();
        let window = stream
            .alloc_zeros::<u8>(plan.window_bytes() as usize)
            .map_err(cuda_err("allocating the M-FAC window"))?;
        let scratch = stream
            .alloc_zeros::<u8>(plan.ld * s)
            .map_err(cuda_err("allocating the gradient row"))?;
        let n = vars.len();
        let table = stream
            .alloc_zeros::<u64>(launch::table_len(n))
            .map_err(cuda_err("allocating the parameter table"))?;
        let flag = stream
            .alloc_zeros::<i32>(1)
            .map_err(cuda_err("allocating the flag"))?;
        let sink = stream
            .alloc_zeros::<u32>(65536)
            .map_err(cuda_err("allocating the floor's sink"))?;
        Ok(DeviceWindow {
            plan,
            n,
            gather_launch: launch::gather(&plan, sms),
            host_ptrs: Vec::with_capacity(2 * n),
            gather,
            pass1,
            reduce,
            pass2,
            floor,
            window,
            scratch,
            table,
            flag,
            partial: alloc_f64(blocks * m, "partial sums")?,
            krow: alloc_f64(m, "K's row")?,
            c: alloc_f64(m, "c")?,
            sums: alloc_f64(2 * blocks, "the sums")?,
            v: if momentum {
                Some(alloc_f64(d, "the momentum buffer")?)
            } else {
                None
            },
            u: None,
            sink,
            profile: None,
            profiling: false,
            host_table: Vec::with_capacity(launch::table_len(n)),
            thread: std::thread::current().id(),
            stream,
        })
    }

    /// Keeps u = F⁻¹g of every step on the device (d f64) so that it can be read back.
    pub fn record_u(&mut self, on: bool) -> Result<()> {
        if on && self.u.is_none() {
            self.u = Some(
                self.stream
                    .alloc_zeros::<f64>(self.plan.d.max(1))
                    .map_err(cuda_err("allocating u"))?,
            );
        } else if !on {
            self.u = None;
        }
        Ok(())
    }

    /// Turns the per-part timing of the steps on or off.
    pub fn set_profiling(&mut self, on: bool) {
        self.profiling = on;
        if !on {
            self.profile = None;
        }
    }

    /// The timing of the last step, when profiling is on.
    pub fn last_profile(&self) -> Option<StepProfile> {
        self.profile
    }

    pub(crate) fn record_host_ms(&mut self, ms: f64) {
        if let Some(p) = &mut self.profile {
            p.host_ms = ms;
        }
    }

    pub(crate) fn record_total_ms(&mut self, ms: f64) {
        if let Some(p) = &mut self.profile {
            p.total_ms = ms;
        }
    }

    fn event(&self) -> Result<Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>> {
        if !self.profiling {
            return Ok(None);
        }
        let e = self
            .stream
            .record_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("recording an event"))?;
        Ok(Some(e))
    }

    fn elapsed(
        a: &Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
        b: &Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
    ) -> Result<f64> {
        match (a, b) {
            (Some(a), Some(b)) => Ok(a.elapsed_ms(b).map_err(cuda_err("timing"))? as f64),
            _ => Ok(0.0),
        }
    }

    fn sync(&self, what: &str) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err(what))
    }

    /// Step part 1: the parameter table (every step: gradients are fresh tensors) and the
    /// gradient row g = grads (+ wd·w) in the window's dtype, into scratch. Returns the index
    /// of the first parameter whose gradient is not finite; then nothing else was written (the
    /// window, the momentum and the parameters are untouched). `grads[i]` is `None` for a
    /// parameter without a gradient (zeros), else a contiguous tensor of its size on the device.
    pub fn gather(
        &mut self,
        vars: &[Var],
        names: &[String],
        grads: &[Option<Tensor>],
        wd: f64,
    ) -> Result<Option<usize>> {
        check_thread(self.thread)?;
        if self.profiling {
            self.profile = Some(StepProfile::default());
        }
        let n = self.n;
        fill_table(
            &self.stream,
            vars,
            names,
            grads,
            &mut self.host_ptrs,
            &mut self.host_table,
        )?;
        let e0 = self.event()?;
        self.stream
            .memcpy_htod(self.host_table.as_slice(), &mut self.table)
            .map_err(cuda_err("copying the parameter table"))?;
        self.stream
            .memcpy_htod(&[i32::MAX][..], &mut self.flag)
            .map_err(cuda_err("resetting the flag"))?;
        let (table, scratch, flag) = (
            ptr(&self.table, &self.stream),
            ptr(&self.scratch, &self.stream),
            ptr(&self.flag, &self.stream),
        );
        let (n_i, d, ld) = (n as i32, self.plan.d as i64, self.plan.ld as i64);
        let mut b = self.stream.launch_builder(&self.gather);
        b.arg(&table)
            .arg(&n_i)
            .arg(&d)
            .arg(&ld)
            .arg(&wd)
            .arg(&scratch)
            .arg(&flag);
        let cfg = LaunchConfig::from(self.gather_launch);
        // SAFETY: the arguments match mfac_gather_<P>_<T>'s signature; every pointer is a live
        // allocation of the sizes the kernel indexes (table 3n+1, scratch ld, the tensors of
        // the table, all contiguous with their elem_count), on this stream.
        unsafe { b.launch(cfg) }.map_err(cuda_err("launching the gather kernel"))?;
        let flag = self
            .stream
            .clone_dtoh(&self.flag)
            .map_err(cuda_err("reading the non-finite flag"))?;
        self.sync("the gather kernel")?;
        let e1 = self.event()?;
        if let Some(p) = &mut self.profile {
            p.gather_ms = Self::elapsed(&e0, &e1)?;
        }
        Ok((flag[0] != i32::MAX).then_some(flag[0] as usize))
    }

    /// Step part 2 (pass 1): writes the gathered g into row `j` and returns K's new row
    /// ⟨G_i, G_j⟩ for the first `rows` rows (from the stored row, as on the CPU).
    pub fn gram_row(&mut self, j: usize, rows: usize) -> Result<Vec<f64>> {
        let e0 = self.event()?;
        let (l1, lred) = (launch::pass1(&self.plan, rows), launch::reduce(rows));
        let (g, w, partial, krow) = (
            ptr(&self.scratch, &self.stream),
            ptr(&self.window, &self.stream),
            ptr(&self.partial, &self.stream),
            ptr(&self.krow, &self.stream),
        );
        let (ld, rows_i, j_i) = (self.plan.ld as i64, rows as i32, j as i32);
        let mut b = self.stream.launch_builder(&self.pass1);
        b.arg(&g)
            .arg(&w)
            .arg(&ld)
            .arg(&rows_i)
            .arg(&j_i)
            .arg(&partial);
        // SAFETY: mfac_pass1_<T>(g, G, ld, rows, j, partial): g has ld elements, G m·ld,
        // partial blocks·m ≥ blocks·rows; j < rows ≤ m; shared memory rows·8 bytes.
        unsafe { b.launch(LaunchConfig::from(l1)) }.map_err(cuda_err("launching pass 1"))?;
        let blocks_i = l1.grid as i32;
        let mut b = self.stream.launch_builder(&self.reduce);
        b.arg(&partial).arg(&blocks_i).arg(&rows_i).arg(&krow);
        // SAFETY: mfac_reduce_rows(partial, blocks, rows, out): partial blocks·rows, out ≥ rows.
        unsafe { b.launch(LaunchConfig::from(lred)) }
            .map_err(cuda_err("launching the row reduction"))?;
        let mut out = vec![0.0f64; rows];
        self.stream
            .memcpy_dtoh(&self.krow.slice(0..rows), out.as_mut_slice())
            .map_err(cuda_err("copying K's row"))?;
        self.sync("pass 1")?;
        let e1 = self.event()?;
        if let Some(p) = &mut self.profile {
            p.pass1_ms = Self::elapsed(&e0, &e1)?;
        }
        Ok(out)
    }

    /// Step part 3 (pass 2): u = scale·Gᵀc over the first `c.len()` rows; with momentum
    /// (`beta` > 0, when the window was built with it) v ← βv + (1−β)u and dir = v, else
    /// dir = u; every parameter w −= lr·dir in place. Returns (‖dir‖², ⟨dir, G_j⟩).
    pub fn update(&mut self, c: &[f64], scale: f64, beta: f64, lr: f64) -> Result<(f64, f64)> {
        let rows = c.len();
        let e0 = self.event()?;
        self.stream
            .memcpy_htod(c, &mut self.c)
            .map_err(cuda_err("copying c"))?;
        let l2 = launch::pass2(&self.plan, rows);
        let s = &self.stream;
        let (w, cp, g, table, sums) = (
            ptr(&self.window, s),
            ptr(&self.c, s),
            ptr(&self.scratch, s),
            ptr(&self.table, s),
            ptr(&self.sums, s),
        );
        let v = self.v.as_ref().map(|v| ptr(v, s)).unwrap_or(0);
        let u = self.u.as_ref().map(|u| ptr(u, s)).unwrap_or(0);
        let (ld, rows_i, d, n_i) = (
            self.plan.ld as i64,
            rows as i32,
            self.plan.d as i64,
            self.n as i32,
        );
        let mut b = self.stream.launch_builder(&self.pass2);
        b.arg(&w)
            .arg(&ld)
            .arg(&rows_i)
            .arg(&cp)
            .arg(&scale)
            .arg(&g)
            .arg(&d)
            .arg(&table)
            .arg(&n_i)
            .arg(&v)
            .arg(&beta)
            .arg(&lr)
            .arg(&u)
            .arg(&sums);
        // SAFETY: mfac_pass2_<T>_<P>(G, ld, rows, c, scale, g, d, table, n, v, beta, lr, u,
        // sums): G m·ld, c ≥ rows, g ld, table 3n+1 with the parameter pointers written by
        // `gather` this step (live tensors of the sizes in the table), v and u d or null, sums
        // 2·blocks; shared memory as `shared_bytes`.
        unsafe { b.launch(LaunchConfig::from(l2)) }.map_err(cuda_err("launching pass 2"))?;
        let parts = self
            .stream
            .clone_dtoh(&self.sums)
            .map_err(cuda_err("copying the sums"))?;
        self.sync("pass 2")?;
        let e1 = self.event()?;
        if let Some(p) = &mut self.profile {
            p.pass2_ms = Self::elapsed(&e0, &e1)?;
        }
        let (mut dd, mut dg) = (0.0, 0.0);
        for pair in parts.chunks_exact(2) {
            dd += pair[0];
            dg += pair[1];
        }
        Ok((dd, dg))
    }

    /// u of the last step (when recorded with [`DeviceWindow::record_u`]).
    pub fn recorded_u(&self) -> Result<Option<Vec<f64>>> {
        let Some(u) = &self.u else { return Ok(None) };
        let out = self.stream.clone_dtoh(u).map_err(cuda_err("copying u"))?;
        self.sync("copying u")?;
        Ok(Some(out[..self.plan.d].to_vec()))
    }

    fn bytes_to_host(&self, src: &CudaSlice<u8>, dst: &mut [u8], what: &str) -> Result<()> {
        self.stream.memcpy_dtoh(src, dst).map_err(cuda_err(what))?;
        self.sync(what)
    }

    /// The whole window as a host window of m × d (the padding dropped), for checkpoints.
    pub fn to_host(&self) -> Result<HostWindow> {
        let (m, d, ld) = (self.plan.m, self.plan.d, self.plan.ld);
        let s = self.plan.dtype.size_in_bytes();
        let mut host =
            HostWindow::try_zeros(self.plan.dtype, m, ld).ok_or_else(|| Error::OutOfMemory {
                what: "a host copy of the M-FAC window (for the checkpoint)".into(),
                needed: format!("{} bytes", m * ld * s),
                available: "less (the allocation failed)".into(),
                fix: "free host memory or checkpoint less often".into(),
            })?;
        self.bytes_to_host(
            &self.window,
            host_bytes_mut(&mut host),
            "copying the window to the host",
        )?;
        compact_rows(&mut host, m, ld, d);
        Ok(host)
    }

    /// Row `j` as f64.
    pub fn row(&self, j: usize) -> Result<Vec<f64>> {
        let (ld, d) = (self.plan.ld, self.plan.d);
        let s = self.plan.dtype.size_in_bytes();
        let mut host = HostWindow::try_zeros(self.plan.dtype, 1, ld)
            .ok_or_else(|| Error::InvalidArgument("no host memory for one window row".into()))?;
        let view = self.window.slice(j * ld * s..(j + 1) * ld * s);
        self.stream
            .memcpy_dtoh(&view, host_bytes_mut(&mut host))
            .map_err(cuda_err("copying a window row"))?;
        self.sync("copying a window row")?;
        Ok(host.row(0, ld)[..d].to_vec())
    }

    /// Replaces the window with `host` (m × d, in this window's dtype), for resuming.
    pub fn load_host(&mut self, mut host: HostWindow) -> Result<()> {
        let (m, d, ld) = (self.plan.m, self.plan.d, self.plan.ld);
        expand_rows(&mut host, m, d, ld).ok_or_else(|| Error::OutOfMemory {
            what: "a host copy of the M-FAC window (resuming)".into(),
            needed: format!("{} bytes", self.plan.window_bytes()),
            available: "less (the allocation failed)".into(),
            fix: "free host memory".into(),
        })?;
        self.stream
            .memcpy_htod(host_bytes(&host), &mut self.window)
            .map_err(cuda_err("copying the window to the device"))?;
        self.sync("copying the window to the device")
    }

    /// The momentum buffer (d f64), when there is one.
    pub fn momentum_to_host(&self) -> Result<Option<Vec<f64>>> {
        let Some(v) = &self.v else { return Ok(None) };
        let out = self
            .stream
            .clone_dtoh(v)
            .map_err(cuda_err("copying the momentum"))?;
        self.sync("copying the momentum")?;
        Ok(Some(out[..self.plan.d].to_vec()))
    }

    /// Replaces the momentum buffer (for resuming).
    pub fn momentum_from_host(&mut self, v: &[f64]) -> Result<()> {
        if let Some(dst) = &mut self.v {
            self.stream
                .memcpy_htod(v, dst)
                .map_err(cuda_err("copying the momentum to the device"))?;
            self.sync("copying the momentum to the device")?;
        }
        Ok(())
    }

    /// Median device time (ms) of one plain read of the whole window by the floor kernel,
    /// over `reps` reads after one warm-up: the unit of the step's floor (two reads).
    pub fn read_ms(&self, reps: usize) -> Result<f64> {
        let n16 = (self.plan.window_bytes() / 16) as i64;
        let (p, sink) = (
            ptr(&self.window, &self.stream),
            ptr(&self.sink, &self.stream),
        );
        let lf = launch::floor(&self.plan);
        let ctx = self.stream.context().clone();
        let mut times = Vec::with_capacity(reps);
        for r in 0..=reps {
            let a = ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(cuda_err("creating an event"))?;
            let z = ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(cuda_err("creating an event"))?;
            a.record(&self.stream).map_err(cuda_err("recording"))?;
            let mut b = self.stream.launch_builder(&self.floor);
            b.arg(&p).arg(&n16).arg(&sink);
            // SAFETY: mfac_read_floor(p, n16, out): p holds n16 16-byte vectors (the window),
            // out has ≥ blocks words.
            unsafe { b.launch(LaunchConfig::from(lf)) }
                .map_err(cuda_err("launching the read kernel"))?;
            z.record(&self.stream).map_err(cuda_err("recording"))?;
            let ms = a.elapsed_ms(&z).map_err(cuda_err("timing the read"))? as f64;
            if r > 0 {
                times.push(ms);
            }
        }
        times.sort_by(|a, b| a.total_cmp(b));
        Ok(times[times.len() / 2])
    }
}
