/*
 * kernels/cpu/cpu_pool.c — the cpu backend's thread pool: a fixed set of
 * workers that run the tasks of one parallel loop at a time.  Called by the
 * cpu backend ops through kern__cpu_parallel.
 *
 *   caller (worker 0)                    workers 1..n-1
 *   -----------------                    --------------
 *   fn, ctx = ...; done = 0
 *   state = {gen+1, n_tasks, next=0}  -> see gen change (spin, else condvar)
 *   claim tasks by CAS on state          claim tasks by CAS on state
 *   wait until done == n_tasks           done++ after each task
 *
 * All of a job's bookkeeping sits in one 64-bit word, state = generation
 * (24 bits) | n_tasks (20 bits) | next task (20 bits), so a worker that
 * claims a task by compare-and-swap knows in the same atomic step that the
 * task belongs to the job it read fn and ctx for: the caller cannot publish
 * a new job until every claimed task has reported done, so it never has to
 * wait for idle or sleeping workers to acknowledge anything.
 *
 * Decode issues about a hundred small ops per token, so idle workers spin
 * for a short while (SPIN_NS) before sleeping on the condvar, and the
 * caller only takes the mutex to wake them when one is actually asleep.
 */
#include "cpu_int.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

#define GEN_SHIFT 40
#define NT_SHIFT 20
#define FIELD_MASK ((UINT64_C(1) << 20) - 1)
#define MAX_TASKS ((int)FIELD_MASK)
#define SPIN_NS 50000 /* idle workers spin 50 us before sleeping */

typedef struct worker {
    cpu_pool_t *pool;
    int id;
    int nice;
    pthread_t tid;
} worker_t;

struct cpu_pool {
    int n_threads;
    int n_started;
    worker_t *workers; /* [n_threads], entry 0 unused (the caller) */
    _Atomic uint64_t state;
    _Atomic int done;
    _Atomic int n_sleepers;
    _Atomic bool stop;
    cpu_task_fn fn; /* written by the caller before publishing state */
    void *ctx;
    int base; /* task index of the job's first task */
    pthread_mutex_t mu;
    pthread_cond_t cv;
};

static inline uint32_t
state_gen(uint64_t s)
{
    return (uint32_t)(s >> GEN_SHIFT);
}

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Claims and runs tasks of generation `gen` until none are left. */
static void
run_tasks(cpu_pool_t *pool, uint32_t gen, int thread)
{
    uint64_t s = atomic_load_explicit(&pool->state, memory_order_acquire);
    for (;;) {
        uint64_t next = s & FIELD_MASK, n = (s >> NT_SHIFT) & FIELD_MASK;
        if (state_gen(s) != gen || next >= n)
            return;
        if (!atomic_compare_exchange_weak_explicit(&pool->state, &s, s + 1, memory_order_acq_rel,
                                                   memory_order_acquire))
            continue;
        pool->fn(pool->ctx, pool->base + (int)next, thread);
        atomic_fetch_add_explicit(&pool->done, 1, memory_order_release);
        s = atomic_load_explicit(&pool->state, memory_order_acquire);
    }
}

static void *
worker_main(void *arg)
{
    worker_t *w = arg;
    cpu_pool_t *pool = w->pool;
    /* Per thread on Linux: a server's network threads keep their priority. */
    if (w->nice > 0 && setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), w->nice) != 0)
        KVS_WARNF("cpu pool: cannot lower worker %d's priority", w->id);
    uint32_t seen = state_gen(atomic_load(&pool->state));
    for (;;) {
        uint64_t t0 = 0;
        for (int spins = 0;; spins++) {
            if (state_gen(atomic_load_explicit(&pool->state, memory_order_acquire)) != seen ||
                atomic_load_explicit(&pool->stop, memory_order_relaxed))
                break;
            CPU_RELAX();
            if ((spins & 63) != 63)
                continue;
            uint64_t t = now_ns();
            if (t0 == 0) {
                t0 = t;
            } else if (t - t0 > SPIN_NS) {
                /* The seq_cst increment pairs with the caller's seq_cst
                 * store of state and load of n_sleepers: either we see the
                 * new generation here, or the caller sees us asleep and
                 * signals under the mutex. */
                pthread_mutex_lock(&pool->mu);
                atomic_fetch_add(&pool->n_sleepers, 1);
                while (state_gen(atomic_load(&pool->state)) == seen && !atomic_load(&pool->stop))
                    pthread_cond_wait(&pool->cv, &pool->mu);
                atomic_fetch_sub(&pool->n_sleepers, 1);
                pthread_mutex_unlock(&pool->mu);
                break;
            }
        }
        if (atomic_load(&pool->stop))
            return NULL;
        seen = state_gen(atomic_load_explicit(&pool->state, memory_order_acquire));
        run_tasks(pool, seen, w->id);
    }
}

