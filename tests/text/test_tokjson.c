/* test_tokjson.c — the arena JSON parser against jansson (an independent parser) on the whole
 * Qwen3 tokenizer.json, plus escapes, numbers and malformed inputs that must be refused. */
#include <jansson.h>
#include <string.h>

#include "../test_util.h"
#include "text/tokjson.h"

static long mismatches;

/* Counts (and reports the first few) values that differ between the two parses. */
static void compare(const TjVal *a, const json_t *b, const char *where) {
    int ok;
    switch (a->type) {
    case TJ_NULL: ok = json_is_null(b); break;
    case TJ_BOOL: ok = json_is_boolean(b) && a->u.b == json_is_true(b); break;
    case TJ_NUM: ok = json_is_number(b) && a->u.num == json_number_value(b); break;
    case TJ_STR:
        ok = json_is_string(b) && a->n == json_string_length(b) && !memcmp(a->u.str, json_string_value(b), a->n);
        break;
    case TJ_ARR:
        ok = json_is_array(b) && a->n == json_array_size(b);
        for (uint32_t i = 0; ok && i < a->n; i++) compare(&a->u.items[i], json_array_get(b, i), where);
        break;
    case TJ_OBJ:
        ok = json_is_object(b) && a->n == json_object_size(b);
        for (uint32_t i = 0; ok && i < a->n; i++) {
            const TjVal *k = &a->u.items[2 * i];
            const json_t *v = json_object_getn(b, k->u.str, k->n);
            ok = v != NULL;
            if (ok) compare(&a->u.items[2 * i + 1], v, k->u.str);
        }
        break;
    default: ok = 0;
    }
    if (!ok && mismatches++ < 5) fprintf(stderr, "value differs from jansson's near '%s'\n", where);
}

static void test_whole_tokenizer(void) {
    const char *path = "assets/tokenizer/qwen3/tokenizer.json";
    QErr err;
    TjDoc *doc = tj_parse_file(path, &err);
    CHECK(doc != NULL, "parse: %s", err.msg);
    json_error_t jerr;
    json_t *ref = json_load_file(path, 0, &jerr);
    CHECK(ref != NULL, "jansson: %s", jerr.text);
    if (doc && ref) {
        compare(tj_root(doc), ref, "(root)");
        CHECK(mismatches == 0, "%ld mismatches", mismatches);
        const TjVal *model = tj_get(tj_root(doc), "model");
        CHECK(tj_get(model, "vocab") && tj_get(model, "vocab")->n == 151643, "vocab size");
        CHECK(tj_get(model, "no such key") == NULL, "missing key");
    }
    tj_free(doc);
    json_decref(ref);
}

static void test_values(void) {
    const char *text = "{\"s\": \"a\\u00e9\\ud83d\\ude00\\n\\\"\\\\\\/\\t\\b\\f\\r\\u0000z\", "
                       "\"n\": [-0.5e3, 12345678901234567890, 0, -7, 1E2, 3.25],"
                       " \"e\": [], \"o\": {}, \"b\": [true, false, null]}";
    QErr err;
    TjDoc *doc = tj_parse(text, strlen(text), "inline", &err);
    CHECK(doc != NULL, "parse: %s", err.msg);
    if (!doc) return;
    const TjVal *root = tj_root(doc), *s = tj_get(root, "s"), *n = tj_get(root, "n");
    static const char want[] = "a\xC3\xA9\xF0\x9F\x98\x80\n\"\\/\t\b\f\r\0z";
    CHECK(s && s->type == TJ_STR && s->n == sizeof want - 1 && !memcmp(s->u.str, want, s->n), "escapes");
    CHECK(s && s->u.str[s->n] == '\0', "NUL-terminated");
    double nums[] = {-500, 12345678901234567890.0, 0, -7, 100, 3.25};
    CHECK(n && n->type == TJ_ARR && n->n == 6, "number count");
    for (int i = 0; n && i < 6; i++) CHECK(n->u.items[i].u.num == nums[i], "number %d: %g", i, n->u.items[i].u.num);
    CHECK(tj_get(root, "e")->type == TJ_ARR && tj_get(root, "e")->n == 0, "empty array");
    CHECK(tj_get(root, "o")->type == TJ_OBJ && tj_get(root, "o")->n == 0, "empty object");
    const TjVal *b = tj_get(root, "b");
    CHECK(b->u.items[0].type == TJ_BOOL && b->u.items[0].u.b == 1 && b->u.items[1].u.b == 0 &&
          b->u.items[2].type == TJ_NULL, "literals");
    CHECK(!strcmp(tj_type_name(TJ_OBJ), "object"), "type name");
    tj_free(doc);
}

static void test_errors(void) {
    static const struct {
        const char *text, *msg;
    } bad[] = {
        {"[1, 2,]", "line 1, column 7"},
        {"{\"a\": 1,\n \"b\" 2}", "line 2, column 6: expected ':'"},
        {"\"\\ud800\"", "surrogate"},
        {"\"\\udc00\"", "surrogate"},
        {"\"abc", "unterminated string"},
        {"\"a\nb\"", "control character"},
        {"\"\\x\"", "bad escape"},
        {"\"\\u12g4\"", "bad \\u escape"},
        {"[1] 2", "trailing characters"},
        {"tru", "unexpected character"},
        {"01", "trailing characters"},
        {"-", "bad number"},
        {"1.", "bad number"},
        {"1e+", "bad number"},
        {"", "unexpected end of input"},
        {"{1: 2}", "expected a string key"},
        {"[1 2]", "expected ',' or ']'"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        QErr err;
        TjDoc *doc = tj_parse(bad[i].text, strlen(bad[i].text), "bad.json", &err);
        CHECK(doc == NULL && strstr(err.msg, "bad.json") && strstr(err.msg, bad[i].msg),
              "'%s' gives '%s', want '%s'", bad[i].text, doc ? "(accepted)" : err.msg, bad[i].msg);
        tj_free(doc);
    }
    char deep[1200];
    memset(deep, '[', 600);
    memset(deep + 600, ']', 600);
    QErr err;
    TjDoc *doc = tj_parse(deep, 1200, "deep.json", &err);
    CHECK(doc == NULL && strstr(err.msg, "nesting too deep"), "depth limit: %s", doc ? "accepted" : err.msg);
    doc = tj_parse(deep + 100, 1000, "ok.json", &err);
    CHECK(doc != NULL, "depth 500 is fine: %s", err.msg);
    tj_free(doc);
    CHECK(tj_parse_file("/nonexistent/x.json", &err) == NULL && strstr(err.msg, "/nonexistent/x.json"),
          "missing file named: %s", err.msg);
}

int main(void) {
    test_whole_tokenizer();
    test_values();
    test_errors();
    return test_finish();
}
