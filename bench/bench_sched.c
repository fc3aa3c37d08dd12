/*
 * bench/bench_sched.c — what continuous batching and prefix caching buy,
 * measured through the engine (sched_step) on one model:
 *
 *   1. aggregate decode tok/s with 1, 4, 16 and 64 concurrent streams, as a
 *      ratio to 1 stream (prefill excluded: streams are admitted and
 *      prefilled first, then timed over decode-only steps);
 *   2. time to first token of a request whose prompt shares a long prefix
 *      (default 2,048 tokens) with a finished request, as a ratio to the
 *      first request's;
 *   3. n samples of one prompt (default 8 of 1,024 tokens): one request of
 *      n, whose samples fork the prompt's KV, against n requests of the
 *      prompt (what an engine without forking runs): time to the last
 *      token, tokens the model computed and the most KV blocks held, each
 *      as a ratio.
 *
 *   bench_sched --model F.gguf [--threads N] [--streams 1,4,16,64]
 *               [--decode N] [--prefix N] [--rounds N]
 *               [--samples N] [--sample-prompt N] [--json FILE]
 */
#include "sched/sched.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_STREAMS 8

static int
drain(sched_t *s, uint32_t *tokens, uint32_t *finished, uint64_t *ttft)
{
    sched_event_t *ev;
    while ((ev = sched_poll(s)) != NULL) {
        if (ev->kind == SCHED_EV_TOKEN)
            (*tokens)++;
        else {
            (*finished)++;
            if (ttft)
                *ttft = ev->usage.ttft_ns;
            if (ev->finish == SCHED_FINISH_ERROR) {
                fprintf(stderr, "bench_sched: request failed: %s\n", kvs_strerror(ev->error));
                sched_event_free(ev);
                return -1;
            }
        }
        sched_event_free(ev);
    }
    return 0;
}

/* Decode tok/s of n concurrent streams. */
static double
decode_rate(model_t *m, uint32_t n, uint32_t n_decode)
{
    sched_cfg_t cfg = {.max_num_seqs = n,
                       .max_num_batched_tokens = 2048,
                       .block_tokens = 16,
                       .n_blocks = n * ((32 + n_decode + 2 + 15) / 16) + 8};
    sched_t *s;
    if (sched_new(m, &cfg, &s))
        return -1;
    int32_t prompt[32];
    for (uint32_t i = 0; i < n; i++) {
        for (int k = 0; k < 32; k++)
            prompt[k] = (int32_t)((i * 31 + k * 7) % 256);
        sched_request_t r = {.id = i,
                             .prompt = prompt,
                             .n_prompt = 32,
                             .max_tokens = n_decode + 2,
                             .ignore_eos = true,
                             .sampling = {.top_p = 1.0f}};
        if (sched_submit(s, &r)) {
            sched_free(s);
            return -1;
        }
    }
    uint32_t toks = 0, fin = 0;
    /* Admission and prefill: all streams produce their first token. */
    while (toks < n) {
        if (sched_step(s) < 0 || drain(s, &toks, &fin, NULL)) {
            sched_free(s);
            return -1;
        }
    }
    toks = 0;
    uint64_t t0 = kvs_now_ns();
    while (toks < n * n_decode) {
        if (sched_step(s) < 0 || drain(s, &toks, &fin, NULL)) {
            sched_free(s);
            return -1;
        }
    }
    double secs = (double)(kvs_now_ns() - t0) / 1e9;
    sched_free(s);
    return (double)toks / secs;
}

/* TTFT of the first request and of a second sharing its prefix. */
static int
prefix_ttft(model_t *m, uint32_t prefix, double *first_ms, double *second_ms)
{
    sched_cfg_t cfg = {.max_num_seqs = 4,
                       .max_num_batched_tokens = 512,
                       .block_tokens = 16,
                       .n_blocks = (prefix + 64) / 16 * 2 + 16,
                       .prefix_caching = true};
    sched_t *s;
    if (sched_new(m, &cfg, &s))
        return -1;
    int32_t *prompt = malloc((prefix + 16) * sizeof *prompt);
    for (uint32_t i = 0; i < prefix + 16; i++)
        prompt[i] = (int32_t)((i * 2654435761u) % 256);
    uint64_t ttft[2] = {0, 0};
    for (int k = 0; k < 2; k++) {
        /* Same prefix, a different 16-token question after it. */
        for (uint32_t i = prefix; i < prefix + 16; i++)
            prompt[i] = (int32_t)((i * 7 + (uint32_t)k * 13) % 256);
        sched_request_t r = {.id = (uint64_t)k,
                             .prompt = prompt,
                             .n_prompt = prefix + 16,
                             .max_tokens = 4,
                             .ignore_eos = true,
                             .sampling = {.top_p = 1.0f}};
        uint32_t toks = 0, fin = 0;
        if (sched_submit(s, &r))
            break;
        while (fin == 0)
            if (sched_step(s) < 0 || drain(s, &toks, &fin, &ttft[k]))
                break;
    }
    free(prompt);
    sched_free(s);
    *first_ms = (double)ttft[0] / 1e6;
    *second_ms = (double)ttft[1] / 1e6;
    return ttft[1] ? 0 : -1;
}

