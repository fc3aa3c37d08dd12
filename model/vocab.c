/*
 * model/vocab.c — tokenizer vocabularies from GGUF metadata: loading and
 * validating the tokenizer.ggml.* keys (tokens, token_type, scores, special
 * ids, add_* flags), the text -> id tables, the special-token partition that
 * runs before every tokenizer, detokenization, and the model_vocab_* API.
 * The tokenizers proper are vocab_spm.c (SentencePiece) and vocab_bpe.c
 * (byte-level BPE); model/tokenizer.c binds a vocab to a loaded model.
 *
 *   text --partition (special tokens, longest text first)--> raw | id | raw ...
 *   raw  --bytes | gpt2-bytes | SPM | BPE--> ids;   BOS ... EOS around it all
 *
 * The behaviour follows llama.cpp's src/llama-vocab.cpp (b4747), which the
 * test vectors in shared/data/vocab were checked against.  Files are
 * untrusted: every array length, id, type and merge is checked here and
 * refused with KVS_EFORMAT and the key's name.
 *
 * Callers: model/tokenizer.c, serve/ (through model_tokenize & co), tests.
 */
#include "model_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#define K_MODEL "tokenizer.ggml.model"
#define K_TOKENS "tokenizer.ggml.tokens"
#define K_TYPES "tokenizer.ggml.token_type"
#define K_SCORES "tokenizer.ggml.scores"
#define K_MERGES "tokenizer.ggml.merges"

/* Longer token texts are refused: real vocabularies stay below a few
 * hundred bytes, and the bound keeps piece lengths far inside int. */
#define MAX_TOKEN_BYTES 65536

/* ------------------------------------------------------------------------ */
/* String tables.                                                           */
/* ------------------------------------------------------------------------ */

/* FNV-1a from a secret start, then mixed: a model file's token texts are
 * the attacker's, and colliding ones would make building the table
 * quadratic (minutes for a 12 MB file). */
static uint64_t
hash_bytes(const char *s, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull ^ kvs_hash_seed();
    for (size_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)s[i]) * 0x100000001b3ull;
    return kvs_mix64(h);
}

/* Where a table's keys live: entry i is blob[off[t]], len[t] bytes, with
 * t = ind ? ind[i] : i. */
typedef struct keyset {
    const char *blob;
    const uint32_t *off, *len;
    const int32_t *ind;
} keyset_t;

static int
strmap_init(model_strmap_t *m, uint32_t n)
{
    uint32_t cap = 16;
    while (cap < 2ull * n)
        cap *= 2;
    m->slots = calloc(cap, sizeof *m->slots);
    m->mask = cap - 1;
    return m->slots ? 0 : KVS_ENOMEM;
}

static bool
key_equal(const keyset_t *ks, uint32_t i, const char *s, size_t n)
{
    uint32_t t = ks->ind ? (uint32_t)ks->ind[i] : i;
    return ks->len[t] == n && memcmp(ks->blob + ks->off[t], s, n) == 0;
}

/* Index of key s[0..n) or UINT32_MAX. */
static uint32_t
strmap_find(const model_strmap_t *m, const keyset_t *ks, const char *s, size_t n)
{
    if (m->slots == NULL)
        return UINT32_MAX;
    for (uint32_t h = (uint32_t)hash_bytes(s, n) & m->mask;; h = (h + 1) & m->mask) {
        uint32_t e = m->slots[h];
        if (e == 0)
            return UINT32_MAX;
        if (key_equal(ks, e - 1, s, n))
            return e - 1;
    }
}

/* Inserts entry i; an equal key already present is replaced (the later
 * token wins, as llama.cpp's token_to_id map does). */
static void
strmap_put(model_strmap_t *m, const keyset_t *ks, uint32_t i)
{
    uint32_t t = ks->ind ? (uint32_t)ks->ind[i] : i;
    const char *s = ks->blob + ks->off[t];
    size_t n = ks->len[t];
    for (uint32_t h = (uint32_t)hash_bytes(s, n) & m->mask;; h = (h + 1) & m->mask) {
        uint32_t e = m->slots[h];
        if (e == 0 || key_equal(ks, e - 1, s, n)) {
            m->slots[h] = i + 1;
            return;
        }
    }
}

int32_t
model__vocab_find(const model_vocab_t *v, const char *s, size_t n)
{
    keyset_t ks = {v->blob, v->key_off, v->key_len, NULL};
    uint32_t i = strmap_find(&v->map, &ks, s, n);
    return i == UINT32_MAX ? -1 : (int32_t)i;
}

/* A merge's slot: its pair of ids mixed with the process's secret (the
 * merges are the model file's, like the token texts). */
static uint32_t
merge_slot(const model_vocab_t *v, uint64_t pair)
{
    return (uint32_t)kvs_mix64(pair ^ kvs_hash_seed()) & v->merge_mask;
}

void
model__vocab_merge_put(model_vocab_t *v, int32_t left, int32_t right, uint32_t rank, int32_t id)
{
    uint64_t pair = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    uint32_t h = merge_slot(v, pair);
    for (; v->merges[h].pair != UINT64_MAX; h = (h + 1) & v->merge_mask)
        if (v->merges[h].pair == pair)
            return; /* a repeated pair keeps its first (best) rank */
    v->merges[h] = (model_merge_t){pair, rank, id};
    v->n_merges++;
}

const model_merge_t *
model__vocab_merge(const model_vocab_t *v, int32_t left, int32_t right)
{
    /* -1 (a byte with no token) never merges; (-1, -1) would also read
     * as the empty-slot marker. */
    if (v->merges == NULL || left < 0 || right < 0)
        return NULL;
    uint64_t pair = (uint64_t)(uint32_t)left << 32 | (uint32_t)right;
    for (uint32_t h = merge_slot(v, pair);; h = (h + 1) & v->merge_mask) {
        const model_merge_t *e = &v->merges[h];
        if (e->pair == pair)
            return e;
        if (e->pair == UINT64_MAX)
            return NULL;
    }
}

