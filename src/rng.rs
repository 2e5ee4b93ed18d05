//! Seeded randomness: weight initialisation and dropout masks come from here, never from candle's
//! device RNG (the CPU one cannot be seeded, so runs would not be reproducible).

use candle_core::{DType, Device, Tensor};
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::Result;

/// The position of a [`SeededRng`]: its 256-bit key, stream number and word position.
/// Serialises to JSON as hex strings (a checkpoint's `rng_state.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RngState {
    /// The ChaCha key.
    pub seed: [u8; 32],
    /// The stream number.
    pub stream: u64,
    /// Position in 32-bit words.
    pub word_pos: u128,
}

impl RngState {
    /// As JSON: `{"generator": "chacha8", "key": hex, "stream": n, "word_pos": decimal string}`.
    pub fn to_json(&self) -> serde_json::Value {
        let key: String = self.seed.iter().map(|b| format!("{b:02x}")).collect();
        serde_json::json!({
            "generator": "chacha8",
            "key": key,
            "stream": self.stream,
            "word_pos": self.word_pos.to_string(),
        })
    }

    /// Parses [`RngState::to_json`]'s output.
    pub fn from_json(v: &serde_json::Value) -> Option<Self> {
        if v.get("generator")?.as_str()? != "chacha8" {
            return None;
        }
        let key = v.get("key")?.as_str()?;
        if key.len() != 64 {
            return None;
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(key.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(RngState {
            seed,
            stream: v.get("stream")?.as_u64()?,
            word_pos: v.get("word_pos")?.as_str()?.parse().ok()?,
        })
    }
}

/// A reproducible random stream (ChaCha8) with the draws the models need.
///
/// ```
/// use mfac_lab::rng::SeededRng;
/// let (mut a, mut b) = (SeededRng::new(7), SeededRng::new(7));
/// assert_eq!(a.normal_vec(4, 0.0, 1.0), b.normal_vec(4, 0.0, 1.0));
/// ```
#[derive(Debug, Clone)]
pub struct SeededRng(ChaCha8Rng);

impl SeededRng {
    /// A stream seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SeededRng(ChaCha8Rng::seed_from_u64(seed))
    }

    /// `n` draws from N(mean, std²) (Box–Muller on 53-bit uniforms).
    pub fn normal_vec(&mut self, n: usize, mean: f64, std: f64) -> Vec<f64> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            // u1 in (0, 1] so ln is finite; u2 in [0, 1).
            let u1 = 1.0 - self.0.random::<f64>();
            let u2 = self.0.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = std::f64::consts::TAU * u2;
            out.push(mean + std * r * t.cos());
            out.push(mean + std * r * t.sin());
        }
        out.truncate(n);
        out
    }

    /// A tensor of N(0, std²) draws with the given shape, dtype and device.
    pub fn normal_tensor(
        &mut self,
        shape: &[usize],
        std: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let n = shape.iter().product();
        let v = self.normal_vec(n, 0.0, std);
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)?)
    }

    /// An inverted-dropout mask: each entry is 0 with probability `p`, else `1 / (1 - p)`.
    ///
    /// ```
    /// use candle_core::{DType, Device};
    /// let m = mfac_lab::rng::SeededRng::new(1).dropout_mask(&[1000], 0.5, DType::F64, &Device::Cpu).unwrap();
    /// let v: Vec<f64> = m.to_vec1().unwrap();
    /// assert!(v.iter().all(|&x| x == 0.0 || x == 2.0));
    /// ```
    pub fn dropout_mask(
        &mut self,
        shape: &[usize],
        p: f64,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let keep = self.keep_flags(shape.iter().product(), p);
        let mask = Tensor::from_vec(keep, shape, &Device::Cpu)?
            .to_device(device)?
            .to_dtype(dtype)?;
        Ok(mask.affine(1.0 / (1.0 - p), 0.0)?)
    }

    /// The draws behind [`SeededRng::dropout_mask`]: `n` flags, each 0 with probability `p`
    /// (a uniform u32 below p·2³²), else 1. The same stream, so a mask built from these flags
    /// equals the tensor mask drawn from the same state.
    ///
    /// ```
    /// use mfac_lab::rng::SeededRng;
    /// let f = SeededRng::new(3).keep_flags(1000, 0.1);
    /// let kept = f.iter().filter(|&&k| k == 1).count();
    /// assert!(kept > 850 && kept < 950);
    /// ```
    pub fn keep_flags(&mut self, n: usize, p: f64) -> Vec<u8> {
        use rayon::prelude::*;
        const CHUNK: usize = 65536;
        let threshold = (p * 4_294_967_296.0) as u64;
        // The words are those of n calls of next_u32. ChaCha can seek, so chunks of the stream
        // are generated in parallel, each by a copy of the generator moved to its offset.
        let start = self.0.get_word_pos();
        let mut flags = vec![0u8; n];
        flags
            .par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(i, out)| {
                let mut r = self.0.clone();
                r.set_word_pos(start + (i * CHUNK) as u128);
                // Through a small stack buffer: a heap one this size would be mmap'd afresh
                // per task (page faults on every draw).
                let mut bytes = [0u8; 4096];
                for piece in out.chunks_mut(1024) {
                    let b = &mut bytes[..4 * piece.len()];
                    r.fill_bytes(b);
                    for (f, w) in piece.iter_mut().zip(b.chunks_exact(4)) {
                        *f = (u32::from_le_bytes([w[0], w[1], w[2], w[3]]) as u64 >= threshold)
                            as u8;
                    }
                }
            });
        self.0.set_word_pos(start + n as u128);
        flags
    }

    /// The stream's exact position, to save in a checkpoint and continue later with
    /// [`SeededRng::from_state`].
    ///
    /// ```
    /// use mfac_lab::rng::SeededRng;
    /// let mut a = SeededRng::new(5);
    /// let _ = a.keep_flags(1001, 0.1);
    /// let mut b = SeededRng::from_state(&a.state());
    /// assert_eq!(a.next_u64(), b.next_u64());
    /// ```
    pub fn state(&self) -> RngState {
        RngState {
            seed: self.0.get_seed(),
            stream: self.0.get_stream(),
            word_pos: self.0.get_word_pos(),
        }
    }

    /// A stream continuing exactly where `state` was taken.
    pub fn from_state(state: &RngState) -> Self {
        let mut r = ChaCha8Rng::from_seed(state.seed);
        r.set_stream(state.stream);
        r.set_word_pos(state.word_pos);
        SeededRng(r)
    }

    /// The next raw 64-bit value (to derive sub-seeds).
    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_flags_are_the_next_u32_draws_and_keep_the_stream_in_step() {
        let mut a = SeededRng::new(9);
        let mut b = a.clone();
        let _ = a.next_u64();
        let _ = b.next_u64();
        let mut flags = a.keep_flags(1001, 0.3);
        flags.extend(a.keep_flags(200_003, 0.3));
        let threshold = (0.3 * 4_294_967_296.0) as u64;
        for f in &flags {
            assert_eq!(*f, (b.0.next_u32() as u64 >= threshold) as u8);
        }
        assert_eq!(a.next_u64(), b.next_u64());
    }
}
