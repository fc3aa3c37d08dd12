/*
 * tests/integration/test_attn_policies.c — sparse prefill policies through
 * the real forward pass (model/forward.c) on a random tiny model: the
 * settings that must equal dense do (a window covering the prompt; Delta
 * with gamma = 1; Delta whose window covers the prompt), a small window
 * really changes the result, Delta's dense tail makes the last prompt row
 * (the one sampled) exactly dense, and chunked prefill with a policy gives
 * the same result as one call when the window covers each chunk's keys.
 * Block-sparse (Quest bounds): top_k covering every block a query block can
 * pick is dense, in one call and in chunks; so is every row whose query
 * block keeps all its candidates while others choose; a small top_k changes the
 * result; chunks on block boundaries give the one-call result.
 * Quest at decode (decode_top_k): covering every earlier block is dense
 * decoding; a small one changes the logits and so does which blocks it
 * reads; rows decoded three to a call (a verification step) give the
 * logits of rows decoded one at a time; a prompt policy leaves decode rows
 * to decode_top_k; sequences decoding side by side under different
 * policies, a prompt among them, give the logits each gives alone.  The key summaries kept by block
 * id across calls give the logits of summaries taken at every call, and are taken again when a
 * block's content changes (blocks handed to another sequence, a block
 * reopened by a truncate).
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

#define N_PROMPT 300
#define TOL 1e-5

static char path[256];
static kern_backend_t *be;
static model_t *m;
static uint32_t n_vocab;
static bool g_reserve; /* prefill reserves its context's scratch first */

static int
setup(void **state)
{
    (void)state;
    const char *tmp = getenv("TMPDIR");
    snprintf(path, sizeof path, "%s/kvs_pol_XXXXXX", tmp ? tmp : "/tmp");
    int fd = mkstemp(path);
    if (fd < 0)
        return -1;
    close(fd);
    char err[256];
    kern_backend_cfg_t cfg = {.n_threads = 2};
    if (model_random_write("tiny", KERN_F32, 11, NULL, path, err, sizeof err) ||
        kern_backend_new("cpu", &cfg, &be) || model_load(path, be, &m, err, sizeof err))
        return -1;
    n_vocab = model_hparams(m)->n_vocab;
    return 0;
}

static int
teardown(void **state)
{
    (void)state;
    model_free(m);
    kern_backend_free(be);
    unlink(path);
    return 0;
}

#define DEC_ROWS 9

/* Under policy p, an N_PROMPT-token prompt prefilled in chunks of `chunk`
 * tokens; then, with per_call > 0, DEC_ROWS decoded rows whose tokens are
 * fixed (teacher forcing), per_call rows a forward pass, each with logits
 * (as a verification step asks).  logits: the prompt's last row, or the
 * decoded rows' [DEC_ROWS][n_vocab]. */
static bool g_no_store; /* the pool's KV without block_gen: summaries per call */
/* Prefill: logits of the first g_lead prompt rows instead of the last's. */
static uint32_t g_lead;
/* Tokens from position g_from[j] on take another pattern (g_seed[j]). */
static uint32_t g_seed[2];
static uint32_t g_from[2] = {UINT32_MAX, UINT32_MAX};

static int32_t
token_at(uint32_t i)
{
    uint32_t x = i * 37 + 5;
    for (int j = 0; j < 2; j++)
        x += i >= g_from[j] ? g_seed[j] : 0;
    return (int32_t)(x % 256);
}

/* Entries [from, total) of table t: prompt rows (kv_len <= n_prompt) in
 * chunks of `chunk`, then per_call rows a pass, each with logits (as a
 * verification step asks), row r's at logits[r - n_prompt]; or, with
 * per_call 0, only the prompt's last row's, at logits. */
static void
steps(model_ctx_t *ctx, const kv_pool_t *pool, kv_table_t *t, const model_attn_policy_t *p,
      uint32_t n_prompt, uint32_t from, uint32_t total, uint32_t chunk, uint32_t per_call,
      float *logits)
{
    sched_batch_t *sb;
    assert_int_equal(sched_batch_new(&sb), 0);
    kern_kv_t kv = *kv_pool_kv(pool);
    if (g_no_store)
        kv.block_gen = NULL;
    int32_t *toks = malloc(total * sizeof *toks);
    assert_non_null(toks);
    for (uint32_t i = 0; i < total; i++)
        toks[i] = token_at(i);
    for (uint32_t done = from; done < total;) {
        bool pre = done < n_prompt;
        uint32_t k = pre ? n_prompt - done : total - done;
        k = k < (pre ? chunk : per_call) ? k : (pre ? chunk : per_call);
        sched_seq_step_t st = {.table = t,
                               .tokens = toks + done,
                               .n_tokens = k,
                               .want_logits = done + k == n_prompt && per_call == 0,
                               .lead_logits = pre ? (done < g_lead ? g_lead - done : 0) : k,
                               .policy = p,
                               .n_prompt = n_prompt};
        const model_batch_t *mb;
        assert_int_equal(sched_batch_build(sb, &st, 1, &mb), 0);
        float *out = pre ? logits + (size_t)(done < g_lead ? done : 0) * n_vocab
                         : logits + (size_t)(done - n_prompt) * n_vocab;
        assert_int_equal(model_forward(ctx, &kv, mb, out), 0);
        done += k;
    }
    free(toks);
    sched_batch_free(sb);
}

