/* cuda_gemv.cu — matrix-vector products for small M (decode), where the only cost that matters
 * is streaming the weights once from HBM: a batch-1 decode step of an int4 8B model reads ~3.7 GB
 * of codes and scales plus 1.25 GB of bf16 lm_head, and nothing else comes close.
 *
 * Two kernels:
 *  - bf16 (lm_head and bf16 models), batch-1 decode only (from M = 2 cuBLAS is as fast):
 *    measured at 100% of a device-to-device copy on an H100 for the large matrices.
 *  - int4 (gemv_q4x below), 1 to 3 tokens (the tensor-core GEMM of cuda_gemm_q4.cu from 4):
 *    integer dot products against x in 16-bit fixed point, weights streamed through a cp.async
 *    ring in shared memory, each weight's codes unpacked once for all tokens.
 *
 * Layout. A warp owns a contiguous range of output rows (split evenly over every warp of a grid
 * sized to the machine, so no multiprocessor gets a whole extra block of work; the int4 kernel
 * splits whole groups of kRows, so no row is read twice) and walks them kRows at a time; its
 * 32 lanes stride along K in 16-byte chunks, so each load of the warp reads 512 contiguous bytes
 * of one row (fully coalesced), and later chunks are requested before the current one is used
 * (loads in flight hide HBM latency). Weights bypass L1: they are used once. The kRows rows of a
 * warp share each x value it loads.
 *
 * int4 codes are in fragment order (cuda_common.cuh: the tensor-core kernels' order, set at load):
 * a 16-byte load still gets one row's 32 columns, in an order the GEMV's x follows; scale and zero
 * are packed into one word per group.
 *
 * Before pdl_wait() a kernel only requests weights, so with programmatic dependent launch the
 * weight stream of one matmul starts while the previous kernels are still finishing. */
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

CU_DEV uint32_t word_of(const uint4 &v, int i) { return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w; }

/* Rows [begin, end) of this warp, an even share of n over all warps of the grid. */
CU_DEV void warp_rows(int n, int *begin, int *end) {
    long long warp = (long long)blockIdx.x * kWarps + (threadIdx.x >> 5), nw = (long long)gridDim.x * kWarps;
    *begin = (int)(warp * n / nw);
    *end = (int)((warp + 1) * n / nw);
}

constexpr int kRows = 4; /* rows a warp works on together (they share each x value it loads) */

/* Sums each of v[0 .. 3] over the warp (6 shuffles where four sums take 20): every lane gets
 * the total of v[lane / 8]. */
CU_DEV float reduce4(const float (&v)[kRows]) {
    static_assert(kRows == 4, "reduce4 sums four rows");
    const int lane = threadIdx.x & 31;
    const bool up16 = lane & 16, up8 = lane & 8;
    /* lanes < 16 keep rows 0, 1 and lanes >= 16 rows 2, 3, each adding its partner's */
    float k0 = up16 ? v[2] : v[0], k1 = up16 ? v[3] : v[1];
    k0 += __shfl_xor_sync(0xffffffffu, up16 ? v[0] : v[2], 16);
    k1 += __shfl_xor_sync(0xffffffffu, up16 ? v[1] : v[3], 16);
    /* then one of the two, by bit 3 of the lane; the rest is a sum over 8 lanes */
    float k = up8 ? k1 : k0;
    k += __shfl_xor_sync(0xffffffffu, up8 ? k0 : k1, 8);
    k += __shfl_xor_sync(0xffffffffu, k, 4);
    k += __shfl_xor_sync(0xffffffffu, k, 2);
    k += __shfl_xor_sync(0xffffffffu, k, 1);
    return k;
}

/* Sums acc over the warp; rows r < nr get scale * sum written to y[row0 + r] (or added, when
 * accumulate: the residual stream's y += x W^T; each element has one writer); clears acc. The
 * lanes that store (lane % 8 == 0, row lane / 8) may pass y's old value in `old` (loaded ahead:
 * residual_of), else it is read here. */
CU_DEV void store_rows(float (&acc)[kRows], float *y, int row0, int nr, float scale, bool accumulate,
                       const float *old = nullptr) {
    const int lane = threadIdx.x & 31, r = lane >> 3;
    const float v = reduce4(acc) * scale;
#pragma unroll
    for (int i = 0; i < kRows; i++) acc[i] = 0.0f;
    if ((lane & 7) == 0 && r < nr) {
        float *dst = y + row0 + r;
        *dst = accumulate ? (old ? *old : __ldcg(dst)) + v : v;
    }
}

/* What store_rows adds to: y[row0 + lane / 8] for the lanes that store it (0 elsewhere). */
CU_DEV float residual_of(const float *y, int row0, int nr) {
    const int lane = threadIdx.x & 31, r = lane >> 3;
    return (lane & 7) == 0 && r < nr ? __ldcg(y + row0 + r) : 0.0f;
}

/* SwiGLU pairs (a gate|up matrix, gate rows [0, pair) over up rows [pair, 2 pair)): row r of
 * group g is gate row 2g + r for r < 2, up row 2g + r - 2 otherwise, so one group's four dot
 * products make h[2g] and h[2g + 1] (store_swiglu_rows). */
CU_DEV int swiglu_pair_row(int g, int r, int pair) { return (r < 2 ? 0 : pair) + 2 * g + (r & 1); }

/* SwiGLU pairs: acc holds group g's rows (swiglu_pair_row); h[2g + i] = silu(scale * gate_i) *
 * (scale * up_i). Clears acc. */
