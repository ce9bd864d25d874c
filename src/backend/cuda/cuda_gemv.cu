/* cuda_gemv.cu — matrix-vector products for small M (decode), where the only cost that matters
 * is streaming the weights once from HBM: a batch-1 decode step of an int4 8B model reads ~3.7 GB
 * of codes and scales plus 1.25 GB of bf16 lm_head, and nothing else comes close.
 *
 * Layout. A warp owns a contiguous range of output rows (the rows are split evenly over every
 * warp of a grid sized to the machine, so no multiprocessor gets a whole extra block of work) and
 * walks them R at a time; its 32 lanes stride along K in 16-byte chunks, so each load instruction
 * of the warp reads 512 contiguous bytes of one row (fully coalesced), and the next chunk of every
 * row is loaded before the current one is used (loads in flight hide HBM latency). Weights are
 * read with ld.global.nc.L1::no_allocate: they are used once and must not evict x from L1. The R
 * rows of a warp share each x value they load, which keeps L1 traffic at ~1 byte per weight.
 *
 * int4: the codes keep the checkpoint's nibble order (byte j of a row = columns 2j, 2j+1), which
 * is already what a 16-byte load wants; dequantization happens in registers with no integer-to-
 * float conversion: a byte permute drops a nibble q into the mantissa of 2^23 (giving 2^23 + q),
 * and one float subtract of 2^23 + 8 leaves exactly q - 8. Per group, (q - 8) * s + z summed
 * against x becomes s * sum(x * (q - 8)) + z * sum(x), so the scale and zero cost two FMAs per
 * 32 weights. Accumulation is float32 throughout, so the only difference from the CPU kernels is
 * summation order.
 *
 * Before pdl_wait() a kernel only loads its first weight chunks, so with programmatic dependent
 * launch the weight stream of one matmul starts while the previous kernel is still finishing. */
#include "backend/cuda/cuda_common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

CU_DEV uint4 ld_weights(const uint4 *p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
    return v;
}

CU_DEV uint32_t ld_weights32(const uint32_t *p) {
    uint32_t v;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}

CU_DEV uint32_t word_of(const uint4 &v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

/* The 8 values q - 8 of one word of codes, in column order (low nibble of byte j = column 2j). */
CU_DEV void q4_word(uint32_t w, float (&f)[8]) {
    const uint32_t lo = w & 0x0f0f0f0fu, hi = (w >> 4) & 0x0f0f0f0fu;
    const float off = 8388616.0f; /* 2^23 + 8 */
    f[0] = __uint_as_float(__byte_perm(lo, 0x4b000000u, 0x7540)) - off;
    f[1] = __uint_as_float(__byte_perm(hi, 0x4b000000u, 0x7540)) - off;
    f[2] = __uint_as_float(__byte_perm(lo, 0x4b000000u, 0x7541)) - off;
    f[3] = __uint_as_float(__byte_perm(hi, 0x4b000000u, 0x7541)) - off;
    f[4] = __uint_as_float(__byte_perm(lo, 0x4b000000u, 0x7542)) - off;
    f[5] = __uint_as_float(__byte_perm(hi, 0x4b000000u, 0x7542)) - off;
    f[6] = __uint_as_float(__byte_perm(lo, 0x4b000000u, 0x7543)) - off;
    f[7] = __uint_as_float(__byte_perm(hi, 0x4b000000u, 0x7543)) - off;
}

/* Rows [begin, end) of this warp, an even share of n over all warps of the grid. */
CU_DEV void warp_rows(int n, int *begin, int *end) {
    long long warp = (long long)blockIdx.x * kWarps + (threadIdx.x >> 5), nw = (long long)gridDim.x * kWarps;
    *begin = (int)(warp * n / nw);
    *end = (int)((warp + 1) * n / nw);
}

/* Butterfly-reduces acc[M][R] over the warp and lets lane m*R + r write y[m][row0 + r]. */
template <int M, int R>
CU_DEV void reduce_store(float (&acc)[M][R], float *y, int ldy, int row0, int nr) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[m][r] = warp_sum(acc[m][r]);
#pragma unroll
    for (int m = 0; m < M; m++)
#pragma unroll
        for (int r = 0; r < R; r++)
            if (lane == m * R + r && r < nr) y[(size_t)m * ldy + row0 + r] = acc[m][r];
}

