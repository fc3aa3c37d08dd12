/*
 * model/vocab_bpe.c — the byte-level BPE tokenizer of tokenizer.ggml.model
 * "gpt2" vocabularies (Llama 3, Qwen2, GPT-2, StarCoder, Falcon, DeepSeek):
 * the regex pre-tokenizer named by tokenizer.ggml.pre, then merges by rank,
 * as llama.cpp's llm_tokenizer_bpe does it.
 *
 *   text --U+FFFD for bad UTF-8--> regex 1 splits it, regex 2 splits each
 *   piece (matches and the gaps between them both become pieces), ...
 *   each final word: one symbol per byte, then repeatedly merge the
 *   adjacent pair with the lowest merge rank (ties: leftmost).
 *
 * Vocabulary strings and merges use GPT-2's byte-to-unicode spelling; they
 * are turned back into raw bytes once at load (vocab.c keys tokens by their
 * raw bytes), so this file works on bytes and token ids only: a merge is a
 * hash lookup of (left id, right id) -> (rank, merged id).
 *
 * Regexes run on PCRE2 (UTF + UCP, JIT-compiled when available); each is
 * matched against one piece at a time so that $ and lookaheads see the
 * piece's end, as llama.cpp's unicode_regex_split does.  An unknown
 * tokenizer.ggml.pre is refused at load rather than guessed.
 *
 * Called by vocab.c: model__bpe_init at load, model__bpe_tokenize per raw
 * fragment.  The compiled regexes are shared read-only between threads;
 * each call has its own match data.
 */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "model_int.h"

#include <pcre2.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Pre-tokenizers (regexes from the models' tokenizer.json, in the forms    */
/* llama.cpp b4747 uses).                                                   */
/* ------------------------------------------------------------------------ */

#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
/* (?i:'s|...) spelled out case by case, as llama.cpp does. */
#define RE_CONTRACTIONS "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
#define RE_LLAMA3_TAIL "| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_LLAMA3 RE_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}" RE_LLAMA3_TAIL
#define RE_QWEN2 RE_CONTRACTIONS "|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}" RE_LLAMA3_TAIL
/* Cased letters (Unicode L&) as DeepSeek's tokenizer.json lists them. */
#define RE_DEEPSEEK_LETTERS                                                                       \
    "A-Za-z\\x{b5}\\x{c0}-\\x{d6}\\x{d8}-\\x{f6}\\x{f8}-\\x{1ba}\\x{1bc}-\\x{1bf}\\x{1c4}-\\x{"   \
    "293}"                                                                                        \
    "\\x{295}-\\x{2af}\\x{370}-\\x{373}\\x{376}\\x{377}\\x{37b}-\\x{37d}\\x{37f}\\x{386}"         \
    "\\x{388}-\\x{38a}\\x{38c}\\x{38e}-\\x{3a1}\\x{3a3}-\\x{3f5}\\x{3f7}-\\x{481}"                \
    "\\x{48a}-\\x{52f}\\x{531}-\\x{556}\\x{10a0}-\\x{10c5}\\x{13a0}-\\x{13f5}\\x{13f8}-\\x{13fd}" \
    "\\x{1c90}-\\x{1cba}\\x{1cbd}-\\x{1cbf}\\x{1d00}-\\x{1d2b}\\x{1d6b}-\\x{1d77}"                \
    "\\x{1d79}-\\x{1d9a}\\x{1e00}-\\x{1f15}\\x{1f18}-\\x{1f1d}\\x{1f20}-\\x{1f45}"                \
    "\\x{1f48}-\\x{1f4d}\\x{1f50}-\\x{1f57}\\x{1f59}\\x{1f5b}\\x{1f5d}\\x{1f5f}-\\x{1f7d}"        \
    "\\x{1f80}-\\x{1fb4}\\x{1fb6}-\\x{1fbc}\\x{1fbe}\\x{1fc2}-\\x{1fc4}\\x{1fc6}-\\x{1fcc}"       \
    "\\x{1fd0}-\\x{1fd3}\\x{1fd6}-\\x{1fdb}\\x{1fe0}-\\x{1fec}\\x{1ff2}-\\x{1ff4}"                \
    "\\x{1ff6}-\\x{1ffc}\\x{2102}\\x{2107}\\x{210a}-\\x{2113}\\x{2115}\\x{2119}-\\x{211d}"        \
    "\\x{2124}\\x{2126}\\x{2128}\\x{212a}-\\x{212d}\\x{212f}-\\x{2134}\\x{2139}"                  \
    "\\x{213c}-\\x{213f}\\x{2145}-\\x{2149}\\x{214e}\\x{2183}\\x{2184}\\x{2c00}-\\x{2c7b}"        \
    "\\x{2c7e}-\\x{2ce4}\\x{2ceb}-\\x{2cee}\\x{2cf2}\\x{2cf3}\\x{a640}-\\x{a66d}"                 \
    "\\x{a680}-\\x{a69b}\\x{a722}-\\x{a76f}\\x{a771}-\\x{a787}\\x{a78b}-\\x{a78e}"                \
    "\\x{ab70}-\\x{abbf}\\x{fb00}-\\x{fb06}\\x{fb13}-\\x{fb17}\\x{ff21}-\\x{ff3a}"                \
    "\\x{ff41}-\\x{ff5a}\\x{10400}-\\x{1044f}\\x{104b0}-\\x{104d3}\\x{104d8}-\\x{104fb}"          \
    "\\x{10c80}-\\x{10cb2}\\x{10cc0}-\\x{10cf2}\\x{118a0}-\\x{118df}\\x{1e900}-\\x{1e943}"
