/*
 * tests/kernels/test_kv_quant.c — the quantized KV cache of kern.h (the
 * kern_kvq_t codecs, kern_kv_t's cold blocks, kern_kv_seal,
 * kern_kv_row_f32) on the "ref" backend, two cpu configurations and
 * "cuda" where a device is present (its codecs run on the host, its reads
 * of quantized tiles in every attention path on the device), for
 * every codec (BF16, Q8_0, FP8, Q4), head_dim 64 and 128, block_tokens 16
 * and 32, F32 and F16 hot blocks, GQA 2 and 4, ragged sequences whose page
 * tables mix hot and cold blocks, prefill, chunk and (split-K) decode rows.
 *
 * Why: a cold block is decoded inside the attention kernels, where a wrong
 * tile address, a decode of the wrong tokens or a layer / head / K-V
 * mix-up would go unseen by the codecs' own round trips.  So:
 *  - sealing writes exactly kern_kvq_encode of the block into the tile the
 *    documented layout ([layer][block - n_hot][kv_head]) names, and
 *    kern_kv_row_f32 and partial decodes give the bits of a whole-tile
 *    decode;
 *  - attention over the quantized pool equals attention over an F32 pool
 *    holding the decoded values, and cpu equals ref, under dense, sink +
 *    window, block-mask and dense-rows patterns;
 *  - its error against the unquantized values stays within a stated bound
 *    per codec (kQuantBound below);
 *  - unsealing writes the decoded values back and leaves sources alone;
 *  - the argument checks hold, and a codec pool without cold blocks is bit
 *    for bit the plain pool.
 * Errors are max|a - ref| / max|ref| (kern_test.h's check_close).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <math.h>

#include "kernels/kern.h"
#include "tests/kernels/kern_test.h"

#define MAX_SEQS 3
#define N_LAYERS 2
#define LAYER 1 /* the layer attention reads; layer 0 holds other values */
#define N_PATS 4

/* ---- backends ------------------------------------------------------------ */

typedef struct test_be {
    const char *label;
    kern_backend_t *be;
} test_be_t;

/* g_be[0] is ref: the other backends are compared with its outputs. */
static test_be_t g_be[4];
static int g_n_be;

static int
add_be(const char *name, uint32_t n_threads, const char *isa, const char *label)
{
    kern_backend_cfg_t cfg = {.n_threads = n_threads};
    if (isa)
        setenv("KVS_CPU_ISA", isa, 1);
    int rc = kern_backend_new(name, &cfg, &g_be[g_n_be].be);
    if (isa)
        unsetenv("KVS_CPU_ISA");
    if (rc != 0)
        return -1;
    g_be[g_n_be++].label = label;
    return 0;
}

static int
setup(void **state)
{
    (void)state;
    if (add_be("ref", 0, NULL, "ref") || add_be("cpu", 4, NULL, "cpu/4 threads") ||
        add_be("cpu", 1, "scalar", "cpu/1 thread/scalar"))
        return -1;
    if (add_be("cuda", 0, NULL, "cuda") != 0)
        print_message("test_kv_quant: cuda: skipped (no device)\n");
    return 0;
}

static int
teardown(void **state)
{
    (void)state;
    for (int i = 0; i < g_n_be; i++)
        kern_backend_free(g_be[i].be);
    return 0;
}

/* ---- data ---------------------------------------------------------------- */

enum { PAT_DENSE, PAT_SINK_WINDOW, PAT_MASK, PAT_DENSE_ROWS };
static const char *const pat_names[N_PATS] = {"dense", "sink 4 + window 24", "block mask",
                                              "sink + window + dense rows"};

/* One attention call: its query rows and its sparse-pattern inputs. */
typedef struct qcall {
    const char *name;
    uint32_t n_q;
    int32_t q_indptr[MAX_SEQS + 1];
    int32_t *kv_len;
    float *q;
    uint8_t *mask, *dense;
    uint32_t stride, qb;
} qcall_t;

/* A batch of sequences over a pool with n_hot hot and n_blocks - n_hot
 * cold blocks.  Every table entry ("logical block") is first written into
 * its own hot staging block; the sealed ones then move to a cold block. */
typedef struct qdata {
    kern_kvq_t quant;
    kern_dtype_t dtype; /* of the hot blocks */
    uint32_t bt, d, n_heads, n_kv, n_seqs;
    int32_t len[MAX_SEQS], tok0[MAX_SEQS];
    int32_t indptr[MAX_SEQS + 1], last_len[MAX_SEQS];
    uint32_t n_lb, n_hot, n_blocks, n_sealed;
    int32_t *stage;   /* [n_lb] hot block the entry is appended to */
    int32_t *table;   /* [n_lb] the page table: the cold block once sealed */
    uint8_t *sealed;  /* [n_lb] */
    int32_t *lb_seal; /* [n_sealed] logical blocks sealed, in seal order */
    uint32_t n_tok;
    int32_t *stage_slots, *table_slots; /* [n_tok] */
    /* Per layer, [n_tok][n_kv * d]: the values as the hot blocks hold
     * them (F16 pools: fp16-rounded), and the same with every sealed
     * block's tokens replaced by the decode of its encoded tile. */
    float *orig_k[N_LAYERS], *orig_v[N_LAYERS], *dec_k[N_LAYERS], *dec_v[N_LAYERS];
    /* The tiles sealing must write: [layer][n_sealed][n_kv] tiles each. */
    uint8_t *tile_k, *tile_v;
    size_t qk_tile, qv_tile;
    qcall_t calls[2]; /* a mixed batch, then one decode row per sequence */
    float scale;
} qdata_t;

static float
as_stored(kern_dtype_t dtype, float x)
{
    return dtype == KERN_F16 ? kvs_fp16_to_f32(kvs_f32_to_fp16(x)) : x;
}

/* Token t of block b of sequence s: a row of p->orig_* etc. */
static size_t
tok_row(const qdata_t *p, uint32_t s, uint32_t b, uint32_t t)
{
    return (size_t)p->tok0[s] + (size_t)b * p->bt + t;
}

/* The logical block's sequence and index in it. */
static void
lb_where(const qdata_t *p, uint32_t lb, uint32_t *s, uint32_t *b)
{
    uint32_t q = 0;
    while ((uint32_t)p->indptr[q + 1] <= lb)
        q++;
    *s = q;
    *b = lb - (uint32_t)p->indptr[q];
}

