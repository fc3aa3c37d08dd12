/*
 * tests/kernels/test_gpu.c — the "cuda" backend against the "ref" backend
 * at the sizes a GPU runs: matmul at n = 1, 3, 8, 9, 64 and 300 (each side
 * of the GEMV/GEMM switch) over odd and padded shapes, the fused Q/K/V and
 * gate/up/SwiGLU products, get_rows, rmsnorm
 * (alone and fused with the residual add),
 * rope (NORM and NEOX, Llama 3.1 frequency factors, positions up to 128K),
 * swiglu, add, kv_append (repeated slots included), kv_copy, kv_gather
 * (from full-precision and from sealed blocks of every codec),
 * block-sparse's Quest bounds and scores, attention mass (SnapKV, H2O,
 * speculative prefill), Delta's correction, and paged
 * attention for prefill chunks, mixed batches, queries past f16's range,
 * quantized KV blocks and
 * split-KV decode at 40K and 64K tokens; then CUDA graphs (a decode step
 * replayed, kv_copy's plan changing under one key).  ctest: gpu_kernels,
 * label "gpu".
 *
 * Exits 77 (ctest: skipped) with "skipped: no CUDA device" when the cuda
 * backend cannot be created, which is what every machine without an
 * NVIDIA GPU, or a build without CUDA, sees.  ctest gpu_kernels_harness
 * runs the same program with the cpu backend in cuda's place
 * (KVS_TEST_GPU_BACKEND=cpu), so every machine checks the harness's own
 * set-up, though not the kernels.
 *
 * Inputs are drawn fresh every run (the seed is printed; KVS_TEST_SEED
 * repeats one), never zeros.  Every output starts as NaN (kern_memset
 * 0xff) on both backends and must come back finite; the error is
 * max|cuda - ref| / max|ref| against a per-op limit, printed for every
 * check.  Attention, and matmul from n = 64, run twice on the device and
 * must give the same bits: an error that moves between runs is a race.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <math.h>

#include "kernels/kern.h"
#include "tests/kernels/kern_test.h"

#define SKIP 77 /* ctest's SKIP_RETURN_CODE */
#define LABEL "cuda"

static kern_backend_t *g_ref, *g_cuda;
static uint64_t g_seed;

/* A fresh stream per test, derived from the run's seed. */
static void
seed_test(uint64_t k)
{
    rng_seed(g_seed * 1000003u + k);
}

/* Every element finite: a NaN is an output the op never wrote (outputs
 * start as NaN), an inf one it wrote wrongly. */
static void
check_finite(const float *y, size_t n, const char *what)
{
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(y[i])) {
            print_error("%s [" LABEL "]: element %zu of %zu is %g (%s)\n", what, i, n, y[i],
                        isnan(y[i]) ? "never written?" : "overflow");
            fail();
        }
    }
}

static void
check(const float *ref, const float *got, size_t n, double limit, const char *what)
{
    check_finite(ref, n, what); /* the reference too: inputs are never degenerate */
    check_finite(got, n, what);
    check_close(ref, got, n, limit, what, LABEL);
}

static void
check_same_bits(const void *a, const void *b, size_t bytes, const char *what)
{
    if (memcmp(a, b, bytes) != 0) {
        print_error("%s [" LABEL "]: two runs on the same inputs differ (a race?)\n", what);
        fail();
    }
}

/* ------------------------------------------------------------------------ */
/* get_rows, matmul                                                         */
/* ------------------------------------------------------------------------ */

static void
test_get_rows(void **state)
{
    (void)state;
    /* Padding of 2 or 6 leaves Q4_0 and K-quant rows only 2-aligned. */
    static const struct {
        kern_dtype_t type;
        uint32_t rows, cols;
        size_t pad;
    } cases[] = {
        {KERN_F32, 1000, 4097, 0},  {KERN_F16, 1000, 4099, 0},  {KERN_BF16, 1000, 4099, 0},
        {KERN_Q8_0, 1000, 4128, 0}, {KERN_F32, 37, 33, 8},      {KERN_F16, 37, 95, 6},
        {KERN_BF16, 37, 95, 2},     {KERN_Q8_0, 37, 96, 34},    {KERN_Q4_0, 1000, 4128, 0},
        {KERN_Q4_K, 1000, 4096, 0}, {KERN_Q5_K, 1000, 4096, 0}, {KERN_Q6_K, 1000, 4096, 0},
        {KERN_Q4_0, 37, 96, 2},     {KERN_Q4_K, 37, 256, 2},    {KERN_Q5_K, 37, 2304, 6},
        {KERN_Q6_K, 37, 512, 2},
    };
    seed_test(1);
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        kern_dtype_t type = cases[ci].type;
        uint32_t rows = cases[ci].rows, cols = cases[ci].cols, n = 300;
        size_t rb;
        void *w = make_weights(type, rows, cols, cases[ci].pad, &rb);
        int32_t *ids = malloc(n * sizeof(int32_t));
        assert_non_null(ids);
        for (uint32_t i = 0; i < n; i++)
            ids[i] = (int32_t)(rng_u32() % rows); /* repeats included */
        ids[0] = 0;
        ids[n - 1] = (int32_t)rows - 1;
        float *yr = malloc((size_t)n * cols * sizeof(float));
        float *yc = malloc((size_t)n * cols * sizeof(float));
        assert_true(yr && yc);
        run_get_rows(g_ref, type, rows, cols, rb, w, ids, n, yr);
        run_get_rows(g_cuda, type, rows, cols, rb, w, ids, n, yc);
        char what[96];
        snprintf(what, sizeof(what), "get_rows %s %ux%u pad %zu", kern_type_traits(type)->name,
                 rows, cols, cases[ci].pad);
        check(yr, yc, (size_t)n * cols, 0.0, what);
        free(w);
        free(ids);
        free(yr);
        free(yc);
    }
}

/* Uploads W (packed as a model would), x and bias; runs the product
 * `times` times into out[t] from NaN each time. */
static void
run_matmul(kern_backend_t *be, kern_dtype_t type, uint32_t rows, uint32_t cols, size_t rb,
           const void *w_host, const float *x, uint32_t n, const float *bias, float **out,
           int times)
{
    void *wd = put(be, w_host, rb * rows);
    float *xd = put(be, x, (size_t)n * cols * sizeof(float));
    float *bd = bias ? put(be, bias, rows * sizeof(float)) : NULL;
    float *yd = put_out(be, (size_t)n * rows);
    kern_tensor_t w = {.type = type, .n_cols = cols, .n_rows = rows, .row_bytes = rb, .data = wd};
    assert_int_equal(kern_pack_weight(be, &w), 0);
    for (int t = 0; t < times; t++) {
        if (t)
            poison(be, yd, (size_t)n * rows * sizeof(float));
        assert_int_equal(kern_matmul(be, &w, xd, n, bd, yd), 0);
        get(be, out[t], yd, (size_t)n * rows * sizeof(float), "matmul y");
    }
    take(be, NULL, yd, (size_t)n * rows * sizeof(float), "matmul y");
    take(be, NULL, xd, (size_t)n * cols * sizeof(float), "matmul x");
    if (bd)
        take(be, NULL, bd, rows * sizeof(float), "matmul bias");
    take(be, NULL, wd, rb * rows, "matmul w");
}

/* What each weight type's product may differ from the double-precision
 * reference by.  F32 and the GEMV keep x in f32; the tensor-core GEMMs
 * take x in f16 or bf16 (a relative 2^-11 or 2^-8 per element, which
 * random signs shrink by about sqrt(cols) over max|y|); for Q8_0, Q4_0
 * and the K-quants x is rounded to int8 steps on both sides (kern.h), so
 * only the device's own f16 staging of W and x remains. */
static double
matmul_limit(kern_dtype_t type)
{
    switch (type) {
    case KERN_F32:
        return 1e-5;
    case KERN_F16:
        return 5e-3;
    case KERN_BF16:
        return 1e-2;
    default:
        return 5e-3;
    }
}

