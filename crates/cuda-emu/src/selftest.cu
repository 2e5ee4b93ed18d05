// cuda-emu's own test kernels (tests/cuda_emu.rs): correct uses of every emulated primitive,
// and one kernel per diagnostic, each with the mistake it must catch.

// Shuffles and votes: out[k·32 + lane] for each k below.
extern "C" __global__ void st_warp_ops(int* out) {
  const int l = threadIdx.x & 31;
  const int v = 100 + l;
  int* o = out + (threadIdx.x >> 5) * 32 * 9;
  o[0 * 32 + l] = __shfl_sync(0xffffffffu, v, 5);
  o[1 * 32 + l] = __shfl_up_sync(0xffffffffu, v, 3);
  o[2 * 32 + l] = __shfl_down_sync(0xffffffffu, v, 3);
  o[3 * 32 + l] = __shfl_xor_sync(0xffffffffu, v, 6);
  o[4 * 32 + l] = __shfl_down_sync(0xffffffffu, v, 3, 8);
  o[5 * 32 + l] = __shfl_xor_sync(0xffffffffu, v, 9, 8);
  o[6 * 32 + l] = (int)__ballot_sync(0xffffffffu, l % 3 == 0);
  o[7 * 32 + l] = __any_sync(0xffffffffu, l == 31) + 2 * __all_sync(0xffffffffu, l < 31);
  double dv = 0.5 * l;
  o[8 * 32 + l] = (int)(4.0 * __shfl_xor_sync(0xffffffffu, dv, 1));
}

// A block reduction through shared memory with barriers, and atomics across blocks.
extern "C" __global__ void st_block_sum(const int* in, int* block_out, int* total) {
  __shared__ int s[256];
  s[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
  __syncthreads();
  for (int k = blockDim.x / 2; k > 0; k >>= 1) {
    if ((int)threadIdx.x < k) s[threadIdx.x] += s[threadIdx.x + k];
    __syncthreads();
  }
  if (threadIdx.x == 0) block_out[blockIdx.x] = s[0];
  atomicAdd(total, in[blockIdx.x * blockDim.x + threadIdx.x]);
}

extern "C" __global__ void st_divergent_barrier() {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

extern "C" __global__ void st_barrier_after_exit() {
  if (threadIdx.x >= 64) return;
  __syncthreads();
}

extern "C" __global__ void st_shuffle_after_exit(float* out) {
  if ((threadIdx.x & 31) == 5) return;
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

extern "C" __global__ void st_deadlock(float* out) {
  // Half the warp shuffles while the other half waits at the block barrier.
  if ((threadIdx.x & 31) < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
  else __syncthreads();
}

extern "C" __global__ void st_misaligned_vector(const float* p, float* out) {
  const uint4 v = *reinterpret_cast<const uint4*>(p + 1);
  out[threadIdx.x] = __uint_as_float(v.x);
}

extern "C" __global__ void st_misaligned_ldcs(const float* p, float* out) {
  const float4 v = __ldcs(reinterpret_cast<const float4*>(p + 2));
  out[threadIdx.x] = v.x;
}

// Writes one double past `n` doubles of dynamic shared memory (launch with n·8 bytes).
extern "C" __global__ void st_shared_overflow(int n) {
  extern __shared__ double acc[];
  if (threadIdx.x == 0) acc[n] = 1.0;
}

// Reads dynamic shared memory it never wrote: NaN bytes.
extern "C" __global__ void st_shared_uninit(double* out) {
  extern __shared__ double acc[];
  out[threadIdx.x] = acc[threadIdx.x];
}

// Warp 0 zeroes a shared accumulator; every warp adds to it. With `barrier` 0 the barrier
// between the two is missing: round-robin hides it, warp-serial shows it.
extern "C" __global__ void st_zero_then_add(int barrier, double* out) {
  extern __shared__ double acc[];
  if (threadIdx.x < 8) acc[threadIdx.x] = 0.0;
  if (barrier) __syncthreads();
  double v = __shfl_xor_sync(0xffffffffu, 1.0, 1);
  if ((threadIdx.x & 31) == 0) atomicAdd(&acc[threadIdx.x >> 5], v);
  __syncthreads();
  if (threadIdx.x < 8) out[threadIdx.x] = acc[threadIdx.x];
}

// Thread 0 writes, thread 1 reads in the same stretch without a barrier: only an order that
// runs thread 1 first shows the race.
extern "C" __global__ void st_unordered_write_read(int* out) {
  __shared__ int s;
  if (threadIdx.x == 0) s = 0;
  __syncthreads();
  if (threadIdx.x == 0) s = 7;
  if (threadIdx.x == 1) out[0] = s;
}
