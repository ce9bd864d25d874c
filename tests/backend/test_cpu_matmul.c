/* test_cpu_matmul.c — every kernel set this build has (scalar, AVX2, AVX-512, NEON) against a
 * plain double-precision loop on random inputs with outliers: bf16 and f32 weights at odd sizes
 * (K not a multiple of any vector width included), int4 weights dequantized from the checkpoint
 * layout with group sizes 32, 64, 128 and 256; the int4 repack (in place and not) checked by
 * dequantizing it back; nothing outside y written; argument checks of q4_check. */
#include <math.h>
#include <string.h>

#include "../test_util.h"
#include "backend/cpu/matmul.h"
#include "util/bf16.h"

/* Per element |y - ref| / sum_k |x_k w_k| must stay below this: fp32 accumulation over a few
 * thousand terms is ~1e-6 of it; a wrong element, lane or tail is of order 1. */
#define TOL 1e-5
#define CANARY 12345.678f

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng_u64(void) {
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}
static double rng_unit(void) { return (double)(rng_u64() >> 11) / 9007199254740992.0; }
/* Uniform in [-1, 1), with 1% outliers up to +-64. */
static float rng_val(void) {
    double v = rng_unit() * 2 - 1;
    if (rng_u64() % 100 == 0) v *= 64;
    return (float)v;
}

static float *rand_f32(size_t n) {
    float *a = malloc(n * sizeof *a);
    for (size_t i = 0; i < n; i++) a[i] = rng_val();
    return a;
}

/* Compares y (M x N) with ref, scaled per element by mag (sum of |x w|); checks the canaries
 * after y. Returns the worst normalized error. */
static double compare(const float *y, const double *ref, const double *mag, int M, int N) {
    double worst = 0;
    for (size_t i = 0; i < (size_t)M * N; i++) {
        double e = fabs((double)y[i] - ref[i]) / (mag[i] > 0 ? mag[i] : 1e-30);
        if (!(e <= worst)) worst = e; /* NaN propagates as failure */
    }
    for (int i = 0; i < 8; i++) CHECK(y[(size_t)M * N + i] == CANARY, "write past y[M*N] at +%d", i);
    return worst;
}

static float *new_y(int M, int N) {
    float *y = malloc(((size_t)M * N + 8) * sizeof *y);
    for (size_t i = 0; i < (size_t)M * N + 8; i++) y[i] = i < (size_t)M * N ? NAN : CANARY;
    return y;
}

/* Double-precision reference of x (M x K) times wd (N x K) transposed. */
static void reference(double *ref, double *mag, const float *x, const double *wd, int M, int N, int K) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0, a = 0;
            for (int k = 0; k < K; k++) {
                double p = (double)x[(size_t)m * K + k] * wd[(size_t)n * K + k];
                s += p;
                a += fabs(p);
            }
            ref[(size_t)m * N + n] = s;
            mag[(size_t)m * N + n] = a;
        }
}

static void test_dense(ThreadPool *pool, const char *isa, int M, int N, int K) {
    float *x = rand_f32((size_t)M * K);
    float *wf = rand_f32((size_t)N * K);
    uint16_t *wb = malloc((size_t)N * K * sizeof *wb);
    double *wd = malloc((size_t)N * K * sizeof *wd);
    double *ref = malloc((size_t)M * N * sizeof *ref), *mag = malloc((size_t)M * N * sizeof *mag);

    /* f32 weights */
    for (size_t i = 0; i < (size_t)N * K; i++) wd[i] = wf[i];
    reference(ref, mag, x, wd, M, N, K);
    float *y = new_y(M, N);
    mm_f32_f32(pool, y, x, wf, M, N, K);
    double e = compare(y, ref, mag, M, N);
    CHECK(e <= TOL, "%s f32 M=%d N=%d K=%d threads=%d: error %.3g", isa, M, N, K,
          pool ? tp_size(pool) : 0, e);
    free(y);

    /* bf16 weights: the reference uses the exact bf16 values */
    for (size_t i = 0; i < (size_t)N * K; i++) {
        wb[i] = f32_to_bf16_rne(wf[i]);
        wd[i] = bf16_to_f32(wb[i]);
    }
    reference(ref, mag, x, wd, M, N, K);
    y = new_y(M, N);
    mm_f32_bf16(pool, y, x, wb, M, N, K);
    e = compare(y, ref, mag, M, N);
    CHECK(e <= TOL, "%s bf16 M=%d N=%d K=%d threads=%d: error %.3g", isa, M, N, K,
          pool ? tp_size(pool) : 0, e);
    free(y);

    free(x), free(wf), free(wb), free(wd), free(ref), free(mag);
}

