/*
 * bench/bench_spec_decode.c — what speculative decoding by prompt lookup
 * (sched_cfg_t.num_speculative_tokens), or by a draft model (--draft:
 * sched_cfg_t.spec_draft_model), saves: decode time of greedy
 * requests through the engine without it (the baseline, same run) and
 * with each number of proposed tokens, on four workloads of the bundled
 * byte-level model's kind: copying a string from the prompt, continuing a
 * repetitive text, answering a passkey question (a few tokens), and
 * continuing random bytes (proposals rarely hold: the cost side).  Each
 * row also checks that the output is the baseline's.  The speedup is the
 * decode phase's (every first token out to the last finish); "e2e" is
 * submit to the last finish, which counts the draft's prompt too.
 * --temperature T makes the requests sample (seeded, top-p 0.95), and
 * --acceptance picks how a draft's proposals are verified: exact (the
 * outputs must be the baseline's), rejection (sched_cfg_t.spec_rejection:
 * the outputs keep the baseline's distribution, not its draws, so they
 * are not compared at a temperature) or both, each k run each way.
 *
 *   bench_spec_decode [--model M.gguf] [--draft D.gguf] [--k 2,4,8] [--batch 1,8]
 *                     [--prompt 1536] [--max-tokens 256] [--repeat 2] [--threads N]
 *                     [--temperature 0] [--acceptance exact|rejection|both] [--json FILE]
 *
 * Each configuration runs --repeat times, alternating with the others of
 * its row, and keeps its fastest run: the machines are shared and noisy.
 */
#include "bench_util.h"
#include "sched/sched.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_K 6
#define MAX_RUNS (1 + 2 * MAX_K)
#define MAX_BATCH 4
#define MAX_REQ 64

typedef struct run {
    double decode_s; /* every request's first token out to the last finish */
    double total_s;  /* submit to the last finish */
    uint64_t tokens, steps, draft, accepted;
    int32_t *out; /* [batch][max_tokens] */
    uint32_t *n_out;
} run_t;

static const char NOISE[] = "The grass is green. The sky is blue. The sun is yellow. Here we go. "
                            "There and back again. ";

static uint64_t
rng_next(uint64_t *x)
{
    *x = kvs_mix64(*x + 0x9e3779b97f4a7c15ull);
    return *x;
}

/* Workload w's prompt for request i, n bytes, as byte tokens (the bundled
 * models' vocabulary: token = byte). */
static uint32_t
make_prompt(int w, uint32_t i, uint32_t n, int32_t *p)
{
    static const char alpha[] = "abcdefghijklmnopqrstuvwxyz0123456789 ";
    uint64_t x = 0x5eed + i * 7919 + (uint64_t)w * 104729;
    uint32_t k = 0;
    if (w == 0) { /* copy: a random string, then "\n|": the model repeats it */
        uint32_t half = n > 6 ? (n - 3) / 2 : 1;
        for (; k < half; k++)
            p[k] = (unsigned char)alpha[rng_next(&x) % (sizeof alpha - 1)];
        p[k++] = '\n';
        p[k++] = '|';
    } else if (w == 1) { /* repetitive text to continue */
        for (uint32_t off = (uint32_t)(rng_next(&x) % (sizeof NOISE - 1)); k < n; k++)
            p[k] = (unsigned char)NOISE[(off + k) % (sizeof NOISE - 1)];
    } else if (w == 2) { /* passkey: the answer is 5 digits */
        char key[8];
        snprintf(key, sizeof key, "%05u", (unsigned)(rng_next(&x) % 90000 + 10000));
        char needle[96], q[96];
        int nn = snprintf(needle, sizeof needle,
                          "The pass key is %s. Remember it. %s is the pass key. ", key, key);
        int nq = snprintf(q, sizeof q, "\nWhat is the pass key? The pass key is");
        uint32_t body = n - (uint32_t)nq, at = body / 2;
        for (uint32_t j = 0; k < body; j++) {
            if (k == at)
                for (int c = 0; c < nn && k < body; c++)
                    p[k++] = (unsigned char)needle[c];
            else
                p[k++] = (unsigned char)NOISE[j % (sizeof NOISE - 1)];
        }
        for (int c = 0; c < nq; c++)
            p[k++] = (unsigned char)q[c];
    } else { /* random bytes */
        for (; k < n; k++)
            p[k] = (int32_t)(32 + rng_next(&x) % 95);
    }
    return k;
}

