/* json_schema.c — the schema compiler (see json_schema.h): a JSON schema (jansson tree) into the
 * node graph json_match.c walks.
 *
 * One recursive pass builds a node per schema object, memoised by the object so that $ref cycles
 * become graph cycles; keywords are checked as they are read, so an error names the first
 * unsupported one with its JSON pointer. Then, over the whole graph (a $ref may point at a node
 * still being built during the pass), three fixpoints: the bytes each node's values start with,
 * anyOf alternatives flattened and merged where they overlap (tagged objects united, other
 * overlaps merged or refused), and the shallowest nesting each node needs. Each node keeps its
 * schema's pointer for the errors found then. */
#include "text/json_schema.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NO_NODE 0xffffu
#define PATH_MAX_LEN 256
#define NEST_MAX 128   /* schema objects inside one another (the C stack) */
#define DEPTH_NONE (JSON_MAX_DEPTH + 1)

typedef struct NodeInfo {
    const json_t *schema; /* the object the node was built for (memo), or NULL */
    char *path;           /* its JSON pointer */
    bool exclusive;       /* an anyOf from oneOf: overlaps are refused, not merged */
} NodeInfo;

typedef struct Compiler {
    JsonSchema *g;
    uint32_t cap_nodes, cap_info, cap_props, cap_lits, cap_alts, cap_text;
    NodeInfo *info;
    const json_t *root;
    uint16_t any; /* the any-value node, NO_NODE until needed */
    int nest;
    QErr *err;
} Compiler;

/* ---- growing the graph ---- */

static bool grow(void **p, uint32_t *cap, uint32_t need, size_t size) {
    if (need <= *cap) return true;
    uint32_t n = *cap ? *cap : 16;
    while (n < need) n *= 2;
    void *q = realloc(*p, (size_t)n * size);
    if (!q) return false;
    *p = q, *cap = n;
    return true;
}

static int oom(Compiler *c) { return qerr_set(c->err, "out of memory"); }

/* A new node of kind k for the schema object memo (NULL: none) at path: its id, or -1. */
static int new_node(Compiler *c, SchemaKind k, const json_t *memo, const char *path) {
    JsonSchema *g = c->g;
    if (g->n_nodes >= SCHEMA_MAX_NODES)
        return qerr_set(c->err, "the schema is too large (more than %d nodes)", SCHEMA_MAX_NODES);
    if (!grow((void **)&g->nodes, &c->cap_nodes, g->n_nodes + 1, sizeof *g->nodes) ||
        !grow((void **)&c->info, &c->cap_info, g->n_nodes + 1, sizeof *c->info))
        return oom(c);
    const uint32_t id = g->n_nodes;
    memset(&g->nodes[id], 0, sizeof g->nodes[id]);
    g->nodes[id].kind = (uint8_t)k;
    g->nodes[id].item = NO_NODE;
    g->nodes[id].max = SCHEMA_MAX;
    c->info[id] = (NodeInfo){.schema = memo, .path = strdup(path)};
    if (!c->info[id].path) return oom(c);
    g->n_nodes++;
    return (int)id;
}

/* n slots reserved at the end of an array: the index of the first, or -1. */
static int reserve(Compiler *c, void **arr, uint32_t *n_arr, uint32_t *cap, uint32_t n, size_t size) {
    if (!grow(arr, cap, *n_arr + n, size)) return oom(c);
    const uint32_t first = *n_arr;
    if (n) memset((char *)*arr + (size_t)first * size, 0, (size_t)n * size);
    *n_arr += n;
    return (int)first;
}

static int add_text(Compiler *c, const char *s, size_t n, SchemaText *out) {
    JsonSchema *g = c->g;
    if (n >= SCHEMA_MAX) return qerr_set(c->err, "a key or enum value of %zu bytes (at most %d)", n, SCHEMA_MAX - 1);
    if (!grow((void **)&g->text, &c->cap_text, g->n_text + (uint32_t)n, 1)) return oom(c);
    memcpy(g->text + g->n_text, s, n);
    *out = (SchemaText){g->n_text, (uint32_t)n};
    g->n_text += (uint32_t)n;
    return 0;
}

static int cmp_text(const JsonSchema *g, SchemaText a, SchemaText b) {
    const uint32_t n = a.len < b.len ? a.len : b.len;
    const int r = memcmp(g->text + a.off, g->text + b.off, n);
    return r ? r : (a.len > b.len) - (a.len < b.len);
}

static int cmp_text_of(const void *a, const void *b, void *g) {
    return cmp_text(g, *(const SchemaText *)a, *(const SchemaText *)b);
}

/* Node id's literals: texts[0, n) sorted bytewise (json_match.c finds the candidates for a
 * prefix as a run) without repeats. */
static int set_literals(Compiler *c, int id, SchemaText *t, uint32_t n) {
    const JsonSchema *g = c->g;
    qsort_r(t, n, sizeof *t, cmp_text_of, (void *)g);
    uint32_t k = 0;
    for (uint32_t i = 0; i < n; i++)
        if (!k || cmp_text(g, t[k - 1], t[i])) t[k++] = t[i];
    if (k >= SCHEMA_MAX) return qerr_set(c->err, "more than %d enum values at %s", SCHEMA_MAX - 1, c->info[id].path);
    const int first = reserve(c, (void **)&c->g->lits, &c->g->n_lits, &c->cap_lits, k, sizeof *t);
    if (first < 0) return -1;
    if (k) memcpy(c->g->lits + first, t, (size_t)k * sizeof *t);
    c->g->nodes[id].first = (uint32_t)first, c->g->nodes[id].count = k;
    return 0;
}

/* A literals node of the given texts (NUL-terminated). */
static int literal_node(Compiler *c, const char *const *texts, uint32_t n, const json_t *memo, const char *path) {
    const int id = new_node(c, SK_LITERALS, memo, path);
    SchemaText t[4];
    for (uint32_t i = 0; id >= 0 && i < n; i++)
        if (add_text(c, texts[i], strlen(texts[i]), &t[i])) return -1;
    return id < 0 || set_literals(c, id, t, n) ? -1 : id;
}

