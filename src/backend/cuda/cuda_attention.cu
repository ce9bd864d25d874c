/* cuda_attention.cu — the attention op: q / k RMSNorm + RoPE, the step's K/V stored in the paged
 * bf16 cache, and causal GQA attention over that cache.
 *
 * Decode (every sequence has one new token; the shape captured in CUDA graphs). One token's work
 * is tiny but its context can be long, so the context is split (flash-decoding): block
 * (split, kv head, sequence) covers an even share of the context, computed on the device from
 * ctx_len (the split count depends only on the number of sequences, so a captured graph stays
 * valid as the context grows). Each block writes an unnormalised partial (output, max, sum); the
 * last block to arrive at a (sequence, kv head) combines them (a counter per pair, reset by that
 * block), which saves a second launch per layer. Both decode kernels also do the qk-norm
 * kernel's work for their token (q and k RMSNorm + RoPE, K/V stored), which saves its launch: one
 * link less per layer in the decode chain (H100, batch-1 step 2.533 -> 2.499 ms). Two kernels:
 *  - head_dim 128 (Qwen3): all query heads of the kv head at once on the tensor cores
 *    (attn_decode_mma below; H100, 36 layers at context 640: 8 sequences 0.94 -> 0.63 ms, 64:
 *    4.09 -> 2.36 ms, 256: 15.9 -> 8.8 ms, 2.75 TB/s of KV). Batch 1 too since its first K/V
 *    tile is requested before the PDL wait and its splits fit one wave (H200, batch-1 decode
 *    step at context 512: 2.081 -> 1.999 ms against the scalar kernel; twenty-fifth session).
 *  - other head dims: 4 warps take the kv head's query heads, walking the same K/V rows (L1
 *    serves the repeats) in batches of 16 tokens (8 at head_dim 256) whose block-table lookups
 *    run in parallel across lanes and whose loads are all issued together; the first batch is
 *    requested before the PDL wait.
 *
 * Prefill (chunks of many tokens; also mixed steps), after the qk-norm kernel. At head_dim 128
 * flash attention 2 on the tensor cores (attn_prefill_mma: 64 keys per tile, 70-130 TFLOP/s on an
 * H100, 6-8x the scalar kernel). Otherwise the scalar kernel: block = a tile of consecutive
 * queries of one sequence times the query heads of one kv head (64 rows, or 32 at head_dim 256);
 * keys come in tiles of 32 through shared memory (rows padded by one float so lane-per-key reads
 * hit distinct banks), scores are register-blocked over 32 dims, and softmax is online, so a chunk
 * attends to everything earlier chunks left in the cache without materialising scores.
 *
 * Arithmetic is float32 (the tensor-core kernels round q and the softmax weights to bf16 for their
 * products, as bf16 attention does) with K/V rounded to bf16 in the cache (bf16 tolerances
 * apply), or to float8 e4m3 (KvDtype KV_FP8: half the memory, so twice the tokens in a pool).
 * Every kernel is a template on the cached type KV; the tensor-core kernels copy e4m3 tiles into
 * a staging ring and widen each tile to the bf16 layout their ldmatrix reads (exact), so their
 * math is the bf16 path's. Half the bytes is not half the time: H200, 36 batched decode
 * attentions at context 640, bf16 -> e4m3 cache, 64 sequences 1.82 -> 1.61 ms, 256 sequences 6.85
 * -> 6.35 ms (twenty-fourth session); the tensor-core decode kernel is bound by each warp's chain
 * of dependent steps (and 2 blocks per SM by its registers), not by HBM. */
#include <math.h>
#include <algorithm>

#include "backend/cuda/cuda_backend.h"
#include "backend/cuda/cuda_common.cuh"

namespace {

/* VPL consecutive cached values of type KV (raw words, loaded unconditionally so a batch's loads
 * issue together): bf16 pairs per word, or four e4m3 codes (two when VPL = 2, in the low half). */
template <typename KV, int VPL>
struct KvVec {
    static constexpr int kBytes = VPL * (int)sizeof(KV);
    uint32_t w[kBytes >= 4 ? kBytes / 4 : 1];
};

/* volatile, so the compiler keeps a batch's loads where they are written (ahead of the math)
 * instead of sinking each to its first use, which would serialise their latencies. L2_ONLY
 * (.cg) for what the decode kernel reads before pdl_wait() and the new token's row after it: an
 * L1 line of that row fetched before the wait would be stale after it. Everything else goes
 * through L1, which serves the block's other warps (query heads) the same rows. */
#define LOAD_RAW(CACHE)                                                                                      \
    if constexpr (V::kBytes == 2) {                                                                          \
        uint16_t h;                                                                                          \
        asm volatile("ld.global" CACHE ".u16 %0, [%1];" : "=h"(h) : "l"(p));                                 \
        r.w[0] = h;                                                                                          \
    } else if constexpr (V::kBytes == 4) {                                                                   \
        asm volatile("ld.global" CACHE ".u32 %0, [%1];" : "=r"(r.w[0]) : "l"(p));                            \
    } else if constexpr (V::kBytes == 8) {                                                                   \
        asm volatile("ld.global" CACHE ".v2.u32 {%0, %1}, [%2];" : "=r"(r.w[0]), "=r"(r.w[1]) : "l"(p));     \
    } else {                                                                                                 \
        asm volatile("ld.global" CACHE ".v4.u32 {%0, %1, %2, %3}, [%4];"                                     \
                     : "=r"(r.w[0]), "=r"(r.w[1]), "=r"(r.w[2]), "=r"(r.w[3])                                \
                     : "l"(p));                                                                              \
    }
template <int VPL, bool L2_ONLY, typename KV>
CU_DEV KvVec<KV, VPL> load_raw(const KV *p) {
    using V = KvVec<KV, VPL>;
    V r;
    if constexpr (L2_ONLY) {
        LOAD_RAW(".cg")
    } else {
        LOAD_RAW("")
    }
    return r;
}
#undef LOAD_RAW

/* Values i and i + 1 (i even) of r. */
template <typename KV, int VPL>
CU_DEV float2 pair_at(const KvVec<KV, VPL> &r, int i) {
    if constexpr (sizeof(KV) == 2) {
        return make_float2(bf16_lo(r.w[i >> 1]), bf16_hi(r.w[i >> 1]));
    } else {
        return fp8x2_to_float2((uint16_t)(r.w[i >> 2] >> (8 * (i & 3))));
    }
}

/* Sets values i and i + 1 (i even) of r to a and b rounded to KV (r.w[i / 2] or the word's half:
 * the e4m3 halves are set low first, the low one clearing the word). */
template <typename KV, int VPL>
CU_DEV void set_pair(KvVec<KV, VPL> &r, int i, float a, float b) {
    if constexpr (sizeof(KV) == 2) {
        const __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
        r.w[i >> 1] = *reinterpret_cast<const uint32_t *>(&v);
    } else {
        const uint32_t codes = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
        r.w[i >> 2] = i & 2 ? r.w[i >> 2] | codes << 16 : codes;
    }
}

/* Stores r's VPL values at p (aligned to their size). */
template <typename KV, int VPL>
CU_DEV void store_raw(KV *p, const KvVec<KV, VPL> &r) {
    if constexpr (KvVec<KV, VPL>::kBytes == 2) {
        *reinterpret_cast<uint16_t *>(p) = (uint16_t)r.w[0];
    } else {
#pragma unroll
        for (int i = 0; i < KvVec<KV, VPL>::kBytes / 4; i++) reinterpret_cast<uint32_t *>(p)[i] = r.w[i];
    }
}

/* Two consecutive cached values at p as floats. */
CU_DEV float2 load_pair(const __nv_bfloat16 *p) { return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(p)); }
CU_DEV float2 load_pair(const __nv_fp8_e4m3 *p) { return fp8x2_to_float2(*reinterpret_cast<const uint16_t *>(p)); }

/* Tokens per batch of the decode loop: all K/V loads of a batch are issued together. */
template <int HD>
__host__ __device__ constexpr int decode_batch() {
    return HD <= 128 ? 16 : 8;
}

