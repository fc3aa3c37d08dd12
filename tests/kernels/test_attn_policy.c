/*
 * tests/kernels/test_attn_policy.c — the sparse key pattern of
 * kern_attention (kern.h: sink + window, block mask, dense rows) on the
 * "ref" backend, on every cpu configuration test_kern_ops.c uses, and on
 * "cuda" when it is available (else its checks print "skipped").
 *
 * Three independent checks: the ref backend against a masked-dense
 * reference in double written here from the token arrays (never through
 * the page table); every cpu configuration and cuda against ref (random
 * shapes, GQA 1/4/8, scrambled ragged tables, mixed prefill and decode
 * rows, split-K decode; for cuda also its tensor-core prefill tiles:
 * head_dim 64 and 128, block_tokens 16 and odd, chunks longer than a tile
 * of rows and of keys); and the semantics themselves, by comparing a sink
 * + window row with dense attention over a KV that holds only its allowed
 * keys.  Degenerate patterns (window >= every kv_len, a mask of all
 * ones, every row dense) must equal dense.  Masks with a window are run
 * again from backend memory (mask_in_backend).  Quest's bounds, block
 * scores and block choice (kern_block_select, byte for byte against a
 * rank count written here) and the attention mass run on every backend
 * too.  Errors are
 * max|a - ref| / max|ref|, as in test_kern_ops.c; cuda's outputs start as
 * NaN and must all be written.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <math.h>

#include "kernels/kern.h"
#include "tests/kernels/kern_test.h"
#include "model/model.h"

/* ---- backends ------------------------------------------------------------ */

typedef struct test_be {
    char label[48];
    kern_backend_t *be;
} test_be_t;

static kern_backend_t *g_ref, *g_cuda;
static test_be_t g_be[8];
static int g_n_be;

static void
add_cpu(uint32_t n_threads, const char *isa_cap, const char *label)
{
    kern_backend_cfg_t cfg = {.n_threads = n_threads};
    if (isa_cap)
        setenv("KVS_CPU_ISA", isa_cap, 1);
    int rc = kern_backend_new("cpu", &cfg, &g_be[g_n_be].be);
    if (isa_cap)
        unsetenv("KVS_CPU_ISA");
    assert_int_equal(rc, 0);
    snprintf(g_be[g_n_be].label, sizeof(g_be[g_n_be].label), "%s", label);
    g_n_be++;
}

static int
setup(void **state)
{
    (void)state;
    if (kern_backend_new("ref", NULL, &g_ref) != 0)
        return -1;
    add_cpu(4, NULL, "cpu/4 threads");
    add_cpu(1, NULL, "cpu/1 thread");
    add_cpu(2, "avx2", "cpu/2 threads/avx2");
    add_cpu(3, "scalar", "cpu/3 threads/scalar");
    if (kern_backend_new("cuda", NULL, &g_cuda) != 0)
        g_cuda = NULL;
    return 0;
}

static int
teardown(void **state)
{
    (void)state;
    for (int i = 0; i < g_n_be; i++)
        kern_backend_free(g_be[i].be);
    kern_backend_free(g_cuda);
    kern_backend_free(g_ref);
    return 0;
}

/* Backend b of the loops over every backend: -1 ref, 0 .. g_n_be - 1 the
 * cpu configurations, g_n_be cuda (NULL where there is none). */
static kern_backend_t *
be_at(int b, const char **label)
{
    *label = b < 0 ? "ref" : b == g_n_be ? "cuda" : g_be[b].label;
    return b < 0 ? g_ref : b == g_n_be ? g_cuda : g_be[b].be;
}

/* ---- data ---------------------------------------------------------------- */

#define MAX_SEQS 3

/* One batch: sequences' tokens, a scrambled paged table, query rows. */
typedef struct pdata {
    kern_dtype_t dtype;
    uint32_t bt, d, n_heads, n_kv, n_seqs, n_blocks;
    int32_t len[MAX_SEQS];
    int32_t indptr[MAX_SEQS + 1], last_len[MAX_SEQS], q_indptr[MAX_SEQS + 1];
    int32_t *indices, *kv_len, *slots;
    uint32_t n_q, n_tok;
    float *q;               /* [n_q][n_heads][d] */
    float *k_tok, *v_tok;   /* [n_tok][n_kv][d], tokens in slot order */
    int32_t tok0[MAX_SEQS]; /* sequence s's token j is k_tok row tok0[s] + j */
    float scale;
} pdata_t;

/* The pattern under test (the kern_attn_args_t fields, owned here). */
typedef struct pat {
    uint32_t sinks, window, stride, qb, hstride; /* hstride: mask_head_stride */
    uint8_t *mask, *dense;
    bool in_be; /* the mask goes to backend memory (mask_in_backend) */
} pat_t;

/* rows[s] query rows per sequence, the last ones before len[s] - back[s]
 * (back > 0: a chunk whose KV runs past its last row). */
static void
pdata_build(pdata_t *p, kern_dtype_t dtype, uint32_t bt, uint32_t d, uint32_t n_heads,
            uint32_t n_kv, uint32_t n_seqs, const int32_t *len, const int32_t *rows,
            const int32_t *back)
{
    memset(p, 0, sizeof(*p));
    *p = (pdata_t){
        .dtype = dtype, .bt = bt, .d = d, .n_heads = n_heads, .n_kv = n_kv, .n_seqs = n_seqs};
    uint32_t n_blk = 0;
    for (uint32_t s = 0; s < n_seqs; s++) {
        p->len[s] = len[s];
        n_blk += (uint32_t)(len[s] + (int32_t)bt - 1) / bt;
        p->n_tok += (uint32_t)len[s];
    }
    p->n_blocks = n_blk + 3;
    int32_t *perm = malloc(p->n_blocks * sizeof(int32_t));
    p->indices = malloc(n_blk * sizeof(int32_t));
    p->slots = malloc(p->n_tok * sizeof(int32_t));
    assert_true(perm && p->indices && p->slots);
    for (uint32_t i = 0; i < p->n_blocks; i++)
        perm[i] = (int32_t)i;
    shuffle(perm, p->n_blocks);
    uint32_t at = 0, t = 0;
    for (uint32_t s = 0; s < n_seqs; s++) {
        int32_t nb = (len[s] + (int32_t)bt - 1) / (int32_t)bt;
        for (int32_t b = 0; b < nb; b++)
            p->indices[at + (uint32_t)b] = perm[at + (uint32_t)b];
        p->tok0[s] = (int32_t)t;
        for (int32_t j = 0; j < len[s]; j++)
            p->slots[t++] =
                p->indices[at + (uint32_t)(j / (int32_t)bt)] * (int32_t)bt + j % (int32_t)bt;
        at += (uint32_t)nb;
        p->indptr[s + 1] = (int32_t)at;
        p->last_len[s] = len[s] - (nb - 1) * (int32_t)bt;
    }
    free(perm);
    size_t row = (size_t)n_kv * d;
    p->k_tok = malloc(p->n_tok * row * sizeof(float));
    p->v_tok = malloc(p->n_tok * row * sizeof(float));
    assert_true(p->k_tok && p->v_tok);
    for (size_t i = 0; i < p->n_tok * row; i++) {
        p->k_tok[i] = rng_f(-2.0f, 2.0f);
        p->v_tok[i] = rng_f(-2.0f, 2.0f);
        if (dtype == KERN_F16) { /* exactly what the cache will hold */
            p->k_tok[i] = kvs_fp16_to_f32(kvs_f32_to_fp16(p->k_tok[i]));
            p->v_tok[i] = kvs_fp16_to_f32(kvs_f32_to_fp16(p->v_tok[i]));
        }
    }
    for (uint32_t s = 0; s < n_seqs; s++)
        p->q_indptr[s + 1] = p->q_indptr[s] + rows[s];
    p->n_q = (uint32_t)p->q_indptr[n_seqs];
    p->kv_len = malloc(p->n_q * sizeof(int32_t));
    assert_non_null(p->kv_len);
    for (uint32_t s = 0; s < n_seqs; s++)
        for (int32_t r = 0; r < rows[s]; r++)
            p->kv_len[p->q_indptr[s] + r] = len[s] - back[s] - rows[s] + 1 + r;
    size_t qn = (size_t)p->n_q * n_heads * d;
    p->q = malloc(qn * sizeof(float));
    assert_non_null(p->q);
    for (size_t i = 0; i < qn; i++)
        p->q[i] = rng_f(-2.0f, 2.0f);
    p->scale = 1.0f / sqrtf((float)d);
}

static void
pdata_free(pdata_t *p)
{
    free(p->indices);
    free(p->kv_len);
    free(p->slots);
    free(p->q);
    free(p->k_tok);
    free(p->v_tok);
}

static kern_attn_args_t
pat_args(const pdata_t *p, const pat_t *pt)
{
    kern_attn_args_t a = {.n_q = p->n_q,
                          .n_heads = p->n_heads,
                          .q_indptr = p->q_indptr,
                          .kv_len = p->kv_len,
                          .pt = {.indptr = p->indptr,
                                 .indices = p->indices,
                                 .last_len = p->last_len,
                                 .n_seqs = p->n_seqs},
                          .layer = 1,
                          .scale = p->scale};
    if (pt) {
        a.sink_tokens = pt->sinks;
        a.window_tokens = pt->window;
        a.block_mask = pt->mask;
        a.mask_stride = pt->stride;
        a.mask_q_block = pt->qb;
        a.mask_head_stride = pt->hstride;
        a.dense_rows = pt->dense;
    }
    return a;
}

