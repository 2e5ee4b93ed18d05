// M-FAC's window on the GPU: the kernels of one step (see src/optim/mfac/window/device/mod.rs).
//
// Layout: the window G is m rows of `ld` elements (ld = d rounded up to a multiple of 512, the
// padding is zero and stays zero), so every row starts 16-byte aligned and every 16-byte load is
// aligned. The columns [0, ld) are cut into units of W columns (one 16-byte vector per lane, U
// vectors per lane, 32 lanes: W = 32·VEC·U); block b of the grid owns the units
// [b·n/B, (b+1)·n/B): a static, even split over a grid that is resident at once, so no block
// waits for a second wave. Inside a block the 8 warps split the rows (warp w: rows w, w+8, ...).
//
// One step:
//   gather   g = grads (+ wd·w) → scratch row (window dtype), non-finite flag; nothing else
//            is written, so the host reads the flag before anything changes.
//   pass 1   one read of G: the owner warp writes g into row j, and every warp adds
//            ⟨G_i, g⟩ over the block's columns (f64 sums; bf16 windows sum each lane's 16
//            products in f32 first); per-block partial sums → `partial[b·rows + i]`.
//   reduce   K's row j: out[i] = Σ_b partial[b·rows + i] in block order (deterministic).
//   pass 2   one read of G: u = scale·Σ_i c_i G_i per column (f64), then for each column:
//            momentum, w −= lr·dir written into the parameter tensors in place, and the block's
//            share of ‖dir‖² and ⟨dir, g⟩.
//   floor    one plain read of a buffer (the benchmark's floor).
#include "common.cuh"

#define THREADS 256
#define WARPS (THREADS / 32)
// Two blocks of 256 threads per SM: up to 128 registers per thread, no spills (nvcc
// --resource-usage: pass 1 72–108, pass 2 109–113 registers).
#define ROWS_AT_ONCE 4

// ---- element types ---------------------------------------------------------------------------

// Window element traits: VEC elements per 16-byte vector, U vectors per lane per unit, the
// per-lane sum type X of pass 1, and the unpacking of a vector.
template <typename T> struct Win;

template <> struct Win<float> {
  static constexpr int VEC = 4, U = 2;
  typedef double X;
  __device__ static inline void load(const float* p, X (&x)[VEC]) {
    float4 v = __ldcs(reinterpret_cast<const float4*>(p));
    x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
  }
  __device__ static inline void loadf(const float* p, float (&x)[VEC]) {
    float4 v = __ldcs(reinterpret_cast<const float4*>(p));
    x[0] = v.x; x[1] = v.y; x[2] = v.z; x[3] = v.w;
  }
  __device__ static inline double to_double(float v) { return (double)v; }
  __device__ static inline float from_double(double v) { return (float)v; }
};

template <> struct Win<double> {
  static constexpr int VEC = 2, U = 4;
  typedef double X;
  __device__ static inline void load(const double* p, X (&x)[VEC]) {
    double2 v = __ldcs(reinterpret_cast<const double2*>(p));
    x[0] = v.x; x[1] = v.y;
  }
  __device__ static inline double to_double(double v) { return v; }
  __device__ static inline double from_double(double v) { return v; }
};

template <> struct Win<bf16> {
  static constexpr int VEC = 8, U = 2;
  typedef float X;
  __device__ static inline void load(const bf16* p, X (&x)[VEC]) {
    uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      // bf16 → f32 is the upper half of the f32 bit pattern.
      x[2 * e] = __uint_as_float(w[e] << 16);
      x[2 * e + 1] = __uint_as_float(w[e] & 0xffff0000u);
    }
  }
  __device__ static inline double to_double(bf16 v) { return (double)__bfloat162float(v); }
  __device__ static inline bf16 from_double(double v) { return __double2bfloat16(v); }
};

// ---- helpers (the parameter types, find_param and warp_sum are in common.cuh) ---------------

// The block's units [u0, u1) of `units`.
__device__ inline void my_units(i64 units, i64* u0, i64* u1) {
  *u0 = units * (i64)blockIdx.x / (i64)gridDim.x;
  *u1 = units * (i64)(blockIdx.x + 1) / (i64)gridDim.x;
}

