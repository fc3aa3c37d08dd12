/*
 * tests/cache/test_kv_table.c — per-sequence tables over a real pool on the
 * "ref" backend: reserve/append across block boundaries, the three capacity
 * answers (0, KVS_EAGAIN leaving the table untouched, KVS_ENOSPC), fork
 * sharing full blocks and copying the partial one (checked on the KV data
 * itself through the pool's host-memory view), copy-on-write after a
 * truncate into a shared block, truncate, the blocks' generations
 * (kern_kv_t.block_gen), CSR export, and a seeded random
 * stress against a shadow model.  kv_pool_check runs after every mutation.
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

#define STRESS_TABLES 8
#define STRESS_MAX_TOKENS 128 /* also bounds what a snapshot holds */

static kern_backend_t *g_be;

static int
setup_backend(void **state)
{
    (void)state;
    return kern_backend_new("ref", NULL, &g_be) == 0 ? 0 : -1;
}

static int
teardown_backend(void **state)
{
    (void)state;
    kern_backend_free(g_be);
    g_be = NULL;
    return 0;
}

static kv_pool_t *
make_pool(uint32_t block_tokens, uint32_t n_blocks, kern_dtype_t dtype)
{
    kv_pool_cfg_t cfg = {
        .n_layers = 2,
        .n_kv_heads = 2,
        .head_dim = 4,
        .block_tokens = block_tokens,
        .n_blocks = n_blocks,
        .dtype = dtype,
    };
    kv_pool_t *pool = NULL;
    assert_int_equal(kv_pool_new(&cfg, g_be, &pool), 0);
    assert_true(kv_pool_check(pool));
    return pool;
}

static kv_table_t *
make_table(kv_pool_t *pool)
{
    kv_table_t *t = NULL;
    assert_int_equal(kv_table_new(pool, &t), 0);
    assert_non_null(t);
    assert_true(kv_pool_check(pool));
    return t;
}

static uint32_t
ceil_div(uint32_t a, uint32_t b)
{
    return (a + b - 1) / b;
}

/* ---- KV data: written with kern_kv_append, read back from host memory ---- */

/* Small integers and quarters, exact in f16 as well as f32, distinct per
 * (token tag, layer, head, dim) and between K and V. */
static float
kv_val(uint32_t tag, uint32_t layer, uint32_t head, uint32_t d, int is_v)
{
    uint32_t x = tag * 53u + layer * 29u + head * 11u + d * 3u + (is_v ? 500u : 0u);
    return (float)(x % 1999u) * 0.25f - 250.0f;
}

static float
kv_read(const kern_kv_t *kv, int is_v, uint32_t layer, int32_t slot, uint32_t head, uint32_t d)
{
    uint32_t block = (uint32_t)slot / kv->block_tokens;
    uint32_t off = (uint32_t)slot % kv->block_tokens;
    size_t idx =
        (((size_t)block * kv->n_kv_heads + head) * kv->block_tokens + off) * kv->head_dim + d;
    const char *base = (const char *)(is_v ? kv->v : kv->k) + (size_t)layer * kv->layer_bytes;
    if (kv->dtype == KERN_F16)
        return kvs_fp16_to_f32(((const uint16_t *)base)[idx]);
    return ((const float *)base)[idx];
}

/* Writes tokens tagged tags[0..n) into slots[0..n) in every layer. */
static void
kv_write(const kv_pool_t *pool, const int32_t *slots, const uint32_t *tags, uint32_t n)
{
    const kern_kv_t *kv = kv_pool_kv(pool);
    uint32_t row = kv->n_kv_heads * kv->head_dim;
    float k[16 * 8], v[16 * 8];
    assert_true(n <= 16 && row <= 8);
    for (uint32_t l = 0; l < kv->n_layers; l++) {
        for (uint32_t i = 0; i < n; i++)
            for (uint32_t h = 0; h < kv->n_kv_heads; h++)
                for (uint32_t d = 0; d < kv->head_dim; d++) {
                    k[i * row + h * kv->head_dim + d] = kv_val(tags[i], l, h, d, 0);
                    v[i * row + h * kv->head_dim + d] = kv_val(tags[i], l, h, d, 1);
                }
        assert_int_equal(kern_kv_append(g_be, kv, l, k, v, slots, n), 0);
    }
}

static int32_t
slot_of(const kv_table_t *t, uint32_t bt, uint32_t i)
{
    return kv_table_blocks(t)[i / bt] * (int32_t)bt + (int32_t)(i % bt);
}

/* Entry i of t holds the token tagged tags[i], in every layer, head, dim. */
static void
kv_expect(const kv_pool_t *pool, const kv_table_t *t, const uint32_t *tags)
{
    const kern_kv_t *kv = kv_pool_kv(pool);
    for (uint32_t i = 0; i < kv_table_len(t); i++) {
        int32_t slot = slot_of(t, kv->block_tokens, i);
        for (uint32_t l = 0; l < kv->n_layers; l++)
            for (uint32_t h = 0; h < kv->n_kv_heads; h++)
                for (uint32_t d = 0; d < kv->head_dim; d++) {
                    assert_true(kv_read(kv, 0, l, slot, h, d) == kv_val(tags[i], l, h, d, 0));
                    assert_true(kv_read(kv, 1, l, slot, h, d) == kv_val(tags[i], l, h, d, 1));
                }
    }
}

/* Reserves and appends n tokens at consecutive positions, tagged
 * first_tag, first_tag + 1, ... */