CU_DEV void store_swiglu_rows(float (&acc)[kRows], float *h, int g, float scale) {
    const int lane = threadIdx.x & 31;
    const float v = reduce4(acc) * scale, up = __shfl_down_sync(0xffffffffu, v, 16);
#pragma unroll
    for (int i = 0; i < kRows; i++) acc[i] = 0.0f;
    if (lane == 0 || lane == 8) h[2 * g + (lane >> 3)] = silu_mul(v, up);
}

/* bf16: w [n][k_pad] as 16-byte chunks of 8 columns (k_pad = k rounded up to 8, padding zero).
 * VEC: k is a multiple of 8, so x can be read as float4 (otherwise element by element, with the
 * columns past k skipped).
 *
 * A warp walks its row groups as one flat sequence of items (a group of kRows rows x 32 chunk
 * columns, one 16-byte chunk per lane and row) with the loads of the next item in flight, across
 * group boundaries, so the stream does not drain between groups. (Deeper: 4 items ahead, 2
 * blocks per multiprocessor instead of 3, made a Qwen3-8B bf16 decode step slower on an H100,
 * 6.14 -> 6.37 ms, and 6 or 8 ahead slower still; x' staged in shared memory instead of read per
 * item: 6.21 -> 6.39 at best.)
 *
 * With norm_w the product is with RMSNorm(x): each warp multiplies x by norm_w as it loads it and
 * scales its dot products by 1 / rms(x), whose sum of squares it takes from the loads of its
 * first group (its lanes read all of x for each row group), which saves the separate norm
 * kernel's launch. With pair > 0 (the MLP's gate|up, rows [0, pair) gate and [pair, 2 pair) up)
 * group g is gate rows 2g, 2g + 1 and up rows 2g, 2g + 1, and the warp writes SwiGLU's
 * h[2g], h[2g + 1] = silu(gate) * up to y instead of the product. */
constexpr int kBf16Depth = 2; /* items in flight per warp */

struct Bf16Rows { /* which rows a warp's group g (0-based in the warp's range) covers */
    const uint4 *w;
    int chunks, begin, end, pair;
    __device__ __forceinline__ const uint4 *row(int g, int r) const {
        const int i = pair ? swiglu_pair_row(begin + g, r, pair) : min(begin + g * kRows + r, end - 1);
        return w + (size_t)i * chunks;
    }
};

template <bool VEC, bool SPLIT>
__global__ void __launch_bounds__(kThreads) gemv_bf16(const uint4 *__restrict__ w, const float *x, float *y, int n,
                                                      int k, int k_pad, const float *norm_w, float eps,
                                                      bool accumulate, int pair) {
    pdl_trigger();
    constexpr int D = kBf16Depth;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, chunks = k_pad >> 3;
    int iters = (chunks + 31) >> 5, it0 = 0; /* chunk columns of a group this warp walks */
    Bf16Rows rows{w, chunks, 0, 0, pair};
    if (SPLIT) { /* one group per warp pair, each warp half of its columns */
        const int g = blockIdx.x * (kWarps / 2) + (warp >> 1), half = (iters + 1) / 2;
        rows.begin = pair ? g : g * kRows;
        rows.end = pair ? min(g + 1, pair / 2) : min(n, rows.begin + kRows);
        it0 = (warp & 1) * half;
        iters = min(iters - it0, half);
    } else {
        warp_rows(pair ? pair / 2 : n, &rows.begin, &rows.end);
    }
    const int groups = max(0, pair ? rows.end - rows.begin : (rows.end - rows.begin + kRows - 1) / kRows);
    const int total = groups * iters; /* items of this warp */
    uint4 q[D][kRows];
    int lg = 0, lit = 0; /* the next item to request */
    auto request = [&](uint4(&dst)[kRows]) {
        const int c = (it0 + lit) * 32 + lane;
        if (c < chunks) {
#pragma unroll
            for (int r = 0; r < kRows; r++) dst[r] = ld_weights(rows.row(lg, r) + c);
        }
        if (++lit == iters) lit = 0, lg++;
    };
#pragma unroll
    for (int d = 0; d < D; d++)
        if (d < total) request(q[d]);
    pdl_wait();
    float acc[kRows] = {}, ss = 0.0f, scale = 1.0f; /* scale: 1 / rms(x) once known */
    int g = 0, it = 0; /* the item being used */
    for (int i0 = 0; i0 < total; i0 += D) {
#pragma unroll
        for (int d = 0; d < D; d++) {
            if (i0 + d >= total) break; /* warp-uniform */
            const int c = (it0 + it) * 32 + lane;
            if (c < chunks) {
                float xv[8];
                const float *xp = x + c * 8;
                if (VEC) {
                    const float4 a = reinterpret_cast<const float4 *>(xp)[0];
                    const float4 b = reinterpret_cast<const float4 *>(xp)[1];
                    xv[0] = a.x, xv[1] = a.y, xv[2] = a.z, xv[3] = a.w, xv[4] = b.x, xv[5] = b.y, xv[6] = b.z, xv[7] = b.w;
                } else {
#pragma unroll
                    for (int j = 0; j < 8; j++) xv[j] = c * 8 + j < k ? xp[j] : 0.0f;
                }
                if (norm_w) {
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        if (g == 0) ss = fmaf(xv[j], xv[j], ss);
                        xv[j] *= c * 8 + j < k ? __ldg(norm_w + c * 8 + j) : 0.0f;
                    }
                }
#pragma unroll
                for (int r = 0; r < kRows; r++) {
#pragma unroll
                    for (int wi = 0; wi < 4; wi++) {
                        const uint32_t wv = word_of(q[d][r], wi);
                        acc[r] = fmaf(xv[2 * wi + 1], bf16_hi(wv), fmaf(xv[2 * wi], bf16_lo(wv), acc[r]));
                    }
                }
            }
            if (i0 + d + D < total) request(q[d]); /* the slot's data is in acc by now */
            if (++it == iters && !SPLIT) {
                if (norm_w && g == 0) scale = 1.0f / sqrtf(warp_sum(ss) / (float)k + eps);
                if (pair)
                    store_swiglu_rows(acc, y, rows.begin + g, scale);
                else
                    store_rows(acc, y, rows.begin + g * kRows, min(kRows, rows.end - rows.begin - g * kRows), scale,
                               accumulate);
                it = 0, g++;
            }
        }
    }
    if (SPLIT) { /* the even warp of each pair adds its partner's sums and stores */
        __shared__ float part[kWarps][kRows + 1]; /* row sums, then the sum of squares */
        const float v = reduce4(acc), sq = warp_sum(ss);
        if ((lane & 7) == 0) part[warp][lane >> 3] = v;
        if (lane == 0) part[warp][kRows] = sq;
        __syncthreads();
        if ((warp & 1) == 0 && groups > 0 && lane < kRows) {
            if (norm_w) scale = 1.0f / sqrtf((part[warp][kRows] + part[warp + 1][kRows]) / (float)k + eps);
            const float t = (part[warp][lane] + part[warp + 1][lane]) * scale;
            if (pair) {
                const float up = __shfl_down_sync(0xfu, t, 2);
                if (lane < 2) y[2 * rows.begin + lane] = silu_mul(t, up);
            } else if (lane < rows.end - rows.begin) {
                float *dst = y + rows.begin + lane;
                *dst = accumulate ? __ldcg(dst) + t : t;
            }
        }
    }
}

