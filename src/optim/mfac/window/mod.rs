//! Where M-FAC's window lives and what it holds, chosen in one place ([`Window::new`]): the
//! dense window on the host ([`HostStep`], the passes in host.rs) or on the parameters' CUDA
//! device (device/, `cuda` feature), or the sparse window (sparse/: top-k rows with error
//! feedback, on the host). All take a gradient in and give K's row out, take c in and apply the
//! update; the m×m side between them is shared (gram.rs). The `cfg(feature = "cuda")` arms of
//! M-FAC are all in this file.

pub(crate) mod device;
pub(crate) mod host;
mod host_step;
pub(crate) mod sparse;

use candle_core::{CpuStorage, Layout, Tensor, Var};

pub use device::StepProfile;
pub(crate) use host::HostWindow;
use host_step::HostStep;
use sparse::SparseStep;

use crate::error::{Error, Result};
use crate::optim::mfac::MFacConfig;
use crate::optim::state::{StateReader, StateWriter};
use crate::optim::util::{par_zip_mut, Elem};

/// The scalars of pass 2 and the update: c's first `rows` entries count, u = `scale`·Gᵀc, the
/// gradient of this step is row `j`, momentum `beta`, learning rate `lr`, and `decay` = lr·wd
/// for decoupled weight decay (w ← (1 − decay)·w − lr·dir; the sparse window's; 0 for the
/// dense one, whose decay is coupled into the gradient).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Update {
    pub rows: usize,
    pub scale: f64,
    pub j: usize,
    pub beta: f64,
    pub lr: f64,
    pub decay: f64,
}

/// M-FAC's window and the d-sized vectors of its step.
pub(crate) enum Window {
    /// In host memory; u and the momentum too.
    Host(HostStep),
    /// Sparse rows with error feedback, in host memory; u too.
    Sparse(SparseStep),
    /// Sparse rows with error feedback on a CUDA device, with u copied back when recording is
    /// on.
    #[cfg(feature = "cuda")]
    DeviceSparse {
        window: Box<device::DeviceSparseWindow>,
        u: Vec<f64>,
        record: bool,
    },
    /// On a CUDA device, with u (F⁻¹g) copied back when recording is on.
    #[cfg(feature = "cuda")]
    Device {
        window: Box<device::DeviceWindow>,
        u: Vec<f64>,
    },
}

impl Window {
    /// The window for these parameters: on the host when they all live on the CPU, else on
    /// their CUDA device (which needs the `cuda` feature).
    pub fn new(vars: &[Var], cfg: &MFacConfig, offsets: Vec<usize>) -> Result<Self> {
        let on_cpu = vars.iter().all(|v| v.device().is_cpu());
        if cfg.is_sparse() {
            if !on_cpu {
                return Self::new_sparse_on_device(vars, cfg);
            }
            return Ok(Window::Sparse(SparseStep::new(cfg, offsets)?));
        }
        if on_cpu {
            return Ok(Window::Host(HostStep::new(cfg, offsets)?));
        }
        Self::new_on_device(vars, cfg)
    }

    /// The sparse window over these (CPU) parameters, whatever the density: density 1 keeps
    /// every entry (the sparse code path computing dense M-FAC, for checks).
    pub fn new_sparse(vars: &[Var], cfg: &MFacConfig, offsets: Vec<usize>) -> Result<Self> {
        if !vars.iter().all(|v| v.device().is_cpu()) {
            return Err(Error::InvalidArgument(
                "M-FAC's sparse window runs on the CPU for now".into(),
            ));
        }
        Ok(Window::Sparse(SparseStep::new(cfg, offsets)?))
    }

    /// Whether this is a sparse window (its weight decay is decoupled, not in the gradient).
    pub fn is_sparse(&self) -> bool {
        match self {
            Window::Sparse(_) => true,
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { .. } => true,
            _ => false,
        }
    }

