/*
 * kernels/kern_host.c — what the backends whose memory is the host's (ref,
 * cpu) share: memory functions, Delta Attention's correction (one simple
 * loop serves both: it moves a few rows per block), the sealing of full
 * KV blocks into quantized tiles (the codecs are kern_kvq.c's), the
 * row gathers of score-based KV compression and block-sparse prefill's
 * Quest bounds and choice of blocks.  Allocations
 * are 64-byte aligned so SIMD loads of rows and KV blocks never straddle
 * cache lines needlessly.
 */
#include "kern_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

void *
kern__host_alloc(kern_backend_t *be, size_t bytes)
{
    (void)be;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded < bytes)
        return NULL;
    return aligned_alloc(64, rounded);
}

void
kern__host_free(kern_backend_t *be, void *p)
{
    (void)be;
    free(p);
}

int
kern__host_copy(kern_backend_t *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    memmove(dst, src, bytes);
    return 0;
}

int
kern__host_memset(kern_backend_t *be, void *dst, int value, size_t bytes)
{
    (void)be;
    memset(dst, value, bytes);
    return 0;
}

int
kern__host_sync(kern_backend_t *be)
{
    (void)be;
    return 0;
}

int
kern__host_delta_apply(kern_backend_t *be, float *out, float *dense, uint32_t n, uint32_t width,
                       uint32_t gamma, uint32_t tail)
{
    (void)be;
    const uint32_t ns = n - tail;
    uint32_t i = 0;
    for (uint32_t r = 0; r < ns; r += gamma, i++) {
        /* The dense row becomes the block's difference in place. */
        float *delta = dense + (size_t)i * width;
        const float *os = out + (size_t)r * width;
        for (uint32_t k = 0; k < width; k++)
            delta[k] -= os[k];
        uint32_t end = r + gamma < ns ? r + gamma : ns;
        for (uint32_t row = r; row < end; row++) {
            float *o = out + (size_t)row * width;
            for (uint32_t k = 0; k < width; k++)
                o[k] += delta[k];
        }
    }
    for (uint32_t r = ns; r < n; r++, i++)
        memcpy(out + (size_t)r * width, dense + (size_t)i * width, width * sizeof(float));
    return 0;
}

/* Decoded rows back into full-precision storage.  A codec may decode a
 * value just past fp16's largest (65504 rounds up in every codec's grid),
 * which must stay finite rather than become inf. */
static void
store_hot_row(const kern_kv_t *kv, void *out, const float *x, size_t n)
{
    if (kv->dtype != KERN_F16) {
        memcpy(out, x, n * sizeof(float));
        return;
    }
    for (size_t e = 0; e < n; e++) {
        float v = x[e] > 65504.0f ? 65504.0f : x[e] < -65504.0f ? -65504.0f : x[e];
        ((uint16_t *)out)[e] = kvs_f32_to_fp16(v);
    }
}

void
kern__host_kv_seal_layer(const kern_kv_t *kv, uint32_t layer, const int32_t *src,
                         const int32_t *dst, uint32_t n, float *x)
{
    uint32_t bt = kv->block_tokens, d = kv->head_dim;
    for (uint32_t i = 0; i < n; i++)
        for (uint32_t h = 0; h < kv->n_kv_heads; h++)
            for (int v = 0; v < 2; v++) {
                kern__kv_rows_f32(kv, v, layer, (uint32_t)src[i], h, 0, bt, x);
                if (kern__kv_cold(kv, (uint32_t)dst[i])) {
                    void *tile = (void *)kern__kv_tile(kv, v, layer, (uint32_t)dst[i], h);
                    kern_kvq_encode(kv->quant, v, x, bt, d, tile);
                    continue;
                }
                store_hot_row(kv,
                              (uint8_t *)(v ? kv->v : kv->k) +
                                  kern__kv_offset(kv, layer, (uint32_t)dst[i], h, 0),
                              x, (size_t)bt * d);
            }
}

