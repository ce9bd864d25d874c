/* cuda_ops.cu — the small kernels of a layer: RMSNorm and SwiGLU where a matmul does not fuse
 * them (written as float, or straight as the bf16 a tensor-core matmul reads), row gather, the
 * embedding lookup from a resident table, the RoPE table, and q/k-norm + RoPE + KV-cache store
 * fused into one pass over the qkv row.
 *
 * These move a few KB per token, so at decode they cost launch latency, not bandwidth: each is a
 * single launch over all M rows with one block (or one warp) per row, and each follows the
 * programmatic-dependent-launch protocol of cuda_common.cuh so its launch overlaps the previous
 * kernel. Arithmetic is float32 as on the CPU (the reference); sums use a fixed tree order, so
 * results differ from the CPU's serial sums only by rounding. cos/sin of the RoPE angle are taken
 * in double from the float32 angle (as transformers rounds it), because the fast-math float
 * versions lose accuracy at the angles of long contexts. */
#include "backend/cuda/cuda_common.cuh"

namespace {

/* A float result stored as the output's type (bf16 rounds to nearest even). */
CU_DEV void store_as(float *p, float v) { *p = v; }
CU_DEV void store_as(__nv_bfloat16 *p, float v) { *p = __float2bfloat16_rn(v); }

/* T: float, or bf16 when the result only feeds a tensor-core matmul (saves a conversion pass) */
template <class T>
__global__ void rmsnorm_kernel(T *y, const float *x, const float *w, int D, float eps) {
    __shared__ float red[32];
    pdl_trigger();
    /* the norm weight (constant) on its way to L1 before the wait, so that the loads after the
     * sum of squares do not make a second trip to HBM */
    for (int i = threadIdx.x * 32; i < D; i += blockDim.x * 32) asm volatile("prefetch.global.L1 [%0];" ::"l"(w + i));
    pdl_wait();
    const float *xr = x + (size_t)blockIdx.x * D;
    T *yr = y + (size_t)blockIdx.x * D;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) ss = fmaf(xr[i], xr[i], ss);
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x) store_as(yr + i, w[i] * (xr[i] * inv));
}

/* Four consecutive results stored as the output's type, in one store. */
CU_DEV void store4_as(float *p, float4 v) { *reinterpret_cast<float4 *>(p) = v; }
CU_DEV void store4_as(__nv_bfloat16 *p, float4 v) {
    const __nv_bfloat162 lo = __floats2bfloat162_rn(v.x, v.y), hi = __floats2bfloat162_rn(v.z, v.w);
    uint2 u;
    u.x = *reinterpret_cast<const uint32_t *>(&lo), u.y = *reinterpret_cast<const uint32_t *>(&hi);
    *reinterpret_cast<uint2 *>(p) = u;
}

/* The same RMSNorm with a row held in registers, for rows of kNormVec x 4 x blockDim.x floats
 * (the launcher's choice): each thread's float4s are loaded at once, so a row costs one trip to
 * L2 instead of a loop of dependent ones, and the norm weight is in registers before pdl_wait().
 * H200, one step's linears as the model runs them (two RMSNorms per layer, 36 layers), looping
 * kernel -> this one: 8 tokens 2.778 -> 2.652 ms, 32 2.787 -> 2.642, 64 3.475 -> 3.343. */
constexpr int kNormVec = 4;
template <class T>
__global__ void rmsnorm_rows_kernel(T *y, const float *x, const float *w, int D, float eps) {
    __shared__ float red[32];
    pdl_trigger();
    const int stride = 4 * blockDim.x, i0 = 4 * threadIdx.x;
    float4 wv[kNormVec], xv[kNormVec];
#pragma unroll
    for (int j = 0; j < kNormVec; j++) wv[j] = *reinterpret_cast<const float4 *>(w + i0 + j * stride);
    pdl_wait();
    const float *xr = x + (size_t)blockIdx.x * D;
#pragma unroll
    for (int j = 0; j < kNormVec; j++) xv[j] = *reinterpret_cast<const float4 *>(xr + i0 + j * stride);
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < kNormVec; j++)
        ss = fmaf(xv[j].x, xv[j].x, fmaf(xv[j].y, xv[j].y, fmaf(xv[j].z, xv[j].z, fmaf(xv[j].w, xv[j].w, ss))));
    ss = block_sum(ss, red);
    const float inv = 1.0f / sqrtf(ss / (float)D + eps);
    T *yr = y + (size_t)blockIdx.x * D;
