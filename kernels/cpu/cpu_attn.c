/*
 * kernels/cpu/cpu_attn.c — attention over the paged KV cache for the cpu
 * backend (flash-style online softmax, f32 accumulators).  Called through
 * kern_cpu.c's vtable from kern_attention().
 *
 * Work is cut into items of (sequence, KV head, chunk of query rows, key
 * range).  An item carries every query head of its KV head's group for all
 * rows of its chunk (nq query vectors), so each key and value vector is
 * fetched from memory once per item and shared by all of them; K and V are
 * never repeated for GQA.  Keys are visited in chunks of CHUNK entries
 * located through the block table:
 *
 *   for each key chunk:   S = scale * Q K^T     [nq x CHUNK]
 *                         per query, masking keys >= its kv_len:
 *                         m' = max(m, max s);  p = e^(s - m')
 *                         l = l e^(m - m') + sum p
 *                         acc = acc e^(m - m') + P V
 *
 * The SIMD kernels take queries four at a time, so a key or value vector
 * (converted from F16 in registers) feeds four FMA chains per load; a
 * single leftover query (MHA decode) has its own kernels.  Scalar code
 * covers head_dim not a multiple of 8 and machines without AVX2.
 *
 * When there are fewer items than about twice the threads (decode of a few
 * sequences over long KV), an item's key range is split into parts
 * (split-K).  Parts write (m, l, acc) to the shared workspace and a second
 * parallel pass merges them into the output.
 *
 * A sparse key pattern (kern.h: sinks + window, block mask, dense rows)
 * is honoured by every item, split or not: the key cursor steps over
 * page blocks no row of the item sees, and rows whose pattern cuts into
 * a chunk get their unseen keys' weights set to exactly 0.  Split-K still
 * cuts the causal range [0, kv_len) evenly, so under a sink + window
 * pattern some parts find nothing to do (they merge as empty); the work
 * itself stays O(kept keys).
 *
 * Blocks of one KV head are block_tokens * head_dim elements (4 KiB for 16
 * x 128 F16) at scattered addresses, which the hardware prefetcher serves
 * poorly, so the next PREFETCH_KEYS keys are prefetched into L2.  Measured
 * on the 2-core Zen 4 VM, 32 heads / 8 KV heads / head_dim 128, F16 KV:
 * decode over 4096 keys 1.2 ms on one thread, 0.6 ms on two; prefill of
 * 1024 rows over 1024 keys 70 GFLOP/s per thread.
 */
#include "cpu_int.h"

#include <math.h>
#include <stdlib.h>

#define CHUNK 32          /* keys per online-softmax step */
#define NQ_TARGET 16      /* query vectors per item (rows x heads of a group) */
#define MIN_SPLIT 128     /* fewest keys worth a split-K part */
#define PREFETCH_KEYS 128 /* keys ahead of the current chunk kept in flight */

typedef struct attn_item {
    int32_t row0, n_rows; /* query rows */
    uint32_t seq, g;      /* sequence, KV head */
    int32_t j0, j1;       /* key range */
    int64_t part;         /* -1: final output; else float offset of its partials */
} attn_item_t;

typedef struct attn_group { /* a split item: its parts are consecutive */
    int32_t row0, n_rows;
    uint32_t g;
    uint32_t n_parts;
    int64_t part; /* float offset of the first part */
} attn_group_t;

typedef struct attn_ctx {
    kern_cpu_t *be;
    const kern_attn_args_t *a;
    uint32_t group; /* query heads per KV head */
    uint32_t d;
    bool simd;
    const attn_item_t *items;
    const attn_group_t *groups;
    float *partials;
} attn_ctx_t;

/* ------------------------------------------------------------------------ */
/* Inner loops.  S and P are [nq][CHUNK] (P overwrites S).                   */
/* ------------------------------------------------------------------------ */

static float
kv_elem(bool f16, const void *p, uint32_t c)
{
    return f16 ? kvs_fp16_to_f32(((const uint16_t *)p)[c]) : ((const float *)p)[c];
}

static void
scores_scalar(const float *q, const void *const *kp, int nk, uint32_t d, bool f16, float scale,
              float *s)
{
    for (int t = 0; t < nk; t++) {
        float a0 = 0, a1 = 0;
        uint32_t c = 0;
        for (; c + 2 <= d; c += 2) {
            a0 += q[c] * kv_elem(f16, kp[t], c);
            a1 += q[c + 1] * kv_elem(f16, kp[t], c + 1);
        }
        for (; c < d; c++)
            a0 += q[c] * kv_elem(f16, kp[t], c);
        s[t] = scale * (a0 + a1);
    }
}

