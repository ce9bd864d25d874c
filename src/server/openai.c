/* openai.c — the OpenAI schema, as vLLM's server speaks it, in both directions.
 *
 * Parsing is strict about types and ranges (each error names the field, so a client sees what
 * to fix) and lenient about everything it does not know (ignored, as vLLM ignores extra fields).
 * Responses are built as jansson trees and dumped compactly: simpler to keep correct than
 * hand-written JSON, at the cost of a few allocations per streamed token, which is small next to
 * a decode step. Logprob tokens are decoded one id at a time, as vLLM does, so a character split
 * across tokens shows as U+FFFD in `tokens` while the text itself is whole. */
#include "server/openai.h"

#include <jansson.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "text/chat_template.h"

int oai_error(OaiError *e, int status, const char *param, const char *fmt, ...) {
    if (!e) return -1;
    e->status = status;
    snprintf(e->param, sizeof e->param, "%s", param ? param : "");
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->message, sizeof e->message, fmt, ap);
    va_end(ap);
    return -1;
}

static const char *error_type(int status) {
    switch (status) {
    case 400: return "BadRequestError";
    case 401: return "AuthenticationError";
    case 404: return "NotFoundError";
    case 405: return "MethodNotAllowedError";
    case 413: return "RequestTooLargeError";
    case 503: return "ServiceUnavailableError";
    default: return status >= 500 ? "InternalServerError" : "BadRequestError";
    }
}

/* A JSON string of n bytes; bytes that are not valid UTF-8 become '?' rather than failing. */
static json_t *jstrn(const char *s, size_t n) {
    json_t *v = json_stringn(s, n);
    if (v) return v;
    char *copy = malloc(n + 1);
    if (!copy) return json_string("");
    for (size_t i = 0; i < n; i++) copy[i] = (unsigned char)s[i] < 0x80 && s[i] ? s[i] : '?';
    copy[n] = '\0';
    v = json_stringn(copy, n);
    free(copy);
    return v ? v : json_string("");
}

static json_t *jstr(const char *s) { return jstrn(s, strlen(s)); }

static char *dump(json_t *v) {
    char *s = json_dumps(v, JSON_COMPACT);
    json_decref(v);
    if (!s) {
        fputs("quill: out of memory\n", stderr);
        abort();
    }
    return s;
}

char *oai_error_json(const OaiError *e) {
    json_t *err = json_object();
    json_object_set_new(err, "message", jstr(e->message));
    json_object_set_new(err, "type", json_string(error_type(e->status)));
    json_object_set_new(err, "param", e->param[0] ? jstr(e->param) : json_null());
    json_object_set_new(err, "code", json_integer(e->status));
    json_t *root = json_object();
    json_object_set_new(root, "error", err);
    return dump(root);
}

/* ------------------------------------------------------------------ request fields */

/* A member, with JSON null treated as absent. */
static json_t *field(const json_t *o, const char *k) {
    json_t *v = json_object_get(o, k);
    return json_is_null(v) ? NULL : v;
}

static int get_bool(const json_t *o, const char *k, bool *out, OaiError *err) {
    json_t *v = field(o, k);
    if (!v) return 0;
    if (!json_is_boolean(v)) return oai_error(err, 400, k, "%s must be a boolean", k);
    *out = json_is_true(v);
    return 0;
}

/* An integer in [lo, hi]; an integral real (5.0) counts. *given is set when present. */
static int get_int(const json_t *o, const char *k, long long lo, long long hi, long long *out, bool *given,
                   OaiError *err) {
    json_t *v = field(o, k);
    if (!v) return 0;
    long long x;
    if (json_is_integer(v)) {
        x = json_integer_value(v);
    } else if (json_is_real(v) && floor(json_real_value(v)) == json_real_value(v) && fabs(json_real_value(v)) < 9e18) {
        x = (long long)json_real_value(v);
    } else {
        return oai_error(err, 400, k, "%s must be an integer", k);
    }
    if (x < lo || x > hi) return oai_error(err, 400, k, "%s must be between %lld and %lld (got %lld)", k, lo, hi, x);
    *out = x;
    if (given) *given = true;
    return 0;
}

/* A finite number in [lo, hi] (lo excluded when lo_open); `range` describes it for the message. */
static int get_num(const json_t *o, const char *k, double lo, double hi, bool lo_open, const char *range, float *out,
                   OaiError *err) {
    json_t *v = field(o, k);
    if (!v) return 0;
    if (!json_is_number(v)) return oai_error(err, 400, k, "%s must be a number", k);
    double x = json_number_value(v);
    if (!isfinite(x) || x < lo || x > hi || (lo_open && x == lo))
        return oai_error(err, 400, k, "%s must be %s (got %g)", k, range, x);
    *out = (float)x;
    return 0;
}

static int parse_stop(const json_t *root, GenSpec *s, OaiError *err) {
    json_t *v = field(root, "stop");
    if (!v) return 0;
    size_t n = json_is_string(v) ? 1 : json_is_array(v) ? json_array_size(v) : 0;
    if (!json_is_string(v) && !json_is_array(v))
        return oai_error(err, 400, "stop", "stop must be a string or a list of strings");
    if (n > 64) return oai_error(err, 400, "stop", "stop may hold at most 64 strings (got %zu)", n);
    if (!n) return 0;
    s->stop = calloc(n, sizeof *s->stop);
    if (!s->stop) return oai_error(err, 500, NULL, "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_is_string(v) ? v : json_array_get(v, i);
        if (!json_is_string(e)) return oai_error(err, 400, "stop", "stop[%zu] must be a string", i);
        size_t len = json_string_length(e);
        if (len == 0) return oai_error(err, 400, "stop", "stop strings must not be empty");
        if (strlen(json_string_value(e)) != len)
            return oai_error(err, 400, "stop", "stop strings must not contain NUL characters");
        if (!(s->stop[i] = strdup(json_string_value(e)))) return oai_error(err, 500, NULL, "out of memory");
        s->n_stop++;
    }
    return 0;
}

static int parse_stop_ids(const json_t *root, EngineParams *p, const OaiContext *ctx, OaiError *err) {
    json_t *v = field(root, "stop_token_ids");
    if (!v) return 0;
    if (!json_is_array(v)) return oai_error(err, 400, "stop_token_ids", "stop_token_ids must be a list of token ids");
    if (json_array_size(v) > ENGINE_MAX_STOP_IDS)
        return oai_error(err, 400, "stop_token_ids", "stop_token_ids may hold at most %d ids", ENGINE_MAX_STOP_IDS);
    for (size_t i = 0; i < json_array_size(v); i++) {
        json_t *e = json_array_get(v, i);
        if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) >= ctx->vocab_size)
            return oai_error(err, 400, "stop_token_ids", "stop_token_ids[%zu] must be a token id in [0, %d)", i,
                             ctx->vocab_size);
        p->stop_ids[p->n_stop_ids++] = (int32_t)json_integer_value(e);
    }
    return 0;
}

