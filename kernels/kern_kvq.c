/*
 * kernels/kern_kvq.c — the quantized KV tile codecs of kern.h (kern_kvq_*,
 * algorithms.md section 6): BF16, llama.cpp's Q8_0, vLLM-style FP8 e4m3
 * with a per-token scale, and KIVI-4 with Q4_K-style two-level group
 * parameters.  Callers: kern_kv_seal on the host backends (encode, when a
 * hot block fills), the host attention paths through kern_kv_row_f32 and
 * the cpu attention kernel (decode, per chunk of keys), and tests.
 *
 * A tile holds bt tokens x d channels of one KV head.  Tiles need no
 * alignment: every multi-byte field is read and written with memcpy, in
 * host byte order (the pool never leaves the machine that wrote it).
 *
 *   BF16  bt * d * 2 bytes: bf16 values, token-major, rounded to nearest
 *         even; finite values that would round to infinity are kept at
 *         +-max bf16 instead.
 *   Q8_0  bt * (d / 32) * 34 bytes: per token, d / 32 blocks of
 *         kern_block_q8_0_t exactly as kern_quantize_q8_0 writes the row.
 *   FP8   bt * (2 + d) bytes: the bt fp16 token scales s first, then the
 *         codes [bt][d], e4m3 (OCP FN) of x / s rounded to nearest even and
 *         saturated to +-448.  s = fp16(max|x| / 448) rounded to nearest,
 *         except that it moves one fp16 step up where that rounding went
 *         down by more than the top e4m3 interval absorbs (only possible
 *         for subnormal fp16 scales, max|x| < 448 * 2^-14; a row whose s
 *         would round to 0 gets the smallest subnormal), and it stops at
 *         65504.  An all-zero row has s = 0.  Decode is table[code] * s,
 *         which is exact in f32 (4 x 11 significant bits).
 *   Q4    6 + 3 * G / 2 + bt * d / 2 bytes, G the number of groups:
 *           [0, 6)     fp16 D (step unit), M0 (min base), DM (min unit);
 *           [6, ...)   per pair of groups (2i, 2i + 1), 3 bytes holding the
 *                      little-endian 24 bits f(2i) | f(2i + 1) << 12, where
 *                      f = sc | mq << 6 (sc, mq: 6 bits each);
 *           then       the codes [bt][d], two per byte, channel 2k in the
 *                      low nibble and 2k + 1 in the high one.
 *         K groups run per channel over g = min(bt, 32) tokens (group
 *         (t / g) * d + c), V groups per token over 32 channels (group
 *         t * (d / 32) + c / 32), so G = bt * d / g or bt * d / 32, always
 *         even.  A value is (M0 + DM * mq) + (D * sc) * q.  Bits a value:
 *         K and V 4.398 at bt 32, d 64 (4.387 at d 128); at bt 16, d 64,
 *         K 4.797 (groups of 16 tokens) and V 4.422.
 *
 * Q4 parameters.  Each group needs a reconstructed min mn <= its min and
 * a step with mn + 15 * step >= its max, so no value is clamped and the
 * error stays within step / 2.  The units are rounded to fp16 first and
 * everything after uses the rounded values: M0 rounds down from the
 * smallest group min; DM rounds up from the spread of the group mins / 63
 * (every group's mn then within DM of its min), unless a smaller DM that
 * puts one of 16 sampled groups' min exactly at mq = 63 gives a smaller
 * sum of squared steps (one far-off min, a sink token's V groups or a K
 * channel with a large offset, would otherwise make DM coarse for every
 * group); mq is the largest index with mn <= min.  D rounds up from the
 * largest (max - mn) / (15 * 63) and sc is the smallest multiplier that
 * covers (max - mn), computed from the stored mn.  Both products D * sc * q
 * and DM * mq are exact in f32 (at most 21 significant bits), so the
 * decoded value is one rounding of mn + step * q whether or not the
 * compiler fuses the multiply-add: decoding any subset of tokens gives
 * the same bits.  Inputs are clamped to the fp16 range so the units stay
 * finite.
 */
#include "kern.h"

#include <math.h>
#include <string.h>

_Static_assert(sizeof(kern_block_q8_0_t) == 34, "ggml block_q8_0");

#define Q4_HDR 6      /* D, M0, DM */
#define Q4_VGROUP 32  /* channels per V group */
#define Q4_KGROUP 32  /* at most this many tokens per K group */
#define Q4_CHUNK 256  /* channels whose K parameters decode at once */
#define Q4_CACHE 1024 /* groups whose min and max the encoder keeps (8 KiB) */
#define Q4_TRIES 16   /* DM candidates the encoder tries besides span / 63 */
#define FP16_MAX 65504.0f
#define FP16_MAX_BITS 0x7bffu

