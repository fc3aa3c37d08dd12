/*
 * model/model.h — everything about a Llama-family model: the GGUF v3 reader
 * and writer, hyper-parameters and weights, the tokenizer, the batched
 * forward pass over paged KV, and the sampler.
 *
 * Callers: sched/ (forward + sampling), serve/ (CLI, tokenization), tests.
 * Depends on kernels/ (numeric ops) and base/ only; it sees KV memory only
 * through the kern_kv_t view that cache/ exports.
 */
#ifndef MODEL_H
#define MODEL_H

#include "base/kvs.h"
#include "kernels/kern.h"

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

/* ======================================================================== */
/* GGUF v3 reader.  Files are untrusted: every count, length, offset, type  */
/* and product is checked against overflow and the file size, and errors    */
/* name the key or tensor at fault.                                         */
/* ======================================================================== */

typedef enum model_gguf_type {
    MODEL_GGUF_UINT8 = 0,
    MODEL_GGUF_INT8 = 1,
    MODEL_GGUF_UINT16 = 2,
    MODEL_GGUF_INT16 = 3,
    MODEL_GGUF_UINT32 = 4,
    MODEL_GGUF_INT32 = 5,
    MODEL_GGUF_FLOAT32 = 6,
    MODEL_GGUF_BOOL = 7,
    MODEL_GGUF_STRING = 8,
    MODEL_GGUF_ARRAY = 9,
    MODEL_GGUF_UINT64 = 10,
    MODEL_GGUF_INT64 = 11,
    MODEL_GGUF_FLOAT64 = 12,
} model_gguf_type_t;

#define MODEL_GGUF_MAX_DIMS 4
#define MODEL_GGUF_MAX_NAME 63 /* bytes, as ggml's GGML_MAX_NAME - 1 */

typedef struct model_gguf_str {
    const char *ptr; /* NUL-terminated copy owned by the reader */
    size_t len;
} model_gguf_str_t;

typedef struct model_gguf_tensor {
    const char *name; /* NUL-terminated, owned by the reader */
    uint32_t n_dims;
    uint64_t ne[MODEL_GGUF_MAX_DIMS]; /* ne[0] contiguous; missing dims are 1 */
    uint32_t type;                    /* ggml type id (kern_dtype_t values) */
    uint64_t offset;                  /* relative to the data section */
    size_t nbytes;
    const void *data; /* inside the mapping */
} model_gguf_tensor_t;

typedef struct model_gguf model_gguf_t;

/* Maps `path` read-only and validates it.  On failure returns KVS_EIO /
 * KVS_ENOENT (cannot open/map), KVS_EFORMAT (malformed) or KVS_ENOMEM and
 * writes a one-line reason naming the key or tensor into err (if not NULL).
 * Thread: any; the result is immutable and may be shared. */
int model_gguf_open(const char *path, model_gguf_t **out, char *err, size_t err_len);
/* Same over a caller-owned buffer that must outlive the reader. */
int model_gguf_open_mem(const void *buf, size_t len, model_gguf_t **out, char *err, size_t err_len);
void model_gguf_close(model_gguf_t *g); /* NULL is a no-op */

uint32_t model_gguf_version(const model_gguf_t *g);
uint32_t model_gguf_alignment(const model_gguf_t *g);
size_t model_gguf_data_offset(const model_gguf_t *g);

/* Metadata.  Keys are looked up by exact name. */
uint32_t model_gguf_n_kv(const model_gguf_t *g);
const char *model_gguf_kv_key(const model_gguf_t *g, uint32_t i);
model_gguf_type_t model_gguf_kv_type(const model_gguf_t *g, uint32_t i);
/* Index of key or -1. */
int64_t model_gguf_find_key(const model_gguf_t *g, const char *key);
/* Value i as the file encodes it after its type (inside the file's
 * buffer): what model_gguf_writer_set_raw copies.  0 or KVS_ENOENT. */
int model_gguf_kv_raw(const model_gguf_t *g, uint32_t i, const void **value, size_t *len);

/* Typed getters.  Return 0, KVS_ENOENT (absent) or KVS_EFORMAT (wrong type
 * or out of range; the integer getters accept any integer type whose value
 * fits, the float getter F32 or F64). */
int model_gguf_get_u32(const model_gguf_t *g, const char *key, uint32_t *out);
int model_gguf_get_u64(const model_gguf_t *g, const char *key, uint64_t *out);
int model_gguf_get_i64(const model_gguf_t *g, const char *key, int64_t *out);
int model_gguf_get_f32(const model_gguf_t *g, const char *key, float *out);
int model_gguf_get_bool(const model_gguf_t *g, const char *key, bool *out);
int model_gguf_get_str(const model_gguf_t *g, const char *key, model_gguf_str_t *out);
/* Arrays: element type and count; arrays of arrays are refused at open. */
int model_gguf_get_arr(const model_gguf_t *g, const char *key, model_gguf_type_t *elem_type,
                       uint64_t *count);
/* Element i of a string array. */
int model_gguf_arr_str(const model_gguf_t *g, const char *key, uint64_t i, model_gguf_str_t *out);
/* Raw packed elements of a numeric array (little-endian, count elements). */
int model_gguf_arr_data(const model_gguf_t *g, const char *key, const void **data);
/* Prints the value of kv i in a human-readable form (arrays abbreviated). */
void model_gguf_kv_print(const model_gguf_t *g, uint32_t i, FILE *f);

/* Tensors. */
uint32_t model_gguf_n_tensors(const model_gguf_t *g);
const model_gguf_tensor_t *model_gguf_tensor(const model_gguf_t *g, uint32_t i);
const model_gguf_tensor_t *model_gguf_find_tensor(const model_gguf_t *g, const char *name);

