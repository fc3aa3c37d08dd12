/*
 * model/tokenizer.c — text <-> token ids for the vocabularies kvserve
 * supports so far:
 *   "bytes"      the file has no vocabulary: token id = byte value;
 *   "gpt2-bytes" a GGUF "gpt2" vocabulary whose normal tokens are single
 *                bytes spelled with GPT-2's bytes_to_unicode map and whose
 *                merge list is empty (kvserve's bundled models).
 * Any other tokenizer is refused at load with a message saying so, rather
 * than silently mis-tokenizing.  Called by serve/ and tests.
 */
#include "model_int.h"

#include <stdlib.h>
#include <string.h>

#define TOKEN_TYPE_CONTROL 3
#define TOKEN_TYPE_UNUSED 5

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

/* Decodes one UTF-8 code point; returns bytes used or 0 when invalid. */
static size_t
utf8_decode(const unsigned char *s, size_t len, uint32_t *cp)
{
    if (len == 0)
        return 0;
    if (s[0] < 0x80) {
        *cp = s[0];
        return 1;
    }
    if ((s[0] & 0xe0) == 0xc0 && len >= 2 && (s[1] & 0xc0) == 0x80) {
        *cp = ((uint32_t)(s[0] & 0x1f) << 6) | (s[1] & 0x3f);
        return 2;
    }
    return 0;
}

static int
read_special(model_t *m, const char *key, int32_t *out)
{
    uint32_t v;
    *out = -1;
    if (model_gguf_get_u32(m->gguf, key, &v) == 0 && v < m->hp.n_vocab)
        *out = (int32_t)v;
    return 0;
}

int
model__tokenizer_init(model_t *m, char *err, size_t err_len)
{
    model_tokenizer_t *t = &m->tok;
    memset(t, 0, sizeof *t);
    for (int i = 0; i < 256; i++)
        t->byte_to_id[i] = -1;
    for (int i = 0; i < 512; i++)
        t->id_to_byte_small[i] = -1;
    read_special(m, "tokenizer.ggml.bos_token_id", &t->bos);
    read_special(m, "tokenizer.ggml.eos_token_id", &t->eos);
    read_special(m, "tokenizer.ggml.eot_token_id", &t->eot);

    model_gguf_str_t kind = {"none", 4};
    bool has_kind = model_gguf_get_str(m->gguf, "tokenizer.ggml.model", &kind) == 0;
    model_gguf_type_t et;
    uint64_t n_tokens = 0;
    bool has_tokens = model_gguf_get_arr(m->gguf, "tokenizer.ggml.tokens", &et, &n_tokens) == 0;

    if (!has_tokens && (!has_kind || strcmp(kind.ptr, "none") == 0)) {
        if (m->hp.n_vocab < 256) {
            model__errf(err, err_len,
                        "no vocabulary in the file and only %u token rows: the byte-level "
                        "tokenizer needs at least 256",
                        m->hp.n_vocab);
            return KVS_EFORMAT;
        }
        t->kind = MODEL_TOK_BYTES;
        for (int b = 0; b < 256; b++) {
            t->byte_to_id[b] = b;
            t->id_to_byte_small[b] = (int16_t)b;
        }
    } else if (strcmp(kind.ptr, "gpt2") == 0) {
        if (!has_tokens || et != MODEL_GGUF_STRING || n_tokens != m->hp.n_vocab) {
            model__errf(err, err_len,
                        "key 'tokenizer.ggml.tokens' must be a string array of %u entries",
                        m->hp.n_vocab);
            return KVS_EFORMAT;
        }
        uint64_t n_merges = 0;
        if (model_gguf_get_arr(m->gguf, "tokenizer.ggml.merges", &et, &n_merges) == 0 &&
            n_merges > 0) {
            model__errf(err, err_len,
                        "tokenizer 'gpt2' with %llu BPE merges is not supported yet "
                        "(byte-level vocabularies without merges are)",
                        (unsigned long long)n_merges);
            return KVS_ENOTSUP;
        }
        const int32_t *types = NULL;
        uint64_t n_types = 0;
        const void *tdata;
        if (model_gguf_get_arr(m->gguf, "tokenizer.ggml.token_type", &et, &n_types) == 0 &&
            (et == MODEL_GGUF_INT32 || et == MODEL_GGUF_UINT32) && n_types == n_tokens &&
            model_gguf_arr_data(m->gguf, "tokenizer.ggml.token_type", &tdata) == 0)
            types = tdata;
        uint32_t cp_to_byte[324];
        for (uint32_t i = 0; i < 324; i++)
            cp_to_byte[i] = UINT32_MAX;
        for (uint32_t b = 0; b < 256; b++)
            cp_to_byte[model__byte_to_codepoint(b)] = b;
        if (n_tokens > 512) {
            t->id_to_byte = malloc(n_tokens * sizeof *t->id_to_byte);
            if (t->id_to_byte == NULL)
                return KVS_ENOMEM;
            for (uint64_t i = 0; i < n_tokens; i++)
                t->id_to_byte[i] = -1;
        }
        for (uint64_t id = 0; id < n_tokens; id++) {
            int32_t type = 1;
            if (types)
                memcpy(&type, (const char *)types + id * 4, 4);
            if (type == TOKEN_TYPE_CONTROL || type == TOKEN_TYPE_UNUSED)
                continue;
            model_gguf_str_t s;
            model_gguf_arr_str(m->gguf, "tokenizer.ggml.tokens", id, &s);
            uint32_t cp;
            size_t used = utf8_decode((const unsigned char *)s.ptr, s.len, &cp);
            if (used == 0 || used != s.len || cp >= 324 || cp_to_byte[cp] == UINT32_MAX) {
                model__errf(err, err_len,
                            "tokenizer 'gpt2': token %llu is not a single byte; vocabularies "
                            "with multi-byte tokens are not supported yet",
                            (unsigned long long)id);
                return KVS_ENOTSUP;
            }
            uint32_t b = cp_to_byte[cp];
            if (t->byte_to_id[b] < 0)
                t->byte_to_id[b] = (int32_t)id;
            if (t->id_to_byte)
                t->id_to_byte[id] = (int16_t)b;
            else
                t->id_to_byte_small[id] = (int16_t)b;
        }
        t->kind = MODEL_TOK_GPT2_BYTES;
    } else {
        model__errf(err, err_len,
                    "tokenizer '%.32s' is not supported yet (supported: byte-level vocabularies)",
                    kind.ptr);
        return KVS_ENOTSUP;
    }
    bool add_bos = t->bos >= 0;
    if (model_gguf_get_bool(m->gguf, "tokenizer.ggml.add_bos_token", &add_bos) != 0)
        add_bos = t->bos >= 0;
    t->add_bos = add_bos && t->bos >= 0;
    return 0;
}