static kv_pool_t *
new_pool(uint32_t n_tokens)
{
    const model_hparams_t *hp = model_hparams(m);
    kv_pool_cfg_t pc = {.n_layers = hp->n_layer,
                        .n_kv_heads = hp->n_head_kv,
                        .head_dim = hp->head_dim,
                        .block_tokens = 16,
                        .n_blocks = n_tokens / 16 + 2,
                        .dtype = KERN_F32};
    kv_pool_t *pool;
    assert_int_equal(kv_pool_new(&pc, be, &pool), 0);
    return pool;
}

static void
run_n(const model_attn_policy_t *p, uint32_t n_prompt, uint32_t chunk, uint32_t per_call,
      float *logits)
{
    kv_pool_t *pool = new_pool(n_prompt + DEC_ROWS);
    kv_table_t *t;
    model_ctx_t *ctx;
    assert_int_equal(kv_table_new(pool, &t), 0);
    assert_int_equal(model_ctx_new(m, n_prompt, g_lead > DEC_ROWS ? g_lead : DEC_ROWS, &ctx), 0);
    if (g_reserve)
        assert_int_equal(model_ctx_reserve(ctx, n_prompt, 16, kv_pool_kv(pool)), 0);
    steps(ctx, pool, t, p, n_prompt, 0, n_prompt + (per_call ? DEC_ROWS : 0), chunk, per_call,
          logits);
    if (g_reserve)
        assert_int_equal(model_ctx_late_grows(ctx), 0);
    model_ctx_free(ctx);
    kv_table_free(t);
    kv_pool_free(pool);
}

static void
prefill(const model_attn_policy_t *p, uint32_t chunk, float *logits)
{
    run_n(p, N_PROMPT, chunk, 0, logits);
}

static void
decode(const model_attn_policy_t *p, uint32_t per_call, float *logits)
{
    run_n(p, N_PROMPT, N_PROMPT, per_call, logits);
}

static double
rel_err(const float *a, const float *b)
{
    double mx = 1e-30, e = 0;
    for (uint32_t i = 0; i < n_vocab; i++)
        mx = fabs(a[i]) > mx ? fabs(a[i]) : mx;
    for (uint32_t i = 0; i < n_vocab; i++)
        e = fabs((double)a[i] - b[i]) > e ? fabs((double)a[i] - b[i]) : e;
    return e / mx;
}

static void
test_degenerate_equal_dense(void **state)
{
    (void)state;
    float *dense = malloc(n_vocab * sizeof(float)), *got = malloc(n_vocab * sizeof(float));
    model_attn_policy_t dn = {0};
    prefill(&dn, N_PROMPT, dense);
    /* A window covering every key. */
    model_attn_policy_t sw = {.kind = MODEL_ATTN_SINK_WINDOW, .sinks = 4, .window = N_PROMPT};
    prefill(&sw, N_PROMPT, got);
    assert_true(rel_err(dense, got) < TOL);
    /* Delta with gamma 1: every row dense. */
    model_attn_policy_t d1 = {.kind = MODEL_ATTN_DELTA, .sinks = 4, .window = 8, .gamma = 1};
    prefill(&d1, N_PROMPT, got);
    assert_true(rel_err(dense, got) < TOL);
    /* Delta over a covering window: the sparse pass is already dense. */
    model_attn_policy_t dw = {
        .kind = MODEL_ATTN_DELTA, .sinks = 4, .window = N_PROMPT, .gamma = 16, .no_tail = true};
    prefill(&dw, N_PROMPT, got);
    assert_true(rel_err(dense, got) < TOL);
    free(dense);
    free(got);
}

