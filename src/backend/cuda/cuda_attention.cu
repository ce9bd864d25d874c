/* cuda_attention.cu — causal GQA attention over the paged bf16 KV cache, two kernels:
 *
 * Decode (every sequence has one new token; the shape captured in CUDA graphs). One token's work
 * is tiny but its context can be long, so the context is split (flash-decoding): block
 * (split, kv head, sequence) covers an even share of the context, computed on the device from
 * ctx_len (the split count depends only on the number of sequences, so a captured graph stays
 * valid as the context grows). Its warps are the kv head's query heads, walking the same K/V rows
 * (L1 serves the repeats) in batches of 8 tokens with all loads of a batch issued together. Each
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

constexpr int kTokBatch = 8;

/* VPL consecutive bf16 at p, as floats. */
template <int VPL>
CU_DEV void load_bf16(const __nv_bfloat16 *p, float (&f)[VPL]) {
    if constexpr (VPL == 2) {
        uint32_t w = *reinterpret_cast<const uint32_t *>(p);
        f[0] = bf16_lo(w), f[1] = bf16_hi(w);
    } else if constexpr (VPL == 4) {
        uint2 w = *reinterpret_cast<const uint2 *>(p);
        f[0] = bf16_lo(w.x), f[1] = bf16_hi(w.x), f[2] = bf16_lo(w.y), f[3] = bf16_hi(w.y);
    } else {
        uint4 w = *reinterpret_cast<const uint4 *>(p);
        f[0] = bf16_lo(w.x), f[1] = bf16_hi(w.x), f[2] = bf16_lo(w.y), f[3] = bf16_hi(w.y);
        f[4] = bf16_lo(w.z), f[5] = bf16_hi(w.z), f[6] = bf16_lo(w.w), f[7] = bf16_hi(w.w);
    }
}

/* Grid (splits, nkv, n_seqs), block = G warps; warp g is query head kvh * G + g; lane holds dims
 * lane * VPL .. + VPL. */
template <int HD>
__global__ void attn_decode(float *out, const float *qkv, const __nv_bfloat16 *kc, const __nv_bfloat16 *vc,
                            const int32_t *q_start, const int32_t *ctx_len, const int32_t *tables, int max_blocks,
                            int bs, int nh, int nkv, int splits, float *part, int *counters, float scale) {
    constexpr int VPL = HD / 32;
    __shared__ int last;
    pdl_trigger();
    pdl_wait();
    const int split = blockIdx.x, kvh = blockIdx.y, s = blockIdx.z;
    const int G = nh / nkv, g = threadIdx.x >> 5, lane = threadIdx.x & 31, h = kvh * G + g;
    const int t = q_start[s], ctx = ctx_len[s];
    const int chunk = (ctx + splits - 1) / splits;
    const int p0 = split * chunk, p1 = min(ctx, p0 + chunk);
    const int32_t *table = tables + (size_t)s * max_blocks;

    float q[VPL];
    const float *qp = qkv + (size_t)t * (nh + 2 * nkv) * HD + (size_t)h * HD + lane * VPL;
#pragma unroll
    for (int i = 0; i < VPL; i++) q[i] = qp[i] * scale;

    float m = -INFINITY, l = 0.0f, o[VPL];
#pragma unroll
    for (int i = 0; i < VPL; i++) o[i] = 0.0f;
    for (int p = p0; p < p1; p += kTokBatch) {
        float kf[kTokBatch][VPL], vf[kTokBatch][VPL], sc[kTokBatch];
#pragma unroll
        for (int j = 0; j < kTokBatch; j++) {
            if (p + j < p1) {
                const int pos = p + j;
                const size_t off = (((size_t)table[pos / bs] * bs + pos % bs) * nkv + kvh) * HD + lane * VPL;
                load_bf16<VPL>(kc + off, kf[j]);
                load_bf16<VPL>(vc + off, vf[j]);
            } else {
#pragma unroll
                for (int i = 0; i < VPL; i++) kf[j][i] = vf[j][i] = 0.0f;
            }
        }
        float mt = m;
#pragma unroll
        for (int j = 0; j < kTokBatch; j++) {
            float d = 0.0f;
#pragma unroll
            for (int i = 0; i < VPL; i++) d = fmaf(q[i], kf[j][i], d);
            d = warp_sum(d);
            sc[j] = p + j < p1 ? d : -INFINITY;
            mt = fmaxf(mt, sc[j]);
        }
        const float corr = m == -INFINITY ? 0.0f : __expf(m - mt);
        l *= corr;
#pragma unroll
        for (int i = 0; i < VPL; i++) o[i] *= corr;
#pragma unroll
        for (int j = 0; j < kTokBatch; j++) {
            const float pj = sc[j] == -INFINITY ? 0.0f : __expf(sc[j] - mt);
            l += pj;
#pragma unroll
            for (int i = 0; i < VPL; i++) o[i] = fmaf(pj, vf[j][i], o[i]);
        }
        m = mt;
    }

    float *dst = out + (size_t)t * nh * HD + (size_t)h * HD + lane * VPL;
    if (splits == 1) {
        const float inv = 1.0f / l;
#pragma unroll
        for (int i = 0; i < VPL; i++) dst[i] = o[i] * inv;
        return;
    }
    const size_t pair = (size_t)s * nkv + kvh;
    float *mine = part + ((pair * splits + split) * G + g) * (HD + 2);
#pragma unroll
    for (int i = 0; i < VPL; i++) mine[lane * VPL + i] = o[i];
    if (lane == 0) mine[HD] = m, mine[HD + 1] = l;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&counters[pair], 1) == splits - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    const float *base = part + (pair * splits * G + g) * (HD + 2);
    const size_t stride = (size_t)G * (HD + 2);
    float mx = -INFINITY;
    for (int i = 0; i < splits; i++) mx = fmaxf(mx, __ldcg(base + i * stride + HD));
    float lsum = 0.0f, acc[VPL];