static int set_alts(Compiler *c, int id, const uint16_t *alts, uint32_t n) {
    const int first = reserve(c, (void **)&c->g->alts, &c->g->n_alts, &c->cap_alts, n, sizeof *alts);
    if (first < 0) return -1;
    if (n) memcpy(c->g->alts + first, alts, (size_t)n * sizeof *alts);
    c->g->nodes[id].first = (uint32_t)first, c->g->nodes[id].count = n;
    return 0;
}

/* The node of any JSON value: an object of any keys, an array, a string, a number, a literal. */
static int any_node(Compiler *c) {
    if (c->any != NO_NODE) return c->any;
    const int any = new_node(c, SK_ANY_OF, NULL, "(any value)");
    if (any < 0) return -1;
    c->any = (uint16_t)any;
    static const char *const lits[] = {"false", "null", "true"};
    const int map = new_node(c, SK_MAP, NULL, "(any object)"), arr = new_node(c, SK_ARRAY, NULL, "(any array)");
    const int str = new_node(c, SK_STRING, NULL, "(any string)"), num = new_node(c, SK_NUMBER, NULL, "(any number)");
    const int lit = literal_node(c, lits, 3, NULL, "(true, false, null)");
    if (map < 0 || arr < 0 || str < 0 || num < 0 || lit < 0) return -1;
    c->g->nodes[map].item = c->g->nodes[arr].item = (uint16_t)any;
    const uint16_t alts[] = {(uint16_t)map, (uint16_t)arr, (uint16_t)str, (uint16_t)num, (uint16_t)lit};
    return set_alts(c, any, alts, 5) ? -1 : any;
}

/* ---- the recursive pass ---- */

static void child_path(char *out, const char *path, const char *key) {
    size_t n = (size_t)snprintf(out, PATH_MAX_LEN, "%s/", path);
    for (const char *k = key; *k && n + 3 < PATH_MAX_LEN; k++) { /* JSON pointer escapes */
        if (*k == '~' || *k == '/') out[n++] = '~', out[n++] = *k == '~' ? '0' : '1';
        else out[n++] = *k;
    }
    out[n < PATH_MAX_LEN ? n : PATH_MAX_LEN - 1] = '\0';
}

static void index_path(char *out, const char *path, const char *key, size_t i) {
    snprintf(out, PATH_MAX_LEN, "%s/%s/%zu", path, key, i);
}

static int compile(Compiler *c, const json_t *s, const char *path);

enum KwClass { KW_NOTE, KW_ANY, KW_OBJECT, KW_ARRAY, KW_STRING };
static const struct {
    const char *name;
    enum KwClass cls;
} kKeywords[] = {
    {"description", KW_NOTE}, {"title", KW_NOTE},      {"default", KW_NOTE},   {"examples", KW_NOTE},
    {"$schema", KW_NOTE},     {"$comment", KW_NOTE},   {"deprecated", KW_NOTE}, {"readOnly", KW_NOTE},
    {"writeOnly", KW_NOTE},   {"$defs", KW_NOTE},      {"definitions", KW_NOTE}, {"$id", KW_NOTE},
    {"type", KW_ANY},         {"enum", KW_ANY},        {"const", KW_ANY},      {"anyOf", KW_ANY},
    {"oneOf", KW_ANY},        {"$ref", KW_ANY},        {"properties", KW_OBJECT}, {"required", KW_OBJECT},
    {"additionalProperties", KW_OBJECT}, {"unevaluatedProperties", KW_OBJECT}, {"items", KW_ARRAY},
    {"minItems", KW_ARRAY},   {"maxItems", KW_ARRAY},  {"minLength", KW_STRING}, {"maxLength", KW_STRING},
};

/* The keywords of s by class: the first of each (NULL: none); an error for an unknown one. */
static int classify(Compiler *c, const json_t *s, const char *path, const char *first[5]) {
    const char *key;
    const json_t *v;
    for (int i = 0; i < 5; i++) first[i] = NULL;
    json_object_foreach((json_t *)s, key, v) {
        size_t k = 0;
        while (k < sizeof kKeywords / sizeof *kKeywords && strcmp(kKeywords[k].name, key)) k++;
        char at[PATH_MAX_LEN];
        child_path(at, path, key);
        if (k == sizeof kKeywords / sizeof *kKeywords)
            return qerr_set(c->err, "unsupported JSON schema keyword '%s' at %s", key, at);
        if (!strcmp(key, "$id") && s != c->root)
            return qerr_set(c->err, "unsupported JSON schema keyword '$id' at %s (only at the root)", at);
        if (!strcmp(key, "unevaluatedProperties") && !json_is_false(v))
            return qerr_set(c->err, "unevaluatedProperties at %s: only false is supported", at);
        if (!first[kKeywords[k].cls]) first[kKeywords[k].cls] = key;
    }
    return 0;
}

/* A keyword beside which only annotations may stand (and `type`, when allow_type). */
static int alone(Compiler *c, const json_t *s, const char *path, const char *kw, bool allow_type) {
    const char *key;
    const json_t *v;
    json_object_foreach((json_t *)s, key, v) {
        size_t k = 0;
        while (strcmp(kKeywords[k].name, key)) k++;
        if (kKeywords[k].cls == KW_NOTE || !strcmp(key, kw) || (allow_type && !strcmp(key, "type"))) continue;
        return qerr_set(c->err, "keyword '%s' beside '%s' at %s is not supported", key, kw, path);
    }
    return 0;
}

