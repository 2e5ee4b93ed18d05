//! M-FAC's state in a checkpoint: the window in its dtype, K and its inverse, the ring, the
//! momentum; restored bit for bit.

use super::{MFac, MFacStep};
use crate::error::{Error, Result};
use crate::optim::state::{StateReader, StateWriter};

impl MFac {
    /// Writes the whole state to `path` (a safetensors file, atomically): the window in its
    /// dtype (m × d values: 18 GB for bert-tiny at m = 1024 in f32, half in bf16), the m×m
    /// Gram matrix and its inverse (f64), the slot pointer, the fill level, the step count and
    /// the momentum buffer. [`MFac::load_state`] restores it bit for bit, so a resumed run takes
    /// exactly the steps the uninterrupted one would.
    pub fn save_state(&self, path: &std::path::Path) -> Result<()> {
        let (m, d) = (self.cfg.num_grads, self.d);
        let window = self.window_kind();
        self.window.with_arrays(m, d, |w| {
            let mut w: StateWriter<'_> = w;
            // Full m×m matrices, as the solver's packed triangles unpacked (and B's pending
            // change applied): the file format does not depend on how the solver stores them.
            let (gram, gram_inverse) = (self.gram.gram(), self.gram.inverse());
            w.add("gram", &gram, &[m, m]);
            w.add("gram_inverse", &gram_inverse, &[m, m]);
            w.add("coefficients", &self.last_c, &[]);
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
                    "window": window,
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
        })
    }

    /// The window's kind as a checkpoint records it: "dense", or the sparse window's kept
    /// entries per row (a file without it is a dense one, written before the sparse window).
    fn window_kind(&self) -> serde_json::Value {
        match self.window.sparse_sizes() {
            Some((kept, _, _)) => {
                serde_json::json!({"sparse": {"kept": kept, "block_size": self.cfg.block_size}})
            }
            None => serde_json::json!("dense"),
        }
    }

    /// Restores a state written by [`MFac::save_state`] into an optimizer built with the same
    /// config over the same parameters (the window is read straight into place).
    pub fn load_state(&mut self, path: &std::path::Path) -> Result<()> {
        let mut r = StateReader::open(path)?;
        let (m, d) = (self.cfg.num_grads, self.d);
        let kind: String = r.scalar("optimizer")?;
        let mine = (format!("{:?}", self.cfg.window_dtype), self.window_kind());
        let theirs = if kind == "mfac" {
            let (fm, fd): (usize, usize) = (r.scalar("num_grads")?, r.scalar("num_params")?);
            let fdt: String = r.scalar("window_dtype")?;
            let window = r
                .scalars
                .get("window")
                .cloned()
                .unwrap_or_else(|| serde_json::json!("dense"));
            (fm, fd, (fdt, window))
        } else {
            (0, 0, (String::new(), serde_json::Value::Null))
        };
        if theirs != (m, d, mine.clone()) {
            let (fm, fd, (fdt, fw)) = theirs;
            return Err(Error::InvalidArgument(format!(
                "{}: this checkpoint's optimizer ({kind}, num_grads {fm}, {fd} parameters, window {fdt} {fw}) does not match the run's (mfac, num_grads {m}, {d} parameters, window {} {}); resume with the same optimizer settings and model",
                path.display(),
                mine.0,
                mine.1
            )));
        }
        self.window.load(&mut r, &self.cfg, d, path)?;
        let (mut k, mut inv) = (vec![0.0; m * m], vec![0.0; m * m]);
        r.read_into("gram", &mut k)?;
        r.read_into("gram_inverse", &mut inv)?;
        r.read_into("coefficients", &mut self.last_c)?;
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