/* One way of drawing n samples of a prompt. */
typedef struct samples_run {
    double secs;
    uint64_t computed; /* tokens through the model, prompt and decode */
    uint32_t peak_blocks;
} samples_run_t;

static void
count_tokens(void *arg, const model_batch_t *b, const uint64_t *ids)
{
    (void)ids;
    *(uint64_t *)arg += b->n_tokens;
}

/* n samples of a prompt_len-token prompt, n_decode tokens each: one
 * request of n (fork) or n requests with the same seeds (sample i's
 * sched_sample_seed), every sequence running at once either way. */
static int
samples_run(model_t *m, uint32_t n, uint32_t prompt_len, uint32_t n_decode, bool fork,
            samples_run_t *out)
{
    const uint32_t bt = 16;
    sched_cfg_t cfg = {.max_num_seqs = n,
                       .max_num_batched_tokens = 2048,
                       .block_tokens = bt,
                       .n_blocks = n * ((prompt_len + n_decode + bt - 1) / bt + 1) + 8};
    sched_t *s;
    if (sched_new(m, &cfg, &s))
        return -1;
    *out = (samples_run_t){0};
    sched_set_step_hook(s, count_tokens, &out->computed);
    int32_t *prompt = malloc(prompt_len * sizeof *prompt);
    int rc = prompt ? 0 : -1;
    for (uint32_t i = 0; i < prompt_len && prompt; i++)
        prompt[i] = (int32_t)((i * 2654435761u >> 7) % 256);
    uint64_t t0 = kvs_now_ns();
    for (uint32_t i = 0; rc == 0 && i < (fork ? 1 : n); i++) {
        sched_request_t r = {.id = i,
                             .prompt = prompt,
                             .n_prompt = prompt_len,
                             .max_tokens = n_decode,
                             .ignore_eos = true,
                             .n = fork ? n : 1,
                             .sampling = {.temperature = 1.0f,
                                          .top_p = 1.0f,
                                          .seed = sched_sample_seed(1, fork ? 0 : i)}};
        rc = sched_submit(s, &r);
    }
    uint32_t toks = 0, fin = 0, total = kv_pool_cfg(sched_pool(s))->n_blocks;
    while (rc == 0 && fin < n) {
        if (sched_step(s) < 0 || drain(s, &toks, &fin, NULL))
            rc = -1;
        uint32_t used = total - kv_pool_n_free(sched_pool(s));
        out->peak_blocks = used > out->peak_blocks ? used : out->peak_blocks;
    }
    out->secs = (double)(kvs_now_ns() - t0) / 1e9;
    free(prompt);
    sched_free(s);
    return rc == 0 && toks == n * n_decode ? 0 : -1;
}

