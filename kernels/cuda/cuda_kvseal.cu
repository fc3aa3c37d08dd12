/*
 * kernels/cuda/cuda_kvseal.cu — kern_kv_seal on the cuda backend: full
 * blocks quantized into tiles (a block filled up), and tiles decoded back
 * into full-precision blocks (a truncate reopening one).  Called by the
 * vtable wrapper in kern_cuda.cu after kern.c validated the pairs.
 *
 * The codecs run on the host, through the very code the host backends use
 * (kern__host_kv_seal_layer, kern_kvq.c), so a tile is byte for byte what
 * ref and cpu write: Q4's parameter search is a sequential walk over
 * candidate units that would gain nothing on the device, and sealing
 * happens once per block_tokens appended tokens of a sequence.  The
 * device only moves bytes:
 *
 *   pool --gather kernel--> mirror (device) --one copy--> mirror (pinned)
 *        kern__host_kv_seal_layer on a small pool made of the mirror
 *   pool <--scatter kernel-- mirror (device) <--one copy-- mirror (pinned)
 *
 * The mirror is a pool of 2m blocks, m pairs at a time: pair i's
 * full-precision side is its block i, its quantized side its block m + i,
 * so the host code sees an ordinary pool.  Each run (one layer of a
 * block's K or V: its heads' rows, or its heads' tiles) is one segment of
 * the batched copy, so a batch costs two kernels and two copies whatever
 * m is.
 */
#include "cuda_common.cuh"

#include <stdlib.h>
#include <string.h>

#define SEAL_MIRROR_BYTES (64u << 20) /* a batch of pairs stays below this */

/* One run to copy: device addresses, byte count. */
typedef struct seal_seg {
    uint64_t from, to, bytes;
} seal_seg_t;

/* A block per segment; 16-byte words where both ends and the length
 * allow (full-precision runs), bytes otherwise (a Q4 tile may be odd). */
static __global__ void
seal_copy_kernel(const seal_seg_t *segs)
{
    const seal_seg_t sg = segs[blockIdx.x];
    if ((sg.from | sg.to | sg.bytes) % 16 == 0) {
        const uint4 *f = (const uint4 *)sg.from;
        uint4 *t = (uint4 *)sg.to;
        for (uint64_t i = threadIdx.x; i < sg.bytes / 16; i += blockDim.x)
            t[i] = f[i];
        return;
    }
    const uint8_t *f = (const uint8_t *)sg.from;
    uint8_t *t = (uint8_t *)sg.to;
    for (uint64_t i = threadIdx.x; i < sg.bytes; i += blockDim.x)
        t[i] = f[i];
}

/* The mirror's layout for m pairs: hot K, hot V ([layer][m] blocks each),
 * then K tiles and V tiles ([layer][m][kv head] each). */
typedef struct seal_layout {
    size_t block, krun, vrun; /* one layer of a hot block; one layer of a cold block's tiles */
    size_t hk, hv, qk, qv, total;
} seal_layout_t;

static seal_layout_t
seal_layout(const kern_kv_t *kv, uint32_t m)
{
    seal_layout_t o;
    o.block = kern__kv_offset(kv, 0, 1, 0, 0);
    o.krun = (size_t)kv->n_kv_heads * kv->qk_tile;
    o.vrun = (size_t)kv->n_kv_heads * kv->qv_tile;
    const size_t lm = (size_t)kv->n_layers * m;
    o.hk = 0;
    o.hv = lm * o.block;
    o.qk = 2 * lm * o.block;
    o.qv = o.qk + lm * o.krun;
    o.total = o.qv + lm * o.vrun;
    return o;
}

/* Device address of one layer of block b's K (v false) or V run. */
static uint64_t
pool_run(const kern_kv_t *kv, uint32_t layer, uint32_t b, bool v)
{
    if (b < kv->n_hot)
        return (uint64_t)(uintptr_t)((const char *)(v ? kv->v : kv->k) +
                                     kern__kv_offset(kv, layer, b, 0, 0));
    return (uint64_t)(uintptr_t)kern__kv_tile(kv, v, layer, b, 0);
}