#define RE_CJK "[\\x{4e00}-\\x{9fa5}\\x{800}-\\x{4e00}\\x{ac00}-\\x{d7ff}]+"

typedef struct pre_def {
    const char *names[11]; /* tokenizer.ggml.pre values, NULL-terminated */
    const char *re[MODEL_VOCAB_MAX_RE + 1];
    bool llama3; /* whole words found in the vocab skip merging; BOS added */
} pre_def_t;

static const pre_def_t pre_defs[] = {
    {{"default"}, {"[\\p{P}\\$\\+<=>\\^~\\|]+", RE_GPT2, "\\p{N}+", "[0-9][0-9][0-9]"}, false},
    {{"llama3", "llama-v3", "llama-bpe", "falcon3"}, {RE_LLAMA3}, true},
    {{"dbrx", "smaug-bpe"}, {RE_LLAMA3}, false},
    {{"qwen2", "deepseek-r1-qwen", "stablelm2"}, {RE_QWEN2}, false},
    {{"gpt-2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais", "jina-es", "jina-de", "jina-v1-en",
      "jina-v2-es"},
     {RE_GPT2},
     false},
    {{"jina-v2-de", "jina-v2-code", "gigachat"}, {RE_GPT2}, false},
    {{"starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"},
     {"\\p{N}", RE_GPT2},
     false},
    {{"falcon"}, {"[\\p{P}\\$\\+<=>\\^~\\|`]+", RE_GPT2, "[0-9][0-9][0-9]"}, false},
    {{"deepseek-llm"},
     {"[\r\n]", "\\s?[" RE_DEEPSEEK_LETTERS "]+",
      "\\s?[!-/:-~\\x{ff01}-\\x{ff0f}\\x{ff1a}-\\x{ff5e}\\x{2018}-\\x{201f}\\x{3000}-\\x{3002}]+",
      /* Possessive: the same matches as \s+$ without quadratic backtracking
       * on long blank runs that are followed by something else. */
      "\\s++$", RE_CJK, "\\p{N}+"},
     false},
    {{"deepseek-coder"}, {"[\r\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", RE_CJK, "\\p{N}"}, false},
};

static const pre_def_t *
find_pre(const char *name)
{
    for (size_t i = 0; i < sizeof pre_defs / sizeof pre_defs[0]; i++)
        for (size_t k = 0; k < 11 && pre_defs[i].names[k]; k++)
            if (strcmp(pre_defs[i].names[k], name) == 0)
                return &pre_defs[i];
    return NULL;
}

/* ------------------------------------------------------------------------ */
/* Loading.                                                                 */
/* ------------------------------------------------------------------------ */

#define K_PRE "tokenizer.ggml.pre"
#define K_MERGES "tokenizer.ggml.merges"

