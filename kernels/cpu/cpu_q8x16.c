/*
 * kernels/cpu/cpu_q8x16.c — Q8_0 matrix products with AVX-512 VNNI on
 * weights packed in panels of 16 rows (KERN_LAYOUT_Q8_0_X16).  The cpu
 * backend packs at kern_pack_weight (the model loader calls it once per
 * weight) and routes matmul and get_rows on packed weights here.
 *
 * Why a layout of its own: in GGUF order a 32-value block is one row's,
 * so an int8 dot product (vpdpbusd) yields partial sums of one block that
 * must be reduced, converted and scaled for every (row, x row) pair, four
 * vector operations per 32 multiply-adds.  With 16 rows side by side, one
 * 64-byte load holds 4 columns of 16 rows; eight vpdpbusd finish a block
 * for 16 rows and one x row, and the float work (convert, scale, add) is
 * done once per block for 16 outputs.  That makes batched decode and
 * prefill compute-bound at the int8 rate instead of the f32 one.
 *
 * x is quantized per 32-value block to int8 with scale max|x| / 127, as
 * llama.cpp does for its Q8_0 products: results differ from the f32
 * reference by that rounding (about 1e-3 of the output's scale), and every
 * (row, x row) result is computed by the same instructions in the same
 * order whatever the batch, so a sequence's logits do not depend on what
 * it is batched with.
 *
 * vpdpbusd multiplies unsigned by signed bytes: packed quants are stored
 * + 128, and sum((w + 128) * x) - 128 * sum(x) is the exact integer dot
 * product; the integer accumulator starts at -128 * sum(x) of the block.
 */
#include "cpu_int.h"

#include <math.h>
#include <string.h>

#define PANEL 16
#define PBLOCK (PANEL * sizeof(kern_block_q8_0_t)) /* bytes of one panel block: 544 */
#define PT 3                                       /* panels per tile */
#define XT 4                                       /* x rows per tile */
#define CHUNK_BYTES (256 * 1024)                   /* panels kept hot in L2 */

#ifdef CPU_HAVE_X86

#define VNNI_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"

_Static_assert(sizeof(kern_block_q8_0_t) == 34, "Q8_0 block is 34 bytes");

/* ------------------------------------------------------------------------ */
/* Packing.                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct pack_ctx {
    kern_cpu_t *be;
    const kern_tensor_t *w;
    size_t nb;
    size_t per; /* panels per task */
    size_t n_panels;
} pack_ctx_t;

static void
pack_task(void *ctx, int task, int thread)
{
    const pack_ctx_t *c = ctx;
    size_t p0 = (size_t)task * c->per, p1 = p0 + c->per < c->n_panels ? p0 + c->per : c->n_panels;
    size_t panel_bytes = c->nb * PBLOCK;
    uint8_t *tmp = c->be->scratch[thread].p;
    for (size_t p = p0; p < p1; p++) {
        uint8_t *dst = (uint8_t *)c->w->data + p * panel_bytes;
        memcpy(tmp, dst, panel_bytes);
        for (size_t b = 0; b < c->nb; b++) {
            uint8_t *pb = dst + b * PBLOCK;
            for (int lane = 0; lane < PANEL; lane++) {
                const kern_block_q8_0_t *src =
                    (const kern_block_q8_0_t *)(tmp + lane * c->w->row_bytes) + b;
                memcpy(pb + 2 * lane, &src->d, 2);
                for (int k = 0; k < KERN_QK8_0; k++)
                    pb[32 + (k / 4) * 64 + lane * 4 + k % 4] = (uint8_t)(src->qs[k] ^ 0x80);
            }
        }
    }
}

int
kern__cpu_pack_q8x16(kern_cpu_t *be, kern_tensor_t *w)
{
    if (be->isa < CPU_ISA_AVX512VNNI || w->type != KERN_Q8_0 ||
        w->row_bytes != kern_row_bytes(KERN_Q8_0, w->n_cols) || w->n_rows < PANEL)
        return 0;
    pack_ctx_t c = {.be = be, .w = w, .nb = w->n_cols / KERN_QK8_0, .n_panels = w->n_rows / PANEL};
    int rc = kern__cpu_scratch_reserve(be, c.nb * PBLOCK);
    if (rc)
        return rc;
    c.per = (c.n_panels + (size_t)be->n_threads * 4 - 1) / ((size_t)be->n_threads * 4);
    kern__cpu_parallel(be, (int)((c.n_panels + c.per - 1) / c.per), pack_task, &c);
    w->layout = KERN_LAYOUT_Q8_0_X16;
    return 0;
}

