/*
 * bench/bench_attn.c — what sparse prefill policies save: the time to
 * prefill N tokens (chunks of --chunk, as the engine schedules them) under
 * dense attention, sink-window, Delta Attention and block-sparse (Quest
 * bounds picking 8 blocks of 16 per query block), each as a ratio to dense
 * measured in the same run.  The attention share of dense prefill is
 * estimated as 1 - t(sink-window) / t(dense), since a 4+16 window leaves
 * almost no attention work.  --per-call-summaries adds block-sparse with its
 * key summaries taken at every call rather than kept by block across the
 * chunks (a pool view without block_gen).
 *
 * --decode D: then, after each length's prompt (prefilled under
 * sink-window, which is quick and leaves as much KV), the time per token of
 * D decode steps under dense decoding and under Quest (decode_top_k 8 and
 * 32 blocks of 16), each from the same prompt KV, as a ratio to dense;
 * and Quest top 8 again with the key summaries taken at every step rather
 * than kept by block across steps (a pool without block_gen).
 * --decode-only skips the prefill table.  --verify K decodes K + 1 rows a
 * call, as a speculative verification step does (ms per row).  --batch B
 * decodes B sequences a step, forks of the prompt's table (their prompt
 * blocks shared, as parallel samples' are), ms per row of the batch.
 *
 *   bench_attn --model F.gguf [--lengths 4096,16384,32768] [--chunk 2048]
 *              [--threads N] [--no-block-sparse | --per-call-summaries]
 *              [--decode D [--decode-only] [--verify K] [--batch B]] [--json FILE]
 */
#include "cache/kv.h"
#include "model/model.h"
#include "sched/sched.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LENGTHS 8
#define N_POLICIES 5

static const char *const names[N_POLICIES] = {"dense", "sink-window(4+16)", "delta(4+16, g64)",
                                              "block-sparse(4+16, 8)", "bs, per-call sums"};
static const char *const keys[N_POLICIES] = {"dense", "sink_window", "delta", "block_sparse",
                                             "block_sparse_per_call_summaries"};

#define MAX_BATCH 64

/* One sequence's KV pool, table, batch and context, room for n tokens in
 * calls of at most `chunk`, with its tokens; forks of the table decode
 * beside it (decode_ms). */
typedef struct seq {
    kv_pool_t *pool;
    kv_table_t *t, *fork[MAX_BATCH];
    sched_batch_t *sb;
    model_ctx_t *ctx;
    int32_t *toks;
    float *logits;
} seq_t;

static void
seq_close(seq_t *q)
{
    model_ctx_free(q->ctx);
    sched_batch_free(q->sb);
    for (int i = 0; i < MAX_BATCH; i++)
        kv_table_free(q->fork[i]);
    kv_table_free(q->t);
    kv_pool_free(q->pool);
    free(q->toks);
    free(q->logits);
}

static bool
seq_open(seq_t *q, model_t *m, uint32_t n, uint32_t chunk, uint32_t n_logits)
{
    const model_hparams_t *hp = model_hparams(m);
    kv_pool_cfg_t pc = {.n_layers = hp->n_layer,
                        .n_kv_heads = hp->n_head_kv,
                        .head_dim = hp->head_dim,
                        .block_tokens = 16,
                        .n_blocks = n / 16 + 2 + n_logits,
                        .dtype = KERN_F16};
    *q = (seq_t){.toks = malloc(n * sizeof *q->toks),
                 .logits = malloc((size_t)n_logits * hp->n_vocab * sizeof(float))};
    if (!q->toks || !q->logits || kv_pool_new(&pc, model_backend(m), &q->pool) ||
        kv_table_new(q->pool, &q->t) || sched_batch_new(&q->sb) ||
        model_ctx_new(m, chunk, n_logits, &q->ctx) ||
        model_ctx_reserve(q->ctx, n, pc.block_tokens, kv_pool_kv(q->pool))) {
        seq_close(q);
        return false;
    }
    for (uint32_t i = 0; i < n; i++)
        q->toks[i] = (int32_t)((i * 2654435761u >> 7) % 256);
    return true;
}

