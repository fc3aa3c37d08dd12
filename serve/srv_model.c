/*
 * serve/srv_model.c — `kvserve model`: `info PATH` prints a GGUF file's
 * metadata, tensors and (when kvserve can load it) its hyper-parameters;
 * `random` writes a model with deterministic random weights; `tokenize
 * PATH` runs the file's tokenizer over stdin (also on tokenizer-only
 * vocabulary files), for scripts and tests.
 */
#include "srv.h"

#include "model/model.h"

#include <getopt.h>
#include <stdlib.h>
#include <string.h>

static const char model_usage[] =
    "usage: kvserve model info PATH\n"
    "       kvserve model random --shape tiny|tiny-deep|llama-3.2-1b|llama-3.1-8b|llama-draft\n"
    "                            --dtype f32|f16|bf16|q8_0|q4_0|q4_k|q5_k|q6_k\n"
    "                            --out PATH [--seed S]   (q4_k: Q4_K_M's Q4_K/Q6_K mix)\n"
    "                            [--vocab GGUF]   (that file's tokenizer instead of the shape's)\n"
    "       kvserve model tokenize PATH [--no-bos] [--special] [--ids]   (text on stdin)\n";

static int
cmd_info(int argc, char **argv)
{
    if (argc != 2) {
        fputs(model_usage, stderr);
        return 2;
    }
    const char *path = argv[1];
    char err[512] = "";
    model_gguf_t *g;
    if (model_gguf_open(path, &g, err, sizeof err)) {
        fprintf(stderr, "kvserve model info: '%s': %s\n", path, err);
        return 1;
    }
    printf("file: %s\nversion: %u  alignment: %u  data offset: %zu\n", path, model_gguf_version(g),
           model_gguf_alignment(g), model_gguf_data_offset(g));
    printf("\nmetadata (%u keys):\n", model_gguf_n_kv(g));
    for (uint32_t i = 0; i < model_gguf_n_kv(g); i++) {
        printf("  %-44s ", model_gguf_kv_key(g, i));
        model_gguf_kv_print(g, i, stdout);
        printf("\n");
    }
    size_t total = 0;
    printf("\ntensors (%u):\n", model_gguf_n_tensors(g));
    for (uint32_t i = 0; i < model_gguf_n_tensors(g); i++) {
        const model_gguf_tensor_t *t = model_gguf_tensor(g, i);
        const kern_type_traits_t *tr = kern_type_traits(t->type);
        char shape[96];
        int n = snprintf(shape, sizeof shape, "[");
        for (uint32_t d = 0; d < t->n_dims; d++)
            n += snprintf(shape + n, sizeof shape - (size_t)n, "%s%llu", d ? ", " : "",
                          (unsigned long long)t->ne[d]);
        snprintf(shape + n, sizeof shape - (size_t)n, "]");
        printf("  %-32s %-6s %-22s %12zu bytes @ %llu\n", t->name, tr ? tr->name : "?", shape,
               t->nbytes, (unsigned long long)t->offset);
        total += t->nbytes;
    }
    printf("  total %.2f MiB\n", (double)total / (1024.0 * 1024.0));
    model_gguf_close(g);

    kern_backend_t *be;
    kern_backend_cfg_t cfg = {.n_threads = 1};
    if (kern_backend_new("cpu", &cfg, &be) != 0)
        return 0;
    model_t *m;
    err[0] = '\0';
    if (model_load(path, be, &m, err, sizeof err) == 0) {
        const model_hparams_t *hp = model_hparams(m);
        printf("\nmodel: %s, %u layers, d %u, %u heads x %u (%u KV heads), ff %u, vocab %u, "
               "context %u, rope base %g%s%s, tokenizer %s%s\n",
               hp->arch, hp->n_layer, hp->n_embd, hp->n_head, hp->head_dim, hp->n_head_kv, hp->n_ff,
               hp->n_vocab, hp->n_ctx_train, hp->rope_freq_base,
               hp->has_rope_freqs ? " (llama3 scaling)" : "",
               hp->tied_output ? ", tied output" : "", model_tokenizer_name(m),
               hp->is_random ? "\nnote: RANDOM weights (benchmarks only)" : "");
        model_free(m);
    } else {
        printf("\nkvserve cannot run this model: %s\n", err);
    }
    kern_backend_free(be);
    return 0;
}

