/*
 * serve/srv_grpc.c — `kvserve serve`: the gRPC server.  main.c calls
 * srv_cmd_serve.
 *
 * Three threads (DESIGN.md, "Threads"):
 *   cq thread      sits in grpc_completion_queue_next and forwards every
 *                  (tag, ok) to the loop through a mutex queue + uv_async;
 *   loop thread    (libuv) owns every call: submits to and cancels in the
 *                  engine, writes responses;
 *   engine thread  sched_thread_*: steps the scheduler; its wake callback
 *                  is a second uv_async that drains the token events;
 * and libuv's thread pool, where a Generate is validated and tokenized and
 * its guide compiled (a Tokenize tokenized), one call per job, so a long
 * prompt does not stall every stream's tokens.
 *
 * Every call follows ../shared/docs/grpc-c-core.md: RECV_CLOSE_ON_SERVER in
 * a batch of its own, at most one SEND_MESSAGE in flight (tokens produced
 * meanwhile are coalesced into the next message, so a slow client costs
 * at most one message of buffering per stream beyond what the engine
 * produced), and a call is freed only once its close, send and status
 * batches are all back, its pool job has returned and the engine has
 * finished its request.
 */
#include "srv_metrics.h"
#include "srv_req.h"

#include <getopt.h>
#include <grpc/grpc_security.h>
#include <grpc/support/alloc.h>
#include <grpc/support/time.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#define SLOTS_GENERATE 16 /* request slots kept posted per method */
#define SLOTS_OTHER 4
#define MAX_LIVE_DEFAULT 1024

typedef enum method {
    M_GENERATE,
    M_TOKENIZE,
    M_MODEL_INFO,
    M_SERVER_INFO,
    M_LOAD,
    M_ABORT,
    M_HEALTH_CHECK,
    M_HEALTH_WATCH,
    M_COUNT,
    M_UNKNOWN = M_COUNT, /* unregistered: answered UNIMPLEMENTED */
} method_t;

static const char *const method_path[M_COUNT] = {
    SRV_M_GENERATE, SRV_M_TOKENIZE, SRV_M_MODEL_INFO,   SRV_M_SERVER_INFO,
    SRV_M_LOAD,     SRV_M_ABORT,    SRV_M_HEALTH_CHECK, SRV_M_HEALTH_WATCH,
};

typedef enum tag_kind { T_NEW, T_SEND, T_STATUS, T_CLOSE, T_SHUTDOWN } tag_kind_t;

typedef struct tag {
    tag_kind_t kind;
    struct call *owner;
} tag_t;

/* One sample's output (sampling.n of them): what the engine produced
 * and what went out. */
typedef struct gen_out {
    bool finished, final_sent, stopped;
    sched_finish_t fin;
    int fin_err;
    sched_usage_t usage;
    int32_t *toks;         /* produced, not yet sent */
    uint64_t *tok_t;       /* when the engine queued each */
    sched_logprobs_t *lps; /* theirs, where sampling.logprobs asked */
    size_t n_toks, cap_toks;
    srv_buf_t text; /* decoded, not yet sent (held back for stop strings / UTF-8) */
    uint32_t n_delivered;
    char stop_match[260];
} gen_out_t;

typedef struct call {
    method_t method;
    tag_t t_new, t_send, t_status, t_close;
    grpc_call *call;
    gpr_timespec deadline;
    grpc_metadata_array md;
    grpc_call_details details; /* M_UNKNOWN only */
    grpc_byte_buffer *req_bb, *send_bb;
    int cancelled;
    bool close_started, close_done, send_pending, status_pending, status_started, md_sent;
    struct call *prev, *next; /* the live Generate or Watch list */

    /* Work off the loop, on libuv's thread pool: parsing a Generate
     * (tokenizing a long prompt, compiling a guide) or a Tokenize, so the
     * loop keeps streaming meanwhile.  While busy, only the pool touches
     * req, tok_req, lim, g, tok_* and parse_*. */
    uv_work_t work;
    bool busy, abort_asked; /* abort_asked: an Abort came while busy */
    srv_limits_t lim;
    grpc_status_code parse_rc;
    char parse_msg[256];
    Kvserve__V1__TokenizeRequest *tok_req;
    int32_t *tok_ids;
    size_t tok_n;

    /* Generate */
    Kvserve__V1__GenerateRequest *req;
    srv_gen_req_t g;
    uint64_t id; /* engine id: slot | generation << 32 */
    char rid[129];
    uint64_t n_request; /* its number among the server's requests */
    bool engine_live;   /* some sample has not finished in the engine */
    gen_out_t *out;
    uint32_t n_out, n_running, next_out; /* next_out: where the next send looks first */
    sched_logprobs_t *plp;               /* prompt_logprobs arrived, not yet sent */
    uint32_t n_plp, cap_plp, plp_seen;   /* plp_seen: entries arrived in all */
    uint64_t msg_t_sum;                  /* the message in flight: its tokens' queue times */
    uint32_t msg_n;
    uint64_t t_arrive;

    /* Watch */
    int watch_sent;     /* status last sent, -1 none */
    bool watch_unknown; /* watching a service the server does not have */
} call_t;

typedef struct qev {
    tag_t *tag;
    int ok;
} qev_t;

typedef struct srv_opts {
    const char *model, *draft, *host, *device, *tls_cert, *tls_key, *tls_ca, *api_key_file;
    const char *chat_template; /* --chat-template: a family's name or a file */
    const char *metrics_host;  /* NULL: --host */
    uint32_t metrics_port;     /* 0 with metrics_on: any free port */
    bool metrics_on;
    uint32_t port, threads, max_model_len, block_size, num_blocks, max_num_seqs, max_batched;
    uint32_t max_queued, drain_timeout_s, max_streams, engine_nice, sample_threads;
    uint64_t kv_memory;
    srv_kv_opts_t kv;
    srv_specdec_opts_t specdec;
    bool prefix_caching, cuda_graphs;
    model_attn_policy_t attn;
    model_spec_policy_t spec;
} srv_opts_t;

typedef struct server {
    srv_opts_t o;
    kern_backend_t *be;
    model_t *m, *draft;
    sched_t *sched;
    srv_limits_t lim;
    char *api_key;
    size_t api_key_len;
    srv_chat_t chat;
    bool have_chat;
    char *chat_override; /* --chat-template's text, in place of the model's */
    srv_metrics_t *metrics;
    char chat_err[256];

    grpc_server *server;
    grpc_completion_queue *cq;
    void *methods[M_COUNT];
    tag_t t_shutdown;

    uv_loop_t *loop;
    uv_thread_t cq_thread;
    uv_mutex_t mu;
    qev_t *q;
    size_t q_len, q_cap;
    uv_async_t cq_async, eng_async;
    uv_signal_t sig_term, sig_int;
    uv_timer_t drain_timer;

    call_t **slots; /* engine id -> live Generate */
    uint32_t *slot_gen;
    uint32_t n_slots, n_live, n_busy;
    uint32_t n_calls; /* call_t objects, posted slots included */
    call_t *gens, *watches;
    uint64_t n_requests, seq;
    uint64_t msgs_sent, toks_sent, tok_lat_ns; /* GetLoad counters */
    bool draining, shutting_down, shutdown_done, cq_down, cq_joined, engine_stopped;
    bool device_failed; /* the engine's device failed for good: NOT_SERVING */
    int exit_code;
} server_t;

static server_t S;

/* ------------------------------------------------------------------------ */
/* cq thread -> loop                                                         */
/* ------------------------------------------------------------------------ */

static void
q_push(tag_t *t, int ok)
{
    uv_mutex_lock(&S.mu);
    if (S.q_len == S.q_cap) {
        size_t cap = S.q_cap ? 2 * S.q_cap : 256;
        qev_t *q = realloc(S.q, cap * sizeof *q);
        if (q == NULL) {
            /* Losing a completion would leak a call forever: nothing sane remains. */
            uv_mutex_unlock(&S.mu);
            KVS_ERRORF("serve: out of memory in the completion queue");
            abort();
        }
        S.q = q;
        S.q_cap = cap;
    }
    S.q[S.q_len++] = (qev_t){t, ok};
    uv_mutex_unlock(&S.mu);
    uv_async_send(&S.cq_async);
}

