/*
 * model/forward.c — the Llama forward pass over a batch of sequences whose
 * KV lives in the paged cache.  One call takes any mix of prefill chunks and
 * decode tokens (continuous batching): every matrix product runs once over
 * all the batch's tokens, and only attention looks at sequence boundaries.
 *
 *   x = embd[tokens]
 *   per layer:  h = rmsnorm(x) ; q,k,v = h W (+b) ; rope(q,k) at pos
 *               kv_append(k,v -> slots) ; a = attention(q, paged KV)
 *               x += a Wo ; h = rmsnorm(x) ; x += (silu(h Wg) * h Wu) Wd
 *   logits = rmsnorm(x[logit_rows]) Wout
 *
 * In the last layer only the rows whose logits are wanted go past
 * attention (their K/V are still written for every token).  Sequences
 * whose prompt rows have a sparse prefill policy (model_attn_policy_t)
 * attend one at a time, and the sequences between them that only decode
 * (Quest's or dense) a run per call: the sparse pattern runs in the
 * kernel, Delta Attention's dense rows and correction and the block
 * choices' plans (Quest bounds) here.
 * Called by sched/ and benchmarks; runs on the engine thread.
 */
#include "model_int.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

/* kern_attn_args_t.pt_epoch and kern_rope_args_t.epoch: one number per
 * forward pass, unique in the process (contexts of two models may share a
 * backend). */
static atomic_uint_fast64_t g_epoch;

/* One decode run of a step's plan (quest_plan): the run decode_run gets
 * in every layer, where its slabs' lists lie, and the blocks it
 * summarises again. */
typedef struct qp_run {
    uint32_t s0, s1, first, n;
    size_t slab_at; /* its slabs' entries in qp_slab */
    size_t ptr_at;  /* its slabs' offsets in qp_ptr, (slab + 1) each */
    size_t todo_at; /* its stale blocks in qp_todo */
    uint32_t n_todo;
} qp_run_t;

struct model_ctx {
    model_t *m;
    kern_backend_t *be;
    uint32_t max_tokens;
    uint32_t max_logits;
    float *x, *h, *q, *k, *v, *att, *gate, *up;
    float *lx, *lh, *logits; /* last-layer rows and logits */
    int32_t *row_q_indptr;   /* host scratch for the last layer */
    int32_t *row_kv_len;
    /* Delta Attention scratch: the dense rows' queries and outputs in
     * backend memory, their rows and limits on the host.  Sized by
     * model_ctx_reserve, else on first use. */
    float *dq, *dout;
    int32_t *drows, *dkv;
    size_t d_cap;
    /* Block-sparse scratch, sized by model_ctx_reserve, else grown on
     * demand.  The block summaries, the scores' work space, the scores and
     * the mask chosen from them are backend memory (caps in floats): the
     * choice is made where the scores lie (kern_block_select), so nothing
     * comes to the host. */
    float *bs_w, *bs_work, *bs_dscore, *bs_mask;
    size_t bs_w_cap, bs_work_cap, bs_dscore_cap, bs_mask_cap;
    uint32_t *bs_ends; /* per query block: its candidates' end */
    size_t bs_ends_cap;
    /* A run of decode sequences' call (decode_run): its own q_indptr and
     * table indptr (one array), each row's k, and which rows are dense. */
    int32_t *dr_qi;
    uint32_t *dr_k;
    uint8_t *dr_dense;
    int32_t *dr_list; /* a slab's candidate blocks, row after row */
    uint32_t *dr_ptr; /* where each row starts in dr_list */
    size_t dr_seq_cap, dr_k_cap, dr_dense_cap, dr_list_cap, dr_ptr_cap;
    /* Quest's key summaries kept by block id across calls (bs_store):
     * a block is summarised when its kern_kv_t.block_gen changes, not at
     * every step that scores it.  Sized for one pool on first use. */
    uint16_t *sum;     /* backend f16, [n_layers][n_kv][sum_blocks][2 * head_dim] */
    uint64_t *sum_gen; /* [n_layers][sum_blocks]: block_gen summarised, 0 none */
    int32_t *sum_todo; /* [sum_blocks]: blocks a call summarises */
    uint32_t sum_blocks, sum_layers;
    /* Quest's plan of a step (quest_plan): every decode run's candidate
     * lists, made and uploaded once for the layers that read them alike
     * (from MODEL_DECODE_DENSE_LAYERS to the last but one; the last takes
     * only the logit rows), and the blocks whose summaries those layers
     * take again.  Made per layer, they cost the host a walk of every
     * list and a device copy of them in each layer. */
    uint64_t qp_epoch; /* the step planned (kern_attn_args_t.pt_epoch); 0 none */
    uint64_t *qp_mark; /* [sum_blocks]: the step a block went on a todo list */
    qp_run_t *qp_run;
    int32_t *qp_list; /* host copy of the lists, slab after slab */
    uint32_t *qp_ptr; /* each slab's per-row offsets, from 0 */
    size_t *qp_slab;  /* each slab's first entry in qp_list */
    int32_t *qp_todo; /* stale blocks, each once a step */
    float *qp_dev;    /* backend: qp_list, then qp_ptr */
    size_t qp_n, qp_list_n, qp_ptr_n, qp_slab_n, qp_todo_n;
    size_t qp_run_cap, qp_list_cap, qp_ptr_cap, qp_slab_cap, qp_todo_cap, qp_dev_cap;
    bool sum_off;        /* no memory for them: summaries per call */
    bool reserved;       /* model_ctx_reserve ran */
    uint32_t late_grows; /* scratch grown after it (model_ctx_late_grows) */
    void **bufs;
    uint32_t n_bufs;
    bool graphs; /* decode steps through kern_graph_run (model_ctx_set_graphs) */
};

static void bs_store_free(model_ctx_t *c);

static float *
ws_alloc(model_ctx_t *c, size_t n_floats, int *rc)
{
    size_t bytes;
    if (*rc)
        return NULL;
    if (kvs_mul_size(n_floats ? n_floats : 1, sizeof(float), &bytes)) {
        *rc = KVS_ENOMEM;
        return NULL;
    }
    void *p = kern_alloc(c->be, bytes);
    if (p == NULL) {
        *rc = KVS_ENOMEM;
        return NULL;
    }
    c->bufs[c->n_bufs++] = p;
    return p;
}

void
model_ctx_set_graphs(model_ctx_t *c, bool on)
{
    c->graphs = on;
}

