/*
 * tests/kernels/kern_test.h — helpers shared by the kernel tests
 * (test_kern_ops.c, test_gpu.c, test_attn_policy.c): a seeded PRNG and random data, backend
 * buffers with sentinel guards, the max|a - ref| / max|ref| comparison,
 * random weight matrices of any type, and paged KV stores.  Include after
 * <cmocka.h>; everything is static inline, so each test takes what it uses.
 *
 * Every buffer put() allocates carries GUARD sentinel floats past its end,
 * which get() checks are intact: an op that writes past its output fails
 * there rather than corrupting a neighbour silently.
 */
#ifndef KERN_TEST_H
#define KERN_TEST_H

#include <math.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/kern.h"

#define GUARD 16 /* sentinel floats after every buffer */
#define SENTINEL_BITS 0x7fa5a5a5u

/* ------------------------------------------------------------------------ */
/* Data.                                                                    */
/* ------------------------------------------------------------------------ */

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static inline void
rng_seed(uint64_t s)
{
    g_rng = s * 0x9e3779b97f4a7c15ull + 1;
}

static inline uint32_t
rng_u32(void)
{
    g_rng ^= g_rng >> 12;
    g_rng ^= g_rng << 25;
    g_rng ^= g_rng >> 27;
    return (uint32_t)((g_rng * 0x2545f4914f6cdd1dull) >> 32);
}

static inline float
rng_f(float lo, float hi)
{
    return lo + (hi - lo) * (float)(rng_u32() >> 8) * (1.0f / 16777216.0f);
}

static inline float *
rand_floats(size_t n, float lo, float hi)
{
    float *p = malloc((n ? n : 1) * sizeof(float));
    assert_non_null(p);
    for (size_t i = 0; i < n; i++)
        p[i] = rng_f(lo, hi);
    return p;
}

static inline void
shuffle(int32_t *a, size_t n)
{
    for (size_t i = n; i > 1; i--) {
        size_t j = rng_u32() % i;
        int32_t t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

static inline float
sentinel(void)
{
    return kvs_bits_to_f32(SENTINEL_BITS);
}

static inline float *
sentinel_floats(size_t n)
{
    float *p = malloc((n ? n : 1) * sizeof(float));
    assert_non_null(p);
    for (size_t i = 0; i < n; i++)
        p[i] = sentinel();
    return p;
}

/* ------------------------------------------------------------------------ */
/* Backend buffers with guards.                                             */
/* ------------------------------------------------------------------------ */

/* Allocates bytes + guard on `be`, uploads `host` (may be NULL: zeros). */
static inline void *
put(kern_backend_t *be, const void *host, size_t bytes)
{
    uint8_t *d = kern_alloc(be, bytes + GUARD * sizeof(float));
    assert_non_null(d);
    if (host)
        assert_int_equal(kern_upload(be, d, host, bytes), 0);
    else
        assert_int_equal(kern_memset(be, d, 0, bytes), 0);
    float tail[GUARD];
    for (int i = 0; i < GUARD; i++)
        tail[i] = sentinel();
    assert_int_equal(kern_upload(be, d + bytes, tail, sizeof(tail)), 0);
    return d;
}

/* Every byte of [p, p + bytes) set to 0xff, a NaN in every float, through
 * the backend's own memset: an element an op forgot to write stays NaN and
 * fails the comparison. */
static inline void
poison(kern_backend_t *be, void *p, size_t bytes)
{
    assert_int_equal(kern_memset(be, p, 0xff, bytes), 0);
}

/* An output buffer of n floats, all NaN. */
static inline float *
put_out(kern_backend_t *be, size_t n)
{
    float *d = put(be, NULL, n * sizeof(float));
    poison(be, d, n * sizeof(float));
    return d;
}

/* Downloads `bytes` (host may be NULL) and checks the guard is intact. */
static inline void
get(kern_backend_t *be, void *host, const void *dev, size_t bytes, const char *what)
{
    assert_int_equal(kern_sync(be), 0);
    if (host)
        assert_int_equal(kern_download(be, host, dev, bytes), 0);
    uint32_t tail[GUARD];
    assert_int_equal(kern_download(be, tail, (const uint8_t *)dev + bytes, sizeof(tail)), 0);
    for (int i = 0; i < GUARD; i++) {
        if (tail[i] != SENTINEL_BITS) {
            print_error("%s [%s]: guard float %d overwritten\n", what, kern_backend_name(be), i);
            fail();
        }
    }
}

/* Downloads and frees. */
static inline void
take(kern_backend_t *be, void *host, void *dev, size_t bytes, const char *what)
{
    get(be, host, dev, bytes, what);
    kern_free(be, dev);
}

static inline void
check_close(const float *ref, const float *got, size_t n, double limit, const char *what,
            const char *label)
{
    double mx = 0.0, err = 0.0;
    size_t at = 0;
    for (size_t i = 0; i < n; i++)
        if (fabs(ref[i]) > mx)
            mx = fabs(ref[i]);
    if (mx < 1e-30)
        mx = 1e-30;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - ref[i]) / mx;
        if (!(e <= err)) { /* catches NaN: unwritten outputs */
            err = isnan(e) ? INFINITY : e;
            at = i;
            if (isnan(e))
                break;
        }
    }
    if (getenv("KVS_TEST_VERBOSE"))
        print_message("%-56s %-22s err %.3g\n", what, label, err);
    if (!(err <= limit)) {
        print_error("%s [%s]: error %.3g > %.3g at %zu (ref %g, got %g)\n", what, label, err, limit,
                    at, ref[at], got[at]);
        fail();
    }
}