/* ---- int4: integer dot products against x in 16-bit fixed point ------------------------------ *
 *
 * At batch 1 a float dequantizing kernel spends ~4 instructions per weight (unpack, convert, FMA)
 * and so cannot keep HBM busy. Here each block first writes x, per 32-column chunk, as int8 pairs
 * x ~ xs * (h + l / 256) (h = round(x / xs), l = round of the remainder * 256; xs = max|x| / 127;
 * error <= max|x| / 65024 per element) into shared memory, in the nibble order of the codes and
 * in planes that a warp reads without bank conflicts. A row's chunk is then 16 dp4a (4 int8
 * products each) on the codes' two nibble planes, exact in int32, and one float step:
 * s * xs * ((sum h q - 8 sum h) + (sum l q - 8 sum l) / 256) + z * sum x. About 1.1 instructions
 * per weight.
 *
 * When the matmul is fed by a layer's RMSNorm, the block quantizes g * x (the norm weight applied)
 * and multiplies each dot product by 1 / rms(x), a block-wide sum of squares taken from the same
 * loads (the separate norm kernel, or a second pass over x, would cost more in latency than it
 * saves); the residual add of o/down projections happens in the final store. (Making the down
 * projection's SwiGLU input the same way was slower on the H100: 15.4 vs 13.4 us per launch, every
 * block reading both halves of the 12288-wide gate_up row and taking 12288 exponentials, against
 * about 1 us for the separate SwiGLU kernel inside a decode step.)
 *
 * Weights stream through a per-warp ring in shared memory filled by cp.async (kQStages items of
 * 4 rows x 512 bytes ahead, 120 KB per multiprocessor in flight), walked as one flat sequence of
 * (row group, chunk column) items so the stream never drains between row groups. The first items
 * are requested before pdl_wait(): a block that starts while the previous kernels run has its
 * weights arriving by the time x is ready. One block of 12 warps per multiprocessor: the dot
 * products are latency-bound (ncu, H100: 2 warps per scheduler issued once per 5.7 cycles), so
 * more warps with shallower rings beat fewer with deeper ones.
 *
 * Two or three tokens (small decode batches) share the weight stream: the block quantizes every
 * token's x' (one after another in shared memory), and each item's codes, unpacked once, feed
 * every token's dp4a. Being latency-bound at one token, the kernel takes the second almost for
 * free (a step's matmuls: 1.72 ms at M = 1, 2.18 at 2, 2.58 at 3).
 *
 * The MLP's gate|up (cu_gemv_swiglu) walks SwiGLU pairs: item rows are gate rows 2g, 2g + 1 and
 * up rows 2g, 2g + 1, so the warp that reduces them writes h = silu(gate) * up and no SwiGLU
 * kernel runs between gate|up and down (H100, batch-1 Qwen3-8B step 2.634-2.643 -> 2.588-2.592
 * ms, same call). */

constexpr int kQBatch = 4; /* x loads issued together while quantizing (12 was slower on the H100) */
constexpr int kQSlot = kRows * 32 * (16 + 4); /* one item: 16-byte chunks, then 4-byte scale words */

/* x' quantized per 32-column chunk c. The h bytes of a chunk are 8 words, in the order of the
 * codes' nibbles (fragment order, cuda_common.cuh): word 2t holds the columns of nibbles 0, 2, 4, 6 of
 * code word t (2t, 2t + 16, 2t + 1, 2t + 17: the bytes of `codes & 0x0f0f0f0f`) and word 2t + 1
 * those of nibbles 1, 3, 5, 7 (2t + 8, 2t + 24, 2t + 9, 2t + 25), int8 each; plane 0 holds words
 * 0-3 of every chunk, plane 1 words 4-7, planes 2 and 3 the l bytes likewise. Plane-major, so the
 * 32 lanes of a warp reading chunks c .. c + 31 of one plane read 512 contiguous bytes (no bank
 * conflicts). */
