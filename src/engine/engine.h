/* engine.h — the one engine every front end drives (CLI run/chat, server, bench, eval):
 * requests in, token events out. Each step: schedule() -> model_forward() -> sample -> update.
 *
 * Threading: engine_add/engine_abort may be called from any thread. Either the caller drives the
 * loop with engine_step() (the CLI), or engine_start() runs it on its own thread (the server).
 * Callbacks run on the thread that runs the loop and must be quick (copy, signal, return). */
#ifndef QUILL_ENGINE_H
#define QUILL_ENGINE_H

#include <stdint.h>

#include "engine/request.h"
#include "model/qwen3.h"

typedef struct Engine Engine;

typedef struct EngineOptions {
    int max_seqs;        /* sequences per step (--max-num-seqs) */
    int max_step_tokens; /* token budget per step (chunked prefill size) */
    int max_model_len;   /* prompt + output limit per request */
    int kv_blocks;       /* 0: sized by kv_bytes */
    size_t kv_bytes;     /* KV pool budget when kv_blocks is 0 (0: 1 GiB) */
    bool kv_all_seqs;    /* instead of kv_bytes: a pool for max_seqs sequences of max_model_len */
    double kv_mem_fraction; /* > 0: ModelOptions.kv_mem_fraction (the budget then applies only
                               where the backend cannot report device memory) */
    KvDtype kv_dtype;    /* ModelOptions.kv_dtype */
    int block_size;      /* 16 */
    bool prefix_caching; /* reuse KV blocks of identical prompt prefixes (default on) */
    bool embed_resident; /* ModelOptions.embed_resident (a server's choice: default off) */
    bool every_logit;    /* the model returns logits for every token of a step (callers of
                            model_forward that score whole windows, e.g. quill eval); otherwise
                            a step has at most max_seqs + min(max_seqs, 4) * spec_tokens +
                            min(max_step_tokens, 1024) rows */
    int spec_tokens;     /* speculative decoding by n-gram lookup (vLLM's "ngram" method; see
                            engine.c): draft tokens per sequence and step, 0 (off) ..
                            ENGINE_MAX_SPEC_TOKENS */
    int spec_ngram_min, spec_ngram_max; /* the n-gram sizes looked up (vLLM's prompt_lookup_min
                                           / max), 1 <= min <= max */
} EngineOptions;

#define ENGINE_MAX_SPEC_TOKENS 16

typedef struct EngineStats {
    int running, waiting;
    int kv_blocks_total, kv_blocks_used;
    int peak_step_seqs; /* the most sequences one step has run */
    uint64_t steps, prompt_tokens, generated_tokens, preemptions;
    uint64_t prefix_query_tokens, prefix_hit_tokens; /* prompt tokens looked up / served from cache */
    uint64_t spec_draft_tokens, spec_accepted_tokens; /* speculative drafts verified / kept */
} EngineStats;

/* Sensible defaults for a config: 1 sequence, 512-token steps, context min(config, 32768). */
EngineOptions engine_default_options(const QwenConfig *cfg);
/* Model options matching engine options, for a model on a backend with op table ops (the pool's
 * bytes per cached value: kv_dtype_bytes); pass them to model_load / model_create. */
ModelOptions engine_model_options(const EngineOptions *o, const QwenConfig *cfg, const BackendOps *ops);

/* Creates an engine over a model loaded with engine_model_options(o). */
Engine *engine_create(Model *m, const EngineOptions *o, QErr *err);
void engine_free(Engine *e); /* stops the loop thread if running; pending requests are dropped */

/* Queues a request. Validates ids (< vocab), sampling values, and that prompt + max_tokens fits
 * max_model_len; err names the parameter (or says that the engine has failed: engine_failure). On success *id is its id and cb will be called at least
 * once more (its last event has finish != FINISH_NONE). Thread-safe. */
int engine_add(Engine *e, const int32_t *prompt, int n_prompt, const EngineParams *p, EngineCallback cb,
               void *user, uint64_t *id, QErr *err);
/* Asks for a request to stop; its blocks are freed before the next step; it ends with
 * FINISH_ABORT. Unknown or finished ids are ignored. Thread-safe. */
void engine_abort(Engine *e, uint64_t id);

/* Runs one step on the calling thread. Returns the number of unfinished requests. A step's token
 * events reach their callbacks during the next step (around its forward pass), or before this
 * call returns when no request is left unfinished. */
int engine_step(Engine *e);
/* Runs steps until no request is left (CLI use). */
void engine_run_until_idle(Engine *e);
/* Starts / stops the background loop thread. */
int engine_start(Engine *e, QErr *err);
void engine_stop(Engine *e);

EngineStats engine_stats(Engine *e); /* thread-safe snapshot */
/* Why the engine stopped serving, or NULL while it works: once the backend reports a failure
 * (backend.h's error op) after a step, every request in flight ends with FINISH_ABORT and every
 * later one is refused. Thread-safe. */
const char *engine_failure(Engine *e);
const Model *engine_model(const Engine *e);

#endif
