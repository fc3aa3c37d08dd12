/*
 * tests/kernels/test_cuda_dequant.cu — the cuda backend's block decoders
 * (kernels/cuda/cuda_dequant.cuh: Q4_0, Q4_K, Q5_K, Q6_K, eight values at
 * a time) against kern_row_to_f32, bit for bit.  The decoders are
 * __host__ __device__ and this runs their host side only, so it needs a
 * CUDA compiler but no GPU: machines without one still check the decoding
 * that get_rows and matmul use on the device (test_gpu covers the kernels
 * around it where a GPU is present).  ctest: cuda_dequant (CUDA builds).
 *
 * Rows are random bytes with every fp16 field made finite (all scale and
 * quant bit patterns), and rows quantized from random floats at three
 * magnitudes; each starts 2 bytes past an 8-aligned address, as a device
 * row may.
 */
#include "tests/kernels/cu_test.h"

#include "kernels/cuda/cuda_dequant.cuh"

/* An fp16 field at p made finite: an all-ones exponent loses its top bit. */
static void
finite_half(char *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    if ((h & 0x7c00) == 0x7c00)
        h = (uint16_t)(h & ~0x4000);
    memcpy(p, &h, 2);
}

/* Offsets of the fp16 fields in one block of `type`; returns how many. */
static int
half_fields(int type, size_t *off)
{
    switch (type) {
    case KERN_Q4_0:
        off[0] = 0;
        return 1;
    case KERN_Q4_K:
    case KERN_Q5_K:
        off[0] = 0, off[1] = 2;
        return 2;
    default: /* Q6_K */
        off[0] = 208;
        return 1;
    }
}

template <int T>
static void
check_type(void)
{
    const uint32_t cols = 4096; /* 128 Q4_0 blocks, 16 super-blocks */
    const kern_type_traits_t *tr = kern_type_traits(T);
    size_t rb = kern_row_bytes(T, cols), off[2];
    int n_half = half_fields(T, off);
    char *buf = (char *)malloc(rb + 8), *row = buf + 2;
    float *x = (float *)malloc(cols * sizeof(float)), *ref = (float *)malloc(cols * sizeof(float));
    assert_true(buf && x && ref);
    for (int it = 0; it < 60; it++) {
        if (it % 2 == 0) {
            for (size_t i = 0; i < rb; i++)
                row[i] = (char)rng_next();
            for (size_t b = 0; b < rb / tr->block_bytes; b++)
                for (int f = 0; f < n_half; f++)
                    finite_half(row + b * tr->block_bytes + off[f]);
        } else {
            float mag = it % 3 == 0 ? 1e-3f : it % 3 == 1 ? 1.0f : 300.0f;
            for (uint32_t c = 0; c < cols; c++)
                x[c] = mag * rng_f(-1.0f, 1.0f);
            assert_int_equal(kern_quantize_row(T, x, row, cols), 0);
        }
        assert_int_equal(kern_row_to_f32(T, row, ref, cols), 0);
        for (uint32_t c = 0; c < cols; c += 8) {
            float got[8];
            kern__cuda_dq8<T>(row, c, got);
            if (memcmp(got, ref + c, sizeof(got)) != 0) {
                for (int k = 0; k < 8; k++)
                    if (memcmp(&got[k], &ref[c + k], sizeof(float)) != 0)
                        print_error("%s: row %d value %u: %.9g, kern_row_to_f32 gives %.9g\n",
                                    tr->name, it, c + k, (double)got[k], (double)ref[c + k]);
                fail();
            }
        }
    }
    free(buf);
    free(x);
    free(ref);
}

static void
test_q4_0(void **state)
{
    (void)state;
    check_type<KERN_Q4_0>();
}

static void
test_q4_k(void **state)
{
    (void)state;
    check_type<KERN_Q4_K>();
}

static void
test_q5_k(void **state)
{
    (void)state;
    check_type<KERN_Q5_K>();
}

static void
test_q6_k(void **state)
{
    (void)state;
    check_type<KERN_Q6_K>();
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_q4_0),
        cmocka_unit_test(test_q4_k),
        cmocka_unit_test(test_q5_k),
        cmocka_unit_test(test_q6_k),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
