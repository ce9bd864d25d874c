/* matmul.h — the CPU backend's matrix products: y = x · Wᵀ for float32 activations against
 * bf16, float32 or int4 weights, spread over a thread pool.
 *
 * Every product here is  y[m][n] = sum_k x[m][k] * W[n][k]  with x [M][K] and y [M][N]
 * row-major float32 and W [N][K] row-major (the safetensors layout of a Linear weight). Sums are
 * accumulated in float32. Decode (M = 1) is bound by reading W; prefill (M up to a few hundred)
 * reuses each block of W for all rows of x while it sits in cache.
 *
 * Int4 weights follow ../shared/spec/int4-checkpoint.md — w = (q - 8) * scale + zero per group —
 * except that the tensors are repacked once at load time by q4_repack() into the order the
 * kernels read (see Q4Weights). */
#ifndef QUILL_CPU_MATMUL_H
#define QUILL_CPU_MATMUL_H

#include <stddef.h>
#include <stdint.h>

#include "util/qerr.h"
#include "util/threadpool.h"

/* Int4 weights of a [N][K] linear layer, group size `group` along K, in the layout q4_repack()
 * writes. Pointers are borrowed (the backend owns the memory). K must be a multiple of 128 and
 * of the group (q4_check).
 *
 * codes: N * K / 2 bytes. Each row is K/128 blocks of 64 bytes; in a block, 32-bit little-endian
 *        word d (d = 0..15) holds in bits 4j..4j+3 the code of column 16*j + d of the block
 *        (j = 0..7). Lane d of "word >> 4j" is then column 16j + d, so a vector of 16 words
 *        yields 16 consecutive columns per shift.
 * sz:    [N][K / group] 32-bit words: the group's bf16 scale in bits 0..15, its bf16 zero in bits
 *        16..31 (one load gives both; one stream instead of two). */
typedef struct Q4Weights {
    const uint8_t *codes;
    const uint32_t *sz;
    int group;
} Q4Weights;

/* Checks that int4 weights of shape [N][K] with this group size can be used by these kernels:
 * N >= 1, K a positive multiple of 128, group one of 32, 64 or a multiple of 128 dividing K.
 * Returns 0, or -1 with a message in err. */
int q4_check(int N, int K, int group, QErr *err);

/* Converts checkpoint tensors (../shared/spec/int4-checkpoint.md) into the kernel layout:
 * qweight U8 [N][K/2] (column 2j in the low nibble of byte j) into codes (N*K/2 bytes; codes ==
 * qweight converts in place, other overlaps are not allowed), and scales and zeros, bf16
 * [N][K/group], into sz (N*(K/group) words). Returns 0, or -1 with a message in err when
 * q4_check(N, K, group) fails (nothing is written then). */
int q4_repack(uint8_t *codes, uint32_t *sz, const uint8_t *qweight, const uint16_t *scales,
              const uint16_t *zeros, int N, int K, int group, QErr *err);

/* Writes row n of the dequantized weight (K floats, (q - 8) * scale + zero in float32) to dst,
 * reading the repacked layout: for a tied, quantized embedding, and as the int4 oracle in tests. */
void q4_dequant_row(float *dst, const Q4Weights *w, int K, int n);

/* The products. y must not overlap x or W. The caller's thread and the pool's workers all take
 * part; pool may be NULL (runs on the calling thread). M, N, K >= 1 (nothing is done otherwise).
 * The int4 variant requires q4_check(N, K, w->group) == 0. They cannot fail. */
void mm_f32_bf16(ThreadPool *pool, float *y, const float *x, const uint16_t *w, int M, int N, int K);
void mm_f32_f32(ThreadPool *pool, float *y, const float *x, const float *w, int M, int N, int K);
void mm_f32_q4(ThreadPool *pool, float *y, const float *x, const Q4Weights *w, int M, int N, int K);

/* Instruction sets the kernels are written for; which ones exist in a build depends on the
 * compile target (-march=native gives the host's best). */
typedef enum MmIsa {
    MM_ISA_SCALAR, /* portable C, always present */
    MM_ISA_AVX2,   /* AVX2 + FMA */
    MM_ISA_AVX512, /* AVX-512F */
    MM_ISA_NEON,   /* aarch64 Advanced SIMD */
    MM_ISA_COUNT
} MmIsa;

/* "scalar", "avx2", "avx512" or "neon" ("?" for an out-of-range value). */
const char *mm_isa_name(MmIsa isa);

/* 1 if this build contains kernels for isa (and so the host runs them), else 0. */
int mm_isa_available(MmIsa isa);

/* The set of kernels mm_* use from now on, process-wide; the default is the best available one.
 * For tests and benchmarks that compare kernels: not to be called while a product runs. Returns
 * 0, or -1 with a message in err if isa is not in this build. */
int mm_select_isa(MmIsa isa, QErr *err);

/* The set of kernels currently in use. */
MmIsa mm_selected_isa(void);

#endif
