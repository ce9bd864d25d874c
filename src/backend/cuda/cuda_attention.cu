/* cuda_attention.cu — causal GQA attention over the paged bf16 KV cache, two kernels:
 *
 * Decode (every sequence has one new token; the shape captured in CUDA graphs). One token's work
 * is tiny but its context can be long, so the context is split (flash-decoding): block
 * (split, kv head, sequence) covers an even share of the context, computed on the device from
 * ctx_len (the split count depends only on the number of sequences, so a captured graph stays
 * valid as the context grows). Its 4 warps take the kv head's query heads, walking the same K/V
 * rows (L1 serves the repeats) in batches of 16 tokens (8 at head_dim 256) whose block-table
 * lookups run in parallel across lanes and whose loads are all issued together. Each
 * block writes an unnormalised partial (output, max, sum); the last block to arrive at a
 * (sequence, kv head) combines them (a counter per pair, reset by that block), which saves a
 * second launch per layer.
 *
 * Prefill (chunks of many tokens; also mixed steps). Block = a tile of consecutive queries of one
 * sequence times the query heads of one kv head (64 rows, or 32 at head_dim 256); keys come in
 * tiles of 32 through shared memory (rows padded by one float so lane-per-key reads hit distinct
 * banks), scores are register-blocked over 32 dims, and softmax is online (flash attention), so
 * a chunk attends to everything earlier chunks left in the cache without materialising scores.
 *
 * All arithmetic is float32 with K/V rounded to bf16 in the cache (bf16 tolerances apply). */
#include <math.h>

#include "backend/cuda/cuda_common.cuh"

namespace {

/* VPL consecutive bf16 (raw words, loaded unconditionally so a batch's loads issue together). */
template <int VPL>
struct Bf16Vec {
    uint32_t w[VPL / 2];
};

/* volatile, so the compiler keeps a batch's loads where they are written (ahead of the math)
 * instead of sinking each to its first use, which would serialise their latencies. L2_ONLY
 * (.cg) for what the decode kernel reads before pdl_wait() and the new token's row after it: an
 * L1 line of that row fetched before the wait would be stale after it. Everything else goes
 * through L1, which serves the block's other warps (query heads) the same rows. */
template <int VPL, bool L2_ONLY>
CU_DEV Bf16Vec<VPL> load_raw(const __nv_bfloat16 *p) {
    Bf16Vec<VPL> r;
    if constexpr (L2_ONLY) {
        if constexpr (VPL == 2) {
            asm volatile("ld.global.cg.u32 %0, [%1];" : "=r"(r.w[0]) : "l"(p));
        } else if constexpr (VPL == 4) {
            asm volatile("ld.global.cg.v2.u32 {%0, %1}, [%2];" : "=r"(r.w[0]), "=r"(r.w[1]) : "l"(p));
        } else {
            asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(r.w[0]), "=r"(r.w[1]), "=r"(r.w[2]), "=r"(r.w[3])
                         : "l"(p));
        }
    } else {
        if constexpr (VPL == 2) {
            asm volatile("ld.global.u32 %0, [%1];" : "=r"(r.w[0]) : "l"(p));
        } else if constexpr (VPL == 4) {
            asm volatile("ld.global.v2.u32 {%0, %1}, [%2];" : "=r"(r.w[0]), "=r"(r.w[1]) : "l"(p));
        } else {
            asm volatile("ld.global.v4.u32 {%0, %1, %2, %3}, [%4];"
                         : "=r"(r.w[0]), "=r"(r.w[1]), "=r"(r.w[2]), "=r"(r.w[3])
                         : "l"(p));
        }
    }
    return r;
}

template <int VPL>
CU_DEV float raw_at(const Bf16Vec<VPL> &r, int i) {
    return i & 1 ? bf16_hi(r.w[i >> 1]) : bf16_lo(r.w[i >> 1]);
}

/* Tokens per batch of the decode loop: all K/V loads of a batch are issued together. */
template <int HD>
__host__ __device__ constexpr int decode_batch() {
    return HD <= 128 ? 16 : 8;
}

/* Grid (splits, nkv, n_seqs), 4 warps; warp w handles query heads kvh * G + g for g = w, w + 4, ..
 * (the K/V rows of the kv head are read once per head, from L1 after the first); lane holds dims
 * lane * VPL .. + VPL. */