/* ======================================================================== */
/* GGUF v3 writer.  Tensor data streams to the file in info order, so      */
/* multi-GB models never sit in memory:                                     */
/*   new -> set_* / add_tensor ... -> begin(path) -> write ... -> finish    */
/* ======================================================================== */

typedef struct model_gguf_writer model_gguf_writer_t;

int model_gguf_writer_new(model_gguf_writer_t **out);
void model_gguf_writer_free(model_gguf_writer_t *w); /* NULL is a no-op; closes any file */

int model_gguf_writer_set_u32(model_gguf_writer_t *w, const char *key, uint32_t v);
int model_gguf_writer_set_i32(model_gguf_writer_t *w, const char *key, int32_t v);
int model_gguf_writer_set_u64(model_gguf_writer_t *w, const char *key, uint64_t v);
int model_gguf_writer_set_f32(model_gguf_writer_t *w, const char *key, float v);
int model_gguf_writer_set_bool(model_gguf_writer_t *w, const char *key, bool v);
int model_gguf_writer_set_str(model_gguf_writer_t *w, const char *key, const char *v);
int model_gguf_writer_set_arr_str(model_gguf_writer_t *w, const char *key, const char *const *v,
                                  const size_t *lens, uint64_t n);
int model_gguf_writer_set_arr_f32(model_gguf_writer_t *w, const char *key, const float *v,
                                  uint64_t n);
int model_gguf_writer_set_arr_i32(model_gguf_writer_t *w, const char *key, const int32_t *v,
                                  uint64_t n);
/* A value as a GGUF file encodes it after its type (model_gguf_kv_raw),
 * copied verbatim: metadata carried over from another file.  Not for
 * general.alignment.  0, KVS_EINVAL or KVS_ENOMEM. */
int model_gguf_writer_set_raw(model_gguf_writer_t *w, const char *key, model_gguf_type_t type,
                              const void *value, size_t len);
/* Declares the next tensor (data comes later, in the same order).
 * Returns 0, KVS_EINVAL (bad name, dims or type, ne[0] not a block
 * multiple, duplicate name). */
int model_gguf_writer_add_tensor(model_gguf_writer_t *w, const char *name, uint32_t n_dims,
                                 const uint64_t *ne, uint32_t type);
/* Writes header, metadata and tensor infos to path (created/truncated). */
int model_gguf_writer_begin(model_gguf_writer_t *w, const char *path);
/* Appends bytes of tensor data; may split or join tensors freely; padding
 * between tensors is inserted automatically. */
int model_gguf_writer_write(model_gguf_writer_t *w, const void *data, size_t bytes);
/* Checks every declared byte was written, flushes and closes. */
int model_gguf_writer_finish(model_gguf_writer_t *w);

/* ======================================================================== */
/* Models.                                                                  */
/* ======================================================================== */

typedef struct model_hparams {
    char arch[16]; /* "llama" or "qwen2" */
    uint32_t n_vocab;
    uint32_t n_embd;
    uint32_t n_layer;
    uint32_t n_head;
    uint32_t n_head_kv;
    uint32_t head_dim;
    uint32_t n_ff;
    uint32_t n_rot;
    uint32_t n_ctx_train;
    float rms_eps;
    float rope_freq_base;
    float rope_freq_scale; /* 1/factor for linear scaling, else 1 */
    bool has_rope_freqs;   /* Llama 3.1 rope_freqs.weight present */
    bool has_bias;         /* q/k/v biases (qwen2) */
    bool tied_output;      /* output.weight absent: logits use token_embd */
    kern_dtype_t wtype;    /* type of the attention/MLP matrices */
    bool is_random;        /* written by `kvserve model random` */
} model_hparams_t;

#define MODEL_MAX_LAYERS 512

typedef struct model model_t;

/* Opens a GGUF file and binds its weights for `be`.  Every hyper-parameter
 * is range-checked and every tensor's presence, shape and type verified;
 * failures return KVS_EFORMAT (bad or inconsistent file), KVS_ENOTSUP
 * (architecture, weight type or tokenizer not supported) with a message
 * naming the key or tensor, or KVS_EIO/KVS_ENOENT/KVS_ENOMEM.  On host
 * backends, models of 64 MiB or more are copied into transparent huge pages
 * (decode streams every weight each step; 4 KiB file pages cost TLB misses);
 * smaller ones are used in place from the read-only mapping.
 * The backend must outlive the model.  Thread: any; then read-only. */
int model_load(const char *path, kern_backend_t *be, model_t **out, char *err, size_t err_len);
void model_free(model_t *m); /* NULL is a no-op */
const model_hparams_t *model_hparams(const model_t *m);
const model_gguf_t *model_gguf(const model_t *m);
kern_backend_t *model_backend(const model_t *m);
/* KV bytes per token per layer for a KV dtype: 2 * n_head_kv * head_dim * size. */
size_t model_kv_bytes_per_token(const model_t *m, kern_dtype_t kv_dtype);
/* Bytes of weights read to produce one token (every matrix once, embedding
 * row ignored, the output matrix once). */
size_t model_weight_bytes_per_token(const model_t *m);

/* ---- vocabularies (tokenizers) ----------------------------------------- */

/* A tokenizer built from a GGUF file's tokenizer.ggml.* keys, usable with
 * or without weights (vocab-only files).  Kinds:
 *   "bytes"           no vocabulary: token id = byte value;
 *   "gpt2-bytes"      a "gpt2" vocabulary of single bytes without merges
 *                     (kvserve's bundled models);
 *   "llama-spm"       tokenizer.ggml.model "llama": SentencePiece BPE by
 *                     score with <0xNN> byte fallback (Llama 2, Mistral);
 *   "gpt2-bpe:<pre>"  tokenizer.ggml.model "gpt2": byte-level BPE by merge
 *                     rank after the regex pre-tokenizer named by
 *                     tokenizer.ggml.pre (Llama 3, Qwen2, GPT-2, ...).
 * Ids match llama.cpp's llama_tokenize for the same file.  Immutable once
 * built: any thread may use it concurrently. */
