/* metrics.c — counters and fixed-bucket histograms behind one mutex, rendered as Prometheus text
 * on demand. Fixed buckets (vLLM's boundaries) keep an observation O(buckets) with no allocation,
 * which is what lets the engine thread record latencies inline; the price is no quantiles beyond
 * what the buckets resolve. Status codes are kept in a small open list, since a server answers
 * with a handful of them. */
#include "server/metrics.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/strbuf.h"

#define MAX_BUCKETS 24
#define MAX_CODES 32

typedef struct Histogram {
    const char *name, *help;
    const double *bounds;
    int n_bounds;
    uint64_t counts[MAX_BUCKETS]; /* observations <= bounds[i] (not cumulative here) */
    uint64_t total;
    double sum;
} Histogram;

static const double TTFT_BOUNDS[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                                     1.0,   2.5,   5.0,  7.5,  10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0};
static const double ITL_BOUNDS[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2,  0.3,  0.4, 0.5,
                                    0.75, 1.0,   2.5,  5.0,   7.5, 10.0, 20.0, 40.0, 80.0};
static const double E2E_BOUNDS[] = {0.3,  0.5,  0.8,  1.0,  1.5,  2.0,   2.5,   5.0,    10.0,   15.0,  20.0,
                                    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0};

static const char *const REASONS[] = {"stop", "length", "abort"};
#define N_REASONS 3

struct Metrics {
    pthread_mutex_t mu;
    char *model;
    int codes[MAX_CODES];
    uint64_t code_counts[MAX_CODES];
    int n_codes;
    uint64_t finished[N_REASONS];
    uint64_t prompt_tokens, generation_tokens;
    Histogram ttft, itl, e2e;
    int active;
};

static void hist_init(Histogram *h, const char *name, const char *help, const double *b, int n) {
    h->name = name;
    h->help = help;
    h->bounds = b;
    h->n_bounds = n;
}

Metrics *metrics_new(const char *model_name) {
    Metrics *m = calloc(1, sizeof *m);
    if (!m) return NULL;
    if (!(m->model = strdup(model_name))) {
        free(m);
        return NULL;
    }
    pthread_mutex_init(&m->mu, NULL);
    hist_init(&m->ttft, "quill:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
              TTFT_BOUNDS, (int)(sizeof TTFT_BOUNDS / sizeof *TTFT_BOUNDS));
    hist_init(&m->itl, "quill:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
              ITL_BOUNDS, (int)(sizeof ITL_BOUNDS / sizeof *ITL_BOUNDS));
    hist_init(&m->e2e, "quill:e2e_request_latency_seconds", "Histogram of end-to-end request latency in seconds.",
              E2E_BOUNDS, (int)(sizeof E2E_BOUNDS / sizeof *E2E_BOUNDS));
    return m;
}

void metrics_free(Metrics *m) {
    if (!m) return;
    pthread_mutex_destroy(&m->mu);
    free(m->model);
    free(m);
}

void metrics_http_status(Metrics *m, int status) {
    pthread_mutex_lock(&m->mu);
    int i = 0;
    while (i < m->n_codes && m->codes[i] != status) i++;
    if (i == m->n_codes && m->n_codes < MAX_CODES) m->codes[m->n_codes++] = status;
    if (i < m->n_codes) m->code_counts[i]++;
    pthread_mutex_unlock(&m->mu);
}

void metrics_request_done(Metrics *m, const char *finish_reason, int prompt_tokens, int generated_tokens) {
    pthread_mutex_lock(&m->mu);
    for (int i = 0; i < N_REASONS; i++)
        if (!strcmp(finish_reason, REASONS[i])) m->finished[i]++;
    m->prompt_tokens += (uint64_t)(prompt_tokens > 0 ? prompt_tokens : 0);
    m->generation_tokens += (uint64_t)(generated_tokens > 0 ? generated_tokens : 0);
    pthread_mutex_unlock(&m->mu);
}

static void observe(Metrics *m, Histogram *h, double v) {
    pthread_mutex_lock(&m->mu);
    int i = 0;
    while (i < h->n_bounds && v > h->bounds[i]) i++;
    if (i < h->n_bounds) h->counts[i]++;
    h->total++;
    h->sum += v;
    pthread_mutex_unlock(&m->mu);
}

void metrics_ttft(Metrics *m, double s) { observe(m, &m->ttft, s); }
void metrics_itl(Metrics *m, double s) { observe(m, &m->itl, s); }
void metrics_e2e(Metrics *m, double s) { observe(m, &m->e2e, s); }

void metrics_active_add(Metrics *m, int delta) {
    pthread_mutex_lock(&m->mu);
    m->active += delta;
    pthread_mutex_unlock(&m->mu);
}

int metrics_active(Metrics *m) {
    pthread_mutex_lock(&m->mu);
    int a = m->active;
    pthread_mutex_unlock(&m->mu);
    return a;
}

/* Label values escape backslash, double quote and newline. */
static void put_label(StrBuf *b, const char *v) {
    for (; *v; v++) {
        if (*v == '\\') sb_puts(b, "\\\\");
        else if (*v == '"') sb_puts(b, "\\\"");
        else if (*v == '\n') sb_puts(b, "\\n");
        else sb_append(b, v, 1);
    }
}

