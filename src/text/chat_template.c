/* chat_template.c — Qwen3's chat template as straight-line C instead of a Jinja interpreter.
 *
 * Why native: a general Jinja engine (with Python string semantics, namespaces, filters and
 * loop variables) would be the largest and least-tested piece of the text stack, and quill only
 * ever needs this one template. The price is that a model shipping a different template needs
 * code here; in exchange every branch of the template is a readable C statement, checked
 * byte-for-byte against transformers' renders in tests/text/test_chat_template.c.
 *
 * Shape: messages are first validated and normalised (role, content flattened to one string,
 * tool calls checked) so that rendering cannot fail halfway on a bad field, then rendered into a
 * memstream. Python's str.split / strip('\n') / lstrip('\n') are done on (pointer, length)
 * views. Where the Jinja template would silently print nothing for a malformed message (unknown
 * role, tool call without a name) we refuse with an error instead: a server should answer 400,
 * not prompt the model with a conversation that lost a turn. */
#include "text/chat_template.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- tojson (Python json.dumps) */

/* jansson's own parser stops at 2048 levels; values built in code get the same bound. */
#define TOJSON_MAX_DEPTH 2048

static void put_json_string(FILE *f, const char *s, size_t n) {
    fputc('"', f);
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        switch (c) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        case '\b': fputs("\\b", f); break;
        case '\f': fputs("\\f", f); break;
        default:
            if (c < 0x20)
                fprintf(f, "\\u%04x", c);
            else
                fputc(c, f);
        }
    }
    fputc('"', f);
}

/* Does 0.DIGITS x 10^decpt read back as ax? */
static int reads_back(double ax, const char *digits, int nd, int decpt) {
    char s[48];
    snprintf(s, sizeof s, "0.%.*se%d", nd, digits, decpt);
    return strtod(s, NULL) == ax;
}

/* The shortest digit string that reads back as ax > 0 (as David Gay's dtoa mode 0, which
 * Python uses): into digits (no trailing zeros), returning the count, with *decpt such that
 * ax ~ 0.DIGITS x 10^decpt. At each length the correctly rounded string is tried first; where
 * ax's rounding interval is lopsided (powers of two) the next string up or down may read back
 * while the nearest does not, so those are tried too. */
static int shortest_digits(double ax, char digits[static 18], int *decpt) {
    int nd = 17;
    for (int p = 1; p <= 17; p++) {
        char buf[40];
        snprintf(buf, sizeof buf, "%.*e", p - 1, ax); /* d[.ddd]e[+-]XX */
        const char *c = buf;
        nd = 0;
        for (; *c != 'e'; c++)
            if (*c != '.') digits[nd++] = *c;
        *decpt = atoi(c + 1) + 1;
        if (reads_back(ax, digits, nd, *decpt)) break;
        char up[18], down[18];
        int up_decpt = *decpt, down_decpt = *decpt, i;
        memcpy(up, digits, (size_t)nd);
        memcpy(down, digits, (size_t)nd);
        for (i = nd - 1; i >= 0 && up[i] == '9'; i--) up[i] = '0';
        if (i >= 0) {
            up[i]++;
        } else { /* 99..9 + 1 = 100..0 */
            up[0] = '1';
            up_decpt++;
        }
        for (i = nd - 1; down[i] == '0'; i--) down[i] = '9';
        down[i]--;
        if (down[0] == '0') { /* 100..0 - 1: the nearest p-digit number below is 99..9, a decade down */
            memset(down, '9', (size_t)nd);
            down_decpt--;
        }
        if (reads_back(ax, up, nd, up_decpt)) {
            memcpy(digits, up, (size_t)nd);
            *decpt = up_decpt;
            break;
        }
        if (reads_back(ax, down, nd, down_decpt)) {
            memcpy(digits, down, (size_t)nd);
            *decpt = down_decpt;
            break;
        }
    }
    while (nd > 1 && digits[nd - 1] == '0') nd--;
    return nd;
}

/* Python's repr(float): shortest round-trip digits, written in fixed notation when the decimal
 * exponent is in (-4, 16] (with ".0" if integral), else as d.ddde+XX. */
