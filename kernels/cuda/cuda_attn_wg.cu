/*
 * kernels/cuda/cuda_attn_wg.cu — the wgmma instance of the tensor-core
 * prefill kernel (cuda_attn_tc.cuh) and the probe that tells whether the
 * device runs it.  CMakeLists.txt compiles this file for sm_90a alone
 * (wgmma exists only there), so on any other device it has no code at all:
 * kern__cuda_attention_init probes it once on compute capability 9.0 (its
 * image loads, and it agrees with the mma.sync instance on a known
 * problem) and kern__cuda_attention_tc uses it only when the probe said
 * yes.
 */
#include "cuda_attn_tc.cuh"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int
kern__cuda_attention_wg(kern_cuda_t *be, const kern_cuda_attn_tc_t *p)
{
    return tc_launch_dim<true>(be, p);
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

/* A known-answer check of the wgmma instance at head_dim d against the
 * mma.sync one on the same device and inputs: random q, K and V, a GQA
 * group of 2 (stacked M rows), 64 causal query rows at positions 192..255
 * over 16 blocks of 16 tokens in scrambled order, so two tiles, four KV
 * tiles each and the masked diagonal.  Both round q and P to f16 and sum
 * in f32; only the order of the sums differs.  Runs on the legacy stream
 * (the backend's is not made yet).  true: they agree. */
static bool
wg_agrees(kern_cuda_t *be, uint32_t d)
{
    enum { ROWS = 64, HEADS = 2, BT = 16, NB = 16, CTX = NB * BT };
    const size_t nq = (size_t)ROWS * HEADS * d, nkv = (size_t)CTX * d;
    const size_t o_q = 0, o_a = o_q + nq * 4, o_b = o_a + nq * 4, o_i = o_b + nq * 4;
    /* K and V start 16-byte aligned, as the kernel's 16-byte copies need. */
    const size_t o_k = (o_i + (6 + 2 * ROWS + NB) * 4 + 255) & ~(size_t)255;
    const size_t o_v = o_k + nkv * 2, total = o_v + nkv * 2;
    unsigned char *h = (unsigned char *)calloc(1, total), *dev = NULL;
    float *out_a = (float *)malloc(nq * 4), *out_b = (float *)malloc(nq * 4);
    bool ok = h && out_a && out_b && cudaMalloc((void **)&dev, total) == cudaSuccess;
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
        int32_t *iv = (int32_t *)(h + o_i), *tiles = iv, *len = iv + 6, *lo = len + ROWS,
                *blocks = lo + ROWS;
        for (int t = 0; t < 2; t++) {
            tiles[3 * t] = t * ROWS / 2;
            tiles[3 * t + 1] = ROWS / 2;
            tiles[3 * t + 2] = 0;
        }
        for (int r = 0; r < ROWS; r++) {
            len[r] = CTX - ROWS + r + 1;
            lo[r] = -1;
        }
        for (int b = 0; b < NB; b++)
            blocks[b] = (b * 7 + 3) % NB; /* 7 is prime to 16: a permutation */
        ok = cudaMemcpy(dev, h, total, cudaMemcpyHostToDevice) == cudaSuccess;
    }
    if (ok) {
        kern_cuda_attn_tc_t p;
        memset(&p, 0, sizeof p);
        p.q = (const float *)(dev + o_q);
        p.tiles = (const int32_t *)(dev + o_i);
        p.row_len = p.tiles + 6;
        p.row_lo = p.row_len + ROWS;
        p.blocks = p.row_lo + ROWS;
        p.k = dev + o_k;
        p.v = dev + o_v;
        p.kvq.n_hot = NB; /* no quantized block */
        p.mask_q_block = 1;
        p.n_tiles = 2;
        p.n_heads = HEADS;
        p.n_kv_heads = 1;
        p.group = HEADS;
        p.head_dim = d;
        p.block_tokens = BT;
        p.qscale = 1.4426950408889634f / sqrtf((float)d);
        p.out = (float *)(dev + o_a);
        ok = kern__cuda_attention_tc(be, &p) == 0; /* be->attn_wgmma is false yet */
        p.out = (float *)(dev + o_b);
        ok = ok && tc_launch_dim<true>(be, &p) == 0 &&
             cudaMemcpy(out_a, dev + o_a, nq * 4, cudaMemcpyDeviceToHost) == cudaSuccess &&
             cudaMemcpy(out_b, dev + o_b, nq * 4, cudaMemcpyDeviceToHost) == cudaSuccess;
    }
    if (ok) {
        /* Outputs are averages of values in [-1, 1]; sums in another
         * order differ by a few f32 ulps of the largest terms. */
        float worst = 0.0f;
        for (size_t i = 0; i < nq; i++) {
            float e = fabsf(out_a[i] - out_b[i]);
            if (!(e <= worst)) /* NaN included */
                worst = isnan(e) ? INFINITY : e;
        }
        ok = worst <= 1e-3f;
        if (!ok)
            KVS_WARNF("cuda: the wgmma prefill kernel (head_dim %u) differs from mma.sync by "
                      "%g: prefill attention stays on mma.sync",
                      d, (double)worst);
    }
    if (dev)
        (void)cudaFree(dev);
    free(h);
    free(out_a);
    free(out_b);
    return ok;
}

bool
kern__cuda_attention_wg_probe(kern_cuda_t *be)
{
    /* A cap, so the mma.sync kernel can be run and measured on Hopper. */
    const char *cap = getenv("KVS_CUDA_ATTN");
    if (cap && strcmp(cap, "mma") == 0)
        return false;
    int major = 0, minor = 0;
    if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, be->device) !=
            cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, be->device) !=
            cudaSuccess ||
        major != 9 || minor != 0) {
        (void)cudaGetLastError();
        return false;
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
    /* Hopper code that no test here can run checks itself once before it
     * serves anything. */
    ok = ok && wg_agrees(be, 64) && wg_agrees(be, 128);
    (void)cudaGetLastError();
    return ok;
}
