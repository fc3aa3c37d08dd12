/*
 * serve/srv_req.c — a GenerateRequest checked field by field and turned into
 * an engine request.  Called by the gRPC server (srv_grpc.c) for every
 * Generate call and by the request fuzzer (tests/fuzz/fuzz_request.c).
 *
 * Every refusal names the field, so a client in any language can tell what
 * to fix; policies this build cannot honour are refused, never ignored.
 */
#include "srv_req.h"
#include "srv_schema.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_ID_BYTES 128
#define MAX_GUIDE_BYTES 65536 /* guided_regex, _json, _whitespace_pattern, _grammar */
#define MAX_SALT_BYTES 256
#define MAX_STOPS 16
#define MAX_STOP_BYTES 256
#define MAX_STOP_IDS SCHED_MAX_MIN_BAN /* min_tokens bans them all */
#define DEFAULT_MAX_TOKENS 256

static grpc_status_code
fail(char *msg, size_t cap, grpc_status_code code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, cap, fmt, ap);
    va_end(ap);
    return code;
}

static uint64_t
fnv1a(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++)
        h = (h ^ (uint8_t)s[i]) * 1099511628211ull;
    return h ? h : 1;
}

/* The request's attention policy over the server's default: an unset kind
 * keeps the default; unset parameters take the default's values. */
static grpc_status_code
check_attention(const Kvserve__V1__AttentionPolicy *a, const srv_limits_t *lim,
                model_attn_policy_t *out, char *msg, size_t cap)
{
    *out = lim->attn_default;
    if (a == NULL)
        return GRPC_STATUS_OK;
    switch (a->has_kind ? a->kind : KVSERVE__V1__ATTENTION_POLICY__KIND__KIND_UNSPECIFIED) {
    case KVSERVE__V1__ATTENTION_POLICY__KIND__KIND_UNSPECIFIED:
        break;
    case KVSERVE__V1__ATTENTION_POLICY__KIND__DENSE:
        out->kind = MODEL_ATTN_DENSE;
        break;
    case KVSERVE__V1__ATTENTION_POLICY__KIND__SINK_WINDOW:
        out->kind = MODEL_ATTN_SINK_WINDOW;
        break;
    case KVSERVE__V1__ATTENTION_POLICY__KIND__DELTA:
        out->kind = MODEL_ATTN_DELTA;
        break;
    case KVSERVE__V1__ATTENTION_POLICY__KIND__BLOCK_SPARSE:
        out->kind = MODEL_ATTN_BLOCK_SPARSE;
        break;
    default:
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "policy.attention.kind: %d is not supported by this build (supported: "
                    "DENSE, SINK_WINDOW, DELTA, BLOCK_SPARSE)",
                    (int)a->kind);
    }
    if (a->has_top_k_blocks && out->kind != MODEL_ATTN_BLOCK_SPARSE)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "policy.attention.top_k_blocks: only BLOCK_SPARSE uses it");
    if (a->has_top_k_blocks) {
        if (a->top_k_blocks == 0 || a->top_k_blocks > lim->max_model_len)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "policy.attention.top_k_blocks: %u is outside [1, %u]", a->top_k_blocks,
                        lim->max_model_len);
        out->top_k = a->top_k_blocks;
    }
    /* A server default built without --attn-top-k has no block count. */
    if (out->kind == MODEL_ATTN_BLOCK_SPARSE && out->top_k == 0)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "policy.attention.top_k_blocks: BLOCK_SPARSE needs top_k_blocks >= 1");
    bool sparse = out->kind != MODEL_ATTN_DENSE;
    if (!sparse && (a->has_sink_tokens || a->has_window_tokens || a->has_gamma))
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "policy.attention.%s: not used by DENSE attention",
                    a->has_sink_tokens     ? "sink_tokens"
                    : a->has_window_tokens ? "window_tokens"
                                           : "gamma");
    if (a->has_gamma && out->kind != MODEL_ATTN_DELTA)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "policy.attention.gamma: only DELTA uses it");
    if (a->has_sink_tokens) {
        if (a->sink_tokens > lim->max_model_len)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "policy.attention.sink_tokens: %u exceeds the maximum model length (%u)",
                        a->sink_tokens, lim->max_model_len);
        out->sinks = a->sink_tokens;
    }
    if (a->has_window_tokens) {
        if (a->window_tokens == 0 || a->window_tokens > lim->max_model_len)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "policy.attention.window_tokens: %u is outside [1, %u]", a->window_tokens,
                        lim->max_model_len);
        out->window = a->window_tokens;
    }
    if (a->has_gamma) {
        if (a->gamma == 0 || a->gamma > 65536)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "policy.attention.gamma: %u is outside [1, 65536]", a->gamma);
        out->gamma = a->gamma;
    }
    if (a->has_decode_top_k_blocks) {
        if (a->decode_top_k_blocks > lim->max_model_len)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "policy.attention.decode_top_k_blocks: %u is outside [0, %u]",
                        a->decode_top_k_blocks, lim->max_model_len);
        out->decode_top_k = a->decode_top_k_blocks;
    }
    /* What the server's default sets and the request's kind still takes
     * (model_attn_policy_check): a last dense row for SINK_WINDOW, and for
     * DELTA without its dense tail. */
    out->no_tail = out->kind == MODEL_ATTN_DELTA && out->no_tail;
    out->last_dense = out->last_dense && (out->kind == MODEL_ATTN_SINK_WINDOW || out->no_tail);
    return GRPC_STATUS_OK;
}

