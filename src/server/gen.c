/* gen.c — from engine events to what a client reads, for one HTTP request.
 *
 * The engine callback only copies the event into a queue and pokes an eventfd: the engine thread
 * never waits on a slow client, at the price of one copy per token. The HTTP thread then runs
 * each choice's pipeline: token -> incremental UTF-8 detokenizer -> stop-string matcher (holding
 * back the last max_stop-1 bytes, since a match can span tokens) -> reasoning/tool-call parser
 * (chat; the content then to a forced tool_choice's reader, if any) -> the choice's accumulated
 * output. The whole output is kept rather than streamed and forgotten, because a non-streaming
 * response needs it and it is small next to the KV cache.
 *
 * Small internal arrays grow with the StrBuf policy (out of memory aborts): no request could be
 * answered sensibly past that point, and it keeps every consumer path free of half states. */
#include "server/gen.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

#include "text/reasoning.h"

/* One engine event, copied. */
typedef struct QEv {
    int choice;
    int32_t token;
    FinishReason finish;
    float logprob;
    int n_top;
    int32_t top_ids[ENGINE_MAX_LOGPROBS];
    float top_lp[ENGINE_MAX_LOGPROBS];
    int plp_start, plp_count, plp_k; /* prompt logprobs, arrays malloc'd */
    float *plp;
    int32_t *plp_ids;
    float *plp_top;
} QEv;

typedef struct GenPipe {
    TokStream *ts;
    RpParser *rp;
    FtReader *ft;      /* a forced tool_choice's calls, read from the content */
    StrBuf raw;        /* decoded output, before stop strings cut it */
    size_t released;   /* bytes of raw passed on */
    int cap_lps;       /* capacity of the choice's lps */
    bool engine_done;  /* HTTP thread: the engine's last event was applied */
    bool string_stop;  /* under Gen.mu: ended by a stop string (for metrics) */
} GenPipe;

struct Gen {
    Engine *engine;
    const Tok *tok;
    Metrics *metrics;
    GenSpec spec;
    GenChoice *choices;
    int n_choices, n_done;
    size_t max_stop;
    RpEvents rpev;
    double t_start;
    int efd;
    pthread_mutex_t mu; /* guards q, nq, capq, refs, released, pipes' string_stop */
    QEv *q, *spare;
    int nq, capq, cap_spare;
    int refs;           /* 1 for the HTTP side + 1 per engine request not yet finished */
    bool released;
};

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fputs("quill: out of memory\n", stderr);
        abort();
    }
    return q;
}

