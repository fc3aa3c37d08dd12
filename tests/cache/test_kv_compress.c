/*
 * tests/cache/test_kv_compress.c — what lets a table hold less than its
 * whole KV.  StreamingLLM eviction (kv_table_evict): sinks and window
 * kept, middle blocks freed, positions and the pinned prefix's identity
 * intact.  A pool with quantized blocks: the two
 * kinds of block and their free lists, kv_table_seal (what it seals and
 * what it must leave alone: sinks, the partial tail, the residual window,
 * shared and cached blocks), reopening a sealed block by truncate or fork
 * (decoded back into full precision), the prefix cache over both kinds,
 * and that every operation keeps kv_pool_check's invariants.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "base/kvs.h"
#include "cache/kv.h"
#include "kernels/kern.h"

#define D 64  /* head_dim: the codecs need a multiple of 32 */
#define BT 16 /* block_tokens */

static kv_pool_cfg_t
qcfg(kern_kvq_t q, uint32_t n_blocks, uint32_t n_hot, bool prefix)
{
    return (kv_pool_cfg_t){.n_layers = 2,
                           .n_kv_heads = 2,
                           .head_dim = D,
                           .block_tokens = BT,
                           .n_blocks = n_blocks,
                           .dtype = KERN_F32,
                           .quant = q,
                           .n_hot = n_hot,
                           .prefix_cache = prefix};
}

static int
setup(void **state)
{
    kern_backend_t *be = NULL;
    if (kern_backend_new("cpu", &(kern_backend_cfg_t){.n_threads = 2}, &be) != 0)
        return -1;
    *state = be;
    return 0;
}

static int
teardown(void **state)
{
    kern_backend_free(*state);
    return 0;
}

/* Deterministic K/V of token i, head h, layer l, channel c (V negated). */
static float
val(uint32_t l, uint32_t i, uint32_t h, uint32_t c)
{
    uint32_t x = (l * 7919u + i * 131u + h * 17u + c) * 2654435761u;
    return ((float)(x >> 8) / 16777216.0f - 0.5f) * (c == 3 ? 40.0f : 2.0f);
}

/* Appends n tokens at positions len.. and writes their K/V in every layer. */
static void
fill(kv_pool_t *pool, kv_table_t *t, uint32_t n)
{
    kern_backend_t *be = NULL;
    assert_int_equal(kern_backend_new("ref", NULL, &be), 0);
    /* At the next true position, which eviction leaves past len. */
    uint32_t len = (uint32_t)kv_table_next_pos(t);
    int32_t *pos = malloc(n * sizeof *pos), *slots = malloc(n * sizeof *slots);
    float *k = malloc((size_t)n * 2 * D * sizeof(float)), *v = malloc((size_t)n * 2 * D * 4);
    for (uint32_t i = 0; i < n; i++)
        pos[i] = (int32_t)(len + i);
    assert_int_equal(kv_table_reserve(t, n), 0);
    assert_int_equal(kv_table_append(t, pos, n, slots), 0);
    for (uint32_t l = 0; l < 2; l++) {
        for (uint32_t i = 0; i < n; i++)
            for (uint32_t h = 0; h < 2; h++)
                for (uint32_t c = 0; c < D; c++) {
                    k[((size_t)i * 2 + h) * D + c] = val(l, len + i, h, c);
                    v[((size_t)i * 2 + h) * D + c] = -val(l, len + i, h, c);
                }
        assert_int_equal(kern_kv_append(be, kv_pool_kv(pool), l, k, v, slots, n), 0);
    }
    free(pos);
    free(slots);
    free(k);
    free(v);
    kern_backend_free(be);
}