/* The $ref target: "#" or a local JSON pointer into the root. */
static const json_t *resolve_ref(Compiler *c, const json_t *ref, const char *path) {
    const char *r = json_string_value(ref);
    if (!r || r[0] != '#' || (r[1] && r[1] != '/')) {
        qerr_set(c->err, "$ref at %s must be a local pointer ('#', '#/$defs/NAME', ...)", path);
        return NULL;
    }
    const json_t *at = c->root;
    for (const char *p = r + 1; at && *p == '/';) {
        char tok[PATH_MAX_LEN];
        size_t n = 0;
        for (p++; *p && *p != '/' && n + 1 < sizeof tok; p++) {
            if (*p == '~' && (p[1] == '0' || p[1] == '1')) tok[n++] = *++p == '0' ? '~' : '/';
            else tok[n++] = *p;
        }
        tok[n] = '\0';
        if (json_is_array(at)) {
            char *end;
            const unsigned long i = strtoul(tok, &end, 10);
            at = *tok && !*end ? json_array_get(at, i) : NULL;
        } else {
            at = json_object_get(at, tok);
        }
    }
    if (!at) qerr_set(c->err, "$ref '%s' at %s points at nothing in the schema", r, path);
    return at;
}

/* An integer keyword in [0, SCHEMA_MAX) into *out (unchanged when absent). */
static int read_count(Compiler *c, const json_t *s, const char *kw, const char *path, uint16_t *out) {
    const json_t *v = json_object_get(s, kw);
    if (!v) return 0;
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) >= SCHEMA_MAX)
        return qerr_set(c->err, "%s at %s must be an integer in [0, %d)", kw, path, SCHEMA_MAX);
    *out = (uint16_t)json_integer_value(v);
    return 0;
}

static int read_bounds(Compiler *c, const json_t *s, const char *lo, const char *hi, const char *path, int id) {
    SchemaNode *n = &c->g->nodes[id];
    uint16_t min = 0, max = SCHEMA_MAX;
    if (read_count(c, s, lo, path, &min) || read_count(c, s, hi, path, &max)) return -1;
    if (min > max) return qerr_set(c->err, "%s > %s at %s: no value fits", lo, hi, path);
    n->min = min, n->max = max;
    return 0;
}

static bool in_list(const json_t *list, const char *name) {
    size_t i;
    const json_t *v;
    json_array_foreach(list, i, v) if (json_is_string(v) && !strcmp(json_string_value(v), name)) return true;
    return false;
}

