/* test_tokenizer.c — the tokenizer against Hugging Face tokenizers' own outputs.
 *
 * ../shared/reference/tokenizer_cases.json (40 edge cases) and chat_template_cases.json (28
 * rendered conversations) hold the ids that tokenizers 0.23 produced; every one must match
 * exactly, decode back to the NFC text, and stream back to the same text one id at a time.
 * Also: lookups, decoding options, errors, and concurrent encodes on one Tok. */
#include <jansson.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <utf8proc.h>

#include "../test_util.h"
#include "text/tokenizer.h"

#define TOKENIZER "assets/tokenizer/qwen3/tokenizer.json"

typedef struct Case {
    const char *text;
    size_t len;
    int32_t *ids;
    size_t n;
    const char *name;
} Case;

static int valid_utf8(const char *s, size_t n) {
    utf8proc_int32_t cp;
    for (size_t i = 0; i < n;) {
        utf8proc_ssize_t k = utf8proc_iterate((const utf8proc_uint8_t *)s + i, (utf8proc_ssize_t)(n - i), &cp);
        if (k <= 0) return 0;
        i += (size_t)k;
    }
    return 1;
}

static int32_t *json_ids(const json_t *arr, size_t *n) {
    *n = json_array_size(arr);
    int32_t *ids = malloc((*n + 1) * sizeof *ids);
    for (size_t i = 0; i < *n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    return ids;
}

static void print_ids(const char *label, const int32_t *ids, size_t n) {
    fprintf(stderr, "  %s:", label);
    for (size_t i = 0; i < n && i < 40; i++) fprintf(stderr, " %d", ids[i]);
    fprintf(stderr, n > 40 ? " ...\n" : "\n");
}

/* Encodes c->text and compares with c->ids; returns 1 if equal. */
static int check_encode(const Tok *tok, const Case *c) {
    QErr err;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = tok_encode(tok, c->text, c->len, &ids, &n, &err);
    CHECK(rc == 0, "%s: encode failed: %s", c->name, err.msg);
    if (rc) return 0;
    int same = n == c->n && !memcmp(ids, c->ids, n * sizeof *ids);
    CHECK(same, "%s: ids differ for %.60s", c->name, c->text);
    if (!same) {
        print_ids("quill", ids, n);
        print_ids("tokenizers", c->ids, c->n);
    }
    free(ids);
    return same;
}

/* Streams c->ids one at a time; the chunks must be valid UTF-8 and add up to `full`. */
static void check_stream(const Tok *tok, const Case *c, const char *full, size_t full_len, int skip) {
    QErr err;
    TokStream *s = tok_stream_new(tok, skip, &err);
    CHECK(s != NULL, "stream_new: %s", err.msg);
    if (!s) return;
    char *acc = malloc(full_len * 2 + 64);
    size_t n = 0, len;
    int chunks_ok = 1;
    for (size_t i = 0; i <= c->n; i++) {
        const char *chunk = i < c->n ? tok_stream_put(s, c->ids[i], &len, &err) : tok_stream_flush(s, &len);
        CHECK(chunk != NULL, "%s: stream_put(%d): %s", c->name, c->ids[i], err.msg);
        if (!chunk) break;
        if (!valid_utf8(chunk, len) || strlen(chunk) > len) chunks_ok = 0;
        if (n + len <= full_len * 2 + 64) memcpy(acc + n, chunk, len);
        n += len;
    }
    CHECK(chunks_ok, "%s: a streamed chunk is not valid UTF-8", c->name);
    CHECK(n == full_len && !memcmp(acc, full, n), "%s: streamed text differs from decode (skip=%d)",
          c->name, skip);
    free(acc);
    tok_stream_free(s);
}

static void test_reference_cases(const Tok *tok) {
    json_error_t jerr;
    json_t *root = json_load_file(shared_path("reference/tokenizer_cases.json"), 0, &jerr);
    CHECK(root != NULL, "cannot load tokenizer_cases.json: %s", jerr.text);
    if (!root) return;
    json_t *cases = json_object_get(root, "cases");
    CHECK(json_array_size(cases) >= 40, "expected 40 cases, got %zu", json_array_size(cases));
    size_t i, good = 0;
    json_t *jc;
    json_array_foreach(cases, i, jc) {
        char name[32];
        snprintf(name, sizeof name, "case %zu", i);
        json_t *text = json_object_get(jc, "text"), *dec = json_object_get(jc, "decoded");
        Case c = {json_string_value(text), json_string_length(text), NULL, 0, name};
        c.ids = json_ids(json_object_get(jc, "ids"), &c.n);
        good += check_encode(tok, &c);

        QErr err;
        size_t len;
        char *s = tok_decode(tok, c.ids, c.n, 0, &len, &err);
        CHECK(s != NULL, "%s: decode failed: %s", name, err.msg);
        if (s) {
            CHECK(len == json_string_length(dec) && !memcmp(s, json_string_value(dec), len),
                  "%s: decode gives '%s', tokenizers '%s'", name, s, json_string_value(dec));
            utf8proc_uint8_t *nfc = NULL;
            utf8proc_ssize_t m = utf8proc_map((const utf8proc_uint8_t *)c.text, (utf8proc_ssize_t)c.len,
                                              &nfc, UTF8PROC_STABLE | UTF8PROC_COMPOSE);
            CHECK(m >= 0 && (size_t)m == len && !memcmp(nfc, s, len), "%s: decode != NFC(text)", name);
            free(nfc);
            check_stream(tok, &c, s, len, 0);
            free(s);
        }
        free(c.ids);
    }
    printf("tokenizer_cases: %zu/%zu identical\n", good, json_array_size(cases));
    json_decref(root);
}

static void test_chat_renders(const Tok *tok) {
    json_error_t jerr;
    json_t *root = json_load_file(shared_path("reference/chat_template_cases.json"), 0, &jerr);
    CHECK(root != NULL, "cannot load chat_template_cases.json: %s", jerr.text);
    if (!root) return;
    json_t *renders = json_object_get(root, "renders");
    size_t i, good = 0;
    json_t *jr;
    json_array_foreach(renders, i, jr) {
        char name[96];
        snprintf(name, sizeof name, "render %zu (%s)", i, json_string_value(json_object_get(jr, "name")));
        json_t *text = json_object_get(jr, "text");
        Case c = {json_string_value(text), json_string_length(text), NULL, 0, name};
        c.ids = json_ids(json_object_get(jr, "ids"), &c.n);
        good += check_encode(tok, &c);
        QErr err;
        size_t len;
        char *s = tok_decode(tok, c.ids, c.n, 0, &len, &err);
        CHECK(s && len == c.len && !memcmp(s, c.text, len), "%s: decode != text", name);
        if (s) check_stream(tok, &c, s, len, 0);
        free(s);
        s = tok_decode(tok, c.ids, c.n, 1, &len, &err);
        CHECK(s && !strstr(s, "<|im_start|>") && !strstr(s, "<|im_end|>"),
              "%s: skip_special left a special token", name);
        if (s) check_stream(tok, &c, s, len, 1);
        free(s);
        free(c.ids);
    }
    printf("chat_template renders: %zu/%zu identical\n", good, json_array_size(renders));
    CHECK(json_array_size(renders) >= 28, "expected 28 renders");
    json_decref(root);
}

static void test_lookups(const Tok *tok) {
    CHECK(tok_token_id(tok, "<think>", 7) == 151667, "<think>");
    CHECK(tok_token_id(tok, "</think>", 8) == 151668, "</think>");
    CHECK(tok_token_id(tok, "<|im_end|>", 10) == 151645, "<|im_end|>");
    CHECK(tok_token_id(tok, "<|endoftext|>", 13) == 151643, "<|endoftext|>");
    CHECK(tok_token_id(tok, "\n", 1) == 198, "newline is 198");
    CHECK(tok_token_id(tok, " world", 6) == 1879, "' world' is 1879");
    CHECK(tok_token_id(tok, "no such token at all", 20) == -1, "unknown text");
    CHECK(tok_vocab_size(tok) == 151669, "vocab size %d", tok_vocab_size(tok));
    size_t len;
    const char *b = tok_token_bytes(tok, 198, &len);
    CHECK(b && len == 1 && b[0] == '\n', "bytes of 198");
    b = tok_token_bytes(tok, 151645, &len);
    CHECK(b && len == 10 && !memcmp(b, "<|im_end|>", 10), "bytes of <|im_end|>");
    CHECK(tok_token_bytes(tok, 151669, &len) == NULL, "bytes of an id past the end");
    CHECK(tok_token_bytes(tok, -1, &len) == NULL, "bytes of -1");
    CHECK(tok_is_special(tok, 151645) == 1, "<|im_end|> is special");
    CHECK(tok_is_special(tok, 151667) == 0, "<think> is not special");
    CHECK(tok_is_special(tok, 9707) == 0, "Hello is not special");
}

static void test_decode_edges(const Tok *tok) {
    QErr err;
    size_t len;
    /* "é" is C3 A9: its two byte tokens decode to it together, to U+FFFD alone. */
    int32_t c3 = tok_token_id(tok, "\xC3", 1), a9 = tok_token_id(tok, "\xA9", 1);
    CHECK(c3 >= 0 && a9 >= 0, "byte tokens exist");
    int32_t both[] = {c3, a9}, lone[] = {c3}, rev[] = {a9, c3};
    char *s = tok_decode(tok, both, 2, 0, &len, &err);
    CHECK(s && !strcmp(s, "\xC3\xA9"), "two byte tokens make é");
    free(s);
    s = tok_decode(tok, lone, 1, 0, &len, &err);
    CHECK(s && !strcmp(s, "\xEF\xBF\xBD"), "a lone lead byte decodes to U+FFFD");
    free(s);
    s = tok_decode(tok, rev, 2, 0, &len, &err);
    CHECK(s && !strcmp(s, "\xEF\xBF\xBD\xEF\xBF\xBD"), "continuation then lead: two U+FFFD");
    free(s);

    TokStream *st = tok_stream_new(tok, 0, &err);
    const char *out = tok_stream_put(st, c3, &len, &err);
    CHECK(out && len == 0, "stream holds back a lead byte");
    out = tok_stream_put(st, a9, &len, &err);
    CHECK(out && len == 2 && !strcmp(out, "\xC3\xA9"), "stream completes é");
    out = tok_stream_put(st, c3, &len, &err);
    CHECK(out && len == 0, "held again");
    out = tok_stream_put(st, 99999999, &len, &err);
    CHECK(out == NULL && strstr(err.msg, "99999999"), "stream rejects a bad id: %s", err.msg);
    out = tok_stream_flush(st, &len);
    CHECK(len == 3 && !strcmp(out, "\xEF\xBF\xBD"), "flush turns the held byte into U+FFFD");
    out = tok_stream_flush(st, &len);
    CHECK(len == 0, "flush resets");
    tok_stream_free(st);

    int32_t bad[] = {9707, 151669};
    CHECK(tok_decode(tok, bad, 2, 0, &len, &err) == NULL && strstr(err.msg, "151669"),
          "decode names the bad id: %s", err.msg);

    int32_t *ids;
    size_t n;
    CHECK(tok_encode(tok, "ok \xC3(", 5, &ids, &n, &err) == -1 && strstr(err.msg, "UTF-8"),
          "invalid UTF-8 rejected: %s", err.msg);
    CHECK(tok_encode(tok, "a\0b", 3, &ids, &n, &err) == 0 && n == 3, "NUL inside text encodes");
    if (n == 3) CHECK(ids[1] == tok_token_id(tok, "\0", 1), "NUL is its byte token");
    free(ids);
}

/* Concurrent encodes of the same texts on one Tok must all give the reference ids. */
typedef struct ThreadArg {
    const Tok *tok;
    const Case *cases;
    size_t n;
    int failures;
} ThreadArg;

static void *encode_worker(void *p) {
    ThreadArg *a = p;
    for (int round = 0; round < 20; round++) {
        for (size_t i = 0; i < a->n; i++) {
            int32_t *ids;
            size_t n;
            QErr err;
            if (tok_encode(a->tok, a->cases[i].text, a->cases[i].len, &ids, &n, &err)) {
                a->failures++;
                continue;
            }
            if (n != a->cases[i].n || memcmp(ids, a->cases[i].ids, n * sizeof *ids)) a->failures++;
            free(ids);
        }
    }
    return NULL;
}

static void test_threads(const Tok *tok) {
    json_t *root = json_load_file(shared_path("reference/tokenizer_cases.json"), 0, NULL);
    if (!root) return;
    json_t *cases = json_object_get(root, "cases");
    size_t nc = json_array_size(cases);
    Case *cs = calloc(nc, sizeof *cs);
    for (size_t i = 0; i < nc; i++) {
        json_t *jc = json_array_get(cases, i);
        cs[i].text = json_string_value(json_object_get(jc, "text"));
        cs[i].len = json_string_length(json_object_get(jc, "text"));
        cs[i].ids = json_ids(json_object_get(jc, "ids"), &cs[i].n);
    }
    enum { NT = 4 };
    pthread_t th[NT];
    ThreadArg args[NT];
    for (int i = 0; i < NT; i++) {
        args[i] = (ThreadArg){tok, cs, nc, 0};
        pthread_create(&th[i], NULL, encode_worker, &args[i]);
    }
    int failures = 0;
    for (int i = 0; i < NT; i++) {
        pthread_join(th[i], NULL);
        failures += args[i].failures;
    }
    CHECK(failures == 0, "%d wrong encodes across %d threads", failures, NT);
    for (size_t i = 0; i < nc; i++) free(cs[i].ids);
    free(cs);
    json_decref(root);
}

static void write_file(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    if (f) {
        fputs(text, f);
        fclose(f);
    }
}

static void test_load_errors(void) {
    QErr err;
    CHECK(tok_load("/nonexistent/quill-dir", &err) == NULL && strstr(err.msg, "/nonexistent/quill-dir"),
          "missing path named: %s", err.msg);
    char dir[64], file[128];
    snprintf(dir, sizeof dir, "/tmp/quill-tok-test-%d", (int)getpid());
    snprintf(file, sizeof file, "%s/tokenizer.json", dir);
    char cmd[160];
    snprintf(cmd, sizeof cmd, "mkdir -p %s", dir);
    CHECK(system(cmd) == 0, "mkdir");
    CHECK(tok_load(dir, &err) == NULL && strstr(err.msg, "tokenizer.json"),
          "directory without tokenizer.json: %s", err.msg);
    write_file(file, "{\"model\": {\"type\": \"BPE\",\n \"vocab\": {\"a\": 0,}}}");
    CHECK(tok_load(dir, &err) == NULL && strstr(err.msg, file) && strstr(err.msg, "line 2"),
          "syntax error with file and line: %s", err.msg);
    write_file(file, "{\"normalizer\": {\"type\": \"NFKC\"}}");
    CHECK(tok_load(file, &err) == NULL && strstr(err.msg, "normalizer") && strstr(err.msg, "NFKC"),
          "unsupported normalizer named: %s", err.msg);
    write_file(file, "[1, 2]");
    CHECK(tok_load(file, &err) == NULL && strstr(err.msg, file), "not an object: %s", err.msg);
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    CHECK(system(cmd) == 0, "rm");
}

int main(void) {
    QErr err;
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    Tok *tok = tok_load(TOKENIZER, &err);
    clock_gettime(CLOCK_MONOTONIC, &b);
    CHECK(tok != NULL, "load: %s", err.msg);
    if (!tok) return test_finish();
    printf("load: %.3f s\n", (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_nsec - a.tv_nsec) * 1e-9);
    test_reference_cases(tok);
    test_chat_renders(tok);
    test_lookups(tok);
    test_decode_edges(tok);
    test_threads(tok);
    test_load_errors();
    tok_free(tok);
    return test_finish();
}