/* Every entry of t read back within `tol` of what fill wrote (0: exact). */
static void
check_values(kv_pool_t *pool, const kv_table_t *t, float tol)
{
    float row[D];
    const kern_kv_t *kv = kv_pool_kv(pool);
    for (uint32_t l = 0; l < 2; l++)
        for (uint32_t i = 0; i < kv_table_len(t); i++)
            for (uint32_t h = 0; h < 2; h++) {
                int32_t b = kv_table_blocks(t)[i / BT];
                kern_kv_row_f32(kv, false, l, b, h, i % BT, row);
                for (uint32_t c = 0; c < D; c++) {
                    float want = val(l, (uint32_t)kv_table_positions(t)[i], h, c);
                    if (!(fabsf(row[c] - want) <= tol))
                        fail_msg("K layer %u entry %u head %u ch %u: %g, want %g (tol %g)", l, i, h,
                                 c, row[c], want, tol);
                }
                kern_kv_row_f32(kv, true, l, b, h, i % BT, row);
                for (uint32_t c = 0; c < D; c++)
                    assert_true(fabsf(row[c] + val(l, (uint32_t)kv_table_positions(t)[i], h, c)) <=
                                tol);
            }
}

static bool
is_cold(kv_pool_t *pool, int32_t b)
{
    return (uint32_t)b >= kv_pool_cfg(pool)->n_hot;
}

static void
test_bad_cfg(void **state)
{
    kern_backend_t *be = *state;
    kv_pool_t *pool = NULL;
    kv_pool_cfg_t c = qcfg(KERN_KVQ_Q4, 8, 0, false);
    assert_int_equal(kv_pool_new(&c, be, &pool), KVS_EINVAL); /* no full-precision block */
    c.n_hot = 9;
    assert_int_equal(kv_pool_new(&c, be, &pool), KVS_EINVAL);
    c = qcfg(KERN_KVQ_Q8_0, 8, 2, false);
    c.head_dim = 48; /* not a multiple of q8_0's 32 */
    assert_int_equal(kv_pool_new(&c, be, &pool), KVS_EINVAL);
    c = qcfg((kern_kvq_t)KERN_KVQ_COUNT, 8, 2, false);
    assert_int_equal(kv_pool_new(&c, be, &pool), KVS_EINVAL);
    assert_null(pool);
    /* A quantized block is smaller than a full-precision one. */
    c = qcfg(KERN_KVQ_Q4, 8, 2, false);
    assert_true(kv_pool_quant_block_bytes(&c) * 3 < kv_pool_block_bytes(&c) / 2);
    c.quant = KERN_KVQ_NONE;
    assert_int_equal(kv_pool_quant_block_bytes(&c), 0);
}

static void
test_seal_accounting(void **state)
{
    static const kern_kvq_t codecs[] = {KERN_KVQ_BF16, KERN_KVQ_Q8_0, KERN_KVQ_FP8, KERN_KVQ_Q4};
    /* Loose bounds for values in [-20, 20] (channel 3) and [-1, 1]. */
    static const float tol[] = {0.1f, 0.1f, 1.5f, 2.0f};
    for (int ci = 0; ci < 4; ci++) {
        kern_backend_t *be = *state;
        kv_pool_t *pool = NULL;
        kv_pool_cfg_t c = qcfg(codecs[ci], 12, 4, false);
        assert_int_equal(kv_pool_new(&c, be, &pool), 0);
        assert_int_equal(kv_pool_n_free_kind(pool, false), 4);
        assert_int_equal(kv_pool_n_free_kind(pool, true), 8);
        assert_int_equal(kv_pool_n_free(pool), 12);

        kv_table_t *t = NULL;
        assert_int_equal(kv_table_new(pool, &t), 0);
        fill(pool, t, 40); /* blocks: sink, full, partial (8) */
        assert_int_equal(kv_pool_n_free_kind(pool, false), 1);
        /* keep_head 4: block 0 holds sinks; block 2 is partial. */
        assert_int_equal(kv_table_seal(t, 4, 0), 1);
        assert_false(is_cold(pool, kv_table_blocks(t)[0]));
        assert_true(is_cold(pool, kv_table_blocks(t)[1]));
        assert_false(is_cold(pool, kv_table_blocks(t)[2]));
        assert_int_equal(kv_pool_n_free_kind(pool, false), 2);
        assert_int_equal(kv_pool_n_free_kind(pool, true), 7);
        assert_true(kv_pool_check(pool));
        check_values(pool, t, tol[ci]);
        assert_int_equal(kv_table_seal(t, 4, 0), 0); /* nothing more to seal */

        /* A residual window: 40 more tokens (len 80, 5 full blocks); keep
         * the last 32 exact, so blocks 2 and 3 would be in the window
         * only when they end after 48: block 2 ends at 48 and is sealed. */
        fill(pool, t, 40);
        assert_int_equal(kv_table_seal(t, 4, 32), 1);
        assert_true(is_cold(pool, kv_table_blocks(t)[2]));
        assert_false(is_cold(pool, kv_table_blocks(t)[3]));
        assert_int_equal(kv_table_seal(t, 0, 0), 3); /* sink block 0, 3, 4 */
        assert_true(kv_pool_check(pool));
        check_values(pool, t, tol[ci]);

        kv_table_free(t);
        assert_int_equal(kv_pool_n_free_kind(pool, false), 4);
        assert_int_equal(kv_pool_n_free_kind(pool, true), 8);
        assert_true(kv_pool_check(pool));
        kv_pool_free(pool);
    }
}

