/*
 * tests/sched/test_kv_compress_sched.c — KV compression through the
 * engine, on the "tiny" random model (cpu backend, several concurrent
 * requests, chunked prefill):
 *   - quantized KV: a pool with a codec whose blocks are never sealed (the
 *     sinks cover every token) computes exactly what the plain f16 pool
 *     computes; with sealing every codec stays close to f16, blocks really
 *     are sealed and none leaks;
 *   - sink eviction, SnapKV and H2O: a budget the request never exceeds
 *     changes nothing; a smaller one drops KV, bounds what the table holds
 *     and frees everything at the end; H2O's scores survive a swap to the
 *     host tier and are rebuilt by a recompute;
 *   - a short pool: residual windows are quantized first, then requests
 *     swap to the host tier and come back bit for bit (same tokens and
 *     logits as a pool that never preempts), else they are recomputed.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "cache/kv.h"
#include "sched/sched.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define N_REQ 3
#define PROMPT 150
#define GEN 20

static char model_path[256];

static int
group_setup(void **state)
{
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(model_path, sizeof model_path, "%s/kvs_kvq_XXXXXX", tmp ? tmp : "/tmp");
    int fd = mkstemp(model_path);
    if (fd < 0)
        return -1;
    close(fd);
    char err[256];
    return model_random_write("tiny", KERN_F32, 11, NULL, model_path, err, sizeof err) ? -1 : 0;
}

static int
group_teardown(void **state)
{
    (void)state;
    unlink(model_path);
    return 0;
}

typedef struct opts {
    kern_kvq_t q;
    uint32_t sinks, residual, n_blocks, hot;
    size_t host;
    bool prefix;
    sched_kv_policy_t kv;
} opts_t;

typedef struct run {
    uint32_t n_vocab;
    float *logits; /* [N_REQ][GEN][n_vocab] */
    uint32_t n_rows[N_REQ];
    int32_t tokens[N_REQ][GEN];
    uint32_t n_tokens[N_REQ];
    uint64_t sealed, dropped, preemptions;
    uint32_t n_blocks, n_free_end, max_len;
    uint32_t max_decode_len; /* over rows past the prompt: decode steps */
    sched_load_t load;
} run_t;

static void
on_logits(void *arg, uint64_t id, const float *logits, uint32_t n)
{
    run_t *r = arg;
    uint32_t i = (uint32_t)id;
    assert_true(i < N_REQ && r->n_rows[i] < GEN);
    memcpy(r->logits + ((size_t)i * GEN + r->n_rows[i]++) * r->n_vocab, logits, n * sizeof(float));
}

/* The longest table of the step, read by the step hook. */
static void
on_step(void *arg, const model_batch_t *mb, const uint64_t *ids)
{
    (void)ids;
    run_t *r = arg;
    for (uint32_t i = 0; i < mb->n_tokens; i++)
        if ((uint32_t)mb->kv_len[i] > r->max_len)
            r->max_len = (uint32_t)mb->kv_len[i];
    /* Positions stay the true ones, so rows past the prompt are decode
     * rows (a recompute's rows past the prompt are not: keep to runs
     * without preemption when reading this). */
    for (uint32_t i = 0; i < mb->n_tokens; i++)
        if (mb->pos[i] >= PROMPT && (uint32_t)mb->kv_len[i] > r->max_decode_len)
            r->max_decode_len = (uint32_t)mb->kv_len[i];
}