template <int HD>
__global__ void __launch_bounds__(128) attn_decode(float *out, const float *qkv, const __nv_bfloat16 *kc,
                                                   const __nv_bfloat16 *vc, const int32_t *q_start,
                                                   const int32_t *ctx_len, const int32_t *tables, int max_blocks,
                                                   int bs, int bs_shift, int nh, int nkv, int splits, float *part,
                                                   int *counters, float scale) {
    constexpr int VPL = HD / 32, TB = decode_batch<HD>();
    __shared__ int last;
    pdl_trigger();
    /* Before pdl_wait() only what no running kernel writes: the step's metadata (uploaded before
     * the step's first kernel) and the cache rows of earlier tokens. So the first batch of K/V
     * streams in while the previous kernels finish; the new token's row (position ctx - 1, just
     * stored by qk_norm_rope_store) is loaded after the wait. */
    const int split = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
    const int G = nh / nkv, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int t = q_start[s], ctx = ctx_len[s];
    const int chunk = (ctx + splits - 1) / splits;
    const int p0 = split * chunk, p1 = min(ctx, p0 + chunk);
    const int32_t *table = tables + (size_t)s * max_blocks;
    const size_t pair = (size_t)s * nkv + kvh;

    /* Batch at p: lane j < TB finds token p + j's cache row (one table load each, in parallel),
     * then all K/V rows are requested; tokens past the split re-read token p (masked later), so
     * no load is conditional and all of them issue together. */
    Bf16Vec<VPL> kr[TB], vr[TB];
    size_t row = 0;
    auto load_batch = [&](int p, int skip) {
        row = 0;
        if (lane < TB && p + lane < p1) {
            const int pos = p + lane;
            row = (((size_t)table[pos >> bs_shift] * bs + (pos & (bs - 1))) * nkv + kvh) * HD;
        }
#pragma unroll
        for (int j = 0; j < TB; j++) {
            const size_t off = __shfl_sync(0xffffffffu, row, p + j < p1 && p + j != skip ? j : 0) + lane * VPL;
            if (skip >= 0) { /* before the wait (warp-uniform) */
                kr[j] = load_raw<VPL, true>(kc + off);
                vr[j] = load_raw<VPL, true>(vc + off);
            } else {
                kr[j] = load_raw<VPL, false>(kc + off);
                vr[j] = load_raw<VPL, false>(vc + off);
            }
        }
    };
    if (warp < G && p0 < p1) load_batch(p0, ctx - 1);
    pdl_wait();
    if (warp < G && p0 <= ctx - 1 && ctx - 1 < min(p1, p0 + TB)) {
        const size_t off = __shfl_sync(0xffffffffu, row, ctx - 1 - p0) + lane * VPL;
#pragma unroll
        for (int j = 0; j < TB; j++)
            if (p0 + j == ctx - 1) kr[j] = load_raw<VPL, true>(kc + off), vr[j] = load_raw<VPL, true>(vc + off);
    }

    for (int g = warp; g < G; g += 4) {
        const int h = kvh * G + g;
        float q[VPL];
        const float *qp = qkv + (size_t)t * (nh + 2 * nkv) * HD + (size_t)h * HD + lane * VPL;
#pragma unroll
        for (int i = 0; i < VPL; i++) q[i] = qp[i] * scale;
        float m = -INFINITY, l = 0.0f, o[VPL];
#pragma unroll
        for (int i = 0; i < VPL; i++) o[i] = 0.0f;
        for (int p = p0; p < p1; p += TB) {
            if (g != warp || p != p0) load_batch(p, -1); /* the first batch of the first head is in */
            float sc[TB];
            float mt = m;
#pragma unroll
            for (int j = 0; j < TB; j++) {
                float d = 0.0f;
#pragma unroll
                for (int i = 0; i < VPL; i++) d = fmaf(q[i], raw_at<VPL>(kr[j], i), d);
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
                /* masked tokens are skipped, not weighted by 0: their rows may be a prefetched
                 * copy of the new token's slot from before it was written (any bits, NaN too) */
                if (p + j >= p1) continue;
                const float pj = sc[j] == -INFINITY ? 0.0f : __expf(sc[j] - mt);
                l += pj;
#pragma unroll
                for (int i = 0; i < VPL; i++) o[i] = fmaf(pj, raw_at<VPL>(vr[j], i), o[i]);
            }
            m = mt;
        }
        if (splits == 1) {
            float *dst = out + (size_t)t * nh * HD + (size_t)h * HD + lane * VPL;
            const float inv = 1.0f / l;
#pragma unroll
            for (int i = 0; i < VPL; i++) dst[i] = o[i] * inv;
        } else {
            float *mine = part + ((pair * splits + split) * G + g) * (HD + 2);
#pragma unroll
            for (int i = 0; i < VPL; i++) mine[lane * VPL + i] = o[i];
            if (lane == 0) mine[HD] = m, mine[HD + 1] = l;
        }
    }
    if (splits == 1) return;
    /* publish: the block's writes, then one fenced arrival; the last to arrive combines */
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        last = atomicAdd(&counters[pair], 1) == splits - 1;
        if (last) __threadfence();
    }
    __syncthreads();
    if (!last) return;
    for (int g = warp; g < G; g += 4) {
        /* lane i owns split i's max and sum (splits <= 32); the outputs are summed split by split
         * with their loads unrolled, so many are in flight at once */
        const float *base = part + (pair * splits * G + g) * (HD + 2);
        const size_t stride = (size_t)G * (HD + 2);
        const float ms = lane < splits ? __ldcg(base + lane * stride + HD) : -INFINITY;
        const float ls = lane < splits ? __ldcg(base + lane * stride + HD + 1) : 0.0f;
        const float mx = warp_max(ms);
        const float w = ms == -INFINITY ? 0.0f : __expf(ms - mx);
        const float lsum = warp_sum(w * ls);
        float acc[VPL];
#pragma unroll
        for (int i = 0; i < VPL; i++) acc[i] = 0.0f;
#pragma unroll 8
        for (int sp = 0; sp < splits; sp++) {
            const float wsp = __shfl_sync(0xffffffffu, w, sp);
            const float *pp = base + sp * stride + lane * VPL;
#pragma unroll
            for (int i = 0; i < VPL; i++) acc[i] = fmaf(wsp, __ldcg(pp + i), acc[i]);
        }
        float *dst = out + (size_t)t * nh * HD + (size_t)(kvh * G + g) * HD + lane * VPL;
        const float inv = 1.0f / lsum;
#pragma unroll
        for (int i = 0; i < VPL; i++) dst[i] = acc[i] * inv;
    }
    if (threadIdx.x == 0) counters[pair] = 0;
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
template <int HD>
__global__ void __launch_bounds__(128) attn_prefill(float *out, const float *qkv, const __nv_bfloat16 *kc,
                                                    const __nv_bfloat16 *vc, const int32_t *q_start,
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
                kv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(kc + off));
                vv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(vc + off));
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
        float *dst = out + (size_t)(t0 + i0 + r / G) * nh * HD + (size_t)(kvh * G + r % G) * HD;
