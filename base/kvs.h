/*
 * base/kvs.h — the small shared layer every other module stands on:
 * error codes (one X-macro table), logging, an arena, an intrusive MPSC
 * queue, monotonic time, half-precision conversions and always-on asserts.
 *
 * Nothing here knows about models, KV blocks or devices.  Every module may
 * include this header; it includes nothing of ours.
 */
#ifndef KVS_H
#define KVS_H

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Errors: 0 is success, a negative KVS_E* code is failure, everywhere.     */
/* ------------------------------------------------------------------------ */

#define KVS_ERRNO_MAP(XX)                                    \
    XX(NOMEM, -ENOMEM, "out of memory")                      \
    XX(AGAIN, -EAGAIN, "resource busy, retry later")         \
    XX(NOSPC, -ENOSPC, "request can never fit")              \
    XX(INVAL, -EINVAL, "invalid argument")                   \
    XX(NOTSUP, -EOPNOTSUPP, "not supported by this backend") \
    XX(CANCELED, -ECANCELED, "request canceled")             \
    XX(IO, -EIO, "input/output error")                       \
    XX(NOENT, -ENOENT, "no such file or entry")              \
    XX(RANGE, -ERANGE, "value out of range")                 \
    XX(FORMAT, -4001, "malformed file")                      \
    XX(DEVICE, -4000, "accelerator error")                   \
    XX(INTERNAL, -4002, "internal error")

enum {
#define KVS__ERR_ENUM(name, val, msg) KVS_E##name = (val),
    KVS_ERRNO_MAP(KVS__ERR_ENUM)
#undef KVS__ERR_ENUM
};

const char *kvs_strerror(int err);
const char *kvs_err_name(int err);

/* ------------------------------------------------------------------------ */
/* Asserts: always on; used for invariants whose violation corrupts state.  */
/* ------------------------------------------------------------------------ */

void kvs__assert_fail(const char *expr, const char *file, int line) __attribute__((noreturn));

