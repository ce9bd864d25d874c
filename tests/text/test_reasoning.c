/* test_reasoning.c — the Qwen3 output parser: every case is parsed whole, split in two at every
 * byte, split in three at every pair of bytes and fed byte by byte, and all must give the
 * expected reasoning / content / tool calls (so a tag cut anywhere is never emitted as text).
 * Expected values follow vLLM's qwen3 reasoning parser and hermes tool parser (see reasoning.h
 * for where quill deliberately differs: whitespace-only stretches around tool calls). */
#include <string.h>

#include "../test_util.h"
#include "text/reasoning.h"

typedef struct Case {
    const char *name;
    const char *text;
    bool thinking, tools;
    const char *reasoning; /* NULL: none expected */
    const char *content;   /* NULL: none expected */
    size_t n_calls;
    const char *calls[3][2]; /* name, arguments */
} Case;

static const Case CASES[] = {
    {"think_on", "<think>\nLet me add.\n</think>\n\n2+2 = 4.", true, false, "\nLet me add.\n", "\n\n2+2 = 4.", 0, {{0}}},
    {"think_on_tools_on", "<think>\nLet me add.\n</think>\n\n2+2 = 4.", true, true, "\nLet me add.\n", "\n\n2+2 = 4.",
     0, {{0}}},
    {"think_off", "<think>\nLet me add.\n</think>\n\n2+2 = 4.", false, false, NULL,
     "<think>\nLet me add.\n</think>\n\n2+2 = 4.", 0, {{0}}},
    {"no_open_tag", "Reasoning here.</think>Answer", true, false, "Reasoning here.", "Answer", 0, {{0}}},
    {"truncated_reasoning", "<think>\nstill thinking about </thi", true, true, "\nstill thinking about </thi", NULL, 0,
     {{0}}},
    {"open_tag_only_leading", "Answer <think>x</think>y", true, false, "Answer <think>x", "y", 0, {{0}}},
    {"empty", "", true, true, NULL, NULL, 0, {{0}}},
    {"lone_think_prefix", "<thi", true, false, "<thi", NULL, 0, {{0}}},
    {"lookalike_tags", "<thin>a </thinking> b <</think>c <tool_ x <tool_call", true, true, "<thin>a </thinking> b <",
     "c <tool_ x <tool_call", 0, {{0}}},
    {"utf8", "<think>\xe6\x80\x9d\xe8\x80\x83 \xf0\x9f\xa4\x94</think>\xc3\xa9t\xc3\xa9", true, true,
     "\xe6\x80\x9d\xe8\x80\x83 \xf0\x9f\xa4\x94", "\xc3\xa9t\xc3\xa9", 0, {{0}}},
    {"two_tool_calls",
     "<think>\nNeed two lookups.\n</think>\n\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": "
     "\"Paris\"}}\n</tool_call>\n<tool_call>\n{\"name\":\"get_time\",\"arguments\":{\"tz\":\"Europe/Paris\","
     "\"precise\":true,\"n\":1.50}}\n</tool_call>",
     true, true, "\nNeed two lookups.\n", NULL, 2,
     {{"get_weather", "{\"city\": \"Paris\"}"}, {"get_time", "{\"tz\": \"Europe/Paris\", \"precise\": true, \"n\": 1.5}"}}},
    {"tools_off_keeps_text",
     "<think>\nx\n</think>\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>", true, false, "\nx\n",
     "\n\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>", 0, {{0}}},
    {"text_around_call",
     "I'll check.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>\nDone.\n", false, true, NULL,
     "I'll check.\n\nDone.\n", 1, {{"f", "{}"}}},
    {"malformed_json", "Sure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {oops}\n</tool_call>", false, true, NULL,
     "Sure.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {oops}\n</tool_call>", 0, {{0}}},
    {"malformed_then_valid",
     "<tool_call>\nnot json\n</tool_call>\n<tool_call>\n{\"name\": \"g\", \"arguments\": {\"x\": \"\\u00e9\\n\"}}\n"
     "</tool_call>\n",
     false, true, NULL, "<tool_call>\nnot json\n</tool_call>\n", 1, {{"g", "{\"x\": \"\xc3\xa9\\n\"}"}}},
    {"missing_name", "<tool_call>{\"arguments\": {}}</tool_call>", false, true, NULL,
     "<tool_call>{\"arguments\": {}}</tool_call>", 0, {{0}}},
    {"no_arguments", "\n\n<tool_call>{\"name\": \"now\"}</tool_call>", false, true, NULL, NULL, 1, {{"now", "{}"}}},
    {"unterminated_valid", "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": [1, 2]}}\n</tool_", false, true, NULL,
     NULL, 1, {{"f", "{\"a\": [1, 2]}"}}},
    {"unterminated_invalid", "Text <tool_call>\n{\"name\": \"f\", \"argu", false, true, NULL,
     "Text <tool_call>\n{\"name\": \"f\", \"argu", 0, {{0}}},
    {"whitespace_only_content", "<think>r</think>\n\n", true, true, "r", "\n\n", 0, {{0}}},
};

