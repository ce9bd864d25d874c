/* test_structured.c — structured outputs. JSON mode: the recogniser on its schema (any object)
 * with valid and invalid texts (every prefix of a valid object accepted, the object complete
 * only at its end, each invalid text refused at the byte where it goes wrong), its limits, and
 * the token mask over the real Qwen3 vocabulary. Choice: the masks along a choice's tokens, ends,
 * shared prefixes. (JSON schemas: test_json_schema.c.) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../test_util.h"
#include "text/structured.h"

#define TOKENIZER "assets/tokenizer/qwen3/tokenizer.json"

static JsonSchema *any_object;

/* Bytes of text the recogniser takes before refusing one (strlen(text) if it takes all). */
static size_t accepted(const char *text, JsonMatch *s) {
    json_match_init(s, any_object);
    size_t i = 0;
    while (text[i] && json_match_step(s, any_object, (uint8_t)text[i])) i++;
    return i;
}

static void test_recogniser(void) {
    any_object = json_schema_any_object();
    static const char *const valid[] = {
        "{}",
        " \n{ }\t",
        "{\"a\":1}",
        "{\"a\": [1, -2.5e+3, 0, -0, 0.25, 7E5, 3e-2, true, false, null, \"x\\\"y\\\\\\u00e9\\n\"], \"b\": {\"c\": {}}}",
        "{\"nested\": [[[]], [{}], {\"k\": [\"v\"]}]}",
        "{\"\xc3\xa9t\xc3\xa9\": \"\xe6\x97\xa5\"}",
    };
    for (size_t v = 0; v < sizeof valid / sizeof valid[0]; v++) {
        const char *t = valid[v];
        JsonMatch s;
        json_match_init(&s, any_object);
        bool ok = true, early = false;
        for (size_t i = 0; t[i] && ok; i++) {
            ok = json_match_step(&s, any_object, (uint8_t)t[i]);
            /* complete only once the final '}' is in (trailing whitespace keeps it complete) */
            if (ok && json_match_complete(&s, any_object) && strchr(t + i + 1, '}')) early = true;
        }
        CHECK(ok && json_match_complete(&s, any_object) && !early, "valid text %zu: %s", v, t);
    }
    static const struct {
        const char *text;
        size_t fails_at;
    } invalid[] = {
        {"[]", 0},         {"\"a\"", 0},       {"{\"a\" 1}", 5},   {"{\"a\":01}", 6},  {"{\"a\":1,}", 7},
        {"{,}", 1},        {"{\"a\":tru}", 8}, {"{\"a\":\"\x01\"}", 6}, {"{\"a\":\"\\q\"}", 7},
        {"{\"a\":1}}", 7}, {"{\"a\":1} x", 8}, {"{'a':1}", 1},    {"{\"a\":.5}", 5},  {"{\"a\":1.}", 7},
        {"{\"a\":-}", 6},  {"{\"a\":1e}", 7},  {"{\"a\":nul}", 8}, {"{\"a\":[1}", 7},  {"{\"a\":\"\\u12g4\"}", 10},
        {"{1:2}", 1},      {"{\"a\":1]", 6},
        /* strings are valid UTF-8, written without surrogate escapes */
        {"{\"a\":\"\xc3(\"}", 7}, {"{\"a\":\"\xc0\xaf\"}", 6}, {"{\"a\":\"\xed\xa0\x80\"}", 7},
        {"{\"a\":\"\xf4\x90\x80\x80\"}", 7}, {"{\"a\":\"\\ud83d\\ude00\"}", 9},
    };
    for (size_t v = 0; v < sizeof invalid / sizeof invalid[0]; v++) {
        JsonMatch s;
        const size_t n = accepted(invalid[v].text, &s);
        CHECK(n == invalid[v].fails_at, "invalid text %zu (%s): refused at byte %zu, want %zu", v, invalid[v].text, n,
              invalid[v].fails_at);
    }
    /* limits: whitespace in a row, nesting depth */
    char buf[256];
    JsonMatch s;
    snprintf(buf, sizeof buf, "{%*s}", JSON_MAX_WS + 1, "");
    CHECK(accepted(buf, &s) == 1 + JSON_MAX_WS, "at most %d whitespace bytes in a row", JSON_MAX_WS);
    snprintf(buf, sizeof buf, "{%*s}", JSON_MAX_WS, "");
    CHECK(accepted(buf, &s) == strlen(buf) && json_match_complete(&s, any_object), "%d whitespace bytes allowed", JSON_MAX_WS);
    size_t n = 0;
    n += (size_t)snprintf(buf + n, sizeof buf - n, "{\"a\":");
    for (int d = 1; d < JSON_MAX_DEPTH + 1; d++) buf[n++] = '[';
    buf[n] = 0;
    CHECK(accepted(buf, &s) == n - 1, "nesting stops at depth %d", JSON_MAX_DEPTH);
    json_schema_unref(any_object);
}

