/*
 * kernels/kern.h — the backend interface: every numeric operation the model
 * and the KV cache need, behind one vtable per device.  Backends:
 *   "ref"  plain scalar C, the reference every other backend is tested against;
 *   "cpu"  SIMD + a thread pool + OpenBLAS for large matrix products;
 *   "cuda" kernels/cuda/ (CUDA C), compiled when nvcc is found (else KVS_ENOTSUP).
 *
 * Callers: model/ (forward pass), cache/ (KV pool memory, block copies),
 * tests and benchmarks.  Kernels never allocate per call and never decide
 * policy: buffers come from kern_alloc(), sizes and layouts from the caller.
 *
 * Paged KV layout (per pool, per layer, K and V in separate buffers):
 *
 *   k[layer] = block[n_blocks] x kv_head[n_kv_heads] x slot[block_tokens] x dim[head_dim]
 *
 * i.e. for one (block, kv_head) the block_tokens key vectors are contiguous,
 * which is what a decode kernel streams.  A token's KV "slot" is
 * block_id * block_tokens + offset_in_block (vLLM's slot mapping).
 */
#ifndef KERN_H
#define KERN_H

#include "base/kvs.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* ------------------------------------------------------------------------ */
/* Data types.  Values equal ggml/GGUF type ids so files map 1:1.           */
/* ------------------------------------------------------------------------ */

typedef enum kern_dtype {
    KERN_F32 = 0,
    KERN_F16 = 1,
    KERN_Q4_0 = 2,
    KERN_Q4_1 = 3,
    KERN_Q5_0 = 6,
    KERN_Q5_1 = 7,
    KERN_Q8_0 = 8,
    KERN_Q8_1 = 9,
    KERN_Q2_K = 10,
    KERN_Q3_K = 11,
    KERN_Q4_K = 12,
    KERN_Q5_K = 13,
    KERN_Q6_K = 14,
    KERN_Q8_K = 15,
    KERN_I8 = 24,
    KERN_I16 = 25,
    KERN_I32 = 26,
    KERN_I64 = 27,
    KERN_F64 = 28,
    KERN_BF16 = 30,
    KERN_DTYPE_COUNT = 40, /* ids are < this */
} kern_dtype_t;

typedef struct kern_type_traits {
    const char *name; /* "f32", "q8_0", ...; NULL for an unknown id */
    uint32_t block;   /* elements per block */
    uint32_t block_bytes;
} kern_type_traits_t;

/* Traits for any ggml type id, including ones no backend computes with, so
 * file readers can size every tensor.  Returns NULL for unknown ids. */
const kern_type_traits_t *kern_type_traits(uint32_t type);
/* Bytes of one row of n elements; 0 when n is not a multiple of the block
 * or the type is unknown or the size overflows. */
size_t kern_row_bytes(uint32_t type, uint64_t n);
/* Parses "f32|f16|bf16|q8_0|..." into *out; KVS_EINVAL if unknown. */
int kern_dtype_parse(const char *name, kern_dtype_t *out);

/* Q8_0: 32 int8 with one fp16 scale, as in GGUF. */
#define KERN_QK8_0 32
typedef struct kern_block_q8_0 {
    uint16_t d; /* fp16 */
    int8_t qs[KERN_QK8_0];
} kern_block_q8_0_t;

/* Quantize n floats (n % 32 == 0) to Q8_0 exactly as ggml's reference does. */
void kern_quantize_q8_0(const float *x, kern_block_q8_0_t *y, size_t n);
/* The x side of a Q8_0 (and Q4_0, K-quant) product.  Every backend
 * multiplies those weights by
 * x rounded per 32-value block to int8 (scale d = max|x| / 127 in f32,
 * q = x * (1 / d) rounded to nearest even), as llama.cpp does, so products
 * can run on int8 units; kern_matmul's results are defined with it.
 * n % 32 == 0; kern_round_x_q8 writes q * d as f32 (out may equal x). */
void kern_quantize_x_q8(const float *x, size_t n, int8_t *q, float *d);
void kern_round_x_q8(const float *x, size_t n, float *out);

/* The 4-bit and K-quant formats of llama.cpp files (gguf.md 1.4), byte for
 * byte ggml's block_q4_0, block_q4_K, block_q5_K and block_q6_K.  Q4_K_M
 * files mix Q4_K and Q6_K; Q4_0 files carry Q6_K too (output.weight).
 * Their products are defined like Q8_0's: the dequantized weights times x
 * rounded by kern_round_x_q8 (kern_matmul), so the cpu backend can
 * multiply in int8. */
