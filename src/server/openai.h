/* openai.h — the OpenAI API schema as vLLM serves it: parsing and validating
 * /v1/chat/completions and /v1/completions bodies into a GenSpec, and writing a Gen back as a
 * response, as server-sent-event chunks, or an error object.
 *
 * Accepted request fields (both endpoints unless noted): model, max_tokens, temperature, top_p,
 * top_k, min_p, presence_penalty, frequency_penalty, repetition_penalty, logit_bias, seed, stop
 * (string or list), stop_token_ids, n, min_tokens, ignore_eos, skip_special_tokens, stream,
 * stream_options.include_usage, return_tokens_as_token_ids; chat: messages, tools, tool_choice,
 * logprobs (bool), top_logprobs, max_completion_tokens, chat_template_kwargs.enable_thinking,
 * add_generation_prompt; completions: prompt (string, strings, token ids, lists of token ids),
 * echo, logprobs (int). Absent sampling fields take the model's generation_config values (as
 * vLLM does). Structured outputs (text/structured.h; chat: the content after the reasoning):
 * response_format {"type": "json_object"} (a JSON object) or {"type": "json_schema",
 * "json_schema": {"name", "schema", "strict"}} (text/json_schema.h's subset; a schema beyond it is
 * refused, naming the keyword), and vLLM's guided_json, guided_choice or structured_outputs
 * {"json": schema} / {"choice": [...]} / {"json_object": true}.
 *
 * tool_choice, as vLLM: "auto" (the default with tools: hermes <tool_call>s in the output become
 * tool calls) or "none" (they stay text); or a call forced through structured outputs (so never
 * beside another output form): {"type": "function", "function": {"name": NAME}} holds the output
 * to a value of NAME's parameters schema (any object without one) and returns it as one call to
 * NAME, finish_reason "stop"; "required" holds it to an array of calls [{"name", "parameters"}]
 * to the tools (text/json_schema.h's json_schema_tool_calls: exact, a tagged union on the name)
 * and returns each as a call, finish_reason "tool_calls". Either way content is null and the
 * arguments are the generated JSON text, streamed as it comes (text/forced_tools.h). Anything but
 * "none" needs tools (forcing, at least one); parameters schemas beyond the subset are refused.
 *
 * Unknown fields are ignored; a field that cannot be honoured (guided_regex / grammar, suffix) is
 * refused. null means absent. */
#ifndef QUILL_SERVER_OPENAI_H
#define QUILL_SERVER_OPENAI_H

#include <stdbool.h>

#include "model/sampler.h"
#include "server/gen.h"
#include "text/structured.h"
#include "text/tokenizer.h"
#include "util/strbuf.h"

/* An API error: HTTP status, message, and the request field at fault ("" when none). */
typedef struct OaiError {
    int status;
    char param[64];
    char message[1024];
} OaiError;

/* Fills e (if non-NULL) and returns -1. param may be NULL. */
int oai_error(OaiError *e, int status, const char *param, const char *fmt, ...) __attribute__((format(printf, 4, 5)));
/* {"error": {"message", "type", "param", "code"}} as a malloc'd string. */
char *oai_error_json(const OaiError *e);

/* What the server knows that parsing needs. */
typedef struct OaiContext {
    const Tok *tok;
    const char *model_name; /* the served name; requests naming another model get 404 */
    const char *model_root; /* MODEL_DIR, shown by /v1/models */
    int max_model_len;
    int vocab_size;         /* the model's (token ids must be below it) */
    SamplingParams defaults;
    const StructVocab *vocab; /* for structured outputs */
} OaiContext;

typedef enum OaiKind { OAI_CHAT, OAI_COMPLETION } OaiKind;

typedef struct OaiRequest {
    OaiKind kind;
    GenSpec spec;           /* moved into gen_new by the caller */
    bool stream, include_usage;
    bool echo;              /* completions */
    int top_logprobs;       /* chat: top_logprobs when logprobs is true, else -1 */
    bool tokens_as_ids;     /* return_tokens_as_token_ids: "token_id:N" instead of text */
    char id[64];            /* "chatcmpl-..." or "cmpl-..." */
    long long created;
    const char *model;      /* the context's model_name */
} OaiRequest;

/* Parses and validates a request body. Returns 0 with *r filled (free with oai_request_free), or
 * -1 with err: 400 for malformed JSON, wrong types, out-of-range values, prompts that do not fit
 * max_model_len or fail to render/tokenize; 404 for an unknown model. */
int oai_parse(OaiRequest *r, OaiKind kind, const char *body, size_t len, const OaiContext *ctx, OaiError *err);
void oai_request_free(OaiRequest *r);

/* The complete (non-streaming) response body for a finished g, malloc'd. */
char *oai_response(const OaiRequest *r, Gen *g);
/* Appends SSE events ("data: {...}\n\n") for whatever g's choices produced since the last call
 * (the choices' sent_* cursors track it): the role or echo chunk first, then deltas, then each
 * choice's finish. */
void oai_stream_chunks(const OaiRequest *r, Gen *g, StrBuf *out);
/* Appends the usage chunk (when include_usage) and "data: [DONE]". */
void oai_stream_end(const OaiRequest *r, Gen *g, StrBuf *out);

/* The GET /v1/models body, malloc'd. */
char *oai_models_json(const OaiContext *ctx);

/* vLLM's POST /tokenize: {"prompt": text} or a chat ({"messages", "tools", "chat_template_kwargs",
 * "add_generation_prompt" (default true)}, as /v1/chat/completions renders it) -> {"count",
 * "max_model_len", "tokens", "token_strs": null}. POST /detokenize: {"tokens": [ids]} ->
 * {"prompt": text}. Both take an optional "model". The response body, or NULL with err. */
char *oai_tokenize(const char *body, size_t len, const OaiContext *ctx, OaiError *err);
char *oai_detokenize(const char *body, size_t len, const OaiContext *ctx, OaiError *err);

#endif
