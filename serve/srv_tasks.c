/*
 * serve/srv_tasks.c — the long-context retrieval tasks `kvserve eval` asks
 * a model: passkey, multi-key needle in a haystack, and variable tracking
 * (multi-hop), as byte strings of an exact total length with the needle at
 * a chosen relative depth.  The formats are the ones the bundled models
 * were trained on (weights/tasks.py); the filler is the classic repeated
 * "The grass is green..." noise, so no corpus is needed at run time.
 */
#include "srv_int.h"

#include <stdlib.h>
#include <string.h>

static const char NOISE[] = "The grass is green. The sky is blue. The sun is yellow. Here we go. "
                            "There and back again. ";
static const char PASSKEY_INTRO[] =
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n";

static double
rng_unit(uint64_t *s)
{
    return (double)(srv_rng_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

/* n bytes of noise, restarting the sentence cycle each time (as tasks.py). */
static void
noise(srv_buf_t *b, size_t n)
{
    size_t k = sizeof NOISE - 1;
    while (n > 0) {
        size_t m = n < k ? n : k;
        srv_buf_put(b, NOISE, m);
        n -= m;
    }
}

static void
digits5(uint64_t *rng, char out[6])
{
    uint32_t v = 10000 + srv_rng_below(rng, 90000);
    snprintf(out, 6, "%05u", v);
}

typedef struct part {
    char text[96];
    double depth;
} part_t;

static int
cmp_depth(const void *a, const void *b)
{
    const part_t *x = a, *y = b;
    if (x->depth != y->depth)
        return x->depth < y->depth ? -1 : 1;
    return x < y ? -1 : (x > y); /* stable: keep generation order */
}

/* Needles at their depths inside noise so the whole is `total` bytes. */
static void
fill_with(srv_buf_t *b, part_t *parts, size_t n, size_t total)
{
    size_t fixed = 0;
    for (size_t i = 0; i < n; i++)
        fixed += strlen(parts[i].text);
    size_t room = total > fixed ? total - fixed : 0;
    /* qsort is not stable; tag each part with its index first. */
    part_t *sorted = malloc(n * sizeof *sorted);
    if (sorted == NULL) {
        b->oom = true;
        return;
    }
    memcpy(sorted, parts, n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, cmp_depth);
    size_t prev = 0;
    for (size_t i = 0; i < n; i++) {
        size_t cut = (size_t)(sorted[i].depth * (double)room);
        if (cut > room)
            cut = room;
        noise(b, cut - prev);
        srv_buf_puts(b, sorted[i].text);
        prev = cut;
    }
    noise(b, room - prev);
    free(sorted);
}

static void
name(uint64_t *rng, char *out, size_t n, const char *alphabet)
{
    size_t k = strlen(alphabet);
    for (size_t i = 0; i < n; i++)
        out[i] = alphabet[srv_rng_below(rng, (uint32_t)k)];
    out[n] = '\0';
}

/* The multi-key haystack, shared by the single-question task and the
 * shared-context documents so both draw the same keys from a seed: up to
 * 4 keys, fewer where they do not fit (a needle is 48 bytes, a question
 * and its answer 92), each needle at a random depth except key `target`'s,
 * which sits at `depth`. */
enum { MK_MAX_KEYS = SRV_DOC_MAX_QUESTIONS, MK_NEEDLE = 48, MK_QA = 92 };

typedef struct mk_doc {
    int n_keys, target;
    char question[MK_MAX_KEYS][SRV_DOC_QUESTION_MAX], answer[MK_MAX_KEYS][8];
} mk_doc_t;

/* Writes the haystack into b so that it plus the questions and answers
 * (of every key with ask_all, else of the target's alone) is `length`
 * bytes.  KVS_ERANGE when they do not fit. */
static int
multikey(uint64_t *rng, uint32_t length, double depth, bool ask_all, srv_buf_t *b, mk_doc_t *d)
{
    int n = MK_MAX_KEYS;
    while (n > 1 && (uint32_t)(MK_NEEDLE * n + MK_QA * (ask_all ? n : 1)) > length)
        n--;
    part_t p[MK_MAX_KEYS];
    char keys[MK_MAX_KEYS][8], vals[MK_MAX_KEYS][6];
    for (int i = 0; i < n; i++) {
        bool dup;
        do {
            name(rng, keys[i], 6, "abcdefghijklmnopqrstuvwxyz");
            dup = false;
            for (int j = 0; j < i; j++)
                dup |= strcmp(keys[i], keys[j]) == 0;
        } while (dup);
        digits5(rng, vals[i]);
        snprintf(p[i].text, sizeof p[i].text, " The special magic number for %s is: %s. ", keys[i],
                 vals[i]);
        p[i].depth = rng_unit(rng);
    }
    d->n_keys = n;
    d->target = (int)srv_rng_below(rng, (uint32_t)n);
    p[d->target].depth = depth;
    size_t fixed = 0, needles = 0;
    for (int i = 0; i < n; i++) {
        snprintf(d->question[i], sizeof d->question[i],
                 "\nWhat is the special magic number for %s? The special magic number for %s is:",
                 keys[i], keys[i]);
        snprintf(d->answer[i], sizeof d->answer[i], " %s", vals[i]);
        if (ask_all || i == d->target)
            fixed += strlen(d->question[i]) + strlen(d->answer[i]);
        needles += strlen(p[i].text);
    }
    if (length < fixed + needles)
        return KVS_ERANGE;
    fill_with(b, p, (size_t)n, length - fixed);
    return 0;
}

int
srv_task_make(srv_task_t task, uint32_t length, double depth, uint64_t seed, char **prompt,
              char answer[8])
{
    uint64_t rng = seed;
    srv_buf_t b = {0};
    char key[6], q[160];
    switch (task) {
    case SRV_TASK_PASSKEY: {
        digits5(&rng, key);
        part_t p;
        p.depth = depth;
        snprintf(p.text, sizeof p.text, " The pass key is %s. Remember it. %s is the pass key. ",
                 key, key);
        snprintf(q, sizeof q, "\nWhat is the pass key? The pass key is");
        snprintf(answer, 8, " %s", key);
        size_t fixed = strlen(q) + strlen(answer);
        if (length < fixed + strlen(p.text))
            return KVS_ERANGE;
        /* The introduction only where it fits beside the needle. */
        if (fixed + strlen(p.text) + strlen(PASSKEY_INTRO) <= length) {
            srv_buf_puts(&b, PASSKEY_INTRO);
            fixed += strlen(PASSKEY_INTRO);
        }
        fill_with(&b, &p, 1, length - fixed);
        srv_buf_puts(&b, q);
        break;
    }
    case SRV_TASK_NIAH_MULTIKEY: {
        mk_doc_t d;
        int rc = multikey(&rng, length, depth, false, &b, &d);
        if (rc) {
            free(b.p);
            return rc;
        }
        srv_buf_puts(&b, d.question[d.target]);
        memcpy(answer, d.answer[d.target], 8);
        break;
    }
    case SRV_TASK_VT: {
        /* 2 chains of 3 hops, one chain where two do not fit: a chain is
         * 18 + 16 + 16 bytes, the question and answer 57. */
        enum { HOPS = 3, MAX_CHAINS = 2 };
        int CHAINS = MAX_CHAINS;
        while (CHAINS > 1 && (uint32_t)CHAINS * (18 + 16 * (HOPS - 1)) + 57 > length)
            CHAINS--;
        part_t p[HOPS * MAX_CHAINS];
        char names[HOPS * MAX_CHAINS][4], target[4] = "", val0[6] = "";
        size_t np = 0;
        for (int c = 0; c < CHAINS; c++) {
            char val[6];
            digits5(&rng, val);
            double start = c == 0 ? depth : rng_unit(&rng);
            for (int h = 0; h < HOPS; h++) {
                char *nm = names[c * HOPS + h];
                bool dup;
                do {
                    name(&rng, nm, 3, "ABCDEFGHIJKLMNOPQRSTUVWXYZ");
                    dup = false;
                    for (int j = 0; j < c * HOPS + h; j++)
                        dup |= strcmp(nm, names[j]) == 0;
                } while (dup);
                snprintf(p[np].text, sizeof p[np].text, " VAR %s = %s. ", nm,
                         h == 0 ? val : names[c * HOPS + h - 1]);
                p[np].depth = start + (1.0 - start) * h / HOPS;
                np++;
            }
            if (c == 0) {
                memcpy(target, names[HOPS - 1], 4);
                memcpy(val0, val, 6);
            }
        }
        snprintf(q, sizeof q, "\nQuestion: what is the value of %s? Answer: %s =", target, target);
        snprintf(answer, 8, " %s", val0);
        size_t fixed = strlen(q) + strlen(answer), needles = 0;
        for (size_t i = 0; i < np; i++)
            needles += strlen(p[i].text);
        if (length < fixed + needles)
            return KVS_ERANGE;
        fill_with(&b, p, np, length - fixed);
        srv_buf_puts(&b, q);
        break;
    }
    default:
        return KVS_EINVAL;
    }
    if (b.oom) {
        free(b.p);
        return KVS_ENOMEM;
    }
    *prompt = b.p;
    return 0;
}

int
srv_task_make_doc(srv_task_t task, uint32_t length, double depth, uint64_t seed, srv_doc_t *doc)
{
    *doc = (srv_doc_t){0};
    if (task != SRV_TASK_NIAH_MULTIKEY)
        return KVS_EINVAL;
    uint64_t rng = seed;
    srv_buf_t b = {0};
    mk_doc_t d;
    int rc = multikey(&rng, length, depth, true, &b, &d);
    if (rc == 0 && b.oom)
        rc = KVS_ENOMEM;
    if (rc) {
        free(b.p);
        return rc;
    }
    /* Asked in a seeded order rather than the keys' drawing order, so the
     * key placed at `depth` is not always asked at the same turn. */
    int order[MK_MAX_KEYS];
    for (int i = 0; i < d.n_keys; i++)
        order[i] = i;
    for (int i = d.n_keys - 1; i > 0; i--) {
        int j = (int)srv_rng_below(&rng, (uint32_t)i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
    for (int i = 0; i < d.n_keys; i++) {
        memcpy(doc->question[i], d.question[order[i]], sizeof doc->question[i]);
        memcpy(doc->answer[i], d.answer[order[i]], sizeof doc->answer[i]);
    }
    doc->n_questions = (uint32_t)d.n_keys;
    doc->context = b.p;
    return 0;
}

void
srv_doc_free(srv_doc_t *doc)
{
    free(doc->context);
    doc->context = NULL;
}

/* One try of a fit: a prompt and its answer, or a document. */
typedef struct shot {
    bool is_doc;
    char *prompt, answer[8];
    srv_doc_t doc;
} shot_t;

static void
shot_free(shot_t *s)
{
    free(s->prompt);
    s->prompt = NULL;
    srv_doc_free(&s->doc);
}

static int
shot_make(shot_t *s, srv_task_t task, uint32_t bytes, double depth, uint64_t seed)
{
    return s->is_doc ? srv_task_make_doc(task, bytes, depth, seed, &s->doc)
                     : srv_task_make(task, bytes, depth, seed, &s->prompt, s->answer);
}

/* The tokens of the shot's text as a model reads it whole: a conversation
 * asking every question ends with all of them and their answers. */
static int
shot_count(const shot_t *s, const srv_counter_t *c, size_t *n)
{
    srv_buf_t b = {0};
    if (s->is_doc) {
        srv_buf_puts(&b, s->doc.context);
        for (uint32_t i = 0; i < s->doc.n_questions; i++) {
            srv_buf_puts(&b, s->doc.question[i]);
            srv_buf_puts(&b, s->doc.answer[i]);
        }
    } else {
        srv_buf_puts(&b, s->prompt);
        srv_buf_puts(&b, s->answer);
    }
    int rc = b.oom ? KVS_ENOMEM : c->count(c->ctx, b.p, b.len, n);
    free(b.p);
    return rc;
}

/* Bytes known too few (lo: the needles did not fit, or the text stayed
 * within `tokens`) and too many (hi) bracket the search; each next try is
 * the secant through the origin and the last try (tokens grow about in
 * proportion to the filler), or the bracket's middle when that falls
 * outside it.  Tokens need not grow with every byte, so the search keeps
 * the best try rather than trusting the bracket. */
static int
fit(srv_task_t task, uint32_t tokens, double depth, uint64_t seed, const srv_counter_t *c,
    uint32_t *hint, shot_t *best)
{
    enum { MAX_TRIES = 64 };
    const uint64_t max_bytes = 1u << 28;
    uint64_t lo = 0, hi = UINT64_MAX, b = *hint ? *hint : tokens;
    size_t best_n = 0;
    bool have = false;
    for (int i = 0; i < MAX_TRIES; i++) {
        shot_t s = {.is_doc = best->is_doc};
        size_t n = 0;
        int rc = shot_make(&s, task, (uint32_t)b, depth, seed);
        if (rc == 0)
            rc = shot_count(&s, c, &n);
        if (rc != 0 && rc != KVS_ERANGE) {
            shot_free(&s);
            return rc;
        }
        uint64_t g;
        if (rc == KVS_ERANGE || n == 0) {
            lo = b;
            g = b * 2;
        } else if (n <= tokens) {
            lo = b;
            if (!have || n > best_n) {
                shot_free(best);
                *best = s;
                s = (shot_t){0};
                best_n = n;
                have = true;
                *hint = (uint32_t)b;
            }
            uint64_t step = (tokens - n) * b / n;
            g = b + (step > 0 ? step : 1);
        } else {
            hi = b;
            uint64_t step = (n - tokens) * b / n;
            g = b - (step > 0 && step < b ? step : 1);
        }
        shot_free(&s);
        if ((have && best_n == tokens) || (hi != UINT64_MAX && hi - lo <= 1))
            break;
        if (g <= lo || g >= hi)
            g = lo + (hi - lo) / 2;
        if (g > max_bytes) {
            if (lo >= max_bytes)
                break;
            g = max_bytes;
        }
        b = g;
    }
    return have ? 0 : KVS_ERANGE;
}

int
srv_task_fit(srv_task_t task, uint32_t tokens, double depth, uint64_t seed, const srv_counter_t *c,
             uint32_t *hint, char **prompt, char answer[8])
{
    shot_t best = {.is_doc = false};
    int rc = fit(task, tokens, depth, seed, c, hint, &best);
    if (rc) {
        shot_free(&best);
        return rc;
    }
    *prompt = best.prompt;
    memcpy(answer, best.answer, 8);
    return 0;
}

int
srv_task_fit_doc(srv_task_t task, uint32_t tokens, double depth, uint64_t seed,
                 const srv_counter_t *c, uint32_t *hint, srv_doc_t *doc)
{
    *doc = (srv_doc_t){0};
    if (task != SRV_TASK_NIAH_MULTIKEY)
        return KVS_EINVAL;
    shot_t best = {.is_doc = true};
    int rc = fit(task, tokens, depth, seed, c, hint, &best);
    if (rc) {
        shot_free(&best);
        return rc;
    }
    *doc = best.doc;
    return 0;
}

const char *
srv_task_name(srv_task_t t)
{
    static const char *names[] = {"passkey", "niah-multikey", "vt"};
    return (unsigned)t < SRV_TASK_COUNT ? names[t] : "?";
}

int
srv_task_parse(const char *s, srv_task_t *out)
{
    for (int t = 0; t < SRV_TASK_COUNT; t++) {
        if (strcmp(s, srv_task_name((srv_task_t)t)) == 0) {
            *out = (srv_task_t)t;
            return 0;
        }
    }
    return KVS_EINVAL;
}