    /// A sparse window's entries kept per row, rows' bytes and state's bytes.
    pub fn sparse_sizes(&self) -> Option<(usize, u128, u128)> {
        match self {
            Window::Sparse(s) => Some((s.kept(), s.window_bytes(), s.bytes())),
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { window, .. } => {
                let (rows, all) = window.bytes();
                Some((window.kept(), rows, all))
            }
            _ => None,
        }
    }

    /// A sparse window's row `slot`: kept columns (ascending) and values. `None` for a dense
    /// window, or when a device copy fails.
    pub fn sparse_kept(&self, slot: usize) -> Option<(Vec<u32>, Vec<f64>)> {
        match self {
            Window::Sparse(s) => Some(s.kept_entries(slot)),
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { window, .. } => {
                let (rows, _) = window.to_host().ok()?;
                Some((rows.columns(slot), rows.values(slot)))
            }
            _ => None,
        }
    }

    /// A sparse window's error accumulator, as f64.
    pub fn sparse_error(&self) -> Option<Vec<f64>> {
        match self {
            Window::Sparse(s) => Some(s.error()),
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { window, .. } => Some(window.to_host().ok()?.1.to_f64()),
            _ => None,
        }
    }

    /// The sparse window, when it is one.
    pub fn sparse(&self) -> Option<&SparseStep> {
        match self {
            Window::Sparse(s) => Some(s),
            _ => None,
        }
    }

    #[cfg(not(feature = "cuda"))]
    fn new_on_device(vars: &[Var], _cfg: &MFacConfig) -> Result<Self> {
        let on = vars
            .iter()
            .map(|v| v.device())
            .find(|d| !d.is_cpu())
            .cloned()
            .unwrap_or(candle_core::Device::Cpu);
        Err(Error::InvalidArgument(format!(
            "M-FAC's window on {on:?} needs mfac-lab built with the `cuda` feature (cargo build --release --features cuda); keep the parameters on the CPU otherwise"
        )))
    }

    #[cfg(not(feature = "cuda"))]
    fn new_sparse_on_device(vars: &[Var], cfg: &MFacConfig) -> Result<Self> {
        Self::new_on_device(vars, cfg)
    }

    /// The sparse window on the parameters' CUDA device (the global top-k; sparse.cu).
    #[cfg(feature = "cuda")]
    fn new_sparse_on_device(vars: &[Var], cfg: &MFacConfig) -> Result<Self> {
        let Some(dev) = device::DeviceWindow::device_of(vars)? else {
            return Err(Error::InvalidArgument(
                "M-FAC's parameters must all live on one device".into(),
            ));
        };
        Ok(Window::DeviceSparse {
            window: Box::new(device::DeviceSparseWindow::new(&dev, vars, cfg)?),
            u: Vec::new(),
            record: false,
        })
    }

    /// The window on the parameters' CUDA device: same state and steps, the passes there.
    #[cfg(feature = "cuda")]
    fn new_on_device(vars: &[Var], cfg: &MFacConfig) -> Result<Self> {
        let Some(dev) = device::DeviceWindow::device_of(vars)? else {
            return Err(Error::InvalidArgument(
                "M-FAC's parameters must all live on one device".into(),
            ));
        };
        let window = device::DeviceWindow::new(
            &dev,
            vars,
            cfg.num_grads,
            cfg.window_dtype,
            cfg.momentum > 0.0,
        )?;
        Ok(Window::Device {
            window: Box::new(window),
            u: Vec::new(),
        })
    }