static void
cq_main(void *arg)
{
    (void)arg;
    for (;;) {
        grpc_event ev = grpc_completion_queue_next(S.cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
        if (ev.type == GRPC_QUEUE_SHUTDOWN) {
            q_push(NULL, 0);
            return;
        }
        if (ev.type == GRPC_OP_COMPLETE)
            q_push((tag_t *)ev.tag, ev.success);
    }
}

/* ------------------------------------------------------------------------ */
/* Calls: posting slots, batches, freeing                                    */
/* ------------------------------------------------------------------------ */

static void dispatch(tag_t *t, int ok);
static const char *chat_name(void);
static void maybe_finish_shutdown(void);

/* The cq goes down only once the server's shutdown tag is in and every
 * call is freed (the guide, rule 10): a batch a live call starts on a shut
 * down cq aborts the process inside gRPC. */
static void
maybe_shutdown_cq(void)
{
    if (S.shutdown_done && S.n_calls == 0 && !S.cq_down) {
        S.cq_down = true;
        grpc_completion_queue_shutdown(S.cq);
    }
}

static void
post_slot(method_t mth)
{
    call_t *c = calloc(1, sizeof *c);
    if (c == NULL) {
        KVS_ERRORF("serve: out of memory posting a request slot");
        return;
    }
    c->method = mth;
    c->t_new = (tag_t){T_NEW, c};
    c->t_send = (tag_t){T_SEND, c};
    c->t_status = (tag_t){T_STATUS, c};
    c->t_close = (tag_t){T_CLOSE, c};
    c->watch_sent = -1;
    grpc_metadata_array_init(&c->md);
    grpc_call_error e;
    if (mth == M_UNKNOWN) {
        grpc_call_details_init(&c->details);
        e = grpc_server_request_call(S.server, &c->call, &c->details, &c->md, S.cq, S.cq,
                                     &c->t_new);
    } else {
        e = grpc_server_request_registered_call(S.server, S.methods[mth], &c->call, &c->deadline,
                                                &c->md, &c->req_bb, S.cq, S.cq, &c->t_new);
    }
    if (e != GRPC_CALL_OK) {
        KVS_ERRORF("serve: cannot post a request slot: %s", grpc_call_error_to_string(e));
        grpc_metadata_array_destroy(&c->md);
        if (mth == M_UNKNOWN)
            grpc_call_details_destroy(&c->details);
        free(c);
        return;
    }
    S.n_calls++;
}

static void
list_add(call_t **head, call_t *c)
{
    c->prev = NULL;
    c->next = *head;
    if (*head)
        (*head)->prev = c;
    *head = c;
}

static void
list_del(call_t **head, call_t *c)
{
    if (c->prev)
        c->prev->next = c->next;
    else if (*head == c)
        *head = c->next;
    if (c->next)
        c->next->prev = c->prev;
    c->prev = c->next = NULL;
}

static void
call_free(call_t *c)
{
    if (c->method == M_GENERATE) {
        list_del(&S.gens, c);
        if (c->id) {
            S.slots[c->id & 0xffffffffu] = NULL;
            S.n_live--;
        }
    } else if (c->method == M_HEALTH_WATCH) {
        list_del(&S.watches, c);
    }
    if (c->req)
        kvserve__v1__generate_request__free_unpacked(c->req, NULL);
    if (c->tok_req)
        kvserve__v1__tokenize_request__free_unpacked(c->tok_req, NULL);
    free(c->tok_ids);
    srv_gen_req_free(&c->g);
    for (uint32_t i = 0; i < c->n_out; i++) {
        free(c->out[i].toks);
        free(c->out[i].tok_t);
        free(c->out[i].lps);
        free(c->out[i].text.p);
    }
    free(c->out);
    free(c->plp);
    grpc_byte_buffer_destroy(c->req_bb);
    grpc_byte_buffer_destroy(c->send_bb);
    grpc_metadata_array_destroy(&c->md);
    if (c->method == M_UNKNOWN)
        grpc_call_details_destroy(&c->details);
    if (c->call)
        grpc_call_unref(c->call);
    free(c);
    S.n_calls--;
    maybe_finish_shutdown();
    maybe_shutdown_cq();
}

static void
maybe_free(call_t *c)
{
    if (!c->close_done || c->send_pending || c->status_pending || c->engine_live || c->busy)
        return;
    call_free(c);
}

/* A rejected batch can leave the call unusable (the guide, rule 4): cancel
 * it; the close batch still completes and frees it. */
static bool
start(call_t *c, const grpc_op *ops, size_t n, tag_t *t)
{
    grpc_call_error e = grpc_call_start_batch(c->call, ops, n, t, NULL);
    if (e == GRPC_CALL_OK)
        return true;
    KVS_ERRORF("serve: %s: batch refused: %s", c->method < M_COUNT ? method_path[c->method] : "?",
               grpc_call_error_to_string(e));
    grpc_call_cancel(c->call, NULL);
    return false;
}

static void
start_close(call_t *c)
{
    grpc_op op;
    memset(&op, 0, sizeof op);
    op.op = GRPC_OP_RECV_CLOSE_ON_SERVER;
    op.data.recv_close_on_server.cancelled = &c->cancelled;
    c->close_started = true;
    if (!start(c, &op, 1, &c->t_close))
        c->close_done = true; /* no tag will come */
}

/* Ends the call with a status (after any messages already sent). */
static void
send_status(call_t *c, grpc_status_code code, const char *msg)
{
    /* After the close the call is over (cancelled): nobody to tell. */
    if (c->status_started || c->close_done)
        return;
    grpc_op ops[2];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (!c->md_sent) {
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        c->md_sent = true;
    }
    grpc_slice details = grpc_slice_from_copied_string(msg ? msg : "");
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n++].data.send_status_from_server.status_details = &details;
    c->status_started = true;
    c->status_pending = start(c, ops, n, &c->t_status);
    grpc_slice_unref(details); /* copied by start_batch */
}

/* Sends one message; false when the call is dead. */
static bool
send_msg(call_t *c, const ProtobufCMessage *msg)
{
    if (c->close_done)
        return false;
    grpc_op ops[2];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    if (!c->md_sent) {
        ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
        c->md_sent = true;
    }
    c->send_bb = srv_pb_to_bb(msg);
    ops[n].op = GRPC_OP_SEND_MESSAGE;
    ops[n++].data.send_message.send_message = c->send_bb;
    c->send_pending = start(c, ops, n, &c->t_send);
    if (!c->send_pending) {
        grpc_byte_buffer_destroy(c->send_bb);
        c->send_bb = NULL;
    }
    return c->send_pending;
}

/* A unary answer: one batch with the message (when OK) and the status. */
static void
reply_unary(call_t *c, const ProtobufCMessage *msg, grpc_status_code code, const char *details)
{
    grpc_op ops[3];
    size_t n = 0;
    memset(ops, 0, sizeof ops);
    ops[n++].op = GRPC_OP_SEND_INITIAL_METADATA;
    c->md_sent = true;
    if (msg && code == GRPC_STATUS_OK) {
        c->send_bb = srv_pb_to_bb(msg);
        ops[n].op = GRPC_OP_SEND_MESSAGE;
        ops[n++].data.send_message.send_message = c->send_bb;
    }
    grpc_slice d = grpc_slice_from_copied_string(details ? details : "");
    ops[n].op = GRPC_OP_SEND_STATUS_FROM_SERVER;
    ops[n].data.send_status_from_server.status = code;
    ops[n++].data.send_status_from_server.status_details = &d;
    c->status_started = true;
    c->status_pending = start(c, ops, n, &c->t_status);
    grpc_slice_unref(d);
}

/* ------------------------------------------------------------------------ */
/* Authentication                                                            */
/* ------------------------------------------------------------------------ */

/* Compares in time that depends only on the lengths, so a caller cannot
 * find the key byte by byte from response times. */
static bool
key_equal(const uint8_t *a, size_t na, const uint8_t *b, size_t nb)
{
    uint8_t diff = (uint8_t)(na != nb);
    for (size_t i = 0; i < nb; i++)
        diff |= (uint8_t)((i < na ? a[i] : 0) ^ b[i]);
    return diff == 0;
}

static bool
authorized(const call_t *c)
{
    if (S.api_key == NULL || c->method == M_HEALTH_CHECK || c->method == M_HEALTH_WATCH)
        return true;
    static const char bearer[] = "Bearer ";
    for (size_t i = 0; i < c->md.count; i++) {
        const grpc_metadata *e = &c->md.metadata[i];
        if (grpc_slice_str_cmp(e->key, "authorization") != 0)
            continue;
        size_t n = GRPC_SLICE_LENGTH(e->value);
        const uint8_t *v = GRPC_SLICE_START_PTR(e->value);
        if (n < sizeof bearer - 1 || memcmp(v, bearer, sizeof bearer - 1) != 0)
            return false;
        return key_equal(v + sizeof bearer - 1, n - (sizeof bearer - 1), (const uint8_t *)S.api_key,
                         S.api_key_len);
    }
    return false;
}

/* ------------------------------------------------------------------------ */
/* Generate                                                                  */
/* ------------------------------------------------------------------------ */

static Kvserve__V1__FinishReason
finish_reason(const gen_out_t *o)
{
    if (o->stopped)
        return KVSERVE__V1__FINISH_REASON__FINISH_REASON_STOP;
    switch (o->fin) {
    case SCHED_FINISH_STOP: /* a whole guided choice */
        return KVSERVE__V1__FINISH_REASON__FINISH_REASON_STOP;
    case SCHED_FINISH_LENGTH:
        return KVSERVE__V1__FINISH_REASON__FINISH_REASON_LENGTH;
    case SCHED_FINISH_EOS:
        return KVSERVE__V1__FINISH_REASON__FINISH_REASON_EOS;
    case SCHED_FINISH_CANCELLED:
        return KVSERVE__V1__FINISH_REASON__FINISH_REASON_CANCELLED;
    default:
        return KVSERVE__V1__FINISH_REASON__FINISH_REASON_ERROR;
    }
}

/* Bytes of text that may go out now: everything when finished; else all
 * but what could still begin a stop string, cut back to a UTF-8 boundary. */
static size_t
text_ready(const call_t *c, const gen_out_t *o, bool final)
{
    if (final)
        return o->text.len;
    size_t hold = 0;
    for (size_t i = 0; i < c->g.n_stop; i++) {
        size_t n = strlen(c->g.stop[i]);
        if (n - 1 > hold)
            hold = n - 1;
    }
    size_t n = o->text.len > hold ? o->text.len - hold : 0;
    /* Do not split a character: find where the last one starts. */
    size_t k = n;
    while (k > 0 && n - k < 3 && ((uint8_t)o->text.p[k - 1] & 0xc0) == 0x80)
        k--;
    if (k > 0) {
        uint8_t lead = (uint8_t)o->text.p[k - 1];
        size_t need = lead >= 0xf0 ? 4 : lead >= 0xe0 ? 3 : lead >= 0xc0 ? 2 : 1;
        if (k - 1 + need > n)
            n = k - 1;
    }
    return n;
}

/* Checks the new token against the stop conditions; true when the request
 * stops here: the token and any text from the match on are dropped, or
 * with include_stop_str_in_output the token stays and the text runs to
 * the match's end. */
static bool
check_stop(const call_t *c, gen_out_t *o, int32_t tok)
{
    /* min_tokens: the engine bans the stop ids before then, and stop
     * strings are not looked for (vLLM's rule: from the token that makes
     * the output min_tokens long). */
    uint64_t at = (uint64_t)o->n_delivered + o->n_toks; /* this token's place in the output */
    /* A forced token is the caller's text, never a stop. */
    bool early = at + 1 < c->g.sr.min_tokens || at < c->g.sr.n_forced;
    for (size_t i = 0; i < c->g.n_stop_ids && !early; i++) {
        if ((uint32_t)tok == c->g.stop_ids[i]) {
            int n = model_token_piece(S.m, tok, o->stop_match, sizeof o->stop_match - 1);
            o->stop_match[n > 0 ? n : 0] = '\0';
            if (c->g.include_stop)
                srv_buf_put_token(&o->text, S.m, tok);
            return true;
        }
    }
    size_t before = o->text.len;
    srv_buf_put_token(&o->text, S.m, tok);
    /* Out of memory: the text is lost, but the stream goes on (its ids) */
    if (o->text.oom || o->text.len == 0 || early)
        return false;
    /* A match ends in this token's text: one wholly before it was looked
     * for then (or fell before min_tokens).  memmem: a byte-level token
     * can put a NUL in the text. */
    for (size_t i = 0; i < c->g.n_stop; i++) {
        size_t n = strlen(c->g.stop[i]), from = before >= n ? before - n + 1 : 0;
        const char *hit = memmem(o->text.p + from, o->text.len - from, c->g.stop[i], n);
        if (hit) {
            snprintf(o->stop_match, sizeof o->stop_match, "%s", c->g.stop[i]);
            o->text.len = (size_t)(hit - o->text.p) + (c->g.include_stop ? n : 0);
            o->text.p[o->text.len] = '\0';
            return true;
        }
    }
    return false;
}

static void gen_log(const call_t *c);

/* The logprobs of a message's tokens, as protobuf-c wants them: one
 * TokenLogprob each, their top ids as uint32. */
typedef struct logprobs_msg {
    Kvserve__V1__TokenLogprob *tl, **ptrs;
    uint32_t *ids;
} logprobs_msg_t;

static void
logprobs_msg_free(logprobs_msg_t *m)
{
    free(m->tl);
    free(m->ptrs);
    free(m->ids);
}

/* n log-probabilities as protobuf-c wants them, in m (m->ptrs: n
 * TokenLogprob pointers, their top ids as uint32); false when out of
 * memory. */
