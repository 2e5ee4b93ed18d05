//! M-FAC (Frantar, Kurtic, Alistarh, NeurIPS 2021): a matrix-free inverse-Fisher preconditioner
//! over a sliding window of the last m gradients. See ../shared/docs/mfac.md for the algorithm;
//! this is its stable form: u = m·Gᵀc with (mλI + K)c = e_j, the m×m work in f64.

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, Layout, Tensor, Var};

use crate::error::{Error, Result};
use crate::optim::gram::{GramSolver, GramTiming};
use crate::optim::host::with_cpu_slice;
use crate::optim::window::{all_finite, par_zip_mut, Elem, HostWindow};

/// M-FAC hyper-parameters.
///
/// ```
/// use mfac_lab::optim::MFacConfig;
/// let card = MFacConfig::model_card();
/// assert_eq!((card.lr, card.num_grads, card.damp), (1e-4, 1024, 1e-6));
/// assert_eq!(MFacConfig::default().damp, 1e-5);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MFacConfig {
    /// Learning rate (read at every step, so schedules work).
    pub lr: f64,
    /// Window size m: how many recent gradients model the curvature.
    pub num_grads: usize,
    /// Damping λ: F = λI + (1/m)GᵀG.
    pub damp: f64,
    /// EMA momentum β on the preconditioned direction (0 = off).
    pub momentum: f64,
    /// Coupled L2 weight decay: wd·w is added to the gradient before it enters the window.
    pub weight_decay: f64,
    /// Storage of the window: F32 (default), BF16 (half the memory and traffic) or F64.
    pub window_dtype: DType,
}

impl Default for MFacConfig {
    /// The authors' defaults: lr 1e-3, 1024 gradients, damp 1e-5, no momentum or decay.
    fn default() -> Self {
        MFacConfig {
            lr: 1e-3,
            num_grads: 1024,
            damp: 1e-5,
            momentum: 0.0,
            weight_decay: 0.0,
            window_dtype: DType::F32,
        }
    }
}

impl MFacConfig {
    /// The model card's settings for bert-tiny on MNLI: lr 1e-4, 1024 gradients, damp 1e-6.
    pub fn model_card() -> Self {
        MFacConfig {
            lr: 1e-4,
            num_grads: 1024,
            damp: 1e-6,
            ..Default::default()
        }
    }

    /// The model card's settings with a window of `num_grads` gradients and the learning rate
    /// scaled to it: lr = 1e-4 × 1024 / num_grads, damp 1e-6.
    ///
    /// Why: inside the window's span M-FAC's direction is u = m·Gᵀ(mλI + K)⁻¹e_j. When the
    /// window's gradients have similar norms and mλ ≪ ‖g‖² (the card's λ = 1e-6 against
    /// bert-tiny's gradients), this is ≈ m·g/‖g‖² — for orthogonal gradients exactly
    /// m·g/(mλ + ‖g‖²) — so the step length grows linearly with m. The card's lr 1e-4 is tuned
    /// for m = 1024; with m = 32 it takes steps ~32× shorter and M-FAC hardly moves. Scaling lr
    /// by 1024/m keeps lr·m, hence the step length, at the card's. The assumption fails when
    /// mλ is not small against ‖g‖² (large damp, tiny gradients): then the step length
    /// saturates at lr·‖g‖/λ and the scaled lr overshoots; see docs/MFAC_LR.md.
    ///
    /// ```
    /// use mfac_lab::optim::MFacConfig;
    /// assert_eq!(MFacConfig::model_card_with(1024), MFacConfig::model_card());
    /// let small = MFacConfig::model_card_with(32);
    /// assert_eq!((small.num_grads, small.damp), (32, 1e-6));
    /// assert!((small.lr - 3.2e-3).abs() < 1e-15);
    /// // lr·m is the card's 1e-4 × 1024 for every window.
    /// for m in [1, 8, 32, 256, 4096] {
    ///     assert!((MFacConfig::model_card_with(m).lr * m as f64 - 0.1024).abs() < 1e-15);
    /// }
    /// ```
    pub fn model_card_with(num_grads: usize) -> Self {
        let card = Self::model_card();
        MFacConfig {
            num_grads,
            // 1024 / m first: exact for powers of two, so m = 1024 gives exactly 1e-4.
            lr: card.lr * (card.num_grads as f64 / num_grads.max(1) as f64),
            ..card
        }
    }