/* VPL consecutive floats of a partial record (16-byte aligned for VPL >= 4), past L1. */
template <int VPL>
CU_DEV void load_part(const float *p, float (&v)[VPL]) {
    if constexpr (VPL == 2) {
        const float2 a = __ldcg(reinterpret_cast<const float2 *>(p));
        v[0] = a.x, v[1] = a.y;
    } else {
#pragma unroll
        for (int i = 0; i < VPL; i += 4) {
            const float4 a = __ldcg(reinterpret_cast<const float4 *>(p + i));
            v[i] = a.x, v[i + 1] = a.y, v[i + 2] = a.z, v[i + 3] = a.w;
        }
    }
}

/* out[i] = v, or out[i], out[i + 1] = v0, v1 (i even), in out's type. */
CU_DEV void put_out(const CuAttnOut &out, size_t i, float v) {
    if (out.b)
        out.b[i] = __float2bfloat16_rn(v);
    else
        out.f[i] = v;
}
CU_DEV void put_out2(const CuAttnOut &out, size_t i, float v0, float v1) {
    if (out.b)
        *reinterpret_cast<__nv_bfloat162 *>(out.b + i) = __floats2bfloat162_rn(v0, v1);
    else
        *reinterpret_cast<float2 *>(out.f + i) = make_float2(v0, v1);
}

/* After every split of (sequence, kv head) `pair` has written its partial (unnormalised output,
 * max, sum) for its G heads: the whole block publishes its writes with one fenced arrival, and the
 * last block to arrive combines all splits into out (a counter per pair, reset by that block).
 * The combine sits on the decode step's critical path, so each warp requests every split's
 * partial of its head at once (up to 128 floats per lane) before it uses any: one L2 round trip
 * instead of one per few splits (H100, batch 1, 32 splits: see bench/RESULTS.md). */
template <int HD>
CU_DEV void combine_splits(const CuAttnOut &out, const float *part, int *counters, size_t pair, int splits, int G,
                           int t, int nh, int kvh) {
    constexpr int VPL = HD / 32, PS = cu_part_stride(HD);
    constexpr int kBatch = 128 / VPL < 32 ? 128 / VPL : 32; /* splits whose partials are in flight together */
    __shared__ int last;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(&counters[pair], 1) == splits - 1;
        if (last) __threadfence();
    }
    __syncthreads();
    if (!last) return;
    for (int g = warp; g < G; g += warps) {
        /* lane i owns split i's max and sum (splits <= 32) */
        const float *base = part + (pair * splits * G + g) * PS;
        const size_t stride = (size_t)G * PS;
        const float ms = lane < splits ? __ldcg(base + lane * stride + HD) : -INFINITY;
        const float ls = lane < splits ? __ldcg(base + lane * stride + HD + 1) : 0.0f;
        float acc[VPL];
#pragma unroll
        for (int i = 0; i < VPL; i++) acc[i] = 0.0f;
        float mx = 0.0f, w = 0.0f, lsum = 0.0f;
        for (int s0 = 0; s0 < splits; s0 += kBatch) {
            float v[kBatch][VPL];
#pragma unroll
            for (int j = 0; j < kBatch; j++)
                if (s0 + j < splits) load_part<VPL>(base + (s0 + j) * stride + lane * VPL, v[j]);
            if (s0 == 0) { /* after the first loads are issued, so their latency covers this */
                mx = warp_max(ms);
                w = ms == -INFINITY ? 0.0f : __expf(ms - mx);
                lsum = warp_sum(w * ls);
            }
#pragma unroll
            for (int j = 0; j < kBatch; j++) {
                if (s0 + j >= splits) break;
                const float wsp = __shfl_sync(0xffffffffu, w, s0 + j);
#pragma unroll
                for (int i = 0; i < VPL; i++) acc[i] = fmaf(wsp, v[j][i], acc[i]);
            }
        }
        const size_t dst = (size_t)t * nh * HD + (size_t)(kvh * G + g) * HD + lane * VPL;
        const float inv = 1.0f / lsum;
#pragma unroll
        for (int i = 0; i < VPL; i += 2) put_out2(out, dst + i, acc[i] * inv, acc[i + 1] * inv);
    }
    if (threadIdx.x == 0) counters[pair] = 0;
}

/* What the decode kernels need to do qk_norm_rope_store's work for their token: the step's raw
 * projections, the layer's norm weights, the rope table and the cache slots. */
struct NewToken {
    const float *qkv;            /* [tokens][(nh + 2 nkv) HD]: raw q | k | v (left raw) */
    const float *q_norm, *k_norm; /* [HD] */
    const float *cs;             /* [tokens][HD] from rope_cos_sin */
    const int32_t *slots;        /* [tokens]: cache slot of each token */
    float eps;
};

/* Grid (splits, nkv, n_seqs), 4 warps; warp w handles query heads kvh * G + g for g = w, w + 4, ..
 * (the K/V rows of the kv head are read once per head, from L1 after the first); lane holds dims
 * lane * VPL .. + VPL.
 *
 * It also does qk_norm_rope_store's work for the step's tokens (one per sequence), which saves
 * that kernel's launch and its link in the decode chain: every block normalises and rotates its
 * query heads itself, and the block whose split holds the new token (position ctx - 1)
 * normalises and rotates its k, stores k and v in the cache and uses them from registers: the
 * other splits never read that row. qkv stays raw (nothing may write it while other splits read
 * their q from it). The math is qk_norm_rope's, as in qk_norm_rope_store_kernel, so both paths
 * round alike. */
