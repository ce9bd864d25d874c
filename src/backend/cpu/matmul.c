/* matmul.c — y = x · Wᵀ kernels for the CPU backend (bf16, f32 and int4 weights).
 *
 * Why it is shaped this way:
 * - Work is split over N (weight rows) into tasks of at most ~256 KiB of weights; a task computes
 *   all M rows of y for its rows of W. So each weight byte comes from memory once per call, and
 *   for prefill from L2 for every further block of rows of x.
 * - Everything is a dot product along K: x and W are both read contiguously in their file
 *   layouts, so bf16 and f32 weights need no repacking (bf16 widens to f32 with a shift), at the
 *   price of one horizontal sum per output. Tiles are specialised at compile time for every
 *   (mr, nr) they can take so the accumulators live in registers.
 * - Decode (M <= 8) is bound by weight bandwidth: tiles take one weight row (a single sequential
 *   stream: hardware prefetchers lose a lot on several short interleaved row streams), split the
 *   row over up to 4 accumulators to keep FMAs in flight, and software-prefetch 4 KiB ahead (as
 *   do prefill tiles in their first block of rows of x, the one that pulls W from memory).
 * - Prefill (M > 8) is bound by FMAs: MR x NR tiles (4 x 4 with AVX-512) reuse each weight vector
 *   for MR rows of x and each x vector for NR weight rows. An empty asm keeps the x vector in a
 *   register: otherwise GCC folds it into every FMA as a memory operand and the tile becomes
 *   load-bound (measured: 57 -> 95 GFLOP/s on one Zen 4 core).
 * - Int4 is dequantised in registers. With AVX-512 a group's 16 possible weights
 *   (q - 8) * scale + zero fill one register, and vpermps picks lanes by the low 4 bits of each
 *   index lane; the repacked layout (matmul.h) puts column 16j + d in bits 4j.. of word d, so one
 *   shift and one permute give 16 exactly dequantised weights. AVX2 and NEON (narrower permutes)
 *   shift, mask, convert and apply scale and zero with an FMA.
 * - Accumulation is float32 throughout; only the summation order differs between kernel sets.
 * Kernel sets are compiled for whatever the target offers (-march=native) and one is selected at
 * run time (the best by default), so tests can check every set the host can run. */
#include "backend/cpu/matmul.h"

#include <string.h>

#include "util/bf16.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define MM_HAVE_NEON 1
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define MM_HAVE_AVX2 1
#endif
#if defined(__AVX512F__)
#define MM_HAVE_AVX512 1
#endif

#define MM_INLINE static inline __attribute__((always_inline))
#define Q4_BLOCK 128 /* columns per 64-byte block of the repacked int4 layout */

/* Largest tile any kernel set uses; tile accumulators are arrays of this size, of which a
 * specialisation touches only [mr][nr]. */
#define TILE_MMAX 8
#define TILE_NMAX 4
#define TILE_UMAX 4
/* Independent accumulators per (row of x, row of W): enough FMA chains in flight for small tiles
 * (an FMA has ~4 cycles of latency); 1 for tiles of 4 or more. */
#define TILE_U(MR, NR) ((MR) * (NR) >= 4 ? 1 : (MR) * (NR) == 1 ? 4 : 2)

/* One product: shared by all tasks of a call. */
typedef struct MmJob MmJob;
typedef void (*MmPanelFn)(const MmJob *job, int n0, int n1);
struct MmJob {
    float *y;
    const float *x;
    const void *w; /* uint16_t, float or Q4Weights */
    int M, N, K;
    int rows_per_task;
    MmPanelFn panel;
};

typedef struct MmKernels {
    MmPanelFn bf16, f32, q4;
} MmKernels;

static inline int imin(int a, int b) { return a < b ? a : b; }

/* ---------------------------------------------------------------------------------------------
 * Tile dispatch: DISPATCH(TILE, MRMAX, NRMAX, mr, nr, args...) calls TILE(args..., mr, nr) with
 * mr and nr as compile-time constants (1 <= mr <= MRMAX <= 8, 1 <= nr <= NRMAX <= 4). */
#define MM_CASE(TILE, MRMAX, NRMAX, A, B, ...) \
    case (A) * 8 + (B):                        \
        if ((A) <= (MRMAX) && (B) <= (NRMAX)) TILE(__VA_ARGS__, A, B); \
        break;
#define MM_CASES_N(TILE, MRMAX, NRMAX, A, ...)        \
    MM_CASE(TILE, MRMAX, NRMAX, A, 1, __VA_ARGS__)    \
    MM_CASE(TILE, MRMAX, NRMAX, A, 2, __VA_ARGS__)    \
    MM_CASE(TILE, MRMAX, NRMAX, A, 3, __VA_ARGS__)    \
    MM_CASE(TILE, MRMAX, NRMAX, A, 4, __VA_ARGS__)
