/*
 * model/tokenizer.c — a loaded model's tokenizer: binds the vocabulary of
 * the model's GGUF file (model/vocab*.c) to the model and keeps the
 * model_tokenize / model_token_* calls serve/ and sched/ use.  Vocabularies
 * must have exactly one entry per token row of the model; files without
 * any vocabulary keep the "bytes" tokenizer (id = byte value), and "gpt2"
 * vocabularies of single bytes without merges (kvserve's bundled models)
 * keep their byte ids.
 *
 * Callers: model_load (init/free), serve/, sched/, tests.
 */
#include "model_int.h"

#include <stdlib.h>

/* GPT-2's reversible byte -> code point map: printable Latin-1 bytes map to
 * themselves, the rest to 256, 257, ... in byte order. */
uint32_t
model__byte_to_codepoint(uint32_t b)
{
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255))
        return b;
    uint32_t n = 0;
    for (uint32_t c = 0; c < b; c++)
        if (!((c >= 33 && c <= 126) || (c >= 161 && c <= 172) || (c >= 174 && c <= 255)))
            n++;
    return 256 + n;
}

int
model__tokenizer_init(model_t *m, char *err, size_t err_len)
{
    return model__vocab_new(m->gguf, m->hp.n_vocab, &m->vocab, err, err_len);
}

void
model__tokenizer_free(model_t *m)
{
    model_vocab_free(m->vocab);
    m->vocab = NULL;
}

const model_vocab_t *
model_vocab(const model_t *m)
{
    return m->vocab;
}

int
model_tokenize(const model_t *m, const char *text, size_t len, bool add_bos, int32_t *out,
               size_t cap, size_t *n_out)
{
    return model_vocab_tokenize(m->vocab, text, len, add_bos ? MODEL_TOK_ADD_SPECIAL : 0, out, cap,
                                n_out);
}

int
model_token_piece(const model_t *m, int32_t id, char *buf, size_t cap)
{
    int n = model_vocab_piece(m->vocab, id, false, buf, cap);
    return n >= 0 && (size_t)n > cap ? (int)cap : n;
}

int32_t
model_token_bos(const model_t *m)
{
    return model_vocab_bos(m->vocab);
}

int32_t
model_token_eos(const model_t *m)
{
    return model_vocab_eos(m->vocab);
}

bool
model_token_is_eog(const model_t *m, int32_t id)
{
    return model_vocab_is_eog(m->vocab, id);
}

const char *
model_tokenizer_name(const model_t *m)
{
    return model_vocab_kind(m->vocab);
}

int
model_vocab_tokenize_alloc(const model_vocab_t *v, const char *text, size_t len, unsigned flags,
                           int32_t **out, size_t *n_out)
{
    return model_vocab_tokenize_plain(v, text, len, flags, NULL, 0, out, n_out);
}

int
model_vocab_tokenize_plain(const model_vocab_t *v, const char *text, size_t len, unsigned flags,
                           const size_t *plain, size_t n_plain, int32_t **out, size_t *n_out)
{
    /* len + 2 fits valid UTF-8 (model.h); a second pass sizes the rest. */
    size_t cap = len + 2, n = 0;
    *out = NULL;
    *n_out = 0;
    for (int pass = 0; pass < 2; pass++) {
        int32_t *ids = malloc((cap ? cap : 1) * sizeof *ids);
        if (ids == NULL)
            return KVS_ENOMEM;
        int rc = model__vocab_tokenize_ranges(v, text, len, flags, plain, n_plain, ids, cap, &n);
        if (rc == 0) {
            *out = ids;
            *n_out = n;
            return 0;
        }
        free(ids);
        if (rc != KVS_ENOSPC)
            return rc;
        cap = n;
    }
    return KVS_EINVAL;
}
