/*
 * kernels/cuda/cuda_matmul.cu — kern__cuda_matmul for the cuda backend:
 * y[n][rows] = x[n][cols] * W^T (+ bias), W in F32, F16, BF16, Q8_0, Q4_0,
 * Q4_K, Q5_K or Q6_K; and its fused forms, kern__cuda_matmul_set (several
 * W of one x, a GEMV launch for all of a type) and kern__cuda_matmul_glu
 * (gate and up rows in one warp, SwiGLU applied).  Called by the wrappers
 * in kern_cuda.cu (which checked alignment).  "Quantized" below: Q8_0,
 * Q4_0 and the K-quants, whose blocks cuda_dequant.cuh decodes (Q8_0 is
 * decoded here).
 *
 *   F32                 cublasSgemm straight on W
 *   F16/BF16/quantized, mv_kernel: a warp per weight row, dequantizing on
 *     n<=8              the fly, up to 4 rows of x per pass (decode)
 *   F16/BF16, n>8       x converted to W's type, cublasGemmEx, f32 compute
 *   quantized, n>8      x rounded (int8 steps) straight to f16, W dequantized
 *                       to f16 in row tiles, cublasGemmEx on tensor cores
 *
 * cuBLAS is column-major.  A row-major [R][C] W with row stride ldw is, to
 * cuBLAS, a C x R matrix with leading dimension ldw; x[n][C] is C x n and
 * y[n][R] is R x n.  So y = op(W)^T x is gemm(T, N, m=R, n, k=C).
 *
 * Precision: the GEMV keeps x in f32 and accumulates in f32.  For
 * quantized weights x is first rounded per 32-value block to int8 steps,
 * as kern.h defines the product (kern_round_x_q8) for every backend, and W
 * is decoded to exactly kern_row_to_f32's values.  The GemmEx paths round x to f16/bf16
 * (accumulation stays f32), as llama.cpp does; f16 saturates at +-65504 rather than becoming inf,
 * so a huge activation gives a large wrong value instead of NaNs downstream. Quantized prefill runs
 * in f16 too: a decoded weight and the rounded x keep 11 significant bits there (a relative 2^-12
 * per operand), which costs far less than an f32 product on CUDA cores costs in time.
 */
#include "cuda_common.cuh"
#include "cuda_dequant.cuh"

#include <limits.h>

#define MV_MAX_N 8                       /* up to this many rows of x take the GEMV path */
#define MV_NX 4                          /* rows of x one GEMV pass handles */
#define MV_WARPS 4                       /* warps, i.e. weight rows, per block */
#define MV_AHEAD 4                       /* 16-byte loads of a row a lane has in flight */
#define DQ_TILE_BYTES ((size_t)64 << 20) /* f16 weight tile for the quantized GEMM */

/* ------------------------------------------------------------------------ */
/* GEMV for small n.                                                        */
/* ------------------------------------------------------------------------ */

/* Weights c .. c+7 of a row (c % 8 == 0) as f32.  `vec`: the row and c
 * allow one 16-byte load (F16/BF16).  Q8_0: the 8 values are a quarter of
 * one 34-byte block, 2-byte aligned, so four 16-bit loads.  Q4_0 and the
 * K-quants: cuda_dequant.cuh, which reads only the sub-block's scale and
 * the 8 values' quant bits, not the whole block. */
template <int T>
static __device__ __forceinline__ void
load8_w(const char *row, uint32_t c, bool vec, float *o)
{
    if (T == KERN_Q8_0) {
        const char *blk = row + (size_t)(c / KERN_QK8_0) * sizeof(kern_block_q8_0_t);
        float d = kern__cuda_f16(*(const uint16_t *)blk);
        const uint16_t *q = (const uint16_t *)(blk + 2 + c % KERN_QK8_0);
#pragma unroll
        for (int k = 0; k < 4; k++) {
            uint16_t u = q[k];
            o[2 * k] = d * (float)(int8_t)(u & 0xff);
            o[2 * k + 1] = d * (float)(int8_t)(u >> 8);
        }
    } else if (kern__cuda_is_kq(T)) {
        kern__cuda_dq8<T>(row, c, o);
    } else if (vec) {
        uint4 u = *(const uint4 *)(row + (size_t)c * 2);
        uint32_t p[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int k = 0; k < 4; k++) { /* little-endian: the low half comes first */
            uint16_t lo = (uint16_t)(p[k] & 0xffff), hi = (uint16_t)(p[k] >> 16);
            o[2 * k] = T == KERN_F16 ? kern__cuda_f16(lo) : kern__cuda_bf16(lo);
            o[2 * k + 1] = T == KERN_F16 ? kern__cuda_f16(hi) : kern__cuda_bf16(hi);
        }
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++)
            o[k] = kern__cuda_load_elem<T>(row, c + k);
    }
}

