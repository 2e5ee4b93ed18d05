//! The exact GELU, `x · Φ(x)`, both ways; the forward keeps Φ for the backward.

use rayon::prelude::*;

use crate::model::engine::cpu::buf::Buf;
use crate::model::math::Real;

const CHUNK: usize = 16384;

/// `g = f · Φ(f)`, keeping Φ for the backward.
pub(crate) fn gelu<T: Real>(f: &[T]) -> (Buf<T>, Buf<T>) {
    let mut g = Buf::dirty(f.len());
    let mut phi = Buf::dirty(f.len());
    g.par_chunks_mut(CHUNK)
        .zip(phi.par_chunks_mut(CHUNK))
        .zip(f.par_chunks(CHUNK))
        .for_each(|((gc, pc), fc)| T::gelu_chunk(fc, gc, pc));
    (g, phi)
}

/// `df = dg · (Φ(f) + f · φ(f))`, in place of `dg`.
pub(crate) fn gelu_bwd<T: Real>(dg: &mut [T], f: &[T], phi: &[T]) {
    dg.par_chunks_mut(CHUNK)
        .zip(f.par_chunks(CHUNK))
        .zip(phi.par_chunks(CHUNK))
        .for_each(|((dc, fc), pc)| T::gelu_bwd_chunk(dc, fc, pc));
}
