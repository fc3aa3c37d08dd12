/*
 * tests/kernels/test_kvq.c — the quantized KV tile codecs (kern_kvq_*,
 * kernels/kern_kvq.c): BF16, Q8_0, FP8 and Q4, K and V sides, tiles of 16
 * and 32 tokens by 64 and 128 channels.
 *
 * Every decoded element is held to its codec's bound (roundtrip), with
 * the scale the tile stores read back through the layout kern_kvq.c
 * documents, and the stored scales themselves held to the rule that
 * makes them:
 *   BF16  |e| <= 2^-8 |x|, and bit for bit bf16 rounding to nearest even.
 *   Q8_0  |e| <= d/2 + 127 |d - d32| + 2^-15 d32, d the stored fp16 scale
 *         and d32 = max|x| / 127 before rounding: q = round(x / d32) is
 *         within 1/2 of x / d32, and rescaling by the rounded d moves a
 *         code of at most 127 by 127 |d - d32|.  (Plain d/2 does not hold:
 *         the fp16 rounding of d adds up to 127 * 2^-11 d, about 0.062 d.)
 *   FP8   with s the stored scale: |e| <= 2^-4 |x| (1 + 2^-16) where
 *         |x| >= 2^-6 s (e4m3 normals: 3 mantissa bits, half a step is at
 *         most 2^-4 of the value; saturation past 448 stays under 16/464),
 *         else |e| <= 2^-10 s (1 + 2^-16) (subnormal steps are 2^-9 s).
 *   Q4    with step and mn a group's stored step D * sc and min
 *         M0 + DM * mq: mn <= min, mn + 15 step >= max (nothing clamps),
 *         |e| <= step / 2 + 2^-22 (|mn| + 16 step); mq and sc the best for
 *         the stored units, M0 and D exactly as their rules say, DM no
 *         coarser than span / 63; and the tile's sum of squared steps
 *         within what the data alone allows under the span / 63 rule, +1%
 *         (q4_step_bound: fp16 units rounded by at most one step, each
 *         group's mn at most DM below its min, sc at most one unit more
 *         than its range needs).
 * Decoding any token range must give the bytes of the full decode's slice
 * and write nothing past it; non-finite inputs must encode exactly as 0
 * does.  Inputs come from a fixed-seed PRNG; the outlier data (channels
 * scaled 50-100x with offsets, sink tokens 30-40x) prints its errors.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <math.h>

#include "kernels/kern.h"
#include "kernels/kern_int.h"
#include "tests/kernels/kern_test.h"

static const kern_kvq_t codecs[] = {KERN_KVQ_BF16, KERN_KVQ_Q8_0, KERN_KVQ_FP8, KERN_KVQ_Q4};
#define N_CODECS (sizeof(codecs) / sizeof(codecs[0]))
static const uint32_t bts[] = {16, 32};
static const uint32_t ds[] = {64, 128};

enum { DIST_UNIFORM, DIST_GAUSS, DIST_OUTLIER, N_DIST };
static const char *const dist_names[N_DIST] = {"uniform", "gauss", "outlier"};

/* ------------------------------------------------------------------------ */
/* Data.                                                                    */
/* ------------------------------------------------------------------------ */

static float
gauss(void)
{
    float u1 = rng_f(1e-7f, 1.0f), u2 = rng_f(0.0f, 1.0f);
    return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853f * u2);
}

/* K-like outliers: a few channels 50-100x with offsets, two sink tokens
 * with 30-40x norms. */
static void
fill(float *x, uint32_t bt, uint32_t d, int dist)
{
    for (uint32_t t = 0; t < bt; t++) {
        for (uint32_t c = 0; c < d; c++) {
            float v = dist == DIST_UNIFORM ? rng_f(-1.0f, 1.0f) : gauss();
            if (dist == DIST_OUTLIER) {
                if (c == 3)
                    v = 50.0f * v + 20.0f;
                else if (c == d / 2 + 1)
                    v *= 75.0f;
                else if (c == d - 5)
                    v = 100.0f * v - 40.0f;
                if (t == 0)
                    v *= 40.0f;
                else if (t == bt / 2 + 3)
                    v *= 30.0f;
            }
            x[(size_t)t * d + c] = v;
        }
    }
}

static float
sanitize(float x)
{
    return isfinite(x) ? x : 0.0f;
}

static uint16_t
ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* ------------------------------------------------------------------------ */
/* Bounds, one codec at a time.                                             */
/* ------------------------------------------------------------------------ */

typedef struct stats {
    double max_err;   /* max |y - x| */
    double max_rel;   /* max |y - x| / max|x| of the tile */
    double max_ratio; /* max |y - x| / bound */
    double max_scale; /* Q8_0: max |e| / d; Q4: max |e| / (range / 30), KIVI's own step / 2 */
    double sum_e2, sum_x2;
} stats_t;

static void
note(stats_t *st, double err, double bound, double amax, double x)
{
    st->sum_e2 += err * err;
    st->sum_x2 += x * x;
    if (err > st->max_err)
        st->max_err = err;
    if (amax > 0 && err / amax > st->max_rel)
        st->max_rel = err / amax;
    if (bound > 0 && err / bound > st->max_ratio)
        st->max_ratio = err / bound;
}

