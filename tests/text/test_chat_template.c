/* test_chat_template.c — the native Qwen3 chat template against transformers' renders
 * (../shared/reference/chat_template_cases.json: every render must be byte-identical), tojson
 * against Python's json.dumps(ensure_ascii=False), and the errors for malformed messages. */
#include <jansson.h>
#include <string.h>

#include "../test_util.h"
#include "text/chat_template.h"

static size_t first_diff(const char *a, const char *b) {
    size_t i = 0;
    while (a[i] && a[i] == b[i]) i++;
    return i;
}

static void test_reference_renders(void) {
    json_error_t jerr;
    json_t *root = json_load_file(shared_path("reference/chat_template_cases.json"), JSON_PRESERVE_ORDER, &jerr);
    CHECK(root != NULL, "cannot load chat_template_cases.json: %s (line %d)", jerr.text, jerr.line);
    if (!root) return;
    json_t *renders = json_object_get(root, "renders");
    CHECK(json_array_size(renders) >= 28, "expected >= 28 renders, got %zu", json_array_size(renders));
    size_t i;
    json_t *r;
    json_array_foreach(renders, i, r) {
        const char *name = json_string_value(json_object_get(r, "name"));
        bool think = json_is_true(json_object_get(r, "enable_thinking"));
        bool gen = json_is_true(json_object_get(r, "add_generation_prompt"));
        const char *want = json_string_value(json_object_get(r, "text"));
        QErr err = {{0}};
        char *got = chat_template_render(json_object_get(r, "messages"), json_object_get(r, "tools"), gen, think, &err);
        CHECK(got != NULL, "%s (think=%d gen=%d): %s", name, think, gen, err.msg);
        if (!got) continue;
        size_t d = first_diff(got, want);
        CHECK(!strcmp(got, want), "%s (think=%d gen=%d): differs at byte %zu:\n got: %.60s\nwant: %.60s", name, think,
              gen, d, got + d, want + d);
        free(got);
    }
    json_decref(root);
}

/* Expected text produced by Python 3: json.dumps(json.loads(IN), ensure_ascii=False). */
static void test_tojson_matches_python(void) {
    const char *in =
        "{\"b\": [1.0, 1e-5, 0.0001, 0.1, 1e16, 1e15, 123456789.125, -0.0, 2.5e-7, 1e300, 5e-324, "
        "0.30000000000000004, 100, -7, 1.7976931348623157e308, 9999999999999998.0], \"a\": "
        "\"\\u00e9\\u4e2d\\ud83d\\ude00\\n\\t\\r\\b\\f\\\"\\\\\\u0001\\u001f\\u007f/<>&'\", \"d\": null, \"e\": true, "
        "\"f\": false, \"z\": {}, \"y\": [], \"nested\": {\"k\": [{\"x\": 1}]}}";
    const char *want =
        "{\"b\": [1.0, 1e-05, 0.0001, 0.1, 1e+16, 1000000000000000.0, 123456789.125, -0.0, 2.5e-07, 1e+300, "
        "5e-324, 0.30000000000000004, 100, -7, 1.7976931348623157e+308, 9999999999999998.0], \"a\": "
        "\"\xc3\xa9\xe4\xb8\xad\xf0\x9f\x98\x80\\n\\t\\r\\b\\f\\\"\\\\\\u0001\\u001f\x7f/<>&'\", \"d\": null, "
        "\"e\": true, \"f\": false, \"z\": {}, \"y\": [], \"nested\": {\"k\": [{\"x\": 1}]}}";
    json_error_t jerr;
    json_t *v = json_loads(in, JSON_PRESERVE_ORDER, &jerr);
    CHECK(v != NULL, "parse: %s", jerr.text);
    QErr err = {{0}};
    char *got = chat_tojson(v, &err);
    CHECK(got && !strcmp(got, want), "tojson:\n got: %s\nwant: %s", got ? got : err.msg, want);
    free(got);
    json_decref(v);

    /* key order is insertion order, not sorted (transformers passes sort_keys=False) */
    v = json_loads("{\"zeta\": 1, \"alpha\": {\"y\": 2, \"x\": 3}}", JSON_PRESERVE_ORDER, &jerr);
    got = chat_tojson(v, &err);
    CHECK(got && !strcmp(got, "{\"zeta\": 1, \"alpha\": {\"y\": 2, \"x\": 3}}"), "order: %s", got ? got : err.msg);
    free(got);
    json_decref(v);
}

/* Renders the messages JSON text and expects failure with `needle` in the message. */
static void expect_error(const char *messages, const char *tools, const char *needle) {
    json_error_t jerr;
    json_t *m = json_loads(messages, JSON_PRESERVE_ORDER | JSON_DECODE_ANY | JSON_ALLOW_NUL, &jerr);
    json_t *t = tools ? json_loads(tools, JSON_DECODE_ANY, &jerr) : NULL;
    CHECK(m != NULL, "test input does not parse: %s", messages);
    QErr err = {{0}};
    char *got = chat_template_render(m, t, true, true, &err);
    CHECK(got == NULL, "expected an error for %s, got a render", messages);
    CHECK(strstr(err.msg, needle) != NULL, "error for %s: want '%s' in '%s'", messages, needle, err.msg);
    free(got);
    json_decref(m);
    json_decref(t);
}

