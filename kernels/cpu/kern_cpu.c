/*
 * kernels/cpu/kern_cpu.c — the "cpu" backend: its vtable, construction
 * (thread pool, instruction set detection, per-thread scratch) and the
 * simple ops (get_rows, rmsnorm, rope, swiglu, add, kv_append, kv_copy).
 * Matrix products live in cpu_matmul.c and (packed Q8_0) cpu_q8x16.c,
 * attention in cpu_attn.c, the pool in cpu_pool.c.  Callers: kern.c
 * (kern_backend_new("cpu")).
 *
 * Every op splits its work into tasks only when there is enough of it to
 * pay for waking the workers; decode-sized elementwise ops run inline on
 * the calling thread.  Results agree with the "ref" backend to f32
 * rounding, except Q8_0 products, which quantize x (cpu_matmul.c,
 * cpu_q8x16.c); tests/kernels/test_kern_ops.c checks that.
 *
 * NOTE: the environment variable KVS_CPU_ISA=scalar or =avx2, read at
 * kern_backend_new(), caps the instruction set, so tests and benchmarks
 * can exercise the portable code paths on any machine.
 */
#include "cpu_int.h"

#ifdef CPU_HAVE_X86
#include <cpuid.h>
#endif
#include <math.h>
#include <stdlib.h>
#include <unistd.h>

#define ELEM_CHUNK 16384 /* floats per task for elementwise work */
#define MAX_THREADS 512

static const kern_ops_t cpu_ops;

/* ------------------------------------------------------------------------ */
/* Scratch, parallel loops, instruction sets.                               */
/* ------------------------------------------------------------------------ */

static int
buf_reserve(cpu_buf_t *b, size_t bytes)
{
    if (b->bytes >= bytes)
        return 0;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    void *p = aligned_alloc(64, rounded);
    if (p == NULL)
        return KVS_ENOMEM;
    free(b->p);
    b->p = p;
    b->bytes = rounded;
    return 0;
}

int
kern__cpu_scratch_reserve(kern_cpu_t *be, size_t bytes)
{
    for (int t = 0; t < be->n_threads; t++) {
        int rc = buf_reserve(&be->scratch[t], bytes);
        if (rc)
            return rc;
    }
    return 0;
}

int
kern__cpu_work_reserve(kern_cpu_t *be, size_t bytes, void **out)
{
    int rc = buf_reserve(&be->work, bytes);
    *out = be->work.p;
    return rc;
}

void
kern__cpu_parallel(kern_cpu_t *be, int n_tasks, cpu_task_fn fn, void *ctx)
{
    cpu_pool_run(be->pool, n_tasks, fn, ctx);
}

/* Tasks for `units` units of `unit_elems` floats each, about ELEM_CHUNK
 * floats per task; *per gets the units per task. */
static int
split_units(size_t units, size_t unit_elems, size_t *per)
{
    size_t p = unit_elems ? (ELEM_CHUNK + unit_elems - 1) / unit_elems : units;
    if (p < 1)
        p = 1;
    if ((units + p - 1) / p > INT32_MAX) /* absurd sizes: fewer, longer tasks */
        p = (units + INT32_MAX - 1) / INT32_MAX;
    *per = p;
    return (int)((units + p - 1) / p);
}

int
kern__cpu_unit_tasks(const kern_cpu_t *be, size_t n_units, size_t unit_bytes, size_t align,
                     size_t *per)
{
    const size_t min_bytes = 64 * 1024, per_thread = 4;
    size_t n = n_units * unit_bytes / min_bytes;
    if (n > (size_t)be->n_threads * per_thread)
        n = (size_t)be->n_threads * per_thread;
    if (n < 1)
        n = 1;
    size_t p = (n_units + n - 1) / n;
    p = (p + align - 1) / align * align;
    *per = p ? p : align;
    return (int)((n_units + *per - 1) / *per);
}

static cpu_isa_t
detect_isa(void)
{
    cpu_isa_t isa = CPU_ISA_SCALAR;
#ifdef CPU_HAVE_X86
    /* F16C from cpuid directly: clang's __builtin_cpu_supports lacks it. */
    unsigned eax, ebx, ecx, edx;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C))
        isa = CPU_ISA_AVX2;
    if (isa == CPU_ISA_AVX2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512vnni"))
        isa = CPU_ISA_AVX512VNNI;
#endif
    /* A cap, so tests can run the paths older machines take. */
    const char *cap = getenv("KVS_CPU_ISA");
    if (cap && strcmp(cap, "scalar") == 0)
        isa = CPU_ISA_SCALAR;
    else if (cap && strcmp(cap, "avx2") == 0 && isa > CPU_ISA_AVX2)
        isa = CPU_ISA_AVX2;
    return isa;
}

