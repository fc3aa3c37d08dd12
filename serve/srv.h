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

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

int srv_cmd_run(int argc, char **argv);
int srv_cmd_model(int argc, char **argv);
int srv_cmd_eval(int argc, char **argv);
int srv_cmd_serve(int argc, char **argv);    /* srv_grpc.c: the gRPC server */
int srv_cmd_generate(int argc, char **argv); /* srv_client.c: streaming client */
int srv_cmd_health(int argc, char **argv);   /* srv_client.c: health check */

/* ---- helpers shared by subcommands (srv_cli.c) ---------------------------- */

/* Strict number parsing: the whole string must be a number inside [lo, hi].
 * On failure print "kvserve <cmd>: --flag: ..." to stderr and return
 * KVS_EINVAL. */
int srv_parse_u32(const char *cmd, const char *flag, const char *s, uint32_t lo, uint32_t hi,
                  uint32_t *out);
int srv_parse_u64(const char *cmd, const char *flag, const char *s, uint64_t *out);
int srv_parse_f32(const char *cmd, const char *flag, const char *s, float lo, float hi, float *out);
/* --kv-cache-dtype: f16 or f32. */
int srv_parse_kv_dtype(const char *cmd, const char *s, kern_dtype_t *out);
/* --block-size: a power of two in 1..1024. */
int srv_parse_block_size(const char *cmd, const char *s, uint32_t *out);
/* "1,2,3" -> malloc'd array; every id in [0, INT32_MAX]. */
int srv_parse_tokens(const char *cmd, const char *flag, const char *s, int32_t **out, size_t *n);
/* All of a stream or file, NUL-terminated (*len, if not NULL, excludes the
 * NUL); NULL when it cannot be read or memory runs out. */
char *srv_read_stream(FILE *f, size_t *len);
char *srv_read_file(const char *path, size_t *len);

/* A growable string: put appends (keeping a NUL after the text); a failed
 * allocation sets oom and later puts do nothing.  Free p when done. */
typedef struct srv_buf {
    char *p;
    size_t len, cap;
    bool oom;
} srv_buf_t;
void srv_buf_put(srv_buf_t *b, const char *s, size_t n);
void srv_buf_puts(srv_buf_t *b, const char *s);

/* Writes s as a JSON string literal (quotes and escapes included). */
void srv_json_str(FILE *f, const char *s, size_t len);
/* Prefill attention flags shared by serve and eval (vLLM-style names):
 *   --attention dense|sink-window|delta|block-sparse  --attn-sinks N
 *   --attn-window N  --delta-gamma N  --no-delta-tail  --attn-last-dense
 *   --attn-top-k N (block-sparse: KV blocks picked per query block)
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
    SRV_O_TOPK
};
#define SRV_ATTN_LONGOPTS                                                        \
    {"attention", 1, 0, SRV_O_ATTN}, {"attn-sinks", 1, 0, SRV_O_SINKS},          \
        {"attn-window", 1, 0, SRV_O_WINDOW}, {"delta-gamma", 1, 0, SRV_O_GAMMA}, \
        {"no-delta-tail", 0, 0, SRV_O_NOTAIL}, {"attn-top-k", 1, 0, SRV_O_TOPK}, \
    {                                                                            \
        "attn-last-dense", 0, 0, SRV_O_LASTDENSE                                 \
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

/* The bundled model used when --model is absent: $KVSERVE_MODEL, else the
 * first of weights/kvserve-main*.gguf found next to the binary's source or
 * install prefix; NULL when none exists. */
const char *srv_default_model(void);

#endif /* SRV_H */