static void
test_sparse_changes_and_delta_repairs(void **state)
{
    (void)state;
    float *dense = malloc(n_vocab * sizeof(float)), *sw = malloc(n_vocab * sizeof(float));
    float *dl = malloc(n_vocab * sizeof(float));
    model_attn_policy_t dn = {0};
    prefill(&dn, N_PROMPT, dense);
    model_attn_policy_t s = {.kind = MODEL_ATTN_SINK_WINDOW, .sinks = 4, .window = 16};
    prefill(&s, N_PROMPT, sw);
    double e_sw = rel_err(dense, sw);
    assert_true(e_sw > 1e-3); /* the pattern is really applied */
    /* Delta (gamma 64, tail 172 rows): the last row is in the dense tail,
     * but earlier layers' sparse rows still shape its keys. */
    model_attn_policy_t d = {.kind = MODEL_ATTN_DELTA, .sinks = 4, .window = 16, .gamma = 64};
    prefill(&d, N_PROMPT, dl);
    double e_dl = rel_err(dense, dl);
    print_message("last-row logits vs dense: sink-window %.3g, delta %.3g\n", e_sw, e_dl);
    assert_true(e_dl < e_sw);
    /* Sink-window with a dense last row sits between. */
    model_attn_policy_t ld = {
        .kind = MODEL_ATTN_SINK_WINDOW, .sinks = 4, .window = 16, .last_dense = true};
    prefill(&ld, N_PROMPT, sw);
    assert_true(rel_err(dense, sw) < e_sw);
    free(dense);
    free(sw);
    free(dl);
}

static void
test_chunked_prefill(void **state)
{
    (void)state;
    /* Sink-window over chunks: each chunk's rows keep their absolute causal
     * limits, so chunking changes nothing. */
    float *one = malloc(n_vocab * sizeof(float)), *chunked = malloc(n_vocab * sizeof(float));
    model_attn_policy_t s = {.kind = MODEL_ATTN_SINK_WINDOW, .sinks = 4, .window = 32};
    prefill(&s, N_PROMPT, one);
    prefill(&s, 48, chunked);
    assert_true(rel_err(one, chunked) < TOL);
    /* Delta in chunks runs (blocks and tail per call) and stays close. */
    model_attn_policy_t d = {.kind = MODEL_ATTN_DELTA, .sinks = 4, .window = 32, .gamma = 16};
    prefill(&d, 100, chunked);
    for (uint32_t i = 0; i < n_vocab; i++)
        assert_true(isfinite(chunked[i]));
    free(one);
    free(chunked);
}

/* Blocks of 16 (prefill's pool): a 300-token prompt has 19, so no query
 * block has more than 18 candidates below its own block. */
#define BS_BLOCKS ((N_PROMPT + 15) / 16)

static void
test_block_sparse_degenerate(void **state)
{
    (void)state;
    float *dense = malloc(n_vocab * sizeof(float)), *got = malloc(n_vocab * sizeof(float));
    model_attn_policy_t dn = {0};
    prefill(&dn, N_PROMPT, dense);
    const uint32_t ks[] = {BS_BLOCKS - 1, BS_BLOCKS, 1000};
    for (size_t i = 0; i < sizeof ks / sizeof ks[0]; i++) {
        model_attn_policy_t bs = {
            .kind = MODEL_ATTN_BLOCK_SPARSE, .sinks = 4, .window = 16, .top_k = ks[i]};
        assert_int_equal(model_attn_policy_check(&bs), 0);
        prefill(&bs, N_PROMPT, got);
        assert_true(rel_err(dense, got) < TOL);
        /* Chunks see fewer blocks, so they are dense too. */
        prefill(&bs, 100, got);
        assert_true(rel_err(dense, got) < TOL);
    }
    free(dense);
    free(got);
}

/* Block-sparse where blocks are really chosen (top_k 8 of up to 18
 * candidates, so the scores and the mask run) and must still equal dense
 * row by row: query block q (rows 16q .. 16q + 15) picks from blocks 0 ..
 * q - 1 (the 4 sinks are kept apart, not block 0 whole; block q holds the
 * window), so up to q = 8 it keeps every candidate, and causal rows see
 * nothing of later ones: rows below 144 attend densely in every layer;
 * later rows really differ. */
static void
test_block_sparse_rows_dense(void **state)
{
    (void)state;
    const uint32_t first_sparse = (8 + 1) * 16;
    size_t sz = (size_t)N_PROMPT * n_vocab * sizeof(float);
    float *dense = malloc(sz), *got = malloc(sz);
    g_lead = N_PROMPT;
    model_attn_policy_t dn = {0};
    prefill(&dn, N_PROMPT, dense);
    model_attn_policy_t bs = {
        .kind = MODEL_ATTN_BLOCK_SPARSE, .sinks = 4, .window = 16, .top_k = 8};
    prefill(&bs, N_PROMPT, got);
    double below = 0, past = 0;
    for (uint32_t r = 0; r < N_PROMPT; r++) {
        double e = rel_err(dense + (size_t)r * n_vocab, got + (size_t)r * n_vocab);
        if (r < first_sparse)
            below = e > below ? e : below;
        else
            past = e > past ? e : past;
    }
    print_message("block-sparse top 8 vs dense, rows below %u: %.3g, past: %.3g\n", first_sparse,
                  below, past);
    assert_true(below < TOL);
    assert_true(past > 1e-3);
    g_lead = 0;
    free(dense);
    free(got);
}

