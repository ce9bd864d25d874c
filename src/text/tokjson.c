/* tokjson.c — one-pass JSON parser into an arena; see tokjson.h for why it exists.
 *
 * Values are parsed recursively onto a growable stack; when a container closes, its children are
 * copied from the stack into one arena array. Strings are unescaped in place inside the file
 * buffer (an unescaped string is never longer than its source), so a string costs no
 * allocation. Numbers with only integer digits skip strtod. */
#include "text/tokjson.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#define TJ_MAX_DEPTH 512
#define TJ_BLOCK (1u << 20)

typedef struct Block {
    struct Block *next;
    size_t used, cap;
    _Alignas(16) unsigned char data[];
} Block;

struct TjDoc {
    char *buf;     /* the file's bytes, strings point into it */
    Block *blocks; /* arena holding every container's children */
    TjVal root;
};

typedef struct Parser {
    TjDoc *doc;
    const char *name;
    char *start, *p, *end;
    TjVal *stack;
    size_t top, cap;
    int depth;
    QErr *err;
} Parser;

static void *arena_alloc(TjDoc *d, size_t size) {
    size = (size + 15) & ~(size_t)15;
    Block *b = d->blocks;
    if (!b || b->cap - b->used < size) {
        size_t cap = size > TJ_BLOCK ? size : TJ_BLOCK;
        b = malloc(sizeof *b + cap);
        if (!b) return NULL;
        b->next = d->blocks;
        b->used = 0;
        b->cap = cap;
        d->blocks = b;
    }
    void *p = b->data + b->used;
    b->used += size;
    return p;
}

static int fail(Parser *P, const char *msg) {
    int line = 1, col = 1;
    for (const char *q = P->start; q < P->p && q < P->end; q++) {
        if (*q == '\n') {
            line++;
            col = 1;
        } else {
            col++;
        }
    }
    return qerr_set(P->err, "%s: line %d, column %d: %s", P->name, line, col, msg);
}

static int push(Parser *P, const TjVal *v) {
    if (P->top == P->cap) {
        size_t cap = P->cap ? P->cap * 2 : 1024;
        TjVal *s = realloc(P->stack, cap * sizeof *s);
        if (!s) return qerr_set(P->err, "%s: out of memory", P->name);
        P->stack = s;
        P->cap = cap;
    }
    P->stack[P->top++] = *v;
    return 0;
}

static void skip_ws(Parser *P) {
    while (P->p < P->end && (*P->p == ' ' || *P->p == '\n' || *P->p == '\r' || *P->p == '\t'))
        P->p++;
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int read_hex4(Parser *P, const char *s, unsigned *out) {
    if (P->end - s < 4) return -1;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval((unsigned char)s[i]);
        if (h < 0) return -1;
        v = v << 4 | (unsigned)h;
    }
    *out = v;
    return 0;
}

static char *put_utf8(char *d, unsigned cp) {
    if (cp < 0x80) {
        *d++ = (char)cp;
    } else if (cp < 0x800) {
        *d++ = (char)(0xC0 | cp >> 6);
        *d++ = (char)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *d++ = (char)(0xE0 | cp >> 12);
        *d++ = (char)(0x80 | (cp >> 6 & 0x3F));
        *d++ = (char)(0x80 | (cp & 0x3F));
    } else {
        *d++ = (char)(0xF0 | cp >> 18);
        *d++ = (char)(0x80 | (cp >> 12 & 0x3F));
        *d++ = (char)(0x80 | (cp >> 6 & 0x3F));
        *d++ = (char)(0x80 | (cp & 0x3F));
    }
    return d;
}

/* P->p is at the opening quote. Unescapes in place; on success P->p is past the closing quote. */
static int parse_string(Parser *P, TjVal *v) {
    char *s = ++P->p, *d = s;
    for (;;) {
        if (P->p >= P->end) return fail(P, "unterminated string");
        unsigned char c = (unsigned char)*P->p;
        if (c == '"') break;
        if (c < 0x20) return fail(P, "control character in string");
        if (c != '\\') {
            *d++ = (char)c;
            P->p++;
            continue;
        }
        if (P->end - P->p < 2) return fail(P, "unterminated string");
        char e = P->p[1];
        P->p += 2;
        switch (e) {
        case '"': *d++ = '"'; break;
        case '\\': *d++ = '\\'; break;
        case '/': *d++ = '/'; break;
        case 'b': *d++ = '\b'; break;
        case 'f': *d++ = '\f'; break;
        case 'n': *d++ = '\n'; break;
        case 'r': *d++ = '\r'; break;
        case 't': *d++ = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (read_hex4(P, P->p, &cp)) return fail(P, "bad \\u escape");
            P->p += 4;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return fail(P, "lone low surrogate in \\u escape");
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (P->end - P->p < 6 || P->p[0] != '\\' || P->p[1] != 'u' ||
                    read_hex4(P, P->p + 2, &lo) || lo < 0xDC00 || lo > 0xDFFF)
                    return fail(P, "high surrogate not followed by a low surrogate");
                P->p += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            d = put_utf8(d, cp); /* at most as long as the escape it replaces */
            break;
        }
        default: P->p -= 1; return fail(P, "bad escape in string");
        }
    }
    P->p++; /* closing quote; d <= its position, so the NUL below stays inside the string */
    *d = '\0';
    if ((size_t)(d - s) > UINT32_MAX) return fail(P, "string too long");
    v->type = TJ_STR;
    v->n = (uint32_t)(d - s);
    v->u.str = s;
    return 0;
}