static void
accum_scalar(float *acc, float alpha, const float *p, const void *const *vp, int nk, uint32_t d,
             bool f16)
{
    for (uint32_t c = 0; c < d; c++) {
        float a = acc[c] * alpha;
        for (int t = 0; t < nk; t++)
            a += p[t] * kv_elem(f16, vp[t], c);
        acc[c] = a;
    }
}

#ifdef CPU_HAVE_X86
#define TGT "avx2,fma,f16c"

__attribute__((always_inline, target(TGT))) static inline __m256
load_kv8(const bool f16, const void *p, uint32_t c)
{
    if (f16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + c)));
    return _mm256_loadu_ps((const float *)p + c);
}

/* Four queries x two keys: eight FMA chains, each key vector loaded once
 * for four queries.  The eight sums come out of one hadd tree. */
__attribute__((always_inline, target(TGT))) static inline void
scores4_t(const float *const *q, const void *const *kp, int nk, uint32_t d, const bool f16,
          float scale, float *s)
{
    int t = 0;
    for (; t + 2 <= nk; t += 2) {
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00;
        __m256 a20 = a00, a21 = a00, a30 = a00, a31 = a00;
        for (uint32_t c = 0; c < d; c += 8) {
            __m256 k0 = load_kv8(f16, kp[t], c), k1 = load_kv8(f16, kp[t + 1], c);
            __m256 q0 = _mm256_loadu_ps(q[0] + c), q1 = _mm256_loadu_ps(q[1] + c);
            __m256 q2 = _mm256_loadu_ps(q[2] + c), q3 = _mm256_loadu_ps(q[3] + c);
            a00 = _mm256_fmadd_ps(q0, k0, a00);
            a01 = _mm256_fmadd_ps(q0, k1, a01);
            a10 = _mm256_fmadd_ps(q1, k0, a10);
            a11 = _mm256_fmadd_ps(q1, k1, a11);
            a20 = _mm256_fmadd_ps(q2, k0, a20);
            a21 = _mm256_fmadd_ps(q2, k1, a21);
            a30 = _mm256_fmadd_ps(q3, k0, a30);
            a31 = _mm256_fmadd_ps(q3, k1, a31);
        }
        /* Per 128-bit half: (q0k0, q0k1, q1k0, q1k1) and (q2k0 .. q3k1). */
        __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a00, a01), _mm256_hadd_ps(a10, a11));
        __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a20, a21), _mm256_hadd_ps(a30, a31));
        __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20),
                                   _mm256_permute2f128_ps(h0, h1, 0x31));
        float r[8];
        _mm256_storeu_ps(r, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
        for (int i = 0; i < 4; i++) {
            s[i * CHUNK + t] = r[2 * i];
            s[i * CHUNK + t + 1] = r[2 * i + 1];
        }
    }
    if (t < nk) {
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (uint32_t c = 0; c < d; c += 8) {
            __m256 k0 = load_kv8(f16, kp[t], c);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q[0] + c), k0, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q[1] + c), k0, a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q[2] + c), k0, a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q[3] + c), k0, a3);
        }
        __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
        __m128 sum = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
        float r[4];
        _mm_storeu_ps(r, _mm_mul_ps(sum, _mm_set1_ps(scale)));
        for (int i = 0; i < 4; i++)
            s[i * CHUNK + t] = r[i];
    }
}

/* One query: eight keys at a time, one load of q for eight chains. */
__attribute__((always_inline, target(TGT))) static inline void
scores1_t(const float *q, const void *const *kp, int nk, uint32_t d, const bool f16, float scale,
          float *s)
{
    int t = 0;
    for (; t + 8 <= nk; t += 8) {
        __m256 a[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            a[i] = _mm256_setzero_ps();
        for (uint32_t c = 0; c < d; c += 8) {
            __m256 qv = _mm256_loadu_ps(q + c);
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                a[i] = _mm256_fmadd_ps(qv, load_kv8(f16, kp[t + i], c), a[i]);
        }
        __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20),
                                   _mm256_permute2f128_ps(h0, h1, 0x31));
        _mm256_storeu_ps(s + t, _mm256_mul_ps(sum, _mm256_set1_ps(scale)));
    }
    for (; t < nk; t++) {
        __m256 a0 = _mm256_setzero_ps();
        for (uint32_t c = 0; c < d; c += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load_kv8(f16, kp[t], c), a0);
        s[t] = scale * cpu_hsum_avx2(a0);
    }
}

/* acc_i = acc_i * alpha_i + sum_t p_i[t] v_t for four queries, 16
 * dimensions per pass: each value vector is loaded once for four queries. */
