/* cuda_sample.cu — next-token choice on the GPU, so a decode step returns 4 bytes per sequence
 * instead of a 600 KB row of logits.
 *
 * One 1024-thread block per row, the same rules as the host sampler (src/model/sampler.c):
 * greedy = first index of the maximum; otherwise weights e_i = exp((l_i - max) / T), top-k keeps
 * the k largest logits, min-p drops e_i < min_p (min_p times the top probability), top-p keeps
 * the smallest set of the largest survivors whose mass reaches top_p of the survivors' mass, and
 * the draw r = u * (kept mass) walks the kept tokens in descending order when top-k or top-p is
 * on (sorted, as the host does) and in index order otherwise.
 *
 * The maximum (all a greedy row needs, and the reference of the weights) comes first, from
 * kArgmaxSplits blocks per row (row_argmax_kernel): one block scanning a 151936-entry row was
 * latency-bound on its loads (H100: see bench/RESULTS.md, ninth session).
 *
 * Nothing is sorted: every "k largest" / "mass reaches x" question is a radix select over the
 * logits' order-preserving 32-bit keys, 8 bits per pass (4 passes over the row, each a 256-bin
 * histogram of counts or masses in shared memory). Ties between equal logits are broken by index
 * where the host's order is itself arbitrary. */
#include <limits.h>
#include <math.h>

#include "backend/cuda/cuda_common.cuh"