/* int4: codes [n][k/2] as 16-byte chunks of 32 columns, sz [n][k/g] (scale | zero << 16). */
template <int M, int R>
__global__ void __launch_bounds__(kThreads) gemv_q4(const uint4 *__restrict__ codes, const uint32_t *__restrict__ sz,
                                                    const float *x, float *y, int n, int k, int gshift, int ldy) {
    pdl_trigger();
    int begin, end;
    warp_rows(n, &begin, &end);
    const int lane = threadIdx.x & 31, chunks = k >> 5, groups = k >> (5 + gshift);
    bool waited = false;
    for (int r0 = begin; r0 < end; r0 += R) {
        const int nr = min(R, end - r0);
        const uint4 *row[R];
        const uint32_t *srow[R];
#pragma unroll
        for (int r = 0; r < R; r++) { /* rows past the range repeat the last one (results dropped) */
            int rr = min(r0 + r, end - 1);
            row[r] = codes + (size_t)rr * chunks;
            srow[r] = sz + (size_t)rr * groups;
        }
        uint4 q[R];
        uint32_t s[R];
        if (lane < chunks) {
#pragma unroll
            for (int r = 0; r < R; r++) {
                q[r] = ld_weights(row[r] + lane);
                s[r] = ld_weights32(srow[r] + (lane >> gshift));
            }
        }
        if (!waited) {
            pdl_wait();
            waited = true;
        }
        float acc[M][R];
#pragma unroll
        for (int m = 0; m < M; m++)
#pragma unroll
            for (int r = 0; r < R; r++) acc[m][r] = 0.0f;
        for (int c = lane; c < chunks; c += 32) {
            uint4 qn[R];
            uint32_t sn[R];
            const bool more = c + 32 < chunks;
            if (more) {
#pragma unroll
                for (int r = 0; r < R; r++) {
                    qn[r] = ld_weights(row[r] + c + 32);
                    sn[r] = ld_weights32(srow[r] + ((c + 32) >> gshift));
                }
            }
            float dot[M][R], xs[M];
#pragma unroll
            for (int m = 0; m < M; m++) {
                xs[m] = 0.0f;
#pragma unroll
                for (int r = 0; r < R; r++) dot[m][r] = 0.0f;
            }
#pragma unroll
            for (int wi = 0; wi < 4; wi++) {
                float xv[M][8];
#pragma unroll
                for (int m = 0; m < M; m++) {
                    const float4 *xp = reinterpret_cast<const float4 *>(x + (size_t)m * k + c * 32 + wi * 8);
                    float4 a = xp[0], b = xp[1];
                    xv[m][0] = a.x, xv[m][1] = a.y, xv[m][2] = a.z, xv[m][3] = a.w;
                    xv[m][4] = b.x, xv[m][5] = b.y, xv[m][6] = b.z, xv[m][7] = b.w;
                    xs[m] += ((a.x + a.y) + (a.z + a.w)) + ((b.x + b.y) + (b.z + b.w));
                }
#pragma unroll
                for (int r = 0; r < R; r++) {
                    float f[8];
                    q4_word(word_of(q[r], wi), f);
#pragma unroll
                    for (int m = 0; m < M; m++)
#pragma unroll
                        for (int j = 0; j < 8; j++) dot[m][r] = fmaf(xv[m][j], f[j], dot[m][r]);
                }
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
                const float sc = bf16_lo(s[r]), ze = bf16_hi(s[r]);
#pragma unroll
                for (int m = 0; m < M; m++) acc[m][r] = fmaf(sc, dot[m][r], fmaf(ze, xs[m], acc[m][r]));
            }
            if (more) {
#pragma unroll
                for (int r = 0; r < R; r++) q[r] = qn[r], s[r] = sn[r];
            }
        }
        reduce_store<M, R>(acc, y, ldy, r0, nr);
    }
}

/* bf16: w [n][k_pad] as 16-byte chunks of 8 columns (k_pad = k rounded up to 8, padding zero).
 * VEC: k is a multiple of 8, so x can be read as float4 (otherwise element by element, with the
 * columns past k skipped). */
