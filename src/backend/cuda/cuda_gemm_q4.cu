/* cuda_gemm_q4.cu — int4 x bf16 matrix products on the tensor cores, for the token counts above
 * the decode GEMV (M = 1..3): batched decode, chunked prefill and, on Hopper, prefills of any
 * size (elsewhere those above 256 tokens dequantize to bf16 for cuBLAS). The weights are read once,
 * as the checkpoint's int4 codes, and dequantized in registers right before the multiply, so
 * memory traffic stays at 0.5 byte per weight plus scales; dequantizing to a bf16 scratch for
 * cuBLAS costs ~4.5.
 *
 * Two kernels share the dequantization and the epilogue: mma.sync (any sm_80+ GPU; not used on
 * Hopper), loading through cp.async, and further down wgmma (sm_90a, from 4 tokens), loading
 * through the TMA engine. See kWgMinM for the measurements that split them.
 *
 * Products. mma.sync m16n8k16 (bf16 in, f32 accumulate) in the "swapped" orientation: the 16-row
 * A operand is 16 weight rows (output features) x 16 columns of k, which is the weights' own
 * row-major layout, and the 8-column B operand is 8 tokens of x. Each output tile is thus
 * features x tokens; it is written to y transposed, through shared memory.
 *
 * Codes. The GPU holds them in fragment order (cuda_common.cuh): word t of a row's 32-column chunk
 * is exactly what lane t (= lane % 4) of an A fragment needs for the chunk's two k-steps, columns
 * 2t + 8j and 2t + 8j + 1 in register j (j = 0 .. 3: k-step j / 2, low or high 8 columns), so a
 * lane loads one word per row and chunk and the products run in true k order. The B registers
 * (x[token][the same column pairs]) come from one ldmatrix per 8 tokens and 32 columns.
 *
 * Dequantization, per register: one shift and one mask-and-or put the nibbles q of a column pair
 * under the bf16 exponent of 128 (bits 0x4300 | q in each half, the value 128 + q); one bf16x2 FMA
 * subtracts 136 (exact: q - 8) and a second applies scale and zero, (q - 8) * s + z rounded once to
 * bf16, the value the dequant + cuBLAS path computes. 15 instructions per 8 weights.
 *
 * Tiles. A block (8 warps) owns 128 features x BT tokens (BT = 16, 32 or 128, chosen by M);
 * its warps are laid out as features x tokens x two halves of every k-stage, the halves summed at
 * the end. Small BT (16, 32: memory bound) stages 256 columns of k at a time, so each weight row
 * contributes a whole 128-byte line per stage, and gives each warp 32 features x BT tokens; large
 * BT (128: compute bound) stages 128 columns, which keeps the x tile small, and gives each warp
 * 64 features x 64 tokens (each pair of code words a lane dequantizes feeds 16 mma, so
 * dequantization costs a fraction of the tensor-core time).
 *
 * Pipeline. Two or three stages (Tile::kStages) of cp.async (global -> shared): the codes
 * (16-byte copies), their scale words (4-byte copies) and the x tile (16-byte copies), with rows
 * past n, tokens past M and columns past k zero-filled (zero x keeps the k tail exact; any k that
 * is a multiple of 32 works). Shared-memory layouts are XOR-swizzled so both the copies and the
 * fragment loads are free of bank conflicts. Under programmatic dependent launch the first
 * stages' weights are requested before pdl_wait(), x only after it.
 *
 * Split-K. When the output tiles are too few to fill the machine (a small M, or a narrow matrix),
 * k is split over the S blocks (S = 2, 4 or 8) of a thread-block cluster (sm_90): each block
 * leaves its partial tile in its shared memory, and after a cluster barrier each block sums an
 * S-th of the tile over all S blocks (distributed shared memory, in a fixed order, so results do
 * not depend on timing) and writes it to y. No global workspace, no atomics, no second launch.
 * Code built for an older target runs every matrix unsplit.
 *
 * SwiGLU pairs (cu_gemm_q4_swiglu, the MLP's gate|up). A block's 128 tile rows are 64 gate rows
 * and the same 64 up rows, so its epilogue holds both halves of each SwiGLU and writes the bf16
 * h that the down projection reads: the [M][2I] float product and the separate SwiGLU pass
 * (~6 MB each way per layer at 64 tokens) are gone. Serving int4 on an H100 at concurrency 64:
 * 5028 -> 5105 tok/s, mean TPOT 10.39 -> 10.22 ms (same call). */
#include "backend/cuda/cuda_common.cuh"

#include <cudaTypedefs.h> /* cuTensorMapEncodeTiled's type (reached through the runtime) */
#include <string.h>

namespace {

constexpr int kThreads = 256;
constexpr int kFeatures = 128; /* output features (weight rows) per block */
constexpr int kTileLd = kFeatures + 4; /* row stride (floats) of the output tile in shared memory */

/* The block shape for BT tokens. */
template <int BT>
struct Tile {
    static constexpr int kK = BT <= 32 ? 256 : 128;         /* columns of k per stage */
    static constexpr int kChunks = kK / 32;                 /* 16-byte chunks of codes per row and stage */
    static constexpr int kWarpF = BT <= 32 ? 32 : 64;       /* features per warp */
    static constexpr int kWarpT = BT <= 32 ? BT : BT / 2;   /* tokens per warp */
    static constexpr int kWarpsF = kFeatures / kWarpF;
    static constexpr int kWarpsT = BT / kWarpT;
    static constexpr int kWarpsK = kThreads / 32 / (kWarpsF * kWarpsT); /* warps sharing a stage's k */
    static constexpr int kWarpChunks = kChunks / kWarpsK;  /* chunks of a stage per warp */
    static constexpr int kMT = kWarpF / 16, kNT = kWarpT / 8; /* mma tiles per warp */
    static constexpr int kMinBlocks = BT >= 64 ? 1 : 2;
    /* cp.async stages: two for the small tiles, measured faster than three (H100, one Qwen3-8B
     * step's matmuls at M = 16: 2.90 -> 2.87 ms, at M = 32 with 32-token tiles 4.09 -> 3.77;
     * 3 or 4 blocks per SM at 2 stages, which caps registers at 80 / 64: M = 16 4.24 / 5.19) */
    static constexpr int kStages = BT <= 32 ? 2 : 3;
    static_assert(kWarpsK == 2 && kChunks % kWarpsK == 0, "warp layout");
};

/* Shared-memory layout of one stage for BT tokens and groups of 32 << GS columns: codes
 * [128 rows][kChunks x 16 bytes], x [BT][kK] bf16, then the scale words [128 rows][kScaleStride]
 * (kScaleWords used per row; the stride is odd so that 8 consecutive rows use 8 banks). */
template <int BT, int GS>
struct Stage {
    static constexpr int kScaleWords = (Tile<BT>::kChunks >> GS) > 0 ? Tile<BT>::kChunks >> GS : 1;
    static constexpr int kScaleStride = kScaleWords | 1;
    static constexpr size_t kCodes = (size_t)kFeatures * Tile<BT>::kChunks * 16;
    static constexpr size_t kX = (size_t)BT * Tile<BT>::kK * 2;
    static constexpr size_t kBytes = kCodes + kX + (size_t)kFeatures * kScaleStride * 4;
    static constexpr size_t kSmem = Tile<BT>::kStages * kBytes;
    static_assert(kSmem >= (size_t)BT * kTileLd * 4, "the output tile reuses the stages");
};

struct GemmArgs {
    const uint4 *codes;  /* [n][k / 32] chunks of 32 columns */
    const uint32_t *sz;  /* [n][cu_sz_ld(k, group)] scale | zero << 16 */
    const uint4 *x;      /* bf16 [M][k], 8 columns per unit */
    float *y;            /* column n0 of row 0 */
    int M, n, k, ldy;
    bool accumulate;     /* y += instead of y = */
    /* SwiGLU pairs (pair > 0): rows [0, pair) are gate and [pair, 2 pair) up; the block of
     * feature tile z multiplies gate rows 64 z .. 64 z + 63 and the same up rows, and writes
     * h[m][j] = silu(gate) * up (bf16, row stride pair) instead of y */
    int pair;
    __nv_bfloat16 *h;
};

/* The weight row behind row r (0 .. 127) of the block's tile starting at feature f0; ok says
 * whether it exists (when not, the row returned is a valid one, to be zero-filled). */
CU_DEV int weight_row(const GemmArgs &a, int f0, int r, bool &ok) {
    if (!a.pair) {
        ok = f0 + r < a.n;
        return ok ? f0 + r : 0;
    }
    const int j = f0 / 2 + (r & 63);
    ok = j < a.pair;
    return ok ? (r < 64 ? j : a.pair + j) : 0;
}

/* Slot of chunk c of row r in a stage of codes: rows of CH chunks, XORed so that the 8 rows g of
 * a fragment load (same chunk) and the 8 chunks of a copy phase land in distinct banks. */
template <int CH>
CU_DEV int code_slot(int r, int c) {
    return c ^ ((r / (8 / CH)) % CH);
}

/* Slot of 16-byte unit u of token row tk in a stage of x: XORed with the token's low 3 bits, so
 * the 8 token rows that an ldmatrix phase reads (same unit) land in distinct banks. */
CU_DEV int x_slot(int tk, int u) { return u ^ (tk & 7); }

/* d = a * b + c on bf16 pairs, rounded once. */
CU_DEV uint32_t fma_bf16x2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

/* (a & b) | c in one instruction. */
CU_DEV uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

/* The 4 A registers of a word of codes in fragment order (register j: nibbles j and j + 4, a
 * column pair) as bf16 (q - 8) * scale + zero; sc, ze hold scale and zero in both halves. */
CU_DEV void dequant_word(uint32_t w, uint32_t sc, uint32_t ze, uint32_t (&out)[4]) {
    const uint32_t one = 0x3f803f80u, minus136 = 0xc308c308u;
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const uint32_t e = and_or(w >> (4 * j), 0x000f000fu, 0x43004300u); /* 128 + q in each half */
        out[j] = fma_bf16x2(fma_bf16x2(e, one, minus136), sc, ze);
    }
}