template <int HD, typename KV>
__global__ void __launch_bounds__(128) attn_decode(CuAttnOut out, NewToken nt, KV *kc, KV *vc,
                                                   const int32_t *q_start, const int32_t *ctx_len,
                                                   const int32_t *tables, int max_blocks, int bs, int bs_shift,
                                                   int nh, int nkv, int splits, float *part, int *counters,
                                                   float scale) {
    constexpr int VPL = HD / 32, TB = decode_batch<HD>();
    __shared__ float relayout[4][HD]; /* per warp: a head from pair layout to lane * VPL layout */
    pdl_trigger();
    /* Before pdl_wait() only what no running kernel writes: the step's metadata (uploaded before
     * the step's first kernel), the norm weights and the cache rows of earlier tokens. So the first
     * batch of K/V streams in while the previous kernels finish. */
    const int split = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
    const int G = nh / nkv, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = q_start[s], ctx = ctx_len[s];
    const int chunk = (ctx + splits - 1) / splits;
    const int p0 = split * chunk, p1 = min(ctx, p0 + chunk);
    const int32_t *table = tables + (size_t)s * max_blocks;
    const size_t pair = (size_t)s * nkv + kvh;
    const bool active = warp < G;
    const bool owns_new = active && p0 <= ctx - 1 && ctx - 1 < p1;
    PairHead<HD> qw, kw; /* the norm weights; kw only where owns_new */
    qw.load(nt.q_norm, lane);
    if (owns_new) kw.load(nt.k_norm, lane);

    /* Batch at p: lane j < TB finds token p + j's cache row (one table load each, in parallel),
     * then all K/V rows are requested; tokens past the split re-read token p (masked later), and
     * the new token's row (not in the cache yet) is replaced from registers, so no load is
     * conditional and all of them issue together. */
    KvVec<KV, VPL> kr[TB], vr[TB], knew, vnew;
    auto load_batch = [&](int p, bool before_wait) {
        size_t row = 0;
        if (lane < TB && p + lane < p1) {
            const int pos = p + lane;
            row = (((size_t)table[pos >> bs_shift] * bs + (pos & (bs - 1))) * nkv + kvh) * HD;
        }
#pragma unroll
        for (int j = 0; j < TB; j++) {
            const size_t off = __shfl_sync(0xffffffffu, row, p + j < p1 && p + j != ctx - 1 ? j : 0) + lane * VPL;
            if (before_wait) { /* warp-uniform */
                kr[j] = load_raw<VPL, true>(kc + off);
                vr[j] = load_raw<VPL, true>(vc + off);
            } else {
                kr[j] = load_raw<VPL, false>(kc + off);
                vr[j] = load_raw<VPL, false>(vc + off);
            }
        }
    };
    if (active && p0 < p1) load_batch(p0, true);
    pdl_wait();

    /* One round trip: the token's cos / sin, this warp's first query head, and (the new token's
     * split) its k and v. */
    const size_t width = (size_t)(nh + 2 * nkv) * HD;
    const float *row = nt.qkv + (size_t)t * width;
    const float *c = nt.cs + (size_t)t * HD;
    float vv[VPL];
    PairHead<HD> rot, qh, kh; /* rot: cos (a) and sin (b) */
    if (active) {
        rot.load(c, lane);
        qh.load(row + (size_t)(kvh * G + warp) * HD, lane);
    }
    if (owns_new) {
        kh.load(row + (size_t)(nh + kvh) * HD, lane);
#pragma unroll
        for (int i = 0; i < VPL; i++) vv[i] = row[(size_t)(nh + nkv + kvh) * HD + lane * VPL + i];
        qk_norm_rope(kh.a, kh.b, kw.a, kw.b, rot.a, rot.b, HD, nt.eps);
        kh.store(relayout[warp], lane);
        __syncwarp();
#pragma unroll
        for (int i = 0; i < VPL; i += 2) {
            const float *kf = relayout[warp] + lane * VPL + i;
            set_pair(knew, i, kf[0], kf[1]);
            set_pair(vnew, i, vv[i], vv[i + 1]);
        }
        __syncwarp();
        if (warp == 0) {
            const size_t off = ((size_t)nt.slots[t] * nkv + kvh) * HD + lane * VPL;
            store_raw(kc + off, knew);
            store_raw(vc + off, vnew);
        }
        /* the first batch went out before the wait: put the new token in */
        if (ctx - 1 < p0 + TB) {
#pragma unroll
            for (int j = 0; j < TB; j++)
                if (p0 + j == ctx - 1) kr[j] = knew, vr[j] = vnew;
        }
    }

    for (int g = warp; g < G; g += 4) {
        const int h = kvh * G + g;
        if (g != warp) qh.load(row + (size_t)h * HD, lane);
        qk_norm_rope(qh.a, qh.b, qw.a, qw.b, rot.a, rot.b, HD, nt.eps);
        qh.store(relayout[warp], lane);
        __syncwarp();
        float q[VPL];
#pragma unroll
        for (int i = 0; i < VPL; i++) q[i] = relayout[warp][lane * VPL + i] * scale;
        __syncwarp();
        float m = -INFINITY, l = 0.0f, o[VPL];
#pragma unroll
        for (int i = 0; i < VPL; i++) o[i] = 0.0f;
        for (int p = p0; p < p1; p += TB) {
            if (g != warp || p != p0) { /* the first batch of the first head is in */
                load_batch(p, false);
                if (owns_new && p <= ctx - 1 && ctx - 1 < p + TB) {
#pragma unroll
                    for (int j = 0; j < TB; j++)
                        if (p + j == ctx - 1) kr[j] = knew, vr[j] = vnew;
                }
            }
            float sc[TB];
            float mt = m;
#pragma unroll
            for (int j = 0; j < TB; j++) {
                float d = 0.0f;
#pragma unroll
                for (int i = 0; i < VPL; i += 2) {
                    const float2 k2 = pair_at(kr[j], i);
                    d = fmaf(q[i + 1], k2.y, fmaf(q[i], k2.x, d));
                }
                d = warp_sum(d);
                sc[j] = p + j < p1 ? d : -INFINITY;
                mt = fmaxf(mt, sc[j]);
            }
            const float corr = m == -INFINITY ? 0.0f : __expf(m - mt);
            l *= corr;
#pragma unroll
            for (int i = 0; i < VPL; i++) o[i] *= corr;
#pragma unroll
            for (int j = 0; j < TB; j++) {
                /* masked tokens are skipped, not weighted by 0: their rows may be a copy of a
                 * slot not written yet (any bits, NaN too) */
                if (p + j >= p1) continue;
                const float pj = sc[j] == -INFINITY ? 0.0f : __expf(sc[j] - mt);
                l += pj;
#pragma unroll
                for (int i = 0; i < VPL; i += 2) {
                    const float2 v2 = pair_at(vr[j], i);
                    o[i] = fmaf(pj, v2.x, o[i]), o[i + 1] = fmaf(pj, v2.y, o[i + 1]);
                }
            }
            m = mt;
        }
        if (splits == 1) {
            const size_t dst = (size_t)t * nh * HD + (size_t)h * HD + lane * VPL;
            const float inv = 1.0f / l;
#pragma unroll
            for (int i = 0; i < VPL; i += 2) put_out2(out, dst + i, o[i] * inv, o[i + 1] * inv);
        } else {
            float *mine = part + ((pair * splits + split) * G + g) * cu_part_stride(HD);
#pragma unroll
            for (int i = 0; i < VPL; i++) mine[lane * VPL + i] = o[i];
            if (lane == 0) mine[HD] = m, mine[HD + 1] = l;
        }
    }
    if (splits > 1) combine_splits<HD>(out, part, counters, pair, splits, G, t, nh, kvh);
}

/* ---- batched decode on the tensor cores ---------------------------------------------------- *
 *
 * With many sequences the scalar decode kernel is bound by its per-token warp shuffles (one
 * butterfly per score), not by memory (H100: ~1.5 TB/s at 64 and 256 sequences). Here a block
 * (split, kv head, sequence) computes all G query heads of the kv head at once with mma.sync
 * m16n8k16 (bf16 in, f32 accumulate): the heads are the 16 rows of the A operand (rows past G are
 * zero), so S = Q K^T takes 16 mma per 16 tokens and O += P V another 16, with the softmax done on
 * the accumulator fragments (flash attention 2's register reuse: S's accumulators are P's A
 * fragments). q and p enter the tensor cores rounded to bf16, as in a bf16 model's attention
 * (transformers' SDPA, vLLM's flash attention); accumulation is float. They used to enter as two
 * bf16 terms each, hi + lo (float precision, twice the mma): H200, 36 layers at context 640, hi
 * only is 8 sequences 0.662 -> 0.614 ms, 64: 1.93 -> 1.87 (e4m3 cache 1.84 -> 1.62), 256: 7.07 ->
 * 6.97 (7.22 -> 6.34).
 *
 * A block has W = 4 warps, or 2 where 4-warp blocks would run in several waves (attention_hd;
 * at 254 registers a thread, 8 warps fit an SM either way). Each warp walks every W-th 16-token
 * tile of the split: K and V rows (head_dim 128: 256 bytes each, from the paged cache) go to the
 * warp's two-stage cp.async ring in shared memory, swizzled by 16-byte chunk (chunk ^ row % 8) so
 * that ldmatrix reads them without bank conflicts (K as is for the B operand of Q K^T, V
 * transposed for P V); the first tile is requested before the PDL wait (H200, 36 layers at
 * context 640: 8 sequences 0.623 -> 0.566 ms, 64: 1.88 -> 1.82). The warps' online-softmax
 * states are merged through shared memory, then written as the split's partial (combine_splits)
 * or, unsplit, as the output. */
constexpr int kMmaHD = 128;
constexpr int kMmaTile = 16;                   /* tokens per tile */
constexpr int kMmaRow = kMmaHD * 2;            /* bytes per cached row */
constexpr int kMmaStage = 2 * kMmaTile * kMmaRow; /* K and V of one tile: 8 KB */
/* shared memory of a block of w warps: 2 stages each (64 KB for 4 warps) */
constexpr size_t mma_decode_smem(int w) { return (size_t)w * 2 * kMmaStage; }

/* One step of a two-stage cp.async ring over n tiles: requests tile i + 1 (load(i + 1), one
 * commit group) if there is one, then waits until tile i has landed (this thread's copies). */