/* The batch's KV on be (two layers, the tokens appended to layer 1). */
static kern_kv_t
pkv_make(kern_backend_t *be, const pdata_t *p)
{
    size_t el = p->dtype == KERN_F16 ? 2 : 4;
    kern_kv_t kv = {.dtype = p->dtype,
                    .n_layers = 2,
                    .n_kv_heads = p->n_kv,
                    .head_dim = p->d,
                    .block_tokens = p->bt,
                    .n_blocks = p->n_blocks};
    kv.layer_bytes = (size_t)p->n_blocks * p->n_kv * p->bt * p->d * el;
    kv.k = kern_alloc(be, 2 * kv.layer_bytes);
    kv.v = kern_alloc(be, 2 * kv.layer_bytes);
    size_t row = (size_t)p->n_kv * p->d;
    float *kd = kern_alloc(be, p->n_tok * row * sizeof(float));
    float *vd = kern_alloc(be, p->n_tok * row * sizeof(float));
    assert_true(kv.k && kv.v && kd && vd);
    assert_int_equal(kern_memset(be, kv.k, 0, 2 * kv.layer_bytes), 0);
    assert_int_equal(kern_memset(be, kv.v, 0, 2 * kv.layer_bytes), 0);
    assert_int_equal(kern_upload(be, kd, p->k_tok, p->n_tok * row * sizeof(float)), 0);
    assert_int_equal(kern_upload(be, vd, p->v_tok, p->n_tok * row * sizeof(float)), 0);
    assert_int_equal(kern_kv_append(be, &kv, 1, kd, vd, p->slots, p->n_tok), 0);
    assert_int_equal(kern_sync(be), 0);
    kern_free(be, kd);
    kern_free(be, vd);
    return kv;
}

/* Runs the batch with pattern pt (NULL: dense) on be into out; returns
 * kern_attention's result. */
static int
run(kern_backend_t *be, const pdata_t *p, const pat_t *pt, float *out)
{
    kern_kv_t kv = pkv_make(be, p);
    size_t qn = (size_t)p->n_q * p->n_heads * p->d;
    float *qd = kern_alloc(be, qn * sizeof(float)), *od = kern_alloc(be, qn * sizeof(float));
    assert_true(qd && od);
    assert_int_equal(kern_upload(be, qd, p->q, qn * sizeof(float)), 0);
    assert_int_equal(kern_memset(be, od, 0xff, qn * sizeof(float)), 0); /* NaN */
    kern_attn_args_t a = pat_args(p, pt);
    a.q = qd;
    a.out = od;
    a.kv = &kv;
    uint8_t *md = NULL;
    if (pt && pt->in_be && pt->mask) {
        const uint32_t qb = pt->qb ? pt->qb : 1;
        const size_t mb = (size_t)((p->n_q + qb - 1) / qb) * pt->stride;
        md = kern_alloc(be, mb);
        assert_non_null(md);
        assert_int_equal(kern_upload(be, md, pt->mask, mb), 0);
        a.block_mask = md;
        a.mask_in_backend = true;
    }
    int rc = kern_attention(be, &a);
    assert_int_equal(kern_sync(be), 0);
    if (rc == 0)
        assert_int_equal(kern_download(be, out, od, qn * sizeof(float)), 0);
    kern_free(be, md);
    kern_free(be, kv.k);
    kern_free(be, kv.v);
    kern_free(be, qd);
    kern_free(be, od);
    return rc;
}

/* Whether row i (causal limit len), KV head g, sees key j, from kern.h's
 * definition. */
static bool
sees(const pdata_t *p, const pat_t *pt, uint32_t i, uint32_t g, int32_t len, int32_t j)
{
    if (pt == NULL || (pt->window == 0 && pt->mask == NULL) || (pt->dense && pt->dense[i]))
        return true;
    bool in_sink = (uint32_t)j < pt->sinks;
    bool in_window = pt->window > 0 && (int64_t)j + pt->window >= len;
    uint32_t qb = pt->qb ? pt->qb : 1;
    bool in_mask =
        pt->mask && pt->mask[(i / qb) * pt->stride + g * pt->hstride + (uint32_t)j / p->bt];
    return in_sink || in_window || in_mask;
}

/* Masked-dense attention in double straight from the token arrays. */
static void
masked_dense(const pdata_t *p, const pat_t *pt, float *out)
{
    uint32_t group = p->n_heads / p->n_kv;
    double *w = malloc(((size_t)p->n_tok + p->d) * sizeof(double));
    assert_non_null(w);
    double *acc = w + p->n_tok;
    for (uint32_t s = 0; s < p->n_seqs; s++) {
        for (int32_t i = p->q_indptr[s]; i < p->q_indptr[s + 1]; i++) {
            int32_t len = p->kv_len[i];
            for (uint32_t h = 0; h < p->n_heads; h++) {
                const float *q = p->q + ((size_t)i * p->n_heads + h) * p->d;
                double mx = -INFINITY, sum = 0.0;
                for (int32_t j = 0; j < len; j++) {
                    const float *k =
                        p->k_tok + ((size_t)(p->tok0[s] + j) * p->n_kv + h / group) * p->d;
                    double dot = 0.0;
                    for (uint32_t c = 0; c < p->d; c++)
                        dot += (double)q[c] * k[c];
                    w[j] = sees(p, pt, (uint32_t)i, h / group, len, j) ? dot * p->scale : -INFINITY;
                    mx = w[j] > mx ? w[j] : mx;
                }
                assert_true(mx > -INFINITY);
                memset(acc, 0, p->d * sizeof(double));
                for (int32_t j = 0; j < len; j++) {
                    double e = exp(w[j] - mx);
                    const float *v =
                        p->v_tok + ((size_t)(p->tok0[s] + j) * p->n_kv + h / group) * p->d;
                    sum += e;
                    for (uint32_t c = 0; c < p->d; c++)
                        acc[c] += e * v[c];
                }
                float *o = out + ((size_t)i * p->n_heads + h) * p->d;
                for (uint32_t c = 0; c < p->d; c++)
                    o[c] = (float)(acc[c] / sum);
            }
        }
    }
    free(w);
}

/* A mask with keep probability keep_pct %, a mask row per group of qb
 * query rows at least the widest sequence's block count wide, or with
 * `heads` one that wide per KV head (mask_head_stride), maybe with some
 * slack; mask-only rows get the block of their last key kept so no row
 * (or head) is empty. */
static void
pat_mask(const pdata_t *p, pat_t *pt, uint32_t qb, uint32_t keep_pct, bool ensure, bool heads)
{
    int32_t mx = 0;
    for (uint32_t s = 0; s < p->n_seqs; s++)
        mx = p->len[s] > mx ? p->len[s] : mx;
    const uint32_t width = (uint32_t)(mx + (int32_t)p->bt - 1) / p->bt + (rng_u32() % 3);
    const uint32_t nh = heads ? p->n_kv : 1;
    pt->qb = qb;
    pt->hstride = heads ? width : 0;
    pt->stride = heads ? nh * width + rng_u32() % 3 : width;
    size_t n_rows = (p->n_q + (qb ? qb : 1) - 1) / (qb ? qb : 1);
    pt->mask = malloc(n_rows * pt->stride);
    assert_non_null(pt->mask);
    for (size_t i = 0; i < n_rows * pt->stride; i++)
        pt->mask[i] = rng_u32() % 100 < keep_pct ? (uint8_t)(1 + rng_u32() % 255) : 0;
    for (uint32_t i = 0; ensure && i < p->n_q; i++)
        for (uint32_t g = 0; g < nh; g++)
            pt->mask[(i / (qb ? qb : 1)) * pt->stride + g * pt->hstride +
                     (uint32_t)(p->kv_len[i] - 1) / p->bt] = 1;
}

static void
pat_free(pat_t *pt)
{
    free(pt->mask);
    free(pt->dense);
    memset(pt, 0, sizeof(*pt));
}

/* What cuda may differ from ref by in sequence s: its tensor-core prefill
 * (F16 KV, head_dim 64 or 128, sequences of more than one row) rounds q
 * and the softmax weights to f16; its other paths sum in f32. */
static double
cuda_limit(const pdata_t *p, uint32_t s)
{
    bool tc = p->dtype == KERN_F16 && (p->d == 64 || p->d == 128) &&
              p->q_indptr[s + 1] - p->q_indptr[s] > 1;
    return tc ? 5e-3 : 1e-5;
}

/* cuda vs ref's output yr, sequence by sequence (yb: scratch). */
static void
check_cuda(const pdata_t *p, const pat_t *pt, const float *yr, float *yb, const char *what)
{
    if (!g_cuda)
        return;
    assert_int_equal(run(g_cuda, p, pt, yb), 0);
    size_t per_row = (size_t)p->n_heads * p->d;
    for (uint32_t s = 0; s < p->n_seqs; s++) {
        size_t r0 = (size_t)p->q_indptr[s], nr = (size_t)(p->q_indptr[s + 1] - p->q_indptr[s]);
        char w[160];
        snprintf(w, sizeof(w), "%s seq %u", what, s);
        check_close(yr + r0 * per_row, yb + r0 * per_row, nr * per_row, cuda_limit(p, s), w,
                    "cuda");
    }
}

/* The pattern with its mask as kern_block_select leaves one in backend
 * memory: a window, and head rows side by side with no slack. */
static bool
pat_in_be(const pdata_t *p, const pat_t *pt, pat_t *out)
{
    if (pt == NULL || pt->mask == NULL || pt->window == 0)
        return false;
    *out = *pt;
    out->in_be = true;
    if (pt->hstride == 0)
        return true;
    const uint32_t qb = pt->qb ? pt->qb : 1, n_rows = (p->n_q + qb - 1) / qb;
    out->stride = p->n_kv * pt->hstride;
    out->mask = malloc((size_t)n_rows * out->stride);
    assert_non_null(out->mask);
    for (uint32_t r = 0; r < n_rows; r++)
        memcpy(out->mask + (size_t)r * out->stride, pt->mask + (size_t)r * pt->stride, out->stride);
    return true;
}

