/*
 * tests/cache/test_kv_prefix.c — the prefix cache over a real pool on the
 * "ref" backend: block hashes (deterministic, sensitive to every input),
 * match after commit (shared blocks, refcounts, positions), isolation by
 * the extra key, keys of two extras split at an entry, partial matches, the last token always left
 * to compute, cached blocks outliving their tables in the LRU list, eviction order, copy-on-write
 * into a cached block after a truncate, incremental commits, forks, the stats, a pool with the
 * cache off, and a seeded random stress that checks every table's KV data against a shadow model.
 * The KV written for a token depends on the whole token prefix and its position, so a block matched
 * for the wrong prefix, or a cached block written after its commit, shows up as wrong data.
 * kv_pool_check runs after every mutation; the LRU list and hash table are inspected through
 * cache/kv_int.h.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include <cmocka.h>

#include "base/kvs.h"
#include "cache/kv.h"
#include "cache/kv_int.h"
#include "kernels/kern.h"

#define MAX_TOKENS 64 /* per table in these tests */

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

#define CHECK(pool) assert_true(kv_pool_check(pool))

static kv_pool_t *
make_pool(uint32_t block_tokens, uint32_t n_blocks, bool prefix_cache)
{
    kv_pool_cfg_t cfg = {
        .n_layers = 2,
        .n_kv_heads = 2,
        .head_dim = 4,
        .block_tokens = block_tokens,
        .n_blocks = n_blocks,
        .dtype = KERN_F32,
        .prefix_cache = prefix_cache,
    };
    kv_pool_t *pool = NULL;
    assert_int_equal(kv_pool_new(&cfg, g_be, &pool), 0);
    CHECK(pool);
    return pool;
}

static kv_table_t *
make_table(kv_pool_t *pool)
{
    kv_table_t *t = NULL;
    assert_int_equal(kv_table_new(pool, &t), 0);
    CHECK(pool);
    return t;
}

static void
free_table(kv_pool_t *pool, kv_table_t *t)
{
    kv_table_free(t);
    CHECK(pool);
}

static kv_prefix_stats_t
stats(const kv_pool_t *pool)
{
    kv_prefix_stats_t s;
    kv_pool_prefix_stats(pool, &s);
    return s;
}

/* ---- KV data: a token's KV depends on its whole prefix and position ------ */

/* tags[i] for entry i of a sequence of tokens at positions pos. */
static void
seq_tags(const int32_t *tokens, const int32_t *pos, uint32_t n, uint32_t *tags)
{
    uint64_t h = 0x9e3779b9u;
    for (uint32_t i = 0; i < n; i++) {
        h = h * 1000003u ^ (uint32_t)tokens[i];
        tags[i] = (uint32_t)((h ^ (uint64_t)pos[i] * 7919u) % 50021u);
    }
}

/* Small integers and quarters, exact in f32, distinct per (tag, layer,
 * head, dim) and between K and V. */
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
    return ((const float *)base)[idx];
}

/* Writes entries tagged tags[0..n) into slots[0..n) in every layer. */
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

/* Entry i of t holds the KV of tokens[0..i] at its position. */
static void
kv_expect(const kv_pool_t *pool, const kv_table_t *t, const int32_t *tokens)
{
    const kern_kv_t *kv = kv_pool_kv(pool);
    uint32_t len = kv_table_len(t), bt = kv->block_tokens;
    uint32_t tags[MAX_TOKENS];
    assert_true(len <= MAX_TOKENS);
    seq_tags(tokens, kv_table_positions(t), len, tags);
    for (uint32_t i = 0; i < len; i++) {
        int32_t slot = kv_table_blocks(t)[i / bt] * (int32_t)bt + (int32_t)(i % bt);
        for (uint32_t l = 0; l < kv->n_layers; l++)
            for (uint32_t h = 0; h < kv->n_kv_heads; h++)
                for (uint32_t d = 0; d < kv->head_dim; d++) {
                    assert_true(kv_read(kv, 0, l, slot, h, d) == kv_val(tags[i], l, h, d, 0));
                    assert_true(kv_read(kv, 1, l, slot, h, d) == kv_val(tags[i], l, h, d, 1));
                }
    }
}

/* Appends tokens[len..len+n) at the given positions (natural ones when pos
 * is NULL), writing their KV; tokens is the whole sequence from entry 0,
 * since an entry's KV depends on all of it.  Returns the reserve's answer; on anything
 * but 0 nothing was appended. */
static int
feed_at(kv_pool_t *pool, kv_table_t *t, const int32_t *tokens, uint32_t n, const int32_t *pos)
{
    uint32_t len = kv_table_len(t);
    assert_true(len + n <= MAX_TOKENS);
    int rc = kv_table_reserve(t, n);
    CHECK(pool);
    if (rc != 0)
        return rc;
    int32_t all_pos[MAX_TOKENS], slots[16];
    uint32_t tags[MAX_TOKENS];
    memcpy(all_pos, kv_table_positions(t), len * sizeof(int32_t));
    for (uint32_t i = 0; i < n; i++)
        all_pos[len + i] = pos ? pos[i] : (int32_t)(len + i);
    seq_tags(tokens, all_pos, len + n, tags);
    for (uint32_t done = 0; done < n;) {
        uint32_t c = n - done < 16 ? n - done : 16;
        assert_int_equal(kv_table_append(t, all_pos + len + done, c, slots), 0);
        CHECK(pool);
        kv_write(pool, slots, tags + len + done, c);
        done += c;
    }
    return 0;
}

/* feed_at at natural positions, which must fit. */
static void
feed(kv_pool_t *pool, kv_table_t *t, const int32_t *tokens, uint32_t n)
{
    assert_int_equal(feed_at(pool, t, tokens, n, NULL), 0);
}

static void
commit(kv_pool_t *pool, kv_table_t *t, const int32_t *tokens, uint32_t n, uint64_t extra)
{
    assert_int_equal(kv_prefix_commit(t, tokens, n, extra), 0);
    CHECK(pool);
}

/* A new table matched against tokens[0..n); returns it, *m = matched. */
static kv_table_t *
match_new(kv_pool_t *pool, const int32_t *tokens, uint32_t n, uint64_t extra, uint32_t *m)
{
    kv_table_t *t = make_table(pool);
    *m = UINT32_MAX;
    assert_int_equal(kv_prefix_match(t, tokens, n, extra, m), 0);
    CHECK(pool);
    assert_int_equal(kv_table_len(t), *m);
    assert_int_equal(kv_table_next_pos(t), (int32_t)*m);
    return t;
}

static uint32_t
match_count(kv_pool_t *pool, const int32_t *tokens, uint32_t n, uint64_t extra)
{
    uint32_t m;
    kv_table_t *t = match_new(pool, tokens, n, extra, &m);
    free_table(pool, t);
    return m;
}

static void
fill_tokens(int32_t *tokens, uint32_t n, int32_t first)
{
    for (uint32_t i = 0; i < n; i++)
        tokens[i] = first + (int32_t)i * 7;
}

/* The LRU list, head first, into out; returns its length. */
static uint32_t
lru_order(const kv_pool_t *pool, int32_t *out, uint32_t cap)
{
    uint32_t n = 0;
    for (int32_t b = pool->lru_head; b >= 0; b = pool->meta[b].lru_next) {
        assert_true(n < cap);
        out[n++] = b;
    }
    return n;
}

