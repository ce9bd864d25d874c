/* structured.c — structured outputs (see structured.h): the vocabulary's bytes, the JSON masks
 * (JSON schema and JSON mode) built on text/json_schema.h's recogniser, and the choice mask.
 *
 * Why byte-level: tokens cut JSON anywhere (`{"`, `":"`, `0.`), so a token is allowed exactly
 * when all its bytes are, fed in order from the current state. A JSON mask tries the first bytes
 * on the state once (256 steps) and then only the tokens that start with an allowed one; inside
 * a string without a length bound a token without quotes, backslashes, control bytes or broken
 * UTF-8 is allowed untried. Still, trying the vocabulary takes up to ~1.5 ms (Qwen3, one Zen 4
 * core), as long as a GPU's whole decode step. So JSON masks are cached by (schema hash,
 * recogniser state), shared by all requests of the vocabulary: JSON text revisits few states
 * (inside a string, after a value, ... at a given nesting), requests often share a schema, and a
 * cached mask costs one pass over its bits. A choice mask tries only the tokens that start with a
 * byte some remaining choice continues with. */
#include "text/structured.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "io/config.h"

/* ---- the vocabulary and the per-request constraint ------------------------------------------ */

enum { T_NEVER = 1, T_STRING = 2, T_END = 4 }; /* a token's class bits (T_STRING: continues any string) */

#define MASK_SLOTS 256 /* cached masks (direct-mapped by key hash), (vocab / 8) bytes each */

/* A cached mask's name: the schema's hash and the recogniser state's bytes. */
typedef struct MaskKey {
    uint64_t schema;
    int len;
    uint8_t state[JSON_MATCH_KEY_MAX];
} MaskKey;

struct StructVocab {
    int vocab;
    const char **bytes; /* [vocab], owned by the tokenizer */
    uint32_t *len;
    uint8_t *cls;
    int32_t think_end; /* `</think>`, or -1 */
    int32_t ends[2 * CONFIG_MAX_EOS]; /* the model's end-of-sequence ids (class T_END) */
    int n_ends;
    int32_t *by_first; /* ids with bytes, ordered by first byte: [first[b], first[b + 1]) start with b */
    uint32_t first[257];
    JsonSchema *any_object; /* JSON mode's */
    pthread_mutex_t mu;     /* the cache */
    MaskKey keys[MASK_SLOTS];
    bool used[MASK_SLOTS];
    uint64_t *masks; /* [MASK_SLOTS][words]: bit id set = the id fits (ends aside) */
    int words;
};

StructVocab *struct_vocab_new(const Tok *t, int vocab, const int32_t *eos_ids, int n_eos) {
    StructVocab *v = calloc(1, sizeof *v);
    if (!v) return NULL;
    v->vocab = vocab;
    v->words = (vocab + 63) / 64;
    pthread_mutex_init(&v->mu, NULL);
    v->bytes = calloc((size_t)vocab, sizeof *v->bytes);
    v->len = calloc((size_t)vocab, sizeof *v->len);
    v->cls = calloc((size_t)vocab, 1);
    v->masks = calloc((size_t)MASK_SLOTS * v->words, sizeof *v->masks);
    v->any_object = json_schema_any_object();
    if (!v->bytes || !v->len || !v->cls || !v->masks || !v->any_object) {
        struct_vocab_free(v);
        return NULL;
    }
    /* inside a string: a map key of JSON mode's schema, after `{"` */
    JsonMatch in_string;
    json_match_init(&in_string, v->any_object);
    json_match_step(&in_string, v->any_object, '{');
    json_match_step(&in_string, v->any_object, '"');
    for (int id = 0; id < vocab; id++) {
        size_t n = 0;
        const char *b = id < tok_vocab_size(t) ? tok_token_bytes(t, id, &n) : NULL;
        if (!b || n == 0 || tok_is_special(t, id)) {
            v->cls[id] = T_NEVER;
            continue;
        }
        JsonMatch m = in_string;
        bool string = true;
        for (size_t i = 0; i < n && string; i++) string = b[i] != '"' && json_match_step(&m, v->any_object, (uint8_t)b[i]);
        v->bytes[id] = b, v->len[id] = (uint32_t)n;
        v->cls[id] = string && json_match_in_free_string(&m, v->any_object) ? T_STRING : 0;
    }
    for (int i = 0; i < n_eos && v->n_ends < 2 * CONFIG_MAX_EOS; i++)
        if (eos_ids[i] >= 0 && eos_ids[i] < vocab) v->cls[eos_ids[i]] = T_END, v->ends[v->n_ends++] = eos_ids[i];
    /* a counting sort of the ids by first byte */
    if (!(v->by_first = malloc((size_t)vocab * sizeof *v->by_first))) {
        struct_vocab_free(v);
        return NULL;
    }
    for (int id = 0; id < vocab; id++)
        if (!(v->cls[id] & (T_NEVER | T_END))) v->first[(uint8_t)v->bytes[id][0] + 1]++;
    for (int b = 0; b < 256; b++) v->first[b + 1] += v->first[b];
    uint32_t fill[256];
    memcpy(fill, v->first, sizeof fill);
    for (int id = 0; id < vocab; id++)
        if (!(v->cls[id] & (T_NEVER | T_END))) v->by_first[fill[(uint8_t)v->bytes[id][0]]++] = id;
    v->think_end = tok_token_id(t, "</think>", 8);
    return v;
}