static const char *const WORKLOAD[] = {"copy", "continue", "passkey", "random"};
#define N_WORK 4

/* One configuration of a row: k proposed tokens (0: the baseline), verified
 * by rejection sampling or not. */
typedef struct conf {
    uint32_t k;
    bool rejection;
} conf_t;

static int
run_one(model_t *m, model_t *draft, int w, uint32_t batch, uint32_t n_prompt, uint32_t max_tokens,
        conf_t c, float temperature, run_t *out)
{
    uint32_t k = c.k;
    sched_cfg_t cfg = {.max_num_seqs = batch,
                       .max_num_batched_tokens = 2048,
                       .max_model_len = n_prompt + max_tokens + 8,
                       .block_tokens = 16,
                       .n_blocks = batch * ((n_prompt + max_tokens) / 16 + 4),
                       .kv_dtype = KERN_F16,
                       .num_speculative_tokens = k,
                       .draft = k ? draft : NULL,
                       .spec_draft_model = k && draft,
                       .spec_rejection = k && draft && c.rejection};
    sched_t *s;
    int rc = sched_new(m, &cfg, &s);
    if (rc)
        return rc;
    int32_t *p = malloc((size_t)n_prompt * sizeof *p);
    if (p == NULL) {
        sched_free(s);
        return KVS_ENOMEM;
    }
    for (uint32_t i = 0; i < batch && rc == 0; i++) {
        uint32_t n = make_prompt(w, i, n_prompt, p);
        sched_request_t r = {.id = i,
                             .prompt = p,
                             .n_prompt = n,
                             .max_tokens = max_tokens,
                             .ignore_eos = true,
                             .sampling = {.temperature = temperature,
                                          .top_p = temperature > 0.0f ? 0.95f : 1.0f,
                                          .seed = 1000 + i}};
        rc = sched_submit(s, &r);
    }
    free(p);
    uint64_t t_start = kvs_now_ns();
    bench_decode_t bd = {0};
    if (rc == 0)
        rc = bench_decode(s, batch, max_tokens, out->out, out->n_out, &bd);
    out->tokens = bd.tokens;
    sched_load_t l;
    sched_get_load(s, &l);
    out->decode_s = (double)(bd.t_end - bd.t_first) / 1e9;
    out->total_s = (double)(bd.t_end - t_start) / 1e9;
    out->steps = l.steps - bd.steps_at_first;
    out->draft = l.spec_draft_tokens;
    out->accepted = l.spec_accepted_tokens;
    sched_free(s);
    return rc;
}

