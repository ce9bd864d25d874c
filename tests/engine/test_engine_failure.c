/* test_engine_failure.c — when the backend reports a failure (backend.h's error op; the CUDA
 * backend records e.g. a device out of memory that no op can return), the engine must not hand
 * out the step's tokens: it ends every request in flight with FINISH_ABORT, says why through
 * engine_failure, and refuses new requests. Runs tiny-qwen3's random weights on the CPU backend
 * with its op table copied and the error op injected. */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "../test_util.h"
#include "backend/backend.h"
#include "engine/engine.h"
#include "model/random_weights.h"

static const char *injected; /* what the wrapped backend reports, NULL while healthy */
static const char *injected_error(Backend *be) {
    (void)be;
    return injected;
}

typedef struct Seen {
    int tokens;
    FinishReason finish;
    bool ended;
} Seen;

static void on_event(void *user, const EngineEvent *ev) {
    Seen *s = user;
    if (ev->token >= 0) s->tokens++;
    if (ev->finish != FINISH_NONE) s->finish = ev->finish, s->ended = true;
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
    static BackendOps failing;
    failing = *be->ops;
    failing.error = injected_error;
    be->ops = &failing;

    EngineOptions eo = engine_default_options(&cfg);
    eo.max_seqs = 2;
    eo.max_model_len = 256;
    ModelOptions mo = engine_model_options(&eo, &cfg, be->ops);
    Model *m = model_create(&cfg, &gen, st, be, &mo, "tiny-qwen3", &err);
    CHECK(m != NULL, "model_create: %s", err.msg);
    Engine *e = m ? engine_create(m, &eo, &err) : NULL;
    CHECK(e != NULL, "engine_create: %s", err.msg);
    if (!e) return test_finish();

    const int32_t prompt[] = {9707, 11, 1879, 0, 42};
    EngineParams p = engine_params_default();
    p.max_tokens = 8;
    p.ignore_eos = true;
    Seen a = {0}, b = {0};
    uint64_t id;
    CHECK(engine_add(e, prompt, 5, &p, on_event, &a, &id, &err) == 0, "engine_add: %s", err.msg);
    engine_step(e); /* prefill and the first token */
    engine_step(e); /* delivers the first token; the second waits for the next step */
    CHECK(a.tokens == 1 && !a.ended, "healthy steps: %d tokens delivered (1 expected), ended %d", a.tokens, a.ended);
    CHECK(engine_failure(e) == NULL, "no failure yet");

    injected = "matmul scratch: out of memory";
    CHECK(engine_step(e) == 0, "a failed step leaves no request unfinished");
    CHECK(a.ended && a.finish == FINISH_ABORT && a.tokens == 2,
          "the request in flight ends with an abort and no token from the failed step (%d tokens)", a.tokens);
    const char *why = engine_failure(e);
    CHECK(why && strstr(why, "out of memory"), "engine_failure says why: %s", why ? why : "(null)");
    CHECK(engine_add(e, prompt, 5, &p, on_event, &b, &id, &err) != 0 && strstr(err.msg, "stopped serving") &&
              strstr(err.msg, "out of memory"),
          "a new request is refused, naming the failure: %s", err.msg);
    CHECK(!b.ended && b.tokens == 0, "the refused request gets no events");
    engine_run_until_idle(e);

    engine_free(e);
    model_free(m);
    be->ops->destroy(be);
    return test_finish();
}
