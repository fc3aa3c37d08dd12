/*
 * tests/kernels/test_kern_ops.c — every kernel op on every available
 * backend, compared against the "ref" backend (test-backend-ops style).
 *
 * Backends under test: "cpu" in four configurations (four threads and one
 * thread with the best SIMD, two threads capped at AVX2 with
 * KVS_CPU_ISA=avx2, three threads forced onto the portable scalar code
 * with KVS_CPU_ISA=scalar) and "cuda" when kern_backend_new("cuda") succeeds.
 * All data moves through kern_alloc/kern_upload/kern_download, so the same
 * code drives a device backend.  Every buffer carries GUARD sentinel
 * floats past its end that must survive the op, and outputs start as NaN
 * (every byte 0xff) so an element an op forgot to write fails the
 * comparison.  Errors are max|a - ref| / max|ref| against per-op limits.
 * Inputs come from a fixed-seed PRNG.  The helpers are in kern_test.h,
 * shared with test_gpu.c.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <math.h>

#include "kernels/kern.h"
/* The cpu backend's thread pool is private, but hand-rolled concurrency
 * deserves a direct test of its own. */
#include "kernels/cpu/cpu_int.h"
#include "tests/kernels/kern_test.h"

/* ------------------------------------------------------------------------ */
/* Backends.                                                                */
/* ------------------------------------------------------------------------ */

typedef struct test_be {
    char label[48];
    kern_backend_t *be;
} test_be_t;

static kern_backend_t *g_ref;
static test_be_t g_be[8];
static int g_n_be;

static void
add_backend(const char *name, uint32_t n_threads, const char *isa_cap, const char *label)
{
    kern_backend_cfg_t cfg = {.n_threads = n_threads};
    kern_backend_t *be = NULL;
    if (isa_cap)
        setenv("KVS_CPU_ISA", isa_cap, 1);
    int rc = kern_backend_new(name, &cfg, &be);
    if (isa_cap)
        unsetenv("KVS_CPU_ISA");
    if (rc != 0) {
        assert_true(strcmp(name, "cuda") == 0);
        print_message("%s backend: skipped (not available)\n", name);
        return;
    }
    snprintf(g_be[g_n_be].label, sizeof(g_be[g_n_be].label), "%s", label);
    g_be[g_n_be++].be = be;
}

static int
setup(void **state)
{
    (void)state;
    if (kern_backend_new("ref", NULL, &g_ref) != 0)
        return -1;
    add_backend("cpu", 4, NULL, "cpu/4 threads");
    add_backend("cpu", 1, NULL, "cpu/1 thread");
    add_backend("cpu", 2, "avx2", "cpu/2 threads/avx2");
    add_backend("cpu", 3, "scalar", "cpu/3 threads/scalar");
    add_backend("cuda", 0, NULL, "cuda");
    return 0;
}

static int
teardown(void **state)
{
    (void)state;
    for (int i = 0; i < g_n_be; i++)
        kern_backend_free(g_be[i].be);
    kern_backend_free(g_ref);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* matmul, get_rows                                                         */
/* ------------------------------------------------------------------------ */

typedef struct mm_shape {
    uint32_t rows, cols;
    size_t pad;    /* extra bytes per row */
    bool f32_only; /* cols not a multiple of the Q8_0 block */
} mm_shape_t;

/* Whether rows of `cols` values hold whole blocks of `type` (K-quants:
 * 256, Q4_0 and Q8_0: 32). */
static bool
fits(kern_dtype_t type, uint32_t cols)
{
    return kern_row_bytes(type, cols) != 0;
}

/* Runs the product as a model would: the weight packed into the backend's
 * layout first.  Returns that layout. */
static kern_layout_t
run_matmul(kern_backend_t *be, kern_dtype_t type, const mm_shape_t *sh, const void *w_host,
           size_t row_bytes, const float *x, uint32_t n, const float *bias, float *y)
{
    void *wd = put(be, w_host, row_bytes * sh->rows);
    float *xd = put(be, x, (size_t)n * sh->cols * sizeof(float));
    float *bd = bias ? put(be, bias, sh->rows * sizeof(float)) : NULL;
    float *yd = put_out(be, (size_t)n * sh->rows);
    kern_tensor_t w = {
        .type = type, .n_cols = sh->cols, .n_rows = sh->rows, .row_bytes = row_bytes, .data = wd};
    assert_int_equal(kern_pack_weight(be, &w), 0);
    assert_int_equal(kern_matmul(be, &w, xd, n, bd, yd), 0);
    take(be, y, yd, (size_t)n * sh->rows * sizeof(float), "matmul y");
    take(be, NULL, xd, (size_t)n * sh->cols * sizeof(float), "matmul x");
    if (bd)
        take(be, NULL, bd, sh->rows * sizeof(float), "matmul bias");
    take(be, NULL, wd, row_bytes * sh->rows, "matmul w");
    return w.layout;
}

static void
test_matmul(void **state)
{
    (void)state;
    static const kern_dtype_t types[] = {KERN_F32,  KERN_F16,  KERN_BF16, KERN_Q8_0,
                                         KERN_Q4_0, KERN_Q4_K, KERN_Q5_K, KERN_Q6_K};
    /* Rows not a multiple of 4 or 16 (37, 19, 45, 1030), K-quant rows of
     * one to four super-blocks. */
    static const mm_shape_t shapes[] = {
        {64, 96, 0, false},    {256, 704, 0, false}, {100, 33, 0, true},   {37, 64, 48, false},
        {1030, 256, 0, false}, {19, 512, 4, false},  {45, 1024, 0, false},
    };
    static const uint32_t ns[] = {1, 2, 3, 7, 16, 17, 64};
    rng_seed(1);
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        for (size_t si = 0; si < sizeof(shapes) / sizeof(shapes[0]); si++) {
            const mm_shape_t *sh = &shapes[si];
            if ((sh->f32_only && types[ti] != KERN_F32) || !fits(types[ti], sh->cols))
                continue;
            size_t rb;
            void *w = make_weights(types[ti], sh->rows, sh->cols, sh->pad, &rb);
            float *bias = rand_floats(sh->rows, -2.0f, 2.0f);
            for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
                uint32_t n = ns[ni];
                float *x = rand_floats((size_t)n * sh->cols, -1.0f, 1.0f);
                float *yr = malloc((size_t)n * sh->rows * sizeof(float));
                float *yb = malloc((size_t)n * sh->rows * sizeof(float));
                assert_non_null(yr);
                assert_non_null(yb);
                for (int with_bias = 0; with_bias < 2; with_bias++) {
                    const float *b = with_bias ? bias : NULL;
                    char what[96];
                    snprintf(what, sizeof(what), "matmul %s %ux%u pad %zu n=%u%s",
                             kern_type_traits(types[ti])->name, sh->rows, sh->cols, sh->pad, n,
                             with_bias ? " +bias" : "");
                    run_matmul(g_ref, types[ti], sh, w, rb, x, n, b, yr);
                    for (int i = 0; i < g_n_be; i++) {
                        if (!kern_supports(g_be[i].be, KERN_OP_MATMUL, types[ti]))
                            continue;
                        /* Host paths round only in f32 (Q8_0, Q4_0 and
                         * K-quant x is rounded to int8 by the ref too);
                         * cuda's tensor-core GEMMs (n > 8) take x, and
                         * quantized weights, in f16 or bf16
                         * (cuda_matmul.cu). */
                        double tol = 1e-5;
                        if (!kern_backend_is_host(g_be[i].be) && n > 8 && types[ti] != KERN_F32)
                            tol = types[ti] == KERN_BF16 ? 2e-2 : 5e-3;
                        run_matmul(g_be[i].be, types[ti], sh, w, rb, x, n, b, yb);
                        check_close(yr, yb, (size_t)n * sh->rows, tol, what, g_be[i].label);
                    }
                }
                free(x);
                free(yr);
                free(yb);
            }
            free(bias);
            free(w);
        }
    }
}