int
main(int argc, char **argv)
{
    const char *model = NULL, *json = "bench/out/sched.json";
    uint32_t threads = 0, n_decode = 16, prefix = 2048, streams[MAX_STREAMS] = {1, 4, 16, 64},
             n_streams = 4, rounds = 3, n_samples = 8, sample_prompt = 1024;
    static const struct option lo[] = {
        {"model", 1, 0, 'm'},  {"threads", 1, 0, 't'}, {"streams", 1, 0, 's'},
        {"decode", 1, 0, 'd'}, {"prefix", 1, 0, 'p'},  {"json", 1, 0, 'j'},
        {"rounds", 1, 0, 'r'}, {"samples", 1, 0, 'n'}, {"sample-prompt", 1, 0, 'P'},
        {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'm':
            model = optarg;
            break;
        case 't':
            threads = (uint32_t)atoi(optarg);
            break;
        case 's':
            n_streams = 0;
            for (char *t = strtok(optarg, ","); t && n_streams < MAX_STREAMS; t = strtok(NULL, ","))
                streams[n_streams++] = (uint32_t)atoi(t);
            break;
        case 'd':
            n_decode = (uint32_t)atoi(optarg);
            break;
        case 'p':
            prefix = (uint32_t)atoi(optarg);
            break;
        case 'j':
            json = optarg;
            break;
        case 'r':
            rounds = (uint32_t)atoi(optarg);
            break;
        case 'n':
            n_samples = (uint32_t)atoi(optarg);
            break;
        case 'P':
            sample_prompt = (uint32_t)atoi(optarg);
            break;
        default:
            fprintf(stderr, "usage: bench_sched --model F.gguf [--threads N] [--streams 1,4,16,64]"
                            " [--decode N] [--prefix N] [--rounds N] [--samples N]"
                            " [--sample-prompt N] [--json FILE]\n");
            return 2;
        }
    }
    if (model == NULL || n_decode == 0 || rounds == 0 || n_samples < 2 || n_samples > SCHED_MAX_N ||
        sample_prompt == 0) {
        fprintf(stderr, "bench_sched: --model is required\n");
        return 2;
    }
    kern_backend_t *be;
    kern_backend_cfg_t bc = {.n_threads = threads};
    model_t *m;
    char err[512];
    if (kern_backend_new("cpu", &bc, &be) || model_load(model, be, &m, err, sizeof err)) {
        fprintf(stderr, "bench_sched: cannot load %s: %s\n", model, err);
        return 1;
    }
    /* The sweep runs `rounds` times and each count keeps its best rate:
     * on a shared machine memory bandwidth drifts by tens of percent, and
     * interleaved rounds keep one slow spell from landing on one count. */
    double rate[MAX_STREAMS] = {0};
    for (uint32_t r = 0; r < rounds; r++) {
        for (uint32_t i = 0; i < n_streams; i++) {
            double v = decode_rate(m, streams[i], n_decode);
            if (v < 0) {
                fprintf(stderr, "bench_sched: %u streams failed\n", streams[i]);
                return 1;
            }
            rate[i] = v > rate[i] ? v : rate[i];
        }
    }
    printf("%-8s %14s %10s   (best of %u rounds)\n", "streams", "decode tok/s", "vs 1", rounds);
    for (uint32_t i = 0; i < n_streams; i++)
        printf("%-8u %14.2f %9.2fx\n", streams[i], rate[i], rate[i] / rate[0]);
    fflush(stdout);
    double first = 0, second = 0;
    if (prefix_ttft(m, prefix, &first, &second)) {
        fprintf(stderr, "bench_sched: prefix run failed\n");
        return 1;
    }
    printf("TTFT with a %u-token prefix: first %.1f ms, sharing it %.1f ms (ratio %.3f)\n", prefix,
           first, second, second / first);
    /* Forked and separate, alternating, each keeping its best time. */
    samples_run_t sr[2];
    memset(sr, 0, sizeof sr);
    for (uint32_t r = 0; r < rounds; r++) {
        for (int k = 0; k < 2; k++) {
            samples_run_t v;
            if (samples_run(m, n_samples, sample_prompt, n_decode, k == 0, &v)) {
                fprintf(stderr, "bench_sched: the samples run failed\n");
                return 1;
            }
            if (r == 0 || v.secs < sr[k].secs)
                sr[k] = v;
        }
    }
    printf("%u samples of a %u-token prompt, %u tokens each:\n", n_samples, sample_prompt,
           n_decode);
    printf("%-22s %10s %16s %12s\n", "", "seconds", "tokens computed", "peak blocks");
    static const char *const how[2] = {"one request, n forked", "n requests"};
    for (int k = 0; k < 2; k++)
        printf("%-22s %10.3f %16llu %12u\n", how[k], sr[k].secs, (unsigned long long)sr[k].computed,
               sr[k].peak_blocks);
    printf("forked vs separate: time %.3fx, tokens computed %.3fx, peak KV blocks %.3fx\n",
           sr[0].secs / sr[1].secs, (double)sr[0].computed / (double)sr[1].computed,
           (double)sr[0].peak_blocks / sr[1].peak_blocks);
    FILE *f = fopen(json, "w");
    if (f) {
        fprintf(f,
                "{\"bench\": \"sched\", \"model\": \"%s\", \"decode_tokens\": %u, \"rounds\": %u, "
                "\"streams\": [",
                model, n_decode, rounds);
        for (uint32_t i = 0; i < n_streams; i++)
            fprintf(f, "%s{\"streams\": %u, \"decode_tok_s\": %.3f, \"ratio_vs_1\": %.3f}",
                    i ? ", " : "", streams[i], rate[i], rate[i] / rate[0]);
        fprintf(
            f,
            "], \"prefix_tokens\": %u, \"ttft_first_ms\": %.2f, \"ttft_shared_ms\": %.2f, "
            "\"ttft_ratio\": %.4f, \"samples\": {\"n\": %u, \"prompt_tokens\": %u, "
            "\"forked\": {\"seconds\": %.4f, \"computed_tokens\": %llu, \"peak_blocks\": %u}, "
            "\"separate\": {\"seconds\": %.4f, \"computed_tokens\": %llu, \"peak_blocks\": %u}, "
            "\"time_ratio\": %.4f, \"computed_ratio\": %.4f, \"blocks_ratio\": %.4f}}\n",
            prefix, first, second, second / first, n_samples, sample_prompt, sr[0].secs,
            (unsigned long long)sr[0].computed, sr[0].peak_blocks, sr[1].secs,
            (unsigned long long)sr[1].computed, sr[1].peak_blocks, sr[0].secs / sr[1].secs,
            (double)sr[0].computed / (double)sr[1].computed,
            (double)sr[0].peak_blocks / sr[1].peak_blocks);
        fclose(f);
        printf("json: %s\n", json);
    }
    model_free(m);
    kern_backend_free(be);
    return 0;
}
