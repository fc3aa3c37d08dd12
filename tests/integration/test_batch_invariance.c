/*
 * tests/integration/test_batch_invariance.c — the forward pass must not
 * depend on how sequences are batched: the same sequences computed alone,
 * together, in chunks, with different block sizes and scrambled block
 * layouts, and with a forked shared prefix give the same logits (1e-5
 * relative), and so does every row of a prompt whose rows all want them.  Runs the real model code
 * on a random tiny model, on the cpu backend or the one KVS_TEST_BACKEND names (bench/gpu/check.sh:
 * cuda; exit 77, skipped, when it cannot start).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "cache/kv.h"
#include "model/model.h"
#include "sched/sched.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N_SEQ 3
#define N_DEC 6
#define TOL 1e-5
/* With f16 KV a last-bit difference in a K or V value (from a different
 * summation order in a matrix product) can flip its f16 rounding, a 2^-11
 * relative step that later layers carry; that is rounding, not a batching
 * bug, so f16 runs get a looser bound. */
#define TOL_F16_KV 1e-3

typedef struct fixture {
    char path[256];
    kern_backend_t *be;
    model_t *m;
    uint32_t n_vocab;
} fixture_t;

static fixture_t fx;

static const char *
backend_name(void)
{
    const char *b = getenv("KVS_TEST_BACKEND");
    return b && *b ? b : "cpu";
}

static int
setup(void **state)
{
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(fx.path, sizeof fx.path, "%s/kvs_inv_XXXXXX", tmp ? tmp : "/tmp");
    int fd = mkstemp(fx.path);
    if (fd < 0)
        return -1;
    close(fd);
    char err[256];
    if (model_random_write("tiny", KERN_F32, 7, NULL, fx.path, err, sizeof err))
        return -1;
    if (model_load(fx.path, fx.be, &fx.m, err, sizeof err))
        return -1;
    fx.n_vocab = model_hparams(fx.m)->n_vocab;
    return 0;
}

static int
teardown(void **state)
{
    (void)state;
    model_free(fx.m);
    unlink(fx.path);
    return 0;
}

static const uint32_t prompt_len[N_SEQ] = {37, 5, 64};

static int32_t
prompt_tok(int s, uint32_t i)
{
    return (int32_t)((s * 97 + i * 31 + 11) % 256);
}

/* Fixed decode inputs (not sampled) so every schedule feeds the same tokens. */
static int32_t
dec_tok(int s, uint32_t i)
{
    return (int32_t)((s * 13 + i * 7 + 3) % 256);
}

typedef struct run {
    float logits[N_SEQ][N_DEC + 1][259];
} run_t;

static double
rel_err(const float *a, const float *b, uint32_t n)
{
    double mx = 0, md = 0;
    for (uint32_t i = 0; i < n; i++) {
        mx = fmax(mx, fabs((double)b[i]));
        md = fmax(md, fabs((double)a[i] - (double)b[i]));
    }
    return md / (mx > 0 ? mx : 1);
}

static void
compare_tol(const run_t *a, const run_t *b, const char *what, double tol)
{
    for (int s = 0; s < N_SEQ; s++)
        for (int t = 0; t <= N_DEC; t++) {
            double e = rel_err(a->logits[s][t], b->logits[s][t], fx.n_vocab);
            if (e > tol) {
                fprintf(stderr, "%s: seq %d step %d rel err %.3g\n", what, s, t, e);
                fail();
            }
        }
}

static void
compare(const run_t *a, const run_t *b, const char *what)
{
    compare_tol(a, b, what, TOL);
}

typedef struct plan_cfg {
    uint32_t block_tokens;
    uint32_t chunk; /* prefill chunk size */
    bool together;  /* all sequences in one batch per step */
    bool scramble;  /* permute the free list before use */
    kern_dtype_t kv;
} plan_cfg_t;

/* Runs the three sequences under a schedule and records the logits after
 * each prompt and each decode token. */
