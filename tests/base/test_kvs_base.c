/*
 * tests/base/test_kvs_base.c — errors, arena, MPSC queue (including a
 * multi-producer run), half-precision conversions, CPU counts under
 * cgroup quotas, the hash secret.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "base/kvs.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static void
test_errors(void **state)
{
    (void)state;
    assert_string_equal(kvs_strerror(0), "success");
    assert_string_equal(kvs_strerror(KVS_ENOSPC), "request can never fit");
    assert_string_equal(kvs_err_name(KVS_EAGAIN), "KVS_EAGAIN");
    assert_string_equal(kvs_err_name(KVS_EFORMAT), "KVS_EFORMAT");
    assert_string_equal(kvs_strerror(-123456), "unknown error");
    assert_true(KVS_ENOMEM < 0 && KVS_EDEVICE < 0);
    kvs_log_level_t l;
    assert_int_equal(kvs_log_parse_level("debug", &l), 0);
    assert_int_equal(l, KVS_LOG_DEBUG);
    assert_int_equal(kvs_log_parse_level("loud", &l), KVS_EINVAL);
}

static int cleanup_order[4];
static int cleanup_n;

static void
record(void *arg)
{
    cleanup_order[cleanup_n++] = (int)(intptr_t)arg;
}

static void
test_arena(void **state)
{
    (void)state;
    kvs_arena_t *a;
    assert_int_equal(kvs_arena_new(256, &a), 0);
    char *prev = NULL;
    for (int i = 0; i < 100; i++) {
        char *p = kvs_arena_alloc(a, (size_t)(i % 37) + 1);
        assert_non_null(p);
        assert_int_equal((uintptr_t)p % 16, 0);
        memset(p, i, (size_t)(i % 37) + 1);
        assert_true(p != prev);
        prev = p;
    }
    /* Larger than a chunk: gets its own. */
    char *big = kvs_arena_alloc(a, 10000);
    assert_non_null(big);
    memset(big, 1, 10000);
    char *after = kvs_arena_alloc(a, 8);
    assert_non_null(after);
    assert_string_equal(kvs_arena_strdup(a, "hello"), "hello");
    int *z = kvs_arena_calloc(a, 10, sizeof(int));
    for (int i = 0; i < 10; i++)
        assert_int_equal(z[i], 0);
    assert_null(kvs_arena_calloc(a, SIZE_MAX / 2, 4));
    assert_null(kvs_arena_alloc(a, SIZE_MAX - 3));
    cleanup_n = 0;
    assert_int_equal(kvs_arena_cleanup_add(a, record, (void *)1), 0);
    assert_int_equal(kvs_arena_cleanup_add(a, record, (void *)2), 0);
    assert_true(kvs_arena_used(a) > 10000);
    kvs_arena_free(a);
    assert_int_equal(cleanup_n, 2);
    assert_int_equal(cleanup_order[0], 2); /* LIFO */
    assert_int_equal(cleanup_order[1], 1);
    kvs_arena_free(NULL);
}

typedef struct item {
    kvs_mpsc_node_t node;
    int producer;
    int seq;
} item_t;

#define N_PROD 4
#define N_ITEMS 20000

static kvs_mpsc_t queue;
static item_t items[N_PROD][N_ITEMS];

static void *
producer(void *arg)
{
    int p = (int)(intptr_t)arg;
    for (int i = 0; i < N_ITEMS; i++) {
        items[p][i].producer = p;
        items[p][i].seq = i;
        kvs_mpsc_push(&queue, &items[p][i].node);
    }
    return NULL;
}

static void
test_mpsc(void **state)
{
    (void)state;
    kvs_mpsc_init(&queue);
    assert_null(kvs_mpsc_pop(&queue));
    item_t one;
    memset(&one, 0, sizeof one);
    kvs_mpsc_push(&queue, &one.node);
    assert_ptr_equal(kvs_mpsc_pop(&queue), &one.node);
    assert_null(kvs_mpsc_pop(&queue));

    pthread_t th[N_PROD];
    for (int p = 0; p < N_PROD; p++)
        assert_int_equal(pthread_create(&th[p], NULL, producer, (void *)(intptr_t)p), 0);
    int next[N_PROD] = {0};
    int got = 0;
    while (got < N_PROD * N_ITEMS) {
        kvs_mpsc_node_t *n = kvs_mpsc_pop(&queue);
        if (n == NULL)
            continue;
        item_t *it = KVS_CONTAINER_OF(n, item_t, node);
        /* Per-producer FIFO order must hold. */
        assert_int_equal(it->seq, next[it->producer]);
        next[it->producer]++;
        got++;
    }
    for (int p = 0; p < N_PROD; p++)
        pthread_join(th[p], NULL);
    assert_null(kvs_mpsc_pop(&queue));
}

