/*
 * model/model_load.c — turns a validated GGUF file into a model: reads and
 * range-checks the hyper-parameters of a llama/qwen2 architecture, binds
 * every tensor after checking its shape and type, and sets up the
 * tokenizer.  The GGUF reader already guarantees every tensor lies inside
 * the file; this layer guarantees the model is self-consistent, so the
 * forward pass never indexes outside a tensor.
 *
 * Called by serve/ (kvserve run/serve/eval), benchmarks and tests.
 */
#include "model_int.h"

#include <math.h>
#include <stdio.h>
#include <sys/mman.h>
#include <stdlib.h>
#include <string.h>

void
model__errf(char *err, size_t err_len, const char *fmt, ...)
{
    if (err == NULL || err_len == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, err_len, fmt, ap);
    va_end(ap);
    /* Messages quote the file's own strings (a tokenizer's or an
     * architecture's name), which may hold a newline or an escape
     * sequence: a message stays one plain line in a log or a status. */
    for (char *p = err; *p; p++)
        if ((unsigned char)*p < 0x20 || *p == 0x7f)
            *p = '?';
}

/* Reads "<arch>.<suffix>" as u32; absent -> def (or error when required). */
static int
hp_u32(const model_t *m, const char *suffix, bool required, uint32_t def, uint32_t lo, uint32_t hi,
       uint32_t *out, char *err, size_t err_len)
{
    char key[128];
    snprintf(key, sizeof key, "%s.%s", m->hp.arch, suffix);
    int64_t idx = model_gguf_find_key(m->gguf, key);
    if (idx >= 0 && model_gguf_kv_type(m->gguf, (uint32_t)idx) == MODEL_GGUF_ARRAY) {
        model__errf(err, err_len, "key '%s': per-layer values are not supported", key);
        return KVS_ENOTSUP;
    }
    int rc = model_gguf_get_u32(m->gguf, key, out);
    if (rc == KVS_ENOENT) {
        if (required) {
            model__errf(err, err_len, "key '%s' is required but missing", key);
            return KVS_EFORMAT;
        }
        *out = def;
        return 0;
    }
    if (rc != 0) {
        model__errf(err, err_len, "key '%s': not an unsigned 32-bit integer", key);
        return KVS_EFORMAT;
    }
    if (*out < lo || *out > hi) {
        model__errf(err, err_len, "key '%s' = %u is outside [%u, %u]", key, *out, lo, hi);
        return KVS_EFORMAT;
    }
    return 0;
}

static int
hp_f32(const model_t *m, const char *suffix, bool required, float def, float lo, float hi,
       float *out, char *err, size_t err_len)
{
    char key[128];
    snprintf(key, sizeof key, "%s.%s", m->hp.arch, suffix);
    int rc = model_gguf_get_f32(m->gguf, key, out);
    if (rc == KVS_ENOENT) {
        if (required) {
            model__errf(err, err_len, "key '%s' is required but missing", key);
            return KVS_EFORMAT;
        }
        *out = def;
        return 0;
    }
    if (rc != 0 || !isfinite(*out) || *out < lo || *out > hi) {
        model__errf(err, err_len, "key '%s': expected a float in [%g, %g]", key, lo, hi);
        return KVS_EFORMAT;
    }
    return 0;
}