static void
push(kv_pool_t *pool, kv_table_t *t, uint32_t n, uint32_t first_tag)
{
    int32_t pos[16], slots[16];
    uint32_t tags[16];
    assert_true(n <= 16);
    assert_int_equal(kv_table_reserve(t, n), 0);
    assert_true(kv_pool_check(pool));
    for (uint32_t i = 0; i < n; i++) {
        pos[i] = kv_table_next_pos(t) + (int32_t)i;
        tags[i] = first_tag + i;
    }
    assert_int_equal(kv_table_append(t, pos, n, slots), 0);
    assert_true(kv_pool_check(pool));
    kv_write(pool, slots, tags, n);
}

static void
seq_tags(uint32_t *tags, uint32_t n, uint32_t first)
{
    for (uint32_t i = 0; i < n; i++)
        tags[i] = first + i;
}

/* ---- reserve / append ---------------------------------------------------- */

static void
run_reserve_append(uint32_t bt)
{
    const uint32_t n_blocks = 8, cap = n_blocks * bt;
    kv_pool_t *pool = make_pool(bt, n_blocks, KERN_F32);
    kv_table_t *t = make_table(pool);
    assert_int_equal(kv_table_len(t), 0);
    assert_int_equal(kv_table_n_blocks(t), 0);
    assert_int_equal(kv_table_next_pos(t), 0);

    const uint32_t chunks[] = {1, 2, 3, bt > 1 ? bt - 1 : 1, bt, bt + 1, 7, 2 * bt};
    int32_t pos[64], slots[64];
    uint32_t len = 0;
    for (size_t c = 0; len < cap; c++) {
        uint32_t n = chunks[c % (sizeof chunks / sizeof chunks[0])];
        if (n > cap - len)
            n = cap - len;
        uint32_t held = kv_table_n_blocks(t);
        uint32_t n_free = kv_pool_n_free(pool);
        for (uint32_t i = 0; i < n; i++)
            pos[i] = (int32_t)(len + i);

        /* Beyond the held capacity, append refuses and changes nothing. */
        if (len + n > held * bt) {
            assert_int_equal(kv_table_append(t, pos, n, slots), KVS_ENOSPC);
            assert_true(kv_pool_check(pool));
            assert_int_equal(kv_table_len(t), len);
        }

        assert_int_equal(kv_table_reserve(t, n), 0);
        assert_true(kv_pool_check(pool));
        uint32_t want = ceil_div(len + n, bt);
        uint32_t now = want > held ? want : held;
        assert_int_equal(kv_table_n_blocks(t), now);
        assert_int_equal(kv_pool_n_free(pool), n_free - (now - held));

        assert_int_equal(kv_table_append(t, pos, n, slots), 0);
        assert_true(kv_pool_check(pool));
        for (uint32_t i = 0; i < n; i++)
            assert_int_equal(slots[i], slot_of(t, bt, len + i));
        len += n;
        assert_int_equal(kv_table_len(t), len);
        assert_int_equal(kv_table_next_pos(t), (int32_t)len);
        for (uint32_t i = 0; i < len; i++)
            assert_int_equal(kv_table_positions(t)[i], (int32_t)i);
    }
    /* Fresh pool, one table: blocks in id order, all distinct. */
    assert_int_equal(kv_table_n_blocks(t), n_blocks);
    for (uint32_t i = 0; i < n_blocks; i++) {
        assert_int_equal(kv_table_blocks(t)[i], (int32_t)i);
        assert_int_equal(kv_pool_refcount(pool, (int32_t)i), 1);
    }
    assert_int_equal(kv_pool_n_free(pool), 0);
    assert_int_equal(kv_table_reserve(t, 1), KVS_ENOSPC);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_reserve(t, 0), 0);
    assert_true(kv_pool_check(pool));
    kv_table_free(t);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), n_blocks);

    /* Reserving ahead holds blocks that appends then fill without new ones. */
    t = make_table(pool);
    assert_int_equal(kv_table_reserve(t, 3 * bt), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_n_blocks(t), 3);
    pos[0] = 0;
    assert_int_equal(kv_table_append(t, pos, 1, slots), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_n_blocks(t), 3);
    assert_int_equal(kv_pool_n_free(pool), n_blocks - 3);
    for (uint32_t i = 0; i < 3 * bt - 1; i++)
        pos[i] = (int32_t)i + 1;
    assert_int_equal(kv_table_append(t, pos, 3 * bt - 1, slots), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_n_blocks(t), 3);
    assert_int_equal(kv_table_append(t, pos, 1, slots), KVS_ENOSPC);
    assert_true(kv_pool_check(pool));
    kv_table_free(t);
    assert_true(kv_pool_check(pool));
    kv_pool_free(pool);
}

static void
test_reserve_append_bt1(void **state)
{
    (void)state;
    run_reserve_append(1);
}

static void
test_reserve_append_bt4(void **state)
{
    (void)state;
    run_reserve_append(4);
}

static void
test_reserve_append_bt16(void **state)
{
    (void)state;
    run_reserve_append(16);
}

