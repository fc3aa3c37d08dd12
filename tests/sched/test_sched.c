/*
 * tests/sched/test_sched.c — the engine's invariants after every step, on a
 * fake backend built from the kernel vtable (it records nothing numeric:
 * every op is a cheap no-op and logits are zero), and on the real CPU
 * backend: 32 requests under a pool that forces preemption produce exactly
 * the greedy tokens each produces alone.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "kernels/kern_int.h"
#include "sched/sched.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- fake backend: host memory, ops that only count ------------------------ */

typedef struct fake_be {
    kern_backend_t base;
    uint64_t n_attn, n_append_tokens;
    bool fail;          /* attention fails as a lost device does, for good */
    uint32_t fail_soon; /* attention fails this many more times, and recovers */
} fake_be_t;

static bool
fake_supports(const kern_backend_t *be, kern_op_t op, kern_dtype_t t)
{
    (void)be;
    (void)op;
    return t == KERN_F32 || t == KERN_F16;
}
static void
fake_destroy(kern_backend_t *be)
{
    free(be);
}
static int
fake_zero_rows(kern_backend_t *be, const kern_tensor_t *w, const int32_t *ids, uint32_t n,
               float *out)
{
    (void)be;
    (void)ids;
    memset(out, 0, (size_t)n * w->n_cols * sizeof(float));
    return 0;
}
static int
fake_matmul(kern_backend_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
            const float *bias, float *y)
{
    (void)be;
    (void)x;
    (void)bias;
    memset(y, 0, (size_t)n * w->n_rows * sizeof(float));
    return 0;
}
static int
fake_rmsnorm(kern_backend_t *be, const float *x, const float *w, uint32_t n, uint32_t d, float eps,
             float *y)
{
    (void)be;
    (void)x;
    (void)w;
    (void)eps;
    memset(y, 0, (size_t)n * d * sizeof(float));
    return 0;
}
static int
fake_rope(kern_backend_t *be, const kern_rope_args_t *a)
{
    (void)be;
    (void)a;
    return 0;
}
static int
fake_swiglu(kern_backend_t *be, const float *g, const float *u, size_t n, float *o)
{
    (void)be;
    (void)g;
    (void)u;
    memset(o, 0, n * sizeof(float));
    return 0;
}
static int
fake_add(kern_backend_t *be, float *x, const float *y, size_t n)
{
    (void)be;
    (void)x;
    (void)y;
    (void)n;
    return 0;
}
static int
fake_append(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer, const float *k, const float *v,
            const int32_t *slots, uint32_t n)
{
    (void)kv;
    (void)k;
    (void)v;
    (void)slots;
    if (layer == 0)
        ((fake_be_t *)be)->n_append_tokens += n;
    return 0;
}
static int
fake_copy(kern_backend_t *be, const kern_kv_t *kv, const int32_t *s, const int32_t *d, uint32_t n)
{
    (void)be;
    (void)kv;
    (void)s;
    (void)d;
    (void)n;
    return 0;
}
static int
fake_attn(kern_backend_t *be, const kern_attn_args_t *a)
{
    fake_be_t *f = (fake_be_t *)be;
    if (f->fail) {
        be->failed = true;
        return KVS_EDEVICE;
    }
    if (f->fail_soon) {
        f->fail_soon--;
        return KVS_ENOMEM;
    }
    f->n_attn++;
    memset(a->out, 0, (size_t)a->n_q * a->n_heads * a->kv->head_dim * sizeof(float));
    return 0;
}

/* Block-sparse and Quest: every bound 0, so the choice falls to the
 * lowest block ids (ties go by index). */
static int
fake_bounds(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer, const int32_t *blocks,
            uint32_t n, uint16_t *out, bool by_block)
{
    (void)be;
    (void)kv;
    (void)layer;
    (void)blocks;
    (void)n;
    (void)out;
    (void)by_block;
    return 0;
}
static int
fake_scores(kern_backend_t *be, const kern_block_score_args_t *a)
{
    (void)be;
    const uint32_t qg = a->q_group ? a->q_group : 1;
    memset(a->score, 0,
           (size_t)((a->n_q + qg - 1) / qg) * (a->per_kv_head ? a->n_kv_heads : 1) * a->n_blocks *
               sizeof(float));
    return 0;
}

static const kern_ops_t fake_ops = {
    .name = "fake",
    .is_host = true,
    .destroy = fake_destroy,
    .supports = fake_supports,
    .alloc = kern__host_alloc,
    .free = kern__host_free,
    .upload = kern__host_copy,
    .download = kern__host_copy,
    .memset = kern__host_memset,
    .sync = kern__host_sync,
    .get_rows = fake_zero_rows,
    .matmul = fake_matmul,
    .rmsnorm = fake_rmsnorm,
    .rope = fake_rope,
    .swiglu = fake_swiglu,
    .add = fake_add,
    .kv_append = fake_append,
    .kv_copy = fake_copy,
    .attention = fake_attn,
    .block_bounds = fake_bounds,
    .block_scores = fake_scores,
};

static char model_path[256];

static int
group_setup(void **state)
{
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(model_path, sizeof model_path, "%s/kvs_sched_XXXXXX", tmp ? tmp : "/tmp");
    int fd = mkstemp(model_path);
    if (fd < 0)
        return -1;
    close(fd);
    char err[256];
    return model_random_write("tiny", KERN_F32, 5, NULL, model_path, err, sizeof err);
}

static int
group_teardown(void **state)
{
    (void)state;
    unlink(model_path);
    return 0;
}

/* ---- invariant checker, fed by the step hook -------------------------------- */

#define MAX_REQ 64

typedef struct checker {
    uint32_t max_tokens, max_seqs;
    int32_t next_pos[MAX_REQ]; /* next position each request must compute */
    uint32_t recomputes[MAX_REQ];
    int32_t first_step[MAX_REQ];
    int step;
    bool failed;
} checker_t;

static void
check_step(void *arg, const model_batch_t *b, const uint64_t *ids)
{
    checker_t *c = arg;
    c->step++;
    if (b->n_tokens > c->max_tokens || b->pt.n_seqs > c->max_seqs) {
        fprintf(stderr, "step %d: %u tokens / %u seqs over budget\n", c->step, b->n_tokens,
                b->pt.n_seqs);
        c->failed = true;
    }
    for (uint32_t s = 0; s < b->pt.n_seqs; s++) {
        uint64_t id = ids[s];
        if (id >= MAX_REQ)
            continue;
        if (c->first_step[id] < 0)
            c->first_step[id] = c->step;
        for (int32_t i = b->seq_indptr[s]; i < b->seq_indptr[s + 1]; i++) {
            int32_t p = b->pos[i];
            if (c->next_pos[id] < 0)
                c->next_pos[id] = p; /* first chunk: may start after a prefix-cache hit */
            if (p == 0 && c->next_pos[id] > 0) {
                c->recomputes[id]++; /* preempted: starts over */
                c->next_pos[id] = 0;
            }
            if (p != c->next_pos[id]) {
                fprintf(stderr, "req %llu: computed position %d, expected %d\n",
                        (unsigned long long)id, p, c->next_pos[id]);
                c->failed = true;
            }
            c->next_pos[id] = p + 1;
        }
    }
}

typedef struct outcome {
    sched_finish_t finish[MAX_REQ];
    int error[MAX_REQ];
    sched_usage_t usage[MAX_REQ];
    uint32_t n_tokens[MAX_REQ];
    int32_t tokens[MAX_REQ][64];
    uint32_t n_finished;
} outcome_t;

static void
collect(sched_t *s, outcome_t *o)
{
    sched_event_t *ev;
    while ((ev = sched_poll(s)) != NULL) {
        uint64_t id = ev->req_id;
        assert_true(id < MAX_REQ);
        if (ev->kind == SCHED_EV_TOKEN) {
            if (o->n_tokens[id] < 64)
                o->tokens[id][o->n_tokens[id]] = ev->token;
            o->n_tokens[id]++;
        } else {
            o->finish[id] = ev->finish;
            o->error[id] = ev->error;
            o->usage[id] = ev->usage;
            o->n_finished++;
        }
        sched_event_free(ev);
    }
}

typedef struct engine {
    kern_backend_t *be;
    model_t *m, *d; /* d: the draft model, for speculative decoding by one */
    sched_t *s;
    checker_t chk;
} engine_t;

static void
engine_open(engine_t *e, bool fake, const sched_cfg_t *cfg)
{
    memset(e, 0, sizeof *e);
    if (fake) {
        fake_be_t *f = calloc(1, sizeof *f);
        f->base.ops = &fake_ops;
        e->be = &f->base;
    } else {
        kern_backend_cfg_t bc = {.n_threads = 2};
        assert_int_equal(kern_backend_new("cpu", &bc, &e->be), 0);
    }
    char err[256];
    assert_int_equal(model_load(model_path, e->be, &e->m, err, sizeof err), 0);
    sched_cfg_t c = *cfg;
    if (c.spec_draft_model) { /* the main model drafts for itself */
        assert_int_equal(model_load(model_path, e->be, &e->d, err, sizeof err), 0);
        c.draft = e->d;
    }
    assert_int_equal(sched_new(e->m, &c, &e->s), 0);
    e->chk.max_tokens = sched_get_cfg(e->s)->max_num_batched_tokens;
    e->chk.max_seqs = sched_get_cfg(e->s)->max_num_seqs;
    for (int i = 0; i < MAX_REQ; i++) {
        e->chk.first_step[i] = -1;
        e->chk.next_pos[i] = -1;
    }
    sched_set_step_hook(e->s, check_step, &e->chk);
}

static void
engine_close(engine_t *e)
{
    kv_pool_t *pool = sched_pool(e->s);
    assert_true(kv_pool_check(pool));
    assert_int_equal(kv_pool_n_free(pool), kv_pool_cfg(pool)->n_blocks);
    kv_pool_t *dp = sched_draft_pool(e->s);
    if (dp)
        assert_int_equal(kv_pool_n_free(dp), kv_pool_cfg(dp)->n_blocks);
    sched_free(e->s);
    model_free(e->d);
    model_free(e->m);
    kern_backend_free(e->be);
}

