/*
 * model/gguf_write.c — the GGUF v3 writer.  Callers: tools that export
 * models (random or converted weights), tests and the fuzz seed corpus.
 *
 *   new -> set_* / add_tensor ... -> begin(path) -> write ... -> finish
 *
 * Metadata is encoded into one growing buffer as each set_* call arrives
 * (so begin writes it verbatim, in insertion order); tensor infos are kept
 * until begin, which lays tensors out exactly as llama.cpp expects:
 * offset[i] = sum over j < i of nbytes[j] padded to the alignment.  Data
 * then streams through write() in info order, and the writer inserts the
 * zero padding after each tensor itself, so a multi-GB model never has to
 * sit in memory and callers may split or join tensors freely.
 */
#include "model/model.h"

#include "base/kvs.h"
#include "kernels/kern.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>

#define GGUF_VERSION 3
#define GGUF_DEFAULT_ALIGNMENT 32
#define GGUF_MAX_KEY 65535

typedef struct wtensor {
    char *name;
    uint32_t n_dims;
    uint64_t ne[MODEL_GGUF_MAX_DIMS];
    uint32_t type;
    size_t nbytes;
    uint64_t offset;
} wtensor_t;

typedef enum wstate {
    W_BUILD,   /* accepting set_* and add_tensor */
    W_WRITING, /* begin done, data streaming */
    W_DONE,    /* finish done */
    W_FAILED,  /* an I/O error; only free is left */
} wstate_t;

struct model_gguf_writer {
    wstate_t state;
    uint8_t *meta; /* encoded kvs, in insertion order */
    size_t meta_len, meta_cap;
    char **keys;
    uint32_t n_keys, keys_cap;
    wtensor_t *t;
    uint32_t n_t, t_cap;
    uint32_t alignment;
    FILE *f;
    uint32_t cur;       /* tensor being streamed */
    size_t cur_written; /* bytes of it written so far */
};

/* ------------------------------------------------------------------------ */
/* Building.                                                                */
/* ------------------------------------------------------------------------ */

int
model_gguf_writer_new(model_gguf_writer_t **out)
{
    if (out == NULL)
        return KVS_EINVAL;
    model_gguf_writer_t *w = calloc(1, sizeof *w);
    if (w == NULL)
        return KVS_ENOMEM;
    w->alignment = GGUF_DEFAULT_ALIGNMENT;
    *out = w;
    return 0;
}

void
model_gguf_writer_free(model_gguf_writer_t *w)
{
    if (w == NULL)
        return;
    if (w->f != NULL)
        fclose(w->f);
    for (uint32_t i = 0; i < w->n_keys; i++)
        free(w->keys[i]);
    for (uint32_t i = 0; i < w->n_t; i++)
        free(w->t[i].name);
    free(w->keys);
    free(w->t);
    free(w->meta);
    free(w);
}

static int
meta_reserve(model_gguf_writer_t *w, size_t more)
{
    size_t need;
    if (kvs_add_size(w->meta_len, more, &need))
        return KVS_ENOMEM;
    if (need <= w->meta_cap)
        return 0;
    size_t cap = w->meta_cap ? w->meta_cap : 4096;
    while (cap < need)
        cap = cap > SIZE_MAX / 2 ? need : cap * 2;
    uint8_t *p = realloc(w->meta, cap);
    if (p == NULL)
        return KVS_ENOMEM;
    w->meta = p;
    w->meta_cap = cap;
    return 0;
}

/* Callers reserve first; these only append. */
static void
put(model_gguf_writer_t *w, const void *b, size_t n)
{
    if (n > 0)
        memcpy(w->meta + w->meta_len, b, n);
    w->meta_len += n;
}

static void
put_u32(model_gguf_writer_t *w, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)v, (uint8_t)(v >> 8), (uint8_t)(v >> 16), (uint8_t)(v >> 24)};
    put(w, b, 4);
}

static void
put_u64(model_gguf_writer_t *w, uint64_t v)
{
    put_u32(w, (uint32_t)v);
    put_u32(w, (uint32_t)(v >> 32));
}

static void
put_str(model_gguf_writer_t *w, const char *s, size_t n)
{
    put_u64(w, n);
    put(w, s, n);
}

/* Validates key, checks it is new, and reserves room for the key, the
 * type and `value_bytes` more; the caller then appends the value. */