/* ref vs the masked-dense double reference, then every cpu configuration
 * and cuda vs ref; with a window, again with the mask in backend memory. */
static void
check_pattern(const pdata_t *p, const pat_t *pt, const char *what)
{
    size_t qn = (size_t)p->n_q * p->n_heads * p->d;
    float *want = malloc(qn * sizeof(float)), *yr = malloc(qn * sizeof(float)),
          *yb = malloc(qn * sizeof(float));
    assert_true(want && yr && yb);
    masked_dense(p, pt, want);
    assert_int_equal(run(g_ref, p, pt, yr), 0);
    check_close(want, yr, qn, 1e-5, what, "ref vs masked dense");
    for (int i = 0; i < g_n_be; i++) {
        assert_int_equal(run(g_be[i].be, p, pt, yb), 0);
        check_close(yr, yb, qn, 1e-5, what, g_be[i].label);
    }
    check_cuda(p, pt, yr, yb, what);
    pat_t pb;
    if (pat_in_be(p, pt, &pb)) {
        char w[160];
        snprintf(w, sizeof(w), "%s, mask in backend memory", what);
        assert_int_equal(run(g_ref, p, &pb, yb), 0);
        check_close(yr, yb, qn, 0.0, w, "ref");
        assert_int_equal(run(g_be[0].be, p, &pb, yb), 0);
        check_close(yr, yb, qn, 1e-5, w, g_be[0].label);
        check_cuda(p, &pb, yr, yb, w);
        if (pb.mask != pt->mask)
            free(pb.mask);
    }
    free(want);
    free(yr);
    free(yb);
}

/* ---- tests --------------------------------------------------------------- */

static const uint32_t ratios[] = {1, 4, 8};

/* Random shapes, each with a sink + window, a mask (alone, with sinks,
 * with a window), and dense rows every gamma-th row plus a tail. */
static void
test_random_patterns(void **state)
{
    (void)state;
    rng_seed(21);
    for (int iter = 0; iter < 36; iter++) {
        static const uint32_t bts[] = {1, 4, 16}, dims[] = {32, 64, 128, 20};
        uint32_t bt = bts[rng_u32() % 3], d = dims[rng_u32() % 4];
        uint32_t n_kv = 1 + rng_u32() % 2, n_heads = n_kv * ratios[iter % 3];
        uint32_t n_seqs = 1 + rng_u32() % MAX_SEQS;
        int32_t len[MAX_SEQS], rows[MAX_SEQS], back[MAX_SEQS];
        for (uint32_t s = 0; s < n_seqs; s++) {
            len[s] = 1 + (int32_t)(rng_u32() % 260);
            if (rng_u32() % 2) /* last block full */
                len[s] = (len[s] + (int32_t)bt - 1) / (int32_t)bt * (int32_t)bt;
            int kind = (int)(rng_u32() % 3); /* decode, prefill, chunk */
            back[s] = kind == 2 ? (int32_t)(rng_u32() % (uint32_t)len[s]) : 0;
            int32_t room = len[s] - back[s];
            rows[s] = kind == 0 ? 1 : 1 + (int32_t)(rng_u32() % (uint32_t)(room < 48 ? room : 48));
        }
        pdata_t p;
        pdata_build(&p, iter % 2 ? KERN_F16 : KERN_F32, bt, d, n_heads, n_kv, n_seqs, len, rows,
                    back);
        char what[96];
        pat_t pt = {.sinks = rng_u32() % 9, .window = 1 + rng_u32() % 64};
        snprintf(what, sizeof(what), "iter %d sink %u window %u", iter, pt.sinks, pt.window);
        check_pattern(&p, &pt, what);

        /* Masks per KV head, then one for every head (kept below). */
        pat_t pm = {0};
        for (int heads = 1; heads >= 0; heads--) {
            const char *kind = heads ? "mask per head" : "mask";
            pat_free(&pm);
            pat_mask(&p, &pm, 1 + rng_u32() % 5, 40, true, heads);
            snprintf(what, sizeof(what), "iter %d %s qb %u", iter, kind, pm.qb);
            check_pattern(&p, &pm, what);
            pat_free(&pm);
            pat_mask(&p, &pm, rng_u32() % 3, 30, false, heads);
            pm.sinks = 1 + rng_u32() % 6;
            snprintf(what, sizeof(what), "iter %d %s + sinks %u", iter, kind, pm.sinks);
            check_pattern(&p, &pm, what);
            pm.window = 1 + rng_u32() % 40;
            snprintf(what, sizeof(what), "iter %d %s + sinks + window %u", iter, kind, pm.window);
            check_pattern(&p, &pm, what);
        }

        /* Delta Attention's layout: every gamma-th row and a tail dense. */
        uint32_t gamma = 1 + rng_u32() % 8, tail = rng_u32() % 5;
        pm.dense = calloc(p.n_q, 1);
        assert_non_null(pm.dense);
        for (uint32_t i = 0; i < p.n_q; i++)
            pm.dense[i] = i % gamma == 0 || i + tail >= p.n_q;
        snprintf(what, sizeof(what), "iter %d mask + window + dense rows", iter);
        check_pattern(&p, &pm, what);
        pt.dense = pm.dense;
        pm.dense = NULL;
        snprintf(what, sizeof(what), "iter %d sink + window + dense rows", iter);
        check_pattern(&p, &pt, what);
        pat_free(&pt);
        pat_free(&pm);
        pdata_free(&p);
    }
}

/* Decode rows over long KV: few items, so the cpu backend splits keys. */
static void
test_split_k_decode(void **state)
{
    (void)state;
    rng_seed(22);
    for (int r = 0; r < 3; r++) {
        int32_t len[2] = {3000 - r * 7, 700}, rows[2] = {1, 2}, back[2] = {0, 0};
        pdata_t p;
        pdata_build(&p, r == 1 ? KERN_F16 : KERN_F32, 16, 128, 2 * ratios[r], 2, 2, len, rows,
                    back);
        pat_t pt = {.sinks = 4, .window = 100 + 37 * (uint32_t)r};
        check_pattern(&p, &pt, "split-K sink + window");
        pat_t pm = {0};
        pat_mask(&p, &pm, 1, 10, true, false);
        check_pattern(&p, &pm, "split-K mask");
        pm.window = 64;
        pm.sinks = 16;
        check_pattern(&p, &pm, "split-K mask + sinks + window");
        pat_free(&pt);
        pat_free(&pm);
        pdata_free(&p);
    }
}

/* cuda at the shapes its tensor-core prefill tiles: F16 KV, head_dim 64
 * and 128, GQA 1, 4, 8 and 7 (64 / group rows per tile), block_tokens 16,
 * 7 and 1, chunks of more rows than a tile and more keys than a KV tile
 * (64), last blocks full or holding one key, beside decode rows and a long
 * split-KV decode row, under every pattern; a window or mask row group
 * that straddles tiles. */
static void
test_cuda_patterns(void **state)
{
    (void)state;
    if (!g_cuda) {
        print_message("cuda patterns: skipped (cuda not available)\n");
        return;
    }
    rng_seed(26);
    static const uint32_t groups[] = {1, 4, 8, 7}, bts[] = {16, 7, 16, 1};
    static const uint32_t qbs[] = {1, 3, 16, 64};
    for (int iter = 0; iter < 16; iter++) {
        /* Every group meets every block size and both head dims. */
        uint32_t bt = bts[(iter / 4) % 4], d = (iter + iter / 4) % 2 ? 128 : 64;
        uint32_t group = groups[iter % 4], n_kv = group > 4 ? 1 : 1 + rng_u32() % 2;
        uint32_t n_seqs = 1 + rng_u32() % MAX_SEQS;
        int32_t len[MAX_SEQS], rows[MAX_SEQS], back[MAX_SEQS];
        for (uint32_t s = 0; s < n_seqs; s++) {
            len[s] = 1 + (int32_t)(rng_u32() % 400);
            uint32_t tail = rng_u32() % 3; /* last block full, one key, or anything */
            if (tail == 0)
                len[s] = (len[s] + (int32_t)bt - 1) / (int32_t)bt * (int32_t)bt;
            else if (tail == 1)
                len[s] = len[s] / (int32_t)bt * (int32_t)bt + 1;
            int kind = (int)(rng_u32() % 3); /* decode, prefill, chunk */
            back[s] = kind == 2 ? (int32_t)(rng_u32() % (uint32_t)len[s]) : 0;
            int32_t room = len[s] - back[s];
            rows[s] =
                kind == 0 ? 1 : 1 + (int32_t)(rng_u32() % (uint32_t)(room < 140 ? room : 140));
        }
        if (iter % 5 == 4) { /* a long decode row: split-KV beside the tiles */
            len[0] = 4000 + (int32_t)(rng_u32() % 500);
            rows[0] = 1;
            back[0] = 0;
        }
        pdata_t p;
        pdata_build(&p, KERN_F16, bt, d, n_kv * group, n_kv, n_seqs, len, rows, back);
        size_t qn = (size_t)p.n_q * p.n_heads * p.d;
        float *yr = malloc(qn * sizeof(float)), *yb = malloc(qn * sizeof(float));
        assert_true(yr && yb);
        char what[128];

        pat_t pts[5] = {
            {.sinks = rng_u32() % 9, .window = 1 + rng_u32() % 200}, {0}, {0}, {0}, {0}};
        pat_mask(&p, &pts[1], qbs[rng_u32() % 4], 35, true, false);
        pat_mask(&p, &pts[2], qbs[rng_u32() % 4], 25, false, false);
        pts[2].sinks = 1 + rng_u32() % 20;
        pts[2].window = 1 + rng_u32() % 100;
        pat_mask(&p, &pts[3], 1, 50, true, false);
        pts[3].dense = calloc(p.n_q, 1);
        assert_non_null(pts[3].dense);
        uint32_t gamma = 1 + rng_u32() % 16;
        for (uint32_t i = 0; i < p.n_q; i++)
            pts[3].dense[i] = i % gamma == 0 || i + 4 >= p.n_q;
        pat_mask(&p, &pts[4], qbs[rng_u32() % 4], 35, true, true);
        static const char *names[] = {"sink + window", "mask", "mask + sinks + window",
                                      "mask + dense rows", "mask per head"};
        for (int k = -1; k < 5; k++) {
            const pat_t *pt = k < 0 ? NULL : &pts[k];
            snprintf(what, sizeof(what), "cuda iter %d bt %u d %u group %u %s", iter, bt, d, group,
                     k < 0 ? "dense" : names[k]);
            assert_int_equal(run(g_ref, &p, pt, yr), 0);
            check_cuda(&p, pt, yr, yb, what);
        }
        for (int k = 0; k < 5; k++)
            pat_free(&pts[k]);
        free(yr);
        free(yb);
        pdata_free(&p);
    }
}

