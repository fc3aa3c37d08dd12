/*
 * bench/bench_attn.c — what sparse prefill policies save: the time to
 * prefill N tokens (chunks of --chunk, as the engine schedules them) under
 * dense attention, sink-window, Delta Attention and block-sparse (Quest
 * bounds picking 8 blocks of 16 per query block), each as a ratio to dense
 * measured in the same run.  The attention share of dense prefill is
 * estimated as 1 - t(sink-window) / t(dense), since a 4+16 window leaves
 * almost no attention work.
 *
 *   bench_attn --model F.gguf [--lengths 4096,16384,32768] [--chunk 2048]
 *              [--threads N] [--no-block-sparse] [--json FILE]
 */
#include "cache/kv.h"
#include "model/model.h"
#include "sched/sched.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LENGTHS 8
#define N_POLICIES 4

static const char *const names[N_POLICIES] = {"dense", "sink-window(4+16)", "delta(4+16, g64)",
                                              "block-sparse(4+16, 8)"};
static const char *const keys[N_POLICIES] = {"dense", "sink_window", "delta", "block_sparse"};

static double
prefill_ms(model_t *m, uint32_t n, uint32_t chunk, const model_attn_policy_t *p)
{
    const model_hparams_t *hp = model_hparams(m);
    kv_pool_cfg_t pc = {.n_layers = hp->n_layer,
                        .n_kv_heads = hp->n_head_kv,
                        .head_dim = hp->head_dim,
                        .block_tokens = 16,
                        .n_blocks = n / 16 + 2,
                        .dtype = KERN_F16};
    kv_pool_t *pool = NULL;
    kv_table_t *t = NULL;
    sched_batch_t *sb = NULL;
    model_ctx_t *ctx = NULL;
    int32_t *toks = malloc(n * sizeof *toks);
    float *logits = malloc(hp->n_vocab * sizeof(float));
    double ms = -1;
    if (!toks || !logits || kv_pool_new(&pc, model_backend(m), &pool) || kv_table_new(pool, &t) ||
        sched_batch_new(&sb) || model_ctx_new(m, chunk, 1, &ctx))
        goto out;
    for (uint32_t i = 0; i < n; i++)
        toks[i] = (int32_t)((i * 2654435761u >> 7) % 256);
    uint64_t t0 = kvs_now_ns();
    for (uint32_t done = 0; done < n;) {
        uint32_t k = n - done < chunk ? n - done : chunk;
        sched_seq_step_t st = {.table = t,
                               .tokens = toks + done,
                               .n_tokens = k,
                               .want_logits = done + k == n,
                               .policy = p,
                               .n_prompt = n};
        const model_batch_t *mb;
        if (sched_batch_build(sb, &st, 1, &mb) || model_forward(ctx, kv_pool_kv(pool), mb, logits))
            goto out;
        done += k;
    }
    ms = (double)(kvs_now_ns() - t0) / 1e6;
out:
    model_ctx_free(ctx);
    sched_batch_free(sb);
    kv_table_free(t);
    kv_pool_free(pool);
    free(toks);
    free(logits);
    return ms;
}

int
main(int argc, char **argv)
{
    const char *model = NULL, *json = NULL;
    uint32_t lengths[MAX_LENGTHS] = {4096, 16384, 32768}, n_lengths = 3, chunk = 2048, threads = 0;
    static const struct option lo[] = {{"model", 1, 0, 'm'}, {"lengths", 1, 0, 'l'},
                                       {"chunk", 1, 0, 'c'}, {"threads", 1, 0, 't'},
                                       {"json", 1, 0, 'j'},  {"no-block-sparse", 0, 0, 'b'},
                                       {0, 0, 0, 0}};
    int n_pol = N_POLICIES;
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
            n_pol = N_POLICIES - 1;
            break;
        default:
            fprintf(stderr, "usage: bench_attn --model F.gguf [--lengths 4096,16384,32768] "
                            "[--chunk 2048] [--threads N] [--no-block-sparse] [--json FILE]\n");
            return 2;
        }
    }
    if (model == NULL || chunk == 0) {
        fprintf(stderr, "bench_attn: --model is required\n");
        return 2;
    }
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
    };
    double ms[MAX_LENGTHS][N_POLICIES];
    printf("%s, prefill in chunks of %u\n%-8s", model, chunk, "tokens");
    for (int p = 0; p < n_pol; p++)
        printf(" %22s", names[p]);
    printf(" %12s\n", "attn share");
    for (uint32_t i = 0; i < n_lengths; i++) {
        printf("%-8u", lengths[i]);
        for (int p = 0; p < n_pol; p++) {
            ms[i][p] = prefill_ms(m, lengths[i], chunk, &pol[p]);
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
    if (json) {
        FILE *f = fopen(json, "w");
        if (f) {
            fprintf(f, "{\"bench\": \"attn\", \"model\": \"%s\", \"chunk\": %u, \"runs\": [", model,
                    chunk);
            for (uint32_t i = 0; i < n_lengths; i++) {
                fprintf(f, "%s{\"tokens\": %u", i ? ", " : "", lengths[i]);
                for (int p = 0; p < n_pol; p++)
                    fprintf(f, ", \"%s_ms\": %.1f, \"%s_speedup\": %.3f", keys[p], ms[i][p],
                            keys[p], ms[i][0] / ms[i][p]);
                fprintf(f, ", \"attention_share\": %.3f}", 1.0 - ms[i][1] / ms[i][0]);
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
