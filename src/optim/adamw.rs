//! AdamW with torch's exact update (and HF Trainer's no-decay rule for biases and LayerNorm).

use std::cell::RefCell;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Layout, Tensor, Var};

use crate::error::{Error, Result};
use crate::optim::args::{check, number, option_err};
use crate::optim::label::num;
use crate::optim::seam::{Optim, OptimConfig};
use crate::optim::state::{StateReader, StateWriter};

/// AdamW hyper-parameters. `Default` = HF Trainer's: lr 5e-5, betas (0.9, 0.999), eps 1e-8,
/// weight decay 0 (note: candle-nn's `ParamsAdamW::default()` has weight decay 0.01).
///
/// ```
/// let p = mfac_lab::optim::AdamWConfig { lr: 1e-4, ..Default::default() };
/// assert_eq!(p.weight_decay, 0.0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to `sqrt(v̂)`.
    pub eps: f64,
    /// Decoupled weight decay: `w -= lr · wd · w` before the Adam update.
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// Checks every field (finite, in range); the error names the key.
    ///
    /// ```
    /// let bad = mfac_lab::optim::AdamWConfig { lr: f64::NAN, ..Default::default() };
    /// assert!(bad.validate().unwrap_err().to_string().contains("lr"));
    /// ```
    pub fn validate(&self) -> Result<()> {
        let keys = <Self as OptimConfig>::KEYS;
        check(
            "lr",
            self.lr >= 0.0 && self.lr.is_finite(),
            "must be ≥ 0 and finite",
            keys,
        )?;
        check(
            "beta1",
            (0.0..1.0).contains(&self.beta1),
            "must be in [0, 1)",
            keys,
        )?;
        check(
            "beta2",
            (0.0..1.0).contains(&self.beta2),
            "must be in [0, 1)",
            keys,
        )?;
        check(
            "eps",
            self.eps > 0.0 && self.eps.is_finite(),
            "must be > 0 and finite",
            keys,
        )?;
        check(
            "weight_decay",
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "must be ≥ 0 and finite",
            keys,
        )
    }
}

/// `--optim adamw_torch` (and HF's other AdamW names): `--optim_args` keys `lr`, `beta1`,
/// `beta2`, `eps`, `weight_decay` (HF's `adam_beta1`-style names too).
impl OptimConfig for AdamWConfig {
    const KIND: &'static str = "adamw";
    const NAMES: &'static [&'static str] =
        &["adamw_torch", "adamw_torch_fused", "adamw_hf", "adamw"];
    const KEYS: &'static [&'static str] = &["lr", "beta1", "beta2", "eps", "weight_decay"];

    fn set(&mut self, key: &str, value: &str) -> Result<()> {
        let x = number(key, value, Self::KEYS)?;
        match key {
            "lr" | "learning_rate" => self.lr = x,
            "beta1" | "adam_beta1" => self.beta1 = x,
            "beta2" | "adam_beta2" => self.beta2 = x,
            "eps" | "adam_epsilon" => self.eps = x,
            "weight_decay" => self.weight_decay = x,
            _ => return Err(option_err(key, "unknown key for AdamW", Self::KEYS)),
        }
        Ok(())
    }
    fn validate(&self) -> Result<()> {
        AdamWConfig::validate(self)
    }
    fn lr(&self) -> f64 {
        self.lr
    }
    fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }
    fn set_hf_weight_decay(&mut self, wd: f64) {
        self.weight_decay = wd;
    }
    fn head(&self) -> String {
        "AdamW".into()
    }
    fn fields(&self, full: bool) -> Vec<(&'static str, String)> {
        vec![
            ("lr", num(self.lr, full)),
            ("beta1", num(self.beta1, full)),
            ("beta2", num(self.beta2, full)),
            ("eps", num(self.eps, full)),
            ("weight_decay", num(self.weight_decay, full)),
        ]
    }
    fn build(&self, vars: &[(String, Var)]) -> Result<Box<dyn Optim>> {
        self.validate()?;
        Ok(Box::new(AdamW::new_named(vars, *self)?))
    }
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 5e-5,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Slot {
    var: Var,
    /// First and second moments. On the CPU they live in host buffers of the parameter's dtype
    /// (as torch keeps them) updated by one fused loop ([`AdamWKernel`]); elsewhere they are
    /// tensors updated with tensor ops.
    moments: Moments,
    decay: bool,
    /// The parameter's name (from `new_named`), else its position.
    name: String,
}

enum Moments {
    F32 { m: Vec<f32>, v: Vec<f32> },
    F64 { m: Vec<f64>, v: Vec<f64> },
    Device { m: Tensor, v: Tensor },
}

