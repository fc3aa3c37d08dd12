/*
 * tests/sched/test_spec_prefill.c — speculative prefill (model.h,
 * sched_engine.c) on the cpu backend with two tiny random models, a main
 * and a draft of the same byte vocabulary:
 *   - the chunk choice: sorted, the last chunk and the forced prefix kept,
 *     the requested share of chunks, everything at keep ratio 1;
 *   - the scores against a float64 reimplementation of the definition
 *     (algorithms.md 2.2 steps 3-6) over a real draft forward pass;
 *   - keep ratio 1 gives the full prefill's logits and tokens;
 *   - a sparse prefill computes kept tokens at their own positions, and
 *     decoding continues at position N with KV length K;
 *   - cancelling during the draft phase, and preempting, give every block
 *     of both pools back;
 *   - n samples draft once and draw what requests of their own draw.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "sched/sched.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char main_path[256], draft_path[256];

static int
make_model(char *path, uint64_t seed)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(path, 256, "%s/kvs_spec_XXXXXX", tmp ? tmp : "/tmp");
    int fd = mkstemp(path);
    if (fd < 0)
        return -1;
    close(fd);
    char err[256];
    return model_random_write("tiny", KERN_F32, seed, NULL, path, err, sizeof err);
}

static int
group_setup(void **state)
{
    (void)state;
    return make_model(main_path, 5) || make_model(draft_path, 9) ? -1 : 0;
}

static int
group_teardown(void **state)
{
    (void)state;
    unlink(main_path);
    unlink(draft_path);
    return 0;
}

static uint64_t rng = 0x9e3779b97f4a7c15ull;

static double
urand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (double)(rng >> 11) / 9007199254740992.0;
}

/* ---- the chunk choice ------------------------------------------------------ */

static void
test_select(void **state)
{
    (void)state;
    for (int it = 0; it < 500; it++) {
        uint32_t n = 1 + (uint32_t)(urand() * 700), chunk = 1 + (uint32_t)(urand() * 64);
        float keep = it % 7 == 0 ? 1.0f : (float)(0.01 + urand() * 0.99);
        uint32_t forced = it % 3 == 0 ? (uint32_t)(urand() * n) : 0;
        float *imp = malloc(n * sizeof *imp);
        int32_t *kept = malloc(n * sizeof *kept);
        assert_true(imp && kept);
        for (uint32_t i = 0; i < n; i++)
            imp[i] = (float)urand(); /* distinct with probability 1 */
        uint32_t k = model_spec_select(imp, n, chunk, keep, forced, kept);
        assert_true(k >= 1 && k <= n);
        for (uint32_t i = 1; i < k; i++)
            assert_true(kept[i] > kept[i - 1]); /* sorted, no repeats */
        uint32_t n_chunks = (n + chunk - 1) / chunk, last0 = (n_chunks - 1) * chunk;
        for (uint32_t j = last0; j < n; j++) /* the last chunk, whole */
            assert_int_equal(kept[k - (n - j)], (int32_t)j);
        for (uint32_t j = 0; j < forced; j++)
            assert_int_equal(kept[j], (int32_t)j);
        /* Whole chunks beyond the forced prefix: at least the requested
         * share, at most one more (the last chunk) plus forced ones. */
        uint32_t whole = 0;
        for (uint32_t c = 0; c < n_chunks; c++) {
            uint32_t lo = c * chunk, hi = lo + chunk < n ? lo + chunk : n, have = 0;
            for (uint32_t i = 0; i < k; i++)
                have += (uint32_t)kept[i] >= lo && (uint32_t)kept[i] < hi;
            assert_true(have == 0 || have == hi - lo || lo < forced);
            whole += have == hi - lo;
        }
        uint32_t want = (uint32_t)ceil(n_chunks * (double)keep - 1e-6);
        want = want < 1 ? 1 : want;
        assert_true(whole >= want);
        if (forced == 0)
            assert_true(whole <= want + 1);
        if (keep == 1.0f)
            assert_int_equal(k, n);
        free(imp);
        free(kept);
    }
}

