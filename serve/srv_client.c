/*
 * serve/srv_client.c — `kvserve generate` and `kvserve health`: the
 * project's own client on the gRPC core API, called from main.c.  Each
 * command opens one channel and one pluck completion queue, makes one call
 * and tears everything down again, so it doubles as an end-to-end probe of
 * the server.
 */
#include "srv_int.h"

#include <grpc/grpc_security.h>
#include <grpc/support/time.h>

#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

static const char gen_usage[] =
    "usage: kvserve generate --addr HOST:PORT (--prompt TEXT | --prompt-tokens 1,2,3)\n"
    "                        [--max-tokens N] [--temperature T] [--top-k K] [--top-p P]\n"
    "                        [--min-p P] [--repetition-penalty R] [--presence-penalty P]\n"
    "                        [--frequency-penalty F] [--seed S] [--ignore-eos] [--stop STR]...\n"
    "                        [--stop-token-ids 1,2] [--logprobs N (0..20, with --json)]\n"
    "                        [--forced-tokens 1,2,3 (scored, not sampled; with --json)]\n"
    "                        [--min-tokens N] [--n N (outputs, 1..64)]\n"
    "                        [--logit-bias ID:BIAS,... (BIAS in [-100, 100])]\n"
    "                        [--prompt-logprobs N (0..20, with --json)]\n"
    "                        [--allowed-token-ids 1,2,3] [--truncate-prompt-tokens N]\n"
    "                        [--guided-choice STR]... [--include-stop-str-in-output]\n"
    "                        [--guided-regex RE | --guided-json SCHEMA|@FILE\n"
    "                         [--guided-whitespace-pattern RE] | --guided-grammar GBNF|@FILE]\n"
    "                        [--priority N] [--cache-salt S]\n"
    "                        [--request-id S] [--timeout-ms N] [--api-key-file F]\n"
    "                        [--tls-ca F] [--tls-server-name NAME] [--json]\n";

static const char health_usage[] =
    "usage: kvserve health --addr HOST:PORT [--service NAME] [--timeout-ms N (5000)]\n"
    "                      [--tls-ca F] [--tls-server-name NAME]\n";

/* Tags of the three batches of a call; pluck finds each by its tag. */
enum { T_START, T_STATUS, T_RECV, T_COUNT };
#define TAG(t) ((void *)(intptr_t)((t) + 1))

typedef struct client {
    grpc_completion_queue *cq;
    grpc_channel *ch;
    grpc_call *call;
    grpc_metadata_array init_md, trail_md;
    grpc_status_code status;
    grpc_slice details;
    unsigned pending; /* bit per tag started and not yet plucked */
} client_t;

const char *
srv_grpc_status_name(grpc_status_code s)
{
    /* Indexed by grpc_status_code, 0..16. */
    static const char *const names[] = {
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    };
    return (unsigned)s < sizeof names / sizeof names[0] ? names[s] : "UNKNOWN";
}

/* The whole file as a string (CA bundles and keys hold no NUL bytes); NULL,
 * reported against the flag, when it cannot be read. */
static char *
slurp(const char *cmd, const char *flag, const char *path)
{
    errno = 0;
    char *buf = srv_read_file(path, NULL);
    if (buf == NULL)
        fprintf(stderr, "kvserve %s: %s: cannot read '%s': %s\n", cmd, flag, path,
                errno ? strerror(errno) : "out of memory");
    return buf;
}

int
srv_client_creds(const char *cmd, const char *ca_path, const char *key_path, char **ca,
                 char **bearer)
{
    *ca = *bearer = NULL;
    if (ca_path && (*ca = slurp(cmd, "--tls-ca", ca_path)) == NULL)
        return KVS_EINVAL;
    if (key_path == NULL)
        return 0;
    char *key = slurp(cmd, "--api-key-file", key_path);
    if (key == NULL)
        goto fail;
    size_t n = strlen(key);
    while (n && strchr(" \t\r\n", key[n - 1]))
        key[--n] = '\0';
    if (n == 0)
        fprintf(stderr, "kvserve %s: --api-key-file: '%s' is empty\n", cmd, key_path);
    else if (asprintf(bearer, "Bearer %s", key) < 0)
        *bearer = NULL;
    free(key);
    if (*bearer)
        return 0;
fail:
    free(*ca);
    *ca = NULL;
    return KVS_EINVAL;
}

grpc_channel *
srv_client_channel(const char *addr, const char *ca_pem, const char *tls_name)
{
    grpc_channel_credentials *cc = ca_pem ? grpc_ssl_credentials_create(ca_pem, NULL, NULL, NULL)
                                          : grpc_insecure_credentials_create();
    grpc_arg arg = {GRPC_ARG_STRING, GRPC_SSL_TARGET_NAME_OVERRIDE_ARG, {.string = NULL}};
    arg.value.string = (char *)tls_name;
    grpc_channel_args args = {tls_name ? 1 : 0, &arg};
    grpc_channel *ch = grpc_channel_create(addr, cc, &args);
    grpc_channel_credentials_release(cc);
    return ch;
}

