/*
 * bench/bench_engine.c — single-stream prefill and decode speed of the CPU
 * engine on random-weight models of real shapes, each printed next to the
 * decode ceiling measured in the same run: memory bandwidth (a large
 * multi-threaded copy, read + write traffic) divided by the bytes one
 * decode step must read (every weight once, plus the KV cache so far).
 *
 *   bench_engine [--model F16.gguf --model Q8.gguf ...] [--threads 1,2]
 *                [--prompt N] [--decode N] [--json FILE]
 *
 * Models are made beforehand with `kvserve model random` (bench/run_engine.sh
 * does that).  Output: a table on stdout and one JSON document.  When an
 * F16 model runs first, every later model's decode speed is also given as
 * a ratio to the F16 model's at the same thread count ("vs f16"), which is
 * what the quantized formats are for: fewer bytes per token.
 */
#include "cache/kv.h"
#include "model/model.h"
#include "sched/sched.h"

#include <getopt.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_MODELS 8
#define MAX_THREADS 8

typedef struct copy_arg {
    char *dst;
    const char *src;
    size_t n;
} copy_arg_t;

static void *
copy_part(void *p)
{
    copy_arg_t *a = p;
    memcpy(a->dst, a->src, a->n);
    return NULL;
}

/* Best of several copies of a 1 GiB buffer split across n threads;
 * returns bytes moved (read + write) per second. */
static double
copy_bandwidth(uint32_t n)
{
    const size_t size = (size_t)1 << 30;
    char *src = malloc(size), *dst = malloc(size);
    if (!src || !dst) {
        free(src);
        free(dst);
        return 0;
    }
    memset(src, 1, size);
    memset(dst, 2, size);
    double best = 0;
    for (int rep = 0; rep < 5; rep++) {
        pthread_t th[MAX_THREADS];
        copy_arg_t args[MAX_THREADS];
        uint64_t t0 = kvs_now_ns();
        for (uint32_t i = 0; i < n; i++) {
            args[i] = (copy_arg_t){dst + size / n * i, src + size / n * i, size / n};
            pthread_create(&th[i], NULL, copy_part, &args[i]);
        }
        for (uint32_t i = 0; i < n; i++)
            pthread_join(th[i], NULL);
        double s = (double)(kvs_now_ns() - t0) / 1e9;
        double bw = 2.0 * (double)size / s;
        if (bw > best)
            best = bw;
    }
    free(src);
    free(dst);
    return best;
}

typedef struct result {
    const char *model;
    const char *wtype;
    uint32_t threads;
    double prefill_tps, decode_tps, ceiling_tps, bandwidth;
    double vs_f16; /* decode_tps / the F16 model's at these threads; 0: none ran */
    size_t bytes_per_token;
} result_t;

/* Decode tok/s of an F16 model measured earlier in this run at `threads`,
 * or 0. */
static double
f16_decode(const result_t *res, uint32_t n_res, uint32_t threads)
{
    for (uint32_t i = 0; i < n_res; i++)
        if (res[i].threads == threads && strcmp(res[i].wtype, "f16") == 0)
            return res[i].decode_tps;
    return 0.0;
}

