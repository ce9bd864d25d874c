/* tokenizer.c — byte-level BPE as Hugging Face `tokenizers` runs it, for Qwen3's tokenizer.json.
 *
 * Why it exists: every prompt and every generated token passes through here, and the ids must be
 * exactly those the model was trained on, so the pipeline copies tokenizers' order of steps
 * (added tokens on raw text -> NFC -> added tokens flagged `normalized` -> regex split -> bytes ->
 * BPE) rather than any shortcut that is "usually" equal.
 *
 * Trade-offs:
 * - BPE runs on raw bytes: vocabulary strings are mapped back from the GPT-2 byte alphabet at
 *   load, so encoding never builds the Ġ-strings. Merges live in an open-addressing table keyed
 *   by the id pair (rank + result id), with bitsets of ids that start/end any merge to skip most
 *   failing lookups, and a direct 256x256 table for the first round (pairs of bytes). Merging
 *   uses a min-heap of (rank, position) over a linked list, which is tokenizers' own order
 *   (lowest rank, then leftmost), so results are identical. The cost is cache misses in the
 *   4 MB merge table, hence the per-call cache below.
 * - A per-call cache maps repeated pieces to their ids; it is private to the call, so concurrent
 *   encodes share nothing mutable and need no lock. Short prompts pay one small allocation.
 * - NFC (utf8proc) is skipped for ASCII and applied only to the runs around non-ASCII bytes:
 *   ASCII characters are normalization boundaries, so this equals NFC of the whole text.
 * - The regex is the file's own, compiled by PCRE2 (UTF + UCP, JIT when available) after its
 *   \s, \p{L} and \p{N} are spelled out to mean what tokenizers' Oniguruma means by them (see
 *   onig_to_pcre2; tests compare every code point).
 * - Loading uses the arena JSON parser of tokjson.c, not jansson, to stay well under 0.1 s. */
#include "text/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <assert.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <utf8proc.h>

#include "text/tokjson.h"

enum { F_VALID = 1, F_SPECIAL = 2 };

typedef struct Buf {
    char *p;
    size_t n, cap;
} Buf;

/* A text -> id table over strings kept in Tok.pool (open addressing, linear probing). */
typedef struct StrSlot {
    uint32_t hash;
    int32_t id; /* -1: empty */
    uint32_t off, len;
} StrSlot;

typedef struct StrMap {
    StrSlot *slots;
    uint32_t mask;
} StrMap;

/* One merge: the pair of ids (a << 32 | b; MERGE_EMPTY when the slot is free), its rank and
 * the merged token. */
typedef struct MergeSlot {
    uint64_t key;
    uint32_t rank;
    int32_t id;
} MergeSlot;
#define MERGE_EMPTY UINT64_MAX

typedef struct AddedTok {
    uint32_t off, len; /* the text to match, in Tok.pool */
    int32_t id;
    uint8_t first; /* the text's first byte */
    uint8_t lstrip, rstrip, single_word;
    uint32_t order; /* position in added_tokens */
} AddedTok;

/* Leftmost-longest matching over a handful of strings: candidates grouped by first byte,
 * longest first, so the first hit at the leftmost position is the longest there. */
typedef struct Matcher {
    AddedTok *toks;
    uint32_t n;
    uint32_t first[257];
} Matcher;

struct Tok {
    char *pool; /* every token's bytes, NUL after each */
    size_t pool_len, pool_cap;
    int32_t n_ids;       /* one more than the largest id */
    int32_t vocab_count; /* entries in model.vocab */
    int32_t n_vocab_ids; /* one more than the largest model.vocab id */
    uint32_t *dec_off, *dec_len; /* per id: the bytes it decodes to */
    uint8_t *flags;              /* per id: F_VALID, F_SPECIAL */
    StrMap vocab;                /* model vocabulary, decoded bytes -> id */
    StrMap added;                /* added tokens, content -> id */
    MergeSlot *merges; /* open addressing */
    uint32_t merge_mask;
    uint64_t *byte_pairs; /* [x << 8 | y]: rank << 32 | id of merging the tokens of bytes x, y */
    uint64_t *left_bits, *right_bits; /* ids that are the left / right part of some merge */
    int32_t byte_id[256];
    Matcher raw, norm; /* added tokens matched before / after normalization */
    pcre2_code *re;
    int re_jit;
    int nfc, ignore_merges;
};

/* ---------------------------------------------------------------- small helpers */

static int buf_reserve(Buf *b, size_t extra) {
    if (b->n + extra <= b->cap) return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->n + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p;
    b->cap = cap;
    return 0;
}

static int buf_add(Buf *b, const void *s, size_t n) {
    if (buf_reserve(b, n)) return -1;
    if (n) memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

static inline uint64_t mix64(uint64_t x) {
    x ^= x >> 32;
    x *= 0xd6e8feb86659fd93ull;
    x ^= x >> 32;
    x *= 0xd6e8feb86659fd93ull;
    x ^= x >> 32;
    return x;
}

static uint64_t hash_bytes(const void *p, size_t n) {
    const unsigned char *s = p;
    uint64_t h = 0x9E3779B97F4A7C15ull * (n + 1);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 29;
        s += 8;
        n -= 8;
    }
    uint64_t w = 0;
    if (n) memcpy(&w, s, n);
    return mix64(h ^ w);
}

static uint32_t pow2_at_least(size_t n) {
    uint32_t c = 16;
    while (c < n) c *= 2;
    return c;
}

/* ---------------------------------------------------------------- UTF-8 */

enum { U_OK, U_BAD, U_SHORT };

/* Classifies the sequence at s[0..n), n >= 1. U_OK: a valid character of *len bytes. U_BAD: an
 * ill-formed maximal subpart of *len bytes (to be replaced by one U+FFFD). U_SHORT: a valid
 * prefix cut off by the end of the input (*len = n). */
static int utf8_check(const unsigned char *s, size_t n, size_t *len) {
    unsigned c = s[0], lo = 0x80, hi = 0xBF;
    size_t need;
    if (c < 0x80) {
        *len = 1;
        return U_OK;
    }
    if (c >= 0xC2 && c <= 0xDF) {
        need = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
        need = 2;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        need = 3;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else {
        *len = 1;
        return U_BAD;
    }
    for (size_t i = 1; i <= need; i++) {
        if (i >= n) {
            *len = i;
            return U_SHORT;
        }
        if (s[i] < lo || s[i] > hi) {
            *len = i;
            return U_BAD;
        }
        lo = 0x80;
        hi = 0xBF;
    }
    *len = need + 1;
    return U_OK;
}

/* Offset of the first byte that is not part of valid UTF-8, or n if all of it is valid. */
static size_t utf8_invalid_at(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        if (n - i >= 8) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ull)) {
                i += 8;
                continue;
            }
        }
        size_t len;
        if (utf8_check(s + i, n - i, &len) != U_OK) return i;
        i += len;
    }
    return n;
}

/* Decodes one character of valid UTF-8; returns its length. */
static size_t utf8_decode(const unsigned char *s, uint32_t *cp) {
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    if (s[0] < 0xE0) {
        *cp = (uint32_t)(s[0] & 0x1F) << 6 | (s[1] & 0x3F);
        return 2;
    }
    if (s[0] < 0xF0) {
        *cp = (uint32_t)(s[0] & 0x0F) << 12 | (uint32_t)(s[1] & 0x3F) << 6 | (s[2] & 0x3F);
        return 3;
    }
    *cp = (uint32_t)(s[0] & 0x07) << 18 | (uint32_t)(s[1] & 0x3F) << 12 |
          (uint32_t)(s[2] & 0x3F) << 6 | (s[3] & 0x3F);
    return 4;
}

/* Appends src[0..n) to out as valid UTF-8, each ill-formed maximal subpart replaced by U+FFFD
 * (the policy of Rust's from_utf8_lossy, which tokenizers' decoder uses). Unless final, an
 * incomplete character at the end is left unconsumed. Sets *used to the bytes consumed. Keeps
 * out NUL-terminated. Returns -1 on out-of-memory. */