void struct_vocab_free(StructVocab *v) {
    if (!v) return;
    pthread_mutex_destroy(&v->mu);
    json_schema_unref(v->any_object);
    free(v->bytes);
    free(v->len);
    free(v->cls);
    free(v->masks);
    free(v->by_first);
    free(v);
}

/* What both constraints share: the vocabulary, the token to see before the form starts (-1:
 * none), the request's own stop ids, and the current mask as bits. */
typedef struct Constraint {
    const StructVocab *v;
    int32_t wait_for;
    int n_stop;
    int32_t stop[ENGINE_MAX_STOP_IDS];
    uint64_t *bits; /* [v->words]: bit id set = allowed */
} Constraint;

static bool constraint_init(Constraint *c, const StructVocab *v, int32_t wait_for, const int32_t *stop_ids,
                            int n_stop_ids) {
    c->v = v;
    c->wait_for = wait_for;
    for (int i = 0; i < n_stop_ids && i < ENGINE_MAX_STOP_IDS; i++) c->stop[c->n_stop++] = stop_ids[i];
    return (c->bits = malloc((size_t)v->words * sizeof *c->bits)) != NULL;
}

static void set_bit(uint64_t *bits, int32_t id, bool on) {
    bits[id >> 6] = (bits[id >> 6] & ~(1ull << (id & 63))) | (uint64_t)on << (id & 63);
}

/* The ends (the model's EOS ids and the request's stop ids) allowed exactly when complete. */
static void set_ends(Constraint *c, bool complete) {
    for (int i = 0; i < c->v->n_ends; i++) set_bit(c->bits, c->v->ends[i], complete);
    for (int i = 0; i < c->n_stop; i++)
        if (c->stop[i] < c->v->vocab) set_bit(c->bits, c->stop[i], complete);
}

/* logits of the ids c->bits leaves out (and of ids past the vocabulary) to -INFINITY. */
static void apply_bits(const Constraint *c, float *logits, int vocab) {
    const int n = vocab < c->v->vocab ? vocab : c->v->vocab;
    for (int w = 0; w * 64 < n; w++) {
        const uint64_t bits = c->bits[w];
        if (bits == ~0ull && w * 64 + 64 <= n) continue;
        for (int id = w * 64; id < w * 64 + 64 && id < n; id++)
            if (!(bits >> (id & 63) & 1)) logits[id] = -INFINITY;
    }
    for (int id = n; id < vocab; id++) logits[id] = -INFINITY;
}

/* Whether a chosen token leaves the form alone: one before it starts (the awaited one starts it),
 * an end or stop id, or one without bytes. Otherwise its bytes are the form's. */
static bool passes_by(Constraint *c, int32_t token) {
    if (c->wait_for >= 0) {
        if (token == c->wait_for) c->wait_for = -1;
        return true;
    }
    if (token < 0 || token >= c->v->vocab || c->v->cls[token] & (T_NEVER | T_END)) return true;
    for (int i = 0; i < c->n_stop; i++)
        if (c->stop[i] == token) return true;
    return false;
}