#define KERN_QK4_0 32
#define KERN_QK_K 256 /* elements per K-quant super-block */
typedef struct kern_block_q4_0 {
    uint16_t d;      /* fp16 */
    uint8_t qs[16];  /* x[j] = d * (lo nibble of qs[j] - 8), x[j + 16]: hi nibble */
} kern_block_q4_0_t; /* 18 bytes */
typedef struct kern_block_q4_k {
    uint16_t d;         /* fp16 scale of the 6-bit sub-block scales */
    uint16_t dmin;      /* fp16 scale of the 6-bit sub-block mins */
    uint8_t scales[12]; /* 8 (scale, min) pairs of 6 bits, ggml's get_scale_min_k4 */
    uint8_t qs[128];    /* per 64 values: 32 bytes, lo nibbles first 32, hi the next */
} kern_block_q4_k_t;    /* 144 bytes; x = d * sc * q - dmin * m */
typedef struct kern_block_q5_k {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qh[32];  /* bit 2c (2c+1) of qh[l]: the fifth bit of the lo (hi) nibble, chunk c */
    uint8_t qs[128]; /* as Q4_K */
} kern_block_q5_k_t; /* 176 bytes */
typedef struct kern_block_q6_k {
    uint8_t ql[128];   /* low 4 bits */
    uint8_t qh[64];    /* high 2 bits */
    int8_t scales[16]; /* one per 16 values */
    uint16_t d;        /* fp16, last */
} kern_block_q6_k_t;   /* 210 bytes; x = d * sc * (q - 32) */

/* Quantizes n floats (a multiple of the type's block) into a row of `type`
 * with ggml's reference quantizers (quantize_row_*_ref: the same layout,
 * the same search; results may differ from ggml's in the last rounding).
 * Types: Q8_0, Q4_0, Q4_K, Q5_K, Q6_K.  Returns 0, KVS_EINVAL (n not a
 * multiple of the block) or KVS_ENOTSUP. */
int kern_quantize_row(uint32_t type, const float *x, void *y, size_t n);

/* Dequantize/convert one row of n elements of `type` into f32, bit for bit
 * what ggml's dequantize_row_* gives (scales multiply first, then the
 * min is subtracted, each rounded to f32).  Supported: F32, F16, BF16,
 * Q8_0, Q4_0, Q4_K, Q5_K, Q6_K.  Returns 0 or KVS_ENOTSUP. */
int kern_row_to_f32(uint32_t type, const void *row, float *y, size_t n);

/* ------------------------------------------------------------------------ */
/* Views handed to ops.  All pointers are backend memory (host memory for   */
/* ref/cpu, device memory for cuda) unless marked host.                     */
/* ------------------------------------------------------------------------ */

/* How a weight's bytes are ordered.  KERN_LAYOUT_ROWS is GGUF's; the
 * others are written by kern_pack_weight and read only by the backend that
 * wrote them. */
typedef enum kern_layout {
    KERN_LAYOUT_ROWS = 0,
    /* Q8_0, panels of 16 rows: per 32-column block, the 16 fp16 scales,
     * then for each 4 columns the 16 rows' 4 quants + 128 (unsigned), so
     * one 64-byte load feeds an int8 dot product for 16 rows at once.
     * Same size as row-major Q8_0; rows past the last full panel stay
     * row-major. */
    KERN_LAYOUT_Q8_0_X16 = 1,
} kern_layout_t;

/* A weight matrix as stored in GGUF: n_rows rows of n_cols elements of
 * `type` (GGUF ne0 = n_cols, ne1 = n_rows), row-major, rows row_bytes apart.
 * A matrix product computes y[t][r] = sum_c x[t][c] * W[r][c]. */
typedef struct kern_tensor {
    kern_dtype_t type;
    uint32_t n_cols;
    uint32_t n_rows;
    size_t row_bytes;
    const void *data;
    kern_layout_t layout; /* KERN_LAYOUT_ROWS unless packed */
} kern_tensor_t;

/* Per-sequence block tables as CSR, borrowed for one call (host memory). */
typedef struct kern_page_table {
    const int32_t *indptr;   /* [n_seqs + 1], indptr[0] == 0 */
    const int32_t *indices;  /* [indptr[n_seqs]] block ids */
    const int32_t *last_len; /* [n_seqs], 1..block_tokens (entries in the last block) */
    uint32_t n_seqs;
} kern_page_table_t;

/* Quantized KV blocks (algorithms.md section 6).  A pool with a codec
 * keeps two kinds of block: n_hot full-precision blocks in `dtype`, which
 * every append writes (the sequence's growing tail, its attention sinks,
 * prefill chunks in flight), and quantized blocks that kern_kv_seal fills
 * from full hot blocks.  A quantized block stores, per layer and KV head,
 * one K tile and one V tile of block_tokens x head_dim values:
 *
 *   BF16  bf16 values, token-major, rounded to nearest even.
 *   Q8_0  per token, head_dim / 32 blocks of kern_block_q8_0_t (llama.cpp's
 *         q8_0 KV cache: d = max|x| / 127, 8.5 bits a value).
 *   FP8   per token, an fp16 scale s = max|x| / 448 and head_dim e4m3 bytes
 *         (OCP FN, saturating) of x / s: vLLM's fp8 with a per-token,
 *         per-head scale instead of an uncalibrated per-tensor 1.0.
 *   Q4    4-bit asymmetric after KIVI: K per channel over groups of
 *         min(block_tokens, 32) tokens (channels carry the outliers),
 *         V per token over groups of 32 channels; group scales and
 *         minimums are 6-bit multiples of per-tile fp16 units, as in
 *         Q4_K: 4.4 bits a value with blocks of 32 tokens or more; with
 *         16, keys take 4.8 (groups of 16 tokens).  head_dim % 32 == 0.
 *
 * Sealing a full block is KIVI's residual rule with R = block_tokens: the
 * tokens of the partly filled tail block stay in full precision. */