namespace {

constexpr int kThreads = 1024;
constexpr int kArgmaxThreads = 256;
static_assert(kArgmaxSplits == 32, "one lane of a warp per split when combining");

/* Makes (best, bi) the first index of the maximum of itself and (v, j); bi == V: none yet. The
 * first candidate is taken whatever its value, as a scan in index order would. */
CU_DEV void take_max(float &best, int &bi, float v, int j, int V) {
    if (j < V && (bi == V || v > best || (v == best && j < bi))) best = v, bi = j;
}

CU_DEV void warp_take_max(float &best, int &bi, int V) {
    for (int o = 16; o; o >>= 1) {
        const float v = __shfl_xor_sync(0xffffffffu, best, o);
        const int j = __shfl_xor_sync(0xffffffffu, bi, o);
        take_max(best, bi, v, j, V);
    }
}

/* Block (s, row): the first index of the maximum over split s of the row (a multiple-of-4 range,
 * read as float4 when V is a multiple of 4) into part[row * kArgmaxSplits + s]. */
__global__ void __launch_bounds__(kArgmaxThreads) row_argmax_kernel(const float *logits, int V, CuArgmax *part) {
    __shared__ float wbest[kArgmaxThreads / 32];
    __shared__ int wbi[kArgmaxThreads / 32];
    pdl_trigger();
    pdl_wait();
    const int split = blockIdx.x, row = blockIdx.y, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const float *l = logits + (size_t)row * V;
    const int chunk = ((V + kArgmaxSplits - 1) / kArgmaxSplits + 3) & ~3;
    const int b = min(V, split * chunk), e = min(V, b + chunk);
    float best = -INFINITY;
    int bi = V;
    if ((V & 3) == 0) {
        const float4 *l4 = reinterpret_cast<const float4 *>(l);
#pragma unroll 4
        for (int q = b / 4 + tid; q < e / 4; q += kArgmaxThreads) {
            const float4 v = l4[q];
            take_max(best, bi, v.x, 4 * q, V);
            take_max(best, bi, v.y, 4 * q + 1, V);
            take_max(best, bi, v.z, 4 * q + 2, V);
            take_max(best, bi, v.w, 4 * q + 3, V);
        }
    } else {
        for (int i = b + tid; i < e; i += kArgmaxThreads) take_max(best, bi, l[i], i, V);
    }
    warp_take_max(best, bi, V);
    if (lane == 0) wbest[warp] = best, wbi[warp] = bi;
    __syncthreads();
    if (warp == 0) {
        best = lane < kArgmaxThreads / 32 ? wbest[lane] : -INFINITY;
        bi = lane < kArgmaxThreads / 32 ? wbi[lane] : V;
        warp_take_max(best, bi, V);
        if (lane == 0) part[(size_t)row * kArgmaxSplits + split] = CuArgmax{best, bi};
    }
}

/* Order-preserving key of a float (larger float, larger key). */
CU_DEV uint32_t okey(float f) {
    uint32_t u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct Shared {
    float red[32];
    float hist[256];
    uint32_t prefix;
    float above;
    int idx;
};

/* The largest key v such that the weight of elements with key >= v reaches target (>= target, or
 * > target when strict). weight(i, key) is 0 for excluded elements. When rounding leaves target
 * unreached, the smallest key with weight. Every thread gets the result. */
template <class F>
__device__ uint32_t select_key(const float *l, int V, F weight, float target, bool strict, Shared &sh) {
    const int tid = threadIdx.x, lane = tid & 31;
    uint32_t prefix = 0, mask = 0;
    float above = 0.0f; /* weight of elements above the current prefix's range */
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) sh.hist[i] = 0.0f;
        __syncthreads();
        for (int i = tid; i < V; i += blockDim.x) {
            const uint32_t key = okey(l[i]);
            if ((key & mask) != prefix) continue;
            const float w = weight(i, key);
            if (w > 0.0f) atomicAdd(&sh.hist[(key >> shift) & 255u], w);
        }
        __syncthreads();
        if (tid < 32) {
            /* lane holds digits 255 - 8 lane .. 255 - 8 lane - 7 (descending) */
            float hb[8], local = 0.0f;
#pragma unroll
            for (int j = 0; j < 8; j++) local += hb[j] = sh.hist[255 - (lane * 8 + j)];
            float inc = local;
#pragma unroll
            for (int o = 1; o < 32; o <<= 1) {
                const float n = __shfl_up_sync(0xffffffffu, inc, o);
                if (lane >= o) inc += n;
            }
            const float exc = above + inc - local;
            const bool hit = strict ? above + inc > target : above + inc >= target;
            const unsigned hits = __ballot_sync(0xffffffffu, hit && local > 0.0f);
            const unsigned nonzero = __ballot_sync(0xffffffffu, local > 0.0f);
            /* the lane where the running weight crosses target, else the lowest non-empty one */
            const int L = hits ? __ffs(hits) - 1 : nonzero ? 31 - __clz(nonzero) : 31;
            if (lane == L) {
                float c = exc;
                int chosen = -1, lowest = 0;
                float c_lowest = exc;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    if (chosen >= 0 || hb[j] <= 0.0f) continue;
                    const float c2 = c + hb[j];
                    if (hits && (strict ? c2 > target : c2 >= target)) {
                        chosen = j;
                    } else {
                        lowest = j;
                        c_lowest = c;
                        c = c2;
                    }
                }
                if (chosen < 0) chosen = lowest, c = c_lowest;
                sh.prefix = prefix | ((uint32_t)(255 - (L * 8 + chosen)) << shift);
                sh.above = c;
            }
        }
        __syncthreads();
        prefix = sh.prefix;
        above = sh.above;
        mask |= 255u << shift;
    }
    return prefix;
}

/* Sum of weight(i, key) over the row (every thread gets it). */
template <class F>
__device__ float total_weight(const float *l, int V, F weight, Shared &sh) {
    float s = 0.0f;
    for (int i = threadIdx.x; i < V; i += blockDim.x) s += weight(i, okey(l[i]));
    return block_sum(s, sh.red);
}