template <class Load>
CU_DEV void ring_step(int i, int n, Load load) {
    if (i + 1 < n) {
        load(i + 1);
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
}

/* (a, b) rounded to a bf16 pair, a in the low half (an mma operand register). */
CU_DEV uint32_t bf16_pair(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t *>(&h);
}

/* Byte offset of 16-byte chunk c of row r in a swizzled tile. */
CU_DEV int tile_at(int r, int c) { return r * kMmaRow + ((c ^ (r & 7)) << 4); }

/* e4m3 caches (KV_FP8): a row's chunk c (8 values, 8 bytes) is staged at r * kFp8Row + 8 c, then
 * widened into the bf16 tile's chunk (r, c) by the thread that copied it (so only its own copies
 * need to have landed). */
constexpr int kFp8Row = kMmaHD; /* bytes per staged row */
CU_DEV void widen_chunk(char *tile, const char *staged, int r, int c) {
    const uint2 raw = *reinterpret_cast<const uint2 *>(staged + r * kFp8Row + 8 * c);
    uint4 out;
    out.x = fp8x2_to_bf16x2((uint16_t)raw.x), out.y = fp8x2_to_bf16x2((uint16_t)(raw.x >> 16));
    out.z = fp8x2_to_bf16x2((uint16_t)raw.y), out.w = fp8x2_to_bf16x2((uint16_t)(raw.y >> 16));
    *reinterpret_cast<uint4 *>(tile + tile_at(r, c)) = out;
}

/* Chunk c (16 bytes of bf16) of row r of a tile of ROWS K rows then ROWS V rows, from k and v
 * (zero-filled when !ok): bf16 straight into the swizzled tile at dst, e4m3 (8 bytes) into the
 * staging layout at dst that widen_tile expands. */
template <int ROWS, typename KV>
CU_DEV void copy_kv_chunk(char *dst, int r, int c, const KV *k, const KV *v, bool ok) {
    if constexpr (sizeof(KV) == 1) {
        cp_async8(dst + r * kFp8Row + 8 * c, k, ok);
        cp_async8(dst + ROWS * kFp8Row + r * kFp8Row + 8 * c, v, ok);
    } else {
        cp_async16(dst + tile_at(r, c), k, ok);
        cp_async16(dst + ROWS * kMmaRow + tile_at(r, c), v, ok);
    }
}

/* A staged e4m3 tile of ROWS K and ROWS V rows widened into the bf16 tile at wide, by THREADS
 * threads, thread i taking the chunks it copied (chunk idx = j THREADS + i: row idx / 16, chunk
 * idx % 16), so only its own copies need to have landed. */
template <int ROWS, int THREADS>
CU_DEV void widen_tile(char *wide, const char *staged, int i) {
#pragma unroll
    for (int j = 0; j < ROWS * 16 / THREADS; j++) {
        const int idx = j * THREADS + i, r = idx >> 4, c = idx & 15;
        widen_chunk(wide, staged, r, c);
        widen_chunk(wide + ROWS * kMmaRow, staged + ROWS * kFp8Row, r, c);
    }
}

/* The three steps of a warp's 16 rows (query heads, or (query, head) pairs) against a tile of
 * 8 NJ keys whose K and V rows sit in swizzled shared memory; flash attention 2's register reuse
 * (S's accumulators are P's A fragments). Thread (g, t4) = (lane / 4, lane % 4) holds rows g
 * (h = 0) and g + 8 (h = 1) of the accumulators, columns 8 j + 2 t4 + e (e = 0, 1) of n-tile j.
 *
 * S = Q K^T, q as bf16 A fragments. */
template <int NJ>
CU_DEV void mma_scores(float (&sc)[NJ][4], const uint32_t (&qa)[kMmaHD / 16][4], const char *kt, int lane) {
#pragma unroll
    for (int j = 0; j < NJ; j++) {
        sc[j][0] = sc[j][1] = sc[j][2] = sc[j][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < kMmaHD / 16; kk += 2) {
            uint32_t b[4];
            ldmatrix_x4(b, kt + tile_at(8 * j + (lane & 7), 2 * kk + (lane >> 3)), false);
            mma_bf16(sc[j], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b[0], b[1]);
            mma_bf16(sc[j], qa[kk + 1][0], qa[kk + 1][1], qa[kk + 1][2], qa[kk + 1][3], b[2], b[3]);
        }
    }
}

/* Online softmax on the fragments: scores where masked(j, e, h) are dropped, the 4 lanes of a row
 * reduce its maximum by shuffles; leaves p = exp(s - max) in sc, rescales o, and updates the
 * running max m and sum l (l: this thread's columns only, summed over the row at the end). */
template <int NJ, class Mask>
CU_DEV void mma_online_softmax(float (&sc)[NJ][4], float (&m)[2], float (&l)[2], float (&o)[kMmaHD / 8][4],
                               Mask masked) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < NJ; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                if (masked(j, e, h)) sc[j][2 * h + e] = -INFINITY;
                mx = fmaxf(mx, sc[j][2 * h + e]);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m[h], mx);
        const float corr = m[h] == -INFINITY ? 0.0f : __expf(m[h] - mn);
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < NJ; j++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const float v = sc[j][2 * h + e];
                const float pv = v == -INFINITY ? 0.0f : __expf(v - mn);
                sc[j][2 * h + e] = pv;
                sum += pv;
            }
        l[h] = l[h] * corr + sum;
        m[h] = mn;
#pragma unroll
        for (int d = 0; d < kMmaHD / 8; d++) o[d][2 * h] *= corr, o[d][2 * h + 1] *= corr;
    }
}

/* O += P V, p rounded to bf16 (k-step kk = keys 16 kk .. + 15: S's n-tiles 2 kk, 2 kk + 1;
 * V read transposed by ldmatrix). */
