/*
 * model/gguf.c — the GGUF v2/v3 reader: maps a model file read-only,
 * validates its header, metadata and tensor infos against the file size,
 * and answers typed metadata and tensor look-ups.  Callers: model/ (loader,
 * tokenizer), serve/ (`kvserve model info`), tests and the fuzz target.
 *
 *   0   "GGUF" u32 version u64 n_tensors u64 n_kv
 *   24  kv[n_kv]          string key, u32 type, value
 *       info[n_tensors]   string name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset
 *       zero padding up to data_off = align(end of infos)
 *       tensor data       tensor i at data_off + info[i].offset
 *
 * The file is untrusted.  Every length, count, type, product and offset is
 * checked before use, against overflow and against the bytes that remain,
 * so no read goes past the buffer.  Keys, string values and tensor names
 * are copied into a reader-owned arena as NUL-terminated strings; numeric
 * arrays and tensor data stay in the mapping.  Open touches only the
 * metadata region (never tensor bytes), so a multi-GB model opens in
 * milliseconds.  After open the reader is immutable and may be shared
 * between threads.
 */
#include "model/model.h"

#include "base/kvs.h"
#include "kernels/kern.h"

#include <errno.h>
#include <fcntl.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_HEADER_BYTES 24
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_KEY 65535
#define GGUF_N_TYPES 13

/* The smallest encodings: a kv is key length + 1 key byte + type + a
 * 1-byte value; a tensor info is name length + 1 name byte + n_dims +
 * one ne + type + offset.  Counts above remaining/min are impossible, and
 * refusing them early stops a forged header from driving allocations. */
#define GGUF_MIN_KV_BYTES (8 + 1 + 4 + 1)
#define GGUF_MIN_TENSOR_BYTES (8 + 1 + 4 + 8 + 4 + 8)

/* Element sizes of fixed-size value types; 0 for STRING and ARRAY. */
static const uint8_t gguf_type_size[GGUF_N_TYPES] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
static const char *const gguf_type_name[GGUF_N_TYPES] = {
    "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "str", "arr", "u64", "i64", "f64",
};

typedef struct gguf_kv {
    const char *key; /* arena, NUL-terminated */
    model_gguf_type_t type;
    model_gguf_type_t elem_type; /* arrays only */
    bool is_signed;              /* integer scalars: value in i, else in u */
    uint64_t u;
    int64_t i;
    double f;               /* F32 / F64 */
    model_gguf_str_t str;   /* STRING */
    uint64_t count;         /* arrays */
    const uint8_t *data;    /* numeric arrays: packed elements inside the buffer */
    model_gguf_str_t *strs; /* string arrays: [count] index into the arena */
    const uint8_t *raw;     /* the value as the file encodes it (after its type) */
    size_t raw_len;
} gguf_kv_t;

/* Open-addressing name -> index table; slots hold index + 1, 0 = empty. */
typedef struct name_index {
    uint32_t *slots;
    uint32_t mask;
} name_index_t;

struct model_gguf {
    const uint8_t *base; /* the whole file */
    size_t len;
    void *map; /* mmap'd region when opened from a path */
    size_t map_len;
    kvs_arena_t *arena;
    uint32_t version;
    uint32_t alignment;
    uint64_t data_off;
    gguf_kv_t *kvs;
    uint32_t n_kv;
    model_gguf_tensor_t *tensors;
    uint32_t n_tensors;
    name_index_t kv_index;
    name_index_t tensor_index;
};

typedef struct parser {
    const uint8_t *p;
    size_t len;
    size_t pos;
    char *err;
    size_t err_len;
    model_gguf_t *g;
} parser_t;

/* ------------------------------------------------------------------------ */
/* Errors and little-endian reads.                                          */
/* ------------------------------------------------------------------------ */

static int __attribute__((format(printf, 3, 4))) fail(parser_t *ps, int rc, const char *fmt, ...)
{
    if (ps->err != NULL && ps->err_len > 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ps->err, ps->err_len, fmt, ap);
        va_end(ap);
    }
    return rc;
}

/* Names come from the file: make them safe for a one-line message (no
 * control bytes, bounded length).  buf must hold 84 bytes. */
#define SHOWN_BYTES 84
static const char *
shown(const char *s, char *buf)
{
    size_t n = 0;
    for (; s[n] != '\0' && n < 80; n++) {
        unsigned char c = (unsigned char)s[n];
        buf[n] = (c < 0x20 || c == 0x7f || c == '\'') ? '?' : (char)c;
    }
    if (s[n] != '\0') {
        memcpy(buf + 77, "...", 3);
        n = 80;
    }
    buf[n] = '\0';
    return buf;
}

static uint16_t
le16(const uint8_t *b)
{
    return (uint16_t)(b[0] | (uint16_t)b[1] << 8);
}

