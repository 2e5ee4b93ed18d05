// The CUDA pass's own kernels (src/model/engine/cuda): what cuBLAS does not do for
// BertForSequenceClassification's forward and backward, f32 throughout, statistics in f64 where
// the CPU pass keeps them in f64 (LayerNorm mean/variance, the loss).
//
// Layout conventions (row-major, as the Rust side allocates them):
//   hidden states [N = B·T, H]; qkv [N, 3H] (Q | K | V, heads side by side);
//   attention scores / probabilities [B, nh, T, T]; intermediate [N, I].
// Dropout: no stored masks. Element i of a dropout site is kept when the 32 high bits of
// mix64(key ^ i·K) are ≥ `threshold` (= round(p·2³²)); a kept value is multiplied by `mult`
// (= f32(1/(1−p))). The backward recomputes the same flags from the same (key, i).
// Compiled by build.rs (with the `cuda` feature) into pass.fatbin: sm_90a SASS + compute_90 PTX.

#include <stdint.h>
#include <float.h>

struct DropSite {
    unsigned long long key;
    unsigned int threshold;  // 0: identity (no dropout at this site)
    float mult;
};

__device__ __forceinline__ unsigned long long mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// The dropout multiplier of element i: 0 or mult (1 when the site is off).
__device__ __forceinline__ float drop_mult(const DropSite& d, unsigned long long i) {
    if (d.threshold == 0u) return 1.0f;
    unsigned int u = (unsigned int)(mix64(d.key ^ (i * 0xD1B54A32D192ED03ull)) >> 32);
    return u >= d.threshold ? d.mult : 0.0f;
}

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_sum_f(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max_f(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// ---- LayerNorm's row statistics ---------------------------------------------------------------
// One warp's row yr[0, h) whose lane sums are s: the mean over the row, then the inverse standard
// deviation 1/sqrt(var + eps) with the biased variance (two passes over the row, in f64, as the
// CPU pass); lane 0 stores it in *inv (f32: what the backward reads). Returns (mean, inv std).
__device__ __forceinline__ double2 ln_row_stats(const float* yr, double s, int h, float eps,
                                                int lane, float* inv) {
    double mean = warp_sum_d(s) / h;
    double v = 0.0;
    for (int c = lane; c < h; c += 32) { double dlt = yr[c] - mean; v += dlt * dlt; }
    double var = warp_sum_d(v) / h;
    double is = 1.0 / sqrt(var + (double)eps);
    if (lane == 0) *inv = (float)is;
    return make_double2(mean, is);
}

// ---- BertEmbeddings: word[id] + position[t] + token_type[type] → LayerNorm → dropout ----------
// One warp per token row. Ids out of range set a bit of *flag (1: word, 2: type) and read row 0,
// so a bad id is an error on the host, never a device fault.
extern "C" __global__ void embed_ln_fwd(
    const uint32_t* __restrict__ ids, const uint32_t* __restrict__ types,
    const float* __restrict__ word, const float* __restrict__ pos, const float* __restrict__ typ,
    const float* __restrict__ lw, const float* __restrict__ lb,
    float* __restrict__ y, float* __restrict__ xhat, float* __restrict__ inv,
    int n, int t, int h, int vocab, int ntype, float eps, DropSite d_out, int* flag) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= n) return;
    uint32_t id = ids[warp], ty = types[warp];
    if (id >= (uint32_t)vocab) { if (lane == 0) atomicOr(flag, 1); id = 0; }
    if (ty >= (uint32_t)ntype) { if (lane == 0) atomicOr(flag, 2); ty = 0; }
    const float* wr = word + (size_t)id * h;
    const float* pr = pos + (size_t)(warp % t) * h;
    const float* tr = typ + (size_t)ty * h;
    float* yr = y + (size_t)warp * h;
    float* xr = xhat + (size_t)warp * h;
    // The sum in f64, rounded to f32 (the CPU pass's embedding), kept in y for the stats.
    double s = 0.0;
    for (int c = lane; c < h; c += 32) {
        float e = (float)((double)wr[c] + (double)pr[c] + (double)tr[c]);
        yr[c] = e;
        s += e;
    }
    const double2 st = ln_row_stats(yr, s, h, eps, lane, inv + warp);
    const double mean = st.x, is = st.y;
    for (int c = lane; c < h; c += 32) {
        double xh = (yr[c] - mean) * is;
        xr[c] = (float)xh;
        float out = (float)(xh * (double)lw[c] + (double)lb[c]);
        yr[c] = out * drop_mult(d_out, (unsigned long long)warp * h + c);
    }
}

