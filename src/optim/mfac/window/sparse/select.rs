//! Top-k by magnitude, exact and deterministic: the k entries of largest |x|, ties broken by
//! the lower index, returned as ascending indices. The same set on every thread count and every
//! engine, because the order is total: (|x| descending, index ascending).
//!
//! # Global selection in O(n): a radix select on the magnitude's bits
//! For finite floats (and ∞) the bits of |x| read as an unsigned integer are ordered as |x|
//! (`Magnitude::key`), so the k-th largest key can be found digit by digit from the top: one
//! histogram pass per digit (12 bits first, 16 after) over the entries still undecided (per
//! thread, then added), the digit where the count from the top reaches k, and the entries above
//! it are in. It stops as soon as the undecided bucket is small ([`CANDIDATES`]; for a
//! gradient-like vector after the first digit: the bucket holding the boundary is 1/16 of a
//! binade wide, a few thousand entries of bert-tiny's 4.4 M at 1 %) or the key is exact. One more
//! pass collects, per thread and in index order, the entries above the bucket and the bucket's
//! candidates; the candidates are ordered by (key desc, index asc) and the first `need` of them
//! complete the set. f32: at most three histogram passes; f64: five.
//!
//! # Blocks
//! [`top_k_blocks`]: the block top-k of the maintained package (ISTA's `SparseMFAC`): each full
//! block of `block` entries keeps ⌈block·ρ⌉, the shorter last block ⌈len·ρ⌉; blocks are
//! selected in parallel, each by a plain selection (`select_nth_unstable_by`) when small, by the
//! radix select when large.

use rayon::prelude::*;

use crate::optim::util::threads;

/// Undecided entries the radix select stops at (collected and ordered exactly).
const CANDIDATES: usize = 1 << 16;

/// Below this many entries the plain selection is used (no histogram to clear).
const SMALL: usize = 1 << 15;

/// A float whose magnitude orders like an unsigned integer key.
pub(crate) trait Magnitude: Copy + Send + Sync + 'static {
    /// Bits of the key (the sign bit dropped): 31 for f32, 63 for f64.
    const BITS: u32;
    /// |x| as an integer in the same order (+0 and −0 equal; ∞ above every finite value).
    fn key(self) -> u64;
}

impl Magnitude for f32 {
    const BITS: u32 = 31;
    #[inline(always)]
    fn key(self) -> u64 {
        (self.to_bits() & 0x7fff_ffff) as u64
    }
}

impl Magnitude for f64 {
    const BITS: u32 = 63;
    #[inline(always)]
    fn key(self) -> u64 {
        self.to_bits() & 0x7fff_ffff_ffff_ffff
    }
}

/// Orders candidates: larger key first, then the lower index.
#[inline(always)]
fn before(a: &(u64, u32), b: &(u64, u32)) -> std::cmp::Ordering {
    b.0.cmp(&a.0).then(a.1.cmp(&b.1))
}

/// The `k` entries of `x` of largest magnitude (ties: the lower index), as indices into `x`,
/// ascending. `k` is clamped to `x.len()`.
///
/// `x.len()` must fit in u32 (checked by the caller's config: d < 2³²).
pub(crate) fn top_k<E: Magnitude>(x: &[E], k: usize) -> Vec<u32> {
    let n = x.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    if k == n {
        return (0..n as u32).collect();
    }
    if n <= SMALL {
        return small(x, k);
    }
    radix(x, k)
}

/// Plain selection: (key, index) pairs, `select_nth_unstable_by` in the total order, the first k
/// sorted by index.
fn small<E: Magnitude>(x: &[E], k: usize) -> Vec<u32> {
    let mut pairs: Vec<(u64, u32)> = x
        .iter()
        .enumerate()
        .map(|(i, v)| (v.key(), i as u32))
        .collect();
    if k < pairs.len() {
        pairs.select_nth_unstable_by(k - 1, before);
    }
    let mut out: Vec<u32> = pairs[..k].iter().map(|p| p.1).collect();
    out.sort_unstable();
    out
}