/* The prefill policy: the server's default (--prefill), overridden field
 * by field. */
static grpc_status_code
check_prefill(const Kvserve__V1__PrefillPolicy *f, const srv_limits_t *lim,
              model_spec_policy_t *out, char *msg, size_t cap)
{
    *out = lim->spec_default;
    if (f == NULL)
        return GRPC_STATUS_OK;
    if (f->has_kind) {
        switch (f->kind) {
        case KVSERVE__V1__PREFILL_POLICY__KIND__KIND_UNSPECIFIED:
            break;
        case KVSERVE__V1__PREFILL_POLICY__KIND__FULL:
            out->on = false;
            break;
        case KVSERVE__V1__PREFILL_POLICY__KIND__SPECULATIVE:
            if (!lim->have_draft)
                return fail(msg, cap, GRPC_STATUS_FAILED_PRECONDITION,
                            "policy.prefill.kind: SPECULATIVE needs a server started with "
                            "--draft-model");
            out->on = true;
            break;
        default:
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "policy.prefill.kind: %d is not a known kind", (int)f->kind);
        }
    }
    if (!out->on && (f->has_keep_ratio || f->has_chunk_tokens || f->has_look_ahead))
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "policy.prefill.%s: not used by FULL prefill",
                    f->has_keep_ratio     ? "keep_ratio"
                    : f->has_chunk_tokens ? "chunk_tokens"
                                          : "look_ahead");
    if (f->has_keep_ratio) {
        if (!(f->keep_ratio > 0.0f && f->keep_ratio <= 1.0f))
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "policy.prefill.keep_ratio: %g is outside (0, 1]", f->keep_ratio);
        out->keep_ratio = f->keep_ratio;
    }
    if (f->has_chunk_tokens) {
        if (f->chunk_tokens == 0 || f->chunk_tokens > 65536)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "policy.prefill.chunk_tokens: %u is outside [1, 65536]", f->chunk_tokens);
        out->chunk = f->chunk_tokens;
    }
    if (f->has_look_ahead) {
        if (f->look_ahead == 0 || f->look_ahead > 64)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "policy.prefill.look_ahead: %u is outside [1, 64]", f->look_ahead);
        out->look_ahead = f->look_ahead;
    }
    model_spec_policy_defaults(out);
    return GRPC_STATUS_OK;
}