static int is_digit(int c) { return c >= '0' && c <= '9'; }

static int parse_number(Parser *P, TjVal *v) {
    char *s = P->p, *q = s;
    int neg = 0, simple = 1;
    if (q < P->end && *q == '-') {
        neg = 1;
        q++;
    }
    if (q >= P->end || !is_digit(*q)) return fail(P, "bad number");
    if (*q == '0') {
        q++;
    } else {
        while (q < P->end && is_digit(*q)) q++;
    }
    const char *int_end = q;
    if (q < P->end && *q == '.') {
        simple = 0;
        q++;
        if (q >= P->end || !is_digit(*q)) return fail(P, "bad number");
        while (q < P->end && is_digit(*q)) q++;
    }
    if (q < P->end && (*q == 'e' || *q == 'E')) {
        simple = 0;
        q++;
        if (q < P->end && (*q == '+' || *q == '-')) q++;
        if (q >= P->end || !is_digit(*q)) return fail(P, "bad number");
        while (q < P->end && is_digit(*q)) q++;
    }
    const char *digits = s + neg;
    v->type = TJ_NUM;
    if (simple && int_end - digits <= 15) {
        int64_t x = 0;
        for (const char *c = digits; c < int_end; c++) x = x * 10 + (*c - '0');
        v->u.num = (double)(neg ? -x : x);
    } else {
        /* The grammar above was checked, and the buffer is NUL-terminated, so strtod stops at
         * the same place. */
        v->u.num = strtod(s, NULL);
    }
    P->p = q;
    return 0;
}

static int parse_value(Parser *P);

static int close_container(Parser *P, size_t base, TjType type) {
    size_t count = P->top - base;
    TjVal v = {.type = type};
    if (count) {
        v.u.items = arena_alloc(P->doc, count * sizeof(TjVal));
        if (!v.u.items) return qerr_set(P->err, "%s: out of memory", P->name);
        memcpy(v.u.items, P->stack + base, count * sizeof(TjVal));
    }
    if (count > UINT32_MAX) return fail(P, "container too large");
    v.n = (uint32_t)(type == TJ_OBJ ? count / 2 : count);
    P->top = base;
    P->depth--;
    return push(P, &v);
}

static int parse_array(Parser *P) {
    if (++P->depth > TJ_MAX_DEPTH) return fail(P, "nesting too deep");
    size_t base = P->top;
    P->p++;
    skip_ws(P);
    if (P->p < P->end && *P->p == ']') {
        P->p++;
        return close_container(P, base, TJ_ARR);
    }
    for (;;) {
        if (parse_value(P)) return -1;
        skip_ws(P);
        if (P->p >= P->end) return fail(P, "unterminated array");
        if (*P->p == ',') {
            P->p++;
            continue;
        }
        if (*P->p == ']') {
            P->p++;
            return close_container(P, base, TJ_ARR);
        }
        return fail(P, "expected ',' or ']'");
    }
}

static int parse_object(Parser *P) {
    if (++P->depth > TJ_MAX_DEPTH) return fail(P, "nesting too deep");
    size_t base = P->top;
    P->p++;
    skip_ws(P);
    if (P->p < P->end && *P->p == '}') {
        P->p++;
        return close_container(P, base, TJ_OBJ);
    }
    for (;;) {
        skip_ws(P);
        if (P->p >= P->end || *P->p != '"') return fail(P, "expected a string key");
        TjVal key;
        if (parse_string(P, &key) || push(P, &key)) return -1;
        skip_ws(P);
        if (P->p >= P->end || *P->p != ':') return fail(P, "expected ':'");
        P->p++;
        if (parse_value(P)) return -1;
        skip_ws(P);
        if (P->p >= P->end) return fail(P, "unterminated object");
        if (*P->p == ',') {
            P->p++;
            continue;
        }
        if (*P->p == '}') {
            P->p++;
            return close_container(P, base, TJ_OBJ);
        }
        return fail(P, "expected ',' or '}'");
    }
}