static uint32_t
le32(const uint8_t *b)
{
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

static uint64_t
le64(const uint8_t *b)
{
    return (uint64_t)le32(b) | (uint64_t)le32(b + 4) << 32;
}

static size_t
remaining(const parser_t *ps)
{
    return ps->len - ps->pos;
}

static bool
take(parser_t *ps, uint64_t n, const uint8_t **out)
{
    if (n > remaining(ps))
        return false;
    *out = ps->p + ps->pos;
    ps->pos += (size_t)n;
    return true;
}

static bool
rd_u32(parser_t *ps, uint32_t *v)
{
    const uint8_t *b;
    if (!take(ps, 4, &b))
        return false;
    *v = le32(b);
    return true;
}

static bool
rd_u64(parser_t *ps, uint64_t *v)
{
    const uint8_t *b;
    if (!take(ps, 8, &b))
        return false;
    *v = le64(b);
    return true;
}

static char *
arena_strndup(kvs_arena_t *a, const uint8_t *s, size_t n)
{
    if (n == SIZE_MAX)
        return NULL;
    char *p = kvs_arena_alloc(a, n + 1);
    if (p != NULL) {
        memcpy(p, s, n);
        p[n] = '\0';
    }
    return p;
}

/* ------------------------------------------------------------------------ */
/* Name index.                                                              */
/* ------------------------------------------------------------------------ */

/* FNV-1a from the process's secret start, then mixed: the names are the
 * file's, and must not be chosen to collide (model/vocab.c's reason). */
static uint64_t
hash_name(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ull ^ kvs_hash_seed();
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 0x100000001b3ull;
    return kvs_mix64(h);
}

typedef const char *(*name_fn)(const model_gguf_t *g, uint32_t i);

static const char *
kv_name(const model_gguf_t *g, uint32_t i)
{
    return g->kvs[i].key;
}

static const char *
tensor_name(const model_gguf_t *g, uint32_t i)
{
    return g->tensors[i].name;
}

/* Builds the index over n names.  A repeated name stops the build and
 * comes back as *dup, the index of its second occurrence (else -1). */
static int
index_build(model_gguf_t *g, name_index_t *ix, uint32_t n, name_fn name, int64_t *dup)
{
    *dup = -1;
    if (n > UINT32_MAX / 4) /* the mask below is 32 bits */
        return KVS_ENOMEM;
    uint64_t size = 16;
    while (size < (uint64_t)n * 2)
        size *= 2;
    ix->slots = kvs_arena_calloc(g->arena, (size_t)size, sizeof(uint32_t));
    if (ix->slots == NULL)
        return KVS_ENOMEM;
    ix->mask = (uint32_t)(size - 1);
    for (uint32_t i = 0; i < n; i++) {
        const char *s = name(g, i);
        uint32_t h = (uint32_t)hash_name(s) & ix->mask;
        while (ix->slots[h] != 0) {
            if (strcmp(name(g, ix->slots[h] - 1), s) == 0) {
                *dup = i;
                return 0;
            }
            h = (h + 1) & ix->mask;
        }
        ix->slots[h] = i + 1;
    }
    return 0;
}

static int64_t
index_find(const model_gguf_t *g, const name_index_t *ix, name_fn name, const char *s)
{
    if (g == NULL || s == NULL || ix->slots == NULL)
        return -1;
    uint32_t h = (uint32_t)hash_name(s) & ix->mask;
    while (ix->slots[h] != 0) {
        uint32_t i = ix->slots[h] - 1;
        if (strcmp(name(g, i), s) == 0)
            return i;
        h = (h + 1) & ix->mask;
    }
    return -1;
}

/* ------------------------------------------------------------------------ */
/* Metadata.                                                                */
/* ------------------------------------------------------------------------ */

/* A string array gets two passes: the first proves every element lies in
 * the buffer and totals the bytes, the second copies them into one arena
 * block, so nothing is allocated on the word of a forged count. */
static int
parse_str_array(parser_t *ps, gguf_kv_t *kv, uint64_t count)
{
    char nb[SHOWN_BYTES];
    size_t start = ps->pos;
    if (count > remaining(ps) / 8)
        return fail(ps, KVS_EFORMAT,
                    "key '%s': array count %llu exceeds what the remaining %zu bytes can hold",
                    shown(kv->key, nb), (unsigned long long)count, remaining(ps));
    size_t total = 0;
    for (uint64_t j = 0; j < count; j++) {
        uint64_t n;
        const uint8_t *s;
        if (!rd_u64(ps, &n))
            return fail(ps, KVS_EFORMAT, "key '%s': truncated file while reading element %llu",
                        shown(kv->key, nb), (unsigned long long)j);
        if (!take(ps, n, &s))
            return fail(ps, KVS_EFORMAT,
                        "key '%s': element %llu: string length %llu exceeds remaining %zu bytes",
                        shown(kv->key, nb), (unsigned long long)j, (unsigned long long)n,
                        remaining(ps));
        total += (size_t)n + 1; /* cannot overflow: each element used n + 8 file bytes */
    }
    kv->strs = kvs_arena_alloc(ps->g->arena, (size_t)count * sizeof(model_gguf_str_t));
    char *chars = kvs_arena_alloc(ps->g->arena, total);
    if ((count > 0 && kv->strs == NULL) || chars == NULL)
        return fail(ps, KVS_ENOMEM, "key '%s': out of memory for %llu strings", shown(kv->key, nb),
                    (unsigned long long)count);
    size_t pos = start;
    for (uint64_t j = 0; j < count; j++) {
        size_t n = (size_t)le64(ps->p + pos);
        memcpy(chars, ps->p + pos + 8, n);
        chars[n] = '\0';
        kv->strs[j].ptr = chars;
        kv->strs[j].len = n;
        chars += n + 1;
        pos += 8 + n;
    }
    return 0;
}

static int
parse_scalar(parser_t *ps, gguf_kv_t *kv)
{
    char nb[SHOWN_BYTES];
    const uint8_t *b;
    if (!take(ps, gguf_type_size[kv->type], &b))
        return fail(ps, KVS_EFORMAT, "key '%s': truncated file while reading %s value",
                    shown(kv->key, nb), gguf_type_name[kv->type]);
    switch (kv->type) {
    case MODEL_GGUF_UINT8:
    case MODEL_GGUF_BOOL:
        kv->u = b[0];
        break;
    case MODEL_GGUF_INT8:
        kv->i = (int8_t)b[0];
        break;
    case MODEL_GGUF_UINT16:
        kv->u = le16(b);
        break;
    case MODEL_GGUF_INT16:
        kv->i = (int16_t)le16(b);
        break;
    case MODEL_GGUF_UINT32:
        kv->u = le32(b);
        break;
    case MODEL_GGUF_INT32:
        kv->i = (int32_t)le32(b);
        break;
    case MODEL_GGUF_UINT64:
        kv->u = le64(b);
        break;
    case MODEL_GGUF_INT64:
        kv->i = (int64_t)le64(b);
        break;
    case MODEL_GGUF_FLOAT32:
        kv->f = kvs_bits_to_f32(le32(b));
        break;
    case MODEL_GGUF_FLOAT64: {
        uint64_t bits = le64(b);
        memcpy(&kv->f, &bits, sizeof bits);
        break;
    }
    default:
        break;
    }
    kv->is_signed = kv->type == MODEL_GGUF_INT8 || kv->type == MODEL_GGUF_INT16 ||
                    kv->type == MODEL_GGUF_INT32 || kv->type == MODEL_GGUF_INT64;
    return 0;
}

static int parse_value(parser_t *ps, gguf_kv_t *kv, uint32_t type, char nb[SHOWN_BYTES]);

static int
parse_kv(parser_t *ps, uint32_t idx, gguf_kv_t *kv)
{
    char nb[SHOWN_BYTES];
    uint64_t klen;
    const uint8_t *kb;
    if (!rd_u64(ps, &klen))
        return fail(ps, KVS_EFORMAT, "truncated file while reading key #%u", idx);
    if (klen == 0 || klen > GGUF_MAX_KEY)
        return fail(ps, KVS_EFORMAT, "key #%u: key length %llu is outside 1..%u", idx,
                    (unsigned long long)klen, GGUF_MAX_KEY);
    if (!take(ps, klen, &kb))
        return fail(ps, KVS_EFORMAT, "key #%u: key length %llu exceeds remaining %zu bytes", idx,
                    (unsigned long long)klen, remaining(ps));
    if (memchr(kb, 0, (size_t)klen) != NULL)
        return fail(ps, KVS_EFORMAT, "key #%u: key contains a NUL byte", idx);
    kv->key = arena_strndup(ps->g->arena, kb, (size_t)klen);
    if (kv->key == NULL)
        return fail(ps, KVS_ENOMEM, "key #%u: out of memory", idx);

    uint32_t type;
    if (!rd_u32(ps, &type))
        return fail(ps, KVS_EFORMAT, "key '%s': truncated file while reading value type",
                    shown(kv->key, nb));
    if (type >= GGUF_N_TYPES)
        return fail(ps, KVS_EFORMAT, "key '%s': invalid value type %u", shown(kv->key, nb), type);
    kv->type = (model_gguf_type_t)type;
    size_t at = ps->pos;
    int rc = parse_value(ps, kv, type, nb);
    if (rc == 0) {
        kv->raw = ps->p + at;
        kv->raw_len = ps->pos - at;
    }
    return rc;
}

/* The value of kv, whose key and type parse_kv read. */
static int
parse_value(parser_t *ps, gguf_kv_t *kv, uint32_t type, char nb[SHOWN_BYTES])
{
    if (type == MODEL_GGUF_STRING) {
        uint64_t n;
        const uint8_t *s;
        if (!rd_u64(ps, &n))
            return fail(ps, KVS_EFORMAT, "key '%s': truncated file while reading string length",
                        shown(kv->key, nb));
        if (!take(ps, n, &s))
            return fail(ps, KVS_EFORMAT, "key '%s': string length %llu exceeds remaining %zu bytes",
                        shown(kv->key, nb), (unsigned long long)n, remaining(ps));
        kv->str.ptr = arena_strndup(ps->g->arena, s, (size_t)n);
        kv->str.len = (size_t)n;
        if (kv->str.ptr == NULL)
            return fail(ps, KVS_ENOMEM, "key '%s': out of memory", shown(kv->key, nb));
        return 0;
    }
    if (type != MODEL_GGUF_ARRAY)
        return parse_scalar(ps, kv);

    uint32_t et;
    uint64_t count;
    if (!rd_u32(ps, &et) || !rd_u64(ps, &count))
        return fail(ps, KVS_EFORMAT, "key '%s': truncated file while reading array header",
                    shown(kv->key, nb));
    if (et >= GGUF_N_TYPES)
        return fail(ps, KVS_EFORMAT, "key '%s': invalid array element type %u", shown(kv->key, nb),
                    et);
    if (et == MODEL_GGUF_ARRAY)
        return fail(ps, KVS_EFORMAT, "key '%s': arrays of arrays are not supported",
                    shown(kv->key, nb));
    kv->elem_type = (model_gguf_type_t)et;
    kv->count = count;
    if (et == MODEL_GGUF_STRING)
        return parse_str_array(ps, kv, count);
    uint64_t bytes;
    if (__builtin_mul_overflow(count, (uint64_t)gguf_type_size[et], &bytes) ||
        !take(ps, bytes, &kv->data))
        return fail(ps, KVS_EFORMAT, "key '%s': array count %llu of %s exceeds remaining %zu bytes",
                    shown(kv->key, nb), (unsigned long long)count, gguf_type_name[et],
                    remaining(ps));
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Tensor infos.                                                            */
/* ------------------------------------------------------------------------ */

static int
parse_tensor(parser_t *ps, uint32_t idx, model_gguf_tensor_t *t)
{
    char nb[SHOWN_BYTES];
    uint64_t nlen;
    const uint8_t *name;
    if (!rd_u64(ps, &nlen))
        return fail(ps, KVS_EFORMAT, "truncated file while reading tensor #%u", idx);
    if (nlen == 0)
        return fail(ps, KVS_EFORMAT, "tensor #%u: empty name", idx);
    if (nlen > MODEL_GGUF_MAX_NAME && nlen <= remaining(ps)) {
        char *tmp = arena_strndup(ps->g->arena, ps->p + ps->pos, nlen < 80 ? nlen : 80);
        return fail(ps, KVS_EFORMAT, "tensor #%u '%s': name length %llu exceeds %u bytes", idx,
                    tmp ? shown(tmp, nb) : "?", (unsigned long long)nlen, MODEL_GGUF_MAX_NAME);
    }
    if (!take(ps, nlen, &name))
        return fail(ps, KVS_EFORMAT, "tensor #%u: name length %llu exceeds remaining %zu bytes",
                    idx, (unsigned long long)nlen, remaining(ps));
    if (nlen > MODEL_GGUF_MAX_NAME) /* only reachable when the name itself is truncated */
        return fail(ps, KVS_EFORMAT, "tensor #%u: name length %llu exceeds %u bytes", idx,
                    (unsigned long long)nlen, MODEL_GGUF_MAX_NAME);
    if (memchr(name, 0, (size_t)nlen) != NULL)
        return fail(ps, KVS_EFORMAT, "tensor #%u: name contains a NUL byte", idx);
    t->name = arena_strndup(ps->g->arena, name, (size_t)nlen);
    if (t->name == NULL)
        return fail(ps, KVS_ENOMEM, "tensor #%u: out of memory", idx);
    const char *tn = shown(t->name, nb);

    if (!rd_u32(ps, &t->n_dims))
        return fail(ps, KVS_EFORMAT, "tensor '%s': truncated file while reading n_dims", tn);
    if (t->n_dims < 1 || t->n_dims > MODEL_GGUF_MAX_DIMS)
        return fail(ps, KVS_EFORMAT, "tensor '%s': n_dims %u is outside 1..%u", tn, t->n_dims,
                    MODEL_GGUF_MAX_DIMS);
    uint64_t n_elems = 1;
    for (uint32_t d = 0; d < MODEL_GGUF_MAX_DIMS; d++) {
        t->ne[d] = 1;
        if (d >= t->n_dims)
            continue;
        if (!rd_u64(ps, &t->ne[d]))
            return fail(ps, KVS_EFORMAT, "tensor '%s': truncated file while reading ne[%u]", tn, d);
        if (t->ne[d] == 0)
            return fail(ps, KVS_EFORMAT, "tensor '%s': ne[%u] is 0", tn, d);
        if (__builtin_mul_overflow(n_elems, t->ne[d], &n_elems) || n_elems > INT64_MAX)
            return fail(ps, KVS_EFORMAT, "tensor '%s': element count overflows at ne[%u] = %llu",
                        tn, d, (unsigned long long)t->ne[d]);
    }
    if (!rd_u32(ps, &t->type))
        return fail(ps, KVS_EFORMAT, "tensor '%s': truncated file while reading type", tn);
    const kern_type_traits_t *tt = kern_type_traits(t->type);
    if (tt == NULL)
        return fail(ps, KVS_EFORMAT, "tensor '%s': unknown type %u", tn, t->type);
    if (t->ne[0] % tt->block != 0)
        return fail(ps, KVS_EFORMAT,
                    "tensor '%s': ne[0] = %llu is not a multiple of the %s block size %u", tn,
                    (unsigned long long)t->ne[0], tt->name, tt->block);
    size_t nbytes = kern_row_bytes(t->type, t->ne[0]);
    bool ovf = nbytes == 0;
    for (uint32_t d = 1; d < MODEL_GGUF_MAX_DIMS && !ovf; d++)
        ovf = t->ne[d] > SIZE_MAX || kvs_mul_size(nbytes, (size_t)t->ne[d], &nbytes) != 0;
    if (ovf)
        return fail(ps, KVS_EFORMAT, "tensor '%s': byte size overflows", tn);
    t->nbytes = nbytes;
    if (!rd_u64(ps, &t->offset))
        return fail(ps, KVS_EFORMAT, "tensor '%s': truncated file while reading offset", tn);
    return 0;
}

typedef struct span {
    uint64_t off;
    uint64_t end;
    uint32_t idx;
} span_t;

static int
span_cmp(const void *a, const void *b)
{
    const span_t *x = a, *y = b;
    if (x->off != y->off)
        return x->off < y->off ? -1 : 1;
    return x->idx < y->idx ? -1 : (x->idx > y->idx);
}

/* Places every tensor: aligned, inside the file, and disjoint from the
 * others (checked on a copy sorted by offset). */
static int
place_tensors(parser_t *ps)
{
    model_gguf_t *g = ps->g;
    char nb[SHOWN_BYTES], nb2[SHOWN_BYTES];
    for (uint32_t i = 0; i < g->n_tensors; i++) {
        model_gguf_tensor_t *t = &g->tensors[i];
        if (t->offset % g->alignment != 0)
            return fail(ps, KVS_EFORMAT, "tensor '%s': offset %llu is not a multiple of %u",
                        shown(t->name, nb), (unsigned long long)t->offset, g->alignment);
        uint64_t abs, end;
        if (__builtin_add_overflow(g->data_off, t->offset, &abs) ||
            __builtin_add_overflow(abs, (uint64_t)t->nbytes, &end))
            return fail(ps, KVS_EFORMAT, "tensor '%s': offset %llu overflows", shown(t->name, nb),
                        (unsigned long long)t->offset);
        if (end > ps->len)
            return fail(ps, KVS_EFORMAT,
                        "tensor '%s': data [offset %llu, %zu bytes] extends past end of file "
                        "(%zu bytes)",
                        shown(t->name, nb), (unsigned long long)abs, t->nbytes, ps->len);
        t->data = ps->p + abs;
    }
    if (g->n_tensors < 2)
        return 0;
    span_t *s = malloc((size_t)g->n_tensors * sizeof *s);
    if (s == NULL)
        return fail(ps, KVS_ENOMEM, "out of memory sorting %u tensors", g->n_tensors);
    for (uint32_t i = 0; i < g->n_tensors; i++) {
        s[i].off = g->tensors[i].offset;
        s[i].end = g->tensors[i].offset + g->tensors[i].nbytes; /* bounded by the file */
        s[i].idx = i;
    }
    qsort(s, g->n_tensors, sizeof *s, span_cmp);
    int rc = 0;
    for (uint32_t i = 1; i < g->n_tensors && rc == 0; i++) {
        if (s[i].off < s[i - 1].end) {
            const model_gguf_tensor_t *a = &g->tensors[s[i - 1].idx];
            const model_gguf_tensor_t *b = &g->tensors[s[i].idx];
            rc = fail(ps, KVS_EFORMAT,
                      "tensor '%s' [offset %llu, %zu bytes] overlaps tensor '%s' [offset %llu, "
                      "%zu bytes]",
                      shown(b->name, nb), (unsigned long long)b->offset, b->nbytes,
                      shown(a->name, nb2), (unsigned long long)a->offset, a->nbytes);
        }
    }
    free(s);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Open.                                                                    */
/* ------------------------------------------------------------------------ */

/* Grows a malloc'd vector so memory follows the entries actually parsed,
 * never the count a header claims. */
static int
grow(void **v, uint32_t *cap, uint32_t need, size_t elem)
{
    if (need <= *cap)
        return 0;
    uint32_t n = *cap ? *cap : 16;
    while (n < need)
        n = n > UINT32_MAX / 2 ? UINT32_MAX : n * 2;
    void *p = realloc(*v, (size_t)n * elem);
    if (p == NULL)
        return KVS_ENOMEM;
    memset((char *)p + (size_t)*cap * elem, 0, (size_t)(n - *cap) * elem);
    *v = p;
    *cap = n;
    return 0;
}

static int
parse(parser_t *ps)
{
    model_gguf_t *g = ps->g;
    char nb[SHOWN_BYTES];
    const uint8_t *h;
    if (!take(ps, GGUF_HEADER_BYTES, &h))
        return fail(ps, KVS_EFORMAT, "truncated file: %zu bytes, the header needs %d", ps->len,
                    GGUF_HEADER_BYTES);
    if (memcmp(h, "GGUF", 4) != 0)
        return fail(ps, KVS_EFORMAT, "bad magic 0x%08x (expected \"GGUF\")", le32(h));
    g->version = le32(h + 4);
    if (g->version < 2 || g->version > 3)
        return fail(ps, KVS_EFORMAT, "unsupported GGUF version %u (2 and 3 are read)", g->version);
    uint64_t n_tensors = le64(h + 8), n_kv = le64(h + 16);
    size_t rem = remaining(ps);
    if (n_kv > rem / GGUF_MIN_KV_BYTES || n_kv > UINT32_MAX)
        return fail(ps, KVS_EFORMAT, "kv_count %llu exceeds what the remaining %zu bytes can hold",
                    (unsigned long long)n_kv, rem);
    rem -= (size_t)n_kv * GGUF_MIN_KV_BYTES;
    if (n_tensors > rem / GGUF_MIN_TENSOR_BYTES || n_tensors > UINT32_MAX)
        return fail(ps, KVS_EFORMAT,
                    "tensor_count %llu exceeds what the remaining %zu bytes can hold",
                    (unsigned long long)n_tensors, remaining(ps));

    uint32_t cap = 0;
    for (uint32_t i = 0; i < (uint32_t)n_kv; i++) {
        if (grow((void **)&g->kvs, &cap, i + 1, sizeof *g->kvs) != 0)
            return fail(ps, KVS_ENOMEM, "out of memory at key #%u", i);
        g->n_kv = i + 1;
        int rc = parse_kv(ps, i, &g->kvs[i]);
        if (rc != 0)
            return rc;
    }
    cap = 0;
    for (uint32_t i = 0; i < (uint32_t)n_tensors; i++) {
        if (grow((void **)&g->tensors, &cap, i + 1, sizeof *g->tensors) != 0)
            return fail(ps, KVS_ENOMEM, "out of memory at tensor #%u", i);
        g->n_tensors = i + 1;
        int rc = parse_tensor(ps, i, &g->tensors[i]);
        if (rc != 0)
            return rc;
    }

    int64_t dup;
    if (index_build(g, &g->kv_index, g->n_kv, kv_name, &dup) != 0)
        return fail(ps, KVS_ENOMEM, "out of memory indexing keys");
    if (dup >= 0)
        return fail(ps, KVS_EFORMAT, "duplicate key '%s'", shown(g->kvs[dup].key, nb));
    if (index_build(g, &g->tensor_index, g->n_tensors, tensor_name, &dup) != 0)
        return fail(ps, KVS_ENOMEM, "out of memory indexing tensors");
    if (dup >= 0)
        return fail(ps, KVS_EFORMAT, "duplicate tensor name '%s'", shown(g->tensors[dup].name, nb));

    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t ai = index_find(g, &g->kv_index, kv_name, "general.alignment");
    if (ai >= 0) {
        const gguf_kv_t *kv = &g->kvs[ai];
        if (kv->type != MODEL_GGUF_UINT32)
            return fail(ps, KVS_EFORMAT, "key 'general.alignment': type %s, expected u32",
                        gguf_type_name[kv->type]);
        if (kv->u == 0 || (kv->u & (kv->u - 1)) != 0)
            return fail(ps, KVS_EFORMAT,
                        "key 'general.alignment': %llu is not a nonzero power of two",
                        (unsigned long long)kv->u);
        g->alignment = (uint32_t)kv->u;
    }
    /* pos <= len < 2^64 and alignment <= 2^31, so this cannot wrap. */
    uint64_t pos = ps->pos;
    g->data_off = (pos + g->alignment - 1) / g->alignment * g->alignment;
    if (g->data_off > ps->len && !(g->n_tensors == 0 && pos == ps->len))
        return fail(ps, KVS_EFORMAT,
                    "truncated file: data section at offset %llu starts past end of file (%zu "
                    "bytes)",
                    (unsigned long long)g->data_off, ps->len);
    return place_tensors(ps);
}

static int
open_common(const void *buf, size_t len, void *map, model_gguf_t **out, char *err, size_t err_len)
{
    model_gguf_t *g = calloc(1, sizeof *g);
    if (g == NULL || kvs_arena_new(64 * 1024, &g->arena) != 0) {
        free(g);
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "out of memory opening GGUF");
        return KVS_ENOMEM;
    }
    g->base = buf;
    g->len = len;
    g->map = map;
    g->map_len = len;
    parser_t ps = {.p = buf, .len = len, .err = err, .err_len = err_len, .g = g};
    int rc = parse(&ps);
    if (rc != 0) {
        /* The mapping belongs to the caller until success. */
        g->map = NULL;
        model_gguf_close(g);
        return rc;
    }
    *out = g;
    return 0;
}

int
model_gguf_open_mem(const void *buf, size_t len, model_gguf_t **out, char *err, size_t err_len)
{
    if (out == NULL || (buf == NULL && len > 0)) {
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "invalid argument");
        return KVS_EINVAL;
    }
    *out = NULL;
    static const uint8_t empty[1];
    return open_common(buf ? buf : empty, len, NULL, out, err, err_len);
}

int
model_gguf_open(const char *path, model_gguf_t **out, char *err, size_t err_len)
{
    if (out == NULL || path == NULL) {
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "invalid argument");
        return KVS_EINVAL;
    }
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "cannot open '%s': %s", path, strerror(e));
        return e == ENOENT ? KVS_ENOENT : KVS_EIO;
    }
    struct stat st;
    bool ok = fstat(fd, &st) == 0;
    if (!ok || !S_ISREG(st.st_mode)) {
        const char *why = !ok                   ? strerror(errno)
                          : S_ISDIR(st.st_mode) ? "is a directory"
                                                : "not a regular file";
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "cannot read '%s': %s", path, why);
        close(fd);
        return KVS_EIO;
    }
    if ((uint64_t)st.st_size > SIZE_MAX) {
        close(fd);
        if (err != NULL && err_len > 0)
            snprintf(err, err_len, "cannot map '%s': file too large", path);
        return KVS_EIO;
    }
    size_t len = (size_t)st.st_size;
    void *map = NULL;
    if (len > 0) {
        map = mmap(NULL, len, PROT_READ, MAP_PRIVATE, fd, 0);
        if (map == MAP_FAILED) {
            int e = errno;
            close(fd);
            if (err != NULL && err_len > 0)
                snprintf(err, err_len, "cannot map '%s': %s", path, strerror(e));
            return e == ENOMEM ? KVS_ENOMEM : KVS_EIO;
        }
    }
    close(fd); /* the mapping keeps the file alive */
    int rc = open_common(map, len, map, out, err, err_len);
    if (rc != 0 && map != NULL)
        munmap(map, len);
    return rc;
}

