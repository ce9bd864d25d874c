/* tokjson.h — a read-only JSON document parsed in one pass into an arena, for tokenizer.json.
 *
 * The Qwen3 tokenizer.json is 11 MB with ~150k vocabulary entries and ~150k merge pairs; a
 * general DOM (jansson: one malloc and one hash insert per value) needs ~0.4 s for it, which is
 * most of a model's start-up. This parser keeps the file in memory, unescapes strings in place
 * and stores each container's children in one contiguous arena array, so parsing costs a few
 * tens of milliseconds. The price: the document is immutable, object members are found by a
 * linear scan (fine for the small objects of tokenizer.json; iterate big ones), and strings are
 * not checked for UTF-8 validity (callers validate what they use). */
#ifndef QUILL_TOKJSON_H
#define QUILL_TOKJSON_H

#include <stddef.h>
#include <stdint.h>

#include "util/qerr.h"

typedef enum { TJ_NULL, TJ_BOOL, TJ_NUM, TJ_STR, TJ_ARR, TJ_OBJ } TjType;

typedef struct TjVal {
    TjType type;
    uint32_t n; /* TJ_STR: byte length; TJ_ARR: number of items; TJ_OBJ: number of members */
    union {
        int b;                /* TJ_BOOL */
        double num;           /* TJ_NUM */
        const char *str;      /* TJ_STR: NUL-terminated, may itself contain NULs (use n) */
        struct TjVal *items;  /* TJ_ARR: n values; TJ_OBJ: 2n values, key (TJ_STR) then value */
    } u;
} TjVal;

typedef struct TjDoc TjDoc;

/* Reads and parses the JSON file at path (RFC 8259; nesting depth at most 512). Returns the
 * document, to be released with tj_free(), or NULL with err naming the file and, for syntax
 * errors, the line and column ("PATH: line 3, column 7: expected ':'"). */
TjDoc *tj_parse_file(const char *path, QErr *err);

/* Parses len bytes of text (need not be NUL-terminated; copied). Errors as tj_parse_file, with
 * `name` standing for the file name. */
TjDoc *tj_parse(const char *text, size_t len, const char *name, QErr *err);

/* The top-level value; valid until tj_free(). */
const TjVal *tj_root(const TjDoc *doc);

/* Frees the document and every value in it. NULL is allowed. */
void tj_free(TjDoc *doc);

/* The value of member `key` of an object (the first one if repeated), or NULL if obj is not an
 * object or has no such member. Linear in the number of members. */
const TjVal *tj_get(const TjVal *obj, const char *key);

/* "null", "boolean", "number", "string", "array" or "object". */
const char *tj_type_name(TjType t);

#endif