static int object_node(Compiler *c, const json_t *s, const char *path, const json_t *memo) {
    const json_t *props = json_object_get(s, "properties"), *req = json_object_get(s, "required");
    const json_t *extra = json_object_get(s, "additionalProperties");
    if (props && !json_is_object(props)) return qerr_set(c->err, "properties at %s must be an object", path);
    if (req && !json_is_array(req)) return qerr_set(c->err, "required at %s must be a list of names", path);
    if (extra && !json_is_boolean(extra) && !json_is_object(extra))
        return qerr_set(c->err, "additionalProperties at %s must be a boolean or a schema", path);
    size_t i;
    const json_t *v;
    json_array_foreach(req, i, v) {
        if (!json_is_string(v)) return qerr_set(c->err, "required at %s must be a list of names", path);
        if (!json_object_get(props, json_string_value(v)))
            return qerr_set(c->err, "required at %s names '%s', which properties does not list", path,
                            json_string_value(v));
    }
    if (json_is_object(extra)) { /* a map of any keys */
        if (json_object_size(props))
            return qerr_set(c->err, "additionalProperties as a schema beside properties at %s is not supported", path);
        const int id = new_node(c, SK_MAP, memo, path);
        char at[PATH_MAX_LEN];
        child_path(at, path, "additionalProperties");
        const int item = id < 0 ? -1 : compile(c, extra, at);
        if (item < 0) return -1;
        c->g->nodes[id].item = (uint16_t)item;
        return id;
    }
    const int id = new_node(c, SK_OBJECT, memo, path);
    if (id < 0) return -1;
    const uint32_t n = (uint32_t)json_object_size(props);
    if (n >= SCHEMA_MAX) return qerr_set(c->err, "properties at %s: more than %d", path, SCHEMA_MAX - 1);
    const int first = reserve(c, (void **)&c->g->props, &c->g->n_props, &c->cap_props, n, sizeof *c->g->props);
    if (first < 0) return -1;
    c->g->nodes[id].first = (uint32_t)first, c->g->nodes[id].count = n;
    const char *key;
    uint32_t k = 0;
    json_object_foreach((json_t *)props, key, v) {
        char at[PATH_MAX_LEN], sub[PATH_MAX_LEN];
        child_path(sub, path, "properties");
        child_path(at, sub, key);
        json_t *ks = json_string(key);
        char *text = ks ? json_dumps(ks, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
        json_decref(ks);
        if (!text) return oom(c);
        SchemaText t;
        const int bad = add_text(c, text, strlen(text), &t);
        free(text);
        const int node = bad ? -1 : compile(c, v, at);
        if (node < 0) return -1;
        const bool required = in_list(req, key);
        c->g->props[first + k] = (SchemaProp){.key = t, .node = (uint16_t)node, .required = required};
        if (required) c->g->nodes[id].need = (uint16_t)(k + 1);
        k++;
    }
    return id;
}

static int array_node(Compiler *c, const json_t *s, const char *path, const json_t *memo) {
    const json_t *items = json_object_get(s, "items");
    if (items && json_is_array(items))
        return qerr_set(c->err, "items as a list (tuples) at %s is not supported", path);
    const int id = new_node(c, SK_ARRAY, memo, path);
    if (id < 0 || read_bounds(c, s, "minItems", "maxItems", path, id)) return -1;
    if (json_is_false(items)) {
        if (c->g->nodes[id].min) return qerr_set(c->err, "items false with minItems > 0 at %s: no value fits", path);
        c->g->nodes[id].max = 0;
    }
    char at[PATH_MAX_LEN];
    child_path(at, path, "items");
    const int item = items && !json_is_false(items) ? compile(c, items, at) : any_node(c);
    if (item < 0) return -1;
    c->g->nodes[id].item = (uint16_t)item;
    return id;
}

enum Type { T_OBJECT, T_ARRAY, T_STRING, T_NUMBER, T_INTEGER, T_BOOLEAN, T_NULL, N_TYPES };
static const char *const kTypes[N_TYPES] = {"object", "array", "string", "number", "integer", "boolean", "null"};

static int typed_node(Compiler *c, const json_t *s, enum Type t, const char *path, const json_t *memo) {
    static const char *const booleans[] = {"false", "true"}, *const null[] = {"null"};
    int id;
    switch (t) {
    case T_OBJECT: return object_node(c, s, path, memo);
    case T_ARRAY: return array_node(c, s, path, memo);
    case T_STRING:
        id = new_node(c, SK_STRING, memo, path);
        return id < 0 || read_bounds(c, s, "minLength", "maxLength", path, id) ? -1 : id;
    case T_NUMBER: return new_node(c, SK_NUMBER, memo, path);
    case T_INTEGER: return new_node(c, SK_INTEGER, memo, path);
    case T_BOOLEAN: return literal_node(c, booleans, 2, memo, path);
    default: return literal_node(c, null, 1, memo, path);
    }
}

static bool has_type(const json_t *v, enum Type t) {
    switch (t) {
    case T_OBJECT: return json_is_object(v);
    case T_ARRAY: return json_is_array(v);
    case T_STRING: return json_is_string(v);
    case T_NUMBER: return json_is_number(v);
    case T_INTEGER: return json_is_integer(v) || (json_is_real(v) && floor(json_real_value(v)) == json_real_value(v));
    case T_BOOLEAN: return json_is_boolean(v);
    default: return json_is_null(v);
    }
}

/* enum / const: the values (of an allowed type) as compact JSON texts. */
static int literals_node(Compiler *c, const json_t *s, const char *path, const bool types[N_TYPES], bool typed) {
    const json_t *en = json_object_get(s, "enum"), *cn = json_object_get(s, "const");
    const char *kw = en ? "enum" : "const";
    if (en && cn) return qerr_set(c->err, "enum and const together at %s are not supported", path);
    if (alone(c, s, path, kw, true)) return -1;
    if (en && (!json_is_array(en) || !json_array_size(en)))
        return qerr_set(c->err, "enum at %s must be a non-empty list", path);
    const size_t n = en ? json_array_size(en) : 1;
    if (n >= SCHEMA_MAX) return qerr_set(c->err, "enum at %s: more than %d values", path, SCHEMA_MAX - 1);
    SchemaText *t = malloc(n * sizeof *t);
    if (!t) return oom(c);
    uint32_t k = 0;
    for (size_t i = 0; i < n; i++) {
        const json_t *v = en ? json_array_get(en, i) : cn;
        bool ok = !typed;
        for (int ty = 0; ty < N_TYPES && !ok; ty++) ok = types[ty] && has_type(v, (enum Type)ty);
        if (!ok) continue;
        char *text = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT | JSON_PRESERVE_ORDER);
        const int bad = !text ? oom(c) : add_text(c, text, strlen(text), &t[k++]);
        free(text);
        if (bad) {
            free(t);
            return -1;
        }
    }
    int id = -1;
    if (!k) qerr_set(c->err, "no %s value at %s has the type the schema gives", kw, path);
    else if ((id = new_node(c, SK_LITERALS, s, path)) >= 0 && set_literals(c, id, t, k)) id = -1;
    free(t);
    return id;
}

/* anyOf / oneOf: a node whose alternatives are told apart later (flatten_any_of). */
static int any_of_node(Compiler *c, const json_t *s, const char *path) {
    const json_t *list = json_object_get(s, "anyOf");
    const char *kw = list ? "anyOf" : "oneOf";
    if (list && json_object_get(s, "oneOf")) return qerr_set(c->err, "anyOf and oneOf together at %s are not supported", path);
    if (!list) list = json_object_get(s, "oneOf");
    if (alone(c, s, path, kw, false)) return -1;
    if (!json_is_array(list) || !json_array_size(list) || json_array_size(list) >= SCHEMA_MAX)
        return qerr_set(c->err, "%s at %s must be a non-empty list of schemas", kw, path);
    const int id = new_node(c, SK_ANY_OF, s, path);
    if (id < 0) return -1;
    c->info[id].exclusive = list != json_object_get(s, "anyOf");
    const uint32_t n = (uint32_t)json_array_size(list);
    const int first = reserve(c, (void **)&c->g->alts, &c->g->n_alts, &c->cap_alts, n, sizeof *c->g->alts);
    if (first < 0) return -1;
    c->g->nodes[id].first = (uint32_t)first, c->g->nodes[id].count = n;
    for (uint32_t i = 0; i < n; i++) {
        char at[PATH_MAX_LEN];
        index_path(at, path, kw, i);
        const int alt = compile(c, json_array_get(list, i), at);
        if (alt < 0) return -1;
        c->g->alts[first + i] = (uint16_t)alt;
    }
    return id;
}

/* The types `type` allows (all of them when absent: then *typed is false). */
static int read_types(Compiler *c, const json_t *s, const char *path, bool types[N_TYPES], bool *typed) {
    const json_t *t = json_object_get(s, "type");
    *typed = t != NULL;
    for (int i = 0; i < N_TYPES; i++) types[i] = !t;
    if (!t) return 0;
    const size_t n = json_is_array(t) ? json_array_size(t) : 1;
    for (size_t i = 0; i < n; i++) {
        const json_t *e = json_is_array(t) ? json_array_get(t, i) : t;
        int k = 0;
        while (k < N_TYPES && !(json_is_string(e) && !strcmp(json_string_value(e), kTypes[k]))) k++;
        if (k == N_TYPES) return qerr_set(c->err, "type at %s must be one of object, array, string, number, integer, boolean, null, or a non-empty list of them", path);
        types[k] = true;
    }
    if (!n) return qerr_set(c->err, "type at %s must not be an empty list", path);
    return 0;
}