static int str_eq(const char *a, const char *b) { return a == b || (a && b && !strcmp(a, b)); }

static void check_result(const Case *c, const RpResult *r, const char *how) {
    CHECK(str_eq(r->reasoning, c->reasoning), "%s [%s]: reasoning '%s', want '%s'", c->name, how,
          r->reasoning ? r->reasoning : "(none)", c->reasoning ? c->reasoning : "(none)");
    CHECK(str_eq(r->content, c->content), "%s [%s]: content '%s', want '%s'", c->name, how,
          r->content ? r->content : "(none)", c->content ? c->content : "(none)");
    CHECK(r->n_tool_calls == c->n_calls, "%s [%s]: %zu tool calls, want %zu", c->name, how, r->n_tool_calls, c->n_calls);
    for (size_t i = 0; i < r->n_tool_calls && i < c->n_calls; i++) {
        CHECK(!strcmp(r->tool_calls[i].name, c->calls[i][0]), "%s [%s]: call %zu name '%s', want '%s'", c->name, how, i,
              r->tool_calls[i].name, c->calls[i][0]);
        CHECK(!strcmp(r->tool_calls[i].arguments, c->calls[i][1]), "%s [%s]: call %zu arguments '%s', want '%s'",
              c->name, how, i, r->tool_calls[i].arguments, c->calls[i][1]);
    }
}

/* Feeds text in pieces cut at the given offsets (ascending, within the text). Every event must
 * be well formed: text events non-empty, tool calls with name and arguments. */
static void parse_chunks(const Case *c, const size_t *cuts, size_t n_cuts, RpResult *res) {
    QErr err = {{0}};
    RpParser *p = rp_new(c->thinking, c->tools, &err);
    RpEvents ev = {0};
    size_t len = strlen(c->text), at = 0;
    int ok = p != NULL;
    for (size_t k = 0; ok && k <= n_cuts; k++) {
        size_t end = k < n_cuts ? cuts[k] : len;
        ok = rp_feed(p, c->text + at, end - at, &ev, &err) >= 0;
        at = end;
    }
    ok = ok && rp_finish(p, &ev, &err) >= 0;
    for (size_t i = 0; ok && i < ev.n; i++) {
        const RpEvent *e = &ev.items[i];
        if (e->kind == RP_TOOL_CALL)
            ok = e->name && e->arguments && !e->text;
        else
            ok = e->text && e->text[0] && !e->name;
    }
    ok = ok && rp_collect(&ev, res, &err) == 0;
    CHECK(ok, "%s: parser failed: %s", c->name, err.msg);
    rp_events_free(&ev);
    rp_free(p);
}

static int result_eq(const RpResult *a, const RpResult *b) {
    if (!str_eq(a->reasoning, b->reasoning) || !str_eq(a->content, b->content) || a->n_tool_calls != b->n_tool_calls)
        return 0;
    for (size_t i = 0; i < a->n_tool_calls; i++)
        if (strcmp(a->tool_calls[i].name, b->tool_calls[i].name) ||
            strcmp(a->tool_calls[i].arguments, b->tool_calls[i].arguments))
            return 0;
    return 1;
}