static void
test_block_sparse_changes(void **state)
{
    (void)state;
    float *dense = malloc(n_vocab * sizeof(float)), *bs = malloc(n_vocab * sizeof(float));
    float *sw = malloc(n_vocab * sizeof(float)), *chunked = malloc(n_vocab * sizeof(float));
    model_attn_policy_t dn = {0};
    prefill(&dn, N_PROMPT, dense);
    model_attn_policy_t s = {.kind = MODEL_ATTN_SINK_WINDOW, .sinks = 4, .window = 16};
    prefill(&s, N_PROMPT, sw);
    model_attn_policy_t p = {.kind = MODEL_ATTN_BLOCK_SPARSE, .sinks = 4, .window = 16, .top_k = 2};
    prefill(&p, N_PROMPT, bs);
    double e_bs = rel_err(dense, bs), e_sw = rel_err(dense, sw), e_bs_sw = rel_err(sw, bs);
    print_message("last-row logits vs dense: block-sparse(top 2) %.3g, sink-window %.3g; "
                  "block-sparse vs sink-window %.3g\n",
                  e_bs, e_sw, e_bs_sw);
    assert_true(e_bs > 1e-3);    /* blocks are really left out */
    assert_true(e_bs_sw > 1e-3); /* and the picked ones are really added */
    /* Chunks of 48 start on block boundaries: the same query blocks, the
     * same candidates, the same choice. */
    prefill(&p, 48, chunked);
    assert_true(rel_err(bs, chunked) < TOL);
    /* Chunks of 100 straddle blocks; they run and stay finite. */
    prefill(&p, 100, chunked);
    for (uint32_t i = 0; i < n_vocab; i++)
        assert_true(isfinite(chunked[i]));
    /* A prompt longer than one attention call of block-sparse rows (4,096:
     * the mask is reused per call) gives what chunks within one call do. */
    run_n(&p, 4200, 4200, 0, bs);
    run_n(&p, 4200, 1024, 0, chunked);
    print_message("4,200 tokens, one call vs chunks of 1,024: %.3g\n", rel_err(bs, chunked));
    assert_true(rel_err(bs, chunked) < TOL);
    free(dense);
    free(bs);
    free(sw);
    free(chunked);
}

/* Scratch reserved for the longest context serves every Delta and
 * block-sparse call, in one call and in chunks, without growing, and
 * gives the same logits as scratch grown on first use. */
/* The largest relative error over the DEC_ROWS rows' logits. */
static double
rows_err(const float *a, const float *b)
{
    double e = 0;
    for (uint32_t r = 0; r < DEC_ROWS; r++) {
        double x = rel_err(a + (size_t)r * n_vocab, b + (size_t)r * n_vocab);
        e = x > e ? x : e;
    }
    return e;
}