/* logit_bias: {"token id": bias in [-100, 100], ...}, added to the logits before sampling. */
static int parse_logit_bias(const json_t *root, SamplingParams *sp, const OaiContext *ctx, OaiError *err) {
    json_t *lb = field(root, "logit_bias");
    if (!lb) return 0;
    if (!json_is_object(lb))
        return oai_error(err, 400, "logit_bias", "logit_bias must be an object mapping token ids to biases");
    if (json_object_size(lb) > SAMPLING_MAX_LOGIT_BIAS)
        return oai_error(err, 400, "logit_bias", "logit_bias has %zu entries (at most %d)", json_object_size(lb),
                         SAMPLING_MAX_LOGIT_BIAS);
    const char *key;
    json_t *v;
    json_object_foreach(lb, key, v) {
        char *end;
        errno = 0;
        const long id = strtol(key, &end, 10);
        if (!*key || *end || errno || id < 0 || id >= ctx->vocab_size)
            return oai_error(err, 400, "logit_bias", "logit_bias key '%s' is not a token id in [0, %d)", key,
                             ctx->vocab_size);
        const double b = json_is_number(v) ? json_number_value(v) : NAN;
        if (!(b >= -100 && b <= 100))
            return oai_error(err, 400, "logit_bias", "logit_bias['%s'] must be a number in [-100, 100]", key);
        sp->logit_bias[sp->n_logit_bias++] = (LogitBias){(int32_t)id, (float)b};
    }
    return 0;
}

/* choices: a non-empty list of non-empty strings, copied into f. */
static int parse_choices(const json_t *list, OutputFormat *f, const char *param, OaiError *err) {
    if (!json_is_array(list) || json_array_size(list) == 0 || json_array_size(list) > 1024)
        return oai_error(err, 400, param, "%s must be a list of 1 to 1024 strings", param);
    f->kind = OUTPUT_CHOICE;
    if (!(f->choices = calloc(json_array_size(list), sizeof *f->choices))) return oai_error(err, 500, NULL, "out of memory");
    for (size_t i = 0; i < json_array_size(list); i++) {
        json_t *c = json_array_get(list, i);
        if (!json_is_string(c) || json_string_length(c) == 0 || strlen(json_string_value(c)) != json_string_length(c))
            return oai_error(err, 400, param, "%s[%zu] must be a non-empty string", param, i);
        if (!(f->choices[f->n_choices++] = strdup(json_string_value(c)))) return oai_error(err, 500, NULL, "out of memory");
    }
    return 0;
}

/* A JSON schema given as an object (or boolean), or as a string holding one (vLLM allows both),
 * compiled into f. */
static int parse_schema(const json_t *schema, OutputFormat *f, const char *param, OaiError *err) {
    json_t *parsed = NULL;
    if (json_is_string(schema)) {
        json_error_t je;
        if (!(parsed = json_loads(json_string_value(schema), JSON_DECODE_ANY, &je)))
            return oai_error(err, 400, param, "%s: the schema is not valid JSON: %s", param, je.text);
        schema = parsed;
    }
    QErr q;
    if (!json_is_object(schema) && !json_is_boolean(schema)) {
        json_decref(parsed);
        return oai_error(err, 400, param, "%s: the schema must be a JSON object", param);
    }
    f->schema = json_schema_compile(schema, &q);
    json_decref(parsed);
    if (!f->schema) return oai_error(err, 400, param, "%s: %s", param, q.msg);
    f->kind = OUTPUT_JSON_SCHEMA;
    return 0;
}

/* Refuses a second output form, given by field param, when f holds one already. */
static int one_form(const OutputFormat *f, const char *param, OaiError *err) {
    if (f->kind == OUTPUT_TEXT) return 0;
    return oai_error(err, 400, param,
                     "give one output form: response_format json_object or json_schema, guided_json, guided_choice, "
                     "one structured_outputs key, or a tool_choice that forces a call (\"required\" or a function)");
}

/* The output's form from one more field (param): refused when another field gave one already.
 * arg: the choices, or the schema. */
static int set_form(OutputFormat *f, OutputKind kind, const json_t *arg, const char *param, OaiError *err) {
    if (one_form(f, param, err)) return -1;
    if (kind == OUTPUT_CHOICE) return parse_choices(arg, f, param, err);
    if (kind == OUTPUT_JSON_SCHEMA) return parse_schema(arg, f, param, err);
    f->kind = kind;
    return 0;
}

/* response_format: text, json_object, or json_schema {"json_schema": {"name", "schema", "strict"}}
 * (strict is accepted either way: the schema is always enforced). */