static void
test_append_args(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 4, KERN_F32);
    kv_table_t *t = make_table(pool);
    assert_int_equal(kv_table_reserve(t, 4), 0);
    assert_true(kv_pool_check(pool));

    int32_t pos[2] = {0, 1}, slots[2] = {-7, -7};
    assert_int_equal(kv_table_append(t, pos, 0, slots), 0);
    assert_int_equal(kv_table_append(t, NULL, 0, NULL), 0);
    assert_int_equal(kv_table_append(t, NULL, 1, slots), KVS_EINVAL);
    assert_int_equal(kv_table_append(t, pos, 1, NULL), KVS_EINVAL);
    pos[1] = -1;
    assert_int_equal(kv_table_append(t, pos, 2, slots), KVS_EINVAL);
    pos[1] = INT32_MAX;
    assert_int_equal(kv_table_append(t, pos, 2, slots), KVS_EINVAL);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_len(t), 0);
    assert_int_equal(slots[0], -7);

    /* The largest allowed position still has a representable successor. */
    pos[1] = INT32_MAX - 1;
    assert_int_equal(kv_table_append(t, pos, 2, slots), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_next_pos(t), INT32_MAX);
    kv_table_free(t);
    assert_true(kv_pool_check(pool));
    kv_pool_free(pool);
}

/* ---- capacity answers ------------------------------------------------------ */

typedef struct snap {
    uint32_t len, n_blocks, n_free;
    int32_t next_pos;
    int32_t blocks[STRESS_MAX_TOKENS];
    int32_t pos[STRESS_MAX_TOKENS];
} snap_t;

static void
take_snap(const kv_pool_t *pool, const kv_table_t *t, snap_t *s)
{
    memset(s, 0, sizeof *s);
    s->len = kv_table_len(t);
    s->n_blocks = kv_table_n_blocks(t);
    s->n_free = kv_pool_n_free(pool);
    s->next_pos = kv_table_next_pos(t);
    assert_true(s->n_blocks <= STRESS_MAX_TOKENS && s->len <= STRESS_MAX_TOKENS);
    if (s->n_blocks)
        memcpy(s->blocks, kv_table_blocks(t), s->n_blocks * sizeof(int32_t));
    if (s->len)
        memcpy(s->pos, kv_table_positions(t), s->len * sizeof(int32_t));
}

static void
assert_unchanged(const kv_pool_t *pool, const kv_table_t *t, const snap_t *s)
{
    snap_t now;
    take_snap(pool, t, &now);
    assert_memory_equal(&now, s, sizeof now);
}

static void
test_eagain_enospc(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 4, KERN_F32); /* 16 tokens in all */
    kv_table_t *a = make_table(pool), *b = make_table(pool), *c = make_table(pool);
    push(pool, a, 10, 0);  /* 3 blocks */
    push(pool, b, 2, 100); /* 1 block, pool now empty */
    assert_int_equal(kv_pool_n_free(pool), 0);

    snap_t sb, sc;
    take_snap(pool, b, &sb);
    take_snap(pool, c, &sc);
    /* Needs a second block: not now. */
    assert_int_equal(kv_table_reserve(b, 3), KVS_EAGAIN);
    assert_true(kv_pool_check(pool));
    assert_unchanged(pool, b, &sb);
    assert_int_equal(kv_table_reserve(b, 14), KVS_EAGAIN);
    assert_true(kv_pool_check(pool));
    assert_unchanged(pool, b, &sb);
    assert_int_equal(kv_table_reserve(c, 1), KVS_EAGAIN);
    assert_true(kv_pool_check(pool));
    assert_unchanged(pool, c, &sc);

    /* Larger than the whole pool: never, whoever holds what. */
    assert_int_equal(kv_table_reserve(b, 15), KVS_ENOSPC);
    assert_true(kv_pool_check(pool));
    assert_unchanged(pool, b, &sb);
    assert_int_equal(kv_table_reserve(c, 17), KVS_ENOSPC);
    assert_int_equal(kv_table_reserve(c, UINT32_MAX), KVS_ENOSPC);
    assert_int_equal(kv_table_reserve(b, UINT32_MAX), KVS_ENOSPC);
    assert_true(kv_pool_check(pool));
    assert_unchanged(pool, b, &sb);
    assert_unchanged(pool, c, &sc);

    /* Room left in b's own block needs nothing from the pool. */
    assert_int_equal(kv_table_reserve(b, 2), 0);
    assert_true(kv_pool_check(pool));

    /* Once a finishes, the same requests succeed. */
    kv_table_free(a);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), 3);
    assert_int_equal(kv_table_reserve(b, 3), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_reserve(c, 1), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_n_blocks(b), 2);
    assert_int_equal(kv_table_n_blocks(c), 1);
    assert_int_equal(kv_pool_n_free(pool), 1);
    /* b's data survived the failed attempts. */
    uint32_t tags[2];
    seq_tags(tags, 2, 100);
    kv_expect(pool, b, tags);

    /* The whole pool is a valid request for one sequence. */
    kv_table_free(c);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_reserve(b, 14), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), 0);
    kv_table_free(b);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), 4);
    kv_pool_free(pool);
}

/* ---- fork ------------------------------------------------------------------ */

