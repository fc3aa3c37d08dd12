/*
 * tests/cache/test_kv_host.c — the host tier (cache/kv_host.c): offload and
 * restore of a table, bit for bit, for full-precision and quantized blocks;
 * pool and store accounting; the failure paths (KVS_EINVAL, KVS_ENOSPC,
 * KVS_EAGAIN) changing nothing; shared blocks staying with their other
 * users; and the prefix cache's second level (evicted cached blocks kept,
 * found by kv_prefix_match and brought back).  Every case runs on the "ref"
 * and "cpu" backends, F16 pools without and with a codec (Q4), and checks
 * kv_pool_check and kv_host_check after every mutating call.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "base/kvs.h"
#include "cache/kv.h"
#include "kernels/kern.h"

#define L 2                   /* layers */
#define H 2                   /* KV heads */
#define D 64                  /* head_dim: Q4 needs a multiple of 32 */
#define BT 16                 /* block_tokens */
#define ENTRY (L * H * 2 * D) /* floats of one entry in a snapshot */

typedef void (*case_fn)(kern_backend_t *be, kern_kvq_t q);

/* Runs fn on every backend and codec. */
static void
each(case_fn fn)
{
    static const char *const names[] = {"ref", "cpu"};
    static const kern_kvq_t quants[] = {KERN_KVQ_NONE, KERN_KVQ_Q4};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        kern_backend_t *be = NULL;
        assert_int_equal(kern_backend_new(names[i], &(kern_backend_cfg_t){.n_threads = 2}, &be), 0);
        for (size_t j = 0; j < sizeof quants / sizeof quants[0]; j++)
            fn(be, quants[j]);
        kern_backend_free(be);
    }
}

/* n_hot full-precision blocks, plus n_cold quantized ones with a codec. */
static kv_pool_t *
pool_new(kern_backend_t *be, kern_kvq_t q, uint32_t n_hot, uint32_t n_cold, bool prefix)
{
    kv_pool_cfg_t cfg = {
        .n_layers = L,
        .n_kv_heads = H,
        .head_dim = D,
        .block_tokens = BT,
        .n_blocks = q == KERN_KVQ_NONE ? n_hot : n_hot + n_cold,
        .dtype = KERN_F16,
        .quant = q,
        .n_hot = n_hot,
        .prefix_cache = prefix,
    };
    kv_pool_t *pool = NULL;
    assert_int_equal(kv_pool_new(&cfg, be, &pool), 0);
    return pool;
}

static kv_table_t *
table_new(kv_pool_t *pool)
{
    kv_table_t *t = NULL;
    assert_int_equal(kv_table_new(pool, &t), 0);
    return t;
}

static kv_host_t *
host_new(kv_pool_t *pool, size_t bytes)
{
    kv_host_t *h = NULL;
    assert_int_equal(kv_host_new(pool, bytes, &h), 0);
    return h;
}

/* Deterministic K of (seed, layer, position, head, channel); V is its
 * negation. */
static float
val(uint32_t seed, uint32_t l, uint32_t i, uint32_t h, uint32_t c)
{
    uint32_t x = (seed * 104729u + l * 7919u + i * 131u + h * 17u + c) * 2654435761u;
    return ((float)(x >> 8) / 16777216.0f - 0.5f) * 2.0f;
}

/* Appends n entries at positions len.. and writes their K/V. */
static void
fill(kern_backend_t *be, kv_pool_t *pool, kv_table_t *t, uint32_t n, uint32_t seed)
{
    uint32_t len = kv_table_len(t);
    int32_t *pos = malloc(n * sizeof *pos), *slots = malloc(n * sizeof *slots);
    float *k = malloc((size_t)n * H * D * sizeof *k), *v = malloc((size_t)n * H * D * sizeof *v);
    for (uint32_t i = 0; i < n; i++)
        pos[i] = (int32_t)(len + i);
    assert_int_equal(kv_table_reserve(t, n), 0);
    assert_int_equal(kv_table_append(t, pos, n, slots), 0);
    for (uint32_t l = 0; l < L; l++) {
        for (uint32_t i = 0; i < n; i++)
            for (uint32_t h = 0; h < H; h++)
                for (uint32_t c = 0; c < D; c++) {
                    k[((size_t)i * H + h) * D + c] = val(seed, l, len + i, h, c);
                    v[((size_t)i * H + h) * D + c] = -val(seed, l, len + i, h, c);
                }
        assert_int_equal(kern_kv_append(be, kv_pool_kv(pool), l, k, v, slots, n), 0);
    }
    free(pos);
    free(slots);
    free(k);
    free(v);
}

/* Every entry of t as the kernels read it, entry-major (so a prefix of a
 * snapshot is the snapshot of a prefix). */
static float *
snap(kv_pool_t *pool, const kv_table_t *t)
{
    const kern_kv_t *kv = kv_pool_kv(pool);
    uint32_t len = kv_table_len(t);
    float *s = malloc(((size_t)len + 1) * ENTRY * sizeof *s);
    assert_non_null(s);
    for (uint32_t i = 0; i < len; i++)
        for (uint32_t l = 0; l < L; l++)
            for (uint32_t h = 0; h < H; h++)
                for (int v = 0; v < 2; v++)
                    kern_kv_row_f32(kv, v, l, kv_table_blocks(t)[i / BT], h, i % BT,
                                    s + ((((size_t)i * L + l) * H + h) * 2 + (size_t)v) * D);
    return s;
}

/* t's first n entries are bit for bit those of snapshot want. */
static void
assert_same(kv_pool_t *pool, const kv_table_t *t, const float *want, uint32_t n)
{
    assert_true(kv_table_len(t) >= n);
    float *got = snap(pool, t);
    assert_memory_equal(got, want, (size_t)n * ENTRY * sizeof *got);
    free(got);
}

