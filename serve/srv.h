/*
 * serve/srv.h — the kvserve command line: one binary, subcommands.  Each
 * srv_cmd_* takes the arguments after its name and returns the process exit
 * status (0 ok, 1 runtime failure, 2 usage error).  main.c dispatches.
 */
#ifndef SRV_H
#define SRV_H

#include "base/kvs.h"
#include "kernels/kern.h"
#include "model/model.h"
#include "sched/sched.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

int srv_cmd_run(int argc, char **argv);
int srv_cmd_model(int argc, char **argv);
int srv_cmd_eval(int argc, char **argv);
int srv_cmd_perplexity(int argc, char **argv); /* srv_ppl.c */
int srv_cmd_serve(int argc, char **argv);      /* srv_grpc.c: the gRPC server */
int srv_cmd_generate(int argc, char **argv);   /* srv_client.c: streaming client */
int srv_cmd_health(int argc, char **argv);     /* srv_client.c: health check */
int srv_cmd_bench(int argc, char **argv);      /* srv_bench.c: streaming load generator */

/* ---- helpers shared by subcommands (srv_cli.c) ---------------------------- */

/* Strict number parsing: the whole string must be a number inside [lo, hi].
 * On failure print "kvserve <cmd>: --flag: ..." to stderr and return
 * KVS_EINVAL. */
int srv_parse_u32(const char *cmd, const char *flag, const char *s, uint32_t lo, uint32_t hi,
                  uint32_t *out);
int srv_parse_u64(const char *cmd, const char *flag, const char *s, uint64_t *out);
int srv_parse_f32(const char *cmd, const char *flag, const char *s, float lo, float hi, float *out);
/* A memory size: bytes, or a number (a decimal fraction allowed) with a
 * unit as Kubernetes writes them, K/M/G/T powers of 1000 and Ki/Mi/Gi/Ti
 * powers of 1024, a trailing "B" allowed ("4GiB", "512Mi", "1.5G", "64MB").
 * Rounded down to a byte; KVS_EINVAL after a message otherwise (above
 * 2^63, a unit it does not know). */
int srv_parse_bytes(const char *cmd, const char *flag, const char *s, uint64_t *out);
/* "1,2,3": 1 to max numbers, each in [lo, hi], into out[*n]; KVS_EINVAL
 * (after srv_parse_u32's message for a bad number) otherwise. */
int srv_parse_u32_list(const char *cmd, const char *flag, const char *s, uint32_t lo, uint32_t hi,
                       uint32_t *out, uint32_t max, uint32_t *n);
/* The repetition penalty's range (vLLM wants it positive; 1 is off). */
#define SRV_REP_PENALTY_MIN 1e-3f
#define SRV_REP_PENALTY_MAX 100.0f
/* KV cache flags shared by run, eval and serve:
 *   --kv-cache-dtype f16|f32|bf16|q8_0|fp8|q4  (bf16 and the quantized
 *   kinds keep full blocks in that codec, the growing tail in f16)
 *   --kv-sink-tokens N  (leading tokens kept exact; default 4)
 *   --kv-residual-tokens N  (recent tokens kept exact; default 0)
 *   --host-kv-memory SIZE  (host tier for preempted and evicted KV)
 * Used like the attention flags below. */
typedef struct srv_kv_opts {
    kern_dtype_t dtype; /* of full-precision blocks */
    kern_kvq_t quant;
    uint32_t sink_tokens;
    uint32_t residual_tokens; /* --kv-residual-tokens N: KIVI's window kept exact */
    uint64_t host_bytes;      /* --host-kv-memory: the host tier, bytes */
    /* The KV policy of requests that name none:
     *   --kv-policy full|sink-eviction|snapkv|h2o  --kv-budget N
     *   --kv-evict-sinks N (default 4)  --snapkv-window N (default 32)
     *   --h2o-recent N (default budget / 2; policy.window once finished) */
    sched_kv_policy_t policy;
    uint32_t h2o_recent;
} srv_kv_opts_t;
/* clang-format off */
#define SRV_KV_DEFAULT                                                 \
    (srv_kv_opts_t){.dtype = KERN_F16, .quant = KERN_KVQ_NONE,         \
                    .sink_tokens = 4,                                  \
                    .policy = {.sinks = 4, .window = 32, .kernel = 5}}
