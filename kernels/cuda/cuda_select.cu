/*
 * kernels/cuda/cuda_select.cu — the cuda backend's ops for choosing which
 * KV entries matter: score-based compaction's row gather (kern_kv_gather,
 * SnapKV and H2O) and block-sparse prefill's Quest bounds
 * (kern_kv_block_bounds, kern_block_scores).  Called by the vtable
 * wrappers in kern_cuda.cu after kern.c validated the arguments.
 *
 * The scores are the one heavy part: per KV head, every query row against
 * every candidate block's [max | min] summary, which at 128K context is a
 * fair fraction of dense attention's work.  They run as one TF32 GEMM per
 * KV head (the [max(q, 0) | min(q, 0)] trick of kern_host.c), with the
 * split before and the max over each group's rows and heads after as
 * elementwise kernels.  TF32 keeps 10 mantissa bits, so bounds differ from
 * the f32 ones by about 1e-3 of their size: enough to rank blocks, whose
 * choice only has to be good, not bit-identical across backends.
 */
#include "cuda_common.cuh"

#include <limits.h>
#include <math.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Row gather.                                                              */
/* ------------------------------------------------------------------------ */

/* A warp per (layer, KV head, row j): src[(l * n_kv + h) * n + j] ->
 * dst[j], K and V.  Destinations are never sources (kern.h), so every
 * row can move at once. */
template <typename T>
static __global__ void
kv_gather_kernel(char *k, char *v, size_t layer_bytes, uint32_t n_kv, uint32_t bt, uint32_t d,
                 const int32_t *src, const int32_t *dst, uint32_t n, size_t count)
{
    const unsigned lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (size_t r = (size_t)blockIdx.x * warps + (threadIdx.x >> 5); r < count;
         r += (size_t)gridDim.x * warps) {
        const size_t l = r / ((size_t)n_kv * n);
        const uint32_t h = (uint32_t)(r / n % n_kv), j = (uint32_t)(r % n);
        const uint32_t s = (uint32_t)src[r], t = (uint32_t)dst[j];
        const size_t from = (((size_t)(s / bt) * n_kv + h) * bt + s % bt) * d;
        const size_t to = (((size_t)(t / bt) * n_kv + h) * bt + t % bt) * d;
        const T *ks = (const T *)(k + l * layer_bytes) + from;
        const T *vs = (const T *)(v + l * layer_bytes) + from;
        T *kd = (T *)(k + l * layer_bytes) + to, *vd = (T *)(v + l * layer_bytes) + to;
        for (uint32_t e = lane; e < d; e += 32) {
            kd[e] = ks[e];
            vd[e] = vs[e];
        }
    }
}

int
kern__cuda_kv_gather(kern_cuda_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
                     uint32_t n)
{
    const size_t count = (size_t)kv->n_layers * kv->n_kv_heads * n;
    const size_t bytes = (count + n) * sizeof(int32_t);
    void *h, *d;
    int rc = kern__cuda_stage_begin(be, bytes, &h);
    if (rc)
        return rc;
    memcpy(h, src, count * sizeof(int32_t));
    memcpy((int32_t *)h + count, dst, (size_t)n * sizeof(int32_t));
    if ((rc = kern__cuda_stage_end(be, bytes, &d)) != 0)
        return rc;
    const int32_t *ds = (const int32_t *)d, *dd = ds + count;
    const unsigned grid = kern__cuda_grid(be, count, 8); /* 8 warps a block */
    if (kv->dtype == KERN_F16)
        kv_gather_kernel<uint16_t><<<grid, 256, 0, be->stream>>>(
            (char *)kv->k, (char *)kv->v, kv->layer_bytes, kv->n_kv_heads, kv->block_tokens,
            kv->head_dim, ds, dd, n, count);
    else
        kv_gather_kernel<float><<<grid, 256, 0, be->stream>>>(
            (char *)kv->k, (char *)kv->v, kv->layer_bytes, kv->n_kv_heads, kv->block_tokens,
            kv->head_dim, ds, dd, n, count);
    KERN_CUDA_LAUNCHED();
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Quest bounds.                                                            */
/* ------------------------------------------------------------------------ */

/* blockIdx.x: block i of the list, blockIdx.y: KV head g; threads walk the
 * channels, so every token's row is one coalesced read. */
template <typename T>
static __global__ void
block_bounds_kernel(const T *k, uint32_t n_kv, uint32_t bt, uint32_t d, const int32_t *blocks,
                    uint32_t n, float *out)
{
    const uint32_t i = blockIdx.x, g = blockIdx.y;
    const T *base = k + ((size_t)blocks[i] * n_kv + g) * bt * d;
    float *mx = out + ((size_t)g * n + i) * 2 * d, *mn = mx + d;
    for (uint32_t e = threadIdx.x; e < d; e += blockDim.x) {
        float hi = kern__cuda_kv_load(base + e), lo = hi;
        for (uint32_t t = 1; t < bt; t++) {
            float x = kern__cuda_kv_load(base + (size_t)t * d + e);
            hi = fmaxf(hi, x);
            lo = fminf(lo, x);
        }
        mx[e] = hi;
        mn[e] = lo;
    }
}

int
kern__cuda_block_bounds(kern_cuda_t *be, const kern_kv_t *kv, uint32_t layer, const int32_t *blocks,
                        uint32_t n, float *out)
{
    if (kv->n_kv_heads > 65535) {
        KVS_ERRORF("cuda: block_bounds: %u KV heads exceed the grid limit", kv->n_kv_heads);
        return KVS_ENOTSUP;
    }
    const size_t bytes = (size_t)n * sizeof(int32_t);
    void *h, *d;
    int rc = kern__cuda_stage_begin(be, bytes, &h);
    if (rc)
        return rc;
    memcpy(h, blocks, bytes);
    if ((rc = kern__cuda_stage_end(be, bytes, &d)) != 0)
        return rc;
    const dim3 grid(n, kv->n_kv_heads);
    const unsigned threads = kv->head_dim >= 128 ? 128 : 64;
    const char *k = (const char *)kv->k + (size_t)layer * kv->layer_bytes;
    if (kv->dtype == KERN_F16)
        block_bounds_kernel<__half>
            <<<grid, threads, 0, be->stream>>>((const __half *)k, kv->n_kv_heads, kv->block_tokens,
                                               kv->head_dim, (const int32_t *)d, n, out);
    else
        block_bounds_kernel<float>
            <<<grid, threads, 0, be->stream>>>((const float *)k, kv->n_kv_heads, kv->block_tokens,
                                               kv->head_dim, (const int32_t *)d, n, out);
    KERN_CUDA_LAUNCHED();
    return 0;
}

/* x[(i * G + hh)][0 .. 2d) = [max(q, 0) | min(q, 0)] of row i, head
 * g * G + hh. */
static __global__ void
split_kernel(const float *q, uint32_t n_q, uint32_t n_heads, uint32_t G, uint32_t g, uint32_t d,
             float *x)
{
    const size_t count = (size_t)n_q * G * d;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < count;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t r = t / d, e = t % d, i = r / G, hh = r % G;
        const float v = q[(i * n_heads + (size_t)g * G + hh) * d + e];
        x[r * 2 * d + e] = v > 0.0f ? v : 0.0f;
        x[r * 2 * d + d + e] = v < 0.0f ? v : 0.0f;
    }
}