/* Requests the codes and scale words of stage kt (columns kt * kK ..) of rows f0 .. f0 + 127. */
template <int BT, int GS>
CU_DEV void load_weights(const GemmArgs &a, int f0, int kt, uint4 *codes, uint32_t *scales) {
    using T = Tile<BT>;
    constexpr int SW = Stage<BT, GS>::kScaleWords, SZS = Stage<BT, GS>::kScaleStride;
    const int row_chunks = a.k >> 5, groups = a.k >> (5 + GS), sz_ld = cu_sz_ld(a.k, 32 << GS);
#pragma unroll
    for (int it = 0; it < kFeatures * T::kChunks / kThreads; it++) {
        const int i = it * kThreads + threadIdx.x, r = i / T::kChunks, c = i % T::kChunks;
        const int col = kt * T::kChunks + c;
        bool ok;
        const int row = weight_row(a, f0, r, ok);
        ok = ok && col < row_chunks;
        cp_async16(codes + r * T::kChunks + code_slot<T::kChunks>(r, c),
                   ok ? a.codes + (size_t)row * row_chunks + col : a.codes, ok);
    }
    for (int i = threadIdx.x; i < kFeatures * SW; i += kThreads) {
        const int r = i / SW, gi = ((kt * T::kK) >> (5 + GS)) + i % SW;
        bool ok;
        const int row = weight_row(a, f0, r, ok);
        ok = ok && gi < groups;
        cp_async4(scales + r * SZS + i % SW, ok ? a.sz + (size_t)row * sz_ld + gi : a.sz, ok);
    }
}

/* Requests the x tile of stage kt: tokens t0 .. t0 + BT - 1. */
template <int BT>
CU_DEV void load_x(const GemmArgs &a, int t0, int kt, uint4 *xs) {
    constexpr int kUnits = Tile<BT>::kK / 8; /* 16-byte units per token row */
    const int row_units = a.k >> 3;
#pragma unroll
    for (int it = 0; it < BT * kUnits / kThreads; it++) {
        const int i = it * kThreads + threadIdx.x, tk = i / kUnits, u = i % kUnits;
        const int m = t0 + tk, col = kt * kUnits + u;
        const bool ok = m < a.M && col < row_units;
        cp_async16(xs + tk * kUnits + x_slot(tk, u), ok ? a.x + (size_t)m * row_units + col : a.x, ok);
    }
}

/* This warp's share of one stage: chunks wk * kWarpChunks .. of its features x tokens. */
template <int BT, int GS>
CU_DEV void mma_stage(const uint4 *codes, const uint4 *xs, const uint32_t *scales,
                      float (&acc)[Tile<BT>::kMT][Tile<BT>::kNT][4], int wf, int wt, int wk, int g, int t) {
    using T = Tile<BT>;
    constexpr int SZS = Stage<BT, GS>::kScaleStride;
    constexpr int kReload = (1 << GS) < T::kWarpChunks ? 1 << GS : T::kWarpChunks; /* chunks per scale */
    constexpr int kUnits = T::kK / 8;
    const int lane = threadIdx.x & 31;
    const uint32_t *words = reinterpret_cast<const uint32_t *>(codes);
    uint32_t sc[T::kMT][2], ze[T::kMT][2];
#pragma unroll
    for (int cc = 0; cc < T::kWarpChunks; cc++) {
        const int c = wk * T::kWarpChunks + cc;
        if (cc % kReload == 0) {
#pragma unroll
            for (int i = 0; i < T::kMT; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const uint32_t s = scales[(wf * T::kWarpF + 16 * i + 8 * h + g) * SZS + (c >> GS)];
                    sc[i][h] = __byte_perm(s, 0, 0x1010);
                    ze[i][h] = __byte_perm(s, 0, 0x3232);
                }
        }
        uint32_t b[T::kNT][4]; /* per 8 tokens: x at the A registers' column pairs (unit 4c + i, word t) */
#pragma unroll
        for (int j = 0; j < T::kNT; j++) {
            const int tk = wt * T::kWarpT + 8 * j + (lane & 7);
            ldmatrix_x4(b[j], xs + tk * kUnits + x_slot(tk, 4 * c + (lane >> 3)), false);
        }
#pragma unroll
        for (int i = 0; i < T::kMT; i++) {
            uint32_t q[2][4]; /* rows g and g + 8: pairs 0 .. 3 of this lane's word */
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int r = wf * T::kWarpF + 16 * i + 8 * h + g;
                dequant_word(words[(r * T::kChunks + code_slot<T::kChunks>(r, c)) * 4 + t], sc[i][h], ze[i][h], q[h]);
            }
#pragma unroll
            for (int s = 0; s < 2; s++)
#pragma unroll
                for (int j = 0; j < T::kNT; j++)
                    mma_bf16(acc[i][j], q[0][2 * s], q[1][2 * s], q[0][2 * s + 1], q[1][2 * s + 1], b[j][2 * s],
                             b[j][2 * s + 1]);
        }
    }
}

/* Barrier over the blocks of this cluster; shared-memory writes before it are visible to the
 * whole cluster after it. */
CU_DEV void cluster_barrier() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#endif
}

/* The float4 at p's shared-memory offset in block `rank` of this cluster. */
CU_DEV float4 cluster_load(const float *p, int rank) {
    float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    uint32_t remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;"
                 : "=r"(remote)
                 : "r"((uint32_t)__cvta_generic_to_shared(p)), "r"(rank));
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(remote)
                 : "memory");
#else
    (void)p, (void)rank;
    __trap(); /* split launches need sm_90 (the host never asks for one on older code) */
#endif
    return v;
}

/* y[m][f .. f + 3] as it is (what an accumulating store adds to); columns past n read as 0. */
CU_DEV float4 load_out(const GemmArgs &a, int m, int f) {
    const float *p = a.y + (size_t)m * a.ldy + f;
    if (f + 4 <= a.n && ((uintptr_t)p & 15) == 0) return *reinterpret_cast<const float4 *>(p);
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int e = 0; e < 4; e++)
        if (f + e < a.n) v[e] = p[e];
    return make_float4(v[0], v[1], v[2], v[3]);
}

/* y[m][f .. f + 3] = v, columns past n dropped. */
CU_DEV void write_out(const GemmArgs &a, int m, int f, float4 v) {
    float *p = a.y + (size_t)m * a.ldy + f;
    if (f + 4 <= a.n && ((uintptr_t)p & 15) == 0) {
        *reinterpret_cast<float4 *>(p) = v;
        return;
    }
    const float vals[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int e = 0; e < 4; e++)
        if (f + e < a.n) p[e] = vals[e];
}

/* y[m][f .. f + 3] (+)= v, columns past n dropped. */
CU_DEV void store_out(const GemmArgs &a, int m, int f, float4 v) {
    if (a.accumulate) {
        const float4 o = load_out(a, m, f);
        v.x += o.x, v.y += o.y, v.z += o.z, v.w += o.w;
    }
    write_out(a, m, f, v);
}

