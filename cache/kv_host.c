/*
 * cache/kv_host.c — the host-memory tier of the KV cache (vLLM's CPU swap
 * space, LMCache's host tier): exact copies of pool blocks, full precision
 * or quantized, in host memory, for two uses.
 *
 *   swap:    kv_table_offload copies a preempted sequence's blocks out and
 *            releases them; kv_table_restore copies them back into fresh
 *            blocks of the same kinds.  The table points at its record.
 *   prefix:  when the pool evicts a cached block (kv__prefix_evict), the
 *            store keeps a copy under the block's chain key; kv_prefix_match
 *            continues past the pool's hits with the store's (kv__host_match),
 *            each brought back into a fresh pool block and cached again.
 *
 *   kv_host
 *   +-----------------------------+
 *   | pool, bytes_cap, bytes_used |
 *   | buckets[h1 & mask] -> c -> c|  prefix copies, chained by h1
 *   | lru_head <-> ... <-> tail   |  the same copies, oldest first
 *   | swaps <-> ...               |  offloaded tables' records
 *   +-----------------------------+
 *
 *   one copy: [ K layer 0 | K layer 1 | ... | V layer 0 | V layer 1 | ... ]
 *             each run as the block has it in the pool (block_run), in
 *             a slot of its kind's size from kern_host_alloc
 *
 * Room.  Swap records are never evicted: a preempted sequence's only other
 * way back is a full recompute.  Prefix copies are a cache and give way,
 * oldest first, to new swap records and to newer prefix copies.  Copies go
 * through the backend first and space is made only once they succeeded, so
 * a failed copy evicts nothing.  The tiers are exclusive: a copy brought
 * back into the pool is freed here.  (A block recomputed and committed
 * while its old copy waits here is stored twice, with equal contents;
 * matching prefers the pool's, and the copy ages out.)
 *
 * Invariants (kv_host_check): bytes_used is the sum of the sizes of every
 * copy and record and stays within bytes_cap; the LRU list and the bucket
 * chains hold exactly the prefix copies, each key once; the swap list holds
 * exactly the records of the pool's offloaded tables.
 *
 * Slots.  kern_host_alloc memory is page-locked on cuda: a block moves in
 * one DMA instead of through the driver's staging buffers, but pinning
 * is slow, and cudaFreeHost waits for the whole device.  So a freed slot
 * waits on its kind's free list for the next copy of that size.  The
 * lists keep no more than the cap leaves free plus one slot of each kind
 * (the copy made before room is made for it), so the store holds at most
 * bytes_cap plus two blocks, and a full store that keeps one block and
 * evicts another reuses the evicted slot instead of allocating.
 *
 * Everything is deterministic: blocks come from the pool's allocator and
 * copies are evicted in LRU order.
 *
 * Callers: sched/ (offload on preemption, restore on re-admission, stats),
 * kv_prefix.c (a copy on eviction, the match continuation), kv_table.c
 * (freeing an offloaded table), tests.
 */
#include "cache/kv_int.h"

#include <stdlib.h>

/* A prefix copy: an evicted cached block's contents and its key. */
typedef struct kv_host_copy {
    struct kv_host_copy *bucket_next;
    struct kv_host_copy *lru_prev; /* NULL at the ends */
    struct kv_host_copy *lru_next;
    kv_hash_pair_t key;
    uint64_t parent;
    uint64_t extra;
    size_t bytes;
    bool cold;
    unsigned char *data; /* a slot */
} kv_host_copy_t;

/* An offloaded table's blocks, a slot each. */
struct kv_offload {
    kv_host_t *host;
    kv_table_t *table;
    struct kv_offload *prev; /* the store's swap list */
    struct kv_offload *next;
    size_t bytes;
    uint32_t n_blocks;
    struct {
        unsigned char *data;
        bool cold; /* the kind the block had */
    } blk[];       /* [n_blocks] */
};

