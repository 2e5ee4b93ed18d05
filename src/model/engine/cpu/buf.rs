//! Activation buffers recycled between passes.

use crate::model::math::Real;

/// Most buffers a pool keeps (a pass of a 2-layer model uses about 40).
const POOL_MAX: usize = 256;

/// An activation buffer that goes back to its pool when dropped, so the next pass reuses this
/// pass's memory. Fresh allocations of this size come from `mmap`, and each step would fault in
/// and zero every page again (measured: ~10 % of a bert-tiny step in the kernel).
pub(crate) struct Buf<T: Real>(Vec<T>);

impl<T: Real> Buf<T> {
    /// A buffer of `n` zeros.
    pub(crate) fn zeroed(n: usize) -> Self {
        let mut v = Self::take(n);
        v.clear();
        v.resize(n, T::zero());
        Buf(v)
    }

    /// A buffer of `n` initialised but arbitrary values, for outputs written in full.
    pub(crate) fn dirty(n: usize) -> Self {
        let mut v = Self::take(n);
        if v.len() >= n {
            v.truncate(n);
        } else {
            v.resize(n, T::zero());
        }
        Buf(v)
    }

    /// The smallest pooled vector that holds `n` values, or a new one.
    fn take(n: usize) -> Vec<T> {
        if let Ok(mut pool) = T::pool().lock() {
            let best = pool
                .iter()
                .enumerate()
                .filter(|(_, v)| v.capacity() >= n)
                .min_by_key(|(_, v)| v.capacity())
                .map(|(i, _)| i);
            if let Some(i) = best {
                return pool.swap_remove(i);
            }
        }
        Vec::with_capacity(n)
    }
}

impl<T: Real> std::ops::Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: Real> std::ops::DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0
    }
}

impl<T: Real> Drop for Buf<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.capacity() > 0 {
            if let Ok(mut pool) = T::pool().lock() {
                if pool.len() < POOL_MAX {
                    pool.push(v);
                }
            }
        }
    }
}