template <int NJ>
CU_DEV void mma_pv(float (&o)[kMmaHD / 8][4], const float (&sc)[NJ][4], const char *vt, int lane) {
#pragma unroll
    for (int kk = 0; kk < NJ / 2; kk++) {
        const uint32_t pa[4] = {bf16_pair(sc[2 * kk][0], sc[2 * kk][1]), bf16_pair(sc[2 * kk][2], sc[2 * kk][3]),
                                bf16_pair(sc[2 * kk + 1][0], sc[2 * kk + 1][1]),
                                bf16_pair(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
#pragma unroll
        for (int d = 0; d < kMmaHD / 8; d += 2) {
            uint32_t b[4];
            const int mat = lane >> 3;
            ldmatrix_x4(b, vt + tile_at(16 * kk + (mat & 1) * 8 + (lane & 7), d + (mat >> 1)), true);
            mma_bf16(o[d], pa[0], pa[1], pa[2], pa[3], b[0], b[1]);
            mma_bf16(o[d + 1], pa[0], pa[1], pa[2], pa[3], b[2], b[3]);
        }
    }
}

template <typename KV, int W>
__global__ void __launch_bounds__(W * 32) attn_decode_mma(CuAttnOut out, NewToken nt, KV *kc, KV *vc,
                                                       const int32_t *q_start, const int32_t *ctx_len,
                                                       const int32_t *tables, int max_blocks, int bs, int bs_shift,
                                                       int nh, int nkv, int splits, float *part, int *counters,
                                                       float scale) {
    constexpr int HD = kMmaHD, P = PairHead<HD>::P;
    extern __shared__ uint4 mma_smem[];
    pdl_trigger();
    const int split = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
    const int G = nh / nkv, warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int t = q_start[s], ctx = ctx_len[s];
    const int chunk = (ctx + splits - 1) / splits;
    const int p0 = split * chunk, p1 = min(ctx, p0 + chunk);
    const int32_t *table = tables + (size_t)s * max_blocks;
    const size_t pair = (size_t)s * nkv + kvh;
    /* bf16: the warp's two stages; e4m3: two staging stages (half size) and the widened tile */
    constexpr bool kFp8 = sizeof(KV) == 1;
    constexpr int kRingStage = kFp8 ? kMmaStage / 2 : kMmaStage;
    char *ring = reinterpret_cast<char *>(mma_smem) + warp * 2 * kMmaStage, *wide = ring + kMmaStage;
    /* The new token (position ctx - 1), if in this split: row new_row of tile new_tile of warp
     * new_warp, which normalises and rotates its k (qk_norm_rope, as qk_norm_rope_store_kernel),
     * stores k and v in the cache and puts them into its tile in place of the row it loaded. */
    const int rel = ctx - 1 - p0, new_row = rel % kMmaTile, new_tile = rel / kMmaTile / W;
    const bool has_new = ctx - 1 < p1 && rel >= 0 && warp == rel / kMmaTile % W;

    /* this thread's A-fragment column e of k-step kk (e = 0, 1: 2 t4 + e; 2, 3: 8 + 2 t4 + e - 2);
     * those of the first HD / 32 k-steps (F of them) pair with the same ones HD / 2 further */
    auto col = [&](int kk, int e) { return 16 * kk + 8 * (e >> 1) + 2 * t4 + (e & 1); };
    constexpr int F = HD / 32 * 4;
    float wa[F], wb[F]; /* q norm weights in that layout, before the wait */
#pragma unroll
    for (int f = 0; f < F; f++) wa[f] = nt.q_norm[col(f / 4, f % 4)], wb[f] = nt.q_norm[HD / 2 + col(f / 4, f % 4)];
    PairHead<HD> kw; /* k norm weights, only where has_new */
    if (has_new) kw.load(nt.k_norm, lane);
    /* Tile i of this warp: tokens p0 + 16 (warp + W i) ..; lane < 16 looks up token lane's row.
     * The first is requested before pdl_wait(), so it streams in while the previous kernel
     * finishes and q is prepared: it reads only the step's metadata and cache rows of earlier
     * steps (the new token's row, not stored yet, is replaced in the tile below). */
    const int n_tiles = (p1 - p0 + kMmaTile - 1) / kMmaTile;
    auto load_tile = [&](int i, char *dst) {
        const int tp = p0 + kMmaTile * (warp + W * i);
        size_t row = 0;
        if (lane < kMmaTile && tp + lane < p1) {
            const int pos = tp + lane;
            row = (((size_t)table[pos >> bs_shift] * bs + (pos & (bs - 1))) * nkv + kvh) * HD;
        }
#pragma unroll
        for (int j = 0; j < kMmaTile * 16 / 32; j++) { /* 16 rows x 16 chunks, 8 per lane, K and V */
            const int idx = j * 32 + lane, r = idx >> 4, c = idx & 15;
            const size_t off = __shfl_sync(0xffffffffu, row, r) + c * 8;
            const bool ok = tp + r < p1;
            copy_kv_chunk<kMmaTile>(dst, r, c, ok ? kc + off : kc, ok ? vc + off : vc, ok);
        }
        cp_async_commit();
    };
    const int my_tiles = warp < n_tiles ? (n_tiles - warp + W - 1) / W : 0;
    if (my_tiles > 0) load_tile(0, ring);
    pdl_wait();

    /* Q as A fragments: rows g and g + 8 are heads kvh * G + row (zero past G), normalised and
     * rotated here (qk_norm_rope over the 4 lanes of a row), scaled, rounded to bf16 */
    const float *row0 = nt.qkv + (size_t)t * (nh + 2 * nkv) * HD;
    const float *cs = nt.cs + (size_t)t * HD;
    uint32_t qa[HD / 16][4];
    {
        float co[F], si[F], xa[2][F], xb[2][F];
#pragma unroll
        for (int f = 0; f < F; f++) co[f] = cs[col(f / 4, f % 4)], si[f] = cs[HD / 2 + col(f / 4, f % 4)];
#pragma unroll
        for (int h = 0; h < 2; h++) { /* h: row g (0) or g + 8 (1) */
            const int row = g + 8 * h;
            const float *q0 = row0 + (size_t)(kvh * G + row) * HD;
#pragma unroll
            for (int f = 0; f < F; f++) {
                xa[h][f] = row < G ? q0[col(f / 4, f % 4)] : 0.0f;
                xb[h][f] = row < G ? q0[HD / 2 + col(f / 4, f % 4)] : 0.0f;
            }
        }
#pragma unroll
        for (int h = 0; h < 2; h++) {
            qk_norm_rope<F, 4>(xa[h], xb[h], wa, wb, co, si, HD, nt.eps);
#pragma unroll
            for (int kk = 0; kk < HD / 16; kk++) {
                const float *x = kk < HD / 32 ? xa[h] + 4 * kk : xb[h] + 4 * (kk - HD / 32);
                qa[kk][h] = bf16_pair(x[0] * scale, x[1] * scale);
                qa[kk][2 + h] = bf16_pair(x[2] * scale, x[3] * scale);
            }
        }
    }
    PairHead<HD> kh, vh; /* the new token's k (normalised, rotated) and v, if has_new */
    if (has_new) {
        PairHead<HD> rot; /* cos (a) and sin (b) */
        rot.load(cs, lane);
        kh.load(row0 + (size_t)(nh + kvh) * HD, lane);
        vh.load(row0 + (size_t)(nh + nkv + kvh) * HD, lane);
        qk_norm_rope(kh.a, kh.b, kw.a, kw.b, rot.a, rot.b, HD, nt.eps);
        const size_t off = ((size_t)nt.slots[t] * nkv + kvh) * HD;
#pragma unroll
        for (int j = 0; j < P; j++) {
            const int i = lane + 32 * j;
            kc[off + i] = kv_value(kh.a[j], kc), kc[off + i + HD / 2] = kv_value(kh.b[j], kc);
            vc[off + i] = kv_value(vh.a[j], vc), vc[off + i + HD / 2] = kv_value(vh.b[j], vc);
        }
    }

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}; /* rows g, g + 8 (l: this thread's part) */
    float o[HD / 8][4];
#pragma unroll
    for (int d = 0; d < HD / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    for (int i = 0; i < my_tiles; i++) {
        char *cur = ring + (i & 1) * kRingStage;
        ring_step(i, my_tiles, [&](int next) { load_tile(next, ring + (next & 1) * kRingStage); });
        if constexpr (kFp8) {
            widen_tile<kMmaTile, 32>(wide, cur, lane);
            cur = wide;
        }
        __syncwarp();
        if (has_new && i == new_tile) { /* the new token's row, in place of the slot's old bytes */
#pragma unroll
            for (int j = 0; j < P; j++)
#pragma unroll
                for (int hh = 0; hh < 2; hh++) {
                    const int d = lane + 32 * j + hh * HD / 2, at = tile_at(new_row, d >> 3) + (d & 7) * 2;
                    /* the value the cache holds (for e4m3, exact in bf16) */
                    *reinterpret_cast<__nv_bfloat16 *>(cur + at) =
                        __float2bfloat16_rn(kv_float(kv_value(hh ? kh.b[j] : kh.a[j], kc)));
                    *reinterpret_cast<__nv_bfloat16 *>(cur + kMmaTile * kMmaRow + at) =
                        __float2bfloat16_rn(kv_float(kv_value(hh ? vh.b[j] : vh.a[j], vc)));
                }
            __syncwarp();
        }
        const int tp = p0 + kMmaTile * (warp + W * i);
        float sc[2][4]; /* two n-tiles of 8 tokens */
        mma_scores(sc, qa, cur, lane);
        mma_online_softmax(sc, m, l, o, [&](int j, int e, int) { return tp + 8 * j + 2 * t4 + e >= p1; });
        mma_pv(o, sc, cur + kMmaTile * kMmaRow, lane);
        __syncwarp(); /* the stage is read before the load that refills it */
    }

    /* merge the warps: [warp][row < G][HD + 2] floats over the (now idle) rings */
    __syncthreads();
    float *st = reinterpret_cast<float *>(mma_smem);
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        const int row = g + 8 * h;
        if (row >= G) continue;
        float *w = st + ((size_t)warp * G + row) * (HD + 2);
#pragma unroll
        for (int d = 0; d < HD / 8; d++) w[8 * d + 2 * t4] = o[d][2 * h], w[8 * d + 2 * t4 + 1] = o[d][2 * h + 1];
        if (t4 == 0) w[HD] = m[h], w[HD + 1] = l[h];
    }
    __syncthreads();
    for (int e = threadIdx.x; e < G * HD; e += blockDim.x) {
        const int row = e / HD, i = e % HD;
        float mx = -INFINITY;
        for (int w = 0; w < W; w++) mx = fmaxf(mx, st[((size_t)w * G + row) * (HD + 2) + HD]);
        float acc = 0.0f, lsum = 0.0f;
        for (int w = 0; w < W; w++) {
            const float *ws = st + ((size_t)w * G + row) * (HD + 2);
            const float f = ws[HD] == -INFINITY ? 0.0f : __expf(ws[HD] - mx);
            acc = fmaf(f, ws[i], acc);
            lsum = fmaf(f, ws[HD + 1], lsum);
        }
        if (splits == 1) {
            put_out(out, (size_t)t * nh * HD + (size_t)(kvh * G + row) * HD + i, acc / lsum);
        } else {
            float *mine = part + ((pair * splits + split) * G + row) * cu_part_stride(HD);
            mine[i] = acc;
            if (i == 0) mine[HD] = mx, mine[HD + 1] = lsum;
        }
    }
    if (splits > 1) combine_splits<HD>(out, part, counters, pair, splits, G, t, nh, kvh);
}

constexpr int kKeyTile = 32;

template <int HD>
__host__ __device__ constexpr int prefill_rows() {
    return HD <= 128 ? 16 : 8; /* rows (query, head) per warp */
}

template <int HD>
__host__ __device__ constexpr size_t prefill_smem() {
    return ((size_t)4 * prefill_rows<HD>() * HD + 2 * (size_t)kKeyTile * (HD + 1)) * sizeof(float);
}

/* Grid (query tiles, nkv, n_seqs), 4 warps. CTA row r (of 4 * ROWS) is query r / G of the tile,
 * head kvh * G + r % G; warp w owns rows w * ROWS .. + ROWS. Lane = key within a key tile for
 * scores; lane + 32 i = output dim. */
template <int HD, typename KV>
__global__ void __launch_bounds__(128) attn_prefill(CuAttnOut out, const float *qkv, const KV *kc, const KV *vc,
                                                    const int32_t *q_start,
                                                    const int32_t *ctx_len, const int32_t *tables, int max_blocks,
                                                    int bs, int bs_shift, int nh, int nkv, float scale) {
    constexpr int ROWS = prefill_rows<HD>(), RT = 4 * ROWS, VPL = HD / 32, KS = HD + 1;
    extern __shared__ float sm[];
    float *qs = sm;             /* [RT][HD] */
    float *ks = qs + RT * HD;   /* [kKeyTile][KS] */
    float *vs = ks + kKeyTile * KS;
    pdl_trigger();
    pdl_wait();
    const int G = nh / nkv, QT = RT / G;
    const int s = blockIdx.z, kvh = blockIdx.y;
    const int t0 = q_start[s], nq = q_start[s + 1] - t0, ctx = ctx_len[s];
    const int i0 = blockIdx.x * QT;
    if (i0 >= nq) return;
    const int n_tile = min(QT, nq - i0);
    const int pos_first = ctx - nq + i0, pos_last = pos_first + n_tile - 1;
    const size_t width = (size_t)(nh + 2 * nkv) * HD;
    for (int e = threadIdx.x; e < RT * HD; e += blockDim.x) {
        const int r = e / HD, d = e % HD, qi = r / G;
        float v = 0.0f;
        if (qi < n_tile) v = qkv[(size_t)(t0 + i0 + qi) * width + (size_t)(kvh * G + r % G) * HD + d] * scale;
        qs[e] = v;
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float m[ROWS], l[ROWS], o[ROWS][VPL];
    int qpos[ROWS];
#pragma unroll
    for (int j = 0; j < ROWS; j++) {
        const int qi = (warp * ROWS + j) / G;
        qpos[j] = qi < n_tile ? pos_first + qi : -1;
        m[j] = -INFINITY;
        l[j] = 0.0f;
#pragma unroll
        for (int i = 0; i < VPL; i++) o[j][i] = 0.0f;
    }
    const int32_t *table = tables + (size_t)s * max_blocks;
    for (int p0 = 0; p0 <= pos_last; p0 += kKeyTile) {
        __syncthreads(); /* q is loaded / the previous tile is consumed */
        for (int e = threadIdx.x; e < kKeyTile * (HD / 2); e += blockDim.x) {
            const int j = e / (HD / 2), d = 2 * (e % (HD / 2)), p = p0 + j;
            float2 kv = make_float2(0.0f, 0.0f), vv = kv;
            if (p <= pos_last) {
                const size_t off = (((size_t)table[p >> bs_shift] * bs + (p & (bs - 1))) * nkv + kvh) * HD + d;
                kv = load_pair(kc + off);
                vv = load_pair(vc + off);
            }
            ks[j * KS + d] = kv.x, ks[j * KS + d + 1] = kv.y;
            vs[j * KS + d] = vv.x, vs[j * KS + d + 1] = vv.y;
        }
        __syncthreads();
        float sc[ROWS];
#pragma unroll
        for (int j = 0; j < ROWS; j++) sc[j] = 0.0f;
#pragma unroll 1
        for (int d0 = 0; d0 < HD; d0 += 32) {
            float kr[32];
#pragma unroll
            for (int i = 0; i < 32; i++) kr[i] = ks[lane * KS + d0 + i];
#pragma unroll
            for (int j = 0; j < ROWS; j++) {
                const float4 *qv = reinterpret_cast<const float4 *>(qs + (warp * ROWS + j) * HD + d0);
#pragma unroll
                for (int i = 0; i < 8; i++) {
                    const float4 a = qv[i];
                    sc[j] = fmaf(a.x, kr[4 * i], fmaf(a.y, kr[4 * i + 1], fmaf(a.z, kr[4 * i + 2], fmaf(a.w, kr[4 * i + 3], sc[j]))));
                }
            }
        }
        const int p = p0 + lane;
#pragma unroll
        for (int j = 0; j < ROWS; j++) {
            const float v = p <= qpos[j] ? sc[j] : -INFINITY;
            const float mn = fmaxf(m[j], warp_max(v));
            const float corr = m[j] == -INFINITY ? 0.0f : __expf(m[j] - mn);
            sc[j] = v == -INFINITY ? 0.0f : __expf(v - mn);
            l[j] = l[j] * corr + warp_sum(sc[j]);
#pragma unroll
            for (int i = 0; i < VPL; i++) o[j][i] *= corr;
            m[j] = mn;
        }
#pragma unroll 4
        for (int kj = 0; kj < kKeyTile; kj++) {
            float vv[VPL];
#pragma unroll
            for (int i = 0; i < VPL; i++) vv[i] = vs[kj * KS + lane + 32 * i];
#pragma unroll
            for (int j = 0; j < ROWS; j++) {
                const float pj = __shfl_sync(0xffffffffu, sc[j], kj);
#pragma unroll
                for (int i = 0; i < VPL; i++) o[j][i] = fmaf(pj, vv[i], o[j][i]);
            }
        }
    }
#pragma unroll
    for (int j = 0; j < ROWS; j++) {
        if (qpos[j] < 0) continue;
        const int r = warp * ROWS + j;
        const float inv = 1.0f / l[j];
        const size_t dst = (size_t)(t0 + i0 + r / G) * nh * HD + (size_t)(kvh * G + r % G) * HD;
#pragma unroll
        for (int i = 0; i < VPL; i++) put_out(out, dst + lane + 32 * i, o[j][i] * inv);
    }
}

/* ---- prefill on the tensor cores (head_dim 128) ------------------------------------------- *
 *
 * Flash attention 2 on mma.sync m16n8k16: block (query tile, kv head, sequence), 4 warps of 16
 * rows each; block row r is query r / G of the tile and head kvh * G + r % G, so the G query heads
 * of a kv head share every K/V tile (64 rows: 64 / G queries). Keys come in tiles of 64 through a
 * two-stage cp.async ring that the whole block fills (16-byte chunks swizzled as in the decode
 * kernel: ldmatrix without bank conflicts); each warp computes its 16 x 64 scores S = Q K^T, the
 * online softmax on the accumulators (rows g and g + 8 of a thread, the 4 lanes of a row reduced
 * by shuffles) and O += P V with P's A fragments taken from S's. As in the decode kernel, q and p
 * enter the tensor cores rounded to bf16 (H200, 36 layers of 512-token prefills: 1 sequence 1.35
 * -> 1.08 ms, 8 sequences 7.82 -> 6.63 ms against hi + lo).
 * Query tiles are issued latest first (they have the most keys). */
constexpr int kPfRows = 64;                       /* (query, head) rows per block, 16 per warp */
constexpr int kPfKeys = 64;                       /* keys per tile */
constexpr int kPfStage = 2 * kPfKeys * kMmaRow;   /* K and V of one tile: 32 KB */
constexpr size_t kPfSmem = 2 * (size_t)kPfStage;  /* two stages: 64 KB */

template <typename KV>
__global__ void __launch_bounds__(128) attn_prefill_mma(CuAttnOut out, const float *qkv, const KV *kc, const KV *vc,
                                                        const int32_t *q_start,
                                                        const int32_t *ctx_len, const int32_t *tables, int max_blocks,
                                                        int bs, int bs_shift, int nh, int nkv, float scale) {
    constexpr int HD = kMmaHD;
    extern __shared__ uint4 pf_smem[];
    /* bf16: two stages; e4m3: two staging stages (half size), then the widened tile */
    constexpr bool kFp8 = sizeof(KV) == 1;
    constexpr int kRingStage = kFp8 ? kPfStage / 2 : kPfStage;
    char *ring = reinterpret_cast<char *>(pf_smem), *wide = ring + kPfStage;
    pdl_trigger();
    pdl_wait();
    const int G = nh / nkv, QT = kPfRows / G;
    const int s = blockIdx.z, kvh = blockIdx.y;
    const int t0 = q_start[s], nq = q_start[s + 1] - t0, ctx = ctx_len[s];
    const int i0 = (gridDim.x - 1 - blockIdx.x) * QT;
    if (i0 >= nq) return;
    const int n_tile = min(QT, nq - i0);
    const int pos_first = ctx - nq + i0, pos_last = pos_first + n_tile - 1;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const size_t width = (size_t)(nh + 2 * nkv) * HD;

    /* Q (scaled, rounded to bf16) as A fragments of rows g (h = 0) and g + 8 (h = 1); rows past the
     * tile's queries are zero and have no position (qpos -1: every key masked) */
    int qpos[2];
    uint32_t qa[HD / 16][4];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = 16 * warp + g + 8 * h, qi = r / G;
        qpos[h] = qi < n_tile ? pos_first + qi : -1;
        const float *qp = qkv + (size_t)(t0 + i0 + min(qi, n_tile - 1)) * width + (size_t)(kvh * G + r % G) * HD;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
            float2 lo = make_float2(0.0f, 0.0f), hi = lo;
            if (qpos[h] >= 0) {
                lo = *reinterpret_cast<const float2 *>(qp + kk * 16 + 2 * t4);
                hi = *reinterpret_cast<const float2 *>(qp + kk * 16 + 8 + 2 * t4);
            }
            qa[kk][h] = bf16_pair(lo.x * scale, lo.y * scale);
            qa[kk][2 + h] = bf16_pair(hi.x * scale, hi.y * scale);
        }
    }
    /* the last position among this warp's rows (-1: the warp has none) */
    const int warp_last = 16 * warp / G < n_tile ? pos_first + min((16 * warp + 15) / G, n_tile - 1) : -1;

    /* Tile kt = keys 64 kt .. + 63: 64 rows x 16 chunks for K and V, 8 + 8 per thread (16
     * consecutive threads read one 256-byte row); keys past the tile's last query are zero-filled
     * (masked below: a zero V times a zero weight stays zero). */
    const int32_t *table = tables + (size_t)s * max_blocks;
    auto load_tile = [&](int kt, char *dst) {
#pragma unroll
        for (int j = 0; j < kPfKeys * 16 / 128; j++) {
            const int idx = j * 128 + threadIdx.x, r = idx >> 4, c = idx & 15, p = kt * kPfKeys + r;
            const bool ok = p <= pos_last;
            const size_t off = ok ? (((size_t)table[p >> bs_shift] * bs + (p & (bs - 1))) * nkv + kvh) * HD + c * 8 : 0;
            copy_kv_chunk<kPfKeys>(dst, r, c, kc + off, vc + off, ok);
        }
        cp_async_commit();
    };

    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}; /* l: this thread's columns' part */
    float o[HD / 8][4];
