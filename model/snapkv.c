/*
 * model/snapkv.c — SnapKV's choice of the KV entries to keep at the end of
 * a prefill (algorithms.md section 5.2): the last n_obs prompt queries
 * vote, through their softmax weights, for the keys before them; votes are
 * summed over the query heads of a KV head (GQA: one set per KV head, not
 * the reference's one per query head), smoothed by an average pool, and
 * the best keys plus the observation window itself are kept.
 * H2O's accumulated attention (section 5.1) is the same sum without the
 * pool, so both go through attn_mass; model_h2o_select ranks it.
 * Callers: the scheduler at the end of a prefill and in decode (then
 * kv_table_compact), tests.
 *
 * The probabilities and their sums are the backend's (kern_attn_mass, on
 * the device where the KV is); only each layer's [KV head][key] sums come
 * to the host, where the pooling and the ranking run.
 */
#include "model_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SNAPKV_DEFAULT_WINDOW 32
#define SNAPKV_DEFAULT_KERNEL 5
#define SNAPKV_MAX_WINDOW 1024
#define SNAPKV_MAX_KERNEL 255

void
model_snapkv_defaults(model_snapkv_policy_t *p)
{
    if (p->window == 0)
        p->window = SNAPKV_DEFAULT_WINDOW;
    if (p->kernel == 0)
        p->kernel = SNAPKV_DEFAULT_KERNEL;
}

int
model_snapkv_check(const model_snapkv_policy_t *p)
{
    if (p == NULL || p->window < 1 || p->window > SNAPKV_MAX_WINDOW || p->kernel < 1 ||
        p->kernel % 2 == 0 || p->kernel > SNAPKV_MAX_KERNEL || p->budget <= p->window)
        return KVS_EINVAL;
    return 0;
}

/* Every list keeps all n_keys entries: 0 .. n_keys - 1.  Returns n_keys. */
static int
identity_lists(size_t n_lists, uint32_t n_keys, int32_t *keep)
{
    for (size_t l = 0; l < n_lists; l++)
        for (uint32_t j = 0; j < n_keys; j++)
            keep[l * n_keys + j] = (int32_t)j;
    return (int)n_keys;
}

/* One keep list: of the older entries 0 .. M - 1 the `top` best scored (a
 * NaN would make the order inconsistent, so it ranks last) in entry order,
 * then the recent entries M .. n_keys - 1, ascending as kv_table_compact
 * wants.  rank and won are scratch of M each. */
static void
top_then_recent(const double *score, uint32_t M, uint32_t top, uint32_t n_keys,
                model__ranked_t *rank, uint8_t *won, int32_t *out)
{
    for (uint32_t j = 0; j < M; j++)
        rank[j] = (model__ranked_t){score[j] == score[j] ? score[j] : -INFINITY, j};
    qsort(rank, M, sizeof *rank, model__cmp_ranked);
    memset(won, 0, M);
    for (uint32_t k = 0; k < top; k++)
        won[rank[k].index] = 1;
    uint32_t n = 0;
    for (uint32_t j = 0; j < M; j++)
        if (won[j])
            out[n++] = (int32_t)j;
    for (uint32_t j = M; j < n_keys; j++)
        out[n++] = (int32_t)j;
}

/* The one place the score math is asked for (SnapKV's vote, H2O's
 * accumulated attention): out[g][j], j < n_out, the softmax probabilities
 * of key j summed over every row of q (layer l of [n_layer][n_q][n_head][d])
 * and the query heads of KV head g.  Row r sits at entry n_keys - n_q + r
 * and sees the keys up to it, so each row is normalised over exactly what
 * its attention saw. */
static int
attn_mass(const model_t *m, const kern_kv_t *kv, const int32_t *blocks, uint32_t n_keys, uint32_t l,
          const float *q, uint32_t n_q, uint32_t n_out, float *out)
{
    const model_hparams_t *hp = model_hparams(m);
    const kern_attn_mass_args_t a = {
        .q = q + (size_t)l * n_q * hp->n_head * hp->head_dim,
        .n_q = n_q,
        .n_heads = hp->n_head,
        .kv = kv,
        .layer = l,
        .blocks = blocks,
        .n_keys = n_keys,
        .causal = true,
        .scale = 1.0f / sqrtf((float)hp->head_dim), /* forward.c's attention scale */
        .mode = KERN_MASS_SUM,
        .n_out = n_out,
        .out = out,
    };
    return kern_attn_mass(model_backend(m), &a);
}

/* The first n_keys entries of a KV table of this model's shape: 0 or
 * KVS_EINVAL. */
static int
table_ok(const model_t *m, const kern_kv_t *kv, const int32_t *blocks, uint32_t n_keys)
{
    const model_hparams_t *hp = model_hparams(m);
    if (n_keys == 0 || kv->n_layers != hp->n_layer || kv->n_kv_heads != hp->n_head_kv ||
        kv->head_dim != hp->head_dim || kv->block_tokens == 0 || hp->n_head_kv == 0 ||
        hp->n_head % hp->n_head_kv != 0)
        return KVS_EINVAL;
    const uint32_t bt = kv->block_tokens, n_used = (n_keys + bt - 1) / bt;
    for (uint32_t b = 0; b < n_used; b++)
        if (blocks[b] < 0 || (uint32_t)blocks[b] >= kv->n_blocks)
            return KVS_EINVAL;
    return 0;
}