static void
call_build(const qdata_t *p, qcall_t *c, const char *name, const int32_t *rows, uint32_t qb)
{
    memset(c, 0, sizeof(*c));
    c->name = name;
    for (uint32_t s = 0; s < p->n_seqs; s++)
        c->q_indptr[s + 1] = c->q_indptr[s] + rows[s];
    c->n_q = (uint32_t)c->q_indptr[p->n_seqs];
    c->kv_len = malloc(c->n_q * sizeof(int32_t));
    c->q = rand_floats((size_t)c->n_q * p->n_heads * p->d, -2.0f, 2.0f);
    assert_non_null(c->kv_len);
    for (uint32_t s = 0; s < p->n_seqs; s++)
        for (int32_t r = 0; r < rows[s]; r++)
            c->kv_len[c->q_indptr[s] + r] = p->len[s] - rows[s] + 1 + r;

    /* Block mask: 40 % kept, one mask row per qb query rows, and the block
     * of every row's last key kept so that no row is left without keys. */
    int32_t max_nb = 0;
    for (uint32_t s = 0; s < p->n_seqs; s++)
        max_nb =
            p->indptr[s + 1] - p->indptr[s] > max_nb ? p->indptr[s + 1] - p->indptr[s] : max_nb;
    c->qb = qb;
    c->stride = (uint32_t)max_nb + 1;
    size_t n_rows = (c->n_q + qb - 1) / qb;
    c->mask = malloc(n_rows * c->stride);
    assert_non_null(c->mask);
    for (size_t i = 0; i < n_rows * c->stride; i++)
        c->mask[i] = rng_u32() % 100 < 40 ? (uint8_t)(1 + rng_u32() % 255) : 0;
    for (uint32_t i = 0; i < c->n_q; i++)
        c->mask[(i / qb) * c->stride + (uint32_t)(c->kv_len[i] - 1) / p->bt] = 1;

    /* Delta Attention's dense rows: every 8th row and the last 3. */
    c->dense = malloc(c->n_q);
    assert_non_null(c->dense);
    for (uint32_t i = 0; i < c->n_q; i++)
        c->dense[i] = i % 8 == 0 || i + 3 >= c->n_q;
}

static void
call_free(qcall_t *c)
{
    free(c->kv_len);
    free(c->q);
    free(c->mask);
    free(c->dense);
}

/* Sequence lengths: len0 ragged and over 128 keys (MIN_SPLIT: the cpu
 * backend splits its decode row, so parts start inside blocks), len1 a
 * multiple of bt (its last block is full and sealed), len2 short and
 * ragged, prefilled whole in the batch. */
static void
qdata_build(qdata_t *p, kern_kvq_t quant, kern_dtype_t dtype, uint32_t bt, uint32_t d,
            uint32_t group)
{
    memset(p, 0, sizeof(*p));
    p->quant = quant;
    p->dtype = dtype;
    p->bt = bt;
    p->d = d;
    p->n_kv = 2;
    p->n_heads = 2 * group;
    p->n_seqs = 3;
    uint32_t blocks0 = 9 + rng_u32() % 2; /* one draw a statement: a fixed order */
    p->len[0] = (int32_t)(blocks0 * bt + 1 + rng_u32() % (bt - 1));
    p->len[1] = (int32_t)((5 + rng_u32() % 3) * bt);
    p->len[2] = (int32_t)(bt + 2 + rng_u32() % (bt - 4));
    p->scale = 1.0f / sqrtf((float)d);

    for (uint32_t s = 0; s < p->n_seqs; s++) {
        int32_t nb = (p->len[s] + (int32_t)bt - 1) / (int32_t)bt;
        p->indptr[s + 1] = p->indptr[s] + nb;
        p->last_len[s] = p->len[s] - (nb - 1) * (int32_t)bt;
        p->tok0[s] = (int32_t)p->n_tok;
        p->n_tok += (uint32_t)p->len[s];
    }
    p->n_lb = (uint32_t)p->indptr[p->n_seqs];
    p->stage = malloc(p->n_lb * sizeof(int32_t));
    p->table = malloc(p->n_lb * sizeof(int32_t));
    p->sealed = calloc(p->n_lb, 1);
    p->lb_seal = malloc(p->n_lb * sizeof(int32_t));
    assert_true(p->stage && p->table && p->sealed && p->lb_seal);

    /* Which entries are sealed: the full ones, except the first (a sink)
     * and the last of sequences 0 and 2, and one in five at random.
     * Sequence 1 has cold blocks at both ends. */
    for (uint32_t s = 0; s < p->n_seqs; s++) {
        int32_t nb = p->indptr[s + 1] - p->indptr[s];
        for (int32_t b = 0; b < nb; b++) {
            bool full = b < nb - 1 || p->last_len[s] == (int32_t)bt;
            bool keep_hot = s != 1 && (b == 0 || b == nb - 1);
            if (full && !keep_hot && rng_u32() % 5 != 0) {
                p->sealed[p->indptr[s] + b] = 1;
                p->lb_seal[p->n_sealed++] = p->indptr[s] + b;
            }
        }
    }
    p->n_hot = p->n_lb + 3;
    p->n_blocks = p->n_hot + p->n_sealed + 2;

    /* Scrambled ids, hot and cold. */
    int32_t *perm = malloc(p->n_blocks * sizeof(int32_t));
    assert_non_null(perm);
    for (uint32_t i = 0; i < p->n_blocks; i++)
        perm[i] = (int32_t)i;
    shuffle(perm, p->n_hot);
    shuffle(perm + p->n_hot, p->n_blocks - p->n_hot);
    for (uint32_t lb = 0, k = 0; lb < p->n_lb; lb++) {
        p->stage[lb] = perm[lb];
        p->table[lb] = p->sealed[lb] ? perm[p->n_hot + k++] : perm[lb];
    }
    free(perm);

    size_t row = (size_t)p->n_kv * d, n = p->n_tok * row;
    p->stage_slots = malloc(p->n_tok * sizeof(int32_t));
    p->table_slots = malloc(p->n_tok * sizeof(int32_t));
    assert_true(p->stage_slots && p->table_slots);
    for (uint32_t s = 0; s < p->n_seqs; s++)
        for (int32_t j = 0; j < p->len[s]; j++) {
            int32_t lb = p->indptr[s] + j / (int32_t)bt, o = j % (int32_t)bt;
            p->stage_slots[p->tok0[s] + j] = p->stage[lb] * (int32_t)bt + o;
            p->table_slots[p->tok0[s] + j] = p->table[lb] * (int32_t)bt + o;
        }
    for (int l = 0; l < N_LAYERS; l++) {
        p->orig_k[l] = rand_floats(n, -2.0f, 2.0f);
        p->orig_v[l] = rand_floats(n, -2.0f, 2.0f);
        p->dec_k[l] = malloc(n * sizeof(float));
        p->dec_v[l] = malloc(n * sizeof(float));
        assert_true(p->dec_k[l] && p->dec_v[l]);
        for (size_t i = 0; i < n; i++) {
            p->orig_k[l][i] = as_stored(dtype, p->orig_k[l][i]);
            p->orig_v[l][i] = as_stored(dtype, p->orig_v[l][i]);
        }
        memcpy(p->dec_k[l], p->orig_k[l], n * sizeof(float));
        memcpy(p->dec_v[l], p->orig_v[l], n * sizeof(float));
    }

    /* The expected tiles, encoded here from the values, and their decode. */
    p->qk_tile = kern_kvq_tile_bytes(quant, false, bt, d);
    p->qv_tile = kern_kvq_tile_bytes(quant, true, bt, d);
    assert_true(p->qk_tile > 0 && p->qv_tile > 0);
    size_t n_tiles = (size_t)N_LAYERS * (p->n_sealed ? p->n_sealed : 1) * p->n_kv;
    p->tile_k = malloc(n_tiles * p->qk_tile);
    p->tile_v = malloc(n_tiles * p->qv_tile);
    float *x = malloc((size_t)bt * d * sizeof(float)), *y = malloc((size_t)bt * d * sizeof(float));
    assert_true(p->tile_k && p->tile_v && x && y);
    for (int l = 0; l < N_LAYERS; l++)
        for (uint32_t i = 0; i < p->n_sealed; i++) {
            uint32_t s, b;
            lb_where(p, (uint32_t)p->lb_seal[i], &s, &b);
            for (uint32_t h = 0; h < p->n_kv; h++)
                for (int v = 0; v < 2; v++) {
                    const float *src = v ? p->orig_v[l] : p->orig_k[l];
                    float *dst = v ? p->dec_v[l] : p->dec_k[l];
                    size_t tb = v ? p->qv_tile : p->qk_tile;
                    uint8_t *tile = (v ? p->tile_v : p->tile_k) +
                                    (((size_t)l * p->n_sealed + i) * p->n_kv + h) * tb;
                    for (uint32_t t = 0; t < bt; t++)
                        memcpy(x + (size_t)t * d, src + tok_row(p, s, b, t) * row + h * d,
                               d * sizeof(float));
                    assert_int_equal(kern_kvq_encode(quant, v, x, bt, d, tile), 0);
                    kern_kvq_decode(quant, v, tile, bt, d, 0, bt, y);
                    for (uint32_t t = 0; t < bt; t++)
                        memcpy(dst + tok_row(p, s, b, t) * row + h * d, y + (size_t)t * d,
                               d * sizeof(float));
                }
        }
    free(x);
    free(y);

    /* A chunk of 24 rows after earlier context, a decode row, a whole
     * prefill; then one decode row each (split-K on the cpu backend). */
    int32_t rows[MAX_SEQS] = {24, 1, p->len[2]}, ones[MAX_SEQS] = {1, 1, 1};
    call_build(p, &p->calls[0], "batch", rows, 4);
    call_build(p, &p->calls[1], "decode", ones, 1);
}