#define DISPATCH(TILE, MRMAX, NRMAX, mr, nr, ...)         \
    switch ((mr) * 8 + (nr)) {                            \
        MM_CASES_N(TILE, MRMAX, NRMAX, 1, __VA_ARGS__)    \
        MM_CASES_N(TILE, MRMAX, NRMAX, 2, __VA_ARGS__)    \
        MM_CASES_N(TILE, MRMAX, NRMAX, 3, __VA_ARGS__)    \
        MM_CASES_N(TILE, MRMAX, NRMAX, 4, __VA_ARGS__)    \
        MM_CASES_N(TILE, MRMAX, NRMAX, 5, __VA_ARGS__)    \
        MM_CASES_N(TILE, MRMAX, NRMAX, 6, __VA_ARGS__)    \
        MM_CASES_N(TILE, MRMAX, NRMAX, 7, __VA_ARGS__)    \
        MM_CASES_N(TILE, MRMAX, NRMAX, 8, __VA_ARGS__)    \
        default: break;                                   \
    }

/* A panel: rows [n0, n1) of W against all M rows of x. Up to TILE_MMAX rows of x (decode, bound
 * by weight bandwidth) go one weight row at a time, so the weights are read as a single
 * sequential stream, which hardware prefetchers follow best; larger M (prefill, bound by
 * arithmetic) uses MR x NR tiles, each weight row reused for MR rows of x from registers. */
#define DEFINE_PANEL(NAME, TILE, MR, NR)                                   \
    static void NAME(const MmJob *job, int n0, int n1) {                   \
        if (job->M <= TILE_MMAX) {                                         \
            for (int n = n0; n < n1; n++)                                  \
                DISPATCH(TILE, TILE_MMAX, 1, job->M, 1, job, 0, n)         \
            return;                                                        \
        }                                                                  \
        for (int m0 = 0; m0 < job->M; m0 += (MR)) {                        \
            int mr = imin((MR), job->M - m0);                              \
            for (int n = n0; n < n1; n += (NR)) {                          \
                int nr = imin((NR), n1 - n);                               \
                DISPATCH(TILE, MR, NR, mr, nr, job, m0, n)                 \
            }                                                              \
        }                                                                  \
    }

/* Code of column c (0..127) in a 64-byte repacked int4 block. */
static inline unsigned q4_code(const uint8_t *blk, int c) {
    int j = c >> 4, d = c & 15;
    return (blk[4 * d + (j >> 1)] >> ((j & 1) * 4)) & 15u;
}

/* Walking a row of int4 blocks without divisions in the loop: bit j of `starts` says that the
 * j-th 16-column vector of a block begins a group, whose index is gbase + (j >> jshift); gbase
 * grows by gpb every bpg blocks. */
typedef struct Q4Groups {
    unsigned starts;
    int jshift, gpb, bpg;
} Q4Groups;

static inline Q4Groups q4_groups(int group) {
    if (group >= Q4_BLOCK) return (Q4Groups){1u, 3, 1, group / Q4_BLOCK};
    return group == 64 ? (Q4Groups){0x11u, 2, 2, 1} : (Q4Groups){0x55u, 1, 4, 1};
}

/* Hardware prefetchers ramp up too slowly on short weight rows (2-6 KiB) and left a third of
 * the bandwidth unused in decode, so tiles reading W from memory ask for the bytes
 * PREFETCH_AHEAD further along each row as they go (2-16 KiB measured alike). Dense rows are
 * consumed fast and are prefetched into L2 (prefetcht1): into L1 the requests queue on the few
 * L1 miss buffers (Zen 4: 65% of the read bandwidth, 95-100% into L2). Int4 rows are consumed 4x
 * slower per byte by a kernel close to its arithmetic limit; into L1 is better there (70% vs 55%). */
#define PREFETCH_AHEAD 4096
MM_INLINE void prefetch_dense(const void *p, const int bytes) {
#pragma GCC unroll 4
    for (int o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + PREFETCH_AHEAD + o, 0, 2);
}
MM_INLINE void prefetch_q4(const uint8_t *p) { __builtin_prefetch(p + PREFETCH_AHEAD, 0, 3); }

/* Scalar tail of a bf16/f32 dot product: columns [k0, K). */
MM_INLINE float dot_tail(const float *x, const void *w, int wide, int k0, int K) {
    float s = 0.f;
    for (int k = k0; k < K; k++)
        s += x[k] * (wide ? ((const float *)w)[k] : bf16_to_f32(((const uint16_t *)w)[k]));
    return s;
}