typedef struct model_vocab model_vocab_t;

/* Flags of model_vocab_tokenize. */
#define MODEL_TOK_ADD_SPECIAL 1u   /* BOS/EOS as the vocab asks (add_bos/add_eos_token) */
#define MODEL_TOK_PARSE_SPECIAL 2u /* text of control tokens becomes their ids */

/* Builds the vocabulary of g (which may be closed afterwards).  The file is
 * untrusted: a bad array, id, merge or count is KVS_EFORMAT and a tokenizer
 * or pre-tokenizer kvserve does not implement is KVS_ENOTSUP, each with a
 * message naming the key; or KVS_ENOMEM.  Thread: any. */
int model_vocab_new(const model_gguf_t *g, model_vocab_t **out, char *err, size_t err_len);
void model_vocab_free(model_vocab_t *v); /* NULL is a no-op */

/* Text (any bytes; invalid UTF-8 is tokenized, never refused, except by
 * "gpt2-bytes" vocabularies lacking a byte) to ids.  Flags: 0 or
 * MODEL_TOK_*; user-defined tokens are split out of the text even without
 * MODEL_TOK_PARSE_SPECIAL, as llama.cpp does.  Writes min(n, cap) ids and
 * sets *n_out to n, the full count.  Returns 0, KVS_ENOSPC when n > cap
 * (call again with cap >= *n_out; cap 0 just counts), KVS_EINVAL (bad
 * flags, or a byte the vocab cannot spell) or KVS_ENOMEM.
 * Sizing: every token covers at least one byte of valid UTF-8 text, so
 * len + 2 ids (text, BOS, EOS) always suffice for "bytes", "gpt2-bytes" and
 * "gpt2-bpe", and for "llama-spm" without MODEL_TOK_ADD_SPECIAL adding EOS
 * (the one extra is the "▁" prefix SentencePiece puts before the text).
 * Invalid UTF-8 can need more (BPE spells each bad byte as U+FFFD, three
 * bytes), as can SPM vocabularies without a "▁" token or with one-byte
 * user-defined tokens (each resets the "▁" prefix). */
int model_vocab_tokenize(const model_vocab_t *v, const char *text, size_t len, unsigned flags,
                         int32_t *out, size_t cap, size_t *n_out);
/* The bytes token id stands for: SPM "▁" is a space and <0xNN> its byte,
 * GPT-2's byte-level spelling is undone, control and unknown tokens are
 * empty unless `special`.  Writes min(n, cap) bytes (no NUL) and returns n,
 * the piece's full length, like snprintf; KVS_EINVAL for an id outside the
 * vocabulary. */
int model_vocab_piece(const model_vocab_t *v, int32_t id, bool special, char *buf, size_t cap);
uint32_t model_vocab_n_tokens(const model_vocab_t *v); /* ids are 0 .. n - 1 */
int32_t model_vocab_bos(const model_vocab_t *v);       /* -1 when none */
int32_t model_vocab_eos(const model_vocab_t *v);       /* -1 when none */
int32_t model_vocab_eot(const model_vocab_t *v);       /* -1 when none */
/* End of generation: EOS, EOT, EOM and the chat stop tokens llama.cpp
 * recognizes by text (<|eot_id|>, <|im_end|>, <|end|>, ...). */
bool model_vocab_is_eog(const model_vocab_t *v, int32_t id);
/* All of them (at most MODEL_MAX_EOG): *ids points into the vocabulary;
 * returns how many. */
#define MODEL_MAX_EOG 16
uint32_t model_vocab_eog(const model_vocab_t *v, const int32_t **ids);
bool model_vocab_adds_bos(const model_vocab_t *v);    /* MODEL_TOK_ADD_SPECIAL prepends BOS */
bool model_vocab_adds_eos(const model_vocab_t *v);    /* MODEL_TOK_ADD_SPECIAL appends EOS */
const char *model_vocab_kind(const model_vocab_t *v); /* see the kinds above */

/* ---- a loaded model's tokenizer ----------------------------------------- */

/* model_vocab_tokenize into a malloc'd array of the right size (*out;
 * free it); 0, KVS_EINVAL or KVS_ENOMEM. */
int model_vocab_tokenize_alloc(const model_vocab_t *v, const char *text, size_t len, unsigned flags,
                               int32_t **out, size_t *n_out);
/* The same with MODEL_TOK_PARSE_SPECIAL everywhere but in the n_plain byte
 * ranges [plain[2k], plain[2k + 1]) (ascending, apart), where control-token
 * text stays text and no control token may reach in: a chat message's
 * content cannot forge the markers its template writes around it.  The
 * ids are those of the whole text with specials parsed wherever they do
 * not touch a range (fragments are not cut at range edges).  0,
 * KVS_EINVAL (bad flags or ranges) or KVS_ENOMEM. */
int model_vocab_tokenize_plain(const model_vocab_t *v, const char *text, size_t len, unsigned flags,
                               const size_t *plain, size_t n_plain, int32_t **out, size_t *n_out);

/* The model's vocabulary (owned by the model). */
const model_vocab_t *model_vocab(const model_t *m);
/* Text to ids: model_vocab_tokenize with MODEL_TOK_ADD_SPECIAL when add_bos
 * (so EOS too where the vocab sets add_eos_token) and no special-token
 * parsing.  Returns 0, KVS_ENOSPC when `cap` is too small (*n_out then says
 * how many are needed; len + 2 suffices as documented above), KVS_EINVAL on
 * invalid input. */
