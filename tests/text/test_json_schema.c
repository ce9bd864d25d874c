/* test_json_schema.c — JSON schemas (text/json_schema.h). The compiler: schemas of the subset
 * compile, every other keyword or impossible constraint is refused with an error naming it and
 * its JSON pointer. The recogniser, per schema: every prefix of a valid text accepted and the
 * value complete only at its end, each invalid text refused at the byte where it goes wrong,
 * the depth limit; objects told apart by a tag, and tool_choice "required"'s schema of calls. The masks over the real Qwen3 vocabulary: equal, along random walks, to
 * trying every token's bytes one by one (no shortcut), with the ends only on a whole value, and
 * cached per schema (two schemas in the same state get their own masks). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../test_util.h"
#include "text/structured.h"

#define TOKENIZER "assets/tokenizer/qwen3/tokenizer.json"

static JsonSchema *compile_text(const char *text, QErr *err) {
    json_error_t je;
    json_t *j = json_loads(text, JSON_DECODE_ANY, &je);
    if (!j) {
        qerr_set(err, "test schema is not JSON: %s", je.text);
        return NULL;
    }
    JsonSchema *s = json_schema_compile(j, err);
    json_decref(j);
    return s;
}

static void test_compile_accepts(void) {
    static const char *const ok[] = {
        "{}",
        "true",
        /* OpenAI strict style */
        "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"description\":\"d\"},\"n\":{\"type\":"
        "\"integer\"}},\"required\":[\"name\",\"n\"],\"additionalProperties\":false,\"title\":\"t\"}",
        /* pydantic style: $defs, Optional as anyOf with null, enum, default */
        "{\"$defs\":{\"Color\":{\"enum\":[\"red\",\"green\"],\"type\":\"string\"}},\"properties\":{\"c\":{\"$ref\":\"#/"
        "$defs/Color\"},\"o\":{\"anyOf\":[{\"type\":\"string\"},{\"type\":\"null\"}],\"default\":null}},\"required\":"
        "[\"c\"],\"type\":\"object\",\"$schema\":\"https://json-schema.org/draft/2020-12/schema\"}",
        /* recursion through a container, definitions, a type list, merges */
        "{\"definitions\":{\"t\":{\"type\":\"object\",\"properties\":{\"kids\":{\"type\":\"array\",\"items\":{\"$ref\":"
        "\"#/definitions/t\"}}}}},\"$ref\":\"#/definitions/t\"}",
        "{\"type\":[\"integer\",\"number\",\"null\"]}",
        "{\"anyOf\":[{\"enum\":[1,2]},{\"const\":\"x\"},{\"enum\":[\"y\",null]},{\"anyOf\":[{\"type\":\"boolean\"}]}]}",
        "{\"oneOf\":[{\"type\":\"string\",\"maxLength\":3},{\"type\":\"array\",\"minItems\":1,\"maxItems\":4}]}",
        "{\"type\":\"object\",\"additionalProperties\":{\"type\":\"number\"}}",
        "{\"properties\":{\"a\":{\"const\":{\"k\":[1,true]}}},\"unevaluatedProperties\":false}",
        "{\"$ref\":\"#/$defs/list/items\",\"$defs\":{\"list\":{\"type\":\"array\",\"items\":{\"type\":\"integer\"}}}}",
        "{\"type\":\"array\",\"items\":false}",
    };
    for (size_t i = 0; i < sizeof ok / sizeof *ok; i++) {
        QErr err = {{0}};
        JsonSchema *s = compile_text(ok[i], &err);
        CHECK(s != NULL, "schema %zu compiles: %s (%s)", i, err.msg, ok[i]);
        json_schema_unref(s);
    }
}

