/* engine.c — the engine loop: take new requests and aborts, schedule, run the model, sample,
 * emit events, retire finished requests. The model and the KV cache belong to whichever thread
 * runs the loop; other threads only touch the inbox (under a mutex).
 *
 * A step's token events are delivered while the next step runs: they are queued, and a next step
 * of decodes flushes them right after enqueueing its forward pass, so the front ends' callbacks
 * (wake a client thread, metrics: ~4 us per request on the GPU machine's host) overlap the
 * device's work instead of leaving it idle between steps (a step with prefill flushes them
 * before its forward pass). Any other event flushes the queue first, so a request's events keep
 * their order, and the queue is empty whenever the loop goes idle. */
#include "engine/engine.h"

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#include "engine/scheduler.h"

typedef struct PendingEvent {
    Request *req;
    EngineEvent ev; /* top_ids / top_logprobs point into the arrays below when set */
    int32_t top_ids[ENGINE_MAX_LOGPROBS];
    float top_lp[ENGINE_MAX_LOGPROBS];
} PendingEvent;

struct Engine {
    Model *model;
    EngineOptions opt;
    Scheduler sched;
    SchedOutput out;
    Sampler *sampler;
    StepSeq *seqs;
    int32_t *step_tokens;
    float *logits;           /* host copy of the step's logits [rows][vocab] */
    float *row;              /* one logits row, modified by sampling */
    float *lp_buf;           /* prompt logprob scratch */
    int32_t *lp_ids;
    float *lp_top;
    SamplingParams *dev_params; /* per-row sampling for a device sampler [max_seqs] */
    float *dev_uniform;
    int32_t *dev_ids;
    Rng *dev_rng_saved;
    bool *dev_sampled; /* per step item: its token was sampled on the device [max_seqs] */

    pthread_mutex_t mu;
    pthread_cond_t cv;
    Request **inbox;         /* added, not yet seen by the loop */
    int n_inbox, cap_inbox;
    uint64_t *aborts;
    int n_aborts, cap_aborts;
    PendingEvent *pending;   /* token events to deliver [max_seqs + step_drafts] (see the top) */
    int n_pending;
    Request **live;          /* every request the loop owns */
    int n_live, cap_live;
    uint64_t next_id;
    EngineStats stats;
    pthread_t thread;
    bool thread_running, stopping;
    char *failure; /* set once (under mu) when the backend fails; see engine_failure */
    int32_t eos[2 * CONFIG_MAX_EOS]; /* the model's ids that end generation (model_eos_ids) */
    int n_eos;
};

const char *finish_reason_name(FinishReason r) {
    switch (r) {
    case FINISH_STOP: return "stop";
    case FINISH_LENGTH: return "length";
    case FINISH_ABORT: return "abort";
    default: return "";
    }
}

EngineParams engine_params_default(void) {
    return (EngineParams){.sampling = sampling_greedy(), .max_tokens = 16, .logprobs = -1, .prompt_logprobs = -1};
}

EngineOptions engine_default_options(const QwenConfig *cfg) {
    EngineOptions o = {.max_seqs = 1, .max_step_tokens = 512, .block_size = 16, .prefix_caching = true};
    o.max_model_len = cfg->max_position_embeddings < 32768 ? cfg->max_position_embeddings : 32768;
    return o;
}

static int kv_blocks_for(const EngineOptions *o, const QwenConfig *cfg, const BackendOps *ops) {
    if (o->kv_blocks > 0) return o->kv_blocks;
    long one_seq = (o->max_model_len + o->block_size - 1) / o->block_size;
    long all = one_seq * o->max_seqs;
    if (o->kv_all_seqs) return (int)all;
    size_t value_bytes = (size_t)kv_dtype_bytes(ops, o->kv_dtype);
    size_t per_token = (size_t)cfg->num_hidden_layers * 2 * cfg->num_key_value_heads * cfg->head_dim * value_bytes;
    size_t budget = o->kv_bytes ? o->kv_bytes : (size_t)1 << 30;
    long blocks = (long)(budget / (per_token * o->block_size));
    if (blocks > all) blocks = all;
    if (blocks < one_seq) blocks = one_seq; /* at least one full-length request must fit */
    return (int)blocks;
}

