/*
 * serve/srv_int.h — declarations shared by the files of serve/ only.
 */
#ifndef SRV_INT_H
#define SRV_INT_H

#include "srv.h"

#include "grpc/health/v1/health.pb-c.h"
#include "kvserve/v1/kvserve.pb-c.h"

#include <grpc/grpc.h>

/* grpc_status_code's names, "OK" .. "UNAUTHENTICATED" (srv_client.c); one
 * past the last code reads "UNKNOWN". */
enum { SRV_GRPC_CODES = 17 };
const char *srv_grpc_status_name(grpc_status_code s);
/* Where a client command connects: --addr, --timeout-ms, --tls-ca and
 * --tls-server-name, as long options 'a', 'T', 'C' and 'N' (the entries of
 * SRV_CONN_LONGOPTS).  srv_conn_opt takes one (1 when c is none of them,
 * KVS_EINVAL after saying why); srv_conn_check, after the options, refuses
 * a stray argument, a missing --addr and a server name without a CA
 * (KVS_EINVAL after the usage). */
typedef struct srv_conn_opts {
    const char *addr, *tls_ca, *tls_name;
    uint32_t timeout_ms;
} srv_conn_opts_t;
#define SRV_CONN_LONGOPTS                                                  \
    {"addr", 1, 0, 'a'}, {"timeout-ms", 1, 0, 'T'}, {"tls-ca", 1, 0, 'C'}, \
    {                                                                      \
        "tls-server-name", 1, 0, 'N'                                       \
    }
int srv_conn_opt(const char *cmd, int c, srv_conn_opts_t *o);
int srv_conn_check(const char *cmd, const srv_conn_opts_t *o, int argc, char **argv,
                   const char *usage);
/* The files a client command's --tls-ca and --api-key-file name: *ca (or
 * NULL) and *bearer ("Bearer KEY", or NULL), both to free().  0, or
 * KVS_EINVAL after saying why (unreadable, an empty key). */
int srv_client_creds(const char *cmd, const char *ca_path, const char *key_path, char **ca,
                     char **bearer);
/* A channel to addr: TLS with ca_pem (tls_name overriding the name the
 * certificate must carry) when given, else plaintext.  After grpc_init. */
grpc_channel *srv_client_channel(const char *addr, const char *ca_pem, const char *tls_name);
/* A call deadline ms milliseconds from now (fractions to the microsecond);
 * 0: none. */
gpr_timespec srv_deadline_ms(double ms);
/* The ops of a call's first batch: md and req out, half-close, the
 * server's initial metadata into init_md.  Fills ops[0..3], returns 4. */
size_t srv_call_send_ops(grpc_op *ops, const grpc_metadata *md, size_t n_md, grpc_byte_buffer *req,
                         grpc_metadata_array *init_md);
/* The one op of a call's status batch: RECV_STATUS_ON_CLIENT into these. */
void srv_call_status_op(grpc_op *op, grpc_metadata_array *trail_md, grpc_status_code *status,
                        grpc_slice *details);
/* Starts one batch.  A rejected batch can leave its slot busy (guide §6),
 * so the call is then cancelled rather than retried (the batches already
 * out end it); returns grpc_call_start_batch's answer. */
grpc_call_error srv_call_start(grpc_call *call, const grpc_op *ops, size_t n, void *tag);
/* One unary call on ch (timeout_ms 0: none), on a completion queue of its
 * own: the answer parsed as resp_desc (free with
 * protobuf_c_message_free_unpacked), or NULL after printing "who: why"
 * (a status other than OK, an unparsable answer). */
ProtobufCMessage *srv_client_unary(grpc_channel *ch, const char *method, const grpc_metadata *md,
                                   size_t n_md, uint32_t timeout_ms, const ProtobufCMessage *req,
                                   const ProtobufCMessageDescriptor *resp_desc, const char *who);

/* splitmix64: every random choice of eval and bench reproducible from a
 * seed alone. */
static inline uint64_t
srv_rng_next(uint64_t *s)
{
    return kvs_mix64(*s += 0x9e3779b97f4a7c15ull);
}

/* An integer in [0, n): the next draw modulo n. */
static inline uint32_t
srv_rng_below(uint64_t *s, uint32_t n)
{
    return (uint32_t)(srv_rng_next(s) % n);
}

typedef enum srv_task {
    SRV_TASK_PASSKEY,
    SRV_TASK_NIAH_MULTIKEY,
    SRV_TASK_VT,
    SRV_TASK_COUNT,
} srv_task_t;

/* Builds one task prompt of exactly `length` bytes including the answer
 * (the model adds BOS), with the needle at relative depth 0..1; `seed`
 * picks keys and values.  *prompt is malloc'd; answer gets " 12345".
 * Returns 0, KVS_ERANGE (length too small for the needles) or KVS_ENOMEM. */
