/*
 * tests/cache/test_kv_pool.c — the block pool on its own: creation for F32
 * and F16 on the "ref" backend, the kern_kv_t view it exports, rejection of
 * bad or oversized configs, kv_pool_block_bytes, free-block accounting and
 * deterministic allocation order, and that kv_pool_check really notices a
 * broken invariant (it pokes the private structs from cache/kv_int.h).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "base/kvs.h"
#include "cache/kv.h"
#include "cache/kv_int.h"
#include "kernels/kern.h"

static kv_pool_cfg_t
small_cfg(kern_dtype_t dtype)
{
    return (kv_pool_cfg_t){
        .n_layers = 3,
        .n_kv_heads = 2,
        .head_dim = 8,
        .block_tokens = 16,
        .n_blocks = 10,
        .dtype = dtype,
    };
}

static int
setup_backend(void **state)
{
    kern_backend_t *be = NULL;
    if (kern_backend_new("ref", NULL, &be) != 0)
        return -1;
    *state = be;
    return 0;
}

static int
teardown_backend(void **state)
{
    kern_backend_free(*state);
    return 0;
}

static void
check_new(kern_backend_t *be, kern_dtype_t dtype, size_t elsize)
{
    kv_pool_cfg_t cfg = small_cfg(dtype);
    kv_pool_t *pool = NULL;
    assert_int_equal(kv_pool_new(&cfg, be, &pool), 0);
    assert_non_null(pool);
    assert_true(kv_pool_check(pool));

    const kv_pool_cfg_t *got = kv_pool_cfg(pool);
    assert_memory_equal(got, &cfg, sizeof cfg);

    const kern_kv_t *kv = kv_pool_kv(pool);
    size_t layer_bytes = (size_t)10 * 2 * 16 * 8 * elsize;
    assert_int_equal(kv->dtype, dtype);
    assert_int_equal(kv->n_layers, 3);
    assert_int_equal(kv->n_kv_heads, 2);
    assert_int_equal(kv->head_dim, 8);
    assert_int_equal(kv->block_tokens, 16);
    assert_int_equal(kv->n_blocks, 10);
    assert_int_equal(kv->layer_bytes, layer_bytes);
    assert_non_null(kv->k);
    assert_non_null(kv->v);
    assert_ptr_not_equal(kv->k, kv->v);
    assert_ptr_equal(kv_pool_kv(pool), kv); /* a stable view */

    /* Both buffers cover every layer and start zeroed (host memory here). */
    const unsigned char *k = kv->k, *v = kv->v;
    for (size_t i = 0; i < 3 * layer_bytes; i++) {
        assert_int_equal(k[i], 0);
        assert_int_equal(v[i], 0);
    }

    assert_int_equal(kv_pool_block_bytes(&cfg), 2 * 3 * 2 * 16 * 8 * elsize);
    assert_int_equal(kv_pool_n_free(pool), 10);
    for (int32_t b = 0; b < 10; b++)
        assert_int_equal(kv_pool_refcount(pool, b), 0);
    kv_pool_free(pool);
}

static void
test_new_f32(void **state)
{
    check_new(*state, KERN_F32, 4);
}

static void
test_new_f16(void **state)
{
    check_new(*state, KERN_F16, 2);
}

static void
test_free_null(void **state)
{
    (void)state;
    kv_pool_free(NULL);
}

static void
expect_rejected(kern_backend_t *be, const kv_pool_cfg_t *cfg, int err)
{
    kv_pool_t *pool = (kv_pool_t *)(uintptr_t)1; /* must be overwritten */
    assert_int_equal(kv_pool_new(cfg, be, &pool), err);
    assert_null(pool);
    assert_int_equal(kv_pool_block_bytes(cfg), 0);
}

