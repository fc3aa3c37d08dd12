/*
 * kernels/kern_types.c — the ggml type table (block sizes and bytes for
 * every type id a GGUF file may carry), the reference quantizers (Q8_0,
 * Q4_0, Q4_K, Q5_K, Q6_K, after ggml's quantize_row_*_ref) and the scalar
 * row conversion to f32 (ggml's dequantize_row_*).  Used by the GGUF
 * reader to size tensors, by the model writer (model/random.c), and by
 * every backend's scalar paths; the cpu backend's SIMD conversions must
 * match kern_row_to_f32 bit for bit (tests/kernels).
 */
#include "kern_int.h"

#include <math.h>
#include <string.h>

_Static_assert(sizeof(kern_block_q8_0_t) == 34, "ggml block_q8_0");
_Static_assert(sizeof(kern_block_q4_0_t) == 18, "ggml block_q4_0");
_Static_assert(sizeof(kern_block_q4_k_t) == 144, "ggml block_q4_K");
_Static_assert(sizeof(kern_block_q5_k_t) == 176, "ggml block_q5_K");
_Static_assert(sizeof(kern_block_q6_k_t) == 210, "ggml block_q6_K");

static const kern_type_traits_t type_traits[KERN_DTYPE_COUNT] = {
    [KERN_F32] = {"f32", 1, 4},       [KERN_F16] = {"f16", 1, 2},
    [KERN_Q4_0] = {"q4_0", 32, 18},   [KERN_Q4_1] = {"q4_1", 32, 20},
    [KERN_Q5_0] = {"q5_0", 32, 22},   [KERN_Q5_1] = {"q5_1", 32, 24},
    [KERN_Q8_0] = {"q8_0", 32, 34},   [KERN_Q8_1] = {"q8_1", 32, 36},
    [KERN_Q2_K] = {"q2_k", 256, 84},  [KERN_Q3_K] = {"q3_k", 256, 110},
    [KERN_Q4_K] = {"q4_k", 256, 144}, [KERN_Q5_K] = {"q5_k", 256, 176},
    [KERN_Q6_K] = {"q6_k", 256, 210}, [KERN_Q8_K] = {"q8_k", 256, 292},
    [16] = {"iq2_xxs", 256, 66},      [17] = {"iq2_xs", 256, 74},
    [18] = {"iq3_xxs", 256, 98},      [19] = {"iq1_s", 256, 50},
    [20] = {"iq4_nl", 32, 18},        [21] = {"iq3_s", 256, 110},
    [22] = {"iq2_s", 256, 82},        [23] = {"iq4_xs", 256, 136},
    [KERN_I8] = {"i8", 1, 1},         [KERN_I16] = {"i16", 1, 2},
    [KERN_I32] = {"i32", 1, 4},       [KERN_I64] = {"i64", 1, 8},
    [KERN_F64] = {"f64", 1, 8},       [29] = {"iq1_m", 256, 56},
    [KERN_BF16] = {"bf16", 1, 2},     [34] = {"tq1_0", 256, 54},
    [35] = {"tq2_0", 256, 66},
};

const kern_type_traits_t *
kern_type_traits(uint32_t type)
{
    if (type >= KERN_DTYPE_COUNT || type_traits[type].name == NULL)
        return NULL;
    return &type_traits[type];
}

size_t
kern_row_bytes(uint32_t type, uint64_t n)
{
    const kern_type_traits_t *t = kern_type_traits(type);
    if (t == NULL || n % t->block != 0)
        return 0;
    uint64_t blocks = n / t->block;
    size_t bytes;
    if (blocks > SIZE_MAX || kvs_mul_size((size_t)blocks, t->block_bytes, &bytes))
        return 0;
    return bytes;
}

int
kern_dtype_parse(const char *name, kern_dtype_t *out)
{
    for (uint32_t i = 0; i < KERN_DTYPE_COUNT; i++) {
        if (type_traits[i].name && strcmp(type_traits[i].name, name) == 0) {
            *out = (kern_dtype_t)i;
            return 0;
        }
    }
    return KVS_EINVAL;
}

static float
block_amax(const float *xb)
{
    float amax = 0.0f;
    for (int j = 0; j < KERN_QK8_0; j++) {
        float a = fabsf(xb[j]);
        if (a > amax)
            amax = a;
    }
    return amax;
}