int model_tokenize(const model_t *m, const char *text, size_t len, bool add_bos, int32_t *out,
                   size_t cap, size_t *n_out);
/* The bytes of one token (empty for control tokens); returns the length
 * written (<= cap: longer pieces are cut), or KVS_EINVAL for an id outside
 * the vocabulary. */
int model_token_piece(const model_t *m, int32_t id, char *buf, size_t cap);
int32_t model_token_bos(const model_t *m); /* -1 when none */
int32_t model_token_eos(const model_t *m); /* -1 when none */
bool model_token_is_eog(const model_t *m, int32_t id);
const char *model_tokenizer_name(const model_t *m); /* model_vocab_kind */

/* ---- forward pass ------------------------------------------------------- */

/* One step's work: n_tokens new tokens from pt.n_seqs sequences, any mix of
 * prefill chunks and single decode tokens.  Sequence s owns tokens
 * seq_indptr[s] .. seq_indptr[s+1]-1.  All arrays are host memory and are
 * borrowed for the call. */
/* How a sequence's prompt rows attend during prefill; every row of a
 * DENSE sequence is dense, and decode rows (past the prompt) are too
 * unless decode_top_k says otherwise.
 *   SINK_WINDOW  keys [0, sinks) and the last `window` (StreamingLLM);
 *   DELTA        the same sparse pass, then dense rows for the first query
 *                of every gamma block of the call's prompt rows and a dense
 *                tail of (N mod gamma) + max(128, gamma) rows; each block
 *                adds its first row's (dense - sparse) difference to all
 *                its rows (Delta Attention, algorithms.md section 1);
 *   BLOCK_SPARSE per query block of block_tokens rows, the sinks, the
 *                window, the KV blocks the query block's rows fall in, and
 *                for each KV head the top_k other KV blocks by Quest's
 *                upper bound on q.k (per block and KV head the elementwise
 *                min and max of its keys; bound sum_d max(q_d min_d,
 *                q_d max_d), maximised over the query block's rows and the
 *                KV head's query heads).  top_k at least the number of
 *                blocks a row could pick is dense.
 * Every backend runs all of them: BLOCK_SPARSE's summaries and bounds run
 * on the backend (kern_kv_pool_bounds, kern_block_scores), and only each
 * query block's choice among its candidates on the host. */
typedef enum model_attn_kind {
    MODEL_ATTN_DENSE = 0,
    MODEL_ATTN_SINK_WINDOW,
    MODEL_ATTN_DELTA,
    MODEL_ATTN_BLOCK_SPARSE,
} model_attn_kind_t;

typedef struct model_attn_policy {
    model_attn_kind_t kind;
    uint32_t sinks, window; /* the sparse pattern; window >= 1 */
    uint32_t gamma;         /* DELTA: >= 1 */
    bool no_tail;           /* DELTA without its dense tail (ablation) */
    bool last_dense;        /* SINK_WINDOW, or DELTA without its tail, with the prompt's
                             * last row dense (ablations) */
    uint32_t top_k;         /* BLOCK_SPARSE: KV blocks picked per query block, >= 1 */
    /* Quest at decode (algorithms.md section 7.1), whatever the prefill
     * kind; 0: dense decode.  In layers from MODEL_DECODE_DENSE_LAYERS on,
     * each decode row attends its own (last) KV block and, per KV head,
     * the decode_top_k earlier blocks with the highest upper bound on q.k
     * (BLOCK_SPARSE's bound, maximised over the KV head's query heads:
     * Quest's choice per head, grouped for GQA), one row at a time so that a
     * verification row chooses as the same row decoded alone would.  The
     * per-block key summaries are kept by block id across steps (while
     * the pool's kern_kv_t.block_gen says a block is unchanged), so a step
     * reads them and the chosen blocks, not every key; a pool without
     * block_gen (or no memory for the store) has them taken each call. */
    uint32_t decode_top_k;
} model_attn_policy_t;

/* Quest keeps its first two layers dense (their attention is broad). */
#define MODEL_DECODE_DENSE_LAYERS 2

/* Delta Attention's rows for the n prompt rows of one prefill call
 * (forward.c; exposed so tests can check the method's invariants):
 * model_delta_tail is the dense tail's length, (n mod gamma) +
 * max(128, gamma) capped at n, or 0 without a tail; model_delta_rows writes
 * the rows that get dense attention, the first of every gamma block below
 * n - tail and then the tail, and returns how many.  kern_delta_apply then
 * turns the sparse outputs into Delta's. */
uint32_t model_delta_tail(uint32_t n, const model_attn_policy_t *p);
uint32_t model_delta_rows(uint32_t n, const model_attn_policy_t *p, int32_t *rows);

/* Checks the fields of a policy: 0 or KVS_EINVAL. */
int model_attn_policy_check(const model_attn_policy_t *p);

typedef struct model_batch {
    uint32_t n_tokens;
    const int32_t *tokens;     /* [n_tokens] */
    const int32_t *pos;        /* [n_tokens] RoPE positions */
    const int32_t *slots;      /* [n_tokens] KV slot each token writes */
    const int32_t *kv_len;     /* [n_tokens] KV entries visible to each token, own included */
    const int32_t *seq_indptr; /* [pt.n_seqs + 1] */
    kern_page_table_t pt;      /* block tables including this step's entries */
    const int32_t *logit_rows; /* [n_logits] token indices whose logits are wanted */
    uint32_t n_logits;
    /* Per sequence, or NULL when every sequence is dense: its policy and
     * prompt length (rows whose kv_len <= n_prompt are prompt rows). */
    const model_attn_policy_t *seq_policy; /* [pt.n_seqs] */
    const uint32_t *seq_n_prompt;          /* [pt.n_seqs] */
    /* Optional: the post-RoPE queries of token rows capture_rows[i] in
     * every layer l are copied to host capture_q[(l * n_capture + i) *
     * n_head * head_dim ...] (speculative prefill's scoring). */
    const int32_t *capture_rows; /* [n_capture] */
    uint32_t n_capture;
    float *capture_q;
} model_batch_t;

