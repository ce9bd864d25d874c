/* reasoning.c — incremental reasoning / content / tool-call splitter for Qwen3 output.
 *
 * Why a hand-written state machine over text (not token ids, as vLLM does): the engine hands the
 * server decoded UTF-8 chunks, and working on text keeps this independent of the tokenizer. The
 * cost is that a tag can straddle two chunks, so the parser keeps a small pending buffer: at most
 * a tag's length in the reasoning and content states (everything before a possible tag prefix
 * is emitted at once), and the whole body while inside a <tool_call> (a call is only useful
 * complete: it is parsed and emitted when "</tool_call>" arrives). Searching for the closing tag
 * resumes where the last search stopped, so a long tool call costs linear time.
 *
 * States: START (thinking on, waiting to see whether the text opens with "<think>") ->
 * REASONING -> CONTENT <-> TOOL -> DONE. With tools on, content is a series of stretches
 * separated by tool calls; a stretch's opening whitespace is held back until its first other
 * byte, because a stretch that turns out to be only whitespace around a tool call is dropped. */
#include "text/reasoning.h"

#include <jansson.h>
#include <stdlib.h>
#include <string.h>

#include "text/chat_template.h"

static const char THINK_OPEN[] = "<think>";
static const char THINK_CLOSE[] = "</think>";
static const char TOOL_OPEN[] = "<tool_call>";
static const char TOOL_CLOSE[] = "</tool_call>";
#define TAG_LEN(t) (sizeof(t) - 1)

typedef struct Buf {
    char *p;
    size_t n, cap;
} Buf;

static int buf_append(Buf *b, const char *s, size_t n, QErr *err) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 64;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return qerr_set(err, "out of memory");
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
    return 0;
}

static void buf_drop_front(Buf *b, size_t k) {
    memmove(b->p, b->p + k, b->n - k);
    b->n -= k;
}

typedef enum State { ST_START, ST_REASONING, ST_CONTENT, ST_TOOL, ST_DONE } State;

struct RpParser {
    bool tools;
    State st;
    Buf pend;        /* input not yet classified */
    size_t scanned;  /* ST_TOOL: leading bytes of pend that cannot start TOOL_CLOSE */
    Buf ws;          /* tools on: whitespace opening the current content stretch, held */
    bool seg_text;   /* the current stretch has non-whitespace, so it streams as it comes */
    bool had_tool;   /* a tool call was emitted */
    size_t first;    /* index in the caller's list of this call's first event (for merging) */
};

/* ---------------------------------------------------------------- events */

static RpEvent *push_event(RpEvents *out, QErr *err) {
    if (out->n == out->cap) {
        size_t cap = out->cap ? out->cap * 2 : 8;
        RpEvent *items = realloc(out->items, cap * sizeof *items);
        if (!items) {
            qerr_set(err, "out of memory");
            return NULL;
        }
        out->items = items;
        out->cap = cap;
    }
    RpEvent *e = &out->items[out->n++];
    memset(e, 0, sizeof *e);
    return e;
}

static int emit_text(RpParser *p, RpEvents *out, RpKind kind, const char *s, size_t n, QErr *err) {
    if (!n) return 0;
    if (out->n > p->first && out->items[out->n - 1].kind == kind) {
        RpEvent *last = &out->items[out->n - 1];
        size_t m = strlen(last->text);
        char *t = realloc(last->text, m + n + 1);
        if (!t) return qerr_set(err, "out of memory");
        memcpy(t + m, s, n);
        t[m + n] = '\0';
        last->text = t;
        return 0;
    }
    char *t = strndup(s, n);
    if (!t) return qerr_set(err, "out of memory");
    RpEvent *e = push_event(out, err);
    if (!e) {
        free(t);
        return -1;
    }
    e->kind = kind;
    e->text = t;
    return 0;
}

void rp_events_clear(RpEvents *ev) {
    for (size_t i = 0; i < ev->n; i++) {
        free(ev->items[i].text);
        free(ev->items[i].name);
        free(ev->items[i].arguments);
    }
    ev->n = 0;
}

void rp_events_free(RpEvents *ev) {
    rp_events_clear(ev);
    free(ev->items);
    ev->items = NULL;
    ev->cap = 0;
}

/* ---------------------------------------------------------------- scanning helpers */

static long find_tag(const char *s, size_t n, const char *tag, size_t tag_len) {
    const char *hit = memmem(s, n, tag, tag_len);
    return hit ? (long)(hit - s) : -1;
}

/* Length of the longest proper prefix of tag that s ends with: bytes that must wait. */
static size_t partial_tag(const char *s, size_t n, const char *tag, size_t tag_len) {
    for (size_t k = tag_len - 1 < n ? tag_len - 1 : n; k > 0; k--)
        if (!memcmp(s + n - k, tag, k)) return k;
    return 0;
}