/* ------------------------------------------------------------------------ */
/* Weights.                                                                 */
/* ------------------------------------------------------------------------ */

/* A random matrix of `type`, rows `pad` bytes longer than packed. */
static inline void *
make_weights(kern_dtype_t type, uint32_t rows, uint32_t cols, size_t pad, size_t *row_bytes)
{
    size_t rb = kern_row_bytes(type, cols) + pad;
    uint8_t *w = calloc(rows, rb);
    assert_non_null(w);
    float *tmp = rand_floats(cols, -1.0f, 1.0f);
    for (uint32_t r = 0; r < rows; r++) {
        for (uint32_t c = 0; c < cols; c++)
            tmp[c] = rng_f(-1.0f, 1.0f);
        uint8_t *row = w + (size_t)r * rb;
        switch (type) {
        case KERN_F32:
            memcpy(row, tmp, cols * sizeof(float));
            break;
        case KERN_F16:
            for (uint32_t c = 0; c < cols; c++) {
                uint16_t h = kvs_f32_to_fp16(tmp[c]);
                memcpy(row + 2 * c, &h, 2);
            }
            break;
        case KERN_BF16:
            for (uint32_t c = 0; c < cols; c++) {
                uint16_t h = kvs_f32_to_bf16(tmp[c]);
                memcpy(row + 2 * c, &h, 2);
            }
            break;
        case KERN_Q8_0:
            kern_quantize_q8_0(tmp, (kern_block_q8_0_t *)row, cols);
            break;
        default: /* Q4_0, the K-quants */
            assert_int_equal(kern_quantize_row(type, tmp, row, cols), 0);
            break;
        }
    }
    free(tmp);
    *row_bytes = rb;
    return w;
}

/* ------------------------------------------------------------------------ */
/* Paged KV stores.                                                         */
/* ------------------------------------------------------------------------ */

typedef struct kv_geom {
    kern_dtype_t dtype;
    uint32_t n_layers, n_kv_heads, head_dim, block_tokens, n_blocks;
} kv_geom_t;

/* Downloads K and V (either may be NULL) and frees them. */
static inline void
kv_take(kern_backend_t *be, kern_kv_t *kv, void *k_host, void *v_host)
{
    take(be, k_host, kv->k, kv->layer_bytes * kv->n_layers, "kv k");
    take(be, v_host, kv->v, kv->layer_bytes * kv->n_layers, "kv v");
}

