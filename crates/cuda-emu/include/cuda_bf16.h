// cuda-emu's stand-in for CUDA's <cuda_bf16.h>: __nv_bfloat16 and the conversions our kernels
// use, rounding to nearest even like the GPU's cvt.rn (one rounding, also from f64).
#pragma once
#include <stdint.h>
#include <string.h>
#include <math.h>

struct __nv_bfloat16 {
  unsigned short x;
};

// f32 → bf16, round to nearest even; NaN stays NaN (quiet, sign kept).
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  __nv_bfloat16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    r.x = (unsigned short)((u >> 16) | 0x0040u);
    return r;
  }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.x = (unsigned short)(u >> 16);
  return r;
}

// f64 → bf16 with a single rounding to nearest even (not through f32): CUDA's __double2bfloat16.
inline __nv_bfloat16 __double2bfloat16(double v) {
  uint64_t u;
  memcpy(&u, &v, 8);
  const unsigned short sign = (unsigned short)((u >> 48) & 0x8000u);
  __nv_bfloat16 r;
  if ((u & 0x7fffffffffffffffull) > 0x7ff0000000000000ull) {  // NaN
    r.x = (unsigned short)(sign | 0x7fc0u);
    return r;
  }
  const double a = fabs(v);
  if (a < 0x1p-126) {
    // bf16 subnormals (and zero): multiples of 2^-133; the scaling by 2^133 is exact.
    const double q = nearbyint(a * 0x1p133);  // the default rounding mode: to nearest even
    r.x = (unsigned short)(sign | (unsigned short)q);  // q = 128 is the smallest normal
    return r;
  }
  // Normal: keep 7 of f64's 52 mantissa bits, rounding at bit 45 to nearest even.
  uint64_t m = u & 0x7fffffffffffffffull;
  m += 0xfffffffffffull + ((m >> 45) & 1u);  // 2^44 − 1 + the kept last bit
  const int e = (int)(m >> 52) - 1023;  // after rounding (a carry bumps the exponent)
  if (e > 127) {
    r.x = (unsigned short)(sign | 0x7f80u);
    return r;
  }
  const unsigned mant = (unsigned)((m >> 45) & 0x7fu);
  r.x = (unsigned short)(sign | (unsigned)((e + 127) << 7) | mant);
  return r;
}

inline float __bfloat162float(__nv_bfloat16 b) {
  uint32_t u = (uint32_t)b.x << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