static void
qdata_free(qdata_t *p)
{
    free(p->stage);
    free(p->table);
    free(p->sealed);
    free(p->lb_seal);
    free(p->stage_slots);
    free(p->table_slots);
    for (int l = 0; l < N_LAYERS; l++) {
        free(p->orig_k[l]);
        free(p->orig_v[l]);
        free(p->dec_k[l]);
        free(p->dec_v[l]);
    }
    free(p->tile_k);
    free(p->tile_v);
    call_free(&p->calls[0]);
    call_free(&p->calls[1]);
}

/* ---- pools --------------------------------------------------------------- */

/* A pool of n_blocks blocks of N_LAYERS layers (kv_make_q). */
static kern_kv_t
pool_new(kern_backend_t *be, kern_kvq_t quant, kern_dtype_t dtype, uint32_t n_kv, uint32_t d,
         uint32_t bt, uint32_t n_hot, uint32_t n_blocks)
{
    const kv_geom_t g = {dtype, N_LAYERS, n_kv, d, bt, n_blocks};
    return kv_make_q(be, &g, quant, n_hot);
}

static size_t
hot_block_bytes(const kern_kv_t *kv)
{
    return (size_t)kv->n_kv_heads * kv->block_tokens * kv->head_dim *
           (kv->dtype == KERN_F16 ? 2 : 4);
}

/* (layer, block, head) of a hot block, from kern.h's layout. */
static uint8_t *
hot_at(const kern_kv_t *kv, bool v, uint32_t layer, uint32_t block, uint32_t head)
{
    return (uint8_t *)(v ? kv->v : kv->k) + layer * kv->layer_bytes +
           (size_t)block * hot_block_bytes(kv) +
           (size_t)head * hot_block_bytes(kv) / kv->n_kv_heads;
}

/* The tile of a cold block, from kern.h's layout [layer][block - n_hot][kv_head]. */
static uint8_t *
tile_at(const kern_kv_t *kv, bool v, uint32_t layer, uint32_t block, uint32_t head)
{
    size_t idx =
        ((size_t)layer * (kv->n_blocks - kv->n_hot) + (block - kv->n_hot)) * kv->n_kv_heads + head;
    return (uint8_t *)(v ? kv->qv : kv->qk) + idx * (v ? kv->qv_tile : kv->qk_tile);
}

/* Appends n tokens' host rows k, v to `layer` (through backend buffers). */
static void
append_host(kern_backend_t *be, const kern_kv_t *kv, uint32_t layer, const float *k, const float *v,
            const int32_t *slots, uint32_t n)
{
    size_t bytes = (size_t)n * kv->n_kv_heads * kv->head_dim * sizeof(float);
    float *kd = put(be, k, bytes), *vd = put(be, v, bytes);
    assert_int_equal(kern_kv_append(be, kv, layer, kd, vd, slots, n), 0);
    take(be, NULL, kd, bytes, "append k");
    take(be, NULL, vd, bytes, "append v");
}

static void
pool_fill(kern_backend_t *be, const kern_kv_t *kv, const qdata_t *p, float *const *k,
          float *const *v, const int32_t *slots)
{
    for (uint32_t l = 0; l < N_LAYERS; l++)
        append_host(be, kv, l, k[l], v[l], slots, p->n_tok);
}

