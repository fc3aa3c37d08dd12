/*
 * kernels/cuda/cuda_dequant.cuh — private to kernels/cuda/: decoding of
 * the 4-bit and K-quant weight blocks (Q4_0, Q4_K, Q5_K, Q6_K; kern.h) on
 * the device, eight values at a time.  Shared by get_rows (kern_cuda.cu)
 * and the GEMV and the prefill dequantization (cuda_matmul.cu).
 *
 * Each value comes out bit for bit what kern_row_to_f32 (kern_types.c)
 * gives: the same products in the same order, each rounded to f32.  nvcc
 * would fuse Q4_K's and Q5_K's d * sc * q - dmin * m into an FMA, which
 * rounds once instead of twice, so those two steps use explicitly rounded
 * intrinsics.  The functions are __host__ __device__ so that a host-only
 * program can compare them with kern_row_to_f32 on a machine without a GPU.
 *
 * Eight consecutive values from a multiple of 8 always share one
 * sub-block (and so one scale and min), and their quant bytes start at an
 * even offset: rows are only 2-byte aligned (Q4_0's blocks are 18 bytes,
 * Q6_K's 210), so the bytes are read as four 16-bit loads.
 */
#ifndef KERN_CUDA_DEQUANT_CUH
#define KERN_CUDA_DEQUANT_CUH

#include "cuda_common.cuh"

/* The host compiler (the functions are __host__ too) warns at an unknown
 * pragma, and warnings are errors. */
#ifdef __CUDA_ARCH__
#define KERN_DQ_UNROLL _Pragma("unroll")
#else
#define KERN_DQ_UNROLL
#endif

/* Whether T is one of the types decoded here. */
static __host__ __device__ constexpr bool
kern__cuda_is_kq(int t)
{
    return t == KERN_Q4_0 || t == KERN_Q4_K || t == KERN_Q5_K || t == KERN_Q6_K;
}

static __host__ __device__ __forceinline__ float
kern__dq_f16(const char *p)
{
    return __half2float(__ushort_as_half(*(const uint16_t *)p));
}

/* a * b and a - b rounded on their own, never contracted into an FMA. */
static __host__ __device__ __forceinline__ float
kern__dq_mul(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

static __host__ __device__ __forceinline__ float
kern__dq_sub(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}

/* Bytes p[0..7], p 2-byte aligned. */
static __host__ __device__ __forceinline__ void
kern__dq_bytes8(const char *p, uint8_t *b)
{
    const uint16_t *h = (const uint16_t *)p;
    KERN_DQ_UNROLL
    for (int k = 0; k < 4; k++) {
        uint16_t u = h[k]; /* little-endian: the lower address is the low byte */
        b[2 * k] = (uint8_t)(u & 0xff);
        b[2 * k + 1] = (uint8_t)(u >> 8);
    }
}

/* kern__scale_min_k4 (ggml's get_scale_min_k4). */
static __host__ __device__ __forceinline__ void
kern__dq_scale_min_k4(int j, const uint8_t *q, int *sc, int *m)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* Values c .. c+7 (c % 8 == 0) of a row of type T as f32. */
template <int T>
static __host__ __device__ __forceinline__ void
kern__cuda_dq8(const char *row, uint32_t c, float *o)
{
    uint8_t q[8];
    if (T == KERN_Q4_0) {
        const char *blk = row + (size_t)(c / KERN_QK4_0) * sizeof(kern_block_q4_0_t);
        uint32_t j = c % KERN_QK4_0; /* 0, 8: low nibbles; 16, 24: high */
        float d = kern__dq_f16(blk);
        kern__dq_bytes8(blk + 2 + j % 16, q);
        int shift = j < 16 ? 0 : 4;
        KERN_DQ_UNROLL
        for (int k = 0; k < 8; k++)
            o[k] = (float)(((q[k] >> shift) & 0xF) - 8) * d;
    } else if (T == KERN_Q4_K || T == KERN_Q5_K) {
        /* Both start d, dmin, scales[12]; Q5_K then has qh[32] before qs. */
        size_t bb = T == KERN_Q4_K ? sizeof(kern_block_q4_k_t) : sizeof(kern_block_q5_k_t);
        const char *blk = row + (size_t)(c / KERN_QK_K) * bb;
        uint32_t i = c % KERN_QK_K, chunk = i / 64, l = i % 32;
        bool hi = i % 64 >= 32;
        int sc, m; /* two or three of the 12 scale bytes */
        kern__dq_scale_min_k4((int)(2 * chunk + (hi ? 1 : 0)), (const uint8_t *)blk + 4, &sc, &m);
        float d1 = kern__dq_mul(kern__dq_f16(blk), (float)sc);
        float m1 = kern__dq_mul(kern__dq_f16(blk + 2), (float)m);
        size_t qs_off = T == KERN_Q4_K ? 16 : 48;
        kern__dq_bytes8(blk + qs_off + chunk * 32 + l, q);
        int shift = hi ? 4 : 0;
        uint8_t h[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (T == KERN_Q5_K)
            kern__dq_bytes8(blk + 16 + l, h);
        uint8_t bit = (uint8_t)(1u << (2 * chunk + (hi ? 1 : 0)));
        KERN_DQ_UNROLL
        for (int k = 0; k < 8; k++) {
            int v = ((q[k] >> shift) & 0xF) + (h[k] & bit ? 16 : 0);
            o[k] = kern__dq_sub(kern__dq_mul(d1, (float)v), m1);
        }
    } else if (T == KERN_Q6_K) {
        const char *blk = row + (size_t)(c / KERN_QK_K) * sizeof(kern_block_q6_k_t);
        /* Per half of 128: ql[64], qh[32], scales[8]; quarter t of the
         * half takes nibble t / 2 of ql[l + 32 * (t % 2)] and bits 2t of
         * qh[l], with scale is + 2t (is = l / 16). */
        uint32_t i = c % KERN_QK_K, half = i / 128, t = i % 128 / 32, l = i % 32;
        float d = kern__dq_f16(blk + 208);
        int sc = (int8_t)blk[192 + half * 8 + l / 16 + 2 * t];
        float ds = d * (float)sc;
        uint8_t h[8];
        kern__dq_bytes8(blk + half * 64 + 32 * (t % 2) + l, q);
        kern__dq_bytes8(blk + 128 + half * 32 + l, h);
        int shift = 4 * (int)(t / 2), hshift = 2 * (int)t;
        KERN_DQ_UNROLL
        for (int k = 0; k < 8; k++) {
            int v = (((q[k] >> shift) & 0xF) | (((h[k] >> hshift) & 3) << 4)) - 32;
            o[k] = ds * (float)v;
        }
    }
}

#endif /* KERN_CUDA_DEQUANT_CUH */