// ---- gather ----------------------------------------------------------------------------------

// out[k] = T(grad_k + wd·w_k) for k < d, 0 for d <= k < ld. `flag` receives the smallest index
// of a parameter whose gradient (or, with wd > 0, whose weight) holds NaN or ±inf (it starts
// at INT_MAX).
template <typename P, typename T>
__device__ void gather(const u64* __restrict__ table, int n, i64 d, i64 ld, double wd,
                       T* __restrict__ out, int* __restrict__ flag) {
  const i64 stride = (i64)gridDim.x * blockDim.x;
  for (i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x; k < ld; k += stride) {
    if (k >= d) {
      out[k] = Win<T>::from_double(0.0);
      continue;
    }
    const int p = find_param(table, n, k);
    const i64 i = k - (i64)__ldg(table + p);
    const void* gp = (const void*)__ldg(table + n + 1 + p);
    double x = gp ? Par<P>::get(gp, i) : 0.0;
    if (!isfinite(x)) atomicMin(flag, p);
    if (wd > 0.0) {
      // Coupled weight decay puts wd·w into the window: a non-finite weight is flagged too.
      const void* wp = (const void*)__ldg(table + 2 * n + 1 + p);
      const double w = Par<P>::get(wp, i);
      if (!isfinite(w)) atomicMin(flag, p);
      x = x + wd * w;
    }
    out[k] = Win<T>::from_double(x);
  }
}

// ---- the passes' row loads --------------------------------------------------------------------

// Loads this lane's vectors of the unit at column `col` from ROWS_AT_ONCE rows of G (rows i0,
// i0 + WARPS, …: the warp's next rows) into x; rows at or past `rows` read as zero. Both passes
// stream G through this (the streaming, non-caching `__ldcs` of Win<T>::load).
template <typename T>
__device__ __forceinline__ void load_rows(const T* G, i64 ld, int rows, int i0, i64 col, int lane,
                                          typename Win<T>::X (&x)[ROWS_AT_ONCE][Win<T>::U][Win<T>::VEC]) {
  typedef Win<T> Wt;
#pragma unroll
  for (int r = 0; r < ROWS_AT_ONCE; ++r) {
    const int i = i0 + r * WARPS;
#pragma unroll
    for (int q = 0; q < Wt::U; ++q) {
      if (i < rows) {
        Wt::load(G + (i64)i * ld + col + (i64)(q * 32 + lane) * Wt::VEC, x[r][q]);
      } else {
#pragma unroll
        for (int v = 0; v < Wt::VEC; ++v) x[r][q][v] = (typename Wt::X)0;
      }
    }
  }
}

// ---- pass 1: write row j, partial Gram row ---------------------------------------------------

template <typename T>
__device__ void pass1(const T* __restrict__ g, T* G, i64 ld, int rows, int j,
                      double* __restrict__ partial) {
  typedef Win<T> Wt;
  typedef typename Wt::X X;
  constexpr int VEC = Wt::VEC, U = Wt::U, W = 32 * VEC * U, R = ROWS_AT_ONCE;
  extern __shared__ double acc[];  // rows
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < rows; i += blockDim.x) acc[i] = 0.0;
  __syncthreads();
  i64 u0, u1;
  my_units(ld / W, &u0, &u1);
  for (i64 un = u0; un < u1; ++un) {
    const i64 col = un * W;
    X gv[U][VEC];
#pragma unroll
    for (int q = 0; q < U; ++q) {
      const i64 c = col + (i64)(q * 32 + lane) * VEC;
      // The scratch row is read with the ordinary (cached) path: it is small and reused.
      const uint4 raw = *reinterpret_cast<const uint4*>(g + c);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int v = 0; v < VEC; ++v) gv[q][v] = (X)Wt::to_double(e[v]);
      if (warp == j % WARPS) *reinterpret_cast<uint4*>(G + (i64)j * ld + c) = raw;
    }
    // Row j is read back below only by the warp (and lanes) that just wrote it: program order.
    for (int i0 = warp; i0 < rows; i0 += WARPS * R) {
      X s[R];
      X x[R][U][VEC];
      load_rows<T>(G, ld, rows, i0, col, lane, x);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s[r] = (X)0;
#pragma unroll
        for (int q = 0; q < U; ++q)
#pragma unroll
          for (int v = 0; v < VEC; ++v) s[r] = fma(x[r][q][v], gv[q][v], s[r]);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const double t = warp_sum((double)s[r]);
        const int i = i0 + r * WARPS;
        if (lane == 0 && i < rows) acc[i] += t;
      }
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < rows; i += blockDim.x)
    partial[(i64)blockIdx.x * rows + i] = acc[i];
}

