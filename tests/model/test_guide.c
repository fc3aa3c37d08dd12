/*
 * tests/model/test_guide.c — guided decoding by a regular expression
 * (model/guide.c) against PCRE2: every string up to a length over each
 * pattern's alphabet is a whole match exactly when PCRE2 says so; the
 * token mask on the byte vocabulary and on GPT-2's BPE vocabulary leaves
 * exactly the tokens after which PCRE2's partial matching still sees a
 * possible match; accepting tokens, clones, the end of the output;
 * patterns refused with the offset and the reason.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "model/model.h"
#include "tests/model/vocab_files.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <math.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[256];
static kern_backend_t *be;
static model_t *tiny; /* byte vocabulary */

static int
setup(void **state)
{
    (void)state;
    const char *t = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/kvs_guide_XXXXXX", t ? t : "/tmp");
    if (mkdtemp(tmpdir) == NULL)
        return -1;
    kern_backend_cfg_t cfg = {.n_threads = 1};
    if (kern_backend_new("cpu", &cfg, &be))
        return -1;
    char p[300], err[256];
    snprintf(p, sizeof p, "%s/tiny.gguf", tmpdir);
    if (model_random_write("tiny", KERN_F32, 1, NULL, p, err, sizeof err) ||
        model_load(p, be, &tiny, err, sizeof err))
        return -1;
    return 0;
}

static int
teardown(void **state)
{
    (void)state;
    model_free(tiny);
    kern_backend_free(be);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static pcre2_code *
pcre(const char *pat)
{
    /* \z rather than PCRE2_ENDANCHORED, which partial matching refuses. */
    char whole[1024];
    snprintf(whole, sizeof whole, "(?:%s)\\z", pat);
    int e;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)whole, PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_ANCHORED, &e, &off, NULL);
    if (re == NULL)
        fail_msg("pcre2 refuses %s", pat);
    return re;
}

static int pcre_says(pcre2_code *re, const char *s, size_t n, bool partial);

/* How many bytes the UTF-8 character cut at the end of s[0..n) lacks
 * (0: none is cut). */
static uint32_t
utf8_missing(const char *s, size_t n)
{
    for (size_t back = 1; back <= 3 && back <= n; back++) {
        uint8_t c = (uint8_t)s[n - back];
        if ((c & 0xC0) == 0x80)
            continue;
        uint32_t len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 1;
        return len > back ? len - (uint32_t)back : 0;
    }
    return 0;
}

/* PCRE2 will not look at a cut character: a prefix ending in one is a
 * prefix of a match when one of its completions is (every second byte,
 * and the boundaries of the ranges for a fourth). */
static int
partial_cut(pcre2_code *re, const char *s, size_t n, uint32_t missing)
{
    static const uint8_t edge[] = {0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF};
    char buf[4200];
    memcpy(buf, s, n);
    for (uint32_t b1 = 0x80; b1 <= 0xBF; b1++) {
        buf[n] = (char)b1;
        if (missing == 1) {
            if (pcre_says(re, buf, n + 1, true))
                return 1;
            continue;
        }
        for (uint32_t i = 0; i < (missing == 2 ? 64u : 6u); i++) {
            buf[n + 1] = (char)(missing == 2 ? 0x80 + i : edge[i]);
            for (uint32_t j = 0; j < (missing == 3 ? 6u : 1u); j++) {
                buf[n + 2] = (char)edge[j];
                if (pcre_says(re, buf, n + missing, true))
                    return 1;
            }
        }
    }
    return 0;
}

/* 1: s[0..n) is a whole match; with partial, also 1 when it is a prefix
 * of one. */
static int
pcre_says(pcre2_code *re, const char *s, size_t n, bool partial)
{
    uint32_t missing = partial ? utf8_missing(s, n) : 0;
    if (missing)
        return partial_cut(re, s, n, missing);
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    int rc = pcre2_match(re, (PCRE2_SPTR)s, n, 0, partial ? PCRE2_PARTIAL_HARD : 0, md, NULL);
    pcre2_match_data_free(md);
    /* Bytes that no valid UTF-8 begins with (a cut character at the end
     * is no error for a partial match). */
    if (rc <= PCRE2_ERROR_UTF8_ERR1 && rc >= PCRE2_ERROR_UTF8_ERR21)
        return 0;
    if (rc < 0 && rc != PCRE2_ERROR_NOMATCH && rc != PCRE2_ERROR_PARTIAL)
        fail_msg("pcre2_match: %d", rc);
    return rc >= 0 || rc == PCRE2_ERROR_PARTIAL;
}

