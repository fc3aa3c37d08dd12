/*
 * tests/serve/test_srv_tasks.c — the eval task generators: exact lengths,
 * the needle at the requested depth, the answer inside the needle, the
 * formats the bundled models were trained on, and determinism per seed;
 * and the shared-context documents of `kvserve eval --scenario`; sized in
 * tokens (srv_task_fit) by a byte counter, a failing counter and the real
 * SentencePiece and BPE vocabularies of shared/data/vocab.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "serve/srv_int.h"
#include "tests/model/vocab_files.h"

#include <stdlib.h>
#include <string.h>

static void
test_lengths_and_answers(void **state)
{
    (void)state;
    const uint32_t lengths[] = {128, 256, 300, 512, 1024, 4096};
    const double depths[] = {0.0, 0.3, 0.5, 1.0};
    for (int t = 0; t < SRV_TASK_COUNT; t++)
        for (size_t l = 0; l < 6; l++)
            for (size_t d = 0; d < 4; d++) {
                char *p = NULL, ans[8];
                int rc = srv_task_make((srv_task_t)t, lengths[l], depths[d], 42 + d, &p, ans);
                if (t == SRV_TASK_NIAH_MULTIKEY && lengths[l] < 140) {
                    assert_int_equal(rc, KVS_ERANGE);
                    continue;
                }
                assert_int_equal(rc, 0);
                assert_int_equal(strlen(p) + strlen(ans), lengths[l]);
                assert_int_equal(strlen(ans), 6);
                assert_true(ans[0] == ' ');
                /* The value appears in the context before the question. */
                assert_non_null(strstr(p, ans + 1));
                free(p);
            }
}

static void
test_formats(void **state)
{
    (void)state;
    char *p, ans[8];
    assert_int_equal(srv_task_make(SRV_TASK_PASSKEY, 1024, 0.5, 7, &p, ans), 0);
    assert_true(strncmp(p, "There is an important info hidden", 33) == 0);
    char needle[64];
    snprintf(needle, sizeof needle, " The pass key is %s. Remember it. %s is the pass key. ",
             ans + 1, ans + 1);
    char *at = strstr(p, needle);
    assert_non_null(at);
    /* Depth 0.5: the needle starts near the middle of the filler. */
    double rel = (double)(at - p) / (double)strlen(p);
    assert_true(rel > 0.4 && rel < 0.6);
    const char *q = "\nWhat is the pass key? The pass key is";
    assert_string_equal(p + strlen(p) - strlen(q), q);
    free(p);

    assert_int_equal(srv_task_make(SRV_TASK_PASSKEY, 128, 0.0, 7, &p, ans), 0);
    assert_true(strncmp(p, " The pass key is", 16) == 0); /* no room for the intro */
    free(p);

    assert_int_equal(srv_task_make(SRV_TASK_NIAH_MULTIKEY, 1024, 1.0, 9, &p, ans), 0);
    int n = 0;
    for (char *s = p; (s = strstr(s, "The special magic number for ")) != NULL; s++)
        n++;
    assert_int_equal(n, 4 + 1); /* four needles and the question's answer stem */
    assert_non_null(strstr(p, "\nWhat is the special magic number for "));
    free(p);

    assert_int_equal(srv_task_make(SRV_TASK_VT, 1024, 0.1, 3, &p, ans), 0);
    n = 0;
    for (char *s = p; (s = strstr(s, " VAR ")) != NULL; s++)
        n++;
    assert_int_equal(n, 6); /* two chains of three */
    assert_non_null(strstr(p, "\nQuestion: what is the value of "));
    free(p);

    /* Same seed, same prompt; another seed, another. */
    char *a, *b, *c;
    assert_int_equal(srv_task_make(SRV_TASK_VT, 512, 0.5, 11, &a, ans), 0);
    assert_int_equal(srv_task_make(SRV_TASK_VT, 512, 0.5, 11, &b, ans), 0);
    assert_int_equal(srv_task_make(SRV_TASK_VT, 512, 0.5, 12, &c, ans), 0);
    assert_string_equal(a, b);
    assert_string_not_equal(a, c);
    free(a);
    free(b);
    free(c);

    srv_task_t t;
    assert_int_equal(srv_task_parse("niah-multikey", &t), 0);
    assert_int_equal(t, SRV_TASK_NIAH_MULTIKEY);
    assert_int_equal(srv_task_parse("bogus", &t), KVS_EINVAL);
    assert_int_equal(srv_task_make(SRV_TASK_PASSKEY, 50, 0.5, 1, &p, ans), KVS_ERANGE);
}