#pragma unroll
    for (int d = 0; d < HD / 8; d++) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
    const int n_kt = pos_last / kPfKeys + 1;
    load_tile(0, ring);
    for (int kt = 0; kt < n_kt; kt++) {
        const char *cur = ring + (kt & 1) * kRingStage;
        ring_step(kt, n_kt, [&](int next) { load_tile(next, ring + (next & 1) * kRingStage); });
        if constexpr (kFp8) {
            widen_tile<kPfKeys, 128>(wide, cur, threadIdx.x);
            cur = wide;
        }
        __syncthreads();
        const int p0 = kt * kPfKeys;
        if (warp_last >= p0) { /* else every score of the warp's rows is masked */
            float sc[kPfKeys / 8][4];
            mma_scores(sc, qa, cur, lane);
            mma_online_softmax(sc, m, l, o, [&](int j, int e, int h) { return p0 + 8 * j + 2 * t4 + e > qpos[h]; });
            mma_pv(o, sc, cur + kPfKeys * kMmaRow, lane);
        }
        __syncthreads(); /* the stage is read before the load that refills it */
    }
#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
        if (qpos[h] < 0) continue;
        const int r = 16 * warp + g + 8 * h;
        const size_t dst = (size_t)(t0 + i0 + r / G) * nh * HD + (size_t)(kvh * G + r % G) * HD;
        const float inv = 1.0f / l[h];