    /// Checks every field; the error names the key.
    ///
    /// ```
    /// let bad = mfac_lab::optim::MFacConfig { damp: 0.0, ..Default::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("damp"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, message: String| Error::OptimizerOption {
            key: key.into(),
            message,
            valid: crate::optim::spec::MFAC_KEYS.join(", "),
        };
        if self.num_grads < 1 {
            return Err(bad("num_grads", "must be at least 1".into()));
        }
        if !(self.damp > 0.0 && self.damp.is_finite()) {
            return Err(bad(
                "damp",
                format!("{} must be positive and finite", self.damp),
            ));
        }
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return Err(bad("lr", format!("{} must be ≥ 0 and finite", self.lr)));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(bad(
                "momentum",
                format!("{} must be in [0, 1)", self.momentum),
            ));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return Err(bad(
                "weight_decay",
                format!("{} must be ≥ 0", self.weight_decay),
            ));
        }
        if !matches!(self.window_dtype, DType::F32 | DType::BF16 | DType::F64) {
            return Err(bad(
                "window_dtype",
                format!("{:?} is not supported: f32, bf16 or f64", self.window_dtype),
            ));
        }
        Ok(())
    }

    /// Bytes of the m×d window for `d` parameters.
    pub fn window_bytes(&self, d: usize) -> u128 {
        self.num_grads as u128 * d as u128 * self.window_dtype.size_in_bytes() as u128
    }
}

/// What one step did (also kept for introspection).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MFacStep {
    /// The slot the gradient was written to.
    pub slot: usize,
    /// ‖lr · direction‖: how far the parameters moved.
    pub update_norm: f64,
    /// cos(direction, gradient): 1 = the plain gradient-descent direction. The gradient is the
    /// one that entered the window (with coupled weight decay, in the window's precision).
    pub cosine: f64,
    /// ‖gradient‖ of that same vector (√K_jj).
    pub grad_norm: f64,
}

/// The M-FAC optimizer. Implements `candle_nn::Optimizer`.
///
/// ```
/// use candle_core::{Device, Var};
/// use candle_nn::Optimizer;
/// use mfac_lab::optim::{MFac, MFacConfig};
/// let w = Var::new(&[1.0f64, -2.0, 0.5], &Device::Cpu)?;
/// let cfg = MFacConfig { lr: 0.1, num_grads: 4, damp: 1e-3, ..Default::default() };
/// let mut opt = MFac::new(vec![w.clone()], cfg)?;
/// let loss = w.as_tensor().sqr()?.sum_all()?;
/// opt.backward_step(&loss)?;
/// assert_eq!(opt.filled_slots(), 1);
/// // First step: u = m·g/(mλ + |g|²).
/// let g = [2.0, -4.0, 1.0];
/// let g2: f64 = g.iter().map(|x| x * x).sum();
/// let want: Vec<f64> = [1.0, -2.0, 0.5].iter().zip(g).map(|(w, g)| w - 0.1 * 4.0 * g / (4.0 * 1e-3 + g2)).collect();
/// let got: Vec<f64> = w.as_tensor().to_vec1()?;
/// assert!(got.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12));
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct MFac {
    cfg: MFacConfig,
    vars: Vec<Var>,
    names: Vec<String>,
    offsets: Vec<usize>,
    d: usize,
    window: HostWindow,
    gram: GramSolver,
    ring: usize,
    filled: usize,
    steps: u64,
    /// Preconditioned gradient u = F⁻¹g of the last step (d).
    u: Vec<f64>,
    /// Momentum buffer (d), when momentum > 0.
    v: Option<Vec<f64>>,
    last_c: Vec<f64>,
    last: Option<MFacStep>,
    /// The window on a CUDA device (then `window` is empty and `u`, `v` live there too).
    #[cfg(feature = "cuda")]
    device: Option<Box<crate::optim::device::DeviceWindow>>,
}

impl std::fmt::Debug for MFac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MFac")
            .field("config", &self.cfg)
            .field("d", &self.d)
            .field("filled", &self.filled)
            .field("ring_index", &self.ring)
            .field("steps", &self.steps)
            .finish()
    }
}

/// A byte count for messages: `18.00 GB`, `4.2 MB`, `512 B`.
pub(crate) fn human(bytes: u128) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{bytes} B")
    }
}

/// `MemAvailable` of /proc/meminfo, when known.
fn available_memory() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Copies `s` into `out` as f64.
fn to_f64_into<E: Elem>(s: &[E], out: &mut [f64]) {
    for (o, x) in out.iter_mut().zip(s) {
        *o = x.to_f64();
    }
}

