/*
 * bench/bench_grpc.c — what the gRPC layer costs.  Against a running
 * `kvserve serve` (bench/run_grpc.sh starts one), N concurrent greedy
 * Generate streams run to max_tokens; the client counts the messages and
 * tokens it receives, and the server's Control/GetLoad counters, read before
 * and after, give the server-added latency per token (from the engine
 * queueing a token to gRPC accepting its message for the wire) and the
 * engine's step time over the same window.  The ratio of the two is the
 * figure of merit (target < 3%).
 *
 *   bench_grpc --addr HOST:PORT [--streams 1,64] [--max-tokens N]
 *              [--prompt-len N] [--json FILE]
 */
#include "serve/srv_int.h"

#include <getopt.h>
#include <grpc/grpc_security.h>
#include <grpc/support/time.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_COUNTS 8

typedef struct stream {
    grpc_call *call;
    grpc_byte_buffer *req, *recv;
    grpc_metadata_array md_init, md_trail;
    grpc_status_code status;
    grpc_slice details;
    int done_tags; /* start, status, and the last recv */
    bool recv_done;
} stream_t;

enum { TAG_START, TAG_RECV, TAG_STATUS };

static void *
tag_of(uint32_t i, int kind)
{
    return (void *)(((uintptr_t)i << 2) | (uintptr_t)kind);
}

static bool
start_recv(stream_t *s, uint32_t i)
{
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_MESSAGE;
    op.data.recv_message.recv_message = &s->recv;
    return grpc_call_start_batch(s->call, &op, 1, tag_of(i, TAG_RECV), NULL) == GRPC_CALL_OK;
}

static int
get_load(grpc_channel *ch, Kvserve__V1__Load **out)
{
    Kvserve__V1__GetLoadRequest q = KVSERVE__V1__GET_LOAD_REQUEST__INIT;
    *out = (Kvserve__V1__Load *)srv_client_unary(ch, SRV_M_LOAD, NULL, 0, 10000, &q.base,
                                                 &kvserve__v1__load__descriptor,
                                                 "bench_grpc: GetLoad");
    return *out ? 0 : -1;
}

typedef struct result {
    uint32_t streams;
    double secs, msgs_s, toks_s, toks_per_msg, lat_us, step_us, ratio;
    uint64_t msgs, toks;
    int failed;
} result_t;

