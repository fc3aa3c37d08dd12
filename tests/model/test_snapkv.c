/*
 * tests/model/test_snapkv.c — the building blocks of SnapKV (algorithms.md
 * section 5.2): model_snapkv_select, kern_kv_gather and kv_table_compact.
 *   - policy defaults and checks, argument errors;
 *   - a budget of at least n_keys is the identity, and compacting with the
 *     identity changes nothing, in the table or the pool;
 *   - the selected entries equal a float64 reimplementation of the
 *     definition, for GQA groups of 1 to 8, windows partly filled, pools
 *     with quantized blocks, and pool widths that reach past both ends;
 *   - the gather on ref and cpu writes identical pools, and every row is
 *     kern_kv_row_f32 of its source, from full-precision and quantized
 *     blocks, in F32 and F16 pools;
 *   - compaction's pool accounting, positions, EAGAIN with nothing
 *     changed, and no prefix-cache commits afterwards;
 *   - decode attention over a compacted table equals attention over the
 *     original entries each KV head kept, computed here in float64.
 * Models are small GGUF files written here (zero weights: only their
 * shapes matter), so the GQA group size can vary.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "cache/kv.h"
#include "kernels/kern.h"
#include "model/model.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static double
urand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}

static uint32_t
irand(uint32_t lo, uint32_t hi) /* [lo, hi] */
{
    return lo + (uint32_t)(urand() * (hi - lo + 1));
}

/* ---- fixtures ------------------------------------------------------------ */

/* A llama GGUF of n_layer layers, n_head x head_dim queries and n_head_kv
 * KV heads, with zero weights. */
static int
write_model(const char *path, uint32_t n_layer, uint32_t n_head, uint32_t n_head_kv, uint32_t hd)
{
    const uint32_t d = 32, ff = 32, vocab = 256;
    model_gguf_writer_t *w = NULL;
    int rc = model_gguf_writer_new(&w);
    rc = rc ? rc : model_gguf_writer_set_str(w, "general.architecture", "llama");
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.embedding_length", d);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.block_count", n_layer);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.feed_forward_length", ff);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.attention.head_count", n_head);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.attention.head_count_kv", n_head_kv);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.attention.key_length", hd);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.attention.value_length", hd);
    rc = rc ? rc : model_gguf_writer_set_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    struct {
        char name[48];
        uint32_t cols, rows;
    } t[4 + 9 * 8];
    uint32_t n = 0;
#define T(c, r, ...) \
    (snprintf(t[n].name, sizeof t[n].name, __VA_ARGS__), t[n].cols = c, t[n++].rows = r)
    T(d, vocab, "token_embd.weight");
    T(d, 1, "output_norm.weight");
    T(d, vocab, "output.weight");
    for (uint32_t l = 0; l < n_layer; l++) {
        T(d, 1, "blk.%u.attn_norm.weight", l);
        T(d, n_head * hd, "blk.%u.attn_q.weight", l);
        T(d, n_head_kv * hd, "blk.%u.attn_k.weight", l);
        T(d, n_head_kv * hd, "blk.%u.attn_v.weight", l);
        T(n_head * hd, d, "blk.%u.attn_output.weight", l);
        T(d, 1, "blk.%u.ffn_norm.weight", l);
        T(d, ff, "blk.%u.ffn_gate.weight", l);
        T(d, ff, "blk.%u.ffn_up.weight", l);
        T(ff, d, "blk.%u.ffn_down.weight", l);
    }
#undef T
    for (uint32_t i = 0; rc == 0 && i < n; i++) {
        uint64_t ne[2] = {t[i].cols, t[i].rows};
        rc = model_gguf_writer_add_tensor(w, t[i].name, t[i].rows > 1 ? 2 : 1, ne, KERN_F32);
    }
    rc = rc ? rc : model_gguf_writer_begin(w, path);
    static const float zeros[4096];
    for (uint32_t i = 0; rc == 0 && i < n; i++)
        for (size_t left = (size_t)t[i].cols * t[i].rows * sizeof(float); rc == 0 && left > 0;) {
            size_t k = left < sizeof zeros ? left : sizeof zeros;
            rc = model_gguf_writer_write(w, zeros, k);
            left -= k;
        }
    rc = rc ? rc : model_gguf_writer_finish(w);
    model_gguf_writer_free(w);
    return rc;
}

typedef struct fix {
    kern_backend_t *be;
    model_t *m;
    kv_pool_t *pool;
} fix_t;

/* The cpu backend, a model of that shape and a pool for it. */
static void
fix_open(fix_t *f, uint32_t n_layer, uint32_t n_head, uint32_t n_head_kv, uint32_t hd,
         const kv_pool_cfg_t *extra)
{
    memset(f, 0, sizeof *f);
    assert_int_equal(kern_backend_new("cpu", &(kern_backend_cfg_t){.n_threads = 2}, &f->be), 0);
    char path[256];
    const char *tmp = getenv("TMPDIR");
    snprintf(path, sizeof path, "%s/kvs_snapkv_XXXXXX", tmp ? tmp : "/tmp");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    close(fd);
    assert_int_equal(write_model(path, n_layer, n_head, n_head_kv, hd), 0);
    char err[256] = "";
    int rc = model_load(path, f->be, &f->m, err, sizeof err);
    unlink(path);
    if (rc)
        fprintf(stderr, "model_load: %s\n", err);
    assert_int_equal(rc, 0);
    kv_pool_cfg_t cfg = *extra;
    cfg.n_layers = n_layer;
    cfg.n_kv_heads = n_head_kv;
    cfg.head_dim = hd;
    assert_int_equal(kv_pool_new(&cfg, f->be, &f->pool), 0);
}

static void
fix_close(fix_t *f)
{
    kv_pool_free(f->pool);
    model_free(f->m);
    kern_backend_free(f->be);
}

/* The cpu backend and a pool of 2 layers x 2 KV heads x 32 dims in blocks
 * of 4 tokens, the rest of *cfg as given (which gets the shape too). */
static kv_pool_t *
small_pool(kv_pool_cfg_t *cfg, kern_backend_t **be)
{
    assert_int_equal(kern_backend_new("cpu", &(kern_backend_cfg_t){.n_threads = 2}, be), 0);
    cfg->n_layers = 2;
    cfg->n_kv_heads = 2;
    cfg->head_dim = 32;
    cfg->block_tokens = 4;
    kv_pool_t *pool = NULL;
    assert_int_equal(kv_pool_new(cfg, *be, &pool), 0);
    return pool;
}

/* A table of n entries at positions 0..n-1 with random K and V of size
 * amp, every layer. */
static kv_table_t *
filled_table(kv_pool_t *pool, kern_backend_t *be, uint32_t n, double amp)
{
    const kv_pool_cfg_t *c = kv_pool_cfg(pool);
    kv_table_t *t = NULL;
    assert_int_equal(kv_table_new(pool, &t), 0);
    assert_int_equal(kv_table_reserve(t, n), 0);
    int32_t *pos = malloc(n * sizeof *pos), *slots = malloc(n * sizeof *slots);
    size_t w = (size_t)c->n_kv_heads * c->head_dim;
    float *k = malloc(n * w * sizeof *k), *v = malloc(n * w * sizeof *v);
    for (uint32_t i = 0; i < n; i++)
        pos[i] = (int32_t)i;
    assert_int_equal(kv_table_append(t, pos, n, slots), 0);
    for (uint32_t l = 0; l < c->n_layers; l++) {
        for (size_t i = 0; i < n * w; i++) {
            k[i] = (float)((2.0 * urand() - 1.0) * amp);
            v[i] = (float)(2.0 * urand() - 1.0);
        }
        assert_int_equal(kern_kv_append(be, kv_pool_kv(pool), l, k, v, slots, n), 0);
    }
    free(pos);
    free(slots);
    free(k);
    free(v);
    return t;
}

