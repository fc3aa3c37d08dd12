/*
 * serve/srv_run.c — `kvserve run`: offline generation for one prompt
 * through the same engine the server runs (sched_step over the paged KV
 * cache, chunked prefill, the sampler).  Prints the text (or JSON), prefill and decode speed
 * on stderr, and optionally every step's logits as a .npy file, which the
 * reference tests compare against an independent implementation.
 */
#include "srv.h"
#include "srv_schema.h"

#include "model/model.h"
#include "sched/sched.h"

#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char run_usage[] =
    "usage: kvserve run [--model PATH] (--prompt TEXT | --prompt-tokens 1,2,3)\n"
    "                   [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--min-p P]\n"
    "                   [--repetition-penalty R] [--presence-penalty P] [--frequency-penalty F]\n"
    "                   [--logit-bias ID:BIAS,...] [--guided-choice STR... | --guided-regex RE\n"
    "                    | --guided-json SCHEMA|@FILE [--guided-whitespace-pattern RE]\n"
    "                    | --guided-grammar GBNF|@FILE]\n"
    "                   [--seed S] [--ignore-eos] [--threads N] [--device cpu|ref|cuda]\n"
    "                   [--block-size N] [--kv-cache-dtype f16|f32|bf16|q8_0|fp8|q4]\n"
    "                   [--kv-sink-tokens N] [--kv-residual-tokens N] [--batch-size N]\n"
    "                   [--kv-policy full|sink-eviction|snapkv|h2o] [--kv-budget N]\n"
    "                   [--max-model-len N] [--logits-out FILE.npy] [--json] [--cuda-graphs]\n"
    "                   [--num-speculative-tokens N (0..16) [--speculative-method ngram|draft]\n"
    "                    [--prompt-lookup-max 4] [--prompt-lookup-min 2]\n"
    "                    [--speculative-acceptance exact|rejection]] [--draft-model PATH]\n"
    "                   [--attention dense|sink-window|delta|block-sparse] [--attn-sinks N]\n"
    "                   [--attn-window N] [--delta-gamma N] [--attn-top-k N] [--decode-top-k N]\n";

typedef struct run_opts {
    const char *model, *draft, *prompt, *prompt_tokens, *logits_out, *device;
    uint32_t max_tokens, threads, block_size, batch_size, max_model_len;
    srv_kv_opts_t kv;
    srv_specdec_opts_t specdec;
    model_attn_policy_t attn;
    model_sampling_t sampling; /* its bias arrays malloc'd here */
    bool seed_set, ignore_eos, json, cuda_graphs;
    srv_guided_opts_t guided;
    const char **choices; /* --guided-choice, into argv (malloc'd array) */
    uint32_t n_choices;
} run_opts_t;

/* .npy v1.0 writer for a float32 [rows][cols] array whose row count is
 * known only at the end: the header is padded to a fixed 128 bytes and
 * rewritten on close. */
typedef struct npy {
    FILE *f;
    uint32_t cols, rows;
} npy_t;

static void
npy_header(npy_t *n)
{
    char h[128];
    int len = snprintf(h, sizeof h, "{'descr': '<f4', 'fortran_order': False, 'shape': (%u, %u), }",
                       n->rows, n->cols);
    memset(h + len, ' ', sizeof h - (size_t)len);
    h[sizeof h - 1] = '\n';
    static const unsigned char magic[8] = {0x93, 'N', 'U', 'M', 'P', 'Y', 1, 0};
    uint16_t hl = (uint16_t)(sizeof h - 10);
    fseek(n->f, 0, SEEK_SET);
    fwrite(magic, 1, 8, n->f);
    fwrite(&hl, 2, 1, n->f);
    fwrite(h, 1, sizeof h - 10, n->f);
}