static void
test_half(void **state)
{
    (void)state;
    /* Every half value round-trips through f32. */
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kvs_fp16_to_f32((uint16_t)h);
        if (isnan(f))
            continue;
        assert_int_equal(kvs_f32_to_fp16(f), h);
    }
    assert_int_equal(kvs_f32_to_fp16(1.0f), 0x3c00);
    assert_int_equal(kvs_f32_to_fp16(65504.0f), 0x7bff);
    assert_int_equal(kvs_f32_to_fp16(1e6f), 0x7c00);
    assert_int_equal(kvs_f32_to_fp16(-2.0f), 0xc000);
    /* Ties round to even: 1 + 2^-11 lies halfway between 1 and 1 + 2^-10. */
    assert_int_equal(kvs_f32_to_fp16(1.0f + 0x1p-11f), 0x3c00);
    assert_int_equal(kvs_f32_to_fp16(1.0f + 3 * 0x1p-11f), 0x3c02);
    assert_true(fabsf(kvs_fp16_to_f32(kvs_f32_to_fp16(3.14159f)) - 3.14159f) < 2e-3f);
    assert_true(kvs_fp16_to_f32(0x0001) > 0.0f); /* smallest subnormal */
    assert_true(isnan(kvs_fp16_to_f32(kvs_f32_to_fp16(NAN))));
    assert_int_equal(kvs_f32_to_bf16(1.0f), 0x3f80);
    assert_true(kvs_bf16_to_f32(kvs_f32_to_bf16(3.0f)) == 3.0f);
    size_t out;
    assert_int_equal(kvs_mul_size(SIZE_MAX, 2, &out), KVS_ERANGE);
    assert_int_equal(kvs_add_size(SIZE_MAX, 1, &out), KVS_ERANGE);
    assert_int_equal(kvs_mul_size(3, 4, &out), 0);
    assert_int_equal(out, 12);
}

/* kvs_f32_to_fp16_dir against its definition: the least half-precision
 * value >= f (up) or the greatest <= f, found in a sorted table of them,
 * for f clamped to +-65504. */