struct XQuant {
    uint32_t *words; /* [4][chunks][4] */
    struct XParam *param;
    int chunks;
};
struct XParam {
    float xs;   /* scale of the chunk */
    int sh8;    /* 8 * sum of h (the "- 8" of the codes, in integers) */
    int sl8;    /* 8 * sum of l */
    float xsum; /* sum of x (times the zero) */
};
/* Shared-memory bytes of an XQuant of k columns, and the view of it at p. */
__host__ __device__ constexpr size_t xquant_bytes(int k) { return (size_t)(k >> 5) * (64 + sizeof(XParam)); }
CU_DEV XQuant xquant_at(void *p, int k) {
    XQuant q;
    q.chunks = k >> 5;
    q.words = static_cast<uint32_t *>(p);
    q.param = reinterpret_cast<XParam *>(q.words + (size_t)q.chunks * 16);
    return q;
}

/* A warp's walk over its items of one int4 weight matrix of n rows, each `chunks` 16-byte chunks
 * (of 32 columns) long. An item is a group of kRows rows (g) times 32 consecutive chunks (column
 * it of iters): 512 contiguous bytes of each row, one 16-byte chunk per lane. sz: the scale words
 * ([n][cu_sz_ld], group = 32 << gshift columns). */
struct WeightStream {
    const uint4 *w;
    const uint32_t *sz;
    int n, chunks, sz_ld, gshift, iters; /* sz_ld: scale words per row */
    int pair; /* > 0: SwiGLU pairs, group g's rows as swiglu_pair_row says */
    int count; /* items left */
    int g, it; /* the current item */
};

/* The walk over row groups [g0, g1), each whole, in order. */
CU_DEV WeightStream weight_stream(const void *w, const uint32_t *sz, int n, int chunks, int gshift, int g0, int g1,
                                  int pair) {
    WeightStream s;
    s.pair = pair;
    s.w = static_cast<const uint4 *>(w);
    s.sz = sz;
    s.n = n;
    s.chunks = chunks;
    s.gshift = gshift;
    s.sz_ld = cu_sz_ld(chunks * 32, 32 << gshift);
    s.iters = (chunks + 31) >> 5;
    s.count = (g1 - g0) * s.iters;
    s.g = g0;
    s.it = 0;
    return s;
}

CU_DEV void walk_next(WeightStream &s) {
    s.count--;
    if (++s.it == s.iters) s.it = 0, s.g++;
}

/* Requests the current item into `slot` for this lane (nothing past the row's chunks; rows past
 * the matrix repeat its last row). Does not commit the cp.async group. */
CU_DEV void issue_item(const WeightStream &s, int lane, char *slot) {
    const int c = s.it * 32 + lane;
    if (c >= s.chunks) return;
#pragma unroll
    for (int r = 0; r < kRows; r++) {
        const int row = s.pair ? swiglu_pair_row(s.g, r, s.pair) : min(s.g * kRows + r, s.n - 1);
        cp_async16(slot + (r * 32 + lane) * 16, s.w + (size_t)row * s.chunks + c);
        cp_async4(slot + kRows * 512 + (r * 32 + lane) * 4, s.sz + (size_t)row * s.sz_ld + (c >> s.gshift));
    }
}

/* All threads of the block: x' (q.chunks * 32 values; load(col) returns x'[col .. col + 3]) into
 * q. Eight threads per chunk, thread j loading columns 4j .. 4j + 3 (column pairs 2j, 2j + 1); each
 * thread's next kQBatch loads are issued before any is used. A word needs pairs p and p + 8, which
 * threads j and j ^ 4 hold: thread j < 4 makes the word of p = 2j (its first pair and its
 * partner's), thread j + 4 the word of p = 2j + 1 (its partner's second pair and its own), so one
 * exchange per word suffices. No barrier at the end. */
template <class Load>
CU_DEV void quantize_x(Load load, const XQuant &q) {
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer in the low bits */
    const int tasks = q.chunks * 8, rounds = (tasks + blockDim.x - 1) / blockDim.x;
    for (int rd0 = 0; rd0 < rounds; rd0 += kQBatch) { /* every lane takes part in the shuffles */
        float4 vb[kQBatch];
#pragma unroll
        for (int b = 0; b < kQBatch; b++) {
            const int task = (rd0 + b) * blockDim.x + threadIdx.x;
            vb[b] = task < tasks ? load((task >> 3) * 32 + (task & 7) * 4) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        }
#pragma unroll
        for (int b = 0; b < kQBatch; b++) {
            const int task = (rd0 + b) * blockDim.x + threadIdx.x;
            const int c = task >> 3, j = task & 7;
            const float4 v = vb[b];
            float amax = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            const float vals[4] = {v.x, v.y, v.z, v.w};
            uint32_t hw = 0, lw = 0; /* this thread's 4 columns as bytes, h and l */
            int sh = 0, sl = 0;
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float t = fmaf(vals[i], inv, magic), h = t - magic;
                const float lf = fminf(fmaxf(fmaf(vals[i], inv, -h) * 256.0f, -127.0f), 127.0f);
                /* the low byte is the integer, two's complement */
                const uint32_t hb = __float_as_uint(t) & 0xffu, lb = __float_as_uint(lf + magic) & 0xffu;
                hw |= hb << (8 * i);
                lw |= lb << (8 * i);
                sh += (int)(hb << 24) >> 24;
                sl += (int)(lb << 24) >> 24;
            }
            /* the word of pair p (p < 8: word 2p below 4, else 2 (p - 4) + 1) has bytes (p even column,
             * p + 8 even, p odd, p + 8 odd) */
            const bool up = j & 4;
            const int p = up ? 2 * j - 7 : 2 * j, w = p < 4 ? 2 * p : 2 * (p - 4) + 1;
            const uint32_t sel = up ? 0x3726u : 0x5140u; /* bytes of (own, partner) */
            const uint32_t hp = __shfl_xor_sync(0xffffffffu, hw, 4), lp = __shfl_xor_sync(0xffffffffu, lw, 4);
            float xsum = (v.x + v.y) + (v.z + v.w);
#pragma unroll
            for (int o = 1; o < 8; o <<= 1) {
                sh += __shfl_xor_sync(0xffffffffu, sh, o);
                sl += __shfl_xor_sync(0xffffffffu, sl, o);
                xsum += __shfl_xor_sync(0xffffffffu, xsum, o);
            }
            if (task < tasks) {
                q.words[((size_t)(w >> 2) * q.chunks + c) * 4 + (w & 3)] = __byte_perm(hw, hp, sel);
                q.words[((size_t)(2 + (w >> 2)) * q.chunks + c) * 4 + (w & 3)] = __byte_perm(lw, lp, sel);
                if (j == 0) q.param[c] = XParam{amax * (1.0f / 127.0f), 8 * sh, 8 * sl, xsum};
            }
        }
    }
}