static uint32_t
n_cold_blocks(const kv_pool_t *pool, const kv_table_t *t)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < kv_table_n_blocks(t); i++)
        n += kv_pool_cfg(pool)->quant != KERN_KVQ_NONE &&
             (uint32_t)kv_table_blocks(t)[i] >= kv_pool_cfg(pool)->n_hot;
    return n;
}

static int32_t *
tokens(uint32_t seed, uint32_t n)
{
    int32_t *tok = malloc(n * sizeof *tok);
    for (uint32_t i = 0; i < n; i++)
        tok[i] = (int32_t)(seed * 100000u + i);
    return tok;
}

static void
checks(const kv_pool_t *pool, const kv_host_t *h)
{
    assert_true(kv_pool_check(pool));
    if (h != NULL)
        assert_true(kv_host_check(h));
}

static kv_host_stats_t
stats(const kv_host_t *h)
{
    kv_host_stats_t s;
    kv_host_stats(h, &s);
    return s;
}

/* ---- swap ----------------------------------------------------------------- */

static void
case_roundtrip(kern_backend_t *be, kern_kvq_t q)
{
    bool quant = q != KERN_KVQ_NONE;
    kv_pool_t *pool = pool_new(be, q, 8, 8, false);
    kv_pool_cfg_t cfg = *kv_pool_cfg(pool);
    uint32_t n_all = kv_pool_n_free(pool);
    kv_table_t *t = table_new(pool);
    fill(be, pool, t, 70, 1); /* 4 full blocks and a partial one */
    if (quant)
        assert_int_equal(kv_table_seal(t, 0, BT), 3);
    assert_int_equal(kv_table_reserve(t, 20), 0); /* one block reserved ahead */
    assert_int_equal(kv_table_n_blocks(t), 6);
    uint32_t n_cold = n_cold_blocks(pool, t);
    assert_int_equal(n_cold, quant ? 3 : 0);
    float *want = snap(pool, t);
    kv_host_t *h = host_new(pool, (size_t)1 << 20);
    checks(pool, h);

    assert_int_equal(kv_table_offload(t, h), 0);
    checks(pool, h);
    assert_true(kv_table_offloaded(t));
    assert_int_equal(kv_table_n_blocks(t), 0);
    assert_int_equal(kv_table_len(t), 70);
    assert_int_equal(kv_table_next_pos(t), 70);
    for (uint32_t i = 0; i < 70; i++)
        assert_int_equal(kv_table_positions(t)[i], (int32_t)i);
    /* Every block is back, the one reserved ahead too. */
    assert_int_equal(kv_pool_n_free(pool), n_all);
    kv_host_stats_t s = stats(h);
    size_t bytes =
        (5 - n_cold) * kv_pool_block_bytes(&cfg) + n_cold * kv_pool_quant_block_bytes(&cfg);
    assert_int_equal(s.offloaded_blocks, 5);
    assert_int_equal(s.swapped_blocks, 5);
    assert_int_equal(s.bytes_used, bytes);
    assert_int_equal(s.bytes_cap, (size_t)1 << 20);

    /* Overwrite every block the pool has, so that only the store can give
     * t its KV back. */
    kv_table_t *g = table_new(pool);
    fill(be, pool, g, 8 * BT, 2);
    if (quant) {
        assert_int_equal(kv_table_seal(g, 0, 0), 8);
        fill(be, pool, g, 8 * BT, 3);
    }
    assert_int_equal(kv_pool_n_free(pool), 0);
    kv_table_free(g);
    checks(pool, h);

    assert_int_equal(kv_table_restore(t, h), 0);
    checks(pool, h);
    assert_false(kv_table_offloaded(t));
    assert_int_equal(kv_table_n_blocks(t), 5);
    assert_int_equal(n_cold_blocks(pool, t), n_cold);
    assert_int_equal(kv_pool_n_free(pool), n_all - 5);
    assert_same(pool, t, want, 70);
    s = stats(h);
    assert_int_equal(s.restored_blocks, 5);
    assert_int_equal(s.swapped_blocks, 0);
    assert_int_equal(s.bytes_used, 0);

    /* The table goes on as before. */
    fill(be, pool, t, 30, 1);
    checks(pool, h);
    assert_same(pool, t, want, 70);

    /* Twice more: the store is reusable. */
    for (int r = 0; r < 2; r++) {
        float *w2 = snap(pool, t);
        assert_int_equal(kv_table_offload(t, h), 0);
        checks(pool, h);
        assert_int_equal(kv_table_restore(t, h), 0);
        checks(pool, h);
        assert_same(pool, t, w2, 100);
        free(w2);
    }
    free(want);
    kv_table_free(t);
    kv_host_free(h);
    kv_pool_free(pool);
}

static void
test_roundtrip(void **state)
{
    (void)state;
    each(case_roundtrip);
}

