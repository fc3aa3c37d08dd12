/*
 * kernels/cuda/cuda_attn.cu — kern__cuda_attention: attention over the
 * paged KV store (F32 or F16) for any mix of prefill and decode rows, with
 * an online ("flash") softmax in f32.  Called by the attention wrapper in
 * kern_cuda.cu after kern.c validated the page table.
 *
 *   grid  (query row i, kv head g, split z)
 *   block one warp per query head of g's GQA group (at most 8 warps; a
 *         warp takes several heads when the group is larger)
 *   warp  walks tokens lo..hi-1 of row i's sequence through the page
 *         table, 4 tokens per step: lanes hold head_dim/32 dims of q and
 *         of the output accumulator, dot products finish with shuffles
 *
 *   split-KV: when rows x kv heads would not fill the device (decode at
 *   long context), each row's tokens are cut into n_splits ranges; every
 *   split writes (m, l, acc) to a workspace and attn_combine_kernel merges
 *   them.  With one split the kernel writes `out` directly.
 *
 * Scores live in the log2 domain (q is pre-scaled by scale * log2(e)) so
 * the softmax uses exp2f.  head_dim up to 256 (8 dims per lane); larger
 * answers KVS_ENOTSUP.  All query heads of a group read the same K/V rows,
 * so the group's warps share them through L1.
 *
 * NOTE: prefill rows each stream their whole prefix from L2; a query-tiled
 * kernel that reuses K/V across rows of one sequence is the next step.
 */
#include "cuda_common.cuh"

#include <math.h>

#define ATTN_MAX_D 256
#define ATTN_DPL (ATTN_MAX_D / 32) /* dims per lane */
#define ATTN_TOK 4                 /* tokens per step */
#define ATTN_MAX_WARPS 8
#define ATTN_MAX_SPLITS 64
#define ATTN_MIN_SPLIT_TOKENS 256 /* splitting shorter ranges costs more than it gains */

typedef struct attn_params {
    const float *q;
    float *out;
    float *part_acc;        /* [n_q][n_heads][n_splits][head_dim], n_splits > 1 */
    float *part_ml;         /* [n_q][n_heads][n_splits][2]: max (log2), sum */
    const int32_t *row_blk; /* [n_q] start of the row's block ids in `blocks` */
    const int32_t *row_len; /* [n_q] kv_len */
    const int32_t *blocks;  /* page table indices */
    const void *k;          /* the layer's K */
    const void *v;
    uint32_t n_heads, n_kv_heads, group, head_dim, block_tokens;
    uint32_t n_splits, split_tokens;
    float qscale; /* scale * log2(e) */
} attn_params_t;

static __device__ __forceinline__ float
kv_load(const float *p)
{
    return *p;
}

static __device__ __forceinline__ float
kv_load(const __half *p)
{
    return __half2float(*p);
}