/* x'[col .. col + 3] for the matmul inputs: x itself, or g * x (RMSNorm(x) = g * x / rms(x): the
 * 1 / rms is applied to the dot products, it does not change the quantization). */
CU_DEV float4 ld4(const float *p) { return __ldcg(reinterpret_cast<const float4 *>(p)); }
/* g * x at col, adding x's squares to ss (for the 1 / rms) */
CU_DEV float4 scaled4(const float *x, const float *g, int col, float &ss) {
    const float4 v = ld4(x + col), w = __ldg(reinterpret_cast<const float4 *>(g + col));
    ss = fmaf(v.x, v.x, fmaf(v.y, v.y, fmaf(v.z, v.z, fmaf(v.w, v.w, ss))));
    return make_float4(w.x * v.x, w.y * v.y, w.z * v.z, w.w * v.w);
}
/* acc[t][r] += the warp's part of row r's dot product with token t's x' over chunk c (this
 * lane's 32 columns), from an int4 item in `slot`, for the M tokens of xq (token t's chunks
 * follow token t - 1's; kc chunks per token). The codes are unpacked once for all tokens. */
template <int M>
CU_DEV void q4_item(const char *slot, int lane, const XQuant &xq, int kc, int c, float (&acc)[M][kRows]) {
    int lo[kRows][4], hi[kRows][4]; /* the nibbles of even and odd columns */
    float sc[kRows], ze[kRows];
#pragma unroll
    for (int r = 0; r < kRows; r++) {
        const uint4 q = *reinterpret_cast<const uint4 *>(slot + (r * 32 + lane) * 16);
        const uint32_t s = *reinterpret_cast<const uint32_t *>(slot + kRows * 512 + (r * 32 + lane) * 4);
#pragma unroll
        for (int wi = 0; wi < 4; wi++) {
            const uint32_t cw = word_of(q, wi);
            lo[r][wi] = (int)(cw & 0x0f0f0f0fu), hi[r][wi] = (int)((cw >> 4) & 0x0f0f0f0fu);
        }
        sc[r] = bf16_lo(s), ze[r] = bf16_hi(s);
    }
    const uint4 *planes = reinterpret_cast<const uint4 *>(xq.words);
#pragma unroll
    for (int t = 0; t < M; t++) {
        const int ct = t * kc + c;
        const uint4 xh[2] = {planes[ct], planes[xq.chunks + ct]};
        const uint4 xl[2] = {planes[2 * xq.chunks + ct], planes[3 * xq.chunks + ct]};
        const XParam p = xq.param[ct];
#pragma unroll
        for (int r = 0; r < kRows; r++) {
            int ih = 0, il = 0;
#pragma unroll
            for (int wi = 0; wi < 4; wi++) {
                const uint4 &h = xh[wi >> 1], &l = xl[wi >> 1];
                ih = __dp4a((int)word_of(h, 2 * (wi & 1)), lo[r][wi], ih);
                ih = __dp4a((int)word_of(h, 2 * (wi & 1) + 1), hi[r][wi], ih);
                il = __dp4a((int)word_of(l, 2 * (wi & 1)), lo[r][wi], il);
                il = __dp4a((int)word_of(l, 2 * (wi & 1) + 1), hi[r][wi], il);
            }
            const float dot = p.xs * fmaf((float)(il - p.sl8), 1.0f / 256.0f, (float)(ih - p.sh8));
            acc[t][r] = fmaf(sc[r], dot, fmaf(ze[r], p.xsum, acc[t][r]));
        }
    }
}

/* 1 / sqrt(ss / k + eps), ss summed over the block (two barriers inside; red holds 32 floats). */
CU_DEV float block_inv_rms(float ss, int k, float eps, float *red) {
    return 1.0f / sqrtf(block_sum(ss, red) / (float)k + eps);
}

/* Tokens the int4 GEMV takes per launch: it beats the tensor-core GEMM up to 3 (H100, one
 * Qwen3-8B step's matmuls, ms, GEMV vs mma.sync GEMM: M = 2 2.18 vs 2.86, 3 2.58 vs 2.87, 4 3.02
 * vs 2.87), each token costing its x prologue and 16 dp4a per 32 weights and row. */