/* Patterns that keep every key must give the dense output. */
static void
test_degenerate_equals_dense(void **state)
{
    (void)state;
    rng_seed(23);
    for (int iter = 0; iter < 9; iter++) {
        int32_t len[3] = {200 + iter, 37, 16}, rows[3] = {64, 1, 5}, back[3] = {0, 0, 9};
        pdata_t p;
        pdata_build(&p, iter % 2 ? KERN_F16 : KERN_F32, iter % 3 == 0 ? 4 : 16, 64,
                    2 * ratios[iter % 3], 2, 3, len, rows, back);
        size_t qn = (size_t)p.n_q * p.n_heads * p.d;
        float *dense = malloc(qn * sizeof(float)), *got = malloc(qn * sizeof(float));
        assert_true(dense && got);
        pat_t wide = {.sinks = 3, .window = 209 + (uint32_t)iter * 50}; /* >= every kv_len */
        pat_t ones = {0};
        pat_mask(&p, &ones, 1 + (uint32_t)iter % 4, 100, false, iter % 2);
        pat_t all_dense = {.window = 1, .sinks = 1};
        pat_mask(&p, &all_dense, 1, 0, true, false);
        all_dense.dense = malloc(p.n_q);
        assert_non_null(all_dense.dense);
        memset(all_dense.dense, 1, p.n_q);
        /* Sinks past every position, the count beyond INT32_MAX (a
         * split plan that read it as signed planned too few keys). */
        pat_t sinks = {.sinks = UINT32_MAX - (uint32_t)iter, .window = 1 + (uint32_t)iter};
        const pat_t *pats[] = {&wide, &ones, &all_dense, &sinks};
        static const char *names[] = {"window >= N", "mask all ones", "all rows dense",
                                      "sinks >= N"};
        /* b == g_n_be: cuda, whose kernels may visit the kept keys in
         * other groups than dense does (sums in another order). */
        for (int b = -1; b <= g_n_be; b++) {
            const char *label;
            kern_backend_t *be = be_at(b, &label);
            if (be == NULL)
                break;
            assert_int_equal(run(be, &p, NULL, dense), 0);
            for (int k = 0; k < 4; k++) {
                assert_int_equal(run(be, &p, pats[k], got), 0);
                check_close(dense, got, qn, b == g_n_be ? 1e-5 : 1e-6, names[k], label);
            }
        }
        free(dense);
        free(got);
        pat_free(&wide);
        pat_free(&ones);
        pat_free(&all_dense);
        pdata_free(&p);
    }
}

/* A sink + window row equals dense attention over a KV holding only the
 * keys it may see, in order (a check of the semantics that does not go
 * through any masking code). */
static void
test_window_is_dense_over_kept_keys(void **state)
{
    (void)state;
    rng_seed(24);
    for (int iter = 0; iter < 6; iter++) {
        uint32_t bt = iter % 2 ? 16 : 4, sinks = (uint32_t)iter % 5,
                 window = 10 + 9 * (uint32_t)iter;
        int32_t len[1] = {150 + 13 * iter}, rows[1] = {40}, back[1] = {iter % 2 ? 20 : 0};
        pdata_t p;
        pdata_build(&p, iter % 3 ? KERN_F32 : KERN_F16, bt, 64, 2 * ratios[iter % 3], 2, 1, len,
                    rows, back);
        size_t per_row = (size_t)p.n_heads * p.d, row = (size_t)p.n_kv * p.d;
        float *sparse = malloc(p.n_q * per_row * sizeof(float));
        assert_non_null(sparse);
        pat_t pt = {.sinks = sinks, .window = window};
        /* b == g_n_be: cuda, where the 40-row chunk may run on the
         * tensor cores (f16) and each one-row check on the f32 path. */
        for (int b = -1; b <= g_n_be; b++) {
            const char *label;
            kern_backend_t *be = be_at(b, &label);
            if (be == NULL)
                break;
            double limit = b == g_n_be ? cuda_limit(&p, 0) : 1e-5;
            assert_int_equal(run(be, &p, &pt, sparse), 0);
            for (uint32_t i = 0; i < p.n_q; i += 7) {
                /* One sequence, one row: the kept keys only. */
                int32_t L = p.kv_len[i], n = 0;
                int32_t kept_len[1], q_rows[1] = {1}, no_back[1] = {0};
                for (int32_t j = 0; j < L; j++)
                    n += (uint32_t)j < sinks || j + (int32_t)window >= L;
                kept_len[0] = n;
                pdata_t k;
                pdata_build(&k, p.dtype, bt, p.d, p.n_heads, p.n_kv, 1, kept_len, q_rows, no_back);
                n = 0;
                for (int32_t j = 0; j < L; j++) {
                    if (!((uint32_t)j < sinks || j + (int32_t)window >= L))
                        continue;
                    memcpy(k.k_tok + (size_t)n * row, p.k_tok + (size_t)j * row,
                           row * sizeof(float));
                    memcpy(k.v_tok + (size_t)n * row, p.v_tok + (size_t)j * row,
                           row * sizeof(float));
                    n++;
                }
                memcpy(k.q, p.q + i * per_row, per_row * sizeof(float));
                float *dense = malloc(per_row * sizeof(float));
                assert_non_null(dense);
                assert_int_equal(run(be, &k, NULL, dense), 0);
                char what[64];
                snprintf(what, sizeof(what), "row %u window %u sinks %u", i, window, sinks);
                check_close(dense, sparse + i * per_row, per_row, limit, what, label);
                free(dense);
                pdata_free(&k);
            }
        }
        free(sparse);
        pdata_free(&p);
    }
}

static void
test_pattern_validation(void **state)
{
    (void)state;
    rng_seed(25);
    int32_t len[2] = {40, 9}, rows[2] = {8, 1}, back[2] = {0, 0};
    pdata_t p;
    pdata_build(&p, KERN_F32, 4, 32, 4, 2, 2, len, rows, back);
    size_t qn = (size_t)p.n_q * p.n_heads * p.d;
    float *out = malloc(qn * sizeof(float));
    assert_non_null(out);
    kern_backend_t *bes[] = {g_ref, g_be[0].be, g_cuda};
    for (int b = 0; b < (g_cuda ? 3 : 2); b++) {
        kern_backend_t *be = bes[b];
        pat_t pt = {.sinks = 4}; /* sinks alone would be dense */
        assert_int_equal(run(be, &p, &pt, out), KVS_EINVAL);
        pt.window = 8;
        assert_int_equal(run(be, &p, &pt, out), 0);
        pat_t pm = {0};
        pat_mask(&p, &pm, 1, 100, false, false);
        pm.stride = 0;
        assert_int_equal(run(be, &p, &pm, out), KVS_EINVAL);
        pm.stride = 9; /* 40 keys / 4 = 10 blocks */
        assert_int_equal(run(be, &p, &pm, out), KVS_EINVAL);
        pm.stride = 10;
        assert_int_equal(run(be, &p, &pm, out), 0);
        /* Row 3 (kv_len 36, blocks 0..8) with nothing kept: no key to see... */
        memset(pm.mask + 3 * pm.stride, 0, pm.stride);
        assert_int_equal(run(be, &p, &pm, out), KVS_EINVAL);
        /* ...unless a sink, a window or dense_rows gives it some. */
        pm.sinks = 1;
        assert_int_equal(run(be, &p, &pm, out), 0);
        pm.sinks = 0;
        pm.window = 1;
        assert_int_equal(run(be, &p, &pm, out), 0);
        pm.window = 0;
        pm.dense = calloc(p.n_q, 1);
        assert_non_null(pm.dense);
        pm.dense[3] = 1;
        assert_int_equal(run(be, &p, &pm, out), 0);
        /* Keys past the row's causal limit do not count. */
        pm.dense[3] = 0;
        pm.mask[3 * pm.stride + 9] = 1;
        assert_int_equal(run(be, &p, &pm, out), KVS_EINVAL);
        /* A mask per KV head (2 here): each head as wide as a row's
         * blocks, the row holding both, and no head without a key. */
        pat_t ph = {0};
        pat_mask(&p, &ph, 1, 100, false, true);
        ph.hstride = 9;
        assert_int_equal(run(be, &p, &ph, out), KVS_EINVAL);
        ph.hstride = 10;
        ph.stride = 19;
        assert_int_equal(run(be, &p, &ph, out), KVS_EINVAL);
        ph.stride = 20;
        assert_int_equal(run(be, &p, &ph, out), 0);
        memset(ph.mask + 3 * ph.stride + 10, 0, 10); /* row 3, head 1 */
        assert_int_equal(run(be, &p, &ph, out), KVS_EINVAL);
        ph.window = 1;
        assert_int_equal(run(be, &p, &ph, out), 0);
        /* In backend memory: head rows side by side, and a window, since
         * kern_attention cannot look into the mask for an empty row. */
        ph.in_be = true;
        ph.mask = realloc(ph.mask, 21 * (size_t)p.n_q); /* what run uploads */
        assert_non_null(ph.mask);
        ph.stride = 21;
        assert_int_equal(run(be, &p, &ph, out), KVS_EINVAL);
        ph.stride = 20;
        assert_int_equal(run(be, &p, &ph, out), 0);
        ph.window = 0;
        memset(ph.mask, 1, 20 * (size_t)p.n_q);
        assert_int_equal(run(be, &p, &ph, out), KVS_EINVAL);
        pat_free(&ph);
        pat_free(&pt);
        pat_free(&pm);
    }
    free(out);
    pdata_free(&p);
}