/* A host copy of the pool (every buffer downloaded), for the checks that
 * read blocks and tiles directly, on any backend. */
static kern_kv_t
pool_snapshot(kern_backend_t *be, const kern_kv_t *kv)
{
    kern_kv_t h = *kv;
    size_t hot = kv->layer_bytes * N_LAYERS;
    size_t tiles = (size_t)N_LAYERS * (kv->n_blocks - kv->n_hot) * kv->n_kv_heads;
    h.k = malloc(hot);
    h.v = malloc(hot);
    assert_true(h.k && h.v);
    get(be, h.k, kv->k, hot, "snapshot k");
    get(be, h.v, kv->v, hot, "snapshot v");
    h.qk = h.qv = NULL;
    if (kv->qk) {
        h.qk = malloc(tiles * kv->qk_tile);
        h.qv = malloc(tiles * kv->qv_tile);
        assert_true(h.qk && h.qv);
        get(be, h.qk, kv->qk, tiles * kv->qk_tile, "snapshot qk");
        get(be, h.qv, kv->qv, tiles * kv->qv_tile, "snapshot qv");
    }
    return h;
}

static void
snapshot_free(kern_kv_t *h)
{
    free(h->k);
    free(h->v);
    free(h->qk);
    free(h->qv);
}

/* The quantized pool: every entry appended into its staging block, the
 * sealed ones sealed (in two calls), their tiles and read-backs checked,
 * and their staging blocks then filled with NaN, which any read of them
 * would carry into the outputs. */
static kern_kv_t
qpool_build(kern_backend_t *be, const qdata_t *p, const char *label)
{
    kern_kv_t kv = pool_new(be, p->quant, p->dtype, p->n_kv, p->d, p->bt, p->n_hot, p->n_blocks);
    pool_fill(be, &kv, p, p->orig_k, p->orig_v, p->stage_slots);
    int32_t *src = malloc((p->n_sealed + 1) * sizeof(int32_t));
    int32_t *dst = malloc((p->n_sealed + 1) * sizeof(int32_t));
    assert_true(src && dst);
    for (uint32_t i = 0; i < p->n_sealed; i++) {
        src[i] = p->stage[p->lb_seal[i]];
        dst[i] = p->table[p->lb_seal[i]];
    }
    uint32_t half = p->n_sealed / 2;
    assert_int_equal(kern_kv_seal(be, &kv, src, dst, half), 0);
    assert_int_equal(kern_kv_seal(be, &kv, src + half, dst + half, p->n_sealed - half), 0);
    assert_int_equal(kern_sync(be), 0);

    uint32_t bt = p->bt, d = p->d;
    float *full = malloc((size_t)bt * d * sizeof(float)), *one = malloc(d * sizeof(float));
    assert_true(full && one);
    kern_kv_t hs = pool_snapshot(be, &kv);
    for (uint32_t l = 0; l < N_LAYERS; l++)
        for (uint32_t i = 0; i < p->n_sealed; i++) {
            uint32_t blk = (uint32_t)dst[i];
            for (uint32_t h = 0; h < p->n_kv; h++)
                for (int v = 0; v < 2; v++) {
                    size_t tb = v ? p->qv_tile : p->qk_tile;
                    const uint8_t *want = (v ? p->tile_v : p->tile_k) +
                                          (((size_t)l * p->n_sealed + i) * p->n_kv + h) * tb;
                    const uint8_t *got = tile_at(&hs, v, l, blk, h);
                    check_bytes_equal(want, got, tb, v ? "sealed V tile" : "sealed K tile", label);
                    /* Row reads and partial decodes: the bits of the whole. */
                    kern_kvq_decode(p->quant, v, got, bt, d, 0, bt, full);
                    for (uint32_t t = 0; t < bt; t++) {
                        kern_kv_row_f32(&hs, v, l, (int32_t)blk, h, t, one);
                        check_bytes_equal(full + (size_t)t * d, one, d * sizeof(float),
                                          "kern_kv_row_f32 of a cold block", label);
                    }
                    uint32_t t0 = rng_u32() % bt, n = 1 + rng_u32() % (bt - t0);
                    float *part = malloc((size_t)n * d * sizeof(float));
                    assert_non_null(part);
                    kern_kvq_decode(p->quant, v, got, bt, d, t0, n, part);
                    check_bytes_equal(full + (size_t)t0 * d, part, (size_t)n * d * sizeof(float),
                                      "partial decode", label);
                    free(part);
                }
        }
    /* Hot entries read back as stored. */
    size_t row = (size_t)p->n_kv * d;
    for (uint32_t lb = 0; lb < p->n_lb; lb++) {
        if (p->sealed[lb])
            continue;
        uint32_t s, b;
        lb_where(p, lb, &s, &b);
        uint32_t n =
            b + 1 == (uint32_t)(p->indptr[s + 1] - p->indptr[s]) ? (uint32_t)p->last_len[s] : bt;
        for (uint32_t t = 0; t < n; t++) {
            kern_kv_row_f32(&hs, true, LAYER, p->table[lb], 1, t, one);
            check_bytes_equal(p->orig_v[LAYER] + tok_row(p, s, b, t) * row + d, one,
                              d * sizeof(float), "kern_kv_row_f32 of a hot block", label);
        }
    }
    for (uint32_t l = 0; l < N_LAYERS; l++)
        for (uint32_t i = 0; i < p->n_sealed; i++)
            for (int v = 0; v < 2; v++)
                poison(be, hot_at(&kv, v, l, (uint32_t)src[i], 0), hot_block_bytes(&kv));
    snapshot_free(&hs);
    free(full);
    free(one);
    free(src);
    free(dst);
    return kv;
}

/* ---- attention ----------------------------------------------------------- */

static void
attend(kern_backend_t *be, const qdata_t *p, const qcall_t *c, int pat, const kern_kv_t *kv,
       float *out)
{
    size_t n = (size_t)c->n_q * p->n_heads * p->d;
    float *od = put_out(be, n), *qd = put(be, c->q, n * sizeof(float));
    kern_attn_args_t a = {.q = qd,
                          .out = od,
                          .n_q = c->n_q,
                          .n_heads = p->n_heads,
                          .q_indptr = c->q_indptr,
                          .kv_len = c->kv_len,
                          .pt = {.indptr = p->indptr,
                                 .indices = p->table,
                                 .last_len = p->last_len,
                                 .n_seqs = p->n_seqs},
                          .kv = kv,
                          .layer = LAYER,
                          .scale = p->scale};
    if (pat == PAT_SINK_WINDOW || pat == PAT_DENSE_ROWS) {
        a.sink_tokens = 4;
        a.window_tokens = 24;
    }
    if (pat == PAT_MASK) {
        a.block_mask = c->mask;
        a.mask_stride = c->stride;
        a.mask_q_block = c->qb;
    }
    if (pat == PAT_DENSE_ROWS)
        a.dense_rows = c->dense;
    assert_int_equal(kern_attention(be, &a), 0);
    take(be, out, od, n * sizeof(float), "attention out");
    take(be, NULL, qd, n * sizeof(float), "attention q");
}

