/*
 * kernels/cpu/cpu_attn.c — attention over the paged KV cache for the cpu
 * backend (flash-style online softmax, f32 accumulators).  Called through
 * kern_cpu.c's vtable from kern_attention().
 *
 * Work is cut into items of (sequence, KV head, chunk of query rows, key
 * range).  An item carries every query head of its KV head's group for all
 * rows of its chunk, so each key and value vector is fetched from memory
 * once per item and then reused from L1 by all of them; K and V are never
 * repeated for GQA.  Keys are visited in chunks of CHUNK entries gathered
 * through the block table:
 *
 *   for each key chunk:   s = scale * q.k       (for keys < kv_len of the row)
 *                         m' = max(m, max s);  p = e^(s - m')
 *                         l = l e^(m - m') + sum p
 *                         acc = acc e^(m - m') + sum p v
 *
 * When there are fewer items than about twice the threads (decode of a few
 * sequences over long KV), an item's key range is split into parts
 * (split-K).  Parts write (m, l, acc) to the shared workspace and a second
 * parallel pass merges them into the output.
 */
#include "cpu_int.h"

#include <math.h>
#include <stdlib.h>

#define CHUNK 32       /* keys per online-softmax step */
#define NQ_TARGET 16   /* query vectors per item (rows x heads of a group) */
#define MIN_SPLIT 128  /* fewest keys worth a split-K part */

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
/* Inner loops: scores, and the value accumulation.                         */
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

static void
exp_scalar(float *s, int n, float m)
{
    for (int t = 0; t < n; t++)
        s[t] = expf(s[t] - m);
}

#ifdef CPU_HAVE_X86
__attribute__((always_inline, target("avx2,fma,f16c"))) static inline __m256
load_kv8(bool f16, const void *p, uint32_t c)
{
    if (f16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + c)));
    return _mm256_loadu_ps((const float *)p + c);
}

/* d is a multiple of 8. */
__attribute__((always_inline, target("avx2,fma,f16c"))) static inline void
scores_avx2_t(const float *q, const void *const *kp, int nk, uint32_t d, const bool f16,
              float scale, float *s)
{
    for (int t = 0; t < nk; t++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        uint32_t c = 0;
        for (; c + 32 <= d; c += 32) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load_kv8(f16, kp[t], c), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 8), load_kv8(f16, kp[t], c + 8), a1);
            a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 16), load_kv8(f16, kp[t], c + 16), a2);
            a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c + 24), load_kv8(f16, kp[t], c + 24), a3);
        }
        for (; c < d; c += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), load_kv8(f16, kp[t], c), a0);
        s[t] = scale * cpu_hsum_avx2(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    }
}

__attribute__((target("avx2,fma,f16c"))) static void
scores_avx2(const float *q, const void *const *kp, int nk, uint32_t d, bool f16, float scale,
            float *s)
{
    if (f16)
        scores_avx2_t(q, kp, nk, d, true, scale, s);
    else
        scores_avx2_t(q, kp, nk, d, false, scale, s);
}

__attribute__((always_inline, target("avx2,fma,f16c"))) static inline void
accum_avx2_t(float *acc, float alpha, const float *p, const void *const *vp, int nk, uint32_t d,
             const bool f16)
{
    __m256 al = _mm256_set1_ps(alpha);
    uint32_t c = 0;
    for (; c + 32 <= d; c += 32) {
        __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc + c), al);
        __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(acc + c + 8), al);
        __m256 a2 = _mm256_mul_ps(_mm256_loadu_ps(acc + c + 16), al);
        __m256 a3 = _mm256_mul_ps(_mm256_loadu_ps(acc + c + 24), al);
        for (int t = 0; t < nk; t++) {
            __m256 pt = _mm256_set1_ps(p[t]);
            a0 = _mm256_fmadd_ps(pt, load_kv8(f16, vp[t], c), a0);
            a1 = _mm256_fmadd_ps(pt, load_kv8(f16, vp[t], c + 8), a1);
            a2 = _mm256_fmadd_ps(pt, load_kv8(f16, vp[t], c + 16), a2);
            a3 = _mm256_fmadd_ps(pt, load_kv8(f16, vp[t], c + 24), a3);
        }
        _mm256_storeu_ps(acc + c, a0);
        _mm256_storeu_ps(acc + c + 8, a1);
        _mm256_storeu_ps(acc + c + 16, a2);
        _mm256_storeu_ps(acc + c + 24, a3);
    }
    for (; c < d; c += 8) {
        __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(acc + c), al);
        for (int t = 0; t < nk; t++)
            a0 = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), load_kv8(f16, vp[t], c), a0);
        _mm256_storeu_ps(acc + c, a0);
    }
}