/// One step's constants: torch's `1 − lr·wd`, `lr / (1 − β₁ᵗ)`, `sqrt(1 − β₂ᵗ)`.
#[derive(Clone, Copy)]
struct Coefs {
    beta1: f64,
    beta2: f64,
    decay: f64,
    step_size: f64,
    bc2_sqrt: f64,
    eps: f64,
}

/// The whole AdamW update of one contiguous CPU parameter, in place: torch's single-tensor
/// formula step by step (`lerp` for m, `addcmul` for v, `addcdiv` for w), in the parameter's
/// dtype, over chunks in parallel.
struct AdamWKernel<'a> {
    moments: RefCell<&'a mut Moments>,
    c: Coefs,
}

/// Defines the update loop for one float type; `$avx` is the same loop compiled for AVX2 + FMA.
macro_rules! adamw_loop {
    ($name:ident, $avx:ident, $t:ty) => {
        #[inline(always)]
        fn $name(w: &mut [$t], g: &[$t], m: &mut [$t], v: &mut [$t], c: Coefs) {
            let (b1, b2) = (c.beta1 as $t, c.beta2 as $t);
            let (w1, w2) = (1.0 - b1, 1.0 - b2);
            let (decay, step, bc2, eps) = (
                c.decay as $t,
                c.step_size as $t,
                c.bc2_sqrt as $t,
                c.eps as $t,
            );
            for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                // torch's lerp with weight < 0.5: m + w·(g − m).
                *m += w1 * (g - *m);
                *v = *v * b2 + w2 * (g * g);
                let denom = v.sqrt() / bc2 + eps;
                *w = *w * decay - step * (*m / denom);
            }
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx(w: &mut [$t], g: &[$t], m: &mut [$t], v: &mut [$t], c: Coefs) {
            $name(w, g, m, v, c)
        }
    };
}

adamw_loop!(adamw_f32, adamw_f32_avx2, f32);
adamw_loop!(adamw_f64, adamw_f64_avx2, f64);

/// Runs an update loop over 16K-element chunks in parallel, with the AVX2 build when possible.
macro_rules! adamw_par {
    ($w:expr, $g:expr, $m:expr, $v:expr, $c:expr, $plain:ident, $avx:ident) => {{
        use rayon::prelude::*;
        const CHUNK: usize = 16384;
        #[cfg(target_arch = "x86_64")]
        let simd = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        $w.par_chunks_mut(CHUNK)
            .zip($g.par_chunks(CHUNK))
            .zip($m.par_chunks_mut(CHUNK))
            .zip($v.par_chunks_mut(CHUNK))
            .for_each(|(((w, g), m), v)| {
                #[cfg(target_arch = "x86_64")]
                if simd {
                    // SAFETY: the CPU has the features the loop is compiled for.
                    return unsafe { $avx(w, g, m, v, $c) };
                }
                $plain(w, g, m, v, $c)
            });
    }};
}

impl candle_core::InplaceOp2 for AdamWKernel<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        src: &CpuStorage,
        src_l: &Layout,
    ) -> candle_core::Result<()> {
        let (Some((a, b)), Some((ga, gb))) =
            (dst_l.contiguous_offsets(), src_l.contiguous_offsets())
        else {
            candle_core::bail!("adamw-update needs contiguous tensors");
        };
        let mut moments = self.moments.borrow_mut();
        let c = self.c;
        match (dst, src, &mut **moments) {
            (CpuStorage::F32(w), CpuStorage::F32(g), Moments::F32 { m, v }) => {
                let (w, g) = (&mut w[a..b], &g[ga..gb]);
                adamw_par!(w, g, m, v, c, adamw_f32, adamw_f32_avx2)
            }
            (CpuStorage::F64(w), CpuStorage::F64(g), Moments::F64 { m, v }) => {
                let (w, g) = (&mut w[a..b], &g[ga..gb]);
                adamw_par!(w, g, m, v, c, adamw_f64, adamw_f64_avx2)
            }
            _ => candle_core::bail!("adamw-update needs f32 or f64 tensors of one dtype"),
        }
        Ok(())
    }
}