/* Entry i of t, (layer, KV head), K or V, as f32. */
static void
entry_row(const kv_table_t *t, const kern_kv_t *kv, bool v, uint32_t l, uint32_t h, uint32_t i,
          float *out)
{
    uint32_t bt = kv->block_tokens;
    kern_kv_row_f32(kv, v, l, kv_table_blocks(t)[i / bt], h, i % bt, out);
}

/* ---- the float64 reference of the selection ---------------------------- */

/* Expected lists [n_layer * n_head_kv][C] (C = budget < n_keys); returns
 * how many lists have their boundary between kept and dropped keys by a
 * margin the f32 scoring cannot cross, flagging them in ok[]. */
static uint32_t
ref_select(const model_hparams_t *hp, const kern_kv_t *kv, const kv_table_t *t, uint32_t n_keys,
           const float *q_obs, uint32_t n_obs, uint32_t C, uint32_t ks, int32_t *keep, bool *ok)
{
    const uint32_t d = hp->head_dim, H = hp->n_head, HKV = hp->n_head_kv, G = H / HKV;
    const uint32_t M = n_keys - n_obs, top = C - n_obs, half = ks / 2;
    float *keys = malloc((size_t)n_keys * d * sizeof *keys);
    double *s = malloc(n_keys * sizeof *s), *vote = malloc(M * sizeof *vote);
    double *pooled = malloc(M * sizeof *pooled);
    uint32_t *order = malloc(M * sizeof *order);
    uint32_t n_ok = 0;
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        for (uint32_t g = 0; g < HKV; g++) {
            for (uint32_t j = 0; j < n_keys; j++)
                entry_row(t, kv, false, l, g, j, keys + (size_t)j * d);
            for (uint32_t j = 0; j < M; j++)
                vote[j] = 0.0;
            for (uint32_t h = g * G; h < (g + 1) * G; h++) {
                for (uint32_t r = 0; r < n_obs; r++) {
                    const float *q = q_obs + (((size_t)l * n_obs + r) * H + h) * d;
                    uint32_t lim = n_keys - n_obs + r + 1;
                    double mx = -INFINITY, sum = 0.0;
                    for (uint32_t j = 0; j < lim; j++) {
                        double x = 0.0;
                        for (uint32_t e = 0; e < d; e++)
                            x += (double)q[e] * keys[(size_t)j * d + e];
                        s[j] = x / sqrt((double)d);
                        mx = s[j] > mx ? s[j] : mx;
                    }
                    for (uint32_t j = 0; j < lim; j++)
                        sum += exp(s[j] - mx);
                    for (uint32_t j = 0; j < M; j++)
                        vote[j] += exp(s[j] - mx) / sum;
                }
            }
            for (uint32_t j = 0; j < M; j++) {
                double acc = 0.0;
                for (int64_t i = (int64_t)j - half; i <= (int64_t)j + half; i++)
                    if (i >= 0 && i < (int64_t)M)
                        acc += vote[i];
                pooled[j] = acc / ks;
                order[j] = j;
            }
            /* Selection sort of the first top + 1 ranks is plenty here. */
            for (uint32_t a = 0; a <= top && a < M; a++) {
                uint32_t best = a;
                for (uint32_t b = a + 1; b < M; b++)
                    if (pooled[order[b]] > pooled[order[best]] ||
                        (pooled[order[b]] == pooled[order[best]] && order[b] < order[best]))
                        best = b;
                uint32_t tmp = order[a];
                order[a] = order[best];
                order[best] = tmp;
            }
            double lo = pooled[order[top - 1]], next = pooled[order[top]];
            ok[l * HKV + g] = lo - next > 1e-5 * lo;
            n_ok += ok[l * HKV + g];
            int32_t *out = keep + ((size_t)l * HKV + g) * C;
            uint32_t n = 0;
            for (uint32_t j = 0; j < M; j++) {
                bool in = false;
                for (uint32_t a = 0; a < top; a++)
                    in |= order[a] == j;
                if (in)
                    out[n++] = (int32_t)j;
            }
            for (uint32_t j = M; j < n_keys; j++)
                out[n++] = (int32_t)j;
            assert_int_equal(n, C);
        }
    }
    free(keys);
    free(s);
    free(vote);
    free(pooled);
    free(order);
    return n_ok;
}

static float *
random_q(const model_hparams_t *hp, uint32_t n_obs, double amp)
{
    size_t n = (size_t)hp->n_layer * n_obs * hp->n_head * hp->head_dim;
    float *q = malloc(n * sizeof *q);
    for (size_t i = 0; i < n; i++)
        q[i] = (float)((2.0 * urand() - 1.0) * amp);
    return q;
}

/* ---- tests ----------------------------------------------------------------- */

static void
test_policy(void **state)
{
    (void)state;
    model_snapkv_policy_t p = {.budget = 100};
    model_snapkv_defaults(&p);
    assert_int_equal(p.window, 32);
    assert_int_equal(p.kernel, 5);
    assert_int_equal(p.budget, 100);
    assert_int_equal(model_snapkv_check(&p), 0);
    p = (model_snapkv_policy_t){.budget = 64, .window = 8, .kernel = 7};
    model_snapkv_defaults(&p);
    assert_int_equal(p.window, 8);
    assert_int_equal(p.kernel, 7);
    assert_int_equal(model_snapkv_check(&p), 0);
    p.kernel = 4;
    assert_int_equal(model_snapkv_check(&p), KVS_EINVAL);
    p.kernel = 0;
    assert_int_equal(model_snapkv_check(&p), KVS_EINVAL);
    p.kernel = 1;
    assert_int_equal(model_snapkv_check(&p), 0);
    p.budget = 8; /* the window alone */
    assert_int_equal(model_snapkv_check(&p), KVS_EINVAL);
    p.budget = 9;
    assert_int_equal(model_snapkv_check(&p), 0);
    p.window = 0;
    assert_int_equal(model_snapkv_check(&p), KVS_EINVAL);
    p = (model_snapkv_policy_t){.budget = 2000, .window = 1025, .kernel = 5};
    assert_int_equal(model_snapkv_check(&p), KVS_EINVAL);
    p = (model_snapkv_policy_t){.budget = 2000, .window = 32, .kernel = 257};
    assert_int_equal(model_snapkv_check(&p), KVS_EINVAL);

    /* Arguments of the selection. */
    fix_t f;
    fix_open(&f, 2, 4, 2, 32, &(kv_pool_cfg_t){.block_tokens = 8, .n_blocks = 16});
    const kern_kv_t *kv = kv_pool_kv(f.pool);
    kv_table_t *t = filled_table(f.pool, f.be, 40, 1.0);
    float *q = random_q(model_hparams(f.m), 8, 1.0);
    int32_t keep[2 * 2 * 40];
    const int32_t *blocks = kv_table_blocks(t);
    model_snapkv_policy_t sp = {.budget = 20, .window = 8, .kernel = 3};
    assert_int_equal(model_snapkv_select(f.m, kv, blocks, 40, q, 8, &sp, keep), 20);
    assert_int_equal(model_snapkv_select(f.m, kv, blocks, 40, q, 9, &sp, keep), KVS_EINVAL);
    assert_int_equal(model_snapkv_select(f.m, kv, blocks, 40, q, 0, &sp, keep), KVS_EINVAL);
    assert_int_equal(model_snapkv_select(f.m, kv, blocks, 0, q, 1, &sp, keep), KVS_EINVAL);
    assert_int_equal(model_snapkv_select(f.m, kv, blocks, 40, NULL, 8, &sp, keep), KVS_EINVAL);
    assert_int_equal(model_snapkv_select(f.m, kv, blocks, 40, q, 8, &sp, NULL), KVS_EINVAL);
    sp.kernel = 2;
    assert_int_equal(model_snapkv_select(f.m, kv, blocks, 40, q, 8, &sp, keep), KVS_EINVAL);
    sp = (model_snapkv_policy_t){.budget = 8, .window = 8};
    assert_int_equal(model_snapkv_select(f.m, kv, blocks, 40, q, 8, &sp, keep), KVS_EINVAL);
    /* Zero window and kernel take the defaults: 32 and 5. */
    sp = (model_snapkv_policy_t){.budget = 36};
    assert_int_equal(model_snapkv_select(f.m, kv, blocks, 40, q, 8, &sp, keep), 36);
    /* A pool of another shape. */
    kern_kv_t other = *kv;
    other.n_kv_heads = 4;
    assert_int_equal(model_snapkv_select(f.m, &other, blocks, 40, q, 8, &sp, keep), KVS_EINVAL);
    int32_t bad[5] = {blocks[0], blocks[1], blocks[2], blocks[3], 16};
    assert_int_equal(model_snapkv_select(f.m, kv, bad, 40, q, 8, &sp, keep), KVS_EINVAL);
    free(q);
    kv_table_free(t);
    assert_true(kv_pool_check(f.pool));
    fix_close(&f);
}