/// In place: w −= lr · dir.
struct SubScaled<'a> {
    dir: &'a [f64],
    lr: f64,
}

impl candle_core::InplaceOp1 for SubScaled<'_> {
    fn name(&self) -> &'static str {
        "mfac-update"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        if !l.is_contiguous() {
            candle_core::bail!("mfac-update needs a contiguous parameter");
        }
        let (a, n, lr) = (l.start_offset(), self.dir.len(), self.lr);
        fn sub<E: Elem>(w: &mut [E], dir: &[f64], lr: f64) {
            par_zip_mut(w, dir, |w, dir| {
                for (w, d) in w.iter_mut().zip(dir) {
                    *w = E::from_f64(w.to_f64() - lr * d);
                }
            });
        }
        match s {
            CpuStorage::F32(v) => sub(&mut v[a..a + n], self.dir, lr),
            CpuStorage::F64(v) => sub(&mut v[a..a + n], self.dir, lr),
            CpuStorage::BF16(v) => sub(&mut v[a..a + n], self.dir, lr),
            CpuStorage::F16(v) => sub(&mut v[a..a + n], self.dir, lr),
            _ => candle_core::bail!("mfac-update needs a float parameter"),
        }
        Ok(())
    }
}

impl MFac {
    /// M-FAC over `vars` (in that fixed order). Checks the config, then that the window fits in
    /// memory before allocating it.
    pub fn try_new(vars: Vec<Var>, cfg: MFacConfig) -> Result<Self> {
        let names = vars.iter().map(|v| format!("{:?}", v.dims())).collect();
        Self::build(vars, names, cfg)
    }

    /// Like [`MFac::try_new`], with parameter names (used in error messages).
    pub fn new_named(vars: &[(String, Var)], cfg: MFacConfig) -> Result<Self> {
        Self::build(
            vars.iter().map(|(_, v)| v.clone()).collect(),
            vars.iter().map(|(n, _)| n.clone()).collect(),
            cfg,
        )
    }

    fn build(vars: Vec<Var>, names: Vec<String>, cfg: MFacConfig) -> Result<Self> {
        cfg.validate()?;
        if vars.is_empty() {
            return Err(Error::InvalidArgument(
                "M-FAC needs at least one parameter".into(),
            ));
        }
        for v in &vars {
            if !v.dtype().is_float() {
                return Err(Error::InvalidArgument(format!(
                    "M-FAC needs float parameters, got {:?}",
                    v.dtype()
                )));
            }
        }
        let mut offsets = Vec::with_capacity(vars.len() + 1);
        let mut d = 0usize;
        for v in &vars {
            offsets.push(d);
            d += v.elem_count();
        }
        offsets.push(d);
        if !vars.iter().all(|v| matches!(v.device(), Device::Cpu)) {
            return Self::build_on_device(vars, names, cfg, offsets, d);
        }
        let m = cfg.num_grads;
        let window = cfg.window_bytes(d);
        let vectors = if cfg.momentum > 0.0 { 2 } else { 1 };
        let needed = window + 2 * (m as u128 * m as u128 * 8) + vectors * d as u128 * 8;
        let fix =
            "use fewer gradients (num_grads) or a bf16 window (window_dtype: bf16)".to_string();
        if let Some(avail) = available_memory() {
            if needed > avail {
                return Err(Error::OutOfMemory {
                    what: format!(
                        "the M-FAC window (num_grads {m} × {d} parameters × {} bytes, {:?}) and its state",
                        cfg.window_dtype.size_in_bytes(),
                        cfg.window_dtype
                    ),
                    needed: human(needed),
                    available: human(avail),
                    fix,
                });
            }
        }
        let Some(window) = HostWindow::try_zeros(cfg.window_dtype, m, d) else {
            return Err(Error::OutOfMemory {
                what: "the M-FAC window".into(),
                needed: human(window),
                available: "less (the allocation failed)".into(),
                fix,
            });
        };
        Ok(MFac {
            cfg,
            vars,
            names,
            offsets,
            d,
            window,
            gram: GramSolver::new(m, cfg.damp),
            ring: 0,
            filled: 0,
            steps: 0,
            u: vec![0.0; d],
            v: (cfg.momentum > 0.0).then(|| vec![0.0; d]),
            last_c: vec![0.0; m],
            last: None,
            #[cfg(feature = "cuda")]
            device: None,
        })
    }

