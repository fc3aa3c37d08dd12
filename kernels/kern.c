/*
 * kernels/kern.c — backend selection and the single place where op
 * arguments are validated before they reach a backend.  Every public kern_*
 * op lands here; backends trust what passes.
 */
#include "kern_int.h"

#include <stdlib.h>
#include <string.h>

static bool kv_ok(const kern_kv_t *kv, uint32_t layer);

int
kern_backend_new(const char *name, const kern_backend_cfg_t *cfg, kern_backend_t **out)
{
    kern_backend_cfg_t def = {0};
    if (cfg == NULL)
        cfg = &def;
    *out = NULL;
    if (strcmp(name, "ref") == 0)
        return kern__ref_new(cfg, out);
    if (strcmp(name, "cpu") == 0)
        return kern__cpu_new(cfg, out);
    if (strcmp(name, "cuda") == 0)
        return kern__cuda_new(cfg, out);
    return KVS_EINVAL;
}

void
kern_backend_free(kern_backend_t *be)
{
    if (be)
        be->ops->destroy(be);
}

const char *
kern_backend_name(const kern_backend_t *be)
{
    return be->ops->name;
}

bool
kern_backend_is_host(const kern_backend_t *be)
{
    return be->ops->is_host;
}

bool
kern_backend_failed(const kern_backend_t *be)
{
    return be->failed;
}

int
kern_reserve(kern_backend_t *be, const kern_reserve_t *r)
{
    if (r == NULL || !r->max_rows || !r->max_cols || !r->max_seqs || !r->max_ctx ||
        !r->block_tokens || !r->n_heads || !r->n_kv_heads || !r->head_dim)
        return KVS_EINVAL;
    for (int i = 0; i < 2; i++)
        if (r->seal_kv[i] &&
            (!r->seal_blocks || !kv_ok(r->seal_kv[i], 0) || r->seal_kv[i]->quant == KERN_KVQ_NONE))
            return KVS_EINVAL;
    return be->ops->reserve ? be->ops->reserve(be, r) : 0;
}

bool
kern_supports(const kern_backend_t *be, kern_op_t op, kern_dtype_t type)
{
    if ((unsigned)op >= KERN_OP_COUNT)
        return false;
    if (op == KERN_OP_KV_SEAL)
        return be->ops->kv_seal != NULL && be->ops->supports(be, KERN_OP_KV_APPEND, type);
    return be->ops->supports(be, op, type);
}

void *
kern_alloc(kern_backend_t *be, size_t bytes)
{
    return bytes ? be->ops->alloc(be, bytes) : NULL;
}

void
kern_free(kern_backend_t *be, void *p)
{
    if (p)
        be->ops->free(be, p);
}

/* kern_host_alloc's memory starts one header into what it came from; the
 * header's first byte says whether that was the backend's. */
#define HOST_HDR 64

void *
kern_host_alloc(kern_backend_t *be, size_t bytes)
{
    size_t total;
    if (bytes == 0 || kvs_add_size(bytes, HOST_HDR, &total))
        return NULL;
    unsigned char *p = be->ops->host_alloc ? be->ops->host_alloc(be, total) : NULL;
    bool own = p != NULL;
    if (!own)
        p = kern__host_alloc(be, total);
    if (p == NULL)
        return NULL;
    p[0] = own;
    return p + HOST_HDR;
}

void
kern_host_free(kern_backend_t *be, void *q)
{
    if (q == NULL)
        return;
    unsigned char *p = (unsigned char *)q - HOST_HDR;
    if (p[0])
        be->ops->host_free(be, p);
    else
        kern__host_free(be, p);
}

int
kern_upload(kern_backend_t *be, void *dst, const void *src, size_t bytes)
{
    return bytes ? be->ops->upload(be, dst, src, bytes) : 0;
}

int
kern_download(kern_backend_t *be, void *dst, const void *src, size_t bytes)
{
    return bytes ? be->ops->download(be, dst, src, bytes) : 0;
}