/* Greedy generation of GEN tokens for N_REQ prompts at once. */
static void
run_opts(const opts_t *o, run_t *r)
{
    kern_backend_t *be = NULL;
    model_t *m = NULL;
    char err[256];
    assert_int_equal(kern_backend_new("cpu", &(kern_backend_cfg_t){.n_threads = 2}, &be), 0);
    assert_int_equal(model_load(model_path, be, &m, err, sizeof err), 0);
    memset(r, 0, sizeof *r);
    r->n_vocab = model_hparams(m)->n_vocab;
    r->logits = calloc((size_t)N_REQ * GEN * r->n_vocab, sizeof(float));
    assert_non_null(r->logits);
    sched_cfg_t cfg = {.max_num_seqs = 4,
                       .max_num_batched_tokens = 64, /* several prefill chunks */
                       .block_tokens = 16,
                       .n_blocks = o->n_blocks ? o->n_blocks : 80,
                       .kv_quant = o->q,
                       .kv_sink_tokens = o->sinks,
                       .kv_hot_blocks = o->q ? (o->hot ? o->hot : 40) : 0,
                       .kv_residual_tokens = o->residual,
                       .host_kv_bytes = o->host,
                       .prefix_caching = o->prefix};
    sched_t *s = NULL;
    assert_int_equal(sched_new(m, &cfg, &s), 0);
    sched_set_logits_hook(s, on_logits, r);
    sched_set_step_hook(s, on_step, r);
    int32_t prompt[N_REQ][PROMPT];
    for (uint32_t i = 0; i < N_REQ; i++)
        for (uint32_t t = 0; t < PROMPT; t++)
            /* The first two prompts share their first 100 tokens. */
            prompt[i][t] = (int32_t)(((i == 1 && t < 100 ? 0 : i) * 7919u + t * 31u) % r->n_vocab);
    for (uint32_t i = 0; i < N_REQ; i++) {
        sched_request_t req = {.id = i,
                               .prompt = prompt[i],
                               .n_prompt = PROMPT,
                               .max_tokens = GEN,
                               .ignore_eos = true,
                               .sampling = {.temperature = 0.0f, .top_p = 1.0f},
                               .kv = o->kv};
        assert_int_equal(sched_submit(s, &req), 0);
    }
    int live;
    uint32_t finished = 0;
    while ((live = sched_step(s)) > 0 || finished < N_REQ) {
        assert_true(live >= 0);
        sched_event_t *ev;
        while ((ev = sched_poll(s)) != NULL) {
            uint32_t i = (uint32_t)ev->req_id;
            if (ev->kind == SCHED_EV_TOKEN) {
                assert_true(r->n_tokens[i] < GEN);
                r->tokens[i][r->n_tokens[i]++] = ev->token;
            } else {
                assert_int_equal(ev->finish, SCHED_FINISH_LENGTH);
                r->dropped += ev->usage.kv_dropped_tokens;
                r->preemptions += ev->usage.preemptions;
                finished++;
            }
            sched_event_free(ev);
        }
        if (live == 0 && finished < N_REQ)
            fail_msg("engine idle with %u of %u requests finished", finished, N_REQ);
    }
    sched_get_load(s, &r->load);
    r->sealed = r->load.blocks_sealed;
    kv_pool_t *pool = sched_pool(s);
    assert_true(kv_pool_check(pool));
    r->n_blocks = kv_pool_cfg(pool)->n_blocks;
    r->n_free_end = kv_pool_n_free(pool);
    sched_free(s);
    model_free(m);
    kern_backend_free(be);
}

/* Sinks covering every token keep every block exact: the codec path must
 * then change nothing at all. */
static void
run(kern_kvq_t q, uint32_t sinks, bool prefix, run_t *r)
{
    run_opts(&(opts_t){.q = q, .sinks = sinks, .prefix = prefix}, r);
}

static void
test_unsealed_equals_f16(void **state)
{
    (void)state;
    run_t a, b;
    run(KERN_KVQ_NONE, 0, false, &a);
    for (kern_kvq_t q = KERN_KVQ_BF16; q < KERN_KVQ_COUNT; q++) {
        run(q, PROMPT + GEN, false, &b);
        assert_int_equal(b.sealed, 0);
        assert_memory_equal(a.tokens, b.tokens, sizeof a.tokens);
        assert_memory_equal(a.logits, b.logits, (size_t)N_REQ * GEN * a.n_vocab * sizeof(float));
        free(b.logits);
    }
    free(a.logits);
}

static double
max_rel_diff(const run_t *a, const run_t *b)
{
    double worst = 0;
    for (uint32_t i = 0; i < N_REQ; i++) {
        /* Compare the rows before the two greedy paths part. */
        uint32_t same = 0;
        while (same < GEN && a->tokens[i][same] == b->tokens[i][same])
            same++;
        for (uint32_t row = 0; row <= same && row < GEN; row++) {
            const float *x = a->logits + ((size_t)i * GEN + row) * a->n_vocab;
            const float *y = b->logits + ((size_t)i * GEN + row) * a->n_vocab;
            double mx = 0, d = 0;
            for (uint32_t v = 0; v < a->n_vocab; v++) {
                mx = fmax(mx, fabs(x[v]));
                d = fmax(d, fabs((double)x[v] - y[v]));
            }
            worst = fmax(worst, d / mx);
        }
    }
    return worst;
}

