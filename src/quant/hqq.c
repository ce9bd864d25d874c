/* hqq.c — HQQ int4 quantization, reproducing torchao's CPU float32 path bit for bit.
 *
 * Why it is shaped this way: the point of quill's quantizer is that its checkpoints match the
 * ones torchao makes (../shared/reference holds torchao's output for the test models), so every
 * float operation follows the order torch evaluates the Python expressions in:
 *   - `15 / (max - min)` is Tensor.__rtruediv__, i.e. reciprocal(max - min) * 15 (two
 *     roundings; a plain division flips the rounded initial zero of a few groups per tensor);
 *   - `mean(..., axis=1)` over a group is torch's vectorised inner sum: vectors of 8 floats,
 *     vector v added into accumulator v % 4, the four accumulators combined left to right, then
 *     the 8 lanes left to right, then divided by the group size;
 *   - no fused multiply-adds (the file relies on ISO C's default of no contraction).
 * With this, codes, scales and zeros equal torchao's on every tensor of the reference models.
 *
 * The early stop is tensor-wide (the mean error of the whole matrix decides), so one iteration
 * is a parallel pass over all groups followed by a barrier. The pass re-reads the bf16 weights
 * instead of keeping a float32 copy: conversion is a shift, and memory stays at two floats per
 * group. The shrink operator's pow() only matters when |W - W_r| exceeds ~0.15, which a
 * quantization error can only reach for groups with a range above ~4.5 (it is bounded by half a
 * step, range / 30, unless a code is clamped); the vector loop tests for it and computes it per
 * lane only when needed. The price of exactness is a true division per weight per iteration. */
#include "quant/hqq.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "quant/q4.h"
#include "quant/q4_simd.h"
#include "util/bf16.h"

#define HQQ_BETA0 10.0
#define HQQ_KAPPA 1.01
#define HQQ_SCALE_MAX 2e4f
/* Rows per task: about 64K weights, enough to amortise a task hand-out, small enough to balance. */
#define HQQ_TASK_WEIGHTS 65536

/* torch computes pow(|E|, lp_norm - 1) with the exponent (0.7 - 1.0, a double) cast to float. */
static const float HQQ_POW = (float)(0.7 - 1.0);

typedef struct HqqJob {
    const uint16_t *w;
    int64_t rows, cols;
    int gs;
    int64_t gpr;           /* groups per row */
    int64_t rows_per_task;
    float *s, *z;          /* [rows * gpr]: the working scale (1/step) and zero of each group */
    double *task_err;      /* [n_tasks]: sum of |W - W_r| over the task's groups */
    int64_t *task_bad;     /* [n_tasks]: flat index of the task's first bad group, or -1 */
    float inv_beta;        /* (float)(1 / beta) of the current iteration */
    float thr;             /* below this |E| the shrink is certainly zero */
    uint8_t *codes;
    uint16_t *scales, *zeros;
} HqqJob;

/* sign(e) * relu(|e| - inv_beta * |e|^(p-1)), torch's _shrink_lp_op for one element. */
static float hqq_shrink(float e, float ae, float inv_beta) {
    float sh = ae - inv_beta * powf(ae, HQQ_POW);
    float r = sh > 0.0f ? sh : 0.0f;
    return e > 0.0f ? r : (e < 0.0f ? -r : 0.0f);
}

/* One proximal step for one group: updates *zp and returns the group's sum of |W - W_r| (W_r
 * with the zero before the update). This is the plain version, exact for any data; the vector
 * version below must agree with it bit for bit. */
static double hqq_group_step_scalar(const uint16_t *w, int gs, float s, float *zp, float inv_beta,
                                    float thr) {
    const float z = *zp;
    float acc[4][8] = {{0}}, eacc[8] = {0};
    for (int v = 0; v < gs / 8; v++) {
        for (int l = 0; l < 8; l++) {
            float x = bf16_to_f32(w[8 * v + l]);
            float q = rintf(x * s + z);
            q = q < 0.0f ? 0.0f : q;
            q = q > (float)Q4_QMAX ? (float)Q4_QMAX : q;
            float wr = (q - z) / s;
            float e = x - wr;
            float ae = fabsf(e);
            eacc[l] += ae;
            float u = ae >= thr ? x - hqq_shrink(e, ae, inv_beta) : x;
            acc[v & 3][l] += q - u * s;
        }
    }
    float sum = 0.0f;
    double err = 0.0;
    for (int l = 0; l < 8; l++) {
        sum += ((acc[0][l] + acc[1][l]) + acc[2][l]) + acc[3][l];
        err += eacc[l];
    }
    *zp = sum / (float)gs;
    return err;
}

#if defined(Q4_AVX2)
/* Wq - W * s for 8 weights (the shrink assumed zero); adds |W - W_r| to *eacc and ORs the lanes
 * where the shrink might not be zero into *over. */
