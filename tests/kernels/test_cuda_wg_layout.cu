/*
 * tests/kernels/test_cuda_wg_layout.cu — the shared-memory layout of the
 * wgmma prefill kernel (kernels/cuda/cuda_attn_tc.cuh) against the
 * operand layouts PTX defines for wgmma's shared-memory descriptors: for
 * every k16 step of both products, every element the descriptor names is
 * the K or V element the kernel's copies stored there.  Host code only
 * (tc_chunk, tc_wg_k_at, tc_wg_v_at, tc_wg_desc_bits are __host__
 * __device__), so it needs nvcc but no GPU; on Hopper, test_gpu runs the
 * kernel itself against ref.  ctest: cuda_wg_layout (CUDA builds).
 *
 * The model of the hardware, from the PTX ISA ("Shared Memory Matrix
 * Layout", 128-byte swizzle, 16-bit elements, T = 8 elements = 16 bytes):
 *   K-major  ((8,m),(T,2k)):((8T,SBO),(1,T))   row n of the N (or M)
 *            dimension at (n % 8) * 128 + (n / 8) * SBO bytes, element k
 *            of the k16 slice at 2k bytes from its row
 *   MN-major ((T,8,m),(8,k)):((1,T,LBO),(8T,SBO))   element n of the N
 *            dimension at 2 (n % 64) + (n / 64) * LBO bytes, row k of
 *            the k16 slice at (k % 8) * 128 + (k / 8) * SBO bytes
 * each from the descriptor's start address, then the swizzle: address
 * bits 4-6 XOR bits 7-9, on the shared-space address (so atoms must be
 * 1024-byte aligned).
 */
#include "tests/kernels/cu_test.h"

#include "kernels/cuda/cuda_attn_tc.cuh"

/* A 1024-aligned shared-space address for a stage, far from 0 so that
 * the 14-bit start field is exercised. */
#define STAGE_ADDR (37u * 1024u)

static uint32_t
swizzle128(uint32_t a)
{
    return a ^ (((a >> 7) & 7u) << 4);
}

typedef struct desc {
    uint32_t start, lbo, sbo;
} desc_t;

static desc_t
unpack(uint64_t d)
{
    assert_int_equal((unsigned)(d >> 62), 1); /* 128-byte swizzle */
    desc_t x = {(uint32_t)(d & 0x3fff) << 4, (uint32_t)((d >> 16) & 0x3fff) << 4,
                (uint32_t)((d >> 32) & 0x3fff) << 4};
    return x;
}

/* The byte address where the kernel's copy put (row tok, element e) of a
 * stage, e along the head dimension. */
template <int D>
static uint32_t
stored(int tok, int e)
{
    return STAGE_ADDR + 2u * (uint32_t)(tc_chunk<D, true>(tok, e / 8) + e % 8);
}

/* Every element of the stage has its own half inside the stage, and the
 * stage's size is what the kernel reserves. */
template <int D>
static void
check_stores(void)
{
    const int n = TC_N * D;
    uint8_t *seen = (uint8_t *)calloc((size_t)n, 1);
    assert_non_null(seen);
    for (int t = 0; t < TC_N; t++)
        for (int e = 0; e < D; e++) {
            uint32_t h = (stored<D>(t, e) - STAGE_ADDR) / 2;
            assert_true(h < (uint32_t)n);
            assert_int_equal(seen[h], 0);
            seen[h] = 1;
        }
    free(seen);
    /* The stages follow one another from a 1024-aligned start. */
    assert_int_equal((n * 2) % 1024, 0);
}

/* S = Q K^T: B[k][n] = K[key n][head dim 16 kk + k]. */
template <int D>
static void
check_k(void)
{
    for (int kk = 0; kk < D / 16; kk++) {
        desc_t d = unpack(
            tc_wg_desc_bits(STAGE_ADDR + 2u * (uint32_t)tc_wg_k_at(kk), TC_WG_K_LBO, TC_WG_K_SBO));
        for (int n = 0; n < TC_N; n++)
            for (int k = 0; k < 16; k++) {
                uint32_t a =
                    d.start + (uint32_t)(n % 8) * 128 + (uint32_t)(n / 8) * d.sbo + (uint32_t)k * 2;
                if (swizzle128(a) != stored<D>(n, 16 * kk + k))
                    fail_msg("d %d K step %d: B[%d][%d] read at %u, stored at %u", D, kk, k, n,
                             swizzle128(a), stored<D>(n, 16 * kk + k));
            }
    }
}

/* O += P V: B[k][n] = V[key 16 kk + k][head dim n]. */
template <int D>
static void
check_v(void)
{
    for (int kk = 0; kk < TC_N / 16; kk++) {
        desc_t d = unpack(
            tc_wg_desc_bits(STAGE_ADDR + 2u * (uint32_t)tc_wg_v_at(kk), TC_WG_V_LBO, TC_WG_V_SBO));
        for (int n = 0; n < D; n++)
            for (int k = 0; k < 16; k++) {
                uint32_t a = d.start + (uint32_t)(n % 64) * 2 + (uint32_t)(n / 64) * d.lbo +
                             (uint32_t)(k % 8) * 128 + (uint32_t)(k / 8) * d.sbo;
                if (swizzle128(a) != stored<D>(16 * kk + k, n))
                    fail_msg("d %d V step %d: B[%d][%d] read at %u, stored at %u", D, kk, k, n,
                             swizzle128(a), stored<D>(16 * kk + k, n));
            }
    }
}

static void
test_stores(void **state)
{
    (void)state;
    check_stores<64>();
    check_stores<128>();
}

static void
test_k_operand(void **state)
{
    (void)state;
    check_k<64>();
    check_k<128>();
}

static void
test_v_operand(void **state)
{
    (void)state;
    check_v<64>();
    check_v<128>();
}

/* Every instance's shared memory fits the CTAs per multiprocessor its
 * __launch_bounds__ asks for on Hopper (228 KiB, 1 KiB of it reserved per
 * CTA; 8 KiB for the static arrays, which ptxas puts at 2.3 KiB for M 64
 * and 5.7 KiB for M 128). */
static void
test_smem_fits(void **state)
{
    (void)state;
    const size_t cta = 1024 + 8192, sm = 228 * 1024;
    const size_t wg64 = tc_smem_bytes<128, true, 64>(), mma = tc_smem_bytes<128, false, 64>();
    const size_t wg128 = tc_smem_bytes<128, true, 128>();
    assert_true(2 * (wg64 + cta) <= sm);
    assert_true(2 * (mma + cta) <= sm);
    assert_true(wg128 + cta <= sm);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stores),
        cmocka_unit_test(test_k_operand),
        cmocka_unit_test(test_v_operand),
        cmocka_unit_test(test_smem_fits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
