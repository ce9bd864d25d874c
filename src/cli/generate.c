/* generate.c — see generate.h. The engine callback runs on this same thread (the CLI drives
 * engine_step itself), so it may print directly. */
#include "cli/generate.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "text/reasoning.h"
#include "util/strbuf.h"

typedef struct GenState {
    const GenRequest *g;
    const Tok *tok;
    TokStream *stream;
    RpParser *parser;
    RpEvents events;
    StrBuf reasoning, content;
    int32_t *ids;
    int n_ids, cap_ids;
    double t_first, t_last;
    FinishReason finish;
    bool in_reasoning_color;
} GenState;

static void show(GenState *s, const RpEvents *ev) {
    for (size_t i = 0; i < ev->n; i++) {
        const RpEvent *e = &ev->items[i];
        if (e->kind == RP_REASONING) {
            sb_puts(&s->reasoning, e->text);
        } else if (e->kind == RP_CONTENT) {
            sb_puts(&s->content, e->text);
        } else {
            sb_printf(&s->content, "<tool_call>{\"name\": \"%s\", \"arguments\": %s}</tool_call>", e->name, e->arguments);
        }
        if (!s->g->stream) continue;
        bool dim = e->kind == RP_REASONING && s->g->color;
        if (dim != s->in_reasoning_color) {
            fputs(dim ? "\x1b[2m" : "\x1b[0m", stdout);
            s->in_reasoning_color = dim;
        }
        if (e->kind == RP_TOOL_CALL)
            printf("[tool call] %s(%s)\n", e->name, e->arguments);
        else
            fputs(e->text, stdout);
    }
    if (s->g->stream) fflush(stdout);
}

static void feed_text(GenState *s, const char *text, size_t n, bool last) {
    QErr err;
    rp_events_clear(&s->events);
    if (n) rp_feed(s->parser, text, n, &s->events, &err);
    if (last) rp_finish(s->parser, &s->events, &err);
    show(s, &s->events);
}

static void on_event(void *user, const EngineEvent *ev) {
    GenState *s = user;
    if (ev->token >= 0) {
        double t = now_seconds();
        if (!s->n_ids) s->t_first = t;
        s->t_last = t;
        if (s->n_ids == s->cap_ids) {
            s->cap_ids = s->cap_ids ? 2 * s->cap_ids : 256;
            s->ids = realloc(s->ids, (size_t)s->cap_ids * sizeof *s->ids);
        }
        s->ids[s->n_ids++] = ev->token;
        if (s->tok) {
            QErr err;
            size_t n = 0;
            /* The stop token itself (<|im_end|>) is not part of the answer. */
            bool stop = ev->finish == FINISH_STOP;
            const char *text = stop ? "" : tok_stream_put(s->stream, ev->token, &n, &err);
            if (text) feed_text(s, text, n, false);
        }
    }
    if (ev->finish) {
        s->finish = ev->finish;
        if (s->tok) {
            size_t n = 0;
            const char *text = tok_stream_flush(s->stream, &n);
            feed_text(s, text, n, true);
        }
    }
}

/* The schema of --json-schema FILE into f. */
static int load_schema(const char *path, OutputFormat *f, QErr *err) {
    json_error_t je;
    json_t *schema = json_load_file(path, JSON_DECODE_ANY, &je);
    if (!schema) return qerr_set(err, "--json-schema %s: %s (line %d)", path, je.text, je.line);
    static JsonSchema *compiled; /* one command line's */
    compiled = json_schema_compile(schema, err);
    json_decref(schema);
    if (!compiled) return qerr_prefix(err, "--json-schema %s", path);
    f->schema = compiled;
    f->kind = OUTPUT_JSON_SCHEMA;
    return 0;
}