static void
submit(engine_t *e, uint64_t id, uint32_t n_prompt, uint32_t max_tokens, int32_t prio, int rc)
{
    int32_t prompt[512];
    for (uint32_t i = 0; i < n_prompt && i < 512; i++)
        prompt[i] = (int32_t)((id * 131 + i * 7) % 256);
    sched_request_t r = {.id = id,
                         .prompt = prompt,
                         .n_prompt = n_prompt,
                         .max_tokens = max_tokens,
                         .priority = prio,
                         .ignore_eos = true,
                         .sampling = {.temperature = 0.0f, .top_p = 1.0f}};
    assert_int_equal(sched_submit(e->s, &r), rc);
}

/* Steps until the engine is idle, checking the pool after every step;
 * each(e, arg), when not NULL, looks at the engine after every step too. */
static void
run_to_idle_each(engine_t *e, outcome_t *o, int max_steps, void (*each)(engine_t *, void *),
                 void *arg)
{
    for (int i = 0; i < max_steps; i++) {
        int live = sched_step(e->s);
        assert_true(live >= 0);
        assert_true(kv_pool_check(sched_pool(e->s)));
        collect(e->s, o);
        if (each)
            each(e, arg);
        if (live == 0)
            return;
    }
    fail_msg("engine did not go idle in %d steps", max_steps);
}

static void
run_to_idle(engine_t *e, outcome_t *o, int max_steps)
{
    run_to_idle_each(e, o, max_steps, NULL, NULL);
}

/* The load snapshot counts the preempted among the waiting; *arg keeps
 * the most preempted seen. */
static void
check_preempted(engine_t *e, void *arg)
{
    uint32_t *most = arg;
    sched_load_t l;
    sched_get_load(e->s, &l);
    assert_true(l.preempted <= l.waiting);
    *most = l.preempted > *most ? l.preempted : *most;
}

/* ---- tests -------------------------------------------------------------------- */

static void
test_budget_and_positions(void **state)
{
    (void)state;
    sched_cfg_t cfg = {
        .max_num_seqs = 4, .max_num_batched_tokens = 40, .block_tokens = 4, .n_blocks = 256};
    engine_t e;
    engine_open(&e, true, &cfg);
    static outcome_t o;
    memset(&o, 0, sizeof o);
    for (uint64_t id = 0; id < 10; id++)
        submit(&e, id, 5 + (uint32_t)id * 13, 3 + (uint32_t)id % 4, 0, 0);
    run_to_idle(&e, &o, 1000);
    assert_false(e.chk.failed);
    assert_int_equal(o.n_finished, 10);
    for (uint64_t id = 0; id < 10; id++) {
        assert_int_equal(o.finish[id], SCHED_FINISH_LENGTH);
        assert_int_equal(o.n_tokens[id], 3 + id % 4);
        assert_int_equal(o.usage[id].prompt_tokens, 5 + id * 13);
        assert_int_equal(o.usage[id].computed_prompt_tokens, 5 + id * 13);
        assert_int_equal(o.usage[id].completion_tokens, 3 + id % 4);
        assert_int_equal(o.usage[id].preemptions, 0);
        /* every prompt and completion position but the last token's computed once */
        assert_int_equal(e.chk.next_pos[id], (int32_t)(5 + id * 13 + 3 + id % 4 - 1));
    }
    /* FCFS within one priority: first scheduled in submission order. */
    for (uint64_t id = 1; id < 10; id++)
        assert_true(e.chk.first_step[id] >= e.chk.first_step[id - 1]);
    engine_close(&e);
}

static void
test_priority_order(void **state)
{
    (void)state;
    sched_cfg_t cfg = {
        .max_num_seqs = 1, .max_num_batched_tokens = 64, .block_tokens = 4, .n_blocks = 64};
    engine_t e;
    engine_open(&e, true, &cfg);
    static outcome_t o;
    memset(&o, 0, sizeof o);
    submit(&e, 0, 8, 2, 5, 0);
    submit(&e, 1, 8, 2, 1, 0);
    submit(&e, 2, 8, 2, 5, 0);
    submit(&e, 3, 8, 2, 0, 0);
    run_to_idle(&e, &o, 200);
    assert_false(e.chk.failed);
    /* priority 0 first, then 1, then the two 5s in arrival order */
    assert_true(e.chk.first_step[3] < e.chk.first_step[1]);
    assert_true(e.chk.first_step[1] < e.chk.first_step[0]);
    assert_true(e.chk.first_step[0] < e.chk.first_step[2]);
    engine_close(&e);
}

static void
test_preemption_and_too_large(void **state)
{
    (void)state;
    /* 24 blocks of 4 = 96 slots for 6 requests of ~40 tokens: must preempt. */
    sched_cfg_t cfg = {
        .max_num_seqs = 6, .max_num_batched_tokens = 64, .block_tokens = 4, .n_blocks = 24};
    engine_t e;
    engine_open(&e, true, &cfg);
    static outcome_t o;
    memset(&o, 0, sizeof o);
    for (uint64_t id = 0; id < 6; id++)
        submit(&e, id, 20 + (uint32_t)id, 20, 0, 0);
    submit(&e, 7, 90, 10, 0, KVS_ENOSPC);    /* can never fit: refused, others proceed */
    submit(&e, 8, 500, 4000, 0, KVS_ERANGE); /* longer than the model */
    uint32_t most_preempted = 0;
    run_to_idle_each(&e, &o, 2000, check_preempted, &most_preempted);
    assert_true(most_preempted > 0);
    assert_false(e.chk.failed);
    assert_int_equal(o.n_finished, 6);
    uint32_t preempted = 0;
    for (uint64_t id = 0; id < 6; id++) {
        assert_int_equal(o.finish[id], SCHED_FINISH_LENGTH);
        assert_int_equal(o.n_tokens[id], 20);
        assert_int_equal(o.usage[id].preemptions, e.chk.recomputes[id]);
        preempted += o.usage[id].preemptions;
        /* recomputed prompt tokens are counted again */
        assert_true(o.usage[id].computed_prompt_tokens >= 20 + id);
    }
    assert_true(preempted > 0);
    engine_close(&e);
}

static void
test_cancel_everywhere(void **state)
{
    (void)state;
    sched_cfg_t cfg = {
        .max_num_seqs = 3, .max_num_batched_tokens = 16, .block_tokens = 4, .n_blocks = 20};
    engine_t e;
    engine_open(&e, true, &cfg);
    static outcome_t o;
    memset(&o, 0, sizeof o);
    submit(&e, 0, 40, 30, 0, 0); /* long prefill: cancelled mid-prefill */
    submit(&e, 1, 4, 30, 0, 0);  /* cancelled mid-decode */
    submit(&e, 2, 30, 30, 0, 0); /* gets preempted, cancelled while preempted */
    submit(&e, 3, 4, 30, 0, 0);  /* still waiting when cancelled */
    submit(&e, 4, 4, 5, 0, 0);   /* finishes normally */
    for (int i = 0; i < 2; i++) {
        sched_step(e.s);
        collect(e.s, &o);
    }
    sched_cancel(e.s, 0);
    sched_cancel(e.s, 3);
    sched_step(e.s);
    collect(e.s, &o);
    for (int i = 0; i < 12; i++) {
        sched_step(e.s);
        collect(e.s, &o);
    }
    sched_cancel(e.s, 1);
    sched_cancel(e.s, 2);
    sched_cancel(e.s, 99); /* unknown: ignored */
    run_to_idle(&e, &o, 500);
    assert_false(e.chk.failed);
    assert_int_equal(o.n_finished, 5);
    assert_int_equal(o.finish[0], SCHED_FINISH_CANCELLED);
    assert_int_equal(o.finish[1], SCHED_FINISH_CANCELLED);
    assert_int_equal(o.finish[2], SCHED_FINISH_CANCELLED);
    assert_int_equal(o.finish[3], SCHED_FINISH_CANCELLED);
    assert_int_equal(o.finish[4], SCHED_FINISH_LENGTH);
    assert_true(o.usage[0].computed_prompt_tokens < 40);
    engine_close(&e);
}

static void
test_prefix_cache_and_salt(void **state)
{
    (void)state;
    sched_cfg_t cfg = {.max_num_seqs = 4,
                       .max_num_batched_tokens = 256,
                       .block_tokens = 4,
                       .n_blocks = 128,
                       .prefix_caching = true};
    engine_t e;
    engine_open(&e, true, &cfg);
    static outcome_t o;
    memset(&o, 0, sizeof o);
    int32_t prompt[50];
    for (int i = 0; i < 50; i++)
        prompt[i] = i + 1;
    sched_request_t r = {.id = 0,
                         .prompt = prompt,
                         .n_prompt = 50,
                         .max_tokens = 2,
                         .ignore_eos = true,
                         .sampling = {.top_p = 1.0f}};
    assert_int_equal(sched_submit(e.s, &r), 0);
    run_to_idle(&e, &o, 100);
    r.id = 1; /* same prompt, same salt: hits 48 tokens (12 full blocks) */
    assert_int_equal(sched_submit(e.s, &r), 0);
    run_to_idle(&e, &o, 100);
    r.id = 2;
    r.cache_salt = 77; /* another tenant: no hit */
    assert_int_equal(sched_submit(e.s, &r), 0);
    run_to_idle(&e, &o, 100);
    assert_int_equal(o.usage[0].cached_prompt_tokens, 0);
    assert_int_equal(o.usage[1].cached_prompt_tokens, 48);
    assert_int_equal(o.usage[1].computed_prompt_tokens, 2);
    assert_int_equal(o.usage[2].cached_prompt_tokens, 0);

    /* The key follows how the KV was computed.  Quest at decode leaves the
     * prompt dense: its prompt shares dense requests' blocks. */
    r.cache_salt = 0;
    r.id = 3;
    r.attn = (model_attn_policy_t){.decode_top_k = 4};
    assert_int_equal(sched_submit(e.s, &r), 0);
    run_to_idle(&e, &o, 100);
    assert_int_equal(o.usage[3].cached_prompt_tokens, 48);
    /* A sparse prefill does not, and neither does another top_k. */
    const model_attn_policy_t bs2 = {
        .kind = MODEL_ATTN_BLOCK_SPARSE, .sinks = 4, .window = 8, .top_k = 2};
    const uint32_t want[3] = {0, 48, 0};
    for (uint64_t i = 0; i < 3; i++) {
        r.id = 4 + i;
        r.attn = bs2;
        r.attn.top_k = i < 2 ? 2 : 4;
        assert_int_equal(sched_submit(e.s, &r), 0);
        run_to_idle(&e, &o, 100);
        assert_int_equal(o.usage[r.id].cached_prompt_tokens, want[i]);
    }
    /* Generated tokens decoded under Quest, or after a sparse prefill, are
     * not what a prefill of them computes: a later prompt that holds them
     * matches the prompt's blocks only (48 of the 56 tokens in full blocks
     * of the 59 computed), where after a dense request it matches all 56. */
    const model_attn_policy_t pols[3] = {{0}, {.decode_top_k = 4}, bs2};
    const uint32_t hit[3] = {56, 48, 48};
    for (uint64_t i = 0; i < 3; i++) {
        int32_t longer[70];
        memcpy(longer, prompt, sizeof prompt);
        r.prompt = prompt;
        r.n_prompt = 50;
        r.max_tokens = 10;
        r.cache_salt = 100 + i; /* nothing cached under it yet */
        r.attn = pols[i];
        r.id = 7 + 2 * i;
        assert_int_equal(sched_submit(e.s, &r), 0);
        run_to_idle(&e, &o, 100);
        assert_int_equal(o.n_tokens[r.id], 10);
        memcpy(longer + 50, o.tokens[r.id], 10 * sizeof(int32_t));
        for (int j = 60; j < 70; j++)
            longer[j] = j;
        r.prompt = longer;
        r.n_prompt = 70;
        r.max_tokens = 2;
        r.id++;
        assert_int_equal(sched_submit(e.s, &r), 0);
        run_to_idle(&e, &o, 100);
        assert_int_equal(o.usage[r.id].cached_prompt_tokens, hit[i]);
        r.prompt = prompt;
    }
    assert_false(e.chk.failed);
    engine_close(&e);
}

