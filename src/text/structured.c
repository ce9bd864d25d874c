/* structured.c — structured outputs (see structured.h): the vocabulary's bytes, a byte-level JSON
 * recogniser with the JSON-mode mask built on it, and the choice mask.
 *
 * Why byte-level: tokens cut JSON anywhere (`{"`, `":"`, `0.`), so a token is allowed exactly
 * when all its bytes are, fed in order from the current state. Most tokens fail on their first
 * byte outside strings, and inside a string a token without quotes, backslashes or control bytes
 * is allowed without being tried; still, trying the vocabulary takes ~1-1.6 ms (Qwen3, one Zen 4
 * core), as long as a GPU's whole decode step. So the JSON masks are cached per recogniser state,
 * shared by all requests of the vocabulary: JSON text revisits few states (inside a string, after
 * a value, ... at a given nesting), and a cached mask costs one pass over its bits. A choice
 * mask tries only the tokens that start with a byte some remaining choice continues with. */
#include "text/structured.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "io/config.h"

/* What the next byte may be. */
enum Lex {
    L_START,        /* before the top-level object: whitespace or '{' */
    L_VALUE,        /* a value (after ':' or an array's ',') */
    L_ARR_FIRST,    /* after '[': a value or ']' */
    L_KEY_FIRST,    /* after '{': a key or '}' */
    L_KEY,          /* after an object's ',': a key */
    L_COLON,        /* after a key */
    L_AFTER,        /* after a value inside a container: ',' or the closing bracket */
    L_STRING,       /* inside a string */
    L_ESCAPE,       /* after a backslash */
    L_UHEX,         /* in \uXXXX (sub: digits left) */
    L_NUMBER,       /* in a number (sub: enum Num) */
    L_LITERAL,      /* in true / false / null (lit, sub: next character) */
    L_DONE,         /* the top-level object is closed */
};

/* Where a number is: after '-', the leading 0, integer digits, '.', fraction digits, 'e',
 * the exponent's sign, exponent digits. */
enum Num { N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP };

static const char *const kLiterals[3] = {"true", "false", "null"};

void json_state_init(JsonState *s) { memset(s, 0, sizeof *s); }

bool json_state_complete(const JsonState *s) { return s->lex == L_DONE; }

static bool is_digit(uint8_t c) { return c >= '0' && c <= '9'; }

/* After a value; the fields of the finished token are cleared so that equal states compare equal
 * (the mask cache's key). */
static void value_done(JsonState *s) {
    s->lex = s->depth ? L_AFTER : L_DONE;
    s->key = s->sub = s->lit = 0;
}

static bool open_container(JsonState *s, uint8_t c) {
    if (s->depth == JSON_MAX_DEPTH) return false;
    s->stack[s->depth++] = c;
    s->lex = c == '{' ? L_KEY_FIRST : L_ARR_FIRST;
    return true;
}

static bool close_container(JsonState *s, uint8_t c) {
    if (!s->depth || s->stack[s->depth - 1] != (c == '}' ? '{' : '[')) return false;
    s->depth--;
    value_done(s);
    return true;
}

static bool begin_value(JsonState *s, uint8_t c) {
    if (c == '{' || c == '[') return open_container(s, c);
    if (c == '"') {
        s->lex = L_STRING, s->key = 0;
        return true;
    }
    if (c == '-' || is_digit(c)) {
        s->lex = L_NUMBER, s->sub = c == '-' ? N_MINUS : c == '0' ? N_ZERO : N_INT;
        return true;
    }
    for (uint8_t i = 0; i < 3; i++)
        if (c == (uint8_t)kLiterals[i][0]) {
            s->lex = L_LITERAL, s->lit = i, s->sub = 1;
            return true;
        }
    return false;
}

/* One byte of a number: true if it continues it; *ended when the number may end before c (c
 * then belongs to what follows). */