/* count runs of `bytes` from src (spitch apart) to dst (dpitch apart),
 * one of them the host, after checking that the backend side's runs
 * (stride apart) do not overlap and span addressable memory. */
static int
copy_runs(kern_backend_t *be, bool download, void *dst, size_t dpitch, const void *src,
          size_t spitch, size_t stride, size_t bytes, size_t count)
{
    size_t span;
    if (bytes == 0 || count == 0)
        return 0;
    if ((count > 1 && stride < bytes) || kvs_mul_size(stride, count - 1, &span) ||
        kvs_add_size(span, bytes, &span))
        return KVS_EINVAL;
    if (be->ops->copy_runs)
        return be->ops->copy_runs(be, download, dst, dpitch, src, spitch, bytes, count);
    int (*one)(kern_backend_t *, void *, const void *, size_t) =
        download ? be->ops->download : be->ops->upload;
    int rc = 0;
    for (size_t i = 0; i < count && rc == 0; i++)
        rc = one(be, (unsigned char *)dst + i * dpitch, (const unsigned char *)src + i * spitch,
                 bytes);
    return rc;
}

int
kern_download_runs(kern_backend_t *be, void *dst, const void *src, size_t stride, size_t bytes,
                   size_t count)
{
    return copy_runs(be, true, dst, bytes, src, stride, stride, bytes, count);
}

int
kern_upload_runs(kern_backend_t *be, void *dst, size_t stride, const void *src, size_t bytes,
                 size_t count)
{
    return copy_runs(be, false, dst, stride, src, bytes, stride, bytes, count);
}

int
kern_memset(kern_backend_t *be, void *dst, int value, size_t bytes)
{
    return bytes ? be->ops->memset(be, dst, value, bytes) : 0;
}

int
kern_sync(kern_backend_t *be)
{
    return be->ops->sync(be);
}

/* ---- validation ---------------------------------------------------------- */

static bool
tensor_ok(const kern_tensor_t *w)
{
    /* Rows of 16-bit types (and Q8_0's fp16 scales) must be 2-aligned and
     * f32 rows 4-aligned; GGUF's 32-byte alignment gives that for files. */
    size_t align = w && w->type == KERN_F32 ? 4 : 2;
    return w && w->data && w->n_cols > 0 && w->n_rows > 0 &&
           kern_row_bytes(w->type, w->n_cols) != 0 &&
           w->row_bytes >= kern_row_bytes(w->type, w->n_cols) &&
           (((uintptr_t)w->data | w->row_bytes) % align) == 0;
}

static bool
kv_ok(const kern_kv_t *kv, uint32_t layer)
{
    if (!(kv && kv->k && kv->v && (kv->dtype == KERN_F32 || kv->dtype == KERN_F16) &&
          layer < kv->n_layers && kv->n_kv_heads > 0 && kv->head_dim > 0 && kv->block_tokens > 0 &&
          kv->n_blocks > 0))
        return false;
    if (kv->quant == KERN_KVQ_NONE)
        return true;
    return kv->quant < KERN_KVQ_COUNT && kv->n_hot > 0 && kv->n_hot <= kv->n_blocks &&
           (kv->n_hot == kv->n_blocks || (kv->qk && kv->qv)) &&
           kv->qk_tile == kern_kvq_tile_bytes(kv->quant, false, kv->block_tokens, kv->head_dim) &&
           kv->qv_tile == kern_kvq_tile_bytes(kv->quant, true, kv->block_tokens, kv->head_dim) &&
           kv->qk_tile != 0 && kv->qv_tile != 0;
}

/* A pool with quantized blocks needs a backend that reads them. */
static bool
kv_readable(const kern_backend_t *be, const kern_kv_t *kv)
{
    return kv->quant == KERN_KVQ_NONE || be->ops->kv_seal != NULL;
}

