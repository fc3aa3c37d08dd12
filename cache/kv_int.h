/*
 * cache/kv_int.h — what kv_pool.c, kv_table.c and kv_prefix.c share: the
 * structs and the block-level primitives the tables build on.  Only cache/
 * (and the cache tests, which poke at invariants) include it.
 *
 *   kv_pool                                    kv_table
 *   +-------------------+                      +-------------------------+
 *   | kv (kern_kv_t)    |  k/v backend memory  | pool                    |
 *   | refcount[n]       |                      | prev/next  (registry)   |
 *   | free_ids[n_free]  |  stack, top = last   | blocks[n_blocks]        |
 *   | tables ---------------------------------> | pos[len], next_pos      |
 *   | meta[n]           |  prefix cache: keys, | hashes[n_hashed]        |
 *   | buckets[]         |  hash chains, LRU    +-------------------------+
 *   | lru_head/lru_tail |                       (tables: doubly linked)
 *   +-------------------+
 *
 * Invariants (kv_pool_check verifies them all):
 *   - refcount[b] == number of references to b over all live tables;
 *   - a block with refcount 0 is either on the free stack (exactly once)
 *     or, when it is cached, in the LRU list (exactly once), never both;
 *     n_free + n_lru == number of blocks with refcount 0;
 *   - a cached block is in the hash table under the key in meta[b], its
 *     key is unique, and it is referenced or in the LRU list; n_cached
 *     counts them;
 *   - a table holds at least ceil(len / block_tokens) blocks; the ones past
 *     that (reserved ahead by kv_table_reserve) have refcount 1 and are not
 *     cached, because only used blocks are ever shared or committed (fork
 *     copies used blocks only and truncate drops everything past the new
 *     length);
 *   - pos_cap >= n_blocks * block_tokens, so an append within the reserved
 *     capacity never has to allocate;
 *   - next_pos == max(pos[0..len)) + 1, or 0 when len == 0;
 *   - n_hashed <= len / block_tokens: only full blocks have a chain hash.
 */
#ifndef KV_INT_H
#define KV_INT_H

#include "cache/kv.h"

/* Both chain hashes of one block (kv_prefix.c). */
typedef struct kv_hash_pair {
    uint64_t h1; /* kv_block_hash: picks the bucket */
    uint64_t h2; /* kv__block_hash2: an independent check */
} kv_hash_pair_t;

/* Prefix-cache state of one block; meaningful while `cached` is set. */
typedef struct kv_block_meta {
    kv_hash_pair_t key;  /* chain hashes of the prefix ending in this block */
    uint64_t parent;     /* h1 of the previous block, 0 for a first block */
    uint64_t extra;      /* the caller's key (salt, dtype, policy) */
    int32_t bucket_next; /* next block in the same hash bucket, -1 ends */
    int32_t lru_prev;    /* LRU neighbours while refcount is 0, -1 at the ends */
    int32_t lru_next;
    bool cached; /* in the hash table */
} kv_block_meta_t;

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
    /* Chain hashes of blocks 0..n_hashed-1 under the key hash_extra
     * identifies (kv_prefix.c: key_id), so that
     * a commit only hashes blocks it has not seen.  Each of those blocks
     * was offered to the prefix cache (it may have stayed unregistered
     * when an identical block was already cached). */
    kv_hash_pair_t *hashes; /* [hashes_cap] */
    uint32_t n_hashed;
    uint32_t hashes_cap;
    uint64_t hash_extra;
    /* Set by kv_table_compact: entries are per-head selections, not the
     * KV of any token prefix, so kv_prefix_commit skips the table. */
    bool compacted;
    /* While offloaded (kv_host.c): the host copies of the first
     * ceil(len / block_tokens) blocks; the table then holds no block. */
    struct kv_offload *offload;
};

