//! Where M-FAC's window lives, chosen in one place ([`Window::new`]): on the host
//! ([`HostStep`], the passes in host.rs) or on the parameters' CUDA device (device/, `cuda`
//! feature). Both take the same gradient in and give the same K row out, take the same c in and
//! apply the same update; the m×m side between them is shared (gram.rs). The `cfg(feature =
//! "cuda")` arms of M-FAC are all in this file.

pub(crate) mod device;
pub(crate) mod host;
mod host_step;

use candle_core::{Tensor, Var};

pub use device::StepProfile;
pub(crate) use host::HostWindow;
use host_step::HostStep;

use crate::error::{Error, Result};
use crate::optim::mfac::MFacConfig;
use crate::optim::state::StateReader;

/// The scalars of pass 2 and the update: c's first `rows` entries count, u = `scale`·Gᵀc, the
/// gradient of this step is row `j`, momentum `beta`, learning rate `lr`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Update {
    pub rows: usize,
    pub scale: f64,
    pub j: usize,
    pub beta: f64,
    pub lr: f64,
}

/// M-FAC's window and the d-sized vectors of its step.
pub(crate) enum Window {
    /// In host memory; u and the momentum too.
    Host(HostStep),
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
        if vars.iter().all(|v| v.device().is_cpu()) {
            return Ok(Window::Host(HostStep::new(cfg, offsets)?));
        }
        Self::new_on_device(vars, cfg)
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
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => {
                // The gather (and its non-finite check, read back before anything is
                // written) takes gradients on the parameters' device, in their dtype.
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
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => window.gram_row(j, rows),
        }
    }

    /// Pass 2 and the update from c: u = scale·Gᵀc, the momentum (β > 0), w −= lr·dir.
    /// Returns (‖dir‖², ⟨dir, g_j⟩).
    pub fn update(&mut self, c: &[f64], a: Update, vars: &[Var]) -> Result<(f64, f64)> {
        match self {
            Window::Host(h) => h.update(c, a, vars),
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
        let _ = on;
        Ok(())
    }

    /// Whether the window lives on a CUDA device.
    pub fn on_device(&self) -> bool {
        !matches!(self, Window::Host(_))
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
            Window::Host(_) => None,
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => window.last_profile(),
        }
    }

    /// Median device time (ms) of one plain read of the whole window; `None` on the host.
    pub fn read_ms(&self, reps: usize) -> Result<Option<f64>> {
        let _ = reps;
        match self {
            Window::Host(_) => Ok(None),
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => window.read_ms(reps.max(1)).map(Some),
        }
    }

    /// Row `slot` of the window, as f64.
    pub fn row(&self, slot: usize) -> Result<Vec<f64>> {
        match self {
            Window::Host(h) => Ok(h.row(slot)),
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => window.row(slot),
        }
    }

    /// Calls `f` with the window (m × d, in its dtype) and the momentum buffer, in host
    /// memory: borrowed from a host window, copied from a device one.
    pub fn with_host_state<R>(
        &self,
        f: impl FnOnce(&HostWindow, Option<&[f64]>) -> Result<R>,
    ) -> Result<R> {
        match self {
            Window::Host(h) => {
                let (w, v) = h.state();
                f(w, v)
            }
            #[cfg(feature = "cuda")]
            Window::Device { window, .. } => {
                let (w, v) = (window.to_host()?, window.momentum_to_host()?);
                f(&w, v.as_deref())
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

fn read_window(r: &mut StateReader, w: &mut HostWindow) -> Result<()> {
    match w {
        HostWindow::F32(v) => r.read_into("window", v),
        HostWindow::BF16(v) => r.read_into("window", v),
        HostWindow::F64(v) => r.read_into("window", v),
    }
}