static int
cmd_random(int argc, char **argv)
{
    static const struct option lo[] = {
        {"shape", 1, 0, 's'}, {"dtype", 1, 0, 'd'}, {"out", 1, 0, 'o'}, {"seed", 1, 0, 'r'},
        {"vocab", 1, 0, 'v'}, {"help", 0, 0, 'h'},  {0, 0, 0, 0},
    };
    const char *shape = NULL, *dtype = NULL, *out = NULL, *vocab_path = NULL;
    uint64_t seed = 1;
    opterr = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 's':
            shape = optarg;
            break;
        case 'd':
            dtype = optarg;
            break;
        case 'o':
            out = optarg;
            break;
        case 'v':
            vocab_path = optarg;
            break;
        case 'r':
            if (srv_parse_u64("model random", "--seed", optarg, &seed))
                return 2;
            break;
        case 'h':
            fputs(model_usage, stdout);
            return 0;
        default:
            fprintf(stderr, "kvserve model random: unknown or incomplete option '%s'\n%s",
                    argv[optind - 1], model_usage);
            return 2;
        }
    }
    if (!shape || !dtype || !out || optind < argc) {
        fprintf(stderr, "kvserve model random: --shape, --dtype and --out are required\n%s",
                model_usage);
        return 2;
    }
    kern_dtype_t t;
    if (kern_dtype_parse(dtype, &t)) {
        fprintf(stderr, "kvserve model random: --dtype: unknown type '%s'\n", dtype);
        return 2;
    }
    char err[512] = "";
    model_gguf_t *vocab = NULL;
    if (vocab_path && model_gguf_open(vocab_path, &vocab, err, sizeof err)) {
        fprintf(stderr, "kvserve model random: --vocab '%s': %s\n", vocab_path, err);
        return 2;
    }
    int rc = model_random_write(shape, t, seed, vocab, out, err, sizeof err);
    model_gguf_close(vocab);
    if (rc) {
        fprintf(stderr, "kvserve model random: %s%s\n",
                vocab_path && strncmp(err, "vocabulary", 10) == 0 ? "--vocab: " : "", err);
        return rc == KVS_EINVAL ? 2 : 1;
    }
    return 0;
}

/* Ids of stdin's text: one line of space-separated ids (--ids), or one
 * "id<TAB>piece" line per token.  --no-bos: no BOS/EOS even when the
 * vocabulary adds them; --special: text like <s> becomes special tokens. */
static int
cmd_tokenize(int argc, char **argv)
{
    static const struct option lo[] = {{"no-bos", 0, 0, 'b'},
                                       {"special", 0, 0, 's'},
                                       {"ids", 0, 0, 'i'},
                                       {"help", 0, 0, 'h'},
                                       {0, 0, 0, 0}};
    bool bos = true, special = false, ids_only = false;
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'b':
            bos = false;
            break;
        case 's':
            special = true;
            break;
        case 'i':
            ids_only = true;
            break;
        case 'h':
            fputs(model_usage, stdout);
            return 0;
        default:
            fputs(model_usage, stderr);
            return 2;
        }
    }
    if (optind != argc - 1) {
        fprintf(stderr, "kvserve model tokenize: expected one PATH\n%s", model_usage);
        return 2;
    }
    const char *path = argv[optind];
    char err[512] = "";
    model_gguf_t *g = NULL;
    model_vocab_t *v = NULL;
    if (model_gguf_open(path, &g, err, sizeof err) || model_vocab_new(g, &v, err, sizeof err)) {
        fprintf(stderr, "kvserve model tokenize: '%s': %s\n", path, err);
        model_gguf_close(g);
        return 1;
    }
    size_t len = 0, n = 0;
    char *text = srv_read_stream(stdin, &len);
    int status = 1;
    unsigned flags = (bos ? MODEL_TOK_ADD_SPECIAL : 0) | (special ? MODEL_TOK_PARSE_SPECIAL : 0);
    int32_t *ids = NULL;
    if (text && model_vocab_tokenize(v, text, len, flags, NULL, 0, &n) != KVS_EINVAL &&
        (ids = malloc((n ? n : 1) * sizeof *ids)) != NULL &&
        model_vocab_tokenize(v, text, len, flags, ids, n, &n) == 0) {
        srv_buf_t piece = {0}; /* whole, however long */
        for (size_t i = 0; i < n; i++) {
            if (ids_only) {
                printf(i ? " %d" : "%d", ids[i]);
                continue;
            }
            piece.len = 0;
            srv_buf_put_piece(&piece, v, ids[i], true);
            printf("%d\t", ids[i]);
            srv_json_str(stdout, piece.p ? piece.p : "", piece.len);
            printf("\n");
        }
        free(piece.p);
        if (ids_only)
            printf("\n");
        status = 0;
    } else {
        fprintf(stderr, "kvserve model tokenize: cannot tokenize the input\n");
    }
    free(ids);
    free(text);
    model_vocab_free(v);
    model_gguf_close(g);
    return status;
}

int
srv_cmd_model(int argc, char **argv)
{
    if (argc < 2) {
        fputs(model_usage, stderr);
        return 2;
    }
    if (strcmp(argv[1], "info") == 0)
        return cmd_info(argc - 1, argv + 1);
    if (strcmp(argv[1], "random") == 0)
        return cmd_random(argc - 1, argv + 1);
    if (strcmp(argv[1], "tokenize") == 0)
        return cmd_tokenize(argc - 1, argv + 1);
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0) {
        fputs(model_usage, stdout);
        return 0;
    }
    fprintf(stderr, "kvserve model: unknown subcommand '%s'\n%s", argv[1], model_usage);
    return 2;
}
