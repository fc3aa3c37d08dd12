/*
 * kernels/cuda/cuda_attn.cu — kern__cuda_attention: attention over the
 * paged KV store (F32 or F16) for any mix of prefill and decode rows, with
 * an online ("flash") softmax in f32 and kern.h's sparse key pattern.
 * Called by the attention wrapper in kern_cuda.cu after kern.c validated
 * the page table and the pattern.
 *
 * Three kernels share one staged buffer (per row: kv_len, window start,
 * sequence offset; the block ids; the block mask):
 *   - sequences with more than one query row, F16 KV (hot blocks, in a
 *     codec pool) and head_dim 64 or 128 go to the tensor-core kernel of
 *     cuda_attn_tc.cuh (mma.sync, or wgmma on Hopper) in tiles of
 *     consecutive rows;
 *   - the other rows, when the call has no block mask (plain decode, or
 *     sinks + a window), to dec_kernel below, which splits keys rather
 *     than heads over its warps;
 *   - the other rows of a call with a block mask to attn_kernel:
 *
 *   grid  (row of the list, kv head g, split z)
 *   block one warp per query head of g's GQA group (at most 8 warps; a
 *         warp takes several heads when the group is larger)
 *   warp  walks tokens lo..hi-1 of the row's sequence through the page
 *         table, 4 tokens per step: lanes hold head_dim/32 dims of q and
 *         of the output accumulator, dot products finish with shuffles
 *
 *   split-KV: when rows x kv heads would not fill the device (decode at
 *   long context), each row's tokens are cut into n_splits ranges; every
 *   split writes (m, l, acc) to a workspace and attn_combine_kernel merges
 *   them.  With one split the kernel writes `out` directly.
 *
 * Sparse patterns: the warp walks runs of keys the row sees, each inside
 * one block: a block the mask keeps, the sinks, the window.  Blocks
 * outside all three are stepped over without reading K or V, so the cost
 * is O(kept keys).  Its splits cut [0, kv_len) evenly, so under a block
 * mask most splits of a long row may find nothing (they merge as empty);
 * dec_kernel, which takes every call without a mask, splits the keys a row
 * sees instead.
 *
 * Quantized blocks (a pool with a codec) are read value by value through
 * cuda_kvq.cuh, decoding exactly as the host backends do; hot blocks keep
 * the plain loads.
 *
 * Scores live in the log2 domain (q is pre-scaled by scale * log2(e)) so
 * the softmax uses exp2f.  head_dim up to 256 (8 dims per lane); larger
 * answers KVS_ENOTSUP.  All query heads of a group read the same K/V rows,
 * so the group's warps share them through L1.
 */
#include "cuda_kvq.cuh"

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
    float *part_acc;        /* [n_rows][n_heads][n_splits][head_dim], n_splits > 1 */
    float *part_ml;         /* [n_rows][n_heads][n_splits][2]: max (log2), sum */
    const int32_t *rows;    /* [n_rows] the query rows this kernel computes */
    const int32_t *row_blk; /* [n_q] start of the row's block ids in `blocks` */
    const int32_t *row_len; /* [n_q] kv_len */
    const int32_t *row_lo;  /* [n_q] -1: dense; else the window's first key (kv_len: none) */
    const int32_t *blocks;  /* page table indices */
    const uint8_t *mask;    /* NULL or mask rows, mask_stride bytes apart, mask_heads a group */
    const void *k;          /* the layer's K */
    const void *v;
    kern_cuda_kvq_t kvq; /* the layer's quantized blocks, if the pool has a codec */
    uint32_t n_heads, n_kv_heads, group, head_dim, block_tokens;
    uint32_t sinks, mask_stride, mask_q_block, mask_heads;
    uint32_t n_splits, split_tokens;
    float qscale; /* scale * log2(e) */
} attn_params_t;