static int
load_merges(model_vocab_t *v, const model_gguf_t *g, char *err, size_t err_len)
{
    model_gguf_type_t et;
    uint64_t n = 0;
    if (model_gguf_get_arr(g, K_MERGES, &et, &n) != 0 || et != MODEL_GGUF_STRING)
        return KVS_EFORMAT; /* vocab.c checked both already */
    if (n >= UINT32_MAX / 4) {
        model__errf(err, err_len, "key '%s': %llu merges is too many", K_MERGES,
                    (unsigned long long)n);
        return KVS_EFORMAT;
    }
    uint32_t cap = 16;
    while (cap < 2 * n)
        cap *= 2;
    v->merges = malloc((size_t)cap * sizeof *v->merges);
    if (v->merges == NULL)
        return KVS_ENOMEM;
    for (uint32_t i = 0; i < cap; i++)
        v->merges[i] = (model_merge_t){UINT64_MAX, 0, -1};
    v->merge_mask = cap - 1;
    /* Decoded halves are never longer than their spelling. */
    char *buf = NULL;
    size_t buf_cap = 0;
    int rc = 0;
    for (uint64_t r = 0; r < n && rc == 0; r++) {
        model_gguf_str_t s;
        model_gguf_arr_str(g, K_MERGES, r, &s);
        /* "left right", split at the first space after the first byte. */
        const char *sp = s.len > 1 ? memchr(s.ptr + 1, ' ', s.len - 1) : NULL;
        if (sp == NULL) {
            model__errf(err, err_len, "key '%s': merge %llu is not \"left right\"", K_MERGES,
                        (unsigned long long)r);
            rc = KVS_EFORMAT;
            break;
        }
        size_t nl = (size_t)(sp - s.ptr), nr = s.len - nl - 1;
        if (s.len > buf_cap) {
            free(buf);
            buf_cap = s.len * 2;
            if ((buf = malloc(buf_cap)) == NULL) {
                rc = KVS_ENOMEM;
                break;
            }
        }
        /* Both halves and the whole must be tokens: merges are applied by
         * id, so one naming anything else could never fire as written. */
        int32_t il = -1, ir = -1, im = -1;
        size_t dl, dr;
        if (model__gpt2_decode(v, s.ptr, nl, buf, &dl) &&
            model__gpt2_decode(v, sp + 1, nr, buf + dl, &dr)) {
            il = model__vocab_find(v, buf, dl);
            ir = model__vocab_find(v, buf + dl, dr);
            im = model__vocab_find(v, buf, dl + dr);
        }
        if (il < 0 || ir < 0 || im < 0) {
            model__errf(err, err_len,
                        "key '%s': merge %llu (\"%.*s\") names a token that is not in "
                        "'tokenizer.ggml.tokens'",
                        K_MERGES, (unsigned long long)r, (int)(s.len < 40 ? s.len : 40), s.ptr);
            rc = KVS_EFORMAT;
            break;
        }
        model__vocab_merge_put(v, il, ir, (uint32_t)r, im);
    }
    free(buf);
    return rc;
}

int
model__bpe_init(model_vocab_t *v, const model_gguf_t *g, char *err, size_t err_len)
{
    model_gguf_str_t pre = {"default", 7};
    int rc = model_gguf_get_str(g, K_PRE, &pre);
    if (rc == KVS_EFORMAT) {
        model__errf(err, err_len, "key '%s' must be a string", K_PRE);
        return KVS_EFORMAT;
    }
    /* llama.cpp falls back to "default" (with a warning) for files that do
     * not say; an unknown name is refused: a wrong pre-tokenizer gives
     * plausible but wrong ids. */
    const pre_def_t *d = find_pre(pre.ptr);
    if (d == NULL) {
        model__errf(err, err_len,
                    "pre-tokenizer '%.40s' (key '%s') is not supported (supported: default, "
                    "gpt-2, llama-bpe, qwen2, starcoder, falcon, deepseek-llm, deepseek-coder "
                    "and their aliases)",
                    pre.ptr, K_PRE);
        return KVS_ENOTSUP;
    }
    snprintf(v->name, sizeof v->name, "gpt2-bpe:%s", pre.ptr);
    v->ignore_merges = d->llama3;
    v->add_bos = d->llama3;
    if ((rc = load_merges(v, g, err, err_len)))
        return rc;
    for (v->n_re = 0; v->n_re < MODEL_VOCAB_MAX_RE && d->re[v->n_re]; v->n_re++) {
        int ec;
        PCRE2_SIZE eo;
        pcre2_code *re =
            pcre2_compile((PCRE2_SPTR)d->re[v->n_re], PCRE2_ZERO_TERMINATED,
                          PCRE2_UTF | PCRE2_UCP | PCRE2_DOLLAR_ENDONLY, &ec, &eo, NULL);
        if (re == NULL) {
            PCRE2_UCHAR msg[120];
            pcre2_get_error_message(ec, msg, sizeof msg);
            model__errf(err, err_len, "pre-tokenizer '%s': regex %u: %s at offset %zu", pre.ptr,
                        v->n_re, (const char *)msg, (size_t)eo);
            return KVS_EINTERNAL;
        }
        pcre2_jit_compile(re, PCRE2_JIT_COMPLETE); /* falls back to the interpreter */
        v->re[v->n_re] = re;
    }
    return 0;
}