void
kern_quantize_q8_0(const float *x, kern_block_q8_0_t *y, size_t n)
{
    for (size_t b = 0; b < n / KERN_QK8_0; b++) {
        const float *xb = x + b * KERN_QK8_0;
        float d = block_amax(xb) / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = kvs_f32_to_fp16(d);
        for (int j = 0; j < KERN_QK8_0; j++)
            y[b].qs[j] = (int8_t)roundf(xb[j] * id);
    }
}

void
kern_quantize_x_q8(const float *x, size_t n, int8_t *q, float *d)
{
    for (size_t b = 0; b < n / KERN_QK8_0; b++) {
        const float *xb = x + b * KERN_QK8_0;
        float s = block_amax(xb) / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
        d[b] = s;
        for (int j = 0; j < KERN_QK8_0; j++)
            q[b * KERN_QK8_0 + j] = (int8_t)lrintf(xb[j] * inv);
    }
}

void
kern_round_x_q8(const float *x, size_t n, float *out)
{
    int8_t q[KERN_QK8_0];
    float d;
    for (size_t b = 0; b < n / KERN_QK8_0; b++) {
        kern_quantize_x_q8(x + b * KERN_QK8_0, KERN_QK8_0, q, &d);
        for (int j = 0; j < KERN_QK8_0; j++)
            out[b * KERN_QK8_0 + j] = (float)q[j] * d;
    }
}

/* ------------------------------------------------------------------------ */
/* Dequantization, one block at a time (ggml's dequantize_row_*).           */
/* ------------------------------------------------------------------------ */

void
kern__scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

static void
dequant_q4_0(const kern_block_q4_0_t *b, float *y)
{
    float d = kvs_fp16_to_f32(b->d);
    for (int j = 0; j < KERN_QK4_0 / 2; j++) {
        y[j] = (float)((b->qs[j] & 0x0F) - 8) * d;
        y[j + KERN_QK4_0 / 2] = (float)((b->qs[j] >> 4) - 8) * d;
    }
}

/* Q4_K and Q5_K (qh NULL for Q4_K): the sub-block scale multiplies first
 * and the min is subtracted after, each rounded to f32, as ggml writes it
 * (the SIMD versions keep the two roundings rather than fusing them). */
static void
dequant_kx(uint16_t dh, uint16_t dminh, const uint8_t *scales, const uint8_t *q, const uint8_t *qh,
           float *y)
{
    float d = kvs_fp16_to_f32(dh), min = kvs_fp16_to_f32(dminh);
    for (int c = 0; c < 4; c++, q += 32, y += 64) {
        uint8_t sc, m;
        kern__scale_min_k4(2 * c, scales, &sc, &m);
        float d1 = d * sc, m1 = min * m;
        kern__scale_min_k4(2 * c + 1, scales, &sc, &m);
        float d2 = d * sc, m2 = min * m;
        uint8_t u1 = (uint8_t)(1u << (2 * c)), u2 = (uint8_t)(2u << (2 * c));
        for (int l = 0; l < 32; l++) {
            y[l] = d1 * (float)((q[l] & 0xF) + (qh && qh[l] & u1 ? 16 : 0)) - m1;
            y[l + 32] = d2 * (float)((q[l] >> 4) + (qh && qh[l] & u2 ? 16 : 0)) - m2;
        }
    }
}

static void
dequant_q4_k(const kern_block_q4_k_t *b, float *y)
{
    dequant_kx(b->d, b->dmin, b->scales, b->qs, NULL, y);
}

static void
dequant_q5_k(const kern_block_q5_k_t *b, float *y)
{
    dequant_kx(b->d, b->dmin, b->scales, b->qs, b->qh, y);
}