static void
test_matmul(void **state)
{
    (void)state;
    static const kern_dtype_t types[] = {KERN_F32,  KERN_F16,  KERN_BF16, KERN_Q8_0,
                                         KERN_Q4_0, KERN_Q4_K, KERN_Q5_K, KERN_Q6_K};
    /* Rows neither a multiple of 4 nor of the GEMV's warps per block;
     * padded rows; columns not a multiple of 8 (no 16-byte loads); 2304
     * (9 K-quant super-blocks) with rows left only 2-aligned; the model's
     * 4096 x 4096 for decode-sized n only (the reference is scalar
     * double). */
    static const struct {
        uint32_t rows, cols;
        size_t pad;
        uint32_t max_n;
    } shapes[] = {
        {1031, 1024, 0, 300}, {97, 4128, 34, 300}, {301, 1003, 4, 300},
        {97, 2304, 18, 300},  {4096, 4096, 0, 9},
    };
    static const uint32_t ns[] = {1, 3, 8, 9, 64, 300};
    seed_test(2);
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        kern_dtype_t type = types[ti];
        for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
            uint32_t rows = shapes[si].rows, cols = shapes[si].cols;
            if (kern_row_bytes(type, cols) == 0)
                continue; /* whole blocks: 32 values, 256 for the K-quants */
            size_t pad = shapes[si].pad;
            if (type == KERN_F32 && pad % 4)
                pad += 4 - pad % 4; /* f32 rows must stay 4-aligned */
            size_t rb;
            void *w = make_weights(type, rows, cols, pad, &rb);
            float *bias = rand_floats(rows, -2.0f, 2.0f);
            for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
                uint32_t n = ns[ni];
                if (n > shapes[si].max_n)
                    continue;
                size_t ny = (size_t)n * rows;
                float *x = rand_floats((size_t)n * cols, -1.0f, 1.0f);
                float *yr = malloc(ny * sizeof(float)), *y1 = malloc(ny * sizeof(float)),
                      *y2 = malloc(ny * sizeof(float));
                assert_true(yr && y1 && y2);
                const float *b = ni % 2 ? bias : NULL;
                float *outs[2] = {y1, y2};
                /* Twice on the device for the larger n, where GEMMs split work. */
                int times = n >= 64 ? 2 : 1;
                run_matmul(g_ref, type, rows, cols, rb, w, x, n, b, &yr, 1);
                run_matmul(g_cuda, type, rows, cols, rb, w, x, n, b, outs, times);
                char what[96];
                snprintf(what, sizeof(what), "matmul %s %ux%u pad %zu n=%u%s",
                         kern_type_traits(type)->name, rows, cols, pad, n, b ? " +bias" : "");
                check(yr, y1, ny, matmul_limit(type), what);
                if (times == 2)
                    check_same_bits(y1, y2, ny * sizeof(float), what);
                free(x);
                free(yr);
                free(y1);
                free(y2);
            }
            free(bias);
            free(w);
        }
    }
}

/* A layer's Q, K and V in one kern_matmul_set and its gate and up with
 * SwiGLU in one kern_matmul_swiglu, at a model's widths: one GEMV launch
 * for decode-sized n (the matrices' blocks side by side; gate and up rows
 * in one warp), the separate products from 9 rows.  Bit for bit the
 * unfused ops on the device, close to ref's; a set of mixed types (Q4_K
 * with Q6_K, as Q4_K_M files have) takes a launch per type. */
static void
test_matmul_fused(void **state)
{
    (void)state;
    static const kern_dtype_t types[] = {KERN_F32,  KERN_F16,  KERN_BF16, KERN_Q8_0,
                                         KERN_Q4_0, KERN_Q4_K, KERN_Q5_K, KERN_Q6_K};
    static const uint32_t ns[] = {1, 3, 8, 9};
    const uint32_t cols = 4096, rows[3] = {1031, 257, 257}, ff = 1029, ff_cols = 2304;
    seed_test(12);
    for (size_t ti = 0; ti <= sizeof(types) / sizeof(types[0]); ti++) {
        bool mixed = ti == sizeof(types) / sizeof(types[0]);
        mm_weight_t w[3];
        float *bias[3];
        const kern_dtype_t set_types[3] = {mixed ? KERN_Q4_K : types[ti],
                                           mixed ? KERN_Q4_K : types[ti],
                                           mixed ? KERN_Q6_K : types[ti]};
        make_weight_set(3, set_types, rows, cols, w, bias);
        for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
            uint32_t n = ns[ni];
            float *x = rand_floats((size_t)n * cols, -1.0f, 1.0f);
            float *yr[3], *yf[3], *yu[3];
            for (int i = 0; i < 3; i++) {
                size_t m = (size_t)n * rows[i];
                yr[i] = malloc(m * sizeof(float));
                yf[i] = malloc(m * sizeof(float));
                yu[i] = malloc(m * sizeof(float));
                assert_true(yr[i] && yf[i] && yu[i]);
                w[i].bias = ni % 2 ? bias[i] : NULL;
            }
            run_matmul_set(g_ref, false, 3, w, cols, x, n, yr);
            run_matmul_set(g_cuda, true, 3, w, cols, x, n, yf);
            run_matmul_set(g_cuda, false, 3, w, cols, x, n, yu);
            for (int i = 0; i < 3; i++) {
                char what[96];
                snprintf(what, sizeof(what), "matmul_set %s %ux%u n=%u%s%s",
                         kern_type_traits(w[i].type)->name, rows[i], cols, n,
                         w[i].bias ? " +bias" : "", mixed ? " (mixed set)" : "");
                size_t m = (size_t)n * rows[i];
                if (memcmp(yf[i], yu[i], m * sizeof(float)))
                    fail_msg("%s: not the separate products", what);
                check(yr[i], yf[i], m, matmul_limit(w[i].type), what);
                free(yr[i]);
                free(yf[i]);
                free(yu[i]);
            }
            free(x);
        }
        free_weight_set(3, w, bias);
        if (mixed)
            break;

        mm_weight_t gu[2];
        const kern_dtype_t gu_types[2] = {types[ti], types[ti]};
        const uint32_t gu_rows[2] = {ff, ff};
        make_weight_set(2, gu_types, gu_rows, ff_cols, gu, bias);
        for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
            uint32_t n = ns[ni];
            size_t m = (size_t)n * ff;
            float *x = rand_floats((size_t)n * ff_cols, -1.0f, 1.0f);
            float *yr = malloc(3 * m * sizeof(float)), *yf = yr + m, *yu = yf + m;
            assert_true(yr != NULL);
            char what[96];
            snprintf(what, sizeof(what), "matmul_swiglu %s %ux%u n=%u",
                     kern_type_traits(types[ti])->name, ff, ff_cols, n);
            run_matmul_swiglu(g_ref, false, gu, ff_cols, x, n, yr);
            run_matmul_swiglu(g_cuda, true, gu, ff_cols, x, n, yf);
            run_matmul_swiglu(g_cuda, false, gu, ff_cols, x, n, yu);
            if (memcmp(yf, yu, m * sizeof(float)))
                fail_msg("%s: not the products and swiglu", what);
            check(yr, yf, m, 2 * matmul_limit(types[ti]), what);
            free(x);
            free(yr);
        }
        free_weight_set(2, gu, bias);
    }
}

/* ------------------------------------------------------------------------ */
/* rmsnorm, rope, swiglu, add, Delta's correction                           */
/* ------------------------------------------------------------------------ */

static void
test_rmsnorm(void **state)
{
    (void)state;
    static const uint32_t shapes[][2] = {{1, 4096}, {300, 4096}, {7, 1003}, {64, 14336}, {3, 31}};
    seed_test(3);
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        uint32_t n = shapes[si][0], d = shapes[si][1];
        size_t m = (size_t)n * d;
        float *x = rand_floats(m, -3.0f, 3.0f), *w = rand_floats(d, 0.5f, 1.5f);
        float *yr = malloc(m * sizeof(float)), *yc = malloc(m * sizeof(float));
        assert_true(yr && yc);
        for (int ip = 0; ip < 2; ip++) {
            char what[64];
            snprintf(what, sizeof(what), "rmsnorm %ux%u%s", n, d, ip ? " in place" : "");
            run_rmsnorm(g_ref, x, w, n, d, ip, yr);
            run_rmsnorm(g_cuda, x, w, n, d, ip, yc);
            check(yr, yc, m, 1e-5, what);
        }
        free(x);
        free(w);
        free(yr);
        free(yc);
    }
}

/* The fused residual add and norm: bit for bit the add and the norm on
 * the device, close to ref's. */
static void
test_add_rmsnorm(void **state)
{
    (void)state;
    static const uint32_t shapes[][2] = {{1, 4096}, {300, 4096}, {7, 1003}, {3, 31}};
    seed_test(4);
    for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
        uint32_t n = shapes[si][0], d = shapes[si][1];
        size_t m = (size_t)n * d;
        float *x = rand_floats(m, -3.0f, 3.0f), *res = rand_floats(m, -1.0f, 1.0f);
        float *w = rand_floats(d, 0.5f, 1.5f), *buf = malloc(6 * m * sizeof(float));
        assert_true(buf != NULL);
        float *xr = buf, *yr = xr + m, *xf = yr + m, *yf = xf + m, *xu = yf + m, *yu = xu + m;
        for (int alias = 0; alias < 2; alias++) {
            char what[64];
            snprintf(what, sizeof(what), "add_rmsnorm %ux%u%s", n, d, alias ? " over res" : "");
            run_add_rmsnorm(g_ref, true, x, res, w, n, d, alias, xr, yr);
            run_add_rmsnorm(g_cuda, true, x, res, w, n, d, alias, xf, yf);
            run_add_rmsnorm(g_cuda, false, x, res, w, n, d, alias, xu, yu);
            if (memcmp(xf, xu, m * sizeof(float)) || memcmp(yf, yu, m * sizeof(float)))
                fail_msg("%s: not the add then the norm", what);
            check(xr, xf, m, 1e-6, what);
            check(yr, yf, m, 1e-5, what);
        }
        free(x);
        free(res);
        free(w);
        free(buf);
    }
}