/* ---- JSON: a schema, or JSON mode's ---- */

typedef struct JsonMode {
    Constraint c;
    JsonSchema *schema; /* a reference */
    JsonMatch st;
} JsonMode;

static uint32_t key_hash(const MaskKey *k) {
    uint32_t h = 2166136261u ^ (uint32_t)k->schema ^ (uint32_t)(k->schema >> 32);
    for (int i = 0; i < k->len; i++) h = (h ^ k->state[i]) * 16777619u;
    return h;
}

/* Bits of the ids whose bytes continue the text from state st (ends are the caller's). */
static void compute_mask(const StructVocab *v, const JsonSchema *g, const JsonMatch *st, uint64_t *out) {
    memset(out, 0, (size_t)v->words * sizeof *out);
    const bool in_string = json_match_in_free_string(st, g);
    for (int b = 0; b < 256; b++) {
        if (v->first[b] == v->first[b + 1]) continue;
        JsonMatch after_first;
        json_match_copy(&after_first, st);
        if (!json_match_step(&after_first, g, (uint8_t)b)) continue;
        for (uint32_t k = v->first[b]; k < v->first[b + 1]; k++) {
            const int32_t id = v->by_first[k];
            bool fits = in_string && v->cls[id] & T_STRING;
            if (!fits) {
                JsonMatch m;
                json_match_copy(&m, &after_first);
                const uint8_t *bytes = (const uint8_t *)v->bytes[id];
                fits = true;
                for (uint32_t i = 1; i < v->len[id] && fits; i++) fits = json_match_step(&m, g, bytes[i]);
            }
            if (fits) out[id >> 6] |= 1ull << (id & 63);
        }
    }
}

/* The mask of state st into out, from the cache or computed and cached. */
static void state_mask(StructVocab *v, const JsonSchema *g, const JsonMatch *st, uint64_t *out) {
    MaskKey key = {.schema = g->hash};
    key.len = json_match_key(st, key.state);
    const uint32_t slot = key_hash(&key) % MASK_SLOTS;
    uint64_t *cached = v->masks + (size_t)slot * v->words;
    const MaskKey *k = &v->keys[slot];
    pthread_mutex_lock(&v->mu);
    if (v->used[slot] && k->schema == key.schema && k->len == key.len && !memcmp(k->state, key.state, (size_t)key.len)) {
        memcpy(out, cached, (size_t)v->words * sizeof *out);
        pthread_mutex_unlock(&v->mu);
        return;
    }
    pthread_mutex_unlock(&v->mu);
    compute_mask(v, g, st, out);
    pthread_mutex_lock(&v->mu);
    memcpy(cached, out, (size_t)v->words * sizeof *out);
    v->keys[slot] = key;
    v->used[slot] = true;
    pthread_mutex_unlock(&v->mu);
}

static void json_mode_mask(void *state, float *logits, int vocab) {
    JsonMode *m = state;
    if (m->c.wait_for >= 0) return;
    state_mask((StructVocab *)m->c.v, m->schema, &m->st, m->c.bits);
    set_ends(&m->c, json_match_complete(&m->st, m->schema));
    apply_bits(&m->c, logits, vocab);
}

static void json_mode_accept(void *state, int32_t token) {
    JsonMode *m = state;
    if (passes_by(&m->c, token)) return;
    const uint8_t *b = (const uint8_t *)m->c.v->bytes[token];
    for (uint32_t i = 0; i < m->c.v->len[token]; i++) json_match_step(&m->st, m->schema, b[i]);
}

static void json_mode_free(void *state) {
    JsonMode *m = state;
    json_schema_unref(m->schema);
    free(m->c.bits);
    free(m);
}

static OutputConstraint json_mode_constraint(const StructVocab *v, JsonSchema *schema, int32_t wait_for,
                                             const int32_t *stop_ids, int n_stop_ids) {
    JsonMode *m = calloc(1, sizeof *m);
    if (!m) return (OutputConstraint){0};
    m->schema = json_schema_ref(schema);
    json_match_init(&m->st, schema);
    if (!constraint_init(&m->c, v, wait_for, stop_ids, n_stop_ids)) {
        json_mode_free(m);
        return (OutputConstraint){0};
    }
    return (OutputConstraint){.state = m, .mask = json_mode_mask, .accept = json_mode_accept, .free = json_mode_free};
}