static int
bench_one(const char *path, uint32_t threads, uint32_t n_prompt, uint32_t n_decode, double bw,
          result_t *r)
{
    kern_backend_t *be = NULL;
    model_t *m = NULL;
    kv_pool_t *pool = NULL;
    kv_table_t *t = NULL;
    model_ctx_t *ctx = NULL;
    sched_batch_t *sb = NULL;
    float *logits = NULL;
    int32_t *toks = NULL;
    char err[512] = "";
    kern_backend_cfg_t cfg = {.n_threads = threads};
    int rc = kern_backend_new("cpu", &cfg, &be);
    if (rc == 0 && (rc = model_load(path, be, &m, err, sizeof err)))
        fprintf(stderr, "bench_engine: %s: %s\n", path, err);
    if (rc)
        goto out;
    const model_hparams_t *hp = model_hparams(m);
    kv_pool_cfg_t pc = {.n_layers = hp->n_layer,
                        .n_kv_heads = hp->n_head_kv,
                        .head_dim = hp->head_dim,
                        .block_tokens = 16,
                        .n_blocks = (n_prompt + n_decode + 2 + 15) / 16 + 1,
                        .dtype = KERN_F16};
    if ((rc = kv_pool_new(&pc, be, &pool)) || (rc = kv_table_new(pool, &t)) ||
        (rc = model_ctx_new(m, n_prompt, 1, &ctx)) || (rc = sched_batch_new(&sb)))
        goto out;
    logits = malloc((size_t)hp->n_vocab * sizeof(float));
    toks = malloc((size_t)(n_prompt + n_decode + 2) * sizeof(int32_t));
    if (!logits || !toks) {
        rc = KVS_ENOMEM;
        goto out;
    }
    for (uint32_t i = 0; i < n_prompt + n_decode + 2; i++)
        toks[i] = (int32_t)((i * 2654435761u) % 256);
    const model_batch_t *mb;
    /* Warm-up: one decode-sized step pages the weights in. */
    sched_seq_step_t w = {.table = t, .tokens = toks, .n_tokens = 1, .want_logits = true};
    if ((rc = sched_batch_build(sb, &w, 1, &mb)) ||
        (rc = model_forward(ctx, kv_pool_kv(pool), mb, logits)))
        goto out;
    kv_table_truncate(t, 0);

    uint64_t t0 = kvs_now_ns();
    sched_seq_step_t st = {.table = t, .tokens = toks, .n_tokens = n_prompt, .want_logits = true};
    if ((rc = sched_batch_build(sb, &st, 1, &mb)) ||
        (rc = model_forward(ctx, kv_pool_kv(pool), mb, logits)))
        goto out;
    uint64_t t1 = kvs_now_ns();
    for (uint32_t i = 0; i < n_decode; i++) {
        sched_seq_step_t d = {
            .table = t, .tokens = toks + n_prompt + i, .n_tokens = 1, .want_logits = true};
        if ((rc = sched_batch_build(sb, &d, 1, &mb)) ||
            (rc = model_forward(ctx, kv_pool_kv(pool), mb, logits)))
            goto out;
    }
    uint64_t t2 = kvs_now_ns();
    /* Bytes per decode step: weights once + the KV read at the mean length. */
    size_t kv_bytes =
        (size_t)hp->n_layer * model_kv_bytes_per_token(m, KERN_F16) * (n_prompt + n_decode / 2);
    r->bytes_per_token = model_weight_bytes_per_token(m) + kv_bytes;
    r->prefill_tps = n_prompt / ((double)(t1 - t0) / 1e9);
    r->decode_tps = n_decode / ((double)(t2 - t1) / 1e9);
    r->bandwidth = bw;
    r->ceiling_tps = bw / (double)r->bytes_per_token;
    r->threads = threads;
    r->wtype = kern_type_traits(hp->wtype)->name;
out:
    free(logits);
    free(toks);
    sched_batch_free(sb);
    model_ctx_free(ctx);
    kv_table_free(t);
    kv_pool_free(pool);
    model_free(m);
    kern_backend_free(be);
    return rc;
}