/* ------------------------------------------------------------------------ */
/* get_rows                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct rows_ctx {
    kern_cpu_t *be;
    const kern_tensor_t *w;
    const int32_t *ids;
    uint32_t n;
    size_t per;
    float *out;
} rows_ctx_t;

static void
get_rows_task(void *ctx, int task, int thread)
{
    (void)thread;
    const rows_ctx_t *c = ctx;
    size_t i0 = (size_t)task * c->per, i1 = i0 + c->per < c->n ? i0 + c->per : c->n;
    for (size_t i = i0; i < i1; i++)
        if (c->w->layout == KERN_LAYOUT_Q8_0_X16)
            kern__cpu_q8x16_row(c->w, (uint32_t)c->ids[i], c->out + i * c->w->n_cols);
        else
            kern__cpu_row_to_f32(c->be->isa, c->w->type,
                                 (const uint8_t *)c->w->data + (size_t)c->ids[i] * c->w->row_bytes,
                                 c->out + i * c->w->n_cols, c->w->n_cols);
}

static int
cpu_get_rows(kern_backend_t *base, const kern_tensor_t *w, const int32_t *ids, uint32_t n,
             float *out)
{
    rows_ctx_t c = {.be = (kern_cpu_t *)base, .w = w, .ids = ids, .n = n, .out = out};
    int n_tasks = split_units(n, w->n_cols, &c.per);
    kern__cpu_parallel(c.be, n_tasks, get_rows_task, &c);
    return 0;
}

static int
cpu_matmul(kern_backend_t *base, const kern_tensor_t *w, const float *x, uint32_t n,
           const float *bias, float *y)
{
    if (w->layout == KERN_LAYOUT_Q8_0_X16)
        return kern__cpu_matmul_q8x16((kern_cpu_t *)base, w, x, n, bias, y);
    return kern__cpu_matmul((kern_cpu_t *)base, w, x, n, bias, y);
}

static int
cpu_pack_weight(kern_backend_t *base, kern_tensor_t *w)
{
    return kern__cpu_pack_q8x16((kern_cpu_t *)base, w);
}

/* ------------------------------------------------------------------------ */
/* rmsnorm                                                                  */
/* ------------------------------------------------------------------------ */

typedef struct norm_ctx {
    kern_cpu_t *be;
    float *x;         /* written only when res is set */
    const float *res; /* add_rmsnorm: added to x first; else NULL */
    const float *w;
    float *y;
    uint32_t n, d;
    float eps;
    size_t per;
} norm_ctx_t;

#ifdef CPU_HAVE_X86
/* x += y; add_task's, so kern_add_rmsnorm is kern_add's sums. */
__attribute__((target("avx2"))) static void
add_avx2(float *x, const float *y, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(x + i, _mm256_add_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++)
        x[i] += y[i];
}

__attribute__((target("avx2,fma"))) static void
rmsnorm_row_avx2(const float *x, const float *w, uint32_t d, float eps, float *y)
{
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    uint32_t c = 0;
    for (; c + 16 <= d; c += 16) {
        __m256 v0 = _mm256_loadu_ps(x + c), v1 = _mm256_loadu_ps(x + c + 8);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
        a1 = _mm256_fmadd_ps(v1, v1, a1);
    }
    for (; c + 8 <= d; c += 8) {
        __m256 v0 = _mm256_loadu_ps(x + c);
        a0 = _mm256_fmadd_ps(v0, v0, a0);
    }
    double ss = cpu_hsum_avx2(_mm256_add_ps(a0, a1));
    for (; c < d; c++)
        ss += (double)x[c] * x[c];
    float scale = (float)(1.0 / sqrt(ss / d + eps));
    __m256 sv = _mm256_set1_ps(scale);
    for (c = 0; c + 8 <= d; c += 8)
        _mm256_storeu_ps(y + c, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + c), sv),
                                              _mm256_loadu_ps(w + c)));
    for (; c < d; c++)
        y[c] = x[c] * scale * w[c];
}
#endif

static void
rmsnorm_row_scalar(const float *x, const float *w, uint32_t d, float eps, float *y)
{
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    uint32_t c = 0;
    for (; c + 4 <= d; c += 4) {
        s0 += x[c] * x[c];
        s1 += x[c + 1] * x[c + 1];
        s2 += x[c + 2] * x[c + 2];
        s3 += x[c + 3] * x[c + 3];
    }
    for (; c < d; c++)
        s0 += x[c] * x[c];
    double ss = (double)(s0 + s1) + (double)(s2 + s3);
    float scale = (float)(1.0 / sqrt(ss / d + eps));
    for (c = 0; c < d; c++)
        y[c] = x[c] * scale * w[c];
}

static void
rmsnorm_task(void *ctx, int task, int thread)
{
    (void)thread;
    const norm_ctx_t *c = ctx;
    size_t i0 = (size_t)task * c->per, i1 = i0 + c->per < c->n ? i0 + c->per : c->n;
    for (size_t i = i0; i < i1; i++) {
        float *x = c->x + i * c->d, *y = c->y + i * c->d;
        const float *res = c->res ? c->res + i * c->d : NULL;
#ifdef CPU_HAVE_X86
        if (c->be->isa >= CPU_ISA_AVX2) {
            if (res)
                add_avx2(x, res, c->d);
            rmsnorm_row_avx2(x, c->w, c->d, c->eps, y);
            continue;
        }
#endif
        if (res)
            for (uint32_t k = 0; k < c->d; k++)
                x[k] += res[k];
        rmsnorm_row_scalar(x, c->w, c->d, c->eps, y);
    }
}