/* ---------------------------------------------------------------------------------------------
 * Portable scalar kernels: the fallback on targets without SIMD, and the plainest statement of
 * what every other set computes. */
static void panel_dense_scalar(const MmJob *job, int n0, int n1, int wide) {
    int K = job->K;
    for (int n = n0; n < n1; n++) {
        const void *wr = wide ? (const void *)((const float *)job->w + (size_t)n * K)
                              : (const void *)((const uint16_t *)job->w + (size_t)n * K);
        for (int m = 0; m < job->M; m++)
            job->y[(size_t)m * job->N + n] = dot_tail(job->x + (size_t)m * K, wr, wide, 0, K);
    }
}
static void panel_bf16_scalar(const MmJob *job, int n0, int n1) { panel_dense_scalar(job, n0, n1, 0); }
static void panel_f32_scalar(const MmJob *job, int n0, int n1) { panel_dense_scalar(job, n0, n1, 1); }

static void panel_q4_scalar(const MmJob *job, int n0, int n1) {
    const Q4Weights *q = job->w;
    int K = job->K, G = K / q->group;
    for (int n = n0; n < n1; n++) {
        const uint8_t *codes = q->codes + (size_t)n * (K / 2);
        for (int m = 0; m < job->M; m++) {
            const float *x = job->x + (size_t)m * K;
            float acc = 0.f;
            for (int g = 0; g < G; g++) {
                uint32_t sz = q->sz[(size_t)n * G + g];
                float s = bf16_to_f32((uint16_t)sz), z = bf16_to_f32((uint16_t)(sz >> 16));
                for (int k = g * q->group; k < (g + 1) * q->group; k++)
                    acc += x[k] * (((float)q4_code(codes + (k / Q4_BLOCK) * 64, k % Q4_BLOCK) - 8.f) * s + z);
            }
            job->y[(size_t)m * job->N + n] = acc;
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * AVX-512 */
#ifdef MM_HAVE_AVX512

/* The 16 bf16 values at w, widened to float32. */
MM_INLINE __m512 ld16_bf16(const uint16_t *w) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w));
    return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
}

/* MR x NR tile of a dense product; wide = 1 for f32 weights, 0 for bf16. */
MM_INLINE void tile_dense_512(const MmJob *job, int m0, int n0, int wide, const int MR, const int NR) {
    const int K = job->K, U = TILE_U(MR, NR);
    const float *x = job->x + (size_t)m0 * K;
    const uint16_t *wb = (const uint16_t *)job->w + (size_t)n0 * K;
    const float *wf = (const float *)job->w + (size_t)n0 * K;
    __m512 acc[TILE_UMAX][TILE_MMAX][TILE_NMAX];
#pragma GCC unroll 4
    for (int u = 0; u < U; u++)
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) acc[u][i][r] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 * U <= K; k += 16 * U) {
        if (m0 == 0) /* later row blocks of x find the weights in L2 */
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++)
                prefetch_dense(wide ? (const void *)(wf + (size_t)r * K + k) : (const void *)(wb + (size_t)r * K + k),
                             16 * U * (wide ? 4 : 2));
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
            const int ku = k + 16 * u;
            __m512 wv[TILE_NMAX];
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++)
                wv[r] = wide ? _mm512_loadu_ps(wf + (size_t)r * K + ku) : ld16_bf16(wb + (size_t)r * K + ku);
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++) {
                __m512 xv = _mm512_loadu_ps(x + (size_t)i * K + ku);
                if (NR > 1) __asm__("" : "+v"(xv));
#pragma GCC unroll 4
                for (int r = 0; r < NR; r++) acc[u][i][r] = _mm512_fmadd_ps(xv, wv[r], acc[u][i][r]);
            }
        }
    }
    for (; k + 16 <= K; k += 16) {
        __m512 wv[TILE_NMAX];
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++)
            wv[r] = wide ? _mm512_loadu_ps(wf + (size_t)r * K + k) : ld16_bf16(wb + (size_t)r * K + k);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            __m512 xv = _mm512_loadu_ps(x + (size_t)i * K + k);
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) acc[0][i][r] = _mm512_fmadd_ps(xv, wv[r], acc[0][i][r]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            const void *wr = wide ? (const void *)(wf + (size_t)r * K) : (const void *)(wb + (size_t)r * K);
            float t = k < K ? dot_tail(x + (size_t)i * K, wr, wide, k, K) : 0.f;
            __m512 a = acc[0][i][r];
#pragma GCC unroll 4
            for (int u = 1; u < U; u++) a = _mm512_add_ps(a, acc[u][i][r]);
            job->y[(size_t)(m0 + i) * job->N + n0 + r] = _mm512_reduce_add_ps(a) + t;
        }
}