/* Random int4 weights in the checkpoint layout (codes U8 [N][K/2], bf16 scales and zeros
 * [N][K/group]) and their exact dequantization in double. */
typedef struct Q4Case {
    uint8_t *file_codes, *codes;
    uint16_t *scales, *zeros;
    uint32_t *sz;
    double *wd;
} Q4Case;

static Q4Case q4_random(int N, int K, int group) {
    Q4Case c;
    int G = K / group;
    c.file_codes = malloc((size_t)N * K / 2);
    c.codes = malloc((size_t)N * K / 2);
    c.scales = malloc((size_t)N * G * sizeof *c.scales);
    c.zeros = malloc((size_t)N * G * sizeof *c.zeros);
    c.sz = malloc((size_t)N * G * sizeof *c.sz);
    c.wd = malloc((size_t)N * K * sizeof *c.wd);
    for (size_t i = 0; i < (size_t)N * K / 2; i++) c.file_codes[i] = (uint8_t)rng_u64();
    for (size_t i = 0; i < (size_t)N * G; i++) {
        c.scales[i] = f32_to_bf16_rne((float)(0.001 + 0.02 * rng_unit()) * (rng_u64() % 50 ? 1.f : 30.f));
        c.zeros[i] = f32_to_bf16_rne(0.05f * rng_val());
    }
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            int q = (c.file_codes[((size_t)n * K + k) / 2] >> ((k & 1) * 4)) & 15;
            size_t o = (size_t)n * G + k / group;
            c.wd[(size_t)n * K + k] = (q - 8) * (double)bf16_to_f32(c.scales[o]) + bf16_to_f32(c.zeros[o]);
        }
    return c;
}

static void q4_free(Q4Case *c) {
    free(c->file_codes), free(c->codes), free(c->scales), free(c->zeros), free(c->sz), free(c->wd);
}

static int q4_case_repack(Q4Case *c, int N, int K, int group, QErr *err) {
    return q4_repack(c->codes, c->sz, c->file_codes, c->scales, c->zeros, N, K, group, err);
}

static void test_q4(ThreadPool *pool, const char *isa, int M, int N, int K, int group) {
    QErr err = {{0}};
    Q4Case c = q4_random(N, K, group);
    CHECK(q4_case_repack(&c, N, K, group, &err) == 0, "repack: %s", err.msg);
    Q4Weights w = {c.codes, c.sz, group};
    float *x = rand_f32((size_t)M * K);
    double *ref = malloc((size_t)M * N * sizeof *ref), *mag = malloc((size_t)M * N * sizeof *mag);
    reference(ref, mag, x, c.wd, M, N, K);
    float *y = new_y(M, N);
    mm_f32_q4(pool, y, x, &w, M, N, K);
    double e = compare(y, ref, mag, M, N);
    CHECK(e <= TOL, "%s int4 M=%d N=%d K=%d group=%d threads=%d: error %.3g", isa, M, N, K, group,
          pool ? tp_size(pool) : 0, e);
    free(y), free(x), free(ref), free(mag);
    q4_free(&c);
}

/* Repack round trip: dequantizing the repacked codes gives back every weight of the file layout
 * (a wrong code is off by a whole scale), and repacking in place gives the same bytes. */
static void test_repack(int N, int K, int group) {
    QErr err = {{0}};
    Q4Case c = q4_random(N, K, group);
    CHECK(q4_case_repack(&c, N, K, group, &err) == 0, "repack: %s", err.msg);
    uint8_t *inplace = malloc((size_t)N * K / 2);
    uint32_t *sz2 = malloc((size_t)N * (K / group) * sizeof *sz2);
    memcpy(inplace, c.file_codes, (size_t)N * K / 2);
    CHECK(q4_repack(inplace, sz2, inplace, c.scales, c.zeros, N, K, group, &err) == 0, "repack in place: %s", err.msg);
    CHECK(memcmp(inplace, c.codes, (size_t)N * K / 2) == 0, "in-place repack differs N=%d K=%d", N, K);
    CHECK(memcmp(sz2, c.sz, (size_t)N * (K / group) * sizeof *sz2) == 0, "sz differs between repacks");
    free(sz2);
    Q4Weights w = {c.codes, c.sz, group};
    float *row = malloc((size_t)K * sizeof *row);
    int bad = 0;
    for (int n = 0; n < N; n++) {
        q4_dequant_row(row, &w, K, n);
        for (int k = 0; k < K; k++) {
            double want = c.wd[(size_t)n * K + k];
            double s = bf16_to_f32(c.scales[(size_t)n * (K / group) + k / group]);
            if (!(fabs(row[k] - want) <= 1e-3 * s)) bad++;
        }
    }
    CHECK(bad == 0, "q4_dequant_row: %d of %d weights differ (N=%d K=%d group=%d)", bad, N * K, N, K, group);
    free(row), free(inplace);
    q4_free(&c);
}