/* Real CPU runtime: 32 requests of mixed lengths under a pool that forces
 * preemption produce exactly the greedy tokens each produces alone. */
static void
test_real_preemption_same_tokens(void **state)
{
    (void)state;
    enum { N = 32, MAXT = 12 };
    static outcome_t alone, together;
    memset(&alone, 0, sizeof alone);
    memset(&together, 0, sizeof together);
    sched_cfg_t one = {.max_num_seqs = 1,
                       .max_num_batched_tokens = 256,
                       .block_tokens = 16,
                       .n_blocks = 64,
                       .kv_dtype = KERN_F32};
    engine_t e;
    engine_open(&e, false, &one);
    for (uint64_t id = 0; id < N; id++)
        submit(&e, id, 3 + (uint32_t)(id * 37 % 90), MAXT, 0, 0);
    run_to_idle(&e, &alone, 5000);
    engine_close(&e);

    sched_cfg_t many = {.max_num_seqs = 16,
                        .max_num_batched_tokens = 96,
                        .block_tokens = 8,
                        .n_blocks = 40,
                        .kv_dtype = KERN_F32};
    engine_open(&e, false, &many);
    for (uint64_t id = 0; id < N; id++)
        submit(&e, id, 3 + (uint32_t)(id * 37 % 90), MAXT, 0, 0);
    run_to_idle(&e, &together, 5000);
    uint32_t preempted = 0;
    for (uint64_t id = 0; id < N; id++) {
        assert_int_equal(together.n_tokens[id], MAXT);
        assert_memory_equal(together.tokens[id], alone.tokens[id], MAXT * sizeof(int32_t));
        preempted += together.usage[id].preemptions;
    }
    assert_true(preempted > 0);
    assert_false(e.chk.failed);
    engine_close(&e);
}

/* Logprobs: each token event of a request that asks carries the
 * log-softmax of the row it was sampled from (seen by the logits hook,
 * recomputed here in double), the sampled token's among them, and the
 * most likely tokens in order; a request that does not ask gets none, and
 * too many alternatives are refused. */
enum { LP_REQS = 3, LP_TOKENS = 6, LP_VOCAB = 259 };

typedef struct lp_rows {
    float row[LP_REQS][LP_TOKENS][LP_VOCAB];
    uint32_t n[LP_REQS];
} lp_rows_t;

static void
keep_row(void *arg, uint64_t id, const float *logits, uint32_t n_vocab)
{
    lp_rows_t *r = arg;
    assert_int_equal(n_vocab, LP_VOCAB);
    if (id < LP_REQS && r->n[id] < LP_TOKENS)
        memcpy(r->row[id][r->n[id]++], logits, sizeof r->row[0][0]);
}

/* A cpu engine whose logits hook keeps rows, and a prompt of n distinct
 * bytes (n <= 256). */
static void
rows_engine_open(engine_t *e, lp_rows_t *rows, int32_t *prompt, int n)
{
    sched_cfg_t cfg = {.max_num_seqs = 4,
                       .max_num_batched_tokens = 64,
                       .block_tokens = 16,
                       .n_blocks = 32,
                       .kv_dtype = KERN_F32};
    engine_open(e, false, &cfg);
    memset(rows, 0, sizeof *rows);
    sched_set_logits_hook(e->s, keep_row, rows);
    for (int i = 0; i < n; i++)
        prompt[i] = (i * 37 + 11) % 256;
}

static void
test_logprobs(void **state)
{
    (void)state;
    engine_t e;
    static lp_rows_t rows;
    int32_t prompt[24];
    rows_engine_open(&e, &rows, prompt, 24);
    /* 0: greedy with 5 alternatives; 1: sampled, the token's alone; 2: none. */
    const uint32_t top[LP_REQS] = {5, 0, 0};
    const bool want[LP_REQS] = {true, true, false};
    for (uint64_t id = 0; id < LP_REQS; id++) {
        sched_request_t r = {
            .id = id,
            .prompt = prompt,
            .n_prompt = 24,
            .max_tokens = LP_TOKENS,
            .ignore_eos = true,
            .sampling = {.temperature = id == 1 ? 1.5f : 0.0f, .top_p = 1.0f, .seed = 7},
            .logprobs = want[id],
            .top_logprobs = top[id]};
        assert_int_equal(sched_submit(e.s, &r), 0);
    }
    sched_request_t too_many = {.id = 9,
                                .prompt = prompt,
                                .n_prompt = 24,
                                .max_tokens = 2,
                                .sampling = {.top_p = 1.0f},
                                .logprobs = true,
                                .top_logprobs = SCHED_MAX_LOGPROBS + 1};
    assert_int_equal(sched_submit(e.s, &too_many), KVS_EINVAL);
    uint32_t seen[LP_REQS] = {0}, finished = 0;
    for (int step = 0; step < 200 && finished < LP_REQS; step++) {
        assert_true(sched_step(e.s) >= 0);
        sched_event_t *ev;
        while ((ev = sched_poll(e.s)) != NULL) {
            uint64_t id = ev->req_id;
            assert_true(id < LP_REQS);
            if (ev->kind == SCHED_EV_FINISH) {
                finished++;
                sched_event_free(ev);
                continue;
            }
            uint32_t k = seen[id]++;
            assert_true(k < rows.n[id]);
            assert_int_equal(ev->has_logprobs, want[id]);
            if (want[id]) {
                const float *row = rows.row[id][k];
                double mx = row[0], sum = 0.0;
                for (int v = 1; v < LP_VOCAB; v++)
                    mx = row[v] > mx ? row[v] : mx;
                for (int v = 0; v < LP_VOCAB; v++)
                    sum += exp((double)row[v] - mx);
                double lse = mx + log(sum);
                assert_float_equal(ev->lp.logprob, row[ev->token] - lse, 1e-5);
                assert_true(ev->lp.logprob <= 0.0f);
                assert_int_equal(ev->lp.n_top, top[id]);
                for (uint32_t t = 0; t < ev->lp.n_top; t++) {
                    int32_t tid = ev->lp.top_ids[t];
                    assert_float_equal(ev->lp.top_lps[t], row[tid] - lse, 1e-5);
                    if (t > 0)
                        assert_true(ev->lp.top_lps[t] <= ev->lp.top_lps[t - 1]);
                    /* Nothing outside the top ranks above its last. */
                    for (int v = 0; v < LP_VOCAB && t + 1 == ev->lp.n_top; v++) {
                        bool listed = false;
                        for (uint32_t u = 0; u < ev->lp.n_top; u++)
                            listed |= ev->lp.top_ids[u] == v;
                        assert_true(listed || row[v] <= row[tid]);
                    }
                }
                if (id == 0) /* greedy: the sampled token is the most likely */
                    assert_int_equal(ev->lp.top_ids[0], ev->token);
            }
            sched_event_free(ev);
        }
    }
    assert_int_equal(finished, LP_REQS);
    for (uint64_t id = 0; id < LP_REQS; id++)
        assert_int_equal(seen[id], LP_TOKENS);
    engine_close(&e);
}

/* Penalties see the prompt and every sampled token: each greedy token is
 * the argmax of its row (from the logits hook) penalized as vLLM does,
 * recomputed here from the prompt and the tokens before it; and they
 * change the choice somewhere, or the check would prove nothing. */
static void
test_penalties_fed(void **state)
{
    (void)state;
    engine_t e;
    static lp_rows_t rows;
    /* 200 distinct bytes: the raw favourite is likely among them. */
    enum { NP = 200 };
    int32_t prompt[NP];
    rows_engine_open(&e, &rows, prompt, NP);
    const float rp = 3.0f, fq = 2.0f, pr = 0.5f;
    sched_request_t r = {.id = 0,
                         .prompt = prompt,
                         .n_prompt = NP,
                         .max_tokens = LP_TOKENS,
                         .ignore_eos = true,
                         .sampling = {.top_p = 1.0f,
                                      .repetition_penalty = rp,
                                      .frequency_penalty = fq,
                                      .presence_penalty = pr}};
    assert_int_equal(sched_submit(e.s, &r), 0);
    static outcome_t o;
    memset(&o, 0, sizeof o);
    run_to_idle(&e, &o, 200);
    assert_int_equal(o.n_tokens[0], LP_TOKENS);
    assert_int_equal(rows.n[0], LP_TOKENS);
    uint32_t count[LP_VOCAB] = {0};
    bool in_prompt[LP_VOCAB] = {false}, changed = false;
    for (int i = 0; i < NP; i++)
        in_prompt[prompt[i]] = true;
    for (uint32_t k = 0; k < LP_TOKENS; k++) {
        const float *row = rows.row[0][k];
        int32_t best = 0, raw = 0;
        float best_x = -INFINITY;
        for (int v = 0; v < LP_VOCAB; v++) {
            float x = row[v];
            if (in_prompt[v] || count[v])
                x = x > 0.0f ? x / rp : x * rp;
            if (count[v])
                x -= fq * (float)count[v] + pr;
            if (x > best_x) {
                best_x = x;
                best = v;
            }
            raw = row[v] > row[raw] ? v : raw;
        }
        assert_int_equal(o.tokens[0][k], best);
        changed |= best != raw;
        count[best]++;
    }
    assert_true(changed);
    engine_close(&e);
}

