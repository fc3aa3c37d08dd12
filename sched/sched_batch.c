/*
 * sched/sched_batch.c — builds one forward step's batch.  For a step with
 * sequences A (prefill chunk of 3) and B (one decode token) the arrays are:
 *
 *   tokens     a0 a1 a2 | b0            seq_indptr  0 3 4
 *   kv_len     L+1 L+2 L+3 | M+1        (L, M: entries before the step)
 *   slots      from kv_table_append     logit_rows  2 3
 *
 * and the page table lists each sequence's blocks after the appends.
 * Called by the scheduler and `kvserve run` on the engine thread.
 */
#include "sched.h"

#include <stdlib.h>

struct sched_batch {
    model_batch_t mb;
    int32_t *tokens, *pos, *slots, *kv_len, *logit_rows, *capture_rows;
    uint32_t cap_tokens;
    int32_t *seq_indptr, *pt_indptr, *pt_last_len;
    kv_table_t **tables;
    model_attn_policy_t *policy;
    uint32_t *n_prompt;
    uint32_t cap_seqs;
    int32_t *pt_indices;
    uint32_t cap_blocks;
};

int
sched_batch_new(sched_batch_t **out)
{
    *out = calloc(1, sizeof **out);
    return *out ? 0 : KVS_ENOMEM;
}

void
sched_batch_free(sched_batch_t *b)
{
    if (b == NULL)
        return;
    free(b->tokens);
    free(b->pos);
    free(b->slots);
    free(b->kv_len);
    free(b->logit_rows);
    free(b->capture_rows);
    free(b->seq_indptr);
    free(b->pt_indptr);
    free(b->pt_last_len);
    free(b->tables);
    free(b->policy);
    free(b->n_prompt);
    free(b->pt_indices);
    free(b);
}

/* Grows *p to hold n int32 (or pointer-sized when `elem` says so). */
static int
grow(void **p, size_t n, size_t elem)
{
    void *q = realloc(*p, (n ? n : 1) * elem);
    if (q == NULL)
        return KVS_ENOMEM;
    *p = q;
    return 0;
}

static int
reserve_arrays(sched_batch_t *b, uint32_t n_tokens, uint32_t n_seqs, uint32_t n_blocks)
{
    int rc = 0;
    if (n_tokens > b->cap_tokens) {
        size_t n = n_tokens;
        if ((rc = grow((void **)&b->tokens, n, 4)) || (rc = grow((void **)&b->pos, n, 4)) ||
            (rc = grow((void **)&b->slots, n, 4)) || (rc = grow((void **)&b->kv_len, n, 4)) ||
            (rc = grow((void **)&b->logit_rows, n, 4)) ||
            (rc = grow((void **)&b->capture_rows, n, 4)))
            return rc;
        b->cap_tokens = n_tokens;
    }
    if (n_seqs > b->cap_seqs) {
        size_t n = n_seqs;
        if ((rc = grow((void **)&b->seq_indptr, n + 1, 4)) ||
            (rc = grow((void **)&b->pt_indptr, n + 1, 4)) ||
            (rc = grow((void **)&b->pt_last_len, n, 4)) ||
            (rc = grow((void **)&b->tables, n, sizeof(kv_table_t *))) ||
            (rc = grow((void **)&b->policy, n, sizeof(model_attn_policy_t))) ||
            (rc = grow((void **)&b->n_prompt, n, sizeof(uint32_t))))
            return rc;
        b->cap_seqs = n_seqs;
    }
    if (n_blocks > b->cap_blocks) {
        if ((rc = grow((void **)&b->pt_indices, n_blocks, 4)))
            return rc;
        b->cap_blocks = n_blocks;
    }
    return 0;
}

int
sched_batch_build(sched_batch_t *b, const sched_seq_step_t *steps, uint32_t n_steps,
                  const model_batch_t **out)
{
    if (n_steps == 0)
        return KVS_EINVAL;
    uint64_t n_tokens = 0;
    for (uint32_t s = 0; s < n_steps; s++) {
        if (!steps[s].table || !steps[s].tokens || steps[s].n_tokens == 0)
            return KVS_EINVAL;
        n_tokens += steps[s].n_tokens;
    }
    if (n_tokens > INT32_MAX)
        return KVS_EINVAL;
    for (uint32_t s = 0; s < n_steps; s++) {
        int rc = kv_table_reserve(steps[s].table, steps[s].n_tokens);
        if (rc)
            return rc;
    }
    uint64_t n_blocks = 0;
    for (uint32_t s = 0; s < n_steps; s++) {
        n_blocks += kv_table_n_blocks(steps[s].table);
    }
    int rc = reserve_arrays(b, (uint32_t)n_tokens, n_steps, (uint32_t)n_blocks);
    if (rc)
        return rc;

    uint32_t t = 0, n_logits = 0;
    bool sparse = false;
    b->seq_indptr[0] = 0;
    for (uint32_t s = 0; s < n_steps; s++) {
        const sched_seq_step_t *st = &steps[s];
        uint32_t before = kv_table_len(st->table);
        int32_t next = kv_table_next_pos(st->table);
        for (uint32_t i = 0; i < st->n_tokens; i++) {
            b->tokens[t + i] = st->tokens[i];
            b->pos[t + i] = st->pos ? st->pos[i] : next + (int32_t)i;
            b->kv_len[t + i] = (int32_t)(before + i + 1);
        }
        rc = kv_table_append(st->table, b->pos + t, st->n_tokens, b->slots + t);
        if (rc)
            return rc;
        t += st->n_tokens;
        b->seq_indptr[s + 1] = (int32_t)t;
        uint32_t lead = st->lead_logits < st->n_tokens ? st->lead_logits : st->n_tokens;
        for (uint32_t i = 0; i < lead; i++)
            b->logit_rows[n_logits++] = (int32_t)(t - st->n_tokens + i);
        if (st->want_logits && lead < st->n_tokens)
            b->logit_rows[n_logits++] = (int32_t)(t - 1);
        b->tables[s] = st->table;
        b->policy[s] = st->policy ? *st->policy : (model_attn_policy_t){0};
        b->n_prompt[s] = st->n_prompt;
        sparse |= b->policy[s].kind != MODEL_ATTN_DENSE || b->policy[s].decode_top_k;
    }
    b->mb = (model_batch_t){
        .n_tokens = t,
        .tokens = b->tokens,
        .pos = b->pos,
        .slots = b->slots,
        .kv_len = b->kv_len,
        .seq_indptr = b->seq_indptr,
        .pt = kv_tables_export(b->tables, n_steps, b->pt_indptr, b->pt_indices, b->pt_last_len),
        .logit_rows = b->logit_rows,
        .n_logits = n_logits,
        .seq_policy = sparse ? b->policy : NULL,
        .seq_n_prompt = sparse ? b->n_prompt : NULL,
    };
    *out = &b->mb;
    return 0;
}

uint32_t
sched_batch_capture(sched_batch_t *b, const uint32_t *first, const uint32_t *count,
                    float *capture_q)
{
    uint32_t n = 0;
    for (uint32_t s = 0; s < b->mb.pt.n_seqs; s++)
        for (uint32_t i = 0; i < count[s]; i++)
            b->capture_rows[n++] = b->seq_indptr[s] + (int32_t)(first[s] + i);
    b->mb.capture_rows = b->capture_rows;
    b->mb.n_capture = n;
    b->mb.capture_q = n ? capture_q : NULL;
    return n;
}