int
model__vocab_blob_add(model_vocab_t *v, const void *p, size_t n, uint32_t *off)
{
    if (v->blob_len + n > UINT32_MAX)
        return KVS_EFORMAT;
    if (v->blob_len + n > v->blob_cap) {
        size_t cap = v->blob_cap ? v->blob_cap : 4096;
        while (cap < v->blob_len + n)
            cap *= 2;
        char *b = realloc(v->blob, cap);
        if (b == NULL)
            return KVS_ENOMEM;
        v->blob = b;
        v->blob_cap = cap;
    }
    if (n)
        memcpy(v->blob + v->blob_len, p, n);
    *off = (uint32_t)v->blob_len;
    v->blob_len += n;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The merge heap (SPM and BPE).                                            */
/* ------------------------------------------------------------------------ */

static bool
bigram_less(const model_bigram_t *a, const model_bigram_t *b)
{
    if (a->key != b->key)
        return a->key < b->key;
    if (a->rank != b->rank)
        return a->rank < b->rank;
    return a->left < b->left;
}

int
model__heap_push(model_heap_t *h, const model_bigram_t *b)
{
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        model_bigram_t *a = realloc(h->a, cap * sizeof *a);
        if (a == NULL)
            return KVS_ENOMEM;
        h->a = a;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!bigram_less(b, &h->a[p]))
            break;
        h->a[i] = h->a[p];
        i = p;
    }
    h->a[i] = *b;
    return 0;
}

bool
model__heap_pop(model_heap_t *h, model_bigram_t *out)
{
    if (h->n == 0)
        return false;
    *out = h->a[0];
    model_bigram_t last = h->a[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n)
            break;
        if (c + 1 < h->n && bigram_less(&h->a[c + 1], &h->a[c]))
            c++;
        if (!bigram_less(&h->a[c], &last))
            break;
        h->a[i] = h->a[c];
        i = c;
    }
    if (h->n > 0)
        h->a[i] = last;
    return true;
}

/* ------------------------------------------------------------------------ */
/* Loading.                                                                 */
/* ------------------------------------------------------------------------ */

/* GPT-2's byte-level alphabet, inverted: code point -> byte, -1 if none.
 * Every code point it uses is below 324. */
static void
gpt2_alphabet(model_vocab_t *v)
{
    for (int i = 0; i < 324; i++)
        v->cp_to_byte[i] = -1;
    for (uint32_t b = 0; b < 256; b++)
        v->cp_to_byte[model__byte_to_codepoint(b)] = (int16_t)b;
}

bool
model__gpt2_decode(const model_vocab_t *v, const char *s, size_t n, char *dst, size_t *dn)
{
    const int16_t *cp_to_byte = v->cp_to_byte;
    const unsigned char *p = (const unsigned char *)s;
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        if (p[i] < 0x80) {
            cp = p[i++];
        } else if ((p[i] & 0xe0) == 0xc0 && i + 1 < n && (p[i + 1] & 0xc0) == 0x80) {
            cp = ((uint32_t)(p[i] & 0x1f) << 6) | (p[i + 1] & 0x3f);
            i += 2;
        } else {
            return false;
        }
        if (cp >= 324 || cp_to_byte[cp] < 0)
            return false;
        dst[k++] = (char)cp_to_byte[cp];
    }
    *dn = k;
    return true;
}

/* A special-token id key: absent keeps *id; -1 or 0xFFFFFFFF (how
 * converters write "none") clears it; an id outside the vocabulary is
 * refused, or ignored when `lenient` (files without a vocabulary, whose
 * ids kvserve has always ignored). */
static int
read_special(const model_gguf_t *g, const char *key, uint32_t n, bool lenient, int32_t *id,
             char *err, size_t err_len)
{
    int64_t x;
    int rc = model_gguf_get_i64(g, key, &x);
    if (rc == KVS_ENOENT)
        return 0;
    if (rc != 0) {
        model__errf(err, err_len, "key '%s' must be an integer", key);
        return KVS_EFORMAT;
    }
    if (x < 0 || x == 0xffffffffll) {
        *id = -1;
    } else if ((uint64_t)x >= n) {
        if (!lenient) {
            model__errf(err, err_len, "key '%s': token id %lld outside the vocabulary of %u", key,
                        (long long)x, n);
            return KVS_EFORMAT;
        }
        *id = -1;
    } else {
        *id = (int32_t)x;
    }
    return 0;
}

static int
read_bool(const model_gguf_t *g, const char *key, bool *b, char *err, size_t err_len)
{
    int rc = model_gguf_get_bool(g, key, b);
    if (rc == KVS_ENOENT)
        return 0;
    if (rc != 0) {
        model__errf(err, err_len, "key '%s' must be a bool", key);
        return KVS_EFORMAT;
    }
    return 0;
}

static int
read_specials(model_vocab_t *v, const model_gguf_t *g, bool lenient, char *err, size_t err_len)
{
    static const struct {
        const char *key;
        size_t field;
    } keys[] = {
        {"tokenizer.ggml.bos_token_id", offsetof(model_vocab_t, bos)},
        {"tokenizer.ggml.eos_token_id", offsetof(model_vocab_t, eos)},
        {"tokenizer.ggml.eot_token_id", offsetof(model_vocab_t, eot)},
        {"tokenizer.ggml.eom_token_id", offsetof(model_vocab_t, eom)},
        {"tokenizer.ggml.unknown_token_id", offsetof(model_vocab_t, unk)},
        {"tokenizer.ggml.padding_token_id", offsetof(model_vocab_t, pad)},
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
        int32_t *id = (int32_t *)((char *)v + keys[i].field);
        int rc = read_special(g, keys[i].key, v->n_tokens, lenient, id, err, err_len);
        if (rc)
            return rc;
    }
    return 0;
}