/* Sealed blocks: logits near f16's (the bounds order the codecs by bits),
 * blocks sealed, nothing leaked once every request is done. */
static void
test_sealed_close_to_f16(void **state)
{
    (void)state;
    static const double bound[KERN_KVQ_COUNT] = {0, 0.02, 0.05, 0.15, 0.3};
    run_t a, b;
    run(KERN_KVQ_NONE, 0, false, &a);
    for (kern_kvq_t q = KERN_KVQ_BF16; q < KERN_KVQ_COUNT; q++) {
        run(q, 4, false, &b);
        double e = max_rel_diff(&a, &b);
        printf("  %s: %llu blocks sealed, logits within %.4f of f16 (bound %.2f)\n",
               kern_kvq_name(q), (unsigned long long)b.sealed, e, bound[q]);
        /* Each request seals all its full blocks but the sinks' one. */
        assert_true(b.sealed >= N_REQ * ((PROMPT + GEN - 1) / 16 - 1));
        assert_true(e <= bound[q]);
        assert_int_equal(b.n_free_end, b.n_blocks);
        free(b.logits);
    }
    free(a.logits);
}

/* With the prefix cache on, quantized blocks are shared between the two
 * requests with a common prefix, and the results equal those without the
 * cache (a shared block holds what the request would have computed). */
static void
test_prefix_cache(void **state)
{
    (void)state;
    run_t a, b;
    run(KERN_KVQ_Q8_0, 4, false, &a);
    run(KERN_KVQ_Q8_0, 4, true, &b);
    assert_memory_equal(a.tokens, b.tokens, sizeof a.tokens);
    free(a.logits);
    free(b.logits);
}

static void
assert_same(const run_t *a, const run_t *b)
{
    assert_memory_equal(a->tokens, b->tokens, sizeof a->tokens);
    assert_memory_equal(a->logits, b->logits, (size_t)N_REQ * GEN * a->n_vocab * sizeof(float));
}

/* Sink eviction: a budget above every sequence's length is dense
 * attention exactly; a small one bounds the KV each step sees, drops
 * tokens and frees every block at the end. */
static void
test_sink_eviction(void **state)
{
    (void)state;
    run_t a, b;
    run(KERN_KVQ_NONE, 0, false, &a);
    sched_kv_policy_t kv = {.kind = SCHED_KV_SINK_EVICTION, .budget_tokens = 512, .sinks = 4};
    run_opts(&(opts_t){.kv = kv}, &b);
    assert_same(&a, &b);
    assert_int_equal(b.dropped, 0);
    free(b.logits);

    kv.budget_tokens = 48;
    run_opts(&(opts_t){.kv = kv}, &b);
    /* After a step's eviction a table holds at most the budget; the next
     * step adds at most a chunk of 64 (prefill) or one token. */
    assert_true(b.max_len <= 48 + 64);
    assert_true(b.dropped >= N_REQ * (PROMPT + GEN - 1 - 48 - 16));
    assert_int_equal(b.n_free_end, b.n_blocks);
    free(b.logits);
    /* Quantized pools evict the same way. */
    run_opts(&(opts_t){.q = KERN_KVQ_Q4, .sinks = 4, .kv = kv}, &b);
    assert_int_equal(b.n_free_end, b.n_blocks);
    free(b.logits);
    free(a.logits);
}

/* An engine over the tiny model for requests one at a time (run_one):
 * cfg's fields, chunks of 64 tokens in blocks of 16, 80 blocks. */
typedef struct one {
    kern_backend_t *be;
    model_t *m;
    sched_t *s;
    int32_t prompt[PROMPT];
} one_t;

static void
one_open(one_t *o, const sched_cfg_t *cfg)
{
    char err[256];
    memset(o, 0, sizeof *o);
    assert_int_equal(kern_backend_new("cpu", &(kern_backend_cfg_t){.n_threads = 2}, &o->be), 0);
    assert_int_equal(model_load(model_path, o->be, &o->m, err, sizeof err), 0);
    sched_cfg_t c = *cfg;
    c.max_num_batched_tokens = 64;
    c.block_tokens = 16;
    c.n_blocks = 80;
    assert_int_equal(sched_new(o->m, &c, &o->s), 0);
    for (uint32_t t = 0; t < PROMPT; t++)
        o->prompt[t] = (int32_t)((t * 31u + 7u) % model_hparams(o->m)->n_vocab);
}