#pragma unroll
    for (int i = 0; i < VPL; i++) acc[i] = 0.0f;
    for (int sp = 0; sp < splits; sp++) {
        const float *pp = base + sp * stride;
        const float ms = __ldcg(pp + HD);
        const float w = ms == -INFINITY ? 0.0f : __expf(ms - mx);
        lsum = fmaf(w, __ldcg(pp + HD + 1), lsum);
#pragma unroll
        for (int i = 0; i < VPL; i++) acc[i] = fmaf(w, __ldcg(pp + lane * VPL + i), acc[i]);
    }
    const float inv = 1.0f / lsum;
#pragma unroll
    for (int i = 0; i < VPL; i++) dst[i] = acc[i] * inv;
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
                                                    int bs, int nh, int nkv, float scale) {
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
                const size_t off = (((size_t)table[p / bs] * bs + p % bs) * nkv + kvh) * HD + d;
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
    if (mt->max_q == 1) {
        if (G > 32) return cudaErrorInvalidValue;
        /* Splits: about two blocks per multiprocessor over all (sequence, kv head) pairs, at most
         * 32, and no more than the scratch holds. Depends on n_seqs only (graph-safe). */
        const long long pairs = (long long)mt->n_seqs * nkv;
        long long splits = (2LL * sms + pairs - 1) / pairs;
        if (splits > 32) splits = 32;
        while (splits > 1 && (size_t)(pairs * splits * G * (HD + 2)) > scr->part_floats) splits--;
        if (pairs > scr->n_counters) splits = 1;
        if (splits < 1) splits = 1;
        return cu_launch(st, dim3((unsigned)splits, nkv, mt->n_seqs), dim3(32 * G), 0, attn_decode<HD>, out, qkv, kc,
                         vc, mt->q_start, mt->ctx_len, mt->block_tables, mt->max_blocks, bs, nh, nkv, (int)splits,
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
                     kc, vc, mt->q_start, mt->ctx_len, mt->block_tables, mt->max_blocks, bs, nh, nkv, scale);
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