static int
kv_begin(model_gguf_writer_t *w, const char *key, uint32_t type, size_t value_bytes)
{
    if (w == NULL || w->state != W_BUILD || key == NULL)
        return KVS_EINVAL;
    size_t klen = strlen(key);
    if (klen == 0 || klen > GGUF_MAX_KEY)
        return KVS_EINVAL;
    for (uint32_t i = 0; i < w->n_keys; i++)
        if (strcmp(w->keys[i], key) == 0)
            return KVS_EINVAL;
    if (w->n_keys == UINT32_MAX)
        return KVS_EINVAL;
    if (w->n_keys == w->keys_cap) {
        uint32_t cap = w->keys_cap ? w->keys_cap * 2 : 16;
        char **k = realloc(w->keys, (size_t)cap * sizeof *k);
        if (k == NULL)
            return KVS_ENOMEM;
        w->keys = k;
        w->keys_cap = cap;
    }
    size_t bytes;
    if (kvs_add_size(8 + klen + 4, value_bytes, &bytes) || meta_reserve(w, bytes) != 0)
        return KVS_ENOMEM;
    char *copy = strdup(key);
    if (copy == NULL)
        return KVS_ENOMEM;
    w->keys[w->n_keys++] = copy;
    put_str(w, key, klen);
    put_u32(w, type);
    return 0;
}

/* general.alignment must be a u32; any other type for it is refused. */
static bool
is_alignment_key(const char *key)
{
    return key != NULL && strcmp(key, "general.alignment") == 0;
}

int
model_gguf_writer_set_u32(model_gguf_writer_t *w, const char *key, uint32_t v)
{
    /* Readers refuse a bad alignment, so refuse to write one. */
    bool is_align = is_alignment_key(key);
    if (is_align && (v == 0 || (v & (v - 1)) != 0))
        return KVS_EINVAL;
    int rc = kv_begin(w, key, MODEL_GGUF_UINT32, 4);
    if (rc != 0)
        return rc;
    put_u32(w, v);
    if (is_align)
        w->alignment = v;
    return 0;
}

int
model_gguf_writer_set_i32(model_gguf_writer_t *w, const char *key, int32_t v)
{
    if (is_alignment_key(key))
        return KVS_EINVAL;
    int rc = kv_begin(w, key, MODEL_GGUF_INT32, 4);
    if (rc != 0)
        return rc;
    put_u32(w, (uint32_t)v);
    return 0;
}

int
model_gguf_writer_set_u64(model_gguf_writer_t *w, const char *key, uint64_t v)
{
    if (is_alignment_key(key))
        return KVS_EINVAL;
    int rc = kv_begin(w, key, MODEL_GGUF_UINT64, 8);
    if (rc != 0)
        return rc;
    put_u64(w, v);
    return 0;
}

int
model_gguf_writer_set_f32(model_gguf_writer_t *w, const char *key, float v)
{
    if (is_alignment_key(key))
        return KVS_EINVAL;
    int rc = kv_begin(w, key, MODEL_GGUF_FLOAT32, 4);
    if (rc != 0)
        return rc;
    put_u32(w, kvs_f32_to_bits(v));
    return 0;
}

int
model_gguf_writer_set_bool(model_gguf_writer_t *w, const char *key, bool v)
{
    if (is_alignment_key(key))
        return KVS_EINVAL;
    int rc = kv_begin(w, key, MODEL_GGUF_BOOL, 1);
    if (rc != 0)
        return rc;
    uint8_t b = v ? 1 : 0;
    put(w, &b, 1);
    return 0;
}

int
model_gguf_writer_set_str(model_gguf_writer_t *w, const char *key, const char *v)
{
    if (v == NULL || is_alignment_key(key))
        return KVS_EINVAL;
    size_t n = strlen(v);
    int rc = kv_begin(w, key, MODEL_GGUF_STRING, 8 + n);
    if (rc != 0)
        return rc;
    put_str(w, v, n);
    return 0;
}

/* lens may be NULL (then every element is NUL-terminated); with lens,
 * elements may contain NUL bytes. */
int
model_gguf_writer_set_arr_str(model_gguf_writer_t *w, const char *key, const char *const *v,
                              const size_t *lens, uint64_t n)
{
    if ((v == NULL && n > 0) || is_alignment_key(key) || n > SIZE_MAX / 8)
        return KVS_EINVAL;
    size_t bytes = 12;
    for (uint64_t i = 0; i < n; i++) {
        if (v[i] == NULL)
            return KVS_EINVAL;
        size_t len = lens ? lens[i] : strlen(v[i]);
        if (kvs_add_size(bytes, 8, &bytes) || kvs_add_size(bytes, len, &bytes))
            return KVS_ENOMEM;
    }
    int rc = kv_begin(w, key, MODEL_GGUF_ARRAY, bytes);
    if (rc != 0)
        return rc;
    put_u32(w, MODEL_GGUF_STRING);
    put_u64(w, n);
    for (uint64_t i = 0; i < n; i++)
        put_str(w, v[i], lens ? lens[i] : strlen(v[i]));
    return 0;
}