typedef enum kern_kvq {
    KERN_KVQ_NONE = 0, /* every block full precision */
    KERN_KVQ_BF16 = 1,
    KERN_KVQ_Q8_0 = 2,
    KERN_KVQ_FP8 = 3,
    KERN_KVQ_Q4 = 4,
    KERN_KVQ_COUNT
} kern_kvq_t;

/* "none", "bf16", "q8_0", "fp8", "q4"; NULL for an unknown value. */
const char *kern_kvq_name(kern_kvq_t q);
/* Bytes of one K (v false) or V tile of bt tokens x d channels; 0 when the
 * codec cannot store that shape (d % 32 for Q8_0 and Q4, bt odd for Q4)
 * or for KERN_KVQ_NONE. */
size_t kern_kvq_tile_bytes(kern_kvq_t q, bool v, uint32_t bt, uint32_t d);
/* Encodes x[bt][d] (f32, token-major) into one tile.  Non-finite inputs
 * are stored as 0.  Returns 0 or KVS_EINVAL (shape, see tile_bytes). */
int kern_kvq_encode(kern_kvq_t q, bool v, const float *x, uint32_t bt, uint32_t d, void *tile);
/* Decodes tokens [t0, t0 + n) of a tile into y[n][d].  t0 + n <= bt. */
void kern_kvq_decode(kern_kvq_t q, bool v, const void *tile, uint32_t bt, uint32_t d, uint32_t t0,
                     uint32_t n, float *y);

/* The paged KV store of one pool.  Owned by cache/; kernels read and write.
 * Blocks [0, n_hot) are full precision at k and v (the layout above, with
 * n_hot blocks a layer); blocks [n_hot, n_blocks) are quantized tiles at
 * qk and qv: [layer][block - n_hot][kv_head], qk_tile / qv_tile bytes each.
 * Without a codec n_hot == n_blocks and qk, qv are NULL. */
typedef struct kern_kv {
    kern_dtype_t dtype; /* of the full-precision blocks: KERN_F32 or KERN_F16 */
    uint32_t n_layers;
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint32_t block_tokens;
    uint32_t n_blocks;
    size_t layer_bytes; /* bytes of one layer of K (or V) full-precision blocks */
    void *k;            /* n_layers * layer_bytes */
    void *v;
    kern_kvq_t quant;
    uint32_t n_hot;
    size_t qk_tile, qv_tile; /* kern_kvq_tile_bytes */
    void *qk;                /* n_layers * (n_blocks - n_hot) * n_kv_heads * qk_tile */
    void *qv;
    /* Host, [n_blocks], or NULL: a value that changes whenever a block's
     * content may change, and that no other block of any pool ever takes
     * (cache/ draws them from one process-wide sequence).  What a reader
     * derived from a block (block-sparse's key summaries, model/) stays
     * valid while the value does. */
    const uint64_t *block_gen;
} kern_kv_t;

/* One K (v false) or V row of a host-memory pool as f32, whatever kind of
 * block holds it: the read the host attention paths and the host-side
 * scorers (block-sparse selection, speculative prefill) share. */
void kern_kv_row_f32(const kern_kv_t *kv, bool v, uint32_t layer, int32_t block, uint32_t head,
                     uint32_t off, float *out);

/* Attention over paged KV for a batch of sequences.  Query rows of sequence
 * s are rows q_indptr[s] .. q_indptr[s+1]-1.  Row i sees the first
 * kv_len[i] KV entries of its sequence (its own entry included), which
 * makes prefill causal and lets any mix of prefill and decode rows share a
 * call.  GQA: query head h reads KV head h / (n_heads / n_kv_heads). */