static __device__ __forceinline__ void
load8_x(const float *x, bool vec, float *o)
{
    if (vec) {
        float4 a = ((const float4 *)x)[0], b = ((const float4 *)x)[1];
        o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w;
        o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
    } else {
#pragma unroll
        for (int k = 0; k < 8; k++)
            o[k] = x[k];
    }
}

/* acc[j] (j < nx <= MV_NX) = one weight row times row j of x, summed over
 * the warp (every lane holds the sums).  Lanes stride the row 8 elements
 * at a time, so each weight is read once for all nx rows of x.  Decode is
 * bandwidth-bound on W, so reading it once per pass is what matters. */
template <int T>
static __device__ __forceinline__ void
mv_row(const char *row, uint32_t cols, const float *x, uint32_t nx, bool wvec, bool xvec,
       uint32_t lane, float *acc)
{
#pragma unroll
    for (int j = 0; j < MV_NX; j++)
        acc[j] = 0.0f;

    uint32_t cols8 = cols & ~7u;
    /* MV_AHEAD stretches of the row loaded before any is used, so that
     * several loads are in flight at once: a warp per row leaves too few
     * warps per multiprocessor (a 4096-row matrix: about 31) to cover
     * memory latency one load at a time.  The sums run in the same order. */
    for (uint32_t c0 = lane * 8; c0 < cols8; c0 += MV_AHEAD * 32 * 8) {
        float wv[MV_AHEAD][8];
#pragma unroll
        for (int u = 0; u < MV_AHEAD; u++)
            if (c0 + u * 256 < cols8)
                load8_w<T>(row, c0 + u * 256, wvec, wv[u]);
#pragma unroll
        for (int u = 0; u < MV_AHEAD; u++) {
            const uint32_t c = c0 + u * 256;
            if (c >= cols8)
                break;
#pragma unroll
            for (uint32_t j = 0; j < MV_NX; j++) {
                if (j < nx) {
                    float xv[8];
                    load8_x(x + (size_t)j * cols + c, xvec, xv);
#pragma unroll
                    for (int k = 0; k < 8; k++)
                        acc[j] += wv[u][k] * xv[k];
                }
            }
        }
    }
    /* F16/BF16 rows need not be a multiple of 8 long (quantized ones
     * always are: whole 32-value blocks). */
    if (T == KERN_F16 || T == KERN_BF16) {
        for (uint32_t c = cols8 + lane; c < cols; c += 32) {
            float wv = kern__cuda_load_elem<T>(row, c);
#pragma unroll
            for (uint32_t j = 0; j < MV_NX; j++)
                if (j < nx)
                    acc[j] += wv * x[(size_t)j * cols + c];
        }
    }
#pragma unroll
    for (uint32_t j = 0; j < MV_NX; j++)
        if (j < nx) /* nx is the same for every lane: the shuffles see all 32 */
            acc[j] = kern__cuda_warp_sum(acc[j]);
}

/* One weight of a GEMV launch and the blocks that serve it: those from the
 * previous matrix's `end` up to its own. */
typedef struct mv_mat {
    const char *w;
    size_t row_bytes;
    const float *bias; /* NULL: none */
    float *y;          /* [nx][rows] */
    uint32_t rows;
    uint32_t end;
} mv_mat_t;

typedef struct mv_set {
    mv_mat_t m[KERN_MATMUL_SET_MAX];
} mv_set_t;

/* A field of matrix i, selected rather than indexed (a dynamic index
 * would copy the kernel's parameters to local memory), and at its use, so
 * that no field is held in registers across the row's loop. */