static void
run_fork(kern_dtype_t dtype)
{
    const uint32_t bt = 4;
    kv_pool_t *pool = make_pool(bt, 8, dtype);
    kv_table_t *p = make_table(pool);
    uint32_t ptags[16], ctags[16];
    push(pool, p, 10, 100); /* blocks 0, 1 full; 2 holds 2 */
    seq_tags(ptags, 16, 100);
    kv_expect(pool, p, ptags);
    assert_int_equal(kv_pool_n_free(pool), 5);

    kv_table_t *c = NULL;
    assert_int_equal(kv_table_fork(p, &c), 0);
    assert_true(kv_pool_check(pool));
    assert_non_null(c);
    assert_int_equal(kv_table_len(c), 10);
    assert_int_equal(kv_table_next_pos(c), 10);
    assert_memory_equal(kv_table_positions(c), kv_table_positions(p), 10 * sizeof(int32_t));
    assert_int_equal(kv_table_n_blocks(c), 3);
    const int32_t *pb = kv_table_blocks(p), *cb = kv_table_blocks(c);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(cb[i], pb[i]);
        assert_int_equal(kv_pool_refcount(pool, pb[i]), 2);
    }
    assert_int_not_equal(cb[2], pb[2]);
    assert_int_equal(kv_pool_refcount(pool, pb[2]), 1);
    assert_int_equal(kv_pool_refcount(pool, cb[2]), 1);
    assert_int_equal(kv_pool_n_free(pool), 4);
    /* The copied partial block reads the same as the parent's. */
    kv_expect(pool, c, ptags);

    /* The child's appends land in its own blocks. */
    memcpy(ctags, ptags, 10 * sizeof(uint32_t));
    push(pool, c, 5, 200);
    seq_tags(ctags + 10, 5, 200);
    kv_expect(pool, c, ctags);
    kv_expect(pool, p, ptags);
    assert_int_equal(kv_pool_refcount(pool, pb[2]), 1);

    /* And the parent's appends do not reach the child. */
    push(pool, p, 2, 110);
    kv_expect(pool, p, ptags);
    kv_expect(pool, c, ctags);

    /* A fork at a block boundary shares everything and allocates nothing. */
    uint32_t n_free = kv_pool_n_free(pool);
    kv_table_t *c2 = NULL;
    assert_int_equal(kv_table_fork(p, &c2), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), n_free);
    assert_int_equal(kv_table_n_blocks(c2), 3);
    assert_memory_equal(kv_table_blocks(c2), kv_table_blocks(p), 3 * sizeof(int32_t));
    assert_int_equal(kv_pool_refcount(pool, pb[0]), 3);
    assert_int_equal(kv_pool_refcount(pool, pb[2]), 2);
    kv_expect(pool, c2, ptags);
    push(pool, c2, 1, 300); /* a fresh block, no copy */
    assert_int_equal(kv_pool_refcount(pool, pb[2]), 2);
    assert_int_not_equal(kv_table_blocks(c2)[3], kv_table_blocks(p)[2]);
    kv_expect(pool, p, ptags);

    /* An empty table forks into an empty table. */
    kv_table_t *e = make_table(pool), *e2 = NULL;
    assert_int_equal(kv_table_fork(e, &e2), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_len(e2), 0);
    assert_int_equal(kv_table_n_blocks(e2), 0);
    assert_int_equal(kv_table_next_pos(e2), 0);
    push(pool, e2, 3, 400);

    kv_table_free(e);
    assert_true(kv_pool_check(pool));
    kv_table_free(e2);
    assert_true(kv_pool_check(pool));
    kv_table_free(p);
    assert_true(kv_pool_check(pool));
    kv_expect(pool, c, ctags); /* the shared blocks outlive the parent */
    kv_table_free(c);
    assert_true(kv_pool_check(pool));
    kv_table_free(c2);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), 8);
    kv_pool_free(pool);
}

static void
test_fork_f32(void **state)
{
    (void)state;
    run_fork(KERN_F32);
}

static void
test_fork_f16(void **state)
{
    (void)state;
    run_fork(KERN_F16);
}

/* A forked sequence truncated back into a shared block must copy it before
 * writing: that is the one way a shared partial block arises today. */
static void
run_cow(kern_dtype_t dtype)
{
    const uint32_t bt = 4;
    kv_pool_t *pool = make_pool(bt, 8, dtype);
    kv_table_t *p = make_table(pool), *c = NULL;
    uint32_t ptags[8], ctags[8];
    push(pool, p, 8, 100);
    seq_tags(ptags, 8, 100);
    assert_int_equal(kv_table_fork(p, &c), 0);
    assert_true(kv_pool_check(pool));
    int32_t shared = kv_table_blocks(p)[1];

    assert_int_equal(kv_table_truncate(c, 6), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_n_blocks(c), 2);
    assert_int_equal(kv_pool_refcount(pool, shared), 2);
    assert_int_equal(kv_table_next_pos(c), 6);

    /* Not reserved: append must not write into the parent's block. */
    int32_t pos[1] = {6}, slots[1];
    snap_t sc;
    take_snap(pool, c, &sc);
    assert_int_equal(kv_table_append(c, pos, 1, slots), KVS_ENOSPC);
    assert_true(kv_pool_check(pool));
    assert_unchanged(pool, c, &sc);
    /* Reserving nothing copies nothing. */
    assert_int_equal(kv_table_reserve(c, 0), 0);
    assert_true(kv_pool_check(pool));
    assert_unchanged(pool, c, &sc);

    uint32_t n_free = kv_pool_n_free(pool);
    assert_int_equal(kv_table_reserve(c, 1), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_n_blocks(c), 2);
    assert_int_not_equal(kv_table_blocks(c)[1], shared);
    assert_int_equal(kv_table_blocks(c)[0], kv_table_blocks(p)[0]);
    assert_int_equal(kv_pool_refcount(pool, shared), 1);
    assert_int_equal(kv_pool_refcount(pool, kv_table_blocks(c)[1]), 1);
    assert_int_equal(kv_pool_n_free(pool), n_free - 1);
    kv_expect(pool, c, ptags); /* entries 4, 5 came along */

    push(pool, c, 2, 500);
    memcpy(ctags, ptags, 6 * sizeof(uint32_t));
    seq_tags(ctags + 6, 2, 500);
    kv_expect(pool, c, ctags);
    kv_expect(pool, p, ptags);

    kv_table_free(c);
    assert_true(kv_pool_check(pool));
    kv_table_free(p);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), 8);
    kv_pool_free(pool);
}

