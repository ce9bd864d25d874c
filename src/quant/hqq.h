/* hqq.h — int4 quantization with HQQ (half-quadratic quantization) as torchao computes it on a
 * CPU (`_choose_qparams_and_quantize_affine_hqq`, float32, axis 1, 4 bits), described in
 * ../shared/spec/int4-checkpoint.md. The layout of the outputs is q4.h's. */
#ifndef QUILL_HQQ_H
#define QUILL_HQQ_H

#include <stdint.h>

#include "util/qerr.h"
#include "util/threadpool.h"

/* At most this many proximal iterations; fewer when the tensor-wide error stops falling. */
#define HQQ_MAX_ITERS 20

/* Quantizes w[rows][cols] (bf16, row-major) in groups of group_size consecutive columns into
 * caller-owned codes (rows*cols/2 bytes), scales and zeros (rows*(cols/group_size) bf16 each).
 * The early stop is tensor-wide, so every iteration covers the whole matrix and ends with a
 * barrier; rows are spread over `pool` (NULL: the calling thread), with results independent of
 * the thread count. Memory beyond the outputs: two floats per group. If iters_out is non-NULL it
 * receives the number of iterations run. Returns 0, or -1 with err set (bad shape: see
 * q4_check_shape; a weight that is not finite; out of memory). */
int hqq_quantize_bf16(const uint16_t *w, int64_t rows, int64_t cols, int group_size,
                      ThreadPool *pool, uint8_t *codes, uint16_t *scales, uint16_t *zeros,
                      int *iters_out, QErr *err);

#endif