/* ---- the scores against float64 --------------------------------------------- */

static void
test_importance_reference(void **state)
{
    (void)state;
    kern_backend_t *be;
    kern_backend_cfg_t bc = {.n_threads = 2};
    assert_int_equal(kern_backend_new("cpu", &bc, &be), 0);
    model_t *d;
    char err[256];
    assert_int_equal(model_load(draft_path, be, &d, err, sizeof err), 0);
    const model_hparams_t *hp = model_hparams(d);
    const uint32_t N = 150, A = 3, L = hp->n_layer, H = hp->n_head, dh = hp->head_dim;
    const uint32_t G = H / hp->n_head_kv, qd = H * dh, pool = 13;
    kv_pool_cfg_t pc = {.n_layers = L,
                        .n_kv_heads = hp->n_head_kv,
                        .head_dim = dh,
                        .block_tokens = 16,
                        .n_blocks = 32,
                        .dtype = KERN_F32};
    kv_pool_t *kvp;
    kv_table_t *t;
    sched_batch_t *sb;
    model_ctx_t *ctx;
    assert_int_equal(kv_pool_new(&pc, be, &kvp), 0);
    assert_int_equal(kv_table_new(kvp, &t), 0);
    assert_int_equal(sched_batch_new(&sb), 0);
    assert_int_equal(model_ctx_new(d, 256, 1, &ctx), 0);
    int32_t toks[N + A];
    for (uint32_t i = 0; i < N; i++)
        toks[i] = (int32_t)(urand() * 256);
    float *qs = malloc((size_t)A * L * qd * sizeof *qs);
    float *logits = malloc(hp->n_vocab * sizeof *logits);
    assert_true(qs && logits);
    uint32_t one = 1;
    /* The prompt in one step, then A - 1 look-ahead tokens. */
    for (uint32_t a = 0, done = 0; a < A; a++) {
        uint32_t n = a == 0 ? N : 1;
        sched_seq_step_t st = {
            .table = t, .tokens = toks + done, .n_tokens = n, .want_logits = true};
        const model_batch_t *mb;
        assert_int_equal(sched_batch_build(sb, &st, 1, &mb), 0);
        uint32_t last = n - 1;
        assert_int_equal(sched_batch_capture(sb, &last, &one, qs + (size_t)a * L * qd), 1);
        assert_int_equal(model_forward(ctx, kv_pool_kv(kvp), mb, logits), 0);
        done += n;
        uint32_t best = 0;
        for (uint32_t v = 1; v < hp->n_vocab; v++)
            best = logits[v] > logits[best] ? v : best;
        toks[done] = (int32_t)best;
    }
    float *imp = malloc(N * sizeof *imp);
    assert_non_null(imp);
    const kern_kv_t *kv = kv_pool_kv(kvp);
    assert_int_equal(model_spec_importance(d, kv, kv_table_blocks(t), N, qs, A, pool, imp), 0);

    /* float64, straight from the definition. */
    double *best = malloc((size_t)A * N * sizeof *best), *p = malloc(N * sizeof *p);
    assert_true(best && p);
    for (size_t i = 0; i < (size_t)A * N; i++)
        best[i] = -1.0;
    const int32_t *blocks = kv_table_blocks(t);
    for (uint32_t l = 0; l < L; l++)
        for (uint32_t h = 0; h < H; h++)
            for (uint32_t a = 0; a < A; a++) {
                const float *q = qs + ((size_t)a * L + l) * qd + (size_t)h * dh;
                double mx = -INFINITY, sum = 0.0;
                for (uint32_t j = 0; j < N; j++) {
                    const float *k =
                        (const float *)kv->k + (size_t)l * kv->layer_bytes / 4 +
                        (((size_t)blocks[j / 16] * kv->n_kv_heads + h / G) * 16 + j % 16) * dh;
                    double s = 0.0;
                    for (uint32_t e = 0; e < dh; e++)
                        s += (double)q[e] * k[e];
                    p[j] = s / sqrt((double)dh);
                    mx = p[j] > mx ? p[j] : mx;
                }
                for (uint32_t j = 0; j < N; j++)
                    sum += p[j] = exp(p[j] - mx);
                for (uint32_t j = 0; j < N; j++) {
                    double w = 0.0;
                    for (int o = -(int)pool / 2; o <= (int)pool / 2; o++)
                        if ((int)j + o >= 0 && (int)j + o < (int)N)
                            w += p[j + o] / sum;
                    w /= pool;
                    double *b = best + (size_t)a * N + j;
                    *b = w > *b ? w : *b;
                }
            }
    double err_max = 0.0, ref_max = 0.0;
    for (uint32_t j = 0; j < N; j++) {
        double r = 0.0;
        for (uint32_t a = 0; a < A; a++)
            r += best[(size_t)a * N + j] / A;
        err_max = fmax(err_max, fabs(r - imp[j]));
        ref_max = fmax(ref_max, r);
    }
    print_message("importance: max error %.3g of max %.3g\n", err_max, ref_max);
    assert_true(err_max <= 1e-5 * ref_max);

    free(best);
    free(p);
    free(imp);
    free(qs);
    free(logits);
    model_ctx_free(ctx);
    sched_batch_free(sb);
    kv_table_free(t);
    kv_pool_free(kvp);
    model_free(d);
    kern_backend_free(be);
}