gpr_timespec
srv_deadline_ms(double ms)
{
    if (ms <= 0)
        return gpr_inf_future(GPR_CLOCK_MONOTONIC);
    return gpr_time_add(gpr_now(GPR_CLOCK_MONOTONIC),
                        gpr_time_from_micros((int64_t)(ms * 1e3), GPR_TIMESPAN));
}

size_t
srv_call_send_ops(grpc_op *ops, const grpc_metadata *md, size_t n_md, grpc_byte_buffer *req,
                  grpc_metadata_array *init_md)
{
    memset(ops, 0, 4 * sizeof *ops);
    ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
    ops[0].data.send_initial_metadata.count = n_md;
    ops[0].data.send_initial_metadata.metadata = (grpc_metadata *)md;
    ops[1].op = GRPC_OP_SEND_MESSAGE;
    ops[1].data.send_message.send_message = req;
    ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
    ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
    ops[3].data.recv_initial_metadata.recv_initial_metadata = init_md;
    return 4;
}

void
srv_call_status_op(grpc_op *op, grpc_metadata_array *trail_md, grpc_status_code *status,
                   grpc_slice *details)
{
    memset(op, 0, sizeof *op);
    op->op = GRPC_OP_RECV_STATUS_ON_CLIENT;
    op->data.recv_status_on_client.trailing_metadata = trail_md;
    op->data.recv_status_on_client.status = status;
    op->data.recv_status_on_client.status_details = details;
}

grpc_call_error
srv_call_start(grpc_call *call, const grpc_op *ops, size_t n, void *tag)
{
    grpc_call_error e = grpc_call_start_batch(call, ops, n, tag, NULL);
    if (e != GRPC_CALL_OK)
        grpc_call_cancel(call, NULL);
    return e;
}

/* Shuts a pluck queue down and destroys it once it says so; every tag must
 * have been plucked. */