void
model__tokenizer_free(model_t *m)
{
    free(m->tok.id_to_byte);
    m->tok.id_to_byte = NULL;
}

int
model_tokenize(const model_t *m, const char *text, size_t len, bool add_bos, int32_t *out,
               size_t cap, size_t *n_out)
{
    const model_tokenizer_t *t = &m->tok;
    bool bos = add_bos && t->add_bos;
    size_t need = len + (bos ? 1 : 0);
    *n_out = need;
    for (size_t i = 0; i < len; i++)
        if (t->byte_to_id[(unsigned char)text[i]] < 0)
            return KVS_EINVAL;
    if (need > cap)
        return KVS_ENOSPC;
    size_t n = 0;
    if (bos)
        out[n++] = t->bos;
    for (size_t i = 0; i < len; i++)
        out[n++] = t->byte_to_id[(unsigned char)text[i]];
    return 0;
}

int
model_token_piece(const model_t *m, int32_t id, char *buf, size_t cap)
{
    const model_tokenizer_t *t = &m->tok;
    if (id < 0 || (uint32_t)id >= m->hp.n_vocab)
        return KVS_EINVAL;
    int b = -1;
    if (t->id_to_byte)
        b = t->id_to_byte[id];
    else if (id < 512)
        b = t->id_to_byte_small[id];
    if (b < 0 || cap < 1)
        return 0;
    buf[0] = (char)b;
    return 1;
}

int32_t
model_token_bos(const model_t *m)
{
    return m->tok.bos;
}

int32_t
model_token_eos(const model_t *m)
{
    return m->tok.eos;
}

bool
model_token_is_eog(const model_t *m, int32_t id)
{
    return id >= 0 && (id == m->tok.eos || id == m->tok.eot);
}

const char *
model_tokenizer_name(const model_t *m)
{
    return m->tok.kind == MODEL_TOK_BYTES ? "bytes" : "gpt2-bytes";
}
