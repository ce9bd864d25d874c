/* test_hqq.c — the int4 quantizers (HQQ, minmax) against plain scalar oracles written here from
 * the spec (../shared/spec/int4-checkpoint.md) and torchao's order of float operations, on
 * synthetic matrices chosen for their edge cases: odd group counts, every group size, constant
 * and all-zero groups, ranges small enough to hit the 2e4 scale clamp, ranges large enough to
 * make the shrink operator non-zero, outliers. The library's vectorised, threaded code must
 * agree with the oracles bit for bit and must not depend on the thread count. Parity with
 * torchao itself on the reference models is tests/e2e/test_quantize.py. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "quant/hqq.h"
#include "quant/minmax.h"
#include "quant/q4.h"
#include "../test_util.h"
#include "util/bf16.h"

/* ---------------------------------------------------------------------------- test data */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double uniform(void) {
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}

/* Roughly normal (Irwin-Hall of 4), scaled; a fraction of values multiplied by 8. */
static void fill_random(uint16_t *w, size_t n, double sd, double outliers) {
    for (size_t i = 0; i < n; i++) {
        double x = (uniform() + uniform() + uniform() + uniform() - 2.0) * 1.7320508075688772;
        if (uniform() < outliers) x *= 8.0;
        w[i] = f32_to_bf16_rne((float)(sd * x));
    }
}

/* ---------------------------------------------------------------------------- oracles */

/* torch's float32 sum of a contiguous group: 8-float vectors, vector v into accumulator v % 4,
 * accumulators combined left to right, then the 8 lanes left to right. */
static float torch_group_sum(const float *t, int gs) {
    float acc[4][8] = {{0}};
    for (int v = 0; v < gs / 8; v++)
        for (int l = 0; l < 8; l++) acc[v % 4][l] += t[8 * v + l];
    float sum = 0.0f;
    for (int l = 0; l < 8; l++) sum += ((acc[0][l] + acc[1][l]) + acc[2][l]) + acc[3][l];
    return sum;
}

static float clampq(float q) { return q < 0.0f ? 0.0f : (q > 15.0f ? 15.0f : q); }

/* HQQ exactly as written in the spec and in torchao, with no shortcuts. */
static int ref_hqq(const uint16_t *w, int rows, int cols, int gs, uint8_t *codes,
                   uint16_t *scales, uint16_t *zeros) {
    int gpr = cols / gs, ng = rows * gpr;
    float *s = malloc(ng * sizeof *s), *z = malloc(ng * sizeof *z), *t = malloc(gs * sizeof *t);
    for (int k = 0; k < ng; k++) {
        const uint16_t *g = w + (k / gpr) * cols + (k % gpr) * gs;
        float mn = bf16_to_f32(g[0]), mx = mn;
        for (int i = 0; i < gs; i++) {
            mn = fminf(mn, bf16_to_f32(g[i]));
            mx = fmaxf(mx, bf16_to_f32(g[i]));
        }
        s[k] = fminf((1.0f / (mx - mn)) * 15.0f, 2e4f); /* torch: reciprocal(max - min) * 15 */
        z[k] = rintf(-mn * s[k]);
    }
    double beta = 10.0, best = 1e4;
    int iters = 0;
    while (iters < 20) {
        float inv_beta = (float)(1.0 / beta);
        double err = 0.0;
        for (int k = 0; k < ng; k++) {
            const uint16_t *g = w + (k / gpr) * cols + (k % gpr) * gs;
            for (int i = 0; i < gs; i++) {
                float x = bf16_to_f32(g[i]);
                float q = clampq(rintf(x * s[k] + z[k]));
                float wr = (q - z[k]) / s[k];
                float e = x - wr;
                float r = fmaxf(fabsf(e) - inv_beta * powf(fabsf(e), (float)(0.7 - 1.0)), 0.0f);
                float we = (e > 0.0f ? 1.0f : (e < 0.0f ? -1.0f : 0.0f)) * r;
                t[i] = q - (x - we) * s[k];
                err += fabsf(x - wr);
            }
            z[k] = torch_group_sum(t, gs) / (float)gs;
        }
        beta *= 1.01;
        iters++;
        double cur = (float)(err / ((double)rows * cols));
        if (cur < best)
            best = cur;
        else
            break;
    }
    for (int k = 0; k < ng; k++) {
        int r = k / gpr, c0 = (k % gpr) * gs;
        for (int i = 0; i < gs; i++) {
            int c = c0 + i;
            unsigned q = (unsigned)clampq(rintf(bf16_to_f32(w[r * cols + c]) * s[k] + z[k]));
            uint8_t *b = &codes[r * (cols / 2) + c / 2];
            *b = (uint8_t)(c % 2 ? (*b & 0x0f) | (q << 4) : (*b & 0xf0) | q);
        }
        float scale = 1.0f / s[k];
        scales[k] = f32_to_bf16_rne(scale);
        zeros[k] = f32_to_bf16_rne((8.0f - z[k]) * scale);
    }
    free(s);
    free(z);
    free(t);
    return iters;
}