static void
cq_close(grpc_completion_queue *cq)
{
    grpc_completion_queue_shutdown(cq);
    grpc_event ev;
    do
        ev = grpc_completion_queue_pluck(cq, NULL, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    while (ev.type != GRPC_QUEUE_SHUTDOWN);
    grpc_completion_queue_destroy(cq);
}

ProtobufCMessage *
srv_client_unary(grpc_channel *ch, const char *method, const grpc_metadata *md, size_t n_md,
                 uint32_t timeout_ms, const ProtobufCMessage *req,
                 const ProtobufCMessageDescriptor *resp_desc, const char *who)
{
    grpc_completion_queue *cq = grpc_completion_queue_create_for_pluck(NULL);
    void *rm = grpc_channel_register_call(ch, method, NULL, NULL);
    grpc_call *call = grpc_channel_create_registered_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq, rm,
                                                          srv_deadline_ms(timeout_ms), NULL);
    grpc_byte_buffer *req_bb = srv_pb_to_bb(req), *bb = NULL;
    grpc_metadata_array init_md, trail_md;
    grpc_metadata_array_init(&init_md);
    grpc_metadata_array_init(&trail_md);
    grpc_status_code status = GRPC_STATUS_UNKNOWN;
    grpc_slice details = grpc_empty_slice();
    grpc_op ops[6];
    size_t n = srv_call_send_ops(ops, md, n_md, req_bb, &init_md);
    memset(&ops[n], 0, sizeof ops[n]);
    ops[n].op = GRPC_OP_RECV_MESSAGE;
    ops[n].data.recv_message.recv_message = &bb;
    srv_call_status_op(&ops[n + 1], &trail_md, &status, &details);
    ProtobufCMessage *m = NULL;
    grpc_call_error e = grpc_call_start_batch(call, ops, n + 2, (void *)1, NULL);
    if (e != GRPC_CALL_OK) {
        fprintf(stderr, "%s: cannot start the call (grpc_call_error %d)\n", who, (int)e);
    } else {
        grpc_completion_queue_pluck(cq, (void *)1, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (status != GRPC_STATUS_OK)
            fprintf(stderr, "%s: %s: %.*s\n", who, srv_grpc_status_name(status),
                    (int)GRPC_SLICE_LENGTH(details), (const char *)GRPC_SLICE_START_PTR(details));
        else if ((m = srv_bb_to_pb(bb, resp_desc, NULL, 0)) == NULL)
            fprintf(stderr, "%s: cannot parse a %s\n", who, resp_desc->short_name);
    }
    grpc_byte_buffer_destroy(bb);
    grpc_byte_buffer_destroy(req_bb);
    grpc_metadata_array_destroy(&init_md);
    grpc_metadata_array_destroy(&trail_md);
    grpc_slice_unref(details);
    grpc_call_unref(call);
    cq_close(cq);
    return m;
}

int
srv_conn_opt(const char *cmd, int c, srv_conn_opts_t *o)
{
    switch (c) {
    case 'a':
        o->addr = optarg;
        return 0;
    case 'T':
        return srv_parse_u32(cmd, "--timeout-ms", optarg, 1, INT32_MAX, &o->timeout_ms);
    case 'C':
        o->tls_ca = optarg;
        return 0;
    case 'N':
        o->tls_name = optarg;
        return 0;
    }
    return 1;
}

int
srv_conn_check(const char *cmd, const srv_conn_opts_t *o, int argc, char **argv, const char *usage)
{
    if (optind < argc) {
        fprintf(stderr, "kvserve %s: unexpected argument '%s'\n%s", cmd, argv[optind], usage);
        return KVS_EINVAL;
    }
    if (o->addr == NULL || *o->addr == '\0') {
        fprintf(stderr, "kvserve %s: --addr HOST:PORT is required\n%s", cmd, usage);
        return KVS_EINVAL;
    }
    if (o->tls_name && o->tls_ca == NULL) {
        fprintf(stderr, "kvserve %s: --tls-server-name needs --tls-ca\n%s", cmd, usage);
        return KVS_EINVAL;
    }
    return 0;
}

/* grpc_init, the channel, the cq and the call; client_close undoes all of
 * it whatever state it is in. */
static void
client_open(client_t *c, const srv_conn_opts_t *o, const char *ca_pem, const char *method)
{
    memset(c, 0, sizeof *c);
    grpc_metadata_array_init(&c->init_md);
    grpc_metadata_array_init(&c->trail_md);
    c->details = grpc_empty_slice();
    c->status = GRPC_STATUS_UNKNOWN; /* until RECV_STATUS_ON_CLIENT says otherwise */
    grpc_init();
    c->ch = srv_client_channel(o->addr, ca_pem, o->tls_name);
    c->cq = grpc_completion_queue_create_for_pluck(NULL);
    void *rm = grpc_channel_register_call(c->ch, method, NULL, NULL);
    c->call = grpc_channel_create_registered_call(c->ch, NULL, GRPC_PROPAGATE_DEFAULTS, c->cq, rm,
                                                  srv_deadline_ms(o->timeout_ms), NULL);
}

static void
client_wait(client_t *c, int tag)
{
    grpc_completion_queue_pluck(c->cq, TAG(tag), gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
    c->pending &= ~(1u << tag);
}

static bool
client_start(client_t *c, const char *cmd, const grpc_op *ops, size_t n, int tag)
{
    grpc_call_error e = srv_call_start(c->call, ops, n, TAG(tag));
    if (e != GRPC_CALL_OK) {
        fprintf(stderr, "kvserve %s: cannot start the call (grpc_call_error %d)\n", cmd, (int)e);
        return false;
    }
    c->pending |= 1u << tag;
    return true;
}

static void
client_close(client_t *c)
{
    for (int t = 0; t < T_COUNT; t++)
        if (c->pending & (1u << t))
            client_wait(c, t);
    grpc_metadata_array_destroy(&c->init_md);
    grpc_metadata_array_destroy(&c->trail_md);
    grpc_slice_unref(c->details);
    grpc_call_unref(c->call);
    grpc_channel_destroy(c->ch);
    cq_close(c->cq); /* every tag was plucked above */
    grpc_shutdown_blocking();
}

static int
report_status(const char *cmd, const client_t *c)
{
    if (c->status == GRPC_STATUS_OK)
        return 0;
    fprintf(stderr, "kvserve %s: %s: %.*s\n", cmd, srv_grpc_status_name(c->status),
            (int)GRPC_SLICE_LENGTH(c->details), (const char *)GRPC_SLICE_START_PTR(c->details));
    return 1;
}

/* ---- generate --------------------------------------------------------------- */

typedef struct gen_opts {
    srv_conn_opts_t conn;
    const char *prompt, *request_id, *cache_salt, *api_key_file;
    int32_t *prompt_ids, *stop_ids, *forced_ids, *allowed_ids;
    size_t n_prompt_ids, n_forced_ids;
    Kvserve__V1__SamplingParams sp;
    int32_t *bias_ids;
    float *bias;
    Kvserve__V1__LogitBias *lb, **lbp; /* sp.logit_bias */
    bool sampling, has_priority, json, has_truncate;
    int32_t priority;
    uint32_t truncate;
    srv_guided_opts_t guided;
} gen_opts_t;

static void
gen_opts_free(gen_opts_t *o)
{
    free(o->prompt_ids);
    free(o->stop_ids);
    free(o->forced_ids);
    free(o->allowed_ids);
    free(o->sp.stop);
    free(o->sp.guided_choice);
    srv_guided_free(&o->guided);
    free(o->bias_ids);
    free(o->bias);
    free(o->lb);
    free(o->lbp);
}

/* 0, 1 after --help, or a KVS_E* code after a usage message. */
static int
gen_parse(int argc, char **argv, gen_opts_t *o)
{
    static const struct option lo[] = {
        SRV_CONN_LONGOPTS,
        {"help", 0, 0, 'h'},
        {"prompt", 1, 0, 'p'},
        {"prompt-tokens", 1, 0, 'P'},
        {"max-tokens", 1, 0, 'm'},
        {"temperature", 1, 0, 't'},
        {"top-k", 1, 0, 'k'},
        {"top-p", 1, 0, 'q'},
        {"min-p", 1, 0, 'n'},
        {"seed", 1, 0, 's'},
        {"ignore-eos", 0, 0, 'e'},
        {"stop", 1, 0, 'x'},
        {"stop-token-ids", 1, 0, 'X'},
        {"logprobs", 1, 0, 'L'},
        {"forced-tokens", 1, 0, 'O'},
        {"min-tokens", 1, 0, 'M'},
        {"n", 1, 0, 'c'},
        {"logit-bias", 1, 0, 'B'},
        {"prompt-logprobs", 1, 0, 'G'},
        {"allowed-token-ids", 1, 0, 'A'},
        {"guided-choice", 1, 0, 'H'},
        SRV_GUIDED_LONGOPTS,
        {"include-stop-str-in-output", 0, 0, 'I'},
        {"truncate-prompt-tokens", 1, 0, 'U'},
        {"repetition-penalty", 1, 0, 'R'},
        {"presence-penalty", 1, 0, 'E'},
        {"frequency-penalty", 1, 0, 'F'},
        {"priority", 1, 0, 'r'},
        {"cache-salt", 1, 0, 'S'},
        {"request-id", 1, 0, 'i'},
        {"api-key-file", 1, 0, 'K'},
        {"json", 0, 0, 'j'},
        {0, 0, 0, 0},
    };
    const char *C = "generate";
    Kvserve__V1__SamplingParams sp = KVSERVE__V1__SAMPLING_PARAMS__INIT;
    *o = (gen_opts_t){.sp = sp};
    /* Every --stop and --guided-choice points into argv: argc slots
     * always suffice. */
    if ((o->sp.stop = malloc((size_t)argc * sizeof *o->sp.stop)) == NULL ||
        (o->sp.guided_choice = malloc((size_t)argc * sizeof *o->sp.guided_choice)) == NULL)
        return KVS_ENOMEM;
    Kvserve__V1__SamplingParams *p = &o->sp;
    size_t n_stop_ids = 0;
    opterr = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        int rc = srv_conn_opt(C, c, &o->conn);
        if (rc == 1) {
            rc = 0;
            o->sampling |= strchr("mtkqnsexXLREFMcBGAHIgJW", c) != NULL;
            switch (c) {
            case 'h':
                fputs(gen_usage, stdout);
                return 1;
            case 'p':
                o->prompt = optarg;
                break;
            case 'P':
                free(o->prompt_ids);
                o->prompt_ids = NULL;
                rc = srv_parse_tokens(C, "--prompt-tokens", optarg, &o->prompt_ids,
                                      &o->n_prompt_ids);
                break;
            case 'm':
                rc = srv_parse_u32(C, "--max-tokens", optarg, 1, 1u << 24, &p->max_tokens);
                p->has_max_tokens = 1;
                break;
            case 't':
                rc = srv_parse_f32(C, "--temperature", optarg, 0.0f, 100.0f, &p->temperature);
                p->has_temperature = 1;
                break;
            case 'k':
                rc = srv_parse_u32(C, "--top-k", optarg, 0, INT32_MAX, &p->top_k);
                p->has_top_k = 1;
                break;
            case 'q':
                rc = srv_parse_f32(C, "--top-p", optarg, 1e-6f, 1.0f, &p->top_p);
                p->has_top_p = 1;
                break;
            case 'n':
                rc = srv_parse_f32(C, "--min-p", optarg, 0.0f, 1.0f, &p->min_p);
                p->has_min_p = 1;
                break;
            case 's':
                rc = srv_parse_u64(C, "--seed", optarg, &p->seed);
                p->has_seed = 1;
                break;
            case 'e':
                p->has_ignore_eos = p->ignore_eos = 1;
                break;
            case 'R':
                rc = srv_parse_f32(C, "--repetition-penalty", optarg, SRV_REP_PENALTY_MIN,
                                   SRV_REP_PENALTY_MAX, &p->repetition_penalty);
                p->has_repetition_penalty = 1;
                break;
            case 'E':
                rc = srv_parse_f32(C, "--presence-penalty", optarg, -MODEL_PENALTY_MAX,
                                   MODEL_PENALTY_MAX, &p->presence_penalty);
                p->has_presence_penalty = 1;
                break;
            case 'F':
                rc = srv_parse_f32(C, "--frequency-penalty", optarg, -MODEL_PENALTY_MAX,
                                   MODEL_PENALTY_MAX, &p->frequency_penalty);
                p->has_frequency_penalty = 1;
                break;
            case 'L':
                rc = srv_parse_u32(C, "--logprobs", optarg, 0, SCHED_MAX_LOGPROBS, &p->logprobs);
                p->has_logprobs = 1;
                break;
            case 'A': {
                free(o->allowed_ids);
                o->allowed_ids = NULL;
                size_t na = 0;
                rc = srv_parse_tokens(C, "--allowed-token-ids", optarg, &o->allowed_ids, &na);
                p->allowed_token_ids = (uint32_t *)o->allowed_ids; /* checked non-negative */
                p->n_allowed_token_ids = na;
                break;
            }
            case 'U':
                rc =
                    srv_parse_u32(C, "--truncate-prompt-tokens", optarg, 1, 1u << 24, &o->truncate);
                o->has_truncate = true;
                break;
            case 'G':
                rc = srv_parse_u32(C, "--prompt-logprobs", optarg, 0, SCHED_MAX_LOGPROBS,
                                   &p->prompt_logprobs);
                p->has_prompt_logprobs = 1;
                break;
            case 'x':
                p->stop[p->n_stop++] = optarg;
                break;
            case 'H':
                p->guided_choice[p->n_guided_choice++] = optarg;
                break;
            case SRV_O_GREGEX:
            case SRV_O_GJSON:
            case SRV_O_GWS:
            case SRV_O_GGRAMMAR:
                rc = srv_guided_opt(C, c, optarg, &o->guided);
                p->guided_regex = (char *)o->guided.regex;
                p->guided_json = o->guided.json;
                p->guided_whitespace_pattern = (char *)o->guided.ws;
                p->guided_grammar = o->guided.grammar;
                break;
            case 'I':
                p->has_include_stop_str_in_output = p->include_stop_str_in_output = 1;
                break;
            case 'X':
                free(o->stop_ids);
                o->stop_ids = NULL;
                n_stop_ids = 0;
                rc = srv_parse_tokens(C, "--stop-token-ids", optarg, &o->stop_ids, &n_stop_ids);
                break;
            case 'M':
                rc = srv_parse_u32(C, "--min-tokens", optarg, 0, 1u << 24, &p->min_tokens);
                p->has_min_tokens = 1;
                break;
            case 'c':
                rc = srv_parse_u32(C, "--n", optarg, 1, SCHED_MAX_N, &p->n);
                p->has_n = 1;
                break;
            case 'B': {
                free(o->bias_ids);
                free(o->bias);
                o->bias_ids = NULL;
                o->bias = NULL;
                uint32_t nb = 0;
                rc = srv_parse_logit_bias(C, optarg, &o->bias_ids, &o->bias, &nb);
                p->n_logit_bias = nb;
                break;
            }
            case 'O':
                free(o->forced_ids);
                o->forced_ids = NULL;
                rc = srv_parse_tokens(C, "--forced-tokens", optarg, &o->forced_ids,
                                      &o->n_forced_ids);
                break;
            case 'r': {
                char *end;
                errno = 0;
                long long v = strtoll(optarg, &end, 10);
                if (*optarg == '\0' || *end != '\0' || errno || v < INT32_MIN || v > INT32_MAX) {
                    fprintf(stderr,
                            "kvserve generate: --priority: expected a 32-bit integer, "
                            "got '%s'\n",
                            optarg);
                    rc = KVS_EINVAL;
                }
                o->priority = (int32_t)v;
                o->has_priority = true;
                break;
            }
            case 'S':
                o->cache_salt = optarg;
                break;
            case 'i':
                o->request_id = optarg;
                break;
            case 'K':
                o->api_key_file = optarg;
                break;
            case 'j':
                o->json = true;
                break;
            default:
                fprintf(stderr, "kvserve generate: unknown or incomplete option '%s'\n%s",
                        argv[optind - 1], gen_usage);
                return KVS_EINVAL;
            }
        }
        if (rc) {
            fputs(gen_usage, stderr);
            return rc;
        }
    }
    /* Ids are checked non-negative, and int32_t may alias uint32_t. */
    p->stop_token_ids = (uint32_t *)o->stop_ids;
    p->n_stop_token_ids = n_stop_ids;
    if (p->n_logit_bias) {
        o->lb = calloc(p->n_logit_bias, sizeof *o->lb);
        o->lbp = calloc(p->n_logit_bias, sizeof *o->lbp);
        if (!o->lb || !o->lbp)
            return KVS_ENOMEM;
        for (size_t i = 0; i < p->n_logit_bias; i++) {
            Kvserve__V1__LogitBias b = KVSERVE__V1__LOGIT_BIAS__INIT;
            b.has_token_id = b.has_bias = 1;
            b.token_id = (uint32_t)o->bias_ids[i];
            b.bias = o->bias[i];
            o->lb[i] = b;
            o->lbp[i] = &o->lb[i];
        }
        p->logit_bias = o->lbp;
    }
    if (srv_conn_check(C, &o->conn, argc, argv, gen_usage))
        return KVS_EINVAL;
    if ((o->prompt == NULL) == (o->prompt_ids == NULL)) {
        fprintf(stderr, "kvserve generate: give exactly one of --prompt and --prompt-tokens\n%s",
                gen_usage);
        return KVS_EINVAL;
    }
    return 0;
}

/* What the stream has delivered so far, per output (--n of them; the
 * request id and the message count in output 0's). */
typedef struct gen_result {
    uint32_t *tokens;
    size_t n_tokens, cap_tokens;
    char *text, *request_id, *stop_match;
    size_t text_len, cap_text;
    srv_buf_t logprobs; /* JSON: the tokens' objects, comma-separated */
    srv_buf_t plp;      /* the same for the prompt's (output 0's) */
    Kvserve__V1__FinishReason finish;
    Kvserve__V1__Usage usage;
    uint64_t messages;
} gen_result_t;

static bool
grow(void **p, size_t *cap, size_t need, size_t elem)
{
    if (need <= *cap)
        return true;
    size_t n = *cap ? *cap : 64;
    while (n < need)
        n *= 2;
    void *np = realloc(*p, n * elem);
    if (np == NULL)
        return false;
    *p = np;
    *cap = n;
    return true;
}

/* A float as JSON: null where it is not finite (a token the model rules
 * out has log-probability -inf). */
static void
json_float(srv_buf_t *b, float v)
{
    char num[32];
    snprintf(num, sizeof num, isfinite(v) ? "%.9g" : "null", (double)v);
    srv_buf_puts(b, num);
}

/* Appends n TokenLogprobs to b as JSON objects, comma-separated. */
static void
json_logprobs(srv_buf_t *b, Kvserve__V1__TokenLogprob *const *lps, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const Kvserve__V1__TokenLogprob *t = lps[i];
        srv_buf_puts(b, b->len ? ", {\"logprob\": " : "{\"logprob\": ");
        json_float(b, t->logprob);
        srv_buf_puts(b, ", \"top\": [");
        size_t k_n = t->n_top_ids < t->n_top_logprobs ? t->n_top_ids : t->n_top_logprobs;
        for (size_t k = 0; k < k_n; k++) {
            char id[24];
            snprintf(id, sizeof id, "%s[%u, ", k ? ", " : "", t->top_ids[k]);
            srv_buf_puts(b, id);
            json_float(b, t->top_logprobs[k]);
            srv_buf_puts(b, "]");
        }
        srv_buf_puts(b, "]}");
    }
}