/* What a backend's product may differ from ref's by (test_matmul's). */
static double
matmul_tol(kern_backend_t *be, kern_dtype_t type, uint32_t n)
{
    if (!kern_backend_is_host(be) && n > 8 && type != KERN_F32)
        return type == KERN_BF16 ? 2e-2 : 5e-3;
    return 1e-5;
}

/* Q, K and V of a layer in one kern_matmul_set, and the gate and up
 * products with SwiGLU in one kern_matmul_swiglu: bit for bit the separate
 * ops on every backend (a device fuses them into one launch), close to
 * ref's; sets of one type, of mixed types, with and without biases. */
static void
test_matmul_fused(void **state)
{
    (void)state;
    static const kern_dtype_t types[] = {KERN_F32,  KERN_F16,  KERN_BF16, KERN_Q8_0,
                                         KERN_Q4_0, KERN_Q4_K, KERN_Q5_K, KERN_Q6_K};
    /* Each set's weights take types[(ti + mix[i]) % 8]: one type, or three. */
    static const uint32_t mixes[][3] = {{0, 0, 0}, {0, 0, 3}, {0, 1, 2}};
    static const uint32_t rows[3] = {64, 37, 19}, ns[] = {1, 3, 8, 9, 17};
    const uint32_t cols = 512;
    rng_seed(11);
    for (size_t ti = 0; ti < 8; ti++) {
        float *bias[3];
        mm_weight_t w[3];
        for (size_t mi = 0; mi < 3; mi++) {
            kern_dtype_t set_types[3];
            for (int i = 0; i < 3; i++)
                set_types[i] = types[(ti + mixes[mi][i]) % 8];
            make_weight_set(3, set_types, rows, cols, w, bias);
            for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
                uint32_t n = ns[ni];
                float *x = rand_floats((size_t)n * cols, -1.0f, 1.0f);
                float *buf = malloc(9 * (size_t)n * 64 * sizeof(float)); /* 64: the most rows */
                assert_non_null(buf);
                float *yr[3], *yf[3], *yu[3];
                for (int i = 0; i < 3; i++) {
                    yr[i] = buf + (size_t)n * 64 * (3 * i);
                    yf[i] = yr[i] + (size_t)n * 64;
                    yu[i] = yf[i] + (size_t)n * 64;
                    /* Biases on some sets, and on K only in one. */
                    w[i].bias = (ni % 2 || (ni == 2 && i == 1)) ? bias[i] : NULL;
                }
                run_matmul_set(g_ref, true, 3, w, cols, x, n, yr);
                for (int b = 0; b < g_n_be; b++) {
                    kern_backend_t *be = g_be[b].be;
                    bool all = true;
                    for (int i = 0; i < 3; i++)
                        all = all && kern_supports(be, KERN_OP_MATMUL, w[i].type);
                    if (!all)
                        continue;
                    run_matmul_set(be, true, 3, w, cols, x, n, yf);
                    run_matmul_set(be, false, 3, w, cols, x, n, yu);
                    for (int i = 0; i < 3; i++) {
                        char what[96];
                        snprintf(what, sizeof(what), "matmul_set %s (of %s %s %s) n=%u",
                                 kern_type_traits(w[i].type)->name,
                                 kern_type_traits(w[0].type)->name,
                                 kern_type_traits(w[1].type)->name,
                                 kern_type_traits(w[2].type)->name, n);
                        size_t m = (size_t)n * w[i].rows;
                        if (memcmp(yf[i], yu[i], m * sizeof(float)))
                            fail_msg("%s [%s]: not the separate products", what, g_be[b].label);
                        check_close(yr[i], yf[i], m, matmul_tol(be, w[i].type, n), what,
                                    g_be[b].label);
                    }
                }
                free(x);
                free(buf);
            }
            free_weight_set(3, w, bias);
        }

        /* Gate and up of one type (a model's are), 45 rows. */
        mm_weight_t gu[2];
        const kern_dtype_t gu_types[2] = {types[ti], types[ti]};
        const uint32_t gu_rows[2] = {45, 45};
        make_weight_set(2, gu_types, gu_rows, cols, gu, bias);
        for (size_t ni = 0; ni < sizeof(ns) / sizeof(ns[0]); ni++) {
            uint32_t n = ns[ni];
            size_t m = (size_t)n * 45;
            float *x = rand_floats((size_t)n * cols, -1.0f, 1.0f);
            float *yr = malloc(3 * m * sizeof(float)), *yf = yr + m, *yu = yf + m;
            assert_non_null(yr);
            char what[96];
            snprintf(what, sizeof(what), "matmul_swiglu %s n=%u", kern_type_traits(types[ti])->name,
                     n);
            run_matmul_swiglu(g_ref, true, gu, cols, x, n, yr);
            for (int b = 0; b < g_n_be; b++) {
                kern_backend_t *be = g_be[b].be;
                if (!kern_supports(be, KERN_OP_MATMUL, types[ti]))
                    continue;
                run_matmul_swiglu(be, true, gu, cols, x, n, yf);
                run_matmul_swiglu(be, false, gu, cols, x, n, yu);
                if (memcmp(yf, yu, m * sizeof(float)))
                    fail_msg("%s [%s]: not the products and swiglu", what, g_be[b].label);
                check_close(yr, yf, m, 2 * matmul_tol(be, types[ti], n), what, g_be[b].label);
            }
            free(x);
            free(yr);
        }
        free_weight_set(2, gu, bias);
    }

    /* Bad sets: none or too many weights, columns that differ, outputs
     * over x or over each other, gate and up of different shapes. */
    size_t rb;
    void *wh = make_weights(KERN_F32, 8, 32, 0, &rb);
    void *wd = put(g_ref, wh, rb * 8);
    float *buf = put(g_ref, NULL, 64 * sizeof(float)), *x = buf, *y0 = buf + 32, *y1 = buf + 40;
    kern_tensor_t t = {.type = KERN_F32, .n_cols = 32, .n_rows = 8, .row_bytes = rb, .data = wd};
    kern_tensor_t t16 = t;
    t16.n_cols = 16;
    const kern_tensor_t *tw[4] = {&t, &t, &t, &t}, *tm[2] = {&t, &t16};
    float *ys[4] = {y0, y1, y0, y1}, *yx[2] = {y0, x + 4}, *yy[2] = {y0, y0 + 4};
    assert_int_equal(kern_matmul_set(g_ref, 0, tw, x, 1, NULL, ys), KVS_EINVAL);
    assert_int_equal(kern_matmul_set(g_ref, 4, tw, x, 1, NULL, ys), KVS_EINVAL);
    assert_int_equal(kern_matmul_set(g_ref, 2, tm, x, 1, NULL, ys), KVS_EINVAL);
    assert_int_equal(kern_matmul_set(g_ref, 2, tw, x, 1, NULL, yx), KVS_EINVAL);
    assert_int_equal(kern_matmul_set(g_ref, 2, tw, x, 1, NULL, yy), KVS_EINVAL);
    assert_int_equal(kern_matmul_set(g_ref, 2, tw, x, 1, NULL, ys), 0);
    assert_int_equal(kern_matmul_set(g_ref, 2, tw, NULL, 0, NULL, ys), 0);
    assert_int_equal(kern_matmul_swiglu(g_ref, &t, &t16, x, 1, y1, y0), KVS_EINVAL);
    assert_int_equal(kern_matmul_swiglu(g_ref, &t, &t, x, 1, y0, y0), KVS_EINVAL);
    assert_int_equal(kern_matmul_swiglu(g_ref, &t, &t, x, 1, x, y0), KVS_EINVAL);
    assert_int_equal(kern_matmul_swiglu(g_ref, &t, &t, x, 1, y1, y0), 0);
    take(g_ref, NULL, buf, 64 * sizeof(float), "buf");
    take(g_ref, NULL, wd, rb * 8, "w");
    free(wh);
}