/* Budget >= n_keys keeps everything, and compacting with that changes
 * nothing: not the table, not the pool's accounting or memory. */
static void
test_identity(void **state)
{
    (void)state;
    fix_t f;
    fix_open(&f, 2, 8, 2, 32,
             &(kv_pool_cfg_t){.block_tokens = 8, .n_blocks = 32, .prefix_cache = true});
    const kern_kv_t *kv = kv_pool_kv(f.pool);
    const size_t bytes = (size_t)kv->n_layers * kv->layer_bytes;
    void *k0 = malloc(bytes), *v0 = malloc(bytes);
    for (uint32_t n_keys = 1; n_keys <= 60; n_keys += 7) {
        kv_table_t *t = filled_table(f.pool, f.be, n_keys, 1.0);
        assert_int_equal(kv_table_reserve(t, 9), 0); /* blocks ahead stay too */
        uint32_t n_obs = n_keys < 8 ? n_keys : 8;
        float *q = random_q(model_hparams(f.m), n_obs, 1.0);
        int32_t *keep = malloc((size_t)2 * 2 * n_keys * sizeof *keep);
        model_snapkv_policy_t p = {.budget = n_keys > 9 ? n_keys : 9, .window = 8};
        assert_int_equal(
            model_snapkv_select(f.m, kv, kv_table_blocks(t), n_keys, q, n_obs, &p, keep),
            (int)n_keys);
        for (uint32_t l = 0; l < 4; l++)
            for (uint32_t j = 0; j < n_keys; j++)
                assert_int_equal(keep[l * n_keys + j], j);

        uint32_t nb = kv_table_n_blocks(t), n_free = kv_pool_n_free(f.pool);
        int32_t blocks[32];
        memcpy(blocks, kv_table_blocks(t), nb * sizeof *blocks);
        memcpy(k0, kv->k, bytes);
        memcpy(v0, kv->v, bytes);
        assert_int_equal(kv_table_compact(t, n_keys, keep, 0, 0), 0);
        assert_int_equal(kv_table_len(t), n_keys);
        assert_int_equal(kv_table_next_pos(t), n_keys);
        assert_int_equal(kv_table_n_blocks(t), nb);
        assert_memory_equal(kv_table_blocks(t), blocks, nb * sizeof *blocks);
        for (uint32_t j = 0; j < n_keys; j++)
            assert_int_equal(kv_table_positions(t)[j], j);
        assert_int_equal(kv_pool_n_free(f.pool), n_free);
        assert_memory_equal(kv->k, k0, bytes);
        assert_memory_equal(kv->v, v0, bytes);
        assert_true(kv_pool_check(f.pool));
        /* Still an ordinary table: its full blocks can be committed. */
        int32_t tok[64];
        for (uint32_t j = 0; j < n_keys; j++)
            tok[j] = (int32_t)(1000 + j);
        kv_prefix_stats_t st0, st1;
        kv_pool_prefix_stats(f.pool, &st0);
        assert_int_equal(kv_prefix_commit(t, tok, n_keys, n_keys), 0);
        kv_pool_prefix_stats(f.pool, &st1);
        assert_int_equal(st1.cached_blocks - st0.cached_blocks, n_keys / 8);
        free(q);
        free(keep);
        kv_table_free(t);
        assert_true(kv_pool_check(f.pool));
    }
    free(k0);
    free(v0);
    fix_close(&f);
}

/* The selection against ref_select, over GQA group sizes 1 to 8, pools
 * with and without quantized blocks, windows partly filled and pooling
 * widths up to 9 (whose windows reach past both ends of short votes). */
static void
test_select_reference(void **state)
{
    (void)state;
    static const struct {
        uint32_t L, H, HKV, d;
        kern_kvq_t quant;
    } cfgs[] = {
        {2, 4, 4, 32, KERN_KVQ_NONE}, {2, 4, 2, 32, KERN_KVQ_NONE}, {2, 8, 2, 16, KERN_KVQ_NONE},
        {1, 8, 1, 32, KERN_KVQ_NONE}, {2, 8, 2, 32, KERN_KVQ_Q8_0},
    };
    static const uint32_t windows[] = {4, 8, 16, 32}, kernels[] = {1, 3, 5, 7, 9};
    uint32_t n_lists = 0, n_checked = 0;
    for (size_t c = 0; c < sizeof cfgs / sizeof cfgs[0]; c++) {
        fix_t f;
        fix_open(&f, cfgs[c].L, cfgs[c].H, cfgs[c].HKV, cfgs[c].d,
                 &(kv_pool_cfg_t){.block_tokens = 8,
                                  .n_blocks = 96,
                                  .quant = cfgs[c].quant,
                                  .n_hot = cfgs[c].quant ? 48 : 0});
        const model_hparams_t *hp = model_hparams(f.m);
        const kern_kv_t *kv = kv_pool_kv(f.pool);
        for (int it = 0; it < 16; it++) {
            uint32_t w = windows[irand(0, 3)], ks = kernels[irand(0, 4)];
            uint32_t n_obs = it % 2 ? w : irand(1, w);
            uint32_t budget = it % 3 == 0 ? w + 1 : irand(w + 1, w + 80);
            uint32_t n_keys = it % 4 == 1 ? budget + 1 : irand(budget + 1, budget + 200);
            kv_table_t *t = filled_table(f.pool, f.be, n_keys, 2.0);
            if (cfgs[c].quant)
                assert_true(kv_table_seal(t, 8, 4) >= 0); /* 0 for short tables */
            float *q = random_q(hp, n_obs, 1.0);
            size_t n_list = (size_t)hp->n_layer * hp->n_head_kv;
            int32_t *got = malloc(n_list * budget * sizeof *got);
            int32_t *want = malloc(n_list * budget * sizeof *want);
            bool *ok = malloc(n_list * sizeof *ok);
            model_snapkv_policy_t p = {.budget = budget, .window = w, .kernel = ks};
            assert_int_equal(
                model_snapkv_select(f.m, kv, kv_table_blocks(t), n_keys, q, n_obs, &p, got),
                (int)budget);
            n_checked += ref_select(hp, kv, t, n_keys, q, n_obs, budget, ks, want, ok);
            n_lists += (uint32_t)n_list;
            for (size_t l = 0; l < n_list; l++) {
                const int32_t *g = got + l * budget;
                for (uint32_t j = 0; j < budget; j++) {
                    /* Ascending, and the window is kept whatever its votes. */
                    assert_true(j == 0 || g[j] > g[j - 1]);
                    if (j >= budget - n_obs)
                        assert_int_equal(g[j], n_keys - budget + j);
                }
                if (ok[l])
                    assert_memory_equal(g, want + l * budget, budget * sizeof *g);
            }
            free(got);
            free(want);
            free(ok);
            free(q);
            kv_table_free(t);
        }
        assert_true(kv_pool_check(f.pool));
        fix_close(&f);
    }
    /* Near ties are rare with these inputs: nearly every list counts. */
    assert_true(n_checked * 10 >= n_lists * 9);
}