template <typename T>
static __global__ void
__launch_bounds__(ATTN_MAX_WARPS * 32) attn_kernel(attn_params_t p)
{
    uint32_t x = blockIdx.x, i = (uint32_t)p.rows[x], g = blockIdx.y, z = blockIdx.z;
    uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    uint32_t d = p.head_dim, bt = p.block_tokens;
    uint32_t len = (uint32_t)p.row_len[i];
    uint32_t lo = z * p.split_tokens;
    uint32_t hi = lo < len ? umin(len, lo + p.split_tokens) : lo; /* lo == hi: empty */
    const int32_t *blocks = p.blocks + p.row_blk[i];
    const T *kl = (const T *)p.k, *vl = (const T *)p.v;
    /* The pattern: wlo < 0 for a dense row; else keys j < sinks, j >=
     * wlo, or in a block its mask row keeps. */
    int32_t wlo = p.row_lo[i];
    const uint8_t *mrow =
        p.mask && wlo >= 0
            ? p.mask + ((size_t)(i / p.mask_q_block) * p.mask_heads + (p.mask_heads > 1 ? g : 0)) *
                           p.mask_stride
            : NULL;

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
            /* The run of tokens the row sees that sits in one block. */
            uint32_t off = j % bt;
            uint32_t end = bt - off < hi - j ? j + (bt - off) : hi;
            if (wlo >= 0 && !(mrow && mrow[j / bt])) {
                if (j < p.sinks) {
                    end = umin(end, p.sinks);
                } else if (j < (uint32_t)wlo) {
                    /* Between the sinks and the window: on to the window
                     * or the next block, whichever comes first. */
                    j = umin(j + (bt - off), (uint32_t)wlo);
                    continue;
                }
            }
            uint32_t run = end - j, blk = (uint32_t)blocks[j / bt];
            /* A quantized block (a uniform branch: the run is one block)
             * decodes value by value; kp, vp stay on the full-precision
             * layout's address for a hot one. */
            const bool cold = blk >= p.kvq.n_hot;
            const uint8_t *kt =
                cold ? kern__cuda_kvq_tile(p.kvq, false, blk, p.n_kv_heads, g) : NULL;
            const uint8_t *vt =
                cold ? kern__cuda_kvq_tile(p.kvq, true, blk, p.n_kv_heads, g) : NULL;
            size_t base = cold ? 0 : (((size_t)blk * p.n_kv_heads + g) * bt + off) * d;
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
                                s[u] += q[k] * (cold ? kern__kvq_elem(p.kvq.quant, false, kt, bt, d,
                                                                      off + t + u, c)
                                                     : kern__cuda_kv_load(kr + c));
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
                                a += pu[u] *
                                     (cold ? kern__kvq_elem(p.kvq.quant, true, vt, bt, d,
                                                            off + t + u, c)
                                           : kern__cuda_kv_load(vp + (size_t)(t + u) * d + c));
                        acc[k] = a;
                    }
                }
                m = mx;
            }
            j += run;
        }

        if (p.n_splits == 1) {
            /* kern.c leaves every row at least one key, so l > 0. */
            float inv = 1.0f / l;
#pragma unroll
            for (int k = 0; k < ATTN_DPL; k++) {
                uint32_t c = lane + 32 * k;
                if (c < d)
                    p.out[qo + c] = acc[k] * inv;
            }
        } else {
            /* A split with no key the row sees leaves m = -inf, l = 0. */
            size_t po = ((size_t)x * p.n_heads + h) * p.n_splits + z;
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

/* ---- dense decode: every warp its own keys -------------------------------
 *
 * attn_kernel gives each warp one query head, so a block's warps read the
 * same K and V rows and a block keeps about a kilobyte of loads in flight:
 * at batch 1 that leaves the memory system mostly idle.  Rows of calls
 * without a block mask (plain decode, or sinks + a window) run here
 * instead:
 *
 *   grid  (row of the list, kv head g, split z), as attn_kernel
 *   block DEC_WARPS warps; warp w takes keys lo + w*TK, then every
 *         DEC_WARPS*TK further, TK at a time, all loaded before any is
 *         used (TK rows of K and of V in registers)
 *   warp  the group's heads in chunks of HB: each key row loaded once
 *         serves HB heads; lanes hold DPL consecutive dims of q, of the
 *         accumulators and of each loaded row
 *   end   the warps' (m, l, acc) merge through shared memory into `out`,
 *         or into the split's partials for attn_combine_kernel
 *
 * Keys run across block boundaries, each looked up in the page table on
 * its own; quantized blocks decode value by value as in attn_kernel.
 *
 * Splits and warps count the keys a row sees, not positions: with sinks +
 * a window, key k < s is position k (the s = min(sinks, window start)
 * sinks) and later ones are the window's, position wlo + k - s; a dense
 * row is s = kv_len, every position itself.  So a long row under a window
 * spreads its few keys over every split rather than leaving most of them
 * empty. */
#define DEC_WARPS 4
#define DEC_MAX_PER_SM 4 /* the split plan's target: one wave of resident blocks, at most this */

/* Two values at an even index as f32. */
static __device__ __forceinline__ float2
dec_pair(const __half *p)
{
    return __half22float2(*(const __half2 *)p);
}

static __device__ __forceinline__ float2
dec_pair(const float *p)
{
    return *(const float2 *)p;
}

/* DPL consecutive values from p (dims c0.., c0 < d) as f32; `vec` (host:
 * aligned base, d % DPL == 0) reads pairs at a time. */
template <int DPL, typename T>
static __device__ __forceinline__ void
dec_load(const T *p, bool vec, uint32_t c0, uint32_t d, float *x)
{
    if (vec) {
#pragma unroll
        for (int e = 0; e < DPL; e += 2) {
            float2 f = dec_pair(p + e);
            x[e] = f.x;
            x[e + 1] = f.y;
        }
        return;
    }
#pragma unroll
    for (int e = 0; e < DPL; e++)
        x[e] = c0 + e < d ? kern__cuda_kv_load(p + e) : 0.0f;
}

/* Keys a warp holds at once: as many as registers allow next to HB heads'
 * q and accumulators. */
#define DEC_TK(DPL, HB) ((DPL) * (HB) <= 16 ? 8 : (DPL) * (HB) <= 32 ? 4 : 2)

template <typename T, int DPL, int HB>
static __global__ void
__launch_bounds__(DEC_WARPS * 32) dec_kernel(attn_params_t p, bool vec)
{
    constexpr int TK = DEC_TK(DPL, HB);
    extern __shared__ float dec_smem[]; /* acc [DEC_WARPS][HB][d], m and l [DEC_WARPS][HB] */
    const uint32_t x = blockIdx.x, i = (uint32_t)p.rows[x], g = blockIdx.y, z = blockIdx.z;
    const uint32_t lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const uint32_t d = p.head_dim, bt = p.block_tokens, c0 = lane * DPL;
    const bool on = c0 < d; /* lanes past the head hold zeros */
    const uint32_t len = (uint32_t)p.row_len[i];
    /* The keys the row sees: s sinks, then the window from wlo. */
    const int32_t wlo = p.row_lo[i];
    const uint32_t n_sink = wlo < 0 ? len : umin(p.sinks, (uint32_t)wlo);
    const uint32_t n_vis = wlo < 0 ? len : n_sink + (len - (uint32_t)wlo);
    const uint32_t lo = z * p.split_tokens;
    const uint32_t hi = lo < n_vis ? umin(n_vis, lo + p.split_tokens) : lo; /* lo == hi: empty */
    const int32_t *blocks = p.blocks + p.row_blk[i];
    const T *kl = (const T *)p.k, *vl = (const T *)p.v;
    float *s_acc = dec_smem, *s_m = s_acc + (size_t)DEC_WARPS * HB * d, *s_l = s_m + DEC_WARPS * HB;

    for (uint32_t h0 = 0; h0 < p.group; h0 += HB) {
        float q[HB][DPL], acc[HB][DPL], m[HB], l[HB];
#pragma unroll
        for (int hb = 0; hb < HB; hb++) {
            const bool hv = h0 + hb < p.group;
            const size_t qo = ((size_t)i * p.n_heads + g * p.group + h0 + hb) * d + c0;
#pragma unroll
            for (int e = 0; e < DPL; e++) {
                q[hb][e] = hv && c0 + e < d ? p.q[qo + e] * p.qscale : 0.0f;
                acc[hb][e] = 0.0f;
            }
            m[hb] = -INFINITY;
            l[hb] = 0.0f;
        }

        for (uint32_t j0 = lo + warp * TK; j0 < hi; j0 += DEC_WARPS * TK) {
            float kr[TK][DPL], vr[TK][DPL];
#pragma unroll
            for (int u = 0; u < TK; u++) {
                const uint32_t j = j0 + u;
#pragma unroll
                for (int e = 0; e < DPL; e++)
                    kr[u][e] = vr[u][e] = 0.0f;
                if (j >= hi || !on)
                    continue;
                const uint32_t pos = j < n_sink ? j : (uint32_t)wlo + (j - n_sink);
                const uint32_t blk = (uint32_t)blocks[pos / bt], off = pos % bt;
                if (blk >= p.kvq.n_hot) {
                    const uint8_t *kt = kern__cuda_kvq_tile(p.kvq, false, blk, p.n_kv_heads, g);
                    const uint8_t *vt = kern__cuda_kvq_tile(p.kvq, true, blk, p.n_kv_heads, g);
#pragma unroll
                    for (int e = 0; e < DPL; e++) {
                        if (c0 + e < d) {
                            kr[u][e] = kern__kvq_elem(p.kvq.quant, false, kt, bt, d, off, c0 + e);
                            vr[u][e] = kern__kvq_elem(p.kvq.quant, true, vt, bt, d, off, c0 + e);
                        }
                    }
                } else {
                    const size_t base = (((size_t)blk * p.n_kv_heads + g) * bt + off) * d + c0;
                    dec_load<DPL>(kl + base, vec, c0, d, kr[u]);
                    dec_load<DPL>(vl + base, vec, c0, d, vr[u]);
                }
            }
            float s[TK][HB];
#pragma unroll
            for (int u = 0; u < TK; u++)
#pragma unroll
                for (int hb = 0; hb < HB; hb++) {
                    float a = 0.0f;
#pragma unroll
                    for (int e = 0; e < DPL; e++)
                        a += q[hb][e] * kr[u][e];
                    s[u][hb] = a;
                }
                /* Every lane ends with the same sums (each step adds the same
                 * two partial sums, in either order). */
#pragma unroll
            for (int o = 16; o > 0; o >>= 1)
#pragma unroll
                for (int u = 0; u < TK; u++)
#pragma unroll
                    for (int hb = 0; hb < HB; hb++)
                        s[u][hb] += __shfl_xor_sync(0xffffffffu, s[u][hb], o);
#pragma unroll
            for (int hb = 0; hb < HB; hb++) {
                float mx = m[hb];
#pragma unroll
                for (int u = 0; u < TK; u++)
                    if (j0 + u < hi)
                        mx = fmaxf(mx, s[u][hb]);
                /* mx is finite (key j0 < hi), so a first step gives corr = 0. */
                const float corr = exp2f(m[hb] - mx);
                float pu[TK], sum = 0.0f;
#pragma unroll
                for (int u = 0; u < TK; u++) {
                    pu[u] = j0 + u < hi ? exp2f(s[u][hb] - mx) : 0.0f;
                    sum += pu[u];
                }
                l[hb] = l[hb] * corr + sum;
#pragma unroll
                for (int e = 0; e < DPL; e++) {
                    float a = acc[hb][e] * corr;
#pragma unroll
                    for (int u = 0; u < TK; u++)
                        a += pu[u] * vr[u][e];
                    acc[hb][e] = a;
                }
                m[hb] = mx;
            }
        }

        /* The warps' states into shared memory (after the previous chunk's
         * merge has read it), then one thread per (head, dim) merges. */
        __syncthreads();
#pragma unroll
        for (int hb = 0; hb < HB; hb++) {
#pragma unroll
            for (int e = 0; e < DPL; e++)
                if (c0 + e < d)
                    s_acc[((size_t)warp * HB + hb) * d + c0 + e] = acc[hb][e];
            if (lane == 0) {
                s_m[warp * HB + hb] = m[hb];
                s_l[warp * HB + hb] = l[hb];
            }
        }
        __syncthreads();
        for (uint32_t t = threadIdx.x; t < HB * d; t += blockDim.x) {
            const uint32_t hb = t / d, c = t % d;
            if (h0 + hb >= p.group)
                continue;
            /* A warp that saw no key has l = 0: it weighs nothing. */
            float M = -INFINITY;
            for (int w = 0; w < DEC_WARPS; w++)
                if (s_l[w * HB + hb] > 0.0f)
                    M = fmaxf(M, s_m[w * HB + hb]);
            float num = 0.0f, den = 0.0f;
            for (int w = 0; w < DEC_WARPS; w++) {
                const float lw = s_l[w * HB + hb];
                if (lw > 0.0f) {
                    const float f = exp2f(s_m[w * HB + hb] - M);
                    num += f * s_acc[((size_t)w * HB + hb) * d + c];
                    den += f * lw;
                }
            }
            const uint32_t h = g * p.group + h0 + hb;
            if (p.n_splits == 1) {
                /* kern.c leaves every row at least one key, so den > 0. */
                p.out[((size_t)i * p.n_heads + h) * d + c] = num / den;
            } else {
                /* A split with no key: m = -inf, l = 0, as attn_kernel's. */
                const size_t po = ((size_t)x * p.n_heads + h) * p.n_splits + z;
                p.part_acc[po * d + c] = num;
                if (c == 0) {
                    p.part_ml[2 * po] = M;
                    p.part_ml[2 * po + 1] = den;
                }
            }
        }
    }
}

typedef void (*dec_fn_t)(attn_params_t, bool);

/* dec_kernel's shared memory: the warps' acc, m and l for HB heads. */
static size_t
dec_smem_bytes(uint32_t hb, uint32_t d)
{
    return ((size_t)DEC_WARPS * hb * d + 2 * DEC_WARPS * hb) * sizeof(float);
}

/* dec_kernel's instance for head_dim's lanes (DPL) and the group (HB). */
template <typename T, int DPL>
static dec_fn_t
dec_pick_hb(uint32_t hb)
{
    return hb == 1   ? dec_kernel<T, DPL, 1>
           : hb == 2 ? dec_kernel<T, DPL, 2>
           : hb == 4 ? dec_kernel<T, DPL, 4>
                     : dec_kernel<T, DPL, 8>;
}

template <typename T>
static dec_fn_t
dec_pick(uint32_t dpl, uint32_t hb)
{
    return dpl == 2   ? dec_pick_hb<T, 2>(hb)
           : dpl == 4 ? dec_pick_hb<T, 4>(hb)
                      : dec_pick_hb<T, 8>(hb);
}

/* kern_cuda_t.dec_per_sm's entry for an instance. */
static int
dec_slot(bool f16, uint32_t dpl, uint32_t hb)
{
    return ((f16 ? 3 : 0) + (dpl == 2   ? 0
                             : dpl == 4 ? 1
                                        : 2)) *
               4 +
           (hb == 1   ? 0
            : hb == 2 ? 1
            : hb == 4 ? 2
                      : 3);
}

int
kern__cuda_attention_init(kern_cuda_t *be)
{
    static const uint32_t dpls[3] = {2, 4, 8}, hbs[4] = {1, 2, 4, 8};
    for (int f16 = 0; f16 < 2; f16++)
        for (int a = 0; a < 3; a++)
            for (int b = 0; b < 4; b++) {
                const uint32_t dpl = dpls[a], hb = hbs[b], d = 32 * dpl; /* its largest head */
                dec_fn_t fn = f16 ? dec_pick<__half>(dpl, hb) : dec_pick<float>(dpl, hb);
                int n = 0;
                KERN_CUDA_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                    &n, (const void *)fn, DEC_WARPS * 32, dec_smem_bytes(hb, d)));
                be->dec_per_sm[dec_slot(f16, dpl, hb)] = n < 1                ? 1
                                                         : n > DEC_MAX_PER_SM ? DEC_MAX_PER_SM
                                                                              : n;
            }
    be->attn_tc = KERN_CUDA_TC_MMA; /* the probe's reference */
    be->attn_tc = kern__cuda_attention_wg_probe(be);
    KVS_INFOF("cuda: prefill attention on %s", be->attn_tc == KERN_CUDA_TC_WG128  ? "wgmma, M 128"
                                               : be->attn_tc == KERN_CUDA_TC_WG64 ? "wgmma, M 64"
                                                                                  : "mma.sync");
    return 0;
}