void
kern__host_kv_gather_layer(const kern_kv_t *kv, uint32_t layer, const int32_t *src,
                           const int32_t *dst, uint32_t n, float *x)
{
    const uint32_t bt = kv->block_tokens, d = kv->head_dim;
    const size_t row_bytes = kern_row_bytes(kv->dtype, d);
    for (uint32_t h = 0; h < kv->n_kv_heads; h++) {
        const int32_t *s = src + ((size_t)layer * kv->n_kv_heads + h) * n;
        for (uint32_t j = 0; j < n; j++) {
            uint32_t sb = (uint32_t)s[j] / bt, so = (uint32_t)s[j] % bt;
            uint32_t db = (uint32_t)dst[j] / bt, dof = (uint32_t)dst[j] % bt;
            size_t to = kern__kv_offset(kv, layer, db, h, dof);
            for (int v = 0; v < 2; v++) {
                uint8_t *buf = v ? kv->v : kv->k, *out = buf + to;
                if (!kern__kv_cold(kv, sb)) {
                    /* Same dtype on both sides: the bytes themselves, so a
                     * kept row is exactly the row attention read before. */
                    memcpy(out, buf + kern__kv_offset(kv, layer, sb, h, so), row_bytes);
                    continue;
                }
                kern_kv_row_f32(kv, v, layer, (int32_t)sb, h, so, x);
                store_hot_row(kv, out, x, d);
            }
        }
    }
}

/* ---- Quest bounds (kern_kv_block_bounds, kern_block_scores) ------------ */

uint16_t *
kern__host_bounds_out(const kern_kv_t *kv, const int32_t *blocks, uint32_t n, uint32_t g,
                      uint32_t i, uint16_t *out, bool by_block)
{
    size_t row = by_block ? (size_t)g * kv->n_blocks + (uint32_t)blocks[i] : (size_t)g * n + i;
    return out + row * 2 * kv->head_dim;
}

void
kern__host_bounds_round(const float *mx, const float *mn, uint32_t d, uint16_t *out)
{
    for (uint32_t e = 0; e < d; e++) {
        out[e] = kvs_f32_to_fp16_dir(mx[e], true);
        out[d + e] = kvs_f32_to_fp16_dir(mn[e], false);
    }
}

void
kern__host_block_minmax(const kern_kv_t *kv, uint32_t layer, uint32_t blk, uint32_t g, float *x,
                        float *mx, float *mn)
{
    const uint32_t bt = kv->block_tokens, d = kv->head_dim;
    kern__kv_rows_f32(kv, false, layer, blk, g, 0, bt, x);
    memcpy(mx, x, d * sizeof(float));
    memcpy(mn, x, d * sizeof(float));
    for (uint32_t t = 1; t < bt; t++) {
        const float *r = x + (size_t)t * d;
        for (uint32_t e = 0; e < d; e++) {
            mx[e] = r[e] > mx[e] ? r[e] : mx[e];
            mn[e] = r[e] < mn[e] ? r[e] : mn[e];
        }
    }
}

size_t
kern__host_bounds_at(const kern_block_score_args_t *a, uint32_t g)
{
    return (size_t)g * (a->bounds_stride ? a->bounds_stride : a->n_blocks);
}

const uint16_t *
kern__host_bound(const kern_block_score_args_t *a, uint32_t g, uint32_t b)
{
    size_t row = kern__host_bounds_at(a, g) + (a->bounds_rows ? (uint32_t)a->bounds_rows[b] : b);
    return a->bounds + row * 2 * a->head_dim;
}

uint32_t
kern__host_group_blocks(const kern_block_score_args_t *a, uint32_t grp, uint32_t *first)
{
    *first = a->bounds_indptr ? a->bounds_indptr[grp] : 0;
    return a->bounds_indptr ? a->bounds_indptr[grp + 1] - a->bounds_indptr[grp] : a->n_blocks;
}

float *
kern__host_score_row(const kern_block_score_args_t *a, uint32_t grp, uint32_t g)
{
    const size_t row = a->per_kv_head ? (size_t)grp * a->n_kv_heads + g : grp;
    return a->score + row * (a->score_stride ? a->score_stride : a->n_blocks);
}

void
kern__host_block_scores_init(const kern_block_score_args_t *a)
{
    const uint32_t qg = a->q_group ? a->q_group : 1;
    for (uint32_t grp = 0; grp < (a->n_q + qg - 1) / qg; grp++)
        for (uint32_t g = 0; g < (a->per_kv_head ? a->n_kv_heads : 1); g++) {
            float *sc = kern__host_score_row(a, grp, g);
            uint32_t first;
            for (uint32_t b = 0; b < kern__host_group_blocks(a, grp, &first); b++)
                sc[b] = -INFINITY;
        }
}