__attribute__((always_inline, target(TGT))) static inline void
accum4_t(float *const *acc, const float *alpha, const float *p, const void *const *vp, int nk,
         uint32_t d, const bool f16)
{
    uint32_t c = 0;
    for (; c + 16 <= d; c += 16) {
        __m256 a[4][2];
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            __m256 al = _mm256_set1_ps(alpha[i]);
            a[i][0] = _mm256_mul_ps(_mm256_loadu_ps(acc[i] + c), al);
            a[i][1] = _mm256_mul_ps(_mm256_loadu_ps(acc[i] + c + 8), al);
        }
        for (int t = 0; t < nk; t++) {
            __m256 v0 = load_kv8(f16, vp[t], c), v1 = load_kv8(f16, vp[t], c + 8);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++) {
                __m256 pt = _mm256_set1_ps(p[i * CHUNK + t]);
                a[i][0] = _mm256_fmadd_ps(pt, v0, a[i][0]);
                a[i][1] = _mm256_fmadd_ps(pt, v1, a[i][1]);
            }
        }
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {
            _mm256_storeu_ps(acc[i] + c, a[i][0]);
            _mm256_storeu_ps(acc[i] + c + 8, a[i][1]);
        }
    }
    if (c < d) {
        __m256 a[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++)
            a[i] = _mm256_mul_ps(_mm256_loadu_ps(acc[i] + c), _mm256_set1_ps(alpha[i]));
        for (int t = 0; t < nk; t++) {
            __m256 v0 = load_kv8(f16, vp[t], c);
#pragma GCC unroll 4
            for (int i = 0; i < 4; i++)
                a[i] = _mm256_fmadd_ps(_mm256_set1_ps(p[i * CHUNK + t]), v0, a[i]);
        }
#pragma GCC unroll 4
        for (int i = 0; i < 4; i++)
            _mm256_storeu_ps(acc[i] + c, a[i]);
    }
}

/* One query, 64 dimensions per pass (eight chains hide the FMA latency). */
__attribute__((always_inline, target(TGT))) static inline void
accum1_t(float *acc, float alpha, const float *p, const void *const *vp, int nk, uint32_t d,
         const bool f16)
{
    __m256 al = _mm256_set1_ps(alpha);
    uint32_t c = 0;
    for (; c + 64 <= d; c += 64) {
        __m256 a[8];
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            a[i] = _mm256_mul_ps(_mm256_loadu_ps(acc + c + 8 * i), al);
        for (int t = 0; t < nk; t++) {
            __m256 pt = _mm256_set1_ps(p[t]);
#pragma GCC unroll 8
            for (int i = 0; i < 8; i++)
                a[i] = _mm256_fmadd_ps(pt, load_kv8(f16, vp[t], c + 8 * i), a[i]);
        }
#pragma GCC unroll 8
        for (int i = 0; i < 8; i++)
            _mm256_storeu_ps(acc + c + 8 * i, a[i]);
    }
    for (; c < d; c += 8) {
        __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc + c), al);
        for (int t = 0; t < nk; t++)
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), load_kv8(f16, vp[t], c), a0);
        _mm256_storeu_ps(acc + c, a0);
    }
}

/* The kernels per KV dtype, so the F16 test is hoisted out of the loops. */
#define ATTN_KERNELS(SUF, F16)                                                                   \
    __attribute__((target(TGT))) static void scores4_##SUF(                                      \
        const float *const *q, const void *const *kp, int nk, uint32_t d, float scale, float *s) \
    {                                                                                            \
        scores4_t(q, kp, nk, d, F16, scale, s);                                                  \
    }                                                                                            \
    __attribute__((target(TGT))) static void scores1_##SUF(                                      \
        const float *q, const void *const *kp, int nk, uint32_t d, float scale, float *s)        \
    {                                                                                            \
        scores1_t(q, kp, nk, d, F16, scale, s);                                                  \
    }                                                                                            \
    __attribute__((target(TGT))) static void accum4_##SUF(float *const *acc, const float *alpha, \
                                                          const float *p, const void *const *vp, \
                                                          int nk, uint32_t d)                    \
    {                                                                                            \
        accum4_t(acc, alpha, p, vp, nk, d, F16);                                                 \
    }                                                                                            \
    __attribute__((target(TGT))) static void accum1_##SUF(                                       \
        float *acc, float alpha, const float *p, const void *const *vp, int nk, uint32_t d)      \
    {                                                                                            \
        accum1_t(acc, alpha, p, vp, nk, d, F16);                                                 \
    }
ATTN_KERNELS(f32, false)
ATTN_KERNELS(f16, true)