/* Token types (default NORMAL) and, for SPM, scores (default 0). */
static int
read_types_scores(model_vocab_t *v, const model_gguf_t *g, bool want_scores, char *err,
                  size_t err_len)
{
    uint32_t n = v->n_tokens;
    v->type = malloc(n);
    if (v->type == NULL)
        return KVS_ENOMEM;
    memset(v->type, MODEL_TT_NORMAL, n);
    model_gguf_type_t et;
    uint64_t cnt;
    const void *data;
    int rc = model_gguf_get_arr(g, K_TYPES, &et, &cnt);
    if (rc == 0) {
        if ((et != MODEL_GGUF_INT32 && et != MODEL_GGUF_UINT32) || cnt != n ||
            model_gguf_arr_data(g, K_TYPES, &data) != 0) {
            model__errf(err, err_len, "key '%s' must be an int32 array of %u entries", K_TYPES, n);
            return KVS_EFORMAT;
        }
        for (uint32_t i = 0; i < n; i++) {
            int32_t t;
            memcpy(&t, (const char *)data + (size_t)i * 4, 4);
            if (t < MODEL_TT_UNDEFINED || t > MODEL_TT_BYTE) {
                model__errf(err, err_len, "key '%s': token %u has unknown type %d", K_TYPES, i, t);
                return KVS_EFORMAT;
            }
            v->type[i] = (uint8_t)t;
        }
    } else if (rc != KVS_ENOENT) {
        model__errf(err, err_len, "key '%s' must be an array", K_TYPES);
        return KVS_EFORMAT;
    }
    if (!want_scores)
        return 0;
    v->score = calloc(n, sizeof *v->score);
    if (v->score == NULL)
        return KVS_ENOMEM;
    rc = model_gguf_get_arr(g, K_SCORES, &et, &cnt);
    if (rc == KVS_ENOENT)
        return 0;
    if (rc != 0 || et != MODEL_GGUF_FLOAT32 || cnt != n ||
        model_gguf_arr_data(g, K_SCORES, &data) != 0) {
        model__errf(err, err_len, "key '%s' must be a float32 array of %u entries", K_SCORES, n);
        return KVS_EFORMAT;
    }
    for (uint32_t i = 0; i < n; i++) {
        memcpy(&v->score[i], (const char *)data + (size_t)i * 4, 4);
        if (isnan(v->score[i])) {
            model__errf(err, err_len, "key '%s': score of token %u is NaN", K_SCORES, i);
            return KVS_EFORMAT;
        }
    }
    return 0;
}

/* Copies every token text into the blob. */
static int
read_texts(model_vocab_t *v, const model_gguf_t *g, char *err, size_t err_len)
{
    uint32_t n = v->n_tokens;
    v->text_off = malloc(n * sizeof(uint32_t));
    v->text_len = malloc(n * sizeof(uint32_t));
    v->key_off = malloc(n * sizeof(uint32_t));
    v->key_len = malloc(n * sizeof(uint32_t));
    v->piece_off = calloc(n, sizeof(uint32_t));
    v->piece_len = calloc(n, sizeof(uint32_t));
    if (!v->text_off || !v->text_len || !v->key_off || !v->key_len || !v->piece_off ||
        !v->piece_len)
        return KVS_ENOMEM;
    for (uint32_t i = 0; i < n; i++) {
        model_gguf_str_t s;
        if (model_gguf_arr_str(g, K_TOKENS, i, &s) != 0)
            return KVS_EFORMAT;
        if (s.len > MAX_TOKEN_BYTES) {
            model__errf(err, err_len, "key '%s': token %u is %zu bytes long", K_TOKENS, i, s.len);
            return KVS_EFORMAT;
        }
        int rc = model__vocab_blob_add(v, s.ptr, s.len, &v->text_off[i]);
        if (rc)
            return rc;
        v->text_len[i] = (uint32_t)s.len;
        v->key_len[i] = UINT32_MAX;
    }
    return 0;
}

static int
build_map(model_vocab_t *v)
{
    int rc = strmap_init(&v->map, v->n_tokens);
    if (rc)
        return rc;
    keyset_t ks = {v->blob, v->key_off, v->key_len, NULL};
    for (uint32_t i = 0; i < v->n_tokens; i++)
        if (v->key_len[i] != UINT32_MAX)
            strmap_put(&v->map, &ks, i);
    return 0;
}

/* "gpt2" vocabularies whose every usable token is one byte and that have no
 * merges: kvserve's bundled models, tokenized byte by byte with the same
 * ids as always (the first token spelling a byte wins). */
static bool
is_gpt2_bytes(const model_vocab_t *v, uint64_t n_merges)
{
    if (n_merges > 0)
        return false;
    for (uint32_t i = 0; i < v->n_tokens; i++) {
        if (v->type[i] == MODEL_TT_CONTROL || v->type[i] == MODEL_TT_UNUSED)
            continue;
        char b[4];
        size_t n;
        if (v->text_len[i] > 2 ||
            !model__gpt2_decode(v, v->blob + v->text_off[i], v->text_len[i], b, &n) || n != 1)
            return false;
    }
    return true;
}

static int
setup_gpt2_bytes(model_vocab_t *v)
{
    for (uint32_t i = 0; i < v->n_tokens; i++) {
        uint8_t t = v->type[i];
        if (t == MODEL_TT_UNUSED)
            continue;
        if (t == MODEL_TT_CONTROL) {
            v->piece_off[i] = v->text_off[i];
            v->piece_len[i] = v->text_len[i];
            continue;
        }
        char b;
        size_t n;
        model__gpt2_decode(v, v->blob + v->text_off[i], v->text_len[i], &b, &n);
        uint8_t byte = (uint8_t)b;
        if (v->byte_id[byte] < 0)
            v->byte_id[byte] = (int32_t)i;
        int rc = model__vocab_blob_add(v, &b, 1, &v->piece_off[i]);
        if (rc)
            return rc;
        v->piece_len[i] = 1;
    }
    return 0;
}

static int
setup_bpe(model_vocab_t *v)
{
    char *raw = malloc(MAX_TOKEN_BYTES);
    if (raw == NULL)
        return KVS_ENOMEM;
    int rc = 0;
    for (uint32_t i = 0; i < v->n_tokens && rc == 0; i++) {
        size_t n;
        /* The matching key is the raw bytes behind the byte-level spelling;
         * texts that are not in that alphabet (added tokens stored as plain
         * text) can only be matched by the special-token partition. */
        if (v->text_len[i] > 0 &&
            model__gpt2_decode(v, v->blob + v->text_off[i], v->text_len[i], raw, &n)) {
            rc = model__vocab_blob_add(v, raw, n, &v->key_off[i]);
            v->key_len[i] = (uint32_t)n;
        }
        switch (v->type[i]) {
        case MODEL_TT_NORMAL:
            if (v->key_len[i] != UINT32_MAX) {
                v->piece_off[i] = v->key_off[i];
                v->piece_len[i] = v->key_len[i];
                break;
            }
            __attribute__((fallthrough)); /* not byte-level: shown as stored */
        case MODEL_TT_CONTROL:
        case MODEL_TT_UNKNOWN:
        case MODEL_TT_USER_DEFINED:
            v->piece_off[i] = v->text_off[i];
            v->piece_len[i] = v->text_len[i];
            break;
        default: /* BYTE, UNUSED, UNDEFINED: no text, as in llama.cpp */
            break;
        }
    }
    free(raw);
    if (rc == 0)
        rc = build_map(v);
    for (int b = 0; b < 256 && rc == 0; b++) {
        char c = (char)b;
        v->byte_id[b] = model__vocab_find(v, &c, 1);
    }
    return rc;
}