static void
case_args(kern_backend_t *be, kern_kvq_t q)
{
    kv_pool_t *pool = pool_new(be, q, 8, 8, true);
    kv_pool_t *other = pool_new(be, q, 8, 8, true);
    kv_host_t *h = NULL, *ho = host_new(other, 1 << 20);
    assert_int_equal(kv_host_new(pool, 0, &h), KVS_EINVAL);
    assert_null(h);
    assert_int_equal(kv_host_new(NULL, 1 << 20, &h), KVS_EINVAL);
    h = host_new(pool, 1 << 20);
    kv_host_t *h2 = NULL;
    assert_int_equal(kv_host_new(pool, 1 << 20, &h2), KVS_EINVAL); /* one per pool */
    assert_null(h2);

    kv_table_t *t = table_new(pool);
    assert_int_equal(kv_table_offload(t, h), KVS_EINVAL); /* empty */
    fill(be, pool, t, 40, 1);
    assert_int_equal(kv_table_offload(t, NULL), KVS_EINVAL);
    assert_int_equal(kv_table_offload(t, ho), KVS_EINVAL); /* another pool's */
    assert_int_equal(kv_table_restore(t, h), KVS_EINVAL);  /* not offloaded */
    checks(pool, h);
    assert_false(kv_table_offloaded(t));

    int32_t *tok = tokens(1, 40);
    assert_int_equal(kv_table_offload(t, h), 0);
    assert_int_equal(kv_table_offload(t, h), KVS_EINVAL);
    assert_int_equal(kv_table_restore(t, ho), KVS_EINVAL);
    assert_int_equal(kv_table_restore(t, NULL), KVS_EINVAL);
    /* An offloaded table holds no block: nothing may touch them. */
    int32_t pos = 40, slot;
    kv_table_t *c = NULL;
    uint32_t matched = 7;
    assert_int_equal(kv_table_reserve(t, 1), KVS_EINVAL);
    assert_int_equal(kv_table_append(t, &pos, 1, &slot), KVS_ENOSPC);
    assert_int_equal(kv_table_truncate(t, 16), KVS_EINVAL);
    assert_int_equal(kv_table_fork(t, &c), KVS_EINVAL);
    assert_null(c);
    assert_int_equal(kv_table_seal(t, 0, 0), KVS_EINVAL);
    assert_int_equal(kv_prefix_commit(t, tok, 40, 0), KVS_EINVAL);
    assert_int_equal(kv_prefix_match(t, tok, 40, 0, &matched), KVS_EINVAL);
    checks(pool, h);
    assert_int_equal(kv_table_len(t), 40);
    assert_int_equal(stats(h).swapped_blocks, 3);
    assert_int_equal(kv_table_restore(t, h), 0);
    checks(pool, h);
    free(tok);
    kv_table_free(t);
    kv_host_free(h);
    kv_host_free(ho);
    kv_host_free(NULL);
    kv_pool_free(pool);
    kv_pool_free(other);
}

static void
test_args(void **state)
{
    (void)state;
    each(case_args);
}

/* Refcounts, block ids and contents of t and the pool, to show a failed
 * call changed nothing. */
typedef struct pool_state {
    uint32_t n_free, n_free_cold, n_blocks, len;
    int32_t blocks[16];
    uint32_t refs[32];
    kv_host_stats_t hs;
} pool_state_t;

static pool_state_t
state_of(const kv_pool_t *pool, const kv_table_t *t, const kv_host_t *h)
{
    pool_state_t s;
    memset(&s, 0, sizeof s);
    s.n_free = kv_pool_n_free(pool);
    s.n_free_cold = kv_pool_n_free_kind(pool, true);
    s.n_blocks = kv_table_n_blocks(t);
    s.len = kv_table_len(t);
    assert_true(s.n_blocks <= 16 && kv_pool_cfg(pool)->n_blocks <= 32);
    memcpy(s.blocks, kv_table_blocks(t), s.n_blocks * sizeof s.blocks[0]);
    for (uint32_t b = 0; b < kv_pool_cfg(pool)->n_blocks; b++)
        s.refs[b] = kv_pool_refcount(pool, (int32_t)b);
    kv_host_stats(h, &s.hs);
    return s;
}

static void
assert_state(const kv_pool_t *pool, const kv_table_t *t, const kv_host_t *h, const pool_state_t *a)
{
    pool_state_t b = state_of(pool, t, h);
    assert_memory_equal(&b, a, sizeof b);
}

static void
case_enospc(kern_backend_t *be, kern_kvq_t q)
{
    kv_pool_t *pool = pool_new(be, q, 8, 8, false);
    size_t hb = kv_pool_block_bytes(kv_pool_cfg(pool));
    kv_host_t *h = host_new(pool, 2 * hb); /* less than t's 3 blocks */
    kv_table_t *t = table_new(pool);
    fill(be, pool, t, 40, 1);
    float *want = snap(pool, t);
    pool_state_t before = state_of(pool, t, h);
    assert_int_equal(kv_table_offload(t, h), KVS_ENOSPC);
    assert_false(kv_table_offloaded(t));
    assert_state(pool, t, h, &before);
    assert_same(pool, t, want, 40);
    checks(pool, h);
    kv_table_free(t);
    kv_host_free(h);

    /* Room taken by another offloaded table. */
    h = host_new(pool, 4 * hb);
    kv_table_t *t1 = table_new(pool), *t2 = table_new(pool);
    fill(be, pool, t1, 48, 1);
    fill(be, pool, t2, 20, 2);
    assert_int_equal(kv_table_offload(t1, h), 0);
    before = state_of(pool, t2, h);
    assert_int_equal(kv_table_offload(t2, h), KVS_ENOSPC);
    assert_state(pool, t2, h, &before);
    checks(pool, h);
    /* Freeing an offloaded table frees its copies: now t2 fits. */
    kv_table_free(t1);
    checks(pool, h);
    assert_int_equal(stats(h).bytes_used, 0);
    assert_int_equal(stats(h).swapped_blocks, 0);
    assert_int_equal(kv_table_offload(t2, h), 0);
    checks(pool, h);
    kv_table_free(t2);
    checks(pool, h);
    assert_int_equal(stats(h).bytes_used, 0);
    free(want);
    kv_host_free(h);
    kv_pool_free(pool);
}

static void
test_enospc(void **state)
{
    (void)state;
    each(case_enospc);
}