/* A row's product must not depend on the other rows of x: the same bits
 * whether computed alone or in a batch, which is what lets a sequence's
 * tokens not depend on what it is batched with.  Every host path is
 * invariant up to 17 rows; packed Q8_0 at any n (the f32 GEMM path from 48
 * rows sums in another order).  Not cuda's: from 9 rows its GEMMs take x in
 * f16 or bf16 where the GEMV keeps f32 (cuda_matmul.cu), as other GPU
 * engines' do. */
static void
test_matmul_batch_invariant(void **state)
{
    (void)state;
    static const kern_dtype_t types[] = {KERN_F32,  KERN_F16,  KERN_Q8_0, KERN_Q4_0,
                                         KERN_Q4_K, KERN_Q5_K, KERN_Q6_K};
    const mm_shape_t sh = {1030, 256, 0, false};
    rng_seed(9);
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        size_t rb;
        void *w = make_weights(types[ti], sh.rows, sh.cols, 0, &rb);
        float *bias = rand_floats(sh.rows, -2.0f, 2.0f);
        const uint32_t n = 64;
        float *x = rand_floats((size_t)n * sh.cols, -1.0f, 1.0f);
        float *yall = malloc((size_t)n * sh.rows * sizeof(float));
        float *y1 = malloc(sh.rows * sizeof(float));
        assert_non_null(yall);
        assert_non_null(y1);
        for (int i = 0; i < g_n_be; i++) {
            if (!kern_supports(g_be[i].be, KERN_OP_MATMUL, types[ti]) ||
                !kern_backend_is_host(g_be[i].be))
                continue;
            for (int big = 0; big < 2; big++) {
                uint32_t nb = big ? n : 17;
                kern_layout_t lay =
                    run_matmul(g_be[i].be, types[ti], &sh, w, rb, x, nb, bias, yall);
                if (big && lay == KERN_LAYOUT_ROWS)
                    continue;
                for (uint32_t t = 0; t < nb; t += 5) {
                    run_matmul(g_be[i].be, types[ti], &sh, w, rb, x + (size_t)t * sh.cols, 1, bias,
                               y1);
                    if (memcmp(y1, yall + (size_t)t * sh.rows, sh.rows * sizeof(float)) != 0) {
                        print_error("matmul %s n=%u row %u [%s]: differs from the row alone\n",
                                    kern_type_traits(types[ti])->name, nb, t, g_be[i].label);
                        fail();
                    }
                }
            }
        }
        free(x);
        free(yall);
        free(y1);
        free(bias);
        free(w);
    }
}