static int literal(Parser *P, const char *word, TjVal *v) {
    size_t n = strlen(word);
    if ((size_t)(P->end - P->p) < n || memcmp(P->p, word, n)) return fail(P, "unexpected character");
    P->p += n;
    return push(P, v);
}

static int parse_value(Parser *P) {
    skip_ws(P);
    if (P->p >= P->end) return fail(P, "unexpected end of input");
    TjVal v = {.type = TJ_NULL};
    switch (*P->p) {
    case '{': return parse_object(P);
    case '[': return parse_array(P);
    case '"':
        if (parse_string(P, &v)) return -1;
        return push(P, &v);
    case 't': v.type = TJ_BOOL; v.u.b = 1; return literal(P, "true", &v);
    case 'f': v.type = TJ_BOOL; v.u.b = 0; return literal(P, "false", &v);
    case 'n': return literal(P, "null", &v);
    default:
        if (*P->p == '-' || is_digit(*P->p)) {
            if (parse_number(P, &v)) return -1;
            return push(P, &v);
        }
        return fail(P, "unexpected character");
    }
}

/* Takes ownership of buf (len bytes plus a NUL at buf[len]). */
static TjDoc *parse_owned(char *buf, size_t len, const char *name, QErr *err) {
    TjDoc *doc = calloc(1, sizeof *doc);
    if (!doc) {
        free(buf);
        qerr_set(err, "%s: out of memory", name);
        return NULL;
    }
    doc->buf = buf;
    Parser P = {.doc = doc, .name = name, .start = buf, .p = buf, .end = buf + len, .err = err};
    int rc = parse_value(&P);
    if (!rc) {
        skip_ws(&P);
        if (P.p != P.end) rc = fail(&P, "trailing characters after the JSON value");
    }
    if (!rc) doc->root = P.stack[0];
    free(P.stack);
    if (rc) {
        tj_free(doc);
        return NULL;
    }
    return doc;
}

TjDoc *tj_parse(const char *text, size_t len, const char *name, QErr *err) {
    char *buf = malloc(len + 1);
    if (!buf) {
        qerr_set(err, "%s: out of memory", name);
        return NULL;
    }
    memcpy(buf, text, len);
    buf[len] = '\0';
    return parse_owned(buf, len, name, err);
}

TjDoc *tj_parse_file(const char *path, QErr *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        qerr_set(err, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    struct stat st;
    if (fstat(fileno(f), &st) || !S_ISREG(st.st_mode)) {
        fclose(f);
        qerr_set(err, "%s: not a regular file", path);
        return NULL;
    }
    size_t cap = (size_t)st.st_size + 1, len = 0;
    char *buf = malloc(cap);
    int oom = !buf;
    while (!oom) { /* the size is a hint: read until end of file */
        if (len + 1 == cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                oom = 1;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        size_t got = fread(buf + len, 1, cap - 1 - len, f);
        len += got;
        if (got == 0) break;
    }
    int bad = ferror(f), saved = errno;
    fclose(f);
    if (oom || bad) {
        qerr_set(err, "%s: %s", path, oom ? "out of memory" : strerror(saved));
        free(buf);
        return NULL;
    }
    buf[len] = '\0';
    return parse_owned(buf, len, path, err);
}

const TjVal *tj_root(const TjDoc *doc) { return &doc->root; }

void tj_free(TjDoc *doc) {
    if (!doc) return;
    for (Block *b = doc->blocks, *next; b; b = next) {
        next = b->next;
        free(b);
    }
    free(doc->buf);
    free(doc);
}

const TjVal *tj_get(const TjVal *obj, const char *key) {
    if (!obj || obj->type != TJ_OBJ) return NULL;
    size_t klen = strlen(key);
    for (uint32_t i = 0; i < obj->n; i++) {
        const TjVal *k = &obj->u.items[2 * i];
        if (k->n == klen && !memcmp(k->u.str, key, klen)) return &obj->u.items[2 * i + 1];
    }
    return NULL;
}

const char *tj_type_name(TjType t) {
    switch (t) {
    case TJ_NULL: return "null";
    case TJ_BOOL: return "boolean";
    case TJ_NUM: return "number";
    case TJ_STR: return "string";
    case TJ_ARR: return "array";
    case TJ_OBJ: return "object";
    }
    return "?";
}