/* ---- choice ---- */

typedef struct ChoiceMode {
    Constraint c;
    size_t pos;    /* bytes of the answer so far */
    int n;         /* choices */
    char **choice; /* owned copies */
    size_t *len;
    bool *alive;   /* the answer so far is a prefix of choice i */
} ChoiceMode;

/* Whether token id's bytes continue the answer along some living choice. */
static bool choice_fits(const ChoiceMode *m, int32_t id) {
    const char *b = m->c.v->bytes[id];
    const size_t n = m->c.v->len[id];
    for (int i = 0; i < m->n; i++)
        if (m->alive[i] && m->pos + n <= m->len[i] && !memcmp(m->choice[i] + m->pos, b, n)) return true;
    return false;
}

/* Tries only the tokens that start with a byte some living choice continues with. */
static void choice_mask(void *state, float *logits, int vocab) {
    ChoiceMode *m = state;
    if (m->c.wait_for >= 0) return;
    const StructVocab *v = m->c.v;
    memset(m->c.bits, 0, (size_t)v->words * sizeof *m->c.bits);
    bool tried[256] = {false}, complete = false;
    for (int i = 0; i < m->n; i++) {
        if (!m->alive[i]) continue;
        complete = complete || m->pos == m->len[i];
        const uint8_t b = m->pos < m->len[i] ? (uint8_t)m->choice[i][m->pos] : 0;
        if (m->pos == m->len[i] || tried[b]) continue;
        tried[b] = true;
        for (uint32_t k = v->first[b]; k < v->first[b + 1]; k++)
            if (choice_fits(m, v->by_first[k])) set_bit(m->c.bits, v->by_first[k], true);
    }
    set_ends(&m->c, complete);
    apply_bits(&m->c, logits, vocab);
}

static void choice_accept(void *state, int32_t token) {
    ChoiceMode *m = state;
    if (passes_by(&m->c, token)) return;
    const char *b = m->c.v->bytes[token];
    const size_t n = m->c.v->len[token];
    for (int i = 0; i < m->n; i++)
        m->alive[i] = m->alive[i] && m->pos + n <= m->len[i] && !memcmp(m->choice[i] + m->pos, b, n);
    m->pos += n;
}

static void choice_free(void *state) {
    ChoiceMode *m = state;
    for (int i = 0; i < m->n; i++) free(m->choice[i]);
    free(m->choice);
    free(m->len);
    free(m->alive);
    free(m->c.bits);
    free(m);
}

static OutputConstraint choice_constraint(const StructVocab *v, const OutputFormat *f, int32_t wait_for,
                                          const int32_t *stop_ids, int n_stop_ids) {
    ChoiceMode *m = calloc(1, sizeof *m);
    if (!m) return (OutputConstraint){0};
    m->choice = calloc((size_t)f->n_choices, sizeof *m->choice);
    m->len = calloc((size_t)f->n_choices, sizeof *m->len);
    m->alive = calloc((size_t)f->n_choices, sizeof *m->alive);
    bool ok = constraint_init(&m->c, v, wait_for, stop_ids, n_stop_ids) && m->choice && m->len && m->alive;
    for (int i = 0; ok && i < f->n_choices; i++, m->n++) {
        ok = (m->choice[i] = strdup(f->choices[i])) != NULL;
        m->len[i] = ok ? strlen(m->choice[i]) : 0;
        m->alive[i] = true;
    }
    if (!ok) {
        choice_free(m);
        return (OutputConstraint){0};
    }
    return (OutputConstraint){.state = m, .mask = choice_mask, .accept = choice_accept, .free = choice_free};
}

OutputConstraint output_constraint(const StructVocab *v, const OutputFormat *f, bool think_first, const int32_t *stop_ids,
                                   int n_stop_ids) {
    const int32_t wait_for = think_first ? v->think_end : -1;
    if (f->kind == OUTPUT_CHOICE) return choice_constraint(v, f, wait_for, stop_ids, n_stop_ids);
    JsonSchema *schema = f->kind == OUTPUT_JSON_SCHEMA ? f->schema : v->any_object;
    return json_mode_constraint(v, schema, wait_for, stop_ids, n_stop_ids);
}