/* Takes message m into its output's result (rs[m->index], of n); the
 * text goes to stdout as it comes for a single output without --json.
 * false when out of memory or the index is not one asked for. */
static bool
gen_take(gen_result_t *rs, uint32_t n, const Kvserve__V1__GenerateResponse *m, bool json)
{
    uint32_t idx = m->has_index ? m->index : 0;
    if (idx >= n)
        return false;
    gen_result_t *r = &rs[idx];
    rs[0].messages++;
    json |= n > 1;
    if (!grow((void **)&r->tokens, &r->cap_tokens, r->n_tokens + m->n_token_ids, sizeof *r->tokens))
        return false;
    for (size_t i = 0; i < m->n_token_ids; i++)
        r->tokens[r->n_tokens++] = m->token_ids[i];
    size_t len = m->text ? strlen(m->text) : 0;
    if (!json && len) {
        fwrite(m->text, 1, len, stdout);
        fflush(stdout);
    }
    if (!grow((void **)&r->text, &r->cap_text, r->text_len + len + 1, 1))
        return false;
    memcpy(r->text + r->text_len, m->text ? m->text : "", len + 1);
    r->text_len += len;
    if (m->request_id && *m->request_id && rs[0].request_id == NULL &&
        (rs[0].request_id = strdup(m->request_id)) == NULL)
        return false;
    if (m->has_finish_reason)
        r->finish = m->finish_reason;
    if (m->stop_match) {
        free(r->stop_match);
        if ((r->stop_match = strdup(m->stop_match)) == NULL)
            return false;
    }
    if (m->usage)
        r->usage = *m->usage;
    json_logprobs(&r->logprobs, m->logprobs, m->n_logprobs);
    json_logprobs(&rs[0].plp, m->prompt_logprobs, m->n_prompt_logprobs);
    return !r->logprobs.oom && !rs[0].plp.oom;
}