#define MV_FIELD(set, i, f) ((i) == 0 ? (set).m[0].f : (i) == 1 ? (set).m[1].f : (set).m[2].f)

/* A warp per weight row; one launch serves every matrix of `set` (Q, K and
 * V of a layer: two launches fewer a layer in decode).  GLU: set.m[0] is
 * the gate, set.m[1] the up matrix; a warp takes row r of both and writes
 * silu(gate) * up into set.m[0].y, so neither product goes to memory. */
template <int T, bool GLU>
static __global__ void
__launch_bounds__(MV_WARPS * 32)
    mv_kernel(mv_set_t set, uint32_t cols, const float *x, uint32_t nx, bool wvec, bool xvec)
{
    uint32_t b = blockIdx.x, i = GLU ? 0 : (b >= set.m[0].end) + (b >= set.m[1].end);
    uint32_t first = i ? MV_FIELD(set, i - 1, end) : 0, rows = MV_FIELD(set, i, rows);
    uint32_t r = (b - first) * MV_WARPS + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (r >= rows)
        return; /* the whole warp leaves together */
    float acc[MV_NX];
    mv_row<T>(MV_FIELD(set, i, w) + (size_t)r * MV_FIELD(set, i, row_bytes), cols, x, nx, wvec,
              xvec, lane, acc);
    if (GLU) {
        float up[MV_NX];
        mv_row<T>(set.m[1].w + (size_t)r * set.m[1].row_bytes, cols, x, nx, wvec, xvec, lane, up);
#pragma unroll
        for (uint32_t j = 0; j < MV_NX; j++)
            if (j < nx && lane == 0) /* "+ 0.0f": the unbiased product's bits, -0 included */
                set.m[0].y[(size_t)j * rows + r] = kern__cuda_silu_mul(acc[j] + 0.0f, up[j] + 0.0f);
        return;
    }
    float *y = MV_FIELD(set, i, y);
    const float *bias = MV_FIELD(set, i, bias);
#pragma unroll
    for (uint32_t j = 0; j < MV_NX; j++)
        if (j < nx && lane == 0)
            y[(size_t)j * rows + r] = acc[j] + (bias ? bias[r] : 0.0f);
}

template <bool GLU>
static int
mv_dispatch(kern_cuda_t *be, kern_dtype_t type, unsigned grid, const mv_set_t &set, uint32_t cols,
            const float *x, uint32_t nx, bool wvec, bool xvec)
{
    switch (type) {
    case KERN_F16:
        mv_kernel<KERN_F16, GLU>
            <<<grid, MV_WARPS * 32, 0, be->stream>>>(set, cols, x, nx, wvec, xvec);
        break;
    case KERN_BF16:
        mv_kernel<KERN_BF16, GLU>
            <<<grid, MV_WARPS * 32, 0, be->stream>>>(set, cols, x, nx, wvec, xvec);
        break;
    case KERN_Q8_0:
        mv_kernel<KERN_Q8_0, GLU>
            <<<grid, MV_WARPS * 32, 0, be->stream>>>(set, cols, x, nx, false, xvec);
        break;
    case KERN_Q4_0:
        mv_kernel<KERN_Q4_0, GLU>
            <<<grid, MV_WARPS * 32, 0, be->stream>>>(set, cols, x, nx, false, xvec);
        break;
    case KERN_Q4_K:
        mv_kernel<KERN_Q4_K, GLU>
            <<<grid, MV_WARPS * 32, 0, be->stream>>>(set, cols, x, nx, false, xvec);
        break;
    case KERN_Q5_K:
        mv_kernel<KERN_Q5_K, GLU>
            <<<grid, MV_WARPS * 32, 0, be->stream>>>(set, cols, x, nx, false, xvec);
        break;
    case KERN_Q6_K:
        mv_kernel<KERN_Q6_K, GLU>
            <<<grid, MV_WARPS * 32, 0, be->stream>>>(set, cols, x, nx, false, xvec);
        break;
    default:
        return KVS_ENOTSUP;
    }
    KERN_CUDA_LAUNCHED();
    return 0;
}