static void
run_rope(kern_backend_t *be, const kern_rope_args_t *proto, const float *x, float *y)
{
    size_t n = (size_t)proto->n_rows * proto->n_heads * proto->head_dim;
    float *xd = put(be, x, n * sizeof(float));
    kern_rope_args_t a = *proto;
    a.x = xd;
    assert_int_equal(kern_rope(be, &a), 0);
    take(be, y, xd, n * sizeof(float), "rope x");
}

static void
test_rope(void **state)
{
    (void)state;
    static const struct {
        uint32_t n_rows, n_heads, head_dim, n_rot;
        float freq_base, freq_scale;
        bool factors, neox;
        int32_t max_pos;
    } cases[] = {
        {300, 32, 128, 128, 500000.0f, 1.0f, true, false, 131071}, /* Llama 3.1 q */
        {300, 8, 128, 128, 500000.0f, 1.0f, true, false, 131071},  /* and k */
        {64, 28, 128, 128, 1000000.0f, 1.0f, false, true, 32767},  /* qwen2 */
        {33, 5, 96, 64, 10000.0f, 0.5f, false, false, 40000},      /* partial, linear */
        {17, 3, 64, 32, 10000.0f, 1.0f, true, true, 100},          /* NEOX partial */
    };
    seed_test(4);
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        size_t n = (size_t)cases[ci].n_rows * cases[ci].n_heads * cases[ci].head_dim;
        float *x = rand_floats(n, -2.0f, 2.0f);
        float *ff = rand_floats(cases[ci].n_rot / 2, 1.0f, 8.0f);
        int32_t *pos = malloc(cases[ci].n_rows * sizeof(int32_t));
        assert_non_null(pos);
        for (uint32_t r = 0; r < cases[ci].n_rows; r++)
            pos[r] = (int32_t)(rng_u32() % ((uint32_t)cases[ci].max_pos + 1));
        pos[0] = cases[ci].max_pos;
        kern_rope_args_t a = {.n_rows = cases[ci].n_rows,
                              .n_heads = cases[ci].n_heads,
                              .head_dim = cases[ci].head_dim,
                              .n_rot = cases[ci].n_rot,
                              .pos = pos,
                              .freq_base = cases[ci].freq_base,
                              .freq_scale = cases[ci].freq_scale,
                              .freq_factors = cases[ci].factors ? ff : NULL,
                              .neox = cases[ci].neox};
        float *yr = malloc(n * sizeof(float)), *yc = malloc(n * sizeof(float));
        assert_true(yr && yc);
        run_rope(g_ref, &a, x, yr);
        run_rope(g_cuda, &a, x, yc);
        char what[96];
        snprintf(what, sizeof(what), "rope %s %ux%ux%u rot %u%s pos<=%d",
                 cases[ci].neox ? "neox" : "norm", cases[ci].n_rows, cases[ci].n_heads,
                 cases[ci].head_dim, cases[ci].n_rot, cases[ci].factors ? " factors" : "",
                 cases[ci].max_pos);
        check(yr, yc, n, 1e-5, what);
        /* Q's and K's heads in one call (8 K heads beside 32 Q heads, as
         * Llama 3.1's layers ask), and an epoch's positions kept. */
        float *x2 = rand_floats((size_t)cases[ci].n_rows * 8 * cases[ci].head_dim, -2.0f, 2.0f);
        check_rope_fused(g_cuda, &a, 8, x, x2, what);
        free(x2);
        free(x);
        free(ff);
        free(pos);
        free(yr);
        free(yc);
    }
}

static void
test_elementwise(void **state)
{
    (void)state;
    static const size_t sizes[] = {1, 4097, 300 * 14336 + 3};
    seed_test(5);
    for (size_t si = 0; si < sizeof(sizes) / sizeof(sizes[0]); si++) {
        size_t n = sizes[si];
        float *g = rand_floats(n, -20.0f, 20.0f), *u = rand_floats(n, -3.0f, 3.0f);
        float *yr = malloc(n * sizeof(float)), *yc = malloc(n * sizeof(float));
        assert_true(yr && yc);
        char what[64];
        for (int alias = 0; alias < 2; alias++) {
            snprintf(what, sizeof(what), "swiglu n=%zu%s", n, alias ? " aliased" : "");
            run_swiglu(g_ref, g, u, n, alias, yr);
            run_swiglu(g_cuda, g, u, n, alias, yc);
            check(yr, yc, n, 1e-5, what);
        }
        snprintf(what, sizeof(what), "add n=%zu", n);
        run_add(g_ref, g, u, n, yr);
        run_add(g_cuda, g, u, n, yc);
        check(yr, yc, n, 0.0, what);
        free(g);
        free(u);
        free(yr);
        free(yc);
    }
}

/* Runs kern_delta_apply; out and dense come back in the host arrays. */
static void
run_delta(kern_backend_t *be, float *out, float *dense, uint32_t n, uint32_t width, uint32_t gamma,
          uint32_t tail, uint32_t n_dense)
{
    size_t ob = (size_t)n * width * sizeof(float), db = (size_t)n_dense * width * sizeof(float);
    float *od = put(be, out, ob), *dd = put(be, dense, db);
    assert_int_equal(kern_delta_apply(be, od, dd, n, width, gamma, tail), 0);
    take(be, out, od, ob, "delta out");
    take(be, dense, dd, db, "delta dense");
}

static void
test_delta_apply(void **state)
{
    (void)state;
    static const uint32_t cases[][4] = {
        /* n, width, gamma, tail */
        {2048, 4096, 64, 128 + 0},
        {1000, 4096, 64, 1000 % 64 + 128},
        {77, 1003, 8, 0},
        {5, 64, 16, 5},
        /* One block, gamma far past n: a count that must not wrap. */
        {1000, 64, 0xffffff00u, 0},
    };
    seed_test(6);
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        uint32_t n = cases[ci][0], width = cases[ci][1], gamma = cases[ci][2], tail = cases[ci][3];
        uint32_t n_dense = (n > tail ? (n - tail - 1) / gamma + 1 : 0) + tail;
        size_t no = (size_t)n * width, nd = (size_t)n_dense * width;
        float *out = rand_floats(no, -1.0f, 1.0f), *dense = rand_floats(nd, -1.0f, 1.0f);
        float *or_ = malloc(no * sizeof(float)), *dr = malloc(nd * sizeof(float));
        float *oc = malloc(no * sizeof(float)), *dc = malloc(nd * sizeof(float));
        assert_true(or_ && dr && oc && dc);
        memcpy(or_, out, no * sizeof(float));
        memcpy(oc, out, no * sizeof(float));
        memcpy(dr, dense, nd * sizeof(float));
        memcpy(dc, dense, nd * sizeof(float));
        run_delta(g_ref, or_, dr, n, width, gamma, tail, n_dense);
        run_delta(g_cuda, oc, dc, n, width, gamma, tail, n_dense);
        char what[96];
        snprintf(what, sizeof(what), "delta_apply n=%u width %u gamma %u tail %u", n, width, gamma,
                 tail);
        check(or_, oc, no, 1e-6, what);
        snprintf(what, sizeof(what), "delta_apply n=%u width %u gamma %u tail %u (dense)", n, width,
                 gamma, tail);
        check(dr, dc, nd, 1e-6, what);
        free(out);
        free(dense);
        free(or_);
        free(dr);
        free(oc);
        free(dc);
    }
}

/* ------------------------------------------------------------------------ */
/* KV cache: append, copy                                                   */
/* ------------------------------------------------------------------------ */

/* A pool's initial K and V (random bytes), and where ref's and cuda's
 * end up, for the KV ops that must agree byte for byte. */
typedef struct pools {
    size_t bytes;
    uint8_t *k0, *v0, *kr, *vr, *kc, *vc;
} pools_t;

static pools_t
pools_new(const kv_geom_t *g)
{
    pools_t p = {.bytes = (size_t)g->n_layers * g->n_blocks * g->n_kv_heads * g->block_tokens *
                          g->head_dim * (g->dtype == KERN_F16 ? 2 : 4)};
    uint8_t **all[] = {&p.k0, &p.v0, &p.kr, &p.vr, &p.kc, &p.vc};
    for (int i = 0; i < 6; i++) {
        *all[i] = malloc(p.bytes);
        assert_non_null(*all[i]);
    }
    for (size_t i = 0; i < p.bytes; i++) {
        p.k0[i] = (uint8_t)rng_u32();
        p.v0[i] = (uint8_t)rng_u32();
    }
    return p;
}

/* Starts backend b's (0: ref, 1: cuda) pool from the initial bytes. */
static kern_kv_t
pools_make(const pools_t *p, int b, const kv_geom_t *g)
{
    return kv_make(b ? g_cuda : g_ref, g, p->k0, p->v0);
}

