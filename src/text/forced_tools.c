/* forced_tools.c — reads the calls out of a forced tool_choice's output (see forced_tools.h).
 *
 * Why a scanner and not a JSON parser: the calls must stream, their arguments passed on as they
 * are generated, and the constraint already guarantees the text's shape. So the reader only
 * tracks what tells the parts apart: strings (with escapes), how deep the containers nest, and,
 * inside a call of "required"'s array, which of its four parts a byte is in (the "name" key, the
 * name, the "parameters" key, the arguments). Whitespace inside arguments is held back until
 * more arguments follow, so that what is passed on never ends in whitespace; the one JSON parse
 * is of a call's name (a JSON string, escapes and all). */
#include "text/forced_tools.h"

#include <jansson.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "util/strbuf.h"

/* Where a byte of "required"'s array is, inside a call (depth 2). */
enum Part { P_NAME_KEY, P_NAME, P_ARGS_KEY, P_ARGS };

struct FtReader {
    ForcedTool mode;
    char *name;      /* named: the function */
    FtSink sink;
    bool begun;      /* named: the call has begun */
    bool args_text;  /* the current call's arguments have a byte other than whitespace */
    StrBuf held;     /* whitespace inside the arguments, held until more arguments come */
    StrBuf out;      /* arguments read by this feed, not passed on yet */
    int depth;       /* required: containers open (the array 1, a call 2) */
    bool in_string, escape;
    enum Part part;  /* required: inside a call */
    StrBuf tag;      /* required: the current call's name, as JSON text */
};

FtReader *ft_new(ForcedTool mode, const char *name, FtSink sink) {
    FtReader *r = calloc(1, sizeof *r);
    if (!r) return NULL;
    r->mode = mode;
    r->sink = sink;
    if (name && !(r->name = strdup(name))) {
        free(r);
        return NULL;
    }
    return r;
}

void ft_free(FtReader *r) {
    if (!r) return;
    free(r->name);
    sb_free(&r->held);
    sb_free(&r->out);
    sb_free(&r->tag);
    free(r);
}

static bool is_ws(char b) { return b == ' ' || b == '\t' || b == '\n' || b == '\r'; }

static void clear(StrBuf *b) {
    b->len = 0;
    if (b->s) b->s[0] = '\0';
}

/* Passes on the arguments this feed has read so far. */
static void pass_on(FtReader *r) {
    if (r->out.len) r->sink.arguments(r->sink.user, r->out.s, r->out.len);
    clear(&r->out);
}

static void args_byte(FtReader *r, char b) {
    if (is_ws(b)) {
        if (r->args_text) sb_append(&r->held, &b, 1); /* leading whitespace is dropped */
        return;
    }
    if (r->mode == FORCED_NAMED && !r->begun) {
        r->begun = true;
        r->sink.begin(r->sink.user, r->name);
    }
    sb_append(&r->out, sb_str(&r->held), r->held.len);
    clear(&r->held);
    sb_append(&r->out, &b, 1);
    r->args_text = true;
}

/* A call of the array begins: its name (JSON text in tag) is known. */
static void begin_call(FtReader *r) {
    pass_on(r);
    json_t *v = json_loadb(sb_str(&r->tag), r->tag.len, JSON_DECODE_ANY, NULL);
    r->sink.begin(r->sink.user, json_is_string(v) ? json_string_value(v) : sb_str(&r->tag));
    json_decref(v);
    r->part = P_ARGS;
    r->args_text = false;
    clear(&r->held);
}

static void required_byte(FtReader *r, char b) {
    const bool outside = !r->in_string; /* b is outside strings: it may be structure */
    if (r->in_string) {
        if (r->escape) r->escape = false;
        else if (b == '\\') r->escape = true;
        else if (b == '"') r->in_string = false;
    } else if (b == '"') {
        r->in_string = true;
    }
    const bool opens = outside && (b == '{' || b == '['), closes = outside && (b == '}' || b == ']');
    if (r->depth == 2 && r->part == P_ARGS && closes) { /* the call ends */
        r->depth = 1;
        r->part = P_NAME_KEY;
        return;
    }
    if (r->depth >= 2 && r->part == P_ARGS) {
        args_byte(r, b);
        r->depth += opens - closes;
        return;
    }
    if (opens || closes) {
        r->depth += opens - closes;
        if (opens && r->depth == 2) r->part = P_NAME_KEY, clear(&r->tag);
        return;
    }
    if (r->depth != 2) return;
    if (outside && b == ':' && r->part == P_NAME_KEY) r->part = P_NAME;
    else if (outside && b == ':' && r->part == P_ARGS_KEY) begin_call(r);
    else if (outside && b == ',' && r->part == P_NAME) r->part = P_ARGS_KEY;
    else if (r->part == P_NAME) sb_append(&r->tag, &b, 1);
}

void ft_feed(FtReader *r, const char *text, size_t n) {
    for (size_t i = 0; i < n; i++) {
        if (r->mode == FORCED_NAMED) args_byte(r, text[i]);
        else required_byte(r, text[i]);
    }
    pass_on(r);
}

void ft_finish(FtReader *r) {
    pass_on(r);
    if (r->mode == FORCED_NAMED && !r->begun) {
        r->begun = true;
        r->sink.begin(r->sink.user, r->name);
    }
}