/* The float4 at tile offset p summed over the cluster's blocks (splits > 1) or this block's. */
CU_DEV float4 tile_sum(const float *p, int splits) {
    if (splits == 1) return *reinterpret_cast<const float4 *>(p);
    float4 v = cluster_load(p, 0);
    for (int r = 1; r < splits; r++) {
        const float4 o = cluster_load(p, r);
        v.x += o.x, v.y += o.y, v.z += o.z, v.w += o.w;
    }
    return v;
}

/* h[m][j .. j + 3] = silu(g) * u as bf16, columns past a.pair dropped. */
CU_DEV void store_swiglu(const GemmArgs &a, int m, int j, float4 g, float4 u) {
    const float gv[4] = {g.x, g.y, g.z, g.w}, uv[4] = {u.x, u.y, u.z, u.w};
    __nv_bfloat16 hv[4];
#pragma unroll
    for (int e = 0; e < 4; e++) hv[e] = __float2bfloat16_rn(silu_mul(gv[e], uv[e]));
    __nv_bfloat16 *p = a.h + (size_t)m * a.pair + j;
    if (j + 4 <= a.pair && ((uintptr_t)p & 7) == 0) {
        *reinterpret_cast<uint2 *>(p) = *reinterpret_cast<const uint2 *>(hv);
        return;
    }
    for (int e = 0; e < 4; e++)
        if (j + e < a.pair) p[e] = hv[e];
}

/* y (or h, for SwiGLU pairs) from a block's finished tile [BT tokens][F features] (row stride
 * ld floats) in shared memory, in float4 units; under a split of k each block of the cluster
 * sums an S-th of the tile over all blocks and writes it. Call with every thread of the block. */
template <int F, int BT>
CU_DEV void store_tile(const GemmArgs &a, const float *tile, int ld, int f0, int t0, int split, int splits) {
    constexpr int kQuads = F / 4;
    const int quads = a.pair ? kQuads / 2 : kQuads, units = BT * quads; /* pairs: gate quads */
    const int u0 = split * units / splits, u1 = (split + 1) * units / splits;
    if (splits > 1) cluster_barrier();
    if constexpr (BT >= 128) {
        if (a.accumulate) {
            /* y += the sums, 8 units per thread at a time, all of their old values read before
             * any is written: the compiler must assume a store may alias a later load, so unit by
             * unit each load waited for its own round trip (32 in a row for a 256-token tile).
             * Only the one-block-per-SM tiles: the batch's registers took the small tiles to 128
             * (from 68-95), 32-token tiles from three blocks per multiprocessor to two. */
            constexpr int kBatch = 8;
            for (int u = u0 + threadIdx.x; u < u1; u += kBatch * kThreads) {
                float4 v[kBatch], old[kBatch];
#pragma unroll
                for (int b = 0; b < kBatch; b++) {
                    const int ub = u + b * kThreads, tk = ub / quads, f = f0 + 4 * (ub % quads);
                    if (ub >= u1 || t0 + tk >= a.M || f >= a.n) continue;
                    v[b] = tile_sum(tile + tk * ld + 4 * (ub % quads), splits);
                    old[b] = load_out(a, t0 + tk, f);
                }
#pragma unroll
                for (int b = 0; b < kBatch; b++) {
                    const int ub = u + b * kThreads, tk = ub / quads, f = f0 + 4 * (ub % quads);
                    if (ub >= u1 || t0 + tk >= a.M || f >= a.n) continue;
                    write_out(a, t0 + tk, f,
                              make_float4(v[b].x + old[b].x, v[b].y + old[b].y, v[b].z + old[b].z, v[b].w + old[b].w));
                }
            }
            if (splits > 1) cluster_barrier();
            return;
        }
    }
    for (int u = u0 + threadIdx.x; u < u1; u += kThreads) {
        const int tk = u / quads, fq = u % quads, m = t0 + tk;
        const float *p = tile + tk * ld + 4 * fq;
        if (a.pair) {
            const int j = f0 / 2 + 4 * fq;
            if (m < a.M && j < a.pair) store_swiglu(a, m, j, tile_sum(p, splits), tile_sum(p + F / 2, splits));
        } else {
            const int f = f0 + 4 * fq;
            if (m < a.M && f < a.n) store_out(a, m, f, tile_sum(p, splits));
        }
    }
    if (splits > 1) cluster_barrier(); /* the tile stays readable until every block is done */
}