/* ---- hashing ---------------------------------------------------------------- */

static void
test_hash(void **state)
{
    (void)state;
    const int32_t a[4] = {1, 2, 3, 4}, b[4] = {1, 2, 3, 5}, c[4] = {2, 1, 3, 4};
    const int32_t neg[4] = {-1, 0, INT32_MAX, INT32_MIN};
    uint64_t h = kv_block_hash(0, a, 4, 0);

    /* Deterministic: pinned values, so a change to the function (which
     * would orphan hashes kept outside this process) fails here. */
    assert_true(h == kv_block_hash(0, a, 4, 0));
    assert_true(h == 0x2999096c767effd9ull);
    assert_true(kv_block_hash(h, b, 4, 42) == 0x353523c02108cbe2ull);
    assert_true(kv_block_hash(0, NULL, 0, 0) == 0x2be35b94e3b25581ull);

    /* Every input matters: parent, extra, a token, order, length. */
    uint64_t others[] = {
        kv_block_hash(1, a, 4, 0),   kv_block_hash(0, a, 4, 1),   kv_block_hash(0, b, 4, 0),
        kv_block_hash(0, c, 4, 0),   kv_block_hash(0, a, 3, 0),   kv_block_hash(0, a, 0, 0),
        kv_block_hash(0, neg, 4, 0), kv__block_hash2(0, a, 4, 0),
    };
    for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
        assert_true(others[i] != h);
        for (size_t j = 0; j < i; j++)
            assert_true(others[i] != others[j]);
    }
    /* Parent and extra are not interchangeable. */
    assert_true(kv_block_hash(5, a, 4, 9) != kv_block_hash(9, a, 4, 5));
    /* An odd count differs from the same tokens padded with a zero. */
    const int32_t pad[4] = {1, 2, 3, 0};
    assert_true(kv_block_hash(0, a, 3, 0) != kv_block_hash(0, pad, 4, 0));
}

/* ---- match and commit --------------------------------------------------------- */

static void
test_match_after_commit(void **state)
{
    (void)state;
    const uint32_t bt = 4;
    kv_pool_t *pool = make_pool(bt, 16, true);
    int32_t tok[16];
    fill_tokens(tok, 16, 100);

    kv_table_t *a = make_table(pool);
    feed(pool, a, tok, 10); /* blocks 0, 1 full, 2 partial */
    assert_int_equal(stats(pool).cached_blocks, 0);
    commit(pool, a, tok, 10, 7);
    assert_int_equal(stats(pool).cached_blocks, 2);
    int32_t ab[3];
    memcpy(ab, kv_table_blocks(a), sizeof ab);
    assert_true(pool->meta[ab[0]].cached && pool->meta[ab[1]].cached);
    assert_false(pool->meta[ab[2]].cached);

    uint32_t m;
    kv_table_t *b = match_new(pool, tok, 10, 7, &m);
    assert_int_equal(m, 8);
    assert_int_equal(kv_table_n_blocks(b), 2);
    assert_memory_equal(kv_table_blocks(b), ab, 2 * sizeof(int32_t));
    assert_int_equal(kv_pool_refcount(pool, ab[0]), 2);
    assert_int_equal(kv_pool_refcount(pool, ab[1]), 2);
    for (uint32_t i = 0; i < 8; i++)
        assert_int_equal(kv_table_positions(b)[i], (int32_t)i);
    kv_expect(pool, b, tok); /* a's KV, seen through b */

    /* b computes the rest into a block of its own. */
    uint32_t n_free = kv_pool_n_free(pool);
    feed(pool, b, tok, 2);
    assert_int_equal(kv_pool_n_free(pool), n_free - 1);
    assert_int_not_equal(kv_table_blocks(b)[2], ab[2]);
    assert_int_equal(kv_pool_refcount(pool, ab[2]), 1);
    kv_expect(pool, b, tok);
    commit(pool, b, tok, 10, 7); /* nothing new: both full blocks came from a */
    assert_int_equal(stats(pool).cached_blocks, 2);

    /* Both fill block 2 with the same tokens; whoever commits first owns
     * the cache entry, the other keeps an unregistered twin. */
    feed(pool, a, tok, 2);
    feed(pool, b, tok, 2);
    commit(pool, b, tok, 12, 7);
    commit(pool, a, tok, 12, 7);
    assert_int_equal(stats(pool).cached_blocks, 3);
    assert_true(pool->meta[kv_table_blocks(b)[2]].cached);
    assert_false(pool->meta[ab[2]].cached);

    /* Released: the cached blocks wait in the LRU list, the twin is free. */
    free_table(pool, a);
    assert_int_equal(pool->n_lru, 0); /* b still holds all three */
    free_table(pool, b);
    assert_int_equal(pool->n_lru, 3);
    assert_int_equal(stats(pool).cached_blocks, 3);
    assert_int_equal(kv_pool_n_free(pool), 16);

    kv_table_t *c = match_new(pool, tok, 13, 7, &m);
    assert_int_equal(m, 12);
    assert_int_equal(pool->n_lru, 0);
    assert_int_equal(kv_pool_n_free(pool), 13);
    for (uint32_t i = 0; i < 3; i++)
        assert_int_equal(kv_pool_refcount(pool, kv_table_blocks(c)[i]), 1);
    kv_expect(pool, c, tok);
    free_table(pool, c);
    kv_pool_free(pool);
}

static void
test_extra_isolation(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 16, true);
    int32_t tok[13];
    fill_tokens(tok, 13, 5);
    /* Stand-ins for a caller's keys: salt "alice", salt "bob", and alice
     * with an f16 KV cache. */
    const uint64_t alice = 0xa11ce, bob = 0xb0b, alice_f16 = 0xa11ce ^ (1ull << 40);

    kv_table_t *a = make_table(pool);
    feed(pool, a, tok, 12);
    commit(pool, a, tok, 12, alice);
    assert_int_equal(match_count(pool, tok, 13, bob), 0);
    assert_int_equal(match_count(pool, tok, 13, alice_f16), 0);
    assert_int_equal(match_count(pool, tok, 13, 0), 0);
    assert_int_equal(match_count(pool, tok, 13, alice), 12);

    /* The same tokens committed under another key are another entry, and
     * each key finds its own blocks. */
    kv_table_t *b = make_table(pool);
    feed(pool, b, tok, 12);
    commit(pool, b, tok, 12, bob);
    assert_int_equal(stats(pool).cached_blocks, 6);
    uint32_t m;
    kv_table_t *x = match_new(pool, tok, 13, bob, &m);
    assert_int_equal(m, 12);
    assert_memory_equal(kv_table_blocks(x), kv_table_blocks(b), 3 * sizeof(int32_t));
    free_table(pool, x);
    x = match_new(pool, tok, 13, alice, &m);
    assert_memory_equal(kv_table_blocks(x), kv_table_blocks(a), 3 * sizeof(int32_t));
    free_table(pool, x);

    free_table(pool, a);
    free_table(pool, b);
    kv_pool_free(pool);
}

/* A key of two extras (kv_prefix_key_t): blocks wholly below n_first under
 * the first, later ones under the second, on commit and on match; and
 * after == extra is the plain one-extra key. */
