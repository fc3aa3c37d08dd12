/*
 * kernels/cpu/kern_ref.c — the "ref" backend: every op in plain scalar C,
 * one thread, no SIMD, written to be obviously correct rather than fast.
 * Every other backend (cpu, cuda) is tested against it, so when in doubt
 * this file decides what an op means.
 *
 * Callers: kern.c (kern_backend_new("ref")), tests/kernels, benchmarks.
 *
 * Accumulations that could lose precision (dot products, the rmsnorm sum,
 * softmax) run in double.  The only state is one scratch buffer, grown on
 * demand and kept, so that a steady stream of calls does not allocate.
 */
#include "../kern_int.h"

#include <math.h>
#include <stdlib.h>

typedef struct kern_ref {
    kern_backend_t base;
    void *scratch; /* matmul row conversion, attention scores */
    size_t scratch_bytes;
} kern_ref_t;

static const kern_ops_t ref_ops;

/* Returns a scratch buffer of at least `bytes`, growing the kept one. */
static void *
ref_scratch(kern_ref_t *be, size_t bytes)
{
    if (bytes > be->scratch_bytes) {
        void *p = realloc(be->scratch, bytes);
        if (p == NULL)
            return NULL;
        be->scratch = p;
        be->scratch_bytes = bytes;
    }
    return be->scratch;
}

static void
ref_destroy(kern_backend_t *base)
{
    kern_ref_t *be = (kern_ref_t *)base;
    free(be->scratch);
    free(be);
}

static bool
ref_supports(const kern_backend_t *be, kern_op_t op, kern_dtype_t type)
{
    (void)be;
    return kern__types_supported(op, type);
}

static int
ref_get_rows(kern_backend_t *be, const kern_tensor_t *w, const int32_t *ids, uint32_t n, float *out)
{
    (void)be;
    for (uint32_t i = 0; i < n; i++) {
        const char *row = (const char *)w->data + (size_t)ids[i] * w->row_bytes;
        int rc = kern_row_to_f32(w->type, row, out + (size_t)i * w->n_cols, w->n_cols);
        if (rc)
            return rc;
    }
    return 0;
}

static int
ref_matmul(kern_backend_t *base, const kern_tensor_t *w, const float *x, uint32_t n,
           const float *bias, float *y)
{
    kern_ref_t *be = (kern_ref_t *)base;
    size_t cols = w->n_cols;
    bool q8 = kern__rounds_x(w->type);
    float *wrow = ref_scratch(be, (cols + (q8 ? (size_t)n * cols : 0)) * sizeof(float));
    if (wrow == NULL)
        return KVS_ENOMEM;
    if (q8) {
        float *xr = wrow + cols;
        for (uint32_t t = 0; t < n; t++)
            kern_round_x_q8(x + (size_t)t * cols, cols, xr + (size_t)t * cols);
        x = xr;
    }
    for (uint32_t r = 0; r < w->n_rows; r++) {
        int rc =
            kern_row_to_f32(w->type, (const char *)w->data + (size_t)r * w->row_bytes, wrow, cols);
        if (rc)
            return rc;
        for (uint32_t t = 0; t < n; t++) {
            const float *xt = x + (size_t)t * cols;
            double acc = bias ? bias[r] : 0.0;
            for (size_t c = 0; c < cols; c++)
                acc += (double)xt[c] * wrow[c];
            y[(size_t)t * w->n_rows + r] = (float)acc;
        }
    }
    return 0;
}

static int
ref_rmsnorm(kern_backend_t *be, const float *x, const float *w, uint32_t n, uint32_t d, float eps,
            float *y)
{
    (void)be;
    for (uint32_t i = 0; i < n; i++) {
        const float *xi = x + (size_t)i * d;
        float *yi = y + (size_t)i * d;
        double ss = 0.0;
        for (uint32_t c = 0; c < d; c++)
            ss += (double)xi[c] * xi[c];
        double scale = 1.0 / sqrt(ss / d + eps);
        /* Reading xi[c] before writing yi[c] keeps y == x correct. */
        for (uint32_t c = 0; c < d; c++)
            yi[c] = (float)(xi[c] * scale * w[c]);
    }
    return 0;
}