/* Grid: x = split of k (the cluster), y = token tile, z = feature tile. */
template <int BT, int GS>
__global__ void __launch_bounds__(kThreads, Tile<BT>::kMinBlocks) gemm_q4(GemmArgs a) {
    using T = Tile<BT>;
    using L = Stage<BT, GS>;
    extern __shared__ uint4 smem[];
    pdl_trigger();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int wf = warp % T::kWarpsF, wt = warp / T::kWarpsF % T::kWarpsT, wk = warp / (T::kWarpsF * T::kWarpsT);
    const int f0 = blockIdx.z * kFeatures, t0 = blockIdx.y * BT;
    const int splits = gridDim.x, split = blockIdx.x;
    const int k_tiles = (a.k + T::kK - 1) / T::kK;
    const int kt0 = split * k_tiles / splits, n_kt = (split + 1) * k_tiles / splits - kt0;
    char *base = reinterpret_cast<char *>(smem);
    auto codes_of = [&](int s) { return reinterpret_cast<uint4 *>(base + s * L::kBytes); };
    auto x_of = [&](int s) { return reinterpret_cast<uint4 *>(base + s * L::kBytes + L::kCodes); };
    auto scales_of = [&](int s) { return reinterpret_cast<uint32_t *>(base + s * L::kBytes + L::kCodes + L::kX); };

    /* weights of the first stages before the predecessor is done; x after; one group per stage */
#pragma unroll
    for (int s = 0; s < T::kStages - 1; s++)
        if (s < n_kt) load_weights<BT, GS>(a, f0, kt0 + s, codes_of(s), scales_of(s));
    pdl_wait();
#pragma unroll
    for (int s = 0; s < T::kStages - 1; s++) {
        if (s < n_kt) load_x<BT>(a, t0, kt0 + s, x_of(s));
        cp_async_commit();
    }

    float acc[T::kMT][T::kNT][4];
#pragma unroll
    for (int i = 0; i < T::kMT; i++)
#pragma unroll
        for (int j = 0; j < T::kNT; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0.0f;

    for (int it = 0; it < n_kt; it++) {
        cp_async_wait<T::kStages - 2>(); /* stage it has landed (for this thread) ... */
        __syncthreads();                 /* ... for all, and stage it - 1 is no longer read */
        const int next = it + T::kStages - 1, ns = next % T::kStages;
        if (next < n_kt) {
            load_weights<BT, GS>(a, f0, kt0 + next, codes_of(ns), scales_of(ns));
            load_x<BT>(a, t0, kt0 + next, x_of(ns));
        }
        cp_async_commit();
        const int s = it % T::kStages;
        mma_stage<BT, GS>(codes_of(s), x_of(s), scales_of(s), acc, wf, wt, wk, g, t);
    }
    cp_async_wait<0>();
    __syncthreads();

    /* the k halves of the warps summed into tile [token][feature] (over the stages' memory) */
    float *tile = reinterpret_cast<float *>(smem);
#pragma unroll
    for (int q = 0; q < T::kWarpsK; q++) {
        if (wk == q) {
#pragma unroll
            for (int i = 0; i < T::kMT; i++)
#pragma unroll
                for (int j = 0; j < T::kNT; j++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int f = wf * T::kWarpF + 16 * i + g + 8 * (e >> 1);
                        const int tk = wt * T::kWarpT + 8 * j + 2 * t + (e & 1);
                        float *p = tile + tk * kTileLd + f;
                        *p = q ? *p + acc[i][j][e] : acc[i][j][e];
                    }
        }
        __syncthreads();
    }

    store_tile<kFeatures, BT>(a, tile, kTileLd, f0, t0, split, splits);
}

/* ---- Hopper: the same product on wgmma (sm_90a), fed by the TMA engine ----------------------
 *
 * On Hopper the products run as warpgroup MMAs (wgmma.mma_async m64nNk16, N = BT tokens):
 * one instruction multiplies 64 weight rows by 16 columns of k for all BT tokens, so the
 * dequantized weights (the register A operand, the mma.sync A fragment layout per warp) feed
 * BT / 8 times more products per instruction than mma.sync's, and the tensor cores run while the
 * warp dequantizes the next chunk. The tokens (B) are read by the tensor cores straight from
 * shared memory, which holds each stage's x tile in wgmma's K-major layout with the 128-byte
 * swizzle: per 64 columns of k ("atom"), token rows of 128 bytes, 16-byte unit u of row r at
 * u ^ (r % 8), 8-row groups 1024 bytes apart.
 *
 * B comes from shared memory in the hardware's k order, so A must hold true k order too, which is
 * what the codes' fragment order gives: lane t loads word t of a row's chunk and dequantizes it
 * as the mma.sync kernel does.
 *
 * Loads. One thread asks the TMA engine for each stage: the codes of the block's 128 rows (64
 * bytes each, stored with the 64-byte swizzle, which is code_slot's layout), their scale words
 * (the 16 bytes of each row that hold the stage's groups: a box starts on 16 bytes, and scale
 * rows are padded to 16 bytes for this, cu_sz_ld) and the x tile (two 64-column atoms in the
 * 128-byte swizzle). Rows and columns past the matrix are zero-filled by the engine. Each stage
 * buffer has an mbarrier that counts the bytes in; every thread waits on it. Weights and x have
 * separate rings: weights come from HBM and are requested kWAhead stages ahead (that depth is
 * what keeps enough bytes in flight: with both in one cp.async ring, one stage ahead, a
 * loads-only variant of the kernel streamed gate_up's weights at 1.26 TB/s on an H100), x comes
 * from L2 and goes kXAhead ahead. A block barrier per stage keeps reuse safe: a weight buffer is
 * refilled one stage after it was read (its readers are plain loads), an x buffer two stages
 * after (its readers are wgmmas, and each warpgroup waits for all but its latest wgmma group
 * after every group).
 *
 * Block: 2 warpgroups x 64 features x BT tokens, all of k per stage for every warp (each
 * dequantized A fragment feeds BT / 8 x 2 k-steps of products); stages of 128 columns. 128
 * features, not more: x is read from L2 once per feature tile, but with 256 features too few
 * blocks fill the machine at the token counts of batched decode (fourth session). Split-K over
 * thread-block clusters and the epilogue are the mma.sync kernel's. */
constexpr int kWgK = 128; /* columns of k per stage */
constexpr int kWgChunks = kWgK / 32;
constexpr int kGroupChunks = 2; /* chunks dequantized together (independent chains) per wgmma group;
                                   measured best of 1, 2 and 4 */
constexpr int kBoxRows = 64;    /* rows per TMA box of codes and scales (a SwiGLU block's halves) */
constexpr size_t kSmemPerBlock[2] = {227 * 1024, 113 * 1024}; /* sm_90, 1 or 2 blocks per SM */
/* Token tiles per group of the tile order (block_tile). In the plain order (token tiles fastest)
 * a wave of 132 one-per-SM blocks at 8192 tokens covers ~4 feature tiles x all 32 token tiles and
 * streams all of x (64 MB for k = 4096, more than L2) again every wave: ~3 GB per gate_up launch.
 * Groups of 4 token tiles (x 8-24 MB) make a wave 4 token tiles x ~33 feature tiles. H200, the
 * step's linears as the model runs them at 4096 / 8192 tokens, ms: plain order 90.3 / 186.6,
 * groups of 4 87.1 / 173.5, 8 87.6 / 173.5, 16 90.3 / 179.6 (gate_up per launch at 8192: 3104 ->
 * 2824 us); 1024 and 2048 tokens the same within 0.5% (at most 8 token tiles). */
constexpr int kTileGroup = 4;

/* The token and feature tile of this block (grid y x z tiles). Blocks start in launch order, y
 * before z, so a wave of co-resident blocks takes kTileGroup token tiles across as many feature
 * tiles as it holds, and the next wave the next feature tiles of the same token tiles (the last
 * group may hold fewer token tiles). */
CU_DEV void block_tile(int &token_tile, int &feature_tile) {
    const int tiles_y = (int)gridDim.y, per_group = kTileGroup * (int)gridDim.z;
    const int i = (int)(blockIdx.y + gridDim.y * blockIdx.z), first = i / per_group * kTileGroup;
    const int size = min(tiles_y - first, kTileGroup), j = i % per_group;
    token_tile = first + j % size;
    feature_tile = j / size;
}

template <int BT, int GS>
struct WgTile {
    static constexpr int kMinBlocks = BT <= 64 ? 2 : 1;
    static constexpr size_t kX = (size_t)BT * kWgK * 2;                 /* an x stage (1024-byte multiple) */
    static constexpr size_t kCodes = (size_t)kFeatures * kWgChunks * 16; /* a weight stage: codes, */
    static constexpr size_t kW = kCodes + (size_t)kFeatures * 16;       /* then 4 scale words per row */
    /* ring sizes (buffers), measured (H100, one Qwen3-8B step's matmuls, ms; x / weight buffers):
     * 32-token tiles 4 / 7, 6 / 4, 4 / 3: M = 32 3.65, 3.54, 3.48; 64: 3 / 6, 4 / 4, 5 / 2: M = 64
     * 4.47, 4.32, 4.28 (M = 48 4.30, 4.14, 4.16); 128: 4 / 8, 5 / 4, 3 / 10: M = 128 5.97, 5.90,
     * 6.07; 256-token tiles fit 3 / 3; 16-token tiles take 32's x ring and one more weight buffer
     * (not compared) */
    static constexpr int kXSlots = BT <= 32 ? 4 : BT == 64 ? 4 : BT == 128 ? 5 : 3;
    static constexpr int kWSlots = BT == 16 ? 4 : BT == 32 ? 3 : BT == 64 ? 4 : BT == 128 ? 4 : 3;
    static constexpr int kXAhead = kXSlots - 2, kWAhead = kWSlots - 1;
    static constexpr size_t kRings = kXSlots * kX + kWSlots * kW;
    static constexpr size_t kSmem = kRings + 8 * (kXSlots + kWSlots) + 1024; /* + mbarriers, alignment */
    static_assert(kXAhead >= 1 && kWAhead >= 1, "stage buffers");
    static_assert(kSmem + 1024 <= kSmemPerBlock[kMinBlocks - 1], "shared memory");
    static_assert(kRings >= (size_t)BT * kTileLd * 4, "the output tile reuses the rings");
};

/* The TMA descriptors of one product: codes [n][k / 2] bytes in boxes of 64 bytes x kBoxRows rows
 * (64-byte swizzle), scale words [n][cu_sz_ld] in boxes of 4 x kBoxRows, x [M][k] bf16 in boxes of
 * 64 columns x BT tokens (128-byte swizzle). Passed by value (__grid_constant__). */
struct WgMaps {
    CUtensorMap codes, sz, x;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define QUILL_WGMMA 1
CU_DEV void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
CU_DEV void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
CU_DEV void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory");
}
/* Keeps the compiler from moving other instructions' uses of r across this point (the
 * accumulators belong to the tensor cores while a wgmma is in flight). */
CU_DEV void fence_operand(float &r) { asm volatile("" : "+f"(r)::"memory"); }
/* An mbarrier at shared address bar expecting `count` arrivals per phase. */
CU_DEV void mbar_init(uint32_t bar, int count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
/* Makes this thread's mbarrier initializations visible to the TMA engine's arrivals. */
CU_DEV void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
/* This thread's arrival on bar, announcing `bytes` of TMA copies that will complete on it. */
CU_DEV void mbar_arrive_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
/* True in one lane of the (converged) warp: elect.sync, so the compiler knows the lane's
 * operands are the warp's and issues the copies from uniform registers. */
CU_DEV bool elect_one() {
    uint32_t pred;
    asm volatile("{\n.reg .pred p;\nelect.sync _|p, 0xffffffff;\nselp.u32 %0, 1, 0, p;\n}" : "=r"(pred));
    return pred != 0;
}
/* Waits until bar has completed the phase of the given parity. */
CU_DEV void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done = 0;
    while (!done)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}"
                     : "=r"(done)
                     : "r"(bar), "r"(parity)
                     : "memory");
}
/* TMA: the box at coordinates (c0, c1) of the 2-D tensor map into shared memory at dst, its bytes
 * counted on bar. */
CU_DEV void tma_load_2d(uint32_t dst, const CUtensorMap *map, int c0, int c1, uint32_t bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
                 ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
                 : "memory");
}

/* d = A B (+ d when acc) for 64 rows x N tokens x 16 columns (N = 2 x the size of d): A the warp's
 * 4 registers (mma.sync layout, rows 16 * (warp % 4) ..), B at shared-memory descriptor b. */