static void
test_get_rows(void **state)
{
    (void)state;
    static const kern_dtype_t types[] = {KERN_F32,  KERN_F16,  KERN_BF16, KERN_Q8_0,
                                         KERN_Q4_0, KERN_Q4_K, KERN_Q5_K, KERN_Q6_K};
    rng_seed(2);
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        for (int big = 0; big < 2; big++) {
            uint32_t rows = 37, cols = types[ti] == KERN_F32 ? 33 : 96, n = 9;
            if (!fits(types[ti], cols))
                cols = 512;
            if (big) {
                cols = 4096;
                n = 64; /* enough elements to split into tasks */
            }
            size_t rb;
            void *w = make_weights(types[ti], rows, cols, big ? 0 : 16, &rb);
            int32_t *ids = malloc(n * sizeof(int32_t));
            assert_non_null(ids);
            for (uint32_t i = 0; i < n; i++)
                ids[i] = (int32_t)(rng_u32() % rows); /* repeats included */
            ids[0] = 0;
            ids[n - 1] = (int32_t)rows - 1;
            float *yr = malloc((size_t)n * cols * sizeof(float));
            float *yb = malloc((size_t)n * cols * sizeof(float));
            assert_non_null(yr);
            assert_non_null(yb);
            run_get_rows(g_ref, types[ti], rows, cols, rb, w, ids, n, yr);
            for (int i = 0; i < g_n_be; i++) {
                if (!kern_supports(g_be[i].be, KERN_OP_GET_ROWS, types[ti]))
                    continue;
                run_get_rows(g_be[i].be, types[ti], rows, cols, rb, w, ids, n, yb);
                check_close(yr, yb, (size_t)n * cols, 0.0, "get_rows", g_be[i].label);
            }
            free(w);
            free(ids);
            free(yr);
            free(yb);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Block formats: dequantization and quantization                           */
/* ------------------------------------------------------------------------ */

/* A random finite fp16 (any sign, exponent below the inf/NaN one). */
static uint16_t
rand_half(void)
{
    uint16_t h;
    do
        h = (uint16_t)rng_u32();
    while ((h & 0x7c00) == 0x7c00);
    return h;
}

/* n_blocks random blocks of `type`: random bytes, then every fp16 field
 * a random finite half. */
static void *
rand_blocks(kern_dtype_t type, size_t n_blocks)
{
    const kern_type_traits_t *tr = kern_type_traits(type);
    uint8_t *p = malloc(n_blocks * tr->block_bytes);
    assert_non_null(p);
    for (size_t i = 0; i < n_blocks * tr->block_bytes; i++)
        p[i] = (uint8_t)rng_u32();
    for (size_t b = 0; b < n_blocks; b++) {
        uint8_t *blk = p + b * tr->block_bytes;
        uint16_t h[2] = {rand_half(), rand_half()};
        switch (type) {
        case KERN_Q8_0:
        case KERN_Q4_0:
            memcpy(blk, h, 2); /* d */
            break;
        case KERN_Q4_K:
        case KERN_Q5_K:
            memcpy(blk, h, 4); /* d, dmin */
            break;
        case KERN_Q6_K:
            memcpy(blk + offsetof(kern_block_q6_k_t, d), h, 2);
            break;
        default: /* F16, BF16: every element */
            for (size_t e = 0; e < tr->block_bytes; e += 2) {
                uint16_t v = rand_half();
                memcpy(blk + e, &v, 2);
            }
            break;
        }
    }
    return p;
}

/* The cpu backend's SIMD row conversion (get_rows, GEMM tiles) must give
 * exactly kern_row_to_f32's bits, on every byte pattern. */
static void
test_dequant_simd(void **state)
{
    (void)state;
#ifdef CPU_HAVE_X86
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
        print_message("dequant simd: skipped (no AVX2)\n");
        return;
    }
    static const kern_dtype_t types[] = {KERN_F16,  KERN_BF16, KERN_Q8_0, KERN_Q4_0,
                                         KERN_Q4_K, KERN_Q5_K, KERN_Q6_K};
    rng_seed(11);
    for (size_t ti = 0; ti < sizeof(types) / sizeof(types[0]); ti++) {
        const kern_type_traits_t *tr = kern_type_traits(types[ti]);
        size_t n_blocks = 4096 / tr->block + 3, n = n_blocks * tr->block;
        for (int rep = 0; rep < 8; rep++) {
            void *row = rand_blocks(types[ti], n_blocks);
            float *a = sentinel_floats(n), *b = sentinel_floats(n);
            assert_int_equal(kern_row_to_f32(types[ti], row, a, n), 0);
            kern__cpu_row_to_f32(CPU_ISA_AVX2, types[ti], row, b, n);
            for (size_t i = 0; i < n; i++) {
                if (kvs_f32_to_bits(a[i]) != kvs_f32_to_bits(b[i])) {
                    print_error("dequant %s element %zu: scalar %.9g, simd %.9g\n", tr->name, i,
                                a[i], b[i]);
                    fail();
                }
            }
            free(row);
            free(a);
            free(b);
        }
    }
#endif
}

/* Quantize then dequantize Gaussian data: the RMS error, relative to the
 * data's RMS, stays below what each format's bits allow.  Measured: Q8_0
 * 0.005, Q4_0 0.085, Q4_K 0.072, Q5_K 0.036, Q6_K 0.018; 16 levels over
 * a 32-value block's range (about 4 sigma) cannot do much better than
 * 0.07, and each further bit halves it. */
static void
test_quant_roundtrip(void **state)
{
    (void)state;
    static const struct {
        kern_dtype_t type;
        double limit;
    } cases[] = {
        {KERN_Q8_0, 0.01}, {KERN_Q4_0, 0.10}, {KERN_Q4_K, 0.08},
        {KERN_Q5_K, 0.04}, {KERN_Q6_K, 0.02},
    };
    const size_t n = 256 * 64;
    rng_seed(12);
    float *x = malloc(n * sizeof(float)), *y = malloc(n * sizeof(float));
    assert_non_null(x);
    assert_non_null(y);
    for (size_t i = 0; i < n; i += 2) { /* Box-Muller */
        double u1 = (rng_u32() + 1.0) / 4294967297.0, u2 = rng_u32() / 4294967296.0;
        double r = sqrt(-2.0 * log(u1));
        x[i] = (float)(r * cos(2 * M_PI * u2));
        x[i + 1] = (float)(r * sin(2 * M_PI * u2));
    }
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        kern_dtype_t t = cases[ci].type;
        void *q = malloc(kern_row_bytes(t, n));
        assert_non_null(q);
        assert_int_equal(kern_quantize_row(t, x, q, n), 0);
        assert_int_equal(kern_row_to_f32(t, q, y, n), 0);
        double se = 0, sx = 0;
        for (size_t i = 0; i < n; i++) {
            se += ((double)y[i] - x[i]) * ((double)y[i] - x[i]);
            sx += (double)x[i] * x[i];
        }
        double rel = sqrt(se / sx);
        if (getenv("KVS_TEST_VERBOSE"))
            print_message("roundtrip %-5s rms error %.4f of rms\n", kern_type_traits(t)->name, rel);
        if (!(rel < cases[ci].limit)) {
            print_error("roundtrip %s: rms error %.4f >= %.4f\n", kern_type_traits(t)->name, rel,
                        cases[ci].limit);
            fail();
        }
        /* All-zero blocks stay zero and finite. */
        memset(y, 0, 512 * sizeof(float));
        assert_int_equal(kern_quantize_row(t, y, q, 512), 0);
        assert_int_equal(kern_row_to_f32(t, q, y, 512), 0);
        for (size_t i = 0; i < 512; i++)
            assert_true(y[i] == 0.0f);
        free(q);
    }
    assert_int_equal(kern_quantize_row(KERN_Q4_K, x, y, 100), KVS_EINVAL);
    assert_int_equal(kern_quantize_row(KERN_BF16, x, y, 256), KVS_ENOTSUP);
    free(x);
    free(y);
}

/* ------------------------------------------------------------------------ */
/* rmsnorm, rope, swiglu, add                                               */
/* ------------------------------------------------------------------------ */

static void
test_rmsnorm(void **state)
{
    (void)state;
    static const uint32_t shapes[][2] = {{1, 4096}, {5, 37}, {64, 2048}, {3, 8}};
    rng_seed(3);
    for (size_t si = 0; si < 4; si++) {
        uint32_t n = shapes[si][0], d = shapes[si][1];
        float *x = rand_floats((size_t)n * d, -3.0f, 3.0f);
        float *w = rand_floats(d, 0.5f, 1.5f);
        float *yr = malloc((size_t)n * d * sizeof(float));
        float *yb = malloc((size_t)n * d * sizeof(float));
        assert_non_null(yr);
        assert_non_null(yb);
        for (int ip = 0; ip < 2; ip++) {
            run_rmsnorm(g_ref, x, w, n, d, ip, yr);
            for (int i = 0; i < g_n_be; i++) {
                run_rmsnorm(g_be[i].be, x, w, n, d, ip, yb);
                check_close(yr, yb, (size_t)n * d, 2e-6, ip ? "rmsnorm in place" : "rmsnorm",
                            g_be[i].label);
            }
        }
        free(x);
        free(w);
        free(yr);
        free(yb);
    }
}

/* The fused residual add and norm: bit for bit the add and the norm on
 * the same backend, the result close to ref's; y over res or apart. */
static void
test_add_rmsnorm(void **state)
{
    (void)state;
    static const uint32_t shapes[][2] = {{1, 4096}, {5, 37}, {64, 2048}, {3, 8}};
    rng_seed(4);
    for (size_t si = 0; si < 4; si++) {
        uint32_t n = shapes[si][0], d = shapes[si][1];
        size_t m = (size_t)n * d;
        float *x = rand_floats(m, -3.0f, 3.0f), *res = rand_floats(m, -1.0f, 1.0f);
        float *w = rand_floats(d, 0.5f, 1.5f);
        float *buf = malloc(6 * m * sizeof(float));
        assert_non_null(buf);
        float *xr = buf, *yr = xr + m, *xf = yr + m, *yf = xf + m, *xu = yf + m, *yu = xu + m;
        for (int alias = 0; alias < 2; alias++) {
            run_add_rmsnorm(g_ref, true, x, res, w, n, d, alias, xr, yr);
            for (int i = 0; i < g_n_be; i++) {
                kern_backend_t *be = g_be[i].be;
                run_add_rmsnorm(be, true, x, res, w, n, d, alias, xf, yf);
                run_add_rmsnorm(be, false, x, res, w, n, d, alias, xu, yu);
                if (memcmp(xf, xu, m * sizeof(float)) || memcmp(yf, yu, m * sizeof(float)))
                    fail_msg("%s: add_rmsnorm %ux%u is not add then rmsnorm", g_be[i].label, n, d);
                check_close(xr, xf, m, 1e-7, "add_rmsnorm x", g_be[i].label);
                check_close(yr, yf, m, 2e-6, "add_rmsnorm y", g_be[i].label);
            }
        }
        free(x);
        free(res);
        free(w);
        free(buf);
    }
    /* y over x would lose the sum. */
    float *v = put(g_ref, NULL, 8 * sizeof(float));
    assert_int_equal(kern_add_rmsnorm(g_ref, v, v, v, 1, 8, 1e-5f, v), KVS_EINVAL);
    assert_int_equal(kern_add_rmsnorm(g_ref, v, v, v, 1, 0, 1e-5f, v + 1), KVS_EINVAL);
    assert_int_equal(kern_add_rmsnorm(g_ref, NULL, NULL, NULL, 0, 8, 1e-5f, NULL), 0);
    take(g_ref, NULL, v, 8 * sizeof(float), "v");
}

