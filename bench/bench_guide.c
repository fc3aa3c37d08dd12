/*
 * bench/bench_guide.c — what guided decoding (model/guide.c) costs a step
 * on a large real vocabulary (DeepSeek LLM's byte-level BPE, 102,400
 * tokens, from shared/data/vocab; --vocab for another), against the baseline of
 * asking a regex library, PCRE2 with hard partial matching, for each
 * token whether the output plus its bytes can still become a match — the
 * mask a server without an automaton computes.  All in one run:
 *
 *   compile   pattern -> DFA, for a regex, a pydantic-style schema and
 *             `{}` (any JSON value, nesting bounded), and the schema again
 *             (the model keeps the automaton: the schema's translation and
 *             a lookup remain);
 *   cold      a mask for a state seen for the first time (walk of the
 *             vocabulary in byte order): `[a-z ]{0,1000}` moves to a new
 *             state with every token;
 *   cached    the same mask for a state kept from before: `[a-z ]*`
 *             stays in one state;
 *   json      a JSON document of the schema walked token by token (as
 *             the model would emit it), a mask before each token;
 *   grammar   the same document under a GBNF grammar of any JSON (a
 *             pushdown automaton, its states found as the output goes);
 *   pcre2     the baseline, for `[a-z ]*` after the same output;
 *   top-p     a draw at temperature 1, top-p 0.95 from a row shaped like
 *             a model's: the sampler, against sorting every token by
 *             probability and walking down to 95% (the baseline);
 *   draw      a step's mask and draw at those settings along the schema's
 *             document: the masked row then the sampler over the whole
 *             vocabulary (the baseline), against the guide's bitmask and
 *             the sampler over the tokens it keeps; the same tokens.
 *
 * Usage: bench_guide [--steps N (32)] [--vocab GGUF] [--json FILE (bench/out/guide.json)]
 */
#include "model/model.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <pcre2.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "serve/srv_schema.h"

static double
now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e3 + (double)t.tv_nsec / 1e6;
}

static const char *const user_schema =
    "{\"$defs\":{\"Role\":{\"enum\":[\"admin\",\"user\",\"guest\"],\"type\":\"string\"}},"
    "\"properties\":{\"name\":{\"maxLength\":50,\"type\":\"string\"},\"age\":{\"maximum\":150,"
    "\"minimum\":0,\"type\":\"integer\"},\"email\":{\"anyOf\":[{\"type\":\"string\"},{\"type\":"
    "\"null\"}],\"default\":null},\"role\":{\"$ref\":\"#/$defs/Role\"},\"tags\":{\"items\":{"
    "\"type\":\"string\"},\"type\":\"array\"}},\"required\":[\"name\",\"age\",\"role\"],"
    "\"type\":\"object\"}";

static const char *const user_doc =
    "{\"name\": \"Ada Lovelace\", \"age\": 36, \"email\": \"ada@example.org\", \"role\": "
    "\"admin\", \"tags\": [\"math\", \"engines\", \"poetry\"]}";

/* Any JSON value (RFC 8259), nesting unbounded. */
static const char json_gbnf[] =
    "root   ::= value\n"
    "value  ::= object | array | string | number | \"true\" | \"false\" | \"null\"\n"
    "object ::= \"{\" ws ( member ( ws \",\" ws member )* ws )? \"}\"\n"
    "member ::= string ws \":\" ws value\n"
    "array  ::= \"[\" ws ( value ( ws \",\" ws value )* ws )? \"]\"\n"
    "string ::= \"\\\"\" ( [^\"\\\\\\x00-\\x1F] | \"\\\\\" ( [\"\\\\/bfnrt] | \"u\" "
    "[0-9a-fA-F]{4} ) )* \"\\\"\"\n"
    "number ::= \"-\"? ( \"0\" | [1-9] [0-9]* ) ( \".\" [0-9]+ )? ( [eE] [-+]? [0-9]+ )?\n"
    "ws     ::= [ \\t\\n\\r]*\n";

typedef struct {
    const char *what;
    double ms;       /* per step (compile: once) */
    uint32_t states; /* compile rows */
} row_t;