static uint32_t
match_key(kv_pool_t *pool, const int32_t *tokens, uint32_t n, uint64_t a, uint64_t b,
          uint32_t first)
{
    kv_table_t *t = make_table(pool);
    const kv_prefix_key_t k = {a, b, first};
    uint32_t m = UINT32_MAX;
    assert_int_equal(kv_prefix_match_key(t, tokens, n, &k, &m), 0);
    CHECK(pool);
    assert_int_equal(kv_table_len(t), m);
    free_table(pool, t);
    return m;
}

static void
test_split_key(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 16, true);
    int32_t tok[17];
    fill_tokens(tok, 17, 3);
    const uint64_t p = 0x70, g = 0x67;
    kv_table_t *a = make_table(pool);
    feed(pool, a, tok, 16);
    /* Blocks 0 and 1 (entries 0 .. 7) under p; 2 (8 .. 11, with entry 9
     * past n_first) and 3 under g. */
    const kv_prefix_key_t k = {p, g, 9};
    assert_int_equal(kv_prefix_commit_key(a, tok, 16, &k), 0);
    CHECK(pool);
    assert_int_equal(stats(pool).cached_blocks, 4);
    assert_int_equal(match_count(pool, tok, 17, p), 8);
    assert_int_equal(match_count(pool, tok, 17, g), 0);
    assert_int_equal(match_key(pool, tok, 17, p, g, 9), 16);
    assert_int_equal(match_key(pool, tok, 17, p, g, 8), 16);
    assert_int_equal(match_key(pool, tok, 17, p, g, 12), 8); /* block 2 wanted under p */
    assert_int_equal(match_key(pool, tok, 17, p, g, 4), 4);  /* block 1 wanted under g */
    assert_int_equal(match_key(pool, tok, 17, p, p, 9), 8);
    /* A commit under another key hashes the table's blocks again. */
    assert_int_equal(kv_prefix_commit(a, tok, 16, p), 0);
    CHECK(pool);
    assert_int_equal(match_count(pool, tok, 17, p), 8); /* blocks 2, 3 stay under g */
    free_table(pool, a);
    kv_table_t *b = make_table(pool);
    feed(pool, b, tok, 16);
    commit(pool, b, tok, 16, p);
    assert_int_equal(match_count(pool, tok, 17, p), 16);
    assert_int_equal(match_key(pool, tok, 17, p, g, 9), 16); /* g's blocks still there */
    free_table(pool, b);
    kv_table_t *t = make_table(pool);
    uint32_t m;
    assert_int_equal(kv_prefix_match_key(t, tok, 17, NULL, &m), KVS_EINVAL);
    assert_int_equal(kv_prefix_commit_key(t, tok, 0, NULL), KVS_EINVAL);
    free_table(pool, t);
    kv_pool_free(pool);
}

static void
test_partial_match(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 16, true);
    int32_t tok[17], q[17];
    fill_tokens(tok, 17, 1000);
    kv_table_t *a = make_table(pool);
    feed(pool, a, tok, 16);
    commit(pool, a, tok, 16, 0);
    assert_int_equal(stats(pool).cached_blocks, 4);

    /* A difference in block j leaves exactly the j blocks before it. */
    static const struct {
        uint32_t at, want;
    } cases[] = {{0, 0}, {3, 0}, {4, 4}, {9, 8}, {11, 8}, {12, 12}, {15, 12}, {16, 16}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        memcpy(q, tok, sizeof q);
        q[cases[i].at] += 1;
        uint32_t m;
        kv_table_t *x = match_new(pool, q, 17, 0, &m);
        assert_int_equal(m, cases[i].want);
        assert_memory_equal(kv_table_blocks(x), kv_table_blocks(a), m / 4 * sizeof(int32_t));
        free_table(pool, x);
    }
    free_table(pool, a);
    kv_pool_free(pool);
}

static void
test_last_token_computed(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 16, true);
    int32_t tok[16];
    fill_tokens(tok, 16, 1);
    kv_table_t *a = make_table(pool);
    feed(pool, a, tok, 12);
    commit(pool, a, tok, 12, 0);

    /* n a multiple of block_tokens: the block holding token n-1 is left
     * to compute, so its logits exist. */
    static const uint32_t n[] = {0, 1, 4, 5, 8, 9, 12, 13, 16};
    static const uint32_t want[] = {0, 0, 0, 4, 4, 8, 8, 12, 12};
    uint64_t queried = 0;
    for (size_t i = 0; i < sizeof n / sizeof n[0]; i++) {
        assert_int_equal(match_count(pool, tok, n[i], 0), want[i]);
        queried += n[i];
    }
    assert_int_equal(stats(pool).queried_tokens, queried);

    /* A match of nothing leaves an empty table that works as usual. */
    uint32_t m;
    kv_table_t *x = match_new(pool, tok, 4, 0, &m);
    assert_int_equal(m, 0);
    assert_int_equal(kv_table_n_blocks(x), 0);
    feed(pool, x, tok, 4);
    free_table(pool, x);
    free_table(pool, a);
    kv_pool_free(pool);
}

static void
test_args(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 8, true);
    int32_t tok[8];
    fill_tokens(tok, 8, 3);
    kv_table_t *t = make_table(pool);
    uint32_t m = 99;

    assert_int_equal(kv_prefix_match(t, tok, 8, 0, NULL), KVS_EINVAL);
    assert_int_equal(kv_prefix_match(t, NULL, 8, 0, &m), KVS_EINVAL);
    assert_int_equal(m, 0);
    m = 99;
    assert_int_equal(kv_prefix_match(t, NULL, 0, 0, &m), 0);
    assert_int_equal(m, 0);
    CHECK(pool);

    /* Not empty: blocks reserved ahead, or entries. */
    assert_int_equal(kv_table_reserve(t, 2), 0);
    CHECK(pool);
    assert_int_equal(kv_prefix_match(t, tok, 8, 0, &m), KVS_EINVAL);
    feed(pool, t, tok, 5);
    assert_int_equal(kv_prefix_match(t, tok, 8, 0, &m), KVS_EINVAL);
    CHECK(pool);
    assert_int_equal(kv_table_len(t), 5);

    assert_int_equal(kv_prefix_commit(t, tok, 6, 0), KVS_EINVAL);
    assert_int_equal(kv_prefix_commit(t, NULL, 4, 0), KVS_EINVAL);
    assert_int_equal(kv_prefix_commit(t, NULL, 0, 0), 0);
    assert_int_equal(kv_prefix_commit(t, tok, 3, 0), 0); /* no full block */
    CHECK(pool);
    assert_int_equal(stats(pool).cached_blocks, 0);

    /* Truncated to nothing, the table is empty again. */
    assert_int_equal(kv_table_truncate(t, 0), 0);
    CHECK(pool);
    assert_int_equal(kv_prefix_match(t, tok, 8, 0, &m), 0);
    CHECK(pool);
    free_table(pool, t);
    kv_pool_free(pool);
}

/* ---- lifetime ------------------------------------------------------------------ */