typedef struct kern_attn_args {
    const float *q; /* [n_q][n_heads][head_dim] */
    float *out;     /* [n_q][n_heads][head_dim] */
    uint32_t n_q;
    uint32_t n_heads;
    const int32_t *q_indptr; /* host, [pt.n_seqs + 1] */
    const int32_t *kv_len;   /* host, [n_q] */
    kern_page_table_t pt;
    const kern_kv_t *kv;
    uint32_t layer;
    float scale; /* usually 1/sqrt(head_dim) */

    /* Sparse key pattern (StreamingLLM sinks + window, block-sparse as in
     * Quest / MInference, the sparse pass of Delta Attention).  All zero,
     * the default, is dense causal attention.  Positions are KV entry
     * indices of the sequence.  A row i with causal limit L = kv_len[i]
     * is "patterned" when window_tokens > 0 or block_mask != NULL, and
     * dense_rows is NULL or dense_rows[i] == 0; it then attends to the
     * keys j < L with
     *     j < sink_tokens
     *  or (window_tokens > 0 and j >= L - window_tokens)
     *  or (block_mask and block_mask[(i / mask_q_block) * mask_stride
     *                                + g * mask_head_stride
     *                                + j / kv->block_tokens] != 0)
     * where g = h / (n_heads / n_kv_heads) is the KV head of query head h,
     * and softmax runs over those keys only.  Other rows are dense.
     * block_mask: host bytes (nonzero = keep; backend memory with
     * mask_in_backend), one mask row per
     * mask_q_block consecutive query rows of the call (rows numbered as
     * in q, across sequences: start each sequence on a multiple of
     * mask_q_block if groups must not straddle two), one byte per KV block
     * of the row's sequence (page-table order, block_tokens entries each);
     * mask_stride >= ceil(kv_len[i] / block_tokens) for every row.  With
     * mask_head_stride 0 a mask row holds for every head; else each KV head
     * has its own (Quest chooses pages per head), mask_head_stride bytes
     * apart, and mask_head_stride >= ceil(kv_len[i] / block_tokens) and
     * mask_stride >= n_kv_heads * mask_head_stride.
     * kern_attention returns KVS_EINVAL for sink_tokens without a window
     * or mask, a mask_stride or mask_head_stride below what those bounds
     * ask, and a patterned row or head that would attend to no key
     * (possible with a mask alone).  Every backend honours it (ref, cpu,
     * cuda; prefill, decode and split-K alike), skipping the blocks a row
     * does not see.  cuda runs prefill over F16 KV with head_dim 64 or 128
     * on tensor cores, q, the softmax weights and decoded quantized K and V
     * rounded to f16 (of order 1e-3 of max|out| from ref, where the other
     * paths stay near 1e-6). */
    uint32_t sink_tokens;      /* leading keys always kept */
    uint32_t window_tokens;    /* recent keys kept; 0: no window */
    const uint8_t *block_mask; /* see above; NULL: none */
    uint32_t mask_stride;      /* bytes between mask rows */
    uint32_t mask_q_block;     /* query rows per mask row; 0 means 1 */
    uint32_t mask_head_stride; /* 0: one mask for all heads; else bytes between KV heads' */
    /* block_mask is backend memory (kern_block_select's), read where it
     * lies and never staged: window_tokens must be > 0 (kern_attention
     * cannot look for an empty row in it), and with mask_head_stride,
     * mask_stride = n_kv_heads * mask_head_stride. */
    bool mask_in_backend;
    const uint8_t *dense_rows; /* host, [n_q], nonzero: ignore the pattern; or NULL */
    /* 0, or a bound on every kv_len[i] that a backend may plan the call
     * by instead of the actual longest row (how cuda cuts long rows into
     * split-KV ranges), so that calls under one bound launch alike: what a
     * replayed CUDA graph needs (kern_graph_run).  kern_attention returns
     * KVS_EINVAL for a row longer than the bound. */
    uint32_t max_len_hint;
    /* 0, or a number naming this call's page table (pt: its arrays and
     * every entry in them): calls with the same nonzero pt_epoch have the
     * same table, so a device backend uploads it once for all of them (the
     * layers of one forward pass).  A number is never to name another
     * table. */
    uint64_t pt_epoch;
} kern_attn_args_t;

/* RoPE.  theta_i = pos * freq_scale * freq_base^(-2i/n_rot) / freq_factor[i]
 * for pair i < n_rot/2.  The pair is (x[2i], x[2i+1]) in the GGUF "llama"
 * (NORM) layout and (x[i], x[i + n_rot/2]) in the NEOX layout (qwen2);
 * it rotates to (x0 cos - x1 sin, x0 sin + x1 cos).  Dims >= n_rot stay. */
typedef struct kern_rope_args {
    float *x; /* [n_rows][n_heads][head_dim], rotated in place */
    uint32_t n_rows;
    uint32_t n_heads;
    uint32_t head_dim;
    uint32_t n_rot;     /* dims rotated (<= head_dim, even) */
    const int32_t *pos; /* host, [n_rows] */
    float freq_base;
    float freq_scale;          /* linear scaling: theta *= freq_scale (1 = none) */
    const float *freq_factors; /* host, [n_rot/2] or NULL (Llama 3.1 rope_freqs) */
    bool neox;                 /* NEOX pairing instead of adjacent pairs */
    /* Optional: a second tensor rotated at the same positions,
     * [n_rows][n_heads2][head_dim] (a layer's K beside its Q), in the same
     * pass; NULL with n_heads2 0 when there is none. */
    float *x2;
    uint32_t n_heads2;
    /* Nonzero: every call with this number has the same n_rows, pos,
     * n_rot and frequencies (the layers of one forward pass), so a device
     * backend may upload them once; unique per set of those (kern_attn_
     * args_t.pt_epoch's rule).  0: no such promise. */
    uint64_t epoch;
} kern_rope_args_t;

/* ------------------------------------------------------------------------ */
/* Backends.                                                                */
/* ------------------------------------------------------------------------ */

typedef struct kern_backend kern_backend_t;

typedef enum kern_op {
    KERN_OP_GET_ROWS,
    KERN_OP_MATMUL,
    KERN_OP_RMSNORM,
    KERN_OP_ROPE,
    KERN_OP_SWIGLU,
    KERN_OP_ADD,
    KERN_OP_KV_APPEND,
    KERN_OP_KV_COPY,
    KERN_OP_ATTN,
    KERN_OP_KV_SEAL,
    KERN_OP_COUNT,
} kern_op_t;