/* The shared-context document: its context plus every question and answer
 * is the length, every key is asked once in the single-question wording,
 * and the keys are those the single-question task draws from the seed. */
static void
test_shared_doc(void **state)
{
    (void)state;
    const uint32_t lengths[] = {140, 300, 559, 560, 1024, 2048};
    const uint32_t want_q[] = {1, 2, 3, 4, 4, 4};
    for (size_t l = 0; l < 6; l++)
        for (uint64_t seed = 1; seed < 20; seed++) {
            srv_doc_t doc;
            assert_int_equal(srv_task_make_doc(SRV_TASK_NIAH_MULTIKEY, lengths[l], 0.5, seed, &doc),
                             0);
            assert_int_equal(doc.n_questions, want_q[l]);
            size_t total = strlen(doc.context);
            for (uint32_t i = 0; i < doc.n_questions; i++) {
                total += strlen(doc.question[i]) + strlen(doc.answer[i]);
                char key[7], stem[128];
                assert_int_equal(
                    sscanf(doc.question[i], "\nWhat is the special magic number for %6[a-z]?", key),
                    1);
                snprintf(stem, sizeof stem,
                         "\nWhat is the special magic number for %s? The special magic number "
                         "for %s is:",
                         key, key);
                assert_string_equal(doc.question[i], stem);
                assert_int_equal(strlen(doc.answer[i]), 6);
                assert_true(doc.answer[i][0] == ' ');
                /* The needle holding the answer is in the context. */
                char needle[64];
                snprintf(needle, sizeof needle, " The special magic number for %s is:%s. ", key,
                         doc.answer[i]);
                assert_non_null(strstr(doc.context, needle));
                for (uint32_t j = 0; j < i; j++)
                    assert_string_not_equal(doc.question[i], doc.question[j]);
            }
            assert_int_equal(total, lengths[l]);
            /* The single question of the same seed asks one of these keys
             * (where both fit four). */
            if (want_q[l] == 4) {
                char *p, ans[8];
                assert_int_equal(
                    srv_task_make(SRV_TASK_NIAH_MULTIKEY, lengths[l], 0.5, seed, &p, ans), 0);
                bool found = false;
                for (uint32_t i = 0; i < doc.n_questions; i++)
                    found |= strcmp(doc.answer[i], ans) == 0 &&
                             strstr(p, doc.question[i]) == p + strlen(p) - strlen(doc.question[i]);
                assert_true(found);
                free(p);
            }
            srv_doc_free(&doc);
        }

    /* Deterministic per seed. */
    srv_doc_t a, b;
    assert_int_equal(srv_task_make_doc(SRV_TASK_NIAH_MULTIKEY, 1024, 0.25, 5, &a), 0);
    assert_int_equal(srv_task_make_doc(SRV_TASK_NIAH_MULTIKEY, 1024, 0.25, 5, &b), 0);
    assert_string_equal(a.context, b.context);
    assert_memory_equal(a.question, b.question, sizeof a.question);
    srv_doc_free(&b);
    bool reordered = false;
    for (uint64_t seed = 1; seed < 20 && !reordered; seed++) {
        char *p, ans[8];
        assert_int_equal(srv_task_make_doc(SRV_TASK_NIAH_MULTIKEY, 1024, 0.25, seed, &b), 0);
        /* A seeded order: the key at `depth` (the single question's)
         * is not always asked first. */
        assert_int_equal(srv_task_make(SRV_TASK_NIAH_MULTIKEY, 1024, 0.25, seed, &p, ans), 0);
        reordered = strcmp(b.answer[0], ans) != 0;
        free(p);
        srv_doc_free(&b);
    }
    assert_true(reordered);
    srv_doc_free(&a);
    assert_null(a.context);

    assert_int_equal(srv_task_make_doc(SRV_TASK_NIAH_MULTIKEY, 128, 0.5, 1, &a), KVS_ERANGE);
    assert_int_equal(srv_task_make_doc(SRV_TASK_PASSKEY, 1024, 0.5, 1, &a), KVS_EINVAL);
    assert_null(a.context);
}