/* Delta Attention's invariants over a real sparse and dense kernel pass
 * (algorithms.md 1.6): the first row of every gamma block equals dense, the
 * correction is constant inside a block, the tail is dense, gamma 1 is
 * dense everywhere. */
static void
test_delta_invariants(void **state)
{
    (void)state;
    rng_seed(77);
    const int32_t n = 300, zero = 0;
    pdata_t p;
    pdata_build(&p, KERN_F32, 16, 32, 8, 2, 1, &n, &n, &zero);
    size_t w = (size_t)p.n_heads * p.d;
    float *sp = malloc(n * w * sizeof(float)), *dn = malloc(n * w * sizeof(float));
    float *out = malloc(n * w * sizeof(float)), *dr = malloc(n * w * sizeof(float));
    int32_t *rows = malloc(n * sizeof(int32_t));
    assert_true(sp && dn && out && dr && rows);
    pat_t pt = {.sinks = 4, .window = 16};
    assert_int_equal(run(g_be[0].be, &p, &pt, sp), 0);
    assert_int_equal(run(g_be[0].be, &p, NULL, dn), 0);
    const model_attn_policy_t pols[] = {
        {.kind = MODEL_ATTN_DELTA, .sinks = 4, .window = 16, .gamma = 16},
        {.kind = MODEL_ATTN_DELTA, .sinks = 4, .window = 16, .gamma = 64},
        {.kind = MODEL_ATTN_DELTA, .sinks = 4, .window = 16, .gamma = 16, .no_tail = true},
        {.kind = MODEL_ATTN_DELTA, .sinks = 4, .window = 16, .gamma = 1, .no_tail = true},
    };
    for (size_t k = 0; k < sizeof pols / sizeof pols[0]; k++) {
        const model_attn_policy_t *pol = &pols[k];
        uint32_t nd = model_delta_rows((uint32_t)n, pol, rows);
        for (uint32_t i = 0; i < nd; i++)
            memcpy(dr + i * w, dn + (size_t)rows[i] * w, w * sizeof(float));
        memcpy(out, sp, n * w * sizeof(float));
        uint32_t g = pol->gamma, tail = model_delta_tail((uint32_t)n, pol);
        assert_int_equal(kern_delta_apply(g_ref, out, dr, (uint32_t)n, (uint32_t)w, g, tail), 0);
        if (g_cuda) { /* the device's two passes give the same bits */
            size_t ob = n * w * sizeof(float), db = nd * w * sizeof(float);
            float *d_out = kern_alloc(g_cuda, ob), *d_dr = kern_alloc(g_cuda, db);
            float *got = malloc(ob);
            assert_true(d_out && d_dr && got);
            for (uint32_t i = 0; i < nd; i++)
                memcpy(got + i * w, dn + (size_t)rows[i] * w, w * sizeof(float));
            assert_int_equal(kern_upload(g_cuda, d_dr, got, db), 0);
            assert_int_equal(kern_upload(g_cuda, d_out, sp, ob), 0);
            assert_int_equal(
                kern_delta_apply(g_cuda, d_out, d_dr, (uint32_t)n, (uint32_t)w, g, tail), 0);
            assert_int_equal(kern_download(g_cuda, got, d_out, ob), 0);
            assert_memory_equal(got, out, ob);
            kern_free(g_cuda, d_out);
            kern_free(g_cuda, d_dr);
            free(got);
        }
        assert_int_equal(tail, pol->no_tail ? 0 : (uint32_t)n % g + (g > 128 ? g : 128));
        uint32_t ns = (uint32_t)n - tail;
        for (uint32_t r = 0; r < (uint32_t)n; r++) {
            uint32_t b0 = r / g * g;
            for (size_t c = 0; c < w; c++) {
                float o = out[r * w + c];
                if (r >= ns) { /* the tail: dense, bit for bit */
                    assert_true(o == dn[r * w + c]);
                } else if (r == b0) { /* block start: dense up to rounding */
                    assert_true(fabsf(o - dn[r * w + c]) <= 1e-6f * (1 + fabsf(dn[r * w + c])));
                } else { /* the block start's correction, carried forward */
                    float want = dn[b0 * w + c] - sp[b0 * w + c];
                    float got = o - sp[r * w + c];
                    assert_true(fabsf(got - want) <= 1e-6f * (1 + fabsf(o)));
                }
            }
        }
    }
    free(sp);
    free(dn);
    free(out);
    free(dr);
    free(rows);
    pdata_free(&p);
}

/* ---- Quest bounds (kern_kv_block_bounds, kern_block_scores) ------------- */

/* a's scores (sn floats, NaN first, so unwritten ones show) into host. */
static void
scores_to_host(kern_backend_t *be, const kern_block_score_args_t *a, size_t sn, float *host)
{
    assert_int_equal(kern_memset(be, a->score, 0xff, sn * sizeof(float)), 0);
    assert_int_equal(kern_block_scores(be, a), 0);
    assert_int_equal(kern_sync(be), 0);
    assert_int_equal(kern_download(be, host, a->score, sn * sizeof(float)), 0);
}

/* Sequence 0's first nb blocks summarised on be, and every query row
 * scored in groups of qg rows (per KV head, or not) against them, or with
 * sub > 0 against the first sub of them (kern.h: bounds_stride) into
 * score rows still nb apart (score_stride).  With
 * `store`, summarised by block id into rows of the pool's size
 * (kern_kv_pool_bounds) and scored from there (bounds_rows); `bounds`
 * gets the sequence's rows, in its order, either way.  With `count` (and
 * `store`), each query group scores a list of its own (bounds_indptr):
 * count[grp] of the nb blocks from block grp % nb on, into score rows nb
 * apart. */
