/* bench_serve.c — `quill bench serve`: drives an OpenAI-compatible server with streaming
 * requests and measures it the way `vllm bench serve` does (TTFT, TPOT, ITL, E2E latency,
 * request and token throughput), so figures can be compared across servers.
 *
 * One thread runs every request through a libcurl multi handle: arrivals follow a Poisson (or
 * gamma, --burstiness) process at --request-rate, capped at --max-concurrency in flight.
 * Timestamps are taken when a chunk's bytes reach the write callback, so with many streams in one
 * thread a chunk may be stamped a little late; at the rates a single server sustains that error
 * is far below a decode step, and a single thread keeps the client from competing with the server
 * for cores on small machines. A chunk counts as a token when it carries text (vLLM counts any
 * chunk; quill sends the role chunk before the first token, which must not count as TTFT).
 * Output token counts come from the server's usage (stream_options.include_usage), falling back
 * to the number of text chunks. */
#include "bench/bench_serve.h"

#include <curl/curl.h>
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "text/tokenizer.h"
#include "util/strbuf.h"

typedef struct Args {
    const char *base_url, *endpoint, *model, *dataset, *dataset_path, *tokenizer, *json_path, *api_key;
    int input_len, output_len, num_prompts, max_concurrency;
    bool output_len_given, ignore_eos;
    double request_rate, burstiness, temperature;
    uint64_t seed;
} Args;

typedef struct Prompt {
    char *text;      /* NULL when sent as token ids */
    int32_t *ids;
    int prompt_len, output_len;
} Prompt;

typedef struct Req {
    int idx;
    CURL *h;
    struct curl_slist *hdrs;
    char *body;
    StrBuf pending; /* bytes of an incomplete SSE line */
    StrBuf errbody;
    double t_start, t_last, ttft, latency;
    bool first, saw_done;
    double *itl;
    int n_itl, cap_itl;
    double *tok_times; /* when each text chunk arrived */
    int n_times, cap_times;
    int chunks, usage_tokens;
    long status;
    bool ok;
    char *error;
} Req;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void *xrealloc(void *p, size_t n) {
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fputs("quill bench serve: out of memory\n", stderr);
        abort();
    }
    return q;
}

/* ------------------------------------------------------------------ random numbers */

typedef struct Rng {
    uint64_t s;
} Rng;