static void
test_bad_cfg(void **state)
{
    kern_backend_t *be = *state;
    kv_pool_cfg_t cfg;

    static const uint32_t bad_bt[] = {0, 3, 6, 12, 1000, 2048, 4096, UINT32_MAX};
    for (size_t i = 0; i < sizeof bad_bt / sizeof bad_bt[0]; i++) {
        cfg = small_cfg(KERN_F32);
        cfg.block_tokens = bad_bt[i];
        expect_rejected(be, &cfg, KVS_EINVAL);
    }
    cfg = small_cfg(KERN_F32);
    cfg.n_blocks = 0;
    expect_rejected(be, &cfg, KVS_EINVAL);
    cfg = small_cfg(KERN_F32);
    cfg.n_layers = 0;
    expect_rejected(be, &cfg, KVS_EINVAL);
    cfg = small_cfg(KERN_F32);
    cfg.n_kv_heads = 0;
    expect_rejected(be, &cfg, KVS_EINVAL);
    cfg = small_cfg(KERN_F32);
    cfg.head_dim = 0;
    expect_rejected(be, &cfg, KVS_EINVAL);

    static const kern_dtype_t bad_dt[] = {KERN_Q8_0, KERN_Q4_0, KERN_BF16, KERN_I32,
                                          (kern_dtype_t)77};
    for (size_t i = 0; i < sizeof bad_dt / sizeof bad_dt[0]; i++) {
        cfg = small_cfg(bad_dt[i]);
        expect_rejected(be, &cfg, KVS_EINVAL);
    }

    /* More token slots than an int32 slot id can name. */
    cfg = small_cfg(KERN_F16);
    cfg.n_layers = 1;
    cfg.n_kv_heads = 1;
    cfg.head_dim = 1;
    cfg.block_tokens = 1024;
    cfg.n_blocks = (1u << 21) + 1;
    expect_rejected(be, &cfg, KVS_EINVAL);

    /* No backend. */
    cfg = small_cfg(KERN_F32);
    kv_pool_t *pool = NULL;
    assert_int_equal(kv_pool_new(&cfg, NULL, &pool), KVS_EINVAL);
    assert_null(pool);
}

static void
test_overflow(void **state)
{
    kern_backend_t *be = *state;

    /* One block of one layer already overflows size_t. */
    kv_pool_cfg_t cfg = {
        .n_layers = 1,
        .n_kv_heads = UINT32_MAX,
        .head_dim = UINT32_MAX,
        .block_tokens = 1024,
        .n_blocks = 1,
        .dtype = KERN_F32,
    };
    expect_rejected(be, &cfg, KVS_ENOMEM);

    /* A block fits (2^44 bytes a layer), a layer of all blocks does not. */
    cfg = (kv_pool_cfg_t){
        .n_layers = 1,
        .n_kv_heads = 1u << 16,
        .head_dim = 1u << 16,
        .block_tokens = 1024,
        .n_blocks = 1u << 21,
        .dtype = KERN_F32,
    };
    kv_pool_t *pool = NULL;
    assert_int_equal(kv_pool_new(&cfg, be, &pool), KVS_ENOMEM);
    assert_null(pool);
    assert_int_not_equal(kv_pool_block_bytes(&cfg), 0);

    /* A layer fits (2^54 bytes), all layers of K do not. */
    cfg.n_blocks = 1u << 10;
    cfg.n_layers = 1u << 10;
    assert_int_equal(kv_pool_new(&cfg, be, &pool), KVS_ENOMEM);
    assert_null(pool);

    /* K and V each fit (2^63 bytes), the two together do not. */
    cfg.n_layers = 1u << 9;
    cfg.dtype = KERN_F16;
    cfg.n_kv_heads = 1u << 17;
    assert_int_equal(kv_pool_new(&cfg, be, &pool), KVS_ENOMEM);
    assert_null(pool);
    assert_int_equal(kv_pool_block_bytes(&cfg), (size_t)1 << 54);
}

static void
test_block_bytes(void **state)
{
    (void)state;
    kv_pool_cfg_t cfg = {
        .n_layers = 32,
        .n_kv_heads = 8,
        .head_dim = 128,
        .block_tokens = 16,
        .n_blocks = 1,
        .dtype = KERN_F16,
    };
    /* Llama-3-8B: 128 KiB of KV per token in f16, 2 MiB per 16-token block. */
    assert_int_equal(kv_pool_block_bytes(&cfg), (size_t)2 * 32 * 8 * 128 * 16 * 2);
    cfg.dtype = KERN_F32;
    assert_int_equal(kv_pool_block_bytes(&cfg), (size_t)2 * 32 * 8 * 128 * 16 * 4);
    cfg.block_tokens = 1;
    assert_int_equal(kv_pool_block_bytes(&cfg), (size_t)2 * 32 * 8 * 128 * 4);
}

