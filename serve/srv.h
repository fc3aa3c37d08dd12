/*
 * serve/srv.h — the kvserve command line: one binary, subcommands.  Each
 * srv_cmd_* takes the arguments after its name and returns the process exit
 * status (0 ok, 1 runtime failure, 2 usage error).  main.c dispatches.
 */
#ifndef SRV_H
#define SRV_H

#include "base/kvs.h"
#include "kernels/kern.h"

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
/* Writes s as a JSON string literal (quotes and escapes included). */
void srv_json_str(FILE *f, const char *s, size_t len);
/* The bundled model used when --model is absent: $KVSERVE_MODEL, else the
 * first of weights/kvserve-main*.gguf found next to the binary's source or
 * install prefix; NULL when none exists. */
const char *srv_default_model(void);

#endif /* SRV_H */