/* Speculative decoding by n-gram lookup (vLLM's "ngram" method, prompt lookup decoding): for a
 * sequence in decode, the tokens that followed the latest earlier occurrence of its last n tokens
 * (n from spec_ngram_max down to spec_ngram_min) are drafted after its pending token, and one
 * step computes them all (like a prefill chunk, a row of logits each). The rows are then sampled
 * in order, exactly as one token per step would be (same masks, penalties and random draws), and
 * the step keeps tokens while each equals the draft that the next row was computed on: the first
 * that differs, or the one after the last draft, is the next pending token. So the output is the
 * one decoding without drafts gives (on the host's sampler; a GPU step with drafts samples on the
 * host), in fewer steps when the text repeats itself or its prompt. A verification costs more
 * than a plain decode step (more tokens through every matmul: ~2x at 5 tokens on a 2-core CPU or
 * Hopper's int4 kernels), so each sequence's draft length adapts: 1 at first, doubled (up to
 * spec_tokens) after a step that kept every draft, cut to the number kept (at least 1) after one
 * that did not. Drafts are made only while at most kSpecMaxSeqs sequences run: larger batches are
 * on their way from memory-bound to compute-bound, where verifying drafts costs about what it
 * saves. */
enum { kSpecMaxSeqs = 4 };

/* Draft tokens a step can hold: spec_tokens for each of at most kSpecMaxSeqs sequences. */
static int step_drafts(const EngineOptions *o) {
    return (o->max_seqs < kSpecMaxSeqs ? o->max_seqs : kSpecMaxSeqs) * o->spec_tokens;
}

/* Prompt tokens of prompt-logprobs requests per step (Scheduler.max_prompt_logit_tokens): each
 * returns a row of logits (600 KB for Qwen3's vocabulary), so long steps would otherwise need
 * logits buffers of max_step_tokens rows (5 GB at vLLM's 8192-token GPU steps). */
static int prompt_logit_tokens(const EngineOptions *o) {
    return o->max_step_tokens < 1024 ? o->max_step_tokens : 1024;
}

/* Rows of logits a step can return: one per sequence and speculative draft, plus the
 * prompt-logprobs tokens. */
static int logit_rows(const EngineOptions *o) {
    if (o->every_logit) return o->max_step_tokens;
    long rows = (long)o->max_seqs + step_drafts(o) + prompt_logit_tokens(o);
    return rows < o->max_step_tokens ? (int)rows : o->max_step_tokens;
}

ModelOptions engine_model_options(const EngineOptions *o, const QwenConfig *cfg, const BackendOps *ops) {
    return (ModelOptions){
        .max_step_tokens = o->max_step_tokens,
        .max_seqs = o->max_seqs,
        .max_logit_rows = logit_rows(o),
        .max_ctx = o->max_model_len,
        .kv_blocks = kv_blocks_for(o, cfg, ops),
        .kv_mem_fraction = o->kv_mem_fraction,
        .block_size = o->block_size,
        .kv_dtype = o->kv_dtype,
        .embed_resident = o->embed_resident,
    };
}

Engine *engine_create(Model *m, const EngineOptions *o, QErr *err) {
    Engine *e = calloc(1, sizeof *e);
    if (!e) goto oom;
    pthread_mutex_init(&e->mu, NULL);
    pthread_cond_init(&e->cv, NULL);
    e->model = m;
    e->opt = *o;
    if (o->max_seqs > m->opt.max_seqs || o->max_step_tokens > m->opt.max_step_tokens ||
        o->max_model_len > m->opt.max_ctx || logit_rows(o) > m->opt.max_logit_rows) {
        qerr_set(err, "engine options exceed what the model was loaded for");
        engine_free(e);
        return NULL;
    }
    if (o->spec_tokens < 0 || o->spec_tokens > ENGINE_MAX_SPEC_TOKENS ||
        (o->spec_tokens && (o->spec_ngram_min < 1 || o->spec_ngram_max < o->spec_ngram_min))) {
        qerr_set(err, "speculative decoding: 0..%d draft tokens and n-gram sizes 1 <= min <= max (got %d tokens, %d..%d)",
                 ENGINE_MAX_SPEC_TOKENS, o->spec_tokens, o->spec_ngram_min, o->spec_ngram_max);
        engine_free(e);
        return NULL;
    }
    int V = m->cfg.vocab_size;
    if (sched_init(&e->sched, o->max_step_tokens, o->max_seqs, m->kv_shape.n_blocks, m->kv_shape.block_size,
                   o->prefix_caching))
        goto oom;
    e->sched.max_prompt_logit_tokens = prompt_logit_tokens(o);
    e->out.items = calloc((size_t)o->max_seqs, sizeof *e->out.items);
    e->seqs = calloc((size_t)o->max_seqs, sizeof *e->seqs);
    e->step_tokens = malloc((size_t)o->max_step_tokens * sizeof *e->step_tokens);
    e->sampler = sampler_create(V);
    e->row = malloc((size_t)V * sizeof *e->row);
    e->lp_buf = malloc((size_t)o->max_step_tokens * sizeof *e->lp_buf);
    e->lp_ids = malloc((size_t)o->max_step_tokens * ENGINE_MAX_LOGPROBS * sizeof *e->lp_ids);
    e->lp_top = malloc((size_t)o->max_step_tokens * ENGINE_MAX_LOGPROBS * sizeof *e->lp_top);
    e->logits = malloc((size_t)logit_rows(o) * V * sizeof *e->logits);
    e->dev_params = malloc((size_t)o->max_seqs * sizeof *e->dev_params);
    e->dev_uniform = malloc((size_t)o->max_seqs * sizeof *e->dev_uniform);
    e->dev_ids = malloc((size_t)o->max_seqs * sizeof *e->dev_ids);
    e->dev_rng_saved = malloc((size_t)o->max_seqs * sizeof *e->dev_rng_saved);
    e->dev_sampled = malloc((size_t)o->max_seqs * sizeof *e->dev_sampled);
    e->pending = malloc((size_t)(o->max_seqs + step_drafts(o)) * sizeof *e->pending);
    if (!e->pending || !e->out.items || !e->seqs || !e->step_tokens || !e->sampler || !e->row || !e->lp_buf || !e->lp_ids ||
        !e->lp_top || !e->logits || !e->dev_params || !e->dev_uniform || !e->dev_ids || !e->dev_rng_saved ||
        !e->dev_sampled)
        goto oom;
    e->stats.kv_blocks_total = m->kv_shape.n_blocks;
    e->n_eos = model_eos_ids(m, e->eos);
    return e;
oom:
    qerr_set(err, "out of memory creating the engine");
    engine_free(e);
    return NULL;
}