void
model__bpe_free(model_vocab_t *v)
{
    for (uint32_t i = 0; i < v->n_re; i++)
        pcre2_code_free(v->re[i]);
    v->n_re = 0;
}

/* ------------------------------------------------------------------------ */
/* Tokenizing.                                                              */
/* ------------------------------------------------------------------------ */

typedef struct bpe {
    const model_vocab_t *v;
    pcre2_match_data *md[MODEL_VOCAB_MAX_RE];
    model_sym_t *sym;
    size_t sym_cap;
    model_heap_t heap;
    model_tok_out_t *o;
} bpe_t;

static int
try_pair(bpe_t *b, int32_t left, int32_t right)
{
    if (left < 0 || right < 0)
        return 0;
    const model_merge_t *m = model__vocab_merge(b->v, b->sym[left].id, b->sym[right].id);
    if (m == NULL)
        return 0;
    model_bigram_t g = {.rank = m->rank,
                        .left = left,
                        .right = right,
                        .size = b->sym[left].n + b->sym[right].n,
                        .id = m->id};
    return model__heap_push(&b->heap, &g);
}

/* One pre-tokenized word: merge its bytes by rank. */
static int
word(bpe_t *b, const char *w, size_t n)
{
    const model_vocab_t *v = b->v;
    if (v->ignore_merges) {
        int32_t id = model__vocab_find(v, w, n);
        if (id >= 0) {
            model__tok_emit(b->o, id);
            return 0;
        }
    }
    if (n > b->sym_cap) {
        size_t cap = n > 2 * b->sym_cap ? n : 2 * b->sym_cap;
        model_sym_t *s = realloc(b->sym, cap * sizeof *s);
        if (s == NULL)
            return KVS_ENOMEM;
        b->sym = s;
        b->sym_cap = cap;
    }
    model_sym_t *sym = b->sym;
    for (size_t i = 0; i < n; i++)
        sym[i] = (model_sym_t){(uint32_t)i, 1, (int32_t)i - 1, i + 1 < n ? (int32_t)i + 1 : -1,
                               v->byte_id[(unsigned char)w[i]]};
    b->heap.n = 0;
    int rc = 0;
    for (size_t i = 1; i < n && rc == 0; i++)
        rc = try_pair(b, (int32_t)i - 1, (int32_t)i);
    model_bigram_t g;
    while (rc == 0 && model__heap_pop(&b->heap, &g)) {
        model_sym_t *l = &sym[g.left], *r = &sym[g.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != g.size)
            continue; /* stale: a side changed since the pair was queued */
        l->n += r->n;
        l->id = g.id;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0)
            sym[r->next].prev = g.left;
        rc = try_pair(b, l->prev, g.left);
        if (rc == 0)
            rc = try_pair(b, g.left, l->next);
    }
    /* Merged symbols are tokens by construction (load checks every merge
     * result); a lone byte the vocab cannot spell is dropped, as llama.cpp
     * does when none of its byte-level characters is a token. */
    for (int32_t i = 0; rc == 0 && n > 0 && i >= 0; i = sym[i].next)
        if (sym[i].id >= 0)
            model__tok_emit(b->o, sym[i].id);
    return rc;
}

/* Splits s[0..n) with regex `level`: every match and every gap between
 * matches becomes a piece for the next regex, the last level's pieces are
 * words. */
static int
split(bpe_t *b, uint32_t level, const char *s, size_t n)
{
    if (n == 0)
        return 0;
    if (level == b->v->n_re)
        return word(b, s, n);
    const pcre2_code *re = b->v->re[level];
    pcre2_match_data *md = b->md[level];
    size_t pos = 0, last = 0;
    int rc = 0;
    while (pos < n && rc == 0) {
        int m = pcre2_match(re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK, md, NULL);
        if (m == PCRE2_ERROR_JIT_STACKLIMIT)
            m = pcre2_match(re, (PCRE2_SPTR)s, n, pos, PCRE2_NO_UTF_CHECK | PCRE2_NO_JIT, md, NULL);
        /* No match, or a resource limit on pathological input: the rest of
         * the piece stays one gap (still tokenized, never dropped). */
        if (m < 0)
            break;
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
        size_t ms = ov[0], me = ov[1];
        if (me <= ms) { /* no pre-tokenizer regex matches empty; step over */
            pos = ms + 1;
            while (pos < n && ((unsigned char)s[pos] & 0xc0) == 0x80)
                pos++;
            continue;
        }
        if (ms > last)
            rc = split(b, level + 1, s + last, ms - last);
        if (rc == 0)
            rc = split(b, level + 1, s + ms, me - ms);
        last = pos = me;
    }
    if (rc == 0 && last < n)
        rc = split(b, level + 1, s + last, n - last);
    return rc;
}