static int parse_response_format(const json_t *rf, OutputFormat *f, OaiError *err) {
    json_t *t = json_is_object(rf) ? json_object_get(rf, "type") : NULL;
    const char *type = json_is_string(t) ? json_string_value(t) : "";
    if (!strcmp(type, "json_object")) return set_form(f, OUTPUT_JSON_OBJECT, NULL, "response_format", err);
    if (!strcmp(type, "json_schema")) {
        json_t *js = json_object_get(rf, "json_schema"), *schema = json_object_get(js, "schema");
        json_t *name = json_object_get(js, "name"), *strict = json_object_get(js, "strict");
        if (!json_is_object(js) || !schema || (name && !json_is_string(name)) ||
            (strict && !json_is_boolean(strict) && !json_is_null(strict)))
            return oai_error(err, 400, "response_format",
                             "response_format json_schema needs \"json_schema\": {\"name\": ..., \"schema\": {...}}");
        return set_form(f, OUTPUT_JSON_SCHEMA, schema, "response_format", err);
    }
    if (strcmp(type, "text"))
        return oai_error(err, 400, "response_format",
                         "response_format must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                         "{\"type\": \"json_schema\", \"json_schema\": {...}}");
    return 0;
}

/* The output's form: response_format (text, json_object or json_schema), vLLM's
 * structured_outputs ({"choice": [...]}, {"json": schema} or {"json_object": true}) or its older
 * guided_choice / guided_json. Forms vLLM also knows but quill cannot honour (a regex, a grammar)
 * are refused, never ignored. */
static int parse_output_format(const json_t *root, GenSpec *s, const OaiContext *ctx, OaiError *err) {
    OutputFormat *f = &s->format;
    json_t *rf = field(root, "response_format");
    if (rf && parse_response_format(rf, f, err)) return -1;
    static const char *const unsupported[] = {"guided_regex", "guided_grammar", "guided_whitespace_pattern"};
    for (size_t i = 0; i < sizeof unsupported / sizeof *unsupported; i++)
        if (field(root, unsupported[i]))
            return oai_error(err, 400, unsupported[i], "%s is not supported (guided_json, guided_choice and JSON mode are)",
                             unsupported[i]);
    json_t *gj = field(root, "guided_json"), *gc = field(root, "guided_choice"), *so = field(root, "structured_outputs");
    if (gj && set_form(f, OUTPUT_JSON_SCHEMA, gj, "guided_json", err)) return -1;
    if (gc && set_form(f, OUTPUT_CHOICE, gc, "guided_choice", err)) return -1;
    if (so && !json_is_object(so))
        return oai_error(err, 400, "structured_outputs", "structured_outputs must be an object");
    const char *key;
    json_t *v;
    json_object_foreach(so, key, v) {
        int rc = 0;
        if (json_is_null(v))
            continue;
        else if (!strcmp(key, "choice"))
            rc = set_form(f, OUTPUT_CHOICE, v, "structured_outputs", err);
        else if (!strcmp(key, "json"))
            rc = set_form(f, OUTPUT_JSON_SCHEMA, v, "structured_outputs", err);
        else if (!strcmp(key, "json_object") && json_is_true(v))
            rc = set_form(f, OUTPUT_JSON_OBJECT, NULL, "structured_outputs", err);
        else
            rc = oai_error(err, 400, "structured_outputs",
                           "structured_outputs.%s is not supported (choice, json and json_object are)", key);
        if (rc) return -1;
    }
    if (f->kind == OUTPUT_TEXT) return 0;
    if (!ctx->vocab) return oai_error(err, 400, "response_format", "structured outputs are not available on this server");
    s->vocab = ctx->vocab;
    return 0;
}

/* The sampling and stopping fields both endpoints share. */
static int parse_sampling(const json_t *root, GenSpec *s, const OaiContext *ctx, OaiError *err) {
    EngineParams *p = &s->params;
    SamplingParams *sp = &p->sampling;
    long long v = 0;
    bool given = false;
    if (get_num(root, "temperature", 0, 1e4, false, "a number >= 0", &sp->temperature, err) ||
        get_num(root, "top_p", 0, 1, true, "in (0, 1]", &sp->top_p, err) ||
        get_num(root, "min_p", 0, 1, false, "in [0, 1]", &sp->min_p, err) ||
        get_num(root, "presence_penalty", -2, 2, false, "in [-2, 2]", &sp->presence_penalty, err) ||
        get_num(root, "frequency_penalty", -2, 2, false, "in [-2, 2]", &sp->frequency_penalty, err) ||
        get_num(root, "repetition_penalty", 0, 1e4, true, "a number > 0", &sp->repetition_penalty, err))
        return -1;
    if (get_int(root, "top_k", -1, INT_MAX, &v, &given, err)) return -1;
    if (given) sp->top_k = v <= 0 ? -1 : (int)v; /* 0 and -1 both turn top-k off, as in vLLM */
    given = false;
    if (get_int(root, "seed", LLONG_MIN, LLONG_MAX, &v, &given, err)) return -1;
    if (given) {
        sp->has_seed = true;
        sp->seed = (uint64_t)v;
    }
    v = 1;
    if (get_int(root, "n", 1, 128, &v, NULL, err)) return -1;
    s->n = (int)v;
    v = 0;
    if (get_int(root, "min_tokens", 0, INT_MAX, &v, NULL, err)) return -1;
    p->min_tokens = (int)v;
    if (get_bool(root, "ignore_eos", &p->ignore_eos, err) || get_bool(root, "skip_special_tokens", &s->skip_special, err))
        return -1;
    if (parse_stop(root, s, err) || parse_stop_ids(root, p, ctx, err)) return -1;
    if (parse_logit_bias(root, sp, ctx, err)) return -1;
    if (parse_output_format(root, s, ctx, err)) return -1;
    return 0;
}

static int tokenize(const OaiContext *ctx, const char *text, size_t len, GenPrompt *pr, const char *param, OaiError *err) {
    QErr q;
    size_t n = 0;
    if (tok_encode(ctx->tok, text, len, &pr->ids, &n, &q)) return oai_error(err, 400, param, "%s: %s", param, q.msg);
    if (n == 0) return oai_error(err, 400, param, "%s is empty: at least one token is needed", param);
    if (n > INT_MAX / 2) return oai_error(err, 400, param, "%s is too long", param);
    pr->n = (int)n;
    return 0;
}

/* A forced call to tools[i] (FORCED_NAMED): the output is a value of its parameters schema, any
 * object when it has none. */
static int force_named(const json_t *tools, size_t i, GenSpec *s, OaiError *err) {
    const json_t *fn = json_object_get(json_array_get(tools, i), "function"), *params = field(fn, "parameters");
    if (!(s->forced_name = strdup(json_string_value(json_object_get(fn, "name")))))
        return oai_error(err, 500, NULL, "out of memory");
    s->forced = FORCED_NAMED;
    if (!params) return set_form(&s->format, OUTPUT_JSON_OBJECT, NULL, "tool_choice", err);
    QErr q;
    if (!json_is_object(params) && !json_is_boolean(params))
        return oai_error(err, 400, "tools", "tools[%zu].function.parameters must be a JSON schema object", i);
    if (!(s->format.schema = json_schema_compile(params, &q)))
        return oai_error(err, 400, "tools", "tools[%zu].function.parameters: %s", i, q.msg);
    s->format.kind = OUTPUT_JSON_SCHEMA;
    return 0;
}

/* tool_choice "required" (FORCED_REQUIRED): the output is an array of calls to the tools, each
 * its name and arguments valid for it (text/json_schema.h's json_schema_tool_calls). */
static int force_required(const json_t *tools, GenSpec *s, OaiError *err) {
    const size_t n = json_array_size(tools);
    const char **names = calloc(n, sizeof *names);
    const json_t **params = calloc(n, sizeof *params);
    int rc = names && params ? 0 : oai_error(err, 500, NULL, "out of memory");
    for (size_t i = 0; i < n && !rc; i++) {
        const json_t *fn = json_object_get(json_array_get(tools, i), "function");
        names[i] = json_string_value(json_object_get(fn, "name"));
        params[i] = field(fn, "parameters");
        if (params[i] && !json_is_object(params[i]) && !json_is_boolean(params[i]))
            rc = oai_error(err, 400, "tools", "tools[%zu].function.parameters must be a JSON schema object", i);
        for (size_t k = 0; k < i && !rc; k++)
            if (!strcmp(names[k], names[i]))
                rc = oai_error(err, 400, "tools", "tools[%zu] and tools[%zu] are both named '%s' (tool_choice "
                               "\"required\" tells the tools apart by name)", k, i, names[i]);
    }
    QErr q;
    if (!rc && !(s->format.schema = json_schema_tool_calls(names, params, (int)n, &q)))
        rc = oai_error(err, 400, "tools", "tools: %s", q.msg);
    free(names);
    free(params);
    if (rc) return -1;
    s->format.kind = OUTPUT_JSON_SCHEMA;
    s->forced = FORCED_REQUIRED;
    return 0;
}

/* tool_choice (tools already checked): "auto" (the default), "none" (tool calls stay text), or a
 * call forced through structured outputs, as vLLM does it: "required" or {"type": "function",
 * "function": {"name": NAME}}. Anything but "none" needs tools. *parse: whether the output's
 * hermes tool calls are to be parsed (auto with tools). */
static int parse_tool_choice(const json_t *root, const json_t *tools, GenSpec *s, const OaiContext *ctx, bool *parse,
                             OaiError *err) {
    const json_t *tc = field(root, "tool_choice");
    const char *mode = json_is_string(tc) ? json_string_value(tc) : NULL, *name = NULL;
    *parse = json_array_size(tools) > 0 && !(mode && !strcmp(mode, "none"));
    if (!tc || (mode && !strcmp(mode, "none"))) return 0;
    if (json_is_object(tc)) {
        const json_t *type = json_object_get(tc, "type"), *fn = json_object_get(tc, "function");
        name = json_string_value(json_object_get(fn, "name"));
        if (!json_is_string(type) || strcmp(json_string_value(type), "function") || !name || !*name)
            return oai_error(err, 400, "tool_choice",
                             "tool_choice as an object must be {\"type\": \"function\", \"function\": {\"name\": "
                             "\"NAME\"}}");
    } else if (!mode || (strcmp(mode, "auto") && strcmp(mode, "required"))) {
        return oai_error(err, 400, "tool_choice",
                         "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                         "\"function\": {\"name\": \"NAME\"}}");
    }
    if (!tools) return oai_error(err, 400, "tool_choice", "tool_choice is only allowed when tools are given");
    if (mode && !strcmp(mode, "auto")) return 0;
    if (!json_array_size(tools)) return oai_error(err, 400, "tool_choice", "tool_choice forces a call, but tools is empty");
    if (one_form(&s->format, "tool_choice", err)) return -1;
    if (!ctx->vocab) return oai_error(err, 400, "tool_choice", "structured outputs are not available on this server");
    *parse = false;
    s->vocab = ctx->vocab;
    if (!name) return force_required(tools, s, err);
    for (size_t i = 0; i < json_array_size(tools); i++)
        if (!strcmp(json_string_value(json_object_get(json_object_get(json_array_get(tools, i), "function"), "name")),
                    name))
            return force_named(tools, i, s, err);
    return oai_error(err, 400, "tool_choice", "tool_choice names the function '%s', which tools does not list", name);
}

static int parse_chat(OaiRequest *r, const json_t *root, const OaiContext *ctx, OaiError *err) {
    GenSpec *s = &r->spec;
    json_t *msgs = field(root, "messages");
    if (!msgs) return oai_error(err, 400, "messages", "messages is required");
    if (!json_is_array(msgs) || json_array_size(msgs) == 0)
        return oai_error(err, 400, "messages", "messages must be a non-empty list of messages");
    json_t *tools = field(root, "tools");
    if (tools) {
        if (!json_is_array(tools)) return oai_error(err, 400, "tools", "tools must be a list");
        for (size_t i = 0; i < json_array_size(tools); i++) {
            json_t *t = json_array_get(tools, i), *type = json_object_get(t, "type"), *fn = json_object_get(t, "function");
            if (!json_is_object(t) || (type && (!json_is_string(type) || strcmp(json_string_value(type), "function"))) ||
                !json_is_object(fn) || !json_is_string(json_object_get(fn, "name")))
                return oai_error(err, 400, "tools",
                                 "tools[%zu] must be {\"type\": \"function\", \"function\": {\"name\": ...}}", i);
        }
    }
    bool parse_tools;
    if (parse_tool_choice(root, tools, s, ctx, &parse_tools, err)) return -1;
    bool thinking = true;
    json_t *kw = field(root, "chat_template_kwargs");
    if (kw) {
        if (!json_is_object(kw)) return oai_error(err, 400, "chat_template_kwargs", "chat_template_kwargs must be an object");
        json_t *et = field(kw, "enable_thinking");
        if (et && !json_is_boolean(et))
            return oai_error(err, 400, "chat_template_kwargs", "chat_template_kwargs.enable_thinking must be a boolean");
        if (et) thinking = json_is_true(et);
    }
    bool lp = false;
    long long k = 0;
    bool k_given = false;
    if (get_bool(root, "logprobs", &lp, err) || get_int(root, "top_logprobs", 0, ENGINE_MAX_LOGPROBS, &k, &k_given, err))
        return -1;
    if (k_given && !lp) return oai_error(err, 400, "top_logprobs", "top_logprobs needs logprobs set to true");
    if (lp) s->params.logprobs = r->top_logprobs = (int)k;

    bool add_generation_prompt = true; /* vLLM's extra field; false: the messages as they are */
    if (get_bool(root, "add_generation_prompt", &add_generation_prompt, err)) return -1;
    QErr q;
    char *prompt = chat_template_render(msgs, tools, add_generation_prompt, thinking, &q);
    if (!prompt) return oai_error(err, 400, "messages", "%s", q.msg);
    if (!(s->prompts = calloc(1, sizeof *s->prompts))) {
        free(prompt);
        return oai_error(err, 500, NULL, "out of memory");
    }
    s->n_prompts = 1;
    int rc = tokenize(ctx, prompt, strlen(prompt), &s->prompts[0], "messages", err);
    free(prompt);
    s->chat = true;
    s->thinking = thinking;
    s->tools = parse_tools;
    return rc;
}

/* One prompt given as token ids. */
static int prompt_from_ids(const json_t *arr, const OaiContext *ctx, GenPrompt *pr, OaiError *err) {
    size_t n = json_array_size(arr);
    if (n == 0) return oai_error(err, 400, "prompt", "prompt is empty: at least one token is needed");
    if (n > INT_MAX / 2) return oai_error(err, 400, "prompt", "prompt is too long");
    if (!(pr->ids = malloc(n * sizeof *pr->ids))) return oai_error(err, 500, NULL, "out of memory");
    pr->n = (int)n;
    for (size_t i = 0; i < n; i++) {
        json_t *e = json_array_get(arr, i);
        size_t len;
        if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) >= ctx->vocab_size ||
            !tok_token_bytes(ctx->tok, (int32_t)json_integer_value(e), &len))
            return oai_error(err, 400, "prompt", "prompt token %zu is not a token id of this model's vocabulary", i);
        pr->ids[i] = (int32_t)json_integer_value(e);
    }
    return 0;
}

