/* structured.h — structured outputs: masks that hold generation to a form, as vLLM's structured
 * output does. Before each sampling the constraint forbids every token whose bytes would take
 * the text out of the form; the end of sequence is allowed only once the text is whole.
 *
 * - JSON mode (OpenAI's response_format {"type": "json_object"}): a JSON object. A byte-level
 *   pushdown recogniser of RFC 8259 JSON (top level: an object) tracks the text; each token is
 *   tried on a copy of its state. Limits: nesting depth JSON_MAX_DEPTH; at most JSON_MAX_WS
 *   whitespace bytes in a row (so that a model cannot pad forever: after the object only
 *   whitespace and the end are allowed); string contents are not checked to be valid UTF-8.
 * - Choice (vLLM's guided_choice / structured_outputs.choice): exactly one of a list of strings.
 *
 * Both can wait for the end of Qwen3's thinking (`</think>`) first, the reasoning being free. */
#ifndef QUILL_STRUCTURED_H
#define QUILL_STRUCTURED_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/request.h"
#include "text/tokenizer.h"

#define JSON_MAX_DEPTH 64
#define JSON_MAX_WS 24

/* The recogniser's state; zero-initialised by json_state_init. */
typedef struct JsonState {
    uint8_t lex;           /* what comes next (structured.c's Lex) */
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

/* What the constraints need of a vocabulary, built once per tokenizer and shared by every
 * constrained request: each token's bytes and class, the ids by first byte, the model's
 * end-of-sequence ids, the id that ends Qwen3's thinking, and JSON mode's cache of masks by
 * recogniser state (thread-safe). */
typedef struct StructVocab StructVocab;

/* For tokenizer t and a model of `vocab` ids (ids past the tokenizer's are never allowed) whose
 * generation ends at eos_ids. NULL when out of memory. */
StructVocab *struct_vocab_new(const Tok *t, int vocab, const int32_t *eos_ids, int n_eos);
void struct_vocab_free(StructVocab *v);

/* A request's form: free text, a JSON object, or one of choices[0 .. n_choices). */
typedef enum OutputKind { OUTPUT_TEXT, OUTPUT_JSON_OBJECT, OUTPUT_CHOICE } OutputKind;
typedef struct OutputFormat {
    OutputKind kind;
    char **choices; /* OUTPUT_CHOICE: non-empty strings (owned by whoever owns the format) */
    int n_choices;
} OutputFormat;

/* The constraint for one request of form f (not OUTPUT_TEXT): active at once, or (think_first)
 * only after the token that ends the thinking. stop_ids (besides the model's EOS) also count as
 * ends. The result owns its state, choices copied (the engine frees it with the request); .state
 * is NULL when out of memory. */
OutputConstraint output_constraint(const StructVocab *v, const OutputFormat *f, bool think_first, const int32_t *stop_ids,
                                   int n_stop_ids);

#endif
