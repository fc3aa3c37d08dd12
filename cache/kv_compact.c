/*
 * cache/kv_compact.c — score-based compression of one table (SnapKV, H2O;
 * algorithms.md section 5): every layer and KV head keeps its own set of
 * entries, all of the same size, which kern_kv_gather copies into fresh
 * blocks that then replace the table's blocks.
 *
 *   before (len 10, bt 4):  [ b3 | b8 | b5 ]       entries 0..9
 *   keep, (l, h) lists:     (0,0): 0 2 5 9   (0,1): 1 2 7 9   ...
 *   after (len 4):          [ b6 ]             entry j = list[j] of each head
 *
 * With a KV codec, the new blocks kv_table_seal would seal are written
 * quantized at once: gathered a batch at a time into a few full-precision
 * staging blocks and sealed from there, so a compacted table may be far
 * larger than the pool's full-precision share (which is sized for the
 * running requests' residual windows, not for whole tables), and is
 * never all full precision at once.
 *
 * Fresh blocks are never among the table's own (those are referenced, the
 * fresh ones were free), so no gather destination is also a source, which
 * kern_kv_gather requires.  The old blocks are only unreferenced: another
 * table or the prefix cache may still read them.  Every failure leaves
 * the table as it was.
 *
 * Callers: the scheduler at the end of a prefill (with the lists
 * model_snapkv_select writes) and at H2O's compactions, tests.
 */
#include "cache/kv_int.h"

#include <stdlib.h>
#include <string.h>

typedef struct {
    kv_table_t *t;
    const int32_t *keep;
    uint32_t n_keep;
    int32_t *src; /* [n_lists * n_keep] */
    int32_t *dst; /* [n_keep] */
} gather_t;

/* Entries [j0, j1) of the new table into blocks[0 ..], which hold the
 * entries from j0 (a block boundary) on. */
static int
gather_range(gather_t *g, uint32_t j0, uint32_t j1, const int32_t *blocks)
{
    kv_pool_t *pool = g->t->pool;
    const uint32_t bt = pool->cfg.block_tokens, n = j1 - j0;
    const size_t n_lists = (size_t)pool->cfg.n_layers * pool->cfg.n_kv_heads;
    if (n == 0)
        return 0;
    for (uint32_t j = 0; j < n; j++)
        g->dst[j] = blocks[j / bt] * (int32_t)bt + (int32_t)(j % bt);
    for (size_t l = 0; l < n_lists; l++)
        for (uint32_t j = 0; j < n; j++) {
            uint32_t e = (uint32_t)g->keep[l * g->n_keep + j0 + j];
            g->src[l * n + j] = g->t->blocks[e / bt] * (int32_t)bt + (int32_t)(e % bt);
        }
    return kern_kv_gather(pool->be, &pool->kv, g->src, g->dst, n);
}

/* New blocks [c, c + m) written quantized: gathered into m staging blocks,
 * sealed into m quantized ones that go to fresh[c ..]. */
static int
gather_sealed(gather_t *g, uint32_t c, uint32_t m, int32_t *fresh)
{
    kv_pool_t *pool = g->t->pool;
    const uint32_t bt = pool->cfg.block_tokens;
    int32_t stage[KV_SEAL_BATCH] = {0}, cold[KV_SEAL_BATCH] = {0};
    for (uint32_t i = 0; i < m; i++)
        stage[i] = kv__block_alloc(pool);
    int rc = gather_range(g, c * bt, (c + m) * bt, stage);
    if (rc == 0) {
        for (uint32_t i = 0; i < m; i++)
            cold[i] = kv__block_alloc_cold(pool);
        rc = kern_kv_seal(pool->be, &pool->kv, stage, cold, m);
        for (uint32_t i = 0; i < m; i++) {
            if (rc == 0)
                fresh[c + i] = cold[i];
            else
                kv__block_unref(pool, cold[i]);
        }
    }
    for (uint32_t i = 0; i < m; i++)
        kv__block_unref(pool, stage[i]);
    return rc;
}

