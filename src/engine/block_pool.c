/* block_pool.c — a stack of free KV block ids; O(1) alloc and release. */
#include "engine/block_pool.h"

#include <assert.h>
#include <stdlib.h>

int block_pool_init(BlockPool *p, int n_blocks) {
    p->n_blocks = n_blocks;
    p->n_free = n_blocks;
    p->free_ids = malloc((size_t)n_blocks * sizeof *p->free_ids);
    if (!p->free_ids) return -1;
    /* Lowest ids on top so a fresh pool hands out 0, 1, 2, ... */
    for (int i = 0; i < n_blocks; i++) p->free_ids[i] = n_blocks - 1 - i;
    return 0;
}

void block_pool_destroy(BlockPool *p) {
    free(p->free_ids);
    p->free_ids = NULL;
}

int32_t block_pool_alloc(BlockPool *p) {
    if (!p->n_free) return -1;
    return p->free_ids[--p->n_free];
}

void block_pool_release(BlockPool *p, int32_t id) {
    assert(id >= 0 && id < p->n_blocks && p->n_free < p->n_blocks);
    p->free_ids[p->n_free++] = id;
}
