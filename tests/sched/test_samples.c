/*
 * tests/sched/test_samples.c — n samples of one prompt (sched_request_t.n)
 * on the real CPU backend: each sample's tokens equal those of a request
 * of its own with sched_sample_seed's seed, whether it forked the prompt's
 * KV or prefilled it again for want of a sequence, under every KV policy;
 * the prompt is computed once and its blocks shared; every sample ends
 * exactly once, cancelled one by one or together, and no block is left.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "sched/sched.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char model_path[256];

static int
group_setup(void **state)
{
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(model_path, sizeof model_path, "%s/kvs_samples_XXXXXX", tmp ? tmp : "/tmp");
    int fd = mkstemp(model_path);
    if (fd < 0)
        return -1;
    close(fd);
    char err[256];
    return model_random_write("tiny", KERN_F32, 11, NULL, model_path, err, sizeof err);
}

static int
group_teardown(void **state)
{
    (void)state;
    unlink(model_path);
    return 0;
}

enum { N = 4, PROMPT = 40, GEN = 10, MAX_IDS = 8 };

typedef struct out {
    int32_t tok[MAX_IDS][SCHED_MAX_N][GEN];
    uint32_t n_tok[MAX_IDS][SCHED_MAX_N];
    uint32_t n_fin[MAX_IDS][SCHED_MAX_N];
    sched_finish_t fin[MAX_IDS][SCHED_MAX_N];
    sched_usage_t usage[MAX_IDS][SCHED_MAX_N];
    uint64_t computed; /* tokens the model ran, over every step */
} out_t;

typedef struct engine {
    kern_backend_t *be;
    model_t *m;
    sched_t *s;
    out_t *o;
} engine_t;

static void
count_tokens(void *arg, const model_batch_t *b, const uint64_t *ids)
{
    (void)ids;
    ((out_t *)arg)->computed += b->n_tokens;
}

static void
engine_open(engine_t *e, const sched_cfg_t *cfg, out_t *o)
{
    memset(e, 0, sizeof *e);
    memset(o, 0, sizeof *o);
    kern_backend_cfg_t bc = {.n_threads = 2};
    assert_int_equal(kern_backend_new("cpu", &bc, &e->be), 0);
    char err[256];
    assert_int_equal(model_load(model_path, e->be, &e->m, err, sizeof err), 0);
    assert_int_equal(sched_new(e->m, cfg, &e->s), 0);
    e->o = o;
    sched_set_step_hook(e->s, count_tokens, o);
}

static void
engine_close(engine_t *e)
{
    kv_pool_t *pool = sched_pool(e->s);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), kv_pool_cfg(pool)->n_blocks);
    sched_free(e->s);
    model_free(e->m);
    kern_backend_free(e->be);
}

static void
collect(engine_t *e)
{
    sched_event_t *ev;
    while ((ev = sched_poll(e->s)) != NULL) {
        assert_true(ev->req_id < MAX_IDS);
        assert_true(ev->index < SCHED_MAX_N);
        uint64_t id = ev->req_id;
        uint32_t i = ev->index;
        assert_int_equal(e->o->n_fin[id][i], 0); /* nothing after a sample's end */
        if (ev->kind == SCHED_EV_TOKEN) {
            assert_true(e->o->n_tok[id][i] < GEN);
            e->o->tok[id][i][e->o->n_tok[id][i]++] = ev->token;
        } else {
            e->o->n_fin[id][i]++;
            e->o->fin[id][i] = ev->finish;
            e->o->usage[id][i] = ev->usage;
        }
        sched_event_free(ev);
    }
}

static void
run_to_idle(engine_t *e)
{
    for (int i = 0; i < 2000; i++) {
        int live = sched_step(e->s);
        assert_true(live >= 0);
        assert_true(kv_pool_check(sched_pool(e->s)));
        collect(e);
        if (live == 0)
            return;
    }
    fail_msg("engine did not go idle");
}

static int32_t prompt[PROMPT];