static double
rel_err(const float *ref, const float *got, size_t n)
{
    double mx = 1e-30, err = 0.0;
    for (size_t i = 0; i < n; i++)
        mx = fabs(ref[i]) > mx ? fabs(ref[i]) : mx;
    for (size_t i = 0; i < n; i++) {
        double e = fabs((double)got[i] - ref[i]);
        err = e > err || isnan(e) ? (isnan(e) ? INFINITY : e) : err;
    }
    return err / mx;
}

/* How far attention over a quantized pool may be from attention over the
 * values themselves, as max|out - exact| / max|out| over a call.  Data:
 * K, V and q uniform in [-2, 2], about 3/4 of the keys in cold blocks.
 * The worst case is always a row that sees few keys (sink + window
 * decode rows, block masks), whose output is close to single V rows, so
 * the error is of the order of the codec's error on one value:
 *   BF16  8 significant bits, <= 2^-9 of each value:    measured 3.0e-3;
 *   Q8_0  steps of max|32 values| / 127, <= 2^-8 of the
 *         block's max (~2x bf16):                        measured 6.4e-3;
 *   FP8   e4m3, 4 significant bits, <= 2^-4 of each
 *         value (~8x q8_0):                              measured 5.0e-2;
 *   Q4    16 levels over each group's range (~4 here):
 *         steps of ~0.27, <= 1/15 of max|x|:             measured 1.05e-1.
 * The bounds are ~2.5x the measurement at this test's seed; over 16 other
 * seeds the worst were 4.3e-3, 1.03e-2, 7.6e-2 and 1.55e-1. */
static const double kQuantBound[KERN_KVQ_COUNT] = {[KERN_KVQ_BF16] = 8e-3,
                                                   [KERN_KVQ_Q8_0] = 1.6e-2,
                                                   [KERN_KVQ_FP8] = 1.25e-1,
                                                   [KERN_KVQ_Q4] = 2.5e-1};
static double g_worst[KERN_KVQ_COUNT];

/* ---- tests --------------------------------------------------------------- */

/* Every codec x head_dim x block_tokens, hot blocks F32 or F16, GQA 2 or
 * 4: the quantized pool against an F32 pool of its decoded values (both
 * with the same ids and table), cpu against ref, and against an F32 pool
 * of the values themselves within kQuantBound. */
static void
test_attention_over_cold_blocks(void **state)
{
    (void)state;
    rng_seed(61);
    static const kern_kvq_t codecs[] = {KERN_KVQ_BF16, KERN_KVQ_Q8_0, KERN_KVQ_FP8, KERN_KVQ_Q4};
    memset(g_worst, 0, sizeof(g_worst));
    int iter = 0;
    for (int ci = 0; ci < 4; ci++)
        for (uint32_t d = 64; d <= 128; d *= 2)
            for (uint32_t bt = 16; bt <= 32; bt *= 2, iter++) {
                kern_kvq_t quant = codecs[ci];
                kern_dtype_t dtype = iter % 2 ? KERN_F16 : KERN_F32;
                uint32_t group = iter % 4 < 2 ? 2 : 4;
                qdata_t p;
                qdata_build(&p, quant, dtype, bt, d, group);
                float *ref_out[2][N_PATS] = {{NULL}};
                for (int b = 0; b < g_n_be; b++) {
                    kern_backend_t *be = g_be[b].be;
                    kern_kv_t qkv = qpool_build(be, &p, g_be[b].label);
                    kern_kv_t dkv =
                        pool_new(be, KERN_KVQ_NONE, KERN_F32, p.n_kv, d, bt, 0, p.n_blocks);
                    kern_kv_t okv =
                        pool_new(be, KERN_KVQ_NONE, KERN_F32, p.n_kv, d, bt, 0, p.n_blocks);
                    pool_fill(be, &dkv, &p, p.dec_k, p.dec_v, p.table_slots);
                    pool_fill(be, &okv, &p, p.orig_k, p.orig_v, p.table_slots);
                    for (int ck = 0; ck < 2; ck++) {
                        const qcall_t *c = &p.calls[ck];
                        size_t n = (size_t)c->n_q * p.n_heads * d;
                        float *yq = malloc(n * sizeof(float)), *yd = malloc(n * sizeof(float));
                        float *yo = malloc(n * sizeof(float));
                        assert_true(yq && yd && yo);
                        for (int pat = 0; pat < N_PATS; pat++) {
                            char what[160];
                            snprintf(what, sizeof(what), "%s %s-hot d %u bt %u group %u %s %s",
                                     kern_kvq_name(quant), dtype == KERN_F16 ? "f16" : "f32", d, bt,
                                     group, c->name, pat_names[pat]);
                            attend(be, &p, c, pat, &qkv, yq);
                            attend(be, &p, c, pat, &dkv, yd);
                            attend(be, &p, c, pat, &okv, yo);
                            /* cuda's tensor-core prefill (F16 hot blocks) rounds q,
                             * P and the decoded keys and values to f16. */
                            double lim =
                                !kern_backend_is_host(be) && dtype == KERN_F16 ? 5e-3 : 1e-5;
                            check_close(yd, yq, n, lim, what, "vs decoded f32 pool");
                            if (b == 0) {
                                ref_out[ck][pat] = malloc(n * sizeof(float));
                                assert_non_null(ref_out[ck][pat]);
                                memcpy(ref_out[ck][pat], yq, n * sizeof(float));
                            } else {
                                check_close(ref_out[ck][pat], yq, n, lim, what, g_be[b].label);
                            }
                            double e = rel_err(yo, yq, n);
                            g_worst[quant] = e > g_worst[quant] ? e : g_worst[quant];
                            check_close(yo, yq, n, kQuantBound[quant], what,
                                        "vs unquantized values");
                        }
                        free(yq);
                        free(yd);
                        free(yo);
                    }
                    kv_take_q(be, &qkv);
                    kv_take_q(be, &dkv);
                    kv_take_q(be, &okv);
                }
                for (int ck = 0; ck < 2; ck++)
                    for (int pat = 0; pat < N_PATS; pat++)
                        free(ref_out[ck][pat]);
                qdata_free(&p);
            }
    for (int q = 1; q < KERN_KVQ_COUNT; q++)
        print_message("kv quant %-5s worst error vs unquantized %.3g (bound %.3g)\n",
                      kern_kvq_name((kern_kvq_t)q), g_worst[q], kQuantBound[q]);
}