#pragma unroll
    for (int j = 0; j < kNormVec; j++)
        store4_as(yr + i0 + j * stride, make_float4(wv[j].x * (xv[j].x * inv), wv[j].y * (xv[j].y * inv),
                                                    wv[j].z * (xv[j].z * inv), wv[j].w * (xv[j].w * inv)));
}

template <class T>
__global__ void swiglu_kernel(T *h, const float *gu, int M, int I) {
    pdl_trigger();
    pdl_wait();
    const size_t n = (size_t)M * I;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const size_t m = i / I, j = i % I;
        const float g = gu[m * 2 * I + j], u = gu[m * 2 * I + I + j];
        store_as(h + i, silu_mul(g, u));
    }
}

/* One block per output row. In place (dst == src) the rows are copied in order by one block, which
 * is safe because rows are ascending and rows[r] >= r. */
__global__ void gather_kernel(float *dst, const float *src, const int32_t *rows, int n, int width, int serial) {
    pdl_trigger();
    pdl_wait();
    for (int r = serial ? 0 : blockIdx.x; r < (serial ? n : blockIdx.x + 1); r++) {
        const float *s = src + (size_t)rows[r] * width;
        float *d = dst + (size_t)r * width;
        float v[8];
        /* read a slice of the row before writing it (in place, d may overlap s only when r == rows[r]) */
        for (int i0 = 0; i0 < width; i0 += 8 * blockDim.x) {
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int i = i0 + j * blockDim.x + threadIdx.x;
                v[j] = i < width ? s[i] : 0.0f;
            }
#pragma unroll
            for (int j = 0; j < 8; j++) {
                int i = i0 + j * blockDim.x + threadIdx.x;
                if (i < width) d[i] = v[j];
            }
        }
        if (serial) __syncthreads();
    }
}

/* x[m] = table[ids[m]] as float, one block per row (a bf16 embedding table, resident or in pinned
 * host memory: 16-byte loads where the row allows, which a bus read needs more than HBM does). */
__global__ void embed_rows_kernel(float *x, const __nv_bfloat16 *table, const int32_t *ids, int D) {
    pdl_trigger();
    pdl_wait();
    const __nv_bfloat16 *row = table + (size_t)ids[blockIdx.x] * D;
    float *out = x + (size_t)blockIdx.x * D;
    if (D % 8 == 0 && reinterpret_cast<uintptr_t>(row) % 16 == 0) {
        for (int i = threadIdx.x; i < D / 8; i += blockDim.x) {
            const uint4 v = reinterpret_cast<const uint4 *>(row)[i];
            float4 *o = reinterpret_cast<float4 *>(out) + 2 * i;
            o[0] = make_float4(bf16_lo(v.x), bf16_hi(v.x), bf16_lo(v.y), bf16_hi(v.y));
            o[1] = make_float4(bf16_lo(v.z), bf16_hi(v.z), bf16_lo(v.w), bf16_hi(v.w));
        }
        return;
    }
    for (int i = threadIdx.x; i < D; i += blockDim.x) out[i] = __bfloat162float(row[i]);
}

__global__ void rope_kernel(float *cs, const int32_t *pos, int M, const float *inv_freq, int half) {
    pdl_trigger();
    pdl_wait();
    const size_t n = (size_t)M * half;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const int m = (int)(i / half), j = (int)(i % half);
        const float a = (float)pos[m] * inv_freq[j];
        double s, c;
        sincos((double)a, &s, &c);
        cs[(size_t)m * 2 * half + j] = (float)c;
        cs[(size_t)m * 2 * half + half + j] = (float)s;
    }
}

