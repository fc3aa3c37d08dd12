/*
 * tests/fuzz/fuzz_vocab.c — libFuzzer target for the tokenizers a model
 * file brings (model/vocab.c, vocab_spm.c, vocab_bpe.c): an input is a
 * text and a GGUF file, the vocabulary is built from the file's
 * tokenizer.ggml.* keys and the text tokenized with every flag set, each
 * id spelled back.  A file may be refused (with a message), never crash
 * the reader; an accepted vocabulary must keep its contracts: ids in
 * range, the sizes tokenize promises, counting calls that agree with the
 * writing ones, pieces whose length matches.  Built only with
 * -DKVS_FUZZ=ON and CC=clang:
 *
 *   ./build-fuzz/fuzz_vocab -max_total_time=60 corpus/
 *
 * Input: two bytes of text length (little-endian, cut to what is there),
 * the text, then the GGUF file.  When the first corpus directory is
 * missing or empty, LLVMFuzzerInitialize writes seeds into it: a
 * SentencePiece vocabulary with byte fallback and a user-defined token, a
 * byte-level BPE one for each of two pre-tokenizers, and a one-byte "gpt2"
 * vocabulary, each with a text that reaches its special cases.
 */
#include "model/model.h"

#include "base/kvs.h"
#include "tests/fuzz/fuzz_util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Seed corpus.                                                             */
/* ------------------------------------------------------------------------ */

#define SEED_TOKENS 300

/* UTF-8 of code point c (below 0x800) into out; returns the length. */
static int
utf8(unsigned c, char *out)
{
    if (c < 0x80) {
        out[0] = (char)c;
        out[1] = '\0';
        return 1;
    }
    out[0] = (char)(0xc0 | (c >> 6));
    out[1] = (char)(0x80 | (c & 0x3f));
    out[2] = '\0';
    return 2;
}

/* GPT-2's byte-level spelling of byte b: printable Latin-1 stands for
 * itself, the rest for 256 + its rank among them. */
static unsigned
gpt2_char(unsigned b)
{
    if ((b >= 33 && b <= 126) || (b >= 161 && b <= 172) || b >= 174)
        return b;
    unsigned k = 0;
    for (unsigned x = 0; x < b; x++)
        k += !((x >= 33 && x <= 126) || (x >= 161 && x <= 172) || x >= 174);
    return 256 + k;
}

typedef struct seed_vocab {
    char store[SEED_TOKENS][16];
    const char *tok[SEED_TOKENS];
    float score[SEED_TOKENS];
    int32_t type[SEED_TOKENS];
    uint32_t n;
} seed_vocab_t;

static void
add_tok(seed_vocab_t *v, const char *s, int32_t type, float score)
{
    snprintf(v->store[v->n], sizeof v->store[v->n], "%s", s);
    v->tok[v->n] = v->store[v->n];
    v->type[v->n] = type;
    v->score[v->n++] = score;
}

/* Seed k: 0 SentencePiece, 1 BPE "llama-bpe", 2 BPE "qwen2", 3 "gpt2"
 * of single bytes (kvserve's bundled models). */
