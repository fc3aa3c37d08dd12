/*
 * serve/srv_bench.c — `kvserve bench`, a streaming load generator for a
 * running server in the style of vLLM's benchmark_serving, called from
 * main.c.  One channel, one completion queue and one state machine per
 * Generate call: a closed loop keeps C calls in flight, an open loop starts
 * them at Poisson or gamma arrival times.  Multi-turn conversations resend
 * their history; fault injection cancels calls or gives them short
 * deadlines.  srv_bench_report.c prints and writes what was measured.
 */
#include "srv_bench.h"

#include <grpc/support/time.h>

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char bench_usage[] =
    "usage: kvserve bench --addr HOST:PORT [--num-requests N (100)]\n"
    "                     [--concurrency C (closed loop, 8) |\n"
    "                      --request-rate R (open loop, req/s) [--burstiness B (1: Poisson)]]\n"
    "                     [--input-len L (256)] [--input-len-range F (0)] |\n"
    "                      --dataset FILE.jsonl|FILE.json]\n"
    "                     [--output-len O (64)] [--output-len-range F (0)]\n"
    "                     [--shared-prefix RATIO (0..1)] [--seed S] [--timeout-ms T]\n"
    "                     [--multi-turn T [--question-len Q (32)]] [--duration S]\n"
    "                     [--n N (outputs per request, 1..64)]\n"
    "                     [--temperature T (0: greedy) [--top-p P (1)]]\n"
    "                     [--cancel-fraction F [--cancel-after-ms MS (1000)]]\n"
    "                     [--deadline-fraction F [--deadline-ms MS (1000)]]\n"
    "                     [--attention dense|sink-window|delta|block-sparse] [--attn-sinks N]\n"
    "                     [--attn-window N] [--delta-gamma N] [--attn-top-k N] [--decode-top-k N]\n"
    "                     [--prefill full|speculative] [--keep-ratio R] [--look-ahead N]\n"
    "                     [--spec-chunk N] [--kv-policy full|sink-eviction|snapkv|h2o]\n"
    "                     [--kv-budget N] [--kv-evict-sinks N] [--snapkv-window N]\n"
    "                     [--h2o-recent N]\n"
    "                     [--guided-regex RE | --guided-json SCHEMA|@FILE\n"
    "                      [--guided-whitespace-pattern RE] | --guided-grammar GBNF|@FILE]\n"
    "                     [--api-key-file F] [--tls-ca F] [--tls-server-name NAME]\n"
    "                     [--json FILE] [--plot FILE.svg] [--no-progress]\n"
    "Greedy (or seeded draws at --temperature: request k's seed from --seed and k),\n"
    "ignore_eos, max_tokens = the output length; random prompt token ids, or\n"
    "--dataset: JSON Lines or a JSON list of {\"prompt\": TEXT}, {\"messages\": [{\"role\",\n"
    "\"content\"}..]} (the model's chat template) or ShareGPT {\"conversations\": [ask,\n"
    "answer..]} entries, each with an optional \"output_len\" (ShareGPT: the answer's\n"
    "tokens; --output-len overrides); shuffled by --seed, tokenized by the server,\n"
    "those longer than max_model_len skipped, requests going round the entries taken.\n"
    "TPOT = (E2E - TTFT) / (tokens - 1).  ITL: a message with n tokens splits the gap\n"
    "since the previous one evenly over them; the first message's tokens count in TTFT.\n"
    "Multi-turn: conversations of T requests; a turn sends the previous prompt, its\n"
    "answer and Q new tokens.  --num-requests counts turns; open loop paces conversations.\n"
    "Cancel / deadline fractions: those requests are cancelled by the client after a\n"
    "uniform 0..MS ms, or get a uniform MS/10..MS ms deadline; CANCELLED and\n"
    "DEADLINE_EXCEEDED are then intended.  --n: each request asks N outputs of its prompt\n"
    "(sampling.n); output tokens count every output, TPOT and ITL are per output.\n"
    "--guided-*: every request's output follows it (and may end before the output length).\n"
    "Exit 0 when nothing else failed.\n";

/* An open loop never waits for completions; past this many calls in
 * flight it does, and says so in the summary. */
enum { BENCH_MAX_IN_FLIGHT = 4096 };

static double
now_s(const bench_t *b)
{
    return (double)(kvs_now_ns() - b->epoch_ns) * 1e-9;
}

/* ---- random numbers (splitmix64: reproducible from --seed alone) -------- */