typedef struct model_ctx model_ctx_t;

/* Activation workspace for batches of up to max_tokens tokens and
 * max_logits logit rows, allocated once from the model's backend. */
int model_ctx_new(model_t *m, uint32_t max_tokens, uint32_t max_logits, model_ctx_t **out);
void model_ctx_free(model_ctx_t *ctx); /* NULL is a no-op */
/* Decode steps (one row per sequence, past its prompt) recorded as CUDA
 * graphs and replayed (kern_graph_run), one recording per batch size and
 * power-of-two bound on the longest row; off by default.  No effect on
 * host backends.  Thread: engine. */
void model_ctx_set_graphs(model_ctx_t *ctx, bool on);
/* Allocates the backend scratch of the sparse prefill policies (Delta
 * Attention's dense rows, block-sparse's block summaries, scores and
 * mask) for the largest call ctx can make over at most max_ctx tokens of
 * KV in blocks of block_tokens, so a device backend does not free and
 * allocate in the middle of a step, or find the memory gone.  With
 * `summaries` (a pool's view with block_gen, or NULL), also the store of
 * key summaries that block-sparse prefill and Quest keep for every block
 * of that pool: n_layers * n_kv_heads * n_blocks * 2 * head_dim floats,
 * an eighth of an F16 pool's bytes, taken on their first use otherwise.
 * Without it all of them grow on first use.  0, KVS_EINVAL, KVS_ENOMEM.
 * Thread: engine. */
int model_ctx_reserve(model_ctx_t *ctx, uint32_t max_ctx, uint32_t block_tokens,
                      const kern_kv_t *summaries);
/* How many times that scratch grew after model_ctx_reserve (a warning
 * the first time): 0 when the reservation covered every call. */
uint32_t model_ctx_late_grows(const model_ctx_t *ctx);
/* Runs every layer over the batch, writing K/V into `kv` at the batch's
 * slots, and copies the requested logits rows to host `logits`
 * ([n_logits][n_vocab]).  Returns 0, KVS_EINVAL (batch inconsistent with
 * the model or the workspace), or a backend error. Thread: engine. */
int model_forward(model_ctx_t *ctx, const kern_kv_t *kv, const model_batch_t *b, float *logits);

/* ---- speculative prefill (algorithms.md section 2) --------------------- */

/* A draft model reads the whole prompt plus look_ahead - 1 greedy tokens;
 * its attention from the last prompt token and the look-ahead tokens to
 * the prompt keys scores each prompt token, and the main model prefills
 * only the best chunks, at their original positions. */
typedef struct model_spec_policy {
    bool on;
    float keep_ratio;    /* (0, 1]: share of chunks kept */
    uint32_t look_ahead; /* queries scored, >= 1 (default 8) */
    uint32_t chunk;      /* tokens per chunk, >= 1 (default 32) */
    uint32_t pool;       /* width of the average pool, odd (default 13; 1: none) */
} model_spec_policy_t;

/* Fills zero fields of an enabled policy with the defaults (keep 0.2). */
void model_spec_policy_defaults(model_spec_policy_t *p);
/* 0 or KVS_EINVAL (out-of-range fields of an enabled policy). */
int model_spec_policy_check(const model_spec_policy_t *p);

/* Importance imp[n_prompt] of each prompt token: for every draft layer l,
 * query head h and look-ahead query a, softmax over the prompt keys of
 * q . k / sqrt(head_dim), averaged over a window of `pool` tokens (zeros
 * past the ends count, as PyTorch's avg_pool1d pads), the maximum over
 * (l, h), then the mean over a.  qs is [n_a][n_layer][n_head * head_dim]
 * (captured post-RoPE queries, host memory); the keys are the first
 * n_prompt entries of the KV table `blocks` in kv, the draft backend's
 * memory (kern_attn_mass).  Returns 0, KVS_EINVAL, KVS_ENOTSUP (a pool the
 * backend cannot read) or KVS_ENOMEM. */
int model_spec_importance(const model_t *draft, const kern_kv_t *kv, const int32_t *blocks,
                          uint32_t n_prompt, const float *qs, uint32_t n_a, uint32_t pool,
                          float *imp);
/* The prompt tokens to prefill: of the ceil(n_chunks * keep_ratio)
 * chunks with the highest mean importance, plus the last chunk and the
 * first n_forced tokens (a prefix-cache hit keeps its KV), as sorted
 * indices in kept[].  Returns how many (>= 1 when n >= 1). */
uint32_t model_spec_select(const float *imp, uint32_t n, uint32_t chunk, float keep_ratio,
                           uint32_t n_forced, int32_t *kept);

/* ---- SnapKV (algorithms.md section 5.2) -------------------------------- */

/* At the end of a prefill, every layer and KV head keeps the `budget`
 * prompt entries the last `window` prompt queries attend to most (the
 * window included); kv_table_compact (cache/kv.h) then drops the rest. */
typedef struct model_snapkv_policy {
    uint32_t budget; /* C: entries kept per KV head, the window included; > window */
    uint32_t window; /* w: observation window of the last prompt queries (default 32) */
    uint32_t kernel; /* width of the average pool over votes, odd (default 5; 1: none) */
} model_snapkv_policy_t;