static int
cpu_rmsnorm(kern_backend_t *base, const float *x, const float *w, uint32_t n, uint32_t d, float eps,
            float *y)
{
    /* Without res the tasks only read x. */
    norm_ctx_t c = {
        .be = (kern_cpu_t *)base, .x = (float *)x, .w = w, .y = y, .n = n, .d = d, .eps = eps};
    int n_tasks = split_units(n, d, &c.per);
    kern__cpu_parallel(c.be, n_tasks, rmsnorm_task, &c);
    return 0;
}

/* Each row's add, then its norm, in one task: one dispatch instead of two. */
static int
cpu_add_rmsnorm(kern_backend_t *base, float *x, const float *res, const float *w, uint32_t n,
                uint32_t d, float eps, float *y)
{
    norm_ctx_t c = {
        .be = (kern_cpu_t *)base, .x = x, .res = res, .w = w, .y = y, .n = n, .d = d, .eps = eps};
    int n_tasks = split_units(n, d, &c.per);
    kern__cpu_parallel(c.be, n_tasks, rmsnorm_task, &c);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* rope                                                                     */
/* ------------------------------------------------------------------------ */

typedef struct rope_ctx {
    kern_cpu_t *be;
    const kern_rope_args_t *a;
    const double *inv_freq; /* [n_rot/2]: freq_scale * base^(-2i/n_rot) / factor_i */
    size_t per;
} rope_ctx_t;

#ifdef CPU_HAVE_X86
/* cc = (c0, c0, c1, c1, ...), ss = (-s0, s0, -s1, s1, ...): then
 * out = x * cc + pairswap(x) * ss rotates every pair in one pass. */
__attribute__((target("avx2,fma"))) static void
rope_apply_avx2(float *x, const float *cc, const float *ss, uint32_t n_rot)
{
    uint32_t c = 0;
    for (; c + 8 <= n_rot; c += 8) {
        __m256 v = _mm256_loadu_ps(x + c);
        __m256 sw = _mm256_permute_ps(v, 0xB1);
        _mm256_storeu_ps(x + c, _mm256_fmadd_ps(v, _mm256_loadu_ps(cc + c),
                                                _mm256_mul_ps(sw, _mm256_loadu_ps(ss + c))));
    }
    for (; c < n_rot; c += 2) {
        float x0 = x[c], x1 = x[c + 1];
        x[c] = x0 * cc[c] + x1 * ss[c];
        x[c + 1] = x1 * cc[c + 1] + x0 * ss[c + 1];
    }
}
#endif

static void
rope_task(void *ctx, int task, int thread)
{
    const rope_ctx_t *c = ctx;
    const kern_rope_args_t *a = c->a;
    float *cc = c->be->scratch[thread].p, *ss = cc + a->n_rot;
    size_t r0 = (size_t)task * c->per, r1 = r0 + c->per < a->n_rows ? r0 + c->per : a->n_rows;
    for (size_t r = r0; r < r1; r++) {
        /* The angles depend on the row only: one sin/cos per pair, in
         * double because pos * theta reaches 1e5 radians and more. */
        for (uint32_t i = 0; i < a->n_rot / 2; i++) {
            double th = (double)a->pos[r] * c->inv_freq[i];
            float cs = (float)cos(th), sn = (float)sin(th);
            cc[2 * i] = cs;
            cc[2 * i + 1] = cs;
            ss[2 * i] = -sn;
            ss[2 * i + 1] = sn;
        }
        /* x's heads of the row, then x2's. */
        for (uint32_t h = 0; h < a->n_heads + a->n_heads2; h++) {
            float *x = h < a->n_heads ? a->x + (r * a->n_heads + h) * a->head_dim
                                      : a->x2 + (r * a->n_heads2 + h - a->n_heads) * a->head_dim;
            if (a->neox) {
                uint32_t half = a->n_rot / 2;
                for (uint32_t i = 0; i < half; i++) {
                    float x0 = x[i], x1 = x[i + half], cs = cc[2 * i], sn = ss[2 * i + 1];
                    x[i] = x0 * cs - x1 * sn;
                    x[i + half] = x0 * sn + x1 * cs;
                }
                continue;
            }
#ifdef CPU_HAVE_X86
            if (c->be->isa >= CPU_ISA_AVX2) {
                rope_apply_avx2(x, cc, ss, a->n_rot);
                continue;
            }
#endif
            for (uint32_t k = 0; k < a->n_rot; k += 2) {
                float x0 = x[k], x1 = x[k + 1];
                x[k] = x0 * cc[k] + x1 * ss[k];
                x[k + 1] = x1 * cc[k + 1] + x0 * ss[k + 1];
            }
        }
    }
}

static int
cpu_rope(kern_backend_t *base, const kern_rope_args_t *a)
{
    kern_cpu_t *be = (kern_cpu_t *)base;
    double *inv_freq;
    int rc = kern__cpu_work_reserve(be, (a->n_rot / 2) * sizeof(double), (void **)&inv_freq);
    if (rc == 0)
        rc = kern__cpu_scratch_reserve(be, 2 * (size_t)a->n_rot * sizeof(float));
    if (rc)
        return rc;
    for (uint32_t i = 0; i < a->n_rot / 2; i++) {
        inv_freq[i] = a->freq_scale * pow(a->freq_base, -2.0 * i / a->n_rot);
        if (a->freq_factors)
            inv_freq[i] /= a->freq_factors[i];
    }
    rope_ctx_t c = {.be = be, .a = a, .inv_freq = inv_freq};
    int n_tasks = split_units(a->n_rows, (size_t)(a->n_heads + a->n_heads2) * a->head_dim, &c.per);
    kern__cpu_parallel(be, n_tasks, rope_task, &c);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* swiglu, add                                                              */
/* ------------------------------------------------------------------------ */

typedef struct elem_ctx {
    kern_cpu_t *be;
    float *x;       /* add: in/out */
    const float *y; /* add */
    const float *gate, *up;
    float *out;
    size_t n;
    size_t per; /* elements per task */
} elem_ctx_t;

#ifdef CPU_HAVE_X86
__attribute__((target("avx2,fma"))) static void
swiglu_avx2(const float *g, const float *u, size_t n, float *out)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 gv = _mm256_loadu_ps(g + i);
        __m256 e = cpu_exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), gv));
        __m256 num = _mm256_mul_ps(gv, _mm256_loadu_ps(u + i));
        _mm256_storeu_ps(out + i, _mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0f), e)));
    }
    for (; i < n; i++)
        out[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

#endif

static void
swiglu_task(void *ctx, int task, int thread)
{
    (void)thread;
    const elem_ctx_t *c = ctx;
    size_t i0 = (size_t)task * c->per;
    size_t m = c->n - i0 < c->per ? c->n - i0 : c->per;
#ifdef CPU_HAVE_X86
    if (c->be->isa >= CPU_ISA_AVX2) {
        swiglu_avx2(c->gate + i0, c->up + i0, m, c->out + i0);
        return;
    }
#endif
    for (size_t i = i0; i < i0 + m; i++)
        c->out[i] = c->gate[i] / (1.0f + expf(-c->gate[i])) * c->up[i];
}

static void
add_task(void *ctx, int task, int thread)
{
    (void)thread;
    const elem_ctx_t *c = ctx;
    size_t i0 = (size_t)task * c->per;
    size_t m = c->n - i0 < c->per ? c->n - i0 : c->per;
#ifdef CPU_HAVE_X86
    if (c->be->isa >= CPU_ISA_AVX2) {
        add_avx2(c->x + i0, c->y + i0, m);
        return;
    }
#endif
    for (size_t i = i0; i < i0 + m; i++)
        c->x[i] += c->y[i];
}

static int
cpu_swiglu(kern_backend_t *base, const float *gate, const float *up, size_t n, float *out)
{
    elem_ctx_t c = {.be = (kern_cpu_t *)base, .gate = gate, .up = up, .out = out, .n = n};
    kern__cpu_parallel(c.be, split_units(n, 1, &c.per), swiglu_task, &c);
    return 0;
}

static int
cpu_add(kern_backend_t *base, float *x, const float *y, size_t n)
{
    elem_ctx_t c = {.be = (kern_cpu_t *)base, .x = x, .y = y, .n = n};
    kern__cpu_parallel(c.be, split_units(n, 1, &c.per), add_task, &c);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* kv_append, kv_copy                                                       */
/* ------------------------------------------------------------------------ */

typedef struct kv_ctx {
    kern_cpu_t *be;
    const kern_kv_t *kv;
    uint32_t layer;
    const float *k, *v;
    const int32_t *slots;
    const int32_t *src, *dst;
    uint32_t n;
    size_t per;
} kv_ctx_t;

#ifdef CPU_HAVE_X86
__attribute__((target("avx2,f16c"))) static void
f32_to_f16_avx2(const float *x, uint16_t *h, size_t n)
{
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(h + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++)
        h[i] = kvs_f32_to_fp16(x[i]);
}
#endif

static void
kv_store(const kv_ctx_t *c, void *buf, size_t off, const float *src)
{
    const kern_kv_t *kv = c->kv;
    if (kv->dtype == KERN_F16) {
        uint16_t *dst = (uint16_t *)((uint8_t *)buf + off);
#ifdef CPU_HAVE_X86
        if (c->be->isa >= CPU_ISA_AVX2) {
            f32_to_f16_avx2(src, dst, kv->head_dim);
            return;
        }
#endif
        for (uint32_t i = 0; i < kv->head_dim; i++)
            dst[i] = kvs_f32_to_fp16(src[i]);
    } else {
        memcpy((uint8_t *)buf + off, src, kv->head_dim * sizeof(float));
    }
}

static void
kv_append_task(void *ctx, int task, int thread)
{
    (void)thread;
    const kv_ctx_t *c = ctx;
    const kern_kv_t *kv = c->kv;
    size_t stride = (size_t)kv->n_kv_heads * kv->head_dim;
    size_t i0 = (size_t)task * c->per, i1 = i0 + c->per < c->n ? i0 + c->per : c->n;
    for (size_t i = i0; i < i1; i++) {
        uint32_t block = (uint32_t)c->slots[i] / kv->block_tokens;
        uint32_t off = (uint32_t)c->slots[i] % kv->block_tokens;
        for (uint32_t h = 0; h < kv->n_kv_heads; h++) {
            size_t dst = kern__kv_offset(kv, c->layer, block, h, off);
            kv_store(c, kv->k, dst, c->k + i * stride + (size_t)h * kv->head_dim);
            kv_store(c, kv->v, dst, c->v + i * stride + (size_t)h * kv->head_dim);
        }
    }
}

static int
cpu_kv_append(kern_backend_t *base, const kern_kv_t *kv, uint32_t layer, const float *k,
              const float *v, const int32_t *slots, uint32_t n)
{
    kv_ctx_t c = {
        .be = (kern_cpu_t *)base, .kv = kv, .layer = layer, .k = k, .v = v, .slots = slots, .n = n};
    /* Two slots may repeat within one call; then the later token must win,
     * which only a single task guarantees. */
    int n_tasks = split_units(n, 2 * (size_t)kv->n_kv_heads * kv->head_dim, &c.per);
    for (uint32_t i = 0; n_tasks > 1 && i + 1 < n; i++)
        if (slots[i + 1] <= slots[i]) {
            c.per = n;
            n_tasks = 1;
        }
    kern__cpu_parallel(c.be, n_tasks, kv_append_task, &c);
    return 0;
}

/* One task per layer keeps the copies of a layer in call order, so chained
 * copies (a->b, b->c) behave as in the sequential reference. */
static void
kv_copy_task(void *ctx, int task, int thread)
{
    (void)thread;
    const kv_ctx_t *c = ctx;
    const kern_kv_t *kv = c->kv;
    size_t block_bytes = kern__kv_offset(kv, 0, 1, 0, 0);
    for (uint32_t i = 0; i < c->n; i++) {
        size_t s = kern__kv_offset(kv, (uint32_t)task, (uint32_t)c->src[i], 0, 0);
        size_t d = kern__kv_offset(kv, (uint32_t)task, (uint32_t)c->dst[i], 0, 0);
        memmove((uint8_t *)kv->k + d, (const uint8_t *)kv->k + s, block_bytes);
        memmove((uint8_t *)kv->v + d, (const uint8_t *)kv->v + s, block_bytes);
    }
}

static int
cpu_kv_copy(kern_backend_t *base, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
            uint32_t n)
{
    kv_ctx_t c = {.be = (kern_cpu_t *)base, .kv = kv, .src = src, .dst = dst, .n = n};
    size_t total = kern__kv_offset(kv, 0, 1, 0, 0) * 2 * n * kv->n_layers;
    if (total < (1u << 20)) {
        for (uint32_t l = 0; l < kv->n_layers; l++)
            kv_copy_task(&c, (int)l, 0);
        return 0;
    }
    kern__cpu_parallel(c.be, (int)kv->n_layers, kv_copy_task, &c);
    return 0;
}

/* One task per layer, as for copies. */
static void
kv_seal_task(void *ctx, int task, int thread)
{
    const kv_ctx_t *c = ctx;
    kern__host_kv_seal_layer(c->kv, (uint32_t)task, c->src, c->dst, c->n, c->be->scratch[thread].p);
}

static int
cpu_kv_seal(kern_backend_t *base, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
            uint32_t n)
{
    kv_ctx_t c = {.be = (kern_cpu_t *)base, .kv = kv, .src = src, .dst = dst, .n = n};
    int rc = kern__cpu_scratch_reserve(c.be, ((size_t)kv->block_tokens + 2) * kv->head_dim *
                                                 sizeof(float));
    if (rc)
        return rc;
    kern__cpu_parallel(c.be, (int)kv->n_layers, kv_seal_task, &c);
    return 0;
}

/* One task per layer: the layers' rows lie apart, and no destination is a
 * source (kern.h), so the order does not matter. */
static void
kv_gather_task(void *ctx, int task, int thread)
{
    const kv_ctx_t *c = ctx;
    kern__host_kv_gather_layer(c->kv, (uint32_t)task, c->src, c->dst, c->n,
                               c->be->scratch[thread].p);
}

static int
cpu_kv_gather(kern_backend_t *base, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
              uint32_t n)
{
    kv_ctx_t c = {.be = (kern_cpu_t *)base, .kv = kv, .src = src, .dst = dst, .n = n};
    int rc = kern__cpu_scratch_reserve(c.be, (size_t)kv->head_dim * sizeof(float));
    if (rc)
        return rc;
    /* A few rows are memcpy-sized work: waking the pool costs more. */
    if ((size_t)n * kv->n_kv_heads * kv->head_dim * 2 < (1u << 16)) {
        for (uint32_t l = 0; l < kv->n_layers; l++)
            kv_gather_task(&c, (int)l, 0);
        return 0;
    }
    kern__cpu_parallel(c.be, (int)kv->n_layers, kv_gather_task, &c);
    return 0;
}

/* Quest bounds: tasks of BOUNDS_CHUNK blocks of one KV head. */
#define BOUNDS_CHUNK 64

typedef struct bounds_ctx {
    kern_cpu_t *be;
    const kern_kv_t *kv;
    uint32_t layer;
    const int32_t *blocks;
    uint32_t n, n_chunks;
    uint16_t *out;
    bool by_block;
} bounds_ctx_t;

#ifdef CPU_HAVE_X86
/* One full-precision f16 block's key maxima and minima straight from its
 * rows, eight lanes at a time: Quest at decode bounds every block of the
 * context each step, where a copy of each block in f32 first cost more
 * than dense attention.  Operands as kern__host_block_minmax compares
 * them (a NaN key leaves the running value). */
__attribute__((target("avx2,f16c"))) static void
bounds_f16_avx2(const uint16_t *k, uint32_t bt, uint32_t d, float *mx, float *mn)
{
    uint32_t e = 0;
    for (; e + 8 <= d; e += 8) {
        __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + e))), lo = hi;
        for (uint32_t t = 1; t < bt; t++) {
            __m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(k + (size_t)t * d + e)));
            hi = _mm256_max_ps(x, hi);
            lo = _mm256_min_ps(x, lo);
        }
        _mm256_storeu_ps(mx + e, hi);
        _mm256_storeu_ps(mn + e, lo);
    }
    for (; e < d; e++) {
        float a = kvs_fp16_to_f32(k[e]), b = a;
        for (uint32_t t = 1; t < bt; t++) {
            float x = kvs_fp16_to_f32(k[(size_t)t * d + e]);
            a = x > a ? x : a;
            b = x < b ? x : b;
        }
        mx[e] = a;
        mn[e] = b;
    }
}
#endif

