/*
 * cache/kv_pool.c — the block pool: K and V memory from the backend, one
 * reference count per block, a stack of free block ids, the registry of
 * live tables that kv_pool_check audits, and the allocation side of the
 * prefix cache (an unused cached block waits in the LRU list and is
 * evicted only when the free stack is empty).
 *
 *   kv.k = [layer 0 | layer 1 | ... ]   each layer_bytes long, laid out
 *   kv.v = [layer 0 | layer 1 | ... ]   block x kv_head x slot x dim (kern.h)
 *
 *   free_ids: [ n-1, n-2, ..., 1, 0 ]   <- top; block 0 is handed out first
 *   LRU:      head (evicted next) <-> ... <-> tail (released last)
 *
 * Invariants: listed in kv_int.h.  Refcount underflow or a block id out of
 * range would let two sequences write one block, so both are KVS_ASSERTs.
 * Allocation order is deterministic (LIFO over a stack that starts sorted),
 * which keeps tests and scheduler traces reproducible.
 *
 * A pool with a codec has two kinds of block (kern.h): full-precision ids
 * [0, n_hot) on free_ids and quantized ids [n_hot, n_blocks) on free_cold;
 * the refcounts, the prefix cache and the LRU list span both.
 *
 * Callers: sched/ (create, view, free-block count, prefix stats),
 * kv_table.c and kv_prefix.c (block alloc/ref/unref, registry), tests.
 */
#include "cache/kv_int.h"

#include <stdlib.h>

/* kern_kv_t.block_gen values, one sequence for every pool of the process:
 * a reader that outlives a pool (a summary kept by block id) can never
 * mistake a block of the next pool, allocated where this one was, for
 * the block it summarised.  0 is never drawn. */
static _Atomic uint64_t kv_gen_next = 1;

/* 2^31 token slots at most: slot ids are int32 (kern_kv_append) and a
 * table's length is a uint32, so every count below fits without checks. */
#define KV_MAX_SLOTS ((uint64_t)INT32_MAX + 1)

static size_t
dtype_bytes(kern_dtype_t dtype)
{
    switch (dtype) {
    case KERN_F32:
        return 4;
    case KERN_F16:
        return 2;
    default:
        return 0;
    }
}

/* KVS_EINVAL for shapes no pool can have; sizes are checked separately so
 * that "too big" (KVS_ENOMEM) stays distinct from "nonsense". */
static int
cfg_check(const kv_pool_cfg_t *cfg)
{
    uint32_t bt = cfg->block_tokens;
    if (cfg->n_layers == 0 || cfg->n_kv_heads == 0 || cfg->head_dim == 0 || cfg->n_blocks == 0)
        return KVS_EINVAL;
    if (bt == 0 || bt > 1024 || (bt & (bt - 1)) != 0)
        return KVS_EINVAL;
    if (dtype_bytes(cfg->dtype) == 0)
        return KVS_EINVAL;
    if (cfg->quant != KERN_KVQ_NONE &&
        (cfg->n_hot == 0 || cfg->n_hot > cfg->n_blocks ||
         kern_kvq_tile_bytes(cfg->quant, false, bt, cfg->head_dim) == 0 ||
         kern_kvq_tile_bytes(cfg->quant, true, bt, cfg->head_dim) == 0))
        return KVS_EINVAL;
    if ((uint64_t)cfg->n_blocks * bt > KV_MAX_SLOTS)
        return KVS_EINVAL;
    return 0;
}

/* Bytes of one block in one layer of K (or V); 0 on overflow. */
static size_t
block_layer_bytes(const kv_pool_cfg_t *cfg)
{
    size_t b = dtype_bytes(cfg->dtype);
    if (kvs_mul_size(b, cfg->n_kv_heads, &b) || kvs_mul_size(b, cfg->block_tokens, &b) ||
        kvs_mul_size(b, cfg->head_dim, &b))
        return 0;
    return b;
}

/* Bytes of one quantized block in one layer, K and V; 0 on overflow. */
static size_t
quant_layer_bytes(const kv_pool_cfg_t *cfg)
{
    size_t b = kern_kvq_tile_bytes(cfg->quant, false, cfg->block_tokens, cfg->head_dim) +
               kern_kvq_tile_bytes(cfg->quant, true, cfg->block_tokens, cfg->head_dim);
    if (kvs_mul_size(b, cfg->n_kv_heads, &b))
        return 0;
    return b;
}

size_t
kv_pool_block_bytes(const kv_pool_cfg_t *cfg)
{
    size_t b = block_layer_bytes(cfg);
    if (cfg_check(cfg) != 0 || b == 0 || kvs_mul_size(b, cfg->n_layers, &b) ||
        kvs_mul_size(b, 2, &b))
        return 0;
    return b;
}

