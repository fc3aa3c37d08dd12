/*
 * cache/kv_prefix.c — automatic prefix caching: a full KV block is
 * registered under a chain hash of its tokens and of every block before it,
 * and a new sequence whose prompt starts with the same blocks references
 * them instead of computing them again (vLLM v1's prefix caching; SGLang's
 * radix tree cut at block boundaries).
 *
 *   sequence:  [ t0..t3 | t4..t7 | t8..t11 | t12 t13 ]     block_tokens = 4
 *   h1:          H0 = h(0, t0..t3, x)
 *                         H1 = h(H0, t4..t7, x)
 *                                  H2 = h(H1, t8..t11, x)   (partial: none)
 *
 *   buckets[H & mask] -> b7 -> b2 -> -1      chains through meta[b].bucket_next
 *   LRU: head b9 <-> b4 <-> b7 tail           unused cached blocks, oldest first
 *
 * Lifetime.  A cached block in use (refcount > 0) is in the hash table
 * only.  When its last reference goes it moves to the LRU tail instead of
 * the free stack, still findable.  kv_prefix_match takes it out of the list
 * again; an allocation that finds the free stack empty evicts the head.
 * kv_table_free drops a table's blocks last first, so a chain's tail
 * blocks are evicted before its head blocks: a partly evicted chain still
 * matches from the start, and blocks behind an evicted one (unreachable,
 * since matching walks from block 0) are the next to go.  A cached block's
 * contents never change: appends into a cached partial block (a truncate
 * back into it) copy it first, like appends into a shared one.
 *
 * Identity.  To keep O(1) memory per block, tokens are not stored.  A
 * cached block is keyed by its chain hash h1 (kv_block_hash), a second
 * chain hash h2 built the same way with a different seed and a different
 * mixing function, the parent's h1 and the caller's extra key; a match
 * compares all four.  Since h1 and h2 each cover the whole prefix, a false
 * hit needs a simultaneous collision of two independent 64-bit hashes of
 * different prefixes under the same extra, which for non-adversarial
 * inputs is about 2^-128 per pair.  The hashes are not cryptographic: a
 * client that crafts prompts could in principle aim at another prompt's
 * key, which is why tenants are told apart by a salt in extra.
 *
 * Only blocks at their natural positions (entry i at RoPE position i) are
 * committed: a match hands blocks out at those positions, and KV computed
 * elsewhere would differ.
 *
 * Callers: sched/ (match when a request is admitted, commit as its prefill
 * progresses and when it finishes), kv_pool.c (LRU and eviction on
 * release and allocation), tests.
 */
#include "cache/kv_int.h"

#include <stdlib.h>

/* ---- hashing -------------------------------------------------------------- */

/* Fixed seeds (hex digits of pi): the hashes must not change between runs,
 * builds or machines. */
#define KV_SEED1 0x243f6a8885a308d3ull
#define KV_SEED2 0x13198a2e03707344ull

/* Two different 64-bit bijections with full avalanche: the splitmix64
 * finalizer and the MurmurHash3 fmix64 finalizer (well-known constants). */
static inline uint64_t
mix_a(uint64_t x)
{
    return kvs_mix64(x);
}

