/* q4.c — shape rules, algorithm names, dispatch, and the float dequantization the int4 checkpoint
 * spec defines. The dequantization here is the plain reference one (used for error measurement
 * and tests); backends repack and dequantize in their own kernels. */
#include "quant/q4.h"

#include <math.h>
#include <string.h>

#include "quant/hqq.h"
#include "quant/minmax.h"
#include "util/bf16.h"

const char *q4_algorithm_name(Q4Algorithm alg) { return alg == Q4_MINMAX ? "minmax" : "hqq"; }

int q4_algorithm_from_name(const char *name, Q4Algorithm *out, QErr *err) {
    if (!strcmp(name, "hqq")) {
        *out = Q4_HQQ;
        return 0;
    }
    if (!strcmp(name, "minmax")) {
        *out = Q4_MINMAX;
        return 0;
    }
    return qerr_set(err, "unknown quantization algorithm '%s' (expected hqq or minmax)", name);
}

int q4_check_shape(int64_t rows, int64_t cols, int group_size, QErr *err) {
    if (group_size != 32 && group_size != 64 && group_size != 128 && group_size != 256)
        return qerr_set(err, "group size %d is not one of 32, 64, 128, 256", group_size);
    if (rows < 1 || cols < 1)
        return qerr_set(err, "shape [%lld, %lld] has no weights", (long long)rows,
                        (long long)cols);
    if (cols % group_size)
        return qerr_set(err, "in_features %lld is not a multiple of the group size %d",
                        (long long)cols, group_size);
    return 0;
}

int q4_quantize_bf16(Q4Algorithm alg, const uint16_t *w, int64_t rows, int64_t cols,
                     int group_size, ThreadPool *pool, uint8_t *codes, uint16_t *scales,
                     uint16_t *zeros, QErr *err) {
    if (alg == Q4_MINMAX)
        return minmax_quantize_bf16(w, rows, cols, group_size, pool, codes, scales, zeros, err);
    return hqq_quantize_bf16(w, rows, cols, group_size, pool, codes, scales, zeros, NULL, err);
}

void q4_dequantize_row(const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros,
                       int64_t cols, int group_size, float *dst) {
    for (int64_t c = 0; c < cols; c++) {
        int q = (codes[c / 2] >> (4 * (c & 1))) & 0xf;
        float s = bf16_to_f32(scales[c / group_size]), z = bf16_to_f32(zeros[c / group_size]);
        dst[c] = (float)(q - Q4_MID) * s + z;
    }
}

double q4_rel_error(const uint16_t *w, int64_t rows, int64_t cols, int group_size,
                    const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros) {
    const int64_t gpr = cols / group_size;
    double num = 0.0, den = 0.0;
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *c = codes + r * (cols / 2);
        for (int64_t g = 0; g < gpr; g++) {
            double s = bf16_to_f32(scales[r * gpr + g]), z = bf16_to_f32(zeros[r * gpr + g]);
            for (int i = 0; i < group_size; i++) {
                int64_t k = g * group_size + i;
                int q = (c[k / 2] >> (4 * (k & 1))) & 0xf;
                double x = bf16_to_f32(w[r * cols + k]);
                double d = (double)(float)((float)(q - Q4_MID) * (float)s + (float)z) - x;
                num += d * d;
                den += x * x;
            }
        }
    }
    return den > 0.0 ? sqrt(num / den) : (num > 0.0 ? INFINITY : 0.0);
}