static bool number_byte(JsonState *s, uint8_t c, bool *ended) {
    const bool digit = is_digit(c), e = c == 'e' || c == 'E';
    *ended = false;
    switch (s->sub) {
    case N_MINUS: s->sub = c == '0' ? N_ZERO : N_INT; return digit;
    case N_ZERO:
        if (c == '.') return s->sub = N_DOT, true;
        if (e) return s->sub = N_E, true;
        break;
    case N_INT:
        if (digit) return true;
        if (c == '.') return s->sub = N_DOT, true;
        if (e) return s->sub = N_E, true;
        break;
    case N_DOT: s->sub = N_FRAC; return digit;
    case N_FRAC:
        if (digit) return true;
        if (e) return s->sub = N_E, true;
        break;
    case N_E:
        if (c == '+' || c == '-') return s->sub = N_ESIGN, true;
        s->sub = N_EXP;
        return digit;
    case N_ESIGN: s->sub = N_EXP; return digit;
    case N_EXP:
        if (digit) return true;
        break;
    }
    *ended = true;
    return false;
}

bool json_state_step(JsonState *s, uint8_t c) {
    switch (s->lex) {
    case L_STRING:
        if (c == '"') {
            if (s->key) s->lex = L_COLON, s->key = 0;
            else value_done(s);
        } else if (c == '\\') {
            s->lex = L_ESCAPE;
        }
        s->ws = 0;
        return c >= 0x20;
    case L_ESCAPE:
        if (c == 'u') return s->lex = L_UHEX, s->sub = 4, true;
        s->lex = L_STRING;
        return c && strchr("\"\\/bfnrt", c);
    case L_UHEX:
        if (!(is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'))) return false;
        if (--s->sub == 0) s->lex = L_STRING;
        return true;
    case L_NUMBER: {
        bool ended;
        if (number_byte(s, c, &ended)) return true;
        if (!ended) return false;
        value_done(s); /* then c as what follows the number */
        break;
    }
    case L_LITERAL: {
        const char *lit = kLiterals[s->lit];
        if (c != (uint8_t)lit[s->sub]) return false;
        if (!lit[++s->sub]) value_done(s);
        return true;
    }
    default: break;
    }
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') return ++s->ws <= JSON_MAX_WS;
    s->ws = 0;
    switch (s->lex) {
    case L_START: return c == '{' && open_container(s, c);
    case L_ARR_FIRST:
        if (c == ']') return close_container(s, c);
        return begin_value(s, c);
    case L_VALUE: return begin_value(s, c);
    case L_KEY_FIRST:
        if (c == '}') return close_container(s, c);
        /* fall through */
    case L_KEY:
        if (c != '"') return false;
        s->lex = L_STRING, s->key = 1;
        return true;
    case L_COLON:
        if (c != ':') return false;
        s->lex = L_VALUE;
        return true;
    case L_AFTER:
        if (c == ',') {
            s->lex = s->stack[s->depth - 1] == '{' ? L_KEY : L_VALUE;
            return true;
        }
        return (c == '}' || c == ']') && close_container(s, c);
    default: return false; /* L_DONE: only whitespace */
    }
}

/* ---- the vocabulary and the per-request constraint ------------------------------------------ */

enum { T_NEVER = 1, T_PLAIN = 2, T_END = 4 }; /* a token's class bits */

#define MASK_SLOTS 256 /* cached masks (direct-mapped by state hash), (vocab / 8) bytes each */

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
    pthread_mutex_t mu; /* the cache */
    JsonState keys[MASK_SLOTS];
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
    if (!v->bytes || !v->len || !v->cls || !v->masks) {
        struct_vocab_free(v);
        return NULL;
    }
    for (int id = 0; id < vocab; id++) {
        size_t n = 0;
        const char *b = id < tok_vocab_size(t) ? tok_token_bytes(t, id, &n) : NULL;
        if (!b || n == 0 || tok_is_special(t, id)) {
            v->cls[id] = T_NEVER;
            continue;
        }
        bool plain = true;
        for (size_t i = 0; i < n && plain; i++) plain = (uint8_t)b[i] >= 0x20 && b[i] != '"' && b[i] != '\\';
        v->bytes[id] = b, v->len[id] = (uint32_t)n, v->cls[id] = plain ? T_PLAIN : 0;
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

/* ---- JSON mode ---- */

typedef struct JsonMode {
    Constraint c;
    JsonState st;
} JsonMode;

/* Whether the token's bytes keep the text a JSON prefix (tried on a copy of state st). */
static bool token_fits(const StructVocab *v, const JsonState *st, int32_t id) {
    if (v->cls[id] & (T_NEVER | T_END)) return false;
    if (st->lex == L_STRING && v->cls[id] & T_PLAIN) return true;
    JsonState s = *st;
    const uint8_t *b = (const uint8_t *)v->bytes[id];
    for (uint32_t i = 0; i < v->len[id]; i++)
        if (!json_state_step(&s, b[i])) return false;
    return true;
}

/* Cache keys: the state's fields and its open containers (what lies past depth is stale). */
static bool same_state(const JsonState *a, const JsonState *b) {
    return a->lex == b->lex && a->key == b->key && a->sub == b->sub && a->lit == b->lit && a->ws == b->ws &&
           a->depth == b->depth && !memcmp(a->stack, b->stack, a->depth);
}

static uint32_t state_hash(const JsonState *s) {
    uint32_t h = 2166136261u;
    const uint8_t head[6] = {s->lex, s->key, s->sub, s->lit, s->ws, s->depth};
    for (int i = 0; i < 6; i++) h = (h ^ head[i]) * 16777619u;
    for (int i = 0; i < s->depth; i++) h = (h ^ s->stack[i]) * 16777619u;
    return h;
}

/* The mask of state st (bits of the ids whose bytes fit; ends are the caller's) into out, from
 * the cache or computed and cached. */
static void state_mask(StructVocab *v, const JsonState *st, uint64_t *out) {
    const uint32_t slot = state_hash(st) % MASK_SLOTS;
    uint64_t *cached = v->masks + (size_t)slot * v->words;
    pthread_mutex_lock(&v->mu);
    if (v->used[slot] && same_state(&v->keys[slot], st)) {
        memcpy(out, cached, (size_t)v->words * sizeof *out);
        pthread_mutex_unlock(&v->mu);
        return;
    }
    pthread_mutex_unlock(&v->mu);
    memset(out, 0, (size_t)v->words * sizeof *out);
    for (int id = 0; id < v->vocab; id++)
        if (token_fits(v, st, id)) out[id >> 6] |= 1ull << (id & 63);
    pthread_mutex_lock(&v->mu);
    memcpy(cached, out, (size_t)v->words * sizeof *out);
    v->keys[slot] = *st;
    v->used[slot] = true;
    pthread_mutex_unlock(&v->mu);
}

static void json_mode_mask(void *state, float *logits, int vocab) {
    JsonMode *m = state;
    if (m->c.wait_for >= 0) return;
    state_mask((StructVocab *)m->c.v, &m->st, m->c.bits);
    set_ends(&m->c, json_state_complete(&m->st));
    apply_bits(&m->c, logits, vocab);
}

static void json_mode_accept(void *state, int32_t token) {
    JsonMode *m = state;
    if (passes_by(&m->c, token)) return;
    const uint8_t *b = (const uint8_t *)m->c.v->bytes[token];
    for (uint32_t i = 0; i < m->c.v->len[token]; i++) json_state_step(&m->st, b[i]);
}

static void json_mode_free(void *state) {
    JsonMode *m = state;
    free(m->c.bits);
    free(m);
}

static OutputConstraint json_mode_constraint(const StructVocab *v, int32_t wait_for, const int32_t *stop_ids,
                                             int n_stop_ids) {
    JsonMode *m = calloc(1, sizeof *m);
    if (!m) return (OutputConstraint){0};
    json_state_init(&m->st);
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
    return json_mode_constraint(v, wait_for, stop_ids, n_stop_ids);
}