static int
parse_opts(int argc, char **argv, run_opts_t *o)
{
    enum {
        O_MODEL = 256,
        O_PROMPT,
        O_PTOK,
        O_MAXTOK,
        O_TEMP,
        O_TOPK,
        O_TOPP,
        O_MINP,
        O_REP,
        O_PRES,
        O_FREQ,
        O_BIAS,
        O_GCHOICE,
        O_SEED,
        O_IGNEOS,
        O_THREADS,
        O_DEVICE,
        O_BS,
        O_BATCH,
        O_MML,
        O_LOGITS,
        O_JSON,
        O_GRAPHS,
        O_HELP,
        O_DRAFT,
    };
    static const struct option lo[] = {
        {"model", 1, 0, O_MODEL},
        {"draft-model", 1, 0, O_DRAFT},
        {"prompt", 1, 0, O_PROMPT},
        {"prompt-tokens", 1, 0, O_PTOK},
        {"max-tokens", 1, 0, O_MAXTOK},
        {"temperature", 1, 0, O_TEMP},
        {"top-k", 1, 0, O_TOPK},
        {"top-p", 1, 0, O_TOPP},
        {"min-p", 1, 0, O_MINP},
        {"repetition-penalty", 1, 0, O_REP},
        {"presence-penalty", 1, 0, O_PRES},
        {"frequency-penalty", 1, 0, O_FREQ},
        {"logit-bias", 1, 0, O_BIAS},
        SRV_GUIDED_LONGOPTS,
        {"guided-choice", 1, 0, O_GCHOICE},
        {"seed", 1, 0, O_SEED},
        {"ignore-eos", 0, 0, O_IGNEOS},
        {"threads", 1, 0, O_THREADS},
        {"device", 1, 0, O_DEVICE},
        {"block-size", 1, 0, O_BS},
        SRV_KV_LONGOPTS,
        {"batch-size", 1, 0, O_BATCH},
        {"max-model-len", 1, 0, O_MML},
        {"logits-out", 1, 0, O_LOGITS},
        {"json", 0, 0, O_JSON},
        {"cuda-graphs", 0, 0, O_GRAPHS},
        SRV_SPECDEC_LONGOPTS,
        SRV_ATTN_LONGOPTS,
        {"help", 0, 0, O_HELP},
        {0, 0, 0, 0},
    };
    /* Defaults follow llama.cpp's sampling defaults. */
    *o = (run_opts_t){
        .device = "cpu",
        .max_tokens = 128,
        .block_size = 16,
        .batch_size = 512,
        .kv = SRV_KV_DEFAULT,
        .attn = SRV_ATTN_DEFAULT,
        .sampling = {.temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f},
    };
    const char *C = "run";
    uint32_t u;
    opterr = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case O_MODEL:
            o->model = optarg;
            break;
        case O_DRAFT:
            o->draft = optarg;
            break;
        case O_PROMPT:
            o->prompt = optarg;
            break;
        case O_PTOK:
            o->prompt_tokens = optarg;
            break;
        case O_MAXTOK:
            rc = srv_parse_u32(C, "--max-tokens", optarg, 1, 1u << 24, &o->max_tokens);
            break;
        case O_TEMP:
            rc = srv_parse_f32(C, "--temperature", optarg, 0.0f, 100.0f, &o->sampling.temperature);
            break;
        case O_TOPK:
            rc = srv_parse_u32(C, "--top-k", optarg, 0, INT32_MAX, &u);
            o->sampling.top_k = (int32_t)u;
            break;
        case O_TOPP:
            rc = srv_parse_f32(C, "--top-p", optarg, 1e-6f, 1.0f, &o->sampling.top_p);
            break;
        case O_MINP:
            rc = srv_parse_f32(C, "--min-p", optarg, 0.0f, 1.0f, &o->sampling.min_p);
            break;
        case O_REP:
            rc = srv_parse_f32(C, "--repetition-penalty", optarg, SRV_REP_PENALTY_MIN,
                               SRV_REP_PENALTY_MAX, &o->sampling.repetition_penalty);
            break;
        case O_PRES:
            rc = srv_parse_f32(C, "--presence-penalty", optarg, -MODEL_PENALTY_MAX,
                               MODEL_PENALTY_MAX, &o->sampling.presence_penalty);
            break;
        case O_FREQ:
            rc = srv_parse_f32(C, "--frequency-penalty", optarg, -MODEL_PENALTY_MAX,
                               MODEL_PENALTY_MAX, &o->sampling.frequency_penalty);
            break;
        case SRV_O_GREGEX:
        case SRV_O_GJSON:
        case SRV_O_GWS:
        case SRV_O_GGRAMMAR:
            rc = srv_guided_opt(C, c, optarg, &o->guided);
            break;
        case O_GCHOICE:
            /* argc slots always suffice. */
            if (o->choices == NULL &&
                (o->choices = malloc((size_t)argc * sizeof *o->choices)) == NULL)
                rc = KVS_ENOMEM;
            else if (optarg[0] == '\0' || strlen(optarg) > MODEL_MAX_CHOICE_BYTES ||
                     o->n_choices == MODEL_MAX_CHOICES) {
                fprintf(stderr, "kvserve run: --guided-choice: 1..%d strings of 1..%d bytes\n",
                        MODEL_MAX_CHOICES, MODEL_MAX_CHOICE_BYTES);
                rc = KVS_EINVAL;
            } else
                o->choices[o->n_choices++] = optarg;
            break;
        case O_BIAS: {
            free((void *)o->sampling.bias_ids);
            free((void *)o->sampling.bias);
            int32_t *ids = NULL;
            float *b = NULL;
            rc = srv_parse_logit_bias(C, optarg, &ids, &b, &o->sampling.n_bias);
            o->sampling.bias_ids = ids;
            o->sampling.bias = b;
            break;
        }
        case O_SEED:
            rc = srv_parse_u64(C, "--seed", optarg, &o->sampling.seed);
            o->seed_set = true;
            break;
        case O_IGNEOS:
            o->ignore_eos = true;
            break;
        case O_THREADS:
            rc = srv_parse_u32(C, "--threads", optarg, 1, 1024, &o->threads);
            break;
        case O_DEVICE:
            o->device = optarg;
            break;
        case O_BS:
            rc = srv_parse_block_size("run", optarg, &o->block_size);
            break;
        case O_BATCH:
            rc = srv_parse_u32(C, "--batch-size", optarg, 1, 1u << 20, &o->batch_size);
            break;
        case O_MML:
            rc = srv_parse_u32(C, "--max-model-len", optarg, 1, 1u << 24, &o->max_model_len);
            break;
        case O_LOGITS:
            o->logits_out = optarg;
            break;
        case O_JSON:
            o->json = true;
            break;
        case O_GRAPHS:
            o->cuda_graphs = true;
            break;
        case O_HELP:
            fputs(run_usage, stdout);
            exit(0);
        default:
            if ((rc = srv_kv_opt(C, c, optarg, &o->kv)) == 1 &&
                (rc = srv_specdec_opt(C, c, optarg, &o->specdec)) == 1 &&
                (rc = srv_attn_opt(C, c, optarg, &o->attn)) == 1) {
                fprintf(stderr, "kvserve run: unknown or incomplete option '%s'\n%s",
                        argv[optind - 1], run_usage);
                return KVS_EINVAL;
            }
            break;
        }
        if (rc) {
            fputs(run_usage, stderr);
            return rc;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kvserve run: unexpected argument '%s'\n%s", argv[optind], run_usage);
        return KVS_EINVAL;
    }
    if (srv_kv_finish(C, &o->kv, o->block_size) ||
        srv_specdec_finish(C, &o->specdec, o->draft != NULL) || srv_attn_finish(C, &o->attn)) {
        fputs(run_usage, stderr);
        return KVS_EINVAL;
    }
    if (o->draft && !o->specdec.draft) {
        fprintf(stderr, "kvserve run: --draft-model goes with --speculative-method draft\n");
        return KVS_EINVAL;
    }
    if ((o->prompt == NULL) == (o->prompt_tokens == NULL)) {
        fprintf(stderr, "kvserve run: give exactly one of --prompt and --prompt-tokens\n%s",
                run_usage);
        return KVS_EINVAL;
    }
    if (o->cuda_graphs && strcmp(o->device, "cuda") != 0) {
        fprintf(stderr, "kvserve run: --cuda-graphs needs --device cuda\n");
        return KVS_EINVAL;
    }
    if (!o->seed_set)
        o->sampling.seed = (uint64_t)time(NULL) ^ ((uint64_t)clock() << 32);
    return 0;
}