static int
setup_spm(model_vocab_t *v, char *err, size_t err_len)
{
    char *buf = malloc(MAX_TOKEN_BYTES);
    if (buf == NULL)
        return KVS_ENOMEM;
    int rc = 0;
    for (uint32_t i = 0; i < v->n_tokens && rc == 0; i++) {
        const char *s = v->blob + v->text_off[i];
        size_t n = v->text_len[i];
        if (n > 0) {
            v->key_off[i] = v->text_off[i];
            v->key_len[i] = (uint32_t)n;
        }
        switch (v->type[i]) {
        case MODEL_TT_NORMAL: {
            /* "▁" (U+2581) spells a space. */
            size_t k = 0;
            for (size_t j = 0; j < n;) {
                if (j + 3 <= n && memcmp(s + j, "\xe2\x96\x81", 3) == 0) {
                    buf[k++] = ' ';
                    j += 3;
                } else {
                    buf[k++] = s[j++];
                }
            }
            rc = model__vocab_blob_add(v, buf, k, &v->piece_off[i]);
            v->piece_len[i] = (uint32_t)k;
            break;
        }
        case MODEL_TT_BYTE: {
            int hi = n == 6 ? kvs_hexval((unsigned char)s[3]) : -1,
                lo = n == 6 ? kvs_hexval((unsigned char)s[4]) : -1;
            if (n != 6 || memcmp(s, "<0x", 3) != 0 || s[5] != '>' || hi < 0 || lo < 0) {
                model__errf(err, err_len, "key '%s': byte token %u is not spelled <0xNN>", K_TOKENS,
                            i);
                rc = KVS_EFORMAT;
                break;
            }
            char b = (char)(hi * 16 + lo);
            rc = model__vocab_blob_add(v, &b, 1, &v->piece_off[i]);
            v->piece_len[i] = 1;
            break;
        }
        case MODEL_TT_CONTROL:
        case MODEL_TT_UNKNOWN:
        case MODEL_TT_USER_DEFINED:
            v->piece_off[i] = v->text_off[i];
            v->piece_len[i] = (uint32_t)n;
            break;
        default:
            break;
        }
    }
    free(buf);
    return rc ? rc : build_map(v);
}

/* True when every "▁" inside a token belongs to a run of them at its start
 * (Llama 2, Phi-3).  Then no token spans a non-"▁" character followed by
 * "▁", so text can be merged in independent chunks that each start at
 * such a run: the same result, with small heaps. */
static bool
spm_splittable(const model_vocab_t *v)
{
    for (uint32_t i = 0; i < v->n_tokens; i++) {
        const char *s = v->blob + v->text_off[i];
        size_t n = v->text_len[i];
        for (size_t o = 1; o + 3 <= n; o++)
            if (memcmp(s + o, "\xe2\x96\x81", 3) == 0 &&
                (o < 3 || memcmp(s + o - 3, "\xe2\x96\x81", 3) != 0))
                return false;
    }
    return true;
}

/* SPM byte fallback: <0xNN>, else the byte itself, else <unk>. */
static void
spm_byte_ids(model_vocab_t *v)
{
    static const char hex[] = "0123456789ABCDEF";
    for (int b = 0; b < 256; b++) {
        char s[6] = {'<', '0', 'x', hex[b >> 4], hex[b & 15], '>'};
        int32_t id = model__vocab_find(v, s, 6);
        if (id < 0) {
            char c = (char)b;
            id = model__vocab_find(v, &c, 1);
        }
        v->byte_id[b] = id >= 0 ? id : v->unk;
    }
}

static const char *const eot_texts[] = {
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
    /* DeepSeek's <｜end▁of▁sentence｜>, split so "\x9c" does not swallow "end" */
    ("<\xef\xbd\x9c"
     "end\xe2\x96\x81of\xe2\x96\x81sentence\xef\xbd\x9c>"),
};
static const char *const eog_texts[] = {
    "<|eot_id|>",    "<|im_end|>", "<|end|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>",   "_<EOT>",
};

static bool
text_is(const model_vocab_t *v, uint32_t id, const char *s)
{
    size_t n = strlen(s);
    return v->text_len[id] == n && memcmp(v->blob + v->text_off[id], s, n) == 0;
}

static void
add_eog(model_vocab_t *v, int32_t id)
{
    if (id < 0)
        return;
    for (uint32_t i = 0; i < v->n_eog; i++)
        if (v->eog[i] == id)
            return;
    if (v->n_eog < MODEL_VOCAB_MAX_EOG)
        v->eog[v->n_eog++] = id;
}