/* One tensor of the call: a->x or a->x2. */
static void
ref_rope_rows(const kern_rope_args_t *a, float *xs, uint32_t n_heads)
{
    for (uint32_t r = 0; r < a->n_rows; r++) {
        for (uint32_t h = 0; h < n_heads; h++) {
            float *x = xs + ((size_t)r * n_heads + h) * a->head_dim;
            for (uint32_t i = 0; i < a->n_rot / 2; i++) {
                double theta =
                    (double)a->pos[r] * a->freq_scale * pow(a->freq_base, -2.0 * i / a->n_rot);
                if (a->freq_factors)
                    theta /= a->freq_factors[i];
                double c = cos(theta), s = sin(theta);
                uint32_t i0 = a->neox ? i : 2 * i, i1 = a->neox ? i + a->n_rot / 2 : 2 * i + 1;
                double x0 = x[i0], x1 = x[i1];
                x[i0] = (float)(x0 * c - x1 * s);
                x[i1] = (float)(x0 * s + x1 * c);
            }
        }
    }
}

static int
ref_rope(kern_backend_t *be, const kern_rope_args_t *a)
{
    (void)be;
    ref_rope_rows(a, a->x, a->n_heads);
    if (a->x2)
        ref_rope_rows(a, a->x2, a->n_heads2);
    return 0;
}

static int
ref_swiglu(kern_backend_t *be, const float *gate, const float *up, size_t n, float *out)
{
    (void)be;
    for (size_t i = 0; i < n; i++) {
        double g = gate[i];
        out[i] = (float)(g / (1.0 + exp(-g)) * up[i]);
    }
    return 0;
}

static int
ref_add(kern_backend_t *be, float *x, const float *y, size_t n)
{
    (void)be;
    for (size_t i = 0; i < n; i++)
        x[i] += y[i];
    return 0;
}

/* Stores one head vector into a K or V buffer in the pool's dtype. */
static void
ref_kv_store(const kern_kv_t *kv, void *buf, size_t off, const float *src)
{
    if (kv->dtype == KERN_F16) {
        uint16_t *dst = (uint16_t *)((char *)buf + off);
        for (uint32_t c = 0; c < kv->head_dim; c++)
            dst[c] = kvs_f32_to_fp16(src[c]);
    } else {
        memcpy((char *)buf + off, src, kv->head_dim * sizeof(float));
    }
}

static int
ref_kv_append(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer, const float *k,
              const float *v, const int32_t *slots, uint32_t n)
{
    (void)be;
    size_t stride = (size_t)kv->n_kv_heads * kv->head_dim;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t block = (uint32_t)slots[i] / kv->block_tokens;
        uint32_t off = (uint32_t)slots[i] % kv->block_tokens;
        for (uint32_t h = 0; h < kv->n_kv_heads; h++) {
            size_t dst = kern__kv_offset(kv, layer, block, h, off);
            ref_kv_store(kv, kv->k, dst, k + i * stride + (size_t)h * kv->head_dim);
            ref_kv_store(kv, kv->v, dst, v + i * stride + (size_t)h * kv->head_dim);
        }
    }
    return 0;
}

static int
ref_kv_copy(kern_backend_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
            uint32_t n)
{
    (void)be;
    /* One block of one layer is contiguous: all its heads, slots and dims. */
    size_t block_bytes = kern__kv_offset(kv, 0, 1, 0, 0);
    for (uint32_t i = 0; i < n; i++) {
        for (uint32_t l = 0; l < kv->n_layers; l++) {
            size_t s = kern__kv_offset(kv, l, (uint32_t)src[i], 0, 0);
            size_t d = kern__kv_offset(kv, l, (uint32_t)dst[i], 0, 0);
            memmove((char *)kv->k + d, (const char *)kv->k + s, block_bytes);
            memmove((char *)kv->v + d, (const char *)kv->v + s, block_bytes);
        }
    }
    return 0;
}

static int
ref_kv_seal(kern_backend_t *base, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
            uint32_t n)
{
    float *x =
        ref_scratch((kern_ref_t *)base, (size_t)kv->block_tokens * kv->head_dim * sizeof(float));
    if (x == NULL)
        return KVS_ENOMEM;
    for (uint32_t l = 0; l < kv->n_layers; l++)
        kern__host_kv_seal_layer(kv, l, src, dst, n, x);
    return 0;
}

