/* block_pool.c — see block_pool.h. Everything is O(1) except hash-chain walks (short: the table
 * has a bucket per block) and the token comparison on a lookup (one block's tokens). */
#include "engine/block_pool.h"

#include <assert.h>
#include <stdlib.h>
#include <string.h>

int block_pool_init(BlockPool *p, int n_blocks, int block_size) {
    memset(p, 0, sizeof *p);
    p->n_blocks = n_blocks;
    p->block_size = block_size;
    p->n_buckets = 1;
    while (p->n_buckets < n_blocks) p->n_buckets *= 2;
    p->ref = calloc((size_t)n_blocks, sizeof *p->ref);
    p->stack = malloc((size_t)n_blocks * sizeof *p->stack);
    p->hash = calloc((size_t)n_blocks, sizeof *p->hash);
    p->parent = calloc((size_t)n_blocks, sizeof *p->parent);
    p->tokens = malloc((size_t)n_blocks * block_size * sizeof *p->tokens);
    p->bucket = malloc((size_t)p->n_buckets * sizeof *p->bucket);
    p->chain = malloc((size_t)n_blocks * sizeof *p->chain);
    p->lru_prev = malloc((size_t)n_blocks * sizeof *p->lru_prev);
    p->lru_next = malloc((size_t)n_blocks * sizeof *p->lru_next);
    if (!p->ref || !p->stack || !p->hash || !p->parent || !p->tokens || !p->bucket || !p->chain || !p->lru_prev ||
        !p->lru_next) {
        block_pool_destroy(p);
        return -1;
    }
    /* Lowest ids on top so a fresh pool hands out 0, 1, 2, ... */
    for (int i = 0; i < n_blocks; i++) p->stack[i] = n_blocks - 1 - i;
    p->n_stack = p->n_free = n_blocks;
    for (int i = 0; i < p->n_buckets; i++) p->bucket[i] = -1;
    p->lru_head = p->lru_tail = -1;
    return 0;
}

void block_pool_destroy(BlockPool *p) {
    free(p->ref);
    free(p->stack);
    free(p->hash);
    free(p->parent);
    free(p->tokens);
    free(p->bucket);
    free(p->chain);
    free(p->lru_prev);
    free(p->lru_next);
    memset(p, 0, sizeof *p);
}

static void lru_unlink(BlockPool *p, int32_t id) {
    int32_t a = p->lru_prev[id], b = p->lru_next[id];
    if (a >= 0) p->lru_next[a] = b; else p->lru_head = b;
    if (b >= 0) p->lru_prev[b] = a; else p->lru_tail = a;
}

static void lru_push(BlockPool *p, int32_t id) {
    p->lru_prev[id] = p->lru_tail;
    p->lru_next[id] = -1;
    if (p->lru_tail >= 0) p->lru_next[p->lru_tail] = id; else p->lru_head = id;
    p->lru_tail = id;
}

static void unregister(BlockPool *p, int32_t id) {
    int32_t *link = &p->bucket[p->hash[id] & (uint64_t)(p->n_buckets - 1)];
    while (*link != id) link = &p->chain[*link];
    *link = p->chain[id];
    p->hash[id] = 0;
}

int32_t block_pool_alloc(BlockPool *p) {
    int32_t id;
    if (p->n_stack) {
        id = p->stack[--p->n_stack];
    } else if (p->lru_head >= 0) {
        id = p->lru_head; /* evict the least recently released cached block */
        lru_unlink(p, id);
        unregister(p, id);
    } else {
        return -1;
    }
    p->ref[id] = 1;
    p->n_free--;
    return id;
}

void block_pool_release(BlockPool *p, int32_t id) {
    assert(id >= 0 && id < p->n_blocks && p->ref[id] > 0);
    if (--p->ref[id]) return;
    p->n_free++;
    if (p->hash[id])
        lru_push(p, id);
    else
        p->stack[p->n_stack++] = id;
}

uint64_t block_pool_hash(uint64_t parent, const int32_t *tokens, int block_size) {
    uint64_t h = parent ^ 0x9E3779B97F4A7C15ull;
    for (int i = 0; i < block_size; i++) {
        h ^= (uint64_t)(uint32_t)tokens[i] + 0x9E3779B97F4A7C15ull + (h << 6) + (h >> 2);
        h = (h ^ (h >> 31)) * 0xBF58476D1CE4E5B9ull;
    }
    h ^= h >> 29;
    return h ? h : 1;
}

int32_t block_pool_lookup(BlockPool *p, uint64_t h, uint64_t parent, const int32_t *tokens) {
    for (int32_t id = p->bucket[h & (uint64_t)(p->n_buckets - 1)]; id >= 0; id = p->chain[id]) {
        if (p->hash[id] != h || p->parent[id] != parent ||
            memcmp(p->tokens + (size_t)id * p->block_size, tokens, (size_t)p->block_size * sizeof *tokens))
            continue;
        if (p->ref[id]++ == 0) {
            lru_unlink(p, id);
            p->n_free--;
        }
        return id;
    }
    return -1;
}

void block_pool_register(BlockPool *p, int32_t id, uint64_t h, uint64_t parent, const int32_t *tokens) {
    if (p->hash[id]) return;
    for (int32_t o = p->bucket[h & (uint64_t)(p->n_buckets - 1)]; o >= 0; o = p->chain[o])
        if (p->hash[o] == h && p->parent[o] == parent) return;
    p->hash[id] = h;
    p->parent[id] = parent;
    memcpy(p->tokens + (size_t)id * p->block_size, tokens, (size_t)p->block_size * sizeof *tokens);
    int32_t *head = &p->bucket[h & (uint64_t)(p->n_buckets - 1)];
    p->chain[id] = *head;
    *head = id;
}
