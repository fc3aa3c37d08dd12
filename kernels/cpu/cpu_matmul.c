/*
 * kernels/cpu/cpu_matmul.c — matrix products y = x W^T (+ bias) for the cpu
 * backend, and the SIMD row conversions they (and get_rows) share.  Called
 * through kern_cpu.c's vtable from kern_matmul().
 *
 * Two paths, chosen by n, the number of x rows:
 *
 *   n < GEMM_MIN_N (decode)   SIMD dot products, tiles of 4 weight rows x
 *                             up to 4 x rows.  Each task owns a contiguous
 *                             range of output rows; a weight row comes from
 *                             memory once for all n x rows (later groups of
 *                             x rows re-read a 16-row chunk from L2) and is
 *                             converted to f32 in registers.
 *
 *   n >= GEMM_MIN_N (prefill) OpenBLAS sgemm per tile of W rows.  F32 W is
 *                             used in place; other types are converted a
 *                             tile at a time into per-thread scratch, never
 *                             as a whole f32 copy.  Tiles run on our pool
 *                             with OpenBLAS single-threaded.
 *
 * Measured on the 2-core Zen 4 dev VM (2048x4096 weights): OpenBLAS sgemm
 * is slow for few rows (about 30 GFLOP/s per core at n = 16, where the dot
 * path does 52), and only pulls ahead from n = 48 (57 vs 50; 85 vs 52 at
 * n = 256), hence GEMM_MIN_N.  Letting OpenBLAS thread one big sgemm for
 * F32 was 9% faster at n = 256 on 2 threads and equal at n = 64, but its
 * spinning threads would compete with this pool's, so it stays at one
 * thread.  An AVX-512 version of the f32 dot tiles was no faster (see
 * cpu_isa_t); the int8 products use VNNI (cpu_q8x16.c, cpu_kquant.c).
 *
 * Q8_0, Q4_0 and K-quant (Q4_K, Q5_K, Q6_K) products take x rounded to
 * int8 per 32-value block (kern.h).  For Q4_0 and the K-quants, the AVX2
 * dot path is cpu_kquant.c's (int8 products on weights unpacked in
 * registers); the GEMM path converts their tiles with cpu_kquant.c's SIMD
 * conversion and the scalar path a row at a time, both multiplying the
 * rounded x in f32.  With
 * AVX-512 VNNI the weights are packed and cpu_q8x16.c computes them; here,
 * with few x rows, the AVX2 products run in integers (below), and the
 * scalar and GEMM paths multiply the rounded x in f32.  Every path differs
 * from the ref by f32 rounding only.
 */
#include "cpu_int.h"

#include <cblas.h>
#include <math.h>
#include <stdlib.h>

#define GEMM_MIN_N 48             /* x rows from which sgemm beats the dot path */
#define TILE_FLOATS (1024 * 1024) /* f32 per GEMM tile */
#define XB_MAX 4                  /* x rows per dot tile */
#define ROW_CHUNK 16              /* weight rows kept hot in L2 across x groups */

/* ------------------------------------------------------------------------ */
/* Row conversion.                                                          */
/* ------------------------------------------------------------------------ */

#ifdef CPU_HAVE_X86
__attribute__((target("avx2,fma,f16c"))) static void
row_to_f32_avx2(kern_dtype_t type, const void *row, float *y, size_t n)
{
    size_t i = 0;
    switch (type) {
    case KERN_F16: {
        const uint16_t *h = row;
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
        for (; i < n; i++)
            y[i] = kvs_fp16_to_f32(h[i]);
        return;
    }
    case KERN_BF16: {
        const uint16_t *h = row;
        for (; i + 8 <= n; i += 8) {
            __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + i)));
            _mm256_storeu_ps(y + i, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
        }
        for (; i < n; i++)
            y[i] = kvs_bf16_to_f32(h[i]);
        return;
    }
    case KERN_Q8_0: {
        const kern_block_q8_0_t *b = row;
        for (size_t k = 0; k < n / KERN_QK8_0; k++) {
            __m256 d = _mm256_set1_ps(_cvtsh_ss(b[k].d));
            for (int s = 0; s < 4; s++) {
                __m128i q = _mm_loadl_epi64((const __m128i *)(b[k].qs + 8 * s));
                __m256 f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                _mm256_storeu_ps(y + k * KERN_QK8_0 + 8 * s, _mm256_mul_ps(d, f));
            }
        }
        return;
    }
    default:
        kern__cpu_kq_row_to_f32_avx2(type, row, y, n);
        return;
    }
}
#endif