// ---- BertSelfOutput / BertOutput: y = LayerNorm(dropout(a + bias_a) + res) ----------------------
extern "C" __global__ void add_ln_fwd(
    const float* __restrict__ a, const float* __restrict__ bias_a, DropSite d_in,
    const float* __restrict__ res, const float* __restrict__ lw, const float* __restrict__ lb,
    float* __restrict__ y, float* __restrict__ xhat, float* __restrict__ inv,
    int n, int h, float eps) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= n) return;
    size_t base = (size_t)warp * h;
    float* yr = y + base;
    double s = 0.0;
    for (int c = lane; c < h; c += 32) {
        float ai = a[base + c] + bias_a[c];                 // the linear layer's output, in f32
        float r = ai * drop_mult(d_in, base + c) + res[base + c];
        yr[c] = r;
        s += r;
    }
    const double2 st = ln_row_stats(yr, s, h, eps, lane, inv + warp);
    const double mean = st.x, is = st.y;
    for (int c = lane; c < h; c += 32) {
        double xh = (yr[c] - mean) * is;
        xhat[base + c] = (float)xh;
        yr[c] = (float)(xh * (double)lw[c] + (double)lb[c]);
    }
}

// ---- LayerNorm backward, fused with the dropout masks on both sides -----------------------------
// Per row: g = dy ∘ m_out; gw = g ∘ w; dr = inv · (gw − mean(gw) − x̂ · mean(gw ∘ x̂));
// da = dr ∘ m_in. Column partial sums per block (fixed order, no atomics) of g·x̂ (LayerNorm
// weight), g (LayerNorm bias) and da (the bias of the dense layer before it) go to
// part[block][3][h]; ln_cols_finish adds them up. Block: 8 warps, dynamic shared 8·3·h floats.
extern "C" __global__ void ln_bwd(
    const float* __restrict__ dy, DropSite d_out, const float* __restrict__ xhat,
    const float* __restrict__ inv, const float* __restrict__ lw,
    float* __restrict__ dr, DropSite d_in, float* __restrict__ da,
    float* __restrict__ part, int n, int h, int rows_per_block) {
    extern __shared__ float sh[];  // [8 warps][3][h]
    int wib = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* mine = sh + (size_t)wib * 3 * h;
    for (int c = lane; c < 3 * h; c += 32) mine[c] = 0.0f;
    __syncwarp();  // mine[h + c], mine[2h + c] were zeroed by another lane when h % 32 != 0
    int r0 = blockIdx.x * rows_per_block;
    int r1 = min(n, r0 + rows_per_block);
    for (int r = r0 + wib; r < r1; r += 8) {
        size_t base = (size_t)r * h;
        double m1 = 0.0, m2 = 0.0;
        for (int c = lane; c < h; c += 32) {
            float g = dy[base + c] * drop_mult(d_out, base + c);
            double gw = (double)g * lw[c];
            m1 += gw;
            m2 += gw * xhat[base + c];
        }
        m1 = warp_sum_d(m1) / h;
        m2 = warp_sum_d(m2) / h;
        double is = inv[r];
        for (int c = lane; c < h; c += 32) {
            float g = dy[base + c] * drop_mult(d_out, base + c);
            float xh = xhat[base + c];
            double gw = (double)g * lw[c];
            float o = (float)(is * (gw - m1 - (double)xh * m2));
            dr[base + c] = o;
            float oa = o * drop_mult(d_in, base + c);
            if (da) da[base + c] = oa;
            mine[c] += g * xh;
            mine[h + c] += g;
            mine[2 * h + c] += oa;
        }
    }
    __syncthreads();
    float* out = part + (size_t)blockIdx.x * 3 * h;
    for (int c = threadIdx.x; c < 3 * h; c += blockDim.x) {
        float acc = 0.0f;
        for (int w = 0; w < 8; w++) acc += sh[(size_t)w * 3 * h + c];
        out[c] = acc;
    }
}

