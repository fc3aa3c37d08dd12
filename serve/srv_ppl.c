/*
 * serve/srv_ppl.c — `kvserve perplexity`: how well a model predicts a text
 * through the engine, under an attention and KV policy, the measure
 * long-context papers report beside retrieval (kvserve eval).
 *
 * For each context length in --ctx the text's tokens are cut into windows
 * of ctx - 1 tokens behind a BOS, and each window's last --score tokens
 * are scored by the log-probability the model gives each: perplexity =
 * exp(mean negative log-likelihood).  --scoring decode (the default): the
 * window's first tokens are its prompt, prefilled as the policy says
 * (sparse prefill, eviction, compression, quantized KV), and the scored
 * tokens are fed one at a time as teacher-forced output
 * (sched_request_t.forced): what decoding after that prefill sees
 * (--num-speculative-tokens N feeds them N + 1 a step, as verified
 * proposals, with the same rows up to batching's rounding).
 * --scoring prefill: the window but its last token is the prompt, and the
 * scored tokens get its last rows' prompt_logprobs (the last token forced
 * after it, from the prompt's last row): what the policy's own prefill
 * rows compute (a sparse attention's loss shows there first).  Under
 * dense attention and full KV both give the same numbers.
 * Windows run together with continuous batching.  The same windows under
 * dense attention and full KV are the baseline a policy compares with.
 */
#include "srv_int.h"

#include <getopt.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char ppl_usage[] =
    "usage: kvserve perplexity (--file F | --text TEXT) [--model PATH] [--ctx 512[,1024...]]\n"
    "                          [--score N (128, at most ctx / 2)] [--windows N (16)]\n"
    "                          [--threads N] [--device cpu|ref|cuda] [--max-num-seqs N]\n"
    "                          [--max-num-batched-tokens N] [--block-size N] [--sample-threads N]\n"
    "                          [--kv-cache-dtype ... and the KV flags as eval]\n"
    "                          [--attention ... as eval] [--scoring decode|prefill]\n"
    "                          [--num-speculative-tokens N (teacher forcing N + 1 tokens a\n"
    "                           step)] [--json FILE]\n";

#define MAX_CTX 16

typedef struct ppl_opts {
    const char *model, *file, *text, *json;
    uint32_t ctx[MAX_CTX], n_ctx;
    uint32_t score, windows;
    bool prefill_scoring; /* --scoring prefill */
    srv_engine_opts_t eng;
    srv_kv_opts_t kv;
    srv_specdec_opts_t specdec;
    model_attn_policy_t attn;
} ppl_opts_t;

/* One window: its request and what it scored. */
typedef struct window {
    uint32_t ci;   /* index into ctx */
    uint32_t from; /* --scoring prefill: the first scored prompt position */
    double nll;
    uint32_t scored;
    bool done;
} window_t;