static void request_free(Request *r) {
    if (!r) return;
    if (r->params.constraint.state) r->params.constraint.free(r->params.constraint.state);
    free(r->tokens);
    free(r->blocks);
    free(r);
}

static void flush_events(Engine *e);

void engine_free(Engine *e) {
    if (!e) return;
    engine_stop(e);
    flush_events(e);
    for (int i = 0; i < e->n_live; i++) request_free(e->live[i]);
    for (int i = 0; i < e->n_inbox; i++) request_free(e->inbox[i]);
    free(e->live);
    free(e->inbox);
    free(e->aborts);
    sched_destroy(&e->sched);
    free(e->out.items);
    free(e->seqs);
    free(e->step_tokens);
    sampler_free(e->sampler);
    free(e->row);
    free(e->lp_buf);
    free(e->lp_ids);
    free(e->lp_top);
    free(e->logits);
    free(e->dev_params);
    free(e->dev_uniform);
    free(e->dev_ids);
    free(e->dev_rng_saved);
    free(e->dev_sampled);
    free(e->pending);
    free(e->failure);
    pthread_mutex_destroy(&e->mu);
    pthread_cond_destroy(&e->cv);
    free(e);
}

const Model *engine_model(const Engine *e) { return e->model; }

static int grow(void **arr, int *cap, int n, size_t elem) {
    if (n < *cap) return 0;
    int nc = *cap ? 2 * *cap : 16;
    void *p = realloc(*arr, (size_t)nc * elem);
    if (!p) return -1;
    *arr = p;
    *cap = nc;
    return 0;
}