void
model_gguf_close(model_gguf_t *g)
{
    if (g == NULL)
        return;
    if (g->map != NULL)
        munmap(g->map, g->map_len);
    free(g->kvs);
    free(g->tensors);
    kvs_arena_free(g->arena);
    free(g);
}

/* ------------------------------------------------------------------------ */
/* Accessors.                                                               */
/* ------------------------------------------------------------------------ */

uint32_t
model_gguf_version(const model_gguf_t *g)
{
    return g->version;
}

uint32_t
model_gguf_alignment(const model_gguf_t *g)
{
    return g->alignment;
}

size_t
model_gguf_data_offset(const model_gguf_t *g)
{
    return (size_t)g->data_off;
}

uint32_t
model_gguf_n_kv(const model_gguf_t *g)
{
    return g->n_kv;
}

/* NULL when i is out of range. */
const char *
model_gguf_kv_key(const model_gguf_t *g, uint32_t i)
{
    return i < g->n_kv ? g->kvs[i].key : NULL;
}

int
model_gguf_kv_raw(const model_gguf_t *g, uint32_t i, const void **value, size_t *len)
{
    if (i >= g->n_kv)
        return KVS_ENOENT;
    *value = g->kvs[i].raw;
    *len = g->kvs[i].raw_len;
    return 0;
}

