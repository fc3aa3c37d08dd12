/*
 * serve/srv_req.h — validation of Generate, Tokenize and Abort requests
 * (srv_req.c), shared by the gRPC server and the request fuzzer.
 */
#ifndef SRV_REQ_H
#define SRV_REQ_H

#include "srv_int.h"

#include "sched/sched.h"
#include "srv_chat.h"

typedef struct srv_limits {
    const model_t *m;
    uint32_t n_vocab;
    uint32_t max_model_len;
    uint64_t seed_fallback;           /* seed when the request has none; unique per request */
    const srv_chat_t *chat;           /* the model's template family, or NULL */
    const char *chat_err;             /* why chat is refused when chat is NULL */
    model_attn_policy_t attn_default; /* --attention and its flags */
    model_spec_policy_t spec_default; /* --prefill and its flags */
    sched_kv_policy_t kv_default;     /* --kv-policy and its flags */
    bool have_draft;                  /* --draft-model loaded */
    bool prefix_caching;              /* --enable-prefix-caching */
    uint32_t block_tokens;            /* KV block size (eviction drops whole blocks) */
} srv_limits_t;

typedef struct srv_gen_req {
    char request_id[129]; /* "" when the client gave none */
    int32_t *prompt;      /* malloc'd */
    uint32_t n_prompt;
    /* Ready to submit, id aside; its forced tokens and min_tokens bans
     * borrowed from the unpacked message (ids below n_vocab, so their
     * uint32 arrays read as int32; sched_submit copies them). */
    sched_request_t sr;
    /* Borrowed from the unpacked message: */
    const char *const *stop;
    size_t n_stop;
    const uint32_t *stop_ids;
    size_t n_stop_ids;
    bool include_stop; /* include_stop_str_in_output */
    /* sampling.logit_bias as sr.sampling's arrays (malloc'd). */
    int32_t *bias_ids;
    float *bias;
    /* sampling.guided_regex, guided_json or guided_grammar compiled; sr.guide
     * points here. */
    model_guide_t *guide;
} srv_gen_req_t;

/* Checks every field of q against the model and limits; on success fills
 * out (free with srv_gen_req_free) and returns GRPC_STATUS_OK, otherwise
 * INVALID_ARGUMENT or OUT_OF_RANGE with msg naming the field. */
grpc_status_code srv_gen_parse(const Kvserve__V1__GenerateRequest *q, const srv_limits_t *lim,
                               srv_gen_req_t *out, char *msg, size_t cap);
void srv_gen_req_free(srv_gen_req_t *r);
/* Tokenize: q's text (unset: the empty text) as ids in *ids (malloc'd,
 * *n of them), BOS/EOS as the model wants unless add_bos says otherwise,
 * special-token text parsed when asked; or q's chat rendered as Generate
 * renders it.  GRPC_STATUS_OK, or INVALID_ARGUMENT / OUT_OF_RANGE /
 * RESOURCE_EXHAUSTED with msg saying why. */
grpc_status_code srv_tokenize_parse(const Kvserve__V1__TokenizeRequest *q, const srv_limits_t *lim,
                                    int32_t **ids, size_t *n, char *msg, size_t cap);
/* Abort: the request id to cancel, or INVALID_ARGUMENT when there is none
 * (protobuf-c leaves an unset string NULL). */
grpc_status_code srv_abort_parse(const Kvserve__V1__AbortRequest *q, const char **id, char *msg,
                                 size_t cap);

#endif /* SRV_REQ_H */
