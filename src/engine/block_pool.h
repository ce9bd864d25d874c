/* block_pool.h — the KV cache's fixed-size blocks as plain bookkeeping: which block ids are free.
 * The tensors themselves live in the backend; this only hands out numbers. */
#ifndef QUILL_BLOCK_POOL_H
#define QUILL_BLOCK_POOL_H

#include <stdint.h>

typedef struct BlockPool {
    int n_blocks;
    int n_free;
    int32_t *free_ids; /* stack of free block ids */
} BlockPool;

/* Returns 0, or -1 when out of memory. */
int block_pool_init(BlockPool *p, int n_blocks);
void block_pool_destroy(BlockPool *p);
/* A free block id, or -1 when none is left. */
int32_t block_pool_alloc(BlockPool *p);
void block_pool_release(BlockPool *p, int32_t id);

#endif