static void
test_cow_f32(void **state)
{
    (void)state;
    run_cow(KERN_F32);
}

static void
test_cow_f16(void **state)
{
    (void)state;
    run_cow(KERN_F16);
}

static void
test_fork_cow_eagain(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 2, KERN_F32);
    kv_table_t *a = make_table(pool), *b = NULL, *x = NULL;
    push(pool, a, 8, 0);
    assert_int_equal(kv_pool_n_free(pool), 0);

    /* Only full blocks: a fork needs no free block. */
    assert_int_equal(kv_table_fork(a, &b), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_refcount(pool, 1), 2);

    assert_int_equal(kv_table_truncate(a, 5), 0);
    assert_true(kv_pool_check(pool));
    snap_t sa;
    take_snap(pool, a, &sa);

    /* A partial last block needs a copy, and there is no block for it. */
    x = (kv_table_t *)(uintptr_t)1;
    assert_int_equal(kv_table_fork(a, &x), KVS_EAGAIN);
    assert_null(x);
    assert_true(kv_pool_check(pool));
    assert_unchanged(pool, a, &sa);
    assert_int_equal(kv_pool_refcount(pool, 0), 2);
    assert_int_equal(kv_pool_refcount(pool, 1), 2);
    assert_int_equal(kv_table_reserve(a, 1), KVS_EAGAIN);
    assert_true(kv_pool_check(pool));
    assert_unchanged(pool, a, &sa);

    /* With the other reader gone the block is a's alone: no copy needed. */
    kv_table_free(b);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_reserve(a, 3), 0);
    assert_true(kv_pool_check(pool));
    assert_memory_equal(kv_table_blocks(a), sa.blocks, 2 * sizeof(int32_t));
    assert_int_equal(kv_pool_n_free(pool), 0);
    kv_table_free(a);
    assert_true(kv_pool_check(pool));
    kv_pool_free(pool);
}

/* ---- truncate -------------------------------------------------------------- */

static void
test_truncate(void **state)
{
    (void)state;
    const uint32_t bt = 4;
    kv_pool_t *pool = make_pool(bt, 8, KERN_F32);
    kv_table_t *t = make_table(pool);
    const int32_t pos[14] = {0, 1, 2, 3, 10, 11, 12, 4, 5, 6, 7, 8, 9, 20};
    int32_t slots[14];
    assert_int_equal(kv_table_reserve(t, 14), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_append(t, pos, 14, slots), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_next_pos(t), 21);
    assert_int_equal(kv_pool_n_free(pool), 4);

    assert_int_equal(kv_table_truncate(t, 15), KVS_EINVAL);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_len(t), 14);

    assert_int_equal(kv_table_truncate(t, 13), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_next_pos(t), 13);
    assert_int_equal(kv_table_n_blocks(t), 4);
    assert_int_equal(kv_pool_n_free(pool), 4);

    assert_int_equal(kv_table_truncate(t, 7), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_len(t), 7);
    assert_int_equal(kv_table_next_pos(t), 13); /* position 12 is still there */
    assert_int_equal(kv_table_n_blocks(t), 2);
    assert_int_equal(kv_pool_n_free(pool), 6);
    assert_memory_equal(kv_table_positions(t), pos, 7 * sizeof(int32_t));

    assert_int_equal(kv_table_truncate(t, 4), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_next_pos(t), 4);
    assert_int_equal(kv_table_n_blocks(t), 1);
    assert_int_equal(kv_pool_n_free(pool), 7);
    assert_int_equal(kv_table_truncate(t, 4), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_n_blocks(t), 1);

    /* Blocks reserved ahead go with a truncate too. */
    assert_int_equal(kv_table_reserve(t, 10), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_n_blocks(t), 4);
    assert_int_equal(kv_table_truncate(t, 4), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_n_blocks(t), 1);
    assert_int_equal(kv_pool_n_free(pool), 7);

    /* Positions continue from next_pos after a truncate. */
    int32_t more[3] = {4, 5, 6};
    assert_int_equal(kv_table_reserve(t, 3), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_append(t, more, 3, slots), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_next_pos(t), 7);
    assert_int_equal(slots[0], kv_table_blocks(t)[1] * 4);

    assert_int_equal(kv_table_truncate(t, 0), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_len(t), 0);
    assert_int_equal(kv_table_n_blocks(t), 0);
    assert_int_equal(kv_table_next_pos(t), 0);
    assert_int_equal(kv_pool_n_free(pool), 8);

    /* Truncating a fork drops references, not the parent's blocks. */
    push(pool, t, 8, 0);
    kv_table_t *c = NULL;
    assert_int_equal(kv_table_fork(t, &c), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_truncate(c, 0), 0);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_refcount(pool, kv_table_blocks(t)[0]), 1);
    assert_int_equal(kv_pool_refcount(pool, kv_table_blocks(t)[1]), 1);
    assert_int_equal(kv_pool_n_free(pool), 6);
    uint32_t tags[8];
    seq_tags(tags, 8, 0);
    kv_expect(pool, t, tags);

    kv_table_free(c);
    assert_true(kv_pool_check(pool));
    kv_table_free(t);
    assert_true(kv_pool_check(pool));
    kv_pool_free(pool);
}