/* Appends write full-precision blocks only. */
static bool
slots_ok(const kern_kv_t *kv, const int32_t *slots, uint32_t n)
{
    uint64_t max = (uint64_t)kern__kv_n_hot(kv) * kv->block_tokens;
    for (uint32_t i = 0; i < n; i++)
        if (slots[i] < 0 || (uint64_t)slots[i] >= max)
            return false;
    return true;
}

/* Block ids ids[i0 .. i1) name blocks of the pool. */
static bool
blocks_ok(const kern_kv_t *kv, const int32_t *ids, size_t i0, size_t i1)
{
    for (size_t i = i0; i < i1; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= kv->n_blocks)
            return false;
    return true;
}

/* A packed weight can only have come from this backend's pack_weight. */
static bool
layout_ok(const kern_backend_t *be, const kern_tensor_t *w)
{
    return w->layout == KERN_LAYOUT_ROWS || be->ops->pack_weight != NULL;
}

int
kern_pack_weight(kern_backend_t *be, kern_tensor_t *w)
{
    if (!tensor_ok(w) || w->layout != KERN_LAYOUT_ROWS)
        return KVS_EINVAL;
    return be->ops->pack_weight ? be->ops->pack_weight(be, w) : 0;
}

int
kern_get_rows(kern_backend_t *be, const kern_tensor_t *w, const int32_t *ids, uint32_t n,
              float *out)
{
    if (!tensor_ok(w) || !layout_ok(be, w) || (n && (!ids || !out)))
        return KVS_EINVAL;
    for (uint32_t i = 0; i < n; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= w->n_rows)
            return KVS_EINVAL;
    if (!be->ops->supports(be, KERN_OP_GET_ROWS, w->type))
        return KVS_ENOTSUP;
    return n ? be->ops->get_rows(be, w, ids, n, out) : 0;
}

/* A well-formed weight's type: 0 or KVS_ENOTSUP. */
static int
weight_type_ok(kern_backend_t *be, const kern_tensor_t *w)
{
    return be->ops->supports(be, KERN_OP_MATMUL, w->type) ? 0 : KVS_ENOTSUP;
}

/* A weight every product takes: 0, KVS_EINVAL or KVS_ENOTSUP. */
static int
weight_check(kern_backend_t *be, const kern_tensor_t *w)
{
    if (!tensor_ok(w) || !layout_ok(be, w))
        return KVS_EINVAL;
    return weight_type_ok(be, w);
}

int
kern_matmul(kern_backend_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
            const float *bias, float *y)
{
    if (n && (!x || !y))
        return KVS_EINVAL;
    int rc = weight_check(be, w);
    return rc || n == 0 ? rc : be->ops->matmul(be, w, x, n, bias, y);
}

/* [a, a + an) and [b, b + bn) share a byte. */
static bool
spans_overlap(const void *a, size_t an, const void *b, size_t bn)
{
    uintptr_t pa = (uintptr_t)a, pb = (uintptr_t)b;
    return an && bn && pa < pb + bn && pb < pa + an;
}

int
kern_matmul_set(kern_backend_t *be, uint32_t count, const kern_tensor_t *const *w, const float *x,
                uint32_t n, const float *const *bias, float *const *y)
{
    if (count == 0 || count > KERN_MATMUL_SET_MAX || !w || !y || (n && !x))
        return KVS_EINVAL;
    for (uint32_t i = 0; i < count; i++)
        if (!tensor_ok(w[i]) || !layout_ok(be, w[i]) || w[i]->n_cols != w[0]->n_cols ||
            (n && !y[i]))
            return KVS_EINVAL;
    size_t x_bytes = (size_t)n * w[0]->n_cols * sizeof(float);
    for (uint32_t i = 0; i < count; i++) {
        size_t yi = (size_t)n * w[i]->n_rows * sizeof(float);
        if (spans_overlap(y[i], yi, x, x_bytes))
            return KVS_EINVAL;
        for (uint32_t j = 0; j < i; j++)
            if (spans_overlap(y[i], yi, y[j], (size_t)n * w[j]->n_rows * sizeof(float)))
                return KVS_EINVAL;
    }
    for (uint32_t i = 0; i < count; i++) {
        int rc = weight_type_ok(be, w[i]); /* well formed: the first loop */
        if (rc)
            return rc;
    }
    if (n == 0)
        return 0;
    const float *none[KERN_MATMUL_SET_MAX] = {NULL};
    if (!bias)
        bias = none;
    if (be->ops->matmul_set)
        return be->ops->matmul_set(be, count, w, x, n, bias, y);
    for (uint32_t i = 0; i < count; i++) {
        int rc = be->ops->matmul(be, w[i], x, n, bias[i], y[i]);
        if (rc)
            return rc;
    }
    return 0;
}