CU_DEV void wgmma_rs(float (&d)[8], const uint32_t (&a)[4], uint64_t b, bool acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7}, "
                 "{%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"((int)acc));
}

CU_DEV void wgmma_rs(float (&d)[16], const uint32_t (&a)[4], uint64_t b, bool acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "
                 "{%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"((int)acc));
}

CU_DEV void wgmma_rs(float (&d)[32], const uint32_t (&a)[4], uint64_t b, bool acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
                 "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"((int)acc));
}

CU_DEV void wgmma_rs(float (&d)[64], const uint32_t (&a)[4], uint64_t b, bool acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
                 "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"((int)acc));
}

/* m64n256k16: 128 accumulators per thread. */
CU_DEV void wgmma_rs(float (&d)[128], const uint32_t (&a)[4], uint64_t b, bool acc) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
                 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
                 "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, "
                 "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, "
                 "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, "
                 "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, "
                 "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
                   "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
                   "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
                   "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
                   "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),
                   "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),
                   "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),
                   "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
                   "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),
                   "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),
                   "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]),
                   "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]),
                   "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"((int)acc));
}

#else
#define QUILL_WGMMA 0
CU_DEV void fence_operand(float &) {}
CU_DEV void wgmma_fence() {}
CU_DEV void wgmma_commit() {}
template <int N>
CU_DEV void wgmma_wait() {}
CU_DEV void mbar_init(uint32_t, int) {}
CU_DEV void mbar_init_fence() {}
CU_DEV void mbar_arrive_tx(uint32_t, uint32_t) {}
CU_DEV bool elect_one() { return (threadIdx.x & 31) == 0; }
CU_DEV void mbar_wait(uint32_t, uint32_t) {}
CU_DEV void tma_load_2d(uint32_t, const CUtensorMap *, int, int, uint32_t) { __trap(); }
template <int R>
CU_DEV void wgmma_rs(float (&)[R], const uint32_t (&)[4], uint64_t, bool) {
    __trap(); /* the host launches the wgmma kernel only where wg_built says it exists */
}
#endif

/* 1 where this module's device code has the wgmma kernel (built for sm_90a); read by the host. */
__device__ int wg_built = QUILL_WGMMA;

/* Makes v opaque to the compiler, so that it keeps v in a register rather than recomputing it
 * where it is used (a shared-memory address recomputed in every stage costs a slow special
 * register read, SR_CgaCtaId, in a cluster launch). */
CU_DEV void keep_in_register(uint32_t &v) { asm volatile("" : "+r"(v)); }

template <int N>
CU_DEV void fence_acc(float (&acc)[N]) {
#pragma unroll
    for (int e = 0; e < N; e++) fence_operand(acc[e]);
}

/* Descriptor of a K-major, 128-byte-swizzled B operand at shared address addr (8-row groups
 * 1024 bytes apart; the leading offset is unused in this layout). The address sits in the low 14
 * bits as addr / 16, so the descriptor of addr + d (d a multiple of 16, the sum still in shared
 * memory) is this one plus d / 16: one add per wgmma instead of the whole encoding. */
CU_DEV uint64_t wg_desc(uint32_t addr) {
    return (uint64_t)((addr & 0x3ffff) >> 4) | (uint64_t)1 << 16 | (uint64_t)(1024 >> 4) << 32 | (uint64_t)1 << 62;
}

/* Grid: x = split of k (the cluster), y x z = token x feature tiles, in the order of block_tile. */
template <int BT, int GS>
__global__ void __launch_bounds__(kThreads, WgTile<BT, GS>::kMinBlocks)
    gemm_q4_wg(GemmArgs a, const __grid_constant__ WgMaps maps) {
    using T = WgTile<BT, GS>;
    extern __shared__ uint4 smem_raw[];
    pdl_trigger();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int wg = warp >> 2, wq = warp & 3;
    int token_tile, feature_tile;
    block_tile(token_tile, feature_tile);
    const int f0 = feature_tile * kFeatures, t0 = token_tile * BT;
    const int splits = gridDim.x, split = blockIdx.x;
    const int k_tiles = (a.k + kWgK - 1) / kWgK;
    const int kt0 = split * k_tiles / splits, n_kt = (split + 1) * k_tiles / splits - kt0;
    /* x ring, weight ring, mbarriers; the swizzle atoms need 1024-byte alignment */
    const uint32_t raw = (uint32_t)__cvta_generic_to_shared(smem_raw);
    uint32_t xs = (raw + 1023) & ~1023u;
    char *base = reinterpret_cast<char *>(smem_raw) + (xs - raw);
    keep_in_register(xs);
    const uint32_t ws = xs + (uint32_t)(T::kXSlots * T::kX), bars = xs + (uint32_t)T::kRings;
    auto x_bar = [&](int s) { return bars + 8u * (uint32_t)s; };
    auto w_bar = [&](int s) { return bars + 8u * (uint32_t)(T::kXSlots + s); };
    /* the rows of the block's two 64-row boxes: SwiGLU blocks take 64 gate rows and the same up rows */
    const int row0 = a.pair ? f0 / 2 : f0, row1 = a.pair ? a.pair + f0 / 2 : f0 + kBoxRows;
    auto load_w = [&](int j) { /* stage j of this block's k range */
        const int s = j % T::kWSlots, kt = kt0 + j;
        const uint32_t dst = ws + (uint32_t)(s * T::kW), gi = (uint32_t)(kt * kWgChunks) >> GS & ~3u;
        mbar_arrive_tx(w_bar(s), (uint32_t)T::kW);
        tma_load_2d(dst, &maps.codes, kt * kWgChunks * 16, row0, w_bar(s));
        tma_load_2d(dst + kBoxRows * 64, &maps.codes, kt * kWgChunks * 16, row1, w_bar(s));
        tma_load_2d(dst + T::kCodes, &maps.sz, gi, row0, w_bar(s));
        tma_load_2d(dst + T::kCodes + kBoxRows * 16, &maps.sz, gi, row1, w_bar(s));
    };
    auto load_x = [&](int j) {
        const int s = j % T::kXSlots, kt = kt0 + j;
        const uint32_t dst = xs + (uint32_t)(s * T::kX);
        mbar_arrive_tx(x_bar(s), (uint32_t)T::kX);
        for (int atom = 0; atom < kWgK / 64; atom++)
            tma_load_2d(dst + atom * BT * 128, &maps.x, kt * kWgK + atom * 64, t0, x_bar(s));
    };
    /* One thread of warp 0 requests every copy, elected where it issues them (warp == 0 &&
     * elect_one(), not a flag computed once): elect.sync in the same branch is what lets the
     * compiler issue the copies from uniform registers; with a flag (or threadIdx.x == 0) it wraps
     * each in a loop over the threads that might hold other operands (63 instructions per stage
     * instead of 89 at 32-token tiles). */
    if (threadIdx.x == 0) {
        for (int s = 0; s < T::kXSlots + T::kWSlots; s++) mbar_init(bars + 8u * (uint32_t)s, 1);
        mbar_init_fence();
    }
    __syncthreads();
    /* weights of the first stages before the predecessor is done, x after */
    if (warp == 0 && elect_one())
        for (int j = 0; j < T::kWAhead && j < n_kt; j++) load_w(j);
    pdl_wait();
    if (warp == 0 && elect_one())
        for (int j = 0; j < T::kXAhead && j < n_kt; j++) load_x(j);

    float acc[BT / 2]; /* set by the first k-step (which does not accumulate) */
    const int r_lo = 64 * wg + 16 * wq + g; /* this lane's rows: r_lo and r_lo + 8 */
    constexpr int kReload = (1 << GS) < kWgChunks ? 1 << GS : kWgChunks; /* chunks per scale word */
    for (int it = 0; it < n_kt; it++) {
        __syncthreads(); /* stage it - 1's weights and stage it - 2's x are no longer read */
        if (warp == 0 && elect_one()) {
            if (it + T::kWAhead < n_kt) load_w(it + T::kWAhead);
            if (it + T::kXAhead < n_kt) load_x(it + T::kXAhead);
        }
        const int sw = it % T::kWSlots, sx = it % T::kXSlots;
        mbar_wait(w_bar(sw), (uint32_t)(it / T::kWSlots) & 1);
        mbar_wait(x_bar(sx), (uint32_t)(it / T::kXSlots) & 1);
        __syncwarp(); /* the wgmmas below need the whole warp, which the waits may have split */
        const uint32_t *words = reinterpret_cast<const uint32_t *>(base + T::kXSlots * T::kX + sw * T::kW);
        const uint32_t *scales = words + kFeatures * kWgChunks * 4;
        const uint64_t xdesc = wg_desc(xs + (uint32_t)(sx * T::kX)); /* the stage's x; offsets added below */
        const int g0 = ((kt0 + it) * kWgChunks >> GS) & 3; /* the stage's first group in its scale box */
        uint32_t sc[2], ze[2];
#pragma unroll
        for (int c0 = 0; c0 < kWgChunks; c0 += kGroupChunks) {
            uint32_t af[kGroupChunks][2][4]; /* [chunk][k-step]: the A registers */
#pragma unroll
            for (int cc = 0; cc < kGroupChunks; cc++) {
                const int c = c0 + cc;
                if (c % kReload == 0) {
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const uint32_t w = scales[(r_lo + 8 * h) * 4 + g0 + (GS <= 2 ? c >> GS : 0)];
                        sc[h] = __byte_perm(w, 0, 0x1010);
                        ze[h] = __byte_perm(w, 0, 0x3232);
                    }
                }
                uint32_t q[2][4]; /* rows r_lo and r_lo + 8 */
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int r = r_lo + 8 * h;
                    dequant_word(words[(r * kWgChunks + code_slot<kWgChunks>(r, c)) * 4 + t], sc[h], ze[h], q[h]);
                }
#pragma unroll
                for (int ks = 0; ks < 2; ks++) {
                    af[cc][ks][0] = q[0][2 * ks], af[cc][ks][1] = q[1][2 * ks];
                    af[cc][ks][2] = q[0][2 * ks + 1], af[cc][ks][3] = q[1][2 * ks + 1];
                }
            }
            fence_acc(acc);
            wgmma_fence();
#pragma unroll
            for (int cc = 0; cc < kGroupChunks; cc++)
#pragma unroll
                for (int ks = 0; ks < 2; ks++) {
                    const int c = c0 + cc;
                    wgmma_rs(acc, af[cc][ks], xdesc + (((c >> 1) * (BT * 128) + (c & 1) * 64 + ks * 32) >> 4),
                             it > 0 || c > 0 || ks > 0);
                }
            wgmma_commit();
            fence_acc(acc);
            wgmma_wait<1>();
        }
    }
    wgmma_wait<0>();
    fence_acc(acc);
    __syncthreads();

    /* the accumulators into tile [token][feature] (over the rings), then y */
    float *tile = reinterpret_cast<float *>(base);