static const char *const finish_names[] = {"", "stop", "length", "eos", "cancelled", "error"};

/* One output's fields of the JSON document. */
static void
gen_print_output(const gen_result_t *r, bool logprobs)
{
    const Kvserve__V1__Usage *u = &r->usage;
    const char *sm = r->stop_match ? r->stop_match : "";
    printf("\"tokens\": [");
    for (size_t i = 0; i < r->n_tokens; i++)
        printf("%s%u", i ? ", " : "", r->tokens[i]);
    printf("], \"text\": ");
    srv_json_str(stdout, r->text ? r->text : "", r->text_len);
    printf(", \"finish_reason\": \"%s\", \"stop_match\": ",
           (unsigned)r->finish < sizeof finish_names / sizeof finish_names[0]
               ? finish_names[r->finish]
               : "");
    srv_json_str(stdout, sm, strlen(sm));
    if (logprobs)
        printf(", \"logprobs\": [%s]", r->logprobs.p ? r->logprobs.p : "");
    printf(", \"usage\": {\"prompt_tokens\": %u, \"cached_prompt_tokens\": %u, "
           "\"computed_prompt_tokens\": %u, \"completion_tokens\": %u, \"preemptions\": %u, "
           "\"queue_time_us\": %llu, \"time_to_first_token_us\": %llu, "
           "\"decode_time_us\": %llu}",
           u->prompt_tokens, u->cached_prompt_tokens, u->computed_prompt_tokens,
           u->completion_tokens, u->preemptions, (unsigned long long)u->queue_time_us,
           (unsigned long long)u->time_to_first_token_us, (unsigned long long)u->decode_time_us);
}