static void
test_lru_after_free(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 12, true);
    int32_t tok[2][13];
    fill_tokens(tok[0], 13, 10);
    fill_tokens(tok[1], 13, 20);
    kv_table_t *t[2];
    for (int i = 0; i < 2; i++) {
        t[i] = make_table(pool);
        feed(pool, t[i], tok[i], 13); /* 3 full blocks and 1 partial */
        commit(pool, t[i], tok[i], 13, 0);
    }
    int32_t held[2][4];
    for (int i = 0; i < 2; i++)
        memcpy(held[i], kv_table_blocks(t[i]), sizeof held[i]);
    free_table(pool, t[0]);
    free_table(pool, t[1]);

    /* Every block is usable again, the cached ones still findable. */
    assert_int_equal(kv_pool_n_free(pool), 12);
    assert_int_equal(pool->n_free, 6);
    assert_int_equal(pool->n_lru, 6);
    assert_int_equal(stats(pool).cached_blocks, 6);
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 4; j++) {
            assert_int_equal(kv_pool_refcount(pool, held[i][j]), 0);
            assert_true(pool->meta[held[i][j]].cached == (j < 3));
        }

    uint32_t m;
    kv_table_t *x = match_new(pool, tok[1], 13, 0, &m);
    assert_int_equal(m, 12);
    assert_memory_equal(kv_table_blocks(x), held[1], 3 * sizeof(int32_t));
    assert_int_equal(kv_pool_n_free(pool), 9);
    assert_int_equal(pool->n_lru, 3);
    kv_expect(pool, x, tok[1]);
    free_table(pool, x);
    assert_int_equal(kv_pool_n_free(pool), 12);
    kv_pool_free(pool);
}

static void
test_lru_eviction_order(void **state)
{
    (void)state;
    const uint32_t bt = 4;
    kv_pool_t *pool = make_pool(bt, 10, true);
    enum { A, B, C };
    int32_t tok[3][13], blk[3][3];
    kv_table_t *t[3];
    for (int i = 0; i < 3; i++) {
        fill_tokens(tok[i], 13, 1000 * (i + 1));
        t[i] = make_table(pool);
        feed(pool, t[i], tok[i], 12);
        commit(pool, t[i], tok[i], 12, 0);
        memcpy(blk[i], kv_table_blocks(t[i]), sizeof blk[i]);
    }
    assert_int_equal(kv_pool_n_free(pool), 1);

    /* Released B, A, C; each table lets go of its last block first. */
    free_table(pool, t[B]);
    free_table(pool, t[A]);
    free_table(pool, t[C]);
    int32_t order[10];
    int32_t want[9] = {blk[B][2], blk[B][1], blk[B][0], blk[A][2], blk[A][1],
                       blk[A][0], blk[C][2], blk[C][1], blk[C][0]};
    assert_int_equal(lru_order(pool, order, 10), 9);
    assert_memory_equal(order, want, sizeof want);

    /* The free block goes first, with no eviction. */
    kv_table_t *x = make_table(pool);
    assert_int_equal(kv_table_reserve(x, 4), 0);
    CHECK(pool);
    assert_int_equal(stats(pool).evictions, 0);
    assert_int_equal(stats(pool).cached_blocks, 9);

    /* Then the least recently released: B's tail block. */
    assert_int_equal(kv_table_reserve(x, 8), 0);
    CHECK(pool);
    assert_int_equal(kv_table_blocks(x)[1], blk[B][2]);
    assert_int_equal(stats(pool).evictions, 1);
    assert_int_equal(stats(pool).cached_blocks, 8);
    assert_false(pool->meta[blk[B][2]].cached);
    assert_int_equal(kv_pool_n_free(pool), 8);

    /* B now matches two blocks; using them makes them recent again. */
    assert_int_equal(match_count(pool, tok[B], 13, 0), 8);
    int32_t want2[8] = {blk[A][2], blk[A][1], blk[A][0], blk[C][2],
                        blk[C][1], blk[C][0], blk[B][1], blk[B][0]};
    assert_int_equal(lru_order(pool, order, 10), 8);
    assert_memory_equal(order, want2, sizeof want2);

    /* So A goes next, tail first. */
    assert_int_equal(kv_table_reserve(x, 16), 0);
    CHECK(pool);
    assert_int_equal(kv_table_blocks(x)[2], blk[A][2]);
    assert_int_equal(kv_table_blocks(x)[3], blk[A][1]);
    assert_int_equal(stats(pool).evictions, 3);
    assert_int_equal(match_count(pool, tok[A], 13, 0), 4);
    assert_int_equal(match_count(pool, tok[B], 13, 0), 8);
    assert_int_equal(match_count(pool, tok[C], 13, 0), 12);

    /* Taking the whole pool evicts everything. */
    assert_int_equal(kv_table_reserve(x, 40), 0);
    CHECK(pool);
    assert_int_equal(stats(pool).cached_blocks, 0);
    assert_int_equal(stats(pool).evictions, 9);
    assert_int_equal(pool->n_lru, 0);
    assert_int_equal(kv_pool_n_free(pool), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(match_count(pool, tok[i], 13, 0), 0);
    assert_int_equal(kv_table_reserve(x, 41), KVS_ENOSPC);
    CHECK(pool);
    free_table(pool, x);
    assert_int_equal(kv_pool_n_free(pool), 10);
    kv_pool_free(pool);
}

/* Capacity counts evictable blocks, so KVS_EAGAIN comes only when the
 * blocks in use leave too few. */
static void
test_capacity_counts_lru(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 4, true);
    int32_t tok[16];
    fill_tokens(tok, 16, 1);
    kv_table_t *a = make_table(pool);
    feed(pool, a, tok, 16);
    commit(pool, a, tok, 16, 0);
    free_table(pool, a);
    assert_int_equal(kv_pool_n_free(pool), 4);
    assert_int_equal(pool->n_free, 0);
    assert_int_equal(pool->n_lru, 4);

    uint32_t m;
    kv_table_t *x = match_new(pool, tok, 16, 0, &m); /* 3 blocks */
    assert_int_equal(m, 12);
    assert_int_equal(kv_pool_n_free(pool), 1);
    feed(pool, x, tok, 2); /* evicts the last cached block */
    assert_int_equal(stats(pool).evictions, 1);
    assert_int_equal(kv_pool_n_free(pool), 0);

    kv_table_t *y = make_table(pool), *z = NULL;
    assert_int_equal(kv_table_reserve(y, 1), KVS_EAGAIN);
    CHECK(pool);
    assert_int_equal(kv_table_fork(x, &z), KVS_EAGAIN); /* no block for the copy */
    CHECK(pool);
    assert_null(z);
    assert_int_equal(kv_table_truncate(x, 12), 0); /* the private block is free */
    CHECK(pool);
    assert_int_equal(pool->n_free, 1);
    assert_int_equal(kv_table_reserve(y, 1), 0);
    CHECK(pool);
    assert_int_equal(stats(pool).evictions, 1);
    free_table(pool, y);
    free_table(pool, x);
    assert_int_equal(pool->n_lru, 3);

    /* The whole pool for one table: the free block, then every cached one. */
    z = make_table(pool);
    assert_int_equal(kv_table_reserve(z, 16), 0);
    CHECK(pool);
    assert_int_equal(stats(pool).evictions, 4);
    assert_int_equal(stats(pool).cached_blocks, 0);
    free_table(pool, z);
    assert_int_equal(pool->n_free, 4);
    kv_pool_free(pool);
}

/* A truncate back into a cached full block reopens it; appending must not
 * change what the cache promises to later matches. */
