/*
 * serve/main.c — the kvserve binary: dispatches to a subcommand.
 */
#include "srv.h"

#include <stdlib.h>
#include <string.h>

static const char usage[] =
    "usage: kvserve <command> [options]\n"
    "\n"
    "commands:\n"
    "  serve    the gRPC server\n"
    "  generate stream a generation from a running server\n"
    "  health   ask a running server whether it is serving\n"
    "  bench    load a running server with streaming requests; latency and throughput\n"
    "  run      generate text offline from a prompt (no server)\n"
    "  model    inspect a GGUF file (info) or write a random-weight model (random)\n"
    "  eval     long-context retrieval accuracy (passkey, multi-key needle, variable tracking)\n"
    "  perplexity  a text's perplexity through the engine, under any attention or KV policy\n"
    "\n"
    "kvserve <command> --help shows the options of a command.\n";

int
main(int argc, char **argv)
{
    const char *lvl = getenv("KVSERVE_LOG_LEVEL");
    kvs_log_level_t level;
    if (lvl && kvs_log_parse_level(lvl, &level) == 0)
        kvs_log_set_level(level);
    if (argc < 2) {
        fputs(usage, stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "serve") == 0)
        return srv_cmd_serve(argc - 1, argv + 1);
    if (strcmp(cmd, "generate") == 0)
        return srv_cmd_generate(argc - 1, argv + 1);
    if (strcmp(cmd, "health") == 0)
        return srv_cmd_health(argc - 1, argv + 1);
    if (strcmp(cmd, "bench") == 0)
        return srv_cmd_bench(argc - 1, argv + 1);
    if (strcmp(cmd, "run") == 0)
        return srv_cmd_run(argc - 1, argv + 1);
    if (strcmp(cmd, "model") == 0)
        return srv_cmd_model(argc - 1, argv + 1);
    if (strcmp(cmd, "eval") == 0)
        return srv_cmd_eval(argc - 1, argv + 1);
    if (strcmp(cmd, "perplexity") == 0)
        return srv_cmd_perplexity(argc - 1, argv + 1);
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0 || strcmp(cmd, "help") == 0) {
        fputs(usage, stdout);
        return 0;
    }
    if (strcmp(cmd, "--version") == 0) {
        printf("kvserve 0.1.0\n");
        return 0;
    }
    fprintf(stderr, "kvserve: unknown command '%s'\n%s", cmd, usage);
    return 2;
}