typedef struct rope_case {
    uint32_t n_rows, n_heads, head_dim, n_rot;
    float freq_base, freq_scale;
    bool factors;
    int32_t max_pos;
    bool neox;
} rope_case_t;

/* rc's arguments, x to be set. */
static kern_rope_args_t
rope_args(const rope_case_t *rc, const int32_t *pos, const float *ff)
{
    return (kern_rope_args_t){.n_rows = rc->n_rows,
                              .n_heads = rc->n_heads,
                              .head_dim = rc->head_dim,
                              .n_rot = rc->n_rot,
                              .pos = pos,
                              .freq_base = rc->freq_base,
                              .freq_scale = rc->freq_scale,
                              .freq_factors = rc->factors ? ff : NULL,
                              .neox = rc->neox};
}

static void
run_rope(kern_backend_t *be, const rope_case_t *rc, const float *x, const int32_t *pos,
         const float *ff, float *y)
{
    size_t n = (size_t)rc->n_rows * rc->n_heads * rc->head_dim;
    float *xd = put(be, x, n * sizeof(float));
    kern_rope_args_t a = rope_args(rc, pos, ff);
    a.x = xd;
    assert_int_equal(kern_rope(be, &a), 0);
    take(be, y, xd, n * sizeof(float), "rope x");
}

static void
test_rope(void **state)
{
    (void)state;
    static const rope_case_t cases[] = {
        {7, 4, 128, 128, 10000.0f, 1.0f, false, 4096, false},
        {5, 8, 128, 128, 500000.0f, 1.0f, true, 100000, false},
        {3, 2, 64, 32, 10000.0f, 0.25f, false, 100000, false},
        {4, 3, 80, 20, 500000.0f, 1.0f, true, 131072, false},
        {2, 2, 16, 6, 10000.0f, 1.0f, false, 7, false},
        {300, 8, 64, 64, 500000.0f, 1.0f, true, 100000, false}, /* several tasks */
        {6, 4, 128, 128, 1000000.0f, 1.0f, false, 32768, true}, /* NEOX (qwen2) */
        {3, 2, 64, 32, 10000.0f, 1.0f, true, 1000, true},       /* NEOX, partial */
    };
    rng_seed(4);
    for (size_t ci = 0; ci < sizeof(cases) / sizeof(cases[0]); ci++) {
        const rope_case_t *rc = &cases[ci];
        size_t n = (size_t)rc->n_rows * rc->n_heads * rc->head_dim;
        float *x = rand_floats(n, -2.0f, 2.0f);
        float *ff = rand_floats(rc->n_rot / 2, 1.0f, 8.0f);
        int32_t *pos = malloc(rc->n_rows * sizeof(int32_t));
        assert_non_null(pos);
        for (uint32_t r = 0; r < rc->n_rows; r++)
            pos[r] = (int32_t)(rng_u32() % (uint32_t)(rc->max_pos + 1));
        pos[0] = rc->max_pos;
        float *yr = malloc(n * sizeof(float)), *yb = malloc(n * sizeof(float));
        assert_non_null(yr);
        assert_non_null(yb);
        run_rope(g_ref, rc, x, pos, ff, yr);
        /* Dimensions past n_rot pass through untouched. */
        for (size_t i = 0; i < n; i++)
            if (i % rc->head_dim >= rc->n_rot)
                assert_true(yr[i] == x[i]);
        char what[64];
        snprintf(what, sizeof(what), "rope case %zu", ci);
        for (int i = 0; i < g_n_be; i++) {
            run_rope(g_be[i].be, rc, x, pos, ff, yb);
            check_close(yr, yb, n, 2e-6, what, g_be[i].label);
        }
        /* With a second tensor (K beside Q: a quarter of the heads, at
         * least one), under epochs too, on every backend and ref. */
        kern_rope_args_t a = rope_args(rc, pos, ff);
        uint32_t h2 = rc->n_heads / 4 ? rc->n_heads / 4 : 1;
        float *x2 = rand_floats((size_t)rc->n_rows * h2 * rc->head_dim, -2.0f, 2.0f);
        check_rope_fused(g_ref, &a, h2, x, x2, what);
        for (int i = 0; i < g_n_be; i++)
            check_rope_fused(g_be[i].be, &a, h2, x, x2, what);
        /* x2 and n_heads2 go together, and x2 must not overlap x. */
        a.x = x;
        a.x2 = x2;
        assert_int_equal(kern_rope(g_ref, &a), KVS_EINVAL);
        a.n_heads2 = h2;
        a.x2 = x + 1;
        assert_int_equal(kern_rope(g_ref, &a), KVS_EINVAL);
        a.x2 = NULL;
        assert_int_equal(kern_rope(g_ref, &a), KVS_EINVAL);
        free(x2);
        free(x);
        free(ff);
        free(pos);
        free(yr);
        free(yb);
    }
}

static void
test_elementwise(void **state)
{
    (void)state;
    static const size_t sizes[] = {1, 13, 4096, 100003};
    rng_seed(5);
    for (size_t si = 0; si < 4; si++) {
        size_t n = sizes[si];
        float *g = rand_floats(n, -20.0f, 20.0f);
        float *u = rand_floats(n, -3.0f, 3.0f);
        float *yr = malloc(n * sizeof(float)), *yb = malloc(n * sizeof(float));
        assert_non_null(yr);
        assert_non_null(yb);
        for (int alias = 0; alias < 2; alias++) {
            run_swiglu(g_ref, g, u, n, alias, yr);
            for (int i = 0; i < g_n_be; i++) {
                run_swiglu(g_be[i].be, g, u, n, alias, yb);
                check_close(yr, yb, n, 2e-6, alias ? "swiglu aliased" : "swiglu", g_be[i].label);
            }
        }
        run_add(g_ref, g, u, n, yr);
        for (int i = 0; i < g_n_be; i++) {
            run_add(g_be[i].be, g, u, n, yb);
            check_close(yr, yb, n, 0.0, "add", g_be[i].label);
        }
        free(g);
        free(u);
        free(yr);
        free(yb);
    }
}

/* ------------------------------------------------------------------------ */
/* KV cache: append, copy, attention.                                       */
/* ------------------------------------------------------------------------ */

static void
run_kv_append(kern_backend_t *be, const kv_geom_t *g, uint32_t layer, const float *k,
              const float *v, const int32_t *slots, uint32_t n, void *k_out, void *v_out)
{
    kern_kv_t kv = kv_make(be, g, NULL, NULL);
    size_t m = (size_t)n * g->n_kv_heads * g->head_dim;
    float *kd = put(be, k, m * sizeof(float)), *vd = put(be, v, m * sizeof(float));
    assert_int_equal(kern_kv_append(be, &kv, layer, kd, vd, slots, n), 0);
    take(be, NULL, kd, m * sizeof(float), "kv_append k");
    take(be, NULL, vd, m * sizeof(float), "kv_append v");
    kv_take(be, &kv, k_out, v_out);
}