static void
test_cow_cached_block(void **state)
{
    (void)state;
    const uint32_t bt = 4;
    kv_pool_t *pool = make_pool(bt, 8, true);
    int32_t tok[9], alt[9];
    fill_tokens(tok, 9, 50);
    memcpy(alt, tok, sizeof alt);
    alt[6] = alt[7] = 999;

    kv_table_t *a = make_table(pool);
    feed(pool, a, tok, 8);
    commit(pool, a, tok, 8, 0);
    int32_t cached1 = kv_table_blocks(a)[1];
    assert_int_equal(a->n_hashed, 2);

    assert_int_equal(kv_table_truncate(a, 6), 0);
    CHECK(pool);
    assert_int_equal(a->n_hashed, 1);
    assert_int_equal(kv_pool_refcount(pool, cached1), 1);
    assert_true(pool->meta[cached1].cached);

    /* Unreserved, append refuses; an empty reserve copies nothing. */
    int32_t pos[1] = {6}, slot[1];
    assert_int_equal(kv_table_append(a, pos, 1, slot), KVS_ENOSPC);
    CHECK(pool);
    assert_int_equal(kv_table_reserve(a, 0), 0);
    CHECK(pool);
    assert_int_equal(kv_table_blocks(a)[1], cached1);

    /* The reserve copies: a gets a private block, the cached one goes to
     * the LRU list, and the count of usable blocks does not move. */
    uint32_t n_free = kv_pool_n_free(pool);
    assert_int_equal(kv_table_reserve(a, 2), 0);
    CHECK(pool);
    int32_t own = kv_table_blocks(a)[1];
    assert_int_not_equal(own, cached1);
    assert_int_equal(kv_pool_refcount(pool, cached1), 0);
    assert_true(pool->meta[cached1].cached);
    assert_false(pool->meta[own].cached);
    assert_int_equal(pool->n_lru, 1);
    assert_int_equal(kv_pool_n_free(pool), n_free);
    kv_expect(pool, a, tok); /* entries 4, 5 came along */

    feed(pool, a, alt, 2);
    kv_expect(pool, a, alt);
    /* The cached block still holds the original tokens 4..7. */
    uint32_t m;
    kv_table_t *b = match_new(pool, tok, 9, 0, &m);
    assert_int_equal(m, 8);
    assert_int_equal(kv_table_blocks(b)[1], cached1);
    kv_expect(pool, b, tok);

    /* Committing a's new contents adds them under their own hash. */
    commit(pool, a, alt, 8, 0);
    assert_int_equal(stats(pool).cached_blocks, 3);
    assert_true(pool->meta[own].cached);
    kv_table_t *c = match_new(pool, alt, 9, 0, &m);
    assert_int_equal(m, 8);
    assert_int_equal(kv_table_blocks(c)[1], own);
    kv_expect(pool, c, alt);

    /* A cached block shared by two tables is copied the same way, and a
     * truncate to its start just drops the reference. */
    assert_int_equal(kv_table_truncate(c, 5), 0);
    CHECK(pool);
    assert_int_equal(kv_table_reserve(c, 1), 0);
    CHECK(pool);
    assert_int_not_equal(kv_table_blocks(c)[1], own);
    assert_int_equal(kv_pool_refcount(pool, own), 1);
    assert_int_equal(kv_table_truncate(b, 4), 0);
    CHECK(pool);
    assert_int_equal(kv_table_n_blocks(b), 1);
    assert_int_equal(kv_pool_refcount(pool, cached1), 0);
    assert_true(pool->meta[cached1].cached);

    free_table(pool, a);
    free_table(pool, b);
    free_table(pool, c);
    assert_int_equal(kv_pool_n_free(pool), 8);
    assert_int_equal(stats(pool).cached_blocks, 3);
    kv_pool_free(pool);
}

/* ---- commit details -------------------------------------------------------------- */

static void
test_commit_incremental(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 16, true);
    int32_t tok[17];
    fill_tokens(tok, 17, 300);
    kv_table_t *a = make_table(pool);
    feed(pool, a, tok, 6);
    commit(pool, a, tok, 6, 1);
    assert_int_equal(a->n_hashed, 1);
    assert_int_equal(stats(pool).cached_blocks, 1);
    /* Fewer tokens than committed before: nothing to do. */
    commit(pool, a, tok, 3, 1);
    assert_int_equal(a->n_hashed, 1);
    feed(pool, a, tok, 10);
    commit(pool, a, tok, 12, 1);
    assert_int_equal(a->n_hashed, 3);
    commit(pool, a, tok, 12, 1);
    commit(pool, a, tok, 16, 1);
    assert_int_equal(a->n_hashed, 4);
    assert_int_equal(stats(pool).cached_blocks, 4);
    /* The table's hashes are the chain the public function computes. */
    uint64_t h = 0;
    for (uint32_t i = 0; i < 4; i++) {
        h = kv_block_hash(h, tok + 4 * i, 4, 1);
        assert_true(a->hashes[i].h1 == h);
        assert_true(pool->meta[kv_table_blocks(a)[i]].key.h1 == h);
    }
    assert_int_equal(match_count(pool, tok, 17, 1), 16);

    /* Another key starts the chain over; blocks cached under the first
     * key keep it. */
    commit(pool, a, tok, 16, 2);
    assert_int_equal(a->n_hashed, 4);
    assert_true(a->hash_extra == 2);
    assert_int_equal(stats(pool).cached_blocks, 4);
    assert_int_equal(match_count(pool, tok, 17, 2), 0);
    assert_int_equal(match_count(pool, tok, 17, 1), 16);
    free_table(pool, a);
    kv_pool_free(pool);
}

/* Blocks whose entries are not at their natural positions are never
 * committed, nor is anything after them. */
static void
test_commit_positions(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 16, true);
    int32_t tok[13];
    fill_tokens(tok, 13, 40);
    kv_table_t *a = make_table(pool);
    feed(pool, a, tok, 4);
    const int32_t skip[8] = {4, 5, 7, 8, 9, 10, 11, 12}; /* position 6 skipped */
    assert_int_equal(feed_at(pool, a, tok, 8, skip), 0);
    kv_expect(pool, a, tok);
    commit(pool, a, tok, 12, 0);
    assert_int_equal(stats(pool).cached_blocks, 1);
    assert_int_equal(a->n_hashed, 1);
    commit(pool, a, tok, 12, 0);
    assert_int_equal(stats(pool).cached_blocks, 1);
    assert_int_equal(match_count(pool, tok, 13, 0), 4);

    /* Positions that revisit one are just as foreign. */
    kv_table_t *b = make_table(pool);
    const int32_t again[4] = {0, 1, 1, 2};
    assert_int_equal(feed_at(pool, b, tok, 4, again), 0);
    commit(pool, b, tok, 4, 5);
    assert_int_equal(stats(pool).cached_blocks, 1);
    free_table(pool, a);
    free_table(pool, b);
    kv_pool_free(pool);
}