    #[cfg(not(feature = "cuda"))]
    fn build_on_device(
        vars: Vec<Var>,
        _names: Vec<String>,
        _cfg: MFacConfig,
        _offsets: Vec<usize>,
        _d: usize,
    ) -> Result<Self> {
        let on = vars
            .iter()
            .map(|v| v.device())
            .find(|d| !matches!(d, Device::Cpu))
            .cloned()
            .unwrap_or(Device::Cpu);
        Err(Error::InvalidArgument(format!(
            "M-FAC's window on {on:?} needs mfac-lab built with the `cuda` feature (cargo build --release --features cuda); keep the parameters on the CPU otherwise"
        )))
    }

    /// The window on the parameters' CUDA device: same state and steps, the passes there.
    #[cfg(feature = "cuda")]
    fn build_on_device(
        vars: Vec<Var>,
        names: Vec<String>,
        cfg: MFacConfig,
        offsets: Vec<usize>,
        d: usize,
    ) -> Result<Self> {
        use crate::optim::device::DeviceWindow;
        let Some(dev) = DeviceWindow::device_of(&vars)? else {
            return Err(Error::InvalidArgument(
                "M-FAC's parameters must all live on one device".into(),
            ));
        };
        let m = cfg.num_grads;
        let window = DeviceWindow::new(&dev, &vars, m, cfg.window_dtype, cfg.momentum > 0.0)?;
        Ok(MFac {
            cfg,
            vars,
            names,
            offsets,
            d,
            window: HostWindow::try_zeros(cfg.window_dtype, 0, 0)
                .expect("an empty vector always allocates"),
            gram: GramSolver::new(m, cfg.damp),
            ring: 0,
            filled: 0,
            steps: 0,
            u: Vec::new(),
            v: None,
            last_c: vec![0.0; m],
            last: None,
            device: Some(Box::new(window)),
        })
    }

    /// One step with the window on the device: gather (and the non-finite check, read before
    /// anything is written), pass 1 there, the m×m work here (f64, the CPU path's code), pass 2
    /// there with momentum, the update and the sums fused.
    #[cfg(feature = "cuda")]
    fn try_step_device(&mut self, grads: &GradStore) -> Result<MFacStep> {
        use crate::optim::device::cuda_ms_since as ms_since;
        let t0 = std::time::Instant::now();
        let m = self.cfg.num_grads;
        let dw = self
            .device
            .as_mut()
            .expect("try_step_device is called with a device window");
        let pdt = self.vars[0].dtype();
        let mut gs: Vec<Option<Tensor>> = Vec::with_capacity(self.vars.len());
        for (i, var) in self.vars.iter().enumerate() {
            let g = match grads.get(var.as_tensor()) {
                Some(g) => {
                    if g.elem_count() != var.elem_count() {
                        return Err(Error::InvalidArgument(format!(
                            "gradient of {} has the wrong size",
                            self.names[i]
                        )));
                    }
                    if !g.device().same_device(var.device()) {
                        return Err(Error::InvalidArgument(format!(
                            "the gradient of {} is on {:?}, its parameter on {:?}",
                            self.names[i],
                            g.device(),
                            var.device()
                        )));
                    }
                    let g = if g.dtype() == pdt {
                        g.clone()
                    } else {
                        g.to_dtype(pdt)?
                    };
                    Some(if g.is_contiguous() {
                        g
                    } else {
                        g.contiguous()?
                    })
                }
                None => None,
            };
            gs.push(g);
        }
        let j = self.ring;
        if let Some(bad) = dw.gather(&self.vars, &self.names, &gs, self.cfg.weight_decay)? {
            return Err(Error::NonFiniteGradient {
                index: bad,
                param: self.names[bad].clone(),
            });
        }
        let rows = self.filled.max(j + 1);
        let mut krow = dw.gram_row(j, rows)?;
        krow.resize(m, 0.0);
        let th = std::time::Instant::now();
        let c = self.gram.replace(j, &krow);
        dw.record_host_ms(ms_since(th));
        let lr = self.cfg.lr;
        let (dd, dg) = dw.update(&c[..rows], m as f64, self.cfg.momentum, lr)?;
        if let Some(u) = dw.recorded_u()? {
            self.u = u;
        }
        dw.record_total_ms(ms_since(t0));
        self.last_c = c;
        Ok(self.finish_step(j, rows, lr, (dd, dg, krow[j])))
    }