/* A pool of g's shape in guarded backend memory, all zero: with a codec,
 * blocks [0, n_hot) full precision and the rest quantized tiles (kern.h's
 * [layer][block - n_hot][kv_head]); without, all full precision. */
static inline kern_kv_t
kv_make_q(kern_backend_t *be, const kv_geom_t *g, kern_kvq_t quant, uint32_t n_hot)
{
    size_t el = g->dtype == KERN_F16 ? 2 : 4;
    if (quant == KERN_KVQ_NONE)
        n_hot = g->n_blocks;
    kern_kv_t kv = {.dtype = g->dtype,
                    .n_layers = g->n_layers,
                    .n_kv_heads = g->n_kv_heads,
                    .head_dim = g->head_dim,
                    .block_tokens = g->block_tokens,
                    .n_blocks = g->n_blocks};
    kv.layer_bytes = (size_t)n_hot * g->n_kv_heads * g->block_tokens * g->head_dim * el;
    kv.k = put(be, NULL, g->n_layers * kv.layer_bytes);
    kv.v = put(be, NULL, g->n_layers * kv.layer_bytes);
    if (quant != KERN_KVQ_NONE) {
        kv.quant = quant;
        kv.n_hot = n_hot;
        kv.qk_tile = kern_kvq_tile_bytes(quant, false, g->block_tokens, g->head_dim);
        kv.qv_tile = kern_kvq_tile_bytes(quant, true, g->block_tokens, g->head_dim);
        size_t tiles = (size_t)g->n_layers * (g->n_blocks - n_hot) * g->n_kv_heads;
        if (tiles) {
            kv.qk = put(be, NULL, tiles * kv.qk_tile);
            kv.qv = put(be, NULL, tiles * kv.qv_tile);
        }
    }
    return kv;
}

/* A full-precision pool of g's shape holding k_host and v_host (either may
 * be NULL: zeros). */
static inline kern_kv_t
kv_make(kern_backend_t *be, const kv_geom_t *g, const void *k_host, const void *v_host)
{
    kern_kv_t kv = kv_make_q(be, g, KERN_KVQ_NONE, 0);
    if (k_host)
        assert_int_equal(kern_upload(be, kv.k, k_host, kv.layer_bytes * g->n_layers), 0);
    if (v_host)
        assert_int_equal(kern_upload(be, kv.v, v_host, kv.layer_bytes * g->n_layers), 0);
    return kv;
}

/* Checks the guards of a kv_make_q pool and frees it. */
static inline void
kv_take_q(kern_backend_t *be, kern_kv_t *kv)
{
    take(be, NULL, kv->k, kv->layer_bytes * kv->n_layers, "pool k");
    take(be, NULL, kv->v, kv->layer_bytes * kv->n_layers, "pool v");
    size_t tiles = (size_t)kv->n_layers * (kv->n_blocks - kv->n_hot) * kv->n_kv_heads;
    if (kv->qk)
        take(be, NULL, kv->qk, tiles * kv->qk_tile, "pool qk");
    if (kv->qv)
        take(be, NULL, kv->qv, tiles * kv->qv_tile, "pool qv");
}

static inline void
check_bytes_equal(const void *a, const void *b, size_t n, const char *what, const char *label)
{
    if (memcmp(a, b, n) != 0) {
        size_t i = 0;
        while (((const uint8_t *)a)[i] == ((const uint8_t *)b)[i])
            i++;
        print_error("%s [%s]: bytes differ at %zu\n", what, label, i);
        fail();
    }
}

/* ------------------------------------------------------------------------ */
/* Attention cases.                                                         */
/* ------------------------------------------------------------------------ */

typedef struct attn_case {
    const char *name;
    kern_dtype_t dtype;
    uint32_t block_tokens, head_dim, n_heads, n_kv_heads;
    uint32_t n_seqs;
    int32_t len[3];  /* KV entries of each sequence */
    int32_t rows[3]; /* query rows: the last rows[s] positions, causal */
    int32_t shared;  /* leading blocks of sequence 0 that sequence 1 shares */
} attn_case_t;