static void
case_eagain(kern_backend_t *be, kern_kvq_t q)
{
    bool quant = q != KERN_KVQ_NONE;
    kv_pool_t *pool = pool_new(be, q, 8, 4, false);
    kv_host_t *h = host_new(pool, 1 << 20);
    kv_table_t *t = table_new(pool);
    fill(be, pool, t, 70, 1);
    if (quant)
        assert_int_equal(kv_table_seal(t, 0, BT), 3);
    float *want = snap(pool, t);
    assert_int_equal(kv_table_offload(t, h), 0);

    /* No full-precision block left. */
    kv_table_t *hog = table_new(pool);
    fill(be, pool, hog, 8 * BT, 2);
    pool_state_t before = state_of(pool, t, h);
    assert_int_equal(kv_table_restore(t, h), KVS_EAGAIN);
    assert_true(kv_table_offloaded(t));
    assert_state(pool, t, h, &before);
    checks(pool, h);
    kv_table_free(hog);

    if (quant) {
        /* Full-precision blocks to spare, but no quantized one. */
        hog = table_new(pool);
        fill(be, pool, hog, 5 * BT, 2);
        assert_int_equal(kv_table_seal(hog, 0, 0), 4);
        assert_int_equal(kv_pool_n_free_kind(pool, true), 0);
        assert_true(kv_pool_n_free_kind(pool, false) >= 2);
        before = state_of(pool, t, h);
        assert_int_equal(kv_table_restore(t, h), KVS_EAGAIN);
        assert_state(pool, t, h, &before);
        checks(pool, h);
        kv_table_free(hog);
    }
    assert_int_equal(kv_table_restore(t, h), 0);
    checks(pool, h);
    assert_int_equal(n_cold_blocks(pool, t), quant ? 3 : 0);
    assert_same(pool, t, want, 70);
    free(want);
    kv_table_free(t);
    kv_host_free(h);
    kv_pool_free(pool);
}

static void
test_eagain(void **state)
{
    (void)state;
    each(case_eagain);
}

static void
case_fork(kern_backend_t *be, kern_kvq_t q)
{
    bool quant = q != KERN_KVQ_NONE;
    kv_pool_t *pool = pool_new(be, q, 12, 8, false);
    kv_host_t *h = host_new(pool, 1 << 20);
    kv_table_t *t = table_new(pool), *c = NULL;
    fill(be, pool, t, 70, 1);
    if (quant)
        assert_int_equal(kv_table_seal(t, 0, BT), 3);
    assert_int_equal(kv_table_fork(t, &c), 0);
    int32_t shared[4];
    memcpy(shared, kv_table_blocks(t), sizeof shared);
    float *want = snap(pool, t);
    uint32_t n_free = kv_pool_n_free(pool);

    assert_int_equal(kv_table_offload(t, h), 0);
    checks(pool, h);
    /* Only t's private partial block came back; the shared ones are c's. */
    assert_int_equal(kv_pool_n_free(pool), n_free + 1);
    for (int i = 0; i < 4; i++) {
        assert_int_equal(kv_pool_refcount(pool, shared[i]), 1);
        assert_int_equal(kv_table_blocks(c)[i], shared[i]);
    }
    assert_same(pool, c, want, 70);

    assert_int_equal(kv_table_restore(t, h), 0);
    checks(pool, h);
    /* t's blocks are its own now, with the same contents. */
    assert_int_equal(kv_pool_n_free(pool), n_free + 1 - 5);
    for (int i = 0; i < 4; i++) {
        assert_int_not_equal(kv_table_blocks(t)[i], shared[i]);
        assert_int_equal(kv_pool_refcount(pool, kv_table_blocks(t)[i]), 1);
    }
    assert_int_equal(n_cold_blocks(pool, t), quant ? 3 : 0);
    assert_same(pool, t, want, 70);
    assert_same(pool, c, want, 70);

    /* The other way round: c offloaded, t keeps running. */
    assert_int_equal(kv_table_offload(c, h), 0);
    checks(pool, h);
    fill(be, pool, t, 10, 1);
    assert_same(pool, t, want, 70);
    kv_table_free(c); /* frees c's copies */
    checks(pool, h);
    assert_int_equal(stats(h).bytes_used, 0);
    free(want);
    kv_table_free(t);
    kv_host_free(h);
    kv_pool_free(pool);
}

static void
test_fork(void **state)
{
    (void)state;
    each(case_fork);
}

/* ---- the prefix cache's second level --------------------------------------- */

/* A: 65 tokens of seed 1 written, sealed with a codec (blocks 0..2 become
 * quantized) and committed (blocks 0..3 cached), then freed.  Returns the
 * snapshot of its 64 first entries. */
static float *
commit_a(kern_backend_t *be, kv_pool_t *pool, const int32_t *tok)
{
    kv_table_t *a = table_new(pool);
    fill(be, pool, a, 65, 1);
    if (kv_pool_cfg(pool)->quant != KERN_KVQ_NONE)
        assert_int_equal(kv_table_seal(a, 0, BT), 3);
    assert_int_equal(kv_prefix_commit(a, tok, 65, 0), 0);
    float *s = snap(pool, a);
    kv_table_free(a);
    return s;
}

/* Takes every block of the pool (evicting every cached one) with a table
 * of seed 2, uncommitted, and returns it. */
static kv_table_t *
take_all(kern_backend_t *be, kv_pool_t *pool)
{
    kv_table_t *b = table_new(pool);
    const kv_pool_cfg_t *cfg = kv_pool_cfg(pool);
    fill(be, pool, b, cfg->n_hot * BT, 2);
    if (cfg->quant != KERN_KVQ_NONE)
        assert_int_equal(kv_table_seal(b, 0, 0), (int)(cfg->n_blocks - cfg->n_hot));
    return b;
}

