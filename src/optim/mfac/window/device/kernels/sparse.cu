// Sparse M-FAC's window on the GPU: the kernels of one step (see
// src/optim/mfac/window/device/sparse.rs). The same step as the host's sparse window
// (src/optim/mfac/window/sparse/), with the same kept set: the k entries of largest |acc|, ties
// to the lower index.
//
// Layout: row r of the window is k (column, value) pairs, the columns u32 and ascending, at
// idx[r·k ..], val[r·k ..]; the error accumulator e and a scratch acc are d elements (f32, or
// f64 for an f64 window); cbuf (d, the window dtype) is zero but for the moment pass 1 scatters
// row j into it; u (d, f64) collects pass 2.
//
// One step:
//   accumulate  acc = e + g (one rounding of the f64 sum), the non-finite flag; e is not written,
//               so the host reads the flag before anything changes
//   hist        one digit (12 bits) of |acc|'s bits over the entries still undecided: the host
//               reads the 4096 counts, takes the bucket where the count from the top reaches the
//               number still needed, and goes on until the bucket is one exact key or is kept
//               whole (f32: ≤ 3 passes, f64: ≤ 6)
//   count       per block of the selection grid: entries above the bucket, and in it
//   scan        (one thread) each block's first output position and how many of its bucket
//               entries it keeps: the first `need` in index order over the blocks
//   compact     each block, in index order (block scans), writes its kept entries into row j
//               (column, value rounded to the window dtype) and leaves acc − stored in acc, which
//               then becomes e (the host swaps the two buffers)
//   scatter     row j into cbuf (pass 1), and the same kernel clears it afterwards
//   gram        one block per row: r_i = Σ v·cbuf[col] (f64), a fixed-order block sum
//   combine     u[col] += c_i·v for every kept entry of the first `rows` rows (f64 atomics: the
//               order of the additions is the hardware's; within 1e-12 of the host's sums)
//   update      u ← scale·u; w ← keep·w − lr·u through the parameter table; ‖u‖² per block
//   row_dot     ⟨u, row j⟩ per block
// No kernel assumes anything of m, k or d beyond k ≤ d < 2³²: any m, any density in (0, 1].
#include "common.cuh"

#define SP_THREADS 256
#define SP_WARPS (SP_THREADS / 32)
// Bits of a histogram digit: 4096 buckets, 16 KiB of shared memory per block.
#define SP_DIGIT 12
#define SP_BUCKETS (1 << SP_DIGIT)

// ---- element types ---------------------------------------------------------------------------

// The accumulator's element (f32 or f64): |x| as an integer key in the same order (sign dropped).
template <typename A> struct Acc;
template <> struct Acc<float> {
  __device__ static inline u64 key(float x) { return (u64)(__float_as_uint(x) & 0x7fffffffu); }
  __device__ static inline float from(double v) { return (float)v; }
};
template <> struct Acc<double> {
  __device__ static inline u64 key(double x) {
    return (u64)__double_as_longlong(x) & 0x7fffffffffffffffull;
  }
  __device__ static inline double from(double v) { return v; }
};

// The window's values (f32, bf16, f64).
template <typename T> struct Val;
template <> struct Val<float> {
  __device__ static inline double to(float v) { return (double)v; }
  __device__ static inline float from(double v) { return (float)v; }
};
template <> struct Val<double> {
  __device__ static inline double to(double v) { return v; }
  __device__ static inline double from(double v) { return v; }
};
template <> struct Val<bf16> {
  __device__ static inline double to(bf16 v) { return (double)__bfloat162float(v); }
  __device__ static inline bf16 from(double v) { return __double2bfloat16(v); }
};

// ---- block-wide helpers ------------------------------------------------------------------------

// The sum of every thread's v, in a fixed order (warps by shuffles, then the warps' sums in
// order by thread 0), returned to thread 0. `shared` holds SP_WARPS doubles.
__device__ inline double block_sum(double v, double* shared) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < SP_WARPS; ++w) s += shared[w];
  __syncthreads();
  return s;
}

// Exclusive prefix sum of every thread's x over the block (threads in order); `*total` gets
// the block's sum. `shared` holds SP_WARPS + 1 ints.
__device__ inline unsigned block_scan(unsigned x, unsigned* shared, unsigned* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned incl = x;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const unsigned y = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += y;
  }
  if (lane == 31) shared[warp] = incl;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned run = 0;
    for (int w = 0; w < SP_WARPS; ++w) {
      const unsigned t = shared[w];
      shared[w] = run;
      run += t;
    }
    shared[SP_WARPS] = run;
  }
  __syncthreads();
  const unsigned out = shared[warp] + incl - x;
  *total = shared[SP_WARPS];
  __syncthreads();
  return out;
}