/* Hot block blk holds the decode of cold block cold in every layer, K and
 * V: kern_kv_row_f32's bits (F32 pools) or their fp16 rounding (F16). */
static void
check_unsealed(const kern_kv_t *kv, uint32_t blk, int32_t cold, const char *label)
{
    uint32_t d = kv->head_dim;
    bool f16 = kv->dtype == KERN_F16;
    float *dec = malloc(d * sizeof(float));
    assert_non_null(dec);
    for (uint32_t l = 0; l < kv->n_layers; l++)
        for (int v = 0; v < 2; v++)
            for (uint32_t h = 0; h < kv->n_kv_heads; h++)
                for (uint32_t t = 0; t < kv->block_tokens; t++) {
                    kern_kv_row_f32(kv, v, l, cold, h, t, dec);
                    const uint8_t *r = hot_at(kv, v, l, blk, h) + (size_t)t * d * (f16 ? 2 : 4);
                    for (uint32_t c = 0; c < d; c++) {
                        uint32_t got = 0, want;
                        if (f16) {
                            memcpy(&got, r + 2 * c, 2); /* little-endian host */
                            want = kvs_f32_to_fp16(dec[c]);
                        } else {
                            memcpy(&got, r + 4 * c, 4);
                            want = kvs_f32_to_bits(dec[c]);
                        }
                        if (got != want) {
                            print_error("%s %s bt %u d %u [%s]: block %u after unsealing %d: "
                                        "layer %u %c head %u token %u channel %u: %08x != %08x\n",
                                        kern_kvq_name(kv->quant), f16 ? "f16" : "f32",
                                        kv->block_tokens, d, label, blk, cold, l, v ? 'V' : 'K', h,
                                        t, c, got, want);
                            fail();
                        }
                    }
                }
    free(dec);
}

/* Sealing then unsealing: the reopened hot block holds the decoded values
 * (check_unsealed), the sources of both calls are left as they were, and
 * no other block moves.  block_tokens 64 has two Q4 K groups a tile. */
static void
test_seal_unseal_round_trip(void **state)
{
    (void)state;
    rng_seed(62);
    static const uint32_t shapes[][2] = {{16, 64}, {32, 128}, {64, 32}};
    for (int b = 0; b < g_n_be; b++) {
        kern_backend_t *be = g_be[b].be;
        const char *label = g_be[b].label;
        for (int q = 1; q < KERN_KVQ_COUNT; q++)
            for (int sh = 0; sh < 3; sh++)
                for (int f16 = 0; f16 < 2; f16++) {
                    kern_kvq_t quant = (kern_kvq_t)q;
                    uint32_t bt = shapes[sh][0], d = shapes[sh][1], n_kv = 2;
                    /* Hot 0..3, cold 4..6, every hot slot written. */
                    kern_kv_t kv =
                        pool_new(be, quant, f16 ? KERN_F16 : KERN_F32, n_kv, d, bt, 4, 7);
                    size_t row = (size_t)n_kv * d, n_tok = 4 * (size_t)bt;
                    int32_t *slots = malloc(n_tok * sizeof(int32_t));
                    assert_non_null(slots);
                    for (size_t i = 0; i < n_tok; i++)
                        slots[i] = (int32_t)i;
                    for (uint32_t l = 0; l < N_LAYERS; l++) {
                        float *k = rand_floats(n_tok * row, -3.0f, 3.0f);
                        float *v = rand_floats(n_tok * row, -1.0f, 1.0f);
                        append_host(be, &kv, l, k, v, slots, (uint32_t)n_tok);
                        free(k);
                        free(v);
                    }
                    size_t hot = kv.layer_bytes * N_LAYERS, blk_bytes = hot_block_bytes(&kv);
                    size_t tiles_k = (size_t)N_LAYERS * 3 * n_kv * kv.qk_tile;
                    size_t tiles_v = (size_t)N_LAYERS * 3 * n_kv * kv.qv_tile;
                    kern_kv_t s0 = pool_snapshot(be, &kv);

                    const int32_t seal_src[2] = {1, 3}, seal_dst[2] = {6, 4};
                    assert_int_equal(kern_kv_seal(be, &kv, seal_src, seal_dst, 2), 0);
                    kern_kv_t s1 = pool_snapshot(be, &kv);
                    check_bytes_equal(s0.k, s1.k, hot, "seal leaves hot K", label);
                    check_bytes_equal(s0.v, s1.v, hot, "seal leaves hot V", label);

                    /* Cold 6 into hot 0 (another block), cold 4 back into hot 3. */
                    const int32_t open_src[2] = {6, 4}, open_dst[2] = {0, 3};
                    assert_int_equal(kern_kv_seal(be, &kv, open_src, open_dst, 2), 0);
                    kern_kv_t s2 = pool_snapshot(be, &kv);
                    check_bytes_equal(s1.qk, s2.qk, tiles_k, "unseal leaves K tiles", label);
                    check_bytes_equal(s1.qv, s2.qv, tiles_v, "unseal leaves V tiles", label);
                    check_unsealed(&s2, 0, 6, label);
                    check_unsealed(&s2, 3, 4, label);
                    for (uint32_t l = 0; l < N_LAYERS; l++)
                        for (uint32_t blk = 1; blk <= 2; blk++) {
                            size_t off = (size_t)(hot_at(&s2, false, l, blk, 0) - (uint8_t *)s2.k);
                            check_bytes_equal((uint8_t *)s0.k + off, (uint8_t *)s2.k + off,
                                              blk_bytes, "unseal leaves other K blocks", label);
                            check_bytes_equal((uint8_t *)s0.v + off, (uint8_t *)s2.v + off,
                                              blk_bytes, "unseal leaves other V blocks", label);
                        }
                    snapshot_free(&s0);
                    snapshot_free(&s1);
                    snapshot_free(&s2);
                    free(slots);
                    kv_take_q(be, &kv);
                }
    }
}

/* Decoding tokens [t0, t0 + n) of a tile gives the bits of those rows of
 * a whole-tile decode, for every codec and shape the kernels may decode
 * a run of keys from (including block_tokens 64: two Q4 K groups). */