/* Re-encodes text as valid UTF-8 the way llama.cpp reads it
 * (unicode_cpts_from_utf8): a byte that does not start a complete sequence
 * becomes U+FFFD; overlong forms are accepted and written canonically.
 * Surrogates and values above U+10FFFF, which PCRE2 cannot take, become
 * U+FFFD too.  Writes at most 3 bytes per input byte. */
static size_t
sanitize(const unsigned char *p, size_t n, char *out)
{
    size_t k = 0;
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t used;
        unsigned char c = p[i];
        if (c < 0x80) {
            out[k++] = (char)c;
            i++;
            continue;
        }
        if (!(c & 0x40)) {
            used = 0;
        } else if (!(c & 0x20)) {
            used = i + 1 < n && (p[i + 1] & 0xc0) == 0x80 ? 2 : 0;
            cp = ((uint32_t)(c & 0x1f) << 6) | (p[i + 1 < n ? i + 1 : i] & 0x3f);
        } else if (!(c & 0x10)) {
            used = i + 2 < n && (p[i + 1] & 0xc0) == 0x80 && (p[i + 2] & 0xc0) == 0x80 ? 3 : 0;
            if (used)
                cp = ((uint32_t)(c & 0x0f) << 12) | ((uint32_t)(p[i + 1] & 0x3f) << 6) |
                     (p[i + 2] & 0x3f);
        } else if (!(c & 0x08)) {
            used = i + 3 < n && (p[i + 1] & 0xc0) == 0x80 && (p[i + 2] & 0xc0) == 0x80 &&
                           (p[i + 3] & 0xc0) == 0x80
                       ? 4
                       : 0;
            if (used)
                cp = ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(p[i + 1] & 0x3f) << 12) |
                     ((uint32_t)(p[i + 2] & 0x3f) << 6) | (p[i + 3] & 0x3f);
        } else {
            used = 0;
        }
        if (used == 0 || (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff) {
            cp = 0xfffd;
            used = used ? used : 1;
        }
        i += used;
        if (cp < 0x80) {
            out[k++] = (char)cp;
        } else if (cp < 0x800) {
            out[k++] = (char)(0xc0 | (cp >> 6));
            out[k++] = (char)(0x80 | (cp & 0x3f));
        } else if (cp < 0x10000) {
            out[k++] = (char)(0xe0 | (cp >> 12));
            out[k++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            out[k++] = (char)(0x80 | (cp & 0x3f));
        } else {
            out[k++] = (char)(0xf0 | (cp >> 18));
            out[k++] = (char)(0x80 | ((cp >> 12) & 0x3f));
            out[k++] = (char)(0x80 | ((cp >> 6) & 0x3f));
            out[k++] = (char)(0x80 | (cp & 0x3f));
        }
    }
    return k;
}

int
model__bpe_tokenize(const model_vocab_t *v, const char *text, size_t len, model_tok_out_t *o)
{
    if (len == 0)
        return 0;
    if (len > SIZE_MAX / 4 || len > UINT32_MAX / 4)
        return KVS_ENOMEM; /* symbol offsets are 32-bit */
    bpe_t b = {.v = v, .o = o};
    char *s = malloc(3 * len);
    int rc = s ? 0 : KVS_ENOMEM;
    for (uint32_t i = 0; i < v->n_re && rc == 0; i++)
        if ((b.md[i] = pcre2_match_data_create(1, NULL)) == NULL)
            rc = KVS_ENOMEM;
    if (rc == 0) {
        size_t n = sanitize((const unsigned char *)text, len, s);
        rc = split(&b, 0, s, n);
    }
    for (uint32_t i = 0; i < v->n_re; i++)
        pcre2_match_data_free(b.md[i]);
    free(b.sym);
    free(b.heap.a);
    free(s);
    return rc;
}
