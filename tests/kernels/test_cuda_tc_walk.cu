/*
 * tests/kernels/test_cuda_tc_walk.cu — the key walk of the tensor-core
 * prefill kernel (kernels/cuda/cuda_attn_tc.cuh), run on the host: which KV
 * tiles a CTA visits (every row's next visible position, the CTA's
 * minimum, the row's look past each tile) and each row's keep bits in
 * them, against kern.h's rule for which keys a row sees, over random
 * causal rows, block sizes, sinks, windows, block masks and dense rows.
 * Every key a row sees is kept exactly once, no other, and every tile
 * visited holds a key some row sees (the cost is O(kept keys)).  The
 * helpers it runs (tc_next_visible, tc_row_advance, tc_tile_of,
 * tc_row_bits) are __host__ __device__, the same code every instance of
 * the kernel runs, in the same order as its two-stage loop and as the
 * three-stage one (which asks for each next tile one tile earlier, from
 * the same row state).  ctest: cuda_tc_walk (CUDA builds).
 */
#include "tests/kernels/cu_test.h"

#include "kernels/cuda/cuda_attn_tc.cuh"

#include <vector>

#define ROWS 24

/* kern.h: row i sees key j < len when it is dense (lo < 0), or j is a
 * sink, in the window (j >= lo) or in a block its mask row keeps. */
static bool
sees(int j, int len, int lo, const uint8_t *mrow, int sinks, int bt)
{
    return j < len && (lo < 0 || j < sinks || j >= lo || (mrow && mrow[j / bt]));
}

typedef struct walk_case {
    int bt, sinks, window; /* window 0: none, lo = len (sinks and mask only) */
    int first;             /* kv_len of the first row; row r has first + r */
    int mask_pct;          /* share of blocks a mask row keeps; < 0: no mask */
    int q_block;           /* rows per mask row */
    int dense_pct;         /* share of dense rows */
} walk_case_t;

static void
walk(const walk_case_t *c)
{
    int len[ROWS], lo[ROWS], nv[ROWS];
    const uint8_t *mrow[ROWS];
    int max_len = c->first + ROWS;
    int n_blocks = (max_len + c->bt - 1) / c->bt;
    std::vector<uint8_t> mask((size_t)ROWS * n_blocks, 0);
    for (size_t i = 0; i < mask.size(); i++)
        mask[i] = (int)(rng_next() % 100) < c->mask_pct;
    for (int r = 0; r < ROWS; r++) {
        len[r] = c->first + r + 1;
        bool dense = (int)(rng_next() % 100) < c->dense_pct;
        lo[r] = dense ? -1 : c->window == 0 ? len[r] : len[r] <= c->window ? 0 : len[r] - c->window;
        mrow[r] = c->mask_pct >= 0 && !dense ? &mask[(size_t)(r / c->q_block) * n_blocks] : NULL;
        nv[r] = tc_next_visible(0, len[r], lo[r], mrow[r], c->sinks, c->bt);
    }
    std::vector<int> kept((size_t)ROWS * max_len, 0);

    int m = TC_END;
    for (int r = 0; r < ROWS; r++)
        m = nv[r] < m ? nv[r] : m;
    int prev = -1;
    for (int cur = tc_tile_of(m); cur != TC_END;) {
        assert_true(cur > prev && cur % TC_N == 0);
        prev = cur;
        bool any = false;
        for (int r = 0; r < ROWS; r++)
            for (int h = 0; h < 2; h++) {
                int j0 = cur + 32 * h;
                uint32_t bits = tc_row_bits(j0, len[r], lo[r], nv[r], mrow[r], c->sinks, c->bt);
                any |= bits != 0;
                for (int u = 0; u < 32; u++)
                    if ((bits >> u) & 1u) {
                        assert_true(j0 + u < len[r]);
                        kept[(size_t)r * max_len + j0 + u]++;
                    }
            }
        assert_true(any);
        m = TC_END;
        for (int r = 0; r < ROWS; r++) {
            nv[r] = tc_row_advance(cur, nv[r], len[r], lo[r], mrow[r], c->sinks, c->bt);
            m = nv[r] < m ? nv[r] : m;
        }
        cur = tc_tile_of(m);
    }
    for (int r = 0; r < ROWS; r++)
        for (int j = 0; j < max_len; j++) {
            int want = sees(j, len[r], lo[r], mrow[r], c->sinks, c->bt);
            if (kept[(size_t)r * max_len + j] != want)
                fail_msg("row %d (len %d, lo %d, %s) key %d: kept %d times, sees it: %d (bt %d, "
                         "sinks %d)",
                         r, len[r], lo[r], mrow[r] ? "mask" : "no mask", j,
                         kept[(size_t)r * max_len + j], want, c->bt, c->sinks);
        }
}

/* Sinks, windows and masks of every shape against block sizes that do
 * and do not divide a tile. */
static void
test_walk_patterns(void **state)
{
    (void)state;
    static const int bts[] = {1, 3, 16, 32, 48, 64, 100, 256};
    static const int sinks[] = {0, 1, 4, 63, 64, 70};
    static const int windows[] = {0, 1, 17, 64, 200, 5000};
    static const int masks[] = {-1, 0, 10, 50, 100};
    for (size_t b = 0; b < sizeof bts / sizeof bts[0]; b++)
        for (size_t s = 0; s < sizeof sinks / sizeof sinks[0]; s++)
            for (size_t w = 0; w < sizeof windows / sizeof windows[0]; w++)
                for (size_t k = 0; k < sizeof masks / sizeof masks[0]; k++) {
                    walk_case_t c = {bts[b], sinks[s], windows[w], 0, masks[k], 1, 0};
                    c.first = (int)(rng_next() % 1500);
                    c.q_block = 1 + (int)(rng_next() % 8);
                    c.dense_pct = (int)(rng_next() % 3) * 25;
                    walk(&c);
                }
}

/* Dense causal rows: every tile from 0 to the last row's end, all kept
 * but the diagonal's tail. */
static void
test_walk_dense(void **state)
{
    (void)state;
    for (int first = 0; first < 300; first += 7) {
        walk_case_t c = {16, 0, 0, first, -1, 1, 100};
        walk(&c);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_walk_dense),
        cmocka_unit_test(test_walk_patterns),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
