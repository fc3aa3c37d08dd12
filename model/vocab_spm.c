/*
 * model/vocab_spm.c — the SentencePiece tokenizer of tokenizer.ggml.model
 * "llama" vocabularies (Llama 1/2, Mistral v0.1-v0.3, Phi-3): BPE driven by
 * token scores, as llama.cpp's llm_tokenizer_spm does it.
 *
 *   " Hello"  --prefix + escape-->  "▁▁Hello"  --UTF-8 chars-->  ▁ ▁ H e l l o
 *   repeatedly merge the adjacent pair whose concatenation is the token
 *   with the highest score (ties: leftmost), then emit each symbol's id;
 *   a symbol that is no token is spelled by <0xNN> byte tokens.
 *
 * Candidate pairs sit in a heap; pairs made stale by an earlier merge are
 * skipped when popped (their byte count no longer matches), so a fragment
 * of n characters costs O(n log n).  Where the vocabulary allows it (see
 * spm_splittable in vocab.c) the text is merged in word-sized chunks, which
 * gives the same ids with heaps that stay in cache.  Called by vocab.c for each raw
 * fragment left by the special-token partition.
 */
#include "model_int.h"

#include <stdlib.h>
#include <string.h>

/* Bytes of the UTF-8 sequence led by c, by its high nibble; stray
 * continuation bytes count as one (llama.cpp's unicode_len_utf8). */
static size_t
utf8_len(unsigned char c)
{
    static const uint8_t lookup[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return lookup[c >> 4];
}

typedef struct spm {
    const model_vocab_t *v;
    const char *text;
    model_sym_t *sym;
    model_heap_t heap;
} spm_t;

static int
try_pair(spm_t *s, int32_t left, int32_t right)
{
    if (left < 0 || right < 0)
        return 0;
    uint32_t size = s->sym[left].n + s->sym[right].n;
    /* Adjacent symbols are adjacent in the text, so the pair is one span. */
    int32_t id = model__vocab_find(s->v, s->text + s->sym[left].off, size);
    if (id < 0)
        return 0;
    model_bigram_t b = {
        .key = -s->v->score[id], .left = left, .right = right, .size = size, .id = id};
    return model__heap_push(&s->heap, &b);
}

static void
emit_symbol(const spm_t *s, const model_sym_t *y, model_tok_out_t *o)
{
    int32_t id = model__vocab_find(s->v, s->text + y->off, y->n);
    if (id >= 0) {
        model__tok_emit(o, id);
        return;
    }
    for (uint32_t j = 0; j < y->n; j++) {
        int32_t b = s->v->byte_id[(unsigned char)s->text[y->off + j]];
        if (b >= 0) /* no <0xNN>, byte or <unk> token: nothing to say */
            model__tok_emit(o, b);
    }
}

static bool
is_space(const char *t, const model_sym_t *y)
{
    return y->n == 3 && memcmp(t + y->off, "\xe2\x96\x81", 3) == 0;
}

/* Merges symbols start .. end-1 (a chunk) by score until no pair is a
 * token; symbol start then heads the chunk's list. */
static int
merge(spm_t *s, int32_t start, int32_t end)
{
    model_sym_t *sym = s->sym;
    sym[start].prev = -1;
    sym[end - 1].next = -1;
    s->heap.n = 0;
    int rc = 0;
    for (int32_t i = start + 1; i < end && rc == 0; i++)
        rc = try_pair(s, i - 1, i);
    model_bigram_t b;
    while (rc == 0 && model__heap_pop(&s->heap, &b)) {
        model_sym_t *l = &sym[b.left], *r = &sym[b.right];
        if (l->n == 0 || r->n == 0 || l->n + r->n != b.size)
            continue; /* one side already merged elsewhere */
        l->n += r->n;
        r->n = 0;
        l->next = r->next;
        if (r->next >= 0)
            sym[r->next].prev = b.left;
        rc = try_pair(s, l->prev, b.left);
        if (rc == 0)
            rc = try_pair(s, b.left, l->next);
    }
    return rc;
}

int
model__spm_tokenize(const model_vocab_t *v, const char *text, size_t len, bool space_prefix,
                    model_tok_out_t *o)
{
    /* Escape: an optional leading space, then every ' ' becomes U+2581. */
    size_t n_space = space_prefix ? 1 : 0;
    for (size_t i = 0; i < len; i++)
        n_space += text[i] == ' ';
    size_t tl = len + (space_prefix ? 1 : 0) + 2 * n_space;
    if (tl == 0)
        return 0;
    if (tl > UINT32_MAX / 2)
        return KVS_ENOMEM; /* symbol offsets are 32-bit */
    char *t = malloc(tl);
    model_sym_t *sym = malloc(tl * sizeof *sym);
    spm_t s = {v, t, sym, {0}};
    int rc = 0;
    if (t == NULL || sym == NULL) {
        rc = KVS_ENOMEM;
        goto out;
    }
    size_t k = 0;
    if (space_prefix) {
        memcpy(t, "\xe2\x96\x81", 3);
        k = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(t + k, "\xe2\x96\x81", 3);
            k += 3;
        } else {
            t[k++] = text[i];
        }
    }

    int32_t n_sym = 0;
    for (size_t off = 0; off < tl;) {
        size_t n = utf8_len((unsigned char)t[off]);
        if (n > tl - off)
            n = tl - off;
        sym[n_sym] = (model_sym_t){(uint32_t)off, (uint32_t)n, n_sym - 1, n_sym + 1, -1};
        off += n;
        n_sym++;
    }
    /* Merge chunk by chunk where the vocab allows it (a chunk starts at a
     * "▁" that follows something else); otherwise the whole text at once. */
    for (int32_t start = 0; start < n_sym && rc == 0;) {
        int32_t end = start + 1;
        while (v->spm_split && end < n_sym &&
               !(is_space(t, &sym[end]) && !is_space(t, &sym[end - 1])))
            end++;
        if (!v->spm_split)
            end = n_sym;
        rc = merge(&s, start, end);
        for (int32_t i = start; rc == 0 && i >= 0; i = sym[i].next)
            emit_symbol(&s, &sym[i], o);
        start = end;
    }
out:
    free(s.heap.a);
    free(sym);
    free(t);
    return rc;
}