static int
set_arr32(model_gguf_writer_t *w, const char *key, uint32_t et, const void *v, uint64_t n)
{
    size_t bytes;
    if ((v == NULL && n > 0) || is_alignment_key(key) || n > SIZE_MAX / 4 ||
        kvs_add_size(12, (size_t)n * 4, &bytes))
        return KVS_EINVAL;
    int rc = kv_begin(w, key, MODEL_GGUF_ARRAY, bytes);
    if (rc != 0)
        return rc;
    put_u32(w, et);
    put_u64(w, n);
    const uint8_t *p = v;
    for (uint64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, p + i * 4, 4);
        put_u32(w, u); /* host order -> little-endian */
    }
    return 0;
}

int
model_gguf_writer_set_arr_f32(model_gguf_writer_t *w, const char *key, const float *v, uint64_t n)
{
    return set_arr32(w, key, MODEL_GGUF_FLOAT32, v, n);
}

int
model_gguf_writer_set_arr_i32(model_gguf_writer_t *w, const char *key, const int32_t *v, uint64_t n)
{
    return set_arr32(w, key, MODEL_GGUF_INT32, v, n);
}

int
model_gguf_writer_set_raw(model_gguf_writer_t *w, const char *key, model_gguf_type_t type,
                          const void *value, size_t len)
{
    if ((unsigned)type > MODEL_GGUF_FLOAT64 || (value == NULL && len > 0) || is_alignment_key(key))
        return KVS_EINVAL;
    int rc = kv_begin(w, key, (uint32_t)type, len);
    if (rc != 0)
        return rc;
    put(w, value, len);
    return 0;
}