static void
test_n_free_accounting(void **state)
{
    kern_backend_t *be = *state;
    kv_pool_cfg_t cfg = small_cfg(KERN_F32);
    cfg.block_tokens = 4;
    kv_pool_t *pool = NULL;
    assert_int_equal(kv_pool_new(&cfg, be, &pool), 0);

    kv_table_t *a = NULL, *b = NULL;
    assert_int_equal(kv_table_new(pool, &a), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_new(pool, &b), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), 10);

    /* Blocks come out in id order from a fresh pool. */
    assert_int_equal(kv_table_reserve(a, 9), 0); /* 3 blocks */
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), 7);
    assert_int_equal(kv_table_n_blocks(a), 3);
    for (int32_t i = 0; i < 3; i++) {
        assert_int_equal(kv_table_blocks(a)[i], i);
        assert_int_equal(kv_pool_refcount(pool, i), 1);
    }
    assert_int_equal(kv_table_reserve(b, 4), 0); /* 1 block */
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_blocks(b)[0], 3);
    assert_int_equal(kv_pool_n_free(pool), 6);
    assert_int_equal(kv_pool_refcount(pool, 4), 0);

    /* Reserving what is already held takes nothing. */
    assert_int_equal(kv_table_reserve(a, 12), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), 6);

    /* Freed blocks return, and LIFO hands the same ones out again. */
    kv_table_free(a);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), 9);
    assert_int_equal(kv_table_new(pool, &a), 0);
    assert_int_equal(kv_table_reserve(a, 12), 0);
    assert_true(kv_pool_check(pool));
    for (int32_t i = 0; i < 3; i++)
        assert_int_equal(kv_table_blocks(a)[i], i);

    kv_table_free(a);
    assert_true(kv_pool_check(pool));
    kv_table_free(b);
    assert_true(kv_pool_check(pool));
    kv_table_free(NULL);
    assert_int_equal(kv_pool_n_free(pool), 10);
    kv_pool_free(pool);
}

/* The checker is only worth something if it fails on broken state. */
static void
test_check_detects(void **state)
{
    kern_backend_t *be = *state;
    kv_pool_cfg_t cfg = small_cfg(KERN_F32);
    cfg.block_tokens = 4;
    kv_pool_t *pool = NULL;
    assert_int_equal(kv_pool_new(&cfg, be, &pool), 0);
    kv_table_t *t = NULL;
    assert_int_equal(kv_table_new(pool, &t), 0);
    assert_int_equal(kv_table_reserve(t, 8), 0);
    int32_t pos[5] = {0, 1, 2, 3, 4}, slots[5];
    assert_int_equal(kv_table_append(t, pos, 5, slots), 0);
    assert_true(kv_pool_check(pool));

    /* A refcount that no table explains. */
    pool->refcount[5] = 1;
    assert_false(kv_pool_check(pool));
    pool->refcount[5] = 0;
    pool->refcount[0] = 2;
    assert_false(kv_pool_check(pool));
    pool->refcount[0] = 1;
    assert_true(kv_pool_check(pool));

    /* A used block on the free stack, and a free block on it twice. */
    int32_t saved = pool->free_ids[0];
    pool->free_ids[0] = 1;
    assert_false(kv_pool_check(pool));
    pool->free_ids[0] = pool->free_ids[1];
    assert_false(kv_pool_check(pool));
    pool->free_ids[0] = saved;
    pool->n_free--;
    assert_false(kv_pool_check(pool));
    pool->n_free++;
    assert_true(kv_pool_check(pool));

    /* Table-side: a bad block id, a stale next_pos, a registry count off. */
    t->blocks[1] = 99;
    assert_false(kv_pool_check(pool));
    t->blocks[1] = 1;
    t->next_pos = 7;
    assert_false(kv_pool_check(pool));
    t->next_pos = 5;
    pool->n_tables++;
    assert_false(kv_pool_check(pool));
    pool->n_tables--;
    assert_true(kv_pool_check(pool));

    kv_table_free(t);
    assert_true(kv_pool_check(pool));
    kv_pool_free(pool);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_new_f32),           cmocka_unit_test(test_new_f16),
        cmocka_unit_test(test_free_null),         cmocka_unit_test(test_bad_cfg),
        cmocka_unit_test(test_overflow),          cmocka_unit_test(test_block_bytes),
        cmocka_unit_test(test_n_free_accounting), cmocka_unit_test(test_check_detects),
    };
    return cmocka_run_group_tests(tests, setup_backend, teardown_backend);
}