static void
test_quest_decode(void **state)
{
    (void)state;
    size_t sz = (size_t)DEC_ROWS * n_vocab * sizeof(float);
    float *dense = malloc(sz), *got = malloc(sz), *rows3 = malloc(sz);
    model_attn_policy_t dn = {0};
    decode(&dn, 1, dense);
    /* A row at position L picks among the (L - 1) / 16 blocks before its
     * own: 18 or 19 here.  Covering them is dense decoding. */
    const uint32_t ks[] = {19, 1000};
    for (size_t i = 0; i < 2; i++) {
        model_attn_policy_t q = {.decode_top_k = ks[i]};
        assert_int_equal(model_attn_policy_check(&q), 0);
        decode(&q, 1, got);
        assert_true(rows_err(dense, got) < TOL);
        decode(&q, 3, got);
        assert_true(rows_err(dense, got) < TOL);
    }
    /* Two blocks and the row's own: the result really changes, and three
     * rows to a call choose as each row alone does. */
    model_attn_policy_t q = {.decode_top_k = 2};
    decode(&q, 1, got);
    double e2 = rows_err(dense, got);
    decode(&q, 3, rows3);
    double e3 = rows_err(got, rows3);
    model_attn_policy_t q1 = {.decode_top_k = 1};
    decode(&q1, 1, rows3);
    double e12 = rows_err(got, rows3);
    print_message("decode logits: top 2 vs dense %.3g, top 2 vs top 1 %.3g, 3 rows a call vs 1 "
                  "%.3g\n",
                  e2, e12, e3);
    assert_true(e2 > 1e-3);
    assert_true(e12 > 1e-3); /* the chosen blocks are really read */
    assert_true(e3 < TOL);
    /* With the prefill sparse too, decode rows still follow decode_top_k
     * alone: a prompt policy covering every key leaves dense prefill. */
    model_attn_policy_t sw = {.kind = MODEL_ATTN_SINK_WINDOW,
                              .sinks = 4,
                              .window = N_PROMPT + DEC_ROWS,
                              .decode_top_k = 2};
    decode(&sw, 1, rows3);
    assert_true(rows_err(got, rows3) < TOL);
    /* The prompt's last rows and the decode rows in one call: the decode
     * rows still choose as rows decoded one at a time. */
    const uint32_t tail = 5, total = N_PROMPT + DEC_ROWS;
    kv_pool_t *pool = new_pool(total);
    kv_table_t *t;
    model_ctx_t *ctx;
    sched_batch_t *sb;
    int32_t toks[N_PROMPT + DEC_ROWS];
    float *mixed = malloc((size_t)(tail + DEC_ROWS) * n_vocab * sizeof(float));
    assert_non_null(mixed);
    for (uint32_t i = 0; i < total; i++)
        toks[i] = token_at(i);
    assert_int_equal(kv_table_new(pool, &t), 0);
    assert_int_equal(model_ctx_new(m, N_PROMPT, tail + DEC_ROWS, &ctx), 0);
    assert_int_equal(sched_batch_new(&sb), 0);
    const model_batch_t *mb;
    sched_seq_step_t st = {.table = t,
                           .tokens = toks,
                           .n_tokens = N_PROMPT - tail,
                           .policy = &q,
                           .n_prompt = N_PROMPT};
    assert_int_equal(sched_batch_build(sb, &st, 1, &mb), 0);
    assert_int_equal(model_forward(ctx, kv_pool_kv(pool), mb, mixed), 0);
    st.tokens = toks + N_PROMPT - tail;
    st.n_tokens = st.lead_logits = tail + DEC_ROWS;
    assert_int_equal(sched_batch_build(sb, &st, 1, &mb), 0);
    assert_int_equal(model_forward(ctx, kv_pool_kv(pool), mb, mixed), 0);
    assert_true(rows_err(got, mixed + (size_t)tail * n_vocab) < TOL);
    sched_batch_free(sb);
    model_ctx_free(ctx);
    kv_table_free(t);
    kv_pool_free(pool);
    free(mixed);
    free(dense);
    free(got);
    free(rows3);
}

/* Sequences decoding side by side: Quest ones with their own top_k, a
 * dense one, one whose prompt was sparse, and a verification step's
 * rows, one attention call for those that only decode (decode_run), a
 * prompt chunk between them in one step: each sequence's logits are those
 * it has decoded alone. */
#define MIX 6 /* the last only prefills */
#define MIX_DEC (MIX - 1)
static const uint32_t mix_prompt[MIX] = {300, 260, 333, 290, 380, 200};
static const model_attn_policy_t mix_pol[MIX] = {
    {.decode_top_k = 2},
    {0},
    {.decode_top_k = 3},
    {.kind = MODEL_ATTN_SINK_WINDOW, .sinks = 4, .window = 32, .decode_top_k = 2},
    {.decode_top_k = 1000}, /* keeps every block beside rows that choose */
    {.kind = MODEL_ATTN_BLOCK_SPARSE, .sinks = 4, .window = 16, .top_k = 2},
};

static int32_t
mix_token(uint32_t j, uint32_t i)
{
    return (int32_t)((i * 37 + 5 + 11 * j + (i * i) % 7) % 256);
}

/* Sequence j's prompt (one call) and its DEC_ROWS rows, `rows` a call,
 * alone: logits [DEC_ROWS][n_vocab]. */
static void
mix_alone(uint32_t j, uint32_t rows, float *logits)
{
    const uint32_t np = mix_prompt[j], total = np + DEC_ROWS;
    kv_pool_t *pool = new_pool(total);
    kv_table_t *t;
    model_ctx_t *ctx;
    sched_batch_t *sb;
    int32_t toks[400];
    for (uint32_t i = 0; i < total; i++)
        toks[i] = mix_token(j, i);
    assert_int_equal(kv_table_new(pool, &t), 0);
    assert_int_equal(model_ctx_new(m, np, DEC_ROWS, &ctx), 0);
    assert_int_equal(sched_batch_new(&sb), 0);
    for (uint32_t done = 0; done < total;) {
        const bool pre = done < np;
        const uint32_t k = pre ? np : done + rows < total ? rows : total - done;
        sched_seq_step_t st = {.table = t,
                               .tokens = toks + done,
                               .n_tokens = k,
                               .want_logits = pre,
                               .lead_logits = pre ? 0 : k,
                               .policy = &mix_pol[j],
                               .n_prompt = np};
        const model_batch_t *mb;
        assert_int_equal(sched_batch_build(sb, &st, 1, &mb), 0);
        float *out = pre ? logits : logits + (size_t)(done - np) * n_vocab;
        assert_int_equal(model_forward(ctx, kv_pool_kv(pool), mb, out), 0);
        done += k;
    }
    sched_batch_free(sb);
    model_ctx_free(ctx);
    kv_table_free(t);
    kv_pool_free(pool);
}