/* q's prompt of n tokens in calls of `chunk` under p, with the last
 * token's logits or none. */
static bool
seq_prefill(seq_t *q, uint32_t n, uint32_t chunk, const model_attn_policy_t *p, bool logits,
            bool store)
{
    kern_kv_t kv = *kv_pool_kv(q->pool);
    if (!store)
        kv.block_gen = NULL;
    for (uint32_t done = 0; done < n;) {
        uint32_t k = n - done < chunk ? n - done : chunk;
        sched_seq_step_t st = {.table = q->t,
                               .tokens = q->toks + done,
                               .n_tokens = k,
                               .want_logits = logits && done + k == n,
                               .policy = p,
                               .n_prompt = n};
        const model_batch_t *mb;
        if (sched_batch_build(q->sb, &st, 1, &mb) || model_forward(q->ctx, &kv, mb, q->logits))
            return false;
        done += k;
    }
    return true;
}

static double
prefill_ms(model_t *m, uint32_t n, uint32_t chunk, const model_attn_policy_t *p, bool store)
{
    seq_t q;
    if (!seq_open(&q, m, n, chunk, 1))
        return -1;
    uint64_t t0 = kvs_now_ns();
    double ms = seq_prefill(&q, n, chunk, p, true, store) ? (double)(kvs_now_ns() - t0) / 1e6 : -1;
    seq_close(&q);
    return ms;
}

#define N_DECODE 4
static const uint32_t dec_top[N_DECODE] = {0, 8, 32, 8}; /* 0: dense decoding */
static const bool dec_store[N_DECODE] = {true, true, true, false};

/* The batch's d decode tokens from entry n on, `rows` a step for each of
 * `batch` tables (q->t and its forks), under p. */
static bool
batch_run(seq_t *q, uint32_t batch, uint32_t n, uint32_t d, uint32_t rows,
          const model_attn_policy_t *p, bool store)
{
    kern_kv_t kv = *kv_pool_kv(q->pool);
    if (!store)
        kv.block_gen = NULL;
    sched_seq_step_t st[MAX_BATCH + 1];
    for (uint32_t done = n; done < n + d;) {
        uint32_t k = n + d - done < rows ? n + d - done : rows;
        for (uint32_t b = 0; b < batch; b++)
            st[b] = (sched_seq_step_t){.table = b ? q->fork[b - 1] : q->t,
                                       .tokens = q->toks + done,
                                       .n_tokens = k,
                                       .want_logits = true,
                                       .policy = p,
                                       .n_prompt = n};
        const model_batch_t *mb;
        if (sched_batch_build(q->sb, st, batch, &mb) || model_forward(q->ctx, &kv, mb, q->logits))
            return false;
        done += k;
    }
    return true;
}

/* Prefills n tokens (sink-window: quick), then per decode_top_k in dec_top
 * decodes d tokens from that prompt's KV, `rows` a call, in each of
 * `batch` sequences a step (forks of the prompt), and takes them back: ms
 * per row into ms[], or false. */
static bool
decode_ms(model_t *m, uint32_t n, uint32_t chunk, uint32_t d, uint32_t rows, uint32_t batch,
          double *ms)
{
    seq_t q;
    if (!seq_open(&q, m, n + d * batch, chunk, batch))
        return false;
    const model_attn_policy_t sw = {.kind = MODEL_ATTN_SINK_WINDOW, .sinks = 4, .window = 16};
    bool ok = seq_prefill(&q, n, chunk, &sw, false, true);
    for (uint32_t b = 1; ok && b < batch; b++)
        ok = kv_table_fork(q.t, &q.fork[b - 1]) == 0;
    for (int p = 0; ok && p < N_DECODE; p++) {
        const model_attn_policy_t dp = {.decode_top_k = dec_top[p]};
        uint64_t t0 = kvs_now_ns();
        ok = batch_run(&q, batch, n, d, rows, &dp, dec_store[p]);
        ms[p] = (double)(kvs_now_ns() - t0) / 1e6 / ((double)d * batch);
        ok = ok && kv_table_truncate(q.t, n) == 0;
        for (uint32_t b = 1; ok && b < batch; b++)
            ok = kv_table_truncate(q.fork[b - 1], n) == 0;
    }
    seq_close(&q);
    return ok;
}

