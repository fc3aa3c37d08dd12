/*
 * kernels/cuda/cuda_select.cu — the cuda backend's ops for choosing which
 * KV entries matter: score-based compaction's row gather (kern_kv_gather,
 * SnapKV and H2O), block-sparse prefill's Quest bounds and choice of blocks
 * (kern_kv_block_bounds, kern_block_scores, kern_block_select), and the
 * attention mass that
 * SnapKV, H2O and speculative prefill rank keys by (kern_attn_mass).
 * Called by the vtable wrappers in kern_cuda.cu after kern.c validated
 * the arguments.
 *
 * The scores are the one heavy part: per KV head, every query row against
 * every candidate block's [max | min] summary, which at 128K context is a
 * fair fraction of dense attention's work.  They run as one TF32 GEMM per
 * KV head (the [max(q, 0) | min(q, 0)] trick of kern_host.c), with the
 * split before and the max over each group's rows and heads after as
 * elementwise kernels.  TF32 keeps 10 mantissa bits, so bounds differ from
 * the f32 ones by about 1e-3 of their size: enough to rank blocks, whose
 * choice only has to be good, not bit-identical across backends
 * (KVS_CUDA_SCORES=f32 multiplies in full f32, for checks that compare a
 * whole run's choices with a host backend's).
 *
 * Every kernel here reads keys from either kind of block: quantized ones
 * through cuda_kvq.cuh, value by value, as the host backends decode them.
 */
#include "cuda_kvq.cuh"

#include <limits.h>
#include <math.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Row gather.                                                              */
/* ------------------------------------------------------------------------ */

/* A warp per (layer, KV head, row j): src[(l * n_kv + h) * n + j] ->
 * dst[j], K and V; a quantized source row is written as its decoded
 * values, a full-precision one as it is.  Destinations are never sources
 * (kern.h), so every row can move at once.  kvq: layer 0's tiles, a
 * layer being layer_tiles tiles on. */