/* Fills zero window and kernel with the defaults. */
void model_snapkv_defaults(model_snapkv_policy_t *p);
/* 0 or KVS_EINVAL: window outside 1..1024, kernel even or outside
 * 1..255, budget <= window (checks the fields as they are: call
 * model_snapkv_defaults first). */
int model_snapkv_check(const model_snapkv_policy_t *p);

/* SnapKV's selection over the first n_keys entries of the KV table
 * `blocks` in kv (the model backend's memory, any kind of block it reads,
 * scored by kern_attn_mass): for each layer and
 * query head, the softmax of q . k / sqrt(head_dim) over all the keys a
 * query row sees, summed over the n_obs observation rows into a vote per
 * key before the window, summed over the query heads of each KV head,
 * averaged over `kernel` neighbours (zeros past the ends count, as
 * PyTorch's avg_pool1d pads), and the top budget - n_obs keys by pooled
 * vote (ties to the lower index) plus the last n_obs entries.  q_obs holds
 * the post-RoPE queries of the last n_obs prompt rows in every layer,
 * [n_layer][n_obs][n_head][head_dim] (model_batch_t's capture_q with
 * capture_rows the last n_obs rows); row r sits at entry n_keys - n_obs +
 * r and sees the keys up to it.  1 <= n_obs <= min(window, n_keys).  p's
 * zero fields take the defaults.  Writes the kept entries of layer l and
 * KV head h, ascending, to keep[(l * n_head_kv + h) * K + j], j < K =
 * min(budget, n_keys) (the identity when n_keys <= budget), which is what
 * kv_table_compact reads, and returns K; or KVS_EINVAL, KVS_ENOTSUP (a
 * pool the backend cannot read) or KVS_ENOMEM.  Thread: engine. */
int model_snapkv_select(const model_t *m, const kern_kv_t *kv, const int32_t *blocks,
                        uint32_t n_keys, const float *q_obs, uint32_t n_obs,
                        const model_snapkv_policy_t *p, int32_t *keep);

/* ---- H2O (algorithms.md section 5.1) ----------------------------------- */

/* The accumulated attention H2O ranks keys by (the sum SnapKV's vote is
 * made of, computed by the same code): for each layer l and KV head g,
 * adds to acc[(l * n_head_kv + g) * stride + j], j < n_keys, the softmax
 * probability of key j, q . k / sqrt(head_dim) over the keys a row sees,
 * summed over the n_q query rows and the query heads of g's group.  q
 * holds post-RoPE queries [n_layer][n_q][n_head][head_dim]; row r sits at
 * entry n_keys - n_q + r and sees the entries up to it (a decode row,
 * n_q = 1, sees them all).  Keys are read from the first n_keys entries
 * of the table `blocks` in kv (as model_snapkv_select; q and acc are host
 * memory).  1 <= n_q <= n_keys <= stride.  Returns 0, KVS_EINVAL,
 * KVS_ENOTSUP (a pool the backend cannot read) or KVS_ENOMEM.  Thread:
 * engine. */
int model_h2o_scores(const model_t *m, const kern_kv_t *kv, const int32_t *blocks, uint32_t n_keys,
                     const float *q, uint32_t n_q, uint32_t stride, double *acc);

/* H2O's choice over n_lists score lists acc[l * stride + j], j < n_keys:
 * per list the last `recent` entries plus the budget - recent older ones
 * with the highest score (ties to the lower index, NaN last), ascending,
 * written to keep[l * K + i], i < K = min(budget, n_keys) (the identity
 * when n_keys <= budget), kv_table_compact's layout.  Returns K, or
 * KVS_EINVAL (recent >= budget, stride < n_keys, ...) or KVS_ENOMEM. */
int model_h2o_select(const double *acc, uint32_t n_lists, uint32_t n_keys, uint32_t stride,
                     uint32_t budget, uint32_t recent, int32_t *keep);

/* ---- sampler ------------------------------------------------------------ */

typedef struct model_sampling {
    float temperature; /* 0 = greedy */
    int32_t top_k;     /* 0 = off */
    float top_p;       /* 1 = off */
    float min_p;       /* 0 = off */
    uint64_t seed;
    /* vLLM's penalties, applied to the logits before the rest: a logit of
     * a token in the prompt or the output so far is divided by
     * repetition_penalty where positive, multiplied where not (0 or 1 =
     * off); then each output token's logit loses frequency_penalty per
     * occurrence and presence_penalty once (0 = off). */
    float repetition_penalty, presence_penalty, frequency_penalty;
    /* OpenAI's logit_bias: bias[i] added to the logit of bias_ids[i]
     * (summed where an id repeats) before the penalties, as vLLM does;
     * n_bias <= MODEL_MAX_LOGIT_BIAS, each in [-MODEL_LOGIT_BIAS_MAX, it].
     * Copied by model_sampler_new. */
    const int32_t *bias_ids;
    const float *bias;
    uint32_t n_bias;
    /* vLLM's allowed_token_ids: when n_allowed > 0 only these ids can be
     * drawn (every other logit is -inf for the draw; logprobs stay the
     * model's).  Ids in the vocabulary; copied by model_sampler_new. */
    const int32_t *allowed;
    uint32_t n_allowed;
} model_sampling_t;
/* Presence and frequency penalties lie in [-MODEL_PENALTY_MAX, it]
 * (OpenAI's and vLLM's range). */
#define MODEL_PENALTY_MAX 2.0f
#define MODEL_LOGIT_BIAS_MAX 100.0f
enum { MODEL_MAX_LOGIT_BIAS = 1024 };

typedef struct model_sampler model_sampler_t;

/* Returns 0, KVS_EINVAL (temperature < 0, top_p outside (0,1], min_p
 * outside [0,1], top_k < 0, a repetition penalty < 0, presence or
 * frequency penalty outside [-2, 2], any of them not finite; a bias id
 * outside the vocabulary, a bias out of range, too many) or
 * KVS_ENOMEM. */