/* The decoding sequences prefilled together, then decoded together, 2 at
 * a time for sequence 2, with the last sequence's prompt between 1 and 2
 * in the first step; with `store` or a pool view without block_gen (the
 * summaries taken a row at a time); against their rows decoded alone. */
static void
mix_batched(bool store, const float *alone, float *got, float *step)
{
    const size_t sz = (size_t)DEC_ROWS * n_vocab;
    kv_pool_t *pool = new_pool(2400);
    kv_table_t *t[MIX];
    model_ctx_t *ctx;
    sched_batch_t *sb;
    static int32_t toks[MIX][400];
    for (uint32_t j = 0; j < MIX; j++) {
        for (uint32_t i = 0; i < mix_prompt[j] + DEC_ROWS; i++)
            toks[j][i] = mix_token(j, i);
        assert_int_equal(kv_table_new(pool, &t[j]), 0);
    }
    assert_int_equal(model_ctx_new(m, 2048, 16, &ctx), 0);
    kern_kv_t kv = *kv_pool_kv(pool);
    if (!store)
        kv.block_gen = NULL;
    assert_int_equal(sched_batch_new(&sb), 0);
    sched_seq_step_t st[MIX];
    const model_batch_t *mb;
    for (uint32_t j = 0; j < MIX_DEC; j++)
        st[j] = (sched_seq_step_t){.table = t[j],
                                   .tokens = toks[j],
                                   .n_tokens = mix_prompt[j],
                                   .want_logits = true,
                                   .policy = &mix_pol[j],
                                   .n_prompt = mix_prompt[j]};
    assert_int_equal(sched_batch_build(sb, st, MIX_DEC, &mb), 0);
    assert_int_equal(model_forward(ctx, &kv, mb, step), 0);
    uint32_t done[MIX_DEC] = {0};
    for (uint32_t it = 0; done[0] < DEC_ROWS; it++) {
        uint32_t n = 0, want[MIX];
        for (uint32_t j = 0; j < MIX_DEC; j++) {
            if (j == 2 && it == 0) { /* the prompt between two runs */
                st[n++] = (sched_seq_step_t){.table = t[MIX_DEC],
                                             .tokens = toks[MIX_DEC],
                                             .n_tokens = mix_prompt[MIX_DEC],
                                             .want_logits = true,
                                             .policy = &mix_pol[MIX_DEC],
                                             .n_prompt = mix_prompt[MIX_DEC]};
            }
            uint32_t k = j == 2 ? 2 : 1;
            k = done[j] + k <= DEC_ROWS ? k : DEC_ROWS - done[j];
            want[j] = k;
            if (k == 0)
                continue;
            st[n++] = (sched_seq_step_t){.table = t[j],
                                         .tokens = toks[j] + mix_prompt[j] + done[j],
                                         .n_tokens = k,
                                         .lead_logits = k,
                                         .policy = &mix_pol[j],
                                         .n_prompt = mix_prompt[j]};
        }
        assert_int_equal(sched_batch_build(sb, st, n, &mb), 0);
        assert_int_equal(model_forward(ctx, &kv, mb, step), 0);
        const float *row = step;
        for (uint32_t j = 0; j < MIX_DEC; j++) {
            if (j == 2 && it == 0)
                row += n_vocab; /* the prompt's last row */
            for (uint32_t r = 0; r < want[j]; r++, row += n_vocab)
                memcpy(got + j * sz + (size_t)(done[j] + r) * n_vocab, row,
                       n_vocab * sizeof(float));
            done[j] += want[j];
        }
    }
    for (uint32_t j = 0; j < MIX_DEC; j++) {
        double e = rows_err(alone + j * sz, got + j * sz);
        print_message("sequence %u (%s, decode top %u%s): batched vs alone %.3g\n", j,
                      mix_pol[j].kind == MODEL_ATTN_DENSE ? "dense prompt" : "sparse prompt",
                      mix_pol[j].decode_top_k, store ? "" : ", no store", e);
        assert_true(e < TOL);
    }
    sched_batch_free(sb);
    model_ctx_free(ctx);
    for (uint32_t j = 0; j < MIX; j++)
        kv_table_free(t[j]);
    kv_pool_free(pool);
}