/* An out-of-range i yields (model_gguf_type_t)-1, which matches no type. */
model_gguf_type_t
model_gguf_kv_type(const model_gguf_t *g, uint32_t i)
{
    return i < g->n_kv ? g->kvs[i].type : (model_gguf_type_t)-1;
}

int64_t
model_gguf_find_key(const model_gguf_t *g, const char *key)
{
    return index_find(g, &g->kv_index, kv_name, key);
}

static const gguf_kv_t *
lookup(const model_gguf_t *g, const char *key)
{
    int64_t i = model_gguf_find_key(g, key);
    return i < 0 ? NULL : &g->kvs[i];
}

static bool
is_int_type(model_gguf_type_t t)
{
    return t <= MODEL_GGUF_INT32 || t == MODEL_GGUF_UINT64 || t == MODEL_GGUF_INT64;
}

/* The integer value of key, refused unless it lies in [lo, hi]. */
static int
get_int(const model_gguf_t *g, const char *key, int64_t lo, uint64_t hi, uint64_t *bits)
{
    const gguf_kv_t *kv = lookup(g, key);
    if (kv == NULL)
        return KVS_ENOENT;
    if (!is_int_type(kv->type))
        return KVS_EFORMAT;
    if (kv->is_signed && kv->i < 0) {
        if (kv->i < lo)
            return KVS_EFORMAT;
        *bits = (uint64_t)kv->i; /* two's complement; only the i64 getter gets here */
        return 0;
    }
    uint64_t v = kv->is_signed ? (uint64_t)kv->i : kv->u;
    if (v > hi)
        return KVS_EFORMAT;
    *bits = v;
    return 0;
}