static inline __m256 hqq_lane8(const uint16_t *w, __m256 S, __m256 Z, __m256 THR, __m256 *eacc,
                               __m256 *over) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 x = q4v_load_bf16(w);
    __m256 xs = _mm256_mul_ps(x, S);
    __m256 q = q4v_round_clamp(_mm256_add_ps(xs, Z));
    __m256 wr = _mm256_div_ps(_mm256_sub_ps(q, Z), S);
    __m256 ae = _mm256_and_ps(_mm256_sub_ps(x, wr), absmask);
    *eacc = _mm256_add_ps(*eacc, ae);
    *over = _mm256_or_ps(*over, _mm256_cmp_ps(ae, THR, _CMP_GE_OQ));
    return _mm256_sub_ps(q, xs);
}

/* The common case vectorised; a group where some |E| reaches the threshold is redone by the
 * scalar version, which evaluates the shrink. */
static double hqq_group_step(const uint16_t *w, int gs, float s, float *zp, float inv_beta,
                             float thr) {
    const __m256 S = _mm256_set1_ps(s), Z = _mm256_set1_ps(*zp), THR = _mm256_set1_ps(thr);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, eacc = a0, over = a0;
    for (int v = 0; v < gs; v += 32) {
        a0 = _mm256_add_ps(a0, hqq_lane8(w + v, S, Z, THR, &eacc, &over));
        a1 = _mm256_add_ps(a1, hqq_lane8(w + v + 8, S, Z, THR, &eacc, &over));
        a2 = _mm256_add_ps(a2, hqq_lane8(w + v + 16, S, Z, THR, &eacc, &over));
        a3 = _mm256_add_ps(a3, hqq_lane8(w + v + 24, S, Z, THR, &eacc, &over));
    }
    if (_mm256_movemask_ps(over)) return hqq_group_step_scalar(w, gs, s, zp, inv_beta, thr);
    __m256 p = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), a2), a3);
    float lanes[8], errs[8];
    _mm256_storeu_ps(lanes, p);
    _mm256_storeu_ps(errs, eacc);
    float sum = 0.0f;
    double err = 0.0;
    for (int l = 0; l < 8; l++) {
        sum += lanes[l];
        err += errs[l];
    }
    *zp = sum / (float)gs;
    return err;
}
#else
#define hqq_group_step hqq_group_step_scalar
#endif

/* Final codes of one group: clamp(round(W * s + z)), packed two per byte. */
static void hqq_group_codes(const uint16_t *w, int gs, float s, float z, uint8_t *codes) {
#if defined(Q4_AVX2)
    const __m256 S = _mm256_set1_ps(s), Z = _mm256_set1_ps(z);
    for (int i = 0; i < gs; i += 8)
        q4v_store_codes(codes + i / 2,
                        q4v_round_clamp(_mm256_add_ps(_mm256_mul_ps(q4v_load_bf16(w + i), S), Z)));
#else
    for (int i = 0; i < gs; i += 2) {
        float q0 = rintf(bf16_to_f32(w[i]) * s + z), q1 = rintf(bf16_to_f32(w[i + 1]) * s + z);
        q0 = q0 < 0.0f ? 0.0f : (q0 > (float)Q4_QMAX ? (float)Q4_QMAX : q0);
        q1 = q1 < 0.0f ? 0.0f : (q1 > (float)Q4_QMAX ? (float)Q4_QMAX : q1);
        codes[i / 2] = (uint8_t)((unsigned)q0 | ((unsigned)q1 << 4));
    }
#endif
}

static void task_rows(const HqqJob *j, int task, int64_t *r0, int64_t *r1) {
    *r0 = (int64_t)task * j->rows_per_task;
    *r1 = *r0 + j->rows_per_task < j->rows ? *r0 + j->rows_per_task : j->rows;
}

/* Initial scale and (rounded) zero of every group from its min and max; finds non-finite data. */
static void hqq_init_task(void *ctx, int task, int thread) {
    (void)thread;
    HqqJob *j = ctx;
    int64_t r0, r1;
    task_rows(j, task, &r0, &r1);
    j->task_bad[task] = -1;
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t g = 0; g < j->gpr; g++) {
            const uint16_t *w = j->w + r * j->cols + g * j->gs;
            float mn, mx;
            int bad = q4_group_minmax(w, j->gs, &mn, &mx);
            float range = mx - mn;
            if (bad >= 0 || !isfinite(range)) {
                if (j->task_bad[task] < 0) j->task_bad[task] = r * j->gpr + g;
                continue;
            }
            float s = (1.0f / range) * (float)Q4_QMAX; /* inf for a constant group */
            s = s < HQQ_SCALE_MAX ? s : HQQ_SCALE_MAX;
            j->s[r * j->gpr + g] = s;
            j->z[r * j->gpr + g] = rintf(-mn * s);
        }
    }
}

static void hqq_iter_task(void *ctx, int task, int thread) {
    (void)thread;
    HqqJob *j = ctx;
    int64_t r0, r1;
    task_rows(j, task, &r0, &r1);
    double err = 0.0;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t g = 0; g < j->gpr; g++) {
            int64_t k = r * j->gpr + g;
            err += hqq_group_step(j->w + r * j->cols + g * j->gs, j->gs, j->s[k], &j->z[k],
                                  j->inv_beta, j->thr);
        }
    j->task_err[task] = err;
}