static void
one_close(one_t *o)
{
    assert_true(kv_pool_check(sched_pool(o->s)));
    sched_free(o->s);
    model_free(o->m);
    kern_backend_free(o->be);
}

/* One request of prompt p under kv, run to its end on s; its usage, and
 * the longest table a step of it read (max_len, via the step hook). */
static sched_usage_t
run_one(sched_t *s, run_t *r, uint64_t id, const int32_t *p, sched_kv_policy_t kv,
        uint32_t max_tokens)
{
    sched_request_t req = {.id = id,
                           .prompt = p,
                           .n_prompt = PROMPT,
                           .max_tokens = max_tokens,
                           .ignore_eos = true,
                           .sampling = {.temperature = 0.0f, .top_p = 1.0f},
                           .kv = kv};
    assert_int_equal(sched_submit(s, &req), 0);
    r->max_len = 0;
    sched_usage_t u = {0};
    for (uint32_t step = 0, done = 0; !done; step++) {
        /* Every step computes at least a token, or the engine is stuck. */
        assert_true(step <= PROMPT + max_tokens);
        assert_true(sched_step(s) >= 0);
        sched_event_t *ev;
        while ((ev = sched_poll(s)) != NULL) {
            if (ev->kind == SCHED_EV_FINISH) {
                assert_int_equal(ev->finish, SCHED_FINISH_LENGTH);
                u = ev->usage;
                done = true;
            }
            sched_event_free(ev);
        }
    }
    return u;
}

/* Sink eviction after a dense request cached the same prompt: the hit
 * stops at its budget (KV past it a miss would not hold whole), so no
 * step of it reads more than budget + a chunk. */
static void
test_sink_eviction_prefix_hit(void **state)
{
    (void)state;
    one_t o;
    one_open(&o, &(sched_cfg_t){.max_num_seqs = 4, .prefix_caching = true});
    sched_t *s = o.s;
    run_t r = {0};
    sched_set_step_hook(s, on_step, &r);
    const int32_t *p = o.prompt;
    sched_usage_t u = run_one(s, &r, 1, p, (sched_kv_policy_t){0}, GEN);
    assert_int_equal(u.cached_prompt_tokens, 0);
    u = run_one(s, &r, 2, p, (sched_kv_policy_t){0}, GEN);
    assert_int_equal(u.cached_prompt_tokens, PROMPT / 16 * 16);
    sched_kv_policy_t kv = {.kind = SCHED_KV_SINK_EVICTION, .budget_tokens = 48, .sinks = 4};
    u = run_one(s, &r, 3, p, kv, GEN);
    assert_true(u.cached_prompt_tokens > 0 && u.cached_prompt_tokens <= 48);
    assert_true(r.max_len <= 48 + 64);
    assert_true(u.kv_dropped_tokens > 0);
    one_close(&o);
}

/* A quantized pool with a residual window and the prefix cache: blocks
 * are offered to the cache once sealed, so cached ones never pin the few
 * full-precision blocks; a long generation on the default share of them
 * runs through, and a second request still finds the sealed prefix. */
static void
test_residual_prefix_cache(void **state)
{
    (void)state;
    one_t o;
    one_open(&o, &(sched_cfg_t){.max_num_seqs = 1,
                                .kv_quant = KERN_KVQ_Q8_0,
                                .kv_residual_tokens = 32,
                                .prefix_caching = true});
    sched_t *s = o.s;
    run_t r = {0};
    const int32_t *p = o.prompt;
    sched_usage_t u = run_one(s, &r, 1, p, (sched_kv_policy_t){0}, 400);
    assert_int_equal(u.preemptions, 0);
    u = run_one(s, &r, 2, p, (sched_kv_policy_t){0}, GEN);
    assert_true(u.cached_prompt_tokens >= PROMPT - 32 - 16);
    sched_load_t l;
    sched_get_load(s, &l);
    assert_true(l.blocks_sealed >= (PROMPT + 400 - 32) / 16 - 1);
    one_close(&o);
}

/* With a KV codec, SnapKV and H2O write the entries they keep quantized
 * (but the sinks and the residual window), so a budget past the pool's
 * few full-precision blocks (8 here, 128 tokens) compacts and runs; every
 * block comes back at the end (one_close's check). */