/* Every string of at most max_len symbols (UTF-8 strings) is a match
 * for guide.c exactly when it is for PCRE2. */
static void
check_exhaustive(const char *pat, const char *const *sym, uint32_t n_sym, uint32_t max_len)
{
    char err[256];
    model_guide_t *g;
    if (model_guide_new(tiny, pat, strlen(pat), &g, err, sizeof err))
        fail_msg("%s: %s", pat, err);
    pcre2_code *re = pcre(pat);
    uint32_t idx[16] = {0};
    uint32_t matches = 0, total = 0;
    for (uint32_t len = 0; len <= max_len; len++) {
        memset(idx, 0, sizeof idx);
        for (;;) {
            char s[128];
            size_t n = 0;
            for (uint32_t k = 0; k < len; k++) {
                size_t l = strlen(sym[idx[k]]);
                memcpy(s + n, sym[idx[k]], l);
                n += l;
            }
            bool want = pcre_says(re, s, n, false), got = model_guide_fullmatch(g, s, n);
            if (want != got)
                fail_msg("/%s/ on \"%.*s\": pcre2 %d, guide %d", pat, (int)n, s, want, got);
            matches += want;
            total++;
            uint32_t k = 0;
            while (k < len && ++idx[k] == n_sym)
                idx[k++] = 0;
            if (k == len)
                break;
        }
    }
    /* A pattern that matches nothing or everything proves little. */
    assert_true(matches > 0 && matches < total);
    pcre2_code_free(re);
    model_guide_free(g);
}

static void
test_matches_pcre2(void **state)
{
    (void)state;
    static const struct {
        const char *pat;
        const char *sym[6];
        uint32_t len;
    } cases[] = {
        {"a|b*c", {"a", "b", "c"}, 5},
        {"(ab|a)(c|bcd)?", {"a", "b", "c", "d"}, 5},
        {"[a-c]{2,3}d?", {"a", "b", "c", "d"}, 5},
        {"x{0,2}y{2,}", {"x", "y"}, 7},
        {"(?:a|bc)*", {"a", "b", "c"}, 6},
        {"[^a]b", {"a", "b", "\xe2\x82\xac", "\n"}, 3},
        {"\\d+\\.?\\d*", {"1", ".", "a", "0"}, 5},
        {".\xc3\xa9?", {"a", "\xc3\xa9", "\n", "\xe2\x82\xac"}, 3},
        {"[\\w-]+", {"a", "-", "_", " ", "Z"}, 4},
        {"\\s*\\S", {" ", "\t", "x", "\n"}, 4},
        {"(a?){3}b", {"a", "b"}, 6},
        {"\"(?:[^\"\\\\\\x00-\\x1f]|\\\\[\"\\\\n])*\"",
         {"\"", "\\", "a", "\x01", "\xc3\xa9", "n"},
         5},
        {"[\xe2\x82\xac-\xf0\x9f\x98\x80]+",
         {"\xe2\x82\xac", "\xf0\x9f\x98\x80", "\xc3\xa9", "a"},
         3},
        {"^ab?$", {"a", "b"}, 4},
        {"\\x41\\x{e9}\\x{1F600}|\\x{41}+", {"A", "\xc3\xa9", "\xf0\x9f\x98\x80"}, 4},
        {"(?P<n>a)|(?<m>b)c", {"a", "b", "c"}, 3},
        {"[]a]b|a\\{b|{", {"]", "a", "b", "{"}, 3},
        {"(a*)*b|[^\\d\\s]c", {"a", "b", "c", "1", " "}, 4},
        {"(?:a{2}){2}|b{1,}?", {"a", "b"}, 5},
        {"[\\d-]|[-\\s]|\\W\\D", {"1", "-", " ", "a", "."}, 3},
        {"(?:ab|cd|)(?:e|)", {"a", "b", "c", "d", "e"}, 4},
        {"true|false|null|-?(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?", {"t", "r", "u", "e", "1", "0"}, 4},
        {"\\012a|\\0101|[\\011]\\08", {"\n", "a", "\b", "1", "\t", "8"}, 3},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        uint32_t n = 0;
        while (n < 6 && cases[i].sym[n])
            n++;
        check_exhaustive(cases[i].pat, cases[i].sym, n, cases[i].len);
    }
    /* PCRE2 10.42 reads {,m} as a literal; here it is 0..m, as in Python. */
    model_guide_t *g;
    assert_int_equal(model_guide_new(tiny, "a{,2}", 5, &g, NULL, 0), 0);
    assert_true(model_guide_fullmatch(g, "", 0) && model_guide_fullmatch(g, "aa", 2));
    assert_false(model_guide_fullmatch(g, "aaa", 3) || model_guide_fullmatch(g, "a{,2}", 5));
    model_guide_free(g);
    /* \uHHHH, as in JSON and JavaScript. */
    assert_int_equal(model_guide_new(tiny, "\\u00e9\\u20AC", 12, &g, NULL, 0), 0);
    assert_true(model_guide_fullmatch(g, "\xc3\xa9\xe2\x82\xac", 5));
    assert_false(model_guide_fullmatch(g, "\xc3\xa9", 2));
    model_guide_free(g);
    /* Never a match: invalid UTF-8 and surrogates. */
    assert_int_equal(model_guide_new(tiny, ".*", 2, &g, NULL, 0), 0);
    assert_true(model_guide_fullmatch(g, "\xf4\x8f\xbf\xbf", 4)); /* U+10FFFF */
    assert_false(model_guide_fullmatch(g, "\xed\xa0\x80", 3));    /* U+D800 */
    assert_false(model_guide_fullmatch(g, "\xc0\xaf", 2));        /* overlong */
    assert_false(model_guide_fullmatch(g, "\xc3", 1));
    model_guide_free(g);
}