/* p[0..lim) = e^(s - m) with m = max(m_old, max s); returns that max. */
__attribute__((target(TGT))) static float
softmax_chunk_avx2(float *s, int lim, float m_old)
{
    __m256 mv = _mm256_set1_ps(m_old);
    int t = 0;
    for (; t + 8 <= lim; t += 8)
        mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + t));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (; t < lim; t++)
        mx = s[t] > mx ? s[t] : mx;
    mv = _mm256_set1_ps(mx);
    for (t = 0; t + 8 <= lim; t += 8)
        _mm256_storeu_ps(s + t, cpu_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv)));
    for (; t < lim; t++)
        s[t] = expf(s[t] - mx);
    return mx;
}
#endif

static float
softmax_chunk_scalar(float *s, int lim, float m_old)
{
    float mx = m_old;
    for (int t = 0; t < lim; t++)
        mx = s[t] > mx ? s[t] : mx;
    for (int t = 0; t < lim; t++)
        s[t] = expf(s[t] - mx);
    return mx;
}

/* ------------------------------------------------------------------------ */
/* Items.                                                                   */
/* ------------------------------------------------------------------------ */

static inline size_t
q_offset(const attn_ctx_t *c, int32_t row0, uint32_t g, uint32_t qi)
{
    uint32_t r = qi / c->group, h = qi % c->group;
    return (((size_t)(row0 + (int32_t)r)) * c->a->n_heads + (size_t)g * c->group + h) * c->d;
}

/* What one query row may see under kern.h's sparse key pattern: keys
 * j < len with j < sinks, j >= lo or mask[j / block_tokens] set.  A dense
 * row (no pattern, or marked in dense_rows) has lo = 0 and sees all of
 * them. */
typedef struct row_pat {
    int32_t len;
    int32_t lo;
    const uint8_t *mask; /* the row's block_mask row, or NULL */
} row_pat_t;

static void
row_pat_init(const kern_attn_args_t *a, int32_t i, uint32_t g, row_pat_t *r)
{
    r->len = a->kv_len[i];
    r->lo = 0;
    r->mask = NULL;
    if ((a->window_tokens == 0 && a->block_mask == NULL) || (a->dense_rows && a->dense_rows[i]))
        return;
    /* No window: nothing is recent enough, only sinks and the mask count. */
    int64_t lo = a->window_tokens ? (int64_t)r->len - a->window_tokens : r->len;
    r->lo = lo > 0 ? (int32_t)lo : 0;
    if (a->block_mask) {
        uint32_t qb = a->mask_q_block ? a->mask_q_block : 1;
        r->mask = a->block_mask + (size_t)((uint32_t)i / qb) * a->mask_stride +
                  (size_t)g * a->mask_head_stride;
    }
}

static inline bool
row_pat_sees(const row_pat_t *r, uint32_t sinks, uint32_t bt, int32_t j)
{
    return j < r->len &&
           ((uint32_t)j < sinks || j >= r->lo || (r->mask && r->mask[(uint32_t)j / bt]));
}

/* Walks the keys [j, j1) of one sequence and KV head in order, yielding
 * byte offsets into K (and V) and positions.  Under a sparse pattern it
 * steps over whole blocks that no row of the item sees, which is what makes
 * a sink + window or block-sparse row cost O(kept keys), not O(kv_len). */
typedef struct key_cursor {
    const kern_kv_t *kv;
    const int32_t *blocks;
    uint32_t layer, g;
    int32_t j, j1;
    size_t vec_bytes;      /* one key vector */
    const row_pat_t *rows; /* NULL: dense call, every block is needed */
    int n_rows;
    uint32_t sinks;
} key_cursor_t;

static void
cursor_init(key_cursor_t *cu, const attn_ctx_t *c, const attn_item_t *it, const row_pat_t *rows)
{
    const kern_attn_args_t *a = c->a;
    *cu = (key_cursor_t){.kv = a->kv,
                         .blocks = a->pt.indices + a->pt.indptr[it->seq],
                         .layer = a->layer,
                         .g = it->g,
                         .j = it->j0,
                         .j1 = it->j1,
                         .vec_bytes = kern__kv_offset(a->kv, 0, 0, 0, 1),
                         .rows = rows,
                         .n_rows = it->n_rows,
                         .sinks = a->sink_tokens};
}

/* Whether some row sees a key of block b (table index). */
static bool
cursor_block_needed(const key_cursor_t *cu, uint32_t b)
{
    uint32_t bt = cu->kv->block_tokens;
    int32_t k0 = (int32_t)(b * bt);
    for (int r = 0; r < cu->n_rows; r++) {
        const row_pat_t *rp = &cu->rows[r];
        if (k0 >= rp->len)
            continue;
        int32_t k1 = k0 + (int32_t)bt < rp->len ? k0 + (int32_t)bt : rp->len; /* exclusive */
        if ((uint32_t)k0 < cu->sinks || k1 - 1 >= rp->lo || (rp->mask && rp->mask[b]))
            return true;
    }
    return false;
}