static void
test_compact_budget_hot(void **state)
{
    (void)state;
    one_t o;
    one_open(&o, &(sched_cfg_t){.max_num_seqs = 1,
                                .kv_quant = KERN_KVQ_Q8_0,
                                .kv_hot_blocks = 8,
                                .kv_sink_tokens = 4,
                                .kv_residual_tokens = 16});
    run_t r = {0};
    for (sched_kv_kind_t kind = SCHED_KV_SNAPKV; kind <= SCHED_KV_H2O; kind++) {
        sched_kv_policy_t kv = {.kind = kind, .budget_tokens = 140};
        sched_load_t l0, l1;
        sched_get_load(o.s, &l0);
        sched_usage_t u = run_one(o.s, &r, 1 + kind, o.prompt, kv, GEN);
        sched_get_load(o.s, &l1);
        if (kind == SCHED_KV_SNAPKV)
            assert_int_equal(u.kv_dropped_tokens, PROMPT - 140);
        else
            assert_true(u.kv_dropped_tokens >= PROMPT - 140);
        assert_int_equal(l1.snapkv_compressions - l0.snapkv_compressions, kind == SCHED_KV_SNAPKV);
        assert_true(kind == SCHED_KV_SNAPKV || l1.h2o_compactions > l0.h2o_compactions);
        assert_true(l1.blocks_sealed - l0.blocks_sealed >= (140 - 4 - 16) / 16 - 1);
        assert_int_equal(u.preemptions, 0);
    }
    one_close(&o);
}

/* SnapKV: a budget no prompt exceeds changes nothing; a smaller one
 * compresses each prompt to the budget (decode tokens come on top). */
static void
test_snapkv(void **state)
{
    (void)state;
    run_t a, b;
    run(KERN_KVQ_NONE, 0, false, &a);
    sched_kv_policy_t kv = {.kind = SCHED_KV_SNAPKV, .budget_tokens = PROMPT};
    run_opts(&(opts_t){.kv = kv}, &b);
    assert_same(&a, &b);
    assert_int_equal(b.load.snapkv_compressions, 0);
    free(b.logits);

    kv.budget_tokens = 64;
    run_opts(&(opts_t){.kv = kv}, &b);
    assert_int_equal(b.load.snapkv_compressions, N_REQ);
    assert_int_equal(b.dropped, N_REQ * (PROMPT - 64));
    assert_int_equal(b.n_free_end, b.n_blocks);
    /* The first token comes from the full prefill. */
    for (uint32_t i = 0; i < N_REQ; i++)
        assert_int_equal(a.tokens[i][0], b.tokens[i][0]);
    free(b.logits);
    run_opts(&(opts_t){.q = KERN_KVQ_Q8_0, .sinks = 4, .kv = kv}, &b);
    assert_int_equal(b.load.snapkv_compressions, N_REQ);
    assert_int_equal(b.n_free_end, b.n_blocks);
    free(b.logits);
    free(a.logits);
}

/* H2O: within budget nothing changes; a compaction at the very last step
 * runs the whole machinery (captures, scores, compaction) and still leaves
 * every token and logit as dense attention's; small budgets bound each
 * decode step's KV to budget + one block + its own token. */
