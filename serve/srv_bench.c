/*
 * serve/srv_bench.c — `kvserve bench`, a streaming load generator for a
 * running server in the style of vLLM's benchmark_serving, called from
 * main.c.  One channel, one completion queue and one state machine per
 * Generate call: a closed loop keeps C calls in flight, an open loop starts
 * them at Poisson or gamma arrival times.  Prints latency percentiles and
 * throughput, optionally every per-request record as JSON.
 */
#include "srv_int.h"

#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char bench_usage[] =
    "usage: kvserve bench --addr HOST:PORT [--num-requests N (100)]\n"
    "                     [--concurrency C (closed loop, 8) |\n"
    "                      --request-rate R (open loop, req/s) [--burstiness B (1: Poisson)]]\n"
    "                     [--input-len L (256)] [--input-len-range F (0)]\n"
    "                     [--output-len O (64)] [--output-len-range F (0)]\n"
    "                     [--shared-prefix RATIO (0..1)] [--seed S] [--timeout-ms T]\n"
    "                     [--api-key-file F] [--tls-ca F] [--tls-server-name NAME]\n"
    "                     [--json FILE] [--no-progress]\n"
    "Greedy, ignore_eos, max_tokens = the output length; random prompt token ids.\n"
    "TPOT = (E2E - TTFT) / (tokens - 1).  ITL: a message with n tokens splits the gap\n"
    "since the previous one evenly over them; the first message's tokens count in TTFT.\n";

/* An open loop never waits for completions; past this many calls in
 * flight it does, and says so in the summary. */
enum { BENCH_MAX_IN_FLIGHT = 4096 };

enum { K_START, K_STATUS, K_RECV, K_INFO };

typedef struct bench_opts {
    const char *addr, *tls_ca, *tls_name, *api_key_file, *json;
    uint32_t n_req, conc, in_len, out_len, timeout_ms;
    float in_range, out_range, prefix, rate, burst;
    uint64_t seed;
    bool open_loop, progress;
} bench_opts_t;

struct bench_req;
typedef struct bench_tag {
    int kind;
    struct bench_req *r;
} bench_tag_t;

/* One Generate call and what it measured; times are seconds since the run
 * began. */
typedef struct bench_req {
    bench_tag_t t_start, t_status, t_recv;
    uint32_t *prompt;
    uint32_t n_prompt, out_len;
    grpc_call *call;
    grpc_byte_buffer *req_bb, *recv_bb;
    grpc_metadata_array init_md, trail_md;
    grpc_status_code status;
    grpc_slice details;
    int pending; /* batches started and not yet back */
    bool started, done, parse_error;
    double t0, t_first, t_last, t_end;
    uint32_t tokens, usage_prompt, usage_cached;
    bool has_usage;
    double *itl; /* ms, one per token after the first message's */
    size_t n_itl, cap_itl;
    char *message;
} bench_req_t;

typedef struct bench {
    bench_opts_t o;
    grpc_channel *ch;
    grpc_completion_queue *cq;
    void *rm_gen;
    grpc_metadata auth;
    size_t n_auth;
    bench_req_t *reqs;
    double *arrival; /* open loop: start time of each request */
    struct timespec epoch;
    uint32_t next, in_flight, n_done, n_err, max_in_flight;
    uint64_t tok_total, cap_hits;
    uint32_t cap_held; /* 1 + the arrival last counted in cap_hits */
    double last_progress;
} bench_t;

enum { N_CODES = SRV_GRPC_CODES };

static double
now_s(const bench_t *b)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)(t.tv_sec - b->epoch.tv_sec) + (double)(t.tv_nsec - b->epoch.tv_nsec) * 1e-9;
}

/* ---- random numbers (splitmix64: reproducible from --seed alone) -------- */

