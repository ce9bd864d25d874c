/* q4.h — the int4 weight layout of ../shared/spec/int4-checkpoint.md and what every int4
 * quantizer shares: shape rules, the choice of algorithm, dequantization and error measurement.
 *
 * A quantized matrix W[rows][cols] (rows = out_features, cols = in_features) is three arrays:
 *   codes  [rows][cols/2]            uint8: byte j of a row holds column 2j in its low nibble,
 *                                    column 2j+1 in its high nibble; values 0..15
 *   scales [rows][cols/group_size]   bf16 (as uint16_t bits)
 *   zeros  [rows][cols/group_size]   bf16
 * and w[r][c] = (q[r][c] - 8) * scales[r][c / group_size] + zeros[r][c / group_size]. */
#ifndef QUILL_Q4_H
#define QUILL_Q4_H

#include <stdint.h>

#include "util/qerr.h"
#include "util/threadpool.h"

#define Q4_QMAX 15 /* codes are 0..Q4_QMAX */
#define Q4_MID 8   /* the code that dequantizes to `zero` */

typedef enum Q4Algorithm {
    Q4_HQQ,    /* half-quadratic optimisation of the zero point (torchao's HQQ), the default */
    Q4_MINMAX, /* torchao's plain tinygemm choice: scale = (max - min) / 15, zero at the middle */
} Q4Algorithm;

/* "hqq" / "minmax" (the names config.json's quantization_config uses). */
const char *q4_algorithm_name(Q4Algorithm alg);
/* Parses "hqq" or "minmax"; returns -1 (err names the value and the choices) otherwise. */
int q4_algorithm_from_name(const char *name, Q4Algorithm *out, QErr *err);

/* Checks that a [rows, cols] matrix can be quantized in groups of group_size: rows >= 1,
 * group_size one of 32, 64, 128, 256 (the sizes torchao's int4 layouts support), cols a
 * positive multiple of group_size. Returns 0, or -1 with err naming the violated rule. */
int q4_check_shape(int64_t rows, int64_t cols, int group_size, QErr *err);

/* Quantizes the bf16 matrix w[rows][cols] (row-major) with the chosen algorithm into caller-owned
 * codes (rows*cols/2 bytes), scales and zeros (rows*(cols/group_size) bf16 each). Work is spread
 * over `pool` (NULL: the calling thread only); the result does not depend on the thread count.
 * Returns 0, or -1 with err set for a bad shape or a weight that is not finite (row and column
 * named); outputs are then unspecified. */
int q4_quantize_bf16(Q4Algorithm alg, const uint16_t *w, int64_t rows, int64_t cols,
                     int group_size, ThreadPool *pool, uint8_t *codes, uint16_t *scales,
                     uint16_t *zeros, QErr *err);

/* Dequantizes one row of `cols` weights (codes: cols/2 bytes; scales, zeros: cols/group_size
 * entries) into dst, in float32 as the spec writes it: (q - 8) * scale + zero. The shape must
 * pass q4_check_shape (here and in q4_rel_error). Cannot fail. */
void q4_dequantize_row(const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros,
                       int64_t cols, int group_size, float *dst);

/* Relative L2 error ||dequant(codes, scales, zeros) - w|| / ||w|| of a whole quantized matrix
 * (dequantized in float32 as q4_dequantize_row does; squares summed in float within a group, in
 * double across groups; 0 when both are all zeros). Rows are spread over `pool` (NULL: the
 * calling thread); the result does not depend on the thread count. Cannot fail. */
double q4_rel_error(const uint16_t *w, int64_t rows, int64_t cols, int group_size,
                    const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros,
                    ThreadPool *pool);

#endif
