/* gen.h — one HTTP request's generation: its engine requests (prompts x n choices), the events
 * they send, and what those events become: detokenized text cut at stop strings, split into
 * reasoning / content / tool calls for chat, with logprobs and usage. Protocol-free: openai.c
 * formats a Gen as JSON or SSE, server.c moves bytes.
 *
 * Threads: the engine thread calls the Gen's callback, which copies the event into a queue,
 * makes gen_fd() readable and returns. Everything else (gen_pump, the choices' fields) belongs to
 * the one HTTP thread serving the request. The Gen is reference-counted between the two: it is
 * freed when the HTTP side has called gen_release() and every engine request has sent its last
 * event, so a disconnect can release at once while the engine still holds aborted requests. */
#ifndef QUILL_SERVER_GEN_H
#define QUILL_SERVER_GEN_H

#include <stdbool.h>
#include <stdint.h>

#include "engine/engine.h"
#include "server/metrics.h"
#include "text/forced_tools.h"
#include "text/structured.h"
#include "text/tokenizer.h"
#include "util/strbuf.h"

/* One token's logprob record: the chosen token and the most likely ones, descending. */
typedef struct GenLp {
    int32_t token;
    float logprob;
    int n_top;
    int32_t top_ids[ENGINE_MAX_LOGPROBS];
    float top_lp[ENGINE_MAX_LOGPROBS];
} GenLp;

typedef struct GenToolCall {
    char *id, *name;
    StrBuf arguments; /* JSON text; a forced call's grows as it is generated */
} GenToolCall;

typedef struct GenPrompt {
    int32_t *ids;
    int n;
    int max_tokens; /* this prompt's generation budget */
    char *text;     /* the prompt as text, for echo (NULL when not echoed) */
} GenPrompt;

/* What to run; everything owned (free with gen_spec_free, or hand it to gen_new). */
typedef struct GenSpec {
    GenPrompt *prompts;
    int n_prompts;
    int n;                /* choices per prompt; choice i*n+j is prompt i's j-th */
    EngineParams params;  /* shared by every choice (max_tokens comes from the prompt; a seed is
                             offset by j so that choices differ) */
    char **stop;          /* stop strings: the output is cut before the first match */
    int n_stop;
    bool skip_special;    /* detokenize without special tokens */
    bool chat;            /* parse reasoning and tool calls (text/reasoning.h) */
    bool thinking, tools; /* the parser's modes */
    ForcedTool forced;    /* chat: the content is a forced call's (text/forced_tools.h; format holds
                             it to its form, and tools is false) */
    char *forced_name;    /* FORCED_NAMED: the function */
    OutputFormat format;       /* JSON mode, a schema or a choice (its strings, the schema's reference
                                  owned): a constraint per choice */
    const StructVocab *vocab;  /* for the constraint (not owned); set with format */
} GenSpec;

void gen_spec_free(GenSpec *s); /* frees the contents; NULL allowed */

typedef struct GenChoice {
    int index, prompt;
    /* The output so far. Completions: `text` is the generated text. Chat: `text` is the content,
     * `reasoning` the reasoning, `tools` the parsed tool calls. */
    StrBuf text, reasoning;
    GenToolCall *tools;
    int n_tools;
    GenLp *lps;           /* one per generated token when params.logprobs >= 0 */
    int n_lps;
    GenLp *prompt_lps;    /* [n_prompt] when params.prompt_logprobs >= 0 (entry 0 has no logprob) */
    int n_gen;            /* generated tokens (usage) */
    bool done;
    const char *finish_reason; /* "stop", "length", "tool_calls", "abort" once done (a forced named
                                  call ends with "stop", as in OpenAI and vLLM) */
    char *stop_str;       /* the stop string that ended it, or NULL */
    int32_t stop_token;   /* the stop_token_ids entry that ended it, or -1 */
    /* Cursors of the streaming writer (openai.c); gen.c never reads them. */
    size_t sent_text, sent_reasoning;
    int sent_tools, sent_lps;
    size_t sent_args;     /* bytes sent of the arguments of call sent_tools - 1 */
    long sent_chars;      /* completions: characters sent so far (text_offset) */
    bool sent_start, sent_finish;
    /* gen.c's own state */
    struct Gen *gen;
    uint64_t engine_id;
    bool added;
    double t_last;        /* engine thread: time of the previous token */
    struct GenPipe *pipe;
} GenChoice;

typedef struct Gen Gen;

/* A generation over spec (ownership moves to the Gen, also on failure). Nothing runs until
 * gen_submit. NULL with err on out of memory. metrics may be NULL. */
Gen *gen_new(Engine *e, const Tok *tok, Metrics *metrics, GenSpec *spec, QErr *err);
/* Adds every choice to the engine. All or nothing: on error (err from engine_add) the ones
 * already added are aborted and -1 is returned; the Gen must still be released. */
int gen_submit(Gen *g, QErr *err);
/* A file descriptor that polls readable when gen_pump has events to take. */
int gen_fd(const Gen *g);
/* Takes the queued events and applies them to the choices. Returns 1 when every choice is done. */
int gen_pump(Gen *g);
bool gen_done(const Gen *g);
/* The HTTP side is finished with g: unfinished choices are aborted in the engine and g is freed
 * as soon as the engine has let go of it. g must not be used afterwards. */
void gen_release(Gen *g);

const GenSpec *gen_spec(const Gen *g);
int gen_n_choices(const Gen *g);
GenChoice *gen_choice(Gen *g, int i);
int gen_prompt_tokens(const Gen *g);     /* sum of prompt lengths (each prompt once) */
int gen_completion_tokens(const Gen *g); /* sum of the choices' n_gen */
/* The text of one token as a logprob entry shows it (decoded alone, specials included). Returns a
 * malloc'd string ("" for an id the tokenizer lacks). */
char *gen_token_text(const Gen *g, int32_t id);
/* The bytes of one token and their count ("" and 0 for an id the tokenizer lacks). */
const char *gen_token_bytes(const Gen *g, int32_t id, size_t *len);

/* Writes n random lowercase hex digits and a NUL into out (n + 1 bytes), for response and tool
 * call ids. Thread-safe. */
void gen_random_hex(char *out, int n);

#endif