static int utf8_lossy(Buf *out, const unsigned char *s, size_t n, int final, size_t *used) {
    if (buf_reserve(out, 3 * n + 1)) return -1;
    size_t i = 0;
    while (i < n) {
        if (s[i] < 0x80) {
            out->p[out->n++] = (char)s[i++];
            continue;
        }
        size_t len;
        int st = utf8_check(s + i, n - i, &len);
        if (st == U_OK) {
            memcpy(out->p + out->n, s + i, len);
            out->n += len;
        } else if (st == U_SHORT && !final) {
            break;
        } else {
            memcpy(out->p + out->n, "\xEF\xBF\xBD", 3);
            out->n += 3;
        }
        i += len;
    }
    out->p[out->n] = '\0';
    *used = i;
    return 0;
}

/* Rust regex's \s (Unicode White_Space), which tokenizers' lstrip/rstrip use. */
static int is_space(uint32_t c) {
    return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
           (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
           c == 0x205F || c == 0x3000;
}

/* Rust regex's \w (Alphabetic, marks, decimal digits, connector punctuation, joiners), which
 * tokenizers' single_word uses. Alphabetic is taken as letters, Nl and marks plus the symbol
 * ranges that Unicode marks Other_Alphabetic (circled and squared Latin letters). */
static int is_word(uint32_t c) {
    if (c == 0x200C || c == 0x200D) return 1;
    if ((c >= 0x24B6 && c <= 0x24E9) || (c >= 0x1F130 && c <= 0x1F149) ||
        (c >= 0x1F150 && c <= 0x1F169) || (c >= 0x1F170 && c <= 0x1F189))
        return 1;
    switch (utf8proc_category((utf8proc_int32_t)c)) {
    case UTF8PROC_CATEGORY_LU: case UTF8PROC_CATEGORY_LL: case UTF8PROC_CATEGORY_LT:
    case UTF8PROC_CATEGORY_LM: case UTF8PROC_CATEGORY_LO: case UTF8PROC_CATEGORY_NL:
    case UTF8PROC_CATEGORY_MN: case UTF8PROC_CATEGORY_MC: case UTF8PROC_CATEGORY_ME:
    case UTF8PROC_CATEGORY_ND: case UTF8PROC_CATEGORY_PC:
        return 1;
    default:
        return 0;
    }
}

/* The character ending at s[end) (end > 0, valid UTF-8). */
static uint32_t last_char(const unsigned char *s, size_t end, size_t *start) {
    size_t i = end - 1;
    while (i > 0 && (s[i] & 0xC0) == 0x80) i--;
    uint32_t cp;
    utf8_decode(s + i, &cp);
    *start = i;
    return cp;
}

/* ---------------------------------------------------------------- byte-level alphabet */

/* GPT-2's bytes_to_unicode: printable Latin-1 bytes stand for themselves, the other 68 bytes
 * (0-32, 127-160, 173) map in order to U+0100..U+0143. Returns the byte a code point stands
 * for, or -1 if it is outside the alphabet. */
static int bl_byte(uint32_t cp) {
    if ((cp >= 33 && cp <= 126) || (cp >= 161 && cp <= 172) || (cp >= 174 && cp <= 255))
        return (int)cp;
    if (cp >= 256 && cp < 256 + 68) {
        uint32_t k = cp - 256;
        if (k < 33) return (int)k;
        if (k < 67) return (int)(127 + k - 33);
        return 173;
    }
    return -1;
}

/* Maps a byte-level string (s[0..n), UTF-8) to the bytes it stands for, appended to out.
 * Returns 1 if every character is in the alphabet, 0 if not (out unchanged), -1 on OOM. */
static int bl_decode(Buf *out, const char *s, size_t n) {
    size_t start = out->n;
    if (buf_reserve(out, n + 1)) return -1;
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        size_t len;
        if (utf8_check(u + i, n - i, &len) != U_OK) break;
        uint32_t cp;
        utf8_decode(u + i, &cp);
        int b = bl_byte(cp);
        if (b < 0) break;
        out->p[out->n++] = (char)b;
        i += len;
    }
    if (i < n) {
        out->n = start;
        return 0;
    }
    return 1;
}

/* ---------------------------------------------------------------- tables */

static int strmap_init(StrMap *m, size_t n) {
    uint32_t cap = pow2_at_least(n + n / 2 + 1);
    m->slots = malloc((size_t)cap * sizeof *m->slots);
    if (!m->slots) return -1;
    for (uint32_t i = 0; i < cap; i++) m->slots[i].id = -1;
    m->mask = cap - 1;
    return 0;
}

/* Inserts (or re-points) the string pool[off..off+len), whose hash_bytes() is h, -> id; the
 * capacity was sized at init. */
static void strmap_put(StrMap *m, const char *pool, uint64_t h, uint32_t off, uint32_t len, int32_t id) {
    for (uint32_t i = (uint32_t)h & m->mask;; i = (i + 1) & m->mask) {
        StrSlot *s = &m->slots[i];
        if (s->id < 0) {
            *s = (StrSlot){(uint32_t)(h >> 32), id, off, len};
            return;
        }
        if (s->hash == (uint32_t)(h >> 32) && s->len == len && !memcmp(pool + s->off, pool + off, len)) {
            s->id = id;
            return;
        }
    }
}

/* The id of key[0..len) (whose hash_bytes() is h), or -1. */
static int32_t strmap_find(const StrMap *m, const char *pool, uint64_t h, const void *key, size_t len) {
    for (uint32_t i = (uint32_t)h & m->mask;; i = (i + 1) & m->mask) {
        const StrSlot *s = &m->slots[i];
        if (s->id < 0) return -1;
        if (s->hash == (uint32_t)(h >> 32) && s->len == len && !memcmp(pool + s->off, key, len))
            return s->id;
    }
}

static int32_t strmap_get(const StrMap *m, const char *pool, const void *key, size_t len) {
    return strmap_find(m, pool, hash_bytes(key, len), key, len);
}

/* Loading probes multi-megabyte tables at random; hashing a little ahead and prefetching the
 * slot hides most of each cache miss. */
#define AHEAD 16

static inline void strmap_prefetch(const StrMap *m, uint64_t h) {
    __builtin_prefetch(&m->slots[(uint32_t)h & m->mask]);
}

static inline uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t)(uint32_t)a << 32 | (uint32_t)b; }

static inline uint32_t pair_slot(uint64_t key, uint32_t mask) { return (uint32_t)mix64(key) & mask; }

/* The merge of a then b, or NULL if they do not merge. */
static inline const MergeSlot *merge_find(const Tok *t, int32_t a, int32_t b) {
    if (!(t->left_bits[a >> 6] >> (a & 63) & 1) || !(t->right_bits[b >> 6] >> (b & 63) & 1))
        return NULL;
    uint64_t key = pair_key(a, b);
    for (uint32_t i = pair_slot(key, t->merge_mask);; i = (i + 1) & t->merge_mask) {
        const MergeSlot *s = &t->merges[i];
        if (s->key == key) return s;
        if (s->key == MERGE_EMPTY) return NULL;
    }
}

/* ---------------------------------------------------------------- loading */

static int pool_add(Tok *t, const char *s, size_t n, uint32_t *off) {
    if (t->pool_len + n + 1 > t->pool_cap) {
        size_t cap = t->pool_cap ? t->pool_cap : 1 << 20;
        while (cap < t->pool_len + n + 1) cap *= 2;
        char *p = realloc(t->pool, cap);
        if (!p) return -1;
        t->pool = p;
        t->pool_cap = cap;
    }
    if (t->pool_len + n + 1 > UINT32_MAX) return -1;
    *off = (uint32_t)t->pool_len;
    if (n) memcpy(t->pool + t->pool_len, s, n);
    t->pool[t->pool_len + n] = '\0';
    t->pool_len += n + 1;
    return 0;
}

static int is_int_id(const TjVal *v) {
    return v && v->type == TJ_NUM && v->u.num >= 0 && v->u.num < 2147483647.0 &&
           v->u.num == (double)(int64_t)v->u.num;
}