static int compile_object(Compiler *c, const json_t *s, const char *path) {
    const char *kw[5];
    if (classify(c, s, path, kw)) return -1;
    const json_t *ref = json_object_get(s, "$ref");
    if (ref) {
        if (alone(c, s, path, "$ref", false)) return -1;
        const json_t *target = resolve_ref(c, ref, path);
        return target ? compile(c, target, json_string_value(ref)) : -1;
    }
    if (json_object_get(s, "anyOf") || json_object_get(s, "oneOf")) return any_of_node(c, s, path);
    bool types[N_TYPES], typed;
    if (read_types(c, s, path, types, &typed)) return -1;
    if (json_object_get(s, "enum") || json_object_get(s, "const")) return literals_node(c, s, path, types, typed);
    if (!typed) { /* the kind the keywords imply, or any value */
        const char *k1 = kw[KW_OBJECT] ? kw[KW_OBJECT] : kw[KW_ARRAY], *k2 = kw[KW_STRING] ? kw[KW_STRING] : kw[KW_ARRAY];
        if ((kw[KW_OBJECT] != NULL) + (kw[KW_ARRAY] != NULL) + (kw[KW_STRING] != NULL) > 1)
            return qerr_set(c->err, "keywords of two types ('%s', '%s') and no type at %s", k1, k2, path);
        if (kw[KW_OBJECT]) return typed_node(c, s, T_OBJECT, path, s);
        if (kw[KW_ARRAY]) return typed_node(c, s, T_ARRAY, path, s);
        if (kw[KW_STRING]) return typed_node(c, s, T_STRING, path, s);
        return any_node(c);
    }
    static const struct {
        enum KwClass cls;
        enum Type type;
        const char *what;
    } applies[] = {{KW_OBJECT, T_OBJECT, "objects"}, {KW_ARRAY, T_ARRAY, "arrays"}, {KW_STRING, T_STRING, "strings"}};
    for (int i = 0; i < 3; i++)
        if (kw[applies[i].cls] && !types[applies[i].type])
            return qerr_set(c->err, "'%s' at %s applies to %s, which type does not allow", kw[applies[i].cls], path,
                            applies[i].what);
    int n = 0, only = 0;
    for (int t = 0; t < N_TYPES; t++)
        if (types[t]) n++, only = t;
    if (n == 1) return typed_node(c, s, (enum Type)only, path, s);
    const int id = new_node(c, SK_ANY_OF, s, path); /* a list of types: any of them */
    uint16_t alts[N_TYPES];
    n = 0;
    for (int t = 0; t < N_TYPES && id >= 0; t++) {
        if (!types[t]) continue;
        const int alt = typed_node(c, s, (enum Type)t, path, NULL);
        if (alt < 0) return -1;
        alts[n++] = (uint16_t)alt;
    }
    return id < 0 || set_alts(c, id, alts, (uint32_t)n) ? -1 : id;
}

/* The node of schema s (an object or a boolean) at path, built once per object. */
static int compile(Compiler *c, const json_t *s, const char *path) {
    if (json_is_true(s)) return any_node(c);
    if (json_is_false(s)) return qerr_set(c->err, "the schema false at %s allows no value", path);
    if (!json_is_object(s)) return qerr_set(c->err, "the schema at %s must be an object or a boolean", path);
    for (uint32_t i = 0; i < c->g->n_nodes; i++)
        if (c->info[i].schema == s) return (int)i;
    if (c->nest == NEST_MAX) return qerr_set(c->err, "the schema nests deeper than %d at %s", NEST_MAX, path);
    c->nest++;
    const int id = compile_object(c, s, path);
    c->nest--;
    return id;
}

/* ---- over the whole graph ---- */

static void set_byte(uint64_t *set, uint8_t b) { set[b >> 6] |= 1ull << (b & 63); }

static bool overlap(const uint64_t *a, const uint64_t *b, int *byte) {
    for (int w = 0; w < 4; w++)
        if (a[w] & b[w]) {
            *byte = w * 64 + __builtin_ctzll(a[w] & b[w]);
            return true;
        }
    return false;
}

/* The bytes each node's values start with: direct for all but anyOf, the union of the
 * alternatives' for anyOf (a fixpoint: alternatives may be anyOfs in a cycle). */
static void compute_starts(JsonSchema *g) {
    for (uint32_t i = 0; i < g->n_nodes; i++) {
        SchemaNode *n = &g->nodes[i];
        memset(n->starts, 0, sizeof n->starts);
        switch (n->kind) {
        case SK_OBJECT:
        case SK_MAP:
        case SK_UNION: set_byte(n->starts, '{'); break;
        case SK_ARRAY: set_byte(n->starts, '['); break;
        case SK_STRING: set_byte(n->starts, '"'); break;
        case SK_NUMBER:
        case SK_INTEGER:
            set_byte(n->starts, '-');
            for (uint8_t d = '0'; d <= '9'; d++) set_byte(n->starts, d);
            break;
        case SK_LITERALS:
            for (uint32_t k = 0; k < n->count; k++) set_byte(n->starts, (uint8_t)g->text[g->lits[n->first + k].off]);
            break;
        default: break;
        }
    }
    for (bool changed = true; changed;) {
        changed = false;
        for (uint32_t i = 0; i < g->n_nodes; i++) {
            SchemaNode *n = &g->nodes[i];
            if (n->kind != SK_ANY_OF) continue;
            for (uint32_t k = 0; k < n->count; k++)
                for (int w = 0; w < 4; w++) {
                    const uint64_t add = g->nodes[g->alts[n->first + k]].starts[w] & ~n->starts[w];
                    n->starts[w] |= add;
                    changed = changed || add;
                }
        }
    }
}