/* One case's inputs, built once and replayed on every backend. */
typedef struct attn_data {
    const attn_case_t *c;
    kv_geom_t g;
    int32_t indptr[4], last_len[3], q_indptr[4];
    int32_t *indices;
    int32_t *kv_len;
    uint32_t n_q;
    float *q;
    float *k_tok, *v_tok; /* appended tokens */
    int32_t *slots;
    uint32_t n_tok;
    float scale;
} attn_data_t;

static inline void
attn_build(const attn_case_t *c, attn_data_t *d)
{
    memset(d, 0, sizeof(*d));
    d->c = c;
    uint32_t bt = c->block_tokens, n_blk = 0;
    for (uint32_t s = 0; s < c->n_seqs; s++)
        n_blk += (uint32_t)(c->len[s] + (int32_t)bt - 1) / bt;
    n_blk -= (uint32_t)c->shared;
    d->g = (kv_geom_t){c->dtype, 2, c->n_kv_heads, c->head_dim, bt, n_blk + 5};

    /* Scrambled block ids: neither contiguous nor increasing. */
    int32_t *perm = malloc(d->g.n_blocks * sizeof(int32_t));
    assert_non_null(perm);
    for (uint32_t i = 0; i < d->g.n_blocks; i++)
        perm[i] = (int32_t)i;
    shuffle(perm, d->g.n_blocks);
    d->indices = malloc((n_blk + (uint32_t)c->shared) * sizeof(int32_t));
    assert_non_null(d->indices);
    uint32_t used = 0, at = 0;
    d->indptr[0] = 0;
    for (uint32_t s = 0; s < c->n_seqs; s++) {
        int32_t nb = (c->len[s] + (int32_t)bt - 1) / (int32_t)bt;
        for (int32_t b = 0; b < nb; b++) {
            if (s == 1 && b < c->shared)
                d->indices[at++] = d->indices[b]; /* sequence 0's block */
            else
                d->indices[at++] = perm[used++];
        }
        d->indptr[s + 1] = (int32_t)at;
        d->last_len[s] = c->len[s] - (nb - 1) * (int32_t)bt;
    }
    free(perm);

    /* Every slot written once: shared blocks only by sequence 0. */
    size_t row = (size_t)c->n_kv_heads * c->head_dim;
    uint32_t max_tok = 0;
    for (uint32_t s = 0; s < c->n_seqs; s++)
        max_tok += (uint32_t)c->len[s];
    d->slots = malloc(max_tok * sizeof(int32_t));
    assert_non_null(d->slots);
    for (uint32_t s = 0; s < c->n_seqs; s++) {
        for (int32_t j = 0; j < c->len[s]; j++) {
            if (s == 1 && j < c->shared * (int32_t)bt)
                continue;
            int32_t blk = d->indices[d->indptr[s] + j / (int32_t)bt];
            d->slots[d->n_tok++] = blk * (int32_t)bt + j % (int32_t)bt;
        }
    }
    d->k_tok = rand_floats(d->n_tok * row, -2.0f, 2.0f);
    d->v_tok = rand_floats(d->n_tok * row, -2.0f, 2.0f);

    d->q_indptr[0] = 0;
    for (uint32_t s = 0; s < c->n_seqs; s++)
        d->q_indptr[s + 1] = d->q_indptr[s] + c->rows[s];
    d->n_q = (uint32_t)d->q_indptr[c->n_seqs];
    d->kv_len = malloc(d->n_q * sizeof(int32_t));
    assert_non_null(d->kv_len);
    for (uint32_t s = 0; s < c->n_seqs; s++)
        for (int32_t r = 0; r < c->rows[s]; r++)
            d->kv_len[d->q_indptr[s] + r] = c->len[s] - c->rows[s] + 1 + r;
    d->q = rand_floats((size_t)d->n_q * c->n_heads * c->head_dim, -2.0f, 2.0f);
    d->scale = 1.0f / sqrtf((float)c->head_dim);
}