static int
run(grpc_channel *ch, uint32_t n, uint32_t max_tokens, uint32_t prompt_len, result_t *res)
{
    grpc_completion_queue *cq = grpc_completion_queue_create_for_next(NULL);
    Kvserve__V1__Load *l0 = NULL, *l1 = NULL;
    if (get_load(ch, &l0)) {
        fprintf(stderr, "bench_grpc: GetLoad failed (is the server up?)\n");
        return -1;
    }
    stream_t *s = calloc(n, sizeof *s);
    uint32_t *ids = malloc(prompt_len * sizeof *ids);
    uint64_t msgs = 0, toks = 0;
    int failed = 0;
    uint64_t t0 = kvs_now_ns();
    for (uint32_t i = 0; i < n; i++) {
        for (uint32_t k = 0; k < prompt_len; k++)
            ids[k] = (i * 131 + k * 7) % 256;
        Kvserve__V1__TokenIds t = KVSERVE__V1__TOKEN_IDS__INIT;
        t.n_ids = prompt_len;
        t.ids = ids;
        Kvserve__V1__SamplingParams sp = KVSERVE__V1__SAMPLING_PARAMS__INIT;
        sp.has_temperature = sp.has_max_tokens = sp.has_ignore_eos = true;
        sp.temperature = 0.0f;
        sp.max_tokens = max_tokens;
        sp.ignore_eos = true;
        Kvserve__V1__GenerateRequest q = KVSERVE__V1__GENERATE_REQUEST__INIT;
        q.prompt_case = KVSERVE__V1__GENERATE_REQUEST__PROMPT_TOKENS;
        q.tokens = &t;
        q.sampling = &sp;
        s[i].req = srv_pb_to_bb(&q.base);
        s[i].details = grpc_empty_slice();
        grpc_metadata_array_init(&s[i].md_init);
        grpc_metadata_array_init(&s[i].md_trail);
        s[i].call = grpc_channel_create_call(ch, NULL, GRPC_PROPAGATE_DEFAULTS, cq,
                                             grpc_slice_from_static_string(SRV_M_GENERATE), NULL,
                                             gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        grpc_op ops[4];
        memset(ops, 0, sizeof ops);
        ops[0].op = GRPC_OP_SEND_INITIAL_METADATA;
        ops[1].op = GRPC_OP_SEND_MESSAGE;
        ops[1].data.send_message.send_message = s[i].req;
        ops[2].op = GRPC_OP_SEND_CLOSE_FROM_CLIENT;
        ops[3].op = GRPC_OP_RECV_INITIAL_METADATA;
        ops[3].data.recv_initial_metadata.recv_initial_metadata = &s[i].md_init;
        grpc_op sop;
        memset(&sop, 0, sizeof sop);
        sop.op = GRPC_OP_RECV_STATUS_ON_CLIENT;
        sop.data.recv_status_on_client.trailing_metadata = &s[i].md_trail;
        sop.data.recv_status_on_client.status = &s[i].status;
        sop.data.recv_status_on_client.status_details = &s[i].details;
        if (grpc_call_start_batch(s[i].call, ops, 4, tag_of(i, TAG_START), NULL) ||
            grpc_call_start_batch(s[i].call, &sop, 1, tag_of(i, TAG_STATUS), NULL) ||
            !start_recv(&s[i], i)) {
            fprintf(stderr, "bench_grpc: cannot start stream %u\n", i);
            abort();
        }
    }
    uint32_t open = n;
    while (open > 0) {
        grpc_event ev = grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type != GRPC_OP_COMPLETE)
            continue;
        uint32_t i = (uint32_t)((uintptr_t)ev.tag >> 2);
        int kind = (int)((uintptr_t)ev.tag & 3);
        stream_t *st = &s[i];
        if (kind == TAG_RECV) {
            if (st->recv) {
                Kvserve__V1__GenerateResponse *r = (Kvserve__V1__GenerateResponse *)srv_bb_to_pb(
                    st->recv, &kvserve__v1__generate_response__descriptor, NULL, 0);
                grpc_byte_buffer_destroy(st->recv);
                st->recv = NULL;
                msgs++;
                if (r) {
                    toks += r->n_token_ids;
                    kvserve__v1__generate_response__free_unpacked(r, NULL);
                }
                if (start_recv(st, i))
                    continue;
            }
            st->recv_done = true;
        }
        if (++st->done_tags == 3) {
            if (st->status != GRPC_STATUS_OK)
                failed++;
            open--;
        }
    }
    double secs = (double)(kvs_now_ns() - t0) / 1e9;
    if (get_load(ch, &l1))
        return -1;
    for (uint32_t i = 0; i < n; i++) {
        grpc_byte_buffer_destroy(s[i].req);
        grpc_metadata_array_destroy(&s[i].md_init);
        grpc_metadata_array_destroy(&s[i].md_trail);
        grpc_slice_unref(s[i].details);
        grpc_call_unref(s[i].call);
    }
    free(s);
    free(ids);
    uint64_t dt = l1->tokens_sent - l0->tokens_sent,
             dl = l1->token_latency_us_sum - l0->token_latency_us_sum;
    uint64_t ds = l1->engine_steps - l0->engine_steps, db = l1->engine_busy_us - l0->engine_busy_us;
    *res = (result_t){.streams = n,
                      .secs = secs,
                      .msgs = msgs,
                      .toks = toks,
                      .msgs_s = msgs / secs,
                      .toks_s = toks / secs,
                      .toks_per_msg = msgs ? (double)toks / msgs : 0,
                      .lat_us = dt ? (double)dl / dt : 0,
                      .step_us = ds ? (double)db / ds : 0,
                      .failed = failed};
    res->ratio = res->step_us > 0 ? res->lat_us / res->step_us : 0;
    kvserve__v1__load__free_unpacked(l0, NULL);
    kvserve__v1__load__free_unpacked(l1, NULL);
    grpc_completion_queue_shutdown(cq);
    while (grpc_completion_queue_next(cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL).type !=
           GRPC_QUEUE_SHUTDOWN)
        ;
    grpc_completion_queue_destroy(cq);
    return 0;
}

