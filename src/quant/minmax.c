/* minmax.c — int4 quantization with torchao's plain tinygemm scale and zero.
 *
 * Why it exists: it is the baseline HQQ is measured against, and what torchao's int4 weight-only
 * recipe does when HQQ is not asked for. torchao computes it on the bf16 weight tensor, so every
 * step is a bf16 tensor operation: the float result of each op is rounded to bf16 before the next
 * (range, range / 15, 8 * scale, min + 8 * scale, and when quantizing w - (zero - 8 * scale) and
 * its quotient by the scale). This file replays exactly those roundings; computing in float32
 * throughout would give visibly different codes (a relative error of 0.0999 instead of torchao's
 * 0.1004 on ../shared's trained model). eps = 1e-6 is the clamp torchao's CPU int4 layout uses.
 * One pass over the weights; no state beyond the outputs. */
#include "quant/minmax.h"

#include <math.h>
#include <stdlib.h>

#include "quant/q4.h"
#include "quant/q4_simd.h"
#include "util/bf16.h"

#define MINMAX_EPS 1e-6f
#define MINMAX_TASK_WEIGHTS 65536

typedef struct MinmaxJob {
    const uint16_t *w;
    int64_t rows, cols, gpr, rows_per_task;
    int gs;
    uint8_t *codes;
    uint16_t *scales, *zeros;
    int64_t *task_bad; /* flat index of the task's first non-finite weight, or -1 */
} MinmaxJob;

/* The bf16 rounding every torch bf16 op applies to its float result. */
static inline float bf16r(float x) { return bf16_to_f32(f32_to_bf16_rne(x)); }

/* Codes of one group: clamp(round(bf16(bf16(w - lo) / scale)), 0, 15), two per byte. */
static void minmax_group_codes(const uint16_t *w, int gs, float lo, float scale, uint8_t *codes) {
#if defined(Q4_AVX2)
    const __m256 LO = _mm256_set1_ps(lo), S = _mm256_set1_ps(scale);
    for (int i = 0; i < gs; i += 8) {
        __m256 a = q4v_round_bf16(_mm256_sub_ps(q4v_load_bf16(w + i), LO));
        q4v_store_codes(codes + i / 2, q4v_round_clamp(q4v_round_bf16(_mm256_div_ps(a, S))));
    }
#else
    for (int i = 0; i < gs; i += 2) {
        float q0 = rintf(bf16r(bf16r(bf16_to_f32(w[i]) - lo) / scale));
        float q1 = rintf(bf16r(bf16r(bf16_to_f32(w[i + 1]) - lo) / scale));
        q0 = q0 < 0.0f ? 0.0f : (q0 > (float)Q4_QMAX ? (float)Q4_QMAX : q0);
        q1 = q1 < 0.0f ? 0.0f : (q1 > (float)Q4_QMAX ? (float)Q4_QMAX : q1);
        codes[i / 2] = (uint8_t)((unsigned)q0 | ((unsigned)q1 << 4));
    }
#endif
}

static void minmax_task(void *ctx, int task, int thread) {
    (void)thread;
    MinmaxJob *j = ctx;
    int64_t r0 = (int64_t)task * j->rows_per_task;
    int64_t r1 = r0 + j->rows_per_task < j->rows ? r0 + j->rows_per_task : j->rows;
    j->task_bad[task] = -1;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t g = 0; g < j->gpr; g++) {
            const uint16_t *w = j->w + r * j->cols + g * j->gs;
            float mn, mx;
            int bad = q4_group_minmax(w, j->gs, &mn, &mx);
            if (bad >= 0) {
                if (j->task_bad[task] < 0) j->task_bad[task] = r * j->cols + g * j->gs + bad;
                continue;
            }
            float scale = bf16r(bf16r(mx - mn) / 15.0f);
            if (scale < MINMAX_EPS) scale = bf16r(MINMAX_EPS);
            float mid = bf16r(scale * (float)Q4_MID);
            float zero = bf16r(mn + mid);
            float lo = bf16r(zero - mid); /* torchao's min_val, recomputed from the bf16 zero */
            minmax_group_codes(w, j->gs, lo, scale, j->codes + r * (j->cols / 2) + g * j->gs / 2);
            j->scales[r * j->gpr + g] = f32_to_bf16_rne(scale);
            j->zeros[r * j->gpr + g] = f32_to_bf16_rne(zero);
        }
    }
}

int minmax_quantize_bf16(const uint16_t *w, int64_t rows, int64_t cols, int group_size,
                         ThreadPool *pool, uint8_t *codes, uint16_t *scales, uint16_t *zeros,
                         QErr *err) {
    if (q4_check_shape(rows, cols, group_size, err)) return -1;
    MinmaxJob j = {.w = w, .rows = rows, .cols = cols, .gpr = cols / group_size,
                   .gs = group_size, .codes = codes, .scales = scales, .zeros = zeros};
    j.rows_per_task = cols >= MINMAX_TASK_WEIGHTS ? 1 : MINMAX_TASK_WEIGHTS / cols;
    int64_t n_tasks64 = (rows + j.rows_per_task - 1) / j.rows_per_task;
    if (n_tasks64 > 0x7fffffff)
        return qerr_set(err, "minmax: matrix of %lld rows is too large", (long long)rows);
    int n_tasks = (int)n_tasks64;
    int64_t *bad = malloc((size_t)n_tasks * sizeof *bad);
    if (!bad) return qerr_set(err, "minmax: out of memory");
    j.task_bad = bad;
    if (pool)
        tp_run(pool, n_tasks, minmax_task, &j);
    else
        for (int t = 0; t < n_tasks; t++) minmax_task(&j, t, 0);
    int rc = 0;
    for (int t = 0; t < n_tasks && !rc; t++)
        if (bad[t] >= 0)
            rc = qerr_set(err, "weight at row %lld, column %lld is not finite",
                          (long long)(bad[t] / cols), (long long)(bad[t] % cols));
    free(bad);
    return rc;
}