/* A free slot's first bytes. */
typedef struct kv_slot {
    struct kv_slot *next;
} kv_slot_t;

struct kv_host {
    kv_pool_t *pool;
    size_t bytes_cap;
    size_t bytes_used;   /* prefix copies and swap records */
    size_t prefix_bytes; /* the part that can be evicted */
    size_t hot_bytes;    /* one copy of a full-precision block */
    size_t cold_bytes;   /* one copy of a quantized block */

    kv_host_copy_t **buckets; /* [bucket_mask + 1] */
    uint32_t bucket_mask;
    uint32_t n_copies;
    kv_host_copy_t *lru_head; /* evicted first */
    kv_host_copy_t *lru_tail;

    struct kv_offload *swaps;
    uint32_t n_swaps;
    uint64_t swapped_blocks;

    uint64_t offloaded_blocks;
    uint64_t restored_blocks;
    uint64_t kept_blocks;
    uint64_t dropped_blocks;
    uint64_t prefix_evictions;
    uint64_t hit_tokens;

    kv_slot_t *free_slots[2]; /* [cold]: slots of that kind's size */
    size_t n_free[2];
    size_t free_bytes;
    uint64_t slot_allocs;
};

/* ---- block contents ------------------------------------------------------- */

/* Where the K (v false) or V run of block b in `layer` lives in backend
 * memory, and its length: a full-precision block's n_kv_heads x
 * block_tokens x head_dim values, or a quantized block's n_kv_heads
 * consecutive tiles (kern.h).  The one place that knows the layout. */
static unsigned char *
block_run(const kv_pool_t *pool, int32_t b, uint32_t layer, bool v, size_t *bytes)
{
    const kern_kv_t *kv = &pool->kv;
    if (!kv__block_cold(pool, b)) {
        size_t el = kv->dtype == KERN_F16 ? 2 : 4;
        size_t run = (size_t)kv->n_kv_heads * kv->block_tokens * kv->head_dim * el;
        *bytes = run;
        return (unsigned char *)(v ? kv->v : kv->k) + layer * kv->layer_bytes + (size_t)b * run;
    }
    size_t run = (size_t)kv->n_kv_heads * (v ? kv->qv_tile : kv->qk_tile);
    size_t idx = (size_t)layer * (kv->n_blocks - kv->n_hot) + ((uint32_t)b - kv->n_hot);
    *bytes = run;
    return (unsigned char *)(v ? kv->qv : kv->qk) + idx * run;
}

static size_t
copy_bytes(const kv_host_t *h, bool cold)
{
    return cold ? h->cold_bytes : h->hot_bytes;
}

/* Block b's runs to host memory (download) or back into block b: its K
 * runs of every layer, then its V runs.  A layer's run is the same
 * distance from the previous layer's in every block of a kind, so each
 * half is one kern_*_runs call, not one transfer per layer. */
static int
block_xfer(kv_pool_t *pool, int32_t b, unsigned char *host, bool download)
{
    const uint32_t n_layers = pool->cfg.n_layers;
    for (int v = 0; v < 2; v++) {
        size_t n;
        unsigned char *dev = block_run(pool, b, 0, v, &n);
        size_t stride = n_layers > 1 ? (size_t)(block_run(pool, b, 1, v, &n) - dev) : n;
        int rc = download ? kern_download_runs(pool->be, host, dev, stride, n, n_layers)
                          : kern_upload_runs(pool->be, dev, stride, host, n, n_layers);
        if (rc != 0)
            return rc;
        host += n * n_layers;
    }
    return 0;
}

/* ---- slots ---------------------------------------------------------------- */

/* A slot for a copy of the kind, reused or new; NULL when out of memory. */
static unsigned char *
slot_get(kv_host_t *h, bool cold)
{
    kv_slot_t *s = h->free_slots[cold];
    if (s != NULL) {
        h->free_slots[cold] = s->next;
        h->n_free[cold]--;
        h->free_bytes -= copy_bytes(h, cold);
        return (unsigned char *)s;
    }
    unsigned char *p = kern_host_alloc(h->pool->be, copy_bytes(h, cold));
    h->slot_allocs += p != NULL;
    return p;
}