// Sums ln_bwd's partials over blocks (in f64, block order): dw, db, and the preceding dense
// layer's bias gradient dbias (skipped when null).
extern "C" __global__ void ln_cols_finish(const float* __restrict__ part, int blocks, int h,
                                          float* dw, float* db, float* dbias) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= 3 * h) return;
    double acc = 0.0;
    for (int b = 0; b < blocks; b++) acc += part[(size_t)b * 3 * h + c];
    int which = c / h, col = c % h;
    if (which == 0) dw[col] = (float)acc;
    else if (which == 1) db[col] = (float)acc;
    else if (dbias) dbias[col] = (float)acc;
}

// ---- bias rows: x[r, c] += b[c] ------------------------------------------------------------------
extern "C" __global__ void bias_add(float* __restrict__ x, const float* __restrict__ b,
                                    int n, int cols) {
    size_t total = (size_t)n * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += b[i % cols];
}

// ---- Masked softmax with dropout over attention scores, in place -------------------------------
// One warp per row of [B, nh, T, T]: p = softmax(s · scale + (1 − mask)·(−FLT_MAX)) (HF's
// additive mask), p kept in `s`; the dropped probabilities p ∘ m go to `pd` (when not null).
extern "C" __global__ void softmax_fwd(float* __restrict__ s, float* __restrict__ pd,
                                       const uint32_t* __restrict__ mask, int rows, int t, int nh,
                                       float scale, DropSite d) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= rows) return;
    int b = warp / (nh * t);
    const uint32_t* mk = mask + (size_t)b * t;
    float* row = s + (size_t)warp * t;
    float mx = -INFINITY;
    for (int j = lane; j < t; j += 32) {
        float z = row[j] * scale + (1.0f - (float)mk[j]) * (-FLT_MAX);
        row[j] = z;
        mx = fmaxf(mx, z);
    }
    mx = warp_max_f(mx);
    float sum = 0.0f;
    for (int j = lane; j < t; j += 32) {
        float e = expf(row[j] - mx);
        row[j] = e;
        sum += e;
    }
    float is = 1.0f / warp_sum_f(sum);
    for (int j = lane; j < t; j += 32) {
        float p = row[j] * is;
        row[j] = p;
        if (pd) pd[(size_t)warp * t + j] = p * drop_mult(d, (unsigned long long)warp * t + j);
    }
}

// Backward: in `dp` the gradient of the dropped probabilities; out: dS = scale · p ∘ (g − Σ g·p),
// g = dp ∘ m.
extern "C" __global__ void softmax_bwd(float* __restrict__ dp, const float* __restrict__ p,
                                       int rows, int t, float scale, DropSite d) {
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= rows) return;
    size_t base = (size_t)warp * t;
    float dot = 0.0f;
    for (int j = lane; j < t; j += 32) {
        float g = dp[base + j] * drop_mult(d, base + j);
        dp[base + j] = g;
        dot += g * p[base + j];
    }
    dot = warp_sum_f(dot);
    for (int j = lane; j < t; j += 32) dp[base + j] = scale * p[base + j] * (dp[base + j] - dot);
}

// ---- BertIntermediate's exact GELU, x·Φ(x), Φ(x) = ½(1 + erf(x/√2)) ----------------------------
// f (the product without its bias) gets the bias added and is kept for the backward.
extern "C" __global__ void gelu_fwd(float* __restrict__ f, const float* __restrict__ bias,
                                    float* __restrict__ g, int n, int cols) {
    size_t total = (size_t)n * cols;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        float x = f[i] + bias[i % cols];
        f[i] = x;
        g[i] = x * (0.5f * (1.0f + erff(x * 0.70710678118654752f)));
    }
}

// dF = dG · (Φ(f) + f · φ(f)), in place of dG.
extern "C" __global__ void gelu_bwd(float* __restrict__ dg, const float* __restrict__ f,
                                    size_t total) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        float x = f[i];
        float phi = 0.5f * (1.0f + erff(x * 0.70710678118654752f));
        float dens = 0.39894228040143268f * expf(-0.5f * x * x);
        dg[i] = dg[i] * (phi + x * dens);
    }
}