int
main(int argc, char **argv)
{
    const char *addr = NULL, *json = NULL;
    uint32_t counts[MAX_COUNTS] = {1, 64}, n_counts = 2, max_tokens = 256, prompt_len = 32;
    static const struct option lo[] = {
        {"addr", 1, 0, 'a'},       {"streams", 1, 0, 's'}, {"max-tokens", 1, 0, 'm'},
        {"prompt-len", 1, 0, 'p'}, {"json", 1, 0, 'j'},    {0, 0, 0, 0},
    };
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'a':
            addr = optarg;
            break;
        case 's':
            n_counts = 0;
            for (char *t = strtok(optarg, ","); t && n_counts < MAX_COUNTS; t = strtok(NULL, ","))
                counts[n_counts++] = (uint32_t)atoi(t);
            break;
        case 'm':
            max_tokens = (uint32_t)atoi(optarg);
            break;
        case 'p':
            prompt_len = (uint32_t)atoi(optarg);
            break;
        case 'j':
            json = optarg;
            break;
        default:
            fprintf(stderr, "usage: bench_grpc --addr HOST:PORT [--streams 1,64] "
                            "[--max-tokens N] [--prompt-len N] [--json FILE]\n");
            return 2;
        }
    }
    if (addr == NULL || max_tokens == 0 || prompt_len == 0) {
        fprintf(stderr, "bench_grpc: --addr is required\n");
        return 2;
    }
    grpc_init();
    grpc_channel_credentials *cc = grpc_insecure_credentials_create();
    grpc_channel *ch = grpc_channel_create(addr, cc, NULL);
    grpc_channel_credentials_release(cc);
    result_t res[MAX_COUNTS];
    printf("%-8s %10s %10s %8s %14s %12s %10s\n", "streams", "msgs/s", "tokens/s", "tok/msg",
           "added us/tok", "step us", "ratio");
    int rc = 0;
    for (uint32_t i = 0; i < n_counts && rc == 0; i++) {
        rc = run(ch, counts[i], max_tokens, prompt_len, &res[i]);
        if (rc == 0) {
            result_t *r = &res[i];
            printf("%-8u %10.0f %10.0f %8.2f %14.1f %12.1f %9.2f%%%s\n", r->streams, r->msgs_s,
                   r->toks_s, r->toks_per_msg, r->lat_us, r->step_us, 100 * r->ratio,
                   r->failed ? "  (some streams failed)" : "");
            if (r->failed)
                rc = 1;
        }
    }
    if (rc == 0 && json) {
        FILE *f = fopen(json, "w");
        if (f) {
            fprintf(f, "{\"bench\": \"grpc\", \"max_tokens\": %u, \"prompt_len\": %u, \"runs\": [",
                    max_tokens, prompt_len);
            for (uint32_t i = 0; i < n_counts; i++)
                fprintf(f,
                        "%s{\"streams\": %u, \"seconds\": %.3f, \"messages\": %llu, \"tokens\": "
                        "%llu, \"messages_per_s\": %.1f, \"tokens_per_s\": %.1f, "
                        "\"added_latency_us_per_token\": %.2f, \"engine_step_us\": %.2f, "
                        "\"ratio\": %.5f}",
                        i ? ", " : "", res[i].streams, res[i].secs, (unsigned long long)res[i].msgs,
                        (unsigned long long)res[i].toks, res[i].msgs_s, res[i].toks_s,
                        res[i].lat_us, res[i].step_us, res[i].ratio);
            fprintf(f, "]}\n");
            fclose(f);
            printf("json: %s\n", json);
        }
    }
    grpc_channel_destroy(ch);
    grpc_shutdown_blocking();
    return rc;
}