static char *xstrdup(const char *s) {
    size_t n = strlen(s) + 1;
    return memcpy(xrealloc(NULL, n), s, n);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void gen_random_hex(char *out, int n) {
    static const char HEX[] = "0123456789abcdef";
    static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    static uint64_t counter;
    unsigned char b[64];
    int nb = (n + 1) / 2;
    if (nb > (int)sizeof b) nb = (int)sizeof b;
    if (getrandom(b, (size_t)nb, 0) != nb) {
        /* No entropy source: a clock-and-counter splitmix stream still gives unique ids. */
        pthread_mutex_lock(&mu);
        uint64_t s = (uint64_t)(now() * 1e9) ^ (++counter << 32);
        pthread_mutex_unlock(&mu);
        for (int i = 0; i < nb; i++) {
            uint64_t z = (s += 0x9E3779B97F4A7C15ull);
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
            z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
            b[i] = (unsigned char)(z ^ (z >> 31));
        }
    }
    for (int i = 0; i < n && i / 2 < nb; i++) out[i] = HEX[(b[i / 2] >> (i % 2 ? 0 : 4)) & 15];
    out[n < 2 * nb ? n : 2 * nb] = '\0';
}

void gen_spec_free(GenSpec *s) {
    if (!s) return;
    for (int i = 0; i < s->n_prompts; i++) {
        free(s->prompts[i].ids);
        free(s->prompts[i].text);
    }
    free(s->prompts);
    for (int i = 0; i < s->n_stop; i++) free(s->stop[i]);
    free(s->stop);
    free(s->forced_name);
    for (int i = 0; i < s->format.n_choices; i++) free(s->format.choices[i]);
    free(s->format.choices);
    json_schema_unref(s->format.schema);
    memset(s, 0, sizeof *s);
}

static void qev_free(QEv *e) {
    free(e->plp);
    free(e->plp_ids);
    free(e->plp_top);
}

/* A new tool call of the choice, to name (taken), with no arguments yet. */
static GenToolCall *add_tool_call(GenChoice *c, char *name) {
    c->tools = xrealloc(c->tools, (size_t)(c->n_tools + 1) * sizeof *c->tools);
    GenToolCall *t = &c->tools[c->n_tools++];
    char id[48] = "chatcmpl-tool-";
    gen_random_hex(id + strlen(id), 32);
    *t = (GenToolCall){.id = xstrdup(id), .name = name};
    return t;
}

/* The forced calls' sink (user: the choice). */
static void forced_begin(void *user, const char *name) { add_tool_call(user, xstrdup(name)); }

static void forced_arguments(void *user, const char *bytes, size_t n) {
    GenChoice *c = user;
    sb_append(&c->tools[c->n_tools - 1].arguments, bytes, n);
}

static void gen_destroy(Gen *g) {
    for (int i = 0; i < g->n_choices; i++) {
        GenChoice *c = &g->choices[i];
        sb_free(&c->text);
        sb_free(&c->reasoning);
        for (int k = 0; k < c->n_tools; k++) {
            free(c->tools[k].id);
            free(c->tools[k].name);
            sb_free(&c->tools[k].arguments);
        }
        free(c->tools);
        free(c->lps);
        free(c->prompt_lps);
        free(c->stop_str);
        if (c->pipe) {
            tok_stream_free(c->pipe->ts);
            rp_free(c->pipe->rp);
            ft_free(c->pipe->ft);
            sb_free(&c->pipe->raw);
            free(c->pipe);
        }
    }
    free(g->choices);
    for (int i = 0; i < g->nq; i++) qev_free(&g->q[i]);
    free(g->q);
    free(g->spare);
    rp_events_free(&g->rpev);
    gen_spec_free(&g->spec);
    if (g->efd >= 0) close(g->efd);
    pthread_mutex_destroy(&g->mu);
    if (g->metrics) metrics_active_add(g->metrics, -1);
    free(g);
}

Gen *gen_new(Engine *e, const Tok *tok, Metrics *metrics, GenSpec *spec, QErr *err) {
    Gen *g = calloc(1, sizeof *g);
    if (!g) {
        gen_spec_free(spec);
        qerr_set(err, "out of memory");
        return NULL;
    }
    g->spec = *spec;
    memset(spec, 0, sizeof *spec);
    g->engine = e;
    g->tok = tok;
    g->efd = -1;
    g->refs = 1;
    g->t_start = now();
    pthread_mutex_init(&g->mu, NULL);
    if (metrics) {
        g->metrics = metrics;
        metrics_active_add(metrics, 1);
    }
    for (int i = 0; i < g->spec.n_stop; i++) {
        size_t n = strlen(g->spec.stop[i]);
        if (n > g->max_stop) g->max_stop = n;
    }
    g->n_choices = g->spec.n_prompts * g->spec.n;
    if (!(g->choices = calloc((size_t)g->n_choices, sizeof *g->choices))) goto oom;
    for (int i = 0; i < g->n_choices; i++) {
        GenChoice *c = &g->choices[i];
        c->index = i;
        c->prompt = i / g->spec.n;
        c->gen = g;
        c->stop_token = -1;
        if (!(c->pipe = calloc(1, sizeof *c->pipe))) goto oom;
        if (!(c->pipe->ts = tok_stream_new(tok, g->spec.skip_special, err))) goto fail;
        if (g->spec.chat && !(c->pipe->rp = rp_new(g->spec.thinking, g->spec.tools, err))) goto fail;
        if (g->spec.forced != FORCED_NONE &&
            !(c->pipe->ft = ft_new(g->spec.forced, g->spec.forced_name, (FtSink){forced_begin, forced_arguments, c})))
            goto oom;
        if (g->spec.params.prompt_logprobs >= 0 &&
            !(c->prompt_lps = calloc((size_t)g->spec.prompts[c->prompt].n, sizeof *c->prompt_lps)))
            goto oom;
    }
    if ((g->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0) {
        qerr_set(err, "cannot create an eventfd for the request");
        goto fail;
    }
    return g;
oom:
    qerr_set(err, "out of memory");
fail:
    gen_destroy(g);
    return NULL;
}

/* Engine thread. Copies the event, wakes the HTTP thread, records metrics. */
static void on_engine_event(void *user, const EngineEvent *ev) {
    GenChoice *c = user;
    Gen *g = c->gen;
    Metrics *metrics = g->metrics;
    double t = now(), t_start = g->t_start;
    QEv q = {.choice = c->index, .token = ev->token, .finish = ev->finish};
    if (ev->token >= 0) {
        if (metrics) {
            if (ev->n_output == 1)
                metrics_ttft(metrics, t - t_start);
            else
                metrics_itl(metrics, t - c->t_last);
        }
        c->t_last = t;
        q.logprob = ev->logprob;
        if (ev->top_ids && ev->n_top > 0) {
            q.n_top = ev->n_top;
            memcpy(q.top_ids, ev->top_ids, (size_t)ev->n_top * sizeof *q.top_ids);
            memcpy(q.top_lp, ev->top_logprobs, (size_t)ev->n_top * sizeof *q.top_lp);
        }
    }
    if (ev->prompt_lp_count > 0) {
        int n = ev->prompt_lp_count, k = ev->n_top > 0 ? ev->n_top : 0;
        q.plp_start = ev->prompt_lp_start;
        q.plp_count = n;
        q.plp_k = k;
        q.plp = xrealloc(NULL, (size_t)n * sizeof *q.plp);
        memcpy(q.plp, ev->prompt_lp, (size_t)n * sizeof *q.plp);
        if (k) {
            q.plp_ids = xrealloc(NULL, (size_t)n * k * sizeof *q.plp_ids);
            q.plp_top = xrealloc(NULL, (size_t)n * k * sizeof *q.plp_top);
            memcpy(q.plp_ids, ev->prompt_top_ids, (size_t)n * k * sizeof *q.plp_ids);
            memcpy(q.plp_top, ev->prompt_top_lp, (size_t)n * k * sizeof *q.plp_top);
        }
    }
    bool last = ev->finish != FINISH_NONE;
    pthread_mutex_lock(&g->mu);
    bool keep = !g->released;
    if (keep) {
        if (g->nq == g->capq) {
            g->capq = g->capq ? 2 * g->capq : 16;
            g->q = xrealloc(g->q, (size_t)g->capq * sizeof *g->q);
        }
        g->q[g->nq++] = q;
        uint64_t one = 1;
        (void)!write(g->efd, &one, sizeof one); /* only fails when already readable */
    }
    const char *reason = last && c->pipe->string_stop ? "stop" : finish_reason_name(ev->finish);
    bool destroy = last && --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    if (!keep) qev_free(&q);
    if (last && metrics) {
        metrics_request_done(metrics, reason, ev->n_prompt, ev->n_output);
        metrics_e2e(metrics, t - t_start);
    }
    if (destroy) gen_destroy(g);
}

int gen_submit(Gen *g, QErr *err) {
    for (int i = 0; i < g->n_choices; i++) {
        GenChoice *c = &g->choices[i];
        const GenPrompt *pr = &g->spec.prompts[c->prompt];
        EngineParams p = g->spec.params;
        p.max_tokens = pr->max_tokens;
        if (p.sampling.has_seed) p.sampling.seed += (uint64_t)(i % g->spec.n);
        if (g->spec.format.kind != OUTPUT_TEXT) {
            p.constraint = output_constraint(g->spec.vocab, &g->spec.format, g->spec.chat && g->spec.thinking, p.stop_ids,
                                             p.n_stop_ids);
            if (!p.constraint.state) {
                for (int k = 0; k < i; k++) engine_abort(g->engine, g->choices[k].engine_id);
                return qerr_set(err, "out of memory");
            }
        }
        pthread_mutex_lock(&g->mu);
        g->refs++;
        pthread_mutex_unlock(&g->mu);
        if (engine_add(g->engine, pr->ids, pr->n, &p, on_engine_event, c, &c->engine_id, err)) {
            if (p.constraint.state) p.constraint.free(p.constraint.state);
            pthread_mutex_lock(&g->mu);
            g->refs--;
            pthread_mutex_unlock(&g->mu);
            for (int k = 0; k < i; k++) engine_abort(g->engine, g->choices[k].engine_id);
            return -1;
        }
        c->added = true;
    }
    return 0;
}

int gen_fd(const Gen *g) { return g->efd; }
bool gen_done(const Gen *g) { return g->n_done == g->n_choices; }
const GenSpec *gen_spec(const Gen *g) { return &g->spec; }
int gen_n_choices(const Gen *g) { return g->n_choices; }
GenChoice *gen_choice(Gen *g, int i) { return &g->choices[i]; }

int gen_prompt_tokens(const Gen *g) {
    int n = 0;
    for (int i = 0; i < g->spec.n_prompts; i++) n += g->spec.prompts[i].n;
    return n;
}

int gen_completion_tokens(const Gen *g) {
    int n = 0;
    for (int i = 0; i < g->n_choices; i++) n += g->choices[i].n_gen;
    return n;
}

char *gen_token_text(const Gen *g, int32_t id) {
    QErr err;
    char *s = tok_decode(g->tok, &id, 1, 0, NULL, &err);
    return s ? s : xstrdup("");
}

const char *gen_token_bytes(const Gen *g, int32_t id, size_t *len) {
    const char *s = tok_token_bytes(g->tok, id, len);
    if (!s) {
        *len = 0;
        return "";
    }
    return s;
}

/* Moves the parser's events into the choice's output (a forced call's content to its reader). */
static void take_parsed(Gen *g, GenChoice *c) {
    for (size_t i = 0; i < g->rpev.n; i++) {
        RpEvent *e = &g->rpev.items[i];
        if (e->kind == RP_REASONING) {
            sb_puts(&c->reasoning, e->text);
        } else if (e->kind == RP_CONTENT && c->pipe->ft) {
            ft_feed(c->pipe->ft, e->text, strlen(e->text));
        } else if (e->kind == RP_CONTENT) {
            sb_puts(&c->text, e->text);
        } else {
            sb_puts(&add_tool_call(c, e->name)->arguments, e->arguments);
            e->name = NULL;
        }
    }
    rp_events_clear(&g->rpev);
}

/* Passes raw[released, upto) on: to the parser (chat) or straight to the text. */
static void release(Gen *g, GenChoice *c, size_t upto) {
    GenPipe *p = c->pipe;
    if (upto <= p->released) return;
    const char *s = p->raw.s + p->released;
    size_t n = upto - p->released;
    p->released = upto;
    if (!p->rp) {
        sb_append(&c->text, s, n);
        return;
    }
    QErr err;
    rp_events_clear(&g->rpev);
    if (rp_feed(p->rp, s, n, &g->rpev, &err) < 0) {
        fputs("quill: out of memory\n", stderr);
        abort();
    }
    take_parsed(g, c);
}

static void finish(Gen *g, GenChoice *c, const char *reason) {
    if (c->pipe->rp) {
        QErr err;
        rp_events_clear(&g->rpev);
        if (rp_finish(c->pipe->rp, &g->rpev, &err) < 0) {
            fputs("quill: out of memory\n", stderr);
            abort();
        }
        take_parsed(g, c);
    }
    if (c->pipe->ft) ft_finish(c->pipe->ft);
    c->done = true;
    if (g->spec.forced == FORCED_NAMED)
        c->finish_reason = reason; /* "stop": OpenAI and vLLM keep it for a call they forced by name */
    else if (g->spec.forced == FORCED_REQUIRED)
        /* as vLLM: "tool_calls" when the array ended by itself (not when thinking ran to the end) */
        c->finish_reason = c->n_tools && !strcmp(reason, "stop") ? "tool_calls" : reason;
    else
        c->finish_reason = c->n_tools ? "tool_calls" : reason;
    g->n_done++;
}

/* Looks for a stop string that ends in raw[old, len) (a match may start up to len(stop)-1 bytes
 * earlier). On a match: cuts the output there, ends the choice, aborts its engine request. */
static bool match_stop(Gen *g, GenChoice *c, size_t old) {
    GenPipe *p = c->pipe;
    size_t best = (size_t)-1;
    int which = -1;
    for (int i = 0; i < g->spec.n_stop; i++) {
        size_t ls = strlen(g->spec.stop[i]);
        if (p->raw.len < ls) continue;
        size_t from = old + 1 > ls ? old + 1 - ls : 0;
        const char *hit = memmem(p->raw.s + from, p->raw.len - from, g->spec.stop[i], ls);
        if (hit && (size_t)(hit - p->raw.s) < best) {
            best = (size_t)(hit - p->raw.s);
            which = i;
        }
    }
    if (which < 0) return false;
    p->raw.len = best;
    p->raw.s[best] = '\0';
    release(g, c, best);
    c->stop_str = xstrdup(g->spec.stop[which]);
    pthread_mutex_lock(&g->mu);
    p->string_stop = true;
    pthread_mutex_unlock(&g->mu);
    if (!p->engine_done) engine_abort(g->engine, c->engine_id);
    finish(g, c, "stop");
    return true;
}

static bool is_stop_id(const Gen *g, int32_t t) {
    for (int i = 0; i < g->spec.params.n_stop_ids; i++)
        if (g->spec.params.stop_ids[i] == t) return true;
    return false;
}

static void apply(Gen *g, const QEv *e) {
    GenChoice *c = &g->choices[e->choice];
    GenPipe *p = c->pipe;
    if (e->plp_count > 0 && c->prompt_lps) {
        const GenPrompt *pr = &g->spec.prompts[c->prompt];
        for (int j = 0; j < e->plp_count; j++) {
            int pos = e->plp_start + j;
            if (pos < 1 || pos >= pr->n) continue;
            GenLp *l = &c->prompt_lps[pos];
            l->token = pr->ids[pos];
            l->logprob = e->plp[j];
            l->n_top = e->plp_k;
            for (int k = 0; k < e->plp_k; k++) {
                l->top_ids[k] = e->plp_ids[(size_t)j * e->plp_k + k];
                l->top_lp[k] = e->plp_top[(size_t)j * e->plp_k + k];
            }
        }
    }
    if (e->finish != FINISH_NONE) p->engine_done = true;
    if (c->done || (e->token < 0 && e->finish == FINISH_NONE)) return;
    size_t old = p->raw.len;
    if (e->token >= 0) {
        c->n_gen++;
        if (g->spec.params.logprobs >= 0) {
            if (c->n_lps == p->cap_lps) {
                p->cap_lps = p->cap_lps ? 2 * p->cap_lps : 64;
                c->lps = xrealloc(c->lps, (size_t)p->cap_lps * sizeof *c->lps);
            }
            GenLp *l = &c->lps[c->n_lps++];
            l->token = e->token;
            l->logprob = e->logprob;
            l->n_top = e->n_top;
            memcpy(l->top_ids, e->top_ids, sizeof l->top_ids);
            memcpy(l->top_lp, e->top_lp, sizeof l->top_lp);
        }
        if (e->finish == FINISH_STOP) {
            /* The stop token's text is not part of the output (vLLM). */
            if (is_stop_id(g, e->token)) c->stop_token = e->token;
        } else {
            QErr err;
            size_t n = 0;
            const char *piece = tok_stream_put(p->ts, e->token, &n, &err);
            if (piece) sb_append(&p->raw, piece, n); /* ids the tokenizer lacks decode to nothing */
        }
    }
    if (e->finish != FINISH_NONE) {
        size_t n = 0;
        const char *rest = tok_stream_flush(p->ts, &n);
        sb_append(&p->raw, rest, n);
    }
    /* As in vLLM, stop strings count only once min_tokens have been generated. */
    if (g->spec.n_stop && c->n_gen > g->spec.params.min_tokens && match_stop(g, c, old)) return;
    if (e->finish != FINISH_NONE) {
        release(g, c, p->raw.len);
        finish(g, c, finish_reason_name(e->finish));
        return;
    }
    size_t hold = g->max_stop ? g->max_stop - 1 : 0;
    size_t upto = p->raw.len > hold ? p->raw.len - hold : 0;
    while (upto > p->released && upto < p->raw.len && ((unsigned char)p->raw.s[upto] & 0xC0) == 0x80) upto--;
    release(g, c, upto);
}

int gen_pump(Gen *g) {
    uint64_t v;
    (void)!read(g->efd, &v, sizeof v); /* EAGAIN when nothing was signalled */
    /* Swap the queue with the spare array (the HTTP thread's own), so the engine thread keeps
     * appending while these events are applied. */
    pthread_mutex_lock(&g->mu);
    QEv *q = g->q;
    int n = g->nq, cap = g->capq;
    g->q = g->spare;
    g->capq = g->cap_spare;
    g->nq = 0;
    pthread_mutex_unlock(&g->mu);
    for (int i = 0; i < n; i++) {
        apply(g, &q[i]);
        qev_free(&q[i]);
    }
    g->spare = q;
    g->cap_spare = cap;
    return gen_done(g);
}

void gen_release(Gen *g) {
    for (int i = 0; i < g->n_choices; i++) {
        GenChoice *c = &g->choices[i];
        if (c->added && !c->pipe->engine_done) engine_abort(g->engine, c->engine_id);
    }
    pthread_mutex_lock(&g->mu);
    g->released = true;
    for (int i = 0; i < g->nq; i++) qev_free(&g->q[i]);
    g->nq = 0;
    bool destroy = --g->refs == 0;
    pthread_mutex_unlock(&g->mu);
    if (destroy) gen_destroy(g);
}