int
kern_matmul_swiglu(kern_backend_t *be, const kern_tensor_t *gate, const kern_tensor_t *up,
                   const float *x, uint32_t n, float *tmp, float *y)
{
    if (!tensor_ok(gate) || !tensor_ok(up) || !layout_ok(be, gate) || !layout_ok(be, up) ||
        gate->n_rows != up->n_rows || gate->n_cols != up->n_cols || (n && (!x || !tmp || !y)))
        return KVS_EINVAL;
    size_t xb = (size_t)n * gate->n_cols * sizeof(float);
    size_t yb = (size_t)n * gate->n_rows * sizeof(float);
    if (spans_overlap(y, yb, x, xb) || spans_overlap(tmp, yb, x, xb) ||
        spans_overlap(y, yb, tmp, yb))
        return KVS_EINVAL;
    int rc = weight_type_ok(be, gate); /* both well formed: checked above */
    if (rc == 0)
        rc = weight_type_ok(be, up);
    if (rc || n == 0)
        return rc;
    if (be->ops->matmul_swiglu)
        return be->ops->matmul_swiglu(be, gate, up, x, n, tmp, y);
    return kern__matmul_swiglu_apart(be, gate, up, x, n, tmp, y);
}

int
kern__matmul_swiglu_apart(kern_backend_t *be, const kern_tensor_t *gate, const kern_tensor_t *up,
                          const float *x, uint32_t n, float *tmp, float *y)
{
    int rc = be->ops->matmul(be, gate, x, n, NULL, y);
    if (rc == 0)
        rc = be->ops->matmul(be, up, x, n, NULL, tmp);
    return rc ? rc : be->ops->swiglu(be, y, tmp, (size_t)n * gate->n_rows, y);
}

int
kern_rmsnorm(kern_backend_t *be, const float *x, const float *w, uint32_t n, uint32_t d, float eps,
             float *y)
{
    if (d == 0 || (n && (!x || !w || !y)) || !(eps >= 0.0f))
        return KVS_EINVAL;
    return n ? be->ops->rmsnorm(be, x, w, n, d, eps, y) : 0;
}

int
kern_add_rmsnorm(kern_backend_t *be, float *x, const float *res, const float *w, uint32_t n,
                 uint32_t d, float eps, float *y)
{
    if (d == 0 || (n && (!x || !res || !w || !y || y == x)) || !(eps >= 0.0f))
        return KVS_EINVAL;
    if (n == 0)
        return 0;
    if (be->ops->add_rmsnorm)
        return be->ops->add_rmsnorm(be, x, res, w, n, d, eps, y);
    int rc = kern_add(be, x, res, (size_t)n * d);
    return rc ? rc : be->ops->rmsnorm(be, x, w, n, d, eps, y);
}

