/* json_match.c — the recogniser of json_schema.h: RFC 8259 JSON read byte by byte while walking
 * a compiled schema, so that the text stays a prefix of a valid value.
 *
 * Containers are frames on a fixed stack; the scalar, key or punctuation in progress lives in
 * the few fields before it, cleared when done so that equal situations are equal states (the
 * mask cache's key). What makes the walk exact (every state it keeps can still be completed): a
 * value starts only when its shallowest valid form fits under JSON_MAX_DEPTH (the compiler's
 * min_depth), an anyOf takes the one alternative its first byte allows (a union of objects, the
 * one its tag names, once the tag is read), keys and literals are matched against the candidates
 * still possible, and counts saturate where their bounds stop
 * mattering. Strings are checked to be valid UTF-8 and written without \u surrogate escapes
 * (any character can be written as itself), so code points are counted exactly. */
#include <stddef.h>
#include <string.h>

#include "text/json_schema.h"

/* What the next byte may be. */
enum Lex {
    L_VALUE,     /* a value of node (at the start, after ':', after an array's ',') */
    L_OBJ_FIRST, /* after '{': a key or '}' */
    L_KEY_NEXT,  /* after an object's ',': a key */
    L_KEY,       /* in a listed property's key (lit: the property, pos: bytes read) */
    L_COLON,     /* after a key: ':' (node: the value's) */
    L_ARR_FIRST, /* after '[': an item or ']' */
    L_AFTER,     /* after a value inside a container: ',' or the closing bracket */
    L_STRING,    /* inside a string (sub: UTF-8 continuation state) */
    L_ESCAPE,    /* after a backslash */
    L_UHEX,      /* in \uXXXX (sub: digits left, NO_SURROGATE while the second must be 0-7) */
    L_NUMBER,    /* in a number (sub: enum Num) */
    L_LITERAL,   /* in an enum / const / true / false / null text (lit, pos) */
    L_DONE,      /* the value is whole */
};

/* Where a number is: after '-', the leading 0, integer digits, '.', fraction digits, 'e',
 * the exponent's sign, exponent digits. */
enum Num { N_MINUS, N_ZERO, N_INT, N_DOT, N_FRAC, N_E, N_ESIGN, N_EXP };

#define NO_SURROGATE 0x10 /* L_UHEX: the first digit was 'd' */