/* ------------------------------------------------------------------------ */
/* Helpers.                                                                 */
/* ------------------------------------------------------------------------ */

static inline uint16_t
ld16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

static inline void
st16(uint8_t *p, uint16_t v)
{
    memcpy(p, &v, 2);
}

static inline float
finite_or_0(float x)
{
    return isfinite(x) ? x : 0.0f;
}

/* The smallest fp16 >= v, for v >= 0 within the fp16 range. */
static uint16_t
fp16_up(double v)
{
    uint16_t h = kvs_f32_to_fp16((float)v);
    while (h < FP16_MAX_BITS && (double)kvs_fp16_to_f32(h) < v)
        h++;
    return h;
}

/* The largest fp16 <= v, for v within the fp16 range. */
static uint16_t
fp16_down(float v)
{
    uint16_t h = kvs_f32_to_fp16(v);
    while (kvs_fp16_to_f32(h) > v) {
        if (h == 0)
            h = 0x8001; /* +0 -> the smallest negative subnormal */
        else if (h & 0x8000)
            h++; /* negative: one step away from zero */
        else
            h--;
    }
    return h;
}

static bool
shape_ok(kern_kvq_t q, bool v, uint32_t bt, uint32_t d)
{
    if (bt == 0 || d == 0)
        return false;
    switch (q) {
    case KERN_KVQ_BF16:
    case KERN_KVQ_FP8:
        return true;
    case KERN_KVQ_Q8_0:
        return d % KERN_QK8_0 == 0;
    case KERN_KVQ_Q4:
        if (d % Q4_VGROUP != 0 || bt % 2 != 0)
            return false;
        return v || bt % (bt < Q4_KGROUP ? bt : Q4_KGROUP) == 0;
    default:
        return false;
    }
}

/* ------------------------------------------------------------------------ */
/* Names and sizes.                                                         */
/* ------------------------------------------------------------------------ */

const char *
kern_kvq_name(kern_kvq_t q)
{
    static const char *const names[KERN_KVQ_COUNT] = {"none", "bf16", "q8_0", "fp8", "q4"};
    if ((unsigned)q >= KERN_KVQ_COUNT)
        return NULL;
    return names[q];
}

size_t
kern_kvq_tile_bytes(kern_kvq_t q, bool v, uint32_t bt, uint32_t d)
{
    if (!shape_ok(q, v, bt, d))
        return 0;
    size_t n, a, b;
    if (kvs_mul_size(bt, d, &n))
        return 0;
    switch (q) {
    case KERN_KVQ_BF16:
        return kvs_mul_size(n, 2, &a) ? 0 : a;
    case KERN_KVQ_Q8_0:
        return kvs_mul_size(n / KERN_QK8_0, sizeof(kern_block_q8_0_t), &a) ? 0 : a;
    case KERN_KVQ_FP8:
        return kvs_mul_size(bt, 2, &a) || kvs_add_size(a, n, &b) ? 0 : b;
    case KERN_KVQ_Q4: {
        size_t groups = n / (v ? Q4_VGROUP : (bt < Q4_KGROUP ? bt : Q4_KGROUP));
        if (kvs_mul_size(groups / 2, 3, &a) || kvs_add_size(a, Q4_HDR, &a) ||
            kvs_add_size(a, n / 2, &b))
            return 0;
        return b;
    }
    default:
        return 0;
    }
}

/* ------------------------------------------------------------------------ */
/* BF16 and Q8_0.                                                           */
/* ------------------------------------------------------------------------ */

static void
bf16_encode(const float *x, size_t n, uint8_t *tile)
{
    for (size_t i = 0; i < n; i++) {
        uint16_t h = kvs_f32_to_bf16(finite_or_0(x[i]));
        if ((h & 0x7f80) == 0x7f80) /* a finite value rounded up to inf */
            h = (uint16_t)((h & 0x8000) | 0x7f7f);
        st16(tile + 2 * i, h);
    }
}

static void
bf16_decode(const uint8_t *tile, size_t n, float *y)
{
    for (size_t i = 0; i < n; i++)
        y[i] = kvs_bits_to_f32((uint32_t)ld16(tile + 2 * i) << 16);
}

