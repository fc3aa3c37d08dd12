/*
 * kernels/cpu/cpu_kquant.c — the cpu backend's Q4_0 and K-quant (Q4_K,
 * Q5_K, Q6_K) weights: AVX2 row conversion to f32 (get_rows and the GEMM
 * path's tiles, via kern__cpu_row_to_f32 in cpu_matmul.c) and the decode
 * dot products, which unpack each block in registers as it streams from
 * memory (never an f32 copy of the weights).  Called from cpu_matmul.c's
 * kern__cpu_matmul for x rows below its GEMM threshold.
 *
 * The products take x rounded to int8 per 32 values (kern.h, as Q8_0's),
 * so they run on vpmaddubsw (unsigned weight levels x signed x bytes):
 *
 *   Q4_K/Q5_K  per 32-value sub-block j: d*sc_j * xd_j * (q . xq)
 *              minus, per super-block, sum_j dmin*m_j * xd_j * sum(xq_j)
 *   Q6_K       per 32 values: d * xd * sum over its two 16-value groups
 *              of sc_g * ((q - 32) . xq), sc_g applied in vpmaddwd
 *   Q4_0       per 32 values: d * xd * ((q - 8) . xq)
 *
 * The integer sums are exact, so results differ from the ref backend
 * (dequantize, then a double dot with the same rounded x) by f32 rounding
 * only.  Measured on the 2-core Zen 4 VM, 16384 x 2048 Q4_K, one x row,
 * one thread: multiplying in f32 (x unrounded, weights converted with
 * vcvtdq2ps) reached 14 GMAC/s; in int8, 17-21.  Every output element
 * takes the same operations whatever the number of x rows in its tile, so
 * a row's result does not depend on what it is batched with.
 *
 * With AVX-512 VNNI, Q4_K and Q5_K use vpdpbusd (256-bit): levels are the
 * unsigned operand as stored, one instruction per sub-block; the scales of
 * all rows of a tile are unpacked before any dot product, and each output
 * sums in two float chains.  8192 x 2048 Q4_K, one row, one thread:
 * 26 -> 39 GMAC/s (the AVX2 tiles' single chain per output, waiting on
 * each row's scale unpacking, held them to about 4 instructions a cycle
 * of work that fits 2-3x more).
 *
 * The conversion to f32, in contrast, must equal kern_row_to_f32 bit for
 * bit: it multiplies and subtracts in two roundings, as ggml does, and an
 * empty asm statement keeps the compiler from fusing them.
 */
#include "cpu_int.h"

#include <string.h>

#define XQ_MAX 4     /* x rows per tile */
#define KQ_RB_MAX 8  /* weight rows per tile */
#define ROW_CHUNK 16 /* weight rows kept hot in L2 across x groups */

#ifdef CPU_HAVE_X86

#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX2_INLINE __attribute__((always_inline, target("avx2,fma,f16c"))) static inline