/* ---- the engine ---------------------------------------------------------- */

#define MAXT 8

typedef struct run {
    kern_backend_t *be;
    model_t *m, *d;
    sched_t *s;
    /* per request id (0..3): logits of each sampled token, tokens */
    float *logits[4][MAXT];
    int32_t tokens[4][MAXT];
    uint32_t n_tokens[4], n_logits[4];
    sched_usage_t usage[4];
    sched_finish_t finish[4];
    /* positions and KV lengths the main model computed for request 0 */
    int32_t pos[1024], kv_len[1024];
    uint32_t n_rows;
} run_t;

static void
on_logits(void *arg, uint64_t id, const float *logits, uint32_t n_vocab)
{
    run_t *r = arg;
    if (id < 4 && r->n_logits[id] < MAXT) {
        float *c = malloc(n_vocab * sizeof *c);
        memcpy(c, logits, n_vocab * sizeof *c);
        r->logits[id][r->n_logits[id]++] = c;
    }
}

static void
on_step(void *arg, const model_batch_t *b, const uint64_t *ids)
{
    run_t *r = arg;
    for (uint32_t s = 0; s < b->pt.n_seqs; s++)
        if (ids[s] == 0)
            for (int32_t i = b->seq_indptr[s]; i < b->seq_indptr[s + 1] && r->n_rows < 1024; i++) {
                r->pos[r->n_rows] = b->pos[i];
                r->kv_len[r->n_rows++] = b->kv_len[i];
            }
}

/* An engine whose draft is the model at `draft`; spec_k > 0: it drafts
 * speculative decoding's proposals too, that many tokens. */
static void
run_open_draft(run_t *r, uint32_t n_blocks, uint32_t budget, const char *draft, uint32_t spec_k)
{
    memset(r, 0, sizeof *r);
    kern_backend_cfg_t bc = {.n_threads = 2};
    assert_int_equal(kern_backend_new("cpu", &bc, &r->be), 0);
    char err[256];
    assert_int_equal(model_load(main_path, r->be, &r->m, err, sizeof err), 0);
    assert_int_equal(model_load(draft, r->be, &r->d, err, sizeof err), 0);
    sched_cfg_t cfg = {.max_num_seqs = 4,
                       .max_num_batched_tokens = budget,
                       .block_tokens = 16,
                       .n_blocks = n_blocks,
                       .kv_dtype = KERN_F32,
                       .draft = r->d,
                       .num_speculative_tokens = spec_k,
                       .spec_draft_model = spec_k > 0};
    assert_int_equal(sched_new(r->m, &cfg, &r->s), 0);
    sched_set_logits_hook(r->s, on_logits, r);
    sched_set_step_hook(r->s, on_step, r);
}