static void
test_quest_batch(void **state)
{
    (void)state;
    const size_t sz = (size_t)DEC_ROWS * n_vocab;
    float *alone = malloc(MIX * sz * sizeof(float)), *got = malloc(MIX * sz * sizeof(float));
    float *step = malloc((size_t)8 * n_vocab * sizeof(float));
    assert_true(alone && got && step);
    for (uint32_t j = 0; j < MIX_DEC; j++)
        mix_alone(j, 1, alone + j * sz);

    mix_batched(true, alone, got, step);
    mix_batched(false, alone, got, step);
    free(alone);
    free(got);
    free(step);
}

/* Quest decoding one and three rows a pass with the summary store, and
 * with summaries taken at every call: bit for bit the same. */
static void
store_equals_per_call(void)
{
    const size_t sz = (size_t)DEC_ROWS * n_vocab * sizeof(float);
    float *a = malloc(sz), *b = malloc(sz);
    assert_true(a && b);
    const model_attn_policy_t qd = {.decode_top_k = 2};
    for (uint32_t per_call = 1; per_call <= 3; per_call += 2) {
        decode(&qd, per_call, a);
        g_no_store = true;
        decode(&qd, per_call, b);
        g_no_store = false;
        assert_memory_equal(a, b, sz);
    }
    free(a);
    free(b);
}

/* An 8-layer model, where layers 2 to 6 choose from one plan a step
 * (model/forward.c: quest_plan) and reuse its lists and summary updates,
 * and the last layer lists its own: the store against summaries per call
 * bit for bit, and batched sequences against each alone
 * (test_quest_batch). */
static void
test_quest_deep(void **state)
{
    (void)state;
    char dpath[256], err[256];
    const char *tmp = getenv("TMPDIR");
    snprintf(dpath, sizeof dpath, "%s/kvs_deep_XXXXXX", tmp ? tmp : "/tmp");
    int fd = mkstemp(dpath);
    assert_true(fd >= 0);
    close(fd);
    model_t *shallow = m, *deep;
    assert_int_equal(model_random_write("tiny-deep", KERN_F32, 12, NULL, dpath, err, sizeof err),
                     0);
    assert_int_equal(model_load(dpath, be, &deep, err, sizeof err), 0);
    assert_int_equal(model_hparams(deep)->n_layer, 8);
    m = deep;
    store_equals_per_call();
    test_quest_batch(state);
    m = shallow;
    model_free(deep);
    unlink(dpath);
}

/* Quest's key summaries kept by block id across calls (model/forward.c's
 * store) give the logits of summaries taken at every call, and follow a
 * block whose content changes: blocks of a finished sequence handed to
 * another, and a full block reopened by a truncate and filled anew. */
static void
test_summary_store(void **state)
{
    (void)state;
    size_t sz = (size_t)DEC_ROWS * n_vocab * sizeof(float);
    float *a = malloc(sz), *b = malloc(sz);
    const model_attn_policy_t bsp = {
        .kind = MODEL_ATTN_BLOCK_SPARSE, .sinks = 4, .window = 16, .top_k = 2};
    const model_attn_policy_t qd = {.decode_top_k = 2};
    store_equals_per_call();
    prefill(&bsp, 100, a);
    g_no_store = true;
    prefill(&bsp, 100, b);
    g_no_store = false;
    assert_memory_equal(a, b, n_vocab * sizeof(float));

    /* One context and pool for two sequences, the second on the blocks of
     * the first (freed last, handed out first) with other tokens from
     * position 24 on: its logits are those of a context of its own. */
    const uint32_t total = N_PROMPT + DEC_ROWS;
    kv_pool_t *pool = new_pool(total);
    model_ctx_t *ctx;
    kv_table_t *t;
    assert_int_equal(model_ctx_new(m, N_PROMPT, DEC_ROWS, &ctx), 0);
    assert_int_equal(kv_table_new(pool, &t), 0);
    steps(ctx, pool, t, &qd, N_PROMPT, 0, total, N_PROMPT, 1, a);
    kv_table_free(t);
    g_seed[0] = 101;
    g_from[0] = 24;
    assert_int_equal(kv_table_new(pool, &t), 0);
    steps(ctx, pool, t, &qd, N_PROMPT, 0, total, N_PROMPT, 1, a);
    run_n(&qd, N_PROMPT, N_PROMPT, 1, b);
    assert_memory_equal(a, b, sz);

    /* Back to 257 entries: block 16 (entries 256 .. 271) was full and
     * summarised, and takes other tokens from 257 on. */
    assert_int_equal(kv_table_truncate(t, 257), 0);
    g_seed[1] = 55;
    g_from[1] = 257;
    steps(ctx, pool, t, &qd, N_PROMPT, 257, total, N_PROMPT, 1, a);
    run_n(&qd, N_PROMPT, N_PROMPT, 1, b);
    g_from[0] = g_from[1] = UINT32_MAX;
    /* Its prompt rows from 257 on ran as a chunk of their own: the
     * products round differently, but the choices are the same. */
    assert_true(rows_err(a, b) < TOL);
    kv_table_free(t);
    model_ctx_free(ctx);
    kv_pool_free(pool);
    free(a);
    free(b);
}

