/*
 * cache/kv_table.c — per-sequence block tables: which blocks hold a
 * sequence's KV entries, in order, plus the RoPE position of each entry.
 *
 *   blocks: [ b7 | b2 | b9 | b4 ]          n_blocks = 4, block_tokens = 4
 *   pos:    [ 0 1 2 3 | 4 5 6 7 | 8 9 . . | . . . . ]   len = 10
 *             full       full     partial   reserved ahead
 *
 *   entry i lives in slot blocks[i / block_tokens] * block_tokens + i % block_tokens
 *
 * Invariants (kv_int.h): blocks past ceil(len / block_tokens) were
 * reserved ahead and are private; the positions array always has room for
 * every held slot, so append never allocates; next_pos is max(pos) + 1.
 * Appends never write into a block another table references or the prefix
 * cache holds (a truncate can leave a table's partial last block in either
 * state): reserve copies such a block first (copy-on-write), and append
 * refuses to write into one that was not.
 *
 * Every operation is all-or-nothing: a call that fails leaves the table
 * and the pool as they were.
 *
 * The table also remembers the chain hashes of its first n_hashed full
 * blocks for kv_prefix.c; truncate forgets those of blocks it reopens and
 * fork copies them.
 *
 * Callers: sched/ (reserve, append, fork, truncate on preemption or
 * rejected draft tokens, export for the kernels), kv_prefix.c, tests.
 */
#include "cache/kv_int.h"

#include <stdlib.h>

/* Doubling, so that token-by-token reservation costs amortized O(1). */
int
kv__grow(void **arr, uint32_t *cap, uint64_t want, size_t el)
{
    if (want <= *cap)
        return 0;
    uint64_t new_cap = (uint64_t)*cap * 2;
    if (new_cap < want)
        new_cap = want;
    if (new_cap < 4)
        new_cap = 4;
    if (new_cap > UINT32_MAX)
        new_cap = want; /* want itself fits: the pool bounds it */
    size_t bytes;
    if (kvs_mul_size((size_t)new_cap, el, &bytes))
        return KVS_ENOMEM;
    void *p = realloc(*arr, bytes);
    if (p == NULL)
        return KVS_ENOMEM;
    *arr = p;
    *cap = (uint32_t)new_cap;
    return 0;
}

static int32_t
max_pos_plus_one(const kv_table_t *t)
{
    int32_t next = 0;
    for (uint32_t i = 0; i < t->len; i++)
        if (t->pos[i] >= next)
            next = t->pos[i] + 1; /* append keeps pos < INT32_MAX */
    return next;
}

int
kv_table_new(kv_pool_t *pool, kv_table_t **out)
{
    kv_table_t *t = calloc(1, sizeof *t);
    *out = t;
    if (t == NULL)
        return KVS_ENOMEM;
    kv__table_link(pool, t);
    return 0;
}

void
kv_table_free(kv_table_t *t)
{
    if (t == NULL)
        return;
    if (t->offload != NULL)
        kv__host_drop(t);
    for (uint32_t i = t->n_blocks; i-- > 0;)
        kv__block_unref(t->pool, t->blocks[i]);
    kv__table_unlink(t->pool, t);
    free(t->blocks);
    free(t->pos);
    free(t->hashes);
    free(t);
}

/* A private full-precision copy of block src in dst: a plain copy, or for
 * a quantized block (a truncate reopened it) its decoded values. */
static int
copy_block(kv_pool_t *pool, int32_t src, int32_t dst)
{
    if (kv__block_cold(pool, src))
        return kern_kv_seal(pool->be, &pool->kv, &src, &dst, 1);
    return kern_kv_copy(pool->be, &pool->kv, &src, &dst, 1);
}