    /// Writes g (+ wd·w) into slot j; on a non-finite gradient (or, with weight decay, weight)
    /// returns [`Error::NonFiniteGradient`] with nothing changed. `gs` are contiguous and of
    /// their parameters' sizes; a missing one counts as zero.
    pub fn write(
        &mut self,
        j: usize,
        vars: &[Var],
        names: &[String],
        gs: &[Option<Tensor>],
        wd: f64,
    ) -> Result<()> {
        match self {
            Window::Host(h) => h.write(j, vars, names, gs, wd),
            Window::Sparse(s) => {
                debug_assert_eq!(wd, 0.0, "the sparse window's weight decay is decoupled");
                s.write(j, names, gs)
            }
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { window, .. } => {
                let on = on_param_device(vars, names, gs)?;
                match window.write(j, vars, names, &on)? {
                    Some(bad) => Err(Error::NonFiniteGradient {
                        index: bad,
                        param: names[bad].clone(),
                    }),
                    None => Ok(()),
                }
            }
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => {
                // The gather (and its non-finite check, read back before anything is
                // written) takes gradients on the parameters' device, in their dtype.
                let on = on_param_device(vars, names, gs)?;
                match window.gather(vars, names, &on, wd)? {
                    Some(bad) => Err(Error::NonFiniteGradient {
                        index: bad,
                        param: names[bad].clone(),
                    }),
                    None => Ok(()),
                }
            }
        }
    }

    /// Pass 1: row j of K = G·g over the first `rows` rows.
    pub fn gram_row(&mut self, j: usize, rows: usize) -> Result<Vec<f64>> {
        match self {
            Window::Host(h) => Ok(h.gram_row(j, rows)),
            Window::Sparse(s) => Ok(s.gram_row(j, rows)),
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { window, .. } => window.gram_row(j, rows),
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => window.gram_row(j, rows),
        }
    }

    /// Pass 2 and the update from c: u = scale·Gᵀc, the momentum (β > 0), w −= lr·dir.
    /// Returns (‖dir‖², ⟨dir, g_j⟩).
    pub fn update(&mut self, c: &[f64], a: Update, vars: &[Var]) -> Result<(f64, f64)> {
        match self {
            Window::Host(h) => h.update(c, a, vars),
            Window::Sparse(s) => s.update(c, a, vars),
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { window, u, record } => {
                let sums = window.update(&c[..a.rows], a.scale, a.j, a.lr, a.decay)?;
                if *record {
                    *u = window.u_to_host()?;
                }
                Ok(sums)
            }
            #[cfg(feature = "cuda")]
            Window::Device { window, u } => {
                let sums = window.update(&c[..a.rows], a.scale, a.beta, a.lr)?;
                if let Some(recorded) = window.recorded_u()? {
                    *u = recorded;
                }
                Ok(sums)
            }
        }
    }

    /// Adds the host's m×m time of this step to the profile (device window, profiling on).
    pub fn record_host_ms(&mut self, ms: f64) {
        #[cfg(feature = "cuda")]
        if let Window::Device { window, .. } = self {
            window.record_host_ms(ms);
        }
        let _ = ms;
    }

    /// Adds the whole step's time to the profile (device window, profiling on).
    pub fn record_total_ms(&mut self, ms: f64) {
        #[cfg(feature = "cuda")]
        if let Window::Device { window, .. } = self {
            window.record_total_ms(ms);
        }
        let _ = ms;
    }

    /// u = F⁻¹g of the last step (on a device: empty unless recording is on).
    pub fn preconditioned(&self) -> &[f64] {
        match self {
            Window::Host(h) => h.preconditioned(),
            Window::Sparse(s) => s.preconditioned(),
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { u, .. } => u,
            #[cfg(feature = "cuda")]
            Window::Device { u, .. } => u,
        }
    }