static bool is_digit(uint8_t c) { return c >= '0' && c <= '9'; }
static bool is_hex(uint8_t c) { return is_digit(c) || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F'); }

static bool starts_with(const SchemaNode *n, uint8_t c) { return n->starts[c >> 6] >> (c & 63) & 1; }

/* Whether a value of node can start at this depth and still end within JSON_MAX_DEPTH. */
static bool fits(const JsonSchema *g, uint16_t node, int depth) { return depth + g->nodes[node].min_depth <= JSON_MAX_DEPTH; }

static JsonFrame *top(JsonMatch *m) { return &m->stack[m->depth - 1]; }

/* n + 1, but no more than cap: past its bounds a count no longer matters. */
static uint16_t bump(uint16_t n, uint16_t cap) { return n < cap ? (uint16_t)(n + 1) : cap; }
static uint16_t count_cap(const SchemaNode *n) { return n->max < SCHEMA_MAX ? n->max : n->min; }

void json_match_init(JsonMatch *m, const JsonSchema *s) {
    memset(m, 0, sizeof *m);
    m->lex = L_VALUE;
    m->node = s->root;
}

void json_match_copy(JsonMatch *dst, const JsonMatch *src) {
    memcpy(dst, src, offsetof(JsonMatch, stack) + src->depth * sizeof(JsonFrame));
}

static void value_done(JsonMatch *m) {
    m->lex = m->depth ? L_AFTER : L_DONE;
    m->node = m->lit = m->pos = m->count = 0;
    m->sub = m->key = 0;
}

/* One byte of a number: true if it continues it; *ended when the number may end before c (c
 * then belongs to what follows). An integer has no fraction or exponent. */
static bool number_byte(JsonMatch *m, bool integer, uint8_t c, bool *ended) {
    const bool digit = is_digit(c), e = c == 'e' || c == 'E';
    *ended = false;
    if (integer && (c == '.' || e)) return false;
    switch (m->sub) {
    case N_MINUS: m->sub = c == '0' ? N_ZERO : N_INT; return digit;
    case N_ZERO:
        if (c == '.') return m->sub = N_DOT, true;
        if (e) return m->sub = N_E, true;
        break;
    case N_INT:
        if (digit) return true;
        if (c == '.') return m->sub = N_DOT, true;
        if (e) return m->sub = N_E, true;
        break;
    case N_DOT: m->sub = N_FRAC; return digit;
    case N_FRAC:
        if (digit) return true;
        if (e) return m->sub = N_E, true;
        break;
    case N_E:
        if (c == '+' || c == '-') return m->sub = N_ESIGN, true;
        m->sub = N_EXP;
        return digit;
    case N_ESIGN: m->sub = N_EXP; return digit;
    case N_EXP:
        if (digit) return true;
        break;
    }
    *ended = true;
    return false;
}

/* One byte of a literal (the candidates are the node's literals from lit on that share its
 * first pos bytes: a run, as they are sorted): 1 when c continues one; 0 when none does but the
 * text so far is whole (c belongs to what follows: only numbers, as 1 before 12, can be
 * extended); -1 otherwise. */
static int literal_byte(const JsonSchema *g, JsonMatch *m, uint8_t c) {
    const SchemaNode *n = &g->nodes[m->node];
    const SchemaText *lits = g->lits + n->first, cur = lits[m->lit];
    for (uint32_t j = m->lit; j < n->count; j++) {
        const SchemaText t = lits[j];
        if (t.len < m->pos || memcmp(g->text + t.off, g->text + cur.off, m->pos)) break;
        if (t.len == m->pos || (uint8_t)g->text[t.off + m->pos] != c) continue;
        m->lit = (uint16_t)j, m->pos++;
        const SchemaText next = j + 1 < n->count ? lits[j + 1] : (SchemaText){0, 0};
        const bool extended = next.len > m->pos && !memcmp(g->text + next.off, g->text + t.off, m->pos);
        if (t.len == m->pos && !extended) {
            const SchemaNode *u = m->depth ? &g->nodes[top(m)->node] : NULL;
            if (u && u->kind == SK_UNION) /* the tag: its object goes on after it */
                *top(m) = (JsonFrame){g->alts[u->objects + j], 1};
            value_done(m);
        }
        return 1;
    }
    return cur.len == m->pos ? 0 : -1;
}

/* The listed properties that may come next in the object on top: [index, limit), limit just
 * past the first required one. */
static uint32_t key_limit(const JsonSchema *g, const JsonFrame *f) {
    const SchemaNode *n = &g->nodes[f->node];
    for (uint32_t k = f->index; k < n->count; k++)
        if (g->props[n->first + k].required) return k + 1;
    return n->count;
}

/* One byte of a listed key: some property that may come next, whose value fits, has a key that
 * continues with c (m->lit: the first such; at the closing quote the value comes next). */
static bool key_byte(const JsonSchema *g, JsonMatch *m, uint8_t c) {
    JsonFrame *f = top(m);
    const SchemaNode *n = &g->nodes[f->node];
    const SchemaText cur = g->props[n->first + m->lit].key;
    const uint32_t limit = key_limit(g, f);
    for (uint32_t k = m->lit; k < limit; k++) {
        const SchemaProp *p = &g->props[n->first + k];
        if (p->key.len <= m->pos || (uint8_t)g->text[p->key.off + m->pos] != c ||
            memcmp(g->text + p->key.off, g->text + cur.off, m->pos) || !fits(g, p->node, m->depth))
            continue;
        m->lit = (uint16_t)k, m->pos++;
        if (m->pos == p->key.len) { /* keys are whole JSON strings: none is a prefix of another */
            f->index = (uint16_t)(k + 1);
            m->lex = L_COLON, m->node = p->node, m->lit = m->pos = 0;
        }
        return true;
    }
    return false;
}

static bool key_can_come(const JsonSchema *g, JsonMatch *m) {
    const JsonFrame *f = top(m);
    const SchemaNode *n = &g->nodes[f->node];
    for (uint32_t k = f->index, limit = key_limit(g, f); k < limit; k++)
        if (fits(g, g->props[n->first + k].node, m->depth)) return true;
    return false;
}

static bool begin_key(const JsonSchema *g, JsonMatch *m, uint8_t c) {
    if (c != '"') return false;
    const JsonFrame *f = top(m);
    if (g->nodes[f->node].kind == SK_MAP) {
        m->lex = L_STRING, m->key = 1, m->node = 0, m->count = 0;
        return true;
    }
    m->lex = L_KEY, m->lit = f->index, m->pos = 0;
    return f->index < g->nodes[f->node].count && key_byte(g, m, c);
}

/* The node a value of node starting with c is read as: node itself, or the anyOf alternative
 * that starts with c; -1 when none. */
static int pick(const JsonSchema *g, uint16_t node, uint8_t c) {
    const SchemaNode *n = &g->nodes[node];
    if (n->kind != SK_ANY_OF) return starts_with(n, c) ? node : -1;
    for (uint32_t k = 0; k < n->count; k++)
        if (starts_with(&g->nodes[g->alts[n->first + k]], c)) return g->alts[n->first + k];
    return -1;
}

static bool begin_value(const JsonSchema *g, JsonMatch *m, uint16_t node, uint8_t c) {
    const int id = pick(g, node, c);
    if (id < 0 || !fits(g, (uint16_t)id, m->depth)) return false;
    const SchemaNode *n = &g->nodes[id];
    switch (n->kind) {
    case SK_OBJECT:
    case SK_MAP:
    case SK_UNION:
    case SK_ARRAY: /* fits: depth + min_depth (>= 1) <= JSON_MAX_DEPTH */
        m->stack[m->depth++] = (JsonFrame){(uint16_t)id, 0};
        m->lex = n->kind == SK_ARRAY ? L_ARR_FIRST : L_OBJ_FIRST;
        m->node = 0;
        return true;
    case SK_STRING: m->lex = L_STRING, m->node = (uint16_t)id, m->count = 0, m->key = 0; return true;
    case SK_NUMBER:
    case SK_INTEGER:
        m->lex = L_NUMBER, m->node = (uint16_t)id;
        m->sub = c == '-' ? N_MINUS : c == '0' ? N_ZERO : N_INT;
        return true;
    default: /* literals */
        m->lex = L_LITERAL, m->node = (uint16_t)id, m->lit = 0, m->pos = 0;
        return literal_byte(g, m, c) > 0;
    }
}

static bool close_container(const JsonSchema *g, JsonMatch *m, uint8_t c) {
    const JsonFrame *f = top(m);
    const SchemaNode *n = &g->nodes[f->node];
    if (c == '}' ? n->kind == SK_ARRAY || ((n->kind == SK_OBJECT || n->kind == SK_UNION) && f->index < n->need)
                 : n->kind != SK_ARRAY || f->index < n->min)
        return false;
    m->depth--;
    value_done(m);
    return true;
}

/* An item of the array on top begins with c (first: right after '['; else after ','). */
static bool begin_item(const JsonSchema *g, JsonMatch *m, uint8_t c, bool first) {
    JsonFrame *f = top(m);
    const SchemaNode *n = &g->nodes[f->node];
    if (f->index >= n->max || !fits(g, n->item, m->depth)) return false;
    f->index = bump(f->index, count_cap(n));
    if (first) return begin_value(g, m, n->item, c);
    m->lex = L_VALUE, m->node = n->item;
    return true;
}

static bool after_value(const JsonSchema *g, JsonMatch *m, uint8_t c) {
    if (c == '}' || c == ']') return close_container(g, m, c);
    if (c != ',') return false;
    const SchemaNode *n = &g->nodes[top(m)->node];
    if (n->kind == SK_ARRAY) return begin_item(g, m, c, false);
    if (n->kind == SK_OBJECT && !key_can_come(g, m)) return false;
    m->lex = L_KEY_NEXT;
    return true;
}

/* The continuation bytes' ranges after a UTF-8 lead byte (RFC 3629: no overlongs, no
 * surrogates, nothing past U+10FFFF): sub = bytes left | range << 2. */
static const uint8_t kContLo[5] = {0x80, 0xa0, 0x80, 0x90, 0x80}, kContHi[5] = {0xbf, 0xbf, 0x9f, 0xbf, 0x8f};

static uint8_t utf8_lead(uint8_t c) {
    if (c >= 0xc2 && c <= 0xdf) return 1;
    if (c == 0xe0) return 2 | 1 << 2;
    if (c == 0xed) return 2 | 2 << 2;
    if (c >= 0xe1 && c <= 0xef) return 2;
    if (c == 0xf0) return 3 | 3 << 2;
    if (c >= 0xf1 && c <= 0xf3) return 3;
    if (c == 0xf4) return 3 | 4 << 2;
    return 0;
}

static bool string_byte(const JsonSchema *g, JsonMatch *m, uint8_t c) {
    if (m->sub) { /* inside a UTF-8 sequence */
        const int range = m->sub >> 2, left = m->sub & 3;
        if (c < kContLo[range] || c > kContHi[range]) return false;
        m->sub = (uint8_t)(left - 1);
        return true;
    }
    const SchemaNode *n = m->key ? NULL : &g->nodes[m->node];
    const uint16_t min = n ? n->min : 0, max = n ? n->max : SCHEMA_MAX;
    if (c == '"') {
        if (m->count < min) return false;
        if (m->key) {
            m->lex = L_COLON, m->node = g->nodes[top(m)->node].item, m->key = 0, m->count = 0;
            return true;
        }
        value_done(m);
        return true;
    }
    if (c < 0x20 || m->count >= max) return false;
    if (c == '\\') {
        m->lex = L_ESCAPE;
    } else if (c >= 0x80) {
        if (!(m->sub = utf8_lead(c))) return false;
    }
    if (n) m->count = bump(m->count, count_cap(n));
    return true;
}

bool json_match_step(JsonMatch *m, const JsonSchema *g, uint8_t c) {
    switch (m->lex) {
    case L_STRING: return string_byte(g, m, c);
    case L_ESCAPE:
        if (c == 'u') return m->lex = L_UHEX, m->sub = 4, true;
        m->lex = L_STRING;
        return c && strchr("\"\\/bfnrt", c);
    case L_UHEX:
        if (!is_hex(c)) return false;
        if (m->sub == 4 && (c == 'd' || c == 'D')) return m->sub = NO_SURROGATE | 3, true;
        if (m->sub & NO_SURROGATE) {
            if (c >= '8') return false;
            m->sub = 2;
            return true;
        }
        if (--m->sub == 0) m->lex = L_STRING;
        return true;
    case L_KEY: return key_byte(g, m, c);
    case L_NUMBER: {
        bool ended;
        if (number_byte(m, g->nodes[m->node].kind == SK_INTEGER, c, &ended)) return true;
        if (!ended) return false;
        value_done(m); /* then c as what follows the number */
        break;
    }
    case L_LITERAL: {
        const int r = literal_byte(g, m, c);
        if (r) return r > 0;
        value_done(m);
        break;
    }
    default: break;
    }
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r') return ++m->ws <= JSON_MAX_WS;
    m->ws = 0;
    switch (m->lex) {
    case L_VALUE: return begin_value(g, m, m->node, c);
    case L_OBJ_FIRST:
        if (c == '}') return close_container(g, m, c);
        return begin_key(g, m, c);
    case L_KEY_NEXT: return begin_key(g, m, c);
    case L_COLON:
        if (c != ':') return false;
        m->lex = L_VALUE;
        return true;
    case L_ARR_FIRST:
        if (c == ']') return close_container(g, m, c);
        return begin_item(g, m, c, true);
    case L_AFTER: return after_value(g, m, c);
    default: return false; /* L_DONE: only whitespace */
    }
}

bool json_match_complete(const JsonMatch *m, const JsonSchema *g) {
    if (m->lex == L_DONE) return true;
    if (m->depth) return false;
    if (m->lex == L_NUMBER) return m->sub == N_ZERO || m->sub == N_INT || m->sub == N_FRAC || m->sub == N_EXP;
    return m->lex == L_LITERAL && g->lits[g->nodes[m->node].first + m->lit].len == m->pos;
}

bool json_match_in_free_string(const JsonMatch *m, const JsonSchema *g) {
    return m->lex == L_STRING && !m->sub && (m->key || g->nodes[m->node].max == SCHEMA_MAX);
}

int json_match_key(const JsonMatch *m, uint8_t *out) {
    const uint16_t h[4] = {m->node, m->lit, m->pos, m->count};
    int n = 0;
    for (int i = 0; i < 4; i++) out[n++] = (uint8_t)h[i], out[n++] = (uint8_t)(h[i] >> 8);
    out[n++] = m->lex, out[n++] = m->sub, out[n++] = m->ws, out[n++] = m->key, out[n++] = m->depth;
    for (int i = 0; i < m->depth; i++) {
        const JsonFrame f = m->stack[i];
        out[n++] = (uint8_t)f.node, out[n++] = (uint8_t)(f.node >> 8);
        out[n++] = (uint8_t)f.index, out[n++] = (uint8_t)(f.index >> 8);
    }
    return n;
}