int
kern_rope(kern_backend_t *be, const kern_rope_args_t *a)
{
    if (!a || a->n_heads == 0 || a->head_dim == 0 || a->n_rot == 0 || (a->n_rot & 1) ||
        a->n_rot > a->head_dim || (a->n_rows && (!a->x || !a->pos)) || !(a->freq_base > 0.0f) ||
        !(a->freq_scale > 0.0f) || (a->x2 == NULL) != (a->n_heads2 == 0))
        return KVS_EINVAL;
    if (a->x2 &&
        spans_overlap(a->x, (size_t)a->n_rows * a->n_heads * a->head_dim * sizeof(float), a->x2,
                      (size_t)a->n_rows * a->n_heads2 * a->head_dim * sizeof(float)))
        return KVS_EINVAL;
    if (a->freq_factors)
        for (uint32_t i = 0; i < a->n_rot / 2; i++)
            if (!(a->freq_factors[i] > 0.0f))
                return KVS_EINVAL;
    return a->n_rows ? be->ops->rope(be, a) : 0;
}

int
kern_swiglu(kern_backend_t *be, const float *gate, const float *up, size_t n, float *out)
{
    if (n && (!gate || !up || !out))
        return KVS_EINVAL;
    return n ? be->ops->swiglu(be, gate, up, n, out) : 0;
}

int
kern_add(kern_backend_t *be, float *x, const float *y, size_t n)
{
    if (n && (!x || !y))
        return KVS_EINVAL;
    return n ? be->ops->add(be, x, y, n) : 0;
}

int
kern_delta_apply(kern_backend_t *be, float *out, float *dense, uint32_t n, uint32_t width,
                 uint32_t gamma, uint32_t tail)
{
    if (n == 0 || width == 0)
        return 0;
    if (!out || !dense || gamma == 0 || tail > n)
        return KVS_EINVAL;
    return be->ops->delta_apply(be, out, dense, n, width, gamma, tail);
}

int
kern_kv_append(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer, const float *k,
               const float *v, const int32_t *slots, uint32_t n)
{
    if (!kv_ok(kv, layer) || (n && (!k || !v || !slots)) || !slots_ok(kv, slots, n))
        return KVS_EINVAL;
    if (!be->ops->supports(be, KERN_OP_KV_APPEND, kv->dtype) || !kv_readable(be, kv))
        return KVS_ENOTSUP;
    return n ? be->ops->kv_append(be, kv, layer, k, v, slots, n) : 0;
}

int
kern_kv_copy(kern_backend_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
             uint32_t n)
{
    if (!kv_ok(kv, 0) || (n && (!src || !dst)))
        return KVS_EINVAL;
    uint32_t n_hot = kern__kv_n_hot(kv);
    for (uint32_t i = 0; i < n; i++)
        if (src[i] < 0 || dst[i] < 0 || (uint32_t)src[i] >= n_hot || (uint32_t)dst[i] >= n_hot)
            return KVS_EINVAL;
    if (!be->ops->supports(be, KERN_OP_KV_COPY, kv->dtype) || !kv_readable(be, kv))
        return KVS_ENOTSUP;
    return n ? be->ops->kv_copy(be, kv, src, dst, n) : 0;
}

int
kern_kv_seal(kern_backend_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
             uint32_t n)
{
    if (!kv_ok(kv, 0) || kv->quant == KERN_KVQ_NONE || (n && (!src || !dst)))
        return KVS_EINVAL;
    /* One direction a call: then no pair's destination is another's
     * source, and backends may run the pairs in any order. */
    const bool sealing =
        n && src[0] >= 0 && (uint32_t)src[0] < kv->n_blocks && !kern__kv_cold(kv, (uint32_t)src[0]);
    for (uint32_t i = 0; i < n; i++)
        if (src[i] < 0 || dst[i] < 0 || (uint32_t)src[i] >= kv->n_blocks ||
            (uint32_t)dst[i] >= kv->n_blocks || kern__kv_cold(kv, (uint32_t)src[i]) == sealing ||
            kern__kv_cold(kv, (uint32_t)dst[i]) != sealing)
            return KVS_EINVAL;
    if (!kern_supports(be, KERN_OP_KV_SEAL, kv->dtype))
        return KVS_ENOTSUP;
    return n ? be->ops->kv_seal(be, kv, src, dst, n) : 0;
}

