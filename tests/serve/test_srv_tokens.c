/*
 * tests/serve/test_srv_tokens.c — generated text keeps every byte of every
 * token: srv_buf_put_token appends a token's whole piece however long
 * (code vocabularies have pieces of hundreds of bytes: runs of spaces or
 * symbols), and `kvserve run` prints exactly the pieces of the tokens it
 * reports, on a small model whose vocabulary is made of long pieces; text
 * for protobuf strings is well-formed UTF-8 (srv_utf8_valid) and JSON
 * strings keep characters whole (srv_json_str).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "serve/srv.h"
#include "tests/model/micro_model.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* <unk>, <s>, </s>, then "▁" and n - 1 letters for each of these n. */
static const uint32_t piece_len[] = {2, 8, 9, 63, 64, 65, 255, 256, 257, 700};
#define N_LONG (sizeof piece_len / sizeof piece_len[0])
#define N_VOCAB (3 + N_LONG)

static char model_path[256];
static kern_backend_t *be;
static model_t *model;

static int
setup(void **state)
{
    (void)state;
    static char *store[N_VOCAB];
    static const char *toks[N_VOCAB];
    static float scores[N_VOCAB];
    static int32_t types[N_VOCAB];
    for (uint32_t i = 0; i < N_VOCAB; i++) {
        if (i < 3) {
            toks[i] = i == 0 ? "<unk>" : i == 1 ? "<s>" : "</s>";
            types[i] = i == 0 ? 2 : 3;
            continue;
        }
        uint32_t n = piece_len[i - 3]; /* bytes of the piece: "▁" is 3 of the token's */
        store[i] = malloc(n + 3);
        if (store[i] == NULL)
            return -1;
        memcpy(store[i], "\xe2\x96\x81", 3);
        for (uint32_t k = 3; k < n + 2; k++)
            store[i][k] = (char)('a' + (i + k) % 26);
        store[i][n + 2] = '\0';
        toks[i] = store[i];
        types[i] = 1;
        scores[i] = -(float)i;
    }
    const char *tmp = getenv("TMPDIR");
    snprintf(model_path, sizeof model_path, "%s/kvs_tokens_XXXXXX", tmp ? tmp : "/tmp");
    int fd = mkstemp(model_path);
    if (fd < 0)
        return -1;
    close(fd);
    micro_vocab_t v = {toks, types, scores, N_VOCAB, 1, 2};
    char err[256];
    if (micro_model_write(model_path, KERN_F32, false, &v, 7) != 0 ||
        kern_backend_new("cpu", NULL, &be) != 0 ||
        model_load(model_path, be, &model, err, sizeof err) != 0)
        return -1;
    for (uint32_t i = 3; i < N_VOCAB; i++)
        free(store[i]);
    return 0;
}

static int
teardown(void **state)
{
    (void)state;
    model_free(model);
    kern_backend_free(be);
    unlink(model_path);
    return 0;
}

/* Token id's piece, whole, into a malloc'd buffer; its length in *n. */
static char *
whole_piece(int32_t id, size_t *n)
{
    const model_vocab_t *v = model_vocab(model);
    char none;
    int k = model_vocab_piece(v, id, false, &none, 0);
    assert_true(k >= 0);
    char *p = malloc((size_t)k + 1);
    assert_non_null(p);
    assert_int_equal(model_vocab_piece(v, id, false, p, (size_t)k), k);
    *n = (size_t)k;
    return p;
}

static void
test_put_token(void **state)
{
    (void)state;
    srv_buf_t b = {0};
    size_t want = 0;
    for (int32_t id = 0; id < (int32_t)N_VOCAB; id++) {
        size_t n;
        char *p = whole_piece(id, &n);
        if (id >= 3)
            assert_int_equal(n, piece_len[id - 3]); /* "▁" is one space */
        size_t at = b.len;
        srv_buf_put_token(&b, model, id);
        assert_false(b.oom);
        assert_int_equal(b.len - at, n);
        assert_memory_equal(b.p + at, p, n);
        want += n;
        free(p);
    }
    assert_int_equal(b.len, want);
    assert_int_equal(b.p[b.len], '\0');
    free(b.p);
}

/* `kvserve run --json` on the model: its "text" is the pieces of its
 * "tokens", whole. */
