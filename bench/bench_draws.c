/*
 * bench/bench_draws.c — what drawing a step's tokens on several threads
 * (sched_cfg_t.sample_threads) saves: decode speed of a batch of seeded
 * top-p requests through the engine with the engine thread drawing alone
 * (the baseline, same run) and with each thread count, on a model whose
 * vocabulary is large next to its layers (a step's draws weigh as they do
 * beside a GPU's forward pass).  Each row also checks that the outputs are
 * the baseline's.
 *
 *   bench_draws [--model M.gguf] [--batch 8,32] [--threads 2,4] [--max-tokens 32]
 *               [--repeat 2] [--json FILE]
 *
 * The default model is made by `kvserve model random --shape tiny --dtype f16
 * --vocab ../shared/data/vocab/ggml-vocab-deepseek-llm.gguf --out
 * bench/out/tiny-100k.gguf` (102,400 tokens).  Each configuration runs
 * --repeat times, alternating, and keeps its fastest run.
 */
#include "bench_util.h"
#include "sched/sched.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LIST 6
#define MAX_BATCH 256

typedef struct run {
    double decode_s; /* every first token out to the last finish */
    uint64_t tokens;
    int32_t *out; /* [batch][max_tokens] */
} run_t;

static int
run_one(model_t *m, uint32_t batch, uint32_t max_tokens, uint32_t threads, run_t *out)
{
    sched_cfg_t cfg = {.max_num_seqs = batch,
                       .max_num_batched_tokens = 2048,
                       .block_tokens = 16,
                       .n_blocks = batch * ((64 + max_tokens) / 16 + 2),
                       .sample_threads = threads};
    sched_t *s;
    int rc = sched_new(m, &cfg, &s);
    for (uint32_t i = 0; i < batch && rc == 0; i++) {
        int32_t p[48];
        for (uint32_t k = 0; k < 48; k++)
            p[k] = (int32_t)((i * 7919u + k * 104729u) % model_hparams(m)->n_vocab);
        sched_request_t r = {
            .id = i,
            .prompt = p,
            .n_prompt = 48,
            .max_tokens = max_tokens,
            .ignore_eos = true,
            .sampling = {.temperature = 0.8f, .top_p = 0.9f, .top_k = 0, .seed = 11 + i}};
        rc = sched_submit(s, &r);
    }
    uint32_t *n_out = calloc(batch, sizeof *n_out);
    bench_decode_t bd = {0};
    if (rc == 0)
        rc = n_out ? bench_decode(s, batch, max_tokens, out->out, n_out, &bd) : KVS_ENOMEM;
    free(n_out);
    out->tokens = bd.tokens;
    out->decode_s = (double)(bd.t_end - bd.t_first) / 1e9;
    sched_free(s);
    return rc;
}