static void
fail_at(const char *what, size_t i, double x, double y, double bound)
{
    print_error("%s: element %zu: x %.9g decoded %.9g |err| %.3g > bound %.3g\n", what, i, x, y,
                fabs(y - x), bound);
    fail();
}

static void
check_bf16(const float *xs, const uint8_t *tile, const float *y, size_t n, stats_t *st, double amax,
           const char *what)
{
    for (size_t i = 0; i < n; i++) {
        uint16_t h = kvs_f32_to_bf16(xs[i]);
        assert_int_equal(ld16(tile + 2 * i), h);
        double err = fabs((double)y[i] - xs[i]), bound = ldexp(fabs(xs[i]), -8);
        if (!(err <= bound) || y[i] != kvs_bf16_to_f32(h))
            fail_at(what, i, xs[i], y[i], bound);
        note(st, err, bound, amax, xs[i]);
    }
}

static void
check_q8_0(const float *xs, const uint8_t *tile, const float *y, size_t n, stats_t *st, double amax,
           const char *what)
{
    for (size_t b = 0; b < n / 32; b++) {
        float bmax = 0.0f;
        for (int j = 0; j < 32; j++)
            bmax = fmaxf(bmax, fabsf(xs[b * 32 + j]));
        float d32 = bmax / 127.0f;
        uint16_t dh = ld16(tile + b * 34);
        assert_int_equal(dh, kvs_f32_to_fp16(d32));
        double d = kvs_fp16_to_f32(dh);
        double bound = 0.5 * d + 127.0 * fabs(d - d32) + ldexp(d32, -15);
        for (int j = 0; j < 32; j++) {
            size_t i = b * 32 + j;
            double err = fabs((double)y[i] - xs[i]);
            if (!(err <= bound))
                fail_at(what, i, xs[i], y[i], bound);
            note(st, err, bound, amax, xs[i]);
            if (d > 0 && err / d > st->max_scale)
                st->max_scale = err / d;
        }
    }
}

static void
check_fp8(const float *xs, const uint8_t *tile, const float *y, uint32_t bt, uint32_t d,
          stats_t *st, double amax, const char *what)
{
    for (uint32_t t = 0; t < bt; t++) {
        const float *row = xs + (size_t)t * d;
        float rmax = 0.0f;
        for (uint32_t c = 0; c < d; c++)
            rmax = fmaxf(rmax, fabsf(row[c]));
        uint16_t sh = ld16(tile + 2 * t), h = kvs_f32_to_fp16(rmax / 448.0f);
        double s = kvs_fp16_to_f32(sh);
        if (rmax == 0.0f) {
            assert_int_equal(sh, 0);
        } else {
            /* Nearest, or one step up where that would saturate. */
            assert_true(sh == h || (sh == h + 1 && rmax > kvs_fp16_to_f32(h) * 464.0));
            assert_true(rmax <= s * 464.0);
        }
        for (uint32_t c = 0; c < d; c++) {
            size_t i = (size_t)t * d + c;
            double ax = fabs(row[c]), err = fabs((double)y[i] - row[c]);
            double bound = ax >= ldexp(s, -6) ? ldexp(ax, -4) : ldexp(s, -10);
            bound *= 1.0 + ldexp(1.0, -16);
            if (!(err <= bound))
                fail_at(what, i, row[c], y[i], bound);
            note(st, err, bound, amax, row[c]);
        }
    }
}

/* Q4 group g of a [bt][d] tile, as kern_kvq.c numbers them. */
static size_t
q4_index(bool v, uint32_t bt, uint32_t d, size_t g, uint32_t i)
{
    uint32_t gk = bt < 32 ? bt : 32;
    if (v)
        return g * 32 + i;
    return ((g / d) * gk + i) * d + g % d;
}

static void
q4_group_minmax(const float *xs, bool v, uint32_t bt, uint32_t d, size_t g, float *mn, float *mx)
{
    uint32_t len = v ? 32 : (bt < 32 ? bt : 32);
    *mn = INFINITY;
    *mx = -INFINITY;
    for (uint32_t i = 0; i < len; i++) {
        float x = xs[q4_index(v, bt, d, g, i)];
        *mn = fminf(*mn, x);
        *mx = fmaxf(*mx, x);
    }
}

/* The largest step the span / 63 rule for DM can give group g, from the
 * data alone: M0 sits at most one fp16 step below the lowest min, DM and
 * D at most one fp16 step above span / 63 and max(max - mn) / 945, a
 * group's mn at most DM below its min, and sc at most one unit above
 * (max - mn) / 15D. */
