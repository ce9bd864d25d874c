/* test_scheduler.c — the scheduler's bookkeeping: token budget and chunked prefill, the sequence
 * limit, admission control when KV blocks run out (requests wait, never fail), preemption of the
 * newest request when a running one needs a block, and block accounting. */
#include <stdlib.h>
#include <string.h>

#include "../test_util.h"
#include "engine/scheduler.h"

static Request *req(int id, int n_prompt, int max_tokens, int block_size) {
    Request *r = calloc(1, sizeof *r);
    r->id = (uint64_t)id;
    r->n_prompt = n_prompt;
    r->params.max_tokens = max_tokens;
    r->tokens = calloc((size_t)(n_prompt + max_tokens), sizeof *r->tokens);
    r->blocks = calloc((size_t)((n_prompt + max_tokens) / block_size + 2), sizeof *r->blocks);
    return r;
}

static void free_req(Request *r) {
    free(r->tokens);
    free(r->blocks);
    free(r);
}

/* Applies a step's outcome as the engine would: computed tokens advance; a sequence that reached
 * its end gets one new token. */
static void apply(SchedOutput *o) {
    for (int i = 0; i < o->n_items; i++) {
        Request *r = o->items[i].req;
        r->n_computed += o->items[i].n_tokens;
        if (r->n_computed == r->n_prompt + r->n_output) r->n_output++;
    }
}

int main(void) {
    Scheduler s;
    SchedItem items[8];
    SchedOutput o = {.items = items};

    /* Chunked prefill: a 100-token prompt with a 32-token budget takes 4 steps, then decodes. */
    CHECK(sched_init(&s, 32, 4, 64, 16) == 0, "init");
    Request *a = req(1, 100, 10, 16);
    sched_add(&s, a);
    int chunks[4] = {32, 32, 32, 4};
    for (int k = 0; k < 4; k++) {
        sched_schedule(&s, &o);
        CHECK(o.n_items == 1 && o.items[0].n_tokens == chunks[k], "chunk %d: %d items, %d tokens", k, o.n_items,
              o.n_items ? o.items[0].n_tokens : -1);
        apply(&o);
    }
    CHECK(a->n_blocks == 7, "100 prompt + 1 output token need 7 blocks of 16, have %d", a->n_blocks);
    /* A new request joins while a decodes: decode first, then the newcomer's chunk in the rest. */
    Request *b = req(2, 40, 10, 16);
    sched_add(&s, b);
    sched_schedule(&s, &o);
    CHECK(o.n_items == 2 && o.items[0].req == a && o.items[0].n_tokens == 1 && o.items[1].req == b &&
              o.items[1].n_tokens == 31,
          "continuous batching: decode + 31-token chunk");
    apply(&o);
    sched_remove(&s, a);
    sched_remove(&s, b);
    CHECK(s.pool.n_free == 64, "all blocks back after removal (%d free)", s.pool.n_free);
    free_req(a);
    free_req(b);
    sched_destroy(&s);

    /* Admission control: 7 blocks of 16 tokens; three 48-token prompts need 3 blocks each. */
    CHECK(sched_init(&s, 512, 8, 7, 16) == 0, "init");
    Request *r[3];
    for (int i = 0; i < 3; i++) sched_add(&s, r[i] = req(10 + i, 48, 40, 16));
    sched_schedule(&s, &o);
    CHECK(o.n_items == 2 && s.n_waiting == 1, "two admitted, one waits (%d items, %d waiting)", o.n_items, s.n_waiting);
    apply(&o);
    /* The next decode token of each needs a 4th block: one of the two is preempted. */
    sched_schedule(&s, &o);
    CHECK(o.n_preempted == 1 && o.n_items == 1, "one preempted (%d), one runs (%d)", o.n_preempted, o.n_items);
    CHECK(s.n_waiting == 2 && s.waiting[0]->n_computed == 0, "the preempted request waits first, to recompute");
    int used = 0;
    for (int i = 0; i < 3; i++) used += r[i]->n_blocks;
    CHECK(used + s.pool.n_free == 7, "blocks conserved (%d used + %d free)", used, s.pool.n_free);
    for (int i = 0; i < 3; i++) {
        sched_remove(&s, r[i]);
        free_req(r[i]);
    }
    CHECK(s.pool.n_free == 7, "all blocks free");
    sched_destroy(&s);

    /* The sequence limit. */
    CHECK(sched_init(&s, 512, 2, 64, 16) == 0, "init");
    Request *q[3];
    for (int i = 0; i < 3; i++) sched_add(&s, q[i] = req(20 + i, 5, 5, 16));
    sched_schedule(&s, &o);
    CHECK(o.n_items == 2 && o.n_tokens == 10, "max_seqs 2: %d items", o.n_items);
    for (int i = 0; i < 3; i++) {
        sched_remove(&s, q[i]);
        free_req(q[i]);
    }
    sched_destroy(&s);
    return test_finish();
}