#ifdef CPU_HAVE_X86
/* kern__host_bounds_round eight lanes at a time: the same bits (F16C
 * rounds toward either infinity exactly; min/max with the bound second
 * pass a NaN through), at a cost that stays below the read of the block
 * when Quest summarises every candidate at each step. */
__attribute__((target("avx2,f16c"))) static void
bounds_round_f16c(const float *mx, const float *mn, uint32_t d, uint16_t *out)
{
    const __m256 hi = _mm256_set1_ps(65504.0f), lo = _mm256_set1_ps(-65504.0f);
    uint32_t e = 0;
    for (; e + 8 <= d; e += 8) {
        __m256 a = _mm256_max_ps(lo, _mm256_min_ps(hi, _mm256_loadu_ps(mx + e)));
        __m256 b = _mm256_max_ps(lo, _mm256_min_ps(hi, _mm256_loadu_ps(mn + e)));
        _mm_storeu_si128((__m128i *)(out + e),
                         _mm256_cvtps_ph(a, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
        _mm_storeu_si128((__m128i *)(out + d + e),
                         _mm256_cvtps_ph(b, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    }
    for (; e < d; e++) {
        out[e] = kvs_f32_to_fp16_dir(mx[e], true);
        out[d + e] = kvs_f32_to_fp16_dir(mn[e], false);
    }
}
#endif

static void
bounds_task(void *ctx, int task, int thread)
{
    const bounds_ctx_t *c = ctx;
    const kern_kv_t *kv = c->kv;
    uint32_t g = (uint32_t)task / c->n_chunks, i0 = (uint32_t)task % c->n_chunks * BOUNDS_CHUNK;
    uint32_t i1 = i0 + BOUNDS_CHUNK < c->n ? i0 + BOUNDS_CHUNK : c->n;
    const uint32_t d = kv->head_dim;
    float *x = c->be->scratch[thread].p, *mx = x + (size_t)kv->block_tokens * d, *mn = mx + d;
#ifdef CPU_HAVE_X86
    const bool avx2 = c->be->isa >= CPU_ISA_AVX2;
#endif
    for (uint32_t i = i0; i < i1; i++) {
        const uint32_t b = (uint32_t)c->blocks[i];
        uint16_t *out = kern__host_bounds_out(kv, c->blocks, c->n, g, i, c->out, c->by_block);
#ifdef CPU_HAVE_X86
        if (avx2) {
            if (kv->dtype == KERN_F16 && !kern__kv_cold(kv, b)) /* else decoded to f32 first */
                bounds_f16_avx2((const uint16_t *)((const uint8_t *)kv->k +
                                                   kern__kv_offset(kv, c->layer, b, g, 0)),
                                kv->block_tokens, d, mx, mn);
            else
                kern__host_block_minmax(kv, c->layer, b, g, x, mx, mn);
            bounds_round_f16c(mx, mn, d, out);
            continue;
        }
#endif
        kern__host_block_minmax(kv, c->layer, b, g, x, mx, mn);
        kern__host_bounds_round(mx, mn, d, out);
    }
}

#ifdef CPU_HAVE_X86
/* sum_e max(q_e mx_e, q_e mn_e) for one query head against one block's
 * bounds, the same products as the GEMM's split (max(q, 0) mx + min(q, 0)
 * mn, term by term), summed in eight lanes. */
__attribute__((target("avx2,fma,f16c"))) static float
bound_avx2(const float *q, const uint16_t *mx, uint32_t d)
{
    const uint16_t *mn = mx + d;
    __m256 acc = _mm256_setzero_ps();
    uint32_t e = 0;
    for (; e + 8 <= d; e += 8) {
        __m256 x = _mm256_loadu_ps(q + e);
        __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mx + e)));
        __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(mn + e)));
        acc = _mm256_add_ps(acc, _mm256_max_ps(_mm256_mul_ps(x, hi), _mm256_mul_ps(x, lo)));
    }
    float s = (float)cpu_hsum_avx2(acc);
    for (; e < d; e++) {
        float u = q[e] * kvs_fp16_to_f32(mx[e]), w = q[e] * kvs_fp16_to_f32(mn[e]);
        s += u > w ? u : w;
    }
    return s;
}
#endif