int engine_add(Engine *e, const int32_t *prompt, int n_prompt, const EngineParams *p, EngineCallback cb, void *user,
               uint64_t *id, QErr *err) {
    const Model *m = e->model;
    if (n_prompt < 1) return qerr_set(err, "prompt is empty: at least one token is needed");
    for (int i = 0; i < n_prompt; i++)
        if (prompt[i] < 0 || prompt[i] >= m->cfg.vocab_size)
            return qerr_set(err, "token id %d at prompt position %d is outside the vocabulary (0..%d)", prompt[i], i,
                            m->cfg.vocab_size - 1);
    if (p->max_tokens < 1) return qerr_set(err, "max_tokens must be at least 1 (got %d)", p->max_tokens);
    if (p->min_tokens < 0 || p->min_tokens > p->max_tokens)
        return qerr_set(err, "min_tokens must be between 0 and max_tokens (got %d)", p->min_tokens);
    if ((long)n_prompt + p->max_tokens > e->opt.max_model_len)
        return qerr_set(err, "prompt (%d tokens) + max_tokens (%d) exceeds the maximum context length %d", n_prompt,
                        p->max_tokens, e->opt.max_model_len);
    if (p->logprobs > ENGINE_MAX_LOGPROBS || p->prompt_logprobs > ENGINE_MAX_LOGPROBS)
        return qerr_set(err, "logprobs must be at most %d", ENGINE_MAX_LOGPROBS);
    if (p->n_stop_ids < 0 || p->n_stop_ids > ENGINE_MAX_STOP_IDS)
        return qerr_set(err, "at most %d stop token ids", ENGINE_MAX_STOP_IDS);
    for (int i = 0; i < p->n_stop_ids; i++)
        if (p->stop_ids[i] < 0 || p->stop_ids[i] >= m->cfg.vocab_size)
            return qerr_set(err, "stop token id %d is outside the vocabulary", p->stop_ids[i]);
    if (sampling_validate(&p->sampling, m->cfg.vocab_size, err)) return -1;

    Request *r = calloc(1, sizeof *r);
    int cap = n_prompt + p->max_tokens;
    if (!r || !(r->tokens = malloc((size_t)cap * sizeof *r->tokens)) ||
        !(r->blocks = malloc((size_t)sched_blocks_for(&e->sched, cap) * sizeof *r->blocks))) {
        request_free(r);
        return qerr_set(err, "out of memory");
    }
    memcpy(r->tokens, prompt, (size_t)n_prompt * sizeof *prompt);
    r->n_prompt = n_prompt;
    r->params = *p;
    r->cb = cb;
    r->user = user;
    rng_init(&r->rng, &p->sampling);
    pthread_mutex_lock(&e->mu);
    if (e->failure) {
        qerr_set(err, "the engine has stopped serving: %s", e->failure);
        pthread_mutex_unlock(&e->mu);
        r->params.constraint.state = NULL; /* still the caller's */
        request_free(r);
        return -1;
    }
    if (grow((void **)&e->inbox, &e->cap_inbox, e->n_inbox, sizeof *e->inbox)) {
        pthread_mutex_unlock(&e->mu);
        r->params.constraint.state = NULL;
        request_free(r);
        return qerr_set(err, "out of memory");
    }
    r->id = ++e->next_id;
    e->inbox[e->n_inbox++] = r;
    e->stats.waiting++;
    if (id) *id = r->id;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    return 0;
}

void engine_abort(Engine *e, uint64_t id) {
    pthread_mutex_lock(&e->mu);
    if (!grow((void **)&e->aborts, &e->cap_aborts, e->n_aborts, sizeof *e->aborts)) e->aborts[e->n_aborts++] = id;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
}

const char *engine_failure(Engine *e) {
    pthread_mutex_lock(&e->mu);
    const char *f = e->failure;
    pthread_mutex_unlock(&e->mu);
    return f;
}

EngineStats engine_stats(Engine *e) {
    pthread_mutex_lock(&e->mu);
    EngineStats s = e->stats;
    pthread_mutex_unlock(&e->mu);
    return s;
}

/* Delivers the queued token events, in the order they happened. */
static void flush_events(Engine *e) {
    for (int i = 0; i < e->n_pending; i++) {
        PendingEvent *p = &e->pending[i];
        if (p->ev.top_ids) p->ev.top_ids = p->top_ids, p->ev.top_logprobs = p->top_lp;
        p->req->cb(p->req->user, &p->ev);
    }
    e->n_pending = 0;
}

/* Queues a step's token event (one per request and step, or one per kept draft and the token
 * after them: the queue holds max_seqs + step_drafts). */
static void queue_event(Engine *e, Request *r, const EngineEvent *ev) {
    PendingEvent *p = &e->pending[e->n_pending++];
    p->req = r;
    p->ev = *ev;
    if (ev->top_ids) {
        memcpy(p->top_ids, ev->top_ids, (size_t)ev->n_top * sizeof *p->top_ids);
        memcpy(p->top_lp, ev->top_logprobs, (size_t)ev->n_top * sizeof *p->top_lp);
    }
}

static void finish(Engine *e, Request *r, FinishReason why) {
    flush_events(e);
    r->finish = why;
    sched_remove(&e->sched, r);
    EngineEvent ev = {.id = r->id, .token = -1, .finish = why, .n_prompt = r->n_prompt, .n_output = r->n_output};
    r->cb(r->user, &ev);
}

/* After a step: if the backend has failed, records why, says so once on stderr and ends every
 * request in flight (the step's results are not to be trusted). Returns true then. */
static bool check_backend(Engine *e) {
    Backend *be = e->model->be;
    const char *why = be->ops->error ? be->ops->error(be) : NULL;
    if (!why) return false;
    pthread_mutex_lock(&e->mu);
    bool first = !e->failure;
    if (first) e->failure = strdup(why);
    pthread_mutex_unlock(&e->mu);
    if (first) fprintf(stderr, "quill: the %s backend failed (%s); ending every request\n", be->ops->name, why);
    for (int i = 0; i < e->n_live; i++)
        if (e->live[i]->state != REQ_FINISHED) finish(e, e->live[i], FINISH_ABORT);
    return true;
}