static float bf(float x) { return bf16_to_f32(f32_to_bf16_rne(x)); }

/* torchao's tinygemm choice, every op rounded to bf16 as torch's bf16 tensors are. */
static void ref_minmax(const uint16_t *w, int rows, int cols, int gs, uint8_t *codes,
                       uint16_t *scales, uint16_t *zeros) {
    int gpr = cols / gs;
    for (int k = 0; k < rows * gpr; k++) {
        int r = k / gpr, c0 = (k % gpr) * gs;
        float mn = INFINITY, mx = -INFINITY;
        for (int i = 0; i < gs; i++) {
            mn = fminf(mn, bf16_to_f32(w[r * cols + c0 + i]));
            mx = fmaxf(mx, bf16_to_f32(w[r * cols + c0 + i]));
        }
        float scale = fmaxf(bf(bf(mx - mn) / 15.0f), bf(1e-6f));
        float zero = bf(mn + bf(scale * 8.0f));
        float lo = bf(zero - bf(scale * 8.0f));
        for (int i = 0; i < gs; i++) {
            int c = c0 + i;
            unsigned q = (unsigned)clampq(rintf(bf(bf(bf16_to_f32(w[r * cols + c]) - lo) / scale)));
            uint8_t *b = &codes[r * (cols / 2) + c / 2];
            *b = (uint8_t)(c % 2 ? (*b & 0x0f) | (q << 4) : (*b & 0xf0) | q);
        }
        scales[k] = f32_to_bf16_rne(scale);
        zeros[k] = f32_to_bf16_rne(zero);
    }
}

/* ---------------------------------------------------------------------------- checks */

typedef struct Q {
    uint8_t *codes;
    uint16_t *scales, *zeros;
} Q;

static Q q_alloc(int rows, int cols, int gs) {
    Q q = {calloc((size_t)rows * cols / 2, 1), calloc((size_t)rows * (cols / gs), 2),
           calloc((size_t)rows * (cols / gs), 2)};
    return q;
}

static void q_free(Q *q) {
    free(q->codes);
    free(q->scales);
    free(q->zeros);
}

static int q_equal(const Q *a, const Q *b, int rows, int cols, int gs) {
    size_t ng = (size_t)rows * (cols / gs);
    return !memcmp(a->codes, b->codes, (size_t)rows * cols / 2) &&
           !memcmp(a->scales, b->scales, ng * 2) && !memcmp(a->zeros, b->zeros, ng * 2);
}