static void
test_fork_keeps_hashes(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 16, true);
    int32_t tok[16], alt[16];
    fill_tokens(tok, 16, 70);
    memcpy(alt, tok, sizeof alt);
    alt[10] = alt[11] = -5;
    kv_table_t *p = make_table(pool);
    feed(pool, p, tok, 10);
    commit(pool, p, tok, 10, 3);

    kv_table_t *c = NULL;
    assert_int_equal(kv_table_fork(p, &c), 0);
    CHECK(pool);
    assert_int_equal(c->n_hashed, 2);
    assert_true(c->hash_extra == 3);
    assert_memory_equal(c->hashes, p->hashes, 2 * sizeof *c->hashes);

    /* Each continues differently; each commits only its own block 2. */
    feed(pool, p, tok, 2);
    feed(pool, c, alt, 2);
    commit(pool, c, alt, 12, 3);
    commit(pool, p, tok, 12, 3);
    assert_int_equal(stats(pool).cached_blocks, 4);
    kv_expect(pool, p, tok);
    kv_expect(pool, c, alt);
    uint32_t m;
    kv_table_t *x = match_new(pool, alt, 13, 3, &m);
    assert_int_equal(m, 12);
    assert_memory_equal(kv_table_blocks(x), kv_table_blocks(c), 3 * sizeof(int32_t));
    kv_expect(pool, x, alt);
    free_table(pool, x);

    /* A fork of a matched table starts from the matched hashes. */
    x = match_new(pool, tok, 13, 3, &m);
    kv_table_t *y = NULL;
    assert_int_equal(kv_table_fork(x, &y), 0);
    CHECK(pool);
    assert_int_equal(y->n_hashed, 3);
    assert_int_equal(kv_pool_refcount(pool, kv_table_blocks(p)[0]), 4);
    free_table(pool, x);
    free_table(pool, y);
    free_table(pool, p);
    free_table(pool, c);
    assert_int_equal(pool->n_lru, 4);
    kv_pool_free(pool);
}

/* ---- stats and the cache turned off ------------------------------------------------ */

static void
test_stats(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 6, true);
    kv_prefix_stats_t s = stats(pool);
    assert_true(s.queried_tokens == 0 && s.hit_tokens == 0 && s.evictions == 0 &&
                s.cached_blocks == 0);
    int32_t tok[13], other[24];
    fill_tokens(tok, 13, 1);
    fill_tokens(other, 24, 2);
    kv_table_t *a = make_table(pool);
    feed(pool, a, tok, 12);
    commit(pool, a, tok, 12, 0);
    free_table(pool, a);

    assert_int_equal(match_count(pool, tok, 13, 0), 12);
    assert_int_equal(match_count(pool, tok, 10, 0), 8);
    assert_int_equal(match_count(pool, other, 13, 0), 0);
    s = stats(pool);
    assert_int_equal(s.queried_tokens, 36);
    assert_int_equal(s.hit_tokens, 20);
    assert_int_equal(s.evictions, 0);
    assert_int_equal(s.cached_blocks, 3);

    /* Five blocks for other: three free, two evicted. */
    kv_table_t *b = make_table(pool);
    feed(pool, b, other, 13);
    feed(pool, b, other, 7);
    s = stats(pool);
    assert_int_equal(s.evictions, 2);
    assert_int_equal(s.cached_blocks, 1);
    free_table(pool, b);
    kv_pool_free(pool);
}

/* Runs one fixed sequence of table operations (commits included) and
 * records every table's blocks after each step. */
static void
script(kv_pool_t *pool, int32_t *trace, uint32_t *n_trace)
{
    int32_t tok[32]; /* c may match 16 and then append 9 */
    fill_tokens(tok, 32, 9);
    kv_table_t *a = make_table(pool), *b = NULL, *c = make_table(pool);
    uint32_t m = 99;
    assert_int_equal(kv_prefix_match(a, tok, 24, 0, &m), 0);
    assert_int_equal(m, 0);
    feed(pool, a, tok, 10);
    assert_int_equal(kv_prefix_commit(a, tok, 10, 0), 0);
    assert_int_equal(kv_table_fork(a, &b), 0);
    CHECK(pool);
    feed(pool, b, tok, 6);
    assert_int_equal(kv_prefix_commit(b, tok, 16, 0), 0);
    free_table(pool, a);
    assert_int_equal(kv_prefix_match(c, tok, 24, 0, &m), 0);
    CHECK(pool);
    feed(pool, c, tok, 9);
    assert_int_equal(kv_table_truncate(b, 5), 0);
    CHECK(pool);
    feed(pool, b, tok, 3);
    kv_table_t *tabs[2] = {b, c};
    for (int i = 0; i < 2; i++) {
        trace[(*n_trace)++] = (int32_t)kv_table_n_blocks(tabs[i]);
        for (uint32_t j = 0; j < kv_table_n_blocks(tabs[i]); j++)
            trace[(*n_trace)++] = kv_table_blocks(tabs[i])[j];
    }
    trace[(*n_trace)++] = (int32_t)m;
    free_table(pool, b);
    free_table(pool, c);
    trace[(*n_trace)++] = (int32_t)kv_pool_n_free(pool);
    trace[(*n_trace)++] = (int32_t)pool->n_free;
}

static void
test_prefix_off(void **state)
{
    (void)state;
    kv_pool_t *off = make_pool(4, 12, false);
    assert_null(off->meta);
    int32_t trace[64];
    uint32_t n_trace = 0;
    script(off, trace, &n_trace);
    /* Free list only: the same blocks come back in today's LIFO order. */
    assert_int_equal(trace[n_trace - 1], 12);
    assert_int_equal(trace[n_trace - 2], 12);
    assert_int_equal(trace[n_trace - 3], 0); /* nothing matched */
    kv_prefix_stats_t s = stats(off);
    assert_true(s.queried_tokens == 0 && s.hit_tokens == 0 && s.evictions == 0 &&
                s.cached_blocks == 0);
    assert_int_equal(off->n_lru, 0);

    /* The expected trace of the same script before the prefix cache
     * existed: the first free blocks, reused LIFO. */
    static const int32_t before[] = {2, 0,  1,    /* b: a's full blocks */
                                     3, 2,  5, 6, /* c: a's freed block first */
                                     0, 12, 12};
    assert_int_equal(n_trace, sizeof before / sizeof before[0]);
    assert_memory_equal(trace, before, sizeof before);

    /* Arguments are not even looked at when the cache is off. */
    kv_table_t *t = make_table(off);
    feed(off, t, trace, 3);
    uint32_t m = 5;
    assert_int_equal(kv_prefix_match(t, NULL, 9, 0, &m), 0);
    assert_int_equal(m, 0);
    assert_int_equal(kv_prefix_commit(t, NULL, 99, 0), 0);
    CHECK(off);
    assert_int_equal(kv_table_len(t), 3);
    free_table(off, t);
    kv_pool_free(off);

    /* With the cache on, c matches b's four committed blocks, which stay
     * cached (evictable) at the end. */
    kv_pool_t *on = make_pool(4, 12, true);
    n_trace = 0;
    script(on, trace, &n_trace);
    assert_int_equal(trace[n_trace - 3], 16);
    assert_int_equal(trace[n_trace - 2], 12);
    assert_int_equal(trace[n_trace - 1], 8);
    assert_int_equal(stats(on).cached_blocks, 4);
    kv_pool_free(on);
}

/* Moves cached block b to the head of the bucket for key, under that key
 * (a test-only poke at the hash table). */