size_t
kv_pool_quant_block_bytes(const kv_pool_cfg_t *cfg)
{
    size_t b = cfg->quant != KERN_KVQ_NONE ? quant_layer_bytes(cfg) : 0;
    if (b == 0 || kvs_mul_size(b, cfg->n_layers, &b))
        return 0;
    return b;
}

int
kv_pool_new(const kv_pool_cfg_t *cfg, kern_backend_t *be, kv_pool_t **out)
{
    *out = NULL;
    if (be == NULL)
        return KVS_EINVAL;
    int rc = cfg_check(cfg);
    if (rc != 0)
        return rc;

    /* Each of K and V takes n_layers * layer_bytes, and together they must
     * be addressable too (kv_pool_block_bytes would overflow otherwise). */
    bool quant = cfg->quant != KERN_KVQ_NONE;
    uint32_t n_hot = quant ? cfg->n_hot : cfg->n_blocks, n_cold = cfg->n_blocks - n_hot;
    size_t layer_bytes, buf_bytes, total;
    size_t blb = block_layer_bytes(cfg);
    if (blb == 0 || kvs_mul_size(blb, n_hot, &layer_bytes) ||
        kvs_mul_size(layer_bytes, cfg->n_layers, &buf_bytes) || kvs_mul_size(buf_bytes, 2, &total))
        return KVS_ENOMEM;
    size_t qk_tile = 0, qv_tile = 0, qk_bytes = 0, qv_bytes = 0;
    if (quant) {
        qk_tile = kern_kvq_tile_bytes(cfg->quant, false, cfg->block_tokens, cfg->head_dim);
        qv_tile = kern_kvq_tile_bytes(cfg->quant, true, cfg->block_tokens, cfg->head_dim);
        size_t tiles;
        if (kvs_mul_size((size_t)n_cold * cfg->n_kv_heads, cfg->n_layers, &tiles) ||
            kvs_mul_size(tiles, qk_tile, &qk_bytes) || kvs_mul_size(tiles, qv_tile, &qv_bytes))
            return KVS_ENOMEM;
    }

    kv_pool_t *pool = calloc(1, sizeof *pool);
    if (pool == NULL)
        return KVS_ENOMEM;
    pool->cfg = *cfg;
    pool->be = be;
    pool->refcount = calloc(cfg->n_blocks, sizeof *pool->refcount);
    pool->free_ids = malloc((size_t)cfg->n_blocks * sizeof *pool->free_ids);
    pool->scratch = malloc((size_t)cfg->n_blocks * sizeof *pool->scratch);
    pool->gen = malloc((size_t)cfg->n_blocks * sizeof *pool->gen);
    pool->kv = (kern_kv_t){
        .dtype = cfg->dtype,
        .n_layers = cfg->n_layers,
        .n_kv_heads = cfg->n_kv_heads,
        .head_dim = cfg->head_dim,
        .block_tokens = cfg->block_tokens,
        .n_blocks = cfg->n_blocks,
        .layer_bytes = layer_bytes,
        .quant = cfg->quant,
        .n_hot = n_hot,
        .qk_tile = qk_tile,
        .qv_tile = qv_tile,
    };
    if (pool->refcount == NULL || pool->free_ids == NULL || pool->scratch == NULL ||
        pool->gen == NULL)
        goto nomem;
    uint64_t g0 = atomic_fetch_add_explicit(&kv_gen_next, cfg->n_blocks, memory_order_relaxed);
    for (uint32_t i = 0; i < cfg->n_blocks; i++)
        pool->gen[i] = g0 + i;
    pool->kv.block_gen = pool->gen;
    if (n_cold > 0) {
        pool->free_cold = malloc((size_t)n_cold * sizeof *pool->free_cold);
        pool->kv.qk = kern_alloc(be, qk_bytes);
        pool->kv.qv = kern_alloc(be, qv_bytes);
        if (pool->free_cold == NULL || pool->kv.qk == NULL || pool->kv.qv == NULL)
            goto nomem;
        rc = kern_memset(be, pool->kv.qk, 0, qk_bytes);
        if (rc == 0)
            rc = kern_memset(be, pool->kv.qv, 0, qv_bytes);
        if (rc != 0)
            goto fail;
    }
    pool->kv.k = kern_alloc(be, buf_bytes);
    if (pool->kv.k == NULL)
        goto nomem;
    pool->kv.v = kern_alloc(be, buf_bytes);
    if (pool->kv.v == NULL)
        goto nomem;
    /* Zeroed so whole-block copies and stray reads past last_len see
     * defined values on every backend, run after run. */
    rc = kern_memset(be, pool->kv.k, 0, buf_bytes);
    if (rc == 0)
        rc = kern_memset(be, pool->kv.v, 0, buf_bytes);
    if (rc != 0)
        goto fail;
    pool->lru_head = pool->lru_tail = -1;
    if (cfg->prefix_cache && kv__prefix_init(pool) != 0)
        goto nomem;

    for (uint32_t i = 0; i < n_hot; i++)
        pool->free_ids[i] = (int32_t)(n_hot - 1 - i);
    pool->n_free = n_hot;
    for (uint32_t i = 0; i < n_cold; i++)
        pool->free_cold[i] = (int32_t)(cfg->n_blocks - 1 - i);
    pool->n_free_cold = n_cold;
    *out = pool;
    return 0;

nomem:
    rc = KVS_ENOMEM;
fail:
    kv_pool_free(pool);
    return rc;
}