/* Takes up to n keys; returns how many (0 at the end of the range). */
static int
cursor_take(key_cursor_t *cu, int n, size_t *offs, int32_t *pos)
{
    uint32_t bt = cu->kv->block_tokens;
    int t = 0;
    while (t < n && cu->j < cu->j1) {
        uint32_t b = (uint32_t)cu->j / bt, o = (uint32_t)cu->j % bt;
        int32_t end = (int32_t)((b + 1) * bt) < cu->j1 ? (int32_t)((b + 1) * bt) : cu->j1;
        if (cu->rows && !cursor_block_needed(cu, b)) {
            cu->j = end;
            continue;
        }
        size_t base = kern__kv_offset(cu->kv, cu->layer, (uint32_t)cu->blocks[b], cu->g, 0);
        for (; t < n && cu->j < end; t++, cu->j++, o++) {
            offs[t] = base + o * cu->vec_bytes;
            if (pos)
                pos[t] = cu->j;
        }
    }
    return t;
}

/* Turns row scores p[0..nk) (keys at ascending positions pos) into
 * e^(s - m') for the keys the row sees and 0 for the rest; returns m' =
 * max(m_old, max of the seen scores) and adds the weights to *sum. */
static float
softmax_row(const attn_ctx_t *c, const row_pat_t *rp, const int32_t *pos, int nk, float *p,
            float m_old, float *sum)
{
    uint32_t sinks = c->a->sink_tokens, bt = c->a->kv->block_tokens;
    int lim = nk;
    while (lim > 0 && pos[lim - 1] >= rp->len)
        lim--;
    /* Positions ascend, so one test tells whether the pattern cuts into
     * the chunk; most chunks of a patterned row are wholly in or out. */
    bool all = true;
    if (lim > 0 && pos[0] < rp->lo)
        for (int t = 0; t < lim && all; t++)
            all = row_pat_sees(rp, sinks, bt, pos[t]);
    float mx = m_old;
    if (all) {
        if (lim > 0) {
#ifdef CPU_HAVE_X86
            if (c->simd)
                mx = softmax_chunk_avx2(p, lim, m_old);
            else
#endif
                mx = softmax_chunk_scalar(p, lim, m_old);
        }
        for (int t = lim; t < nk; t++)
            p[t] = 0.0f;
    } else {
        for (int t = 0; t < lim; t++)
            if (row_pat_sees(rp, sinks, bt, pos[t]) && p[t] > mx)
                mx = p[t];
        /* Exactly 0 for unseen keys: the SIMD exp clamps instead. */
        for (int t = 0; t < nk; t++)
            p[t] = t < lim && row_pat_sees(rp, sinks, bt, pos[t]) ? expf(p[t] - mx) : 0.0f;
    }
    float s = 0.0f;
    for (int t = 0; t < lim; t++)
        s += p[t];
    *sum = s;
    return mx;
}

/* Pools with quantized blocks: the chunk's keys (at ascending positions
 * pos) and values as f32 rows, decoding each run of one block at once, so
 * the f32 kernels below serve every codec. */
static void
chunk_decode(cpu_isa_t isa, const kern_kv_t *kv, uint32_t layer, uint32_t g, const int32_t *blocks,
             const int32_t *pos, int nk, float *kb, float *vb)
{
    uint32_t bt = kv->block_tokens, d = kv->head_dim;
    for (int t = 0; t < nk;) {
        uint32_t bi = (uint32_t)pos[t] / bt, o = (uint32_t)pos[t] % bt;
        int n = 1;
        while (t + n < nk && pos[t + n] == pos[t] + n && (uint32_t)pos[t + n] / bt == bi)
            n++;
        uint32_t b = (uint32_t)blocks[bi];
        float *kr = kb + (size_t)t * d, *vr = vb + (size_t)t * d;
        const uint8_t *kt = NULL, *vt = NULL;
        kern_dtype_t rows = KERN_F32; /* a run stored as rows of this GGUF type */
        if (kern__kv_cold(kv, b)) {
            kt = kern__kv_tile(kv, false, layer, b, g);
            vt = kern__kv_tile(kv, true, layer, b, g);
            /* bf16 and q8_0 tiles are token-major rows of those types
             * (kern.h), which the row conversion reads as they are. */
            rows = kv->quant == KERN_KVQ_BF16   ? KERN_BF16
                   : kv->quant == KERN_KVQ_Q8_0 ? KERN_Q8_0
                                                : KERN_DTYPE_COUNT;
            if (rows != KERN_DTYPE_COUNT) {
                size_t rb = kern_row_bytes(rows, d);
                kt += o * rb;
                vt += o * rb;
            }
        } else {
            size_t off = kern__kv_offset(kv, layer, b, g, o);
            kt = (const uint8_t *)kv->k + off;
            vt = (const uint8_t *)kv->v + off;
            rows = kv->dtype;
        }
        if (rows == KERN_F32) {
            memcpy(kr, kt, (size_t)n * d * sizeof(float));
            memcpy(vr, vt, (size_t)n * d * sizeof(float));
        } else if (rows != KERN_DTYPE_COUNT) {
            kern__cpu_row_to_f32(isa, rows, kt, kr, (size_t)n * d);
            kern__cpu_row_to_f32(isa, rows, vt, vr, (size_t)n * d);
        } else {
            bool avx2 = isa >= CPU_ISA_AVX2;
            kern__kvq_decode_fast(avx2, kv->quant, false, kt, bt, d, o, (uint32_t)n, kr);
            kern__kvq_decode_fast(avx2, kv->quant, true, vt, bt, d, o, (uint32_t)n, vr);
        }
        t += n;
    }
}