static void
relink(kv_pool_t *pool, int32_t b, kv_hash_pair_t key, uint64_t parent, uint64_t extra)
{
    kv_block_meta_t *m = pool->meta;
    int32_t *link = &pool->buckets[m[b].key.h1 & pool->bucket_mask];
    while (*link != b) {
        assert_true(*link >= 0);
        link = &m[*link].bucket_next;
    }
    *link = m[b].bucket_next;
    m[b].key = key;
    m[b].parent = parent;
    m[b].extra = extra;
    int32_t *head = &pool->buckets[key.h1 & pool->bucket_mask];
    m[b].bucket_next = *head;
    *head = b;
}

/* The checker is only worth something if it fails on broken state. */
static void
test_check_detects(void **state)
{
    (void)state;
    kv_pool_t *pool = make_pool(4, 8, true);
    int32_t tok[12];
    fill_tokens(tok, 12, 1);
    kv_table_t *a = make_table(pool), *b = make_table(pool);
    feed(pool, a, tok, 8);
    commit(pool, a, tok, 8, 0);
    feed(pool, b, tok, 12);
    commit(pool, b, tok, 12, 1);
    free_table(pool, b); /* b's three blocks wait in the LRU list */
    int32_t used = kv_table_blocks(a)[0], lru = pool->lru_head;
    assert_true(lru >= 0 && pool->n_free > 0);
    int32_t free_b = pool->free_ids[0];
    kv_block_meta_t *m = pool->meta;

    /* A cached block on the free stack (counts adjusted to match). */
    m[free_b].cached = true;
    assert_false(kv_pool_check(pool));
    m[free_b].cached = false;
    CHECK(pool);

    /* An unused cached block missing from the LRU list. */
    kv__lru_remove(pool, lru);
    pool->n_free++;
    assert_false(kv_pool_check(pool));
    pool->n_free--;
    kv__lru_push_tail(pool, lru);
    CHECK(pool);

    /* A used block in the LRU list. */
    int32_t saved_head = pool->lru_head;
    m[used].lru_next = pool->lru_head;
    m[pool->lru_head].lru_prev = used;
    pool->lru_head = used;
    pool->n_lru++;
    assert_false(kv_pool_check(pool));
    pool->n_lru--;
    pool->lru_head = saved_head;
    m[saved_head].lru_prev = -1;
    m[used].lru_next = -1;
    CHECK(pool);

    /* A broken back link, and a count off. */
    int32_t second = m[pool->lru_head].lru_next;
    m[second].lru_prev = -1;
    assert_false(kv_pool_check(pool));
    m[second].lru_prev = pool->lru_head;
    pool->n_lru++;
    assert_false(kv_pool_check(pool));
    pool->n_lru--;
    pool->n_cached++;
    assert_false(kv_pool_check(pool));
    pool->n_cached--;
    CHECK(pool);

    /* A key that no longer agrees with its bucket, and a duplicate key. */
    kv_hash_pair_t key = m[used].key;
    m[used].key.h1 ^= 1; /* another bucket */
    assert_false(kv_pool_check(pool));
    m[used].key = key;
    CHECK(pool);
    /* A second block under lru's key, linked into lru's bucket ahead of it:
     * a lookup of lru's key no longer finds lru. */
    int32_t twin = kv_table_blocks(a)[1];
    kv_block_meta_t saved = m[twin];
    relink(pool, twin, m[lru].key, m[lru].parent, m[lru].extra);
    assert_false(kv_pool_check(pool));
    relink(pool, twin, saved.key, saved.parent, saved.extra);
    CHECK(pool);

    /* A block reserved ahead that is cached. */
    assert_int_equal(kv_table_reserve(a, 8), 0);
    CHECK(pool);
    int32_t ahead = kv_table_blocks(a)[2];
    assert_false(m[ahead].cached);
    m[ahead].cached = true;
    assert_false(kv_pool_check(pool));
    m[ahead].cached = false;
    CHECK(pool);

    /* A table claiming hashes for a block that is not full. */
    a->n_hashed = 3;
    assert_false(kv_pool_check(pool));
    a->n_hashed = 2;
    CHECK(pool);

    free_table(pool, a);
    kv_pool_free(pool);
}

/* ---- random stress -------------------------------------------------------------------- */

#define STRESS_TABLES 6
#define DOC_TOKENS 40

typedef struct shadow {
    kv_table_t *t;
    uint32_t len;
    uint64_t extra;
    int32_t tok[MAX_TOKENS];
    int32_t pos[MAX_TOKENS];
} shadow_t;

typedef struct stress_stats {
    int matched, missed, committed, forked, truncated, cows, again, skipped;
} stress_stats_t;

static uint32_t
rnd(uint64_t *s)
{
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(*s >> 33);
}

static void
shadow_verify(const kv_pool_t *pool, const shadow_t *s)
{
    assert_int_equal(kv_table_len(s->t), s->len);
    assert_memory_equal(kv_table_positions(s->t), s->pos, s->len * sizeof(int32_t));
    kv_expect(pool, s->t, s->tok);
}

/* Appends n tokens (natural positions, or now and then one skipped) to s
 * with a reserve first; returns false on KVS_EAGAIN. */
static bool
stress_feed(kv_pool_t *pool, shadow_t *s, const int32_t *tok, uint32_t n, bool skip,
            stress_stats_t *st)
{
    uint32_t bt = kv_pool_cfg(pool)->block_tokens;
    const kv_table_t *t = s->t;
    bool cow = n > 0 && s->len % bt != 0 && pool->meta[kv_table_blocks(t)[s->len / bt]].cached &&
               kv_pool_refcount(pool, kv_table_blocks(t)[s->len / bt]) == 1;
    int32_t pos[MAX_TOKENS];
    int32_t next = kv_table_next_pos(t);
    for (uint32_t i = 0; i < n; i++)
        pos[i] = next + (int32_t)i + (skip ? 1 : 0);
    memcpy(s->tok + s->len, tok, n * sizeof *tok);
    int rc = feed_at(pool, s->t, s->tok, n, pos);
    if (rc == KVS_EAGAIN) {
        st->again++;
        return false;
    }
    assert_int_equal(rc, 0);
    st->cows += cow;
    st->skipped += skip;
    memcpy(s->pos + s->len, pos, n * sizeof *pos);
    s->len += n;
    return true;
}

/* Match for a new table and check the answer against the index: every
 * matched block is cached under the chain of the prompt, and the next
 * block (if one could match) is not. */
static uint32_t
stress_match(kv_pool_t *pool, shadow_t *s, const int32_t *prompt, uint32_t n)
{
    uint32_t bt = kv_pool_cfg(pool)->block_tokens, m;
    assert_int_equal(kv_prefix_match(s->t, prompt, n, s->extra, &m), 0);
    CHECK(pool);
    assert_true(m % bt == 0 && (n == 0 ? m == 0 : m <= n - 1));
    kv_hash_pair_t prev = {0, 0};
    for (uint32_t i = 0; i <= m / bt && (i + 1) * bt <= n - 1; i++) {
        kv_hash_pair_t key = {kv_block_hash(prev.h1, prompt + i * bt, bt, s->extra),
                              kv__block_hash2(prev.h2, prompt + i * bt, bt, s->extra)};
        int32_t b = kv__prefix_lookup(pool, key, prev.h1, s->extra);
        if (i < m / bt) {
            assert_int_equal(b, kv_table_blocks(s->t)[i]);
            assert_true(kv_pool_refcount(pool, b) >= 1);
        } else {
            assert_int_equal(b, -1);
        }
        prev = key;
    }
    memcpy(s->tok, prompt, m * sizeof *prompt);
    for (uint32_t i = 0; i < m; i++)
        s->pos[i] = (int32_t)i;
    s->len = m;
    return m;
}

