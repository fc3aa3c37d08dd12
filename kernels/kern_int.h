/*
 * kernels/kern_int.h — what a backend implements.  kern.c validates every
 * argument once and then calls through this table; implementations may
 * assume shapes are consistent.  Only files under kernels/ include this.
 */
#ifndef KERN_INT_H
#define KERN_INT_H

#include "kern.h"

typedef struct kern_ops {
    const char *name;
    bool is_host;
    void (*destroy)(kern_backend_t *be);
    bool (*supports)(const kern_backend_t *be, kern_op_t op, kern_dtype_t type);

    void *(*alloc)(kern_backend_t *be, size_t bytes);
    void (*free)(kern_backend_t *be, void *p);
    int (*upload)(kern_backend_t *be, void *dst, const void *src, size_t bytes);
    int (*download)(kern_backend_t *be, void *dst, const void *src, size_t bytes);
    int (*memset)(kern_backend_t *be, void *dst, int value, size_t bytes);
    int (*sync)(kern_backend_t *be);
    /* Optional (NULL: kern.c moves run by run with upload / download):
     * `count` runs of `bytes`, dpitch apart at dst and spitch apart at
     * src, to the host (download) or from it; bytes, count > 0 and the
     * spans checked. */
    int (*copy_runs)(kern_backend_t *be, bool download, void *dst, size_t dpitch, const void *src,
                     size_t spitch, size_t bytes, size_t count);
    /* Optional (NULL: kern_host_alloc is ordinary host memory): memory
     * the backend transfers fastest, at least 64-byte aligned; NULL when
     * it has none to give (kern.c then uses ordinary memory). */
    void *(*host_alloc)(kern_backend_t *be, size_t bytes);
    void (*host_free)(kern_backend_t *be, void *p);

    int (*get_rows)(kern_backend_t *be, const kern_tensor_t *w, const int32_t *ids, uint32_t n,
                    float *out);
    int (*matmul)(kern_backend_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
                  const float *bias, float *y);
    /* Optional (NULL: kern.c calls matmul per weight); every weight
     * checked as for matmul, count in 1 .. KERN_MATMUL_SET_MAX, n > 0,
     * bias an array (entries may be NULL). */
    int (*matmul_set)(kern_backend_t *be, uint32_t count, const kern_tensor_t *const *w,
                      const float *x, uint32_t n, const float *const *bias, float *const *y);
    /* Optional (NULL: kern__matmul_swiglu_apart); both weights checked,
     * same shape, n > 0. */
    int (*matmul_swiglu)(kern_backend_t *be, const kern_tensor_t *gate, const kern_tensor_t *up,
                         const float *x, uint32_t n, float *tmp, float *y);
    int (*rmsnorm)(kern_backend_t *be, const float *x, const float *w, uint32_t n, uint32_t d,
                   float eps, float *y);
    /* Optional (NULL: kern.c calls add, then rmsnorm); n > 0, y != x. */
    int (*add_rmsnorm)(kern_backend_t *be, float *x, const float *res, const float *w, uint32_t n,
                       uint32_t d, float eps, float *y);
    int (*rope)(kern_backend_t *be, const kern_rope_args_t *a);
    int (*swiglu)(kern_backend_t *be, const float *gate, const float *up, size_t n, float *out);
    int (*add)(kern_backend_t *be, float *x, const float *y, size_t n);
    int (*kv_append)(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer, const float *k,
                     const float *v, const int32_t *slots, uint32_t n);
    int (*kv_copy)(kern_backend_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
                   uint32_t n);
    int (*attention)(kern_backend_t *be, const kern_attn_args_t *a);
    int (*delta_apply)(kern_backend_t *be, float *out, float *dense, uint32_t n, uint32_t width,
                       uint32_t gamma, uint32_t tail);
    /* by_block: kern_kv_pool_bounds' rows, else kern_kv_block_bounds'. */
    int (*block_bounds)(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer,
                        const int32_t *blocks, uint32_t n, uint16_t *out, bool by_block);
    /* a->n_q and a->n_blocks are nonzero. */
    int (*block_scores)(kern_backend_t *be, const kern_block_score_args_t *a);
    /* Optional (NULL: kern__host_block_select, which only a host backend
     * can run); checked as kern.h says, a->n_rows > 0. */
    int (*block_select)(kern_backend_t *be, const kern_block_select_args_t *a);
    int (*attn_mass)(kern_backend_t *be, const kern_attn_mass_args_t *a);
    /* Optional (NULL: weights stay row-major); w is valid and row-major. */
    int (*pack_weight)(kern_backend_t *be, kern_tensor_t *w);
    /* Optional (NULL: the backend reads no quantized KV blocks). */
    int (*kv_seal)(kern_backend_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
                   uint32_t n);
    /* Optional (NULL: kern_kv_gather answers KVS_ENOTSUP). */
    int (*kv_gather)(kern_backend_t *be, const kern_kv_t *kv, const int32_t *src,
                     const int32_t *dst, uint32_t n);
    /* Optional (NULL: nothing to size ahead); r is valid. */
    int (*reserve)(kern_backend_t *be, const kern_reserve_t *r);
    /* Optional (NULL: kern_graph_run calls fn directly). */
    int (*graph_run)(kern_backend_t *be, uint64_t key, kern_graph_fn fn, void *arg);
} kern_ops_t;