typedef struct kern_backend_cfg {
    uint32_t n_threads; /* cpu: worker threads incl. the caller (0 = all cores) */
    int nice;           /* cpu: niceness the worker threads take (0: inherit) */
    int device;         /* cuda: device ordinal */
} kern_backend_cfg_t;

/* Creates a backend by name: "ref", "cpu" or "cuda".  Returns 0,
 * KVS_EINVAL (unknown name), KVS_ENOTSUP (not compiled in) or KVS_EDEVICE.
 * Thread: the creating thread then owns it. */
int kern_backend_new(const char *name, const kern_backend_cfg_t *cfg, kern_backend_t **out);
void kern_backend_free(kern_backend_t *be); /* NULL is a no-op */
const char *kern_backend_name(const kern_backend_t *be);
/* True when the backend's memory is host memory (ref, cpu). */
bool kern_backend_is_host(const kern_backend_t *be);
/* The most one forward pass can ask of a backend, so that a device backend
 * sizes its workspaces and staging buffers once, before serving: growing
 * them later costs a stream synchronisation and an allocation in the middle
 * of a step (and can fail for want of memory then).  Ops whose shapes go
 * beyond these still work; they grow what they need as before. */
typedef struct kern_reserve {
    uint32_t max_rows;     /* tokens in one forward pass */
    uint32_t max_cols;     /* the widest weight row, in elements */
    uint32_t max_seqs;     /* sequences in one forward pass */
    uint32_t max_ctx;      /* tokens of KV one sequence attends */
    uint32_t block_tokens; /* of the KV pool */
    uint32_t n_heads, n_kv_heads, head_dim;
    /* Pools with a codec whose blocks kern_kv_seal will seal, up to
     * seal_blocks pairs a call (NULL: none), so that sealing grows
     * nothing either. */
    const kern_kv_t *seal_kv[2];
    uint32_t seal_blocks;
} kern_reserve_t;
/* 0, KVS_EINVAL (a zero field), or what allocation answered (KVS_ENOMEM,
 * KVS_EDEVICE); a no-op on host backends.  Thread: the owner. */
int kern_reserve(kern_backend_t *be, const kern_reserve_t *r);
/* True once a device backend has hit an error it cannot recover from (a
 * fault in a kernel, a lost device): every later op fails with
 * KVS_EDEVICE, and the process needs a restart.  Thread: the owner. */
bool kern_backend_failed(const kern_backend_t *be);
/* Whether `op` runs for the given data type (weight type for GET_ROWS and
 * MATMUL, KV dtype for KV ops and ATTN, ignored otherwise). */
bool kern_supports(const kern_backend_t *be, kern_op_t op, kern_dtype_t type);

/* Memory.  alloc returns NULL on failure. */
void *kern_alloc(kern_backend_t *be, size_t bytes);
void kern_free(kern_backend_t *be, void *p);
int kern_upload(kern_backend_t *be, void *dst, const void *src_host, size_t bytes);
int kern_download(kern_backend_t *be, void *dst_host, const void *src, size_t bytes);
int kern_memset(kern_backend_t *be, void *dst, int value, size_t bytes);
int kern_sync(kern_backend_t *be);
/* Host memory the backend moves data to and from fastest, for copies that
 * cross often (the host KV tier): page-locked on cuda, so a transfer is
 * one DMA, not staged through the driver's buffers; 64-byte aligned.
 * Ordinary memory on host backends, or where the driver will not pin
 * more.  Slow to allocate and, on cuda, to free (cudaFreeHost waits for
 * the device): keep and reuse it.  NULL when out of memory or bytes is
 * 0.  Thread: the owner. */
void *kern_host_alloc(kern_backend_t *be, size_t bytes);
void kern_host_free(kern_backend_t *be, void *p);
/* count runs of `bytes`, `stride` bytes apart in backend memory (src, or
 * dst), to or from one contiguous host array: the layers of a KV block in
 * one call (the host tier), one transfer and one wait where the backend
 * can, not one per run.  Returns 0 (also for bytes or count 0),
 * KVS_EINVAL (count > 1 with stride < bytes, or a span past SIZE_MAX) or
 * what kern_download / kern_upload would. */
int kern_download_runs(kern_backend_t *be, void *dst_host, const void *src, size_t stride,
                       size_t bytes, size_t count);
int kern_upload_runs(kern_backend_t *be, void *dst, size_t stride, const void *src_host,
                     size_t bytes, size_t count);

/* Rewrites w's bytes in place into the layout the backend's matmul reads
 * fastest and sets w->layout; leaves w as it is when the backend (or this
 * type and shape) has none.  w->data must be writable memory of this
 * backend that the caller owns, and only this backend may read it after.
 * Returns 0, KVS_EINVAL or KVS_ENOMEM. */
int kern_pack_weight(kern_backend_t *be, kern_tensor_t *w);

/* Ops.  Each returns 0, KVS_EINVAL (bad shapes or misaligned weights,
 * checked in kern.c before dispatch), KVS_ENOTSUP (see kern_supports), or
 * on a device backend KVS_ENOMEM (workspace) and KVS_EDEVICE. */

