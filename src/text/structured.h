/* structured.h — structured outputs: masks that hold generation to a form, as vLLM's structured
 * output does. Before each sampling the constraint forbids every token whose bytes would take
 * the text out of the form; the end of sequence is allowed only once the text is whole.
 *
 * - JSON schema (OpenAI's response_format {"type": "json_schema"}, vLLM's guided_json and
 *   structured_outputs.json): a value valid under a schema, by text/json_schema.h's recogniser
 *   (its subset and limits are listed there); each token is tried on a copy of its state.
 * - JSON mode (response_format {"type": "json_object"}): any JSON object, the same recogniser on
 *   the schema {"type": "object", "additionalProperties": {}}.
 * - Choice (vLLM's guided_choice / structured_outputs.choice): exactly one of a list of strings.
 *
 * Both can wait for the end of Qwen3's thinking (`</think>`) first, the reasoning being free. */
#ifndef QUILL_STRUCTURED_H
#define QUILL_STRUCTURED_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/request.h"
#include "text/json_schema.h"
#include "text/tokenizer.h"

/* What the constraints need of a vocabulary, built once per tokenizer and shared by every
 * constrained request: each token's bytes and class, the ids by first byte, the model's
 * end-of-sequence ids, the id that ends Qwen3's thinking, JSON mode's schema, and the cache of
 * JSON masks by schema and recogniser state (thread-safe). */
typedef struct StructVocab StructVocab;

/* For tokenizer t and a model of `vocab` ids (ids past the tokenizer's are never allowed) whose
 * generation ends at eos_ids. NULL when out of memory. */
StructVocab *struct_vocab_new(const Tok *t, int vocab, const int32_t *eos_ids, int n_eos);
void struct_vocab_free(StructVocab *v);

/* A request's form: free text, a JSON object, a value valid under a schema, or one of
 * choices[0 .. n_choices). */
typedef enum OutputKind { OUTPUT_TEXT, OUTPUT_JSON_OBJECT, OUTPUT_JSON_SCHEMA, OUTPUT_CHOICE } OutputKind;
typedef struct OutputFormat {
    OutputKind kind;
    JsonSchema *schema; /* OUTPUT_JSON_SCHEMA: a reference owned by whoever owns the format */
    char **choices;     /* OUTPUT_CHOICE: non-empty strings (owned by whoever owns the format) */
    int n_choices;
} OutputFormat;

/* The constraint for one request of form f (not OUTPUT_TEXT): active at once, or (think_first)
 * only after the token that ends the thinking. stop_ids (besides the model's EOS) also count as
 * ends. The result owns its state, choices copied and the schema referenced (the engine frees it
 * with the request); .state is NULL when out of memory. */
OutputConstraint output_constraint(const StructVocab *v, const OutputFormat *f, bool think_first, const int32_t *stop_ids,
                                   int n_stop_ids);

#endif