/* 8 bytes zero-extended to 8 int32 lanes. */
AVX2_INLINE __m256i
u8x8(const uint8_t *p)
{
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

AVX2_INLINE float
half(const uint16_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* a * b - c with two roundings (no FMA contraction). */
AVX2_INLINE __m256
mul_sub(__m256 a, __m256 b, __m256 c)
{
    __m256 t = _mm256_mul_ps(a, b);
    __asm__("" : "+x"(t));
    return _mm256_sub_ps(t, c);
}

/* ------------------------------------------------------------------------ */
/* Row conversion, bit for bit kern_row_to_f32.                             */
/* ------------------------------------------------------------------------ */

AVX2 static void
row_q4_0(const kern_block_q4_0_t *b, float *y, size_t nb)
{
    const __m256i m4 = _mm256_set1_epi32(15), k8 = _mm256_set1_epi32(8);
    for (size_t i = 0; i < nb; i++, y += KERN_QK4_0) {
        __m256 d = _mm256_set1_ps(half(&b[i].d));
        for (int g = 0; g < 2; g++) {
            __m256i v = u8x8(b[i].qs + 8 * g);
            __m256i lo = _mm256_sub_epi32(_mm256_and_si256(v, m4), k8);
            __m256i hi = _mm256_sub_epi32(_mm256_srli_epi32(v, 4), k8);
            _mm256_storeu_ps(y + 8 * g, _mm256_mul_ps(_mm256_cvtepi32_ps(lo), d));
            _mm256_storeu_ps(y + 16 + 8 * g, _mm256_mul_ps(_mm256_cvtepi32_ps(hi), d));
        }
    }
}

/* Q4_K and Q5_K: qh is NULL for Q4_K. */
AVX2 static void
row_kx(const uint8_t *blocks, size_t block_bytes, bool q5, float *y, size_t nb)
{
    const __m256i m4 = _mm256_set1_epi32(15), b4 = _mm256_set1_epi32(16);
    for (size_t i = 0; i < nb; i++) {
        const uint8_t *blk = blocks + i * block_bytes;
        const uint8_t *scales = blk + 4, *qh = blk + 16, *qs = blk + (q5 ? 48 : 16);
        float d = half((const uint16_t *)blk), min = half((const uint16_t *)blk + 1);
        for (int c = 0; c < 4; c++, y += 64) {
            uint8_t sc, m;
            kern__scale_min_k4(2 * c, scales, &sc, &m);
            __m256 d1 = _mm256_set1_ps(d * sc), m1 = _mm256_set1_ps(min * m);
            kern__scale_min_k4(2 * c + 1, scales, &sc, &m);
            __m256 d2 = _mm256_set1_ps(d * sc), m2 = _mm256_set1_ps(min * m);
            __m128i s1 = _mm_cvtsi32_si128(2 * c), s2 = _mm_cvtsi32_si128(2 * c + 1);
            for (int g = 0; g < 4; g++) {
                __m256i v = u8x8(qs + 32 * c + 8 * g);
                __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_srli_epi32(v, 4);
                if (q5) {
                    __m256i h = _mm256_slli_epi32(u8x8(qh + 8 * g), 4);
                    lo = _mm256_or_si256(lo, _mm256_and_si256(_mm256_srl_epi32(h, s1), b4));
                    hi = _mm256_or_si256(hi, _mm256_and_si256(_mm256_srl_epi32(h, s2), b4));
                }
                _mm256_storeu_ps(y + 8 * g, mul_sub(d1, _mm256_cvtepi32_ps(lo), m1));
                _mm256_storeu_ps(y + 32 + 8 * g, mul_sub(d2, _mm256_cvtepi32_ps(hi), m2));
            }
        }
    }
}

/* The four 6-bit values of Q6_K at l .. l+7 of one 128-value half, minus
 * 32: q[k] goes to y[l + 32k]. */
AVX2_INLINE void
q6_unpack(const uint8_t *ql, const uint8_t *qh, int l, __m256i q[4])
{
    const __m256i m4 = _mm256_set1_epi32(15), m30 = _mm256_set1_epi32(0x30),
                  k32 = _mm256_set1_epi32(32);
    __m256i a = u8x8(ql + l), b = u8x8(ql + 32 + l), h = u8x8(qh + l);
    q[0] = _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_and_si256(_mm256_slli_epi32(h, 4), m30));
    q[1] = _mm256_or_si256(_mm256_and_si256(b, m4), _mm256_and_si256(_mm256_slli_epi32(h, 2), m30));
    q[2] = _mm256_or_si256(_mm256_srli_epi32(a, 4), _mm256_and_si256(h, m30));
    q[3] = _mm256_or_si256(_mm256_srli_epi32(b, 4), _mm256_and_si256(_mm256_srli_epi32(h, 2), m30));
    q[0] = _mm256_sub_epi32(q[0], k32);
    q[1] = _mm256_sub_epi32(q[1], k32);
    q[2] = _mm256_sub_epi32(q[2], k32);
    q[3] = _mm256_sub_epi32(q[3], k32);
}

AVX2 static void
row_q6_k(const kern_block_q6_k_t *b, float *y, size_t nb)
{
    for (size_t i = 0; i < nb; i++) {
        float d = half(&b[i].d);
        for (int n = 0; n < 2; n++, y += 128) {
            const uint8_t *ql = b[i].ql + 64 * n, *qh = b[i].qh + 32 * n;
            const int8_t *sc = b[i].scales + 8 * n;
            for (int g = 0; g < 4; g++) {
                __m256i q[4];
                q6_unpack(ql, qh, 8 * g, q);
                for (int k = 0; k < 4; k++) {
                    __m256 ds = _mm256_set1_ps(d * sc[g / 2 + 2 * k]);
                    _mm256_storeu_ps(y + 32 * k + 8 * g,
                                     _mm256_mul_ps(ds, _mm256_cvtepi32_ps(q[k])));
                }
            }
        }
    }
}

void
kern__cpu_kq_row_to_f32_avx2(kern_dtype_t type, const void *row, float *y, size_t n)
{
    switch (type) {
    case KERN_Q4_0:
        row_q4_0(row, y, n / KERN_QK4_0);
        return;
    case KERN_Q4_K:
        row_kx(row, sizeof(kern_block_q4_k_t), false, y, n / KERN_QK_K);
        return;
    case KERN_Q5_K:
        row_kx(row, sizeof(kern_block_q5_k_t), true, y, n / KERN_QK_K);
        return;
    case KERN_Q6_K:
        row_q6_k(row, y, n / KERN_QK_K);
        return;
    default:
        kern_row_to_f32(type, row, y, n);
        return;
    }
}

/* ------------------------------------------------------------------------ */
/* Dot tiles: RB weight rows x XB x rows, both compile-time constants.      */
/* ------------------------------------------------------------------------ */

/* x as the products see it (kern.h: rounded per 32 values like Q8_0's):
 * per row, the int8 values, their scales, and scale * sum of the block's
 * int8 values (for the K-quants' mins). */
typedef struct kq_x {
    const int8_t *q[XQ_MAX];
    const float *d[XQ_MAX];
    const float *m[XQ_MAX];
} kq_x_t;

/* out[r][t] = dot(W row wr[r], x row t), nb blocks of the type. */
typedef void (*kq_tile_fn)(const uint8_t *const *wr, const kq_x_t *x, size_t nb, size_t pf,
                           float out[][XQ_MAX]);

/* Rows of K-quants are short (1152 bytes for 2048 Q4_K values), too short
 * for the hardware prefetchers to ramp up on before a tile moves on to the
 * next rows, which left the 1B model's products at a quarter of the
 * memory bandwidth.  So each tile prefetches the rows the next tile reads,
 * `pf` bytes ahead, as it goes: a whole tile's time of warning. */
AVX2_INLINE void
prefetch_block(const uint8_t *p, size_t bytes)
{
    for (size_t o = 0; o < bytes; o += 64)
        _mm_prefetch((const char *)p + o, _MM_HINT_T0);
}

/* sum over 32 products of unsigned weight bytes and int8 x, as 8 int32
 * lanes (pairs of products fit int16: |q| <= 63, |x| <= 127). */
AVX2_INLINE __m256
dot32(__m256i uq, __m256i xq, __m256i scale16)
{
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(uq, xq), scale16));
}