int
model_gguf_get_u32(const model_gguf_t *g, const char *key, uint32_t *out)
{
    uint64_t v;
    int rc = get_int(g, key, 0, UINT32_MAX, &v);
    if (rc == 0)
        *out = (uint32_t)v;
    return rc;
}

int
model_gguf_get_u64(const model_gguf_t *g, const char *key, uint64_t *out)
{
    uint64_t v;
    int rc = get_int(g, key, 0, UINT64_MAX, &v);
    if (rc == 0)
        *out = v;
    return rc;
}

int
model_gguf_get_i64(const model_gguf_t *g, const char *key, int64_t *out)
{
    uint64_t v;
    int rc = get_int(g, key, INT64_MIN, INT64_MAX, &v);
    if (rc == 0)
        *out = (int64_t)v;
    return rc;
}

/* F64 values beyond float's finite range are refused; inf and NaN pass. */
int
model_gguf_get_f32(const model_gguf_t *g, const char *key, float *out)
{
    const gguf_kv_t *kv = lookup(g, key);
    if (kv == NULL)
        return KVS_ENOENT;
    if (kv->type != MODEL_GGUF_FLOAT32 && kv->type != MODEL_GGUF_FLOAT64)
        return KVS_EFORMAT;
    if (isfinite(kv->f) && fabs(kv->f) > FLT_MAX)
        return KVS_EFORMAT;
    *out = (float)kv->f;
    return 0;
}