/* Without a free quantized block sealing stops and blocks stay exact. */
static void
test_seal_runs_dry(void **state)
{
    kern_backend_t *be = *state;
    kv_pool_t *pool = NULL;
    kv_pool_cfg_t c = qcfg(KERN_KVQ_Q8_0, 6, 5, false);
    assert_int_equal(kv_pool_new(&c, be, &pool), 0);
    kv_table_t *t = NULL;
    assert_int_equal(kv_table_new(pool, &t), 0);
    fill(pool, t, 4 * BT);
    assert_int_equal(kv_table_seal(t, 0, 0), 1);
    assert_int_equal(kv_table_seal(t, 0, 0), 0);
    assert_int_equal(kv_pool_n_free_kind(pool, true), 0);
    assert_true(kv_pool_check(pool));
    check_values(pool, t, 0.1f);
    /* Appends need full-precision blocks: more than n_hot at once never fits. */
    assert_int_equal(kv_table_reserve(t, 6 * BT), KVS_ENOSPC);
    kv_table_free(t);
    kv_pool_free(pool);
}

/* Shared blocks are left alone: sealing one table's copy would leave the
 * other holding the full-precision block anyway. */
static void
test_seal_skips_shared(void **state)
{
    kern_backend_t *be = *state;
    kv_pool_t *pool = NULL;
    kv_pool_cfg_t c = qcfg(KERN_KVQ_Q4, 16, 8, false);
    assert_int_equal(kv_pool_new(&c, be, &pool), 0);
    kv_table_t *t = NULL, *f = NULL;
    assert_int_equal(kv_table_new(pool, &t), 0);
    fill(pool, t, 2 * BT + 3);
    assert_int_equal(kv_table_fork(t, &f), 0);
    assert_int_equal(kv_table_seal(t, 0, 0), 0);
    assert_int_equal(kv_table_seal(f, 0, 0), 0);
    kv_table_free(f);
    assert_int_equal(kv_table_seal(t, 0, 0), 2);
    assert_true(kv_pool_check(pool));
    kv_table_free(t);
    kv_pool_free(pool);
}

/* A truncate into a sealed block reopens it: the next reserve decodes it
 * into a private full-precision block, and a fork copies it the same way;
 * the decoded values are what the sealed block held, exactly (F32). */