// ---- BertPooler: tanh(z + b); then the classifier's dropout ----------------------------------------
extern "C" __global__ void pool_fwd(const float* __restrict__ z, const float* __restrict__ bias,
                                    float* __restrict__ pooled, float* __restrict__ head_in,
                                    int n, int h, DropSite d) {
    // Grid-stride: elementwise() caps the grid at 8192 blocks.
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n * h; i += gridDim.x * blockDim.x) {
        float y = tanhf(z[i] + bias[i % h]);
        pooled[i] = y;
        head_in[i] = y * drop_mult(d, (unsigned long long)i);
    }
}

// dz = (dhead ∘ m) · (1 − y²), in place of dhead.
extern "C" __global__ void pool_bwd(float* __restrict__ dh, const float* __restrict__ pooled,
                                    int total, DropSite d) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        double y = pooled[i];
        dh[i] = (float)((double)(dh[i] * drop_mult(d, (unsigned long long)i)) * (1.0 - y * y));
    }
}

// ---- The loss: cross-entropy (mean over the batch) or, for one output and float labels, the
// mean squared error. One block. Adds the head's bias to the logits in place, writes the
// gradient of the mean loss w.r.t. the logits and the bias, and the loss (f64) to out[0].
// A class label out of range sets bit 4 of *flag.
extern "C" __global__ void loss_fwd_bwd(float* __restrict__ logits, const float* __restrict__ bias,
                                        const float* __restrict__ labels,
                                        float* __restrict__ dlogits, float* __restrict__ dbias,
                                        double* out, int* flag, int b, int c, int regression) {
    __shared__ double sums[256];
    double acc = 0.0;
    for (int i = threadIdx.x; i < b; i += blockDim.x) {
        float* z = logits + (size_t)i * c;
        float* dz = dlogits + (size_t)i * c;
        for (int j = 0; j < c; j++) z[j] += bias[j];
        if (regression) {
            double e = (double)z[0] - (double)labels[i];
            acc += e * e;
            dz[0] = (float)(2.0 * e / b);
            continue;
        }
        float lf = labels[i];
        int y = (int)lf;
        if (!(lf >= 0.0f) || y >= c || (float)y != lf) { atomicOr(flag, 4); y = 0; }
        double mx = -INFINITY;
        for (int j = 0; j < c; j++) mx = fmax(mx, (double)z[j]);
        double s = 0.0;
        for (int j = 0; j < c; j++) s += exp((double)z[j] - mx);
        double lse = mx + log(s);
        acc += lse - (double)z[y];
        for (int j = 0; j < c; j++) {
            double p = exp((double)z[j] - lse);
            dz[j] = (float)((p - (j == y ? 1.0 : 0.0)) / b);
        }
    }
    sums[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sums[threadIdx.x] += sums[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = sums[0] / b;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        double g = 0.0;
        for (int i = 0; i < b; i++) g += dlogits[(size_t)i * c + j];
        dbias[j] = (float)g;
    }
}

// ---- BertEmbeddings backward: scatter-add of de into the three tables (the [PAD] row of the word
// table gets nothing, as nn.Embedding(padding_idx)). Atomic adds: the order of the additions
// into one row varies from run to run (f32 rounding only).
extern "C" __global__ void embed_bwd(const float* __restrict__ de, const uint32_t* __restrict__ ids,
                                     const uint32_t* __restrict__ types, float* dword, float* dpos,
                                     float* dtyp, int n, int t, int h, uint32_t pad, int vocab,
                                     int ntype) {
    size_t total = (size_t)n * h;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        int r = (int)(i / h), c = (int)(i % h);
        float g = de[i];
        uint32_t id = ids[r], ty = types[r];
        if (id < (uint32_t)vocab && id != pad) atomicAdd(dword + (size_t)id * h + c, g);
        atomicAdd(dpos + (size_t)(r % t) * h + c, g);
        if (ty < (uint32_t)ntype) atomicAdd(dtyp + (size_t)ty * h + c, g);
    }
}