/* Offset in the mirror of pair i's run in `layer`: its hot side or its
 * cold side, K or V. */
static size_t
mirror_run(const seal_layout_t *o, uint32_t m, uint32_t layer, uint32_t i, bool cold, bool v)
{
    const size_t at = (size_t)layer * m + i;
    if (!cold)
        return (v ? o->hv : o->hk) + at * o->block;
    return v ? o->qv + at * o->vrun : o->qk + at * o->krun;
}

/* Room for a batch whose mirror takes `total` bytes: the device mirror
 * (in *mirror), the pinned one and the codec's scratch row. */
static int
seal_room(kern_cuda_t *be, const kern_kv_t *kv, size_t total, void **mirror)
{
    int rc = kern__cuda_workspace(be, KERN_CUDA_WS_SEAL, total, mirror);
    if (rc)
        return rc;
    if (total > be->seal_host_bytes) {
        KERN_CUDA_TRY(cudaStreamSynchronize(be->stream)); /* the last batch's copy out of it */
        void *old = be->seal_host;
        be->seal_host = NULL;
        be->seal_host_bytes = 0;
        if (old)
            KERN_CUDA_TRY(cudaFreeHost(old));
        cudaError_t e = cudaHostAlloc(&be->seal_host, total, cudaHostAllocDefault);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            be->seal_host = NULL;
            KVS_WARNF("cuda: kv_seal: pinned mirror of %zu bytes: %s", total,
                      cudaGetErrorString(e));
            return KVS_ENOMEM;
        }
        be->seal_host_bytes = total;
    }
    const size_t x_bytes = (size_t)kv->block_tokens * kv->head_dim * sizeof(float);
    if (x_bytes > be->seal_x_bytes) {
        float *x = (float *)realloc(be->seal_x, x_bytes);
        if (x == NULL)
            return KVS_ENOMEM;
        be->seal_x = x;
        be->seal_x_bytes = x_bytes;
    }
    return 0;
}

/* The staged segment lists of a batch of m pairs (seal_batch). */
static size_t
seal_stage_bytes(const kern_kv_t *kv, uint32_t m)
{
    return 2 * ((size_t)kv->n_layers * m * 2) * sizeof(seal_seg_t);
}

/* Pairs a batch takes: as many as fit the mirror's bound. */
static uint32_t
seal_per_batch(const kern_kv_t *kv)
{
    const seal_layout_t one = seal_layout(kv, 1);
    uint32_t per = one.total ? (uint32_t)(SEAL_MIRROR_BYTES / one.total) : 1;
    return per ? per : 1;
}