static double
q4_step_bound(const float *xs, bool v, uint32_t bt, uint32_t d, size_t groups, size_t g)
{
    float lo = INFINITY, hi_min = -INFINITY, maxr = 0.0f, amax = 0.0f, mn, mx;
    for (size_t k = 0; k < groups; k++) {
        q4_group_minmax(xs, v, bt, d, k, &mn, &mx);
        lo = fminf(lo, mn);
        hi_min = fmaxf(hi_min, mn);
        maxr = fmaxf(maxr, mx - mn);
        amax = fmaxf(amax, fmaxf(fabsf(mn), fabsf(mx)));
    }
    double u16 = ldexp(1.0, -10), sub16 = ldexp(1.0, -24), eps = ldexp(amax, -20) + sub16;
    double span = (double)hi_min - lo + fmax(fabs(lo) * u16, sub16);
    double dmb = span / 63.0 * (1.0 + 2 * u16) + sub16;
    double db = (maxr + dmb + eps) / 945.0 * (1.0 + 2 * u16) + sub16;
    q4_group_minmax(xs, v, bt, d, g, &mn, &mx);
    return ((double)mx - mn + dmb + eps) / 15.0 + db;
}

static void
check_q4(const float *xs, const uint8_t *tile, const float *y, bool v, uint32_t bt, uint32_t d,
         stats_t *st, double amax, const char *what)
{
    size_t n = (size_t)bt * d, groups = n / (v ? 32 : (bt < 32 ? bt : 32));
    uint32_t len = (uint32_t)(n / groups);
    uint16_t dh = ld16(tile), m0h = ld16(tile + 2), dmh = ld16(tile + 4);
    float dunit = kvs_fp16_to_f32(dh), m0 = kvs_fp16_to_f32(m0h), dm = kvs_fp16_to_f32(dmh);
    const uint8_t *params = tile + 6;
    float lo = INFINITY, hi_min = -INFINITY, mn, mx;
    double max_diff = 0.0, sum_step2 = 0.0, sum_bound2 = 0.0;
    for (size_t g = 0; g < groups; g++) {
        q4_group_minmax(xs, v, bt, d, g, &mn, &mx);
        lo = fminf(lo, mn);
        hi_min = fmaxf(hi_min, mn);
    }
    /* The units: M0 the fp16 at or just below the lowest min, DM no
     * coarser than span / 63 rounded up (0 only for no spread). */
    assert_true(m0 <= lo && lo - m0 <= fmax(fabs(lo) * ldexp(1.0, -10), ldexp(1.0, -24)));
    double span = (double)hi_min - m0;
    if (span == 0.0)
        assert_true(dm == 0.0f);
    else
        assert_true(dm > 0.0f && dm <= span / 63.0 * (1.0 + ldexp(1.0, -9)) + ldexp(1.0, -24));
    for (size_t g = 0; g < groups; g++) {
        const uint8_t *p = params + 3 * (g / 2);
        uint32_t w = p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
        uint32_t f = g & 1 ? w >> 12 : w & 0xfff, sc = f & 63, mq = f >> 6;
        float step = dunit * (float)sc, gmin = m0 + dm * (float)mq;
        q4_group_minmax(xs, v, bt, d, g, &mn, &mx);
        /* Coverage, and the best mq and sc for the stored units. */
        assert_true(gmin <= mn);
        assert_true((double)gmin + 15.0 * step >= mx);
        if (dm > 0.0f)
            assert_true(mq == 63 || m0 + dm * (float)(mq + 1) > mn);
        double diff = (double)mx - gmin;
        assert_true(sc == 0 ? diff == 0.0 : 15.0 * dunit * (sc - 1) < diff);
        max_diff = fmax(max_diff, diff);
        double sb = q4_step_bound(xs, v, bt, d, groups, g);
        sum_step2 += (double)step * step;
        sum_bound2 += sb * sb;

        double bound = 0.5 * step + ldexp(fabs(gmin) + 16.0 * step, -22);
        for (uint32_t i = 0; i < len; i++) {
            size_t at = q4_index(v, bt, d, g, i);
            double err = fabs((double)y[at] - xs[at]);
            if (!(err <= bound))
                fail_at(what, at, xs[at], y[at], bound);
            note(st, err, bound, amax, xs[at]);
            if (mx > mn && err / ((mx - mn) / 30.0) > st->max_scale)
                st->max_scale = err / ((mx - mn) / 30.0);
        }
    }
    /* D: the smallest fp16 with 945 D >= every group's max - mn. */
    if (max_diff == 0.0)
        assert_int_equal(dh, 0);
    else
        assert_true(945.0 * dunit >= max_diff && 945.0 * kvs_fp16_to_f32(dh - 1) < max_diff);
    /* Whatever DM the encoder picks, the tile's squared error is no worse
     * than the span / 63 rule's bound allows (the search only keeps a
     * smaller sum of squared steps; 1% for its approximate ranking). */
    if (!(sum_step2 <= 1.01 * sum_bound2)) {
        print_error("%s: sum of squared steps %.6g > data bound %.6g\n", what, sum_step2,
                    sum_bound2);
        fail();
    }
}

/* Encodes x, decodes the whole tile and holds every element to its
 * codec's bound; non-finite inputs count as 0.  Returns the tile. */