int
kern__host_block_scores_ref(kern_backend_t *be, const kern_block_score_args_t *a)
{
    (void)be;
    const uint32_t d = a->head_dim, G = a->n_heads / a->n_kv_heads;
    const uint32_t qg = a->q_group ? a->q_group : 1;
    kern__host_block_scores_init(a);
    for (uint32_t i = 0; i < a->n_q; i++)
        for (uint32_t h = 0; h < a->n_heads; h++) {
            const float *q = a->q + ((size_t)i * a->n_heads + h) * d;
            float *sc = kern__host_score_row(a, i / qg, h / G);
            uint32_t first, nb = kern__host_group_blocks(a, i / qg, &first);
            for (uint32_t b = 0; b < nb; b++) {
                const uint16_t *mx = kern__host_bound(a, h / G, first + b);
                const uint16_t *mn = mx + d;
                double s = 0.0;
                for (uint32_t e = 0; e < d; e++) {
                    double u = (double)q[e] * kvs_fp16_to_f32(mx[e]);
                    double w = (double)q[e] * kvs_fp16_to_f32(mn[e]);
                    s += u > w ? u : w;
                }
                sc[b] = (float)s > sc[b] ? (float)s : sc[b];
            }
        }
    return 0;
}

/* sum_e max(q mx, q mn) = [max(q, 0) | min(q, 0)] . [mx | mn]: the bounds
 * of all of a KV head's rows against all blocks are one product. */
int
kern__host_block_scores_gemm(kern_backend_t *be, const kern_block_score_args_t *a)
{
    const uint32_t d = a->head_dim, G = a->n_heads / a->n_kv_heads, nb = a->n_blocks;
    const uint32_t qg = a->q_group ? a->q_group : 1, rows = a->n_q * G;
    float *x = a->work, *y = a->work + (size_t)rows * 2 * d, *gb = y + (size_t)rows * nb;
    kern__host_block_scores_init(a);
    for (uint32_t g = 0; g < a->n_kv_heads; g++) {
        /* Rows from a store: the product wants them side by side. */
        const uint16_t *bd = a->bounds + kern__host_bounds_at(a, g) * 2 * d;
        if (a->bounds_rows) {
            uint16_t *gh = (uint16_t *)gb;
            for (uint32_t b = 0; b < nb; b++)
                memcpy(gh + (size_t)b * 2 * d, kern__host_bound(a, g, b), 2 * d * sizeof(uint16_t));
            bd = gh;
        }
        for (uint32_t i = 0; i < a->n_q; i++)
            for (uint32_t hh = 0; hh < G; hh++) {
                const float *q = a->q + ((size_t)i * a->n_heads + g * G + hh) * d;
                float *xr = x + ((size_t)i * G + hh) * 2 * d;
                for (uint32_t e = 0; e < d; e++) {
                    xr[e] = q[e] > 0.0f ? q[e] : 0.0f;
                    xr[d + e] = q[e] < 0.0f ? q[e] : 0.0f;
                }
            }
        const kern_tensor_t w = {KERN_F16, 2 * d,           nb, (size_t)2 * d * sizeof(uint16_t),
                                 bd,       KERN_LAYOUT_ROWS};
        int rc = be->ops->matmul(be, &w, x, rows, NULL, y);
        if (rc)
            return rc;
        for (uint32_t r = 0; r < rows; r++) {
            const float *yr = y + (size_t)r * nb;
            float *sc = kern__host_score_row(a, r / G / qg, g);
            for (uint32_t b = 0; b < nb; b++)
                sc[b] = yr[b] > sc[b] ? yr[b] : sc[b];
        }
    }
    return 0;
}

/* ---- block-sparse's choice (kern_block_select) -------------------------- */