/* Uniform in (0, 1): never 0, so log() stays finite. */
static double
rng_unit(uint64_t *s)
{
    return ((double)(srv_rng_next(s) >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

static double
rng_normal(uint64_t *s)
{
    return sqrt(-2.0 * log(rng_unit(s))) * cos(6.283185307179586 * rng_unit(s));
}

/* Gamma(shape k, scale 1) by Marsaglia and Tsang; k < 1 through the
 * k + 1 boost. */
static double
rng_gamma(uint64_t *s, double k)
{
    if (k < 1.0)
        return rng_gamma(s, k + 1.0) * pow(rng_unit(s), 1.0 / k);
    double d = k - 1.0 / 3.0, c = 1.0 / sqrt(9.0 * d);
    for (;;) {
        double x = rng_normal(s), v = 1.0 + c * x;
        if (v <= 0)
            continue;
        v = v * v * v;
        double u = rng_unit(s);
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
    return (uint32_t)(lo + (double)(srv_rng_next(s) % span));
}

/* ---- options ----------------------------------------------------------- */

/* 0, 1 after --help, or KVS_EINVAL after a message naming the flag. */
static int
bench_parse(int argc, char **argv, bench_opts_t *o)
{
    static const struct option lo[] = {
        {"addr", 1, 0, 'a'},
        {"num-requests", 1, 0, 'n'},
        {"concurrency", 1, 0, 'c'},
        {"request-rate", 1, 0, 'r'},
        {"burstiness", 1, 0, 'b'},
        {"input-len", 1, 0, 'i'},
        {"input-len-range", 1, 0, 'I'},
        {"output-len", 1, 0, 'o'},
        {"output-len-range", 1, 0, 'O'},
        {"shared-prefix", 1, 0, 'p'},
        {"seed", 1, 0, 's'},
        {"timeout-ms", 1, 0, 'T'},
        {"api-key-file", 1, 0, 'K'},
        {"tls-ca", 1, 0, 'C'},
        {"tls-server-name", 1, 0, 'N'},
        {"json", 1, 0, 'j'},
        {"no-progress", 0, 0, 'q'},
        {"help", 0, 0, 'h'},
        {0, 0, 0, 0},
    };
    const char *C = "bench";
    *o = (bench_opts_t){
        .n_req = 100, .conc = 8, .in_len = 256, .out_len = 64, .burst = 1.0f, .progress = true};
    bool have_conc = false, have_burst = false;
    opterr = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case 'h':
            fputs(bench_usage, stdout);
            return 1;
        case 'a':
            o->addr = optarg;
            break;
        case 'n':
            rc = srv_parse_u32(C, "--num-requests", optarg, 1, 10000000, &o->n_req);
            break;
        case 'c':
            rc = srv_parse_u32(C, "--concurrency", optarg, 1, BENCH_MAX_IN_FLIGHT, &o->conc);
            have_conc = true;
            break;
        case 'r':
            rc = srv_parse_f32(C, "--request-rate", optarg, 1e-3f, 1e6f, &o->rate);
            o->open_loop = true;
            break;
        case 'b':
            rc = srv_parse_f32(C, "--burstiness", optarg, 1e-3f, 1e3f, &o->burst);
            have_burst = true;
            break;
        case 'i':
            rc = srv_parse_u32(C, "--input-len", optarg, 1, 1u << 24, &o->in_len);
            break;
        case 'I':
            rc = srv_parse_f32(C, "--input-len-range", optarg, 0.0f, 1.0f, &o->in_range);
            break;
        case 'o':
            rc = srv_parse_u32(C, "--output-len", optarg, 1, 1u << 24, &o->out_len);
            break;
        case 'O':
            rc = srv_parse_f32(C, "--output-len-range", optarg, 0.0f, 1.0f, &o->out_range);
            break;
        case 'p':
            rc = srv_parse_f32(C, "--shared-prefix", optarg, 0.0f, 1.0f, &o->prefix);
            break;
        case 's':
            rc = srv_parse_u64(C, "--seed", optarg, &o->seed);
            break;
        case 'T':
            rc = srv_parse_u32(C, "--timeout-ms", optarg, 1, INT32_MAX, &o->timeout_ms);
            break;
        case 'K':
            o->api_key_file = optarg;
            break;
        case 'C':
            o->tls_ca = optarg;
            break;
        case 'N':
            o->tls_name = optarg;
            break;
        case 'j':
            o->json = optarg;
            break;
        case 'q':
            o->progress = false;
            break;
        default:
            fprintf(stderr, "kvserve bench: unknown or incomplete option '%s'\n%s",
                    argv[optind - 1], bench_usage);
            return KVS_EINVAL;
        }
        if (rc) {
            fputs(bench_usage, stderr);
            return rc;
        }
    }
    const char *why = NULL;
    if (optind < argc) {
        fprintf(stderr, "kvserve bench: unexpected argument '%s'\n%s", argv[optind], bench_usage);
        return KVS_EINVAL;
    }
    if (o->addr == NULL || *o->addr == '\0')
        why = "--addr HOST:PORT is required";
    else if (have_conc && o->open_loop)
        why = "--concurrency (closed loop) and --request-rate (open loop) exclude each other";
    else if (have_burst && !o->open_loop)
        why = "--burstiness needs --request-rate";
    else if (o->tls_name && o->tls_ca == NULL)
        why = "--tls-server-name needs --tls-ca";
    if (why) {
        fprintf(stderr, "kvserve bench: %s\n%s", why, bench_usage);
        return KVS_EINVAL;
    }
    return 0;
}

/* ---- the workload ----------------------------------------------------- */

/* Prompts, output lengths and arrival times, all from --seed; token ids in
 * [0, vocab).  The shared prefix is the same tokens at the head of every
 * prompt, so a prefix cache can serve them. */
static int
bench_workload(bench_t *b, uint32_t vocab)
{
    const bench_opts_t *o = &b->o;
    uint64_t s = o->seed ^ 0x6b767365727665ull;
    uint32_t max_in = (uint32_t)ceil(o->in_len * (1.0 + o->in_range)) + 1;
    uint32_t *common = malloc((size_t)max_in * sizeof *common);
    b->reqs = calloc(o->n_req, sizeof *b->reqs);
    b->arrival = calloc(o->n_req, sizeof *b->arrival);
    if (common == NULL || b->reqs == NULL || b->arrival == NULL) {
        free(common);
        return KVS_ENOMEM;
    }
    for (uint32_t i = 0; i < max_in; i++)
        common[i] = (uint32_t)(srv_rng_next(&s) % vocab);
    double t = 0;
    for (uint32_t k = 0; k < o->n_req; k++) {
        bench_req_t *r = &b->reqs[k];
        r->n_prompt = draw_len(&s, o->in_len, o->in_range);
        r->out_len = draw_len(&s, o->out_len, o->out_range);
        if ((r->prompt = malloc((size_t)r->n_prompt * sizeof *r->prompt)) == NULL) {
            free(common);
            return KVS_ENOMEM;
        }
        uint32_t shared = (uint32_t)lround(o->prefix * r->n_prompt);
        for (uint32_t i = 0; i < r->n_prompt; i++)
            r->prompt[i] = i < shared ? common[i] : (uint32_t)(srv_rng_next(&s) % vocab);
        /* The first request starts at once; gamma with shape 1 is the
         * exponential, so B = 1 is Poisson. */
        if (o->open_loop && k > 0)
            t += o->burst == 1.0f ? -log(rng_unit(&s)) / o->rate
                                  : rng_gamma(&s, o->burst) / ((double)o->rate * o->burst);
        b->arrival[k] = t;
        r->status = GRPC_STATUS_UNKNOWN;
        r->details = grpc_empty_slice();
    }
    free(common);
    return 0;
}

/* ---- GetModelInfo ------------------------------------------------------ */

/* The vocabulary size, or 0 after printing why not. */
static uint32_t
bench_vocab(bench_t *b)
{
    void *rm = grpc_channel_register_call(b->ch, SRV_M_MODEL_INFO, NULL, NULL);
    gpr_timespec dl =
        gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                     gpr_time_from_millis(b->o.timeout_ms ? b->o.timeout_ms : 10000, GPR_TIMESPAN));
    grpc_call *call = grpc_channel_create_registered_call(b->ch, NULL, GRPC_PROPAGATE_DEFAULTS,
                                                          b->cq, rm, dl, NULL);
    Kvserve__V1__GetModelInfoRequest req = KVSERVE__V1__GET_MODEL_INFO_REQUEST__INIT;
    grpc_byte_buffer *req_bb = srv_pb_to_bb(&req.base), *bb = NULL;
    grpc_metadata_array init_md, trail_md;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_op ops[6];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = b->n_auth;
    ops[0].data.send_initial_metadata.metadata = &b->auth;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = req_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &init_md;
    ops[4].op = GRPC_OP_RECV_MESSAGE;
    ops[4].data.recv_message.recv_message = &bb;
    ops[5].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[5].data.recv_status_on_client.trailing_metadata = &trail_md;
    ops[5].data.recv_status_on_client.status = &status;
    ops[5].data.recv_status_on_client.status_details = &details;
    bench_tag_t tag = {K_INFO, NULL};
    uint32_t vocab = 0;
    grpc_call_error e = grpc_call_start_batch(call, ops, 6, &tag, NULL);
    if (e != GRPC_CALL_OK) {
        fprintf(stderr, "kvserve bench: GetModelInfo: grpc_call_error %d\n", (int)e);
    } else {
        /* Nothing else is in flight yet, so the next event is this one. */
        grpc_event ev;
        do
            ev = grpc_completion_queue_next(b->cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        while (ev.type != GRPC_OP_COMPLETE || ev.tag != &tag);
        Kvserve__V1__ModelInfo *mi = NULL;
        if (status != GRPC_STATUS_OK)
            fprintf(stderr, "kvserve bench: GetModelInfo: %s: %.*s\n", srv_grpc_status_name(status),
                    (int)GRPC_SLICE_LENGTH(details), (const char *)GRPC_SLICE_START_PTR(details));
        else if ((mi = (Kvserve__V1__ModelInfo *)srv_bb_to_pb(
                      bb, &kvserve__v1__model_info__descriptor)) == NULL ||
                 mi->n_vocab == 0)
            fprintf(stderr, "kvserve bench: GetModelInfo: no vocabulary size in the answer\n");
        else
            vocab = mi->n_vocab;
        if (mi)
            protobuf_c_message_free_unpacked(&mi->base, NULL);
    }
    grpc_byte_buffer_destroy(bb);
    grpc_byte_buffer_destroy(req_bb);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trail_md);
    grpc_slice_unref(details);
    grpc_call_unref(call);
    return vocab;
}

/* ---- the calls ---------------------------------------------------------- */

static void
req_finish(bench_t *b, bench_req_t *r)
{
    r->done = true;
    b->in_flight--;
    b->n_done++;
    if (r->parse_error && r->status == GRPC_STATUS_CANCELLED)
        r->status = GRPC_STATUS_INTERNAL;
    if (r->status != GRPC_STATUS_OK)
        b->n_err++;
    size_t n = GRPC_SLICE_LENGTH(r->details);
    const char *m = r->parse_error ? "cannot parse a GenerateResponse"
                                   : (const char *)GRPC_SLICE_START_PTR(r->details);
    if (r->parse_error)
        n = strlen(m);
    if ((r->message = malloc(n + 1)) != NULL) {
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
}

static void
req_batch_done(bench_t *b, bench_req_t *r)
{
    if (--r->pending == 0)
        req_finish(b, r);
}

/* Starts one batch; a rejected batch can leave its slot busy (guide §6),
 * so the call is cancelled and the batches already out end it. */
static bool
req_start(bench_req_t *r, const grpc_op *ops, size_t n, bench_tag_t *tag)
{
    grpc_call_error e = grpc_call_start_batch(r->call, ops, n, tag, NULL);
    if (e != GRPC_CALL_OK) {
        grpc_call_cancel(r->call, NULL);
        return false;
    }
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

static void
req_launch(bench_t *b, bench_req_t *r)
{
    const bench_opts_t *o = &b->o;
    r->t_start = (bench_tag_t){K_START, r};
    r->t_status = (bench_tag_t){K_STATUS, r};
    r->t_recv = (bench_tag_t){K_RECV, r};
    grpc_metadata_array_init(&r->init_md);
    grpc_metadata_array_init(&r->trail_md);
    Kvserve__V1__GenerateRequest req = KVSERVE__V1__GENERATE_REQUEST__INIT;
    Kvserve__V1__TokenIds ids = KVSERVE__V1__TOKEN_IDS__INIT;
    Kvserve__V1__SamplingParams sp = KVSERVE__V1__SAMPLING_PARAMS__INIT;
    ids.ids = r->prompt;
    ids.n_ids = r->n_prompt;
    req.prompt_case = KVSERVE__V1__GENERATE_REQUEST__PROMPT_TOKENS;
    req.tokens = &ids;
    sp.has_temperature = 1;
    sp.temperature = 0.0f;
    sp.has_max_tokens = 1;
    sp.max_tokens = r->out_len;
    sp.has_ignore_eos = sp.ignore_eos = 1;
    req.sampling = &sp;
    r->req_bb = srv_pb_to_bb(&req.base);
    gpr_timespec dl = gpr_inf_future(GPR_CLOCK_MONOTONIC);
    if (o->timeout_ms)
        dl = gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                          gpr_time_from_millis(o->timeout_ms, GPR_TIMESPAN));
    r->call = grpc_channel_create_registered_call(b->ch, NULL, GRPC_PROPAGATE_DEFAULTS, b->cq,
                                                  b->rm_gen, dl, NULL);
    r->started = true;
    r->t0 = now_s(b);
    b->in_flight++;
    if (b->in_flight > b->max_in_flight)
        b->max_in_flight = b->in_flight;

    grpc_op ops[4];
    memset(ops, 0, sizeof ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = b->n_auth;
    ops[0].data.send_initial_metadata.metadata = &b->auth;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = r->req_bb;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = &r->init_md;
    bool ok = req_start(r, ops, 4, &r->t_start);
    memset(ops, 0, sizeof ops[0]);
    ops[0].op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    ops[0].data.recv_status_on_client.trailing_metadata = &r->trail_md;
    ops[0].data.recv_status_on_client.status = &r->status;
    ops[0].data.recv_status_on_client.status_details = &r->details;
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
 * arriving at TTFT and get no ITL entry. */
static void
req_message(bench_t *b, bench_req_t *r, const Kvserve__V1__GenerateResponse *m)
{
    double t = now_s(b);
    size_t n = m->n_token_ids;
    if (n) {
        if (r->tokens == 0) {
            r->t_first = t;
        } else {
            double gap = (t - r->t_last) * 1e3 / (double)n;
            for (size_t i = 0; i < n; i++)
                if (!itl_push(r, gap))
                    break;
        }
        r->t_last = t;
        r->tokens += (uint32_t)n;
        b->tok_total += n;
    }
    if (m->usage) {
        r->has_usage = true;
        r->usage_prompt = m->usage->prompt_tokens;
        r->usage_cached = m->usage->cached_prompt_tokens;
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
                r->recv_bb, &kvserve__v1__generate_response__descriptor);
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

static void
bench_loop(bench_t *b)
{
    const bench_opts_t *o = &b->o;
    while (b->n_done < o->n_req) {
        double t = now_s(b), wake = t + 0.25;
        while (b->next < o->n_req) {
            if (o->open_loop) {
                if (b->arrival[b->next] > t) {
                    if (b->arrival[b->next] < wake)
                        wake = b->arrival[b->next];
                    break;
                }
                if (b->in_flight >= BENCH_MAX_IN_FLIGHT) {
                    if (b->cap_held != b->next + 1) { /* count each delayed arrival once */
                        b->cap_hits++;
                        b->cap_held = b->next + 1;
                    }
                    break;
                }
            } else if (b->in_flight >= o->conc) {
                break;
            }
            req_launch(b, &b->reqs[b->next++]);
        }
        bench_progress(b, false);
        if (b->n_done >= o->n_req)
            break;
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

/* ---- the summary -------------------------------------------------------- */

typedef struct stat5 {
    double mean, p50, p90, p95, p99;
    size_t n;
} stat5_t;

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Percentiles interpolate between order statistics (numpy's default, as
 * vLLM's benchmark reports them).  Sorts v. */
static stat5_t
stat5(double *v, size_t n)
{
    stat5_t s = {.n = n};
    if (n == 0)
        return s;
    qsort(v, n, sizeof *v, cmp_double);
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += v[i];
    s.mean = sum / (double)n;
    double *out[] = {&s.p50, &s.p90, &s.p95, &s.p99};
    const double q[] = {0.50, 0.90, 0.95, 0.99};
    for (int k = 0; k < 4; k++) {
        double pos = q[k] * (double)(n - 1);
        size_t i = (size_t)pos;
        double f = pos - (double)i;
        *out[k] = i + 1 < n ? v[i] + f * (v[i + 1] - v[i]) : v[i];
    }
    return s;
}

typedef struct summary {
    stat5_t ttft, tpot, itl, e2e;
    uint32_t ok;
    uint64_t out_tokens, in_tokens, cached_tokens;
    double duration;
    uint32_t errors[N_CODES + 1];
} summary_t;

static double
req_tpot(const bench_req_t *r)
{
    return (r->t_end - r->t_first) * 1e3 / (double)(r->tokens - 1);
}

static int
bench_summarize(const bench_t *b, summary_t *s)
{
    const bench_opts_t *o = &b->o;
    memset(s, 0, sizeof *s);
    size_t n_itl = 0;
    for (uint32_t k = 0; k < o->n_req; k++)
        n_itl += b->reqs[k].n_itl;
    double *ttft = malloc((o->n_req + 1) * sizeof *ttft),
           *tpot = malloc((o->n_req + 1) * sizeof *tpot),
           *e2e = malloc((o->n_req + 1) * sizeof *e2e), *itl = malloc((n_itl + 1) * sizeof *itl);
    if (!ttft || !tpot || !e2e || !itl) {
        free(ttft);
        free(tpot);
        free(e2e);
        free(itl);
        return KVS_ENOMEM;
    }
    size_t n_ttft = 0, n_tpot = 0, n_e2e = 0;
    n_itl = 0;
    for (uint32_t k = 0; k < o->n_req; k++) {
        const bench_req_t *r = &b->reqs[k];
        if (r->t_end > s->duration)
            s->duration = r->t_end;
        if (r->status != GRPC_STATUS_OK) {
            s->errors[(unsigned)r->status < N_CODES ? r->status : N_CODES]++;
            continue;
        }
        s->ok++;
        s->out_tokens += r->tokens;
        s->in_tokens += r->has_usage ? r->usage_prompt : r->n_prompt;
        s->cached_tokens += r->usage_cached;
        e2e[n_e2e++] = (r->t_end - r->t0) * 1e3;
        if (r->tokens) {
            ttft[n_ttft++] = (r->t_first - r->t0) * 1e3;
            if (r->tokens > 1)
                tpot[n_tpot++] = req_tpot(r);
        }
        for (size_t i = 0; i < r->n_itl; i++)
            itl[n_itl++] = r->itl[i];
    }
    s->ttft = stat5(ttft, n_ttft);
    s->tpot = stat5(tpot, n_tpot);
    s->itl = stat5(itl, n_itl);
    s->e2e = stat5(e2e, n_e2e);
    free(ttft);
    free(tpot);
    free(e2e);
    free(itl);
    return 0;
}

static void
print_summary(const bench_t *b, const summary_t *s)
{
    const bench_opts_t *o = &b->o;
    double d = s->duration > 0 ? s->duration : 1e-9;
    printf("============ kvserve bench ============\n");
    if (o->open_loop)
        printf("%-32s %.3g req/s, burstiness %g\n", "Mode:", o->rate, o->burst);
    else
        printf("%-32s closed loop, concurrency %u\n", "Mode:", o->conc);
    printf("%-32s %u\n", "Successful requests:", s->ok);
    printf("%-32s %u\n", "Failed requests:", o->n_req - s->ok);
    for (unsigned c = 0; c <= N_CODES; c++)
        if (s->errors[c])
            printf("  %-30s %u\n",
                   c < N_CODES ? srv_grpc_status_name((grpc_status_code)c) : "OTHER", s->errors[c]);
    printf("%-32s %.3f\n", "Duration (s):", s->duration);
    printf("%-32s %llu\n", "Total input tokens:", (unsigned long long)s->in_tokens);
    printf("%-32s %llu (%.1f%%)\n", "Cached input tokens:", (unsigned long long)s->cached_tokens,
           s->in_tokens ? 100.0 * (double)s->cached_tokens / (double)s->in_tokens : 0.0);
    printf("%-32s %llu\n", "Total output tokens:", (unsigned long long)s->out_tokens);
    printf("%-32s %.2f\n", "Request throughput (req/s):", s->ok / d);
    printf("%-32s %.2f\n", "Output token throughput (tok/s):", (double)s->out_tokens / d);
    printf("%-32s %u\n", "Peak requests in flight:", b->max_in_flight);
    if (b->cap_hits)
        printf("%-32s %d (%llu arrivals started late)\n", "In-flight cap hit:", BENCH_MAX_IN_FLIGHT,
               (unsigned long long)b->cap_hits);
    printf("%-8s %10s %10s %10s %10s %10s\n", "(ms)", "mean", "p50", "p90", "p95", "p99");
    const stat5_t *st[] = {&s->ttft, &s->tpot, &s->itl, &s->e2e};
    const char *nm[] = {"TTFT", "TPOT", "ITL", "E2E"};
    for (int i = 0; i < 4; i++)
        printf("%-8s %10.2f %10.2f %10.2f %10.2f %10.2f\n", nm[i], st[i]->mean, st[i]->p50,
               st[i]->p90, st[i]->p95, st[i]->p99);
    printf("=======================================\n");
}

static void
json_stat(FILE *f, const char *name, const stat5_t *s)
{
    fprintf(f,
            "\"%s\": {\"n\": %zu, \"mean\": %.4f, \"p50\": %.4f, \"p90\": %.4f, \"p95\": %.4f, "
            "\"p99\": %.4f}",
            name, s->n, s->mean, s->p50, s->p90, s->p95, s->p99);
}

static int
write_json(const bench_t *b, const summary_t *s)
{
    const bench_opts_t *o = &b->o;
    FILE *f = fopen(o->json, "w");
    if (f == NULL) {
        fprintf(stderr, "kvserve bench: --json: cannot write '%s': %s\n", o->json, strerror(errno));
        return KVS_EIO;
    }
    double d = s->duration > 0 ? s->duration : 1e-9;
    fprintf(f, "{\"config\": {\"addr\": ");
    srv_json_str(f, o->addr, strlen(o->addr));
    fprintf(f,
            ", \"num_requests\": %u, \"mode\": \"%s\", \"concurrency\": %u, "
            "\"request_rate\": %g, \"burstiness\": %g, \"input_len\": %u, "
            "\"input_len_range\": %g, \"output_len\": %u, \"output_len_range\": %g, "
            "\"shared_prefix\": %g, \"seed\": %llu, \"timeout_ms\": %u},\n",
            o->n_req, o->open_loop ? "open" : "closed", o->open_loop ? 0 : o->conc,
            o->open_loop ? o->rate : 0.0, o->open_loop ? o->burst : 0.0, o->in_len, o->in_range,
            o->out_len, o->out_range, o->prefix, (unsigned long long)o->seed, o->timeout_ms);
    fprintf(f,
            "\"summary\": {\"completed\": %u, \"failed\": %u, \"duration_s\": %.6f, "
            "\"request_throughput\": %.4f, \"output_throughput\": %.4f, "
            "\"total_input_tokens\": %llu, \"cached_input_tokens\": %llu, "
            "\"cached_share\": %.6f, \"total_output_tokens\": %llu, \"max_in_flight\": %u, "
            "\"in_flight_cap_hits\": %llu, ",
            s->ok, o->n_req - s->ok, s->duration, s->ok / d, (double)s->out_tokens / d,
            (unsigned long long)s->in_tokens, (unsigned long long)s->cached_tokens,
            s->in_tokens ? (double)s->cached_tokens / (double)s->in_tokens : 0.0,
            (unsigned long long)s->out_tokens, b->max_in_flight, (unsigned long long)b->cap_hits);
    fprintf(f, "\"errors\": {");
    bool first = true;
    for (unsigned c = 0; c <= N_CODES; c++)
        if (s->errors[c]) {
            fprintf(f, "%s\"%s\": %u", first ? "" : ", ",
                    c < N_CODES ? srv_grpc_status_name((grpc_status_code)c) : "OTHER",
                    s->errors[c]);
            first = false;
        }
    fprintf(f, "}, ");
    json_stat(f, "ttft_ms", &s->ttft);
    fprintf(f, ", ");
    json_stat(f, "tpot_ms", &s->tpot);
    fprintf(f, ", ");
    json_stat(f, "itl_ms", &s->itl);
    fprintf(f, ", ");
    json_stat(f, "e2e_ms", &s->e2e);
    fprintf(f, "},\n\"requests\": [\n");
    for (uint32_t k = 0; k < o->n_req; k++) {
        const bench_req_t *r = &b->reqs[k];
        const char *msg = r->message ? r->message : "";
        fprintf(f,
                "{\"index\": %u, \"start_s\": %.6f, \"ttft_ms\": %.4f, \"e2e_ms\": %.4f, "
                "\"tpot_ms\": %.4f, \"output_tokens\": %u, \"requested_output_tokens\": %u, "
                "\"prompt_tokens\": %u, \"cached_prompt_tokens\": %u, \"status\": %d, "
                "\"status_name\": \"%s\", \"message\": ",
                k, r->t0, r->tokens ? (r->t_first - r->t0) * 1e3 : 0.0, (r->t_end - r->t0) * 1e3,
                r->tokens > 1 ? req_tpot(r) : 0.0, r->tokens, r->out_len,
                r->has_usage ? r->usage_prompt : r->n_prompt, r->usage_cached, (int)r->status,
                srv_grpc_status_name(r->status));
        srv_json_str(f, msg, strlen(msg));
        fprintf(f, ", \"itl_ms\": [");
        for (size_t i = 0; i < r->n_itl; i++)
            fprintf(f, "%s%.4f", i ? ", " : "", r->itl[i]);
        fprintf(f, "]}%s\n", k + 1 < o->n_req ? "," : "");
    }
    fprintf(f, "]}\n");
    if (fclose(f) != 0) {
        fprintf(stderr, "kvserve bench: --json: cannot write '%s': %s\n", o->json, strerror(errno));
        return KVS_EIO;
    }
    return 0;
}

/* ---- the command -------------------------------------------------------- */

int
srv_cmd_bench(int argc, char **argv)
{
    bench_t b;
    memset(&b, 0, sizeof b);
    int rc = bench_parse(argc, argv, &b.o);
    if (rc)
        return rc == 1 ? 0 : 2;
    char *ca = NULL, *bearer = NULL;
    int status = 2;
    if (srv_client_creds("bench", b.o.tls_ca, b.o.api_key_file, &ca, &bearer))
        goto out;
    if (bearer) {
        b.auth.key = grpc_slice_from_static_string("authorization");
        b.auth.value = grpc_slice_from_static_string(bearer);
        b.n_auth = 1;
    }

    status = 1;
    grpc_init();
    b.ch = srv_client_channel(b.o.addr, ca, b.o.tls_name);
    b.cq = grpc_completion_queue_create_for_next(NULL);
    b.rm_gen = grpc_channel_register_call(b.ch, SRV_M_GENERATE, NULL, NULL);
    clock_gettime(CLOCK_MONOTONIC, &b.epoch);

    uint32_t vocab = bench_vocab(&b);
    if (vocab) {
        if (bench_workload(&b, vocab)) {
            fprintf(stderr, "kvserve bench: out of memory\n");
        } else {
            /* Times count from the first request, not from GetModelInfo. */
            clock_gettime(CLOCK_MONOTONIC, &b.epoch);
            bench_loop(&b);
            summary_t s;
            if (bench_summarize(&b, &s) == 0) {
                print_summary(&b, &s);
                fflush(stdout);
                int jrc = b.o.json ? write_json(&b, &s) : 0;
                status = s.ok == b.o.n_req && jrc == 0 ? 0 : 1;
            }
        }
    }

    if (b.reqs)
        for (uint32_t k = 0; k < b.o.n_req; k++) {
            grpc_slice_unref(b.reqs[k].details);
            free(b.reqs[k].prompt);
            free(b.reqs[k].itl);
            free(b.reqs[k].message);
        }
    free(b.reqs);
    free(b.arrival);
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
    return status;
}