/* A boolean member, or dflt when absent or null. Returns -1 if present with another type. */
static int get_bool(const TjVal *obj, const char *key, int dflt) {
    const TjVal *v = tj_get(obj, key);
    if (!v || v->type == TJ_NULL) return dflt;
    if (v->type != TJ_BOOL) return -1;
    return v->u.b;
}

static int str_is(const TjVal *v, const char *s) {
    return v && v->type == TJ_STR && v->n == strlen(s) && !memcmp(v->u.str, s, v->n);
}

static const char *type_of(const TjVal *obj) {
    const TjVal *v = tj_get(obj, "type");
    return v && v->type == TJ_STR ? v->u.str : "(none)";
}

/* NFC of valid UTF-8 s[0..n) appended to out. Returns -1 on failure. */
static int nfc_append(Buf *out, const char *s, size_t n) {
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t m = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst,
                                      UTF8PROC_STABLE | UTF8PROC_COMPOSE);
    if (m < 0) return -1;
    int rc = buf_add(out, dst, (size_t)m);
    free(dst);
    return rc;
}

static int cmp_added(const void *pa, const void *pb) {
    const AddedTok *a = pa, *b = pb;
    if (a->first != b->first) return a->first < b->first ? -1 : 1;
    if (a->len != b->len) return a->len > b->len ? -1 : 1;
    return a->order < b->order ? -1 : a->order > b->order;
}

/* Orders the tokens by (first byte, longest first, file order) and indexes them by first byte. */
static void matcher_build(Matcher *m) {
    qsort(m->toks, m->n, sizeof *m->toks, cmp_added);
    uint32_t k = 0;
    for (unsigned b = 0; b < 256; b++) {
        m->first[b] = k;
        while (k < m->n && m->toks[k].first == b) k++;
    }
    m->first[256] = k;
}

#define LFAIL(...) (qerr_set(err, __VA_ARGS__), -1)

/* One merge while loading: its parts' bytes sit side by side in a scratch buffer, so the merged
 * token's bytes are the two together. */
typedef struct MergeLoad {
    uint64_t ha, hb; /* hash_bytes of each part */
    uint32_t off, la, lb;
    int32_t a, b;
} MergeLoad;

static int load_vocab(Tok *t, const TjVal *vocab, const char *path, QErr *err) {
    uint64_t *hashes = malloc(((size_t)vocab->n + 1) * sizeof *hashes);
    int32_t *order = malloc(((size_t)vocab->n + 1) * sizeof *order);
    Buf tmp = {0};
    int rc = 0;
    if (!hashes || !order || strmap_init(&t->vocab, vocab->n)) {
        rc = LFAIL("%s: out of memory", path);
        goto out;
    }
    for (uint32_t i = 0; i < vocab->n; i++) {
        const TjVal *k = &vocab->u.items[2 * i];
        int32_t id = (int32_t)vocab->u.items[2 * i + 1].u.num;
        tmp.n = 0;
        int ok = bl_decode(&tmp, k->u.str, k->n);
        uint32_t off;
        if (ok < 0 || (ok > 0 && pool_add(t, tmp.p, tmp.n, &off))) {
            rc = LFAIL("%s: out of memory", path);
            goto out;
        }
        if (ok == 0) {
            rc = LFAIL("%s: model.vocab: token \"%s\" (id %d) is not in the byte-level alphabet",
                       path, k->u.str, id);
            goto out;
        }
        if (t->flags[id] & F_VALID) {
            rc = LFAIL("%s: model.vocab: id %d is used twice", path, id);
            goto out;
        }
        t->flags[id] = F_VALID;
        t->dec_off[id] = off;
        t->dec_len[id] = (uint32_t)tmp.n;
        order[i] = id;
        hashes[i] = hash_bytes(tmp.p, tmp.n);
    }
    for (uint32_t i = 0; i < vocab->n; i++) {
        if (i + AHEAD < vocab->n) strmap_prefetch(&t->vocab, hashes[i + AHEAD]);
        int32_t id = order[i];
        strmap_put(&t->vocab, t->pool, hashes[i], t->dec_off[id], t->dec_len[id], id);
    }
    for (int b = 0; b < 256; b++) {
        char c = (char)b;
        t->byte_id[b] = strmap_get(&t->vocab, t->pool, &c, 1);
        if (t->byte_id[b] < 0) {
            rc = LFAIL("%s: model.vocab: no token for byte 0x%02X", path, b);
            goto out;
        }
    }
out:
    free(hashes);
    free(order);
    free(tmp.p);
    return rc;
}

static int load_merges(Tok *t, const TjVal *merges, const char *path, QErr *err) {
    size_t n = merges->n;
    MergeLoad *ml = malloc((n + 1) * sizeof *ml);
    Buf tmp = {0};
    int rc = 0;
    uint32_t cap = pow2_at_least(n + n / 2 + 1);
    size_t words = ((size_t)t->n_ids + 63) / 64;
    t->merges = malloc((size_t)cap * sizeof *t->merges);
    t->byte_pairs = malloc(65536 * sizeof *t->byte_pairs);
    t->left_bits = calloc(words, 8);
    t->right_bits = calloc(words, 8);
    if (!ml || !t->merges || !t->byte_pairs || !t->left_bits || !t->right_bits) {
        rc = LFAIL("%s: out of memory", path);
        goto out;
    }
    if (n > UINT32_MAX) {
        rc = LFAIL("%s: model.merges: too many merges", path);
        goto out;
    }
    memset(t->merges, 0xFF, (size_t)cap * sizeof *t->merges);
    t->merge_mask = cap - 1;

    /* 1: the bytes of both parts, and their hashes */
    for (size_t r = 0; r < n; r++) {
        const TjVal *m = &merges->u.items[r];
        const char *part[2];
        size_t plen[2];
        const char *sp = m->type == TJ_STR ? memchr(m->u.str, ' ', m->n) : NULL;
        if (m->type == TJ_ARR && m->n == 2 && m->u.items[0].type == TJ_STR && m->u.items[1].type == TJ_STR) {
            for (int j = 0; j < 2; j++) {
                part[j] = m->u.items[j].u.str;
                plen[j] = m->u.items[j].n;
            }
        } else if (sp && !memchr(sp + 1, ' ', m->n - (size_t)(sp + 1 - m->u.str))) {
            part[0] = m->u.str; /* the older "a b" form */
            plen[0] = (size_t)(sp - m->u.str);
            part[1] = sp + 1;
            plen[1] = m->n - plen[0] - 1;
        } else {
            rc = LFAIL("%s: model.merges[%zu]: expected a pair of strings", path, r);
            goto out;
        }
        ml[r].off = (uint32_t)tmp.n;
        for (int j = 0; j < 2; j++) {
            size_t before = tmp.n;
            int ok = bl_decode(&tmp, part[j], plen[j]);
            if (ok < 0) {
                rc = LFAIL("%s: out of memory", path);
                goto out;
            }
            if (ok == 0) {
                rc = LFAIL("%s: model.merges[%zu]: token \"%.*s\" is not in model.vocab", path, r,
                           (int)plen[j], part[j]);
                goto out;
            }
            uint64_t h = hash_bytes(tmp.p + before, tmp.n - before);
            if (j == 0) {
                ml[r].la = (uint32_t)(tmp.n - before);
                ml[r].ha = h;
            } else {
                ml[r].lb = (uint32_t)(tmp.n - before);
                ml[r].hb = h;
            }
        }
    }
    /* 2: the parts' ids */
    for (size_t r = 0; r < n; r++) {
        if (r + AHEAD < n) {
            strmap_prefetch(&t->vocab, ml[r + AHEAD].ha);
            strmap_prefetch(&t->vocab, ml[r + AHEAD].hb);
        }
        const char *pa = tmp.p + ml[r].off, *pb = pa + ml[r].la;
        ml[r].a = strmap_find(&t->vocab, t->pool, ml[r].ha, pa, ml[r].la);
        ml[r].b = strmap_find(&t->vocab, t->pool, ml[r].hb, pb, ml[r].lb);
        if (ml[r].a < 0 || ml[r].b < 0) {
            int bad = ml[r].a < 0 ? 0 : 1;
            rc = LFAIL("%s: model.merges[%zu]: token \"%.*s\" is not in model.vocab", path, r,
                       (int)(bad ? ml[r].lb : ml[r].la), bad ? pb : pa);
            goto out;
        }
    }
    /* 3: the merged token's id, then the table entry */
    for (size_t r = 0; r < n; r++) {
        if (r + AHEAD < n)
            __builtin_prefetch(&t->merges[pair_slot(pair_key(ml[r + AHEAD].a, ml[r + AHEAD].b),
                                                    t->merge_mask)]);
        const char *bytes = tmp.p + ml[r].off;
        uint32_t len = ml[r].la + ml[r].lb;
        /* Files list merged tokens in merge order after the 256 bytes (Qwen3 always does): try
         * that id first, and look the bytes up only if they differ. */
        int32_t id = 256 + (int32_t)r;
        if (id >= t->n_ids || !(t->flags[id] & F_VALID) || t->dec_len[id] != len ||
            memcmp(t->pool + t->dec_off[id], bytes, len))
            id = strmap_get(&t->vocab, t->pool, bytes, len);
        if (id < 0) {
            rc = LFAIL("%s: model.merges[%zu]: merged token \"%.*s\" is not in model.vocab", path, r,
                       (int)len, bytes);
            goto out;
        }
        int32_t a = ml[r].a, b = ml[r].b;
        uint64_t key = pair_key(a, b);
        for (uint32_t i = pair_slot(key, t->merge_mask);; i = (i + 1) & t->merge_mask) {
            MergeSlot *s = &t->merges[i];
            if (s->key == MERGE_EMPTY || s->key == key) {
                *s = (MergeSlot){key, (uint32_t)r, id}; /* a repeated pair keeps its last rank */
                break;
            }
        }
        t->left_bits[a >> 6] |= 1ull << (a & 63);
        t->right_bits[b >> 6] |= 1ull << (b & 63);
    }
    for (int x = 0; x < 256; x++) {
        for (int y = 0; y < 256; y++) {
            const MergeSlot *m = merge_find(t, t->byte_id[x], t->byte_id[y]);
            t->byte_pairs[x << 8 | y] = m ? (uint64_t)m->rank << 32 | (uint32_t)m->id : MERGE_EMPTY;
        }
    }
out:
    free(ml);
    free(tmp.p);
    return rc;
}

