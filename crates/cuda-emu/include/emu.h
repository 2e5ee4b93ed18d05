// cuda-emu: runs our CUDA C kernels on the CPU (tests only). Force-included (`-include emu.h`)
// before each unchanged .cu file; the runtime is src/emu.cpp. See crates/cuda-emu/README.md.
//
// Execution model: one fiber per CUDA thread, the fibers of one block on one OS thread, blocks
// one after another. So `__shared__` is `thread_local` (per block: blocks never overlap on a
// thread), global memory is host memory, and atomics are plain read-modify-writes. Fibers switch
// only at the yield points: __syncthreads, __syncwarp, warp shuffles/votes, atomics.
#pragma once

#include <stdint.h>
#include <string.h>
#include <float.h>
#include <limits.h>
#include <math.h>
#include <cmath>
#include <algorithm>

using std::max;
using std::min;

// ---- keywords ---------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ thread_local

// ---- vector types -----------------------------------------------------------------------------
struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) float2 { float x, y; };
inline double2 make_double2(double x, double y) { return double2{x, y}; }

extern thread_local uint3 emu_threadIdx;
extern thread_local uint3 emu_blockIdx;
extern thread_local dim3 emu_blockDim;
extern thread_local dim3 emu_gridDim;
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim
#define gridDim emu_gridDim
#define warpSize 32

// ---- the runtime (src/emu.cpp) ----------------------------------------------------------------
namespace emu {
// Block barrier: every live thread of the block, all from the same source line.
void syncthreads(const char* file, int line);
// Warp barrier over `mask` (must be every live lane of the warp).
void warp_barrier(unsigned mask, const char* file, int line, const char* what);
// A point where an adversarial schedule may switch to another fiber.
void yield_point();
// This thread's lane (0..31) and the exchange slot of the current warp operation.
int lane();
void exchange_put(uint64_t bits);
uint64_t exchange_get(int src, const char* file, int line, const char* what);
// Records a diagnostic; the launch stops at the next yield point and returns it.
void fail(const char* file, int line, const char* fmt, ...);
void check_aligned(const void* p, unsigned align, const char* file, int line, const char* what);

template <typename T>
inline uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffles move at most 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <typename T>
inline T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}

// mode: 0 idx, 1 up, 2 down, 3 xor (CUDA's __shfl*_sync semantics, `width` a power of two ≤ 32).
template <typename T>
inline T shfl(unsigned mask, T v, int mode, int arg, const char* file, int line, int width = 32) {
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0)
    fail(file, line, "shuffle width %d is not a power of two in [1, 32]", width);
  const int l = lane();
  exchange_put(to_bits(v));
  warp_barrier(mask, file, line, "a warp shuffle");
  const int seg = l & ~(width - 1), in = l & (width - 1);
  int src = l;
  switch (mode) {
    case 0: src = seg + (arg & (width - 1)); break;
    case 1: src = in >= arg ? l - arg : l; break;
    case 2: src = in + arg < width ? l + arg : l; break;
    default: {
      const int s = l ^ arg;
      src = (s & ~(width - 1)) == seg ? s : l;
    }
  }
  return from_bits<T>(exchange_get(src, file, line, "a warp shuffle"));
}

inline void syncwarp(const char* file, int line, unsigned mask = 0xffffffffu) {
  warp_barrier(mask, file, line, "__syncwarp");
}

// kind: 0 ballot, 1 any, 2 all.
unsigned vote(unsigned mask, int pred, int kind, const char* file, int line);

// Atomics: one OS thread runs the whole launch, so a read-modify-write between yield points is
// atomic. Each returns the old value, as CUDA's.
template <typename T, typename F>
inline T atomic_rmw(T* p, F f, const char* file, int line) {
  check_aligned(p, sizeof(T), file, line, "atomic");
  yield_point();
  T old = *p;
  *p = f(old);
  return old;
}

template <typename T>
inline T ld(const T* p, const char* file, int line) {
  check_aligned(p, alignof(T), file, line, "load");
  return *p;
}
}  // namespace emu

#define __syncthreads() ::emu::syncthreads(__FILE__, __LINE__)
#define __syncwarp(...) ::emu::syncwarp(__FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __shfl_sync(m, v, s, ...) ::emu::shfl(m, v, 0, s, __FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __shfl_up_sync(m, v, s, ...) ::emu::shfl(m, v, 1, s, __FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __shfl_down_sync(m, v, s, ...) ::emu::shfl(m, v, 2, s, __FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __shfl_xor_sync(m, v, s, ...) ::emu::shfl(m, v, 3, s, __FILE__, __LINE__ __VA_OPT__(,) __VA_ARGS__)
#define __ballot_sync(m, p) ::emu::vote(m, (p) ? 1 : 0, 0, __FILE__, __LINE__)
#define __any_sync(m, p) ((int)::emu::vote(m, (p) ? 1 : 0, 1, __FILE__, __LINE__))
#define __all_sync(m, p) ((int)::emu::vote(m, (p) ? 1 : 0, 2, __FILE__, __LINE__))
#define __ldg(p) ::emu::ld(p, __FILE__, __LINE__)
#define __ldcs(p) ::emu::ld(p, __FILE__, __LINE__)
#define __ldcg(p) ::emu::ld(p, __FILE__, __LINE__)

#define EMU_RMW(p, expr) ::emu::atomic_rmw(p, [&](auto old) { return (decltype(old))(expr); }, __FILE__, __LINE__)
#define atomicAdd(p, v) EMU_RMW(p, old + (v))
#define atomicSub(p, v) EMU_RMW(p, old - (v))
#define atomicMin(p, v) EMU_RMW(p, ::std::min<decltype(old)>(old, (v)))
#define atomicMax(p, v) EMU_RMW(p, ::std::max<decltype(old)>(old, (v)))
#define atomicOr(p, v) EMU_RMW(p, old | (v))
#define atomicAnd(p, v) EMU_RMW(p, old & (v))
#define atomicXor(p, v) EMU_RMW(p, old ^ (v))
#define atomicExch(p, v) EMU_RMW(p, (v))

// ---- float intrinsics ---------------------------------------------------------------------------
inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
inline double __longlong_as_double(long long u) { double f; memcpy(&f, &u, 8); return f; }
inline long long __double_as_longlong(double f) { long long u; memcpy(&u, &f, 8); return u; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return expf(x); }
using std::isfinite;
using std::isnan;
using std::isinf;

#include "cuda_bf16.h"