static void
test_h2o(void **state)
{
    (void)state;
    run_t a, b;
    run(KERN_KVQ_NONE, 0, false, &a);
    sched_kv_policy_t kv = {.kind = SCHED_KV_H2O, .budget_tokens = PROMPT + GEN};
    run_opts(&(opts_t){.kv = kv}, &b);
    assert_same(&a, &b);
    assert_int_equal(b.dropped, 0);
    assert_int_equal(b.load.h2o_compactions, 0);
    free(b.logits);

    /* The last step (PROMPT + GEN - 1 entries) passes budget + 16: one
     * compaction after the last logits. */
    const uint32_t last = PROMPT + GEN - 1;
    kv.budget_tokens = last - 16 - 1;
    run_opts(&(opts_t){.kv = kv}, &b);
    assert_same(&a, &b);
    assert_int_equal(b.load.h2o_compactions, N_REQ);
    assert_int_equal(b.dropped, N_REQ * (last - kv.budget_tokens));
    free(b.logits);

    kv.budget_tokens = 48;
    run_opts(&(opts_t){.kv = kv}, &b);
    printf("  h2o budget 48: %llu dropped, %llu compactions, decode KV <= %u\n",
           (unsigned long long)b.dropped, (unsigned long long)b.load.h2o_compactions,
           b.max_decode_len);
    assert_true(b.max_decode_len >= 48 + 1);
    assert_true(b.max_decode_len <= 48 + 16 + 1);
    assert_true(b.dropped >= N_REQ * (last - 48 - 16));
    assert_true(b.load.h2o_compactions >= N_REQ * 2);
    assert_int_equal(b.n_free_end, b.n_blocks);
    /* The first token comes from the dense prefill. */
    for (uint32_t i = 0; i < N_REQ; i++)
        assert_int_equal(a.tokens[i][0], b.tokens[i][0]);
    free(b.logits);

    /* An explicit recent share, a quantized pool. */
    kv.window = 8;
    run_opts(&(opts_t){.q = KERN_KVQ_Q8_0, .sinks = 4, .kv = kv}, &b);
    assert_true(b.max_decode_len <= 48 + 16 + 1);
    assert_true(b.load.h2o_compactions >= N_REQ * 2);
    assert_int_equal(b.n_free_end, b.n_blocks);
    free(b.logits);

    /* A pool of one dense prefill: swaps keep the scores, and the same
     * run without a host tier rebuilds them on each recompute. */
    kv.window = 0;
    run_t c;
    run_opts(&(opts_t){.n_blocks = 16, .host = 1u << 24, .kv = kv}, &b);
    assert_true(b.preemptions > 0);
    assert_true(b.load.swap_outs > 0);
    assert_int_equal(b.n_free_end, b.n_blocks);
    run_opts(&(opts_t){.n_blocks = 16, .kv = kv}, &c);
    assert_true(c.preemptions > 0);
    assert_int_equal(c.load.swap_outs, 0);
    assert_int_equal(c.n_free_end, c.n_blocks);
    assert_true(c.dropped > 0);
    free(b.logits);
    free(c.logits);
    free(a.logits);
}

/* A pool that fits one sequence at a time.  With the host tier the
 * preempted ones swap out and back bit for bit: the same tokens and
 * logits as an ample pool.  With a residual window, a short pool
 * quantizes it before preempting anyone. */
static void
test_short_pool(void **state)
{
    (void)state;
    run_t a, b;
    run(KERN_KVQ_NONE, 0, false, &a);
    run_opts(&(opts_t){.n_blocks = 16, .host = 1u << 24}, &b);
    assert_true(b.preemptions > 0);
    assert_true(b.load.swap_outs > 0);
    assert_int_equal(b.load.swap_ins, b.load.swap_outs);
    /* Swapped KV is bit for bit what left (test_kv_host); the steps are
     * batched differently, which moves matrix products between kernels,
     * hence a tolerance on the logits. */
    assert_memory_equal(a.tokens, b.tokens, sizeof a.tokens);
    assert_true(max_rel_diff(&a, &b) < 1e-4);
    assert_int_equal(b.n_free_end, b.n_blocks);
    free(b.logits);

    /* No host tier: recompute, which chunks differently but gives the
     * same greedy tokens on this model. */
    run_opts(&(opts_t){.n_blocks = 16}, &b);
    assert_true(b.preemptions > 0);
    assert_int_equal(b.load.swap_outs, 0);
    assert_int_equal(b.n_free_end, b.n_blocks);
    free(b.logits);

    /* q8_0 with a 64-token residual window and room for few exact
     * blocks: the window is quantized under pressure. */
    run_opts(&(opts_t){.q = KERN_KVQ_Q8_0, .residual = 64, .n_blocks = 60, .hot = 10}, &b);
    assert_true(b.load.pressure_seals > 0);
    assert_int_equal(b.n_free_end, b.n_blocks);
    free(b.logits);
    free(a.logits);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_unsealed_equals_f16),
        cmocka_unit_test(test_sealed_close_to_f16),
        cmocka_unit_test(test_prefix_cache),
        cmocka_unit_test(test_sink_eviction),
        cmocka_unit_test(test_sink_eviction_prefix_hit),
        cmocka_unit_test(test_residual_prefix_cache),
        cmocka_unit_test(test_compact_budget_hot),
        cmocka_unit_test(test_snapkv),
        cmocka_unit_test(test_h2o),
        cmocka_unit_test(test_short_pool),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