int
kv_table_reserve(kv_table_t *t, uint32_t n)
{
    kv_pool_t *pool = t->pool;
    uint32_t bt = pool->cfg.block_tokens;
    uint64_t need = kv__blocks_for(pool, (uint64_t)t->len + n);
    if (t->offload != NULL)
        return KVS_EINVAL; /* kv_table_restore first */
    if (need > pool->cfg.n_blocks)
        return KVS_ENOSPC;

    uint32_t n_new = need > t->n_blocks ? (uint32_t)(need - t->n_blocks) : 0;
    /* The next append writes into the block holding entry len.  If that
     * block is partly filled and frozen (a truncate back into a block a
     * fork still reads, or one the prefix cache holds), or quantized, it
     * needs a private full-precision copy first. */
    uint32_t last = t->len / bt;
    bool cow = n > 0 && t->len % bt != 0 && !kv__block_writable(pool, t->blocks[last]);
    if ((uint64_t)n_new + cow > kv__n_hot(pool))
        return KVS_ENOSPC; /* appends fill full-precision blocks only */
    if ((uint64_t)n_new + cow > kv__n_avail(pool))
        return KVS_EAGAIN;

    /* Both arrays first: growing capacity is invisible, so a failure here
     * still leaves the table unchanged.  need * bt <= 2^31 (pool bound). */
    uint64_t hold = need > t->n_blocks ? need : t->n_blocks;
    int rc = kv__grow((void **)&t->blocks, &t->blocks_cap, hold, sizeof *t->blocks);
    if (rc == 0)
        rc = kv__grow((void **)&t->pos, &t->pos_cap, hold * bt, sizeof *t->pos);
    if (rc != 0)
        return rc;

    /* The copy is the only step that can fail after this point, so it goes
     * before the new blocks are taken.  (Its block may have come from an
     * eviction, which a failed copy does not undo: the cache only lost an
     * entry it could have lost to any allocation.) */
    if (cow) {
        int32_t src = t->blocks[last];
        int32_t dst = kv__block_alloc(pool);
        rc = copy_block(pool, src, dst);
        if (rc != 0) {
            kv__block_unref(pool, dst);
            return rc;
        }
        kv__block_unref(pool, src);
        t->blocks[last] = dst;
    }
    for (uint32_t i = 0; i < n_new; i++)
        t->blocks[t->n_blocks++] = kv__block_alloc(pool);
    return 0;
}

int
kv_table_append(kv_table_t *t, const int32_t *pos, uint32_t n, int32_t *slots)
{
    if (n == 0)
        return 0;
    if (pos == NULL || slots == NULL)
        return KVS_EINVAL;
    kv_pool_t *pool = t->pool;
    uint32_t bt = pool->cfg.block_tokens;
    if ((uint64_t)t->len + n > (uint64_t)t->n_blocks * bt)
        return KVS_ENOSPC;
    /* Writing into a partial block that another table also reads, or that
     * the prefix cache holds, would change KV someone else relies on, and
     * a quantized block takes no appends; only reserve may make it a
     * private full-precision block. */
    if (t->len % bt != 0 && !kv__block_writable(pool, t->blocks[t->len / bt]))
        return KVS_ENOSPC;
    /* INT32_MAX is refused so next_pos = pos + 1 stays representable. */
    for (uint32_t i = 0; i < n; i++)
        if (pos[i] < 0 || pos[i] == INT32_MAX)
            return KVS_EINVAL;

    for (uint32_t i = 0; i < n; i++) {
        uint32_t idx = t->len + i;
        int32_t b = t->blocks[idx / bt];
        slots[i] = b * (int32_t)bt + (int32_t)(idx % bt);
        t->pos[idx] = pos[i];
        if (pos[i] >= t->next_pos)
            t->next_pos = pos[i] + 1;
    }
    t->len += n;
    return 0;
}