/// The pieces a pass over `n` entries splits into: one per thread, in index order.
fn pieces(n: usize) -> Vec<(usize, usize)> {
    let t = threads();
    let per = n.div_ceil(t).max(1);
    (0..t)
        .map(|i| ((i * per).min(n), ((i + 1) * per).min(n)))
        .filter(|(a, b)| a < b)
        .collect()
}

/// The boundary bucket of a digit's histogram: from the top bucket down, the first where the
/// count reaches `need`. Returns (bucket, entries in the buckets above it, entries in it). The
/// host's radix select and the device window's selection loop both take their digits here.
///
/// `need` ≤ the histogram's total (the caller's invariant); the lowest bucket otherwise.
pub(crate) fn boundary(hist: &[u32], need: usize) -> (usize, usize, usize) {
    let mut above = 0usize;
    for (b, &c) in hist.iter().enumerate().rev() {
        let c = c as usize;
        if above + c >= need {
            return (b, above, c);
        }
        above += c;
    }
    (
        0,
        above - hist.first().map_or(0, |&c| c as usize),
        hist.first().map_or(0, |&c| c as usize),
    )
}

/// One piece's collection: the indices above the boundary bucket, and the bucket's
/// candidates as (key, index), both in index order.
type Piece = (Vec<u32>, Vec<(u64, u32)>);

/// Radix select (module docs).
fn radix<E: Magnitude>(x: &[E], k: usize) -> Vec<u32> {
    let parts = pieces(x.len());
    // Keys whose bits above `shift` equal `prefix` are undecided; `need` of them are still to
    // be kept. Initially every key (its bits above BITS are zero).
    let (mut prefix, mut shift, mut need) = (0u64, E::BITS, k);
    let mut first = true;
    loop {
        // The first digit is 12 bits (the exponent and 4 bits of mantissa for f32): its
        // histogram, kept as 4 interleaved copies so that runs of one bucket do not wait on each
        // other's increments, fits in L1. Later digits (rarely needed) take 16 bits.
        let digit = shift.min(if first { 12 } else { 16 });
        first = false;
        let below = shift - digit;
        let buckets = 1usize << digit;
        let mask = (buckets - 1) as u64;
        let hists: Vec<Vec<u32>> = parts
            .par_iter()
            .map(|&(a, b)| {
                let mut h = vec![0u32; 4 * buckets];
                let xs = &x[a..b];
                let mut quads = xs.chunks_exact(4);
                for q in &mut quads {
                    for (l, v) in q.iter().enumerate() {
                        let key = v.key();
                        if key >> shift == prefix {
                            h[l * buckets + ((key >> below) & mask) as usize] += 1;
                        }
                    }
                }
                for v in quads.remainder() {
                    let key = v.key();
                    if key >> shift == prefix {
                        h[((key >> below) & mask) as usize] += 1;
                    }
                }
                let (h0, rest) = h.split_at_mut(buckets);
                for l in 1..4 {
                    for (a, b) in h0.iter_mut().zip(&rest[(l - 1) * buckets..l * buckets]) {
                        *a += *b;
                    }
                }
                h.truncate(buckets);
                h
            })
            .collect();
        let total: Vec<u32> = (0..buckets)
            .map(|b| hists.iter().map(|h| h[b]).sum())
            .collect();
        let (bucket, above, count) = boundary(&total, need);
        need -= above;
        prefix = (prefix << digit) | bucket as u64;
        shift = below;
        if shift == 0 || count <= CANDIDATES || count == need {
            break;
        }
    }
    // Keys ≥ hi are in; keys in [lo, hi) are the candidates, `need` of which are in.
    let lo = prefix << shift;
    let hi = (prefix + 1) << shift;
    let exact = hi - lo == 1;
    let collected: Vec<Piece> = parts
        .par_iter()
        .map(|&(a, b)| {
            let (mut above, mut cands) = (Vec::new(), Vec::new());
            for (i, v) in x[a..b].iter().enumerate() {
                let key = v.key();
                if key >= hi {
                    above.push((a + i) as u32);
                } else if key >= lo && !(exact && cands.len() >= need) {
                    // With an exact key the candidates are ordered by index alone, so each
                    // piece needs only its first `need`.
                    cands.push((key, (a + i) as u32));
                }
            }
            (above, cands)
        })
        .collect();
    // The need-th candidate in the total order: (key, index) at or before it are in.
    let mut all: Vec<(u64, u32)> = collected.iter().flat_map(|c| c.1.iter().copied()).collect();
    let last = if need == 0 {
        None
    } else {
        all.select_nth_unstable_by(need - 1, before);
        Some(all[need - 1])
    };
    let inside = |c: &(u64, u32)| match last {
        Some(l) => before(c, &l) != std::cmp::Ordering::Greater,
        None => false,
    };
    // Per piece, its kept entries merged in index order; the pieces are in index order.
    let mut out = Vec::with_capacity(k);
    for (above, cands) in &collected {
        let mut chosen = cands.iter().filter(|c| inside(c)).map(|c| c.1).peekable();
        for &i in above {
            while let Some(&c) = chosen.peek() {
                if c < i {
                    out.push(c);
                    chosen.next();
                } else {
                    break;
                }
            }
            out.push(i);
        }
        out.extend(chosen);
    }
    debug_assert_eq!(out.len(), k);
    out
}