static uint64_t rng_next(Rng *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static double rng_uniform(Rng *r) { return ((rng_next(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0); } /* (0, 1) */

static double rng_normal(Rng *r) {
    return sqrt(-2.0 * log(rng_uniform(r))) * cos(6.283185307179586 * rng_uniform(r));
}

/* Gamma(shape k, scale theta) by Marsaglia and Tsang; k < 1 via the k + 1 boost. */
static double rng_gamma(Rng *r, double k, double theta) {
    if (k < 1) return rng_gamma(r, k + 1, theta) * pow(rng_uniform(r), 1.0 / k);
    double d = k - 1.0 / 3, c = 1 / sqrt(9 * d);
    for (;;) {
        double x = rng_normal(r), v = 1 + c * x;
        if (v <= 0) continue;
        v = v * v * v;
        double u = rng_uniform(r);
        if (log(u) < 0.5 * x * x + d - d * v + d * log(v)) return d * v * theta;
    }
}

/* ------------------------------------------------------------------ datasets */

static int random_dataset(const Args *a, const Tok *tok, Prompt *ps, Rng *rng) {
    int32_t vocab = tok ? tok_vocab_size(tok) : 32000;
    for (int i = 0; i < a->num_prompts; i++) {
        Prompt *p = &ps[i];
        p->ids = xrealloc(NULL, (size_t)a->input_len * sizeof *p->ids);
        for (int k = 0; k < a->input_len; k++) {
            int32_t id;
            size_t len;
            do id = (int32_t)(rng_next(rng) % (uint64_t)vocab);
            while (tok && (tok_is_special(tok, id) || !tok_token_bytes(tok, id, &len)));
            p->ids[k] = id;
        }
        p->prompt_len = a->input_len;
        p->output_len = a->output_len;
        if (tok && !strcmp(a->endpoint, "/v1/chat/completions")) {
            QErr err;
            if (!(p->text = tok_decode(tok, p->ids, (size_t)a->input_len, 1, NULL, &err))) {
                fprintf(stderr, "quill bench serve: %s\n", err.msg);
                return -1;
            }
        }
    }
    return 0;
}

/* ShareGPT: the first human turn is the prompt, the reply's length the output length; pairs with
 * fewer than 4 tokens on either side, prompts over 1024 tokens or pairs over 2048 are skipped. */
static int sharegpt_dataset(const Args *a, const Tok *tok, Prompt *ps, Rng *rng) {
    json_error_t je;
    json_t *root = json_load_file(a->dataset_path, 0, &je);
    if (!root || !json_is_array(root)) {
        fprintf(stderr, "quill bench serve: %s: %s\n", a->dataset_path,
                root ? "expected a JSON list of {\"conversations\": [...]}" : je.text);
        json_decref(root);
        return -1;
    }
    size_t n = json_array_size(root);
    size_t *order = xrealloc(NULL, (n ? n : 1) * sizeof *order);
    for (size_t i = 0; i < n; i++) order[i] = i;
    for (size_t i = n; i > 1; i--) { /* Fisher-Yates with the seed */
        size_t j = rng_next(rng) % i, t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
    int got = 0;
    for (size_t oi = 0; oi < n && got < a->num_prompts; oi++) {
        json_t *conv = json_object_get(json_array_get(root, order[oi]), "conversations");
        if (!json_is_array(conv) || json_array_size(conv) < 2) continue;
        json_t *q = json_object_get(json_array_get(conv, 0), "value"), *r = json_object_get(json_array_get(conv, 1), "value");
        if (!json_is_string(q) || !json_is_string(r)) continue;
        QErr err;
        int32_t *ids = NULL, *rids = NULL;
        size_t nq = 0, nr = 0;
        if (tok_encode(tok, json_string_value(q), json_string_length(q), &ids, &nq, &err) ||
            tok_encode(tok, json_string_value(r), json_string_length(r), &rids, &nr, &err)) {
            free(ids);
            continue;
        }
        free(rids);
        int out = a->output_len_given ? a->output_len : (int)nr;
        if (nq < 4 || (!a->output_len_given && nr < 4) || nq > 1024 || nq + (size_t)out > 2048) {
            free(ids);
            continue;
        }
        Prompt *p = &ps[got++];
        p->ids = ids;
        p->text = strdup(json_string_value(q));
        p->prompt_len = (int)nq;
        p->output_len = out;
    }
    free(order);
    json_decref(root);
    if (got < a->num_prompts) {
        fprintf(stderr, "quill bench serve: %s has only %d usable conversations (need %d)\n", a->dataset_path, got,
                a->num_prompts);
        return -1;
    }
    return 0;
}

/* ------------------------------------------------------------------ requests */

static char *request_body(const Args *a, const Prompt *p) {
    bool chat = !strcmp(a->endpoint, "/v1/chat/completions");
    json_t *o = json_object();
    json_object_set_new(o, "model", json_string(a->model));
    if (chat) {
        json_t *msgs = json_pack("[{s:s, s:s}]", "role", "user", "content", p->text);
        json_object_set_new(o, "messages", msgs);
        json_object_set_new(o, "max_completion_tokens", json_integer(p->output_len));
    } else {
        if (p->text) {
            json_object_set_new(o, "prompt", json_string(p->text));
        } else {
            json_t *ids = json_array();
            for (int i = 0; i < p->prompt_len; i++) json_array_append_new(ids, json_integer(p->ids[i]));
            json_object_set_new(o, "prompt", ids);
        }
        json_object_set_new(o, "max_tokens", json_integer(p->output_len));
    }
    json_object_set_new(o, "temperature", json_real(a->temperature));
    json_object_set_new(o, "stream", json_true());
    json_object_set_new(o, "stream_options", json_pack("{s:b}", "include_usage", 1));
    if (a->ignore_eos) json_object_set_new(o, "ignore_eos", json_true());
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

static bool has_text(json_t *choice) {
    static const char *const keys[] = {"text", "content", "reasoning_content", "reasoning"};
    json_t *delta = json_object_get(choice, "delta");
    for (int i = 0; i < 4; i++) {
        json_t *v = json_object_get(i == 0 ? choice : delta, keys[i]);
        if (json_is_string(v) && json_string_length(v) > 0) return true;
    }
    return json_array_size(json_object_get(delta, "tool_calls")) > 0;
}

/* One SSE line ("data: {...}"). */
static void on_line(Req *r, const char *line, double t) {
    if (strncmp(line, "data:", 5)) return;
    line += 5;
    while (*line == ' ') line++;
    if (!strcmp(line, "[DONE]")) {
        r->saw_done = true;
        return;
    }
    json_t *v = json_loads(line, 0, NULL);
    if (!v) return;
    json_t *choices = json_object_get(v, "choices");
    if (json_array_size(choices) > 0 && has_text(json_array_get(choices, 0))) {
        if (!r->first) {
            r->first = true;
            r->ttft = t - r->t_start;
        } else {
            if (r->n_itl == r->cap_itl) r->itl = xrealloc(r->itl, (size_t)(r->cap_itl = r->cap_itl ? 2 * r->cap_itl : 64) * sizeof *r->itl);
            r->itl[r->n_itl++] = t - r->t_last;
        }
        if (r->n_times == r->cap_times)
            r->tok_times = xrealloc(r->tok_times, (size_t)(r->cap_times = r->cap_times ? 2 * r->cap_times : 64) * sizeof *r->tok_times);
        r->tok_times[r->n_times++] = t;
        r->t_last = t;
        r->chunks++;
    }
    json_t *u = json_object_get(v, "usage");
    if (json_is_object(u) && json_is_integer(json_object_get(u, "completion_tokens")))
        r->usage_tokens = (int)json_integer_value(json_object_get(u, "completion_tokens"));
    json_decref(v);
}

static size_t on_data(char *data, size_t size, size_t nmemb, void *user) {
    Req *r = user;
    size_t n = size * nmemb;
    double t = now();
    if (!r->status) curl_easy_getinfo(r->h, CURLINFO_RESPONSE_CODE, &r->status);
    if (r->status != 200) {
        if (r->errbody.len < 4096) sb_append(&r->errbody, data, n);
        return n;
    }
    sb_append(&r->pending, data, n);
    size_t start = 0;
    for (size_t i = 0; i < r->pending.len; i++) {
        if (r->pending.s[i] != '\n') continue;
        size_t end = i;
        if (end > start && r->pending.s[end - 1] == '\r') end--;
        r->pending.s[end] = '\0';
        if (end > start) on_line(r, r->pending.s + start, t);
        start = i + 1;
    }
    memmove(r->pending.s, r->pending.s + start, r->pending.len - start);
    r->pending.len -= start;
    r->pending.s[r->pending.len] = '\0';
    return n;
}

static int start_request(CURLM *multi, const Args *a, const Prompt *p, Req *r, const char *url) {
    r->body = request_body(a, p);
    r->usage_tokens = -1;
    if (!r->body || !(r->h = curl_easy_init())) return -1;
    r->hdrs = curl_slist_append(NULL, "Content-Type: application/json");
    if (a->api_key) {
        StrBuf h = {0};
        sb_printf(&h, "Authorization: Bearer %s", a->api_key);
        r->hdrs = curl_slist_append(r->hdrs, sb_str(&h));
        sb_free(&h);
    }
    curl_easy_setopt(r->h, CURLOPT_URL, url);
    curl_easy_setopt(r->h, CURLOPT_HTTPHEADER, r->hdrs);
    curl_easy_setopt(r->h, CURLOPT_POSTFIELDS, r->body);
    curl_easy_setopt(r->h, CURLOPT_WRITEFUNCTION, on_data);
    curl_easy_setopt(r->h, CURLOPT_WRITEDATA, r);
    curl_easy_setopt(r->h, CURLOPT_PRIVATE, r);
    curl_easy_setopt(r->h, CURLOPT_TCP_NODELAY, 1L);
    curl_easy_setopt(r->h, CURLOPT_NOSIGNAL, 1L);
    r->t_start = now();
    return curl_multi_add_handle(multi, r->h) == CURLM_OK ? 0 : -1;
}

static void finish_request(CURLM *multi, Req *r, CURLcode code) {
    r->latency = now() - r->t_start;
    curl_easy_getinfo(r->h, CURLINFO_RESPONSE_CODE, &r->status);
    StrBuf e = {0};
    if (code != CURLE_OK)
        sb_printf(&e, "%s", curl_easy_strerror(code));
    else if (r->status != 200)
        sb_printf(&e, "HTTP %ld: %s", r->status, sb_str(&r->errbody));
    else if (!r->first)
        sb_puts(&e, "the stream carried no text");
    else
        r->ok = true;
    if (!r->ok) r->error = sb_take(&e);
    curl_multi_remove_handle(multi, r->h);
    curl_easy_cleanup(r->h);
    curl_slist_free_all(r->hdrs);
    free(r->body);
    sb_free(&r->pending);
    sb_free(&r->errbody);
    r->h = NULL;
    r->hdrs = NULL;
    r->body = NULL;
}

/* ------------------------------------------------------------------ statistics */

static int cmp_double(const void *x, const void *y) {
    double a = *(const double *)x, b = *(const double *)y;
    return (a > b) - (a < b);
}

typedef struct Stat {
    double mean, median, std, p99;
} Stat;

/* numpy's default (linear) percentile over sorted v. */
static double percentile(const double *v, int n, double q) {
    if (n == 0) return 0;
    double pos = q / 100.0 * (n - 1);
    int lo = (int)floor(pos), hi = lo + 1 < n ? lo + 1 : lo;
    return v[lo] + (v[hi] - v[lo]) * (pos - lo);
}

static Stat stats(double *v, int n) {
    Stat s = {0};
    if (n == 0) return s;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    double sum = 0, sq = 0;
    for (int i = 0; i < n; i++) sum += v[i];
    s.mean = sum / n;
    for (int i = 0; i < n; i++) sq += (v[i] - s.mean) * (v[i] - s.mean);
    s.std = sqrt(sq / n);
    s.median = percentile(v, n, 50);
    s.p99 = percentile(v, n, 99);
    return s;
}

static void row_i(const char *k, long long v) { printf("%-40s %-10lld\n", k, v); }
static void row_f(const char *k, double v) { printf("%-40s %-10.2f\n", k, v); }

static void banner(const char *title, char fill) {
    int n = (int)strlen(title), left = (50 - n) / 2, right = 50 - n - left;
    for (int i = 0; i < left; i++) putchar(fill);
    fputs(title, stdout);
    for (int i = 0; i < right; i++) putchar(fill);
    putchar('\n');
}

static void print_stat(const char *section, const char *name, Stat s) {
    char k[64];
    banner(section, '-');
    snprintf(k, sizeof k, "Mean %s (ms):", name);
    row_f(k, s.mean * 1e3);
    snprintf(k, sizeof k, "Median %s (ms):", name);
    row_f(k, s.median * 1e3);
    snprintf(k, sizeof k, "P99 %s (ms):", name);
    row_f(k, s.p99 * 1e3);
}

static void json_stat(json_t *o, const char *name, Stat s) {
    char k[64];
    snprintf(k, sizeof k, "mean_%s_ms", name);
    json_object_set_new(o, k, json_real(s.mean * 1e3));
    snprintf(k, sizeof k, "median_%s_ms", name);
    json_object_set_new(o, k, json_real(s.median * 1e3));
    snprintf(k, sizeof k, "std_%s_ms", name);
    json_object_set_new(o, k, json_real(s.std * 1e3));
    snprintf(k, sizeof k, "p99_%s_ms", name);
    json_object_set_new(o, k, json_real(s.p99 * 1e3));
}

/* ------------------------------------------------------------------ main */

static void usage(FILE *f) {
    fprintf(f,
            "usage: quill bench serve --base-url URL --model NAME [options]\n"
            "  --base-url URL           server root, e.g. http://127.0.0.1:8000\n"
            "  --endpoint PATH          /v1/completions (default) or /v1/chat/completions\n"
            "  --model NAME             the served model name\n"
            "  --dataset random|sharegpt (default random; also --dataset-name)\n"
            "  --input-len N            random: prompt tokens (default 1024)\n"
            "  --output-len N           tokens to generate (default 128; sharegpt: the reply's length)\n"
            "  --dataset-path FILE      sharegpt: the JSON file\n"
            "  --tokenizer PATH         tokenizer.json or its directory (default: MODEL if it is one);\n"
            "                           needed by sharegpt and by random prompts for chat\n"
            "  --num-prompts N          requests to send (default 1000)\n"
            "  --max-concurrency C      requests in flight at most (default: no limit)\n"
            "  --request-rate R         requests per second, Poisson arrivals (default inf: all at once)\n"
            "  --burstiness B           gamma shape of the arrivals (default 1 = Poisson)\n"
            "  --ignore-eos             ask the server to ignore end-of-sequence (vLLM extension)\n"
            "  --temperature T          sampling temperature (default 0)\n"
            "  --seed S                 dataset seed (default 0)\n"
            "  --api-key KEY            bearer token (default $OPENAI_API_KEY)\n"
            "  --json FILE              also write the results as JSON (vLLM's keys)\n");
}

static int parse_args(int argc, char **argv, Args *a) {
    *a = (Args){.endpoint = "/v1/completions", .dataset = "random", .input_len = 1024, .output_len = 128,
                .num_prompts = 1000, .request_rate = INFINITY, .burstiness = 1.0, .api_key = getenv("OPENAI_API_KEY")};
    for (int i = 1; i < argc; i++) {
        const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(k, "-h") || !strcmp(k, "--help")) {
            usage(stdout);
            return 1;
        }
        if (!strcmp(k, "--ignore-eos")) {
            a->ignore_eos = true;
            continue;
        }
        if (!v) {
            fprintf(stderr, "quill bench serve: %s needs a value\n", k);
            return -1;
        }
        i++;
        char *end = NULL;
        double num = strtod(v, &end);
        bool is_num = end != v && *end == '\0';
        bool is_int = is_num && num == floor(num) && num >= 0 && num < 2147483648.0;
        if (!strcmp(k, "--base-url")) a->base_url = v;
        else if (!strcmp(k, "--endpoint")) a->endpoint = v;
        else if (!strcmp(k, "--model")) a->model = v;
        else if (!strcmp(k, "--dataset") || !strcmp(k, "--dataset-name")) a->dataset = v;
        else if (!strcmp(k, "--dataset-path")) a->dataset_path = v;
        else if (!strcmp(k, "--tokenizer")) a->tokenizer = v;
        else if (!strcmp(k, "--json")) a->json_path = v;
        else if (!strcmp(k, "--api-key")) a->api_key = v;
        else if ((!strcmp(k, "--input-len") || !strcmp(k, "--random-input-len")) && is_int && num >= 1) a->input_len = (int)num;
        else if ((!strcmp(k, "--output-len") || !strcmp(k, "--random-output-len")) && is_int && num >= 1) {
            a->output_len = (int)num;
            a->output_len_given = true;
        } else if (!strcmp(k, "--num-prompts") && is_int && num >= 1) a->num_prompts = (int)num;
        else if (!strcmp(k, "--max-concurrency") && is_int && num >= 1) a->max_concurrency = (int)num;
        else if (!strcmp(k, "--request-rate") && (!strcmp(v, "inf") || (is_num && num > 0)))
            a->request_rate = !strcmp(v, "inf") ? INFINITY : num;
        else if (!strcmp(k, "--burstiness") && is_num && num > 0) a->burstiness = num;
        else if (!strcmp(k, "--temperature") && is_num && num >= 0) a->temperature = num;
        else if (!strcmp(k, "--seed") && is_int) a->seed = (uint64_t)num;
        else {
            fprintf(stderr, "quill bench serve: bad option or value: %s %s\n", k, v);
            return -1;
        }
    }
    if (!a->base_url || !a->model) {
        fprintf(stderr, "quill bench serve: --base-url and --model are required\n");
        return -1;
    }
    if (strcmp(a->dataset, "random") && strcmp(a->dataset, "sharegpt")) {
        fprintf(stderr, "quill bench serve: --dataset must be random or sharegpt\n");
        return -1;
    }
    if (!strcmp(a->dataset, "sharegpt") && !a->dataset_path) {
        fprintf(stderr, "quill bench serve: --dataset sharegpt needs --dataset-path FILE\n");
        return -1;
    }
    if (strcmp(a->endpoint, "/v1/completions") && strcmp(a->endpoint, "/v1/chat/completions")) {
        fprintf(stderr, "quill bench serve: --endpoint must be /v1/completions or /v1/chat/completions\n");
        return -1;
    }
    return 0;
}

static Tok *open_tokenizer(const Args *a, bool required) {
    const char *path = a->tokenizer ? a->tokenizer : a->model;
    QErr err;
    Tok *t = access(path, F_OK) == 0 ? tok_load(path, &err) : NULL;
    if (!t && (required || a->tokenizer))
        fprintf(stderr, "quill bench serve: %s\n",
                a->tokenizer || access(path, F_OK) == 0 ? err.msg : "this dataset needs --tokenizer PATH");
    return t;
}

int bench_serve_main(int argc, char **argv) {
    Args a;
    int pr = parse_args(argc, argv, &a);
    if (pr) return pr > 0 ? 0 : 2;
    bool chat = !strcmp(a.endpoint, "/v1/chat/completions");
    bool need_tok = !strcmp(a.dataset, "sharegpt") || chat;
    Tok *tok = open_tokenizer(&a, need_tok);
    if (need_tok && !tok) return 1;

    Rng rng = {a.seed ^ 0x5eedull};
    Prompt *ps = calloc((size_t)a.num_prompts, sizeof *ps);
    Req *reqs = calloc((size_t)a.num_prompts, sizeof *reqs);
    double *arrival = calloc((size_t)a.num_prompts, sizeof *arrival);
    int rc = 1;
    if (!ps || !reqs || !arrival) goto out;
    if (!strcmp(a.dataset, "random") ? random_dataset(&a, tok, ps, &rng) : sharegpt_dataset(&a, tok, ps, &rng)) goto out;
    double t = 0;
    for (int i = 0; i < a.num_prompts; i++) {
        arrival[i] = t;
        if (isfinite(a.request_rate)) t += rng_gamma(&rng, a.burstiness, 1.0 / (a.request_rate * a.burstiness));
    }

    StrBuf url = {0};
    size_t bl = strlen(a.base_url);
    sb_append(&url, a.base_url, bl && a.base_url[bl - 1] == '/' ? bl - 1 : bl);
    sb_puts(&url, a.endpoint);
    char conc[32] = "unlimited";
    if (a.max_concurrency) snprintf(conc, sizeof conc, "%d", a.max_concurrency);
    printf("quill bench serve: %d prompts (%s) -> %s, request rate %g, max concurrency %s\n", a.num_prompts, a.dataset,
           sb_str(&url), a.request_rate, conc);
    fflush(stdout);

    curl_global_init(CURL_GLOBAL_DEFAULT);
    CURLM *multi = curl_multi_init();
    curl_multi_setopt(multi, CURLMOPT_MAX_HOST_CONNECTIONS, 0L);
    int next = 0, active = 0, done = 0, peak_active = 0;
    double t0 = now();
    while (done < a.num_prompts) {
        double el = now() - t0;
        while (next < a.num_prompts && arrival[next] <= el && (!a.max_concurrency || active < a.max_concurrency)) {
            Req *r = &reqs[next];
            r->idx = next;
            if (start_request(multi, &a, &ps[next], r, sb_str(&url))) {
                r->error = strdup("cannot start the request (libcurl)");
                done++;
            } else {
                active++;
            }
            next++;
        }
        if (active > peak_active) peak_active = active;
        int running = 0;
        curl_multi_perform(multi, &running);
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(multi, &left))) {
            if (m->msg != CURLMSG_DONE) continue;
            Req *r;
            curl_easy_getinfo(m->easy_handle, CURLINFO_PRIVATE, (char **)&r);
            finish_request(multi, r, m->data.result);
            active--;
            done++;
        }
        if (done >= a.num_prompts) break;
        int wait_ms = 100;
        if (next < a.num_prompts && (!a.max_concurrency || active < a.max_concurrency)) {
            double dt = arrival[next] - (now() - t0);
            wait_ms = dt <= 0 ? 0 : dt < 0.1 ? (int)(dt * 1e3) + 1 : 100;
        }
        curl_multi_poll(multi, NULL, 0, wait_ms, NULL);
    }
    double duration = now() - t0;
    curl_multi_cleanup(multi);
    curl_global_cleanup();
    sb_free(&url);

    /* Aggregate over the successful requests. */
    int completed = 0, failed = 0;
    long long in_tokens = 0, out_tokens = 0;
    double *ttft = calloc((size_t)a.num_prompts, sizeof *ttft), *tpot = calloc((size_t)a.num_prompts, sizeof *tpot),
           *e2e = calloc((size_t)a.num_prompts, sizeof *e2e);
    int n_tpot = 0, n_itl = 0;
    for (int i = 0; i < a.num_prompts; i++) n_itl += reqs[i].ok ? reqs[i].n_itl : 0;
    double *itl = calloc((size_t)n_itl + 1, sizeof *itl);
    int bins = (int)duration + 1, *per_sec = calloc((size_t)bins + 1, sizeof *per_sec);
    json_t *j_in = json_array(), *j_out = json_array(), *j_ttft = json_array(), *j_itl = json_array(), *j_err = json_array();
    n_itl = 0;
    for (int i = 0; i < a.num_prompts; i++) {
        Req *r = &reqs[i];
        int out = r->usage_tokens >= 0 ? r->usage_tokens : r->chunks;
        json_array_append_new(j_in, json_integer(ps[i].prompt_len));
        json_array_append_new(j_out, json_integer(r->ok ? out : 0));
        json_array_append_new(j_ttft, json_real(r->ok ? r->ttft : 0));
        json_t *li = json_array();
        json_array_append_new(j_err, json_string(r->error ? r->error : ""));
        if (!r->ok) {
            failed++;
            json_array_append_new(j_itl, li);
            continue;
        }
        completed++;
        in_tokens += ps[i].prompt_len;
        out_tokens += out;
        ttft[completed - 1] = r->ttft;
        e2e[completed - 1] = r->latency;
        if (out > 1) tpot[n_tpot++] = (r->latency - r->ttft) / (out - 1);
        for (int k = 0; k < r->n_itl; k++) {
            itl[n_itl++] = r->itl[k];
            json_array_append_new(li, json_real(r->itl[k]));
        }
        json_array_append_new(j_itl, li);
        for (int k = 0; k < r->n_times; k++) {
            int b = (int)(r->tok_times[k] - t0);
            if (b >= 0 && b <= bins) per_sec[b]++;
        }
    }
    int peak_tps = 0;
    for (int b = 0; b <= bins; b++)
        if (per_sec[b] > peak_tps) peak_tps = per_sec[b];
    Stat s_ttft = stats(ttft, completed), s_tpot = stats(tpot, n_tpot), s_itl = stats(itl, n_itl), s_e2e = stats(e2e, completed);

    banner(" Serving Benchmark Result ", '=');
    row_i("Successful requests:", completed);
    row_i("Failed requests:", failed);
    if (a.max_concurrency) row_i("Maximum request concurrency:", a.max_concurrency);
    if (isfinite(a.request_rate))
        row_f("Request rate configured (RPS):", a.request_rate);
    else
        printf("%-40s %-10s\n", "Request rate configured (RPS):", "inf");
    row_f("Benchmark duration (s):", duration);
    row_i("Total input tokens:", in_tokens);
    row_i("Total generated tokens:", out_tokens);
    row_f("Request throughput (req/s):", completed / duration);
    row_f("Output token throughput (tok/s):", out_tokens / duration);
    row_f("Peak output token throughput (tok/s):", peak_tps);
    row_f("Peak concurrent requests:", peak_active);
    row_f("Total token throughput (tok/s):", (in_tokens + out_tokens) / duration);
    print_stat("Time to First Token", "TTFT", s_ttft);
    print_stat("Time per Output Token (excl. 1st token)", "TPOT", s_tpot);
    print_stat("Inter-token Latency", "ITL", s_itl);
    print_stat("End-to-end Latency", "E2EL", s_e2e);
    banner("", '=');
    for (int i = 0, shown = 0; i < a.num_prompts && shown < 3; i++)
        if (reqs[i].error) {
            fprintf(stderr, "request %d failed: %s\n", i, reqs[i].error);
            shown++;
        }

    rc = completed > 0 ? 0 : 1;
    json_t *o = json_object();
    char date[32];
    time_t tt = time(NULL);
    struct tm tm;
    localtime_r(&tt, &tm);
    strftime(date, sizeof date, "%Y%m%d-%H%M%S", &tm);
    json_object_set_new(o, "date", json_string(date));
    json_object_set_new(o, "backend", json_string(chat ? "openai-chat" : "openai"));
    json_object_set_new(o, "endpoint", json_string(a.endpoint));
    json_object_set_new(o, "model_id", json_string(a.model));
    json_object_set_new(o, "dataset", json_string(a.dataset));
    json_object_set_new(o, "num_prompts", json_integer(a.num_prompts));
    json_object_set_new(o, "request_rate", isfinite(a.request_rate) ? json_real(a.request_rate) : json_string("inf"));
    json_object_set_new(o, "burstiness", json_real(a.burstiness));
    json_object_set_new(o, "max_concurrency", a.max_concurrency ? json_integer(a.max_concurrency) : json_null());
    json_object_set_new(o, "duration", json_real(duration));
    json_object_set_new(o, "completed", json_integer(completed));
    json_object_set_new(o, "failed", json_integer(failed));
    json_object_set_new(o, "total_input_tokens", json_integer(in_tokens));
    json_object_set_new(o, "total_output_tokens", json_integer(out_tokens));
    json_object_set_new(o, "request_throughput", json_real(completed / duration));
    json_object_set_new(o, "output_throughput", json_real(out_tokens / duration));
    json_object_set_new(o, "total_token_throughput", json_real((in_tokens + out_tokens) / duration));
    json_object_set_new(o, "max_output_tokens_per_s", json_real(peak_tps));
    json_object_set_new(o, "max_concurrent_requests", json_integer(peak_active));
    json_stat(o, "ttft", s_ttft);
    json_stat(o, "tpot", s_tpot);
    json_stat(o, "itl", s_itl);
    json_stat(o, "e2el", s_e2e);
    json_object_set_new(o, "input_lens", j_in);
    json_object_set_new(o, "output_lens", j_out);
    json_object_set_new(o, "ttfts", j_ttft);
    json_object_set_new(o, "itls", j_itl);
    json_object_set_new(o, "errors", j_err);
    if (a.json_path && json_dump_file(o, a.json_path, JSON_INDENT(2))) {
        fprintf(stderr, "quill bench serve: cannot write %s: %s\n", a.json_path, strerror(errno));
        rc = 1;
    }
    json_decref(o);
    free(ttft);
    free(tpot);
    free(e2e);
    free(itl);
    free(per_sec);
out:
    for (int i = 0; ps && reqs && i < a.num_prompts; i++) {
        free(ps[i].text);
        free(ps[i].ids);
        free(reqs[i].itl);
        free(reqs[i].tok_times);
        free(reqs[i].error);
    }
    free(ps);
    free(reqs);
    free(arrival);
    tok_free(tok);
    return rc;
}