static sched_request_t
request(uint64_t id, uint32_t n, uint64_t seed, const sched_kv_policy_t *kv)
{
    for (int i = 0; i < PROMPT; i++)
        prompt[i] = (i * 53 + 17) % 256;
    return (sched_request_t){.id = id,
                             .prompt = prompt,
                             .n_prompt = PROMPT,
                             .max_tokens = GEN,
                             .ignore_eos = true,
                             .n = n,
                             .kv = kv ? *kv : (sched_kv_policy_t){0},
                             .sampling = {.temperature = 0.9f, .top_p = 1.0f, .seed = seed}};
}

static sched_cfg_t
config(uint32_t max_seqs)
{
    return (sched_cfg_t){.max_num_seqs = max_seqs,
                         .max_num_batched_tokens = 64,
                         .block_tokens = 16,
                         .n_blocks = 64,
                         .kv_dtype = KERN_F32};
}

/* What each sample generates when it is a request of its own. */
static void
run_alone(const sched_kv_policy_t *kv, int32_t want[N][GEN])
{
    engine_t e;
    static out_t o;
    sched_cfg_t cfg = config(N);
    engine_open(&e, &cfg, &o);
    for (uint32_t i = 0; i < N; i++) {
        sched_request_t r = request(i, 1, sched_sample_seed(77, i), kv);
        assert_int_equal(sched_submit(e.s, &r), 0);
    }
    run_to_idle(&e);
    for (uint32_t i = 0; i < N; i++) {
        assert_int_equal(o.n_tok[i][0], GEN);
        memcpy(want[i], o.tok[i][0], sizeof want[i]);
    }
    engine_close(&e);
}

/* Sample i's tokens are request i's alone; every sample ends once, at
 * its length. */
static void
check_samples(const out_t *o, uint64_t id, int32_t want[N][GEN])
{
    for (uint32_t i = 0; i < N; i++) {
        assert_int_equal(o->n_fin[id][i], 1);
        assert_int_equal(o->fin[id][i], SCHED_FINISH_LENGTH);
        assert_int_equal(o->n_tok[id][i], GEN);
        assert_memory_equal(o->tok[id][i], want[i], sizeof want[i]);
        assert_int_equal(o->usage[id][i].completion_tokens, GEN);
        assert_int_equal(o->usage[id][i].prompt_tokens, PROMPT);
    }
}

/* Forked: the prompt's KV is computed once, its full blocks shared and
 * the partial last one copied per sample, and each sample draws exactly
 * what it draws alone (sampled, so the samples differ). */
static void
test_fork_equals_alone(void **state)
{
    (void)state;
    static int32_t want[N][GEN];
    run_alone(NULL, want);
    bool differ = false;
    for (uint32_t i = 1; i < N; i++)
        differ |= memcmp(want[i], want[0], sizeof want[0]) != 0;
    assert_true(differ);

    engine_t e;
    static out_t o;
    sched_cfg_t cfg = config(N);
    engine_open(&e, &cfg, &o);
    sched_request_t r = request(3, N, 77, NULL);
    assert_int_equal(sched_submit(e.s, &r), 0);
    kv_pool_t *pool = sched_pool(e.s);
    uint32_t total = kv_pool_cfg(pool)->n_blocks;
    int live;
    do {
        live = sched_step(e.s);
        collect(&e);
    } while (live > 0 && o.n_tok[3][0] == 0);
    /* 40 tokens: two full blocks shared by all, a partial one each. */
    for (uint32_t i = 0; i < N; i++)
        assert_int_equal(o.n_tok[3][i], 1);
    assert_int_equal(total - kv_pool_n_free(pool), 2 + N);
    assert_int_equal(o.computed, PROMPT);
    run_to_idle(&e);
    check_samples(&o, 3, want);
    /* The prompt once, then every sample's decode steps. */
    assert_int_equal(o.computed, PROMPT + N * (GEN - 1));
    for (uint32_t i = 0; i < N; i++)
        assert_int_equal(o.usage[3][i].computed_prompt_tokens, PROMPT);
    engine_close(&e);

    sched_request_t bad = request(4, SCHED_MAX_N + 1, 1, NULL);
    engine_open(&e, &cfg, &o);
    assert_int_equal(sched_submit(e.s, &bad), KVS_EINVAL);
    engine_close(&e);
}

