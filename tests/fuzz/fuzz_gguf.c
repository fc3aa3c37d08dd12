/*
 * tests/fuzz/fuzz_gguf.c — libFuzzer target for the GGUF reader
 * (model/gguf.c).  Each input goes through model_gguf_open_mem; whatever
 * is accepted is read back through every getter, printed, and every
 * tensor's first and last byte is touched, so AddressSanitizer catches any
 * size or offset the reader let through unchecked.  Built only with
 * -DKVS_FUZZ=ON and CC=clang:
 *
 *   ./build-fuzz/fuzz_gguf -max_total_time=60 -rss_limit_mb=2048 corpus/
 *
 * When the first corpus directory is missing or empty, LLVMFuzzerInitialize
 * writes three small valid GGUF files into it with the writer, so CI needs
 * no checked-in binary seeds.
 */
#include "model/model.h"

#include "base/kvs.h"
#include "kernels/kern.h"
#include "tests/fuzz/fuzz_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static FILE *devnull;
static volatile uint8_t sink;

/* ------------------------------------------------------------------------ */
/* Seed corpus.                                                             */
/* ------------------------------------------------------------------------ */

/* Fills n bytes with a fixed pattern so seeds are identical on every run. */
static int
write_pattern(model_gguf_writer_t *w, size_t n, uint8_t salt)
{
    uint8_t buf[256];
    while (n > 0) {
        size_t k = n < sizeof buf ? n : sizeof buf;
        for (size_t i = 0; i < k; i++)
            buf[i] = (uint8_t)(i * 31 + salt);
        int rc = model_gguf_writer_write(w, buf, k);
        if (rc != 0)
            return rc;
        n -= k;
    }
    return 0;
}

/* Seed k (0..2): a llama-like vocabulary file, a quantized file with a
 * 64-byte alignment, and a metadata-only file. */
