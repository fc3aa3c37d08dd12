/*
 * tests/fuzz/fuzz_guide.c — libFuzzer target for guided decoding's
 * compilers and automata (model/guide.c): GBNF grammars and regular
 * expressions from untrusted requests.  A text is refused with a reason or
 * compiled; a compiled guide is walked on a byte vocabulary, the input
 * choosing among the tokens each mask lets through, and must keep its
 * contracts: a mask lets something through until the output is over (every
 * state can still reach a match) unless a grammar's guide has passed a
 * bound and says so; an allowed token is accepted; an output that ends is
 * a whole match; a clone masks as the guide it was taken from.  Built only
 * with -DKVS_FUZZ=ON and CC=clang:
 *
 *   ./build-fuzz/fuzz_guide -max_total_time=60 corpus/
 *
 * Input: one byte (even: a grammar, odd: a pattern), the text up to a 0xFF
 * byte (never in UTF-8), then the bytes that choose each step's token.
 * When the first corpus directory is missing or empty, seeds are written
 * into it: a JSON grammar, nested lists, a pattern of a date and a
 * left-recursive grammar.
 */
#include "model/model.h"

#include "base/kvs.h"
#include "tests/fuzz/fuzz_util.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

enum { MAX_STEPS = 24, MAX_OUT = 4096 };

static kern_backend_t *be;
static model_t *model;

static const char *const seed_text[] = {
    ("root ::= value\nvalue ::= obj | arr | str | [0-9]+ | \"true\"\n"
     "obj ::= \"{\" (str \":\" value (\",\" str \":\" value)*)? \"}\"\n"
     "arr ::= \"[\" (value (\",\" value)*)? \"]\"\nstr ::= \"\\\"\" [^\"\\\\\\x00-\\x1f]* "
     "\"\\\"\"\n"),
    ("root ::= \"(\" list \")\"\nlist ::= item (\",\" \" \"? item)*\nitem ::= [a-z]{1,3} | \"(\" "
     "list \")\"\n"),
    "\\d{4}-(0[1-9]|1[0-2])-\\d{2}(T\\d{2}:\\d{2})?",
    "root ::= root \"a\" | \"b\"\n",
};

static int
write_seed(const char *path, int k)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL)
        return KVS_EIO;
    const char *t = seed_text[k];
    unsigned char mode = k == 2 ? 1 : 0, sep = 0xFF;
    fwrite(&mode, 1, 1, f);
    fwrite(t, 1, strlen(t), f);
    fwrite(&sep, 1, 1, f);
    for (int i = 0; i < MAX_STEPS; i++)
        fputc((i * 37 + k) & 0xFF, f);
    return fclose(f) == 0 ? 0 : KVS_EIO;
}

int
LLVMFuzzerInitialize(int *argc, char ***argv)
{
    kvs_log_set_level(KVS_LOG_ERROR);
    fuzz_seed(*argc, *argv, (int)(sizeof seed_text / sizeof seed_text[0]), "", write_seed);
    const char *tmp = getenv("TMPDIR");
    char path[4096], err[256];
    snprintf(path, sizeof path, "%s/kvserve-fuzz-guide-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    int fd = mkstemp(path);
    if (fd < 0)
        abort();
    close(fd);
    if (model_random_write("tiny", KERN_F32, 1, NULL, path, err, sizeof err) ||
        kern_backend_new("ref", NULL, &be) || model_load(path, be, &model, err, sizeof err)) {
        fprintf(stderr, "fuzz_guide: cannot make the model: %s\n", err);
        abort();
    }
    unlink(path);
    return 0;
}

/* The k-th token out (mod how many), whose mask entry is finite. */
static int32_t
pick(const float *out, uint32_t nv, uint32_t allowed, uint8_t k)
{
    uint32_t want = k % allowed;
    for (uint32_t id = 0; id < nv; id++)
        if (isfinite(out[id]) && want-- == 0)
            return (int32_t)id;
    abort();
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    bool grammar = (data[0] & 1) == 0;
    const uint8_t *text = data + 1, *end = memchr(text, 0xFF, size - 1);
    size_t len = end ? (size_t)(end - text) : size - 1;
    const uint8_t *choice = end ? end + 1 : data + size;
    size_t n_choice = (size_t)(data + size - choice);

    char err[256];
    err[0] = '\0';
    model_guide_t *g = NULL;
    int rc = grammar ? model_guide_new_grammar(model, (const char *)text, len, &g, err, sizeof err)
                     : model_guide_new(model, (const char *)text, len, &g, err, sizeof err);
    FUZZ_CHECK(rc == 0 || rc == KVS_EINVAL || rc == KVS_ENOMEM);
    if (rc) {
        FUZZ_CHECK(g == NULL && err[0] != '\0'); /* every refusal says why */
        return 0;
    }
    uint32_t nv = model_hparams(model)->n_vocab;
    float *row = calloc(nv, sizeof *row), *out = malloc(nv * sizeof *out);
    float *out2 = malloc(nv * sizeof *out2);
    char *text_out = malloc(MAX_OUT);
    FUZZ_CHECK(row && out && out2 && text_out);
    size_t n_out = 0;
    model_guide_t *c = NULL;
    for (uint32_t step = 0; step < MAX_STEPS; step++) {
        uint32_t allowed = model_guide_mask(g, row, out);
        if (c) { /* the clone taken last step sees the same */
            uint32_t a2 = model_guide_mask(c, row, out2);
            FUZZ_CHECK(a2 == allowed || (grammar && (a2 == 0 || allowed == 0)));
            for (uint32_t id = 0; a2 == allowed && id < nv; id++)
                FUZZ_CHECK(isfinite(out[id]) == isfinite(out2[id]));
            model_guide_free(c);
            c = NULL;
        }
        if (allowed == 0) {
            /* Only a grammar's guide that passed a bound lets nothing
             * through before the output is over. */
            FUZZ_CHECK(grammar && model_guide_accept(g, 0) == KVS_ENOSPC);
            break;
        }
        int32_t id = pick(out, nv, allowed, step < n_choice ? choice[step] : 0);
        bool eog = model_token_is_eog(model, id);
        int n = eog ? 0 : model_token_piece(model, id, text_out + n_out, MAX_OUT - n_out);
        FUZZ_CHECK(n >= 0 && (size_t)n <= MAX_OUT - n_out);
        n_out += (size_t)n;
        int a = model_guide_accept(g, id);
        if (a == KVS_ENOSPC && grammar)
            break;
        FUZZ_CHECK(a == 0 || a == 1);
        if (a == 1) {
            FUZZ_CHECK(model_guide_fullmatch(g, text_out, n_out));
            break;
        }
        FUZZ_CHECK(!eog);
        if (step % 3 == 1 && model_guide_clone(g, &c) != 0)
            c = NULL;
    }
    model_guide_free(c);
    model_guide_free(g);
    free(row);
    free(out);
    free(out2);
    free(text_out);
    return 0;
}