#ifdef CPU_HAVE_X86
/* One task of the direct path: query group grp's score row for one KV
 * head (every KV head into one row without per_kv_head). */
static void
few_scores_task(void *ctx, int task, int thread)
{
    (void)thread;
    const kern_block_score_args_t *a = ctx;
    const uint32_t d = a->head_dim, G = a->n_heads / a->n_kv_heads;
    const uint32_t qg = a->q_group ? a->q_group : 1, heads = a->per_kv_head ? a->n_kv_heads : 1;
    const uint32_t grp = (uint32_t)task / heads, g0 = (uint32_t)task % heads;
    const uint32_t g1 = a->per_kv_head ? g0 + 1 : a->n_kv_heads;
    const uint32_t i1 = (grp + 1) * qg < a->n_q ? (grp + 1) * qg : a->n_q;
    float *sc = kern__host_score_row(a, grp, g0);
    uint32_t first, nb = kern__host_group_blocks(a, grp, &first);
    for (uint32_t b = 0; b < nb; b++)
        sc[b] = -INFINITY;
    for (uint32_t g = g0; g < g1; g++)
        for (uint32_t i = grp * qg; i < i1; i++)
            for (uint32_t hh = 0; hh < G; hh++) {
                const float *q = a->q + ((size_t)i * a->n_heads + (size_t)g * G + hh) * d;
                for (uint32_t b = 0; b < nb; b++) {
                    float v = bound_avx2(q, kern__host_bound(a, g, first + b), d);
                    sc[b] = v > sc[b] ? v : sc[b];
                }
            }
}
#endif

