/*
 * tests/model/test_model.c — model loading (hyper-parameters, tensor
 * binding, refusal of inconsistent or unsupported files with a message
 * naming the fault), the byte-level tokenizers, random models with another
 * file's vocabulary, the sampler, and block-sparse's top-k choice.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "model/model_int.h"
#include "tests/model/vocab_files.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char tmpdir[256];
static kern_backend_t *be;

static int
setup(void **state)
{
    (void)state;
    const char *t = getenv("TMPDIR");
    snprintf(tmpdir, sizeof tmpdir, "%s/kvs_model_XXXXXX", t ? t : "/tmp");
    if (mkdtemp(tmpdir) == NULL)
        return -1;
    kern_backend_cfg_t cfg = {.n_threads = 1};
    return kern_backend_new("cpu", &cfg, &be);
}

static int
teardown(void **state)
{
    (void)state;
    kern_backend_free(be);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    return system(cmd) == 0 ? 0 : -1;
}

static void
path_of(char *buf, size_t n, const char *name)
{
    snprintf(buf, n, "%s/%s", tmpdir, name);
}

static void
test_load_tiny(void **state)
{
    (void)state;
    const kern_dtype_t types[] = {KERN_F32, KERN_F16, KERN_BF16, KERN_Q8_0};
    for (size_t i = 0; i < 4; i++) {
        char p[300], err[256] = "";
        path_of(p, sizeof p, "tiny.gguf");
        assert_int_equal(model_random_write("tiny", types[i], 1, NULL, p, err, sizeof err), 0);
        model_t *m;
        assert_int_equal(model_load(p, be, &m, err, sizeof err), 0);
        const model_hparams_t *hp = model_hparams(m);
        assert_string_equal(hp->arch, "llama");
        assert_int_equal(hp->n_embd, 256);
        assert_int_equal(hp->n_layer, 4);
        assert_int_equal(hp->n_head, 8);
        assert_int_equal(hp->n_head_kv, 2);
        assert_int_equal(hp->head_dim, 32);
        assert_int_equal(hp->n_ff, 704);
        assert_int_equal(hp->n_vocab, 259);
        assert_int_equal(hp->wtype, types[i]);
        assert_true(hp->is_random);
        assert_false(hp->tied_output);
        assert_string_equal(model_tokenizer_name(m), "gpt2-bytes");
        assert_int_equal(model_kv_bytes_per_token(m, KERN_F16), 2 * 2 * 32 * 2);
        assert_true(model_weight_bytes_per_token(m) > 0);
        model_free(m);
    }
}

static void
test_tokenizer(void **state)
{
    (void)state;
    char p[300], err[256];
    path_of(p, sizeof p, "tok.gguf");
    assert_int_equal(model_random_write("tiny", KERN_F32, 1, NULL, p, err, sizeof err), 0);
    model_t *m;
    assert_int_equal(model_load(p, be, &m, err, sizeof err), 0);
    const char text[] = "Hi \n\xc3\xa9\x00!";
    int32_t ids[32];
    size_t n;
    assert_int_equal(model_tokenize(m, text, sizeof text - 1, true, ids, 32, &n), 0);
    assert_int_equal(n, sizeof text); /* BOS + every byte */
    assert_int_equal(ids[0], 256);
    assert_int_equal(model_token_bos(m), 256);
    assert_int_equal(model_token_eos(m), 257);
    assert_true(model_token_is_eog(m, 257));
    assert_false(model_token_is_eog(m, 65));
    for (size_t i = 1; i < n; i++) {
        char c;
        assert_int_equal(model_token_piece(m, ids[i], &c, 1), 1);
        assert_int_equal((unsigned char)c, (unsigned char)text[i - 1]);
    }
    char c;
    assert_int_equal(model_token_piece(m, 256, &c, 1), 0); /* control: no text */
    assert_int_equal(model_token_piece(m, 259, &c, 1), KVS_EINVAL);
    assert_int_equal(model_tokenize(m, text, sizeof text - 1, false, ids, 3, &n), KVS_ENOSPC);
    assert_int_equal(n, sizeof text - 1);
    model_free(m);
}

/* ---- random models with another file's vocabulary ------------------------- */

/* Every tokenizer.* key of `from` is in `to` with the same type and bytes. */
static void
assert_vocab_copied(const model_gguf_t *from, const model_gguf_t *to)
{
    int copied = 0;
    for (uint32_t i = 0; i < model_gguf_n_kv(from); i++) {
        const char *key = model_gguf_kv_key(from, i);
        if (strncmp(key, "tokenizer.", 10) != 0)
            continue;
        int64_t j = model_gguf_find_key(to, key);
        assert_true(j >= 0);
        assert_int_equal(model_gguf_kv_type(to, (uint32_t)j), model_gguf_kv_type(from, i));
        const void *a, *b;
        size_t la, lb;
        assert_int_equal(model_gguf_kv_raw(from, i, &a, &la), 0);
        assert_int_equal(model_gguf_kv_raw(to, (uint32_t)j, &b, &lb), 0);
        assert_int_equal(la, lb);
        assert_memory_equal(a, b, la);
        copied++;
    }
    assert_true(copied >= 4);
}

