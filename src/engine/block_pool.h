/* block_pool.h — the KV cache's fixed-size blocks as plain bookkeeping, and the prefix cache over
 * them. The tensors live in the backend; this only hands out numbers.
 *
 * A block in use has a reference count (several requests may share a cached prefix block). A
 * full block can be registered under the hash of its token prefix; when its last user releases it,
 * it stays cached (least-recently-released last in an LRU list) and is still counted as free:
 * allocation takes never-cached blocks first and evicts the oldest cached one only when none is
 * left. Lookups verify the block's tokens and its parent's hash, not just its own hash. */
#ifndef QUILL_BLOCK_POOL_H
#define QUILL_BLOCK_POOL_H

#include <stdbool.h>
#include <stdint.h>

typedef struct BlockPool {
    int n_blocks;
    int block_size;
    int n_free;          /* blocks with no user: plain free + cached free (allocatable) */
    int32_t *ref;        /* [n_blocks] users */
    int32_t *stack;      /* plain free block ids */
    int n_stack;
    /* prefix cache */
    uint64_t *hash;      /* [n_blocks] 0 = not registered */
    uint64_t *parent;    /* [n_blocks] hash of the prefix before the block */
    int32_t *tokens;     /* [n_blocks][block_size] for verification */
    int32_t *bucket;     /* [n_buckets] chain heads */
    int32_t *chain;      /* [n_blocks] next in bucket */
    int n_buckets;
    int32_t *lru_prev, *lru_next; /* doubly linked list of cached free blocks */
    int32_t lru_head, lru_tail;
} BlockPool;

/* Returns 0, or -1 when out of memory. */
int block_pool_init(BlockPool *p, int n_blocks, int block_size);
void block_pool_destroy(BlockPool *p);
/* A block for one new user, or -1 when none is free (may evict the oldest cached block). */
int32_t block_pool_alloc(BlockPool *p);
/* Drops one user of a block; at zero it becomes free (staying cached if registered). */
void block_pool_release(BlockPool *p, int32_t id);

/* The hash of a block of block_size tokens following a prefix whose hash is `parent` (0 for the
 * start of a sequence). Never 0. */
uint64_t block_pool_hash(uint64_t parent, const int32_t *tokens, int block_size);
/* The cached block holding exactly `tokens` after prefix `parent` (hash h), with one more user,
 * or -1 if there is none. */
int32_t block_pool_lookup(BlockPool *p, uint64_t h, uint64_t parent, const int32_t *tokens);
/* Registers full block id (in use) as holding `tokens` after prefix `parent`, under hash h. A
 * prefix already registered under another block keeps that one (id stays uncached). */
void block_pool_register(BlockPool *p, int32_t id, uint64_t h, uint64_t parent, const int32_t *tokens);

#endif