static void
run_open(run_t *r, uint32_t n_blocks, uint32_t budget)
{
    run_open_draft(r, n_blocks, budget, draft_path, 0);
}

static void
run_collect(run_t *r)
{
    sched_event_t *ev;
    while ((ev = sched_poll(r->s)) != NULL) {
        uint64_t id = ev->req_id;
        assert_true(id < 4);
        if (ev->kind == SCHED_EV_TOKEN) {
            if (r->n_tokens[id] < MAXT)
                r->tokens[id][r->n_tokens[id]] = ev->token;
            r->n_tokens[id]++;
        } else {
            r->usage[id] = ev->usage;
            r->finish[id] = ev->finish;
        }
        sched_event_free(ev);
    }
}

static void
run_idle(run_t *r)
{
    for (int i = 0; i < 2000; i++) {
        int live = sched_step(r->s);
        assert_true(live >= 0);
        run_collect(r);
        if (live == 0)
            return;
    }
    fail_msg("engine did not go idle");
}

static void
run_close(run_t *r)
{
    kv_pool_t *pools[2] = {sched_pool(r->s), sched_draft_pool(r->s)};
    for (int i = 0; i < 2; i++) {
        assert_true(kv_pool_check(pools[i]));
        assert_int_equal(kv_pool_n_free(pools[i]), kv_pool_cfg(pools[i])->n_blocks);
    }
    sched_free(r->s);
    model_free(r->d);
    model_free(r->m);
    kern_backend_free(r->be);
    for (int i = 0; i < 4; i++)
        for (uint32_t k = 0; k < r->n_logits[i]; k++)
            free(r->logits[i][k]);
}

static void
submit(run_t *r, uint64_t id, const int32_t *prompt, uint32_t n, const model_spec_policy_t *spec,
       int want)
{
    sched_request_t q = {.id = id,
                         .prompt = prompt,
                         .n_prompt = n,
                         .max_tokens = MAXT,
                         .ignore_eos = true,
                         .sampling = {.temperature = 0.0f, .top_p = 1.0f}};
    if (spec)
        q.spec = *spec;
    assert_int_equal(sched_submit(r->s, &q), want);
}

static void
make_prompt(int32_t *p, uint32_t n, uint32_t salt)
{
    for (uint32_t i = 0; i < n; i++)
        p[i] = (int32_t)((i * 2654435761u + salt * 97u) >> 9) % 256;
}

static void
test_keep_all_equals_full(void **state)
{
    (void)state;
    enum { N = 200 };
    int32_t prompt[N];
    make_prompt(prompt, N, 1);
    static run_t r;
    run_open(&r, 64, 64);
    model_spec_policy_t spec = {.on = true, .keep_ratio = 1.0f};
    submit(&r, 0, prompt, N, NULL, 0);
    submit(&r, 1, prompt, N, &spec, 0);
    run_idle(&r);
    assert_int_equal(r.n_tokens[0], MAXT);
    assert_int_equal(r.n_tokens[1], MAXT);
    assert_memory_equal(r.tokens[0], r.tokens[1], MAXT * sizeof(int32_t));
    assert_int_equal(r.n_logits[1], MAXT);
    uint32_t nv = model_hparams(r.m)->n_vocab;
    for (uint32_t k = 0; k < MAXT; k++) {
        double mx = 0.0, err = 0.0;
        for (uint32_t v = 0; v < nv; v++) {
            mx = fmax(mx, fabs(r.logits[0][k][v]));
            err = fmax(err, fabs((double)r.logits[0][k][v] - r.logits[1][k][v]));
        }
        assert_true(err <= 1e-5 * mx);
    }
    assert_int_equal(r.usage[1].kept_prompt_tokens, N);
    assert_true(r.usage[1].draft_ns > 0);
    run_close(&r);
}