/* Pairs [p0, p0 + m): sources in, the host codec, destinations out. */
static int
seal_batch(kern_cuda_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
           uint32_t p0, uint32_t m)
{
    const seal_layout_t o = seal_layout(kv, m);
    const uint32_t L = kv->n_layers;
    void *mirror;
    int rc = seal_room(be, kv, o.total, &mirror);
    if (rc)
        return rc;

    /* Both segment lists in one staged buffer: L * m * 2 runs each way. */
    const size_t n_seg = (size_t)L * m * 2;
    const size_t bytes = seal_stage_bytes(kv, m);
    void *h, *d;
    if ((rc = kern__cuda_stage_begin(be, bytes, &h)) != 0)
        return rc;
    seal_seg_t *in = (seal_seg_t *)h, *out = in + n_seg;
    const uint64_t mb = (uint64_t)(uintptr_t)mirror;
    size_t at = 0;
    for (uint32_t l = 0; l < L; l++)
        for (uint32_t i = 0; i < m; i++)
            for (int v = 0; v < 2; v++, at++) {
                const uint32_t s = (uint32_t)src[p0 + i], t = (uint32_t)dst[p0 + i];
                const bool sc = s >= kv->n_hot; /* the source is the quantized side */
                in[at].from = pool_run(kv, l, s, v);
                in[at].to = mb + mirror_run(&o, m, l, i, sc, v);
                in[at].bytes = sc ? (v ? o.vrun : o.krun) : o.block;
                out[at].from = mb + mirror_run(&o, m, l, i, !sc, v);
                out[at].to = pool_run(kv, l, t, v);
                out[at].bytes = sc ? o.block : (v ? o.vrun : o.krun);
            }
    if ((rc = kern__cuda_stage_end(be, bytes, &d)) != 0)
        return rc;
    if (n_seg > 0x7fffffffu) {
        KVS_ERRORF("cuda: kv_seal: %zu runs exceed the grid limit", n_seg);
        return KVS_ENOTSUP;
    }
    seal_copy_kernel<<<(unsigned)n_seg, 256, 0, be->stream>>>((const seal_seg_t *)d);
    KERN_CUDA_LAUNCHED();
    KERN_CUDA_TRY(
        cudaMemcpyAsync(be->seal_host, mirror, o.total, cudaMemcpyDeviceToHost, be->stream));
    KERN_CUDA_TRY(cudaStreamSynchronize(be->stream));

    /* The mirror as a pool: block i full precision, block m + i quantized. */
    kern_kv_t mk = *kv;
    mk.n_blocks = 2 * m;
    mk.n_hot = m;
    mk.layer_bytes = (size_t)m * o.block;
    mk.k = (char *)be->seal_host + o.hk;
    mk.v = (char *)be->seal_host + o.hv;
    mk.qk = (char *)be->seal_host + o.qk;
    mk.qv = (char *)be->seal_host + o.qv;
    int32_t *ms = (int32_t *)malloc((size_t)m * 2 * sizeof(int32_t)), *md = ms + m;
    if (ms == NULL)
        return KVS_ENOMEM;
    for (uint32_t i = 0; i < m; i++) {
        const bool sc = (uint32_t)src[p0 + i] >= kv->n_hot;
        ms[i] = (int32_t)(sc ? m + i : i);
        md[i] = (int32_t)(sc ? i : m + i);
    }
    for (uint32_t l = 0; l < L; l++)
        kern__host_kv_seal_layer(&mk, l, ms, md, m, be->seal_x);
    free(ms);

    KERN_CUDA_TRY(
        cudaMemcpyAsync(mirror, be->seal_host, o.total, cudaMemcpyHostToDevice, be->stream));
    seal_copy_kernel<<<(unsigned)n_seg, 256, 0, be->stream>>>((const seal_seg_t *)d + n_seg);
    KERN_CUDA_LAUNCHED();
    /* No wait here: the host writes the pinned mirror again only after the
     * next batch's synchronisation, which follows this copy on the stream
     * (and a mirror that grows waits before it goes). */
    return 0;
}

int
kern__cuda_kv_seal(kern_cuda_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
                   uint32_t n)
{
    const uint32_t per = seal_per_batch(kv);
    for (uint32_t p0 = 0; p0 < n; p0 += per) {
        int rc = seal_batch(be, kv, src, dst, p0, n - p0 < per ? n - p0 : per);
        if (rc)
            return rc;
    }
    return 0;
}

int
kern__cuda_kv_seal_reserve(kern_cuda_t *be, const kern_kv_t *kv, uint32_t blocks, size_t *bytes,
                           size_t *stage)
{
    const uint32_t per = seal_per_batch(kv), m = blocks < per ? blocks : per;
    const size_t total = seal_layout(kv, m).total;
    void *mirror;
    int rc = seal_room(be, kv, total, &mirror);
    *bytes = rc == 0 ? total : 0;
    *stage = seal_stage_bytes(kv, m);
    return rc;
}