static void
test_partial_decode(void **state)
{
    (void)state;
    rng_seed(63);
    static const uint32_t bts[] = {2, 16, 32, 64}, ds[] = {32, 64, 128};
    for (int q = 1; q < KERN_KVQ_COUNT; q++)
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 3; j++)
                for (int v = 0; v < 2; v++) {
                    kern_kvq_t quant = (kern_kvq_t)q;
                    uint32_t bt = bts[i], d = ds[j];
                    size_t tb = kern_kvq_tile_bytes(quant, v, bt, d);
                    assert_true(tb > 0);
                    float *x = rand_floats((size_t)bt * d, -4.0f, 4.0f);
                    float *full = malloc((size_t)bt * d * sizeof(float));
                    float *part = malloc((size_t)bt * d * sizeof(float));
                    uint8_t *tile = malloc(tb);
                    assert_true(full && part && tile);
                    assert_int_equal(kern_kvq_encode(quant, v, x, bt, d, tile), 0);
                    kern_kvq_decode(quant, v, tile, bt, d, 0, bt, full);
                    for (int k = 0; k < 12; k++) {
                        uint32_t t0 = rng_u32() % bt, n = 1 + rng_u32() % (bt - t0);
                        kern_kvq_decode(quant, v, tile, bt, d, t0, n, part);
                        check_bytes_equal(full + (size_t)t0 * d, part,
                                          (size_t)n * d * sizeof(float), "partial decode",
                                          kern_kvq_name(quant));
                    }
                    free(x);
                    free(full);
                    free(part);
                    free(tile);
                }
}

/* The argument checks of kern.c for pools with cold blocks. */
static void
test_validation(void **state)
{
    (void)state;
    rng_seed(64);
    const uint32_t bt = 16, d = 64, n_kv = 2;
    for (int b = 0; b < g_n_be; b++) {
        kern_backend_t *be = g_be[b].be;
        /* kern.c's checks are every backend's; the calls below hand host
         * arrays as backend memory. */
        if (!kern_backend_is_host(be))
            continue;
        for (int q = 1; q < KERN_KVQ_COUNT; q++) {
            kern_kvq_t quant = (kern_kvq_t)q;
            /* Hot 0..3, cold 4..6. */
            kern_kv_t kv = pool_new(be, quant, KERN_F32, n_kv, d, bt, 4, 7);
            size_t row = (size_t)n_kv * d;
            float *k = rand_floats(2 * bt * row, -1.0f, 1.0f);
            float *v = rand_floats(2 * bt * row, -1.0f, 1.0f);
            int32_t slots[32];
            for (uint32_t i = 0; i < 2 * bt; i++)
                slots[i] = (int32_t)i;
            assert_int_equal(kern_kv_append(be, &kv, 0, k, v, slots, 2 * bt), 0);
            assert_int_equal(kern_kv_append(be, &kv, 1, k, v, slots, 2 * bt), 0);

            /* Seal: one hot and one cold id, in range. */
            int32_t hh[2] = {0, 1}, cc[2] = {4, 5}, hc[2] = {0, 4}, ch[2] = {4, 0};
            assert_int_equal(kern_kv_seal(be, &kv, &hh[0], &hh[1], 1), KVS_EINVAL);
            assert_int_equal(kern_kv_seal(be, &kv, &cc[0], &cc[1], 1), KVS_EINVAL);
            assert_int_equal(kern_kv_seal(be, &kv, &cc[0], &cc[0], 1), KVS_EINVAL);
            assert_int_equal(kern_kv_seal(be, &kv, &hc[0], &hc[1], 1), 0);
            assert_int_equal(kern_kv_seal(be, &kv, &ch[0], &ch[1], 1), 0);
            int32_t two_src[2] = {1, 2}, two_dst[2] = {5, 3}; /* the second is hot -> hot */
            assert_int_equal(kern_kv_seal(be, &kv, two_src, two_dst, 2), KVS_EINVAL);
            /* A seal and a reopen in one call (1 -> 5, then 5 -> 2): refused,
             * so a backend may run the pairs in any order. */
            int32_t mix_src[2] = {1, 5}, mix_dst[2] = {5, 2};
            assert_int_equal(kern_kv_seal(be, &kv, mix_src, mix_dst, 2), KVS_EINVAL);
            int32_t out_src[1] = {1}, out_dst[1] = {7}, neg[1] = {-1};
            assert_int_equal(kern_kv_seal(be, &kv, out_src, out_dst, 1), KVS_EINVAL);
            assert_int_equal(kern_kv_seal(be, &kv, neg, cc, 1), KVS_EINVAL);
            assert_int_equal(kern_kv_seal(be, &kv, NULL, NULL, 0), 0);
            kern_kv_t plain = kv;
            plain.quant = KERN_KVQ_NONE; /* no codec: nothing to seal into */
            assert_int_equal(kern_kv_seal(be, &plain, &hc[0], &hc[1], 1), KVS_EINVAL);

            /* Appends write hot blocks only. */
            int32_t last_hot = 4 * (int32_t)bt - 1, first_cold = 4 * (int32_t)bt;
            assert_int_equal(kern_kv_append(be, &kv, 1, k, v, &last_hot, 1), 0);
            assert_int_equal(kern_kv_append(be, &kv, 1, k, v, &first_cold, 1), KVS_EINVAL);
            int32_t last_cold = 7 * (int32_t)bt - 1;
            assert_int_equal(kern_kv_append(be, &kv, 1, k, v, &last_cold, 1), KVS_EINVAL);

            /* Copies too. */
            assert_int_equal(kern_kv_copy(be, &kv, &hh[0], &hh[1], 1), 0);
            assert_int_equal(kern_kv_copy(be, &kv, &hc[0], &hc[1], 1), KVS_EINVAL);
            assert_int_equal(kern_kv_copy(be, &kv, &ch[0], &ch[1], 1), KVS_EINVAL);
            assert_int_equal(kern_kv_copy(be, &kv, &cc[0], &cc[1], 1), KVS_EINVAL);

            /* Attention: a 20-key sequence over hot 0 and cold 4. */
            int32_t indptr[2] = {0, 2}, indices[2] = {0, 4}, last_len[1] = {4};
            int32_t q_indptr[2] = {0, 1}, kv_len[1] = {20};
            float *qv = rand_floats(4 * d, -1.0f, 1.0f), *out = malloc(4 * d * sizeof(float));
            assert_non_null(out);
            kern_attn_args_t a = {
                .q = qv,
                .out = out,
                .n_q = 1,
                .n_heads = 4,
                .q_indptr = q_indptr,
                .kv_len = kv_len,
                .pt = {.indptr = indptr, .indices = indices, .last_len = last_len, .n_seqs = 1},
                .kv = &kv,
                .layer = 1,
                .scale = 0.125f};
            assert_int_equal(kern_attention(be, &a), 0);
            kern_kv_t bad = kv;
            a.kv = &bad;
            bad.qk_tile = kv.qk_tile + 1;
            assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
            bad.qk_tile = kv.qk_tile - 2;
            assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
            bad = kv;
            bad.qv_tile = kv.qv_tile + 2;
            assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
            bad = kv;
            bad.qk_tile = kv.qv_tile; /* K and V tiles differ only for Q4 */
            bad.qv_tile = kv.qk_tile;
            assert_int_equal(kern_attention(be, &a), quant == KERN_KVQ_Q4 ? KVS_EINVAL : 0);
            bad = kv;
            bad.quant = KERN_KVQ_COUNT;
            assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
            bad = kv;
            bad.n_hot = 0;
            assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
            bad = kv;
            bad.n_hot = 8;
            assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
            bad = kv;
            bad.qv = NULL; /* cold blocks without tiles */
            assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
            bad = kv;
            bad.block_tokens = 15; /* a tile size for another shape (and Q4 needs bt even) */
            assert_int_equal(kern_attention(be, &a), KVS_EINVAL);
            a.kv = &kv;
            free(qv);
            free(out);

            /* Shapes the codecs cannot store. */
            assert_int_equal(kern_kvq_tile_bytes(quant, false, bt, 0), 0);
            assert_int_equal(kern_kvq_tile_bytes(quant, false, 0, d), 0);
            bool d32 = quant == KERN_KVQ_Q8_0 || quant == KERN_KVQ_Q4;
            assert_int_equal(kern_kvq_tile_bytes(quant, true, bt, 48) == 0, d32);
            assert_int_equal(kern_kvq_tile_bytes(quant, false, 7, 64) == 0, quant == KERN_KVQ_Q4);
            float x[48 * 7] = {0};
            uint8_t tile[2 * 48 * 7 + 64];
            assert_int_equal(kern_kvq_encode(quant, true, x, 7, 48, tile), d32 ? KVS_EINVAL : 0);
            free(k);
            free(v);
            kv_take_q(be, &kv);
        }
    }

    /* Tile sizes as kern_kvq.c documents them. */
    assert_int_equal(kern_kvq_tile_bytes(KERN_KVQ_NONE, false, 16, 64), 0);
    assert_int_equal(kern_kvq_tile_bytes(KERN_KVQ_BF16, true, 16, 64), 16 * 64 * 2);
    assert_int_equal(kern_kvq_tile_bytes(KERN_KVQ_Q8_0, false, 32, 128), 32 * 4 * 34);
    assert_int_equal(kern_kvq_tile_bytes(KERN_KVQ_FP8, true, 16, 128), 16 * (2 + 128));
    /* Q4: 6 + 3 G / 2 + bt d / 2, G = bt d / min(bt, 32) (K), bt d / 32 (V). */
    assert_int_equal(kern_kvq_tile_bytes(KERN_KVQ_Q4, false, 32, 64), 6 + 96 + 1024);
    assert_int_equal(kern_kvq_tile_bytes(KERN_KVQ_Q4, true, 32, 64), 6 + 96 + 1024);
    assert_int_equal(kern_kvq_tile_bytes(KERN_KVQ_Q4, false, 16, 64), 6 + 96 + 512);
    assert_int_equal(kern_kvq_tile_bytes(KERN_KVQ_Q4, true, 16, 64), 6 + 48 + 512);
    assert_string_equal(kern_kvq_name(KERN_KVQ_Q8_0), "q8_0");
    assert_null(kern_kvq_name(KERN_KVQ_COUNT));
}

