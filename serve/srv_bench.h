/*
 * serve/srv_bench.h — the state `kvserve bench` shares between its driver
 * (srv_bench.c: options, workload, calls) and its report (srv_bench_report.c:
 * percentiles, the table, JSON and the SVG plot).  Private to serve/.
 */
#ifndef SRV_BENCH_H
#define SRV_BENCH_H

#include "srv_int.h"

#include <stdio.h>

/* What a request was drawn to go through: the fault-injection flags give
 * some requests a client cancellation or a short deadline, and their
 * CANCELLED / DEADLINE_EXCEEDED endings are intended, not errors. */
typedef enum bench_intent { INTENT_NONE, INTENT_CANCEL, INTENT_DEADLINE } bench_intent_t;

typedef struct bench_opts {
    srv_conn_opts_t conn;
    const char *api_key_file, *json, *plot;
    uint32_t n_req, conc, in_len, out_len;
    float in_range, out_range, prefix, rate, burst;
    uint64_t seed;
    bool open_loop, progress;
    /* --multi-turn T: conversations of T requests, each turn's prompt is
     * the previous prompt, its answer and --question-len new tokens. */
    uint32_t turns, question_len;
    uint32_t n_outputs;       /* --n: outputs per request (sampling.n) */
    float temperature, top_p; /* --temperature (0: greedy), --top-p (1: off) */
    float duration_s;         /* --duration: no new request after this; 0: none */
    float cancel_frac, deadline_frac;
    uint32_t cancel_ms, deadline_ms;
    /* Per-request long-context policy; has_* says which groups were given. */
    Kvserve__V1__AttentionPolicy attn;
    Kvserve__V1__PrefillPolicy prefill;
    Kvserve__V1__KvPolicy kv;
    bool has_attn, has_prefill, has_kv;
    model_attn_kind_t attn_kind; /* the same kinds, for the report's names */
    sched_kv_kind_t kv_kind;
    srv_guided_opts_t guided; /* structured output on every request */
    const char *dataset;      /* --dataset FILE: prompts from it (srv_bench_data.c) */
    bool has_out_len;         /* --output-len given: it overrides the dataset's lengths */
} bench_opts_t;

enum { K_START, K_STATUS, K_RECV };

struct bench_req;
typedef struct bench_tag {
    int kind;
    struct bench_req *r;
} bench_tag_t;

/* One Generate call and what it measured; times are seconds since the run
 * began. */
typedef struct bench_req {
    bench_tag_t t_start, t_status, t_recv;
    uint32_t *prompt;  /* built at launch, kept for the next turn */
    uint32_t *out_ids; /* multi-turn: the answer, for the next turn */
    uint32_t n_out, cap_out;
    uint32_t n_prompt; /* turn 0: drawn at workload time */
    uint32_t out_len;
    bench_intent_t intent;
    double fault_ms; /* cancel after / deadline in, ms after launch */
    grpc_call *call;
    grpc_byte_buffer *req_bb, *recv_bb;
    grpc_metadata_array init_md, trail_md;
    grpc_status_code status;
    grpc_slice details;
    int pending; /* batches started and not yet back */
    bool started, parse_error;
    double t0, t_first, t_last, t_end;
    uint32_t tokens, usage_prompt, usage_cached;
    uint32_t usage_spec_draft, usage_spec_accepted; /* summed over the outputs */
    bool has_usage;
    double *itl; /* ms, one per token after the first message's (each output's) */
    size_t n_itl, cap_itl;
    uint32_t n_outs; /* outputs asked for (--n) */
    double *t_out;   /* --n > 1: each output's last token-bearing message (0: none yet) */
    char *message;   /* the status details; NULL when there are none */
} bench_req_t;

/* Per-second counts for throughput over time. */
typedef struct bench_bin {
    uint64_t tokens;
    uint32_t completed;
} bench_bin_t;

typedef struct bench_cancel {
    double t;
    uint32_t k;
} bench_cancel_t;

/* A --dataset entry as the server tokenized it. */
typedef struct bench_entry {
    uint32_t *ids;
    uint32_t n_ids, out_len;
} bench_entry_t;

typedef struct bench {
    bench_opts_t o;
    grpc_channel *ch;
    grpc_completion_queue *cq;
    void *rm_gen;
    grpc_metadata auth;
    size_t n_auth;
    uint32_t vocab;
    bench_req_t *reqs;
    uint32_t n_conv;
    double *arrival; /* start time of each conversation (open loop) */
    uint32_t *ready; /* follow-up turns whose previous turn has ended (FIFO) */
    uint32_t ready_head, ready_len;
    bench_cancel_t *heap; /* pending client cancellations, earliest first */
    uint32_t n_heap;
    bench_bin_t *bins;
    size_t n_bins;
    uint64_t epoch_ns; /* kvs_now_ns() when the first request starts */
    uint32_t next_conv, in_flight, n_done, n_err, max_in_flight;
    uint64_t tok_total, cap_hits;
    uint32_t cap_held; /* 1 + the conversation last counted in cap_hits */
    bool stopped;      /* --duration reached: nothing new starts */
    double last_progress;
    /* --dataset: the entries taken (request k runs data[k % n_data]), the
     * file's count, those looked at (in shuffled order, until n_req were
     * taken) and why the others among them were not. */
    bench_entry_t *data;
    uint32_t n_data, data_total, data_examined, data_too_long, data_empty, data_unanswered;
} bench_t;

/* The intended ending of r's intent, or OK. */
static inline bool
bench_intended(const bench_req_t *r)
{
    return (r->intent == INTENT_CANCEL && r->status == GRPC_STATUS_CANCELLED) ||
           (r->intent == INTENT_DEADLINE && r->status == GRPC_STATUS_DEADLINE_EXCEEDED);
}

/* One unary call of the run's channel and credentials (--timeout-ms, else
 * 10 s): the answer, or NULL after saying why (srv_client_unary). */
static inline ProtobufCMessage *
bench_unary(const bench_t *b, const char *method, const ProtobufCMessage *req,
            const ProtobufCMessageDescriptor *resp, const char *who)
{
    return srv_client_unary(b->ch, method, &b->auth, b->n_auth,
                            b->o.conn.timeout_ms ? b->o.conn.timeout_ms : 10000, req, resp, who);
}

/* srv_bench_data.c: reads o.dataset, checks every entry and has the
 * server tokenize them in an order shuffled by o.seed until o.n_req fit
 * its max_model_len.  0, or KVS_EINVAL / KVS_EIO / KVS_ENOMEM after saying
 * why (a message naming the line and field of a bad entry). */
int bench_dataset(bench_t *b);
void bench_dataset_free(bench_t *b);

/* srv_bench_report.c: prints the table, writes --json and --plot; returns
 * 0, or KVS_ENOMEM / KVS_EIO after saying why.  *unintended gets the
 * started requests that ended neither OK nor as their intent said. */
int bench_report(const bench_t *b, uint32_t *unintended);

#endif /* SRV_BENCH_H */