    /// Records step `j`'s introspection from `(‖u‖², ⟨u, g⟩, ‖g‖²)` and advances the ring.
    fn finish_step(&mut self, j: usize, rows: usize, lr: f64, sums: (f64, f64, f64)) -> MFacStep {
        let (dd, dg, gg) = sums;
        let cosine = if dd > 0.0 && gg > 0.0 {
            dg / (dd.sqrt() * gg.sqrt())
        } else {
            0.0
        };
        let step = MFacStep {
            slot: j,
            update_norm: lr * dd.sqrt(),
            cosine,
            grad_norm: gg.sqrt(),
        };
        self.ring = (j + 1) % self.cfg.num_grads;
        self.filled = rows;
        self.steps += 1;
        self.last = Some(step);
        step
    }

    /// One M-FAC step from the gradients in `grads` (missing ones count as zero). On a
    /// non-finite gradient it returns [`Error::NonFiniteGradient`] and changes nothing.
    pub fn try_step(&mut self, grads: &GradStore) -> Result<MFacStep> {
        #[cfg(feature = "cuda")]
        if self.device.is_some() {
            return self.try_step_device(grads);
        }
        let (d, m) = (self.d, self.cfg.num_grads);
        // 1. The gradients, contiguous, checked before any state changes.
        let mut gs: Vec<Option<Tensor>> = Vec::with_capacity(self.vars.len());
        for (i, var) in self.vars.iter().enumerate() {
            let g = match grads.get(var.as_tensor()) {
                Some(g) => Some(if g.is_contiguous() {
                    g.clone()
                } else {
                    g.contiguous()?
                }),
                None => None,
            };
            if let Some(g) = &g {
                if g.elem_count() != var.elem_count() {
                    return Err(Error::InvalidArgument(format!(
                        "gradient of {} has the wrong size",
                        self.names[i]
                    )));
                }
                if !with_cpu_slice!(g, |s| all_finite(s))? {
                    return Err(Error::NonFiniteGradient {
                        index: i,
                        param: self.names[i].clone(),
                    });
                }
            }
            // Coupled weight decay writes g + wd·w into the window: a non-finite weight would
            // poison it as a gradient would (the device gather flags the same).
            if self.cfg.weight_decay > 0.0 && !with_cpu_slice!(var.as_tensor(), |s| all_finite(s))?
            {
                return Err(Error::NonFiniteGradient {
                    index: i,
                    param: self.names[i].clone(),
                });
            }
            gs.push(g);
        }
        // 2. Write g (+ wd·w, coupled weight decay) into slot j of the window, in place.
        let j = self.ring;
        let wd = self.cfg.weight_decay;
        for (i, (var, g)) in self.vars.iter().zip(&gs).enumerate() {
            let (a, b) = (self.offsets[i], self.offsets[i + 1]);
            if wd > 0.0 {
                // u is scratch until pass 2.
                let seg = &mut self.u[a..b];
                with_cpu_slice!(var.as_tensor(), |s| to_f64_into(s, seg))?;
                match g {
                    Some(g) => with_cpu_slice!(g, |s| {
                        for (x, gk) in seg.iter_mut().zip(s) {
                            *x = gk.to_f64() + wd * *x;
                        }
                    })?,
                    None => seg.iter_mut().for_each(|x| *x *= wd),
                }
                self.window.write_segment(j, d, a, &self.u[a..b]);
            } else {
                match g {
                    Some(g) => {
                        let window = &mut self.window;
                        with_cpu_slice!(g, |s| window.write_segment(j, d, a, s))?
                    }
                    None => self.window.write_segment(j, d, a, &vec![0.0f64; b - a]),
                }
            }
        }
        // 3. Pass 1: row/column j of K = G·g over the filled rows (the rest are zero).
        let rows = self.filled.max(j + 1);
        let mut krow = self.window.gram_row(j, rows, d);
        krow.resize(m, 0.0);
        // 4. c = (mλI + K)⁻¹ e_j in f64, then pass 2: u = m·Gᵀc.
        let c = self.gram.replace(j, &krow);
        let (uu, ug) = self.window.combine(&c, rows, d, m as f64, j, &mut self.u);
        self.last_c = c;
        let gg = krow[j];
        // 5. Momentum.
        let (dir, dd, dg): (&[f64], f64, f64) = match &mut self.v {
            Some(v) => {
                let beta = self.cfg.momentum;
                let mut vv = 0.0;
                for (vk, uk) in v.iter_mut().zip(&self.u) {
                    *vk = beta * *vk + (1.0 - beta) * uk;
                    vv += *vk * *vk;
                }
                let vg = self.window.row_dot(j, d, v);
                (v, vv, vg)
            }
            None => (&self.u, uu, ug),
        };
        // 6. w −= lr·dir, in place.
        let lr = self.cfg.lr;
        for (i, var) in self.vars.iter().enumerate() {
            let (a, b) = (self.offsets[i], self.offsets[i + 1]);
            var.as_tensor().inplace_op1(&SubScaled {
                dir: &dir[a..b],
                lr,
            })?;
        }
        // 7. Introspection; advance the ring.
        Ok(self.finish_step(j, rows, lr, (dd, dg, gg)))
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &MFacConfig {
        &self.cfg
    }
    /// Number of parameters d.
    pub fn num_params(&self) -> usize {
        self.d
    }
    /// Slots of the window holding a gradient (≤ num_grads).
    pub fn filled_slots(&self) -> usize {
        self.filled
    }
    /// The slot the next gradient goes to.
    pub fn ring_index(&self) -> usize {
        self.ring
    }
    /// Steps taken.
    pub fn step_count(&self) -> u64 {
        self.steps
    }
    /// What the last step did.
    pub fn last_step(&self) -> Option<MFacStep> {
        self.last
    }
    /// ‖lr·direction‖ of the last step (0 before the first).
    pub fn last_update_norm(&self) -> f64 {
        self.last.map(|s| s.update_norm).unwrap_or(0.0)
    }
    /// cos(direction, gradient) of the last step.
    pub fn last_cosine(&self) -> f64 {
        self.last.map(|s| s.cosine).unwrap_or(0.0)
    }
    /// u = F⁻¹g of the last step (before momentum and lr), flattened in the vars' order.
    /// With the window on a CUDA device it is copied back only after
    /// [`MFac::record_preconditioned`]`(true)` (else it is empty).
    pub fn preconditioned_gradient(&self) -> &[f64] {
        &self.u
    }

    /// With the window on a CUDA device: keep u = F⁻¹g of every step there (d f64) and copy it
    /// back after each step, for [`MFac::preconditioned_gradient`] (checks; it costs a d-sized
    /// write and copy per step). On the CPU u is always kept; this does nothing.
    ///
    /// ```
    /// use candle_core::{Device, Var};
    /// use mfac_lab::optim::{MFac, MFacConfig};
    /// let w = Var::new(&[1.0f32, 2.0], &Device::Cpu)?;
    /// let mut opt = MFac::try_new(vec![w], MFacConfig { num_grads: 2, ..Default::default() })?;
    /// opt.record_preconditioned(true)?;
    /// assert!(!opt.on_device());
    /// # Ok::<(), mfac_lab::Error>(())
    /// ```
    pub fn record_preconditioned(&mut self, on: bool) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(dw) = self.device.as_mut() {
            dw.record_u(on)?;
            if !on {
                self.u = Vec::new();
            }
        }
        let _ = on;
        Ok(())
    }