static void
test_random_vocab(void **state)
{
    (void)state;
    char src[300], dst[300], err[256] = "";
    path_of(src, sizeof src, "bytes.gguf");
    path_of(dst, sizeof dst, "draft.gguf");
    assert_int_equal(model_random_write("tiny", KERN_F16, 1, NULL, src, err, sizeof err), 0);
    /* The draft shape (Llama 3's 128256 ids, no tokenizer) with tiny's
     * byte vocabulary: 259 embedding rows, and text it can tokenize. */
    model_gguf_t *g, *out;
    assert_int_equal(model_gguf_open(src, &g, err, sizeof err), 0);
    assert_int_equal(model_random_write("llama-draft", KERN_F16, 2, g, dst, err, sizeof err), 0);
    assert_int_equal(model_gguf_open(dst, &out, err, sizeof err), 0);
    assert_vocab_copied(g, out);
    assert_int_equal(model_gguf_find_tensor(out, "token_embd.weight")->ne[1], 259);
    model_gguf_close(out);
    model_gguf_close(g);
    model_t *m;
    assert_int_equal(model_load(dst, be, &m, err, sizeof err), 0);
    assert_int_equal(model_hparams(m)->n_vocab, 259);
    assert_int_equal(model_hparams(m)->n_layer, 2);
    assert_string_equal(model_tokenizer_name(m), "gpt2-bytes");
    model_free(m);

    /* A file without a vocabulary: refused, nothing written. */
    model_gguf_writer_t *w;
    assert_int_equal(model_gguf_writer_new(&w), 0);
    assert_int_equal(model_gguf_writer_set_str(w, "general.architecture", "llama"), 0);
    assert_int_equal(model_gguf_writer_begin(w, src), 0);
    assert_int_equal(model_gguf_writer_finish(w), 0);
    model_gguf_writer_free(w);
    unlink(dst);
    assert_int_equal(model_gguf_open(src, &g, err, sizeof err), 0);
    err[0] = '\0';
    assert_true(model_random_write("tiny", KERN_F32, 1, g, dst, err, sizeof err) < 0);
    assert_true(strncmp(err, "vocabulary: ", 12) == 0);
    assert_int_equal(access(dst, F_OK), -1);
    model_gguf_close(g);

    /* A real BPE vocabulary: the model tokenizes as the vocab file does. */
    model_vocab_t *v = vocab_files_load("gpt-2");
    if (v == NULL) {
        fprintf(stderr, "note: no gpt-2 vocab file, BPE part not run\n");
        return;
    }
    char path[1200];
    snprintf(path, sizeof path, "%s/ggml-vocab-gpt-2.gguf", vocab_files_dir());
    assert_int_equal(model_gguf_open(path, &g, err, sizeof err), 0);
    assert_int_equal(model_random_write("tiny", KERN_F32, 3, g, dst, err, sizeof err), 0);
    model_gguf_close(g);
    assert_int_equal(model_load(dst, be, &m, err, sizeof err), 0);
    assert_int_equal(model_hparams(m)->n_vocab, model_vocab_n_tokens(v));
    assert_string_equal(model_tokenizer_name(m), "gpt2-bpe:gpt-2");
    const char text[] = "The grass is green. The sky is blue. 12345 tokens, caf\xc3\xa9!";
    int32_t want[64], got[64];
    size_t nw, ng;
    assert_int_equal(model_vocab_tokenize(v, text, sizeof text - 1, 0, want, 64, &nw), 0);
    assert_int_equal(model_tokenize(m, text, sizeof text - 1, false, got, 64, &ng), 0);
    assert_int_equal(ng, nw);
    assert_memory_equal(got, want, nw * sizeof *want);
    assert_true(nw < sizeof text / 2); /* merged, not bytes */
    model_free(m);
    model_vocab_free(v);
}

/* ---- bad models: built with the writer, each refused with a message ------ */

typedef struct bad_model {
    const char *name;
    const char *arch;
    uint32_t block_count;
    uint32_t head_count_kv;
    bool drop_tensor; /* omit blk.0.ffn_up.weight */
    bool bad_shape;   /* blk.0.attn_k.weight with the wrong rows */
    bool merges;      /* gpt2 tokenizer with a merge of unknown tokens */
    bool spm;         /* llama (SentencePiece) tokenizer without scores */
    uint32_t q_type;  /* weight type of attn_q */
    bool extra_layer; /* tensors for one more layer than block_count */
    bool no_eps;
    const char *expect; /* substring of the error */
    int rc;
} bad_model_t;

static int
write_model(const char *path, const bad_model_t *b)
{
    const uint32_t d = 64, nh = 4, ff = 96, nv = 260, layers = 2;
    uint32_t kvh = b->head_count_kv ? b->head_count_kv : 2;
    uint32_t hd = d / nh;
    model_gguf_writer_t *w;
    int rc = model_gguf_writer_new(&w);
    if (rc)
        return rc;
    const char *arch = b->arch ? b->arch : "llama";
    char key[96];
#define K(s) (snprintf(key, sizeof key, "%s." s, arch), key)
    model_gguf_writer_set_str(w, "general.architecture", arch);
    model_gguf_writer_set_u32(w, K("embedding_length"), d);
    model_gguf_writer_set_u32(w, K("block_count"), b->block_count ? b->block_count : layers);
    model_gguf_writer_set_u32(w, K("attention.head_count"), nh);
    model_gguf_writer_set_u32(w, K("attention.head_count_kv"), kvh);
    model_gguf_writer_set_u32(w, K("feed_forward_length"), ff);
    model_gguf_writer_set_u32(w, K("context_length"), 128);
    if (!b->no_eps)
        model_gguf_writer_set_f32(w, K("attention.layer_norm_rms_epsilon"), 1e-5f);
#undef K
    if (b->merges || b->spm) {
        static char store[260][4];
        const char *toks[260];
        size_t lens[260];
        for (int i = 0; i < 260; i++) {
            snprintf(store[i], sizeof store[i], "%c%c", 'a' + i % 26, 'a' + i / 26);
            toks[i] = store[i];
            lens[i] = 2;
        }
        model_gguf_writer_set_str(w, "tokenizer.ggml.model", b->spm ? "llama" : "gpt2");
        model_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, lens, 260);
        const char *mg[1] = {"a b"};
        size_t ml[1] = {3};
        if (b->merges)
            model_gguf_writer_set_arr_str(w, "tokenizer.ggml.merges", mg, ml, 1);
    }
    uint32_t n_layers_written = layers + (b->extra_layer ? 1 : 0);
    typedef struct {
        char name[64];
        uint64_t ne[2];
        uint32_t nd, type;
    } tinfo_t;
    tinfo_t ts[64];
    uint32_t n = 0;
#define T(nm, c, r, ty)                                                    \
    (snprintf(ts[n].name, 64, "%s", nm), ts[n].ne[0] = c, ts[n].ne[1] = r, \
     ts[n].nd = r > 1 ? 2 : 1, ts[n].type = ty, n++)
    T("token_embd.weight", d, nv, KERN_F32);
    T("output_norm.weight", d, 1, KERN_F32);
    for (uint32_t l = 0; l < n_layers_written; l++) {
        char nm[64];
#define L(s) (snprintf(nm, 64, "blk.%u." s, l), nm)
        T(L("attn_norm.weight"), d, 1, KERN_F32);
        T(L("attn_q.weight"), d, nh * hd, b->q_type && l == 0 ? b->q_type : KERN_F32);
        T(L("attn_k.weight"), d, kvh * hd + (b->bad_shape && l == 0 ? 1 : 0), KERN_F32);
        T(L("attn_v.weight"), d, kvh * hd, KERN_F32);
        T(L("attn_output.weight"), nh * hd, d, KERN_F32);
        T(L("ffn_norm.weight"), d, 1, KERN_F32);
        T(L("ffn_gate.weight"), d, ff, KERN_F32);
        if (!(b->drop_tensor && l == 0))
            T(L("ffn_up.weight"), d, ff, KERN_F32);
        T(L("ffn_down.weight"), ff, d, KERN_F32);
#undef L
    }