#pragma unroll
        for (int i = 0; i < VPL; i++) dst[lane + 32 * i] = o[j][i] * inv;
    }
}

template <int HD>
cudaError_t attention_hd(cudaStream_t st, float *out, const float *qkv, int nh, int nkv, const __nv_bfloat16 *kc,
                         const __nv_bfloat16 *vc, int bs, const AttnMeta *mt, const CuAttnScratch *scr, int sms) {
    const int G = nh / nkv;
    const float scale = 1.0f / sqrtf((float)HD);
    int bs_shift = 0; /* block sizes are powers of two (checked at kv_alloc) */
    while ((1 << bs_shift) < bs) bs_shift++;
    if (mt->max_q == 1) {
        /* Splits: about two blocks per multiprocessor over all (sequence, kv head) pairs, at most
         * 32, and no more than the scratch holds. Depends on n_seqs only (graph-safe). (Eight per
         * multiprocessor measured no faster at 8, 64 or 256 sequences on an H100: batched decode
         * attention is bound by its per-token shuffles, not by latency.) */
        const long long pairs = (long long)mt->n_seqs * nkv;
        long long splits = (2LL * sms + pairs - 1) / pairs;
        if (splits > 32) splits = 32;
        while (splits > 1 && (size_t)(pairs * splits * G * (HD + 2)) > scr->part_floats) splits--;
        if (pairs > scr->n_counters) splits = 1;
        if (splits < 1) splits = 1;
        return cu_launch(st, dim3((unsigned)splits, nkv, mt->n_seqs), dim3(128), 0, attn_decode<HD>, out, qkv, kc,
                         vc, mt->q_start, mt->ctx_len, mt->block_tables, mt->max_blocks, bs, bs_shift, nh, nkv, (int)splits,
                         scr->part, scr->counters, scale);
    }
    constexpr int RT = 4 * prefill_rows<HD>();
    if (G > RT) return cudaErrorInvalidValue;
    static bool attr_set = false; /* one per instantiation */
    constexpr size_t smem = prefill_smem<HD>();
    if (!attr_set) {
        cudaError_t rc = cudaFuncSetAttribute(attn_prefill<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (rc != cudaSuccess) return rc;
        attr_set = true;
    }
    const int qt = RT / G;
    return cu_launch(st, dim3((mt->max_q + qt - 1) / qt, nkv, mt->n_seqs), dim3(128), smem, attn_prefill<HD>, out, qkv,
                     kc, vc, mt->q_start, mt->ctx_len, mt->block_tables, mt->max_blocks, bs, bs_shift, nh, nkv, scale);
}

} // namespace

bool cu_attention_supports(int hd) { return hd == 64 || hd == 128 || hd == 256; }

cudaError_t cu_attention(cudaStream_t st, float *out, const float *qkv, int nh, int nkv, int hd,
                         const __nv_bfloat16 *kc, const __nv_bfloat16 *vc, int block_size, const AttnMeta *meta,
                         const CuAttnScratch *scr, int sms) {
    if (meta->n_tokens <= 0 || meta->n_seqs <= 0) return cudaSuccess;
    switch (hd) {
    case 64: return attention_hd<64>(st, out, qkv, nh, nkv, kc, vc, block_size, meta, scr, sms);
    case 128: return attention_hd<128>(st, out, qkv, nh, nkv, kc, vc, block_size, meta, scr, sms);
    case 256: return attention_hd<256>(st, out, qkv, nh, nkv, kc, vc, block_size, meta, scr, sms);
    default: return cudaErrorInvalidValue;
    }
}