/* llama.cpp finds chat stop tokens by their text when the file names none. */
static void
find_eog(model_vocab_t *v)
{
    /* In the list's order, so that a chat turn end (<|end|>) is preferred
     * to a document end (<|endoftext|>). */
    for (size_t k = 0; k < sizeof eot_texts / sizeof eot_texts[0] && v->eot < 0; k++)
        for (uint32_t i = 0; i < v->n_tokens && v->eot < 0; i++)
            if (text_is(v, i, eot_texts[k]))
                v->eot = (int32_t)i;
    add_eog(v, v->eos);
    add_eog(v, v->eot);
    add_eog(v, v->eom);
    for (uint32_t i = 0; i < v->n_tokens; i++)
        for (size_t k = 0; k < sizeof eog_texts / sizeof eog_texts[0]; k++)
            if (text_is(v, i, eog_texts[k]))
                add_eog(v, (int32_t)i);
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Special texts over this many bytes in all are refused: the automaton
 * takes about 40 bytes per byte of them, and real vocabularies hold a few
 * tens of KB. */
#define MAX_SPECIAL_BYTES (16u << 20)

static uint32_t
sp_slot(const model_vocab_t *v, uint64_t key)
{
    return (uint32_t)kvs_mix64(key ^ v->sp_seed) & v->sp_edge_mask;
}

/* Node x's child along byte c, 0 = none. */
static uint32_t
sp_child(const model_vocab_t *v, uint32_t x, unsigned char c)
{
    if (x == 0)
        return v->sp_root[c];
    uint64_t key = ((uint64_t)x << 8 | c) + 1;
    for (uint32_t h = sp_slot(v, key);; h = (h + 1) & v->sp_edge_mask) {
        if (v->sp_edge_key[h] == key)
            return v->sp_edge_child[h];
        if (v->sp_edge_key[h] == 0)
            return 0;
    }
}

static void
sp_add_child(model_vocab_t *v, uint32_t x, unsigned char c, uint32_t y)
{
    if (x == 0) {
        v->sp_root[c] = y;
        return;
    }
    uint64_t key = ((uint64_t)x << 8 | c) + 1;
    uint32_t h = sp_slot(v, key);
    while (v->sp_edge_key[h] != 0)
        h = (h + 1) & v->sp_edge_mask;
    v->sp_edge_key[h] = key;
    v->sp_edge_child[h] = y;
}

/* The automaton over the reversed special texts: run over a text from its
 * end, the state at byte i names the longest special starting at i, and
 * its fail chain the shorter ones (all prefixes of it). */
static int
build_special_automaton(model_vocab_t *v, uint32_t n_bytes)
{
    uint32_t cap = n_bytes + 1, n_slots = 16;
    while (n_slots < 2ull * cap)
        n_slots *= 2;
    v->sp_seed = kvs_hash_seed();
    v->sp_edge_mask = n_slots - 1;
    v->sp_fail = calloc(cap, sizeof *v->sp_fail);
    v->sp_rank = malloc(cap * sizeof *v->sp_rank);
    v->sp_out[0] = calloc(cap, sizeof *v->sp_out[0]);
    v->sp_out[1] = calloc(cap, sizeof *v->sp_out[1]);
    v->sp_node = malloc(v->n_special * sizeof *v->sp_node);
    v->sp_edge_key = calloc(n_slots, sizeof *v->sp_edge_key);
    v->sp_edge_child = malloc(n_slots * sizeof *v->sp_edge_child);
    uint32_t *parent = malloc(cap * sizeof *parent), *depth = calloc(cap, sizeof *depth);
    uint32_t *order = malloc(cap * sizeof *order), *at = calloc(MAX_TOKEN_BYTES + 2, sizeof *at);
    unsigned char *byte = malloc(cap);
    int rc = KVS_ENOMEM;
    if (!v->sp_fail || !v->sp_rank || !v->sp_out[0] || !v->sp_out[1] || !v->sp_node ||
        !v->sp_edge_key || !v->sp_edge_child || !parent || !depth || !order || !at || !byte)
        goto out;
    uint32_t n = 1;
    v->sp_rank[0] = UINT32_MAX;
    for (uint32_t r = 0; r < v->n_special; r++) {
        uint32_t id = (uint32_t)v->special[r], x = 0;
        const unsigned char *t = (const unsigned char *)v->blob + v->text_off[id];
        for (uint32_t j = v->text_len[id]; j-- > 0;) {
            uint32_t y = sp_child(v, x, t[j]);
            if (y == 0) {
                y = n++;
                v->sp_rank[y] = UINT32_MAX;
                parent[y] = x;
                byte[y] = t[j];
                depth[y] = depth[x] + 1;
                sp_add_child(v, x, t[j], y);
            }
            x = y;
        }
        if (v->sp_rank[x] == UINT32_MAX) /* specials go longest first, then by id */
            v->sp_rank[x] = r;
        v->sp_node[r] = x;
    }
    v->n_sp_nodes = n;
    /* Breadth first (by depth), so a node's fail target is done before it. */
    for (uint32_t x = 0; x < n; x++)
        at[depth[x] + 1]++;
    for (uint32_t d = 1; d <= MAX_TOKEN_BYTES + 1; d++)
        at[d] += at[d - 1];
    for (uint32_t x = 0; x < n; x++)
        order[at[depth[x]]++] = x;
    for (uint32_t k = 1; k < n; k++) {
        uint32_t y = order[k], f = 0;
        if (parent[y] != 0) {
            f = v->sp_fail[parent[y]];
            while (f != 0 && sp_child(v, f, byte[y]) == 0)
                f = v->sp_fail[f];
            f = sp_child(v, f, byte[y]);
        }
        v->sp_fail[y] = f;
        uint32_t r = v->sp_rank[y];
        v->sp_out[0][y] = r != UINT32_MAX ? y : v->sp_out[0][f];
        v->sp_out[1][y] = r != UINT32_MAX && v->type[v->special[r]] == MODEL_TT_USER_DEFINED
                              ? y
                              : v->sp_out[1][f];
    }
    rc = 0;
out:
    free(parent);
    free(depth);
    free(order);
    free(at);
    free(byte);
    return rc;
}

static int
build_specials(model_vocab_t *v, char *err, size_t err_len)
{
    uint32_t n = 0;
    uint64_t n_bytes = 0;
    for (uint32_t i = 0; i < v->n_tokens; i++) {
        uint8_t t = v->type[i];
        if ((t == MODEL_TT_CONTROL || t == MODEL_TT_USER_DEFINED || t == MODEL_TT_UNKNOWN) &&
            v->text_len[i] > 0) {
            n++;
            n_bytes += v->text_len[i];
        }
    }
    if (n == 0)
        return 0;
    if (n_bytes > MAX_SPECIAL_BYTES) {
        model__errf(err, err_len,
                    "key '%s': the control, user-defined and unknown tokens' texts take %llu "
                    "bytes, more than the %u kvserve accepts",
                    K_TOKENS, (unsigned long long)n_bytes, MAX_SPECIAL_BYTES);
        return KVS_EFORMAT;
    }
    v->special = malloc(n * sizeof *v->special);
    if (!v->special)
        return KVS_ENOMEM;
    /* Longest text first, then lowest id: (~len, id) sorts that way. */
    uint64_t *order = malloc(n * sizeof *order);
    if (order == NULL)
        return KVS_ENOMEM;
    for (uint32_t i = 0; i < v->n_tokens; i++) {
        uint8_t t = v->type[i];
        if ((t == MODEL_TT_CONTROL || t == MODEL_TT_USER_DEFINED || t == MODEL_TT_UNKNOWN) &&
            v->text_len[i] > 0) {
            order[v->n_special++] = (uint64_t)(UINT32_MAX - v->text_len[i]) << 32 | i;
            if (t == MODEL_TT_USER_DEFINED)
                v->n_special_user++;
        }
    }
    qsort(order, n, sizeof *order, cmp_u64);
    for (uint32_t i = 0; i < n; i++)
        v->special[i] = (int32_t)(order[i] & 0xffffffffu);
    free(order);
    return build_special_automaton(v, (uint32_t)n_bytes);
}

/* Byte vocabularies: BOS added when the file has one (unless it says not
 * to); EOS and EOT end generation. */
static int
byte_vocab_specials(model_vocab_t *v, const model_gguf_t *g, char *err, size_t err_len)
{
    v->add_bos = v->bos >= 0;
    int rc = read_bool(g, "tokenizer.ggml.add_bos_token", &v->add_bos, err, err_len);
    if (rc)
        return rc;
    v->add_bos = v->add_bos && v->bos >= 0;
    add_eog(v, v->eos);
    add_eog(v, v->eot);
    return 0;
}

static int
load(model_vocab_t *v, const model_gguf_t *g, uint32_t n_model, char *err, size_t err_len)
{
    model_gguf_str_t kind = {"none", 4};
    int rc = model_gguf_get_str(g, K_MODEL, &kind);
    if (rc == KVS_EFORMAT) {
        model__errf(err, err_len, "key '%s' must be a string", K_MODEL);
        return KVS_EFORMAT;
    }
    bool has_kind = rc == 0;
    model_gguf_type_t et = MODEL_GGUF_STRING;
    uint64_t n_tokens = 0;
    rc = model_gguf_get_arr(g, K_TOKENS, &et, &n_tokens);
    if (rc == KVS_EFORMAT) {
        model__errf(err, err_len, "key '%s' must be a string array", K_TOKENS);
        return KVS_EFORMAT;
    }
    bool has_tokens = rc == 0;

    if (!has_tokens && (!has_kind || strcmp(kind.ptr, "none") == 0)) {
        if (n_model > 0 && n_model < 256) {
            model__errf(err, err_len,
                        "no vocabulary in the file and only %u token rows: the byte-level "
                        "tokenizer needs at least 256",
                        n_model);
            return KVS_EFORMAT;
        }
        v->kind = MODEL_VOCAB_BYTES;
        v->n_tokens = n_model ? n_model : 256;
        snprintf(v->name, sizeof v->name, "bytes");
        for (int b = 0; b < 256; b++)
            v->byte_id[b] = b;
        if ((rc = read_specials(v, g, true, err, err_len)))
            return rc;
        return byte_vocab_specials(v, g, err, err_len);
    }
    bool spm = strcmp(kind.ptr, "llama") == 0;
    if (!spm && strcmp(kind.ptr, "gpt2") != 0) {
        model__errf(err, err_len,
                    "tokenizer '%.32s' (key '%s') is not supported (supported: 'llama' "
                    "SentencePiece, 'gpt2' byte-level BPE, no vocabulary = bytes)",
                    kind.ptr, K_MODEL);
        return KVS_ENOTSUP;
    }
    if (!has_tokens || et != MODEL_GGUF_STRING || n_tokens == 0 || n_tokens >= INT32_MAX ||
        (n_model > 0 && n_tokens != n_model)) {
        if (n_model > 0)
            model__errf(err, err_len, "key '%s' must be a string array of %u entries", K_TOKENS,
                        n_model);
        else
            model__errf(err, err_len, "key '%s' must be a non-empty string array", K_TOKENS);
        return KVS_EFORMAT;
    }
    v->n_tokens = (uint32_t)n_tokens;
    if ((rc = read_types_scores(v, g, spm, err, err_len)) || (rc = read_texts(v, g, err, err_len)))
        return rc;

    gpt2_alphabet(v);
    uint64_t n_merges = 0;
    if (!spm) {
        rc = model_gguf_get_arr(g, K_MERGES, &et, &n_merges);
        if (rc == KVS_EFORMAT || (rc == 0 && et != MODEL_GGUF_STRING)) {
            model__errf(err, err_len, "key '%s' must be a string array", K_MERGES);
            return KVS_EFORMAT;
        }
        if (is_gpt2_bytes(v, n_merges)) {
            v->kind = MODEL_VOCAB_GPT2_BYTES;
            snprintf(v->name, sizeof v->name, "gpt2-bytes");
            if ((rc = setup_gpt2_bytes(v)) || (rc = read_specials(v, g, false, err, err_len)))
                return rc;
            if ((rc = byte_vocab_specials(v, g, err, err_len)))
                return rc;
            return build_specials(v, err, err_len);
        }
        if (rc == KVS_ENOENT) {
            model__errf(err, err_len, "tokenizer 'gpt2' needs key '%s'", K_MERGES);
            return KVS_EFORMAT;
        }
        v->kind = MODEL_VOCAB_BPE;
        if ((rc = setup_bpe(v)) || (rc = model__bpe_init(v, g, err, err_len)))
            return rc;
        /* llama.cpp's defaults for "gpt2" files that name no BOS/EOS. */
        v->bos = v->eos = v->n_tokens > 11 ? 11 : -1;
    } else {
        v->kind = MODEL_VOCAB_SPM;
        snprintf(v->name, sizeof v->name, "llama-spm");
        if ((rc = setup_spm(v, err, err_len)))
            return rc;
        v->bos = v->n_tokens > 1 ? 1 : -1;
        v->eos = v->n_tokens > 2 ? 2 : -1;
        v->unk = 0;
        v->add_bos = true;
        v->add_space_prefix = true;
    }
    if ((rc = read_specials(v, g, false, err, err_len)) ||
        (rc = read_bool(g, "tokenizer.ggml.add_bos_token", &v->add_bos, err, err_len)) ||
        (rc = read_bool(g, "tokenizer.ggml.add_eos_token", &v->add_eos, err, err_len)))
        return rc;
    if (spm &&
        (rc = read_bool(g, "tokenizer.ggml.add_space_prefix", &v->add_space_prefix, err, err_len)))
        return rc;
    v->add_bos = v->add_bos && v->bos >= 0;
    v->add_eos = v->add_eos && v->eos >= 0;
    if (spm) {
        spm_byte_ids(v);
        v->spm_split = spm_splittable(v);
    }
    find_eog(v);
    return build_specials(v, err, err_len);
}

int
model__vocab_new(const model_gguf_t *g, uint32_t n_vocab_model, model_vocab_t **out, char *err,
                 size_t err_len)
{
    *out = NULL;
    if (err && err_len)
        err[0] = '\0';
    model_vocab_t *v = calloc(1, sizeof *v);
    if (v == NULL)
        return KVS_ENOMEM;
    v->bos = v->eos = v->eot = v->eom = v->unk = v->pad = -1;
    for (int b = 0; b < 256; b++)
        v->byte_id[b] = -1;
    int rc = load(v, g, n_vocab_model, err, err_len);
    if (rc) {
        if (err && err_len && err[0] == '\0')
            model__errf(err, err_len, "%s while reading the tokenizer", kvs_strerror(rc));
        model_vocab_free(v);
        return rc;
    }
    *out = v;
    return 0;
}

int
model_vocab_new(const model_gguf_t *g, model_vocab_t **out, char *err, size_t err_len)
{
    if (g == NULL || out == NULL)
        return KVS_EINVAL;
    return model__vocab_new(g, 0, out, err, err_len);
}

void
model_vocab_free(model_vocab_t *v)
{
    if (v == NULL)
        return;
    model__bpe_free(v);
    free(v->type);
    free(v->score);
    free(v->blob);
    free(v->text_off);
    free(v->text_len);
    free(v->key_off);
    free(v->key_len);
    free(v->piece_off);
    free(v->piece_len);
    free(v->map.slots);
    free(v->merges);
    free(v->special);
    free(v->sp_fail);
    free(v->sp_rank);
    free(v->sp_out[0]);
    free(v->sp_out[1]);
    free(v->sp_node);
    free(v->sp_edge_key);
    free(v->sp_edge_child);
    free(v);
}

/* ------------------------------------------------------------------------ */
/* Tokenizing.                                                              */
/* ------------------------------------------------------------------------ */

static int
tokenize_raw(const model_vocab_t *v, const char *text, size_t len, bool after_special,
             model_tok_out_t *o)
{
    switch (v->kind) {
    case MODEL_VOCAB_BYTES:
        for (size_t i = 0; i < len; i++)
            model__tok_emit(o, (unsigned char)text[i]);
        return 0;
    case MODEL_VOCAB_GPT2_BYTES:
        for (size_t i = 0; i < len; i++) {
            int32_t id = v->byte_id[(unsigned char)text[i]];
            if (id < 0)
                return KVS_EINVAL;
            model__tok_emit(o, id);
        }
        return 0;
    case MODEL_VOCAB_SPM:
        return model__spm_tokenize(v, text, len, v->add_space_prefix && after_special, o);
    case MODEL_VOCAB_BPE:
        return model__bpe_tokenize(v, text, len, o);
    }
    return KVS_EINVAL;
}

typedef struct special_hit {
    size_t pos;
    uint32_t len;
    uint32_t rank; /* index into v->special: the order llama.cpp tries them in */
    size_t room;   /* bytes from pos a control token may cover (plain ranges) */
} special_hit_t;

/* Whether special node e may start where a control token has `room` bytes:
 * a user-defined one always may (it is split out of plain text too). */
static bool
sp_fits(const model_vocab_t *v, uint32_t e, size_t room)
{
    int32_t id = v->special[v->sp_rank[e]];
    return v->text_len[id] <= room || v->type[id] == MODEL_TT_USER_DEFINED;
}

static int
cmp_hit_pos(const void *a, const void *b)
{
    const special_hit_t *x = a, *y = b;
    return x->pos < y->pos ? -1 : x->pos > y->pos;
}

static bool
hit_before(const special_hit_t *x, const special_hit_t *y)
{
    return x->rank != y->rank ? x->rank < y->rank : x->pos < y->pos;
}

static void
heap_down(special_hit_t *h, size_t n, size_t i)
{
    for (;;) {
        size_t m = i, l = 2 * i + 1, r = l + 1;
        if (l < n && hit_before(&h[l], &h[m]))
            m = l;
        if (r < n && hit_before(&h[r], &h[m]))
            m = r;
        if (m == i)
            return;
        special_hit_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Appends to a growing hit array; 0 or KVS_ENOMEM. */
static int
hit_push(special_hit_t **a, size_t *n, size_t *cap, special_hit_t hit)
{
    if (*n == *cap) {
        size_t nc = *cap ? *cap * 2 : 16;
        special_hit_t *na = realloc(*a, nc * sizeof *na);
        if (na == NULL)
            return KVS_ENOMEM;
        *a = na;
        *cap = nc;
    }
    (*a)[(*n)++] = hit;
    return 0;
}

/* llama.cpp's tokenizer_st_partition: for each special token, longest text
 * first, every leftmost non-overlapping occurrence inside text not yet
 * claimed becomes that token.  Trying every occurrence of every special in
 * that order costs one entry per (byte, matching special), which nested
 * texts ("a", "aa", ... in a crafted vocab) make len x n_specials.  Here
 * each byte holds only its best untried special, in a heap ordered as
 * llama.cpp tries them: the automaton gives the longest eligible special
 * starting at each byte; a popped one that overlaps claimed text gives way
 * to the next shorter one that fits before that text (the longer ones
 * could never fit either), and a byte already claimed drops out.  Every
 * occurrence is thus decided as llama.cpp decides it, with at most one
 * entry per byte.  The raw pieces between the claimed ones go to the
 * vocab's tokenizer.  No control token may overlap the plain ranges
 * (model__vocab_tokenize_ranges): a longest match that does gives way to
 * the next shorter one that does not, as one overlapping claimed text. */
static int
tokenize_text(const model_vocab_t *v, const char *text, size_t len, bool parse_special,
              const size_t *plain, size_t n_plain, model_tok_out_t *o)
{
    special_hit_t *heap = NULL, *taken = NULL;
    size_t n_heap = 0, cap_heap = 0, n_taken = 0, cap_taken = 0;
    uint8_t *claimed = NULL;
    int rc = 0;
    bool want = v->n_special > 0 && (parse_special || v->n_special_user > 0);
    const uint32_t *out_of = v->sp_out[parse_special ? 0 : 1];
    uint32_t x = 0;
    size_t k = n_plain; /* ranges k .. end past byte i */
    for (size_t i = len; want && i-- > 0;) {
        unsigned char c = (unsigned char)text[i];
        uint32_t y;
        while ((y = sp_child(v, x, c)) == 0 && x != 0)
            x = v->sp_fail[x];
        x = y;
        while (k > 0 && plain[2 * k - 1] > i)
            k--;
        size_t room = k < n_plain ? (plain[2 * k] <= i ? 0 : plain[2 * k] - i) : len - i;
        /* In a range only user-defined ones fit: their own chain, in
         * one step, however many control texts the byte also starts. */
        uint32_t e = room ? out_of[x] : v->sp_out[1][x];
        while (e && !sp_fits(v, e, room))
            e = out_of[v->sp_fail[e]];
        if (e == 0)
            continue;
        uint32_t r = v->sp_rank[e];
        if ((rc = hit_push(&heap, &n_heap, &cap_heap,
                           (special_hit_t){i, v->text_len[v->special[r]], r, room})))
            goto out;
    }
    if (n_heap == 0) {
        rc = len ? tokenize_raw(v, text, len, true, o) : 0;
        goto out;
    }
    claimed = calloc(len, 1);
    if (claimed == NULL) {
        rc = KVS_ENOMEM;
        goto out;
    }
    for (size_t i = n_heap / 2; i-- > 0;)
        heap_down(heap, n_heap, i);
    while (n_heap > 0) {
        special_hit_t h = heap[0];
        const uint8_t *busy = claimed[h.pos] ? claimed + h.pos : memchr(claimed + h.pos, 1, h.len);
        if (busy == NULL) {
            memset(claimed + h.pos, 1, h.len);
            if ((rc = hit_push(&taken, &n_taken, &cap_taken, h)))
                goto out;
        }
        uint32_t e = 0;
        if (busy && busy > claimed + h.pos) { /* the next shorter one that fits before busy */
            size_t room = (size_t)(busy - (claimed + h.pos));
            const uint32_t *chain = h.room ? out_of : v->sp_out[1];
            e = chain[v->sp_fail[v->sp_node[h.rank]]];
            while (e && (v->text_len[v->special[v->sp_rank[e]]] > room || !sp_fits(v, e, h.room)))
                e = chain[v->sp_fail[e]];
        }
        if (e) { /* tried after the one popped, as it is shorter */
            heap[0].rank = v->sp_rank[e];
            heap[0].len = v->text_len[v->special[heap[0].rank]];
        } else {
            heap[0] = heap[--n_heap];
        }
        heap_down(heap, n_heap, 0);
    }
    qsort(taken, n_taken, sizeof *taken, cmp_hit_pos);
    size_t at = 0;
    bool after_special = true; /* SPM: the first fragment gets the prefix */
    for (size_t h = 0; h < n_taken && rc == 0; h++) {
        if (taken[h].pos > at) {
            rc = tokenize_raw(v, text + at, taken[h].pos - at, after_special, o);
            after_special = false;
        }
        model__tok_emit(o, v->special[taken[h].rank]);
        after_special = true;
        at = taken[h].pos + taken[h].len;
    }
    if (rc == 0 && at < len)
        rc = tokenize_raw(v, text + at, len - at, after_special, o);
out:
    free(heap);
    free(taken);
    free(claimed);
    return rc;
}

int
model_vocab_tokenize(const model_vocab_t *v, const char *text, size_t len, unsigned flags,
                     int32_t *out, size_t cap, size_t *n_out)
{
    return model__vocab_tokenize_ranges(v, text, len, flags, NULL, 0, out, cap, n_out);
}

int
model__vocab_tokenize_ranges(const model_vocab_t *v, const char *text, size_t len, unsigned flags,
                             const size_t *plain, size_t n_plain, int32_t *out, size_t cap,
                             size_t *n_out)
{
    if (n_out)
        *n_out = 0;
    if (v == NULL || n_out == NULL || (len > 0 && text == NULL) || (cap > 0 && out == NULL) ||
        (flags & ~(MODEL_TOK_ADD_SPECIAL | MODEL_TOK_PARSE_SPECIAL)) ||
        (n_plain > 0 && plain == NULL))
        return KVS_EINVAL;
    for (size_t k = 0; k < n_plain; k++)
        if (plain[2 * k] >= plain[2 * k + 1] || plain[2 * k + 1] > len ||
            (k > 0 && plain[2 * k] < plain[2 * k - 1]))
            return KVS_EINVAL;
    model_tok_out_t o = {out, cap, 0};
    bool add = flags & MODEL_TOK_ADD_SPECIAL;
    if (add && v->add_bos)
        model__tok_emit(&o, v->bos);
    int rc = tokenize_text(v, text, len, flags & MODEL_TOK_PARSE_SPECIAL, plain, n_plain, &o);
    if (add && v->add_eos)
        model__tok_emit(&o, v->eos);
    *n_out = o.n;
    if (rc)
        return rc;
    return o.n > cap ? KVS_ENOSPC : 0;
}

/* ------------------------------------------------------------------------ */
/* Pieces and accessors.                                                    */
/* ------------------------------------------------------------------------ */

int
model_vocab_piece(const model_vocab_t *v, int32_t id, bool special, char *buf, size_t cap)
{
    if (v == NULL || id < 0 || (uint32_t)id >= v->n_tokens || (cap > 0 && buf == NULL))
        return KVS_EINVAL;
    if (v->kind == MODEL_VOCAB_BYTES) {
        if (id >= 256)
            return 0;
        if (cap > 0)
            buf[0] = (char)id;
        return 1;
    }
    uint8_t t = v->type[id];
    if ((t == MODEL_TT_CONTROL || t == MODEL_TT_UNKNOWN) && !special)
        return 0;
    uint32_t n = v->piece_len[id];
    if (cap > 0)
        memcpy(buf, v->blob + v->piece_off[id], n < cap ? n : cap);
    return (int)n;
}

uint32_t
model_vocab_n_tokens(const model_vocab_t *v)
{
    return v->n_tokens;
}

int32_t
model_vocab_bos(const model_vocab_t *v)
{
    return v->bos;
}

int32_t
model_vocab_eos(const model_vocab_t *v)
{
    return v->eos;
}

int32_t
model_vocab_eot(const model_vocab_t *v)
{
    return v->eot;
}

bool
model_vocab_is_eog(const model_vocab_t *v, int32_t id)
{
    for (uint32_t i = 0; i < v->n_eog; i++)
        if (v->eog[i] == id)
            return id >= 0;
    return false;
}

uint32_t
model_vocab_eog(const model_vocab_t *v, const int32_t **ids)
{
    *ids = v->eog;
    return v->n_eog;
}

bool
model_vocab_adds_bos(const model_vocab_t *v)
{
    return v->add_bos;
}

bool
model_vocab_adds_eos(const model_vocab_t *v)
{
    return v->add_eos;
}

const char *
model_vocab_kind(const model_vocab_t *v)
{
    return v->name;
}