/* A pool with a Q8_0 codec whose table t has hot and sealed blocks; the
 * gathers on ref and cpu must write the same bytes. */
static void
gather_on(const char *name, kern_dtype_t dtype, uint64_t seed, void **mem, size_t *mem_bytes)
{
    kern_backend_t *be = NULL;
    assert_int_equal(kern_backend_new(name, &(kern_backend_cfg_t){.n_threads = 3}, &be), 0);
    kv_pool_cfg_t cfg = {.n_layers = 2,
                         .n_kv_heads = 2,
                         .head_dim = 32,
                         .block_tokens = 8,
                         .n_blocks = 128,
                         .dtype = dtype,
                         .quant = KERN_KVQ_Q8_0,
                         .n_hot = 96};
    kv_pool_t *pool = NULL;
    assert_int_equal(kv_pool_new(&cfg, be, &pool), 0);
    const kern_kv_t *kv = kv_pool_kv(pool);
    rng = seed;
    kv_table_t *t = filled_table(pool, be, 100, 1.0);
    assert_true(kv_table_seal(t, 16, 20) > 0); /* blocks 2..9 sealed */
    uint32_t n_cold = 0;
    for (uint32_t b = 0; b < kv_table_n_blocks(t); b++)
        n_cold += (uint32_t)kv_table_blocks(t)[b] >= cfg.n_hot;
    assert_true(n_cold > 0 && n_cold < kv_table_n_blocks(t));

    static const uint32_t sizes[] = {40, 512}; /* inline and parallel on cpu */
    for (int s = 0; s < 2; s++) {
        const uint32_t n = sizes[s], bt = cfg.block_tokens, d = cfg.head_dim;
        kv_table_t *u = NULL;
        assert_int_equal(kv_table_new(pool, &u), 0);
        assert_int_equal(kv_table_reserve(u, n), 0);
        int32_t *src = malloc((size_t)4 * n * sizeof *src), *dst = malloc(n * sizeof *dst);
        uint32_t *ent = malloc((size_t)4 * n * sizeof *ent);
        for (uint32_t j = 0; j < n; j++)
            dst[j] = kv_table_blocks(u)[j / bt] * (int32_t)bt + (int32_t)(j % bt);
        for (uint32_t i = 0; i < 4 * n; i++) {
            ent[i] = irand(0, 99);
            src[i] = kv_table_blocks(t)[ent[i] / bt] * (int32_t)bt + (int32_t)(ent[i] % bt);
        }
        assert_int_equal(kern_kv_gather(be, kv, src, dst, n), 0);
        float a[32], b[32];
        for (uint32_t l = 0; l < 2; l++)
            for (uint32_t h = 0; h < 2; h++)
                for (uint32_t j = 0; j < n; j++)
                    for (int v = 0; v < 2; v++) {
                        entry_row(t, kv, v, l, h, ent[(l * 2 + h) * n + j], a);
                        entry_row(u, kv, v, l, h, j, b);
                        for (uint32_t e = 0; e < d; e++)
                            if (dtype == KERN_F16)
                                a[e] = kvs_fp16_to_f32(kvs_f32_to_fp16(a[e]));
                        assert_memory_equal(a, b, sizeof a);
                    }
        /* Errors: destinations in quantized blocks, sources outside the
         * pool, missing arrays. */
        int32_t cold = kv_table_blocks(t)[3] * (int32_t)bt;
        assert_true((uint32_t)cold >= cfg.n_hot * bt);
        int32_t d0 = dst[0];
        dst[0] = cold;
        assert_int_equal(kern_kv_gather(be, kv, src, dst, n), KVS_EINVAL);
        dst[0] = d0;
        int32_t s0 = src[4 * n - 1];
        src[4 * n - 1] = (int32_t)(cfg.n_blocks * bt);
        assert_int_equal(kern_kv_gather(be, kv, src, dst, n), KVS_EINVAL);
        src[4 * n - 1] = -1;
        assert_int_equal(kern_kv_gather(be, kv, src, dst, n), KVS_EINVAL);
        src[4 * n - 1] = s0;
        assert_int_equal(kern_kv_gather(be, kv, NULL, dst, n), KVS_EINVAL);
        assert_int_equal(kern_kv_gather(be, kv, src, NULL, n), KVS_EINVAL);
        assert_int_equal(kern_kv_gather(be, kv, NULL, NULL, 0), 0);
        free(src);
        free(dst);
        free(ent);
        kv_table_free(u);
    }
    /* The whole pool, both kinds of block. */
    size_t hot = (size_t)kv->n_layers * kv->layer_bytes;
    size_t cold = (size_t)kv->n_layers * (kv->n_blocks - kv->n_hot) * kv->n_kv_heads;
    *mem_bytes = 2 * hot + cold * (kv->qk_tile + kv->qv_tile);
    uint8_t *m = malloc(*mem_bytes);
    memcpy(m, kv->k, hot);
    memcpy(m + hot, kv->v, hot);
    memcpy(m + 2 * hot, kv->qk, cold * kv->qk_tile);
    memcpy(m + 2 * hot + cold * kv->qk_tile, kv->qv, cold * kv->qv_tile);
    *mem = m;
    kv_table_free(t);
    assert_true(kv_pool_check(pool));
    kv_pool_free(pool);
    kern_backend_free(be);
}

static void
test_gather(void **state)
{
    (void)state;
    static const kern_dtype_t dtypes[] = {KERN_F32, KERN_F16};
    for (int i = 0; i < 2; i++) {
        void *a = NULL, *b = NULL;
        size_t na = 0, nb = 0;
        gather_on("ref", dtypes[i], 0x1234567ull + i, &a, &na);
        gather_on("cpu", dtypes[i], 0x1234567ull + i, &b, &nb);
        assert_int_equal(na, nb);
        assert_memory_equal(a, b, na);
        free(a);
        free(b);
    }
}

/* Random ascending lists of n_keep entries below n per (layer, KV head);
 * below `excl` only (then `last`, if >= 0, appended). */
static void
random_lists(uint32_t n_lists, uint32_t n_keep, uint32_t excl, int32_t last, int32_t *keep)
{
    uint32_t pick = last >= 0 ? n_keep - 1 : n_keep;
    for (uint32_t l = 0; l < n_lists; l++) {
        int32_t *k = keep + (size_t)l * n_keep;
        uint32_t n = 0;
        /* Selection sampling: ascending by construction. */
        for (uint32_t i = 0; i < excl && n < pick; i++)
            if (urand() * (excl - i) < pick - n)
                k[n++] = (int32_t)i;
        assert_int_equal(n, pick);
        if (last >= 0)
            k[n++] = last;
    }
}

/* Every K and V row of t's first n entries: [l][h][i][d] each. */
static float *
save_rows(const kv_table_t *t, const kern_kv_t *kv, bool v, uint32_t n)
{
    const uint32_t d = kv->head_dim;
    float *r = malloc((size_t)kv->n_layers * kv->n_kv_heads * n * d * sizeof *r);
    for (uint32_t l = 0; l < kv->n_layers; l++)
        for (uint32_t h = 0; h < kv->n_kv_heads; h++)
            for (uint32_t i = 0; i < n; i++)
                entry_row(t, kv, v, l, h, i, r + (((size_t)l * kv->n_kv_heads + h) * n + i) * d);
    return r;
}