/* Library (single-threaded and on 2- and 3-thread pools) vs oracle, for both algorithms. */
static void check_matrix(const char *what, const uint16_t *w, int rows, int cols, int gs,
                         ThreadPool *p2, ThreadPool *p3) {
    Q ref = q_alloc(rows, cols, gs), got = q_alloc(rows, cols, gs);
    QErr err = {{0}};
    int ref_iters = ref_hqq(w, rows, cols, gs, ref.codes, ref.scales, ref.zeros);
    ThreadPool *pools[3] = {NULL, p2, p3};
    for (int p = 0; p < 3; p++) {
        int iters = -1;
        memset(got.codes, 0xff, (size_t)rows * cols / 2);
        int rc = hqq_quantize_bf16(w, rows, cols, gs, pools[p], got.codes, got.scales, got.zeros,
                                   &iters, &err);
        CHECK(rc == 0, "%s: hqq failed: %s", what, err.msg);
        CHECK(iters == ref_iters, "%s: hqq ran %d iterations, the oracle %d", what, iters,
              ref_iters);
        CHECK(q_equal(&ref, &got, rows, cols, gs), "%s: hqq (pool %d) differs from the oracle",
              what, p);
    }
    ref_minmax(w, rows, cols, gs, ref.codes, ref.scales, ref.zeros);
    for (int p = 0; p < 3; p++) {
        int rc = q4_quantize_bf16(Q4_MINMAX, w, rows, cols, gs, pools[p], got.codes, got.scales,
                                  got.zeros, &err);
        CHECK(rc == 0, "%s: minmax failed: %s", what, err.msg);
        CHECK(q_equal(&ref, &got, rows, cols, gs), "%s: minmax (pool %d) differs from the oracle",
              what, p);
    }
    q_free(&ref);
    q_free(&got);
}

static void test_random_shapes(ThreadPool *p2, ThreadPool *p3) {
    static const struct {
        int rows, cols, gs;
        double sd, outliers;
    } cases[] = {
        {7, 384, 128, 0.02, 0.01},  /* three groups a row, odd row count */
        {5, 96, 32, 0.02, 0.01},    {3, 512, 256, 0.02, 0.0},   {33, 192, 64, 0.05, 0.02},
        {40, 640, 128, 0.02, 0.001},
        {6, 256, 128, 3.0, 0.05},   /* range ~20: |E| reaches the shrink's threshold */
        {4, 128, 32, 100.0, 0.0},   /* large weights: the shrink acts on most of them */
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        size_t n = (size_t)cases[i].rows * cases[i].cols;
        uint16_t *w = malloc(n * sizeof *w);
        fill_random(w, n, cases[i].sd, cases[i].outliers);
        char what[64];
        snprintf(what, sizeof what, "random %dx%d g%d sd %g", cases[i].rows, cases[i].cols,
                 cases[i].gs, cases[i].sd);
        check_matrix(what, w, cases[i].rows, cases[i].cols, cases[i].gs, p2, p3);
        free(w);
    }
}

/* A matrix whose task split is not one task (HQQ hands out 64K weights per task). */
static void test_many_tasks(ThreadPool *p2, ThreadPool *p3) {
    int rows = 300, cols = 1024;
    uint16_t *w = malloc((size_t)rows * cols * sizeof *w);
    fill_random(w, (size_t)rows * cols, 0.02, 0.001);
    check_matrix("300x1024 (5 tasks)", w, rows, cols, 128, p2, p3);
    free(w);
}

static void test_special_groups(ThreadPool *p2, ThreadPool *p3) {
    enum { R = 4, C = 128, G = 32 };
    uint16_t w[R * C];
    fill_random(w, R * C, 0.02, 0.0);
    for (int i = 0; i < C; i++) {
        w[0 * C + i] = f32_to_bf16_rne(0.5f);                   /* constant row */
        w[1 * C + i] = 0;                                        /* all zeros */
        w[2 * C + i] = f32_to_bf16_rne(0.001f + 4e-6f * (i % G)); /* range 1.2e-4 < 15 / 2e4 */
    }
    w[3 * C + 40] = 0x8000; /* -0.0 */
    check_matrix("special groups", w, R, C, G, p2, p3);

    Q q = q_alloc(R, C, G);
    QErr err = {{0}};
    int iters = 0;
    CHECK(hqq_quantize_bf16(w, R, C, G, NULL, q.codes, q.scales, q.zeros, &iters, &err) == 0,
          "special groups: %s", err.msg);
    float row[C];
    q4_dequantize_row(q.codes, q.scales, q.zeros, C, G, row);
    for (int i = 0; i < C; i++) CHECK(fabsf(row[i] - 0.5f) < 1e-3f, "constant row: %g", row[i]);
    q4_dequantize_row(q.codes + C / 2, q.scales + C / G, q.zeros + C / G, C, G, row);
    for (int i = 0; i < C; i++) CHECK(fabsf(row[i]) < 1e-4f, "zero row: %g", row[i]);
    /* the tiny range hits the clamp: scale = 1 / 2e4 */
    for (int g = 0; g < C / G; g++)
        CHECK(q.scales[2 * (C / G) + g] == f32_to_bf16_rne(1.0f / 2e4f), "clamped scale: %g",
              bf16_to_f32(q.scales[2 * (C / G) + g]));
    q_free(&q);

    /* A constant matrix: the error is 0 at once, so the second iteration stops the loop. */
    uint16_t c[2 * 64];
    for (int i = 0; i < 2 * 64; i++) c[i] = f32_to_bf16_rne(-1.25f);
    Q qc = q_alloc(2, 64, 32);
    CHECK(hqq_quantize_bf16(c, 2, 64, 32, NULL, qc.codes, qc.scales, qc.zeros, &iters, &err) == 0,
          "constant: %s", err.msg);
    CHECK(iters == 2, "constant matrix ran %d iterations, expected 2", iters);
    q_free(&qc);
}

