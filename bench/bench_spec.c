/*
 * bench/bench_spec.c — what speculative prefill saves: time to first
 * token of one request through the engine (chunked prefill, one sequence)
 * with full prefill and with speculative prefill at a keep ratio, measured
 * in the same run, at several prompt lengths.  The speculative time
 * includes the draft's prefill, its look-ahead steps and the scoring.
 *
 *   bench_spec --model MAIN.gguf --draft DRAFT.gguf [--lengths 4096,16384,32768]
 *              [--keep 0.2] [--look-ahead 8] [--threads N] [--json FILE]
 */
#include "sched/sched.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_LENGTHS 8

typedef struct result {
    double ttft_ms, draft_ms;
    uint32_t kept;
} result_t;

/* One request of n prompt tokens, 1 token generated; its usage. */
static int
ttft(model_t *m, model_t *draft, uint32_t n, const model_spec_policy_t *spec, result_t *out)
{
    sched_cfg_t cfg = {.max_num_seqs = 1,
                       .max_num_batched_tokens = 2048,
                       .max_model_len = n + 16,
                       .block_tokens = 16,
                       .n_blocks = n / 16 + 8,
                       .draft = spec->on ? draft : NULL};
    sched_t *s;
    int rc = sched_new(m, &cfg, &s);
    if (rc)
        return rc;
    int32_t *prompt = malloc(n * sizeof *prompt);
    if (prompt == NULL) {
        sched_free(s);
        return KVS_ENOMEM;
    }
    uint32_t nv = model_hparams(m)->n_vocab;
    for (uint32_t i = 0; i < n; i++)
        prompt[i] = (int32_t)((i * 2654435761u >> 7) % (nv < 256 ? nv : 256));
    sched_request_t r = {.id = 1,
                         .prompt = prompt,
                         .n_prompt = n,
                         .max_tokens = 1,
                         .ignore_eos = true,
                         .sampling = {.top_p = 1.0f},
                         .spec = *spec};
    rc = sched_submit(s, &r);
    bool done = false;
    while (rc == 0 && !done) {
        int live = sched_step(s);
        if (live < 0) {
            rc = live;
            break;
        }
        sched_event_t *ev;
        while ((ev = sched_poll(s)) != NULL) {
            if (ev->kind == SCHED_EV_FINISH) {
                done = true;
                if (ev->finish == SCHED_FINISH_ERROR)
                    rc = ev->error;
                out->ttft_ms = (double)ev->usage.ttft_ns / 1e6;
                out->draft_ms = (double)ev->usage.draft_ns / 1e6;
                out->kept = spec->on ? ev->usage.kept_prompt_tokens : n;
            }
            sched_event_free(ev);
        }
    }
    free(prompt);
    sched_free(s);
    return rc;
}

int
main(int argc, char **argv)
{
    const char *model = NULL, *draft_path = NULL, *json = NULL;
    uint32_t lengths[MAX_LENGTHS] = {4096, 16384, 32768}, n_lengths = 3, threads = 0;
    model_spec_policy_t spec = {.on = true, .keep_ratio = 0.2f};
    static const struct option lo[] = {{"model", 1, 0, 'm'},      {"draft", 1, 0, 'd'},
                                       {"lengths", 1, 0, 'l'},    {"keep", 1, 0, 'k'},
                                       {"look-ahead", 1, 0, 'a'}, {"threads", 1, 0, 't'},
                                       {"json", 1, 0, 'j'},       {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'm':
            model = optarg;
            break;
        case 'd':
            draft_path = optarg;
            break;
        case 'l':
            n_lengths = 0;
            for (char *s = strtok(optarg, ","); s && n_lengths < MAX_LENGTHS; s = strtok(NULL, ","))
                lengths[n_lengths++] = (uint32_t)atoi(s);
            break;
        case 'k':
            spec.keep_ratio = (float)atof(optarg);
            break;
        case 'a':
            spec.look_ahead = (uint32_t)atoi(optarg);
            break;
        case 't':
            threads = (uint32_t)atoi(optarg);
            break;
        case 'j':
            json = optarg;
            break;
        default:
            fprintf(stderr, "usage: bench_spec --model MAIN.gguf --draft DRAFT.gguf [--lengths "
                            "4096,16384,32768] [--keep 0.2] [--look-ahead 8] [--threads N] "
                            "[--json FILE]\n");
            return 2;
        }
    }
    model_spec_policy_defaults(&spec);
    if (model == NULL || draft_path == NULL || model_spec_policy_check(&spec)) {
        fprintf(stderr, "bench_spec: --model and --draft are required, --keep in (0, 1]\n");
        return 2;
    }
    kern_backend_t *be;
    kern_backend_cfg_t bc = {.n_threads = threads};
    model_t *m, *d;
    char err[512] = "";
    if (kern_backend_new("cpu", &bc, &be) || model_load(model, be, &m, err, sizeof err) ||
        model_load(draft_path, be, &d, err, sizeof err)) {
        fprintf(stderr, "bench_spec: cannot load the models: %s\n", err);
        return 1;
    }
    const model_spec_policy_t full = {0};
    result_t res[MAX_LENGTHS][2];
    printf("main %s, draft %s, keep %g, look-ahead %u, chunks of %u\n", model, draft_path,
           spec.keep_ratio, spec.look_ahead, spec.chunk);
    printf("%-8s %14s %14s %12s %8s %8s\n", "tokens", "full TTFT", "spec TTFT", "of it draft",
           "kept", "speedup");
    for (uint32_t i = 0; i < n_lengths; i++) {
        int rc = ttft(m, d, lengths[i], &full, &res[i][0]);
        if (rc == 0)
            rc = ttft(m, d, lengths[i], &spec, &res[i][1]);
        if (rc) {
            fprintf(stderr, "bench_spec: %u tokens failed: %s\n", lengths[i], kvs_strerror(rc));
            return 1;
        }
        printf("%-8u %11.0f ms %11.0f ms %9.0f ms %8u %7.2fx\n", lengths[i], res[i][0].ttft_ms,
               res[i][1].ttft_ms, res[i][1].draft_ms, res[i][1].kept,
               res[i][0].ttft_ms / res[i][1].ttft_ms);
        fflush(stdout);
    }
    if (json) {
        FILE *f = fopen(json, "w");
        if (f) {
            fprintf(f,
                    "{\"bench\": \"spec_prefill\", \"model\": \"%s\", \"draft\": \"%s\", "
                    "\"keep_ratio\": %g, \"look_ahead\": %u, \"runs\": [",
                    model, draft_path, spec.keep_ratio, spec.look_ahead);
            for (uint32_t i = 0; i < n_lengths; i++)
                fprintf(f,
                        "%s{\"tokens\": %u, \"full_ttft_ms\": %.1f, \"spec_ttft_ms\": %.1f, "
                        "\"draft_ms\": %.1f, \"kept\": %u, \"speedup\": %.3f}",
                        i ? ", " : "", lengths[i], res[i][0].ttft_ms, res[i][1].ttft_ms,
                        res[i][1].draft_ms, res[i][1].kept, res[i][0].ttft_ms / res[i][1].ttft_ms);
            fprintf(f, "]}\n");
            fclose(f);
            printf("json: %s\n", json);
        }
    }
    model_free(d);
    model_free(m);
    kern_backend_free(be);
    return 0;
}