// ---- pass 2: u = scale·Gᵀc, momentum, update, sums ------------------------------------------

template <typename T, typename P>
__device__ void pass2(const T* __restrict__ G, i64 ld, int rows, const double* __restrict__ c,
                      double scale, const T* __restrict__ g, i64 d, const u64* __restrict__ table,
                      int n, double* __restrict__ v, double beta, double lr,
                      double* __restrict__ u_out, double* __restrict__ sums) {
  typedef Win<T> Wt;
  constexpr int VEC = Wt::VEC, U = Wt::U, W = 32 * VEC * U, R = ROWS_AT_ONCE;
  extern __shared__ double sm[];
  double* cs = sm;            // rows
  double* red = sm + rows;    // WARPS × W
  __shared__ double bsum[2][WARPS];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int i = threadIdx.x; i < rows; i += blockDim.x) cs[i] = c[i];
  __syncthreads();
  double dd = 0.0, dg = 0.0;
  i64 u0, u1;
  my_units(ld / W, &u0, &u1);
  for (i64 un = u0; un < u1; ++un) {
    const i64 col = un * W;
    double acc[U][VEC];
#pragma unroll
    for (int q = 0; q < U; ++q)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[q][e] = 0.0;
    for (int i0 = warp; i0 < rows; i0 += WARPS * R) {
      typename Wt::X x[R][U][VEC];
      load_rows<T>(G, ld, rows, i0, col, lane, x);
      // bf16: the R rows are summed in f32 first (one f32→f64 conversion per R products).
      typename Wt::X t[U][VEC];
#pragma unroll
      for (int q = 0; q < U; ++q)
#pragma unroll
        for (int e = 0; e < VEC; ++e) t[q][e] = 0;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int i = i0 + r * WARPS;
        const typename Wt::X ci = (typename Wt::X)(i < rows ? cs[i] : 0.0);
#pragma unroll
        for (int q = 0; q < U; ++q)
#pragma unroll
          for (int e = 0; e < VEC; ++e) t[q][e] = fma(ci, x[r][q][e], t[q][e]);
      }
#pragma unroll
      for (int q = 0; q < U; ++q)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[q][e] += (double)t[q][e];
    }
#pragma unroll
    for (int q = 0; q < U; ++q)
#pragma unroll
      for (int e = 0; e < VEC; ++e) red[warp * W + (q * 32 + lane) * VEC + e] = acc[q][e];
    __syncthreads();
    for (int o = threadIdx.x; o < W; o += blockDim.x) {
      const i64 k = col + o;
      if (k >= d) continue;
      double uk = 0.0;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) uk += red[w * W + o];
      uk *= scale;
      if (u_out) u_out[k] = uk;
      double dir = uk;
      if (v) {
        dir = beta * v[k] + (1.0 - beta) * uk;
        v[k] = dir;
      }
      const int p = find_param(table, n, k);
      void* wp = (void*)__ldg(table + 2 * n + 1 + p);
      const i64 i = k - (i64)__ldg(table + p);
      Par<P>::set(wp, i, Par<P>::get(wp, i) - lr * dir);
      dd += dir * dir;
      dg += dir * Wt::to_double(g[k]);
    }
    __syncthreads();
  }
  dd = warp_sum(dd);
  dg = warp_sum(dg);
  if (lane == 0) {
    bsum[0][warp] = dd;
    bsum[1][warp] = dg;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double a = 0.0, b = 0.0;
    for (int w = 0; w < WARPS; ++w) {
      a += bsum[0][w];
      b += bsum[1][w];
    }
    sums[2 * blockIdx.x] = a;
    sums[2 * blockIdx.x + 1] = b;
  }
}