void
kern__cpu_q8x16_row(const kern_tensor_t *w, uint32_t r, float *y)
{
    size_t nb = w->n_cols / KERN_QK8_0;
    if (r >= w->n_rows / PANEL * PANEL) {
        kern_row_to_f32(KERN_Q8_0, (const uint8_t *)w->data + (size_t)r * w->row_bytes, y,
                        w->n_cols);
        return;
    }
    const uint8_t *panel = (const uint8_t *)w->data + (size_t)(r / PANEL) * nb * PBLOCK;
    int lane = (int)(r % PANEL);
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *pb = panel + b * PBLOCK;
        uint16_t dh;
        memcpy(&dh, pb + 2 * lane, 2);
        float d = kvs_fp16_to_f32(dh);
        for (int k = 0; k < KERN_QK8_0; k++)
            y[b * KERN_QK8_0 + k] =
                d * (float)(int8_t)(pb[32 + (k / 4) * 64 + lane * 4 + k % 4] ^ 0x80);
    }
}

/* ------------------------------------------------------------------------ */
/* Products.                                                                */
/* ------------------------------------------------------------------------ */

typedef struct q8x_ctx {
    kern_cpu_t *be;
    const kern_tensor_t *w;
    const float *x;
    const float *bias;
    float *y;
    uint32_t n;
    size_t nb;
    int8_t *xq;   /* [n][cols] */
    float *xd;    /* [n][nb] block scales */
    int32_t *xc;  /* [n][nb] -128 * sum of the block's quants */
    size_t per;   /* panels (matmul) or x rows (quantize) per task */
    size_t chunk; /* panels per L2 chunk */
} q8x_ctx_t;

/* One x row to int8 per 32-value block.  Rounds to nearest even, like
 * lrintf under the default rounding mode. */
__attribute__((target(VNNI_TARGET))) static void
quantize_row(const float *x, size_t nb, int8_t *q, float *d, int32_t *corr)
{
    for (size_t b = 0; b < nb; b++) {
        __m512 v0 = _mm512_loadu_ps(x + b * 32), v1 = _mm512_loadu_ps(x + b * 32 + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        float s = amax / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
        __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
        __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i *)(q + b * 32), _mm512_cvtepi32_epi8(i0));
        _mm_storeu_si128((__m128i *)(q + b * 32 + 16), _mm512_cvtepi32_epi8(i1));
        d[b] = s;
        corr[b] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    }
}

static void
quantize_task(void *ctx, int task, int thread)
{
    (void)thread;
    const q8x_ctx_t *c = ctx;
    size_t t0 = (size_t)task * c->per, t1 = t0 + c->per < c->n ? t0 + c->per : c->n;
    size_t cols = c->w->n_cols;
    for (size_t t = t0; t < t1; t++)
        quantize_row(c->x + t * cols, c->nb, c->xq + t * cols, c->xd + t * c->nb,
                     c->xc + t * c->nb);
}

/* P panels (16 rows each) x T x rows, the whole depth.  3 x 4 keeps its
 * 24 accumulators in registers and measured fastest (4 x 3, 2 x 4 and
 * 1 x 8 were 10-30% slower at 16 x rows on Zen 4).  Every output is
 * (float)(integer block dot) * row scale * x scale, summed over blocks in
 * order by fused multiply-add: the same for every P and T.  The loops over
 * P, T and the 8 column quads are unrolled so the accumulator arrays
 * become registers (GCC otherwise keeps them on the stack). */