static void put_py_float(FILE *f, double x) {
    if (x == 0) {
        fputs(signbit(x) ? "-0.0" : "0.0", f);
        return;
    }
    if (x < 0) fputc('-', f);
    char digits[18];
    int decpt;
    int nd = shortest_digits(fabs(x), digits, &decpt);
    if (decpt > -4 && decpt <= 16) {
        if (decpt <= 0) {
            fputs("0.", f);
            for (int i = 0; i < -decpt; i++) fputc('0', f);
            fwrite(digits, 1, (size_t)nd, f);
        } else if (decpt >= nd) {
            fwrite(digits, 1, (size_t)nd, f);
            for (int i = nd; i < decpt; i++) fputc('0', f);
            fputs(".0", f);
        } else {
            fwrite(digits, 1, (size_t)decpt, f);
            fputc('.', f);
            fwrite(digits + decpt, 1, (size_t)(nd - decpt), f);
        }
    } else {
        fputc(digits[0], f);
        if (nd > 1) {
            fputc('.', f);
            fwrite(digits + 1, 1, (size_t)(nd - 1), f);
        }
        int e = decpt - 1;
        fprintf(f, "e%c%02d", e < 0 ? '-' : '+', e < 0 ? -e : e);
    }
}

static int put_tojson(FILE *f, const json_t *v, int depth, QErr *err) {
    if (depth > TOJSON_MAX_DEPTH) return qerr_set(err, "JSON value nested deeper than %d levels", TOJSON_MAX_DEPTH);
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        fputc('{', f);
        const char *key;
        const json_t *val;
        int first = 1;
        /* jansson keeps insertion order (it ignores JSON_PRESERVE_ORDER since 2.8). */
        json_object_foreach((json_t *)v, key, val) {
            if (!first) fputs(", ", f);
            first = 0;
            put_json_string(f, key, strlen(key));
            fputs(": ", f);
            if (put_tojson(f, val, depth + 1, err)) return -1;
        }
        fputc('}', f);
        return 0;
    }
    case JSON_ARRAY:
        fputc('[', f);
        for (size_t i = 0; i < json_array_size(v); i++) {
            if (i) fputs(", ", f);
            if (put_tojson(f, json_array_get(v, i), depth + 1, err)) return -1;
        }
        fputc(']', f);
        return 0;
    case JSON_STRING:
        put_json_string(f, json_string_value(v), json_string_length(v));
        return 0;
    case JSON_INTEGER:
        fprintf(f, "%" JSON_INTEGER_FORMAT, json_integer_value(v));
        return 0;
    case JSON_REAL:
        put_py_float(f, json_real_value(v));
        return 0;
    case JSON_TRUE: fputs("true", f); return 0;
    case JSON_FALSE: fputs("false", f); return 0;
    case JSON_NULL: fputs("null", f); return 0;
    }
    return qerr_set(err, "unknown JSON value type");
}

/* Closes a memstream and hands back its buffer, or NULL (buffer freed) on a write failure. */
static char *memstream_finish(FILE *f, char **buf, QErr *err) {
    int bad = ferror(f);
    if (fclose(f) || bad) { /* fclose publishes *buf, so read it only after */
        free(*buf);
        qerr_set(err, "out of memory while rendering");
        return NULL;
    }
    return *buf;
}

char *chat_tojson(const json_t *v, QErr *err) {
    if (!v) {
        qerr_set(err, "chat_tojson: NULL value");
        return NULL;
    }
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (!f) {
        qerr_set(err, "out of memory while rendering");
        return NULL;
    }
    if (put_tojson(f, v, 0, err)) {
        fclose(f);
        free(buf);
        return NULL;
    }
    return memstream_finish(f, &buf, err);
}

/* ---------------------------------------------------------------- string views (Python str ops) */

typedef struct Str {
    const char *p;
    size_t n;
} Str;

static Str str_of(const char *s) { return (Str){s, strlen(s)}; }

static int str_has_prefix(Str s, const char *pre) {
    size_t m = strlen(pre);
    return s.n >= m && !memcmp(s.p, pre, m);
}

static int str_has_suffix(Str s, const char *suf) {
    size_t m = strlen(suf);
    return s.n >= m && !memcmp(s.p + s.n - m, suf, m);
}

/* Offset of the first / last occurrence of needle, or -1. */
static long str_find(Str s, const char *needle) {
    const char *hit = memmem(s.p, s.n, needle, strlen(needle));
    return hit ? (long)(hit - s.p) : -1;
}

static long str_rfind(Str s, const char *needle) {
    size_t m = strlen(needle);
    if (m > s.n) return -1;
    for (size_t i = s.n - m + 1; i-- > 0;)
        if (!memcmp(s.p + i, needle, m)) return (long)i;
    return -1;
}

/* s.split(sep)[0] and s.split(sep)[-1]. */
static Str str_before_first(Str s, const char *sep) {
    long i = str_find(s, sep);
    return i < 0 ? s : (Str){s.p, (size_t)i};
}

