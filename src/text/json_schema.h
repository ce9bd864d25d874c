/* json_schema.h — JSON schemas compiled to a small graph, and a byte-level recogniser that walks
 * it: the text is a prefix of a JSON value valid under the schema, and whole at the end. Structured
 * outputs (text/structured.h) try each token's bytes on a copy of the recogniser's state; JSON
 * mode is the schema {"type": "object", "additionalProperties": {}}.
 *
 * The subset (OpenAI's strict mode and what vLLM users typically send):
 * - type: object, array, string, number, integer, boolean, null, or a list of them (any of them);
 *   no type: any JSON value, or the one kind its keywords imply (properties -> object, ...).
 * - object: properties, required, additionalProperties. Properties are generated in the schema's
 *   order; required ones always appear, optional ones may be skipped. Only the listed properties
 *   are generated, whether additionalProperties is false, true or absent (as xgrammar and OpenAI's
 *   strict mode do); an additionalProperties schema is a map of any keys to such values, and only
 *   without properties. unevaluatedProperties: false is accepted (it is what happens anyway).
 * - array: items (a schema, true, or false), minItems, maxItems; no items: any values.
 * - string: minLength, maxLength (in code points; contents are valid UTF-8).
 * - number: any JSON number; integer: digits, no fraction or exponent.
 * - enum, const: any JSON values, generated as jansson writes them compactly (one spelling per
 *   value); beside type only (values of another type are dropped).
 * - anyOf, oneOf (as anyOf, but overlaps are refused): the alternative is chosen by the value's
 *   first byte, so alternatives must differ in it: an object, an array, a string, a number and
 *   literals can be told apart. Overlaps that merge are allowed in anyOf: integer with number,
 *   literals with literals, equal strings. Several objects are allowed as a tagged union: when
 *   each object's first property is required, has the same key in all of them, and is one string
 *   (a const, or an enum of one value) that differs between them (the tag, as in
 *   {"name": {"const": "get_weather"}, ...}), the tag's value picks the object. A union counts
 *   as deep as its deepest object (so that whichever tag is written, its object still fits).
 * - $ref to "#", "#/$defs/NAME", "#/definitions/NAME" or any local JSON pointer; recursion is
 *   fine. $defs / definitions, and the annotations description, title, default, examples,
 *   $schema, $comment, deprecated, readOnly, writeOnly are taken as they are (the latter ignored);
 *   $id only at the root.
 * Every other keyword (pattern, format, minimum, multipleOf, allOf, not, prefixItems, ...) is
 * refused with an error that names it and its place in the schema (a JSON pointer); nothing that
 * constrains is ignored.
 *
 * Spelling and limits: values nest at most JSON_MAX_DEPTH containers (a schema that needs deeper
 * is refused; an optional deeper value is not started); whitespace is free between tokens, at most
 * JSON_MAX_WS bytes in a row; strings are valid UTF-8 without \u surrogate escapes (a character
 * beyond U+FFFF is written as itself), so that lengths count code points exactly; keys and enum
 * values are generated in one spelling (as above); numbers are as long as the model makes them.
 * SCHEMA_MAX bounds the counts and SCHEMA_MAX_NODES the graph. Masks are cached by the schema's
 * 64-bit hash and the state's bytes: two schemas with the same hash would share masks. */
#ifndef QUILL_JSON_SCHEMA_H
#define QUILL_JSON_SCHEMA_H

#include <jansson.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "util/qerr.h"

#define JSON_MAX_DEPTH 64
#define JSON_MAX_WS 24
#define SCHEMA_MAX 65535      /* bytes of a key or literal; minItems, maxItems, minLength, maxLength
                                 (exclusive); properties of an object, values of an enum */
#define SCHEMA_MAX_NODES 4096 /* nodes of a compiled schema */

typedef enum SchemaKind {
    SK_OBJECT,   /* properties [first, first + count), '}' once past the required ones */
    SK_MAP,      /* any keys, values of node item */
    SK_ARRAY,    /* items of node item, min..max of them */
    SK_STRING,   /* min..max code points (max SCHEMA_MAX: unbounded) */
    SK_NUMBER,
    SK_INTEGER,
    SK_LITERALS, /* one of the texts [first, first + count) (sorted, distinct) */
    SK_ANY_OF,   /* one of the nodes alts[first, first + count), told apart by their first byte */
    SK_UNION,    /* objects told apart by a tag: read as an object of one property, the tag
                    (props[first], count 1, need 1), whose value is the literal k of the tags
                    node; then the object alts[objects + k] goes on from its second property */
} SchemaKind;