static void
dequant_q6_k(const kern_block_q6_k_t *b, float *y)
{
    float d = kvs_fp16_to_f32(b->d);
    const uint8_t *ql = b->ql, *qh = b->qh;
    const int8_t *sc = b->scales;
    for (int n = 0; n < 2; n++, ql += 64, qh += 32, sc += 8, y += 128) {
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is + 0] * (float)q1;
            y[l + 32] = d * sc[is + 2] * (float)q2;
            y[l + 64] = d * sc[is + 4] * (float)q3;
            y[l + 96] = d * sc[is + 6] * (float)q4;
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Reference quantizers (ggml's quantize_row_*_ref).                        */
/* ------------------------------------------------------------------------ */

#define GROUP_MAX_EPS 1e-15f

/* Round half to even, as ggml's nearest_int does for |x| < 2^22. */
static inline int
nearest_int(float x)
{
    return (int)lrintf(x);
}

static void
quantize_q4_0(const float *x, kern_block_q4_0_t *y, size_t n)
{
    for (size_t i = 0; i < n / KERN_QK4_0; i++, x += KERN_QK4_0) {
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < KERN_QK4_0; j++) {
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        float d = max / -8.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        y[i].d = kvs_f32_to_fp16(d);
        for (int j = 0; j < KERN_QK4_0 / 2; j++) {
            int8_t x0 = (int8_t)(x[j] * id + 8.5f), x1 = (int8_t)(x[j + 16] * id + 8.5f);
            uint8_t q0 = (uint8_t)(x0 < 15 ? x0 : 15), q1 = (uint8_t)(x1 < 15 ? x1 : 15);
            y[i].qs[j] = (uint8_t)(q0 | (q1 << 4));
        }
    }
}

/* ggml's make_qkx2_quants: levels 0..nmax with a scale and a min (<= 0)
 * for n weighted values, searched over nstep trial scales.  Returns the
 * scale, *the_min = -min. */
static float
make_qkx2_quants(int n, int nmax, const float *x, const float *weights, uint8_t *L, float *the_min,
                 uint8_t *Laux, float rmin, float rdelta, int nstep)
{
    float min = x[0], max = x[0], sum_w = weights[0], sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min)
            min = x[i];
        if (x[i] > max)
            max = x[i];
        sum_w += weights[i];
        sum_x += weights[i] * x[i];
    }
    if (min > 0)
        min = 0;
    if (max == min) {
        memset(L, 0, (size_t)n);
        *the_min = -min;
        return 0.0f;
    }
    float iscale = nmax / (max - min), scale = 1 / iscale, best_error = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)(l < 0 ? 0 : l > nmax ? nmax : l);
        float diff = scale * L[i] + min - x[i];
        best_error += weights[i] * diff * diff;
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * (x[i] - min));
            l = l < 0 ? 0 : l > nmax ? nmax : l;
            Laux[i] = (uint8_t)l;
            float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float cur_error = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                cur_error += weights[i] * diff * diff;
            }
            if (cur_error < best_error) {
                memcpy(L, Laux, (size_t)n);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

/* The common part of Q4_K and Q5_K: per 32-value sub-block a scale and a
 * min, both quantized to 6 bits against the super-block's d and dmin,
 * then the levels 0..nmax recomputed with the quantized ones. */
static void
quantize_kx(const float *x, int nmax, float rmin, int nstep, uint16_t *dp, uint16_t *dminp,
            uint8_t *scales_out, uint8_t L[KERN_QK_K])
{
    uint8_t Laux[32];
    float weights[32], mins[8], scales[8], max_scale = 0, max_min = 0;
    for (int j = 0; j < 8; j++) {
        float sum_x2 = 0;
        for (int l = 0; l < 32; l++)
            sum_x2 += x[32 * j + l] * x[32 * j + l];
        float av_x = sqrtf(sum_x2 / 32);
        for (int l = 0; l < 32; l++)
            weights[l] = av_x + fabsf(x[32 * j + l]);
        scales[j] = make_qkx2_quants(32, nmax, x + 32 * j, weights, L + 32 * j, &mins[j], Laux,
                                     rmin, 0.1f, nstep);
        if (scales[j] > max_scale)
            max_scale = scales[j];
        if (mins[j] > max_min)
            max_min = mins[j];
    }
    float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    memset(scales_out, 0, 12);
    for (int j = 0; j < 8; j++) {
        int ls = nearest_int(inv_scale * scales[j]), lm = nearest_int(inv_min * mins[j]);
        ls = ls > 63 ? 63 : ls;
        lm = lm > 63 ? 63 : lm;
        if (j < 4) {
            scales_out[j] = (uint8_t)ls;
            scales_out[j + 4] = (uint8_t)lm;
        } else {
            scales_out[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
            scales_out[j - 4] |= (uint8_t)((ls >> 4) << 6);
            scales_out[j] |= (uint8_t)((lm >> 4) << 6);
        }
    }
    *dp = kvs_f32_to_fp16(max_scale / 63.f);
    *dminp = kvs_f32_to_fp16(max_min / 63.f);
    for (int j = 0; j < 8; j++) {
        uint8_t sc, m;
        kern__scale_min_k4(j, scales_out, &sc, &m);
        float d = kvs_fp16_to_f32(*dp) * sc;
        if (!d)
            continue;
        float dm = kvs_fp16_to_f32(*dminp) * m;
        for (int ii = 0; ii < 32; ii++) {
            int l = nearest_int((x[32 * j + ii] + dm) / d);
            L[32 * j + ii] = (uint8_t)(l < 0 ? 0 : l > nmax ? nmax : l);
        }
    }
}

static void
quantize_q4_k(const float *x, kern_block_q4_k_t *y, size_t n)
{
    uint8_t L[KERN_QK_K];
    for (size_t i = 0; i < n / KERN_QK_K; i++, x += KERN_QK_K) {
        quantize_kx(x, 15, -1.0f, 20, &y[i].d, &y[i].dmin, y[i].scales, L);
        uint8_t *q = y[i].qs;
        for (int j = 0; j < KERN_QK_K; j += 64, q += 32)
            for (int l = 0; l < 32; l++)
                q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
    }
}

static void
quantize_q5_k(const float *x, kern_block_q5_k_t *y, size_t n)
{
    uint8_t L[KERN_QK_K];
    for (size_t i = 0; i < n / KERN_QK_K; i++, x += KERN_QK_K) {
        quantize_kx(x, 31, -0.5f, 15, &y[i].d, &y[i].dmin, y[i].scales, L);
        uint8_t *ql = y[i].qs, *qh = y[i].qh;
        memset(qh, 0, 32);
        uint8_t m1 = 1, m2 = 2;
        for (int j = 0; j < KERN_QK_K; j += 64, ql += 32, m1 <<= 2, m2 <<= 2) {
            for (int l = 0; l < 32; l++) {
                int l1 = L[j + l], l2 = L[j + l + 32];
                if (l1 > 15) {
                    l1 -= 16;
                    qh[l] |= m1;
                }
                if (l2 > 15) {
                    l2 -= 16;
                    qh[l] |= m2;
                }
                ql[l] = (uint8_t)(l1 | (l2 << 4));
            }
        }
    }
}

/* ggml's make_qx_quants with rmse_type 1 (weights x^2): symmetric levels
 * -nmax..nmax-1 stored as 0..2*nmax-1, 19 trial scales around nmax/max. */
static float
make_qx_quants(int n, int nmax, const float *x, int8_t *L)
{
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        if (fabsf(x[i]) > amax) {
            amax = fabsf(x[i]);
            max = x[i];
        }
    }
    if (amax < GROUP_MAX_EPS) {
        memset(L, 0, (size_t)n);
        return 0.f;
    }
    float iscale = -nmax / max, sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = nearest_int(iscale * x[i]);
        l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
        L[i] = (int8_t)(l + nmax);
        float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f, best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0)
            continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = nearest_int(iscale * x[i]);
            l = l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l;
            float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) {
                int l = nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + (l < -nmax ? -nmax : l > nmax - 1 ? nmax - 1 : l));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