/* Block by block so the row needs no scratch copy: q8_0 blocks are
 * independent, so this is byte for byte kern_quantize_q8_0 of the row. */
static void
q8_0_encode(const float *x, size_t n, uint8_t *tile)
{
    float tmp[KERN_QK8_0];
    kern_block_q8_0_t blk;
    for (size_t b = 0; b < n / KERN_QK8_0; b++) {
        for (int j = 0; j < KERN_QK8_0; j++)
            tmp[j] = finite_or_0(x[b * KERN_QK8_0 + j]);
        kern_quantize_q8_0(tmp, &blk, KERN_QK8_0);
        memcpy(tile + b * sizeof blk, &blk, sizeof blk);
    }
}

/* As kern_row_to_f32(KERN_Q8_0), so both give the same bits. */
static void
q8_0_decode(const uint8_t *tile, size_t n, float *y)
{
    for (size_t b = 0; b < n / KERN_QK8_0; b++, tile += sizeof(kern_block_q8_0_t)) {
        float d = kvs_fp16_to_f32(ld16(tile));
        const int8_t *qs = (const int8_t *)(tile + 2);
        for (int j = 0; j < KERN_QK8_0; j++)
            y[b * KERN_QK8_0 + j] = d * (float)qs[j];
    }
}

/* ------------------------------------------------------------------------ */
/* FP8 e4m3 (OCP FN).                                                       */
/* ------------------------------------------------------------------------ */

/* |code| as a value: subnormals m * 2^-9, normals (8 + m) * 2^(e - 10);
 * 0x7f is NaN.  Constant expressions, so the table needs no init. */
#define E4M3_MAG(c)                                       \
    ((c) == 0x7f       ? NAN                              \
     : ((c) >> 3) == 0 ? (float)((c)&7) * (1.0f / 512.0f) \
                       : (float)(8 + ((c)&7)) * (float)(1u << ((c) >> 3)) * (1.0f / 1024.0f))
#define E4M3(c) ((c)&0x80 ? -E4M3_MAG((c)&0x7f) : E4M3_MAG(c)),
#define E4M3_4(c) E4M3(c) E4M3((c) + 1) E4M3((c) + 2) E4M3((c) + 3)
#define E4M3_16(c) E4M3_4(c) E4M3_4((c) + 4) E4M3_4((c) + 8) E4M3_4((c) + 12)
#define E4M3_64(c) E4M3_16(c) E4M3_16((c) + 16) E4M3_16((c) + 32) E4M3_16((c) + 48)

static const float e4m3_table[256] = {E4M3_64(0) E4M3_64(64) E4M3_64(128) E4M3_64(192)};

/* Round to nearest even with saturation; u is finite. */
static uint8_t
f32_to_e4m3(float u)
{
    uint32_t bits = kvs_f32_to_bits(u);
    uint8_t sign = (uint8_t)((bits >> 24) & 0x80);
    float a = fabsf(u);
    if (a >= 448.0f)
        return sign | 0x7e;
    if (a < 0x1p-6f) /* subnormal: steps of 2^-9; 8 * 2^-9 is the smallest normal */
        return sign | (uint8_t)rintf(a * 512.0f);
    uint32_t ab = bits & 0x7fffffffu;
    ab += 0x7ffffu + ((ab >> 20) & 1); /* carries into the exponent when it must */
    uint32_t code = (((ab >> 23) - 120) << 3) | ((ab >> 20) & 7);
    return sign | (uint8_t)(code < 0x7e ? code : 0x7e);
}

static uint16_t
fp8_scale(float amax)
{
    if (amax == 0.0f)
        return 0;
    uint16_t h = kvs_f32_to_fp16(amax / 448.0f);
    if (h > FP16_MAX_BITS)
        return FP16_MAX_BITS;
    /* Up to 464 / 448 the top e4m3 interval rounds the excess back to 448
     * anyway; beyond it saturation would cost more than rounding does. */
    while (h < FP16_MAX_BITS && (double)amax > (double)kvs_fp16_to_f32(h) * 464.0)
        h++;
    return h;
}

static void
fp8_encode(const float *x, uint32_t bt, uint32_t d, uint8_t *tile)
{
    uint8_t *codes = tile + (size_t)bt * 2;
    for (uint32_t t = 0; t < bt; t++) {
        const float *row = x + (size_t)t * d;
        uint8_t *out = codes + (size_t)t * d;
        float amax = 0.0f;
        for (uint32_t c = 0; c < d; c++) {
            float a = fabsf(finite_or_0(row[c]));
            amax = a > amax ? a : amax;
        }
        uint16_t h = fp8_scale(amax);
        st16(tile + (size_t)t * 2, h);
        float s = kvs_fp16_to_f32(h);
        for (uint32_t c = 0; c < d; c++)
            out[c] = s > 0.0f ? f32_to_e4m3(finite_or_0(row[c]) / s) : 0;
    }
}