    /// Whether the window lives on a CUDA device (the parameters' device).
    pub fn on_device(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.device.is_some() {
            return true;
        }
        false
    }

    /// Times the parts of every step (device window only; CUDA events, which add a few
    /// synchronisations): read them with [`MFac::last_profile`].
    pub fn profile_steps(&mut self, on: bool) {
        #[cfg(feature = "cuda")]
        if let Some(dw) = self.device.as_mut() {
            dw.set_profiling(on);
        }
        let _ = on;
    }

    /// The parts of the last step (gather, pass 1, host m×m work, pass 2), when profiling a
    /// device window; `None` on the CPU.
    pub fn last_profile(&self) -> Option<crate::optim::StepProfile> {
        #[cfg(feature = "cuda")]
        if let Some(dw) = &self.device {
            return dw.last_profile();
        }
        None
    }

    /// Median device time (ms) of one plain read of the whole window, over `reps` reads: half
    /// of the step's floor (a step reads the window twice). `None` on the CPU.
    pub fn window_read_ms(&self, reps: usize) -> Result<Option<f64>> {
        #[cfg(feature = "cuda")]
        if let Some(dw) = &self.device {
            return dw.read_ms(reps.max(1)).map(Some);
        }
        let _ = reps;
        Ok(None)
    }
    /// The m×m Gram matrix K = G Gᵀ (f64, CPU).
    pub fn gram_matrix(&self) -> Result<Tensor> {
        let m = self.cfg.num_grads;
        Ok(Tensor::from_vec(self.gram.gram(), (m, m), &Device::Cpu)?)
    }
    /// Row `slot` of the window, as f64 (what the window stores, in its dtype's precision).
    pub fn window_row(&self, slot: usize) -> Result<Vec<f64>> {
        if slot >= self.cfg.num_grads {
            return Err(Error::InvalidArgument(format!(
                "slot {slot} ≥ num_grads {}",
                self.cfg.num_grads
            )));
        }
        #[cfg(feature = "cuda")]
        if let Some(dw) = &self.device {
            return dw.row(slot);
        }
        Ok(self.window.row(slot, self.d))
    }
    /// c of the last step, from the O(m²) path.
    pub fn coefficients(&self) -> &[f64] {
        &self.last_c
    }
    /// c of the last step solved from scratch (Cholesky of mλI + K): for checks.
    pub fn coefficients_from_scratch(&self) -> Vec<f64> {
        let m = self.cfg.num_grads;
        self.gram.solve_from_scratch((self.ring + m - 1) % m)
    }
    /// How many times the inverse was rebuilt from scratch.
    pub fn refresh_count(&self) -> usize {
        self.gram.refreshes()
    }
    /// How many of those rebuilds the backward-error guard forced (a loss of accuracy in the
    /// O(m²) update, repaired in the same step).
    pub fn repair_count(&self) -> usize {
        self.gram.repairs()
    }
    /// Where the m×m side's time went since the optimizer was made (steps, seconds, rebuilds):
    /// the host's f64 work, on the CPU and with a device window alike.
    pub fn gram_timing(&self) -> GramTiming {
        self.gram.timing()
    }
    /// Bytes held by the window (m × d elements; a device window pads its rows by < 512).
    pub fn window_bytes(&self) -> u128 {
        self.cfg.window_bytes(self.d)
    }
}