static void
test_reserved_scratch(void **state)
{
    (void)state;
    float *grown = malloc(n_vocab * sizeof(float)), *got = malloc(n_vocab * sizeof(float));
    const model_attn_policy_t pols[] = {
        {.kind = MODEL_ATTN_DELTA, .sinks = 4, .window = 16, .gamma = 8},
        {.kind = MODEL_ATTN_BLOCK_SPARSE, .sinks = 4, .window = 16, .top_k = 2},
    };
    const uint32_t chunks[] = {N_PROMPT, 100};
    for (size_t i = 0; i < 2; i++)
        for (size_t j = 0; j < 2; j++) {
            g_reserve = false;
            prefill(&pols[i], chunks[j], grown);
            g_reserve = true;
            prefill(&pols[i], chunks[j], got);
            g_reserve = false;
            assert_memory_equal(grown, got, n_vocab * sizeof(float));
        }

    /* Summaries for a view without block_gen are refused; taken after a
     * reservation that left them out, they are its one late growth. */
    kv_pool_t *pool = new_pool(N_PROMPT);
    kv_table_t *t;
    model_ctx_t *ctx;
    assert_int_equal(model_ctx_new(m, N_PROMPT, DEC_ROWS, &ctx), 0);
    kern_kv_t bare = *kv_pool_kv(pool);
    bare.block_gen = NULL;
    assert_int_equal(model_ctx_reserve(ctx, N_PROMPT, 16, &bare), KVS_EINVAL);
    assert_int_equal(model_ctx_reserve(ctx, N_PROMPT, 16, NULL), 0);
    assert_int_equal(kv_table_new(pool, &t), 0);
    steps(ctx, pool, t, &pols[1], N_PROMPT, 0, N_PROMPT, chunks[1], 0, got); /* as grown last */
    assert_int_equal(model_ctx_late_grows(ctx), 1);
    assert_memory_equal(grown, got, n_vocab * sizeof(float));
    kv_table_free(t);
    model_ctx_free(ctx);
    kv_pool_free(pool);
    free(grown);
    free(got);
}

static void
test_bad_policies(void **state)
{
    (void)state;
    model_attn_policy_t bad[] = {
        {.kind = MODEL_ATTN_SINK_WINDOW, .sinks = 4, .window = 0},
        {.kind = MODEL_ATTN_DELTA, .sinks = 4, .window = 8, .gamma = 0},
        {.kind = (model_attn_kind_t)9, .window = 8},
        {.kind = MODEL_ATTN_BLOCK_SPARSE, .sinks = 4, .window = 16, .top_k = 0},
        {.kind = MODEL_ATTN_BLOCK_SPARSE, .sinks = 4, .window = 0, .top_k = 8},
        {.kind = MODEL_ATTN_BLOCK_SPARSE, .window = 16, .top_k = 8, .no_tail = true},
        {.kind = MODEL_ATTN_BLOCK_SPARSE, .window = 16, .top_k = 8, .last_dense = true},
        /* Delta's tail already holds the last row. */
        {.kind = MODEL_ATTN_DELTA, .sinks = 4, .window = 8, .gamma = 16, .last_dense = true},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(model_attn_policy_check(&bad[i]), KVS_EINVAL);
    model_attn_policy_t ok = {.kind = MODEL_ATTN_DELTA,
                              .sinks = 4,
                              .window = 8,
                              .gamma = 16,
                              .no_tail = true,
                              .last_dense = true};
    assert_int_equal(model_attn_policy_check(&ok), 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_degenerate_equal_dense),
        cmocka_unit_test(test_sparse_changes_and_delta_repairs),
        cmocka_unit_test(test_chunked_prefill),
        cmocka_unit_test(test_block_sparse_degenerate),
        cmocka_unit_test(test_block_sparse_rows_dense),
        cmocka_unit_test(test_block_sparse_changes),
        cmocka_unit_test(test_bad_policies),
        cmocka_unit_test(test_reserved_scratch),
        cmocka_unit_test(test_quest_decode),
        cmocka_unit_test(test_quest_batch),
        cmocka_unit_test(test_summary_store),
        cmocka_unit_test(test_quest_deep),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