int
kern_kv_gather(kern_backend_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
               uint32_t n)
{
    if (!kv_ok(kv, 0) || (n && (!src || !dst)) || !slots_ok(kv, dst, n))
        return KVS_EINVAL;
    /* Whether a destination is also read is left to the caller: checking
     * it here would take memory per call (kern.h). */
    uint64_t max = (uint64_t)kv->n_blocks * kv->block_tokens;
    size_t n_src = (size_t)kv->n_layers * kv->n_kv_heads * n;
    for (size_t i = 0; i < n_src; i++)
        if (src[i] < 0 || (uint64_t)src[i] >= max)
            return KVS_EINVAL;
    if (be->ops->kv_gather == NULL || !be->ops->supports(be, KERN_OP_KV_APPEND, kv->dtype) ||
        !kv_readable(be, kv))
        return KVS_ENOTSUP;
    return n ? be->ops->kv_gather(be, kv, src, dst, n) : 0;
}

/* kern_kv_block_bounds and kern_kv_pool_bounds: one op, two row layouts. */
static int
block_bounds(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer, const int32_t *blocks,
             uint32_t n, uint16_t *out, bool by_block)
{
    if (!kv_ok(kv, layer) || (n && (!blocks || !out)) || !blocks_ok(kv, blocks, 0, n))
        return KVS_EINVAL;
    if (!be->ops->supports(be, KERN_OP_ATTN, kv->dtype) || !kv_readable(be, kv))
        return KVS_ENOTSUP;
    return n ? be->ops->block_bounds(be, kv, layer, blocks, n, out, by_block) : 0;
}

int
kern_kv_block_bounds(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer, const int32_t *blocks,
                     uint32_t n, uint16_t *out)
{
    return block_bounds(be, kv, layer, blocks, n, out, false);
}

int
kern_kv_pool_bounds(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer, const int32_t *blocks,
                    uint32_t n, uint16_t *out)
{
    return block_bounds(be, kv, layer, blocks, n, out, true);
}

size_t
kern_block_scores_work(const kern_block_score_args_t *a)
{
    if (a == NULL || a->n_kv_heads == 0 || a->n_heads % a->n_kv_heads != 0)
        return 0;
    const size_t rows = (size_t)a->n_q * (a->n_heads / a->n_kv_heads);
    /* Split queries [rows][2d], products [rows][n_blocks], and one KV
     * head's bounds side by side [n_blocks][2d], in f32 for a backend
     * whose product takes no f16 bounds against f32 queries. */
    size_t x, y, z;
    if (kvs_mul_size(rows, 2 * (size_t)a->head_dim, &x) || kvs_mul_size(rows, a->n_blocks, &y) ||
        kvs_add_size(x, y, &x) || kvs_mul_size(a->n_blocks, 2 * (size_t)a->head_dim, &z) ||
        kvs_add_size(x, z, &x))
        return SIZE_MAX;
    return x;
}

int
kern_block_scores(kern_backend_t *be, const kern_block_score_args_t *a)
{
    if (a == NULL || a->n_heads == 0 || a->n_kv_heads == 0 || a->head_dim == 0 ||
        a->n_heads % a->n_kv_heads != 0 || (a->bounds_stride && a->bounds_stride < a->n_blocks) ||
        (a->score_stride && a->score_stride < a->n_blocks))
        return KVS_EINVAL;
    if (a->n_q == 0 || a->n_blocks == 0)
        return 0;
    if (!a->q || !a->bounds || !a->score || !a->work ||
        kern_block_scores_work(a) > SIZE_MAX / sizeof(float))
        return KVS_EINVAL;
    if (a->lists_in_backend) /* not readable here: the caller's word */
        return a->bounds_rows && a->bounds_stride ? be->ops->block_scores(be, a) : KVS_EINVAL;
    uint32_t listed = a->n_blocks; /* bounds_rows entries read */
    if (a->bounds_indptr) {
        const uint32_t qg = a->q_group ? a->q_group : 1, ng = (a->n_q + qg - 1) / qg;
        if (a->bounds_rows == NULL || a->bounds_indptr[0] != 0)
            return KVS_EINVAL;
        for (uint32_t grp = 0; grp < ng; grp++)
            if (a->bounds_indptr[grp + 1] < a->bounds_indptr[grp] ||
                a->bounds_indptr[grp + 1] - a->bounds_indptr[grp] > a->n_blocks)
                return KVS_EINVAL;
        listed = a->bounds_indptr[ng];
    }
    if (a->bounds_rows) {
        if (a->bounds_stride == 0)
            return KVS_EINVAL;
        for (uint32_t b = 0; b < listed; b++)
            if (a->bounds_rows[b] < 0 || (uint32_t)a->bounds_rows[b] >= a->bounds_stride)
                return KVS_EINVAL;
    }
    return be->ops->block_scores(be, a);
}