/* Fewer sequences than samples: those that cannot fork wait and prefill
 * the prompt themselves (twice over without the prefix cache, from its
 * blocks with it) and still draw what they draw alone. */
static void
test_no_room_to_fork(void **state)
{
    (void)state;
    static int32_t want[N][GEN];
    run_alone(NULL, want);
    for (int cache = 0; cache < 2; cache++) {
        engine_t e;
        static out_t o;
        sched_cfg_t cfg = config(2);
        cfg.prefix_caching = cache;
        engine_open(&e, &cfg, &o);
        sched_request_t r = request(1, N, 77, NULL);
        assert_int_equal(sched_submit(e.s, &r), 0);
        run_to_idle(&e);
        check_samples(&o, 1, want);
        /* Samples 0 and 1 share one prefill; 2 and 3 run their own (the
         * cache keeps the two full blocks: 8 tokens each left). */
        uint64_t prefill = cache ? PROMPT + 2 * (PROMPT - 32) : 3 * PROMPT;
        assert_int_equal(o.computed, prefill + N * (GEN - 1));
        engine_close(&e);
    }
}

/* Every KV policy: forked samples carry the policy's state (evicted
 * blocks, the compressed prompt, H2O's scores) and match requests alone. */
static void
test_fork_under_kv_policies(void **state)
{
    (void)state;
    const sched_kv_policy_t kvs[] = {
        {.kind = SCHED_KV_SINK_EVICTION, .budget_tokens = 36, .sinks = 4},
        {.kind = SCHED_KV_SNAPKV, .budget_tokens = 24, .window = 8},
        {.kind = SCHED_KV_H2O, .budget_tokens = 24, .window = 8},
    };
    for (size_t k = 0; k < sizeof kvs / sizeof kvs[0]; k++) {
        static int32_t want[N][GEN];
        run_alone(&kvs[k], want);
        engine_t e;
        static out_t o;
        sched_cfg_t cfg = config(N);
        engine_open(&e, &cfg, &o);
        sched_request_t r = request(2, N, 77, &kvs[k]);
        assert_int_equal(sched_submit(e.s, &r), 0);
        run_to_idle(&e);
        check_samples(&o, 2, want);
        for (uint32_t i = 0; i < N; i++)
            assert_true(o.usage[2][i].kv_dropped_tokens > 0);
        engine_close(&e);
    }
}

/* Cancellation: one sample before the fork (it ends with no token, the
 * rest run), one while decoding (alone), then the whole request; each
 * sample ends once.  A request that fails before its fork ends every
 * sample. */
static void
test_cancel_samples(void **state)
{
    (void)state;
    engine_t e;
    static out_t o;
    sched_cfg_t cfg = config(N);
    engine_open(&e, &cfg, &o);
    sched_request_t r = request(5, N, 9, NULL);
    assert_int_equal(sched_submit(e.s, &r), 0);
    assert_int_equal(sched_cancel_sample(e.s, 5, 2), 0);
    assert_int_equal(sched_cancel_sample(e.s, 5, 0), 0);
    for (int i = 0; i < 3; i++) {
        assert_true(sched_step(e.s) >= 0);
        collect(&e);
    }
    assert_int_equal(o.n_fin[5][2], 1);
    assert_int_equal(o.fin[5][2], SCHED_FINISH_CANCELLED);
    assert_int_equal(o.n_tok[5][2], 0);
    assert_int_equal(o.n_fin[5][0], 1);
    assert_int_equal(o.fin[5][0], SCHED_FINISH_CANCELLED);
    assert_int_equal(o.n_tok[5][0], 0);
    assert_int_equal(o.n_fin[5][1] + o.n_fin[5][3], 0);
    assert_true(o.n_tok[5][1] >= 2 && o.n_tok[5][3] >= 2);
    assert_int_equal(sched_cancel_sample(e.s, 5, 3), 0);
    assert_true(sched_step(e.s) >= 0);
    collect(&e);
    assert_int_equal(o.fin[5][3], SCHED_FINISH_CANCELLED);
    assert_int_equal(o.n_fin[5][1], 0);
    run_to_idle(&e);
    assert_int_equal(o.fin[5][1], SCHED_FINISH_LENGTH);
    assert_int_equal(o.n_tok[5][1], GEN);

    r = request(6, N, 9, NULL);
    assert_int_equal(sched_submit(e.s, &r), 0);
    for (int i = 0; i < 3; i++) {
        assert_true(sched_step(e.s) >= 0);
        collect(&e);
    }
    assert_int_equal(sched_cancel(e.s, 6), 0);
    r = request(7, N, 9, NULL);
    assert_int_equal(sched_submit(e.s, &r), 0);
    assert_int_equal(sched_cancel(e.s, 7), 0);
    run_to_idle(&e);
    for (uint32_t i = 0; i < N; i++) {
        assert_int_equal(o.n_fin[6][i], 1);
        assert_int_equal(o.fin[6][i], SCHED_FINISH_CANCELLED);
        assert_int_equal(o.n_fin[7][i], 1);
        assert_int_equal(o.fin[7][i], SCHED_FINISH_CANCELLED);
        assert_int_equal(o.n_tok[7][i], 0);
    }
    engine_close(&e);
}