static Str str_after_last(Str s, const char *sep) {
    long i = str_rfind(s, sep);
    if (i < 0) return s;
    size_t skip = (size_t)i + strlen(sep);
    return (Str){s.p + skip, s.n - skip};
}

static Str str_lstrip_nl(Str s) {
    while (s.n && s.p[0] == '\n') s.p++, s.n--;
    return s;
}

static Str str_rstrip_nl(Str s) {
    while (s.n && s.p[s.n - 1] == '\n') s.n--;
    return s;
}

static void put_str(FILE *f, Str s) { fwrite(s.p, 1, s.n, f); }

/* ---------------------------------------------------------------- message validation */

typedef enum Role { ROLE_SYSTEM, ROLE_USER, ROLE_ASSISTANT, ROLE_TOOL } Role;

static const char *const ROLE_NAMES[] = {"system", "user", "assistant", "tool"};

typedef struct Msg {
    Role role;
    char *content;             /* owned: the content flattened to one string */
    const char *reasoning;     /* borrowed; NULL when absent or null */
    const json_t *tool_calls;  /* borrowed; NULL or a non-empty, validated array */
} Msg;

/* A jansson string as a C string, refusing embedded NULs (they would silently cut the text). */
static const char *json_cstr(const json_t *v, size_t msg_i, const char *field, QErr *err) {
    const char *s = json_string_value(v);
    if (strlen(s) != json_string_length(v)) {
        qerr_set(err, "messages[%zu].%s: strings containing NUL (\\u0000) are not supported", msg_i, field);
        return NULL;
    }
    return s;
}

static char *dup_or_err(const char *s, QErr *err) {
    char *d = strdup(s);
    if (!d) qerr_set(err, "out of memory");
    return d;
}

/* Content as one malloc'd string: a string as is, null as "", text parts joined by "\n".
 * NULL with err set on failure. */
static char *flatten_content(const json_t *c, size_t i, QErr *err) {
    if (json_is_null(c)) return dup_or_err("", err);
    if (json_is_string(c)) {
        const char *s = json_cstr(c, i, "content", err);
        return s ? dup_or_err(s, err) : NULL;
    }
    if (!json_is_array(c)) {
        qerr_set(err, "messages[%zu].content: expected a string, null or a list of text parts", i);
        return NULL;
    }
    size_t total = 1;
    for (size_t j = 0; j < json_array_size(c); j++) {
        const json_t *part = json_array_get(c, j);
        const json_t *type = json_object_get(part, "type");
        const json_t *text = json_object_get(part, "text");
        if (!json_is_object(part) || !json_is_string(type)) {
            qerr_set(err, "messages[%zu].content[%zu]: expected an object with a string 'type'", i, j);
            return NULL;
        }
        if (strcmp(json_string_value(type), "text")) {
            qerr_set(err, "messages[%zu].content[%zu].type: unsupported part type '%s' (only text parts are supported)",
                     i, j, json_string_value(type));
            return NULL;
        }
        if (!json_is_string(text)) {
            qerr_set(err, "messages[%zu].content[%zu].text: expected a string", i, j);
            return NULL;
        }
        char field[64];
        snprintf(field, sizeof field, "content[%zu].text", j);
        if (!json_cstr(text, i, field, err)) return NULL;
        total += json_string_length(text) + 1;
    }
    char *out = malloc(total);
    if (!out) {
        qerr_set(err, "out of memory");
        return NULL;
    }
    size_t n = 0;
    for (size_t j = 0; j < json_array_size(c); j++) {
        const json_t *text = json_object_get(json_array_get(c, j), "text");
        if (j) out[n++] = '\n';
        memcpy(out + n, json_string_value(text), json_string_length(text));
        n += json_string_length(text);
    }
    out[n] = '\0';
    return out;
}

/* The object holding name/arguments: tool_call.function when present, else the call itself
 * (the template accepts both). */
static const json_t *tool_call_fn(const json_t *tc) {
    const json_t *fn = json_object_get(tc, "function");
    return json_is_object(fn) ? fn : tc;
}