/* The 8 scales (d * sc) and 8 mins (dmin * m) of a Q4_K/Q5_K super-block,
 * unpacked as llama.cpp does: four 32-bit words, then one widening each. */
AVX2_INLINE void
kx_scales(const uint8_t *blk, __m256 *sc, __m256 *mn)
{
    uint32_t u[4];
    memcpy(u, blk + 4, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4);
    uint32_t ua = u[1] & 0x3f3f3f3f;
    u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);
    u[2] = ua;
    u[0] &= 0x3f3f3f3f;
    __m256 d = _mm256_set1_ps(half((const uint16_t *)blk));
    __m256 dm = _mm256_set1_ps(half((const uint16_t *)blk + 1));
    *sc = _mm256_mul_ps(d, _mm256_cvtepi32_ps(u8x8((const uint8_t *)u)));
    *mn = _mm256_mul_ps(dm, _mm256_cvtepi32_ps(u8x8((const uint8_t *)u + 8)));
}

#define TILE_INIT                                        \
    __m256 acc[4][XQ_MAX];                               \
    _Pragma("GCC unroll 4") for (int r = 0; r < RB; r++) \
        _Pragma("GCC unroll 4") for (int t = 0; t < XB; t++) acc[r][t] = _mm256_setzero_ps()
#define TILE_OUT                                         \
    _Pragma("GCC unroll 4") for (int r = 0; r < RB; r++) \
        _Pragma("GCC unroll 4") for (int t = 0; t < XB; t++) out[r][t] = cpu_hsum_avx2(acc[r][t])