void
kern__cpu_row_to_f32(cpu_isa_t isa, kern_dtype_t type, const void *row, float *y, size_t n)
{
#ifdef CPU_HAVE_X86
    if (isa >= CPU_ISA_AVX2) {
        row_to_f32_avx2(type, row, y, n);
        return;
    }
#endif
    (void)isa;
    kern_row_to_f32(type, row, y, n);
}

/* ------------------------------------------------------------------------ */
/* Dot path: tiles of RB weight rows x XB x rows.                           */
/* ------------------------------------------------------------------------ */

/* out[r][t] = dot(W row wr[r], x row xr[t]) over cols. */
typedef void (*dot_tile_fn)(const uint8_t *const *wr, const float *const *xr, size_t cols,
                            float out[][XB_MAX]);

/* memcpy because rows are only as aligned as row_bytes makes them. */
static float
scalar_weight(kern_dtype_t type, const uint8_t *row, size_t c)
{
    uint16_t h;
    float f;
    switch (type) {
    case KERN_F16:
        memcpy(&h, row + 2 * c, 2);
        return kvs_fp16_to_f32(h);
    case KERN_BF16:
        memcpy(&h, row + 2 * c, 2);
        return kvs_bf16_to_f32(h);
    default:
        memcpy(&f, row + 4 * c, 4);
        return f;
    }
}

#ifdef CPU_HAVE_X86

__attribute__((always_inline, target("avx2,fma,f16c"))) static inline __m256
load8_avx2(const int type, const uint8_t *row, size_t c)
{
    if (type == KERN_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * c)));
    if (type == KERN_BF16) {
        __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(row + 2 * c)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    }
    return _mm256_loadu_ps((const float *)row + c);
}

/* A block's fp16 scale in all lanes: broadcast the half, then convert. */
__attribute__((always_inline, target("avx2,fma,f16c"))) static inline __m256
bcast_d_avx2(uint16_t d)
{
    return _mm256_cvtph_ps(_mm_set1_epi16((short)d));
}

__attribute__((always_inline, target("avx2,fma,f16c"))) static inline __m256
q8_avx2(const int8_t *qs)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)qs)));
}

/* The generic tile; type, RB and XB are compile-time constants at every
 * call so the accumulators live in registers. */