int
kv_table_truncate(kv_table_t *t, uint32_t n_tokens)
{
    if (n_tokens > t->len || t->offload != NULL)
        return KVS_EINVAL;
    /* Blocks reserved ahead go too: keeping them would leave a private
     * block behind a possibly shared partial one, and the scheduler
     * reserves again before its next append anyway. */
    uint64_t keep = kv__blocks_for(t->pool, n_tokens);
    while (t->n_blocks > keep)
        kv__block_unref(t->pool, t->blocks[--t->n_blocks]);
    /* A block that is no longer full will take new entries: its hash (and
     * those after it) no longer describe it. */
    uint32_t full = n_tokens / t->pool->cfg.block_tokens;
    if (t->n_hashed > full)
        t->n_hashed = full;
    if (keep > full) /* and what was derived from its keys */
        kv__block_touch(t->pool, t->blocks[full]);
    t->len = n_tokens;
    t->next_pos = max_pos_plus_one(t);
    return 0;
}

int
kv_table_fork(const kv_table_t *t, kv_table_t **out)
{
    kv_pool_t *pool = t->pool;
    uint32_t bt = pool->cfg.block_tokens;
    uint32_t used = (uint32_t)kv__blocks_for(pool, t->len);
    bool partial = t->len % bt != 0;
    *out = NULL;
    if (t->offload != NULL)
        return KVS_EINVAL;
    if (partial && kv__n_avail(pool) == 0)
        return KVS_EAGAIN;

    kv_table_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return KVS_ENOMEM;
    if (used > 0) {
        int rc = kv__grow((void **)&c->blocks, &c->blocks_cap, used, sizeof *c->blocks);
        if (rc == 0)
            rc = kv__grow((void **)&c->pos, &c->pos_cap, (uint64_t)used * bt, sizeof *c->pos);
        /* The child's full blocks are the parent's, so their hashes carry
         * over and its commits start where the parent's left off. */
        if (rc == 0)
            rc = kv__grow((void **)&c->hashes, &c->hashes_cap, t->n_hashed, sizeof *c->hashes);
        if (rc != 0) {
            free(c->blocks);
            free(c->pos);
            free(c->hashes);
            free(c);
            return rc;
        }
    }

    uint32_t shared = partial ? used - 1 : used;
    if (partial) {
        int32_t src = t->blocks[used - 1];
        int32_t dst = kv__block_alloc(pool);
        int rc = copy_block(pool, src, dst);
        if (rc != 0) {
            kv__block_unref(pool, dst);
            free(c->blocks);
            free(c->pos);
            free(c->hashes);
            free(c);
            return rc;
        }
        c->blocks[used - 1] = dst;
    }
    for (uint32_t i = 0; i < shared; i++) {
        kv__block_ref(pool, t->blocks[i]);
        c->blocks[i] = t->blocks[i];
    }
    c->n_blocks = used;
    if (t->len > 0)
        memcpy(c->pos, t->pos, (size_t)t->len * sizeof *c->pos);
    c->len = t->len;
    c->next_pos = t->next_pos;
    if (t->n_hashed > 0)
        memcpy(c->hashes, t->hashes, (size_t)t->n_hashed * sizeof *c->hashes);
    c->n_hashed = t->n_hashed;
    c->hash_extra = t->hash_extra;
    c->compacted = t->compacted;
    kv__table_link(pool, c);
    *out = c;
    return 0;
}