#undef T
    for (uint32_t i = 0; i < n && rc == 0; i++)
        rc = model_gguf_writer_add_tensor(w, ts[i].name, ts[i].nd, ts[i].ne, ts[i].type);
    if (rc == 0)
        rc = model_gguf_writer_begin(w, path);
    for (uint32_t i = 0; i < n && rc == 0; i++) {
        size_t bytes = kern_row_bytes(ts[i].type, ts[i].ne[0]) * ts[i].ne[1];
        void *z = calloc(1, bytes);
        rc = model_gguf_writer_write(w, z, bytes);
        free(z);
    }
    if (rc == 0)
        rc = model_gguf_writer_finish(w);
    model_gguf_writer_free(w);
    return rc;
}

static void
test_bad_models(void **state)
{
    (void)state;
    const bad_model_t cases[] = {
        {.name = "ok", .rc = 0},
        {.name = "too many layers",
         .block_count = 100000,
         .expect = "block_count",
         .rc = KVS_EFORMAT},
        {.name = "more layers than tensors",
         .block_count = 3,
         .expect = "blk.2.",
         .rc = KVS_EFORMAT},
        {.name = "fewer layers than tensors",
         .extra_layer = true,
         .expect = "blk.2.",
         .rc = KVS_EFORMAT},
        {.name = "arch", .arch = "mamba", .expect = "mamba", .rc = KVS_ENOTSUP},
        {.name = "kv heads", .head_count_kv = 3, .expect = "head_count", .rc = KVS_EFORMAT},
        {.name = "missing tensor",
         .drop_tensor = true,
         .expect = "blk.0.ffn_up.weight",
         .rc = KVS_EFORMAT},
        {.name = "bad shape",
         .bad_shape = true,
         .expect = "blk.0.attn_k.weight",
         .rc = KVS_EFORMAT},
        /* Its one merge "a b" names tokens the vocabulary does not have. */
        {.name = "merges", .merges = true, .expect = "merges", .rc = KVS_EFORMAT},
        {.name = "spm", .spm = true, .rc = 0},
        {.name = "q4_1 weights",
         .q_type = KERN_Q4_1,
         .expect = "blk.0.attn_q.weight",
         .rc = KVS_ENOTSUP},
        {.name = "no eps", .no_eps = true, .expect = "layer_norm_rms_epsilon", .rc = KVS_EFORMAT},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        char p[300], err[512] = "";
        path_of(p, sizeof p, "bad.gguf");
        assert_int_equal(write_model(p, &cases[i]), 0);
        model_t *m = NULL;
        int rc = model_load(p, be, &m, err, sizeof err);
        if (rc != cases[i].rc || (cases[i].expect && !strstr(err, cases[i].expect))) {
            fprintf(stderr, "case '%s': rc %d (%s), err '%s'\n", cases[i].name, rc,
                    kvs_err_name(rc), err);
            fail();
        }
        if (rc == 0)
            model_free(m);
        else
            assert_null(m);
    }
    char err[256] = "";
    model_t *m;
    assert_int_not_equal(model_load("/nonexistent/x.gguf", be, &m, err, sizeof err), 0);
    assert_true(strlen(err) > 0);
}

/* ---- sampler --------------------------------------------------------------- */

/* model_logprobs against a double log-softmax over Llama 3's vocabulary
 * size, with ties, a ruled-out token (-inf) and a spread wide enough that
 * a naive exp-sum would overflow. */
/* A NaN logit (a broken row) is never drawn and weighs nothing: draws
 * and log-probabilities are those of the row without it, at any top_p and
 * top_k, and the alternatives list it last. */
static void
test_nan_logit(void **state)
{
    (void)state;
    enum { N = 100 };
    float x[N];
    for (int i = 0; i < N; i++)
        x[i] = i == 10 ? 3.0f : (float)(i % 7) * 0.1f;
    x[50] = NAN;
    x[99] = NAN;
    static const float top_p[] = {1.0f, 0.9f, 0.5f};
    for (size_t t = 0; t < 3 * 2; t++) {
        model_sampling_t c = {
            .temperature = 1.0f, .top_p = top_p[t % 3], .top_k = t / 3 ? 5 : 0, .seed = 7};
        model_sampler_t *s;
        assert_int_equal(model_sampler_new(&c, N, &s), 0);
        for (int k = 0; k < 2000; k++) {
            int32_t id = model_sampler_sample(s, x);
            assert_true(id >= 0 && id != 50 && id != 99);
        }
        model_sampler_free(s);
    }
    float lp, lps[N];
    int32_t ids[N];
    assert_int_equal(model_logprobs(x, N, 10, N, &lp, ids, lps), N);
    assert_true(isfinite(lp) && lp < 0.0f);
    assert_int_equal(ids[0], 10);
    assert_true(isfinite(lps[N - 3]));
    assert_true((ids[N - 2] == 50 && ids[N - 1] == 99));
}

static void
test_logprobs(void **state)
{
    (void)state;
    enum { V = 128256 };
    float *x = malloc(V * sizeof *x);
    assert_non_null(x);
    uint64_t r = 12345;
    for (uint32_t i = 0; i < V; i++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((int64_t)(r >> 33) % 4000) / 100.0f; /* 0 .. 40 */
    }
    x[77] = x[78] = 95.0f; /* tied best: ids in order */
    x[5] = 94.0f;
    x[6] = -INFINITY;
    double mx = 95.0, sum = 0.0;
    for (uint32_t i = 0; i < V; i++)
        sum += exp((double)x[i] - mx);
    double lse = mx + log(sum);
    float lp, top_lps[4];
    int32_t top[4];
    assert_int_equal(model_logprobs(x, V, 5, 4, &lp, top, top_lps), 4);
    assert_float_equal(lp, 94.0 - lse, 1e-6);
    assert_int_equal(top[0], 77);
    assert_int_equal(top[1], 78);
    assert_int_equal(top[2], 5);
    assert_float_equal(top_lps[0], 95.0 - lse, 1e-6);
    assert_float_equal(top_lps[1], top_lps[0], 0.0);
    assert_float_equal(top_lps[2], 94.0 - lse, 1e-6);
    assert_true(top_lps[3] < top_lps[2]);
    assert_true(x[top[3]] <= 40.0f);
    assert_int_equal(model_logprobs(x, V, 6, 0, &lp, NULL, NULL), 0);
    assert_true(isinf(lp) && lp < 0);
    assert_int_equal(model_logprobs(x, V, V, 1, &lp, top, top_lps), KVS_EINVAL);
    assert_int_equal(model_logprobs(x, V, -1, 1, &lp, top, top_lps), KVS_EINVAL);
    /* More alternatives than tokens: every token, in order. */
    float two[2] = {-1.0f, 3.0f};
    assert_int_equal(model_logprobs(two, 2, 0, 4, &lp, top, top_lps), 2);
    assert_int_equal(top[0], 1);
    assert_int_equal(top[1], 0);
    assert_float_equal(expf(top_lps[0]) + expf(top_lps[1]), 1.0, 1e-6);
    free(x);
}

