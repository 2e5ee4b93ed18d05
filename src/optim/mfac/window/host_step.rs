//! The host window's side of an M-FAC step: the window in host memory with the d-sized f64
//! vectors of the step (u = F⁻¹g, the momentum), its memory plan, the gradient's way in
//! (checked, then written in place) and the update's way out (pass 2, momentum, w −= lr·dir).

use candle_core::{Tensor, Var};

use super::host::HostWindow;
use super::{Descend, Update};
use crate::error::{Error, Result};
use crate::optim::host::with_cpu_slice;
use crate::optim::mfac::MFacConfig;
use crate::optim::util::{all_finite, available_memory, human, Elem};

/// The window on the host and the vectors of a step.
pub(crate) struct HostStep {
    window: HostWindow,
    d: usize,
    /// Where each parameter starts in the flattened vector (and d at the end).
    offsets: Vec<usize>,
    /// Preconditioned gradient u = F⁻¹g of the last step (d); scratch before pass 2.
    u: Vec<f64>,
    /// Momentum buffer (d), when momentum > 0.
    v: Option<Vec<f64>>,
}

impl HostStep {
    /// Allocates the window after checking that it and the step's state fit in free memory.
    pub fn new(cfg: &MFacConfig, offsets: Vec<usize>) -> Result<Self> {
        let (m, d) = (cfg.num_grads, *offsets.last().unwrap_or(&0));
        let window = cfg.window_bytes(d);
        let needed = cfg.host_bytes(d);
        let fix = refusal_fix(cfg, d);
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
        Ok(HostStep {
            window,
            d,
            offsets,
            u: vec![0.0; d],
            v: (cfg.momentum > 0.0).then(|| vec![0.0; d]),
        })
    }

    /// Writes g (+ wd·w, coupled weight decay) into slot j, in place, after checking every
    /// gradient (and, with weight decay, every weight) is finite: on a non-finite value it
    /// returns [`Error::NonFiniteGradient`] and changes nothing. A missing gradient counts as
    /// zero.
    pub fn write(
        &mut self,
        j: usize,
        vars: &[Var],
        names: &[String],
        gs: &[Option<Tensor>],
        wd: f64,
    ) -> Result<()> {
        let bad = |i: usize| Error::NonFiniteGradient {
            index: i,
            param: names[i].clone(),
        };
        for (i, (var, g)) in vars.iter().zip(gs).enumerate() {
            if let Some(g) = g {
                if !with_cpu_slice!(g, |s| all_finite(s))? {
                    return Err(bad(i));
                }
            }
            // Coupled weight decay writes g + wd·w into the window: a non-finite weight would
            // poison it as a gradient would (the device gather flags the same).
            if wd > 0.0 && !with_cpu_slice!(var.as_tensor(), |s| all_finite(s))? {
                return Err(bad(i));
            }
        }
        let d = self.d;
        for (i, (var, g)) in vars.iter().zip(gs).enumerate() {
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
        Ok(())
    }

    /// Pass 1: row j of K = G·g over the first `rows` rows.
    pub fn gram_row(&self, j: usize, rows: usize) -> Vec<f64> {
        self.window.gram_row(j, rows, self.d)
    }

    /// Pass 2 and the update: u = scale·Gᵀc over the first `rows` rows, the momentum
    /// (v ← β·v + (1 − β)·u when β > 0), w −= lr·dir in place. Returns (‖dir‖², ⟨dir, g_j⟩).
    pub fn update(&mut self, c: &[f64], a: Update, vars: &[Var]) -> Result<(f64, f64)> {
        let Update {
            rows,
            scale,
            j,
            beta,
            lr,
            decay,
        } = a;
        let d = self.d;
        let (uu, ug) = self.window.combine(c, rows, d, scale, j, &mut self.u);
        let (dir, dd, dg): (&[f64], f64, f64) = match &mut self.v {
            Some(v) => {
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
        for (i, var) in vars.iter().enumerate() {
            let (a, b) = (self.offsets[i], self.offsets[i + 1]);
            var.as_tensor().inplace_op1(&Descend {
                dir: &dir[a..b],
                lr,
                keep: 1.0 - decay,
            })?;
        }
        Ok((dd, dg))
    }

    /// u = F⁻¹g of the last step.
    pub fn preconditioned(&self) -> &[f64] {
        &self.u
    }

    /// Row `slot` of the window, as f64.
    pub fn row(&self, slot: usize) -> Vec<f64> {
        self.window.row(slot, self.d)
    }

    /// The window and the momentum buffer, for a checkpoint.
    pub fn state(&self) -> (&HostWindow, Option<&[f64]>) {
        (&self.window, self.v.as_deref())
    }

    /// The window and the momentum buffer, to restore a checkpoint into.
    pub fn state_mut(&mut self) -> (&mut HostWindow, Option<&mut [f64]>) {
        (&mut self.window, self.v.as_deref_mut())
    }
}

/// What to do when the dense window does not fit: fewer gradients, a bf16 window, or the sparse
/// window at 1 % with the same num_grads, each with what it would need.
pub(crate) fn refusal_fix(cfg: &MFacConfig, d: usize) -> String {
    let bf16 = MFacConfig {
        window_dtype: candle_core::DType::BF16,
        ..*cfg
    };
    let sparse = MFacConfig {
        momentum: 0.0,
        ..cfg.with_density(0.01)
    };
    format!(
        "use fewer gradients (num_grads), a bf16 window (window_dtype: bf16; {}) or the sparse window (density: 0.01; {} with the same num_grads)",
        human(bf16.host_bytes(d)),
        human(sparse.host_bytes(d))
    )
}

/// Copies `s` into `out` as f64.
fn to_f64_into<E: Elem>(s: &[E], out: &mut [f64]) {
    for (o, x) in out.iter_mut().zip(s) {
        *o = x.to_f64();
    }
}
