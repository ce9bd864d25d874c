/* cuda_common.cuh — what the CUDA backend's translation units share: the launch helper (every
 * kernel is launched with programmatic dependent launch), the device-side halves of that
 * protocol, small numeric helpers, and the launchers each kernel file exports to
 * cuda_backend.cu.
 *
 * Programmatic dependent launch (PDL, sm_90): a kernel may start while its predecessor in the
 * stream is still running. Every kernel here calls pdl_trigger() first (letting its successor be
 * scheduled early) and pdl_wait() before it touches anything a predecessor wrote or may still
 * read; the only work allowed before pdl_wait() is reading weights, which never change. Since
 * each kernel waits for the full completion of its predecessor, completion is transitive down
 * the stream. This hides the launch gap between the ~400 small kernels of a decode step. */
#ifndef QUILL_CUDA_COMMON_CUH
#define QUILL_CUDA_COMMON_CUH

#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

extern "C" {
#include "backend/backend.h"
}

#define CU_DEV static __device__ __forceinline__

CU_DEV void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

CU_DEV void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

/* Whether launches ask for programmatic stream serialization: set once by cuda_backend_create,
 * only for a device of compute capability >= 9.0 running code built for it (code built for an
 * older target has no pdl_wait(), so its kernels must not start early). */
extern bool cu_pdl;
/* Whether launches inside a graph capture use it too (cuda_backend.cu clears cu_pdl_now while
 * capturing when this is false). */
extern bool cu_pdl_graphs;
extern bool cu_pdl_now;

/* Launches kernel<<<grid, block, smem, stream>>>(args...), with programmatic stream
 * serialization allowed when cu_pdl (see above), in thread-block clusters of cluster_x blocks
 * along x when that is more than 1 (sm_90). Returns the launch's error code. */
template <typename... KArgs, typename... Args>
static inline cudaError_t cu_launch_clusters(cudaStream_t st, dim3 grid, dim3 block, size_t smem, unsigned cluster_x,
                                             void (*kernel)(KArgs...), Args... args) {
    cudaLaunchAttribute attr[2];
    unsigned n = 0;
    if (cluster_x > 1) {
        attr[n].id = cudaLaunchAttributeClusterDimension;
        attr[n].val.clusterDim.x = cluster_x;
        attr[n].val.clusterDim.y = 1;
        attr[n].val.clusterDim.z = 1;
        n++;
    }
    if (cu_pdl_now) {
        attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[n].val.programmaticStreamSerializationAllowed = 1;
        n++;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cfg.attrs = attr;
    cfg.numAttrs = n;
    return cudaLaunchKernelEx(&cfg, kernel, args...);
}

/* cu_launch_clusters without clusters. */
template <typename... KArgs, typename... Args>
static inline cudaError_t cu_launch(cudaStream_t st, dim3 grid, dim3 block, size_t smem, void (*kernel)(KArgs...),
                                    Args... args) {
    return cu_launch_clusters(st, grid, block, smem, 1, kernel, args...);
}

/* ---- asynchronous copies and tensor-core products (sm_80+), shared by the kernels ---- */

/* 16 bytes global -> shared, bypassing L1 (weights and tiles are read once per block); when
 * !valid nothing is read and the 16 bytes are zero-filled. */
CU_DEV void cp_async16(void *smem, const void *gmem, bool valid = true) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"((uint32_t)__cvta_generic_to_shared(smem)),
                 "l"(gmem), "r"(valid ? 16 : 0)
                 : "memory");
}

/* 8 bytes, through L1 (the .cg form takes 16 only; e4m3 K/V chunks); zero-filled when !valid. */
CU_DEV void cp_async8(void *smem, const void *gmem, bool valid = true) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;" ::"r"((uint32_t)__cvta_generic_to_shared(smem)),
                 "l"(gmem), "r"(valid ? 8 : 0)
                 : "memory");
}

/* 4 bytes, through L1 (int4 scale words, which neighbouring lanes share); zero-filled when !valid. */
CU_DEV void cp_async4(void *smem, const void *gmem, bool valid = true) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"((uint32_t)__cvta_generic_to_shared(smem)),
                 "l"(gmem), "r"(valid ? 4 : 0)
                 : "memory");
}

CU_DEV void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

/* Waits until at most N of this thread's committed groups are still in flight. */
template <int N>
CU_DEV void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