static inline void
attn_free(attn_data_t *d)
{
    free(d->indices);
    free(d->kv_len);
    free(d->q);
    free(d->k_tok);
    free(d->v_tok);
    free(d->slots);
}

/* Appends the case's tokens (one call per sequence), then runs attention
 * over the whole batch into out_batch and, when out_single is not NULL,
 * once per sequence into out_single. */
static inline void
run_attn(kern_backend_t *be, const attn_data_t *d, float *out_batch, float *out_single)
{
    const attn_case_t *c = d->c;
    const uint32_t layer = 1;
    kern_kv_t kv = kv_make(be, &d->g, NULL, NULL);
    size_t row = (size_t)c->n_kv_heads * c->head_dim;
    float *kd = put(be, d->k_tok, d->n_tok * row * sizeof(float));
    float *vd = put(be, d->v_tok, d->n_tok * row * sizeof(float));
    for (uint32_t t0 = 0; t0 < d->n_tok;) {
        uint32_t t1 = t0 + 1;
        while (t1 < d->n_tok && t1 - t0 < 1000)
            t1++;
        assert_int_equal(
            kern_kv_append(be, &kv, layer, kd + t0 * row, vd + t0 * row, d->slots + t0, t1 - t0),
            0);
        t0 = t1;
    }
    take(be, NULL, kd, d->n_tok * row * sizeof(float), "attn k tokens");
    take(be, NULL, vd, d->n_tok * row * sizeof(float), "attn v tokens");

    size_t qn = (size_t)d->n_q * c->n_heads * c->head_dim;
    size_t per_row = (size_t)c->n_heads * c->head_dim;
    float *qd = put(be, d->q, qn * sizeof(float));
    float *od = put_out(be, qn);
    kern_attn_args_t a = {.q = qd,
                          .out = od,
                          .n_q = d->n_q,
                          .n_heads = c->n_heads,
                          .q_indptr = d->q_indptr,
                          .kv_len = d->kv_len,
                          .pt = {.indptr = d->indptr,
                                 .indices = d->indices,
                                 .last_len = d->last_len,
                                 .n_seqs = c->n_seqs},
                          .kv = &kv,
                          .layer = layer,
                          .scale = d->scale};
    assert_int_equal(kern_attention(be, &a), 0);
    take(be, out_batch, od, qn * sizeof(float), "attn out");

    for (uint32_t s = 0; out_single && s < c->n_seqs; s++) {
        int32_t q0 = d->q_indptr[s], nq = d->q_indptr[s + 1] - q0;
        int32_t b0 = d->indptr[s];
        int32_t indptr[2] = {0, d->indptr[s + 1] - b0}, q_indptr[2] = {0, nq};
        float *os = put_out(be, (size_t)nq * per_row);
        kern_attn_args_t one = a;
        one.q = qd + (size_t)q0 * per_row;
        one.out = os;
        one.n_q = (uint32_t)nq;
        one.q_indptr = q_indptr;
        one.kv_len = d->kv_len + q0;
        one.pt = (kern_page_table_t){
            .indptr = indptr, .indices = d->indices + b0, .last_len = d->last_len + s, .n_seqs = 1};
        assert_int_equal(kern_attention(be, &one), 0);
        take(be, out_single + (size_t)q0 * per_row, os, (size_t)nq * per_row * sizeof(float),
             "attn single out");
    }
    take(be, NULL, qd, qn * sizeof(float), "attn q");
    kv_take(be, &kv, NULL, NULL);
}

/* ------------------------------------------------------------------------ */
/* Small ops as a model runs them: inputs uploaded, output read back.       */
/* ------------------------------------------------------------------------ */

