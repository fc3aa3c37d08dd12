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
 * Per (layer, KV head) the keys are read once into f32.  Scores go to a
 * [QB][n_keys] scratch, QB query rows at a time, keys in tiles of KT so a
 * tile stays in cache while all QB rows use it; no n_keys x n_keys matrix
 * and no allocation beyond one scratch block per call.
 */
#include "model_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SNAPKV_DEFAULT_WINDOW 32
#define SNAPKV_DEFAULT_KERNEL 5
#define SNAPKV_MAX_WINDOW 1024
#define SNAPKV_MAX_KERNEL 255
#define QB 16 /* query rows scored together */
#define KT 32 /* keys per tile */

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

/* Eight partial sums, so the compiler can keep them in vector lanes. */
static float
dot(const float *a, const float *b, uint32_t d)
{
    float s[8] = {0};
    uint32_t e = 0;
    for (; e + 8 <= d; e += 8)
        for (int i = 0; i < 8; i++)
            s[i] += a[e + i] * b[e + i];
    for (; e < d; e++)
        s[0] += a[e] * b[e];
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
}

/* The one place the score math lives (SnapKV's vote, H2O's accumulated
 * attention): adds to acc[j], j < n_acc, the softmax probabilities of key
 * j for every query head of KV head g's group and every row of q (layout
 * [n_layer][n_q][n_head][d]) in layer l.  Row r sits at entry n_keys - n_q
 * + r and sees the keys up to it, so each row is normalised over exactly
 * what its attention saw.  keys: [n_keys][d], scores: [QB][n_keys]. */
static void
attn_mass(const kern_kv_t *kv, const int32_t *blocks, uint32_t n_keys, uint32_t l, uint32_t g,
          uint32_t H, uint32_t G, uint32_t d, const float *q, uint32_t n_q, uint32_t n_acc,
          float *keys, float *scores, double *acc)
{
    const uint32_t M = n_keys - n_q, n_rows = G * n_q;
    const float scale = 1.0f / sqrtf((float)d); /* forward.c's attention scale */
    model__gather_keys(kv, l, g, blocks, n_keys, keys);
    /* Query i of the group: head g * G + i / n_q, row i % n_q. */
    for (uint32_t q0 = 0; q0 < n_rows; q0 += QB) {
        const uint32_t nq = n_rows - q0 < QB ? n_rows - q0 : QB;
        const float *qrow[QB];
        uint32_t lim[QB];
        for (uint32_t i = 0; i < nq; i++) {
            uint32_t h = g * G + (q0 + i) / n_q, r = (q0 + i) % n_q;
            qrow[i] = q + (((size_t)l * n_q + r) * H + h) * d;
            lim[i] = M + r + 1;
        }
        for (uint32_t j0 = 0; j0 < n_keys; j0 += KT) {
            const uint32_t j1 = j0 + KT < n_keys ? j0 + KT : n_keys;
            for (uint32_t i = 0; i < nq; i++) {
                float *s = scores + (size_t)i * n_keys;
                const uint32_t end = j1 < lim[i] ? j1 : lim[i];
                for (uint32_t j = j0; j < end; j++)
                    s[j] = dot(qrow[i], keys + (size_t)j * d, d) * scale;
            }
        }
        for (uint32_t i = 0; i < nq; i++) {
            float *s = scores + (size_t)i * n_keys;
            float mx = -INFINITY;
            for (uint32_t j = 0; j < lim[i]; j++)
                mx = s[j] > mx ? s[j] : mx;
            double sum = 0.0;
            for (uint32_t j = 0; j < lim[i]; j++) {
                s[j] = expf(s[j] - mx);
                sum += s[j];
            }
            const double inv = 1.0 / sum;
            const uint32_t end = n_acc < lim[i] ? n_acc : lim[i];
            for (uint32_t j = 0; j < end; j++)
                acc[j] += s[j] * inv;
        }
    }
}

/* The first n_keys entries of a KV table of this model's shape, in a
 * host-memory pool: 0, KVS_EINVAL or KVS_ENOTSUP. */
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
    return kern_backend_is_host(model_backend(m)) ? 0 : KVS_ENOTSUP;
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
    const uint32_t d = hp->head_dim, H = hp->n_head, HKV = hp->n_head_kv, L = hp->n_layer;
    if (model_snapkv_check(&pol) || n_obs == 0 || n_obs > pol.window || n_obs > n_keys)
        return KVS_EINVAL;
    int rc = table_ok(m, kv, blocks, n_keys);
    if (rc)
        return rc;

    if (n_keys <= pol.budget)
        return identity_lists((size_t)L * HKV, n_keys, keep);

    const uint32_t C = pol.budget, G = H / HKV, M = n_keys - n_obs, top = C - n_obs;
    const uint32_t half = pol.kernel / 2;
    /* One block: keys [n_keys][d], scores [QB][n_keys], votes and pooled
     * votes [M] each, the ranking [M]. */
    size_t keys_n = (size_t)n_keys * d, scores_n = (size_t)QB * n_keys;
    size_t bytes = (keys_n + scores_n) * sizeof(float) + 2 * (size_t)M * sizeof(double) +
                   (size_t)M * sizeof(model__ranked_t);
    void *mem = malloc(bytes);
    if (mem == NULL)
        return KVS_ENOMEM;
    double *vote = mem, *pooled = vote + M;
    model__ranked_t *rank = (model__ranked_t *)(pooled + M);
    float *keys = (float *)(rank + M), *scores = keys + keys_n;

    for (uint32_t l = 0; l < L; l++) {
        for (uint32_t g = 0; g < HKV; g++) {
            memset(vote, 0, (size_t)M * sizeof(double));
            /* Normalised over every visible key, window included; only the
             * keys before the window collect votes. */
            attn_mass(kv, blocks, n_keys, l, g, H, G, d, q_obs, n_obs, M, keys, scores, vote);
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
    return (int)C;
}

/* ---- H2O (algorithms.md section 5.1) ------------------------------------- */

int
model_h2o_scores(const model_t *m, const kern_kv_t *kv, const int32_t *blocks, uint32_t n_keys,
                 const float *q, uint32_t n_q, uint32_t stride, double *acc)
{
    if (m == NULL || kv == NULL || blocks == NULL || q == NULL || acc == NULL)
        return KVS_EINVAL;
    const model_hparams_t *hp = model_hparams(m);
    const uint32_t d = hp->head_dim, H = hp->n_head, HKV = hp->n_head_kv, L = hp->n_layer;
    if (n_q == 0 || n_q > n_keys || stride < n_keys)
        return KVS_EINVAL;
    int rc = table_ok(m, kv, blocks, n_keys);
    if (rc)
        return rc;
    size_t keys_n = (size_t)n_keys * d, scores_n = (size_t)QB * n_keys;
    float *keys = malloc((keys_n + scores_n) * sizeof(float));
    if (keys == NULL)
        return KVS_ENOMEM;
    for (uint32_t l = 0; l < L; l++)
        for (uint32_t g = 0; g < HKV; g++)
            attn_mass(kv, blocks, n_keys, l, g, H, H / HKV, d, q, n_q, n_keys, keys, keys + keys_n,
                      acc + ((size_t)l * HKV + g) * stride);
    free(keys);
    return 0;
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
