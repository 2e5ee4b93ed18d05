//! `BertEmbeddings` on the CPU: the sum of the three table rows per token, and the backward's
//! scatter-add into the tables (the `[PAD]` row of the word table gets no gradient, as
//! `nn.Embedding(padding_idx=…)`).

use rayon::prelude::*;

use crate::model::engine::cpu::buf::Buf;
use crate::model::engine::TokenIds;
use crate::model::math::Real;
use crate::model::params::Embeddings;

/// `word[id] + position[pos] + token_type[type]` per token, summed in f64, rows of `h`.
pub(crate) fn embed<T: Real>(e: &Embeddings<&[T]>, ids: &TokenIds, h: usize) -> Buf<T> {
    let (word, pos, typ) = (
        e.word_embeddings,
        e.position_embeddings,
        e.token_type_embeddings,
    );
    let t = ids.seq_len;
    let mut out = Buf::dirty(ids.ids.len() * h);
    out.par_chunks_mut(h).enumerate().for_each(|(r, o)| {
        let (wr, pr, tr) = (
            &word[ids.ids[r] as usize * h..][..h],
            &pos[(r % t) * h..][..h],
            &typ[ids.type_ids[r] as usize * h..][..h],
        );
        for i in 0..h {
            o[i] = T::from_f64(wr[i].to_f64() + pr[i].to_f64() + tr[i].to_f64());
        }
    });
    out
}

/// The gradients of the three tables from the gradient `de` of [`embed`]'s output.
pub(crate) fn embed_bwd<T: Real>(
    de: &[T],
    e: &Embeddings<&[T]>,
    ids: &TokenIds,
    pad: u32,
    h: usize,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut dword = vec![T::zero(); e.word_embeddings.len()];
    let mut dpos = vec![T::zero(); e.position_embeddings.len()];
    let mut dtyp = vec![T::zero(); e.token_type_embeddings.len()];
    let t = ids.seq_len;
    for (r, (&id, &ty)) in ids.ids.iter().zip(&ids.type_ids).enumerate() {
        let g = &de[r * h..][..h];
        let rows: [(&mut Vec<T>, Option<usize>); 3] = [
            (&mut dword, (id != pad).then_some(id as usize)),
            (&mut dpos, Some(r % t)),
            (&mut dtyp, Some(ty as usize)),
        ];
        for (table, row) in rows {
            if let Some(row) = row {
                for (o, v) in table[row * h..][..h].iter_mut().zip(g) {
                    *o += *v;
                }
            }
        }
    }
    (dword, dpos, dtyp)
}