/* out[i][:] = row ids[i] of w, as f32.  ids in host memory. */
int kern_get_rows(kern_backend_t *be, const kern_tensor_t *w, const int32_t *ids, uint32_t n,
                  float *out);
/* y[n][w.n_rows] = x[n][w.n_cols] * W^T (+ bias[w.n_rows] if not NULL).
 * For Q8_0, Q4_0, Q4_K, Q5_K and Q6_K weights, x is first rounded as
 * kern_round_x_q8 does and W is kern_row_to_f32's dequantization. */
int kern_matmul(kern_backend_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
                const float *bias, float *y);
/* Products of one x with up to KERN_MATMUL_SET_MAX weights of the same
 * n_cols (a layer's Q, K and V): y[i] = kern_matmul(w[i], x, n, bias[i]),
 * bit for bit, for i < count; bias may be NULL (none) or hold NULLs.  One
 * launch on a device for decode-sized n when the weights share a type.
 * No y[i] may overlap x or another y. */
#define KERN_MATMUL_SET_MAX 3
int kern_matmul_set(kern_backend_t *be, uint32_t count, const kern_tensor_t *const *w,
                    const float *x, uint32_t n, const float *const *bias, float *const *y);
/* A gated feed-forward's first half: y[n][rows] = silu(x Wg^T) * (x Wu^T),
 * bit for bit kern_matmul of gate into y, of up into tmp, then kern_swiglu
 * (y, tmp, y).  gate and up have the same shape; tmp ([n][rows]) is
 * scratch a backend may write.  One launch on a device for decode-sized
 * n when both share a type.  Neither y nor tmp may overlap x or each
 * other. */
int kern_matmul_swiglu(kern_backend_t *be, const kern_tensor_t *gate, const kern_tensor_t *up,
                       const float *x, uint32_t n, float *tmp, float *y);
/* y[i] = x[i] / sqrt(mean(x[i]^2) + eps) * w, rows of d; y may equal x. */
int kern_rmsnorm(kern_backend_t *be, const float *x, const float *w, uint32_t n, uint32_t d,
                 float eps, float *y);
/* The residual stream's step between two blocks of a layer: x += res, then
 * y = kern_rmsnorm(x), bit for bit kern_add followed by kern_rmsnorm, in
 * one pass (one launch instead of two on a device).  y may equal res, not
 * x. */
int kern_add_rmsnorm(kern_backend_t *be, float *x, const float *res, const float *w, uint32_t n,
                     uint32_t d, float eps, float *y);
int kern_rope(kern_backend_t *be, const kern_rope_args_t *a);
/* out[i] = silu(gate[i]) * up[i] over n elements; out may alias gate. */
int kern_swiglu(kern_backend_t *be, const float *gate, const float *up, size_t n, float *out);
/* x[i] += y[i] over n elements. */
int kern_add(kern_backend_t *be, float *x, const float *y, size_t n);
/* Writes n tokens' K and V rows ([n][n_kv_heads*head_dim], f32) of `layer`
 * into their slots (host array), converting to kv->dtype.  When a slot
 * repeats, the later token wins. */
int kern_kv_append(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer, const float *k,
                   const float *v, const int32_t *slots, uint32_t n);
/* Copies whole blocks src[i] -> dst[i] in every layer (host arrays), in
 * call order: a->b then b->c leaves a's content in both b and c. */
int kern_kv_copy(kern_backend_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
                 uint32_t n);
int kern_attention(kern_backend_t *be, const kern_attn_args_t *a);
/* Quantizes full-precision blocks src[i] (< n_hot) into quantized blocks
 * dst[i] (>= n_hot), every layer, K and V (host arrays); or, with src[i]
 * quantized and dst[i] full precision, writes the decoded values back (a
 * truncate that reopens a sealed block).  All pairs of a call go the same
 * way, and the destinations are distinct (the caller's fresh blocks; not
 * checked), so the pairs may run in any order.  Sources are left as they
 * were.  Every backend seals with kern_kvq.c's encoders (cuda runs them on the
 * host and moves the bytes), so tiles are identical across backends.
 * KVS_ENOTSUP where the backend reads no quantized blocks (then a pool
 * with a codec cannot run on it). */
int kern_kv_seal(kern_backend_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
                 uint32_t n);
/* Copies KV rows within the pool for score-based compression (SnapKV,
 * H2O), which keeps a different set of tokens per layer and KV head: for
 * every layer l and KV head h, the row at slot src[(l * n_kv_heads + h) *
 * n + j] (slot = block * block_tokens + offset; any kind of block) is
 * written to slot dst[j] (full-precision blocks), j < n; host arrays.  No
 * destination slot may be read as a source by the same call (the host
 * backends copy layers in parallel; the cache gathers into fresh blocks).
 * A quantized source is written as its decoded values, a full-precision
 * one bit for bit.  Returns 0, KVS_EINVAL or KVS_ENOTSUP (kern_supports). */
int kern_kv_gather(kern_backend_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
                   uint32_t n);