/// The block top-k's layout: full blocks of `block` entries, then a shorter last block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Blocks {
    /// Entries per full block (clamped to n).
    pub block: usize,
    /// Kept per full block: ⌈block·ρ⌉.
    pub k_block: usize,
    /// Number of full blocks.
    pub full: usize,
    /// Length of the last, shorter block (0: none).
    pub last: usize,
    /// Kept in the last block: ⌈last·ρ⌉.
    pub k_last: usize,
}

impl Blocks {
    /// The layout over `n` entries with blocks of `block` (clamped to n) at density `rho`. The
    /// ceilings are of f64 products, as the maintained package computes them (so 100·0.07
    /// keeps 8).
    pub fn new(n: usize, block: usize, rho: f64) -> Self {
        let block = block.clamp(1, n.max(1));
        let (full, last) = (n / block, n % block);
        let kept = |len: usize| ((len as f64 * rho).ceil() as usize).min(len);
        Blocks {
            block,
            k_block: kept(block),
            full,
            last,
            k_last: if last > 0 { kept(last) } else { 0 },
        }
    }

    /// Entries kept in all: full·k_block + k_last.
    pub fn kept(&self) -> usize {
        self.full * self.k_block + self.k_last
    }
}

/// The block top-k (module docs) of `x`, as ascending indices into `x`.
pub(crate) fn top_k_blocks<E: Magnitude>(x: &[E], b: &Blocks) -> Vec<u32> {
    let count = b.full + usize::from(b.last > 0);
    let chosen: Vec<Vec<u32>> = (0..count)
        .into_par_iter()
        .map(|i| {
            let start = i * b.block;
            let (len, k) = if i < b.full {
                (b.block, b.k_block)
            } else {
                (b.last, b.k_last)
            };
            let mut s = top_k(&x[start..start + len], k);
            s.iter_mut().for_each(|v| *v += start as u32);
            s
        })
        .collect();
    chosen.concat()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: sort every (key, index) in the total order, take k, sort by index.
    fn by_sorting<E: Magnitude>(x: &[E], k: usize) -> Vec<u32> {
        let mut p: Vec<(u64, u32)> = x
            .iter()
            .enumerate()
            .map(|(i, v)| (v.key(), i as u32))
            .collect();
        p.sort_by(before);
        let mut out: Vec<u32> = p[..k.min(p.len())].iter().map(|p| p.1).collect();
        out.sort_unstable();
        out
    }

    fn lcg(seed: u64) -> impl FnMut() -> f64 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
        }
    }

    #[test]
    fn radix_select_equals_sorting_on_varied_vectors() {
        let mut r = lcg(7);
        let n = 200_003;
        // Gaussian-like values over many binades, some exact zeros, some repeated values.
        let x: Vec<f32> = (0..n)
            .map(|i| match i % 7 {
                0 => 0.0,
                1 => 0.25,
                _ => (r() * r() * 1e3) as f32,
            })
            .collect();
        for k in [1, 2, 17, 1000, 2000, 28_571, 100_000, n - 1, n] {
            assert_eq!(top_k(&x, k), by_sorting(&x, k), "k = {k}");
        }
        let x64: Vec<f64> = (0..n)
            .map(|i| if i % 5 == 0 { -0.5 } else { r() })
            .collect();
        for k in [1, 40_000, 40_001, 150_000] {
            assert_eq!(top_k(&x64, k), by_sorting(&x64, k), "f64, k = {k}");
        }
    }

    #[test]
    fn ties_go_to_the_lower_index_on_every_thread_count() {
        // 300,000 entries of one magnitude (signs alternate) and a few larger ones: the
        // boundary is one exact key with far more ties than CANDIDATES.
        let n = 300_000;
        let mut x: Vec<f32> = (0..n)
            .map(|i| if i % 2 == 0 { 1.5 } else { -1.5 })
            .collect();
        for i in [5, 299_999, 150_000] {
            x[i] = 2.0;
        }
        let k = 70_000;
        let mut want: Vec<u32> = vec![5, 150_000, 299_999];
        want.extend(
            (0..n as u32)
                .filter(|i| ![5, 150_000, 299_999].contains(i))
                .take(k - 3),
        );
        want.sort_unstable();
        for t in [1, 2, 3, 4, 7] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap();
            let got = pool.install(|| top_k(&x, k));
            assert_eq!(got, want, "{t} threads");
            let small = pool.install(|| top_k(&x[..1000], 10));
            assert_eq!(
                small,
                (0..10).collect::<Vec<u32>>(),
                "{t} threads, plain selection"
            );
        }
    }

    #[test]
    fn blocks_follow_the_maintained_packages_arithmetic() {
        // The fixtures' block cases (README): d = 2500, block 1000, ρ 0.05 → 50, 50, 25.
        let b = Blocks::new(2500, 1000, 0.05);
        assert_eq!(
            (b.full, b.k_block, b.last, b.k_last, b.kept()),
            (2, 50, 500, 25, 125)
        );
        // d = 1100, block 256: 4 × 13 + ⌈76·0.05⌉ = 4.
        let b = Blocks::new(1100, 256, 0.05);
        assert_eq!(
            (b.full, b.k_block, b.last, b.k_last, b.kept()),
            (4, 13, 76, 4, 56)
        );
        // ⌈100·0.07⌉ = 8 (the f64 product is 7.000000000000001).
        assert_eq!(Blocks::new(100, 100, 0.07).k_block, 8);
        // A block larger than n is clamped to n: one block.
        let b = Blocks::new(50, 1 << 20, 0.1);
        assert_eq!((b.block, b.full, b.last, b.kept()), (50, 1, 0, 5));
        // Selection per block equals sorting each block.
        let mut r = lcg(3);
        let x: Vec<f64> = (0..1100).map(|_| r()).collect();
        let b = Blocks::new(1100, 256, 0.05);
        let got = top_k_blocks(&x, &b);
        let mut want = vec![];
        for i in 0..5 {
            let (s, len, k) = if i < 4 {
                (i * 256, 256, 13)
            } else {
                (1024, 76, 4)
            };
            want.extend(by_sorting(&x[s..s + len], k).iter().map(|v| v + s as u32));
        }
        assert_eq!(got, want);
    }
}
