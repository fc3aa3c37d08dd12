/*
 * cache/kv.h — the paged KV cache: a pool of fixed-size blocks in backend
 * memory, reference counts, and per-sequence block tables exported to
 * kernels as CSR views.
 *
 *   kv_pool  : n_blocks blocks x block_tokens tokens, every layer and KV head
 *              (memory layout documented in kernels/kern.h)
 *   kv_table : one sequence: block ids in order, KV length, next position,
 *              and the RoPE position of every entry
 *
 * Blocks are reference-counted and owned by nobody; a fork shares the full
 * blocks of its parent and copies the partial last block.  A block whose
 * count drops to 0 returns to the free list, unless the prefix cache holds
 * it (cfg.prefix_cache): then it waits in an LRU list, still findable by
 * kv_prefix_match, until an allocation finds the free list empty.
 *
 *   kv_prefix: full blocks keyed by a chain hash of (previous block's hash,
 *              the block's tokens, the caller's extra key)
 *
 * Callers: sched/ (reserve, append, fork, release, export, prefix match
 * and commit), tests.
 * Thread: engine only; nothing here locks.
 */
#ifndef KV_H
#define KV_H

#include "base/kvs.h"
#include "kernels/kern.h"

#include <stdbool.h>
#include <stdint.h>

typedef struct kv_pool kv_pool_t;
typedef struct kv_table kv_table_t;

typedef struct kv_pool_cfg {
    uint32_t n_layers;
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint32_t block_tokens; /* tokens per block, a power of two, 1..1024 (default 16) */
    uint32_t n_blocks;     /* blocks in the pool, >= 1 */
    kern_dtype_t dtype;    /* KERN_F32 or KERN_F16 */
    /* Keep released full blocks that were committed (kv_prefix_commit) for
     * reuse by kv_prefix_match, evicting them LRU when blocks run out.
     * false: released blocks go straight back to the free list. */
    bool prefix_cache;
} kv_pool_cfg_t;

/* Bytes of backend memory one block takes (all layers, K and V). */
size_t kv_pool_block_bytes(const kv_pool_cfg_t *cfg);

/* Allocates the pool's memory (zeroed) from `be`.  Returns 0, KVS_EINVAL
 * (a zero size, block_tokens not a power of two, a dtype other than F32/F16,
 * NULL be, or more than 2^31 token slots, since slots are int32) or
 * KVS_ENOMEM (including sizes that overflow).  The backend must outlive the
 * pool. */
int kv_pool_new(const kv_pool_cfg_t *cfg, kern_backend_t *be, kv_pool_t **out);
void kv_pool_free(kv_pool_t *pool); /* NULL is a no-op; tables must be freed first */

const kv_pool_cfg_t *kv_pool_cfg(const kv_pool_t *pool);
/* The view kernels read and write; valid for the pool's lifetime. */
const kern_kv_t *kv_pool_kv(const kv_pool_t *pool);
/* Blocks an allocation can take: free ones plus cached blocks no table
 * uses (evictable), so capacity answers do not depend on the cache. */
uint32_t kv_pool_n_free(const kv_pool_t *pool);
uint32_t kv_pool_refcount(const kv_pool_t *pool, int32_t block);
/* Checks every invariant (refcounts match table references, free list
 * consistent, no block both free and used; with the prefix cache: the hash
 * table matches the cached blocks, every cached block is in use or in the
 * LRU list, the LRU list holds exactly the unused cached blocks).  Returns
 * true when they hold.  Expensive: for tests and assert() only. */
bool kv_pool_check(const kv_pool_t *pool);

/* A new, empty sequence.  Returns 0 or KVS_ENOMEM. */
int kv_table_new(kv_pool_t *pool, kv_table_t **out);
/* Drops every block reference and frees the table.  NULL is a no-op. */
void kv_table_free(kv_table_t *t);

/* Makes room for n more entries.  0: the next n appends will succeed;
 * KVS_EAGAIN: not enough free blocks now (wait or preempt);
 * KVS_ENOSPC: the sequence could never fit in this pool.  Reservation
 * allocates the blocks (and copies a shared partial last block so the
 * appends never write into a block another table reads). */
int kv_table_reserve(kv_table_t *t, uint32_t n);
/* Assigns slots for n entries at RoPE positions pos[0..n) (host arrays),
 * writing slot = block * block_tokens + offset into slots[].  Requires a
 * prior successful reserve of at least n.  Returns 0, KVS_ENOSPC when not
 * reserved (or when it would write into a shared, partly filled block), or
 * KVS_EINVAL (NULL arrays, a negative position or INT32_MAX). */