static void
fp8_decode(const uint8_t *tile, uint32_t bt, uint32_t d, uint32_t t0, uint32_t n, float *y)
{
    const uint8_t *codes = tile + (size_t)bt * 2 + (size_t)t0 * d;
    for (uint32_t t = 0; t < n; t++, codes += d, y += d) {
        float s = kvs_fp16_to_f32(ld16(tile + (size_t)(t0 + t) * 2));
        for (uint32_t c = 0; c < d; c++)
            y[c] = e4m3_table[codes[c]] * s;
    }
}

/* ------------------------------------------------------------------------ */
/* Q4 (KIVI-4 with two-level group parameters).                             */
/* ------------------------------------------------------------------------ */

typedef struct q4_shape {
    bool v;
    uint32_t bt, d;
    uint32_t gk;   /* tokens per K group */
    size_t groups; /* G */
    size_t n;      /* bt * d */
} q4_shape_t;

static q4_shape_t
q4_shape(bool v, uint32_t bt, uint32_t d)
{
    q4_shape_t s = {.v = v, .bt = bt, .d = d, .gk = bt < Q4_KGROUP ? bt : Q4_KGROUP};
    s.n = (size_t)bt * d;
    s.groups = s.n / (v ? Q4_VGROUP : s.gk);
    return s;
}

/* Inputs past the fp16 range would make the fp16 units infinite. */
static inline float
q4_in(float x)
{
    if (!isfinite(x))
        return 0.0f;
    return x > FP16_MAX ? FP16_MAX : x < -FP16_MAX ? -FP16_MAX : x;
}

/* Group g's elements in x[bt][d]: base + i * stride for i < len. */
typedef struct q4_span {
    size_t base, stride;
    uint32_t len;
} q4_span_t;

static inline q4_span_t
q4_group_span(const q4_shape_t *s, size_t g)
{
    if (s->v) /* the groups tile each row in order */
        return (q4_span_t){g * Q4_VGROUP, 1, Q4_VGROUP};
    size_t tg = g / s->d, c = g % s->d;
    return (q4_span_t){tg * s->gk * s->d + c, s->d, s->gk};
}

typedef struct q4_stat {
    float mn, mx;
} q4_stat_t;

static q4_stat_t
q4_minmax(const q4_shape_t *s, const float *x, size_t g)
{
    q4_span_t sp = q4_group_span(s, g);
    q4_stat_t st = {INFINITY, -INFINITY};
    for (uint32_t i = 0; i < sp.len; i++) {
        float v = q4_in(x[sp.base + i * sp.stride]);
        st.mn = v < st.mn ? v : st.mn;
        st.mx = v > st.mx ? v : st.mx;
    }
    return st;
}

static inline uint32_t
q4_field(const uint8_t *params, size_t g)
{
    const uint8_t *p = params + 3 * (g >> 1);
    uint32_t w = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
    return g & 1 ? w >> 12 : w & 0xfff;
}

static inline void
q4_set_field(uint8_t *params, size_t g, uint32_t f)
{
    uint8_t *p = params + 3 * (g >> 1);
    uint32_t w = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
    w = g & 1 ? (w & 0xfff) | f << 12 : (w & 0xfff000) | f;
    p[0] = (uint8_t)w;
    p[1] = (uint8_t)(w >> 8);
    p[2] = (uint8_t)(w >> 16);
}

/* Shared by encode and decode, so the encoder covers the very min the
 * decoder reconstructs (DM * mq is exact: one rounding, fused or not). */
static inline float
q4_min(float m0, float dm, uint32_t mq)
{
    return m0 + dm * (float)mq;
}

/* The largest mq with q4_min <= m; mq 0 always qualifies (M0 <= m). */
static uint32_t
q4_pick_mq(float m, float m0, float dm)
{
    if (dm == 0.0f)
        return 0;
    double f = floor(((double)m - m0) / dm);
    int mq = f < 0 ? 0 : f > 63 ? 63 : (int)f;
    while (mq > 0 && q4_min(m0, dm, (uint32_t)mq) > m)
        mq--;
    while (mq < 63 && q4_min(m0, dm, (uint32_t)mq + 1) <= m)
        mq++;
    return (uint32_t)mq;
}

