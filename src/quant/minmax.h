/* minmax.h — int4 quantization with torchao's plain tinygemm choice of scale and zero
 * (`_choose_qparams_affine_tinygemm` + `_quantize_affine_tinygemm`, asymmetric, eps 1e-6, bf16
 * scale and zero): per group scale = (max - min) / 15, zero = min + 8 * scale. The layout of the
 * outputs is q4.h's. */
#ifndef QUILL_MINMAX_H
#define QUILL_MINMAX_H

#include <stdint.h>

#include "util/qerr.h"
#include "util/threadpool.h"

/* Same contract as hqq_quantize_bf16 (q4.h layout, caller-owned outputs, `pool` may be NULL,
 * result independent of the thread count). Returns 0, or -1 with err set (bad shape; a weight
 * that is not finite). */
int minmax_quantize_bf16(const uint16_t *w, int64_t rows, int64_t cols, int group_size,
                         ThreadPool *pool, uint8_t *codes, uint16_t *scales, uint16_t *zeros,
                         QErr *err);

#endif
