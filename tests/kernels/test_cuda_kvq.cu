/*
 * tests/kernels/test_cuda_kvq.cu — the cuda backend's reads of quantized
 * KV tiles (kernels/cuda/cuda_kvq.cuh: kern__kvq_elem, value by value)
 * against kern_kvq_decode, bit for bit, for every codec, K and V, at the
 * block sizes and head dims a pool takes.  The reader is __host__
 * __device__ and this runs its host side, so it needs nvcc but no GPU:
 * machines without one still check what the device attention, Quest
 * bounds, attention mass and row gather decode (test_gpu and
 * test_attn_policy cover the kernels around it where a GPU is present).
 * ctest: cuda_kvq (CUDA builds).
 *
 * Tiles come from kern_kvq_encode of random values at three magnitudes,
 * with outliers (a sink-like token, a hot channel), and, for the codecs
 * whose every byte pattern decodes (BF16, Q8_0, FP8), from random bytes;
 * NaN equals NaN.  Each tile starts at an odd address, as a Q4 tile in the
 * pool may.
 */
#include "tests/kernels/cu_test.h"

#include "kernels/cuda/cuda_kvq.cuh"

static bool
same(float a, float b)
{
    uint32_t x, y;
    memcpy(&x, &a, 4);
    memcpy(&y, &b, 4);
    return x == y || (a != a && b != b);
}

/* Every value of the tile read one at a time against the whole-tile decode
 * (and a decode of a run of tokens from the middle). */
static void
check_tile(kern_kvq_t q, bool v, const uint8_t *tile, uint32_t bt, uint32_t d, const char *what)
{
    float *want = (float *)malloc((size_t)bt * d * sizeof(float));
    assert_non_null(want);
    kern_kvq_decode(q, v, tile, bt, d, 0, bt, want);
    for (uint32_t t = 0; t < bt; t++)
        for (uint32_t c = 0; c < d; c++) {
            float got = kern__kvq_elem((int)q, v, tile, bt, d, t, c);
            if (!same(got, want[(size_t)t * d + c])) {
                print_error("%s %s %s bt %u d %u: (%u, %u) is %.9g, kern_kvq_decode %.9g\n",
                            kern_kvq_name(q), v ? "V" : "K", what, bt, d, t, c, (double)got,
                            (double)want[(size_t)t * d + c]);
                fail();
            }
        }
    if (bt > 2) {
        uint32_t t0 = bt / 3, n = bt - t0 - 1;
        float *part = (float *)malloc((size_t)n * d * sizeof(float));
        assert_non_null(part);
        kern_kvq_decode(q, v, tile, bt, d, t0, n, part);
        for (size_t i = 0; i < (size_t)n * d; i++)
            assert_true(same(part[i], want[(size_t)t0 * d + i]));
        free(part);
    }
    free(want);
}

static void
test_codecs(void **state)
{
    (void)state;
    static const kern_kvq_t codecs[] = {KERN_KVQ_BF16, KERN_KVQ_Q8_0, KERN_KVQ_FP8, KERN_KVQ_Q4};
    static const uint32_t bts[] = {16, 32, 64, 8, 2};
    static const uint32_t ds[] = {64, 128, 96, 256, 32};
    static const float mags[] = {1e-3f, 2.0f, 300.0f};
    int n_tiles = 0;
    for (size_t qi = 0; qi < sizeof(codecs) / sizeof(codecs[0]); qi++)
        for (int v = 0; v < 2; v++)
            for (size_t bi = 0; bi < sizeof(bts) / sizeof(bts[0]); bi++)
                for (size_t di = 0; di < sizeof(ds) / sizeof(ds[0]); di++) {
                    const kern_kvq_t q = codecs[qi];
                    const uint32_t bt = bts[bi], d = ds[di];
                    const size_t bytes = kern_kvq_tile_bytes(q, v, bt, d);
                    if (bytes == 0)
                        continue; /* a shape the codec cannot store */
                    uint8_t *buf = (uint8_t *)malloc(bytes + 1), *tile = buf + 1;
                    float *x = (float *)malloc((size_t)bt * d * sizeof(float));
                    assert_true(buf && x);
                    for (size_t mi = 0; mi < sizeof(mags) / sizeof(mags[0]); mi++) {
                        for (size_t i = 0; i < (size_t)bt * d; i++)
                            x[i] = rng_f(-mags[mi], mags[mi]);
                        for (uint32_t c = 0; c < d; c++)
                            x[c] *= 40.0f; /* token 0: a sink's large values */
                        for (uint32_t t = 0; t < bt; t++)
                            x[(size_t)t * d + d / 2] += 12.0f * mags[mi]; /* an outlier channel */
                        assert_int_equal(kern_kvq_encode(q, v, x, bt, d, tile), 0);
                        check_tile(q, v, tile, bt, d, "encoded");
                        n_tiles++;
                    }
                    if (q != KERN_KVQ_Q4) {
                        for (size_t i = 0; i < bytes; i++)
                            tile[i] = (uint8_t)rng_next();
                        check_tile(q, v, tile, bt, d, "random bytes");
                        n_tiles++;
                    }
                    free(buf);
                    free(x);
                }
    print_message("cuda_kvq: %d tiles, every value equal to kern_kvq_decode\n", n_tiles);
    assert_true(n_tiles > 100);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_codecs),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