    /// On a device: keep u of every step there and copy it back after each step. The host
    /// window always keeps u.
    pub fn record_preconditioned(&mut self, on: bool) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Window::Device { window, u } = self {
            window.record_u(on)?;
            if !on {
                *u = Vec::new();
            }
        }
        #[cfg(feature = "cuda")]
        if let Window::DeviceSparse { u, record, .. } = self {
            *record = on;
            if !on {
                *u = Vec::new();
            }
        }
        let _ = on;
        Ok(())
    }

    /// Whether the window lives on a CUDA device.
    pub fn on_device(&self) -> bool {
        !matches!(self, Window::Host(_) | Window::Sparse(_))
    }

    /// Times the parts of every step (device window; CUDA events).
    pub fn profile_steps(&mut self, on: bool) {
        #[cfg(feature = "cuda")]
        if let Window::Device { window, .. } = self {
            window.set_profiling(on);
        }
        let _ = on;
    }

    /// The parts of the last step, when profiling a device window.
    pub fn last_profile(&self) -> Option<StepProfile> {
        match self {
            Window::Host(_) | Window::Sparse(_) => None,
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { .. } => None,
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => window.last_profile(),
        }
    }

    /// Median device time (ms) of one plain read of the whole window; `None` on the host.
    pub fn read_ms(&self, reps: usize) -> Result<Option<f64>> {
        let _ = reps;
        match self {
            Window::Host(_) | Window::Sparse(_) => Ok(None),
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { .. } => Ok(None),
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => window.read_ms(reps.max(1)).map(Some),
        }
    }

    /// Row `slot` of the window, as f64.
    pub fn row(&self, slot: usize) -> Result<Vec<f64>> {
        match self {
            Window::Host(h) => Ok(h.row(slot)),
            Window::Sparse(s) => Ok(s.row(slot)),
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { window, .. } => Ok(window.to_host()?.0.dense_row(slot)),
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => window.row(slot),
        }
    }

    /// Calls `f` with a checkpoint writer holding the window's arrays (the dense window m × d
    /// in its dtype and the momentum buffer, borrowed from a host window, copied from a device
    /// one; the sparse window's rows and error accumulator).
    pub fn with_arrays<R>(
        &self,
        m: usize,
        d: usize,
        f: impl FnOnce(StateWriter<'_>) -> Result<R>,
    ) -> Result<R> {
        fn dense<'a>(
            w: &mut StateWriter<'a>,
            window: &'a HostWindow,
            momentum: Option<&'a [f64]>,
            m: usize,
            d: usize,
        ) {
            match window {
                HostWindow::F32(v) => w.add("window", v, &[m, d]),
                HostWindow::BF16(v) => w.add("window", v, &[m, d]),
                HostWindow::F64(v) => w.add("window", v, &[m, d]),
            }
            if let Some(v) = momentum {
                w.add("momentum", v, &[]);
            }
        }
        let mut w = StateWriter::default();
        match self {
            Window::Host(h) => {
                let (window, v) = h.state();
                dense(&mut w, window, v, m, d);
                f(w)
            }
            Window::Sparse(s) => {
                s.save(&mut w, m);
                f(w)
            }
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { window, .. } => {
                let (rows, e) = window.to_host()?;
                sparse::save_parts(&mut w, &rows, &e, m);
                f(w)
            }
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => {
                let (host, v) = (window.to_host()?, window.momentum_to_host()?);
                dense(&mut w, &host, v.as_deref(), m, d);
                f(w)
            }
        }
    }

    /// Reads a checkpoint's `window` (and `momentum`, exactly when `momentum` > 0) into
    /// place: straight into a host window; through a host copy onto a device.
    pub fn load(
        &mut self,
        r: &mut StateReader,
        cfg: &MFacConfig,
        d: usize,
        path: &std::path::Path,
    ) -> Result<()> {
        let mismatch = || {
            Error::InvalidArgument(format!(
                "{}: the checkpoint's momentum setting differs from the run's ({})",
                path.display(),
                cfg.momentum
            ))
        };
        if (cfg.momentum > 0.0) != r.has("momentum") {
            return Err(mismatch());
        }
        match self {
            Window::Sparse(s) => s.load(r, path),
            #[cfg(feature = "cuda")]
            Window::DeviceSparse { window, .. } => {
                let (mut rows, mut e) = window.host_shape()?;
                sparse::load_parts(r, &mut rows, &mut e, path)?;
                window.load_host(&rows, &e)
            }
            Window::Host(h) => {
                let _ = d;
                let (w, v) = h.state_mut();
                read_window(r, w)?;
                match v {
                    Some(v) => r.read_into("momentum", v),
                    None => Ok(()),
                }
            }
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => {
                let mut host = HostWindow::try_zeros(cfg.window_dtype, cfg.num_grads, d)
                    .ok_or_else(|| Error::OutOfMemory {
                        what: "a host copy of the M-FAC window (resuming)".into(),
                        needed: crate::optim::util::human(cfg.window_bytes(d)),
                        available: "less (the allocation failed)".into(),
                        fix: "free host memory".into(),
                    })?;
                read_window(r, &mut host)?;
                window.load_host(host)?;
                if cfg.momentum > 0.0 {
                    let mut v = vec![0.0; d];
                    r.read_into("momentum", &mut v)?;
                    window.momentum_from_host(&v)?;
                }
                Ok(())
            }
        }
    }
}