int kv_table_append(kv_table_t *t, const int32_t *pos, uint32_t n, int32_t *slots);
/* Drops entries from the end so that n_tokens remain, releasing blocks no
 * longer used, including those reserved ahead.  KVS_EINVAL if n > len. */
int kv_table_truncate(kv_table_t *t, uint32_t n_tokens);

/* A new table sharing t's full blocks (refcount + 1) and with a private
 * copy of t's partial last block (copied with kern_kv_copy).  Returns 0,
 * KVS_EAGAIN (no free block for the copy), KVS_ENOMEM, or an error from
 * kern_kv_copy (e.g. KVS_EDEVICE); on failure nothing changes.  Reserve can
 * pass kern_kv_copy errors through the same way. */
int kv_table_fork(const kv_table_t *t, kv_table_t **out);

uint32_t kv_table_len(const kv_table_t *t);      /* KV entries */
uint32_t kv_table_n_blocks(const kv_table_t *t); /* blocks held, incl. reserved ahead */
const int32_t *kv_table_blocks(const kv_table_t *t);
const int32_t *kv_table_positions(const kv_table_t *t); /* [len] */
/* Next RoPE position (max position + 1, or 0); differs from len once
 * entries are dropped or positions skip. */
int32_t kv_table_next_pos(const kv_table_t *t);

/* Writes the CSR page table of n tables into caller arrays:
 * indptr[n + 1], indices[sum of kv_table_n_blocks], last_len[n].  Only the
 * first ceil(len / block_tokens) blocks of each table are exported.  Tables
 * must be non-empty (asserted).  The returned view borrows the arrays. */
kern_page_table_t kv_tables_export(kv_table_t *const *tables, uint32_t n, int32_t *indptr,
                                   int32_t *indices, int32_t *last_len);

/* ---- prefix cache ---------------------------------------------------------
 *
 * A full block at its natural positions (entry i at RoPE position i) is
 * identified by a chain hash: kv_block_hash(hash of the previous block, the
 * block's tokens, extra), with parent 0 for a sequence's first block, so
 * equal hashes mean equal whole prefixes.  `extra` is the caller's hash of
 * everything else that changes KV contents or must isolate tenants (cache
 * salt, KV dtype, attention or compression policy): blocks committed under
 * one extra never match another.  The hashes are not cryptographic: a
 * tenant that must not share KV with crafted prompts needs its own salt in
 * extra. */

/* The chain hash of one block, deterministic across runs and machines.
 * tokens may be NULL when n is 0.  Thread: any. */
uint64_t kv_block_hash(uint64_t parent, const int32_t *tokens, uint32_t n, uint64_t extra);

/* Finds the longest run of cached full blocks that starts tokens[0..n)
 * under `extra`, leaving at least one token to compute (so at most
 * (n - 1) / block_tokens blocks), and makes them the empty table t's
 * blocks, referenced, at positions 0..matched-1 (len = next_pos =
 * matched).  *n_matched gets the number of tokens matched, a multiple of
 * block_tokens.  Counts n queried and *n_matched hit tokens in the pool's
 * stats.  Returns 0, KVS_EINVAL (t not empty: entries or blocks; NULL
 * tokens with n > 0; NULL n_matched) or KVS_ENOMEM (t unchanged).  With
 * the prefix cache off: *n_matched = 0, returns 0. */
int kv_prefix_match(kv_table_t *t, const int32_t *tokens, uint32_t n, uint64_t extra,
                    uint32_t *n_matched);

/* Offers t's full blocks to the prefix cache: tokens[0..n) are t's tokens
 * in order, n <= kv_table_len(t), and their KV must already be written.
 * Every full block within n not offered before is registered under its
 * chain hash, in order, stopping at the first block whose positions are not
 * its natural ones (its KV would not be what a fresh prefill computes).
 * A block whose hash is already cached under another block id stays
 * unregistered and is freed as usual when t lets go; blocks are never
 * swapped under a running table.  Repeated commits only hash new blocks.
 * Returns 0, KVS_EINVAL (n > len, NULL tokens with n > 0) or KVS_ENOMEM.
 * With the prefix cache off it does nothing and returns 0. */
int kv_prefix_commit(kv_table_t *t, const int32_t *tokens, uint32_t n, uint64_t extra);

typedef struct kv_prefix_stats {
    uint64_t queried_tokens; /* sum of n over kv_prefix_match calls */
    uint64_t hit_tokens;     /* sum of *n_matched */
    uint64_t evictions;      /* cached blocks taken for reuse */
    uint64_t cached_blocks;  /* registered now, in use or evictable */
} kv_prefix_stats_t;

/* All zero with the prefix cache off. */
void kv_pool_prefix_stats(const kv_pool_t *pool, kv_prefix_stats_t *out);

#endif /* KV_H */