/* Any nonzero byte reads as true, as llama.cpp does. */
int
model_gguf_get_bool(const model_gguf_t *g, const char *key, bool *out)
{
    const gguf_kv_t *kv = lookup(g, key);
    if (kv == NULL)
        return KVS_ENOENT;
    if (kv->type != MODEL_GGUF_BOOL)
        return KVS_EFORMAT;
    *out = kv->u != 0;
    return 0;
}

/* The string may contain NUL bytes; len is authoritative. */
int
model_gguf_get_str(const model_gguf_t *g, const char *key, model_gguf_str_t *out)
{
    const gguf_kv_t *kv = lookup(g, key);
    if (kv == NULL)
        return KVS_ENOENT;
    if (kv->type != MODEL_GGUF_STRING)
        return KVS_EFORMAT;
    *out = kv->str;
    return 0;
}

int
model_gguf_get_arr(const model_gguf_t *g, const char *key, model_gguf_type_t *elem_type,
                   uint64_t *count)
{
    const gguf_kv_t *kv = lookup(g, key);
    if (kv == NULL)
        return KVS_ENOENT;
    if (kv->type != MODEL_GGUF_ARRAY)
        return KVS_EFORMAT;
    if (elem_type != NULL)
        *elem_type = kv->elem_type;
    if (count != NULL)
        *count = kv->count;
    return 0;
}