/* Refused, with the offset and the reason in err. */
static void
test_refused(void **state)
{
    (void)state;
    static const struct {
        const char *pat, *why;
    } bad[] = {
        {"a(b", "missing ')'"},
        {"ab)", "unmatched ')'"},
        {"*a", "nothing to repeat"},
        {"a|+", "nothing to repeat"},
        {"{2}", "nothing to repeat"},
        {"[abc", "unterminated character class"},
        {"[z-a]", "out of order"},
        {"a{3,2}", "out of order"},
        {"a{1001}", "above 1000"},
        {"(?=a)b", "lookaround"},
        {"(?<!a)b", "lookaround"},
        {"(?i)a", "flags"},
        {"(a)\\1", "backreferences"},
        {"a\\bc", "word boundaries"},
        {"\\p{L}", "Unicode properties"},
        {"\\q", "unknown escape"},
        {"a^b", "only supported at the start"},
        {"a$b", "only supported at the end"},
        {"a++", "possessive"},
        {"[[:alpha:]]", "POSIX"},
        {"[\\d-z]", "cannot start a range"},
        {"\\x{D800}", "not a character"},
        {"\\xZZ", "bad hex"},
        {"a\xff", "invalid UTF-8"},
        {"a\\", "ends after"},
        {"[^\\x00-\\x{10FFFF}]", "matches nothing"},
        {"((a{1000}){1000}){2}", "too large"},
        {"(a|b)*a(a|b){16}", "too complex"},
        {"(?:(?:x|y)+z?){1,999}", "steps to build"},
        {"a**", "nothing to repeat"},
        {"a{2}{3}", "nothing to repeat"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char err[256] = "";
        model_guide_t *g = (model_guide_t *)1;
        int rc = model_guide_new(tiny, bad[i].pat, strlen(bad[i].pat), &g, err, sizeof err);
        if (rc != KVS_EINVAL || g != NULL || strstr(err, bad[i].why) == NULL)
            fail_msg("/%s/: rc %d, err \"%s\", want \"%s\"", bad[i].pat, rc, err, bad[i].why);
        if (strncmp(err, "at offset ", 10) != 0)
            fail_msg("/%s/: \"%s\" has no offset", bad[i].pat, err);
    }
    char err[64];
    model_guide_t *g;
    assert_int_equal(model_guide_new(tiny, NULL, 0, &g, err, sizeof err), KVS_EINVAL);
    /* Large but within bounds: compiled. */
    assert_int_equal(model_guide_new(tiny, "[0-9a-f]{1000}", 14, &g, err, sizeof err), 0);
    assert_true(model_guide_states(g) > 1000);
    model_guide_free(g);
}

/* The mask leaves token id exactly when out + its bytes is still a
 * prefix of a match (PCRE2's hard partial match), or id ends generation
 * and out is a whole match. */
static void
check_mask(model_t *m, model_guide_t *g, pcre2_code *re, const char *out, size_t n_out)
{
    uint32_t nv = model_hparams(m)->n_vocab, n_ok = 0;
    float *row = malloc(nv * sizeof *row), *masked = malloc(nv * sizeof *masked);
    assert_non_null(row);
    assert_non_null(masked);
    for (uint32_t i = 0; i < nv; i++)
        row[i] = (float)(i % 7) - 3.0f;
    uint32_t allowed = model_guide_mask(g, row, masked);
    bool whole = pcre_says(re, out, n_out, false);
    char buf[4096];
    for (uint32_t id = 0; id < nv; id++) {
        bool want;
        if (model_token_is_eog(m, (int32_t)id)) {
            want = whole;
        } else {
            int n = model_token_piece(m, (int32_t)id, buf + n_out, sizeof buf - n_out);
            assert_true(n >= 0 && (size_t)n < sizeof buf - n_out);
            memcpy(buf, out, n_out);
            want = n > 0 && pcre_says(re, buf, n_out + (size_t)n, true);
        }
        bool got = isfinite(masked[id]);
        if (want != got)
            fail_msg("output \"%.*s\", token %u: want %d, mask %d", (int)n_out, out, id, want, got);
        if (got)
            assert_true(masked[id] == row[id]);
        n_ok += got;
    }
    assert_int_equal(allowed, n_ok);
    free(row);
    free(masked);
}

static int32_t
token_of(model_t *m, const char *s)
{
    int32_t id;
    size_t n;
    assert_int_equal(model_tokenize(m, s, strlen(s), false, &id, 1, &n), 0);
    assert_int_equal(n, 1);
    return id;
}

/* Walks text through g token by token, checking the mask before each. */
static void
walk(model_t *m, const char *pat, const char *const *toks, uint32_t n_toks, int last)
{
    char err[256];
    model_guide_t *g;
    if (model_guide_new(m, pat, strlen(pat), &g, err, sizeof err))
        fail_msg("%s: %s", pat, err);
    pcre2_code *re = pcre(pat);
    char out[512];
    size_t n = 0;
    for (uint32_t k = 0; k < n_toks; k++) {
        check_mask(m, g, re, out, n);
        int rc = model_guide_accept(g, token_of(m, toks[k]));
        assert_int_equal(rc, k + 1 == n_toks ? last : 0);
        memcpy(out + n, toks[k], strlen(toks[k]));
        n += strlen(toks[k]);
    }
    check_mask(m, g, re, out, n);
    pcre2_code_free(re);
    model_guide_free(g);
}

static void
test_mask_bytes(void **state)
{
    (void)state;
    const char *num[] = {"-", "1", "2", ".", "5"};
    walk(tiny, "-?(?:0|[1-9][0-9]*)(?:\\.[0-9]+)?", num, 5, 0);
    const char *word[] = {"y", "e", "s"};
    walk(tiny, "yes|no", word, 3, 1); /* "yes": nothing goes on, over */
    const char *str[] = {"\"", "a", "\\", "n", "\xc3", "\xa9", "\""};
    walk(tiny, "\"(?:[^\"\\\\\\x00-\\x1f]|\\\\[\"\\\\n])*\"", str, 7, 1);

    /* Accept: ruled-out tokens refused (state unchanged), EOS only after
     * a whole match, a clone goes on from the same point. */
    model_guide_t *g, *h;
    assert_int_equal(model_guide_new(tiny, "ab|abc", 6, &g, NULL, 0), 0);
    int32_t eos = model_vocab_eos(model_vocab(tiny));
    assert_int_equal(model_guide_accept(g, 'b'), KVS_EINVAL);
    assert_int_equal(model_guide_accept(g, eos), KVS_EINVAL);
    assert_int_equal(model_guide_accept(g, 'a'), 0);
    assert_int_equal(model_guide_accept(g, 'b'), 0); /* "abc" goes on */
    assert_int_equal(model_guide_clone(g, &h), 0);
    assert_int_equal(model_guide_accept(g, 'c'), 1);
    assert_int_equal(model_guide_accept(h, eos), 1);
    assert_int_equal(model_guide_accept(h, -1), KVS_EINVAL);
    model_guide_free(g);
    model_guide_free(h);
}

/* A pattern compiled again runs on the automaton the model kept, with
 * masks of its own (a guide's walk does not move another's); the last 16
 * patterns are kept, an older one compiles anew; a guide outlives the
 * model's cache. */
static void
test_kept_automata(void **state)
{
    (void)state;
    model_guide_t *a, *b, *c;
    assert_int_equal(model_guide_new(tiny, "[0-9]x", 6, &a, NULL, 0), 0);
    assert_int_equal(model_guide_new(tiny, "[0-9]x", 6, &b, NULL, 0), 0);
    assert_true(model_guide_shares(a, b));
    assert_int_equal(model_guide_new(tiny, "[0-9]y", 6, &c, NULL, 0), 0);
    assert_false(model_guide_shares(a, c));
    model_guide_free(c);
    assert_int_equal(model_guide_accept(a, '1'), 0);
    uint32_t nv = model_hparams(tiny)->n_vocab;
    float *row = calloc(nv, sizeof *row), *out = malloc(nv * sizeof *out);
    assert_non_null(row);
    assert_non_null(out);
    assert_int_equal(model_guide_mask(a, row, out), 1); /* only the x */
    assert_true(isfinite(out['x']));
    assert_int_equal(model_guide_mask(b, row, out), 10); /* b is still at the start */
    assert_true(isfinite(out['7']) && !isfinite(out['x']));
    assert_int_equal(model_guide_accept(b, 'x'), KVS_EINVAL);
    for (int k = 0; k < 16; k++) {
        char pat[16];
        snprintf(pat, sizeof pat, "z{%d}", k + 1);
        assert_int_equal(model_guide_new(tiny, pat, strlen(pat), &c, NULL, 0), 0);
        model_guide_free(c);
    }
    assert_int_equal(model_guide_new(tiny, "[0-9]x", 6, &c, NULL, 0), 0);
    assert_false(model_guide_shares(a, c));
    assert_true(model_guide_fullmatch(c, "1x", 2) && model_guide_fullmatch(a, "3x", 2));
    model_guide_free(a);
    model_guide_free(b);
    model_guide_free(c);
    free(row);
    free(out);
}

/* GPT-2's vocabulary: tokens of several bytes, many sharing prefixes;
 * masks at several points of a JSON object, and state masks taken from
 * the cache (the same states come back) equal fresh ones. */
static void
test_mask_bpe(void **state)
{
    (void)state;
    char path[1200], p[300], err[256];
    snprintf(path, sizeof path, "%s/ggml-vocab-gpt-2.gguf", vocab_files_dir());
    if (!vocab_files_exists(path)) {
        fprintf(stderr, "note: no gpt-2 vocab file, BPE part not run\n");
        return;
    }
    model_gguf_t *gg;
    assert_int_equal(model_gguf_open(path, &gg, err, sizeof err), 0);
    snprintf(p, sizeof p, "%s/gpt2.gguf", tmpdir);
    assert_int_equal(model_random_write("tiny", KERN_F32, 3, gg, p, err, sizeof err), 0);
    model_gguf_close(gg);
    model_t *m;
    assert_int_equal(model_load(p, be, &m, err, sizeof err), 0);
    const char *pat = "\\{[ ]?\"name\"[ ]?:[ ]?\"[^\"\\\\\\x00-\\x1f]{1,20}\"[ ]?,[ ]?"
                      "\"age\"[ ]?:[ ]?(?:0|[1-9][0-9]{0,2})[ ]?\\}";
    const char *toks[] = {"{",   "\"",  "name", "\":", " \"", "Bob", " Smith",
                          "\",", " \"", "age",  "\":", " 4",  "2",   "}"};
    walk(m, pat, toks, sizeof toks / sizeof toks[0], 1);
    const char *free_text[] = {"Hello", " world", ",", " how", " are", " you", "?"};
    walk(m, "[A-Za-z ,?]{0,40}", free_text, 7, 0);
    model_free(m);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_pcre2), cmocka_unit_test(test_refused),
        cmocka_unit_test(test_mask_bytes),    cmocka_unit_test(test_mask_bpe),
        cmocka_unit_test(test_kept_automata),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