static void
test_positions_after_sparse_prefill(void **state)
{
    (void)state;
    enum { N = 300 };
    int32_t prompt[N];
    make_prompt(prompt, N, 2);
    static run_t r;
    run_open(&r, 64, 96);
    model_spec_policy_t spec = {.on = true, .keep_ratio = 0.25f, .look_ahead = 4, .chunk = 32};
    submit(&r, 0, prompt, N, &spec, 0);
    run_idle(&r);
    assert_int_equal(r.n_tokens[0], MAXT);
    uint32_t K = r.usage[0].kept_prompt_tokens;
    /* ceil(10 chunks * 0.25) = 3 best chunks plus the last: 3 or 4 chunks
     * of 32, the last one 12 tokens long. */
    assert_true(K >= 2 * 32 + 12 && K <= 3 * 32 + 12);
    assert_int_equal(r.usage[0].computed_prompt_tokens, K);
    /* Prefill rows: kept positions ascending, KV lengths 1..K; then
     * decode rows at N, N+1, ... with KV lengths K+1, ... (the last
     * sampled token is never fed). */
    assert_int_equal(r.n_rows, K + MAXT - 1);
    for (uint32_t i = 0; i < r.n_rows; i++) {
        assert_int_equal(r.kv_len[i], (int32_t)i + 1);
        if (i > 0)
            assert_true(r.pos[i] > r.pos[i - 1]);
    }
    assert_int_equal(r.pos[K - 1], N - 1);
    for (uint32_t t = 0; t + 1 < MAXT; t++)
        assert_int_equal(r.pos[K + t], (int32_t)(N + t));
    run_close(&r);
}

static void
test_cancel_and_preempt_free_both_pools(void **state)
{
    (void)state;
    enum { N = 400 };
    int32_t prompt[N];
    make_prompt(prompt, N, 3);
    static run_t r;
    run_open(&r, 28, 64);
    model_spec_policy_t spec = {.on = true, .keep_ratio = 0.5f};
    submit(&r, 0, prompt, N, &spec, 0);
    /* A few draft steps: the draft pool holds the whole draft. */
    for (int i = 0; i < 3; i++)
        assert_true(sched_step(r.s) > 0);
    kv_pool_t *dp = sched_draft_pool(r.s);
    assert_true(kv_pool_n_free(dp) < kv_pool_cfg(dp)->n_blocks);
    assert_int_equal(sched_cancel(r.s, 0), 0);
    run_idle(&r);
    assert_int_equal(r.finish[0], SCHED_FINISH_CANCELLED);
    assert_int_equal(kv_pool_n_free(dp), kv_pool_cfg(dp)->n_blocks);

    /* Two speculative and two full requests in a main pool too small for
     * all: preemption in every phase, every request completes. */
    for (uint64_t id = 0; id < 4; id++) {
        make_prompt(prompt, 300, 10 + (uint32_t)id);
        submit(&r, id, prompt, 300, id % 2 ? &spec : NULL, 0);
        r.n_tokens[id] = 0;
    }
    run_idle(&r);
    uint32_t preempted = 0;
    for (uint64_t id = 0; id < 4; id++) {
        assert_int_equal(r.finish[id], SCHED_FINISH_LENGTH);
        assert_int_equal(r.n_tokens[id], MAXT);
        preempted += r.usage[id].preemptions;
    }
    assert_true(preempted > 0);
    /* A request that could never fit is refused at once. */
    int32_t *big = calloc(1000, sizeof *big);
    submit(&r, 3, big, 1000, &spec, KVS_ENOSPC);
    free(big);
    run_close(&r);
}

/* Speculative decoding by the draft model after a speculative prefill
 * drafts on the prompt KV the draft computed (with the main model as its
 * own draft and every prompt token kept, greedy proposals hold); in a main
 * pool too small for all and a draft pool both phases share, outputs are
 * those without it. */