__attribute__((target("avx2,fma,f16c"))) static void
accum_avx2(float *acc, float alpha, const float *p, const void *const *vp, int nk, uint32_t d,
           bool f16)
{
    if (f16)
        accum_avx2_t(acc, alpha, p, vp, nk, d, true);
    else
        accum_avx2_t(acc, alpha, p, vp, nk, d, false);
}

__attribute__((target("avx2,fma"))) static void
exp_avx2(float *s, int n, float m)
{
    __m256 mv = _mm256_set1_ps(m);
    int t = 0;
    for (; t + 8 <= n; t += 8)
        _mm256_storeu_ps(s + t, cpu_exp_avx2(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv)));
    for (; t < n; t++)
        s[t] = expf(s[t] - m);
}
#endif

/* ------------------------------------------------------------------------ */
/* Items.                                                                   */
/* ------------------------------------------------------------------------ */

static inline size_t
q_offset(const attn_ctx_t *c, int32_t row0, uint32_t g, uint32_t qi)
{
    uint32_t r = qi / c->group, h = qi % c->group;
    return (((size_t)(row0 + (int32_t)r)) * c->a->n_heads + (size_t)g * c->group + h) * c->d;
}

static void
item_task(void *ctx, int task, int thread)
{
    const attn_ctx_t *c = ctx;
    const kern_attn_args_t *a = c->a;
    const kern_kv_t *kv = a->kv;
    const attn_item_t *it = &c->items[task];
    uint32_t d = c->d, nq = (uint32_t)it->n_rows * c->group;
    bool f16 = kv->dtype == KERN_F16;
    const int32_t *blocks = a->pt.indices + a->pt.indptr[it->seq];

    /* Scratch: m[nq], l[nq], s[CHUNK], acc[nq][d]. */
    float *m = c->be->scratch[thread].p, *l = m + nq, *s = l + nq, *acc = s + CHUNK;
    for (uint32_t qi = 0; qi < nq; qi++) {
        m[qi] = -INFINITY;
        l[qi] = 0.0f;
    }
    memset(acc, 0, (size_t)nq * d * sizeof(float));

    const void *kp[CHUNK], *vp[CHUNK];
    for (int32_t jc = it->j0; jc < it->j1; jc += CHUNK) {
        int nk = it->j1 - jc < CHUNK ? it->j1 - jc : CHUNK;
        for (int t = 0; t < nk; t++) {
            int32_t j = jc + t;
            uint32_t blk = (uint32_t)blocks[(uint32_t)j / kv->block_tokens];
            size_t off = kern__kv_offset(kv, a->layer, blk, it->g, (uint32_t)j % kv->block_tokens);
            kp[t] = (const uint8_t *)kv->k + off;
            vp[t] = (const uint8_t *)kv->v + off;
        }
        for (uint32_t qi = 0; qi < nq; qi++) {
            int32_t len = a->kv_len[it->row0 + (int32_t)(qi / c->group)];
            int lim = len - jc < nk ? len - jc : nk;
            if (lim <= 0)
                continue;
            const float *q = a->q + q_offset(c, it->row0, it->g, qi);
            float *ac = acc + (size_t)qi * d;
#ifdef CPU_HAVE_X86
            if (c->simd)
                scores_avx2(q, kp, lim, d, f16, a->scale, s);
            else
#endif
                scores_scalar(q, kp, lim, d, f16, a->scale, s);
            float mx = m[qi];
            for (int t = 0; t < lim; t++)
                mx = s[t] > mx ? s[t] : mx;
            /* First chunk: m is -inf, acc and l are 0, alpha = 0. */
            float alpha = m[qi] == -INFINITY ? 0.0f : expf(m[qi] - mx);
#ifdef CPU_HAVE_X86
            if (c->simd)
                exp_avx2(s, lim, mx);
            else
#endif
                exp_scalar(s, lim, mx);
            float sum = 0.0f;
            for (int t = 0; t < lim; t++)
                sum += s[t];
            l[qi] = l[qi] * alpha + sum;
            m[qi] = mx;
#ifdef CPU_HAVE_X86
            if (c->simd)
                accum_avx2(ac, alpha, s, vp, lim, d, f16);
            else
#endif
                accum_scalar(ac, alpha, s, vp, lim, d, f16);
        }
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
    int rc = kern__cpu_work_reserve(be, items_bytes + groups_bytes + n_partial * sizeof(float),
                                    &work);
    if (rc == 0) {
        size_t nq_max = (size_t)rc_rows * c.group;
        rc = kern__cpu_scratch_reserve(be, (2 * nq_max + CHUNK + nq_max * c.d) * sizeof(float));
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
                    groups[ng++] = (attn_group_t){.row0 = r, .n_rows = nr, .g = g, .n_parts = p,
                                                  .part = off};
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