static int parse_completion(OaiRequest *r, const json_t *root, const OaiContext *ctx, OaiError *err) {
    GenSpec *s = &r->spec;
    json_t *pv = field(root, "prompt");
    if (!pv) return oai_error(err, 400, "prompt", "prompt is required");
    if (field(root, "suffix")) return oai_error(err, 400, "suffix", "suffix is not supported");
    const char *shape = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids";
    /* Which of the four shapes: one string, strings, one id list, id lists. */
    bool one = json_is_string(pv) || (json_is_array(pv) && json_array_size(pv) > 0 && json_is_integer(json_array_get(pv, 0)));
    if (!json_is_string(pv) && !(json_is_array(pv) && json_array_size(pv) > 0)) return oai_error(err, 400, "prompt", "%s", shape);
    size_t n = one ? 1 : json_array_size(pv);
    if (n > 1024) return oai_error(err, 400, "prompt", "at most 1024 prompts per request (got %zu)", n);
    if (!(s->prompts = calloc(n, sizeof *s->prompts))) return oai_error(err, 500, NULL, "out of memory");
    s->n_prompts = (int)n;
    bool echo = false;
    long long k = -1;
    if (get_bool(root, "echo", &echo, err) || get_int(root, "logprobs", 0, ENGINE_MAX_LOGPROBS, &k, NULL, err)) return -1;
    r->echo = echo;
    s->params.logprobs = (int)k;
    if (echo) s->params.prompt_logprobs = (int)k;
    bool strings = json_is_string(pv) || (!one && json_is_string(json_array_get(pv, 0)));
    for (size_t i = 0; i < n; i++) {
        json_t *e = one ? pv : json_array_get(pv, i);
        GenPrompt *pr = &s->prompts[i];
        if (strings) {
            if (!json_is_string(e)) return oai_error(err, 400, "prompt", "%s", shape);
            if (tokenize(ctx, json_string_value(e), json_string_length(e), pr, "prompt", err)) return -1;
            if (echo && !(pr->text = strndup(json_string_value(e), json_string_length(e))))
                return oai_error(err, 500, NULL, "out of memory");
        } else {
            if (!json_is_array(e)) return oai_error(err, 400, "prompt", "%s", shape);
            if (prompt_from_ids(e, ctx, pr, err)) return -1;
            if (echo) {
                QErr q;
                if (!(pr->text = tok_decode(ctx->tok, pr->ids, (size_t)pr->n, 0, NULL, &q)))
                    return oai_error(err, 400, "prompt", "prompt: %s", q.msg);
            }
        }
    }
    return 0;
}