/* Takes backend b's pool back. */
static void
pools_take(pools_t *p, int b, kern_kv_t *kv)
{
    kv_take(b ? g_cuda : g_ref, kv, b ? p->kc : p->kr, b ? p->vc : p->vr);
}

/* ref's pool and cuda's, byte for byte. */
static void
pools_check(const pools_t *p, const char *what)
{
    check_bytes_equal(p->kr, p->kc, p->bytes, what, LABEL);
    check_bytes_equal(p->vr, p->vc, p->bytes, what, LABEL);
    print_message("%-56s %-22s bytes equal\n", what, LABEL);
}

static void
pools_free(pools_t *p)
{
    free(p->k0);
    free(p->v0);
    free(p->kr);
    free(p->vr);
    free(p->kc);
    free(p->vc);
}

static void
test_kv_append(void **state)
{
    (void)state;
    seed_test(7);
    for (int dt = 0; dt < 2; dt++) {
        /* order 0: one prefill chunk into consecutive slots; 1: scrambled
         * (a decode batch's slots); 2: scrambled with slots repeated far
         * apart in the batch, where the later token must win; 3: repeats
         * next to each other and three deep (blocks that run together). */
        for (int order = 0; order < 4; order++) {
            kv_geom_t g = {dt ? KERN_F16 : KERN_F32, 2, 8, 128, 16, 512};
            uint32_t n = 4096, n_slots = g.n_blocks * g.block_tokens;
            int32_t *slots = malloc(n * sizeof(int32_t));
            assert_non_null(slots);
            int32_t first = (int32_t)(rng_u32() % (n_slots - n));
            for (uint32_t i = 0; i < n; i++)
                slots[i] = first + (int32_t)i;
            if (order >= 1) { /* n distinct slots anywhere in the pool */
                int32_t *perm = malloc(n_slots * sizeof(int32_t));
                assert_non_null(perm);
                for (uint32_t i = 0; i < n_slots; i++)
                    perm[i] = (int32_t)i;
                shuffle(perm, n_slots);
                memcpy(slots, perm, n * sizeof(int32_t));
                free(perm);
            }
            if (order == 2) /* sources below 700, repeats above 1700 */
                for (uint32_t i = 0; i < 64; i++)
                    slots[n - 1 - i * 37] = slots[i * 11];
            if (order == 3)
                for (uint32_t i = 0; i + 3 < n; i += 97)
                    slots[i + 1] = slots[i + 2] = slots[i];
            size_t m = (size_t)n * g.n_kv_heads * g.head_dim;
            /* Random old contents: slots nobody writes must keep them. */
            pools_t P = pools_new(&g);
            float *k = rand_floats(m, -4.0f, 4.0f), *v = rand_floats(m, -4.0f, 4.0f);
            kern_backend_t *bes[2] = {g_ref, g_cuda};
            for (int b = 0; b < 2; b++) {
                kern_kv_t kv = pools_make(&P, b, &g);
                float *kd = put(bes[b], k, m * sizeof(float)),
                      *vd = put(bes[b], v, m * sizeof(float));
                assert_int_equal(kern_kv_append(bes[b], &kv, 1, kd, vd, slots, n), 0);
                take(bes[b], NULL, kd, m * sizeof(float), "kv_append k");
                take(bes[b], NULL, vd, m * sizeof(float), "kv_append v");
                pools_take(&P, b, &kv);
            }
            char what[64];
            snprintf(what, sizeof(what), "kv_append %s order %d", dt ? "f16" : "f32", order);
            pools_check(&P, what);
            pools_free(&P);
            free(slots);
            free(k);
            free(v);
        }
    }
}

static void
test_kv_copy(void **state)
{
    (void)state;
    seed_test(8);
    for (int dt = 0; dt < 2; dt++) {
        kv_geom_t g = {dt ? KERN_F16 : KERN_F32, 4, 8, 128, 16, 256};
        /* Copy-on-write fan-out (one source, 100 fresh destinations), then
         * an order-dependent list: a chain 5 -> 9 -> 2, a swap through a
         * spare block, and a self copy. */
        int32_t src[128], dst[128];
        uint32_t n_cow = 100;
        for (uint32_t i = 0; i < n_cow; i++) {
            src[i] = 3;
            dst[i] = 100 + (int32_t)i;
        }
        static const int32_t s2[] = {5, 9, 10, 11, 12, 7};
        static const int32_t d2[] = {9, 2, 12, 10, 11, 7};
        kern_backend_t *bes[2] = {g_ref, g_cuda};
        pools_t P = pools_new(&g);
        for (int list = 0; list < 2; list++) {
            for (int b = 0; b < 2; b++) {
                kern_kv_t kv = pools_make(&P, b, &g);
                if (list == 0)
                    assert_int_equal(kern_kv_copy(bes[b], &kv, src, dst, n_cow), 0);
                else
                    assert_int_equal(kern_kv_copy(bes[b], &kv, s2, d2, 6), 0);
                pools_take(&P, b, &kv);
            }
            char what[64];
            snprintf(what, sizeof(what), "kv_copy %s %s", dt ? "f16" : "f32",
                     list ? "ordered list" : "copy-on-write fan-out");
            pools_check(&P, what);
        }
        pools_free(&P);
    }
}

/* SnapKV/H2O's gather: per (layer, KV head) its own source rows, from
 * anywhere in the pool, into fresh blocks; bytes must equal ref's. */
static void
test_kv_gather(void **state)
{
    (void)state;
    seed_test(14);
    for (int dt = 0; dt < 2; dt++) {
        kv_geom_t g = {dt ? KERN_F16 : KERN_F32, 4, 8, 128, 16, 256};
        pools_t P = pools_new(&g);
        /* Sources in blocks 0..199, destinations: 800 slots of blocks
         * 200.. in a scrambled order. */
        const uint32_t n = 800, n_src = g.n_layers * g.n_kv_heads * n;
        int32_t *src = malloc(n_src * sizeof(int32_t)), *dst = malloc(n * sizeof(int32_t));
        assert_true(src && dst);
        for (uint32_t i = 0; i < n_src; i++)
            src[i] = (int32_t)(rng_u32() % (200 * g.block_tokens));
        for (uint32_t j = 0; j < n; j++)
            dst[j] = (int32_t)(200 * g.block_tokens + j);
        shuffle(dst, n);
        kern_backend_t *bes[2] = {g_ref, g_cuda};
        for (int b = 0; b < 2; b++) {
            kern_kv_t kv = pools_make(&P, b, &g);
            assert_int_equal(kern_kv_gather(bes[b], &kv, src, dst, n), 0);
            pools_take(&P, b, &kv);
        }
        char what[64];
        snprintf(what, sizeof(what), "kv_gather %s, %u rows a head", dt ? "f16" : "f32", n);
        pools_check(&P, what);
        pools_free(&P);
        free(src);
        free(dst);
    }
}

/* The gather from sealed blocks (every codec): rows decoded into hot
 * blocks must equal ref's bytes, and a value at f16's largest, which each
 * codec decodes a little past it, must stay finite. */