/// torch.optim.AdamW: `m, v` with bias correction; `w -= lr·wd·w`, then
/// `w -= (lr / (1 − β₁ᵗ)) · m / (sqrt(v) / sqrt(1 − β₂ᵗ) + eps)`.
/// Parameters without a gradient in a step are left alone (as torch does).
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_nn::Optimizer;
/// use mfac_lab::optim::{AdamW, AdamWConfig};
/// let w = Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
/// let mut opt = AdamW::new(vec![w.clone()], AdamWConfig { lr: 0.1, ..Default::default() })?;
/// let loss = w.as_tensor().sqr()?.sum_all()?;
/// opt.backward_step(&loss)?;
/// // First step moves each weight by lr against the gradient's sign.
/// let v: Vec<f64> = w.as_tensor().to_vec1()?;
/// assert!((v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6);
/// # Ok::<(), candle_core::Error>(())
/// ```
pub struct AdamW {
    slots: Vec<Slot>,
    cfg: AdamWConfig,
    t: u64,
}

impl AdamW {
    /// AdamW over named parameters with HF Trainer's grouping: biases and LayerNorm weights get
    /// no weight decay.
    ///
    /// Non-float variables are skipped (as `new` does), and each name stays with its variable.
    pub fn new_named(vars: &[(String, Var)], cfg: AdamWConfig) -> candle_core::Result<Self> {
        let float: Vec<&(String, Var)> =
            vars.iter().filter(|(_, v)| v.dtype().is_float()).collect();
        let mut opt = <Self as candle_nn::Optimizer>::new(
            float.iter().map(|(_, v)| v.clone()).collect(),
            cfg,
        )?;
        for (slot, (name, _)) in opt.slots.iter_mut().zip(float) {
            slot.decay = !(name.ends_with(".bias") || name.contains("LayerNorm"));
            slot.name = name.clone();
        }
        Ok(opt)
    }

    /// Whether each parameter gets weight decay, with its name, in order (HF's grouping: none
    /// for biases and LayerNorm weights).
    pub fn decay_flags(&self) -> Vec<(String, bool)> {
        self.slots
            .iter()
            .map(|s| (s.name.clone(), s.decay))
            .collect()
    }

    /// Writes the state (step count and both moments of every parameter, in their dtype) to
    /// `path`, a safetensors file, atomically. [`AdamW::load_state`] restores it exactly.
    pub fn save_state(&self, path: &Path) -> Result<()> {
        let mut w = StateWriter::default();
        let mut host: Vec<(String, Vec<f64>)> = vec![];
        for (i, s) in self.slots.iter().enumerate() {
            match &s.moments {
                Moments::F32 { m, v } => {
                    w.add(format!("exp_avg.{i}"), m, &[]);
                    w.add(format!("exp_avg_sq.{i}"), v, &[]);
                }
                Moments::F64 { m, v } => {
                    w.add(format!("exp_avg.{i}"), m, &[]);
                    w.add(format!("exp_avg_sq.{i}"), v, &[]);
                }
                Moments::Device { m, v } => {
                    // Device moments are stored as f64 (exact for f32/f64/bf16 parameters).
                    let f = |t: &Tensor| -> Result<Vec<f64>> {
                        Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?)
                    };
                    host.push((format!("exp_avg.{i}"), f(m)?));
                    host.push((format!("exp_avg_sq.{i}"), f(v)?));
                }
            }
        }
        for (n, v) in &host {
            w.add(n.clone(), v, &[]);
        }
        let names: Vec<&str> = self.slots.iter().map(|s| s.name.as_str()).collect();
        w.write(
            path,
            &serde_json::json!({"optimizer": "adamw", "step": self.t, "names": names}),
        )
    }

    /// Restores a state written by [`AdamW::save_state`] for the same parameters.
    pub fn load_state(&mut self, path: &Path) -> Result<()> {
        let mut r = StateReader::open(path)?;
        let kind: String = r.scalar("optimizer")?;
        let names: Vec<String> = r.scalar("names")?;
        let mine: Vec<&str> = self.slots.iter().map(|s| s.name.as_str()).collect();
        if kind != "adamw" || names != mine {
            return Err(Error::InvalidArgument(format!(
                "{}: this checkpoint's optimizer ({kind}, {} parameters) does not match the run's (adamw, {} parameters); resume with the same optimizer and model",
                path.display(),
                names.len(),
                mine.len()
            )));
        }
        let t: u64 = r.scalar("step")?;
        for (i, s) in self.slots.iter_mut().enumerate() {
            let (mn, vn) = (format!("exp_avg.{i}"), format!("exp_avg_sq.{i}"));
            match &mut s.moments {
                Moments::F32 { m, v } => {
                    r.read_into(&mn, m)?;
                    r.read_into(&vn, v)?;
                }
                Moments::F64 { m, v } => {
                    r.read_into(&mn, m)?;
                    r.read_into(&vn, v)?;
                }
                Moments::Device { m, v } => {
                    let load = |r: &mut StateReader, name: &str, t: &Tensor| -> Result<Tensor> {
                        let mut x = vec![0.0f64; t.elem_count()];
                        r.read_into(name, &mut x)?;
                        Ok(Tensor::from_vec(x, t.shape(), &candle_core::Device::Cpu)?
                            .to_dtype(t.dtype())?
                            .to_device(t.device())?)
                    };
                    *m = load(&mut r, &mn, m)?;
                    *v = load(&mut r, &vn, v)?;
                }
            }
        }
        self.t = t;
        Ok(())
    }

    /// Number of steps taken.
    pub fn step_count(&self) -> u64 {
        self.t
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }
}

