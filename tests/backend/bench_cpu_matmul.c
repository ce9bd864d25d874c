/* bench_cpu_matmul.c — throughput of the CPU matmul kernels next to the machine's memory
 * bandwidth, measured in the same run. Not a ctest (the name is bench_, not test_); build by
 * hand against the core library:
 *
 *   cc -O2 -march=native -std=c11 -D_GNU_SOURCE -Isrc tests/backend/bench_cpu_matmul.c \
 *      build-NAME/libquill_core.a -lpthread -lm -o /tmp/bench_cpu_matmul
 *   /tmp/bench_cpu_matmul [threads] [isa] [all|decode|prefill]
 *
 * Decode (M = 1) is reported as GB/s of weight bytes read (int4: codes + scales + zeros), with
 * enough copies of each weight rotated (512 MiB) that every call reads from DRAM, not the
 * last-level cache, next to a parallel read probe of the same run. Prefill (M = 64) is reported
 * in GFLOP/s (2*M*N*K per call). Shapes are Qwen3-0.6B's. On a shared machine, run it with
 * nice -n -15 so other processes do not preempt the pool's threads. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "backend/cpu/matmul.h"
#include "util/bf16.h"

/* Weights cycled per shape: decode far above any L3; prefill (compute-bound, each weight read
 * once per 64 rows) twice this 32 MiB-L3 machine's, to keep its runs short. */
#define ROTATE_DECODE (512ull << 20)
#define ROTATE_PREFILL (64ull << 20)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *xmalloc(size_t n) {
    void *p = aligned_alloc(64, (n + 63) / 64 * 64);
    if (!p) {
        fprintf(stderr, "out of memory (%zu bytes)\n", n);
        exit(1);
    }
    return p;
}

/* ---- memory bandwidth probes ---------------------------------------------------------------- */
/* Parallel read: every task scans its chunk with memchr for a byte that is not there (libc's
 * memchr is vectorized, so it reads at the speed the memory system allows). */
typedef struct ReadCtx {
    const char *buf;
    size_t chunk;
    int found;
} ReadCtx;

static void read_task(void *ctx, int task, int thread) {
    (void)thread;
    ReadCtx *c = ctx;
    if (memchr(c->buf + (size_t)task * c->chunk, 0x5a, c->chunk)) c->found = 1;
}

static void probe_bandwidth(ThreadPool *pool, double *read_gbs, double *copy_gbs) {
    size_t bytes = 1ull << 30;
    char *buf = xmalloc(bytes);
    memset(buf, 1, bytes);
    ReadCtx c = {buf, bytes / 256, 0};
    double best = 1e9;
    for (int rep = 0; rep < 8; rep++) {
        double t = now_s();
        tp_run(pool, 256, read_task, &c);
        t = now_s() - t;
        if (t < best) best = t;
    }
    *read_gbs = bytes / best * 1e-9;
    if (c.found) printf("(probe byte found)\n");

    /* memcpy of 256 MiB on one thread: bytes read + written */
    size_t quarter = bytes / 4;
    best = 1e9;
    for (int rep = 0; rep < 5; rep++) {
        double t = now_s();
        memcpy(buf + quarter * 2, buf, quarter);
        t = now_s() - t;
        if (t < best) best = t;
    }
    *copy_gbs = 2.0 * quarter / best * 1e-9;
    free(buf);
}

/* ---- matmul timing ---------------------------------------------------------------------------- */
typedef enum { W_BF16, W_Q4 } WKind;

typedef struct Shape {
    const char *name;
    int N, K;
} Shape;

static double bench_one(ThreadPool *pool, WKind kind, int M, int N, int K, double *bytes_out, int iters) {
    size_t nk = (size_t)N * K;
    size_t wbytes = kind == W_BF16 ? nk * 2 : nk / 2 + (size_t)N * (K / 128) * 4;
    int copies = (int)((M == 1 ? ROTATE_DECODE : ROTATE_PREFILL) / wbytes);
    if (copies < 1) copies = 1;
    if (iters < copies) iters = copies; /* every timed run sweeps all copies */
    /* one buffer per copy: codes or bf16 weights; scales/zeros for int4 */
    void **w = calloc((size_t)copies, sizeof *w);
    Q4Weights *q = calloc((size_t)copies, sizeof *q);
    for (int c = 0; c < copies; c++) {
        if (kind == W_BF16) {
            uint16_t *b = xmalloc(nk * 2);
            for (size_t i = 0; i < nk; i++) b[i] = f32_to_bf16_rne((float)((i * 2654435761u) % 1000) * 1e-3f - 0.5f);
            w[c] = b;
        } else {
            size_t G = (size_t)N * (K / 128);
            uint8_t *codes = xmalloc(nk / 2);
            uint32_t *sz = xmalloc(G * 4);
            for (size_t i = 0; i < nk / 2; i++) codes[i] = (uint8_t)(i * 2654435761u >> 13);
            for (size_t i = 0; i < G; i++) sz[i] = 0x3c003c23u; /* scale ~0.01, zero ~0.0078 */
            q[c] = (Q4Weights){codes, sz, 128};
            w[c] = codes;
        }
    }
    float *x = xmalloc((size_t)M * K * 4), *y = xmalloc((size_t)M * N * 4);
    for (size_t i = 0; i < (size_t)M * K; i++) x[i] = (float)(i % 7) * 0.1f - 0.3f;

    double best = 1e9;
    for (int rep = 0; rep < 3; rep++) {
        double t = now_s();
        for (int it = 0; it < iters; it++) {
            int c = it % copies;
            if (kind == W_BF16) mm_f32_bf16(pool, y, x, w[c], M, N, K);
            else mm_f32_q4(pool, y, x, &q[c], M, N, K);
        }
        t = (now_s() - t) / iters;
        if (t < best) best = t;
    }
    *bytes_out = (double)wbytes;
    for (int c = 0; c < copies; c++) {
        free(w[c]);
        if (kind == W_Q4) free((void *)q[c].sz);
    }
    free(w), free(q), free(x), free(y);
    return best;
}