int model_sampler_new(const model_sampling_t *cfg, uint32_t n_vocab, model_sampler_t **out);
void model_sampler_free(model_sampler_t *s);
/* The sampler's configuration; its bias arrays are the sampler's copies
 * (valid while it lives), so another sampler can be made from it. */
const model_sampling_t *model_sampler_cfg(const model_sampler_t *s);
/* What the penalties look at: the prompt's tokens (for the repetition
 * penalty) and each output token once sampled.  No-ops without
 * penalties; ids outside the vocabulary are ignored.  0 or KVS_ENOMEM. */
int model_sampler_prompt(model_sampler_t *s, const int32_t *tokens, uint32_t n);
int model_sampler_accept(model_sampler_t *s, int32_t token);
/* Picks the next token from one row of logits: the bias and the penalties, then greedy
 * at temperature 0, otherwise top-k, then top-p, then min-p on the
 * tempered distribution, then a draw from the seeded generator (same
 * seed, same tokens).  The buffers a configuration needs are allocated at
 * its first use here or above: KVS_ENOMEM (negative) when that fails;
 * KVS_EINVAL when every logit is -inf (or NaN) after the allowed ids. */
int32_t model_sampler_sample(model_sampler_t *s, const float *logits);
/* The same draw with only the ids set in allow (a bitmask of n_vocab bits,
 * as model_guide_allowed gives) in the running: the token is the one
 * model_sampler_sample would draw from the row with every other id at
 * -inf, at the cost of the ids kept rather than of the vocabulary. */
int32_t model_sampler_sample_masked(model_sampler_t *s, const float *logits, const uint64_t *allow);
/* A draft model's guess at the token model_sampler_sample will draw
 * `ahead` draws from now (0: the next): the draw from the draft's row
 * (bias, allowed ids, penalties as they stand, the filters) with the
 * random number the generator will give then; the generator does not
 * move.  Where the draft's distribution is near the target's, the two
 * draws mostly agree (one uniform number, two nearby distributions), so
 * a sampled request's proposals hold about as often as the
 * distributions overlap, while every token is still drawn exactly as
 * plain decoding draws it.  At temperature 0, the draft row's best id
 * (after bias and penalties).  Errors as model_sampler_sample's. */
int32_t model_sampler_predict(model_sampler_t *s, const float *logits, uint32_t ahead);
/* Speculative sampling with a draft model's distribution.  propose draws
 * from the draft's row as model_sampler_sample would (bias, allowed ids,
 * penalties, temperature, top-k, top-p, min-p: the configuration's), and
 * writes the distribution it drew from into q[n_vocab] (normalised; one
 * hot at temperature 0).  verify then takes the target model's row at
 * that position (and the mask, as model_sampler_sample_masked does): it
 * returns x with probability min(1, p(x) / q(x)), where p is the
 * distribution model_sampler_sample_masked would draw from, and otherwise
 * a draw from max(0, p - q) renormalised, which is never x.  Whatever q
 * is, the token returned is distributed as p (the same distribution as
 * plain decoding, not the same draws); the closer q is to p, the more
 * often it is x.  At temperature 0 verify returns the greedy token (x
 * stays where it is that token).  Errors as model_sampler_sample's. */
int32_t model_sampler_propose(model_sampler_t *s, const float *logits, float *q);
int32_t model_sampler_verify(model_sampler_t *s, const float *logits, const uint64_t *allow,
                             int32_t x, const float *q);
/* The log-probability of `token` under one row of logits (their
 * log-softmax: the model's distribution, before temperature and the
 * truncating filters, as vLLM and OpenAI report it) into *lp, and the
 * n_top most likely tokens (at most n_vocab), most likely first (ties by
 * id), with theirs.  Returns how many top entries it wrote, or KVS_EINVAL
 * for a token outside the vocabulary. */
int model_logprobs(const float *logits, uint32_t n_vocab, int32_t token, uint32_t n_top, float *lp,
                   int32_t *top_ids, float *top_lps);

/* ---- guided choice ------------------------------------------------------ */

/* vLLM's guided_choice: the output must spell one of n strings (1..
 * MODEL_MAX_CHOICES, each 1..MODEL_MAX_CHOICE_BYTES bytes), by any
 * tokenization of it.  The choice strings are copied.  The first use on a
 * model builds its table of token bytes (kept until model_free).  Thread:
 * one user per object. */
enum { MODEL_MAX_CHOICES = 64, MODEL_MAX_CHOICE_BYTES = 1024 };
typedef struct model_choice model_choice_t;
int model_choice_new(const model_t *m, const char *const *choices, uint32_t n,
                     model_choice_t **out); /* 0, KVS_EINVAL or KVS_ENOMEM */
/* A copy, at the same point of the output (a forked sample's). */
int model_choice_clone(const model_choice_t *c, model_choice_t **out);
void model_choice_free(model_choice_t *c); /* NULL is a no-op */
/* out = row with every token that cannot continue the output along a
 * choice at -inf (an end-of-generation token stays where a choice is
 * complete); returns how many tokens stay (0: none can). */
uint32_t model_choice_mask(model_choice_t *c, const float *row, float *out);
/* The same tokens as a bitmask for model_sampler_sample_masked (valid
 * until c's next call), *n_allowed of them (n_allowed may be NULL); NULL
 * when out of memory. */
const uint64_t *model_choice_allowed(model_choice_t *c, uint32_t *n_allowed);
/* Takes the next output token: 1 when the output is now a whole choice
 * no other extends, or the token ends generation after a whole choice
 * (the output is over), 0 to go on, KVS_EINVAL for a token the mask
 * ruled out. */