static void
run_schedule(const plan_cfg_t *c, run_t *out)
{
    kv_pool_cfg_t pc = {
        .n_layers = model_hparams(fx.m)->n_layer,
        .n_kv_heads = model_hparams(fx.m)->n_head_kv,
        .head_dim = model_hparams(fx.m)->head_dim,
        .block_tokens = c->block_tokens,
        .n_blocks = 512 / c->block_tokens + 16,
        .dtype = c->kv,
    };
    kv_pool_t *pool;
    assert_int_equal(kv_pool_new(&pc, fx.be, &pool), 0);
    if (c->scramble) {
        /* Take blocks in several tables and free every other table, so the
         * sequences get non-contiguous, non-monotonic block ids. */
        kv_table_t *tmp[8];
        for (int i = 0; i < 8; i++) {
            assert_int_equal(kv_table_new(pool, &tmp[i]), 0);
            assert_int_equal(kv_table_reserve(tmp[i], c->block_tokens * (1 + i % 3)), 0);
        }
        for (int i = 0; i < 8; i += 2)
            kv_table_free(tmp[i]);
        for (int i = 7; i > 0; i -= 2)
            kv_table_free(tmp[i]);
    }
    kv_table_t *tab[N_SEQ];
    for (int s = 0; s < N_SEQ; s++)
        assert_int_equal(kv_table_new(pool, &tab[s]), 0);
    model_ctx_t *ctx;
    assert_int_equal(model_ctx_new(fx.m, 256, N_SEQ, &ctx), 0);
    sched_batch_t *sb;
    assert_int_equal(sched_batch_new(&sb), 0);
    float *logits = malloc(sizeof(float) * N_SEQ * fx.n_vocab);

    int32_t toks[N_SEQ][128];
    for (int s = 0; s < N_SEQ; s++)
        for (uint32_t i = 0; i < prompt_len[s]; i++)
            toks[s][i] = prompt_tok(s, i);
    uint32_t done[N_SEQ] = {0};
    int dec_step[N_SEQ] = {0};
    /* Each iteration: every unfinished sequence advances by one chunk (or
     * one decode token); together=false runs them one at a time. */
    for (;;) {
        sched_seq_step_t steps[N_SEQ];
        int who[N_SEQ];
        uint32_t n = 0;
        int32_t dtok[N_SEQ];
        for (int s = 0; s < N_SEQ; s++) {
            if (dec_step[s] > N_DEC)
                continue;
            if (done[s] < prompt_len[s]) {
                uint32_t k = prompt_len[s] - done[s];
                if (k > c->chunk)
                    k = c->chunk;
                steps[n] = (sched_seq_step_t){.table = tab[s],
                                              .tokens = toks[s] + done[s],
                                              .n_tokens = k,
                                              .want_logits = done[s] + k == prompt_len[s]};
                done[s] += k;
            } else {
                dtok[s] = dec_tok(s, (uint32_t)dec_step[s]);
                steps[n] = (sched_seq_step_t){
                    .table = tab[s], .tokens = &dtok[s], .n_tokens = 1, .want_logits = true};
            }
            who[n++] = s;
            if (!c->together)
                break;
        }
        if (n == 0)
            break;
        const model_batch_t *mb;
        assert_int_equal(sched_batch_build(sb, steps, n, &mb), 0);
        assert_int_equal(model_forward(ctx, kv_pool_kv(pool), mb, logits), 0);
        uint32_t li = 0;
        for (uint32_t j = 0; j < n; j++) {
            int s = who[j];
            if (!steps[j].want_logits)
                continue;
            memcpy(out->logits[s][dec_step[s]], logits + (size_t)li * fx.n_vocab,
                   fx.n_vocab * sizeof(float));
            li++;
            dec_step[s]++;
        }
        assert_true(kv_pool_check(pool));
    }
    for (int s = 0; s < N_SEQ; s++)
        kv_table_free(tab[s]);
    assert_int_equal(kv_pool_n_free(pool), pc.n_blocks);
    free(logits);
    sched_batch_free(sb);
    model_ctx_free(ctx);
    kv_pool_free(pool);
}

static void
test_alone_vs_together(void **state)
{
    (void)state;
    static run_t alone, together, chunked, scrambled;
    run_schedule(&(plan_cfg_t){16, 256, false, false, KERN_F32}, &alone);
    run_schedule(&(plan_cfg_t){16, 256, true, false, KERN_F32}, &together);
    compare(&alone, &together, "together");
    run_schedule(&(plan_cfg_t){4, 7, true, false, KERN_F32}, &chunked);
    compare(&alone, &chunked, "chunked, block 4");
    run_schedule(&(plan_cfg_t){1, 13, true, true, KERN_F32}, &scrambled);
    compare(&alone, &scrambled, "scrambled, block 1");
    run_schedule(&(plan_cfg_t){8, 5, false, true, KERN_F32}, &scrambled);
    compare(&alone, &scrambled, "scrambled, block 8, one at a time");
}