/* ---- sized in tokens ------------------------------------------------------ */

typedef struct counted {
    const model_vocab_t *v; /* NULL: one token every `per` bytes */
    size_t per;             /* 0: 1 */
    int fail_at;            /* the call (1-based) that fails; 0: none */
    int calls;
} counted_t;

static int
count(void *ctx, const char *text, size_t len, size_t *n)
{
    counted_t *c = ctx;
    if (++c->calls == c->fail_at)
        return KVS_EINVAL;
    if (c->v == NULL) {
        size_t per = c->per ? c->per : 1;
        *n = (len + per - 1) / per;
        return 0;
    }
    int rc = model_vocab_tokenize(c->v, text, len, 0, NULL, 0, n);
    return rc == KVS_ENOSPC ? 0 : rc;
}

/* A prompt's tokens with its answer, as the fit counts them. */
static size_t
prompt_tokens(counted_t *c, const char *p, const char *ans)
{
    size_t lp = strlen(p), la = strlen(ans), n = 0;
    char *all = malloc(lp + la + 1);
    assert_non_null(all);
    memcpy(all, p, lp);
    memcpy(all + lp, ans, la + 1);
    assert_int_equal(count(c, all, lp + la, &n), 0);
    free(all);
    return n;
}

/* One token a byte: the byte-sized task itself, found at the first try. */
static void
test_fit_bytes(void **state)
{
    (void)state;
    const uint32_t lengths[] = {256, 1000, 4096};
    for (int t = 0; t < SRV_TASK_COUNT; t++)
        for (size_t l = 0; l < 3; l++) {
            counted_t c = {0};
            srv_counter_t sc = {count, &c};
            uint32_t hint = 0;
            char *p, *q, ans[8], ans2[8];
            assert_int_equal(srv_task_fit((srv_task_t)t, lengths[l], 0.5, 3, &sc, &hint, &p, ans),
                             0);
            assert_int_equal(c.calls, 1);
            assert_int_equal(hint, lengths[l]);
            assert_int_equal(srv_task_make((srv_task_t)t, lengths[l], 0.5, 3, &q, ans2), 0);
            assert_string_equal(p, q);
            assert_string_equal(ans, ans2);
            free(p);
            free(q);
        }
    counted_t c = {0};
    srv_counter_t sc = {count, &c};
    uint32_t hint = 0;
    srv_doc_t doc;
    assert_int_equal(srv_task_fit_doc(SRV_TASK_NIAH_MULTIKEY, 1024, 0.5, 3, &sc, &hint, &doc), 0);
    assert_int_equal(c.calls, 1);
    srv_doc_t want;
    assert_int_equal(srv_task_make_doc(SRV_TASK_NIAH_MULTIKEY, 1024, 0.5, 3, &want), 0);
    assert_string_equal(doc.context, want.context);
    srv_doc_free(&doc);
    srv_doc_free(&want);
}

/* Too few tokens for the needles, and a counter that fails part way:
 * an error, nothing returned, nothing leaked (ASan). */
static void
test_fit_errors(void **state)
{
    (void)state;
    counted_t c = {0};
    srv_counter_t sc = {count, &c};
    uint32_t hint = 0;
    char *p = NULL, ans[8];
    assert_int_equal(srv_task_fit(SRV_TASK_PASSKEY, 50, 0.5, 1, &sc, &hint, &p, ans), KVS_ERANGE);
    assert_null(p);
    assert_true(c.calls < 20);
    srv_doc_t doc;
    assert_int_equal(srv_task_fit_doc(SRV_TASK_NIAH_MULTIKEY, 100, 0.5, 1, &sc, &hint, &doc),
                     KVS_ERANGE);
    assert_null(doc.context);
    assert_int_equal(srv_task_fit_doc(SRV_TASK_VT, 1000, 0.5, 1, &sc, &hint, &doc), KVS_EINVAL);
    /* A token every 3 bytes: exact after a try or two. */
    counted_t third = {.per = 3};
    srv_counter_t tc = {count, &third};
    hint = 0;
    assert_int_equal(srv_task_fit(SRV_TASK_VT, 2000, 0.5, 1, &tc, &hint, &p, ans), 0);
    assert_int_equal(prompt_tokens(&third, p, ans), 2000);
    assert_true(third.calls >= 2 && third.calls <= 4);
    free(p);
    for (int at = 1; at <= 2; at++) {
        counted_t f = {.per = 3, .fail_at = at};
        srv_counter_t fc = {count, &f};
        hint = 0;
        p = NULL;
        assert_int_equal(srv_task_fit(SRV_TASK_VT, 2000, 0.5, 1, &fc, &hint, &p, ans), KVS_EINVAL);
        assert_null(p);
        f = (counted_t){.per = 3, .fail_at = at};
        assert_int_equal(srv_task_fit_doc(SRV_TASK_NIAH_MULTIKEY, 2000, 0.5, 1, &fc, &hint, &doc),
                         KVS_EINVAL);
        assert_null(doc.context);
    }
}