/* kern_kv_t.block_gen: every block of every pool a value of its own; a
 * new one for a block handed out and for a full block a truncate reopens;
 * the same while a block's entries stay. */
static void
test_block_gen(void **state)
{
    (void)state;
    const uint32_t bt = 4, nb = 6;
    kv_pool_t *pa = make_pool(bt, nb, KERN_F32), *pb = make_pool(bt, nb, KERN_F32);
    const uint64_t *ga = kv_pool_kv(pa)->block_gen, *gb = kv_pool_kv(pb)->block_gen;
    assert_non_null(ga);
    assert_non_null(gb);
    for (uint32_t i = 0; i < 2 * nb; i++)
        for (uint32_t j = i + 1; j < 2 * nb; j++)
            assert_true((i < nb ? ga[i] : gb[i - nb]) != (j < nb ? ga[j] : gb[j - nb]));
    for (uint32_t i = 0; i < nb; i++)
        assert_true(ga[i] != 0);

    uint64_t before[6];
    memcpy(before, ga, sizeof before);
    kv_table_t *t = make_table(pa);
    push(pa, t, 8, 0);
    const int32_t b0 = kv_table_blocks(t)[0], b1 = kv_table_blocks(t)[1];
    assert_true(ga[b0] != before[b0] && ga[b1] != before[b1]);
    const uint64_t g0 = ga[b0], g1 = ga[b1];
    push(pa, t, 2, 8); /* into a third block: the full two stay */
    assert_true(ga[b0] == g0 && ga[b1] == g1);
    assert_int_equal(kv_table_truncate(t, 8), 0); /* the full two stay full */
    assert_true(ga[b0] == g0 && ga[b1] == g1);
    assert_int_equal(kv_table_truncate(t, 6), 0); /* b1 takes new entries */
    assert_true(ga[b0] == g0 && ga[b1] != g1);
    const uint64_t g1b = ga[b1];
    kv_table_free(t);
    assert_true(ga[b0] == g0 && ga[b1] == g1b); /* freed: nothing written */
    t = make_table(pa);
    push(pa, t, 8, 0); /* handed out again, last freed first */
    for (uint32_t i = 0; i < 2; i++) {
        int32_t b = kv_table_blocks(t)[i];
        assert_true(b == b0 || b == b1);
        assert_true(ga[b] != (b == b0 ? g0 : g1b));
    }
    kv_table_free(t);
    kv_pool_free(pa);
    kv_pool_free(pb);
}

/* ---- export ---------------------------------------------------------------- */

static void
test_export(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 16, KERN_F32);
    kv_table_t *t[5];
    for (int i = 0; i < 4; i++)
        t[i] = make_table(pool);
    push(pool, t[0], 5, 0);                          /* blocks 0 1, last_len 1 */
    push(pool, t[1], 8, 0);                          /* blocks 2 3, last_len 4 == block_tokens */
    assert_int_equal(kv_table_reserve(t[2], 13), 0); /* holds 4 5 6 7, uses 4 */
    assert_true(kv_pool_check(pool));
    push(pool, t[2], 3, 0);
    push(pool, t[3], 1, 0);                          /* block 8 */
    assert_int_equal(kv_table_fork(t[1], &t[4]), 0); /* shares 2 3 */
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_table_n_blocks(t[2]), 4);

    kv_table_t *order[5] = {t[0], t[1], t[2], t[4], t[3]};
    int32_t indptr[6], indices[16], last_len[5];
    memset(indices, 0xff, sizeof indices);
    kern_page_table_t pt = kv_tables_export(order, 5, indptr, indices, last_len);
    assert_ptr_equal(pt.indptr, indptr);
    assert_ptr_equal(pt.indices, indices);
    assert_ptr_equal(pt.last_len, last_len);
    assert_int_equal(pt.n_seqs, 5);

    const int32_t want_indptr[6] = {0, 2, 4, 5, 7, 8};
    const int32_t want_indices[8] = {0, 1, 2, 3, 4, 2, 3, 8};
    const int32_t want_last[5] = {1, 4, 3, 4, 1};
    assert_memory_equal(indptr, want_indptr, sizeof want_indptr);
    assert_memory_equal(indices, want_indices, sizeof want_indices);
    assert_memory_equal(last_len, want_last, sizeof want_last);
    assert_int_equal(indices[8], -1); /* reserved-ahead blocks are not exported */

    /* Exporting is read-only; one table alone gives the same row. */
    assert_true(kv_pool_check(pool));
    pt = kv_tables_export(&t[2], 1, indptr, indices, last_len);
    assert_int_equal(pt.n_seqs, 1);
    assert_int_equal(indptr[0], 0);
    assert_int_equal(indptr[1], 1);
    assert_int_equal(indices[0], 4);
    assert_int_equal(last_len[0], 3);
    pt = kv_tables_export(order, 0, indptr, indices, last_len);
    assert_int_equal(pt.n_seqs, 0);
    assert_int_equal(indptr[0], 0);

    for (int i = 0; i < 5; i++) {
        kv_table_free(t[i]);
        assert_true(kv_pool_check(pool));
    }
    kv_pool_free(pool);
}