/* Quest's scores.  Decode rows (a few query heads against every block of
 * the context, or rows of several sequences with lists of their own) are
 * products too thin for a GEMM to pay: its packing of the bounds cost
 * more than the sums; those go block by block, a task per score row. */
static int
cpu_block_scores(kern_backend_t *base, const kern_block_score_args_t *a)
{
#ifdef CPU_HAVE_X86
    kern_cpu_t *be = (kern_cpu_t *)base;
    const uint32_t G = a->n_heads / a->n_kv_heads, qg = a->q_group ? a->q_group : 1;
    if (be->isa >= CPU_ISA_AVX2 && (a->n_q * G <= 8 || a->bounds_indptr)) {
        const uint32_t n_groups = (a->n_q + qg - 1) / qg;
        const uint32_t heads = a->per_kv_head ? a->n_kv_heads : 1;
        kern__cpu_parallel(be, (int)(n_groups * heads), few_scores_task, (void *)a);
        return 0;
    }
#endif
    if (a->bounds_indptr) /* rows of their own lists: no one product */
        return kern__host_block_scores_ref(base, a);
    return kern__host_block_scores_gemm(base, a);
}

static int
cpu_block_bounds(kern_backend_t *base, const kern_kv_t *kv, uint32_t layer, const int32_t *blocks,
                 uint32_t n, uint16_t *out, bool by_block)
{
    bounds_ctx_t c = {.be = (kern_cpu_t *)base,
                      .kv = kv,
                      .layer = layer,
                      .blocks = blocks,
                      .n = n,
                      .n_chunks = (n + BOUNDS_CHUNK - 1) / BOUNDS_CHUNK,
                      .out = out,
                      .by_block = by_block};
    int rc = kern__cpu_scratch_reserve(c.be, ((size_t)kv->block_tokens + 2) * kv->head_dim *
                                                 sizeof(float));
    if (rc)
        return rc;
    kern__cpu_parallel(c.be, (int)(kv->n_kv_heads * c.n_chunks), bounds_task, &c);
    return 0;
}