static bool
logprobs_msg(const sched_logprobs_t *lps, size_t n, logprobs_msg_t *m)
{
    size_t n_ids = 0;
    for (size_t i = 0; i < n; i++)
        n_ids += lps[i].n_top;
    m->tl = calloc(n ? n : 1, sizeof *m->tl);
    m->ptrs = calloc(n ? n : 1, sizeof *m->ptrs);
    m->ids = malloc((n_ids ? n_ids : 1) * sizeof *m->ids);
    if (!m->tl || !m->ptrs || !m->ids)
        return false;
    for (size_t i = 0, at = 0; i < n; i++) {
        const sched_logprobs_t *lp = &lps[i];
        Kvserve__V1__TokenLogprob *t = &m->tl[i];
        kvserve__v1__token_logprob__init(t);
        t->has_logprob = true;
        t->logprob = lp->logprob;
        for (uint32_t k = 0; k < lp->n_top; k++)
            m->ids[at + k] = (uint32_t)lp->top_ids[k];
        t->n_top_ids = t->n_top_logprobs = lp->n_top;
        t->top_ids = m->ids + at;
        t->top_logprobs = (float *)lp->top_lps;
        at += lp->n_top;
        m->ptrs[i] = t;
    }
    return true;
}

/* Whether output o has something for a message: tokens, text that may
 * go out, or its end not yet sent. */
static bool
out_pending(const call_t *c, const gen_out_t *o)
{
    return !o->final_sent && (o->n_toks > 0 || o->finished || text_ready(c, o, false) > 0);
}

/* The request's usage over its samples, for the log and the metrics:
 * the prompt's side as sample 0 reports it (shared), tokens, preemptions,
 * decode time (so decode time over tokens stays a time per output token)
 * and speculative decoding's proposed and accepted tokens (each sample
 * decodes its own) summed, the earliest first token, and the most KV any
 * sample dropped (forked samples report the prompt's drops as theirs
 * too). */
static sched_usage_t
gen_usage(const call_t *c)
{
    sched_usage_t u = c->out[0].usage;
    u.completion_tokens = 0;
    for (uint32_t i = 0; i < c->n_out; i++) {
        const gen_out_t *o = &c->out[i];
        u.completion_tokens += o->n_delivered + (uint32_t)o->n_toks;
        if (i == 0)
            continue;
        u.preemptions += o->usage.preemptions;
        u.decode_ns += o->usage.decode_ns;
        u.spec_draft_tokens += o->usage.spec_draft_tokens;
        u.spec_accepted_tokens += o->usage.spec_accepted_tokens;
        if (o->usage.kv_dropped_tokens > u.kv_dropped_tokens)
            u.kv_dropped_tokens = o->usage.kv_dropped_tokens;
        if (o->usage.ttft_ns && (u.ttft_ns == 0 || o->usage.ttft_ns < u.ttft_ns))
            u.ttft_ns = o->usage.ttft_ns;
    }
    return u;
}

/* Prompt logprobs a message carries at most: with 20 alternatives each
 * about 700 KB, under the 4 MB clients accept by default. */
#define PLP_PER_MSG 4096u

/* A message of prompt logprobs alone, the oldest pending first. */
static void
gen_send_plp(call_t *c)
{
    uint32_t n = c->n_plp < PLP_PER_MSG ? c->n_plp : PLP_PER_MSG;
    Kvserve__V1__GenerateResponse r = KVSERVE__V1__GENERATE_RESPONSE__INIT;
    logprobs_msg_t pm = {0};
    if (!logprobs_msg(c->plp, n, &pm)) {
        logprobs_msg_free(&pm);
        grpc_call_cancel(c->call, NULL);
        return;
    }
    r.n_prompt_logprobs = n;
    r.prompt_logprobs = pm.ptrs;
    r.text = "";
    if (!c->md_sent)
        r.request_id = c->rid;
    bool ok = send_msg(c, &r.base);
    logprobs_msg_free(&pm);
    if (!ok)
        return;
    c->msg_n = 0;
    c->msg_t_sum = 0;
    memmove(c->plp, c->plp + n, (c->n_plp - n) * sizeof *c->plp);
    c->n_plp -= n;
}

/* Sends what is pending when no send is in flight: one sample's produced
 * tokens in one message, the samples in turn; a sample's last message
 * carries its finish reason and usage.  The status follows the last. */
static void
gen_pump(call_t *c)
{
    if (c->send_pending || c->status_started || c->close_done || c->n_out == 0)
        return;
    bool all_sent = true, all_failed = !c->engine_live;
    for (uint32_t i = 0; i < c->n_out; i++) {
        const gen_out_t *o = &c->out[i];
        all_sent &= o->final_sent;
        all_failed &=
            o->fin == SCHED_FINISH_ERROR && !o->stopped && o->n_delivered == 0 && o->n_toks == 0;
    }
    if (all_sent) {
        send_status(c, GRPC_STATUS_OK, NULL);
        return;
    }
    if (c->n_plp) {
        gen_send_plp(c);
        return;
    }
    if (all_failed) {
        int e = c->out[0].fin_err;
        send_status(c, e == KVS_ENOSPC ? GRPC_STATUS_RESOURCE_EXHAUSTED : GRPC_STATUS_INTERNAL,
                    kvs_strerror(e));
        gen_log(c);
        return;
    }
    uint32_t idx = 0, k = 0;
    for (; k < c->n_out; k++) {
        idx = (c->next_out + k) % c->n_out;
        if (out_pending(c, &c->out[idx]))
            break;
    }
    if (k == c->n_out)
        return;
    gen_out_t *o = &c->out[idx];
    c->next_out = idx + 1;
    bool done = o->finished;
    size_t ready = text_ready(c, o, done);
    Kvserve__V1__GenerateResponse r = KVSERVE__V1__GENERATE_RESPONSE__INIT;
    logprobs_msg_t lm = {0};
    bool lp_ok = o->lps == NULL || o->n_toks == 0 || logprobs_msg(o->lps, o->n_toks, &lm);
    if (lp_ok && lm.ptrs) {
        r.n_logprobs = o->n_toks;
        r.logprobs = lm.ptrs;
    }
    uint32_t *ids = malloc((o->n_toks ? o->n_toks : 1) * sizeof *ids);
    /* proto3 strings are UTF-8, which clients check (grpcio hands Python
     * bytes instead, Go and Java refuse the message): a token can end
     * mid-character and a byte-level one be any byte. */
    bool want_match = done && o->stop_match[0];
    char *txt = srv_utf8_valid(o->text.p ? o->text.p : "", ready);
    char *match = want_match ? srv_utf8_valid(o->stop_match, strlen(o->stop_match)) : NULL;
    if (!ids || !txt || (want_match && !match) || !lp_ok) {
        free(ids);
        free(txt);
        free(match);
        logprobs_msg_free(&lm);
        grpc_call_cancel(c->call, NULL);
        return;
    }
    for (size_t i = 0; i < o->n_toks; i++)
        ids[i] = (uint32_t)o->toks[i];
    r.n_token_ids = o->n_toks;
    r.token_ids = ids;
    r.text = txt;
    r.has_index = c->n_out > 1;
    r.index = idx;
    if (!c->md_sent)
        r.request_id = c->rid;
    Kvserve__V1__Usage u = KVSERVE__V1__USAGE__INIT;
    if (done) {
        const sched_usage_t *su = &o->usage;
        r.has_finish_reason = true;
        r.finish_reason = finish_reason(o);
        r.stop_match = match;
        u.has_prompt_tokens = u.has_cached_prompt_tokens = u.has_computed_prompt_tokens = true;
        u.has_completion_tokens = u.has_preemptions = u.has_queue_time_us = true;
        u.has_time_to_first_token_us = u.has_decode_time_us = true;
        u.prompt_tokens = su->prompt_tokens;
        u.cached_prompt_tokens = su->cached_prompt_tokens;
        u.computed_prompt_tokens = su->computed_prompt_tokens;
        u.completion_tokens = o->n_delivered + (uint32_t)o->n_toks;
        u.preemptions = su->preemptions;
        u.queue_time_us = su->queue_ns / 1000;
        u.time_to_first_token_us = su->ttft_ns / 1000;
        u.decode_time_us = su->decode_ns / 1000;
        u.has_attention_density = su->attn_keys_dense > 0;
        u.attention_density =
            su->attn_keys_dense ? (double)su->attn_keys / (double)su->attn_keys_dense : 1.0;
        u.has_draft_time_us = u.has_kept_prompt_tokens = c->g.sr.spec.on;
        u.draft_time_us = su->draft_ns / 1000;
        u.kept_prompt_tokens = su->kept_prompt_tokens;
        u.has_kv_dropped_tokens = c->g.sr.kv.kind != SCHED_KV_FULL;
        u.kv_dropped_tokens = su->kv_dropped_tokens;
        u.has_spec_draft_tokens = u.has_spec_accepted_tokens =
            sched_get_cfg(S.sched)->num_speculative_tokens > 0;
        u.spec_draft_tokens = su->spec_draft_tokens;
        u.spec_accepted_tokens = su->spec_accepted_tokens;
        r.usage = &u;
    }
    bool ok = send_msg(c, &r.base);
    free(ids);
    free(txt);
    free(match);
    logprobs_msg_free(&lm);
    if (!ok)
        return;
    c->msg_n = (uint32_t)o->n_toks;
    c->msg_t_sum = 0;
    for (size_t i = 0; i < o->n_toks; i++)
        c->msg_t_sum += o->tok_t[i];
    o->n_delivered += (uint32_t)o->n_toks;
    o->n_toks = 0;
    if (ready) {
        /* The rest moves down, the NUL after it as srv_buf keeps one. */
        memmove(o->text.p, o->text.p + ready, o->text.len - ready);
        o->text.len -= ready;
        o->text.p[o->text.len] = '\0';
    }
    if (done) {
        o->final_sent = true;
        bool last = true;
        for (uint32_t i = 0; i < c->n_out; i++)
            last &= c->out[i].final_sent;
        if (last)
            gen_log(c);
    }
}

static void
gen_log(const call_t *c)
{
    double ms = (double)(kvs_now_ns() - c->t_arrive) / 1e6;
    sched_usage_t u = gen_usage(c);
    const gen_out_t *o = &c->out[0];
    char samples[32] = "", spec[64] = "";
    if (c->n_out > 1)
        snprintf(samples, sizeof samples, " (%u samples)", c->n_out);
    if (sched_get_cfg(S.sched)->num_speculative_tokens > 0)
        snprintf(spec, sizeof spec, ", speculative %u of %u accepted", u.spec_accepted_tokens,
                 u.spec_draft_tokens);
    KVS_INFOF("request %s: %s, prompt %u (cached %u), completion %u%s, queue %.1f ms, "
              "ttft %.1f ms, total %.1f ms, preempted %u, attention density %.3f%s",
              c->rid,
              o->stopped ? "stop"
              : o->fin   ? sched_finish_name(o->fin)
                         : "-",
              u.prompt_tokens, u.cached_prompt_tokens, u.completion_tokens, samples,
              u.queue_ns / 1e6, u.ttft_ns / 1e6, ms, u.preemptions,
              u.attn_keys_dense ? (double)u.attn_keys / (double)u.attn_keys_dense : 1.0, spec);
}