static int
compile_row(const model_t *m, const char *what, const char *regex, const char *json, row_t *r)
{
    const char *field;
    char err[256];
    model_guide_t *g;
    double t0 = now_ms();
    int rc = srv_guide_new(m, NULL, regex, json, NULL, &g, &field, err, sizeof err);
    if (rc) {
        fprintf(stderr, "bench_guide: %s: %s: %s\n", what, field, err);
        return rc;
    }
    *r = (row_t){what, now_ms() - t0, model_guide_states(g)};
    model_guide_free(g);
    return 0;
}

/* Mean ms of a mask over `steps` steps, each followed by accepting tok. */
static double
mask_steps(const model_t *m, const char *regex, const int32_t *toks, uint32_t steps, float *row,
           float *out)
{
    model_guide_t *g;
    if (model_guide_new(m, regex, strlen(regex), &g, NULL, 0))
        return -1;
    double sum = 0;
    for (uint32_t k = 0; k < steps; k++) {
        double t0 = now_ms();
        uint32_t n = model_guide_mask(g, row, out);
        sum += now_ms() - t0;
        if (n == 0 || model_guide_accept(g, toks[k]) < 0) {
            model_guide_free(g);
            return -1;
        }
    }
    model_guide_free(g);
    return sum / steps;
}

/* Mean ms of a step's mask and draw along doc, by the masked row
 * (masked_row) or by the guide's bitmask; -1 when a guide refuses a
 * token.  The drawn tokens' sum goes to *sum, for comparing the two. */
static double
draw_steps(const model_t *m, const char *schema, const int32_t *doc, size_t n_doc, const float *row,
           float *out, bool masked_row, int64_t *sum)
{
    model_guide_t *g;
    const char *field;
    char err[256];
    model_sampling_t cfg = {.temperature = 1.0f, .top_p = 0.95f, .seed = 11};
    model_sampler_t *smp;
    if (srv_guide_new(m, NULL, NULL, schema, NULL, &g, &field, err, sizeof err))
        return -1;
    if (model_sampler_new(&cfg, model_hparams(m)->n_vocab, &smp)) {
        model_guide_free(g);
        return -1;
    }
    double t = 0;
    *sum = 0;
    for (size_t k = 0; k < n_doc; k++) {
        double t0 = now_ms();
        int32_t tok;
        if (masked_row) {
            model_guide_mask(g, row, out);
            tok = model_sampler_sample(smp, out);
        } else {
            int rc; /* no count, as the engine asks */
            const uint64_t *bits = model_guide_allowed(g, NULL, &rc);
            tok = bits ? model_sampler_sample_masked(smp, row, bits) : rc;
        }
        t += now_ms() - t0;
        *sum += tok;
        if (model_guide_accept(g, doc[k]) < 0) {
            t = -1;
            break;
        }
    }
    model_sampler_free(smp);
    model_guide_free(g);
    return t < 0 ? -1 : t / (double)n_doc;
}

static int
by_prob_desc(const void *a, const void *b, void *arg)
{
    const float *p = arg;
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    return p[i] != p[j] ? (p[i] > p[j] ? -1 : 1) : (i > j) - (i < j);
}

/* Mean ms of a top-p 0.95 draw by sorting every token (the baseline), or
 * of model_sampler_sample at the same settings. */
static double
top_p_ms(const float *row, uint32_t nv, uint32_t reps, bool sampler)
{
    float *p = malloc(nv * sizeof *p);
    int32_t *idx = malloc(nv * sizeof *idx);
    model_sampling_t cfg = {.temperature = 1.0f, .top_p = 0.95f, .seed = 3};
    model_sampler_t *smp = NULL;
    double t = -1;
    if (p && idx && model_sampler_new(&cfg, nv, &smp) == 0) {
        int64_t sink = 0;
        double t0 = now_ms();
        for (uint32_t r = 0; r < reps; r++) {
            if (sampler) {
                sink += model_sampler_sample(smp, row);
                continue;
            }
            float mx = row[0];
            for (uint32_t i = 1; i < nv; i++)
                mx = row[i] > mx ? row[i] : mx;
            double sum = 0;
            for (uint32_t i = 0; i < nv; i++) {
                p[i] = expf(row[i] - mx);
                idx[i] = (int32_t)i;
                sum += p[i];
            }
            qsort_r(idx, nv, sizeof *idx, by_prob_desc, p);
            double acc = 0, u = (double)(r + 1) / (reps + 1) * 0.95 * sum;
            uint32_t k = 0;
            while (k + 1 < nv && (acc += p[idx[k]]) < u)
                k++;
            sink += idx[k];
        }
        t = (now_ms() - t0) / reps;
        if (sink == -1)
            t = -1;
    }
    model_sampler_free(smp);
    free(p);
    free(idx);
    return t;
}