static int
read_hparams(model_t *m, char *err, size_t err_len)
{
    model_hparams_t *hp = &m->hp;
    model_gguf_str_t arch;
    if (model_gguf_get_str(m->gguf, "general.architecture", &arch) != 0) {
        model__errf(err, err_len, "key 'general.architecture' is missing or not a string");
        return KVS_EFORMAT;
    }
    if (strcmp(arch.ptr, "llama") != 0 && strcmp(arch.ptr, "qwen2") != 0) {
        model__errf(err, err_len, "architecture '%.32s' is not supported (supported: llama, qwen2)",
                    arch.ptr);
        return KVS_ENOTSUP;
    }
    snprintf(hp->arch, sizeof hp->arch, "%s", arch.ptr);

    int rc;
    if ((rc = hp_u32(m, "embedding_length", true, 0, 1, 65536, &hp->n_embd, err, err_len)) ||
        (rc = hp_u32(m, "block_count", true, 0, 1, MODEL_MAX_LAYERS, &hp->n_layer, err, err_len)) ||
        (rc = hp_u32(m, "attention.head_count", true, 0, 1, 1024, &hp->n_head, err, err_len)) ||
        (rc = hp_u32(m, "feed_forward_length", true, 0, 1, 1u << 20, &hp->n_ff, err, err_len)) ||
        (rc =
             hp_u32(m, "context_length", false, 4096, 1, 1u << 24, &hp->n_ctx_train, err, err_len)))
        return rc;
    if ((rc = hp_u32(m, "attention.head_count_kv", false, hp->n_head, 1, hp->n_head, &hp->n_head_kv,
                     err, err_len)))
        return rc;
    if (hp->n_head % hp->n_head_kv != 0) {
        model__errf(err, err_len, "head_count %u is not a multiple of head_count_kv %u", hp->n_head,
                    hp->n_head_kv);
        return KVS_EFORMAT;
    }
    uint32_t def_hd = hp->n_embd / hp->n_head;
    uint32_t vlen;
    if ((rc = hp_u32(m, "attention.key_length", false, def_hd, 2, MODEL_MAX_HEAD_DIM, &hp->head_dim,
                     err, err_len)) ||
        (rc = hp_u32(m, "attention.value_length", false, hp->head_dim, 2, MODEL_MAX_HEAD_DIM, &vlen,
                     err, err_len)))
        return rc;
    if (vlen != hp->head_dim || (hp->head_dim & 1)) {
        model__errf(err, err_len, "head dimension %u (value %u) must be even and equal",
                    hp->head_dim, vlen);
        return KVS_EFORMAT;
    }
    if ((rc = hp_u32(m, "rope.dimension_count", false, hp->head_dim, 2, hp->head_dim, &hp->n_rot,
                     err, err_len)))
        return rc;
    if (hp->n_rot & 1) {
        model__errf(err, err_len, "rope.dimension_count %u must be even", hp->n_rot);
        return KVS_EFORMAT;
    }
    if ((rc = hp_f32(m, "attention.layer_norm_rms_epsilon", true, 0, 1e-12f, 0.1f, &hp->rms_eps,
                     err, err_len)) ||
        (rc = hp_f32(m, "rope.freq_base", false, 10000.0f, 1e-3f, 1e12f, &hp->rope_freq_base, err,
                     err_len)))
        return rc;

    hp->rope_freq_scale = 1.0f;
    char key[128];
    snprintf(key, sizeof key, "%s.rope.scaling.type", hp->arch);
    model_gguf_str_t stype;
    bool linear = true;
    if (model_gguf_get_str(m->gguf, key, &stype) == 0) {
        if (strcmp(stype.ptr, "none") == 0) {
            linear = false;
        } else if (strcmp(stype.ptr, "llama3") == 0) {
            /* Llama 3.1 scaling lives in rope_freqs.weight (checked at bind). */
            linear = false;
            m->rope_llama3 = true;
        } else if (strcmp(stype.ptr, "linear") != 0) {
            model__errf(err, err_len, "key '%s' = '%.32s' is not supported (none, linear, llama3)",
                        key, stype.ptr);
            return KVS_ENOTSUP;
        }
    }
    float factor = 1.0f;
    if ((rc = hp_f32(m, "rope.scaling.factor", false, 1.0f, 1e-3f, 1e6f, &factor, err, err_len)))
        return rc;
    if (factor == 1.0f &&
        (rc = hp_f32(m, "rope.scale_linear", false, 1.0f, 1e-3f, 1e6f, &factor, err, err_len)))
        return rc;
    if (linear)
        hp->rope_freq_scale = 1.0f / factor;

    bool rnd = false;
    hp->is_random = model_gguf_get_bool(m->gguf, "kvserve.random", &rnd) == 0 && rnd;
    return 0;
}

/* Binds tensor `name` after checking it is 2-D (n_rows x n_cols; n_rows 1
 * for vectors), of a type the backend can use for `op`. */
