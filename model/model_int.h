/*
 * model/model_int.h — the model struct shared by the loader, tokenizer and
 * forward pass, and the vocabulary internals shared by vocab.c (loading,
 * special tokens, the public API), vocab_spm.c and vocab_bpe.c.  Only files
 * under model/ include this.
 */
#ifndef MODEL_INT_H
#define MODEL_INT_H

#include "model.h"

#include <string.h>

typedef struct model_layer {
    kern_tensor_t attn_norm; /* f32 [n_embd] */
    kern_tensor_t wq, wk, wv, wo;
    kern_tensor_t bq, bk, bv; /* f32; data NULL when absent */
    kern_tensor_t ffn_norm;
    kern_tensor_t w_gate, w_up, w_down;
} model_layer_t;

#define MODEL_MAX_HEAD_DIM 512 /* the loader refuses more */

/* A score to rank by, and what it belongs to (speculative prefill's
 * chunks, SnapKV's keys). */
typedef struct model__ranked {
    double score;
    uint32_t index;
} model__ranked_t;

/* qsort order: highest score first, ties to the lower index, so the
 * choice never depends on the sort. */
static inline int
model__cmp_ranked(const void *a, const void *b)
{
    const model__ranked_t *x = a, *y = b;
    if (x->score != y->score)
        return x->score > y->score ? -1 : 1;
    return x->index < y->index ? -1 : (x->index > y->index);
}

/* ---- vocabularies (model/vocab*.c) -------------------------------------- */

typedef enum model_vocab_kind {
    MODEL_VOCAB_BYTES,      /* no vocabulary in the file: id = byte value */
    MODEL_VOCAB_GPT2_BYTES, /* "gpt2" vocabulary of single bytes, no merges */
    MODEL_VOCAB_SPM,        /* "llama": SentencePiece BPE by score, byte fallback */
    MODEL_VOCAB_BPE,        /* "gpt2": byte-level BPE by merge rank */
} model_vocab_kind_t;

/* tokenizer.ggml.token_type values. */
enum {
    MODEL_TT_UNDEFINED = 0,
    MODEL_TT_NORMAL = 1,
    MODEL_TT_UNKNOWN = 2,
    MODEL_TT_CONTROL = 3,
    MODEL_TT_USER_DEFINED = 4,
    MODEL_TT_UNUSED = 5,
    MODEL_TT_BYTE = 6,
};

#define MODEL_VOCAB_MAX_RE 6 /* pre-tokenizer regexes applied in sequence */
#define MODEL_VOCAB_MAX_EOG MODEL_MAX_EOG

/* Open-addressing table from a byte string to an index; slots hold
 * index + 1 (0 = empty), keys live in the vocab's blob. */
typedef struct model_strmap {
    uint32_t *slots;
    uint32_t mask;
} model_strmap_t;

/* One BPE merge: (left id, right id) -> rank and merged id. */
typedef struct model_merge {
    uint64_t pair; /* left << 32 | right; UINT64_MAX = empty slot */
    uint32_t rank;
    int32_t id;
} model_merge_t;

/* Immutable after model__vocab_new: any number of threads may tokenize
 * with one vocab at the same time (every call has its own scratch). */