impl Optim for AdamW {
    fn kind(&self) -> &'static str {
        <AdamWConfig as OptimConfig>::KIND
    }
    fn label(&self) -> String {
        OptimConfig::label(&self.cfg)
    }
    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }
    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }
    fn try_step(&mut self, grads: &GradStore) -> Result<()> {
        Ok(candle_nn::Optimizer::step(self, grads)?)
    }
    fn save_state(&self, path: &Path) -> Result<()> {
        AdamW::save_state(self, path)
    }
    fn load_state(&mut self, path: &Path) -> Result<()> {
        AdamW::load_state(self, path)
    }
    fn state_bytes(&self) -> u64 {
        self.slots
            .iter()
            .map(|s| match &s.moments {
                Moments::F32 { m, v } => 4 * (m.len() + v.len()) as u64,
                Moments::F64 { m, v } => 8 * (m.len() + v.len()) as u64,
                Moments::Device { m, v } => {
                    let size = m.dtype().size_in_bytes() as u64;
                    size * (m.elem_count() + v.elem_count()) as u64
                }
            })
            .sum()
    }
}

impl candle_nn::Optimizer for AdamW {
    type Config = AdamWConfig;

    fn new(vars: Vec<Var>, cfg: AdamWConfig) -> candle_core::Result<Self> {
        let slots = vars
            .into_iter()
            .filter(|v| v.dtype().is_float())
            .map(|var| {
                let host = var.device().is_cpu() && var.is_contiguous();
                let n = var.elem_count();
                let moments = match var.dtype() {
                    DType::F32 if host => Moments::F32 {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    },
                    DType::F64 if host => Moments::F64 {
                        m: vec![0.0; n],
                        v: vec![0.0; n],
                    },
                    _ => Moments::Device {
                        m: var.zeros_like()?,
                        v: var.zeros_like()?,
                    },
                };
                Ok(Slot {
                    var,
                    moments,
                    decay: true,
                    name: String::new(),
                })
            })
            .collect::<candle_core::Result<Vec<Slot>>>()?;
        let mut slots = slots;
        for (i, s) in slots.iter_mut().enumerate() {
            s.name = format!("param{i}");
        }
        Ok(AdamW { slots, cfg, t: 0 })
    }