static inline void
run_get_rows(kern_backend_t *be, kern_dtype_t type, uint32_t rows, uint32_t cols, size_t rb,
             const void *w_host, const int32_t *ids, uint32_t n, float *out)
{
    void *wd = put(be, w_host, rb * rows);
    float *od = put_out(be, (size_t)n * cols);
    kern_tensor_t w = {.type = type, .n_cols = cols, .n_rows = rows, .row_bytes = rb, .data = wd};
    assert_int_equal(kern_pack_weight(be, &w), 0); /* rows must read back the same */
    assert_int_equal(kern_get_rows(be, &w, ids, n, od), 0);
    take(be, out, od, (size_t)n * cols * sizeof(float), "get_rows out");
    take(be, NULL, wd, rb * rows, "get_rows w");
}

static inline void
run_rmsnorm(kern_backend_t *be, const float *x, const float *w, uint32_t n, uint32_t d,
            bool in_place, float *y)
{
    size_t bytes = (size_t)n * d * sizeof(float);
    float *xd = put(be, x, bytes);
    float *wd = put(be, w, d * sizeof(float));
    float *yd = in_place ? xd : put_out(be, (size_t)n * d);
    assert_int_equal(kern_rmsnorm(be, xd, wd, n, d, 1e-5f, yd), 0);
    get(be, y, yd, bytes, "rmsnorm y");
    if (!in_place)
        take(be, NULL, yd, bytes, "rmsnorm y");
    take(be, NULL, xd, bytes, "rmsnorm x");
    take(be, NULL, wd, d * sizeof(float), "rmsnorm w");
}

/* kern_add_rmsnorm (fused) or kern_add then kern_rmsnorm on be: x comes
 * back in xo, the norm in y; alias: y is written over res. */
static inline void
run_add_rmsnorm(kern_backend_t *be, bool fused, const float *x, const float *res, const float *w,
                uint32_t n, uint32_t d, bool alias, float *xo, float *y)
{
    size_t bytes = (size_t)n * d * sizeof(float);
    float *xd = put(be, x, bytes);
    float *rd = put(be, res, bytes);
    float *wd = put(be, w, d * sizeof(float));
    float *yd = alias ? rd : put_out(be, (size_t)n * d);
    if (fused) {
        assert_int_equal(kern_add_rmsnorm(be, xd, rd, wd, n, d, 1e-5f, yd), 0);
    } else {
        assert_int_equal(kern_add(be, xd, rd, (size_t)n * d), 0);
        assert_int_equal(kern_rmsnorm(be, xd, wd, n, d, 1e-5f, yd), 0);
    }
    get(be, y, yd, bytes, "add_rmsnorm y");
    if (!alias)
        take(be, NULL, yd, bytes, "add_rmsnorm y");
    take(be, xo, xd, bytes, "add_rmsnorm x");
    take(be, NULL, rd, bytes, "add_rmsnorm res");
    take(be, NULL, wd, d * sizeof(float), "add_rmsnorm w");
}

/* One weight of a fused product, on the host: `rows` rows of `rb` bytes
 * (make_weights), an optional bias. */
typedef struct mm_weight {
    kern_dtype_t type;
    uint32_t rows;
    size_t rb;
    const void *host;
    const float *bias;
} mm_weight_t;

/* count random weights of types[i] and rows[i] (make_weights, on the
 * host) and a random bias for each in bias[i], not attached yet. */
static inline void
make_weight_set(uint32_t count, const kern_dtype_t *types, const uint32_t *rows, uint32_t cols,
                mm_weight_t *w, float **bias)
{
    for (uint32_t i = 0; i < count; i++) {
        w[i] = (mm_weight_t){.type = types[i], .rows = rows[i]};
        w[i].host = make_weights(types[i], rows[i], cols, 0, &w[i].rb);
        bias[i] = rand_floats(rows[i], -2.0f, 2.0f);
    }
}

static inline void
free_weight_set(uint32_t count, mm_weight_t *w, float **bias)
{
    for (uint32_t i = 0; i < count; i++) {
        free((void *)w[i].host);
        free(bias[i]);
    }
}