/* Final codes with the last zero, then torchao's conversion to the tinygemm convention:
 * scale = 1 / s, zero = (8 - z) * scale, both rounded to bf16. */
static void hqq_final_task(void *ctx, int task, int thread) {
    (void)thread;
    HqqJob *j = ctx;
    int64_t r0, r1;
    task_rows(j, task, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        uint8_t *crow = j->codes + r * (j->cols / 2);
        for (int64_t g = 0; g < j->gpr; g++) {
            int64_t k = r * j->gpr + g;
            const float s = j->s[k], z = j->z[k];
            hqq_group_codes(j->w + r * j->cols + g * j->gs, j->gs, s, z, crow + g * j->gs / 2);
            float scale = 1.0f / s;
            j->scales[k] = f32_to_bf16_rne(scale);
            j->zeros[k] = f32_to_bf16_rne(((float)Q4_MID - z) * scale);
        }
    }
}

/* Names the first non-finite weight of flat group k, or the group whose range overflows. */
static void bad_group_error(const HqqJob *j, int64_t k, QErr *err) {
    int64_t r = k / j->gpr, c0 = (k % j->gpr) * j->gs;
    const uint16_t *w = j->w + r * j->cols + c0;
    for (int i = 0; i < j->gs; i++)
        if ((w[i] & 0x7f80) == 0x7f80) {
            qerr_set(err, "weight at row %lld, column %lld is not finite", (long long)r,
                     (long long)(c0 + i));
            return;
        }
    qerr_set(err, "weights at row %lld, columns %lld..%lld: max - min overflows float32",
             (long long)r, (long long)c0, (long long)(c0 + j->gs - 1));
}

static void run_tasks(ThreadPool *pool, int n_tasks, TpTaskFn fn, HqqJob *j) {
    if (pool) {
        tp_run(pool, n_tasks, fn, j);
    } else {
        for (int t = 0; t < n_tasks; t++) fn(j, t, 0);
    }
}

int hqq_quantize_bf16(const uint16_t *w, int64_t rows, int64_t cols, int group_size,
                      ThreadPool *pool, uint8_t *codes, uint16_t *scales, uint16_t *zeros,
                      int *iters_out, QErr *err) {
    if (q4_check_shape(rows, cols, group_size, err)) return -1;
    HqqJob j = {.w = w, .rows = rows, .cols = cols, .gs = group_size, .gpr = cols / group_size,
                .codes = codes, .scales = scales, .zeros = zeros};
    j.rows_per_task = cols >= HQQ_TASK_WEIGHTS ? 1 : HQQ_TASK_WEIGHTS / cols;
    int64_t n_tasks64 = (rows + j.rows_per_task - 1) / j.rows_per_task;
    if (n_tasks64 > 0x7fffffff) return qerr_set(err, "hqq: matrix of %lld rows is too large",
                                                (long long)rows);
    int n_tasks = (int)n_tasks64;
    size_t n_groups = (size_t)rows * (size_t)j.gpr;
    j.s = malloc(n_groups * sizeof *j.s);
    j.z = malloc(n_groups * sizeof *j.z);
    j.task_err = malloc((size_t)n_tasks * sizeof *j.task_err);
    j.task_bad = malloc((size_t)n_tasks * sizeof *j.task_bad);
    int rc = -1;
    if (!j.s || !j.z || !j.task_err || !j.task_bad) {
        qerr_set(err, "hqq: out of memory for %zu groups", n_groups);
        goto out;
    }

    run_tasks(pool, n_tasks, hqq_init_task, &j);
    for (int t = 0; t < n_tasks; t++)
        if (j.task_bad[t] >= 0) {
            bad_group_error(&j, j.task_bad[t], err);
            goto out;
        }

    double beta = HQQ_BETA0, best = 1e4;
    int iters = 0;
    while (iters < HQQ_MAX_ITERS) {
        double inv_beta = 1.0 / beta;
        j.inv_beta = (float)inv_beta;
        /* A non-zero shrink needs |E| > inv_beta * |E|^(p-1), i.e. |E| > inv_beta^(1/(2-p));
         * below half that bound the difference is negative by far more than any rounding. */
        j.thr = (float)(0.5 * pow(inv_beta, 1.0 / (2.0 - 0.7)));
        run_tasks(pool, n_tasks, hqq_iter_task, &j);
        beta *= HQQ_KAPPA;
        iters++;
        double total = 0.0;
        for (int t = 0; t < n_tasks; t++) total += j.task_err[t];
        /* torch takes the mean in float32 and compares it as a Python float */
        double cur = (float)(total / ((double)rows * (double)cols));
        if (cur < best)
            best = cur;
        else
            break; /* keeps the zero update just made, as torchao does */
    }
    run_tasks(pool, n_tasks, hqq_final_task, &j);
    if (iters_out) *iters_out = iters;
    rc = 0;
out:
    free(j.s);
    free(j.z);
    free(j.task_err);
    free(j.task_bad);
    return rc;
}