    fn learning_rate(&self) -> f64 {
        self.cfg.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.t += 1;
        let AdamWConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let t = self.t as i32;
        let step_size = lr / (1.0 - beta1.powi(t));
        let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let decay_of = |slot: &Slot| {
            if slot.decay && weight_decay != 0.0 {
                1.0 - lr * weight_decay
            } else {
                1.0
            }
        };
        // f32 parameters on a CUDA GPU: one fused launch each (pass.cu's adamw_flat) instead
        // of about ten candle ops; the rest below.
        #[allow(unused_mut)]
        let mut fused = vec![false; self.slots.len()];
        #[cfg(feature = "cuda")]
        {
            use crate::model::engine::cuda::optim::{adamw, fusable, AdamWSlot};
            let mut todo: Vec<AdamWSlot> = Vec::new();
            for (i, slot) in self.slots.iter().enumerate() {
                let (Some(g), Moments::Device { m, v }) =
                    (grads.get(slot.var.as_tensor()), &slot.moments)
                else {
                    continue;
                };
                let w = slot.var.as_tensor();
                // One device per call: the first fused parameter's.
                let here = todo
                    .first()
                    .is_none_or(|f| f.w.device().same_device(w.device()));
                let same = [g, m, v].iter().all(|t| t.device().same_device(w.device()));
                if here && same && [w, g, m, v].iter().all(|t| fusable(t)) {
                    todo.push(AdamWSlot {
                        w,
                        g,
                        m,
                        v,
                        decay: decay_of(slot),
                    });
                    fused[i] = true;
                }
            }
            adamw(&todo, (beta1, beta2, step_size, bc2_sqrt, eps))
                .map_err(candle_core::Error::wrap)?;
        }
        for (slot, _) in self.slots.iter_mut().zip(&fused).filter(|(_, f)| !**f) {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let decay = decay_of(slot);
            match &mut slot.moments {
                Moments::Device { m, v } => {
                    *m = ((&*m * beta1)? + (g * (1.0 - beta1))?)?;
                    *v = ((&*v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
                    let w = (slot.var.as_tensor() * decay)?;
                    let denom = ((v.sqrt()? / bc2_sqrt)? + eps)?;
                    let w = (w - (m.div(&denom)? * step_size)?)?;
                    slot.var.set(&w)?;
                }
                host => {
                    if !g.device().is_cpu() || g.dtype() != slot.var.dtype() {
                        candle_core::bail!(
                            "AdamW: the gradient's device or dtype differs from its parameter's"
                        )
                    }
                    let kernel = AdamWKernel {
                        moments: RefCell::new(host),
                        c: Coefs {
                            beta1,
                            beta2,
                            decay,
                            step_size,
                            bc2_sqrt,
                            eps,
                        },
                    };
                    slot.var
                        .as_tensor()
                        .inplace_op2(&g.contiguous()?, &kernel)?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                lo + (hi - lo) * ((x >> 11) as f64 / (1u64 << 53) as f64)
            })
            .collect()
    }

    /// The portable update loop (what a CPU without AVX2 + FMA runs; never dispatched on CI's
    /// CPUs) against the AVX2 + FMA build of the same loop. FMA fuses `v·β₂ + (1−β₂)·g²` and
    /// `w·decay − step·m/denom`, so the two differ by at most a rounding or two per operation:
    /// 1e-6 relative in f32 (ε ≈ 6e-8), 1e-14 in f64.
    #[test]
    fn portable_loop_equals_the_avx2_loop() {
        let n = 1000;
        let c = Coefs {
            beta1: 0.9,
            beta2: 0.999,
            decay: 1.0 - 1e-3 * 0.01,
            step_size: 1e-3 / (1.0 - 0.9f64.powi(3)),
            bc2_sqrt: (1.0 - 0.999f64.powi(3)).sqrt(),
            eps: 1e-8,
        };
        let (w, g) = (values(n, 1, -1.0, 1.0), values(n, 2, -0.1, 0.1));
        let (m, v) = (values(n, 3, -0.01, 0.01), values(n, 4, 0.0, 1e-4));
        let rel = |a: &[f64], b: &[f64]| {
            let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
            (num / b.iter().map(|y| y * y).sum::<f64>()).sqrt()
        };
        // f64.
        let (mut w1, mut m1, mut v1) = (w.clone(), m.clone(), v.clone());
        adamw_f64(&mut w1, &g, &mut m1, &mut v1, c);
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            let (mut w2, mut m2, mut v2) = (w.clone(), m.clone(), v.clone());
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            unsafe { adamw_f64_avx2(&mut w2, &g, &mut m2, &mut v2, c) };
            assert!(rel(&w1, &w2) < 1e-14 && rel(&m1, &m2) < 1e-14 && rel(&v1, &v2) < 1e-14);
            // f32.
            let f = |x: &[f64]| x.iter().map(|&y| y as f32).collect::<Vec<f32>>();
            let d = |x: &[f32]| x.iter().map(|&y| y as f64).collect::<Vec<f64>>();
            let (g32, mut w3, mut m3, mut v3) = (f(&g), f(&w), f(&m), f(&v));
            let (mut w4, mut m4, mut v4) = (w3.clone(), m3.clone(), v3.clone());
            adamw_f32(&mut w3, &g32, &mut m3, &mut v3, c);
            // SAFETY: as above.
            unsafe { adamw_f32_avx2(&mut w4, &g32, &mut m4, &mut v4, c) };
            assert!(rel(&d(&w3), &d(&w4)) < 1e-6 && rel(&d(&v3), &d(&v4)) < 1e-6);
            assert!(rel(&d(&m3), &d(&m4)) < 1e-6);
        } else {
            eprintln!("no AVX2 + FMA here: only the portable loop runs");
        }
        // Against torch's formula written out in f64: the portable loop is that formula.
        for k in 0..n {
            let mk = m[k] + (1.0 - c.beta1) * (g[k] - m[k]);
            let vk = v[k] * c.beta2 + (1.0 - c.beta2) * g[k] * g[k];
            let wk = w[k] * c.decay - c.step_size * (mk / (vk.sqrt() / c.bc2_sqrt + c.eps));
            assert!((w1[k] - wk).abs() <= 1e-15 * wk.abs().max(1.0));
        }
    }
}