/* O(1): the index is built at open.  KVS_ERANGE when i >= count. */
int
model_gguf_arr_str(const model_gguf_t *g, const char *key, uint64_t i, model_gguf_str_t *out)
{
    const gguf_kv_t *kv = lookup(g, key);
    if (kv == NULL)
        return KVS_ENOENT;
    if (kv->type != MODEL_GGUF_ARRAY || kv->elem_type != MODEL_GGUF_STRING)
        return KVS_EFORMAT;
    if (i >= kv->count)
        return KVS_ERANGE;
    *out = kv->strs[i];
    return 0;
}

/* The pointer is into the file and has NO alignment guarantee (arrays sit
 * wherever the metadata put them): callers must memcpy elements out rather
 * than cast it to float * or int32_t *.  Strings arrays are KVS_EFORMAT. */
int
model_gguf_arr_data(const model_gguf_t *g, const char *key, const void **data)
{
    const gguf_kv_t *kv = lookup(g, key);
    if (kv == NULL)
        return KVS_ENOENT;
    if (kv->type != MODEL_GGUF_ARRAY || kv->elem_type == MODEL_GGUF_STRING)
        return KVS_EFORMAT;
    *data = kv->data;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Printing.                                                                */
/* ------------------------------------------------------------------------ */

#define PRINT_MAX_ELEMS 8
#define PRINT_MAX_ELEM_BYTES 64

/* Quoted, with every non-printable or non-ASCII character escaped: UTF-8
 * sequences as \uXXXX (or \UXXXXXXXX), invalid bytes as \xNN.  At most
 * max bytes of s are shown (SIZE_MAX for all). */
static void
print_str(FILE *f, const char *s, size_t len, size_t max)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t n = len < max ? len : max;
    fputc('"', f);
    for (size_t i = 0; i < n;) {
        unsigned c = p[i];
        if (c == '"' || c == '\\') {
            fprintf(f, "\\%c", c);
            i++;
            continue;
        }
        if (c >= 0x20 && c < 0x7f) {
            fputc((int)c, f);
            i++;
            continue;
        }
        if (c == '\n' || c == '\t' || c == '\r') {
            fprintf(f, "\\%c", c == '\n' ? 'n' : c == '\t' ? 't' : 'r');
            i++;
            continue;
        }
        size_t k = c >= 0xf0 && c <= 0xf4   ? 3
                   : c >= 0xe0 && c <= 0xef ? 2
                   : c >= 0xc2 && c <= 0xdf ? 1
                                            : 0;
        uint32_t cp = k == 3 ? c & 0x07 : k == 2 ? c & 0x0f : c & 0x1f;
        bool ok = k > 0 && i + k < n;
        for (size_t j = 1; ok && j <= k; j++) {
            if ((p[i + j] & 0xc0) != 0x80)
                ok = false;
            else
                cp = cp << 6 | (p[i + j] & 0x3f);
        }
        if (ok && ((k == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
                   (k == 3 && (cp < 0x10000 || cp > 0x10ffff))))
            ok = false;
        if (!ok && c >= 0x80) {
            fprintf(f, "\\x%02x", c);
            i++;
        } else if (!ok) {
            fprintf(f, "\\u%04x", c);
            i++;
        } else {
            fprintf(f, cp > 0xffff ? "\\U%08x" : "\\u%04x", (unsigned)cp);
            i += k + 1;
        }
    }
    fputc('"', f);
    if (n < len)
        fputs("...", f);
}

/* One element of a fixed-size type, read from possibly unaligned bytes. */
static void
print_num(FILE *f, model_gguf_type_t t, const uint8_t *b)
{
    switch (t) {
    case MODEL_GGUF_UINT8:
        fprintf(f, "%u", b[0]);
        break;
    case MODEL_GGUF_INT8:
        fprintf(f, "%d", (int8_t)b[0]);
        break;
    case MODEL_GGUF_UINT16:
        fprintf(f, "%u", le16(b));
        break;
    case MODEL_GGUF_INT16:
        fprintf(f, "%d", (int16_t)le16(b));
        break;
    case MODEL_GGUF_UINT32:
        fprintf(f, "%u", le32(b));
        break;
    case MODEL_GGUF_INT32:
        fprintf(f, "%d", (int32_t)le32(b));
        break;
    case MODEL_GGUF_UINT64:
        fprintf(f, "%llu", (unsigned long long)le64(b));
        break;
    case MODEL_GGUF_INT64:
        fprintf(f, "%lld", (long long)(int64_t)le64(b));
        break;
    case MODEL_GGUF_FLOAT32:
        fprintf(f, "%g", kvs_bits_to_f32(le32(b)));
        break;
    case MODEL_GGUF_FLOAT64: {
        uint64_t bits = le64(b);
        double d;
        memcpy(&d, &bits, sizeof d);
        fprintf(f, "%g", d);
        break;
    }
    case MODEL_GGUF_BOOL:
        fputs(b[0] ? "true" : "false", f);
        break;
    default:
        break;
    }
}

/* Prints "<type> <value>" without a trailing newline, e.g. `u32 2048`,
 * `str "llama"`, `arr[str,259] ["\u0100", "!", ...]`.  Arrays show their
 * first few elements. */
void
model_gguf_kv_print(const model_gguf_t *g, uint32_t i, FILE *f)
{
    if (g == NULL || f == NULL)
        return;
    if (i >= g->n_kv) {
        fputs("(no such key)", f);
        return;
    }
    const gguf_kv_t *kv = &g->kvs[i];
    switch (kv->type) {
    case MODEL_GGUF_STRING:
        fputs("str ", f);
        print_str(f, kv->str.ptr, kv->str.len, SIZE_MAX);
        return;
    case MODEL_GGUF_ARRAY:
        break;
    default: {
        uint8_t b[8];
        uint64_t bits = kv->is_signed ? (uint64_t)kv->i : kv->u;
        if (kv->type == MODEL_GGUF_FLOAT32)
            bits = kvs_f32_to_bits((float)kv->f);
        else if (kv->type == MODEL_GGUF_FLOAT64)
            memcpy(&bits, &kv->f, sizeof bits);
        for (int j = 0; j < 8; j++)
            b[j] = (uint8_t)(bits >> (8 * j));
        fprintf(f, "%s ", gguf_type_name[kv->type]);
        print_num(f, kv->type, b);
        return;
    }
    }
    fprintf(f, "arr[%s,%llu] [", gguf_type_name[kv->elem_type], (unsigned long long)kv->count);
    uint64_t n = kv->count < PRINT_MAX_ELEMS ? kv->count : PRINT_MAX_ELEMS;
    for (uint64_t j = 0; j < n; j++) {
        if (j > 0)
            fputs(", ", f);
        if (kv->elem_type == MODEL_GGUF_STRING)
            print_str(f, kv->strs[j].ptr, kv->strs[j].len, PRINT_MAX_ELEM_BYTES);
        else
            print_num(f, kv->elem_type, kv->data + j * gguf_type_size[kv->elem_type]);
    }
    if (n < kv->count)
        fputs(", ...", f);
    fputc(']', f);
}

/* ------------------------------------------------------------------------ */
/* Tensors.                                                                 */
/* ------------------------------------------------------------------------ */

uint32_t
model_gguf_n_tensors(const model_gguf_t *g)
{
    return g->n_tensors;
}

const model_gguf_tensor_t *
model_gguf_tensor(const model_gguf_t *g, uint32_t i)
{
    return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const model_gguf_tensor_t *
model_gguf_find_tensor(const model_gguf_t *g, const char *name)
{
    int64_t i = index_find(g, &g->tensor_index, tensor_name, name);
    return i < 0 ? NULL : &g->tensors[i];
}