static int
bind(model_t *m, const char *name, uint32_t n_cols, uint32_t n_rows, bool optional, bool f32_only,
     kern_tensor_t *out, char *err, size_t err_len)
{
    memset(out, 0, sizeof *out);
    const model_gguf_tensor_t *t = model_gguf_find_tensor(m->gguf, name);
    if (t == NULL) {
        if (optional)
            return 0;
        model__errf(err, err_len, "tensor '%s' is missing", name);
        return KVS_EFORMAT;
    }
    if (t->ne[0] != n_cols || t->ne[1] != n_rows || t->ne[2] != 1 || t->ne[3] != 1) {
        model__errf(err, err_len,
                    "tensor '%s' has shape [%llu, %llu, %llu, %llu], expected [%u, %u]", name,
                    (unsigned long long)t->ne[0], (unsigned long long)t->ne[1],
                    (unsigned long long)t->ne[2], (unsigned long long)t->ne[3], n_cols, n_rows);
        return KVS_EFORMAT;
    }
    const kern_type_traits_t *tr = kern_type_traits(t->type);
    if (f32_only && t->type != KERN_F32) {
        model__errf(err, err_len, "tensor '%s' has type %s, expected f32", name,
                    tr ? tr->name : "?");
        return KVS_EFORMAT;
    }
    kern_op_t op = n_rows == 1 ? KERN_OP_GET_ROWS : KERN_OP_MATMUL;
    if (!f32_only && !kern_supports(m->be, op, (kern_dtype_t)t->type)) {
        model__errf(err, err_len, "tensor '%s' has type %s, not supported by the %s backend", name,
                    tr ? tr->name : "?", kern_backend_name(m->be));
        return KVS_ENOTSUP;
    }
    out->type = (kern_dtype_t)t->type;
    out->n_cols = n_cols;
    out->n_rows = n_rows;
    out->row_bytes = kern_row_bytes(t->type, n_cols);
    out->data = t->data;
    if (m->host_copy)
        out->data = m->host_copy + ((const char *)t->data - m->host_src);
    if (!kern_backend_is_host(m->be)) {
        void **bufs = realloc(m->device_bufs, (m->n_device_bufs + 1) * sizeof *bufs);
        if (bufs == NULL)
            return KVS_ENOMEM;
        m->device_bufs = bufs;
        void *d = kern_alloc(m->be, t->nbytes);
        if (d == NULL) {
            model__errf(err, err_len, "tensor '%s': device allocation of %zu bytes failed", name,
                        t->nbytes);
            return KVS_ENOMEM;
        }
        m->device_bufs[m->n_device_bufs++] = d;
        int rc = kern_upload(m->be, d, t->data, t->nbytes);
        if (rc)
            return rc;
        out->data = d;
    }
    return 0;
}

