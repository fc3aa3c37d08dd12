/*
 * kernels/cuda/cuda_attn_wg.cu — the wgmma instances of the tensor-core
 * prefill kernel (cuda_attn_tc.cuh), with one warpgroup a CTA (M 64) or
 * two (M 128), and the probe that picks the device's prefill kernel.
 * CMakeLists.txt compiles this file for sm_90a alone (wgmma exists only
 * there), so on any other device it has no code at all:
 * kern__cuda_attention_init probes it on compute capability 9.0, once per
 * device and process (its image loads, and the instance agrees with
 * mma.sync on a known problem; a fault resets the device, which holds
 * nothing yet) and kern__cuda_attention_tc sends tiles here only when the
 * probe said yes.
 */
#include "cuda_attn_tc.cuh"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

int
kern__cuda_attention_wg(kern_cuda_t *be, int tc, const kern_cuda_attn_tc_t *p)
{
    return tc == KERN_CUDA_TC_WG128 ? tc_launch_dim<true, 128>(be, p)
                                    : tc_launch_dim<true, 64>(be, p);
}

/* 1 when the image running is the sm_90a one, which has wgmma. */
static __global__ void
wg_probe_kernel(int *out)
{
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    *out = 1;
#else
    *out = 0;
#endif
}

/* A known-answer check of wgmma instance tc at head_dim d against the
 * mma.sync one (be->attn_tc is KERN_CUDA_TC_MMA while this runs) on the
 * same device and inputs: random q, K and V, a GQA group of 2 (stacked M
 * rows), 64 query rows at positions 448..511 over 32 blocks of 16 tokens
 * in scrambled order, each kernel on the tiles its M asks for, twice:
 * causal (eight KV tiles a CTA, so the three-stage ring of M 128 wraps
 * twice, and the masked diagonal), then with 16 sinks and a 128-token
 * window (the sink tile, then a jump to the window's tiles, each masked
 * row by row).  Both round q and P to f16 and sum in f32; only the order
 * of the sums differs.  Runs on the legacy stream (the backend's is not
 * made yet). */
typedef enum wg_verdict {
    WG_AGREES,
    WG_DIFFERS, /* a wrong answer, or its launch refused */
    WG_FAULTED, /* the kernel faulted: the device's context is lost */
    WG_UNRUN,   /* no room to run the check: ask again next time */
} wg_verdict_t;

