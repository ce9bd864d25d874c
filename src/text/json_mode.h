/* json_mode.h — "JSON mode" (OpenAI's response_format {"type": "json_object"}): the output is
 * held to a JSON object by masking, before each sampling, every token whose bytes would leave
 * the text so far no longer a prefix of one; end-of-sequence is allowed only once the object is
 * complete. A byte-level pushdown recogniser of RFC 8259 JSON (top level: an object) tracks the
 * text; each token is tried on a copy of its state.
 *
 * Limits: nesting depth JSON_MAX_DEPTH; at most JSON_MAX_WS whitespace bytes in a row (so that
 * a model cannot pad forever: after the object only whitespace and the end are allowed); string
 * contents are not checked to be valid UTF-8. */
#ifndef QUILL_JSON_MODE_H
#define QUILL_JSON_MODE_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/request.h"
#include "text/tokenizer.h"

#define JSON_MAX_DEPTH 64
#define JSON_MAX_WS 24

/* The recogniser's state; zero-initialised by json_state_init. */
typedef struct JsonState {
    uint8_t lex;           /* what comes next (json_mode.c's Lex) */
    uint8_t key;           /* the string being read is an object key */
    uint8_t sub;           /* \uXXXX digits left, the number's state or the literal's position */
    uint8_t lit;           /* which literal: true, false, null */
    uint8_t ws;            /* whitespace bytes in a row */
    uint8_t depth;
    uint8_t stack[JSON_MAX_DEPTH]; /* '{' or '[' per open container */
} JsonState;

void json_state_init(JsonState *s);
/* Feeds one byte: false (s then undefined) if the text would no longer be a JSON prefix. */
bool json_state_step(JsonState *s, uint8_t c);
/* Whether the text so far is a complete JSON object (with any whitespace after it). */
bool json_state_complete(const JsonState *s);

/* What JSON mode needs of a vocabulary, built once per tokenizer and shared by every constrained
 * request: each token's bytes and class, the model's end-of-sequence ids, the id that ends
 * Qwen3's thinking, and a cache of masks by recogniser state (thread-safe). */
typedef struct JsonVocab JsonVocab;

/* For tokenizer t and a model of `vocab` ids (ids past the tokenizer's are never allowed) whose
 * generation ends at eos_ids. NULL when out of memory. */
JsonVocab *json_vocab_new(const Tok *t, int vocab, const int32_t *eos_ids, int n_eos);
void json_vocab_free(JsonVocab *v);

/* A constraint for one request: active at once, or (think_first) only after the token that ends
 * the thinking (`</think>`), the reasoning being free text. stop_ids (besides the model's EOS)
 * also count as ends. The result owns its state (the engine frees it with the request); .state is
 * NULL when out of memory. */
OutputConstraint json_mode_constraint(const JsonVocab *v, bool think_first, const int32_t *stop_ids, int n_stop_ids);

#endif