#define TILE_BF16_512(job, m0, n0, MR, NR) tile_dense_512(job, m0, n0, 0, MR, NR)
#define TILE_F32_512(job, m0, n0, MR, NR) tile_dense_512(job, m0, n0, 1, MR, NR)
DEFINE_PANEL(panel_bf16_avx512, TILE_BF16_512, 4, 4)
DEFINE_PANEL(panel_f32_avx512, TILE_F32_512, 4, 4)

/* MR x NR tile of an int4 product. Per row and group, tbl = (q - 8) * scale + zero for q = 0..15;
 * per 16 columns, one shift of the block's words and one vpermps give the weights. */
MM_INLINE void tile_q4_512(const MmJob *job, int m0, int n0, const int MR, const int NR) {
    const Q4Weights *q = job->w;
    const int K = job->K, group = q->group, G = K / group, U = TILE_U(MR, NR);
    const Q4Groups qg = q4_groups(group);
    const float *x = job->x + (size_t)m0 * K;
    const __m512 lut = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m512i hi16 = _mm512_set1_epi32((int)0xffff0000u);
    __m512 acc[TILE_UMAX][TILE_MMAX][TILE_NMAX];
#pragma GCC unroll 4
    for (int u = 0; u < U; u++)
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) acc[u][i][r] = _mm512_setzero_ps();
    int gbase = 0, bcount = 0;
    for (int b = 0; b < K / Q4_BLOCK; b++) {
        __m512i v[TILE_NMAX];
        __m512 tbl[TILE_NMAX];
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++)
            v[r] = _mm512_loadu_si512(q->codes + (size_t)(n0 + r) * (K / 2) + (size_t)b * 64);
        if (m0 == 0)
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) prefetch_q4(q->codes + (size_t)(n0 + r) * (K / 2) + (size_t)b * 64);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            if (qg.starts >> j & 1) {
                int g = gbase + (j >> qg.jshift);
#pragma GCC unroll 4
                for (int r = 0; r < NR; r++) {
                    __m512i sz = _mm512_set1_epi32((int)q->sz[(size_t)(n0 + r) * G + g]);
                    __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(sz, 16));
                    __m512 z = _mm512_castsi512_ps(_mm512_and_si512(sz, hi16));
                    tbl[r] = _mm512_fmadd_ps(lut, s, z);
                }
            }
            __m512 wv[TILE_NMAX];
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++)
                wv[r] = _mm512_permutexvar_ps(j ? _mm512_srli_epi32(v[r], 4 * j) : v[r], tbl[r]);
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++) {
                __m512 xv = _mm512_loadu_ps(x + (size_t)i * K + b * Q4_BLOCK + 16 * j);
                if (NR > 1) __asm__("" : "+v"(xv));
#pragma GCC unroll 4
                for (int r = 0; r < NR; r++) acc[j % U][i][r] = _mm512_fmadd_ps(xv, wv[r], acc[j % U][i][r]);
            }
        }
        if (++bcount == qg.bpg) {
            bcount = 0;
            gbase += qg.gpb;
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            __m512 a = acc[0][i][r];
#pragma GCC unroll 4
            for (int u = 1; u < U; u++) a = _mm512_add_ps(a, acc[u][i][r]);
            job->y[(size_t)(m0 + i) * job->N + n0 + r] = _mm512_reduce_add_ps(a);
        }
}

DEFINE_PANEL(panel_q4_avx512, tile_q4_512, 4, 4)
#endif

/* ---------------------------------------------------------------------------------------------
 * AVX2 + FMA: the same tiles with 8-wide vectors and 16 registers. */
#ifdef MM_HAVE_AVX2

MM_INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

MM_INLINE __m256 ld8_bf16(const uint16_t *w) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w));
    return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