/* t (compacted to n_keep) holds, per list, the original rows it kept. */
static void
check_kept_rows(const kv_table_t *t, const kern_kv_t *kv, const float *ok_, const float *ov,
                uint32_t n_orig, uint32_t n_keep, const int32_t *keep)
{
    const uint32_t d = kv->head_dim;
    float row[64];
    for (uint32_t l = 0; l < kv->n_layers; l++)
        for (uint32_t h = 0; h < kv->n_kv_heads; h++) {
            const size_t li = (size_t)l * kv->n_kv_heads + h;
            for (uint32_t j = 0; j < n_keep; j++) {
                size_t o = (li * n_orig + (uint32_t)keep[li * n_keep + j]) * d;
                entry_row(t, kv, false, l, h, j, row);
                assert_memory_equal(row, ok_ + o, d * sizeof(float));
                entry_row(t, kv, true, l, h, j, row);
                assert_memory_equal(row, ov + o, d * sizeof(float));
            }
        }
}

static void
test_compact(void **state)
{
    (void)state;
    kern_backend_t *be = NULL;
    kv_pool_cfg_t cfg = {.n_blocks = 40, .dtype = KERN_F32};
    kv_pool_t *pool = small_pool(&cfg, &be);
    const kern_kv_t *kv = kv_pool_kv(pool);
    const uint32_t len = 37, n_keep = 13, n_lists = 4;
    int32_t keep[4 * 13];

    for (int round = 0; round < 2; round++) {
        kv_table_t *t = filled_table(pool, be, len, 1.0);
        assert_int_equal(kv_table_reserve(t, 6), 0); /* one block ahead */
        assert_int_equal(kv_table_n_blocks(t), 11);
        float *ok_ = save_rows(t, kv, false, len), *ov = save_rows(t, kv, true, len);
        int32_t old[11];
        memcpy(old, kv_table_blocks(t), sizeof old);
        uint32_t n_free = kv_pool_n_free(pool);
        /* Round 0: no list keeps the last entry; round 1: every list. */
        random_lists(n_lists, n_keep, len - 1, round ? (int32_t)len - 1 : -1, keep);

        /* Bad lists change nothing. */
        assert_int_equal(kv_table_compact(t, 0, keep, 0, 0), KVS_EINVAL);
        assert_int_equal(kv_table_compact(t, len + 1, keep, 0, 0), KVS_EINVAL);
        assert_int_equal(kv_table_compact(t, n_keep, NULL, 0, 0), KVS_EINVAL);
        int32_t save = keep[20];
        keep[20] = keep[19]; /* not strictly ascending */
        assert_int_equal(kv_table_compact(t, n_keep, keep, 0, 0), KVS_EINVAL);
        keep[20] = save;
        save = keep[4 * 13 - 1];
        keep[4 * 13 - 1] = (int32_t)len;
        assert_int_equal(kv_table_compact(t, n_keep, keep, 0, 0), KVS_EINVAL);
        keep[4 * 13 - 1] = save;
        save = keep[0];
        keep[0] = -1;
        assert_int_equal(kv_table_compact(t, n_keep, keep, 0, 0), KVS_EINVAL);
        keep[0] = save;
        assert_int_equal(kv_table_len(t), len);
        assert_int_equal(kv_pool_n_free(pool), n_free);
        assert_true(kv_pool_check(pool));

        assert_int_equal(kv_table_compact(t, n_keep, keep, 0, 0), 0);
        assert_true(kv_pool_check(pool));
        assert_int_equal(kv_table_len(t), n_keep);
        assert_int_equal(kv_table_next_pos(t), len);
        assert_int_equal(kv_table_n_blocks(t), 4);
        assert_int_equal(kv_pool_n_free(pool), n_free + 11 - 4);
        for (int i = 0; i < 11; i++)
            assert_int_equal(kv_pool_refcount(pool, old[i]), 0);
        for (uint32_t b = 0; b < 4; b++)
            assert_int_equal(kv_pool_refcount(pool, kv_table_blocks(t)[b]), 1);
        /* Positions: the largest kept position of each index; the last
         * entry carries next_pos - 1 either way. */
        for (uint32_t j = 0; j < n_keep; j++) {
            int32_t want = -1;
            for (uint32_t l = 0; l < n_lists; l++)
                want = keep[l * n_keep + j] > want ? keep[l * n_keep + j] : want;
            if (j == n_keep - 1)
                want = (int32_t)len - 1;
            assert_int_equal(kv_table_positions(t)[j], want);
        }
        check_kept_rows(t, kv, ok_, ov, len, n_keep, keep);

        /* Decoding goes on at the true position. */
        int32_t pos = kv_table_next_pos(t), slot;
        assert_int_equal(kv_table_reserve(t, 1), 0);
        assert_int_equal(kv_table_append(t, &pos, 1, &slot), 0);
        assert_int_equal(kv_table_len(t), n_keep + 1);
        assert_int_equal(kv_table_next_pos(t), len + 1);
        assert_true(kv_pool_check(pool));
        /* Compacting again works on a compacted table. */
        int32_t again[4 * 5];
        random_lists(n_lists, 5, n_keep + 1, -1, again);
        assert_int_equal(kv_table_compact(t, 5, again, 0, 0), 0);
        assert_int_equal(kv_table_len(t), 5);
        assert_int_equal(kv_table_next_pos(t), len + 1);
        assert_true(kv_pool_check(pool));
        free(ok_);
        free(ov);
        kv_table_free(t);
        assert_int_equal(kv_pool_n_free(pool), cfg.n_blocks);
    }

    /* EAGAIN: not enough free blocks; nothing changes. */
    kv_table_t *t = filled_table(pool, be, len, 1.0), *hog = NULL;
    assert_int_equal(kv_table_new(pool, &hog), 0);
    assert_int_equal(kv_table_reserve(hog, (kv_pool_n_free(pool) - 3) * cfg.block_tokens), 0);
    assert_int_equal(kv_pool_n_free(pool), 3);
    int32_t blocks[10];
    memcpy(blocks, kv_table_blocks(t), sizeof blocks);
    random_lists(n_lists, n_keep, len, -1, keep);
    assert_int_equal(kv_table_compact(t, n_keep, keep, 0, 0), KVS_EAGAIN);
    assert_int_equal(kv_table_len(t), len);
    assert_int_equal(kv_table_next_pos(t), len);
    assert_int_equal(kv_table_n_blocks(t), 10);
    assert_memory_equal(kv_table_blocks(t), blocks, sizeof blocks);
    for (uint32_t j = 0; j < len; j++)
        assert_int_equal(kv_table_positions(t)[j], j);
    assert_int_equal(kv_pool_n_free(pool), 3);
    assert_true(kv_pool_check(pool));
    /* Twelve entries fit in the three blocks left. */
    random_lists(n_lists, 12, len, -1, keep);
    assert_int_equal(kv_table_compact(t, 12, keep, 0, 0), 0);
    assert_int_equal(kv_pool_n_free(pool), 10);
    assert_true(kv_pool_check(pool));
    kv_table_free(hog);
    kv_table_free(t);
    assert_int_equal(kv_pool_n_free(pool), cfg.n_blocks);
    kv_pool_free(pool);
    kern_backend_free(be);
}

/* 48 entries of random K and V through a Q8_0 pool's full-precision
 * blocks, two at a time, every full block sealed as it fills. */
