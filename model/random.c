/*
 * model/random.c — writes GGUF files with deterministic random weights in
 * the shapes of real Llama models, for benchmarks and tests.  Weights are
 * drawn row by row and streamed to disk, so an 8B file never sits in
 * memory.  Every file says what it is: general.name "kvserve random <shape>"
 * and kvserve.random = true.  Quantized types go through kern_quantize_row
 * (ggml's reference quantizers); q4_k files mix Q4_K and Q6_K as
 * llama.cpp's Q4_K_M does.  Called by `kvserve model random` and tests.
 *
 * model_random_load skips the file's tensor data for benchmarks on a
 * device, where writing and reading an 8B model would take longer than
 * what is measured: a sparse file carries the metadata, model_load binds
 * it, and each weight is then overwritten in backend memory with rows of
 * a few random patterns (one per kind of tensor), drawn as the file's rows
 * are.  Called by bench/bench_gpu.c.
 */
#include "model_int.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

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
    /* tiny with 8 layers: Quest's choosing layers between the dense ones
     * and the last are more than one (model/forward.c's step plan). */
    {"tiny-deep", 256, 8, 8, 2, 704, 259, 2048, 10000.0f, 0.0f, false, true},
    {"llama-3.2-1b", 2048, 16, 32, 8, 8192, 128256, 131072, 500000.0f, 32.0f, true, false},
    {"llama-3.1-8b", 4096, 32, 32, 8, 14336, 128256, 131072, 500000.0f, 8.0f, false, false},
    /* A small draft with the Llama 3 vocabulary, for speculative prefill's
     * cost model (bench_spec). */
    {"llama-draft", 512, 2, 8, 2, 1536, 128256, 131072, 500000.0f, 32.0f, true, false},
};

typedef struct rng {
    uint64_t s;
} rng_t;

