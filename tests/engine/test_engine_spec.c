/* test_engine_spec.c — speculative decoding by n-gram lookup (engine.c) must not change what a
 * request generates: tokens, logprobs and finish reasons equal those of the same engine without
 * drafts, for greedy and seeded sampled requests, with penalties, a stop id, a short max_tokens,
 * several requests in a batch, a KV pool small enough to preempt, and prefix-cached prompts; and
 * drafts must actually be made, some kept and some not (small-qwen3's random weights repeat
 * themselves, not always), in fewer steps. On the CPU backend. */
#include <math.h>
#include <stdio.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "../test_util.h"
#include "backend/backend.h"
#include "engine/engine.h"
#include "model/random_weights.h"

enum { MAX_OUT = 48, N_REQ = 6 };

typedef struct Out {
    int32_t ids[MAX_OUT];
    float lp[MAX_OUT];
    int n;
    FinishReason finish;
} Out;

static void collect(void *user, const EngineEvent *ev) {
    Out *o = user;
    if (ev->token >= 0 && o->n < MAX_OUT) {
        o->lp[o->n] = ev->n_top > 0 ? ev->logprob : 0.0f;
        o->ids[o->n++] = ev->token;
    }
    if (ev->finish != FINISH_NONE) o->finish = ev->finish;
}

static const int32_t kPrompt[N_REQ][8] = {
    {970, 11, 1879, 970, 11, 1879, 970, 11}, {42, 43, 44, 45, 42, 43, 44, 45}, {7, 7, 7, 7, 7, 7, 7, 7},
    {100, 200, 300, 400, 500, 600, 700, 800},    {970, 11, 1879, 0, 42, 5, 6, 7}, {3, 1, 4, 1, 5, 9, 2, 6},
};

/* Requests params[0 .. n) (prompt i each) together on a fresh engine with options eo; returns its
 * stats. */
static EngineStats run(Model *m, const EngineOptions *eo, const EngineParams *params, int n, Out *out) {
    QErr err;
    EngineStats st = {0};
    Engine *e = engine_create(m, eo, &err);
    CHECK(e != NULL, "engine_create: %s", err.msg);
    if (!e) return st;
    memset(out, 0, (size_t)n * sizeof *out);
    for (int i = 0; i < n; i++)
        CHECK(engine_add(e, kPrompt[i], 8, &params[i], collect, &out[i], NULL, &err) == 0, "engine_add: %s", err.msg);
    int steps = 0;
    while (engine_step(e) && ++steps < 1000) { /* bounded: a broken engine fails instead of hanging */
    }
    CHECK(steps < 1000, "the requests end (%d steps)", steps);
    st = engine_stats(e);
    engine_free(e);
    return st;
}

/* Same tokens and finish; logprobs equal up to float rounding (the CPU's attention may sum in
 * another order when a step holds more query tokens). */
static void check_same(const Out *want, const Out *got, int n, const char *what) {
    for (int i = 0; i < n; i++) {
        CHECK(want[i].n == got[i].n && want[i].finish == got[i].finish, "%s, request %d: %d tokens (%s) vs %d (%s)",
              what, i, want[i].n, finish_reason_name(want[i].finish), got[i].n, finish_reason_name(got[i].finish));
        CHECK(!memcmp(want[i].ids, got[i].ids, (size_t)want[i].n * sizeof *want[i].ids),
              "%s, request %d: the same tokens with drafts as without", what, i);
        float worst = 0.0f;
        for (int j = 0; j < want[i].n; j++) worst = fmaxf(worst, fabsf(want[i].lp[j] - got[i].lp[j]));
        CHECK(worst <= 1e-5f, "%s, request %d: the same logprobs (differing by %g)", what, i, worst);
    }
}