static void
mass_task(void *ctx, int task, int thread)
{
    const kern_attn_mass_args_t *a = ((void **)ctx)[1];
    kern_cpu_t *be = ((void **)ctx)[0];
    kern__host_attn_mass_head(a, (uint32_t)task, be->scratch[thread].p);
}

/* SUM: KV heads write their own rows, so they run in parallel; POOL_MAX
 * folds every head into the same rows, in turn. */
static int
cpu_attn_mass(kern_backend_t *base, const kern_attn_mass_args_t *a)
{
    kern_cpu_t *be = (kern_cpu_t *)base;
    int rc = kern__cpu_scratch_reserve(be, kern__host_attn_mass_scratch(a));
    if (rc)
        return rc;
    if (a->mode == KERN_MASS_POOL_MAX || a->kv->n_kv_heads == 1) {
        kern__host_attn_mass_all(a, be->scratch[0].p);
        return 0;
    }
    void *ctx[2] = {be, (void *)a};
    kern__cpu_parallel(be, (int)a->kv->n_kv_heads, mass_task, ctx);
    return 0;
}

static int
cpu_attention(kern_backend_t *base, const kern_attn_args_t *a)
{
    return kern__cpu_attention((kern_cpu_t *)base, a);
}

/* ------------------------------------------------------------------------ */
/* Life cycle.                                                              */
/* ------------------------------------------------------------------------ */

