/*
 * tests/kernels/cu_test.h — what the host-only CUDA tests share
 * (test_cuda_dequant.cu, test_cuda_kvq.cu: nvcc-compiled programs that run
 * the __host__ side of device decoders): cmocka, declared for C, and a
 * seeded xorshift with uniform floats.  kern_test.h is C and does not
 * compile as C++.
 */
#ifndef CU_TEST_H
#define CU_TEST_H

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* cmocka.h declares its functions for C only. */
extern "C" {
#include <cmocka.h>
}

static uint64_t g_rng = 0x9e3779b97f4a7c15ull;

static inline uint32_t
rng_next(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (uint32_t)(g_rng >> 16);
}

/* Uniform in [lo, hi), 24 bits of the draw. */
static inline float
rng_f(float lo, float hi)
{
    return lo + (hi - lo) * (float)(rng_next() & 0xffffff) * (1.0f / 16777216.0f);
}

#endif /* CU_TEST_H */