/* Quest's page summaries (algorithms.md section 7.1), which block-sparse
 * prefill scores its candidate blocks by: for KV head g and i < n,
 * out[(g * n + i) * 2 * head_dim + e] is the largest value of channel e
 * over the block_tokens keys of block blocks[i] (either kind of block) in
 * `layer`, and out[(g * n + i) * 2 * head_dim + head_dim + e] the
 * smallest, as f16 bits: the largest rounded up and the smallest down
 * (kvs_f32_to_fp16_dir), so they stay bounds at half the bytes of f32: a
 * store of every block's is a sixteenth of an f16 pool's K and V at 16
 * tokens a block, and a Quest decode step reads every candidate's.  Keys
 * beyond f16's range bound as if at its edge.  Every slot counts, so only full blocks make
 * sense.  blocks: host array; out: backend memory, n_kv_heads * n * 2 *
 * head_dim halves. */
int kern_kv_block_bounds(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer,
                         const int32_t *blocks, uint32_t n, uint16_t *out);
/* The same bounds kept by block id, for a store of them across calls:
 * out holds n_kv_heads * kv->n_blocks rows of 2 * head_dim halves, and
 * block blocks[i]'s bounds for KV head g go to row g * kv->n_blocks +
 * blocks[i] (the other rows are left as they were; blocks distinct). */
int kern_kv_pool_bounds(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer,
                        const int32_t *blocks, uint32_t n, uint16_t *out);

/* Quest's upper bound on the logits of groups of query rows against
 * blocks summarised by kern_kv_block_bounds (mx, mn):
 *
 *   score[i / q_group][b] = max over rows i of the group and query heads h
 *       of sum_e max(q[i][h][e] * mx[g][b][e], q[i][h][e] * mn[g][b][e])
 *
 * with g = h / (n_heads / n_kv_heads), before any softmax scale.  With
 * per_kv_head the maximum runs over each KV head's query heads apart:
 * score[(i / q_group) * n_kv_heads + g][b].  q,
 * bounds, score and work are backend memory; work holds at least
 * kern_block_scores_work() floats, so the backends can run the bounds as
 * matrix products without allocating.  Results may differ from the exact
 * sums in the last bits (cuda's products for more than a few rows
 * multiply in TF32: of order 1e-3 of the largest bound). */
typedef struct kern_block_score_args {
    const float *q; /* [n_q][n_heads][head_dim] */
    uint32_t n_q;
    uint32_t n_heads, n_kv_heads, head_dim;
    const uint16_t *bounds; /* f16, [n_kv_heads][bounds_stride][2 * head_dim] */
    uint32_t n_blocks;
    /* 0 (n_blocks), or blocks between KV heads' bounds, >= n_blocks: the
     * first n_blocks of a longer summary are scored */
    uint32_t bounds_stride;
    /* Host, [n_blocks], or NULL: block b is scored against bounds row
     * bounds_rows[b] (< bounds_stride, which must be set) of each KV head,
     * not row b: the blocks of a sequence read from a kern_kv_pool_bounds
     * store without copying them out first */
    const int32_t *bounds_rows;
    /* Host, [ceil(n_q / q_group) + 1] from 0, or NULL.  With it (and
     * bounds_rows), query group grp scores only its own blocks: list
     * entries bounds_indptr[grp] .. bounds_indptr[grp + 1] - 1 of
     * bounds_rows, into the first that many entries of its score rows
     * (each count <= n_blocks).  The candidates of rows of different
     * sequences, a decode step's, in one call. */
    const uint32_t *bounds_indptr;
    /* bounds_rows and bounds_indptr are backend memory, not host: lists
     * uploaded once and read by several calls (a decode step's layers).
     * Nothing checks their entries then (the caller vouches for the rules
     * above); bounds_stride must be set. */
    bool lists_in_backend;
    uint32_t q_group; /* query rows per score row; 0 means 1 */
    bool per_kv_head; /* a score row per KV head of each group */
    /* [ceil(n_q / q_group)][per_kv_head ? n_kv_heads : 1][score_stride],
     * the first n_blocks of each row written (with bounds_indptr, the
     * group's count) */
    float *score;
    uint32_t score_stride; /* 0 (n_blocks), or >= n_blocks */
    float *work;           /* kern_block_scores_work(a) floats */
} kern_block_score_args_t;
size_t kern_block_scores_work(const kern_block_score_args_t *a);
int kern_block_scores(kern_backend_t *be, const kern_block_score_args_t *a);

/* Block-sparse's choice of blocks by kern_block_scores' per-KV-head
 * scores, made where they lie, into a block mask for kern_attention:
 * for score row r (query group) and KV head g, mask row
 *   m = mask + (r * n_kv_heads + g) * mask_head_stride
 * gets m[j] = 1 for j < first and for ends[r] <= j < mask_head_stride;
 * of the candidates first <= j < ends[r], all of them where there are
 * k or fewer (k = top_ks ? top_ks[r] : top_k), else those whose score
 *   score[(r * n_kv_heads + g) * score_stride + j - first]
 * is among the k highest, a lower j first among equal scores (NaN
 * ranks below every number, -0 equals +0), get 1 and the rest 0.  Every
 * byte of the n_rows * n_kv_heads rows is written.  score and mask are
 * backend memory, ends host; first <= ends[r] <= mask_head_stride and
 * ends[r] - first <= score_stride, else KVS_EINVAL. */