/* c += A B on the tensor cores: mma.sync m16n8k16, bf16 in, f32 accumulate (a: the thread's 4
 * registers of the 16x16 A fragment, b: its 2 of the 16x8 B fragment, PTX's layouts). */
CU_DEV void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

CU_DEV float bf16_lo(uint32_t w) { return __uint_as_float(w << 16); }
CU_DEV float bf16_hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

/* SwiGLU of one gate / up pair, silu(g) * u: the one definition the SwiGLU kernel and the
 * matmuls that store SwiGLU themselves share, so every path rounds it alike. */
CU_DEV float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

CU_DEV float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

CU_DEV float warp_max(float v) {
#pragma unroll
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Per-head RMSNorm of a q or k head (weight w, eps) followed by rotate-half RoPE. A head is spread
 * over LANES adjacent lanes (32: a warp, lane holding i = lane + 32 j; 4: an mma fragment row),
 * each lane holding P pairs (i, i + hd / 2): a, b the pair's values (in and out; unused entries
 * zero, which adds nothing to the sum), wa, wb the weight at i and i + hd / 2, co, si cos and sin
 * at i. The one definition of this rounding. */
template <int P, int LANES = 32>
CU_DEV void qk_norm_rope(float (&a)[P], float (&b)[P], const float (&wa)[P], const float (&wb)[P],
                         const float (&co)[P], const float (&si)[P], int hd, float eps) {
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < P; j++) ss = fmaf(a[j], a[j], ss);
#pragma unroll
    for (int j = 0; j < P; j++) ss = fmaf(b[j], b[j], ss);
#pragma unroll
    for (int o = LANES / 2; o; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float inv = 1.0f / sqrtf(ss / (float)hd + eps);
#pragma unroll
    for (int j = 0; j < P; j++) {
        const float x = wa[j] * (a[j] * inv), y = wb[j] * (b[j] * inv);
        a[j] = x * co[j] - y * si[j];
        b[j] = y * co[j] + x * si[j];
    }
}

/* One head (or any HD-vector) in the lane layout of qk_norm_rope: lane holds the pairs
 * (i, i + HD / 2) for i = lane + 32 j, j < P. */
template <int HD>
struct PairHead {
    static constexpr int P = HD / 64;
    float a[P], b[P];
    __device__ __forceinline__ void load(const float *h, int lane) {
#pragma unroll
        for (int j = 0; j < P; j++) a[j] = h[lane + 32 * j], b[j] = h[lane + 32 * j + HD / 2];
    }
    __device__ __forceinline__ void store(float *h, int lane) const {
#pragma unroll
        for (int j = 0; j < P; j++) h[lane + 32 * j] = a[j], h[lane + 32 * j + HD / 2] = b[j];
    }
};

/* A cached K or V value: bf16 (KvDtype KV_AUTO) or float8 e4m3 (KV_FP8). kv_value rounds a float
 * to it (nearest even; e4m3 saturates at +-448, as util/fp8.h does on the CPU); kv_float widens
 * it back (exact). */
CU_DEV __nv_bfloat16 kv_value(float v, const __nv_bfloat16 *) { return __float2bfloat16_rn(v); }
CU_DEV __nv_fp8_e4m3 kv_value(float v, const __nv_fp8_e4m3 *) { return __nv_fp8_e4m3(v); }
CU_DEV float kv_float(__nv_bfloat16 v) { return __bfloat162float(v); }
CU_DEV float kv_float(__nv_fp8_e4m3 v) { return (float)v; }
/* The values of two e4m3 codes (the low byte first: .x), exact. */
CU_DEV float2 fp8x2_to_float2(uint16_t codes) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)codes, __NV_E4M3);
    return __half22float2(*reinterpret_cast<const __half2 *>(&h));
}
/* The same as a bf16 pair, low value in the low half (exact: e4m3 has 3 mantissa bits and a range
 * inside bf16's). */
CU_DEV uint32_t fp8x2_to_bf16x2(uint16_t codes) {
    const float2 f = fp8x2_to_float2(codes);
    const __nv_bfloat162 b = __floats2bfloat162_rn(f.x, f.y);
    return *reinterpret_cast<const uint32_t *>(&b);
}