/* The smallest sc with 15 * D * sc >= diff; every product is exact in
 * double.  945 * D >= diff by the choice of D, so sc <= 63. */
static uint32_t
q4_pick_sc(double diff, float dunit)
{
    if (diff <= 0.0 || dunit == 0.0f)
        return 0;
    double du = 15.0 * dunit;
    double f = ceil(diff / du);
    int sc = f < 1 ? 1 : f > 63 ? 63 : (int)f;
    while (sc > 1 && du * (sc - 1) >= diff)
        sc--;
    while (sc < 63 && du * sc < diff)
        sc++;
    return (uint32_t)sc;
}

static q4_stat_t
q4_group(const q4_shape_t *s, const float *x, const q4_stat_t *cache, size_t g)
{
    return cache ? cache[g] : q4_minmax(s, x, g);
}

/* The smallest fp16 D with 945 D >= max - mn for every group, given the
 * min units: every group's sc then fits in 6 bits. */
static uint16_t
q4_step_unit(const q4_shape_t *s, const float *x, const q4_stat_t *cache, float m0, float dm)
{
    double max_diff = 0.0;
    for (size_t g = 0; g < s->groups; g++) {
        q4_stat_t st = q4_group(s, x, cache, g);
        double diff = (double)st.mx - q4_min(m0, dm, q4_pick_mq(st.mn, m0, dm));
        max_diff = diff > max_diff ? diff : max_diff;
    }
    uint16_t dh = max_diff > 0.0 ? fp16_up(max_diff / 945.0) : 0;
    while (dh < FP16_MAX_BITS && 945.0 * kvs_fp16_to_f32(dh) < max_diff)
        dh++;
    return dh;
}

/* The sum of squared group steps for a min unit dm: the tile's squared
 * error up to a constant (rounding error is close to uniform, step^2 / 12
 * a value).  Only ranks candidates, so it skips the exact fix-ups of
 * q4_pick_mq / q4_pick_sc and the fp16 rounding of D. */
static double
q4_cost(const q4_shape_t *s, const q4_stat_t *cache, double m0, double dm)
{
    /* mn >= m0 and diff >= 0, so truncation is floor and ceil is cheap. */
    double max_diff = 0.0, sum2 = 0.0, idm = 1.0 / dm;
    for (size_t g = 0; g < s->groups; g++) {
        double mq = (double)(int64_t)((cache[g].mn - m0) * idm);
        double diff = cache[g].mx - (m0 + dm * (mq > 63 ? 63 : mq));
        max_diff = diff > max_diff ? diff : max_diff;
    }
    if (max_diff == 0.0)
        return 0.0;
    double du = max_diff / 945.0, idu = 1.0 / (15.0 * du);
    for (size_t g = 0; g < s->groups; g++) {
        double mq = (double)(int64_t)((cache[g].mn - m0) * idm);
        double diff = cache[g].mx - (m0 + dm * (mq > 63 ? 63 : mq));
        double sc = (double)(int64_t)(diff * idu);
        sc += sc < diff * idu;
        sum2 += sc * sc;
    }
    return sum2 * du * du;
}