static wg_verdict_t
wg_agrees(kern_cuda_t *be, int tc, uint32_t d)
{
    enum { ROWS = 64, HEADS = 2, BT = 16, NB = 32, CTX = NB * BT, SINKS = 16, WINDOW = 128 };
    const size_t nq = (size_t)ROWS * HEADS * d, nkv = (size_t)CTX * d;
    const size_t o_q = 0, o_a = o_q + nq * 4, o_b = o_a + nq * 4, o_i = o_b + nq * 4;
    /* ints: the tiles for M 64, for the instance, row_len, row_lo (dense,
     * then windowed), blocks */
    const size_t n_ints = 6 + 6 + 3 * ROWS + NB;
    /* K and V start 16-byte aligned, as the kernel's 16-byte copies need. */
    const size_t o_k = (o_i + n_ints * 4 + 255) & ~(size_t)255;
    const size_t o_v = o_k + nkv * 2, total = o_v + nkv * 2;
    unsigned char *h = (unsigned char *)calloc(1, total), *dev = NULL;
    float *out_a = (float *)malloc(nq * 4), *out_b = (float *)malloc(nq * 4);
    bool ok = h && out_a && out_b && cudaMalloc((void **)&dev, total) == cudaSuccess;
    bool ran = ok; /* false: the check could not run (memory), which says nothing of the kernel */
    uint32_t n_tiles[2] = {0, 0};
    if (ok) {
        uint64_t x = 0x9e3779b97f4a7c15ull;
        float *q = (float *)(h + o_q);
        for (size_t i = 0; i < nq; i++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            q[i] = (float)((x >> 40) & 0xffff) / 32768.0f - 1.0f;
        }
        __half *kv = (__half *)(h + o_k);
        for (size_t i = 0; i < 2 * nkv; i++) {
            x = x * 6364136223846793005ull + 1442695040888963407ull;
            kv[i] = __float2half((float)((x >> 40) & 0xffff) / 32768.0f - 1.0f);
        }
        int32_t *iv = (int32_t *)(h + o_i), *len = iv + 12, *lo = len + ROWS;
        int32_t *blocks = lo + 2 * ROWS;
        for (int k = 0; k < 2; k++) {
            /* A tile holds M / HEADS query rows. */
            int rows =
                (int)(k == 0 ? kern__cuda_tc_m(KERN_CUDA_TC_MMA) : kern__cuda_tc_m(tc)) / HEADS;
            for (int r0 = 0; r0 < ROWS; r0 += rows, n_tiles[k]++) {
                int32_t *t = iv + 6 * k + 3 * n_tiles[k];
                t[0] = r0;
                t[1] = ROWS - r0 < rows ? ROWS - r0 : rows;
                t[2] = 0;
            }
        }
        for (int r = 0; r < ROWS; r++) {
            len[r] = CTX - ROWS + r + 1;
            lo[r] = -1;
            lo[ROWS + r] = len[r] - WINDOW;
        }
        for (int b = 0; b < NB; b++)
            blocks[b] = (b * 7 + 3) % NB; /* 7 is prime to 32: a permutation */
        ok = ran = cudaMemcpy(dev, h, total, cudaMemcpyHostToDevice) == cudaSuccess;
    }
    float worst = 0.0f;
    for (int pat = 0; ok && pat < 2; pat++) {
        kern_cuda_attn_tc_t p;
        memset(&p, 0, sizeof p);
        p.q = (const float *)(dev + o_q);
        const int32_t *iv = (const int32_t *)(dev + o_i);
        p.row_len = iv + 12;
        p.row_lo = p.row_len + ROWS * (1 + pat);
        p.blocks = p.row_len + 3 * ROWS;
        p.k = dev + o_k;
        p.v = dev + o_v;
        p.kvq.n_hot = NB; /* no quantized block */
        p.mask_q_block = 1;
        p.mask_heads = 1;
        p.n_heads = HEADS;
        p.n_kv_heads = 1;
        p.group = HEADS;
        p.head_dim = d;
        p.block_tokens = BT;
        p.sinks = pat ? SINKS : 0;
        p.qscale = 1.4426950408889634f / sqrtf((float)d);
        p.tiles = iv;
        p.n_tiles = n_tiles[0];
        p.out = (float *)(dev + o_a);
        ok = ran = kern__cuda_attention_tc(be, &p) == 0; /* mma.sync */
        p.tiles = iv + 6;
        p.n_tiles = n_tiles[1];
        p.out = (float *)(dev + o_b);
        ok = ok && kern__cuda_attention_wg(be, tc, &p) == 0 &&
             cudaMemcpy(out_a, dev + o_a, nq * 4, cudaMemcpyDeviceToHost) == cudaSuccess &&
             cudaMemcpy(out_b, dev + o_b, nq * 4, cudaMemcpyDeviceToHost) == cudaSuccess;
        /* Outputs are averages of values in [-1, 1]; sums in another
         * order differ by a few f32 ulps of the largest terms. */
        for (size_t i = 0; ok && i < nq; i++) {
            float e = fabsf(out_a[i] - out_b[i]);
            if (!(e <= worst)) /* NaN included */
                worst = isnan(e) ? INFINITY : e;
        }
    }
    if (ok && !(worst <= 1e-3f)) {
        ok = false;
        KVS_WARNF("cuda: the wgmma prefill kernel (M %u, head_dim %u) differs from "
                  "mma.sync by %g: not used",
                  kern__cuda_tc_m(tc), d, (double)worst);
    }
    /* A fault inside a kernel is sticky: every later call fails the same
     * way, clearing the last error or not. */
    bool faulted = false;
    cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        faulted = cudaDeviceSynchronize() != cudaSuccess;
        KVS_WARNF("cuda: the wgmma prefill kernel (M %u, head_dim %u) failed its start-up "
                  "check: %s",
                  kern__cuda_tc_m(tc), d, cudaGetErrorString(e));
    }
    if (dev && !faulted)
        (void)cudaFree(dev); /* a lost context took it along */
    free(h);
    free(out_a);
    free(out_b);
    (void)cudaGetLastError();
    return faulted ? WG_FAULTED : ok ? WG_AGREES : ran ? WG_DIFFERS : WG_UNRUN;
}

/* What this process learned of each device: whether a backend has probed
 * it, and each wgmma instance's check (0 not run, 1 passed, -1 failed),
 * kept because a kernel that faults loses the device's context and only
 * a reset gets it back, which would take every other backend's memory on
 * the device too: the first backend on a device checks both instances
 * before anything of the process lives there and may reset; a later one
 * reuses the verdicts and, for an instance not checked yet (its check
 * found no memory to run in), may not. */