/* One block per (listed row, head): weights 2^(m_z - M) for the splits
 * that saw a key, then out = sum_z w_z acc_z / sum_z w_z l_z. */
static __global__ void
attn_combine_kernel(const float *part_acc, const float *part_ml, const int32_t *rows,
                    uint32_t n_heads, uint32_t n_rh, uint32_t n_splits, uint32_t d, float *out)
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
            inv_den = 1.0f / den; /* some split saw a key (kern.c), so den > 0 */
        }
        __syncthreads();
        const float *acc = part_acc + (size_t)rh * n_splits * d;
        float *o = out + ((size_t)rows[rh / n_heads] * n_heads + rh % n_heads) * d;
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
            float num = 0.0f;
            for (uint32_t z = 0; z < n_splits; z++)
                if (wz[z] != 0.0f)
                    num += wz[z] * acc[(size_t)z * d + c];
            o[c] = num * inv_den;
        }
    }
}

/* Whether the tensor-core kernel can take this call's prefill rows. */
static bool
tc_eligible(const kern_attn_args_t *a)
{
    const kern_kv_t *kv = a->kv;
    return kv->dtype == KERN_F16 && (kv->head_dim == 64 || kv->head_dim == 128) &&
           (uintptr_t)kv->k % 16 == 0 && (uintptr_t)kv->v % 16 == 0 && kv->layer_bytes % 16 == 0 &&
           (uintptr_t)a->q % 16 == 0 && (uintptr_t)a->out % 8 == 0;
}

