/* reasoning.h — splits Qwen3's generated text into reasoning, content and tool calls, as vLLM's
 * qwen3 reasoning parser and hermes tool parser do, incrementally so a server can stream it.
 *
 * Rules (the same whether the text arrives whole or in any chunks):
 *  - thinking on: an optional leading "<think>" is dropped; text before the first "</think>" is
 *    reasoning, text after it is content. With no "</think>" at all (generation cut short) every
 *    byte is reasoning, as vLLM does.
 *  - thinking off: all text is content.
 *  - tools on: in content, each "<tool_call>JSON</tool_call>" whose JSON is an object with a string
 *    "name" becomes a tool call (name, arguments re-serialised as json.dumps(ensure_ascii=False)
 *    would, "{}" when absent). An unterminated tool call at the end counts if its JSON is complete.
 *    Malformed ones stay in the content verbatim, tags included. A stretch of content before,
 *    between or after tool calls that is only whitespace is dropped (other stretches are kept
 *    verbatim, so "Let me check.\n" before a call stays as is).
 *  - A chunk ending in what could be the start of "</think>" / "<tool_call>" holds those bytes
 *    back until the next chunk (or rp_finish) decides, so a partial tag is never emitted.
 * Deltas are substrings of the input, so UTF-8 chunks give UTF-8 deltas. */
#ifndef QUILL_REASONING_H
#define QUILL_REASONING_H

#include <stdbool.h>
#include <stddef.h>

#include "util/qerr.h"

typedef enum RpKind { RP_REASONING, RP_CONTENT, RP_TOOL_CALL } RpKind;

typedef struct RpEvent {
    RpKind kind;
    char *text;      /* RP_REASONING / RP_CONTENT: the new text (non-empty); NULL for tool calls */
    char *name;      /* RP_TOOL_CALL: function name */
    char *arguments; /* RP_TOOL_CALL: arguments as JSON text, e.g. {"city": "Paris"} */
} RpEvent;

/* A growable list of events; zero-initialise it. Strings are owned by the list. */
typedef struct RpEvents {
    RpEvent *items;
    size_t n, cap;
} RpEvents;

/* Frees the events' strings and empties the list (keeps its array for reuse). */
void rp_events_clear(RpEvents *ev);
/* Frees everything; the list is then empty and may be reused. */
void rp_events_free(RpEvents *ev);

typedef struct RpParser RpParser;

/* A parser for one generation. `thinking`: the prompt asked for reasoning (enable_thinking);
 * `tools`: tool calls are expected (the request had tools). NULL with err on out of memory. */
RpParser *rp_new(bool thinking, bool tools, QErr *err);
void rp_free(RpParser *p);

/* Feeds the next len bytes of decoded output and appends the events they complete to `out`, in
 * order; consecutive text of one kind from this call is merged into one event. Returns the
 * number of events appended, or -1 with err set (out of memory only). */
int rp_feed(RpParser *p, const char *text, size_t len, RpEvents *out, QErr *err);

/* Ends the generation: flushes held-back bytes and a pending tool call. Same return as rp_feed;
 * the parser accepts no more input afterwards (-1 with err if fed). */
int rp_finish(RpParser *p, RpEvents *out, QErr *err);

/* The whole message, as a non-streaming response wants it. */
typedef struct RpToolCall {
    char *name;
    char *arguments;
} RpToolCall;

typedef struct RpResult {
    char *reasoning; /* NULL when there was none */
    char *content;   /* NULL when there was none */
    RpToolCall *tool_calls;
    size_t n_tool_calls;
} RpResult;

/* Appends the events to *res (zero-initialise it first). 0, or -1 with err on out of memory. */
int rp_collect(const RpEvents *ev, RpResult *res, QErr *err);
void rp_result_free(RpResult *res);

/* Parses a complete output in one call: rp_new + rp_feed + rp_finish + rp_collect. Fills a
 * zero-initialised *res the caller frees with rp_result_free; -1 with err on out of memory. */
int rp_parse(const char *text, size_t len, bool thinking, bool tools, RpResult *res, QErr *err);

#endif