/* w[0 .. count) share a type that is not F32 and n_cols; x is already
 * rounded for quantized types.  GLU: count 2, y[0] gets silu * up. */
static int
mv_launch(kern_cuda_t *be, uint32_t count, const kern_tensor_t *const *w, const float *x,
          uint32_t n, const float *const *bias, float *const *y, bool glu)
{
    uint32_t cols = w[0]->n_cols;
    bool wvec = true;
    mv_set_t set;
    memset(&set, 0, sizeof(set));
    uint32_t blocks = 0;
    for (uint32_t i = 0; i < count; i++) {
        wvec = wvec && ((uintptr_t)w[i]->data % 16) == 0 && (w[i]->row_bytes % 16) == 0;
        set.m[i].w = (const char *)w[i]->data;
        set.m[i].row_bytes = w[i]->row_bytes;
        set.m[i].bias = bias ? bias[i] : NULL;
        set.m[i].rows = w[i]->n_rows;
        if (i == 0 || !glu) /* GLU: row r of both matrices in one warp */
            blocks += (w[i]->n_rows + MV_WARPS - 1) / MV_WARPS;
        set.m[i].end = blocks;
    }
    for (uint32_t i = count; i < KERN_MATMUL_SET_MAX; i++)
        set.m[i].end = blocks;
    /* cols % 4 keeps every row of x 16-byte aligned when the first is. */
    bool xvec = ((uintptr_t)x % 16) == 0 && (cols % 4) == 0;
    for (uint32_t t0 = 0; t0 < n; t0 += MV_NX) {
        uint32_t nx = n - t0 < MV_NX ? n - t0 : MV_NX;
        for (uint32_t i = 0; i < count; i++) /* GLU: up's products are not stored */
            set.m[i].y = y[i] ? y[i] + (size_t)t0 * w[i]->n_rows : NULL;
        const float *xt = x + (size_t)t0 * cols;
        int rc = glu ? mv_dispatch<true>(be, w[0]->type, blocks, set, cols, xt, nx, wvec, xvec)
                     : mv_dispatch<false>(be, w[0]->type, blocks, set, cols, xt, nx, wvec, xvec);
        if (rc)
            return rc;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Helpers for the GEMM paths.                                              */
/* ------------------------------------------------------------------------ */

/* x (f32) to f16 (saturating, see the top of the file) or bf16 (round to
 * nearest even, NaN kept quiet, as kvs_f32_to_bf16). */
static __device__ __forceinline__ uint16_t
narrow_f16(float v)
{
    if (fabsf(v) > 65504.0f) /* false for NaN, which stays NaN */
        v = copysignf(65504.0f, v);
    return __half_as_ushort(__float2half_rn(v));
}

template <int T>
static __global__ void
narrow_kernel(const float *x, size_t count, uint16_t *out)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = x[i];
        if (T == KERN_F16) {
            out[i] = narrow_f16(v);
        } else {
            uint32_t u = __float_as_uint(v);
            if ((u & 0x7fffffffu) > 0x7f800000u)
                out[i] = (uint16_t)((u >> 16) | 64);
            else
                out[i] = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
        }
    }
}

/* Rows of quantized weights to contiguous f16 rows of `cols`.  A value is
 * its fp16 scale times at most 127 (Q8_0) or 4096 (K-quants), so only
 * scales near f16's top can reach past it, and those saturate.  Q4_0 and
 * the K-quants: 8 values a thread, stored as one 16-byte write (cols is a
 * multiple of 32 and `out` a workspace). */
template <int T>
static __global__ void
dequant_kernel(const char *w, size_t row_bytes, uint32_t rows, uint32_t cols, uint16_t *out)
{
    for (uint32_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const char *row = w + (size_t)r * row_bytes;
        uint16_t *o = out + (size_t)r * cols;
        if (T == KERN_Q8_0) {
            for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
                o[c] = narrow_f16(kern__cuda_load_elem<KERN_Q8_0>(row, c));
        } else {
            for (uint32_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
                float v[8];
                kern__cuda_dq8<T>(row, c, v);
                uint4 u;
                u.x = narrow_f16(v[0]) | (uint32_t)narrow_f16(v[1]) << 16;
                u.y = narrow_f16(v[2]) | (uint32_t)narrow_f16(v[3]) << 16;
                u.z = narrow_f16(v[4]) | (uint32_t)narrow_f16(v[5]) << 16;
                u.w = narrow_f16(v[6]) | (uint32_t)narrow_f16(v[7]) << 16;
                *(uint4 *)(o + c) = u;
            }
        }
    }
}