/* Moves new requests and aborts into the loop's own structures. */
static void take_inbox(Engine *e) {
    pthread_mutex_lock(&e->mu);
    for (int i = 0; i < e->n_inbox; i++) {
        Request *r = e->inbox[i];
        if (e->failure || grow((void **)&e->live, &e->cap_live, e->n_live, sizeof *e->live) ||
            sched_add(&e->sched, r)) {
            /* A failed engine or out of memory: end it with an abort event rather than lose it. */
            flush_events(e);
            EngineEvent ev = {.id = r->id, .token = -1, .finish = FINISH_ABORT, .n_prompt = r->n_prompt};
            r->cb(r->user, &ev);
            request_free(r);
            continue;
        }
        e->live[e->n_live++] = r;
    }
    e->n_inbox = 0;
    int n_aborts = e->n_aborts;
    uint64_t aborts[64];
    if (n_aborts > 64) n_aborts = 64;
    if (n_aborts) { /* e->aborts is NULL until the first abort: memcpy(NULL, 0) is undefined */
        memcpy(aborts, e->aborts, (size_t)n_aborts * sizeof *aborts);
        memmove(e->aborts, e->aborts + n_aborts, (size_t)(e->n_aborts - n_aborts) * sizeof *aborts);
        e->n_aborts -= n_aborts;
    }
    pthread_mutex_unlock(&e->mu);
    for (int a = 0; a < n_aborts; a++)
        for (int i = 0; i < e->n_live; i++)
            if (e->live[i]->id == aborts[a] && e->live[i]->state != REQ_FINISHED) finish(e, e->live[i], FINISH_ABORT);
}

/* Frees finished requests (after delivering their queued events). */
static void retire_finished(Engine *e) {
    flush_events(e);
    int w = 0;
    for (int i = 0; i < e->n_live; i++) {
        if (e->live[i]->state == REQ_FINISHED)
            request_free(e->live[i]);
        else
            e->live[w++] = e->live[i];
    }
    e->n_live = w;
}

static bool is_stop_token(const Engine *e, const Request *r, int32_t t) {
    if (!r->params.ignore_eos)
        for (int i = 0; i < e->n_eos; i++)
            if (e->eos[i] == t) return true;
    for (int i = 0; i < r->params.n_stop_ids; i++)
        if (r->params.stop_ids[i] == t) return true;
    return false;
}

/* Masks EOS and stop ids while fewer than min_tokens are generated. */
static void mask_min_tokens(const Engine *e, const Request *r, float *row) {
    if (r->n_output >= r->params.min_tokens) return;
    for (int i = 0; i < e->n_eos; i++) row[e->eos[i]] = -INFINITY;
    for (int i = 0; i < r->params.n_stop_ids; i++) row[r->params.stop_ids[i]] = -INFINITY;
}

/* e->row (a copy of `last`) with what the request rules out masked: EOS and stop ids before
 * min_tokens, and what its output constraint forbids. The constraint wins where the two leave no
 * token (e.g. only the end left to a complete JSON object under min_tokens). */
static void constrain(Engine *e, Request *r, const float *last) {
    const OutputConstraint *c = &r->params.constraint;
    const int V = e->model->cfg.vocab_size;
    if (c->state) c->mask(c->state, e->row, V);
    mask_min_tokens(e, r, e->row);
    if (!c->state || r->n_output >= r->params.min_tokens) return;
    for (int i = 0; i < V; i++)
        if (e->row[i] != -INFINITY) return;
    memcpy(e->row, last, (size_t)V * sizeof(float));
    c->mask(c->state, e->row, V);
}

/* Prompt logprobs from rows [row0, row0 + n) computed for prompt positions [pos0, pos0 + n):
 * row j predicts prompt token pos0 + j + 1. */
static void emit_prompt_logprobs(Engine *e, Request *r, const float *rows, int pos0, int n) {
    int V = e->model->cfg.vocab_size, k = r->params.prompt_logprobs;
    int count = 0;
    for (int j = 0; j < n && pos0 + j + 1 < r->n_prompt; j++, count++)
        e->lp_buf[j] = sampler_logprob(e->sampler, rows + (size_t)j * V, r->tokens[pos0 + j + 1], k,
                                       e->lp_ids + (size_t)j * k, e->lp_top + (size_t)j * k);
    if (!count) return;
    EngineEvent ev = {.id = r->id, .token = -1, .n_top = k, .prompt_lp_start = pos0 + 1, .prompt_lp_count = count,
                      .prompt_lp = e->lp_buf, .prompt_top_ids = e->lp_ids, .prompt_top_lp = e->lp_top,
                      .n_prompt = r->n_prompt, .n_output = r->n_output};
    flush_events(e);
    r->cb(r->user, &ev);
}