enum {
    SRV_O_KVDTYPE = 1200,
    SRV_O_KVSINKS,
    SRV_O_KVPOLICY,
    SRV_O_KVBUDGET,
    SRV_O_KVEVSINKS,
    SRV_O_SNAPWIN,
    SRV_O_KVRESID,
    SRV_O_HOSTMEM,
    SRV_O_H2ORECENT
};
#define SRV_KV_LONGOPTS                                                \
    {"kv-cache-dtype", 1, 0, SRV_O_KVDTYPE},                           \
    {"kv-sink-tokens", 1, 0, SRV_O_KVSINKS},                           \
    {"kv-policy", 1, 0, SRV_O_KVPOLICY},                               \
    {"kv-budget", 1, 0, SRV_O_KVBUDGET},                               \
    {"kv-evict-sinks", 1, 0, SRV_O_KVEVSINKS},                         \
    {"snapkv-window", 1, 0, SRV_O_SNAPWIN},                            \
    {"kv-residual-tokens", 1, 0, SRV_O_KVRESID},                       \
    {"host-kv-memory", 1, 0, SRV_O_HOSTMEM},                           \
    {"h2o-recent", 1, 0, SRV_O_H2ORECENT}
/* clang-format on */
int srv_kv_opt(const char *cmd, int opt, const char *arg, srv_kv_opts_t *o);
/* Checks the --kv-policy flags together (KVS_EINVAL after printing why). */
int srv_kv_finish(const char *cmd, srv_kv_opts_t *o, uint32_t block_tokens);
/* The pool flags into an engine config: dtype, codec, exact sinks,
 * residual window, host tier. */
void srv_kv_apply(const srv_kv_opts_t *o, sched_cfg_t *c);
/* --kv-policy's and --attention's names of a kind: "sink-eviction", ... */
const char *srv_kv_policy_name(sched_kv_kind_t k);
const char *srv_attn_kind_name(model_attn_kind_t k);
/* "f16", "q4 (4 sinks exact)", ... */
const char *srv_kv_describe(const srv_kv_opts_t *o, char *buf, size_t cap);
/* The --kv-cache-dtype name alone: "f16", "q8_0", ... */
const char *srv_kv_name(const srv_kv_opts_t *o);
/* --block-size: a power of two in 1..1024. */
int srv_parse_block_size(const char *cmd, const char *s, uint32_t *out);
/* "1,2,3" -> malloc'd array; every id in [0, INT32_MAX]. */
int srv_parse_tokens(const char *cmd, const char *flag, const char *s, int32_t **out, size_t *n);
/* --logit-bias ID:BIAS[,ID:BIAS...]: ids (below INT32_MAX) and biases
 * (within +-MODEL_LOGIT_BIAS_MAX) into malloc'd arrays, at most
 * MODEL_MAX_LOGIT_BIAS pairs; 0 or KVS_EINVAL / KVS_ENOMEM after a
 * message. */
int srv_parse_logit_bias(const char *cmd, const char *s, int32_t **ids, float **bias, uint32_t *n);
/* All of a stream or file, NUL-terminated (*len, if not NULL, excludes the
 * NUL); NULL when it cannot be read or memory runs out. */
char *srv_read_stream(FILE *f, size_t *len);
char *srv_read_file(const char *path, size_t *len);
/* The argument of a text flag (--guided-json, --guided-grammar): the text
 * itself, or @FILE for a file's; a malloc'd copy in *out (0), or KVS_EINVAL
 * / KVS_ENOMEM after a message naming flag. */
int srv_parse_text_arg(const char *cmd, const char *flag, const char *s, char **out);

/* The structured-output flags of run, generate and bench.  Put
 * SRV_GUIDED_LONGOPTS in the getopt_long table; srv_guided_opt takes one
 * (1: not one of them), srv_guided_check them together (with n_other
 * other guides given, e.g. --guided-choice), srv_guided_free the texts. */