/* Four 8 x 8 bf16 matrices from shared memory (ldmatrix, sm_75+): lanes 8i .. 8i + 7 give the row
 * addresses (16 bytes each) of matrix i, and r[i] is this lane's fragment of it: row lane / 4,
 * columns 2 (lane % 4) and the next (trans: of the transposed matrix). */
CU_DEV void ldmatrix_x4(uint32_t (&r)[4], const void *smem, bool trans) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(smem);
    if (trans)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
}

/* Sum over a block of blockDim.x threads (a multiple of 32, at most 1024); every thread gets the
 * result. red must hold 32 floats; the call contains two __syncthreads(). */
CU_DEV float block_sum(float v, float *red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    float t = lane < nw ? red[lane] : 0.0f;
    t = warp_sum(t);
    __syncthreads();
    return t;
}

/* The GPU's int4 codes: "fragment order". The checkpoint stores a row as bytes of two columns
 * (low nibble first). At load (cu_q4_to_fragment_order) every 32-column chunk of a row, 16 bytes,
 * is rearranged so that word t (t = 0 .. 3) holds the 8 columns that lane t of a tensor-core A
 * fragment multiplies (mma.sync m16n8k16 and wgmma alike, in k order): nibble j (bits 4j ..) is
 * column 2t + 8j and nibble j + 4 (bits 16 + 4j ..) column 2t + 8j + 1, j = 0 .. 3. One shift and
 * one mask then give a register's column pair, one in each half (the int4 GEMM's dequant_word);
 * the GEMV's dot products follow the same order (it quantizes x to match). Groups of scales are
 * whole chunks, so they are unaffected. */

/* ---- launchers (each returns the launch's error; nothing is launched for empty shapes) ---- */

/* One weight matrix (a stacked part of a Linear) on the device. */
typedef struct CuMat {
    int n0, n;           /* first output column in y, and rows (output features) of this part */
    int k, k_pad;        /* in_features, and the row stride of bf16 weights (k rounded up to 8) */
    int group;           /* int4 group size (32..256), or 0 for bf16 */
    const void *w;       /* bf16 [n][k_pad], or int4 codes [n][k/2] (fragment order, above) */
    const uint32_t *sz;  /* int4: [n][cu_sz_ld] words, scale bf16 in the low half, zero in the high */
    /* int4 on a GPU with the TMA engine: the wgmma GEMM's descriptors of w and sz (opaque
     * CUtensorMaps, cu_gemm_q4_describe), made once at load; tma_ok says they were */
    uint64_t tma[2][16];
    bool tma_ok;
} CuMat;

/* Scale words per row of an int4 matrix: its k / group groups rounded up to a multiple of 4, so
 * every row starts on 16 bytes (the wgmma GEMM reads the rows with the TMA engine, which needs
 * that); the padding words are never read as scales. */
static inline __host__ __device__ int cu_sz_ld(int k, int group) { return (k / group + 3) & ~3; }

/* Matrix-vector products for decode: y[m][n0 + j] = sum_k x'[m][k] * W[j][k] for the M tokens
 * (rows ldx and ldy floats apart); sms: multiprocessor count (sizes the grid). x' is x, or, when
 * norm_w is not NULL, RMSNorm(x) with weight norm_w and eps. bf16 matrices take M = 1, int4
 * matrices the M that cu_gemv_takes allows. With accumulate the result is added to y
 * (the residual stream) instead of stored. */
cudaError_t cu_gemv(cudaStream_t st, const CuMat *w, const float *x, int ldx, int M, float *y, int ldy, int sms,
                    const float *norm_w, float eps, bool accumulate);
/* The MLP's gate|up product with its SwiGLU on a GEMV (the M that cu_gemv takes for w's dtype,
 * w->n a multiple of 4, w->n0 = 0): w stacks gate rows [0, I) over up rows [I, 2I); h[m][j] =
 * silu(x'_m . gate_j) * (x'_m . up_j) in float [M][I] (rows ldh apart), x' as for cu_gemv. */
cudaError_t cu_gemv_swiglu(cudaStream_t st, const CuMat *w, const float *x, int ldx, int M, float *h, int ldh, int sms,
                           const float *norm_w, float eps);
/* log2(group / 32): an int4 group of w->group columns is 32 << shift columns (one 16-byte chunk
 * of codes per 32). */