static int
parse_opts(int argc, char **argv, ppl_opts_t *o)
{
    const char *C = "perplexity";
    enum {
        O_MODEL = 256,
        O_FILE,
        O_TEXT,
        O_CTX,
        O_SCORE,
        O_WIN,
        O_JSON,
        O_SCORING,
        O_HELP,
    };
    static const struct option lo[] = {
        {"model", 1, 0, O_MODEL},
        {"file", 1, 0, O_FILE},
        {"text", 1, 0, O_TEXT},
        {"ctx", 1, 0, O_CTX},
        {"score", 1, 0, O_SCORE},
        {"windows", 1, 0, O_WIN},
        {"json", 1, 0, O_JSON},
        {"help", 0, 0, O_HELP},
        {"scoring", 1, 0, O_SCORING},
        SRV_ATTN_LONGOPTS,
        SRV_KV_LONGOPTS,
        SRV_ENGINE_LONGOPTS,
        SRV_SPECDEC_LONGOPTS,
        {0, 0, 0, 0},
    };
    *o = (ppl_opts_t){.eng = SRV_ENGINE_DEFAULT,
                      .ctx = {512},
                      .n_ctx = 1,
                      .score = 128,
                      .windows = 16,
                      .kv = SRV_KV_DEFAULT,
                      .attn = SRV_ATTN_DEFAULT};
    opterr = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case O_MODEL:
            o->model = optarg;
            break;
        case O_FILE:
            o->file = optarg;
            break;
        case O_TEXT:
            o->text = optarg;
            break;
        case O_CTX:
            if ((rc = srv_parse_u32_list(C, "--ctx", optarg, 8, 1u << 24, o->ctx, MAX_CTX,
                                         &o->n_ctx)))
                fprintf(stderr, "kvserve perplexity: --ctx: up to %d lengths >= 8\n", MAX_CTX);
            break;
        case O_SCORE:
            rc = srv_parse_u32(C, "--score", optarg, 1, 1u << 23, &o->score);
            break;
        case O_WIN:
            rc = srv_parse_u32(C, "--windows", optarg, 1, 100000, &o->windows);
            break;
        case O_JSON:
            o->json = optarg;
            break;
        case O_SCORING:
            if (strcmp(optarg, "prefill") == 0 || strcmp(optarg, "decode") == 0) {
                o->prefill_scoring = optarg[0] == 'p';
            } else {
                fprintf(stderr, "kvserve perplexity: --scoring: decode or prefill, not '%s'\n",
                        optarg);
                rc = KVS_EINVAL;
            }
            break;
        case O_HELP:
            fputs(ppl_usage, stdout);
            return 1;
        default:
            if ((rc = srv_attn_opt(C, c, optarg, &o->attn)) == 1 &&
                (rc = srv_kv_opt(C, c, optarg, &o->kv)) == 1 &&
                (rc = srv_engine_opt(C, c, optarg, &o->eng)) == 1 &&
                (rc = srv_specdec_opt(C, c, optarg, &o->specdec)) == 1) {
                fprintf(stderr, "kvserve perplexity: unknown or incomplete option '%s'\n%s",
                        argv[optind - 1], ppl_usage);
                return KVS_EINVAL;
            }
        }
        if (rc) {
            fputs(ppl_usage, stderr);
            return rc;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kvserve perplexity: unexpected argument '%s'\n%s", argv[optind],
                ppl_usage);
        return KVS_EINVAL;
    }
    if (!o->file == !o->text) {
        fprintf(stderr, "kvserve perplexity: give the text with --file or --text (one)\n%s",
                ppl_usage);
        return KVS_EINVAL;
    }
    for (uint32_t i = 0; i < o->n_ctx; i++) {
        if (o->score > o->ctx[i] / 2) {
            fprintf(stderr,
                    "kvserve perplexity: --score %u is more than half of --ctx %u: the "
                    "scored tokens would see little context\n",
                    o->score, o->ctx[i]);
            return KVS_EINVAL;
        }
    }
    if (srv_attn_finish(C, &o->attn) || srv_kv_finish(C, &o->kv, o->eng.block_size) ||
        srv_specdec_finish(C, &o->specdec, false)) {
        fputs(ppl_usage, stderr);
        return KVS_EINVAL;
    }
    return 0;
}

/* Every window of every length as a request: BOS and the window's prompt
 * tokens, its last o->score tokens forced and scored (or, scoring the
 * prefill, all of them the prompt, the last ones' prompt_logprobs
 * scored).  Returns how many it submitted, or an error. */
static int
submit_windows(sched_t *s, const model_t *m, const ppl_opts_t *o, uint32_t max_ctx,
               const int32_t *toks, size_t n, window_t *w, size_t cap_w)
{
    int32_t bos = model_token_bos(m);
    size_t k = 0;
    int32_t *prompt = malloc((size_t)max_ctx * sizeof *prompt);
    if (prompt == NULL)
        return KVS_ENOMEM;
    for (uint32_t ci = 0; ci < o->n_ctx; ci++) {
        uint32_t body = o->ctx[ci] - 1; /* the BOS takes a position */
        for (size_t start = 0, i = 0; start + body <= n && i < o->windows && k < cap_w;
             start += body, i++, k++) {
            uint32_t np = 0;
            if (bos >= 0)
                prompt[np++] = bos;
            /* Scoring the prefill, the last token is forced too: its row
             * is the prompt's last, and the window stays ctx long. */
            uint32_t n_forced = o->prefill_scoring ? 1 : o->score;
            memcpy(prompt + np, toks + start, (size_t)(body - n_forced) * sizeof *prompt);
            np += body - n_forced;
            sched_request_t q = {.id = k,
                                 .prompt = prompt,
                                 .n_prompt = np,
                                 .max_tokens = n_forced,
                                 .ignore_eos = true,
                                 .sampling = {.top_p = 1.0f},
                                 .attn = o->attn,
                                 .kv = o->kv.policy,
                                 .logprobs = true,
                                 .prompt_logprobs = o->prefill_scoring,
                                 .forced = toks + start + body - n_forced,
                                 .n_forced = n_forced};
            int rc = sched_submit(s, &q);
            if (rc) {
                free(prompt);
                return rc;
            }
            w[k] = (window_t){.ci = ci, .from = np + n_forced - o->score};
        }
    }
    free(prompt);
    return (int)k;
}