static void header(StrBuf *b, const char *name, const char *type, const char *help) {
    sb_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void series(StrBuf *b, const Metrics *m, const char *name, const char *extra_key, const char *extra_val) {
    sb_printf(b, "%s{model_name=\"", name);
    put_label(b, m->model);
    sb_puts(b, "\"");
    if (extra_key) {
        sb_printf(b, ",%s=\"", extra_key);
        put_label(b, extra_val);
        sb_puts(b, "\"");
    }
    sb_puts(b, "} ");
}

/* One unlabelled sample with its HELP and TYPE lines (%.17g: counters print as exact integers). */
static void scalar(StrBuf *b, const Metrics *m, const char *name, const char *type, const char *help, double v) {
    header(b, name, type, help);
    series(b, m, name, NULL, NULL);
    sb_printf(b, "%.17g\n", v);
}

static void render_hist(StrBuf *b, const Metrics *m, const Histogram *h) {
    header(b, h->name, "histogram", h->help);
    StrBuf name = {0};
    sb_printf(&name, "%s_bucket", h->name);
    uint64_t cum = 0;
    char le[32];
    for (int i = 0; i < h->n_bounds; i++) {
        cum += h->counts[i];
        snprintf(le, sizeof le, "%g", h->bounds[i]);
        series(b, m, sb_str(&name), "le", le);
        sb_printf(b, "%llu\n", (unsigned long long)cum);
    }
    series(b, m, sb_str(&name), "le", "+Inf");
    sb_printf(b, "%llu\n", (unsigned long long)h->total);
    sb_free(&name);
    sb_printf(&name, "%s_sum", h->name);
    series(b, m, sb_str(&name), NULL, NULL);
    sb_printf(b, "%.9g\n", h->sum);
    sb_free(&name);
    sb_printf(&name, "%s_count", h->name);
    series(b, m, sb_str(&name), NULL, NULL);
    sb_printf(b, "%llu\n", (unsigned long long)h->total);
    sb_free(&name);
}

char *metrics_render(Metrics *m, const EngineStats *st) {
    StrBuf b = {0};
    pthread_mutex_lock(&m->mu);
    scalar(&b, m, "quill:num_requests_running", "gauge", "Number of sequences in the running batch.", st->running);
    scalar(&b, m, "quill:num_requests_waiting", "gauge", "Number of sequences waiting to be scheduled.", st->waiting);
    scalar(&b, m, "quill:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 means 100 percent).",
           st->kv_blocks_total ? (double)st->kv_blocks_used / st->kv_blocks_total : 0.0);
    scalar(&b, m, "quill:kv_cache_blocks_used", "gauge", "KV-cache blocks in use.", st->kv_blocks_used);
    scalar(&b, m, "quill:kv_cache_blocks_total", "gauge", "KV-cache blocks in the pool.", st->kv_blocks_total);
    scalar(&b, m, "quill:num_preemptions_total", "counter", "Cumulative number of preemptions.", (double)st->preemptions);
    /* vLLM's names: hit rate = hits / queries over prompt tokens. */
    scalar(&b, m, "quill:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
           (double)st->prefix_query_tokens);
    scalar(&b, m, "quill:prefix_cache_hits_total", "counter", "Prompt tokens served from the prefix cache.",
           (double)st->prefix_hit_tokens);
    scalar(&b, m, "quill:prefix_cache_hit_rate", "gauge", "Fraction of prompt tokens served from the prefix cache.",
           st->prefix_query_tokens ? (double)st->prefix_hit_tokens / st->prefix_query_tokens : 0.0);
    scalar(&b, m, "quill:spec_decode_num_draft_tokens_total", "counter", "Speculative draft tokens verified.",
           (double)st->spec_draft_tokens);
    scalar(&b, m, "quill:spec_decode_num_accepted_tokens_total", "counter", "Speculative draft tokens kept.",
           (double)st->spec_accepted_tokens);
    scalar(&b, m, "quill:num_http_requests_active", "gauge", "HTTP requests whose generation state is still held.",
           m->active);

    header(&b, "quill:http_requests_total", "counter", "HTTP responses by status code.");
    for (int i = 0; i < m->n_codes; i++) {
        char code[16];
        snprintf(code, sizeof code, "%d", m->codes[i]);
        series(&b, m, "quill:http_requests_total", "code", code);
        sb_printf(&b, "%llu\n", (unsigned long long)m->code_counts[i]);
    }
    header(&b, "quill:request_success_total", "counter", "Finished engine requests by finish reason.");
    for (int i = 0; i < N_REASONS; i++) {
        series(&b, m, "quill:request_success_total", "finished_reason", REASONS[i]);
        sb_printf(&b, "%llu\n", (unsigned long long)m->finished[i]);
    }
    scalar(&b, m, "quill:prompt_tokens_total", "counter", "Prompt tokens of finished requests.", (double)m->prompt_tokens);
    scalar(&b, m, "quill:generation_tokens_total", "counter", "Generated tokens of finished requests.",
           (double)m->generation_tokens);
    render_hist(&b, m, &m->ttft);
    render_hist(&b, m, &m->itl);
    render_hist(&b, m, &m->e2e);
    pthread_mutex_unlock(&m->mu);
    return sb_take(&b);
}