static void
item_task(void *ctx, int task, int thread)
{
    const attn_ctx_t *c = ctx;
    const kern_attn_args_t *a = c->a;
    const kern_kv_t *kv = a->kv;
    const attn_item_t *it = &c->items[task];
    uint32_t d = c->d, nq = (uint32_t)it->n_rows * c->group;
    bool quant = kv->quant != KERN_KVQ_NONE;
    bool f16 = kv->dtype == KERN_F16 && !quant;

    /* Scratch: m, l, alpha [nq], S/P [nq][CHUNK], acc [nq][d], then for
     * quantized pools the decoded K and V [CHUNK][d]. */
    float *m = c->be->scratch[thread].p, *l = m + nq, *alpha = l + nq, *s = alpha + nq;
    float *acc = s + (size_t)nq * CHUNK;
    float *kb = acc + (size_t)nq * d, *vb = kb + (size_t)CHUNK * d;
    for (uint32_t qi = 0; qi < nq; qi++) {
        m[qi] = -INFINITY;
        l[qi] = 0.0f;
    }
    memset(acc, 0, (size_t)nq * d * sizeof(float));

    row_pat_t rows[NQ_TARGET]; /* n_rows <= NQ_TARGET (planning) */
    for (int32_t r = 0; r < it->n_rows; r++)
        row_pat_init(a, it->row0 + r, it->g, &rows[r]);
    bool sparse = a->window_tokens > 0 || a->block_mask != NULL;

    const void *kp[CHUNK], *vp[CHUNK];
    size_t offs[CHUNK], pf_offs[PREFETCH_KEYS + CHUNK];
    int32_t pos[CHUNK];
    key_cursor_t cur, pf;
    cursor_init(&cur, c, it, sparse ? rows : NULL);
    pf = cur;
    int64_t taken = 0, pf_taken = 0;
    for (;;) {
        int nk = cursor_take(&cur, CHUNK, offs, pos);
        if (nk == 0)
            break;
        taken += nk;
        if (quant) {
            chunk_decode(c->be->isa, kv, a->layer, it->g, cur.blocks, pos, nk, kb, vb);
            for (int t = 0; t < nk; t++) {
                kp[t] = kb + (size_t)t * d;
                vp[t] = vb + (size_t)t * d;
            }
        } else {
            for (int t = 0; t < nk; t++) {
                kp[t] = (const uint8_t *)kv->k + offs[t];
                vp[t] = (const uint8_t *)kv->v + offs[t];
            }
        }
        /* Keys sit in runs of block_tokens at scattered addresses, too
         * short for the hardware prefetcher to reach full speed: keep
         * PREFETCH_KEYS keys past this chunk on their way into L2. */
        int want = quant ? 0 : (int)(taken + PREFETCH_KEYS - pf_taken);
        int np = want > 0 ? cursor_take(&pf, want, pf_offs, NULL) : 0;
        pf_taken += np;
#ifdef CPU_HAVE_X86
        for (int t = 0; t < np; t++) {
            for (size_t o = 0; o < pf.vec_bytes; o += 64) {
                _mm_prefetch((const char *)kv->k + pf_offs[t] + o, _MM_HINT_T1);
                _mm_prefetch((const char *)kv->v + pf_offs[t] + o, _MM_HINT_T1);
            }
        }
#endif

        /* S = scale Q K^T over the whole chunk; scores of keys a row does
         * not see are computed for simplicity and then masked. */
        uint32_t qi = 0;
#ifdef CPU_HAVE_X86
        if (c->simd) {
            for (; qi + 4 <= nq; qi += 4) {
                const float *q4[4];
                for (int i = 0; i < 4; i++)
                    q4[i] = a->q + q_offset(c, it->row0, it->g, qi + (uint32_t)i);
                (f16 ? scores4_f16 : scores4_f32)(q4, kp, nk, d, a->scale, s + qi * CHUNK);
            }
            for (; qi < nq; qi++)
                (f16 ? scores1_f16 : scores1_f32)(a->q + q_offset(c, it->row0, it->g, qi), kp, nk,
                                                  d, a->scale, s + qi * CHUNK);
        }
#endif
        for (; qi < nq; qi++)
            scores_scalar(a->q + q_offset(c, it->row0, it->g, qi), kp, nk, d, f16, a->scale,
                          s + qi * CHUNK);

        for (qi = 0; qi < nq; qi++) {
            float sum;
            float mx = softmax_row(c, &rows[qi / c->group], pos, nk, s + qi * CHUNK, m[qi], &sum);
            /* Until a row has seen a key, m is -inf and acc, l are 0. */
            alpha[qi] = m[qi] == mx ? 1.0f : m[qi] == -INFINITY ? 0.0f : expf(m[qi] - mx);
            l[qi] = l[qi] * alpha[qi] + sum;
            m[qi] = mx;
        }

        qi = 0;
#ifdef CPU_HAVE_X86
        if (c->simd) {
            for (; qi + 4 <= nq; qi += 4) {
                float *acc4[4] = {acc + (size_t)qi * d, acc + (size_t)(qi + 1) * d,
                                  acc + (size_t)(qi + 2) * d, acc + (size_t)(qi + 3) * d};
                (f16 ? accum4_f16 : accum4_f32)(acc4, alpha + qi, s + qi * CHUNK, vp, nk, d);
            }
            for (; qi < nq; qi++)
                (f16 ? accum1_f16 : accum1_f32)(acc + (size_t)qi * d, alpha[qi], s + qi * CHUNK, vp,
                                                nk, d);
        }
#endif
        for (; qi < nq; qi++)
            accum_scalar(acc + (size_t)qi * d, alpha[qi], s + qi * CHUNK, vp, nk, d, f16);
    }

    if (it->part < 0) {
        for (uint32_t qi = 0; qi < nq; qi++) {
            float *o = a->out + q_offset(c, it->row0, it->g, qi);
            float inv = 1.0f / l[qi];
            for (uint32_t k = 0; k < d; k++)
                o[k] = acc[(size_t)qi * d + k] * inv;
        }
        return;
    }
    /* Partials: per query, m, l, then acc[d]. */
    float *pp = c->partials + it->part;
    for (uint32_t qi = 0; qi < nq; qi++) {
        float *e = pp + (size_t)qi * (d + 2);
        e[0] = m[qi];
        e[1] = l[qi];
        memcpy(e + 2, acc + (size_t)qi * d, d * sizeof(float));
    }
}

