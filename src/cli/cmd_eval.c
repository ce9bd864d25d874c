/* cmd_eval.c — `quill eval`: the quality measures a quantization is judged by.
 *
 *   perplexity MODEL --file TEXT   non-overlapping windows of --ctx tokens (tail dropped), each
 *                                  from scratch; PPL over tokens 1..ctx-1 of every window and over
 *                                  the second half (llama-perplexity's convention).
 *   compare BASE QUANT... --file   every model's perplexity, and for each QUANT the mean
 *                                  KL(base || quant) of the next-token distributions and top-1
 *                                  agreement over the same positions (what llama.cpp reports for
 *                                  its quantizations); the base runs once for all of them.
 *
 * Windows run through model_forward with every position's logits (--batch windows per step). */
#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli_common.h"
#include "cli/commands.h"
#include "model/logits.h"

static void usage(FILE *f) {
    fprintf(f,
            "usage: quill eval perplexity MODEL_DIR --file TEXT [--ctx 512] [--batch N] [--json]\n"
            "       quill eval compare BASE_DIR QUANT_DIR... --file TEXT [--ctx 512] [--batch N] [--json]\n"
            "  --device cpu|cuda, -t/--threads N, --kv-cache-dtype auto|fp8 (as `quill run --help`)\n");
}

/* Running sums of one model's scores. */
typedef struct Score {
    double nll_all, nll_half;
    long n_all, n_half;
} Score;

typedef struct Compare {
    double kl;
    long top1, n;
} Compare;

/* Logits of every position of `n_win` windows of `ctx` ids each into out[n_win * ctx][V]. */
static void window_logits(Runtime *rt, const int32_t *ids, int n_win, int ctx, float *out) {
    Model *m = rt->model;
    int bs = m->opt.block_size, per = (ctx + bs - 1) / bs;
    int32_t *tables = malloc((size_t)n_win * per * sizeof *tables);
    StepSeq *seqs = calloc((size_t)n_win, sizeof *seqs);
    for (int w = 0; w < n_win; w++) {
        for (int b = 0; b < per; b++) tables[w * per + b] = w * per + b;
        seqs[w] = (StepSeq){.n_tokens = ctx, .ctx_len = ctx, .block_table = tables + w * per, .all_logits = true};
    }
    Step st = {.n_seqs = n_win, .seqs = seqs, .tokens = ids};
    int rows = 0;
    float *lg = model_forward(m, &st, &rows);
    m->be->ops->to_host(m->be, out, lg, (size_t)rows * m->cfg.vocab_size * sizeof(float));
    free(tables);
    free(seqs);
}

static void score_window(Score *s, const float *lg, const int32_t *ids, int ctx, int V) {
    for (int j = 0; j + 1 < ctx; j++) {
        const float *row = lg + (size_t)j * V;
        double nll = logits_logsumexp(row, V) - row[ids[j + 1]];
        s->nll_all += nll;
        s->n_all++;
        if (j + 1 >= ctx / 2) {
            s->nll_half += nll;
            s->n_half++;
        }
    }
}

static void compare_window(Compare *c, const float *base, const float *quant, int ctx, int V) {
    for (int j = 0; j + 1 < ctx; j++) {
        const float *b = base + (size_t)j * V, *q = quant + (size_t)j * V;
        c->kl += logits_kl(b, q, V);
        int ab = 0, aq = 0;
        for (int v = 1; v < V; v++) {
            if (b[v] > b[ab]) ab = v;
            if (q[v] > q[aq]) aq = v;
        }
        c->top1 += ab == aq;
        c->n++;
    }
}

static void progress(int done, int total, double t0) {
    double el = now_seconds() - t0, eta = done ? el / done * (total - done) : 0;
    int width = 30, fill = total ? done * width / total : width;
    fprintf(stderr, "\r[%.*s%*s] %d/%d windows, %.0f s elapsed, ETA %.0f s ", fill, "##############################",
            width - fill, "", done, total, el, eta);
    if (done == total) fputc('\n', stderr);
}

static char *read_file(const char *path, size_t *len, QErr *err) {
    FILE *f = fopen(path, "rb");
    char *buf = f ? read_stream(f, len) : NULL;
    if (!buf) qerr_set(err, "--file %s: cannot read: %s", path, strerror(errno));
    if (f) fclose(f);
    return buf;
}

static void put_score(json_t *o, const char *name, const Score *s) {
    json_object_set_new(o, name, json_pack("{s:f, s:f, s:I}", "ppl_all", exp(s->nll_all / s->n_all), "ppl_second_half",
                                           exp(s->nll_half / s->n_half), "tokens_scored", (json_int_t)s->n_all));
}