static void test_errors(void) {
    expect_error("{\"role\": \"user\"}", NULL, "messages: expected an array");
    expect_error("[]", NULL, "messages: expected at least one message");
    expect_error("[{\"role\": \"user\", \"content\": \"hi\"}, 3]", NULL, "messages[1]: expected an object");
    expect_error("[{\"content\": \"hi\"}]", NULL, "messages[0]: missing 'role'");
    expect_error("[{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"bot\", \"content\": \"x\"}]", NULL,
                 "messages[1].role: unknown role 'bot'");
    expect_error("[{\"role\": 7, \"content\": \"x\"}]", NULL, "messages[0].role: expected a string");
    expect_error("[{\"role\": \"user\"}]", NULL, "messages[0]: missing 'content'");
    expect_error("[{\"role\": \"assistant\"}]", NULL, "messages[0]: missing 'content'");
    expect_error("[{\"role\": \"user\", \"content\": 5}]", NULL, "messages[0].content: expected a string");
    expect_error("[{\"role\": \"user\", \"content\": [{\"type\": \"image_url\", \"image_url\": {}}]}]", NULL,
                 "messages[0].content[0].type: unsupported part type 'image_url'");
    expect_error("[{\"role\": \"user\", \"content\": [{\"type\": \"text\"}]}]", NULL,
                 "messages[0].content[0].text: expected a string");
    expect_error("[{\"role\": \"user\", \"content\": \"a\\u0000b\"}]", NULL, "messages[0].content: strings containing NUL");
    expect_error("[{\"role\": \"assistant\", \"content\": \"\", \"tool_calls\": {}}]", NULL,
                 "messages[0].tool_calls: expected an array");
    expect_error("[{\"role\": \"assistant\", \"content\": null, \"tool_calls\": [{\"type\": \"function\", "
                 "\"function\": {\"arguments\": {}}}]}]",
                 NULL, "messages[0].tool_calls[0].function.name: expected a string");
    expect_error("[{\"role\": \"assistant\", \"content\": null, \"tool_calls\": [{\"type\": \"function\", "
                 "\"function\": {\"name\": \"f\"}}]}]",
                 NULL, "messages[0].tool_calls[0].function: missing 'arguments'");
    expect_error("[{\"role\": \"user\", \"content\": \"x\", \"tool_calls\": [{\"name\": \"f\", \"arguments\": {}}]}]",
                 NULL, "messages[0].tool_calls: only assistant messages");
    expect_error("[{\"role\": \"assistant\", \"content\": \"x\", \"reasoning_content\": 1}]", NULL,
                 "messages[0].reasoning_content: expected a string");
    expect_error("[{\"role\": \"user\", \"content\": \"x\"}]", "{\"type\": \"function\"}", "tools: expected an array");
}

/* Behaviour of the template that the reference renders do not exercise; expected strings
 * follow from the Jinja source (tokenizer_config.json) and were checked with jinja2 in
 * transformers' environment (tests/e2e/test_chat_template_cli.py re-checks them live). */
static void expect_render(const char *messages, bool gen, bool think, const char *want) {
    json_error_t jerr;
    json_t *m = json_loads(messages, JSON_PRESERVE_ORDER, &jerr);
    CHECK(m != NULL, "test input does not parse: %s: %s", messages, jerr.text);
    QErr err = {{0}};
    char *got = chat_template_render(m, NULL, gen, think, &err);
    CHECK(got && !strcmp(got, want), "render of %s:\n got: %s\nwant: %s", messages, got ? got : err.msg, want);
    free(got);
    json_decref(m);
}

static void test_template_branches(void) {
    /* last assistant after the last query keeps its reasoning; content parts joined by \n;
     * null content is empty; tool calls without a "function" wrapper; string arguments verbatim */
    expect_render("[{\"role\": \"user\", \"content\": [{\"type\": \"text\", \"text\": \"a\"}, {\"type\": \"text\", "
                  "\"text\": \"b\"}]}, {\"role\": \"assistant\", \"content\": \"<think>\\nr1\\n</think>\\n\\nans\"}]",
                  false, true,
                  "<|im_start|>user\na\nb<|im_end|>\n<|im_start|>assistant\n<think>\nr1\n</think>\n\nans<|im_end|>\n");
    expect_render("[{\"role\": \"user\", \"content\": \"q\"}, {\"role\": \"assistant\", \"content\": null, "
                  "\"reasoning_content\": \"\\nthink\\n\", \"tool_calls\": [{\"name\": \"f\", \"arguments\": "
                  "\"{\\\"a\\\":1}\"}, {\"function\": {\"name\": \"g\", \"arguments\": {\"b\": [1, 2.5]}}}]}, "
                  "{\"role\": \"tool\", \"content\": \"r1\"}, {\"role\": \"tool\", \"content\": \"r2\"}]",
                  true, true,
                  "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<think>\nthink\n</think>\n\n<tool_call>\n"
                  "{\"name\": \"f\", \"arguments\": {\"a\":1}}\n</tool_call>\n<tool_call>\n{\"name\": \"g\", "
                  "\"arguments\": {\"b\": [1, 2.5]}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\nr1\n"
                  "</tool_response>\n<tool_response>\nr2\n</tool_response><|im_end|>\n<|im_start|>assistant\n");
    /* a system message that is not first is rendered in place */
    expect_render("[{\"role\": \"user\", \"content\": \"u\"}, {\"role\": \"system\", \"content\": \"s\"}]", false, true,
                  "<|im_start|>user\nu<|im_end|>\n<|im_start|>system\ns<|im_end|>\n");
}

int main(void) {
    test_reference_renders();
    test_tojson_matches_python();
    test_errors();
    test_template_branches();
    return test_finish();
}