__attribute__((always_inline, target("avx2,fma,f16c"))) static inline void
dot_tile_avx2(const int type, const int RB, const int XB, const uint8_t *const *wr,
              const float *const *xr, size_t cols, float out[][XB_MAX])
{
    __m256 acc[4][XB_MAX];
#pragma GCC unroll 4
    for (int r = 0; r < RB; r++)
#pragma GCC unroll 4
        for (int t = 0; t < XB; t++)
            acc[r][t] = _mm256_setzero_ps();
    size_t c = 0;
    if (type == KERN_Q8_0 && XB == 1) {
        /* One x row: sum q*x over the block, then scale by d once, which
         * saves three multiplies per block in this compute-bound loop. */
        for (size_t b = 0; b < cols / KERN_QK8_0; b++) {
            const float *xb = xr[0] + b * KERN_QK8_0;
#pragma GCC unroll 4
            for (int r = 0; r < RB; r++) {
                const kern_block_q8_0_t *blk = (const kern_block_q8_0_t *)wr[r] + b;
                __m256 s0 = _mm256_mul_ps(q8_avx2(blk->qs), _mm256_loadu_ps(xb));
                __m256 s1 = _mm256_mul_ps(q8_avx2(blk->qs + 16), _mm256_loadu_ps(xb + 16));
                s0 = _mm256_fmadd_ps(q8_avx2(blk->qs + 8), _mm256_loadu_ps(xb + 8), s0);
                s1 = _mm256_fmadd_ps(q8_avx2(blk->qs + 24), _mm256_loadu_ps(xb + 24), s1);
                acc[r][0] = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), bcast_d_avx2(blk->d), acc[r][0]);
            }
        }
        c = cols;
    } else if (type == KERN_Q8_0) {
        /* Several x rows: scale the weights once (d * q is exact in f32)
         * and share them across the rows. */
        for (size_t b = 0; b < cols / KERN_QK8_0; b++) {
            __m256 d[4];
#pragma GCC unroll 4
            for (int r = 0; r < RB; r++)
                d[r] = bcast_d_avx2(((const kern_block_q8_0_t *)wr[r])[b].d);
#pragma GCC unroll 4
            for (int s = 0; s < 4; s++) {
                __m256 xv[XB_MAX];
#pragma GCC unroll 4
                for (int t = 0; t < XB; t++)
                    xv[t] = _mm256_loadu_ps(xr[t] + b * KERN_QK8_0 + 8 * s);
#pragma GCC unroll 4
                for (int r = 0; r < RB; r++) {
                    const int8_t *qs = ((const kern_block_q8_0_t *)wr[r])[b].qs + 8 * s;
                    __m256 w = _mm256_mul_ps(d[r], q8_avx2(qs));
#pragma GCC unroll 4
                    for (int t = 0; t < XB; t++)
                        acc[r][t] = _mm256_fmadd_ps(w, xv[t], acc[r][t]);
                }
            }
        }
        c = cols;
    } else {
        for (; c + 8 <= cols; c += 8) {
            __m256 xv[XB_MAX];
#pragma GCC unroll 4
            for (int t = 0; t < XB; t++)
                xv[t] = _mm256_loadu_ps(xr[t] + c);
#pragma GCC unroll 4
            for (int r = 0; r < RB; r++) {
                __m256 w = load8_avx2(type, wr[r], c);
#pragma GCC unroll 4
                for (int t = 0; t < XB; t++)
                    acc[r][t] = _mm256_fmadd_ps(w, xv[t], acc[r][t]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < RB; r++) {
#pragma GCC unroll 4
        for (int t = 0; t < XB; t++) {
            float s = cpu_hsum_avx2(acc[r][t]);
            for (size_t k = c; k < cols; k++)
                s += scalar_weight((kern_dtype_t)type, wr[r], k) * xr[t][k];
            out[r][t] = s;
        }
    }
}

#define DOT_AVX2(T, RB, XB)                                                                 \
    __attribute__((target("avx2,fma,f16c"))) static void dot_avx2_##T##_##XB(               \
        const uint8_t *const *wr, const float *const *xr, size_t cols, float out[][XB_MAX]) \
    {                                                                                       \
        dot_tile_avx2(KERN_##T, RB, XB, wr, xr, cols, out);                                 \
    }
#define DOT_AVX2_TYPE(T) \
    DOT_AVX2(T, 4, 1)    \
    DOT_AVX2(T, 4, 2)    \
    DOT_AVX2(T, 4, 3)    \
    DOT_AVX2(T, 2, 4)
DOT_AVX2_TYPE(F32)
DOT_AVX2_TYPE(F16)
DOT_AVX2_TYPE(BF16)
DOT_AVX2_TYPE(Q8_0)

/* [type index][XB - 1] and the matching RB. */
static const dot_tile_fn dot_avx2[4][XB_MAX] = {
    {dot_avx2_F32_1, dot_avx2_F32_2, dot_avx2_F32_3, dot_avx2_F32_4},
    {dot_avx2_F16_1, dot_avx2_F16_2, dot_avx2_F16_3, dot_avx2_F16_4},
    {dot_avx2_BF16_1, dot_avx2_BF16_2, dot_avx2_BF16_3, dot_avx2_BF16_4},
    {dot_avx2_Q8_0_1, dot_avx2_Q8_0_2, dot_avx2_Q8_0_3, dot_avx2_Q8_0_4},
};
static const int dot_avx2_rb[XB_MAX] = {4, 4, 4, 2};

#endif /* CPU_HAVE_X86 */

static int
type_index(kern_dtype_t type)
{
    switch (type) {
    case KERN_F32:
        return 0;
    case KERN_F16:
        return 1;
    case KERN_BF16:
        return 2;
    default:
        return 3;
    }
}

typedef struct mm_ctx {
    kern_cpu_t *be;
    const kern_tensor_t *w;
    const float *x;
    const float *bias;
    float *y;
    uint32_t n;
    uint32_t rows_per_task;
} mm_ctx_t;

/* Portable fallback: convert a row into scratch, then plain dot products. */
static void
dot_rows_scalar(const mm_ctx_t *c, uint32_t r0, uint32_t r1, int thread)
{
    const kern_tensor_t *w = c->w;
    size_t cols = w->n_cols;
    float *wrow = c->be->scratch[thread].p;
    for (uint32_t r = r0; r < r1; r++) {
        kern_row_to_f32(w->type, (const uint8_t *)w->data + (size_t)r * w->row_bytes, wrow, cols);
        for (uint32_t t = 0; t < c->n; t++) {
            const float *xt = c->x + (size_t)t * cols;
            float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            size_t k = 0;
            for (; k + 4 <= cols; k += 4) {
                s0 += wrow[k] * xt[k];
                s1 += wrow[k + 1] * xt[k + 1];
                s2 += wrow[k + 2] * xt[k + 2];
                s3 += wrow[k + 3] * xt[k + 3];
            }
            for (; k < cols; k++)
                s0 += wrow[k] * xt[k];
            float s = (s0 + s1) + (s2 + s3);
            c->y[(size_t)t * w->n_rows + r] = s + (c->bias ? c->bias[r] : 0.0f);
        }
    }
}

static void
dot_task(void *ctx, int task, int thread)
{
    const mm_ctx_t *c = ctx;
    const kern_tensor_t *w = c->w;
    uint32_t r0 = (uint32_t)task * c->rows_per_task;
    uint32_t r1 = r0 + c->rows_per_task < w->n_rows ? r0 + c->rows_per_task : w->n_rows;
    if (r0 >= r1)
        return;
#ifdef CPU_HAVE_X86
    if (c->be->isa >= CPU_ISA_AVX2) {
        const dot_tile_fn *fns = dot_avx2[type_index(w->type)];
        const uint8_t *base = w->data;
        for (uint32_t ch = r0; ch < r1; ch += ROW_CHUNK) {
            uint32_t ch1 = ch + ROW_CHUNK < r1 ? ch + ROW_CHUNK : r1;
            for (uint32_t t0 = 0; t0 < c->n; t0 += XB_MAX) {
                int xb = c->n - t0 < XB_MAX ? (int)(c->n - t0) : XB_MAX;
                int rb = dot_avx2_rb[xb - 1];
                const float *xr[XB_MAX];
                for (int t = 0; t < xb; t++)
                    xr[t] = c->x + (size_t)(t0 + t) * w->n_cols;
                for (uint32_t r = ch; r < ch1; r += (uint32_t)rb) {
                    /* Past the range end, repeat the last row; its sums are dropped. */
                    const uint8_t *wr[4];
                    for (int k = 0; k < rb; k++) {
                        uint32_t rr = r + (uint32_t)k < ch1 ? r + (uint32_t)k : ch1 - 1;
                        wr[k] = base + (size_t)rr * w->row_bytes;
                    }
                    float out[4][XB_MAX];
                    fns[xb - 1](wr, xr, w->n_cols, out);
                    for (int k = 0; k < rb && r + (uint32_t)k < ch1; k++) {
                        float b = c->bias ? c->bias[r + k] : 0.0f;
                        for (int t = 0; t < xb; t++)
                            c->y[(size_t)(t0 + t) * w->n_rows + r + k] = out[k][t] + b;
                    }
                }
            }
        }
        return;
    }
#endif
    dot_rows_scalar(c, r0, r1, thread);
}

/* ------------------------------------------------------------------------ */
/* Q8_0 decode path without VNNI: int8 weights x int8 activations.          */
/* ------------------------------------------------------------------------ */

/* Widening int8 weights to f32 costs three instructions per 8 values and
 * leaves Q8_0 decode compute-bound at about half the memory bandwidth.  So
 * for few x rows the int8 activations are widened to int16 once and each
 * block is one vpmovsxbw + vpmaddwd pair per 16 values, scaled once in
 * f32.  The GEMM path (prefill) multiplies in f32. */
#define Q8I_XB 4

typedef struct q8i_ctx {
    const mm_ctx_t *mm;
    const int16_t *xq; /* [n][cols] */
    const float *xs;   /* [n][cols / 32] scales */
} q8i_ctx_t;

static void
quantize_x_i16(const float *x, size_t cols, int16_t *q, float *sc)
{
    int8_t q8[KERN_QK8_0];
    for (size_t b = 0; b < cols / KERN_QK8_0; b++) {
        kern_quantize_x_q8(x + b * KERN_QK8_0, KERN_QK8_0, q8, &sc[b]);
        for (int j = 0; j < KERN_QK8_0; j++)
            q[b * KERN_QK8_0 + j] = q8[j];
    }
}

#ifdef CPU_HAVE_X86
__attribute__((always_inline, target("avx2,fma,f16c"))) static inline void
q8i_rows_avx2(const q8i_ctx_t *c, const int XB, uint32_t t0, uint32_t r0, uint32_t r1)
{
    const mm_ctx_t *m = c->mm;
    const kern_tensor_t *w = m->w;
    size_t nb = w->n_cols / KERN_QK8_0;
    for (uint32_t r = r0; r < r1; r++) {
        const kern_block_q8_0_t *wb =
            (const kern_block_q8_0_t *)((const uint8_t *)w->data + (size_t)r * w->row_bytes);
        __m256 acc[Q8I_XB];
        for (int t = 0; t < XB; t++)
            acc[t] = _mm256_setzero_ps();
        for (size_t b = 0; b < nb; b++) {
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)wb[b].qs));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(wb[b].qs + 16)));
            float dw = _cvtsh_ss(wb[b].d);
            for (int t = 0; t < XB; t++) {
                const int16_t *xq = c->xq + ((size_t)(t0 + t) * nb + b) * KERN_QK8_0;
                __m256i p = _mm256_add_epi32(
                    _mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xq)),
                    _mm256_madd_epi16(w1, _mm256_loadu_si256((const __m256i *)(xq + 16))));
                __m256 d = _mm256_set1_ps(dw * c->xs[(size_t)(t0 + t) * nb + b]);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc[t]);
            }
        }
        for (int t = 0; t < XB; t++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[t]), _mm256_extractf128_ps(acc[t], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            float b = m->bias ? m->bias[r] : 0.0f;
            m->y[(size_t)(t0 + t) * w->n_rows + r] = _mm_cvtss_f32(h) + b;
        }
    }
}