/* The KV policy: eviction or compression within a per-request budget. */
static grpc_status_code
check_kv(const Kvserve__V1__KvPolicy *k, const srv_limits_t *lim, sched_kv_policy_t *out, char *msg,
         size_t cap)
{
    *out = lim->kv_default;
    if (k && k->has_prefix_reuse && k->prefix_reuse && !lim->prefix_caching)
        return fail(msg, cap, GRPC_STATUS_FAILED_PRECONDITION,
                    "policy.kv.prefix_reuse: the server runs without prefix caching "
                    "(--no-enable-prefix-caching)");
    if (k == NULL || !k->has_kind || k->kind == KVSERVE__V1__KV_POLICY__KIND__KIND_UNSPECIFIED) {
        if (k && (k->has_budget_tokens || k->has_sink_tokens || k->has_window_tokens))
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "policy.kv.kind: required when policy.kv sets a budget, sinks or window");
        return GRPC_STATUS_OK; /* the server's --kv-policy */
    }
    *out = (sched_kv_policy_t){0};
    switch (k->kind) {
    case KVSERVE__V1__KV_POLICY__KIND__FULL:
        break;
    case KVSERVE__V1__KV_POLICY__KIND__SINK_EVICTION:
        out->kind = SCHED_KV_SINK_EVICTION;
        out->sinks = k->has_sink_tokens ? k->sink_tokens : SRV_KV_DEFAULT.policy.sinks;
        break;
    case KVSERVE__V1__KV_POLICY__KIND__SNAPKV:
        out->kind = SCHED_KV_SNAPKV;
        out->window = k->has_window_tokens ? k->window_tokens : SRV_KV_DEFAULT.policy.window;
        break;
    case KVSERVE__V1__KV_POLICY__KIND__H2O:
        out->kind = SCHED_KV_H2O;
        out->window = k->has_window_tokens ? k->window_tokens : 0; /* recent: budget / 2 */
        break;
    default:
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "policy.kv.kind: %d is not a known kind", (int)k->kind);
    }
    const char *unused =
        out->kind == SCHED_KV_FULL && k->has_budget_tokens          ? "budget_tokens"
        : out->kind != SCHED_KV_SINK_EVICTION && k->has_sink_tokens ? "sink_tokens"
        : out->kind != SCHED_KV_SNAPKV && out->kind != SCHED_KV_H2O && k->has_window_tokens
            ? "window_tokens"
            : NULL;
    if (unused)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "policy.kv.%s: not used by this policy.kv.kind", unused);
    if (out->kind == SCHED_KV_FULL)
        return GRPC_STATUS_OK;
    if (!k->has_budget_tokens || k->budget_tokens == 0)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "policy.kv.budget_tokens: required (>= 1) with this policy.kv.kind");
    out->budget_tokens = k->budget_tokens;
    uint32_t bt = lim->block_tokens ? lim->block_tokens : 16;
    if (out->kind == SCHED_KV_SINK_EVICTION &&
        out->budget_tokens < sched_kv_min_budget(out->sinks, bt))
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "policy.kv.budget_tokens: %u cannot hold the %u sink tokens' blocks and one "
                    "block of %u recent tokens",
                    out->budget_tokens, out->sinks, bt);
    if (out->kind == SCHED_KV_SNAPKV &&
        (out->window == 0 || out->window > 1024 || out->budget_tokens <= out->window))
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "policy.kv.window_tokens: %u must be in [1, 1024] and below budget_tokens %u",
                    out->window, out->budget_tokens);
    if (out->kind == SCHED_KV_H2O && k->has_window_tokens &&
        (out->window == 0 || out->budget_tokens <= out->window))
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "policy.kv.window_tokens: %u (H2O's recent tokens) must be >= 1 and below "
                    "budget_tokens %u",
                    out->window, out->budget_tokens);
    return GRPC_STATUS_OK;
}

static grpc_status_code
check_policy(const Kvserve__V1__LongContextPolicy *p, const srv_limits_t *lim,
             model_spec_policy_t *spec, sched_kv_policy_t *kv, char *msg, size_t cap)
{
    grpc_status_code rc = check_prefill(p ? p->prefill : NULL, lim, spec, msg, cap);
    if (rc == GRPC_STATUS_OK)
        rc = check_kv(p ? p->kv : NULL, lim, kv, msg, cap);
    return rc;
}

/* guided_regex / guided_json (with guided_whitespace_pattern) /
 * guided_grammar into out->guide: at most one guided_* field, each one
 * this engine can honour. */
static grpc_status_code
check_guide(const Kvserve__V1__SamplingParams *sp, const srv_limits_t *lim, srv_gen_req_t *out,
            char *msg, size_t cap)
{
    const char *rx = sp->guided_regex, *js = sp->guided_json, *ws = sp->guided_whitespace_pattern;
    const char *gr = sp->guided_grammar;
    if ((sp->n_guided_choice > 0) + (rx != NULL) + (js != NULL) + (gr != NULL) > 1)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "sampling.%s: at most one of guided_choice, guided_regex, guided_json and "
                    "guided_grammar",
                    gr   ? "guided_grammar"
                    : js ? "guided_json"
                         : "guided_regex");
    if (ws && !js)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "sampling.guided_whitespace_pattern: only with guided_json");
    if (rx == NULL && js == NULL && gr == NULL)
        return GRPC_STATUS_OK;
    const char *const text[4] = {rx, js, gr, ws};
    const char *const name[4] = {"regex", "json", "grammar", "whitespace_pattern"};
    for (int i = 0; i < 4; i++) {
        size_t n = text[i] ? strlen(text[i]) : 0;
        if (text[i] && (n > MAX_GUIDE_BYTES || (n == 0 && i < 3)))
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.guided_%s: %zu bytes, not %d..%d", name[i], n, i < 3,
                        MAX_GUIDE_BYTES);
    }
    const char *field = "";
    char err[256];
    int rc = srv_guide_new(lim->m, gr, rx, js, ws, &out->guide, &field, err, sizeof err);
    if (rc == KVS_ENOMEM)
        return fail(msg, cap, GRPC_STATUS_RESOURCE_EXHAUSTED, "sampling.%s: out of memory", field);
    if (rc)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "sampling.%s: %s", field, err);
    return GRPC_STATUS_OK;
}