/* The optional "model" field: absent or the served name (404 otherwise, as vLLM answers). */
static int check_model(const json_t *root, const OaiContext *ctx, OaiError *err) {
    json_t *m = field(root, "model");
    if (m && !json_is_string(m)) return oai_error(err, 400, "model", "model must be a string");
    if (m && strcmp(json_string_value(m), ctx->model_name))
        return oai_error(err, 404, "model", "The model `%s` does not exist.", json_string_value(m));
    return 0;
}

static int parse_body(OaiRequest *r, const json_t *root, const OaiContext *ctx, OaiError *err) {
    if (check_model(root, ctx, err)) return -1;
    GenSpec *s = &r->spec;
    s->n = 1;
    s->skip_special = true;
    s->params = engine_params_default();
    s->params.sampling = ctx->defaults;
    s->params.logprobs = -1;
    s->params.prompt_logprobs = -1;
    if (parse_sampling(root, s, ctx, err)) return -1;

    long long mt = 0;
    bool mt_given = false;
    if (r->kind == OAI_CHAT && get_int(root, "max_completion_tokens", 1, INT_MAX, &mt, &mt_given, err)) return -1;
    if (!mt_given && get_int(root, "max_tokens", 1, INT_MAX, &mt, &mt_given, err)) return -1;

    if (get_bool(root, "stream", &r->stream, err)) return -1;
    json_t *so = field(root, "stream_options");
    if (so) {
        if (!json_is_object(so)) return oai_error(err, 400, "stream_options", "stream_options must be an object");
        if (!r->stream) return oai_error(err, 400, "stream_options", "stream_options is only allowed when stream is true");
        if (get_bool(so, "include_usage", &r->include_usage, err)) {
            snprintf(err->param, sizeof err->param, "stream_options");
            return -1;
        }
    }
    if (get_bool(root, "return_tokens_as_token_ids", &r->tokens_as_ids, err)) return -1;

    if (r->kind == OAI_CHAT ? parse_chat(r, root, ctx, err) : parse_completion(r, root, ctx, err)) return -1;

    const char *where = r->kind == OAI_CHAT ? "messages" : "prompt";
    for (int i = 0; i < s->n_prompts; i++) {
        GenPrompt *pr = &s->prompts[i];
        if (pr->n >= ctx->max_model_len)
            return oai_error(err, 400, where,
                             "This model's maximum context length is %d tokens. However, your request has %d input "
                             "tokens. Please reduce the length of the input.",
                             ctx->max_model_len, pr->n);
        if (mt_given && pr->n + mt > ctx->max_model_len)
            return oai_error(err, 400, "max_tokens",
                             "This model's maximum context length is %d tokens. However, you requested %lld tokens "
                             "(%d in the %s, %lld in the completion). Please reduce the length of the %s or "
                             "completion.",
                             ctx->max_model_len, pr->n + mt, pr->n, where, mt, where);
        pr->max_tokens = mt_given ? (int)mt : ctx->max_model_len - pr->n;
        if (s->params.min_tokens > pr->max_tokens)
            return oai_error(err, 400, "min_tokens", "min_tokens (%d) must not exceed max_tokens (%d)",
                             s->params.min_tokens, pr->max_tokens);
    }
    char hex[33];
    gen_random_hex(hex, 32);
    snprintf(r->id, sizeof r->id, "%s%s", r->kind == OAI_CHAT ? "chatcmpl-" : "cmpl-", hex);
    return 0;
}

/* The body as a JSON object, or NULL with err. */
static json_t *load_object(const char *body, size_t len, OaiError *err) {
    json_error_t je;
    json_t *root = json_loadb(body, len, 0, &je);
    if (!root) {
        oai_error(err, 400, NULL, "the request body is not valid JSON (line %d, column %d): %s", je.line, je.column,
                  je.text);
        return NULL;
    }
    if (!json_is_object(root)) {
        json_decref(root);
        oai_error(err, 400, NULL, "the request body must be a JSON object");
        return NULL;
    }
    return root;
}