static void
case_prefix_level2(kern_backend_t *be, kern_kvq_t q)
{
    bool quant = q != KERN_KVQ_NONE;
    kv_pool_t *pool = pool_new(be, q, 6, 6, true);
    kv_host_t *h = host_new(pool, 1 << 20);
    int32_t *tok = tokens(1, 65);
    float *want = commit_a(be, pool, tok);
    kv_prefix_stats_t ps;
    kv_pool_prefix_stats(pool, &ps);
    assert_int_equal(ps.cached_blocks, 4);

    kv_table_t *b = take_all(be, pool);
    checks(pool, h);
    kv_host_stats_t s = stats(h);
    assert_int_equal(s.kept_blocks, 4);
    assert_int_equal(s.prefix_blocks, 4);
    assert_int_equal(s.dropped_blocks, 0);
    kv_pool_prefix_stats(pool, &ps);
    assert_int_equal(ps.cached_blocks, 0);
    assert_int_equal(ps.evictions, 4);

    /* No block to bring them back into: no match, the copies stay. */
    kv_table_t *m = table_new(pool);
    uint32_t matched = 99;
    assert_int_equal(kv_prefix_match(m, tok, 65, 0, &matched), 0);
    assert_int_equal(matched, 0);
    assert_int_equal(stats(h).prefix_blocks, 4);
    checks(pool, h);
    kv_table_free(b);

    assert_int_equal(kv_prefix_match(m, tok, 65, 0, &matched), 0);
    checks(pool, h);
    assert_int_equal(matched, 64);
    assert_int_equal(kv_table_len(m), 64);
    assert_int_equal(kv_table_n_blocks(m), 4);
    assert_int_equal(kv_table_next_pos(m), 64);
    assert_int_equal(n_cold_blocks(pool, m), quant ? 3 : 0);
    assert_same(pool, m, want, 64);
    s = stats(h);
    assert_int_equal(s.hit_tokens, 64);
    assert_int_equal(s.prefix_blocks, 0);
    assert_int_equal(s.bytes_used, 0);
    kv_pool_prefix_stats(pool, &ps);
    assert_int_equal(ps.hit_tokens, 64);
    assert_int_equal(ps.cached_blocks, 4); /* cached in the pool again */

    /* A second match finds them in the pool. */
    kv_table_t *m2 = table_new(pool);
    assert_int_equal(kv_prefix_match(m2, tok, 65, 0, &matched), 0);
    assert_int_equal(matched, 64);
    for (int i = 0; i < 4; i++)
        assert_int_equal(kv_table_blocks(m2)[i], kv_table_blocks(m)[i]);
    assert_int_equal(stats(h).hit_tokens, 64);
    /* Another extra key finds nothing. */
    kv_table_t *m3 = table_new(pool);
    assert_int_equal(kv_prefix_match(m3, tok, 65, 1, &matched), 0);
    assert_int_equal(matched, 0);
    checks(pool, h);
    /* The matched table goes on. */
    fill(be, pool, m, 1, 1);
    checks(pool, h);
    kv_table_free(m);
    kv_table_free(m2);
    kv_table_free(m3);
    checks(pool, h);
    free(want);
    free(tok);
    kv_host_free(h);
    kv_pool_free(pool);
}

static void
test_prefix_level2(void **state)
{
    (void)state;
    each(case_prefix_level2);
}

/* Part of the chain in the pool, the rest in the store. */
static void
case_prefix_split(kern_backend_t *be, kern_kvq_t q)
{
    if (q != KERN_KVQ_NONE)
        return; /* the kinds are covered above; this is about the order */
    kv_pool_t *pool = pool_new(be, q, 6, 0, true);
    kv_host_t *h = host_new(pool, 1 << 20);
    int32_t *tok = tokens(1, 65);
    float *want = commit_a(be, pool, tok);
    /* 3 blocks: the 2 free ones and the LRU head, A's last block. */
    kv_table_t *b = table_new(pool);
    fill(be, pool, b, 3 * BT, 2);
    assert_int_equal(stats(h).kept_blocks, 1);
    kv_table_free(b);
    kv_table_t *m = table_new(pool);
    uint32_t matched = 0;
    assert_int_equal(kv_prefix_match(m, tok, 65, 0, &matched), 0);
    checks(pool, h);
    assert_int_equal(matched, 64);
    assert_same(pool, m, want, 64);
    assert_int_equal(stats(h).hit_tokens, BT);
    kv_table_free(m);

    /* A match leaves one token to compute: 64 tokens match 3 blocks, and
     * the store's copy is not taken. */
    b = take_all(be, pool);
    kv_table_free(b);
    assert_int_equal(stats(h).prefix_blocks, 4);
    m = table_new(pool);
    assert_int_equal(kv_prefix_match(m, tok, 64, 0, &matched), 0);
    assert_int_equal(matched, 48);
    assert_int_equal(stats(h).prefix_blocks, 1);
    assert_same(pool, m, want, 48);
    checks(pool, h);
    kv_table_free(m);
    free(want);
    free(tok);
    kv_host_free(h);
    kv_pool_free(pool);
}

static void
test_prefix_split(void **state)
{
    (void)state;
    each(case_prefix_split);
}

/* The store's copy in the middle of a chain whose later blocks the pool
 * still holds: the match goes back to the pool after it. */