static grpc_status_code
check_sampling(const Kvserve__V1__SamplingParams *sp, const srv_limits_t *lim, srv_gen_req_t *out,
               char *msg, size_t cap)
{
    model_sampling_t *s = &out->sr.sampling;
    *s = (model_sampling_t){.temperature = 1.0f, .top_k = 0, .top_p = 1.0f, .min_p = 0.0f};
    s->seed = lim->seed_fallback;
    if (sp == NULL)
        return GRPC_STATUS_OK;
    if (sp->has_temperature) {
        if (!isfinite(sp->temperature) || sp->temperature < 0.0f || sp->temperature > 100.0f)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.temperature: %g is outside [0, 100]", sp->temperature);
        s->temperature = sp->temperature;
    }
    if (sp->has_top_k) {
        if (sp->top_k > lim->n_vocab)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.top_k: %u is larger than the vocabulary (%u)", sp->top_k,
                        lim->n_vocab);
        s->top_k = (int32_t)sp->top_k;
    }
    if (sp->has_top_p) {
        if (!isfinite(sp->top_p) || sp->top_p <= 0.0f || sp->top_p > 1.0f)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.top_p: %g is outside (0, 1]", sp->top_p);
        s->top_p = sp->top_p;
    }
    if (sp->has_min_p) {
        if (!isfinite(sp->min_p) || sp->min_p < 0.0f || sp->min_p > 1.0f)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.min_p: %g is outside [0, 1]", sp->min_p);
        s->min_p = sp->min_p;
    }
    if (sp->has_repetition_penalty) {
        float r = sp->repetition_penalty;
        if (!isfinite(r) || r < SRV_REP_PENALTY_MIN || r > SRV_REP_PENALTY_MAX)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.repetition_penalty: %g is outside [%g, %g]", r,
                        SRV_REP_PENALTY_MIN, SRV_REP_PENALTY_MAX);
        s->repetition_penalty = r;
    }
    if (sp->has_presence_penalty) {
        if (!(fabsf(sp->presence_penalty) <= MODEL_PENALTY_MAX))
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.presence_penalty: %g is outside [-2, 2]", sp->presence_penalty);
        s->presence_penalty = sp->presence_penalty;
    }
    if (sp->has_frequency_penalty) {
        if (!(fabsf(sp->frequency_penalty) <= MODEL_PENALTY_MAX))
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.frequency_penalty: %g is outside [-2, 2]", sp->frequency_penalty);
        s->frequency_penalty = sp->frequency_penalty;
    }
    if (sp->has_seed)
        s->seed = sp->seed;
    if (sp->has_max_tokens && sp->max_tokens == 0)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "sampling.max_tokens: must be >= 1");
    if (sp->n_stop > MAX_STOPS)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "sampling.stop: %zu strings, at most %d", sp->n_stop, MAX_STOPS);
    for (size_t i = 0; i < sp->n_stop; i++) {
        size_t n = strlen(sp->stop[i]);
        if (n == 0 || n > MAX_STOP_BYTES)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.stop[%zu]: %zu bytes, expected 1..%d", i, n, MAX_STOP_BYTES);
    }
    if (sp->n_stop_token_ids > MAX_STOP_IDS)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "sampling.stop_token_ids: %zu ids, at most %d", sp->n_stop_token_ids,
                    MAX_STOP_IDS);
    for (size_t i = 0; i < sp->n_stop_token_ids; i++)
        if (sp->stop_token_ids[i] >= lim->n_vocab)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.stop_token_ids[%zu]: %u is outside the vocabulary (%u)", i,
                        sp->stop_token_ids[i], lim->n_vocab);
    out->stop = (const char *const *)sp->stop;
    out->n_stop = sp->n_stop;
    out->stop_ids = sp->stop_token_ids;
    out->n_stop_ids = sp->n_stop_token_ids;
    out->include_stop = sp->has_include_stop_str_in_output && sp->include_stop_str_in_output;
    out->sr.ignore_eos = sp->has_ignore_eos && sp->ignore_eos;
    if (sp->has_logprobs) {
        if (sp->logprobs > SCHED_MAX_LOGPROBS)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.logprobs: %u is outside [0, %d]", sp->logprobs,
                        SCHED_MAX_LOGPROBS);
        out->sr.logprobs = true;
        out->sr.top_logprobs = sp->logprobs;
    }
    if (sp->n_logit_bias > MODEL_MAX_LOGIT_BIAS)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "sampling.logit_bias: %zu entries, at most %d", sp->n_logit_bias,
                    MODEL_MAX_LOGIT_BIAS);
    if (sp->n_logit_bias) {
        out->bias_ids = malloc(sp->n_logit_bias * sizeof *out->bias_ids);
        out->bias = malloc(sp->n_logit_bias * sizeof *out->bias);
        if (!out->bias_ids || !out->bias)
            return fail(msg, cap, GRPC_STATUS_RESOURCE_EXHAUSTED, "out of memory");
    }
    for (size_t i = 0; i < sp->n_logit_bias; i++) {
        const Kvserve__V1__LogitBias *b = sp->logit_bias[i];
        if (!b->has_token_id)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.logit_bias[%zu].token_id: required", i);
        if (b->token_id >= lim->n_vocab)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.logit_bias[%zu].token_id: %u is outside the vocabulary (%u)", i,
                        b->token_id, lim->n_vocab);
        if (!b->has_bias)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.logit_bias[%zu].bias: required", i);
        if (!(fabsf(b->bias) <= MODEL_LOGIT_BIAS_MAX))
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.logit_bias[%zu].bias: %g is outside [-%g, %g]", i, b->bias,
                        MODEL_LOGIT_BIAS_MAX, MODEL_LOGIT_BIAS_MAX);
        out->bias_ids[i] = (int32_t)b->token_id;
        out->bias[i] = b->bias;
    }
    s->bias_ids = out->bias_ids;
    s->bias = out->bias;
    s->n_bias = (uint32_t)sp->n_logit_bias;
    if (sp->n_allowed_token_ids > lim->n_vocab)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "sampling.allowed_token_ids: %zu ids, more than the vocabulary (%u)",
                    sp->n_allowed_token_ids, lim->n_vocab);
    for (size_t i = 0; i < sp->n_allowed_token_ids; i++)
        if (sp->allowed_token_ids[i] >= lim->n_vocab)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.allowed_token_ids[%zu]: %u is outside the vocabulary (%u)", i,
                        sp->allowed_token_ids[i], lim->n_vocab);
    /* Lent: below n_vocab, the uint32 ids read as int32 (the sampler copies). */
    s->allowed = (const int32_t *)sp->allowed_token_ids;
    s->n_allowed = (uint32_t)sp->n_allowed_token_ids;
    if (sp->n_guided_choice > MODEL_MAX_CHOICES)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "sampling.guided_choice: %zu strings, at most %d", sp->n_guided_choice,
                    MODEL_MAX_CHOICES);
    for (size_t i = 0; i < sp->n_guided_choice; i++) {
        size_t n = sp->guided_choice[i] ? strlen(sp->guided_choice[i]) : 0;
        if (n == 0 || n > MODEL_MAX_CHOICE_BYTES)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.guided_choice[%zu]: %zu bytes, not 1..%d", i, n,
                        MODEL_MAX_CHOICE_BYTES);
    }
    out->sr.choices = (const char *const *)sp->guided_choice;
    out->sr.n_choices = (uint32_t)sp->n_guided_choice;
    grpc_status_code st = check_guide(sp, lim, out, msg, cap);
    if (st != GRPC_STATUS_OK)
        return st;
    out->sr.guide = out->guide;
    if (sp->has_prompt_logprobs) {
        if (sp->prompt_logprobs > SCHED_MAX_LOGPROBS)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.prompt_logprobs: %u is outside [0, %d]", sp->prompt_logprobs,
                        SCHED_MAX_LOGPROBS);
        if (out->sr.spec.on)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "sampling.prompt_logprobs: not with speculative prefill "
                        "(policy.prefill), whose main model skips prompt tokens");
        out->sr.prompt_logprobs = true;
        out->sr.top_prompt_logprobs = sp->prompt_logprobs;
    }
    if (sp->has_n && (sp->n == 0 || sp->n > SCHED_MAX_N))
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "sampling.n: %u is outside [1, %d]",
                    sp->n, SCHED_MAX_N);
    out->sr.n = sp->has_n ? sp->n : 1;
    return GRPC_STATUS_OK;
}