#define Q8I_AVX2(XB)                                                         \
    __attribute__((target("avx2,fma,f16c"))) static void q8i_rows_avx2_##XB( \
        const q8i_ctx_t *c, uint32_t t0, uint32_t r0, uint32_t r1)           \
    {                                                                        \
        q8i_rows_avx2(c, XB, t0, r0, r1);                                    \
    }
Q8I_AVX2(1)
Q8I_AVX2(2)
Q8I_AVX2(3)
Q8I_AVX2(4)

static void
q8i_task(void *ctx, int task, int thread)
{
    (void)thread;
    const q8i_ctx_t *c = ctx;
    const mm_ctx_t *m = c->mm;
    uint32_t r0 = (uint32_t)task * m->rows_per_task;
    uint32_t r1 = r0 + m->rows_per_task < m->w->n_rows ? r0 + m->rows_per_task : m->w->n_rows;
    /* A chunk of weight rows stays in L2 while every group of x rows uses it. */
    for (uint32_t ch = r0; ch < r1; ch += ROW_CHUNK) {
        uint32_t ch1 = ch + ROW_CHUNK < r1 ? ch + ROW_CHUNK : r1;
        for (uint32_t t0 = 0; t0 < m->n; t0 += Q8I_XB) {
            switch (m->n - t0 < Q8I_XB ? m->n - t0 : Q8I_XB) {
            case 1:
                q8i_rows_avx2_1(c, t0, ch, ch1);
                break;
            case 2:
                q8i_rows_avx2_2(c, t0, ch, ch1);
                break;
            case 3:
                q8i_rows_avx2_3(c, t0, ch, ch1);
                break;
            default:
                q8i_rows_avx2_4(c, t0, ch, ch1);
                break;
            }
        }
    }
}
#endif