__attribute__((always_inline, target(VNNI_TARGET))) static inline void
tile(const q8x_ctx_t *c, const int P, const int T, size_t p0, size_t t0, const char *pf,
     size_t pf_step)
{
    const size_t nb = c->nb, cols = c->w->n_cols;
    const uint8_t *wp[PT];
    const int8_t *xq[XT];
    const float *xd[XT];
    const int32_t *xc[XT];
    __m512 acc[PT][XT];
#pragma GCC unroll 8
    for (int p = 0; p < P; p++)
        wp[p] = (const uint8_t *)c->w->data + (p0 + p) * nb * PBLOCK;
#pragma GCC unroll 8
    for (int t = 0; t < T; t++) {
        xq[t] = c->xq + (t0 + t) * cols;
        xd[t] = c->xd + (t0 + t) * nb;
        xc[t] = c->xc + (t0 + t) * nb;
#pragma GCC unroll 8
        for (int p = 0; p < P; p++)
            acc[p][t] = _mm512_setzero_ps();
    }
    for (size_t b = 0; b < nb; b++) {
        for (size_t off = 0; off < pf_step; off += 64)
            _mm_prefetch(pf + b * pf_step + off, _MM_HINT_T1);
        __m512i ia[PT][XT];
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            __m512i init = _mm512_set1_epi32(xc[t][b]);
#pragma GCC unroll 8
            for (int p = 0; p < P; p++)
                ia[p][t] = init;
        }
#pragma GCC unroll 8
        for (int kq = 0; kq < 8; kq++) {
            __m512i wv[PT];
#pragma GCC unroll 8
            for (int p = 0; p < P; p++)
                wv[p] = _mm512_loadu_si512(wp[p] + b * PBLOCK + 32 + kq * 64);
#pragma GCC unroll 8
            for (int t = 0; t < T; t++) {
                int32_t x4;
                memcpy(&x4, xq[t] + b * 32 + kq * 4, 4);
                __m512i xv = _mm512_set1_epi32(x4);
#pragma GCC unroll 8
                for (int p = 0; p < P; p++)
                    ia[p][t] = _mm512_dpbusd_epi32(ia[p][t], wv[p], xv);
            }
        }
#pragma GCC unroll 8
        for (int p = 0; p < P; p++) {
            __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wp[p] + b * PBLOCK)));
#pragma GCC unroll 8
            for (int t = 0; t < T; t++)
                acc[p][t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(ia[p][t]), dw),
                                            _mm512_set1_ps(xd[t][b]), acc[p][t]);
        }
    }
    const size_t n_rows = c->w->n_rows;
#pragma GCC unroll 8
    for (int p = 0; p < P; p++) {
        size_t r = (p0 + p) * PANEL;
#pragma GCC unroll 8
        for (int t = 0; t < T; t++) {
            __m512 v = acc[p][t];
            if (c->bias)
                v = _mm512_add_ps(v, _mm512_loadu_ps(c->bias + r));
            _mm512_storeu_ps(c->y + (t0 + t) * n_rows + r, v);
        }
    }
}

#define TILE(P, T)                                                                \
    __attribute__((target(VNNI_TARGET))) static void tile_##P##_##T(              \
        const q8x_ctx_t *c, size_t p0, size_t t0, const char *pf, size_t pf_step) \
    {                                                                             \
        tile(c, P, T, p0, t0, pf, pf_step);                                       \
    }
TILE(1, 1)
TILE(1, 2)
TILE(1, 3)
TILE(1, 4)
TILE(2, 1)
TILE(2, 2)
TILE(2, 3)
TILE(2, 4)
TILE(3, 1)
TILE(3, 2)
TILE(3, 3)
TILE(3, 4)

typedef void (*tile_fn)(const q8x_ctx_t *c, size_t p0, size_t t0, const char *pf, size_t pf_step);
static const tile_fn tiles[PT][XT] = {
    {tile_1_1, tile_1_2, tile_1_3, tile_1_4},
    {tile_2_1, tile_2_2, tile_2_3, tile_2_4},
    {tile_3_1, tile_3_2, tile_3_3, tile_3_4},
};