/* Teacher forcing: forced tokens come out as given, with the logprobs of
 * the rows they were fed after (the logits hook's), and sampling resumes
 * after them; forcing a request's own greedy tokens reproduces its
 * logprobs exactly; forced ids outside the vocabulary are refused. */
static void
test_forced(void **state)
{
    (void)state;
    engine_t e;
    static lp_rows_t rows;
    int32_t prompt[24];
    rows_engine_open(&e, &rows, prompt, 24);
    const int32_t forced[4] = {5, 7, 250, 7};
    static sched_event_t got[LP_REQS][LP_TOKENS];
    int32_t greedy[LP_TOKENS];
    for (uint64_t id = 0; id < LP_REQS; id++) {
        /* 0: greedy; 1: forced to 0's tokens (submitted once 0 is done);
         * 2: forced to `forced`, then greedy. */
        sched_request_t r = {.id = id,
                             .prompt = prompt,
                             .n_prompt = 24,
                             .max_tokens = LP_TOKENS,
                             .ignore_eos = true,
                             .sampling = {.top_p = 1.0f},
                             .logprobs = true,
                             .top_logprobs = 3,
                             .forced = id == 1   ? greedy
                                       : id == 2 ? forced
                                                 : NULL,
                             .n_forced = id == 1   ? LP_TOKENS
                                         : id == 2 ? 4
                                                   : 0};
        assert_int_equal(sched_submit(e.s, &r), 0);
        uint32_t n = 0;
        bool done = false;
        for (int step = 0; step < 200 && !done; step++) {
            assert_true(sched_step(e.s) >= 0);
            sched_event_t *ev;
            while ((ev = sched_poll(e.s)) != NULL) {
                assert_int_equal(ev->req_id, id);
                if (ev->kind == SCHED_EV_FINISH)
                    done = true;
                else if (n < LP_TOKENS)
                    got[id][n++] = *ev;
                sched_event_free(ev);
            }
        }
        assert_true(done);
        assert_int_equal(n, LP_TOKENS);
        if (id == 0)
            for (int k = 0; k < LP_TOKENS; k++)
                greedy[k] = got[0][k].token;
    }
    for (int k = 0; k < LP_TOKENS; k++) {
        assert_int_equal(got[1][k].token, greedy[k]);
        assert_float_equal(got[1][k].lp.logprob, got[0][k].lp.logprob, 0.0);
        const sched_event_t *ev = &got[2][k];
        if (k < 4)
            assert_int_equal(ev->token, forced[k]);
        const float *row = rows.row[2][k];
        double mx = row[0], sum = 0.0;
        for (int v = 1; v < LP_VOCAB; v++)
            mx = row[v] > mx ? row[v] : mx;
        for (int v = 0; v < LP_VOCAB; v++)
            sum += exp((double)row[v] - mx);
        assert_float_equal(ev->lp.logprob, row[ev->token] - (mx + log(sum)), 1e-5);
        if (k >= 4) /* greedy again */
            assert_int_equal(ev->token, ev->lp.top_ids[0]);
    }
    int32_t bad = LP_VOCAB;
    sched_request_t r = {.id = 9,
                         .prompt = prompt,
                         .n_prompt = 24,
                         .max_tokens = 2,
                         .sampling = {.top_p = 1.0f},
                         .forced = &bad,
                         .n_forced = 1};
    assert_int_equal(sched_submit(e.s, &r), KVS_EINVAL);
    r.forced = forced;
    r.n_forced = 3; /* more than max_tokens */
    assert_int_equal(sched_submit(e.s, &r), KVS_EINVAL);
    engine_close(&e);
}

/* prompt_logprobs: every prompt token after the first is reported once,
 * in order, across chunks cut by the step's token budget and its logit
 * rows, with the logprob and alternatives a teacher-forced decode of the
 * same tokens gets; the prefix cache does not skip the prompt; bad
 * requests are refused. */
static void
plp_check(uint32_t threads)
{
    enum { P = 24, TOP = 3 };
    sched_cfg_t cfg = {.max_num_seqs = 4,
                       .max_num_batched_tokens = 16,
                       .prompt_logprob_rows = 5,
                       .sample_threads = threads,
                       .block_tokens = 16,
                       .n_blocks = 32,
                       .kv_dtype = KERN_F32,
                       .prefix_caching = true};
    engine_t e;
    engine_open(&e, false, &cfg);
    int32_t prompt[P];
    for (int i = 0; i < P; i++)
        prompt[i] = (i * 37 + 11) % 256;
    static sched_logprobs_t plp[2][P], forced_lp[P];
    uint32_t n_plp[2] = {0, 0}, n_forced = 0;
    for (uint64_t id = 0; id < 3; id++) {
        /* 0 and 1: the prompt with its logprobs (1 after 0 cached it);
         * 2: its first token, the rest forced. */
        sched_request_t r = {.id = id,
                             .prompt = prompt,
                             .n_prompt = id < 2 ? P : 1,
                             .max_tokens = id < 2 ? 2 : P - 1,
                             .ignore_eos = true,
                             .sampling = {.top_p = 1.0f},
                             .prompt_logprobs = id < 2,
                             .top_prompt_logprobs = TOP,
                             .logprobs = id == 2,
                             .top_logprobs = TOP,
                             .forced = id == 2 ? prompt + 1 : NULL,
                             .n_forced = id == 2 ? P - 1 : 0};
        assert_int_equal(sched_submit(e.s, &r), 0);
        bool done = false;
        for (int step = 0; step < 400 && !done; step++) {
            assert_true(sched_step(e.s) >= 0);
            sched_event_t *ev;
            while ((ev = sched_poll(e.s)) != NULL) {
                assert_int_equal(ev->req_id, id);
                if (ev->kind == SCHED_EV_PROMPT_LOGPROBS) {
                    assert_true(id < 2);
                    assert_int_equal(ev->plp_first, n_plp[id] + 1); /* in order, once */
                    assert_true(ev->n_plp >= 1 && ev->n_plp <= cfg.prompt_logprob_rows);
                    assert_true(n_plp[id] == 0 || n_plp[id] + ev->n_plp <= P - 1);
                    for (uint32_t k = 0; k < ev->n_plp; k++)
                        plp[id][n_plp[id]++] = ev->plp[k];
                } else if (ev->kind == SCHED_EV_TOKEN) {
                    assert_int_equal(n_plp[id < 2 ? id : 0], P - 1); /* all before a token */
                    if (id == 2)
                        forced_lp[n_forced++] = ev->lp;
                } else {
                    done = true;
                    assert_int_equal(ev->finish, SCHED_FINISH_LENGTH);
                    if (id == 1)
                        assert_int_equal(ev->usage.cached_prompt_tokens, 0);
                }
                sched_event_free(ev);
            }
        }
        assert_true(done);
    }
    assert_int_equal(n_forced, P - 1);
    for (uint32_t k = 0; k < P - 1; k++) {
        for (int id = 0; id < 2; id++) {
            const sched_logprobs_t *a = &plp[id][k], *b = &forced_lp[k];
            assert_float_equal(a->logprob, b->logprob, 1e-4);
            assert_int_equal(a->n_top, TOP);
            assert_memory_equal(a->top_ids, b->top_ids, TOP * sizeof(int32_t));
        }
    }
    sched_request_t bad = {.id = 9,
                           .prompt = prompt,
                           .n_prompt = P,
                           .max_tokens = 1,
                           .sampling = {.top_p = 1.0f},
                           .prompt_logprobs = true,
                           .top_prompt_logprobs = SCHED_MAX_LOGPROBS + 1};
    assert_int_equal(sched_submit(e.s, &bad), KVS_EINVAL);
    bad.top_prompt_logprobs = 1;
    bad.spec.on = true;
    assert_int_equal(sched_submit(e.s, &bad), KVS_EINVAL);
    engine_close(&e);
}

/* ... with their rows on the engine thread alone, and on four threads. */
static void
test_prompt_logprobs(void **state)
{
    (void)state;
    plp_check(1);
    plp_check(4);
}

/* prompt_logprobs under preemption: four requests in a pool that holds
 * two report every prompt token exactly once, in order, with the values
 * each reports alone. */
static void
test_prompt_logprobs_preempted(void **state)
{
    (void)state;
    enum { R = 4, P = 40, GEN = 12 };
    static sched_logprobs_t got[2][R][P];
    uint32_t n[2][R] = {{0}}, preempted = 0;
    for (int together = 0; together < 2; together++) {
        sched_cfg_t cfg = {.max_num_seqs = 4,
                           .max_num_batched_tokens = 32,
                           .prompt_logprob_rows = 12,
                           .block_tokens = 16,
                           .n_blocks = together ? 5 : 16,
                           .kv_dtype = KERN_F32};
        engine_t e;
        engine_open(&e, false, &cfg);
        for (uint64_t id = 0; id < R; id++) {
            int32_t prompt[P];
            for (int i = 0; i < P; i++)
                prompt[i] = (int32_t)((id * 53 + (uint64_t)i * 29 + 7) % 256);
            sched_request_t r = {.id = id,
                                 .prompt = prompt,
                                 .n_prompt = P,
                                 .max_tokens = GEN,
                                 .ignore_eos = true,
                                 .sampling = {.top_p = 1.0f},
                                 .prompt_logprobs = true,
                                 .top_prompt_logprobs = 2};
            assert_int_equal(sched_submit(e.s, &r), 0);
            if (together)
                continue;
            for (int step = 0; step < 400 && sched_step(e.s) > 0; step++)
                ; /* alone: each to its end */
        }
        uint32_t finished = 0;
        for (int step = 0; step < 2000 && finished < R; step++) {
            assert_true(sched_step(e.s) >= 0);
            assert_true(kv_pool_check(sched_pool(e.s)));
            sched_event_t *ev;
            while ((ev = sched_poll(e.s)) != NULL) {
                uint64_t id = ev->req_id;
                if (ev->kind == SCHED_EV_PROMPT_LOGPROBS) {
                    assert_int_equal(ev->plp_first, n[together][id] + 1);
                    for (uint32_t k = 0; k < ev->n_plp; k++)
                        got[together][id][n[together][id]++] = ev->plp[k];
                } else if (ev->kind == SCHED_EV_FINISH) {
                    finished++;
                    preempted += together ? ev->usage.preemptions : 0;
                }
                sched_event_free(ev);
            }
        }
        assert_int_equal(finished, R);
        engine_close(&e);
    }
    assert_true(preempted > 0);
    for (uint32_t id = 0; id < R; id++) {
        assert_int_equal(n[0][id], P - 1);
        assert_int_equal(n[1][id], P - 1);
        for (uint32_t k = 0; k < P - 1; k++) {
            assert_float_equal(got[1][id][k].logprob, got[0][id][k].logprob, 1e-5);
            assert_memory_equal(got[1][id][k].top_ids, got[0][id][k].top_ids, 2 * sizeof(int32_t));
        }
    }
}