/* A group that torchao's minmax maps exactly: values k/8 for k = 0..15 give scale 1/8, zero 1. */
static void test_minmax_exact(void) {
    enum { C = 64 };
    uint16_t w[C];
    for (int i = 0; i < C; i++) w[i] = f32_to_bf16_rne((float)(i % 16) * 0.125f);
    Q q = q_alloc(1, C, 32);
    QErr err = {{0}};
    CHECK(minmax_quantize_bf16(w, 1, C, 32, NULL, q.codes, q.scales, q.zeros, &err) == 0, "%s",
          err.msg);
    for (int i = 0; i < C; i++) {
        int code = (q.codes[i / 2] >> (4 * (i & 1))) & 15;
        CHECK(code == i % 16, "minmax code %d: %d", i, code);
    }
    CHECK(q.scales[0] == f32_to_bf16_rne(0.125f) && q.zeros[0] == f32_to_bf16_rne(1.0f),
          "minmax scale %g zero %g", bf16_to_f32(q.scales[0]), bf16_to_f32(q.zeros[0]));
    CHECK(q4_rel_error(w, 1, C, 32, q.codes, q.scales, q.zeros, NULL) == 0.0,
          "exact group has error %g", q4_rel_error(w, 1, C, 32, q.codes, q.scales, q.zeros, NULL));
    q_free(&q);
}

static void test_dequantize_layout(void) {
    /* byte 0x21: column 0 = 1 (low nibble), column 1 = 2 (high nibble) */
    uint8_t codes[32];
    memset(codes, 0x88, sizeof codes);
    codes[0] = 0x21;
    codes[16] = 0xf0;
    uint16_t scales[2] = {f32_to_bf16_rne(0.5f), f32_to_bf16_rne(2.0f)};
    uint16_t zeros[2] = {f32_to_bf16_rne(1.0f), f32_to_bf16_rne(-3.0f)};
    float row[64];
    q4_dequantize_row(codes, scales, zeros, 64, 32, row);
    CHECK(row[0] == (1 - 8) * 0.5f + 1.0f && row[1] == (2 - 8) * 0.5f + 1.0f,
          "columns 0, 1: %g %g", row[0], row[1]);
    CHECK(row[2] == 1.0f && row[31] == 1.0f, "code 8 gives the zero: %g %g", row[2], row[31]);
    CHECK(row[32] == -8 * 2.0f - 3.0f && row[33] == 7 * 2.0f - 3.0f, "group 1: %g %g", row[32],
          row[33]);
}