/* Every backend struct starts with this header. */
struct kern_backend {
    const kern_ops_t *ops;
    bool failed; /* kern_backend_failed: set by a device backend, never cleared */
};

/* Constructors, one per backend; kern.c picks by name. */
int kern__ref_new(const kern_backend_cfg_t *cfg, kern_backend_t **out);
int kern__cpu_new(const kern_backend_cfg_t *cfg, kern_backend_t **out);
int kern__cuda_new(const kern_backend_cfg_t *cfg, kern_backend_t **out);

/* kern_matmul_swiglu as its separate ops (gate into y, up into tmp, then
 * swiglu): kern.c's fallback, and a backend's for calls it does not fuse. */
int kern__matmul_swiglu_apart(kern_backend_t *be, const kern_tensor_t *gate,
                              const kern_tensor_t *up, const float *x, uint32_t n, float *tmp,
                              float *y);

/* The weight and KV types every backend computes with: weights F32, F16,
 * BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K; KV F32, F16 (kern_types.c). */
bool kern__types_supported(kern_op_t op, kern_dtype_t type);
/* Whether kern_matmul rounds x with kern_round_x_q8 for this weight type
 * (kern.h): Q8_0, Q4_0 and the K-quants. */
static inline bool
kern__rounds_x(kern_dtype_t type)
{
    return type == KERN_Q8_0 || type == KERN_Q4_0 || type == KERN_Q4_K || type == KERN_Q5_K ||
           type == KERN_Q6_K;
}
/* ggml's get_scale_min_k4: sub-block j's 6-bit scale and min of a Q4_K or
 * Q5_K super-block (kern_types.c). */
void kern__scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *m);

/* Shared host-memory helpers for the ref and cpu backends (kern_host.c). */
void *kern__host_alloc(kern_backend_t *be, size_t bytes);
void kern__host_free(kern_backend_t *be, void *p);
int kern__host_copy(kern_backend_t *be, void *dst, const void *src, size_t bytes);
int kern__host_memset(kern_backend_t *be, void *dst, int value, size_t bytes);
int kern__host_sync(kern_backend_t *be);
int kern__host_delta_apply(kern_backend_t *be, float *out, float *dense, uint32_t n, uint32_t width,
                           uint32_t gamma, uint32_t tail);

/* kern_kv_block_bounds (by_block: kern_kv_pool_bounds) on the host:
 * where block i's bounds for KV head g go in out; kern_block_scores as
 * plain loops (ref), and as one matrix product per KV head through the
 * backend's own matmul over a->work (cpu). */
uint16_t *kern__host_bounds_out(const kern_kv_t *kv, const int32_t *blocks, uint32_t n, uint32_t g,
                                uint32_t i, uint16_t *out, bool by_block);
/* One block's f32 maxima and minima (d each) into its f16 row [mx | mn],
 * rounded outward. */
void kern__host_bounds_round(const float *mx, const float *mn, uint32_t d, uint16_t *out);
/* KV head g's key maxima and minima over block blk in f32, with x as
 * scratch of block_tokens * head_dim floats. */
void kern__host_block_minmax(const kern_kv_t *kv, uint32_t layer, uint32_t blk, uint32_t g,
                             float *x, float *mx, float *mn);
/* Every score a->score holds, -inf: the maxima start there. */
void kern__host_block_scores_init(const kern_block_score_args_t *a);
/* The score row of query group grp and KV head g (kern.h: per_kv_head,
 * score_stride); the first block of KV head g's bounds (kern.h:
 * bounds_stride). */
float *kern__host_score_row(const kern_block_score_args_t *a, uint32_t grp, uint32_t g);
size_t kern__host_bounds_at(const kern_block_score_args_t *a, uint32_t g);
/* KV head g's bounds of list entry b: [max | min], 2 * head_dim halves. */
const uint16_t *kern__host_bound(const kern_block_score_args_t *a, uint32_t g, uint32_t b);
/* How many blocks query group grp scores, and its first list entry
 * (kern.h: bounds_indptr). */