struct model_vocab {
    model_vocab_kind_t kind;
    char name[48]; /* "bytes", "gpt2-bytes", "llama-spm", "gpt2-bpe:<pre>" */
    uint32_t n_tokens;
    uint8_t *type;   /* [n_tokens] MODEL_TT_*; NULL for BYTES */
    float *score;    /* [n_tokens] SPM merge priority; NULL otherwise */
    char *blob;      /* every string below */
    size_t blob_len; /* bytes used */
    size_t blob_cap;
    uint32_t *text_off, *text_len;   /* [n_tokens] text as stored in the file */
    uint32_t *key_off, *key_len;     /* [n_tokens] matching form (SPM: stored text,
                                        BPE: raw bytes); key_len UINT32_MAX = none */
    uint32_t *piece_off, *piece_len; /* [n_tokens] bytes produced on output */
    model_strmap_t map;              /* key -> token id */
    model_merge_t *merges;           /* BPE: hash table, merge_mask + 1 slots */
    uint32_t merge_mask;
    uint32_t n_merges;
    int16_t cp_to_byte[324]; /* GPT-2 byte-level alphabet inverted, -1 = none */
    int32_t byte_id[256];    /* token for a lone byte (BPE/gpt2-bytes) or its
                                SPM <0xNN> fallback; -1 = none */
    /* Special tokens for the partition pass (CONTROL, USER_DEFINED,
     * UNKNOWN with non-empty text), longest text first. */
    int32_t *special;
    uint32_t n_special;
    uint32_t n_special_user; /* of which USER_DEFINED (split even unasked) */
    /* Aho-Corasick automaton over the special texts reversed, which finds
     * the specials starting at each byte (vocab.c tokenize_text).  Node 0 is
     * the root; its children are in sp_root, the others' in a hash table. */
    uint32_t n_sp_nodes;
    uint32_t *sp_fail;     /* [n_sp_nodes] node of the longest proper suffix */
    uint32_t *sp_rank;     /* [n_sp_nodes] index into special[] of the text
                              ending here (the first of equal texts), or UINT32_MAX */
    uint32_t *sp_out[2];   /* [n_sp_nodes] nearest node on the fail chain, self
                              included, ending a special: [0] any, [1] USER_DEFINED
                              only (split even unasked); 0 = none */
    uint32_t *sp_node;     /* [n_special] node of each special's text */
    uint64_t *sp_edge_key; /* (parent << 8 | byte) + 1, 0 = empty slot */
    uint32_t *sp_edge_child;
    uint32_t sp_edge_mask;
    uint64_t sp_seed;
    uint32_t sp_root[256];                /* 0 = none */
    int32_t bos, eos, eot, eom, unk, pad; /* -1 = none */
    int32_t eog[MODEL_VOCAB_MAX_EOG];
    uint32_t n_eog;
    bool add_bos, add_eos, add_space_prefix, ignore_merges;
    bool spm_split;               /* SPM: merge chunk by chunk (see vocab.c spm_splittable) */
    void *re[MODEL_VOCAB_MAX_RE]; /* pcre2_code_8 *, BPE pre-tokenizer */
    uint32_t n_re;
};

/* The output cursor of one tokenize call: ids past cap are counted, not
 * written, so KVS_ENOSPC can say how many were needed. */
typedef struct model_tok_out {
    int32_t *ids;
    size_t cap;
    size_t n;
} model_tok_out_t;

static inline void
model__tok_emit(model_tok_out_t *o, int32_t id)
{
    if (o->n < o->cap)
        o->ids[o->n] = id;
    o->n++;
}

/* model_vocab_tokenize where no control token's text may overlap the
 * n_plain byte ranges [plain[2k], plain[2k + 1]) (ascending, apart; there
 * it is text, as without MODEL_TOK_PARSE_SPECIAL); KVS_EINVAL for ranges
 * out of order or past len. */
int model__vocab_tokenize_ranges(const model_vocab_t *v, const char *text, size_t len,
                                 unsigned flags, const size_t *plain, size_t n_plain, int32_t *out,
                                 size_t cap, size_t *n_out);

/* n_vocab_model: token rows of the model the vocab belongs to (the token
 * array must have exactly that many entries), or 0 for a vocab-only file. */
int model__vocab_new(const model_gguf_t *g, uint32_t n_vocab_model, model_vocab_t **out, char *err,
                     size_t err_len);
/* Token id whose matching key is s[0..n), or -1. */
int32_t model__vocab_find(const model_vocab_t *v, const char *s, size_t n);
/* Undoes GPT-2's byte-level spelling of s into dst (n bytes suffice);
 * false when s uses characters outside that alphabet. */
bool model__gpt2_decode(const model_vocab_t *v, const char *s, size_t n, char *dst, size_t *dn);
/* Adds a merge (a repeated pair keeps its first rank); v->merges sized. */
void model__vocab_merge_put(model_vocab_t *v, int32_t left, int32_t right, uint32_t rank,
                            int32_t id);
/* The merge of (left, right), or NULL. */
const model_merge_t *model__vocab_merge(const model_vocab_t *v, int32_t left, int32_t right);
/* Appends bytes to the blob; *off receives their offset.  KVS_ENOMEM or
 * KVS_EFORMAT (the blob would pass 4 GiB). */