static void
wake_sleepers(cpu_pool_t *pool)
{
    if (atomic_load(&pool->n_sleepers) > 0) {
        pthread_mutex_lock(&pool->mu);
        pthread_cond_broadcast(&pool->cv);
        pthread_mutex_unlock(&pool->mu);
    }
}

int
cpu_pool_new(int n_threads, int nice, cpu_pool_t **out)
{
    *out = NULL;
    if (n_threads < 1)
        return KVS_EINVAL;
    cpu_pool_t *pool = calloc(1, sizeof(*pool));
    if (pool == NULL)
        return KVS_ENOMEM;
    pool->n_threads = n_threads;
    pool->workers = calloc((size_t)n_threads, sizeof(worker_t));
    if (pool->workers == NULL) {
        free(pool);
        return KVS_ENOMEM;
    }
    atomic_init(&pool->state, 0);
    atomic_init(&pool->done, 0);
    atomic_init(&pool->n_sleepers, 0);
    atomic_init(&pool->stop, false);
    if (pthread_mutex_init(&pool->mu, NULL) != 0) {
        free(pool->workers);
        free(pool);
        return KVS_ENOMEM;
    }
    if (pthread_cond_init(&pool->cv, NULL) != 0) {
        pthread_mutex_destroy(&pool->mu);
        free(pool->workers);
        free(pool);
        return KVS_ENOMEM;
    }
    pool->n_started = 1;
    for (int i = 1; i < n_threads; i++) {
        pool->workers[i].pool = pool;
        pool->workers[i].id = i;
        pool->workers[i].nice = nice;
        if (pthread_create(&pool->workers[i].tid, NULL, worker_main, &pool->workers[i]) != 0) {
            cpu_pool_free(pool);
            return KVS_ENOMEM;
        }
        pool->n_started = i + 1;
    }
    *out = pool;
    return 0;
}

void
cpu_pool_free(cpu_pool_t *pool)
{
    if (pool == NULL)
        return;
    atomic_store(&pool->stop, true);
    pthread_mutex_lock(&pool->mu);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n_started; i++)
        pthread_join(pool->workers[i].tid, NULL);
    pthread_cond_destroy(&pool->cv);
    pthread_mutex_destroy(&pool->mu);
    free(pool->workers);
    free(pool);
}

int
cpu_pool_size(const cpu_pool_t *pool)
{
    return pool->n_threads;
}

void
cpu_pool_run(cpu_pool_t *pool, int n_tasks, cpu_task_fn fn, void *ctx)
{
    if (n_tasks <= 0)
        return;
    if (pool->n_threads == 1 || n_tasks == 1) {
        for (int t = 0; t < n_tasks; t++)
            fn(ctx, t, 0);
        return;
    }
    /* The task count has 20 bits in the state word; run huge loops in rounds. */
    for (int base = 0; base < n_tasks; base += MAX_TASKS) {
        int n = n_tasks - base < MAX_TASKS ? n_tasks - base : MAX_TASKS;
        pool->base = base;
        pool->fn = fn;
        pool->ctx = ctx;
        atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
        uint64_t old = atomic_load_explicit(&pool->state, memory_order_relaxed);
        uint32_t gen = (state_gen(old) + 1) & 0xffffffu;
        atomic_store(&pool->state, ((uint64_t)gen << GEN_SHIFT) | ((uint64_t)n << NT_SHIFT));
        wake_sleepers(pool);
        run_tasks(pool, gen, 0);
        for (int spins = 0; atomic_load_explicit(&pool->done, memory_order_acquire) != n; spins++) {
            if (spins < 4096)
                CPU_RELAX();
            else
                sched_yield();
        }
    }
}