int parse_format_flag(int argc, char **argv, int *i, OutputFormat *f, QErr *err) {
    const char *a = argv[*i];
    const OutputKind kind = !strcmp(a, "--json-object")   ? OUTPUT_JSON_OBJECT
                            : !strcmp(a, "--json-schema") ? OUTPUT_JSON_SCHEMA
                            : !strcmp(a, "--choice")      ? OUTPUT_CHOICE
                                                          : OUTPUT_TEXT;
    if (kind == OUTPUT_TEXT) return 0;
    if (kind != OUTPUT_JSON_OBJECT && (*i + 1 >= argc || !argv[*i + 1][0]))
        return qerr_set(err, "%s needs a %s", a, kind == OUTPUT_CHOICE ? "non-empty text" : "file");
    if (f->kind != OUTPUT_TEXT && (f->kind != kind || kind != OUTPUT_CHOICE))
        return qerr_set(err, "--json-object, --json-schema and --choice exclude each other (at %s)", a);
    if (kind == OUTPUT_JSON_OBJECT) {
        f->kind = kind;
        return 1;
    }
    if (kind == OUTPUT_JSON_SCHEMA) return load_schema(argv[++*i], f, err) ? -1 : 1;
    static char *choices[64]; /* one command line's */
    if (f->n_choices == 64) return qerr_set(err, "--choice: at most 64");
    f->choices = choices;
    f->choices[f->n_choices++] = argv[++*i];
    f->kind = OUTPUT_CHOICE;
    return 1;
}

int generate(Runtime *rt, const int32_t *prompt, int n_prompt, const GenRequest *g, GenResult *res, QErr *err) {
    memset(res, 0, sizeof *res);
    GenState s = {.g = g, .tok = rt->tok};
    if (rt->tok) {
        if (!(s.stream = tok_stream_new(rt->tok, 1, err))) return -1;
        if (!(s.parser = rp_new(g->thinking, false, err))) {
            tok_stream_free(s.stream);
            return -1;
        }
    }
    EngineParams p = engine_params_default();
    p.sampling = g->sampling;
    p.max_tokens = g->max_tokens;
    p.ignore_eos = g->ignore_eos;
    if (g->format.kind != OUTPUT_TEXT) {
        const StructVocab *v = runtime_vocab(rt, err);
        if (v) p.constraint = output_constraint(v, &g->format, g->thinking, NULL, 0);
        if (!p.constraint.state) {
            if (v) qerr_set(err, "out of memory");
            tok_stream_free(s.stream);
            rp_free(s.parser);
            return -1;
        }
    }
    int max_new = rt->eopt.max_model_len - n_prompt;
    if (max_new < 1) {
        tok_stream_free(s.stream);
        rp_free(s.parser);
        return qerr_set(err, "the prompt (%d tokens) does not fit the context length %d", n_prompt, rt->eopt.max_model_len);
    }
    if (p.max_tokens > max_new) p.max_tokens = max_new;
    double t0 = now_seconds();
    int rc = engine_add(rt->engine, prompt, n_prompt, &p, on_event, &s, NULL, err);
    if (rc && p.constraint.state) p.constraint.free(p.constraint.state);
    if (rc == 0) engine_run_until_idle(rt->engine);
    if (s.in_reasoning_color) fputs("\x1b[0m", stdout);
    if (g->stream && rc == 0) {
        fputc('\n', stdout);
        fflush(stdout);
    }
    tok_stream_free(s.stream);
    rp_free(s.parser);
    rp_events_free(&s.events);
    if (rc) {
        sb_free(&s.reasoning);
        sb_free(&s.content);
        free(s.ids);
        return -1;
    }
    res->ids = s.ids;
    res->n_ids = s.n_ids;
    res->reasoning = sb_take(&s.reasoning);
    res->content = sb_take(&s.content);
    res->finish = s.finish;
    double prefill = s.n_ids ? s.t_first - t0 : 0;
    res->prompt_tps = prefill > 0 ? n_prompt / prefill : 0;
    res->gen_tps = s.n_ids > 1 ? (s.n_ids - 1) / (s.t_last - s.t_first) : 0;
    fprintf(stderr, "\nprompt: %d tokens, %.2f tokens/s | generation: %d tokens, %.2f tokens/s | finish: %s\n", n_prompt,
            res->prompt_tps, s.n_ids, res->gen_tps, finish_reason_name(s.finish));
    return 0;
}

void gen_result_free(GenResult *res) {
    free(res->ids);
    free(res->reasoning);
    free(res->content);
    memset(res, 0, sizeof *res);
}