/* Uploads weights as a model would (packed into the backend's layout). */
static inline void
put_weights(kern_backend_t *be, uint32_t count, const mm_weight_t *w, uint32_t cols,
            kern_tensor_t *t)
{
    for (uint32_t i = 0; i < count; i++) {
        t[i] = (kern_tensor_t){.type = w[i].type,
                               .n_cols = cols,
                               .n_rows = w[i].rows,
                               .row_bytes = w[i].rb,
                               .data = put(be, w[i].host, w[i].rb * w[i].rows)};
        assert_int_equal(kern_pack_weight(be, &t[i]), 0);
    }
}

static inline void
take_weights(kern_backend_t *be, uint32_t count, const mm_weight_t *w, kern_tensor_t *t)
{
    for (uint32_t i = 0; i < count; i++)
        take(be, NULL, (void *)t[i].data, w[i].rb * w[i].rows, "matmul w");
}

/* kern_matmul_set (fused) or a kern_matmul per weight, on be: y[i] gets
 * [n][w[i].rows]. */
static inline void
run_matmul_set(kern_backend_t *be, bool fused, uint32_t count, const mm_weight_t *w, uint32_t cols,
               const float *x, uint32_t n, float **y)
{
    kern_tensor_t t[KERN_MATMUL_SET_MAX];
    const kern_tensor_t *tp[KERN_MATMUL_SET_MAX];
    float *bd[KERN_MATMUL_SET_MAX], *yd[KERN_MATMUL_SET_MAX];
    put_weights(be, count, w, cols, t);
    float *xd = put(be, x, (size_t)n * cols * sizeof(float));
    for (uint32_t i = 0; i < count; i++) {
        tp[i] = &t[i];
        bd[i] = w[i].bias ? put(be, w[i].bias, w[i].rows * sizeof(float)) : NULL;
        yd[i] = put_out(be, (size_t)n * w[i].rows);
    }
    if (fused) {
        assert_int_equal(kern_matmul_set(be, count, tp, xd, n, (const float *const *)bd, yd), 0);
    } else {
        for (uint32_t i = 0; i < count; i++)
            assert_int_equal(kern_matmul(be, tp[i], xd, n, bd[i], yd[i]), 0);
    }
    for (uint32_t i = 0; i < count; i++) {
        take(be, y[i], yd[i], (size_t)n * w[i].rows * sizeof(float), "matmul_set y");
        if (bd[i])
            take(be, NULL, bd[i], w[i].rows * sizeof(float), "matmul_set bias");
    }
    take(be, NULL, xd, (size_t)n * cols * sizeof(float), "matmul_set x");
    take_weights(be, count, w, t);
}

/* kern_matmul_swiglu (fused) or the two products and kern_swiglu, on be:
 * y gets [n][w[0].rows]; w[0] is the gate, w[1] up. */
static inline void
run_matmul_swiglu(kern_backend_t *be, bool fused, const mm_weight_t *w, uint32_t cols,
                  const float *x, uint32_t n, float *y)
{
    kern_tensor_t t[2];
    size_t m = (size_t)n * w[0].rows;
    put_weights(be, 2, w, cols, t);
    float *xd = put(be, x, (size_t)n * cols * sizeof(float));
    float *tmp = put_out(be, m), *yd = put_out(be, m);
    if (fused) {
        assert_int_equal(kern_matmul_swiglu(be, &t[0], &t[1], xd, n, tmp, yd), 0);
    } else {
        assert_int_equal(kern_matmul(be, &t[0], xd, n, NULL, yd), 0);
        assert_int_equal(kern_matmul(be, &t[1], xd, n, NULL, tmp), 0);
        assert_int_equal(kern_swiglu(be, yd, tmp, m, yd), 0);
    }
    take(be, y, yd, m * sizeof(float), "matmul_swiglu y");
    take(be, NULL, tmp, m * sizeof(float), "matmul_swiglu tmp");
    take(be, NULL, xd, (size_t)n * cols * sizeof(float), "matmul_swiglu x");
    take_weights(be, 2, w, t);
}

/* kern_rope over x ([n_rows][proto->n_heads][head_dim]) and x2 (n_heads2
 * heads) on be in the ways the forward pass may ask: one call with x2, and
 * under an epoch twice, another op's staging between (a device backend
 * keeps an epoch's positions and must keep them apart from that); each
 * must give the bits of two plain calls. */