/* splitmix64: plenty for weights, and trivially seekable per tensor. */
static inline uint64_t
rng_next(rng_t *r)
{
    return kvs_mix64(r->s += 0x9e3779b97f4a7c15ull);
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

/* Every tokenizer.* key of a vocabulary file, verbatim. */
static int
copy_vocab(model_gguf_writer_t *w, const model_gguf_t *vocab)
{
    for (uint32_t i = 0; i < model_gguf_n_kv(vocab); i++) {
        const char *key = model_gguf_kv_key(vocab, i);
        const void *value;
        size_t len;
        if (strncmp(key, "tokenizer.", 10) != 0)
            continue;
        int rc = model_gguf_kv_raw(vocab, i, &value, &len);
        rc = rc ? rc : model_gguf_writer_set_raw(w, key, model_gguf_kv_type(vocab, i), value, len);
        if (rc)
            return rc;
    }
    return 0;
}

static int
write_meta(model_gguf_writer_t *w, const shape_t *sh, kern_dtype_t dtype, uint64_t seed,
           const model_gguf_t *vocab)
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
    if (vocab != NULL)
        return copy_vocab(w, vocab);
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

/* One row of n floats in `type` into buf (kern_row_bytes(type, n) bytes). */
static int
encode_row(const float *row, uint32_t n, kern_dtype_t type, void *buf)
{
    switch (type) {
    case KERN_F32:
        memcpy(buf, row, n * sizeof(float));
        return 0;
    case KERN_F16:
        for (uint32_t i = 0; i < n; i++)
            ((uint16_t *)buf)[i] = kvs_f32_to_fp16(row[i]);
        return 0;
    case KERN_BF16:
        for (uint32_t i = 0; i < n; i++)
            ((uint16_t *)buf)[i] = kvs_f32_to_bf16(row[i]);
        return 0;
    default:
        /* Q8_0, Q4_0, the K-quants: ggml's reference quantizers. */
        return kern_quantize_row(type, row, buf, n);
    }
}

static int
write_row(model_gguf_writer_t *w, const float *row, uint32_t n, kern_dtype_t type, void *buf)
{
    if (type == KERN_F32)
        return model_gguf_writer_write(w, row, n * sizeof(float));
    int rc = encode_row(row, n, type, buf);
    return rc ? rc : model_gguf_writer_write(w, buf, kern_row_bytes(type, n));
}

static int
find_shape(const char *shape, kern_dtype_t dtype, const shape_t **out, char *err, size_t err_len)
{
    *out = NULL;
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        if (strcmp(shapes[i].name, shape) == 0)
            *out = &shapes[i];
    if (*out == NULL) {
        model__errf(err, err_len,
                    "unknown shape '%s' (tiny, tiny-deep, llama-3.2-1b, llama-3.1-8b, llama-draft)",
                    shape);
        return KVS_EINVAL;
    }
    if (dtype != KERN_F32 && dtype != KERN_F16 && dtype != KERN_BF16 && dtype != KERN_Q8_0 &&
        dtype != KERN_Q4_0 && dtype != KERN_Q4_K && dtype != KERN_Q5_K && dtype != KERN_Q6_K) {
        model__errf(err, err_len,
                    "unsupported dtype for random weights "
                    "(f32, f16, bf16, q8_0, q4_0, q4_k, q5_k, q6_k)");
        return KVS_EINVAL;
    }
    return 0;
}

/* Declares every tensor of `sh` (rope_freqs first, then the plan), writes
 * the header, metadata and rope factors to path; the plan's data comes
 * next, in plan order.  plan holds 4 + 9 * n_layer entries; row at least
 * n_rot / 2 floats. */
static int
start_file(const shape_t *sh, kern_dtype_t dtype, uint64_t seed, const model_gguf_t *vocab,
           const char *path, tensor_plan_t *plan, uint32_t *n_plan, float *row,
           model_gguf_writer_t **out)
{
    model_gguf_writer_t *w = NULL;
    int rc = model_gguf_writer_new(&w);
    *out = w;
    *n_plan = 0;
    if (rc)
        return rc;
    uint32_t n = plan_tensors(sh, dtype, plan);
    *n_plan = n;
    rc = write_meta(w, sh, dtype, seed, vocab);
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
    return rc;
}

/* The shape with vocab's tokens for its own: a vocabulary the loader
 * accepts (its error otherwise), and as many embedding and output rows as
 * it has tokens. */
static int
vocab_shape(const model_gguf_t *vocab, shape_t *sh, char *err, size_t err_len)
{
    model_vocab_t *v = NULL;
    char why[256] = "";
    /* The loader reads a file without one as bytes; here that is a
     * mistake. */
    if (model_gguf_find_key(vocab, "tokenizer.ggml.tokens") < 0) {
        model__errf(err, err_len, "vocabulary: the file has no tokenizer.ggml.tokens");
        return KVS_EINVAL;
    }
    int rc = model_vocab_new(vocab, &v, why, sizeof why);
    if (rc) {
        model__errf(err, err_len, "vocabulary: %s", why);
        return rc;
    }
    sh->n_vocab = model_vocab_n_tokens(v);
    sh->byte_vocab = false;
    model_vocab_free(v);
    return 0;
}

int
model_random_write(const char *shape, kern_dtype_t dtype, uint64_t seed, const model_gguf_t *vocab,
                   const char *path, char *err, size_t err_len)
{
    const shape_t *found;
    int rc = find_shape(shape, dtype, &found, err, err_len);
    if (rc)
        return rc;
    shape_t own = *found;
    const shape_t *sh = &own;
    if (vocab != NULL && (rc = vocab_shape(vocab, &own, err, err_len)))
        return rc;
    tensor_plan_t *plan = calloc(4 + 9 * (size_t)sh->n_layer, sizeof *plan);
    uint32_t max_cols = sh->n_ff > sh->n_embd ? sh->n_ff : sh->n_embd;
    float *row = malloc(max_cols * sizeof(float));
    void *buf = malloc(max_cols * sizeof(float));
    model_gguf_writer_t *w = NULL;
    uint32_t n = 0;
    rc = (!plan || !row || !buf) ? KVS_ENOMEM
                                 : start_file(sh, dtype, seed, vocab, path, plan, &n, row, &w);
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

/* ------------------------------------------------------------------------ */
/* Random models straight into backend memory.                              */
/* ------------------------------------------------------------------------ */

#define PATTERN_BYTES ((size_t)32 << 20) /* random rows drawn per distinct tensor kind */
#define MAX_PATTERNS 8

/* Rows of one kind of tensor (type, width, distribution), drawn once and
 * shared by every tensor of that kind. */
typedef struct pattern {
    kern_dtype_t type;
    uint32_t n_cols;
    float center, spread;
    uint32_t n_rows;
    size_t row_bytes;
    uint8_t *data;
} pattern_t;

static const pattern_t *
get_pattern(pattern_t *pats, uint32_t *n_pats, const tensor_plan_t *p, uint64_t seed, float *row)
{
    for (uint32_t i = 0; i < *n_pats; i++)
        if (pats[i].type == p->type && pats[i].n_cols == p->n_cols && pats[i].center == p->center &&
            pats[i].spread == p->spread)
            return &pats[i];
    if (*n_pats == MAX_PATTERNS)
        return NULL;
    pattern_t *q = &pats[*n_pats];
    q->type = p->type;
    q->n_cols = p->n_cols;
    q->center = p->center;
    q->spread = p->spread;
    q->row_bytes = kern_row_bytes(p->type, p->n_cols);
    q->n_rows = (uint32_t)(PATTERN_BYTES / q->row_bytes);
    if (q->n_rows == 0)
        q->n_rows = 1;
    q->data = malloc((size_t)q->n_rows * q->row_bytes);
    if (q->data == NULL)
        return NULL;
    rng_t r = {seed * 0x100000001b3ull + 0x5bd1e995u * (*n_pats + 1)};
    for (uint32_t j = 0; j < q->n_rows; j++) {
        for (uint32_t c = 0; c < q->n_cols; c++)
            row[c] = q->center + q->spread * rng_uniform(&r);
        if (encode_row(row, q->n_cols, q->type, q->data + (size_t)j * q->row_bytes) != 0) {
            free(q->data);
            return NULL;
        }
    }
    (*n_pats)++;
    return q;
}

/* Overwrites the n_rows x row_bytes weight at t->data with pattern rows,
 * starting at a row that differs from tensor to tensor. */
static int
fill_tensor(kern_backend_t *be, const kern_tensor_t *t, const pattern_t *q, uint32_t index)
{
    uint32_t at = (uint32_t)(((uint64_t)index * 7919u) % q->n_rows);
    for (uint32_t r = 0; r < t->n_rows;) {
        uint32_t k = q->n_rows - at < t->n_rows - r ? q->n_rows - at : t->n_rows - r;
        int rc = kern_upload(be, (char *)t->data + (size_t)r * t->row_bytes,
                             q->data + (size_t)at * q->row_bytes, (size_t)k * q->row_bytes);
        if (rc)
            return rc;
        r += k;
        at = 0;
    }
    return 0;
}

/* The model's tensors in plan order (plan_tensors). */
static uint32_t
model_tensors(model_t *m, kern_tensor_t **ts)
{
    uint32_t n = 0;
    ts[n++] = &m->tok_embd;
    ts[n++] = &m->output_norm;
    if (!m->hp.tied_output)
        ts[n++] = &m->output;
    for (uint32_t l = 0; l < m->hp.n_layer; l++) {
        model_layer_t *L = &m->layers[l];
        kern_tensor_t *lt[] = {&L->attn_norm, &L->wq,     &L->wk,   &L->wv,    &L->wo,
                               &L->ffn_norm,  &L->w_gate, &L->w_up, &L->w_down};
        for (size_t i = 0; i < sizeof lt / sizeof lt[0]; i++)
            ts[n++] = lt[i];
    }
    return n;
}

static int
fill_weights(model_t *m, const tensor_plan_t *plan, uint32_t n_plan, uint64_t seed, float *row,
             char *err, size_t err_len)
{
    kern_tensor_t **ts = calloc(3 + 9 * (size_t)m->hp.n_layer, sizeof *ts);
    if (ts == NULL)
        return KVS_ENOMEM;
    int rc = 0;
    if (model_tensors(m, ts) != n_plan) {
        model__errf(err, err_len, "random model: the loaded tensors do not match the plan");
        rc = KVS_EFORMAT;
    }
    for (uint32_t i = 0; rc == 0 && i < n_plan; i++) {
        if (ts[i]->type != plan[i].type || ts[i]->n_cols != plan[i].n_cols ||
            ts[i]->n_rows != plan[i].n_rows) {
            model__errf(err, err_len, "random model: '%s' is not what was planned", plan[i].name);
            rc = KVS_EFORMAT;
        } else if (ts[i]->layout != KERN_LAYOUT_ROWS ||
                   (kern_backend_is_host(m->be) && m->host_copy == NULL)) {
            model__errf(err, err_len,
                        "random model: the %s backend keeps '%s' read-only or packed; write a "
                        "file with model_random_write instead",
                        kern_backend_name(m->be), plan[i].name);
            rc = KVS_ENOTSUP;
        }
    }
    pattern_t pats[MAX_PATTERNS];
    uint32_t n_pats = 0;
    for (uint32_t i = 0; rc == 0 && i < n_plan; i++) {
        const pattern_t *q = get_pattern(pats, &n_pats, &plan[i], seed, row);
        rc = q ? fill_tensor(m->be, ts[i], q, i) : KVS_ENOMEM;
    }
    for (uint32_t i = 0; i < n_pats; i++)
        free(pats[i].data);
    free(ts);
    return rc;
}

int
model_random_load(const char *shape, kern_dtype_t dtype, uint64_t seed, kern_backend_t *be,
                  model_t **out, char *err, size_t err_len)
{
    *out = NULL;
    const shape_t *sh;
    int rc = find_shape(shape, dtype, &sh, err, err_len);
    if (rc)
        return rc;
    const char *dir = getenv("TMPDIR");
    char path[4096];
    snprintf(path, sizeof path, "%s/kvserve-random-XXXXXX", dir && *dir ? dir : "/tmp");
    int fd = mkstemp(path);
    if (fd < 0) {
        model__errf(err, err_len, "random model: cannot create a file like '%s'", path);
        return KVS_EIO;
    }
    close(fd);

    tensor_plan_t *plan = calloc(4 + 9 * (size_t)sh->n_layer, sizeof *plan);
    uint32_t max_cols = sh->n_ff > sh->n_embd ? sh->n_ff : sh->n_embd;
    float *row = malloc(max_cols * sizeof(float));
    model_gguf_writer_t *w = NULL;
    uint32_t n = 0;
    rc = (!plan || !row) ? KVS_ENOMEM : start_file(sh, dtype, seed, NULL, path, plan, &n, row, &w);
    /* Closing the writer here leaves the header and the rope factors; the
     * rest of the file becomes a hole (every tensor plus the alignment
     * padding the writer would add, 32 bytes unless set otherwise), which
     * costs neither disk nor the time to write it. */
    model_gguf_writer_free(w);
    struct stat st;
    if (rc == 0 && stat(path, &st) != 0)
        rc = KVS_EIO;
    if (rc == 0) {
        uint64_t size = (uint64_t)st.st_size;
        for (uint32_t i = 0; i < n; i++)
            size += kern_row_bytes(plan[i].type, plan[i].n_cols) * plan[i].n_rows + 32;
        if (truncate(path, (off_t)size) != 0)
            rc = KVS_EIO;
    }
    model_t *m = NULL;
    if (rc == 0)
        rc = model_load(path, be, &m, err, err_len);
    else
        model__errf(err, err_len, "random model: writing '%s' failed: %s", path, kvs_strerror(rc));
    unlink(path); /* the mapping keeps it while the model lives */
    if (rc == 0)
        rc = fill_weights(m, plan, n, seed, row, err, err_len);
    if (rc == 0 && kern_sync(be) != 0)
        rc = KVS_EDEVICE;
    free(plan);
    free(row);
    if (rc) {
        model_free(m);
        return rc;
    }
    *out = m;
    return 0;
}