MM_INLINE void tile_dense_avx2(const MmJob *job, int m0, int n0, int wide, const int MR, const int NR) {
    const int K = job->K, U = TILE_U(MR, NR);
    const float *x = job->x + (size_t)m0 * K;
    const uint16_t *wb = (const uint16_t *)job->w + (size_t)n0 * K;
    const float *wf = (const float *)job->w + (size_t)n0 * K;
    __m256 acc[TILE_UMAX][TILE_MMAX][TILE_NMAX];
#pragma GCC unroll 4
    for (int u = 0; u < U; u++)
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) acc[u][i][r] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
        if (m0 == 0)
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++)
                prefetch_dense(wide ? (const void *)(wf + (size_t)r * K + k) : (const void *)(wb + (size_t)r * K + k),
                             8 * U * (wide ? 4 : 2));
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
            const int ku = k + 8 * u;
            __m256 wv[TILE_NMAX];
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++)
                wv[r] = wide ? _mm256_loadu_ps(wf + (size_t)r * K + ku) : ld8_bf16(wb + (size_t)r * K + ku);
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++) {
                __m256 xv = _mm256_loadu_ps(x + (size_t)i * K + ku);
                if (NR > 1) __asm__("" : "+x"(xv));
#pragma GCC unroll 4
                for (int r = 0; r < NR; r++) acc[u][i][r] = _mm256_fmadd_ps(xv, wv[r], acc[u][i][r]);
            }
        }
    }
    for (; k + 8 <= K; k += 8) {
        __m256 wv[TILE_NMAX];
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++)
            wv[r] = wide ? _mm256_loadu_ps(wf + (size_t)r * K + k) : ld8_bf16(wb + (size_t)r * K + k);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            __m256 xv = _mm256_loadu_ps(x + (size_t)i * K + k);
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) acc[0][i][r] = _mm256_fmadd_ps(xv, wv[r], acc[0][i][r]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            const void *wr = wide ? (const void *)(wf + (size_t)r * K) : (const void *)(wb + (size_t)r * K);
            float t = k < K ? dot_tail(x + (size_t)i * K, wr, wide, k, K) : 0.f;
            __m256 a = acc[0][i][r];
#pragma GCC unroll 4
            for (int u = 1; u < U; u++) a = _mm256_add_ps(a, acc[u][i][r]);
            job->y[(size_t)(m0 + i) * job->N + n0 + r] = hsum256(a) + t;
        }
}

#define TILE_BF16_AVX2(job, m0, n0, MR, NR) tile_dense_avx2(job, m0, n0, 0, MR, NR)
#define TILE_F32_AVX2(job, m0, n0, MR, NR) tile_dense_avx2(job, m0, n0, 1, MR, NR)
DEFINE_PANEL(panel_bf16_avx2, TILE_BF16_AVX2, 4, 3)
DEFINE_PANEL(panel_f32_avx2, TILE_F32_AVX2, 4, 3)

/* Int4 with 8-wide vectors: the block's 16 words are two registers (words 0-7 -> columns
 * 16j + 0..7, words 8-15 -> 16j + 8..15); w = q * scale + (zero - 8 * scale). One weight row per
 * tile (a row's codes, scale and zero take 4 of the 16 registers). */
MM_INLINE void tile_q4_avx2(const MmJob *job, int m0, int n0, const int MR, const int NR) {
    const Q4Weights *q = job->w;
    const int K = job->K, G = K / q->group, U = TILE_U(MR, 1);
    const Q4Groups qg = q4_groups(q->group);
    const float *x = job->x + (size_t)m0 * K;
    const uint8_t *codes = q->codes + (size_t)n0 * (K / 2);
    const __m256i mask = _mm256_set1_epi32(15), hi16 = _mm256_set1_epi32((int)0xffff0000u);
    const __m256 eight = _mm256_set1_ps(8.f);
    (void)NR; /* always 1 */
    __m256 acc[TILE_UMAX][TILE_MMAX];
#pragma GCC unroll 4
    for (int u = 0; u < U; u++)
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) acc[u][i] = _mm256_setzero_ps();
    int gbase = 0, bcount = 0;
    __m256 sc = _mm256_setzero_ps(), zb = _mm256_setzero_ps();
    for (int b = 0; b < K / Q4_BLOCK; b++) {
        if (m0 == 0) prefetch_q4(codes + (size_t)b * 64);
        __m256i v[2] = {_mm256_loadu_si256((const __m256i *)(codes + (size_t)b * 64)),
                        _mm256_loadu_si256((const __m256i *)(codes + (size_t)b * 64 + 32))};
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            if (qg.starts >> j & 1) {
                __m256i sz = _mm256_set1_epi32((int)q->sz[(size_t)n0 * G + gbase + (j >> qg.jshift)]);
                sc = _mm256_castsi256_ps(_mm256_slli_epi32(sz, 16));
                zb = _mm256_fnmadd_ps(eight, sc, _mm256_castsi256_ps(_mm256_and_si256(sz, hi16)));
            }
#pragma GCC unroll 2
            for (int h = 0; h < 2; h++) {
                __m256i c = _mm256_and_si256(_mm256_srli_epi32(v[h], 4 * j), mask);
                __m256 wv = _mm256_fmadd_ps(_mm256_cvtepi32_ps(c), sc, zb);
#pragma GCC unroll 8
                for (int i = 0; i < MR; i++) {
                    __m256 xv = _mm256_loadu_ps(x + (size_t)i * K + b * Q4_BLOCK + 16 * j + 8 * h);
                    acc[(2 * j + h) % U][i] = _mm256_fmadd_ps(xv, wv, acc[(2 * j + h) % U][i]);
                }
            }
        }
        if (++bcount == qg.bpg) {
            bcount = 0;
            gbase += qg.gpb;
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++) {
        __m256 a = acc[0][i];
#pragma GCC unroll 4
        for (int u = 1; u < U; u++) a = _mm256_add_ps(a, acc[u][i]);
        job->y[(size_t)(m0 + i) * job->N + n0] = hsum256(a);
    }
}