typedef struct SchemaNode {
    uint8_t kind;
    uint8_t min_depth;   /* containers the shallowest valid value opens (> JSON_MAX_DEPTH: none fits) */
    uint16_t item;       /* array, map */
    uint16_t min, max;   /* array: items; string: code points */
    uint16_t need;       /* object: every required property is below this index */
    uint32_t first, count;
    uint32_t objects;    /* union: its objects in alts, in the order of the tags' literals */
    uint64_t starts[4];  /* bit b: a value can start with byte b */
} SchemaNode;

typedef struct SchemaText {
    uint32_t off, len; /* in JsonSchema.text */
} SchemaText;

typedef struct SchemaProp {
    SchemaText key; /* the key as JSON text, quotes included */
    uint16_t node;
    bool required;
} SchemaProp;

/* A compiled schema: immutable once built, shared by reference (one per request, one per
 * constraint of its choices). */
typedef struct JsonSchema {
    SchemaNode *nodes;
    SchemaProp *props;
    SchemaText *lits;
    uint16_t *alts;
    char *text;
    uint32_t n_nodes, n_props, n_lits, n_alts, n_text;
    uint16_t root;
    uint64_t hash;      /* of everything above: the mask cache's name for the schema */
    atomic_int refs;
} JsonSchema;

/* Compiles a schema (a JSON object or boolean). Returns it with one reference, or NULL with err:
 * the unsupported keyword or the impossible constraint and where it is ("... at /properties/x"),
 * or out of memory. */
JsonSchema *json_schema_compile(const json_t *schema, QErr *err);
/* JSON mode's schema: any JSON object. NULL when out of memory. */
JsonSchema *json_schema_any_object(void);
/* vLLM's schema for tool_choice "required": a JSON array of one or more calls
 * {"name": NAME, "parameters": PARAMS}, in that order, NAME one of names[0, n) (n >= 1, distinct)
 * and PARAMS valid under params[i]: a schema (an object or a boolean, its $refs local to it) or
 * NULL for any object. With several names the calls are a tagged union on "name". Returns the
 * schema with one reference, or NULL with err (a parameters schema beyond the subset: the error
 * names the function and the place in its parameters; repeated names; out of memory). */
JsonSchema *json_schema_tool_calls(const char *const *names, const json_t *const *params, int n, QErr *err);
JsonSchema *json_schema_ref(JsonSchema *s); /* another reference; returns s */
void json_schema_unref(JsonSchema *s);      /* NULL allowed; frees with the last reference */

/* The recogniser's state: a fixed-size value (tokens are tried on copies; the mask cache keys
 * it by json_match_key). Containers are frames; the scalar, key or punctuation being read is
 * described by the fields before them. */
typedef struct JsonFrame {
    uint16_t node;  /* the container's node */
    uint16_t index; /* object: the next property that may come; array: items begun (saturating) */
} JsonFrame;

typedef struct JsonMatch {
    uint16_t node;  /* the value expected, or the string / number / literals being read */
    uint16_t lit;   /* literals, keys: the first candidate (of the node's) the text so far fits */
    uint16_t pos;   /* literals, keys: bytes read */
    uint16_t count; /* string: code points read (saturating) */
    uint8_t lex;    /* what comes next (json_schema's enum Lex) */
    uint8_t sub;    /* \uXXXX digits left, the number's state, or the UTF-8 sequence's */
    uint8_t ws;     /* whitespace bytes in a row */
    uint8_t key;    /* the string being read is a map's key */
    uint8_t depth;
    JsonFrame stack[JSON_MAX_DEPTH];
} JsonMatch;

void json_match_init(JsonMatch *m, const JsonSchema *s);
/* Copies the state's live part (what a step may read) into dst: cheaper than a whole copy. */
void json_match_copy(JsonMatch *dst, const JsonMatch *src);
/* Feeds one byte: false (m then undefined) if the text would no longer be a prefix of a value
 * valid under s. */
bool json_match_step(JsonMatch *m, const JsonSchema *s, uint8_t c);
/* Whether the text so far is a whole valid value (any whitespace after it allowed). */
bool json_match_complete(const JsonMatch *m, const JsonSchema *s);
/* Whether inside a string of no maximum length at a character boundary: any token without
 * quotes, backslashes, control bytes or broken UTF-8 continues it. */
bool json_match_in_free_string(const JsonMatch *m, const JsonSchema *s);
/* The state's canonical bytes (equal states, equal bytes) into out, at most JSON_MATCH_KEY_MAX;
 * returns their count. */
#define JSON_MATCH_KEY_MAX (13 + 4 * JSON_MAX_DEPTH)
int json_match_key(const JsonMatch *m, uint8_t *out);

#endif