static void
test_kv_append(void **state)
{
    (void)state;
    rng_seed(6);
    for (int dt = 0; dt < 2; dt++) {
        for (int order = 0; order < 3; order++) {
            kv_geom_t g = {dt ? KERN_F16 : KERN_F32, 2, 4, 64, 16, 64};
            uint32_t n = order == 2 ? 5 : 600;
            int32_t *slots = malloc(n * sizeof(int32_t));
            assert_non_null(slots);
            /* order 0: increasing with gaps (parallel path), 1: scrambled,
             * 2: a repeated slot, where the later token must win. */
            int32_t s = 0;
            for (uint32_t i = 0; i < n; i++) {
                s += 1 + (int32_t)(rng_u32() % 2);
                slots[i] = s % (int32_t)(g.n_blocks * g.block_tokens);
            }
            if (order == 1)
                shuffle(slots, n);
            if (order == 2)
                slots[3] = slots[1];
            size_t m = (size_t)n * g.n_kv_heads * g.head_dim;
            float *k = rand_floats(m, -4.0f, 4.0f), *v = rand_floats(m, -4.0f, 4.0f);
            size_t bytes = (size_t)g.n_layers * g.n_blocks * g.n_kv_heads * g.block_tokens *
                           g.head_dim * (dt ? 2 : 4);
            uint8_t *kr = malloc(bytes), *vr = malloc(bytes), *kb = malloc(bytes),
                    *vb = malloc(bytes);
            assert_true(kr && vr && kb && vb);
            run_kv_append(g_ref, &g, 1, k, v, slots, n, kr, vr);
            for (int i = 0; i < g_n_be; i++) {
                if (!kern_supports(g_be[i].be, KERN_OP_KV_APPEND, g.dtype))
                    continue;
                run_kv_append(g_be[i].be, &g, 1, k, v, slots, n, kb, vb);
                check_bytes_equal(kr, kb, bytes, "kv_append k", g_be[i].label);
                check_bytes_equal(vr, vb, bytes, "kv_append v", g_be[i].label);
            }
            free(slots);
            free(k);
            free(v);
            free(kr);
            free(vr);
            free(kb);
            free(vb);
        }
    }
}

static void
test_kv_copy(void **state)
{
    (void)state;
    rng_seed(7);
    for (int dt = 0; dt < 2; dt++) {
        for (int big = 0; big < 2; big++) {
            /* big: over a MiB moved, so the cpu backend goes parallel. */
            kv_geom_t g = {dt ? KERN_F16 : KERN_F32, 3, 2, 32, big ? 64 : 4, 24};
            size_t el = dt ? 2 : 4;
            size_t bytes =
                (size_t)g.n_layers * g.n_blocks * g.n_kv_heads * g.block_tokens * g.head_dim * el;
            uint8_t *k0 = malloc(bytes), *v0 = malloc(bytes);
            assert_true(k0 && v0);
            for (size_t i = 0; i < bytes; i++) {
                k0[i] = (uint8_t)rng_u32();
                v0[i] = (uint8_t)rng_u32();
            }
            /* Includes a chain (5 -> 9, 9 -> 2) and a self copy. */
            static const int32_t src[] = {5, 9, 0, 23, 7, 11, 12, 13};
            static const int32_t dst[] = {9, 2, 23, 0, 7, 20, 21, 22};
            uint32_t n = 8;
            uint8_t *kr = malloc(bytes), *vr = malloc(bytes), *kb = malloc(bytes),
                    *vb = malloc(bytes);
            assert_true(kr && vr && kb && vb);
            kern_kv_t kv = kv_make(g_ref, &g, k0, v0);
            assert_int_equal(kern_kv_copy(g_ref, &kv, src, dst, n), 0);
            kv_take(g_ref, &kv, kr, vr);
            /* Spot-check the reference itself: block 2 ends up with block 5's data. */
            size_t blk = bytes / g.n_layers / g.n_blocks;
            assert_memory_equal(kr + 2 * blk, k0 + 5 * blk, blk);
            assert_memory_equal(vr + (g.n_blocks + 20) * blk, v0 + (g.n_blocks + 11) * blk, blk);
            for (int i = 0; i < g_n_be; i++) {
                kv = kv_make(g_be[i].be, &g, k0, v0);
                assert_int_equal(kern_kv_copy(g_be[i].be, &kv, src, dst, n), 0);
                kv_take(g_be[i].be, &kv, kb, vb);
                check_bytes_equal(kr, kb, bytes, "kv_copy k", g_be[i].label);
                check_bytes_equal(vr, vb, bytes, "kv_copy v", g_be[i].label);
            }
            free(k0);
            free(v0);
            free(kr);
            free(vr);
            free(kb);
            free(vb);
        }
    }
}

static const attn_case_t attn_cases[] = {
    {"f32 bt16 d64 mha", KERN_F32, 16, 64, 4, 4, 3, {37, 16, 1}, {5, 1, 1}, 0},
    {"f16 bt4 d128 gqa4", KERN_F16, 4, 128, 8, 2, 3, {29, 8, 13}, {29, 1, 3}, 0},
    {"f32 bt1 d32 mqa", KERN_F32, 1, 32, 8, 1, 3, {20, 7, 1}, {3, 1, 1}, 0},
    {"f16 bt16 d64 mqa shared prefix", KERN_F16, 16, 64, 4, 1, 3, {40, 33, 17}, {2, 1, 17}, 2},
    {"f32 bt16 d128 gqa4 long", KERN_F32, 16, 128, 8, 2, 1, {3000}, {1}, 0},
    {"f16 bt16 d128 mqa long", KERN_F16, 16, 128, 4, 1, 2, {3000, 100}, {1, 2}, 0},
    {"f32 bt4 d20 (no simd dim)", KERN_F32, 4, 20, 6, 3, 3, {9, 4, 1}, {2, 1, 1}, 0},
    {"f16 bt16 d128 gqa4 prefill", KERN_F16, 16, 128, 8, 2, 2, {70, 300}, {64, 20}, 0},
    {"f32 bt16 d64 gqa8 shared", KERN_F32, 16, 64, 32, 4, 3, {64, 48, 200}, {1, 48, 3}, 3},
    {"f16 bt1 d32 mha long", KERN_F16, 1, 32, 2, 2, 1, {3000}, {4}, 0},
    /* Many query tiles (cuda stacks 64 / group rows per tile), an odd
     * block size and an odd group, beside decode rows. */
    {"f16 bt7 d64 gqa8 tiles", KERN_F16, 7, 64, 16, 2, 3, {300, 1, 130}, {150, 1, 129}, 0},
    {"f16 bt16 d128 mha tiles + long decode", KERN_F16, 16, 128, 2, 2, 2, {200, 2500}, {200, 1}, 0},
    {"f16 bt5 d128 gqa7", KERN_F16, 5, 128, 14, 2, 2, {90, 40}, {90, 3}, 0},
};