static void
test_sampler(void **state)
{
    (void)state;
    float logits[8] = {0.1f, 2.0f, -1.0f, 1.9f, 0.0f, 1.0f, -3.0f, 0.5f};
    model_sampler_t *s;
    model_sampling_t greedy = {.temperature = 0.0f, .top_p = 1.0f};
    assert_int_equal(model_sampler_new(&greedy, 8, &s), 0);
    assert_int_equal(model_sampler_sample(s, logits), 1);
    model_sampler_free(s);

    /* top-k 1, tiny top-p and min-p 1 all reduce to greedy. */
    model_sampling_t k1 = {.temperature = 1.0f, .top_k = 1, .top_p = 1.0f, .seed = 3};
    model_sampling_t p0 = {.temperature = 1.0f, .top_p = 1e-6f, .seed = 3};
    model_sampling_t m1 = {.temperature = 1.0f, .top_p = 1.0f, .min_p = 1.0f, .seed = 3};
    const model_sampling_t *g[3] = {&k1, &p0, &m1};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(model_sampler_new(g[i], 8, &s), 0);
        for (int r = 0; r < 50; r++)
            assert_int_equal(model_sampler_sample(s, logits), 1);
        model_sampler_free(s);
    }

    /* Same seed, same tokens; another seed, another sequence. */
    model_sampling_t t1 = {.temperature = 1.0f, .top_p = 1.0f, .seed = 42};
    int32_t a[64], b[64], c[64];
    model_sampler_t *sa, *sb, *sc;
    assert_int_equal(model_sampler_new(&t1, 8, &sa), 0);
    assert_int_equal(model_sampler_new(&t1, 8, &sb), 0);
    t1.seed = 43;
    assert_int_equal(model_sampler_new(&t1, 8, &sc), 0);
    for (int i = 0; i < 64; i++) {
        a[i] = model_sampler_sample(sa, logits);
        b[i] = model_sampler_sample(sb, logits);
        c[i] = model_sampler_sample(sc, logits);
    }
    assert_memory_equal(a, b, sizeof a);
    assert_memory_not_equal(a, c, sizeof a);
    model_sampler_free(sa);
    model_sampler_free(sb);
    model_sampler_free(sc);

    /* Frequencies follow softmax(logits / T); top-k 3 keeps only the best 3. */
    model_sampling_t t2 = {.temperature = 0.7f, .top_k = 3, .top_p = 1.0f, .seed = 5};
    assert_int_equal(model_sampler_new(&t2, 8, &s), 0);
    int count[8] = {0};
    const int N = 40000;
    for (int i = 0; i < N; i++)
        count[model_sampler_sample(s, logits)]++;
    double z = exp(2.0 / 0.7) + exp(1.9 / 0.7) + exp(1.0 / 0.7);
    assert_true(fabs(count[1] / (double)N - exp(2.0 / 0.7) / z) < 0.01);
    assert_true(fabs(count[3] / (double)N - exp(1.9 / 0.7) / z) < 0.01);
    assert_true(fabs(count[5] / (double)N - exp(1.0 / 0.7) / z) < 0.01);
    assert_int_equal(count[0] + count[2] + count[4] + count[6] + count[7], 0);
    model_sampler_free(s);

    /* top-p 0.6 over probs ~{0.41, 0.37, ...}: keeps exactly tokens 1 and 3. */
    model_sampling_t t3 = {.temperature = 1.0f, .top_p = 0.6f, .seed = 9};
    assert_int_equal(model_sampler_new(&t3, 8, &s), 0);
    for (int i = 0; i < 2000; i++) {
        int32_t t = model_sampler_sample(s, logits);
        assert_true(t == 1 || t == 3);
    }
    model_sampler_free(s);

    model_sampling_t bad[] = {
        {.temperature = -1.0f, .top_p = 1.0f},
        {.temperature = 1.0f, .top_p = 0.0f},
        {.temperature = 1.0f, .top_p = 1.0f, .min_p = 2.0f},
        {.temperature = 1.0f, .top_p = 1.0f, .top_k = -1},
    };
    for (size_t i = 0; i < 4; i++)
        assert_int_equal(model_sampler_new(&bad[i], 8, &s), KVS_EINVAL);
}

/* The distribution test_spec_sampling's samplers draw from, written out:
 * softmax(x / T), the top_k best, then the smallest most likely set
 * holding top_p of their mass, renormalised; ids with allow[i] == 0 out. */
static void
ref_dist(const float *x, int n, float t, int top_k, float top_p, const int *allow, double *p)
{
    int order[16];
    double w[16], total = 0.0;
    for (int i = 0; i < n; i++) {
        w[i] = allow && !allow[i] ? 0.0 : exp(x[i] / t);
        order[i] = i;
    }
    for (int i = 0; i < n; i++) /* by weight, descending */
        for (int j = i + 1; j < n; j++)
            if (w[order[j]] > w[order[i]]) {
                int tmp = order[i];
                order[i] = order[j];
                order[j] = tmp;
            }
    int keep = top_k > 0 && top_k < n ? top_k : n;
    for (int i = 0; i < keep; i++)
        total += w[order[i]];
    double acc = 0.0;
    int k = 0;
    while (k < keep && acc < top_p * total)
        acc += w[order[k++]];
    for (int i = 0; i < n; i++)
        p[i] = 0.0;
    for (int i = 0; i < k; i++)
        p[order[i]] = w[order[i]] / acc;
}