static void
quantize_q6_k(const float *x, kern_block_q6_k_t *y, size_t n)
{
    int8_t L[KERN_QK_K];
    float scales[KERN_QK_K / 16];
    for (size_t i = 0; i < n / KERN_QK_K; i++, x += KERN_QK_K) {
        float max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < KERN_QK_K / 16; ib++) {
            scales[ib] = make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
            if (fabsf(scales[ib]) > max_abs_scale) {
                max_abs_scale = fabsf(scales[ib]);
                max_scale = scales[ib];
            }
        }
        memset(&y[i], 0, sizeof y[i]);
        if (max_abs_scale < GROUP_MAX_EPS)
            continue;
        float iscale = -128.f / max_scale;
        y[i].d = kvs_f32_to_fp16(1 / iscale);
        for (int ib = 0; ib < KERN_QK_K / 16; ib++) {
            int s = nearest_int(iscale * scales[ib]);
            y[i].scales[ib] = (int8_t)(s < 127 ? s : 127);
        }
        for (int j = 0; j < KERN_QK_K / 16; j++) {
            float d = kvs_fp16_to_f32(y[i].d) * y[i].scales[j];
            if (!d)
                continue;
            for (int ii = 0; ii < 16; ii++) {
                int l = nearest_int(x[16 * j + ii] / d);
                L[16 * j + ii] = (int8_t)((l < -32 ? -32 : l > 31 ? 31 : l) + 32);
            }
        }
        uint8_t *ql = y[i].ql, *qh = y[i].qh;
        for (int j = 0; j < KERN_QK_K; j += 128, ql += 64, qh += 32) {
            for (int l = 0; l < 32; l++) {
                uint8_t q1 = L[j + l] & 0xF, q2 = L[j + l + 32] & 0xF;
                uint8_t q3 = L[j + l + 64] & 0xF, q4 = L[j + l + 96] & 0xF;
                ql[l] = (uint8_t)(q1 | (q3 << 4));
                ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
                qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) |
                                  ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
            }
        }
    }
}

