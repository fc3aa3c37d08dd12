/*
 * model/random.c — writes GGUF files with deterministic random weights in
 * the shapes of real Llama models, for benchmarks and tests.  Weights are
 * drawn row by row and streamed to disk, so an 8B file never sits in
 * memory.  Every file says what it is: general.name "kvserve random <shape>"
 * and kvserve.random = true.  Quantized types go through kern_quantize_row
 * (ggml's reference quantizers); q4_k files mix Q4_K and Q6_K as
 * llama.cpp's Q4_K_M does.  Called by `kvserve model random` and tests.
 */
#include "model_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct shape {
    const char *name;
    uint32_t n_embd, n_layer, n_head, n_head_kv, n_ff, n_vocab, n_ctx;
    float rope_base;
    float llama3_factor; /* 0: no rope_freqs tensor */
    bool tied;
    bool byte_vocab; /* write the gpt2 byte vocabulary (n_vocab must be 259) */
} shape_t;

static const shape_t shapes[] = {
    {"tiny", 256, 4, 8, 2, 704, 259, 2048, 10000.0f, 0.0f, false, true},
    {"llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, 131072, 500000.0f, 32.0f, true, false},
    {"llama-3.1-8b", 4096, 32, 32, 8, 14336, 128256, 131072, 500000.0f, 8.0f, false, false},
};

typedef struct rng {
    uint64_t s;
} rng_t;

/* splitmix64: plenty for weights, and trivially seekable per tensor. */
static inline uint64_t
rng_next(rng_t *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [-1, 1). */
static inline float
rng_uniform(rng_t *r)
{
    return (float)((int64_t)rng_next(r) >> 40) * (1.0f / 8388608.0f);
}

typedef struct tensor_plan {
    char name[64];
    uint32_t n_cols, n_rows;
    kern_dtype_t type;
    float center, spread; /* value = center + spread * U(-1,1) */
} tensor_plan_t;

/* llama.cpp's use_more_bits (llama-quant.cpp): the layers whose attn_v
 * and ffn_down a Q4_K_M file keeps in Q6_K: the first and last eighth,
 * and every third in between. */
static bool
use_more_bits(uint32_t i, uint32_t n)
{
    return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
}

/* The type of one matrix of a `dtype` file.  K-quant rows must hold whole
 * 256-value super-blocks; narrower multiples of 32 (the tiny shape's
 * ffn_down, 704 columns) fall back to Q8_0, as llama.cpp does for Q6_K. */
static kern_dtype_t
mat_type(kern_dtype_t dtype, uint32_t cols, bool more_bits)
{
    kern_dtype_t t = dtype == KERN_Q4_K && more_bits ? KERN_Q6_K : dtype;
    if ((t == KERN_Q4_K || t == KERN_Q5_K || t == KERN_Q6_K) && cols % KERN_QK_K != 0)
        t = KERN_Q8_0;
    return t;
}

/* q4_k writes what llama-quantize's Q4_K_M does: Q6_K for output.weight
 * (token_embd.weight when the output is tied to it) and for attn_v and
 * ffn_down of the use_more_bits layers, Q4_K elsewhere.  The other types
 * are used for every matrix (llama-quantize --pure). */
static uint32_t
plan_tensors(const shape_t *sh, kern_dtype_t dtype, tensor_plan_t *p)
{
    uint32_t n = 0, d = sh->n_embd, hd = sh->n_embd / sh->n_head;
    uint32_t qd = sh->n_head * hd, kvd = sh->n_head_kv * hd;
    bool more = false; /* the current matrix gets Q6_K in a Q4_K_M file */
    /* std 1/sqrt(fan_in) keeps activations O(1) through the residual. */
#define MAT(nm, cols, rows)                                                    \
    (p[n] = (tensor_plan_t){"", cols, rows, mat_type(dtype, cols, more), 0.0f, \
                            sqrtf(3.0f / (float)(cols))},                      \
     snprintf(p[n].name, sizeof p[n].name, "%s", nm), n++, more = false)
#define VEC(nm, cols)                                           \
    (p[n] = (tensor_plan_t){"", cols, 1, KERN_F32, 1.0f, 0.1f}, \
     snprintf(p[n].name, sizeof p[n].name, "%s", nm), n++)
    more = sh->tied;
    MAT("token_embd.weight", d, sh->n_vocab);
    VEC("output_norm.weight", d);
    if (!sh->tied) {
        more = true;
        MAT("output.weight", d, sh->n_vocab);
    }
    for (uint32_t l = 0; l < sh->n_layer; l++) {
        char nm[64];
#define LNAME(s) (snprintf(nm, sizeof nm, "blk.%u." s, l), nm)
        VEC(LNAME("attn_norm.weight"), d);
        MAT(LNAME("attn_q.weight"), d, qd);
        MAT(LNAME("attn_k.weight"), d, kvd);
        more = use_more_bits(l, sh->n_layer);
        MAT(LNAME("attn_v.weight"), d, kvd);
        MAT(LNAME("attn_output.weight"), qd, d);
        VEC(LNAME("ffn_norm.weight"), d);
        MAT(LNAME("ffn_gate.weight"), d, sh->n_ff);
        MAT(LNAME("ffn_up.weight"), d, sh->n_ff);
        more = use_more_bits(l, sh->n_layer);
        MAT(LNAME("ffn_down.weight"), sh->n_ff, d);
#undef LNAME
    }
#undef MAT
#undef VEC
    return n;
}

/* Llama 3.1 rope scaling factors (gguf.md 1.2), low 1, high 4, orig 8192. */
static void
llama3_factors(const shape_t *sh, float *f, uint32_t n)
{
    const double lo = 1.0, hi = 4.0, orig = 8192.0, factor = sh->llama3_factor;
    uint32_t n_rot = 2 * n;
    for (uint32_t i = 0; i < n; i++) {
        double freq = pow(sh->rope_base, -2.0 * i / n_rot);
        double wavelen = 2.0 * M_PI / freq;
        if (wavelen < orig / hi) {
            f[i] = 1.0f;
        } else if (wavelen > orig / lo) {
            f[i] = (float)factor;
        } else {
            double s = (orig / wavelen - lo) / (hi - lo);
            f[i] = (float)(1.0 / ((1.0 - s) / factor + s));
        }
    }
}

static int
write_meta(model_gguf_writer_t *w, const shape_t *sh, kern_dtype_t dtype, uint64_t seed)
{
    char name[96];
    snprintf(name, sizeof name, "kvserve random %s %s", sh->name, kern_type_traits(dtype)->name);
    /* llama_ftype: ALL_F32, MOSTLY_F16, Q8_0, Q4_0, Q4_K_M, Q5_K_S, Q6_K, BF16. */
    uint32_t file_type = dtype == KERN_F32    ? 0
                         : dtype == KERN_F16  ? 1
                         : dtype == KERN_Q8_0 ? 7
                         : dtype == KERN_Q4_0 ? 2
                         : dtype == KERN_Q4_K ? 15
                         : dtype == KERN_Q5_K ? 16
                         : dtype == KERN_Q6_K ? 18
                                              : 32;
    int rc = 0;
    rc = rc ? rc : model_gguf_writer_set_str(w, "general.architecture", "llama");
    rc = rc ? rc : model_gguf_writer_set_str(w, "general.name", name);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "general.file_type", file_type);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "general.quantization_version", 2);
    rc = rc ? rc : model_gguf_writer_set_bool(w, "kvserve.random", true);
    rc = rc ? rc : model_gguf_writer_set_u64(w, "kvserve.random.seed", seed);
    rc = rc ? rc : model_gguf_writer_set_str(w, "kvserve.random.shape", sh->name);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.context_length", sh->n_ctx);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.embedding_length", sh->n_embd);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.block_count", sh->n_layer);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.feed_forward_length", sh->n_ff);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.attention.head_count", sh->n_head);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.attention.head_count_kv", sh->n_head_kv);
    rc = rc ? rc : model_gguf_writer_set_f32(w, "llama.attention.layer_norm_rms_epsilon", 1e-5f);
    rc = rc ? rc : model_gguf_writer_set_f32(w, "llama.rope.freq_base", sh->rope_base);
    rc = rc ? rc
            : model_gguf_writer_set_u32(w, "llama.rope.dimension_count", sh->n_embd / sh->n_head);
    rc = rc ? rc : model_gguf_writer_set_u32(w, "llama.vocab_size", sh->n_vocab);
    if (rc)
        return rc;
    if (sh->byte_vocab) {
        /* 256 byte tokens in GPT-2's byte-to-unicode spelling, then BOS,
         * EOS and PAD, with no merges: the bundled models' vocabulary. */
        static char store[259][8];
        const char *toks[259];
        size_t lens[259];
        int32_t types[259];
        for (uint32_t b = 0; b < 256; b++) {
            uint32_t cp = model__byte_to_codepoint(b);
            if (cp < 0x80) {
                store[b][0] = (char)cp;
                lens[b] = 1;
            } else {
                store[b][0] = (char)(0xc0 | (cp >> 6));
                store[b][1] = (char)(0x80 | (cp & 0x3f));
                lens[b] = 2;
            }
            toks[b] = store[b];
            types[b] = 1;
        }
        const char *special[3] = {"<|bos|>", "<|eos|>", "<|pad|>"};
        for (int i = 0; i < 3; i++) {
            toks[256 + i] = special[i];
            lens[256 + i] = strlen(special[i]);
            types[256 + i] = 3;
        }
        rc = rc ? rc : model_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2");
        rc = rc ? rc : model_gguf_writer_set_str(w, "tokenizer.ggml.pre", "gpt-2");
        rc = rc ? rc : model_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, lens, 259);
        rc = rc ? rc : model_gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", types, 259);
        rc = rc ? rc : model_gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", NULL, NULL, 0);
        rc = rc ? rc : model_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 256);
        rc = rc ? rc : model_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 257);
        rc = rc ? rc : model_gguf_writer_set_u32(w, "tokenizer.ggml.padding_token_id", 258);
        rc = rc ? rc : model_gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", true);
    } else {
        /* No vocabulary: kvserve treats ids 0..255 as bytes. */
        rc = rc ? rc : model_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 128000);
        rc = rc ? rc : model_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 128001);
    }
    return rc;
}