static void
slot_put(kv_host_t *h, bool cold, unsigned char *p)
{
    kv_slot_t *s = (kv_slot_t *)p;
    s->next = h->free_slots[cold];
    h->free_slots[cold] = s;
    h->n_free[cold]++;
    h->free_bytes += copy_bytes(h, cold);
}

/* What the free lists may keep now (the Slots paragraph above). */
static size_t
free_limit(const kv_host_t *h)
{
    return h->bytes_cap - h->bytes_used + h->hot_bytes + h->cold_bytes;
}

/* Gives slots back, the kind with more bytes free first, until the free
 * lists are within their limit (limit 0: all). */
static void
slot_trim(kv_host_t *h, size_t limit)
{
    while (h->free_bytes > limit) {
        bool cold = h->n_free[1] * h->cold_bytes > h->n_free[0] * h->hot_bytes;
        kv_slot_t *s = h->free_slots[cold];
        h->free_slots[cold] = s->next;
        h->n_free[cold]--;
        h->free_bytes -= copy_bytes(h, cold);
        kern_host_free(h->pool->be, s);
    }
}

/* ---- prefix copies: hash chains and LRU ----------------------------------- */

static kv_host_copy_t *
copy_lookup(const kv_host_t *h, kv_hash_pair_t key, uint64_t parent, uint64_t extra)
{
    for (kv_host_copy_t *c = h->buckets[key.h1 & h->bucket_mask]; c; c = c->bucket_next)
        if (c->key.h1 == key.h1 && c->key.h2 == key.h2 && c->parent == parent && c->extra == extra)
            return c;
    return NULL;
}

/* Doubles the buckets once copies outnumber them.  Failing to is harmless:
 * chains only get longer. */
static void
buckets_grow(kv_host_t *h)
{
    uint32_t n = h->bucket_mask + 1;
    if (h->n_copies < n || n > UINT32_MAX / 2)
        return;
    kv_host_copy_t **nb = calloc((size_t)n * 2, sizeof *nb);
    if (nb == NULL)
        return;
    uint32_t mask = n * 2 - 1;
    /* Re-chained in LRU order, so the result does not depend on the old
     * chains' order. */
    for (kv_host_copy_t *c = h->lru_head; c; c = c->lru_next) {
        c->bucket_next = nb[c->key.h1 & mask];
        nb[c->key.h1 & mask] = c;
    }
    free(h->buckets);
    h->buckets = nb;
    h->bucket_mask = mask;
}

static void
copy_link(kv_host_t *h, kv_host_copy_t *c)
{
    kv_host_copy_t **head = &h->buckets[c->key.h1 & h->bucket_mask];
    c->bucket_next = *head;
    *head = c;
    c->lru_prev = h->lru_tail;
    c->lru_next = NULL;
    if (h->lru_tail)
        h->lru_tail->lru_next = c;
    else
        h->lru_head = c;
    h->lru_tail = c;
    h->n_copies++;
    h->bytes_used += c->bytes;
    h->prefix_bytes += c->bytes;
    buckets_grow(h);
}

static void
lru_unlink(kv_host_t *h, kv_host_copy_t *c)
{
    if (c->lru_prev)
        c->lru_prev->lru_next = c->lru_next;
    else
        h->lru_head = c->lru_next;
    if (c->lru_next)
        c->lru_next->lru_prev = c->lru_prev;
    else
        h->lru_tail = c->lru_prev;
}

/* Takes c out of the chains, the list and the accounting; the caller
 * frees it. */