int
kern_quantize_row(uint32_t type, const float *x, void *y, size_t n)
{
    const kern_type_traits_t *t = kern_type_traits(type);
    if (t == NULL)
        return KVS_ENOTSUP;
    if (n % t->block != 0)
        return KVS_EINVAL;
    switch (type) {
    case KERN_Q8_0:
        kern_quantize_q8_0(x, y, n);
        return 0;
    case KERN_Q4_0:
        quantize_q4_0(x, y, n);
        return 0;
    case KERN_Q4_K:
        quantize_q4_k(x, y, n);
        return 0;
    case KERN_Q5_K:
        quantize_q5_k(x, y, n);
        return 0;
    case KERN_Q6_K:
        quantize_q6_k(x, y, n);
        return 0;
    default:
        return KVS_ENOTSUP;
    }
}

int
kern_row_to_f32(uint32_t type, const void *row, float *y, size_t n)
{
    switch (type) {
    case KERN_F32:
        memcpy(y, row, n * sizeof(float));
        return 0;
    case KERN_F16: {
        const uint16_t *h = row;
        for (size_t i = 0; i < n; i++)
            y[i] = kvs_fp16_to_f32(h[i]);
        return 0;
    }
    case KERN_BF16: {
        const uint16_t *h = row;
        for (size_t i = 0; i < n; i++)
            y[i] = kvs_bf16_to_f32(h[i]);
        return 0;
    }
    case KERN_Q8_0: {
        const kern_block_q8_0_t *b = row;
        for (size_t i = 0; i < n / KERN_QK8_0; i++) {
            float d = kvs_fp16_to_f32(b[i].d);
            for (int j = 0; j < KERN_QK8_0; j++)
                y[i * KERN_QK8_0 + j] = d * (float)b[i].qs[j];
        }
        return 0;
    }
    case KERN_Q4_0:
        for (size_t i = 0; i < n / KERN_QK4_0; i++)
            dequant_q4_0((const kern_block_q4_0_t *)row + i, y + i * KERN_QK4_0);
        return 0;
    case KERN_Q4_K:
        for (size_t i = 0; i < n / KERN_QK_K; i++)
            dequant_q4_k((const kern_block_q4_k_t *)row + i, y + i * KERN_QK_K);
        return 0;
    case KERN_Q5_K:
        for (size_t i = 0; i < n / KERN_QK_K; i++)
            dequant_q5_k((const kern_block_q5_k_t *)row + i, y + i * KERN_QK_K);
        return 0;
    case KERN_Q6_K:
        for (size_t i = 0; i < n / KERN_QK_K; i++)
            dequant_q6_k((const kern_block_q6_k_t *)row + i, y + i * KERN_QK_K);
        return 0;
    default:
        return KVS_ENOTSUP;
    }
}

bool
kern__types_supported(kern_op_t op, kern_dtype_t type)
{
    switch (op) {
    case KERN_OP_GET_ROWS:
    case KERN_OP_MATMUL:
        return type == KERN_F32 || type == KERN_F16 || type == KERN_BF16 || type == KERN_Q8_0 ||
               type == KERN_Q4_0 || type == KERN_Q4_K || type == KERN_Q5_K || type == KERN_Q6_K;
    case KERN_OP_KV_APPEND:
    case KERN_OP_KV_COPY:
    case KERN_OP_ATTN:
        return type == KERN_F32 || type == KERN_F16;
    default:
        return true;
    }
}
