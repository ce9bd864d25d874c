/* test_engine_sampling.c — the engine's split of sampling between a backend's sampler and the
 * host (engine.c fetch_logits): in a step where some requests need the host (logprobs,
 * penalties) and others do not, the others are sampled by the backend and only the host rows'
 * logits are copied; a backend that refuses the step's parameters leaves every row to the host
 * with the requests' random generators as they were. The CPU backend has no sampler, so this
 * injects one (greedy rows only, refusing any other) into a copy of its op table, and compares
 * every request's tokens with the same batch sampled wholly on the host. Tiny-qwen3's random
 * weights. */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "../test_util.h"
#include "backend/backend.h"
#include "engine/engine.h"
#include "model/random_weights.h"

enum { N_REQ = 4, OUT = 12 };

/* The injected sampler: argmax of each row; refuses (doing nothing) any non-greedy row. */
static int sampled_steps, refused_steps, rows_sampled;
static bool greedy_sampler(Backend *be, const float *logits, int rows, int vocab, const SamplingParams *params,
                           const float *uniform, int32_t *out_ids) {
    (void)be;
    (void)uniform;
    for (int r = 0; r < rows; r++)
        if (params[r].temperature != 0.0f) {
            refused_steps++;
            return false;
        }
    for (int r = 0; r < rows; r++) {
        const float *row = logits + (size_t)r * vocab;
        int best = 0;
        for (int i = 1; i < vocab; i++)
            if (row[i] > row[best]) best = i;
        out_ids[r] = best;
    }
    sampled_steps++;
    rows_sampled += rows;
    return true;
}

typedef struct Out {
    int32_t ids[OUT];
    int n, n_logprobs;
    bool done;
} Out;

static void collect(void *user, const EngineEvent *ev) {
    Out *o = user;
    if (ev->token >= 0 && o->n < OUT) o->ids[o->n++] = ev->token;
    if (ev->token >= 0 && ev->n_top > 0) o->n_logprobs++;
    if (ev->finish != FINISH_NONE) o->done = true;
}

/* Runs requests params[0 .. n) together (prompt i: five ids from i) on a fresh engine. */
static void run_batch(Model *m, const EngineOptions *eo, const EngineParams *params, int n, Out *out) {
    QErr err;
    Engine *e = engine_create(m, eo, &err);
    CHECK(e != NULL, "engine_create: %s", err.msg);
    if (!e) return;
    memset(out, 0, (size_t)n * sizeof *out);
    for (int i = 0; i < n; i++) {
        const int32_t prompt[] = {9707 + 31 * i, 11, 1879 - 7 * i, 3 * i, 42};
        CHECK(engine_add(e, prompt, 5, &params[i], collect, &out[i], NULL, &err) == 0, "engine_add: %s", err.msg);
    }
    engine_run_until_idle(e);
    engine_free(e);
}

int main(void) {
    QErr err;
    QwenConfig cfg;
    GenConfig gen;
    StModel *st = random_weights_build("tiny-qwen3", false, &cfg, &gen, &err);
    CHECK(st != NULL, "random_weights_build: %s", err.msg);
    Backend *be = cpu_backend_create(1, &err);
    CHECK(be != NULL, "cpu_backend_create: %s", err.msg);
    if (!st || !be) return test_finish();
    CHECK(be->ops->sample == NULL, "the CPU backend samples on the host (this test injects a sampler)");
    const BackendOps *host_only = be->ops;
    static BackendOps with_sampler;
    with_sampler = *be->ops;
    with_sampler.sample = greedy_sampler;

    EngineOptions eo = engine_default_options(&cfg);
    eo.max_seqs = N_REQ;
    eo.max_model_len = 64;
    eo.prefix_caching = false;
    ModelOptions mo = engine_model_options(&eo, &cfg, be->ops);
    Model *m = model_create(&cfg, &gen, st, be, &mo, "tiny-qwen3", &err);
    CHECK(m != NULL, "model_create: %s", err.msg);
    if (!m) return test_finish();

    /* A mixed batch: plain greedy (the backend's), greedy with logprobs and greedy with a
     * presence penalty (the host's), and a seeded sampled request with logprobs (the host's: its
     * stand-in row on the backend must be greedy, else the sampler refuses the whole step). */
    EngineParams mixed[N_REQ];
    for (int i = 0; i < N_REQ; i++) {
        mixed[i] = engine_params_default();
        mixed[i].max_tokens = OUT;
        mixed[i].ignore_eos = true;
    }
    mixed[1].logprobs = 2;
    mixed[2].sampling.presence_penalty = 1.5f;
    mixed[3].sampling.temperature = 0.9f;
    mixed[3].sampling.has_seed = true;
    mixed[3].sampling.seed = 3;
    mixed[3].logprobs = 1;

    Out want[N_REQ], got[N_REQ];
    be->ops = host_only;
    run_batch(m, &eo, mixed, N_REQ, want);
    be->ops = &with_sampler;
    run_batch(m, &eo, mixed, N_REQ, got);
    CHECK(sampled_steps >= OUT - 1 && refused_steps == 0,
          "the mixed batch's steps go to the injected sampler (%d sampled, %d refused)", sampled_steps, refused_steps);
    CHECK(rows_sampled >= N_REQ * (OUT - 1), "every row of those steps is passed to it (%d rows)", rows_sampled);
    for (int i = 0; i < N_REQ; i++) {
        CHECK(want[i].done && got[i].done && want[i].n == OUT && got[i].n == OUT, "request %d: %d and %d tokens", i,
              want[i].n, got[i].n);
        CHECK(!memcmp(want[i].ids, got[i].ids, sizeof want[i].ids),
              "request %d: the same tokens whether the batch is sampled on the host alone or split", i);
        CHECK(got[i].n_logprobs == (mixed[i].logprobs >= 0 ? OUT : 0), "request %d: %d tokens with logprobs", i,
              got[i].n_logprobs);
    }
    int distinct = 0;
    for (int i = 1; i < N_REQ; i++) distinct += memcmp(want[i].ids, want[0].ids, sizeof want[0].ids) != 0;
    CHECK(distinct == N_REQ - 1, "the requests' outputs differ (so a row copied from the wrong offset shows)");

    /* A refused step: a seeded sampled request the backend could take but this sampler refuses;
     * its generator must be as before the attempt, so its tokens equal the host-only run's. */
    EngineParams refused[2] = {mixed[0], mixed[0]};
    refused[1].sampling.temperature = 0.8f;
    refused[1].sampling.has_seed = true;
    refused[1].sampling.seed = 11;
    sampled_steps = refused_steps = 0;
    be->ops = host_only;
    run_batch(m, &eo, refused, 2, want);
    be->ops = &with_sampler;
    run_batch(m, &eo, refused, 2, got);
    CHECK(refused_steps >= OUT && sampled_steps == 0, "every step refused (%d refused, %d sampled)", refused_steps,
          sampled_steps);
    for (int i = 0; i < 2; i++)
        CHECK(got[i].n == OUT && !memcmp(want[i].ids, got[i].ids, sizeof want[i].ids),
              "refused steps, request %d: the host-only run's tokens", i);

    be->ops = host_only;
    model_free(m);
    be->ops->destroy(be);
    return test_finish();
}