static void
test_draft_decoding_after_spec_prefill(void **state)
{
    (void)state;
    enum { N = 200 };
    int32_t prompt[N + 100];
    make_prompt(prompt, N, 5);
    static run_t r, a, b;
    run_open_draft(&r, 64, 64, main_path, 4);
    model_spec_policy_t all = {.on = true, .keep_ratio = 1.0f};
    submit(&r, 0, prompt, N, &all, 0);
    run_idle(&r);
    assert_int_equal(r.n_tokens[0], MAXT);
    assert_true(r.usage[0].spec_draft_tokens >= 4);
    assert_int_equal(r.usage[0].spec_accepted_tokens, r.usage[0].spec_draft_tokens);
    run_close(&r);

    model_spec_policy_t spec = {.on = true, .keep_ratio = 0.5f};
    run_t *runs[2] = {&a, &b};
    for (int k = 0; k < 2; k++) {
        run_open_draft(runs[k], 28, 64, draft_path, k ? 4 : 0);
        for (uint64_t id = 0; id < 4; id++) {
            make_prompt(prompt, 270 + 10 * (uint32_t)id, 20 + (uint32_t)id);
            submit(runs[k], id, prompt, 270 + 10 * (uint32_t)id, id % 2 ? &spec : NULL, 0);
        }
        run_idle(runs[k]);
    }
    uint32_t preempted = 0, proposed = 0;
    for (uint64_t id = 0; id < 4; id++) {
        assert_int_equal(a.n_tokens[id], MAXT);
        assert_memory_equal(a.tokens[id], b.tokens[id], MAXT * sizeof(int32_t));
        preempted += b.usage[id].preemptions;
        proposed += b.usage[id].spec_draft_tokens;
    }
    assert_true(preempted > 0 && proposed > 0);
    run_close(&a);
    run_close(&b);
}

/* Two decoding requests of prompts p0 and p1 (d tokens) on an engine of
 * 32 blocks per pool, three steps in: prefilled and decoding. */
static void
two_decoding(run_t *r, const int32_t *p0, const int32_t *p1, uint32_t d, uint32_t spec_k)
{
    run_open_draft(r, 32, 512, draft_path, spec_k);
    submit(r, 0, p0, d, NULL, 0);
    submit(r, 1, p1, d, NULL, 0);
    for (int i = 0; i < 3; i++) {
        assert_true(sched_step(r->s) > 0);
        run_collect(r);
    }
}

/* A speculative prefill that needs the draft pool takes it from decoding
 * requests' draft KV one request at a time: after its admission another
 * request still holds draft KV, and every output is plain decoding's. */
static void
test_spec_prefill_takes_draft_kv_as_needed(void **state)
{
    (void)state;
    enum { D = 120, N = 300 };
    int32_t p0[D], p1[D], p2[N];
    make_prompt(p0, D, 31);
    make_prompt(p1, D, 32);
    make_prompt(p2, N, 33);
    static run_t r, plain;
    /* Both now hold draft KV for their proposals, 8 blocks each. */
    two_decoding(&r, p0, p1, D, 4);
    kv_pool_t *dp = sched_draft_pool(r.s);
    uint32_t total = kv_pool_cfg(dp)->n_blocks, held = total - kv_pool_n_free(dp);
    assert_true(held >= 16 && kv_pool_n_free(dp) < 20);
    /* Its draft KV: the prompt and 7 look-ahead tokens, 20 blocks. */
    model_spec_policy_t spec = {.on = true, .keep_ratio = 0.5f};
    submit(&r, 2, p2, N, &spec, 0);
    assert_true(sched_step(r.s) > 0);
    run_collect(&r);
    uint32_t used = total - kv_pool_n_free(dp);
    print_message("draft pool: %u of %u blocks held before, %u after the admission\n", held, total,
                  used);
    assert_true(used > 20); /* 20 its own, and one decoder's kept */
    run_idle(&r);
    /* The same three without speculative decoding. */
    two_decoding(&plain, p0, p1, D, 0);
    submit(&plain, 2, p2, N, &spec, 0);
    run_idle(&plain);
    for (uint64_t id = 0; id < 3; id++) {
        assert_int_equal(r.n_tokens[id], MAXT);
        assert_memory_equal(r.tokens[id], plain.tokens[id], MAXT * sizeof(int32_t));
    }
    run_close(&r);
    run_close(&plain);
}