uint32_t
kv_table_evict(kv_table_t *t, uint32_t keep_head, uint32_t budget)
{
    kv_pool_t *pool = t->pool;
    uint32_t bt = pool->cfg.block_tokens;
    if (t->len <= budget || t->offload != NULL)
        return 0;
    uint32_t first = (keep_head + bt - 1) / bt;          /* the sinks' blocks stay */
    uint32_t last = t->len == 0 ? 0 : (t->len - 1) / bt; /* and the newest */
    if (first >= last)
        return 0;
    uint32_t want = (t->len - budget + bt - 1) / bt, room = last - first;
    uint32_t k = want < room ? want : room;
    for (uint32_t i = first; i < first + k; i++)
        kv__block_unref(pool, t->blocks[i]);
    memmove(t->blocks + first, t->blocks + first + k,
            (size_t)(t->n_blocks - first - k) * sizeof *t->blocks);
    t->n_blocks -= k;
    memmove(t->pos + (size_t)first * bt, t->pos + (size_t)(first + k) * bt,
            (size_t)(t->len - (first + k) * bt) * sizeof *t->pos);
    t->len -= k * bt;
    /* The blocks that moved down are no longer the prefix their hashes
     * describe; the sinks' blocks still are.  next_pos is unchanged: the
     * newest entry stays. */
    if (t->n_hashed > first)
        t->n_hashed = first;
    return k;
}

int
kv_table_seal(kv_table_t *t, uint32_t keep_head, uint32_t keep_tail)
{
    kv_pool_t *pool = t->pool;
    if (t->offload != NULL)
        return KVS_EINVAL;
    uint32_t first, end;
    kv__seal_span(pool, t->len, keep_head, keep_tail, &first, &end);
    /* In batches, so that the backend encodes many blocks per call. */
    int32_t src[KV_SEAL_BATCH], dst[KV_SEAL_BATCH];
    uint32_t idx[KV_SEAL_BATCH];
    int sealed = 0;
    for (uint32_t i = first; i < end;) {
        uint32_t n = 0;
        for (; i < end && n < KV_SEAL_BATCH && kv__n_avail_cold(pool) > 0; i++) {
            int32_t b = t->blocks[i];
            if (!kv__block_writable(pool, b))
                continue;
            idx[n] = i;
            src[n] = b;
            dst[n++] = kv__block_alloc_cold(pool);
        }
        if (n == 0)
            break;
        int rc = kern_kv_seal(pool->be, &pool->kv, src, dst, n);
        for (uint32_t k = 0; k < n; k++) {
            int32_t gone = rc == 0 ? src[k] : dst[k];
            if (rc == 0)
                t->blocks[idx[k]] = dst[k];
            kv__block_unref(pool, gone);
        }
        if (rc != 0)
            return rc;
        sealed += (int)n;
    }
    return sealed;
}

uint32_t
kv_table_len(const kv_table_t *t)
{
    return t->len;
}

uint32_t
kv_table_n_blocks(const kv_table_t *t)
{
    return t->n_blocks;
}

const int32_t *
kv_table_blocks(const kv_table_t *t)
{
    return t->blocks;
}

const int32_t *
kv_table_positions(const kv_table_t *t)
{
    return t->pos;
}

int32_t
kv_table_next_pos(const kv_table_t *t)
{
    return t->next_pos;
}

kern_page_table_t
kv_tables_export(kv_table_t *const *tables, uint32_t n, int32_t *indptr, int32_t *indices,
                 int32_t *last_len)
{
    int64_t k = 0;
    indptr[0] = 0;
    for (uint32_t s = 0; s < n; s++) {
        const kv_table_t *t = tables[s];
        uint32_t bt = t->pool->cfg.block_tokens;
        /* An empty table has no last block; last_len 0 would send the
         * kernels outside 1..block_tokens. */
        KVS_ASSERT(t->len > 0);
        KVS_ASSERT(t->offload == NULL); /* its blocks are in the host tier */
        /* Only the blocks in use: blocks reserved ahead hold no entries. */
        uint32_t used = (uint32_t)kv__blocks_for(t->pool, t->len);
        KVS_ASSERT(k + used <= INT32_MAX);
        memcpy(indices + k, t->blocks, (size_t)used * sizeof *indices);
        k += used;
        indptr[s + 1] = (int32_t)k;
        last_len[s] = (int32_t)(t->len - (used - 1) * bt);
    }
    return (kern_page_table_t){
        .indptr = indptr,
        .indices = indices,
        .last_len = last_len,
        .n_seqs = n,
    };
}