int
model_snapkv_select(const model_t *m, const kern_kv_t *kv, const int32_t *blocks, uint32_t n_keys,
                    const float *q_obs, uint32_t n_obs, const model_snapkv_policy_t *p,
                    int32_t *keep)
{
    if (m == NULL || kv == NULL || blocks == NULL || q_obs == NULL || p == NULL || keep == NULL)
        return KVS_EINVAL;
    model_snapkv_policy_t pol = *p;
    model_snapkv_defaults(&pol);
    const model_hparams_t *hp = model_hparams(m);
    const uint32_t HKV = hp->n_head_kv, L = hp->n_layer;
    if (model_snapkv_check(&pol) || n_obs == 0 || n_obs > pol.window || n_obs > n_keys)
        return KVS_EINVAL;
    int rc = table_ok(m, kv, blocks, n_keys);
    if (rc)
        return rc;

    if (n_keys <= pol.budget)
        return identity_lists((size_t)L * HKV, n_keys, keep);

    const uint32_t C = pol.budget, M = n_keys - n_obs, top = C - n_obs;
    const uint32_t half = pol.kernel / 2;
    /* The layer's votes [HKV][M] as the backend gives them; one KV head's
     * votes and pooled votes [M] each, in double; the ranking [M]. */
    size_t bytes = (size_t)HKV * M * sizeof(float) + 2 * (size_t)M * sizeof(double) +
                   (size_t)M * sizeof(model__ranked_t);
    void *mem = malloc(bytes);
    if (mem == NULL)
        return KVS_ENOMEM;
    double *vote = mem, *pooled = vote + M;
    model__ranked_t *rank = (model__ranked_t *)(pooled + M);
    float *votes = (float *)(rank + M);

    for (uint32_t l = 0; l < L && rc == 0; l++) {
        /* Normalised over every visible key, window included; only the
         * keys before the window collect votes. */
        if ((rc = attn_mass(m, kv, blocks, n_keys, l, q_obs, n_obs, M, votes)) != 0)
            break;
        for (uint32_t g = 0; g < HKV; g++) {
            for (uint32_t j = 0; j < M; j++)
                vote[j] = votes[(size_t)g * M + j];
            /* avg_pool1d(kernel, stride 1, padding kernel / 2): the sum
             * over [j - half, j + half] clipped to [0, M), over kernel. */
            double win = 0.0;
            for (uint32_t j = 0; j < M && j < half; j++)
                win += vote[j];
            for (uint32_t j = 0; j < M; j++) {
                if (j + half < M)
                    win += vote[j + half];
                if (j > half)
                    win -= vote[j - half - 1];
                pooled[j] = win / pol.kernel;
            }
            /* The spent vote array marks the winners. */
            top_then_recent(pooled, M, top, n_keys, rank, (uint8_t *)vote,
                            keep + ((size_t)l * HKV + g) * C);
        }
    }
    free(mem);
    return rc ? rc : (int)C;
}

/* ---- H2O (algorithms.md section 5.1) ------------------------------------- */

int
model_h2o_scores(const model_t *m, const kern_kv_t *kv, const int32_t *blocks, uint32_t n_keys,
                 const float *q, uint32_t n_q, uint32_t stride, double *acc)
{
    if (m == NULL || kv == NULL || blocks == NULL || q == NULL || acc == NULL)
        return KVS_EINVAL;
    const model_hparams_t *hp = model_hparams(m);
    const uint32_t HKV = hp->n_head_kv, L = hp->n_layer;
    if (n_q == 0 || n_q > n_keys || stride < n_keys)
        return KVS_EINVAL;
    int rc = table_ok(m, kv, blocks, n_keys);
    if (rc)
        return rc;
    float *mass = malloc((size_t)HKV * n_keys * sizeof(float));
    if (mass == NULL)
        return KVS_ENOMEM;
    for (uint32_t l = 0; l < L && rc == 0; l++) {
        if ((rc = attn_mass(m, kv, blocks, n_keys, l, q, n_q, n_keys, mass)) != 0)
            break;
        for (uint32_t g = 0; g < HKV; g++) {
            double *a = acc + ((size_t)l * HKV + g) * stride;
            for (uint32_t j = 0; j < n_keys; j++)
                a[j] += mass[(size_t)g * n_keys + j];
        }
    }
    free(mass);
    return rc;
}

int
model_h2o_select(const double *acc, uint32_t n_lists, uint32_t n_keys, uint32_t stride,
                 uint32_t budget, uint32_t recent, int32_t *keep)
{
    if (acc == NULL || keep == NULL || n_lists == 0 || n_keys == 0 || stride < n_keys ||
        budget == 0 || recent >= budget)
        return KVS_EINVAL;
    if (n_keys <= budget)
        return identity_lists(n_lists, n_keys, keep);
    const uint32_t M = n_keys - recent, top = budget - recent;
    model__ranked_t *rank = malloc((size_t)M * sizeof *rank);
    uint8_t *won = malloc(M);
    if (rank == NULL || won == NULL) {
        free(rank);
        free(won);
        return KVS_ENOMEM;
    }
    for (size_t l = 0; l < n_lists; l++)
        top_then_recent(acc + l * stride, M, top, n_keys, rank, won, keep + l * budget);
    free(rank);
    free(won);
    return (int)budget;
}