#pragma unroll
    for (int j = 0; j < BT / 8; j++)
#pragma unroll
        for (int e = 0; e < 4; e++) tile[(8 * j + 2 * t + (e & 1)) * kTileLd + r_lo + 8 * (e >> 1)] = acc[4 * j + e];
    __syncthreads();
    store_tile<kFeatures, BT>(a, tile, kTileLd, f0, t0, split, splits);
}

/* Co-resident blocks of kernel when launched in clusters of 1 .. kMaxSplit blocks (slots[s - 1]
 * for clusters of s; 0 where clusters are unavailable: a device or code older than sm_90). */
constexpr int kMaxSplit = 8;
void split_slots(const void *kernel, size_t smem, int sms, int (&slots)[kMaxSplit]) {
    int per_sm = 0;
    if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, smem) != cudaSuccess || per_sm < 1)
        per_sm = 1;
    slots[0] = per_sm * sms;
    int dev = 0, cluster_launch = 0;
    cudaFuncAttributes fa;
    const bool clusters = cudaGetDevice(&dev) == cudaSuccess &&
                          cudaDeviceGetAttribute(&cluster_launch, cudaDevAttrClusterLaunch, dev) == cudaSuccess &&
                          cluster_launch && cudaFuncGetAttributes(&fa, kernel) == cudaSuccess && fa.ptxVersion >= 90;
    for (int i = 1; i < kMaxSplit; i++) {
        slots[i] = 0;
        if (!clusters) continue;
        cudaLaunchAttribute attr;
        attr.id = cudaLaunchAttributeClusterDimension;
        attr.val.clusterDim.x = (unsigned)i + 1;
        attr.val.clusterDim.y = 1;
        attr.val.clusterDim.z = 1;
        cudaLaunchConfig_t cfg = {};
        cfg.gridDim = dim3((unsigned)i + 1);
        cfg.blockDim = dim3(kThreads);
        cfg.dynamicSmemBytes = smem;
        cfg.attrs = &attr;
        cfg.numAttrs = 1;
        int n = 0;
        if (cudaOccupancyMaxActiveClusters(&n, kernel, &cfg) == cudaSuccess) slots[i] = n * (i + 1);
    }
    cudaGetLastError(); /* a failed query is not sticky; clear it */
}

/* How a split of k is judged: by whole waves of the co-resident blocks (kernels that fit one block
 * per multiprocessor), by every multiprocessor busy, by every co-resident slot busy, or as the
 * largest split of 2, 3, 4 or 6 whose blocks all run at once (one wave); the fewest stages of k a
 * block of a split may get; the largest split; and how much better a larger split must fill the
 * machine to be taken (it costs a reduction; not used by OneWave). */
enum class Fill { WholeWaves, BusySms, AllSlots, OneWave };
struct SplitRule {
    Fill fill;
    int min_stages;
    int max_split;
    double min_gain;
};

/* Blocks per output tile (the split of k). Other than OneWave, splits are powers of two, and a
 * larger split must fill the machine better by rule.min_gain (10% unless said below), give each
 * block at least rule.min_stages stages of k (two unless said below) and be at most
 * rule.max_split (8 unless said below). Measured on an H100 unless an H200 is named (us per
 * launch, Qwen3-8B matrices):
 *  - one block per multiprocessor (128- and 256-token tiles): whole waves; for wgmma, a split of at
 *    most 2 that must fill 25% better, since reducing a 128- or 256-token tile over the cluster
 *    costs more than the small tiles' (H200, per launch at 384 / 512 / 768 tokens, us, the 10% rule
 *    up to 8 -> this one: qkv 99.9 / 106.1 / 107.0 -> 54.5 / 55.5 / 99.0, o 69.6 / 36.0 / 106.5 ->
 *    34.5 / 36.7 / 56.1, gate_up 180.8 / 172.6 / 298.4 -> 180.8 / 174.5 / 278.1, down 115.1 / 92.6
 *    / 193.4 -> 87.8 / 93.0 / 156.1: splits of 4 or 8 over several waves, and gate_up's 2 at 768
 *    tokens for a fill of 0.97 instead of 0.87, cost more than they gained. The two rules agree up
 *    to 256 tokens and differ only for some matrices up to ~1800; one step's linears as the model
 *    runs them, 320 / 512 / 768 / 1280 tokens: 17.17 / 13.19 / 23.66 / 34.46 -> 13.49 / 11.44 /
 *    19.66 / 30.07 ms, and 128-256 and 1024-2048 unchanged);
 *  - two per multiprocessor (wgmma 64-token tiles, the mma.sync kernel): every multiprocessor
 *    busy once; waves at M = 128 picked split 4 for o and down, 27.1 / 64.8 vs 19.8 / 51.6 with
 *    split 2; all slots (below): M = 4..16 2.85 -> 3.17-3.31 ms for the step's matmuls, M = 128
 *    6.06 -> 6.70 (H100, thirteenth session); two 64-token tiles (65..128 tokens) keep busy SMs;
 *  - one token tile of 17..64 tokens (wgmma 32- and 64-token tiles): one wave, splits of 2, 3, 4
 *    or 6, at least four stages each. Every split from 1 to 8 forced on all four matrices (H200,
 *    per launch, qkv / o / down at M = 32: splits 3 17.9 / 17.3 / 24.5, 4 14.2 / 14.2 / 27.6, 6
 *    13.2 / 11.8 / 21.5, 8 16.2 / 11.2 / 23.5; at M = 64: 3 17.0 / 16.2 / 28.2, 4 15.0 / 14.1 /
 *    32.9, 6 22.9 (a second wave) / 13.5 / 26.3, 8 22.5 / 18.8 / 33.4): a split that fits one
 *    wave is the faster the larger, except that 8 (and 4 for down; not profiled) lose to 6.
 *    Against the rules before (every slot busy with 8 stages up to 32 tokens, busy SMs to 64),
 *    the step's matmuls as the model runs them, M = 24 / 32 / 48 / 64: 2.661 / 2.666 / 3.291 /
 *    3.310 -> 2.581 / 2.633 / 3.039 / 3.087 ms (down at 64: 33.2 -> 26.6); serving int4 at
 *    concurrency 64 7445 -> 7648 tok/s (twenty-fifth session);
 *  - up to 16 tokens, every slot busy with at least four stages: o splits 8 ways instead of 4, two
 *    blocks per multiprocessor instead of one (H200: o 14.3 -> 10.6 us per launch; the step's
 *    matmuls M = 4 / 8 / 16 2.64 / 2.92 / 2.73 -> 2.61 / 2.77 / 2.69 ms). One wave loses here
 *    (M = 4 / 8 / 16 2.472 / 2.708 / 2.636 -> 2.442 / 2.822 / 2.673 ms: o and down lose their
 *    split of 8). */