static void
case_prefix_middle(kern_backend_t *be, kern_kvq_t q)
{
    if (q != KERN_KVQ_NONE)
        return;
    kv_pool_t *pool = pool_new(be, q, 8, 0, true);
    kv_host_t *h = host_new(pool, 1 << 20);
    int32_t *tok = tokens(1, 65);
    float *want = commit_a(be, pool, tok);
    kv_table_t *m1 = table_new(pool);
    uint32_t matched = 0;
    assert_int_equal(kv_prefix_match(m1, tok, 65, 0, &matched), 0);
    assert_int_equal(matched, 64);
    /* Drops block 1 (after one sink block) into the LRU list, alone. */
    assert_int_equal(kv_table_evict(m1, BT, 3 * BT), 1);
    kv_table_t *b = table_new(pool);
    fill(be, pool, b, 5 * BT, 2); /* 4 free blocks and block 1 */
    kv_host_stats_t s = stats(h);
    assert_int_equal(s.kept_blocks, 1);
    kv_table_free(b);
    kv_table_free(m1);
    checks(pool, h);

    kv_table_t *m = table_new(pool);
    assert_int_equal(kv_prefix_match(m, tok, 65, 0, &matched), 0);
    checks(pool, h);
    assert_int_equal(matched, 64);
    assert_int_not_equal(kv_table_blocks(m)[1], -1);
    assert_same(pool, m, want, 64);
    s = stats(h);
    assert_int_equal(s.hit_tokens, BT);
    assert_int_equal(s.prefix_blocks, 0);
    kv_table_free(m);
    free(want);
    free(tok);
    kv_host_free(h);
    kv_pool_free(pool);
}

static void
test_prefix_middle(void **state)
{
    (void)state;
    each(case_prefix_middle);
}

/* The store evicts its own oldest prefix copies for room, and drops what
 * it cannot hold; the allocations never notice. */
static void
case_prefix_room(kern_backend_t *be, kern_kvq_t q)
{
    if (q != KERN_KVQ_NONE)
        return;
    kv_pool_t *pool = pool_new(be, q, 6, 0, true);
    size_t hb = kv_pool_block_bytes(kv_pool_cfg(pool));
    kv_host_t *h = host_new(pool, 2 * hb);
    int32_t *tok = tokens(1, 65);
    float *want = commit_a(be, pool, tok);
    kv_table_t *b = take_all(be, pool);
    checks(pool, h);
    /* Evicted tail first (3, 2, 1, 0): the store ends with 1 and 0. */
    kv_host_stats_t s = stats(h);
    assert_int_equal(s.kept_blocks, 4);
    assert_int_equal(s.prefix_evictions, 2);
    assert_int_equal(s.prefix_blocks, 2);
    assert_int_equal(s.bytes_used, 2 * hb);
    kv_table_free(b);
    kv_table_t *m = table_new(pool);
    uint32_t matched = 0;
    assert_int_equal(kv_prefix_match(m, tok, 65, 0, &matched), 0);
    assert_int_equal(matched, 2 * BT);
    assert_same(pool, m, want, 2 * BT);
    checks(pool, h);
    kv_table_free(m);
    kv_host_free(h);

    /* Room for no block: every eviction is dropped. */
    h = host_new(pool, hb - 1);
    kv_prefix_stats_t ps0, ps1;
    kv_pool_prefix_stats(pool, &ps0);
    free(want);
    want = commit_a(be, pool, tok);
    b = take_all(be, pool);
    checks(pool, h);
    kv_pool_prefix_stats(pool, &ps1);
    s = stats(h);
    assert_true(ps1.evictions - ps0.evictions >= 4);
    assert_int_equal(s.kept_blocks, 0);
    assert_int_equal(s.dropped_blocks, ps1.evictions - ps0.evictions);
    assert_int_equal(s.bytes_used, 0);
    kv_table_free(b);
    m = table_new(pool);
    assert_int_equal(kv_prefix_match(m, tok, 65, 0, &matched), 0);
    assert_int_equal(matched, 0);
    kv_table_free(m);
    free(want);
    free(tok);
    kv_host_free(h);
    kv_pool_free(pool);
}

static void
test_prefix_room(void **state)
{
    (void)state;
    each(case_prefix_room);
}

/* Swapped-out tables come first: an offload evicts prefix copies, and
 * prefix copies never evict a swapped-out table's. */