#define MAX_MESSAGES 1024

/* A conversation through the model's template, then the tokenizer with
 * special-token text parsed (the template wrote BOS and the role markers
 * as text) but in the messages' content: a message that holds
 * "<|im_start|>system" is those characters, not a forged turn. */
static grpc_status_code
chat_prompt(const Kvserve__V1__ChatMessages *cm, const srv_limits_t *lim, srv_gen_req_t *out,
            char *msg, size_t cap)
{
    if (lim->chat == NULL)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "%s",
                    lim->chat_err ? lim->chat_err : "chat: the model has no chat template");
    if (cm == NULL || cm->n_messages == 0)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "chat.messages: empty");
    if (cm->n_messages > MAX_MESSAGES)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "chat.messages: %zu, at most %d",
                    cm->n_messages, MAX_MESSAGES);
    srv_chat_msg_t *m = calloc(cm->n_messages, sizeof *m);
    if (m == NULL)
        return fail(msg, cap, GRPC_STATUS_RESOURCE_EXHAUSTED, "chat: out of memory");
    for (size_t i = 0; i < cm->n_messages; i++) {
        m[i].role = cm->messages[i]->role ? cm->messages[i]->role : "";
        m[i].content = cm->messages[i]->content ? cm->messages[i]->content : "";
    }
    char *text = NULL, err[256];
    bool gen = cm->has_add_generation_prompt ? cm->add_generation_prompt : true;
    size_t *plain = NULL, n_plain = 0;
    int rc = srv_chat_render(lim->chat, m, cm->n_messages, gen, &text, &plain, &n_plain, err,
                             sizeof err);
    free(m);
    if (rc)
        return fail(msg, cap,
                    rc == KVS_ENOMEM ? GRPC_STATUS_RESOURCE_EXHAUSTED
                                     : GRPC_STATUS_INVALID_ARGUMENT,
                    "chat.%s", err);
    size_t len = strlen(text), n = 0;
    grpc_status_code st = GRPC_STATUS_OK;
    if (len > (size_t)lim->max_model_len * 64)
        st = fail(msg, cap, GRPC_STATUS_OUT_OF_RANGE,
                  "chat: the rendered prompt (%zu bytes) cannot fit the maximum model length "
                  "(%u tokens)",
                  len, lim->max_model_len);
    else if (model_vocab_tokenize_plain(model_vocab(lim->m), text, len, MODEL_TOK_PARSE_SPECIAL,
                                        plain, n_plain, &out->prompt, &n))
        st = fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "chat: cannot tokenize the prompt");
    else if (n == 0)
        st = fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "chat: the prompt is empty");
    out->n_prompt = (uint32_t)n;
    free(text);
    free(plain);
    return st;
}