static void
copy_unlink(kv_host_t *h, kv_host_copy_t *c)
{
    kv_host_copy_t **link = &h->buckets[c->key.h1 & h->bucket_mask];
    while (*link != c) {
        KVS_ASSERT(*link != NULL);
        link = &(*link)->bucket_next;
    }
    *link = c->bucket_next;
    lru_unlink(h, c);
    KVS_ASSERT(h->n_copies > 0 && h->prefix_bytes >= c->bytes);
    h->n_copies--;
    h->bytes_used -= c->bytes;
    h->prefix_bytes -= c->bytes;
}

static void
copy_drop(kv_host_t *h, kv_host_copy_t *c)
{
    copy_unlink(h, c);
    slot_put(h, c->cold, c->data);
    free(c);
}

/* Whether `bytes` more would fit once every prefix copy is gone. */
static bool
room_for(const kv_host_t *h, size_t bytes)
{
    return bytes <= h->bytes_cap - h->bytes_used + h->prefix_bytes;
}

/* Evicts prefix copies, oldest first, until `bytes` more fit (room_for
 * holds, so they will). */
static void
make_room(kv_host_t *h, size_t bytes)
{
    while (h->bytes_cap - h->bytes_used < bytes) {
        KVS_ASSERT(h->lru_head != NULL);
        copy_drop(h, h->lru_head);
        h->prefix_evictions++;
    }
}

/* ---- the store ------------------------------------------------------------ */

int
kv_host_new(kv_pool_t *pool, size_t bytes, kv_host_t **out)
{
    *out = NULL;
    if (pool == NULL || bytes == 0 || pool->host != NULL)
        return KVS_EINVAL;
    kv_host_t *h = calloc(1, sizeof *h);
    if (h == NULL)
        return KVS_ENOMEM;
    enum { N_BUCKETS = 64 };
    h->buckets = calloc(N_BUCKETS, sizeof *h->buckets);
    if (h->buckets == NULL) {
        free(h);
        return KVS_ENOMEM;
    }
    h->bucket_mask = N_BUCKETS - 1;
    h->pool = pool;
    h->bytes_cap = bytes;
    h->hot_bytes = kv_pool_block_bytes(&pool->cfg);
    h->cold_bytes = kv_pool_quant_block_bytes(&pool->cfg);
    pool->host = h;
    *out = h;
    return 0;
}

void
kv_host_free(kv_host_t *h)
{
    if (h == NULL)
        return;
    /* An offloaded table would be left pointing at a freed record. */
    KVS_ASSERT(h->swaps == NULL && h->n_swaps == 0);
    while (h->lru_head)
        copy_drop(h, h->lru_head);
    slot_trim(h, 0);
    h->pool->host = NULL;
    free(h->buckets);
    free(h);
}

void
kv_host_stats(const kv_host_t *h, kv_host_stats_t *out)
{
    *out = (kv_host_stats_t){
        .offloaded_blocks = h->offloaded_blocks,
        .restored_blocks = h->restored_blocks,
        .swapped_blocks = h->swapped_blocks,
        .kept_blocks = h->kept_blocks,
        .dropped_blocks = h->dropped_blocks,
        .prefix_evictions = h->prefix_evictions,
        .prefix_blocks = h->n_copies,
        .hit_tokens = h->hit_tokens,
        .bytes_used = h->bytes_used,
        .bytes_cap = h->bytes_cap,
        .free_bytes = h->free_bytes,
        .slot_allocs = h->slot_allocs,
    };
}

/* ---- swap ----------------------------------------------------------------- */