static bool
cpu_supports(const kern_backend_t *be, kern_op_t op, kern_dtype_t type)
{
    (void)be;
    return kern__types_supported(op, type);
}

static void
cpu_destroy(kern_backend_t *base)
{
    kern_cpu_t *be = (kern_cpu_t *)base;
    cpu_pool_free(be->pool);
    if (be->scratch)
        for (int t = 0; t < be->n_threads; t++)
            free(be->scratch[t].p);
    free(be->scratch);
    free(be->work.p);
    free(be);
}

int
kern__cpu_new(const kern_backend_cfg_t *cfg, kern_backend_t **out)
{
    *out = NULL;
    long n = cfg->n_threads;
    if (n == 0)
        n = (long)kvs_cpu_count();
    if (n < 1)
        n = 1;
    if (n > MAX_THREADS)
        n = MAX_THREADS;
    kern_cpu_t *be = calloc(1, sizeof(*be));
    if (be == NULL)
        return KVS_ENOMEM;
    be->base.ops = &cpu_ops;
    be->n_threads = (int)n;
    be->isa = detect_isa();
    be->scratch = calloc((size_t)n, sizeof(cpu_buf_t));
    int rc = be->scratch ? cpu_pool_new((int)n, cfg ? cfg->nice : 0, &be->pool) : KVS_ENOMEM;
    if (rc) {
        cpu_destroy(&be->base);
        return rc;
    }
    *out = &be->base;
    return 0;
}

static const kern_ops_t cpu_ops = {
    .name = "cpu",
    .is_host = true,
    .destroy = cpu_destroy,    /* joins the pool, frees scratch */
    .supports = cpu_supports,  /* same types as ref */
    .alloc = kern__host_alloc, /* 64-byte aligned host memory */
    .free = kern__host_free,
    .upload = kern__host_copy,
    .download = kern__host_copy,
    .memset = kern__host_memset,
    .sync = kern__host_sync,        /* ops finish before returning */
    .get_rows = cpu_get_rows,       /* SIMD conversion, parallel over ids */
    .matmul = cpu_matmul,           /* cpu_matmul.c: dot path or tiled sgemm */
    .rmsnorm = cpu_rmsnorm,         /* parallel over rows */
    .add_rmsnorm = cpu_add_rmsnorm, /* the same tasks, each row added first */
    .rope = cpu_rope,               /* sin/cos per row in double, SIMD rotate */
    .swiglu = cpu_swiglu,           /* SIMD exp */
    .add = cpu_add,
    .kv_append = cpu_kv_append,            /* vcvtps2ph for F16 pools */
    .kv_copy = cpu_kv_copy,                /* memmove per (layer, block) */
    .attention = cpu_attention,            /* cpu_attn.c: paged flash attention */
    .delta_apply = kern__host_delta_apply, /* a few rows per block: memory-bound, one thread */
    .pack_weight = cpu_pack_weight,        /* Q8_0 in 16-row panels with AVX-512 VNNI */
    .kv_seal = cpu_kv_seal,                /* per layer, through kern_kvq_encode */
    .kv_gather = cpu_kv_gather,            /* per layer, rows memcpy'd or decoded */
    .block_bounds = cpu_block_bounds,      /* parallel over (KV head, 64 blocks) */
    .block_scores = cpu_block_scores,      /* cpu_matmul per KV head, or sums for a row */
    .attn_mass = cpu_attn_mass,            /* KV heads in parallel (SUM) */
};