static void
gen_refuse(call_t *c, grpc_status_code code, const char *msg)
{
    KVS_INFOF("request %s refused: %s", c->rid[0] ? c->rid : "-", msg);
    send_status(c, code, msg);
}

static void offload(call_t *c);

static void
gen_new(call_t *c)
{
    c->t_arrive = kvs_now_ns();
    list_add(&S.gens, c);
    S.n_requests++;
    if (S.draining) {
        gen_refuse(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
        return;
    }
    if (!authorized(c)) {
        gen_refuse(c, GRPC_STATUS_UNAUTHENTICATED,
                   "missing or wrong API key (authorization: Bearer ...)");
        return;
    }
    char why[192];
    c->req = (Kvserve__V1__GenerateRequest *)srv_bb_to_pb(
        c->req_bb, &kvserve__v1__generate_request__descriptor, why, sizeof why);
    if (c->req == NULL) {
        gen_refuse(c, GRPC_STATUS_INVALID_ARGUMENT, why);
        return;
    }
    c->n_request = S.n_requests;
    snprintf(c->rid, sizeof c->rid, "req-%llu", (unsigned long long)c->n_request);
    c->lim = S.lim;
    c->lim.seed_fallback = (S.seq + 1) * 0x9e3779b97f4a7c15ull ^ kvs_now_ns();
    offload(c);
}

/* Whether a live Generate other than c goes by c's id. */
static bool
rid_live(const call_t *c)
{
    for (const call_t *o = S.gens; o; o = o->next)
        if (o != c && o->id && strcmp(o->rid, c->rid) == 0)
            return true;
    return false;
}

/* The rest of a Generate, back on the loop once parsed. */
static void
gen_parsed(call_t *c)
{
    if (c->parse_rc != GRPC_STATUS_OK) {
        if (c->g.request_id[0])
            memcpy(c->rid, c->g.request_id, sizeof c->rid);
        gen_refuse(c, c->parse_rc, c->parse_msg);
        return;
    }
    char msg[256];
    if (c->g.request_id[0]) {
        memcpy(c->rid, c->g.request_id, sizeof c->rid);
        if (rid_live(c)) {
            gen_refuse(c, GRPC_STATUS_ALREADY_EXISTS,
                       "request_id: already in use by a live request");
            return;
        }
    } else {
        /* A client may have chosen the id made for this one: another. */
        for (unsigned k = 1; rid_live(c); k++)
            snprintf(c->rid, sizeof c->rid, "req-%llu.%u", (unsigned long long)c->n_request, k);
    }
    if (S.n_live >= S.n_slots) {
        gen_refuse(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "the request queue is full");
        return;
    }
    c->n_out = c->g.sr.n ? c->g.sr.n : 1;
    if ((c->out = calloc(c->n_out, sizeof *c->out)) == NULL) {
        c->n_out = 0;
        gen_refuse(c, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
        return;
    }
    for (uint32_t i = 0; i < c->n_out; i++)
        c->out[i].usage.prompt_tokens = c->g.n_prompt;
    uint32_t slot = 0;
    while (S.slots[slot])
        slot++;
    uint64_t id = ((uint64_t)++S.slot_gen[slot] << 32) | slot;
    c->g.sr.id = id;
    c->g.sr.name = c->rid;
    int e = sched_submit(S.sched, &c->g.sr);
    if (e) {
        if (e == KVS_ENOTSUP) /* speculative prefill without --draft-model */
            snprintf(msg, sizeof msg,
                     "policy.prefill.kind: speculative prefill needs a server started with "
                     "--draft-model");
        else if (e == KVS_ENOSPC)
            snprintf(msg, sizeof msg,
                     "the engine refused the request: %u prompt + %u new tokens can never fit "
                     "in the KV cache (%llu tokens)",
                     c->g.n_prompt, c->g.sr.max_tokens,
                     (unsigned long long)sched_get_cfg(S.sched)->n_blocks *
                         sched_get_cfg(S.sched)->block_tokens);
        else
            snprintf(msg, sizeof msg, "the engine refused the request: %s", kvs_strerror(e));
        gen_refuse(c,
                   e == KVS_ERANGE    ? GRPC_STATUS_OUT_OF_RANGE
                   : e == KVS_ENOSPC  ? GRPC_STATUS_RESOURCE_EXHAUSTED
                   : e == KVS_EINVAL  ? GRPC_STATUS_INVALID_ARGUMENT
                   : e == KVS_ENOTSUP ? GRPC_STATUS_FAILED_PRECONDITION
                                      : GRPC_STATUS_INTERNAL,
                   msg);
        return;
    }
    c->id = id;
    S.slots[slot] = c;
    S.n_live++;
    c->engine_live = true;
    c->n_running = c->n_out;
    if (c->abort_asked) {
        KVS_INFOF("request %s: abort requested", c->rid);
        sched_cancel(S.sched, c->id);
    }
}

static call_t *
gen_by_id(uint64_t id)
{
    uint32_t slot = (uint32_t)(id & 0xffffffffu);
    call_t *c = slot < S.n_slots ? S.slots[slot] : NULL;
    return c && c->id == id ? c : NULL;
}

/* Once per request, when its last sample ends: sample 0's reason. */
static void
metrics_finish(const call_t *c, uint64_t t_ns)
{
    const gen_out_t *o = &c->out[0];
    srv_met_finish_t f = o->stopped || o->fin == SCHED_FINISH_STOP || o->fin == SCHED_FINISH_EOS
                             ? SRV_MET_STOP
                         : o->fin == SCHED_FINISH_LENGTH    ? SRV_MET_LENGTH
                         : o->fin == SCHED_FINISH_CANCELLED ? SRV_MET_ABORT
                                                            : SRV_MET_ERROR;
    sched_usage_t u = gen_usage(c);
    srv_metrics_finish(S.metrics, f, &u, t_ns > c->t_arrive ? t_ns - c->t_arrive : 0,
                       c->g.sr.spec.on);
}

static void watch_pump(call_t *c);

/* health_status() changed: every Watch stream hears it. */
static void
health_changed(void)
{
    for (call_t *w = S.watches; w; w = w->next)
        watch_pump(w);
}

/* Doubles the room for produced tokens (their times and log-probabilities
 * too); on failure the room stays as it was. */
static void
toks_grow(const call_t *c, gen_out_t *o)
{
    size_t cap = o->cap_toks ? 2 * o->cap_toks : 16;
    int32_t *t = realloc(o->toks, cap * sizeof *t);
    if (t == NULL)
        return;
    o->toks = t;
    uint64_t *tt = realloc(o->tok_t, cap * sizeof *tt);
    if (tt == NULL)
        return;
    o->tok_t = tt;
    if (c->g.sr.logprobs) {
        sched_logprobs_t *lp = realloc(o->lps, cap * sizeof *lp);
        if (lp == NULL)
            return;
        o->lps = lp;
    }
    o->cap_toks = cap;
}

static void
on_engine(uv_async_t *h)
{
    (void)h;
    sched_event_t *ev;
    while ((ev = sched_poll(S.sched)) != NULL) {
        call_t *c = gen_by_id(ev->req_id);
        gen_out_t *o = c && ev->index < c->n_out ? &c->out[ev->index] : NULL;
        if (o == NULL)
            c = NULL;
        if (o && ev->kind == SCHED_EV_PROMPT_LOGPROBS) {
            /* In order, once each (sched.h): they land where they belong. */
            if (ev->plp_first == c->plp_seen + 1 && ev->n_plp) {
                if (c->n_plp + ev->n_plp > c->cap_plp) {
                    uint32_t cap = 2 * (c->n_plp + ev->n_plp);
                    sched_logprobs_t *p = realloc(c->plp, cap * sizeof *p);
                    if (p == NULL) { /* the client hears of it; the engine is told below */
                        grpc_call_cancel(c->call, NULL);
                        sched_event_free(ev);
                        continue;
                    }
                    c->plp = p;
                    c->cap_plp = cap;
                }
                memcpy(c->plp + c->n_plp, ev->plp, ev->n_plp * sizeof *c->plp);
                c->n_plp += ev->n_plp;
                c->plp_seen += ev->n_plp;
            }
        } else if (o && ev->kind == SCHED_EV_TOKEN && !o->stopped && !o->finished) {
            bool stop = check_stop(c, o, ev->token);
            if (stop) {
                o->stopped = true;
                sched_cancel_sample(S.sched, c->id, ev->index);
            }
            if (!stop || c->g.include_stop) {
                if (o->n_toks == o->cap_toks)
                    toks_grow(c, o);
                if (o->n_toks < o->cap_toks) {
                    o->tok_t[o->n_toks] = ev->t_ns;
                    if (o->lps)
                        o->lps[o->n_toks] = ev->has_logprobs ? ev->lp : (sched_logprobs_t){0};
                    o->toks[o->n_toks++] = ev->token;
                }
            }
        } else if (o && ev->kind == SCHED_EV_FINISH && !o->finished) {
            o->finished = true;
            o->fin = ev->finish;
            o->fin_err = ev->error;
            uint32_t prompt = o->usage.prompt_tokens;
            o->usage = ev->usage;
            o->usage.prompt_tokens = prompt;
            c->engine_live = --c->n_running > 0;
            if (!c->engine_live)
                metrics_finish(c, ev->t_ns);
            /* The client is gone: nothing more to send. */
            if (c->close_done && !c->engine_live) {
                gen_log(c);
                maybe_free(c);
                sched_event_free(ev);
                continue;
            }
        }
        if (c)
            gen_pump(c);
        sched_event_free(ev);
    }
    if (!S.device_failed && sched_device_failed(S.sched)) {
        /* Every later step would fail too: tell the probes, so that an
         * orchestrator restarts the process and balancers route around. */
        S.device_failed = true;
        KVS_ERRORF("serve: the device failed and cannot recover; health is NOT_SERVING, "
                   "restart the server");
        health_changed();
    }
    maybe_finish_shutdown();
}

static void
engine_wake(void *arg)
{
    (void)arg;
    uv_async_send(&S.eng_async);
}

/* ------------------------------------------------------------------------ */
/* Unary methods and health                                                  */
/* ------------------------------------------------------------------------ */

/* The request message, or NULL after answering INVALID_ARGUMENT. */
static ProtobufCMessage *
parse_or_refuse(call_t *c, const ProtobufCMessageDescriptor *d)
{
    char why[192];
    ProtobufCMessage *m = srv_bb_to_pb(c->req_bb, d, why, sizeof why);
    if (m == NULL)
        reply_unary(c, NULL, GRPC_STATUS_INVALID_ARGUMENT, why);
    return m;
}

static Grpc__Health__V1__HealthCheckResponse__ServingStatus
health_status(void)
{
    return S.draining || S.device_failed
               ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__NOT_SERVING
               : GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVING;
}

/* Empty, "kvserve.v1.Generation" and "kvserve.v1.Control" are ours. */
static bool
known_service(const char *s)
{
    return s == NULL || s[0] == '\0' || strcmp(s, "kvserve.v1.Generation") == 0 ||
           strcmp(s, "kvserve.v1.Control") == 0;
}

static void
watch_pump(call_t *c)
{
    if (c->send_pending || c->status_started || c->close_done)
        return;
    int st = c->watch_unknown
                 ? GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__SERVING_STATUS__SERVICE_UNKNOWN
                 : (int)health_status();
    if (st == c->watch_sent)
        return;
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    r.status = (Grpc__Health__V1__HealthCheckResponse__ServingStatus)st;
    if (send_msg(c, &r.base))
        c->watch_sent = st;
}

static void
health_new(call_t *c)
{
    Grpc__Health__V1__HealthCheckRequest *q =
        (Grpc__Health__V1__HealthCheckRequest *)parse_or_refuse(
            c, &grpc__health__v1__health_check_request__descriptor);
    if (q == NULL)
        return;
    bool known = known_service(q->service);
    grpc__health__v1__health_check_request__free_unpacked(q, NULL);
    if (c->method == M_HEALTH_WATCH) {
        /* Watch reports an unknown service as a status, not an error, and
         * keeps the stream open (the service may appear, health.proto
         * says; ours never do). */
        c->watch_unknown = !known;
        list_add(&S.watches, c);
        watch_pump(c);
        return;
    }
    if (!known) {
        reply_unary(c, NULL, GRPC_STATUS_NOT_FOUND, "unknown service");
        return;
    }
    Grpc__Health__V1__HealthCheckResponse r = GRPC__HEALTH__V1__HEALTH_CHECK_RESPONSE__INIT;
    r.status = health_status();
    reply_unary(c, &r.base, GRPC_STATUS_OK, NULL);
}

static void
tokenize_new(call_t *c)
{
    c->tok_req = (Kvserve__V1__TokenizeRequest *)parse_or_refuse(
        c, &kvserve__v1__tokenize_request__descriptor);
    c->lim = S.lim;
    if (c->tok_req)
        offload(c);
}

/* A Tokenize's answer, back on the loop once its text is tokenized. */
static void
tokenize_done(call_t *c)
{
    size_t n = c->tok_n;
    uint32_t *out = NULL;
    if (c->parse_rc == GRPC_STATUS_OK && (out = malloc((n ? n : 1) * sizeof *out)) == NULL) {
        c->parse_rc = GRPC_STATUS_RESOURCE_EXHAUSTED;
        snprintf(c->parse_msg, sizeof c->parse_msg, "out of memory");
    }
    if (c->parse_rc != GRPC_STATUS_OK) {
        reply_unary(c, NULL, c->parse_rc, c->parse_msg);
    } else {
        for (size_t i = 0; i < n; i++)
            out[i] = (uint32_t)c->tok_ids[i];
        Kvserve__V1__TokenizeResponse r = KVSERVE__V1__TOKENIZE_RESPONSE__INIT;
        r.n_ids = n;
        r.ids = out;
        reply_unary(c, &r.base, GRPC_STATUS_OK, NULL);
    }
    free(out);
}

static void
work_run(uv_work_t *w)
{
    call_t *c = w->data;
    if (c->method == M_GENERATE)
        c->parse_rc = srv_gen_parse(c->req, &c->lim, &c->g, c->parse_msg, sizeof c->parse_msg);
    else
        c->parse_rc = srv_tokenize_parse(c->tok_req, &c->lim, &c->tok_ids, &c->tok_n, c->parse_msg,
                                         sizeof c->parse_msg);
}

/* Back on the loop: a request that arrived before a drain began is still
 * served, unless the client has gone or the server is closing. */
static void
work_done(uv_work_t *w, int status)
{
    call_t *c = w->data;
    (void)status; /* nothing cancels the work */
    c->busy = false;
    S.n_busy--;
    if (c->close_done)
        ; /* the client has gone: nothing to answer */
    else if (S.shutting_down && c->method == M_GENERATE)
        gen_refuse(c, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
    else if (S.shutting_down)
        reply_unary(c, NULL, GRPC_STATUS_UNAVAILABLE, "the server is shutting down");
    else if (c->method == M_GENERATE)
        gen_parsed(c);
    else
        tokenize_done(c);
    maybe_free(c);
    maybe_finish_shutdown();
}

static void
offload(call_t *c)
{
    c->work.data = c;
    int e = uv_queue_work(S.loop, &c->work, work_run, work_done);
    if (e && c->method == M_GENERATE) {
        gen_refuse(c, GRPC_STATUS_INTERNAL, uv_strerror(e));
    } else if (e) {
        reply_unary(c, NULL, GRPC_STATUS_INTERNAL, uv_strerror(e));
    } else {
        c->busy = true;
        S.n_busy++;
    }
}

static void
model_info_new(call_t *c)
{
    const model_hparams_t *hp = model_hparams(S.m);
    Kvserve__V1__ModelInfo r = KVSERVE__V1__MODEL_INFO__INIT;
    char name[256];
    snprintf(name, sizeof name, "%s", S.o.model);
    r.name = name;
    r.architecture = (char *)hp->arch;
    const kern_type_traits_t *tr = kern_type_traits(hp->wtype);
    r.weight_type = (char *)(tr ? tr->name : "?");
    r.has_n_vocab = r.has_n_ctx_train = r.has_n_embd = r.has_n_layer = true;
    r.has_n_head = r.has_n_head_kv = true;
    r.n_vocab = hp->n_vocab;
    r.n_ctx_train = hp->n_ctx_train;
    r.n_embd = hp->n_embd;
    r.n_layer = hp->n_layer;
    r.n_head = hp->n_head;
    r.n_head_kv = hp->n_head_kv;
    if (model_token_bos(S.m) >= 0) {
        r.has_bos_token_id = true;
        r.bos_token_id = (uint32_t)model_token_bos(S.m);
    }
    if (model_token_eos(S.m) >= 0) {
        r.has_eos_token_id = true;
        r.eos_token_id = (uint32_t)model_token_eos(S.m);
    }
    r.tokenizer = (char *)model_tokenizer_name(S.m);
    r.chat_template = (char *)chat_name();
    reply_unary(c, &r.base, GRPC_STATUS_OK, NULL);
}

static void
server_info_new(call_t *c)
{
    const sched_cfg_t *sc = sched_get_cfg(S.sched);
    Kvserve__V1__ServerInfo r = KVSERVE__V1__SERVER_INFO__INIT;
    char *policies[] = {"dense", "sink-window", "delta", "block-sparse", "quest-decode"};
    r.version = "0.1.0";
    r.device = (char *)kern_backend_name(S.be);
    r.has_block_size = r.has_total_blocks = r.has_max_model_len = r.has_max_num_seqs = true;
    r.has_max_num_batched_tokens = r.has_max_queued_requests = r.has_prefix_caching = true;
    r.has_num_speculative_tokens = true;
    r.block_size = sc->block_tokens;
    r.total_blocks = sc->n_blocks;
    r.kv_cache_dtype = (char *)srv_kv_name(&S.o.kv);
    r.max_model_len = sc->max_model_len;
    r.max_num_seqs = sc->max_num_seqs;
    r.max_num_batched_tokens = sc->max_num_batched_tokens;
    r.max_queued_requests = S.o.max_queued;
    r.prefix_caching = sc->prefix_caching;
    r.num_speculative_tokens = sc->num_speculative_tokens;
    if (sc->num_speculative_tokens)
        r.speculative_method = sc->spec_draft_model ? "draft" : "ngram";
    if (sc->spec_draft_model)
        r.speculative_acceptance = sc->spec_rejection ? "rejection" : "exact";
    r.n_attention_policies = sizeof policies / sizeof policies[0];
    r.attention_policies = policies;
    reply_unary(c, &r.base, GRPC_STATUS_OK, NULL);
}

static void
load_new(call_t *c)
{
    sched_load_t l;
    sched_get_load(S.sched, &l);
    Kvserve__V1__Load r = KVSERVE__V1__LOAD__INIT;
    r.has_running = r.has_queued = r.has_kv_blocks_total = r.has_kv_blocks_free = true;
    r.has_kv_blocks_cached = r.has_requests_total = true;
    r.running = l.running;
    r.queued = l.waiting;
    r.kv_blocks_total = l.blocks_total;
    r.kv_blocks_free = l.blocks_free;
    r.kv_blocks_cached = l.blocks_cached;
    r.requests_total = S.n_requests;
    r.has_messages_sent = r.has_tokens_sent = r.has_token_latency_us_sum = true;
    r.has_engine_steps = r.has_engine_busy_us = true;
    r.messages_sent = S.msgs_sent;
    r.tokens_sent = S.toks_sent;
    r.token_latency_us_sum = S.tok_lat_ns / 1000;
    r.engine_steps = l.steps;
    r.engine_busy_us = l.busy_ns / 1000;
    reply_unary(c, &r.base, GRPC_STATUS_OK, NULL);
}

static void
abort_new(call_t *c)
{
    Kvserve__V1__AbortRequest *q =
        (Kvserve__V1__AbortRequest *)parse_or_refuse(c, &kvserve__v1__abort_request__descriptor);
    if (q == NULL)
        return;
    const char *id;
    char msg[80];
    grpc_status_code st = srv_abort_parse(q, &id, msg, sizeof msg);
    if (st != GRPC_STATUS_OK) {
        kvserve__v1__abort_request__free_unpacked(q, NULL);
        reply_unary(c, NULL, st, msg);
        return;
    }
    Kvserve__V1__AbortResponse r = KVSERVE__V1__ABORT_RESPONSE__INIT;
    r.has_found = true;
    for (call_t *g = S.gens; g; g = g->next) {
        if (g->id && g->engine_live && strcmp(g->rid, id) == 0) {
            sched_cancel(S.sched, g->id);
            r.found = true;
            KVS_INFOF("request %s: abort requested", g->rid);
            break;
        }
        /* Not yet parsed: the message is only read on the other side. */
        if (g->busy && g->req->request_id && strcmp(g->req->request_id, id) == 0) {
            g->abort_asked = true;
            r.found = true;
            break;
        }
    }
    kvserve__v1__abort_request__free_unpacked(q, NULL);
    reply_unary(c, &r.base, GRPC_STATUS_OK, NULL);
}

/* ------------------------------------------------------------------------ */
/* Dispatch                                                                  */
/* ------------------------------------------------------------------------ */

static void
on_new(call_t *c, int ok)
{
    if (!ok) { /* a slot cancelled by shutdown: dispatch frees it */
        c->close_done = true;
        return;
    }
    if (!S.shutting_down)
        post_slot(c->method);
    start_close(c);
    if (c->method == M_UNKNOWN) {
        KVS_INFOF("unknown method %.*s", (int)GRPC_SLICE_LENGTH(c->details.method),
                  (const char *)GRPC_SLICE_START_PTR(c->details.method));
        reply_unary(c, NULL, GRPC_STATUS_UNIMPLEMENTED, "unknown method");
        return;
    }
    if (c->method != M_GENERATE && !authorized(c)) {
        reply_unary(c, NULL, GRPC_STATUS_UNAUTHENTICATED,
                    "missing or wrong API key (authorization: Bearer ...)");
        return;
    }
    switch (c->method) {
    case M_GENERATE:
        gen_new(c);
        break;
    case M_TOKENIZE:
        tokenize_new(c);
        break;
    case M_MODEL_INFO:
        model_info_new(c);
        break;
    case M_SERVER_INFO:
        server_info_new(c);
        break;
    case M_LOAD:
        load_new(c);
        break;
    case M_ABORT:
        abort_new(c);
        break;
    case M_HEALTH_CHECK:
    case M_HEALTH_WATCH:
        health_new(c);
        break;
    default:
        break;
    }
}

static void
dispatch(tag_t *t, int ok)
{
    if (t->kind == T_SHUTDOWN) {
        S.shutdown_done = true;
        maybe_shutdown_cq();
        return;
    }
    call_t *c = t->owner;
    switch (t->kind) {
    case T_NEW:
        on_new(c, ok);
        break;
    case T_SEND:
        grpc_byte_buffer_destroy(c->send_bb);
        c->send_bb = NULL;
        c->send_pending = false;
        if (!ok) { /* the client went away or a limit was hit */
            if (c->engine_live)
                sched_cancel(S.sched, c->id);
        } else if (c->method == M_GENERATE) {
            S.msgs_sent++;
            S.toks_sent += c->msg_n;
            S.tok_lat_ns += c->msg_n * kvs_now_ns() - c->msg_t_sum;
            c->msg_n = 0;
            c->msg_t_sum = 0;
            gen_pump(c);
        } else if (c->method == M_HEALTH_WATCH) {
            watch_pump(c);
            if (S.shutting_down && !c->send_pending)
                send_status(c, GRPC_STATUS_OK, NULL);
        }
        break;
    case T_STATUS:
        c->status_pending = false;
        break;
    case T_CLOSE:
        c->close_done = true;
        if (c->cancelled && c->engine_live) {
            KVS_INFOF("request %s: cancelled by the client (or its deadline)", c->rid);
            sched_cancel(S.sched, c->id); /* freed when the engine says so */
        }
        break;
    default:
        break;
    }
    maybe_free(c);
}

/* Stops the engine thread, then finishes by hand what it still held (a
 * drain timeout cancelled them), so every call is freed before the loop
 * closes the handle the engine would wake. */
static void
engine_down(void)
{
    if (S.engine_stopped)
        return;
    sched_thread_stop(S.sched);
    S.engine_stopped = true;
    for (call_t *g = S.gens; g; g = g->next)
        if (g->engine_live)
            sched_cancel(S.sched, g->id);
    while (sched_step(S.sched) != 0) /* an error failed only its step's requests */
        ;
    on_engine(NULL);
}

static void
on_cq(uv_async_t *h)
{
    (void)h;
    for (;;) {
        uv_mutex_lock(&S.mu);
        qev_t *v = S.q;
        size_t n = S.q_len;
        S.q = NULL;
        S.q_len = S.q_cap = 0;
        uv_mutex_unlock(&S.mu);
        if (n == 0) {
            free(v);
            return;
        }
        for (size_t i = 0; i < n; i++) {
            if (v[i].tag == NULL) { /* the cq is drained: the cq thread has ended */
                uv_thread_join(&S.cq_thread);
                S.cq_joined = true;
                engine_down();
                uv_close((uv_handle_t *)&S.cq_async, NULL);
                uv_close((uv_handle_t *)&S.eng_async, NULL);
                /* Unreferenced, not stopped: the loop may end, and a late
                 * signal still finds libuv's handler, not the default
                 * action, while the rest is torn down. */
                uv_unref((uv_handle_t *)&S.sig_term);
                uv_unref((uv_handle_t *)&S.sig_int);
                continue;
            }
            dispatch(v[i].tag, v[i].ok);
        }
        free(v);
    }
}

/* ------------------------------------------------------------------------ */
/* Drain and shutdown                                                        */
/* ------------------------------------------------------------------------ */

static void
begin_shutdown(void)
{
    if (S.shutting_down)
        return;
    S.shutting_down = true;
    uv_timer_stop(&S.drain_timer);
    /* Watch streams end with OK; everything else still open is cancelled. */
    for (call_t *w = S.watches; w; w = w->next)
        if (!w->send_pending)
            send_status(w, GRPC_STATUS_OK, NULL);
    /* The server's own shutdown began with the drain (on_signal). */
    grpc_server_cancel_all_calls(S.server);
}

static void
maybe_finish_shutdown(void)
{
    if (S.draining && !S.shutting_down && S.n_live == 0 && S.n_busy == 0)
        begin_shutdown();
}

static void
on_drain_timeout(uv_timer_t *t)
{
    (void)t;
    KVS_WARNF("serve: drain timeout: cancelling %u requests still running", S.n_live);
    for (call_t *g = S.gens; g; g = g->next)
        if (g->engine_live)
            sched_cancel(S.sched, g->id);
    begin_shutdown();
}

static void
die_on_signal(int signum)
{
    _exit(128 + signum);
}

static void
on_signal(uv_signal_t *h, int signum)
{
    (void)h;
    if (S.cq_joined) /* tearing down already */
        return;
    if (S.draining) { /* a second signal: stop waiting */
        on_drain_timeout(&S.drain_timer);
        return;
    }
    KVS_INFOF("serve: %s: draining (%u requests in flight, up to %u s)",
              signum == SIGTERM ? "SIGTERM" : "SIGINT", S.n_live, S.o.drain_timeout_s);
    S.draining = true;
    /* GOAWAY now, before watchers hear NOT_SERVING: clients take new calls
     * elsewhere at once while the calls in flight finish here (the
     * shutdown tag waits for them).  A call already on its way still
     * gets UNAVAILABLE from gen_new. */
    grpc_server_shutdown_and_notify(S.server, S.cq, &S.t_shutdown);
    health_changed();
    uv_timer_start(&S.drain_timer, on_drain_timeout, (uint64_t)S.o.drain_timeout_s * 1000, 0);
    maybe_finish_shutdown();
}

/* ------------------------------------------------------------------------ */
/* Command line and bring-up                                                 */
/* ------------------------------------------------------------------------ */

static const char usage[] =
    "usage: kvserve serve [--model PATH] [--host 127.0.0.1] [--port 50051] [--device "
    "cpu|ref|cuda]\n"
    "                     [--threads N (default: usable cores - 1)] [--max-model-len N] "
    "[--block-size "
    "16]\n"
    "                     [--kv-cache-dtype f16|f32|bf16|q8_0|fp8|q4] [--kv-sink-tokens N]\n"
    "                     [--kv-policy full|sink-eviction|snapkv|h2o] [--kv-budget N]\n"
    "                     [--kv-evict-sinks N] [--snapkv-window N] [--h2o-recent N]\n"
    "                     [--kv-residual-tokens N] [--host-kv-memory SIZE]\n"
    "                     [--kv-cache-memory SIZE | --num-kv-blocks N]\n"
    "                     (SIZE: bytes, or with K, M, G, T, Ki, Mi, Gi, Ti: 4GiB, 1.5G)\n"
    "                     [--max-num-seqs N] [--max-num-batched-tokens N] [--max-queued-requests "
    "N]\n"
    "                     [--enable-prefix-caching | --no-enable-prefix-caching] [--cuda-graphs]\n"
    "                     [--num-speculative-tokens N (0..16) [--speculative-method ngram|draft]\n"
    "                      [--prompt-lookup-max 4] [--prompt-lookup-min 2]\n"
    "                      [--speculative-disable-by-batch-size N]\n"
    "                      [--speculative-acceptance exact|rejection]]\n"
    "                     [--tls-cert F --tls-key F [--tls-client-ca F]] [--api-key-file F]\n"
    "                     [--drain-timeout S] [--max-concurrent-streams N]\n"
    "                     [--engine-nice 10] [--sample-threads N (0: auto)]\n"
    "                     [--attention dense|sink-window|delta|block-sparse]\n"
    "                     [--attn-sinks 4] [--attn-window 64] [--delta-gamma 64] [--attn-top-k 8]\n"
    "                     [--decode-top-k N (Quest at decode; 0: dense)]\n"
    "                     [--draft-model PATH] [--prefill full|speculative] [--keep-ratio 0.2]\n"
    "                     [--look-ahead 8] [--spec-chunk 32]\n"
    "                     [--chat-template " SRV_CHAT_NAMES_USAGE "|FILE]\n"
    "                     [--metrics-port N [--metrics-host H (default: --host)]]\n";

static int
parse_opts(int argc, char **argv, srv_opts_t *o)
{
    const char *C = "serve";
    *o = (srv_opts_t){.host = "127.0.0.1",
                      .port = 50051,
                      .device = "cpu",
                      .block_size = 16,
                      .max_num_seqs = 256,
                      .max_batched = 2048,
                      .max_queued = 1024,
                      .drain_timeout_s = 30,
                      .max_streams = 1024,
                      .engine_nice = 10,
                      .kv = SRV_KV_DEFAULT,
                      .prefix_caching = true,
                      .attn = SRV_ATTN_DEFAULT};
    enum {
        O_MODEL = 256,
        O_HOST,
        O_PORT,
        O_DEVICE,
        O_THREADS,
        O_MAXLEN,
        O_BLOCK,
        O_KVMEM,
        O_NBLOCKS,
        O_SEQS,
        O_BATCHED,
        O_QUEUED,
        O_PFX,
        O_NOPFX,
        O_GRAPHS,
        O_CERT,
        O_KEY,
        O_CA,
        O_APIKEY,
        O_DRAIN,
        O_STREAMS,
        O_NICE,
        O_SAMPLETH,
        O_DRAFT,
        O_METRICS_PORT,
        O_METRICS_HOST,
        O_CHAT,
        O_HELP,
    };
    static const struct option lo[] = {
        {"model", 1, 0, O_MODEL},
        {"host", 1, 0, O_HOST},
        {"port", 1, 0, O_PORT},
        {"device", 1, 0, O_DEVICE},
        {"threads", 1, 0, O_THREADS},
        {"max-model-len", 1, 0, O_MAXLEN},
        {"block-size", 1, 0, O_BLOCK},
        {"kv-cache-memory", 1, 0, O_KVMEM},
        {"num-kv-blocks", 1, 0, O_NBLOCKS},
        {"max-num-seqs", 1, 0, O_SEQS},
        {"max-num-batched-tokens", 1, 0, O_BATCHED},
        {"max-queued-requests", 1, 0, O_QUEUED},
        {"enable-prefix-caching", 0, 0, O_PFX},
        {"no-enable-prefix-caching", 0, 0, O_NOPFX},
        {"cuda-graphs", 0, 0, O_GRAPHS},
        {"tls-cert", 1, 0, O_CERT},
        {"tls-key", 1, 0, O_KEY},
        {"tls-client-ca", 1, 0, O_CA},
        {"api-key-file", 1, 0, O_APIKEY},
        {"drain-timeout", 1, 0, O_DRAIN},
        {"max-concurrent-streams", 1, 0, O_STREAMS},
        {"engine-nice", 1, 0, O_NICE},
        {"sample-threads", 1, 0, O_SAMPLETH},
        {"draft-model", 1, 0, O_DRAFT},
        {"metrics-port", 1, 0, O_METRICS_PORT},
        {"metrics-host", 1, 0, O_METRICS_HOST},
        {"chat-template", 1, 0, O_CHAT},
        SRV_PREFILL_LONGOPTS,
        SRV_KV_LONGOPTS,
        SRV_SPECDEC_LONGOPTS,
        {"help", 0, 0, O_HELP},
        SRV_ATTN_LONGOPTS,
        {0, 0, 0, 0},
    };
    optind = 1;
    int ch, rc = 0;
    while (rc == 0 && (ch = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (ch) {
        case O_MODEL:
            o->model = optarg;
            break;
        case O_HOST:
            o->host = optarg;
            break;
        case O_PORT:
            rc = srv_parse_u32(C, "--port", optarg, 0, 65535, &o->port);
            break;
        case O_DEVICE:
            o->device = optarg;
            break;
        case O_THREADS:
            rc = srv_parse_u32(C, "--threads", optarg, 0, 1024, &o->threads);
            break;
        case O_MAXLEN:
            rc = srv_parse_u32(C, "--max-model-len", optarg, 2, 1u << 24, &o->max_model_len);
            break;
        case O_BLOCK:
            rc = srv_parse_block_size(C, optarg, &o->block_size);
            break;
        case O_KVMEM:
            rc = srv_parse_bytes(C, "--kv-cache-memory", optarg, &o->kv_memory);
            break;
        case O_NBLOCKS:
            rc = srv_parse_u32(C, "--num-kv-blocks", optarg, 1, 1u << 30, &o->num_blocks);
            break;
        case O_SEQS:
            rc = srv_parse_u32(C, "--max-num-seqs", optarg, 1, 65536, &o->max_num_seqs);
            break;
        case O_BATCHED:
            rc = srv_parse_u32(C, "--max-num-batched-tokens", optarg, 1, 1u << 20, &o->max_batched);
            break;
        case O_QUEUED:
            rc = srv_parse_u32(C, "--max-queued-requests", optarg, 0, 1u << 20, &o->max_queued);
            break;
        case O_PFX:
            o->prefix_caching = true;
            break;
        case O_NOPFX:
            o->prefix_caching = false;
            break;
        case O_GRAPHS:
            o->cuda_graphs = true;
            break;
        case O_CERT:
            o->tls_cert = optarg;
            break;
        case O_KEY:
            o->tls_key = optarg;
            break;
        case O_CA:
            o->tls_ca = optarg;
            break;
        case O_APIKEY:
            o->api_key_file = optarg;
            break;
        case O_DRAIN:
            rc = srv_parse_u32(C, "--drain-timeout", optarg, 0, 86400, &o->drain_timeout_s);
            break;
        case O_STREAMS:
            rc = srv_parse_u32(C, "--max-concurrent-streams", optarg, 1, 1u << 20, &o->max_streams);
            break;
        case O_NICE:
            rc = srv_parse_u32(C, "--engine-nice", optarg, 0, 19, &o->engine_nice);
            break;
        case O_SAMPLETH:
            rc = srv_parse_u32(C, "--sample-threads", optarg, 0, SCHED_MAX_SAMPLE_THREADS,
                               &o->sample_threads);
            break;
        case O_DRAFT:
            o->draft = optarg;
            break;
        case O_METRICS_PORT:
            rc = srv_parse_u32(C, "--metrics-port", optarg, 0, 65535, &o->metrics_port);
            o->metrics_on = true;
            break;
        case O_METRICS_HOST:
            o->metrics_host = optarg;
            break;
        case O_CHAT:
            o->chat_template = optarg;
            break;
        case O_HELP:
            fputs(usage, stdout);
            return 1;
        default:
            if ((rc = srv_attn_opt(C, ch, optarg, &o->attn)) == 1 &&
                (rc = srv_prefill_opt(C, ch, optarg, &o->spec)) == 1 &&
                (rc = srv_kv_opt(C, ch, optarg, &o->kv)) == 1 &&
                (rc = srv_specdec_opt(C, ch, optarg, &o->specdec)) == 1) {
                fputs(usage, stderr);
                return KVS_EINVAL;
            }
        }
    }
    if (rc == 0 && srv_attn_finish(C, &o->attn))
        rc = KVS_EINVAL;
    if (rc == 0 && srv_prefill_finish(C, &o->spec, o->draft != NULL))
        rc = KVS_EINVAL;
    if (rc == 0 && srv_kv_finish(C, &o->kv, o->block_size))
        rc = KVS_EINVAL;
    if (rc == 0 && srv_specdec_finish(C, &o->specdec, o->draft != NULL))
        rc = KVS_EINVAL;
    if (rc == 0 && o->cuda_graphs && strcmp(o->device, "cuda") != 0) {
        fprintf(stderr, "kvserve serve: --cuda-graphs needs --device cuda\n");
        rc = KVS_EINVAL;
    }
    if (rc)
        return rc;
    if (optind < argc) {
        fprintf(stderr, "kvserve serve: unexpected argument '%s'\n%s", argv[optind], usage);
        return KVS_EINVAL;
    }
    if (!o->tls_cert != !o->tls_key) {
        fprintf(stderr, "kvserve serve: --tls-cert and --tls-key go together\n");
        return KVS_EINVAL;
    }
    if (o->tls_ca && !o->tls_cert) {
        fprintf(stderr, "kvserve serve: --tls-client-ca needs --tls-cert and --tls-key\n");
        return KVS_EINVAL;
    }
    if (o->model == NULL && (o->model = srv_default_model()) == NULL) {
        fprintf(stderr, "kvserve serve: no --model given and no bundled model found\n");
        return KVS_EINVAL;
    }
    return 0;
}

static grpc_server_credentials *
make_creds(const srv_opts_t *o)
{
    if (!o->tls_cert)
        return grpc_insecure_server_credentials_create();
    char *cert = srv_read_file(o->tls_cert, NULL), *key = srv_read_file(o->tls_key, NULL);
    char *ca = o->tls_ca ? srv_read_file(o->tls_ca, NULL) : NULL;
    grpc_server_credentials *cr = NULL;
    if (!cert || !key || (o->tls_ca && !ca)) {
        fprintf(stderr, "kvserve serve: cannot read %s\n",
                !cert  ? o->tls_cert
                : !key ? o->tls_key
                       : o->tls_ca);
    } else {
        grpc_ssl_pem_key_cert_pair pair = {key, cert}; /* private key first */
        cr = grpc_ssl_server_credentials_create_ex(
            ca, &pair, 1,
            ca ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
               : GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE,
            NULL);
    }
    if (key)
        memset(key, 0, strlen(key));
    free(cert);
    free(key);
    free(ca);
    return cr;
}

/* A special token's text as the vocabulary spells it ("<s>"), for the
 * chat template, which writes BOS and EOS as text. */
static void
token_text(int32_t id, char *buf, size_t cap)
{
    model_gguf_str_t s;
    buf[0] = '\0';
    if (id >= 0 &&
        model_gguf_arr_str(model_gguf(S.m), "tokenizer.ggml.tokens", (uint64_t)id, &s) == 0)
        snprintf(buf, cap, "%.*s", (int)s.len, s.ptr);
}

/* --chat-template: a family by name, or a file holding a Jinja template
 * of a family kvserve renders; refused at start rather than at every chat
 * request.  0, or KVS_EINVAL after saying why. */
static int
chat_override(const char *arg)
{
    const char *named = srv_chat_builtin(arg);
    S.chat_override = named ? strdup(named) : srv_read_file(arg, NULL);
    if (S.chat_override == NULL) {
        fprintf(stderr,
                "kvserve serve: --chat-template: '%s' is neither a template name (%s) nor a "
                "readable file\n",
                arg, SRV_CHAT_NAMES);
        return KVS_EINVAL;
    }
    srv_chat_t c;
    char err[256];
    int rc = srv_chat_detect(S.chat_override, "", "", &c, err, sizeof err);
    srv_chat_free(&c);
    if (rc) {
        fprintf(stderr,
                "kvserve serve: --chat-template: '%s' is not a template kvserve can render "
                "(Llama 3, Llama 2, Mistral or ChatML)\n",
                arg);
        return KVS_EINVAL;
    }
    return 0;
}

static void
chat_up(void)
{
    model_gguf_str_t t; /* the reader's copy ends with a NUL */
    char bos[64], eos[64];
    const char *tmpl = S.chat_override;
    if (tmpl == NULL && model_gguf_get_str(model_gguf(S.m), "tokenizer.chat_template", &t) == 0)
        tmpl = t.ptr;
    token_text(model_token_bos(S.m), bos, sizeof bos);
    token_text(model_token_eos(S.m), eos, sizeof eos);
    S.have_chat = srv_chat_detect(tmpl, bos, eos, &S.chat, S.chat_err, sizeof S.chat_err) == 0;
    if (!S.have_chat && tmpl)
        KVS_WARNF("serve: chat requests will be refused: %s", S.chat_err);
}

static const char *
chat_name(void)
{
    static const char *const names[] = {"", "llama3", "llama3.1", "llama2", "mistral", "chatml"};
    return S.have_chat ? names[S.chat.kind] : "";
}

static int
engine_up(const srv_opts_t *o)
{
    char err[512] = "";
    /* The engine's threads yield to the network threads (nice), so a token
     * is written when it exists, not when the next step lets go of the
     * cores. */
    uint32_t threads = o->threads;
    if (threads == 0) {
        /* One core stays with the network threads: with every core
         * computing, a token waited milliseconds for a core to be written
         * (bench/RESULTS.md, gRPC). */
        uint32_t n = kvs_cpu_count();
        threads = n > 2 ? n - 1 : 1;
    }
    kern_backend_cfg_t bc = {.n_threads = threads, .nice = (int)o->engine_nice};
    int rc = kern_backend_new(o->device, &bc, &S.be);
    if (rc) {
        fprintf(stderr, "kvserve serve: --device %s: %s\n", o->device, kvs_strerror(rc));
        return rc;
    }
    if ((rc = model_load(o->model, S.be, &S.m, err, sizeof err))) {
        fprintf(stderr, "kvserve serve: %s: %s\n", o->model, err[0] ? err : kvs_strerror(rc));
        return rc;
    }
    if (o->draft && (rc = srv_load_draft("serve", o->draft, S.m, &S.draft)))
        return rc;
    const model_hparams_t *hp = model_hparams(S.m);
    uint32_t max_len = o->max_model_len ? o->max_model_len : hp->n_ctx_train;
    sched_cfg_t sc = {.max_num_seqs = o->max_num_seqs,
                      .max_num_batched_tokens = o->max_batched,
                      .max_model_len = max_len,
                      .block_tokens = o->block_size,
                      .n_blocks = o->num_blocks,
                      .kv_cache_bytes = o->kv_memory,
                      .prefix_caching = o->prefix_caching,
                      .cuda_graphs = o->cuda_graphs,
                      .reserve_summaries = srv_attn_summaries(&o->attn),
                      .thread_nice = (int)o->engine_nice,
                      .sample_threads = o->sample_threads,
                      .draft = S.draft,
                      .wake = engine_wake,
                      .wake_arg = NULL};
    srv_kv_apply(&o->kv, &sc);
    srv_specdec_apply(&o->specdec, &sc);
    if (sc.n_blocks == 0 && sc.kv_cache_bytes == 0) {
        /* Enough for every sequence at full length, capped at 1 GiB. */
        uint64_t per = (uint64_t)model_kv_bytes_per_token(S.m, o->kv.dtype) * hp->n_layer;
        uint64_t want = per * max_len * (o->max_num_seqs < 8 ? o->max_num_seqs : 8);
        sc.kv_cache_bytes = want < (1ull << 30) ? want : (1ull << 30);
    }
    if ((rc = sched_new(S.m, &sc, &S.sched))) {
        if (rc == KVS_ENOTSUP)
            fprintf(stderr, "kvserve serve: --kv-cache-dtype %s: not supported with --device %s\n",
                    srv_kv_name(&o->kv), o->device);
        else
            fprintf(stderr, "kvserve serve: engine setup failed: %s\n", kvs_strerror(rc));
        return rc;
    }
    if ((rc = sched_check_policy(S.sched, &o->attn, &o->spec, &o->kv.policy)) != 0) {
        /* Every request would be refused. */
        char pol[96];
        fprintf(stderr, "kvserve serve: --attention %s with --prefill %s: %s with --device %s\n",
                srv_attn_describe(&o->attn, pol, sizeof pol), o->spec.on ? "speculative" : "full",
                kvs_strerror(rc), o->device);
        return rc;
    }
    S.lim = (srv_limits_t){.m = S.m,
                           .n_vocab = hp->n_vocab,
                           .max_model_len = max_len,
                           .attn_default = o->attn,
                           .spec_default = o->spec,
                           .kv_default = o->kv.policy,
                           .have_draft = S.draft != NULL,
                           .prefix_caching = sched_get_cfg(S.sched)->prefix_caching,
                           .block_tokens = sched_get_cfg(S.sched)->block_tokens};
    chat_up();
    S.lim.chat = S.have_chat ? &S.chat : NULL;
    S.lim.chat_err = S.chat_err;
    return sched_thread_start(S.sched);
}

/* Before grpc_up, so the "metrics on" line precedes "listening on" and a
 * supervisor that waits for the latter knows both ports. */
static int
metrics_up(const srv_opts_t *o)
{
    if (!o->metrics_on)
        return 0;
    const char *host = o->metrics_host ? o->metrics_host : o->host;
    uint32_t port = 0;
    int rc = srv_metrics_start(host, o->metrics_port, S.sched, &S.metrics, &port);
    if (rc) {
        fprintf(stderr, "kvserve serve: cannot serve metrics on %s:%u (%s)\n", host,
                o->metrics_port, rc == KVS_EINVAL ? "unknown host" : "in use, or not local");
        return rc;
    }
    printf(strchr(host, ':') ? "kvserve: metrics on [%s]:%u\n" : "kvserve: metrics on %s:%u\n",
           host, port);
    fflush(stdout);
    return 0;
}

static int
grpc_up(const srv_opts_t *o)
{
    const sched_cfg_t *sc = sched_get_cfg(S.sched);
    /* The largest valid request: every token id (up to 5 bytes) or 64 text
     * bytes per token of the maximum length, plus stop strings. */
    uint64_t max_recv = (uint64_t)sc->max_model_len * 64 + (64u << 10);
    if (max_recv > INT32_MAX)
        max_recv = INT32_MAX;
    grpc_arg args[3];
    memset(args, 0, sizeof args);
    args[0].type = GRPC_ARG_INTEGER;
    args[0].key = GRPC_ARG_ALLOW_REUSEPORT; /* a busy port must fail loudly */
    args[0].value.integer = 0;
    args[1].type = GRPC_ARG_INTEGER;
    args[1].key = GRPC_ARG_MAX_RECEIVE_MESSAGE_LENGTH;
    args[1].value.integer = (int)max_recv;
    args[2].type = GRPC_ARG_INTEGER;
    args[2].key = GRPC_ARG_MAX_CONCURRENT_STREAMS;
    args[2].value.integer = (int)o->max_streams;
    grpc_channel_args chargs = {3, args};
    S.cq = grpc_completion_queue_create_for_next(NULL);
    S.server = grpc_server_create(&chargs, NULL);
    grpc_server_register_completion_queue(S.server, S.cq, NULL);
    for (int i = 0; i < M_COUNT; i++)
        S.methods[i] = grpc_server_register_method(S.server, method_path[i], NULL,
                                                   GRPC_SRM_PAYLOAD_READ_INITIAL_BYTE_BUFFER, 0);
    grpc_server_credentials *cr = make_creds(o);
    if (cr == NULL)
        return KVS_EINVAL;
    char addr[300];
    snprintf(addr, sizeof addr, strchr(o->host, ':') ? "[%s]:%u" : "%s:%u", o->host, o->port);
    int port = grpc_server_add_http2_port(S.server, addr, cr);
    grpc_server_credentials_release(cr);
    if (port == 0) {
        fprintf(stderr, "kvserve serve: cannot listen on %s (in use, or not a local address)\n",
                addr);
        return KVS_EIO;
    }
    grpc_server_start(S.server);
    S.t_shutdown = (tag_t){T_SHUTDOWN, NULL};
    for (int m = 0; m <= M_UNKNOWN; m++)
        for (int k = 0; k < (m == M_GENERATE ? SLOTS_GENERATE : SLOTS_OTHER); k++)
            post_slot((method_t)m);
    printf("kvserve: listening on %s:%d\n", o->host, port);
    fflush(stdout);
    KVS_INFOF("serve: %s on %s:%d (%s, %u KV blocks of %u tokens, max model len %u%s%s)", o->model,
              o->host, port, kern_backend_name(S.be), sc->n_blocks, sc->block_tokens,
              sc->max_model_len, o->tls_cert ? ", TLS" : "", S.api_key ? ", API key" : "");
    return 0;
}

int
srv_cmd_serve(int argc, char **argv)
{
    memset(&S, 0, sizeof S);
    int rc = parse_opts(argc, argv, &S.o);
    if (rc)
        return rc == 1 ? 0 : 2;
    if (S.o.api_key_file) {
        S.api_key = srv_read_file(S.o.api_key_file, &S.api_key_len);
        while (S.api_key && S.api_key_len && strchr(" \t\r\n", S.api_key[S.api_key_len - 1]))
            S.api_key[--S.api_key_len] = '\0';
        if (S.api_key == NULL || S.api_key_len == 0) {
            fprintf(stderr, "kvserve serve: --api-key-file: cannot read a key from '%s'\n",
                    S.o.api_key_file);
            free(S.api_key);
            return 2;
        }
    }
    if (S.o.chat_template && chat_override(S.o.chat_template)) {
        free(S.api_key);
        free(S.chat_override);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    S.exit_code = 1;
    S.n_slots = S.o.max_num_seqs + S.o.max_queued;
    if (S.n_slots > MAX_LIVE_DEFAULT * 64)
        S.n_slots = MAX_LIVE_DEFAULT * 64;
    S.slots = calloc(S.n_slots, sizeof *S.slots);
    S.slot_gen = calloc(S.n_slots, sizeof *S.slot_gen);
    S.loop = uv_default_loop();
    uv_mutex_init(&S.mu);
    uv_async_init(S.loop, &S.cq_async, on_cq);
    uv_async_init(S.loop, &S.eng_async, on_engine);
    uv_signal_init(S.loop, &S.sig_term);
    uv_signal_init(S.loop, &S.sig_int);
    uv_timer_init(S.loop, &S.drain_timer);
    grpc_init();
    /* Until the loop's watchers take over, a signal ends the process: as
     * PID 1 in a container, one without a handler would be ignored, and a
     * long model load would wait out the grace period. */
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = die_on_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    bool up = S.slots && S.slot_gen && engine_up(&S.o) == 0 && metrics_up(&S.o) == 0;
    if (up) {
        /* Caught before "listening on" is printed: a supervisor may signal
         * as soon as it reads the line. */
        uv_signal_start(&S.sig_term, on_signal, SIGTERM);
        uv_signal_start(&S.sig_int, on_signal, SIGINT);
        up = grpc_up(&S.o) == 0;
    }
    if (up) {
        uv_thread_create(&S.cq_thread, cq_main, NULL);
        uv_run(S.loop, UV_RUN_DEFAULT);
        S.exit_code = 0;
    } else {
        if (S.server) {
            grpc_server_shutdown_and_notify(S.server, S.cq, &S.t_shutdown);
            grpc_server_cancel_all_calls(S.server);
            grpc_completion_queue_shutdown(S.cq);
            for (;;) {
                grpc_event ev =
                    grpc_completion_queue_next(S.cq, gpr_inf_future(GPR_CLOCK_REALTIME), NULL);
                if (ev.type == GRPC_QUEUE_SHUTDOWN)
                    break;
                if (ev.type == GRPC_OP_COMPLETE && ev.tag != &S.t_shutdown)
                    call_free(((tag_t *)ev.tag)->owner);
            }
        }
        uv_close((uv_handle_t *)&S.cq_async, NULL);
        uv_close((uv_handle_t *)&S.eng_async, NULL);
        /* Nothing to drain: a signal may end it, and the loop below ends. */
        uv_signal_stop(&S.sig_term);
        uv_signal_stop(&S.sig_int);
    }
    uv_close((uv_handle_t *)&S.drain_timer, NULL);
    uv_run(S.loop, UV_RUN_DEFAULT);
    /* Before the engine goes: a scrape reads its load. */
    srv_metrics_free(S.metrics);
    if (S.sched && !S.engine_stopped)
        sched_thread_stop(S.sched);
    if (S.server)
        grpc_server_destroy(S.server);
    if (S.cq)
        grpc_completion_queue_destroy(S.cq);
    grpc_shutdown_blocking();
    /* Closing the watchers puts back the default action (death by the
     * signal, not exit 0): from here on, more signals change nothing. */
    uv_close((uv_handle_t *)&S.sig_term, NULL);
    uv_close((uv_handle_t *)&S.sig_int, NULL);
    signal(SIGTERM, SIG_IGN);
    signal(SIGINT, SIG_IGN);
    uv_run(S.loop, UV_RUN_DEFAULT);
    uv_loop_close(S.loop);
    uv_mutex_destroy(&S.mu);
    free(S.q);
    sched_free(S.sched);
    model_free(S.draft);
    model_free(S.m);
    kern_backend_free(S.be);
    free(S.slots);
    free(S.slot_gen);
    free(S.api_key);
    srv_chat_free(&S.chat);
    free(S.chat_override);
    if (S.exit_code == 0)
        KVS_INFOF("serve: stopped");
    return S.exit_code;
}