int
kv_table_offload(kv_table_t *t, kv_host_t *h)
{
    kv_pool_t *pool = t->pool;
    if (h == NULL || pool->host != h || t->offload != NULL || t->len == 0)
        return KVS_EINVAL;
    uint32_t used = (uint32_t)kv__blocks_for(pool, t->len);
    size_t bytes = 0;
    for (uint32_t i = 0; i < used; i++)
        bytes += copy_bytes(h, kv__block_cold(pool, t->blocks[i]));
    if (!room_for(h, bytes))
        return KVS_ENOSPC;

    struct kv_offload *o = malloc(sizeof *o + (size_t)used * sizeof o->blk[0]);
    if (o == NULL)
        return KVS_ENOMEM;
    for (uint32_t i = 0; i < used; i++) {
        int32_t b = t->blocks[i];
        o->blk[i].cold = kv__block_cold(pool, b);
        o->blk[i].data = slot_get(h, o->blk[i].cold);
        int rc = o->blk[i].data ? block_xfer(pool, b, o->blk[i].data, true) : KVS_ENOMEM;
        if (rc != 0) {
            for (uint32_t j = i + 1; j-- > 0;)
                if (o->blk[j].data)
                    slot_put(h, o->blk[j].cold, o->blk[j].data);
            free(o);
            slot_trim(h, free_limit(h));
            return rc;
        }
    }

    /* Nothing can fail from here on. */
    make_room(h, bytes);
    o->host = h;
    o->table = t;
    o->bytes = bytes;
    o->n_blocks = used;
    o->prev = NULL;
    o->next = h->swaps;
    if (h->swaps)
        h->swaps->prev = o;
    h->swaps = o;
    h->n_swaps++;
    h->bytes_used += bytes;
    h->swapped_blocks += used;
    h->offloaded_blocks += used;
    slot_trim(h, free_limit(h));
    /* Last first, as kv_table_free does, so the prefix cache's LRU list
     * evicts a chain's tail before its head. */
    for (uint32_t i = t->n_blocks; i-- > 0;)
        kv__block_unref(pool, t->blocks[i]);
    t->n_blocks = 0;
    t->offload = o;
    return 0;
}

static void
offload_unlink(kv_host_t *h, struct kv_offload *o)
{
    if (o->prev)
        o->prev->next = o->next;
    else
        h->swaps = o->next;
    if (o->next)
        o->next->prev = o->prev;
    KVS_ASSERT(h->n_swaps > 0 && h->bytes_used >= o->bytes && h->swapped_blocks >= o->n_blocks);
    h->n_swaps--;
    h->bytes_used -= o->bytes;
    h->swapped_blocks -= o->n_blocks;
    o->table->offload = NULL;
    for (uint32_t i = 0; i < o->n_blocks; i++)
        slot_put(h, o->blk[i].cold, o->blk[i].data);
    free(o);
}

int
kv_table_restore(kv_table_t *t, kv_host_t *h)
{
    struct kv_offload *o = t->offload;
    if (h == NULL || o == NULL || o->host != h)
        return KVS_EINVAL;
    kv_pool_t *pool = t->pool;
    uint32_t n = o->n_blocks, n_cold = 0;
    for (uint32_t i = 0; i < n; i++)
        n_cold += o->blk[i].cold;
    if (n - n_cold > kv__n_avail(pool) || n_cold > kv__n_avail_cold(pool))
        return KVS_EAGAIN;
    int rc = kv__grow((void **)&t->blocks, &t->blocks_cap, n, sizeof *t->blocks);
    if (rc != 0)
        return rc;

    /* The allocations may evict cached blocks into this store; they never
     * touch swap records, so o stays. */
    for (uint32_t i = 0; i < n; i++) {
        int32_t b = o->blk[i].cold ? kv__block_alloc_cold(pool) : kv__block_alloc(pool);
        t->blocks[i] = b;
        rc = block_xfer(pool, b, o->blk[i].data, false);
        if (rc != 0) {
            for (uint32_t j = i + 1; j-- > 0;)
                kv__block_unref(pool, t->blocks[j]);
            return rc;
        }
    }
    t->n_blocks = n;
    h->restored_blocks += n;
    offload_unlink(h, o);
    return 0;
}

bool
kv_table_offloaded(const kv_table_t *t)
{
    return t->offload != NULL;
}

void
kv__host_drop(kv_table_t *t)
{
    offload_unlink(t->offload->host, t->offload);
}

