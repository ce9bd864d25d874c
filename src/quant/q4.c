/* q4.c — shape rules, algorithm names, dispatch, and the float dequantization the int4 checkpoint
 * spec defines. The dequantization here is the plain reference one (used for error measurement
 * and tests); backends repack and dequantize in their own kernels. */
#include "quant/q4.h"

#include <math.h>
#include <string.h>

#include "quant/hqq.h"
#include "quant/minmax.h"
#include "quant/q4_simd.h"
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

typedef struct RelErrJob {
    const uint16_t *w;
    int64_t rows, cols, rows_per_task;
    int gs;
    const uint8_t *codes;
    const uint16_t *scales, *zeros;
    double *num, *den; /* [n_tasks] */
} RelErrJob;

/* Sums of (dequant - w)^2 and w^2 over one group: per 8-lane float accumulators, then double. */
static void group_sq_sums(const uint16_t *w, const uint8_t *c, int gs, float s, float z,
                          double *num, double *den) {
    float dl[8] = {0}, wl[8] = {0};
#if defined(Q4_AVX2)
    const __m256 S = _mm256_set1_ps(s), Z = _mm256_set1_ps(z), MID = _mm256_set1_ps(Q4_MID);
    __m256 dacc = _mm256_setzero_ps(), wacc = dacc;
    for (int i = 0; i < gs; i += 8) {
        __m256 x = q4v_load_bf16(w + i);
        __m256 q = _mm256_sub_ps(q4v_load_codes(c + i / 2), MID);
        __m256 deq = _mm256_add_ps(_mm256_mul_ps(q, S), Z);
        __m256 d = _mm256_sub_ps(deq, x);
        dacc = _mm256_add_ps(dacc, _mm256_mul_ps(d, d));
        wacc = _mm256_add_ps(wacc, _mm256_mul_ps(x, x));
    }
    _mm256_storeu_ps(dl, dacc);
    _mm256_storeu_ps(wl, wacc);
#else
    for (int i = 0; i < gs; i += 8)
        for (int l = 0; l < 8; l++) {
            int k = i + l;
            float x = bf16_to_f32(w[k]);
            float d = ((float)(((c[k / 2] >> (4 * (k & 1))) & 0xf) - Q4_MID) * s + z) - x;
            dl[l] += d * d;
            wl[l] += x * x;
        }
#endif
    for (int l = 0; l < 8; l++) {
        *num += dl[l];
        *den += wl[l];
    }
}

static void rel_error_task(void *ctx, int task, int thread) {
    (void)thread;
    const RelErrJob *j = ctx;
    const int64_t gpr = j->cols / j->gs;
    int64_t r0 = (int64_t)task * j->rows_per_task;
    int64_t r1 = r0 + j->rows_per_task < j->rows ? r0 + j->rows_per_task : j->rows;
    double num = 0.0, den = 0.0;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t g = 0; g < gpr; g++)
            group_sq_sums(j->w + r * j->cols + g * j->gs,
                          j->codes + r * (j->cols / 2) + g * j->gs / 2, j->gs,
                          bf16_to_f32(j->scales[r * gpr + g]), bf16_to_f32(j->zeros[r * gpr + g]),
                          &num, &den);
    j->num[task] = num;
    j->den[task] = den;
}

double q4_rel_error(const uint16_t *w, int64_t rows, int64_t cols, int group_size,
                    const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros,
                    ThreadPool *pool) {
    /* Fixed partition (not per thread) so the sum's order, and so the result, is reproducible. */
    enum { TASKS = 64 };
    if (rows < 1 || cols < 1) return 0.0;
    double num[TASKS] = {0}, den[TASKS] = {0};
    RelErrJob j = {.w = w, .rows = rows, .cols = cols, .gs = group_size, .codes = codes,
                   .scales = scales, .zeros = zeros, .num = num, .den = den};
    j.rows_per_task = (rows + TASKS - 1) / TASKS;
    int n_tasks = (int)((rows + j.rows_per_task - 1) / j.rows_per_task);
    if (pool)
        tp_run(pool, n_tasks, rel_error_task, &j);
    else
        for (int t = 0; t < n_tasks; t++) rel_error_task(&j, t, 0);
    double n = 0.0, d = 0.0;
    for (int t = 0; t < n_tasks; t++) {
        n += num[t];
        d += den[t];
    }
    return d > 0.0 ? sqrt(n / d) : (n > 0.0 ? INFINITY : 0.0);
}
