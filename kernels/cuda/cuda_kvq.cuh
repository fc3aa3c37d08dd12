/*
 * kernels/cuda/cuda_kvq.cuh — private to kernels/cuda/: reading quantized
 * KV blocks (kern.h's codecs: BF16, Q8_0, FP8, Q4) on the device, one value
 * at a time, for every kernel that reads K or V: attention (cuda_attn.cu),
 * the Quest bounds, the attention mass and the row gather
 * (cuda_select.cu).  Sealing (the encoders, with Q4's parameter search)
 * runs on the host through kern_kvq.c's own code (cuda_kvseal.cu), so tiles
 * are byte for byte the host backends'.
 *
 * kern__kvq_elem gives bit for bit what kern_kvq_decode (kern_kvq.c) gives:
 * every product there is exact in f32 (Q8_0's d * q, FP8's table * s, Q4's
 * D * sc * q and DM * mq: at most 21 significant bits), so the one rounding
 * of a sum is the same whether or not nvcc contracts it into an FMA.  Tiles
 * need no alignment (a Q4 tile can be an odd number of bytes), so fields
 * are read a byte at a time, little-endian as the host wrote them.  The
 * functions are __host__ __device__ so a host-only program can compare
 * them with kern_kvq_decode on a machine without a GPU
 * (tests/kernels/test_cuda_kvq.cu).
 */
#ifndef KERN_CUDA_KVQ_CUH
#define KERN_CUDA_KVQ_CUH

#include "cuda_common.cuh"

#include <string.h>

#define KERN_KVQ_Q4_HDR 6     /* fp16 D, M0, DM */
#define KERN_KVQ_Q4_VGROUP 32 /* channels per V group */
#define KERN_KVQ_Q4_KGROUP 32 /* at most this many tokens per K group */

static __host__ __device__ __forceinline__ uint32_t
kern__kvq_ld16(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8;
}

static __host__ __device__ __forceinline__ float
kern__kvq_bits(uint32_t b)
{
#ifdef __CUDA_ARCH__
    return __uint_as_float(b);
#else
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
#endif
}

static __host__ __device__ __forceinline__ float
kern__kvq_f16(const uint8_t *p)
{
    return __half2float(__ushort_as_half((unsigned short)kern__kvq_ld16(p)));
}

/* An e4m3 (OCP FN) code as f32: subnormals m * 2^-9, normals
 * (8 + m) * 2^(e - 10), 0x7f NaN; exact, as kern_kvq.c's table. */
static __host__ __device__ __forceinline__ float
kern__kvq_e4m3(uint32_t code)
{
    uint32_t c = code & 0x7f, e = c >> 3, m = c & 7;
    float a;
    if (c == 0x7f)
        a = kern__kvq_bits(0x7fc00000u);
    else if (e == 0)
        a = (float)m * (1.0f / 512.0f);
    else
        a = kern__kvq_bits((e + 120) << 23 | m << 20);
    return code & 0x80 ? -a : a;
}

/* Value (token t, channel c) of a K (v false) or V tile of bt x d. */
static __host__ __device__ __forceinline__ float
kern__kvq_elem(int q, bool v, const uint8_t *tile, uint32_t bt, uint32_t d, uint32_t t, uint32_t c)
{
    switch (q) {
    case KERN_KVQ_BF16:
        return kern__kvq_bits(kern__kvq_ld16(tile + ((size_t)t * d + c) * 2) << 16);
    case KERN_KVQ_Q8_0: {
        const uint8_t *blk =
            tile + ((size_t)t * (d / KERN_QK8_0) + c / KERN_QK8_0) * sizeof(kern_block_q8_0_t);
        return kern__kvq_f16(blk) * (float)(int8_t)blk[2 + c % KERN_QK8_0];
    }
    case KERN_KVQ_FP8:
        return kern__kvq_e4m3(tile[(size_t)bt * 2 + (size_t)t * d + c]) *
               kern__kvq_f16(tile + (size_t)t * 2);
    case KERN_KVQ_Q4: {
        const uint32_t gk = bt < KERN_KVQ_Q4_KGROUP ? bt : KERN_KVQ_Q4_KGROUP;
        const size_t n = (size_t)bt * d, groups = n / (v ? KERN_KVQ_Q4_VGROUP : gk);
        const size_t g = v ? (size_t)t * (d / KERN_KVQ_Q4_VGROUP) + c / KERN_KVQ_Q4_VGROUP
                           : (size_t)(t / gk) * d + c;
        const uint8_t *params = tile + KERN_KVQ_Q4_HDR, *p = params + 3 * (g >> 1);
        const uint32_t w = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
        const uint32_t f = g & 1 ? w >> 12 : w & 0xfff;
        const float step = kern__kvq_f16(tile) * (float)(f & 63);
        const float gmin = kern__kvq_f16(tile + 2) + kern__kvq_f16(tile + 4) * (float)(f >> 6);
        const uint8_t b = params[3 * (groups / 2) + ((size_t)t * d + c) / 2];
        return gmin + step * (float)(c & 1 ? b >> 4 : b & 15);
    }
    default:
        return 0.0f;
    }
}

/* Block blk's K (v false) or V tile of KV head g; blk >= w.n_hot. */
static __host__ __device__ __forceinline__ const uint8_t *
kern__cuda_kvq_tile(const kern_cuda_kvq_t &w, bool v, uint32_t blk, uint32_t n_kv, uint32_t g)
{
    return (v ? w.qv : w.qk) + ((size_t)(blk - w.n_hot) * n_kv + g) * (v ? w.qv_tile : w.qk_tile);
}

/* Value (t, c) of K or V of KV head g in block blk, either kind of block;
 * hot points at the layer's full-precision K or V. */
template <typename T>
static __device__ __forceinline__ float
kern__cuda_kv_elem(const T *hot, const kern_cuda_kvq_t &w, bool v, uint32_t blk, uint32_t n_kv,
                   uint32_t g, uint32_t bt, uint32_t d, uint32_t t, uint32_t c)
{
    if (blk < w.n_hot)
        return kern__cuda_kv_load(hot + (((size_t)blk * n_kv + g) * bt + t) * d + c);
    return kern__kvq_elem(w.quant, v, kern__cuda_kvq_tile(w, v, blk, n_kv, g), bt, d, t, c);
}

#endif /* KERN_CUDA_KVQ_CUH */