// This block's entries [a, b) of n, split evenly over the grid.
__device__ inline void my_chunk(i64 n, i64* a, i64* b) {
  const i64 per = (n + gridDim.x - 1) / gridDim.x;
  *a = per * (i64)blockIdx.x;
  *b = *a + per < n ? *a + per : n;
  if (*a > n) *a = n;
}

// ---- accumulate --------------------------------------------------------------------------------

// acc[k] = A(e[k] + grad_k) for k < d; `flag` gets the smallest index of a parameter whose
// gradient holds NaN or ±inf (it starts at INT_MAX). e is only read.
template <typename P, typename A>
__device__ void accumulate(const u64* __restrict__ table, int n, i64 d, const A* __restrict__ e,
                           A* __restrict__ acc, int* __restrict__ flag) {
  const i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x; k < d; k += stride) {
    const int p = find_param(table, n, k);
    const void* gp = (const void*)__ldg(table + n + 1 + p);
    const double g = gp ? Par<P>::get(gp, k - (i64)__ldg(table + p)) : 0.0;
    if (!isfinite(g)) atomicMin(flag, p);
    acc[k] = Acc<A>::from((double)e[k] + g);
  }
}

// ---- the selection ---------------------------------------------------------------------------

// out[(key >> below) & mask] += 1 for every key with key >> shift == prefix (the entries still
// undecided); `bits` ≤ SP_DIGIT. out must start zeroed.
template <typename A>
__device__ void hist(const A* __restrict__ acc, i64 n, int shift, u64 prefix, int below, int bits,
                     unsigned* __restrict__ out) {
  __shared__ unsigned h[SP_BUCKETS];
  const int buckets = 1 << bits;
  for (int b = threadIdx.x; b < buckets; b += blockDim.x) h[b] = 0;
  __syncthreads();
  const u64 mask = (u64)buckets - 1;
  const i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x; k < n; k += stride) {
    const u64 key = Acc<A>::key(acc[k]);
    // shift ≤ 63 (the key has at most 63 bits), so the shift is defined.
    if ((key >> shift) == prefix) atomicAdd(&h[(key >> below) & mask], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < buckets; b += blockDim.x)
    if (h[b]) atomicAdd(&out[b], h[b]);
}

// counts[2b] = entries of block b's chunk with key ≥ hi (kept), counts[2b + 1] = those with
// lo ≤ key < hi (the boundary bucket's).
template <typename A>
__device__ void count(const A* __restrict__ acc, i64 n, u64 lo, u64 hi, unsigned* __restrict__ counts) {
  __shared__ double red[SP_WARPS];
  i64 a, b;
  my_chunk(n, &a, &b);
  unsigned above = 0, cand = 0;
  for (i64 k = a + threadIdx.x; k < b; k += blockDim.x) {
    const u64 key = Acc<A>::key(acc[k]);
    above += key >= hi;
    cand += key >= lo && key < hi;
  }
  const double sa = block_sum((double)above, red);
  const double sc = block_sum((double)cand, red);
  if (threadIdx.x == 0) {
    counts[2 * blockIdx.x] = (unsigned)sa;
    counts[2 * blockIdx.x + 1] = (unsigned)sc;
  }
}

// For each block b of the selection grid: offsets[2b] = its first position in the row (the
// kept entries of the blocks before it), offsets[2b + 1] = how many of its bucket entries it
// keeps: the first `need` of the bucket in index order. One thread.
__device__ void scan(const unsigned* __restrict__ counts, int blocks, unsigned need,
                     unsigned* __restrict__ offsets) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  unsigned pos = 0, cands_before = 0;
  for (int b = 0; b < blocks; ++b) {
    const unsigned above = counts[2 * b], cand = counts[2 * b + 1];
    const unsigned left = need > cands_before ? need - cands_before : 0;
    const unsigned take = cand < left ? cand : left;
    offsets[2 * b] = pos;
    offsets[2 * b + 1] = take;
    pos += above + take;
    cands_before += cand;
  }
}

