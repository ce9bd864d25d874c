/* chat_template.h — Qwen3's chat template, rendered natively (no Jinja engine).
 *
 * The output is byte-identical to transformers' apply_chat_template with the template shipped in
 * Qwen3's tokenizer_config.json: system block (merged into the tools block when tools are given),
 * earlier turns' reasoning stripped (the template's last_query_index rule), `<think>` splitting
 * of assistant content when `reasoning_content` is absent, tool calls, consecutive tool messages
 * grouped into one user turn of `<tool_response>`s, and the empty think block that
 * enable_thinking=false appends to the generation prompt.
 *
 * Messages are OpenAI style (jansson values, object key order preserved):
 *   {"role": "system"|"user"|"assistant"|"tool",
 *    "content": string | null | [{"type": "text", "text": string}, ...],
 *    "reasoning_content": string | null            (assistant only, optional),
 *    "tool_calls": [{"type": "function", "function": {"name": string,
 *                    "arguments": JSON string (copied verbatim) | any JSON value (tojson)}}]}
 * A list of text parts is joined with "\n" (as vLLM does); null content is "". `content` may be
 * left out only by an assistant message that has tool_calls. Other keys are ignored. */
#ifndef QUILL_CHAT_TEMPLATE_H
#define QUILL_CHAT_TEMPLATE_H

#include <jansson.h>
#include <stdbool.h>

#include "util/qerr.h"

/* Renders `messages` (a non-empty JSON array) with optional `tools` (NULL, JSON null or an
 * array; an empty array means no tools, as in the template). Returns a malloc'd NUL-terminated
 * prompt the caller frees, or NULL with err naming the message index and field at fault
 * (e.g. "messages[2].role: unknown role 'bot' ..."). Strings containing NUL are refused. */
char *chat_template_render(const json_t *messages, const json_t *tools,
                           bool add_generation_prompt, bool enable_thinking, QErr *err);

/* Serialises any JSON value the way transformers' `tojson` filter does, i.e. Python's
 * json.dumps(v, ensure_ascii=False): separators ", " and ": ", keys in the object's order,
 * non-ASCII kept as UTF-8, control characters escaped (\n, \t, ... or \u00XX), reals written as
 * Python's repr (shortest round-trip digits: 1.0, 0.1, 1e-05, 1e+16). Returns a malloc'd string
 * the caller frees, or NULL with err set (out of memory, NUL inside a string, NaN/Inf). */
char *chat_tojson(const json_t *v, QErr *err);

#endif