int main(void) {
    QErr err;
    QwenConfig cfg;
    GenConfig gen;
    StModel *st = random_weights_build("small-qwen3", false, &cfg, &gen, &err);
    CHECK(st != NULL, "random_weights_build: %s", err.msg);
    Backend *be = cpu_backend_create(1, &err);
    CHECK(be != NULL, "cpu_backend_create: %s", err.msg);
    if (!st || !be) return test_finish();

    EngineOptions plain = engine_default_options(&cfg);
    plain.max_seqs = N_REQ;
    plain.max_model_len = 128;
    EngineOptions spec = plain;
    spec.spec_tokens = 4;
    spec.spec_ngram_min = 2;
    spec.spec_ngram_max = 4;
    ModelOptions mo = engine_model_options(&spec, &cfg, be->ops); /* the larger logit buffers */
    Model *m = model_create(&cfg, &gen, st, be, &mo, "small-qwen3", &err);
    CHECK(m != NULL, "model_create: %s", err.msg);
    if (!m) return test_finish();

    /* Six kinds of request: greedy; seeded sampling with logprobs; penalties; a stop id (set
     * below); a short max_tokens; greedy with logprobs and min_tokens. */
    EngineParams p[N_REQ];
    for (int i = 0; i < N_REQ; i++) {
        p[i] = engine_params_default();
        p[i].max_tokens = 40;
        p[i].ignore_eos = true;
    }
    p[1].sampling.temperature = 0.8f;
    p[1].sampling.top_p = 0.9f;
    p[1].sampling.has_seed = true;
    p[1].sampling.seed = 5;
    p[1].logprobs = 3;
    p[2].sampling.repetition_penalty = 1.3f;
    p[2].sampling.presence_penalty = 0.5f;
    p[4].max_tokens = 7;
    p[5].logprobs = 0;
    p[5].min_tokens = 20;
    p[5].ignore_eos = false;

    Out want[N_REQ], got[N_REQ];
    /* one at a time (spec is off beyond 4 running sequences; below, a batch of 3) */
    for (int i = 0; i < N_REQ; i++) {
        EngineStats a = run(m, &plain, &p[i], 1, &want[i]);
        if (i == 3) { /* a stop id: request 3's 12th token ends it now */
            p[3].n_stop_ids = 1;
            p[3].stop_ids[0] = want[3].ids[11];
            a = run(m, &plain, &p[i], 1, &want[i]);
            CHECK(want[3].finish == FINISH_STOP, "the stop id ends request 3");
        }
        EngineStats b = run(m, &spec, &p[i], 1, &got[i]);
        char what[32];
        snprintf(what, sizeof what, "alone %d", i);
        check_same(&want[i], &got[i], 1, what);
        CHECK(a.spec_draft_tokens == 0, "no drafts without speculative decoding");
        if (i == 0)
            CHECK(b.spec_accepted_tokens > 0 && b.spec_accepted_tokens < b.spec_draft_tokens && b.steps < a.steps,
                  "greedy request 0: some drafts kept, some not (%llu of %llu), fewer steps (%llu vs %llu)",
                  (unsigned long long)b.spec_accepted_tokens, (unsigned long long)b.spec_draft_tokens,
                  (unsigned long long)b.steps, (unsigned long long)a.steps);
    }

    /* Batches. The CPU's matmul sums in another order above 8 tokens a step (prefill tiles), so a
     * batch is compared with the same batch without drafts, 2 requests x (1 + 3) tokens keeping
     * every decode step within 8: the sampled request and the greedy one with logprobs. */
    EngineOptions spec3 = spec;
    spec3.spec_tokens = 3;
    EngineParams pair[2] = {p[1], p[5]};
    Out bp[2], bsp[2];
    run(m, &plain, pair, 2, bp);
    EngineStats bs = run(m, &spec3, pair, 2, bsp);
    check_same(bp, bsp, 2, "batch of 2");
    CHECK(bs.spec_draft_tokens > 0, "drafts in the batch (%llu)", (unsigned long long)bs.spec_draft_tokens);

    /* A pool of 5 blocks of 16 (a model loaded for it) for two requests of 48 tokens: preemption,
     * then recomputation (in prefill tiles, at other points than without drafts, so greedy
     * requests: same tokens). */
    EngineOptions tight = spec, tight_plain = plain;
    tight.kv_blocks = tight_plain.kv_blocks = 5;
    tight.max_model_len = tight_plain.max_model_len = 64;
    StModel *st2 = random_weights_build("small-qwen3", false, &cfg, &gen, &err);
    ModelOptions mo2 = engine_model_options(&tight, &cfg, be->ops);
    Model *m2 = st2 ? model_create(&cfg, &gen, st2, be, &mo2, "small-qwen3", &err) : NULL;
    CHECK(m2 != NULL, "model_create (small pool): %s", err.msg);
    if (!m2) return test_finish();
    EngineParams greedy2[2] = {p[0], p[0]};
    greedy2[0].max_tokens = greedy2[1].max_tokens = 40;
    Out tp[2], ts[2];
    run(m2, &tight_plain, greedy2, 2, tp);
    EngineStats ps = run(m2, &tight, greedy2, 2, ts);
    model_free(m2);
    CHECK(ps.preemptions > 0 && ps.spec_accepted_tokens > 0, "the small pool preempts (%llu), drafts kept (%llu)",
          (unsigned long long)ps.preemptions, (unsigned long long)ps.spec_accepted_tokens);
    for (int i = 0; i < 2; i++)
        CHECK(tp[i].n == 40 && ts[i].n == 40 && !memcmp(tp[i].ids, ts[i].ids, sizeof tp[i].ids),
              "preempted request %d: the same tokens with drafts as without", i);

    /* Prefix caching: request 0, then its prompt and output as a new prompt, which finds the
     * blocks the first filled while decoding with drafts in the cache; the same tokens as on an
     * engine without drafts. */
    Out chain[2][2];
    EngineStats cs[2];
    for (int k = 0; k < 2; k++) {
        Engine *e = engine_create(m, k ? &spec : &plain, &err);
        CHECK(e != NULL, "engine_create: %s", err.msg);
        if (!e) return test_finish();
        memset(chain[k], 0, sizeof chain[k]);
        CHECK(engine_add(e, kPrompt[0], 8, &p[0], collect, &chain[k][0], NULL, &err) == 0, "engine_add: %s", err.msg);
        engine_run_until_idle(e);
        int32_t longer[48];
        memcpy(longer, kPrompt[0], sizeof kPrompt[0]);
        memcpy(longer + 8, chain[k][0].ids, 40 * sizeof *longer);
        CHECK(engine_add(e, longer, 48, &p[0], collect, &chain[k][1], NULL, &err) == 0, "engine_add: %s", err.msg);
        engine_run_until_idle(e);
        cs[k] = engine_stats(e);
        engine_free(e);
    }
    CHECK(cs[1].prefix_hit_tokens >= 32 && cs[1].spec_accepted_tokens > 0,
          "the second prompt found the blocks filled with drafts (%llu tokens)", (unsigned long long)cs[1].prefix_hit_tokens);
    check_same(chain[0], chain[1], 2, "prefix-cached");

    /* Options out of range are refused. */
    EngineOptions bad = spec;
    bad.spec_tokens = ENGINE_MAX_SPEC_TOKENS + 1;
    CHECK(engine_create(m, &bad, &err) == NULL && strstr(err.msg, "speculative"), "too many draft tokens: %s", err.msg);
    bad = spec;
    bad.spec_ngram_min = 3;
    bad.spec_ngram_max = 2;
    CHECK(engine_create(m, &bad, &err) == NULL && strstr(err.msg, "n-gram"), "min above max: %s", err.msg);

    model_free(m);
    be->ops->destroy(be);
    return test_finish();
}