static kv_table_t *
sealed_table(kv_pool_t *pool, kern_backend_t *be, uint64_t seed)
{
    const kern_kv_t *kv = kv_pool_kv(pool);
    kv_table_t *t = NULL;
    rng = seed;
    assert_int_equal(kv_table_new(pool, &t), 0);
    float k[8 * 64], v[8 * 64];
    for (uint32_t c = 0; c < 6; c++) {
        int32_t pos[8], slots[8];
        for (int i = 0; i < 8; i++)
            pos[i] = (int32_t)(c * 8 + i);
        assert_int_equal(kv_table_reserve(t, 8), 0);
        assert_int_equal(kv_table_append(t, pos, 8, slots), 0);
        for (uint32_t l = 0; l < 2; l++) {
            for (int i = 0; i < 8 * 64; i++) {
                k[i] = (float)(2.0 * urand() - 1.0);
                v[i] = (float)(2.0 * urand() - 1.0);
            }
            assert_int_equal(kern_kv_append(be, kv, l, k, v, slots, 8), 0);
        }
        assert_int_equal(kv_table_seal(t, 0, 0), 2);
    }
    assert_int_equal(kv_table_len(t), 48);
    return t;
}

/* With a codec, sources in quantized blocks are decoded, and the new
 * blocks past keep_head's and before the last keep_tail entries are
 * written quantized, through whatever full-precision blocks are left
 * (here one at a time): the same entries as compacting into full
 * precision and then sealing, in a pool with three full-precision blocks
 * for a table of four.  Too few full-precision blocks in the pool is
 * KVS_ENOSPC, too few free KVS_EAGAIN, and neither changes anything; too
 * few free quantized blocks leaves the last ones full precision; sinks
 * past the entries kept leave every block full precision. */
static void
test_compact_quant(void **state)
{
    (void)state;
    kern_backend_t *be = NULL;
    kv_pool_cfg_t cfg = {.n_blocks = 24, .dtype = KERN_F32, .quant = KERN_KVQ_Q8_0, .n_hot = 3};
    kv_pool_t *pool = small_pool(&cfg, &be);
    const kern_kv_t *kv = kv_pool_kv(pool);
    kv_table_t *t = sealed_table(pool, be, 77);
    assert_int_equal(kv_pool_n_free_kind(pool, false), 3);
    assert_int_equal(kv_pool_n_free_kind(pool, true), 9);
    int32_t before[12];
    memcpy(before, kv_table_blocks(t), sizeof before);
    float *ok_ = save_rows(t, kv, false, 48), *ov = save_rows(t, kv, true, 48);
    int32_t keep[4 * 40];

    /* Blocks 0, 2 and 3 would stay full precision, beside a staging block
     * (ENOSPC); blocks 0 and 3 and the staging block with one of the three
     * taken (EAGAIN). */
    random_lists(4, 16, 47, 47, keep);
    assert_int_equal(kv_table_compact(t, 16, keep, 4, 6), KVS_ENOSPC);
    kv_table_t *hog = NULL;
    assert_int_equal(kv_table_new(pool, &hog), 0);
    assert_int_equal(kv_table_reserve(hog, 1), 0);
    assert_int_equal(kv_table_compact(t, 16, keep, 4, 4), KVS_EAGAIN);
    kv_table_free(hog);
    assert_int_equal(kv_table_len(t), 48);
    assert_memory_equal(kv_table_blocks(t), before, sizeof before);
    assert_int_equal(kv_pool_n_free_kind(pool, false), 3);
    assert_int_equal(kv_pool_n_free_kind(pool, true), 9);
    assert_true(kv_pool_check(pool));

    /* The reference: a pool with room for the full-precision copy. */
    kv_pool_cfg_t wide_cfg = {
        .n_blocks = 40, .dtype = KERN_F32, .quant = KERN_KVQ_Q8_0, .n_hot = 16};
    kern_backend_t *wbe = NULL;
    kv_pool_t *wide = small_pool(&wide_cfg, &wbe);
    kv_table_t *w = sealed_table(wide, wbe, 77);

    assert_int_equal(kv_table_compact(t, 16, keep, 4, 4), 2);
    assert_int_equal(kv_table_compact(w, 16, keep, 4, UINT32_MAX), 0);
    assert_int_equal(kv_table_seal(w, 4, 4), 2);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_len(t), 16);
    assert_int_equal(kv_table_next_pos(t), 48);
    assert_int_equal(kv_table_n_blocks(t), 4);
    for (uint32_t b = 0; b < 4; b++)
        assert_int_equal((uint32_t)kv_table_blocks(t)[b] >= cfg.n_hot, b == 1 || b == 2);
    assert_int_equal(kv_pool_n_free_kind(pool, false), 1);
    assert_int_equal(kv_pool_n_free_kind(pool, true), 21 - 2);
    assert_memory_equal(kv_table_positions(t), kv_table_positions(w), 16 * sizeof(int32_t));
    float a[32], b[32];
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t h = 0; h < 2; h++)
            for (uint32_t j = 0; j < 16; j++)
                for (int v = 0; v < 2; v++) {
                    entry_row(t, kv, v, l, h, j, a);
                    entry_row(w, kv_pool_kv(wide), v, l, h, j, b);
                    assert_memory_equal(a, b, sizeof a);
                }
    /* Q8_0 of values Q8_0 decoded to is those values again. */
    check_kept_rows(t, kv, ok_, ov, 48, 16, keep);

    /* Every new block quantized, each through the one staging block. */
    random_lists(4, 12, 15, 15, keep);
    assert_int_equal(kv_table_compact(t, 12, keep, 0, 0), 3);
    assert_true(kv_pool_check(pool));
    for (uint32_t b = 0; b < 3; b++)
        assert_true((uint32_t)kv_table_blocks(t)[b] >= cfg.n_hot);
    assert_int_equal(kv_pool_n_free_kind(pool, false), 3);
    assert_int_equal(kv_pool_n_free_kind(pool, true), 21 - 3);
    kv_table_free(t);

    /* Ten blocks to write quantized, nine free: the last stays full
     * precision. */
    t = sealed_table(pool, be, 78);
    free(ok_);
    free(ov);
    ok_ = save_rows(t, kv, false, 48);
    ov = save_rows(t, kv, true, 48);
    random_lists(4, 40, 48, -1, keep);
    assert_int_equal(kv_table_compact(t, 40, keep, 0, 0), 9);
    assert_true(kv_pool_check(pool));
    for (uint32_t b = 0; b < 10; b++)
        assert_int_equal((uint32_t)kv_table_blocks(t)[b] >= cfg.n_hot, b < 9);
    check_kept_rows(t, kv, ok_, ov, 48, 40, keep);
    free(ok_);
    free(ov);
    kv_table_free(t);

    /* Sinks whose blocks reach past what is kept (2 blocks of sinks, 6
     * entries; 1 block, 3 entries): nothing to write quantized. */
    for (int c = 0; c < 2; c++) {
        const uint32_t n_keep = c ? 3 : 6, head = c ? 4 : 8;
        t = sealed_table(pool, be, 80 + c);
        ok_ = save_rows(t, kv, false, 48);
        ov = save_rows(t, kv, true, 48);
        random_lists(4, n_keep, 47, 47, keep);
        assert_int_equal(kv_table_compact(t, n_keep, keep, head, 1), 0);
        assert_true(kv_pool_check(pool));
        assert_int_equal(kv_table_n_blocks(t), (n_keep + 3) / 4);
        for (uint32_t b = 0; b < kv_table_n_blocks(t); b++)
            assert_true((uint32_t)kv_table_blocks(t)[b] < cfg.n_hot);
        check_kept_rows(t, kv, ok_, ov, 48, n_keep, keep);
        free(ok_);
        free(ov);
        kv_table_free(t);
    }
    kv_table_free(w);
    assert_true(kv_pool_check(pool));
    assert_true(kv_pool_check(wide));
    kv_pool_free(pool);
    kv_pool_free(wide);
    kern_backend_free(be);
    kern_backend_free(wbe);
}

