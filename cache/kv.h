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
    kern_dtype_t dtype;    /* KERN_F32 or KERN_F16: of full-precision blocks */
    /* Quantized KV (kern.h): with a codec, blocks [0, n_hot) are full
     * precision (appends write only those) and the rest hold quantized
     * tiles that kv_table_seal fills.  KERN_KVQ_NONE: n_hot is ignored. */
    kern_kvq_t quant;
    uint32_t n_hot; /* 1..n_blocks with a codec */
    /* Keep released full blocks that were committed (kv_prefix_commit) for
     * reuse by kv_prefix_match, evicting them LRU when blocks run out.
     * false: released blocks go straight back to the free list. */
    bool prefix_cache;
} kv_pool_cfg_t;

/* Bytes of backend memory one full-precision block takes (all layers, K
 * and V); kv_pool_quant_block_bytes: one quantized block (0 without a
 * codec).  0 for a cfg kv_pool_new refuses. */
size_t kv_pool_block_bytes(const kv_pool_cfg_t *cfg);
size_t kv_pool_quant_block_bytes(const kv_pool_cfg_t *cfg);

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
 * uses (evictable), so capacity answers do not depend on the cache.  With
 * a codec: of both kinds; kv_pool_n_free_kind counts one kind. */
uint32_t kv_pool_n_free(const kv_pool_t *pool);
uint32_t kv_pool_n_free_kind(const kv_pool_t *pool, bool quantized);
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

/* Quantizes t's full blocks that are full precision, used by t alone (not
 * shared, not in the prefix cache), hold no entry below keep_head (the
 * attention sinks stay exact) and end at or before len - keep_tail (a
 * residual window), each into a quantized block that takes its place.
 * Stops early, leaving blocks full precision, when no quantized block is
 * free.  Returns the number of blocks sealed, or an error from
 * kern_kv_seal (the blocks of the failed batch stay full precision, those
 * sealed before it stay sealed).  0 without a codec. */
int kv_table_seal(kv_table_t *t, uint32_t keep_head, uint32_t keep_tail);
/* The most blocks kv_table_seal and kv_pool's own seals hand kern_kv_seal
 * in one call (what a device backend reserves for, kern_reserve). */
#define KV_SEAL_BATCH 64

/* StreamingLLM eviction (algorithms.md section 3) that frees memory:
 * while more than `budget` entries remain, drops the oldest whole block
 * after the blocks holding the first keep_head entries (the attention
 * sinks), moving later entries down.  Positions stay the true ones, so
 * keys cached with RoPE at those positions need no re-rotation, and the
 * sinks' blocks keep their prefix-cache identity.  The block holding the
 * last entry (and any reserved ahead) always stays, so a budget below
 * the sinks' blocks plus one block leaves exactly those.  A dropped block
 * another table or the prefix cache still references stays there.
 * Returns the number of blocks dropped. */
uint32_t kv_table_evict(kv_table_t *t, uint32_t keep_head, uint32_t budget);

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

/* Score-based compression (SnapKV, H2O): keeps, for every layer and KV
 * head, its own n_keep entries keep[(l * n_kv_heads + h) * n_keep + j]
 * (ascending entry indices < len), moving them into n_keep entries of
 * fresh blocks and releasing the old blocks (those reserved ahead too).
 * With a codec, the new blocks kv_table_seal(keep_head, keep_tail) would
 * seal are written quantized (through at most KV_SEAL_BATCH full-precision
 * staging blocks at a time: the same bytes as compacting, then sealing),
 * as many as quantized blocks are free, the others in full precision;
 * without one keep_head and keep_tail are ignored.  Entry j's position becomes the largest of the
 * kept positions of index j over the lists (attention reads no positions; next_pos stays, so
 * decoding goes on at the true position; when no list keeps the entry at position next_pos - 1, the
 * last entry takes that position, so that next_pos stays max + 1).  A compacted table is never
 * offered to the prefix cache again (its blocks are not a prefix anyone
 * computes).  Returns the number of blocks written quantized (0 without
 * a codec), or KVS_EINVAL (bad lists, n_keep == 0 or > len, an
 * offloaded table), KVS_EAGAIN (not enough free full-precision blocks
 * beside the table's own; nothing changes), KVS_ENOSPC (the pool has too
 * few full-precision blocks for the new table's, one staging block
 * counted, even with every quantized block free),
 * KVS_ENOMEM or a backend error from kern_kv_gather or kern_kv_seal
 * (nothing changes, though evictable cached blocks may have been taken).
 * n_keep == len with every list the identity is a no-op that returns 0
 * without touching anything.  Thread: engine. */
int kv_table_compact(kv_table_t *t, uint32_t n_keep, const int32_t *keep, uint32_t keep_head,
                     uint32_t keep_tail);

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

/* What a sequence's blocks are cached under when not all of its KV was
 * computed alike: a block whose entries all lie below n_first under
 * `extra`, any later one under `after` (a request's generated tokens,
 * decoded under another attention than its prompt's prefill, whose KV a
 * later prefill of the same tokens would not reproduce).  With after ==
 * extra, the plain functions above.  Same returns as those. */
typedef struct kv_prefix_key {
    uint64_t extra;
    uint64_t after;
    uint32_t n_first;
} kv_prefix_key_t;
int kv_prefix_match_key(kv_table_t *t, const int32_t *tokens, uint32_t n,
                        const kv_prefix_key_t *key, uint32_t *n_matched);