static grpc_status_code
check_prompt(const Kvserve__V1__GenerateRequest *q, const srv_limits_t *lim, srv_gen_req_t *out,
             char *msg, size_t cap)
{
    /* truncate_prompt_tokens: a longer prompt is cut to its last tokens,
     * so its length is not held against the model's here. */
    bool cut = q->has_truncate_prompt_tokens;
    if (cut && (q->truncate_prompt_tokens == 0 || q->truncate_prompt_tokens > lim->max_model_len))
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "truncate_prompt_tokens: %u is outside [1, %u] (the maximum model length)",
                    q->truncate_prompt_tokens, lim->max_model_len);
    if (q->prompt_case == KVSERVE__V1__GENERATE_REQUEST__PROMPT_TEXT) {
        size_t len = strlen(q->text);
        if (len == 0)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "text: the prompt is empty");
        if (len > (size_t)lim->max_model_len * 64 && !cut)
            return fail(msg, cap, GRPC_STATUS_OUT_OF_RANGE,
                        "text: %zu bytes cannot fit the maximum model length (%u tokens)", len,
                        lim->max_model_len);
        size_t n;
        int rc = model_vocab_tokenize_alloc(model_vocab(lim->m), q->text, len,
                                            MODEL_TOK_ADD_SPECIAL, &out->prompt, &n);
        if (rc)
            return fail(
                msg, cap,
                rc == KVS_ENOMEM ? GRPC_STATUS_RESOURCE_EXHAUSTED : GRPC_STATUS_INVALID_ARGUMENT,
                "text: cannot be tokenized by the '%s' tokenizer", model_tokenizer_name(lim->m));
        out->n_prompt = (uint32_t)n;
    } else if (q->prompt_case == KVSERVE__V1__GENERATE_REQUEST__PROMPT_TOKENS) {
        const Kvserve__V1__TokenIds *t = q->tokens;
        if (t == NULL || t->n_ids == 0)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "tokens.ids: the prompt is empty");
        if (t->n_ids > lim->max_model_len && !cut)
            return fail(msg, cap, GRPC_STATUS_OUT_OF_RANGE,
                        "tokens.ids: %zu tokens, the maximum model length is %u", t->n_ids,
                        lim->max_model_len);
        out->prompt = malloc(t->n_ids * sizeof(int32_t));
        if (out->prompt == NULL)
            return fail(msg, cap, GRPC_STATUS_RESOURCE_EXHAUSTED, "tokens.ids: out of memory");
        for (size_t i = 0; i < t->n_ids; i++) {
            if (t->ids[i] >= lim->n_vocab)
                return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                            "tokens.ids[%zu]: %u is outside the vocabulary (%u)", i, t->ids[i],
                            lim->n_vocab);
            out->prompt[i] = (int32_t)t->ids[i];
        }
        out->n_prompt = (uint32_t)t->n_ids;
    } else if (q->prompt_case == KVSERVE__V1__GENERATE_REQUEST__PROMPT_CHAT) {
        grpc_status_code st = chat_prompt(q->chat, lim, out, msg, cap);
        if (st != GRPC_STATUS_OK)
            return st;
        if (out->n_prompt > lim->max_model_len && !cut)
            return fail(msg, cap, GRPC_STATUS_OUT_OF_RANGE,
                        "chat: %u prompt tokens, the maximum model length is %u", out->n_prompt,
                        lim->max_model_len);
    } else {
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "prompt: one of text, tokens or chat is required");
    }
    if (cut && out->n_prompt > q->truncate_prompt_tokens) {
        uint32_t k = q->truncate_prompt_tokens;
        memmove(out->prompt, out->prompt + (out->n_prompt - k), k * sizeof *out->prompt);
        out->n_prompt = k;
    }
    return GRPC_STATUS_OK;
}

