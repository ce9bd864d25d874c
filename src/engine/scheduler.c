/* scheduler.c — see scheduler.h. The queues are small arrays (tens to hundreds of requests), so
 * linear removal is simpler and as fast as anything cleverer. */
#include "engine/scheduler.h"

#include <stdlib.h>
#include <string.h>

int sched_init(Scheduler *s, int max_step_tokens, int max_seqs, int n_blocks, int block_size, bool prefix_caching) {
    memset(s, 0, sizeof *s);
    s->max_step_tokens = max_step_tokens;
    s->max_prompt_logit_tokens = max_step_tokens;
    s->max_seqs = max_seqs;
    s->block_size = block_size;
    s->prefix_caching = prefix_caching;
    return block_pool_init(&s->pool, n_blocks, block_size);
}

void sched_destroy(Scheduler *s) {
    block_pool_destroy(&s->pool);
    free(s->waiting);
    free(s->running);
}

static int push(Request ***arr, int *n, int *cap, Request *r, bool front) {
    if (*n == *cap) {
        int nc = *cap ? 2 * *cap : 16;
        Request **p = realloc(*arr, (size_t)nc * sizeof *p);
        if (!p) return -1;
        *arr = p;
        *cap = nc;
    }
    if (front) {
        memmove(*arr + 1, *arr, (size_t)*n * sizeof **arr);
        (*arr)[0] = r;
    } else {
        (*arr)[*n] = r;
    }
    (*n)++;
    return 0;
}

static void drop(Request **arr, int *n, Request *r) {
    for (int i = 0; i < *n; i++)
        if (arr[i] == r) {
            memmove(arr + i, arr + i + 1, (size_t)(*n - i - 1) * sizeof *arr);
            (*n)--;
            return;
        }
}

int sched_add(Scheduler *s, Request *r) {
    r->state = REQ_WAITING;
    return push(&s->waiting, &s->n_waiting, &s->cap_waiting, r, false);
}

int sched_blocks_for(const Scheduler *s, int ctx) { return (ctx + s->block_size - 1) / s->block_size; }

static void free_blocks(Scheduler *s, Request *r) {
    /* Last blocks first: the LRU then evicts a sequence's tail before its shared head. */
    for (int i = r->n_blocks - 1; i >= 0; i--) block_pool_release(&s->pool, r->blocks[i]);
    r->n_blocks = 0;
    r->n_cached_blocks = 0;
    r->last_hash = 0;
}

/* Takes the cached blocks holding r's leading full blocks (a request starting from scratch). */
static void take_cached_prefix(Scheduler *s, Request *r) {
    int bs = s->block_size, total = r->n_prompt + r->n_output;
    if (!s->prefix_caching || r->params.prompt_logprobs >= 0) return;
    int max_blocks = (total - 1) / bs; /* leave at least one token to compute */
    while (r->n_cached_blocks < max_blocks) {
        const int32_t *tok = r->tokens + (size_t)r->n_cached_blocks * bs;
        uint64_t h = block_pool_hash(r->last_hash, tok, bs);
        int32_t id = block_pool_lookup(&s->pool, h, r->last_hash, tok);
        if (id < 0) break;
        r->blocks[r->n_blocks++] = id;
        r->n_cached_blocks++;
        r->last_hash = h;
    }
    r->n_computed = r->n_cached_blocks * bs;
}

void sched_cache_blocks(Scheduler *s, Request *r) {
    if (!s->prefix_caching) return;
    int bs = s->block_size;
    while ((r->n_cached_blocks + 1) * bs <= r->n_computed) {
        const int32_t *tok = r->tokens + (size_t)r->n_cached_blocks * bs;
        uint64_t h = block_pool_hash(r->last_hash, tok, bs);
        block_pool_register(&s->pool, r->blocks[r->n_cached_blocks], h, r->last_hash, tok);
        r->last_hash = h;
        r->n_cached_blocks++;
    }
}

/* Grows r's block table to cover ctx tokens; false (nothing taken) if the pool is short. */
static bool reserve(Scheduler *s, Request *r, int ctx) {
    int need = sched_blocks_for(s, ctx) - r->n_blocks;
    if (need <= 0) return true;
    if (need > s->pool.n_free) return false;
    for (int i = 0; i < need; i++) r->blocks[r->n_blocks++] = block_pool_alloc(&s->pool);
    return true;
}