static void test_case(const Case *c) {
    QErr err = {{0}};
    RpResult whole = {0};
    CHECK(rp_parse(c->text, strlen(c->text), c->thinking, c->tools, &whole, &err) == 0, "%s: %s", c->name, err.msg);
    check_result(c, &whole, "whole");

    size_t len = strlen(c->text);
    size_t cuts[2];
    int bad_two = 0, bad_three = 0;
    for (size_t i = 0; i <= len; i++) {
        RpResult r = {0};
        cuts[0] = i;
        parse_chunks(c, cuts, 1, &r);
        if (!result_eq(&r, &whole) && !bad_two++) check_result(c, &r, "split in two");
        rp_result_free(&r);
        for (size_t j = i; j <= len; j++) {
            RpResult r3 = {0};
            cuts[1] = j;
            parse_chunks(c, cuts, 2, &r3);
            if (!result_eq(&r3, &whole) && !bad_three++) check_result(c, &r3, "split in three");
            rp_result_free(&r3);
        }
    }
    CHECK(!bad_two, "%s: %d two-chunk splits differ from the whole-text parse", c->name, bad_two);
    CHECK(!bad_three, "%s: %d three-chunk splits differ from the whole-text parse", c->name, bad_three);

    size_t *bytes = malloc((len + 1) * sizeof *bytes);
    for (size_t i = 0; i < len; i++) bytes[i] = i + 1;
    RpResult r = {0};
    parse_chunks(c, bytes, len, &r);
    check_result(c, &r, "byte by byte");
    rp_result_free(&r);
    free(bytes);
    rp_result_free(&whole);
}

/* Text is released as soon as it cannot be part of a tag, and held while it might be. */
static void test_streaming_deltas(void) {
    QErr err = {{0}};
    RpParser *p = rp_new(true, true, &err);
    RpEvents ev = {0};
    struct {
        const char *in;
        int n;        /* events expected from this feed */
        RpKind kind;  /* of the first one */
        const char *text;
    } steps[] = {
        {"<thi", 0, RP_REASONING, NULL},
        {"nk>\nHello", 1, RP_REASONING, "\nHello"},
        {" wor</th", 1, RP_REASONING, " wor"},
        {"ink>", 0, RP_CONTENT, NULL},
        {"\n\n", 0, RP_CONTENT, NULL}, /* whitespace: kept only if text follows */
        {"Hi <tool", 1, RP_CONTENT, "\n\nHi "},
        {"_call>{\"name\": \"f\", \"arguments\": {}}</tool_call", 0, RP_CONTENT, NULL},
        {">", 1, RP_TOOL_CALL, NULL},
    };
    for (size_t s = 0; s < sizeof steps / sizeof steps[0]; s++) {
        rp_events_clear(&ev);
        int n = rp_feed(p, steps[s].in, strlen(steps[s].in), &ev, &err);
        CHECK(n == steps[s].n, "step %zu ('%s'): %d events, want %d", s, steps[s].in, n, steps[s].n);
        if (n < 1 || steps[s].n < 1) continue;
        CHECK(ev.items[0].kind == steps[s].kind, "step %zu: kind %d, want %d", s, ev.items[0].kind, steps[s].kind);
        if (steps[s].text)
            CHECK(ev.items[0].text && !strcmp(ev.items[0].text, steps[s].text), "step %zu: text '%s', want '%s'", s,
                  ev.items[0].text ? ev.items[0].text : "(null)", steps[s].text);
        else
            CHECK(ev.items[0].name && !strcmp(ev.items[0].name, "f"), "step %zu: tool call name", s);
    }
    rp_events_clear(&ev);
    CHECK(rp_finish(p, &ev, &err) == 0, "finish: %d events, want 0 (%s)", (int)ev.n, err.msg);
    CHECK(rp_feed(p, "x", 1, &ev, &err) == -1 && strstr(err.msg, "finished"), "feeding after finish must fail");
    rp_events_free(&ev);
    rp_free(p);
}

int main(void) {
    for (size_t i = 0; i < sizeof CASES / sizeof CASES[0]; i++) test_case(&CASES[i]);
    test_streaming_deltas();
    return test_finish();
}