static void
test_f16_kv_batching(void **state)
{
    (void)state;
    /* f16 KV changes the numbers, but batching still must not. */
    static run_t alone, together;
    run_schedule(&(plan_cfg_t){16, 256, false, false, KERN_F16}, &alone);
    run_schedule(&(plan_cfg_t){4, 9, true, true, KERN_F16}, &together);
    compare_tol(&alone, &together, "f16 kv", TOL_F16_KV);
}

/* A shared prefix computed once and forked gives the same continuation
 * logits as each sequence computed from scratch. */
static void
test_fork_shared_prefix(void **state)
{
    (void)state;
    const model_hparams_t *hp = model_hparams(fx.m);
    kv_pool_cfg_t pc = {.n_layers = hp->n_layer,
                        .n_kv_heads = hp->n_head_kv,
                        .head_dim = hp->head_dim,
                        .block_tokens = 8,
                        .n_blocks = 64,
                        .dtype = KERN_F32};
    kv_pool_t *pool;
    assert_int_equal(kv_pool_new(&pc, fx.be, &pool), 0);
    model_ctx_t *ctx;
    assert_int_equal(model_ctx_new(fx.m, 128, 2, &ctx), 0);
    sched_batch_t *sb;
    assert_int_equal(sched_batch_new(&sb), 0);
    float *lg = malloc(sizeof(float) * 2 * fx.n_vocab);
    float *ref = malloc(sizeof(float) * 2 * fx.n_vocab);

    int32_t prefix[43], tail[2][5];
    for (int i = 0; i < 43; i++)
        prefix[i] = prompt_tok(0, (uint32_t)i);
    for (int b = 0; b < 2; b++)
        for (int i = 0; i < 5; i++)
            tail[b][i] = prompt_tok(b + 1, (uint32_t)i);

    /* From scratch: prefix + tail in one go, per branch. */
    for (int b = 0; b < 2; b++) {
        kv_table_t *t;
        assert_int_equal(kv_table_new(pool, &t), 0);
        int32_t all[48];
        memcpy(all, prefix, sizeof prefix);
        memcpy(all + 43, tail[b], sizeof tail[b]);
        sched_seq_step_t st = {.table = t, .tokens = all, .n_tokens = 48, .want_logits = true};
        const model_batch_t *mb;
        assert_int_equal(sched_batch_build(sb, &st, 1, &mb), 0);
        assert_int_equal(model_forward(ctx, kv_pool_kv(pool), mb, ref + b * fx.n_vocab), 0);
        kv_table_free(t);
    }
    /* Shared: prefix once (43 tokens = 5 full blocks + 3), fork, both tails
     * in one batch. */
    kv_table_t *p, *f;
    assert_int_equal(kv_table_new(pool, &p), 0);
    sched_seq_step_t st = {.table = p, .tokens = prefix, .n_tokens = 43};
    const model_batch_t *mb;
    assert_int_equal(sched_batch_build(sb, &st, 1, &mb), 0);
    assert_int_equal(model_forward(ctx, kv_pool_kv(pool), mb, lg), 0);
    assert_int_equal(kv_table_fork(p, &f), 0);
    assert_int_equal(kv_pool_refcount(pool, kv_table_blocks(f)[0]), 2);
    assert_true(kv_pool_check(pool));
    sched_seq_step_t two[2] = {{.table = p, .tokens = tail[0], .n_tokens = 5, .want_logits = true},
                               {.table = f, .tokens = tail[1], .n_tokens = 5, .want_logits = true}};
    assert_int_equal(sched_batch_build(sb, two, 2, &mb), 0);
    assert_int_equal(model_forward(ctx, kv_pool_kv(pool), mb, lg), 0);
    for (int b = 0; b < 2; b++) {
        double e = rel_err(lg + b * fx.n_vocab, ref + b * fx.n_vocab, fx.n_vocab);
        assert_true(e <= TOL);
    }
    kv_table_free(p);
    kv_table_free(f);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), 64);
    free(lg);
    free(ref);
    sched_batch_free(sb);
    model_ctx_free(ctx);
    kv_pool_free(pool);
}

