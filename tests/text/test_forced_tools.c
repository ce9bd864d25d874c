/* test_forced_tools.c — reading the calls out of a forced tool_choice's output
 * (text/forced_tools.h): a named call's arguments, "required"'s array of calls (names with
 * escapes, arguments with braces, commas and colons inside strings, scalars), whitespace around
 * arguments dropped, text cut short; the same calls whether the text comes whole, byte by byte or
 * in random pieces, and no piece passed on ends in whitespace. */
#include <stdbool.h>
#include <string.h>

#include "../test_util.h"
#include "text/forced_tools.h"
#include "util/strbuf.h"

#define MAX_CALLS 8

typedef struct Calls {
    int n;
    StrBuf name[MAX_CALLS], args[MAX_CALLS];
    int pieces;
    bool ws_end;   /* a piece ended in whitespace */
    bool orphan;   /* arguments came before any call began */
} Calls;

static void on_begin(void *user, const char *name) {
    Calls *c = user;
    if (c->n < MAX_CALLS) sb_puts(&c->name[c->n++], name);
}

static void on_arguments(void *user, const char *bytes, size_t n) {
    Calls *c = user;
    c->pieces++;
    c->ws_end = c->ws_end || strchr(" \t\r\n", bytes[n - 1]) != NULL;
    if (!c->n) c->orphan = true;
    else sb_append(&c->args[c->n - 1], bytes, n);
}

static void calls_free(Calls *c) {
    for (int i = 0; i < MAX_CALLS; i++) sb_free(&c->name[i]), sb_free(&c->args[i]);
}

/* Feeds text in pieces: whole (split 0), byte by byte (1), or pseudo-random lengths (2). */
static void read_calls(ForcedTool mode, const char *name, const char *text, int split, Calls *c) {
    memset(c, 0, sizeof *c);
    FtReader *r = ft_new(mode, name, (FtSink){on_begin, on_arguments, c});
    const size_t n = strlen(text);
    unsigned seed = 12345;
    for (size_t i = 0; i < n;) {
        seed = seed * 1103515245u + 12345u;
        size_t k = split == 0 ? n : split == 1 ? 1 : 1 + (seed >> 16) % 7;
        if (k > n - i) k = n - i;
        ft_feed(r, text + i, k);
        i += k;
    }
    ft_finish(r);
    ft_free(r);
}

typedef struct Case {
    ForcedTool mode;
    const char *name; /* named */
    const char *text;
    int n;
    const char *names[4], *args[4];
} Case;

static const Case kCases[] = {
    {FORCED_NAMED, "get_weather", "\n {\"city\": \"Paris \" , \"n\" : [1, 2]}\n\n", 1, {"get_weather"},
     {"{\"city\": \"Paris \" , \"n\" : [1, 2]}"}},
    {FORCED_NAMED, "f", "", 1, {"f"}, {""}},
    {FORCED_NAMED, "f", "  \n", 1, {"f"}, {""}},
    {FORCED_NAMED, "f", "{\"a\": \"x  ", 1, {"f"}, {"{\"a\": \"x"}}, /* cut inside a string */
    {FORCED_REQUIRED, NULL,
     "[{\"name\":\"get_weather\",\"parameters\":{\"city\":\"Pa}ris\\\"x\", \"l\": [{}]}} , "
     "{ \"name\" : \"say \\\"hi\\\"\" , \"parameters\" : \"a,b:c\" }, {\"name\":\"n\",\"parameters\":{}},"
     "{\"name\":\"k\",\"parameters\":-1.5e3 }]",
     4, {"get_weather", "say \"hi\"", "n", "k"}, {"{\"city\":\"Pa}ris\\\"x\", \"l\": [{}]}", "\"a,b:c\"", "{}", "-1.5e3"}},
    {FORCED_REQUIRED, NULL, " [ {\"name\":\"a\",\"parameters\":{\"x\":", 1, {"a"}, {"{\"x\":"}}, /* cut short */
    {FORCED_REQUIRED, NULL, "[{\"name\":\"a\",\"para", 0, {NULL}, {NULL}},
};

static void test_cases(void) {
    for (size_t ci = 0; ci < sizeof kCases / sizeof *kCases; ci++) {
        const Case *tc = &kCases[ci];
        for (int split = 0; split < 3; split++) {
            Calls c;
            read_calls(tc->mode, tc->name, tc->text, split, &c);
            CHECK(c.n == tc->n, "case %zu split %d: %d calls, want %d", ci, split, c.n, tc->n);
            for (int k = 0; k < c.n && k < tc->n; k++) {
                CHECK(!strcmp(sb_str(&c.name[k]), tc->names[k]), "case %zu split %d call %d: name '%s', want '%s'", ci,
                      split, k, sb_str(&c.name[k]), tc->names[k]);
                CHECK(!strcmp(sb_str(&c.args[k]), tc->args[k]), "case %zu split %d call %d: arguments '%s', want '%s'",
                      ci, split, k, sb_str(&c.args[k]), tc->args[k]);
            }
            CHECK(!c.ws_end && !c.orphan, "case %zu split %d: a piece ends in whitespace (%d) or has no call (%d)", ci,
                  split, c.ws_end, c.orphan);
            if (split == 1 && tc->mode == FORCED_NAMED && tc->args[0][0])
                CHECK(c.pieces > 1, "case %zu: byte by byte, the arguments stream (%d pieces)", ci, c.pieces);
            calls_free(&c);
        }
    }
}

/* Streaming: a named call begins with its first byte of arguments, not at the end. */
static void test_begins_early(void) {
    Calls c = {0};
    FtReader *r = ft_new(FORCED_NAMED, "f", (FtSink){on_begin, on_arguments, &c});
    ft_feed(r, "\n", 1);
    CHECK(c.n == 0, "whitespace alone begins nothing");
    ft_feed(r, "{\"a\"", 4);
    CHECK(c.n == 1 && !strcmp(sb_str(&c.args[0]), "{\"a\""), "the call begins with its arguments");
    ft_finish(r);
    CHECK(c.n == 1, "and only once");
    ft_free(r);
    calls_free(&c);
    memset(&c, 0, sizeof c);
    r = ft_new(FORCED_REQUIRED, NULL, (FtSink){on_begin, on_arguments, &c});
    const char *head = "[{\"name\":\"g\",\"parameters\":";
    ft_feed(r, head, strlen(head));
    CHECK(c.n == 1 && !strcmp(sb_str(&c.name[0]), "g") && c.args[0].len == 0, "required: a call begins at its arguments");
    ft_free(r);
    calls_free(&c);
}

int main(void) {
    test_cases();
    test_begins_early();
    return test_finish();
}