uint32_t
kern__select_key(float x)
{
    if (x != x)
        return 0;
    if (x == 0.0f)
        return 0x80000000u;
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

/* score[a] ranks before score[b]: the higher key, the lower index on a
 * tie, so the chosen set never depends on the order of the work. */
static bool
topk_before(const float *score, uint32_t a, uint32_t b)
{
    uint32_t ka = kern__select_key(score[a]), kb = kern__select_key(score[b]);
    return ka > kb || (ka == kb && a < b);
}

/* out[0..k) is a heap whose root ranks after its children. */
static void
topk_sift_down(uint32_t *out, uint32_t k, uint32_t p, const float *score)
{
    for (;;) {
        uint32_t w = p, c = 2 * p + 1;
        if (c < k && topk_before(score, out[w], out[c]))
            w = c;
        if (c + 1 < k && topk_before(score, out[w], out[c + 1]))
            w = c + 1;
        if (w == p)
            return;
        uint32_t t = out[p];
        out[p] = out[w];
        out[w] = t;
        p = w;
    }
}

void
kern__host_top_k(uint32_t *out, uint32_t n, uint32_t k, const float *score)
{
    k = k < n ? k : n;
    for (uint32_t i = 0; i < k; i++)
        out[i] = i;
    for (uint32_t p = k / 2; p-- > 0;)
        topk_sift_down(out, k, p, score);
    /* i passes every kept index, so on a tie it ranks after the last
     * kept: only a higher key gets in, against a threshold held here. */
    uint32_t last = k ? kern__select_key(score[out[0]]) : 0;
    for (uint32_t i = k; k && i < n; i++)
        if (kern__select_key(score[i]) > last) {
            out[0] = i;
            topk_sift_down(out, k, 0, score);
            last = kern__select_key(score[out[0]]);
        }
}

int
kern__host_block_select(kern_backend_t *be, const kern_block_select_args_t *a)
{
    (void)be;
    const uint32_t f = a->first, hs = a->mask_head_stride;
    uint32_t kmax = 0; /* only rows that choose: a k past every row's count is all ones */
    for (uint32_t r = 0; r < a->n_rows; r++) {
        const uint32_t k = a->top_ks ? a->top_ks[r] : a->top_k;
        kmax = a->ends[r] - f > k && k > kmax ? k : kmax;
    }
    uint32_t *idx = malloc((size_t)(kmax ? kmax : 1) * sizeof *idx);
    if (idx == NULL)
        return KVS_ENOMEM;
    for (uint32_t r = 0; r < a->n_rows; r++) {
        const uint32_t n = a->ends[r] - f, k = a->top_ks ? a->top_ks[r] : a->top_k;
        for (uint32_t g = 0; g < a->n_kv_heads; g++) {
            const size_t row = (size_t)r * a->n_kv_heads + g;
            uint8_t *m = a->mask + row * hs;
            memset(m, 1, hs);
            if (n <= k)
                continue;
            memset(m + f, 0, n);
            kern__host_top_k(idx, n, k, a->score + row * a->score_stride);
            for (uint32_t t = 0; t < k; t++)
                m[f + idx[t]] = 1;
        }
    }
    free(idx);
    return 0;
}

/* ---- attention mass (kern_attn_mass) ------------------------------------ */

#define MASS_QB 16 /* query rows scored together */
#define MASS_KT 32 /* keys per tile, in cache while all MASS_QB rows use it */

/* Eight partial sums, so the compiler can keep them in vector lanes. */
static float
mass_dot(const float *a, const float *b, uint32_t d)
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

/* Scratch: one tile of keys [MASS_KT][d] and MASS_QB rows of scores as
 * f32, then the sums in double (mode SUM).  Keys are converted a tile at
 * a time, again for every MASS_QB rows: a few conversions per key against
 * MASS_QB dot products, and no copy of the whole head. */
static size_t
mass_floats(const kern_attn_mass_args_t *a)
{
    size_t f = (size_t)MASS_KT * a->kv->head_dim + (size_t)MASS_QB * a->n_keys;
    return (f + 1) & ~(size_t)1; /* the doubles after stay 8-byte aligned */
}

size_t
kern__host_attn_mass_scratch(const kern_attn_mass_args_t *a)
{
    return mass_floats(a) * sizeof(float) +
           (a->mode == KERN_MASS_SUM ? (size_t)a->n_out * sizeof(double) : 0);
}

void
kern__host_attn_mass_head(const kern_attn_mass_args_t *a, uint32_t g, void *x)
{
    const kern_kv_t *kv = a->kv;
    const uint32_t d = kv->head_dim, bt = kv->block_tokens, N = a->n_keys, H = a->n_heads;
    const uint32_t G = H / kv->n_kv_heads, n_rows = G * a->n_q;
    const uint32_t M = a->causal ? N - a->n_q : 0, half = a->pool / 2;
    float *tile = x, *scores = tile + (size_t)MASS_KT * d;
    double *acc = (double *)((float *)x + mass_floats(a));
    if (a->mode == KERN_MASS_SUM)
        memset(acc, 0, (size_t)a->n_out * sizeof(double));
    /* Pair i of the group: head g * G + i / n_q, row i % n_q. */
    for (uint32_t q0 = 0; q0 < n_rows; q0 += MASS_QB) {
        const uint32_t nq = n_rows - q0 < MASS_QB ? n_rows - q0 : MASS_QB;
        const float *qrow[MASS_QB];
        uint32_t lim[MASS_QB], row[MASS_QB];
        for (uint32_t i = 0; i < nq; i++) {
            uint32_t h = g * G + (q0 + i) / a->n_q;
            row[i] = (q0 + i) % a->n_q;
            qrow[i] = a->q + ((size_t)row[i] * H + h) * d;
            lim[i] = a->causal ? M + row[i] + 1 : N;
        }
        for (uint32_t j0 = 0; j0 < N; j0 += MASS_KT) {
            const uint32_t j1 = j0 + MASS_KT < N ? j0 + MASS_KT : N;
            /* In runs within one block: a quantized tile's parameters
             * decoded once a run. */
            for (uint32_t j = j0, n; j < j1; j += n) {
                const uint32_t off = j % bt;
                n = j1 - j < bt - off ? j1 - j : bt - off;
                kern__kv_rows_f32(kv, false, a->layer, (uint32_t)a->blocks[j / bt], g, off, n,
                                  tile + (size_t)(j - j0) * d);
            }
            for (uint32_t i = 0; i < nq; i++) {
                float *s = scores + (size_t)i * N;
                const uint32_t end = j1 < lim[i] ? j1 : lim[i];
                for (uint32_t j = j0; j < end; j++)
                    s[j] = mass_dot(qrow[i], tile + (size_t)(j - j0) * d, d) * a->scale;
            }
        }
        for (uint32_t i = 0; i < nq; i++) {
            float *s = scores + (size_t)i * N;
            float mx = -INFINITY;
            for (uint32_t j = 0; j < lim[i]; j++)
                mx = s[j] > mx ? s[j] : mx;
            double sum = 0.0;
            for (uint32_t j = 0; j < lim[i]; j++) {
                s[j] = expf(s[j] - mx);
                sum += s[j];
            }
            const double inv = 1.0 / sum;
            if (a->mode == KERN_MASS_SUM) {
                const uint32_t end = a->n_out < lim[i] ? a->n_out : lim[i];
                for (uint32_t j = 0; j < end; j++)
                    acc[j] += s[j] * inv;
                continue;
            }
            for (uint32_t j = 0; j < N; j++)
                s[j] = j < lim[i] ? (float)(s[j] * inv) : 0.0f;
            /* The clipped sliding sum over [j - half, j + half]. */
            float *o = a->out + (size_t)row[i] * N;
            double win = 0.0;
            for (uint32_t j = 0; j < N && j < half; j++)
                win += s[j];
            for (uint32_t j = 0; j < N; j++) {
                if (j + half < N)
                    win += s[j + half];
                if (j > half)
                    win -= s[j - half - 1];
                float pooled = (float)(win / a->pool);
                o[j] = pooled > o[j] ? pooled : o[j];
            }
        }
    }
    if (a->mode == KERN_MASS_SUM)
        for (uint32_t j = 0; j < a->n_out; j++)
            a->out[(size_t)g * a->n_out + j] = (float)acc[j];
}

void
kern__host_attn_mass_all(const kern_attn_mass_args_t *a, void *x)
{
    if (a->mode == KERN_MASS_POOL_MAX)
        for (size_t k = 0; k < (size_t)a->n_q * a->n_keys; k++)
            a->out[k] = -INFINITY;
    for (uint32_t g = 0; g < a->kv->n_kv_heads; g++)
        kern__host_attn_mass_head(a, g, x);
}