int
kern_block_select(kern_backend_t *be, const kern_block_select_args_t *a)
{
    if (a == NULL || a->n_kv_heads == 0 || (a->top_k == 0 && !a->top_ks) ||
        a->mask_head_stride == 0)
        return KVS_EINVAL;
    if (a->n_rows == 0)
        return 0;
    if (!a->score || !a->ends || !a->mask)
        return KVS_EINVAL;
    for (uint32_t r = 0; r < a->n_rows; r++)
        if (a->ends[r] < a->first || a->ends[r] > a->mask_head_stride ||
            a->ends[r] - a->first > a->score_stride || (a->top_ks && a->top_ks[r] == 0))
            return KVS_EINVAL;
    if (be->ops->block_select)
        return be->ops->block_select(be, a);
    return be->ops->is_host ? kern__host_block_select(be, a) : KVS_ENOTSUP;
}

int
kern_graph_run(kern_backend_t *be, uint64_t key, kern_graph_fn fn, void *arg)
{
    if (fn == NULL)
        return KVS_EINVAL;
    return be->ops->graph_run ? be->ops->graph_run(be, key, fn, arg) : fn(arg);
}

int
kern_attn_mass(kern_backend_t *be, const kern_attn_mass_args_t *a)
{
    if (a == NULL || !kv_ok(a->kv, a->layer) || a->n_q == 0 || a->n_keys == 0 || !a->q ||
        !a->blocks || !a->out || a->n_heads == 0 || a->n_heads % a->kv->n_kv_heads != 0 ||
        (a->causal && a->n_q > a->n_keys) || !(a->scale > 0.0f))
        return KVS_EINVAL;
    if (a->mode == KERN_MASS_SUM) {
        if (a->n_out > a->n_keys)
            return KVS_EINVAL;
    } else if (a->mode != KERN_MASS_POOL_MAX || a->pool == 0 || a->pool % 2 == 0) {
        return KVS_EINVAL;
    }
    const uint32_t n_used = (a->n_keys + a->kv->block_tokens - 1) / a->kv->block_tokens;
    if (!blocks_ok(a->kv, a->blocks, 0, n_used))
        return KVS_EINVAL;
    if (!be->ops->supports(be, KERN_OP_ATTN, a->kv->dtype) || !kv_readable(be, a->kv))
        return KVS_ENOTSUP;
    return be->ops->attn_mass(be, a);
}

void
kern__kv_rows_f32(const kern_kv_t *kv, bool v, uint32_t layer, uint32_t block, uint32_t head,
                  uint32_t off, uint32_t n, float *out)
{
    if (kern__kv_cold(kv, block)) {
        kern_kvq_decode(kv->quant, v, kern__kv_tile(kv, v, layer, block, head), kv->block_tokens,
                        kv->head_dim, off, n, out);
        return;
    }
    /* A (block, head) of the full-precision layout is a [bt][d] tile. */
    const uint8_t *row =
        (const uint8_t *)(v ? kv->v : kv->k) + kern__kv_offset(kv, layer, block, head, off);
    kern_row_to_f32(kv->dtype, row, out, (size_t)n * kv->head_dim);
}