static void
run_quest(kern_backend_t *be, const pdata_t *p, uint32_t nb, uint32_t sub, uint32_t qg,
          bool per_head, bool store, size_t sn, uint16_t *bounds, float *score,
          const uint32_t *count)
{
    kern_kv_t kv = pkv_make(be, p);
    const uint32_t n_groups = (p->n_q + (qg ? qg : 1) - 1) / (qg ? qg : 1);
    uint32_t *indptr = malloc((n_groups + 1) * sizeof *indptr);
    int32_t *list = malloc(((size_t)n_groups * nb + 1) * sizeof *list);
    assert_true(indptr && list);
    for (size_t i = 0; i <= (size_t)n_groups * nb; i++)
        list[i] = p->indices[i % nb]; /* every entry a block, whatever a check reads */
    indptr[0] = 0;
    for (uint32_t grp = 0; count && grp < n_groups; grp++) {
        for (uint32_t b = 0; b < count[grp]; b++)
            list[indptr[grp] + b] = p->indices[(b + grp) % nb];
        indptr[grp + 1] = indptr[grp] + count[grp];
    }
    const size_t w = 2 * (size_t)p->d, rows = store ? p->n_blocks : nb;
    const size_t qn = (size_t)p->n_q * p->n_heads * p->d, bn = (size_t)p->n_kv * rows * w;
    kern_block_score_args_t a = {.n_q = p->n_q,
                                 .n_heads = p->n_heads,
                                 .n_kv_heads = p->n_kv,
                                 .head_dim = p->d,
                                 .n_blocks = sub ? sub : nb,
                                 .bounds_stride = store ? p->n_blocks
                                                  : sub ? nb
                                                        : 0,
                                 .bounds_rows = store ? p->indices : NULL,
                                 .bounds_indptr = count ? indptr : NULL,
                                 .q_group = qg,
                                 .per_kv_head = per_head,
                                 .score_stride = sub || count ? nb : 0};
    if (count)
        a.bounds_rows = list;
    float *qd = kern_alloc(be, qn * sizeof(float));
    uint16_t *bd = kern_alloc(be, bn * sizeof(uint16_t));
    float *sd = kern_alloc(be, sn * sizeof(float));
    float *wd = kern_alloc(be, kern_block_scores_work(&a) * sizeof(float));
    uint16_t *all = malloc(bn * sizeof(uint16_t));
    assert_true(qd && bd && sd && wd && all);
    assert_int_equal(kern_upload(be, qd, p->q, qn * sizeof(float)), 0);
    assert_int_equal(kern_memset(be, bd, 0xff, bn * sizeof(uint16_t)), 0); /* NaN */
    if (store)
        assert_int_equal(kern_kv_pool_bounds(be, &kv, 1, p->indices, nb, bd), 0);
    else
        assert_int_equal(kern_kv_block_bounds(be, &kv, 1, p->indices, nb, bd), 0);
    a.q = qd;
    a.bounds = bd;
    a.score = sd;
    a.work = wd;
    scores_to_host(be, &a, sn, score);
    assert_int_equal(kern_download(be, all, bd, bn * sizeof(uint16_t)), 0);
    if (count) {
        /* The same lists read from backend memory: the same scores. */
        const size_t ln = (size_t)indptr[n_groups] + 1, pn = (size_t)n_groups + 1;
        int32_t *ld = kern_alloc(be, ln * sizeof(int32_t));
        uint32_t *pd = kern_alloc(be, pn * sizeof(uint32_t));
        float *again = malloc(sn * sizeof(float));
        assert_true(ld && pd && again);
        assert_int_equal(kern_upload(be, ld, list, ln * sizeof(int32_t)), 0);
        assert_int_equal(kern_upload(be, pd, indptr, pn * sizeof(uint32_t)), 0);
        kern_block_score_args_t b = a;
        b.bounds_rows = ld;
        b.bounds_indptr = pd;
        b.lists_in_backend = true;
        scores_to_host(be, &b, sn, again);
        assert_memory_equal(again, score, sn * sizeof(float)); /* NaN where unwritten, too */
        b.bounds_stride = 0;                                   /* no rows to find them by */
        assert_int_equal(kern_block_scores(be, &b), KVS_EINVAL);
        kern_free(be, ld);
        kern_free(be, pd);
        free(again);
    }
    for (uint32_t g = 0; g < p->n_kv; g++)
        for (uint32_t i = 0; i < nb; i++)
            memcpy(bounds + ((size_t)g * nb + i) * w,
                   all + ((size_t)g * rows + (store ? (uint32_t)p->indices[i] : i)) * w,
                   w * sizeof(uint16_t));
    /* A store's other rows are left as they were. */
    for (uint32_t b = 0; store && b < p->n_blocks; b++) {
        bool listed = false;
        for (uint32_t i = 0; i < nb; i++)
            listed |= (uint32_t)p->indices[i] == b;
        for (uint32_t g = 0; !listed && g < p->n_kv; g++)
            assert_true(isnan(kvs_fp16_to_f32(all[((size_t)g * rows + b) * w])));
    }

    /* Refusals: a block id out of the pool, heads that do not group. */
    int32_t bad = (int32_t)p->n_blocks;
    assert_int_equal(kern_kv_block_bounds(be, &kv, 1, &bad, 1, bd), KVS_EINVAL);
    assert_int_equal(kern_kv_block_bounds(be, &kv, 2, p->indices, 1, bd), KVS_EINVAL);
    assert_int_equal(kern_kv_pool_bounds(be, &kv, 1, &bad, 1, bd), KVS_EINVAL);
    a.n_heads = p->n_kv + 1;
    assert_int_equal(kern_block_scores(be, &a), p->n_kv > 1 ? KVS_EINVAL : 0);
    a.n_heads = p->n_heads;
    const uint32_t ss = a.score_stride; /* score rows closer than a row's blocks */
    a.score_stride = a.n_blocks - 1;
    assert_int_equal(kern_block_scores(be, &a), a.score_stride ? KVS_EINVAL : 0);
    a.score_stride = ss;
    if (count) {
        /* A list longer than n_blocks, offsets that go back, a list with
         * no rows to find. */
        a.n_blocks = nb - 1;
        assert_int_equal(kern_block_scores(be, &a), nb > 1 && count[0] == nb ? KVS_EINVAL : 0);
        a.n_blocks = nb;
        indptr[0] = 1;
        assert_int_equal(kern_block_scores(be, &a), KVS_EINVAL);
        indptr[0] = 0;
        a.bounds_rows = NULL;
        assert_int_equal(kern_block_scores(be, &a), KVS_EINVAL);
        a.bounds_rows = list;
    }
    a.bounds_indptr = NULL; /* one list for what follows */
    a.n_blocks = sub ? sub : nb;
    if (store) {
        /* A row past the store, and rows with no stride to find them by. */
        int32_t far[1] = {(int32_t)p->n_blocks};
        const int32_t *rows0 = a.bounds_rows;
        uint32_t n0 = a.n_blocks;
        a.bounds_rows = far;
        a.n_blocks = 1;
        assert_int_equal(kern_block_scores(be, &a), KVS_EINVAL);
        a.bounds_rows = rows0;
        a.n_blocks = n0;
        a.bounds_stride = 0;
        assert_int_equal(kern_block_scores(be, &a), KVS_EINVAL);
    } else {
        a.bounds_stride = a.n_blocks - 1;
        assert_int_equal(kern_block_scores(be, &a), a.bounds_stride ? KVS_EINVAL : 0);
    }
    free(indptr);
    free(list);
    free(all);
    kern_free(be, kv.k);
    kern_free(be, kv.v);
    kern_free(be, qd);
    kern_free(be, bd);
    kern_free(be, sd);
    kern_free(be, wd);
}

/* The bounds against max/min taken straight from the token arrays (never
 * through the page table), exact on every backend; the scores against the
 * definition summed in double here; and Quest's point, checked on those:
 * no query row of a group has a logit against a key of a block above
 * the block's score. */
static void
test_quest_bounds(void **state)
{
    (void)state;
    static const struct {
        kern_dtype_t dtype;
        uint32_t bt, d, n_heads, n_kv;
        int32_t len, rows;
        uint32_t qg;
        bool wide; /* keys past f16's range and below its normals */
    } cases[] = {
        {KERN_F32, 16, 64, 8, 2, 300, 40, 16, false},
        {KERN_F16, 16, 128, 32, 8, 520, 33, 16, false},
        {KERN_F32, 5, 32, 4, 4, 97, 7, 3, false},
        {KERN_F16, 16, 64, 8, 1, 64, 1, 1, false},
        {KERN_F32, 8, 96, 6, 3, 200, 70, 0, false},
        /* The cpu backend's f16 fast path, with a head dim that leaves it
         * a tail of four. */
        {KERN_F16, 5, 20, 4, 2, 97, 7, 3, false},
        /* f16 summaries of f32 keys at the edges: saturated, subnormal,
         * zero; every backend's rounding the same bits. */
        {KERN_F32, 16, 36, 4, 2, 160, 9, 1, true},
    };
    rng_seed(31);
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        const int32_t back = 0;
        pdata_t p;
        pdata_build(&p, cases[ci].dtype, cases[ci].bt, cases[ci].d, cases[ci].n_heads,
                    cases[ci].n_kv, 1, &cases[ci].len, &cases[ci].rows, &back);
        for (size_t i = 0; cases[ci].wide && i < p.n_tok * p.n_kv * p.d; i++) {
            static const float scale[5] = {1e5f, 1e-6f, 3e-8f, 0.0f, 1.0f};
            p.k_tok[i] *= scale[(i * 7 + i / 5) % 5];
        }
        const uint32_t d = p.d, bt = p.bt, nb = (uint32_t)p.len[0] / bt, G = p.n_heads / p.n_kv;
        const uint32_t qg = cases[ci].qg ? cases[ci].qg : 1, n_groups = (p.n_q + qg - 1) / qg;
        const size_t bn = (size_t)p.n_kv * nb * 2 * d, sn = (size_t)n_groups * nb;
        const size_t snh = sn * p.n_kv, krow = (size_t)p.n_kv * d;
        uint16_t *want_b = malloc(bn * sizeof(uint16_t)), *got_b = malloc(bn * sizeof(uint16_t));
        float *want_s = malloc(sn * sizeof(float)), *got_s = malloc(snh * sizeof(float));
        float *want_h = malloc(snh * sizeof(float)), *wb = malloc(bn * sizeof(float));
        assert_true(want_b && want_s && got_b && got_s && want_h && wb);
        for (uint32_t g = 0; g < p.n_kv; g++)
            for (uint32_t b = 0; b < nb; b++)
                for (uint32_t e = 0; e < d; e++) {
                    float mx = -INFINITY, mn = INFINITY;
                    for (uint32_t t = 0; t < bt; t++) {
                        float x = p.k_tok[(p.tok0[0] + b * bt + t) * krow + g * d + e];
                        mx = x > mx ? x : mx;
                        mn = x < mn ? x : mn;
                    }
                    /* f16, the bound side of each value (kern.h) */
                    const size_t at = ((size_t)g * nb + b) * 2 * d + e;
                    want_b[at] = kvs_f32_to_fp16_dir(mx, true);
                    want_b[at + d] = kvs_f32_to_fp16_dir(mn, false);
                    wb[at] = kvs_fp16_to_f32(want_b[at]);
                    wb[at + d] = kvs_fp16_to_f32(want_b[at + d]);
                }
        for (size_t k = 0; k < sn; k++)
            want_s[k] = -INFINITY;
        for (size_t k = 0; k < snh; k++)
            want_h[k] = -INFINITY;
        for (uint32_t i = 0; i < p.n_q; i++)
            for (uint32_t h = 0; h < p.n_heads; h++) {
                const float *q = p.q + ((size_t)i * p.n_heads + h) * d;
                for (uint32_t b = 0; b < nb; b++) {
                    const float *mx = wb + ((size_t)(h / G) * nb + b) * 2 * d, *mn = mx + d;
                    double s = 0.0, top = -INFINITY;
                    for (uint32_t e = 0; e < d; e++)
                        s += fmax((double)q[e] * mx[e], (double)q[e] * mn[e]);
                    for (uint32_t t = 0; t < bt; t++) {
                        const float *k = p.k_tok + (p.tok0[0] + b * bt + t) * krow + (h / G) * d;
                        double l = 0.0;
                        for (uint32_t e = 0; e < d; e++)
                            l += (double)q[e] * k[e];
                        top = l > top ? l : top;
                    }
                    /* An upper bound, where the keys are in f16's range. */
                    assert_true(cases[ci].wide || top <= s + 1e-9 * (1.0 + fabs(s)));
                    float *w = want_s + (size_t)(i / qg) * nb + b;
                    *w = (float)s > *w ? (float)s : *w;
                    w = want_h + ((size_t)(i / qg) * p.n_kv + h / G) * nb + b;
                    *w = (float)s > *w ? (float)s : *w;
                }
            }
        char what[96];
        snprintf(what, sizeof(what), "quest case %zu: %u blocks, %u rows, G %u", ci, nb, p.n_q, G);
        for (int b = -1; b <= g_n_be; b++) {
            const char *label;
            kern_backend_t *be = be_at(b, &label);
            if (be == NULL)
                break;
            run_quest(be, &p, nb, 0, cases[ci].qg, false, false, sn, got_b, got_s, NULL);
            check_bytes_equal(want_b, got_b, bn * sizeof(uint16_t), what, label);
            /* cuda multiplies in TF32 (kern.h). */
            check_close(want_s, got_s, sn, b == g_n_be ? 5e-3 : 1e-5, what, label);
            char wh[160];
            snprintf(wh, sizeof(wh), "%s, per KV head", what);
            run_quest(be, &p, nb, 0, cases[ci].qg, true, false, snh, got_b, got_s, NULL);
            check_close(want_h, got_s, snh, b == g_n_be ? 5e-3 : 1e-5, wh, label);
            /* The same from a store kept by block id. */
            snprintf(wh, sizeof(wh), "%s, per KV head, from a store", what);
            run_quest(be, &p, nb, 0, cases[ci].qg, true, true, snh, got_b, got_s, NULL);
            check_bytes_equal(want_b, got_b, bn * sizeof(uint16_t), wh, label);
            check_close(want_h, got_s, snh, b == g_n_be ? 5e-3 : 1e-5, wh, label);
            /* The first sub blocks of the same bounds, as a shorter row
             * scores a longer row's summary. */
            const uint32_t sub = nb > 1 ? nb - 1 - (uint32_t)ci % 2 : nb;
            snprintf(wh, sizeof(wh), "%s, per KV head, %u of the blocks", what, sub);
            run_quest(be, &p, nb, sub, cases[ci].qg, true, ci % 2 == 1, snh, got_b, got_s, NULL);
            for (size_t r = 0; r < snh / nb; r++) {
                check_close(want_h + r * nb, got_s + r * nb, sub, b == g_n_be ? 5e-3 : 1e-5, wh,
                            label);
                for (uint32_t k = sub; k < nb; k++) /* rows nb apart (score_stride), the rest */
                    assert_true(isnan(got_s[r * nb + k])); /* left as it was */
            }
            /* Each group its own list: all blocks, one or two fewer, none. */
            uint32_t *count = malloc(n_groups * sizeof *count);
            assert_non_null(count);
            for (uint32_t grp = 0; grp < n_groups; grp++)
                count[grp] = grp % 4 == 3 ? 0 : nb > grp % 3 ? nb - grp % 3 : nb;
            snprintf(wh, sizeof(wh), "%s, per KV head, a list per group", what);
            run_quest(be, &p, nb, 0, qg, true, true, snh, got_b, got_s, count);
            float *rot = malloc(nb * sizeof *rot);
            assert_non_null(rot);
            for (uint32_t grp = 0; grp < n_groups; grp++)
                for (uint32_t g = 0; g < p.n_kv; g++) {
                    const size_t r = (size_t)grp * p.n_kv + g;
                    for (uint32_t k = 0; k < nb; k++)
                        rot[k] = want_h[r * nb + (k + grp) % nb];
                    check_close(rot, got_s + r * nb, count[grp], b == g_n_be ? 5e-3 : 1e-5, wh,
                                label);
                    for (uint32_t k = count[grp]; k < nb; k++)
                        assert_true(isnan(got_s[r * nb + k]));
                }
            free(rot);
            free(count);
        }
        free(want_h);
        free(want_b);
        free(wb);
        free(want_s);
        free(got_b);
        free(got_s);
        pdata_free(&p);
    }
}