/* Compares a backend's attention with ref's, sequence by sequence: cuda's
 * tensor-core prefill (F16 KV, head_dim 64 or 128, sequences of more than
 * one row) rounds q and the softmax weights to f16. */
static void
check_attn(const attn_data_t *d, const float *yr, const float *yb, const test_be_t *tb,
           const char *what)
{
    const attn_case_t *c = d->c;
    size_t per_row = (size_t)c->n_heads * c->head_dim;
    bool tc = !kern_backend_is_host(tb->be) && c->dtype == KERN_F16 &&
              (c->head_dim == 64 || c->head_dim == 128);
    for (uint32_t s = 0; s < c->n_seqs; s++) {
        int32_t q0 = d->q_indptr[s], nq = d->q_indptr[s + 1] - q0;
        char w[128];
        snprintf(w, sizeof(w), "%s seq %u", what, s);
        check_close(yr + (size_t)q0 * per_row, yb + (size_t)q0 * per_row, (size_t)nq * per_row,
                    tc && nq > 1 ? 5e-3 : 1e-5, w, tb->label);
    }
}

static void
test_attention(void **state)
{
    (void)state;
    rng_seed(8);
    for (size_t ci = 0; ci < sizeof(attn_cases) / sizeof(attn_cases[0]); ci++) {
        const attn_case_t *c = &attn_cases[ci];
        attn_data_t d;
        attn_build(c, &d);
        size_t qn = (size_t)d.n_q * c->n_heads * c->head_dim;
        float *yr = malloc(qn * sizeof(float)), *yb = malloc(qn * sizeof(float)),
              *ys = malloc(qn * sizeof(float));
        assert_true(yr && yb && ys);
        run_attn(g_ref, &d, yr, NULL);
        for (int i = 0; i < g_n_be; i++) {
            if (!kern_supports(g_be[i].be, KERN_OP_ATTN, c->dtype))
                continue;
            char what[96];
            run_attn(g_be[i].be, &d, yb, ys);
            snprintf(what, sizeof(what), "attention %s (batched)", c->name);
            check_attn(&d, yr, yb, &g_be[i], what);
            snprintf(what, sizeof(what), "attention %s (per sequence)", c->name);
            check_attn(&d, yr, ys, &g_be[i], what);
        }
        free(yr);
        free(yb);
        free(ys);
        attn_free(&d);
    }
}

/* ------------------------------------------------------------------------ */
/* Argument validation (kern.c) and type support.                           */
/* ------------------------------------------------------------------------ */

static void
check_validation(kern_backend_t *be)
{
    kv_geom_t g = {KERN_F32, 1, 1, 8, 4, 4};
    kern_kv_t kv = kv_make(be, &g, NULL, NULL);
    float *buf = put(be, NULL, 64 * sizeof(float));
    float *out = put(be, NULL, 64 * sizeof(float));

    /* kv_append: slots past the pool or negative. */
    int32_t slot = 16;
    assert_int_equal(kern_kv_append(be, &kv, 0, buf, buf, &slot, 1), KVS_EINVAL);
    slot = -1;
    assert_int_equal(kern_kv_append(be, &kv, 0, buf, buf, &slot, 1), KVS_EINVAL);
    slot = 15;
    assert_int_equal(kern_kv_append(be, &kv, 1, buf, buf, &slot, 1), KVS_EINVAL); /* layer */
    assert_int_equal(kern_kv_append(be, &kv, 0, buf, buf, &slot, 1), 0);

    /* kv_copy: block ids out of range. */
    int32_t src = 0, dst = 4;
    assert_int_equal(kern_kv_copy(be, &kv, &src, &dst, 1), KVS_EINVAL);
    dst = -1;
    assert_int_equal(kern_kv_copy(be, &kv, &src, &dst, 1), KVS_EINVAL);

    /* attention: kv_len 0, kv_len past the sequence, bad block, bad last_len. */
    int32_t indptr[2] = {0, 2}, indices[2] = {3, 1}, last_len[1] = {2}, q_indptr[2] = {0, 1};
    int32_t kv_len[1] = {6};
    kern_attn_args_t a = {
        .q = buf,
        .out = out,
        .n_q = 1,
        .n_heads = 2,
        .q_indptr = q_indptr,
        .kv_len = kv_len,
        .pt = {.indptr = indptr, .indices = indices, .last_len = last_len, .n_seqs = 1},
        .kv = &kv,
        .layer = 0,
        .scale = 0.5f};
    assert_int_equal(kern_attention(be, &a), 0);
    kv_len[0] = 0;
    assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
    kv_len[0] = 7;
    assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
    kv_len[0] = 6;
    indices[1] = 4;
    assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
    indices[1] = 1;
    last_len[0] = 5;
    assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
    last_len[0] = 2;
    a.n_heads = 3; /* not a multiple of n_kv_heads... */
    kv.n_kv_heads = 2;
    assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
    kv.n_kv_heads = 1;

    /* get_rows: id out of range; matmul/get_rows on an unsupported type. */
    kern_tensor_t w = {.type = KERN_F32, .n_cols = 8, .n_rows = 4, .row_bytes = 32, .data = buf};
    int32_t id = 4;
    assert_int_equal(kern_get_rows(be, &w, &id, 1, out), KVS_EINVAL);
    w.type = KERN_Q4_1;
    w.n_cols = 32;
    w.n_rows = 1;
    w.row_bytes = kern_row_bytes(KERN_Q4_1, 32);
    assert_false(kern_supports(be, KERN_OP_MATMUL, KERN_Q4_1));
    assert_int_equal(kern_matmul(be, &w, buf, 1, NULL, out), KVS_ENOTSUP);

    kv_take(be, &kv, NULL, NULL);
    take(be, NULL, buf, 64 * sizeof(float), "validation buf");
    take(be, NULL, out, 64 * sizeof(float), "validation out");
}

static void
test_validation(void **state)
{
    (void)state;
    check_validation(g_ref);
    for (int i = 0; i < g_n_be; i++)
        check_validation(g_be[i].be);
    assert_true(kern_backend_is_host(g_ref));
    assert_string_equal(kern_backend_name(g_ref), "ref");
    assert_true(kern_supports(g_ref, KERN_OP_ATTN, KERN_F16));
    assert_false(kern_supports(g_ref, KERN_OP_ATTN, KERN_BF16));
    assert_false(kern_supports(g_ref, KERN_OP_COUNT, KERN_F32));
}

/* ------------------------------------------------------------------------ */
/* Strided transfers (the host tier's)                                      */
/* ------------------------------------------------------------------------ */

/* count runs of `bytes`, `stride` apart in backend memory, down into a
 * packed host array (kern_host_alloc's, as the host tier's copies are)
 * and back up from it: every run lands where it should and the gaps
 * between runs are left alone. */