static void
test_reopen_sealed(void **state)
{
    kern_backend_t *be = *state;
    kv_pool_t *pool = NULL;
    kv_pool_cfg_t c = qcfg(KERN_KVQ_Q4, 16, 6, false);
    assert_int_equal(kv_pool_new(&c, be, &pool), 0);
    const kern_kv_t *kv = kv_pool_kv(pool);
    kv_table_t *t = NULL, *f = NULL;
    assert_int_equal(kv_table_new(pool, &t), 0);
    fill(pool, t, 3 * BT);
    assert_int_equal(kv_table_seal(t, 0, 0), 3);
    float before[BT][D], after[BT][D];
    int32_t sealed = kv_table_blocks(t)[1];
    for (uint32_t o = 0; o < BT; o++)
        kern_kv_row_f32(kv, false, 1, sealed, 1, o, before[o]);

    assert_int_equal(kv_table_truncate(t, BT + 5), 0);
    assert_true(is_cold(pool, kv_table_blocks(t)[1]));
    assert_int_equal(kv_table_fork(t, &f), 0);
    assert_false(is_cold(pool, kv_table_blocks(f)[1]));
    for (uint32_t o = 0; o < 5; o++) {
        kern_kv_row_f32(kv, false, 1, kv_table_blocks(f)[1], 1, o, after[o]);
        assert_memory_equal(after[o], before[o], sizeof after[o]);
    }
    assert_int_equal(kv_table_reserve(t, 1), 0);
    int32_t reopened = kv_table_blocks(t)[1];
    assert_false(is_cold(pool, reopened));
    for (uint32_t o = 0; o < BT; o++) {
        kern_kv_row_f32(kv, false, 1, reopened, 1, o, after[o]);
        assert_memory_equal(after[o], before[o], sizeof after[o]);
    }
    assert_int_equal(kv_pool_refcount(pool, sealed), 0);
    assert_true(kv_pool_check(pool));
    kv_table_free(f);
    kv_table_free(t);
    assert_int_equal(kv_pool_n_free_kind(pool, false), 6);
    assert_int_equal(kv_pool_n_free_kind(pool, true), 10);
    kv_pool_free(pool);
}

/* Sealed blocks enter the prefix cache like any other; a later match
 * takes them (quantized) and an allocation of either kind evicts only a
 * cached block of its own kind. */
static void
test_prefix_cache(void **state)
{
    kern_backend_t *be = *state;
    kv_pool_t *pool = NULL;
    kv_pool_cfg_t c = qcfg(KERN_KVQ_FP8, 8, 4, true);
    assert_int_equal(kv_pool_new(&c, be, &pool), 0);
    int32_t tokens[4 * BT];
    for (uint32_t i = 0; i < 4 * BT; i++)
        tokens[i] = (int32_t)(i * 3 + 1);
    kv_table_t *t = NULL;
    assert_int_equal(kv_table_new(pool, &t), 0);
    fill(pool, t, 3 * BT + 2);
    assert_int_equal(kv_table_seal(t, 1, 0), 2); /* block 0 holds the sink */
    assert_int_equal(kv_prefix_commit(t, tokens, 3 * BT + 2, 7), 0);
    kv_table_free(t);
    assert_true(kv_pool_check(pool));
    kv_prefix_stats_t st;
    kv_pool_prefix_stats(pool, &st);
    assert_int_equal(st.cached_blocks, 3);

    assert_int_equal(kv_table_new(pool, &t), 0);
    uint32_t hit = 0;
    assert_int_equal(kv_prefix_match(t, tokens, 4 * BT, 7, &hit), 0);
    assert_int_equal(hit, 3 * BT);
    assert_false(is_cold(pool, kv_table_blocks(t)[0]));
    assert_true(is_cold(pool, kv_table_blocks(t)[1]));
    assert_true(is_cold(pool, kv_table_blocks(t)[2]));
    check_values(pool, t, 1.5f);
    kv_table_free(t);

    /* Three cold blocks wanted: the 2 free ones, then the cached cold
     * block released longest ago; the cached sink block (full precision)
     * is not a candidate. */
    assert_int_equal(kv_table_new(pool, &t), 0);
    fill(pool, t, 3 * BT);
    assert_int_equal(kv_table_seal(t, 0, 0), 3);
    kv_pool_prefix_stats(pool, &st);
    assert_int_equal(st.cached_blocks, 2);
    assert_int_equal(st.evictions, 1);
    assert_true(kv_pool_check(pool));
    kv_table_free(t);
    kv_pool_free(pool);
}