/* One document: a single output's fields at the top, or n > 1 of them in
 * "outputs". */
static void
gen_print_json(const gen_result_t *rs, uint32_t n, bool logprobs, bool prompt_logprobs)
{
    const char *rid = rs[0].request_id ? rs[0].request_id : "";
    printf("{\"request_id\": ");
    srv_json_str(stdout, rid, strlen(rid));
    if (prompt_logprobs)
        printf(", \"prompt_logprobs\": [%s]", rs[0].plp.p ? rs[0].plp.p : "");
    printf(n > 1 ? ", \"outputs\": [" : ", ");
    for (uint32_t i = 0; i < n; i++) {
        printf(n > 1 ? "%s{" : "%s", i ? ", " : "");
        gen_print_output(&rs[i], logprobs);
        printf(n > 1 ? "}" : "");
    }
    printf("%s, \"messages\": %llu}\n", n > 1 ? "]" : "", (unsigned long long)rs[0].messages);
}

int
srv_cmd_generate(int argc, char **argv)
{
    const char *C = "generate";
    gen_opts_t o;
    int rc = gen_parse(argc, argv, &o);
    if (rc) {
        gen_opts_free(&o);
        return rc == 1 ? 0 : 2;
    }
    char *ca = NULL, *bearer = NULL;
    int status = 2;
    if (srv_client_creds(C, o.conn.tls_ca, o.api_key_file, &ca, &bearer))
        goto out_opts;

    Kvserve__V1__GenerateRequest req = KVSERVE__V1__GENERATE_REQUEST__INIT;
    Kvserve__V1__TokenIds ids = KVSERVE__V1__TOKEN_IDS__INIT, forced = ids;
    if (o.forced_ids) {
        forced.ids = (uint32_t *)o.forced_ids;
        forced.n_ids = o.n_forced_ids;
        req.forced_tokens = &forced;
    }
    if (o.prompt) {
        req.prompt_case = KVSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT;
        req.text = (char *)o.prompt;
    } else {
        ids.ids = (uint32_t *)o.prompt_ids;
        ids.n_ids = o.n_prompt_ids;
        req.prompt_case = KVSERVE__V1__GENERATE_REQUEST__PROMPT_TOKENS;
        req.tokens = &ids;
    }
    /* An absent field is not a zero: the server applies its own default. */
    if (o.sampling)
        req.sampling = &o.sp;
    req.request_id = (char *)o.request_id;
    req.cache_salt = (char *)o.cache_salt;
    req.has_priority = o.has_priority;
    req.priority = o.priority;
    req.has_truncate_prompt_tokens = o.has_truncate;
    req.truncate_prompt_tokens = o.truncate;

    client_t c;
    uint32_t n_out = o.sp.has_n ? o.sp.n : 1;
    gen_result_t *r = calloc(n_out, sizeof *r);
    status = 1;
    if (r == NULL) {
        fprintf(stderr, "kvserve generate: out of memory\n");
        goto out_opts;
    }
    client_open(&c, &o.conn, ca, SRV_M_GENERATE);
    grpc_byte_buffer *req_bb = srv_pb_to_bb(&req.base), *bb = NULL;
    grpc_metadata md = {.key = grpc_slice_from_static_string("authorization")};
    md.value = bearer ? grpc_slice_from_static_string(bearer) : grpc_empty_slice();
    grpc_op ops[4];
    if (!client_start(&c, C, ops, srv_call_send_ops(ops, &md, bearer ? 1 : 0, req_bb, &c.init_md),
                      T_START))
        goto out_call;
    srv_call_status_op(ops, &c.trail_md, &c.status, &c.details);
    if (!client_start(&c, C, ops, 1, T_STATUS))
        goto out_call;
    for (;;) {
        memset(ops, 0, sizeof ops[0]);
        ops[0].op = GRPC_OP_RECV_MESSAGE;
        ops[0].data.recv_message.recv_message = &bb;
        if (!client_start(&c, C, ops, 1, T_RECV))
            goto out_call;
        client_wait(&c, T_RECV);
        if (bb == NULL)
            break;
        Kvserve__V1__GenerateResponse *m = (Kvserve__V1__GenerateResponse *)srv_bb_to_pb(
            bb, &kvserve__v1__generate_response__descriptor, NULL, 0);
        grpc_byte_buffer_destroy(bb);
        bb = NULL;
        bool ok = m && gen_take(r, n_out, m, o.json);
        if (!ok) {
            fprintf(stderr, "kvserve generate: %s\n",
                    !m                                  ? "cannot parse a GenerateResponse"
                    : m->has_index && m->index >= n_out ? "a response for an output not asked for"
                                                        : "out of memory");
            grpc_call_cancel(c.call, NULL);
        }
        if (m)
            protobuf_c_message_free_unpacked(&m->base, NULL);
        if (!ok)
            goto out_call;
    }
    client_wait(&c, T_STATUS);
    /* Several outputs print whole, one after another, each on its line
     * after its index. */
    for (uint32_t i = 0; !o.json && n_out > 1 && i < n_out; i++)
        printf("[%u] %.*s\n", i, (int)r[i].text_len, r[i].text ? r[i].text : "");
    if (!o.json && n_out == 1 && (r[0].text_len || c.status == GRPC_STATUS_OK))
        putchar('\n');
    if ((status = report_status(C, &c)) == 0 && o.json)
        gen_print_json(r, n_out, o.sp.has_logprobs || o.forced_ids, o.sp.has_prompt_logprobs);
out_call:
    client_close(&c);
    grpc_byte_buffer_destroy(req_bb);
    for (uint32_t i = 0; i < n_out; i++) {
        free(r[i].tokens);
        free(r[i].text);
        free(r[i].request_id);
        free(r[i].stop_match);
        free(r[i].logprobs.p);
        free(r[i].plp.p);
    }
    free(r);
out_opts:
    free(ca);
    free(bearer);
    gen_opts_free(&o);
    return status;
}