typedef struct srv_guided_opts {
    const char *regex, *ws; /* into argv */
    char *json, *grammar;   /* the texts, malloc'd */
} srv_guided_opts_t;
enum { SRV_O_GREGEX = 1300, SRV_O_GJSON, SRV_O_GWS, SRV_O_GGRAMMAR };
/* clang-format off */
#define SRV_GUIDED_LONGOPTS                                            \
    {"guided-regex", 1, 0, SRV_O_GREGEX},                              \
    {"guided-json", 1, 0, SRV_O_GJSON},                                \
    {"guided-whitespace-pattern", 1, 0, SRV_O_GWS},                    \
    {"guided-grammar", 1, 0, SRV_O_GGRAMMAR}
/* clang-format on */
int srv_guided_opt(const char *cmd, int opt, const char *arg, srv_guided_opts_t *g);
int srv_guided_check(const char *cmd, const srv_guided_opts_t *g, uint32_t n_other);
void srv_guided_free(srv_guided_opts_t *g);

/* A growable string: put appends (keeping a NUL after the text); a failed
 * allocation sets oom and later puts do nothing.  Free p when done. */
typedef struct srv_buf {
    char *p;
    size_t len, cap;
    bool oom;
} srv_buf_t;
void srv_buf_put(srv_buf_t *b, const char *s, size_t n);
void srv_buf_puts(srv_buf_t *b, const char *s);
/* Appends token tok's text, whole (model_token_piece cuts it to the room
 * it is given, and pieces run to hundreds of bytes: runs of spaces or
 * symbols in code vocabularies); nothing for control tokens. */
void srv_buf_put_token(srv_buf_t *b, const model_t *m, int32_t tok);
/* The same for a vocabulary's token, control tokens' text too when
 * `special` (model_vocab_piece). */
void srv_buf_put_piece(srv_buf_t *b, const model_vocab_t *v, int32_t tok, bool special);
/* s's n bytes as well-formed UTF-8 (malloc'd, NUL-terminated), each
 * ill-formed part, and NUL, as U+FFFD: what a protobuf string field must
 * carry (a token can end mid-character, a byte-level one be any byte).
 * NULL when memory runs out. */
char *srv_utf8_valid(const char *s, size_t n);

/* Writes s as a JSON string literal (quotes and escapes included): UTF-8
 * characters as they are, control characters and each byte that starts
 * no character as \u00XX (its value). */
void srv_json_str(FILE *f, const char *s, size_t len);
/* Attention flags shared by serve, run, eval and bench (vLLM-style names):
 *   --attention dense|sink-window|delta|block-sparse  --attn-sinks N
 *   --attn-window N  --delta-gamma N  --no-delta-tail  --attn-last-dense
 *   --attn-top-k N (block-sparse: KV blocks picked per query block)
 *   --decode-top-k N (Quest at decode, any kind; 0: dense decoding)
 * Put SRV_ATTN_LONGOPTS in the getopt_long table; srv_attn_opt handles one
 * option (returns 1 when `opt` is not one of them, 0, or KVS_EINVAL after
 * printing why); srv_attn_finish checks the combination. */
enum {
    SRV_O_ATTN = 1000,
    SRV_O_SINKS,
    SRV_O_WINDOW,
    SRV_O_GAMMA,
    SRV_O_NOTAIL,
    SRV_O_LASTDENSE,
    SRV_O_TOPK,
    SRV_O_DECTOPK
};
#define SRV_ATTN_LONGOPTS                                                        \
    {"attention", 1, 0, SRV_O_ATTN}, {"attn-sinks", 1, 0, SRV_O_SINKS},          \
        {"attn-window", 1, 0, SRV_O_WINDOW}, {"delta-gamma", 1, 0, SRV_O_GAMMA}, \
        {"no-delta-tail", 0, 0, SRV_O_NOTAIL}, {"attn-top-k", 1, 0, SRV_O_TOPK}, \
        {"attn-last-dense", 0, 0, SRV_O_LASTDENSE},                              \
    {                                                                            \
        "decode-top-k", 1, 0, SRV_O_DECTOPK                                      \
    }
