/* scheduler.h — which requests run in the next step and how many of their tokens: bookkeeping
 * only, it never touches tensors (vLLM v1's shape). Running requests come first (a decode token
 * each, or the next chunk of a long prompt), then waiting ones while the token budget, the
 * sequence limit and free KV blocks allow. A running request's speculative drafts (n_draft, set
 * by the engine before scheduling) are scheduled after its pending token as far as the budget
 * goes (n_draft is cut to what was scheduled), and dropped rather than preempt anything for their
 * blocks. When a running request needs
 * a block and none is free, the most recently admitted request is preempted (its blocks freed;
 * it waits again and recomputes later), so nothing ever fails for lack of cache.
 *
 * Prefix caching: a request admitted from scratch first takes the cached blocks that hold its
 * leading full blocks of tokens (at least its last token is always computed, to get logits), and
 * every block a request fills is registered for later requests (sched_cache_blocks). Requests
 * that want prompt logprobs compute their whole prompt, in chunks of at most
 * max_prompt_logit_tokens per step over all such requests (each of those tokens returns a row
 * of logits; every other request at most one), which bounds the logits a step returns. */
#ifndef QUILL_SCHEDULER_H
#define QUILL_SCHEDULER_H

#include <stdbool.h>

#include "engine/block_pool.h"
#include "engine/request.h"

typedef struct Scheduler {
    int max_step_tokens;
    int max_prompt_logit_tokens; /* see above; sched_init sets max_step_tokens (no bound) */
    int max_seqs;
    int block_size;
    BlockPool pool;
    Request **waiting;  /* FIFO */
    int n_waiting, cap_waiting;
    Request **running;  /* admission order */
    int n_running, cap_running;
    bool prefix_caching;
    uint64_t prefix_query_tokens, prefix_hit_tokens; /* prompt tokens looked up / found cached */
} Scheduler;

typedef struct SchedItem {
    Request *req;
    int n_tokens;       /* tokens to compute this step, starting at req->n_computed */
} SchedItem;

typedef struct SchedOutput {
    SchedItem *items;   /* capacity max_seqs */
    int n_items;
    int n_tokens;
    int n_preempted;
} SchedOutput;

int sched_init(Scheduler *s, int max_step_tokens, int max_seqs, int n_blocks, int block_size, bool prefix_caching);
void sched_destroy(Scheduler *s);
/* Queues a new request (state WAITING). Returns -1 on out of memory. */
int sched_add(Scheduler *s, Request *r);
/* Fills out with this step's work (possibly empty). */
void sched_schedule(Scheduler *s, SchedOutput *out);
/* Removes a request (finished or aborted) from whichever queue holds it and frees its blocks. */
void sched_remove(Scheduler *s, Request *r);
/* After a step advanced r->n_computed: registers r's newly filled blocks in the prefix cache. */
void sched_cache_blocks(Scheduler *s, Request *r);
/* Blocks a request with ctx tokens needs. */
int sched_blocks_for(const Scheduler *s, int ctx);

#endif