void
kern__cuda_attention_reserve(const kern_cuda_t *be, const kern_reserve_t *r, size_t *ws_bytes,
                             size_t *stage_bytes, size_t *pt_bytes)
{
    /* Split-KV partials: rows are split only while rows x KV heads stay
     * below want (at most DEC_MAX_PER_SM x SMs), into at most ceil(want / that) ranges, so the
     * partials of all query heads stay under 2 x group x want. */
    size_t want = (size_t)DEC_MAX_PER_SM * (be->n_sm > 0 ? be->n_sm : 1);
    size_t group = r->n_heads / r->n_kv_heads;
    *ws_bytes = 2 * group * want * ((size_t)r->head_dim + 2) * sizeof(float);
    /* Staged ints: three per row, the row list and three per tile (each at
     * most one per row).  Block masks are not counted: the serving paths
     * choose theirs on the device (kern_block_select) and pass them
     * unstaged (mask_in_backend). */
    *stage_bytes = (size_t)7 * r->max_rows * sizeof(int32_t);
    /* The page table, every sequence's block ids: staged on its own
     * (stage_table), into KERN_CUDA_WS_PT or the arena. */
    *pt_bytes = (size_t)r->max_seqs * ((r->max_ctx + r->block_tokens - 1) / r->block_tokens) *
                sizeof(int32_t);
}