/* Speculative sampling: whatever the draft's distribution q, the tokens
 * verify returns follow the target's p (checked against p written out,
 * where always keeping the proposal would follow q, far from it), and a
 * proposal stays about sum(min(p, q)) of the time; with q == p every one
 * stays; at temperature 0 the greedy token comes back. */
static void
test_spec_sampling(void **state)
{
    (void)state;
    enum { V = 8 };
    const float pl[V] = {0.1f, 2.0f, -1.0f, 1.9f, 0.0f, 1.0f, -3.0f, 0.5f};
    const float ql[V] = {1.5f, 0.2f, 0.3f, 1.8f, 1.0f, -0.5f, 0.4f, 0.0f};
    model_sampling_t tc = {.temperature = 0.8f, .top_k = 6, .top_p = 0.95f, .seed = 11};
    model_sampling_t dc = {.temperature = 1.0f, .top_p = 1.0f, .seed = 12};
    int allow_all[V] = {1, 1, 1, 1, 1, 1, 1, 1}, allow_some[V] = {1, 0, 1, 1, 1, 1, 0, 1};
    uint64_t bits = 0;
    for (int i = 0; i < V; i++)
        bits |= (uint64_t)allow_some[i] << i;
    for (int masked = 0; masked < 2; masked++) {
        model_sampler_t *t, *d;
        assert_int_equal(model_sampler_new(&tc, V, &t), 0);
        assert_int_equal(model_sampler_new(&dc, V, &d), 0);
        double p[V], qd[V], same = 0.0;
        ref_dist(pl, V, tc.temperature, tc.top_k, tc.top_p, masked ? allow_some : allow_all, p);
        ref_dist(ql, V, dc.temperature, 0, 1.0f, NULL, qd);
        for (int i = 0; i < V; i++)
            same += fmin(p[i], qd[i]);
        int count[V] = {0}, kept = 0;
        const int N = 40000;
        float q[V];
        for (int i = 0; i < N; i++) {
            int32_t x = model_sampler_propose(d, ql, q);
            assert_true(x >= 0 && x < V && q[x] > 0.0f);
            int32_t y = model_sampler_verify(t, pl, masked ? &bits : NULL, x, q);
            assert_true(y >= 0 && y < V);
            count[y]++;
            kept += y == x;
        }
        double far = 0.0;
        for (int i = 0; i < V; i++) {
            assert_float_equal(q[i], qd[i], 1e-6);
            assert_true(fabs(count[i] / (double)N - p[i]) < 0.01);
            if (p[i] == 0.0)
                assert_int_equal(count[i], 0);
            far = fmax(far, fabs(qd[i] - p[i]));
        }
        assert_true(far > 0.1); /* keeping every proposal would fail above */
        assert_true(fabs(kept / (double)N - same) < 0.01);
        assert_true(same < 0.8);
        model_sampler_free(t);
        model_sampler_free(d);
    }

    /* q == p: every proposal stays. */
    model_sampler_t *t, *d;
    model_sampling_t dc2 = tc;
    dc2.seed = 99;
    assert_int_equal(model_sampler_new(&tc, V, &t), 0);
    assert_int_equal(model_sampler_new(&dc2, V, &d), 0);
    float q[V];
    for (int i = 0; i < 2000; i++) {
        int32_t x = model_sampler_propose(d, pl, q);
        assert_int_equal(model_sampler_verify(t, pl, NULL, x, q), x);
    }
    model_sampler_free(t);
    model_sampler_free(d);

    /* Temperature 0 on both sides: q one hot, the greedy token back. */
    model_sampling_t g = {.temperature = 0.0f, .top_p = 1.0f};
    assert_int_equal(model_sampler_new(&g, V, &t), 0);
    assert_int_equal(model_sampler_propose(t, ql, q), 3);
    for (int i = 0; i < V; i++)
        assert_float_equal(q[i], i == 3 ? 1.0f : 0.0f, 0.0f);
    assert_int_equal(model_sampler_verify(t, pl, NULL, 3, q), 1);
    assert_int_equal(model_sampler_verify(t, pl, NULL, 1, q), 1);
    assert_int_equal(model_sampler_verify(t, pl, &bits, 3, q), 3); /* 1 masked out */
    model_sampler_free(t);

    /* predict: the draws to come, from the same row, without moving the
     * generator; at temperature 0 the best id. */
    model_sampling_t pc[3] = {{.temperature = 1.0f, .top_p = 0.9f, .seed = 5},
                              {.temperature = 0.8f, .top_k = 4, .top_p = 1.0f, .seed = 6},
                              {.temperature = 1.2f, .top_p = 1.0f, .min_p = 0.05f, .seed = 7}};
    for (int c = 0; c < 3; c++) {
        assert_int_equal(model_sampler_new(&pc[c], V, &t), 0);
        for (int round = 0; round < 50; round++) {
            int32_t want[6];
            for (uint32_t a = 0; a < 6; a++)
                want[a] = model_sampler_predict(t, pl, a);
            assert_int_equal(model_sampler_predict(t, pl, 0), want[0]);
            for (int a = 0; a < 6; a++)
                assert_int_equal(model_sampler_sample(t, pl), want[a]);
        }
        model_sampler_free(t);
    }
    assert_int_equal(model_sampler_new(&g, V, &t), 0);
    assert_int_equal(model_sampler_predict(t, ql, 3), 3);
    model_sampler_free(t);

    /* Nothing left to draw. */
    uint64_t none = 0;
    assert_int_equal(model_sampler_new(&tc, V, &t), 0);
    assert_int_equal(model_sampler_verify(t, pl, &none, 1, q), KVS_EINVAL);
    model_sampler_free(t);
}

/* vLLM's penalties: repetition over the prompt and the output (divide a
 * positive logit, multiply a negative one), then frequency per output
 * occurrence and presence once; each checked by the greedy choice it
 * flips, and by the tempered path (top-k 1) agreeing. */