static void
run_stress(uint32_t bt, uint32_t n_blocks, uint64_t seed, int n_ops)
{
    kv_pool_t *pool = make_pool(bt, n_blocks, true);
    shadow_t *sh = calloc(STRESS_TABLES, sizeof *sh);
    assert_non_null(sh);
    /* A few documents with a small alphabet, so prompts share prefixes
     * and blocks of equal tokens appear in different chains. */
    int32_t doc[3][DOC_TOKENS];
    for (int d = 0; d < 3; d++)
        for (int i = 0; i < DOC_TOKENS; i++)
            doc[d][i] = (int32_t)(rnd(&seed) % 6);
    uint32_t n_live = 0;
    stress_stats_t st = {0};

    for (int op = 0; op < n_ops; op++) {
        uint32_t r = rnd(&seed) % 100;
        shadow_t *s = n_live ? &sh[rnd(&seed) % n_live] : NULL;
        if (s == NULL || (r < 20 && n_live < STRESS_TABLES)) {
            /* A request: a document's prefix and a random tail. */
            int32_t prompt[MAX_TOKENS];
            const int32_t *d = doc[rnd(&seed) % 3];
            uint32_t from_doc = rnd(&seed) % (DOC_TOKENS + 1);
            uint32_t n = from_doc + rnd(&seed) % 6;
            if (n == 0)
                n = 1;
            if (n > 44)
                n = 44;
            for (uint32_t i = 0; i < n; i++)
                prompt[i] = i < from_doc ? d[i] : (int32_t)(rnd(&seed) % 6);
            shadow_t *x = &sh[n_live++];
            memset(x, 0, sizeof *x);
            x->extra = rnd(&seed) % 8 == 0 ? 0x5a17 : 0;
            assert_int_equal(kv_table_new(pool, &x->t), 0);
            CHECK(pool);
            uint32_t m = stress_match(pool, x, prompt, n);
            st.matched += m > 0;
            st.missed += m == 0;
            if (!stress_feed(pool, x, prompt + m, n - m, false, &st)) {
                /* Not admitted: the scheduler would wait. */
                kv_table_free(x->t);
                *x = sh[--n_live];
            } else if (rnd(&seed) % 4 != 0) {
                assert_int_equal(kv_prefix_commit(x->t, x->tok, x->len, x->extra), 0);
                st.committed++;
            }
        } else if (r < 30) {
            kv_table_free(s->t);
            *s = sh[--n_live];
        } else if (r < 60) {
            /* Decode steps: mostly tokens from a document, a commit now
             * and then, rarely a skipped position. */
            uint32_t n = 1 + rnd(&seed) % 4;
            if (s->len + n > 48)
                continue;
            int32_t tok[4];
            const int32_t *d = doc[rnd(&seed) % 3];
            for (uint32_t i = 0; i < n; i++)
                tok[i] = s->len + i < DOC_TOKENS && rnd(&seed) % 3 != 0 ? d[s->len + i]
                                                                        : (int32_t)(rnd(&seed) % 6);
            if (stress_feed(pool, s, tok, n, rnd(&seed) % 16 == 0, &st) && rnd(&seed) % 2) {
                assert_int_equal(kv_prefix_commit(s->t, s->tok, s->len, s->extra), 0);
                st.committed++;
            }
        } else if (r < 70) {
            uint32_t n = rnd(&seed) % (s->len + 1);
            assert_int_equal(kv_prefix_commit(s->t, s->tok, n, s->extra), 0);
            st.committed++;
        } else if (r < 82) {
            if (n_live == STRESS_TABLES)
                continue;
            bool partial = s->len % bt != 0;
            uint32_t avail = kv_pool_n_free(pool);
            shadow_t *x = &sh[n_live];
            int rc = kv_table_fork(s->t, &x->t);
            assert_int_equal(rc, partial && avail == 0 ? KVS_EAGAIN : 0);
            if (rc == 0) {
                kv_table_t *t = x->t;
                *x = *s;
                x->t = t;
                n_live++;
                st.forked++;
            } else {
                st.again++;
            }
        } else {
            /* Rejected draft tokens, or a deep cut. */
            uint32_t cut = rnd(&seed) % 3 == 0 ? rnd(&seed) % (s->len + 1) : rnd(&seed) % 5;
            uint32_t n = cut < s->len ? s->len - cut : 0;
            assert_int_equal(kv_table_truncate(s->t, n), 0);
            s->len = n;
            st.truncated++;
        }
        CHECK(pool);
        for (uint32_t i = 0; i < n_live; i++)
            shadow_verify(pool, &sh[i]);
    }
    kv_prefix_stats_t ps = stats(pool);
    assert_true(ps.hit_tokens <= ps.queried_tokens);
    /* The run must have exercised what it checks. */
    assert_true(st.matched > 0 && st.missed > 0 && st.committed > 0 && st.forked > 0);
    assert_true(st.truncated > 0 && st.cows > 0 && st.again > 0 && st.skipped > 0);
    assert_true(ps.evictions > 0 && ps.cached_blocks > 0);

    while (n_live > 0) {
        kv_table_free(sh[--n_live].t);
        CHECK(pool);
    }
    assert_int_equal(kv_pool_n_free(pool), n_blocks);
    assert_int_equal(pool->n_lru, stats(pool).cached_blocks);
    for (uint32_t b = 0; b < n_blocks; b++)
        assert_int_equal(kv_pool_refcount(pool, (int32_t)b), 0);
    free(sh);
    kv_pool_free(pool);
}

static void
test_stress_bt4(void **state)
{
    (void)state;
    run_stress(4, 16, 0x9f1e0001u, 3000);
}

static void
test_stress_bt2(void **state)
{
    (void)state;
    run_stress(2, 28, 0x9f1e0002u, 3000);
}

static void
test_stress_bt8(void **state)
{
    (void)state;
    run_stress(8, 8, 0x9f1e0003u, 3000);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hash),
        cmocka_unit_test(test_match_after_commit),
        cmocka_unit_test(test_extra_isolation),
        cmocka_unit_test(test_split_key),
        cmocka_unit_test(test_partial_match),
        cmocka_unit_test(test_last_token_computed),
        cmocka_unit_test(test_args),
        cmocka_unit_test(test_lru_after_free),
        cmocka_unit_test(test_lru_eviction_order),
        cmocka_unit_test(test_capacity_counts_lru),
        cmocka_unit_test(test_cow_cached_block),
        cmocka_unit_test(test_commit_incremental),
        cmocka_unit_test(test_commit_positions),
        cmocka_unit_test(test_fork_keeps_hashes),
        cmocka_unit_test(test_stats),
        cmocka_unit_test(test_prefix_off),
        cmocka_unit_test(test_check_detects),
        cmocka_unit_test(test_stress_bt4),
        cmocka_unit_test(test_stress_bt2),
        cmocka_unit_test(test_stress_bt8),
    };
    return cmocka_run_group_tests(tests, setup_backend, teardown_backend);
}