static void
merge_task(void *ctx, int task, int thread)
{
    (void)thread;
    const attn_ctx_t *c = ctx;
    const attn_group_t *gr = &c->groups[task];
    uint32_t d = c->d, nq = (uint32_t)gr->n_rows * c->group;
    size_t part_floats = (size_t)nq * (d + 2);
    for (uint32_t qi = 0; qi < nq; qi++) {
        const float *e0 = c->partials + gr->part + (size_t)qi * (d + 2);
        float mx = -INFINITY;
        for (uint32_t p = 0; p < gr->n_parts; p++) {
            const float *e = e0 + p * part_floats;
            if (e[1] > 0.0f && e[0] > mx)
                mx = e[0];
        }
        float *o = c->a->out + q_offset(c, gr->row0, gr->g, qi);
        for (uint32_t k = 0; k < d; k++)
            o[k] = 0.0f;
        float l = 0.0f;
        for (uint32_t p = 0; p < gr->n_parts; p++) {
            const float *e = e0 + p * part_floats;
            if (e[1] <= 0.0f)
                continue; /* no key of this part is visible to the row */
            float w = expf(e[0] - mx);
            l += w * e[1];
            for (uint32_t k = 0; k < d; k++)
                o[k] += w * e[2 + k];
        }
        float inv = 1.0f / l;
        for (uint32_t k = 0; k < d; k++)
            o[k] *= inv;
    }
}

/* ------------------------------------------------------------------------ */
/* Planning.                                                                */
/* ------------------------------------------------------------------------ */

static int32_t
chunk_max_len(const kern_attn_args_t *a, int32_t row0, int32_t n_rows)
{
    int32_t mx = 0;
    for (int32_t i = row0; i < row0 + n_rows; i++)
        mx = a->kv_len[i] > mx ? a->kv_len[i] : mx;
    return mx;
}

static uint32_t
parts_for(int32_t range, uint32_t target)
{
    uint32_t p = (uint32_t)((range + MIN_SPLIT - 1) / MIN_SPLIT);
    return p < target ? (p ? p : 1) : target;
}