static inline uint64_t
mix_b(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

static inline uint64_t
mix(uint64_t x, bool second)
{
    return second ? mix_b(x) : mix_a(x);
}

/* One chain step: parent, extra and n first, then the tokens two at a
 * time.  Every step is a bijection of the state for a given input word, so
 * two inputs that differ in one word leave different states behind it; the
 * seed goes into every step so that an all-zero input does not sit at the
 * mixers' fixed point 0.  Tokens are read as integers, never as bytes, so
 * the result does not depend on endianness. */
static inline uint64_t
chain(uint64_t parent, const int32_t *tokens, uint32_t n, uint64_t extra, bool second)
{
    uint64_t seed = second ? KV_SEED2 : KV_SEED1;
    uint64_t h = mix(parent ^ seed, second);
    h = mix(h ^ extra ^ seed, second);
    h = mix(h ^ n ^ seed, second);
    uint32_t i = 0;
    for (; i + 1 < n; i += 2) {
        uint64_t w = (uint64_t)(uint32_t)tokens[i] | (uint64_t)(uint32_t)tokens[i + 1] << 32;
        h = mix(h ^ w ^ seed, second);
    }
    if (i < n)
        h = mix(h ^ (uint64_t)(uint32_t)tokens[i] ^ seed, second);
    return h;
}

uint64_t
kv_block_hash(uint64_t parent, const int32_t *tokens, uint32_t n, uint64_t extra)
{
    return chain(parent, tokens, n, extra, false);
}

uint64_t
kv__block_hash2(uint64_t parent2, const int32_t *tokens, uint32_t n, uint64_t extra)
{
    return chain(parent2, tokens, n, extra, true);
}

kv_hash_pair_t
kv__block_key(kv_hash_pair_t parent, const int32_t *tokens, uint32_t n, uint64_t extra)
{
    return (kv_hash_pair_t){
        .h1 = kv_block_hash(parent.h1, tokens, n, extra),
        .h2 = kv__block_hash2(parent.h2, tokens, n, extra),
    };
}

/* ---- the index: hash table and LRU list (kv_int.h) ------------------------ */

int
kv__prefix_init(kv_pool_t *pool)
{
    uint32_t n = pool->cfg.n_blocks;
    /* At most n blocks are cached, so a power of two >= n buckets keeps
     * chains at one entry on average.  n <= 2^31 (cfg_check). */
    uint32_t n_buckets = 1;
    while (n_buckets < n)
        n_buckets <<= 1;
    pool->meta = malloc((size_t)n * sizeof *pool->meta);
    pool->buckets = malloc((size_t)n_buckets * sizeof *pool->buckets);
    pool->marks = malloc(n);
    if (pool->meta == NULL || pool->buckets == NULL || pool->marks == NULL)
        return KVS_ENOMEM;
    for (uint32_t b = 0; b < n; b++)
        pool->meta[b] = (kv_block_meta_t){.bucket_next = -1, .lru_prev = -1, .lru_next = -1};
    for (uint32_t i = 0; i < n_buckets; i++)
        pool->buckets[i] = -1;
    pool->bucket_mask = n_buckets - 1;
    return 0;
}

void
kv__prefix_close(kv_pool_t *pool)
{
    free(pool->meta);
    free(pool->buckets);
    free(pool->marks);
    pool->meta = NULL;
    pool->buckets = NULL;
    pool->marks = NULL;
}

int32_t
kv__prefix_lookup(const kv_pool_t *pool, kv_hash_pair_t key, uint64_t parent, uint64_t extra)
{
    if (pool->meta == NULL)
        return -1;
    for (int32_t b = pool->buckets[key.h1 & pool->bucket_mask]; b >= 0;
         b = pool->meta[b].bucket_next) {
        const kv_block_meta_t *m = &pool->meta[b];
        if (m->key.h1 == key.h1 && m->key.h2 == key.h2 && m->parent == parent && m->extra == extra)
            return b;
    }
    return -1;
}

static void
index_insert(kv_pool_t *pool, int32_t b, kv_hash_pair_t key, uint64_t parent, uint64_t extra)
{
    kv_block_meta_t *m = &pool->meta[b];
    KVS_ASSERT(!m->cached && pool->n_cached < pool->cfg.n_blocks);
    int32_t *head = &pool->buckets[key.h1 & pool->bucket_mask];
    m->key = key;
    m->parent = parent;
    m->extra = extra;
    m->bucket_next = *head;
    m->cached = true;
    *head = b;
    pool->n_cached++;
}

/* Expected O(1): the chains average under one entry. */
static void
index_remove(kv_pool_t *pool, int32_t b)
{
    kv_block_meta_t *m = &pool->meta[b];
    KVS_ASSERT(m->cached && pool->n_cached > 0);
    int32_t *link = &pool->buckets[m->key.h1 & pool->bucket_mask];
    while (*link != b) {
        /* Running off the chain means the table lost a cached block. */
        KVS_ASSERT(*link >= 0);
        link = &pool->meta[*link].bucket_next;
    }
    *link = m->bucket_next;
    m->bucket_next = -1;
    m->cached = false;
    pool->n_cached--;
}

void
kv__lru_push_tail(kv_pool_t *pool, int32_t b)
{
    kv_block_meta_t *m = &pool->meta[b];
    KVS_ASSERT(m->cached && pool->refcount[b] == 0 && pool->n_lru < pool->cfg.n_blocks);
    m->lru_prev = pool->lru_tail;
    m->lru_next = -1;
    if (pool->lru_tail >= 0)
        pool->meta[pool->lru_tail].lru_next = b;
    else
        pool->lru_head = b;
    pool->lru_tail = b;
    pool->n_lru++;
    pool->n_lru_cold += kv__block_cold(pool, b);
}

void
kv__lru_remove(kv_pool_t *pool, int32_t b)
{
    kv_block_meta_t *m = &pool->meta[b];
    KVS_ASSERT(m->cached && pool->refcount[b] == 0 && pool->n_lru > 0);
    if (m->lru_prev >= 0)
        pool->meta[m->lru_prev].lru_next = m->lru_next;
    else
        pool->lru_head = m->lru_next;
    if (m->lru_next >= 0)
        pool->meta[m->lru_next].lru_prev = m->lru_prev;
    else
        pool->lru_tail = m->lru_prev;
    m->lru_prev = m->lru_next = -1;
    pool->n_lru--;
    pool->n_lru_cold -= kv__block_cold(pool, b);
}

int32_t
kv__prefix_evict(kv_pool_t *pool, bool cold)
{
    /* Most pools have one kind, where this is the head. */
    int32_t b = pool->lru_head;
    while (b >= 0 && kv__block_cold(pool, b) != cold)
        b = pool->meta[b].lru_next;
    KVS_ASSERT(b >= 0);
    kv__lru_remove(pool, b);
    /* Before index_remove, which forgets the key the copy is kept under. */
    if (pool->host != NULL)
        kv__host_keep(pool->host, b);
    index_remove(pool, b);
    pool->evictions++;
    return b;
}

void
kv__prefix_insert(kv_pool_t *pool, int32_t block, kv_hash_pair_t key, uint64_t parent,
                  uint64_t extra)
{
    index_insert(pool, block, key, parent, extra);
}

void
kv__block_ref_cached(kv_pool_t *pool, int32_t b)
{
    if (pool->refcount[b] == 0) {
        kv__lru_remove(pool, b);
        pool->refcount[b] = 1;
    } else {
        kv__block_ref(pool, b);
    }
}

/* ---- match and commit ----------------------------------------------------- */

/* What t->hash_extra records of a key: its extra when there is one, so
 * that the plain functions and a key of one extra agree. */
static uint64_t
key_id(const kv_prefix_key_t *k)
{
    if (k->extra == k->after)
        return k->extra;
    return kvs_mix64(k->extra ^ kvs_mix64(k->after ^ kvs_mix64(0x6669727374ull + k->n_first)));
}

int
kv_prefix_match(kv_table_t *t, const int32_t *tokens, uint32_t n, uint64_t extra,
                uint32_t *n_matched)
{
    const kv_prefix_key_t key = {extra, extra, 0};
    return kv_prefix_match_key(t, tokens, n, &key, n_matched);
}

int
kv_prefix_commit(kv_table_t *t, const int32_t *tokens, uint32_t n, uint64_t extra)
{
    const kv_prefix_key_t key = {extra, extra, 0};
    return kv_prefix_commit_key(t, tokens, n, &key);
}

int
kv_prefix_match_key(kv_table_t *t, const int32_t *tokens, uint32_t n, const kv_prefix_key_t *pk,
                    uint32_t *n_matched)
{
    if (n_matched == NULL || pk == NULL)
        return KVS_EINVAL;
    *n_matched = 0;
    kv_pool_t *pool = t->pool;
    if (!pool->cfg.prefix_cache)
        return 0;
    if (t->len != 0 || t->n_blocks != 0 || (tokens == NULL && n > 0))
        return KVS_EINVAL;

    uint32_t bt = pool->cfg.block_tokens;
    /* The last token is always computed: its logits are the output. */
    uint32_t max = n > 0 ? (n - 1) / bt : 0;
    /* A chain cannot be longer than the pool (it would repeat a block),
     * and this keeps max * bt within the pool's slot bound. */
    if (max > pool->cfg.n_blocks)
        max = pool->cfg.n_blocks;

    /* Find the run first, recording ids and hashes in t's own arrays:
     * growing them is invisible, so running out of memory here leaves t
     * and the pool as they were. */
    kv_hash_pair_t prev = {0, 0};
    uint32_t k = 0;
    while (k < max) {
        const uint64_t extra = kv__key_extra(pk, k, bt);
        kv_hash_pair_t key = kv__block_key(prev, tokens + (size_t)k * bt, bt, extra);
        int32_t b = kv__prefix_lookup(pool, key, prev.h1, extra);
        if (b < 0)
            break;
        int rc = kv__grow((void **)&t->blocks, &t->blocks_cap, (uint64_t)k + 1, sizeof *t->blocks);
        if (rc == 0)
            rc = kv__grow((void **)&t->hashes, &t->hashes_cap, (uint64_t)k + 1, sizeof *t->hashes);
        if (rc != 0)
            return rc;
        t->blocks[k] = b;
        t->hashes[k] = key;
        prev = key;
        k++;
    }
    uint32_t len = k * bt;
    int rc = kv__grow((void **)&t->pos, &t->pos_cap, len, sizeof *t->pos);
    if (rc != 0)
        return rc;

    /* Nothing can fail from here on. */
    for (uint32_t i = 0; i < k; i++)
        kv__block_ref_cached(pool, t->blocks[i]);
    for (uint32_t i = 0; i < len; i++)
        t->pos[i] = (int32_t)i;
    t->n_blocks = k;
    t->len = len;
    t->next_pos = (int32_t)len;
    t->n_hashed = k;
    t->hash_extra = key_id(pk);
    /* The host tier's copies may continue the run. */
    if (pool->host != NULL)
        len = kv__host_match(t, tokens, max, pk);
    pool->queried_tokens += n;
    pool->hit_tokens += len;
    *n_matched = len;
    return 0;
}

/* True when block i of t holds entries at positions i*bt .. i*bt+bt-1. */
static bool
natural_positions(const kv_table_t *t, uint32_t i, uint32_t bt)
{
    const int32_t *pos = t->pos + (size_t)i * bt;
    for (uint32_t j = 0; j < bt; j++)
        if (pos[j] != (int32_t)(i * bt + j))
            return false;
    return true;
}

int
kv_prefix_commit_key(kv_table_t *t, const int32_t *tokens, uint32_t n, const kv_prefix_key_t *pk)
{
    kv_pool_t *pool = t->pool;
    if (pk == NULL)
        return KVS_EINVAL;
    if (!pool->cfg.prefix_cache || t->compacted)
        return 0;
    if (n > t->len || (tokens == NULL && n > 0))
        return KVS_EINVAL;
    if (t->offload != NULL)
        return KVS_EINVAL; /* its blocks are in the host tier */
    uint32_t bt = pool->cfg.block_tokens;
    /* Hashes kept under another key describe other blocks: start over. */
    const uint64_t id = key_id(pk);
    uint32_t start = t->hash_extra == id ? t->n_hashed : 0;
    uint32_t full = n / bt;
    if (full <= start)
        return 0;
    int rc = kv__grow((void **)&t->hashes, &t->hashes_cap, full, sizeof *t->hashes);
    if (rc != 0)
        return rc;
    t->n_hashed = start;
    t->hash_extra = id;

    for (uint32_t i = start; i < full; i++) {
        /* The chain stops here; a later commit looks at this block again
         * (O(block_tokens)) and stops again. */
        if (!natural_positions(t, i, bt))
            break;
        kv_hash_pair_t parent = i > 0 ? t->hashes[i - 1] : (kv_hash_pair_t){0, 0};
        const uint64_t extra = kv__key_extra(pk, i, bt);
        kv_hash_pair_t key = kv__block_key(parent, tokens + (size_t)i * bt, bt, extra);
        int32_t b = t->blocks[i];
        t->hashes[i] = key;
        t->n_hashed = i + 1;
        /* An identical block cached already stays the one matches find;
         * t keeps its own copy unregistered rather than swapping blocks
         * under a running sequence.  A block cached under another key
         * (after an extra change) keeps that key. */
        if (!kv__block_cached(pool, b) && kv__prefix_lookup(pool, key, parent.h1, extra) < 0)
            index_insert(pool, b, key, parent.h1, extra);
    }
    return 0;
}

void
kv_pool_prefix_stats(const kv_pool_t *pool, kv_prefix_stats_t *out)
{
    *out = (kv_prefix_stats_t){
        .queried_tokens = pool->queried_tokens,
        .hit_tokens = pool->hit_tokens,
        .evictions = pool->evictions,
        .cached_blocks = pool->n_cached,
    };
}

/* ---- kv_pool_check's part ------------------------------------------------- */

/* marks[b]: bit 0 = seen in the LRU walk, bit 1 = seen in a bucket chain. */
bool
kv__prefix_check(const kv_pool_t *pool)
{
    if (pool->meta == NULL)
        return pool->n_lru == 0 && pool->n_cached == 0 && pool->lru_head == -1 &&
               pool->lru_tail == -1;
    uint32_t n = pool->cfg.n_blocks;
    const kv_block_meta_t *meta = pool->meta;
    uint8_t *marks = pool->marks;
    memset(marks, 0, n);

    /* The LRU list: well linked both ways, each block once, all of them
     * cached and unused. */
    uint32_t n_lru = 0;
    int32_t prev = -1;
    for (int32_t b = pool->lru_head; b != -1; b = meta[b].lru_next) {
        if (b < 0 || (uint32_t)b >= n || ++n_lru > pool->n_lru || marks[b] != 0 ||
            meta[b].lru_prev != prev || pool->refcount[b] != 0 || !meta[b].cached)
            return false;
        marks[b] = 1;
        prev = b;
    }
    if (n_lru != pool->n_lru || pool->lru_tail != prev)
        return false;

    /* The hash table: every chained block is cached, sits in its own
     * bucket, and appears once. */
    uint32_t n_chained = 0;
    for (uint32_t i = 0; i <= pool->bucket_mask; i++) {
        for (int32_t b = pool->buckets[i]; b != -1; b = meta[b].bucket_next) {
            if (b < 0 || (uint32_t)b >= n || (marks[b] & 2) != 0 || !meta[b].cached ||
                (meta[b].key.h1 & pool->bucket_mask) != i || ++n_chained > pool->n_cached)
                return false;
            marks[b] |= 2;
        }
    }
    if (n_chained != pool->n_cached)
        return false;

    /* Per block: the flag agrees with the chains, an unused cached block
     * is in the LRU list (the walk showed the converse), and a lookup of
     * its key finds the block itself, so keys are unique. */
    for (uint32_t b = 0; b < n; b++) {
        const kv_block_meta_t *m = &meta[b];
        if (m->cached != ((marks[b] & 2) != 0))
            return false;
        if (!m->cached)
            continue;
        if (pool->refcount[b] == 0 && (marks[b] & 1) == 0)
            return false;
        if (kv__prefix_lookup(pool, m->key, m->parent, m->extra) != (int32_t)b)
            return false;
    }
    return true;
}