typedef struct kern_block_select_args {
    const float *score; /* [n_rows][n_kv_heads][score_stride] */
    uint32_t n_rows, n_kv_heads, score_stride;
    const uint32_t *ends; /* host, [n_rows] */
    uint32_t first;
    uint32_t top_k;            /* >= 1, unless top_ks */
    const uint32_t *top_ks;    /* host, [n_rows], each >= 1: a row's own k; or NULL */
    uint8_t *mask;             /* [n_rows][n_kv_heads][mask_head_stride] */
    uint32_t mask_head_stride; /* >= 1 */
} kern_block_select_args_t;
int kern_block_select(kern_backend_t *be, const kern_block_select_args_t *a);

/* Attention probabilities of a few query rows over one sequence's keys,
 * reduced for the host-side choices built on them: SnapKV's vote, H2O's
 * accumulated attention (algorithms.md section 5), speculative prefill's
 * token importance (section 2.2).  Row r of q, query head h, sees the keys
 * j < lim(r): with `causal`, the rows are the sequence's last n_q entries
 * and lim(r) = n_keys - n_q + r + 1; without, lim(r) = n_keys (queries
 * that come after the keys).  p[r][h][j] = softmax over j < lim(r) of
 * scale * q[r][h] . k_j, zero beyond.  Then
 *   KERN_MASS_SUM       out[g][j] = sum over rows r and the query heads h
 *                       of KV head g of p[r][h][j]; out [n_kv_heads][n_out],
 *                       j < n_out <= n_keys;
 *   KERN_MASS_POOL_MAX  out[r][j] = max over heads h of the mean of
 *                       p[r][h][j'] over j' in [j - pool/2, j + pool/2]
 *                       clipped to [0, n_keys), over pool (odd);
 *                       out [n_q][n_keys].
 * Keys come from the first n_keys entries of the table `blocks` (any kind
 * of block).  q and out are host memory, so a device backend stages q and
 * copies the result back before returning.  The cuda backend keeps a KV
 * head's query heads in shared memory: KVS_ENOTSUP past head_dim 256 or
 * past 48 KiB of them (a group of 96 heads of 128), where the host
 * backends answer. */
typedef enum kern_mass_mode {
    KERN_MASS_SUM = 0,
    KERN_MASS_POOL_MAX = 1,
} kern_mass_mode_t;

typedef struct kern_attn_mass_args {
    const float *q; /* host, [n_q][n_heads][head_dim] */
    uint32_t n_q;
    uint32_t n_heads;
    const kern_kv_t *kv;
    uint32_t layer;
    const int32_t *blocks; /* host, ceil(n_keys / block_tokens) block ids */
    uint32_t n_keys;
    bool causal; /* n_q <= n_keys when set */
    float scale;
    kern_mass_mode_t mode;
    uint32_t n_out; /* KERN_MASS_SUM */
    uint32_t pool;  /* KERN_MASS_POOL_MAX */
    float *out;     /* host */
} kern_attn_mass_args_t;
int kern_attn_mass(kern_backend_t *be, const kern_attn_mass_args_t *a);

/* Replays of a step whose launches repeat exactly (CUDA graphs).  fn(arg)
 * issues a step's kern_* calls; kern_graph_run calls it with every launch
 * recorded the first time `key` is seen, and afterwards only to rewrite the
 * host arrays the ops stage (token ids, slots, positions, page tables,
 * lengths), then replays the recorded launches: one upload and one graph
 * launch instead of a few hundred launches and copies.  So for one key fn
 * must make the same calls with the same shapes and device buffers
 * (kern_attention with the same max_len_hint), and it must not read device
 * results: no kern_download, kern_sync or op that returns data to the
 * host (KVS_EINVAL there).  A key whose recording fails (an op that cannot
 * be recorded, a workspace that would have to grow) runs directly from
 * then on, with a warning.  Host backends just call fn(arg).  Returns fn's
 * result or KVS_EDEVICE / KVS_ENOMEM.  Results are ready after kern_sync
 * or a download, as with any op. */
typedef int (*kern_graph_fn)(void *arg);
int kern_graph_run(kern_backend_t *be, uint64_t key, kern_graph_fn fn, void *arg);

/* Delta Attention's correction (algorithms.md section 1) of n query rows
 * of `width` floats whose sparse outputs are in out[n][width].  Rows below
 * n - tail form blocks of gamma rows; dense holds the dense outputs of each
 * block's first row, block by block, then of every tail row:
 * [ceil((n - tail) / gamma) + tail][width].  Each block's rows get
 * dense[b] - out[b * gamma] added, and the tail rows become their dense
 * rows.  dense is overwritten (it ends holding the blocks' differences).
 * In f32, since the difference of two nearly equal normalised outputs is
 * what carries the correction. */
int kern_delta_apply(kern_backend_t *be, float *out, float *dense, uint32_t n, uint32_t width,
                     uint32_t gamma, uint32_t tail);

#endif /* KERN_H */