// ---- Q, K, V weights and biases stacked into one [3H, H] product and [3H] bias -------------------
extern "C" __global__ void qkv_stack(float* __restrict__ w3, float* __restrict__ b3,
                                     const float* __restrict__ wq, const float* __restrict__ wk,
                                     const float* __restrict__ wv, const float* __restrict__ bq,
                                     const float* __restrict__ bk, const float* __restrict__ bv,
                                     int h) {
    size_t hh = (size_t)h * h;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < 3 * hh + 3 * (size_t)h;
         i += (size_t)gridDim.x * blockDim.x) {
        if (i < hh) w3[i] = wq[i];
        else if (i < 2 * hh) w3[i] = wk[i - hh];
        else if (i < 3 * hh) w3[i] = wv[i - 2 * hh];
        else {
            size_t j = i - 3 * hh;
            b3[j] = j < (size_t)h ? bq[j] : (j < 2 * (size_t)h ? bk[j - h] : bv[j - 2 * h]);
        }
    }
}

// ---- Fill with a constant (the ones vector of the column sums) ------------------------------------
extern "C" __global__ void fill_f32(float* __restrict__ x, float v, size_t n) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = v;
}

// ---- Dropout statistics for the GPU check: over n elements of sites a and b, the counts of
// kept[0] a_i kept, kept[1] b_i kept, kept[2] a_i and b_i kept, kept[3] a_i and a_{i+1} kept
// (independence across sites and between neighbours).
__device__ __forceinline__ unsigned long long warp_sum_u(unsigned long long v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

extern "C" __global__ void drop_count(DropSite a, DropSite b, unsigned long long n,
                                      unsigned long long* kept) {
    unsigned long long ka = 0, kb = 0, kab = 0, kaa = 0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        bool x = drop_mult(a, i) != 0.0f, y = drop_mult(b, i) != 0.0f;
        bool z = drop_mult(a, i + 1) != 0.0f;
        ka += x; kb += y; kab += x && y; kaa += x && z;
    }
    ka = warp_sum_u(ka); kb = warp_sum_u(kb); kab = warp_sum_u(kab); kaa = warp_sum_u(kaa);
    if ((threadIdx.x & 31) == 0) {
        atomicAdd(kept, ka); atomicAdd(kept + 1, kb); atomicAdd(kept + 2, kab);
        atomicAdd(kept + 3, kaa);
    }
}

// ---- Global gradient norm, clip and a fused AdamW over the flat gradient buffer ----------------
// sumsq_partial: per block Σ g² in f64 (grid-stride, fixed order per block) → part[block].
extern "C" __global__ void sumsq_partial(const float* __restrict__ g, size_t n,
                                         double* __restrict__ part) {
    __shared__ double sh[256];
    double acc = 0.0;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        double v = g[i];
        acc += v * v;
    }
    sh[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) part[blockIdx.x] = sh[0];
}

// norm_clip: out[0] = ‖g‖ (Σ of the partials in block order), out[1] = the clip factor
// min(1, max_norm / (‖g‖ + 1e-6)) (torch's clip_grad_norm_; 1 when max_norm ≤ 0).
extern "C" __global__ void norm_clip(const double* __restrict__ part, int blocks, double max_norm,
                                     double* out) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double s = 0.0;
    for (int b = 0; b < blocks; b++) s += part[b];
    double norm = sqrt(s);
    double coef = 1.0;
    if (max_norm > 0.0) { coef = max_norm / (norm + 1e-6); if (coef > 1.0) coef = 1.0; }
    out[0] = norm;
    out[1] = coef;
}

// adamw_flat: torch's AdamW on one parameter tensor w (n elements) with its gradient g scaled
// by the clip factor clip[1] (read on the device: no host round trip):
// m ← m + (1−β₁)(g − m); v ← β₂v + (1−β₂)g²; w ← w·decay − step · m / (√v / bc2 + eps).
extern "C" __global__ void adamw_flat(float* __restrict__ w, const float* __restrict__ g,
                                      float* __restrict__ m, float* __restrict__ v, size_t n,
                                      const double* __restrict__ clip, float beta1, float beta2,
                                      float decay, float step, float bc2, float eps) {
    float coef = (float)clip[1];
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        float gi = g[i] * coef;
        float mi = m[i] + (1.0f - beta1) * (gi - m[i]);
        float vi = v[i] * beta2 + (1.0f - beta2) * (gi * gi);
        m[i] = mi;
        v[i] = vi;
        float denom = sqrtf(vi) / bc2 + eps;
        w[i] = w[i] * decay - step * (mi / denom);
    }
}