/* The outputs of requests 0 and 1 of up to 8 samples each, as bytes
 * (the byte vocabulary; end-of-generation tokens left out), each
 * finished once. */
typedef struct {
    int32_t tok[2][8][40];
    uint32_t n[2][8], fin[2][8];
} samples_t;

static void
run_samples(engine_t *e, samples_t *o, sched_finish_t want)
{
    memset(o, 0, sizeof *o);
    for (int step = 0, live = 1; step < 400 && live > 0; step++) {
        live = sched_step(e->s);
        assert_true(live >= 0);
        sched_event_t *ev;
        while ((ev = sched_poll(e->s)) != NULL) {
            uint64_t id = ev->req_id;
            assert_true(id < 2 && ev->index < 8);
            if (ev->kind == SCHED_EV_TOKEN && o->n[id][ev->index] < 40)
                o->tok[id][ev->index][o->n[id][ev->index]++] = ev->token;
            else if (ev->kind == SCHED_EV_FINISH) {
                assert_int_equal(ev->finish, want);
                o->fin[id][ev->index]++;
            }
            sched_event_free(ev);
        }
    }
}

/* Sample i of request id as text into buf[41]; returns its length. */
static uint32_t
sample_text(const engine_t *e, const samples_t *o, int id, int i, char *buf)
{
    uint32_t n = 0;
    assert_int_equal(o->fin[id][i], 1);
    for (uint32_t k = 0; k < o->n[id][i]; k++)
        if (!model_token_is_eog(e->m, o->tok[id][i][k]))
            buf[n++] = (char)o->tok[id][i][k];
    buf[n] = '\0';
    return n;
}

/* guided_choice through the engine: every sample (forked or not) spells
 * one of the choices and ends with SCHED_FINISH_STOP, greedy or sampled;
 * with forced tokens the request is refused. */
static void
test_guided_choice(void **state)
{
    (void)state;
    sched_cfg_t cfg = {.max_num_seqs = 4,
                       .max_num_batched_tokens = 64,
                       .block_tokens = 16,
                       .n_blocks = 64,
                       .kv_dtype = KERN_F32};
    engine_t e;
    engine_open(&e, false, &cfg);
    const char *choices[3] = {"yes", "no", "yesterday"};
    int32_t prompt[12];
    for (int i = 0; i < 12; i++)
        prompt[i] = (i * 41 + 5) % 256;
    for (uint64_t id = 0; id < 2; id++) {
        sched_request_t r = {
            .id = id,
            .prompt = prompt,
            .n_prompt = 12,
            .max_tokens = 16,
            .n = 8,
            .sampling = {.temperature = id ? 2.0f : 0.0f, .top_p = 1.0f, .seed = 3},
            .choices = choices,
            .n_choices = 3};
        assert_int_equal(sched_submit(e.s, &r), 0);
    }
    static samples_t o;
    run_samples(&e, &o, SCHED_FINISH_STOP);
    for (int id = 0; id < 2; id++)
        for (int i = 0; i < 8; i++) {
            char text[41];
            sample_text(&e, &o, id, i, text);
            int which = -1;
            for (int c = 0; c < 3; c++)
                if (strcmp(text, choices[c]) == 0)
                    which = c;
            assert_true(which >= 0);
            if (id == 0) /* greedy: every sample the same */
                assert_memory_equal(o.tok[0][i], o.tok[0][0], sizeof o.tok[0][0]);
        }
    int32_t forced = 'y';
    sched_request_t bad = {.id = 9,
                           .prompt = prompt,
                           .n_prompt = 12,
                           .max_tokens = 4,
                           .sampling = {.top_p = 1.0f},
                           .choices = choices,
                           .n_choices = 3,
                           .forced = &forced,
                           .n_forced = 1};
    assert_int_equal(sched_submit(e.s, &bad), KVS_EINVAL);
    bad.n_forced = 0;
    bad.n_choices = MODEL_MAX_CHOICES + 1;
    assert_int_equal(sched_submit(e.s, &bad), KVS_EINVAL);
    engine_close(&e);
}

/* guided_regex through the engine: every sample, forked or not, greedy
 * or drawn at temperature 2 from a random model, is a whole match and
 * ends with SCHED_FINISH_STOP; the caller's guide is untouched by the
 * engine's (a clone); refused with forced tokens or with choices. */
static void
test_guided_regex(void **state)
{
    (void)state;
    sched_cfg_t cfg = {.max_num_seqs = 4,
                       .max_num_batched_tokens = 64,
                       .block_tokens = 16,
                       .n_blocks = 64,
                       .kv_dtype = KERN_F32};
    engine_t e;
    engine_open(&e, false, &cfg);
    const char *pat = "\\{\"n\":(?:0|-?[1-9][0-9]{0,3}),\"s\":\"[a-z ]{1,8}\"\\}";
    char err[256];
    model_guide_t *g;
    assert_int_equal(model_guide_new(e.m, pat, strlen(pat), &g, err, sizeof err), 0);
    int32_t prompt[12];
    for (int i = 0; i < 12; i++)
        prompt[i] = (i * 37 + 11) % 256;
    for (uint64_t id = 0; id < 2; id++) {
        sched_request_t r = {
            .id = id,
            .prompt = prompt,
            .n_prompt = 12,
            .max_tokens = 40,
            .n = 6,
            .sampling = {.temperature = id ? 2.0f : 0.0f, .top_p = 1.0f, .seed = 5},
            .guide = g};
        assert_int_equal(sched_submit(e.s, &r), 0);
    }
    static samples_t o;
    run_samples(&e, &o, SCHED_FINISH_STOP);
    bool differ = false;
    for (int id = 0; id < 2; id++)
        for (int i = 0; i < 6; i++) {
            char text[41];
            uint32_t n = sample_text(&e, &o, id, i, text);
            if (!model_guide_fullmatch(g, text, n))
                fail_msg("request %d sample %d: \"%s\"", id, i, text);
            if (id == 0)
                assert_memory_equal(o.tok[0][i], o.tok[0][0], sizeof o.tok[0][0]);
            else
                differ |= memcmp(o.tok[1][i], o.tok[1][0], sizeof o.tok[1][0]) != 0;
        }
    assert_true(differ); /* drawn samples are not all one */
    /* The caller's guide is still at the start. */
    assert_int_equal(model_guide_accept(g, '{'), 0);
    int32_t forced = '{';
    const char *choices[1] = {"x"};
    sched_request_t bad = {.id = 9,
                           .prompt = prompt,
                           .n_prompt = 12,
                           .max_tokens = 4,
                           .sampling = {.top_p = 1.0f},
                           .guide = g,
                           .forced = &forced,
                           .n_forced = 1};
    assert_int_equal(sched_submit(e.s, &bad), KVS_EINVAL);
    bad.n_forced = 0;
    bad.choices = choices;
    bad.n_choices = 1;
    assert_int_equal(sched_submit(e.s, &bad), KVS_EINVAL);
    model_guide_free(g);
    engine_close(&e);
}

/* min_tokens: before it, the model's end-of-generation ids and the banned
 * ids cannot be drawn (each token is the argmax of its row without them),
 * and logprobs still come from the model's row; after it, they can. */
static void
test_min_tokens(void **state)
{
    (void)state;
    engine_t e;
    static lp_rows_t rows;
    int32_t prompt[24];
    rows_engine_open(&e, &rows, prompt, 24);
    /* Ban the greedy run's own first token (found by a first request). */
    int32_t ban[2] = {0, 0};
    static outcome_t o;
    for (uint64_t id = 0; id < 2; id++) {
        sched_request_t r = {.id = id,
                             .prompt = prompt,
                             .n_prompt = 24,
                             .max_tokens = LP_TOKENS,
                             .sampling = {.top_p = 1.0f},
                             .logprobs = true,
                             .min_tokens = id == 1 ? LP_TOKENS - 1 : 0,
                             .min_ban = ban,
                             .n_min_ban = id == 1 ? 2 : 0};
        assert_int_equal(sched_submit(e.s, &r), 0);
        memset(&o, 0, sizeof o);
        run_to_idle(&e, &o, 200);
        if (id == 0) {
            ban[0] = o.tokens[0][0];
            ban[1] = 257; /* and EOS, banned anyway */
        }
    }
    assert_int_equal(o.n_tokens[1], LP_TOKENS);
    for (uint32_t k = 0; k < LP_TOKENS - 1; k++) {
        const float *row = rows.row[1][k];
        int32_t best = -1;
        for (int v = 0; v < LP_VOCAB; v++)
            if (v != ban[0] && !model_token_is_eog(e.m, v) && (best < 0 || row[v] > row[best]))
                best = v;
        assert_int_equal(o.tokens[1][k], best);
        assert_int_not_equal(o.tokens[1][k], ban[0]);
    }
    sched_request_t bad = {.id = 9,
                           .prompt = prompt,
                           .n_prompt = 24,
                           .max_tokens = 2,
                           .sampling = {.top_p = 1.0f},
                           .min_tokens = 3};
    assert_int_equal(sched_submit(e.s, &bad), KVS_EINVAL);
    bad.min_tokens = 1;
    bad.min_ban = ban;
    bad.n_min_ban = SCHED_MAX_MIN_BAN + 1;
    assert_int_equal(sched_submit(e.s, &bad), KVS_EINVAL);
    engine_close(&e);
}