int kv_prefix_commit_key(kv_table_t *t, const int32_t *tokens, uint32_t n,
                         const kv_prefix_key_t *key);

typedef struct kv_prefix_stats {
    uint64_t queried_tokens; /* sum of n over kv_prefix_match calls */
    uint64_t hit_tokens;     /* sum of *n_matched */
    uint64_t evictions;      /* cached blocks taken for reuse */
    uint64_t cached_blocks;  /* registered now, in use or evictable */
} kv_prefix_stats_t;

/* All zero with the prefix cache off. */
void kv_pool_prefix_stats(const kv_pool_t *pool, kv_prefix_stats_t *out);

/* ---- host tier -------------------------------------------------------------
 *
 * Host memory behind the pool (vLLM's CPU swap space, LMCache's host
 * tier), holding exact copies of pool blocks as the pool stores them (full
 * precision or quantized, every layer, K and V):
 *   - offloaded tables: a preempted sequence's blocks, copied out by
 *     kv_table_offload and back by kv_table_restore (swap, not recompute);
 *   - prefix copies: with the prefix cache on, every cached block the pool
 *     evicts is copied here under its chain key (LRU within the store), and
 *     kv_prefix_match continues past the pool's hits with these, bringing
 *     each back into a fresh pool block of its kind, cached again.
 * Offloaded tables' copies are never evicted; prefix copies give way to
 * them and to newer prefix copies.  A copy brought back into the pool is
 * freed here.  Host memory is taken per copy (malloc), within `bytes`. */
typedef struct kv_host kv_host_t;

/* A store of at most `bytes` of copies, attached to `pool` (one store per
 * pool).  Returns 0, KVS_EINVAL (NULL pool, bytes 0, the pool has a store
 * already) or KVS_ENOMEM. */
int kv_host_new(kv_pool_t *pool, size_t bytes, kv_host_t **out);
/* Detaches the store from its pool and frees it with its prefix copies.
 * No table may be offloaded to it (asserted: restore or free those first).
 * Call before kv_pool_free.  NULL is a no-op. */
void kv_host_free(kv_host_t *h);

/* Swap-out: copies t's used blocks (the first ceil(len / block_tokens)) to
 * h, t's pool's store, then releases every block t holds, including those
 * reserved ahead (shared ones stay with their other users, cached ones go
 * to the LRU list as usual).  t keeps len, positions, next_pos and its
 * prefix hashes but holds no block (kv_table_n_blocks 0) until
 * kv_table_restore; meanwhile only kv_table_restore, kv_table_free and the
 * read-only accessors apply to it (reserve, truncate, fork, seal and
 * kv_prefix_commit return KVS_EINVAL, append KVS_ENOSPC; export asserts).
 * Prefix copies are evicted for room.  Returns 0, KVS_EINVAL (h is not the
 * pool's store, t is offloaded already or empty), KVS_ENOSPC (h cannot
 * hold the blocks even without its prefix copies), KVS_ENOMEM or a backend
 * error from kern_download; on failure nothing changes. */
int kv_table_offload(kv_table_t *t, kv_host_t *h);
/* Swap-in: takes new pool blocks of the kinds the offloaded ones had
 * (allocating may evict cached blocks), writes them bit for bit with the
 * copies, and frees the copies.  Blocks reserved ahead before the offload
 * are not taken again: reserve before the next append.  Returns 0,
 * KVS_EINVAL (t not offloaded to h), KVS_EAGAIN (too few free blocks of
 * either kind now), KVS_ENOMEM or a backend error from kern_upload; on
 * failure t stays offloaded, with its copies. */
int kv_table_restore(kv_table_t *t, kv_host_t *h);
bool kv_table_offloaded(const kv_table_t *t);
/* kv_table_free frees an offloaded table's copies with it (a cancelled
 * request needs nothing more). */

typedef struct kv_host_stats {
    uint64_t offloaded_blocks; /* copied out by kv_table_offload, in total */
    uint64_t restored_blocks;  /* copied back by kv_table_restore, in total */
    uint64_t swapped_blocks;   /* held now for offloaded tables */
    uint64_t kept_blocks;      /* evicted cached blocks kept as prefix copies, in total */
    uint64_t dropped_blocks;   /* evicted cached blocks not kept (no room, an error) */
    uint64_t prefix_evictions; /* prefix copies evicted for room */
    uint64_t prefix_blocks;    /* prefix copies held now */
    uint64_t hit_tokens;       /* tokens kv_prefix_match brought back from here */
    uint64_t bytes_used;       /* copies held now, prefix and swapped */
    uint64_t bytes_cap;
    uint64_t free_bytes;  /* freed slots kept for reuse (kv_host.c), beside bytes_used */
    uint64_t slot_allocs; /* slots taken from kern_host_alloc, in total; the rest were reused */
} kv_host_stats_t;

void kv_host_stats(const kv_host_t *h, kv_host_stats_t *out);
/* Checks the store's invariants (byte accounting, the LRU list and hash
 * chains of prefix copies, one record per offloaded table of the pool).
 * Expensive: for tests and assert() only. */
bool kv_host_check(const kv_host_t *h);

#endif /* KV_H */