uint32_t kern__host_group_blocks(const kern_block_score_args_t *a, uint32_t grp, uint32_t *first);
int kern__host_block_scores_ref(kern_backend_t *be, const kern_block_score_args_t *a);
/* Not for a->bounds_indptr: one product needs one list. */
int kern__host_block_scores_gemm(kern_backend_t *be, const kern_block_score_args_t *a);

/* kern_block_select's order of scores as unsigned keys: a higher score
 * has a higher key, NaN has 0, below -inf, and -0 the key of +0. */
uint32_t kern__select_key(float x);
/* The min(k, n) best of score[0..n) in kern_block_select's order, their
 * indices in out in no particular order: a heap of k, n log k. */
void kern__host_top_k(uint32_t *out, uint32_t n, uint32_t k, const float *score);
/* kern_block_select through kern__host_top_k, for host memory. */
int kern__host_block_select(kern_backend_t *be, const kern_block_select_args_t *a);

/* kern_attn_mass for KV head g (mode SUM: out's row g; POOL_MAX: folds g's
 * heads into out with max, out starting at -inf), with scratch x of
 * kern__host_attn_mass_scratch() bytes. */
size_t kern__host_attn_mass_scratch(const kern_attn_mass_args_t *a);
void kern__host_attn_mass_head(const kern_attn_mass_args_t *a, uint32_t g, void *x);
/* Every KV head in turn (POOL_MAX's out set to -inf first). */
void kern__host_attn_mass_all(const kern_attn_mass_args_t *a, void *x);

/* Seals blocks src[i] -> dst[i] of one layer (kern_kv_seal) with x as
 * scratch of block_tokens * head_dim floats. */
void kern__host_kv_seal_layer(const kern_kv_t *kv, uint32_t layer, const int32_t *src,
                              const int32_t *dst, uint32_t n, float *x);
/* Gathers the rows of one layer (kern_kv_gather) with x as scratch of
 * head_dim floats. */
void kern__host_kv_gather_layer(const kern_kv_t *kv, uint32_t layer, const int32_t *src,
                                const int32_t *dst, uint32_t n, float *x);

/* kern_kvq_decode, with AVX2 and FMA when the caller's CPU has them (the
 * cpu backend knows from its start-up detection): the same values bit for
 * bit; for a shape the pool already validated (the cpu attention's hot
 * path, kern_kvq.c). */
void kern__kvq_decode_fast(bool avx2, kern_kvq_t q, bool v, const void *tile, uint32_t bt,
                           uint32_t d, uint32_t t0, uint32_t n, float *y);

/* Rows off .. off + n - 1 (within one block) of (layer, block, kv head)
 * as f32, from either kind of block: kern_kv_row_f32 for a run, decoding
 * a quantized tile's parameters once. */
void kern__kv_rows_f32(const kern_kv_t *kv, bool v, uint32_t layer, uint32_t block, uint32_t head,
                       uint32_t off, uint32_t n, float *out);

/* Full-precision blocks of a pool: all of them without a codec. */
static inline uint32_t
kern__kv_n_hot(const kern_kv_t *kv)
{
    return kv->quant == KERN_KVQ_NONE ? kv->n_blocks : kv->n_hot;
}

static inline bool
kern__kv_cold(const kern_kv_t *kv, uint32_t block)
{
    return kv->quant != KERN_KVQ_NONE && block >= kv->n_hot;
}

/* The K (v false) or V tile of a quantized block's (layer, kv_head). */
static inline const void *
kern__kv_tile(const kern_kv_t *kv, bool v, uint32_t layer, uint32_t block, uint32_t head)
{
    size_t tile = v ? kv->qv_tile : kv->qk_tile;
    size_t idx =
        ((size_t)layer * (kv->n_blocks - kv->n_hot) + (block - kv->n_hot)) * kv->n_kv_heads + head;
    return (const uint8_t *)(v ? kv->qv : kv->qk) + idx * tile;
}

/* Address of (layer, block, kv_head, slot-in-block) in a K or V buffer of
 * full-precision blocks (block < kern__kv_n_hot). */
static inline size_t
kern__kv_offset(const kern_kv_t *kv, uint32_t layer, uint32_t block, uint32_t head, uint32_t off)
{
    size_t el = kv->dtype == KERN_F16 ? 2 : 4;
    return (size_t)layer * kv->layer_bytes +
           ((((size_t)block * kv->n_kv_heads + head) * kv->block_tokens + off) * kv->head_dim) * el;
}

#endif /* KERN_INT_H */