int model__vocab_blob_add(model_vocab_t *v, const void *p, size_t n, uint32_t *off);

/* vocab_spm.c: one raw fragment (after the special-token partition). */
int model__spm_tokenize(const model_vocab_t *v, const char *text, size_t len, bool space_prefix,
                        model_tok_out_t *o);
/* vocab_bpe.c: merges and pre-tokenizer from the file, then fragments. */
int model__bpe_init(model_vocab_t *v, const model_gguf_t *g, char *err, size_t err_len);
void model__bpe_free(model_vocab_t *v);
int model__bpe_tokenize(const model_vocab_t *v, const char *text, size_t len, model_tok_out_t *o);

/* Min-heap of candidate merges shared by SPM and BPE: smallest key first,
 * ties to the leftmost pair (llama.cpp's llm_bigram_* comparators). */
typedef struct model_bigram {
    float key;     /* SPM: -score of the merged token; BPE: 0 */
    uint32_t rank; /* BPE: merge rank; SPM: 0 */
    int32_t left, right;
    uint32_t size; /* bytes of left + right when pushed: stale check */
    int32_t id;    /* the merged token */
} model_bigram_t;

typedef struct model_heap {
    model_bigram_t *a;
    size_t n, cap;
} model_heap_t;

int model__heap_push(model_heap_t *h, const model_bigram_t *b);
bool model__heap_pop(model_heap_t *h, model_bigram_t *out);

/* Symbols of the merge loops: a doubly linked list over a text. */
typedef struct model_sym {
    uint32_t off, n; /* bytes of the text; n == 0 once merged into its left */
    int32_t prev, next;
    int32_t id; /* BPE: current token; SPM: unused */
} model_sym_t;

struct model {
    model_gguf_t *gguf;
    kern_backend_t *be;
    model_hparams_t hp;
    kern_tensor_t tok_embd;
    kern_tensor_t output_norm;
    kern_tensor_t output; /* == tok_embd when tied */
    float *rope_freqs;    /* host [n_rot/2] or NULL */
    bool rope_llama3;     /* rope.scaling.type = llama3: rope_freqs required */
    model_layer_t *layers;
    model_vocab_t *vocab; /* never NULL once loaded */
    void *host_map;       /* host backends: weights copied into huge pages */
    size_t host_map_len;
    char *host_copy;      /* 2 MiB-aligned start of the copy */
    const char *host_src; /* the mapping address host_copy mirrors */
    void **device_bufs;   /* weights uploaded to a device backend */
    uint32_t n_device_bufs;
    _Atomic(void *) pieces; /* model__pieces, built on first use */
    _Atomic(void *) guides; /* guide.c's compiled automata, by pattern */
};

/* Every token's bytes (model_vocab_piece, control tokens empty) for
 * guided decoding: bytes[off[id] .. off[id + 1]); the n_sorted ids whose
 * bytes are not empty in byte order, each sharing lcp[k] leading bytes
 * with the one before (lcp[0] = 0).  Built on first use (pieces.c);
 * NULL when out of memory. */
typedef struct model_pieces {
    uint32_t *off; /* [n_vocab + 1] */
    uint8_t *bytes;
    uint32_t *sorted; /* [n_sorted] */
    uint32_t *lcp;    /* [n_sorted] */
    uint32_t n_sorted;
    uint32_t max_len; /* the longest piece */
} model_pieces_t;
const model_pieces_t *model__pieces(const model_t *m);
/* Frees the table (model_free). */
void model__pieces_free(model_t *m);
/* Frees guide.c's kept automata (model_free; guides still out keep theirs). */
void model__guides_free(model_t *m);
/* out = row where bit id of bits is set, -inf elsewhere (bits NULL: all
 * -inf); the masked rows of guides and choices (guide.c). */
void model__mask_row(const uint64_t *bits, uint32_t nv, const float *row, float *out);

/* GPT-2 bytes_to_unicode: the code point that spells byte b in a vocabulary. */
uint32_t model__byte_to_codepoint(uint32_t b);

int model__tokenizer_init(model_t *m, char *err, size_t err_len);
void model__tokenizer_free(model_t *m);

/* snprintf into err when err != NULL, control characters as '?'. */
void model__errf(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif /* MODEL_INT_H */