// Block b writes its kept entries, in index order, at row[offsets[2b] ..]: the columns into
// idx, the values of acc there rounded to T into val, and acc − stored back into acc.
template <typename A, typename T>
__device__ void compact(A* __restrict__ acc, i64 n, u64 lo, u64 hi,
                        const unsigned* __restrict__ offsets, unsigned* __restrict__ idx,
                        T* __restrict__ val) {
  __shared__ unsigned scan_sh[SP_WARPS + 1];
  i64 a, b;
  my_chunk(n, &a, &b);
  const unsigned base = offsets[2 * blockIdx.x], take = offsets[2 * blockIdx.x + 1];
  unsigned written = 0, cands = 0;  // over the tiles before this one (every thread agrees)
  for (i64 t0 = a; t0 < b; t0 += blockDim.x) {
    const i64 k = t0 + threadIdx.x;
    const bool valid = k < b;
    const A x = valid ? acc[k] : (A)0;
    const u64 key = Acc<A>::key(x);
    const bool is_above = valid && key >= hi;
    const bool is_cand = valid && key >= lo && key < hi;
    unsigned cand_total, kept_total;
    const unsigned cand_rank = cands + block_scan(is_cand ? 1u : 0u, scan_sh, &cand_total);
    const bool keep = is_above || (is_cand && cand_rank < take);
    const unsigned pos = written + block_scan(keep ? 1u : 0u, scan_sh, &kept_total);
    if (keep) {
      const T stored = Val<T>::from((double)x);
      idx[base + pos] = (unsigned)k;
      val[base + pos] = stored;
      acc[k] = Acc<A>::from((double)x - Val<T>::to(stored));
    }
    written += kept_total;
    cands += cand_total;
  }
}

// ---- pass 1: K's row ---------------------------------------------------------------------------

// buf[idx[p]] = val[p] for p < k (`clear`: 0 instead), row j into the dense buffer and back.
template <typename T>
__device__ void scatter(const unsigned* __restrict__ idx, const T* __restrict__ val, i64 k,
                        T* __restrict__ buf, int clear) {
  const i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x; p < k; p += stride)
    buf[idx[p]] = clear ? Val<T>::from(0.0) : val[p];
}

// out[i] = Σ_p val[i·k + p]·buf[idx[i·k + p]], one block per row i.
template <typename T>
__device__ void gram(const unsigned* __restrict__ idx, const T* __restrict__ val, i64 k,
                     const T* __restrict__ buf, double* __restrict__ out) {
  __shared__ double red[SP_WARPS];
  const i64 r = (i64)blockIdx.x * k;
  double s = 0.0;
  for (i64 p = threadIdx.x; p < k; p += blockDim.x)
    s += Val<T>::to(val[r + p]) * Val<T>::to(buf[idx[r + p]]);
  s = block_sum(s, red);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// ---- pass 2: u, the update ---------------------------------------------------------------------

// u[idx[i·k + p]] += c_i·val[i·k + p] for the rows i < rows; `per_row` blocks per row, each a
// contiguous share of the row's k entries. u must start zeroed.
template <typename T>
__device__ void combine(const unsigned* __restrict__ idx, const T* __restrict__ val, i64 k,
                        const double* __restrict__ c, int per_row, double* __restrict__ u) {
  const int i = blockIdx.x / per_row, part = blockIdx.x % per_row;
  const i64 a = k * part / per_row, b = k * (part + 1) / per_row, r = (i64)i * k;
  const double ci = c[i];
  for (i64 p = a + threadIdx.x; p < b; p += blockDim.x)
    atomicAdd(&u[idx[r + p]], ci * Val<T>::to(val[r + p]));
}

// For k < d: u[k] ← scale·u[k]; w ← keep·w − lr·u[k] through the parameter table (keep =
// 1 − lr·wd, decoupled weight decay; exactly 1 without); sums[block] = the block's Σ u².
template <typename P>
__device__ void update(double* __restrict__ u, double scale, i64 d, const u64* __restrict__ table,
                       int n, double lr, double keep, double* __restrict__ sums) {
  __shared__ double red[SP_WARPS];
  double uu = 0.0;
  const i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x; k < d; k += stride) {
    const double uk = scale * u[k];
    u[k] = uk;
    const int p = find_param(table, n, k);
    void* wp = (void*)__ldg(table + 2 * n + 1 + p);
    const i64 i = k - (i64)__ldg(table + p);
    Par<P>::set(wp, i, keep * Par<P>::get(wp, i) - lr * uk);
    uu += uk * uk;
  }
  uu = block_sum(uu, red);
  if (threadIdx.x == 0) sums[blockIdx.x] = uu;
}