/* One row tile of W to f16 in `ws`. */
static int
dequant_launch(kern_cuda_t *be, const kern_tensor_t *w, uint32_t r0, uint32_t m, uint16_t *ws)
{
    unsigned grid = m < 65535 ? m : 65535;
    const char *wd = (const char *)w->data + (size_t)r0 * w->row_bytes;
    uint32_t cols = w->n_cols;
    switch (w->type) {
    case KERN_Q8_0:
        dequant_kernel<KERN_Q8_0><<<grid, 256, 0, be->stream>>>(wd, w->row_bytes, m, cols, ws);
        break;
    case KERN_Q4_0:
        dequant_kernel<KERN_Q4_0><<<grid, 256, 0, be->stream>>>(wd, w->row_bytes, m, cols, ws);
        break;
    case KERN_Q4_K:
        dequant_kernel<KERN_Q4_K><<<grid, 256, 0, be->stream>>>(wd, w->row_bytes, m, cols, ws);
        break;
    case KERN_Q5_K:
        dequant_kernel<KERN_Q5_K><<<grid, 256, 0, be->stream>>>(wd, w->row_bytes, m, cols, ws);
        break;
    case KERN_Q6_K:
        dequant_kernel<KERN_Q6_K><<<grid, 256, 0, be->stream>>>(wd, w->row_bytes, m, cols, ws);
        break;
    default:
        return KVS_ENOTSUP;
    }
    KERN_CUDA_LAUNCHED();
    return 0;
}

static __global__ void
bias_kernel(float *y, const float *bias, size_t count, uint32_t rows)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] += bias[i % rows];
}

void
kern__cuda_matmul_reserve(const kern_reserve_t *r, size_t *x_bytes, size_t *w_bytes)
{
    /* x narrowed to 16 bits for a GEMM, or rounded in f32 for the GEMV;
     * one dequantized tile of a quantized weight (reserved whatever the model's
     * types: 64 MiB is little next to a device's weights and KV). */
    size_t half = (size_t)r->max_rows * r->max_cols * sizeof(uint16_t);
    size_t gemv = (size_t)MV_MAX_N * r->max_cols * sizeof(float);
    *x_bytes = half > gemv ? half : gemv;
    *w_bytes = DQ_TILE_BYTES;
}

static int
gemm_half(kern_cuda_t *be, const kern_tensor_t *w, const float *x, uint32_t n, float *y)
{
    uint32_t rows = w->n_rows, cols = w->n_cols;
    size_t count = (size_t)n * cols;
    void *xh;
    int rc = kern__cuda_workspace(be, KERN_CUDA_WS_MATMUL_X, count * sizeof(uint16_t), &xh);
    if (rc)
        return rc;
    unsigned grid = kern__cuda_grid(be, count, 256);
    cudaDataType_t type;
    if (w->type == KERN_F16) {
        narrow_kernel<KERN_F16><<<grid, 256, 0, be->stream>>>(x, count, (uint16_t *)xh);
        type = CUDA_R_16F;
    } else {
        narrow_kernel<KERN_BF16><<<grid, 256, 0, be->stream>>>(x, count, (uint16_t *)xh);
        type = CUDA_R_16BF;
    }
    KERN_CUDA_LAUNCHED();
    const float one = 1.0f, zero = 0.0f;
    KERN_CUBLAS_TRY(cublasGemmEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)n, (int)cols,
                                 &one, w->data, type, (int)(w->row_bytes / 2), xh, type, (int)cols,
                                 &zero, y, CUDA_R_32F, (int)rows, CUBLAS_COMPUTE_32F,
                                 CUBLAS_GEMM_DEFAULT));
    return 0;
}

/* kern_round_x_q8 on the device: a warp per 32-value block, one value a
 * lane.  Plain IEEE division and rintf (nearest even) give the bits the
 * host computes. */