static int
bind_weights(model_t *m, char *err, size_t err_len)
{
    model_hparams_t *hp = &m->hp;
    const model_gguf_tensor_t *te = model_gguf_find_tensor(m->gguf, "token_embd.weight");
    if (te == NULL) {
        model__errf(err, err_len, "tensor 'token_embd.weight' is missing");
        return KVS_EFORMAT;
    }
    if (te->ne[1] < 1 || te->ne[1] > (1u << 24)) {
        model__errf(err, err_len, "tensor 'token_embd.weight': vocabulary of %llu rows",
                    (unsigned long long)te->ne[1]);
        return KVS_EFORMAT;
    }
    hp->n_vocab = (uint32_t)te->ne[1];
    uint32_t d = hp->n_embd, q_dim = hp->n_head * hp->head_dim,
             kv_dim = hp->n_head_kv * hp->head_dim;
    int rc;
    if ((rc = bind(m, "token_embd.weight", d, hp->n_vocab, false, false, &m->tok_embd, err,
                   err_len)) ||
        (rc = bind(m, "output_norm.weight", d, 1, false, true, &m->output_norm, err, err_len)) ||
        (rc = bind(m, "output.weight", d, hp->n_vocab, true, false, &m->output, err, err_len)))
        return rc;
    if (m->output.data == NULL) {
        hp->tied_output = true;
        if (!kern_supports(m->be, KERN_OP_MATMUL, m->tok_embd.type)) {
            model__errf(err, err_len, "tied output: token_embd.weight type not supported");
            return KVS_ENOTSUP;
        }
        m->output = m->tok_embd;
    }

    const model_gguf_tensor_t *rf = model_gguf_find_tensor(m->gguf, "rope_freqs.weight");
    if (rf) {
        if (rf->type != KERN_F32 || rf->ne[0] != hp->n_rot / 2 || rf->ne[1] != 1 ||
            rf->ne[2] != 1 || rf->ne[3] != 1) {
            model__errf(err, err_len, "tensor 'rope_freqs.weight' must be f32 [%u]", hp->n_rot / 2);
            return KVS_EFORMAT;
        }
        m->rope_freqs = malloc(hp->n_rot / 2 * sizeof(float));
        if (m->rope_freqs == NULL)
            return KVS_ENOMEM;
        memcpy(m->rope_freqs, rf->data, hp->n_rot / 2 * sizeof(float));
        for (uint32_t i = 0; i < hp->n_rot / 2; i++) {
            if (!isfinite(m->rope_freqs[i]) || m->rope_freqs[i] <= 0.0f) {
                model__errf(err, err_len, "tensor 'rope_freqs.weight': factor %u is not > 0", i);
                return KVS_EFORMAT;
            }
        }
        hp->has_rope_freqs = true;
    }
    if (m->rope_llama3 && !hp->has_rope_freqs) {
        model__errf(err, err_len,
                    "llama3 RoPE scaling needs the tensor 'rope_freqs.weight' (convert the model "
                    "with a current llama.cpp)");
        return KVS_EFORMAT;
    }

    m->layers = calloc(hp->n_layer, sizeof *m->layers);
    if (m->layers == NULL)
        return KVS_ENOMEM;
    bool qwen2 = strcmp(hp->arch, "qwen2") == 0;
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        model_layer_t *L = &m->layers[l];
        char name[64];
#define BIND(field, suffix, cols, rows, opt, f32)                                \
    do {                                                                         \
        snprintf(name, sizeof name, "blk.%u." suffix, l);                        \
        if ((rc = bind(m, name, cols, rows, opt, f32, &L->field, err, err_len))) \
            return rc;                                                           \
    } while (0)
        BIND(attn_norm, "attn_norm.weight", d, 1, false, true);
        BIND(wq, "attn_q.weight", d, q_dim, false, false);
        BIND(wk, "attn_k.weight", d, kv_dim, false, false);
        BIND(wv, "attn_v.weight", d, kv_dim, false, false);
        BIND(wo, "attn_output.weight", q_dim, d, false, false);
        BIND(bq, "attn_q.bias", q_dim, 1, !qwen2, true);
        BIND(bk, "attn_k.bias", kv_dim, 1, !qwen2, true);
        BIND(bv, "attn_v.bias", kv_dim, 1, !qwen2, true);
        BIND(ffn_norm, "ffn_norm.weight", d, 1, false, true);
        BIND(w_gate, "ffn_gate.weight", d, hp->n_ff, false, false);
        BIND(w_up, "ffn_up.weight", d, hp->n_ff, false, false);
        BIND(w_down, "ffn_down.weight", hp->n_ff, d, false, false);
#undef BIND
        if ((L->bq.data != NULL) != (L->bk.data != NULL) ||
            (L->bq.data != NULL) != (L->bv.data != NULL)) {
            model__errf(err, err_len, "layer %u: q/k/v biases must be all present or absent", l);
            return KVS_EFORMAT;
        }
        if (L->bq.data)
            hp->has_bias = true;
    }
    /* A file that declares fewer layers than it carries is inconsistent. */
    char extra[64];
    snprintf(extra, sizeof extra, "blk.%u.attn_norm.weight", hp->n_layer);
    if (model_gguf_find_tensor(m->gguf, extra)) {
        model__errf(err, err_len, "tensor '%s' exists but block_count is %u", extra, hp->n_layer);
        return KVS_EFORMAT;
    }
    hp->wtype = m->layers[0].wq.type;
    return 0;
}

/* Host backends stream every weight once per decode step.  Reading them
 * from the file mapping costs a TLB miss per 4 KiB page; a private copy in
 * transparent huge pages reads at close to full memory bandwidth, and is
 * writable, so the backend can pack weights into its own layout.  The page
 * cache behind the mapping can then be reclaimed by the kernel. */