static void
case_swap_first(kern_backend_t *be, kern_kvq_t q)
{
    bool quant = q != KERN_KVQ_NONE;
    kv_pool_t *pool = pool_new(be, q, 6, 6, true);
    const kv_pool_cfg_t *cfg = kv_pool_cfg(pool);
    size_t hb = kv_pool_block_bytes(cfg), qb = kv_pool_quant_block_bytes(cfg);
    /* Room for A's 4 copies: 3 quantized and 1 full-precision, or 4
     * full-precision ones. */
    size_t a_bytes = quant ? 3 * qb + hb : 4 * hb;
    uint32_t t_blocks = quant ? 1 : 2;
    kv_host_t *h = host_new(pool, a_bytes);
    int32_t *tok = tokens(1, 65);
    float *want = commit_a(be, pool, tok);
    kv_table_t *b = take_all(be, pool);
    kv_table_free(b);
    kv_host_stats_t s = stats(h);
    assert_int_equal(s.prefix_blocks, 4);
    assert_int_equal(s.bytes_used, a_bytes);

    /* t: full-precision blocks, uncommitted.  Its copies take the place
     * of the oldest prefix copies. */
    kv_table_t *t = table_new(pool);
    fill(be, pool, t, t_blocks * BT, 3);
    float *tw = snap(pool, t);
    assert_int_equal(kv_table_offload(t, h), 0);
    checks(pool, h);
    s = stats(h);
    assert_int_equal(s.swapped_blocks, t_blocks);
    assert_true(s.prefix_evictions >= 1);
    assert_true(s.prefix_blocks < 4);

    /* Commit and evict more: the store keeps what fits beside t's copies,
     * which survive every round. */
    for (uint32_t seed = 4; seed < 8; seed++) {
        int32_t *tk = tokens(seed, 65);
        kv_table_t *c = table_new(pool);
        fill(be, pool, c, 65, seed);
        assert_int_equal(kv_prefix_commit(c, tk, 65, 0), 0);
        kv_table_free(c);
        b = take_all(be, pool);
        kv_table_free(b);
        checks(pool, h);
        assert_int_equal(stats(h).swapped_blocks, t_blocks);
        free(tk);
    }
    s = stats(h);
    if (!quant) { /* beside t's 2 copies, 2 prefix copies fit */
        assert_true(s.kept_blocks > 4);
        assert_int_equal(s.prefix_blocks, 2);
    } else { /* beside t's copy, less than a full-precision block is left */
        assert_int_equal(s.kept_blocks, 4);
        assert_true(s.dropped_blocks >= 16);
    }

    /* A store full of swapped-out copies drops every evicted block. */
    kv_table_t *t2 = table_new(pool);
    fill(be, pool, t2, 2 * BT, 9);
    float *tw2 = snap(pool, t2);
    if (!quant) {
        assert_int_equal(kv_table_offload(t2, h), 0);
        assert_int_equal(stats(h).prefix_blocks, 0);
        assert_int_equal(stats(h).bytes_used, a_bytes);
        kv_prefix_stats_t ps0, ps1;
        kv_pool_prefix_stats(pool, &ps0);
        uint64_t dropped = stats(h).dropped_blocks;
        int32_t *tk = tokens(10, 65);
        kv_table_t *c = table_new(pool);
        fill(be, pool, c, 65, 10);
        assert_int_equal(kv_prefix_commit(c, tk, 65, 0), 0);
        kv_table_free(c);
        b = take_all(be, pool);
        kv_table_free(b);
        checks(pool, h);
        kv_pool_prefix_stats(pool, &ps1);
        assert_true(ps1.evictions - ps0.evictions >= 4);
        assert_int_equal(stats(h).dropped_blocks, dropped + (ps1.evictions - ps0.evictions));
        assert_int_equal(stats(h).swapped_blocks, 4);
        free(tk);
        assert_int_equal(kv_table_restore(t2, h), 0);
        checks(pool, h);
    }
    assert_same(pool, t2, tw2, 2 * BT);
    assert_int_equal(kv_table_restore(t, h), 0);
    checks(pool, h);
    assert_same(pool, t, tw, t_blocks * BT);
    kv_table_free(t);
    kv_table_free(t2);
    free(tw);
    free(tw2);
    free(want);
    free(tok);
    kv_host_free(h);
    kv_pool_free(pool);
}

static void
test_swap_first(void **state)
{
    (void)state;
    each(case_swap_first);
}

/* A block recomputed, committed and evicted again while the store still
 * holds its key: a copy of the same kind is only refreshed, one of the
 * other kind (quantized, the block now full precision) replaced. */
static void
case_prefix_dup(kern_backend_t *be, kern_kvq_t q)
{
    bool quant = q != KERN_KVQ_NONE;
    kv_pool_t *pool = pool_new(be, q, 6, 6, true);
    size_t hb = kv_pool_block_bytes(kv_pool_cfg(pool));
    kv_host_t *h = host_new(pool, 1 << 20);
    int32_t *tok = tokens(1, 65);
    float *want_a = commit_a(be, pool, tok);
    kv_table_t *b = take_all(be, pool);
    kv_table_free(b);
    kv_host_stats_t s0 = stats(h);
    assert_int_equal(s0.prefix_blocks, 4);

    /* The same prompt recomputed without a match (and never sealed). */
    kv_table_t *r = table_new(pool);
    fill(be, pool, r, 65, 1);
    assert_int_equal(kv_prefix_commit(r, tok, 65, 0), 0);
    float *want_r = snap(pool, r);
    kv_table_free(r);
    b = take_all(be, pool);
    kv_table_free(b);
    checks(pool, h);
    kv_host_stats_t s = stats(h);
    assert_int_equal(s.kept_blocks, s0.kept_blocks + 4);
    assert_int_equal(s.prefix_blocks, 4);
    assert_int_equal(s.bytes_used, 4 * hb); /* quantized copies replaced */

    kv_table_t *m = table_new(pool);
    uint32_t matched = 0;
    assert_int_equal(kv_prefix_match(m, tok, 65, 0, &matched), 0);
    assert_int_equal(matched, 64);
    assert_int_equal(n_cold_blocks(pool, m), 0);
    assert_same(pool, m, want_r, 64);
    if (!quant) /* full precision both times: the same bits */
        assert_same(pool, m, want_a, 64);
    checks(pool, h);
    kv_table_free(m);
    free(want_a);
    free(want_r);
    free(tok);
    kv_host_free(h);
    kv_pool_free(pool);
}

static void
test_prefix_dup(void **state)
{
    (void)state;
    each(case_prefix_dup);
}

/* A deterministic mixed workload: many tables, offloads, restores,
 * matches and commits against a small pool and store, checking every
 * invariant and every restored table's contents as it goes. */