/* A compacted table is never offered to the prefix cache; blocks cached
 * before the compaction keep their (untouched) prefix. */
static void
test_compact_prefix(void **state)
{
    (void)state;
    kern_backend_t *be = NULL;
    kv_pool_cfg_t cfg = {.n_blocks = 64, .dtype = KERN_F32, .prefix_cache = true};
    kv_pool_t *pool = small_pool(&cfg, &be);
    const kern_kv_t *kv = kv_pool_kv(pool);
    int32_t tokens[37], keep[4 * 13];
    for (int i = 0; i < 37; i++)
        tokens[i] = 500 + 3 * i;
    kv_prefix_stats_t st;

    kv_table_t *t = filled_table(pool, be, 37, 1.0);
    random_lists(4, 13, 36, 36, keep);
    assert_int_equal(kv_table_compact(t, 13, keep, 0, 0), 0);
    /* n may exceed the compacted length: the caller passes its prompt. */
    assert_int_equal(kv_prefix_commit(t, tokens, 37, 9), 0);
    assert_int_equal(kv_prefix_commit(t, tokens, 12, 9), 0);
    kv_pool_prefix_stats(pool, &st);
    assert_int_equal(st.cached_blocks, 0);
    kv_table_free(t);
    kv_table_t *u = NULL;
    uint32_t matched = 99;
    assert_int_equal(kv_table_new(pool, &u), 0);
    assert_int_equal(kv_prefix_match(u, tokens, 37, 9, &matched), 0);
    assert_int_equal(matched, 0);
    kv_table_free(u);
    assert_true(kv_pool_check(pool));

    /* Committed first, then compacted: the cached blocks keep the prompt's
     * prefix, and a later match gets exactly the rows written. */
    t = filled_table(pool, be, 37, 1.0);
    float *ok_ = save_rows(t, kv, false, 37);
    assert_int_equal(kv_prefix_commit(t, tokens, 37, 9), 0);
    kv_pool_prefix_stats(pool, &st);
    assert_int_equal(st.cached_blocks, 9);
    random_lists(4, 13, 36, 36, keep);
    assert_int_equal(kv_table_compact(t, 13, keep, 0, 0), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_prefix_commit(t, tokens, 37, 9), 0);
    kv_pool_prefix_stats(pool, &st);
    assert_int_equal(st.cached_blocks, 9);
    assert_int_equal(kv_table_new(pool, &u), 0);
    assert_int_equal(kv_prefix_match(u, tokens, 37, 9, &matched), 0);
    assert_int_equal(matched, 36);
    float row[32];
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t h = 0; h < 2; h++)
            for (uint32_t i = 0; i < 36; i++) {
                entry_row(u, kv, false, l, h, i, row);
                assert_memory_equal(row, ok_ + (((size_t)l * 2 + h) * 37 + i) * 32, sizeof row);
            }
    free(ok_);
    kv_table_free(u);
    kv_table_free(t);
    assert_true(kv_pool_check(pool));
    kv_pool_free(pool);
    kern_backend_free(be);
}

/* SnapKV end to end: select, compact, append one decode token, and attend
 * with decode rows on ref and cpu; the reference attends, per KV head, to
 * the original rows that head kept (float64). */
static void
attention_case(kern_dtype_t dtype)
{
    fix_t f;
    fix_open(&f, 2, 8, 2, 32, &(kv_pool_cfg_t){.block_tokens = 8, .n_blocks = 32, .dtype = dtype});
    kern_backend_t *ref = NULL;
    assert_int_equal(kern_backend_new("ref", NULL, &ref), 0);
    const model_hparams_t *hp = model_hparams(f.m);
    const kern_kv_t *kv = kv_pool_kv(f.pool);
    const uint32_t N = 83, C = 30, W = 8, d = 32, H = 8, HKV = 2, G = 4;
    kv_table_t *t = filled_table(f.pool, f.be, N, 2.0);
    float *ok_ = save_rows(t, kv, false, N), *ov = save_rows(t, kv, true, N);
    float *qo = random_q(hp, W, 1.0);
    int32_t keep[2 * 2 * 30];
    model_snapkv_policy_t p = {.budget = C, .window = W, .kernel = 5};
    assert_int_equal(model_snapkv_select(f.m, kv, kv_table_blocks(t), N, qo, W, &p, keep), (int)C);
    assert_int_equal(kv_table_compact(t, C, keep, 0, 0), 0);
    assert_int_equal(kv_table_next_pos(t), N);
    check_kept_rows(t, kv, ok_, ov, N, C, keep);

    /* One decode token at position N. */
    int32_t pos = N, slot;
    assert_int_equal(kv_table_reserve(t, 1), 0);
    assert_int_equal(kv_table_append(t, &pos, 1, &slot), 0);
    float nk[2][64], nv[2][64]; /* [layer][HKV * d] */
    for (uint32_t l = 0; l < 2; l++) {
        for (uint32_t e = 0; e < HKV * d; e++) {
            nk[l][e] = (float)(2.0 * (2.0 * urand() - 1.0));
            nv[l][e] = (float)(2.0 * urand() - 1.0);
        }
        assert_int_equal(kern_kv_append(f.be, kv, l, nk[l], nv[l], &slot, 1), 0);
    }
    /* The new rows as stored (rounded in an F16 pool). */
    float sk[2][2][32], sv[2][2][32];
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t g = 0; g < HKV; g++) {
            entry_row(t, kv, false, l, g, C, sk[l][g]);
            entry_row(t, kv, true, l, g, C, sv[l][g]);
        }

    /* Two decode rows of the sequence: without and with the new token. */
    int32_t indptr[2], indices[8], last_len[1], q_indptr[2] = {0, 2}, kv_len[2] = {C, C + 1};
    kv_table_t *tabs[1] = {t};
    kern_page_table_t pt = kv_tables_export(tabs, 1, indptr, indices, last_len);
    float q[2 * 8 * 32], out[2 * 8 * 32];
    for (size_t i = 0; i < sizeof q / sizeof q[0]; i++)
        q[i] = (float)(2.0 * urand() - 1.0);
    kern_backend_t *bes[2] = {ref, f.be};
    for (uint32_t l = 0; l < 2; l++) {
        for (int b = 0; b < 2; b++) {
            kern_attn_args_t a = {.q = q,
                                  .out = out,
                                  .n_q = 2,
                                  .n_heads = H,
                                  .q_indptr = q_indptr,
                                  .kv_len = kv_len,
                                  .pt = pt,
                                  .kv = kv,
                                  .layer = l,
                                  .scale = 1.0f / sqrtf((float)d)};
            assert_int_equal(kern_attention(bes[b], &a), 0);
            for (uint32_t r = 0; r < 2; r++)
                for (uint32_t h = 0; h < H; h++) {
                    const uint32_t g = h / G, n = (uint32_t)kv_len[r];
                    const int32_t *kp = keep + ((size_t)l * HKV + g) * C;
                    const float *qh = q + ((size_t)r * H + h) * d;
                    double s[31], mx = -INFINITY, sum = 0.0, o[32] = {0};
                    for (uint32_t j = 0; j < n; j++) {
                        const float *kr =
                            j < C ? ok_ + (((size_t)l * HKV + g) * N + kp[j]) * d : sk[l][g];
                        double x = 0.0;
                        for (uint32_t e = 0; e < d; e++)
                            x += (double)qh[e] * kr[e];
                        s[j] = x / sqrt((double)d);
                        mx = s[j] > mx ? s[j] : mx;
                    }
                    for (uint32_t j = 0; j < n; j++) {
                        const float *vr =
                            j < C ? ov + (((size_t)l * HKV + g) * N + kp[j]) * d : sv[l][g];
                        double w = exp(s[j] - mx);
                        sum += w;
                        for (uint32_t e = 0; e < d; e++)
                            o[e] += w * vr[e];
                    }
                    for (uint32_t e = 0; e < d; e++)
                        assert_float_equal(out[((size_t)r * H + h) * d + e], o[e] / sum, 2e-5);
                }
        }
    }
    free(ok_);
    free(ov);
    free(qo);
    kv_table_free(t);
    assert_true(kv_pool_check(f.pool));
    kern_backend_free(ref);
    fix_close(&f);
}

