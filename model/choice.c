/*
 * model/choice.c — vLLM's guided_choice: the output must spell one of a
 * few strings, by any tokenization of it.  Each step the row of logits
 * is cut to the tokens whose bytes continue the output along a choice
 * still possible (and an end-of-generation token where a choice is
 * complete), and each accepted token narrows the choices.  Called by
 * sched/ at sampling (engine thread).  The tokens' bytes come from model__pieces (pieces.c).
 */
#include "model_int.h"

#include <stdlib.h>
#include <string.h>

struct model_choice {
    const model_t *m;
    const model_pieces_t *pt;
    uint32_t n;
    char **text; /* [n] copies */
    uint32_t *len;
    uint64_t live;  /* choices the output so far is a prefix of */
    uint32_t done;  /* bytes of output so far */
    uint64_t *bits; /* model_choice_allowed's mask, made at first use */
};

int
model_choice_new(const model_t *m, const char *const *choices, uint32_t n, model_choice_t **out)
{
    *out = NULL;
    if (n == 0 || n > MODEL_MAX_CHOICES || choices == NULL)
        return KVS_EINVAL;
    for (uint32_t i = 0; i < n; i++)
        if (choices[i] == NULL || choices[i][0] == '\0' ||
            strlen(choices[i]) > MODEL_MAX_CHOICE_BYTES)
            return KVS_EINVAL;
    const model_pieces_t *pt = model__pieces(m);
    if (pt == NULL)
        return KVS_ENOMEM;
    model_choice_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return KVS_ENOMEM;
    c->m = m;
    c->pt = pt;
    c->n = n;
    c->text = calloc(n, sizeof *c->text);
    c->len = calloc(n, sizeof *c->len);
    if (!c->text || !c->len) {
        model_choice_free(c);
        return KVS_ENOMEM;
    }
    for (uint32_t i = 0; i < n; i++) {
        c->len[i] = (uint32_t)strlen(choices[i]);
        if ((c->text[i] = strdup(choices[i])) == NULL) {
            model_choice_free(c);
            return KVS_ENOMEM;
        }
    }
    c->live = n == 64 ? ~0ull : (1ull << n) - 1;
    *out = c;
    return 0;
}

int
model_choice_clone(const model_choice_t *c, model_choice_t **out)
{
    int rc = model_choice_new(c->m, (const char *const *)c->text, c->n, out);
    if (rc == 0) {
        (*out)->live = c->live;
        (*out)->done = c->done;
    }
    return rc;
}

void
model_choice_free(model_choice_t *c)
{
    if (c == NULL)
        return;
    for (uint32_t i = 0; c->text && i < c->n; i++)
        free(c->text[i]);
    free(c->text);
    free(c->len);
    free(c->bits);
    free(c);
}

/* Whether token id's bytes continue choice i from the output's end. */
static bool
continues(const model_choice_t *c, uint32_t i, int32_t id)
{
    const model_pieces_t *pt = c->pt;
    uint32_t a = pt->off[id], n = pt->off[id + 1] - a;
    return n > 0 && c->done + n <= c->len[i] && memcmp(c->text[i] + c->done, pt->bytes + a, n) == 0;
}

/* Whether some live choice is the output exactly. */
static bool
complete(const model_choice_t *c)
{
    for (uint32_t i = 0; i < c->n; i++)
        if ((c->live >> i & 1) && c->len[i] == c->done)
            return true;
    return false;
}

/* Sets in bits (zeroed) each token that continues the output along a
 * live choice (and end-of-generation tokens where one is complete);
 * returns how many. */
static uint32_t
allowed_bits(const model_choice_t *c, uint64_t *bits)
{
    uint32_t nv = c->m->hp.n_vocab, n = 0;
    bool end = complete(c);
    /* The bytes a live choice goes on with: most tokens fail on their
     * first byte, before any choice is compared (64 choices x 128K
     * tokens a step otherwise). */
    uint64_t next[4] = {0, 0, 0, 0};
    for (uint32_t i = 0; i < c->n; i++)
        if ((c->live >> i & 1) && c->len[i] > c->done) {
            uint8_t b = (uint8_t)c->text[i][c->done];
            next[b >> 6] |= 1ull << (b & 63);
        }
    const model_pieces_t *pt = c->pt;
    for (uint32_t id = 0; id < nv; id++) {
        bool ok = end && model_vocab_is_eog(c->m->vocab, (int32_t)id);
        uint32_t a = pt->off[id];
        bool maybe = pt->off[id + 1] > a && (next[pt->bytes[a] >> 6] >> (pt->bytes[a] & 63) & 1);
        for (uint32_t i = 0; !ok && maybe && i < c->n; i++)
            ok = (c->live >> i & 1) && continues(c, i, (int32_t)id);
        if (ok) {
            bits[id >> 6] |= 1ull << (id & 63);
            n++;
        }
    }
    return n;
}

const uint64_t *
model_choice_allowed(model_choice_t *c, uint32_t *n_allowed)
{
    size_t words = (c->m->hp.n_vocab + 63) / 64;
    if (c->bits == NULL && (c->bits = malloc(words * sizeof *c->bits)) == NULL)
        return NULL;
    memset(c->bits, 0, words * sizeof *c->bits);
    uint32_t n = allowed_bits(c, c->bits);
    if (n_allowed)
        *n_allowed = n;
    return c->bits;
}

uint32_t
model_choice_mask(model_choice_t *c, const float *row, float *out)
{
    uint32_t n = 0;
    model__mask_row(model_choice_allowed(c, &n), c->m->hp.n_vocab, row, out);
    return n;
}

int
model_choice_accept(model_choice_t *c, int32_t id)
{
    if (id < 0 || (uint32_t)id >= c->m->hp.n_vocab)
        return KVS_EINVAL;
    if (model_vocab_is_eog(c->m->vocab, id))
        return complete(c) ? 1 : KVS_EINVAL;
    uint64_t live = 0;
    for (uint32_t i = 0; i < c->n; i++)
        if ((c->live >> i & 1) && continues(c, i, id))
            live |= 1ull << i;
    if (live == 0)
        return KVS_EINVAL;
    c->live = live;
    c->done += c->pt->off[id + 1] - c->pt->off[id];
    /* Over when the output is a whole choice that no other goes past. */
    bool longer = false;
    for (uint32_t i = 0; i < c->n; i++)
        longer |= (live >> i & 1) && c->len[i] > c->done;
    return complete(c) && !longer ? 1 : 0;
}