int
main(int argc, char **argv)
{
    const char *model = "weights/kvserve-main.gguf", *draft_path = NULL, *json = NULL;
    uint32_t ks[MAX_K] = {2, 4, 8}, n_k = 3, batches[MAX_BATCH] = {1, 8}, n_b = 2;
    uint32_t n_prompt = 1536, max_tokens = 256, threads = 0, repeat = 2;
    float temperature = 0.0f;
    const char *acceptance = "exact";
    static const struct option lo[] = {
        {"model", 1, 0, 'm'},       {"k", 1, 0, 'k'},          {"batch", 1, 0, 'b'},
        {"prompt", 1, 0, 'p'},      {"max-tokens", 1, 0, 'n'}, {"threads", 1, 0, 't'},
        {"repeat", 1, 0, 'r'},      {"json", 1, 0, 'j'},       {"draft", 1, 0, 'd'},
        {"temperature", 1, 0, 'T'}, {"acceptance", 1, 0, 'a'}, {0, 0, 0, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case 'm':
            model = optarg;
            break;
        case 'd':
            draft_path = optarg;
            break;
        case 'k':
            n_k = bench_parse_list(optarg, ks, MAX_K);
            break;
        case 'b':
            n_b = bench_parse_list(optarg, batches, MAX_BATCH);
            break;
        case 'p':
            n_prompt = (uint32_t)atoi(optarg);
            break;
        case 'n':
            max_tokens = (uint32_t)atoi(optarg);
            break;
        case 't':
            threads = (uint32_t)atoi(optarg);
            break;
        case 'j':
            json = optarg;
            break;
        case 'r':
            repeat = (uint32_t)atoi(optarg);
            break;
        case 'T':
            temperature = strtof(optarg, NULL);
            break;
        case 'a':
            acceptance = optarg;
            break;
        default:
            fprintf(stderr,
                    "usage: bench_spec_decode [--model M.gguf] [--draft D.gguf] [--k 2,4,8] "
                    "[--batch 1,8] [--prompt 1536] [--max-tokens 256] [--repeat 2] "
                    "[--threads N] [--temperature 0] [--acceptance exact|rejection|both] "
                    "[--json FILE]\n");
            return 2;
        }
    }
    bool both = strcmp(acceptance, "both") == 0, rej = strcmp(acceptance, "rejection") == 0;
    bool ok = n_prompt >= 128 && max_tokens >= 2 && n_k > 0 && n_b > 0 && repeat >= 1 &&
              temperature >= 0.0f && temperature <= 2.0f &&
              (both || rej || strcmp(acceptance, "exact") == 0) &&
              (!(both || rej) || draft_path != NULL);
    for (uint32_t i = 0; i < n_k; i++)
        ok &= ks[i] >= 1 && ks[i] <= SCHED_MAX_SPEC_TOKENS;
    for (uint32_t i = 0; i < n_b; i++)
        ok &= batches[i] >= 1 && batches[i] <= MAX_REQ;
    if (!ok) {
        fprintf(stderr,
                "bench_spec_decode: --prompt >= 128, --max-tokens >= 2, --k in 1..%d, "
                "--batch in 1..%d, --temperature in 0..2, --acceptance exact, rejection or "
                "both (the last two with --draft)\n",
                SCHED_MAX_SPEC_TOKENS, MAX_REQ);
        return 2;
    }
    kern_backend_t *be;
    kern_backend_cfg_t bc = {.n_threads = threads};
    model_t *m, *draft = NULL;
    char err[512] = "";
    if (kern_backend_new("cpu", &bc, &be) || model_load(model, be, &m, err, sizeof err)) {
        fprintf(stderr, "bench_spec_decode: cannot load %s: %s\n", model, err);
        return 1;
    }
    if (draft_path && model_load(draft_path, be, &draft, err, sizeof err)) {
        fprintf(stderr, "bench_spec_decode: cannot load %s: %s\n", draft_path, err);
        return 1;
    }
    if (model_hparams(m)->n_vocab < 256) {
        fprintf(stderr,
                "bench_spec_decode: %s: the prompts are bytes, the vocabulary has %u "
                "tokens\n",
                model, model_hparams(m)->n_vocab);
        return 1;
    }
    FILE *jf = json ? fopen(json, "w") : NULL;
    if (json && jf == NULL) {
        fprintf(stderr, "bench_spec_decode: cannot write %s\n", json);
        return 1;
    }
    if (jf)
        fprintf(jf,
                "{\"bench\": \"spec_decode\", \"model\": \"%s\", \"method\": \"%s\", "
                "\"draft\": \"%s\", \"prompt_tokens\": %u, \"max_tokens\": %u, "
                "\"temperature\": %g, \"runs\": [",
                model, draft ? "draft" : "ngram", draft ? draft_path : "", n_prompt, max_tokens,
                temperature);
    printf("%s, prompts of %u tokens, %u tokens each (%s), proposals by %s%s\n", model, n_prompt,
           max_tokens, temperature > 0.0f ? "seeded draws, top-p 0.95" : "greedy",
           draft ? "the draft model " : "prompt lookup 4..2 tokens", draft ? draft_path : "");
    if (temperature > 0.0f)
        printf("temperature %g\n", temperature);
    printf("%-9s %5s %3s %9s %10s %10s %10s %9s %9s %8s %8s\n", "workload", "batch", "k", "accept",
           "tok/s", "tok/step", "accepted", "of drafts", "speedup", "e2e", "output");
    conf_t confs[MAX_RUNS] = {{0, false}};
    uint32_t n_conf = 1;
    for (uint32_t i = 0; i < n_k; i++) {
        if (!rej)
            confs[n_conf++] = (conf_t){ks[i], false};
        if (rej || both)
            confs[n_conf++] = (conf_t){ks[i], true};
    }
    run_t runs[MAX_RUNS], tmp;
    size_t cap = (size_t)MAX_REQ * max_tokens;
    for (uint32_t i = 0; i < MAX_RUNS; i++) {
        runs[i].out = malloc(cap * sizeof *runs[i].out);
        runs[i].n_out = calloc(MAX_REQ, sizeof *runs[i].n_out);
        if (!runs[i].out || !runs[i].n_out)
            return 1;
    }
    tmp.out = malloc(cap * sizeof *tmp.out);
    tmp.n_out = calloc(MAX_REQ, sizeof *tmp.n_out);
    if (!tmp.out || !tmp.n_out)
        return 1;
    int status = 0, first = 1;
    for (int w = 0; w < N_WORK; w++)
        for (uint32_t bi = 0; bi < n_b; bi++) {
            uint32_t b = batches[bi];
            for (uint32_t rep = 0; rep < repeat; rep++)
                for (uint32_t ki = 0; ki < n_conf; ki++) {
                    int rc =
                        run_one(m, draft, w, b, n_prompt, max_tokens, confs[ki], temperature, &tmp);
                    if (rc) {
                        fprintf(stderr, "bench_spec_decode: %s, batch %u, k %u: %s\n", WORKLOAD[w],
                                b, confs[ki].k, kvs_strerror(rc));
                        return 1;
                    }
                    if (rep == 0 || tmp.decode_s < runs[ki].decode_s) { /* keep the fastest */
                        run_t t = runs[ki];
                        runs[ki] = tmp;
                        tmp = t;
                    }
                }
            const run_t base = runs[0];
            for (uint32_t ki = 0; ki < n_conf; ki++) {
                uint32_t k = confs[ki].k;
                const run_t *x = &runs[ki];
                /* Rejection sampling keeps the distribution, not the draws. */
                bool check = ki && !(confs[ki].rejection && temperature > 0.0f), same = true;
                for (uint32_t i = 0; check && i < b; i++)
                    same &=
                        x->n_out[i] == base.n_out[i] &&
                        memcmp(x->out + (size_t)i * max_tokens, base.out + (size_t)i * max_tokens,
                               x->n_out[i] * sizeof *x->out) == 0;
                if (!same)
                    status = 1;
                double tps = (double)x->tokens / x->decode_s;
                double speedup = base.decode_s / x->decode_s, e2e = base.total_s / x->total_s;
                double acc = x->draft ? (double)x->accepted / (double)x->draft : 0.0;
                printf("%-9s %5u %3u %9s %10.1f %10.2f %10llu %8.0f%% %8.2fx %7.2fx %8s\n",
                       WORKLOAD[w], b, k,
                       !ki                   ? "-"
                       : confs[ki].rejection ? "rejection"
                                             : "exact",
                       tps, (double)x->tokens / (double)(x->steps ? x->steps : 1),
                       (unsigned long long)x->accepted, 100.0 * acc, speedup, e2e,
                       !ki      ? "baseline"
                       : !check ? "n/a"
                       : same   ? "same"
                                : "DIFFERS");
                fflush(stdout);
                if (jf)
                    fprintf(jf,
                            "%s{\"workload\": \"%s\", \"batch\": %u, \"k\": %u, "
                            "\"acceptance\": \"%s\", \"tok_s\": %.2f, "
                            "\"tokens\": %llu, \"steps\": %llu, \"draft\": %llu, "
                            "\"accepted\": %llu, \"speedup\": %.3f, \"e2e_speedup\": %.3f, "
                            "\"same_output\": %s}",
                            first ? "" : ", ", WORKLOAD[w], b, k,
                            confs[ki].rejection ? "rejection" : "exact", tps,
                            (unsigned long long)x->tokens, (unsigned long long)x->steps,
                            (unsigned long long)x->draft, (unsigned long long)x->accepted, speedup,
                            e2e,
                            !check ? "null"
                            : same ? "true"
                                   : "false");
                first = 0;
            }
        }
    if (jf) {
        fprintf(jf, "]}\n");
        fclose(jf);
        printf("json: %s\n", json);
    }
    if (status)
        fprintf(stderr, "bench_spec_decode: an output differs from the baseline's\n");
    for (uint32_t i = 0; i < MAX_RUNS; i++) {
        free(runs[i].out);
        free(runs[i].n_out);
    }
    free(tmp.out);
    free(tmp.n_out);
    model_free(draft);
    model_free(m);
    kern_backend_free(be);
    return status;
}