/* last_len is always 1 at block_tokens 1 and reaches 16 at block_tokens 16. */
static void
test_export_bt(void **state)
{
    (void)state;
    static const uint32_t bts[] = {1, 16};
    for (size_t k = 0; k < 2; k++) {
        uint32_t bt = bts[k];
        kv_pool_t *pool = make_pool(bt, 64 / bt, KERN_F32);
        kv_table_t *a = make_table(pool), *b = make_table(pool);
        push(pool, a, 16, 0);
        push(pool, b, 13, 0);
        push(pool, b, 4, 0);
        kv_table_t *both[2] = {a, b};
        int32_t indptr[3], indices[64], last_len[2];
        kv_tables_export(both, 2, indptr, indices, last_len);
        assert_int_equal(indptr[0], 0);
        assert_int_equal(indptr[1], (int32_t)ceil_div(16, bt));
        assert_int_equal(indptr[2], (int32_t)(ceil_div(16, bt) + ceil_div(17, bt)));
        assert_int_equal(last_len[0], bt == 1 ? 1 : 16);
        assert_int_equal(last_len[1], 1);
        assert_memory_equal(indices, kv_table_blocks(a), (size_t)indptr[1] * sizeof(int32_t));
        assert_memory_equal(indices + indptr[1], kv_table_blocks(b),
                            (size_t)(indptr[2] - indptr[1]) * sizeof(int32_t));
        kv_table_free(a);
        assert_true(kv_pool_check(pool));
        kv_table_free(b);
        assert_true(kv_pool_check(pool));
        kv_pool_free(pool);
    }
}

/* ---- randomized stress against a shadow model -------------------------------- */

typedef struct shadow {
    kv_table_t *t;
    uint32_t len;
    int32_t pos[STRESS_MAX_TOKENS];
    uint32_t tag[STRESS_MAX_TOKENS];
} shadow_t;

static uint32_t
rnd(uint64_t *s)
{
    /* splitmix64: fixed seed, same sequence everywhere. */
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}

static bool
write_block_shared(const kv_pool_t *pool, const kv_table_t *t)
{
    uint32_t bt = kv_pool_cfg(pool)->block_tokens, len = kv_table_len(t);
    return len % bt != 0 && kv_pool_refcount(pool, kv_table_blocks(t)[len / bt]) > 1;
}

static void
shadow_verify(const kv_pool_t *pool, const shadow_t *sh)
{
    const kv_table_t *t = sh->t;
    assert_int_equal(kv_table_len(t), sh->len);
    int32_t next = 0;
    for (uint32_t i = 0; i < sh->len; i++) {
        assert_int_equal(kv_table_positions(t)[i], sh->pos[i]);
        if (sh->pos[i] >= next)
            next = sh->pos[i] + 1;
    }
    assert_int_equal(kv_table_next_pos(t), next);
    kv_expect(pool, t, sh->tag);
}

typedef struct stress_stats {
    int reserved, appended, forked, truncated, again, nospc, refused;
} stress_stats_t;

/* Reserves n for s, predicting the answer from the public state first:
 * KVS_ENOSPC past the pool's size, KVS_EAGAIN when the new blocks (plus a
 * copy of a shared partial block) exceed the free ones, else 0. */
static int
stress_reserve(kv_pool_t *pool, shadow_t *s, uint32_t n, stress_stats_t *st)
{
    uint32_t bt = kv_pool_cfg(pool)->block_tokens, n_blocks = kv_pool_cfg(pool)->n_blocks;
    uint64_t need = ((uint64_t)s->len + n + bt - 1) / bt;
    uint32_t held = kv_table_n_blocks(s->t);
    uint64_t take = (need > held ? need - held : 0) + (n > 0 && write_block_shared(pool, s->t));
    int want = need > n_blocks ? KVS_ENOSPC : take > kv_pool_n_free(pool) ? KVS_EAGAIN : 0;
    snap_t before;
    take_snap(pool, s->t, &before);
    int rc = kv_table_reserve(s->t, n);
    assert_int_equal(rc, want);
    assert_true(kv_pool_check(pool));
    if (rc != 0) {
        assert_unchanged(pool, s->t, &before);
        st->again += rc == KVS_EAGAIN;
        st->nospc += rc == KVS_ENOSPC;
        return rc;
    }
    st->reserved++;
    assert_true(kv_table_n_blocks(s->t) * bt >= s->len + n);
    assert_false(n > 0 && write_block_shared(pool, s->t));
    return 0;
}

/* Appends n tokens with mostly consecutive positions, sometimes skipping
 * ahead or revisiting an earlier one; expects KVS_ENOSPC exactly when the
 * table has not reserved room (or would write into a shared block). */
static void
stress_append(kv_pool_t *pool, shadow_t *s, uint32_t n, uint64_t *seed, uint32_t *next_tag,
              stress_stats_t *st)
{
    uint32_t bt = kv_pool_cfg(pool)->block_tokens;
    int32_t pos[8], slots[8];
    uint32_t tags[8];
    int32_t next = kv_table_next_pos(s->t);
    for (uint32_t i = 0; i < n; i++) {
        uint32_t how = rnd(seed) % 8;
        pos[i] = how == 0   ? (int32_t)(rnd(seed) % (uint32_t)(next + 1)) /* revisit */
                 : how == 1 ? next + 3                                    /* skip */
                            : next;
        if (pos[i] >= next)
            next = pos[i] + 1;
        tags[i] = (*next_tag)++;
    }
    bool fits = s->len + n <= kv_table_n_blocks(s->t) * bt && !write_block_shared(pool, s->t);
    int rc = kv_table_append(s->t, pos, n, slots);
    assert_int_equal(rc, fits ? 0 : KVS_ENOSPC);
    assert_true(kv_pool_check(pool));
    if (rc != 0) {
        st->refused++;
        return;
    }
    st->appended++;
    kv_write(pool, slots, tags, n);
    memcpy(s->pos + s->len, pos, n * sizeof *pos);
    memcpy(s->tag + s->len, tags, n * sizeof *tags);
    s->len += n;
}