#define KVS_ASSERT(x) \
    ((__builtin_expect(!!(x), 1)) ? (void)0 : kvs__assert_fail(#x, __FILE__, __LINE__))

/* ------------------------------------------------------------------------ */
/* Logging. Thread: any. Lines go to stderr, one write per line.            */
/* ------------------------------------------------------------------------ */

typedef enum kvs_log_level {
    KVS_LOG_ERROR = 0,
    KVS_LOG_WARN = 1,
    KVS_LOG_INFO = 2,
    KVS_LOG_DEBUG = 3,
} kvs_log_level_t;

void kvs_log_set_level(kvs_log_level_t level);
kvs_log_level_t kvs_log_get_level(void);
/* Parses "error|warn|info|debug"; returns 0 or KVS_EINVAL. */
int kvs_log_parse_level(const char *s, kvs_log_level_t *out);
void kvs_log(kvs_log_level_t level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define KVS_ERRORF(...) kvs_log(KVS_LOG_ERROR, __VA_ARGS__)
#define KVS_WARNF(...) kvs_log(KVS_LOG_WARN, __VA_ARGS__)
#define KVS_INFOF(...) kvs_log(KVS_LOG_INFO, __VA_ARGS__)
#define KVS_DEBUGF(...)                           \
    do {                                          \
        if (kvs_log_get_level() >= KVS_LOG_DEBUG) \
            kvs_log(KVS_LOG_DEBUG, __VA_ARGS__);  \
    } while (0)

/* ------------------------------------------------------------------------ */
/* Arena: bump allocation in chunks, freed all at once. Not thread-safe.    */
/* ------------------------------------------------------------------------ */

typedef struct kvs_arena kvs_arena_t;

/* chunk_bytes: size of each chunk (0 picks 16 KiB). Returns 0 or KVS_ENOMEM. */
int kvs_arena_new(size_t chunk_bytes, kvs_arena_t **out);
void kvs_arena_free(kvs_arena_t *a); /* NULL is a no-op; runs cleanups LIFO */
/* 16-byte aligned; NULL on out-of-memory or overflow. */
void *kvs_arena_alloc(kvs_arena_t *a, size_t bytes);
void *kvs_arena_calloc(kvs_arena_t *a, size_t n, size_t size);
char *kvs_arena_strdup(kvs_arena_t *a, const char *s);
/* Registers fn(arg) to run when the arena is freed (nginx pool cleanup). */
int kvs_arena_cleanup_add(kvs_arena_t *a, void (*fn)(void *), void *arg);
size_t kvs_arena_used(const kvs_arena_t *a);

/* ------------------------------------------------------------------------ */
/* Intrusive MPSC queue (Vyukov). Push: any thread. Pop: one consumer.      */
/* ------------------------------------------------------------------------ */

typedef struct kvs_mpsc_node {
    _Atomic(struct kvs_mpsc_node *) next;
} kvs_mpsc_node_t;

typedef struct kvs_mpsc {
    _Atomic(kvs_mpsc_node_t *) head; /* producers swap here */
    kvs_mpsc_node_t *tail;           /* consumer only */
    kvs_mpsc_node_t stub;
} kvs_mpsc_t;

void kvs_mpsc_init(kvs_mpsc_t *q);
void kvs_mpsc_push(kvs_mpsc_t *q, kvs_mpsc_node_t *n);
/* Returns the oldest node or NULL when empty (or when a producer is midway
 * through a push; the node appears on a later pop). */
kvs_mpsc_node_t *kvs_mpsc_pop(kvs_mpsc_t *q);

#define KVS_CONTAINER_OF(ptr, type, member) ((type *)((char *)(ptr)-offsetof(type, member)))

/* ------------------------------------------------------------------------ */
/* Time.                                                                    */
/* ------------------------------------------------------------------------ */

uint64_t kvs_now_ns(void); /* CLOCK_MONOTONIC */

/* CPUs this process may keep busy (kvs_cpu.c): its affinity mask's, fewer
 * under a cgroup v1 or v2 CPU quota (rounded up); >= 1, counted once.  The
 * _in variant takes the affinity count, the cgroup mount and
 * /proc/self/cgroup's text (tests). */
uint32_t kvs_cpu_count(void);
uint32_t kvs__cpu_count_in(uint32_t affinity, const char *cg_root, const char *self_cgroup);

/* A secret drawn once per process (kvs_seed.c), mixed into the hashes of
 * tables keyed by untrusted bytes so that no input is crafted to collide. */
uint64_t kvs_hash_seed(void);

/* ------------------------------------------------------------------------ */
/* Hex digits and UTF-8, for the parsers of patterns and vocabularies.      */
/* ------------------------------------------------------------------------ */

/* The value of hex digit c, -1 for any other character. */
static inline int
kvs_hexval(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* How many bytes UTF-8 spells code point c (<= 0x10FFFF) with. */
static inline uint32_t
kvs_utf8_len(uint32_t c)
{
    return c < 0x80 ? 1 : c < 0x800 ? 2 : c < 0x10000 ? 3 : 4;
}

/* Code point c in UTF-8 into b[4]; returns the byte count. */
static inline uint32_t
kvs_utf8_put(uint32_t c, uint8_t *b)
{
    static const uint8_t lead[5] = {0, 0, 0xC0, 0xE0, 0xF0};
    uint32_t n = kvs_utf8_len(c);
    for (uint32_t k = n - 1; k > 0; k--, c >>= 6)
        b[k] = (uint8_t)(0x80 | (c & 0x3F));
    b[0] = (uint8_t)(lead[n] | c);
    return n;
}

/* ------------------------------------------------------------------------ */
/* Allocation with overflow checks.                                         */
/* ------------------------------------------------------------------------ */

/* a*b into *out; returns 0 or KVS_ERANGE on overflow. */
static inline int
kvs_mul_size(size_t a, size_t b, size_t *out)
{
    return __builtin_mul_overflow(a, b, out) ? KVS_ERANGE : 0;
}

static inline int
kvs_add_size(size_t a, size_t b, size_t *out)
{
    return __builtin_add_overflow(a, b, out) ? KVS_ERANGE : 0;
}

/* A malloc'd copy of n bytes at p; NULL for a NULL p, or when out of
 * memory (a caller with p != NULL tells the two apart). */
void *kvs_memdup(const void *p, size_t n);

/* The splitmix64 finalizer: a bijection of 64-bit values with full
 * avalanche, for hash keys built by folding fields in. */
static inline uint64_t
kvs_mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* ------------------------------------------------------------------------ */
/* Half precision (IEEE binary16) and bfloat16.                             */
/* ------------------------------------------------------------------------ */

static inline float
kvs_bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint32_t
kvs_f32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static inline float
kvs_fp16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ff;
    if (exp == 0) {
        /* zero or subnormal: value = man * 2^-24 */
        float v = (float)man * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    if (exp == 31)
        return kvs_bits_to_f32(sign | 0x7f800000u | (man << 13));
    return kvs_bits_to_f32(sign | ((exp + 112) << 23) | (man << 13));
}

/* Round to nearest even, as F16C's vcvtps2ph with rounding mode 0. */
static inline uint16_t
kvs_f32_to_fp16(float f)
{
    uint32_t x = kvs_f32_to_bits(f);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7c00);
    if (ax < 0x38800000u) { /* below smallest normal half: subnormal or zero */
        float v = kvs_bits_to_f32(ax) * 16777216.0f; /* scale by 2^24 */
        /* nearbyint with default round-to-nearest-even */
        uint32_t m = (uint32_t)__builtin_rintf(v);
        return (uint16_t)(sign | m);
    }
    uint32_t e = ((ax >> 23) - 112) << 10;
    uint32_t m = (ax >> 13) & 0x3ff;
    uint32_t rest = ax & 0x1fff;
    uint32_t h = e | m;
    if (rest > 0x1000 || (rest == 0x1000 && (m & 1)))
        h++; /* carries into the exponent correctly */
    return (uint16_t)(sign | h);
}

/* f to half precision rounded toward +inf (up) or -inf, saturating at
 * +-65504: the half-precision bound of a value kept as a bound (Quest's
 * key summaries), never on the wrong side of it within f16's range.  NaN
 * stays NaN. */
static inline uint16_t
kvs_f32_to_fp16_dir(float f, bool up)
{
    if (f != f)
        return kvs_f32_to_fp16(f);
    f = f > 65504.0f ? 65504.0f : f < -65504.0f ? -65504.0f : f;
    uint16_t h = kvs_f32_to_fp16(f);
    const float y = kvs_fp16_to_f32(h);
    if (up ? y < f : y > f) {
        /* One step toward the direction: nearest was the other side. */
        const bool neg = h & 0x8000;
        if ((h & 0x7fff) == 0)
            h = up ? 0x0001 : 0x8001;
        else
            h = (uint16_t)(neg == up ? h - 1 : h + 1);
    }
    return h;
}

static inline float
kvs_bf16_to_f32(uint16_t h)
{
    return kvs_bits_to_f32((uint32_t)h << 16);
}

static inline uint16_t
kvs_f32_to_bf16(float f)
{
    uint32_t x = kvs_f32_to_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((x >> 16) | 64); /* keep nan quiet */
    return (uint16_t)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

#endif /* KVS_H */