static int
write_row(model_gguf_writer_t *w, const float *row, uint32_t n, kern_dtype_t type, void *buf)
{
    switch (type) {
    case KERN_F32:
        return model_gguf_writer_write(w, row, n * sizeof(float));
    case KERN_F16:
        for (uint32_t i = 0; i < n; i++)
            ((uint16_t *)buf)[i] = kvs_f32_to_fp16(row[i]);
        return model_gguf_writer_write(w, buf, n * 2);
    case KERN_BF16:
        for (uint32_t i = 0; i < n; i++)
            ((uint16_t *)buf)[i] = kvs_f32_to_bf16(row[i]);
        return model_gguf_writer_write(w, buf, n * 2);
    default: {
        /* Q8_0, Q4_0, the K-quants: ggml's reference quantizers. */
        int rc = kern_quantize_row(type, row, buf, n);
        return rc ? rc : model_gguf_writer_write(w, buf, kern_row_bytes(type, n));
    }
    }
}

int
model_random_write(const char *shape, kern_dtype_t dtype, uint64_t seed, const char *path,
                   char *err, size_t err_len)
{
    const shape_t *sh = NULL;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        if (strcmp(shapes[i].name, shape) == 0)
            sh = &shapes[i];
    if (sh == NULL) {
        model__errf(err, err_len, "unknown shape '%s' (tiny, llama-3.2-1b, llama-3.1-8b)", shape);
        return KVS_EINVAL;
    }
    if (dtype != KERN_F32 && dtype != KERN_F16 && dtype != KERN_BF16 && dtype != KERN_Q8_0 &&
        dtype != KERN_Q4_0 && dtype != KERN_Q4_K && dtype != KERN_Q5_K && dtype != KERN_Q6_K) {
        model__errf(err, err_len,
                    "unsupported dtype for random weights "
                    "(f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k)");
        return KVS_EINVAL;
    }
    tensor_plan_t *plan = calloc(4 + 9 * (size_t)sh->n_layer, sizeof *plan);
    uint32_t max_cols = sh->n_ff > sh->n_embd ? sh->n_ff : sh->n_embd;
    float *row = malloc(max_cols * sizeof(float));
    void *buf = malloc(max_cols * sizeof(float));
    model_gguf_writer_t *w = NULL;
    int rc = (!plan || !row || !buf) ? KVS_ENOMEM : model_gguf_writer_new(&w);
    uint32_t n = 0;
    if (rc == 0) {
        n = plan_tensors(sh, dtype, plan);
        rc = write_meta(w, sh, dtype, seed);
    }
    uint32_t n_rot = sh->n_embd / sh->n_head;
    uint64_t ne_rf[1] = {n_rot / 2};
    if (rc == 0 && sh->llama3_factor > 0.0f)
        rc = model_gguf_writer_add_tensor(w, "rope_freqs.weight", 1, ne_rf, KERN_F32);
    for (uint32_t i = 0; rc == 0 && i < n; i++) {
        uint64_t ne[2] = {plan[i].n_cols, plan[i].n_rows};
        rc = model_gguf_writer_add_tensor(w, plan[i].name, plan[i].n_rows > 1 ? 2 : 1, ne,
                                          plan[i].type);
    }
    if (rc == 0)
        rc = model_gguf_writer_begin(w, path);
    if (rc == 0 && sh->llama3_factor > 0.0f) {
        llama3_factors(sh, row, n_rot / 2);
        rc = model_gguf_writer_write(w, row, n_rot / 2 * sizeof(float));
    }
    for (uint32_t i = 0; rc == 0 && i < n; i++) {
        rng_t r = {seed * 0x100000001b3ull + i};
        for (uint32_t j = 0; rc == 0 && j < plan[i].n_rows; j++) {
            for (uint32_t c = 0; c < plan[i].n_cols; c++)
                row[c] = plan[i].center + plan[i].spread * rng_uniform(&r);
            rc = write_row(w, row, plan[i].n_cols, plan[i].type, buf);
        }
    }
    if (rc == 0)
        rc = model_gguf_writer_finish(w);
    if (rc)
        model__errf(err, err_len, "writing '%s' failed: %s", path, kvs_strerror(rc));
    model_gguf_writer_free(w);
    free(plan);
    free(row);
    free(buf);
    return rc;
}
