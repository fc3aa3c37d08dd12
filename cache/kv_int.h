/*
 * cache/kv_int.h — what kv_pool.c and kv_table.c share: the two structs and
 * the block-level primitives the tables build on.  Only cache/ includes it.
 *
 *   kv_pool                                    kv_table
 *   +-------------------+                      +-------------------------+
 *   | kv (kern_kv_t)    |  k/v backend memory  | pool                    |
 *   | refcount[n]       |                      | prev/next  (registry)   |
 *   | free_ids[n_free]  |  stack, top = last   | blocks[n_blocks]        |
 *   | tables ---------------------------------> | pos[len], next_pos      |
 *   +-------------------+    doubly linked     +-------------------------+
 *
 * Invariants (kv_pool_check verifies them all):
 *   - refcount[b] == number of references to b over all live tables;
 *   - b is in free_ids exactly once iff refcount[b] == 0;
 *   - a table holds at least ceil(len / block_tokens) blocks; the ones past
 *     that (reserved ahead by kv_table_reserve) have refcount 1, because
 *     only used blocks are ever shared (fork copies used blocks only and
 *     truncate drops everything past the new length);
 *   - pos_cap >= n_blocks * block_tokens, so an append within the reserved
 *     capacity never has to allocate;
 *   - next_pos == max(pos[0..len)) + 1, or 0 when len == 0.
 */
#ifndef KV_INT_H
#define KV_INT_H

#include "cache/kv.h"

struct kv_table {
    kv_pool_t *pool;
    kv_table_t *prev; /* the pool's registry of live tables */
    kv_table_t *next;
    int32_t *blocks; /* [blocks_cap], the first n_blocks are held */
    uint32_t n_blocks;
    uint32_t blocks_cap;
    int32_t *pos; /* [pos_cap], the first len are entries */
    uint32_t len;
    uint32_t pos_cap;
    int32_t next_pos;
};

struct kv_pool {
    kv_pool_cfg_t cfg;
    kern_backend_t *be;
    kern_kv_t kv;
    uint32_t *refcount; /* [n_blocks] */
    int32_t *free_ids;  /* [n_blocks], a stack: free_ids[n_free - 1] is handed out next */
    uint32_t n_free;
    /* [n_blocks], kv_pool_check's tally, allocated up front so the check
     * itself never fails for want of memory. */
    uint32_t *scratch;
    kv_table_t *tables; /* registry head */
    uint32_t n_tables;
};

/* Pops a free block and gives it refcount 1.  The caller has checked
 * n_free; running dry here is a bug. */
int32_t kv__block_alloc(kv_pool_t *pool);
/* One more reference to a block in use. */
void kv__block_ref(kv_pool_t *pool, int32_t block);
/* One reference fewer; at 0 the block goes back on the free stack. */
void kv__block_unref(kv_pool_t *pool, int32_t block);

void kv__table_link(kv_pool_t *pool, kv_table_t *t);
void kv__table_unlink(kv_pool_t *pool, kv_table_t *t);

/* Blocks covering n tokens: ceil(n / block_tokens), in 64 bits so n up to
 * UINT32_MAX plus a request never wraps. */
static inline uint64_t
kv__blocks_for(const kv_pool_t *pool, uint64_t n_tokens)
{
    uint64_t bt = pool->cfg.block_tokens;
    return (n_tokens + bt - 1) / bt;
}

#endif /* KV_INT_H */