void
kern_kv_row_f32(const kern_kv_t *kv, bool v, uint32_t layer, int32_t block, uint32_t head,
                uint32_t off, float *out)
{
    kern__kv_rows_f32(kv, v, layer, (uint32_t)block, head, off, 1, out);
}

/* The sparse key pattern (kern.h).  Runs after the rows' kv_len checks. */
static bool
attn_pattern_ok(const kern_attn_args_t *a)
{
    if (a->window_tokens == 0 && a->block_mask == NULL)
        return a->sink_tokens == 0; /* sinks alone would silently mean dense */
    if (a->block_mask == NULL)
        return true; /* key L - 1 is in every window */
    if (a->mask_stride == 0)
        return false;
    const uint32_t n_kv = a->kv->n_kv_heads, hs = a->mask_head_stride;
    if (hs && (uint64_t)n_kv * hs > a->mask_stride)
        return false;
    if (a->mask_in_backend &&
        (a->window_tokens == 0 || (hs && (uint64_t)n_kv * hs != a->mask_stride)))
        return false;
    uint32_t bt = a->kv->block_tokens, qb = a->mask_q_block ? a->mask_q_block : 1;
    for (uint32_t i = 0; i < a->n_q; i++) {
        uint32_t nb = ((uint32_t)a->kv_len[i] + bt - 1) / bt;
        if (nb > (hs ? hs : a->mask_stride))
            return false;
        if (a->window_tokens > 0 || a->sink_tokens > 0 || (a->dense_rows && a->dense_rows[i]))
            continue;
        /* Mask only: a row (or head) whose kept blocks are all zero has no
         * key to normalise over, and no output that would mean anything. */
        for (uint32_t g = 0; g < (hs ? n_kv : 1); g++) {
            const uint8_t *m = a->block_mask + (size_t)(i / qb) * a->mask_stride + (size_t)g * hs;
            uint32_t b = 0;
            while (b < nb && m[b] == 0)
                b++;
            if (b == nb)
                return false;
        }
    }
    return true;
}

int
kern_attention(kern_backend_t *be, const kern_attn_args_t *a)
{
    if (!a || !kv_ok(a->kv, a->layer) || a->n_heads == 0 || a->n_heads % a->kv->n_kv_heads != 0 ||
        (a->n_q && (!a->q || !a->out)) || !a->q_indptr || !a->kv_len || !a->pt.indptr ||
        !a->pt.last_len || a->q_indptr[0] != 0 || a->pt.indptr[0] != 0 ||
        (uint32_t)a->q_indptr[a->pt.n_seqs] != a->n_q)
        return KVS_EINVAL;
    const kern_kv_t *kv = a->kv;
    for (uint32_t s = 0; s < a->pt.n_seqs; s++) {
        int32_t b0 = a->pt.indptr[s], b1 = a->pt.indptr[s + 1];
        if (b1 < b0 || a->q_indptr[s + 1] < a->q_indptr[s] ||
            !blocks_ok(kv, a->pt.indices, (size_t)b0, (size_t)b1))
            return KVS_EINVAL;
        int64_t len = 0;
        if (b1 > b0) {
            if (a->pt.last_len[s] < 1 || (uint32_t)a->pt.last_len[s] > kv->block_tokens)
                return KVS_EINVAL;
            len = (int64_t)(b1 - b0 - 1) * kv->block_tokens + a->pt.last_len[s];
        }
        for (int32_t i = a->q_indptr[s]; i < a->q_indptr[s + 1]; i++)
            if (a->kv_len[i] < 1 || a->kv_len[i] > len ||
                (a->max_len_hint && (uint32_t)a->kv_len[i] > a->max_len_hint))
                return KVS_EINVAL;
    }
    if (!attn_pattern_ok(a))
        return KVS_EINVAL;
    if (!be->ops->supports(be, KERN_OP_ATTN, kv->dtype) || !kv_readable(be, kv))
        return KVS_ENOTSUP;
    return a->n_q ? be->ops->attention(be, a) : 0;
}
