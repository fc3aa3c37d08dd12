/*
 * sched/sched.h — turns "these sequences advance by these tokens" into one
 * model_batch_t over the paged cache: it reserves KV, assigns slots and
 * positions, and lays out the CSR page table, the per-token visible KV
 * lengths and the logit rows.  The continuous-batching scheduler builds
 * every step through this; offline `kvserve run` and the tests use it
 * directly.
 *
 * Thread: engine.  Depends on cache/ and model/.
 */
#ifndef SCHED_H
#define SCHED_H

#include "base/kvs.h"
#include "cache/kv.h"
#include "model/model.h"

typedef struct sched_seq_step {
    kv_table_t *table;     /* the sequence's KV */
    const int32_t *tokens; /* new tokens to compute */
    uint32_t n_tokens;     /* >= 1 */
    const int32_t *pos;    /* their RoPE positions, or NULL: next_pos, next_pos+1, ... */
    bool want_logits;      /* logits of the last new token */
} sched_seq_step_t;

typedef struct sched_batch sched_batch_t;

int sched_batch_new(sched_batch_t **out);
void sched_batch_free(sched_batch_t *b); /* NULL is a no-op */

/* Reserves KV for every step first (so a KVS_EAGAIN / KVS_ENOSPC answer
 * leaves every table's contents unchanged), then appends the entries and
 * fills the batch.  *out stays valid until the next build or free.
 * Returns 0, KVS_EAGAIN, KVS_ENOSPC, KVS_EINVAL or KVS_ENOMEM. */
int sched_batch_build(sched_batch_t *b, const sched_seq_step_t *steps, uint32_t n_steps,
                      const model_batch_t **out);

#endif /* SCHED_H */