static void
q4_encode(const float *x, bool v, uint32_t bt, uint32_t d, uint8_t *tile)
{
    q4_shape_t s = q4_shape(v, bt, d);
    uint8_t *params = tile + Q4_HDR, *codes = params + 3 * (s.groups / 2);
    memset(params, 0, 3 * (s.groups / 2) + s.n / 2);

    /* Kernels take no scratch: the group statistics of tiles up to
     * Q4_CACHE groups (every usual shape) live on the stack, larger tiles
     * recompute them in each pass and skip the DM search. */
    q4_stat_t cache_buf[Q4_CACHE], *cache = s.groups <= Q4_CACHE ? cache_buf : NULL;
    float lo = INFINITY, hi_min = -INFINITY;
    for (size_t g = 0; g < s.groups; g++) {
        q4_stat_t st = q4_minmax(&s, x, g);
        if (cache)
            cache[g] = st;
        lo = st.mn < lo ? st.mn : lo;
        hi_min = st.mn > hi_min ? st.mn : hi_min;
    }
    uint16_t m0h = fp16_down(lo);
    float m0 = kvs_fp16_to_f32(m0h);
    double span = (double)hi_min - m0;
    uint16_t dmh = span > 0.0 ? fp16_up(span / 63.0) : 0;
    while (dmh < FP16_MAX_BITS && 63.0 * kvs_fp16_to_f32(dmh) < span)
        dmh++;

    /* DM = span / 63 bounds every group's min error by DM, but one far
     * outlier (a sink token's V groups, a K channel with a large offset)
     * makes that DM coarse for all the others.  A DM that puts some
     * group's min exactly at mq = 63 serves a cluster of mins near it
     * much better, and groups above it pay only their distance; keep
     * whichever candidate gives the least squared step.  Coverage does
     * not depend on the choice: mq and sc are fitted to it below. */
    if (cache && dmh > 0) {
        double best = q4_cost(&s, cache, m0, kvs_fp16_to_f32(dmh));
        size_t stride = (s.groups + Q4_TRIES - 1) / Q4_TRIES;
        for (size_t g = 0; g < s.groups; g += stride) {
            uint16_t h = fp16_down((float)(((double)cache[g].mn - m0) / 63.0));
            if (h == 0 || (h & 0x8000) || h == dmh)
                continue;
            double c = q4_cost(&s, cache, m0, kvs_fp16_to_f32(h));
            if (c < best) {
                best = c;
                dmh = h;
            }
        }
    }
    float dm = kvs_fp16_to_f32(dmh);
    uint16_t dh = q4_step_unit(&s, x, cache, m0, dm);
    float dunit = kvs_fp16_to_f32(dh);

    for (size_t g = 0; g < s.groups; g++) {
        q4_stat_t st = q4_group(&s, x, cache, g);
        uint32_t mq = q4_pick_mq(st.mn, m0, dm);
        float gmin = q4_min(m0, dm, mq);
        uint32_t sc = q4_pick_sc((double)st.mx - gmin, dunit);
        q4_set_field(params, g, sc | mq << 6);
        float step = dunit * (float)sc;
        if (step == 0.0f)
            continue;            /* every value is gmin: codes stay 0 */
        double inv = 1.0 / step; /* in double: off the exact quotient by ~1e-15 */
        q4_span_t sp = q4_group_span(&s, g);
        for (uint32_t i = 0; i < sp.len; i++) {
            size_t at = sp.base + i * sp.stride;
            /* x >= gmin: rounding half up is a plain truncation. */
            uint32_t qi = (uint32_t)(((double)q4_in(x[at]) - gmin) * inv + 0.5);
            qi = qi > 15 ? 15 : qi;
            codes[at / 2] |= (uint8_t)(at & 1 ? qi << 4 : qi);
        }
    }
    st16(tile, dh);
    st16(tile + 2, m0h);
    st16(tile + 4, dmh);
}

/* The codes of one V group (32 channels of a token), and of cn channels
 * of one token's K row with their per-channel steps and minimums, as
 * values: the scalar decoders here, the AVX2 ones below. */
typedef void (*q4_vgroup_fn)(const uint8_t *q, float step, float gmin, float *y);
typedef void (*q4_krow_fn)(const uint8_t *q, const float *step, const float *gmin, uint32_t cn,
                           float *y);

static void
q4_vgroup(const uint8_t *q, float step, float gmin, float *y)
{
    for (int j = 0; j < Q4_VGROUP / 2; j++) {
        y[2 * j] = gmin + step * (float)(q[j] & 15);
        y[2 * j + 1] = gmin + step * (float)(q[j] >> 4);
    }
}

static void
q4_krow(const uint8_t *q, const float *step, const float *gmin, uint32_t cn, float *y)
{
    for (uint32_t c = 0; c < cn; c += 2) {
        y[c] = gmin[c] + step[c] * (float)(q[c / 2] & 15);
        y[c + 1] = gmin[c + 1] + step[c + 1] * (float)(q[c / 2] >> 4);
    }
}

/* Walks tokens [t0, t0 + n) of a tile, handing each V group or K row to
 * the decoder given. */