/* A union's objects: alts[u->objects, + this), one per literal of its tags node. */
static uint32_t union_size(const JsonSchema *g, const SchemaNode *u) { return g->nodes[g->props[u->first].node].count; }

/* The concrete alternatives under anyOf node id, nested anyOfs and unions (of an anyOf flattened
 * before this one) opened, into list. */
static int collect(Compiler *c, uint32_t id, bool *seen, uint16_t *list, uint32_t *n, bool *exclusive) {
    const JsonSchema *g = c->g;
    const SchemaNode *x = &g->nodes[id];
    *exclusive = *exclusive || c->info[id].exclusive;
    const bool is_union = x->kind == SK_UNION;
    const uint32_t first = is_union ? x->objects : x->first, count = is_union ? union_size(g, x) : x->count;
    for (uint32_t k = 0; k < count; k++) {
        const uint16_t alt = g->alts[first + k];
        if (seen[alt]) continue;
        seen[alt] = true;
        if (g->nodes[alt].kind == SK_ANY_OF || g->nodes[alt].kind == SK_UNION) {
            if (collect(c, alt, seen, list, n, exclusive)) return -1;
        } else {
            list[(*n)++] = alt;
        }
    }
    return 0;
}

/* Two overlapping alternatives a, b of anyOf id as one node (into *merged), or an error. */
static int merge(Compiler *c, uint32_t id, bool exclusive, uint16_t a, uint16_t b, int byte, uint16_t *merged) {
    const SchemaNode *x = &c->g->nodes[a], *y = &c->g->nodes[b];
    const bool numeric = (x->kind == SK_NUMBER || x->kind == SK_INTEGER) && (y->kind == SK_NUMBER || y->kind == SK_INTEGER);
    if (!exclusive && numeric) {
        *merged = x->kind == SK_NUMBER ? a : b;
        return 0;
    }
    if (!exclusive && x->kind == SK_STRING && y->kind == SK_STRING && x->min == y->min && x->max == y->max) {
        *merged = a;
        return 0;
    }
    if (!exclusive && x->kind == SK_LITERALS && y->kind == SK_LITERALS) {
        const uint32_t n = x->count + y->count;
        SchemaText *t = malloc((size_t)n * sizeof *t);
        if (!t) return oom(c);
        memcpy(t, c->g->lits + x->first, x->count * sizeof *t);
        memcpy(t + x->count, c->g->lits + y->first, y->count * sizeof *t);
        const int m = new_node(c, SK_LITERALS, NULL, c->info[id].path);
        const int bad = m < 0 || set_literals(c, m, t, n);
        free(t);
        if (bad) return -1;
        *merged = (uint16_t)m;
        return 0;
    }
    return qerr_set(c->err,
                    "%s at %s: the alternatives %s and %s can both start with '%c'; quill tells alternatives apart by "
                    "their first character (object, array, string, number, literal)%s%s",
                    c->info[id].exclusive ? "oneOf" : "anyOf", c->info[id].path, c->info[a].path, c->info[b].path, byte,
                    exclusive ? "" : ", merging only numbers, equal strings and enum values",
                    byte == '{' ? "; objects only by a tag: a first, required property under the same key in each, "
                                  "whose value is one string (const) that differs between them"
                                : "");
}

/* Whether object node o has a tag (see SK_UNION): a first property, required, whose value is one
 * string literal. */
static bool has_tag(const JsonSchema *g, uint16_t o) {
    const SchemaNode *n = &g->nodes[o];
    if (n->kind != SK_OBJECT || !n->count || !g->props[n->first].required) return false;
    const SchemaNode *v = &g->nodes[g->props[n->first].node];
    return v->kind == SK_LITERALS && v->count == 1 && g->text[g->lits[v->first].off] == '"';
}

static SchemaText tag_key(const JsonSchema *g, uint16_t o) { return g->props[g->nodes[o].first].key; }

static SchemaText tag_value(const JsonSchema *g, uint16_t o) {
    return g->lits[g->nodes[g->props[g->nodes[o].first].node].first];
}

static int cmp_tag_of(const void *a, const void *b, void *g) {
    return cmp_text(g, tag_value(g, *(const uint16_t *)a), tag_value(g, *(const uint16_t *)b));
}

/* The union of objs[0, k) (tagged, under one key) as a new node of anyOf id: into *out, or an
 * error for two equal tags. objs is reordered by tag. */
static int make_union(Compiler *c, uint32_t id, uint16_t *objs, uint32_t k, uint16_t *out) {
    JsonSchema *g = c->g;
    qsort_r(objs, k, sizeof *objs, cmp_tag_of, g);
    for (uint32_t i = 1; i < k; i++) {
        const SchemaText t = tag_value(g, objs[i]);
        if (!cmp_text(g, tag_value(g, objs[i - 1]), t))
            return qerr_set(c->err, "%s at %s: the objects %s and %s have the same tag %.*s",
                            c->info[id].exclusive ? "oneOf" : "anyOf", c->info[id].path, c->info[objs[i - 1]].path,
                            c->info[objs[i]].path, (int)t.len, g->text + t.off);
    }
    SchemaText *tags = malloc((size_t)k * sizeof *tags);
    if (!tags) return oom(c);
    for (uint32_t i = 0; i < k; i++) tags[i] = tag_value(g, objs[i]);
    const int lits = new_node(c, SK_LITERALS, NULL, c->info[id].path);
    const int bad = lits < 0 || set_literals(c, lits, tags, k); /* already in order: literal i is objs[i]'s tag */
    free(tags);
    const int u = bad ? -1 : new_node(c, SK_UNION, NULL, c->info[id].path);
    const int prop = u < 0 ? -1 : reserve(c, (void **)&g->props, &g->n_props, &c->cap_props, 1, sizeof *g->props);
    const int first = prop < 0 ? -1 : reserve(c, (void **)&g->alts, &g->n_alts, &c->cap_alts, k, sizeof *g->alts);
    if (first < 0) return -1;
    g->props[prop] = (SchemaProp){.key = tag_key(g, objs[0]), .node = (uint16_t)lits, .required = true};
    memcpy(g->alts + first, objs, (size_t)k * sizeof *objs);
    SchemaNode *n = &g->nodes[u];
    n->first = (uint32_t)prop, n->count = 1, n->need = 1, n->objects = (uint32_t)first;
    *out = (uint16_t)u;
    return 0;
}