/* ---- health ----------------------------------------------------------------- */

int
srv_cmd_health(int argc, char **argv)
{
    static const struct option lo[] = {
        SRV_CONN_LONGOPTS,
        {"service", 1, 0, 'v'},
        {"help", 0, 0, 'h'},
        {0, 0, 0, 0},
    };
    static const char *const names[] = {"UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"};
    const char *C = "health";
    srv_conn_opts_t o = {.timeout_ms = 5000};
    Grpc__Health__V1__HealthCheckRequest req = GRPC__HEALTH__V1__HEALTH_CHECK_REQUEST__INIT;
    opterr = 0;
    optind = 1;
    int opt;
    while ((opt = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        int rc = srv_conn_opt(C, opt, &o);
        if (rc == 1 && opt == 'v') {
            req.service = optarg;
            continue;
        }
        if (rc == 1 && opt == 'h') {
            fputs(health_usage, stdout);
            return 0;
        }
        if (rc == 1)
            fprintf(stderr, "kvserve health: unknown or incomplete option '%s'\n",
                    argv[optind - 1]);
        if (rc) {
            fputs(health_usage, stderr);
            return 2;
        }
    }
    if (srv_conn_check(C, &o, argc, argv, health_usage))
        return 2;
    char *ca, *bearer; /* no --api-key-file here: bearer stays NULL */
    if (srv_client_creds(C, o.tls_ca, NULL, &ca, &bearer))
        return 2;

    grpc_init();
    grpc_channel *ch = srv_client_channel(o.addr, ca, o.tls_name);
    Grpc__Health__V1__HealthCheckResponse *m =
        (Grpc__Health__V1__HealthCheckResponse *)srv_client_unary(
            ch, SRV_M_HEALTH_CHECK, NULL, 0, o.timeout_ms, &req.base,
            &grpc__health__v1__health_check_response__descriptor, "kvserve health");
    int status = 1;
    if (m) {
        unsigned s = (unsigned)m->status;
        puts(s < 4 ? names[s] : "UNKNOWN");
        status = s == GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING ? 0 : 1;
        protobuf_c_message_free_unpacked(&m->base, NULL);
    }
    grpc_channel_destroy(ch);
    grpc_shutdown_blocking();
    free(ca);
    return status;
}