static void
test_kv_gather_quantized(void **state)
{
    (void)state;
    seed_test(15);
    static const kern_kvq_t codecs[] = {KERN_KVQ_BF16, KERN_KVQ_Q8_0, KERN_KVQ_FP8, KERN_KVQ_Q4};
    const kv_geom_t g = {KERN_F16, 2, 4, 128, 16, 64};
    const uint32_t n_hot = 32, n_sealed = 30, n = 2 * g.block_tokens; /* into blocks 30, 31 */
    const uint32_t n_tok = n_sealed * g.block_tokens;
    const size_t row = (size_t)g.n_kv_heads * g.head_dim, m = (size_t)n_tok * row;
    const size_t hot_bytes = (size_t)g.n_layers * n_hot * row * g.block_tokens * 2;
    float *k = rand_floats(m, -4.0f, 4.0f), *v = rand_floats(m, -4.0f, 4.0f);
    for (uint32_t t = 0; t < n_tok; t += 7) { /* one channel of every 7th row at +-65504 */
        k[t * row + t % row] = t % 2 ? 65504.0f : -65504.0f;
        v[t * row + (t * 3) % row] = 65504.0f;
    }
    const uint32_t n_src = g.n_layers * g.n_kv_heads * n;
    int32_t *slots = malloc(n_tok * sizeof(int32_t)), *src = malloc(n_src * sizeof(int32_t));
    int32_t sb[30], db[30], dst[32];
    assert_true(slots && src);
    for (uint32_t t = 0; t < n_tok; t++)
        slots[t] = (int32_t)t;
    for (uint32_t b = 0; b < n_sealed; b++) {
        sb[b] = (int32_t)b;
        db[b] = (int32_t)(n_hot + b);
    }
    for (uint32_t i = 0; i < n_src; i++) /* rows of the sealed blocks, at random */
        src[i] = (int32_t)(n_hot * g.block_tokens + rng_u32() % n_tok);
    for (uint32_t j = 0; j < n; j++)
        dst[j] = (int32_t)(n_sealed * g.block_tokens + j);
    shuffle(dst, n);
    for (size_t ci = 0; ci < sizeof(codecs) / sizeof(codecs[0]); ci++) {
        uint8_t *hk[2], *hv[2];
        kern_backend_t *bes[2] = {g_ref, g_cuda};
        for (int b = 0; b < 2; b++) {
            kern_backend_t *be = bes[b];
            kern_kv_t kv = kv_make_q(be, &g, codecs[ci], n_hot);
            float *kd = put(be, k, m * 4), *vd = put(be, v, m * 4);
            for (uint32_t l = 0; l < g.n_layers; l++)
                assert_int_equal(kern_kv_append(be, &kv, l, kd, vd, slots, n_tok), 0);
            assert_int_equal(kern_kv_seal(be, &kv, sb, db, n_sealed), 0);
            assert_int_equal(kern_kv_gather(be, &kv, src, dst, n), 0);
            hk[b] = malloc(hot_bytes);
            hv[b] = malloc(hot_bytes);
            assert_true(hk[b] && hv[b]);
            get(be, hk[b], kv.k, hot_bytes, "pool k");
            get(be, hv[b], kv.v, hot_bytes, "pool v");
            take(be, NULL, kd, m * 4, "k rows");
            take(be, NULL, vd, m * 4, "v rows");
            kv_take_q(be, &kv);
        }
        char what[96];
        snprintf(what, sizeof(what), "kv_gather from %s blocks, %u rows a head",
                 kern_kvq_name(codecs[ci]), n);
        check_bytes_equal(hk[0], hk[1], hot_bytes, what, LABEL);
        check_bytes_equal(hv[0], hv[1], hot_bytes, what, LABEL);
        /* f16 inf: exponent all ones, mantissa zero */
        for (size_t i = 0; i < hot_bytes / 2; i++) {
            uint16_t hb, vb;
            memcpy(&hb, hk[1] + 2 * i, 2);
            memcpy(&vb, hv[1] + 2 * i, 2);
            if ((hb & 0x7fff) == 0x7c00 || (vb & 0x7fff) == 0x7c00) {
                print_error("%s [%s]: inf at element %zu\n", what, LABEL, i);
                fail();
            }
        }
        print_message("%-56s %-22s bytes equal\n", what, LABEL);
        for (int b = 0; b < 2; b++) {
            free(hk[b]);
            free(hv[b]);
        }
    }
    free(k);
    free(v);
    free(slots);
    free(src);
}

/* A whole K (or V) buffer of g's shape, finite values in [-2, 2) stored in
 * g's dtype, and (blocks not NULL) a scrambled list of all g's blocks. */
static void *
rand_keys(const kv_geom_t *g, int32_t **blocks)
{
    size_t n_el = (size_t)g->n_layers * g->n_blocks * g->n_kv_heads * g->block_tokens * g->head_dim;
    void *k = malloc(n_el * 4);
    assert_non_null(k);
    for (size_t i = 0; i < n_el; i++) {
        float x = rng_f(-2.0f, 2.0f);
        if (g->dtype == KERN_F16)
            ((uint16_t *)k)[i] = kvs_f32_to_fp16(x);
        else
            ((float *)k)[i] = x;
    }
    if (blocks == NULL)
        return k;
    *blocks = malloc(g->n_blocks * sizeof(int32_t));
    assert_non_null(*blocks);
    for (uint32_t i = 0; i < g->n_blocks; i++)
        (*blocks)[i] = (int32_t)i;
    shuffle(*blocks, g->n_blocks);
    return k;
}

/* Block-sparse prefill's Quest bounds at serving sizes: 8K keys (512
 * blocks) of 8 KV heads against 256 query rows of 32 heads.  The
 * summaries are key values rounded outward to f16, one way only, so bit
 * for bit; the scores are TF32 products (kern.h). */
static void
test_block_scores(void **state)
{
    (void)state;
    seed_test(10);
    for (int dt = 0; dt < 2; dt++) {
        const uint32_t nb = 512, n_q = 256, H = 32;
        kv_geom_t g = {dt ? KERN_F16 : KERN_F32, 1, 8, 128, 16, nb + 40};
        int32_t *blocks;
        void *k0 = rand_keys(&g, &blocks);
        float *q = rand_floats((size_t)n_q * H * g.head_dim, -2.0f, 2.0f);
        kern_block_score_args_t a = {.n_q = n_q,
                                     .n_heads = H,
                                     .n_kv_heads = g.n_kv_heads,
                                     .head_dim = g.head_dim,
                                     .n_blocks = nb,
                                     .q_group = g.block_tokens};
        const size_t bn = (size_t)g.n_kv_heads * nb * 2 * g.head_dim;
        const size_t sn = (size_t)(n_q / g.block_tokens) * nb;
        uint16_t *br = malloc(bn * 2), *bc = malloc(bn * 2);
        float *sr = malloc(sn * 4), *sc = malloc(sn * 4);
        assert_true(br && bc && sr && sc);
        kern_backend_t *bes[2] = {g_ref, g_cuda};
        for (int b = 0; b < 2; b++) {
            kern_backend_t *be = bes[b];
            kern_kv_t kv = kv_make(be, &g, k0, k0);
            float *qd = put(be, q, (size_t)n_q * H * g.head_dim * 4);
            uint16_t *bd = (uint16_t *)put_out(be, bn / 2); /* bn halves: bn is even */
            float *sd = put_out(be, sn);
            float *wd = put_out(be, kern_block_scores_work(&a));
            assert_int_equal(kern_kv_block_bounds(be, &kv, 0, blocks, nb, bd), 0);
            a.q = qd;
            a.bounds = bd;
            a.score = sd;
            a.work = wd;
            assert_int_equal(kern_block_scores(be, &a), 0);
            take(be, b ? bc : br, bd, bn * 2, "block bounds");
            take(be, b ? sc : sr, sd, sn * 4, "block scores");
            take(be, NULL, wd, kern_block_scores_work(&a) * 4, "block scores work");
            take(be, NULL, qd, (size_t)n_q * H * g.head_dim * 4, "q");
            kv_take(be, &kv, NULL, NULL);
        }
        char what[80];
        snprintf(what, sizeof(what), "block_bounds %s, %u blocks", dt ? "f16" : "f32", nb);
        check_bytes_equal(br, bc, bn * 2, what, LABEL);
        print_message("%-56s %-22s bytes equal\n", what, LABEL);
        snprintf(what, sizeof(what), "block_scores %s, %u rows x %u blocks", dt ? "f16" : "f32",
                 n_q, nb);
        check(sr, sc, sn, 5e-3, what);
        free(k0);
        free(q);
        free(blocks);
        free(br);
        free(bc);
        free(sr);
        free(sc);
    }
}

/* SnapKV's vote (32 causal rows, summed), H2O's decode row, and
 * speculative prefill's pooled maxima (8 look-ahead rows) over 8K keys of
 * 8 KV heads, 32 query heads: cuda against ref.  One pool per dtype, read
 * by every case: the table is a scrambled list of blocks, its last one
 * partial. */
static void
test_attn_mass(void **state)
{
    (void)state;
    seed_test(11);
    static const struct {
        uint32_t n_q;
        bool causal;
        kern_mass_mode_t mode;
        uint32_t pool;
    } cases[] = {
        {32, true, KERN_MASS_SUM, 0},
        {1, true, KERN_MASS_SUM, 0},
        {8, false, KERN_MASS_POOL_MAX, 13},
        {8, false, KERN_MASS_POOL_MAX, 1023},
    };
    const uint32_t N = 8190, H = 32;
    kern_backend_t *bes[2] = {g_ref, g_cuda};
    for (int dt = 0; dt < 2; dt++) {
        kv_geom_t g = {dt ? KERN_F16 : KERN_F32, 2, 8, 128, 16, 560};
        int32_t *blocks;
        void *k0 = rand_keys(&g, &blocks);
        kern_kv_t kv[2];
        for (int b = 0; b < 2; b++)
            kv[b] = kv_make(bes[b], &g, k0, k0);
        for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
            const uint32_t n_q = cases[ci].n_q;
            float *q = rand_floats((size_t)n_q * H * g.head_dim, -2.0f, 2.0f);
            const bool sum = cases[ci].mode == KERN_MASS_SUM;
            const size_t on = sum ? (size_t)g.n_kv_heads * N : (size_t)n_q * N;
            float *yr = sentinel_floats(on), *yc = sentinel_floats(on);
            for (int b = 0; b < 2; b++) {
                const kern_attn_mass_args_t a = {.q = q,
                                                 .n_q = n_q,
                                                 .n_heads = H,
                                                 .kv = &kv[b],
                                                 .layer = 1,
                                                 .blocks = blocks,
                                                 .n_keys = N,
                                                 .causal = cases[ci].causal,
                                                 .scale = 1.0f / sqrtf((float)g.head_dim),
                                                 .mode = cases[ci].mode,
                                                 .n_out = N,
                                                 .pool = cases[ci].pool,
                                                 .out = b ? yc : yr};
                assert_int_equal(kern_attn_mass(bes[b], &a), 0);
            }
            char what[96];
            snprintf(what, sizeof(what), "attn_mass %s %s, %u rows, %u keys%s", dt ? "f16" : "f32",
                     sum ? "sum" : "pooled max", n_q, N,
                     cases[ci].pool == 1023 ? ", pool 1023" : "");
            check(yr, yc, on, 1e-4, what);
            free(q);
            free(yr);
            free(yc);
        }
        for (int b = 0; b < 2; b++)
            kv_take(bes[b], &kv[b], NULL, NULL);
        free(k0);
        free(blocks);
    }
}