int srv_task_make(srv_task_t task, uint32_t length, double depth, uint64_t seed, char **prompt,
                  char answer[8]);
/* A shared context and the questions asked about it (SCBench's multi-turn
 * and multi-request modes, algorithms.md section 4.3): the task's haystack
 * with one question per needle, each worded and answered exactly as the
 * single-question task (" 12345"), in a fixed order drawn from `seed`.
 * The context plus every question and answer is `length` bytes, so a
 * conversation asking them all in turn fits where a single prompt of
 * that length does.  Its keys and values are the first n_questions
 * srv_task_make draws from the same seed.  Only SRV_TASK_NIAH_MULTIKEY (else KVS_EINVAL); returns
 * 0, KVS_ERANGE or KVS_ENOMEM.  Free with srv_doc_free. */
enum { SRV_DOC_MAX_QUESTIONS = 4, SRV_DOC_QUESTION_MAX = 160 };
typedef struct srv_doc {
    char *context; /* malloc'd */
    uint32_t n_questions;
    char question[SRV_DOC_MAX_QUESTIONS][SRV_DOC_QUESTION_MAX];
    char answer[SRV_DOC_MAX_QUESTIONS][8];
} srv_doc_t;
int srv_task_make_doc(srv_task_t task, uint32_t length, double depth, uint64_t seed,
                      srv_doc_t *doc);
void srv_doc_free(srv_doc_t *doc);
/* A task sized in a model's tokens rather than bytes.  count says how many
 * tokens the model makes of a text (BOS not counted).  srv_task_fit and
 * srv_task_fit_doc search the byte length at which the whole text (prompt
 * and answer; context and every question and answer) comes to `tokens`
 * tokens, or to the most below it that any byte length tried gives (one
 * byte more can add two tokens); each try is the byte-sized task at that
 * length with the same seed.  *hint: the byte length to try first (0:
 * `tokens`), set to the one chosen, so that the next sample of a length
 * starts next to its answer; a byte-level vocabulary needs one try.
 * Returns 0, KVS_ERANGE (the needles alone exceed `tokens`), KVS_ENOMEM or
 * count's error. */
typedef struct srv_counter {
    int (*count)(void *ctx, const char *text, size_t len, size_t *n);
    void *ctx;
} srv_counter_t;
int srv_task_fit(srv_task_t task, uint32_t tokens, double depth, uint64_t seed,
                 const srv_counter_t *c, uint32_t *hint, char **prompt, char answer[8]);
int srv_task_fit_doc(srv_task_t task, uint32_t tokens, double depth, uint64_t seed,
                     const srv_counter_t *c, uint32_t *hint, srv_doc_t *doc);
const char *srv_task_name(srv_task_t t);
int srv_task_parse(const char *s, srv_task_t *out);

/* ---- protobuf-c <-> gRPC byte buffers (srv_pb.c) --------------------------- */

/* A new byte buffer holding msg packed; the caller destroys it. */
grpc_byte_buffer *srv_pb_to_bb(const ProtobufCMessage *msg);
/* The message in bb (NULL bb, unreadable or malformed bytes: NULL); free
 * with protobuf_c_message_free_unpacked(m, NULL).  With `why` (requests),
 * also NULL when a string field holds a NUL byte, which protobuf-c's
 * char * would silently cut; why then gets the reason, naming the field. */
ProtobufCMessage *srv_bb_to_pb(grpc_byte_buffer *bb, const ProtobufCMessageDescriptor *d, char *why,
                               size_t cap);
/* Whether a string field of the message of type d encoded in buf, its
 * nested messages' included, holds a NUL byte; path gets the field's
 * dotted name ("sampling.stop"), or "" when none does. */
bool srv_pb_nul_field(const ProtobufCMessageDescriptor *d, const uint8_t *buf, size_t len,
                      char *path, size_t cap);

/* Full method paths, "/package.Service/Method". */
#define SRV_M_GENERATE "/kvserve.v1.Generation/Generate"
#define SRV_M_TOKENIZE "/kvserve.v1.Generation/Tokenize"
#define SRV_M_MODEL_INFO "/kvserve.v1.Generation/GetModelInfo"
#define SRV_M_SERVER_INFO "/kvserve.v1.Control/GetServerInfo"
#define SRV_M_LOAD "/kvserve.v1.Control/GetLoad"
#define SRV_M_ABORT "/kvserve.v1.Control/Abort"
#define SRV_M_HEALTH_CHECK "/grpc.health.v1.Health/Check"
#define SRV_M_HEALTH_WATCH "/grpc.health.v1.Health/Watch"

#endif /* SRV_INT_H */