static void
test_run_text(void **state)
{
    (void)state;
    char out[300];
    snprintf(out, sizeof out, "%s.out", model_path);
    char *argv[] = {"run",      "--model",      model_path, "--prompt-tokens",
                    "3,9,12",   "--max-tokens", "24",       "--temperature",
                    "1",        "--seed",       "5",        "--ignore-eos",
                    "--device", "cpu",          "--json",   NULL};
    int argc = (int)(sizeof argv / sizeof argv[0]) - 1;
    fflush(stdout);
    int saved = dup(1), fd = open(out, O_CREAT | O_TRUNC | O_WRONLY, 0600);
    assert_true(saved >= 0 && fd >= 0);
    dup2(fd, 1);
    close(fd);
    int rc = srv_cmd_run(argc, argv);
    fflush(stdout);
    dup2(saved, 1);
    close(saved);
    assert_int_equal(rc, 0);

    size_t len;
    char *json = srv_read_file(out, &len);
    unlink(out);
    assert_non_null(json);
    /* The tokens, then the text they must spell. */
    const char *t = strstr(json, "\"tokens\": [");
    assert_non_null(t);
    t += strlen("\"tokens\": [");
    srv_buf_t want = {0};
    uint32_t n_tok = 0, n_long = 0;
    while (*t != ']') {
        char *end;
        long id = strtol(t, &end, 10);
        assert_true(end != t && id >= 0 && id < (long)N_VOCAB);
        size_t n;
        char *p = whole_piece((int32_t)id, &n);
        srv_buf_put(&want, p, n);
        free(p);
        n_tok++;
        n_long += n > 64;
        t = end;
        if (*t == ',')
            t += 2;
    }
    assert_int_equal(n_tok, 24);
    assert_true(n_long > 0); /* the run did write pieces past the old limits */
    /* The pieces are letters and spaces: the JSON string is the text. */
    srv_buf_t quoted = {0};
    srv_buf_puts(&quoted, "\"text\": \"");
    srv_buf_put(&quoted, want.p, want.len);
    srv_buf_puts(&quoted, "\"");
    if (strstr(json, quoted.p) == NULL) {
        print_error("run: text is not the tokens' pieces (%zu bytes expected)\n", want.len);
        fail();
    }
    free(want.p);
    free(quoted.p);
    free(json);
}

/* Text for protobuf strings: ill-formed UTF-8 becomes U+FFFD per maximal
 * subpart, as Python's decode(errors="replace") counts them. */
static void
test_utf8_valid(void **state)
{
    (void)state;
#define R "\xef\xbf\xbd"
    static const struct {
        const char *in;
        size_t n;
        const char *out;
    } cases[] = {
        {"caf\xc3\xa9 \xf0\x9f\x98\x80", 10, "caf\xc3\xa9 \xf0\x9f\x98\x80"},
        {"\xe4\xbd", 2, R}, /* cut short at the end */
        {"\xf0\x9f\x98"
         "a",
         4, R "a"},                       /* cut short before a letter */
        {"\xc0\xaf", 2, R R},             /* overlong */
        {"\xed\xa0\x80", 3, R R R},       /* a surrogate */
        {"\xf4\x90\x80\x80", 4, R R R R}, /* past U+10FFFF */
        {"\x80z\xff", 3, R "z" R},        /* stray continuation, FF */
        {"a\0b", 3, "a" R "b"},           /* NUL: C strings end there */
        {"", 0, ""},
    };
#undef R
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char *o = srv_utf8_valid(cases[i].in, cases[i].n);
        assert_non_null(o);
        assert_string_equal(o, cases[i].out);
        free(o);
    }
}

/* JSON strings: characters as they are, stray bytes as their value. */
static void
test_json_str(void **state)
{
    (void)state;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    const char s[] = "caf\xc3\xa9 \"q\"\n\x01\xe4\xbd!";
    srv_json_str(f, s, sizeof s - 1);
    fclose(f);
    assert_string_equal(buf, "\"caf\xc3\xa9 \\\"q\\\"\\n\\u0001\\u00e4\\u00bd!\"");
    free(buf);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_put_token),
        cmocka_unit_test(test_run_text),
        cmocka_unit_test(test_utf8_valid),
        cmocka_unit_test(test_json_str),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