int
kern__cpu_attention(kern_cpu_t *be, const kern_attn_args_t *a)
{
    const kern_kv_t *kv = a->kv;
    attn_ctx_t c = {.be = be, .a = a, .group = a->n_heads / kv->n_kv_heads, .d = kv->head_dim};
#ifdef CPU_HAVE_X86
    c.simd = be->isa >= CPU_ISA_AVX2 && c.d % 8 == 0;
#endif
    int32_t rc_rows = (int32_t)(NQ_TARGET / c.group);
    if (rc_rows < 1)
        rc_rows = 1;

    /* Pass 1: count base items, then decide the split factor. */
    size_t n_base = 0;
    for (uint32_t s = 0; s < a->pt.n_seqs; s++) {
        int32_t rows = a->q_indptr[s + 1] - a->q_indptr[s];
        n_base += (size_t)kv->n_kv_heads * (size_t)((rows + rc_rows - 1) / rc_rows);
    }
    uint32_t target = 1;
    if (be->n_threads > 1 && n_base < 2 * (size_t)be->n_threads)
        target = (uint32_t)((2 * (size_t)be->n_threads + n_base - 1) / n_base);

    size_t n_items = 0, n_groups = 0, n_partial = 0;
    for (uint32_t s = 0; s < a->pt.n_seqs; s++) {
        for (int32_t r = a->q_indptr[s]; r < a->q_indptr[s + 1]; r += rc_rows) {
            int32_t nr = a->q_indptr[s + 1] - r < rc_rows ? a->q_indptr[s + 1] - r : rc_rows;
            uint32_t p = parts_for(chunk_max_len(a, r, nr), target);
            n_items += (size_t)p * kv->n_kv_heads;
            if (p > 1) {
                n_groups += kv->n_kv_heads;
                n_partial += (size_t)kv->n_kv_heads * p * (size_t)nr * c.group * (c.d + 2);
            }
        }
    }
    if (n_items > INT32_MAX || n_groups > INT32_MAX)
        return KVS_EINVAL;

    size_t items_bytes = (n_items * sizeof(attn_item_t) + 63) & ~(size_t)63;
    size_t groups_bytes = (n_groups * sizeof(attn_group_t) + 63) & ~(size_t)63;
    void *work;
    int rc =
        kern__cpu_work_reserve(be, items_bytes + groups_bytes + n_partial * sizeof(float), &work);
    if (rc == 0) {
        size_t nq_max = (size_t)rc_rows * c.group;
        size_t decoded = a->kv->quant != KERN_KVQ_NONE ? 2 * (size_t)CHUNK * c.d : 0;
        rc = kern__cpu_scratch_reserve(be, (nq_max * (3 + CHUNK + c.d) + decoded) * sizeof(float));
    }
    if (rc)
        return rc;
    attn_item_t *items = work;
    attn_group_t *groups = (attn_group_t *)((uint8_t *)work + items_bytes);
    c.partials = (float *)((uint8_t *)work + items_bytes + groups_bytes);
    c.items = items;
    c.groups = groups;

    /* Pass 2: fill the plan.  The pool hands items out first come first
     * served, which balances items of unequal length. */
    size_t ni = 0, ng = 0;
    int64_t off = 0;
    for (uint32_t s = 0; s < a->pt.n_seqs; s++) {
        for (int32_t r = a->q_indptr[s]; r < a->q_indptr[s + 1]; r += rc_rows) {
            int32_t nr = a->q_indptr[s + 1] - r < rc_rows ? a->q_indptr[s + 1] - r : rc_rows;
            int32_t range = chunk_max_len(a, r, nr);
            uint32_t p = parts_for(range, target);
            for (uint32_t g = 0; g < kv->n_kv_heads; g++) {
                if (p > 1)
                    groups[ng++] =
                        (attn_group_t){.row0 = r, .n_rows = nr, .g = g, .n_parts = p, .part = off};
                for (uint32_t k = 0; k < p; k++) {
                    items[ni++] = (attn_item_t){
                        .row0 = r,
                        .n_rows = nr,
                        .seq = s,
                        .g = g,
                        .j0 = (int32_t)((int64_t)range * k / p),
                        .j1 = (int32_t)((int64_t)range * (k + 1) / p),
                        .part = p > 1 ? off : -1,
                    };
                    if (p > 1)
                        off += (int64_t)nr * c.group * (c.d + 2);
                }
            }
        }
    }
    kern__cpu_parallel(be, (int)n_items, item_task, &c);
    if (n_groups)
        kern__cpu_parallel(be, (int)n_groups, merge_task, &c);
    return 0;
}
