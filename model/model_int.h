/*
 * model/model_int.h — the model struct shared by the loader, tokenizer and
 * forward pass.  Only files under model/ include this.
 */
#ifndef MODEL_INT_H
#define MODEL_INT_H

#include "model.h"

typedef struct model_layer {
    kern_tensor_t attn_norm; /* f32 [n_embd] */
    kern_tensor_t wq, wk, wv, wo;
    kern_tensor_t bq, bk, bv; /* f32; data NULL when absent */
    kern_tensor_t ffn_norm;
    kern_tensor_t w_gate, w_up, w_down;
} model_layer_t;

typedef enum model_tok_kind {
    MODEL_TOK_BYTES,      /* no vocabulary in the file: id = byte value */
    MODEL_TOK_GPT2_BYTES, /* "gpt2" vocabulary of single bytes, no merges */
} model_tok_kind_t;

typedef struct model_tokenizer {
    model_tok_kind_t kind;
    int32_t byte_to_id[256];
    int16_t id_to_byte_small[512]; /* -1: not a byte token (ids < 512 only) */
    int16_t *id_to_byte;           /* [n_vocab] or NULL (then small table) */
    int32_t bos, eos, eot;
    bool add_bos;
} model_tokenizer_t;

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
    model_tokenizer_t tok;
    void *host_map; /* host backends: weights copied into huge pages */
    size_t host_map_len;
    char *host_copy;      /* 2 MiB-aligned start of the copy */
    const char *host_src; /* the mapping address host_copy mirrors */
    void **device_bufs;   /* weights uploaded to a device backend */
    uint32_t n_device_bufs;
};

/* GPT-2 bytes_to_unicode: the code point that spells byte b in a vocabulary. */
uint32_t model__byte_to_codepoint(uint32_t b);

int model__tokenizer_init(model_t *m, char *err, size_t err_len);
void model__tokenizer_free(model_t *m);

/* snprintf into err when err != NULL. */
void model__errf(char *err, size_t err_len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif /* MODEL_INT_H */