static int is_ws(char c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }

/* ---------------------------------------------------------------- content and tool calls */

/* Content known to hold no tag. */
static int content_text(RpParser *p, RpEvents *out, const char *s, size_t n, QErr *err) {
    if (!p->tools || p->seg_text) return emit_text(p, out, RP_CONTENT, s, n, err);
    size_t lead = 0;
    while (lead < n && is_ws(s[lead])) lead++;
    if (lead == n) return buf_append(&p->ws, s, n, err);
    if (emit_text(p, out, RP_CONTENT, p->ws.p, p->ws.n, err)) return -1;
    p->ws.n = 0;
    p->seg_text = true;
    return emit_text(p, out, RP_CONTENT, s, n, err);
}

/* A tool call's JSON text: emits the call, or (malformed) "<tool_call>" + raw as content. */
static int tool_call_done(RpParser *p, RpEvents *out, const char *json, size_t json_len, const char *raw,
                          size_t raw_len, QErr *err) {
    json_t *j = json_loadb(json, json_len, 0, NULL);
    const json_t *name = json_object_get(j, "name");
    if (!json_is_string(name) || strlen(json_string_value(name)) != json_string_length(name)) {
        json_decref(j);
        if (content_text(p, out, TOOL_OPEN, TAG_LEN(TOOL_OPEN), err)) return -1;
        return content_text(p, out, raw, raw_len, err);
    }
    const json_t *args = json_object_get(j, "arguments");
    char *name_s = strdup(json_string_value(name));
    char *args_s = args ? chat_tojson(args, err) : strdup("{}");
    json_decref(j);
    RpEvent *e = name_s && args_s ? push_event(out, err) : NULL;
    if (!e) {
        free(name_s);
        free(args_s);
        return qerr_set(err, "out of memory");
    }
    e->kind = RP_TOOL_CALL;
    e->name = name_s;
    e->arguments = args_s;
    p->ws.n = 0; /* a whitespace-only stretch before the call */
    p->seg_text = false;
    p->had_tool = true;
    return 0;
}

/* ---------------------------------------------------------------- the state machine */

/* Classifies as much of pend as the bytes seen so far allow. */
static int advance(RpParser *p, RpEvents *out, QErr *err) {
    for (;;) {
        Buf *b = &p->pend;
        long i;
        size_t keep;
        switch (p->st) {
        case ST_START:
            if (b->n < TAG_LEN(THINK_OPEN) && !memcmp(b->p, THINK_OPEN, b->n)) return 0; /* maybe "<think>" */
            if (b->n >= TAG_LEN(THINK_OPEN) && !memcmp(b->p, THINK_OPEN, TAG_LEN(THINK_OPEN)))
                buf_drop_front(b, TAG_LEN(THINK_OPEN));
            p->st = ST_REASONING;
            break;
        case ST_REASONING:
            if ((i = find_tag(b->p, b->n, THINK_CLOSE, TAG_LEN(THINK_CLOSE))) >= 0) {
                if (emit_text(p, out, RP_REASONING, b->p, (size_t)i, err)) return -1;
                buf_drop_front(b, (size_t)i + TAG_LEN(THINK_CLOSE));
                p->st = ST_CONTENT;
                break;
            }
            keep = partial_tag(b->p, b->n, THINK_CLOSE, TAG_LEN(THINK_CLOSE));
            if (emit_text(p, out, RP_REASONING, b->p, b->n - keep, err)) return -1;
            buf_drop_front(b, b->n - keep);
            return 0;
        case ST_CONTENT:
            if (!p->tools) {
                if (emit_text(p, out, RP_CONTENT, b->p, b->n, err)) return -1;
                b->n = 0;
                return 0;
            }
            if ((i = find_tag(b->p, b->n, TOOL_OPEN, TAG_LEN(TOOL_OPEN))) >= 0) {
                if (content_text(p, out, b->p, (size_t)i, err)) return -1;
                buf_drop_front(b, (size_t)i + TAG_LEN(TOOL_OPEN));
                p->st = ST_TOOL;
                p->scanned = 0;
                break;
            }
            keep = partial_tag(b->p, b->n, TOOL_OPEN, TAG_LEN(TOOL_OPEN));
            if (content_text(p, out, b->p, b->n - keep, err)) return -1;
            buf_drop_front(b, b->n - keep);
            return 0;
        case ST_TOOL:
            if ((i = find_tag(b->p + p->scanned, b->n - p->scanned, TOOL_CLOSE, TAG_LEN(TOOL_CLOSE))) >= 0) {
                size_t end = p->scanned + (size_t)i;
                if (tool_call_done(p, out, b->p, end, b->p, end + TAG_LEN(TOOL_CLOSE), err)) return -1;
                buf_drop_front(b, end + TAG_LEN(TOOL_CLOSE));
                p->st = ST_CONTENT;
                break;
            }
            p->scanned = b->n >= TAG_LEN(TOOL_CLOSE) ? b->n - (TAG_LEN(TOOL_CLOSE) - 1) : 0;
            return 0;
        case ST_DONE:
            return 0;
        }
    }
}