/* ------------------------------------------------------------------------ */
/* GEMM path.                                                               */
/* ------------------------------------------------------------------------ */

static void
gemm_task(void *ctx, int task, int thread)
{
    const mm_ctx_t *c = ctx;
    const kern_tensor_t *w = c->w;
    uint32_t r0 = (uint32_t)task * c->rows_per_task;
    uint32_t rows = w->n_rows - r0 < c->rows_per_task ? w->n_rows - r0 : c->rows_per_task;
    size_t cols = w->n_cols;
    const float *wt;
    size_t ldw;
    if (w->type == KERN_F32 && w->row_bytes % sizeof(float) == 0) {
        wt = (const float *)((const uint8_t *)w->data + (size_t)r0 * w->row_bytes);
        ldw = w->row_bytes / sizeof(float);
    } else {
        float *tile = c->be->scratch[thread].p;
        for (uint32_t r = 0; r < rows; r++)
            kern__cpu_row_to_f32(c->be->isa, w->type,
                                 (const uint8_t *)w->data + (size_t)(r0 + r) * w->row_bytes,
                                 tile + r * cols, cols);
        wt = tile;
        ldw = cols;
    }
    float beta = 0.0f;
    if (c->bias) {
        for (uint32_t t = 0; t < c->n; t++)
            memcpy(c->y + (size_t)t * w->n_rows + r0, c->bias + r0, rows * sizeof(float));
        beta = 1.0f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)c->n, (int)rows, (int)cols, 1.0f,
                c->x, (int)cols, wt, (int)ldw, beta, c->y + r0, (int)w->n_rows);
}

