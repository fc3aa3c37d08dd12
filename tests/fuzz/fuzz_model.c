/*
 * tests/fuzz/fuzz_model.c — libFuzzer target for model_load (model/
 * model_load.c): each input is a whole GGUF model file, loaded on the cpu
 * backend as the server loads one.  A file may be refused (with a one-line
 * message), never crash the loader; a model it accepts must then run: a
 * prompt of three tokens and one decode step through the forward pass
 * over a paged KV cache, so a shape the loader let through unchecked shows
 * up under AddressSanitizer as a read past a weight.  Built only with
 * -DKVS_FUZZ=ON and CC=clang:
 *
 *   ./build-fuzz/fuzz_model -max_total_time=60 -max_len=65536 corpus/
 *
 * When the first corpus directory is missing or empty,
 * LLVMFuzzerInitialize writes two small Llama models into it (one layer,
 * 32 wide, 260 tokens): one all f32 with tied embeddings, one with Q8_0
 * matrices, an output matrix and a SentencePiece vocabulary.
 */
/* memfd_create: _GNU_SOURCE comes from the build. */
#include "cache/kv.h"
#include "model/model.h"
#include "sched/sched.h"

#include "base/kvs.h"
#include "tests/fuzz/fuzz_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static kern_backend_t *be;

/* ------------------------------------------------------------------------ */
/* Seed corpus.                                                             */
/* ------------------------------------------------------------------------ */

#define D 32
#define N_HEAD 2
#define N_KV 1
#define FF 32
#define N_VOCAB 260

/* Bytes of small random values for a tensor of type t, rows x cols. */
static int
write_values(model_gguf_writer_t *w, kern_dtype_t t, uint32_t cols, uint32_t rows, uint32_t *rng)
{
    size_t n = (size_t)cols * rows;
    float *f = malloc(n * sizeof *f);
    size_t bytes = kern_row_bytes(t, cols) * rows;
    void *out = malloc(bytes);
    int rc = f && out ? 0 : KVS_ENOMEM;
    for (size_t i = 0; rc == 0 && i < n; i++) {
        *rng = *rng * 1664525u + 1013904223u;
        f[i] = ((float)(*rng >> 8) / 16777216.0f - 0.5f) * 0.2f;
    }
    if (rc == 0 && t == KERN_F32)
        memcpy(out, f, bytes);
    else if (rc == 0)
        rc = kern_quantize_row(t, f, out, n);
    if (rc == 0)
        rc = model_gguf_writer_write(w, out, bytes);
    free(f);
    free(out);
    return rc;
}