template <typename T>
static __global__ void
__launch_bounds__(ATTN_MAX_WARPS * 32) attn_kernel(attn_params_t p)
{
    uint32_t i = blockIdx.x, g = blockIdx.y, z = blockIdx.z;
    uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    uint32_t d = p.head_dim, bt = p.block_tokens;
    uint32_t len = (uint32_t)p.row_len[i];
    uint32_t lo = z * p.split_tokens;
    uint32_t hi = lo < len ? umin(len, lo + p.split_tokens) : lo; /* lo == hi: empty */
    const int32_t *blocks = p.blocks + p.row_blk[i];
    const T *kl = (const T *)p.k, *vl = (const T *)p.v;

    for (uint32_t hh = warp; hh < p.group; hh += n_warps) {
        uint32_t h = g * p.group + hh;
        size_t qo = ((size_t)i * p.n_heads + h) * d;
        float q[ATTN_DPL], acc[ATTN_DPL];
#pragma unroll
        for (int k = 0; k < ATTN_DPL; k++) {
            uint32_t c = lane + 32 * k;
            q[k] = c < d ? p.q[qo + c] * p.qscale : 0.0f;
            acc[k] = 0.0f;
        }
        float m = -INFINITY, l = 0.0f;

        for (uint32_t j = lo; j < hi;) {
            /* The run of tokens that sits in one block. */
            uint32_t off = j % bt;
            uint32_t run = bt - off < hi - j ? bt - off : hi - j;
            size_t base = (((size_t)blocks[j / bt] * p.n_kv_heads + g) * bt + off) * d;
            const T *kp = kl + base, *vp = vl + base;
            for (uint32_t t = 0; t < run; t += ATTN_TOK) {
                uint32_t nt = run - t < ATTN_TOK ? run - t : ATTN_TOK;
                float s[ATTN_TOK];
#pragma unroll
                for (int u = 0; u < ATTN_TOK; u++) {
                    s[u] = 0.0f;
                    if ((uint32_t)u < nt) {
                        const T *kr = kp + (size_t)(t + u) * d;
#pragma unroll
                        for (int k = 0; k < ATTN_DPL; k++) {
                            uint32_t c = lane + 32 * k;
                            if (c < d)
                                s[u] += q[k] * kv_load(kr + c);
                        }
                    }
                }
                /* Four sums at once: independent shuffles overlap. */
#pragma unroll
                for (int o = 16; o > 0; o >>= 1)
#pragma unroll
                    for (int u = 0; u < ATTN_TOK; u++)
                        s[u] += __shfl_xor_sync(0xffffffffu, s[u], o);
                float mx = m;
#pragma unroll
                for (int u = 0; u < ATTN_TOK; u++)
                    if ((uint32_t)u < nt)
                        mx = fmaxf(mx, s[u]);
                /* mx is finite (nt >= 1), so a first step gives corr = 0. */
                float corr = exp2f(m - mx), pu[ATTN_TOK];
                l *= corr;
#pragma unroll
                for (int u = 0; u < ATTN_TOK; u++) {
                    pu[u] = (uint32_t)u < nt ? exp2f(s[u] - mx) : 0.0f;
                    l += pu[u];
                }
#pragma unroll
                for (int k = 0; k < ATTN_DPL; k++) {
                    uint32_t c = lane + 32 * k;
                    if (c < d) {
                        float a = acc[k] * corr;
#pragma unroll
                        for (int u = 0; u < ATTN_TOK; u++)
                            if ((uint32_t)u < nt)
                                a += pu[u] * kv_load(vp + (size_t)(t + u) * d + c);
                        acc[k] = a;
                    }
                }
                m = mx;
            }
            j += run;
        }

        if (p.n_splits == 1) {
            /* len >= 1 (kern.c), so l > 0. */
            float inv = 1.0f / l;
#pragma unroll
            for (int k = 0; k < ATTN_DPL; k++) {
                uint32_t c = lane + 32 * k;
                if (c < d)
                    p.out[qo + c] = acc[k] * inv;
            }
        } else {
            /* An empty split (lo >= len) leaves m = -inf, l = 0. */
            size_t po = ((size_t)i * p.n_heads + h) * p.n_splits + z;
#pragma unroll
            for (int k = 0; k < ATTN_DPL; k++) {
                uint32_t c = lane + 32 * k;
                if (c < d)
                    p.part_acc[po * d + c] = acc[k];
            }
            if (lane == 0) {
                p.part_ml[2 * po] = m;
                p.part_ml[2 * po + 1] = l;
            }
        }
    }
}

/* One block per (row, head): weights 2^(m_z - M) for the non-empty splits,
 * then out = sum_z w_z acc_z / sum_z w_z l_z. */
static __global__ void
attn_combine_kernel(const float *part_acc, const float *part_ml, uint32_t n_rh, uint32_t n_splits,
                    uint32_t d, float *out)
{
    __shared__ float wz[ATTN_MAX_SPLITS];
    __shared__ float inv_den;
    for (uint32_t rh = blockIdx.x; rh < n_rh; rh += gridDim.x) {
        const float *ml = part_ml + (size_t)rh * n_splits * 2;
        __syncthreads(); /* the previous (row, head) is done with wz */
        if (threadIdx.x == 0) {
            float mx = -INFINITY;
            for (uint32_t z = 0; z < n_splits; z++)
                if (ml[2 * z + 1] > 0.0f)
                    mx = fmaxf(mx, ml[2 * z]);
            float den = 0.0f;
            for (uint32_t z = 0; z < n_splits; z++) {
                wz[z] = ml[2 * z + 1] > 0.0f ? exp2f(ml[2 * z] - mx) : 0.0f;
                den += wz[z] * ml[2 * z + 1];
            }
            inv_den = 1.0f / den; /* some split holds token 0, so den > 0 */
        }
        __syncthreads();
        const float *acc = part_acc + (size_t)rh * n_splits * d;
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
            float num = 0.0f;
            for (uint32_t z = 0; z < n_splits; z++)
                if (wz[z] != 0.0f)
                    num += wz[z] * acc[(size_t)z * d + c];
            out[(size_t)rh * d + c] = num * inv_den;
        }
    }
}