static inline void
check_rope_fused(kern_backend_t *be, const kern_rope_args_t *proto, uint32_t n_heads2,
                 const float *x, const float *x2, const char *what)
{
    static uint64_t epoch = (uint64_t)1 << 40; /* apart from any a model would use */
    const size_t n1 = (size_t)proto->n_rows * proto->n_heads * proto->head_dim;
    const size_t n2 = (size_t)proto->n_rows * n_heads2 * proto->head_dim;
    float *want = malloc((n1 + n2) * sizeof(float)), *got = malloc((n1 + n2) * sizeof(float));
    assert_true(want && got);
    kern_rope_args_t a = *proto;
    a.x2 = NULL, a.n_heads2 = 0, a.epoch = 0;
    a.x = put(be, x, n1 * sizeof(float));
    assert_int_equal(kern_rope(be, &a), 0);
    take(be, want, a.x, n1 * sizeof(float), "rope x");
    a.x = put(be, x2, n2 * sizeof(float));
    a.n_heads = n_heads2;
    assert_int_equal(kern_rope(be, &a), 0);
    take(be, want + n1, a.x, n2 * sizeof(float), "rope x2");

    epoch++;
    const float table[8] = {1, 2, 3, 4, 5, 6, 7, 8};
    kern_tensor_t t = {.type = KERN_F32, .n_cols = 4, .n_rows = 2, .row_bytes = 16};
    t.data = put(be, table, sizeof table);
    float *rows = put_out(be, 4 * 4);
    const int32_t ids[4] = {1, 0, 1, 1};
    for (int round = 0; round < 3; round++) {
        a = *proto;
        a.x = put(be, x, n1 * sizeof(float));
        a.x2 = put(be, x2, n2 * sizeof(float));
        a.n_heads2 = n_heads2;
        a.epoch = round ? epoch : 0;
        if (round == 2) /* stages its ids where a device backend stages */
            assert_int_equal(kern_get_rows(be, &t, ids, 4, rows), 0);
        assert_int_equal(kern_rope(be, &a), 0);
        take(be, got, a.x, n1 * sizeof(float), "rope x");
        take(be, got + n1, a.x2, n2 * sizeof(float), "rope x2");
        if (memcmp(want, got, (n1 + n2) * sizeof(float)) != 0)
            fail_msg("%s [%s]: rope with x2%s is not two calls", what, kern_backend_name(be),
                     round == 0   ? ""
                     : round == 1 ? " under an epoch"
                                  : ", the epoch's again");
    }
    take(be, NULL, rows, 4 * 4 * sizeof(float), "get_rows out");
    take(be, NULL, (void *)t.data, sizeof table, "get_rows table");
    free(want);
    free(got);
}

static inline void
run_add(kern_backend_t *be, const float *x, const float *y, size_t n, float *out)
{
    float *xd = put(be, x, n * sizeof(float));
    float *yd = put(be, y, n * sizeof(float));
    assert_int_equal(kern_add(be, xd, yd, n), 0);
    take(be, out, xd, n * sizeof(float), "add x");
    take(be, NULL, yd, n * sizeof(float), "add y");
}

static inline void
run_swiglu(kern_backend_t *be, const float *g, const float *u, size_t n, bool alias, float *y)
{
    float *gd = put(be, g, n * sizeof(float));
    float *ud = put(be, u, n * sizeof(float));
    float *yd = alias ? gd : put_out(be, n);
    assert_int_equal(kern_swiglu(be, gd, ud, n, yd), 0);
    get(be, y, yd, n * sizeof(float), "swiglu out");
    if (!alias)
        take(be, NULL, yd, n * sizeof(float), "swiglu out");
    take(be, NULL, gd, n * sizeof(float), "swiglu gate");
    take(be, NULL, ud, n * sizeof(float), "swiglu up");
}

#endif /* KERN_TEST_H */