/* ---- the prefix cache's second level (kv_int.h) --------------------------- */

void
kv__host_keep(kv_host_t *h, int32_t b)
{
    kv_pool_t *pool = h->pool;
    const kv_block_meta_t *m = &pool->meta[b];
    bool cold = kv__block_cold(pool, b);
    kv_host_copy_t *old = copy_lookup(h, m->key, m->parent, m->extra);
    if (old != NULL && old->cold == cold) {
        /* Same key and kind, same contents: only its age changes. */
        lru_unlink(h, old);
        old->lru_prev = h->lru_tail;
        old->lru_next = NULL;
        if (h->lru_tail)
            h->lru_tail->lru_next = old;
        else
            h->lru_head = old;
        h->lru_tail = old;
        h->kept_blocks++;
        return;
    }
    size_t bytes = copy_bytes(h, cold);
    kv_host_copy_t *c = room_for(h, bytes) ? malloc(sizeof *c) : NULL;
    unsigned char *data = c ? slot_get(h, cold) : NULL;
    /* This runs inside an allocation, which must not fail: a block that
     * cannot be kept is dropped, as it would be without a store. */
    if (data == NULL || block_xfer(pool, b, data, true) != 0) {
        if (data != NULL) {
            slot_put(h, cold, data);
            slot_trim(h, free_limit(h));
        }
        free(c);
        h->dropped_blocks++;
        return;
    }
    c->data = data;
    /* The other kind's copy of this key gives way to the block the pool
     * had last, before make_room could evict it under us. */
    if (old != NULL)
        copy_drop(h, old);
    make_room(h, bytes);
    c->key = m->key;
    c->parent = m->parent;
    c->extra = m->extra;
    c->bytes = bytes;
    c->cold = cold;
    copy_link(h, c);
    h->kept_blocks++;
    slot_trim(h, free_limit(h));
}

uint32_t
kv__host_match(kv_table_t *t, const int32_t *tokens, uint32_t max, const kv_prefix_key_t *pk)
{
    kv_pool_t *pool = t->pool;
    kv_host_t *h = pool->host;
    uint32_t bt = pool->cfg.block_tokens;
    uint32_t k = t->n_blocks;
    KVS_ASSERT(t->len == k * bt && t->n_hashed == k);
    while (k < max) {
        kv_hash_pair_t prev = k > 0 ? t->hashes[k - 1] : (kv_hash_pair_t){0, 0};
        const int32_t *blk = tokens + (size_t)k * bt;
        const uint64_t extra = kv__key_extra(pk, k, bt);
        kv_hash_pair_t key = kv__block_key(prev, blk, bt, extra);
        /* Room first: a failure shortens the match and changes nothing. */
        if (kv__grow((void **)&t->blocks, &t->blocks_cap, (uint64_t)k + 1, sizeof *t->blocks) ||
            kv__grow((void **)&t->hashes, &t->hashes_cap, (uint64_t)k + 1, sizeof *t->hashes) ||
            kv__grow((void **)&t->pos, &t->pos_cap, ((uint64_t)k + 1) * bt, sizeof *t->pos))
            break;
        /* Past a block that came from here, the pool may hold the next one
         * again (it was used, or recomputed, after its parent left). */
        int32_t b = kv__prefix_lookup(pool, key, prev.h1, extra);
        if (b >= 0) {
            kv__block_ref_cached(pool, b);
        } else {
            kv_host_copy_t *c = copy_lookup(h, key, prev.h1, extra);
            if (c == NULL || (c->cold ? kv__n_avail_cold(pool) : kv__n_avail(pool)) == 0)
                break;
            /* Out of the store before allocating: the allocation may evict
             * a cached block into it, which may evict old copies. */
            copy_unlink(h, c);
            b = c->cold ? kv__block_alloc_cold(pool) : kv__block_alloc(pool);
            int rc = block_xfer(pool, b, c->data, false);
            slot_put(h, c->cold, c->data);
            free(c);
            if (rc != 0) {
                /* The copy is gone with its block: the cache lost an entry. */
                KVS_WARNF("kv_host: restoring a prefix block failed: %s", kvs_strerror(rc));
                kv__block_unref(pool, b);
                break;
            }
            kv__prefix_insert(pool, b, key, prev.h1, extra);
            h->hit_tokens += bt;
        }
        t->blocks[k] = b;
        t->hashes[k] = key;
        for (uint32_t j = 0; j < bt; j++)
            t->pos[(size_t)k * bt + j] = (int32_t)(k * bt + j);
        k++;
        t->n_blocks = k;
        t->n_hashed = k;
        t->len = k * bt;
        t->next_pos = (int32_t)t->len;
    }
    return t->len;
}