template <typename T>
static __global__ void
kv_gather_kernel(char *k, char *v, size_t layer_bytes, kern_cuda_kvq_t kvq, size_t layer_tiles,
                 uint32_t n_kv, uint32_t bt, uint32_t d, const int32_t *src, const int32_t *dst,
                 uint32_t n, size_t count)
{
    const unsigned lane = threadIdx.x & 31, warps = blockDim.x >> 5;
    for (size_t r = (size_t)blockIdx.x * warps + (threadIdx.x >> 5); r < count;
         r += (size_t)gridDim.x * warps) {
        const size_t l = r / ((size_t)n_kv * n);
        const uint32_t h = (uint32_t)(r / n % n_kv), j = (uint32_t)(r % n);
        const uint32_t s = (uint32_t)src[r], t = (uint32_t)dst[j], sb = s / bt;
        const size_t to = (((size_t)(t / bt) * n_kv + h) * bt + t % bt) * d;
        T *kd = (T *)(k + l * layer_bytes) + to, *vd = (T *)(v + l * layer_bytes) + to;
        if (sb >= kvq.n_hot) {
            kern_cuda_kvq_t w = kvq;
            w.qk += l * layer_tiles * w.qk_tile;
            w.qv += l * layer_tiles * w.qv_tile;
            const uint8_t *kt = kern__cuda_kvq_tile(w, false, sb, n_kv, h);
            const uint8_t *vt = kern__cuda_kvq_tile(w, true, sb, n_kv, h);
            for (uint32_t e = lane; e < d; e += 32) {
                kern__cuda_kv_store_decoded(kd + e,
                                            kern__kvq_elem(w.quant, false, kt, bt, d, s % bt, e));
                kern__cuda_kv_store_decoded(vd + e,
                                            kern__kvq_elem(w.quant, true, vt, bt, d, s % bt, e));
            }
            continue;
        }
        const size_t from = (((size_t)sb * n_kv + h) * bt + s % bt) * d;
        const T *ks = (const T *)(k + l * layer_bytes) + from;
        const T *vs = (const T *)(v + l * layer_bytes) + from;
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
    const kern_cuda_kvq_t kvq = kern__cuda_kvq(kv, 0);
    const size_t layer_tiles = (size_t)(kv->n_blocks - kvq.n_hot) * kv->n_kv_heads;
    if (kv->dtype == KERN_F16)
        kv_gather_kernel<__half><<<grid, 256, 0, be->stream>>>(
            (char *)kv->k, (char *)kv->v, kv->layer_bytes, kvq, layer_tiles, kv->n_kv_heads,
            kv->block_tokens, kv->head_dim, ds, dd, n, count);
    else
        kv_gather_kernel<float><<<grid, 256, 0, be->stream>>>(
            (char *)kv->k, (char *)kv->v, kv->layer_bytes, kvq, layer_tiles, kv->n_kv_heads,
            kv->block_tokens, kv->head_dim, ds, dd, n, count);
    KERN_CUDA_LAUNCHED();
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Quest bounds.                                                            */
/* ------------------------------------------------------------------------ */

/* kvs_f32_to_fp16_dir on the device: x as f16 bits rounded up (or
 * down), saturating at +-65504, NaN a quiet NaN of its sign. */
static __device__ __forceinline__ uint16_t
bound_half(float x, bool up)
{
    if (x != x)
        return (uint16_t)(((__float_as_uint(x) >> 16) & 0x8000u) | 0x7e00u);
    x = x > 65504.0f ? 65504.0f : x < -65504.0f ? -65504.0f : x;
    return __half_as_ushort(up ? __float2half_ru(x) : __float2half_rd(x));
}

/* blockIdx.x: block i of the list, blockIdx.y: KV head g; threads walk the
 * channels, so every token's row is one coalesced read.  by_rows: the
 * rows of KV head g in out (kern_kv_pool_bounds: block blk at row blk),
 * 0 for kern_kv_block_bounds' (block i at row i). */
template <typename T>
static __global__ void
block_bounds_kernel(const T *k, kern_cuda_kvq_t kvq, uint32_t n_kv, uint32_t bt, uint32_t d,
                    const int32_t *blocks, uint32_t n, uint32_t by_rows, uint16_t *out)
{
    const uint32_t i = blockIdx.x, g = blockIdx.y, blk = (uint32_t)blocks[i];
    const size_t row = by_rows ? (size_t)g * by_rows + blk : (size_t)g * n + i;
    uint16_t *mx = out + row * 2 * d, *mn = mx + d;
    for (uint32_t e = threadIdx.x; e < d; e += blockDim.x) {
        float hi = kern__cuda_kv_elem(k, kvq, false, blk, n_kv, g, bt, d, 0, e), lo = hi;
        for (uint32_t t = 1; t < bt; t++) {
            float x = kern__cuda_kv_elem(k, kvq, false, blk, n_kv, g, bt, d, t, e);
            /* The host backends' compares: a NaN first key stays, a
             * later one is passed over, and of two zeros the first. */
            hi = x > hi ? x : hi;
            lo = x < lo ? x : lo;
        }
        mx[e] = bound_half(hi, true);
        mn[e] = bound_half(lo, false);
    }
}

int
kern__cuda_block_bounds(kern_cuda_t *be, const kern_kv_t *kv, uint32_t layer, const int32_t *blocks,
                        uint32_t n, uint16_t *out, bool by_block)
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
    const kern_cuda_kvq_t kvq = kern__cuda_kvq(kv, layer);
    const uint32_t by_rows = by_block ? kv->n_blocks : 0;
    if (kv->dtype == KERN_F16)
        block_bounds_kernel<__half><<<grid, threads, 0, be->stream>>>(
            (const __half *)k, kvq, kv->n_kv_heads, kv->block_tokens, kv->head_dim,
            (const int32_t *)d, n, by_rows, out);
    else
        block_bounds_kernel<float><<<grid, threads, 0, be->stream>>>(
            (const float *)k, kvq, kv->n_kv_heads, kv->block_tokens, kv->head_dim,
            (const int32_t *)d, n, by_rows, out);
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

/* dst[b] = KV head g's bounds row rows[b] (row b without rows; of
 * `stride` a head) in f32: the product's operands, side by side where the
 * rows come from a kern_kv_pool_bounds store. */
static __global__ void
gather_bounds_kernel(const __half *bounds, size_t stride, uint32_t g, const int32_t *rows,
                     uint32_t nb, uint32_t w, float *dst)
{
    const size_t count = (size_t)nb * w;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < count;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t b = t / w, e = t % w;
        const size_t row = rows ? (size_t)rows[b] : b;
        dst[t] = __half2float(bounds[((size_t)g * stride + row) * w + e]);
    }
}

/* score[grp * heads + g][b] (rows sstride apart) = max(score (unless
 * first), y[r][b] for the rows r of the group: rows i of
 * [grp * q_group, ..) times G heads); heads is 1 (g 0) for a score row
 * shared by every KV head. */
static __global__ void
group_max_kernel(const float *y, uint32_t n_q, uint32_t G, uint32_t q_group, uint32_t nb,
                 uint32_t n_groups, uint32_t heads, uint32_t g, bool first, float *score,
                 uint32_t sstride)
{
    const size_t count = (size_t)n_groups * nb;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < count;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t grp = t / nb, b = t % nb;
        const size_t r0 = grp * q_group * G;
        size_t r1 = (grp + 1) * q_group * G;
        r1 = r1 < (size_t)n_q * G ? r1 : (size_t)n_q * G;
        float *sc = score + (grp * heads + g) * sstride + b;
        float m = first ? -INFINITY : *sc;
        for (size_t r = r0; r < r1; r++)
            m = fmaxf(m, y[r * nb + b]);
        *sc = m;
    }
}