__global__ void __launch_bounds__(kThreads) sample_kernel(const float *logits, int V, const CuSampleRow *rows,
                                                          const CuArgmax *part, int32_t *out) {
    __shared__ Shared sh;
    pdl_trigger();
    pdl_wait();
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const CuSampleRow P = rows[blockIdx.x];
    const float *l = logits + (size_t)blockIdx.x * V;

    /* max and first index of it, from the splits of row_argmax_kernel */
    __shared__ float wbest[1];
    __shared__ int wbi[1];
    if (warp == 0) {
        const CuArgmax a = part[(size_t)blockIdx.x * kArgmaxSplits + lane];
        float best = a.v;
        int bi = a.i;
        warp_take_max(best, bi, V);
        if (lane == 0) wbest[0] = best, wbi[0] = bi;
    }
    __syncthreads();
    const float mx = wbest[0];
    if (P.greedy) {
        if (tid == 0) out[blockIdx.x] = wbi[0] < V ? wbi[0] : 0;
        return;
    }

    const float inv_t = 1.0f / P.temperature, min_p = P.min_p;
    const bool top_k = P.top_k > 0 && P.top_k < V, top_p = P.top_p < 1.0f;
    uint32_t kth = 0;
    if (top_k) kth = select_key(l, V, [](int, uint32_t) { return 1.0f; }, (float)P.top_k, false, sh);
    auto w1 = [=](int i, uint32_t key) -> float {
        if (key < kth) return 0.0f;
        const float e = __expf((l[i] - mx) * inv_t);
        return e >= min_p ? e : 0.0f;
    };
    uint32_t pth = 0;
    if (top_p) pth = select_key(l, V, w1, P.top_p * total_weight(l, V, w1, sh), false, sh);
    auto w2 = [=](int i, uint32_t key) -> float { return key < pth ? 0.0f : w1(i, key); };
    const float r = P.u * total_weight(l, V, w2, sh);

    if (tid == 0) sh.idx = INT_MAX;
    __syncthreads();
    if (top_k || top_p) {
        const uint32_t v = select_key(l, V, w2, r, true, sh);
        for (int i = tid; i < V; i += blockDim.x) {
            const uint32_t key = okey(l[i]);
            if (key == v && w2(i, key) > 0.0f) atomicMin(&sh.idx, i);
        }
        __syncthreads();
        if (tid == 0) out[blockIdx.x] = sh.idx != INT_MAX ? sh.idx : wbi[0];
        return;
    }

    /* index order: thread t owns [t * C, (t + 1) * C); prefix sums over threads find the one whose
     * range holds r, which then walks its elements */
    const int C = (V + blockDim.x - 1) / blockDim.x, b = tid * C, e = min(V, b + C);
    float mine = 0.0f;
    int last_kept = -1;
    for (int i = b; i < e; i++) {
        const float w = w2(i, okey(l[i]));
        mine += w;
        if (w > 0.0f) last_kept = i;
    }
    float inc = mine;
    for (int o = 1; o < 32; o <<= 1) {
        const float n = __shfl_up_sync(0xffffffffu, inc, o);
        if (lane >= o) inc += n;
    }
    if (lane == 31) sh.red[warp] = inc;
    __shared__ int last_any;
    if (tid == 0) last_any = -1;
    __syncthreads();
    if (warp == 0) {
        float t = lane < (int)(blockDim.x >> 5) ? sh.red[lane] : 0.0f, ti = t;
        for (int o = 1; o < 32; o <<= 1) {
            const float n = __shfl_up_sync(0xffffffffu, ti, o);
            if (lane >= o) ti += n;
        }
        sh.red[lane] = ti - t; /* exclusive prefix of warp totals */
    }
    if (last_kept >= 0) atomicMax(&last_any, last_kept);
    __syncthreads();
    const float exc = sh.red[warp] + inc - mine;
    if (mine > 0.0f && exc + mine > r) atomicMin(&sh.idx, tid);
    __syncthreads();
    if (sh.idx != INT_MAX && tid == sh.idx) {
        float c = exc;
        int pick = last_kept;
        for (int i = b; i < e; i++) {
            const float w = w2(i, okey(l[i]));
            c += w;
            if (w > 0.0f && c > r) {
                pick = i;
                break;
            }
        }
        out[blockIdx.x] = pick;
    } else if (tid == 0 && sh.idx == INT_MAX) {
        out[blockIdx.x] = last_any >= 0 ? last_any : wbi[0];
    }
}

} // namespace

cudaError_t cu_sample(cudaStream_t st, const float *logits, int rows, int vocab, const CuSampleRow *params,
                      CuArgmax *part, int32_t *out_ids) {
    if (rows <= 0) return cudaSuccess;
    cudaError_t rc = cu_launch(st, dim3(kArgmaxSplits, rows), dim3(kArgmaxThreads), 0, row_argmax_kernel, logits,
                               vocab, part);
    if (rc != cudaSuccess) return rc;
    return cu_launch(st, dim3(rows), dim3(kThreads), 0, sample_kernel, logits, vocab, params,
                     static_cast<const CuArgmax *>(part), out_ids);
}