/* Eviction keeps the sinks' blocks and the most recent ones, frees the
 * rest to the pool, and leaves positions true; the sinks stay committable
 * prefix blocks and a forked sibling keeps what it shares. */
static void
test_evict(void **state)
{
    kern_backend_t *be = *state;
    kv_pool_t *pool = NULL;
    kv_pool_cfg_t c = qcfg(KERN_KVQ_NONE, 24, 0, true);
    assert_int_equal(kv_pool_new(&c, be, &pool), 0);
    kv_table_t *t = NULL;
    assert_int_equal(kv_table_new(pool, &t), 0);
    fill(pool, t, 5 * BT + 3); /* 6 blocks, the last partial */
    int32_t b0 = kv_table_blocks(t)[0], b4 = kv_table_blocks(t)[4], b5 = kv_table_blocks(t)[5];
    assert_int_equal(kv_table_evict(t, 4, 10 * BT), 0); /* within budget */
    /* Budget 3 blocks' worth: drop blocks 1..3, keep the sinks' block 0,
     * block 4 and the partial block 5. */
    assert_int_equal(kv_table_evict(t, 4, 3 * BT), 3);
    assert_int_equal(kv_table_len(t), 2 * BT + 3);
    assert_int_equal(kv_table_n_blocks(t), 3);
    assert_int_equal(kv_table_blocks(t)[0], b0);
    assert_int_equal(kv_table_blocks(t)[1], b4);
    assert_int_equal(kv_table_blocks(t)[2], b5);
    assert_int_equal(kv_table_next_pos(t), 5 * BT + 3);
    for (uint32_t i = 0; i < kv_table_len(t); i++)
        assert_int_equal(kv_table_positions(t)[i], i < BT ? (int32_t)i : (int32_t)(i + 3 * BT));
    check_values(pool, t, 0.0f); /* every kept entry is the token it was */
    assert_int_equal(kv_pool_n_free(pool), 24 - 3);
    assert_true(kv_pool_check(pool));

    /* Appends go on at the true position; eviction again drops block 4
     * (now index 1) once the window slides past it. */
    fill(pool, t, BT);
    assert_int_equal(kv_table_evict(t, 4, 3 * BT), 1);
    assert_int_equal(kv_table_blocks(t)[1], b5);
    check_values(pool, t, 0.0f);

    /* A budget below sinks + one block keeps the sinks and the newest. */
    fill(pool, t, 3 * BT);
    assert_int_equal(kv_table_evict(t, 4, 1), 4);
    assert_int_equal(kv_table_n_blocks(t), 2);
    assert_int_equal(kv_table_evict(t, 4, 1), 0);
    check_values(pool, t, 0.0f);

    /* Shared blocks survive in the sibling; the sinks' block is still a
     * natural prefix block the cache can take. */
    kv_table_t *f = NULL;
    fill(pool, t, 2 * BT);
    assert_int_equal(kv_table_fork(t, &f), 0);
    uint32_t before = kv_pool_n_free(pool);
    assert_int_equal(kv_table_evict(t, 4, 2 * BT), 2);
    assert_int_equal(kv_pool_n_free(pool), before); /* f still holds them */
    int32_t tokens[BT];
    for (uint32_t i = 0; i < BT; i++)
        tokens[i] = (int32_t)i;
    assert_int_equal(kv_prefix_commit(t, tokens, BT, 3), 0);
    kv_prefix_stats_t st;
    kv_pool_prefix_stats(pool, &st);
    assert_int_equal(st.cached_blocks, 1);
    assert_true(kv_pool_check(pool));
    kv_table_free(f);
    kv_table_free(t);
    assert_true(kv_pool_check(pool));
    kv_pool_free(pool);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_evict),
        cmocka_unit_test(test_bad_cfg),
        cmocka_unit_test(test_seal_accounting),
        cmocka_unit_test(test_seal_runs_dry),
        cmocka_unit_test(test_seal_skips_shared),
        cmocka_unit_test(test_reopen_sealed),
        cmocka_unit_test(test_prefix_cache),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