DEFINE_PANEL(panel_q4_avx2, tile_q4_avx2, 8, 1)
#endif

/* ---------------------------------------------------------------------------------------------
 * NEON (aarch64): 4-wide vectors, 32 registers. */
#ifdef MM_HAVE_NEON

MM_INLINE float32x4_t ld4_bf16(const uint16_t *w) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(w), 16));
}

MM_INLINE void tile_dense_neon(const MmJob *job, int m0, int n0, int wide, const int MR, const int NR) {
    const int K = job->K, U = TILE_U(MR, NR);
    const float *x = job->x + (size_t)m0 * K;
    const uint16_t *wb = (const uint16_t *)job->w + (size_t)n0 * K;
    const float *wf = (const float *)job->w + (size_t)n0 * K;
    float32x4_t acc[TILE_UMAX][TILE_MMAX][TILE_NMAX];
#pragma GCC unroll 4
    for (int u = 0; u < U; u++)
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) acc[u][i][r] = vdupq_n_f32(0.f);
    int k = 0;
    for (; k + 4 * U <= K; k += 4 * U) {
        if (m0 == 0)
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++)
                prefetch_dense(wide ? (const void *)(wf + (size_t)r * K + k) : (const void *)(wb + (size_t)r * K + k),
                             4 * U * (wide ? 4 : 2));
#pragma GCC unroll 4
        for (int u = 0; u < U; u++) {
            const int ku = k + 4 * u;
            float32x4_t wv[TILE_NMAX];
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++)
                wv[r] = wide ? vld1q_f32(wf + (size_t)r * K + ku) : ld4_bf16(wb + (size_t)r * K + ku);
#pragma GCC unroll 8
            for (int i = 0; i < MR; i++) {
                float32x4_t xv = vld1q_f32(x + (size_t)i * K + ku);
                if (NR > 1) __asm__("" : "+w"(xv));
#pragma GCC unroll 4
                for (int r = 0; r < NR; r++) acc[u][i][r] = vfmaq_f32(acc[u][i][r], xv, wv[r]);
            }
        }
    }
    for (; k + 4 <= K; k += 4) {
        float32x4_t wv[TILE_NMAX];
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++)
            wv[r] = wide ? vld1q_f32(wf + (size_t)r * K + k) : ld4_bf16(wb + (size_t)r * K + k);
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            float32x4_t xv = vld1q_f32(x + (size_t)i * K + k);
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) acc[0][i][r] = vfmaq_f32(acc[0][i][r], xv, wv[r]);
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            const void *wr = wide ? (const void *)(wf + (size_t)r * K) : (const void *)(wb + (size_t)r * K);
            float t = k < K ? dot_tail(x + (size_t)i * K, wr, wide, k, K) : 0.f;
            float32x4_t a = acc[0][i][r];
#pragma GCC unroll 4
            for (int u = 1; u < U; u++) a = vaddq_f32(a, acc[u][i][r]);
            job->y[(size_t)(m0 + i) * job->N + n0 + r] = vaddvq_f32(a) + t;
        }
}

#define TILE_BF16_NEON(job, m0, n0, MR, NR) tile_dense_neon(job, m0, n0, 0, MR, NR)
#define TILE_F32_NEON(job, m0, n0, MR, NR) tile_dense_neon(job, m0, n0, 1, MR, NR)
DEFINE_PANEL(panel_bf16_neon, TILE_BF16_NEON, 4, 4)
DEFINE_PANEL(panel_f32_neon, TILE_F32_NEON, 4, 4)

/* Int4 with 4-wide vectors: the block's 16 words are four registers (words 4c..4c+3 -> columns
 * 16j + 4c..4c+3); w = q * scale + (zero - 8 * scale). */