int
model_gguf_writer_add_tensor(model_gguf_writer_t *w, const char *name, uint32_t n_dims,
                             const uint64_t *ne, uint32_t type)
{
    if (w == NULL || w->state != W_BUILD || name == NULL || ne == NULL)
        return KVS_EINVAL;
    size_t nlen = strlen(name);
    if (nlen == 0 || nlen > MODEL_GGUF_MAX_NAME || n_dims < 1 || n_dims > MODEL_GGUF_MAX_DIMS)
        return KVS_EINVAL;
    const kern_type_traits_t *tt = kern_type_traits(type);
    if (tt == NULL || ne[0] == 0 || ne[0] % tt->block != 0)
        return KVS_EINVAL;
    wtensor_t t = {.n_dims = n_dims, .type = type};
    size_t nbytes = kern_row_bytes(type, ne[0]);
    uint64_t n_elems = 1;
    for (uint32_t d = 0; d < MODEL_GGUF_MAX_DIMS; d++) {
        t.ne[d] = d < n_dims ? ne[d] : 1;
        if (t.ne[d] == 0 || __builtin_mul_overflow(n_elems, t.ne[d], &n_elems) ||
            n_elems > INT64_MAX)
            return KVS_EINVAL;
        if (d > 0 && (t.ne[d] > SIZE_MAX || kvs_mul_size(nbytes, (size_t)t.ne[d], &nbytes)))
            return KVS_EINVAL;
    }
    if (nbytes == 0)
        return KVS_EINVAL;
    t.nbytes = nbytes;
    for (uint32_t i = 0; i < w->n_t; i++)
        if (strcmp(w->t[i].name, name) == 0)
            return KVS_EINVAL;
    if (w->n_t == UINT32_MAX)
        return KVS_EINVAL;
    if (w->n_t == w->t_cap) {
        uint32_t cap = w->t_cap ? w->t_cap * 2 : 16;
        wtensor_t *p = realloc(w->t, (size_t)cap * sizeof *p);
        if (p == NULL)
            return KVS_ENOMEM;
        w->t = p;
        w->t_cap = cap;
    }
    t.name = strdup(name);
    if (t.name == NULL)
        return KVS_ENOMEM;
    w->t[w->n_t++] = t;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Streaming.                                                               */
/* ------------------------------------------------------------------------ */

static uint64_t
pad_to(uint64_t x, uint32_t a)
{
    return (x + a - 1) / a * a;
}

static int
write_zeros(model_gguf_writer_t *w, uint64_t n)
{
    static const uint8_t zeros[256];
    while (n > 0) {
        size_t k = n < sizeof zeros ? (size_t)n : sizeof zeros;
        if (fwrite(zeros, 1, k, w->f) != k)
            return KVS_EIO;
        n -= k;
    }
    return 0;
}

static int
io_failed(model_gguf_writer_t *w)
{
    w->state = W_FAILED;
    return KVS_EIO;
}

/* Pads and moves past every tensor that is complete (zero-byte tensors
 * cannot exist, so at most the current one). */
static int
advance(model_gguf_writer_t *w)
{
    while (w->cur < w->n_t && w->cur_written == w->t[w->cur].nbytes) {
        uint64_t n = w->t[w->cur].nbytes;
        if (write_zeros(w, pad_to(n, w->alignment) - n) != 0)
            return io_failed(w);
        w->cur++;
        w->cur_written = 0;
    }
    return 0;
}

int
model_gguf_writer_begin(model_gguf_writer_t *w, const char *path)
{
    if (w == NULL || path == NULL || w->state != W_BUILD)
        return KVS_EINVAL;
    /* Tensor infos are encoded into the metadata buffer's tail, then
     * dropped from it again, so the buffer still holds only kvs. */
    size_t info_bytes = 0;
    for (uint32_t i = 0; i < w->n_t; i++)
        info_bytes += 8 + strlen(w->t[i].name) + 4 + 8 * (size_t)w->t[i].n_dims + 4 + 8;
    if (meta_reserve(w, info_bytes) != 0)
        return KVS_ENOMEM;
    size_t kv_len = w->meta_len;
    uint64_t off = 0;
    for (uint32_t i = 0; i < w->n_t; i++) {
        wtensor_t *t = &w->t[i];
        t->offset = off;
        if (__builtin_add_overflow(off, pad_to(t->nbytes, w->alignment), &off)) {
            w->meta_len = kv_len;
            return KVS_EINVAL;
        }
        put_str(w, t->name, strlen(t->name));
        put_u32(w, t->n_dims);
        for (uint32_t d = 0; d < t->n_dims; d++)
            put_u64(w, t->ne[d]);
        put_u32(w, t->type);
        put_u64(w, t->offset);
    }
    uint8_t hdr[24] = {'G', 'G', 'U', 'F'};
    for (int j = 0; j < 4; j++)
        hdr[4 + j] = (uint8_t)((uint32_t)GGUF_VERSION >> (8 * j));
    for (int j = 0; j < 8; j++) {
        hdr[8 + j] = (uint8_t)((uint64_t)w->n_t >> (8 * j));
        hdr[16 + j] = (uint8_t)((uint64_t)w->n_keys >> (8 * j));
    }
    uint64_t head = sizeof hdr + w->meta_len;
    w->f = fopen(path, "wb");
    if (w->f == NULL) {
        w->meta_len = kv_len;
        return errno == ENOENT ? KVS_ENOENT : KVS_EIO;
    }
    setvbuf(w->f, NULL, _IOFBF, 1 << 20);
    bool ok = fwrite(hdr, 1, sizeof hdr, w->f) == sizeof hdr &&
              (w->meta_len == 0 || fwrite(w->meta, 1, w->meta_len, w->f) == w->meta_len) &&
              write_zeros(w, pad_to(head, w->alignment) - head) == 0;
    w->meta_len = kv_len;
    if (!ok)
        return io_failed(w);
    w->state = W_WRITING;
    w->cur = 0;
    w->cur_written = 0;
    return 0;
}

int
model_gguf_writer_write(model_gguf_writer_t *w, const void *data, size_t bytes)
{
    if (w == NULL)
        return KVS_EINVAL;
    if (w->state == W_FAILED)
        return KVS_EIO;
    if (w->state != W_WRITING || (data == NULL && bytes > 0))
        return KVS_EINVAL;
    /* Refuse an overrun before writing any of it. */
    uint64_t left = 0;
    for (uint32_t i = w->cur; i < w->n_t && left <= bytes; i++)
        left += w->t[i].nbytes - (i == w->cur ? w->cur_written : 0);
    if (bytes > left)
        return KVS_EINVAL;
    const uint8_t *p = data;
    while (bytes > 0) {
        size_t room = w->t[w->cur].nbytes - w->cur_written;
        size_t k = bytes < room ? bytes : room;
        if (fwrite(p, 1, k, w->f) != k)
            return io_failed(w);
        p += k;
        bytes -= k;
        w->cur_written += k;
        int rc = advance(w);
        if (rc != 0)
            return rc;
    }
    return 0;
}

/* KVS_EINVAL while declared bytes are missing; the writer then stays open,
 * so the caller may write the rest and call finish again, or free it. */
int
model_gguf_writer_finish(model_gguf_writer_t *w)
{
    if (w == NULL)
        return KVS_EINVAL;
    if (w->state == W_FAILED)
        return KVS_EIO;
    if (w->state != W_WRITING || w->cur < w->n_t)
        return KVS_EINVAL;
    FILE *f = w->f;
    w->f = NULL;
    bool ok = fflush(f) == 0;
    ok = (fclose(f) == 0) && ok;
    if (!ok)
        return io_failed(w);
    w->state = W_DONE;
    return 0;
}