int model_choice_accept(model_choice_t *c, int32_t id);

/* ---- guided decoding by a regular expression ---------------------------- */

/* vLLM's guided_regex: the output must be a whole match of a pattern (UTF-8,
 * a subset of PCRE's syntax: model/guide.c says which), by any
 * tokenization of it.  model_guide_new compiles it to an automaton, whole,
 * so a pattern that cannot be honoured is refused here, with the offset
 * and why in err: KVS_EINVAL (syntax, a feature not supported, a pattern
 * that matches nothing or whose automaton would pass MODEL_GUIDE_MAX_STATES
 * states or MODEL_GUIDE_MAX_CELLS transitions) or KVS_ENOMEM.  The first use on a model builds its
 * table of token bytes.  A model keeps its last automata by pattern: compiling a pattern again
 * shares the kept one.  Thread: any; one user at a time for each guide (clones and guides of one
 * pattern share only the automaton, which nothing writes). */
enum { MODEL_GUIDE_MAX_STATES = 1 << 16, MODEL_GUIDE_MAX_CELLS = 1 << 22 };
typedef struct model_guide model_guide_t;
int model_guide_new(const model_t *m, const char *pattern, size_t len, model_guide_t **out,
                    char *err, size_t err_len);
/* vLLM's guided_grammar, llama.cpp's grammar: the output must be a
 * sentence of rule `root` of a GBNF grammar (model/guide.c says what it
 * takes), by any tokenization of it.  Refused here, with the offset and
 * why in err: KVS_EINVAL for syntax, a rule named but not defined or
 * defined twice, left recursion (a rule that can reach a use of itself
 * before a byte), a grammar that matches nothing, or KVS_ENOMEM.  Its
 * automaton grows as the output goes (nested brackets make it unbounded),
 * so it is the guide's own: a clone copies the point reached, and a step
 * that passes a bound (states, stack depth, ambiguity) fails the guide:
 * the mask lets nothing through and accept returns KVS_ENOSPC. */
int model_guide_new_grammar(const model_t *m, const char *text, size_t len, model_guide_t **out,
                            char *err, size_t err_len);
/* A guide at the same point of the output, sharing the automaton (a
 * grammar's: a copy of the point reached). */
int model_guide_clone(const model_guide_t *g, model_guide_t **out);
void model_guide_free(model_guide_t *g); /* NULL is a no-op */
uint32_t model_guide_states(const model_guide_t *g);
/* Whether a and b run on one automaton (clones, or one pattern compiled
 * twice while the model kept it). */
bool model_guide_shares(const model_guide_t *a, const model_guide_t *b);
/* Whether s[0..n) is a whole match (from the start, whatever g has taken). */
bool model_guide_fullmatch(const model_guide_t *g, const char *s, size_t n);
/* out = row with every token that cannot continue the output towards a
 * match at -inf (end-of-generation tokens stay where the output is a whole
 * match); returns how many tokens stay (0: none can). */
uint32_t model_guide_mask(model_guide_t *g, const float *row, float *out);
/* The same tokens as a bitmask (bit id % 64 of word id / 64) for
 * model_sampler_sample_masked, valid until g's next call; *n_allowed
 * counts them (n_allowed may be NULL: no count made).  NULL when out of memory or a grammar's guide
 * is spent (the guide's error then in *rc, else KVS_ENOMEM). */
const uint64_t *model_guide_allowed(model_guide_t *g, uint32_t *n_allowed, int *rc);
/* Takes the next output token: 1 when the output is now a whole match
 * that nothing extends, or the token ends generation after a whole match
 * (the output is over), 0 to go on, KVS_EINVAL for a token the mask ruled
 * out. */
int model_guide_accept(model_guide_t *g, int32_t id);

/* ---- random models for benchmarks and tests ----------------------------- */

/* Writes a GGUF with deterministic random weights of a real architecture:
 * shape "tiny" (d 256, 4 layers, 8 heads x 32, 2 KV heads, ff 704, byte
 * vocabulary), "tiny-deep" (the same, 8 layers), "llama-3.2-1b",
 * "llama-3.1-8b" or "llama-draft" (d 512, 2
 * layers, the Llama 3 vocabulary); dtype F32, F16, BF16, Q8_0, Q4_0 or a
 * K-quant.  Such files carry kvserve.random = true and a general.name that
 * says so.  vocab (NULL: the shape's own) gives the file another
 * vocabulary: its tokenizer.* keys, copied verbatim, and as many embedding
 * and output rows as it has tokens (a tokenizer-only GGUF, or any model's
 * file).  Returns 0, KVS_EINVAL (unknown shape/dtype), a vocabulary's
 * error (model_vocab_new) or KVS_EIO. */
int model_random_write(const char *shape, kern_dtype_t dtype, uint64_t seed,
                       const model_gguf_t *vocab, const char *path, char *err, size_t err_len);
/* The same shapes and dtypes loaded straight into be's memory, for
 * benchmarks: no tensor data touches a disk (a sparse metadata file in
 * $TMPDIR, or /tmp, is removed at once), and each weight gets rows of a
 * random pattern shared by the tensors of its kind (not the values
 * model_random_write would write for this seed).  Seconds for an 8B model,
 * whose file takes over a minute to write.  For device backends, and host
 * backends only when model_load copied the weights out of the file
 * without packing any (KVS_ENOTSUP otherwise).  Returns 0, KVS_EINVAL,
 * KVS_EIO, KVS_ENOTSUP, KVS_ENOMEM or a model_load / backend error. */
int model_random_load(const char *shape, kern_dtype_t dtype, uint64_t seed, kern_backend_t *be,
                      model_t **out, char *err, size_t err_len);

#endif /* MODEL_H */