void
kv_pool_free(kv_pool_t *pool)
{
    if (pool == NULL)
        return;
    /* A live table would keep block ids into memory we are about to free. */
    KVS_ASSERT(pool->n_tables == 0 && pool->tables == NULL);
    KVS_ASSERT(pool->host == NULL); /* kv_host_free first: it points here */
    kern_free(pool->be, pool->kv.k);
    kern_free(pool->be, pool->kv.v);
    kern_free(pool->be, pool->kv.qk);
    kern_free(pool->be, pool->kv.qv);
    free(pool->free_cold);
    free(pool->refcount);
    free(pool->free_ids);
    free(pool->scratch);
    free(pool->gen);
    kv__prefix_close(pool);
    free(pool);
}

const kv_pool_cfg_t *
kv_pool_cfg(const kv_pool_t *pool)
{
    return &pool->cfg;
}

const kern_kv_t *
kv_pool_kv(const kv_pool_t *pool)
{
    return &pool->kv;
}

uint32_t
kv_pool_n_free(const kv_pool_t *pool)
{
    return kv__n_avail(pool) + kv__n_avail_cold(pool);
}

uint32_t
kv_pool_n_free_kind(const kv_pool_t *pool, bool quantized)
{
    return quantized ? kv__n_avail_cold(pool) : kv__n_avail(pool);
}

uint32_t
kv_pool_refcount(const kv_pool_t *pool, int32_t block)
{
    KVS_ASSERT(block >= 0 && (uint32_t)block < pool->cfg.n_blocks);
    return pool->refcount[block];
}

/* ---- block primitives (kv_int.h) ----------------------------------------- */

void
kv__block_touch(kv_pool_t *pool, int32_t block)
{
    KVS_ASSERT(block >= 0 && (uint32_t)block < pool->cfg.n_blocks);
    pool->gen[block] = atomic_fetch_add_explicit(&kv_gen_next, 1, memory_order_relaxed);
}

int32_t
kv__block_alloc(kv_pool_t *pool)
{
    KVS_ASSERT(kv__n_avail(pool) > 0);
    /* Free blocks first: a cached block may still save a prefill. */
    int32_t b = pool->n_free > 0 ? pool->free_ids[--pool->n_free] : kv__prefix_evict(pool, false);
    KVS_ASSERT(b >= 0 && !kv__block_cold(pool, b) && pool->refcount[b] == 0);
    KVS_ASSERT(!kv__block_cached(pool, b));
    pool->refcount[b] = 1;
    kv__block_touch(pool, b);
    return b;
}

int32_t
kv__block_alloc_cold(kv_pool_t *pool)
{
    KVS_ASSERT(kv__n_avail_cold(pool) > 0);
    int32_t b =
        pool->n_free_cold > 0 ? pool->free_cold[--pool->n_free_cold] : kv__prefix_evict(pool, true);
    KVS_ASSERT(kv__block_cold(pool, b) && (uint32_t)b < pool->cfg.n_blocks &&
               pool->refcount[b] == 0);
    KVS_ASSERT(!kv__block_cached(pool, b));
    pool->refcount[b] = 1;
    kv__block_touch(pool, b);
    return b;
}

void
kv__block_ref(kv_pool_t *pool, int32_t block)
{
    KVS_ASSERT(block >= 0 && (uint32_t)block < pool->cfg.n_blocks);
    /* Referencing a free block would hand it out twice. */
    KVS_ASSERT(pool->refcount[block] > 0 && pool->refcount[block] < UINT32_MAX);
    pool->refcount[block]++;
}

void
kv__block_unref(kv_pool_t *pool, int32_t block)
{
    KVS_ASSERT(block >= 0 && (uint32_t)block < pool->cfg.n_blocks);
    KVS_ASSERT(pool->refcount[block] > 0);
    if (--pool->refcount[block] == 0) {
        if (kv__block_cached(pool, block)) {
            kv__lru_push_tail(pool, block);
            return;
        }
        if (kv__block_cold(pool, block)) {
            KVS_ASSERT(pool->n_free_cold < pool->cfg.n_blocks - kv__n_hot(pool));
            pool->free_cold[pool->n_free_cold++] = block;
            return;
        }
        KVS_ASSERT(pool->n_free < kv__n_hot(pool));
        pool->free_ids[pool->n_free++] = block;
    }
}