/* ---- block choice (kern_block_select) ----------------------------------- */

/* kern.h's order, written from the floats: a before b. */
static bool
sel_before(float a, uint32_t ia, float b, uint32_t ib)
{
    if (isnan(a) || isnan(b))
        return !isnan(a) || (isnan(b) && ia < ib);
    return a > b || (a == b && ia < ib); /* -0 == +0 */
}

/* The mask kern.h defines, by counting for each candidate the candidates
 * that rank before it. */
static void
select_want(const kern_block_select_args_t *a, const float *score, uint8_t *want)
{
    for (uint32_t r = 0; r < a->n_rows; r++)
        for (uint32_t g = 0; g < a->n_kv_heads; g++) {
            const size_t row = (size_t)r * a->n_kv_heads + g;
            const float *sc = score + row * a->score_stride;
            uint8_t *m = want + row * a->mask_head_stride;
            const uint32_t n = a->ends[r] - a->first;
            const uint32_t k = a->top_ks ? a->top_ks[r] : a->top_k;
            for (uint32_t j = 0; j < a->mask_head_stride; j++) {
                if (j < a->first || j >= a->ends[r] || n <= k) {
                    m[j] = 1;
                    continue;
                }
                const uint32_t i = j - a->first;
                uint32_t before = 0;
                for (uint32_t t = 0; t < n; t++)
                    before += sel_before(sc[t], t, sc[i], i);
                m[j] = before < k;
            }
        }
}

/* Every backend's mask byte for byte against select_want: scores with
 * many ties, NaN, both zeros and infinities, or nearly all distinct;
 * rows with no candidates, with top_k or fewer, and with many (cuda's
 * select walks several chunks of its block); every kind of top_k.  The
 * mask starts poisoned, so a byte left unwritten shows. */
static void
test_block_select(void **state)
{
    (void)state;
    rng_seed(41);
    if (!g_cuda)
        print_message("block_select [cuda]: skipped (cuda not available)\n");
    static const struct {
        uint32_t n_rows, n_kv, first, max_n, top_k, kind;
    } cases[] = {
        {6, 2, 0, 40, 1, 0},   {5, 1, 3, 40, 4, 1},    {7, 3, 1, 100, 7, 2},
        {4, 8, 2, 600, 32, 3}, {3, 2, 0, 2100, 64, 1}, {2, 4, 5, 3000, 200, 3},
        {9, 2, 0, 16, 15, 0},  {3, 1, 0, 700, 699, 3}, {2, 2, 4, 1000, 1, 2},
    };
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        kern_block_select_args_t a = {.n_rows = cases[ci].n_rows,
                                      .n_kv_heads = cases[ci].n_kv,
                                      .first = cases[ci].first,
                                      .top_k = cases[ci].top_k};
        uint32_t *ends = malloc(a.n_rows * sizeof *ends);
        assert_non_null(ends);
        uint32_t longest = 0;
        for (uint32_t r = 0; r < a.n_rows; r++) {
            uint32_t pick = rng_u32() % 4, n; /* none, top_k or fewer, many, the most */
            n = pick == 0   ? 0
                : pick == 1 ? rng_u32() % (a.top_k + 1)
                : pick == 2 ? a.top_k + 1 + rng_u32() % (cases[ci].max_n - a.top_k)
                            : cases[ci].max_n;
            ends[r] = a.first + n;
            longest = n > longest ? n : longest;
        }
        a.ends = ends;
        /* Every other case gives each row a k of its own (top_ks), from 1
         * to past its candidates. */
        uint32_t *ks = NULL;
        if (ci % 2) {
            ks = malloc(a.n_rows * sizeof *ks);
            assert_non_null(ks);
            for (uint32_t r = 0; r < a.n_rows; r++)
                ks[r] = 1 + rng_u32() % (ends[r] - a.first + 2);
            a.top_ks = ks;
            a.top_k = 0;
        }
        a.score_stride = longest + rng_u32() % 3;
        a.mask_head_stride = a.first + longest + 1 + rng_u32() % 5;
        const size_t sn = (size_t)a.n_rows * a.n_kv_heads * (a.score_stride ? a.score_stride : 1);
        const size_t mn = (size_t)a.n_rows * a.n_kv_heads * a.mask_head_stride;
        float *score = malloc(sn * sizeof(float));
        uint8_t *want = malloc(mn), *got = malloc(mn);
        assert_true(score && want && got);
        for (size_t k = 0; k < sn; k++) {
            const uint32_t u = rng_u32();
            switch (cases[ci].kind) {
            case 0: /* a few values: long runs of ties */
                score[k] = (float)(u % 4);
                break;
            case 1: /* the special values among a few others */
                score[k] = u % 8 == 0   ? NAN
                           : u % 8 == 1 ? -0.0f
                           : u % 8 == 2 ? 0.0f
                           : u % 8 == 3 ? INFINITY
                           : u % 8 == 4 ? -INFINITY
                                        : (float)(u % 3) - 1.0f;
                break;
            case 2: /* negative, with ties in the low bits */
                score[k] = -1.0f - (float)(u % 64) / 32.0f;
                break;
            default: /* nearly all distinct */
                score[k] = rng_f(-50.0f, 50.0f);
            }
        }
        select_want(&a, score, want);
        for (int b = -1; b <= g_n_be; b++) {
            const char *label;
            kern_backend_t *be = be_at(b, &label);
            if (be == NULL)
                continue;
            float *sd = kern_alloc(be, sn * sizeof(float));
            uint8_t *md = kern_alloc(be, mn);
            assert_true(sd && md);
            assert_int_equal(kern_upload(be, sd, score, sn * sizeof(float)), 0);
            assert_int_equal(kern_memset(be, md, 0xab, mn), 0);
            kern_block_select_args_t x = a;
            x.score = sd;
            x.mask = md;
            assert_int_equal(kern_block_select(be, &x), 0);
            assert_int_equal(kern_sync(be), 0);
            assert_int_equal(kern_download(be, got, md, mn), 0);
            for (size_t k = 0; k < mn; k++)
                if (got[k] != want[k]) {
                    const size_t row = k / a.mask_head_stride;
                    print_error("block_select case %zu [%s]: row %zu (query group %zu, KV head "
                                "%zu) block %zu: %u, want %u\n",
                                ci, label, row, row / a.n_kv_heads, row % a.n_kv_heads,
                                k % a.mask_head_stride, got[k], want[k]);
                    fail();
                }

            /* Refusals: candidates past the scores or the mask row,
             * before first, and no top_k. */
            x.ends = ends;
            const uint32_t e0 = ends[0];
            ends[0] = a.first + a.score_stride + 1;
            assert_int_equal(kern_block_select(be, &x), KVS_EINVAL);
            ends[0] = a.mask_head_stride + 1;
            assert_int_equal(kern_block_select(be, &x), KVS_EINVAL);
            if (a.first) {
                ends[0] = a.first - 1;
                assert_int_equal(kern_block_select(be, &x), KVS_EINVAL);
            }
            ends[0] = e0;
            if (ks) {
                const uint32_t k0 = ks[a.n_rows - 1];
                ks[a.n_rows - 1] = 0;
                assert_int_equal(kern_block_select(be, &x), KVS_EINVAL);
                ks[a.n_rows - 1] = k0;
            }
            x.top_k = 0;
            x.top_ks = NULL;
            assert_int_equal(kern_block_select(be, &x), KVS_EINVAL);
            kern_free(be, sd);
            kern_free(be, md);
        }
        free(ends);
        free(ks);
        free(score);
        free(want);
        free(got);
    }
}