impl candle_nn::Optimizer for MFac {
    type Config = MFacConfig;

    fn new(vars: Vec<Var>, cfg: MFacConfig) -> candle_core::Result<Self> {
        MFac::try_new(vars, cfg).map_err(candle_core::Error::wrap)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.try_step(grads)
            .map(|_| ())
            .map_err(candle_core::Error::wrap)
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
}

impl MFac {
    /// Writes the whole state to `path` (a safetensors file, atomically): the window in its
    /// dtype (m × d values: 18 GB for bert-tiny at m = 1024 in f32, half in bf16), the m×m
    /// Gram matrix and its inverse (f64), the slot pointer, the fill level, the step count and
    /// the momentum buffer. [`MFac::load_state`] restores it bit for bit, so a resumed run takes
    /// exactly the steps the uninterrupted one would.
    pub fn save_state(&self, path: &std::path::Path) -> Result<()> {
        use crate::optim::state::StateWriter;
        let (m, d) = (self.cfg.num_grads, self.d);
        let mut w = StateWriter::default();
        // A device window is copied to the host first (m × d, its padding dropped).
        #[cfg(feature = "cuda")]
        let fetched = match &self.device {
            Some(dw) => Some((dw.to_host()?, dw.momentum_to_host()?)),
            None => None,
        };
        #[cfg(feature = "cuda")]
        let (window, momentum) = match &fetched {
            Some((w, v)) => (w, v.as_ref()),
            None => (&self.window, self.v.as_ref()),
        };
        #[cfg(not(feature = "cuda"))]
        let (window, momentum) = (&self.window, self.v.as_ref());
        match window {
            HostWindow::F32(v) => w.add("window", v, &[m, d]),
            HostWindow::BF16(v) => w.add("window", v, &[m, d]),
            HostWindow::F64(v) => w.add("window", v, &[m, d]),
        }
        // Full m×m matrices, as the solver's packed triangles unpacked (and B's pending change
        // applied): the file format does not depend on how the solver stores them.
        let (gram, gram_inverse) = (self.gram.gram(), self.gram.inverse());
        w.add("gram", &gram, &[m, m]);
        w.add("gram_inverse", &gram_inverse, &[m, m]);
        w.add("coefficients", &self.last_c, &[]);
        if let Some(v) = momentum {
            w.add("momentum", v, &[]);
        }
        let last = self.last.map(|s| {
            serde_json::json!({"slot": s.slot, "update_norm": s.update_norm, "cosine": s.cosine, "grad_norm": s.grad_norm})
        });
        w.write(
            path,
            &serde_json::json!({
                "optimizer": "mfac",
                "num_grads": m,
                "num_params": d,
                "window_dtype": format!("{:?}", self.cfg.window_dtype),
                "damp": self.cfg.damp,
                "momentum": self.cfg.momentum,
                "ring": self.ring,
                "filled": self.filled,
                "steps": self.steps,
                "since_refresh": self.gram.since_refresh(),
                "refreshes": self.gram.refreshes(),
                "last": last,
            }),
        )
    }