static void
check_runs(kern_backend_t *be, size_t stride, size_t bytes, size_t count, const char *label)
{
    size_t span = stride * (count - 1) + bytes;
    uint8_t *init = malloc(span), *packed = kern_host_alloc(be, bytes * count), *got = malloc(span);
    assert_true(init && packed && got);
    assert_int_equal((uintptr_t)packed % 64, 0);
    for (size_t i = 0; i < span; i++)
        init[i] = (uint8_t)(rng_u32() >> 24);
    uint8_t *dev = put(be, init, span);
    memset(packed, 0xa5, bytes * count);
    assert_int_equal(kern_download_runs(be, packed, dev, stride, bytes, count), 0);
    for (size_t r = 0; r < count; r++)
        if (memcmp(packed + r * bytes, init + r * stride, bytes) != 0)
            fail_msg("%s: download run %zu of %zu (stride %zu, %zu bytes)", label, r, count, stride,
                     bytes);
    for (size_t i = 0; i < bytes * count; i++)
        packed[i] = (uint8_t)(rng_u32() >> 24);
    assert_int_equal(kern_upload_runs(be, dev, stride, packed, bytes, count), 0);
    get(be, got, dev, span, label);
    for (size_t i = 0; i < span; i++) {
        size_t r = count == 1 ? 0 : i / stride, o = count == 1 ? i : i % stride;
        bool in_run = r < count && o < bytes;
        uint8_t want = in_run ? packed[r * bytes + o] : init[i];
        if (got[i] != want)
            fail_msg("%s: upload byte %zu (%s run %zu): %u, want %u", label, i,
                     in_run ? "in" : "after", r, got[i], want);
    }
    kern_free(be, dev);
    free(init);
    kern_host_free(be, packed);
    free(got);
}

static void
test_transfer_runs(void **state)
{
    (void)state;
    kern_backend_t *all[9] = {g_ref};
    for (int i = 0; i < g_n_be; i++)
        all[i + 1] = g_be[i].be;
    for (int i = 0; i <= g_n_be; i++) {
        const char *label = i ? g_be[i - 1].label : "ref";
        check_runs(all[i], 4096, 4096, 3, label); /* back to back */
        check_runs(all[i], 1000, 96, 7, label);   /* gaps, odd sizes */
        check_runs(all[i], 64, 17, 1, label);     /* one run */
        check_runs(all[i], 8, 17, 1, label);      /* one run: any stride will do */
        check_runs(all[i], 0, 24, 1, label);
        check_runs(all[i], 32768 + 16, 2048, 32, label);
        uint8_t h[64];
        /* Overlapping runs, and a span past SIZE_MAX, are refused. */
        assert_int_equal(kern_download_runs(all[i], h, h, 8, 16, 2), KVS_EINVAL);
        assert_int_equal(kern_upload_runs(all[i], h, 8, h, 16, 2), KVS_EINVAL);
        assert_int_equal(kern_download_runs(all[i], h, h, SIZE_MAX / 2, 16, 3), KVS_EINVAL);
        assert_int_equal(kern_download_runs(all[i], h, h, 8, 16, 0), 0);
        assert_int_equal(kern_upload_runs(all[i], h, 8, h, 0, 4), 0);
        assert_null(kern_host_alloc(all[i], 0));
        assert_null(kern_host_alloc(all[i], SIZE_MAX - 8));
        kern_host_free(all[i], NULL);
    }
}

/* ------------------------------------------------------------------------ */
/* cpu thread pool                                                          */
/* ------------------------------------------------------------------------ */

typedef struct pool_probe {
    _Atomic int *hits; /* [n_tasks] */
    _Atomic int bad_thread;
    int n_threads;
} pool_probe_t;

static void
pool_probe_task(void *ctx, int task, int thread)
{
    pool_probe_t *p = ctx;
    if (thread < 0 || thread >= p->n_threads)
        atomic_store(&p->bad_thread, 1);
    atomic_fetch_add(&p->hits[task], 1);
}

static void
test_pool(void **state)
{
    (void)state;
    static const int sizes[] = {0, 1, 2, 3, 5, 64, 1000};
    for (int n_threads = 1; n_threads <= 4; n_threads++) {
        cpu_pool_t *pool;
        assert_int_equal(cpu_pool_new(n_threads, 0, &pool), 0);
        assert_int_equal(cpu_pool_size(pool), n_threads);
        _Atomic int *hits = calloc(1000, sizeof(*hits));
        assert_non_null(hits);
        /* Many back-to-back jobs: workers are caught spinning, sleeping
         * and in between. */
        for (int round = 0; round < 300; round++) {
            int n = sizes[round % 7];
            pool_probe_t p = {.hits = hits, .n_threads = n_threads};
            for (int i = 0; i < n; i++)
                atomic_store(&hits[i], 0);
            cpu_pool_run(pool, n, pool_probe_task, &p);
            for (int i = 0; i < n; i++)
                assert_int_equal(atomic_load(&hits[i]), 1);
            assert_int_equal(atomic_load(&p.bad_thread), 0);
        }
        free(hits);
        cpu_pool_free(pool);
    }
    cpu_pool_t *pool;
    assert_int_equal(cpu_pool_new(0, 0, &pool), KVS_EINVAL);
    cpu_pool_free(NULL);
}

/* kern_reserve: every field is required, the pools to seal in are
 * optional; host backends have nothing to size and a device backend's ops
 * keep working after it. */
static void
test_reserve(void **state)
{
    (void)state;
    const kern_reserve_t good = {.max_rows = 512,
                                 .max_cols = 1024,
                                 .max_seqs = 16,
                                 .max_ctx = 4096,
                                 .block_tokens = 16,
                                 .n_heads = 8,
                                 .n_kv_heads = 2,
                                 .head_dim = 64};
    for (int i = 0; i < g_n_be; i++) {
        kern_backend_t *be = g_be[i].be;
        assert_int_equal(kern_reserve(be, &good), 0);
        assert_int_equal(kern_reserve(be, NULL), KVS_EINVAL);
        for (int f = 0; f < 8; f++) {
            kern_reserve_t r = good;
            uint32_t *fields[] = {&r.max_rows,     &r.max_cols, &r.max_seqs,   &r.max_ctx,
                                  &r.block_tokens, &r.n_heads,  &r.n_kv_heads, &r.head_dim};
            *fields[f] = 0;
            assert_int_equal(kern_reserve(be, &r), KVS_EINVAL);
        }
        /* Seals: a pool with a codec and a batch size, or nothing. */
        const kv_geom_t g = {KERN_F16, 2, 2, 64, 16, 8};
        kern_kv_t q = kv_make_q(be, &g, KERN_KVQ_Q8_0, 4), plain = kv_make(be, &g, NULL, NULL);
        kern_reserve_t r = good;
        r.seal_kv[0] = &q;
        r.seal_blocks = 64;
        assert_int_equal(kern_reserve(be, &r), 0);
        r.seal_kv[1] = &q;
        assert_int_equal(kern_reserve(be, &r), 0);
        r.seal_blocks = 0;
        assert_int_equal(kern_reserve(be, &r), KVS_EINVAL);
        r.seal_blocks = 64;
        r.seal_kv[1] = &plain;
        assert_int_equal(kern_reserve(be, &r), KVS_EINVAL);
        kv_take_q(be, &q);
        kv_take(be, &plain, NULL, NULL);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_reserve),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_matmul_batch_invariant),
        cmocka_unit_test(test_matmul_fused),
        cmocka_unit_test(test_get_rows),
        cmocka_unit_test(test_dequant_simd),
        cmocka_unit_test(test_quant_roundtrip),
        cmocka_unit_test(test_rmsnorm),
        cmocka_unit_test(test_add_rmsnorm),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_elementwise),
        cmocka_unit_test(test_kv_append),
        cmocka_unit_test(test_kv_copy),
        cmocka_unit_test(test_attention),
        cmocka_unit_test(test_validation),
        cmocka_unit_test(test_transfer_runs),
        cmocka_unit_test(test_pool),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