/* Loads the model; the per-id arrays get room for n_added more ids, which load_added assigns. */
static int load_model(Tok *t, const TjVal *model, const char *path, uint32_t n_added, QErr *err) {
    if (!model || model->type != TJ_OBJ) return LFAIL("%s: model: missing or not an object", path);
    if (!str_is(tj_get(model, "type"), "BPE"))
        return LFAIL("%s: model.type: unsupported model '%s' (quill supports BPE)", path, type_of(model));
    const TjVal *dropout = tj_get(model, "dropout");
    if (dropout && dropout->type != TJ_NULL && !(dropout->type == TJ_NUM && dropout->u.num == 0))
        return LFAIL("%s: model.dropout: BPE dropout is not supported", path);
    if (get_bool(model, "byte_fallback", 0) != 0)
        return LFAIL("%s: model.byte_fallback: must be false", path);
    static const char *const affixes[] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        const TjVal *v = tj_get(model, affixes[i]);
        if (v && v->type != TJ_NULL && !(v->type == TJ_STR && v->n == 0))
            return LFAIL("%s: model.%s: only an empty value is supported", path, affixes[i]);
    }
    int im = get_bool(model, "ignore_merges", 0);
    if (im < 0) return LFAIL("%s: model.ignore_merges: expected a boolean", path);
    t->ignore_merges = im;

    const TjVal *vocab = tj_get(model, "vocab"), *merges = tj_get(model, "merges");
    if (!vocab || vocab->type != TJ_OBJ) return LFAIL("%s: model.vocab: missing or not an object", path);
    if (!merges || merges->type != TJ_ARR) return LFAIL("%s: model.merges: missing or not an array", path);
    int32_t max_id = -1;
    for (uint32_t i = 0; i < vocab->n; i++) {
        const TjVal *v = &vocab->u.items[2 * i + 1];
        if (!is_int_id(v))
            return LFAIL("%s: model.vocab: token \"%s\" has an invalid id", path, vocab->u.items[2 * i].u.str);
        if ((int32_t)v->u.num > max_id) max_id = (int32_t)v->u.num;
    }
    t->vocab_count = (int32_t)vocab->n;
    t->n_vocab_ids = max_id + 1;
    /* new added ids start at vocab_count or after the largest one so far, one per entry */
    int64_t room = (int64_t)(max_id > t->vocab_count ? max_id : t->vocab_count) + n_added + 1;
    if (room >= INT32_MAX / 2)
        return LFAIL("%s: %lld token ids, more than quill supports", path, (long long)room);
    t->n_ids = (int32_t)room;
    t->dec_off = calloc((size_t)t->n_ids, sizeof *t->dec_off);
    t->dec_len = calloc((size_t)t->n_ids, sizeof *t->dec_len);
    t->flags = calloc((size_t)t->n_ids, 1);
    if (!t->dec_off || !t->dec_len || !t->flags) return LFAIL("%s: out of memory", path);
    if (load_vocab(t, vocab, path, err)) return -1;
    return load_merges(t, merges, path, err);
}

/* Added tokens get their ids the way tokenizers assigns them when it reads the file (the ids
 * written there are only checked by it, with a warning): a content already added or present in
 * the model vocabulary keeps that id, any other takes the next id after the vocabulary and the
 * added tokens so far. For files tokenizers saved itself (Qwen3's) this is the file's ids. A
 * repeated content replaces the earlier entry's flags, and is special if either entry was.
 * Tokens flagged `normalized` are matched and decoded in their NFC form, as tokenizers does. */