static inline int cu_group_shift(const CuMat *w) {
    int shift = 0;
    while ((32 << shift) < w->group) shift++;
    return shift;
}
/* Whether the int4 GEMV takes this matrix at M tokens: an int4 matrix, M small enough, and M
 * rows of quantized x beside its weight ring in shared memory. */
bool cu_gemv_takes(const CuMat *w, int M);
/* Whether cu_gemv should apply an RMSNorm of this matrix's input itself (where that is faster
 * than the separate norm kernel); sms: multiprocessor count. */
bool cu_gemv_fuses_norm(const CuMat *w, int sms);
/* int4 matrices only (w->group != 0), any M >= 1 (meant for M > 1; cuda_gemm_q4.cu):
 * y[m][n0 + j] (+)= sum_k x[m][k] * W[j][k] on the tensor cores, x bf16 [M][w->k] (16-byte
 * aligned), y row stride ldy; sms: multiprocessor count (sizes the split of k). Products use
 * bf16 x and bf16-rounded weights with float32 accumulation, as the dequant + cuBLAS path does.
 * With accumulate the result is added to y instead of stored. wgmma: the Hopper (sm_90a) kernel
 * may run where the build has it (false: the mma.sync kernel at every M, as on older GPUs). */
cudaError_t cu_gemm_q4(cudaStream_t st, const CuMat *w, const __nv_bfloat16 *x, int M, float *y, int ldy, int sms,
                       bool accumulate, bool wgmma);
/* Whether cu_gemm_q4 multiplies w on the Hopper kernel (wgmma as passed to it), which beats
 * dequantizing to bf16 for cuBLAS at every M; where false, the mma.sync kernel does only up to a
 * few hundred tokens. */
bool cu_gemm_q4_wgmma(const CuMat *w, bool wgmma);
/* Fills w->tma and sets w->tma_ok where the device and driver have the TMA engine (sm_90 and a
 * driver with cuTensorMapEncodeTiled); elsewhere leaves tma_ok false, and cu_gemm_q4 then runs
 * the mma.sync kernel. Call once w's device buffers hold their final addresses. */
void cu_gemm_q4_describe(CuMat *w);
/* The MLP's gate|up product with its SwiGLU: w stacks gate rows [0, I) over up rows [I, 2I)
 * (I = w->n / 2, w->n0 = 0); h[m][j] = silu(x_m . gate_j) * (x_m . up_j) as bf16 [M][I], the
 * products as cu_gemm_q4 computes them and the SwiGLU in float, rounded once. */
cudaError_t cu_gemm_q4_swiglu(cudaStream_t st, const CuMat *w, const __nv_bfloat16 *x, int M, __nv_bfloat16 *h, int sms,
                              bool wgmma);
/* out[i] = bf16(x[i]) (round to nearest even) for i < n. */
cudaError_t cu_to_bf16(cudaStream_t st, const float *x, __nv_bfloat16 *out, size_t n);
/* The checkpoint's int4 codes of `rows` rows of k columns (k a multiple of 32), in place on the
 * device, into fragment order. */
cudaError_t cu_q4_to_fragment_order(cudaStream_t st, void *codes, int rows, int k);
/* Rows r0 .. r0+rows-1 of an int4 matrix dequantized to bf16 into out[rows][k]. */
cudaError_t cu_dequant_q4(cudaStream_t st, const CuMat *w, int r0, int rows, __nv_bfloat16 *out);

/* y[m] = RMSNorm(x[m]) with weight w for m < M, rows of D; y float or bf16 (not in place for bf16). */
cudaError_t cu_rmsnorm(cudaStream_t st, float *y, const float *x, const float *w, int M, int D, float eps);
cudaError_t cu_rmsnorm(cudaStream_t st, __nv_bfloat16 *y, const float *x, const float *w, int M, int D, float eps);
/* h[m][i] = silu(gate_up[m][i]) * gate_up[m][I + i] for m < M, i < I; h float or bf16. */
cudaError_t cu_swiglu(cudaStream_t st, float *h, const float *gate_up, int M, int I);
cudaError_t cu_swiglu(cudaStream_t st, __nv_bfloat16 *h, const float *gate_up, int M, int I);
cudaError_t cu_gather_rows(cudaStream_t st, float *dst, const float *src, const int32_t *rows, int n, int width);
/* x[m] = table[ids[m]] (bf16 rows of D, as float) for m < M; ids on the device. */
cudaError_t cu_embed_rows(cudaStream_t st, float *x, const __nv_bfloat16 *table, const int32_t *ids, int M, int D);
cudaError_t cu_rope_cos_sin(cudaStream_t st, float *cs, const int32_t *pos, int M, const float *inv_freq, int half);