/* n samples of a speculative prefill: the draft runs once, the samples
 * fork the sparse prompt's KV (kept tokens at their positions) or, with
 * no sequence free, prefill the kept tokens again; either way sample i
 * draws what a request of its own with sched_sample_seed's seed draws. */
static void
test_samples_share_sparse_prefill(void **state)
{
    (void)state;
    enum { N = 300, S = 3 };
    int32_t prompt[N];
    make_prompt(prompt, N, 4);
    static run_t r;
    run_open(&r, 96, 96);
    model_spec_policy_t spec = {.on = true, .keep_ratio = 0.25f, .look_ahead = 4, .chunk = 32};
    static int32_t tok[8][S][MAXT];
    static uint32_t n_tok[8][S], n_fin[8][S];
    static sched_usage_t usage[8][S];
    /* 0..2 alone (seeds of samples 0..2) and 4 of three samples; then 3
     * (as 0) beside 5 and 6 of three each, more than the 4 sequences. */
    for (int phase = 0; phase < 2; phase++) {
        for (uint64_t id = phase ? 3 : 0; id < (phase ? 7u : 5u); id++) {
            bool many = id >= 4;
            sched_request_t q = {.id = id,
                                 .prompt = prompt,
                                 .n_prompt = N,
                                 .max_tokens = MAXT,
                                 .ignore_eos = true,
                                 .n = many ? S : 1,
                                 .spec = spec,
                                 .sampling = {.temperature = 0.8f,
                                              .top_p = 1.0f,
                                              .seed = many ? 21 : sched_sample_seed(21, id % 3)}};
            if (id == (phase ? 4u : 3u))
                continue;
            assert_int_equal(sched_submit(r.s, &q), 0);
        }
        for (int i = 0; i < 2000; i++) {
            int live = sched_step(r.s);
            assert_true(live >= 0);
            sched_event_t *ev;
            while ((ev = sched_poll(r.s)) != NULL) {
                uint64_t id = ev->req_id;
                uint32_t k = ev->index;
                assert_true(id < 8 && k < S);
                if (ev->kind == SCHED_EV_TOKEN) {
                    assert_true(n_tok[id][k] < MAXT);
                    tok[id][k][n_tok[id][k]++] = ev->token;
                } else {
                    n_fin[id][k]++;
                    usage[id][k] = ev->usage;
                }
                sched_event_free(ev);
            }
            if (live == 0)
                break;
        }
    }
    assert_memory_equal(tok[3][0], tok[0][0], sizeof tok[0][0]);
    for (uint64_t id = 4; id < 7; id++)
        for (uint32_t k = 0; k < S; k++) {
            assert_int_equal(n_fin[id][k], 1);
            assert_int_equal(n_tok[id][k], MAXT);
            assert_memory_equal(tok[id][k], tok[k][0], sizeof tok[0][0]);
            assert_int_equal(usage[id][k].kept_prompt_tokens, usage[0][0].kept_prompt_tokens);
        }
    run_close(&r);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_select),
        cmocka_unit_test(test_importance_reference),
        cmocka_unit_test(test_keep_all_equals_full),
        cmocka_unit_test(test_positions_after_sparse_prefill),
        cmocka_unit_test(test_cancel_and_preempt_free_both_pools),
        cmocka_unit_test(test_samples_share_sparse_prefill),
        cmocka_unit_test(test_draft_decoding_after_spec_prefill),
        cmocka_unit_test(test_spec_prefill_takes_draft_kv_as_needed),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