int
main(int argc, char **argv)
{
    const char *model = "bench/out/tiny-100k.gguf", *json = NULL;
    uint32_t batches[MAX_LIST] = {8, 32}, n_b = 2, threads[MAX_LIST] = {2, 4}, n_t = 2;
    uint32_t max_tokens = 32, repeat = 2;
    static const struct option lo[] = {{"model", 1, 0, 'm'},
                                       {"batch", 1, 0, 'b'},
                                       {"threads", 1, 0, 't'},
                                       {"max-tokens", 1, 0, 'n'},
                                       {"repeat", 1, 0, 'r'},
                                       {"json", 1, 0, 'j'},
                                       {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'm':
            model = optarg;
            break;
        case 'b':
            n_b = bench_parse_list(optarg, batches, MAX_LIST);
            break;
        case 't':
            n_t = bench_parse_list(optarg, threads, MAX_LIST);
            break;
        case 'n':
            max_tokens = (uint32_t)atoi(optarg);
            break;
        case 'r':
            repeat = (uint32_t)atoi(optarg);
            break;
        case 'j':
            json = optarg;
            break;
        default:
            fprintf(stderr, "usage: bench_draws [--model M.gguf] [--batch 8,32] [--threads 2,4] "
                            "[--max-tokens 32] [--repeat 2] [--json FILE]\n");
            return 2;
        }
    }
    bool ok = max_tokens >= 2 && repeat >= 1 && n_b > 0 && n_t > 0;
    for (uint32_t i = 0; i < n_b; i++)
        ok &= batches[i] >= 1 && batches[i] <= MAX_BATCH;
    for (uint32_t i = 0; i < n_t; i++)
        ok &= threads[i] >= 1 && threads[i] <= SCHED_MAX_SAMPLE_THREADS;
    if (!ok) {
        fprintf(stderr, "bench_draws: --max-tokens >= 2, --batch in 1..%d, --threads in 1..%d\n",
                MAX_BATCH, SCHED_MAX_SAMPLE_THREADS);
        return 2;
    }
    kern_backend_t *be;
    kern_backend_cfg_t bc = {0};
    model_t *m;
    char err[512] = "";
    if (kern_backend_new("cpu", &bc, &be) || model_load(model, be, &m, err, sizeof err)) {
        fprintf(stderr, "bench_draws: cannot load %s: %s (see the comment atop bench_draws.c)\n",
                model, err);
        return 1;
    }
    FILE *jf = json ? fopen(json, "w") : NULL;
    if (json && jf == NULL) {
        fprintf(stderr, "bench_draws: cannot write %s\n", json);
        return 1;
    }
    if (jf)
        fprintf(jf, "{\"bench\": \"draws\", \"model\": \"%s\", \"n_vocab\": %u, \"runs\": [", model,
                model_hparams(m)->n_vocab);
    printf("%s (%u tokens), seeded top-p 0.9 draws, %u tokens a request\n", model,
           model_hparams(m)->n_vocab, max_tokens);
    printf("%5s %8s %10s %9s %8s\n", "batch", "threads", "tok/s", "speedup", "output");
    size_t cap = (size_t)MAX_BATCH * max_tokens;
    run_t runs[MAX_LIST + 1], tmp = {.out = malloc(cap * sizeof(int32_t))};
    for (uint32_t i = 0; i <= MAX_LIST; i++)
        if ((runs[i].out = malloc(cap * sizeof(int32_t))) == NULL || tmp.out == NULL)
            return 1;
    int status = 0, first = 1;
    for (uint32_t bi = 0; bi < n_b; bi++) {
        uint32_t b = batches[bi];
        for (uint32_t rep = 0; rep < repeat; rep++)
            for (uint32_t ti = 0; ti <= n_t; ti++) {
                uint32_t t = ti ? threads[ti - 1] : 1;
                memset(tmp.out, 0, cap * sizeof(int32_t));
                int rc = run_one(m, b, max_tokens, t, &tmp);
                if (rc) {
                    fprintf(stderr, "bench_draws: batch %u, %u threads: %s\n", b, t,
                            kvs_strerror(rc));
                    return 1;
                }
                if (rep == 0 || tmp.decode_s < runs[ti].decode_s) {
                    run_t x = runs[ti];
                    runs[ti] = tmp;
                    tmp = x;
                }
            }
        for (uint32_t ti = 0; ti <= n_t; ti++) {
            uint32_t t = ti ? threads[ti - 1] : 1;
            bool same =
                memcmp(runs[ti].out, runs[0].out, (size_t)b * max_tokens * sizeof(int32_t)) == 0;
            status |= !same;
            double tps = (double)runs[ti].tokens / runs[ti].decode_s;
            double speedup = runs[0].decode_s / runs[ti].decode_s;
            printf("%5u %8u %10.1f %8.2fx %8s\n", b, t, tps, speedup,
                   !ti    ? "baseline"
                   : same ? "same"
                          : "DIFFERS");
            fflush(stdout);
            if (jf)
                fprintf(jf,
                        "%s{\"batch\": %u, \"threads\": %u, \"tok_s\": %.2f, \"speedup\": %.3f, "
                        "\"same_output\": %s}",
                        first ? "" : ", ", b, t, tps, speedup, same ? "true" : "false");
            first = 0;
        }
    }
    if (jf) {
        fprintf(jf, "]}\n");
        fclose(jf);
        printf("json: %s\n", json);
    }
    if (status)
        fprintf(stderr, "bench_draws: an output differs from the baseline's\n");
    for (uint32_t i = 0; i <= MAX_LIST; i++)
        free(runs[i].out);
    free(tmp.out);
    model_free(m);
    kern_backend_free(be);
    return status;
}