static void
q4_walk(const uint8_t *tile, bool v, uint32_t bt, uint32_t d, uint32_t t0, uint32_t n, float *y,
        q4_vgroup_fn vgroup, q4_krow_fn krow)
{
    q4_shape_t s = q4_shape(v, bt, d);
    const uint8_t *params = tile + Q4_HDR, *codes = params + 3 * (s.groups / 2);
    float dunit = kvs_fp16_to_f32(ld16(tile));
    float m0 = kvs_fp16_to_f32(ld16(tile + 2)), dm = kvs_fp16_to_f32(ld16(tile + 4));

    if (v) {
        size_t g = (size_t)t0 * (d / Q4_VGROUP);
        const uint8_t *q = codes + (size_t)t0 * d / 2;
        for (size_t i = 0; i < (size_t)n * d; i += Q4_VGROUP, g++, q += Q4_VGROUP / 2) {
            uint32_t f = q4_field(params, g);
            vgroup(q, dunit * (float)(f & 63), q4_min(m0, dm, f >> 6), y + i);
        }
        return;
    }

    /* K: the channels' parameters change only every gk tokens, so decode
     * them once per token group and chunk of channels. */
    float step[Q4_CHUNK], gmin[Q4_CHUNK];
    uint32_t end = t0 + n;
    for (uint32_t t = t0; t < end;) {
        uint32_t tg = t / s.gk, te = (tg + 1) * s.gk < end ? (tg + 1) * s.gk : end;
        for (uint32_t c0 = 0; c0 < d; c0 += Q4_CHUNK) {
            uint32_t cn = d - c0 < Q4_CHUNK ? d - c0 : Q4_CHUNK;
            size_t g0 = (size_t)tg * d + c0;
            for (uint32_t c = 0; c < cn; c++) {
                uint32_t f = q4_field(params, g0 + c);
                step[c] = dunit * (float)(f & 63);
                gmin[c] = q4_min(m0, dm, f >> 6);
            }
            for (uint32_t tt = t; tt < te; tt++)
                krow(codes + ((size_t)tt * d + c0) / 2, step, gmin, cn,
                     y + (size_t)(tt - t0) * d + c0);
        }
        t = te;
    }
}

static void
q4_decode(const uint8_t *tile, bool v, uint32_t bt, uint32_t d, uint32_t t0, uint32_t n, float *y)
{
    q4_walk(tile, v, bt, d, t0, n, y, q4_vgroup, q4_krow);
}

/* ------------------------------------------------------------------------ */
/* AVX2 decoding for the cpu backend's attention (kern__kvq_decode_fast).   */
/* ------------------------------------------------------------------------ */

/* Each value comes out as the scalar decoders make it, bit for bit: one
 * f32 multiply (fp8), or for q4 one rounding of min + step * q whose
 * product is exact, so a fused multiply-add gives the same result as the
 * scalar multiply and add.  (bf16 and q8_0 tiles are rows of GGUF types,
 * which the cpu backend converts with its own row code.) */
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KVQ_TGT __attribute__((target("avx2,fma,f16c")))

/* An e4m3 code moved into f16's fields ((c & 0x7f) << 7, the sign on top)
 * is the code's value times 2^-8 exactly, subnormals included (f16 has
 * more exponent and mantissa bits), so F16C converts 8 codes at once and
 * the scale, times 2^8, restores the value in the one rounding of the
 * scalar multiply.  0x7f/0xff (NaN) would read as 480: blended back to
 * the table's NaN of that sign, though the encoder never writes them. */
KVQ_TGT static void
fp8_decode_avx2(const uint8_t *tile, uint32_t bt, uint32_t d, uint32_t t0, uint32_t n, float *y)
{
    const uint8_t *codes = tile + (size_t)bt * 2 + (size_t)t0 * d;
    const __m128i mag = _mm_set1_epi16(0x7f), sign = _mm_set1_epi16(0x80);
    const __m256 nan = _mm256_set1_ps(NAN), sbit = _mm256_set1_ps(-0.0f);
    for (uint32_t t = 0; t < n; t++, codes += d, y += d) {
        const float s = kvs_fp16_to_f32(ld16(tile + (size_t)(t0 + t) * 2));
        const __m256 sc = _mm256_set1_ps(s * 256.0f);
        uint32_t c = 0;
        for (; c + 8 <= d; c += 8) {
            __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(codes + c)));
            __m128i m = _mm_and_si128(w, mag);
            __m128i h =
                _mm_or_si128(_mm_slli_epi16(m, 7), _mm_slli_epi16(_mm_and_si128(w, sign), 8));
            __m256 x = _mm256_mul_ps(_mm256_cvtph_ps(h), sc);
            __m256 bad = _mm256_castsi256_ps(_mm256_cvtepi16_epi32(_mm_cmpeq_epi16(m, mag)));
            __m256 signed_nan = _mm256_or_ps(nan, _mm256_and_ps(x, sbit));
            _mm256_storeu_ps(y + c, _mm256_blendv_ps(x, signed_nan, bad));
        }
        for (; c < d; c++)
            y[c] = e4m3_table[codes[c]] * s;
    }
}