typedef struct TpCtx {
    int dummy;
} TpCtx;
static void empty_task(void *ctx, int task, int thread) { (void)ctx, (void)task, (void)thread; }

int main(int argc, char **argv) {
    QErr err;
    int threads = argc > 1 ? atoi(argv[1]) : 0;
    ThreadPool *pool = tp_create(threads, &err);
    if (!pool) {
        fprintf(stderr, "%s\n", err.msg);
        return 1;
    }
    if (argc > 2) {
        for (int i = 0; i < MM_ISA_COUNT; i++)
            if (strcmp(argv[2], mm_isa_name((MmIsa)i)) == 0 && mm_select_isa((MmIsa)i, &err) == 0) break;
    }
    const char *what = argc > 3 ? argv[3] : "all";
    printf("threads %d, kernels %s\n", tp_size(pool), mm_isa_name(mm_selected_isa()));

    TpCtx tc = {0};
    int calls = 20000;
    double t = now_s();
    for (int i = 0; i < calls; i++) tp_run(pool, tp_size(pool) * 4, empty_task, &tc);
    t = now_s() - t;
    printf("tp_run overhead: %.2f us per call (%d empty tasks)\n", t / calls * 1e6, tp_size(pool) * 4);

    double rd, cp;
    probe_bandwidth(pool, &rd, &cp);
    printf("memory: parallel read %.1f GB/s, memcpy (1 thread, read+write) %.1f GB/s\n\n", rd, cp);

    static const Shape shapes[] = {
        {"k/v_proj 1024x1024", 1024, 1024}, {"q_proj 2048x1024", 2048, 1024},
        {"gate/up 3072x1024", 3072, 1024},  {"down 1024x3072", 1024, 3072},
        {"lm_head 151936x1024", 151936, 1024},
    };
    if (strcmp(what, "prefill") != 0) printf("decode M=1: GB/s of weights read (%% of parallel read bandwidth), us per call\n");
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes && strcmp(what, "prefill") != 0; s++) {
        const Shape *sh = &shapes[s];
        int iters = sh->N > 10000 ? 6 : 200;
        double bb, bq;
        double tb = bench_one(pool, W_BF16, 1, sh->N, sh->K, &bb, iters);
        double tq = bench_one(pool, W_Q4, 1, sh->N, sh->K, &bq, iters);
        printf("  %-22s bf16 %6.1f GB/s (%3.0f%%) %8.1f us | int4 %6.1f GB/s (%3.0f%%) %8.1f us\n", sh->name,
               bb / tb * 1e-9, 100 * bb / tb * 1e-9 / rd, tb * 1e6, bq / tq * 1e-9,
               100 * bq / tq * 1e-9 / rd, tq * 1e6);
    }
    if (strcmp(what, "decode") != 0) printf("\nprefill M=64: GFLOP/s\n");
    for (size_t s = 0; s < sizeof shapes / sizeof *shapes && strcmp(what, "decode") != 0; s++) {
        const Shape *sh = &shapes[s];
        if (sh->N > 10000) continue;
        double bb, bq;
        double tb = bench_one(pool, W_BF16, 64, sh->N, sh->K, &bb, 20);
        double tq = bench_one(pool, W_Q4, 64, sh->N, sh->K, &bq, 20);
        double flop = 2.0 * 64 * sh->N * sh->K;
        printf("  %-22s bf16 %6.1f GFLOP/s | int4 %6.1f GFLOP/s\n", sh->name, flop / tb * 1e-9, flop / tq * 1e-9);
    }
    tp_free(pool);
    return 0;
}