static int
copy_weights_to_huge_pages(model_t *m)
{
    uint32_t n = model_gguf_n_tensors(m->gguf);
    const char *lo = NULL, *hi = NULL;
    for (uint32_t i = 0; i < n; i++) {
        const model_gguf_tensor_t *t = model_gguf_tensor(m->gguf, i);
        const char *a = t->data, *b = a + t->nbytes;
        if (!lo || a < lo)
            lo = a;
        if (!hi || b > hi)
            hi = b;
    }
    if (lo == NULL || hi == lo)
        return 0;
    const size_t huge = 2u << 20;
    size_t len = ((size_t)(hi - lo) + huge - 1) / huge * huge;
    void *p = mmap(NULL, len + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return KVS_ENOMEM;
    /* Align the start to 2 MiB so whole huge pages back the copy; the
     * offset keeps every tensor's alignment (lo is 32-byte aligned). */
    char *base = (char *)(((uintptr_t)p + huge - 1) & ~(uintptr_t)(huge - 1));
    madvise(base, len, MADV_HUGEPAGE);
    memcpy(base, lo, (size_t)(hi - lo));
    m->host_map = p;
    m->host_map_len = len + huge;
    m->host_copy = base;
    m->host_src = lo;
    return 0;
}

/* Lets the backend rewrite each matrix of the private copy into the layout
 * its matmul reads fastest (for the cpu backend, Q8_0 in 16-row panels).
 * A tied output is the token embedding: packed once, then copied. */
static int
pack_weights(model_t *m)
{
    int rc = kern_pack_weight(m->be, &m->tok_embd);
    if (rc)
        return rc;
    if (m->hp.tied_output)
        m->output = m->tok_embd;
    else if ((rc = kern_pack_weight(m->be, &m->output)))
        return rc;
    for (uint32_t l = 0; l < m->hp.n_layer; l++) {
        model_layer_t *L = &m->layers[l];
        kern_tensor_t *ws[] = {&L->wq, &L->wk, &L->wv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (size_t i = 0; i < sizeof ws / sizeof ws[0]; i++)
            if ((rc = kern_pack_weight(m->be, ws[i])))
                return rc;
    }
    return 0;
}

int
model_load(const char *path, kern_backend_t *be, model_t **out, char *err, size_t err_len)
{
    *out = NULL;
    model_t *m = calloc(1, sizeof *m);
    if (m == NULL)
        return KVS_ENOMEM;
    m->be = be;
    int rc = model_gguf_open(path, &m->gguf, err, err_len);
    if (rc == 0)
        rc = read_hparams(m, err, err_len);
    if (rc == 0 && kern_backend_is_host(be))
        rc = copy_weights_to_huge_pages(m);
    if (rc == 0)
        rc = bind_weights(m, err, err_len);
    if (rc == 0 && m->host_copy)
        rc = pack_weights(m);
    if (rc == 0)
        rc = model__tokenizer_init(m, err, err_len);
    if (rc != 0) {
        if (rc == KVS_ENOMEM && err && err[0] == '\0')
            model__errf(err, err_len, "out of memory while loading the model");
        model_free(m);
        return rc;
    }
    *out = m;
    return 0;
}

void
model_free(model_t *m)
{
    if (m == NULL)
        return;
    for (uint32_t i = 0; i < m->n_device_bufs; i++)
        kern_free(m->be, m->device_bufs[i]);
    free(m->device_bufs);
    model__guides_free(m);
    model__pieces_free(m);
    model__tokenizer_free(m);
    free(m->layers);
    free(m->rope_freqs);
    if (m->host_map)
        munmap(m->host_map, m->host_map_len);
    model_gguf_close(m->gguf);
    free(m);
}

const model_hparams_t *
model_hparams(const model_t *m)
{
    return &m->hp;
}

const model_gguf_t *
model_gguf(const model_t *m)
{
    return m->gguf;
}

kern_backend_t *
model_backend(const model_t *m)
{
    return m->be;
}

size_t
model_kv_bytes_per_token(const model_t *m, kern_dtype_t kv_dtype)
{
    size_t el = kv_dtype == KERN_F16 ? 2 : 4;
    return 2 * (size_t)m->hp.n_head_kv * m->hp.head_dim * el;
}

static size_t
tensor_bytes(const kern_tensor_t *t)
{
    return t->data ? t->row_bytes * t->n_rows : 0;
}

size_t
model_weight_bytes_per_token(const model_t *m)
{
    size_t b = tensor_bytes(&m->output) + tensor_bytes(&m->output_norm);
    for (uint32_t l = 0; l < m->hp.n_layer; l++) {
        const model_layer_t *L = &m->layers[l];
        b += tensor_bytes(&L->attn_norm) + tensor_bytes(&L->wq) + tensor_bytes(&L->wk) +
             tensor_bytes(&L->wv) + tensor_bytes(&L->wo) + tensor_bytes(&L->bq) +
             tensor_bytes(&L->bk) + tensor_bytes(&L->bv) + tensor_bytes(&L->ffn_norm) +
             tensor_bytes(&L->w_gate) + tensor_bytes(&L->w_up) + tensor_bytes(&L->w_down);
    }
    return b;
}