/* Real tokenizers: the text of every task and the shared document comes
 * to the asked tokens; a hint from the previous sample of a length makes
 * later fits cheap. */
static void
test_fit_vocabs(void **state)
{
    (void)state;
    VOCAB_FILES_SKIP_WITHOUT();
    const char *names[] = {"llama-spm", "gpt-2", "deepseek-llm"};
    const uint32_t lengths[] = {200, 1000, 8192};
    for (size_t k = 0; k < 3; k++) {
        model_vocab_t *v = vocab_files_load(names[k]);
        if (v == NULL) {
            fprintf(stderr, "note: no %s vocab, not tried\n", names[k]);
            continue;
        }
        size_t exact = 0, fits = 0;
        for (int t = 0; t < SRV_TASK_COUNT; t++)
            for (size_t l = 0; l < 3; l++) {
                uint32_t hint = 0;
                for (uint64_t seed = 1; seed <= 4; seed++) {
                    counted_t c = {.v = v};
                    srv_counter_t sc = {count, &c};
                    char *p, ans[8];
                    double depth = 0.25 * (double)seed;
                    int rc =
                        srv_task_fit((srv_task_t)t, lengths[l], depth, seed, &sc, &hint, &p, ans);
                    assert_int_equal(rc, 0);
                    int tries = c.calls;
                    size_t n = prompt_tokens(&c, p, ans);
                    fprintf(stderr, "%s %s %u seed %llu: %zu tokens, %d tries, %zu bytes\n",
                            names[k], srv_task_name((srv_task_t)t), lengths[l],
                            (unsigned long long)seed, n, tries, strlen(p) + strlen(ans));
                    assert_true(n <= lengths[l]);
                    assert_true(n + 2 >= lengths[l]);
                    exact += n == lengths[l];
                    fits++;
                    /* The first fit of a length searches; the later ones
                     * start from its byte size. */
                    assert_true(tries <= (seed == 1 ? 20 : 12));
                    assert_non_null(strstr(p, ans + 1));
                    free(p);
                }
            }
        /* A byte more rarely adds two tokens at once. */
        assert_true(exact * 10 >= fits * 9);
        uint32_t hint = 0;
        counted_t c = {.v = v};
        srv_counter_t sc = {count, &c};
        srv_doc_t doc;
        assert_int_equal(srv_task_fit_doc(SRV_TASK_NIAH_MULTIKEY, 4096, 0.5, 9, &sc, &hint, &doc),
                         0);
        srv_buf_t b = {0};
        srv_buf_puts(&b, doc.context);
        for (uint32_t i = 0; i < doc.n_questions; i++) {
            srv_buf_puts(&b, doc.question[i]);
            srv_buf_puts(&b, doc.answer[i]);
        }
        assert_false(b.oom);
        size_t n;
        assert_int_equal(count(&c, b.p, b.len, &n), 0);
        assert_true(n <= 4096 && n + 2 >= 4096);
        assert_int_equal(doc.n_questions, 4);
        free(b.p);
        srv_doc_free(&doc);
        model_vocab_free(v);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lengths_and_answers), cmocka_unit_test(test_formats),
        cmocka_unit_test(test_shared_doc),          cmocka_unit_test(test_fit_bytes),
        cmocka_unit_test(test_fit_errors),          cmocka_unit_test(test_fit_vocabs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