#pragma unroll
        for (int d = 0; d < HD / 8; d++) put_out2(out, dst + 8 * d + 2 * t4, o[d][2 * h] * inv, o[d][2 * h + 1] * inv);
    }
}

/* The separate qk-norm + rope + store launch, for the kernels that do not fuse it. */
template <typename KV>
cudaError_t qk_norm_rope_store(cudaStream_t st, const CuAttnHeads *ah, KV *kc, KV *vc, const AttnMeta *mt) {
    return cu_qk_norm_rope_store(st, ah->qkv, ah->q_norm, ah->k_norm, ah->cs, mt->n_tokens, ah->nh, ah->nkv, ah->hd,
                                 ah->eps, kc, vc, mt->slots);
}

} // namespace

/* head_dim 128; prefill and mixed steps when a block's 64 rows hold whole query groups, decode
 * with at most 16 query heads per kv head (the A operand's rows). */
bool cuda_attention_tensor_cores(int head_dim, int n_heads, int n_kv_heads, int max_q) {
    const int G = n_heads / n_kv_heads;
    if (head_dim != kMmaHD) return false;
    return max_q > 1 ? kPfRows % G == 0 : G <= 16;
}

namespace {

template <int HD, typename KV>
cudaError_t attention_hd(cudaStream_t st, CuAttnOut out, const CuAttnHeads *ah, KV *kc, KV *vc, int bs,
                         const AttnMeta *mt, const CuAttnScratch *scr, int sms) {
    const int nh = ah->nh, nkv = ah->nkv;
    float *qkv = ah->qkv;
    const int G = nh / nkv;
    const float scale = 1.0f / sqrtf((float)HD);
    int bs_shift = 0; /* block sizes are powers of two (checked at kv_alloc) */
    while ((1 << bs_shift) < bs) bs_shift++;
    if (mt->max_q == 1) {
        /* Splits of each (sequence, kv head) pair's context, over about two blocks per
         * multiprocessor. The scalar kernel rounds up, at most 32. The tensor-core kernel runs
         * two blocks per multiprocessor (its registers): a split that spills into a second,
         * partial wave costs more than it spreads, and past 4 splits the per-block work (q, the
         * partials, the combine) outweighs the shorter chains; so whole splits, at most 4, while
         * every block fits at once (H200, 36 layers at context 640, bf16 cache, ms, this rule vs
         * rounding up: 4 sequences 0.341 vs 0.497, 8: 0.411 vs 0.566, 16: 0.617 vs 0.810, 32:
         * 0.929 vs 1.179; bench/RESULTS.md, twenty-fourth session). One sequence takes 8: its
         * chains are the whole step's latency (H200, batch-1 decode step at context 512, 4 / 8
         * splits: 2.020 / 1.999 ms; 16 splits cost more alone: 9.5 vs 8.4 us per layer at 640;
         * twenty-fifth session). Then no more than the scratch holds. Depends on n_seqs only
         * (graph-safe). */
        const long long pairs = (long long)mt->n_seqs * nkv, slots = 2LL * sms;
        const bool tensor_cores = cuda_attention_tensor_cores(HD, nh, nkv, mt->max_q);
        long long splits = tensor_cores ? std::min(pairs >= slots ? 1 : slots / pairs, mt->n_seqs == 1 ? 8LL : 4LL)
                                        : std::min((slots + pairs - 1) / pairs, 32LL);
        while (splits > 1 && (size_t)(pairs * splits * G * cu_part_stride(HD)) > scr->part_floats) splits--;
        if (pairs > scr->n_counters) splits = 1;
        if (splits < 1) splits = 1;
        const NewToken nt = {qkv, ah->q_norm, ah->k_norm, ah->cs, mt->slots, ah->eps};
        if (tensor_cores) { /* (see the top of the file) */
            static bool mma_attr = false; /* one per instantiation */
            if (!mma_attr) {
                cudaError_t rc = cudaFuncSetAttribute(attn_decode_mma<KV, 4>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                      (int)mma_decode_smem(4));
                if (rc == cudaSuccess)
                    rc = cudaFuncSetAttribute(attn_decode_mma<KV, 2>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                              (int)mma_decode_smem(2));
                if (rc != cudaSuccess) return rc;
                mma_attr = true;
            }
            /* Unsplit and more pairs than the 4-warp blocks' slots: blocks of 2 warps (4 per SM,
             * the same 8 warps), each warp walking every other tile, if they fill their last wave
             * to 90%. The 4-warp blocks' second wave pays each block's fixed costs again (q, the
             * merge; ~6.6 us); 2-warp blocks pay them once per pair with the SM's other three
             * blocks streaming meanwhile, but take twice as long, so a partial last wave of them
             * costs more (H200, 36 layers at context 640, bf16 / e4m3 cache, ms, 4 vs 2 warps: 64
             * sequences (512 pairs, fill 0.97) 1.813 vs 1.739 / 1.616 vs 1.446; 128: 3.512 vs
             * 3.379 / 3.221 vs 2.885; 256: 6.850 vs 6.585 / 6.400 vs 5.734; 48 (fill 0.73):
             * 1.532 vs 1.646 / 1.582 vs 1.435; 96 (0.73): 2.669 vs 2.733 / 2.421 vs 2.552;
             * twenty-sixth session). */
            const long long slots2 = 4LL * sms, waves2 = (pairs + slots2 - 1) / slots2;
            const bool two_warps =
                splits == 1 && pairs > slots && (double)pairs >= 0.9 * (double)(waves2 * slots2);
            auto launch = [&](auto kernel, int warps) {
                return cu_launch(st, dim3((unsigned)splits, nkv, mt->n_seqs), dim3(32 * warps),
                                 mma_decode_smem(warps), kernel, out, nt, kc, vc, mt->q_start, mt->ctx_len,
                                 mt->block_tables, mt->max_blocks, bs, bs_shift, nh, nkv, (int)splits, scr->part,
                                 scr->counters, scale);
            };
            return two_warps ? launch(attn_decode_mma<KV, 2>, 2) : launch(attn_decode_mma<KV, 4>, 4);
        }
        return cu_launch(st, dim3((unsigned)splits, nkv, mt->n_seqs), dim3(128), 0, attn_decode<HD, KV>, out, nt, kc, vc,
                         mt->q_start, mt->ctx_len, mt->block_tables, mt->max_blocks, bs, bs_shift, nh, nkv, (int)splits,
                         scr->part, scr->counters, scale);
    }
    cudaError_t rc = qk_norm_rope_store(st, ah, kc, vc, mt);
    if (rc != cudaSuccess) return rc;
    if (cuda_attention_tensor_cores(HD, nh, nkv, mt->max_q)) { /* (see attn_prefill_mma) */
        static bool pf_attr = false; /* one per instantiation */
        if (!pf_attr) {
            rc = cudaFuncSetAttribute(attn_prefill_mma<KV>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kPfSmem);
            if (rc != cudaSuccess) return rc;
            pf_attr = true;
        }
        const int qt = kPfRows / G;
        return cu_launch(st, dim3((mt->max_q + qt - 1) / qt, nkv, mt->n_seqs), dim3(128), kPfSmem, attn_prefill_mma<KV>,
                         out, qkv, kc, vc, mt->q_start, mt->ctx_len, mt->block_tables, mt->max_blocks, bs, bs_shift, nh,
                         nkv, scale);
    }
    constexpr int RT = 4 * prefill_rows<HD>();
    if (G > RT) return cudaErrorInvalidValue;
    static bool attr_set = false; /* one per instantiation */
    constexpr size_t smem = prefill_smem<HD>();
    if (!attr_set) {
        rc = cudaFuncSetAttribute(attn_prefill<HD, KV>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (rc != cudaSuccess) return rc;
        attr_set = true;
    }
    const int qt = RT / G;
    return cu_launch(st, dim3((mt->max_q + qt - 1) / qt, nkv, mt->n_seqs), dim3(128), smem, attn_prefill<HD, KV>, out, qkv,
                     kc, vc, mt->q_start, mt->ctx_len, mt->block_tables, mt->max_blocks, bs, bs_shift, nh, nkv, scale);
}

} // namespace

bool cu_attention_supports(int hd) { return hd == 64 || hd == 128 || hd == 256; }

namespace {
template <typename KV>
cudaError_t attention(cudaStream_t st, CuAttnOut out, const CuAttnHeads *heads, KV *kc, KV *vc, int block_size,
                      const AttnMeta *meta, const CuAttnScratch *scr, int sms) {
    switch (heads->hd) {
    case 64: return attention_hd<64>(st, out, heads, kc, vc, block_size, meta, scr, sms);
    case 128: return attention_hd<128>(st, out, heads, kc, vc, block_size, meta, scr, sms);
    case 256: return attention_hd<256>(st, out, heads, kc, vc, block_size, meta, scr, sms);
    default: return cudaErrorInvalidValue;
    }
}
} // namespace

cudaError_t cu_attention(cudaStream_t st, CuAttnOut out, const CuAttnHeads *heads, CuKvPools kv, int block_size,
                         const AttnMeta *meta, const CuAttnScratch *scr, int sms) {
    if (meta->n_tokens <= 0 || meta->n_seqs <= 0) return cudaSuccess;
    if (kv.dtype == KV_FP8)
        return attention(st, out, heads, static_cast<__nv_fp8_e4m3 *>(kv.k), static_cast<__nv_fp8_e4m3 *>(kv.v),
                         block_size, meta, scr, sms);
    return attention(st, out, heads, static_cast<__nv_bfloat16 *>(kv.k), static_cast<__nv_bfloat16 *>(kv.v),
                     block_size, meta, scr, sms);
}