int choose_split(long long tiles, int k_tiles, const int (&slots)[kMaxSplit], int sms, SplitRule rule) {
    if (rule.fill == Fill::OneWave) {
        int best = 1;
        for (int s : {2, 3, 4, 6})
            if (s <= rule.max_split && slots[s - 1] && k_tiles >= rule.min_stages * s && tiles * s <= slots[s - 1])
                best = s;
        return best;
    }
    int best = 1;
    double best_fill = -1.0;
    for (int s = 1; s <= kMaxSplit; s *= 2) {
        const int i = s - 1;
        if (s > rule.max_split || !slots[i] || (s > 1 && k_tiles < rule.min_stages * s)) break;
        const long long blocks = tiles * s;
        double fill;
        if (rule.fill == Fill::WholeWaves) {
            const long long waves = (blocks + slots[i] - 1) / slots[i];
            fill = (double)blocks / (double)(waves * slots[i]);
        } else {
            const int room = rule.fill == Fill::BusySms ? sms : slots[i];
            fill = blocks >= room ? 1.0 : (double)blocks / room;
        }
        if (fill > rule.min_gain * best_fill) best = s, best_fill = fill;
    }
    return best;
}

/* A kernel's launch facts, found on its first launch: its shared memory limit raised, and its
 * co-resident blocks per cluster size (split_slots). */
struct KernelSlots {
    bool ready;
    int slots[kMaxSplit];
};

template <typename... Extra>
cudaError_t prepare(void (*kernel)(GemmArgs, Extra...), size_t smem, int sms, KernelSlots &ks) {
    if (ks.ready) return cudaSuccess;
    const cudaError_t rc = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (rc != cudaSuccess) return rc;
    split_slots(reinterpret_cast<const void *>(kernel), smem, sms, ks.slots);
    ks.ready = true;
    return cudaSuccess;
}

/* One launch of kernel over output tiles of `features` x BT with k in stages of kk columns; extra:
 * the kernel's arguments after a. */
template <typename... Extra>
cudaError_t launch_tiles(cudaStream_t st, void (*kernel)(GemmArgs, Extra...), size_t smem, KernelSlots &ks,
                         int features, int BT, int kk, SplitRule rule, const GemmArgs &a, int sms, Extra... extra) {
    const cudaError_t rc = prepare(kernel, smem, sms, ks);
    if (rc != cudaSuccess) return rc;
    const int feature_tiles = (a.n + features - 1) / features, token_tiles = (a.M + BT - 1) / BT;
    const int k_tiles = (a.k + kk - 1) / kk;
    const int split = choose_split((long long)feature_tiles * token_tiles, k_tiles, ks.slots, sms, rule);
    /* grid x is the split of k: its blocks form a cluster (cluster_barrier, cluster_load) */
    return cu_launch_clusters(st, dim3((unsigned)split, (unsigned)token_tiles, (unsigned)feature_tiles), dim3(kThreads),
                              smem, (unsigned)split, kernel, a, extra...);
}

/* cuTensorMapEncodeTiled, reached through the runtime (nothing links libcuda); NULL where the
 * driver lacks it. */
PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
    static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
    static bool asked = false;
    if (!asked) {
        asked = true;
        void *fn = nullptr;
        cudaDriverEntryPointQueryResult q;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) == cudaSuccess &&
            q == cudaDriverEntryPointSuccess)
            encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
        cudaGetLastError();
    }
    return encode;
}

/* The descriptor of a 2-D row-major tensor at base: rows x inner elements of `type`, rows
 * row_bytes apart, read in boxes of box_inner x box_rows; positions past the tensor read as 0. */