/* Whether request r's next token needs the host's sampler: logprobs, min_tokens masking,
 * penalties or a logit bias, an output constraint. */
static bool needs_host_sampling(const Request *r) {
    return r->params.logprobs >= 0 || r->n_output < r->params.min_tokens ||
           sampling_needs_host(&r->params.sampling) || r->params.constraint.state;
}

/* Brings this step's logits to where they are sampled. With a device sampler, each row whose
 * request can be sampled there is (only its id crosses: e->dev_sampled[i], the id in e->dev_ids);
 * the rows that need the host get a greedy stand-in on the device (their rng untouched) and only
 * their logits are copied, to their offsets in e->logits. Every row is copied when the backend has
 * no sampler or refuses the parameters, when no row can use it, and in a step with prompt logprobs
 * (several rows per sequence). */
static void fetch_logits(Engine *e, const float *d_logits, int rows) {
    Backend *be = e->model->be;
    const SchedOutput *out = &e->out;
    const size_t row_bytes = (size_t)e->model->cfg.vocab_size * sizeof(float);
    bool device = be->ops->sample && rows > 0;
    int n_device = 0;
    for (int i = 0; i < out->n_items; i++) {
        const StepSeq *q = &e->seqs[i];
        e->dev_sampled[i] = !q->no_logits && !needs_host_sampling(out->items[i].req);
        n_device += e->dev_sampled[i];
        if (q->all_logits) device = false;
    }
    if (device && n_device) {
        const SamplingParams greedy = sampling_greedy();
        int n = 0;
        for (int i = 0; i < out->n_items; i++) {
            if (e->seqs[i].no_logits) continue;
            Request *r = out->items[i].req;
            /* the fields before the (here empty) logit bias: 44 bytes, not 2.4 KB, per row */
            memcpy(&e->dev_params[n], e->dev_sampled[i] ? &r->params.sampling : &greedy,
                   offsetof(SamplingParams, logit_bias));
            e->dev_rng_saved[n] = r->rng;
            e->dev_uniform[n++] = e->dev_sampled[i] ? (float)rng_next(&r->rng) : 0.0f;
        }
        if (be->ops->sample(be, d_logits, rows, e->model->cfg.vocab_size, e->dev_params, e->dev_uniform, e->dev_ids)) {
            for (int i = 0, row = 0; i < out->n_items; i++) {
                if (e->seqs[i].no_logits) continue;
                if (!e->dev_sampled[i])
                    be->ops->to_host(be, (char *)e->logits + row * row_bytes, (const char *)d_logits + row * row_bytes,
                                     row_bytes);
                row++;
            }
            return;
        }
        n = 0;
        for (int i = 0; i < out->n_items; i++)
            if (!e->seqs[i].no_logits) out->items[i].req->rng = e->dev_rng_saved[n++];
    }
    memset(e->dev_sampled, 0, (size_t)out->n_items * sizeof *e->dev_sampled);
    be->ops->to_host(be, e->logits, d_logits, rows * row_bytes);
}

/* The tokens that followed the latest earlier occurrence of the last n tokens of seq[len] (n
 * from n_max down to n_min), at most k of them, into out; returns how many (0: no occurrence). */
static int ngram_drafts(const int32_t *seq, int len, int n_min, int n_max, int k, int32_t *out) {
    for (int n = n_max; n >= n_min; n--) {
        if (n >= len) continue;
        const int32_t *tail = seq + len - n;
        for (int p = len - n - 1; p >= 0; p--) {
            if (seq[p] != tail[0] || memcmp(seq + p, tail, (size_t)n * sizeof *seq)) continue;
            int c = len - (p + n);
            if (c > k) c = k;
            memcpy(out, seq + p + n, (size_t)c * sizeof *out);
            return c;
        }
    }
    return 0;
}

/* Sets each running request's drafts for this step (written after its tokens; n_draft), none for
 * the others. */
static void propose_drafts(Engine *e) {
    Scheduler *s = &e->sched;
    if (!e->opt.spec_tokens) return; /* n_draft stays 0 */
    for (int i = 0; i < s->n_waiting; i++) s->waiting[i]->n_draft = 0;
    for (int i = 0; i < s->n_running; i++) s->running[i]->n_draft = 0;
    if (s->n_running > kSpecMaxSeqs) return;
    for (int i = 0; i < s->n_running; i++) {
        Request *r = s->running[i];
        const int total = r->n_prompt + r->n_output;
        int k = r->params.max_tokens - r->n_output - 1; /* the token after the drafts must fit too */
        const int want = r->draft_len ? r->draft_len : 1;
        if (k > want) k = want;
        if (r->n_output == 0 || r->n_computed != total - 1 || k <= 0) continue; /* not in decode */
        r->n_draft = ngram_drafts(r->tokens, total, e->opt.spec_ngram_min, e->opt.spec_ngram_max, k, r->tokens + total);
    }
}