static uint8_t *
roundtrip(kern_kvq_t q, bool v, uint32_t bt, uint32_t d, const float *x, stats_t *st)
{
    size_t n = (size_t)bt * d, bytes = kern_kvq_tile_bytes(q, v, bt, d);
    assert_true(bytes > 0);
    uint8_t *tile = malloc(bytes);
    float *y = malloc(n * sizeof(float)), *xs = malloc(n * sizeof(float));
    assert_true(tile && y && xs);
    memset(tile, 0xa5, bytes);
    assert_int_equal(kern_kvq_encode(q, v, x, bt, d, tile), 0);
    for (size_t i = 0; i < n; i++)
        y[i] = NAN;
    kern_kvq_decode(q, v, tile, bt, d, 0, bt, y);
    double amax = 0.0;
    for (size_t i = 0; i < n; i++) {
        xs[i] = sanitize(x[i]);
        amax = fmax(amax, fabs(xs[i]));
        assert_true(isfinite(y[i]));
    }
    char what[96];
    snprintf(what, sizeof what, "%s %s bt %u d %u", kern_kvq_name(q), v ? "V" : "K", bt, d);
    stats_t local = {0};
    if (st == NULL)
        st = &local;
    switch (q) {
    case KERN_KVQ_BF16:
        check_bf16(xs, tile, y, n, st, amax, what);
        break;
    case KERN_KVQ_Q8_0:
        check_q8_0(xs, tile, y, n, st, amax, what);
        break;
    case KERN_KVQ_FP8:
        check_fp8(xs, tile, y, bt, d, st, amax, what);
        break;
    case KERN_KVQ_Q4:
        check_q4(xs, tile, y, v, bt, d, st, amax, what);
        break;
    default:
        fail();
    }
    free(y);
    free(xs);
    return tile;
}

/* ------------------------------------------------------------------------ */
/* Tests.                                                                   */
/* ------------------------------------------------------------------------ */

static void
test_roundtrip_bounds(void **state)
{
    (void)state;
    rng_seed(1);
    for (size_t qi = 0; qi < N_CODECS; qi++) {
        for (int side = 0; side < 2; side++) {
            for (int dist = 0; dist < N_DIST; dist++) {
                stats_t st = {0};
                for (size_t bi = 0; bi < 2; bi++) {
                    for (size_t di = 0; di < 2; di++) {
                        uint32_t bt = bts[bi], d = ds[di];
                        float *x = malloc((size_t)bt * d * sizeof(float));
                        assert_non_null(x);
                        for (int rep = 0; rep < 4; rep++) {
                            fill(x, bt, d, dist);
                            free(roundtrip(codecs[qi], side, bt, d, x, &st));
                        }
                        free(x);
                    }
                }
                char extra[48] = "";
                if (codecs[qi] == KERN_KVQ_Q8_0)
                    snprintf(extra, sizeof extra, " err/d %.3f", st.max_scale);
                else if (codecs[qi] == KERN_KVQ_Q4)
                    snprintf(extra, sizeof extra, " err/(range/30) %.3f", st.max_scale);
                print_message("%-5s %s %-8s max|err| %-9.4g max|err|/max|x| %-9.4g "
                              "rms err/rms x %-9.4g err/bound %.3f%s\n",
                              kern_kvq_name(codecs[qi]), side ? "V" : "K", dist_names[dist],
                              st.max_err, st.max_rel, sqrt(st.sum_e2 / st.sum_x2), st.max_ratio,
                              extra);
            }
        }
    }
}

static void
test_subrange_bit_exact(void **state)
{
    (void)state;
    rng_seed(2);
    for (size_t qi = 0; qi < N_CODECS; qi++) {
        for (int side = 0; side < 2; side++) {
            for (size_t bi = 0; bi < 2; bi++) {
                for (size_t di = 0; di < 2; di++) {
                    kern_kvq_t q = codecs[qi];
                    uint32_t bt = bts[bi], d = ds[di];
                    size_t n = (size_t)bt * d;
                    float *x = malloc(n * sizeof(float)), *full = malloc(n * sizeof(float));
                    float *part = malloc((n + GUARD) * sizeof(float));
                    uint8_t *tile = malloc(kern_kvq_tile_bytes(q, side, bt, d));
                    assert_true(x && full && part && tile);
                    fill(x, bt, d, DIST_OUTLIER);
                    assert_int_equal(kern_kvq_encode(q, side, x, bt, d, tile), 0);
                    kern_kvq_decode(q, side, tile, bt, d, 0, bt, full);
                    for (uint32_t t0 = 0; t0 < bt; t0++) {
                        for (uint32_t cnt = 1; t0 + cnt <= bt; cnt++) {
                            for (size_t i = 0; i < n + GUARD; i++)
                                part[i] = sentinel();
                            kern_kvq_decode(q, side, tile, bt, d, t0, cnt, part);
                            size_t m = (size_t)cnt * d;
                            assert_memory_equal(part, full + (size_t)t0 * d, m * sizeof(float));
                            for (size_t i = m; i < m + GUARD; i++)
                                assert_int_equal(kvs_f32_to_bits(part[i]), SENTINEL_BITS);
                        }
                    }
                    free(x);
                    free(full);
                    free(part);
                    free(tile);
                }
            }
        }
    }
}