/* Mean ms of a mask before each token of doc, as g takes it; -1 when g
 * refuses one. */
static double
doc_steps(model_guide_t *g, const int32_t *doc, size_t n_doc, const float *row, float *out,
          const char *what)
{
    double sum = 0;
    for (size_t k = 0; k < n_doc; k++) {
        double t0 = now_ms();
        model_guide_mask(g, row, out);
        sum += now_ms() - t0;
        if (model_guide_accept(g, doc[k]) < 0) {
            fprintf(stderr, "bench_guide: the document leaves the %s at token %zu\n", what, k);
            return -1;
        }
    }
    return sum / (double)n_doc;
}

int
main(int argc, char **argv)
{
    uint32_t steps = 32;
    const char *json_path = "bench/out/guide.json";
    const char *vocab = "../shared/data/vocab/ggml-vocab-deepseek-llm.gguf";
    static const struct option lo[] = {{"steps", 1, 0, 's'},
                                       {"vocab", 1, 0, 'v'},
                                       {"json", 1, 0, 'j'},
                                       {"help", 0, 0, 'h'},
                                       {0, 0, 0, 0}};
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        if (c == 's' && atoi(optarg) > 0 && atoi(optarg) <= 200)
            steps = (uint32_t)atoi(optarg);
        else if (c == 'j')
            json_path = optarg;
        else if (c == 'v')
            vocab = optarg;
        else {
            fprintf(stderr,
                    "usage: bench_guide [--steps N (1..200)] [--vocab GGUF] [--json FILE]\n");
            return c == 'h' ? 0 : 2;
        }
    }
    const char *tmp = getenv("TMPDIR");
    char dir[256], path[300], err[256];
    snprintf(dir, sizeof dir, "%s/bench_guide_XXXXXX", tmp ? tmp : "/tmp");
    if (mkdtemp(dir) == NULL) {
        fprintf(stderr, "bench_guide: mkdtemp: %s\n", strerror(errno));
        return 1;
    }
    snprintf(path, sizeof path, "%s/draft.gguf", dir);
    kern_backend_cfg_t cfg = {.n_threads = 1};
    kern_backend_t *be = NULL;
    model_t *m = NULL;
    float *row = NULL, *masked = NULL;
    int32_t *toks = NULL;
    int status = 1;
    model_gguf_t *vg = NULL;
    if (model_gguf_open(vocab, &vg, err, sizeof err)) {
        fprintf(stderr, "bench_guide: --vocab %s: %s\n", vocab, err);
        goto out;
    }
    /* A small model of that vocabulary: the masks depend on nothing else. */
    int rc = model_random_write("tiny", KERN_F32, 1, vg, path, err, sizeof err);
    model_gguf_close(vg);
    if (rc || kern_backend_new("cpu", &cfg, &be) || model_load(path, be, &m, err, sizeof err)) {
        fprintf(stderr, "bench_guide: model: %s\n", err);
        goto out;
    }
    unlink(path);
    uint32_t nv = model_hparams(m)->n_vocab;
    row = malloc(nv * sizeof *row);
    masked = malloc(nv * sizeof *masked);
    toks = malloc(4096 * sizeof *toks);
    if (!row || !masked || !toks)
        goto out;
    for (uint32_t i = 0; i < nv; i++)
        row[i] = (float)(i % 13) * 0.1f;
    /* The first use builds the vocabulary's byte table: not a step's cost. */
    row_t warm;
    if (compile_row(m, "warm-up", "a", NULL, &warm))
        goto out;

    row_t comp[4];
    if (compile_row(m, "regex [A-Z]{2}-\\d{3}(-[a-z]{1,4})?", "[A-Z]{2}-\\d{3}(-[a-z]{1,4})?", NULL,
                    &comp[0]) ||
        compile_row(m, "schema: 5-field pydantic model", NULL, user_schema, &comp[1]) ||
        compile_row(m, "schema: {} (any JSON, 3 deep)", NULL, "{}", &comp[2]) ||
        compile_row(m, "schema: the pydantic model again (kept)", NULL, user_schema, &comp[3]))
        goto out;

    /* " the" style tokens of lower-case words: the walk of both patterns. */
    size_t n;
    int32_t word;
    if (model_tokenize(m, " the", 4, false, &word, 1, &n) || n != 1) {
        fprintf(stderr, "bench_guide: \" the\" is not one token\n");
        goto out;
    }
    for (uint32_t k = 0; k < steps; k++)
        toks[k] = word;
    double cold = mask_steps(m, "[a-z ]{0,1000}", toks, steps, row, masked);
    double cached = mask_steps(m, "[a-z ]*", toks, steps, row, masked);

    int32_t doc[512];
    size_t n_doc;
    if (model_tokenize(m, user_doc, strlen(user_doc), false, doc, 512, &n_doc)) {
        fprintf(stderr, "bench_guide: cannot tokenize the document\n");
        goto out;
    }
    model_guide_t *g;
    const char *field;
    if (srv_guide_new(m, NULL, NULL, user_schema, NULL, &g, &field, err, sizeof err)) {
        fprintf(stderr, "bench_guide: %s: %s\n", field, err);
        goto out;
    }
    double js = doc_steps(g, doc, n_doc, row, masked, "schema");
    model_guide_free(g);
    if (js < 0)
        goto out;

    double t_gram = now_ms();
    if (model_guide_new_grammar(m, json_gbnf, strlen(json_gbnf), &g, err, sizeof err)) {
        fprintf(stderr, "bench_guide: grammar: %s\n", err);
        goto out;
    }
    t_gram = now_ms() - t_gram;
    double gram = doc_steps(g, doc, n_doc, row, masked, "grammar");
    uint32_t gram_states = model_guide_states(g);
    model_guide_free(g);
    if (gram < 0)
        goto out;
    /* A row shaped like a model's for the draws: normal logits of spread 3
     * (sums of uniforms), so the top tokens hold most of the mass. */
    float *lrow = malloc(nv * sizeof *lrow);
    if (lrow == NULL)
        goto out;
    uint64_t rs = 0x9E3779B97F4A7C15ull;
    for (uint32_t i = 0; i < nv; i++) {
        double u = 0;
        for (int k = 0; k < 4; k++) {
            rs = rs * 6364136223846793005ull + 1442695040888963407ull;
            u += (double)(rs >> 11) / 9007199254740992.0;
        }
        lrow[i] = (float)((u - 2.0) * 3.0 * 1.7320508);
    }
    int64_t sum_row, sum_bits;
    double d_row = draw_steps(m, user_schema, doc, n_doc, lrow, masked, true, &sum_row);
    double d_bits = draw_steps(m, user_schema, doc, n_doc, lrow, masked, false, &sum_bits);
    double tp_sort = top_p_ms(lrow, nv, 16, false), tp_ours = top_p_ms(lrow, nv, 16, true);
    free(lrow);
    if (d_row < 0 || d_bits < 0 || sum_row != sum_bits || tp_sort < 0 || tp_ours < 0) {
        fprintf(stderr, "bench_guide: the two draws disagree\n");
        goto out;
    }

    /* Baseline: PCRE2 on every token after an output of `steps` words. */
    int e;
    PCRE2_SIZE off;
    pcre2_code *re = pcre2_compile((PCRE2_SPTR) "(?:[a-z ]*)\\z", PCRE2_ZERO_TERMINATED,
                                   PCRE2_UTF | PCRE2_ANCHORED, &e, &off, NULL);
    pcre2_match_data *md = re ? pcre2_match_data_create_from_pattern(re, NULL) : NULL;
    char *buf = malloc(4 * (size_t)steps + 4096);
    if (!re || !md || !buf)
        goto out;
    size_t at = 0;
    for (uint32_t k = 0; k < steps; k++)
        at += (size_t)model_token_piece(m, word, buf + at, 8);
    uint32_t allowed = 0;
    double t0 = now_ms();
    for (uint32_t id = 0; id < nv; id++) {
        if (model_token_is_eog(m, (int32_t)id)) {
            allowed++; /* the output so far is a whole match */
            continue;
        }
        int len = model_token_piece(m, (int32_t)id, buf + at, 4000);
        if (len <= 0 || len > 4000)
            continue;
        int rc =
            pcre2_match(re, (PCRE2_SPTR)buf, at + (size_t)len, 0, PCRE2_PARTIAL_HARD, md, NULL);
        allowed += rc >= 0 || rc == PCRE2_ERROR_PARTIAL;
    }
    double pcre_ms = now_ms() - t0;
    uint32_t ours = 0;
    if (model_guide_new(m, "[a-z ]*", 7, &g, NULL, 0) == 0) {
        ours = model_guide_mask(g, row, masked);
        model_guide_free(g);
    }
    pcre2_match_data_free(md);
    pcre2_code_free(re);
    free(buf);

    printf("guided decoding on %s (%u tokens), %u steps\n", vocab, nv, steps);
    printf("%-40s %10s %10s\n", "compile", "ms", "states");
    for (int i = 0; i < 4; i++)
        printf("%-40s %10.2f %10u\n", comp[i].what, comp[i].ms, comp[i].states);
    printf("%-40s %10.2f %10u\n", "GBNF grammar of any JSON (states met)", t_gram, gram_states);
    printf("%-40s %10s %12s\n", "mask per step", "ms", "vs pcre2");
    printf("%-40s %10.3f %11.4fx\n", "pcre2 partial match per token (base)", pcre_ms, 1.0);
    printf("%-40s %10.3f %11.4fx\n", "cold: new state each step", cold, cold / pcre_ms);
    printf("%-40s %10.3f %11.4fx\n", "cached: state seen before", cached, cached / pcre_ms);
    printf("%-40s %10.3f %11.4fx\n", "json document (pydantic model)", js, js / pcre_ms);
    printf("%-40s %10.3f %11.4fx\n", "json document (GBNF grammar, any JSON)", gram,
           gram / pcre_ms);
    printf("%-40s %10s %12s\n", "a top-p 0.95 draw", "ms", "vs sort");
    printf("%-40s %10.3f %11.4fx\n", "sorting every token (base)", tp_sort, 1.0);
    printf("%-40s %10.3f %11.4fx\n", "the sampler (buckets)", tp_ours, tp_ours / tp_sort);
    printf("%-40s %10s %12s\n", "mask and draw per step (top-p 0.95)", "ms", "vs row");
    printf("%-40s %10.3f %11.4fx\n", "masked row, sampler over all (base)", d_row, 1.0);
    printf("%-40s %10.3f %11.4fx\n", "bitmask, sampler over the kept", d_bits, d_bits / d_row);
    printf("tokens allowed by [a-z ]*: %u (pcre2 %u)\n", ours, allowed);
    if (cold < 0 || cached < 0 || ours != allowed) {
        fprintf(stderr, "bench_guide: masks disagree with the baseline\n");
        goto out;
    }
    FILE *f = fopen(json_path, "w");
    if (f == NULL) {
        fprintf(stderr, "bench_guide: cannot write %s: %s\n", json_path, strerror(errno));
        goto out;
    }
    fprintf(f, "{\"n_vocab\": %u, \"steps\": %u, \"compile\": [", nv, steps);
    static const char *const key[4] = {"regex", "pydantic", "any", "pydantic_kept"};
    for (int i = 0; i < 4; i++)
        fprintf(f, "%s{\"what\": \"%s\", \"ms\": %.3f, \"states\": %u}", i ? ", " : "", key[i],
                comp[i].ms, comp[i].states);
    fprintf(f,
            "], \"grammar_compile_ms\": %.3f, \"grammar_states\": %u, \"mask_ms\": {\"pcre2\": "
            "%.4f, \"cold\": %.4f, \"cached\": %.4f, \"json\": %.4f, \"grammar\": %.4f}, "
            "\"ratio_vs_pcre2\": {\"cold\": %.5f, \"cached\": %.5f, \"json\": %.5f, "
            "\"grammar\": %.5f}, \"top_p_ms\": {\"sort\": %.4f, \"sampler\": %.4f, "
            "\"ratio\": %.5f}, \"draw_ms\": {\"masked_row\": %.4f, \"bitmask\": %.4f, "
            "\"ratio\": %.5f}}\n",
            t_gram, gram_states, pcre_ms, cold, cached, js, gram, cold / pcre_ms, cached / pcre_ms,
            js / pcre_ms, gram / pcre_ms, tp_sort, tp_ours, tp_ours / tp_sort, d_row, d_bits,
            d_bits / d_row);
    fclose(f);
    printf("json: %s\n", json_path);
    status = 0;
out:
    free(row);
    free(masked);
    free(toks);
    model_free(m);
    kern_backend_free(be);
    rmdir(dir);
    return status;
}