typedef struct run_state {
    model_t *m, *draft;
    kern_backend_t *be;
    sched_t *sched;
    int32_t *prompt, *out_tokens;
    srv_buf_t text;
    npy_t npy;
    int32_t *bias_ids; /* --logit-bias's arrays */
    float *bias;
    srv_guided_opts_t guided; /* the flags' texts */
    model_guide_t *guide;
    const char **choices;
} run_state_t;

static void
run_state_free(run_state_t *s)
{
    sched_free(s->sched);
    model_free(s->draft);
    model_free(s->m);
    kern_backend_free(s->be);
    free(s->prompt);
    free(s->out_tokens);
    free(s->text.p);
    free(s->bias_ids);
    free(s->bias);
    srv_guided_free(&s->guided);
    model_guide_free(s->guide);
    free(s->choices);
    if (s->npy.f)
        fclose(s->npy.f);
}

static void
on_logits(void *arg, uint64_t req_id, const float *logits, uint32_t n_vocab)
{
    (void)req_id;
    npy_t *n = arg;
    fwrite(logits, sizeof(float), n_vocab, n->f);
    n->rows++;
}

int
srv_cmd_run(int argc, char **argv)
{
    run_opts_t o;
    run_state_t s = {0};
    int rc = parse_opts(argc, argv, &o);
    s.bias_ids = (int32_t *)o.sampling.bias_ids;
    s.bias = (float *)o.sampling.bias;
    s.guided = o.guided;
    s.choices = o.choices;
    if (rc == 0 && o.model == NULL && (o.model = srv_default_model()) == NULL) {
        fprintf(stderr, "kvserve run: no --model given and no bundled model found "
                        "(weights/kvserve-main.gguf)\n");
        rc = KVS_EINVAL;
    }
    if (rc) {
        run_state_free(&s);
        return 2;
    }
    int status = 1;
    char err[512] = "";
    kern_backend_cfg_t bcfg = {.n_threads = o.threads};
    if ((rc = kern_backend_new(o.device, &bcfg, &s.be))) {
        fprintf(stderr, "kvserve run: --device %s: %s\n", o.device,
                rc == KVS_EINVAL ? "unknown device (cpu, ref, cuda)" : kvs_strerror(rc));
        status = 2;
        goto out;
    }
    if ((rc = model_load(o.model, s.be, &s.m, err, sizeof err))) {
        fprintf(stderr, "kvserve run: cannot load model '%s': %s\n", o.model, err);
        goto out;
    }
    if (o.draft && (rc = srv_load_draft("run", o.draft, s.m, &s.draft)))
        goto out;
    const model_hparams_t *hp = model_hparams(s.m);
    for (uint32_t i = 0; i < o.sampling.n_bias; i++) {
        if ((uint32_t)o.sampling.bias_ids[i] >= hp->n_vocab) {
            fprintf(stderr, "kvserve run: --logit-bias: id %d is outside the vocabulary (%u)\n",
                    o.sampling.bias_ids[i], hp->n_vocab);
            status = 2;
            goto out;
        }
    }
    const srv_guided_opts_t *gd = &o.guided;
    if (srv_guided_check("run", gd, o.n_choices > 0)) {
        status = 2;
        goto out;
    }
    if (gd->regex || gd->json || gd->grammar) {
        const char *field;
        rc = srv_guide_new(s.m, gd->grammar, gd->regex, gd->json, gd->ws, &s.guide, &field, err,
                           sizeof err);
        if (rc) {
            char flag[32]; /* the field's flag: guided_json -> guided-json */
            snprintf(flag, sizeof flag, "%s", field);
            for (char *c = flag; *c; c++)
                *c = *c == '_' ? '-' : *c;
            fprintf(stderr, "kvserve run: --%s: %s\n", flag,
                    rc == KVS_ENOMEM ? "out of memory" : err);
            status = 2;
            goto out;
        }
    }

    size_t n_prompt = 0;
    if (o.prompt_tokens) {
        if (srv_parse_tokens("run", "--prompt-tokens", o.prompt_tokens, &s.prompt, &n_prompt)) {
            status = 2;
            goto out;
        }
        for (size_t i = 0; i < n_prompt; i++) {
            if ((uint32_t)s.prompt[i] >= hp->n_vocab) {
                fprintf(stderr,
                        "kvserve run: --prompt-tokens: id %d is outside the "
                        "vocabulary (%u tokens)\n",
                        s.prompt[i], hp->n_vocab);
                status = 2;
                goto out;
            }
        }
    } else {
        if (model_vocab_tokenize_alloc(model_vocab(s.m), o.prompt, strlen(o.prompt),
                                       MODEL_TOK_ADD_SPECIAL, &s.prompt, &n_prompt)) {
            fprintf(stderr,
                    "kvserve run: --prompt: cannot tokenize the text with the '%s' "
                    "tokenizer\n",
                    model_tokenizer_name(s.m));
            status = 2;
            goto out;
        }
    }
    if (n_prompt == 0) {
        fprintf(stderr, "kvserve run: the prompt is empty\n");
        status = 2;
        goto out;
    }
    uint32_t max_len = o.max_model_len ? o.max_model_len : hp->n_ctx_train;
    if (n_prompt + o.max_tokens > max_len) {
        fprintf(stderr,
                "kvserve run: prompt (%zu tokens) + --max-tokens (%u) exceeds the "
                "maximum model length %u (see --max-model-len)\n",
                n_prompt, o.max_tokens, max_len);
        status = 2;
        goto out;
    }

    /* The same engine the server runs, with one request (and room for a
     * last step's proposed tokens, which a pool too short for skips). */
    size_t total = n_prompt + o.max_tokens + o.specdec.num_tokens;
    sched_cfg_t scfg = {
        .max_num_seqs = 1,
        .max_num_batched_tokens = o.batch_size,
        .max_model_len = max_len,
        .block_tokens = o.block_size,
        .n_blocks = (uint32_t)((total + o.block_size - 1) / o.block_size),
        .cuda_graphs = o.cuda_graphs,
        .reserve_summaries = srv_attn_summaries(&o.attn),
    };
    srv_kv_apply(&o.kv, &scfg);
    srv_specdec_apply(&o.specdec, &scfg);
    scfg.draft = s.draft;
    if (o.kv.quant != KERN_KVQ_NONE) {
        /* Room for every block in either kind. */
        scfg.kv_hot_blocks = scfg.n_blocks;
        scfg.n_blocks *= 2;
    }
    if ((rc = sched_new(s.m, &scfg, &s.sched))) {
        fprintf(stderr, "kvserve run: setup failed: %s\n", kvs_strerror(rc));
        goto out;
    }
    s.out_tokens = malloc((size_t)o.max_tokens * sizeof(int32_t));
    if (!s.out_tokens)
        goto out;
    if (o.logits_out) {
        s.npy.f = fopen(o.logits_out, "wb");
        s.npy.cols = hp->n_vocab;
        if (s.npy.f == NULL) {
            fprintf(stderr, "kvserve run: --logits-out: cannot open '%s'\n", o.logits_out);
            goto out;
        }
        npy_header(&s.npy);
        sched_set_logits_hook(s.sched, on_logits, &s.npy);
    }
    sched_request_t req = {.id = 1,
                           .prompt = s.prompt,
                           .n_prompt = (uint32_t)n_prompt,
                           .max_tokens = o.max_tokens,
                           .sampling = o.sampling,
                           .ignore_eos = o.ignore_eos,
                           .kv = o.kv.policy,
                           .attn = o.attn,
                           .guide = s.guide,
                           .choices = o.choices,
                           .n_choices = o.n_choices};
    if ((rc = sched_submit(s.sched, &req))) {
        fprintf(stderr, "kvserve run: request refused: %s\n", kvs_strerror(rc));
        goto out;
    }
    uint32_t n_out = 0;
    const char *finish = NULL;
    sched_usage_t usage = {0};
    while (finish == NULL) {
        if ((rc = sched_step(s.sched)) < 0) {
            fprintf(stderr, "kvserve run: engine step failed: %s\n", kvs_strerror(rc));
            goto out;
        }
        sched_event_t *ev;
        while ((ev = sched_poll(s.sched)) != NULL) {
            if (ev->kind == SCHED_EV_TOKEN) {
                s.out_tokens[n_out++] = ev->token;
                size_t at = s.text.len;
                srv_buf_put_token(&s.text, s.m, ev->token);
                if (!o.json && s.text.len > at) {
                    fwrite(s.text.p + at, 1, s.text.len - at, stdout);
                    fflush(stdout);
                }
            } else {
                finish = sched_finish_name(ev->finish);
                usage = ev->usage;
                if (ev->finish == SCHED_FINISH_ERROR)
                    fprintf(stderr, "kvserve run: generation failed: %s\n",
                            kvs_strerror(ev->error));
            }
            sched_event_free(ev);
        }
        if (rc == 0 && finish == NULL) {
            fprintf(stderr, "kvserve run: the engine went idle without finishing\n");
            goto out;
        }
    }
    if (strcmp(finish, "error") == 0)
        goto out;
    if (s.text.oom) {
        fprintf(stderr, "kvserve run: out of memory for the text\n");
        goto out;
    }
    /* The first token comes out of the prefill, the rest out of decode steps. */
    double pf_s = (double)usage.ttft_ns / 1e9, dec_s = (double)usage.decode_ns / 1e9;
    uint32_t n_dec = n_out > 1 ? n_out - 1 : 0;
    double pf_tps = pf_s > 0 ? (double)n_prompt / pf_s : 0.0;
    double dec_tps = dec_s > 0 && n_dec ? (double)n_dec / dec_s : 0.0;
    if (o.json) {
        printf("{\"model\": ");
        srv_json_str(stdout, o.model, strlen(o.model));
        printf(", \"prompt_tokens\": %zu, \"tokens\": [", n_prompt);
        for (uint32_t i = 0; i < n_out; i++)
            printf("%s%d", i ? ", " : "", s.out_tokens[i]);
        printf("], \"text\": ");
        srv_json_str(stdout, s.text.p ? s.text.p : "", s.text.len);
        printf(", \"finish_reason\": \"%s\", \"seed\": %llu, \"prefill_tok_s\": %.1f, "
               "\"decode_tok_s\": %.1f}\n",
               finish, (unsigned long long)o.sampling.seed, pf_tps, dec_tps);
    } else {
        printf("\n");
    }
    char spec[128];
    fprintf(stderr,
            "kvserve run: prefill %zu tokens in %.1f ms (%.1f tok/s); decode %u tokens in "
            "%.1f ms (%.1f tok/s); finish %s%s\n",
            n_prompt, pf_s * 1e3, pf_tps, n_dec, dec_s * 1e3, dec_tps, finish,
            srv_specdec_summary(&o.specdec, usage.spec_draft_tokens, usage.spec_accepted_tokens,
                                spec, sizeof spec));
    if (s.npy.f) {
        npy_header(&s.npy);
        if (fclose(s.npy.f) != 0) {
            s.npy.f = NULL;
            fprintf(stderr, "kvserve run: --logits-out: write failed\n");
            goto out;
        }
        s.npy.f = NULL;
    }
    status = 0;
out:
    run_state_free(&s);
    return status;
}