static int
write_seed(const char *path, int k)
{
    const kern_dtype_t mat = k == 0 ? KERN_F32 : KERN_Q8_0;
    model_gguf_writer_t *w;
    int rc = model_gguf_writer_new(&w);
    if (rc != 0)
        return rc;
    FUZZ_TRY(model_gguf_writer_set_str(w, "general.architecture", "llama"));
    FUZZ_TRY(model_gguf_writer_set_u32(w, "llama.embedding_length", D));
    FUZZ_TRY(model_gguf_writer_set_u32(w, "llama.block_count", 1));
    FUZZ_TRY(model_gguf_writer_set_u32(w, "llama.attention.head_count", N_HEAD));
    FUZZ_TRY(model_gguf_writer_set_u32(w, "llama.attention.head_count_kv", N_KV));
    FUZZ_TRY(model_gguf_writer_set_u32(w, "llama.feed_forward_length", FF));
    FUZZ_TRY(model_gguf_writer_set_u32(w, "llama.context_length", 64));
    FUZZ_TRY(model_gguf_writer_set_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f));
    FUZZ_TRY(model_gguf_writer_set_f32(w, "llama.rope.freq_base", 10000.0f));
    if (k == 1) {
        static char store[N_VOCAB][8];
        const char *toks[N_VOCAB];
        float scores[N_VOCAB];
        int32_t types[N_VOCAB];
        for (int i = 0; i < N_VOCAB; i++) {
            if (i < 3)
                snprintf(store[i], sizeof store[i], "%s",
                         i == 0   ? "<unk>"
                         : i == 1 ? "<s>"
                                  : "</s>");
            else if (i < 259)
                snprintf(store[i], sizeof store[i], "<0x%02X>", i - 3);
            else
                snprintf(store[i], sizeof store[i], "\xe2\x96\x81");
            toks[i] = store[i];
            scores[i] = i < 259 ? 0.0f : -1.0f;
            types[i] = i == 0 ? 2 : i < 3 ? 3 : i < 259 ? 6 : 1;
        }
        FUZZ_TRY(model_gguf_writer_set_str(w, "tokenizer.ggml.model", "llama"));
        FUZZ_TRY(model_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, N_VOCAB));
        FUZZ_TRY(model_gguf_writer_set_arr_f32(w, "tokenizer.ggml.scores", scores, N_VOCAB));
        FUZZ_TRY(model_gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", types, N_VOCAB));
        FUZZ_TRY(model_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1));
        FUZZ_TRY(model_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2));
    }
    static const struct {
        const char *name;
        uint32_t cols, rows;
        bool matrix;
    } ts[] = {
        {"token_embd.weight", D, N_VOCAB, true},
        {"output_norm.weight", D, 1, false},
        {"output.weight", D, N_VOCAB, true}, /* seed 1 only */
        {"blk.0.attn_norm.weight", D, 1, false},
        {"blk.0.attn_q.weight", D, D, true},
        {"blk.0.attn_k.weight", D, D / N_HEAD * N_KV, true},
        {"blk.0.attn_v.weight", D, D / N_HEAD * N_KV, true},
        {"blk.0.attn_output.weight", D, D, true},
        {"blk.0.ffn_norm.weight", D, 1, false},
        {"blk.0.ffn_gate.weight", D, FF, true},
        {"blk.0.ffn_up.weight", D, FF, true},
        {"blk.0.ffn_down.weight", FF, D, true},
    };
    const size_t n_ts = sizeof ts / sizeof ts[0];
    for (size_t i = 0; i < n_ts; i++) {
        if (i == 2 && k == 0)
            continue;
        kern_dtype_t t = ts[i].matrix ? mat : KERN_F32;
        FUZZ_TRY(model_gguf_writer_add_tensor(w, ts[i].name, ts[i].rows > 1 ? 2 : 1,
                                              (uint64_t[]){ts[i].cols, ts[i].rows}, t));
    }
    FUZZ_TRY(model_gguf_writer_begin(w, path));
    uint32_t rng = 12345u + (uint32_t)k;
    for (size_t i = 0; i < n_ts; i++) {
        if (i == 2 && k == 0)
            continue;
        FUZZ_TRY(write_values(w, ts[i].matrix ? mat : KERN_F32, ts[i].cols, ts[i].rows, &rng));
    }
    FUZZ_TRY(model_gguf_writer_finish(w));
    model_gguf_writer_free(w);
    return rc;
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    kvs_log_set_level(KVS_LOG_ERROR);
    kern_backend_cfg_t cfg = {.n_threads = 1};
    if (kern_backend_new("cpu", &cfg, &be) != 0)
        abort();
    const char *dir = fuzz_corpus_dir(*argc, *argv);
    if (fuzz_wants_seeds(dir)) {
        for (int k = 0; k < 2; k++) {
            char path[4096];
            snprintf(path, sizeof path, "%s/seed%d.gguf", dir, k);
            int rc = write_seed(path, k);
            if (rc != 0)
                fprintf(stderr, "fuzz_model: cannot write seed %s: %s\n", path, kvs_strerror(rc));
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* One input.                                                               */
/* ------------------------------------------------------------------------ */

/* Three prompt tokens, then one decode step, as the engine runs them. */
static void
run(model_t *m)
{
    const model_hparams_t *hp = model_hparams(m);
    kv_pool_cfg_t pc = {.n_layers = hp->n_layer,
                        .n_kv_heads = hp->n_head_kv,
                        .head_dim = hp->head_dim,
                        .block_tokens = 16,
                        .n_blocks = 2,
                        .dtype = KERN_F32};
    kv_pool_t *pool = NULL;
    kv_table_t *t = NULL;
    model_ctx_t *ctx = NULL;
    sched_batch_t *sb = NULL;
    float *logits = malloc((size_t)hp->n_vocab * sizeof *logits);
    /* What the file asks for may be too much for this process: a refusal,
     * not a finding. */
    if (logits == NULL || kv_pool_new(&pc, be, &pool) != 0 || kv_table_new(pool, &t) != 0 ||
        model_ctx_new(m, 8, 1, &ctx) != 0 || sched_batch_new(&sb) != 0)
        goto out;
    const uint32_t nv = hp->n_vocab;
    int32_t prompt[3] = {1 % (int32_t)nv, 7 % (int32_t)nv, (int32_t)(nv - 1)}, next = 0;
    sched_seq_step_t st = {.table = t, .tokens = prompt, .n_tokens = 3, .want_logits = true};
    const model_batch_t *mb;
    FUZZ_CHECK(sched_batch_build(sb, &st, 1, &mb) == 0);
    int rc = model_forward(ctx, kv_pool_kv(pool), mb, logits);
    FUZZ_CHECK(rc == 0 || rc == KVS_ENOMEM);
    if (rc == 0) {
        st = (sched_seq_step_t){.table = t, .tokens = &next, .n_tokens = 1, .want_logits = true};
        FUZZ_CHECK(sched_batch_build(sb, &st, 1, &mb) == 0);
        rc = model_forward(ctx, kv_pool_kv(pool), mb, logits);
        FUZZ_CHECK(rc == 0 || rc == KVS_ENOMEM);
    }
out:
    sched_batch_free(sb);
    model_ctx_free(ctx);
    if (t)
        kv_table_free(t);
    if (pool) {
        FUZZ_CHECK(kv_pool_n_free(pool) == pc.n_blocks);
        kv_pool_free(pool);
    }
    free(logits);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* model_load reads a path: the input as a file in memory. */
    int fd = memfd_create("fuzz_model", 0);
    if (fd < 0)
        return 0;
    size_t done = 0;
    while (done < size) {
        ssize_t k = write(fd, data + done, size - done);
        if (k <= 0)
            break;
        done += (size_t)k;
    }
    char path[64], err[512];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    err[0] = '\0';
    model_t *m = NULL;
    int rc = done == size ? model_load(path, be, &m, err, sizeof err) : KVS_EIO;
    close(fd);
    if (rc != 0) {
        FUZZ_CHECK(m == NULL);
        FUZZ_CHECK(rc == KVS_EFORMAT || rc == KVS_ENOTSUP || rc == KVS_ENOMEM || rc == KVS_EIO);
        FUZZ_CHECK(err[0] != '\0' && strchr(err, '\n') == NULL);
        return 0;
    }
    run(m);
    model_free(m);
    return 0;
}
