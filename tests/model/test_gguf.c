/*
 * tests/model/test_gguf.c — unit tests of the GGUF reader and writer
 * (model/gguf.c, model/gguf_write.c): a writer -> reader round trip over a
 * real file and over memory, every value type and the getters' coercions,
 * a table of malformed files (each must fail with KVS_EFORMAT and name the
 * key or tensor at fault), every truncation of a valid file, seeded random
 * corruption, and writer misuse.  Run by ctest (label cpu).
 */
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <setjmp.h>
#include <cmocka.h>

#include "base/kvs.h"
#include "kernels/kern.h"
#include "model/model.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ------------------------------------------------------------------------ */
/* Files and buffers.                                                       */
/* ------------------------------------------------------------------------ */

static void
tmp_path(char *buf, size_t n)
{
    const char *dir = getenv("TMPDIR");
    snprintf(buf, n, "%s/kvs_gguf_XXXXXX", dir && *dir ? dir : "/tmp");
    int fd = mkstemp(buf);
    assert_true(fd >= 0);
    close(fd);
}

static uint8_t *
read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    assert_non_null(f);
    assert_int_equal(fseek(f, 0, SEEK_END), 0);
    long n = ftell(f);
    assert_true(n >= 0);
    rewind(f);
    uint8_t *p = malloc(n > 0 ? (size_t)n : 1);
    assert_non_null(p);
    assert_int_equal(fread(p, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return p;
}

static void
write_all(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    assert_int_equal(fwrite(p, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

/* Opens a private, exactly-sized copy so AddressSanitizer sees any read
 * past the end. */
static int
open_copy(const uint8_t *p, size_t n, model_gguf_t **g, char *err, size_t err_len)
{
    uint8_t *c = malloc(n ? n : 1);
    assert_non_null(c);
    memcpy(c, p, n);
    int rc = model_gguf_open_mem(c, n, g, err, err_len);
    if (rc != 0) {
        free(c);
        return rc;
    }
    /* The reader borrows the copy; callers here only want the verdict. */
    model_gguf_close(*g);
    *g = NULL;
    free(c);
    return 0;
}

/* A byte builder for hand-made files. */
typedef struct bb {
    uint8_t *p;
    size_t n, cap;
} bb_t;

static void
bb_raw(bb_t *b, const void *d, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    memcpy(b->p + b->n, d, n);
    b->n += n;
}

static void
bb_u8(bb_t *b, uint8_t v)
{
    bb_raw(b, &v, 1);
}

static void
bb_u32(bb_t *b, uint32_t v)
{
    uint8_t x[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    bb_raw(b, x, 4);
}

static void
bb_u64(bb_t *b, uint64_t v)
{
    bb_u32(b, (uint32_t)v);
    bb_u32(b, (uint32_t)(v >> 32));
}

static void
bb_str(bb_t *b, const char *s)
{
    bb_u64(b, strlen(s));
    bb_raw(b, s, strlen(s));
}

static void
bb_zeros(bb_t *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        bb_u8(b, 0);
}

static void
bb_pad(bb_t *b, size_t a)
{
    while (b->n % a)
        bb_u8(b, 0);
}

static void
hdr(bb_t *b, uint32_t version, uint64_t n_tensors, uint64_t n_kv)
{
    bb_raw(b, "GGUF", 4);
    bb_u32(b, version);
    bb_u64(b, n_tensors);
    bb_u64(b, n_kv);
}

static void
kvh(bb_t *b, const char *key, uint32_t type)
{
    bb_str(b, key);
    bb_u32(b, type);
}

static void
kv_u32(bb_t *b, const char *key, uint32_t v)
{
    kvh(b, key, MODEL_GGUF_UINT32);
    bb_u32(b, v);
}

static void
tinfo(bb_t *b, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type, uint64_t off)
{
    bb_str(b, name);
    bb_u32(b, n_dims);
    for (uint32_t d = 0; d < n_dims; d++)
        bb_u64(b, ne[d]);
    bb_u32(b, type);
    bb_u64(b, off);
}

static char *
print_kv(const model_gguf_t *g, const char *key)
{
    char *buf = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&buf, &n);
    assert_non_null(f);
    int64_t i = model_gguf_find_key(g, key);
    assert_true(i >= 0);
    model_gguf_kv_print(g, (uint32_t)i, f);
    fclose(f);
    return buf;
}

static void
expect_print(const model_gguf_t *g, const char *key, const char *want)
{
    char *s = print_kv(g, key);
    if (strcmp(s, want) != 0)
        fail_msg("kv_print(%s): got <%s>, want <%s>", key, s, want);
    free(s);
}

/* ------------------------------------------------------------------------ */
/* Round trip.                                                              */
/* ------------------------------------------------------------------------ */

#define RT_ALIGN 64

typedef struct rt_data {
    float f32[24];
    uint16_t f16[5];
    kern_block_q8_0_t q8[4];
    int8_t i8[12];
} rt_data_t;

static void
rt_fill(rt_data_t *d)
{
    for (int i = 0; i < 24; i++)
        d->f32[i] = (float)i * 0.5f - 3.0f;
    for (int i = 0; i < 5; i++)
        d->f16[i] = kvs_f32_to_fp16((float)i + 0.25f);
    float x[128];
    for (int i = 0; i < 128; i++)
        x[i] = (float)((i * 37) % 101) / 7.0f - 5.0f;
    kern_quantize_q8_0(x, d->q8, 128);
    for (int i = 0; i < 12; i++)
        d->i8[i] = (int8_t)(i * 11 - 60);
}

static const char *const rt_tokens[] = {"a", "\xc4\x80", "", "x\0y", "!"};
static const size_t rt_token_lens[] = {1, 2, 0, 3, 1};
static const char *const rt_merges[] = {"a b", "\xc4\xa0 t"};
static const float rt_scores[] = {0.5f, -1.0f, 2.25f};
static const int32_t rt_types[] = {1, -2, 3, 2147483647};

static void
rt_write(const char *path, const rt_data_t *d)
{
    model_gguf_writer_t *w;
    assert_int_equal(model_gguf_writer_new(&w), 0);
    assert_int_equal(model_gguf_writer_set_str(w, "general.architecture", "llama"), 0);
    assert_int_equal(model_gguf_writer_set_u32(w, "general.alignment", RT_ALIGN), 0);
    assert_int_equal(model_gguf_writer_set_u32(w, "t.u32", 4000000000u), 0);
    assert_int_equal(model_gguf_writer_set_i32(w, "t.i32", -5), 0);
    assert_int_equal(model_gguf_writer_set_u64(w, "t.u64", 1ull << 40), 0);
    assert_int_equal(model_gguf_writer_set_f32(w, "t.f32", 1.5f), 0);
    assert_int_equal(model_gguf_writer_set_bool(w, "t.true", true), 0);
    assert_int_equal(model_gguf_writer_set_bool(w, "t.false", false), 0);
    assert_int_equal(model_gguf_writer_set_str(w, "t.str", "h\xc3\xa9llo \"q\"\n"), 0);
    assert_int_equal(model_gguf_writer_set_str(w, "t.empty", ""), 0);
    assert_int_equal(model_gguf_writer_set_arr_str(w, "t.tokens", rt_tokens, rt_token_lens, 5), 0);
    assert_int_equal(model_gguf_writer_set_arr_str(w, "t.merges", rt_merges, NULL, 2), 0);
    assert_int_equal(model_gguf_writer_set_arr_f32(w, "t.scores", rt_scores, 3), 0);
    assert_int_equal(model_gguf_writer_set_arr_i32(w, "t.types", rt_types, 4), 0);
    assert_int_equal(model_gguf_writer_set_arr_f32(w, "t.none", NULL, 0), 0);
    int32_t many[20];
    for (int i = 0; i < 20; i++)
        many[i] = i;
    assert_int_equal(model_gguf_writer_set_arr_i32(w, "t.many", many, 20), 0);

    assert_int_equal(model_gguf_writer_add_tensor(w, "w.f32", 2, (uint64_t[]){8, 3}, KERN_F32), 0);
    assert_int_equal(model_gguf_writer_add_tensor(w, "w.f16", 1, (uint64_t[]){5}, KERN_F16), 0);
    assert_int_equal(model_gguf_writer_add_tensor(w, "w.q8", 2, (uint64_t[]){64, 2}, KERN_Q8_0), 0);
    assert_int_equal(model_gguf_writer_add_tensor(w, "w.i8", 4, (uint64_t[]){3, 2, 2, 1}, KERN_I8),
                     0);
    assert_int_equal(model_gguf_writer_begin(w, path), 0);
    /* One call, then pieces, then two tensors joined in one call. */
    assert_int_equal(model_gguf_writer_write(w, d->f32, sizeof d->f32), 0);
    const uint8_t *h = (const uint8_t *)d->f16;
    assert_int_equal(model_gguf_writer_write(w, h, 3), 0);
    assert_int_equal(model_gguf_writer_write(w, h + 3, 0), 0);
    assert_int_equal(model_gguf_writer_write(w, h + 3, 3), 0);
    assert_int_equal(model_gguf_writer_write(w, h + 6, 4), 0);
    uint8_t joined[136 + 12];
    memcpy(joined, d->q8, 136);
    memcpy(joined + 136, d->i8, 12);
    assert_int_equal(model_gguf_writer_write(w, joined, sizeof joined), 0);
    assert_int_equal(model_gguf_writer_finish(w), 0);
    model_gguf_writer_free(w);
}

static void
rt_check(const model_gguf_t *g, const uint8_t *base, const rt_data_t *d)
{
    assert_int_equal(model_gguf_version(g), 3);
    assert_int_equal(model_gguf_alignment(g), RT_ALIGN);
    assert_int_equal(model_gguf_data_offset(g) % RT_ALIGN, 0);
    assert_int_equal(model_gguf_n_kv(g), 16);
    assert_string_equal(model_gguf_kv_key(g, 0), "general.architecture");
    assert_string_equal(model_gguf_kv_key(g, 15), "t.many");
    assert_null(model_gguf_kv_key(g, 16));
    assert_int_equal(model_gguf_kv_type(g, 0), MODEL_GGUF_STRING);
    assert_int_equal(model_gguf_kv_type(g, 2), MODEL_GGUF_UINT32);
    assert_int_equal(model_gguf_kv_type(g, 3), MODEL_GGUF_INT32);
    assert_int_equal(model_gguf_kv_type(g, 4), MODEL_GGUF_UINT64);
    assert_int_equal(model_gguf_kv_type(g, 5), MODEL_GGUF_FLOAT32);
    assert_int_equal(model_gguf_kv_type(g, 6), MODEL_GGUF_BOOL);
    assert_int_equal(model_gguf_kv_type(g, 10), MODEL_GGUF_ARRAY);
    for (uint32_t i = 0; i < model_gguf_n_kv(g); i++)
        assert_int_equal(model_gguf_find_key(g, model_gguf_kv_key(g, i)), i);
    assert_int_equal(model_gguf_find_key(g, "t.missing"), -1);
    assert_int_equal(model_gguf_find_key(g, "t"), -1);

    model_gguf_str_t s;
    assert_int_equal(model_gguf_get_str(g, "general.architecture", &s), 0);
    assert_int_equal(s.len, 5);
    assert_string_equal(s.ptr, "llama");
    assert_int_equal(model_gguf_get_str(g, "t.str", &s), 0);
    assert_string_equal(s.ptr, "h\xc3\xa9llo \"q\"\n");
    assert_int_equal(model_gguf_get_str(g, "t.empty", &s), 0);
    assert_int_equal(s.len, 0);
    assert_string_equal(s.ptr, "");

    uint32_t u32;
    uint64_t u64;
    int64_t i64;
    float f;
    bool b;
    assert_int_equal(model_gguf_get_u32(g, "t.u32", &u32), 0);
    assert_int_equal(u32, 4000000000u);
    assert_int_equal(model_gguf_get_u32(g, "general.alignment", &u32), 0);
    assert_int_equal(u32, RT_ALIGN);
    assert_int_equal(model_gguf_get_i64(g, "t.u32", &i64), 0);
    assert_int_equal(i64, 4000000000);
    assert_int_equal(model_gguf_get_i64(g, "t.i32", &i64), 0);
    assert_int_equal(i64, -5);
    assert_int_equal(model_gguf_get_u32(g, "t.i32", &u32), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_u64(g, "t.i32", &u64), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_u64(g, "t.u64", &u64), 0);
    assert_int_equal(u64, 1ull << 40);
    assert_int_equal(model_gguf_get_u32(g, "t.u64", &u32), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_f32(g, "t.f32", &f), 0);
    assert_true(f == 1.5f);
    assert_int_equal(model_gguf_get_f32(g, "t.u32", &f), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_u32(g, "t.f32", &u32), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_bool(g, "t.true", &b), 0);
    assert_true(b);
    assert_int_equal(model_gguf_get_bool(g, "t.false", &b), 0);
    assert_false(b);
    assert_int_equal(model_gguf_get_bool(g, "t.u32", &b), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_u32(g, "t.true", &u32), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_str(g, "t.u32", &s), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_str(g, "t.tokens", &s), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_u32(g, "t.missing", &u32), KVS_ENOENT);
    assert_int_equal(model_gguf_get_u64(g, "t.missing", &u64), KVS_ENOENT);
    assert_int_equal(model_gguf_get_i64(g, "t.missing", &i64), KVS_ENOENT);
    assert_int_equal(model_gguf_get_f32(g, "t.missing", &f), KVS_ENOENT);
    assert_int_equal(model_gguf_get_bool(g, "t.missing", &b), KVS_ENOENT);
    assert_int_equal(model_gguf_get_str(g, "t.missing", &s), KVS_ENOENT);

    model_gguf_type_t et;
    uint64_t count;
    assert_int_equal(model_gguf_get_arr(g, "t.tokens", &et, &count), 0);
    assert_int_equal(et, MODEL_GGUF_STRING);
    assert_int_equal(count, 5);
    for (uint64_t i = 0; i < 5; i++) {
        assert_int_equal(model_gguf_arr_str(g, "t.tokens", i, &s), 0);
        assert_int_equal(s.len, rt_token_lens[i]);
        assert_memory_equal(s.ptr, rt_tokens[i], s.len);
        assert_int_equal(s.ptr[s.len], '\0');
    }
    assert_int_equal(model_gguf_arr_str(g, "t.tokens", 5, &s), KVS_ERANGE);
    assert_int_equal(model_gguf_arr_str(g, "t.merges", 1, &s), 0);
    assert_string_equal(s.ptr, "\xc4\xa0 t");
    assert_int_equal(model_gguf_arr_str(g, "t.scores", 0, &s), KVS_EFORMAT);
    assert_int_equal(model_gguf_arr_str(g, "t.u32", 0, &s), KVS_EFORMAT);
    assert_int_equal(model_gguf_arr_str(g, "t.missing", 0, &s), KVS_ENOENT);
    const void *data;
    assert_int_equal(model_gguf_arr_data(g, "t.tokens", &data), KVS_EFORMAT);
    assert_int_equal(model_gguf_arr_data(g, "t.u32", &data), KVS_EFORMAT);
    assert_int_equal(model_gguf_arr_data(g, "t.missing", &data), KVS_ENOENT);
    assert_int_equal(model_gguf_get_arr(g, "t.scores", &et, &count), 0);
    assert_int_equal(et, MODEL_GGUF_FLOAT32);
    assert_int_equal(count, 3);
    assert_int_equal(model_gguf_arr_data(g, "t.scores", &data), 0);
    float fs[3];
    memcpy(fs, data, sizeof fs);
    assert_memory_equal(fs, rt_scores, sizeof fs);
    assert_int_equal(model_gguf_get_arr(g, "t.types", &et, &count), 0);
    assert_int_equal(et, MODEL_GGUF_INT32);
    assert_int_equal(model_gguf_arr_data(g, "t.types", &data), 0);
    int32_t is[4];
    memcpy(is, data, sizeof is);
    assert_memory_equal(is, rt_types, sizeof is);
    assert_int_equal(model_gguf_get_arr(g, "t.none", &et, &count), 0);
    assert_int_equal(count, 0);
    assert_int_equal(model_gguf_get_arr(g, "t.u32", &et, &count), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_arr(g, "t.missing", &et, &count), KVS_ENOENT);

    expect_print(g, "general.architecture", "str \"llama\"");
    expect_print(g, "t.u32", "u32 4000000000");
    expect_print(g, "t.i32", "i32 -5");
    expect_print(g, "t.u64", "u64 1099511627776");
    expect_print(g, "t.f32", "f32 1.5");
    expect_print(g, "t.true", "bool true");
    expect_print(g, "t.str", "str \"h\\u00e9llo \\\"q\\\"\\n\"");
    expect_print(g, "t.tokens", "arr[str,5] [\"a\", \"\\u0100\", \"\", \"x\\u0000y\", \"!\"]");
    expect_print(g, "t.scores", "arr[f32,3] [0.5, -1, 2.25]");
    expect_print(g, "t.types", "arr[i32,4] [1, -2, 3, 2147483647]");
    expect_print(g, "t.none", "arr[f32,0] []");
    expect_print(g, "t.many", "arr[i32,20] [0, 1, 2, 3, 4, 5, 6, 7, ...]");

    /* Tensors: llama.cpp layout, offsets = running sum of padded sizes. */
    static const struct {
        const char *name;
        uint32_t n_dims;
        uint64_t ne[4];
        uint32_t type;
        size_t nbytes;
        uint64_t offset;
    } want[] = {
        {"w.f32", 2, {8, 3, 1, 1}, KERN_F32, 96, 0},
        {"w.f16", 1, {5, 1, 1, 1}, KERN_F16, 10, 128},
        {"w.q8", 2, {64, 2, 1, 1}, KERN_Q8_0, 136, 192},
        {"w.i8", 4, {3, 2, 2, 1}, KERN_I8, 12, 384},
    };
    const void *bytes[] = {d->f32, d->f16, d->q8, d->i8};
    assert_int_equal(model_gguf_n_tensors(g), 4);
    for (uint32_t i = 0; i < 4; i++) {
        const model_gguf_tensor_t *t = model_gguf_tensor(g, i);
        assert_non_null(t);
        assert_ptr_equal(model_gguf_find_tensor(g, want[i].name), t);
        assert_string_equal(t->name, want[i].name);
        assert_int_equal(t->n_dims, want[i].n_dims);
        for (int k = 0; k < 4; k++)
            assert_int_equal(t->ne[k], want[i].ne[k]);
        assert_int_equal(t->type, want[i].type);
        assert_int_equal(t->nbytes, want[i].nbytes);
        assert_int_equal(t->offset, want[i].offset);
        size_t abs = (size_t)((const uint8_t *)t->data - base);
        assert_int_equal(abs, model_gguf_data_offset(g) + t->offset);
        assert_int_equal(abs % RT_ALIGN, 0);
        assert_memory_equal(t->data, bytes[i], t->nbytes);
    }
    assert_null(model_gguf_tensor(g, 4));
    assert_null(model_gguf_find_tensor(g, "w"));
    assert_null(model_gguf_find_tensor(g, "w.f32x"));
}

static void
test_roundtrip(void **state)
{
    (void)state;
    char path[512];
    tmp_path(path, sizeof path);
    rt_data_t d;
    rt_fill(&d);
    rt_write(path, &d);

    size_t len;
    uint8_t *buf = read_all(path, &len);
    /* Trailing padding after the last tensor, as llama.cpp writes it. */
    assert_int_equal(len % RT_ALIGN, 0);

    char err[256] = "";
    model_gguf_t *g = NULL;
    assert_int_equal(model_gguf_open(path, &g, err, sizeof err), 0);
    /* The mapping is page aligned, so the file offset decides alignment. */
    const uint8_t *mbase =
        (const uint8_t *)model_gguf_tensor(g, 0)->data - model_gguf_data_offset(g);
    assert_int_equal((uintptr_t)mbase % 4096, 0);
    rt_check(g, mbase, &d);
    model_gguf_close(g);

    g = NULL;
    assert_int_equal(model_gguf_open_mem(buf, len, &g, err, sizeof err), 0);
    rt_check(g, buf, &d);
    model_gguf_close(g);
    model_gguf_close(NULL);

    free(buf);
    unlink(path);
}

/* Every value type, including those the writer has no setter for, and the
 * getters' coercions at the edges of each range.  Also a v2 file. */
static void
test_all_types(void **state)
{
    (void)state;
    bb_t b = {0};
    hdr(&b, 2, 0, 17);
    kvh(&b, "u8", MODEL_GGUF_UINT8);
    bb_u8(&b, 200);
    kvh(&b, "i8", MODEL_GGUF_INT8);
    bb_u8(&b, (uint8_t)-7);
    kvh(&b, "i8p", MODEL_GGUF_INT8);
    bb_u8(&b, 7);
    kvh(&b, "u16", MODEL_GGUF_UINT16);
    bb_u8(&b, 0x60);
    bb_u8(&b, 0xea); /* 60000 */
    kvh(&b, "i16", MODEL_GGUF_INT16);
    bb_u8(&b, 0xd4);
    bb_u8(&b, 0xfe); /* -300 */
    kv_u32(&b, "u32", 0xffffffffu);
    kvh(&b, "i32", MODEL_GGUF_INT32);
    bb_u32(&b, (uint32_t)-70000);
    kvh(&b, "f32", MODEL_GGUF_FLOAT32);
    bb_u32(&b, kvs_f32_to_bits(-0.25f));
    kvh(&b, "bool", MODEL_GGUF_BOOL);
    bb_u8(&b, 1);
    kvh(&b, "str", MODEL_GGUF_STRING);
    bb_str(&b, "\x01\t\xff");
    kvh(&b, "u64", MODEL_GGUF_UINT64);
    bb_u64(&b, UINT64_MAX);
    kvh(&b, "i64", MODEL_GGUF_INT64);
    bb_u64(&b, (uint64_t)INT64_MIN);
    kvh(&b, "f64", MODEL_GGUF_FLOAT64);
    double dv = 2.5;
    bb_raw(&b, &dv, 8);
    kvh(&b, "f64big", MODEL_GGUF_FLOAT64);
    dv = 1e300;
    bb_raw(&b, &dv, 8);
    kvh(&b, "arr.u8", MODEL_GGUF_ARRAY);
    bb_u32(&b, MODEL_GGUF_UINT8);
    bb_u64(&b, 3);
    bb_raw(&b, "\x01\x02\x03", 3);
    kvh(&b, "arr.u64", MODEL_GGUF_ARRAY);
    bb_u32(&b, MODEL_GGUF_UINT64);
    bb_u64(&b, 1);
    bb_u64(&b, 42);
    kvh(&b, "arr.bool", MODEL_GGUF_ARRAY);
    bb_u32(&b, MODEL_GGUF_BOOL);
    bb_u64(&b, 2);
    bb_raw(&b, "\x00\x01", 2);

    char err[256] = "";
    model_gguf_t *g = NULL;
    int rc = model_gguf_open_mem(b.p, b.n, &g, err, sizeof err);
    if (rc != 0)
        fail_msg("open: %s", err);
    assert_int_equal(model_gguf_version(g), 2);
    assert_int_equal(model_gguf_alignment(g), 32);
    assert_int_equal(model_gguf_n_tensors(g), 0);
    static const model_gguf_type_t types[] = {
        MODEL_GGUF_UINT8,   MODEL_GGUF_INT8,    MODEL_GGUF_INT8,   MODEL_GGUF_UINT16,
        MODEL_GGUF_INT16,   MODEL_GGUF_UINT32,  MODEL_GGUF_INT32,  MODEL_GGUF_FLOAT32,
        MODEL_GGUF_BOOL,    MODEL_GGUF_STRING,  MODEL_GGUF_UINT64, MODEL_GGUF_INT64,
        MODEL_GGUF_FLOAT64, MODEL_GGUF_FLOAT64, MODEL_GGUF_ARRAY,  MODEL_GGUF_ARRAY,
        MODEL_GGUF_ARRAY,
    };
    for (uint32_t i = 0; i < 17; i++)
        assert_int_equal(model_gguf_kv_type(g, i), types[i]);

    uint32_t u32;
    uint64_t u64;
    int64_t i64;
    float f;
    bool bl;
    assert_int_equal(model_gguf_get_u32(g, "u8", &u32), 0);
    assert_int_equal(u32, 200);
    assert_int_equal(model_gguf_get_u32(g, "i8", &u32), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_i64(g, "i8", &i64), 0);
    assert_int_equal(i64, -7);
    assert_int_equal(model_gguf_get_u32(g, "i8p", &u32), 0);
    assert_int_equal(u32, 7);
    assert_int_equal(model_gguf_get_u64(g, "u16", &u64), 0);
    assert_int_equal(u64, 60000);
    assert_int_equal(model_gguf_get_i64(g, "i16", &i64), 0);
    assert_int_equal(i64, -300);
    assert_int_equal(model_gguf_get_u32(g, "u32", &u32), 0);
    assert_int_equal(u32, 0xffffffffu);
    assert_int_equal(model_gguf_get_i64(g, "i32", &i64), 0);
    assert_int_equal(i64, -70000);
    assert_int_equal(model_gguf_get_u64(g, "u64", &u64), 0);
    assert_true(u64 == UINT64_MAX);
    assert_int_equal(model_gguf_get_u32(g, "u64", &u32), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_i64(g, "u64", &i64), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_i64(g, "i64", &i64), 0);
    assert_true(i64 == INT64_MIN);
    assert_int_equal(model_gguf_get_u64(g, "i64", &u64), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_f32(g, "f32", &f), 0);
    assert_true(f == -0.25f);
    assert_int_equal(model_gguf_get_f32(g, "f64", &f), 0);
    assert_true(f == 2.5f);
    assert_int_equal(model_gguf_get_f32(g, "f64big", &f), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_u32(g, "f64", &u32), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_bool(g, "bool", &bl), 0);
    assert_true(bl);
    assert_int_equal(model_gguf_get_bool(g, "u8", &bl), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_u32(g, "bool", &u32), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_f32(g, "i32", &f), KVS_EFORMAT);
    assert_int_equal(model_gguf_get_u32(g, "arr.u8", &u32), KVS_EFORMAT);
    model_gguf_str_t s;
    assert_int_equal(model_gguf_get_str(g, "str", &s), 0);
    assert_int_equal(s.len, 3);
    const void *data;
    assert_int_equal(model_gguf_arr_data(g, "arr.u64", &data), 0);
    uint64_t v64;
    memcpy(&v64, data, 8);
    assert_int_equal(v64, 42);

    expect_print(g, "u8", "u8 200");
    expect_print(g, "i8", "i8 -7");
    expect_print(g, "u16", "u16 60000");
    expect_print(g, "i16", "i16 -300");
    expect_print(g, "i32", "i32 -70000");
    expect_print(g, "f32", "f32 -0.25");
    expect_print(g, "str", "str \"\\u0001\\t\\xff\"");
    expect_print(g, "u64", "u64 18446744073709551615");
    expect_print(g, "i64", "i64 -9223372036854775808");
    expect_print(g, "f64", "f64 2.5");
    expect_print(g, "arr.u8", "arr[u8,3] [1, 2, 3]");
    expect_print(g, "arr.u64", "arr[u64,1] [42]");
    expect_print(g, "arr.bool", "arr[bool,2] [false, true]");

    /* Every value copied verbatim into a new file reads back the same. */
    char path[512];
    tmp_path(path, sizeof path);
    model_gguf_writer_t *w;
    assert_int_equal(model_gguf_writer_new(&w), 0);
    for (uint32_t i = 0; i < model_gguf_n_kv(g); i++) {
        const void *v;
        size_t n;
        assert_int_equal(model_gguf_kv_raw(g, i, &v, &n), 0);
        assert_int_equal(
            model_gguf_writer_set_raw(w, model_gguf_kv_key(g, i), model_gguf_kv_type(g, i), v, n),
            0);
    }
    size_t n_unused;
    assert_int_equal(model_gguf_kv_raw(g, 17, &data, &n_unused), KVS_ENOENT);
    assert_int_equal(
        model_gguf_writer_set_raw(w, "general.alignment", MODEL_GGUF_UINT32, "\x40\0\0\0", 4),
        KVS_EINVAL);
    assert_int_equal(model_gguf_writer_set_raw(w, "bad.type", (model_gguf_type_t)13, "", 0),
                     KVS_EINVAL);
    assert_int_equal(model_gguf_writer_set_raw(w, "u8", MODEL_GGUF_UINT8, "\x01", 1),
                     KVS_EINVAL); /* already set */
    assert_int_equal(model_gguf_writer_begin(w, path), 0);
    assert_int_equal(model_gguf_writer_finish(w), 0);
    model_gguf_writer_free(w);
    model_gguf_t *c = NULL;
    assert_int_equal(model_gguf_open(path, &c, err, sizeof err), 0);
    assert_int_equal(model_gguf_n_kv(c), model_gguf_n_kv(g));
    for (uint32_t i = 0; i < model_gguf_n_kv(g); i++) {
        const void *a, *b2;
        size_t la, lb;
        assert_string_equal(model_gguf_kv_key(c, i), model_gguf_kv_key(g, i));
        assert_int_equal(model_gguf_kv_type(c, i), model_gguf_kv_type(g, i));
        assert_int_equal(model_gguf_kv_raw(g, i, &a, &la), 0);
        assert_int_equal(model_gguf_kv_raw(c, i, &b2, &lb), 0);
        assert_int_equal(la, lb);
        assert_memory_equal(a, b2, la);
    }
    expect_print(c, "i64", "i64 -9223372036854775808");
    expect_print(c, "arr.u8", "arr[u8,3] [1, 2, 3]");
    model_gguf_close(c);
    unlink(path);
    model_gguf_close(g);
    free(b.p);
}

/* ------------------------------------------------------------------------ */
/* Malformed files.                                                         */
/* ------------------------------------------------------------------------ */

static const uint64_t NE8[] = {8};

/* A header with one tensor "w" f32[8] at offset 0 and its 32 bytes. */
static void
one_tensor(bb_t *b, const char *name, uint32_t n_dims, const uint64_t *ne, uint32_t type,
           uint64_t off)
{
    hdr(b, 3, 1, 0);
    tinfo(b, name, n_dims, ne, type, off);
    bb_zeros(b, 48); /* enough bytes that counts are plausible */
}

static void
c_ok_tensor(bb_t *b)
{
    hdr(b, 3, 1, 1);
    kv_u32(b, "k.a", 1);
    tinfo(b, "w", 1, NE8, KERN_F32, 0);
    bb_pad(b, 32);
    bb_zeros(b, 32);
}

static void
c_ok_no_tensors_unpadded(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kv_u32(b, "k.a", 1); /* ends at 43, data_off would be 64 */
}

static void
c_ok_no_kv(bb_t *b)
{
    hdr(b, 3, 0, 0);
}

static void
c_too_short(bb_t *b)
{
    bb_raw(b, "GGUF\x03\x00\x00\x00", 8);
}

static void
c_magic(bb_t *b)
{
    bb_raw(b, "GGUX", 4);
    bb_u32(b, 3);
    bb_u64(b, 0);
    bb_u64(b, 0);
}

static void
c_v1(bb_t *b)
{
    hdr(b, 1, 0, 0);
}

static void
c_v4(bb_t *b)
{
    hdr(b, 4, 0, 0);
}

static void
c_huge_tensor_count(bb_t *b)
{
    hdr(b, 3, 1ull << 62, 0);
    bb_zeros(b, 100);
}

static void
c_huge_kv_count(bb_t *b)
{
    hdr(b, 3, 0, 1000000000000000000ull);
    bb_zeros(b, 100);
}

static void
c_neg_kv_count(bb_t *b)
{
    hdr(b, 3, 0, UINT64_MAX);
}

static void
c_kv_count_tight(bb_t *b)
{
    hdr(b, 3, 0, 2); /* two kvs need >= 28 bytes; 20 remain */
    kv_u32(b, "k.a", 1);
    bb_u8(b, 0);
}

static void
c_key_len_huge(bb_t *b)
{
    hdr(b, 3, 0, 1);
    bb_u64(b, 1000000000000000000ull);
    bb_zeros(b, 20);
}

static void
c_key_len_64k(bb_t *b)
{
    hdr(b, 3, 0, 1);
    bb_u64(b, 70000);
    bb_zeros(b, 70010);
}

static void
c_key_len_0(bb_t *b)
{
    hdr(b, 3, 0, 1);
    bb_u64(b, 0);
    bb_u32(b, MODEL_GGUF_UINT32);
    bb_u32(b, 1);
    bb_zeros(b, 4);
}

static void
c_key_nul(bb_t *b)
{
    hdr(b, 3, 0, 1);
    bb_u64(b, 3);
    bb_raw(b, "a\0b", 3);
    bb_u32(b, MODEL_GGUF_UINT32);
    bb_u32(b, 1);
}

static void
c_trunc_key1(bb_t *b)
{
    hdr(b, 3, 0, 2);
    kv_u32(b, "k.a", 1);
    bb_u64(b, 5);
    bb_raw(b, "k.b", 3);
}

static void
c_trunc_value(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kvh(b, "k.u64", MODEL_GGUF_UINT64);
    bb_u32(b, 0);
}

static void
c_value_type(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kvh(b, "k.x", 13);
    bb_u32(b, 0);
}

static void
c_str_len(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kvh(b, "k.str", MODEL_GGUF_STRING);
    bb_u64(b, 1000000000000000000ull);
    bb_raw(b, "abc", 3);
}

static void
c_arr_count(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kvh(b, "k.arr", MODEL_GGUF_ARRAY);
    bb_u32(b, MODEL_GGUF_UINT32);
    bb_u64(b, 1000000000000000000ull);
    bb_zeros(b, 16);
}

static void
c_arr_count_ovf(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kvh(b, "k.arr64", MODEL_GGUF_ARRAY);
    bb_u32(b, MODEL_GGUF_UINT64);
    bb_u64(b, 1ull << 62); /* * 8 wraps to 0 */
    bb_zeros(b, 16);
}

static void
c_strarr_count(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kvh(b, "tokenizer.ggml.tokens", MODEL_GGUF_ARRAY);
    bb_u32(b, MODEL_GGUF_STRING);
    bb_u64(b, 1000000000000000000ull);
    bb_zeros(b, 16);
}

static void
c_strarr_elem(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kvh(b, "k.sarr", MODEL_GGUF_ARRAY);
    bb_u32(b, MODEL_GGUF_STRING);
    bb_u64(b, 2);
    bb_str(b, "ab");
    bb_u64(b, 1000);
    bb_raw(b, "xyz", 3);
}

static void
c_arr_of_arr(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kvh(b, "k.nested", MODEL_GGUF_ARRAY);
    bb_u32(b, MODEL_GGUF_ARRAY);
    bb_u64(b, 1);
    bb_u32(b, MODEL_GGUF_UINT8);
    bb_u64(b, 1);
    bb_u8(b, 0);
}

static void
c_arr_elem_type(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kvh(b, "k.arr", MODEL_GGUF_ARRAY);
    bb_u32(b, 99);
    bb_u64(b, 0);
}

static void
c_dup_key(bb_t *b)
{
    hdr(b, 3, 0, 3);
    kv_u32(b, "k.a", 1);
    kv_u32(b, "k.b", 1);
    kv_u32(b, "k.a", 2);
}

static void
c_align0(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kv_u32(b, "general.alignment", 0);
}

static void
c_align3(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kv_u32(b, "general.alignment", 3);
}

static void
c_align_type(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kvh(b, "general.alignment", MODEL_GGUF_INT32);
    bb_u32(b, 32);
}

static void
c_ttype_removed(bb_t *b)
{
    one_tensor(b, "w.t4", 1, NE8, 4, 0);
}

static void
c_ttype_huge(bb_t *b)
{
    one_tensor(b, "w.t1000", 1, NE8, 1000, 0);
}

static void
c_ndims0(bb_t *b)
{
    one_tensor(b, "w.d0", 0, NE8, KERN_F32, 0);
}

static void
c_ndims5(bb_t *b)
{
    one_tensor(b, "w.d5", 5, (const uint64_t[]){8, 1, 1, 1, 1}, KERN_F32, 0);
}

static void
c_ne_zero(bb_t *b)
{
    one_tensor(b, "w.ne0", 2, (const uint64_t[]){8, 0}, KERN_F32, 0);
}

static void
c_ne_overflow(bb_t *b)
{
    one_tensor(b, "w.big", 3, (const uint64_t[]){1ull << 32, 1ull << 32, 2}, KERN_F32, 0);
}

static void
c_bytes_overflow(bb_t *b)
{
    one_tensor(b, "w.bytes", 2, (const uint64_t[]){1ull << 31, 1ull << 31}, KERN_F32, 0);
}

static void
c_q8_block(bb_t *b)
{
    one_tensor(b, "w.q8", 2, (const uint64_t[]){33, 2}, KERN_Q8_0, 0);
}

static void
c_name_empty(bb_t *b)
{
    one_tensor(b, "", 1, NE8, KERN_F32, 0);
}

static void
c_name_64(bb_t *b)
{
    char name[65];
    memset(name, 'n', 64);
    name[64] = '\0';
    one_tensor(b, name, 1, NE8, KERN_F32, 0);
}

static void
c_name_nul(bb_t *b)
{
    hdr(b, 3, 1, 0);
    bb_u64(b, 3);
    bb_raw(b, "w\0x", 3);
    bb_u32(b, 1);
    bb_u64(b, 8);
    bb_u32(b, KERN_F32);
    bb_u64(b, 0);
    bb_zeros(b, 48);
}

static void
c_trunc_tensor1(bb_t *b)
{
    hdr(b, 3, 2, 0);
    tinfo(b, "aaaaaaaaaaaaaaaaaaaa", 1, NE8, KERN_F32, 0);
    bb_str(b, "bbbbbbbbbb");
    bb_u32(b, 1);
}

static void
c_offset_unaligned(bb_t *b)
{
    hdr(b, 3, 1, 0);
    tinfo(b, "w.unaligned", 1, NE8, KERN_F32, 4);
    bb_pad(b, 32);
    bb_zeros(b, 64);
}

static void
c_offset_past_end(bb_t *b)
{
    hdr(b, 3, 1, 0);
    tinfo(b, "blk.0.attn_q.weight", 1, NE8, KERN_F32, 32);
    bb_pad(b, 32);
    bb_zeros(b, 32);
}

static void
c_offset_wraps(bb_t *b)
{
    hdr(b, 3, 1, 0);
    tinfo(b, "w.wrap", 1, NE8, KERN_F32, UINT64_MAX - 31);
    bb_pad(b, 32);
    bb_zeros(b, 32);
}

static void
c_overlap(bb_t *b)
{
    hdr(b, 3, 2, 0);
    tinfo(b, "w.b", 1, NE8, KERN_F32, 32);
    tinfo(b, "w.a", 1, (const uint64_t[]){16}, KERN_F32, 0);
    bb_pad(b, 32);
    bb_zeros(b, 64);
}

static void
c_dup_tensor(bb_t *b)
{
    hdr(b, 3, 2, 0);
    tinfo(b, "w.same", 1, NE8, KERN_F32, 0);
    tinfo(b, "w.same", 1, NE8, KERN_F32, 32);
    bb_pad(b, 32);
    bb_zeros(b, 64);
}

static void
c_data_past_end(bb_t *b)
{
    hdr(b, 3, 1, 0);
    tinfo(b, "w", 1, NE8, KERN_F32, 0); /* ends at 57; data_off 64 */
}

static void
c_no_tensors_cut_padding(bb_t *b)
{
    hdr(b, 3, 0, 1);
    kv_u32(b, "k.a", 1);
    bb_zeros(b, 5); /* ends inside the padding before data_off */
}

typedef struct bad_case {
    const char *name;
    void (*build)(bb_t *b);
    int rc;
    const char *substr; /* expected in the error message */
    bool via_file;      /* also through model_gguf_open */
} bad_case_t;

static const bad_case_t bad_cases[] = {
    {"ok tensor", c_ok_tensor, 0, NULL, true},
    {"ok no tensors, unpadded", c_ok_no_tensors_unpadded, 0, NULL, false},
    {"ok empty", c_ok_no_kv, 0, NULL, false},
    {"too short", c_too_short, KVS_EFORMAT, "header", false},
    {"bad magic", c_magic, KVS_EFORMAT, "magic", true},
    {"version 1", c_v1, KVS_EFORMAT, "version 1", false},
    {"version 4", c_v4, KVS_EFORMAT, "version 4", false},
    {"huge tensor_count", c_huge_tensor_count, KVS_EFORMAT, "tensor_count 4611686018427387904",
     false},
    {"huge kv_count", c_huge_kv_count, KVS_EFORMAT, "kv_count 1000000000000000000", true},
    {"negative kv_count", c_neg_kv_count, KVS_EFORMAT, "kv_count", false},
    {"kv_count beyond bytes", c_kv_count_tight, KVS_EFORMAT, "kv_count 2", false},
    {"huge key length", c_key_len_huge, KVS_EFORMAT, "key #0", false},
    {"key length > 65535", c_key_len_64k, KVS_EFORMAT, "key #0: key length 70000", false},
    {"key length 0", c_key_len_0, KVS_EFORMAT, "key #0: key length 0", false},
    {"NUL in key", c_key_nul, KVS_EFORMAT, "NUL", false},
    {"truncated key", c_trunc_key1, KVS_EFORMAT, "key #1", false},
    {"truncated value", c_trunc_value, KVS_EFORMAT, "key 'k.u64': truncated", false},
    {"invalid value type", c_value_type, KVS_EFORMAT, "key 'k.x': invalid value type 13", false},
    {"huge string length", c_str_len, KVS_EFORMAT, "key 'k.str': string length", true},
    {"huge array count", c_arr_count, KVS_EFORMAT, "key 'k.arr': array count", false},
    {"array bytes wrap", c_arr_count_ovf, KVS_EFORMAT, "key 'k.arr64': array count", false},
    {"huge string array count", c_strarr_count, KVS_EFORMAT,
     "key 'tokenizer.ggml.tokens': array count 1000000000000000000", false},
    {"string array element", c_strarr_elem, KVS_EFORMAT, "key 'k.sarr': element 1", false},
    {"array of arrays", c_arr_of_arr, KVS_EFORMAT, "key 'k.nested': arrays of arrays", false},
    {"array element type", c_arr_elem_type, KVS_EFORMAT, "key 'k.arr': invalid array element",
     false},
    {"duplicate key", c_dup_key, KVS_EFORMAT, "duplicate key 'k.a'", true},
    {"alignment 0", c_align0, KVS_EFORMAT, "'general.alignment': 0", false},
    {"alignment 3", c_align3, KVS_EFORMAT, "'general.alignment': 3", false},
    {"alignment not u32", c_align_type, KVS_EFORMAT, "'general.alignment': type i32", false},
    {"tensor type 4", c_ttype_removed, KVS_EFORMAT, "tensor 'w.t4': unknown type 4", false},
    {"tensor type 1000", c_ttype_huge, KVS_EFORMAT, "tensor 'w.t1000': unknown type", false},
    {"n_dims 0", c_ndims0, KVS_EFORMAT, "tensor 'w.d0': n_dims 0", false},
    {"n_dims 5", c_ndims5, KVS_EFORMAT, "tensor 'w.d5': n_dims 5", false},
    {"ne 0", c_ne_zero, KVS_EFORMAT, "tensor 'w.ne0': ne[1] is 0", false},
    {"ne product overflow", c_ne_overflow, KVS_EFORMAT, "tensor 'w.big': element count", false},
    {"byte size overflow", c_bytes_overflow, KVS_EFORMAT, "tensor 'w.bytes': byte size", false},
    {"q8_0 block", c_q8_block, KVS_EFORMAT, "tensor 'w.q8': ne[0] = 33", false},
    {"empty name", c_name_empty, KVS_EFORMAT, "tensor #0: empty name", false},
    {"name 64 bytes", c_name_64, KVS_EFORMAT, "nnnnnnnnnnnnnnnn", false},
    {"NUL in name", c_name_nul, KVS_EFORMAT, "tensor #0: name contains a NUL", false},
    {"truncated tensor info", c_trunc_tensor1, KVS_EFORMAT, "tensor 'bbbbbbbbbb'", false},
    {"offset unaligned", c_offset_unaligned, KVS_EFORMAT, "tensor 'w.unaligned': offset 4", false},
    {"offset past end", c_offset_past_end, KVS_EFORMAT,
     "tensor 'blk.0.attn_q.weight': data [offset 128, 32 bytes] extends past end of file (128 "
     "bytes)",
     true},
    {"offset wraps", c_offset_wraps, KVS_EFORMAT, "tensor 'w.wrap': offset", false},
    {"tensors overlap", c_overlap, KVS_EFORMAT, "tensor 'w.b' [offset 32, 32 bytes] overlaps",
     true},
    {"duplicate tensor", c_dup_tensor, KVS_EFORMAT, "duplicate tensor name 'w.same'", false},
    {"data section past end", c_data_past_end, KVS_EFORMAT, "data section", false},
    {"no tensors, cut padding", c_no_tensors_cut_padding, KVS_EFORMAT, "data section", false},
};

static void
test_bad_files(void **state)
{
    (void)state;
    char path[512];
    tmp_path(path, sizeof path);
    for (size_t i = 0; i < sizeof bad_cases / sizeof bad_cases[0]; i++) {
        const bad_case_t *c = &bad_cases[i];
        bb_t b = {0};
        c->build(&b);
        for (int via = 0; via < (c->via_file ? 2 : 1); via++) {
            char err[512];
            strcpy(err, "(unset)");
            model_gguf_t *g = (model_gguf_t *)&err; /* must be reset on failure */
            int rc;
            if (via == 0) {
                rc = open_copy(b.p, b.n, &g, err, sizeof err);
            } else {
                write_all(path, b.p, b.n);
                rc = model_gguf_open(path, &g, err, sizeof err);
                if (rc == 0)
                    model_gguf_close(g);
            }
            if (rc != c->rc)
                fail_msg("case '%s' (%s): rc %d (%s), want %d; err: %s", c->name,
                         via ? "file" : "mem", rc, kvs_err_name(rc), c->rc, err);
            if (rc == 0)
                continue;
            assert_null(g);
            if (strstr(err, c->substr) == NULL)
                fail_msg("case '%s': message <%s> lacks <%s>", c->name, err, c->substr);
            assert_null(strchr(err, '\n'));
        }
        free(b.p);
    }
    /* A tiny error buffer truncates; NULL means no message at all. */
    bb_t b = {0};
    c_dup_key(&b);
    char tiny[8];
    model_gguf_t *g;
    assert_int_equal(model_gguf_open_mem(b.p, b.n, &g, tiny, sizeof tiny), KVS_EFORMAT);
    assert_int_equal(strlen(tiny), sizeof tiny - 1);
    assert_int_equal(model_gguf_open_mem(b.p, b.n, &g, NULL, 0), KVS_EFORMAT);
    free(b.p);
    unlink(path);
}

static void
test_open_errors(void **state)
{
    (void)state;
    char err[256] = "";
    model_gguf_t *g;
    int rc = model_gguf_open("/nonexistent-kvs-dir/model.gguf", &g, err, sizeof err);
    assert_true(rc == KVS_ENOENT || rc == KVS_EIO);
    assert_non_null(strstr(err, "/nonexistent-kvs-dir/model.gguf"));
    assert_null(g);

    const char *dir = getenv("TMPDIR");
    err[0] = '\0';
    rc = model_gguf_open(dir && *dir ? dir : "/tmp", &g, err, sizeof err);
    assert_int_equal(rc, KVS_EIO);
    assert_true(strlen(err) > 0);

    char path[512];
    tmp_path(path, sizeof path); /* empty file */
    err[0] = '\0';
    assert_int_equal(model_gguf_open(path, &g, err, sizeof err), KVS_EFORMAT);
    assert_non_null(strstr(err, "truncated"));
    unlink(path);

    assert_int_equal(model_gguf_open_mem(NULL, 0, &g, err, sizeof err), KVS_EFORMAT);
    assert_int_equal(model_gguf_open_mem(NULL, 10, &g, err, sizeof err), KVS_EINVAL);
    assert_int_equal(model_gguf_open_mem("GGUF", 4, NULL, err, sizeof err), KVS_EINVAL);
}

/* A small valid file whose last tensor ends exactly at the end of file, so
 * every shorter prefix is malformed. */
static uint8_t *
small_file(size_t *len)
{
    char path[512];
    tmp_path(path, sizeof path);
    model_gguf_writer_t *w;
    assert_int_equal(model_gguf_writer_new(&w), 0);
    assert_int_equal(model_gguf_writer_set_str(w, "general.architecture", "llama"), 0);
    const char *toks[] = {"<s>", "\xc4\xa0", "ab"};
    assert_int_equal(model_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, 3), 0);
    const float sc[] = {0.0f, -1.0f};
    assert_int_equal(model_gguf_writer_set_arr_f32(w, "tokenizer.ggml.scores", sc, 2), 0);
    assert_int_equal(model_gguf_writer_set_u32(w, "llama.block_count", 2), 0);
    assert_int_equal(model_gguf_writer_set_bool(w, "k.b", true), 0);
    assert_int_equal(model_gguf_writer_add_tensor(w, "a", 1, (uint64_t[]){5}, KERN_F16), 0);
    assert_int_equal(model_gguf_writer_add_tensor(w, "b", 1, (uint64_t[]){8}, KERN_F32), 0);
    assert_int_equal(model_gguf_writer_begin(w, path), 0);
    uint8_t data[10 + 32];
    for (size_t i = 0; i < sizeof data; i++)
        data[i] = (uint8_t)(i * 7 + 1);
    assert_int_equal(model_gguf_writer_write(w, data, sizeof data), 0);
    assert_int_equal(model_gguf_writer_finish(w), 0);
    model_gguf_writer_free(w);
    uint8_t *p = read_all(path, len);
    unlink(path);
    return p;
}

static void
test_truncations(void **state)
{
    (void)state;
    size_t len;
    uint8_t *file = small_file(&len);
    char err[256];
    model_gguf_t *g;
    for (size_t cut = 0; cut < len; cut++) {
        err[0] = '\0';
        int rc = open_copy(file, cut, &g, err, sizeof err);
        if (rc != KVS_EFORMAT)
            fail_msg("prefix of %zu/%zu bytes: rc %d", cut, len, rc);
        assert_true(strlen(err) > 0);
    }
    assert_int_equal(open_copy(file, len, &g, err, sizeof err), 0);
    free(file);
}

/* Seeded random corruption: the reader must either accept the file or
 * refuse it with KVS_EFORMAT, and everything it accepts must be readable. */
static void
test_corruption(void **state)
{
    (void)state;
    size_t len;
    uint8_t *file = small_file(&len);
    FILE *devnull = fopen("/dev/null", "w");
    assert_non_null(devnull);
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    int accepted = 0;
    for (int iter = 0; iter < 3000; iter++) {
        uint8_t *c = malloc(len);
        assert_non_null(c);
        memcpy(c, file, len);
        size_t n = len;
        int flips = 1 + iter % 4;
        for (int k = 0; k < flips; k++) {
            rng = rng * 6364136223846793005ull + 1442695040888963407ull;
            size_t at = (size_t)(rng >> 33) % len;
            uint8_t v = (uint8_t)(rng >> 24);
            c[at] = iter % 3 == 0 ? (uint8_t)(c[at] ^ (1u << (v & 7))) : v;
        }
        if (iter % 5 == 0)
            n = (size_t)(rng >> 40) % (len + 1);
        char err[256];
        model_gguf_t *g = NULL;
        int rc = model_gguf_open_mem(c, n, &g, err, sizeof err);
        assert_true(rc == 0 || rc == KVS_EFORMAT);
        if (rc == 0) {
            accepted++;
            for (uint32_t i = 0; i < model_gguf_n_kv(g); i++) {
                const char *key = model_gguf_kv_key(g, i);
                assert_int_equal(model_gguf_find_key(g, key), i);
                model_gguf_kv_print(g, i, devnull);
                model_gguf_str_t s;
                uint64_t cnt;
                if (model_gguf_get_arr(g, key, NULL, &cnt) == 0 && cnt > 0 &&
                    model_gguf_arr_str(g, key, cnt - 1, &s) == 0)
                    assert_int_equal(s.ptr[s.len], '\0');
            }
            for (uint32_t i = 0; i < model_gguf_n_tensors(g); i++) {
                const model_gguf_tensor_t *t = model_gguf_tensor(g, i);
                volatile uint8_t x = ((const uint8_t *)t->data)[0];
                x = ((const uint8_t *)t->data)[t->nbytes - 1];
                (void)x;
            }
            model_gguf_close(g);
        }
        free(c);
    }
    assert_true(accepted > 0); /* some flips only touch data or values */
    fclose(devnull);
    free(file);
}

/* ------------------------------------------------------------------------ */
/* Writer misuse.                                                           */
/* ------------------------------------------------------------------------ */

static void
test_writer_misuse(void **state)
{
    (void)state;
    char path[512];
    tmp_path(path, sizeof path);
    model_gguf_writer_free(NULL);
    model_gguf_writer_t *w;
    assert_int_equal(model_gguf_writer_new(&w), 0);

    /* Tensors. */
    const uint64_t ne33[] = {33, 2}, ne0[] = {0}, ne64[] = {64, 2};
    assert_int_equal(model_gguf_writer_add_tensor(w, "q", 2, ne33, KERN_Q8_0), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_add_tensor(w, "z", 1, ne0, KERN_F32), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_add_tensor(w, "d0", 0, ne64, KERN_F32), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_add_tensor(w, "d5", 5, ne64, KERN_F32), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_add_tensor(w, "t4", 1, ne64, 4), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_add_tensor(w, "", 1, ne64, KERN_F32), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_add_tensor(w, NULL, 1, ne64, KERN_F32), KVS_EINVAL);
    char name64[65];
    memset(name64, 'n', 64);
    name64[64] = '\0';
    assert_int_equal(model_gguf_writer_add_tensor(w, name64, 1, ne64, KERN_F32), KVS_EINVAL);
    name64[63] = '\0'; /* 63 bytes is the longest allowed */
    assert_int_equal(model_gguf_writer_add_tensor(w, name64, 2, ne64, KERN_Q8_0), 0);
    assert_int_equal(model_gguf_writer_add_tensor(w, name64, 1, ne64, KERN_F32), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_add_tensor(w, "f", 1, (uint64_t[]){3}, KERN_F32), 0);

    /* Keys. */
    assert_int_equal(model_gguf_writer_set_u32(w, "k", 1), 0);
    assert_int_equal(model_gguf_writer_set_u32(w, "k", 2), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_set_str(w, "k", "x"), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_set_u32(w, "", 1), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_set_str(w, "s", NULL), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_set_u32(w, "general.alignment", 3), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_set_u32(w, "general.alignment", 0), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_set_i32(w, "general.alignment", 32), KVS_EINVAL);

    /* Order of calls. */
    uint8_t data[136 + 12];
    memset(data, 0x5a, sizeof data);
    assert_int_equal(model_gguf_writer_write(w, data, 1), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_finish(w), KVS_EINVAL);
    int rc = model_gguf_writer_begin(w, "/nonexistent-kvs-dir/x.gguf");
    assert_true(rc == KVS_ENOENT || rc == KVS_EIO);
    assert_int_equal(model_gguf_writer_begin(w, path), 0);
    assert_int_equal(model_gguf_writer_begin(w, path), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_set_u32(w, "late", 1), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_add_tensor(w, "late", 1, ne64, KERN_F32), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_write(w, data, 100), 0);
    assert_int_equal(model_gguf_writer_finish(w), KVS_EINVAL);          /* 48 bytes missing */
    assert_int_equal(model_gguf_writer_write(w, data, 49), KVS_EINVAL); /* one too many */
    assert_int_equal(model_gguf_writer_write(w, data, 48), 0);
    assert_int_equal(model_gguf_writer_write(w, data, 1), KVS_EINVAL);
    assert_int_equal(model_gguf_writer_finish(w), 0);
    assert_int_equal(model_gguf_writer_finish(w), KVS_EINVAL);
    model_gguf_writer_free(w);

    /* The file survived the misuse intact. */
    char err[256];
    model_gguf_t *g;
    rc = model_gguf_open(path, &g, err, sizeof err);
    if (rc != 0)
        fail_msg("%s", err);
    assert_int_equal(model_gguf_n_tensors(g), 2);
    assert_int_equal(model_gguf_n_kv(g), 1);
    assert_int_equal(model_gguf_tensor(g, 1)->offset, 160);
    assert_int_equal(((const uint8_t *)model_gguf_tensor(g, 1)->data)[11], 0x5a);
    model_gguf_close(g);

    /* Freeing a writer mid-stream closes its file; zero tensors is fine. */
    assert_int_equal(model_gguf_writer_new(&w), 0);
    assert_int_equal(model_gguf_writer_add_tensor(w, "f", 1, (uint64_t[]){3}, KERN_F32), 0);
    assert_int_equal(model_gguf_writer_begin(w, path), 0);
    model_gguf_writer_free(w);
    assert_int_equal(model_gguf_writer_new(&w), 0);
    assert_int_equal(model_gguf_writer_begin(w, path), 0);
    assert_int_equal(model_gguf_writer_finish(w), 0);
    model_gguf_writer_free(w);
    assert_int_equal(model_gguf_open(path, &g, err, sizeof err), 0);
    assert_int_equal(model_gguf_n_kv(g), 0);
    assert_int_equal(model_gguf_data_offset(g), 32);
    model_gguf_close(g);
    unlink(path);
}

/* A vocabulary-sized string array: built once at open, O(1) per lookup. */
static void
test_big_vocab(void **state)
{
    (void)state;
    char path[512];
    tmp_path(path, sizeof path);
    enum { N = 128256 };
    char(*text)[12] = malloc((size_t)N * sizeof *text);
    const char **toks = malloc((size_t)N * sizeof *toks);
    assert_non_null(text);
    assert_non_null(toks);
    for (int i = 0; i < N; i++) {
        snprintf(text[i], sizeof text[i], "t%d", i);
        toks[i] = text[i];
    }
    model_gguf_writer_t *w;
    assert_int_equal(model_gguf_writer_new(&w), 0);
    assert_int_equal(model_gguf_writer_set_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, N), 0);
    assert_int_equal(model_gguf_writer_begin(w, path), 0);
    assert_int_equal(model_gguf_writer_finish(w), 0);
    model_gguf_writer_free(w);
    char err[256];
    model_gguf_t *g;
    assert_int_equal(model_gguf_open(path, &g, err, sizeof err), 0);
    model_gguf_str_t s;
    for (int i = 0; i < N; i += 997) {
        assert_int_equal(model_gguf_arr_str(g, "tokenizer.ggml.tokens", (uint64_t)i, &s), 0);
        assert_string_equal(s.ptr, text[i]);
    }
    assert_int_equal(model_gguf_arr_str(g, "tokenizer.ggml.tokens", N - 1, &s), 0);
    assert_string_equal(s.ptr, "t128255");
    model_gguf_close(g);
    free(toks);
    free(text);
    unlink(path);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),     cmocka_unit_test(test_all_types),
        cmocka_unit_test(test_bad_files),     cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_truncations),   cmocka_unit_test(test_corruption),
        cmocka_unit_test(test_writer_misuse), cmocka_unit_test(test_big_vocab),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