/* The block ids of a->pt on the device in *out, room entries of them:
 * uploaded unless the last call's table was this one (a->pt_epoch), in
 * its own buffer when eager, in the arena when a step is being recorded or
 * refreshed (where the pass repeats the same uploads at the same places). */
static int
stage_table(kern_cuda_t *be, const kern_attn_args_t *a, size_t room, const int32_t **out)
{
    if (a->pt_epoch && a->pt_epoch == be->pt_epoch && be->pt_mode == be->mode &&
        be->pt_room == room) {
        *out = be->pt_dev;
        return 0;
    }
    const size_t n_idx = (size_t)a->pt.indptr[a->pt.n_seqs], bytes = room * sizeof(int32_t);
    void *h, *d = NULL;
    int rc = kern__cuda_stage_begin(be, bytes, &h);
    if (rc)
        return rc;
    memcpy(h, a->pt.indices, n_idx * sizeof(int32_t));
    if (be->mode == KERN_CUDA_EAGER) {
        if ((rc = kern__cuda_workspace(be, KERN_CUDA_WS_PT, bytes, &d)) != 0 ||
            (rc = kern__cuda_stage_to(be, bytes, d)) != 0)
            return rc;
    } else if ((rc = kern__cuda_stage_end(be, bytes, &d)) != 0 && rc != KERN_CUDA_DRY_DONE) {
        return rc;
    }
    be->pt_epoch = a->pt_epoch;
    be->pt_mode = be->mode;
    be->pt_room = room;
    be->pt_dev = (const int32_t *)d;
    *out = be->pt_dev;
    return 0;
}

