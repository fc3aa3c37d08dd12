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
#include "tests/model/micro_model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static kern_backend_t *be;

/* ------------------------------------------------------------------------ */
/* Seed corpus.                                                             */
/* ------------------------------------------------------------------------ */

#define N_VOCAB 260

/* Seed k: 0 f32 matrices, tied embeddings, no vocabulary (ids are bytes);
 * 1 Q8_0 matrices, an output matrix, a SentencePiece vocabulary of
 * control, byte and one normal token. */
static int
write_seed(const char *path, int k)
{
    static char store[N_VOCAB][8];
    static const char *toks[N_VOCAB];
    static float scores[N_VOCAB];
    static int32_t types[N_VOCAB];
    for (int i = 0; i < N_VOCAB; i++) {
        if (i < 3)
            snprintf(store[i], sizeof store[i], "%s", i == 0 ? "<unk>" : i == 1 ? "<s>" : "</s>");
        else if (i < 259)
            snprintf(store[i], sizeof store[i], "<0x%02X>", i - 3);
        else
            snprintf(store[i], sizeof store[i], "\xe2\x96\x81");
        toks[i] = store[i];
        scores[i] = i < 259 ? 0.0f : -1.0f;
        types[i] = i == 0 ? 2 : i < 3 ? 3 : i < 259 ? 6 : 1;
    }
    micro_vocab_t v = {k == 1 ? toks : NULL, types, scores, N_VOCAB, 1, 2};
    return micro_model_write(path, k == 0 ? KERN_F32 : KERN_Q8_0, k == 1, &v, 12345u + (uint32_t)k);
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    kvs_log_set_level(KVS_LOG_ERROR);
    kern_backend_cfg_t cfg = {.n_threads = 1};
    if (kern_backend_new("cpu", &cfg, &be) != 0)
        abort();
    fuzz_seed(*argc, *argv, 2, ".gguf", write_seed);
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