int oai_parse(OaiRequest *r, OaiKind kind, const char *body, size_t len, const OaiContext *ctx, OaiError *err) {
    memset(r, 0, sizeof *r);
    r->kind = kind;
    r->top_logprobs = -1;
    r->created = (long long)time(NULL);
    r->model = ctx->model_name;
    json_t *root = load_object(body, len, err);
    if (!root) return -1;
    int rc = parse_body(r, root, ctx, err);
    json_decref(root);
    if (rc) oai_request_free(r);
    return rc;
}

void oai_request_free(OaiRequest *r) { gen_spec_free(&r->spec); }

/* ------------------------------------------------------------------ /tokenize, /detokenize */

char *oai_tokenize(const char *body, size_t len, const OaiContext *ctx, OaiError *err) {
    json_t *root = load_object(body, len, err);
    if (!root) return NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    OaiRequest r = {.kind = OAI_CHAT};
    int rc = check_model(root, ctx, err);
    json_t *prompt = field(root, "prompt");
    if (rc == 0 && field(root, "messages")) {
        if (prompt) {
            rc = oai_error(err, 400, "prompt", "give either prompt or messages, not both");
        } else if (!(rc = parse_chat(&r, root, ctx, err))) {
            ids = r.spec.prompts[0].ids, n = (size_t)r.spec.prompts[0].n;
        }
    } else if (rc == 0) {
        QErr q;
        if (!json_is_string(prompt))
            rc = oai_error(err, 400, "prompt", "prompt (a string) or messages (a chat) is required");
        else if (tok_encode(ctx->tok, json_string_value(prompt), json_string_length(prompt), &ids, &n, &q))
            rc = oai_error(err, 400, "prompt", "prompt: %s", q.msg);
    }
    json_t *tokens = rc ? NULL : json_array();
    for (size_t i = 0; tokens && i < n; i++) json_array_append_new(tokens, json_integer(ids[i]));
    if (!r.spec.prompts) free(ids);
    oai_request_free(&r);
    json_decref(root);
    if (rc) return NULL;
    return dump(json_pack("{s:I, s:i, s:o, s:n}", "count", (json_int_t)n, "max_model_len", ctx->max_model_len,
                          "tokens", tokens, "token_strs"));
}

char *oai_detokenize(const char *body, size_t len, const OaiContext *ctx, OaiError *err) {
    json_t *root = load_object(body, len, err);
    if (!root) return NULL;
    json_t *tokens = field(root, "tokens");
    int rc = check_model(root, ctx, err);
    if (rc == 0 && !json_is_array(tokens)) rc = oai_error(err, 400, "tokens", "tokens (a list of token ids) is required");
    size_t n = rc ? 0 : json_array_size(tokens);
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    if (!ids && rc == 0) rc = oai_error(err, 500, NULL, "out of memory");
    for (size_t i = 0; rc == 0 && i < n; i++) {
        json_t *e = json_array_get(tokens, i);
        size_t tl;
        if (!json_is_integer(e) || json_integer_value(e) < 0 || json_integer_value(e) >= ctx->vocab_size ||
            !tok_token_bytes(ctx->tok, (int32_t)json_integer_value(e), &tl))
            rc = oai_error(err, 400, "tokens", "tokens[%zu] is not a token id of this model's vocabulary", i);
        else
            ids[i] = (int32_t)json_integer_value(e);
    }
    char *text = NULL;
    QErr q;
    if (rc == 0 && !(text = tok_decode(ctx->tok, ids, n, 0, NULL, &q))) rc = oai_error(err, 400, "tokens", "%s", q.msg);
    free(ids);
    json_decref(root);
    if (rc) return NULL;
    json_t *o = json_pack("{s:s}", "prompt", text);
    free(text);
    return dump(o);
}

/* ------------------------------------------------------------------ responses */

static json_t *jlp(float lp) {
    double d = lp;
    if (!isfinite(d) || d < -9999.0) d = -9999.0; /* JSON has no -inf; vLLM clamps the same way */
    return json_real(d);
}

static json_t *token_json(const OaiRequest *r, const Gen *g, int32_t id) {
    if (r->tokens_as_ids) {
        char buf[32];
        snprintf(buf, sizeof buf, "token_id:%d", id);
        return json_string(buf);
    }
    char *s = gen_token_text(g, id);
    json_t *v = jstr(s);
    free(s);
    return v;
}

static json_t *bytes_json(const Gen *g, int32_t id) {
    size_t n;
    const char *b = gen_token_bytes(g, id, &n);
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(a, json_integer((unsigned char)b[i]));
    return a;
}

/* Chat logprobs entry: {"token", "logprob", "bytes", "top_logprobs": [...]} */
static json_t *chat_lp(const OaiRequest *r, const Gen *g, const GenLp *l) {
    json_t *o = json_object(), *top = json_array();
    json_object_set_new(o, "token", token_json(r, g, l->token));
    json_object_set_new(o, "logprob", jlp(l->logprob));
    json_object_set_new(o, "bytes", bytes_json(g, l->token));
    for (int k = 0; k < l->n_top && k < r->top_logprobs; k++) {
        json_t *t = json_object();
        json_object_set_new(t, "token", token_json(r, g, l->top_ids[k]));
        json_object_set_new(t, "logprob", jlp(l->top_lp[k]));
        json_object_set_new(t, "bytes", bytes_json(g, l->top_ids[k]));
        json_array_append_new(top, t);
    }
    json_object_set_new(o, "top_logprobs", top);
    return o;
}

static json_t *chat_lps(const OaiRequest *r, const Gen *g, const GenChoice *c, int from) {
    json_t *content = json_array();
    for (int i = from; i < c->n_lps; i++) json_array_append_new(content, chat_lp(r, g, &c->lps[i]));
    json_t *o = json_object();
    json_object_set_new(o, "content", content);
    return o;
}

/* Legacy completions logprobs: parallel lists tokens / token_logprobs / top_logprobs / text_offset. */
typedef struct CompLps {
    json_t *obj, *tokens, *lps, *tops, *offsets;
} CompLps;

static CompLps comp_lps_new(void) {
    CompLps c = {json_object(), json_array(), json_array(), json_array(), json_array()};
    json_object_set_new(c.obj, "text_offset", c.offsets);
    json_object_set_new(c.obj, "token_logprobs", c.lps);
    json_object_set_new(c.obj, "tokens", c.tokens);
    json_object_set_new(c.obj, "top_logprobs", c.tops);
    return c;
}

static long utf8_chars(const char *s) {
    long n = 0;
    for (; *s; s++) n += ((unsigned char)*s & 0xC0) != 0x80;
    return n;
}

/* Appends one token; l is NULL for the first prompt token (no logprob). *offset advances by the
 * token's length in characters. */
