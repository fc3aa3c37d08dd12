/*
 * model/specprefill.c — speculative prefill's token scoring and chunk
 * selection (algorithms.md section 2.2, steps 3-7): the draft model's
 * captured queries against its prompt keys give each prompt token an
 * importance, and the best chunks are what the main model prefills.
 * Called by sched/ on the engine thread once a request's draft phase ends.
 *
 * No N x N matrix is built: per (layer, KV head) the prompt keys are read
 * once into f32, and each of the group's query heads and look-ahead
 * queries needs one row of N scores, folded into the running maximum at
 * once.
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
    const uint32_t N = n_prompt, d = hp->head_dim, H = hp->n_head, G = H / hp->n_head_kv;
    if (N == 0 || n_a == 0 || pool == 0 || pool % 2 == 0 || kv->n_layers != hp->n_layer ||
        kv->n_kv_heads != hp->n_head_kv || kv->head_dim != d)
        return KVS_EINVAL;
    if (!kern_backend_is_host(draft->be))
        return KVS_ENOTSUP;
    const size_t qd = (size_t)H * d;
    float *keys = malloc((size_t)N * d * sizeof(float));
    float *p = malloc((size_t)N * sizeof(float)), *sm = malloc((size_t)N * sizeof(float));
    float *best = malloc((size_t)n_a * N * sizeof(float));
    if (!keys || !p || !sm || !best) {
        free(keys);
        free(p);
        free(sm);
        free(best);
        return KVS_ENOMEM;
    }
    for (size_t i = 0; i < (size_t)n_a * N; i++)
        best[i] = -INFINITY;
    const float scale = 1.0f / sqrtf((float)d);
    const uint32_t half = pool / 2;
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        for (uint32_t g = 0; g < hp->n_head_kv; g++) {
            model__gather_keys(kv, l, g, blocks, N, keys);
            for (uint32_t hh = 0; hh < G; hh++) {
                const uint32_t h = g * G + hh;
                for (uint32_t a = 0; a < n_a; a++) {
                    const float *q = qs + ((size_t)a * hp->n_layer + l) * qd + (size_t)h * d;
                    float mx = -INFINITY;
                    for (uint32_t j = 0; j < N; j++) {
                        const float *k = keys + (size_t)j * d;
                        float s = 0.0f;
                        for (uint32_t e = 0; e < d; e++)
                            s += q[e] * k[e];
                        p[j] = s * scale;
                        mx = p[j] > mx ? p[j] : mx;
                    }
                    double sum = 0.0;
                    for (uint32_t j = 0; j < N; j++) {
                        p[j] = expf(p[j] - mx);
                        sum += p[j];
                    }
                    const float inv = (float)(1.0 / sum);
                    for (uint32_t j = 0; j < N; j++)
                        p[j] *= inv;
                    /* Sliding sum over [j - half, j + half], clipped. */
                    double win = 0.0;
                    for (uint32_t j = 0; j < N && j < half; j++)
                        win += p[j];
                    for (uint32_t j = 0; j < N; j++) {
                        if (j + half < N)
                            win += p[j + half];
                        if (j > half)
                            win -= p[j - half - 1];
                        sm[j] = (float)(win / pool);
                    }
                    float *b = best + (size_t)a * N;
                    for (uint32_t j = 0; j < N; j++)
                        b[j] = sm[j] > b[j] ? sm[j] : b[j];
                }
            }
        }
    }
    for (uint32_t j = 0; j < N; j++) {
        double s = 0.0;
        for (uint32_t a = 0; a < n_a; a++)
            s += best[(size_t)a * N + j];
        imp[j] = (float)(s / n_a);
    }
    free(keys);
    free(p);
    free(sm);
    free(best);
    return 0;
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