static void test_q4_check(void) {
    QErr err = {{0}};
    CHECK(q4_check(4, 256, 128, &err) == 0, "valid shape rejected: %s", err.msg);
    CHECK(q4_check(4, 512, 256, &err) == 0, "group 256 rejected: %s", err.msg);
    CHECK(q4_check(4, 128, 32, &err) == 0 && q4_check(4, 128, 64, &err) == 0, "small groups rejected");
    CHECK(q4_check(4, 100, 100, &err) == -1 && strstr(err.msg, "K") != NULL, "K=100: %s", err.msg);
    CHECK(q4_check(4, 384, 256, &err) == -1 && strstr(err.msg, "group") != NULL, "group 256, K=384: %s", err.msg);
    CHECK(q4_check(4, 256, 48, &err) == -1 && strstr(err.msg, "group") != NULL, "group 48: %s", err.msg);
    CHECK(q4_check(0, 256, 128, &err) == -1 && strstr(err.msg, "N") != NULL, "N=0: %s", err.msg);
    uint8_t b[64] = {1, 2, 3};
    uint16_t s[1] = {0x3f80}, z[1] = {0};
    uint32_t sz[1] = {7};
    CHECK(q4_repack(b, sz, b, s, z, 1, 100, 128, &err) == -1 && b[0] == 1 && sz[0] == 7,
          "repack of a bad shape must fail untouched");
}

int main(void) {
    QErr err = {{0}};
    test_q4_check();
    test_repack(3, 128, 128);
    test_repack(5, 384, 32);
    test_repack(2, 1024, 256);

    ThreadPool *pools[3] = {NULL, tp_create(2, &err), tp_create(3, &err)};
    CHECK(pools[1] && pools[2], "tp_create: %s", err.msg);
    if (!pools[1] || !pools[2]) return test_finish();

    int n_isa = 0;
    for (int i = 0; i < MM_ISA_COUNT; i++) {
        MmIsa isa = (MmIsa)i;
        if (!mm_isa_available(isa)) {
            CHECK(mm_select_isa(isa, &err) == -1 && strstr(err.msg, mm_isa_name(isa)),
                  "selecting missing set %s", mm_isa_name(isa));
            continue;
        }
        n_isa++;
        CHECK(mm_select_isa(isa, &err) == 0 && mm_selected_isa() == isa, "select %s", mm_isa_name(isa));
        const char *name = mm_isa_name(isa);
        printf("kernel set %s\n", name);

        static const int Ms[] = {1, 3, 17}, Ns[] = {1, 7, 67}, Ks[] = {1, 5, 16, 37, 130, 1027};
        for (int mi = 0; mi < 3; mi++)
            for (int ni = 0; ni < 3; ni++)
                for (int ki = 0; ki < 6; ki++) test_dense(pools[(mi + ni + ki) % 3], name, Ms[mi], Ns[ni], Ks[ki]);
        /* Many tasks (several per thread), every pool. */
        for (int p = 0; p < 3; p++) test_dense(pools[p], name, 5, 1031, 260);
        test_dense(pools[1], name, 64, 97, 1024);

        static const int Kq[] = {128, 384, 1024};
        static const int groups[] = {32, 64, 128, 256};
        for (int mi = 0; mi < 3; mi++)
            for (int ki = 0; ki < 3; ki++)
                for (int gi = 0; gi < 4; gi++) {
                    if (Kq[ki] % groups[gi] != 0) continue;
                    test_q4(pools[(mi + ki + gi) % 3], name, Ms[mi], 67, Kq[ki], groups[gi]);
                }
        test_q4(pools[1], name, 1, 1031, 256, 128);
        test_q4(pools[2], name, 64, 97, 512, 128);
        test_q4(pools[0], name, 6, 5, 128, 128);
    }
    CHECK(n_isa >= 1, "no kernel set available");
    CHECK(mm_isa_available(MM_ISA_SCALAR), "scalar kernels must always exist");
    tp_free(pools[1]);
    tp_free(pools[2]);
    return test_finish();
}