void
kv__table_link(kv_pool_t *pool, kv_table_t *t)
{
    t->pool = pool;
    t->prev = NULL;
    t->next = pool->tables;
    if (pool->tables)
        pool->tables->prev = t;
    pool->tables = t;
    pool->n_tables++;
}

void
kv__table_unlink(kv_pool_t *pool, kv_table_t *t)
{
    KVS_ASSERT(pool->n_tables > 0);
    if (t->prev)
        t->prev->next = t->next;
    else
        pool->tables = t->next;
    if (t->next)
        t->next->prev = t->prev;
    t->prev = t->next = NULL;
    pool->n_tables--;
}

/* ---- kv_pool_check -------------------------------------------------------- */

/* Per-table invariants that do not need the other tables. */
static bool
table_check(const kv_pool_t *pool, const kv_table_t *t)
{
    uint32_t bt = pool->cfg.block_tokens;
    uint64_t used = kv__blocks_for(pool, t->len);
    /* An offloaded table's entries are in the host tier (kv_host.c). */
    if (t->offload != NULL) {
        if (t->n_blocks != 0)
            return false;
        used = 0;
    }
    if (t->pool != pool || t->n_blocks < used || t->n_blocks > t->blocks_cap ||
        t->len > t->pos_cap || (uint64_t)t->n_blocks * bt > t->pos_cap)
        return false;
    if (t->n_hashed > t->len / bt || t->n_hashed > t->hashes_cap)
        return false;
    for (uint32_t i = 0; i < t->n_blocks; i++) {
        int32_t b = t->blocks[i];
        if (b < 0 || (uint32_t)b >= pool->cfg.n_blocks)
            return false;
        /* Blocks reserved ahead are private: appends write into them. */
        if (i >= used && kv__block_frozen(pool, b))
            return false;
    }
    int64_t max_pos = -1;
    for (uint32_t i = 0; i < t->len; i++)
        if (t->pos[i] > max_pos)
            max_pos = t->pos[i];
    return t->next_pos == (int32_t)(max_pos + 1);
}

bool
kv_pool_check(const kv_pool_t *pool)
{
    uint32_t n = pool->cfg.n_blocks;
    uint32_t *tally = pool->scratch;
    memset(tally, 0, (size_t)n * sizeof *tally);

    /* Walk the registry, counting references and checking the links. */
    uint32_t n_tables = 0;
    const kv_table_t *prev = NULL;
    for (const kv_table_t *t = pool->tables; t; t = t->next) {
        if (t->prev != prev || ++n_tables > pool->n_tables || !table_check(pool, t))
            return false;
        for (uint32_t i = 0; i < t->n_blocks; i++)
            tally[t->blocks[i]]++;
        prev = t;
    }
    if (n_tables != pool->n_tables)
        return false;

    uint32_t n_zero = 0;
    for (uint32_t b = 0; b < n; b++) {
        if (tally[b] != pool->refcount[b])
            return false;
        n_zero += pool->refcount[b] == 0;
    }
    if (pool->n_free > kv__n_hot(pool) || n_zero != pool->n_free + pool->n_free_cold + pool->n_lru)
        return false;

    /* Every free-stack entry is a distinct, uncached block with refcount 0;
     * kv__prefix_check shows the LRU list is the unused cached ones, so
     * with the count above the two split the unused blocks exactly.
     * tally[b] is 0 for those, so UINT32_MAX marks "seen". */
    for (uint32_t i = 0; i < pool->n_free; i++) {
        int32_t b = pool->free_ids[i];
        if (b < 0 || kv__block_cold(pool, b) || pool->refcount[b] != 0 || tally[b] == UINT32_MAX ||
            kv__block_cached(pool, b))
            return false;
        tally[b] = UINT32_MAX;
    }
    for (uint32_t i = 0; i < pool->n_free_cold; i++) {
        int32_t b = pool->free_cold[i];
        if (b < 0 || (uint32_t)b >= n || !kv__block_cold(pool, b) || pool->refcount[b] != 0 ||
            tally[b] == UINT32_MAX || kv__block_cached(pool, b))
            return false;
        tally[b] = UINT32_MAX;
    }
    uint32_t n_lru_cold = 0;
    for (int32_t b = pool->lru_head; b >= 0 && n_lru_cold <= n; b = pool->meta[b].lru_next)
        n_lru_cold += kv__block_cold(pool, b);
    if (n_lru_cold != pool->n_lru_cold)
        return false;
    return kv__prefix_check(pool);
}