static int
ref_kv_gather(kern_backend_t *base, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
              uint32_t n)
{
    float *x = ref_scratch((kern_ref_t *)base, (size_t)kv->head_dim * sizeof(float));
    if (x == NULL)
        return KVS_ENOMEM;
    for (uint32_t l = 0; l < kv->n_layers; l++)
        kern__host_kv_gather_layer(kv, l, src, dst, n, x);
    return 0;
}

static int
ref_block_bounds(kern_backend_t *base, const kern_kv_t *kv, uint32_t layer, const int32_t *blocks,
                 uint32_t n, uint16_t *out, bool by_block)
{
    const uint32_t d = kv->head_dim;
    float *x = ref_scratch((kern_ref_t *)base, ((size_t)kv->block_tokens + 2) * d * sizeof(float));
    if (x == NULL)
        return KVS_ENOMEM;
    float *mx = x + (size_t)kv->block_tokens * d, *mn = mx + d;
    for (uint32_t g = 0; g < kv->n_kv_heads; g++)
        for (uint32_t i = 0; i < n; i++) {
            kern__host_block_minmax(kv, layer, (uint32_t)blocks[i], g, x, mx, mn);
            kern__host_bounds_round(mx, mn, d,
                                    kern__host_bounds_out(kv, blocks, n, g, i, out, by_block));
        }
    return 0;
}

/* kern_block_select by its definition: a candidate is kept when fewer
 * than top_k candidates rank before it. */
static int
ref_block_select(kern_backend_t *base, const kern_block_select_args_t *a)
{
    (void)base;
    const uint32_t f = a->first, hs = a->mask_head_stride;
    for (uint32_t r = 0; r < a->n_rows; r++) {
        const uint32_t n = a->ends[r] - f, k = a->top_ks ? a->top_ks[r] : a->top_k;
        for (uint32_t g = 0; g < a->n_kv_heads; g++) {
            const size_t row = (size_t)r * a->n_kv_heads + g;
            const float *sc = a->score + row * a->score_stride;
            uint8_t *m = a->mask + row * hs;
            for (uint32_t j = 0; j < hs; j++)
                m[j] = 1;
            for (uint32_t i = 0; n > k && i < n; i++) {
                const uint32_t ki = kern__select_key(sc[i]);
                uint32_t before = 0;
                for (uint32_t j = 0; j < n; j++) {
                    const uint32_t kj = kern__select_key(sc[j]);
                    before += kj > ki || (kj == ki && j < i);
                }
                m[f + i] = before < k;
            }
        }
    }
    return 0;
}

static int
ref_attn_mass(kern_backend_t *base, const kern_attn_mass_args_t *a)
{
    void *x = ref_scratch((kern_ref_t *)base, kern__host_attn_mass_scratch(a));
    if (x == NULL)
        return KVS_ENOMEM;
    kern__host_attn_mass_all(a, x);
    return 0;
}

/* Whether row i (causal limit len) attends to key j < len: kern.h's
 * sparse key pattern, spelled out as written there. */
static bool
ref_key_allowed(const kern_attn_args_t *a, uint32_t i, uint32_t g, int32_t len, int32_t j)
{
    bool patterned =
        (a->window_tokens > 0 || a->block_mask) && !(a->dense_rows && a->dense_rows[i]);
    if (!patterned || (uint32_t)j < a->sink_tokens)
        return true;
    if (a->window_tokens > 0 && (int64_t)j >= (int64_t)len - a->window_tokens)
        return true;
    if (a->block_mask) {
        uint32_t qb = a->mask_q_block ? a->mask_q_block : 1;
        return a->block_mask[(size_t)(i / qb) * a->mask_stride + (size_t)g * a->mask_head_stride +
                             (uint32_t)j / a->kv->block_tokens];
    }
    return false;
}