static int
write_seed(const char *path, int k)
{
    static seed_vocab_t v;
    static const char *const texts[] = {
        "Hello world!  <|user|> caf\xc3\xa9 \xe4\xbd\xa0\xe5\xa5\xbd 12345\n\t<s>x",
        "<|begin_of_text|>Hello, world's 1234567 tokens\r\n  ab ba \xf0\x9f\x98\x80\xff",
        "I'm  here: 3.14159 \xd0\x9f\xd1\x80\xd0\xb8 <|im_end|>\n\n\nx",
        "bytes \x01\x02 and more <|endoftext|>",
    };
    static const char *const merges[] = {"\xc4\xa0 t", "h e",         "\xc4\xa0t he", "l l",
                                         "ll o",       "H e",         "He llo",       "\xc4\xa0 w",
                                         "o r",        "\xc4\xa0w or"};
    memset(&v, 0, sizeof v);
    char c[8];
    model_gguf_writer_t *w;
    int rc = model_gguf_writer_new(&w);
    if (rc != 0)
        return rc;
    if (k == 0) {
        add_tok(&v, "<unk>", 2, 0.0f);
        add_tok(&v, "<s>", 3, 0.0f);
        add_tok(&v, "</s>", 3, 0.0f);
        for (unsigned b = 0; b < 256; b++) {
            snprintf(c, sizeof c, "<0x%02X>", b);
            add_tok(&v, c, 6, 0.0f);
        }
        static const char *const pieces[] = {"\xe2\x96\x81",
                                             "\xe2\x96\x81H",
                                             "el",
                                             "lo",
                                             "\xe2\x96\x81w",
                                             "or",
                                             "ld",
                                             "\xe2\x96\x81wor",
                                             "ca",
                                             "f",
                                             "1",
                                             "23"};
        for (size_t i = 0; i < sizeof pieces / sizeof pieces[0]; i++)
            add_tok(&v, pieces[i], 1, -(float)i);
        add_tok(&v, "<|user|>", 4, 0.0f);
        FUZZ_TRY(model_gguf_writer_set_str(w, "tokenizer.ggml.model", "llama"));
        FUZZ_TRY(model_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", 1));
        FUZZ_TRY(model_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", 2));
        FUZZ_TRY(model_gguf_writer_set_u32(w, "tokenizer.ggml.unknown_token_id", 0));
        FUZZ_TRY(model_gguf_writer_set_bool(w, "tokenizer.ggml.add_eos_token", true));
    } else if (k == 1 || k == 2) {
        for (unsigned b = 0; b < 256; b++) {
            utf8(gpt2_char(b), c);
            add_tok(&v, c, 1, 0.0f);
        }
        static const char *const merged[] = {"\xc4\xa0t", "he",         "\xc4\xa0the", "ll",
                                             "llo",       "He",         "Hello",       "\xc4\xa0w",
                                             "or",        "\xc4\xa0wor"};
        for (size_t i = 0; i < sizeof merged / sizeof merged[0]; i++)
            add_tok(&v, merged[i], 1, 0.0f);
        add_tok(&v, k == 1 ? "<|begin_of_text|>" : "<|endoftext|>", 3, 0.0f);
        add_tok(&v, k == 1 ? "<|eot_id|>" : "<|im_end|>", 3, 0.0f);
        FUZZ_TRY(model_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2"));
        FUZZ_TRY(
            model_gguf_writer_set_str(w, "tokenizer.ggml.pre", k == 1 ? "llama-bpe" : "qwen2"));
        FUZZ_TRY(model_gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", merges, NULL,
                                               sizeof merges / sizeof merges[0]));
        FUZZ_TRY(model_gguf_writer_set_u32(w, "tokenizer.ggml.bos_token_id", v.n - 2));
        FUZZ_TRY(model_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", v.n - 1));
        FUZZ_TRY(model_gguf_writer_set_bool(w, "tokenizer.ggml.add_bos_token", k == 1));
    } else {
        for (unsigned b = 0; b < 256; b++) {
            utf8(gpt2_char(b), c);
            add_tok(&v, c, 1, 0.0f);
        }
        add_tok(&v, "<|endoftext|>", 3, 0.0f);
        FUZZ_TRY(model_gguf_writer_set_str(w, "tokenizer.ggml.model", "gpt2"));
        FUZZ_TRY(model_gguf_writer_set_u32(w, "tokenizer.ggml.eos_token_id", v.n - 1));
    }
    FUZZ_TRY(model_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", v.tok, NULL, v.n));
    FUZZ_TRY(model_gguf_writer_set_arr_f32(w, "tokenizer.ggml.scores", v.score, v.n));
    FUZZ_TRY(model_gguf_writer_set_arr_i32(w, "tokenizer.ggml.token_type", v.type, v.n));
    char gguf[4096]; /* the file alone, before the text goes in front */
    snprintf(gguf, sizeof gguf, "%s.gguf", path);
    FUZZ_TRY(model_gguf_writer_begin(w, gguf));
    FUZZ_TRY(model_gguf_writer_finish(w));
    model_gguf_writer_free(w);
    if (rc != 0)
        return rc;
    /* The input: length, text, then the file. */
    FILE *in = fopen(gguf, "rb"), *out = fopen(path, "wb");
    rc = in && out ? 0 : KVS_EIO;
    if (rc == 0) {
        size_t n = strlen(texts[k]);
        unsigned char len[2] = {(unsigned char)(n & 0xff), (unsigned char)(n >> 8)};
        fwrite(len, 1, 2, out);
        fwrite(texts[k], 1, n, out);
        char buf[4096];
        size_t got;
        while ((got = fread(buf, 1, sizeof buf, in)) > 0)
            fwrite(buf, 1, got, out);
    }
    if (in)
        fclose(in);
    if (out && fclose(out) != 0)
        rc = KVS_EIO;
    remove(gguf);
    return rc;
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    kvs_log_set_level(KVS_LOG_ERROR);
    fuzz_seed(*argc, *argv, 4, "", write_seed);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* One input.                                                               */
/* ------------------------------------------------------------------------ */

static bool
valid_utf8(const unsigned char *s, size_t n)
{
    for (size_t i = 0; i < n;) {
        unsigned c = s[i];
        size_t k = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
        if (k == 0 || i + k > n)
            return false;
        unsigned cp = k == 1 ? c : c & (0x7f >> k);
        for (size_t j = 1; j < k; j++) {
            if ((s[i + j] & 0xc0) != 0x80)
                return false;
            cp = cp << 6 | (s[i + j] & 0x3f);
        }
        static const unsigned least[5] = {0, 0, 0x80, 0x800, 0x10000};
        if (cp < least[k] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
            return false;
        i += k;
    }
    return true;
}

/* Tokenizes text under flags: a counting call, then a writing one into
 * exactly that room, then one with a room too small. */
static void
tokenize(const model_vocab_t *v, const char *text, size_t len, unsigned flags)
{
    size_t n = 0;
    int rc = model_vocab_tokenize(v, text, len, flags, NULL, 0, &n);
    if (rc == KVS_EINVAL || rc == KVS_ENOMEM)
        return; /* a byte the vocab cannot spell */
    FUZZ_CHECK(rc == 0 || rc == KVS_ENOSPC);
    FUZZ_CHECK((rc == 0) == (n == 0));
    /* The sizing model.h promises (valid UTF-8, no SentencePiece). */
    const char *kind = model_vocab_kind(v);
    if (strncmp(kind, "llama-spm", 9) != 0 && valid_utf8((const unsigned char *)text, len))
        FUZZ_CHECK(n <= len + 2);
    int32_t *ids = malloc((n ? n : 1) * sizeof *ids);
    if (ids == NULL)
        return;
    size_t n2 = 0;
    rc = model_vocab_tokenize(v, text, len, flags, ids, n, &n2);
    FUZZ_CHECK(rc == 0 && n2 == n);
    uint32_t n_tok = model_vocab_n_tokens(v);
    for (size_t i = 0; i < n; i++)
        FUZZ_CHECK(ids[i] >= 0 && (uint32_t)ids[i] < n_tok);
    if (n > 0) {
        size_t n3 = 0;
        FUZZ_CHECK(model_vocab_tokenize(v, text, len, flags, ids, n - 1, &n3) == KVS_ENOSPC &&
                   n3 == n);
    }
    free(ids);
}

/* Plain ranges (chat content): over the whole text they tokenize as
 * without MODEL_TOK_PARSE_SPECIAL; two inside it give valid ids. */
static void
plain(const model_vocab_t *v, const char *text, size_t len)
{
    int32_t *a = NULL, *b = NULL;
    size_t na = 0, nb = 0;
    int ra = model_vocab_tokenize_plain(v, text, len, MODEL_TOK_PARSE_SPECIAL, (size_t[]){0, len},
                                        len > 0, &a, &na);
    int rb = model_vocab_tokenize_alloc(v, text, len, 0, &b, &nb);
    if (ra != KVS_ENOMEM && rb != KVS_ENOMEM) {
        FUZZ_CHECK(ra == rb);
        FUZZ_CHECK(ra != 0 || (na == nb && memcmp(a, b, na * sizeof *a) == 0));
    }
    free(a);
    free(b);
    size_t r[4] = {len / 5, len / 5 + 1, len / 2, len / 2 + (len + 2) / 3};
    int rc = model_vocab_tokenize_plain(v, text, len, MODEL_TOK_PARSE_SPECIAL, r, 2, &a, &na);
    /* KVS_EINVAL: empty ranges at the smallest lengths, or a byte the
     * vocab cannot spell (as in tokenize). */
    FUZZ_CHECK(rc == 0 || rc == KVS_EINVAL || rc == KVS_ENOMEM);
    for (size_t i = 0; rc == 0 && i < na; i++)
        FUZZ_CHECK(a[i] >= 0 && (uint32_t)a[i] < model_vocab_n_tokens(v));
    free(a);
}

/* Every id's piece (up to a bound), with and without special text. */
static void
spell(const model_vocab_t *v)
{
    uint32_t n_tok = model_vocab_n_tokens(v);
    char buf[64];
    for (uint32_t id = 0; id < n_tok && id < 4096; id++) {
        for (int sp = 0; sp < 2; sp++) {
            int n = model_vocab_piece(v, (int32_t)id, sp, buf, sizeof buf);
            FUZZ_CHECK(n >= 0);
            char *big = malloc((size_t)n + 1);
            if (big == NULL)
                return;
            FUZZ_CHECK(model_vocab_piece(v, (int32_t)id, sp, big, (size_t)n) == n);
            if ((size_t)n <= sizeof buf)
                FUZZ_CHECK(memcmp(big, buf, (size_t)n) == 0);
            free(big);
        }
        (void)model_vocab_is_eog(v, (int32_t)id);
    }
    FUZZ_CHECK(model_vocab_piece(v, -1, false, buf, sizeof buf) == KVS_EINVAL);
    FUZZ_CHECK(model_vocab_piece(v, (int32_t)n_tok, false, buf, sizeof buf) == KVS_EINVAL);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    size_t len = (size_t)data[0] | (size_t)data[1] << 8;
    if (len > size - 2)
        len = size - 2;
    const char *text = (const char *)data + 2;
    model_gguf_t *g;
    char err[512];
    err[0] = '\0';
    if (model_gguf_open_mem(data + 2 + len, size - 2 - len, &g, err, sizeof err) != 0)
        return 0; /* fuzz_gguf's part */
    model_vocab_t *v = NULL;
    err[0] = '\0';
    int rc = model_vocab_new(g, &v, err, sizeof err);
    /* The vocabulary may outlive the file's handle (model.h). */
    model_gguf_close(g);
    if (rc != 0) {
        FUZZ_CHECK(rc == KVS_EFORMAT || rc == KVS_ENOTSUP || rc == KVS_ENOMEM);
        FUZZ_CHECK(err[0] != '\0' && strchr(err, '\n') == NULL);
        return 0;
    }
    uint32_t n_tok = model_vocab_n_tokens(v);
    int32_t special[3] = {model_vocab_bos(v), model_vocab_eos(v), model_vocab_eot(v)};
    for (int i = 0; i < 3; i++)
        FUZZ_CHECK(special[i] >= -1 && special[i] < (int32_t)n_tok);
    FUZZ_CHECK(model_vocab_kind(v) != NULL);
    for (unsigned flags = 0; flags < 4; flags++)
        tokenize(v, text, len, flags);
    plain(v, text, len);
    spell(v);
    model_vocab_free(v);
    return 0;
}