static void comp_lps_add(CompLps *c, const OaiRequest *r, const Gen *g, int32_t token, const GenLp *l, long *offset) {
    json_t *tok = token_json(r, g, token);
    json_array_append_new(c->offsets, json_integer(*offset));
    *offset += utf8_chars(json_string_value(tok));
    json_array_append_new(c->tokens, tok);
    if (!l) {
        json_array_append_new(c->lps, json_null());
        json_array_append_new(c->tops, json_null());
        return;
    }
    json_array_append_new(c->lps, jlp(l->logprob));
    json_t *top = json_object();
    json_t *self = token_json(r, g, token);
    json_object_set_new(top, json_string_value(self), jlp(l->logprob));
    json_decref(self);
    for (int k = 0; k < l->n_top; k++) {
        json_t *t = token_json(r, g, l->top_ids[k]);
        json_object_set_new(top, json_string_value(t), jlp(l->top_lp[k]));
        json_decref(t);
    }
    json_array_append_new(c->tops, top);
}

/* The prompt's tokens as echoed logprobs. */
static void comp_lps_prompt(CompLps *c, const OaiRequest *r, const Gen *g, const GenChoice *ch, long *offset) {
    const GenPrompt *pr = &gen_spec(g)->prompts[ch->prompt];
    for (int i = 0; i < pr->n; i++) comp_lps_add(c, r, g, pr->ids[i], i > 0 ? &ch->prompt_lps[i] : NULL, offset);
}

static json_t *stop_reason(const GenChoice *c) {
    if (c->stop_str) return jstr(c->stop_str);
    if (c->stop_token >= 0) return json_integer(c->stop_token);
    return json_null();
}

static json_t *usage(Gen *g) {
    int p = gen_prompt_tokens(g), c = gen_completion_tokens(g);
    json_t *u = json_object();
    json_object_set_new(u, "prompt_tokens", json_integer(p));
    json_object_set_new(u, "total_tokens", json_integer(p + c));
    json_object_set_new(u, "completion_tokens", json_integer(c));
    json_object_set_new(u, "prompt_tokens_details", json_null());
    return u;
}

static json_t *envelope(const OaiRequest *r, const char *object) {
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(r->id));
    json_object_set_new(o, "object", json_string(object));
    json_object_set_new(o, "created", json_integer(r->created));
    json_object_set_new(o, "model", jstr(r->model));
    return o;
}

static json_t *tool_call_json(const GenToolCall *t, int index, bool with_index) {
    json_t *o = json_object(), *fn = json_object();
    if (with_index) json_object_set_new(o, "index", json_integer(index));
    json_object_set_new(o, "id", jstr(t->id));
    json_object_set_new(o, "type", json_string("function"));
    json_object_set_new(fn, "name", jstr(t->name));
    json_object_set_new(fn, "arguments", jstrn(sb_str(&t->arguments), t->arguments.len));
    json_object_set_new(o, "function", fn);
    return o;
}

char *oai_response(const OaiRequest *r, Gen *g) {
    bool chat = r->kind == OAI_CHAT;
    json_t *root = envelope(r, chat ? "chat.completion" : "text_completion");
    json_t *choices = json_array();
    for (int i = 0; i < gen_n_choices(g); i++) {
        GenChoice *c = gen_choice(g, i);
        json_t *ch = json_object();
        json_object_set_new(ch, "index", json_integer(c->index));
        if (chat) {
            json_t *msg = json_object(), *tools = json_array();
            json_object_set_new(msg, "role", json_string("assistant"));
            bool any = c->reasoning.len || c->n_tools;
            json_object_set_new(msg, "content", c->text.len ? jstrn(c->text.s, c->text.len) : any ? json_null() : json_string(""));
            json_t *reasoning = c->reasoning.len ? jstrn(c->reasoning.s, c->reasoning.len) : json_null();
            json_object_set(msg, "reasoning_content", reasoning);
            json_object_set_new(msg, "reasoning", reasoning);
            for (int k = 0; k < c->n_tools; k++) json_array_append_new(tools, tool_call_json(&c->tools[k], k, false));
            json_object_set_new(msg, "tool_calls", tools);
            json_object_set_new(ch, "message", msg);
            json_object_set_new(ch, "logprobs", r->top_logprobs >= 0 ? chat_lps(r, g, c, 0) : json_null());
        } else {
            const GenPrompt *pr = &gen_spec(g)->prompts[c->prompt];
            StrBuf text = {0};
            if (r->echo && pr->text) sb_puts(&text, pr->text);
            sb_append(&text, sb_str(&c->text), c->text.len);
            json_object_set_new(ch, "text", jstrn(sb_str(&text), text.len));
            sb_free(&text);
            if (gen_spec(g)->params.logprobs >= 0) {
                CompLps l = comp_lps_new();
                long offset = 0;
                if (r->echo) comp_lps_prompt(&l, r, g, c, &offset);
                for (int k = 0; k < c->n_lps; k++) comp_lps_add(&l, r, g, c->lps[k].token, &c->lps[k], &offset);
                json_object_set_new(ch, "logprobs", l.obj);
            } else {
                json_object_set_new(ch, "logprobs", json_null());
            }
        }
        json_object_set_new(ch, "finish_reason", json_string(c->finish_reason ? c->finish_reason : "abort"));
        json_object_set_new(ch, "stop_reason", stop_reason(c));
        json_array_append_new(choices, ch);
    }
    json_object_set_new(root, "choices", choices);
    json_object_set_new(root, "usage", usage(g));
    return dump(root);
}

static void sse(StrBuf *out, json_t *v) {
    char *s = dump(v);
    sb_puts(out, "data: ");
    sb_puts(out, s);
    sb_puts(out, "\n\n");
    free(s);
}

/* One chunk carrying one choice. */
static void chunk(const OaiRequest *r, StrBuf *out, json_t *choice) {
    json_t *root = envelope(r, r->kind == OAI_CHAT ? "chat.completion.chunk" : "text_completion");
    json_t *choices = json_array();
    json_array_append_new(choices, choice);
    json_object_set_new(root, "choices", choices);
    sse(out, root);
}

/* Emits ch (one choice) with its finish_reason and stop_reason, null until fin; notes a finish
 * as sent. */
static void send_choice(const OaiRequest *r, GenChoice *c, bool fin, json_t *ch, StrBuf *out) {
    json_object_set_new(ch, "finish_reason", fin ? json_string(c->finish_reason) : json_null());
    json_object_set_new(ch, "stop_reason", fin ? stop_reason(c) : json_null());
    if (fin) c->sent_finish = true;
    chunk(r, out, ch);
}

/* {"reasoning_content": the reasoning not sent yet, "reasoning": the same}, marked sent. */
static json_t *reasoning_delta(GenChoice *c) {
    json_t *delta = json_object(), *t = jstrn(c->reasoning.s + c->sent_reasoning, c->reasoning.len - c->sent_reasoning);
    json_object_set(delta, "reasoning_content", t);
    json_object_set_new(delta, "reasoning", t);
    c->sent_reasoning = c->reasoning.len;
    return delta;
}