/* Uniform in (0, 1): never 0, so log() stays finite. */
static double
rng_unit_open(uint64_t *s)
{
    return ((double)(srv_rng_next(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static double
rng_normal(uint64_t *s)
{
    return sqrt(-2.0 * log(rng_unit_open(s))) * cos(6.283185307179586 * rng_unit_open(s));
}

/* Gamma(shape k, scale 1) by Marsaglia and Tsang; k < 1 through the
 * k + 1 boost. */
static double
rng_gamma(uint64_t *s, double k)
{
    if (k < 1.0)
        return rng_gamma(s, k + 1.0) * pow(rng_unit_open(s), 1.0 / k);
    double d = k - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x = rng_normal(s), v = 1.0 + c * x;
        if (v <= 0)
            continue;
        v = v * v * v;
        double u = rng_unit_open(s);
        if (log(u) < 0.5 * x * x + d - d * v + d * log(v))
            return d * v;
    }
}

/* Uniform integer in [L(1-F), L(1+F)], at least 1. */
static uint32_t
draw_len(uint64_t *s, uint32_t len, float range)
{
    if (range <= 0)
        return len;
    double lo = floor(len * (1.0 - range)), hi = ceil(len * (1.0 + range));
    if (lo < 1)
        lo = 1;
    uint64_t span = (uint64_t)(hi - lo) + 1;
    return (uint32_t)(lo + (double)srv_rng_below(s, (uint32_t)span));
}

/* ---- options ----------------------------------------------------------- */

enum {
    O_NREQ = 256, /* above the connection options' 'a', 'T', 'C', 'N' */
    O_CONC,
    O_RATE,
    O_BURST,
    O_IN,
    O_INRANGE,
    O_OUT,
    O_OUTRANGE,
    O_PREFIX,
    O_SEED,
    O_KEY,
    O_JSON,
    O_PLOT,
    O_QUIET,
    O_TURNS,
    O_QLEN,
    O_DURATION,
    O_CANCEL,
    O_CANCELMS,
    O_DEADLINE,
    O_DEADLINEMS,
    O_NOUT,
    O_TEMP,
    O_TOPP,
    O_DATASET,
    O_HELP,
};

/* The serve flags that describe one request's policy, copied into the
 * GenerateRequest; the server checks the combination and names the field
 * it refuses. */
static int
bench_policy_opt(int c, const char *arg, bench_opts_t *o, model_attn_policy_t *ap,
                 model_spec_policy_t *sp, srv_kv_opts_t *kv)
{
    const char *C = "bench";
    int rc = srv_attn_opt(C, c, arg, ap);
    if (rc != 1) {
        o->has_attn = true;
        return rc;
    }
    if ((rc = srv_prefill_opt(C, c, arg, sp)) != 1) {
        o->has_prefill = true;
        return rc;
    }
    if ((rc = srv_kv_opt(C, c, arg, kv)) != 1)
        o->has_kv = true;
    return rc;
}

static void
bench_policy_fill(bench_opts_t *o, const model_attn_policy_t *ap, const model_spec_policy_t *sp,
                  const srv_kv_opts_t *kv)
{
    static const Kvserve__V1__AttentionPolicy__Kind ak[] = {
        [MODEL_ATTN_DENSE] = KVSERVE__V1__ATTENTION_POLICY__KIND__DENSE,
        [MODEL_ATTN_SINK_WINDOW] = KVSERVE__V1__ATTENTION_POLICY__KIND__SINK_WINDOW,
        [MODEL_ATTN_DELTA] = KVSERVE__V1__ATTENTION_POLICY__KIND__DELTA,
        [MODEL_ATTN_BLOCK_SPARSE] = KVSERVE__V1__ATTENTION_POLICY__KIND__BLOCK_SPARSE,
    };
    static const Kvserve__V1__KvPolicy__Kind kk[] = {
        [SCHED_KV_FULL] = KVSERVE__V1__KV_POLICY__KIND__FULL,
        [SCHED_KV_SINK_EVICTION] = KVSERVE__V1__KV_POLICY__KIND__SINK_EVICTION,
        [SCHED_KV_SNAPKV] = KVSERVE__V1__KV_POLICY__KIND__SNAPKV,
        [SCHED_KV_H2O] = KVSERVE__V1__KV_POLICY__KIND__H2O,
    };
    o->attn_kind = ap->kind;
    o->kv_kind = kv->policy.kind;
    kvserve__v1__attention_policy__init(&o->attn);
    kvserve__v1__prefill_policy__init(&o->prefill);
    kvserve__v1__kv_policy__init(&o->kv);
    if (o->has_attn) {
        Kvserve__V1__AttentionPolicy *a = &o->attn;
        a->has_kind = true;
        a->has_sink_tokens = a->has_window_tokens = ap->kind != MODEL_ATTN_DENSE;
        a->kind = ak[ap->kind];
        a->sink_tokens = ap->sinks;
        a->window_tokens = ap->window;
        a->has_gamma = ap->kind == MODEL_ATTN_DELTA;
        a->gamma = ap->gamma;
        a->has_top_k_blocks = ap->kind == MODEL_ATTN_BLOCK_SPARSE;
        a->top_k_blocks = ap->top_k;
        a->has_decode_top_k_blocks = true;
        a->decode_top_k_blocks = ap->decode_top_k;
    }
    if (o->has_prefill) {
        Kvserve__V1__PrefillPolicy *p = &o->prefill;
        p->has_kind = true;
        p->kind = sp->on ? KVSERVE__V1__PREFILL_POLICY__KIND__SPECULATIVE
                         : KVSERVE__V1__PREFILL_POLICY__KIND__FULL;
        p->has_keep_ratio = sp->keep_ratio != 0.0f;
        p->keep_ratio = sp->keep_ratio;
        p->has_chunk_tokens = sp->chunk != 0;
        p->chunk_tokens = sp->chunk;
        p->has_look_ahead = sp->look_ahead != 0;
        p->look_ahead = sp->look_ahead;
    }
    if (o->has_kv) {
        Kvserve__V1__KvPolicy *k = &o->kv;
        const sched_kv_policy_t *p = &kv->policy;
        k->has_kind = true;
        k->kind = kk[p->kind];
        k->has_budget_tokens = p->budget_tokens != 0;
        k->budget_tokens = p->budget_tokens;
        k->has_sink_tokens = p->kind == SCHED_KV_SINK_EVICTION;
        k->sink_tokens = p->sinks;
        k->has_window_tokens = p->kind == SCHED_KV_SNAPKV || kv->h2o_recent != 0;
        k->window_tokens = p->kind == SCHED_KV_H2O ? kv->h2o_recent : p->window;
    }
}

/* 0, 1 after --help, or KVS_EINVAL after a message naming the flag. */
static int
bench_parse(int argc, char **argv, bench_opts_t *o)
{
    static const struct option lo[] = {
        SRV_CONN_LONGOPTS,
        {"num-requests", 1, 0, O_NREQ},
        {"concurrency", 1, 0, O_CONC},
        {"request-rate", 1, 0, O_RATE},
        {"burstiness", 1, 0, O_BURST},
        {"input-len", 1, 0, O_IN},
        {"input-len-range", 1, 0, O_INRANGE},
        {"output-len", 1, 0, O_OUT},
        {"output-len-range", 1, 0, O_OUTRANGE},
        {"shared-prefix", 1, 0, O_PREFIX},
        {"seed", 1, 0, O_SEED},
        {"api-key-file", 1, 0, O_KEY},
        {"json", 1, 0, O_JSON},
        {"plot", 1, 0, O_PLOT},
        {"no-progress", 0, 0, O_QUIET},
        {"multi-turn", 1, 0, O_TURNS},
        {"question-len", 1, 0, O_QLEN},
        {"duration", 1, 0, O_DURATION},
        {"cancel-fraction", 1, 0, O_CANCEL},
        {"cancel-after-ms", 1, 0, O_CANCELMS},
        {"deadline-fraction", 1, 0, O_DEADLINE},
        {"deadline-ms", 1, 0, O_DEADLINEMS},
        {"n", 1, 0, O_NOUT},
        {"temperature", 1, 0, O_TEMP},
        {"top-p", 1, 0, O_TOPP},
        {"dataset", 1, 0, O_DATASET},
        SRV_GUIDED_LONGOPTS,
        {"help", 0, 0, O_HELP},
        SRV_ATTN_LONGOPTS,
        SRV_PREFILL_LONGOPTS,
        SRV_KV_LONGOPTS,
        {0, 0, 0, 0},
    };
    const char *C = "bench";
    *o = (bench_opts_t){.n_req = 100,
                        .conc = 8,
                        .in_len = 256,
                        .out_len = 64,
                        .burst = 1.0f,
                        .progress = true,
                        .turns = 1,
                        .question_len = 32,
                        .n_outputs = 1,
                        .top_p = 1.0f,
                        .cancel_ms = 1000,
                        .deadline_ms = 1000};
    model_attn_policy_t ap = SRV_ATTN_DEFAULT;
    model_spec_policy_t sp = {0};
    srv_kv_opts_t kv = SRV_KV_DEFAULT;
    bool have_conc = false, have_burst = false, have_qlen = false, have_cms = false,
         have_dms = false, have_synth = false;
    opterr = 0;
    optind = 1;
    int c, li = -1;
    while ((c = getopt_long(argc, argv, "", lo, &li)) != -1) {
        int rc = srv_conn_opt(C, c, &o->conn);
        if (rc != 1) {
            if (rc) {
                fputs(bench_usage, stderr);
                return rc;
            }
            continue;
        }
        rc = 0;
        switch (c) {
        case O_HELP:
            fputs(bench_usage, stdout);
            return 1;
        case O_NREQ:
            rc = srv_parse_u32(C, "--num-requests", optarg, 1, 10000000, &o->n_req);
            break;
        case O_CONC:
            rc = srv_parse_u32(C, "--concurrency", optarg, 1, BENCH_MAX_IN_FLIGHT, &o->conc);
            have_conc = true;
            break;
        case O_RATE:
            rc = srv_parse_f32(C, "--request-rate", optarg, 1e-3f, 1e6f, &o->rate);
            o->open_loop = true;
            break;
        case O_BURST:
            rc = srv_parse_f32(C, "--burstiness", optarg, 1e-3f, 1e3f, &o->burst);
            have_burst = true;
            break;
        case O_IN:
            rc = srv_parse_u32(C, "--input-len", optarg, 1, 1u << 24, &o->in_len);
            have_synth = true;
            break;
        case O_INRANGE:
            rc = srv_parse_f32(C, "--input-len-range", optarg, 0.0f, 1.0f, &o->in_range);
            have_synth = true;
            break;
        case O_OUT:
            rc = srv_parse_u32(C, "--output-len", optarg, 1, 1u << 24, &o->out_len);
            o->has_out_len = true;
            break;
        case O_OUTRANGE:
            rc = srv_parse_f32(C, "--output-len-range", optarg, 0.0f, 1.0f, &o->out_range);
            break;
        case O_PREFIX:
            rc = srv_parse_f32(C, "--shared-prefix", optarg, 0.0f, 1.0f, &o->prefix);
            have_synth = true;
            break;
        case O_SEED:
            rc = srv_parse_u64(C, "--seed", optarg, &o->seed);
            break;
        case O_KEY:
            o->api_key_file = optarg;
            break;
        case O_JSON:
            o->json = optarg;
            break;
        case O_PLOT:
            o->plot = optarg;
            break;
        case O_QUIET:
            o->progress = false;
            break;
        case O_TURNS:
            rc = srv_parse_u32(C, "--multi-turn", optarg, 1, 1024, &o->turns);
            break;
        case O_QLEN:
            rc = srv_parse_u32(C, "--question-len", optarg, 1, 1u << 20, &o->question_len);
            have_qlen = true;
            break;
        case O_DURATION:
            rc = srv_parse_f32(C, "--duration", optarg, 1e-3f, 1e7f, &o->duration_s);
            break;
        case O_CANCEL:
            rc = srv_parse_f32(C, "--cancel-fraction", optarg, 0.0f, 1.0f, &o->cancel_frac);
            break;
        case O_CANCELMS:
            rc = srv_parse_u32(C, "--cancel-after-ms", optarg, 1, INT32_MAX, &o->cancel_ms);
            have_cms = true;
            break;
        case O_DEADLINE:
            rc = srv_parse_f32(C, "--deadline-fraction", optarg, 0.0f, 1.0f, &o->deadline_frac);
            break;
        case O_DEADLINEMS:
            rc = srv_parse_u32(C, "--deadline-ms", optarg, 10, INT32_MAX, &o->deadline_ms);
            have_dms = true;
            break;
        case O_NOUT:
            rc = srv_parse_u32(C, "--n", optarg, 1, SCHED_MAX_N, &o->n_outputs);
            break;
        case O_TEMP:
            rc = srv_parse_f32(C, "--temperature", optarg, 0.0f, 2.0f, &o->temperature);
            break;
        case O_TOPP:
            rc = srv_parse_f32(C, "--top-p", optarg, 0.0f, 1.0f, &o->top_p);
            if (rc == 0 && o->top_p == 0.0f) {
                fprintf(stderr, "kvserve bench: --top-p must be in (0, 1]\n");
                rc = KVS_EINVAL;
            }
            break;
        case O_DATASET:
            o->dataset = optarg;
            break;
        case SRV_O_GREGEX:
        case SRV_O_GJSON:
        case SRV_O_GWS:
        case SRV_O_GGRAMMAR:
            rc = srv_guided_opt(C, c, optarg, &o->guided);
            break;
        default:
            /* Pool and prefill-shape flags of the server have no field in
             * a request: name them rather than drop them. */
            if (c == SRV_O_KVDTYPE || c == SRV_O_KVSINKS || c == SRV_O_KVRESID ||
                c == SRV_O_HOSTMEM || c == SRV_O_NOTAIL || c == SRV_O_LASTDENSE) {
                fprintf(stderr,
                        "kvserve bench: --%s is a flag of `kvserve serve`, not of a request\n",
                        lo[li].name);
                return KVS_EINVAL;
            }
            rc = optarg ? bench_policy_opt(c, optarg, o, &ap, &sp, &kv) : 1;
            if (rc == 1) {
                fprintf(stderr, "kvserve bench: unknown or incomplete option '%s'\n%s",
                        argv[optind - 1], bench_usage);
                return KVS_EINVAL;
            }
        }
        if (rc) {
            fputs(bench_usage, stderr);
            return rc;
        }
    }
    if (srv_conn_check(C, &o->conn, argc, argv, bench_usage))
        return KVS_EINVAL;
    const char *why = NULL;
    if (have_conc && o->open_loop)
        why = "--concurrency (closed loop) and --request-rate (open loop) exclude each other";
    else if (have_burst && !o->open_loop)
        why = "--burstiness needs --request-rate";
    else if (have_qlen && o->turns < 2)
        why = "--question-len needs --multi-turn T with T >= 2";
    else if (o->cancel_frac + o->deadline_frac > 1.0f)
        why = "--cancel-fraction plus --deadline-fraction exceed 1";
    else if (have_cms && o->cancel_frac == 0.0f)
        why = "--cancel-after-ms needs --cancel-fraction";
    else if (have_dms && o->deadline_frac == 0.0f)
        why = "--deadline-ms needs --deadline-fraction";
    else if (o->dataset && have_synth)
        why = "--dataset gives the prompts: --input-len, --input-len-range and --shared-prefix "
              "describe random ones";
    else if (o->dataset && o->turns > 1)
        why = "--dataset and --multi-turn exclude each other";
    else if (o->n_outputs > 1 && o->turns > 1)
        why = "--n and --multi-turn exclude each other (which output would the next turn take?)";
    if (why) {
        fprintf(stderr, "kvserve bench: %s\n%s", why, bench_usage);
        return KVS_EINVAL;
    }
    if (srv_guided_check(C, &o->guided, 0)) {
        fputs(bench_usage, stderr);
        return KVS_EINVAL;
    }
    bench_policy_fill(o, &ap, &sp, &kv);
    return 0;
}

/* ---- the workload ----------------------------------------------------- */

/* Lengths, faults and arrival times, all from --seed; prompts are made at
 * launch (a long --duration run may hold many requests).  Token ids are in
 * [0, vocab); the shared prefix is the same tokens at the head of every
 * conversation's first prompt, so a prefix cache can serve them. */
static int
bench_workload(bench_t *b)
{
    const bench_opts_t *o = &b->o;
    uint64_t s = o->seed ^ 0x6b767365727665ull;
    b->n_conv = (o->n_req + o->turns - 1) / o->turns;
    b->reqs = calloc(o->n_req, sizeof *b->reqs);
    b->arrival = calloc(b->n_conv, sizeof *b->arrival);
    b->ready = calloc(b->n_conv, sizeof *b->ready);
    if (b->reqs == NULL || b->arrival == NULL || b->ready == NULL)
        return KVS_ENOMEM;
    /* Only a cancellation intent pushes to the heap. */
    if (o->cancel_frac > 0 && (b->heap = calloc(o->n_req, sizeof *b->heap)) == NULL)
        return KVS_ENOMEM;
    for (uint32_t k = 0; k < o->n_req; k++) {
        bench_req_t *r = &b->reqs[k];
        const bench_entry_t *e = b->n_data ? &b->data[k % b->n_data] : NULL;
        r->n_prompt = e ? e->n_ids : k % o->turns == 0 ? draw_len(&s, o->in_len, o->in_range) : 0;
        r->out_len = draw_len(&s, e ? e->out_len : o->out_len, o->out_range);
        double u = rng_unit_open(&s);
        if (u < o->cancel_frac) {
            r->intent = INTENT_CANCEL;
            r->fault_ms = rng_unit_open(&s) * o->cancel_ms;
        } else if (u < o->cancel_frac + o->deadline_frac) {
            r->intent = INTENT_DEADLINE;
            r->fault_ms = o->deadline_ms * (0.1 + 0.9 * rng_unit_open(&s));
        }
        r->status = GRPC_STATUS_UNKNOWN;
        r->details = grpc_empty_slice();
    }
    /* The first conversation starts at once; gamma with shape 1 is the
     * exponential, so B = 1 is Poisson. */
    double t = 0;
    for (uint32_t c = 1; o->open_loop && c < b->n_conv; c++) {
        t += o->burst == 1.0f ? -log(rng_unit_open(&s)) / o->rate
                              : rng_gamma(&s, o->burst) / ((double)o->rate * o->burst);
        b->arrival[c] = t;
    }
    return 0;
}

/* Request k's prompt: a first turn draws its own tokens (after the shared
 * prefix), a later turn extends the previous turn's prompt with that turn's
 * answer and new question tokens, then the previous turn lets both go. */
static int
bench_prompt(bench_t *b, uint32_t k)
{
    const bench_opts_t *o = &b->o;
    bench_req_t *r = &b->reqs[k];
    /* k hashed, not k times splitmix64's own increment: that made request
     * k + 1's tokens request k's shifted by one. */
    uint64_t s = kvs_mix64(o->seed ^ kvs_mix64(0x70726f6d7074ull + k));
    if (b->n_data) {
        const bench_entry_t *e = &b->data[k % b->n_data];
        if ((r->prompt = malloc((size_t)e->n_ids * sizeof *r->prompt)) == NULL)
            return KVS_ENOMEM;
        memcpy(r->prompt, e->ids, (size_t)e->n_ids * sizeof *r->prompt);
        return 0;
    }
    if (k % o->turns == 0) {
        uint32_t n = r->n_prompt, shared = (uint32_t)lround(o->prefix * n);
        uint32_t q = o->turns > 1 ? o->question_len : 0;
        if ((r->prompt = malloc(((size_t)n + q) * sizeof *r->prompt)) == NULL)
            return KVS_ENOMEM;
        uint64_t cs = o->seed ^ 0x636f6d6d6f6eull; /* the same for every prompt */
        for (uint32_t i = 0; i < n + q; i++)
            r->prompt[i] = srv_rng_below(i < shared ? &cs : &s, b->vocab);
        r->n_prompt = n + q;
        return 0;
    }
    bench_req_t *p = &b->reqs[k - 1];
    if (p->prompt == NULL) /* the previous turn never got its prompt */
        return KVS_ENOMEM;
    size_t n = (size_t)p->n_prompt + p->n_out + o->question_len;
    if (n > UINT32_MAX || (r->prompt = malloc(n * sizeof *r->prompt)) == NULL)
        return KVS_ENOMEM;
    memcpy(r->prompt, p->prompt, (size_t)p->n_prompt * sizeof *r->prompt);
    if (p->n_out)
        memcpy(r->prompt + p->n_prompt, p->out_ids, (size_t)p->n_out * sizeof *r->prompt);
    for (size_t i = (size_t)p->n_prompt + p->n_out; i < n; i++)
        r->prompt[i] = srv_rng_below(&s, b->vocab);
    r->n_prompt = (uint32_t)n;
    free(p->prompt);
    free(p->out_ids);
    p->prompt = p->out_ids = NULL;
    return 0;
}

/* ---- GetModelInfo ------------------------------------------------------ */

/* The vocabulary size, or 0 after printing why not. */
static uint32_t
bench_vocab(bench_t *b)
{
    Kvserve__V1__GetModelInfoRequest req = KVSERVE__V1__GET_MODEL_INFO_REQUEST__INIT;
    Kvserve__V1__ModelInfo *mi = (Kvserve__V1__ModelInfo *)bench_unary(
        b, SRV_M_MODEL_INFO, &req.base, &kvserve__v1__model_info__descriptor,
        "kvserve bench: GetModelInfo");
    uint32_t vocab = mi ? mi->n_vocab : 0;
    if (mi && vocab == 0)
        fprintf(stderr, "kvserve bench: GetModelInfo: no vocabulary size in the answer\n");
    if (mi)
        protobuf_c_message_free_unpacked(&mi->base, NULL);
    return vocab;
}

/* ---- the calls ---------------------------------------------------------- */

/* The one-second bin of time t, grown on demand (NULL when memory runs
 * out: the timeline then just misses a count). */
static bench_bin_t *
bench_bin(bench_t *b, double t)
{
    size_t i = t > 0 ? (size_t)t : 0;
    if (i >= b->n_bins) {
        size_t n = b->n_bins ? b->n_bins : 64;
        while (n <= i)
            n *= 2;
        bench_bin_t *p = realloc(b->bins, n * sizeof *p);
        if (p == NULL)
            return NULL;
        memset(p + b->n_bins, 0, (n - b->n_bins) * sizeof *p);
        b->bins = p;
        b->n_bins = n;
    }
    return &b->bins[i];
}

static void
req_finish(bench_t *b, bench_req_t *r)
{
    const bench_opts_t *o = &b->o;
    uint32_t k = (uint32_t)(r - b->reqs);
    b->in_flight--;
    b->n_done++;
    if (r->parse_error && r->status == GRPC_STATUS_CANCELLED)
        r->status = GRPC_STATUS_INTERNAL;
    if (r->status != GRPC_STATUS_OK && !bench_intended(r))
        b->n_err++;
    bench_bin_t *bin = bench_bin(b, r->t_end);
    if (bin)
        bin->completed++;
    size_t n = GRPC_SLICE_LENGTH(r->details);
    const char *m = r->parse_error ? "cannot parse a GenerateResponse"
                                   : (const char *)GRPC_SLICE_START_PTR(r->details);
    if (r->parse_error)
        n = strlen(m);
    if (n > 0 && (r->message = malloc(n + 1)) != NULL) {
        memcpy(r->message, m, n);
        r->message[n] = '\0';
    }
    grpc_slice_unref(r->details);
    r->details = grpc_empty_slice();
    grpc_metadata_array_destroy(&r->init_md);
    grpc_metadata_array_destroy(&r->trail_md);
    grpc_byte_buffer_destroy(r->req_bb);
    r->req_bb = NULL;
    if (r->call)
        grpc_call_unref(r->call);
    r->call = NULL;
    /* The next turn goes on whatever this one ended with: a cancelled turn
     * still leaves its prompt and partial answer as history. */
    if ((k + 1) % o->turns != 0 && k + 1 < o->n_req) {
        b->ready[(b->ready_head + b->ready_len++) % b->n_conv] = k + 1;
    } else {
        free(r->prompt);
        free(r->out_ids);
        r->prompt = r->out_ids = NULL;
    }
}

static void
req_batch_done(bench_t *b, bench_req_t *r)
{
    if (--r->pending == 0)
        req_finish(b, r);
}

/* Starts one batch; a rejected one cancels the call (srv_call_start). */
static bool
req_start(bench_req_t *r, const grpc_op *ops, size_t n, bench_tag_t *tag)
{
    if (srv_call_start(r->call, ops, n, tag) != GRPC_CALL_OK)
        return false;
    r->pending++;
    return true;
}

static void
req_recv(bench_req_t *r)
{
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &r->recv_bb;
    req_start(r, &op, 1, &r->t_recv);
}

/* A min-heap on cancellation time. */
static void
heap_push(bench_t *b, double t, uint32_t k)
{
    uint32_t i = b->n_heap++;
    while (i > 0 && b->heap[(i - 1) / 2].t > t) {
        b->heap[i] = b->heap[(i - 1) / 2];
        i = (i - 1) / 2;
    }
    b->heap[i] = (bench_cancel_t){t, k};
}

static bench_cancel_t
heap_pop(bench_t *b)
{
    bench_cancel_t top = b->heap[0], last = b->heap[--b->n_heap];
    uint32_t i = 0;
    for (;;) {
        uint32_t c = 2 * i + 1;
        if (c >= b->n_heap)
            break;
        if (c + 1 < b->n_heap && b->heap[c + 1].t < b->heap[c].t)
            c++;
        if (b->heap[c].t >= last.t)
            break;
        b->heap[i] = b->heap[c];
        i = c;
    }
    if (b->n_heap)
        b->heap[i] = last;
    return top;
}

static void
req_launch(bench_t *b, uint32_t k)
{
    const bench_opts_t *o = &b->o;
    bench_req_t *r = &b->reqs[k];
    r->t_start = (bench_tag_t){K_START, r};
    r->t_status = (bench_tag_t){K_STATUS, r};
    r->t_recv = (bench_tag_t){K_RECV, r};
    grpc_metadata_array_init(&r->init_md);
    grpc_metadata_array_init(&r->trail_md);
    r->started = true;
    r->t0 = now_s(b);
    b->in_flight++;
    if (b->in_flight > b->max_in_flight)
        b->max_in_flight = b->in_flight;
    if (bench_prompt(b, k)) {
        r->status = GRPC_STATUS_RESOURCE_EXHAUSTED;
        r->details = grpc_slice_from_static_string("kvserve bench: out of memory for the prompt");
        r->t_end = r->t0;
        req_finish(b, r);
        return;
    }

    Kvserve__V1__GenerateRequest req = KVSERVE__V1__GENERATE_REQUEST__INIT;
    Kvserve__V1__TokenIds ids = KVSERVE__V1__TOKEN_IDS__INIT;
    Kvserve__V1__SamplingParams sp = KVSERVE__V1__SAMPLING_PARAMS__INIT;
    Kvserve__V1__LongContextPolicy pol = KVSERVE__V1__LONG_CONTEXT_POLICY__INIT;
    Kvserve__V1__AttentionPolicy attn = o->attn;
    Kvserve__V1__PrefillPolicy prefill = o->prefill;
    Kvserve__V1__KvPolicy kv = o->kv;
    ids.ids = r->prompt;
    ids.n_ids = r->n_prompt;
    req.prompt_case = KVSERVE__V1__GENERATE_REQUEST__PROMPT_TOKENS;
    req.tokens = &ids;
    sp.has_temperature = 1;
    sp.temperature = o->temperature;
    sp.has_top_p = o->top_p < 1.0f;
    sp.top_p = o->top_p;
    sp.has_seed = o->temperature > 0.0f;
    sp.seed = kvs_mix64(o->seed ^ kvs_mix64(0x73616d706c65ull + k));
    sp.has_max_tokens = 1;
    sp.max_tokens = r->out_len;
    sp.has_ignore_eos = sp.ignore_eos = 1;
    sp.has_n = o->n_outputs > 1;
    sp.n = o->n_outputs;
    sp.guided_regex = (char *)o->guided.regex;
    sp.guided_json = o->guided.json;
    sp.guided_whitespace_pattern = (char *)o->guided.ws;
    sp.guided_grammar = o->guided.grammar;
    req.sampling = &sp;
    r->n_outs = o->n_outputs;
    if (r->n_outs > 1 && r->t_out == NULL &&
        (r->t_out = calloc(r->n_outs, sizeof *r->t_out)) == NULL)
        r->n_outs =
            1; /* out of memory: times as if one output (the report's TPOT then runs long) */
    if (o->has_attn || o->has_prefill || o->has_kv) {
        pol.attention = o->has_attn ? &attn : NULL;
        pol.prefill = o->has_prefill ? &prefill : NULL;
        pol.kv = o->has_kv ? &kv : NULL;
        req.policy = &pol;
    }
    r->req_bb = srv_pb_to_bb(&req.base);
    double dl_ms = o->conn.timeout_ms ? (double)o->conn.timeout_ms : 0;
    if (r->intent == INTENT_DEADLINE && (dl_ms == 0 || r->fault_ms < dl_ms))
        dl_ms = r->fault_ms;
    r->call = grpc_channel_create_registered_call(b->ch, NULL, GRPC_PROPAGATE_DEFAULTS, b->cq,
                                                  b->rm_gen, srv_deadline_ms(dl_ms), NULL);
    if (r->intent == INTENT_CANCEL)
        heap_push(b, r->t0 + r->fault_ms * 1e-3, k);

    grpc_op ops[4];
    size_t n = srv_call_send_ops(ops, &b->auth, b->n_auth, r->req_bb, &r->init_md);
    bool ok = req_start(r, ops, n, &r->t_start);
    srv_call_status_op(ops, &r->trail_md, &r->status, &r->details);
    ok = ok && req_start(r, ops, 1, &r->t_status);
    if (ok)
        req_recv(r);
    if (r->pending == 0) {
        r->status = GRPC_STATUS_INTERNAL;
        r->t_end = now_s(b);
        req_finish(b, r);
    }
}

static bool
itl_push(bench_req_t *r, double ms)
{
    if (r->n_itl == r->cap_itl) {
        size_t n = r->cap_itl ? 2 * r->cap_itl : (r->out_len ? r->out_len : 16);
        double *p = realloc(r->itl, n * sizeof *p);
        if (p == NULL)
            return false;
        r->itl = p;
        r->cap_itl = n;
    }
    r->itl[r->n_itl++] = ms;
    return true;
}

/* A message may carry several tokens (the server batches what the engine
 * made since its last send): the gap since the previous token-bearing
 * message is split evenly over them, so ITL has one entry per token and
 * its mean is the decode rate.  The first message's tokens all count as
 * arriving at TTFT and get no ITL entry.  Multi-turn keeps the ids for
 * the next turn's history. */
static void
req_message(bench_t *b, bench_req_t *r, const Kvserve__V1__GenerateResponse *m)
{
    double t = now_s(b);
    size_t n = m->n_token_ids;
    /* With --n, gaps are each output's own. */
    uint32_t idx = m->has_index ? m->index : 0;
    double *last = r->t_out && idx < r->n_outs ? &r->t_out[idx] : &r->t_last;
    if (n) {
        if (r->tokens == 0)
            r->t_first = t;
        if (r->t_out ? *last > 0 : r->tokens > 0) {
            double gap = (t - *last) * 1e3 / (double)n;
            for (size_t i = 0; i < n; i++)
                if (!itl_push(r, gap))
                    break;
        }
        *last = t;
        if (b->o.turns > 1) {
            /* Sized for the whole answer at once (ignore_eos); out of
             * memory, the history just misses these tokens. */
            size_t need = (size_t)r->n_out + n;
            if (need > r->cap_out) {
                size_t cap = need > r->out_len ? need : r->out_len;
                uint32_t *p = realloc(r->out_ids, cap * sizeof *p);
                if (p) {
                    r->out_ids = p;
                    r->cap_out = cap;
                }
            }
            for (size_t i = 0; need <= r->cap_out && i < n; i++)
                r->out_ids[r->n_out++] = (uint32_t)m->token_ids[i];
        }
        r->tokens += (uint32_t)n;
        b->tok_total += n;
        bench_bin_t *bin = bench_bin(b, t);
        if (bin)
            bin->tokens += n;
    }
    if (m->usage) {
        r->has_usage = true;
        r->usage_prompt = m->usage->prompt_tokens;
        r->usage_cached = m->usage->cached_prompt_tokens;
        r->usage_spec_draft += m->usage->spec_draft_tokens;
        r->usage_spec_accepted += m->usage->spec_accepted_tokens;
    }
}

static void
bench_event(bench_t *b, bench_tag_t *tag, int success)
{
    bench_req_t *r = tag->r;
    switch (tag->kind) {
    case K_START:
        break;
    case K_STATUS:
        r->t_end = now_s(b);
        break;
    case K_RECV:
        if (!success || r->recv_bb == NULL) {
            grpc_byte_buffer_destroy(r->recv_bb); /* end of stream */
            r->recv_bb = NULL;
        } else {
            Kvserve__V1__GenerateResponse *m = (Kvserve__V1__GenerateResponse *)srv_bb_to_pb(
                r->recv_bb, &kvserve__v1__generate_response__descriptor, NULL, 0);
            grpc_byte_buffer_destroy(r->recv_bb);
            r->recv_bb = NULL;
            if (m) {
                req_message(b, r, m);
                protobuf_c_message_free_unpacked(&m->base, NULL);
                req_recv(r);
            } else {
                r->parse_error = true;
                grpc_call_cancel(r->call, NULL);
            }
        }
        break;
    }
    req_batch_done(b, r);
}

static void
bench_progress(bench_t *b, bool final)
{
    double t = now_s(b);
    if (!b->o.progress || (!final && t - b->last_progress < 0.25))
        return;
    b->last_progress = t;
    fprintf(stderr, "\rkvserve bench: %u/%u done, %u in flight, %u errors, %.0f tok/s   ",
            b->n_done, b->o.n_req, b->in_flight, b->n_err, t > 0 ? (double)b->tok_total / t : 0.0);
    if (final)
        fputc('\n', stderr);
    fflush(stderr);
}

/* Starts what may start now; returns the time of the next arrival or
 * cancellation to wake for (at most `wake`). */
static double
bench_launch_ready(bench_t *b, double t, double wake)
{
    const bench_opts_t *o = &b->o;
    while (b->n_heap && b->heap[0].t <= t) {
        bench_req_t *r = &b->reqs[heap_pop(b).k];
        if (r->call) /* NULL once it ended */
            grpc_call_cancel(r->call, NULL);
    }
    if (b->n_heap && b->heap[0].t < wake)
        wake = b->heap[0].t;
    if (o->duration_s > 0 && t >= o->duration_s)
        b->stopped = true;
    if (b->stopped)
        return wake;
    uint32_t cap = o->open_loop ? BENCH_MAX_IN_FLIGHT : o->conc;
    /* Turns of running conversations first: they hold a cached history. */
    while (b->ready_len && b->in_flight < cap) {
        uint32_t k = b->ready[b->ready_head];
        b->ready_head = (b->ready_head + 1) % b->n_conv;
        b->ready_len--;
        req_launch(b, k);
    }
    while (b->next_conv < b->n_conv) {
        if (o->open_loop && b->arrival[b->next_conv] > t) {
            if (b->arrival[b->next_conv] < wake)
                wake = b->arrival[b->next_conv];
            break;
        }
        if (b->in_flight >= cap) {
            if (o->open_loop && b->cap_held != b->next_conv + 1) { /* once per arrival */
                b->cap_hits++;
                b->cap_held = b->next_conv + 1;
            }
            break;
        }
        req_launch(b, b->next_conv++ * o->turns);
    }
    return wake;
}

static void
bench_loop(bench_t *b)
{
    const bench_opts_t *o = &b->o;
    for (;;) {
        double t = now_s(b), wake = bench_launch_ready(b, t, t + 0.25);
        bench_progress(b, false);
        bool more = !b->stopped && (b->ready_len || b->next_conv < b->n_conv);
        if (b->in_flight == 0 && !more)
            break;
        if (o->duration_s > 0 && !b->stopped && o->duration_s < wake)
            wake = o->duration_s;
        double wait = wake - now_s(b);
        if (wait < 0)
            wait = 0;
        gpr_timespec dl = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                                       gpr_time_from_micros((int64_t)(wait * 1e6), GPR_TIMESPAN));
        grpc_event ev = grpc_completion_queue_next(b->cq, dl, NULL);
        /* Drain whatever else is ready before deciding on new calls. */
        while (ev.type == GRPC_OP_COMPLETE) {
            bench_event(b, ev.tag, ev.success);
            ev = grpc_completion_queue_next(b->cq, gpr_inf_past(GPR_CLOCK_MONOTONIC), NULL);
        }
    }
    bench_progress(b, true);
}

/* ---- the command -------------------------------------------------------- */

int
srv_cmd_bench(int argc, char **argv)
{
    bench_t b;
    memset(&b, 0, sizeof b);
    int rc = bench_parse(argc, argv, &b.o);
    char *ca = NULL, *bearer = NULL;
    int status = rc == 1 ? 0 : 2;
    if (rc)
        goto out;
    if (srv_client_creds("bench", b.o.conn.tls_ca, b.o.api_key_file, &ca, &bearer))
        goto out;
    /* A --json that cannot be written is found now, not after the run. */
    if (b.o.json != NULL) {
        bool existed = access(b.o.json, F_OK) == 0;
        FILE *f = fopen(b.o.json, "a");
        if (f == NULL) {
            fprintf(stderr, "kvserve bench: --json: cannot write '%s': %s\n", b.o.json,
                    strerror(errno));
            goto out;
        }
        fclose(f);
        if (!existed)
            unlink(b.o.json);
    }
    if (bearer) {
        b.auth.key = grpc_slice_from_static_string("authorization");
        b.auth.value = grpc_slice_from_static_string(bearer);
        b.n_auth = 1;
    }

    status = 1;
    grpc_init();
    b.ch = srv_client_channel(b.o.conn.addr, ca, b.o.conn.tls_name);
    b.cq = grpc_completion_queue_create_for_next(NULL);
    b.rm_gen = grpc_channel_register_call(b.ch, SRV_M_GENERATE, NULL, NULL);

    if ((b.o.dataset == NULL || bench_dataset(&b) == 0) && (b.vocab = bench_vocab(&b)) != 0) {
        if (bench_workload(&b)) {
            fprintf(stderr, "kvserve bench: out of memory\n");
        } else {
            /* Times count from the first request, not from GetModelInfo. */
            b.epoch_ns = kvs_now_ns();
            bench_loop(&b);
            uint32_t bad = 0;
            if (bench_report(&b, &bad) == 0 && bad == 0)
                status = 0;
        }
    }

    if (b.reqs)
        for (uint32_t k = 0; k < b.o.n_req; k++) {
            grpc_slice_unref(b.reqs[k].details);
            free(b.reqs[k].prompt);
            free(b.reqs[k].out_ids);
            free(b.reqs[k].itl);
            free(b.reqs[k].t_out);
            free(b.reqs[k].message);
        }
    free(b.reqs);
    free(b.arrival);
    free(b.ready);
    free(b.heap);
    free(b.bins);
    bench_dataset_free(&b);
    grpc_channel_destroy(b.ch);
    grpc_completion_queue_shutdown(b.cq);
    grpc_event ev;
    do
        ev = grpc_completion_queue_next(b.cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    while (ev.type != GRPC_QUEUE_SHUTDOWN);
    grpc_completion_queue_destroy(b.cq);
    grpc_shutdown_blocking();
out:
    free(ca);
    free(bearer);
    srv_guided_free(&b.o.guided);
    return status;
}