/* ---- attention mass (kern_attn_mass) ------------------------------------ */

/* kern_attn_mass straight from the token arrays, in double: sequence 0's
 * first n_keys entries, its q rows. */
static void
mass_want(const pdata_t *p, uint32_t n_keys, bool causal, kern_mass_mode_t mode, uint32_t n_out,
          uint32_t pool, float *out)
{
    const uint32_t d = p->d, H = p->n_heads, G = H / p->n_kv, n_q = p->n_q;
    const size_t krow = (size_t)p->n_kv * d;
    double *pr = malloc(n_keys * sizeof(double));
    assert_non_null(pr);
    if (mode == KERN_MASS_SUM)
        memset(out, 0, (size_t)p->n_kv * n_out * sizeof(float));
    else
        for (size_t k = 0; k < (size_t)n_q * n_keys; k++)
            out[k] = -INFINITY;
    double *sum = calloc((size_t)p->n_kv * n_keys, sizeof(double));
    assert_non_null(sum);
    for (uint32_t r = 0; r < n_q; r++)
        for (uint32_t h = 0; h < H; h++) {
            const uint32_t lim = causal ? n_keys - n_q + r + 1 : n_keys, g = h / G;
            const float *q = p->q + ((size_t)r * H + h) * d;
            double mx = -INFINITY, z = 0.0;
            for (uint32_t j = 0; j < lim; j++) {
                const float *k = p->k_tok + (p->tok0[0] + j) * krow + (size_t)g * d;
                double l = 0.0;
                for (uint32_t e = 0; e < d; e++)
                    l += (double)q[e] * k[e];
                pr[j] = l * p->scale;
                mx = pr[j] > mx ? pr[j] : mx;
            }
            for (uint32_t j = 0; j < n_keys; j++) {
                pr[j] = j < lim ? exp(pr[j] - mx) : 0.0;
                z += pr[j];
            }
            for (uint32_t j = 0; j < n_keys; j++)
                pr[j] /= z;
            if (mode == KERN_MASS_SUM) {
                for (uint32_t j = 0; j < n_out; j++)
                    sum[(size_t)g * n_keys + j] += pr[j];
                continue;
            }
            for (uint32_t j = 0; j < n_keys; j++) {
                double w = 0.0;
                for (int64_t t = (int64_t)j - pool / 2; t <= (int64_t)j + pool / 2; t++)
                    if (t >= 0 && t < n_keys)
                        w += pr[t];
                float m = (float)(w / pool), *o = out + (size_t)r * n_keys + j;
                *o = m > *o ? m : *o;
            }
        }
    if (mode == KERN_MASS_SUM)
        for (uint32_t g = 0; g < p->n_kv; g++)
            for (uint32_t j = 0; j < n_out; j++)
                out[(size_t)g * n_out + j] = (float)sum[(size_t)g * n_keys + j];
    free(sum);
    free(pr);
}

/* SnapKV's and H2O's causal sums and speculative prefill's pooled maxima
 * on every backend against the double reference above, and the
 * refusals. */
static void
test_attn_mass(void **state)
{
    (void)state;
    static const struct {
        kern_dtype_t dtype;
        uint32_t bt, d, n_heads, n_kv;
        int32_t len, rows;
        bool causal;
        kern_mass_mode_t mode;
        uint32_t n_out, pool;
    } cases[] = {
        {KERN_F32, 16, 64, 8, 2, 300, 32, true, KERN_MASS_SUM, 268, 0},
        {KERN_F16, 16, 128, 32, 8, 200, 1, true, KERN_MASS_SUM, 200, 0},
        {KERN_F32, 5, 32, 4, 4, 97, 7, true, KERN_MASS_SUM, 90, 0},
        {KERN_F16, 16, 64, 8, 1, 150, 8, false, KERN_MASS_POOL_MAX, 0, 13},
        {KERN_F32, 7, 96, 6, 3, 333, 3, false, KERN_MASS_POOL_MAX, 0, 1},
        {KERN_F32, 16, 64, 4, 2, 40, 2, false, KERN_MASS_POOL_MAX, 0, 101},
    };
    rng_seed(37);
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        const int32_t back = 0;
        pdata_t p;
        pdata_build(&p, cases[ci].dtype, cases[ci].bt, cases[ci].d, cases[ci].n_heads,
                    cases[ci].n_kv, 1, &cases[ci].len, &cases[ci].rows, &back);
        const uint32_t N = (uint32_t)p.len[0];
        const size_t on =
            cases[ci].mode == KERN_MASS_SUM ? (size_t)p.n_kv * cases[ci].n_out : (size_t)p.n_q * N;
        float *want = malloc(on * sizeof(float)), *got = malloc(on * sizeof(float));
        assert_true(want && got);
        mass_want(&p, N, cases[ci].causal, cases[ci].mode, cases[ci].n_out, cases[ci].pool, want);
        char what[96];
        snprintf(what, sizeof(what), "attn_mass case %zu: %s, %u keys, %u rows", ci,
                 cases[ci].mode == KERN_MASS_SUM ? "sum" : "pooled max", N, p.n_q);
        for (int b = -1; b <= g_n_be; b++) {
            const char *label;
            kern_backend_t *be = be_at(b, &label);
            if (be == NULL)
                break;
            kern_kv_t kv = pkv_make(be, &p);
            kern_attn_mass_args_t a = {.q = p.q,
                                       .n_q = p.n_q,
                                       .n_heads = p.n_heads,
                                       .kv = &kv,
                                       .layer = 1,
                                       .blocks = p.indices,
                                       .n_keys = N,
                                       .causal = cases[ci].causal,
                                       .scale = p.scale,
                                       .mode = cases[ci].mode,
                                       .n_out = cases[ci].n_out,
                                       .pool = cases[ci].pool,
                                       .out = got};
            for (size_t k = 0; k < on; k++)
                got[k] = NAN;
            assert_int_equal(kern_attn_mass(be, &a), 0);
            /* cuda's exponentials are __expf and its sums f32. */
            check_close(want, got, on, b == g_n_be ? 1e-4 : 1e-5, what, label);

            kern_attn_mass_args_t bad = a;
            bad.mode = KERN_MASS_POOL_MAX;
            bad.pool = 4;
            assert_int_equal(kern_attn_mass(be, &bad), KVS_EINVAL);
            bad = a;
            bad.mode = KERN_MASS_SUM;
            bad.n_out = N + 1;
            assert_int_equal(kern_attn_mass(be, &bad), KVS_EINVAL);
            bad = a;
            bad.causal = true;
            bad.n_keys = p.n_q - 1;
            assert_int_equal(kern_attn_mass(be, &bad), KVS_EINVAL);
            bad = a;
            bad.n_heads = p.n_kv + 1;
            if (p.n_kv > 1)
                assert_int_equal(kern_attn_mass(be, &bad), KVS_EINVAL);
            kern_free(be, kv.k);
            kern_free(be, kv.v);
        }
        free(want);
        free(got);
        pdata_free(&p);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_patterns),
        cmocka_unit_test(test_split_k_decode),
        cmocka_unit_test(test_cuda_patterns),
        cmocka_unit_test(test_degenerate_equals_dense),
        cmocka_unit_test(test_window_is_dense_over_kept_keys),
        cmocka_unit_test(test_pattern_validation),
        cmocka_unit_test(test_delta_invariants),
        cmocka_unit_test(test_quest_bounds),
        cmocka_unit_test(test_block_select),
        cmocka_unit_test(test_attn_mass),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