static int load_added(Tok *t, const TjVal *added, const char *path, QErr *err) {
    uint32_t n = added ? added->n : 0;
    AddedTok *all = calloc(n ? n : 1, sizeof *all);
    int32_t *entry_of = malloc((size_t)t->n_ids * sizeof *entry_of); /* id -> index in all */
    t->raw.toks = calloc(n ? n : 1, sizeof(AddedTok));
    t->norm.toks = calloc(n ? n : 1, sizeof(AddedTok));
    Buf tmp = {0}, nfc = {0};
    uint8_t *normalized = calloc(n ? n : 1, 1);
    uint32_t n_all = 0;
    int32_t max_added = -1, vocab_count = t->vocab_count;
    int rc = 0;
    if (!all || !entry_of || !t->raw.toks || !t->norm.toks || !normalized || strmap_init(&t->added, n)) {
        rc = LFAIL("%s: out of memory", path);
        goto out;
    }
    for (int32_t i = 0; i < t->n_ids; i++) entry_of[i] = -1;
    for (uint32_t i = 0; i < n; i++) {
        const TjVal *a = &added->u.items[i];
        const TjVal *content = tj_get(a, "content");
        if (a->type != TJ_OBJ || !content || content->type != TJ_STR ||
            utf8_invalid_at((const unsigned char *)content->u.str, content->n) != content->n) {
            rc = LFAIL("%s: added_tokens[%u].content: missing or not valid UTF-8", path, i);
            goto out;
        }
        if (content->n == 0) continue; /* tokenizers ignores empty added tokens */
        int special = get_bool(a, "special", 0), norm = get_bool(a, "normalized", !special);
        int lstrip = get_bool(a, "lstrip", 0), rstrip = get_bool(a, "rstrip", 0);
        int single = get_bool(a, "single_word", 0);
        if (special < 0 || norm < 0 || lstrip < 0 || rstrip < 0 || single < 0) {
            rc = LFAIL("%s: added_tokens[%u]: flags must be booleans", path, i);
            goto out;
        }
        /* Its id: added before, else in the vocabulary (as a byte-level string), else new. */
        int32_t id = strmap_get(&t->added, t->pool, content->u.str, content->n);
        tmp.n = 0;
        int bl = bl_decode(&tmp, content->u.str, content->n);
        if (bl < 0) {
            rc = LFAIL("%s: out of memory", path);
            goto out;
        }
        if (id < 0 && bl > 0) id = strmap_get(&t->vocab, t->pool, tmp.p, tmp.n);
        /* A normalized token is matched, and decoded, in its normalized form. */
        const char *form = content->u.str;
        size_t form_len = content->n;
        if (norm && t->nfc) {
            nfc.n = 0;
            if (nfc_append(&nfc, content->u.str, content->n)) {
                rc = LFAIL("%s: out of memory", path);
                goto out;
            }
            form = nfc.p;
            form_len = nfc.n;
        }
        if (id < 0) id = max_added < 0 || max_added < vocab_count ? vocab_count : max_added + 1;
        assert(id < t->n_ids); /* load_model left room for one new id per entry */
        if (id > max_added) max_added = id;
        /* Decoding: the byte-level mapping if every character is in the alphabet, else the
         * form's own bytes (tokenizers' ByteLevel decoder does the same). */
        uint32_t dec_off, text_off, form_off;
        tmp.n = 0;
        bl = bl_decode(&tmp, form, form_len);
        if (bl < 0 || (bl == 0 && buf_add(&tmp, form, form_len)) || pool_add(t, tmp.p, tmp.n, &dec_off) ||
            pool_add(t, content->u.str, content->n, &text_off) || pool_add(t, form, form_len, &form_off)) {
            rc = LFAIL("%s: out of memory", path);
            goto out;
        }
        t->dec_off[id] = dec_off;
        t->dec_len[id] = (uint32_t)tmp.n;
        t->flags[id] |= (uint8_t)(F_VALID | (special ? F_SPECIAL : 0));
        strmap_put(&t->added, t->pool, hash_bytes(content->u.str, content->n), text_off, content->n, id);
        if (entry_of[id] < 0) entry_of[id] = (int32_t)n_all++;
        uint32_t e = (uint32_t)entry_of[id];
        all[e] = (AddedTok){.off = form_off, .len = (uint32_t)form_len, .id = id, .lstrip = (uint8_t)lstrip,
                            .rstrip = (uint8_t)rstrip, .single_word = (uint8_t)single, .order = e,
                            .first = (uint8_t)form[0]};
        normalized[e] = (uint8_t)norm;
    }
    if (max_added >= 0 && max_added + 1 > t->n_vocab_ids) t->n_ids = max_added + 1;
    else t->n_ids = t->n_vocab_ids;
    for (uint32_t e = 0; e < n_all; e++) {
        Matcher *m = normalized[e] ? &t->norm : &t->raw;
        m->toks[m->n++] = all[e];
    }
    matcher_build(&t->raw);
    matcher_build(&t->norm);
out:
    free(all);
    free(entry_of);
    free(normalized);
    free(tmp.p);
    free(nfc.p);
    return rc;
}

/* tokenizers runs the file's regex with Oniguruma; quill with PCRE2. Their character classes
 * differ in two ways that change pieces (and so ids), which the pattern is rewritten to undo:
 * - \s: PCRE2 also counts U+180E (no longer a space since Unicode 6.3) as \s. Oniguruma's \s is
 *   Unicode White_Space, spelled out here.
 * - \p{L}, \p{N}: tokenizers' Oniguruma knows Unicode 16, while Debian's PCRE2 10.42 knows
 *   Unicode 14. These are the letters and numbers it lacks, found by testing every code point
 *   with both engines (scripts/regex_unicode_gap.py); harmless for a newer PCRE2. */
#define WHITE_SPACE "\\t\\n\\x0B\\f\\r\\x20\\x85\\xA0\\x{1680}\\x{2000}-\\x{200A}\\x{2028}\\x{2029}" \
                    "\\x{202F}\\x{205F}\\x{3000}"
static const char NEW_LETTERS[] =
    "\\x{1C89}-\\x{1C8A}\\x{A7CB}-\\x{A7CD}\\x{A7DA}-\\x{A7DC}\\x{105C0}-\\x{105F3}"
    "\\x{10D4A}-\\x{10D65}\\x{10D6F}-\\x{10D85}\\x{10EC2}-\\x{10EC4}\\x{1123F}-\\x{11240}"
    "\\x{11380}-\\x{11389}\\x{1138B}\\x{1138E}\\x{11390}-\\x{113B5}\\x{113B7}\\x{113D1}"
    "\\x{113D3}\\x{11BC0}-\\x{11BE0}\\x{11F02}\\x{11F04}-\\x{11F10}\\x{11F12}-\\x{11F33}"
    "\\x{1342F}\\x{13441}-\\x{13446}\\x{13460}-\\x{143FA}\\x{16100}-\\x{1611D}"
    "\\x{16D40}-\\x{16D6C}\\x{18CFF}\\x{1B132}\\x{1B155}\\x{1DF25}-\\x{1DF2A}"
    "\\x{1E030}-\\x{1E06D}\\x{1E4D0}-\\x{1E4EB}\\x{1E5D0}-\\x{1E5ED}\\x{1E5F0}\\x{2B739}"
    "\\x{2EBF0}-\\x{2EE5D}\\x{31350}-\\x{323AF}";
static const char NEW_NUMBERS[] =
    "\\x{10D40}-\\x{10D49}\\x{116D0}-\\x{116E3}\\x{11BF0}-\\x{11BF9}\\x{11F50}-\\x{11F59}"
    "\\x{16130}-\\x{16139}\\x{16D70}-\\x{16D79}\\x{1CCF0}-\\x{1CCF9}\\x{1D2C0}-\\x{1D2D3}"
    "\\x{1E4F0}-\\x{1E4F9}\\x{1E5F1}-\\x{1E5FA}";

/* Appends the PCRE2 spelling of an Oniguruma pattern to out: \s, \S, \p{L}, \p{N} (and \P of
 * those outside brackets) become explicit classes; everything else is copied. Returns -1 on
 * out-of-memory. */
static int onig_to_pcre2(Buf *out, const char *pat, size_t n) {
    int in_class = 0, rc = 0;
    size_t i = 0;
    while (i < n && !rc) {
        char c = pat[i];
        if (c == '\\' && i + 1 < n) {
            char e = pat[i + 1];
            if (e == 's') {
                rc = buf_add(out, in_class ? WHITE_SPACE : "[" WHITE_SPACE "]",
                             strlen(WHITE_SPACE) + (in_class ? 0 : 2));
                i += 2;
                continue;
            }
            if (e == 'S' && !in_class) {
                rc = buf_add(out, "[^" WHITE_SPACE "]", strlen(WHITE_SPACE) + 3);
                i += 2;
                continue;
            }
            if ((e == 'p' || (e == 'P' && !in_class)) && i + 4 < n && pat[i + 2] == '{' &&
                (pat[i + 3] == 'L' || pat[i + 3] == 'N') && pat[i + 4] == '}') {
                const char *extra = pat[i + 3] == 'L' ? NEW_LETTERS : NEW_NUMBERS;
                const char *open = in_class ? "" : e == 'P' ? "[^" : "[";
                char prop[6] = {'\\', 'p', '{', pat[i + 3], '}', 0};
                rc = buf_add(out, open, strlen(open)) || buf_add(out, prop, 5) ||
                     buf_add(out, extra, strlen(extra)) || (!in_class && buf_add(out, "]", 1));
                i += 5;
                continue;
            }
            rc = buf_add(out, pat + i, 2);
            i += 2;
            continue;
        }
        if (c == '[' && !in_class) {
            in_class = 1;
            size_t j = i + 1;
            if (j < n && pat[j] == '^') j++;
            if (j < n && pat[j] == ']') j++; /* a ']' first in a class is a literal */
            rc = buf_add(out, pat + i, j - i);
            i = j;
            continue;
        }
        if (c == '[' && in_class && i + 1 < n && pat[i + 1] == ':') { /* [:alpha:] */
            const char *end = memmem(pat + i + 2, n - i - 2, ":]", 2);
            size_t j = end ? (size_t)(end - pat) + 2 : i + 1;
            rc = buf_add(out, pat + i, j - i);
            i = j;
            continue;
        }
        if (c == ']' && in_class) in_class = 0;
        rc = buf_add(out, &c, 1);
        i++;
    }
    return rc ? -1 : buf_add(out, "", 1); /* NUL-terminated, for error messages */
}