static int check_tool_calls(const json_t *tcs, size_t i, QErr *err) {
    for (size_t j = 0; j < json_array_size(tcs); j++) {
        const json_t *tc = json_array_get(tcs, j);
        if (!json_is_object(tc))
            return qerr_set(err, "messages[%zu].tool_calls[%zu]: expected an object", i, j);
        const json_t *fn_field = json_object_get(tc, "function");
        if (fn_field && !json_is_null(fn_field) && !json_is_object(fn_field))
            return qerr_set(err, "messages[%zu].tool_calls[%zu].function: expected an object", i, j);
        const char *where = json_is_object(fn_field) ? ".function" : "";
        const json_t *fn = tool_call_fn(tc);
        const json_t *name = json_object_get(fn, "name");
        if (!json_is_string(name))
            return qerr_set(err, "messages[%zu].tool_calls[%zu]%s.name: expected a string", i, j, where);
        char field[96];
        snprintf(field, sizeof field, "tool_calls[%zu]%s.name", j, where);
        if (!json_cstr(name, i, field, err)) return -1;
        const json_t *args = json_object_get(fn, "arguments");
        if (!args) return qerr_set(err, "messages[%zu].tool_calls[%zu]%s: missing 'arguments'", i, j, where);
        if (json_is_string(args)) {
            snprintf(field, sizeof field, "tool_calls[%zu]%s.arguments", j, where);
            if (!json_cstr(args, i, field, err)) return -1;
        }
    }
    return 0;
}

static int parse_message(const json_t *m, size_t i, Msg *out, QErr *err) {
    if (!json_is_object(m)) return qerr_set(err, "messages[%zu]: expected an object", i);
    const json_t *role = json_object_get(m, "role");
    if (!role) return qerr_set(err, "messages[%zu]: missing 'role'", i);
    if (!json_is_string(role)) return qerr_set(err, "messages[%zu].role: expected a string", i);
    int r = -1;
    for (int k = 0; k < 4; k++)
        if (!strcmp(json_string_value(role), ROLE_NAMES[k])) r = k;
    if (r < 0)
        return qerr_set(err, "messages[%zu].role: unknown role '%s' (expected system, user, assistant or tool)", i,
                        json_string_value(role));
    out->role = (Role)r;

    const json_t *tcs = json_object_get(m, "tool_calls");
    if (tcs && !json_is_null(tcs)) {
        if (out->role != ROLE_ASSISTANT)
            return qerr_set(err, "messages[%zu].tool_calls: only assistant messages may have tool calls", i);
        if (!json_is_array(tcs)) return qerr_set(err, "messages[%zu].tool_calls: expected an array", i);
        if (check_tool_calls(tcs, i, err)) return -1;
        if (json_array_size(tcs)) out->tool_calls = tcs;
    }

    const json_t *rc = json_object_get(m, "reasoning_content");
    if (rc && !json_is_null(rc)) {
        if (out->role != ROLE_ASSISTANT)
            return qerr_set(err, "messages[%zu].reasoning_content: only assistant messages may have reasoning", i);
        if (!json_is_string(rc)) return qerr_set(err, "messages[%zu].reasoning_content: expected a string", i);
        if (!(out->reasoning = json_cstr(rc, i, "reasoning_content", err))) return -1;
    }

    const json_t *content = json_object_get(m, "content");
    if (!content) {
        if (!out->tool_calls) return qerr_set(err, "messages[%zu]: missing 'content'", i);
        out->content = dup_or_err("", err);
    } else {
        out->content = flatten_content(content, i, err);
    }
    return out->content ? 0 : -1;
}

/* ---------------------------------------------------------------- rendering */

static const char TOOLS_HEAD[] =
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>";
static const char TOOLS_TAIL[] =
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n";

static int render_assistant(FILE *f, const Msg *m, int keep_reasoning, QErr *err) {
    Str content = str_of(m->content);
    Str reasoning = {"", 0};
    if (m->reasoning) {
        reasoning = str_of(m->reasoning);
    } else if (str_find(content, "</think>") >= 0) {
        Str full = content;
        content = str_lstrip_nl(str_after_last(full, "</think>"));
        reasoning = str_lstrip_nl(str_after_last(str_rstrip_nl(str_before_first(full, "</think>")), "<think>"));
    }
    fputs("<|im_start|>assistant\n", f);
    if (keep_reasoning == 2 || (keep_reasoning == 1 && reasoning.n)) {
        fputs("<think>\n", f);
        put_str(f, str_rstrip_nl(str_lstrip_nl(reasoning)));
        fputs("\n</think>\n\n", f);
        put_str(f, str_lstrip_nl(content));
    } else {
        put_str(f, content);
    }
    for (size_t j = 0; m->tool_calls && j < json_array_size(m->tool_calls); j++) {
        /* The template tests the (unstripped) content variable here, not what it printed. */
        if (j || content.n) fputc('\n', f);
        const json_t *fn = tool_call_fn(json_array_get(m->tool_calls, j));
        const json_t *args = json_object_get(fn, "arguments");
        fputs("<tool_call>\n{\"name\": \"", f);
        fputs(json_string_value(json_object_get(fn, "name")), f);
        fputs("\", \"arguments\": ", f);
        if (json_is_string(args)) {
            fputs(json_string_value(args), f);
        } else if (put_tojson(f, args, 0, err)) {
            return -1;
        }
        fputs("}\n</tool_call>", f);
    }
    fputs("<|im_end|>\n", f);
    return 0;
}