/* ------------------------------------------------------------------------ */
/* Attention                                                                */
/* ------------------------------------------------------------------------ */

/* Long single rows split the KV range over many blocks (split-KV) and
 * merge partial softmaxes; prefill chunks run many rows of one sequence;
 * the mixed case shares prefix blocks between sequences. */
static const attn_case_t gpu_attn_cases[] = {
    {"f16 bt16 d128 32/8 decode 40K+17+4099",
     KERN_F16,
     16,
     128,
     32,
     8,
     3,
     {40000, 17, 4099},
     {1, 1, 1},
     0},
    {"f16 bt16 d128 32/8 decode 64K", KERN_F16, 16, 128, 32, 8, 1, {65543}, {1}, 0},
    {"f16 bt16 d128 8/2 prefill 200 rows at 2.3K", KERN_F16, 16, 128, 8, 2, 1, {2500}, {200}, 0},
    {"f32 bt16 d64 32/4 mixed, shared prefix",
     KERN_F32,
     16,
     64,
     32,
     4,
     3,
     {3000, 2100, 70},
     {64, 1, 70},
     40},
    {"f16 bt32 d256 mha decode 20K + prefill", KERN_F16, 32, 256, 4, 4, 2, {20000, 9}, {1, 9}, 0},
    {"f16 bt1 d80 gqa2", KERN_F16, 1, 80, 4, 2, 2, {5000, 333}, {3, 2}, 0},
    /* Decode rows for each shape of the decode kernel: a group of 16 (two
     * passes of 8 heads) over rows of 98 values (no paired loads), a group
     * of 3 with a one-key row, a group of 5 on one KV head. */
    {"f16 bt7 d98 48/3 decode 6K+1K+5", KERN_F16, 7, 98, 48, 3, 3, {6001, 1024, 5}, {1, 1, 1}, 0},
    {"f32 bt16 d96 24/8 decode 9K+1", KERN_F32, 16, 96, 24, 8, 2, {9000, 1}, {1, 1}, 0},
    {"f16 bt32 d64 5/1 decode 777", KERN_F16, 32, 64, 5, 1, 1, {777}, {1}, 0},
};

static void
test_attention(void **state)
{
    (void)state;
    seed_test(9);
    for (size_t ci = 0; ci < sizeof(gpu_attn_cases) / sizeof(gpu_attn_cases[0]); ci++) {
        const attn_case_t *c = &gpu_attn_cases[ci];
        attn_data_t d;
        attn_build(c, &d);
        size_t qn = (size_t)d.n_q * c->n_heads * c->head_dim;
        float *yr = malloc(qn * sizeof(float)), *y1 = malloc(qn * sizeof(float)),
              *y2 = malloc(qn * sizeof(float)), *ys = malloc(qn * sizeof(float));
        assert_true(yr && y1 && y2 && ys);
        run_attn(g_ref, &d, yr, NULL);
        run_attn(g_cuda, &d, y1, ys);
        run_attn(g_cuda, &d, y2, NULL);
        int32_t longest = 0;
        for (uint32_t s = 0; s < c->n_seqs; s++)
            longest = c->len[s] > longest ? c->len[s] : longest;
        /* Sums over tens of thousands of keys in f32; sequences of several
         * rows over F16 KV at head_dim 64 or 128 take the tensor-core
         * kernel, whose q and p are f16 (cuda_attn_tc.cu). */
        double limit = longest >= 16384 ? 1e-4 : 1e-5;
        for (uint32_t s = 0; s < c->n_seqs; s++)
            if (c->dtype == KERN_F16 && (c->head_dim == 64 || c->head_dim == 128) && c->rows[s] > 1)
                limit = 5e-3;
        char what[96];
        snprintf(what, sizeof(what), "attention %s (batched)", c->name);
        check(yr, y1, qn, limit, what);
        check_same_bits(y1, y2, qn * sizeof(float), what);
        snprintf(what, sizeof(what), "attention %s (per sequence)", c->name);
        check(yr, ys, qn, limit, what);
        free(yr);
        free(y1);
        free(y2);
        free(ys);
        attn_free(&d);
    }
}

/* Queries far past f16's range (|q| = 1e6, so q * scale * log2(e) is
 * about 1.1e5 at head_dim 128), which the tensor-core kernel rounds to
 * f16: each row's q has the signs of one key's K, so that key's score
 * leads every other by far and both backends give its V, unless q became
 * inf on the way (the scores then NaN). */
static void
test_attention_large_q(void **state)
{
    (void)state;
    seed_test(12);
    static const attn_case_t c = {"f16 bt16 d128 32/8 prefill 48 rows at 700, |q| 1e6",
                                  KERN_F16,
                                  16,
                                  128,
                                  32,
                                  8,
                                  1,
                                  {700},
                                  {48},
                                  0};
    attn_data_t d;
    attn_build(&c, &d);
    const uint32_t D = c.head_dim, group = c.n_heads / c.n_kv_heads;
    for (uint32_t r = 0; r < d.n_q; r++) {
        uint32_t key = (r * 37u) % (uint32_t)d.kv_len[r]; /* one the row sees */
        for (uint32_t h = 0; h < c.n_heads; h++) {
            const float *k = d.k_tok + ((size_t)key * c.n_kv_heads + h / group) * D;
            float *q = d.q + ((size_t)r * c.n_heads + h) * D;
            for (uint32_t e = 0; e < D; e++)
                q[e] = k[e] < 0.0f ? -1e6f : 1e6f;
        }
    }
    size_t qn = (size_t)d.n_q * c.n_heads * D;
    float *yr = malloc(qn * sizeof(float)), *y1 = malloc(qn * sizeof(float));
    assert_true(yr && y1);
    run_attn(g_ref, &d, yr, NULL);
    run_attn(g_cuda, &d, y1, NULL);
    /* The case is what it claims: the reference gives each row the chosen
     * key's V (as stored, in f16). */
    float *ye = malloc(qn * sizeof(float));
    assert_non_null(ye);
    for (uint32_t r = 0; r < d.n_q; r++) {
        uint32_t key = (r * 37u) % (uint32_t)d.kv_len[r];
        for (uint32_t h = 0; h < c.n_heads; h++)
            memcpy(ye + ((size_t)r * c.n_heads + h) * D,
                   d.v_tok + ((size_t)key * c.n_kv_heads + h / group) * D, D * sizeof(float));
    }
    check_close(ye, yr, qn, 1e-3, "attention, |q| past f16: one key's V", "ref");
    check(yr, y1, qn, 5e-3, "attention, |q| past f16");
    free(ye);
    free(yr);
    free(y1);
    attn_free(&d);
}

/* Attention over a pool with a codec at long context: one sequence of 32K
 * tokens whose blocks are all sealed but the first and the last (split-KV
 * decode walks quantized blocks; a prefill chunk of 8 rows goes to the
 * tensor-core kernel, which decodes them into its tiles), for Q8_0, FP8
 * and Q4 over F16 hot blocks.  Tiles come from kern_kv_seal on each backend and
 * must be byte for byte equal; outputs within the f32 attention limits. */