/* The 64 weights of group c of a Q4_K/Q5_K super-block as bytes 0..15
 * (0..31 with Q5_K's high bits h): the low nibbles are sub-block 2c, the
 * high ones 2c + 1. */
AVX2_INLINE void
kx_unpack(const uint8_t *qs, __m256i h, int c, bool q5, __m256i *lo, __m256i *hi)
{
    const __m256i m4 = _mm256_set1_epi8(15), b4 = _mm256_set1_epi8(16);
    __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
    *lo = _mm256_and_si256(v, m4);
    *hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
    if (q5) {
        __m256i u1 = _mm256_set1_epi8((char)(1 << (2 * c)));
        __m256i u2 = _mm256_set1_epi8((char)(2 << (2 * c)));
        *lo = _mm256_or_si256(*lo,
                              _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, u1), u1), b4));
        *hi = _mm256_or_si256(*hi,
                              _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, u2), u2), b4));
    }
}

/* Q4_K and Q5_K: per 32-value sub-block j, d*sc_j * xd_j * (q . xq), and
 * per super-block the mins, dmin*m_j * xd_j * sum(xq_j), in one vector. */
AVX2_INLINE void
tile_kx(const bool q5, const int RB, const int XB, const uint8_t *const *wr, const kq_x_t *x,
        size_t nb, size_t pf, float out[][XQ_MAX])
{
    const size_t bb = q5 ? sizeof(kern_block_q5_k_t) : sizeof(kern_block_q4_k_t);
    const __m256i ones = _mm256_set1_epi16(1);
    TILE_INIT;
    for (size_t b = 0; b < nb; b++) {
#pragma GCC unroll 4
        for (int r = 0; r < RB; r++) {
            const uint8_t *blk = wr[r] + b * bb;
            const uint8_t *qh = blk + 16, *qs = blk + (q5 ? 48 : 16);
            prefetch_block(blk + pf, bb);
            __m256 scv, mnv;
            kx_scales(blk, &scv, &mnv);
            float s[XQ_MAX][8];
#pragma GCC unroll 4
            for (int t = 0; t < XB; t++) {
                __m256 xd = _mm256_loadu_ps(x->d[t] + 8 * b);
                _mm256_storeu_ps(s[t], _mm256_mul_ps(scv, xd));
                acc[r][t] = _mm256_fnmadd_ps(mnv, _mm256_loadu_ps(x->m[t] + 8 * b), acc[r][t]);
            }
            __m256i h = q5 ? _mm256_loadu_si256((const __m256i *)qh) : _mm256_setzero_si256();
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                __m256i lo, hi;
                kx_unpack(qs, h, c, q5, &lo, &hi);
#pragma GCC unroll 4
                for (int t = 0; t < XB; t++) {
                    const int8_t *xq = x->q[t] + b * KERN_QK_K + 64 * c;
                    __m256 pl = dot32(lo, _mm256_loadu_si256((const __m256i *)xq), ones);
                    __m256 ph = dot32(hi, _mm256_loadu_si256((const __m256i *)(xq + 32)), ones);
                    acc[r][t] = _mm256_fmadd_ps(pl, _mm256_broadcast_ss(&s[t][2 * c]), acc[r][t]);
                    acc[r][t] =
                        _mm256_fmadd_ps(ph, _mm256_broadcast_ss(&s[t][2 * c + 1]), acc[r][t]);
                }
            }
        }
    }
    TILE_OUT;
}

/* Q6_K: per 32 values (one x block), two 16-value groups; the int8 group
 * scales multiply in the int16 -> int32 step, d * xd after. */