static int render(FILE *f, const Msg *msgs, size_t n, const json_t *tools, bool add_generation_prompt,
                  bool enable_thinking, QErr *err) {
    int first_is_system = msgs[0].role == ROLE_SYSTEM;
    if (tools && json_array_size(tools)) {
        fputs("<|im_start|>system\n", f);
        if (first_is_system) {
            fputs(msgs[0].content, f);
            fputs("\n\n", f);
        }
        fputs(TOOLS_HEAD, f);
        for (size_t t = 0; t < json_array_size(tools); t++) {
            fputc('\n', f);
            if (put_tojson(f, json_array_get(tools, t), 0, err)) return qerr_prefix(err, "tools[%zu]", t);
        }
        fputs(TOOLS_TAIL, f);
    } else if (first_is_system) {
        fputs("<|im_start|>system\n", f);
        fputs(msgs[0].content, f);
        fputs("<|im_end|>\n", f);
    }

    /* The last user turn that is a real query (not a wrapped tool response): assistant turns
     * after it keep their reasoning, earlier ones lose it. */
    size_t last_query = n - 1;
    for (size_t k = n; k-- > 0;) {
        Str c = str_of(msgs[k].content);
        if (msgs[k].role == ROLE_USER &&
            !(str_has_prefix(c, "<tool_response>") && str_has_suffix(c, "</tool_response>"))) {
            last_query = k;
            break;
        }
    }

    for (size_t i = 0; i < n; i++) {
        const Msg *m = &msgs[i];
        switch (m->role) {
        case ROLE_SYSTEM:
            if (i == 0) break; /* already rendered above */
            /* fall through */
        case ROLE_USER:
            fprintf(f, "<|im_start|>%s\n", ROLE_NAMES[m->role]);
            fputs(m->content, f);
            fputs("<|im_end|>\n", f);
            break;
        case ROLE_ASSISTANT: {
            /* 2: always show a think block (last message), 1: only if it has reasoning, 0: never */
            int keep = i > last_query ? (i == n - 1 ? 2 : 1) : 0;
            if (render_assistant(f, m, keep, err)) return qerr_prefix(err, "messages[%zu]", i);
            break;
        }
        case ROLE_TOOL:
            if (i == 0 || msgs[i - 1].role != ROLE_TOOL) fputs("<|im_start|>user", f);
            fputs("\n<tool_response>\n", f);
            fputs(m->content, f);
            fputs("\n</tool_response>", f);
            if (i == n - 1 || msgs[i + 1].role != ROLE_TOOL) fputs("<|im_end|>\n", f);
            break;
        }
    }
    if (add_generation_prompt) {
        fputs("<|im_start|>assistant\n", f);
        if (!enable_thinking) fputs("<think>\n\n</think>\n\n", f);
    }
    return 0;
}

char *chat_template_render(const json_t *messages, const json_t *tools, bool add_generation_prompt,
                           bool enable_thinking, QErr *err) {
    if (!json_is_array(messages)) {
        qerr_set(err, "messages: expected an array");
        return NULL;
    }
    if (tools && !json_is_null(tools) && !json_is_array(tools)) {
        qerr_set(err, "tools: expected an array or null");
        return NULL;
    }
    size_t n = json_array_size(messages);
    if (n == 0) { /* transformers fails on messages[0] too */
        qerr_set(err, "messages: expected at least one message");
        return NULL;
    }
    Msg *msgs = calloc(n, sizeof *msgs);
    if (!msgs) {
        qerr_set(err, "out of memory");
        return NULL;
    }
    char *out = NULL, *buf = NULL;
    size_t len = 0;
    FILE *f = NULL;
    for (size_t i = 0; i < n; i++)
        if (parse_message(json_array_get(messages, i), i, &msgs[i], err)) goto done;

    if (!(f = open_memstream(&buf, &len))) {
        qerr_set(err, "out of memory");
        goto done;
    }
    if (render(f, msgs, n, json_is_array(tools) ? tools : NULL, add_generation_prompt, enable_thinking, err)) {
        fclose(f);
        free(buf);
        goto done;
    }
    out = memstream_finish(f, &buf, err);
done:
    for (size_t k = 0; k < n; k++) free(msgs[k].content);
    free(msgs);
    return out;
}