int
main(int argc, char **argv)
{
    const char *models[MAX_MODELS];
    uint32_t n_models = 0, threads[MAX_THREADS] = {1, 2}, n_threads = 2;
    uint32_t n_prompt = 128, n_decode = 32;
    const char *json = "bench/out/engine.json";
    static const struct option lo[] = {
        {"model", 1, 0, 'm'},  {"threads", 1, 0, 't'}, {"prompt", 1, 0, 'p'},
        {"decode", 1, 0, 'd'}, {"json", 1, 0, 'j'},    {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'm':
            if (n_models < MAX_MODELS)
                models[n_models++] = optarg;
            break;
        case 't': {
            n_threads = 0;
            for (char *s = strtok(optarg, ","); s && n_threads < MAX_THREADS; s = strtok(NULL, ","))
                threads[n_threads++] = (uint32_t)atoi(s);
            break;
        }
        case 'p':
            n_prompt = (uint32_t)atoi(optarg);
            break;
        case 'd':
            n_decode = (uint32_t)atoi(optarg);
            break;
        case 'j':
            json = optarg;
            break;
        default:
            fprintf(stderr, "usage: bench_engine --model F.gguf [--model ...] [--threads 1,2] "
                            "[--prompt N] [--decode N] [--json FILE]\n");
            return 2;
        }
    }
    if (n_models == 0 || n_prompt == 0 || n_decode == 0) {
        fprintf(stderr, "bench_engine: give at least one --model\n");
        return 2;
    }
    for (uint32_t i = 0; i < n_threads; i++)
        if (threads[i] == 0 || threads[i] > MAX_THREADS)
            return 2;
    double bw[MAX_THREADS];
    for (uint32_t i = 0; i < n_threads; i++)
        bw[i] = copy_bandwidth(threads[i]);

    result_t res[MAX_MODELS * MAX_THREADS];
    uint32_t n_res = 0;
    printf("%-28s %-5s %3s %12s %11s %12s %9s %8s %7s\n", "model", "type", "thr", "prefill t/s",
           "decode t/s", "ceiling t/s", "ratio", "GB/s", "vs f16");
    for (uint32_t mi = 0; mi < n_models; mi++) {
        for (uint32_t ti = 0; ti < n_threads; ti++) {
            result_t *r = &res[n_res];
            memset(r, 0, sizeof *r);
            r->model = models[mi];
            /* The machine may be shared: the ceiling uses the best copy
             * bandwidth seen so far for this thread count, which only makes
             * the ratio conservative. */
            double now = copy_bandwidth(threads[ti]);
            if (now > bw[ti])
                bw[ti] = now;
            if (bench_one(models[mi], threads[ti], n_prompt, n_decode, bw[ti], r))
                return 1;
            const char *base = strrchr(models[mi], '/');
            double f16 = f16_decode(res, n_res + 1, threads[ti]);
            r->vs_f16 = f16 > 0 ? r->decode_tps / f16 : 0.0;
            char vs[16] = "-";
            if (r->vs_f16 > 0)
                snprintf(vs, sizeof vs, "%.2fx", r->vs_f16);
            printf("%-28s %-5s %3u %12.1f %11.2f %12.2f %8.1f%% %8.1f %7s\n",
                   base ? base + 1 : models[mi], r->wtype, r->threads, r->prefill_tps,
                   r->decode_tps, r->ceiling_tps, 100.0 * r->decode_tps / r->ceiling_tps,
                   r->bandwidth / 1e9, vs);
            fflush(stdout);
            n_res++;
        }
    }
    FILE *f = fopen(json, "w");
    if (f == NULL) {
        fprintf(stderr, "bench_engine: cannot write %s\n", json);
        return 1;
    }
    fprintf(f,
            "{\"bench\": \"engine\", \"prompt_tokens\": %u, \"decode_tokens\": %u, "
            "\"results\": [",
            n_prompt, n_decode);
    for (uint32_t i = 0; i < n_res; i++) {
        const result_t *r = &res[i];
        fprintf(f,
                "%s\n  {\"model\": \"%s\", \"weight_type\": \"%s\", \"threads\": %u, "
                "\"prefill_tok_s\": %.2f, \"decode_tok_s\": %.3f, \"copy_bandwidth_gb_s\": %.2f, "
                "\"bytes_per_token\": %zu, \"decode_ceiling_tok_s\": %.3f, "
                "\"decode_ratio\": %.4f, \"decode_vs_f16\": %.4f}",
                i ? "," : "", r->model, r->wtype, r->threads, r->prefill_tps, r->decode_tps,
                r->bandwidth / 1e9, r->bytes_per_token, r->ceiling_tps,
                r->decode_tps / r->ceiling_tps, r->vs_f16);
    }
    fprintf(f, "\n]}\n");
    fclose(f);
    printf("json: %s\n", json);
    return 0;
}