// ---- the floor: one plain read -----------------------------------------------------------------

// Reads n16 16-byte vectors once (the same loads as the passes) and writes one word per block,
// so the reads cannot be optimised away.
__device__ void read_once(const uint4* __restrict__ p, i64 n16, unsigned* __restrict__ out) {
  unsigned x = 0;
  const i64 stride = (i64)gridDim.x * blockDim.x;
  i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  for (; k + 3 * stride < n16; k += 4 * stride) {
    const uint4 a = __ldcs(p + k), b = __ldcs(p + k + stride);
    const uint4 c = __ldcs(p + k + 2 * stride), e = __ldcs(p + k + 3 * stride);
    x ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ e.x ^ e.y ^ e.z ^ e.w;
  }
  for (; k < n16; k += stride) {
    const uint4 a = __ldcs(p + k);
    x ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  for (int o = 16; o > 0; o >>= 1) x ^= __shfl_down_sync(0xffffffffu, x, o);
  if ((threadIdx.x & 31) == 0) atomicXor(out + blockIdx.x, x);
}

// ---- entry points (C names, one per dtype) -----------------------------------------------------

#define GATHER(PN, P, TN, T)                                                                    \
  extern "C" __global__ void __launch_bounds__(THREADS, 2) mfac_gather_##PN##_##TN(               \
      const u64* table, int n, i64 d, i64 ld, double wd, T* out, int* flag) {                  \
    gather<P, T>(table, n, d, ld, wd, out, flag);                                              \
  }
#define PASS2(TN, T, PN, P)                                                                     \
  extern "C" __global__ void __launch_bounds__(THREADS, 2) mfac_pass2_##TN##_##PN(                \
      const T* G, i64 ld, int rows, const double* c, double scale, const T* g, i64 d,          \
      const u64* table, int n, double* v, double beta, double lr, double* u_out,               \
      double* sums) {                                                                          \
    pass2<T, P>(G, ld, rows, c, scale, g, d, table, n, v, beta, lr, u_out, sums);              \
  }
#define PASS1(TN, T)                                                                            \
  extern "C" __global__ void __launch_bounds__(THREADS, 2) mfac_pass1_##TN(                       \
      const T* g, T* G, i64 ld, int rows, int j, double* partial) {                            \
    pass1<T>(g, G, ld, rows, j, partial);                                                      \
  }

GATHER(f32, float, f32, float)
GATHER(f32, float, bf16, bf16)
GATHER(f32, float, f64, double)
GATHER(f64, double, f32, float)
GATHER(f64, double, bf16, bf16)
GATHER(f64, double, f64, double)
GATHER(bf16, bf16, f32, float)
GATHER(bf16, bf16, bf16, bf16)
GATHER(bf16, bf16, f64, double)

PASS1(f32, float)
PASS1(bf16, bf16)
PASS1(f64, double)

PASS2(f32, float, f32, float)
PASS2(f32, float, f64, double)
PASS2(f32, float, bf16, bf16)
PASS2(bf16, bf16, f32, float)
PASS2(bf16, bf16, f64, double)
PASS2(bf16, bf16, bf16, bf16)
PASS2(f64, double, f32, float)
PASS2(f64, double, f64, double)
PASS2(f64, double, bf16, bf16)

// K's row: out[i] = Σ_b partial[b·rows + i], b in order.
extern "C" __global__ void __launch_bounds__(THREADS, 2) mfac_reduce_rows(
    const double* partial, int blocks, int rows, double* out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= rows) return;
  double s = 0.0;
  for (int b = 0; b < blocks; ++b) s += partial[(i64)b * rows + i];
  out[i] = s;
}

extern "C" __global__ void __launch_bounds__(THREADS, 2) mfac_read_floor(
    const uint4* p, i64 n16, unsigned* out) {
  read_once(p, n16, out);
}