constexpr int kQ4GemvMaxM = 3;
constexpr int kQThreads = 384;
/* Ring depth of the fixed-point kernel: items of 2.5 KB per warp in flight (H100, batch-1
 * Qwen3-8B step, bench_cuda_decode: 8 warps x 6 stages 2.81 ms, 16 x 3 2.74 ms, 16 x 4 2.76 ms,
 * 12 x 4 2.71 ms). Rings small enough for two blocks per multiprocessor, so that the next
 * matmul's blocks start their loads beside the current one's, lose: the small matmuls gain
 * (o 6.4 -> 5.3 us) but the step does not (12 x 2 3.31 ms, 16 x 2 3.38, 8 x 3 3.16, 8 x 4 2.98,
 * against 2.65 for 12 x 4 in the same run). */
constexpr int kQStages = 4;
constexpr int kQWarps = kQThreads / 32;

/* M tokens (1 .. kQ4GemvMaxM): x and y rows ldx and ldy apart. pair > 0: w is a gate|up matrix
 * (n = 2 pair), each warp's row groups are SwiGLU pairs (WeightStream) and y receives h [M][pair]. */
template <int M>
__global__ void __launch_bounds__(kQThreads) gemv_q4x(const uint4 *__restrict__ codes, const uint32_t *__restrict__ sz,
                                                      const float *x, int ldx, float *y, int ldy, int n, int k,
                                                      int gshift, const float *norm_w, float eps, bool accumulate,
                                                      int pair) {
    extern __shared__ uint4 q4x_smem[];
    __shared__ float red[32];
    pdl_trigger();
    const int lane = threadIdx.x & 31, kc = k >> 5;
    const XQuant xq = xquant_at(q4x_smem, M * k); /* the tokens one after another */
    /* whole row groups, an even share of them per warp of the grid */
    const long long warp = (long long)blockIdx.x * kQWarps + (threadIdx.x >> 5), nw = (long long)gridDim.x * kQWarps;
    const long long row_groups = (n + kRows - 1) / kRows;
    WeightStream w = weight_stream(codes, sz, n, kc, gshift, (int)(warp * row_groups / nw),
                                   (int)((warp + 1) * row_groups / nw), pair);
    WeightStream ahead = w; /* the next item to request */
    char *ring =
        reinterpret_cast<char *>(q4x_smem) + xquant_bytes(M * k) + (size_t)(threadIdx.x >> 5) * kQStages * kQSlot;
    /* one cp.async group per item, empty or not, so groups and items stay in step */
    auto request = [&](char *slot) {
        if (ahead.count > 0) {
            issue_item(ahead, lane, slot);
            walk_next(ahead);
        }
        cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < kQStages; i++) request(ring + i * kQSlot);

    pdl_wait();
    float scale[M]; /* RMSNorm's 1 / rms per token, applied to the dot products */
    /* column col of the tokens' concatenated x' (a multiple of 4: never across two tokens) */
    auto token_of = [&](int col) {
        int t = 0;
#pragma unroll
        for (int i = 1; i < M; i++) t += col >= i * k;
        return t;
    };
    if (norm_w) {
        float ss[M] = {};
        quantize_x([&](int col) {
            const int t = token_of(col), c = col - t * k;
            float part = 0.0f;
            const float4 v = scaled4(x + (size_t)t * ldx, norm_w, c, part);
#pragma unroll
            for (int i = 0; i < M; i++) ss[i] += i == t ? part : 0.0f;
            return v;
        }, xq);
#pragma unroll
        for (int t = 0; t < M; t++) scale[t] = block_inv_rms(ss[t], k, eps, red);
    } else {
        quantize_x([&](int col) {
            const int t = token_of(col);
            return ld4(x + (size_t)t * ldx + (col - t * k));
        }, xq);
#pragma unroll
        for (int t = 0; t < M; t++) scale[t] = 1.0f;
    }
    __syncthreads();

    float acc[M][kRows] = {};
    /* accumulate: the residual of the current row group, loaded at its first item so that the
     * load's latency hides behind the group's dot products instead of adding to the kernel's tail
     * (H100, Qwen3-8B batch-1 decode step 2.541-2.548 -> 2.531-2.536 ms, down 14.9 -> 14.7 us) */
    float resid[M] = {};
    for (int item = 0; w.count > 0; item++) { /* warp-uniform */
        if (accumulate && w.it == 0) {
#pragma unroll
            for (int t = 0; t < M; t++)
                resid[t] = residual_of(y + (size_t)t * ldy, w.g * kRows, min(kRows, n - w.g * kRows));
        }
        cp_async_wait<kQStages - 1>(); /* this item's group has landed */
        char *slot = ring + (item % kQStages) * kQSlot;
        if (w.it * 32 + lane < w.chunks) q4_item<M>(slot, lane, xq, kc, w.it * 32 + lane, acc);
        if (w.it == w.iters - 1) {
#pragma unroll
            for (int t = 0; t < M; t++) {
                if (pair)
                    store_swiglu_rows(acc[t], y + (size_t)t * ldy, w.g, scale[t]);
                else
                    store_rows(acc[t], y + (size_t)t * ldy, w.g * kRows, min(kRows, n - w.g * kRows), scale[t],
                               accumulate, &resid[t]);
            }
        }
        request(slot); /* the slot's data is in registers by now */
        walk_next(w);
    }
    cp_async_wait<0>();
}

size_t q4x_smem_bytes(int k, int M) { return xquant_bytes(M * k) + (size_t)kQWarps * kQStages * kQSlot; }