/* ---- kv_host_check -------------------------------------------------------- */

bool
kv_host_check(const kv_host_t *h)
{
    const kv_pool_t *pool = h->pool;
    if (pool->host != h || h->bytes_used > h->bytes_cap || h->prefix_bytes > h->bytes_used)
        return false;

    /* The LRU list: linked both ways, each copy findable by its key. */
    uint32_t n = 0;
    size_t prefix = 0;
    const kv_host_copy_t *prev = NULL;
    for (const kv_host_copy_t *c = h->lru_head; c; c = c->lru_next) {
        if (c->lru_prev != prev || ++n > h->n_copies || c->bytes != copy_bytes(h, c->cold) ||
            copy_lookup(h, c->key, c->parent, c->extra) != c)
            return false;
        prefix += c->bytes;
        prev = c;
    }
    if (n != h->n_copies || h->lru_tail != prev || prefix != h->prefix_bytes)
        return false;
    /* The chains hold exactly those copies (each was found above). */
    uint32_t n_chained = 0;
    for (uint32_t i = 0; i <= h->bucket_mask; i++)
        for (const kv_host_copy_t *c = h->buckets[i]; c; c = c->bucket_next)
            if ((c->key.h1 & h->bucket_mask) != i || ++n_chained > n)
                return false;
    if (n_chained != n)
        return false;

    /* Swap records: one per offloaded table of the pool, each sized by its
     * blocks' kinds. */
    uint32_t n_swaps = 0;
    uint64_t swapped = 0;
    size_t swap_bytes = 0;
    const struct kv_offload *oprev = NULL;
    for (const struct kv_offload *o = h->swaps; o; o = o->next) {
        if (o->prev != oprev || o->host != h || ++n_swaps > h->n_swaps || o->table->offload != o ||
            o->table->pool != pool || o->table->n_blocks != 0 ||
            o->n_blocks != kv__blocks_for(pool, o->table->len))
            return false;
        size_t bytes = 0;
        for (uint32_t i = 0; i < o->n_blocks; i++)
            bytes += copy_bytes(h, o->blk[i].cold);
        if (bytes != o->bytes)
            return false;
        swapped += o->n_blocks;
        swap_bytes += o->bytes;
        oprev = o;
    }
    if (n_swaps != h->n_swaps || swapped != h->swapped_blocks ||
        swap_bytes + prefix != h->bytes_used)
        return false;
    uint32_t n_offloaded = 0;
    for (const kv_table_t *t = pool->tables; t; t = t->next)
        n_offloaded += t->offload != NULL;
    if (n_offloaded != n_swaps)
        return false;

    /* The free lists: their bytes, within the limit. */
    size_t free_bytes = 0;
    for (int k = 0; k < 2; k++) {
        size_t n_free = 0;
        for (const kv_slot_t *s = h->free_slots[k]; s; s = s->next)
            n_free++;
        if (n_free != h->n_free[k])
            return false;
        free_bytes += n_free * copy_bytes(h, k);
    }
    return free_bytes == h->free_bytes && free_bytes <= free_limit(h);
}