/* Random new/reserve/append/fork/truncate/free over up to 8 tables, with
 * every table's positions and KV data checked against the shadow after
 * each step: a block written through one table and read through another
 * would show up as a wrong tag. */
static void
run_stress(uint32_t bt, uint32_t n_blocks, uint64_t seed, int n_ops)
{
    assert_true(bt * n_blocks <= STRESS_MAX_TOKENS);
    kv_pool_t *pool = make_pool(bt, n_blocks, KERN_F32);
    shadow_t *sh = calloc(STRESS_TABLES, sizeof *sh);
    assert_non_null(sh);
    uint32_t n_live = 0, next_tag = 1;
    stress_stats_t st = {0};

    for (int op = 0; op < n_ops; op++) {
        uint32_t r = rnd(&seed) % 100;
        shadow_t *s = n_live ? &sh[rnd(&seed) % n_live] : NULL;
        if (s == NULL || (r < 8 && n_live < STRESS_TABLES)) {
            shadow_t *d = &sh[n_live++];
            memset(d, 0, sizeof *d);
            assert_int_equal(kv_table_new(pool, &d->t), 0);
        } else if (r < 14) {
            kv_table_free(s->t);
            *s = sh[--n_live];
        } else if (r < 30) {
            /* Now and then far too much, to hit KVS_ENOSPC. */
            uint32_t n = rnd(&seed) % 8 == 0 ? rnd(&seed) % (2 * bt * n_blocks) : rnd(&seed) % 13;
            stress_reserve(pool, s, n, &st);
        } else if (r < 70) {
            /* Mostly a scheduler step (reserve, then append the same
             * amount); otherwise a bare append into what is reserved. */
            uint32_t n = 1 + rnd(&seed) % 8;
            if (rnd(&seed) % 4 == 0 || stress_reserve(pool, s, n, &st) == 0)
                stress_append(pool, s, n, &seed, &next_tag, &st);
        } else if (r < 86) {
            if (n_live == STRESS_TABLES)
                continue;
            bool partial = s->len % bt != 0;
            uint32_t n_free = kv_pool_n_free(pool);
            shadow_t *d = &sh[n_live];
            int rc = kv_table_fork(s->t, &d->t);
            assert_int_equal(rc, partial && n_free == 0 ? KVS_EAGAIN : 0);
            if (rc == 0) {
                st.forked++;
                n_live++;
                d->len = s->len;
                memcpy(d->pos, s->pos, sizeof d->pos);
                memcpy(d->tag, s->tag, sizeof d->tag);
                assert_int_equal(kv_pool_n_free(pool), n_free - partial);
            } else {
                st.again++;
                assert_null(d->t);
                assert_int_equal(kv_pool_n_free(pool), n_free);
            }
        } else {
            /* Mostly rejected draft tokens (a few off the end), sometimes
             * a deep cut. */
            uint32_t cut = rnd(&seed) % 4 == 0 ? rnd(&seed) % (s->len + 1) : rnd(&seed) % 5;
            uint32_t n = cut < s->len ? s->len - cut : 0;
            assert_int_equal(kv_table_truncate(s->t, n), 0);
            assert_int_equal(kv_table_n_blocks(s->t), (n + bt - 1) / bt);
            s->len = n;
            st.truncated++;
        }
        assert_true(kv_pool_check(pool));
        for (uint32_t i = 0; i < n_live; i++)
            shadow_verify(pool, &sh[i]);
    }
    /* The run must have exercised every outcome it checks. */
    assert_true(st.reserved > 0 && st.appended > 0 && st.forked > 0 && st.truncated > 0);
    assert_true(st.again > 0 && st.nospc > 0 && st.refused > 0);

    while (n_live > 0) {
        kv_table_free(sh[--n_live].t);
        assert_true(kv_pool_check(pool));
    }
    assert_int_equal(kv_pool_n_free(pool), n_blocks);
    free(sh);
    kv_pool_free(pool);
}

static void
test_stress_bt4(void **state)
{
    (void)state;
    run_stress(4, 24, 0x5eed0001u, 4000);
}

static void
test_stress_bt1(void **state)
{
    (void)state;
    run_stress(1, 40, 0x5eed0002u, 2000);
}

static void
test_stress_bt16(void **state)
{
    (void)state;
    run_stress(16, 6, 0x5eed0003u, 2000);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reserve_append_bt1),
        cmocka_unit_test(test_reserve_append_bt4),
        cmocka_unit_test(test_reserve_append_bt16),
        cmocka_unit_test(test_append_args),
        cmocka_unit_test(test_eagain_enospc),
        cmocka_unit_test(test_fork_f32),
        cmocka_unit_test(test_fork_f16),
        cmocka_unit_test(test_cow_f32),
        cmocka_unit_test(test_cow_f16),
        cmocka_unit_test(test_fork_cow_eagain),
        cmocka_unit_test(test_truncate),
        cmocka_unit_test(test_block_gen),
        cmocka_unit_test(test_export),
        cmocka_unit_test(test_export_bt),
        cmocka_unit_test(test_stress_bt4),
        cmocka_unit_test(test_stress_bt1),
        cmocka_unit_test(test_stress_bt16),
    };
    return cmocka_run_group_tests(tests, setup_backend, teardown_backend);
}