static void test_compile_refuses(void) {
    static const struct {
        const char *schema, *needle1, *needle2;
    } bad[] = {
        {"{\"type\":\"string\",\"pattern\":\"a+\"}", "'pattern'", "#/pattern"},
        {"{\"type\":\"string\",\"format\":\"email\"}", "'format'", "#/format"},
        {"{\"properties\":{\"a\":{\"type\":\"integer\",\"minimum\":0}}}", "'minimum'", "#/properties/a/minimum"},
        {"{\"properties\":{\"a/b\":{\"multipleOf\":2}}}", "'multipleOf'", "#/properties/a~1b/multipleOf"},
        {"{\"$defs\":{\"x\":{\"format\":\"date\"}},\"properties\":{\"d\":{\"$ref\":\"#/$defs/x\"}}}", "'format'",
         "#/$defs/x/format"},
        {"{\"allOf\":[{\"type\":\"string\"}]}", "'allOf'", "#/allOf"},
        {"{\"type\":\"array\",\"prefixItems\":[{}]}", "'prefixItems'", "#/prefixItems"},
        {"{\"type\":\"array\",\"items\":[{}]}", "tuples", "#"},
        {"{\"anyOf\":[{\"type\":\"object\"},{\"properties\":{\"a\":{}}}]}", "#/anyOf/0", "#/anyOf/1"},
        {"{\"oneOf\":[{\"type\":\"integer\"},{\"type\":\"number\"}]}", "oneOf", "'-'"},
        {"{\"anyOf\":[{\"type\":\"string\"},{\"const\":\"x\"}]}", "anyOf", "'\"'"},
        {"{\"type\":\"object\",\"required\":[\"b\"],\"properties\":{\"a\":{}}}", "'b'", "required"},
        {"{\"$ref\":\"#/$defs/nope\"}", "points at nothing", "#/$defs/nope"},
        {"{\"$ref\":\"other.json#/a\"}", "local", "$ref"},
        {"{\"type\":\"integer\",\"minLength\":2}", "'minLength'", "applies to strings"},
        {"{\"type\":\"array\",\"minItems\":3,\"maxItems\":2}", "minItems > maxItems", "#"},
        {"{\"type\":\"string\",\"maxLength\":\"3\"}", "maxLength", "#"},
        {"{\"enum\":[\"a\"],\"maxLength\":3}", "'maxLength' beside 'enum'", "#"},
        {"{\"enum\":[1,2],\"type\":\"string\"}", "no enum value", "#"},
        {"{\"$ref\":\"#/$defs/a\",\"type\":\"object\",\"$defs\":{\"a\":{}}}", "'type' beside '$ref'", "#"},
        {"{\"$defs\":{\"n\":{\"type\":\"object\",\"properties\":{\"next\":{\"$ref\":\"#/$defs/n\"}},\"required\":"
         "[\"next\"]}},\"$ref\":\"#/$defs/n\"}",
         "no value fits", "nested"},
        {"{\"$ref\":\"#/$defs/a\",\"$defs\":{\"a\":{\"$ref\":\"#/$defs/b\"},\"b\":{\"$ref\":\"#/$defs/a\"}}}", "nests",
         "#/$defs/"},
        {"false", "allows no value", "#"},
        {"{\"type\":\"strin\"}", "type at #", "object"},
        {"{\"properties\":{\"a\":{}},\"items\":{}}", "no type", "'properties'"},
        {"{\"properties\":{\"a\":{}},\"additionalProperties\":{\"type\":\"string\"}}", "additionalProperties", "#"},
        {"{\"properties\":{\"x\":{\"$id\":\"y\"}}}", "'$id'", "#/properties/x/$id"},
        {"{\"type\":\"object\",\"nullable\":true}", "'nullable'", "#/nullable"},
        /* objects: a tag is a first, required, one-string property under the same key in each */
        {"{\"anyOf\":[{\"properties\":{\"k\":{\"const\":\"a\"}},\"required\":[\"k\"]},{\"properties\":{\"t\":{"
         "\"const\":\"b\"}},\"required\":[\"t\"]}]}",
         "#/anyOf/1", "objects only by a tag"},
        {"{\"anyOf\":[{\"properties\":{\"k\":{\"const\":\"a\"}}},{\"properties\":{\"k\":{\"const\":\"b\"}}}]}",
         "#/anyOf/0", "can both start with '{'"},
        {"{\"anyOf\":[{\"properties\":{\"k\":{\"const\":1}},\"required\":[\"k\"]},{\"properties\":{\"k\":{"
         "\"const\":2}},\"required\":[\"k\"]}]}",
         "#/anyOf/1", "objects only by a tag"},
        {"{\"anyOf\":[{\"properties\":{\"k\":{\"enum\":[\"a\",\"b\"]}},\"required\":[\"k\"]},{\"properties\":{"
         "\"k\":{\"const\":\"c\"}},\"required\":[\"k\"]}]}",
         "#/anyOf/0", "objects only by a tag"},
        {"{\"oneOf\":[{\"properties\":{\"k\":{\"const\":\"a\"},\"x\":{}},\"required\":[\"k\"]},{\"properties\":{"
         "\"k\":{\"enum\":[\"a\"]}},\"required\":[\"k\"]}]}",
         "same tag \"a\"", "oneOf at #"},
        {"{\"anyOf\":[{\"properties\":{\"k\":{\"const\":\"a\"}},\"required\":[\"k\"]},{\"properties\":{\"k\":{"
         "\"const\":\"b\"}},\"required\":[\"k\"]},{\"type\":\"object\",\"additionalProperties\":{}}]}",
         "can both start with '{'", "#/anyOf/2"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        QErr err = {{0}};
        JsonSchema *s = compile_text(bad[i].schema, &err);
        CHECK(s == NULL && strstr(err.msg, bad[i].needle1) && strstr(err.msg, bad[i].needle2),
              "schema %zu refused naming %s and %s: got '%s' (%s)", i, bad[i].needle1, bad[i].needle2, err.msg,
              bad[i].schema);
        json_schema_unref(s);
    }
}

/* Bytes of text the recogniser takes before refusing one (strlen(text) if it takes all). */
static size_t accepted(const JsonSchema *g, const char *text, JsonMatch *m) {
    json_match_init(m, g);
    size_t i = 0;
    while (text[i] && json_match_step(m, g, (uint8_t)text[i])) i++;
    return i;
}

typedef struct Case {
    const char *schema;
    const char *valid[6];
    struct {
        const char *text;
        size_t fails_at; /* (size_t)-1: taken whole, but not complete */
    } invalid[10];
} Case;

static const Case kCases[] = {
    {"{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"minLength\":1,\"maxLength\":3},\"age\":{"
     "\"type\":\"integer\"},\"tags\":{\"type\":\"array\",\"items\":{\"enum\":[\"a\",\"bc\"]},\"minItems\":1,"
     "\"maxItems\":2}},\"required\":[\"name\",\"tags\"]}",
     {"{\"name\":\"x\",\"tags\":[\"a\"]}", " { \"name\" : \"abc\" , \"age\" : -12 , \"tags\" : [ \"bc\" , \"a\" ] } ",
      "{\"name\":\"\xc3\xa9\xe6\x97\xa5x\",\"tags\":[\"bc\"]}", "{\"name\":\"\\n\\u00e9\",\"age\":0,\"tags\":[\"a\"]}"},
     {{"{\"age\":1}", 2},
      {"{\"name\":\"\",\"tags\":[\"a\"]}", 9},
      {"{\"name\":\"abcd\"}", 12},
      {"{\"name\":\"a\",\"tags\":[]}", 20},
      {"{\"name\":\"a\",\"tags\":[\"a\",\"a\",\"a\"]}", 27},
      {"{\"name\":\"a\",\"tags\":[\"c\"]}", 21},
      {"{\"name\":\"a\"}", 11},
      {"{\"name\":\"a\",\"age\":1.5}", 19},
      {"{\"name\":\"a\",\"tags\":[\"a\"],\"age\":1}", 24},
      {"{\"name\":\"a\",\"tags\":[\"a\"]", (size_t)-1}}},
    {"{\"$defs\":{\"node\":{\"type\":\"object\",\"properties\":{\"v\":{\"type\":[\"integer\",\"null\"]},\"kids\":{"
     "\"type\":\"array\",\"items\":{\"$ref\":\"#/$defs/node\"}}},\"required\":[\"v\"],\"additionalProperties\":false}},"
     "\"$ref\":\"#/$defs/node\"}",
     {"{\"v\":null}", "{\"v\":1,\"kids\":[{\"v\":2},{\"v\":null,\"kids\":[]}]}"},
     {{"{\"v\":\"x\"}", 5}, {"{\"v\":nul}", 8}, {"{\"kids\":[]}", 2}, {"{\"v\":1,\"kids\":[{}]}", 16}}},
    {"{\"enum\":[1,12,\"a\",true,null,{\"x\":[1]}]}",
     {"1", "12", "\"a\"", "true", "null", "{\"x\":[1]}"},
     {{"13", 1}, {"2", 0}, {"{\"x\":[2]}", 6}, {"1.0", 1}, {"{\"x\": [1]}", 5}, {"tru", (size_t)-1}}},
    {"{\"type\":\"number\"}", {"-0.5e+3", "0", " 7 "}, {{"01", 1}, {"-", (size_t)-1}, {"1.", (size_t)-1}, {"\"1\"", 0}}},
    {"{\"type\":\"object\",\"additionalProperties\":{\"type\":\"integer\"}}",
     {"{\"a\":1,\"b\":2}", "{}", "{\"a\":1,\"a\":3}"},
     {{"{\"a\":\"x\"}", 5}, {"{\"a\":1,}", 7}}},
    {"{\"oneOf\":[{\"type\":\"string\"},{\"type\":\"array\",\"items\":{\"type\":\"boolean\"}}]}",
     {"\"s\"", "[true,false]", "[]"},
     {{"1", 0}, {"[1]", 1}}},
    {"{\"anyOf\":[{\"type\":\"integer\"},{\"type\":\"number\"},{\"enum\":[\"a\"]},{\"const\":\"b\"}]}",
     {"1.5", "\"a\"", "\"b\"", "-3"},
     {{"\"c\"", 1}, {"\"ab\"", 2}}},
    {"{\"type\":\"object\",\"properties\":{\"ab\":{\"type\":\"null\"},\"a\":{\"type\":\"null\"},\"b\":{\"type\":"
     "\"boolean\"}},\"required\":[\"b\"]}",
     {"{\"ab\":null,\"a\":null,\"b\":true}", "{\"a\":null,\"b\":false}", "{\"b\":true}"},
     {{"{\"a\":null,\"ab\":null,\"b\":true}", 11}, {"{\"ab\":null}", 10}, {"{\"b\":true,\"a\":null}", 9}}},
    {"{\"type\":\"array\",\"items\":false}", {"[]"}, {{"[1]", 1}}},
    /* a tagged union (const and a one-value enum as tags, "sq" a prefix of "square"), beside a string */
    {"{\"anyOf\":[{\"type\":\"object\",\"properties\":{\"kind\":{\"const\":\"circle\"},\"r\":{\"type\":\"number\"}},"
     "\"required\":[\"kind\",\"r\"]},{\"type\":\"object\",\"properties\":{\"kind\":{\"enum\":[\"square\"]},\"side\":{"
     "\"type\":\"integer\"},\"label\":{\"type\":\"string\"}},\"required\":[\"kind\",\"side\"]},{\"properties\":{"
     "\"kind\":{\"const\":\"sq\"}},\"required\":[\"kind\"]},{\"type\":\"string\"}]}",
     {"{\"kind\":\"circle\",\"r\":1.5}", " { \"kind\" : \"square\" , \"side\" : 2 , \"label\" : \"x\" } ",
      "{\"kind\":\"sq\"}", "\"s\""},
     {{"{\"kind\":\"square\",\"r\":1}", 18},
      {"{\"kind\":\"sq\",\"side\":1}", 12},
      {"{\"r\":1}", 2},
      {"{}", 1},
      {"{\"kind\":\"tri\"}", 9},
      {"{\"kind\":\"circle\"}", 16},
      {"{\"kind\":\"square\",\"side\":2", (size_t)-1}}},
    /* a union built twice: $defs/ab (flattened first) inside a wider anyOf */
    {"{\"$defs\":{\"ab\":{\"anyOf\":[{\"properties\":{\"t\":{\"const\":\"a\"}},\"required\":[\"t\"]},{"
     "\"properties\":{\"t\":{\"const\":\"b\"},\"n\":{\"type\":\"integer\"}},\"required\":[\"t\",\"n\"]}]}},"
     "\"properties\":{\"p\":{\"$ref\":\"#/$defs/ab\"},\"q\":{\"anyOf\":[{\"$ref\":\"#/$defs/ab\"},{\"properties\":{"
     "\"t\":{\"const\":\"c\"}},\"required\":[\"t\"]},{\"type\":\"null\"}]}},\"required\":[\"p\",\"q\"]}",
     {"{\"p\":{\"t\":\"a\"},\"q\":{\"t\":\"c\"}}", "{\"p\":{\"t\":\"b\",\"n\":1},\"q\":{\"t\":\"b\",\"n\":2}}",
      "{\"p\":{\"t\":\"a\"},\"q\":null}"},
     {{"{\"p\":{\"t\":\"c\"}", 11}, {"{\"p\":{\"t\":\"b\"}", 13}, {"{\"p\":{\"t\":\"a\"},\"q\":{\"t\":\"d\"}}", 25}}},
};

static void test_recogniser(void) {
    for (size_t ci = 0; ci < sizeof kCases / sizeof *kCases; ci++) {
        const Case *tc = &kCases[ci];
        QErr err;
        JsonSchema *g = compile_text(tc->schema, &err);
        CHECK(g != NULL, "case %zu compiles: %s", ci, err.msg);
        if (!g) continue;
        for (int v = 0; v < 6 && tc->valid[v]; v++) {
            const char *t = tc->valid[v];
            JsonMatch m;
            json_match_init(&m, g);
            bool ok = true, early = false;
            size_t last = strlen(t);
            while (last && t[last - 1] == ' ') last--;
            for (size_t i = 0; t[i] && ok; i++) {
                ok = json_match_step(&m, g, (uint8_t)t[i]);
                if (ok && i + 1 < last && json_match_complete(&m, g) && !strchr("0123456789.eE+-", t[i + 1])) early = true;
            }
            CHECK(ok && json_match_complete(&m, g) && !early, "case %zu: valid %s (ok %d, early %d)", ci, t, ok, early);
        }
        for (int v = 0; v < 10 && tc->invalid[v].text; v++) {
            JsonMatch m;
            const size_t n = accepted(g, tc->invalid[v].text, &m);
            if (tc->invalid[v].fails_at == (size_t)-1)
                CHECK(n == strlen(tc->invalid[v].text) && !json_match_complete(&m, g), "case %zu: %s is a prefix only",
                      ci, tc->invalid[v].text);
            else
                CHECK(n == tc->invalid[v].fails_at, "case %zu: %s refused at byte %zu, want %zu", ci,
                      tc->invalid[v].text, n, tc->invalid[v].fails_at);
        }
        json_schema_unref(g);
    }
}

/* A value starts only if its shallowest valid form fits under JSON_MAX_DEPTH containers. */
static void test_depth(void) {
    QErr err;
    JsonSchema *g = compile_text("{\"type\":\"array\",\"items\":{\"$ref\":\"#/$defs/t\"},\"$defs\":{\"t\":{\"type\":"
                                 "\"object\",\"properties\":{\"more\":{\"$ref\":\"#\"},\"two\":{\"type\":\"object\","
                                 "\"properties\":{\"x\":{\"type\":\"object\"}},\"required\":[\"x\"]}}}}}",
                                 &err);
    CHECK(g != NULL, "depth schema: %s", err.msg);
    if (!g) return;
    char buf[1024];
    for (int k = 30; k <= 31; k++) { /* inside object t at depth 2k + 2 */
        size_t n = (size_t)snprintf(buf, sizeof buf, "[");
        for (int i = 0; i < k; i++) n += (size_t)snprintf(buf + n, sizeof buf - n, "{\"more\":[");
        n += (size_t)snprintf(buf + n, sizeof buf - n, "{");
        JsonMatch m;
        CHECK(accepted(g, buf, &m) == n && m.depth == 2 * k + 2, "depth %d reached", 2 * k + 2);
        snprintf(buf + n, sizeof buf - n, "\"two\":{\"x\":{}}}");
        const size_t two = accepted(g, buf, &m);
        if (k == 30) CHECK(two == strlen(buf), "depth 62: \"two\" (2 more containers) fits");
        else CHECK(two == n, "depth 64: no key fits (got %zu of %zu)", two, n);
    }
    json_schema_unref(g);
    g = compile_text("{\"type\":\"array\",\"items\":{\"$ref\":\"#\"}}", &err);
    memset(buf, '[', JSON_MAX_DEPTH + 1);
    buf[JSON_MAX_DEPTH + 1] = 0;
    JsonMatch m;
    CHECK(g && accepted(g, buf, &m) == JSON_MAX_DEPTH, "arrays nest %d deep", JSON_MAX_DEPTH);
    json_schema_unref(g);
}

/* Literals are found within their node: two long enums hold more literals than a uint16 counts. */
static void test_long_enums(void) {
    json_t *props = json_object(), *req = json_array();
    for (int k = 0; k < 2; k++) {
        json_t *values = json_array();
        char name[2] = {(char)('a' + k), 0}, v[16];
        for (int i = 0; i < 40000; i++) {
            snprintf(v, sizeof v, k ? "b%dz" : "a%d", i);
            json_array_append_new(values, json_string(v));
        }
        json_object_set_new(props, name, json_pack("{s:o}", "enum", values));
        json_array_append_new(req, json_string(name));
    }
    json_t *schema = json_pack("{s:s, s:o, s:o}", "type", "object", "properties", props, "required", req);
    QErr err;
    JsonSchema *g = json_schema_compile(schema, &err);
    json_decref(schema);
    CHECK(g != NULL && g->n_lits == 80000, "two enums of 40000 compile: %s", g ? "" : err.msg);
    if (!g) return;
    JsonMatch m;
    const char *ok = "{\"a\":\"a39999\",\"b\":\"b39999z\"}";
    CHECK(accepted(g, ok, &m) == strlen(ok) && json_match_complete(&m, g), "the last values of both enums");
    const size_t past = accepted(g, "{\"a\":\"a40000\"", &m);
    CHECK(past == 11, "a value past the enum refused at %zu (its last digit)", past);
    json_schema_unref(g);
}

/* The mask by brute force: every id's bytes stepped from a copy of the state. */
static int brute_mask(const Tok *tok, const JsonSchema *g, const JsonMatch *st, int V, uint8_t *ok) {
    int n = 0;
    for (int id = 0; id < V; id++) {
        size_t len = 0;
        const char *b = id < tok_vocab_size(tok) ? tok_token_bytes(tok, id, &len) : NULL;
        ok[id] = 0;
        if (!b || !len || tok_is_special(tok, id)) continue;
        JsonMatch m = *st;
        bool fits = true;
        for (size_t i = 0; i < len && fits; i++) fits = json_match_step(&m, g, (uint8_t)b[i]);
        ok[id] = fits;
        n += fits;
    }
    return n;
}

static void test_masks(void) {
    QErr err;
    Tok *tok = tok_load(TOKENIZER, &err);
    CHECK(tok != NULL, "load: %s", err.msg);
    if (!tok) return;
    const int V = 151936;
    const int32_t im_end = tok_token_id(tok, "<|im_end|>", 10), eot = tok_token_id(tok, "<|endoftext|>", 13);
    const int32_t eos[] = {im_end, eot};
    StructVocab *sv = struct_vocab_new(tok, V, eos, 2);
    float *logits = malloc((size_t)V * sizeof *logits);
    uint8_t *ok = malloc((size_t)V);
    static const char *const schemas[] = {kCases[0].schema, kCases[1].schema, kCases[2].schema, kCases[4].schema,
                                          kCases[9].schema};
    uint64_t rng = 88172645463325252ull;
    int total_steps = 0;
    for (size_t si = 0; si < sizeof schemas / sizeof *schemas; si++) {
        JsonSchema *g = compile_text(schemas[si], &err);
        const OutputFormat f = {.kind = OUTPUT_JSON_SCHEMA, .schema = g};
        for (int walk = 0; walk < 3; walk++) {
            OutputConstraint c = output_constraint(sv, &f, false, NULL, 0);
            JsonMatch st; /* the walk's state, kept alongside the constraint's */
            json_match_init(&st, g);
            int mismatches = 0, steps = 0;
            bool ended = false;
            for (; steps < 40 && !ended; steps++) {
                for (int j = 0; j < V; j++) logits[j] = 0.0f;
                c.mask(c.state, logits, V);
                const int n = brute_mask(tok, g, &st, V, ok);
                int allowed = 0;
                for (int j = 0; j < V; j++) {
                    const bool is_end = j == im_end || j == eot;
                    const bool want = is_end ? json_match_complete(&st, g) : ok[j];
                    mismatches += (logits[j] == 0.0f) != want;
                    allowed += logits[j] == 0.0f && !is_end;
                }
                CHECK(allowed == n, "schema %zu walk %d step %d: %d allowed, brute force %d", si, walk, steps, allowed, n);
                /* next: a random allowed token, the end once possible half of the time */
                if (json_match_complete(&st, g) && (rng >> 33) % 2) {
                    ended = true;
                    break;
                }
                rng = rng * 6364136223846793005ull + 1442695040888963407ull;
                int pick = n ? (int)((rng >> 33) % (uint64_t)n) : -1, id = -1;
                for (int j = 0; j < V && pick >= 0; j++)
                    if (ok[j] && pick-- == 0) id = j;
                if (id < 0) break;
                c.accept(c.state, id);
                size_t len = 0;
                const char *b = tok_token_bytes(tok, id, &len);
                for (size_t i = 0; i < len; i++) json_match_step(&st, g, (uint8_t)b[i]);
            }
            total_steps += steps;
            CHECK(mismatches == 0, "schema %zu walk %d: the mask differs from brute force at %d ids", si, walk,
                  mismatches);
            c.free(c.state);
        }
        json_schema_unref(g);
    }
    CHECK(total_steps >= 100, "the walks took %d steps", total_steps);
    /* the cache tells schemas apart: after `{"a":` a map of integers allows no quote, JSON mode does */
    JsonSchema *ints = compile_text(kCases[4].schema, &err);
    const OutputFormat f_ints = {.kind = OUTPUT_JSON_SCHEMA, .schema = ints}, f_any = {.kind = OUTPUT_JSON_OBJECT};
    OutputConstraint a = output_constraint(sv, &f_ints, false, NULL, 0), b = output_constraint(sv, &f_any, false, NULL, 0);
    const int32_t brace = tok_token_id(tok, "{", 1), quote = tok_token_id(tok, "\"", 1), key = tok_token_id(tok, "a", 1);
    const int32_t colon = tok_token_id(tok, ":", 1), one = tok_token_id(tok, "1", 1);
    const int32_t path[] = {brace, quote, key, quote, colon};
    for (int i = 0; i < 5; i++) a.accept(a.state, path[i]), b.accept(b.state, path[i]);
    for (int round = 0; round < 2; round++) { /* computed, then cached */
        for (int j = 0; j < V; j++) logits[j] = 0.0f;
        a.mask(a.state, logits, V);
        CHECK(logits[quote] == -INFINITY && logits[one] == 0.0f, "map of integers: a digit, no quote (round %d)", round);
        for (int j = 0; j < V; j++) logits[j] = 0.0f;
        b.mask(b.state, logits, V);
        CHECK(logits[quote] == 0.0f && logits[one] == 0.0f, "JSON mode: a quote or a digit (round %d)", round);
    }
    a.free(a.state);
    b.free(b.state);
    json_schema_unref(ints);
    free(ok);
    free(logits);
    struct_vocab_free(sv);
    tok_free(tok);
}

/* tool_choice "required": an array of one or more calls, each a tool's name and then parameters
 * valid for that tool (their $refs local to them, absent parameters any object). */
static void test_tool_calls(void) {
    json_t *weather = json_loads("{\"type\":\"object\",\"properties\":{\"city\":{\"type\":\"string\"}},"
                                 "\"required\":[\"city\"]}", 0, NULL);
    json_t *echo = json_loads("{\"$ref\":\"#/$defs/m\",\"$defs\":{\"m\":{\"type\":\"object\",\"properties\":{"
                              "\"text\":{\"type\":\"string\"}}}}}", 0, NULL);
    const char *const names[] = {"get_weather", "get_time", "echo"};
    const json_t *const params[] = {weather, NULL, echo};
    QErr err = {{0}};
    JsonSchema *g = json_schema_tool_calls(names, params, 3, &err);
    CHECK(g != NULL, "three tools: %s", err.msg);
    static const char *const valid[] = {
        "[{\"name\":\"get_weather\",\"parameters\":{\"city\":\"Paris\"}}]",
        "[{\"name\":\"get_time\",\"parameters\":{\"tz\":[1,{}]}}, {\"name\":\"echo\",\"parameters\":{\"text\":\"x\"}}]",
        "[{\"name\":\"echo\",\"parameters\":{}}]",
    };
    static const struct {
        const char *text;
        size_t fails_at;
    } invalid[] = {
        {"[]", 1},
        {"[{\"name\":\"get_weather\",\"parameters\":{}}]", 37},
        {"[{\"name\":\"nope\"", 10},
        {"[{\"parameters\":{}}]", 3},
        {"[{\"name\":\"echo\",\"parameters\":{\"text\":1}}]", 37},
        {"[{\"name\":\"echo\"}]", 15},
    };
    JsonMatch m;
    for (size_t i = 0; g && i < sizeof valid / sizeof *valid; i++)
        CHECK(accepted(g, valid[i], &m) == strlen(valid[i]) && json_match_complete(&m, g), "calls: valid %s", valid[i]);
    for (size_t i = 0; g && i < sizeof invalid / sizeof *invalid; i++) {
        const size_t n = accepted(g, invalid[i].text, &m);
        CHECK(n == invalid[i].fails_at, "calls: %s refused at %zu, want %zu", invalid[i].text, n, invalid[i].fails_at);
    }
    json_schema_unref(g);
    /* one tool: no union needed */
    g = json_schema_tool_calls(names + 1, params + 1, 1, &err);
    const char *one = "[{\"name\":\"get_time\",\"parameters\":{\"a\":1}},{\"name\":\"get_time\",\"parameters\":{}}]";
    CHECK(g && accepted(g, one, &m) == strlen(one) && json_match_complete(&m, g), "one tool: %s", g ? one : err.msg);
    json_schema_unref(g);
    /* refusals name the function and the place in its parameters; repeated names */
    json_t *pattern = json_loads("{\"type\":\"object\",\"properties\":{\"s\":{\"pattern\":\"a\"}}}", 0, NULL);
    const json_t *const bad[] = {weather, pattern};
    g = json_schema_tool_calls(names, bad, 2, &err);
    CHECK(!g && strstr(err.msg, "'get_time'") && strstr(err.msg, "#/properties/s/pattern"), "bad parameters: %s", err.msg);
    const char *const twice[] = {"f", "f"};
    g = json_schema_tool_calls(twice, params, 2, &err);
    CHECK(!g && strstr(err.msg, "same tag \"f\""), "repeated names: %s", err.msg);
    json_decref(pattern);
    json_decref(weather);
    json_decref(echo);
}

int main(void) {
    test_compile_accepts();
    test_compile_refuses();
    test_recogniser();
    test_depth();
    test_long_enums();
    test_tool_calls();
    test_masks();
    return test_finish();
}
