// What mfac.cu (the dense window) and sparse.cu (the sparse window) share: the integer types,
// the parameter element types, the parameter table's lookup and a warp sum. Header-only
// (templates and inline functions), included by both, so each compiles on its own.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

typedef unsigned long long u64;
typedef long long i64;
typedef __nv_bfloat16 bf16;

// Parameter element types (the model's dtype).
template <typename P> struct Par;
template <> struct Par<float> {
  __device__ static inline double get(const void* p, i64 i) { return (double)((const float*)p)[i]; }
  __device__ static inline void set(void* p, i64 i, double v) { ((float*)p)[i] = (float)v; }
};
template <> struct Par<double> {
  __device__ static inline double get(const void* p, i64 i) { return ((const double*)p)[i]; }
  __device__ static inline void set(void* p, i64 i, double v) { ((double*)p)[i] = v; }
};
template <> struct Par<bf16> {
  __device__ static inline double get(const void* p, i64 i) {
    return (double)__bfloat162float(((const bf16*)p)[i]);
  }
  __device__ static inline void set(void* p, i64 i, double v) { ((bf16*)p)[i] = __double2bfloat16(v); }
};

__device__ inline double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// The parameter table: starts[0..=n] (flat offsets, starts[n] = d), then n gradient pointers
// (0 = no gradient: zeros), then n parameter pointers. Returns the p with
// starts[p] <= k < starts[p + 1] (the last such p when parameters are empty).
__device__ inline int find_param(const u64* __restrict__ table, int n, i64 k) {
  int lo = 0, hi = n;
  while (hi - lo > 1) {
    int mid = (lo + hi) >> 1;
    if ((i64)__ldg(table + mid) <= k) lo = mid; else hi = mid;
  }
  return lo;
}