static void test_mask(void) {
    QErr err;
    Tok *tok = tok_load(TOKENIZER, &err);
    CHECK(tok != NULL, "load: %s", err.msg);
    if (!tok) return;
    const int V = 151936; /* Qwen3's embedding rows: more than the tokenizer's ids */
    const int32_t im_end = tok_token_id(tok, "<|im_end|>", 10), eot = tok_token_id(tok, "<|endoftext|>", 13);
    const int32_t eos[] = {im_end, eot};
    StructVocab *jv = struct_vocab_new(tok, V, eos, 2);
    CHECK(jv != NULL, "struct_vocab_new");
    float *logits = malloc((size_t)V * sizeof *logits);
    const int32_t brace = tok_token_id(tok, "{", 1), close = tok_token_id(tok, "}", 1), a = tok_token_id(tok, "a", 1);
    const int32_t quote = tok_token_id(tok, "\"", 1), nl = tok_token_id(tok, "\n", 1), think = tok_token_id(tok, "<think>", 7);
    const int32_t think_end = tok_token_id(tok, "</think>", 8), stop = tok_token_id(tok, ",", 1);
    CHECK(brace >= 0 && close >= 0 && a >= 0 && quote >= 0 && nl >= 0 && think >= 0 && think_end >= 0, "token ids");
    int32_t stops[] = {stop};
    const OutputFormat json = {.kind = OUTPUT_JSON_OBJECT};
    OutputConstraint c = output_constraint(jv, &json, false, stops, 1);
    CHECK(c.state != NULL, "constraint");

    /* at the start: '{' and whitespace; not letters, quotes, specials, the end, ids past the tokenizer */
    for (int i = 0; i < V; i++) logits[i] = 0.0f;
    c.mask(c.state, logits, V);
    int allowed = 0;
    for (int i = 0; i < V; i++) allowed += logits[i] == 0.0f;
    CHECK(logits[brace] == 0 && logits[nl] == 0, "'{' and newline allowed first");
    CHECK(logits[a] == -INFINITY && logits[quote] == -INFINITY && logits[close] == -INFINITY, "'a', '\"', '}' not");
    CHECK(logits[im_end] == -INFINITY && logits[eot] == -INFINITY && logits[think] == -INFINITY && logits[V - 1] == -INFINITY,
          "end, specials, ids past the tokenizer not");
    CHECK(allowed > 2 && allowed < 1000, "%d tokens allowed first (whitespace runs and '{'-led tokens)", allowed);

    /* through `{"a": 1` then `}`: inside the key most tokens fit; after `1`, the end not yet */
    const char *text = "{\"a\": 1";
    int32_t *ids = NULL;
    size_t n_ids = 0;
    CHECK(tok_encode(tok, text, strlen(text), &ids, &n_ids, &err) == 0, "encode");
    OutputConstraint c2 = output_constraint(jv, &json, false, NULL, 0); /* same states, no stop id */
    for (size_t i = 0; i < n_ids; i++) {
        for (int j = 0; j < V; j++) logits[j] = 0.0f;
        c.mask(c.state, logits, V);
        CHECK(logits[ids[i]] == 0.0f, "token %zu (%d) of %s allowed", i, ids[i], text);
        c.accept(c.state, ids[i]);
        c2.accept(c2.state, ids[i]);
    }
    free(ids);
    /* the masks are cached per state: the second request gets the first's, less its stop id */
    float *l2 = malloc((size_t)V * sizeof *l2);
    for (int j = 0; j < V; j++) logits[j] = l2[j] = 0.0f;
    c.mask(c.state, logits, V);
    c2.mask(c2.state, l2, V);
    int differ = 0;
    for (int j = 0; j < V; j++) differ += (logits[j] == 0.0f) != (l2[j] == 0.0f);
    CHECK(differ == 1 && l2[stop] == 0.0f && logits[stop] == -INFINITY, "cached masks agree but for the stop id (%d)",
          differ);
    free(l2);
    c2.free(c2.state);
    for (int j = 0; j < V; j++) logits[j] = 0.0f;
    c.mask(c.state, logits, V);
    CHECK(logits[close] == 0 && logits[im_end] == -INFINITY && logits[stop] == -INFINITY && logits[a] == -INFINITY,
          "after a number: '}' yes; the end, a stop id, a letter no");
    c.accept(c.state, close);
    for (int j = 0; j < V; j++) logits[j] = 0.0f;
    c.mask(c.state, logits, V);
    CHECK(logits[im_end] == 0 && logits[eot] == 0 && logits[stop] == 0 && logits[nl] == 0 && logits[close] == -INFINITY &&
              logits[brace] == -INFINITY,
          "complete: the ends and whitespace only");
    c.free(c.state);

    /* think_first: free text until </think>, then JSON */
    c = output_constraint(jv, &json, true, NULL, 0);
    for (int j = 0; j < V; j++) logits[j] = 0.0f;
    c.mask(c.state, logits, V);
    CHECK(logits[a] == 0 && logits[im_end] == 0 && logits[think] == 0, "reasoning is unconstrained");
    c.accept(c.state, a);
    c.accept(c.state, think_end);
    c.mask(c.state, logits, V);
    CHECK(logits[a] == -INFINITY && logits[brace] == 0, "after </think>: JSON");
    c.free(c.state);

    /* choice: "positive", "pos", "negative" (a choice that prefixes another) */
    char *words[] = {"positive", "pos", "negative"};
    const OutputFormat choice = {.kind = OUTPUT_CHOICE, .choices = words, .n_choices = 3};
    c = output_constraint(jv, &choice, false, NULL, 0);
    for (int j = 0; j < V; j++) logits[j] = 1.0f;
    c.mask(c.state, logits, V);
    int n_allowed = 0;
    for (int j = 0; j < V; j++) n_allowed += logits[j] == 1.0f;
    const int32_t pos = tok_token_id(tok, "pos", 3), neg = tok_token_id(tok, "negative", 8), p = tok_token_id(tok, "p", 1);
    const int32_t itive = tok_token_id(tok, "itive", 5);
    CHECK(pos >= 0 && neg >= 0 && p >= 0 && itive >= 0, "choice token ids");
    CHECK(logits[pos] == 1.0f && logits[neg] == 1.0f && logits[p] == 1.0f && logits[a] == -INFINITY &&
              logits[im_end] == -INFINITY && logits[brace] == -INFINITY,
          "first: prefixes of a choice only (%d allowed)", n_allowed);
    c.accept(c.state, pos);
    for (int j = 0; j < V; j++) logits[j] = 1.0f;
    c.mask(c.state, logits, V);
    CHECK(logits[im_end] == 1.0f && logits[itive] == 1.0f && logits[neg] == -INFINITY, "after 'pos': end or 'itive'");
    c.accept(c.state, itive);
    for (int j = 0; j < V; j++) logits[j] = 1.0f;
    c.mask(c.state, logits, V);
    n_allowed = 0;
    for (int j = 0; j < V; j++) n_allowed += logits[j] == 1.0f;
    CHECK(n_allowed == 2 && logits[im_end] == 1.0f && logits[eot] == 1.0f, "'positive' whole: the ends only (%d)",
          n_allowed);
    c.free(c.state);
    free(logits);
    struct_vocab_free(jv);
    tok_free(tok);
}

int main(void) {
    test_recogniser();
    test_mask();
    return test_finish();
}