RpParser *rp_new(bool thinking, bool tools, QErr *err) {
    RpParser *p = calloc(1, sizeof *p);
    if (!p) {
        qerr_set(err, "out of memory");
        return NULL;
    }
    p->tools = tools;
    p->st = thinking ? ST_START : ST_CONTENT;
    /* pend.p is never NULL, so the scanners need no special case */
    if (buf_append(&p->pend, "", 0, err)) {
        free(p);
        return NULL;
    }
    return p;
}

void rp_free(RpParser *p) {
    if (!p) return;
    free(p->pend.p);
    free(p->ws.p);
    free(p);
}

int rp_feed(RpParser *p, const char *text, size_t len, RpEvents *out, QErr *err) {
    if (p->st == ST_DONE) return qerr_set(err, "rp_feed: the parser was already finished");
    size_t start = p->first = out->n;
    if (buf_append(&p->pend, text, len, err) || advance(p, out, err)) return -1;
    return (int)(out->n - start);
}

int rp_finish(RpParser *p, RpEvents *out, QErr *err) {
    if (p->st == ST_DONE) return qerr_set(err, "rp_finish: the parser was already finished");
    size_t start = p->first = out->n;
    Buf *b = &p->pend;
    switch (p->st) {
    case ST_START: /* a lone prefix of "<think>": text like any other reasoning */
    case ST_REASONING:
        if (emit_text(p, out, RP_REASONING, b->p, b->n, err)) return -1;
        break;
    case ST_CONTENT:
        if (content_text(p, out, b->p, b->n, err)) return -1;
        /* a trailing whitespace-only stretch is dropped after a tool call, kept if it is all */
        if (!p->seg_text && !p->had_tool && emit_text(p, out, RP_CONTENT, p->ws.p, p->ws.n, err)) return -1;
        break;
    case ST_TOOL: { /* unterminated: accepted if its JSON is complete (a cut "</tool_c" aside) */
        size_t keep = partial_tag(b->p, b->n, TOOL_CLOSE, TAG_LEN(TOOL_CLOSE));
        if (tool_call_done(p, out, b->p, b->n - keep, b->p, b->n, err)) return -1;
        break;
    }
    case ST_DONE:
        break;
    }
    b->n = 0;
    p->ws.n = 0;
    p->st = ST_DONE;
    return (int)(out->n - start);
}

/* ---------------------------------------------------------------- whole results */

static int append_str(char **dst, const char *s, QErr *err) {
    size_t m = *dst ? strlen(*dst) : 0, n = strlen(s);
    char *t = realloc(*dst, m + n + 1);
    if (!t) return qerr_set(err, "out of memory");
    memcpy(t + m, s, n + 1);
    *dst = t;
    return 0;
}

int rp_collect(const RpEvents *ev, RpResult *res, QErr *err) {
    for (size_t i = 0; i < ev->n; i++) {
        const RpEvent *e = &ev->items[i];
        if (e->kind == RP_REASONING) {
            if (append_str(&res->reasoning, e->text, err)) return -1;
        } else if (e->kind == RP_CONTENT) {
            if (append_str(&res->content, e->text, err)) return -1;
        } else {
            RpToolCall *calls = realloc(res->tool_calls, (res->n_tool_calls + 1) * sizeof *calls);
            if (!calls) return qerr_set(err, "out of memory");
            res->tool_calls = calls;
            RpToolCall *c = &calls[res->n_tool_calls];
            c->name = strdup(e->name);
            c->arguments = strdup(e->arguments);
            if (!c->name || !c->arguments) {
                free(c->name);
                free(c->arguments);
                return qerr_set(err, "out of memory");
            }
            res->n_tool_calls++;
        }
    }
    return 0;
}

void rp_result_free(RpResult *res) {
    free(res->reasoning);
    free(res->content);
    for (size_t i = 0; i < res->n_tool_calls; i++) {
        free(res->tool_calls[i].name);
        free(res->tool_calls[i].arguments);
    }
    free(res->tool_calls);
    memset(res, 0, sizeof *res);
}

int rp_parse(const char *text, size_t len, bool thinking, bool tools, RpResult *res, QErr *err) {
    RpParser *p = rp_new(thinking, tools, err);
    if (!p) return -1;
    RpEvents ev = {0};
    int rc = rp_feed(p, text, len, &ev, err) < 0 || rp_finish(p, &ev, err) < 0 || rp_collect(&ev, res, err) ? -1 : 0;
    rp_events_free(&ev);
    rp_free(p);
    return rc;
}