/* forced_tokens: ids in the vocabulary, no more than max_tokens (their
 * count when unset), within the maximum model length. */
static grpc_status_code
check_forced(const Kvserve__V1__GenerateRequest *q, const srv_limits_t *lim, srv_gen_req_t *out,
             uint32_t *max_tokens, bool max_set, char *msg, size_t cap)
{
    const Kvserve__V1__TokenIds *f = q->forced_tokens;
    if (f == NULL || f->n_ids == 0)
        return GRPC_STATUS_OK;
    if (out->sr.n_choices || out->guide)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "forced_tokens: not with sampling.guided_choice, guided_regex, guided_json or "
                    "guided_grammar");
    if ((uint64_t)out->n_prompt + f->n_ids > lim->max_model_len)
        return fail(msg, cap, GRPC_STATUS_OUT_OF_RANGE,
                    "forced_tokens: %u prompt + %zu forced tokens exceed the maximum model "
                    "length (%u)",
                    out->n_prompt, f->n_ids, lim->max_model_len);
    if (max_set && f->n_ids > *max_tokens)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "forced_tokens: %zu ids, more than sampling.max_tokens (%u)", f->n_ids,
                    *max_tokens);
    for (size_t i = 0; i < f->n_ids; i++)
        if (f->ids[i] >= lim->n_vocab)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "forced_tokens.ids[%zu]: %u is outside the vocabulary (%u)", i, f->ids[i],
                        lim->n_vocab);
    if (!max_set)
        *max_tokens = (uint32_t)f->n_ids;
    out->sr.forced = (const int32_t *)f->ids;
    out->sr.n_forced = (uint32_t)f->n_ids;
    out->sr.logprobs = true; /* the point of forcing: their scores */
    return GRPC_STATUS_OK;
}