cudaError_t tensor_map_2d(CUtensorMap &map, CUtensorMapDataType type, const void *base, int inner, int rows,
                          size_t row_bytes, int box_inner, int box_rows, CUtensorMapSwizzle swizzle) {
    PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
    if (!encode) return cudaErrorNotSupported;
    const cuuint64_t dims[2] = {(cuuint64_t)inner, (cuuint64_t)rows}, strides[1] = {(cuuint64_t)row_bytes};
    const cuuint32_t box[2] = {(cuuint32_t)box_inner, (cuuint32_t)box_rows}, elem[2] = {1, 1};
    const CUresult r = encode(&map, type, 2, const_cast<void *>(base), dims, strides, box, elem,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                              CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

/* The wgmma kernel's descriptor of x [M][k] bf16 in boxes of 64 columns x BT tokens (128-byte
 * swizzle), from a small per-thread cache: a step's products read the same few activation
 * buffers, and an encoding costs microseconds of host time, which eager launches (prefill) pay
 * per product. The descriptor depends on nothing but the key (address, M, k, BT). */
cudaError_t x_tensor_map(const GemmArgs &a, int BT, CUtensorMap &map) {
    struct Entry {
        const void *x;
        int M, k, BT;
        CUtensorMap map;
    };
    constexpr int kEntries = 8;
    static thread_local Entry cache[kEntries];
    static thread_local int next;
    for (const Entry &e : cache)
        if (e.x == a.x && e.M == a.M && e.k == a.k && e.BT == BT) {
            map = e.map;
            return cudaSuccess;
        }
    const cudaError_t rc = tensor_map_2d(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, a.x, a.k, a.M, (size_t)a.k * 2, 64, BT,
                                         CU_TENSOR_MAP_SWIZZLE_128B);
    if (rc == cudaSuccess) {
        cache[next] = {a.x, a.M, a.k, BT, map};
        next = (next + 1) % kEntries;
    }
    return rc;
}

/* The launches of the two kernels for BT tokens per block and groups of 32 << GS columns. */
template <int BT, int GS>
struct MmaSync {
    static cudaError_t launch(cudaStream_t st, const GemmArgs &a, int sms, const WgMaps *) {
        static KernelSlots ks; /* one per instantiation (its shared memory decides its occupancy) */
        return launch_tiles(st, gemm_q4<BT, GS>, Stage<BT, GS>::kSmem, ks, kFeatures, BT, Tile<BT>::kK,
                            SplitRule{Tile<BT>::kMinBlocks == 1 ? Fill::WholeWaves : Fill::BusySms, 2, 8, 1.1}, a,
                            sms);
    }
};

template <int BT, int GS>
struct Wgmma {
    static cudaError_t launch(cudaStream_t st, const GemmArgs &a, int sms, const WgMaps *maps) {
        static KernelSlots ks;
        const SplitRule rule = WgTile<BT, GS>::kMinBlocks == 1 ? SplitRule{Fill::WholeWaves, 2, 2, 1.25}
                               : a.M <= 16                      ? SplitRule{Fill::AllSlots, 4, 8, 1.1}
                               : a.M <= BT                      ? SplitRule{Fill::OneWave, 4, 6, 1.0}
                                                                : SplitRule{Fill::BusySms, 2, 8, 1.1};
        return launch_tiles(st, gemm_q4_wg<BT, GS>, WgTile<BT, GS>::kSmem, ks, kFeatures, BT, kWgK, rule, a, sms, *maps);
    }
};

/* Kernel K's launch for the matrix's group size (gs = log2(group / 32)); maps: the wgmma
 * kernel's descriptors (NULL for the mma.sync kernel). */
template <template <int, int> class K, int BT>
cudaError_t launch_group(cudaStream_t st, const GemmArgs &a, int gs, int sms, const WgMaps *maps = nullptr) {
    switch (gs) {
    case 0: return K<BT, 0>::launch(st, a, sms, maps);
    case 1: return K<BT, 1>::launch(st, a, sms, maps);
    case 2: return K<BT, 2>::launch(st, a, sms, maps);
    case 3: return K<BT, 3>::launch(st, a, sms, maps);
    default: return cudaErrorInvalidValue;
    }
}

/* Whether the loaded device code has the wgmma kernel (built for sm_90a; asked once). */
bool wg_in_build() {
    static int built = -1;
    if (built < 0) {
        if (cudaMemcpyFromSymbol(&built, wg_built, sizeof built) != cudaSuccess) built = 0;
        cudaGetLastError();
    }
    return built == 1;
}

/* Which kernel, and how many tokens per block, for M (H100, one Qwen3-8B step's 144 linears,
 * int4, bench_cuda_decode --matmul-m; ms; 192 and 512 measured before the stage counts above
 * were cut):
 *   M         24    32    48    64    96    128    192    256    512
 *   mma.sync  3.71  3.76  5.54  5.25  8.65  9.89  16.15  15.31  (18.0 dequant + cuBLAS)
 *   wgmma     3.55  3.60  5.06  5.27  6.76  6.77  10.30  10.28  17.86
 * wgmma in tiles of 32 (M <= 32), 64 (M <= 64) or 128 (64-token tiles up to 128 measured 5-7%
 * slower); below 17 tokens, tiles of 16 up to 7 tokens (below). The mma.sync kernel takes every
 * M on GPUs (or builds) without wgmma, with 16-token tiles up to 16 tokens, 32-token tiles up to
 * 96 (more blocks to fill the machine, each weight tile read again from L2 rather than HBM) and
 * 128-token tiles from 128, unless the last one would be at most half full.
 *
 * Below 17 tokens wgmma wins too (H200, same measure, ms; mma.sync's 16-token tile vs wgmma's 16-
 * and 32-token tiles):
 *   M          4     5     6     7     8     16
 *   mma.sync   3.17  -     -     -     3.18  3.21
 *   wgmma 16   2.64  2.65  2.65  2.78  2.80  2.86
 *   wgmma 32   3.02  2.73  2.88  2.90  2.71  2.70
 * so from 4 tokens (up to 3 the GEMV is faster still): 16-token tiles up to 7, 32 from 8. Serving
 * int4 at concurrency 8 / 16: 1809 -> 2044 / 3139 -> 3479 tok/s (same call).
 *
 * Above 128 tokens, wgmma tiles of 256 (each weight dequantized once for all of them, m64n256
 * products) where the matrix has enough feature tiles to fill a third of the machine without
 * them: qkv and gate_up of Qwen3-8B, not o and down (32 feature tiles, whose split of k over
 * clusters of 4 then costs more than the second token tile saves). Same card, the step's
 * matmuls (per launch, us, qkv / o / gate_up / down):
 *   M = 160  10.08 -> 8.58 ms, 192  10.30 -> 8.88, 256  10.34 -> 9.08 (74.6 / 27.4 / 121.0 / 66.3
 *   -> 39.8 / 26.6 / 120.2 / 67.5); 256-token tiles for all four: 10.71 (o 49.5, down 95.2).
 * Likewise from 65 to 128 tokens the narrow matrices take two 64-token tiles (o 31.8 -> 19.8,
 * down 59.5 -> 51.6 us at M = 128, split as choose_split says). From 512 tokens they have token
 * tiles enough to fill the machine with 256-token tiles too (H200, per launch at M = 1024 / 2048,
 * us: o 72.8 -> 64.4 / 150.4 -> 130.9, down 205.0 -> 175.4 / 428.6 -> 364.5; M = 512: down
 * 100.2 -> 94.0, o 35.1 -> 36.4). Below 768 tokens the wide matrices take 256-token tiles only
 * where they pad M no more than 128-token tiles do (M % 256 zero or above 128): a half-empty last
 * tile costs more than dequantizing each weight once per 256 tokens saves (H200, the step's linears
 * as the model runs them, 256- -> 128-token tiles: M = 288 13.15 -> 11.44 ms, 320 13.55 -> 11.44,
 * 384 12.39 -> 11.41, 576 20.71 -> 17.84, 640 19.83 -> 17.85; but 896 22.31 -> 22.94, 1152 30.35
 * -> 31.05, 1664 40.20 -> 42.11, so not from 768). */
constexpr int kWgMinM = 4;

int wg_token_tile(int M, int n, int sms) {
    const bool wide = (n + kFeatures - 1) / kFeatures * 3 >= sms;
    if (M <= 7) return 16;
    if (M <= 32) return 32;
    if (M <= 64) return 64;
    if (M <= 128) return wide ? 128 : 64;
    if (!wide) return M >= 512 ? 256 : 128;
    return M >= 768 || M % 256 == 0 || M % 256 > 128 ? 256 : 128;
}

/* The mma.sync kernel's token tile for M (GPUs or builds without wgmma). */
int token_tile(int M) {
    if (M <= 16) return 16;
    if (M <= 96) return 32;
    if (M <= 128) return 128;
    const int rem = M % 128;
    return rem == 0 || rem > 64 ? 128 : 32;
}

/* The product a describes, for w: the kernel and token tile for a.M tokens. */
cudaError_t launch_gemm(cudaStream_t st, const CuMat *w, const GemmArgs &a, int sms, bool wgmma) {
    const int gs = cu_group_shift(w), M = a.M;
    if (M >= kWgMinM && cu_gemm_q4_wgmma(w, wgmma)) {
        const int BT = wg_token_tile(M, w->n, sms);
        WgMaps maps;
        static_assert(sizeof maps.codes == sizeof w->tma[0], "CuMat::tma holds a CUtensorMap");
        memcpy(&maps.codes, w->tma[0], sizeof maps.codes);
        memcpy(&maps.sz, w->tma[1], sizeof maps.sz);
        const cudaError_t rc = x_tensor_map(a, BT, maps.x);
        if (rc != cudaSuccess) return rc;
        switch (BT) {
        case 16: return launch_group<Wgmma, 16>(st, a, gs, sms, &maps);
        case 32: return launch_group<Wgmma, 32>(st, a, gs, sms, &maps);
        case 64: return launch_group<Wgmma, 64>(st, a, gs, sms, &maps);
        case 128: return launch_group<Wgmma, 128>(st, a, gs, sms, &maps);
        default: return launch_group<Wgmma, 256>(st, a, gs, sms, &maps);
        }
    }
    switch (token_tile(M)) {
    case 16: return launch_group<MmaSync, 16>(st, a, gs, sms);
    case 32: return launch_group<MmaSync, 32>(st, a, gs, sms);
    default: return launch_group<MmaSync, 128>(st, a, gs, sms);
    }
}

} // namespace

void cu_gemm_q4_describe(CuMat *w) {
    w->tma_ok = false;
    int dev = 0, major = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 9) {
        cudaGetLastError();
        return;
    }
    CUtensorMap codes, sz;
    const int ld = cu_sz_ld(w->k, w->group);
    if (tensor_map_2d(codes, CU_TENSOR_MAP_DATA_TYPE_UINT8, w->w, w->k / 2, w->n, (size_t)w->k / 2, 64, kBoxRows,
                      CU_TENSOR_MAP_SWIZZLE_64B) != cudaSuccess ||
        tensor_map_2d(sz, CU_TENSOR_MAP_DATA_TYPE_UINT32, w->sz, ld, w->n, (size_t)ld * 4, 4, kBoxRows,
                      CU_TENSOR_MAP_SWIZZLE_NONE) != cudaSuccess)
        return;
    memcpy(w->tma[0], &codes, sizeof codes);
    memcpy(w->tma[1], &sz, sizeof sz);
    w->tma_ok = true;
}

bool cu_gemm_q4_wgmma(const CuMat *w, bool wgmma) { return wgmma && w->tma_ok && wg_in_build(); }

cudaError_t cu_gemm_q4(cudaStream_t st, const CuMat *w, const __nv_bfloat16 *x, int M, float *y, int ldy, int sms,
                       bool accumulate, bool wgmma) {
    if (M <= 0 || w->n <= 0) return cudaSuccess;
    if (!w->group || w->k % 32) return cudaErrorInvalidValue;
    const GemmArgs a = {static_cast<const uint4 *>(w->w), w->sz, reinterpret_cast<const uint4 *>(x), y + w->n0, M,
                        w->n, w->k, ldy, accumulate, 0, nullptr};
    return launch_gemm(st, w, a, sms, wgmma);
}

cudaError_t cu_gemm_q4_swiglu(cudaStream_t st, const CuMat *w, const __nv_bfloat16 *x, int M, __nv_bfloat16 *h, int sms,
                              bool wgmma) {
    if (M <= 0 || w->n <= 0) return cudaSuccess;
    if (!w->group || w->k % 32 || w->n % 2 || w->n0) return cudaErrorInvalidValue;
    const GemmArgs a = {static_cast<const uint4 *>(w->w), w->sz, reinterpret_cast<const uint4 *>(x), nullptr, M,
                        w->n, w->k, 0, false, w->n / 2, h};
    return launch_gemm(st, w, a, sms, wgmma);
}
