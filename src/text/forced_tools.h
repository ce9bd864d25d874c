/* forced_tools.h — the tool calls in the output of a chat whose tool_choice forced a call, read
 * as vLLM reads them. Structured outputs held the content (the text after the reasoning) to one
 * of two forms:
 *  - FORCED_NAMED (tool_choice {"type": "function", "function": {"name": NAME}}): one JSON value,
 *    the arguments of a call to NAME (valid under its parameters);
 *  - FORCED_REQUIRED (tool_choice "required"): a JSON array of calls
 *    [{"name": NAME, "parameters": ARGS}, ...] (text/json_schema.h's json_schema_tool_calls),
 *    each a call to NAME with arguments ARGS.
 * Arguments are the generated JSON text itself (as vLLM passes a named call's), without the
 * whitespace around it. The reader is incremental, for streaming: a call begins as soon as its
 * name is known (named: with the first byte of its arguments, or at the end if none came) and
 * its arguments grow as text arrives, split anywhere. The text is trusted to be a prefix of the
 * form (the constraint's job); text cut short leaves the last call's arguments incomplete. */
#ifndef QUILL_FORCED_TOOLS_H
#define QUILL_FORCED_TOOLS_H

#include <stddef.h>

typedef enum ForcedTool { FORCED_NONE, FORCED_NAMED, FORCED_REQUIRED } ForcedTool;

/* Where the calls go: begin(user, name) when a call begins (name valid during the call only),
 * then arguments(user, bytes, n) for each more of its arguments (n > 0). */
typedef struct FtSink {
    void (*begin)(void *user, const char *name);
    void (*arguments)(void *user, const char *bytes, size_t n);
    void *user;
} FtSink;

typedef struct FtReader FtReader;

/* A reader for one generation of mode (FORCED_NAMED: the function's name, copied; otherwise
 * NULL). NULL when out of memory. */
FtReader *ft_new(ForcedTool mode, const char *name, FtSink sink);
void ft_free(FtReader *r);
/* Reads n more bytes of content, telling the sink what they complete. */
void ft_feed(FtReader *r, const char *text, size_t n);
/* The content has ended: a named call that has not begun begins (with no arguments). */
void ft_finish(FtReader *r);

#endif