/* Grid (token, head block); warp w of head block b handles head 8 b + w: q and k heads get
 * RMSNorm over HD with their weight, then rotate-half RoPE (in PairHead's lane layout), written
 * back in place; k and v heads are also stored (KV: bf16 or e4m3, kv_value) at the token's cache slot. HD: 64, 128,
 * 192 or 256.
 *
 * The norm weight (constant) is loaded before pdl_wait(); after it, the head's values and its
 * cos / sin in one round trip (cs, written at the step's start, has usually left L2 by the time
 * a later layer needs it), so the wait for the qkv GEMV is followed by one memory latency, not
 * three in a row. */
template <int HD, typename KV>
__global__ void qk_norm_rope_store_kernel(float *qkv, const float *q_norm, const float *k_norm, const float *cs,
                                          int nh, int nkv, float eps, KV *kc, KV *vc, const int32_t *slots) {
    pdl_trigger();
    const int m = blockIdx.x, lane = threadIdx.x & 31;
    const int heads = nh + 2 * nkv;
    const int h = blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const bool normed = h < nh + nkv; /* q or k; v is only stored */
    PairHead<HD> w;
    if (normed) w.load(h < nh ? q_norm : k_norm, lane);
    pdl_wait();
    if (h >= heads) return;
    float *x = qkv + ((size_t)m * heads + h) * HD;
    const size_t slot = (size_t)slots[m];
    if (!normed) {
        KV *v = vc + (slot * nkv + (h - nh - nkv)) * HD;
        for (int i = lane; i < HD; i += 32) v[i] = kv_value(x[i], v);
        return;
    }
    PairHead<HD> xh, c; /* c: the token's cos (a) and sin (b), cs being [cos | sin] */
    xh.load(x, lane);
    c.load(cs + (size_t)m * HD, lane);
    qk_norm_rope(xh.a, xh.b, w.a, w.b, c.a, c.b, HD, eps);
    xh.store(x, lane);
    if (h >= nh) {
        KV *k = kc + (slot * nkv + (h - nh)) * HD;
#pragma unroll
        for (int j = 0; j < PairHead<HD>::P; j++) {
            const int i = lane + 32 * j;
            k[i] = kv_value(xh.a[j], k);
            k[i + HD / 2] = kv_value(xh.b[j], k);
        }
    }
}

int grid_for(size_t n, int threads) {
    size_t b = (n + threads - 1) / threads;
    return (int)(b < 4096 ? (b ? b : 1) : 4096);
}

/* Rows whose width is a multiple of 512 floats (Qwen3's hidden sizes from 1024 on) and aligned
 * buffers take the register kernel, D / 16 threads per row; others the looping one. */
template <class T>
cudaError_t rmsnorm(cudaStream_t st, T *y, const float *x, const float *w, int M, int D, float eps) {
    if (M <= 0 || D <= 0) return cudaSuccess;
    const int row_threads = D / (4 * kNormVec);
    if (D % (4 * kNormVec * 32) == 0 && row_threads <= 1024 && ((uintptr_t)x | (uintptr_t)w | (uintptr_t)y) % 16 == 0)
        return cu_launch(st, dim3(M), dim3(row_threads), 0, rmsnorm_rows_kernel<T>, y, x, w, D, eps);
    int threads = D >= 4096 ? 1024 : D >= 1024 ? 512 : 256;
    return cu_launch(st, dim3(M), dim3(threads), 0, rmsnorm_kernel<T>, y, x, w, D, eps);
}

template <class T>
cudaError_t swiglu(cudaStream_t st, T *h, const float *gate_up, int M, int I) {
    if (M <= 0 || I <= 0) return cudaSuccess;
    return cu_launch(st, dim3(grid_for((size_t)M * I, 256)), dim3(256), 0, swiglu_kernel<T>, h, gate_up, M, I);
}

} // namespace