/* The objects among an anyOf's alternatives list[0, *n) replaced by their union, when there are
 * several and each has a tag under the same key; otherwise the list is left as it is (merge
 * refuses two objects). */
static int unite_objects(Compiler *c, uint32_t id, uint16_t *list, uint32_t *n) {
    const JsonSchema *g = c->g;
    uint16_t *objs = malloc((size_t)*n * sizeof *objs);
    if (!objs) return oom(c);
    uint32_t k = 0;
    bool tagged = true;
    for (uint32_t i = 0; i < *n; i++) {
        if (g->nodes[list[i]].kind != SK_OBJECT) continue;
        objs[k++] = list[i];
        tagged = tagged && has_tag(g, list[i]) && !cmp_text(g, tag_key(g, objs[0]), tag_key(g, list[i]));
    }
    uint16_t u = 0;
    const int rc = k >= 2 && tagged ? make_union(c, id, objs, k, &u) : 0;
    free(objs);
    if (rc || k < 2 || !tagged) return rc;
    uint32_t m = 0;
    for (uint32_t i = 0; i < *n; i++)
        if (g->nodes[list[i]].kind != SK_OBJECT) list[m++] = list[i];
    list[m++] = u;
    *n = m;
    compute_starts(c->g); /* the union is new */
    return 0;
}

/* Each anyOf's alternatives flattened (nested anyOfs opened), tagged objects united, other
 * overlaps merged or refused, so that a value's first byte picks at most one. */
static int flatten_any_of(Compiler *c) {
    const uint32_t n_before = c->g->n_nodes;
    bool *seen = malloc(SCHEMA_MAX_NODES * sizeof *seen);
    uint16_t *list = malloc(SCHEMA_MAX_NODES * sizeof *list);
    int rc = seen && list ? 0 : oom(c);
    for (uint32_t id = 0; id < n_before && !rc; id++) {
        if (c->g->nodes[id].kind != SK_ANY_OF) continue;
        memset(seen, 0, SCHEMA_MAX_NODES * sizeof *seen);
        uint32_t n = 0;
        bool exclusive = false;
        seen[id] = true;
        rc = collect(c, id, seen, list, &n, &exclusive);
        if (!rc) rc = unite_objects(c, id, list, &n);
        for (uint32_t i = 0; i < n && !rc; i++)
            for (uint32_t j = i + 1; j < n && !rc; j++) {
                int byte;
                if (!overlap(c->g->nodes[list[i]].starts, c->g->nodes[list[j]].starts, &byte)) continue;
                rc = merge(c, id, exclusive, list[i], list[j], byte, &list[i]);
                if (rc) break;
                compute_starts(c->g); /* a merged node is new */
                list[j] = list[--n];
                j = i; /* list[i] changed: compare it again with the rest */
            }
        if (!rc) rc = set_alts(c, (int)id, list, n);
    }
    free(seen);
    free(list);
    return rc;
}

/* The fewest containers a valid value of each node opens (DEPTH_NONE: more than fit, or none
 * can end), a fixpoint from "none" down. */
static void compute_min_depth(JsonSchema *g) {
    for (uint32_t i = 0; i < g->n_nodes; i++) g->nodes[i].min_depth = DEPTH_NONE;
    for (bool changed = true; changed;) {
        changed = false;
        for (uint32_t i = 0; i < g->n_nodes; i++) {
            SchemaNode *n = &g->nodes[i];
            int d = 0;
            switch (n->kind) {
            case SK_MAP: d = 1; break;
            case SK_ARRAY: d = 1 + (n->min ? g->nodes[n->item].min_depth : 0); break;
            case SK_OBJECT:
                for (uint32_t k = 0; k < n->count; k++)
                    if (g->props[n->first + k].required && g->nodes[g->props[n->first + k].node].min_depth > d)
                        d = g->nodes[g->props[n->first + k].node].min_depth;
                d += 1;
                break;
            case SK_ANY_OF:
                d = DEPTH_NONE;
                for (uint32_t k = 0; k < n->count; k++)
                    if (g->nodes[g->alts[n->first + k]].min_depth < d) d = g->nodes[g->alts[n->first + k]].min_depth;
                break;
            case SK_UNION: /* its deepest object: whichever tag comes, that object must fit */
                for (uint32_t k = 0; k < union_size(g, n); k++)
                    if (g->nodes[g->alts[n->objects + k]].min_depth > d) d = g->nodes[g->alts[n->objects + k]].min_depth;
                break;
            default: break;
            }
            if (d > DEPTH_NONE) d = DEPTH_NONE;
            if (d < n->min_depth) n->min_depth = (uint8_t)d, changed = true;
        }
    }
}

static uint64_t fnv(uint64_t h, const void *p, size_t n) {
    for (size_t i = 0; i < n; i++) h = (h ^ ((const uint8_t *)p)[i]) * 1099511628211ull;
    return h;
}