static int load_pretokenizer(Tok *t, const TjVal *pt, const char *path, QErr *err) {
    static const char *const expect =
        "quill supports Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)]";
    if (!pt || !str_is(tj_get(pt, "type"), "Sequence"))
        return LFAIL("%s: pre_tokenizer: unsupported type '%s' (%s)", path, pt ? type_of(pt) : "null", expect);
    const TjVal *list = tj_get(pt, "pretokenizers");
    if (!list || list->type != TJ_ARR || list->n != 2)
        return LFAIL("%s: pre_tokenizer.pretokenizers: %s", path, expect);
    const TjVal *split = &list->u.items[0], *bl = &list->u.items[1];
    if (!str_is(tj_get(split, "type"), "Split"))
        return LFAIL("%s: pre_tokenizer.pretokenizers[0]: unsupported type '%s' (%s)", path, type_of(split), expect);
    const TjVal *pat = tj_get(tj_get(split, "pattern"), "Regex");
    if (!pat || pat->type != TJ_STR)
        return LFAIL("%s: pre_tokenizer.pretokenizers[0].pattern: expected {\"Regex\": ...}", path);
    if (!str_is(tj_get(split, "behavior"), "Isolated"))
        return LFAIL("%s: pre_tokenizer.pretokenizers[0].behavior: only Isolated is supported", path);
    if (get_bool(split, "invert", 0) != 0)
        return LFAIL("%s: pre_tokenizer.pretokenizers[0].invert: must be false", path);
    if (!str_is(tj_get(bl, "type"), "ByteLevel"))
        return LFAIL("%s: pre_tokenizer.pretokenizers[1]: unsupported type '%s' (%s)", path, type_of(bl), expect);
    if (get_bool(bl, "use_regex", 1) != 0 || get_bool(bl, "add_prefix_space", 0) != 0)
        return LFAIL("%s: pre_tokenizer.pretokenizers[1]: ByteLevel must have use_regex and "
                     "add_prefix_space false", path);

    if (utf8_invalid_at((const unsigned char *)pat->u.str, pat->n) != pat->n)
        return LFAIL("%s: pre_tokenizer.pretokenizers[0].pattern: not valid UTF-8", path);
    Buf re = {0};
    if (onig_to_pcre2(&re, pat->u.str, pat->n)) {
        free(re.p);
        return LFAIL("%s: out of memory", path);
    }
    int code;
    PCRE2_SIZE at;
    t->re = pcre2_compile((PCRE2_SPTR)re.p, re.n - 1, PCRE2_UTF | PCRE2_UCP, &code, &at, NULL);
    free(re.p);
    if (!t->re) {
        PCRE2_UCHAR msg[256];
        pcre2_get_error_message(code, msg, sizeof msg);
        return LFAIL("%s: pre_tokenizer.pretokenizers[0].pattern: regex error: %s", path,
                     (const char *)msg);
    }
    t->re_jit = pcre2_jit_compile(t->re, PCRE2_JIT_COMPLETE) == 0;
    return 0;
}

static int load_all(Tok *t, const TjVal *root, const char *path, QErr *err) {
    if (root->type != TJ_OBJ) return LFAIL("%s: expected a JSON object at the top level", path);

    const TjVal *norm = tj_get(root, "normalizer");
    if (!norm || norm->type == TJ_NULL) {
        t->nfc = 0;
    } else if (str_is(tj_get(norm, "type"), "NFC")) {
        t->nfc = 1;
    } else {
        return LFAIL("%s: normalizer: unsupported type '%s' (quill supports null or NFC)", path, type_of(norm));
    }
    const TjVal *dec = tj_get(root, "decoder");
    if (!dec || !str_is(tj_get(dec, "type"), "ByteLevel"))
        return LFAIL("%s: decoder: unsupported type '%s' (quill supports ByteLevel)", path,
                     dec ? type_of(dec) : "null");
    if (load_pretokenizer(t, tj_get(root, "pre_tokenizer"), path, err)) return -1;

    const TjVal *added = tj_get(root, "added_tokens");
    if (added && added->type != TJ_ARR && added->type != TJ_NULL)
        return LFAIL("%s: added_tokens: expected an array", path);
    if (added && added->type == TJ_NULL) added = NULL;
    if (load_model(t, tj_get(root, "model"), path, added ? added->n : 0, err)) return -1;
    return load_added(t, added, path, err);
}

Tok *tok_load(const char *path, QErr *err) {
    char file[4096];
    struct stat st;
    if (stat(path, &st) == 0 && S_ISDIR(st.st_mode)) {
        if ((size_t)snprintf(file, sizeof file, "%s/tokenizer.json", path) >= sizeof file) {
            qerr_set(err, "%s: path too long", path);
            return NULL;
        }
    } else {
        if ((size_t)snprintf(file, sizeof file, "%s", path) >= sizeof file) {
            qerr_set(err, "%s: path too long", path);
            return NULL;
        }
    }
    TjDoc *doc = tj_parse_file(file, err);
    if (!doc) return NULL;
    Tok *t = calloc(1, sizeof *t);
    if (!t) {
        tj_free(doc);
        qerr_set(err, "%s: out of memory", file);
        return NULL;
    }
    int rc = load_all(t, tj_root(doc), file, err);
    tj_free(doc);
    if (rc) {
        tok_free(t);
        return NULL;
    }
    return t;
}

void tok_free(Tok *t) {
    if (!t) return;
    free(t->pool);
    free(t->dec_off);
    free(t->dec_len);
    free(t->flags);
    free(t->vocab.slots);
    free(t->added.slots);
    free(t->merges);
    free(t->byte_pairs);
    free(t->left_bits);
    free(t->right_bits);
    free(t->raw.toks);
    free(t->norm.toks);
    pcre2_code_free(t->re);
    free(t);
}

int32_t tok_vocab_size(const Tok *t) { return t->n_ids; }

static int valid_id(const Tok *t, int32_t id) {
    return id >= 0 && id < t->n_ids && (t->flags[id] & F_VALID);
}

int tok_is_special(const Tok *t, int32_t id) {
    return valid_id(t, id) && (t->flags[id] & F_SPECIAL) != 0;
}

const char *tok_token_bytes(const Tok *t, int32_t id, size_t *len) {
    if (!valid_id(t, id)) return NULL;
    *len = t->dec_len[id];
    return t->pool + t->dec_off[id];
}

int32_t tok_token_id(const Tok *t, const char *text, size_t len) {
    int32_t id = strmap_get(&t->added, t->pool, text, len);
    return id >= 0 ? id : strmap_get(&t->vocab, t->pool, text, len);
}

/* ---------------------------------------------------------------- encoding */

#define CACHE_MAX_KEY 64
#define CACHE_MAX_SLOTS (1u << 18)

typedef struct CacheSlot {
    uint64_t hash;
    uint32_t key_off, key_len; /* key_len 0: empty (cached pieces have >= 2 bytes) */
    uint32_t ids_off, n_ids;
} CacheSlot;

typedef struct Enc {
    const Tok *t;
    QErr *err;
    int32_t *ids; /* the output */
    size_t n, cap;
    int32_t *sym, *prev, *next; /* BPE scratch, scap entries each */
    uint64_t *heap;             /* 3 * scap entries */
    size_t scap;
    Buf norm;                   /* NFC output */
    pcre2_match_data *md;
    CacheSlot *cache;
    uint32_t cache_mask, cache_used;
    Buf cache_keys;
    int32_t *cache_ids;
    size_t cache_n, cache_cap;
} Enc;