cudaError_t cu_rmsnorm(cudaStream_t st, float *y, const float *x, const float *w, int M, int D, float eps) {
    return rmsnorm(st, y, x, w, M, D, eps);
}
cudaError_t cu_rmsnorm(cudaStream_t st, __nv_bfloat16 *y, const float *x, const float *w, int M, int D, float eps) {
    return rmsnorm(st, y, x, w, M, D, eps);
}
cudaError_t cu_swiglu(cudaStream_t st, float *h, const float *gate_up, int M, int I) {
    return swiglu(st, h, gate_up, M, I);
}
cudaError_t cu_swiglu(cudaStream_t st, __nv_bfloat16 *h, const float *gate_up, int M, int I) {
    return swiglu(st, h, gate_up, M, I);
}

cudaError_t cu_gather_rows(cudaStream_t st, float *dst, const float *src, const int32_t *rows, int n, int width) {
    if (n <= 0 || width <= 0) return cudaSuccess;
    const int serial = dst == src;
    return cu_launch(st, dim3(serial ? 1 : n), dim3(256), 0, gather_kernel, dst, src, rows, n, width, serial);
}

cudaError_t cu_embed_rows(cudaStream_t st, float *x, const __nv_bfloat16 *table, const int32_t *ids, int M, int D) {
    if (M <= 0) return cudaSuccess;
    return cu_launch(st, dim3(M), dim3(256), 0, embed_rows_kernel, x, table, ids, D);
}

cudaError_t cu_rope_cos_sin(cudaStream_t st, float *cs, const int32_t *pos, int M, const float *inv_freq, int half) {
    if (M <= 0 || half <= 0) return cudaSuccess;
    return cu_launch(st, dim3(grid_for((size_t)M * half, 128)), dim3(128), 0, rope_kernel, cs, pos, M, inv_freq, half);
}

namespace {
template <typename KV>
cudaError_t qk_norm_rope_store(cudaStream_t st, float *qkv, const float *q_norm, const float *k_norm, const float *cs,
                               int M, int nh, int nkv, int hd, float eps, KV *kc, KV *vc, const int32_t *slots) {
    if (M <= 0) return cudaSuccess;
    auto kernel = hd == 64    ? qk_norm_rope_store_kernel<64, KV>
                  : hd == 128 ? qk_norm_rope_store_kernel<128, KV>
                  : hd == 192 ? qk_norm_rope_store_kernel<192, KV>
                  : hd == 256 ? qk_norm_rope_store_kernel<256, KV>
                              : nullptr;
    if (!kernel) return cudaErrorInvalidValue; /* the head sizes the attention kernels take */
    int heads = nh + 2 * nkv, warps = heads < 8 ? heads : 8;
    return cu_launch(st, dim3(M, (heads + warps - 1) / warps), dim3(32 * warps), 0, kernel, qkv, q_norm, k_norm, cs,
                     nh, nkv, eps, kc, vc, slots);
}
} // namespace

cudaError_t cu_qk_norm_rope_store(cudaStream_t st, float *qkv, const float *q_norm, const float *k_norm,
                                  const float *cs, int M, int nh, int nkv, int hd, float eps, __nv_bfloat16 *kc,
                                  __nv_bfloat16 *vc, const int32_t *slots) {
    return qk_norm_rope_store(st, qkv, q_norm, k_norm, cs, M, nh, nkv, hd, eps, kc, vc, slots);
}
cudaError_t cu_qk_norm_rope_store(cudaStream_t st, float *qkv, const float *q_norm, const float *k_norm,
                                  const float *cs, int M, int nh, int nkv, int hd, float eps, __nv_fp8_e4m3 *kc,
                                  __nv_fp8_e4m3 *vc, const int32_t *slots) {
    return qk_norm_rope_store(st, qkv, q_norm, k_norm, cs, M, nh, nkv, hd, eps, kc, vc, slots);
}