/// The gradients on their parameters' device, in the parameters' dtype (the device kernels
/// read them through raw pointers): a gradient elsewhere is an error naming it.
#[cfg(feature = "cuda")]
fn on_param_device(
    vars: &[Var],
    names: &[String],
    gs: &[Option<Tensor>],
) -> Result<Vec<Option<Tensor>>> {
    let pdt = vars[0].dtype();
    let mut on: Vec<Option<Tensor>> = Vec::with_capacity(gs.len());
    for (i, (var, g)) in vars.iter().zip(gs).enumerate() {
        on.push(match g {
            Some(g) if !g.device().same_device(var.device()) => {
                return Err(Error::InvalidArgument(format!(
                    "the gradient of {} is on {:?}, its parameter on {:?}",
                    names[i],
                    g.device(),
                    var.device()
                )))
            }
            Some(g) if g.dtype() != pdt => Some(g.to_dtype(pdt)?.contiguous()?),
            Some(g) => Some(g.clone()),
            None => None,
        });
    }
    Ok(on)
}

fn read_window(r: &mut StateReader, w: &mut HostWindow) -> Result<()> {
    match w {
        HostWindow::F32(v) => r.read_into("window", v),
        HostWindow::BF16(v) => r.read_into("window", v),
        HostWindow::F64(v) => r.read_into("window", v),
    }
}

/// In place: w ← keep·w − lr·dir (keep = 1 − lr·wd for decoupled weight decay, else exactly 1,
/// which leaves w's bits as w − lr·dir alone would).
pub(crate) struct Descend<'a> {
    pub dir: &'a [f64],
    pub lr: f64,
    pub keep: f64,
}

impl candle_core::InplaceOp1 for Descend<'_> {
    fn name(&self) -> &'static str {
        "mfac-update"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        if !l.is_contiguous() {
            candle_core::bail!("mfac-update needs a contiguous parameter");
        }
        let (a, n, lr, keep) = (l.start_offset(), self.dir.len(), self.lr, self.keep);
        fn sub<E: Elem>(w: &mut [E], dir: &[f64], lr: f64, keep: f64) {
            par_zip_mut(w, dir, |w, dir| {
                if keep == 1.0 {
                    for (w, d) in w.iter_mut().zip(dir) {
                        *w = E::from_f64(w.to_f64() - lr * d);
                    }
                } else {
                    for (w, d) in w.iter_mut().zip(dir) {
                        *w = E::from_f64(keep * w.to_f64() - lr * d);
                    }
                }
            });
        }
        match s {
            CpuStorage::F32(v) => sub(&mut v[a..a + n], self.dir, lr, keep),
            CpuStorage::F64(v) => sub(&mut v[a..a + n], self.dir, lr, keep),
            CpuStorage::BF16(v) => sub(&mut v[a..a + n], self.dir, lr, keep),
            CpuStorage::F16(v) => sub(&mut v[a..a + n], self.dir, lr, keep),
            _ => candle_core::bail!("mfac-update needs a float parameter"),
        }
        Ok(())
    }
}