static int
write_seed(const char *path, int k)
{
    model_gguf_writer_t *w;
    int rc = model_gguf_writer_new(&w);
    if (rc != 0)
        return rc;
    static const char *const toks[] = {"<s>", "</s>", "\xc4\x80", "!", "ab"};
    static const float scores[] = {0.0f, 0.0f, -1.0f, -2.0f, -3.5f};
    static const int32_t types[] = {3, 3, 6, 1, 1};
    size_t data = 0;
    if (k == 0) {
        FUZZ_TRY(model_gguf_writer_set_str(w, "general.architecture", "llama"));
        FUZZ_TRY(model_gguf_writer_set_u32(w, "llama.block_count", 1));
        FUZZ_TRY(model_gguf_writer_set_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f));
        FUZZ_TRY(model_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2"));
        FUZZ_TRY(model_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, 5));
        FUZZ_TRY(model_gguf_writer_set_arr_f32(w, "tokenizer.ggml.scores", scores, 5));
        FUZZ_TRY(model_gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", types, 5));
        FUZZ_TRY(model_gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", true));
        FUZZ_TRY(
            model_gguf_writer_add_tensor(w, "output_norm.weight", 1, (uint64_t[]){4}, KERN_F32));
        FUZZ_TRY(
            model_gguf_writer_add_tensor(w, "token_embd.weight", 2, (uint64_t[]){4, 5}, KERN_F16));
        data = 16 + 40;
    } else if (k == 1) {
        FUZZ_TRY(model_gguf_writer_set_u32(w, "general.alignment", 64));
        FUZZ_TRY(model_gguf_writer_set_u64(w, "k.u64", 1ull << 40));
        FUZZ_TRY(model_gguf_writer_set_i32(w, "k.i32", -7));
        FUZZ_TRY(model_gguf_writer_add_tensor(w, "w.q8", 2, (uint64_t[]){32, 2}, KERN_Q8_0));
        FUZZ_TRY(model_gguf_writer_add_tensor(w, "w.i8", 3, (uint64_t[]){2, 2, 2}, KERN_I8));
        FUZZ_TRY(model_gguf_writer_add_tensor(w, "w.bf16", 1, (uint64_t[]){3}, KERN_BF16));
        data = 68 + 8 + 6;
    } else {
        FUZZ_TRY(model_gguf_writer_set_str(w, "general.name", "seed \"three\"\n"));
        FUZZ_TRY(model_gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", NULL, NULL, 0));
        FUZZ_TRY(model_gguf_writer_set_arr_f32(w, "k.empty", NULL, 0));
        FUZZ_TRY(model_gguf_writer_set_bool(w, "k.false", false));
    }
    FUZZ_TRY(model_gguf_writer_begin(w, path));
    FUZZ_TRY(write_pattern(w, data, (uint8_t)k));
    FUZZ_TRY(model_gguf_writer_finish(w));
    model_gguf_writer_free(w);
    return rc;
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    devnull = fopen("/dev/null", "w");
    fuzz_seed(*argc, *argv, 3, ".gguf", write_seed);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* One input.                                                               */
/* ------------------------------------------------------------------------ */

static size_t
elem_bytes(model_gguf_type_t t)
{
    switch (t) {
    case MODEL_GGUF_UINT8:
    case MODEL_GGUF_INT8:
    case MODEL_GGUF_BOOL:
        return 1;
    case MODEL_GGUF_UINT16:
    case MODEL_GGUF_INT16:
        return 2;
    case MODEL_GGUF_UINT32:
    case MODEL_GGUF_INT32:
    case MODEL_GGUF_FLOAT32:
        return 4;
    case MODEL_GGUF_UINT64:
    case MODEL_GGUF_INT64:
    case MODEL_GGUF_FLOAT64:
        return 8;
    default:
        return 0;
    }
}

static void
touch(const void *p, size_t n)
{
    if (n == 0)
        return;
    const uint8_t *b = p;
    sink ^= b[0];
    sink ^= b[n - 1];
}

static void
exercise_kv(const model_gguf_t *g, uint32_t i)
{
    const char *key = model_gguf_kv_key(g, i);
    FUZZ_CHECK(key != NULL);
    FUZZ_CHECK(model_gguf_find_key(g, key) == (int64_t)i);
    model_gguf_type_t type = model_gguf_kv_type(g, i);
    FUZZ_CHECK((uint32_t)type <= MODEL_GGUF_FLOAT64);

    uint32_t u32;
    uint64_t u64;
    int64_t i64;
    float f;
    bool b;
    model_gguf_str_t s;
    int rc32 = model_gguf_get_u32(g, key, &u32);
    int rc64 = model_gguf_get_u64(g, key, &u64);
    int rci = model_gguf_get_i64(g, key, &i64);
    if (rc32 == 0)
        FUZZ_CHECK(rc64 == 0 && u64 == u32 && rci == 0 && i64 == (int64_t)u32);
    (void)model_gguf_get_f32(g, key, &f);
    FUZZ_CHECK((model_gguf_get_bool(g, key, &b) == 0) == (type == MODEL_GGUF_BOOL));
    if (model_gguf_get_str(g, key, &s) == 0) {
        FUZZ_CHECK(type == MODEL_GGUF_STRING && s.ptr[s.len] == '\0');
        touch(s.ptr, s.len);
    }
    model_gguf_type_t et;
    uint64_t count;
    if (model_gguf_get_arr(g, key, &et, &count) == 0) {
        FUZZ_CHECK(type == MODEL_GGUF_ARRAY && et != MODEL_GGUF_ARRAY);
        const void *data;
        if (et == MODEL_GGUF_STRING) {
            FUZZ_CHECK(model_gguf_arr_data(g, key, &data) == KVS_EFORMAT);
            FUZZ_CHECK(model_gguf_arr_str(g, key, count, &s) == KVS_ERANGE);
            for (uint64_t j = 0; j < count && j < 4; j++) {
                FUZZ_CHECK(model_gguf_arr_str(g, key, j, &s) == 0 && s.ptr[s.len] == '\0');
                touch(s.ptr, s.len);
            }
            if (count > 0) {
                FUZZ_CHECK(model_gguf_arr_str(g, key, count - 1, &s) == 0 && s.ptr[s.len] == '\0');
                touch(s.ptr, s.len);
            }
        } else {
            FUZZ_CHECK(model_gguf_arr_data(g, key, &data) == 0);
            touch(data, (size_t)count * elem_bytes(et));
        }
    }
    model_gguf_kv_print(g, i, devnull);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    model_gguf_t *g;
    char err[512];
    err[0] = '\0';
    int rc = model_gguf_open_mem(data, size, &g, err, sizeof err);
    if (rc != 0) {
        FUZZ_CHECK(rc == KVS_EFORMAT || rc == KVS_ENOMEM);
        FUZZ_CHECK(err[0] != '\0' && strchr(err, '\n') == NULL);
        return 0;
    }
    uint32_t align = model_gguf_alignment(g);
    FUZZ_CHECK(align != 0 && (align & (align - 1)) == 0);
    FUZZ_CHECK(model_gguf_version(g) == 2 || model_gguf_version(g) == 3);
    FUZZ_CHECK(model_gguf_n_tensors(g) == 0 || model_gguf_data_offset(g) <= size);
    for (uint32_t i = 0; i < model_gguf_n_kv(g); i++)
        exercise_kv(g, i);
    FUZZ_CHECK(model_gguf_kv_key(g, model_gguf_n_kv(g)) == NULL);
    FUZZ_CHECK(model_gguf_find_key(g, NULL) == -1);

    for (uint32_t i = 0; i < model_gguf_n_tensors(g); i++) {
        const model_gguf_tensor_t *t = model_gguf_tensor(g, i);
        FUZZ_CHECK(t != NULL && model_gguf_find_tensor(g, t->name) == t);
        FUZZ_CHECK(t->nbytes > 0 && t->offset % align == 0);
        FUZZ_CHECK(t->n_dims >= 1 && t->n_dims <= MODEL_GGUF_MAX_DIMS);
        FUZZ_CHECK(kern_type_traits(t->type) != NULL);
        const uint8_t *p = t->data;
        FUZZ_CHECK(p >= data && (size_t)(p - data) + t->nbytes <= size);
        touch(p, t->nbytes);
    }
    FUZZ_CHECK(model_gguf_tensor(g, model_gguf_n_tensors(g)) == NULL);
    model_gguf_close(g);
    return 0;
}