/* Defaults scaled for kvserve's small models (the authors' 1024 sinks and
 * 2048 window are for 128K contexts): 4 sinks, a 64-token window, gamma 64,
 * 8 blocks picked by block-sparse. */
#define SRV_ATTN_DEFAULT                                                            \
    (model_attn_policy_t)                                                           \
    {                                                                               \
        .kind = MODEL_ATTN_DENSE, .sinks = 4, .window = 64, .gamma = 64, .top_k = 8 \
    }
int srv_attn_opt(const char *cmd, int opt, const char *arg, model_attn_policy_t *p);
int srv_attn_finish(const char *cmd, model_attn_policy_t *p);
/* "dense", "sink-window(4+64)", "delta(4+64, gamma 64)",
 * "block-sparse(4+64, top 8)", ... */
const char *srv_attn_describe(const model_attn_policy_t *p, char *buf, size_t cap);
/* Whether p keeps key summaries by block (block-sparse prefill, Quest at
 * decode): a command whose default it is has the engine take them at
 * start (sched_cfg_t.reserve_summaries). */
static inline bool
srv_attn_summaries(const model_attn_policy_t *p)
{
    return p->kind == MODEL_ATTN_BLOCK_SPARSE || p->decode_top_k > 0;
}

/* Prefill flags shared by serve and eval:
 *   --prefill full|speculative  --keep-ratio R  --look-ahead N
 *   --spec-chunk N  (and --draft-model PATH, parsed by each command)
 * Used like the attention flags above. */
enum { SRV_O_PREFILL = 1100, SRV_O_KEEP, SRV_O_LOOKAHEAD, SRV_O_SPECCHUNK };
#define SRV_PREFILL_LONGOPTS                                            \
    {"prefill", 1, 0, SRV_O_PREFILL}, {"keep-ratio", 1, 0, SRV_O_KEEP}, \
        {"look-ahead", 1, 0, SRV_O_LOOKAHEAD},                          \
    {                                                                   \
        "spec-chunk", 1, 0, SRV_O_SPECCHUNK                             \
    }
int srv_prefill_opt(const char *cmd, int opt, const char *arg, model_spec_policy_t *p);
/* Fills defaults; KVS_EINVAL (after printing why) for speculative prefill
 * without a draft model, or flags without speculative prefill. */
int srv_prefill_finish(const char *cmd, model_spec_policy_t *p, bool have_draft);
/* "full" or "speculative(keep 0.2, look-ahead 8, chunk 32)". */
const char *srv_prefill_describe(const model_spec_policy_t *p, char *buf, size_t cap);
/* Loads --draft-model on the main model's backend and refuses one whose
 * vocabulary differs from the main model's (printing why).  0 or an error. */
int srv_load_draft(const char *cmd, const char *path, model_t *main_model, model_t **out);

/* Speculative decoding, shared by serve, run, eval and perplexity (named
 * after vLLM's num_speculative_tokens, method, prompt_lookup_max and
 * prompt_lookup_min):
 *   --num-speculative-tokens N  (0..SCHED_MAX_SPEC_TOKENS; 0, the default: off)
 *   --speculative-method ngram|draft  (prompt lookup, the default, or the
 *   --draft-model's continuation)
 *   --prompt-lookup-max N  --prompt-lookup-min N  (ngram; 1..SCHED_MAX_PROMPT_LOOKUP;
 *   defaults 4 and 2)
 *   --speculative-disable-by-batch-size N  (no proposals in a step that
 *   starts with N running requests or more; default: never)
 *   --speculative-acceptance exact|rejection  (draft: the exact check, the
 *   default, or rejection sampling from the draft's distribution)
 * Used like the attention flags above; srv_specdec_apply puts them into
 * an engine config. */