/* A device that fails for good mid-run: the requests of the failed step
 * end with KVS_EDEVICE and give back their blocks, later ones fail the
 * same way, and the load snapshot says so (the server's health reads it). */
static void
test_device_failure(void **state)
{
    (void)state;
    engine_t e;
    sched_cfg_t cfg = {.block_tokens = 16, .n_blocks = 64};
    engine_open(&e, true, &cfg);
    outcome_t o = {0};
    submit(&e, 1, 40, 8, 0, 0);
    submit(&e, 2, 20, 8, 0, 0);
    assert_true(sched_step(e.s) >= 0);
    collect(e.s, &o);
    sched_load_t l;
    sched_get_load(e.s, &l);
    assert_false(l.device_failed);
    ((fake_be_t *)e.be)->fail = true;
    for (int i = 0; i < 4 && sched_step(e.s) > 0; i++)
        ;
    collect(e.s, &o);
    assert_int_equal(o.n_finished, 2);
    for (int id = 1; id <= 2; id++) {
        assert_int_equal(o.finish[id], SCHED_FINISH_ERROR);
        assert_int_equal(o.error[id], KVS_EDEVICE);
    }
    sched_get_load(e.s, &l);
    assert_true(l.device_failed);
    assert_int_equal(l.running + l.waiting, 0);
    assert_int_equal(l.blocks_free, l.blocks_total);
    submit(&e, 3, 10, 4, 0, 0);
    for (int i = 0; i < 4 && sched_step(e.s) > 0; i++)
        ;
    collect(e.s, &o);
    assert_int_equal(o.finish[3], SCHED_FINISH_ERROR);
    engine_close(&e);
}

/* KV sized in bytes (--kv-cache-memory): as many whole blocks as fit, and
 * the load snapshot reports them all free. */
static void
test_kv_sized_by_bytes(void **state)
{
    (void)state;
    engine_t e;
    sched_cfg_t cfg = {.block_tokens = 16, .kv_cache_bytes = 1u << 20};
    engine_open(&e, true, &cfg);
    const kv_pool_t *pool = sched_pool(e.s);
    size_t per = kv_pool_block_bytes(kv_pool_cfg(pool));
    assert_true(per > 0);
    assert_int_equal(sched_get_cfg(e.s)->n_blocks, (uint32_t)((1u << 20) / per));
    sched_load_t l;
    sched_get_load(e.s, &l);
    assert_int_equal(l.blocks_total, sched_get_cfg(e.s)->n_blocks);
    assert_int_equal(l.blocks_free, l.blocks_total);
    assert_int_equal(l.running + l.waiting, 0);
    submit(&e, 1, 40, 4, 0, 0);
    assert_true(sched_step(e.s) >= 0);
    sched_get_load(e.s, &l);
    assert_int_equal(l.running, 1);
    assert_true(l.blocks_free < l.blocks_total);
    while (sched_step(e.s) > 0)
        ;
    sched_get_load(e.s, &l);
    assert_int_equal(l.blocks_free, l.blocks_total);
    engine_close(&e);
}

/* Collects while the engine thread runs until n requests finished (or
 * about 20 s passed), stops the thread, and checks that n did. */
static void
thread_until(engine_t *e, outcome_t *o, uint32_t n)
{
    for (int spins = 0; o->n_finished < n && spins < 200000; spins++) {
        collect(e->s, o);
        usleep(100);
    }
    sched_thread_stop(e->s);
    collect(e->s, o);
    assert_int_equal(o->n_finished, n);
}

static void
test_engine_thread(void **state)
{
    (void)state;
    sched_cfg_t cfg = {
        .max_num_seqs = 4, .max_num_batched_tokens = 64, .block_tokens = 4, .n_blocks = 64};
    engine_t e;
    engine_open(&e, true, &cfg);
    static outcome_t o;
    memset(&o, 0, sizeof o);
    assert_int_equal(sched_thread_start(e.s), 0);
    for (uint64_t id = 0; id < 8; id++)
        submit(&e, id, 10, 4, 0, 0);
    thread_until(&e, &o, 8);
    engine_close(&e);
}

/* A step that fails (a passing failure: the device lives on) fails its
 * requests; the engine thread then steps on for the others instead of
 * sleeping until something else is submitted. */
static void
test_engine_thread_after_failure(void **state)
{
    (void)state;
    sched_cfg_t cfg = {.max_num_seqs = 1, .block_tokens = 16, .n_blocks = 64};
    engine_t e;
    engine_open(&e, true, &cfg);
    static outcome_t o;
    memset(&o, 0, sizeof o);
    submit(&e, 1, 20, 4, 0, 0);
    submit(&e, 2, 20, 4, 0, 0);
    ((fake_be_t *)e.be)->fail_soon = 1;
    assert_int_equal(sched_thread_start(e.s), 0);
    thread_until(&e, &o, 2);
    assert_int_equal(o.finish[1], SCHED_FINISH_ERROR);
    assert_int_equal(o.error[1], KVS_ENOMEM);
    assert_int_equal(o.finish[2], SCHED_FINISH_LENGTH);
    sched_load_t l;
    sched_get_load(e.s, &l);
    assert_false(l.device_failed);
    assert_int_equal(l.blocks_free, l.blocks_total);
    engine_close(&e);
}

/* ---- speculative decoding by prompt lookup ----------------------------------- */

enum { SD_REQ = 13, SD_IDX = 3, SD_MAXT = 48 };

typedef struct sd_out {
    uint32_t n[SD_REQ][SD_IDX];
    int32_t tok[SD_REQ][SD_IDX][SD_MAXT];
    float lp[SD_REQ][SD_IDX][SD_MAXT];
    int32_t top[SD_REQ][SD_IDX][SD_MAXT]; /* the most likely alternative */
    sched_finish_t fin[SD_REQ][SD_IDX];
    sched_usage_t usage[SD_REQ][SD_IDX];
    uint64_t draft, accepted, preemptions;
} sd_out_t;

/* Runs the mix below on an engine of cfg: prompts that repeat a random
 * run (so lookups find proposals), greedy and seeded draws with the
 * filters, logprobs, min_tokens with EOS live, a regex guide, n samples,
 * SnapKV, a sparse prefill, sink eviction, teacher forcing. */
static void
sd_run(const sched_cfg_t *cfg, sd_out_t *o)
{
    memset(o, 0, sizeof *o);
    engine_t e;
    engine_open(&e, false, cfg);
    sched_set_step_hook(e.s, NULL, NULL); /* rejected proposals step positions back */
    const char *pat = "(?:[a-c]{1,3} )+[a-c]{1,3}\\.";
    char err[256];
    model_guide_t *g, *gram;
    assert_int_equal(model_guide_new(e.m, pat, strlen(pat), &g, err, sizeof err), 0);
    /* A grammar's automaton grows as its output goes (one guide's alone). */
    const char *gbnf = "root ::= item (\", \" item)* \".\"\nitem ::= [a-d]+ | \"(\" root \")\"";
    assert_int_equal(model_guide_new_grammar(e.m, gbnf, strlen(gbnf), &gram, err, sizeof err), 0);
    for (uint64_t id = 0; id < SD_REQ; id++) {
        int32_t prompt[160];
        uint32_t run = 9 + (uint32_t)id * 3, n = 0;
        for (uint32_t rep = 0; rep < 3; rep++)
            for (uint32_t i = 0; i < run; i++)
                prompt[n++] = (int32_t)((id * 131 + i * 7 + (i * i) % 5) % 256);
        for (uint32_t i = 0; i < 5; i++) /* the run's start again: the lookup's cue */
            prompt[n++] = prompt[i];
        int32_t ban = 'a';
        sched_request_t r = {.id = id,
                             .prompt = prompt,
                             .n_prompt = n,
                             .max_tokens = SD_MAXT,
                             .ignore_eos = id % 5 != 4,
                             .logprobs = id % 4 == 1 || id == 11,
                             .top_logprobs = 1,
                             .sampling = {.temperature = 0.0f, .top_p = 1.0f, .seed = 77 + id}};
        if (id % 3 == 1) {
            r.sampling.temperature = 0.9f;
            r.sampling.top_p = 0.95f;
        } else if (id % 3 == 2) {
            r.sampling.temperature = 0.7f;
            r.sampling.top_k = 20;
            r.sampling.min_p = 0.02f;
            r.sampling.repetition_penalty = 1.1f;
        }
        if (id == 4) {
            r.min_tokens = 20;
            r.min_ban = &ban;
            r.n_min_ban = 1;
        }
        if (id == 7 || id == 10)
            r.guide = g;
        if (id == 12) { /* two samples of a grammar */
            r.guide = gram;
            r.n = 2;
        }
        if (id == 3) /* decoding over a compressed prompt */
            r.kv = (sched_kv_policy_t){.kind = SCHED_KV_SNAPKV, .budget_tokens = 40};
        if (id == 6) /* a sparse prefill; decode rows are dense */
            r.attn =
                (model_attn_policy_t){.kind = MODEL_ATTN_SINK_WINDOW, .sinks = 4, .window = 16};
        /* Never speculates: sink eviction rewrites its KV each step.  (A
         * budget past the prompt: evicting between prefill chunks would
         * make what it keeps depend on the chunking, which proposals
         * change.) */
        if (id == 9)
            r.kv = (sched_kv_policy_t){
                .kind = SCHED_KV_SINK_EVICTION, .budget_tokens = 128, .sinks = 4};
        if (id == 8 || id == 10)
            r.n = SD_IDX;
        int32_t forced[30];
        if (id == 11) { /* teacher forcing, an EOS among the tokens */
            for (int i = 0; i < 30; i++)
                forced[i] = i == 9 ? model_vocab_eos(model_vocab(e.m)) : prompt[i % 20];
            r.forced = forced;
            r.n_forced = 30;
        }
        assert_int_equal(sched_submit(e.s, &r), 0);
    }
    for (int step = 0, live = 1; live > 0; step++) {
        assert_true(step < 5000);
        live = sched_step(e.s);
        assert_true(live >= 0);
        assert_true(kv_pool_check(sched_pool(e.s)));
        sched_event_t *ev;
        while ((ev = sched_poll(e.s)) != NULL) {
            uint64_t id = ev->req_id;
            uint32_t x = ev->index;
            assert_true(id < SD_REQ && x < SD_IDX);
            if (ev->kind == SCHED_EV_TOKEN) {
                assert_true(o->n[id][x] < SD_MAXT);
                uint32_t k = o->n[id][x]++;
                o->tok[id][x][k] = ev->token;
                assert_true(ev->has_logprobs == (id % 4 == 1 || id == 11));
                if (ev->has_logprobs) {
                    o->lp[id][x][k] = ev->lp.logprob;
                    o->top[id][x][k] = ev->lp.top_ids[0];
                }
            } else if (ev->kind == SCHED_EV_FINISH) {
                assert_int_equal(ev->error, 0);
                o->fin[id][x] = ev->finish;
                o->usage[id][x] = ev->usage;
                o->preemptions += ev->usage.preemptions;
            }
            sched_event_free(ev);
        }
    }
    sched_load_t l;
    sched_get_load(e.s, &l);
    o->draft = l.spec_draft_tokens;
    o->accepted = l.spec_accepted_tokens;
    uint64_t draft = 0, accepted = 0;
    for (int id = 0; id < SD_REQ; id++)
        for (int x = 0; x < SD_IDX; x++) {
            draft += o->usage[id][x].spec_draft_tokens;
            accepted += o->usage[id][x].spec_accepted_tokens;
        }
    assert_true(draft == o->draft && accepted == o->accepted);
    /* Per position: the accepted tokens again; every proposal's first. */
    uint64_t by_pos = 0;
    for (uint32_t j = 0; j < SCHED_MAX_SPEC_TOKENS; j++)
        by_pos += l.spec_accepted_pos[j];
    assert_true(by_pos == accepted && l.spec_accepted_pos[0] <= l.spec_drafts);
    assert_true(l.spec_drafts <= draft && (draft == 0) == (l.spec_drafts == 0));
    assert_int_equal(l.spec_positions, cfg->num_speculative_tokens);
    if (cfg->num_speculative_tokens == 0)
        assert_true(o->draft == 0);
    for (int id = 7; id <= 10; id += 3) /* the guide's outputs match */
        for (int x = 0; x < (id == 10 ? SD_IDX : 1); x++) {
            char text[SD_MAXT + 1];
            uint32_t n = 0;
            for (uint32_t k = 0; k < o->n[id][x]; k++)
                if (!model_token_is_eog(e.m, o->tok[id][x][k]))
                    text[n++] = (char)o->tok[id][x][k];
            text[n] = '\0';
            assert_int_equal(o->fin[id][x], SCHED_FINISH_STOP);
            if (!model_guide_fullmatch(g, text, n))
                fail_msg("request %d sample %d: \"%s\"", id, x, text);
        }
    for (int x = 0; x < 2; x++)
        assert_int_equal(o->fin[12][x], SCHED_FINISH_STOP);
    model_guide_free(g);
    model_guide_free(gram);
    engine_close(&e);
}