#define WG_DEVICES 64
/* Held while a backend starts (kern__cuda_start_lock): the probe, and any
 * reset, sees no other backend half made. */
static pthread_mutex_t wg_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    bool probed;
    int8_t verdict[2]; /* WG64, WG128 */
} wg_dev[WG_DEVICES];

/* Instance tc's verdict on be's device, checked now if not yet. */
static bool
wg_passes(kern_cuda_t *be, int tc, bool may_reset)
{
    int8_t *v = &wg_dev[be->device].verdict[tc == KERN_CUDA_TC_WG128];
    if (*v != 0)
        return *v > 0;
    wg_verdict_t r = wg_agrees(be, tc, 64);
    if (r == WG_AGREES)
        r = wg_agrees(be, tc, 128);
    if (r == WG_UNRUN)
        return false; /* not this backend's, but not decided for the next */
    *v = r == WG_AGREES ? 1 : -1;
    if (r == WG_FAULTED && may_reset) {
        KVS_WARNF("cuda: resetting device %d after the fault (nothing of this process was "
                  "on it yet)",
                  be->device);
        (void)cudaDeviceReset();
        (void)cudaSetDevice(be->device);
        (void)cudaGetLastError();
    } else if (r == WG_FAULTED) {
        KVS_ERRORF("cuda: device %d is unusable after the fault: other backends of this "
                   "process hold memory there, so it cannot be reset",
                   be->device);
    }
    return *v > 0;
}

static int
wg_probe(kern_cuda_t *be)
{
    bool may_reset = !wg_dev[be->device].probed;
    wg_dev[be->device].probed = true;
    /* A choice, so each kernel can be run and measured on Hopper. */
    const char *want = getenv("KVS_CUDA_ATTN");
    bool named = want && *want;
    int first = KERN_CUDA_TC_WG128;
    if (named && strcmp(want, "mma") == 0)
        return KERN_CUDA_TC_MMA;
    if (named && strcmp(want, "wgmma64") == 0) {
        first = KERN_CUDA_TC_WG64;
    } else if (named && strcmp(want, "wgmma128") != 0) {
        KVS_WARNF("cuda: KVS_CUDA_ATTN=%s: not mma, wgmma64 or wgmma128; ignored", want);
        named = false;
    }
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, be->device) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, be->device) !=
            cudaSuccess ||
        major != 9 || minor != 0) {
        (void)cudaGetLastError();
        return KERN_CUDA_TC_MMA;
    }
    int *d = NULL, h = 0;
    bool ok = cudaMalloc((void **)&d, sizeof *d) == cudaSuccess;
    if (ok) {
        wg_probe_kernel<<<1, 1>>>(d);
        ok = cudaGetLastError() == cudaSuccess &&
             cudaMemcpy(&h, d, sizeof h, cudaMemcpyDeviceToHost) == cudaSuccess && h == 1;
    }
    if (d)
        (void)cudaFree(d);
    (void)cudaGetLastError(); /* a missing image is not the context's failure */
    if (!ok)
        return KERN_CUDA_TC_MMA;
    /* Hopper code that no test here can run checks itself before it
     * serves anything.  The first backend on the device checks both
     * instances, while it alone may reset the device: a later backend
     * that asks for the other (bench_gpu runs each) then finds a verdict
     * and never runs an unchecked kernel where a fault would take the
     * device from everyone.  Without a choice the other wgmma kernel
     * stands in for one that fails; a kernel asked for by name has only
     * mma.sync. */
    if (may_reset) {
        (void)wg_passes(be, KERN_CUDA_TC_WG128, true);
        (void)wg_passes(be, KERN_CUDA_TC_WG64, true);
    }
    const int order[2] = {first, named ? KERN_CUDA_TC_MMA : KERN_CUDA_TC_WG64};
    for (int i = 0; i < 2 && order[i] != KERN_CUDA_TC_MMA; i++)
        if (wg_passes(be, order[i], may_reset))
            return order[i];
    return KERN_CUDA_TC_MMA;
}

void
kern__cuda_start_lock(bool lock)
{
    if (lock)
        pthread_mutex_lock(&wg_lock);
    else
        pthread_mutex_unlock(&wg_lock);
}

int
kern__cuda_attention_wg_probe(kern_cuda_t *be)
{
    if (be->device < 0 || be->device >= WG_DEVICES)
        return KERN_CUDA_TC_MMA; /* nowhere to keep verdicts: no check */
    return wg_probe(be);
}