/* 16 codes of 8 bytes (channel 2j in the low nibble of byte j) in
 * channel order. */
KVQ_TGT static inline __m128i
q4_unpack16(const uint8_t *q)
{
    __m128i b = _mm_loadl_epi64((const __m128i *)q), m = _mm_set1_epi8(15);
    return _mm_unpacklo_epi8(_mm_and_si128(b, m), _mm_and_si128(_mm_srli_epi16(b, 4), m));
}

KVQ_TGT static inline __m256
q4_lanes(__m128i codes16, int half)
{
    __m128i c8 = half ? _mm_unpackhi_epi64(codes16, codes16) : codes16;
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c8));
}

KVQ_TGT static void
q4_vgroup_avx2(const uint8_t *q, float step, float gmin, float *y)
{
    __m256 st = _mm256_set1_ps(step), mn = _mm256_set1_ps(gmin);
    for (int h = 0; h < 2; h++) {
        __m128i c16 = q4_unpack16(q + 8 * h);
        for (int k = 0; k < 2; k++)
            _mm256_storeu_ps(y + 16 * h + 8 * k, _mm256_fmadd_ps(st, q4_lanes(c16, k), mn));
    }
}

KVQ_TGT static void
q4_krow_avx2(const uint8_t *q, const float *step, const float *gmin, uint32_t cn, float *y)
{
    for (uint32_t c = 0; c < cn; c += 16) { /* d % 32 == 0 */
        __m128i c16 = q4_unpack16(q + c / 2);
        for (int k = 0; k < 2; k++)
            _mm256_storeu_ps(y + c + 8 * k,
                             _mm256_fmadd_ps(_mm256_loadu_ps(step + c + 8 * k), q4_lanes(c16, k),
                                             _mm256_loadu_ps(gmin + c + 8 * k)));
    }
}

#endif

void
kern__kvq_decode_fast(bool avx2, kern_kvq_t q, bool v, const void *tile, uint32_t bt, uint32_t d,
                      uint32_t t0, uint32_t n, float *y)
{
#if defined(__x86_64__) || defined(__i386__)
    if (avx2) {
        const uint8_t *p = tile;
        switch (q) {
        case KERN_KVQ_FP8:
            fp8_decode_avx2(p, bt, d, t0, n, y);
            return;
        case KERN_KVQ_Q4:
            q4_walk(p, v, bt, d, t0, n, y, q4_vgroup_avx2, q4_krow_avx2);
            return;
        default:
            break;
        }
    }
#else
    (void)avx2;
#endif
    kern_kvq_decode(q, v, tile, bt, d, t0, n, y);
}

/* ------------------------------------------------------------------------ */
/* Entry points.                                                            */
/* ------------------------------------------------------------------------ */

int
kern_kvq_encode(kern_kvq_t q, bool v, const float *x, uint32_t bt, uint32_t d, void *tile)
{
    if (kern_kvq_tile_bytes(q, v, bt, d) == 0)
        return KVS_EINVAL;
    size_t n = (size_t)bt * d;
    switch (q) {
    case KERN_KVQ_BF16:
        bf16_encode(x, n, tile);
        return 0;
    case KERN_KVQ_Q8_0:
        q8_0_encode(x, n, tile);
        return 0;
    case KERN_KVQ_FP8:
        fp8_encode(x, bt, d, tile);
        return 0;
    case KERN_KVQ_Q4:
        q4_encode(x, v, bt, d, tile);
        return 0;
    default:
        return KVS_EINVAL;
    }
}

void
kern_kvq_decode(kern_kvq_t q, bool v, const void *tile, uint32_t bt, uint32_t d, uint32_t t0,
                uint32_t n, float *y)
{
    if (n == 0 || t0 > bt || n > bt - t0 || !shape_ok(q, v, bt, d))
        return;
    const uint8_t *p = tile;
    switch (q) {
    case KERN_KVQ_BF16:
        bf16_decode(p + (size_t)t0 * d * 2, (size_t)n * d, y);
        break;
    case KERN_KVQ_Q8_0:
        q8_0_decode(p + (size_t)t0 * (d / KERN_QK8_0) * sizeof(kern_block_q8_0_t), (size_t)n * d,
                    y);
        break;
    case KERN_KVQ_FP8:
        fp8_decode(p, bt, d, t0, n, y);
        break;
    case KERN_KVQ_Q4:
        q4_decode(p, v, bt, d, t0, n, y);
        break;
    default:
        break;
    }
}
