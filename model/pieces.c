/*
 * model/pieces.c — the bytes of every token of a model, for guided
 * decoding (choice.c, guide.c): built once on first use from
 * model_vocab_piece (control tokens empty), with the ids whose bytes are
 * not empty in byte order and the prefix each shares with the one
 * before, so a walk over the vocabulary visits each shared prefix once.
 * Published with a compare-and-swap: concurrent first users agree on one
 * table, which lives until model_free.
 */
#include "model_int.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

static void
table_free(model_pieces_t *t)
{
    if (t) {
        free(t->off);
        free(t->bytes);
        free(t->sorted);
        free(t->lcp);
        free(t);
    }
}

static int
by_bytes(const void *a, const void *b, void *arg)
{
    const model_pieces_t *t = arg;
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    uint32_t nx = t->off[x + 1] - t->off[x], ny = t->off[y + 1] - t->off[y];
    int c = memcmp(t->bytes + t->off[x], t->bytes + t->off[y], nx < ny ? nx : ny);
    if (c)
        return c;
    return nx != ny ? (nx < ny ? -1 : 1) : (x < y ? -1 : x > y);
}

static int
fill(const model_t *m, model_pieces_t *t)
{
    uint32_t nv = m->hp.n_vocab;
    size_t cap = (size_t)nv * 4 + 64, used = 0;
    if ((t->off = malloc((nv + 1) * sizeof *t->off)) == NULL || (t->bytes = malloc(cap)) == NULL ||
        (t->sorted = malloc(nv * sizeof *t->sorted)) == NULL ||
        (t->lcp = malloc(nv * sizeof *t->lcp)) == NULL)
        return KVS_ENOMEM;
    for (uint32_t id = 0; id < nv; id++) {
        t->off[id] = (uint32_t)used;
        for (;;) {
            int n = model_vocab_piece(m->vocab, (int32_t)id, false, (char *)t->bytes + used,
                                      cap - used);
            if (n < 0)
                n = 0;
            if (used + (size_t)n <= cap) {
                used += (size_t)n;
                if ((uint32_t)n > t->max_len)
                    t->max_len = (uint32_t)n;
                if (n > 0)
                    t->sorted[t->n_sorted++] = id;
                break;
            }
            uint8_t *b = realloc(t->bytes, cap * 2 + (size_t)n);
            if (b == NULL)
                return KVS_ENOMEM;
            t->bytes = b;
            cap = cap * 2 + (size_t)n;
        }
    }
    t->off[nv] = (uint32_t)used;
    qsort_r(t->sorted, t->n_sorted, sizeof *t->sorted, by_bytes, t);
    for (uint32_t k = 0; k < t->n_sorted; k++) {
        uint32_t l = 0;
        if (k > 0) {
            uint32_t a = t->sorted[k - 1], b = t->sorted[k];
            uint32_t na = t->off[a + 1] - t->off[a], nb = t->off[b + 1] - t->off[b];
            const uint8_t *pa = t->bytes + t->off[a], *pb = t->bytes + t->off[b];
            while (l < na && l < nb && pa[l] == pb[l])
                l++;
        }
        t->lcp[k] = l;
    }
    return 0;
}

const model_pieces_t *
model__pieces(const model_t *m)
{
    /* The table is a cache: building it does not change the model. */
    _Atomic(void *) *slot = &((model_t *)m)->pieces;
    model_pieces_t *t = atomic_load(slot);
    if (t)
        return t;
    if ((t = calloc(1, sizeof *t)) == NULL)
        return NULL;
    if (fill(m, t) != 0) {
        table_free(t);
        return NULL;
    }
    void *expect = NULL;
    if (!atomic_compare_exchange_strong(slot, &expect, t)) {
        table_free(t);
        return expect;
    }
    return t;
}

void
model__pieces_free(model_t *m)
{
    table_free(atomic_exchange(&m->pieces, NULL));
}