int
kern__cuda_attention(kern_cuda_t *be, const kern_attn_args_t *a)
{
    const kern_kv_t *kv = a->kv;
    uint32_t d = kv->head_dim, n_q = a->n_q, group = a->n_heads / kv->n_kv_heads;
    uint32_t bt = kv->block_tokens, n_seqs = a->pt.n_seqs;
    if (d > ATTN_MAX_D) {
        KVS_ERRORF("cuda: attention: head_dim %u > %d is not supported", d, ATTN_MAX_D);
        return KVS_ENOTSUP;
    }
    if (kv->n_kv_heads > 65535) {
        KVS_ERRORF("cuda: attention: %u kv heads exceed the grid limit", kv->n_kv_heads);
        return KVS_ENOTSUP;
    }
    bool patterned = a->window_tokens > 0 || a->block_mask != NULL;
    uint32_t qb = a->mask_q_block ? a->mask_q_block : 1;
    /* Per-head masks are staged as mheads rows per row group, head g's
     * at (group * mheads + g) * mstride. */
    uint32_t mheads = a->mask_head_stride ? kv->n_kv_heads : 1;

    /* Which rows go where: whole sequences of more than one row to the
     * tensor-core kernel, the rest to attn_kernel's row list. */
    bool tc = tc_eligible(a);
    const uint32_t tc_m = kern__cuda_tc_m(be->attn_tc);
    uint32_t hc = group < tc_m ? group : tc_m;
    uint32_t tile_rows = tc_m / hc;
    size_t n_tiles = 0, n_list = 0;
    for (uint32_t s = 0; s < n_seqs; s++) {
        uint32_t nr = (uint32_t)(a->q_indptr[s + 1] - a->q_indptr[s]);
        if (tc && nr > 1)
            n_tiles += (nr + tile_rows - 1) / tile_rows;
        else
            n_list += nr;
    }
    if (n_tiles > INT32_MAX) {
        KVS_ERRORF("cuda: attention: %zu query tiles exceed the grid limit", n_tiles);
        return KVS_ENOTSUP;
    }

    /* The mask as the kernels read it: patterned rows read bytes below
     * ceil(kv_len / block_tokens) of their mask row and nothing else, so
     * only those are copied (the caller promised no more) and the rest of
     * a staged row is zero. */
    uint32_t n_mrows = 0, mstride = 0;
    if (a->block_mask && a->mask_in_backend) {
        /* Already in the kernels' layout (kern.c: mask_stride is n_kv_heads
         * head strides), where kern_block_select wrote it. */
        mstride = a->mask_head_stride ? a->mask_head_stride : a->mask_stride;
    } else if (a->block_mask) {
        n_mrows = (n_q - 1) / qb + 1; /* n_q >= 1 (kern.c) */
        for (uint32_t i = 0; i < n_q; i++) {
            uint32_t nb = ((uint32_t)a->kv_len[i] + bt - 1) / bt;
            mstride = nb > mstride ? nb : mstride;
        }
    }

    /* The block ids, once per table.  Under a bound
     * (kern_attn_args_t.max_len_hint) they take the room the bound allows
     * whatever the tables hold today, so the arrays staged after them keep
     * their place from call to call: what a replayed graph reads. */
    size_t idx_room = (size_t)a->pt.indptr[n_seqs];
    if (a->max_len_hint) {
        size_t cap = (size_t)n_seqs * ((a->max_len_hint + bt - 1) / bt);
        idx_room = cap > idx_room ? cap : idx_room;
    }
    const int32_t *d_idx = NULL;
    int rc = idx_room ? stage_table(be, a, idx_room, &d_idx) : 0;
    if (rc)
        return rc;

    /* Staged, one buffer for every launch below: per row kv_len, window
     * start and the offset of its sequence's block ids; attn_kernel's row
     * list; the tiles; the mask. */
    size_t n_ints = (size_t)3 * n_q + n_list + 3 * n_tiles;
    size_t bytes = n_ints * sizeof(int32_t) + (size_t)n_mrows * mheads * mstride;
    void *h, *dev;
    if ((rc = kern__cuda_stage_begin(be, bytes, &h)) != 0)
        return rc;
    int32_t *row_len = (int32_t *)h, *row_lo = row_len + n_q, *row_blk = row_lo + n_q;
    int32_t *list = row_blk + n_q, *tiles = list + n_list;
    uint8_t *mask = (uint8_t *)(tiles + 3 * n_tiles);
    int32_t max_len = 0, max_vis = 0;
    size_t at_list = 0, at_tile = 0;
    for (uint32_t s = 0; s < n_seqs; s++) {
        int32_t r0 = a->q_indptr[s], r1 = a->q_indptr[s + 1];
        for (int32_t r = r0; r < r1; r++) {
            int32_t len = a->kv_len[r];
            row_len[r] = len;
            row_blk[r] = a->pt.indptr[s];
            if (!patterned || (a->dense_rows && a->dense_rows[r]))
                row_lo[r] = -1;
            else if (a->window_tokens == 0 || (uint32_t)len <= a->window_tokens)
                row_lo[r] = a->window_tokens ? 0 : len;
            else
                row_lo[r] = len - (int32_t)a->window_tokens;
        }
        if (tc && r1 - r0 > 1) {
            /* Last tiles first: they see the most keys, and starting the
             * longest work early evens out the tail of the grid. */
            int32_t nt = (r1 - r0 + (int32_t)tile_rows - 1) / (int32_t)tile_rows;
            for (int32_t t = nt - 1; t >= 0; t--) {
                int32_t first = r0 + t * (int32_t)tile_rows;
                tiles[3 * at_tile] = first;
                tiles[3 * at_tile + 1] =
                    r1 - first < (int32_t)tile_rows ? r1 - first : (int32_t)tile_rows;
                tiles[3 * at_tile + 2] = a->pt.indptr[s];
                at_tile++;
            }
        } else {
            for (int32_t r = r0; r < r1; r++) {
                list[at_list++] = r;
                max_len = a->kv_len[r] > max_len ? a->kv_len[r] : max_len;
                /* dec_kernel's count: the keys the row sees (no block mask) */
                const int32_t lo_r = row_lo[r];
                const uint32_t sk = a->sink_tokens; /* any count kern.c accepts */
                const int32_t vis = lo_r < 0
                                        ? a->kv_len[r]
                                        : (int32_t)(sk < (uint32_t)lo_r ? sk : (uint32_t)lo_r) +
                                              a->kv_len[r] - lo_r;
                max_vis = vis > max_vis ? vis : max_vis;
            }
        }
    }
    for (uint32_t mr = 0; mr < n_mrows; mr++) {
        uint32_t need = 0;
        uint64_t i1 = (uint64_t)(mr + 1) * qb < n_q ? (uint64_t)(mr + 1) * qb : n_q;
        for (uint32_t i = mr * qb; i < i1; i++) {
            if (row_lo[i] < 0)
                continue;
            uint32_t nb = ((uint32_t)a->kv_len[i] + bt - 1) / bt;
            need = nb > need ? nb : need;
        }
        for (uint32_t g = 0; g < mheads; g++) {
            uint8_t *dst = mask + ((size_t)mr * mheads + g) * mstride;
            if (need)
                memcpy(dst,
                       a->block_mask + (size_t)mr * a->mask_stride +
                           (size_t)g * a->mask_head_stride,
                       need);
            memset(dst + need, 0, mstride - need);
        }
    }
    if ((rc = kern__cuda_stage_end(be, bytes, &dev)) != 0)
        return rc;
    const int32_t *d_len = (const int32_t *)dev, *d_lo = d_len + n_q, *d_blk = d_lo + n_q;
    const int32_t *d_list = d_blk + n_q, *d_tiles = d_list + n_list;
    const uint8_t *d_mask = a->block_mask == NULL ? NULL
                            : a->mask_in_backend  ? a->block_mask
                                                  : (const uint8_t *)(d_tiles + 3 * n_tiles);
    const void *k = (const char *)kv->k + (size_t)a->layer * kv->layer_bytes;
    const void *v = (const char *)kv->v + (size_t)a->layer * kv->layer_bytes;
    float qscale = a->scale * 1.4426950408889634f; /* log2(e) */

    if (n_tiles) {
        kern_cuda_attn_tc_t t;
        t.q = a->q;
        t.out = a->out;
        t.tiles = d_tiles;
        t.row_len = d_len;
        t.row_lo = d_lo;
        t.blocks = d_idx;
        t.mask = d_mask;
        t.k = k;
        t.v = v;
        t.kvq = kern__cuda_kvq(kv, a->layer);
        t.mask_stride = mstride;
        t.mask_q_block = qb;
        t.mask_heads = mheads;
        t.n_tiles = (uint32_t)n_tiles;
        t.n_heads = a->n_heads;
        t.n_kv_heads = kv->n_kv_heads;
        t.group = group;
        t.head_dim = d;
        t.block_tokens = bt;
        /* The tile kernel compares signed: past every key is as many as any. */
        t.sinks = a->sink_tokens > INT32_MAX ? INT32_MAX : a->sink_tokens;
        t.qscale = qscale;
        if ((rc = kern__cuda_attention_tc(be, &t)) != 0)
            return rc;
    }
    if (n_list == 0)
        return 0;

    /* Rows of a call without a block mask go to dec_kernel, which wants
     * as many blocks as the device holds at once; attn_kernel's blocks of
     * up to 8 warps, two per multiprocessor. */
    dec_fn_t dec = NULL;
    size_t dec_smem = 0, want = (size_t)2 * (be->n_sm > 0 ? be->n_sm : 1);
    bool dec_vec = false;
    if (a->block_mask == NULL) {
        const uint32_t dpl = d <= 64 ? 2 : d <= 128 ? 4 : 8;
        const uint32_t hb = group <= 1 ? 1 : group <= 2 ? 2 : group <= 4 ? 4 : 8;
        const bool f16 = kv->dtype == KERN_F16;
        const size_t el = f16 ? 2 : 4;
        const uintptr_t kp = (uintptr_t)kv->k, vp = (uintptr_t)kv->v;
        /* Pairs of values at once: every row of the layer starts on a
         * multiple of dpl values. */
        dec_vec = d % dpl == 0 && kp % (2 * el) == 0 && vp % (2 * el) == 0 &&
                  kv->layer_bytes % (2 * el) == 0;
        dec_smem = dec_smem_bytes(hb, d);
        dec = f16 ? dec_pick<__half>(dpl, hb) : dec_pick<float>(dpl, hb);
        want = (size_t)be->dec_per_sm[dec_slot(f16, dpl, hb)] * (be->n_sm > 0 ? be->n_sm : 1);
    }

    /* Split the KV range only when the grid would leave SMs idle, and never
     * into ranges too short to pay for the combine pass.  A caller's bound
     * plans the split instead of the longest row, so every call under the
     * bound launches alike (a recorded graph replays them); ranges past a
     * row's end are empty. */
    if (a->max_len_hint)
        max_len = (int32_t)a->max_len_hint;
    if (dec) {
        /* Under a bound, what any row under it can see: the bound, or the
         * sinks and the window when every row has them. */
        if (a->max_len_hint) {
            max_vis = (int32_t)a->max_len_hint;
            if (patterned && a->dense_rows == NULL &&
                (uint64_t)a->sink_tokens + a->window_tokens < a->max_len_hint)
                max_vis = (int32_t)(a->sink_tokens + a->window_tokens);
        }
        max_len = max_vis;
    }
    if (max_len < 1) /* every row sees a key (kern.c); never a zero-length split */
        max_len = 1;
    uint32_t n_splits = 1;
    size_t base_blocks = n_list * kv->n_kv_heads;
    if (base_blocks < want) {
        /* Rounded down: a grid just past one wave of resident blocks
         * would leave the second wave mostly idle. */
        size_t sp = want / base_blocks;
        size_t by_len = (size_t)max_len / ATTN_MIN_SPLIT_TOKENS;
        if (sp > by_len)
            sp = by_len;
        if (sp > ATTN_MAX_SPLITS)
            sp = ATTN_MAX_SPLITS;
        if (sp > 1)
            n_splits = (uint32_t)sp;
    }
    /* Whole steps per split keep the inner loop full: ATTN_TOK keys for
     * attn_kernel, a round of all warps for dec_kernel (TK is at most 8). */
    const uint32_t unit = dec ? DEC_WARPS * 8 : ATTN_TOK;
    uint32_t split_tokens = ((uint32_t)max_len + n_splits - 1) / n_splits;
    split_tokens = (split_tokens + unit - 1) / unit * unit;
    n_splits = ((uint32_t)max_len + split_tokens - 1) / split_tokens;

    attn_params_t p;
    p.q = a->q;
    p.out = a->out;
    p.part_acc = NULL;
    p.part_ml = NULL;
    p.rows = d_list;
    p.row_blk = d_blk;
    p.row_len = d_len;
    p.row_lo = d_lo;
    p.blocks = d_idx;
    p.mask = d_mask;
    p.k = k;
    p.v = v;
    p.kvq = kern__cuda_kvq(kv, a->layer);
    p.n_heads = a->n_heads;
    p.n_kv_heads = kv->n_kv_heads;
    p.group = group;
    p.head_dim = d;
    p.block_tokens = bt;
    p.sinks = a->sink_tokens;
    p.mask_stride = mstride;
    p.mask_q_block = qb;
    p.mask_heads = mheads;
    p.n_splits = n_splits;
    p.split_tokens = split_tokens;
    p.qscale = qscale;

    size_t n_rh = n_list * a->n_heads;
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

    dim3 grid((unsigned)n_list, kv->n_kv_heads, n_splits);
    if (dec) {
        dec<<<grid, DEC_WARPS * 32, dec_smem, be->stream>>>(p, dec_vec);
    } else {
        unsigned warps = group < ATTN_MAX_WARPS ? group : ATTN_MAX_WARPS;
        if (kv->dtype == KERN_F16)
            attn_kernel<__half><<<grid, warps * 32, 0, be->stream>>>(p);
        else
            attn_kernel<float><<<grid, warps * 32, 0, be->stream>>>(p);
    }
    KERN_CUDA_LAUNCHED();

    if (n_splits > 1) {
        attn_combine_kernel<<<kern__cuda_grid(be, n_rh, 1), 128, 0, be->stream>>>(
            p.part_acc, p.part_ml, d_list, a->n_heads, (uint32_t)n_rh, n_splits, d, a->out);
        KERN_CUDA_LAUNCHED();
    }
    return 0;
}