static void
case_stress(kern_backend_t *be, kern_kvq_t q)
{
    kv_pool_t *pool = pool_new(be, q, 12, 6, true);
    size_t hb = kv_pool_block_bytes(kv_pool_cfg(pool));
    kv_host_t *h = host_new(pool, 10 * hb);
    enum { N = 5 };
    kv_table_t *t[N] = {0};
    float *w[N] = {0};
    uint32_t seed[N] = {0};
    int32_t *tok[N] = {0};
    uint32_t x = 12345;
    for (int step = 0; step < 300; step++) {
        x = x * 1103515245u + 12345u;
        int i = (int)((x >> 16) % N);
        uint32_t op = (x >> 8) % 6;
        if (t[i] == NULL) {
            /* A new sequence: one of 3 prompts, matched first. */
            seed[i] = 1 + (x >> 4) % 3;
            tok[i] = tokens(seed[i], 100);
            t[i] = table_new(pool);
            uint32_t matched = 0;
            assert_int_equal(kv_prefix_match(t[i], tok[i], 70, 0, &matched), 0);
            if (kv_table_reserve(t[i], 70 - matched) != 0) {
                kv_table_free(t[i]);
                t[i] = NULL;
                free(tok[i]);
                tok[i] = NULL;
                continue;
            }
            fill(be, pool, t[i], 70 - matched, seed[i]);
            if (q != KERN_KVQ_NONE)
                assert_true(kv_table_seal(t[i], 0, BT) >= 0);
            assert_int_equal(kv_prefix_commit(t[i], tok[i], 70, 0), 0);
        } else if (op == 0 || op == 1) {
            if (!kv_table_offloaded(t[i])) {
                free(w[i]);
                w[i] = snap(pool, t[i]);
                int rc = kv_table_offload(t[i], h);
                assert_true(rc == 0 || rc == KVS_ENOSPC);
            } else {
                int rc = kv_table_restore(t[i], h);
                assert_true(rc == 0 || rc == KVS_EAGAIN);
                if (rc == 0)
                    assert_same(pool, t[i], w[i], kv_table_len(t[i]));
            }
        } else if (op == 2 && !kv_table_offloaded(t[i]) && kv_table_len(t[i]) < 100) {
            uint32_t n = 100 - kv_table_len(t[i]);
            if (n > 10)
                n = 10;
            if (kv_table_reserve(t[i], n) == 0) {
                fill(be, pool, t[i], n, seed[i]);
                assert_int_equal(kv_prefix_commit(t[i], tok[i], kv_table_len(t[i]), 0), 0);
            }
        } else if (op == 3) {
            kv_table_free(t[i]);
            t[i] = NULL;
            free(tok[i]);
            tok[i] = NULL;
        }
        checks(pool, h);
    }
    for (int i = 0; i < N; i++) {
        kv_table_free(t[i]);
        free(w[i]);
        free(tok[i]);
    }
    checks(pool, h);
    kv_host_stats_t s = stats(h);
    assert_int_equal(s.swapped_blocks, 0);
    assert_true(s.offloaded_blocks > 0 && s.restored_blocks > 0);
    assert_true(s.kept_blocks > 0 && s.hit_tokens > 0 && s.prefix_evictions > 0);
    kv_host_free(h);
    kv_pool_free(pool);
}

static void
test_stress(void **state)
{
    (void)state;
    each(case_stress);
}

/* Copies live in slots that are reused: a full store that keeps one
 * block and evicts another takes no new memory, so after many rounds it
 * has allocated no more slots than it can hold plus one of each kind; a
 * table offloaded again after its restore goes into the slots the restore
 * freed; and the free lists stay within their limit (kv_host_check). */
static void
case_slot_reuse(kern_backend_t *be, kern_kvq_t q)
{
    kv_pool_t *pool = pool_new(be, q, 6, 6, true);
    const kv_pool_cfg_t *cfg = kv_pool_cfg(pool);
    size_t hb = kv_pool_block_bytes(cfg), qb = kv_pool_quant_block_bytes(cfg);
    size_t cap = 4 * hb, smallest = q != KERN_KVQ_NONE && qb < hb ? qb : hb;
    kv_host_t *h = host_new(pool, cap);
    for (uint32_t seed = 1; seed <= 12; seed++) {
        int32_t *tk = tokens(seed, 65);
        kv_table_t *c = table_new(pool);
        fill(be, pool, c, 65, seed);
        assert_int_equal(kv_prefix_commit(c, tk, 65, 0), 0);
        kv_table_free(c);
        kv_table_t *b = take_all(be, pool);
        kv_table_free(b);
        checks(pool, h);
        free(tk);
    }
    kv_host_stats_t s = stats(h);
    assert_true(s.kept_blocks >= 12 * 4);
    assert_true(s.slot_allocs <= cap / smallest + 2);
    assert_true(s.slot_allocs < s.kept_blocks);

    kv_table_t *t = table_new(pool);
    fill(be, pool, t, 2 * BT, 3);
    float *tw = snap(pool, t);
    assert_int_equal(kv_table_offload(t, h), 0);
    checks(pool, h);
    assert_int_equal(kv_table_restore(t, h), 0);
    checks(pool, h);
    uint64_t allocs = stats(h).slot_allocs;
    assert_int_equal(kv_table_offload(t, h), 0);
    checks(pool, h);
    assert_int_equal(stats(h).slot_allocs, allocs);
    assert_int_equal(kv_table_restore(t, h), 0);
    checks(pool, h);
    assert_same(pool, t, tw, 2 * BT);
    kv_table_free(t);
    free(tw);
    kv_host_free(h);
    kv_pool_free(pool);
}

static void
test_slot_reuse(void **state)
{
    (void)state;
    each(case_slot_reuse);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),    cmocka_unit_test(test_args),
        cmocka_unit_test(test_enospc),       cmocka_unit_test(test_eagain),
        cmocka_unit_test(test_fork),         cmocka_unit_test(test_prefix_level2),
        cmocka_unit_test(test_prefix_split), cmocka_unit_test(test_prefix_middle),
        cmocka_unit_test(test_prefix_room),  cmocka_unit_test(test_swap_first),
        cmocka_unit_test(test_prefix_dup),   cmocka_unit_test(test_stress),
        cmocka_unit_test(test_slot_reuse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