int
model_ctx_new(model_t *m, uint32_t max_tokens, uint32_t max_logits, model_ctx_t **out)
{
    *out = NULL;
    if (max_tokens == 0 || max_logits == 0 || max_logits > max_tokens)
        return KVS_EINVAL;
    model_ctx_t *c = calloc(1, sizeof *c);
    if (c == NULL)
        return KVS_ENOMEM;
    c->bufs = calloc(16, sizeof *c->bufs);
    if (c->bufs == NULL) {
        free(c);
        return KVS_ENOMEM;
    }
    c->m = m;
    c->be = m->be;
    c->max_tokens = max_tokens;
    c->max_logits = max_logits;
    const model_hparams_t *hp = &m->hp;
    size_t T = max_tokens, L = max_logits;
    size_t qd = (size_t)hp->n_head * hp->head_dim, kvd = (size_t)hp->n_head_kv * hp->head_dim;
    int rc = 0;
    c->x = ws_alloc(c, T * hp->n_embd, &rc);
    c->h = ws_alloc(c, T * (hp->n_embd > qd ? hp->n_embd : qd), &rc);
    c->q = ws_alloc(c, T * qd, &rc);
    c->k = ws_alloc(c, T * kvd, &rc);
    c->v = ws_alloc(c, T * kvd, &rc);
    c->att = ws_alloc(c, T * qd, &rc);
    c->gate = ws_alloc(c, T * hp->n_ff, &rc);
    c->up = ws_alloc(c, T * hp->n_ff, &rc);
    c->lx = ws_alloc(c, L * hp->n_embd, &rc);
    c->lh = ws_alloc(c, L * (hp->n_embd > qd ? hp->n_embd : qd), &rc);
    c->logits = ws_alloc(c, L * hp->n_vocab, &rc);
    if (rc == 0) {
        c->row_q_indptr = malloc((L + 1) * sizeof(int32_t));
        c->row_kv_len = malloc(L * sizeof(int32_t));
        if (!c->row_q_indptr || !c->row_kv_len)
            rc = KVS_ENOMEM;
    }
    if (rc) {
        model_ctx_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

void
model_ctx_free(model_ctx_t *c)
{
    if (c == NULL)
        return;
    for (uint32_t i = 0; i < c->n_bufs; i++)
        kern_free(c->be, c->bufs[i]);
    free(c->bufs);
    free(c->row_q_indptr);
    free(c->row_kv_len);
    kern_free(c->be, c->dq);
    kern_free(c->be, c->dout);
    free(c->drows);
    free(c->dkv);
    kern_free(c->be, c->bs_w);
    kern_free(c->be, c->bs_work);
    kern_free(c->be, c->bs_dscore);
    kern_free(c->be, c->bs_mask);
    free(c->bs_ends);
    free(c->dr_qi);
    free(c->dr_list);
    free(c->dr_ptr);
    free(c->dr_k);
    free(c->dr_dense);
    free(c->qp_run);
    free(c->qp_list);
    free(c->qp_ptr);
    free(c->qp_slab);
    free(c->qp_todo);
    kern_free(c->be, c->qp_dev);
    bs_store_free(c);
    free(c);
}

static int
check_batch(const model_ctx_t *c, const kern_kv_t *kv, const model_batch_t *b)
{
    const model_hparams_t *hp = &c->m->hp;
    if (!kv || kv->n_layers != hp->n_layer || kv->n_kv_heads != hp->n_head_kv ||
        kv->head_dim != hp->head_dim)
        return KVS_EINVAL;
    if (b->n_tokens == 0 || b->n_tokens > c->max_tokens || b->n_logits > c->max_logits ||
        !b->tokens || !b->pos || !b->slots || !b->kv_len || !b->seq_indptr ||
        (b->n_logits && !b->logit_rows) || b->pt.n_seqs == 0)
        return KVS_EINVAL;
    if (b->seq_indptr[0] != 0 || (uint32_t)b->seq_indptr[b->pt.n_seqs] != b->n_tokens)
        return KVS_EINVAL;
    for (uint32_t s = 0; s < b->pt.n_seqs; s++)
        if (b->seq_indptr[s + 1] < b->seq_indptr[s])
            return KVS_EINVAL;
    for (uint32_t i = 0; i < b->n_logits; i++) {
        if (b->logit_rows[i] < 0 || (uint32_t)b->logit_rows[i] >= b->n_tokens)
            return KVS_EINVAL;
        /* The last layer keeps rows in this order and attends per sequence,
         * so rows must ascend. */
        if (i > 0 && b->logit_rows[i] <= b->logit_rows[i - 1])
            return KVS_EINVAL;
    }
    if (b->n_capture && (!b->capture_rows || !b->capture_q))
        return KVS_EINVAL;
    for (uint32_t i = 0; i < b->n_capture; i++)
        if (b->capture_rows[i] < 0 || (uint32_t)b->capture_rows[i] >= b->n_tokens)
            return KVS_EINVAL;
    return 0;
}

/* Rows of `src` ([n][cols], backend memory) picked by `rows` into dst. */
static int
gather_rows(kern_backend_t *be, const float *src, uint32_t n, uint32_t cols, const int32_t *rows,
            uint32_t n_rows, float *dst)
{
    kern_tensor_t view = {KERN_F32, cols, n, (size_t)cols * sizeof(float), src, KERN_LAYOUT_ROWS};
    return kern_get_rows(be, &view, rows, n_rows, dst);
}

#define TRY(x)          \
    do {                \
        int rc_ = (x);  \
        if (rc_)        \
            return rc_; \
    } while (0)

int
model_attn_policy_check(const model_attn_policy_t *p)
{
    switch (p->kind) {
    case MODEL_ATTN_DENSE:
        return 0;
    case MODEL_ATTN_SINK_WINDOW:
        return p->window >= 1 && !p->no_tail ? 0 : KVS_EINVAL;
    case MODEL_ATTN_DELTA:
        /* A dense last row only without the tail (which already holds it):
         * the ablation that isolates the correction itself. */
        return p->window >= 1 && p->gamma >= 1 && (!p->last_dense || p->no_tail) ? 0 : KVS_EINVAL;
    case MODEL_ATTN_BLOCK_SPARSE:
        return p->window >= 1 && p->top_k >= 1 && !p->no_tail && !p->last_dense ? 0 : KVS_EINVAL;
    default:
        return KVS_EINVAL;
    }
}

/* a restricted to rows [r0, r0 + n) of its sequence s (a has one q_indptr
 * entry per sequence of the page table). */
static kern_attn_args_t
one_seq(const kern_attn_args_t *a, uint32_t s, uint32_t r0, uint32_t n, uint32_t qd,
        int32_t q_indptr[2], int32_t pt_indptr[2])
{
    kern_attn_args_t o = *a;
    o.pt_epoch = 0; /* another table than a's */
    q_indptr[0] = 0;
    q_indptr[1] = (int32_t)n;
    pt_indptr[0] = 0;
    pt_indptr[1] = a->pt.indptr[s + 1] - a->pt.indptr[s];
    o.q = a->q + (size_t)r0 * qd;
    o.out = a->out + (size_t)r0 * qd;
    o.n_q = n;
    o.q_indptr = q_indptr;
    o.kv_len = a->kv_len + r0;
    o.dense_rows = a->dense_rows ? a->dense_rows + r0 : NULL;
    o.pt.indptr = pt_indptr;
    o.pt.indices = a->pt.indices + a->pt.indptr[s];
    o.pt.last_len = a->pt.last_len + s;
    o.pt.n_seqs = 1;
    return o;
}

/* Counts (and warns once of) growth a reservation did not foresee: on a
 * device it frees and allocates in the middle of a step. */
static void
late_grow(model_ctx_t *c, const char *what, size_t n)
{
    if (!c->reserved)
        return;
    if (c->late_grows++ == 0)
        KVS_WARNF("model: %s grows to %zu beyond model_ctx_reserve's sizes", what, n);
}

/* Delta's buffers for `rows` rows: the dense rows' queries and outputs in
 * backend memory, their row numbers and causal limits on the host. */
static int
delta_scratch(model_ctx_t *c, size_t rows, size_t qd)
{
    if (rows <= c->d_cap)
        return 0;
    late_grow(c, "Delta Attention's scratch", rows);
    size_t bytes;
    if (kvs_mul_size(rows * qd, sizeof(float), &bytes))
        return KVS_ENOMEM;
    kern_free(c->be, c->dq);
    kern_free(c->be, c->dout);
    c->dq = kern_alloc(c->be, bytes);
    c->dout = kern_alloc(c->be, bytes);
    int32_t *dr = realloc(c->drows, rows * sizeof(int32_t));
    if (dr)
        c->drows = dr;
    int32_t *dk = realloc(c->dkv, rows * sizeof(int32_t));
    if (dk)
        c->dkv = dk;
    c->d_cap = c->dq && c->dout && dr && dk ? rows : 0;
    return c->d_cap ? 0 : KVS_ENOMEM;
}

uint32_t
model_delta_tail(uint32_t n, const model_attn_policy_t *p)
{
    const uint32_t g = p->gamma ? p->gamma : 1;
    if (p->no_tail)
        return 0;
    uint32_t tail = n % g + (g > 128 ? g : 128);
    return tail < n ? tail : n;
}

uint32_t
model_delta_rows(uint32_t n, const model_attn_policy_t *p, int32_t *rows)
{
    const uint32_t g = p->gamma ? p->gamma : 1, tail = model_delta_tail(n, p);
    uint32_t nd = 0;
    for (uint32_t r = 0; r < n - tail; r += g)
        rows[nd++] = (int32_t)r;
    for (uint32_t r = n - tail; r < n; r++)
        rows[nd++] = (int32_t)r;
    return nd;
}

/* Delta Attention over the N prompt rows of one sequence call `o`, whose
 * sparse outputs are already in o->out: dense attention for the rows
 * model_delta_rows picks (their queries gathered on the backend), then
 * kern_delta_apply. */
static int
delta_correct(model_ctx_t *c, const kern_attn_args_t *o, const model_attn_policy_t *p, uint32_t qd)
{
    const uint32_t N = o->n_q;
    TRY(delta_scratch(c, (size_t)N, qd));
    uint32_t nd = model_delta_rows(N, p, c->drows);
    for (uint32_t i = 0; i < nd; i++)
        c->dkv[i] = o->kv_len[c->drows[i]];
    TRY(gather_rows(c->be, o->q, N, qd, c->drows, nd, c->dq));
    int32_t qi[2] = {0, (int32_t)nd};
    kern_attn_args_t dense = *o;
    dense.q = c->dq;
    dense.out = c->dout;
    dense.n_q = nd;
    dense.q_indptr = qi;
    dense.kv_len = c->dkv;
    dense.sink_tokens = dense.window_tokens = 0;
    dense.block_mask = NULL;
    dense.dense_rows = NULL;
    TRY(kern_attention(c->be, &dense));
    return kern_delta_apply(c->be, o->out, c->dout, N, qd, p->gamma ? p->gamma : 1,
                            model_delta_tail(N, p));
}

/* ---- block-sparse prefill (Quest bounds) -------------------------------- */

/* Query rows scored per kern_block_scores: enough rows for a GEMM to pay, few
 * enough that the bounds ([rows * G][blocks]) stay small at long contexts. */
#define BS_SLAB_ROWS 256
/* Query rows a block-sparse attention call takes at most: its mask is
 * (rows / block_tokens) * (KV heads) * (blocks) bytes. */
#define BS_ATTN_ROWS 4096

/* Query blocks (or decode rows) scored a slab at a time. */
static uint32_t
bs_slab_q(uint32_t bt)
{
    return BS_SLAB_ROWS / bt ? BS_SLAB_ROWS / bt : 1;
}

/* Query blocks an attention call of block_sparse takes, of nq: whole
 * slabs, or all nq. */
static uint32_t
bs_call_q(uint32_t bt, uint32_t nq)
{
    const uint32_t slab_q = bs_slab_q(bt);
    uint32_t call_q = BS_ATTN_ROWS / bt / slab_q * slab_q;
    call_q = call_q < slab_q ? slab_q : call_q;
    return call_q > nq ? nq : call_q;
}

/* Mask rows model_ctx_reserve sizes for: the most a block_sparse call
 * takes, and a decode run's rows (decode_run). */
static uint32_t
bs_mask_rows(const model_ctx_t *c, uint32_t bt)
{
    const uint32_t call_q = bs_call_q(bt, (c->max_tokens + bt - 1) / bt);
    return call_q ? call_q : 1;
}

static int
bs_grow_be(model_ctx_t *c, float **p, size_t *cap, size_t n)
{
    if (n <= *cap)
        return 0;
    late_grow(c, "block-sparse scratch", n);
    size_t bytes;
    if (kvs_mul_size(n, sizeof(float), &bytes))
        return KVS_ENOMEM;
    kern_free(c->be, *p);
    *p = kern_alloc(c->be, bytes);
    *cap = *p ? n : 0;
    return *p ? 0 : KVS_ENOMEM;
}

/* Floats that hold `bytes` bytes: the mask and the (f16) bounds share
 * bs_grow_be. */
static size_t
bs_floats(size_t bytes)
{
    return bytes / sizeof(float) + 1;
}

/* The per-call bounds of n_kv heads x nw blocks of head dimension d. */
static size_t
bs_w_floats(uint32_t n_kv, uint32_t nw, uint32_t d)
{
    return bs_floats((size_t)n_kv * nw * 2 * d * sizeof(uint16_t));
}

static int
bs_grow(void **p, size_t *cap, size_t n, size_t el)
{
    if (n <= *cap)
        return 0;
    void *q = realloc(*p, (n ? n : 1) * el);
    if (q == NULL)
        return KVS_ENOMEM;
    *p = q;
    *cap = n;
    return 0;
}

static void
bs_store_free(model_ctx_t *c)
{
    kern_free(c->be, c->sum);
    free(c->sum_gen);
    free(c->sum_todo);
    free(c->qp_mark);
    c->sum = NULL;
    c->sum_gen = NULL;
    c->sum_todo = NULL;
    c->qp_mark = NULL;
    c->sum_blocks = 0;
    c->qp_epoch = 0;
}

/* The summary store for kv's pool: 0, KVS_ENOMEM (nothing kept). */
static int
bs_store_alloc(model_ctx_t *c, const kern_kv_t *kv, size_t *bytes)
{
    bs_store_free(c);
    const size_t P = kv->n_blocks, L = kv->n_layers;
    size_t floats;
    if (kvs_mul_size(L * kv->n_kv_heads, P * 2 * kv->head_dim, &floats) ||
        kvs_mul_size(floats, sizeof(uint16_t), bytes))
        return KVS_ENOMEM;
    c->sum = kern_alloc(c->be, *bytes);
    c->sum_gen = calloc(L * P, sizeof *c->sum_gen);
    c->sum_todo = malloc(P * sizeof *c->sum_todo);
    c->qp_mark = calloc(P, sizeof *c->qp_mark);
    if (c->sum == NULL || c->sum_gen == NULL || c->sum_todo == NULL || c->qp_mark == NULL) {
        bs_store_free(c);
        return KVS_ENOMEM;
    }
    c->sum_blocks = kv->n_blocks;
    c->sum_layers = kv->n_layers;
    KVS_INFOF("model: keeping block-sparse key summaries of %zu KV blocks (%zu MiB)", P,
              *bytes >> 20);
    return 0;
}

/* The summary store, sized for kv's pool by model_ctx_reserve or on first
 * use; false where the pool gives no block_gen or the memory is not there
 * (then block_sparse summarises per call, as a store-less caller would). */
static bool
bs_store_ready(model_ctx_t *c, const kern_kv_t *kv)
{
    if (kv->block_gen == NULL || c->sum_off)
        return false;
    if (c->sum && c->sum_blocks == kv->n_blocks && c->sum_layers == kv->n_layers)
        return true;
    late_grow(c, "the block-sparse key summaries", kv->n_blocks);
    size_t bytes = 0;
    if (bs_store_alloc(c, kv, &bytes) == 0)
        return true;
    KVS_WARNF("model: no memory for the key summaries of %u KV blocks (%zu MiB); "
              "block-sparse attention summarises its candidates at every call",
              kv->n_blocks, bytes >> 20);
    c->sum_off = true;
    return false;
}

/* Summarises todo[0..m) (distinct, stale) of `layer` into the store and
 * sets *out to the layer's store ([n_kv][sum_blocks][2d], rows by block
 * id). */
static int
bs_store_put(model_ctx_t *c, const kern_kv_t *kv, uint32_t layer, const int32_t *todo, uint32_t m,
             const uint16_t **out)
{
    const size_t P = c->sum_blocks;
    uint64_t *tag = c->sum_gen + (size_t)layer * P;
    for (uint32_t k = 0; k < m; k++)
        tag[todo[k]] = kv->block_gen[todo[k]];
    uint16_t *base = c->sum + (size_t)layer * kv->n_kv_heads * P * 2 * kv->head_dim;
    int rc = kern_kv_pool_bounds(c->be, kv, layer, todo, m, base);
    if (rc) {
        for (uint32_t k = 0; k < m; k++)
            tag[todo[k]] = 0;
        return rc;
    }
    *out = base;
    return 0;
}

/* Brings the stored summaries of blocks[0..n) of `layer` up to date and
 * sets *out to the layer's store, or to NULL where there is none.  Only
 * blocks whose block_gen moved since they were summarised are read: at
 * decode, one block in block_tokens steps, where summarising every
 * candidate read half the KV each step. */
static int
bs_store(model_ctx_t *c, const kern_kv_t *kv, uint32_t layer, const int32_t *blocks, uint32_t n,
         const uint16_t **out)
{
    *out = NULL;
    if (!bs_store_ready(c, kv))
        return 0;
    const size_t P = c->sum_blocks;
    const uint64_t *tag = c->sum_gen + (size_t)layer * P;
    const uint64_t mark = atomic_fetch_add(&g_epoch, 1) + 1;
    uint32_t m = 0;
    for (uint32_t i = 0; i < n; i++) {
        const int32_t b = blocks[i];
        if (b < 0 || (size_t)b >= P)
            return KVS_EINVAL;
        if (tag[b] != kv->block_gen[b] && c->qp_mark[b] != mark) {
            c->qp_mark[b] = mark; /* a block listed twice is summarised once */
            c->sum_todo[m++] = b;
        }
    }
    return bs_store_put(c, kv, layer, c->sum_todo, m, out);
}

/* Block-sparse attention over the N prompt rows of one sequence call `o`.
 * Query block q (call rows q*bt ..) keeps the sinks, the window, every KV
 * block from its first row's own block or the first block inside all its
 * rows' windows on, and the top_k candidates below that by Quest's bound.
 * The backend summarises the candidates once, scores them a slab of
 * query blocks at a time (kern_kv_block_bounds, kern_block_scores) and
 * chooses from the scores into the mask where they lie
 * (kern_block_select): at 128K context the scores of one layer are a
 * gigabyte, which neither the bus nor a host top-k should see.  Each KV
 * head chooses its own top_k by the largest bound of its query heads (the
 * choice per head of Quest and MInference, grouped for GQA): one choice
 * for all heads favours whichever head's keys bound highest, and the other
 * heads lose what they would have read.
 *
 * The summaries come from the store (bs_store) where there is one, else
 * they are taken for this call into c->bs_w. */
static int
block_sparse(model_ctx_t *c, const kern_attn_args_t *o, const model_attn_policy_t *p, uint32_t qd)
{
    const kern_kv_t *kv = o->kv;
    const uint32_t N = o->n_q, bt = kv->block_tokens, d = kv->head_dim;
    const uint32_t n_kv = kv->n_kv_heads, H = o->n_heads;
    const uint32_t nq = (N + bt - 1) / bt;
    uint32_t lmax = 0;
    for (uint32_t i = 0; i < N; i++)
        lmax = (uint32_t)o->kv_len[i] > lmax ? (uint32_t)o->kv_len[i] : lmax;
    const uint32_t stride = (lmax + bt - 1) / bt;
    const uint32_t c0 = p->sinks / bt; /* blocks below lie in the sinks */

    /* Each query block's candidates [c0, c1): below the first row's own
     * block and not inside every row's window.  A block with top_k or
     * fewer keeps them all (kern_block_select). */
    TRY(bs_grow((void **)&c->bs_ends, &c->bs_ends_cap, nq, sizeof(uint32_t)));
    uint32_t c1max = c0;
    for (uint32_t q = 0; q < nq; q++) {
        uint32_t lo = UINT32_MAX, hi = 0;
        for (uint32_t i = q * bt; i < N && i < (q + 1) * bt; i++) {
            uint32_t L = (uint32_t)o->kv_len[i];
            lo = L < lo ? L : lo;
            hi = L > hi ? L : hi;
        }
        uint32_t own = (lo - 1) / bt;
        uint32_t win = hi > p->window ? (hi - p->window + bt - 1) / bt : 0;
        uint32_t c1 = own < win ? own : win;
        c1 = c1 > c0 ? c1 : c0;
        c->bs_ends[q] = c1;
        c1max = c1 > c1max ? c1 : c1max;
    }
    if (c1max - c0 <= p->top_k) {
        /* Every block is kept: plain dense, with no pattern to walk. */
        kern_attn_args_t dense = *o;
        dense.sink_tokens = dense.window_tokens = 0;
        return kern_attention(c->be, &dense);
    }

    /* Mask row q holds a row of `stride` bytes per KV head; attention
     * runs call_q query blocks at a time, so the mask stays that many rows
     * at any length. */
    const size_t mrow_bytes = (size_t)n_kv * stride;
    const uint32_t nw = c1max - c0;
    const uint16_t *store;
    TRY(bs_store(c, kv, o->layer, o->pt.indices + c0, nw, &store));
    const uint32_t nw_b = store ? c->sum_blocks : nw; /* rows a head's bounds hold */
    const uint32_t slab_q = bs_slab_q(bt) < nq ? bs_slab_q(bt) : nq;
    const uint32_t call_q = bs_call_q(bt, nq);
    TRY(bs_grow_be(c, &c->bs_mask, &c->bs_mask_cap, bs_floats((size_t)call_q * mrow_bytes)));
    uint8_t *mask = (uint8_t *)c->bs_mask;
    kern_block_score_args_t sa = {.n_heads = H,
                                  .n_kv_heads = n_kv,
                                  .head_dim = d,
                                  .n_blocks = nw,
                                  .bounds_stride = nw_b,
                                  .q_group = bt,
                                  .per_kv_head = true,
                                  .bounds_rows = store ? o->pt.indices + c0 : NULL,
                                  .n_q = slab_q * bt};
    if (!store)
        TRY(bs_grow_be(c, &c->bs_w, &c->bs_w_cap, bs_w_floats(n_kv, nw, d)));
    TRY(bs_grow_be(c, &c->bs_work, &c->bs_work_cap, kern_block_scores_work(&sa)));
    TRY(bs_grow_be(c, &c->bs_dscore, &c->bs_dscore_cap, (size_t)slab_q * n_kv * nw));
    if (!store)
        TRY(kern_kv_block_bounds(c->be, kv, o->layer, o->pt.indices + c0, nw, (uint16_t *)c->bs_w));
    sa.bounds = store ? store : (const uint16_t *)c->bs_w;
    sa.work = c->bs_work;
    sa.score = c->bs_dscore;
    kern_block_select_args_t sel = {.score = c->bs_dscore,
                                    .n_kv_heads = n_kv,
                                    .score_stride = nw,
                                    .first = c0,
                                    .top_k = p->top_k,
                                    .mask_head_stride = stride};

    for (uint32_t a0 = 0; a0 < nq; a0 += call_q) {
        const uint32_t a1 = a0 + call_q < nq ? a0 + call_q : nq;
        for (uint32_t q0 = a0; q0 < a1; q0 += slab_q) {
            uint32_t q1 = q0 + slab_q < a1 ? q0 + slab_q : a1;
            uint32_t r0 = q0 * bt, rows = (q1 * bt < N ? q1 * bt : N) - r0;
            sa.q = o->q + (size_t)r0 * qd;
            sa.n_q = rows;
            TRY(kern_block_scores(c->be, &sa));
            sel.n_rows = q1 - q0;
            sel.ends = c->bs_ends + q0;
            sel.mask = mask + (size_t)(q0 - a0) * mrow_bytes;
            TRY(kern_block_select(c->be, &sel));
        }
        const uint32_t r0 = a0 * bt, rows = (a1 * bt < N ? a1 * bt : N) - r0;
        int32_t qi[2], pi[2];
        kern_attn_args_t sp = one_seq(o, 0, r0, rows, qd, qi, pi);
        sp.sink_tokens = p->sinks;
        sp.window_tokens = p->window;
        sp.block_mask = mask;
        sp.mask_stride = (uint32_t)mrow_bytes;
        sp.mask_head_stride = stride;
        sp.mask_q_block = bt;
        sp.mask_in_backend = true;
        TRY(kern_attention(c->be, &sp));
    }
    return 0;
}

int
model_ctx_reserve(model_ctx_t *c, uint32_t max_ctx, uint32_t block_tokens,
                  const kern_kv_t *summaries)
{
    if (max_ctx == 0 || block_tokens == 0 || (summaries && summaries->block_gen == NULL))
        return KVS_EINVAL;
    const model_hparams_t *hp = &c->m->hp;
    if (summaries &&
        (summaries->n_layers != hp->n_layer || summaries->n_kv_heads != hp->n_head_kv ||
         summaries->head_dim != hp->head_dim))
        return KVS_EINVAL; /* another model's pool */
    const size_t qd = (size_t)hp->n_head * hp->head_dim;
    /* Delta: at most every row of a call is dense. */
    TRY(delta_scratch(c, c->max_tokens, qd));
    /* Block-sparse: candidates lie below a query block's own block. */
    const uint32_t bt = block_tokens, nw = max_ctx / bt + 1;
    const uint32_t slab_q = bs_slab_q(bt);
    const int32_t row0 = 0; /* work sized as for rows from the store: the larger */
    kern_block_score_args_t sa = {.n_heads = hp->n_head,
                                  .n_kv_heads = hp->n_head_kv,
                                  .head_dim = hp->head_dim,
                                  .n_blocks = nw,
                                  .bounds_rows = &row0,
                                  .q_group = bt,
                                  .n_q = slab_q * bt};
    TRY(bs_grow_be(c, &c->bs_w, &c->bs_w_cap, bs_w_floats(hp->n_head_kv, nw, hp->head_dim)));
    TRY(bs_grow_be(c, &c->bs_work, &c->bs_work_cap, kern_block_scores_work(&sa)));
    /* A slab of query blocks' scores, one per KV head. */
    TRY(bs_grow_be(c, &c->bs_dscore, &c->bs_dscore_cap, (size_t)slab_q * hp->n_head_kv * nw));
    TRY(bs_grow_be(c, &c->bs_mask, &c->bs_mask_cap,
                   bs_floats((size_t)bs_mask_rows(c, bt) * hp->n_head_kv * nw)));
    if (summaries &&
        !(c->sum && c->sum_blocks == summaries->n_blocks && c->sum_layers == summaries->n_layers)) {
        size_t bytes = 0;
        int rc = bs_store_alloc(c, summaries, &bytes);
        if (rc) {
            KVS_ERRORF("model: no memory for the block-sparse key summaries of %u KV blocks "
                       "(%zu MiB) beside the pool",
                       summaries->n_blocks, bytes >> 20);
            return rc;
        }
        c->sum_off = false;
    }
    if (summaries) {
        /* Quest's lists for a step of max_logits rows (quest_plan), or
         * of every block twice where that is less; a step that lists more
         * (prefixes shared by many rows) plans only the runs that fit. */
        size_t rows = c->max_logits, entries = rows * nw;
        entries =
            entries < 2 * (size_t)summaries->n_blocks ? entries : 2 * (size_t)summaries->n_blocks;
        entries += rows * (slab_q + 2) + slab_q + 1;
        TRY(bs_grow_be(c, &c->qp_dev, &c->qp_dev_cap, bs_floats(entries * sizeof(int32_t))));
    }
    c->reserved = true;
    return 0;
}

uint32_t
model_ctx_late_grows(const model_ctx_t *c)
{
    return c->late_grows;
}

/* Whether row i of sequence s attends as Quest decodes. */
static bool
quest_row(const model_batch_t *b, const kern_attn_args_t *a, uint32_t s, uint32_t i)
{
    return b->seq_policy[s].decode_top_k && a->layer >= MODEL_DECODE_DENSE_LAYERS &&
           (uint32_t)a->kv_len[i] > b->seq_n_prompt[s];
}

/* Row i of sequence s in a decode run: the end of its candidates [0, end)
 * below its own block, 0 where it chooses none (dense, or k or fewer
 * candidates: it keeps them all). */
static uint32_t
run_row_end(const model_batch_t *b, const kern_attn_args_t *a, uint32_t s, uint32_t i)
{
    const uint32_t e = ((uint32_t)a->kv_len[i] - 1) / a->kv->block_tokens;
    return quest_row(b, a, s, i) && e > b->seq_policy[s].decode_top_k ? e : 0;
}

/* The bytes a step's plan may take on the backend: what model_ctx_reserve
 * set aside, else 16 MiB (lists of 4M blocks).  A run past it (a
 * preempted sequence's recomputed tokens at long context: thousands of
 * rows, each listing the whole sequence) is listed per layer, a slab at
 * a time, as without a plan. */
static size_t
qp_budget(const model_ctx_t *c)
{
    return c->reserved && c->qp_dev_cap ? c->qp_dev_cap * sizeof(float) : (size_t)16 << 20;
}

/* The candidate lists of slab rows [q0, q1) of a decode run from row r0:
 * ends[r] blocks of each row's table, row after row, into list, each
 * row's offset into ptr (from 0); *s is the sequence of row r0 + q0,
 * moved on with the rows.  Returns the entries listed. */
static uint32_t
slab_lists(const kern_attn_args_t *a, uint32_t *s, uint32_t r0, uint32_t q0, uint32_t q1,
           const uint32_t *ends, int32_t *list, uint32_t *ptr)
{
    ptr[0] = 0;
    for (uint32_t r = q0; r < q1; r++) {
        while ((uint32_t)a->q_indptr[*s + 1] <= r0 + r)
            (*s)++;
        memcpy(list + ptr[r - q0], a->pt.indices + a->pt.indptr[*s], ends[r] * sizeof(int32_t));
        ptr[r - q0 + 1] = ptr[r - q0] + ends[r];
    }
    return ptr[q1 - q0];
}

/* decode_run's plan for the run of sequences [s0, s1) from row `first`
 * (quest_plan): each slab's candidate lists and offsets appended to the
 * step's, and the blocks of them whose summaries are stale in layer
 * MODEL_DECODE_DENSE_LAYERS (and so in every layer after it: they all
 * summarise the same blocks, the same way, at each step) that no earlier
 * run of the step listed.  No entry where no row chooses. */
static int
decode_plan(model_ctx_t *c, const model_batch_t *b, const kern_attn_args_t *a, uint32_t s0,
            uint32_t s1, uint32_t first)
{
    const kern_kv_t *kv = a->kv;
    const uint32_t r0 = first, n = (uint32_t)a->q_indptr[s1] - r0,
                   slab = bs_slab_q(kv->block_tokens);
    TRY(bs_grow((void **)&c->bs_ends, &c->bs_ends_cap, n, sizeof(uint32_t)));
    size_t listed = 0;
    for (uint32_t s = s0; s < s1; s++)
        for (int32_t i = s > s0 ? a->q_indptr[s] : (int32_t)r0; i < a->q_indptr[s + 1]; i++)
            listed += c->bs_ends[(uint32_t)i - r0] = run_row_end(b, a, s, (uint32_t)i);
    const size_t n_slabs = (n + slab - 1) / slab;
    if (listed == 0 ||
        (c->qp_list_n + listed + c->qp_ptr_n + n_slabs * (slab + 1)) * sizeof(int32_t) >
            qp_budget(c))
        return 0; /* nothing chosen; or too long a run: its layers list it themselves */
    TRY(bs_grow((void **)&c->qp_run, &c->qp_run_cap, c->qp_n + 1, sizeof(qp_run_t)));
    TRY(bs_grow((void **)&c->qp_list, &c->qp_list_cap, c->qp_list_n + listed, sizeof(int32_t)));
    TRY(bs_grow((void **)&c->qp_ptr, &c->qp_ptr_cap, c->qp_ptr_n + n_slabs * (slab + 1),
                sizeof(uint32_t)));
    TRY(bs_grow((void **)&c->qp_slab, &c->qp_slab_cap, c->qp_slab_n + n_slabs, sizeof(size_t)));
    /* Each block goes on a step's todo lists once. */
    TRY(bs_grow((void **)&c->qp_todo, &c->qp_todo_cap, c->sum_blocks, sizeof(int32_t)));
    qp_run_t *run = &c->qp_run[c->qp_n];
    *run = (qp_run_t){.s0 = s0,
                      .s1 = s1,
                      .first = first,
                      .n = n,
                      .slab_at = c->qp_slab_n,
                      .ptr_at = c->qp_ptr_n,
                      .todo_at = c->qp_todo_n};
    const size_t P = c->sum_blocks;
    const uint64_t *tag = c->sum_gen + (size_t)MODEL_DECODE_DENSE_LAYERS * P;
    size_t at = c->qp_list_n, todo = c->qp_todo_n;
    for (uint32_t s = s0, q0 = 0, k = 0; q0 < n; q0 += slab, k++) {
        const uint32_t q1 = q0 + slab < n ? q0 + slab : n;
        uint32_t *ptr = c->qp_ptr + run->ptr_at + (size_t)k * (slab + 1);
        c->qp_slab[run->slab_at + k] = at;
        const size_t end = at + slab_lists(a, &s, r0, q0, q1, c->bs_ends, c->qp_list + at, ptr);
        for (; at < end; at++) {
            const int32_t blk = c->qp_list[at];
            if (blk < 0 || (size_t)blk >= P)
                return KVS_EINVAL;
            if (tag[blk] != kv->block_gen[blk] && c->qp_mark[blk] != a->pt_epoch) {
                c->qp_mark[blk] = a->pt_epoch;
                c->qp_todo[todo++] = blk;
            }
        }
    }
    run->n_todo = (uint32_t)(todo - c->qp_todo_n);
    c->qp_list_n = at;
    c->qp_ptr_n += n_slabs * (slab + 1);
    c->qp_slab_n += n_slabs;
    c->qp_todo_n = todo;
    c->qp_n++;
    return 0;
}

/* The planned run that decode_run(s0, s1, first) of layer a->layer is, or
 * NULL: none planned, or the last layer's rows. */
static const qp_run_t *
planned_run(const model_ctx_t *c, const model_batch_t *b, const kern_attn_args_t *a, uint32_t s0,
            uint32_t s1, uint32_t first)
{
    if (c->qp_epoch == 0 || c->qp_epoch != a->pt_epoch || a->q_indptr != b->seq_indptr ||
        a->layer < MODEL_DECODE_DENSE_LAYERS)
        return NULL;
    for (size_t k = 0; k < c->qp_n; k++) {
        const qp_run_t *r = &c->qp_run[k];
        if (r->s0 == s0 && r->s1 == s1 && r->first == first)
            return r;
    }
    return NULL;
}

/* The rows of sequences [s0, s1) of a from row `first` on (s0's own, or a
 * later one of s0), none of them a prompt row, in one
 * attention call: each Quest row sees its own block and, per KV head, the
 * decode_top_k earlier blocks of the highest bound (a slab of rows at a
 * time summarised, scored against a list of candidates per row and chosen
 * into a mask on the backend; a row at a time where there is no store),
 * the other rows every key (dense_rows).  A call per Quest row, as
 * block_sparse makes, launched four kernels a row on a device, and ran
 * the batch's dense rows sequence by sequence. */
static int
decode_run(model_ctx_t *c, const model_batch_t *b, const kern_attn_args_t *a, uint32_t s0,
           uint32_t s1, uint32_t first, uint32_t qd)
{
    const kern_kv_t *kv = a->kv;
    const uint32_t bt = kv->block_tokens, d = kv->head_dim, n_kv = kv->n_kv_heads;
    const uint32_t r0 = first, n = (uint32_t)a->q_indptr[s1] - r0;
    if (n == 0)
        return 0;
    kern_attn_args_t o = *a;
    if (s0 != 0 || s1 != a->pt.n_seqs || r0 != 0) {
        /* Its sequences on their own: another table than a's. */
        TRY(bs_grow((void **)&c->dr_qi, &c->dr_seq_cap, 2 * ((size_t)s1 - s0 + 1),
                    sizeof(int32_t)));
        int32_t *pi = c->dr_qi + (s1 - s0 + 1);
        for (uint32_t s = s0; s <= s1; s++) {
            c->dr_qi[s - s0] = s > s0 ? a->q_indptr[s] - (int32_t)r0 : 0;
            pi[s - s0] = a->pt.indptr[s] - a->pt.indptr[s0];
        }
        o.pt_epoch = 0;
        o.q = a->q + (size_t)r0 * qd;
        o.out = a->out + (size_t)r0 * qd;
        o.n_q = n;
        o.q_indptr = c->dr_qi;
        o.kv_len = a->kv_len + r0;
        o.pt.indptr = pi;
        o.pt.indices = a->pt.indices + a->pt.indptr[s0];
        o.pt.last_len = a->pt.last_len + s0;
        o.pt.n_seqs = s1 - s0;
    }

    /* Each row's candidates [0, ends) below its own block, its k, and
     * whether it is dense; the widest row sets the mask's stride. */
    TRY(bs_grow((void **)&c->bs_ends, &c->bs_ends_cap, n, sizeof(uint32_t)));
    TRY(bs_grow((void **)&c->dr_k, &c->dr_k_cap, n, sizeof(uint32_t)));
    TRY(bs_grow((void **)&c->dr_dense, &c->dr_dense_cap, n, 1));
    uint32_t stride = 1, nw = 0;
    for (uint32_t s = s0; s < s1; s++)
        for (int32_t i = s > s0 ? a->q_indptr[s] : (int32_t)r0; i < a->q_indptr[s + 1]; i++) {
            const uint32_t L = (uint32_t)a->kv_len[i], r = (uint32_t)i - r0;
            const uint32_t nb = (L + bt - 1) / bt, k = b->seq_policy[s].decode_top_k;
            stride = nb > stride ? nb : stride;
            const bool q = quest_row(b, a, s, (uint32_t)i);
            c->bs_ends[r] = run_row_end(b, a, s, (uint32_t)i);
            c->dr_k[r] = q ? k : 1;
            c->dr_dense[r] = !q;
            nw = c->bs_ends[r] > nw ? c->bs_ends[r] : nw;
        }
    if (nw == 0) /* no row chooses: every row sees every key */
        return kern_attention(c->be, &o);

    const uint32_t slab = bs_slab_q(bt);
    const bool have_store = bs_store_ready(c, kv);
    const int32_t row0 = 0;
    kern_block_score_args_t sa = {.n_q = have_store ? slab : 1,
                                  .n_heads = o.n_heads,
                                  .n_kv_heads = n_kv,
                                  .head_dim = d,
                                  .n_blocks = nw,
                                  .bounds_rows = have_store ? &row0 : NULL,
                                  .q_group = 1,
                                  .per_kv_head = true,
                                  .score_stride = nw}; /* rows choose among fewer */
    TRY(bs_grow_be(c, &c->bs_mask, &c->bs_mask_cap, bs_floats((size_t)n * n_kv * stride)));
    TRY(bs_grow_be(c, &c->bs_dscore, &c->bs_dscore_cap, (size_t)slab * n_kv * nw));
    TRY(bs_grow_be(c, &c->bs_work, &c->bs_work_cap, kern_block_scores_work(&sa)));
    if (!have_store)
        TRY(bs_grow_be(c, &c->bs_w, &c->bs_w_cap, bs_w_floats(n_kv, nw, d)));
    else {
        TRY(bs_grow((void **)&c->dr_list, &c->dr_list_cap, (size_t)slab * nw, sizeof(int32_t)));
        TRY(bs_grow((void **)&c->dr_ptr, &c->dr_ptr_cap, (size_t)slab + 1, sizeof(uint32_t)));
    }
    /* A planned run (quest_plan): its stale blocks summarised once for
     * the layer, its lists already on the backend. */
    const qp_run_t *plan = have_store ? planned_run(c, b, a, s0, s1, first) : NULL;
    const uint16_t *pstore = NULL;
    if (plan && plan->n != n)
        return KVS_EINVAL; /* not the run planned: a bug, not input */
    if (plan)
        TRY(bs_store_put(c, kv, o.layer, c->qp_todo + plan->todo_at, plan->n_todo, &pstore));
    uint8_t *mask = (uint8_t *)c->bs_mask;
    kern_block_select_args_t sel = {
        .score = c->bs_dscore, .n_kv_heads = n_kv, .score_stride = nw, .mask_head_stride = stride};
    for (uint32_t s = s0, q0 = 0; q0 < n; q0 += slab) {
        const uint32_t q1 = q0 + slab < n ? q0 + slab : n;
        if (plan) {
            const size_t k = q0 / slab, pk = plan->ptr_at + k * (slab + 1);
            sa.bounds_rows = (const int32_t *)c->qp_dev + c->qp_slab[plan->slab_at + k];
            sa.bounds_indptr = (const uint32_t *)((const int32_t *)c->qp_dev + c->qp_list_n) + pk;
            sa.lists_in_backend = true;
            if (c->qp_ptr[pk + (q1 - q0)] == 0)
                sa.bounds_rows = NULL; /* nothing listed: no scores to take */
        } else if (have_store) {
            /* The slab's candidates, a list per row, summarised and
             * scored in one call each. */
            const uint32_t listed =
                slab_lists(a, &s, r0, q0, q1, c->bs_ends, c->dr_list, c->dr_ptr);
            pstore = NULL;
            if (listed)
                TRY(bs_store(c, kv, o.layer, c->dr_list, listed, &pstore));
            sa.bounds_rows = c->dr_list;
            sa.bounds_indptr = c->dr_ptr;
        }
        if (have_store && pstore && sa.bounds_rows) {
            sa.q = a->q + (size_t)(r0 + q0) * qd;
            sa.n_q = q1 - q0;
            sa.n_blocks = nw;
            sa.bounds = pstore;
            sa.bounds_stride = c->sum_blocks;
            sa.score = c->bs_dscore;
            sa.work = c->bs_work;
            TRY(kern_block_scores(c->be, &sa));
        }
        for (uint32_t r = q0; !have_store && r < q1; r++) {
            while ((uint32_t)a->q_indptr[s + 1] <= r0 + r)
                s++;
            const uint32_t e = c->bs_ends[r];
            if (e == 0)
                continue;
            const int32_t *blocks = a->pt.indices + a->pt.indptr[s];
            const uint16_t *store;
            TRY(bs_store(c, kv, o.layer, blocks, e, &store));
            if (!store)
                TRY(kern_kv_block_bounds(c->be, kv, o.layer, blocks, e, (uint16_t *)c->bs_w));
            sa.q = a->q + (size_t)(r0 + r) * qd;
            sa.n_blocks = e;
            sa.bounds = store ? store : (const uint16_t *)c->bs_w;
            sa.bounds_stride = store ? c->sum_blocks : e;
            sa.bounds_rows = store ? blocks : NULL;
            sa.score = c->bs_dscore + (size_t)(r - q0) * n_kv * nw;
            sa.work = c->bs_work;
            TRY(kern_block_scores(c->be, &sa));
        }
        sel.n_rows = q1 - q0;
        sel.ends = c->bs_ends + q0;
        sel.top_ks = c->dr_k + q0;
        sel.mask = mask + (size_t)q0 * n_kv * stride;
        TRY(kern_block_select(c->be, &sel));
    }
    o.sink_tokens = 0;
    o.window_tokens = 1;
    o.block_mask = mask;
    o.mask_stride = n_kv * stride;
    o.mask_head_stride = stride;
    o.mask_q_block = 1;
    o.mask_in_backend = true;
    o.dense_rows = c->dr_dense;
    return kern_attention(c->be, &o);
}

/* Attention of one layer's rows under the batch's per-sequence policies:
 * one dense call when every sequence is dense; else the sequences with
 * prompt rows one by one, those rows with their policy and the rest dense
 * or Quest's, and the runs of sequences between them that only decode
 * in a call each (decode_run).  With `plan`, only the decode runs, into
 * the step's plan (decode_plan), and nothing launched. */
static int
attend(model_ctx_t *c, const model_batch_t *b, const kern_attn_args_t *a, uint32_t qd, bool plan)
{
    bool any = false;
    for (uint32_t s = 0; b->seq_policy && s < b->pt.n_seqs; s++)
        any |= b->seq_policy[s].kind != MODEL_ATTN_DENSE ||
               (b->seq_policy[s].decode_top_k && a->layer >= MODEL_DECODE_DENSE_LAYERS);
    if (!any)
        return plan ? 0 : kern_attention(c->be, a);
    const uint32_t cap = bs_mask_rows(c, a->kv->block_tokens);
    uint32_t s0 = 0; /* the run of decoding sequences [s0, s) */
    for (uint32_t s = 0; s <= b->pt.n_seqs; s++) {
        uint32_t r0 = 0, n = 0, np = 0; /* np: leading prompt rows */
        if (s < b->pt.n_seqs) {
            r0 = (uint32_t)a->q_indptr[s];
            n = (uint32_t)a->q_indptr[s + 1] - r0;
            while (np < n && (uint32_t)a->kv_len[r0 + np] <= b->seq_n_prompt[s])
                np++;
        }
        const bool dec = s < b->pt.n_seqs && np == 0 && n <= cap;
        if (s == b->pt.n_seqs || !dec || (uint32_t)a->q_indptr[s + 1] - a->q_indptr[s0] > cap) {
            const uint32_t first = (uint32_t)a->q_indptr[s0];
            TRY(plan ? decode_plan(c, b, a, s0, s, first) : decode_run(c, b, a, s0, s, first, qd));
            s0 = dec ? s : s + 1;
        }
        if (dec || n == 0)
            continue;
        const model_attn_policy_t *p = &b->seq_policy[s];
        bool quest = p->decode_top_k && a->layer >= MODEL_DECODE_DENSE_LAYERS;
        uint32_t nd = quest ? np : n; /* the rows from nd on decode as Quest */
        if (plan) {
            if (nd < n)
                TRY(decode_plan(c, b, a, s, s + 1, r0 + nd));
            continue;
        }
        uint32_t ns = np; /* of them, those the prefill policy shapes */
        if (p->kind != MODEL_ATTN_DENSE && p->last_dense && ns > 0 &&
            (uint32_t)a->kv_len[r0 + ns - 1] == b->seq_n_prompt[s])
            ns--; /* the prompt's last row stays dense */
        int32_t qi[2], pi[2];
        if (p->kind != MODEL_ATTN_DENSE && ns > 0) {
            kern_attn_args_t o = one_seq(a, s, r0, ns, qd, qi, pi);
            if (p->kind == MODEL_ATTN_BLOCK_SPARSE) {
                TRY(block_sparse(c, &o, p, qd));
            } else {
                o.sink_tokens = p->sinks;
                o.window_tokens = p->window;
                TRY(kern_attention(c->be, &o));
            }
            if (p->kind == MODEL_ATTN_DELTA)
                TRY(delta_correct(c, &o, p, qd));
        } else {
            ns = 0;
        }
        /* Dense rows [ns, nd), then Quest's decode rows as a run. */
        if (ns < nd) {
            kern_attn_args_t o = one_seq(a, s, r0 + ns, nd - ns, qd, qi, pi);
            TRY(kern_attention(c->be, &o));
        }
        if (nd < n)
            TRY(decode_run(c, b, a, s, s + 1, r0 + nd, qd));
    }
    return 0;
}

/* One forward pass's launches, up to the logits in c->logits: what
 * kern_graph_run records and replays for decode steps. */
typedef struct fwd {
    model_ctx_t *c;
    const kern_kv_t *kv;
    const model_batch_t *b;
    kern_rope_args_t rope;
    kern_attn_args_t attn;
} fwd_t;

static int
forward_layers(void *arg)
{
    fwd_t *f = arg;
    model_ctx_t *c = f->c;
    const model_batch_t *b = f->b;
    const model_t *m = c->m;
    const model_hparams_t *hp = &m->hp;
    kern_backend_t *be = c->be;
    const uint32_t T = b->n_tokens, d = hp->n_embd;
    const uint32_t qd = hp->n_head * hp->head_dim;
    const uint32_t nl = b->n_logits;
    kern_rope_args_t rope = f->rope;
    kern_attn_args_t attn = f->attn;

    /* Each layer's first norm is fused into the previous layer's last
     * residual add (kern_add_rmsnorm); the first layer's stands alone. */
    TRY(kern_get_rows(be, &m->tok_embd, b->tokens, T, c->x));
    TRY(kern_rmsnorm(be, c->x, m->layers[0].attn_norm.data, T, d, hp->rms_eps, c->h));
    for (uint32_t l = 0; l < hp->n_layer; l++) {
        const model_layer_t *L = &m->layers[l];
        const kern_tensor_t *qkv_w[3] = {&L->wq, &L->wk, &L->wv};
        const float *qkv_b[3] = {L->bq.data, L->bk.data, L->bv.data};
        float *qkv[3] = {c->q, c->k, c->v};
        TRY(kern_matmul_set(be, 3, qkv_w, c->h, T, qkv_b, qkv));
        rope.x = c->q;
        rope.n_heads = hp->n_head;
        rope.x2 = c->k;
        rope.n_heads2 = hp->n_head_kv;
        TRY(kern_rope(be, &rope));
        for (uint32_t i = 0; i < b->n_capture; i++)
            TRY(kern_download(be, b->capture_q + ((size_t)l * b->n_capture + i) * qd,
                              c->q + (size_t)b->capture_rows[i] * qd, qd * sizeof(float)));
        TRY(kern_kv_append(be, f->kv, l, c->k, c->v, b->slots, T));

        float *x = c->x, *h = c->h, *att = c->att;
        uint32_t n = T;
        attn.layer = l;
        if (l + 1 == hp->n_layer) {
            if (nl == 0)
                break;
            /* Only the rows whose logits are wanted continue. */
            TRY(gather_rows(be, c->q, T, qd, b->logit_rows, nl, c->lh));
            TRY(gather_rows(be, c->x, T, d, b->logit_rows, nl, c->lx));
            attn.q = c->lh;
            attn.n_q = nl;
            attn.q_indptr = c->row_q_indptr;
            attn.kv_len = c->row_kv_len;
            x = c->lx;
            h = c->lh;
            n = nl;
        }
        TRY(attend(c, b, &attn, qd, false));
        TRY(kern_matmul(be, &L->wo, att, n, NULL, h));
        TRY(kern_add_rmsnorm(be, x, h, L->ffn_norm.data, n, d, hp->rms_eps, h));
        TRY(kern_matmul_swiglu(be, &L->w_gate, &L->w_up, h, n, c->up, c->gate));
        TRY(kern_matmul(be, &L->w_down, c->gate, n, NULL, h));
        /* The next layer's input norm, or the output norm (x, h are then
         * the rows whose logits are wanted: c->lx, c->lh). */
        const float *next =
            l + 1 < hp->n_layer ? m->layers[l + 1].attn_norm.data : m->output_norm.data;
        TRY(kern_add_rmsnorm(be, x, h, next, n, d, hp->rms_eps, h));
    }
    if (nl == 0)
        return 0;
    return kern_matmul(be, &m->output, c->lh, nl, NULL, c->logits);
}

/* The step's plan of Quest's decode runs (decode_plan), made from the
 * attention arguments of a layer that chooses, and its lists uploaded;
 * c->qp_epoch says it is there.  Without one (no Quest row, a model too
 * shallow for a layer between the dense ones and the last, no store, no
 * memory), each layer lists and summarises its candidates itself. */
static void
quest_plan(model_ctx_t *c, const model_batch_t *b, const kern_attn_args_t *attn)
{
    c->qp_epoch = 0;
    bool any = false;
    for (uint32_t s = 0; b->seq_policy && s < b->pt.n_seqs; s++)
        any |= b->seq_policy[s].decode_top_k != 0;
    if (!any || c->m->hp.n_layer < MODEL_DECODE_DENSE_LAYERS + 2 || !bs_store_ready(c, attn->kv))
        return;
    kern_attn_args_t a = *attn;
    a.layer = MODEL_DECODE_DENSE_LAYERS;
    c->qp_n = c->qp_list_n = c->qp_ptr_n = c->qp_slab_n = c->qp_todo_n = 0;
    size_t bytes;
    if (attend(c, b, &a, 0, true) != 0 || c->qp_n == 0 ||
        kvs_mul_size(c->qp_list_n + c->qp_ptr_n, sizeof(int32_t), &bytes) ||
        bs_grow_be(c, &c->qp_dev, &c->qp_dev_cap, bs_floats(bytes)) != 0 ||
        kern_upload(c->be, c->qp_dev, c->qp_list, c->qp_list_n * sizeof(int32_t)) != 0 ||
        kern_upload(c->be, (int32_t *)c->qp_dev + c->qp_list_n, c->qp_ptr,
                    c->qp_ptr_n * sizeof(uint32_t)) != 0)
        return;
    c->qp_epoch = attn->pt_epoch;
}

/* Whether the batch is a decode step a graph can replay, and its key:
 * one row per sequence, each past its prompt (so attention is one dense
 * call, decode_run's where a prefill policy is sparse), nothing captured.
 * Steps under one key launch alike: the same model, pool, row counts and
 * attention plan, which the longest row's power-of-two bound fixes
 * (kern_attn_args_t.max_len_hint). */
static bool
graph_key(const model_ctx_t *c, const kern_kv_t *kv, const model_batch_t *b, uint32_t *bound,
          uint64_t *key)
{
    if (!c->graphs || b->n_capture || b->n_tokens != b->pt.n_seqs)
        return false;
    uint32_t longest = 0;
    for (uint32_t s = 0; s < b->pt.n_seqs; s++) {
        if (b->seq_indptr[s + 1] - b->seq_indptr[s] != 1)
            return false;
        uint32_t len = (uint32_t)b->kv_len[b->seq_indptr[s]];
        if (b->seq_policy && b->seq_policy[s].decode_top_k)
            return false; /* Quest's calls follow the step's table and summaries */
        if (b->seq_policy && b->seq_policy[s].kind != MODEL_ATTN_DENSE && len <= b->seq_n_prompt[s])
            return false; /* a prompt row: its policy's own calls */
        longest = len > longest ? len : longest;
    }
    uint32_t p2 = 256;
    while (p2 < longest && p2 < (1u << 31))
        p2 <<= 1;
    *bound = p2;
    uint64_t k = kvs_mix64((uint64_t)(uintptr_t)c->m ^ 0x6b76u);
    k = kvs_mix64(k ^ (uint64_t)(uintptr_t)kv->k);
    k = kvs_mix64(k ^ ((uint64_t)b->n_tokens << 32 | b->n_logits));
    *key = kvs_mix64(k ^ (uint64_t)p2);
    return true;
}

int
model_forward(model_ctx_t *c, const kern_kv_t *kv, const model_batch_t *b, float *logits)
{
    TRY(check_batch(c, kv, b));
    const model_t *m = c->m;
    const model_hparams_t *hp = &m->hp;
    kern_backend_t *be = c->be;
    const uint32_t T = b->n_tokens;
    const uint32_t nl = b->n_logits;

    /* Attention arguments for the last layer's reduced rows: each logit
     * row keeps its own sequence and visible KV length. */
    c->row_q_indptr[0] = 0;
    for (uint32_t i = 0, seq = 0; seq < b->pt.n_seqs; seq++) {
        while (i < nl && b->logit_rows[i] < b->seq_indptr[seq + 1]) {
            c->row_kv_len[i] = b->kv_len[b->logit_rows[i]];
            i++;
        }
        c->row_q_indptr[seq + 1] = (int32_t)i;
    }

    fwd_t f = {.c = c, .kv = kv, .b = b};
    /* Every layer's attention reads the batch's table and every layer's
     * RoPE the same positions: the backend uploads each once. */
    const uint64_t epoch = atomic_fetch_add(&g_epoch, 1) + 1;
    f.rope = (kern_rope_args_t){
        .head_dim = hp->head_dim,
        .n_rot = hp->n_rot,
        .pos = b->pos,
        .n_rows = T,
        .freq_base = hp->rope_freq_base,
        .freq_scale = hp->rope_freq_scale,
        .freq_factors = m->rope_freqs,
        /* llama.cpp's qwen2 rotates halves, not adjacent pairs. */
        .neox = strcmp(hp->arch, "qwen2") == 0,
        .epoch = epoch,
    };
    f.attn = (kern_attn_args_t){
        .q = c->q,
        .out = c->att,
        .n_q = T,
        .n_heads = hp->n_head,
        .q_indptr = b->seq_indptr,
        .kv_len = b->kv_len,
        .pt = b->pt,
        .kv = kv,
        .scale = 1.0f / sqrtf((float)hp->head_dim),
        .pt_epoch = epoch,
    };
    uint64_t key;
    uint32_t bound;
    int rc;
    if (graph_key(c, kv, b, &bound, &key)) {
        f.attn.max_len_hint = bound;
        rc = kern_graph_run(be, key, forward_layers, &f);
    } else {
        quest_plan(c, b, &f.attn);
        rc = forward_layers(&f);
    }
    c->qp_epoch = 0;
    if (rc == 0 && nl)
        rc = kern_download(be, logits, c->logits, (size_t)nl * hp->n_vocab * sizeof(float));
    if (rc == 0 && nl)
        rc = kern_sync(be);
    if (rc && c->sum_gen) {
        /* Some layers may have summarised what others have not (or a
         * device failed a summary after the launch): the plan's premise,
         * every choosing layer alike, holds again once every summary is
         * taken anew. */
        memset(c->sum_gen, 0, (size_t)c->sum_layers * c->sum_blocks * sizeof *c->sum_gen);
    }
    return rc;
}