/* a and b ran the mix alike; same_blocks: on pools of one block size
 * (sink eviction drops whole blocks, so what request 9 keeps depends on
 * it). */
static void
sd_same(const sd_out_t *a, const sd_out_t *b, bool same_blocks)
{
    for (int id = 0; id < SD_REQ; id++)
        for (int x = 0; x < (id == 8 || id == 10 ? SD_IDX
                             : id == 12          ? 2
                                                 : 1) &&
                        (id != 9 || same_blocks);
             x++) {
            if (a->n[id][x] != b->n[id][x] ||
                memcmp(a->tok[id][x], b->tok[id][x], a->n[id][x] * sizeof(int32_t)) != 0)
                fail_msg("request %d output %d differs", id, x);
            assert_int_equal(a->fin[id][x], b->fin[id][x]);
            assert_int_equal(a->usage[id][x].completion_tokens, b->usage[id][x].completion_tokens);
            for (uint32_t k = 0; k < a->n[id][x]; k++) {
                assert_true(fabsf(a->lp[id][x][k] - b->lp[id][x][k]) < 1e-4f);
                assert_int_equal(a->top[id][x][k], b->top[id][x][k]);
            }
        }
}

/* sched_new refuses each of bad[0..n) with KVS_EINVAL; one whose
 * spec_draft_model is set and draft not gets the model as its draft. */
static void
refused(sched_cfg_t *bad, size_t n)
{
    engine_t e;
    memset(&e, 0, sizeof e);
    kern_backend_cfg_t bc = {.n_threads = 1};
    assert_int_equal(kern_backend_new("cpu", &bc, &e.be), 0);
    char err[256];
    assert_int_equal(model_load(model_path, e.be, &e.m, err, sizeof err), 0);
    for (size_t i = 0; i < n; i++) {
        if (bad[i].spec_draft_model && bad[i].num_speculative_tokens == 0)
            bad[i].draft = e.m;
        assert_int_equal(sched_new(e.m, &bad[i], &e.s), KVS_EINVAL);
    }
    model_free(e.m);
    kern_backend_free(e.be);
}

/* The engine the speculative decoding tests start from. */
static sched_cfg_t
sd_base(void)
{
    return (sched_cfg_t){.max_num_seqs = 16,
                         .max_num_batched_tokens = 512,
                         .block_tokens = 16,
                         .n_blocks = 256,
                         .kv_dtype = KERN_F32};
}

/* Pools so small that the mix's requests are preempted (their KV waits in
 * host memory) and, with a draft, draft KV does not fit; the longest
 * proposals. */
static void
sd_tighten(sched_cfg_t *cfg)
{
    cfg->num_speculative_tokens = SCHED_MAX_SPEC_TOKENS;
    cfg->max_num_batched_tokens = 96;
    cfg->block_tokens = 8;
    cfg->n_blocks = 48;
    cfg->draft_n_blocks = 24;
    cfg->prompt_logprob_rows = 8;
    cfg->host_kv_bytes = 4u << 20;
}

/* The mix plain, with speculative decoding as spec_cfg sets it, and with
 * it again on pools so small that requests are preempted (their KV waits
 * in host memory) and, with a draft, draft KV does not fit: the same
 * tokens, finish reasons and logprobs each time. */
static void
sd_compare(const sched_cfg_t *spec_cfg, sd_out_t *plain, sd_out_t *spec, sd_out_t *tight)
{
    sched_cfg_t cfg = sd_base();
    sd_run(&cfg, plain);
    cfg = *spec_cfg;
    sd_run(&cfg, spec);
    sd_same(plain, spec, true);
    sd_tighten(&cfg);
    sd_run(&cfg, tight);
    sd_same(plain, tight, false);
    assert_true(tight->accepted > 0 && tight->preemptions > 0);
    fprintf(stderr,
            "spec decode (%s): %llu of %llu proposed accepted (tight pools: %llu of %llu, %llu "
            "preemptions)\n",
            spec_cfg->spec_draft_model ? "draft" : "ngram", (unsigned long long)spec->accepted,
            (unsigned long long)spec->draft, (unsigned long long)tight->accepted,
            (unsigned long long)tight->draft, (unsigned long long)tight->preemptions);
}

/* Speculative decoding by prompt lookup changes no output (seeded draws
 * included, since each token is drawn from its own row with the sampler
 * in the same state; teacher forcing scores the forced tokens a few a
 * step and gets their logprobs), and proposals were both accepted and
 * rejected.  Out of range settings are refused. */
static void
test_spec_decode_same_outputs(void **state)
{
    (void)state;
    static sd_out_t plain, spec, tight;
    sched_cfg_t cfg = sd_base();
    cfg.num_speculative_tokens = 5;
    cfg.prompt_lookup_max = 3;
    cfg.prompt_lookup_min = 1;
    sd_compare(&cfg, &plain, &spec, &tight);
    assert_true(spec.accepted > 0 && spec.accepted < spec.draft);
    /* Forced tokens are proposed as they are, and hold. */
    assert_true(spec.usage[11][0].spec_accepted_tokens >= 20);
    assert_true(spec.usage[3][0].kv_dropped_tokens > 0 && spec.usage[3][0].spec_draft_tokens > 0);
    assert_int_equal(spec.usage[9][0].spec_draft_tokens, 0);
    sched_cfg_t bad[5] = {{.n_blocks = 8, .num_speculative_tokens = SCHED_MAX_SPEC_TOKENS + 1},
                          {.n_blocks = 8,
                           .num_speculative_tokens = 2,
                           .prompt_lookup_max = 2,
                           .prompt_lookup_min = 3},
                          {.n_blocks = 8,
                           .num_speculative_tokens = 2,
                           .prompt_lookup_max = SCHED_MAX_PROMPT_LOOKUP + 1},
                          /* The draft method without a draft, or without a proposal length
                           * (the draft is filled in). */
                          {.n_blocks = 8, .num_speculative_tokens = 2, .spec_draft_model = true},
                          {.n_blocks = 8, .spec_draft_model = true}};
    refused(bad, 5);
}

/* Speculative decoding by a draft model (here the main model drafting
 * for itself) changes no output either.  A greedy request keeps nearly
 * every proposal, which only draft KV at the right positions and in step
 * with what was accepted gives; so does a sampling one, whose proposals
 * are the draft's draws with the random numbers its sampler is about to
 * use (a greedy proposal would hold only as often as the draw happens to
 * be the most likely token). */
static void
test_spec_decode_draft_model(void **state)
{
    (void)state;
    static sd_out_t plain, spec, tight;
    sched_cfg_t cfg = sd_base();
    cfg.num_speculative_tokens = 4;
    cfg.spec_draft_model = true;
    sd_compare(&cfg, &plain, &spec, &tight);
    const sched_usage_t *u = &spec.usage[0][0];
    assert_true(u->spec_draft_tokens >= SD_MAXT / 2);
    assert_true(u->spec_accepted_tokens * 10 >= u->spec_draft_tokens * 9);
    const sched_usage_t *u1 = &spec.usage[1][0]; /* top-p 0.95 at temperature 0.9 */
    assert_true(u1->spec_draft_tokens >= SD_MAXT / 2);
    assert_true(u1->spec_accepted_tokens * 100 >= u1->spec_draft_tokens * 97);
    assert_true(spec.accepted < spec.draft); /* a guide's or a ban's rows miss some */
    assert_true(spec.usage[11][0].spec_accepted_tokens >= 20);
    assert_int_equal(spec.usage[9][0].spec_draft_tokens, 0);
    /* From spec_disable_batch running requests on, only forced tokens are
     * proposed; the draft catches up when proposals resume. */
    static sd_out_t few;
    cfg.spec_disable_batch = 10;
    sd_run(&cfg, &few);
    sd_same(&plain, &few, true);
    uint64_t drafted = 0; /* by the draft model: all but request 11's */
    for (int id = 0; id < 11; id++)
        for (int x = 0; x < SD_IDX; x++)
            drafted += few.usage[id][x].spec_draft_tokens;
    assert_true(drafted > 0 && few.draft < spec.draft);
    assert_true(few.usage[11][0].spec_accepted_tokens >= 20);
    fprintf(stderr, "spec decode (draft) off from 10 running: %llu of %llu proposed accepted\n",
            (unsigned long long)few.accepted, (unsigned long long)few.draft);
}