/* Whether tool calls have news to send: calls not sent, or more arguments of the last one sent
 * (a forced call's grow as they are generated). */
static bool tool_news(const GenChoice *c) {
    return c->n_tools > c->sent_tools || (c->sent_tools && c->tools[c->sent_tools - 1].arguments.len > c->sent_args);
}

/* The tool call deltas, marked sent: more arguments of the last call sent ({"index", "function":
 * {"arguments"}}), then the calls not sent yet, with their arguments so far. */
static json_t *tool_deltas(GenChoice *c) {
    json_t *list = json_array();
    if (c->sent_tools) {
        const StrBuf *a = &c->tools[c->sent_tools - 1].arguments;
        if (a->len > c->sent_args)
            json_array_append_new(list, json_pack("{s:i, s:{s:o}}", "index", c->sent_tools - 1, "function", "arguments",
                                                  jstrn(a->s + c->sent_args, a->len - c->sent_args)));
    }
    for (int k = c->sent_tools; k < c->n_tools; k++) json_array_append_new(list, tool_call_json(&c->tools[k], k, true));
    c->sent_tools = c->n_tools;
    c->sent_args = c->n_tools ? c->tools[c->n_tools - 1].arguments.len : 0;
    return list;
}

static void chat_chunks(const OaiRequest *r, Gen *g, GenChoice *c, StrBuf *out) {
    if (!c->sent_start) {
        c->sent_start = true;
        json_t *ch = json_pack("{s:i, s:{s:s, s:s}, s:n, s:n}", "index", c->index, "delta", "role", "assistant",
                               "content", "", "logprobs", "finish_reason");
        chunk(r, out, ch);
    }
    bool fin = c->done && !c->sent_finish;
    const bool reasoning = c->reasoning.len > c->sent_reasoning;
    if (reasoning && (c->text.len > c->sent_text || tool_news(c))) {
        /* the writer fell behind across </think>: the reasoning goes first, in a chunk of its own,
         * so that no delta mixes reasoning and content */
        json_t *ch = json_pack("{s:i, s:o, s:n}", "index", c->index, "delta", reasoning_delta(c), "logprobs");
        send_choice(r, c, false, ch, out);
    }
    json_t *delta = c->reasoning.len > c->sent_reasoning ? reasoning_delta(c) : json_object();
    if (c->text.len > c->sent_text) {
        json_object_set_new(delta, "content", jstrn(c->text.s + c->sent_text, c->text.len - c->sent_text));
        c->sent_text = c->text.len;
    }
    if (tool_news(c)) json_object_set_new(delta, "tool_calls", tool_deltas(c));
    if (json_object_size(delta) == 0 && !fin) {
        json_decref(delta); /* logprobs of held-back text ride with the next chunk */
        return;
    }
    json_t *ch = json_object();
    json_object_set_new(ch, "index", json_integer(c->index));
    json_object_set_new(ch, "delta", delta);
    if (r->top_logprobs >= 0 && c->n_lps > c->sent_lps) {
        json_object_set_new(ch, "logprobs", chat_lps(r, g, c, c->sent_lps));
        c->sent_lps = c->n_lps;
    } else {
        json_object_set_new(ch, "logprobs", json_null());
    }
    send_choice(r, c, fin, ch, out);
}

static void completion_chunks(const OaiRequest *r, Gen *g, GenChoice *c, StrBuf *out) {
    bool want_lps = gen_spec(g)->params.logprobs >= 0;
    /* Prompt logprobs are complete when the first token arrives (the engine sends them first). */
    if (!c->sent_start && r->echo && want_lps && c->n_gen == 0 && !c->done) return;
    if (!c->sent_start) {
        c->sent_start = true;
        const GenPrompt *pr = &gen_spec(g)->prompts[c->prompt];
        if (r->echo && pr->text) {
            json_t *ch = json_object();
            json_object_set_new(ch, "index", json_integer(c->index));
            json_object_set_new(ch, "text", jstr(pr->text));
            if (want_lps) {
                CompLps l = comp_lps_new();
                comp_lps_prompt(&l, r, g, c, &c->sent_chars);
                json_object_set_new(ch, "logprobs", l.obj);
            } else {
                json_object_set_new(ch, "logprobs", json_null());
            }
            send_choice(r, c, false, ch, out);
        }
    }
    bool fin = c->done && !c->sent_finish;
    if (c->text.len <= c->sent_text && !fin) return;
    json_t *ch = json_object();
    json_object_set_new(ch, "index", json_integer(c->index));
    json_object_set_new(ch, "text", jstrn(sb_str(&c->text) + c->sent_text, c->text.len - c->sent_text));
    c->sent_text = c->text.len;
    if (want_lps) {
        CompLps l = comp_lps_new();
        for (int k = c->sent_lps; k < c->n_lps; k++) comp_lps_add(&l, r, g, c->lps[k].token, &c->lps[k], &c->sent_chars);
        c->sent_lps = c->n_lps;
        json_object_set_new(ch, "logprobs", l.obj);
    } else {
        json_object_set_new(ch, "logprobs", json_null());
    }
    send_choice(r, c, fin, ch, out);
}

void oai_stream_chunks(const OaiRequest *r, Gen *g, StrBuf *out) {
    for (int i = 0; i < gen_n_choices(g); i++) {
        GenChoice *c = gen_choice(g, i);
        if (r->kind == OAI_CHAT)
            chat_chunks(r, g, c, out);
        else
            completion_chunks(r, g, c, out);
    }
}

void oai_stream_end(const OaiRequest *r, Gen *g, StrBuf *out) {
    if (r->include_usage) {
        json_t *root = envelope(r, r->kind == OAI_CHAT ? "chat.completion.chunk" : "text_completion");
        json_object_set_new(root, "choices", json_array());
        json_object_set_new(root, "usage", usage(g));
        sse(out, root);
    }
    sb_puts(out, "data: [DONE]\n\n");
}

char *oai_models_json(const OaiContext *ctx) {
    json_t *m = json_object();
    json_object_set_new(m, "id", jstr(ctx->model_name));
    json_object_set_new(m, "object", json_string("model"));
    json_object_set_new(m, "created", json_integer((json_int_t)time(NULL)));
    json_object_set_new(m, "owned_by", json_string("quill"));
    json_object_set_new(m, "root", jstr(ctx->model_root));
    json_object_set_new(m, "parent", json_null());
    json_object_set_new(m, "max_model_len", json_integer(ctx->max_model_len));
    json_object_set_new(m, "permission", json_array());
    json_t *data = json_array();
    json_array_append_new(data, m);
    json_t *root = json_object();
    json_object_set_new(root, "object", json_string("list"));
    json_object_set_new(root, "data", data);
    return dump(root);
}