/* Grid of whole waves: enough blocks that every warp gets about kRows rows, capped at what fits
 * on the machine at once (so no second partial wave leaves most multiprocessors idle). The
 * occupancy query runs once per kernel (Kern is the kernel itself, so each has its own cached
 * value). */
template <auto Kern>
int gemv_blocks(int n, int sms) {
    static int per_sm = 0;
    if (!per_sm) {
        int b = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&b, Kern, kThreads, 0) != cudaSuccess || b < 1) b = 1;
        per_sm = b;
    }
    long long want_warps = ((long long)n + kRows - 1) / kRows;
    long long per = (want_warps + (long long)sms * kWarps - 1) / ((long long)sms * kWarps);
    if (per < 1) per = 1;
    if (per > per_sm) per = per_sm;
    return (int)(per * sms);
}

struct GemvArgs { /* what every launcher passes on */
    const CuMat *w;
    const float *x, *norm_w;
    int M, ldx, ldy;
    float *y;
    int sms;
    float eps;
    bool accumulate;
    int pair; /* SwiGLU pairs */
};

/* Narrow matrices (every group of rows twice in one wave of 3 blocks per multiprocessor) split
 * each group's columns over two warps: an H100 streamed Qwen3-8B's o and down at ~76% of its
 * copy rate with one warp per group (8 warps per multiprocessor, ncu: 12% occupancy, stalls on
 * the loads), gate_up (24 warps) at 98%. */
template <bool VEC>
cudaError_t launch_bf16_as(const GemvArgs &a, cudaStream_t st) {
    const CuMat *w = a.w;
    const uint4 *wp = static_cast<const uint4 *>(w->w);
    const long long groups = a.pair ? a.pair / 2 : ((long long)w->n + kRows - 1) / kRows;
    if (2 * groups <= 3LL * a.sms * kWarps)
        return cu_launch(st, dim3((unsigned)((groups + kWarps / 2 - 1) / (kWarps / 2))), dim3(kThreads), 0,
                         gemv_bf16<VEC, true>, wp, a.x, a.y + w->n0, w->n, w->k, w->k_pad, a.norm_w, a.eps,
                         a.accumulate, a.pair);
    return cu_launch(st, dim3(gemv_blocks<gemv_bf16<VEC, false>>(w->n, a.sms)), dim3(kThreads), 0,
                     gemv_bf16<VEC, false>, wp, a.x, a.y + w->n0, w->n, w->k, w->k_pad, a.norm_w, a.eps, a.accumulate,
                     a.pair);
}

cudaError_t launch_bf16(const GemvArgs &a, cudaStream_t st) {
    return a.w->k % 8 == 0 ? launch_bf16_as<true>(a, st) : launch_bf16_as<false>(a, st);
}

/* The fixed-point kernel for M tokens (when their x and the ring fit in shared memory): one
 * block per multiprocessor. */
template <int M>
cudaError_t launch_q4x(const GemvArgs &a, cudaStream_t st) {
    const size_t smem = q4x_smem_bytes(a.w->k, M);
    static size_t smem_set = 0; /* the largest opt-in so far (per M) */
    if (smem > smem_set) {
        cudaError_t rc = cudaFuncSetAttribute(gemv_q4x<M>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        /* the whole carveout as shared memory, so the next kernel's block fits beside this one */
        if (rc == cudaSuccess)
            rc = cudaFuncSetAttribute(gemv_q4x<M>, cudaFuncAttributePreferredSharedMemoryCarveout, 100);
        if (rc != cudaSuccess) return rc;
        smem_set = smem;
    }
    return cu_launch(st, dim3((unsigned)a.sms), dim3(kQThreads), smem, gemv_q4x<M>, static_cast<const uint4 *>(a.w->w),
                     a.w->sz, a.x, a.ldx, a.y + a.w->n0, a.ldy, a.w->n, a.w->k, cu_group_shift(a.w), a.norm_w, a.eps,
                     a.accumulate, a.pair);
}

/* The fixed-point kernel for a.M tokens (1 .. kQ4GemvMaxM). */
cudaError_t launch_q4x_tokens(const GemvArgs &a, cudaStream_t st) {
    static_assert(kQ4GemvMaxM == 3, "one case per token count");
    switch (a.M) {
    case 1: return launch_q4x<1>(a, st);
    case 2: return launch_q4x<2>(a, st);
    default: return launch_q4x<3>(a, st);
    }
}

bool use_q4x(const CuMat *w, int M) {
    return w->group && M >= 1 && M <= kQ4GemvMaxM && q4x_smem_bytes(w->k, M) <= (size_t)220 << 10;
}

__global__ void to_bf16_kernel(const float *x, __nv_bfloat16 *out, size_t n) {
    pdl_trigger();
    pdl_wait();
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] = __float2bfloat16_rn(x[i]);
}

/* One thread per 8 columns (16 bytes of bf16 out, in column order), each (q - 8) * scale + zero
 * rounded once: columns 8u + 2i, 8u + 2i + 1 of a chunk (i = 0 .. 3) are nibbles u and u + 4 of
 * its word i (fragment order), so the 4 threads of a chunk each read the chunk's 16 bytes. A byte
 * permute drops a nibble q into the mantissa of 2^23 and one float subtract of 2^23 + 8 leaves
 * exactly q - 8 (no integer-to-float conversion). */