MM_INLINE void tile_q4_neon(const MmJob *job, int m0, int n0, const int MR, const int NR) {
    const Q4Weights *q = job->w;
    const int K = job->K, G = K / q->group, U = TILE_U(MR, NR);
    const Q4Groups qg = q4_groups(q->group);
    const float *x = job->x + (size_t)m0 * K;
    const uint32x4_t mask = vdupq_n_u32(15), hi16 = vdupq_n_u32(0xffff0000u);
    const float32x4_t eight = vdupq_n_f32(8.f);
    float32x4_t acc[TILE_UMAX][TILE_MMAX][TILE_NMAX];
#pragma GCC unroll 4
    for (int u = 0; u < U; u++)
#pragma GCC unroll 8
        for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) acc[u][i][r] = vdupq_n_f32(0.f);
    int gbase = 0, bcount = 0;
    float32x4_t sc[TILE_NMAX], zb[TILE_NMAX];
    for (int b = 0; b < K / Q4_BLOCK; b++) {
        uint32x4_t v[TILE_NMAX][4];
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            const uint8_t *blk = q->codes + (size_t)(n0 + r) * (K / 2) + (size_t)b * 64;
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) v[r][c] = vreinterpretq_u32_u8(vld1q_u8(blk + 16 * c));
        }
        if (m0 == 0)
#pragma GCC unroll 4
            for (int r = 0; r < NR; r++) prefetch_q4(q->codes + (size_t)(n0 + r) * (K / 2) + (size_t)b * 64);
#pragma GCC unroll 8
        for (int j = 0; j < 8; j++) {
            if (qg.starts >> j & 1) {
#pragma GCC unroll 4
                for (int r = 0; r < NR; r++) {
                    uint32x4_t sz = vdupq_n_u32(q->sz[(size_t)(n0 + r) * G + gbase + (j >> qg.jshift)]);
                    sc[r] = vreinterpretq_f32_u32(vshlq_n_u32(sz, 16));
                    zb[r] = vfmsq_f32(vreinterpretq_f32_u32(vandq_u32(sz, hi16)), sc[r], eight);
                }
            }
            const int32x4_t shift = vdupq_n_s32(-4 * j);
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                float32x4_t wv[TILE_NMAX];
#pragma GCC unroll 4
                for (int r = 0; r < NR; r++) {
                    uint32x4_t code = vandq_u32(vshlq_u32(v[r][c], shift), mask);
                    wv[r] = vfmaq_f32(zb[r], vcvtq_f32_u32(code), sc[r]);
                }
#pragma GCC unroll 8
                for (int i = 0; i < MR; i++) {
                    float32x4_t xv = vld1q_f32(x + (size_t)i * K + b * Q4_BLOCK + 16 * j + 4 * c);
#pragma GCC unroll 4
                    for (int r = 0; r < NR; r++) acc[c % U][i][r] = vfmaq_f32(acc[c % U][i][r], xv, wv[r]);
                }
            }
        }
        if (++bcount == qg.bpg) {
            bcount = 0;
            gbase += qg.gpb;
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            float32x4_t a = acc[0][i][r];
#pragma GCC unroll 4
            for (int u = 1; u < U; u++) a = vaddq_f32(a, acc[u][i][r]);
            job->y[(size_t)(m0 + i) * job->N + n0 + r] = vaddvq_f32(a);
        }
}

DEFINE_PANEL(panel_q4_neon, tile_q4_neon, 4, 2)
#endif

/* ---------------------------------------------------------------------------------------------
 * Selection and the parallel driver */
static const MmKernels mm_sets[MM_ISA_COUNT] = {
    [MM_ISA_SCALAR] = {panel_bf16_scalar, panel_f32_scalar, panel_q4_scalar},
#ifdef MM_HAVE_AVX2
    [MM_ISA_AVX2] = {panel_bf16_avx2, panel_f32_avx2, panel_q4_avx2},
#endif
#ifdef MM_HAVE_AVX512
    [MM_ISA_AVX512] = {panel_bf16_avx512, panel_f32_avx512, panel_q4_avx512},
#endif
#ifdef MM_HAVE_NEON
    [MM_ISA_NEON] = {panel_bf16_neon, panel_f32_neon, panel_q4_neon},
#endif
};

#if defined(MM_HAVE_AVX512)
#define MM_ISA_BEST MM_ISA_AVX512
#elif defined(MM_HAVE_AVX2)
#define MM_ISA_BEST MM_ISA_AVX2
#elif defined(MM_HAVE_NEON)
#define MM_ISA_BEST MM_ISA_NEON
#else
#define MM_ISA_BEST MM_ISA_SCALAR
#endif

static MmIsa mm_isa = MM_ISA_BEST;

const char *mm_isa_name(MmIsa isa) {
    static const char *const names[MM_ISA_COUNT] = {"scalar", "avx2", "avx512", "neon"};
    return (unsigned)isa < MM_ISA_COUNT ? names[isa] : "?";
}

int mm_isa_available(MmIsa isa) { return (unsigned)isa < MM_ISA_COUNT && mm_sets[isa].bf16 != NULL; }