AVX2_INLINE void
tile_q6_k(const int RB, const int XB, const uint8_t *const *wr, const kq_x_t *x, size_t nb,
          size_t pf, float out[][XQ_MAX])
{
    const __m256i m4 = _mm256_set1_epi8(15), m30 = _mm256_set1_epi8(0x30),
                  k32 = _mm256_set1_epi8(32);
    TILE_INIT;
    for (size_t b = 0; b < nb; b++) {
#pragma GCC unroll 4
        for (int r = 0; r < RB; r++) {
            const kern_block_q6_k_t *blk = (const kern_block_q6_k_t *)wr[r] + b;
            prefetch_block((const uint8_t *)blk + pf, sizeof *blk);
            __m256 d = _mm256_set1_ps(half(&blk->d));
            float s[XQ_MAX][8];
#pragma GCC unroll 4
            for (int t = 0; t < XB; t++)
                _mm256_storeu_ps(s[t], _mm256_mul_ps(d, _mm256_loadu_ps(x->d[t] + 8 * b)));
#pragma GCC unroll 2
            for (int n = 0; n < 2; n++) {
                const uint8_t *ql = blk->ql + 64 * n, *qhp = blk->qh + 32 * n;
                const int8_t *sc = blk->scales + 8 * n;
                __m256i a = _mm256_loadu_si256((const __m256i *)ql);
                __m256i bq = _mm256_loadu_si256((const __m256i *)(ql + 32));
                __m256i h = _mm256_loadu_si256((const __m256i *)qhp);
                __m256i q[4];
                q[0] = _mm256_or_si256(_mm256_and_si256(a, m4),
                                       _mm256_and_si256(_mm256_slli_epi16(h, 4), m30));
                q[1] = _mm256_or_si256(_mm256_and_si256(bq, m4),
                                       _mm256_and_si256(_mm256_slli_epi16(h, 2), m30));
                q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4),
                                       _mm256_and_si256(h, m30));
                q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bq, 4), m4),
                                       _mm256_and_si256(_mm256_srli_epi16(h, 2), m30));
#pragma GCC unroll 4
                for (int k = 0; k < 4; k++) {
                    __m256i w = _mm256_sub_epi8(q[k], k32), aw = _mm256_abs_epi8(w);
                    __m256i sc16 =
                        _mm256_set_m128i(_mm_set1_epi16(sc[2 * k + 1]), _mm_set1_epi16(sc[2 * k]));
#pragma GCC unroll 4
                    for (int t = 0; t < XB; t++) {
                        const int8_t *xq = x->q[t] + b * KERN_QK_K + 128 * n + 32 * k;
                        __m256i xv = _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xq), w);
                        acc[r][t] = _mm256_fmadd_ps(
                            dot32(aw, xv, sc16), _mm256_broadcast_ss(&s[t][4 * n + k]), acc[r][t]);
                    }
                }
            }
        }
    }
    TILE_OUT;
}

AVX2_INLINE void
tile_q4_0(const int RB, const int XB, const uint8_t *const *wr, const kq_x_t *x, size_t nb,
          size_t pf, float out[][XQ_MAX])
{
    const __m128i m4 = _mm_set1_epi8(15);
    const __m256i k8 = _mm256_set1_epi8(8), ones = _mm256_set1_epi16(1);
    TILE_INIT;
    for (size_t b = 0; b < nb; b++) {
#pragma GCC unroll 4
        for (int r = 0; r < RB; r++) {
            const kern_block_q4_0_t *blk = (const kern_block_q4_0_t *)wr[r] + b;
            if (b % 4 == 0)
                prefetch_block((const uint8_t *)blk + pf, 4 * sizeof *blk);
            __m128i v = _mm_loadu_si128((const __m128i *)blk->qs);
            __m256i q =
                _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m4), _mm_and_si128(v, m4));
            __m256i w = _mm256_sub_epi8(q, k8), aw = _mm256_abs_epi8(w);
            float d = half(&blk->d);
#pragma GCC unroll 4
            for (int t = 0; t < XB; t++) {
                __m256i xv = _mm256_sign_epi8(
                    _mm256_loadu_si256((const __m256i *)(x->q[t] + b * KERN_QK4_0)), w);
                acc[r][t] =
                    _mm256_fmadd_ps(dot32(aw, xv, ones), _mm256_set1_ps(d * x->d[t][b]), acc[r][t]);
            }
        }
    }
    TILE_OUT;
}

/* ------------------------------------------------------------------------ */
/* The same tiles with AVX-512 VNNI (256-bit vpdpbusd, AVX512VL).           */
/* ------------------------------------------------------------------------ */

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#define VNNI_INLINE               \
    __attribute__((always_inline, \
                   target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))) static inline

/* Two accumulators per output: one float chain per output held the AVX2
 * tiles to one sub-block per fmadd latency. */