// out[block] = the block's share of Σ_p u[idx[p]]·val[p] over one row's k entries.
template <typename T>
__device__ void row_dot(const unsigned* __restrict__ idx, const T* __restrict__ val, i64 k,
                        const double* __restrict__ u, double* __restrict__ out) {
  __shared__ double red[SP_WARPS];
  double s = 0.0;
  const i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x; p < k; p += stride)
    s += u[idx[p]] * Val<T>::to(val[p]);
  s = block_sum(s, red);
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// ---- entry points (C names, one per dtype) -----------------------------------------------------

#define LB __launch_bounds__(SP_THREADS)

#define ACCUMULATE(PN, P, AN, A)                                                              \
  extern "C" __global__ void LB spm_accumulate_##PN##_##AN(                                   \
      const u64* table, int n, i64 d, const A* e, A* acc, int* flag) {                        \
    accumulate<P, A>(table, n, d, e, acc, flag);                                              \
  }
#define SELECT(AN, A)                                                                         \
  extern "C" __global__ void LB spm_hist_##AN(const A* acc, i64 n, int shift, u64 prefix,     \
                                              int below, int bits, unsigned* out) {           \
    hist<A>(acc, n, shift, prefix, below, bits, out);                                         \
  }                                                                                           \
  extern "C" __global__ void LB spm_count_##AN(const A* acc, i64 n, u64 lo, u64 hi,           \
                                               unsigned* counts) {                            \
    count<A>(acc, n, lo, hi, counts);                                                         \
  }
#define COMPACT(AN, A, TN, T)                                                                 \
  extern "C" __global__ void LB spm_compact_##AN##_##TN(A* acc, i64 n, u64 lo, u64 hi,        \
                                                        const unsigned* offsets,              \
                                                        unsigned* idx, T* val) {              \
    compact<A, T>(acc, n, lo, hi, offsets, idx, val);                                         \
  }
#define ROWS(TN, T)                                                                           \
  extern "C" __global__ void LB spm_scatter_##TN(const unsigned* idx, const T* val, i64 k,    \
                                                 T* buf, int clear) {                         \
    scatter<T>(idx, val, k, buf, clear);                                                      \
  }                                                                                           \
  extern "C" __global__ void LB spm_gram_##TN(const unsigned* idx, const T* val, i64 k,       \
                                              const T* buf, double* out) {                    \
    gram<T>(idx, val, k, buf, out);                                                           \
  }                                                                                           \
  extern "C" __global__ void LB spm_combine_##TN(const unsigned* idx, const T* val, i64 k,    \
                                                 const double* c, int per_row, double* u) {   \
    combine<T>(idx, val, k, c, per_row, u);                                                   \
  }                                                                                           \
  extern "C" __global__ void LB spm_row_dot_##TN(const unsigned* idx, const T* val, i64 k,    \
                                                 const double* u, double* out) {              \
    row_dot<T>(idx, val, k, u, out);                                                          \
  }
#define UPDATE(PN, P)                                                                         \
  extern "C" __global__ void LB spm_update_##PN(double* u, double scale, i64 d,              \
                                                const u64* table, int n, double lr,           \
                                                double keep, double* sums) {                  \
    update<P>(u, scale, d, table, n, lr, keep, sums);                                         \
  }

ACCUMULATE(f32, float, f32, float)
ACCUMULATE(f64, double, f32, float)
ACCUMULATE(bf16, bf16, f32, float)
ACCUMULATE(f32, float, f64, double)
ACCUMULATE(f64, double, f64, double)
ACCUMULATE(bf16, bf16, f64, double)

SELECT(f32, float)
SELECT(f64, double)

COMPACT(f32, float, f32, float)
COMPACT(f32, float, bf16, bf16)
COMPACT(f64, double, f64, double)

ROWS(f32, float)
ROWS(bf16, bf16)
ROWS(f64, double)

UPDATE(f32, float)
UPDATE(f64, double)
UPDATE(bf16, bf16)

extern "C" __global__ void spm_scan(const unsigned* counts, int blocks, unsigned need,
                                    unsigned* offsets) {
  scan(counts, blocks, need, offsets);
}