static int oom(Enc *E) { return qerr_set(E->err, "tokenizer: out of memory"); }

static int emit(Enc *E, const int32_t *ids, size_t n) {
    if (E->n + n > E->cap) {
        size_t cap = E->cap * 2;
        while (cap < E->n + n) cap *= 2;
        int32_t *p = realloc(E->ids, cap * sizeof *p);
        if (!p) return oom(E);
        E->ids = p;
        E->cap = cap;
    }
    memcpy(E->ids + E->n, ids, n * sizeof *ids);
    E->n += n;
    return 0;
}

static CacheSlot *cache_find(Enc *E, uint64_t h, const unsigned char *s, size_t n) {
    if (!E->cache) return NULL;
    for (uint32_t i = (uint32_t)h & E->cache_mask;; i = (i + 1) & E->cache_mask) {
        CacheSlot *c = &E->cache[i];
        if (!c->key_len) return c;
        if (c->hash == h && c->key_len == n && !memcmp(E->cache_keys.p + c->key_off, s, n)) return c;
    }
}

static int cache_grow(Enc *E) {
    uint32_t cap = E->cache ? (E->cache_mask + 1) * 2 : 1024;
    CacheSlot *slots = calloc(cap, sizeof *slots);
    if (!slots) return -1;
    for (uint32_t i = 0; E->cache && i <= E->cache_mask; i++) {
        CacheSlot *c = &E->cache[i];
        if (!c->key_len) continue;
        uint32_t j = (uint32_t)c->hash & (cap - 1);
        while (slots[j].key_len) j = (j + 1) & (cap - 1);
        slots[j] = *c;
    }
    free(E->cache);
    E->cache = slots;
    E->cache_mask = cap - 1;
    return 0;
}

/* Remembers that piece s[0..n) (hash h) encodes to ids[0..k). Best effort: a full cache or
 * out-of-memory just skips it. */
static void cache_put(Enc *E, uint64_t h, const unsigned char *s, size_t n, const int32_t *ids, size_t k) {
    if (E->cache && (E->cache_used + 1) * 2 > E->cache_mask + 1) {
        if (E->cache_mask + 1 >= CACHE_MAX_SLOTS || cache_grow(E)) return;
    } else if (!E->cache && cache_grow(E)) {
        return;
    }
    if (E->cache_n + k > E->cache_cap) {
        size_t cap = E->cache_cap ? E->cache_cap * 2 : 4096;
        while (cap < E->cache_n + k) cap *= 2;
        int32_t *p = realloc(E->cache_ids, cap * sizeof *p);
        if (!p) return;
        E->cache_ids = p;
        E->cache_cap = cap;
    }
    size_t key_off = E->cache_keys.n;
    if (buf_add(&E->cache_keys, s, n)) return;
    CacheSlot *c = cache_find(E, h, s, n);
    *c = (CacheSlot){h, (uint32_t)key_off, (uint32_t)n, (uint32_t)E->cache_n, (uint32_t)k};
    memcpy(E->cache_ids + E->cache_n, ids, k * sizeof *ids);
    E->cache_n += k;
    E->cache_used++;
}

static void heap_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i) {
        size_t p = (i - 1) / 2;
        if (h[p] <= v) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], v = h[--*n];
    size_t i = 0, m = *n;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= m) break;
        if (c + 1 < m && h[c + 1] < h[c]) c++;
        if (h[c] >= v) break;
        h[i] = h[c];
        i = c;
    }
    if (m) h[i] = v;
    return top;
}

/* BPE of one pre-tokenized piece of n >= 1 bytes; appends its ids. */
static int bpe(Enc *E, const unsigned char *s, size_t n) {
    const Tok *t = E->t;
    if (n == 1) return emit(E, &t->byte_id[s[0]], 1);
    if (t->ignore_merges) {
        int32_t id = strmap_get(&t->vocab, t->pool, s, n);
        if (id >= 0) return emit(E, &id, 1);
    }
    if (n == 2) { /* one pair: merged or not */
        uint64_t m = t->byte_pairs[s[0] << 8 | s[1]];
        int32_t two[2] = {t->byte_id[s[0]], t->byte_id[s[1]]};
        if (m != MERGE_EMPTY) two[0] = (int32_t)(uint32_t)m;
        return emit(E, two, m != MERGE_EMPTY ? 1 : 2);
    }
    uint64_t h = 0;
    if (n <= CACHE_MAX_KEY) {
        h = hash_bytes(s, n);
        CacheSlot *c = cache_find(E, h, s, n);
        if (c && c->key_len) return emit(E, E->cache_ids + c->ids_off, c->n_ids);
    }
    if (n > E->scap) {
        size_t cap = E->scap ? E->scap : 64;
        while (cap < n) cap *= 2;
        free(E->sym);
        free(E->heap);
        E->sym = malloc(cap * 3 * sizeof(int32_t));
        E->heap = malloc(cap * 3 * sizeof(uint64_t));
        if (!E->sym || !E->heap) {
            E->scap = 0;
            return oom(E);
        }
        E->prev = E->sym + cap;
        E->next = E->sym + 2 * cap;
        E->scap = cap;
    }
    int32_t *sym = E->sym, *prev = E->prev, *next = E->next;
    uint64_t *heap = E->heap;
    size_t nh = 0;
    for (size_t i = 0; i < n; i++) {
        sym[i] = t->byte_id[s[i]];
        prev[i] = (int32_t)i - 1;
        next[i] = i + 1 < n ? (int32_t)i + 1 : -1;
    }
    for (size_t i = 0; i + 1 < n; i++) { /* pairs of bytes: a small table, no hashing */
        uint64_t m = t->byte_pairs[s[i] << 8 | s[i + 1]];
        if (m != MERGE_EMPTY) heap_push(heap, &nh, (m & 0xFFFFFFFF00000000ull) | i);
    }
    while (nh) {
        uint64_t top = heap_pop(heap, &nh);
        uint32_t rank = (uint32_t)(top >> 32);
        int32_t pos = (int32_t)(uint32_t)top, nx = next[pos];
        if (sym[pos] < 0 || nx < 0) continue; /* merged away, or now last */
        const MergeSlot *m = merge_find(t, sym[pos], sym[nx]);
        if (!m || m->rank != rank) continue; /* stale: a neighbour changed */
        sym[pos] = m->id;
        sym[nx] = -1;
        next[pos] = next[nx];
        if (next[pos] >= 0) prev[next[pos]] = pos;
        if (prev[pos] >= 0) {
            const MergeSlot *l = merge_find(t, sym[prev[pos]], sym[pos]);
            if (l) heap_push(heap, &nh, (uint64_t)l->rank << 32 | (uint32_t)prev[pos]);
        }
        if (next[pos] >= 0) {
            const MergeSlot *r = merge_find(t, sym[pos], sym[next[pos]]);
            if (r) heap_push(heap, &nh, (uint64_t)r->rank << 32 | (uint32_t)pos);
        }
    }
    size_t k = 0; /* compact the surviving symbols to the front of sym */
    for (int32_t i = 0; i >= 0; i = next[i]) sym[k++] = sym[i];
    if (n <= CACHE_MAX_KEY) cache_put(E, h, s, n, sym, k);
    return emit(E, sym, k);
}

/* Splits normalized text with the pre-tokenizer regex ("Isolated": matches and the text
 * between them are pieces) and runs BPE on each piece. */