static void
test_attention_quantized(void **state)
{
    (void)state;
    seed_test(12);
    static const kern_kvq_t codecs[] = {KERN_KVQ_Q8_0, KERN_KVQ_FP8, KERN_KVQ_Q4};
    const uint32_t bt = 16, d = 128, n_kv = 8, H = 32, N = 32768 + 9;
    const uint32_t nb = (N + bt - 1) / bt, n_hot = nb, n_blocks = 2 * nb - 2;
    const size_t row = (size_t)n_kv * d, n_q = 9;
    float *k = rand_floats((size_t)N * row, -2.0f, 2.0f),
          *v = rand_floats((size_t)N * row, -2.0f, 2.0f);
    float *q = rand_floats(n_q * H * d, -2.0f, 2.0f);
    int32_t *slots = malloc(N * sizeof(int32_t));
    int32_t *src = malloc(nb * sizeof(int32_t)), *dst = malloc(nb * sizeof(int32_t));
    int32_t kv_len[9], q_indptr[3] = {0, 1, 9}, indptr[3] = {0, (int32_t)nb, 2 * (int32_t)nb};
    int32_t last_len[2] = {(int32_t)(N - (nb - 1) * bt), (int32_t)(N - (nb - 1) * bt)};
    int32_t *indices = malloc(2 * nb * sizeof(int32_t));
    assert_true(slots && src && dst && indices);
    for (uint32_t t = 0; t < N; t++)
        slots[t] = (int32_t)t; /* block t / bt, staged in hot block t / bt */
    /* Two sequences over the same table: a decode row, then 8 chunk rows. */
    for (uint32_t b = 0; b < nb; b++)
        indices[b] = indices[nb + b] =
            b == 0 || b + 1 == nb ? (int32_t)b : (int32_t)(n_hot + b - 1);
    for (uint32_t b = 1; b + 1 < nb; b++) {
        src[b - 1] = (int32_t)b;
        dst[b - 1] = (int32_t)(n_hot + b - 1);
    }
    kv_len[0] = (int32_t)N;
    for (int r = 0; r < 8; r++)
        kv_len[1 + r] = (int32_t)N - 7 + r;
    for (size_t ci = 0; ci < sizeof(codecs) / sizeof(codecs[0]); ci++) {
        const kern_kvq_t quant = codecs[ci];
        float *y[2];
        uint8_t *tiles[2];
        size_t tile_bytes = 0;
        const kv_geom_t geom = {KERN_F16, 1, n_kv, d, bt, n_blocks};
        const size_t n_tiles = (size_t)(n_blocks - n_hot) * n_kv;
        kern_backend_t *bes[2] = {g_ref, g_cuda};
        for (int b = 0; b < 2; b++) {
            kern_backend_t *be = bes[b];
            kern_kv_t kv = kv_make_q(be, &geom, quant, n_hot);
            const size_t tk = kv.qk_tile, tv = kv.qv_tile;
            float *kd = put(be, k, (size_t)N * row * 4), *vd = put(be, v, (size_t)N * row * 4);
            assert_int_equal(kern_kv_append(be, &kv, 0, kd, vd, slots, N), 0);
            assert_int_equal(kern_kv_seal(be, &kv, src, dst, nb - 2), 0);
            /* What the sealed blocks held must not be read again. */
            for (uint32_t i = 0; i + 2 < nb; i++) {
                size_t off = (size_t)src[i] * n_kv * bt * d * 2;
                poison(be, (uint8_t *)kv.k + off, (size_t)n_kv * bt * d * 2);
                poison(be, (uint8_t *)kv.v + off, (size_t)n_kv * bt * d * 2);
            }
            tiles[b] = malloc(n_tiles * (tk + tv));
            tile_bytes = n_tiles * (tk + tv);
            assert_non_null(tiles[b]);
            get(be, tiles[b], kv.qk, n_tiles * tk, "sealed K tiles");
            get(be, tiles[b] + n_tiles * tk, kv.qv, n_tiles * tv, "sealed V tiles");
            float *qd = put(be, q, n_q * H * d * 4), *od = put_out(be, n_q * H * d);
            kern_attn_args_t a = {
                .q = qd,
                .out = od,
                .n_q = (uint32_t)n_q,
                .n_heads = H,
                .q_indptr = q_indptr,
                .kv_len = kv_len,
                .pt = {.indptr = indptr, .indices = indices, .last_len = last_len, .n_seqs = 2},
                .kv = &kv,
                .layer = 0,
                .scale = 1.0f / sqrtf((float)d)};
            assert_int_equal(kern_attention(be, &a), 0);
            y[b] = malloc(n_q * H * d * 4);
            assert_non_null(y[b]);
            take(be, y[b], od, n_q * H * d * 4, "attention out");
            take(be, NULL, qd, n_q * H * d * 4, "q");
            take(be, NULL, kd, (size_t)N * row * 4, "k rows");
            take(be, NULL, vd, (size_t)N * row * 4, "v rows");
            kv_take_q(be, &kv);
        }
        char what[96];
        snprintf(what, sizeof(what), "kv_seal %s, %u blocks", kern_kvq_name(quant), nb - 2);
        check_bytes_equal(tiles[0], tiles[1], tile_bytes, what, LABEL);
        print_message("%-56s %-22s bytes equal\n", what, LABEL);
        snprintf(what, sizeof(what), "attention over %s blocks, %u keys", kern_kvq_name(quant), N);
        /* The decode row: f32 throughout.  The 8-row chunk: the
         * tensor-core kernel, whose q, P and decoded K, V are f16. */
        check(y[0], y[1], H * d, 1e-4, what);
        check(y[0] + H * d, y[1] + H * d, (n_q - 1) * H * d, 5e-3, what);
        for (int b = 0; b < 2; b++) {
            free(y[b]);
            free(tiles[b]);
        }
    }
    free(k);
    free(v);
    free(q);
    free(slots);
    free(src);
    free(dst);
    free(indices);
}

/* CUDA graphs (kern_graph_run): five decode steps of four sequences (rope,
 * KV append, attention), each step's q, k, v, positions, slots and
 * lengths new, and its attention made twice over one page table
 * (pt_epoch).  Recorded once, then replayed with the arrays restaged:
 * every step's output must equal, bit for bit, the same calls made
 * directly on a second pool and the second attention the first, and ref's
 * within the attention limit.  A step that waits for the device inside
 * cannot be recorded (KVS_EINVAL). */
typedef struct gstep {
    kern_backend_t *be;
    kern_kv_t kv;
    float *q, *k, *v, *out, *out2;
    kern_rope_args_t rope;
    kern_attn_args_t attn;
    int32_t slots[4];
    bool sync_inside;
} gstep_t;

static int
gstep_run(void *arg)
{
    gstep_t *g = arg;
    int rc;
    g->rope.x = g->q;
    g->rope.n_heads = g->attn.n_heads;
    if ((rc = kern_rope(g->be, &g->rope)) != 0)
        return rc;
    g->rope.x = g->k;
    g->rope.n_heads = g->kv.n_kv_heads;
    if ((rc = kern_rope(g->be, &g->rope)) != 0 ||
        (rc = kern_kv_append(g->be, &g->kv, 0, g->k, g->v, g->slots, 4)) != 0)
        return rc;
    if (g->sync_inside && (rc = kern_sync(g->be)) != 0)
        return rc;
    /* Twice, the second time on the table the first uploaded (pt_epoch). */
    kern_attn_args_t again = g->attn;
    again.out = g->out2;
    if ((rc = kern_attention(g->be, &g->attn)) != 0)
        return rc;
    return kern_attention(g->be, &again);
}