int
kern__cuda_attention(kern_cuda_t *be, const kern_attn_args_t *a)
{
    const kern_kv_t *kv = a->kv;
    uint32_t d = kv->head_dim, n_q = a->n_q, group = a->n_heads / kv->n_kv_heads;
    if (d > ATTN_MAX_D) {
        KVS_ERRORF("cuda: attention: head_dim %u > %d is not supported", d, ATTN_MAX_D);
        return KVS_ENOTSUP;
    }
    if (a->window_tokens > 0 || a->block_mask != NULL) {
        /* Not implemented here; running dense would silently change the
         * result, so callers get to fall back (ref/cpu honour it). */
        KVS_ERRORF("cuda: attention: sparse key patterns are not supported");
        return KVS_ENOTSUP;
    }
    if (kv->n_kv_heads > 65535) {
        KVS_ERRORF("cuda: attention: %u kv heads exceed the grid limit", kv->n_kv_heads);
        return KVS_ENOTSUP;
    }

    /* Staged: per row, where its sequence's block ids start and its
     * kv_len; then the block ids themselves. */
    uint32_t n_idx = (uint32_t)a->pt.indptr[a->pt.n_seqs];
    size_t bytes = ((size_t)2 * n_q + n_idx) * sizeof(int32_t);
    void *h, *dev;
    int rc = kern__cuda_stage_begin(be, bytes, &h);
    if (rc)
        return rc;
    int32_t *row_blk = (int32_t *)h, *row_len = row_blk + n_q, *idx = row_len + n_q;
    int32_t max_len = 0;
    for (uint32_t s = 0; s < a->pt.n_seqs; s++) {
        for (int32_t r = a->q_indptr[s]; r < a->q_indptr[s + 1]; r++) {
            row_blk[r] = a->pt.indptr[s];
            row_len[r] = a->kv_len[r];
            if (a->kv_len[r] > max_len)
                max_len = a->kv_len[r];
        }
    }
    if (n_idx)
        memcpy(idx, a->pt.indices, (size_t)n_idx * sizeof(int32_t));
    if ((rc = kern__cuda_stage_end(be, bytes, &dev)) != 0)
        return rc;

    /* Split the KV range only when the grid would leave SMs idle, and never
     * into ranges too short to pay for the combine pass. */
    uint32_t n_splits = 1;
    size_t base_blocks = (size_t)n_q * kv->n_kv_heads;
    size_t want = (size_t)2 * (be->n_sm > 0 ? be->n_sm : 1);
    if (base_blocks < want) {
        size_t s = (want + base_blocks - 1) / base_blocks;
        size_t by_len = (size_t)max_len / ATTN_MIN_SPLIT_TOKENS;
        if (s > by_len)
            s = by_len;
        if (s > ATTN_MAX_SPLITS)
            s = ATTN_MAX_SPLITS;
        if (s > 1)
            n_splits = (uint32_t)s;
    }
    /* Whole steps of ATTN_TOK per split keep the inner loop full. */
    uint32_t split_tokens = ((uint32_t)max_len + n_splits - 1) / n_splits;
    split_tokens = (split_tokens + ATTN_TOK - 1) / ATTN_TOK * ATTN_TOK;
    n_splits = ((uint32_t)max_len + split_tokens - 1) / split_tokens;

    attn_params_t p;
    p.q = a->q;
    p.out = a->out;
    p.part_acc = NULL;
    p.part_ml = NULL;
    p.row_blk = (const int32_t *)dev;
    p.row_len = p.row_blk + n_q;
    p.blocks = p.row_len + n_q;
    p.k = (const char *)kv->k + (size_t)a->layer * kv->layer_bytes;
    p.v = (const char *)kv->v + (size_t)a->layer * kv->layer_bytes;
    p.n_heads = a->n_heads;
    p.n_kv_heads = kv->n_kv_heads;
    p.group = group;
    p.head_dim = d;
    p.block_tokens = kv->block_tokens;
    p.n_splits = n_splits;
    p.split_tokens = split_tokens;
    p.qscale = a->scale * 1.4426950408889634f; /* log2(e) */

    size_t n_rh = (size_t)n_q * a->n_heads;
    if (n_splits > 1) {
        size_t parts = n_rh * n_splits;
        void *ws;
        rc = kern__cuda_workspace(be, KERN_CUDA_WS_ATTN, parts * ((size_t)d + 2) * sizeof(float),
                                  &ws);
        if (rc)
            return rc;
        p.part_acc = (float *)ws;
        p.part_ml = p.part_acc + parts * d;
    }

    dim3 grid(n_q, kv->n_kv_heads, n_splits);
    unsigned warps = group < ATTN_MAX_WARPS ? group : ATTN_MAX_WARPS;
    if (kv->dtype == KERN_F16)
        attn_kernel<__half><<<grid, warps * 32, 0, be->stream>>>(p);
    else
        attn_kernel<float><<<grid, warps * 32, 0, be->stream>>>(p);
    KERN_CUDA_LAUNCHED();

    if (n_splits > 1) {
        attn_combine_kernel<<<kern__cuda_grid(be, n_rh, 1), 128, 0, be->stream>>>(
            p.part_acc, p.part_ml, (uint32_t)n_rh, n_splits, d, a->out);
        KERN_CUDA_LAUNCHED();
    }
    return 0;
}