static int
ref_attention(kern_backend_t *base, const kern_attn_args_t *a)
{
    kern_ref_t *be = (kern_ref_t *)base;
    const kern_kv_t *kv = a->kv;
    uint32_t d = kv->head_dim, group = a->n_heads / kv->n_kv_heads;

    int32_t max_len = 0;
    for (uint32_t i = 0; i < a->n_q; i++)
        if (a->kv_len[i] > max_len)
            max_len = a->kv_len[i];
    /* Scores, then the output accumulator, both in double; then one K or
     * V row as stored, read back as f32. */
    double *p = ref_scratch(be, ((size_t)max_len + d) * sizeof(double) + d * sizeof(float));
    if (p == NULL)
        return KVS_ENOMEM;
    double *acc = p + max_len;
    float *row = (float *)(acc + d);

    for (uint32_t s = 0; s < a->pt.n_seqs; s++) {
        const int32_t *blocks = a->pt.indices + a->pt.indptr[s];
        for (int32_t i = a->q_indptr[s]; i < a->q_indptr[s + 1]; i++) {
            int32_t len = a->kv_len[i];
            for (uint32_t h = 0; h < a->n_heads; h++) {
                uint32_t g = h / group;
                const float *q = a->q + ((size_t)i * a->n_heads + h) * d;
                double mx = -INFINITY;
                for (int32_t j = 0; j < len; j++) {
                    if (!ref_key_allowed(a, (uint32_t)i, g, len, j)) {
                        p[j] = -INFINITY; /* exp() below makes it an exact 0 */
                        continue;
                    }
                    kern_kv_row_f32(kv, false, a->layer, blocks[j / kv->block_tokens], g,
                                    (uint32_t)j % kv->block_tokens, row);
                    double dot = 0.0;
                    for (uint32_t c = 0; c < d; c++)
                        dot += q[c] * row[c];
                    p[j] = (double)a->scale * dot;
                    if (p[j] > mx)
                        mx = p[j];
                }
                double sum = 0.0;
                for (int32_t j = 0; j < len; j++) {
                    p[j] = exp(p[j] - mx);
                    sum += p[j];
                }
                for (uint32_t c = 0; c < d; c++)
                    acc[c] = 0.0;
                for (int32_t j = 0; j < len; j++) {
                    if (p[j] == 0.0)
                        continue; /* a masked key (its V is never read) */
                    kern_kv_row_f32(kv, true, a->layer, blocks[j / kv->block_tokens], g,
                                    (uint32_t)j % kv->block_tokens, row);
                    for (uint32_t c = 0; c < d; c++)
                        acc[c] += p[j] * row[c];
                }
                float *o = a->out + ((size_t)i * a->n_heads + h) * d;
                for (uint32_t c = 0; c < d; c++)
                    o[c] = (float)(acc[c] / sum);
            }
        }
    }
    return 0;
}

int
kern__ref_new(const kern_backend_cfg_t *cfg, kern_backend_t **out)
{
    (void)cfg;
    kern_ref_t *be = calloc(1, sizeof(*be));
    if (be == NULL)
        return KVS_ENOMEM;
    be->base.ops = &ref_ops;
    *out = &be->base;
    return 0;
}

static const kern_ops_t ref_ops = {
    .name = "ref",
    .is_host = true,
    .destroy = ref_destroy,    /* frees the scratch buffer and the struct */
    .supports = ref_supports,  /* F32/F16/BF16/Q8_0/Q4_0/K-quant weights, F32/F16 KV + codecs */
    .alloc = kern__host_alloc, /* 64-byte aligned host memory */
    .free = kern__host_free,
    .upload = kern__host_copy, /* host to host: memmove */
    .download = kern__host_copy,
    .memset = kern__host_memset,
    .sync = kern__host_sync,  /* everything is synchronous */
    .get_rows = ref_get_rows, /* kern_row_to_f32 per id */
    .matmul = ref_matmul,     /* row to f32, double dot */
    .rmsnorm = ref_rmsnorm,   /* double sum of squares */
    .rope = ref_rope,         /* double theta, sin, cos */
    .swiglu = ref_swiglu,     /* double silu */
    .add = ref_add,
    .kv_append = ref_kv_append, /* f32 -> KV dtype, per head */
    .kv_copy = ref_kv_copy,     /* whole blocks, every layer */
    .attention = ref_attention, /* two-pass softmax in double, masked keys excluded */
    .delta_apply = kern__host_delta_apply,
    .pack_weight = NULL,
    .kv_seal = ref_kv_seal,     /* block by block through kern_kvq_encode */
    .kv_gather = ref_kv_gather, /* row by row, layer by layer */
    .block_bounds = ref_block_bounds,
    .block_scores = kern__host_block_scores_ref, /* the definition, summed in double */
    .block_select = ref_block_select,            /* by rank, n^2 */
    .attn_mass = ref_attn_mass,                  /* keys in f32, sums in double */
};