static void
test_graph_replay(void **state)
{
    (void)state;
    seed_test(13);
    const uint32_t B = 4, H = 8, n_kv = 2, d = 128, bt = 16, per = 72, steps = 5;
    const uint32_t len0[4] = {1000, 37, 700, 1100};
    kv_geom_t geom = {KERN_F16, 1, n_kv, d, bt, B * per};
    const size_t qn = (size_t)B * H * d, kn = (size_t)B * n_kv * d;
    /* Sequence s owns blocks[s * per ..], in a scrambled order. */
    int32_t *blocks;
    void *k0 = rand_keys(&geom, &blocks), *v0 = rand_keys(&geom, NULL);
    int32_t indptr[5], last_len[4], q_indptr[5] = {0, 1, 2, 3, 4}, kv_len[4], pos[4];
    int32_t *table = malloc(B * per * sizeof(int32_t));
    assert_non_null(table);
    kern_backend_t *bes[3] = {g_cuda, g_cuda, g_ref}; /* graph, direct, ref */
    gstep_t G[3];
    float *y[3], *y2 = malloc(qn * 4);
    assert_non_null(y2);
    for (int b = 0; b < 3; b++) {
        memset(&G[b], 0, sizeof G[b]);
        G[b].be = bes[b];
        G[b].kv = kv_make(bes[b], &geom, k0, v0);
        G[b].q = put(bes[b], NULL, qn * 4);
        G[b].k = put(bes[b], NULL, kn * 4);
        G[b].v = put(bes[b], NULL, kn * 4);
        G[b].out = put_out(bes[b], qn);
        G[b].out2 = put_out(bes[b], qn);
        G[b].rope = (kern_rope_args_t){.n_rows = B,
                                       .head_dim = d,
                                       .n_rot = d,
                                       .pos = pos,
                                       .freq_base = 500000.0f,
                                       .freq_scale = 1.0f};
        G[b].attn = (kern_attn_args_t){
            .q = G[b].q,
            .out = G[b].out,
            .n_q = B,
            .n_heads = H,
            .q_indptr = q_indptr,
            .kv_len = kv_len,
            .pt = {.indptr = indptr, .indices = table, .last_len = last_len, .n_seqs = B},
            .kv = &G[b].kv,
            .layer = 0,
            .scale = 1.0f / sqrtf((float)d),
            .max_len_hint = 2048};
        y[b] = malloc(qn * 4);
        assert_non_null(y[b]);
    }
    for (uint32_t st = 0; st < steps; st++) {
        float *q = rand_floats(qn, -2.0f, 2.0f), *k = rand_floats(kn, -2.0f, 2.0f);
        float *v = rand_floats(kn, -2.0f, 2.0f);
        /* Token len0[s] + st of every sequence; its table grows a block
         * now and then, so the staged arrays change size too. */
        indptr[0] = 0;
        int32_t slots[4];
        for (uint32_t s = 0; s < B; s++) {
            uint32_t t = len0[s] + st, nb = t / bt + 1;
            pos[s] = (int32_t)t;
            kv_len[s] = (int32_t)t + 1;
            last_len[s] = (int32_t)(t % bt) + 1;
            memcpy(table + indptr[s], blocks + s * per, nb * sizeof(int32_t));
            indptr[s + 1] = indptr[s] + (int32_t)nb;
            slots[s] = blocks[s * per + t / bt] * (int32_t)bt + (int32_t)(t % bt);
        }
        for (int b = 0; b < 3; b++) {
            memcpy(G[b].slots, slots, sizeof slots);
            G[b].attn.pt_epoch = 0x1000 + st;
            assert_int_equal(kern_upload(bes[b], G[b].q, q, qn * 4), 0);
            assert_int_equal(kern_upload(bes[b], G[b].k, k, kn * 4), 0);
            assert_int_equal(kern_upload(bes[b], G[b].v, v, kn * 4), 0);
            int rc =
                b == 0 ? kern_graph_run(bes[b], 0x67726170ull, gstep_run, &G[b]) : gstep_run(&G[b]);
            assert_int_equal(rc, 0);
            get(bes[b], y[b], G[b].out, qn * 4, "graph step out");
            get(bes[b], y2, G[b].out2, qn * 4, "graph step out, table reused");
            check_same_bits(y[b], y2, qn * 4, "attention on a reused page table");
        }
        char what[80];
        snprintf(what, sizeof(what), "graph replay, step %u (%s)", st,
                 st ? "replayed" : "recorded");
        check_same_bits(y[1], y[0], qn * 4, what);
        check(y[2], y[0], qn, 1e-5, what);
        free(q);
        free(k);
        free(v);
    }
    /* A step that waits inside: refused on the device. */
    G[0].sync_inside = true;
    assert_int_equal(kern_graph_run(g_cuda, 0x73796e63ull, gstep_run, &G[0]),
                     kern_backend_is_host(g_cuda) ? 0 : KVS_EINVAL);
    assert_int_equal(kern_sync(g_cuda), 0);
    for (int b = 0; b < 3; b++) {
        kv_take(bes[b], &G[b].kv, NULL, NULL);
        take(bes[b], NULL, G[b].q, qn * 4, "q");
        take(bes[b], NULL, G[b].k, kn * 4, "k");
        take(bes[b], NULL, G[b].v, kn * 4, "v");
        take(bes[b], NULL, G[b].out, qn * 4, "out");
        take(bes[b], NULL, G[b].out2, qn * 4, "out2");
        free(y[b]);
    }
    free(k0);
    free(v0);
    free(blocks);
    free(table);
    free(y2);
}

/* kv_copy inside a recorded step: its plan (all pairs at once, or in
 * order when a destination is also a source) follows the block ids, not
 * the shapes, so a replay whose ids need the other plan must be recorded
 * again.  Three steps under one key, the middle one a chain; the pools
 * must equal the direct calls' bytes and ref's. */
typedef struct cstep {
    kern_backend_t *be;
    kern_kv_t kv;
    int32_t src[4], dst[4];
} cstep_t;

static int
cstep_run(void *arg)
{
    cstep_t *c = arg;
    return kern_kv_copy(c->be, &c->kv, c->src, c->dst, 4);
}

static void
test_graph_kv_copy(void **state)
{
    (void)state;
    seed_test(16);
    const kv_geom_t g = {KERN_F16, 2, 4, 64, 16, 64};
    static const int32_t src[3][4] = {{3, 3, 3, 3}, {5, 9, 20, 21}, {7, 7, 30, 31}};
    static const int32_t dst[3][4] = {{10, 11, 12, 13}, {9, 2, 22, 23}, {40, 41, 42, 43}};
    pools_t P = pools_new(&g);
    kern_backend_t *bes[3] = {g_cuda, g_cuda, g_ref}; /* graph, direct, ref */
    cstep_t C[3];
    for (int b = 0; b < 3; b++) {
        C[b].be = bes[b];
        C[b].kv = kv_make(bes[b], &g, P.k0, P.v0);
    }
    uint8_t *kb[3], *vb[3];
    for (int b = 0; b < 3; b++) {
        kb[b] = malloc(P.bytes);
        vb[b] = malloc(P.bytes);
        assert_true(kb[b] && vb[b]);
    }
    for (int st = 0; st < 3; st++) {
        for (int b = 0; b < 3; b++) {
            memcpy(C[b].src, src[st], sizeof C[b].src);
            memcpy(C[b].dst, dst[st], sizeof C[b].dst);
            int rc =
                b == 0 ? kern_graph_run(bes[b], 0x636f7079ull, cstep_run, &C[b]) : cstep_run(&C[b]);
            assert_int_equal(rc, 0);
            get(bes[b], kb[b], C[b].kv.k, P.bytes, "pool k");
            get(bes[b], vb[b], C[b].kv.v, P.bytes, "pool v");
        }
        char what[64];
        snprintf(what, sizeof(what), "kv_copy in a graph, step %d (%s)", st,
                 st == 1 ? "in order" : "at once");
        for (int b = 1; b < 3; b++) {
            check_bytes_equal(kb[b], kb[0], P.bytes, what, LABEL);
            check_bytes_equal(vb[b], vb[0], P.bytes, what, LABEL);
        }
        print_message("%-56s %-22s bytes equal\n", what, LABEL);
    }
    for (int b = 0; b < 3; b++) {
        kv_take(bes[b], &C[b].kv, NULL, NULL);
        free(kb[b]);
        free(vb[b]);
    }
    pools_free(&P);
}

int
main(void)
{
    /* KVS_TEST_GPU_BACKEND=cpu: the harness itself on a machine without a
     * GPU (shapes, pool and table set-up, refusals), the cpu backend
     * standing in; it says nothing about the cuda kernels. */
    const char *name = getenv("KVS_TEST_GPU_BACKEND") ? getenv("KVS_TEST_GPU_BACKEND") : "cuda";
    if (strcmp(name, "cuda") != 0)
        printf("gpu_kernels: harness check: the %s backend stands in for cuda\n", name);
    int rc = kern_backend_new(name, NULL, &g_cuda);
    if (rc != 0) {
        printf("gpu_kernels: skipped: no CUDA device (%s)\n",
               rc == KVS_ENOTSUP ? "built without CUDA" : kvs_strerror(rc));
        return SKIP;
    }
    if (kern_backend_new("ref", NULL, &g_ref) != 0) {
        kern_backend_free(g_cuda);
        return 1;
    }
    const char *s = getenv("KVS_TEST_SEED");
    g_seed = s ? strtoull(s, NULL, 10) : (uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32);
    printf("gpu_kernels: seed %llu (KVS_TEST_SEED=%llu repeats this run)\n",
           (unsigned long long)g_seed, (unsigned long long)g_seed);
    setenv("KVS_TEST_VERBOSE", "1", 0); /* every check prints its error */
    /* Every test below then runs on the reserved buffers, as serving does. */
    const kern_reserve_t res = {.max_rows = 4096,
                                .max_cols = 14336,
                                .max_seqs = 64,
                                .max_ctx = 65536,
                                .block_tokens = 16,
                                .n_heads = 32,
                                .n_kv_heads = 8,
                                .head_dim = 128};
    if ((rc = kern_reserve(g_cuda, &res)) != 0) {
        printf("gpu_kernels: kern_reserve failed: %s\n", kvs_strerror(rc));
        kern_backend_free(g_ref);
        kern_backend_free(g_cuda);
        return 1;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_get_rows),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_fused),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_add_rmsnorm),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_elementwise),
        cmocka_unit_test(test_delta_apply),
        cmocka_unit_test(test_kv_append),
        cmocka_unit_test(test_kv_copy),
        cmocka_unit_test(test_kv_gather),
        cmocka_unit_test(test_kv_gather_quantized),
        cmocka_unit_test(test_block_scores),
        cmocka_unit_test(test_attn_mass),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_attention_large_q),
        cmocka_unit_test(test_attention_quantized),
        cmocka_unit_test(test_graph_replay),
        cmocka_unit_test(test_graph_kv_copy),
    };
    /* KVS_TEST_FILTER=test_attention*: a subset (cmocka's pattern), as the
     * device check runs the prefill tests again on the mma.sync kernel. */
    if (getenv("KVS_TEST_FILTER"))
        cmocka_set_test_filter(getenv("KVS_TEST_FILTER"));
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    kern_backend_free(g_ref);
    kern_backend_free(g_cuda);
    return rc;
}