static void
test_penalties(void **state)
{
    (void)state;
    /*                 0     1     2     3     4     5 */
    float x[6] = {0.0f, 3.0f, 2.9f, 2.0f, -1.0f, 1.0f};
    model_sampler_t *s, *t;
    model_sampling_t rep = {.top_p = 1.0f, .repetition_penalty = 2.0f};
    assert_int_equal(model_sampler_new(&rep, 6, &s), 0);
    assert_int_equal(model_sampler_sample(s, x), 1); /* nothing seen yet */
    int32_t prompt[2] = {1, 99};                     /* 99: outside, ignored */
    model_sampler_prompt(s, prompt, 2);
    assert_int_equal(model_sampler_sample(s, x), 2); /* 3.0 / 2 = 1.5 < 2.9 */
    model_sampler_accept(s, 2);
    assert_int_equal(model_sampler_sample(s, x), 3); /* 2.9 / 2 = 1.45 < 2.0 */
    model_sampler_free(s);
    /* A negative logit is multiplied: token 4 falls below token 0's 0. */
    float neg[3] = {-0.6f, -0.5f, -2.0f};
    assert_int_equal(model_sampler_new(&rep, 3, &s), 0);
    model_sampler_accept(s, 1);
    assert_int_equal(model_sampler_sample(s, neg), 0); /* -0.5 * 2 = -1 < -0.6 */
    model_sampler_free(s);

    /* Frequency 0.6 per occurrence, presence 0.2 once; the prompt does not
     * count for them. */
    model_sampling_t fp = {.top_p = 1.0f, .frequency_penalty = 0.6f, .presence_penalty = 0.2f};
    model_sampling_t fp_t = fp;
    fp_t.temperature = 1.0f;
    fp_t.top_k = 1;
    assert_int_equal(model_sampler_new(&fp, 6, &s), 0);
    assert_int_equal(model_sampler_new(&fp_t, 6, &t), 0);
    model_sampler_prompt(s, prompt, 1);
    model_sampler_prompt(t, prompt, 1);
    assert_int_equal(model_sampler_sample(s, x), 1);
    model_sampler_accept(s, 1);
    model_sampler_accept(t, 1);
    assert_int_equal(model_sampler_sample(s, x), 2); /* 3.0 - 0.8 = 2.2 < 2.9 */
    assert_int_equal(model_sampler_sample(t, x), 2);
    model_sampler_accept(s, 2);
    model_sampler_accept(t, 2);
    assert_int_equal(model_sampler_sample(s, x), 1); /* 2.2 > 2.1 and 2.0 */
    assert_int_equal(model_sampler_sample(t, x), 1);
    model_sampler_accept(s, 1);
    model_sampler_accept(t, 1);
    assert_int_equal(model_sampler_sample(s, x), 2); /* 1: 3.0 - 1.4 = 1.6; 2: 2.1 */
    assert_int_equal(model_sampler_sample(t, x), 2);
    model_sampler_free(s);
    model_sampler_free(t);

    /* Off: 0 or 1 repetition, 0 presence and frequency, whatever is fed. */
    model_sampling_t off = {.top_p = 1.0f, .repetition_penalty = 1.0f};
    assert_int_equal(model_sampler_new(&off, 6, &s), 0);
    model_sampler_prompt(s, prompt, 1);
    model_sampler_accept(s, 1);
    assert_int_equal(model_sampler_sample(s, x), 1);
    model_sampler_free(s);

    model_sampling_t bad[] = {
        {.top_p = 1.0f, .repetition_penalty = -1.0f},    {.top_p = 1.0f, .repetition_penalty = NAN},
        {.top_p = 1.0f, .repetition_penalty = INFINITY}, {.top_p = 1.0f, .presence_penalty = 2.5f},
        {.top_p = 1.0f, .frequency_penalty = -3.0f},     {.top_p = 1.0f, .frequency_penalty = NAN},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(model_sampler_new(&bad[i], 6, &s), KVS_EINVAL);
}

/* The masked draw is the draw over the row with the masked-out ids at
 * -inf, token for token from the same seed, under every filter (greedy,
 * temperature, top-k below and above what the mask keeps, top-p, min-p,
 * penalties, bias, allowed ids) and masks from dense to one id; a mask
 * with nothing set, or nothing finite, draws nothing. */
static void
test_sampler_masked(void **state)
{
    (void)state;
    enum { NV = 1000, WORDS = (NV + 63) / 64, STEPS = 60 };
    static float x[NV], masked[NV];
    static uint64_t bits[WORDS];
    int32_t bias_ids[2] = {7, 500}, allowed[6] = {3, 7, 64, 65, 500, 999};
    float bias[2] = {2.0f, -1.5f};
    const model_sampling_t cfgs[] = {
        {.top_p = 1.0f},
        {.temperature = 1.0f, .top_p = 1.0f, .seed = 1},
        {.temperature = 0.7f, .top_k = 5, .top_p = 1.0f, .seed = 2},
        {.temperature = 1.3f, .top_k = 400, .top_p = 1.0f, .seed = 3},
        {.temperature = 1.0f, .top_p = 0.8f, .seed = 4},
        {.temperature = 0.9f, .top_p = 1.0f, .min_p = 0.05f, .seed = 5},
        {.temperature = 1.0f, .top_k = 40, .top_p = 0.9f, .min_p = 0.01f, .seed = 6},
        {.temperature = 1.0f,
         .top_p = 1.0f,
         .seed = 7,
         .repetition_penalty = 1.3f,
         .presence_penalty = 0.5f,
         .frequency_penalty = 0.4f,
         .bias_ids = bias_ids,
         .bias = bias,
         .n_bias = 2},
        {.temperature = 1.0f, .top_p = 1.0f, .seed = 8, .allowed = allowed, .n_allowed = 6},
    };
    uint64_t r = 12345;
    uint32_t draws = 0, differ = 0;
    for (size_t c = 0; c < sizeof cfgs / sizeof cfgs[0]; c++) {
        for (int density = 0; density < 4; density++) {
            model_sampler_t *a, *b;
            assert_int_equal(model_sampler_new(&cfgs[c], NV, &a), 0);
            assert_int_equal(model_sampler_new(&cfgs[c], NV, &b), 0);
            int32_t prompt[3] = {7, 64, 900};
            assert_int_equal(model_sampler_prompt(a, prompt, 3), 0);
            assert_int_equal(model_sampler_prompt(b, prompt, 3), 0);
            for (int step = 0; step < STEPS; step++) {
                for (uint32_t i = 0; i < NV; i++) {
                    r = r * 6364136223846793005ull + 1442695040888963407ull;
                    /* Ties on purpose: logits in tenths. */
                    x[i] = (float)((r >> 33) % 80) * 0.1f - 4.0f;
                    uint32_t keep = (uint32_t)(r >> 20) % 64;
                    bool in = density == 0   ? keep < 60
                              : density == 1 ? keep < 8
                              : density == 2 ? keep == 0
                                             : i == (uint32_t)(step * 37) % NV;
                    if (in)
                        bits[i >> 6] |= 1ull << (i & 63);
                    else
                        bits[i >> 6] &= ~(1ull << (i & 63));
                    masked[i] = in ? x[i] : -INFINITY;
                }
                int32_t ta = model_sampler_sample_masked(a, x, bits);
                int32_t tb = model_sampler_sample(b, masked);
                if (ta != tb)
                    fail_msg("config %zu, density %d, step %d: masked %d, row %d", c, density, step,
                             ta, tb);
                draws++;
                if (ta >= 0) {
                    assert_true(bits[ta >> 6] >> (ta & 63) & 1);
                    assert_int_equal(model_sampler_accept(a, ta), 0);
                    assert_int_equal(model_sampler_accept(b, tb), 0);
                } else {
                    differ++; /* nothing to draw: allowed ids outside the mask */
                    assert_int_equal(ta, KVS_EINVAL);
                }
            }
            model_sampler_free(a);
            model_sampler_free(b);
        }
    }
    assert_true(differ < draws / 4);
    memset(bits, 0, sizeof bits);
    model_sampler_t *a;
    assert_int_equal(model_sampler_new(&cfgs[1], NV, &a), 0);
    assert_int_equal(model_sampler_sample_masked(a, x, bits), KVS_EINVAL);
    bits[0] = 1;
    x[0] = -INFINITY;
    assert_int_equal(model_sampler_sample_masked(a, x, bits), KVS_EINVAL);
    x[0] = NAN;
    assert_int_equal(model_sampler_sample_masked(a, x, bits), KVS_EINVAL);
    model_sampler_free(a);
}

/* OpenAI's logit bias: added to the model's logits (repeated ids sum)
 * before the penalties, on the greedy and the tempered paths; copied, so
 * the caller's arrays may go; out-of-range ids and biases refused.  And
 * vLLM's allowed_token_ids, which the bias works within. */
static void
test_logit_bias(void **state)
{
    (void)state;
    /*                 0     1     2     3 */
    float x[4] = {0.0f, 3.0f, 2.9f, 2.0f};
    int32_t ids[3] = {3, 1, 3};
    float bias[3] = {0.5f, -1.0f, 0.6f};
    model_sampling_t c = {.top_p = 1.0f, .bias_ids = ids, .bias = bias, .n_bias = 3};
    model_sampling_t ct = c;
    ct.temperature = 1.0f;
    ct.top_k = 1;
    model_sampler_t *s, *t;
    assert_int_equal(model_sampler_new(&c, 4, &s), 0);
    assert_int_equal(model_sampler_new(&ct, 4, &t), 0);
    ids[0] = ids[2] = 0; /* the sampler kept its own copy */
    /* 1: 3.0 - 1 = 2.0; 3: 2.0 + 1.1 = 3.1 > 2.9 */
    assert_int_equal(model_sampler_sample(s, x), 3);
    assert_int_equal(model_sampler_sample(t, x), 3);
    const model_sampling_t *kept = model_sampler_cfg(s);
    assert_int_equal(kept->n_bias, 3);
    assert_int_equal(kept->bias_ids[0], 3);
    model_sampler_t *u;
    assert_int_equal(model_sampler_new(kept, 4, &u), 0);
    assert_int_equal(model_sampler_sample(u, x), 3);
    model_sampler_free(u);
    model_sampler_free(s);
    model_sampler_free(t);

    /* Before the penalties: a biased token already out pays its
     * frequency penalty on the biased logit. */
    ids[0] = 2;
    bias[0] = 1.0f; /* 2: 3.9 */
    model_sampling_t fp = {
        .top_p = 1.0f, .frequency_penalty = 2.0f, .bias_ids = ids, .bias = bias, .n_bias = 1};
    assert_int_equal(model_sampler_new(&fp, 4, &s), 0);
    assert_int_equal(model_sampler_sample(s, x), 2);
    model_sampler_accept(s, 2);
    assert_int_equal(model_sampler_sample(s, x), 1); /* 3.9 - 2 = 1.9 < 3.0 */
    model_sampler_free(s);

    /* allowed_token_ids: the best of them, greedy or tempered, whatever
     * the rest; the bias still applies within them. */
    int32_t allow[2] = {0, 3};
    model_sampling_t al = {.top_p = 1.0f, .allowed = allow, .n_allowed = 2};
    model_sampling_t al_t = al;
    al_t.temperature = 1.0f;
    assert_int_equal(model_sampler_new(&al, 4, &s), 0);
    assert_int_equal(model_sampler_new(&al_t, 4, &t), 0);
    allow[1] = 1; /* copied */
    assert_int_equal(model_sampler_sample(s, x), 3);
    for (int k = 0; k < 50; k++) {
        int32_t tok = model_sampler_sample(t, x);
        assert_true(tok == 0 || tok == 3);
    }
    model_sampler_free(s);
    model_sampler_free(t);
    /* Nothing left to draw (the allowed ids' logits all -inf): an error,
     * greedy or tempered, not id 0. */
    float dead[4] = {1.0f, -INFINITY, 2.0f, -INFINITY};
    int32_t only[2] = {1, 3};
    model_sampling_t none = {.top_p = 1.0f, .allowed = only, .n_allowed = 2};
    assert_int_equal(model_sampler_new(&none, 4, &s), 0);
    assert_int_equal(model_sampler_sample(s, dead), KVS_EINVAL);
    model_sampler_free(s);
    none.temperature = 1.0f;
    assert_int_equal(model_sampler_new(&none, 4, &s), 0);
    assert_int_equal(model_sampler_sample(s, dead), KVS_EINVAL);
    model_sampler_free(s);
    allow[1] = 3;
    float up = 2.5f;
    int32_t zero = 0;
    al.bias_ids = &zero;
    al.bias = &up;
    al.n_bias = 1;
    assert_int_equal(model_sampler_new(&al, 4, &s), 0);
    assert_int_equal(model_sampler_sample(s, x), 0); /* 0 + 2.5 > 2.0 */
    model_sampler_free(s);

    int32_t bad_id = 4;
    float big = 100.5f, ok = 1.0f;
    model_sampling_t bad[] = {
        {.top_p = 1.0f, .bias_ids = &bad_id, .bias = &ok, .n_bias = 1},
        {.top_p = 1.0f, .bias_ids = ids, .bias = &big, .n_bias = 1},
        {.top_p = 1.0f, .bias_ids = NULL, .bias = &ok, .n_bias = 1},
        {.top_p = 1.0f, .bias_ids = ids, .bias = &ok, .n_bias = MODEL_MAX_LOGIT_BIAS + 1},
        {.top_p = 1.0f, .allowed = &bad_id, .n_allowed = 1},
        {.top_p = 1.0f, .allowed = NULL, .n_allowed = 1},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        assert_int_equal(model_sampler_new(&bad[i], 4, &s), KVS_EINVAL);
}

/* The ids a choice mask leaves (finite), into ids[]; returns how many.
 * The bitmask for the sampler says the same. */
static uint32_t
choice_allowed(model_choice_t *c, uint32_t nv, int32_t *ids, uint32_t cap)
{
    float *row = calloc(nv, sizeof *row), *out = malloc(nv * sizeof *out);
    assert_non_null(row);
    assert_non_null(out);
    uint32_t n = model_choice_mask(c, row, out), k = 0, n_bits;
    const uint64_t *bits = model_choice_allowed(c, &n_bits);
    assert_non_null(bits);
    assert_int_equal(n_bits, n);
    for (uint32_t i = 0; i < nv; i++) {
        assert_int_equal(!!isfinite(out[i]), (int)(bits[i >> 6] >> (i & 63) & 1));
        if (isfinite(out[i]) && k < cap)
            ids[k++] = (int32_t)i;
    }
    assert_int_equal(k, n);
    free(row);
    free(out);
    return n;
}

/* guided_choice: the mask leaves exactly the tokens that continue a live
 * choice (EOS once one is whole), accepting narrows the choices and says
 * when the output is over; a clone goes on from the same point; bad sets
 * refused.  With a BPE vocabulary a choice can be spelled by whole words
 * or by pieces of them. */
static void
test_guided_choice(void **state)
{
    (void)state;
    char p[300], err[256];
    path_of(p, sizeof p, "choice.gguf");
    assert_int_equal(model_random_write("tiny", KERN_F32, 1, NULL, p, err, sizeof err), 0);
    model_t *m;
    assert_int_equal(model_load(p, be, &m, err, sizeof err), 0);
    const uint32_t nv = model_hparams(m)->n_vocab;
    const char *choices[3] = {"ab", "abc", "x"};
    model_choice_t *c, *d;
    assert_int_equal(model_choice_new(m, choices, 3, &c), 0);
    int32_t ids[300];
    assert_int_equal(choice_allowed(c, nv, ids, 300), 2);
    assert_int_equal(ids[0], 'a');
    assert_int_equal(ids[1], 'x');
    assert_int_equal(model_choice_accept(c, 'b'), KVS_EINVAL); /* not allowed */
    assert_int_equal(model_choice_accept(c, 'a'), 0);
    assert_int_equal(choice_allowed(c, nv, ids, 300), 1);
    assert_int_equal(model_choice_accept(c, 'b'), 0); /* "ab" whole, "abc" goes on */
    assert_int_equal(choice_allowed(c, nv, ids, 300), 2);
    assert_int_equal(ids[0], 'c');
    assert_true(model_token_is_eog(m, ids[1]));
    assert_int_equal(model_choice_clone(c, &d), 0);
    assert_int_equal(model_choice_accept(c, 'c'), 1);    /* "abc": over */
    assert_int_equal(model_choice_accept(d, ids[1]), 1); /* EOS after "ab": over */
    model_choice_free(c);
    model_choice_free(d);
    assert_int_equal(model_choice_new(m, choices, 3, &c), 0);
    assert_int_equal(model_choice_accept(c, 'x'), 1);
    model_choice_free(c);

    const char *empty[1] = {""}, *many[MODEL_MAX_CHOICES + 1];
    for (int i = 0; i <= MODEL_MAX_CHOICES; i++)
        many[i] = "y";
    assert_int_equal(model_choice_new(m, empty, 1, &c), KVS_EINVAL);
    assert_int_equal(model_choice_new(m, choices, 0, &c), KVS_EINVAL);
    assert_int_equal(model_choice_new(m, many, MODEL_MAX_CHOICES + 1, &c), KVS_EINVAL);
    model_free(m);

    char path[1200];
    snprintf(path, sizeof path, "%s/ggml-vocab-gpt-2.gguf", vocab_files_dir());
    model_gguf_t *g;
    if (!vocab_files_exists(path)) {
        fprintf(stderr, "note: no gpt-2 vocab file, BPE part not run\n");
        return;
    }
    assert_int_equal(model_gguf_open(path, &g, err, sizeof err), 0);
    assert_int_equal(model_random_write("tiny", KERN_F32, 3, g, p, err, sizeof err), 0);
    model_gguf_close(g);
    assert_int_equal(model_load(p, be, &m, err, sizeof err), 0);
    const char *words[2] = {"Hello world", "Help"};
    int32_t hello, h, world;
    size_t n;
    assert_int_equal(model_tokenize(m, "Hello", 5, false, &hello, 1, &n), 0);
    assert_int_equal(model_tokenize(m, "H", 1, false, &h, 1, &n), 0);
    assert_int_equal(model_tokenize(m, " world", 6, false, &world, 1, &n), 0);
    assert_int_equal(model_choice_new(m, words, 2, &c), 0);
    static int32_t big[60000];
    uint32_t k = choice_allowed(c, model_hparams(m)->n_vocab, big, 60000);
    bool has_hello = false, has_h = false;
    for (uint32_t i = 0; i < k; i++) {
        has_hello |= big[i] == hello;
        has_h |= big[i] == h;
    }
    assert_true(has_hello && has_h && k > 2);
    assert_int_equal(model_choice_accept(c, hello), 0); /* "Help" is out now */
    assert_int_equal(model_choice_accept(c, world), 1);
    model_choice_free(c);
    model_free(m);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_load_tiny),     cmocka_unit_test(test_tokenizer),
        cmocka_unit_test(test_random_vocab),  cmocka_unit_test(test_bad_models),
        cmocka_unit_test(test_sampler),       cmocka_unit_test(test_sampler_masked),
        cmocka_unit_test(test_logprobs),      cmocka_unit_test(test_nan_logit),
        cmocka_unit_test(test_penalties),     cmocka_unit_test(test_logit_bias),
        cmocka_unit_test(test_spec_sampling), cmocka_unit_test(test_guided_choice),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