int cmd_eval(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help")) {
        usage(argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    bool compare = !strcmp(argv[1], "compare");
    if (!compare && strcmp(argv[1], "perplexity")) {
        fprintf(stderr, "quill eval: unknown measure '%s' (perplexity, compare)\n", argv[1]);
        return 2;
    }
#define MAX_MODELS 8
    const char *dirs[MAX_MODELS] = {NULL}, *file = NULL;
    int n_dirs = 0, ctx = 512, batch = 1;
    bool json_out = false;
    RuntimeArgs ra = {.need_tokenizer = true};
    QErr err;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int r = parse_runtime_flag(argc, argv, &i, &ra, &err);
        if (r < 0) goto bad;
        if (r > 0) continue;
        if (!strcmp(a, "--file") && v) {
            file = argv[++i];
        } else if (!strcmp(a, "--ctx")) {
            if (parse_int(a, v, 8, 1 << 20, &ctx, &err)) goto bad;
            i++;
        } else if (!strcmp(a, "--batch")) {
            if (parse_int(a, v, 1, 256, &batch, &err)) goto bad;
            i++;
        } else if (!strcmp(a, "--json")) {
            json_out = true;
        } else if (a[0] != '-' && n_dirs < (compare ? MAX_MODELS : 1)) {
            dirs[n_dirs++] = a;
        } else {
            fprintf(stderr, "quill eval: unexpected argument '%s'\n", a);
            usage(stderr);
            return 2;
        }
    }
    if ((compare ? n_dirs < 2 : n_dirs != 1) || !file) {
        usage(stderr);
        return 2;
    }
    ra.max_seqs = batch;
    ra.max_step_tokens = batch * ctx;
    ra.every_logit = true; /* every position of every window is scored */
    ra.max_model_len = ctx;
    Runtime rt[MAX_MODELS];
    memset(rt, 0, sizeof rt);
    int rc = 1;
    size_t len = 0, n_ids = 0;
    char *text = NULL;
    int32_t *ids = NULL;
    float *lg[MAX_MODELS] = {NULL};
    for (int k = 0; k < n_dirs; k++)
        if (runtime_open(&rt[k], dirs[k], &ra, &err)) goto out;
    for (int k = 1; k < n_dirs; k++)
        if (rt[0].model->cfg.vocab_size != rt[k].model->cfg.vocab_size) {
            qerr_set(&err, "%s and %s have different vocabularies", dirs[0], dirs[k]);
            goto out;
        }
    if (!(text = read_file(file, &len, &err)) || tok_encode(rt[0].tok, text, len, &ids, &n_ids, &err)) goto out;
    int V = rt[0].model->cfg.vocab_size;
    int n_win = (int)(n_ids / (size_t)ctx);
    if (n_win < 1) {
        qerr_set(&err, "--file %s has %zu tokens, fewer than one window of --ctx %d", file, n_ids, ctx);
        goto out;
    }
    for (int k = 0; k < n_dirs; k++) lg[k] = malloc((size_t)batch * ctx * V * sizeof(float));
    Score sc[MAX_MODELS] = {{0}};
    Compare cmp[MAX_MODELS] = {{0}};
    double t0 = now_seconds();
    for (int w = 0; w < n_win; w += batch) {
        int nb = n_win - w < batch ? n_win - w : batch;
        const int32_t *wids = ids + (size_t)w * ctx;
        for (int k = 0; k < n_dirs; k++) {
            window_logits(&rt[k], wids, nb, ctx, lg[k]);
            for (int b = 0; b < nb; b++) score_window(&sc[k], lg[k] + (size_t)b * ctx * V, wids + (size_t)b * ctx, ctx, V);
        }
        for (int k = 1; k < n_dirs; k++)
            for (int b = 0; b < nb; b++)
                compare_window(&cmp[k], lg[0] + (size_t)b * ctx * V, lg[k] + (size_t)b * ctx * V, ctx, V);
        progress(w + nb, n_win, t0);
    }
    if (json_out) {
        json_t *o = json_pack("{s:s, s:i, s:i, s:I}", "file", file, "ctx", ctx, "windows", n_win, "tokens", (json_int_t)n_ids);
        put_score(o, compare ? "base" : "model", &sc[0]);
        if (compare) {
            json_t *qs = json_array();
            for (int k = 1; k < n_dirs; k++) {
                json_t *q = json_pack("{s:s}", "dir", dirs[k]);
                put_score(q, "score", &sc[k]);
                json_object_set_new(q, "kl", json_real(cmp[k].kl / cmp[k].n));
                json_object_set_new(q, "top1", json_real((double)cmp[k].top1 / cmp[k].n));
                json_array_append_new(qs, q);
            }
            json_object_set_new(o, "quants", qs);
        }
        char *s = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        puts(s);
        free(s);
        json_decref(o);
    } else {
        for (int k = 0; k < n_dirs; k++)
            printf("%s: perplexity %.4f (all), %.4f (second half) over %d windows of %d tokens\n", dirs[k],
                   exp(sc[k].nll_all / sc[k].n_all), exp(sc[k].nll_half / sc[k].n_half), n_win, ctx);
        for (int k = 1; k < n_dirs; k++)
            printf("%s vs %s: KL(base || quant) %.6f, top-1 agreement %.4f\n", dirs[k], dirs[0], cmp[k].kl / cmp[k].n,
                   (double)cmp[k].top1 / cmp[k].n);
    }
    rc = 0;
out:
    if (rc) fprintf(stderr, "quill eval: %s\n", err.msg);
    free(text);
    free(ids);
    for (int k = 0; k < MAX_MODELS; k++) {
        free(lg[k]);
        runtime_close(&rt[k]);
    }
    return rc;
bad:
    fprintf(stderr, "quill eval: %s\n", err.msg);
    return 2;
}