    /// Restores a state written by [`MFac::save_state`] into an optimizer built with the same
    /// config over the same parameters (the window is read straight into place).
    pub fn load_state(&mut self, path: &std::path::Path) -> Result<()> {
        use crate::optim::state::StateReader;
        let mut r = StateReader::open(path)?;
        let (m, d) = (self.cfg.num_grads, self.d);
        let kind: String = r.scalar("optimizer")?;
        let mine = format!("{:?}", self.cfg.window_dtype);
        let theirs = if kind == "mfac" {
            let (fm, fd): (usize, usize) = (r.scalar("num_grads")?, r.scalar("num_params")?);
            let fdt: String = r.scalar("window_dtype")?;
            (fm, fd, fdt)
        } else {
            (0, 0, String::new())
        };
        if theirs != (m, d, mine.clone()) {
            let (fm, fd, fdt) = theirs;
            return Err(Error::InvalidArgument(format!(
                "{}: this checkpoint's optimizer ({kind}, num_grads {fm}, {fd} parameters, window {fdt}) does not match the run's (mfac, num_grads {m}, {d} parameters, window {mine}); resume with the same optimizer settings and model",
                path.display()
            )));
        }
        #[cfg(feature = "cuda")]
        if let Some(dw) = self.device.as_mut() {
            // Into a host copy (m × d), then onto the device; the momentum likewise.
            let mut host = HostWindow::try_zeros(self.cfg.window_dtype, m, d).ok_or_else(|| {
                Error::OutOfMemory {
                    what: "a host copy of the M-FAC window (resuming)".into(),
                    needed: human(self.cfg.window_bytes(d)),
                    available: "less (the allocation failed)".into(),
                    fix: "free host memory".into(),
                }
            })?;
            match &mut host {
                HostWindow::F32(v) => r.read_into("window", v)?,
                HostWindow::BF16(v) => r.read_into("window", v)?,
                HostWindow::F64(v) => r.read_into("window", v)?,
            }
            dw.load_host(host)?;
            match (self.cfg.momentum > 0.0, r.has("momentum")) {
                (true, true) => {
                    let mut v = vec![0.0; d];
                    r.read_into("momentum", &mut v)?;
                    dw.momentum_from_host(&v)?;
                }
                (false, false) => {}
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: the checkpoint's momentum setting differs from the run's ({})",
                        path.display(),
                        self.cfg.momentum
                    )))
                }
            }
        }
        #[cfg(feature = "cuda")]
        let on_host = self.device.is_none();
        #[cfg(not(feature = "cuda"))]
        let on_host = true;
        if on_host {
            match &mut self.window {
                HostWindow::F32(v) => r.read_into("window", v)?,
                HostWindow::BF16(v) => r.read_into("window", v)?,
                HostWindow::F64(v) => r.read_into("window", v)?,
            }
        }
        let (mut k, mut inv) = (vec![0.0; m * m], vec![0.0; m * m]);
        r.read_into("gram", &mut k)?;
        r.read_into("gram_inverse", &mut inv)?;
        r.read_into("coefficients", &mut self.last_c)?;
        match (&mut self.v, r.has("momentum")) {
            (Some(v), true) => r.read_into("momentum", v)?,
            (None, false) => {}
            // A device window's momentum was read above.
            (None, true) if !on_host => {}
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{}: the checkpoint's momentum setting differs from the run's ({})",
                    path.display(),
                    self.cfg.momentum
                )))
            }
        }
        self.ring = r.scalar("ring")?;
        self.filled = r.scalar("filled")?;
        self.steps = r.scalar("steps")?;
        self.gram
            .restore(&k, &inv, r.scalar("since_refresh")?, r.scalar("refreshes")?);
        let last: Option<serde_json::Value> = r.scalar("last")?;
        self.last = match last {
            Some(l) => Some(MFacStep {
                slot: serde_json::from_value(l["slot"].clone())?,
                update_norm: serde_json::from_value(l["update_norm"].clone())?,
                cosine: serde_json::from_value(l["cosine"].clone())?,
                grad_norm: serde_json::from_value(l["grad_norm"].clone())?,
            }),
            None => None,
        };
        if self.ring >= m || self.filled > m {
            return Err(Error::InvalidArgument(format!(
                "{}: slot pointer {} / fill level {} out of range for num_grads {m}",
                path.display(),
                self.ring,
                self.filled
            )));
        }
        Ok(())
    }
}