static int
cmp_float(const void *a, const void *b)
{
    const float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

static void
test_half_directed(void **state)
{
    (void)state;
    static float table[65536];
    uint32_t n = 0;
    for (uint32_t h = 0; h < 65536; h++) {
        float f = kvs_fp16_to_f32((uint16_t)h);
        if (!isnan(f) && !isinf(f) && h != 0x8000)
            table[n++] = f;
    }
    qsort(table, n, sizeof table[0], cmp_float);
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    for (int t = 0; t < 20000; t++) {
        float f;
        if (t < 2 * 65536 / 8) { /* halves, and the points just beside them */
            f = kvs_fp16_to_f32((uint16_t)(t * 8 / 2 + t % 2));
            if (isnan(f) || isinf(f))
                continue;
            f = t % 4 < 2 ? f : nextafterf(f, t % 4 == 2 ? INFINITY : -INFINITY);
        } else {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            uint32_t bits = (uint32_t)(rng >> 32);
            memcpy(&f, &bits, sizeof f);
            if (isnan(f) || fabsf(f) > 1e6f)
                f = (float)((int32_t)bits) * 0x1p-20f;
        }
        const float c = f > 65504.0f ? 65504.0f : f < -65504.0f ? -65504.0f : f;
        uint32_t lo = 0, hi = n; /* the first entry >= c */
        while (lo < hi) {
            uint32_t mid = (lo + hi) / 2;
            if (table[mid] < c)
                lo = mid + 1;
            else
                hi = mid;
        }
        assert_true(lo < n);
        const float up = kvs_fp16_to_f32(kvs_f32_to_fp16_dir(f, true));
        const float down = kvs_fp16_to_f32(kvs_f32_to_fp16_dir(f, false));
        assert_true(up == table[lo]);
        assert_true(down == (table[lo] == c ? c : table[lo - 1]));
    }
    /* Saturation, infinities, zeros and NaN. */
    assert_int_equal(kvs_f32_to_fp16_dir(1e6f, true), 0x7bff);
    assert_int_equal(kvs_f32_to_fp16_dir(INFINITY, false), 0x7bff);
    assert_int_equal(kvs_f32_to_fp16_dir(-INFINITY, true), 0xfbff);
    assert_int_equal(kvs_f32_to_fp16_dir(0x1p-30f, true), 0x0001);
    assert_true(kvs_fp16_to_f32(kvs_f32_to_fp16_dir(0x1p-30f, false)) == 0.0f);
    assert_int_equal(kvs_f32_to_fp16_dir(-0x1p-30f, false), 0x8001);
    assert_true(kvs_fp16_to_f32(kvs_f32_to_fp16_dir(0.0f, true)) == 0.0f);
    assert_true(isnan(kvs_fp16_to_f32(kvs_f32_to_fp16_dir(NAN, true))));
}

static void *
seed_of_thread(void *arg)
{
    *(uint64_t *)arg = kvs_hash_seed();
    return NULL;
}

/* The hash secret is drawn once: every caller, on any thread, sees the
 * same value for the life of the process (tables built on one thread are
 * searched on others). */
static void
test_hash_seed(void **state)
{
    (void)state;
    uint64_t a = kvs_hash_seed(), b = 0;
    pthread_t t;
    assert_int_equal(pthread_create(&t, NULL, seed_of_thread, &b), 0);
    assert_int_equal(pthread_join(t, NULL), 0);
    assert_true(a == b && a == kvs_hash_seed());
}

/* Writes text to root/rel, making its directories. */
static void
put(const char *root, const char *rel, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    for (char *p = path + strlen(root) + 1; (p = strchr(p, '/')) != NULL; p++) {
        *p = '\0';
        mkdir(path, 0700);
        *p = '/';
    }
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* CPU quotas: cgroup v2 (the tightest of a cgroup and its ancestors,
 * rounded up, "max" none), inside a cgroup namespace (path "/"), and v1's
 * cpu controller; the affinity count caps them, and no quota leaves it. */
static void
test_cpu_count(void **state)
{
    (void)state;
    const char *tmp = getenv("TMPDIR");
    char root[512], v1[512];
    snprintf(root, sizeof root, "%s/kvs_cg_XXXXXX", tmp ? tmp : "/tmp");
    snprintf(v1, sizeof v1, "%s/kvs_cg1_XXXXXX", tmp ? tmp : "/tmp");
    assert_non_null(mkdtemp(root));
    assert_int_equal(kvs__cpu_count_in(64, root, "0::/kubepods/pod1/ctr\n"), 64);
    put(root, "kubepods/pod1/ctr/cpu.max", "max 100000\n");
    assert_int_equal(kvs__cpu_count_in(64, root, "0::/kubepods/pod1/ctr\n"), 64);
    put(root, "kubepods/pod1/cpu.max", "350000 100000\n");
    assert_int_equal(kvs__cpu_count_in(64, root, "0::/kubepods/pod1/ctr\n"), 4);
    put(root, "kubepods/pod1/ctr/cpu.max", "150000 100000\n");
    assert_int_equal(kvs__cpu_count_in(64, root, "0::/kubepods/pod1/ctr\n"), 2);
    assert_int_equal(kvs__cpu_count_in(1, root, "0::/kubepods/pod1/ctr\n"), 1);
    assert_int_equal(kvs__cpu_count_in(0, root, ""), 1);
    put(root, "cpu.max", "50000 100000\n");
    assert_int_equal(kvs__cpu_count_in(8, root, "0::/\n"), 1);

    assert_non_null(mkdtemp(v1));
    const char *self = "12:cpuset:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n";
    assert_int_equal(kvs__cpu_count_in(16, v1, self), 16);
    put(v1, "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n");
    put(v1, "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n");
    assert_int_equal(kvs__cpu_count_in(16, v1, self), 16);
    put(v1, "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "300000\n");
    assert_int_equal(kvs__cpu_count_in(16, v1, self), 3);
    /* A cpuset line alone reads no cpu files. */
    assert_int_equal(kvs__cpu_count_in(16, v1, "12:cpuset:/docker/abc\n"), 16);
    assert_true(kvs_cpu_count() >= 1);
    char cmd[1100];
    snprintf(cmd, sizeof cmd, "rm -rf '%s' '%s'", root, v1);
    assert_int_equal(system(cmd), 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_errors),        cmocka_unit_test(test_arena),
        cmocka_unit_test(test_mpsc),          cmocka_unit_test(test_half),
        cmocka_unit_test(test_half_directed), cmocka_unit_test(test_cpu_count),
        cmocka_unit_test(test_hash_seed),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
