/*
 * kernels/cpu/cpu_int.h — private to the "cpu" backend (kern_cpu.c,
 * cpu_pool.c, cpu_matmul.c, cpu_kquant.c, cpu_attn.c): the thread pool, the backend
 * struct with its per-thread scratch, and the entry points of the ops that
 * live in their own files.
 */
#ifndef KERN_CPU_INT_H
#define KERN_CPU_INT_H

#include "../kern_int.h"

/* ------------------------------------------------------------------------ */
/* Thread pool.                                                             */
/* ------------------------------------------------------------------------ */

typedef struct cpu_pool cpu_pool_t;

/* One task of a parallel loop.  `task` is in 0..n_tasks-1, `thread` in
 * 0..cpu_pool_size()-1 (0 is the calling thread) and indexes per-thread
 * scratch: no two tasks run on the same `thread` at once. */
typedef void (*cpu_task_fn)(void *ctx, int task, int thread);

/* Starts n_threads-1 workers, each at niceness `nice` when it is positive;
 * the thread calling cpu_pool_run is worker 0.  Returns 0, KVS_EINVAL
 * (n_threads < 1) or KVS_ENOMEM. */
int cpu_pool_new(int n_threads, int nice, cpu_pool_t **out);
void cpu_pool_free(cpu_pool_t *pool); /* NULL is a no-op; joins the workers */
int cpu_pool_size(const cpu_pool_t *pool);
/* Runs fn for every task and returns when all have finished.  Tasks are
 * handed out in increasing order, first come first served.  Thread: the
 * pool's owner only (one run at a time). */
void cpu_pool_run(cpu_pool_t *pool, int n_tasks, cpu_task_fn fn, void *ctx);

/* ------------------------------------------------------------------------ */
/* The backend.                                                             */
/* ------------------------------------------------------------------------ */

/* Instruction sets the kernels dispatch on, best last.  AVX-512 is used
 * only for its int8 dot product (VNNI: Q8_0, Q4_K and Q5_K weights): on Zen 4
 * (double-pumped 512-bit units) 16-lane versions of the f32 matmul tiles
 * measured no faster than AVX2 from DRAM and slower from cache. */
typedef enum cpu_isa {
    CPU_ISA_SCALAR = 0,
    CPU_ISA_AVX2 = 1,       /* AVX2 + FMA + F16C */
    CPU_ISA_AVX512VNNI = 2, /* and AVX-512 F, BW, VL, VNNI */
} cpu_isa_t;

typedef struct cpu_buf {
    void *p;
    size_t bytes;
} cpu_buf_t;

typedef struct kern_cpu {
    kern_backend_t base;
    cpu_pool_t *pool;
    int n_threads;
    cpu_isa_t isa;
    cpu_buf_t *scratch; /* [n_threads], per-thread, 64-byte aligned */
    cpu_buf_t work;     /* shared by the tasks of one op (attention plan, partials) */
} kern_cpu_t;

/* Makes every thread's scratch at least `bytes` (grown, never shrunk), so
 * tasks can use be->scratch[thread].p without allocating.  Call before
 * cpu_pool_run.  Returns 0 or KVS_ENOMEM. */
int kern__cpu_scratch_reserve(kern_cpu_t *be, size_t bytes);
/* Same for the shared workspace; *out gets its address. */
int kern__cpu_work_reserve(kern_cpu_t *be, size_t bytes, void **out);

/* Splits a product that streams `unit_bytes` of weights per unit (row or
 * panel) over n_units into tasks: several per thread, claimed dynamically
 * so a core that falls behind (a noisy neighbour, a page fault) takes
 * fewer, none under 64 KiB of weights, each a multiple of `align` units.
 * Returns the task count; *per gets the units per task. */
int kern__cpu_unit_tasks(const kern_cpu_t *be, size_t n_units, size_t unit_bytes, size_t align,
                         size_t *per);

/* Runs fn over n_tasks, inline when there is one task or one thread. */
void kern__cpu_parallel(kern_cpu_t *be, int n_tasks, cpu_task_fn fn, void *ctx);

/* Converts n elements of a row of any kern__types_supported weight
 * type to f32 with the best available instructions (cpu_matmul.c). */
void kern__cpu_row_to_f32(cpu_isa_t isa, kern_dtype_t type, const void *row, float *y, size_t n);

int kern__cpu_matmul(kern_cpu_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
                     const float *bias, float *y);

/* Q4_0 and the K-quants (cpu_kquant.c, x86 only).  The row conversion
 * equals kern_row_to_f32 bit for bit; the product is the decode (dot)
 * path for few x rows, with CPU_ISA_AVX2 or better. */
static inline bool
kern__cpu_is_kq(kern_dtype_t type)
{
    return type == KERN_Q4_0 || type == KERN_Q4_K || type == KERN_Q5_K || type == KERN_Q6_K;
}
void kern__cpu_kq_row_to_f32_avx2(kern_dtype_t type, const void *row, float *y, size_t n);
int kern__cpu_matmul_kq(kern_cpu_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
                        const float *bias, float *y);
int kern__cpu_attention(kern_cpu_t *be, const kern_attn_args_t *a);

/* The packed Q8_0 path (cpu_q8x16.c, KERN_LAYOUT_Q8_0_X16).  Packing
 * happens only with CPU_ISA_AVX512VNNI, which the other two then assume. */
int kern__cpu_pack_q8x16(kern_cpu_t *be, kern_tensor_t *w);
int kern__cpu_matmul_q8x16(kern_cpu_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
                           const float *bias, float *y);
/* Row r of a packed weight as f32 (get_rows). */
void kern__cpu_q8x16_row(const kern_tensor_t *w, uint32_t r, float *y);

/* ------------------------------------------------------------------------ */
/* SIMD helpers shared by the op files.                                     */
/* ------------------------------------------------------------------------ */

#if defined(__x86_64__)
#include <immintrin.h>
#define CPU_HAVE_X86 1

/* e^x, 8 lanes, for finite x: x is clamped to [-87.3, 88.3] so the result
 * stays a normal float.  x = n ln2 + r with |r| <= ln2/2 (ln2 split in two
 * so n ln2 is exact enough), e^r by its degree-7 Taylor polynomial, whose
 * truncation error (< 1e-8 relative) is below f32 rounding. */
__attribute__((target("avx2,fma"))) static inline __m256
cpu_exp_avx2(__m256 x)
{
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256i e =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

__attribute__((target("avx2,fma"))) static inline float
cpu_hsum_avx2(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#endif /* KERN_CPU_INT_H */
