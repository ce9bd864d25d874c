/* request.h — one generation request as the engine tracks it, and the events it emits.
 * Front ends (CLI, HTTP server, eval) see only EngineParams in and EngineEvent out. */
#ifndef QUILL_REQUEST_H
#define QUILL_REQUEST_H

#include <stdbool.h>
#include <stdint.h>

#include "model/sampler.h"

#define ENGINE_MAX_STOP_IDS 16
#define ENGINE_MAX_LOGPROBS 20

typedef enum FinishReason {
    FINISH_NONE = 0,
    FINISH_STOP,   /* an EOS or stop token */
    FINISH_LENGTH, /* max_tokens or the context length */
    FINISH_ABORT,  /* engine_abort (client gone, stop string matched by the front end) */
} FinishReason;

const char *finish_reason_name(FinishReason r); /* "stop", "length", "abort" */

/* A rule on the output (e.g. JSON mode, text/structured.h), or none (state NULL). Before each
 * sampling of the request, mask sets the logits of the tokens it forbids to -INFINITY (leaving at
 * least one); each token chosen is then passed to accept. A request with one samples on the host.
 * engine_add takes it over on success (free(state) when the request ends); on failure it stays the
 * caller's. */
typedef struct OutputConstraint {
    void *state;
    void (*mask)(void *state, float *logits, int vocab);
    void (*accept)(void *state, int32_t token);
    void (*free)(void *state);
} OutputConstraint;

/* What a front end asks for. */
typedef struct EngineParams {
    SamplingParams sampling;
    int max_tokens;       /* new tokens at most (>= 1) */
    int min_tokens;       /* EOS/stop ids are masked until this many are generated */
    bool ignore_eos;
    int32_t stop_ids[ENGINE_MAX_STOP_IDS]; /* besides the model's EOS ids */
    int n_stop_ids;
    int logprobs;         /* -1: none; else chosen token's logprob + this many top (<= 20) */
    int prompt_logprobs;  /* -1: none; else the same for every prompt token after the first */
    OutputConstraint constraint;
} EngineParams;

/* Defaults: greedy, 16 tokens, no logprobs. */
EngineParams engine_params_default(void);

/* One thing that happened to a request; pointers are valid during the callback only. */
typedef struct EngineEvent {
    uint64_t id;
    int32_t token;             /* a new token, or -1 (prompt logprobs only / finish only) */
    float logprob;             /* of token, when logprobs >= 0 */
    int n_top;
    const int32_t *top_ids;
    const float *top_logprobs;
    /* prompt logprobs for prompt positions [prompt_lp_start, prompt_lp_start + prompt_lp_count) */
    int prompt_lp_start, prompt_lp_count;
    const float *prompt_lp;          /* [count] */
    const int32_t *prompt_top_ids;   /* [count][n_top] */
    const float *prompt_top_lp;      /* [count][n_top] */
    FinishReason finish;       /* set on the request's last event */
    int n_prompt, n_output;
} EngineEvent;

typedef void (*EngineCallback)(void *user, const EngineEvent *ev);

typedef enum RequestState { REQ_WAITING, REQ_RUNNING, REQ_FINISHED } RequestState;

typedef struct Request {
    uint64_t id;
    EngineParams params;
    EngineCallback cb;
    void *user;
    int32_t *tokens;      /* prompt then output; capacity n_prompt + max_tokens */
    int n_prompt, n_output;
    int n_computed;       /* tokens whose K/V are in the cache */
    int n_draft;          /* speculative draft tokens in tokens[] after the output, this step */
    int draft_len;        /* drafts to ask for next (engine.c; 0: not yet drafted) */
    int32_t *blocks;      /* block table; capacity for n_prompt + max_tokens tokens */
    int n_blocks;
    int n_cached_blocks;  /* leading blocks registered in (or taken from) the prefix cache */
    uint64_t last_hash;   /* prefix hash after those blocks */
    Rng rng;
    RequestState state;
    FinishReason finish;
    bool abort_requested;
} Request;

#endif