#define VTILE_INIT                                                                         \
    __m256 acc[KQ_RB_MAX][XQ_MAX][2];                                                      \
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++)                                   \
        _Pragma("GCC unroll 4") for (int t = 0; t < XB; t++) acc[r][t][0] = acc[r][t][1] = \
            _mm256_setzero_ps()
#define VTILE_OUT                                                        \
    _Pragma("GCC unroll 8") for (int r = 0; r < RB; r++)                 \
        _Pragma("GCC unroll 4") for (int t = 0; t < XB; t++) out[r][t] = \
            cpu_hsum_avx2(_mm256_add_ps(acc[r][t][0], acc[r][t][1]))

/* Q4_K and Q5_K: levels 0..15 (0..31) are the unsigned operand of
 * vpdpbusd as they are; one instruction per sub-block where AVX2 takes
 * vpmaddubsw and vpmaddwd. */
VNNI_INLINE void
vtile_kx(const bool q5, const int RB, const int XB, const uint8_t *const *wr, const kq_x_t *x,
         size_t nb, size_t pf, float out[][XQ_MAX])
{
    const size_t bb = q5 ? sizeof(kern_block_q5_k_t) : sizeof(kern_block_q4_k_t);
    const __m256i z = _mm256_setzero_si256();
    VTILE_INIT;
    for (size_t b = 0; b < nb; b++) {
        /* All rows' scales first: their unpacking is a long chain that
         * the dot products of the same row would otherwise wait on. */
        float s[KQ_RB_MAX][XQ_MAX][8] __attribute__((aligned(32)));
#pragma GCC unroll 8
        for (int r = 0; r < RB; r++) {
            const uint8_t *blk = wr[r] + b * bb;
            prefetch_block(blk + pf, bb);
            __m256 scv, mnv;
            kx_scales(blk, &scv, &mnv);
#pragma GCC unroll 4
            for (int t = 0; t < XB; t++) {
                __m256 xd = _mm256_loadu_ps(x->d[t] + 8 * b);
                _mm256_store_ps(s[r][t], _mm256_mul_ps(scv, xd));
                acc[r][t][1] =
                    _mm256_fnmadd_ps(mnv, _mm256_loadu_ps(x->m[t] + 8 * b), acc[r][t][1]);
            }
        }
        /* Read back from memory as broadcast operands of the fmadds: kept
         * in registers, each takes two shuffles on the ports vpdpbusd
         * needs. */
        __asm__("" : "+m"(s));
#pragma GCC unroll 8
        for (int r = 0; r < RB; r++) {
            const uint8_t *blk = wr[r] + b * bb;
            const uint8_t *qh = blk + 16, *qs = blk + (q5 ? 48 : 16);
            __m256i h = q5 ? _mm256_loadu_si256((const __m256i *)qh) : z;
#pragma GCC unroll 4
            for (int c = 0; c < 4; c++) {
                __m256i lo, hi;
                kx_unpack(qs, h, c, q5, &lo, &hi);
#pragma GCC unroll 4
                for (int t = 0; t < XB; t++) {
                    const int8_t *xq = x->q[t] + b * KERN_QK_K + 64 * c;
                    __m256i pl =
                        _mm256_dpbusd_epi32(z, lo, _mm256_loadu_si256((const __m256i *)xq));
                    __m256i ph =
                        _mm256_dpbusd_epi32(z, hi, _mm256_loadu_si256((const __m256i *)(xq + 32)));
                    acc[r][t][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pl),
                                                   _mm256_set1_ps(s[r][t][2 * c]), acc[r][t][0]);
                    acc[r][t][1] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(ph), _mm256_set1_ps(s[r][t][2 * c + 1]), acc[r][t][1]);
                }
            }
        }
    }
    VTILE_OUT;
}

#define KQ_VTILE(name, call, XB)                                                             \
    VNNI static void kqv_##name##_##XB(const uint8_t *const *wr, const kq_x_t *x, size_t nb, \
                                       size_t pf, float out[][XQ_MAX])                       \
    {                                                                                        \
        call;                                                                                \
    }
#define KQ_VTILES(name, T)     \
    KQ_VTILE(name, T(8, 1), 1) \
    KQ_VTILE(name, T(4, 2), 2) \
    KQ_VTILE(name, T(2, 3), 3) \
    KQ_VTILE(name, T(2, 4), 4)

