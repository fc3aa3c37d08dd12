/*
 * cache/kv_compact.c — score-based compression of one table (SnapKV, H2O;
 * algorithms.md section 5): every layer and KV head keeps its own set of
 * entries, all of the same size, which kern_kv_gather copies into fresh
 * full-precision blocks that then replace the table's blocks.
 *
 *   before (len 10, bt 4):  [ b3 | b8 | b5 ]       entries 0..9
 *   keep, (l, h) lists:     (0,0): 0 2 5 9   (0,1): 1 2 7 9   ...
 *   after (len 4):          [ b6 ]             entry j = list[j] of each head
 *
 * Fresh blocks are never among the table's own (those are referenced, the
 * fresh ones were free), so no gather destination is also a source, which
 * kern_kv_gather requires.  The old blocks are only unreferenced: another
 * table or the prefix cache may still read them.  Every failure leaves
 * the table as it was.
 *
 * Callers: the scheduler at the end of a prefill (with the lists
 * model_snapkv_select writes), tests.
 */
#include "cache/kv_int.h"

#include <stdlib.h>
#include <string.h>

int
kv_table_compact(kv_table_t *t, uint32_t n_keep, const int32_t *keep)
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

    const uint64_t need = kv__blocks_for(pool, n_keep);
    if (need > kv__n_hot(pool))
        return KVS_ENOSPC;
    if (need > kv__n_avail(pool))
        return KVS_EAGAIN;
    int32_t *src = malloc(n_lists * n_keep * sizeof *src);
    int32_t *dst = malloc((size_t)n_keep * sizeof *dst);
    int32_t *fresh = malloc((size_t)need * sizeof *fresh);
    if (src == NULL || dst == NULL || fresh == NULL) {
        free(src);
        free(dst);
        free(fresh);
        return KVS_ENOMEM;
    }
    for (uint32_t i = 0; i < need; i++)
        fresh[i] = kv__block_alloc(pool);
    for (uint32_t j = 0; j < n_keep; j++)
        dst[j] = fresh[j / bt] * (int32_t)bt + (int32_t)(j % bt);
    for (size_t i = 0; i < n_lists * n_keep; i++) {
        uint32_t e = (uint32_t)keep[i];
        src[i] = t->blocks[e / bt] * (int32_t)bt + (int32_t)(e % bt);
    }
    int rc = kern_kv_gather(pool->be, &pool->kv, src, dst, n_keep);
    free(src);
    free(dst);
    if (rc != 0) {
        for (uint32_t i = 0; i < need; i++)
            kv__block_unref(pool, fresh[i]);
        free(fresh);
        return rc;
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
    free(fresh);
    t->n_blocks = (uint32_t)need;
    t->len = n_keep;
    t->n_hashed = 0;
    t->compacted = true;
    return 0;
}