int
main(int argc, char **argv)
{
    const char *model = NULL, *json = NULL;
    uint32_t lengths[MAX_LENGTHS] = {4096, 16384, 32768}, n_lengths = 3, chunk = 2048, threads = 0;
    uint32_t n_dec = 0, verify = 0, batch = 1;
    bool dec_only = false;
    static const struct option lo[] = {{"model", 1, 0, 'm'},  {"lengths", 1, 0, 'l'},
                                       {"chunk", 1, 0, 'c'},  {"threads", 1, 0, 't'},
                                       {"json", 1, 0, 'j'},   {"no-block-sparse", 0, 0, 'b'},
                                       {"decode", 1, 0, 'd'}, {"decode-only", 0, 0, 'o'},
                                       {"verify", 1, 0, 'v'}, {"per-call-summaries", 0, 0, 's'},
                                       {"batch", 1, 0, 'B'},  {0, 0, 0, 0}};
    int n_pol = N_POLICIES - 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'm':
            model = optarg;
            break;
        case 'l':
            n_lengths = 0;
            for (char *s = strtok(optarg, ","); s && n_lengths < MAX_LENGTHS; s = strtok(NULL, ","))
                lengths[n_lengths++] = (uint32_t)atoi(s);
            break;
        case 'c':
            chunk = (uint32_t)atoi(optarg);
            break;
        case 't':
            threads = (uint32_t)atoi(optarg);
            break;
        case 'j':
            json = optarg;
            break;
        case 'b': /* the slowest sparse policy, when time is short */
            n_pol = N_POLICIES - 2;
            break;
        case 's':
            n_pol = N_POLICIES;
            break;
        case 'd':
            n_dec = (uint32_t)atoi(optarg);
            break;
        case 'o':
            dec_only = true;
            break;
        case 'v':
            verify = (uint32_t)atoi(optarg);
            break;
        case 'B':
            batch = (uint32_t)atoi(optarg);
            break;
        default:
            fprintf(stderr, "usage: bench_attn --model F.gguf [--lengths 4096,16384,32768] "
                            "[--chunk 2048] [--threads N] [--no-block-sparse | "
                            "--per-call-summaries] "
                            "[--decode D [--decode-only] [--verify K] [--batch B]] "
                            "[--json FILE]\n");
            return 2;
        }
    }
    if (model == NULL || chunk == 0 || (dec_only && n_dec == 0)) {
        fprintf(stderr, "bench_attn: --model is required (and --decode D with --decode-only)\n");
        return 2;
    }
    if (batch == 0 || batch > MAX_BATCH || (uint64_t)batch * (verify + 1) > chunk) {
        fprintf(stderr,
                "bench_attn: --batch takes 1 to %d sequences of --verify + 1 rows, "
                "at most --chunk rows in all\n",
                MAX_BATCH);
        return 2;
    }
    if (dec_only)
        n_pol = 0;
    kern_backend_t *be;
    kern_backend_cfg_t bc = {.n_threads = threads};
    model_t *m;
    char err[512] = "";
    if (kern_backend_new("cpu", &bc, &be) || model_load(model, be, &m, err, sizeof err)) {
        fprintf(stderr, "bench_attn: cannot load %s: %s\n", model, err);
        return 1;
    }
    const model_attn_policy_t pol[N_POLICIES] = {
        {.kind = MODEL_ATTN_DENSE},
        {.kind = MODEL_ATTN_SINK_WINDOW, .sinks = 4, .window = 16},
        {.kind = MODEL_ATTN_DELTA, .sinks = 4, .window = 16, .gamma = 64},
        {.kind = MODEL_ATTN_BLOCK_SPARSE, .sinks = 4, .window = 16, .top_k = 8},
        {.kind = MODEL_ATTN_BLOCK_SPARSE, .sinks = 4, .window = 16, .top_k = 8},
    };
    double ms[MAX_LENGTHS][N_POLICIES], dms[MAX_LENGTHS][N_DECODE];
    if (n_pol)
        printf("%s, prefill in chunks of %u\n%-8s", model, chunk, "tokens");
    for (int p = 0; p < n_pol; p++)
        printf(" %22s", names[p]);
    if (n_pol)
        printf(" %12s\n", "attn share");
    for (uint32_t i = 0; i < n_lengths && n_pol; i++) {
        printf("%-8u", lengths[i]);
        for (int p = 0; p < n_pol; p++) {
            ms[i][p] = prefill_ms(m, lengths[i], chunk, &pol[p], p < 4);
            if (ms[i][p] < 0) {
                fprintf(stderr, "\nbench_attn: prefill of %u tokens failed\n", lengths[i]);
                return 1;
            }
            if (p == 0)
                printf(" %14.0f ms      ", ms[i][p]);
            else
                printf(" %9.0f ms %6.2fx ", ms[i][p], ms[i][0] / ms[i][p]);
            fflush(stdout);
        }
        printf(" %11.0f%%\n", 100.0 * (1.0 - ms[i][1] / ms[i][0]));
    }
    if (n_dec) {
        printf("%s, %u decode steps after each prompt, %u a call, %u sequences a step, ms per "
               "token\n%-8s %14s",
               model, n_dec, verify + 1, batch, "tokens", "dense");
        for (int p = 1; p < N_DECODE; p++)
            printf("  %squest top %-3u", dec_store[p] ? "     " : "per-step ", dec_top[p]);
        printf("\n");
    }
    for (uint32_t i = 0; i < n_lengths && n_dec; i++) {
        if (!decode_ms(m, lengths[i], chunk, n_dec, verify + 1, batch, dms[i])) {
            fprintf(stderr, "bench_attn: decoding after %u tokens failed\n", lengths[i]);
            return 1;
        }
        printf("%-8u %11.2f ms", lengths[i], dms[i][0]);
        for (int p = 1; p < N_DECODE; p++)
            printf(" %9.2f ms %6.2fx", dms[i][p], dms[i][0] / dms[i][p]);
        printf("\n");
        fflush(stdout);
    }
    if (json) {
        FILE *f = fopen(json, "w");
        if (f) {
            fprintf(f, "{\"bench\": \"attn\", \"model\": \"%s\", \"chunk\": %u, \"runs\": [", model,
                    chunk);
            for (uint32_t i = 0; i < n_lengths && n_pol; i++) {
                fprintf(f, "%s{\"tokens\": %u", i ? ", " : "", lengths[i]);
                for (int p = 0; p < n_pol; p++)
                    fprintf(f, ", \"%s_ms\": %.1f, \"%s_speedup\": %.3f", keys[p], ms[i][p],
                            keys[p], ms[i][0] / ms[i][p]);
                fprintf(f, ", \"attention_share\": %.3f}", 1.0 - ms[i][1] / ms[i][0]);
            }
            fprintf(f,
                    "], \"decode_steps\": %u, \"decode_rows_per_call\": %u, "
                    "\"decode_batch\": %u, \"decode\": [",
                    n_dec, verify + 1, batch);
            for (uint32_t i = 0; i < n_lengths && n_dec; i++) {
                fprintf(f, "%s{\"tokens\": %u, \"dense_ms_per_token\": %.3f", i ? ", " : "",
                        lengths[i], dms[i][0]);
                for (int p = 1; p < N_DECODE; p++) {
                    const char *sfx = dec_store[p] ? "" : "_per_step_summaries";
                    fprintf(f, ", \"quest%u%s_ms_per_token\": %.3f, \"quest%u%s_speedup\": %.3f",
                            dec_top[p], sfx, dms[i][p], dec_top[p], sfx, dms[i][0] / dms[i][p]);
                }
                fprintf(f, "}");
            }
            fprintf(f, "]}\n");
            fclose(f);
            printf("json: %s\n", json);
        }
    }
    model_free(m);
    kern_backend_free(be);
    return 0;
}