int
kv_table_compact(kv_table_t *t, uint32_t n_keep, const int32_t *keep, uint32_t keep_head,
                 uint32_t keep_tail)
{
    kv_pool_t *pool = t->pool;
    const uint32_t bt = pool->cfg.block_tokens;
    const size_t n_lists = (size_t)pool->cfg.n_layers * pool->cfg.n_kv_heads;
    /* An offloaded table holds no blocks to gather from (kv_host.c). */
    if (keep == NULL || n_keep == 0 || n_keep > t->len || t->offload != NULL)
        return KVS_EINVAL;
    for (size_t l = 0; l < n_lists; l++) {
        const int32_t *k = keep + l * n_keep;
        for (uint32_t j = 0; j < n_keep; j++)
            if (k[j] < 0 || (uint32_t)k[j] >= t->len || (j > 0 && k[j] <= k[j - 1]))
                return KVS_EINVAL;
    }
    /* Strictly ascending lists of len entries below len are the identity. */
    if (n_keep == t->len)
        return 0;

    /* New blocks [c0, c1) are those kv_table_seal(keep_head, keep_tail)
     * would seal on the compacted table, as many of them as there are free
     * quantized blocks (the rest stay full precision, as a seal stops
     * early). */
    const uint32_t need = (uint32_t)kv__blocks_for(pool, n_keep);
    const uint32_t n_cold_pool = pool->cfg.n_blocks - kv__n_hot(pool);
    uint32_t c0, c1;
    kv__seal_span(pool, n_keep, keep_head, keep_tail, &c0, &c1);
    /* The full-precision blocks for the rest, and one to stage through. */
    uint32_t most = c1 - c0 < n_cold_pool ? c1 - c0 : n_cold_pool;
    if (need - most + (most ? 1 : 0) > kv__n_hot(pool))
        return KVS_ENOSPC;
    if (c1 - c0 > kv__n_avail_cold(pool))
        c1 = c0 + kv__n_avail_cold(pool);
    const uint32_t n_cold = c1 - c0;
    if (need - n_cold + (n_cold ? 1 : 0) > kv__n_avail(pool))
        return KVS_EAGAIN;
    gather_t g = {.t = t, .keep = keep, .n_keep = n_keep};
    g.src = malloc(n_lists * n_keep * sizeof *g.src);
    g.dst = malloc((size_t)n_keep * sizeof *g.dst);
    int32_t *fresh = calloc(need, sizeof *fresh);
    int rc = KVS_ENOMEM;
    if (g.src == NULL || g.dst == NULL || fresh == NULL)
        goto out;
    for (uint32_t i = 0; i < need; i++)
        fresh[i] = i >= c0 && i < c1 ? -1 : kv__block_alloc(pool);
    rc = gather_range(&g, 0, c0 * bt, fresh);
    if (rc == 0)
        rc = gather_range(&g, c1 * bt, n_keep, fresh + c1);
    for (uint32_t c = c0; rc == 0 && c < c1;) {
        /* The staging blocks: as many as are free, at least the one
         * checked above. */
        uint32_t m = c1 - c, room = kv__n_avail(pool);
        m = m < KV_SEAL_BATCH ? m : KV_SEAL_BATCH;
        m = m < room ? m : room;
        rc = gather_sealed(&g, c, m, fresh);
        c += m;
    }
    if (rc != 0) {
        for (uint32_t i = 0; i < need; i++)
            if (fresh[i] >= 0)
                kv__block_unref(pool, fresh[i]);
        goto out;
    }

    /* In place: list entries are ascending from 0, so keep[.][j] >= j and
     * step j reads only positions no earlier step has overwritten. */
    int32_t max_pos = -1;
    for (uint32_t j = 0; j < n_keep; j++) {
        int32_t p = -1;
        for (size_t l = 0; l < n_lists; l++) {
            int32_t q = t->pos[keep[l * n_keep + j]];
            p = q > p ? q : p;
        }
        t->pos[j] = p;
        max_pos = p > max_pos ? p : max_pos;
    }
    /* kv_int.h's next_pos == max(pos) + 1, with next_pos unchanged. */
    if (max_pos + 1 < t->next_pos)
        t->pos[n_keep - 1] = t->next_pos - 1;

    for (uint32_t i = t->n_blocks; i-- > 0;)
        kv__block_unref(pool, t->blocks[i]);
    /* need <= ceil(len / bt) <= n_blocks: both arrays are large enough. */
    memcpy(t->blocks, fresh, (size_t)need * sizeof *fresh);
    t->n_blocks = need;
    t->len = n_keep;
    t->n_hashed = 0;
    t->compacted = true;
    rc = (int)n_cold;
out:
    free(g.src);
    free(g.dst);
    free(fresh);
    return rc;
}