/* Samples request r's next token from its logits row `logits` (or takes `device_tok`, sampled on
 * the device, when >= 0), appends it, and queues its event (with logprobs, and the finish when it
 * ends the request, which then leaves the scheduler). Returns the token. */
static int32_t emit_token(Engine *e, Request *r, const float *logits, int32_t device_tok) {
    const int V = e->model->cfg.vocab_size;
    int32_t tok = device_tok;
    if (tok < 0) {
        memcpy(e->row, logits, (size_t)V * sizeof(float));
        constrain(e, r, logits);
        tok = sampler_sample(e->sampler, e->row, &r->params.sampling, r->tokens, r->n_prompt, r->tokens + r->n_prompt,
                             r->n_output, &r->rng);
    }
    EngineEvent ev = {.id = r->id, .token = tok, .n_prompt = r->n_prompt};
    int32_t top_ids[ENGINE_MAX_LOGPROBS];
    float top_lp[ENGINE_MAX_LOGPROBS];
    if (r->params.logprobs >= 0) {
        ev.logprob = sampler_logprob(e->sampler, logits, tok, r->params.logprobs, top_ids, top_lp);
        ev.n_top = r->params.logprobs;
        ev.top_ids = top_ids;
        ev.top_logprobs = top_lp;
    }
    if (r->params.constraint.state) r->params.constraint.accept(r->params.constraint.state, tok);
    r->tokens[r->n_prompt + r->n_output++] = tok;
    ev.n_output = r->n_output;
    if (is_stop_token(e, r, tok))
        ev.finish = FINISH_STOP;
    else if (r->n_output >= r->params.max_tokens || r->n_prompt + r->n_output >= e->opt.max_model_len)
        ev.finish = FINISH_LENGTH;
    if (ev.finish) {
        r->finish = ev.finish;
        sched_remove(&e->sched, r);
    }
    queue_event(e, r, &ev);
    return tok;
}

/* After a step computed r's pending token and its n_draft drafts (rows[1 + n_draft] of logits):
 * emits tokens while each equals the draft after it (see above); r->n_computed then counts the
 * pending token and the drafts kept (*kept of them). Returns the tokens emitted. */
static int verify_drafts(Engine *e, Request *r, const float *rows, int *kept) {
    const int V = e->model->cfg.vocab_size, d = r->n_draft;
    int32_t draft[ENGINE_MAX_SPEC_TOKENS];
    memcpy(draft, r->tokens + r->n_prompt + r->n_output, (size_t)d * sizeof *draft);
    r->n_computed++;
    int emitted = 0;
    *kept = 0;
    for (int j = 0; j <= d; j++) {
        const int32_t tok = emit_token(e, r, rows + (size_t)j * V, -1);
        emitted++;
        if (r->state == REQ_FINISHED || j == d || tok != draft[j]) break;
        r->n_computed++;
        ++*kept;
    }
    if (r->state != REQ_FINISHED) sched_cache_blocks(&e->sched, r);
    r->draft_len = *kept < d ? (*kept > 1 ? *kept : 1) : (2 * d < e->opt.spec_tokens ? 2 * d : e->opt.spec_tokens);
    return emitted;
}