static void
matmul_task(void *ctx, int task, int thread)
{
    (void)thread;
    const q8x_ctx_t *c = ctx;
    size_t n_panels = c->w->n_rows / PANEL;
    size_t p0 = (size_t)task * c->per, p1 = p0 + c->per < n_panels ? p0 + c->per : n_panels;
    size_t panel_bytes = c->nb * PBLOCK, n_groups = (c->n + XT - 1) / XT;
    /* A chunk of panels stays in L2 while every group of x rows uses it,
     * and the tiles over it prefetch the next chunk into L2, a slice each,
     * so the memory stream overlaps the int8 work instead of stalling the
     * first group of x rows. */
    for (size_t ch = p0; ch < p1; ch += c->chunk) {
        size_t ch1 = ch + c->chunk < p1 ? ch + c->chunk : p1;
        size_t next = (p1 - ch1 < c->chunk ? p1 - ch1 : c->chunk) * panel_bytes;
        size_t calls = n_groups * ((ch1 - ch + PT - 1) / PT);
        size_t step = (next / calls / c->nb + 63) & ~(size_t)63;
        const char *pf = (const char *)c->w->data + ch1 * panel_bytes;
        for (size_t t0 = 0; t0 < c->n; t0 += XT) {
            size_t T = c->n - t0 < XT ? c->n - t0 : XT;
            for (size_t p = ch; p < ch1; p += PT) {
                tiles[(ch1 - p >= PT ? PT : ch1 - p) - 1][T - 1](c, p, t0, pf, step);
                pf += step * c->nb;
            }
        }
    }
}

/* Rows past the last full panel, still row-major: the same arithmetic,
 * one output at a time. */
static void
tail_rows(const q8x_ctx_t *c)
{
    const kern_tensor_t *w = c->w;
    size_t cols = w->n_cols;
    for (uint32_t r = w->n_rows / PANEL * PANEL; r < w->n_rows; r++) {
        const kern_block_q8_0_t *wb =
            (const kern_block_q8_0_t *)((const uint8_t *)w->data + (size_t)r * w->row_bytes);
        for (uint32_t t = 0; t < c->n; t++) {
            const int8_t *xq = c->xq + t * cols;
            float acc = 0.0f;
            for (size_t b = 0; b < c->nb; b++) {
                int32_t s = 0;
                for (int k = 0; k < KERN_QK8_0; k++)
                    s += (int32_t)wb[b].qs[k] * xq[b * 32 + k];
                acc = fmaf((float)s * kvs_fp16_to_f32(wb[b].d), c->xd[t * c->nb + b], acc);
            }
            c->y[(size_t)t * w->n_rows + r] = acc + (c->bias ? c->bias[r] : 0.0f);
        }
    }
}

int
kern__cpu_matmul_q8x16(kern_cpu_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
                       const float *bias, float *y)
{
    size_t cols = w->n_cols, nb = cols / KERN_QK8_0;
    size_t qbytes = ((size_t)n * cols + 63) & ~(size_t)63;
    void *work;
    int rc = kern__cpu_work_reserve(be, qbytes + (size_t)n * nb * 8, &work);
    if (rc)
        return rc;
    q8x_ctx_t c = {.be = be,
                   .w = w,
                   .x = x,
                   .bias = bias,
                   .y = y,
                   .n = n,
                   .nb = nb,
                   .xq = work,
                   .xd = (float *)((char *)work + qbytes)};
    c.xc = (int32_t *)(c.xd + (size_t)n * nb);

    /* Quantize x: a few rows per task so big prefills use every core. */
    c.per = (size_t)n / ((size_t)be->n_threads * 2);
    if (c.per < 8)
        c.per = 8;
    kern__cpu_parallel(be, (int)((n + c.per - 1) / c.per), quantize_task, &c);

    size_t n_panels = w->n_rows / PANEL, panel_bytes = nb * PBLOCK;
    c.chunk = CHUNK_BYTES / panel_bytes / PT * PT;
    c.chunk = c.chunk < PT ? PT : c.chunk;
    if (n_panels) {
        int n_tasks = kern__cpu_unit_tasks(be, n_panels, panel_bytes, PT, &c.per);
        kern__cpu_parallel(be, n_tasks, matmul_task, &c);
    }
    tail_rows(&c);
    return 0;
}

#else /* !CPU_HAVE_X86: never packed, so never called */

int
kern__cpu_pack_q8x16(kern_cpu_t *be, kern_tensor_t *w)
{
    (void)be;
    (void)w;
    return 0;
}

int
kern__cpu_matmul_q8x16(kern_cpu_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
                       const float *bias, float *y)
{
    (void)be, (void)w, (void)x, (void)n, (void)bias, (void)y;
    return KVS_EINVAL;
}

void
kern__cpu_q8x16_row(const kern_tensor_t *w, uint32_t r, float *y)
{
    (void)w, (void)r, (void)y;
}

#endif