static void
test_tile_bytes(void **state)
{
    (void)state;
    static const struct {
        kern_kvq_t q;
        bool v;
        uint32_t bt, d;
        size_t bytes;
    } cases[] = {
        {KERN_KVQ_BF16, false, 16, 64, 2048},
        {KERN_KVQ_BF16, true, 32, 128, 8192},
        {KERN_KVQ_BF16, false, 3, 5, 30},
        {KERN_KVQ_Q8_0, false, 16, 64, 1088},
        {KERN_KVQ_Q8_0, true, 32, 64, 2176},
        {KERN_KVQ_Q8_0, false, 32, 128, 4352},
        {KERN_KVQ_FP8, false, 16, 64, 1056},
        {KERN_KVQ_FP8, true, 32, 64, 2112},
        {KERN_KVQ_FP8, false, 32, 128, 4160},
        {KERN_KVQ_FP8, true, 3, 48, 150},
        /* Q4: 6 + 3 G / 2 + bt d / 2 */
        {KERN_KVQ_Q4, false, 16, 64, 614},
        {KERN_KVQ_Q4, true, 16, 64, 566},
        {KERN_KVQ_Q4, false, 32, 64, 1126},
        {KERN_KVQ_Q4, true, 32, 64, 1126},
        {KERN_KVQ_Q4, false, 32, 128, 2246},
        {KERN_KVQ_Q4, true, 32, 128, 2246},
        {KERN_KVQ_Q4, false, 64, 128, 4486},
        {KERN_KVQ_Q4, true, 2, 32, 41},
        {KERN_KVQ_Q4, false, 2, 32, 86},
        {KERN_KVQ_Q4, true, 48, 64, 1686},
        /* unsupported shapes */
        {KERN_KVQ_Q8_0, false, 16, 48, 0},
        {KERN_KVQ_Q4, false, 16, 48, 0},
        {KERN_KVQ_Q4, true, 16, 48, 0},
        {KERN_KVQ_Q4, false, 15, 64, 0},
        {KERN_KVQ_Q4, true, 15, 64, 0},
        {KERN_KVQ_Q4, false, 48, 64, 0},
        {KERN_KVQ_BF16, false, 0, 64, 0},
        {KERN_KVQ_FP8, true, 16, 0, 0},
        {KERN_KVQ_Q8_0, false, 0, 64, 0},
        {KERN_KVQ_NONE, false, 16, 64, 0},
        {KERN_KVQ_COUNT, false, 16, 64, 0},
        {(kern_kvq_t)99, true, 16, 64, 0},
        {KERN_KVQ_Q4, true, 0, 64, 0},
        {KERN_KVQ_BF16, false, 0xffffffffu, 0xffffffffu, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        size_t got = kern_kvq_tile_bytes(cases[i].q, cases[i].v, cases[i].bt, cases[i].d);
        if (got != cases[i].bytes) {
            print_error("case %zu: tile_bytes %zu, expected %zu\n", i, got, cases[i].bytes);
            fail();
        }
    }
    /* Bits a value: Q4 under 4.4 at bt 32 (both sides), what bt 16 costs. */
    for (int side = 0; side < 2; side++) {
        double b32 = kern_kvq_tile_bytes(KERN_KVQ_Q4, side, 32, 64) * 8.0 / (32 * 64);
        double b32w = kern_kvq_tile_bytes(KERN_KVQ_Q4, side, 32, 128) * 8.0 / (32 * 128);
        double b16 = kern_kvq_tile_bytes(KERN_KVQ_Q4, side, 16, 64) * 8.0 / (16 * 64);
        assert_true(b32 < 4.4);
        assert_true(b32w < 4.4);
        assert_true(b16 < (side ? 4.43 : 4.8));
    }
    for (size_t qi = 0; qi < N_CODECS; qi++)
        for (int side = 0; side < 2; side++)
            print_message("%-5s %s bits/value: bt 16 d 64 %.3f, bt 32 d 64 %.3f, bt 32 d 128 "
                          "%.3f\n",
                          kern_kvq_name(codecs[qi]), side ? "V" : "K",
                          kern_kvq_tile_bytes(codecs[qi], side, 16, 64) * 8.0 / 1024,
                          kern_kvq_tile_bytes(codecs[qi], side, 32, 64) * 8.0 / 2048,
                          kern_kvq_tile_bytes(codecs[qi], side, 32, 128) * 8.0 / 4096);
}

static void
test_names_and_bad_shapes(void **state)
{
    (void)state;
    assert_string_equal(kern_kvq_name(KERN_KVQ_NONE), "none");
    assert_string_equal(kern_kvq_name(KERN_KVQ_BF16), "bf16");
    assert_string_equal(kern_kvq_name(KERN_KVQ_Q8_0), "q8_0");
    assert_string_equal(kern_kvq_name(KERN_KVQ_FP8), "fp8");
    assert_string_equal(kern_kvq_name(KERN_KVQ_Q4), "q4");
    assert_null(kern_kvq_name(KERN_KVQ_COUNT));
    assert_null(kern_kvq_name((kern_kvq_t)-1));

    float x[64 * 48] = {0};
    uint8_t tile[16384];
    assert_int_equal(kern_kvq_encode(KERN_KVQ_Q8_0, false, x, 16, 48, tile), KVS_EINVAL);
    assert_int_equal(kern_kvq_encode(KERN_KVQ_Q4, false, x, 16, 48, tile), KVS_EINVAL);
    assert_int_equal(kern_kvq_encode(KERN_KVQ_Q4, true, x, 15, 64, tile), KVS_EINVAL);
    assert_int_equal(kern_kvq_encode(KERN_KVQ_Q4, false, x, 48, 32, tile), KVS_EINVAL);
    assert_int_equal(kern_kvq_encode(KERN_KVQ_BF16, false, x, 0, 64, tile), KVS_EINVAL);
    assert_int_equal(kern_kvq_encode(KERN_KVQ_FP8, true, x, 16, 0, tile), KVS_EINVAL);
    assert_int_equal(kern_kvq_encode(KERN_KVQ_NONE, false, x, 16, 64, tile), KVS_EINVAL);
    assert_int_equal(kern_kvq_encode(KERN_KVQ_COUNT, false, x, 16, 64, tile), KVS_EINVAL);
    /* Shapes only some codecs take. */
    assert_int_equal(kern_kvq_encode(KERN_KVQ_FP8, false, x, 16, 48, tile), 0);
    assert_int_equal(kern_kvq_encode(KERN_KVQ_BF16, true, x, 15, 48, tile), 0);
    assert_int_equal(kern_kvq_encode(KERN_KVQ_Q4, true, x, 48, 32, tile), 0);
}

/* An all-zero tile decodes to exact zeros; constant tiles stay within
 * their bounds, and exact where the codec can hold the constant. */
static void
test_zero_and_constant(void **state)
{
    (void)state;
    static const float consts[] = {0.0f, 0.375f, -1.25f, 3.0f, 0.1f, -7.3f, 1000.5f};
    float x[32 * 128], y[32 * 128];
    for (size_t qi = 0; qi < N_CODECS; qi++) {
        for (int side = 0; side < 2; side++) {
            for (size_t bi = 0; bi < 2; bi++) {
                for (size_t di = 0; di < 2; di++) {
                    kern_kvq_t q = codecs[qi];
                    uint32_t bt = bts[bi], d = ds[di];
                    size_t n = (size_t)bt * d;
                    for (size_t k = 0; k < sizeof(consts) / sizeof(consts[0]); k++) {
                        float c = consts[k];
                        for (size_t i = 0; i < n; i++)
                            x[i] = c;
                        uint8_t *tile = roundtrip(q, side, bt, d, x, NULL);
                        kern_kvq_decode(q, side, tile, bt, d, 0, bt, y);
                        bool exact =
                            c == 0.0f ||
                            (q == KERN_KVQ_BF16 && kvs_bf16_to_f32(kvs_f32_to_bf16(c)) == c) ||
                            (q == KERN_KVQ_Q4 && kvs_fp16_to_f32(kvs_f32_to_fp16(c)) == c);
                        for (size_t i = 0; exact && i < n; i++) {
                            if (y[i] != c) {
                                print_error("%s %s const %g: element %zu decoded %.9g\n",
                                            kern_kvq_name(q), side ? "V" : "K", c, i, y[i]);
                                fail();
                            }
                        }
                        free(tile);
                    }
                    /* Every channel (or every token) its own constant. */
                    for (uint32_t t = 0; t < bt; t++)
                        for (uint32_t ch = 0; ch < d; ch++)
                            x[(size_t)t * d + ch] =
                                side ? 0.25f * (float)t - 3.0f : 0.1f * (float)ch - 2.0f;
                    free(roundtrip(q, side, bt, d, x, NULL));
                }
            }
        }
    }
}

/* NaN and infinities are stored exactly as 0 would be: the tile bytes
 * match, so the rest of each group keeps the bound 0 gives it. */
static void
test_nonfinite(void **state)
{
    (void)state;
    rng_seed(3);
    float x[32 * 128], x0[32 * 128], y[32 * 128];
    for (size_t qi = 0; qi < N_CODECS; qi++) {
        for (int side = 0; side < 2; side++) {
            for (size_t bi = 0; bi < 2; bi++) {
                for (size_t di = 0; di < 2; di++) {
                    kern_kvq_t q = codecs[qi];
                    uint32_t bt = bts[bi], d = ds[di];
                    size_t n = (size_t)bt * d, bytes = kern_kvq_tile_bytes(q, side, bt, d);
                    fill(x, bt, d, DIST_GAUSS);
                    size_t bad[] = {0, 5, d + 7, 3 * d + 31, n / 2, n - 1};
                    const float vals[] = {NAN, INFINITY, -INFINITY, -NAN, INFINITY, NAN};
                    for (size_t k = 0; k < 6; k++)
                        x[bad[k]] = vals[k];
                    for (size_t i = 0; i < n; i++)
                        x0[i] = sanitize(x[i]);
                    uint8_t *tile = roundtrip(q, side, bt, d, x, NULL);
                    uint8_t *tile0 = roundtrip(q, side, bt, d, x0, NULL);
                    assert_memory_equal(tile, tile0, bytes);
                    kern_kvq_decode(q, side, tile, bt, d, 0, bt, y);
                    for (size_t k = 0; k < 6 && q != KERN_KVQ_Q4; k++)
                        assert_true(y[bad[k]] == 0.0f);
                    free(tile);
                    free(tile0);
                }
            }
        }
    }
}

/* Values far from 1: FP8 scales that are fp16 subnormals (and one that
 * would round to 0), Q4 units in the fp16 subnormal range, large values. */
static void
test_tiny_and_large(void **state)
{
    (void)state;
    rng_seed(4);
    static const float mags[] = {1e-7f, 1e-6f, 3e-5f, 1e-3f, 1e4f};
    float x[32 * 64];
    for (size_t qi = 0; qi < N_CODECS; qi++)
        for (int side = 0; side < 2; side++)
            for (size_t k = 0; k < sizeof(mags) / sizeof(mags[0]); k++) {
                fill(x, 32, 64, DIST_GAUSS);
                for (size_t i = 0; i < 32 * 64; i++)
                    x[i] *= mags[k];
                free(roundtrip(codecs[qi], side, 32, 64, x, NULL));
            }
}

/* Each token's Q8_0 blocks are what kern_quantize_q8_0 makes of its row. */
static void
test_q8_0_matches_quantize(void **state)
{
    (void)state;
    rng_seed(5);
    for (size_t bi = 0; bi < 2; bi++) {
        for (size_t di = 0; di < 2; di++) {
            uint32_t bt = bts[bi], d = ds[di];
            size_t n = (size_t)bt * d, row = (size_t)d / 32 * sizeof(kern_block_q8_0_t);
            float *x = malloc(n * sizeof(float));
            uint8_t *tile = malloc(kern_kvq_tile_bytes(KERN_KVQ_Q8_0, false, bt, d));
            kern_block_q8_0_t *ref = malloc(d / 32 * sizeof(kern_block_q8_0_t));
            assert_true(x && tile && ref);
            for (int dist = 0; dist < N_DIST; dist++) {
                fill(x, bt, d, dist);
                for (int side = 0; side < 2; side++) {
                    assert_int_equal(kern_kvq_encode(KERN_KVQ_Q8_0, side, x, bt, d, tile), 0);
                    for (uint32_t t = 0; t < bt; t++) {
                        kern_quantize_q8_0(x + (size_t)t * d, ref, d);
                        assert_memory_equal(tile + t * row, ref, row);
                    }
                }
            }
            free(x);
            free(tile);
            free(ref);
        }
    }
}

/* e4m3 written out independently: subnormals m * 2^-9, normals
 * (1 + m/8) * 2^(e - 7), 0x7f NaN. */
static double
e4m3_ref_value(unsigned code)
{
    unsigned e = (code >> 3) & 15, m = code & 7;
    double v = (code & 0x7f) == 0x7f ? NAN : e == 0 ? ldexp(m, -9) : ldexp(1.0 + m / 8.0, e - 7);
    return code & 0x80 ? -v : v;
}

/* Nearest e4m3 by search, ties to the even code, saturating at 448. */
static unsigned
e4m3_ref_encode(double u)
{
    double a = fabs(u);
    unsigned best = 0x7e;
    if (a <= 448.0) {
        double be = INFINITY;
        for (unsigned c = 0; c <= 0x7e; c++) {
            double e = fabs(e4m3_ref_value(c) - a);
            if (e < be || (e == be && (c & 1) == 0)) {
                be = e;
                best = c;
            }
        }
    }
    return (signbit(u) ? 0x80 : 0) | best;
}

/* With max|x| = 448 the scale is exactly 1, so the codes are e4m3 of x
 * itself: every value, every midpoint and its neighbours, both signs. */
static void
test_fp8_codes(void **state)
{
    (void)state;
    enum { BT = 16, D = 128 };
    float x[BT * D];
    uint8_t tile[BT * (2 + D)];
    size_t k = 0;
    for (unsigned c = 0; c < 0x7e && k < BT * (D - 1); c++) {
        float lo = (float)e4m3_ref_value(c), hi = (float)e4m3_ref_value(c + 1);
        float mid = (float)(0.5 * ((double)lo + hi));
        float cand[] = {lo, mid, nextafterf(mid, 0.0f), nextafterf(mid, 1e9f)};
        for (int j = 0; j < 4; j++, k++) {
            float s = (k & 1) ? -cand[j] : cand[j];
            x[(k / (D - 1)) * D + 1 + k % (D - 1)] = s;
        }
    }
    for (; k < BT * (D - 1); k++)
        x[(k / (D - 1)) * D + 1 + k % (D - 1)] = rng_f(-448.0f, 448.0f);
    for (int t = 0; t < BT; t++)
        x[t * D] = t & 1 ? -448.0f : 448.0f;
    assert_int_equal(kern_kvq_encode(KERN_KVQ_FP8, false, x, BT, D, tile), 0);
    float y[BT * D];
    kern_kvq_decode(KERN_KVQ_FP8, false, tile, BT, D, 0, BT, y);
    for (int t = 0; t < BT; t++) {
        assert_int_equal(ld16(tile + 2 * t), 0x3c00); /* 1.0 */
        for (int c = 0; c < D; c++) {
            float v = x[t * D + c];
            unsigned got = tile[2 * BT + t * D + c], want = e4m3_ref_encode(v);
            if (got != want) {
                print_error("e4m3(%.9g): code 0x%02x, expected 0x%02x\n", v, got, want);
                fail();
            }
            assert_true(y[t * D + c] == (float)e4m3_ref_value(got));
        }
    }
    /* The decode table against the reference, NaN codes included. */
    uint8_t t2[2 * (2 + 128)];
    float y2[256];
    uint16_t one = 0x3c00;
    memcpy(t2, &one, 2);
    memcpy(t2 + 2, &one, 2);
    for (int c = 0; c < 256; c++)
        t2[4 + c] = (uint8_t)c;
    kern_kvq_decode(KERN_KVQ_FP8, true, t2, 2, 128, 0, 2, y2);
    for (int c = 0; c < 256; c++) {
        double r = e4m3_ref_value((unsigned)c);
        if (isnan(r))
            assert_true(isnan(y2[c]));
        else
            assert_true(y2[c] == (float)r && !signbit(y2[c]) == !signbit(r));
    }
}

/* The cpu backend's vector decoders (kern__kvq_decode_fast) against the
 * scalar ones, bit for bit: every codec, side and shape over each data
 * kind, every sub-range start, and for FP8 every code (NaN codes
 * included) under scales from subnormal products up to f16's largest. */
static void
test_fast_decode_bit_exact(void **state)
{
    (void)state;
    bool avx2 = false;
#if defined(__x86_64__) || defined(__i386__)
    avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    if (!avx2)
        print_message("no AVX2 here: the fast path is the scalar one\n");
    rng_seed(9);
    for (size_t qi = 0; qi < N_CODECS; qi++)
        for (int side = 0; side < 2; side++)
            for (size_t bi = 0; bi < 2; bi++)
                for (size_t di = 0; di < 2; di++)
                    for (int dist = 0; dist < N_DIST; dist++) {
                        kern_kvq_t q = codecs[qi];
                        uint32_t bt = bts[bi], d = ds[di];
                        size_t n = (size_t)bt * d;
                        float *x = malloc(n * sizeof(float)), *a = malloc(n * sizeof(float)),
                              *b = malloc(n * sizeof(float));
                        uint8_t *tile = malloc(kern_kvq_tile_bytes(q, side, bt, d));
                        assert_true(x && a && b && tile);
                        fill(x, bt, d, dist);
                        assert_int_equal(kern_kvq_encode(q, side, x, bt, d, tile), 0);
                        for (uint32_t t0 = 0; t0 < bt; t0 += 5) {
                            uint32_t cnt = bt - t0;
                            kern_kvq_decode(q, side, tile, bt, d, t0, cnt, a);
                            kern__kvq_decode_fast(avx2, q, side, tile, bt, d, t0, cnt, b);
                            assert_memory_equal(a, b, (size_t)cnt * d * sizeof(float));
                        }
                        free(x);
                        free(a);
                        free(b);
                        free(tile);
                    }
    /* FP8: all 256 codes in each of two tokens, under many scales. */
    static const uint16_t scales[] = {0x0001, 0x0203, 0x0400, 0x1234,
                                      0x3c00, 0x3555, 0x5bff, 0x7bff};
    uint8_t t2[2 * (2 + 128)];
    float a[256], b[256];
    for (size_t si = 0; si < sizeof(scales) / sizeof(scales[0]); si++) {
        memcpy(t2, &scales[si], 2);
        memcpy(t2 + 2, &scales[(si + 3) % 8], 2);
        for (int c = 0; c < 256; c++)
            t2[4 + c] = (uint8_t)c;
        kern_kvq_decode(KERN_KVQ_FP8, true, t2, 2, 128, 0, 2, a);
        kern__kvq_decode_fast(avx2, KERN_KVQ_FP8, true, t2, 2, 128, 0, 2, b);
        assert_memory_equal(a, b, sizeof a);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tile_bytes),        cmocka_unit_test(test_names_and_bad_shapes),
        cmocka_unit_test(test_roundtrip_bounds),  cmocka_unit_test(test_subrange_bit_exact),
        cmocka_unit_test(test_zero_and_constant), cmocka_unit_test(test_nonfinite),
        cmocka_unit_test(test_tiny_and_large),    cmocka_unit_test(test_q8_0_matches_quantize),
        cmocka_unit_test(test_fp8_codes),         cmocka_unit_test(test_fast_decode_bit_exact),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