/* At most this many (row, query head) pairs of one KV head take the
 * direct kernel below: a decode row (G of them) or a verification step's. */
#define FEW_PAIRS 32
#define FEW_WARPS 8

/* Scores of a few query rows straight from the bounds: a warp per (KV
 * block, blockIdx.y), lanes over channels, each pair's sum reduced across
 * the warp and the maxima kept in registers.  blockIdx.y is the KV head
 * with per_kv_head, else 0 and the warp walks every KV head into one row.
 * One launch for what the product path takes four per KV head (split,
 * gather, GEMM, group max), which at decode is launch time, not work;
 * the sums are exact fp32, not TF32.  With indptr (kern.h:
 * bounds_indptr) each group's warp b reads the group's own entry b, if
 * it has one: the rows of a decode step's sequences, any number of
 * them, in one launch. */
static __global__ void
few_scores_kernel(const float *q, uint32_t n_q, uint32_t n_heads, uint32_t n_kv, uint32_t d,
                  const __half *bounds, size_t bstride, const int32_t *rows, const uint32_t *indptr,
                  uint32_t nb, uint32_t qg, bool per_kv_head, float *score, uint32_t sstride)
{
    const uint32_t lane = threadIdx.x & 31;
    const uint32_t b = blockIdx.x * FEW_WARPS + (threadIdx.x >> 5);
    if (b >= nb)
        return;
    const uint32_t G = n_heads / n_kv, n_groups = (n_q + qg - 1) / qg;
    const uint32_t g0 = per_kv_head ? blockIdx.y : 0, g1 = per_kv_head ? g0 + 1 : n_kv;
    for (uint32_t grp = 0; grp < n_groups; grp++) {
        const uint32_t at = indptr ? indptr[grp] + b : b;
        if (indptr && at >= indptr[grp + 1])
            continue; /* the group has fewer blocks: the same for the whole warp */
        const size_t row = rows ? (size_t)rows[at] : b;
        const uint32_t i1 = (grp + 1) * qg < n_q ? (grp + 1) * qg : n_q;
        float best = -INFINITY;
        for (uint32_t g = g0; g < g1; g++) {
            const __half *mx = bounds + ((size_t)g * bstride + row) * 2 * d, *mn = mx + d;
            for (uint32_t i = grp * qg; i < i1; i++)
                for (uint32_t hh = 0; hh < G; hh++) {
                    const float *qr = q + ((size_t)i * n_heads + (size_t)g * G + hh) * d;
                    float s = 0.0f;
                    for (uint32_t e = lane; e < d; e += 32) {
                        const float x = qr[e];
                        s += fmaxf(x * __half2float(mx[e]), x * __half2float(mn[e]));
                    }
                    best = fmaxf(best, kern__cuda_warp_sum(s));
                }
        }
        if (lane == 0)
            score[((size_t)grp * (per_kv_head ? n_kv : 1) + g0) * sstride + b] = best;
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
    float *x = a->work, *y = a->work + rows * 2 * d, *gb = y + rows * nb;
    const float one = 1.0f, zero = 0.0f;
    const size_t bstride = a->bounds_stride ? a->bounds_stride : nb;
    const uint32_t sstride = a->score_stride ? a->score_stride : nb;
    const uint32_t heads = a->per_kv_head ? a->n_kv_heads : 1;
    /* The list of rows, then the groups' offsets into it where they have
     * lists of their own. */
    const int32_t *drows = a->lists_in_backend ? a->bounds_rows : NULL;
    const uint32_t *dptr = a->lists_in_backend ? a->bounds_indptr : NULL;
    if (a->bounds_rows && !a->lists_in_backend) {
        const size_t listed = a->bounds_indptr ? a->bounds_indptr[n_groups] : nb;
        const size_t lb = listed * sizeof(int32_t);
        const size_t bytes =
            lb + (a->bounds_indptr ? ((size_t)n_groups + 1) * sizeof(uint32_t) : 0);
        void *h, *dv;
        int rc = kern__cuda_stage_begin(be, bytes, &h);
        if (rc)
            return rc;
        memcpy(h, a->bounds_rows, lb);
        if (a->bounds_indptr)
            memcpy((char *)h + lb, a->bounds_indptr, bytes - lb);
        if ((rc = kern__cuda_stage_end(be, bytes, &dv)) != 0)
            return rc;
        drows = (const int32_t *)dv;
        dptr = a->bounds_indptr ? (const uint32_t *)((const char *)dv + lb) : NULL;
    }
    if (be->mode == KERN_CUDA_DRY)
        return KERN_CUDA_DRY_DONE; /* staged as a recording will stage */
    if ((rows <= FEW_PAIRS || dptr) && a->n_kv_heads <= 65535) {
        const dim3 grid((nb + FEW_WARPS - 1) / FEW_WARPS, a->per_kv_head ? a->n_kv_heads : 1);
        few_scores_kernel<<<grid, FEW_WARPS * 32, 0, be->stream>>>(
            a->q, a->n_q, a->n_heads, a->n_kv_heads, d, (const __half *)a->bounds, bstride, drows,
            dptr, nb, qg, a->per_kv_head, a->score, sstride);
        KERN_CUDA_LAUNCHED();
        return 0;
    }
    if (dptr) {
        KVS_ERRORF("cuda: block_scores: %u KV heads exceed the grid limit", a->n_kv_heads);
        return KVS_ENOTSUP;
    }
    for (uint32_t g = 0; g < a->n_kv_heads; g++) {
        const size_t ng = (size_t)nb * 2 * d;
        gather_bounds_kernel<<<kern__cuda_grid(be, ng, 256), 256, 0, be->stream>>>(
            (const __half *)a->bounds, bstride, g, drows, nb, 2 * d, gb);
        KERN_CUDA_LAUNCHED();
        const size_t nx = rows * d;
        split_kernel<<<kern__cuda_grid(be, nx, 256), 256, 0, be->stream>>>(a->q, a->n_q, a->n_heads,
                                                                           G, g, d, x);
        KERN_CUDA_LAUNCHED();
        /* Column-major: y^T (nb x rows) = W (nb x 2d, rows of the summary)
         * times x^T (2d x rows), as kern__cuda_matmul does. */
        KERN_CUBLAS_TRY(cublasGemmEx(
            be->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)nb, (int)rows, (int)(2 * d), &one, gb,
            CUDA_R_32F, (int)(2 * d), x, CUDA_R_32F, (int)(2 * d), &zero, y, CUDA_R_32F, (int)nb,
            be->scores_f32 ? CUBLAS_COMPUTE_32F : CUBLAS_COMPUTE_32F_FAST_TF32,
            CUBLAS_GEMM_DEFAULT));
        const size_t ns = (size_t)n_groups * nb;
        group_max_kernel<<<kern__cuda_grid(be, ns, 256), 256, 0, be->stream>>>(
            y, a->n_q, G, qg, nb, n_groups, heads, a->per_kv_head ? g : 0, a->per_kv_head || g == 0,
            a->score, sstride);
        KERN_CUDA_LAUNCHED();
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Block choice.                                                            */
/* ------------------------------------------------------------------------ */

#define SELECT_THREADS 256

/* kern__select_key (kern_host.c) on the device: the same order, as
 * unsigned keys. */
static __device__ __forceinline__ uint32_t
select_key(float x)
{
    if (x != x)
        return 0;
    if (x == 0.0f)
        return 0x80000000u;
    const uint32_t u = __float_as_uint(x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* One block per (score row, KV head), blockIdx.x = r * n_kv + g.  The
 * top_k-th key is found a byte at a time from the top (a radix select:
 * four passes of a shared histogram over the row, which stays in L2);
 * keys above it are kept, and of those equal to it the lowest indices,
 * counted in index order by a block-wide scan.  No sort, no scratch. */
static __global__ void
__launch_bounds__(SELECT_THREADS)
    select_kernel(const float *score, uint32_t n_kv, uint32_t sstride, const uint32_t *ends,
                  const uint32_t *top_ks, uint32_t first, uint32_t k_all, uint8_t *mask,
                  uint32_t mstride)
{
    __shared__ uint32_t hist[256];
    __shared__ uint32_t warp_eq[SELECT_THREADS / 32];
    __shared__ uint32_t sh_prefix, sh_need;
    const uint32_t row = blockIdx.x, tid = threadIdx.x;
    const uint32_t end = ends[row / n_kv], n = end - first;
    const uint32_t top_k = top_ks ? top_ks[row / n_kv] : k_all;
    const float *s = score + (size_t)row * sstride;
    uint8_t *m = mask + (size_t)row * mstride;
    for (uint32_t j = tid; j < first; j += SELECT_THREADS)
        m[j] = 1;
    for (uint32_t j = end + tid; j < mstride; j += SELECT_THREADS)
        m[j] = 1;
    if (n <= top_k) {
        for (uint32_t j = tid; j < n; j += SELECT_THREADS)
            m[first + j] = 1;
        return;
    }

    /* Invariant: at least `need` keys of the row match prefix under pmask. */
    uint32_t prefix = 0, pmask = 0, need = top_k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        hist[tid] = 0; /* SELECT_THREADS == 256 bins */
        __syncthreads();
        for (uint32_t i = tid; i < n; i += SELECT_THREADS) {
            const uint32_t k = select_key(s[i]);
            if ((k & pmask) == prefix)
                atomicAdd(&hist[(k >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            uint32_t above = 0, b = 255;
            for (; b > 0 && above + hist[b] < need; b--)
                above += hist[b];
            sh_prefix = prefix | (b << shift);
            sh_need = need - above;
        }
        __syncthreads();
        prefix = sh_prefix;
        need = sh_need;
        pmask |= 255u << shift;
        __syncthreads(); /* every thread has read sh_* before the next pass */
    }

    /* prefix is the top_k-th key; keep the first `need` keys equal to it. */
    const uint32_t lane = tid & 31, warp = tid >> 5;
    uint32_t seen = 0; /* keys equal to prefix in earlier chunks */
    for (uint32_t c = 0; c < n; c += SELECT_THREADS) {
        const uint32_t i = c + tid;
        const uint32_t k = i < n ? select_key(s[i]) : 0;
        const bool eq = i < n && k == prefix;
        const uint32_t ball = __ballot_sync(0xffffffffu, eq);
        if (lane == 0)
            warp_eq[warp] = __popc(ball);
        __syncthreads();
        uint32_t before = seen + __popc(ball & ((1u << lane) - 1u)), total = 0;
        for (uint32_t w = 0; w < SELECT_THREADS / 32; w++) {
            before += w < warp ? warp_eq[w] : 0;
            total += warp_eq[w];
        }
        if (i < n)
            m[first + i] = k > prefix || (eq && before < need);
        __syncthreads(); /* warp_eq is rewritten by the next chunk */
        seen += total;
    }
}

int
kern__cuda_block_select(kern_cuda_t *be, const kern_block_select_args_t *a)
{
    const size_t rows = (size_t)a->n_rows * a->n_kv_heads;
    if (rows > INT_MAX) {
        KVS_ERRORF("cuda: block_select of %zu rows exceeds the grid limit", rows);
        return KVS_ENOTSUP;
    }
    /* ends, then the rows' own k where they have one */
    const size_t each = (size_t)a->n_rows * sizeof(uint32_t), bytes = a->top_ks ? 2 * each : each;
    void *h, *d;
    int rc = kern__cuda_stage_begin(be, bytes, &h);
    if (rc)
        return rc;
    memcpy(h, a->ends, each);
    if (a->top_ks)
        memcpy((char *)h + each, a->top_ks, each);
    if ((rc = kern__cuda_stage_end(be, bytes, &d)) != 0)
        return rc;
    const uint32_t *d_ends = (const uint32_t *)d;
    select_kernel<<<(unsigned)rows, SELECT_THREADS, 0, be->stream>>>(
        a->score, a->n_kv_heads, a->score_stride, d_ends, a->top_ks ? d_ends + a->n_rows : NULL,
        a->first, a->top_k, a->mask, a->mask_head_stride);
    KERN_CUDA_LAUNCHED();
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Attention mass.                                                          */
/* ------------------------------------------------------------------------ */

/* Keys a block of MASS_WARPS warps scores, MASS_KPW per warp. */
#define MASS_WARPS 8
#define MASS_KPW 8
#define MASS_KEYS (MASS_WARPS * MASS_KPW)
#define MASS_MAX_DIM 256 /* head_dim, for the key row a lane keeps in registers */

/* S[rr][h][j] for rows r0 + rr of the chunk (blockIdx.y), the query heads
 * of KV head blockIdx.z, and MASS_KEYS keys (blockIdx.x): a warp per key,
 * lanes over channels, every head of the group against the key while it
 * sits in registers.  Keys past the row's limit get -inf. */
template <typename T>
static __global__ void
mass_logits_kernel(const T *k, kern_cuda_kvq_t kvq, uint32_t n_kv, uint32_t bt, uint32_t d,
                   const int32_t *blocks, const float *q, uint32_t n_heads, uint32_t G, uint32_t r0,
                   uint32_t n_keys, uint32_t lim0, float scale, float *S)
{
    extern __shared__ float qs[]; /* [G][d] */
    const uint32_t rr = blockIdx.y, g = blockIdx.z, r = r0 + rr;
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const float *qr = q + ((size_t)r * n_heads + (size_t)g * G) * d;
    for (uint32_t t = threadIdx.x; t < G * d; t += blockDim.x)
        qs[t] = qr[t];
    __syncthreads();
    const uint32_t lim = lim0 + r < n_keys ? lim0 + r : n_keys; /* causal: M + r + 1 */
    const uint32_t per = (d + 31) / 32;
    for (uint32_t u = 0; u < MASS_KPW; u++) {
        const uint32_t j = blockIdx.x * MASS_KEYS + warp * MASS_KPW + u;
        if (j >= n_keys)
            break;
        float kr[MASS_MAX_DIM / 32];
        const uint32_t blk = (uint32_t)blocks[j / bt];
#pragma unroll
        for (uint32_t t = 0; t < MASS_MAX_DIM / 32; t++)
            kr[t] = t < per && lane + 32 * t < d ? kern__cuda_kv_elem(k, kvq, false, blk, n_kv, g,
                                                                      bt, d, j % bt, lane + 32 * t)
                                                 : 0.0f;
        for (uint32_t hh = 0; hh < G; hh++) {
            float s = 0.0f;
#pragma unroll
            for (uint32_t t = 0; t < MASS_MAX_DIM / 32; t++)
                if (t < per && lane + 32 * t < d)
                    s += qs[hh * d + lane + 32 * t] * kr[t];
            s = kern__cuda_warp_sum(s);
            if (lane == 0)
                S[((size_t)rr * n_heads + (size_t)g * G + hh) * n_keys + j] =
                    j < lim ? s * scale : -INFINITY;
        }
    }
}

/* One block per (row, head) of the chunk: S's row becomes its softmax
 * (masked keys, -inf, become 0). */
static __global__ void
mass_softmax_kernel(float *S, uint32_t n_keys)
{
    __shared__ float red[32];
    float *s = S + (size_t)blockIdx.x * n_keys;
    float mx = -INFINITY;
    for (uint32_t j = threadIdx.x; j < n_keys; j += blockDim.x)
        mx = fmaxf(mx, s[j]);
    mx = kern__cuda_block_max(mx, red);
    /* Each thread writes back the very keys it read. */
    float sum = 0.0f;
    for (uint32_t j = threadIdx.x; j < n_keys; j += blockDim.x) {
        const float e = s[j] == -INFINITY ? 0.0f : __expf(s[j] - mx);
        s[j] = e;
        sum += e;
    }
    sum = kern__cuda_block_sum(sum, red);
    const float inv = 1.0f / sum;
    for (uint32_t j = threadIdx.x; j < n_keys; j += blockDim.x)
        s[j] *= inv;
}

/* KERN_MASS_SUM: out[g][j] (+)= the chunk's probabilities of key j over
 * its rows and g's heads, rows in order, so the sum is deterministic. */
static __global__ void
mass_sum_kernel(const float *P, uint32_t rows, uint32_t n_heads, uint32_t G, uint32_t n_keys,
                uint32_t n_kv, uint32_t n_out, bool first, float *out)
{
    const size_t count = (size_t)n_kv * n_out;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < count;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t g = t / n_out, j = t % n_out;
        float acc = first ? 0.0f : out[t];
        for (uint32_t rr = 0; rr < rows; rr++)
            for (uint32_t hh = 0; hh < G; hh++)
                acc += P[((size_t)rr * n_heads + g * G + hh) * n_keys + j];
        out[t] = acc;
    }
}

#define MASS_POOL_RUN 256 /* outputs one thread slides its window over */

/* KERN_MASS_POOL_MAX: a thread per (row, head, run of MASS_POOL_RUN keys)
 * sums its first window, then slides it; the mean goes into out[row][j]
 * by atomicMax on the bits, which orders non-negative floats as integers
 * (out starts at 0, below every mean; max is order-free). */
static __global__ void
mass_pool_kernel(const float *P, uint32_t rows, uint32_t r0, uint32_t n_heads, uint32_t n_keys,
                 uint32_t pool, float *out)
{
    const uint32_t runs = (n_keys + MASS_POOL_RUN - 1) / MASS_POOL_RUN, half = pool / 2;
    const size_t count = (size_t)rows * n_heads * runs;
    for (size_t t = (size_t)blockIdx.x * blockDim.x + threadIdx.x; t < count;
         t += (size_t)gridDim.x * blockDim.x) {
        const size_t rh = t / runs;
        const uint32_t j0 = (uint32_t)(t % runs) * MASS_POOL_RUN, rr = (uint32_t)(rh / n_heads);
        const float *p = P + rh * n_keys;
        const uint32_t j1 = j0 + MASS_POOL_RUN < n_keys ? j0 + MASS_POOL_RUN : n_keys;
        double win = 0.0;
        const uint32_t lo = j0 > half ? j0 - half : 0;
        const uint32_t hi = j0 + half + 1 < n_keys ? j0 + half + 1 : n_keys;
        for (uint32_t i = lo; i < hi; i++)
            win += p[i];
        unsigned *o = (unsigned *)(out + (size_t)(r0 + rr) * n_keys);
        for (uint32_t j = j0; j < j1; j++) {
            if (j > j0) {
                if (j + half < n_keys)
                    win += p[j + half];
                if (j > half)
                    win -= p[j - half - 1];
            }
            float mean = (float)(win / pool);
            atomicMax(o + j, __float_as_uint(mean > 0.0f ? mean : 0.0f));
        }
    }
}

void
kern__cuda_attn_mass_reserve(const kern_reserve_t *r, size_t *p_bytes, size_t *out_bytes)
{
    /* Four rows of the main model's heads, and the outputs of SnapKV (one
     * row per KV head) or of the default eight look-ahead queries. */
    *p_bytes = (size_t)4 * r->n_heads * r->max_ctx * sizeof(float);
    *out_bytes = (size_t)(r->n_kv_heads > 8 ? r->n_kv_heads : 8) * r->max_ctx * sizeof(float);
}

int
kern__cuda_attn_mass(kern_cuda_t *be, const kern_attn_mass_args_t *a)
{
    const kern_kv_t *kv = a->kv;
    const uint32_t N = a->n_keys, H = a->n_heads, n_kv = kv->n_kv_heads, G = H / n_kv;
    const uint32_t d = kv->head_dim, n_used = (N + kv->block_tokens - 1) / kv->block_tokens;
    if (d > MASS_MAX_DIM || (size_t)G * d * sizeof(float) > 48 * 1024 || n_kv > 65535) {
        KVS_ERRORF("cuda: attn_mass: head_dim %u with %u heads a KV head is not supported", d, G);
        return KVS_ENOTSUP;
    }
    /* Staged: the block ids, then q from a 16-byte boundary. */
    const size_t q_off = ((size_t)n_used * sizeof(int32_t) + 15) & ~(size_t)15;
    const size_t q_bytes = (size_t)a->n_q * H * d * sizeof(float), bytes = q_off + q_bytes;
    void *h, *dev;
    int rc = kern__cuda_stage_begin(be, bytes, &h);
    if (rc)
        return rc;
    memcpy(h, a->blocks, (size_t)n_used * sizeof(int32_t));
    memcpy((char *)h + q_off, a->q, q_bytes);
    if ((rc = kern__cuda_stage_end(be, bytes, &dev)) != 0)
        return rc;
    const int32_t *blocks = (const int32_t *)dev;
    const float *q = (const float *)((const char *)dev + q_off);

    const bool sum = a->mode == KERN_MASS_SUM;
    const size_t out_n = sum ? (size_t)n_kv * a->n_out : (size_t)a->n_q * N;
    void *pw, *ow;
    if ((rc = kern__cuda_workspace(be, KERN_CUDA_WS_MASS_OUT, out_n * sizeof(float), &ow)) != 0)
        return rc;
    /* As many rows a chunk as the workspace holds, at least one. */
    const size_t row_n = (size_t)H * N;
    size_t have = be->ws_bytes[KERN_CUDA_WS_MASS_P] / sizeof(float) / row_n;
    if (have > 65535) /* rows are the grid's y */
        have = 65535;
    uint32_t chunk = have < 1 ? 1 : have > a->n_q ? a->n_q : (uint32_t)have;
    if ((rc = kern__cuda_workspace(be, KERN_CUDA_WS_MASS_P, chunk * row_n * sizeof(float), &pw)) !=
        0)
        return rc;
    float *P = (float *)pw, *out = (float *)ow;
    if (!sum)
        KERN_CUDA_TRY(cudaMemsetAsync(out, 0, out_n * sizeof(float), be->stream));

    const char *k = (const char *)kv->k + (size_t)a->layer * kv->layer_bytes;
    const kern_cuda_kvq_t kvq = kern__cuda_kvq(kv, a->layer);
    const uint32_t lim0 = a->causal ? N - a->n_q + 1 : N;
    const size_t smem = (size_t)G * d * sizeof(float);
    for (uint32_t r0 = 0; r0 < a->n_q; r0 += chunk) {
        const uint32_t rows = a->n_q - r0 < chunk ? a->n_q - r0 : chunk;
        const dim3 grid((N + MASS_KEYS - 1) / MASS_KEYS, rows, n_kv);
        if (kv->dtype == KERN_F16)
            mass_logits_kernel<__half><<<grid, MASS_WARPS * 32, smem, be->stream>>>(
                (const __half *)k, kvq, n_kv, kv->block_tokens, d, blocks, q, H, G, r0, N, lim0,
                a->scale, P);
        else
            mass_logits_kernel<float><<<grid, MASS_WARPS * 32, smem, be->stream>>>(
                (const float *)k, kvq, n_kv, kv->block_tokens, d, blocks, q, H, G, r0, N, lim0,
                a->scale, P);
        KERN_CUDA_LAUNCHED();
        mass_softmax_kernel<<<rows * H, 256, 0, be->stream>>>(P, N);
        KERN_CUDA_LAUNCHED();
        if (sum) {
            mass_sum_kernel<<<kern__cuda_grid(be, out_n, 256), 256, 0, be->stream>>>(
                P, rows, H, G, N, n_kv, a->n_out, r0 == 0, out);
        } else {
            const size_t runs = (size_t)rows * H * ((N + MASS_POOL_RUN - 1) / MASS_POOL_RUN);
            mass_pool_kernel<<<kern__cuda_grid(be, runs, 128), 128, 0, be->stream>>>(
                P, rows, r0, H, N, a->pool, out);
        }
        KERN_CUDA_LAUNCHED();
    }
    KERN_CUDA_TRY(
        cudaMemcpyAsync(a->out, out, out_n * sizeof(float), cudaMemcpyDeviceToHost, be->stream));
    KERN_CUDA_TRY(cudaStreamSynchronize(be->stream));
    return 0;
}
