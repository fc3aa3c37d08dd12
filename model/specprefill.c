/*
 * model/specprefill.c — speculative prefill's token scoring and chunk
 * selection (algorithms.md section 2.2, steps 3-7): the draft model's
 * captured queries against its prompt keys give each prompt token an
 * importance, and the best chunks are what the main model prefills.
 * Called by sched/ on the engine thread once a request's draft phase ends.
 *
 * No N x N matrix is built: the look-ahead queries' probabilities over
 * the prompt, pooled and maximised over heads, come from the backend one
 * layer at a time (kern_attn_mass, on the device where the draft's KV
 * is), and the maximum over layers and the mean over queries run here.
 */
#include "model_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define SPEC_DEFAULT_KEEP 0.2f
#define SPEC_DEFAULT_LOOK_AHEAD 8
#define SPEC_DEFAULT_CHUNK 32
#define SPEC_DEFAULT_POOL 13

void
model_spec_policy_defaults(model_spec_policy_t *p)
{
    if (!p->on)
        return;
    if (p->keep_ratio == 0.0f)
        p->keep_ratio = SPEC_DEFAULT_KEEP;
    if (p->look_ahead == 0)
        p->look_ahead = SPEC_DEFAULT_LOOK_AHEAD;
    if (p->chunk == 0)
        p->chunk = SPEC_DEFAULT_CHUNK;
    if (p->pool == 0)
        p->pool = SPEC_DEFAULT_POOL;
}

int
model_spec_policy_check(const model_spec_policy_t *p)
{
    if (!p->on)
        return 0;
    if (!(p->keep_ratio > 0.0f && p->keep_ratio <= 1.0f) || p->look_ahead < 1 ||
        p->look_ahead > 64 || p->chunk < 1 || p->pool < 1 || p->pool % 2 == 0 || p->pool > 1023)
        return KVS_EINVAL;
    return 0;
}

int
model_spec_importance(const model_t *draft, const kern_kv_t *kv, const int32_t *blocks,
                      uint32_t n_prompt, const float *qs, uint32_t n_a, uint32_t pool, float *imp)
{
    const model_hparams_t *hp = model_hparams(draft);
    const uint32_t N = n_prompt, d = hp->head_dim, H = hp->n_head;
    if (N == 0 || n_a == 0 || pool == 0 || pool % 2 == 0 || kv->n_layers != hp->n_layer ||
        kv->n_kv_heads != hp->n_head_kv || kv->head_dim != d)
        return KVS_EINVAL;
    const size_t qd = (size_t)H * d;
    /* One layer's look-ahead queries [n_a][qd], its pooled maxima [n_a][N]
     * and the running maximum over layers [n_a][N]. */
    float *q = malloc((size_t)n_a * qd * sizeof(float));
    float *layer = malloc((size_t)n_a * N * sizeof(float));
    float *best = malloc((size_t)n_a * N * sizeof(float));
    int rc = 0;
    if (!q || !layer || !best) {
        rc = KVS_ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < (size_t)n_a * N; i++)
        best[i] = -INFINITY;
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        for (uint32_t a = 0; a < n_a; a++)
            memcpy(q + (size_t)a * qd, qs + ((size_t)a * hp->n_layer + l) * qd, qd * sizeof(float));
        /* Every look-ahead query comes after the prompt and sees all of
         * it; per head the probabilities are pooled, then the heads'
         * maximum taken (the backend's KERN_MASS_POOL_MAX). */
        const kern_attn_mass_args_t args = {.q = q,
                                            .n_q = n_a,
                                            .n_heads = H,
                                            .kv = kv,
                                            .layer = l,
                                            .blocks = blocks,
                                            .n_keys = N,
                                            .causal = false,
                                            .scale = 1.0f / sqrtf((float)d),
                                            .mode = KERN_MASS_POOL_MAX,
                                            .pool = pool,
                                            .out = layer};
        if ((rc = kern_attn_mass(draft->be, &args)) != 0)
            goto out;
        for (size_t i = 0; i < (size_t)n_a * N; i++)
            best[i] = layer[i] > best[i] ? layer[i] : best[i];
    }
    for (uint32_t j = 0; j < N; j++) {
        double s = 0.0;
        for (uint32_t a = 0; a < n_a; a++)
            s += best[(size_t)a * N + j];
        imp[j] = (float)(s / n_a);
    }
out:
    free(q);
    free(layer);
    free(best);
    return rc;
}

uint32_t
model_spec_select(const float *imp, uint32_t n, uint32_t chunk, float keep_ratio, uint32_t n_forced,
                  int32_t *kept)
{
    if (n == 0)
        return 0;
    chunk = chunk ? chunk : 1;
    const uint32_t n_chunks = (n + chunk - 1) / chunk;
    model__ranked_t *cs = malloc((size_t)n_chunks * sizeof *cs);
    uint8_t *keep = calloc(n_chunks, 1);
    uint32_t k = 0;
    if (cs == NULL || keep == NULL) {
        /* Keeping everything is always correct, only slower. */
        for (uint32_t i = 0; i < n; i++)
            kept[k++] = (int32_t)i;
        free(cs);
        free(keep);
        return k;
    }
    for (uint32_t c = 0; c < n_chunks; c++) {
        uint32_t lo = c * chunk, hi = lo + chunk < n ? lo + chunk : n;
        double s = 0.0;
        for (uint32_t j = lo; j < hi; j++)
            s += imp[j];
        cs[c] = (model__ranked_t){s / (hi - lo), c};
    }
    qsort(cs, n_chunks, sizeof *cs, model__cmp_ranked);
    /* ceil in double, forgiving the float's representation error (0.2 *
     * 10 must keep 2 chunks, not 3). */
    double want = ceil((double)n_chunks * keep_ratio - 1e-6);
    uint32_t n_keep = want < 1.0 ? 1 : want > n_chunks ? n_chunks : (uint32_t)want;
    for (uint32_t i = 0; i < n_keep; i++)
        keep[cs[i].index] = 1;
    keep[n_chunks - 1] = 1;
    for (uint32_t c = 0; c < n_chunks; c++) {
        uint32_t lo = c * chunk, hi = lo + chunk < n ? lo + chunk : n;
        for (uint32_t j = lo; j < hi; j++)
            if (keep[c] || j < n_forced)
                kept[k++] = (int32_t)j;
    }
    free(cs);
    free(keep);
    return k;
}