/* Quantized KV: the prompt's full blocks are sealed before they are
 * shared (a shared block is never sealed after), so the samples hold no
 * more full-precision blocks than their tails; all end, nothing leaks. */
static void
test_fork_quantized(void **state)
{
    (void)state;
    engine_t e;
    static out_t o;
    sched_cfg_t cfg = config(N);
    cfg.kv_dtype = KERN_F16;
    cfg.kv_quant = KERN_KVQ_Q8_0;
    cfg.kv_residual_tokens = 32;
    engine_open(&e, &cfg, &o);
    sched_request_t r = request(1, N, 5, NULL);
    assert_int_equal(sched_submit(e.s, &r), 0);
    int live;
    do {
        live = sched_step(e.s);
        collect(&e);
    } while (live > 0 && o.n_tok[1][0] == 0);
    kv_pool_t *pool = sched_pool(e.s);
    uint32_t hot = kv_pool_cfg(pool)->n_hot;
    /* Two sealed blocks shared; one full-precision tail each. */
    assert_int_equal(hot - kv_pool_n_free_kind(pool, false), N);
    assert_int_equal(kv_pool_cfg(pool)->n_blocks - hot - kv_pool_n_free_kind(pool, true), 2);
    run_to_idle(&e);
    for (uint32_t i = 0; i < N; i++) {
        assert_int_equal(o.n_fin[1][i], 1);
        assert_int_equal(o.n_tok[1][i], GEN);
    }
    engine_close(&e);
}

/* A pool too small for every sample's tail: samples are preempted, to
 * the host tier (swapped back bit for bit) or recomputed, and still draw
 * what they draw alone; nothing leaks. */
static void
test_samples_preempted(void **state)
{
    (void)state;
    static int32_t want[N][GEN];
    run_alone(NULL, want);
    for (int host = 0; host < 2; host++) {
        engine_t e;
        static out_t o;
        sched_cfg_t cfg = config(N);
        cfg.n_blocks = 6; /* the prompt's 3 blocks, then 1 more each: 4 do not fit */
        cfg.host_kv_bytes = host ? (size_t)64 << 20 : 0;
        engine_open(&e, &cfg, &o);
        sched_request_t r = request(1, N, 77, NULL);
        assert_int_equal(sched_submit(e.s, &r), 0);
        run_to_idle(&e);
        check_samples(&o, 1, want);
        uint32_t preempted = 0;
        for (uint32_t i = 0; i < N; i++)
            preempted += o.usage[1][i].preemptions;
        assert_true(preempted > 0);
        sched_load_t l;
        sched_get_load(e.s, &l);
        assert_true(host ? l.swap_outs > 0 : l.swap_outs == 0);
        engine_close(&e);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fork_equals_alone),      cmocka_unit_test(test_no_room_to_fork),
        cmocka_unit_test(test_fork_under_kv_policies), cmocka_unit_test(test_cancel_samples),
        cmocka_unit_test(test_fork_quantized),         cmocka_unit_test(test_samples_preempted),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