#define VQ4K(RB, XB) vtile_kx(false, RB, XB, wr, x, nb, pf, out)
#define VQ5K(RB, XB) vtile_kx(true, RB, XB, wr, x, nb, pf, out)
KQ_VTILES(q4_k, VQ4K)
KQ_VTILES(q5_k, VQ5K)

#define KQ_TILE(name, call, XB)                                                             \
    AVX2 static void kq_##name##_##XB(const uint8_t *const *wr, const kq_x_t *x, size_t nb, \
                                      size_t pf, float out[][XQ_MAX])                       \
    {                                                                                       \
        call;                                                                               \
    }
#define KQ_TILES(name, T)     \
    KQ_TILE(name, T(4, 1), 1) \
    KQ_TILE(name, T(4, 2), 2) \
    KQ_TILE(name, T(2, 3), 3) \
    KQ_TILE(name, T(2, 4), 4)

#define Q4K(RB, XB) tile_kx(false, RB, XB, wr, x, nb, pf, out)
#define Q5K(RB, XB) tile_kx(true, RB, XB, wr, x, nb, pf, out)
#define Q6K(RB, XB) tile_q6_k(RB, XB, wr, x, nb, pf, out)
#define Q40(RB, XB) tile_q4_0(RB, XB, wr, x, nb, pf, out)
KQ_TILES(q4_0, Q40)
KQ_TILES(q4_k, Q4K)
KQ_TILES(q5_k, Q5K)
KQ_TILES(q6_k, Q6K)

/* [type][XB - 1] and the matching RB. */
static const kq_tile_fn kq_tiles[4][XQ_MAX] = {
    {kq_q4_0_1, kq_q4_0_2, kq_q4_0_3, kq_q4_0_4},
    {kq_q4_k_1, kq_q4_k_2, kq_q4_k_3, kq_q4_k_4},
    {kq_q5_k_1, kq_q5_k_2, kq_q5_k_3, kq_q5_k_4},
    {kq_q6_k_1, kq_q6_k_2, kq_q6_k_3, kq_q6_k_4},
};
static const int kq_rb[XQ_MAX] = {4, 4, 2, 2};

/* With VNNI.  Q4_0 and Q6_K keep the AVX2 tiles: Q6_K's laid out as
 * vtile_kx (vpmaddubsw kept for its signed levels) measured 0-7% faster,
 * within the noise of a shared VM.  A vpdpbusd Q6_K tile (levels 0..63,
 * the accumulator started at -32 * sums of 4 x values, per-lane group
 * scales) was 1.3-1.4x faster on weights in L2 but 0.85-1.01x streaming
 * 16384 x 2048 from memory, at 8 or 4 rows and prefetching 1-3 tiles
 * ahead: the products are not compute-bound there. */
static const kq_tile_fn kqv_tiles[4][XQ_MAX] = {
    {kq_q4_0_1, kq_q4_0_2, kq_q4_0_3, kq_q4_0_4},
    {kqv_q4_k_1, kqv_q4_k_2, kqv_q4_k_3, kqv_q4_k_4},
    {kqv_q5_k_1, kqv_q5_k_2, kqv_q5_k_3, kqv_q5_k_4},
    {kq_q6_k_1, kq_q6_k_2, kq_q6_k_3, kq_q6_k_4},
};
static const int kqv_rb[4][XQ_MAX] = {{4, 4, 2, 2}, {8, 4, 2, 2}, {8, 4, 2, 2}, {4, 4, 2, 2}};

static int
kq_index(kern_dtype_t type)
{
    switch (type) {
    case KERN_Q4_0:
        return 0;
    case KERN_Q4_K:
        return 1;
    case KERN_Q5_K:
        return 2;
    default:
        return 3;
    }
}

/* ------------------------------------------------------------------------ */
/* The decode product.                                                      */
/* ------------------------------------------------------------------------ */

typedef struct kq_ctx {
    const kern_tensor_t *w;
    const int8_t *xq; /* [n][cols] */
    const float *xd;  /* [n][cols / 32] */
    const float *xm;  /* [n][cols / 32]: xd * sum of the block's xq */
    const float *bias;
    float *y;
    const kq_tile_fn *fns; /* [XB - 1] */
    const int *rb;         /* [XB - 1] */
    uint32_t n;
    uint32_t rows_per_task;
} kq_ctx_t;