__global__ void dequant_q4_kernel(const uint4 *codes, const uint32_t *sz, int k, int gshift, int r0, int rows,
                                  uint4 *out) {
    pdl_trigger();
    pdl_wait();
    const int units = k >> 3, sz_ld = cu_sz_ld(k, 32 << gshift);
    const float off = 8388616.0f; /* 2^23 + 8 */
    const size_t total = (size_t)rows * units;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (size_t)gridDim.x * blockDim.x) {
        const size_t r = i / units;
        const int j = (int)(i % units), c = j >> 2, u = j & 3;
        const uint4 v = codes[(r0 + r) * (units >> 2) + c];
        const uint32_t s = sz[(r0 + r) * sz_ld + (c >> gshift)];
        const float sc = bf16_lo(s), ze = bf16_hi(s);
        uint32_t packed[4];
#pragma unroll
        for (int p = 0; p < 4; p++) {
            const uint32_t w = word_of(v, p) >> (4 * u);
            const float lo = __uint_as_float(0x4b000000u | (w & 15u)) - off;
            const float hi = __uint_as_float(0x4b000000u | (w >> 16 & 15u)) - off;
            __nv_bfloat162 h = __floats2bfloat162_rn(fmaf(lo, sc, ze), fmaf(hi, sc, ze));
            packed[p] = *reinterpret_cast<uint32_t *>(&h);
        }
        out[i] = make_uint4(packed[0], packed[1], packed[2], packed[3]);
    }
}

/* One thread per 32-column chunk: the checkpoint's 16 bytes (byte b = columns 2b, 2b + 1) into
 * fragment order, in place. Runs once at load, outside any step's launch chain, so it is launched
 * plainly (no programmatic dependent launch, no pdl_wait). */
__global__ void q4_to_fragment_order_kernel(uint4 *codes, size_t chunks) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < chunks; i += (size_t)gridDim.x * blockDim.x) {
        const uint4 v = codes[i];
        uint32_t out[4];
#pragma unroll
        for (int t = 0; t < 4; t++) {
            out[t] = 0;
#pragma unroll
            for (int j = 0; j < 4; j++) { /* columns 2t + 8j and 2t + 8j + 1: byte t of word j */
                const uint32_t b = (word_of(v, j) >> (8 * t)) & 0xffu;
                out[t] |= (b & 15u) << (4 * j) | (b >> 4) << (16 + 4 * j);
            }
        }
        codes[i] = make_uint4(out[0], out[1], out[2], out[3]);
    }
}

int grid_for(size_t n, int threads) {
    size_t b = (n + threads - 1) / threads;
    return (int)(b < 4096 ? (b ? b : 1) : 4096);
}

/* The GEMV for a's matrix and token count: int4 as use_q4x allows, bf16 at one token. */
cudaError_t launch_gemv(const GemvArgs &a, cudaStream_t st) {
    if (use_q4x(a.w, a.M)) return launch_q4x_tokens(a, st);
    return a.w->group || a.M != 1 ? cudaErrorInvalidValue : launch_bf16(a, st);
}

} // namespace

bool cu_gemv_takes(const CuMat *w, int M) { return use_q4x(w, M); }

bool cu_gemv_fuses_norm(const CuMat *w, int sms) {
    if (w->group) return true; /* int4: the block quantizes the normed x once */
    /* bf16: each warp applies the norm weight again for every group of rows it walks, which
     * costs more than the separate norm kernel once warps walk many (H100, a 151936-row lm_head:
     * decode step 2.630 -> 2.683 ms) */
    const int blocks =
        w->k % 8 == 0 ? gemv_blocks<gemv_bf16<true, false>>(w->n, sms) : gemv_blocks<gemv_bf16<false, false>>(w->n, sms);
    return (long long)w->n <= 2LL * kRows * kWarps * blocks;
}

cudaError_t cu_gemv(cudaStream_t st, const CuMat *w, const float *x, int ldx, int M, float *y, int ldy, int sms,
                    const float *norm_w, float eps, bool accumulate) {
    if (w->n <= 0 || M <= 0) return cudaSuccess;
    return launch_gemv(GemvArgs{w, x, norm_w, M, ldx, ldy, y, sms, eps, accumulate, 0}, st);
}

cudaError_t cu_gemv_swiglu(cudaStream_t st, const CuMat *w, const float *x, int ldx, int M, float *h, int ldh, int sms,
                           const float *norm_w, float eps) {
    if (w->n <= 0 || M <= 0) return cudaSuccess;
    if (w->n % 4 || w->n0) return cudaErrorInvalidValue;
    return launch_gemv(GemvArgs{w, x, norm_w, M, ldx, ldh, h, sms, eps, false, w->n / 2}, st);
}

cudaError_t cu_to_bf16(cudaStream_t st, const float *x, __nv_bfloat16 *out, size_t n) {
    if (!n) return cudaSuccess;
    return cu_launch(st, dim3(grid_for(n, 256)), dim3(256), 0, to_bf16_kernel, x, out, n);
}

cudaError_t cu_dequant_q4(cudaStream_t st, const CuMat *w, int r0, int rows, __nv_bfloat16 *out) {
    if (rows <= 0) return cudaSuccess;
    size_t total = (size_t)rows * (w->k >> 3);
    return cu_launch(st, dim3(grid_for(total, 256)), dim3(256), 0, dequant_q4_kernel, static_cast<const uint4 *>(w->w),
                     w->sz, w->k, cu_group_shift(w), r0, rows, reinterpret_cast<uint4 *>(out));
}

cudaError_t cu_q4_to_fragment_order(cudaStream_t st, void *codes, int rows, int k) {
    const size_t chunks = (size_t)rows * (size_t)(k >> 5);
    if (!chunks) return cudaSuccess;
    q4_to_fragment_order_kernel<<<grid_for(chunks, 256), 256, 0, st>>>(static_cast<uint4 *>(codes), chunks);
    return cudaGetLastError();
}