grpc_status_code
srv_gen_parse(const Kvserve__V1__GenerateRequest *q, const srv_limits_t *lim, srv_gen_req_t *out,
              char *msg, size_t cap)
{
    memset(out, 0, sizeof *out);
    msg[0] = '\0';
    size_t idn = q->request_id ? strlen(q->request_id) : 0;
    if (idn > MAX_ID_BYTES)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "request_id: %zu bytes, at most %d",
                    idn, MAX_ID_BYTES);
    for (size_t i = 0; i < idn; i++)
        if (q->request_id[i] < 0x21 || q->request_id[i] > 0x7e)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                        "request_id: only printable ASCII without spaces");
    if (idn)
        memcpy(out->request_id, q->request_id, idn + 1);
    size_t saltn = q->cache_salt ? strlen(q->cache_salt) : 0;
    if (saltn > MAX_SALT_BYTES)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "cache_salt: %zu bytes, at most %d",
                    saltn, MAX_SALT_BYTES);
    grpc_status_code rc = check_policy(q->policy, lim, &out->sr.spec, &out->sr.kv, msg, cap);
    if (rc == GRPC_STATUS_OK)
        rc = check_attention(q->policy ? q->policy->attention : NULL, lim, &out->sr.attn, msg, cap);
    if (rc == GRPC_STATUS_OK && model_attn_policy_check(&out->sr.attn))
        rc = fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                  "policy.attention: a sparse policy needs window_tokens >= 1 (and DELTA a "
                  "gamma >= 1)");
    if (rc == GRPC_STATUS_OK)
        rc = check_sampling(q->sampling, lim, out, msg, cap);
    if (rc == GRPC_STATUS_OK)
        rc = check_prompt(q, lim, out, msg, cap);
    if (rc != GRPC_STATUS_OK) {
        srv_gen_req_free(out);
        return rc;
    }
    const Kvserve__V1__SamplingParams *sp = q->sampling;
    uint32_t room = lim->max_model_len -
                    (out->n_prompt < lim->max_model_len ? out->n_prompt : lim->max_model_len);
    if (room == 0) {
        srv_gen_req_free(out);
        return fail(msg, cap, GRPC_STATUS_OUT_OF_RANGE,
                    "prompt: %u tokens leave no room under the maximum model length (%u)",
                    out->n_prompt, lim->max_model_len);
    }
    uint32_t max_tokens = room < DEFAULT_MAX_TOKENS ? room : DEFAULT_MAX_TOKENS;
    if (sp && sp->has_max_tokens) {
        if ((uint64_t)out->n_prompt + sp->max_tokens > lim->max_model_len) {
            srv_gen_req_free(out);
            return fail(msg, cap, GRPC_STATUS_OUT_OF_RANGE,
                        "sampling.max_tokens: %u prompt + %u new tokens exceed the maximum model "
                        "length (%u)",
                        out->n_prompt, sp->max_tokens, lim->max_model_len);
        }
        max_tokens = sp->max_tokens;
    }
    grpc_status_code st =
        check_forced(q, lim, out, &max_tokens, sp && sp->has_max_tokens, msg, cap);
    if (st == GRPC_STATUS_OK && sp && sp->has_min_tokens && sp->min_tokens > 0) {
        if (sp->min_tokens > max_tokens)
            st = fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                      "sampling.min_tokens: %u is more than max_tokens (%u)", sp->min_tokens,
                      max_tokens);
        out->sr.min_tokens = sp->min_tokens;
        out->sr.min_ban = (const int32_t *)out->stop_ids; /* checked: below n_vocab */
        out->sr.n_min_ban = (uint32_t)out->n_stop_ids;
    }
    if (st != GRPC_STATUS_OK) {
        srv_gen_req_free(out);
        return st;
    }
    out->sr.prompt = out->prompt;
    out->sr.n_prompt = out->n_prompt;
    out->sr.max_tokens = max_tokens;
    out->sr.priority = q->has_priority ? q->priority : 0;
    out->sr.cache_salt = saltn ? fnv1a(q->cache_salt, saltn) : 0;
    /* prefix_reuse = false: a salt nobody else has shares nothing. */
    if (q->policy && q->policy->kv && q->policy->kv->has_prefix_reuse &&
        !q->policy->kv->prefix_reuse)
        out->sr.cache_salt = fnv1a((const char *)&lim->seed_fallback, sizeof lim->seed_fallback) ^
                             0x9e3779b97f4a7c15ull;
    return GRPC_STATUS_OK;
}

void
srv_gen_req_free(srv_gen_req_t *r)
{
    free(r->prompt);
    free(r->bias_ids);
    free(r->bias);
    model_guide_free(r->guide);
    r->prompt = NULL;
    r->bias_ids = NULL;
    r->bias = NULL;
    r->guide = NULL;
}

grpc_status_code
srv_tokenize_parse(const Kvserve__V1__TokenizeRequest *q, const srv_limits_t *lim, int32_t **ids,
                   size_t *n, char *msg, size_t cap)
{
    msg[0] = '\0';
    *ids = NULL;
    *n = 0;
    const model_t *m = lim->m;
    if (q->chat != NULL) {
        if (q->text != NULL)
            return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "text and chat: give one");
        srv_gen_req_t g = {0};
        grpc_status_code st = chat_prompt(q->chat, lim, &g, msg, cap);
        if (st != GRPC_STATUS_OK) {
            srv_gen_req_free(&g);
            return st;
        }
        *ids = g.prompt;
        *n = g.n_prompt;
        return GRPC_STATUS_OK;
    }
    /* An unset optional string is NULL in protobuf-c: proto's default,
     * the empty text. */
    const char *text = q->text ? q->text : "";
    unsigned flags = (!q->has_add_bos || q->add_bos ? MODEL_TOK_ADD_SPECIAL : 0) |
                     (q->has_parse_special && q->parse_special ? MODEL_TOK_PARSE_SPECIAL : 0);
    int rc = model_vocab_tokenize_alloc(model_vocab(m), text, strlen(text), flags, ids, n);
    if (rc == KVS_ENOMEM)
        return fail(msg, cap, GRPC_STATUS_RESOURCE_EXHAUSTED, "text: out of memory");
    if (rc)
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT,
                    "text: cannot be tokenized by the '%s' tokenizer", model_tokenizer_name(m));
    return GRPC_STATUS_OK;
}

grpc_status_code
srv_abort_parse(const Kvserve__V1__AbortRequest *q, const char **id, char *msg, size_t cap)
{
    msg[0] = '\0';
    *id = q->request_id;
    if (q->request_id == NULL || q->request_id[0] == '\0')
        return fail(msg, cap, GRPC_STATUS_INVALID_ARGUMENT, "request_id: missing");
    return GRPC_STATUS_OK;
}