void sched_remove(Scheduler *s, Request *r) {
    free_blocks(s, r);
    if (r->state == REQ_WAITING)
        drop(s->waiting, &s->n_waiting, r);
    else if (r->state == REQ_RUNNING)
        drop(s->running, &s->n_running, r);
    r->state = REQ_FINISHED;
}

static void preempt(Scheduler *s, Request *r) {
    free_blocks(s, r);
    drop(s->running, &s->n_running, r);
    r->n_computed = 0;
    r->state = REQ_WAITING;
    push(&s->waiting, &s->n_waiting, &s->cap_waiting, r, true); /* cannot fail: it just left running */
}

/* Whether every token r computes now returns logits (prompt logprobs, while in its prompt). */
static bool wants_prompt_logits(const Request *r) {
    return r->params.prompt_logprobs >= 0 && r->n_computed < r->n_prompt;
}

void sched_schedule(Scheduler *s, SchedOutput *out) {
    out->n_items = 0;
    out->n_tokens = 0;
    out->n_preempted = 0;
    int budget = s->max_step_tokens, logit_budget = s->max_prompt_logit_tokens;

    for (int i = 0; i < s->n_running && budget > 0;) {
        Request *r = s->running[i];
        const int owed = r->n_prompt + r->n_output - r->n_computed; /* tokens due before any draft */
        int n = owed + r->n_draft;
        if (n > budget) n = budget;
        if (wants_prompt_logits(r) && n > logit_budget) n = logit_budget;
        if (r->n_draft > n - owed) r->n_draft = n > owed ? n - owed : 0; /* drafts as far as the budget goes */
        if (n <= 0) {
            i++;
            continue;
        }
        if (!reserve(s, r, r->n_computed + n)) {
            if (r->n_draft) { /* drafts are optional: try again without them first */
                r->n_draft = 0;
                continue;
            }
            /* Free the newest running request (possibly r itself) and try again. */
            Request *victim = s->running[s->n_running - 1];
            for (int k = 0; k < out->n_items; k++)
                if (out->items[k].req == victim) {
                    out->n_tokens -= out->items[k].n_tokens;
                    budget += out->items[k].n_tokens;
                    if (wants_prompt_logits(victim)) logit_budget += out->items[k].n_tokens;
                    out->items[k] = out->items[--out->n_items];
                    break;
                }
            preempt(s, victim);
            out->n_preempted++;
            continue;
        }
        out->items[out->n_items++] = (SchedItem){r, n};
        out->n_tokens += n;
        budget -= n;
        if (wants_prompt_logits(r)) logit_budget -= n;
        i++;
    }

    while (s->n_waiting > 0 && budget > 0 && s->n_running < s->max_seqs && out->n_preempted == 0) {
        Request *r = s->waiting[0];
        int total = r->n_prompt + r->n_output;
        bool fresh = r->n_computed == 0;
        if (fresh) take_cached_prefix(s, r);
        int n = total - r->n_computed;
        if (n > budget) n = budget;
        if (wants_prompt_logits(r) && n > logit_budget) n = logit_budget;
        if (n <= 0) break; /* FIFO: it waits for a step with logit rows to spare */
        if (!reserve(s, r, r->n_computed + n)) { /* wait for blocks: admission control */
            free_blocks(s, r);
            r->n_computed = 0;
            break;
        }
        if (fresh) {
            s->prefix_query_tokens += (uint64_t)r->n_prompt;
            s->prefix_hit_tokens += (uint64_t)(r->n_computed < r->n_prompt ? r->n_computed : r->n_prompt);
        }
        drop(s->waiting, &s->n_waiting, r);
        r->state = REQ_RUNNING;
        push(&s->running, &s->n_running, &s->cap_running, r, false);
        out->items[out->n_items++] = (SchedItem){r, n};
        out->n_tokens += n;
        budget -= n;
        if (wants_prompt_logits(r)) logit_budget -= n;
    }
}