int
kern__cpu_matmul(kern_cpu_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
                 const float *bias, float *y)
{
    size_t cols = w->n_cols;
    if (kern__rounds_x(w->type) && (n >= GEMM_MIN_N || be->isa < CPU_ISA_AVX2)) {
        /* These paths multiply in f32: they get x as the integer ones see it. */
        void *work;
        int rc = kern__cpu_work_reserve(be, (size_t)n * cols * sizeof(float), &work);
        if (rc)
            return rc;
        for (uint32_t t = 0; t < n; t++)
            kern_round_x_q8(x + (size_t)t * cols, cols, (float *)work + (size_t)t * cols);
        x = work;
    }
    mm_ctx_t c = {.be = be, .w = w, .x = x, .bias = bias, .y = y, .n = n};
    if (n >= GEMM_MIN_N) {
        /* Tiles of up to 4 MiB of f32 (sgemm blocks them for the caches
         * itself), 16 to 256 rows, and at least two per thread. */
        size_t tr = TILE_FLOATS / cols;
        tr = tr < 16 ? 16 : tr > 256 ? 256 : tr & ~(size_t)15;
        while (tr > 16 && (w->n_rows + tr - 1) / tr < 2 * (size_t)be->n_threads)
            tr = (tr / 2 + 15) & ~(size_t)15;
        c.rows_per_task = (uint32_t)tr;
        if (w->type != KERN_F32 || w->row_bytes % sizeof(float) != 0) {
            int rc = kern__cpu_scratch_reserve(be, tr * cols * sizeof(float));
            if (rc)
                return rc;
        }
        /* Parallelism comes from our pool; OpenBLAS threads would only
         * oversubscribe the cores. */
        if (openblas_get_num_threads() != 1)
            openblas_set_num_threads(1);
        int n_tasks = (int)((w->n_rows + tr - 1) / tr);
        kern__cpu_parallel(be, n_tasks, gemm_task, &c);
        return 0;
    }
#ifdef CPU_HAVE_X86
    if (kern__cpu_is_kq(w->type) && be->isa >= CPU_ISA_AVX2)
        return kern__cpu_matmul_kq(be, w, x, n, bias, y);
#endif
    if (be->isa == CPU_ISA_SCALAR) {
        int rc = kern__cpu_scratch_reserve(be, cols * sizeof(float));
        if (rc)
            return rc;
    }
    size_t per;
    int n_tasks = kern__cpu_unit_tasks(be, w->n_rows, w->row_bytes, 4, &per);
    c.rows_per_task = (uint32_t)per;
#ifdef CPU_HAVE_X86
    if (w->type == KERN_Q8_0 && be->isa >= CPU_ISA_AVX2) {
        size_t nb = cols / KERN_QK8_0, qbytes = (size_t)n * cols * sizeof(int16_t);
        void *work;
        int rc = kern__cpu_work_reserve(be, qbytes + (size_t)n * nb * sizeof(float), &work);
        if (rc)
            return rc;
        q8i_ctx_t q = {.mm = &c, .xq = work, .xs = (const float *)((char *)work + qbytes)};
        for (uint32_t t = 0; t < n; t++)
            quantize_x_i16(x + (size_t)t * cols, cols, (int16_t *)work + (size_t)t * cols,
                           (float *)((char *)work + qbytes) + (size_t)t * nb);
        kern__cpu_parallel(be, (int)n_tasks, q8i_task, &q);
        return 0;
    }
#endif
    kern__cpu_parallel(be, (int)n_tasks, dot_task, &c);
    return 0;
}