static void
kq_task(void *ctx, int task, int thread)
{
    (void)thread;
    const kq_ctx_t *c = ctx;
    const kern_tensor_t *w = c->w;
    uint32_t r0 = (uint32_t)task * c->rows_per_task;
    uint32_t r1 = r0 + c->rows_per_task < w->n_rows ? r0 + c->rows_per_task : w->n_rows;
    const kq_tile_fn *fns = c->fns;
    size_t cols = w->n_cols, nb = cols / kern_type_traits(w->type)->block;
    const uint8_t *base = w->data;
    for (uint32_t ch = r0; ch < r1; ch += ROW_CHUNK) {
        uint32_t ch1 = ch + ROW_CHUNK < r1 ? ch + ROW_CHUNK : r1;
        for (uint32_t t0 = 0; t0 < c->n; t0 += XQ_MAX) {
            int xb = c->n - t0 < XQ_MAX ? (int)(c->n - t0) : XQ_MAX;
            int rb = c->rb[xb - 1];
            kq_x_t x;
            for (int t = 0; t < xb; t++) {
                x.q[t] = c->xq + (size_t)(t0 + t) * cols;
                x.d[t] = c->xd + (size_t)(t0 + t) * (cols / 32);
                x.m[t] = c->xm + (size_t)(t0 + t) * (cols / 32);
            }
            for (uint32_t r = ch; r < ch1; r += (uint32_t)rb) {
                /* Past the range end, repeat the last row; its sums are dropped. */
                const uint8_t *wr[KQ_RB_MAX];
                for (int k = 0; k < rb; k++) {
                    uint32_t rr = r + (uint32_t)k < ch1 ? r + (uint32_t)k : ch1 - 1;
                    wr[k] = base + (size_t)rr * w->row_bytes;
                }
                float out[KQ_RB_MAX][XQ_MAX];
                fns[xb - 1](wr, &x, nb, (size_t)rb * w->row_bytes, out);
                for (int k = 0; k < rb && r + (uint32_t)k < ch1; k++) {
                    float bv = c->bias ? c->bias[r + k] : 0.0f;
                    for (int t = 0; t < xb; t++)
                        c->y[(size_t)(t0 + t) * w->n_rows + r + k] = out[k][t] + bv;
                }
            }
        }
    }
}

int
kern__cpu_matmul_kq(kern_cpu_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
                    const float *bias, float *y)
{
    size_t cols = w->n_cols, nxb = cols / KERN_QK8_0;
    size_t qbytes = ((size_t)n * cols + 63) & ~(size_t)63;
    void *work;
    int rc = kern__cpu_work_reserve(be, qbytes + 2 * (size_t)n * nxb * sizeof(float), &work);
    if (rc)
        return rc;
    kq_ctx_t c = {.w = w, .bias = bias, .y = y, .n = n};
    int8_t *xq = work;
    float *xd = (float *)((char *)work + qbytes), *xm = xd + (size_t)n * nxb;
    kern_quantize_x_q8(x, (size_t)n * cols, xq, xd);
    for (size_t j = 0; j < (size_t)n * nxb; j++) {
        int s = 0;
        for (int l = 0; l < KERN_QK8_0; l++)
            s += xq[j * KERN_QK8_0 + l];
        xm[j] = xd[j] * (float)s;
    }
    c.xq = xq;
    c.xd = xd;
    c.xm = xm;
    int ti = kq_index(w->type);
    c.fns = be->isa >= CPU_ISA_AVX512VNNI ? kqv_tiles[ti] : kq_tiles[ti];
    c.rb = be->isa >= CPU_ISA_AVX512VNNI ? kqv_rb[ti] : kq_rb;
    /* As cpu_matmul.c's dot path: several tasks per thread, claimed
     * dynamically, rows in multiples of 8 (the largest tile). */
    size_t per;
    int n_tasks = kern__cpu_unit_tasks(be, w->n_rows, w->row_bytes, 8, &per);
    c.rows_per_task = (uint32_t)per;
    kern__cpu_parallel(be, (int)n_tasks, kq_task, &c);
    return 0;
}

#endif /* CPU_HAVE_X86 */