static void
test_attention(void **state)
{
    (void)state;
    attention_case(KERN_F32);
    attention_case(KERN_F16);
}

/* ---- H2O: the shared score sum and the selection ------------------------ */

/* model_h2o_scores against float64 on random data: GQA groups of 1 to 4,
 * one decode row and windows of causal rows, a stride past n_keys (only
 * [0, n_keys) of each list changes) and accumulation on top of what acc
 * held. */
static void
test_h2o_scores(void **state)
{
    (void)state;
    static const struct {
        uint32_t n_head, n_head_kv, n_keys, n_q;
    } cases[] = {{4, 4, 37, 1}, {4, 2, 50, 8}, {8, 2, 61, 32}, {4, 1, 16, 16}, {8, 2, 90, 1}};
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        fix_t f;
        fix_open(&f, 2, cases[c].n_head, cases[c].n_head_kv, 32,
                 &(kv_pool_cfg_t){.block_tokens = 8, .n_blocks = 16});
        const model_hparams_t *hp = model_hparams(f.m);
        const kern_kv_t *kv = kv_pool_kv(f.pool);
        const uint32_t n_keys = cases[c].n_keys, n_q = cases[c].n_q, stride = n_keys + 5;
        const uint32_t d = hp->head_dim, H = hp->n_head, HKV = hp->n_head_kv, G = H / HKV;
        kv_table_t *t = filled_table(f.pool, f.be, n_keys, 1.5);
        float *q = random_q(hp, n_q, 1.5);
        const size_t n_acc = (size_t)hp->n_layer * HKV * stride;
        double *acc = malloc(n_acc * sizeof *acc), *want = malloc(n_acc * sizeof *want);
        for (size_t i = 0; i < n_acc; i++)
            acc[i] = want[i] = urand();
        assert_int_equal(model_h2o_scores(f.m, kv, kv_table_blocks(t), n_keys, q, n_q, stride, acc),
                         0);
        float *keys = malloc((size_t)n_keys * d * sizeof *keys);
        double *sc = malloc(n_keys * sizeof *sc);
        for (uint32_t l = 0; l < hp->n_layer; l++) {
            for (uint32_t g = 0; g < HKV; g++) {
                double *w = want + ((size_t)l * HKV + g) * stride;
                for (uint32_t j = 0; j < n_keys; j++)
                    entry_row(t, kv, false, l, g, j, keys + (size_t)j * d);
                for (uint32_t h = g * G; h < (g + 1) * G; h++) {
                    for (uint32_t r = 0; r < n_q; r++) {
                        const float *qr = q + (((size_t)l * n_q + r) * H + h) * d;
                        uint32_t lim = n_keys - n_q + r + 1;
                        double mx = -INFINITY, sum = 0.0;
                        for (uint32_t j = 0; j < lim; j++) {
                            double x = 0.0;
                            for (uint32_t e = 0; e < d; e++)
                                x += (double)qr[e] * keys[(size_t)j * d + e];
                            sc[j] = x / sqrt((double)d);
                            mx = sc[j] > mx ? sc[j] : mx;
                        }
                        for (uint32_t j = 0; j < lim; j++)
                            sum += exp(sc[j] - mx);
                        for (uint32_t j = 0; j < lim; j++)
                            w[j] += exp(sc[j] - mx) / sum;
                    }
                }
            }
        }
        /* Each probability is within f32 rounding; the sums have G * n_q
         * terms below 1 each. */
        for (size_t i = 0; i < n_acc; i++)
            assert_true(fabs(acc[i] - want[i]) <= 1e-5 * (1.0 + fabs(want[i])));
        /* The total mass added is one per (query head, row). */
        for (uint32_t l = 0; l < hp->n_layer * HKV; l++) {
            double added = 0.0;
            for (uint32_t j = 0; j < stride; j++)
                added += acc[(size_t)l * stride + j] - want[(size_t)l * stride + j];
            assert_true(fabs(added) < 1e-4 * G * n_q);
        }
        /* Argument errors. */
        const int32_t *blocks = kv_table_blocks(t);
        assert_int_equal(model_h2o_scores(f.m, kv, blocks, n_keys, q, 0, stride, acc), KVS_EINVAL);
        assert_int_equal(model_h2o_scores(f.m, kv, blocks, n_keys, q, n_keys + 1, stride + 1, acc),
                         KVS_EINVAL);
        assert_int_equal(model_h2o_scores(f.m, kv, blocks, n_keys, q, 1, n_keys - 1, acc),
                         KVS_EINVAL);
        assert_int_equal(model_h2o_scores(f.m, kv, blocks, n_keys, NULL, 1, stride, acc),
                         KVS_EINVAL);
        free(keys);
        free(sc);
        free(acc);
        free(want);
        free(q);
        kv_table_free(t);
        assert_true(kv_pool_check(f.pool));
        fix_close(&f);
    }
}

/* H2O's choice: the recent entries, then the best older ones by score
 * (ties to the lower index, NaN last), ascending; the identity within
 * budget. */
static void
test_h2o_select(void **state)
{
    (void)state;
    /* Two lists of 10 with stride 12: budget 6, recent 2. */
    double acc[24] = {
        0.5, 0.1, 0.9, 0.3, 0.9, 0.0, 0.2, NAN, 7.0, 7.0, -1, -1, /* list 0 */
        1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, -1, -1, /* list 1: ties */
    };
    int32_t keep[2 * 10];
    assert_int_equal(model_h2o_select(acc, 2, 10, 12, 6, 2, keep), 6);
    static const int32_t want[12] = {0, 2, 3, 4, 8, 9, 0, 1, 2, 3, 8, 9};
    assert_memory_equal(keep, want, sizeof want);
    /* No recent share: heavy hitters only. */
    assert_int_equal(model_h2o_select(acc, 1, 10, 12, 3, 0, keep), 3);
    static const int32_t want0[3] = {2, 8, 9};
    assert_memory_equal(keep, want0, sizeof want0);
    assert_int_equal(model_h2o_select(acc, 2, 10, 12, 10, 2, keep), 10);
    for (uint32_t i = 0; i < 20; i++)
        assert_int_equal(keep[i], i % 10);
    assert_int_equal(model_h2o_select(acc, 2, 10, 12, 6, 6, keep), KVS_EINVAL);
    assert_int_equal(model_h2o_select(acc, 2, 10, 9, 6, 2, keep), KVS_EINVAL);
    assert_int_equal(model_h2o_select(acc, 2, 10, 12, 0, 0, keep), KVS_EINVAL);
    assert_int_equal(model_h2o_select(NULL, 2, 10, 12, 6, 2, keep), KVS_EINVAL);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_policy),           cmocka_unit_test(test_identity),
        cmocka_unit_test(test_h2o_scores),       cmocka_unit_test(test_h2o_select),
        cmocka_unit_test(test_select_reference), cmocka_unit_test(test_gather),
        cmocka_unit_test(test_compact),          cmocka_unit_test(test_compact_quant),
        cmocka_unit_test(test_compact_prefix),   cmocka_unit_test(test_attention),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