/* Field by field (structs have padding). */
static uint64_t graph_hash(const JsonSchema *g) {
    uint64_t h = 14695981039346656037ull;
    for (uint32_t i = 0; i < g->n_nodes; i++) {
        const SchemaNode *n = &g->nodes[i];
        const uint32_t f[9] = {n->kind, n->min_depth, n->item, n->min, n->max, n->need, n->first, n->count, n->objects};
        h = fnv(h, f, sizeof f);
    }
    for (uint32_t i = 0; i < g->n_props; i++) {
        const uint32_t f[4] = {g->props[i].key.off, g->props[i].key.len, g->props[i].node, g->props[i].required};
        h = fnv(h, f, sizeof f);
    }
    for (uint32_t i = 0; i < g->n_lits; i++) h = fnv(h, (const uint32_t[2]){g->lits[i].off, g->lits[i].len}, 8);
    h = fnv(h, g->alts, g->n_alts * sizeof *g->alts);
    h = fnv(h, g->text, g->n_text);
    return fnv(h, &g->root, sizeof g->root);
}

static void compiler_free(Compiler *c) {
    for (uint32_t i = 0; c->g && i < c->g->n_nodes; i++) free(c->info[i].path);
    free(c->info);
}

/* The whole-graph passes after the root is built; the schema, or NULL (freed) with c->err. */
static JsonSchema *finish(Compiler *c, int root) {
    JsonSchema *g = c->g;
    if (root >= 0) {
        g->root = (uint16_t)root;
        compute_starts(g);
        if (flatten_any_of(c)) root = -1;
    }
    if (root >= 0) {
        compute_min_depth(g);
        if (g->nodes[root].min_depth > JSON_MAX_DEPTH) {
            qerr_set(c->err, "no value fits the schema within %d nested containers (a required $ref cycle?)",
                     JSON_MAX_DEPTH);
            root = -1;
        }
    }
    compiler_free(c);
    if (root < 0) {
        json_schema_unref(g);
        return NULL;
    }
    g->hash = graph_hash(g);
    return g;
}

static bool compiler_init(Compiler *c, const json_t *root, QErr *err) {
    *c = (Compiler){.root = root, .any = NO_NODE, .err = err};
    if (!(c->g = calloc(1, sizeof *c->g))) return oom(c), false;
    atomic_init(&c->g->refs, 1);
    return true;
}

JsonSchema *json_schema_compile(const json_t *schema, QErr *err) {
    Compiler c;
    if (!compiler_init(&c, schema, err)) return NULL;
    return finish(&c, compile(&c, schema, "#"));
}

/* A map of any keys to any values: any object. */
static int any_object_node(Compiler *c, const char *path) {
    const int any = any_node(c);
    const int map = any < 0 ? -1 : new_node(c, SK_MAP, NULL, path);
    if (map >= 0) c->g->nodes[map].item = (uint16_t)any;
    return map;
}

JsonSchema *json_schema_any_object(void) {
    Compiler c;
    QErr err;
    if (!compiler_init(&c, NULL, &err)) return NULL;
    return finish(&c, any_object_node(&c, "#"));
}

/* {"name": the literal name, "parameters": a value of params (its own root for $refs)}, the
 * alternative at path. */
static int call_node(Compiler *c, const char *name, const json_t *params, const char *path) {
    const int id = new_node(c, SK_OBJECT, NULL, path);
    const int first = id < 0 ? -1 : reserve(c, (void **)&c->g->props, &c->g->n_props, &c->cap_props, 2, sizeof *c->g->props);
    if (first < 0) return -1;
    json_t *s = json_string(name);
    char *text = s ? json_dumps(s, JSON_ENCODE_ANY | JSON_COMPACT) : NULL;
    json_decref(s);
    char at[PATH_MAX_LEN];
    child_path(at, path, "name");
    const int lit = text ? literal_node(c, (const char *const[]){text}, 1, NULL, at) : oom(c);
    free(text);
    SchemaText keys[2];
    if (lit < 0 || add_text(c, "\"name\"", 6, &keys[0]) || add_text(c, "\"parameters\"", 12, &keys[1])) return -1;
    c->root = params;
    const int args = params ? compile(c, params, "#") : any_object_node(c, "#");
    if (args < 0) return qerr_prefix(c->err, "the parameters of '%s'", name);
    c->g->props[first] = (SchemaProp){.key = keys[0], .node = (uint16_t)lit, .required = true};
    c->g->props[first + 1] = (SchemaProp){.key = keys[1], .node = (uint16_t)args, .required = true};
    c->g->nodes[id].first = (uint32_t)first, c->g->nodes[id].count = 2, c->g->nodes[id].need = 2;
    return id;
}

JsonSchema *json_schema_tool_calls(const char *const *names, const json_t *const *params, int n, QErr *err) {
    Compiler c;
    if (!compiler_init(&c, NULL, err)) return NULL;
    const int arr = new_node(&c, SK_ARRAY, NULL, "#"), calls = arr < 0 ? -1 : new_node(&c, SK_ANY_OF, NULL, "#/items");
    int first = calls < 0 ? -1 : reserve(&c, (void **)&c.g->alts, &c.g->n_alts, &c.cap_alts, (uint32_t)n, sizeof *c.g->alts);
    if (first >= 0) {
        c.g->nodes[arr].min = 1, c.g->nodes[arr].item = (uint16_t)calls;
        c.g->nodes[calls].first = (uint32_t)first, c.g->nodes[calls].count = (uint32_t)n;
    }
    for (int i = 0; i < n && first >= 0; i++) {
        char at[PATH_MAX_LEN];
        index_path(at, "#/items", "anyOf", (size_t)i);
        const int call = call_node(&c, names[i], params[i], at);
        if (call < 0) first = -1;
        else c.g->alts[first + i] = (uint16_t)call;
    }
    return finish(&c, first < 0 ? -1 : arr);
}

JsonSchema *json_schema_ref(JsonSchema *s) {
    atomic_fetch_add(&s->refs, 1);
    return s;
}

void json_schema_unref(JsonSchema *s) {
    if (!s || atomic_fetch_sub(&s->refs, 1) != 1) return;
    free(s->nodes);
    free(s->props);
    free(s->lits);
    free(s->alts);
    free(s->text);
    free(s);
}