template <int M, int R, bool VEC>
__global__ void __launch_bounds__(kThreads) gemv_bf16(const uint4 *__restrict__ w, const float *x, float *y, int n,
                                                      int k, int k_pad, int ldy) {
    pdl_trigger();
    int begin, end;
    warp_rows(n, &begin, &end);
    const int lane = threadIdx.x & 31, chunks = k_pad >> 3;
    bool waited = false;
    for (int r0 = begin; r0 < end; r0 += R) {
        const int nr = min(R, end - r0);
        const uint4 *row[R];
#pragma unroll
        for (int r = 0; r < R; r++) row[r] = w + (size_t)min(r0 + r, end - 1) * chunks;
        uint4 q[R];
        if (lane < chunks) {
#pragma unroll
            for (int r = 0; r < R; r++) q[r] = ld_weights(row[r] + lane);
        }
        if (!waited) {
            pdl_wait();
            waited = true;
        }
        float acc[M][R];
#pragma unroll
        for (int m = 0; m < M; m++)
#pragma unroll
            for (int r = 0; r < R; r++) acc[m][r] = 0.0f;
        for (int c = lane; c < chunks; c += 32) {
            uint4 qn[R];
            const bool more = c + 32 < chunks;
            if (more) {
#pragma unroll
                for (int r = 0; r < R; r++) qn[r] = ld_weights(row[r] + c + 32);
            }
            float xv[M][8];
#pragma unroll
            for (int m = 0; m < M; m++) {
                const float *xp = x + (size_t)m * k + c * 8;
                if (VEC) {
                    float4 a = reinterpret_cast<const float4 *>(xp)[0], b = reinterpret_cast<const float4 *>(xp)[1];
                    xv[m][0] = a.x, xv[m][1] = a.y, xv[m][2] = a.z, xv[m][3] = a.w;
                    xv[m][4] = b.x, xv[m][5] = b.y, xv[m][6] = b.z, xv[m][7] = b.w;
                } else {
#pragma unroll
                    for (int j = 0; j < 8; j++) xv[m][j] = c * 8 + j < k ? xp[j] : 0.0f;
                }
            }
#pragma unroll
            for (int r = 0; r < R; r++) {
#pragma unroll
                for (int wi = 0; wi < 4; wi++) {
                    const uint32_t wv = word_of(q[r], wi);
                    const float lo = bf16_lo(wv), hi = bf16_hi(wv);
#pragma unroll
                    for (int m = 0; m < M; m++)
                        acc[m][r] = fmaf(xv[m][2 * wi + 1], hi, fmaf(xv[m][2 * wi], lo, acc[m][r]));
                }
            }
            if (more) {
#pragma unroll
                for (int r = 0; r < R; r++) q[r] = qn[r];
            }
        }
        reduce_store<M, R>(acc, y, ldy, r0, nr);
    }
}

/* Grid of whole waves: enough blocks that every warp gets about R rows, capped at what fits on
 * the machine at once (so no second partial wave leaves most multiprocessors idle). The occupancy
 * query runs once per kernel (Kern is the kernel itself, so each has its own cached value). */
template <auto Kern>
int gemv_blocks(int n, int r, int sms) {
    static int per_sm = 0;
    if (!per_sm) {
        int b = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, Kern, kThreads, 0) != cudaSuccess || b < 1) b = 1;
        per_sm = b;
    }
    long long want_warps = ((long long)n + r - 1) / r;
    long long per = (want_warps + (long long)sms * kWarps - 1) / ((long long)sms * kWarps);
    if (per < 1) per = 1;
    if (per > per_sm) per = per_sm;
    return (int)(per * sms);
}

template <int M>
cudaError_t launch_q4(cudaStream_t st, const CuMat *w, const float *x, float *y, int ldy, int sms) {
    constexpr int R = M <= 2 ? 4 : 2;
    int gshift = 0;
    while ((32 << gshift) < w->group) gshift++;
    return cu_launch(st, dim3(gemv_blocks<gemv_q4<M, R>>(w->n, R, sms)), dim3(kThreads), 0, gemv_q4<M, R>,
                     static_cast<const uint4 *>(w->w), w->sz, x, y + w->n0, w->n, w->k, gshift, ldy);
}