static void test_thread_independent_error(ThreadPool *p3) {
    int rows = 100, cols = 256;
    uint16_t *w = malloc((size_t)rows * cols * sizeof *w);
    fill_random(w, (size_t)rows * cols, 0.02, 0.01);
    Q q = q_alloc(rows, cols, 128);
    QErr err = {{0}};
    CHECK(hqq_quantize_bf16(w, rows, cols, 128, p3, q.codes, q.scales, q.zeros, NULL, &err) == 0,
          "%s", err.msg);
    double a = q4_rel_error(w, rows, cols, 128, q.codes, q.scales, q.zeros, NULL);
    double b = q4_rel_error(w, rows, cols, 128, q.codes, q.scales, q.zeros, p3);
    CHECK(a == b && a > 0.05 && a < 0.2, "relative error %g vs %g with 3 threads", a, b);
    q_free(&q);
    free(w);
}

static void test_errors(void) {
    QErr err = {{0}};
    enum { R = 3, C = 128 };
    uint16_t w[R * C];
    fill_random(w, R * C, 0.02, 0.0);
    Q q = q_alloc(R, C, 32);
    for (int alg = 0; alg < 2; alg++) {
        Q4Algorithm a = alg ? Q4_MINMAX : Q4_HQQ;
        uint16_t bad[R * C];
        memcpy(bad, w, sizeof bad);
        bad[2 * C + 5] = 0x7f80; /* +inf at row 2, column 5 */
        bad[2 * C + 9] = 0x7fc1; /* NaN later in the row */
        err.msg[0] = '\0';
        CHECK(q4_quantize_bf16(a, bad, R, C, 32, NULL, q.codes, q.scales, q.zeros, &err) == -1 &&
                  strstr(err.msg, "row 2, column 5"),
              "%s: inf not reported: '%s'", q4_algorithm_name(a), err.msg);
        bad[2 * C + 5] = w[2 * C + 5];
        CHECK(q4_quantize_bf16(a, bad, R, C, 32, NULL, q.codes, q.scales, q.zeros, &err) == -1 &&
                  strstr(err.msg, "row 2, column 9"),
              "%s: NaN not reported: '%s'", q4_algorithm_name(a), err.msg);
        CHECK(q4_quantize_bf16(a, w, R, C, 100, NULL, q.codes, q.scales, q.zeros, &err) == -1 &&
                  strstr(err.msg, "group size 100"),
              "group size 100 accepted: '%s'", err.msg);
        CHECK(q4_quantize_bf16(a, w, R, 96, 64, NULL, q.codes, q.scales, q.zeros, &err) == -1 &&
                  strstr(err.msg, "not a multiple"),
              "96 columns in groups of 64 accepted: '%s'", err.msg);
        CHECK(q4_quantize_bf16(a, w, 0, C, 32, NULL, q.codes, q.scales, q.zeros, &err) == -1,
              "0 rows accepted");
    }
    /* finite weights whose range overflows float32 */
    uint16_t huge[32];
    for (int i = 0; i < 32; i++) huge[i] = f32_to_bf16_rne(i % 2 ? 3e38f : -3e38f);
    CHECK(hqq_quantize_bf16(huge, 1, 32, 32, NULL, q.codes, q.scales, q.zeros, NULL, &err) == -1 &&
              strstr(err.msg, "overflows"),
          "overflowing range not reported: '%s'", err.msg);
    Q4Algorithm a;
    CHECK(q4_algorithm_from_name("minmax", &a, &err) == 0 && a == Q4_MINMAX, "minmax name");
    CHECK(q4_algorithm_from_name("hqq", &a, &err) == 0 && a == Q4_HQQ, "hqq name");
    CHECK(q4_algorithm_from_name("gptq", &a, &err) == -1 && strstr(err.msg, "gptq"), "gptq: %s",
          err.msg);
    q_free(&q);
}

int main(void) {
    QErr err = {{0}};
    ThreadPool *p2 = tp_create(2, &err), *p3 = tp_create(3, &err);
    CHECK(p2 && p3, "thread pools: %s", err.msg);
    if (!p2 || !p3) return test_finish();
    test_random_shapes(p2, p3);
    test_many_tasks(p2, p3);
    test_special_groups(p2, p3);
    test_minmax_exact();
    test_dequantize_layout();
    test_thread_independent_error(p3);
    test_errors();
    tp_free(p2);
    tp_free(p3);
    return test_finish();
}
