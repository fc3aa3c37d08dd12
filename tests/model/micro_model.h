/*
 * tests/model/micro_model.h — a one-layer Llama model 32 wide, written with
 * the GGUF writer, for tests that need a whole model file of a given
 * vocabulary: fuzz_model's seeds, test_srv_tokens (pieces of hundreds of
 * bytes).  Weights are small fixed pseudo-random values.
 */
#ifndef KVS_TESTS_MICRO_MODEL_H
#define KVS_TESTS_MICRO_MODEL_H

#include "base/kvs.h"
#include "kernels/kern.h"
#include "model/model.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MICRO_D 32
#define MICRO_HEADS 2
#define MICRO_KV_HEADS 1
#define MICRO_FF 32

/* A vocabulary for micro_model_write: n tokens with their GGUF token
 * types and SentencePiece scores ("llama" tokenizer), BOS and EOS ids.
 * NULL toks: no tokenizer keys (ids are bytes), n only sizes the
 * embedding. */
typedef struct micro_vocab {
    const char *const *toks;
    const int32_t *types;
    const float *scores;
    uint32_t n;
    uint32_t bos, eos;
} micro_vocab_t;

/* Bytes of small pseudo-random values for a tensor of type t, rows x
 * cols (cols a multiple of t's block). */
static inline int
micro_write_values(model_gguf_writer_t *w, kern_dtype_t t, uint32_t cols, uint32_t rows,
                   uint32_t *rng)
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

/* The model to path: matrices of type mat (F32 or Q8_0), an output
 * matrix or tied embeddings. */
static inline int
micro_model_write(const char *path, kern_dtype_t mat, bool output, const micro_vocab_t *v,
                  uint32_t seed)
{
    model_gguf_writer_t *w;
    int rc = model_gguf_writer_new(&w);
    if (rc != 0)
        return rc;
#define MICRO_TRY(x)  \
    do {              \
        if (rc == 0)  \
            rc = (x); \
    } while (0)
    MICRO_TRY(model_gguf_writer_set_str(w, "general.architecture", "llama"));
    MICRO_TRY(model_gguf_writer_set_u32(w, "llama.embedding_length", MICRO_D));
    MICRO_TRY(model_gguf_writer_set_u32(w, "llama.block_count", 1));
    MICRO_TRY(model_gguf_writer_set_u32(w, "llama.attention.head_count", MICRO_HEADS));
    MICRO_TRY(model_gguf_writer_set_u32(w, "llama.attention.head_count_kv", MICRO_KV_HEADS));
    MICRO_TRY(model_gguf_writer_set_u32(w, "llama.feed_forward_length", MICRO_FF));
    MICRO_TRY(model_gguf_writer_set_u32(w, "llama.context_length", 64));
    MICRO_TRY(model_gguf_writer_set_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f));
    MICRO_TRY(model_gguf_writer_set_f32(w, "llama.rope.freq_base", 10000.0f));
    if (v->toks) {
        MICRO_TRY(model_gguf_writer_set_str(w, "tokenizer.ggml.model", "llama"));
        MICRO_TRY(model_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", v->toks, NULL, v->n));
        MICRO_TRY(model_gguf_writer_set_arr_f32(w, "tokenizer.ggml.scores", v->scores, v->n));
        MICRO_TRY(model_gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", v->types, v->n));
        MICRO_TRY(model_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", v->bos));
        MICRO_TRY(model_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", v->eos));
    }
    const struct {
        const char *name;
        uint32_t cols, rows;
        bool matrix;
    } ts[] = {
        {"token_embd.weight", MICRO_D, v->n, true},
        {"output_norm.weight", MICRO_D, 1, false},
        {"output.weight", MICRO_D, v->n, true},
        {"blk.0.attn_norm.weight", MICRO_D, 1, false},
        {"blk.0.attn_q.weight", MICRO_D, MICRO_D, true},
        {"blk.0.attn_k.weight", MICRO_D, MICRO_D / MICRO_HEADS * MICRO_KV_HEADS, true},
        {"blk.0.attn_v.weight", MICRO_D, MICRO_D / MICRO_HEADS * MICRO_KV_HEADS, true},
        {"blk.0.attn_output.weight", MICRO_D, MICRO_D, true},
        {"blk.0.ffn_norm.weight", MICRO_D, 1, false},
        {"blk.0.ffn_gate.weight", MICRO_D, MICRO_FF, true},
        {"blk.0.ffn_up.weight", MICRO_D, MICRO_FF, true},
        {"blk.0.ffn_down.weight", MICRO_FF, MICRO_D, true},
    };
    const size_t n_ts = sizeof ts / sizeof ts[0];
    for (size_t i = 0; i < n_ts; i++) {
        if (i == 2 && !output)
            continue;
        kern_dtype_t t = ts[i].matrix ? mat : KERN_F32;
        MICRO_TRY(model_gguf_writer_add_tensor(w, ts[i].name, ts[i].rows > 1 ? 2 : 1,
                                               (uint64_t[]){ts[i].cols, ts[i].rows}, t));
    }
    MICRO_TRY(model_gguf_writer_begin(w, path));
    for (size_t i = 0; i < n_ts; i++) {
        if (i == 2 && !output)
            continue;
        MICRO_TRY(
            micro_write_values(w, ts[i].matrix ? mat : KERN_F32, ts[i].cols, ts[i].rows, &seed));
    }
    MICRO_TRY(model_gguf_writer_finish(w));
#undef MICRO_TRY
    model_gguf_writer_free(w);
    return rc;
}

#endif