template <int M>
cudaError_t launch_bf16(cudaStream_t st, const CuMat *w, const float *x, float *y, int ldy, int sms) {
    constexpr int R = M <= 2 ? 4 : 2;
    const uint4 *wp = static_cast<const uint4 *>(w->w);
    if (w->k % 8 == 0) {
        return cu_launch(st, dim3(gemv_blocks<gemv_bf16<M, R, true>>(w->n, R, sms)), dim3(kThreads), 0,
                         gemv_bf16<M, R, true>, wp, x, y + w->n0, w->n, w->k, w->k_pad, ldy);
    }
    return cu_launch(st, dim3(gemv_blocks<gemv_bf16<M, R, false>>(w->n, R, sms)), dim3(kThreads), 0,
                     gemv_bf16<M, R, false>, wp, x, y + w->n0, w->n, w->k, w->k_pad, ldy);
}

template <int M>
cudaError_t launch_m(cudaStream_t st, const CuMat *w, const float *x, float *y, int ldy, int sms) {
    return w->group ? launch_q4<M>(st, w, x, y, ldy, sms) : launch_bf16<M>(st, w, x, y, ldy, sms);
}

__global__ void to_bf16_kernel(const float *x, __nv_bfloat16 *out, size_t n) {
    pdl_trigger();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(x[i]);
}

/* One thread per word of 8 codes: writes 8 bf16 (16 bytes). */
__global__ void dequant_q4_kernel(const uint32_t *codes, const uint32_t *sz, int k, int gshift, int r0, int rows,
                                  uint4 *out) {
    pdl_trigger();
    pdl_wait();
    const int words = k >> 3, groups = k >> (5 + gshift);
    const size_t total = (size_t)rows * words;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / words;
        const int j = (int)(i % words);
        const uint32_t wv = codes[(r0 + r) * words + j];
        const uint32_t s = sz[(r0 + r) * groups + ((j * 8) >> (5 + gshift))];
        const float sc = bf16_lo(s), ze = bf16_hi(s);
        float f[8];
        q4_word(wv, f);
        uint32_t packed[4];
#pragma unroll
        for (int p = 0; p < 4; p++) {
            __nv_bfloat162 h = __floats2bfloat162_rn(fmaf(f[2 * p], sc, ze), fmaf(f[2 * p + 1], sc, ze));
            packed[p] = *reinterpret_cast<uint32_t *>(&h);
        }
        out[i] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
}

int grid_for(size_t n, int threads) {
    size_t b = (n + threads - 1) / threads;
    return (int)(b < 4096 ? (b ? b : 1) : 4096);
}

} // namespace

cudaError_t cu_gemv(cudaStream_t st, const CuMat *w, const float *x, int M, float *y, int ldy, int sms) {
    if (M <= 0 || w->n <= 0) return cudaSuccess;
    switch (M) {
    case 1: return launch_m<1>(st, w, x, y, ldy, sms);
    case 2: return launch_m<2>(st, w, x, y, ldy, sms);
    case 3: return launch_m<3>(st, w, x, y, ldy, sms);
    case 4: return launch_m<4>(st, w, x, y, ldy, sms);
    case 5: return launch_m<5>(st, w, x, y, ldy, sms);
    case 6: return launch_m<6>(st, w, x, y, ldy, sms);
    case 7: return launch_m<7>(st, w, x, y, ldy, sms);
    case 8: return launch_m<8>(st, w, x, y, ldy, sms);
    default: return cudaErrorInvalidValue;
    }
}

cudaError_t cu_to_bf16(cudaStream_t st, const float *x, __nv_bfloat16 *out, size_t n) {
    if (!n) return cudaSuccess;
    return cu_launch(st, dim3(grid_for(n, 256)), dim3(256), 0, to_bf16_kernel, x, out, n);
}

cudaError_t cu_dequant_q4(cudaStream_t st, const CuMat *w, int r0, int rows, __nv_bfloat16 *out) {
    if (rows <= 0) return cudaSuccess;
    int gshift = 0;
    while ((32 << gshift) < w->group) gshift++;
    size_t total = (size_t)rows * (w->k >> 3);
    return cu_launch(st, dim3(grid_for(total, 256)), dim3(256), 0, dequant_q4_kernel,
                     static_cast<const uint32_t *>(w->w), w->sz, w->k, gshift, r0, rows, reinterpret_cast<uint4 *>(out));
}