/* Rejection sampling (spec_rejection): greedy requests still give plain
 * decoding's tokens; a sampling request whose draft is the model itself
 * (q == p but for batching's rounding) keeps nearly every proposal, and
 * its tokens are not plain decoding's draws (the proposals' draws take
 * its generator's numbers); guides, bans, penalties, forks and teacher
 * forcing go on as before (every request ends without error, the guides'
 * outputs match them), also on pools that preempt. */
static void
test_spec_decode_rejection(void **state)
{
    (void)state;
    static sd_out_t plain, exact, rej, tight;
    sched_cfg_t cfg = sd_base();
    sd_run(&cfg, &plain);
    cfg.num_speculative_tokens = 4;
    cfg.spec_draft_model = true;
    sd_run(&cfg, &exact);
    cfg.spec_rejection = true;
    sd_run(&cfg, &rej);
    const int greedy[] = {0, 3, 6, 9};
    for (size_t i = 0; i < sizeof greedy / sizeof *greedy; i++) {
        int id = greedy[i];
        assert_int_equal(plain.n[id][0], rej.n[id][0]);
        assert_memory_equal(plain.tok[id][0], rej.tok[id][0], plain.n[id][0] * sizeof(int32_t));
    }
    for (int x = 0; x < 2; x++) /* request 12: greedy samples of a grammar */
        assert_memory_equal(plain.tok[12][x], rej.tok[12][x], SD_MAXT * sizeof(int32_t));
    /* Requests 1 (top-p) and 2 and 5 (top-k, min-p, a repetition penalty,
     * which the draft's proposal applies as of its first token). */
    const int sampled[] = {1, 2, 5};
    uint64_t ed = 0, ea = 0, rd = 0, ra = 0;
    for (size_t i = 0; i < sizeof sampled / sizeof *sampled; i++) {
        const sched_usage_t *e = &exact.usage[sampled[i]][0], *r = &rej.usage[sampled[i]][0];
        ed += e->spec_draft_tokens;
        ea += e->spec_accepted_tokens;
        rd += r->spec_draft_tokens;
        ra += r->spec_accepted_tokens;
    }
    const sched_usage_t *u1 = &rej.usage[1][0];
    fprintf(stderr,
            "rejection sampling: sampled requests kept %llu of %llu (exact: %llu of %llu); "
            "request 1 %u of %u\n",
            (unsigned long long)ra, (unsigned long long)rd, (unsigned long long)ea,
            (unsigned long long)ed, u1->spec_accepted_tokens, u1->spec_draft_tokens);
    assert_true(u1->spec_draft_tokens >= SD_MAXT / 2);
    assert_true(u1->spec_accepted_tokens * 100 >= u1->spec_draft_tokens * 97);
    assert_true(ra * 10 >= rd * 9);
    bool differ = false;
    for (size_t i = 0; i < sizeof sampled / sizeof *sampled; i++)
        differ |= memcmp(plain.tok[sampled[i]][0], rej.tok[sampled[i]][0],
                         SD_MAXT * sizeof(int32_t)) != 0;
    assert_true(differ);
    assert_true(rej.usage[11][0].spec_accepted_tokens >= 20); /* forced tokens hold */
    sd_tighten(&cfg);
    sd_run(&cfg, &tight);
    assert_true(tight.accepted > 0 && tight.preemptions > 0);
    for (size_t i = 0; i < 3; i++) /* request 9's eviction depends on the block size */
        assert_memory_equal(plain.tok[greedy[i]][0], tight.tok[greedy[i]][0],
                            SD_MAXT * sizeof(int32_t));
    /* Three rows for the draft's distributions a step: proposals cut to
     * them, the rest greedy and checked exactly, side by side. */
    static sd_out_t few;
    cfg = sd_base();
    cfg.num_speculative_tokens = 4;
    cfg.spec_draft_model = cfg.spec_rejection = true;
    cfg.prompt_logprob_rows = 3;
    sd_run(&cfg, &few);
    for (size_t i = 0; i < sizeof greedy / sizeof *greedy; i++)
        assert_memory_equal(plain.tok[greedy[i]][0], few.tok[greedy[i]][0],
                            SD_MAXT * sizeof(int32_t));
    assert_true(few.accepted > 0);
    sched_cfg_t bad = {.n_blocks = 8, .num_speculative_tokens = 2, .spec_rejection = true};
    refused(&bad, 1);
}

/* A step's draws on four threads give what the engine thread alone
 * gives: each request keeps its sampler, forks draw from one row at once,
 * guided requests stay on the engine thread; with proposals drawn in place
 * beside them too. */
static void
test_parallel_draws_same_outputs(void **state)
{
    (void)state;
    static sd_out_t one, four, spec;
    sched_cfg_t cfg = sd_base();
    cfg.sample_threads = 1;
    sd_run(&cfg, &one);
    cfg.sample_threads = 4;
    sd_run(&cfg, &four);
    sd_same(&one, &four, true);
    cfg.num_speculative_tokens = 4;
    cfg.prompt_lookup_min = 1;
    sd_run(&cfg, &spec);
    sd_same(&one, &spec, true);
    assert_true(spec.accepted > 0);
    /* A quantized pool (every full block past a 16-token window sealed)
     * short enough to preempt, with proposals waiting for their draws
     * beside SnapKV's compaction and the seals: every request completes
     * without error, the pool checks out at every step, every block comes
     * back. */
    static sd_out_t q8;
    cfg.kv_dtype = KERN_F16;
    cfg.kv_quant = KERN_KVQ_Q8_0;
    cfg.kv_residual_tokens = 16;
    cfg.block_tokens = 8;
    cfg.n_blocks = 60;
    cfg.max_num_batched_tokens = 96;
    sd_run(&cfg, &q8);
    assert_true(q8.accepted > 0 && q8.preemptions > 0);
    sched_cfg_t bad = {.n_blocks = 8, .sample_threads = SCHED_MAX_SAMPLE_THREADS + 1};
    refused(&bad, 1);
}

/* Proposals never take a decode's place: with a token budget of one
 * token per running request, every request that is decoding is in every
 * step, while proposals still run (in steps with fewer decoders). */
typedef struct dec_watch {
    uint32_t decoding;
    bool missed;
} dec_watch_t;

static void
watch_decodes(void *arg, const model_batch_t *b, const uint64_t *ids)
{
    (void)ids;
    dec_watch_t *w = arg;
    if (b->pt.n_seqs < w->decoding)
        w->missed = true;
}

static void
test_spec_decode_keeps_decodes(void **state)
{
    (void)state;
    sched_cfg_t cfg = {.max_num_seqs = 8,
                       .max_num_batched_tokens = 8,
                       .block_tokens = 16,
                       .n_blocks = 64,
                       .kv_dtype = KERN_F32,
                       .num_speculative_tokens = 4,
                       .prompt_lookup_min = 1};
    engine_t e;
    engine_open(&e, false, &cfg);
    dec_watch_t w = {0};
    sched_set_step_hook(e.s, watch_decodes, &w);
    bool started[8] = {0};
    for (uint64_t id = 0; id < 8; id++) {
        int32_t prompt[12];
        for (int i = 0; i < 12; i++)
            prompt[i] = (int32_t)(65 + (i + (int)id) % 3);
        sched_request_t r = {.id = id,
                             .prompt = prompt,
                             .n_prompt = 4 + (uint32_t)id,
                             .max_tokens = 24,
                             .ignore_eos = true,
                             .sampling = {.temperature = 0.0f, .top_p = 1.0f}};
        assert_int_equal(sched_submit(e.s, &r), 0);
    }
    uint32_t finished = 0;
    for (int step = 0; finished < 8; step++) {
        assert_true(step < 1000);
        assert_true(sched_step(e.s) >= 0);
        sched_event_t *ev;
        while ((ev = sched_poll(e.s)) != NULL) {
            if (ev->kind == SCHED_EV_TOKEN && !started[ev->req_id]) {
                started[ev->req_id] = true;
                w.decoding++;
            } else if (ev->kind == SCHED_EV_FINISH) {
                assert_int_equal(ev->finish, SCHED_FINISH_LENGTH);
                w.decoding--;
                finished++;
            }
            sched_event_free(ev);
        }
    }
    assert_false(w.missed);
    sched_load_t l;
    sched_get_load(e.s, &l);
    assert_true(l.spec_accepted_tokens > 0);
    engine_close(&e);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_budget_and_positions),
        cmocka_unit_test(test_priority_order),
        cmocka_unit_test(test_preemption_and_too_large),
        cmocka_unit_test(test_cancel_everywhere),
        cmocka_unit_test(test_prefix_cache_and_salt),
        cmocka_unit_test(test_real_preemption_same_tokens),
        cmocka_unit_test(test_kv_sized_by_bytes),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_penalties_fed),
        cmocka_unit_test(test_forced),
        cmocka_unit_test(test_min_tokens),
        cmocka_unit_test(test_guided_choice),
        cmocka_unit_test(test_guided_regex),
        cmocka_unit_test(test_prompt_logprobs),
        cmocka_unit_test(test_prompt_logprobs_preempted),
        cmocka_unit_test(test_device_failure),
        cmocka_unit_test(test_engine_thread),
        cmocka_unit_test(test_engine_thread_after_failure),
        cmocka_unit_test(test_spec_decode_same_outputs),
        cmocka_unit_test(test_spec_decode_keeps_decodes),
        cmocka_unit_test(test_spec_decode_draft_model),
        cmocka_unit_test(test_spec_decode_rejection),
        cmocka_unit_test(test_parallel_draws_same_outputs),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
