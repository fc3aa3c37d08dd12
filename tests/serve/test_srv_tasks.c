/*
 * tests/serve/test_srv_tasks.c — the eval task generators: exact lengths,
 * the needle at the requested depth, the answer inside the needle, the
 * formats the bundled models were trained on, and determinism per seed.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "serve/srv_int.h"

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

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_lengths_and_answers),
        cmocka_unit_test(test_formats),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