/* score[grp][b] = max(score (unless first), y[r][b] for the rows r of the
 * group: rows i of [grp * q_group, ..) times G heads). */
static __global__ void
group_max_kernel(const float *y, uint32_t n_q, uint32_t G, uint32_t q_group, uint32_t nb,
                 uint32_t n_groups, bool first, float *score)
{
    const size_t count = (size_t)n_groups * nb;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < count;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t grp = t / nb, b = t % nb;
        const size_t r0 = grp * q_group * G;
        size_t r1 = (grp + 1) * q_group * G;
        r1 = r1 < (size_t)n_q * G ? r1 : (size_t)n_q * G;
        float m = first ? -INFINITY : score[t];
        for (size_t r = r0; r < r1; r++)
            m = fmaxf(m, y[r * nb + b]);
        score[t] = m;
    }
}

int
kern__cuda_block_scores(kern_cuda_t *be, const kern_block_score_args_t *a)
{
    const uint32_t d = a->head_dim, G = a->n_heads / a->n_kv_heads, nb = a->n_blocks;
    const uint32_t qg = a->q_group ? a->q_group : 1, n_groups = (a->n_q + qg - 1) / qg;
    const size_t rows = (size_t)a->n_q * G;
    if (rows > INT_MAX || nb > INT_MAX || 2 * (size_t)d > INT_MAX) {
        KVS_ERRORF("cuda: block_scores of %zu rows x %u blocks exceed cuBLAS's int sizes", rows,
                   nb);
        return KVS_ENOTSUP;
    }
    float *x = a->work, *y = a->work + rows * 2 * d;
    const float one = 1.0f, zero = 0.0f;
    for (uint32_t g = 0; g < a->n_kv_heads; g++) {
        const size_t nx = rows * d;
        split_kernel<<<kern__cuda_grid(be, nx, 256), 256, 0, be->stream>>>(a->q, a->n_q, a->n_heads,
                                                                           G, g, d, x);
        KERN_CUDA_LAUNCHED();
        /* Column-major: y^T (nb x rows) = W (nb x 2d, rows of the summary)
         * times x^T (2d x rows), as kern__cuda_matmul does. */
        KERN_CUBLAS_TRY(cublasGemmEx(be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nb, (int)rows,
                                     (int)(2 * d), &one, a->bounds + (size_t)g * nb * 2 * d,
                                     CUDA_R_32F, (int)(2 * d), x, CUDA_R_32F, (int)(2 * d), &zero,
                                     y, CUDA_R_32F, (int)nb, CUBLAS_COMPUTE_32F_FAST_TF32,
                                     CUBLAS_GEMM_DEFAULT));
        const size_t ns = (size_t)n_groups * nb;
        group_max_kernel<<<kern__cuda_grid(be, ns, 256), 256, 0, be->stream>>>(
            y, a->n_q, G, qg, nb, n_groups, g == 0, a->score);
        KERN_CUDA_LAUNCHED();
    }
    return 0;
}