/* A pool with a codec but n_hot == n_blocks (nothing sealed yet, qk and qv
 * NULL) computes exactly what the same pool without a codec does. */
static void
test_no_cold_blocks_is_plain(void **state)
{
    (void)state;
    rng_seed(65);
    for (int iter = 0; iter < 4; iter++) {
        kern_dtype_t dtype = iter % 2 ? KERN_F16 : KERN_F32;
        uint32_t bt = iter < 2 ? 16 : 32, d = iter < 2 ? 64 : 128;
        qdata_t p;
        qdata_build(&p, KERN_KVQ_BF16, dtype, bt, d, iter < 2 ? 2 : 4);
        for (int b = 0; b < g_n_be; b++) {
            kern_backend_t *be = g_be[b].be;
            kern_kv_t kv =
                pool_new(be, KERN_KVQ_NONE, dtype, p.n_kv, d, bt, p.n_blocks, p.n_blocks);
            pool_fill(be, &kv, &p, p.orig_k, p.orig_v, p.table_slots);
            for (int ck = 0; ck < 2; ck++) {
                const qcall_t *c = &p.calls[ck];
                size_t n = (size_t)c->n_q * p.n_heads * d;
                float *plain = malloc(n * sizeof(float)), *coded = malloc(n * sizeof(float));
                assert_true(plain && coded);
                for (int pat = 0; pat < N_PATS; pat++) {
                    attend(be, &p, c, pat, &kv, plain);
                    for (int q = 1; q < KERN_KVQ_COUNT; q++) {
                        kern_kv_t ckv = kv;
                        ckv.quant = (kern_kvq_t)q;
                        ckv.n_hot = kv.n_blocks;
                        ckv.qk_tile = kern_kvq_tile_bytes(ckv.quant, false, bt, d);
                        ckv.qv_tile = kern_kvq_tile_bytes(ckv.quant, true, bt, d);
                        attend(be, &p, c, pat, &ckv, coded);
                        char what[160];
                        snprintf(what, sizeof(what), "%s pool without cold blocks, %s %s %s",
                                 kern_kvq_name(ckv.quant), dtype == KERN_F16 ? "f16" : "f32",
                                 c->name, pat_names[pat]);
                        check_bytes_equal(plain, coded, n * sizeof(float), what, g_be[b].label);
                    }
                }
                free(plain);
                free(coded);
            }
            kv_take_q(be, &kv);
        }
        qdata_free(&p);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_attention_over_cold_blocks),
        cmocka_unit_test(test_seal_unseal_round_trip),
        cmocka_unit_test(test_partial_decode),
        cmocka_unit_test(test_validation),
        cmocka_unit_test(test_no_cold_blocks_is_plain),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