int mm_select_isa(MmIsa isa, QErr *err) {
    if (!mm_isa_available(isa))
        return qerr_set(err, "mm_select_isa: kernel set '%s' is not in this build", mm_isa_name(isa));
    mm_isa = isa;
    return 0;
}

MmIsa mm_selected_isa(void) { return mm_isa; }

static void mm_task(void *ctx, int task, int thread) {
    (void)thread;
    const MmJob *job = ctx;
    int n0 = task * job->rows_per_task;
    job->panel(job, n0, imin(job->N, n0 + job->rows_per_task));
}

/* Splits N into tasks: at least 4 per thread for balance, at most ~256 KiB of weights each so a
 * task's weights stay in L2 while every row block of x passes over them; multiples of 8 rows so
 * tiles stay whole. */
static void mm_run(ThreadPool *pool, MmJob *job, size_t row_bytes) {
    if (job->M <= 0 || job->N <= 0 || job->K <= 0) return;
    int threads = pool ? tp_size(pool) : 1;
    long rows = (job->N + 4L * threads - 1) / (4L * threads);
    long cap = (long)((256u << 10) / (row_bytes ? row_bytes : 1));
    if (rows > cap) rows = cap;
    rows = (rows + 7) / 8 * 8;
    job->rows_per_task = (int)rows;
    int n_tasks = (int)((job->N + rows - 1) / rows);
    if (pool) tp_run(pool, n_tasks, mm_task, job);
    else
        for (int t = 0; t < n_tasks; t++) mm_task(job, t, 0);
}

void mm_f32_bf16(ThreadPool *pool, float *y, const float *x, const uint16_t *w, int M, int N, int K) {
    MmJob job = {y, x, w, M, N, K, 0, mm_sets[mm_isa].bf16};
    mm_run(pool, &job, (size_t)K * 2);
}

void mm_f32_f32(ThreadPool *pool, float *y, const float *x, const float *w, int M, int N, int K) {
    MmJob job = {y, x, w, M, N, K, 0, mm_sets[mm_isa].f32};
    mm_run(pool, &job, (size_t)K * 4);
}

void mm_f32_q4(ThreadPool *pool, float *y, const float *x, const Q4Weights *w, int M, int N, int K) {
    MmJob job = {y, x, w, M, N, K, 0, mm_sets[mm_isa].q4};
    mm_run(pool, &job, (size_t)K / 2 + (size_t)4 * (K / w->group));
}

/* ---------------------------------------------------------------------------------------------
 * Int4 layout */
int q4_check(int N, int K, int group, QErr *err) {
    if (N < 1) return qerr_set(err, "int4 weights: N (rows) must be >= 1, got %d", N);
    if (K < Q4_BLOCK || K % Q4_BLOCK != 0)
        return qerr_set(err, "int4 weights: K (columns) must be a positive multiple of %d, got %d",
                        Q4_BLOCK, K);
    if (!(group == 32 || group == 64 || (group > 0 && group % Q4_BLOCK == 0)) || K % group != 0)
        return qerr_set(err,
                        "int4 weights: group size %d unsupported for K = %d (need 32, 64 or a "
                        "multiple of 128 that divides K)",
                        group, K);
    return 0;
}

int q4_repack(uint8_t *codes, uint32_t *sz, const uint8_t *qweight, const uint16_t *scales,
              const uint16_t *zeros, int N, int K, int group, QErr *err) {
    if (q4_check(N, K, group, err) != 0) return -1;
    size_t n_blocks = (size_t)N * (K / Q4_BLOCK);
    for (size_t b = 0; b < n_blocks; b++) {
        const uint8_t *s = qweight + b * 64;
        uint8_t t[64] = {0};
        for (int c = 0; c < Q4_BLOCK; c++) {
            unsigned code = (s[c >> 1] >> ((c & 1) * 4)) & 15u;
            int j = c >> 4, d = c & 15;
            t[4 * d + (j >> 1)] |= (uint8_t)(code << ((j & 1) * 4));
        }
        memcpy(codes + b * 64, t, 64);
    }
    for (size_t i = 0; i < (size_t)N * (K / group); i++) sz[i] = (uint32_t)scales[i] | (uint32_t)zeros[i] << 16;
    return 0;
}

void q4_dequant_row(float *dst, const Q4Weights *w, int K, int n) {
    int G = K / w->group;
    const uint8_t *codes = w->codes + (size_t)n * (K / 2);
    for (int k = 0; k < K; k++) {
        uint32_t sz = w->sz[(size_t)n * G + k / w->group];
        float s = bf16_to_f32((uint16_t)sz), z = bf16_to_f32((uint16_t)(sz >> 16));
        dst[k] = ((float)q4_code(codes + (k / Q4_BLOCK) * 64, k % Q4_BLOCK) - 8.f) * s + z;
    }
}