struct kv_pool {
    kv_pool_cfg_t cfg;
    kern_backend_t *be;
    kern_kv_t kv;
    uint32_t *refcount; /* [n_blocks] */
    uint64_t *gen;      /* [n_blocks], kv.block_gen: see kv__block_touch */
    int32_t *free_ids;  /* [n_blocks], a stack: free_ids[n_free - 1] is handed out next */
    uint32_t n_free;
    /* With a codec, free_ids holds the free full-precision blocks and
     * free_cold the free quantized ones; n_lru_cold counts the quantized
     * blocks in the LRU list. */
    int32_t *free_cold; /* [n_blocks - n_hot] */
    uint32_t n_free_cold;
    uint32_t n_lru_cold;
    /* [n_blocks], kv_pool_check's tally, allocated up front so the check
     * itself never fails for want of memory. */
    uint32_t *scratch;
    kv_table_t *tables; /* registry head */
    uint32_t n_tables;

    /* Prefix cache (kv_prefix.c).  meta, buckets and marks are NULL and
     * the list empty when cfg.prefix_cache is off. */
    kv_block_meta_t *meta; /* [n_blocks] */
    int32_t *buckets;      /* [bucket_mask + 1] chain heads, -1 when empty */
    uint32_t bucket_mask;
    uint8_t *marks;   /* [n_blocks], kv_pool_check's, allocated up front */
    int32_t lru_head; /* released longest ago: evicted first; -1 when empty */
    int32_t lru_tail; /* released last */
    uint32_t n_lru;
    uint32_t n_cached;
    uint64_t queried_tokens;
    uint64_t hit_tokens;
    uint64_t evictions;
    /* The host tier (kv_host.c), or NULL: keeps a copy of each cached
     * block evicted above and continues kv_prefix_match's runs. */
    kv_host_t *host;
};

/* Full-precision blocks: ids [0, n_hot). */
static inline uint32_t
kv__n_hot(const kv_pool_t *pool)
{
    return pool->cfg.quant == KERN_KVQ_NONE ? pool->cfg.n_blocks : pool->cfg.n_hot;
}

static inline bool
kv__block_cold(const kv_pool_t *pool, int32_t block)
{
    return (uint32_t)block >= kv__n_hot(pool);
}

/* Full-precision blocks an allocation can take now: free ones plus
 * evictable cached ones. */
static inline uint32_t
kv__n_avail(const kv_pool_t *pool)
{
    return pool->n_free + pool->n_lru - pool->n_lru_cold;
}

static inline uint32_t
kv__n_avail_cold(const kv_pool_t *pool)
{
    return pool->n_free_cold + pool->n_lru_cold;
}

/* A new kern_kv_t.block_gen value for `block`, whose content is about to
 * change (kv_pool.c: every block handed out; kv_table_truncate: the block
 * that takes new entries again). */
void kv__block_touch(kv_pool_t *pool, int32_t block);
/* Pops a free full-precision (quantized: kv__block_alloc_cold) block, or
 * when none is left evicts the least recently released cached one of that
 * kind, and gives it refcount 1.  The caller has checked kv__n_avail
 * (kv__n_avail_cold); running dry here is a bug. */
int32_t kv__block_alloc(kv_pool_t *pool);
int32_t kv__block_alloc_cold(kv_pool_t *pool);
/* One more reference to a block in use. */
void kv__block_ref(kv_pool_t *pool, int32_t block);
/* A reference to a block the prefix cache holds, which may be unused (in
 * the LRU list: it leaves it) or in use by other tables (kv_prefix.c). */
void kv__block_ref_cached(kv_pool_t *pool, int32_t block);
/* One reference fewer; at 0 a cached block goes to the LRU tail, any
 * other back on the free stack. */
void kv__block_unref(kv_pool_t *pool, int32_t block);

static inline bool
kv__block_cached(const kv_pool_t *pool, int32_t block)
{
    return pool->meta != NULL && pool->meta[block].cached;
}

/* True when nobody may write into the block: another table reads it, or
 * the prefix cache promises its contents to future matches. */
static inline bool
kv__block_frozen(const kv_pool_t *pool, int32_t block)
{
    return pool->refcount[block] > 1 || kv__block_cached(pool, block);
}

/* True when its table may write into the block in place: neither frozen
 * nor quantized (appends, and sealing, take only such blocks). */