int engine_step(Engine *e) {
    take_inbox(e);
    Scheduler *s = &e->sched;
    SchedOutput *out = &e->out;
    propose_drafts(e);
    sched_schedule(s, out);
    if (out->n_items == 0) {
        retire_finished(e);
        pthread_mutex_lock(&e->mu);
        e->stats.running = s->n_running;
        e->stats.waiting = s->n_waiting + e->n_inbox;
        e->stats.kv_blocks_used = s->pool.n_blocks - s->pool.n_free; /* aborts may have freed blocks */
        pthread_mutex_unlock(&e->mu);
        return s->n_running + s->n_waiting;
    }

    /* Lay out the step: tokens in item order, with what each sequence needs back. */
    int t = 0, prompt_tokens = 0;
    for (int i = 0; i < out->n_items; i++) {
        Request *r = out->items[i].req;
        int n = out->items[i].n_tokens;
        bool reaches_end = r->n_computed + n == r->n_prompt + r->n_output + r->n_draft;
        bool in_prompt = r->n_computed < r->n_prompt;
        e->seqs[i] = (StepSeq){
            .n_tokens = n,
            .ctx_len = r->n_computed + n,
            .block_table = r->blocks,
            .all_logits = (in_prompt && r->params.prompt_logprobs >= 0) || r->n_draft > 0,
            .no_logits = !reaches_end && !(in_prompt && r->params.prompt_logprobs >= 0),
        };
        memcpy(e->step_tokens + t, r->tokens + r->n_computed, (size_t)n * sizeof *e->step_tokens);
        t += n;
        if (in_prompt) prompt_tokens += (r->n_prompt - r->n_computed < n ? r->n_prompt - r->n_computed : n);
    }
    Step step = {.n_seqs = out->n_items, .seqs = e->seqs, .tokens = e->step_tokens};
    int rows = 0;
    Model *m = e->model;
    /* The last step's events: while the device runs this step when it is a decode step (replayed,
     * enqueued in microseconds), before it otherwise (enqueueing a prefill chunk takes long
     * enough that a first token waiting for it showed in TTFT) */
    const bool decode_only = t == out->n_items;
    if (!decode_only) retire_finished(e);
    float *d_logits = model_forward(m, &step, &rows);
    if (decode_only) retire_finished(e);
    int V = m->cfg.vocab_size;
    fetch_logits(e, d_logits, rows);
    if (check_backend(e)) return 0;

    /* Sample and update, walking the logit rows in sequence order. */
    int row = 0;
    uint64_t generated = 0, drafted = 0, accepted = 0;
    for (int i = 0; i < out->n_items; i++) {
        Request *r = out->items[i].req;
        const StepSeq *q = &e->seqs[i];
        int n_rows = q->no_logits ? 0 : q->all_logits ? q->n_tokens : 1;
        const float *rows_i = e->logits + (size_t)row * V;
        row += n_rows;
        if (r->n_draft) {
            int kept;
            drafted += (uint64_t)r->n_draft;
            generated += (uint64_t)verify_drafts(e, r, rows_i + (size_t)(n_rows - 1 - r->n_draft) * V, &kept);
            accepted += (uint64_t)kept;
            continue;
        }
        if (q->all_logits) emit_prompt_logprobs(e, r, rows_i, r->n_computed, q->n_tokens);
        r->n_computed += q->n_tokens;
        sched_cache_blocks(s, r);
        if (q->no_logits || r->n_computed < r->n_prompt + r->n_output) continue;
        emit_token(e, r, rows_i + (size_t)(n_rows - 1) * V, e->dev_sampled[i] ? e->dev_ids[row - 1] : -1);
        generated++;
    }

    pthread_mutex_lock(&e->mu);
    e->stats.steps++;
    if (out->n_items > e->stats.peak_step_seqs) e->stats.peak_step_seqs = out->n_items;
    e->stats.prompt_tokens += (uint64_t)prompt_tokens;
    e->stats.generated_tokens += generated;
    e->stats.spec_draft_tokens += drafted;
    e->stats.spec_accepted_tokens += accepted;
    e->stats.preemptions += (uint64_t)out->n_preempted;
    e->stats.prefix_query_tokens = s->prefix_query_tokens;
    e->stats.prefix_hit_tokens = s->prefix_hit_tokens;
    e->stats.running = s->n_running;
    e->stats.waiting = s->n_waiting + e->n_inbox;
    e->stats.kv_blocks_used = s->pool.n_blocks - s->pool.n_free;
    pthread_mutex_unlock(&e->mu);
    if (s->n_running + s->n_waiting == 0) flush_events(e); /* going idle: nothing runs next */
    return s->n_running + s->n_waiting;
}

void engine_run_until_idle(Engine *e) {
    for (;;) {
        int left = engine_step(e);
        pthread_mutex_lock(&e->mu);
        bool more = e->n_inbox > 0 || e->n_aborts > 0;
        pthread_mutex_unlock(&e->mu);
        if (!left && !more) break;
    }
    retire_finished(e);
}

static void *loop_main(void *arg) {
    Engine *e = arg;
    for (;;) {
        pthread_mutex_lock(&e->mu);
        while (!e->stopping && e->n_inbox == 0 && e->n_aborts == 0 && e->sched.n_running == 0 && e->sched.n_waiting == 0)
            pthread_cond_wait(&e->cv, &e->mu);
        bool stop = e->stopping;
        pthread_mutex_unlock(&e->mu);
        if (stop) break;
        engine_step(e);
    }
    return NULL;
}

int engine_start(Engine *e, QErr *err) {
    if (e->thread_running) return 0;
    e->stopping = false;
    if (pthread_create(&e->thread, NULL, loop_main, e)) return qerr_set(err, "cannot start the engine thread");
    e->thread_running = true;
    return 0;
}

void engine_stop(Engine *e) {
    if (!e->thread_running) return;
    pthread_mutex_lock(&e->mu);
    e->stopping = true;
    pthread_cond_signal(&e->cv);
    pthread_mutex_unlock(&e->mu);
    pthread_join(e->thread, NULL);
    e->thread_running = false;
}