/* The layer's K and V pools: [n_blocks * block_size][nkv][hd] values of type dtype (bf16 for
 * KV_AUTO, e4m3 for KV_FP8). */
typedef struct CuKvPools {
    void *k, *v;
    KvDtype dtype;
} CuKvPools;
/* kc / vc: the layer's pools (bf16 or e4m3); hd a multiple of 64 up to 256 (else
 * cudaErrorInvalidValue), the head sizes the attention kernels take. */
cudaError_t cu_qk_norm_rope_store(cudaStream_t st, float *qkv, const float *q_norm, const float *k_norm,
                                  const float *cs, int M, int nh, int nkv, int hd, float eps, __nv_bfloat16 *kc,
                                  __nv_bfloat16 *vc, const int32_t *slots);
cudaError_t cu_qk_norm_rope_store(cudaStream_t st, float *qkv, const float *q_norm, const float *k_norm,
                                  const float *cs, int M, int nh, int nkv, int hd, float eps, __nv_fp8_e4m3 *kc,
                                  __nv_fp8_e4m3 *vc, const int32_t *slots);

/* Floats per (unit, query head) record of split-KV partials: hd outputs, max, sum, and padding
 * that keeps every record 16-byte aligned (the combine reads them as vectors). */
static __host__ __device__ constexpr int cu_part_stride(int hd) { return hd + 4; }

/* Device scratch of the split-KV decode attention: per (sequence, kv head, split) partial
 * results and one arrival counter per (sequence, kv head), zero between launches. */
typedef struct CuAttnScratch {
    float *part;         /* [units][G][cu_part_stride(hd)]: unnormalised output, running max, running sum */
    size_t part_floats;  /* capacity of part */
    int *counters;       /* [n_counters], all zero */
    int n_counters;
} CuAttnScratch;

/* head_dim values the attention kernels are built for (64, 128, 256). */
bool cu_attention_supports(int hd);
/* One layer's heads as the attention launch takes them: qkv [tokens][(nh + 2 nkv) hd] raw, the
 * layer's q / k norm weights [hd], and the step's rope table cs [tokens][hd]. */
typedef struct CuAttnHeads {
    float *qkv;
    const float *q_norm, *k_norm, *cs;
    float eps;
    int nh, nkv, hd;
} CuAttnHeads;
/* Where an attention launch stores its output [tokens][nh hd]: as float (f), or rounded to bf16
 * (b), what a tensor-core o projection reads, which saves the conversion launch between them.
 * Exactly one is set. */
typedef struct CuAttnOut {
    float *f;
    __nv_bfloat16 *b;
} CuAttnOut;
/* The backend's attention op (backend.h): q / k norm + rope + K/V store, then attention over the
 * layer's pools; qkv is scratch afterwards (decode leaves it raw). */
cudaError_t cu_attention(cudaStream_t st, CuAttnOut out, const CuAttnHeads *heads, CuKvPools kv, int block_size,
                         const AttnMeta *meta, const CuAttnScratch *scr, int sms);

/* One row's sampling parameters as the sampling kernel reads them. */
typedef struct CuSampleRow {
    float temperature; /* > 0 (greedy rows have greedy = 1) */
    float top_p;       /* 1: off */
    float min_p;       /* 0: off */
    float u;           /* the row's uniform draw in [0, 1) */
    int top_k;         /* 0: off (or >= vocab) */
    int greedy;        /* argmax, nothing else */
} CuSampleRow;

/* A row's maximum over one split, and the first index of it (vocab: none). */
typedef struct CuArgmax {
    float v;
    int i;
} CuArgmax;
constexpr int kArgmaxSplits = 32; /* splits of each row for its maximum */

/* One token per row of logits [rows][vocab] into out_ids (device), as params say; part: scratch
 * of rows * kArgmaxSplits. */
cudaError_t cu_sample(cudaStream_t st, const float *logits, int rows, int vocab, const CuSampleRow *params,
                      CuArgmax *part, int32_t *out_ids);

#endif