static __device__ __forceinline__ void
store_x(float *out, size_t i, float v)
{
    out[i] = v;
}

static __device__ __forceinline__ void
store_x(uint16_t *out, size_t i, float v)
{
    out[i] = narrow_f16(v);
}

/* out: float (the GEMV reads it) or uint16_t (f16 for the GEMM). */
template <typename O>
static __global__ void
round_x_q8_kernel(const float *x, size_t n_blocks, O *out)
{
    size_t warp = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32;
    size_t stride = (size_t)gridDim.x * blockDim.x / 32;
    unsigned lane = threadIdx.x % 32;
    for (size_t b = warp; b < n_blocks; b += stride) {
        float v = x[b * 32 + lane], a = fabsf(v);
        for (int o = 16; o > 0; o /= 2)
            a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
        float s = a / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
        store_x(out, b * 32 + lane, rintf(__fmul_rn(v, inv)) * s);
    }
}

/* Any quantized W.  x is the f32 input: rounded to int8 steps and narrowed
 * to f16 in one pass into the x workspace. */
static int
gemm_quant(kern_cuda_t *be, const kern_tensor_t *w, const float *x, uint32_t n, float *y)
{
    uint32_t rows = w->n_rows, cols = w->n_cols;
    size_t count = (size_t)n * cols;
    void *xh, *ws;
    int rc = kern__cuda_workspace(be, KERN_CUDA_WS_MATMUL_X, count * sizeof(uint16_t), &xh);
    if (rc)
        return rc;
    round_x_q8_kernel<uint16_t><<<kern__cuda_grid(be, count, 256), 256, 0, be->stream>>>(
        x, count / KERN_QK8_0, (uint16_t *)xh);
    KERN_CUDA_LAUNCHED();

    size_t row_h = (size_t)cols * sizeof(uint16_t);
    size_t tile_rows = DQ_TILE_BYTES / row_h;
    if (tile_rows < 1)
        tile_rows = 1;
    if (tile_rows > rows)
        tile_rows = rows;
    if ((rc = kern__cuda_workspace(be, KERN_CUDA_WS_MATMUL_W, tile_rows * row_h, &ws)) != 0)
        return rc;
    const float one = 1.0f, zero = 0.0f;
    /* One workspace for every tile: the stream runs tile t's GEMM before
     * tile t+1's dequantization overwrites it. */
    for (uint32_t r0 = 0; r0 < rows; r0 += (uint32_t)tile_rows) {
        uint32_t m = rows - r0 < tile_rows ? rows - r0 : (uint32_t)tile_rows;
        if ((rc = dequant_launch(be, w, r0, m, (uint16_t *)ws)) != 0)
            return rc;
        KERN_CUBLAS_TRY(cublasGemmEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, (int)n, (int)cols,
                                     &one, ws, CUDA_R_16F, (int)cols, xh, CUDA_R_16F, (int)cols,
                                     &zero, y + r0, CUDA_R_32F, (int)rows, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT));
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Entry.                                                                   */
/* ------------------------------------------------------------------------ */

/* x rounded to int8 steps (kern_round_x_q8) into the x workspace, for
 * the GEMV on quantized weights. */
static int
round_x_gemv(kern_cuda_t *be, const float *x, uint32_t n, uint32_t cols, const float **out)
{
    void *xr;
    size_t count = (size_t)n * cols;
    int rc = kern__cuda_workspace(be, KERN_CUDA_WS_MATMUL_X, count * sizeof(float), &xr);
    if (rc)
        return rc;
    round_x_q8_kernel<float><<<kern__cuda_grid(be, count, 256), 256, 0, be->stream>>>(
        x, count / KERN_QK8_0, (float *)xr);
    KERN_CUDA_LAUNCHED();
    *out = (const float *)xr;
    return 0;
}

static bool
mv_takes(const kern_tensor_t *w, uint32_t n)
{
    return w->type != KERN_F32 && n <= MV_MAX_N;
}

bool
kern__cuda_matmul_fuses(const kern_tensor_t *a, const kern_tensor_t *b, uint32_t n)
{
    return mv_takes(a, n) && a->type == b->type;
}

int
kern__cuda_matmul_set(kern_cuda_t *be, uint32_t count, const kern_tensor_t *const *w,
                      const float *x, uint32_t n, const float *const *bias, float *const *y)
{
    /* x rounded once for every quantized weight: nothing between its uses
     * takes the x workspace (GEMV weights need none, and an F32 weight's
     * Sgemm reads x as it is). */
    const float *xq = NULL;
    bool done[KERN_MATMUL_SET_MAX] = {false};
    for (uint32_t i = 0; i < count; i++) {
        if (done[i])
            continue;
        if (!mv_takes(w[i], n)) {
            int rc = kern__cuda_matmul(be, w[i], x, n, bias[i], y[i]);
            if (rc)
                return rc;
            continue;
        }
        /* One launch for this weight and every later one of its type. */
        const kern_tensor_t *gw[KERN_MATMUL_SET_MAX] = {NULL};
        const float *gb[KERN_MATMUL_SET_MAX] = {NULL};
        float *gy[KERN_MATMUL_SET_MAX] = {NULL};
        uint32_t g = 0;
        for (uint32_t j = i; j < count; j++) {
            if (!done[j] && w[j]->type == w[i]->type) {
                gw[g] = w[j], gb[g] = bias[j], gy[g] = y[j], g++;
                done[j] = true;
            }
        }
        const float *xg = x;
        if (kern__rounds_x(w[i]->type)) {
            int rc = xq ? 0 : round_x_gemv(be, x, n, w[i]->n_cols, &xq);
            if (rc)
                return rc;
            xg = xq;
        }
        int rc = mv_launch(be, g, gw, xg, n, gb, gy, false);
        if (rc)
            return rc;
    }
    return 0;
}

int
kern__cuda_matmul_glu(kern_cuda_t *be, const kern_tensor_t *gate, const kern_tensor_t *up,
                      const float *x, uint32_t n, float *y)
{
    int rc = kern__rounds_x(gate->type) ? round_x_gemv(be, x, n, gate->n_cols, &x) : 0;
    const kern_tensor_t *w[2] = {gate, up};
    float *out[2] = {y, NULL};
    return rc ? rc : mv_launch(be, 2, w, x, n, NULL, out, true);
}

int
kern__cuda_matmul(kern_cuda_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
                  const float *bias, float *y)
{
    uint32_t rows = w->n_rows, cols = w->n_cols;
    bool quant = kern__rounds_x(w->type); /* Q8_0, Q4_0, the K-quants */
    if (w->type != KERN_F32 && w->type != KERN_F16 && w->type != KERN_BF16 && !quant)
        return KVS_ENOTSUP;
    if (mv_takes(w, n)) { /* bias fused */
        int rc = quant ? round_x_gemv(be, x, n, cols, &x) : 0;
        return rc ? rc : mv_launch(be, 1, &w, x, n, &bias, &y, false);
    }

    /* cuBLAS takes int sizes. */
    size_t el = w->type == KERN_F32 ? 4 : 2;
    if (rows > INT_MAX || cols > INT_MAX || n > INT_MAX || w->row_bytes / el > INT_MAX) {
        KVS_ERRORF("cuda: matmul of %u x %u (n %u) exceeds cuBLAS's int sizes", rows, cols, n);
        return KVS_ENOTSUP;
    }
    int rc;
    if (w->type == KERN_F32) {
        const float one = 1.0f, zero = 0.0f;
        KERN_CUBLAS_TRY(cublasSgemm(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, (int)n,
                                    (int)cols, &one, (const float *)w->data,
                                    (int)(w->row_bytes / 4), x, (int)cols, &zero, y, (int)rows));
        rc = 0;
    } else if (quant) {
        rc = gemm_quant(be, w, x, n, y);
    } else {
        rc = gemm_half(be, w, x, n, y);
    }
    if (rc || bias == NULL)
        return rc;
    size_t count = (size_t)n * rows;
    bias_kernel<<<kern__cuda_grid(be, count, 256), 256, 0, be->stream>>>(y, bias, count, rows);
    KERN_CUDA_LAUNCHED();
    return 0;
}
