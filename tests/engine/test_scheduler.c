/* test_scheduler.c — the scheduler's bookkeeping: token budget and chunked prefill, the sequence
 * limit, admission control when KV blocks run out (requests wait, never fail), preemption of the
 * newest request when a running one needs a block, block accounting, and speculative drafts. */
#include <stdlib.h>
#include <string.h>

#include "../test_util.h"
#include "engine/scheduler.h"

static Request *req(int id, int n_prompt, int max_tokens, int block_size) {
    Request *r = calloc(1, sizeof *r);
    r->id = (uint64_t)id;
    r->n_prompt = n_prompt;
    r->params.max_tokens = max_tokens;
    r->params.prompt_logprobs = -1;
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
    CHECK(sched_init(&s, 32, 4, 64, 16, false) == 0, "init");
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
    CHECK(sched_init(&s, 512, 8, 7, 16, false) == 0, "init");
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

    /* Prompt logprobs: at most max_prompt_logit_tokens such prompt tokens per step, over all such
     * requests (each returns a row of logits); other requests are not held back. */
    CHECK(sched_init(&s, 512, 4, 64, 16, false) == 0, "init");
    s.max_prompt_logit_tokens = 64;
    Request *lp1 = req(30, 100, 4, 16), *lp2 = req(31, 50, 4, 16), *plain = req(32, 100, 4, 16);
    lp1->params.prompt_logprobs = lp2->params.prompt_logprobs = 0;
    sched_add(&s, lp1);
    sched_add(&s, lp2);
    sched_add(&s, plain);
    sched_schedule(&s, &o);
    CHECK(o.n_items == 1 && o.items[0].req == lp1 && o.items[0].n_tokens == 64,
          "first step: 64 of lp1's prompt tokens, then the FIFO waits (%d items, %d tokens)", o.n_items,
          o.n_items ? o.items[0].n_tokens : -1);
    apply(&o);
    sched_schedule(&s, &o);
    CHECK(o.n_items == 3 && o.items[0].n_tokens == 36 && o.items[1].req == lp2 && o.items[1].n_tokens == 28 &&
              o.items[2].req == plain && o.items[2].n_tokens == 100,
          "second step: lp1's last 36, lp2's first 28, and all of plain's 100 (%d items)", o.n_items);
    apply(&o);
    sched_schedule(&s, &o);
    CHECK(o.n_items == 3 && o.items[0].n_tokens == 1 && o.items[1].req == lp2 && o.items[1].n_tokens == 22,
          "third step: lp1 decodes, lp2 finishes its prompt (%d tokens)", o.n_items > 1 ? o.items[1].n_tokens : -1);
    Request *lps[3] = {lp1, lp2, plain};
    for (int i = 0; i < 3; i++) {
        sched_remove(&s, lps[i]);
        free_req(lps[i]);
    }
    sched_destroy(&s);

    /* The sequence limit. */
    CHECK(sched_init(&s, 512, 2, 64, 16, false) == 0, "init");
    Request *q[3];
    for (int i = 0; i < 3; i++) sched_add(&s, q[i] = req(20 + i, 5, 5, 16));
    sched_schedule(&s, &o);
    CHECK(o.n_items == 2 && o.n_tokens == 10, "max_seqs 2: %d items", o.n_items);
    for (int i = 0; i < 3; i++) {
        sched_remove(&s, q[i]);
        free_req(q[i]);
    }
    sched_destroy(&s);
    /* Prefix caching: a finished request's full blocks serve the next request with the same
     * leading tokens; at least the last prompt token is always computed. */
    CHECK(sched_init(&s, 512, 4, 8, 16, true) == 0, "init");
    Request *p1 = req(30, 40, 4, 16);
    for (int i = 0; i < 40; i++) p1->tokens[i] = 1000 + i;
    sched_add(&s, p1);
    sched_schedule(&s, &o);
    apply(&o);
    sched_cache_blocks(&s, p1);
    CHECK(p1->n_cached_blocks == 2, "two full blocks registered (%d)", p1->n_cached_blocks);
    int32_t b0 = p1->blocks[0], b1 = p1->blocks[1];
    sched_remove(&s, p1);
    CHECK(s.pool.n_free == 8, "cached blocks count as free");
    Request *p2 = req(31, 36, 4, 16); /* same first 32 tokens, then different */
    for (int i = 0; i < 36; i++) p2->tokens[i] = i < 32 ? 1000 + i : 7;
    sched_add(&s, p2);
    sched_schedule(&s, &o);
    CHECK(o.n_items == 1 && o.items[0].n_tokens == 4 && p2->blocks[0] == b0 && p2->blocks[1] == b1,
          "32 cached tokens reused, 4 computed (%d)", o.n_items ? o.items[0].n_tokens : -1);
    CHECK(s.prefix_hit_tokens == 32 && s.prefix_query_tokens == 76, "hit stats %llu/%llu",
          (unsigned long long)s.prefix_hit_tokens, (unsigned long long)s.prefix_query_tokens);
    apply(&o);
    Request *p3 = req(32, 32, 4, 16); /* exactly two blocks: the last token is recomputed */
    for (int i = 0; i < 32; i++) p3->tokens[i] = 1000 + i;
    sched_add(&s, p3);
    sched_schedule(&s, &o);
    CHECK(p3->n_computed == 16 && p3->blocks[0] == b0 && s.pool.ref[b0] == 2, "one block shared by two requests");
    apply(&o);
    Request *p4 = req(33, 33, 4, 16); /* different first block: no hit */
    for (int i = 0; i < 33; i++) p4->tokens[i] = 5;
    sched_add(&s, p4);
    sched_schedule(&s, &o);
    CHECK(p4->n_cached_blocks == 0 && p4->n_computed == 0, "no false hit");
    sched_remove(&s, p2);
    sched_remove(&s, p3);
    sched_remove(&s, p4);
    CHECK(s.pool.n_free == 8, "all blocks free again (%d)", s.pool.n_free);
    /* Eviction: a request needing all 8 blocks evicts the cached ones (LRU) and still runs. */
    Request *big = req(34, 120, 4, 16);
    for (int i = 0; i < 120; i++) big->tokens[i] = 9;
    sched_add(&s, big);
    sched_schedule(&s, &o);
    CHECK(o.n_items == 1 && big->n_blocks == 8, "cached blocks evicted for a new request (%d blocks)", big->n_blocks);
    sched_remove(&s, big);
    free_req(p1);
    free_req(p2);
    free_req(p3);
    free_req(p4);
    free_req(big);
    sched_destroy(&s);

    /* Speculative drafts: scheduled after the pending token within the budget, and dropped
     * rather than preempt another request for a block. Two requests of 15-token prompts on a
     * pool of 2 blocks of 16: each decodes inside its block; 4 drafts would need a second. */
    CHECK(sched_init(&s, 512, 4, 2, 16, false) == 0, "init");
    Request *d1 = req(40, 15, 8, 16), *d2 = req(41, 15, 8, 16);
    sched_add(&s, d1);
    sched_add(&s, d2);
    sched_schedule(&s, &o);
    apply(&o); /* both prefilled, one token out each: n_computed 15 of 16 */
    d1->n_draft = 4;
    sched_schedule(&s, &o);
    CHECK(o.n_preempted == 0 && o.n_items == 2 && o.items[0].req == d1 && o.items[0].n_tokens == 1 && d1->n_draft == 0,
          "drafts dropped, nothing preempted (%d preempted, %d tokens for d1)", o.n_preempted,
          o.n_items ? o.items[0].n_tokens : -1);
    d1->n_draft = 0;
    sched_remove(&s, d2);
    d1->n_draft = 3; /* room now: the pending token and 3 drafts, with a second block */
    sched_schedule(&s, &o);
    CHECK(o.n_items == 1 && o.items[0].n_tokens == 4 && d1->n_blocks == 2, "drafts scheduled (%d tokens)",
          o.n_items ? o.items[0].n_tokens : -1);
    sched_remove(&s, d1);
    free_req(d1);
    free_req(d2);
    sched_destroy(&s);

    /* A step budget of 3 tokens: the pending token and 2 of 5 drafts, n_draft cut to 2. */
    CHECK(sched_init(&s, 3, 4, 4, 16, false) == 0, "init");
    Request *d3 = req(42, 2, 8, 16);
    sched_add(&s, d3);
    sched_schedule(&s, &o);
    apply(&o); /* the 2-token prompt: one token out, n_computed 2 of 3 */
    d3->n_draft = 5;
    sched_schedule(&s, &o);
    CHECK(o.n_items == 1 && o.items[0].n_tokens == 3 && d3->n_draft == 2,
          "drafts cut to the budget (%d tokens, %d drafts)", o.n_items ? o.items[0].n_tokens : -1, d3->n_draft);
    sched_remove(&s, d3);
    free_req(d3);
    sched_destroy(&s);
    return test_finish();
}