static int pretokenize(Enc *E, const char *s, size_t n) {
    const Tok *t = E->t;
    const unsigned char *u = (const unsigned char *)s;
    size_t gap = 0, from = 0;
    while (from < n) {
        int rc = t->re_jit ? pcre2_jit_match(t->re, (PCRE2_SPTR)s, n, from, 0, E->md, NULL)
                           : pcre2_match(t->re, (PCRE2_SPTR)s, n, from, PCRE2_NO_UTF_CHECK, E->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[256];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return qerr_set(E->err, "tokenizer: pre-tokenizer regex failed: %s", (const char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(E->md);
        size_t ms = ov[0], me = ov[1];
        if (ms > gap && bpe(E, u + gap, ms - gap)) return -1;
        if (me > ms && bpe(E, u + ms, me - ms)) return -1;
        gap = me;
        if (me > ms) {
            from = me;
        } else { /* an empty match splits here; look again one character on */
            size_t len;
            utf8_check(u + ms, n - ms, &len);
            from = ms + len;
        }
    }
    if (gap < n && bpe(E, u + gap, n - gap)) return -1;
    return 0;
}

typedef int (*GapFn)(Enc *E, const char *s, size_t n);

/* Cuts the added tokens of matcher m out of s[0..n) as tokenizers' AddedVocabulary does
 * (leftmost-longest, then single_word / lstrip / rstrip) and hands the text between them to
 * gap(). */
static int split_added(Enc *E, const Matcher *m, const char *s, size_t n, GapFn gap) {
    if (!m->n) return n ? gap(E, s, n) : 0;
    const unsigned char *u = (const unsigned char *)s;
    const char *pool = E->t->pool;
    size_t start_offset = 0, i = 0;
    while (i < n) {
        uint32_t lo = m->first[u[i]], hi = m->first[u[i] + 1];
        const AddedTok *hit = NULL;
        for (uint32_t k = lo; k < hi; k++) {
            const AddedTok *a = &m->toks[k];
            if (a->len <= n - i && !memcmp(pool + a->off, s + i, a->len)) {
                hit = a;
                break;
            }
        }
        if (!hit) {
            i++;
            continue;
        }
        size_t start = i, stop = i + hit->len;
        i = stop; /* matching resumes after the match, even if it is discarded below */
        if (hit->single_word) {
            size_t at;
            uint32_t c;
            int word_before = start > 0 && is_word(last_char(u, start, &at));
            int word_after = stop < n && (utf8_decode(u + stop, &c), is_word(c));
            if (word_before || word_after) continue;
        }
        if (hit->lstrip) {
            size_t ns = start, at;
            while (ns > 0 && is_space(last_char(u, ns, &at))) ns = at;
            start = ns > start_offset ? ns : start_offset;
        }
        if (hit->rstrip) {
            uint32_t c;
            while (stop < n) {
                size_t len = utf8_decode(u + stop, &c);
                if (!is_space(c)) break;
                stop += len;
            }
        }
        if (start_offset < start && gap(E, s + start_offset, start - start_offset)) return -1;
        if (emit(E, &hit->id, 1)) return -1;
        start_offset = stop;
    }
    if (start_offset < n && gap(E, s + start_offset, n - start_offset)) return -1;
    return 0;
}

/* NFC of s[0..n) (valid UTF-8) into E->norm. ASCII characters never change and never combine
 * with a neighbour that follows them, so only each run of non-ASCII bytes, together with the
 * ASCII character before it, goes through utf8proc. */
static int normalize(Enc *E, const char *s, size_t n) {
    E->norm.n = 0;
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        while (j < n && (unsigned char)s[j] < 0x80) j++;
        if (j == n) return buf_add(&E->norm, s + i, n - i) ? oom(E) : 0;
        size_t cs = j > i ? j - 1 : j, k = j;
        while (k < n && (unsigned char)s[k] >= 0x80) k++;
        if (buf_add(&E->norm, s + i, cs - i) || nfc_append(&E->norm, s + cs, k - cs))
            return qerr_set(E->err, "tokenizer: NFC normalization failed (out of memory)");
        i = k;
    }
    return 0;
}

/* Text between the added tokens matched on raw text: normalize, then cut the added tokens that
 * match normalized text, then pre-tokenize. */
static int encode_raw_gap(Enc *E, const char *s, size_t n) {
    if (E->t->nfc) {
        size_t i = 0;
        while (i < n && (unsigned char)s[i] < 0x80) i++;
        if (i < n) {
            if (normalize(E, s, n)) return -1;
            s = E->norm.p;
            n = E->norm.n;
        }
    }
    return split_added(E, &E->t->norm, s, n, pretokenize);
}

int tok_encode(const Tok *t, const char *text, size_t len, int32_t **ids, size_t *n_ids, QErr *err) {
    size_t bad = utf8_invalid_at((const unsigned char *)text, len);
    if (bad != len) return qerr_set(err, "text is not valid UTF-8 (at byte %zu)", bad);
    Enc E = {.t = t, .err = err, .cap = len / 3 + 16};
    E.ids = malloc(E.cap * sizeof *E.ids);
    E.md = pcre2_match_data_create_from_pattern(t->re, NULL);
    int rc = (!E.ids || !E.md) ? oom(&E) : split_added(&E, &t->raw, text, len, encode_raw_gap);
    pcre2_match_data_free(E.md);
    free(E.sym);
    free(E.heap);
    free(E.norm.p);
    free(E.cache);
    free(E.cache_keys.p);
    free(E.cache_ids);
    if (rc) {
        free(E.ids);
        return -1;
    }
    *ids = E.ids;
    *n_ids = E.n;
    return 0;
}

/* ---------------------------------------------------------------- decoding */

char *tok_decode(const Tok *t, const int32_t *ids, size_t n, int skip_special, size_t *len, QErr *err) {
    Buf raw = {0}, out = {0};
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (!valid_id(t, id)) {
            free(raw.p);
            qerr_set(err, "invalid token id %d (at position %zu; the vocabulary has ids 0..%d)", id, i,
                     t->n_ids - 1);
            return NULL;
        }
        if (skip_special && (t->flags[id] & F_SPECIAL)) continue;
        if (buf_add(&raw, t->pool + t->dec_off[id], t->dec_len[id])) goto oom;
    }
    size_t used;
    if (utf8_lossy(&out, (const unsigned char *)raw.p, raw.n, 1, &used)) goto oom;
    free(raw.p);
    if (len) *len = out.n;
    return out.p;
oom:
    free(raw.p);
    free(out.p);
    qerr_set(err, "tokenizer: out of memory");
    return NULL;
}

struct TokStream {
    const Tok *t;
    int skip_special;
    unsigned char held[4]; /* an incomplete character (at most 3 bytes) */
    size_t n_held;
    Buf in, out;
};

TokStream *tok_stream_new(const Tok *t, int skip_special, QErr *err) {
    TokStream *s = calloc(1, sizeof *s);
    if (!s || buf_reserve(&s->out, 16)) {
        free(s);
        qerr_set(err, "tokenizer: out of memory");
        return NULL;
    }
    s->t = t;
    s->skip_special = skip_special;
    return s;
}

void tok_stream_free(TokStream *s) {
    if (!s) return;
    free(s->in.p);
    free(s->out.p);
    free(s);
}

const char *tok_stream_put(TokStream *s, int32_t id, size_t *len, QErr *err) {
    const Tok *t = s->t;
    if (!valid_id(t, id)) {
        qerr_set(err, "invalid token id %d (the vocabulary has ids 0..%d)", id, t->n_ids - 1);
        return NULL;
    }
    s->out.n = 0;
    s->out.p[0] = '\0';
    if (!(s->skip_special && (t->flags[id] & F_SPECIAL))) {
        s->in.n = 0;
        size_t used;
        if (buf_add(&s->in, s->held, s->n_held) ||
            buf_add(&s->in, t->pool + t->dec_off[id], t->dec_len[id]) ||
            utf8_lossy(&s->out, (const unsigned char *)s->in.p, s->in.n, 0, &used)) {
            qerr_set(err, "tokenizer: out of memory");
            return NULL;
        }
        s->n_held = s->in.n - used;
        memcpy(s->held, s->in.p + used, s->n_held);
    }
    if (len) *len = s->out.n;
    return s->out.p;
}

const char *tok_stream_flush(TokStream *s, size_t *len) {
    size_t used;
    s->out.n = 0;
    /* out has room for 16 bytes and held <= 3 bytes needs at most 10: cannot fail */
    utf8_lossy(&s->out, s->held, s->n_held, 1, &used);
    s->n_held = 0;
    if (len) *len = s->out.n;
    return s->out.p;
}