typedef struct srv_specdec_opts {
    uint32_t num_tokens;             /* 0: off */
    uint32_t lookup_max, lookup_min; /* 0: not given (the defaults once finished) */
    const char *method;              /* NULL: not given ("ngram") */
    bool draft;                      /* the draft model proposes */
    uint32_t disable_batch;          /* 0: not given */
    const char *acceptance;          /* NULL: not given ("exact") */
    bool rejection;                  /* rejection sampling */
} srv_specdec_opts_t;
enum {
    SRV_O_NUMSPEC = 1400,
    SRV_O_PLMAX,
    SRV_O_PLMIN,
    SRV_O_SPECMETHOD,
    SRV_O_SPECOFF,
    SRV_O_SPECACCEPT
};
/* clang-format off */
#define SRV_SPECDEC_LONGOPTS                                           \
    {"num-speculative-tokens", 1, 0, SRV_O_NUMSPEC},                   \
    {"speculative-method", 1, 0, SRV_O_SPECMETHOD},                    \
    {"speculative-disable-by-batch-size", 1, 0, SRV_O_SPECOFF},        \
    {"speculative-acceptance", 1, 0, SRV_O_SPECACCEPT},                \
    {"prompt-lookup-max", 1, 0, SRV_O_PLMAX},                          \
    {"prompt-lookup-min", 1, 0, SRV_O_PLMIN}
/* clang-format on */
int srv_specdec_opt(const char *cmd, int opt, const char *arg, srv_specdec_opts_t *o);
/* Fills the lookup defaults; KVS_EINVAL (after printing why) for a
 * minimum above the maximum, a method or lookup flags without
 * --num-speculative-tokens, lookup flags with the draft method, or the
 * draft method without a draft model (have_draft). */
int srv_specdec_finish(const char *cmd, srv_specdec_opts_t *o, bool have_draft);
void srv_specdec_apply(const srv_specdec_opts_t *o, sched_cfg_t *c);
/* "; speculative decoding accepted A of D proposed tokens (R%)" for the
 * offline commands' summary lines; empty when off. */
const char *srv_specdec_summary(const srv_specdec_opts_t *o, uint64_t draft, uint64_t accepted,
                                char *buf, size_t cap);

/* The engine flags of the offline commands that batch many requests
 * (eval, perplexity): --threads, --device, --max-num-seqs,
 * --max-num-batched-tokens, --block-size, --sample-threads (0: auto).
 * srv_engine_opt takes one (1
 * when opt is none of them, KVS_EINVAL after saying why). */
typedef struct srv_engine_opts {
    const char *device;
    uint32_t threads, max_seqs, max_tokens, block_size, sample_threads;
} srv_engine_opts_t;
#define SRV_ENGINE_DEFAULT                                                   \
    (srv_engine_opts_t)                                                      \
    {                                                                        \
        .device = "cpu", .max_seqs = 8, .max_tokens = 2048, .block_size = 16 \
    }
enum { SRV_O_THREADS = 1300, SRV_O_DEVICE, SRV_O_SEQS, SRV_O_BATCHED, SRV_O_BLOCK, SRV_O_SAMPLETH };
/* clang-format off */
#define SRV_ENGINE_LONGOPTS                                                    \
    {"threads", 1, 0, SRV_O_THREADS}, {"device", 1, 0, SRV_O_DEVICE},          \
    {"max-num-seqs", 1, 0, SRV_O_SEQS},                                        \
    {"max-num-batched-tokens", 1, 0, SRV_O_BATCHED},                           \
    {"block-size", 1, 0, SRV_O_BLOCK},                                         \
    {"sample-threads", 1, 0, SRV_O_SAMPLETH}
/* clang-format on */
int srv_engine_opt(const char *cmd, int opt, const char *arg, srv_engine_opts_t *o);
/* An engine for max_seqs sequences of up to max_len tokens each at once,
 * with the KV flags applied (quantized KV: the full-precision staging
 * blocks on top, so every sequence's quantized blocks still fit). */
sched_cfg_t srv_engine_cfg(const srv_engine_opts_t *e, const srv_kv_opts_t *kv, uint32_t max_len);

/* The bundled model used when --model is absent: $KVSERVE_MODEL, else the
 * first of weights/kvserve-main*.gguf found next to the binary's source or
 * install prefix; NULL when none exists. */
const char *srv_default_model(void);

#endif /* SRV_H */
