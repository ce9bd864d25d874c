/* test_kv_memory.c — the KV pool sized by a fraction of the device (ModelOptions.kv_mem_fraction,
 * serve's --gpu-memory-utilization): it never takes more than the fraction leaves after what is
 * already in use, grows with the free memory, stops at max_seqs full-length requests, refuses
 * clearly when not one request fits, and is not used where the backend cannot report device
 * memory. Also the pool of EngineOptions.kv_all_seqs (bench latency's whole batch at once), which
 * the 1 GiB byte budget would cap; and the fp8 cache (one byte a value), which gets proportionally
 * more blocks from the fraction and from the budget. Runs tiny-qwen3's random weights on the CPU
 * backend with its op table copied and a mem_free op injected that reports a device of the test's
 * choosing. */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "../test_util.h"
#include "backend/backend.h"
#include "engine/engine.h"
#include "model/random_weights.h"

static size_t fake_free, fake_total;
static size_t fake_mem_free(Backend *be, size_t *total) {
    (void)be;
    *total = fake_total;
    return fake_free;
}

/* Blocks of the pool that model_create gives tiny-qwen3 with these options, or -1 (err set). */
static long pool_blocks_of(Backend *be, double fraction, int max_seqs, KvDtype dtype, QErr *err) {
    QwenConfig cfg;
    GenConfig gen;
    StModel *st = random_weights_build("tiny-qwen3", false, &cfg, &gen, err);
    if (!st) return -1;
    EngineOptions eo = engine_default_options(&cfg);
    eo.max_seqs = max_seqs;
    eo.max_model_len = 256;
    eo.kv_mem_fraction = fraction;
    eo.kv_dtype = dtype;
    ModelOptions mo = engine_model_options(&eo, &cfg, be->ops);
    Model *m = model_create(&cfg, &gen, st, be, &mo, "tiny-qwen3", err);
    if (!m) return -1;
    long n = m->kv_shape.n_blocks;
    CHECK(m->kv_shape.dtype == dtype, "the pool's dtype %d, want %d", m->kv_shape.dtype, dtype);
    model_free(m);
    return n;
}

static long pool_blocks(Backend *be, double fraction, int max_seqs, QErr *err) {
    return pool_blocks_of(be, fraction, max_seqs, KV_AUTO, err);
}

int main(void) {
    QErr err;
    Backend *be = cpu_backend_create(1, &err);
    CHECK(be != NULL, "cpu_backend_create: %s", err.msg);
    if (!be) return test_finish();
    QwenConfig cfg;
    GenConfig gen;
    StModel *probe = random_weights_build("tiny-qwen3", false, &cfg, &gen, &err);
    CHECK(probe != NULL, "random_weights_build: %s", err.msg);
    if (!probe) return test_finish();
    st_close(probe);
    const size_t block = (size_t)cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim *
                         be->ops->kv_value_bytes * 16;
    const long per_seq = 256 / 16;

    /* Without the op (the CPU as it is): the engine's byte budget (1 GiB) decides, capped at
     * max_seqs full-length requests. */
    long plain = pool_blocks(be, 0.9, 4, &err);
    CHECK(plain == 4 * per_seq, "no mem_free: %ld blocks, want %ld", plain, 4 * per_seq);

    static BackendOps with_mem;
    with_mem = *be->ops;
    with_mem.mem_free = fake_mem_free;
    be->ops = &with_mem;

    /* A 1 GiB device with 700 MB free, 90%: at most 0.9 GiB - 324 MB in use for the pool. */
    fake_total = (size_t)1 << 30;
    fake_free = (size_t)700 << 20;
    long n1 = pool_blocks(be, 0.9, 4096, &err);
    size_t cap = (size_t)(0.9 * (double)fake_total) - (fake_total - fake_free);
    CHECK(n1 > 0 && (size_t)n1 * block <= cap, "%ld blocks of %zu bytes within the %zu the fraction leaves (%s)", n1,
          block, cap, n1 < 0 ? err.msg : "");
    CHECK(n1 >= per_seq, "at least one full-length request fits: %ld blocks", n1);
    /* fp8: one byte a value instead of float32's four, so 4x the blocks in the same memory */
    long n1_fp8 = pool_blocks_of(be, 0.9, 4096, KV_FP8, &err);
    CHECK(n1_fp8 >= 4 * n1 && n1_fp8 < 4 * (n1 + 1) && (size_t)n1_fp8 * block / 4 <= cap,
          "fp8: %ld blocks, 4x the %ld of float32 within the %zu bytes", n1_fp8, n1, cap);
    /* more free memory, more blocks */
    fake_free = (size_t)900 << 20;
    long n2 = pool_blocks(be, 0.9, 4096, &err);
    CHECK(n2 > n1, "900 MB free: %ld blocks, more than %ld", n2, n1);
    /* plenty of memory: max_seqs full-length requests, no more */
    fake_total = fake_free = (size_t)64 << 30;
    long n3 = pool_blocks(be, 0.9, 4, &err);
    CHECK(n3 == 4 * per_seq, "64 GiB free: capped at %ld blocks, got %ld", 4 * per_seq, n3);
    /* not even one request: a clear refusal */
    fake_total = (size_t)1 << 30;
    fake_free = (size_t)120 << 20;
    long n4 = pool_blocks(be, 0.9, 4, &err);
    CHECK(n4 < 0 && strstr(err.msg, "--gpu-memory-utilization") && strstr(err.msg, "256-token"),
          "120 MB free of 1 GiB refused: %ld, '%s'", n4, n4 < 0 ? err.msg : "");

    /* kv_all_seqs: Qwen3-8B's KV geometry (36 layers x 8 kv heads x 128, bf16: 147456 bytes per
     * token), 64 sequences of 768 tokens: the 1 GiB budget holds 455 blocks of 16 tokens, the
     * batch needs 64 x 48 */
    QwenConfig big = cfg;
    big.num_hidden_layers = 36, big.num_key_value_heads = 8, big.head_dim = 128;
    EngineOptions eo = engine_default_options(&big);
    eo.max_seqs = 64, eo.max_model_len = 768;
    static BackendOps bf16_cache; /* a backend whose own cache type is bf16, as CUDA's */
    bf16_cache = *be->ops;
    bf16_cache.kv_value_bytes = 2;
    const long budget_blocks = (long)(((size_t)1 << 30) / ((size_t)36 * 2 * 8 * 128 * 2 * 16));
    const int by_budget = engine_model_options(&eo, &big, &bf16_cache).kv_blocks;
    CHECK(by_budget == budget_blocks, "1 GiB budget: %d blocks, want %ld", by_budget, budget_blocks);
    eo.kv_dtype = KV_FP8;
    const int by_budget_fp8 = engine_model_options(&eo, &big, &bf16_cache).kv_blocks;
    CHECK(by_budget_fp8 == 2 * budget_blocks && engine_model_options(&eo, &big, &bf16_cache).kv_dtype == KV_FP8,
          "1 GiB budget, fp8: %d blocks, want %ld", by_budget_fp8, 2 * budget_blocks);
    eo.kv_dtype = KV_AUTO;
    eo.kv_all_seqs = true;
    const int whole_batch = engine_model_options(&eo, &big, &bf16_cache).kv_blocks;
    CHECK(whole_batch == 64 * 48, "kv_all_seqs: %d blocks, want %d", whole_batch, 64 * 48);

    be->ops->destroy(be);
    return test_finish();
}