/* Every row's logits (prompt_logprobs' lead rows): a 40-token prompt in
 * one step with all 40 rows wanted, beside a second sequence wanting its
 * last row only, gives each row the logits that feeding the tokens one
 * step at a time gives. */
static void
test_every_row_logits(void **state)
{
    (void)state;
    enum { P = 40 };
    const model_hparams_t *hp = model_hparams(fx.m);
    kv_pool_cfg_t pc = {.n_layers = hp->n_layer,
                        .n_kv_heads = hp->n_head_kv,
                        .head_dim = hp->head_dim,
                        .block_tokens = 16,
                        .n_blocks = 32,
                        .dtype = KERN_F32};
    kv_pool_t *pool;
    assert_int_equal(kv_pool_new(&pc, fx.be, &pool), 0);
    model_ctx_t *ctx;
    assert_int_equal(model_ctx_new(fx.m, 64, P + 1, &ctx), 0);
    sched_batch_t *sb;
    assert_int_equal(sched_batch_new(&sb), 0);
    float *lg = malloc(sizeof(float) * (P + 1) * fx.n_vocab);
    float *ref = malloc(sizeof(float) * P * fx.n_vocab);
    int32_t toks[P], other[7];
    for (uint32_t i = 0; i < P; i++)
        toks[i] = prompt_tok(0, i);
    for (uint32_t i = 0; i < 7; i++)
        other[i] = prompt_tok(2, i);
    kv_table_t *a, *b, *o;
    assert_int_equal(kv_table_new(pool, &a), 0);
    assert_int_equal(kv_table_new(pool, &b), 0);
    assert_int_equal(kv_table_new(pool, &o), 0);
    const model_batch_t *mb;
    for (uint32_t i = 0; i < P; i++) {
        assert_int_equal(kv_table_reserve(b, 1), 0);
        sched_seq_step_t st = {.table = b, .tokens = toks + i, .n_tokens = 1, .want_logits = true};
        assert_int_equal(sched_batch_build(sb, &st, 1, &mb), 0);
        assert_int_equal(model_forward(ctx, kv_pool_kv(pool), mb, ref + i * fx.n_vocab), 0);
    }
    assert_int_equal(kv_table_reserve(a, P), 0);
    assert_int_equal(kv_table_reserve(o, 7), 0);
    sched_seq_step_t two[2] = {
        {.table = o, .tokens = other, .n_tokens = 7, .want_logits = true},
        {.table = a, .tokens = toks, .n_tokens = P, .want_logits = true, .lead_logits = P - 1}};
    assert_int_equal(sched_batch_build(sb, two, 2, &mb), 0);
    assert_int_equal(mb->n_logits, P + 1);
    assert_int_equal(model_forward(ctx, kv_pool_kv(pool), mb, lg), 0);
    /* On a device one query row and forty take different attention
     * kernels (decode against tensor-core prefill): rounding apart. */
    double tol = strcmp(backend_name(), "cpu") == 0 ? TOL : TOL_F16_KV;
    for (uint32_t i = 0; i < P; i++) {
        double e = rel_err(lg + (1 + i) * fx.n_vocab, ref + i * fx.n_vocab, fx.n_vocab);
        if (e > tol) {
            fprintf(stderr, "row %u: rel err %.3g\n", i, e);
            fail();
        }
    }
    kv_table_free(a);
    kv_table_free(b);
    kv_table_free(o);
    free(lg);
    free(ref);
    sched_batch_free(sb);
    model_ctx_free(ctx);
    kv_pool_free(pool);
}

int
main(void)
{
    /* Made here, once, so that a backend that cannot start skips the test. */
    kern_backend_cfg_t cfg = {.n_threads = 2};
    if (kern_backend_new(backend_name(), &cfg, &fx.be) != 0) {
        printf("test_batch_invariance: skipped: no %s backend here\n", backend_name());
        return 77;
    }
    printf("test_batch_invariance: on the %s backend\n", backend_name());
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_alone_vs_together),
        cmocka_unit_test(test_f16_kv_batching),
        cmocka_unit_test(test_fork_shared_prefix),
        cmocka_unit_test(test_every_row_logits),
    };
    int rc = cmocka_run_group_tests(tests, setup, teardown);
    kern_backend_free(fx.be);
    return rc;
}