static int
run_windows(sched_t *s, window_t *w, size_t n)
{
    size_t done = 0;
    while (done < n) {
        int live = sched_step(s);
        if (live < 0)
            return live;
        sched_event_t *ev;
        while ((ev = sched_poll(s)) != NULL) {
            window_t *x = &w[ev->req_id];
            if (ev->kind == SCHED_EV_PROMPT_LOGPROBS) {
                for (uint32_t i = 0; i < ev->n_plp; i++) {
                    if (ev->plp_first + i >= x->from) {
                        x->nll -= ev->plp[i].logprob;
                        x->scored++;
                    }
                }
            } else if (ev->kind == SCHED_EV_TOKEN) {
                x->nll -= ev->lp.logprob;
                x->scored++;
            } else {
                x->done = true;
                done++;
                if (ev->finish == SCHED_FINISH_ERROR) {
                    int rc = ev->error;
                    sched_event_free(ev);
                    return rc;
                }
            }
            sched_event_free(ev);
        }
        if (live == 0 && done < n)
            return KVS_EINTERNAL;
    }
    return 0;
}

int
srv_cmd_perplexity(int argc, char **argv)
{
    ppl_opts_t o;
    int rc = parse_opts(argc, argv, &o);
    if (rc)
        return rc == 1 ? 0 : 2;
    if (o.model == NULL && (o.model = srv_default_model()) == NULL) {
        fprintf(stderr, "kvserve perplexity: no --model given and no bundled model found\n");
        return 2;
    }
    int status = 1;
    char err[512] = "", *text = NULL;
    kern_backend_t *be = NULL;
    model_t *m = NULL;
    sched_t *s = NULL;
    int32_t *toks = NULL;
    window_t *w = NULL;
    size_t len = 0, n = 0;
    if (o.file) {
        text =
            strcmp(o.file, "-") == 0 ? srv_read_stream(stdin, &len) : srv_read_file(o.file, &len);
        if (text == NULL) {
            fprintf(stderr, "kvserve perplexity: --file: cannot read '%s'\n", o.file);
            return 2;
        }
    }
    kern_backend_cfg_t bcfg = {.n_threads = o.eng.threads};
    if ((rc = kern_backend_new(o.eng.device, &bcfg, &be))) {
        fprintf(stderr, "kvserve perplexity: --device %s: %s\n", o.eng.device, kvs_strerror(rc));
        status = 2;
        goto out;
    }
    if ((rc = model_load(o.model, be, &m, err, sizeof err))) {
        fprintf(stderr, "kvserve perplexity: cannot load model '%s': %s\n", o.model, err);
        goto out;
    }
    const model_hparams_t *hp = model_hparams(m);
    uint32_t max_ctx = 0;
    for (uint32_t i = 0; i < o.n_ctx; i++) {
        if (o.ctx[i] > hp->n_ctx_train) {
            fprintf(stderr, "kvserve perplexity: --ctx %u exceeds the model's context (%u)\n",
                    o.ctx[i], hp->n_ctx_train);
            status = 2;
            goto out;
        }
        max_ctx = o.ctx[i] > max_ctx ? o.ctx[i] : max_ctx;
    }
    if (o.text)
        len = strlen(o.text);
    /* Sized by the tokenizer: invalid UTF-8 can take more than a token a
     * byte. */
    if (model_vocab_tokenize_alloc(model_vocab(m), o.text ? o.text : text, len, 0, &toks, &n)) {
        fprintf(stderr, "kvserve perplexity: cannot tokenize the text\n");
        goto out;
    }
    size_t cap_w = (size_t)o.n_ctx * o.windows;
    for (uint32_t i = 0; i < o.n_ctx; i++) {
        if (n < o.ctx[i] - 1) {
            fprintf(stderr,
                    "kvserve perplexity: the text has %zu tokens, fewer than one window of "
                    "--ctx %u (%u and a BOS)\n",
                    n, o.ctx[i], o.ctx[i] - 1);
            status = 2;
            goto out;
        }
    }
    sched_cfg_t scfg = srv_engine_cfg(&o.eng, &o.kv, max_ctx);
    scfg.reserve_summaries = srv_attn_summaries(&o.attn);
    srv_specdec_apply(&o.specdec, &scfg);
    if ((w = calloc(cap_w, sizeof *w)) == NULL)
        goto out;
    if ((rc = sched_new(m, &scfg, &s))) {
        fprintf(stderr, "kvserve perplexity: setup failed: %s\n", kvs_strerror(rc));
        goto out;
    }
    uint64_t t0 = kvs_now_ns();
    int n_w = submit_windows(s, m, &o, max_ctx, toks, n, w, cap_w);
    if (n_w < 0 || (rc = run_windows(s, w, (size_t)n_w))) {
        fprintf(stderr, "kvserve perplexity: engine failed: %s\n",
                kvs_strerror(n_w < 0 ? n_w : rc));
        goto out;
    }
    double secs = (double)(kvs_now_ns() - t0) / 1e9;

    char pol[96], kvd[96];
    srv_attn_describe(&o.attn, pol, sizeof pol);
    /* JSON on stdout (--json -) keeps stdout one document. */
    FILE *tab = o.json && strcmp(o.json, "-") == 0 ? stderr : stdout;
    fprintf(tab,
            "model: %s\npolicy: attention %s, kv-cache %s\ntext: %zu tokens; the last %u of each "
            "window scored (%s)\n\n%8s  %7s  %7s  %10s  %10s\n",
            o.model, pol, srv_kv_describe(&o.kv, kvd, sizeof kvd), n, o.score,
            o.prefill_scoring ? "prefill rows" : "teacher-forced decode", "ctx", "windows",
            "scored", "nll/token", "perplexity");
    double nll[MAX_CTX] = {0};
    uint32_t wins[MAX_CTX] = {0}, scored[MAX_CTX] = {0};
    for (int i = 0; i < n_w; i++) {
        nll[w[i].ci] += w[i].nll;
        scored[w[i].ci] += w[i].scored;
        wins[w[i].ci]++;
    }
    for (uint32_t i = 0; i < o.n_ctx; i++) {
        double mean = scored[i] ? nll[i] / scored[i] : 0.0;
        fprintf(tab, "%8u  %7u  %7u  %10.4f  %10.4f\n", o.ctx[i], wins[i], scored[i], mean,
                exp(mean));
    }
    fprintf(stderr, "kvserve perplexity: %d windows in %.1f s\n", n_w, secs);
    if (o.json) {
        FILE *f = strcmp(o.json, "-") == 0 ? stdout : fopen(o.json, "w");
        if (f == NULL) {
            fprintf(stderr, "kvserve perplexity: --json: cannot write '%s'\n", o.json);
            goto out;
        }
        fprintf(f, "{\"model\": ");
        srv_json_str(f, o.model, strlen(o.model));
        fprintf(f,
                ", \"policy\": {\"attention\": \"%s\", \"kv_cache_dtype\": \"%s\"}, "
                "\"text_tokens\": %zu, \"score\": %u, \"scoring\": \"%s\", \"results\": [",
                pol, srv_kv_name(&o.kv), n, o.score, o.prefill_scoring ? "prefill" : "decode");
        for (uint32_t i = 0; i < o.n_ctx; i++) {
            double mean = scored[i] ? nll[i] / scored[i] : 0.0;
            fprintf(f,
                    "%s\n  {\"ctx\": %u, \"windows\": %u, \"scored_tokens\": %u, "
                    "\"nll_per_token\": %.6f, \"perplexity\": %.6f}",
                    i ? "," : "", o.ctx[i], wins[i], scored[i], mean, exp(mean));
        }
        fprintf(f, "\n]}\n");
        if (f != stdout)
            fclose(f);
    }
    status = 0;
out:
    free(w);
    free(toks);
    free(text);
    sched_free(s);
    model_free(m);
    kern_backend_free(be);
    return status;
}