static inline bool
kv__block_writable(const kv_pool_t *pool, int32_t block)
{
    return !kv__block_frozen(pool, block) && !kv__block_cold(pool, block);
}

/* Prefix-cache primitives (kv_prefix.c). */
int kv__prefix_init(kv_pool_t *pool); /* 0 or KVS_ENOMEM; kv_pool_new */
void kv__prefix_close(kv_pool_t *pool);
/* The cached block with exactly this key, or -1. */
int32_t kv__prefix_lookup(const kv_pool_t *pool, kv_hash_pair_t key, uint64_t parent,
                          uint64_t extra);
void kv__lru_push_tail(kv_pool_t *pool, int32_t block);
void kv__lru_remove(kv_pool_t *pool, int32_t block);
/* Takes the least recently released cached block of the kind asked for
 * out of the list and the hash table; counts an eviction.  The block keeps
 * refcount 0 for the caller to reuse. */
int32_t kv__prefix_evict(kv_pool_t *pool, bool cold);
/* kv_pool_check's part for the prefix cache; the refcounts are known to
 * match the tables already. */
bool kv__prefix_check(const kv_pool_t *pool);
/* The second, independent chain hash (see kv_prefix.c). */
uint64_t kv__block_hash2(uint64_t parent2, const int32_t *tokens, uint32_t n, uint64_t extra);
/* Both hashes of the block of n tokens after `parent`. */
kv_hash_pair_t kv__block_key(kv_hash_pair_t parent, const int32_t *tokens, uint32_t n,
                             uint64_t extra);

/* Grows *arr (elements of el bytes) to hold at least want, doubling.  On
 * failure (KVS_ENOMEM) *arr and *cap are untouched. */
int kv__grow(void **arr, uint32_t *cap, uint64_t want, size_t el);

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

/* The blocks [*first, *end) of a table of len entries that a seal takes
 * (kv_table_seal; what kv_table_compact writes quantized): past the blocks
 * holding the first keep_head entries, full, and ending at or before
 * len - keep_tail.  Empty (0, 0) without a codec or when none is. */
static inline void
kv__seal_span(const kv_pool_t *pool, uint32_t len, uint32_t keep_head, uint32_t keep_tail,
              uint32_t *first, uint32_t *end)
{
    *first = *end = 0;
    if (pool->cfg.quant == KERN_KVQ_NONE || len <= keep_tail)
        return;
    uint32_t f = (uint32_t)kv__blocks_for(pool, keep_head);
    uint32_t e = (len - keep_tail) / pool->cfg.block_tokens;
    if (e > f) {
        *first = f;
        *end = e;
    }
}

/* Host tier (kv_host.c). */
struct kv_offload;
/* Copies cached block b, being evicted (its key still in meta[b]), into
 * the store, evicting the store's oldest prefix copies for room.  Never
 * fails: a block it cannot keep is dropped as without a store. */
void kv__host_keep(kv_host_t *h, int32_t block);
/* Extends t's match of max blocks at most (its first n_blocks are the
 * pool's hits, referenced) with blocks the pool or the store holds,
 * uploading the store's into fresh blocks it caches again.  Stops at the
 * first block found nowhere, or when no block of its kind is free.
 * Returns t's new len. */
uint32_t kv__host_match(kv_table_t *t, const int32_t *tokens, uint32_t max,
                        const kv_prefix_key_t *key);
/* The extra block i of a sequence is cached under (kv_prefix_key_t). */
static inline uint64_t
kv__key_extra(const kv_prefix_key_t *key, uint32_t i, uint32_t bt)
{
    return ((uint64_t)i + 1) * bt <= key->n_first ? key->extra : key->after;
}
/* Frees an offloaded table's copies (kv_table_free). */
void kv__host_drop(kv_table_t *t);
/* Registers block b, uncached and holding this key's contents, in the
 * prefix cache (kv_prefix.c). */
void kv__prefix_insert(kv_pool_t *pool, int32_t block, kv_hash_pair_t key, uint64_t parent,
                       uint64_t extra);

#endif /* KV_INT_H */
