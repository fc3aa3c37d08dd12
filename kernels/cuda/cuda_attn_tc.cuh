/*
 * kernels/cuda/cuda_attn_tc.cuh — the tensor-core prefill kernel behind
 * kern__cuda_attention_tc: the prefill half of kern__cuda_attention
 * (cuda_attn.cu) for F16 KV with head_dim 64 or 128 (quantized blocks of a
 * codec pool decoded into the tiles), with kern.h's causal limits and
 * sparse key pattern.  cuda_attn.cu stages the page table, the per-row
 * limits and the block mask, cuts each prefill sequence into tiles of
 * consecutive query rows for the kernel the backend chose at start
 * (kern_cuda_t.attn_tc) and calls kern__cuda_attention_tc once, which
 * launches its instance of the template here:
 *
 *   cuda_attn_tc.cu  mma.sync m16n8k16 (sm_80 and later), M 64, K and V
 *                    tiles read by ldmatrix
 *   cuda_attn_wg.cu  wgmma m64nNk16 (sm_90a, Hopper), M 64 (one warpgroup
 *                    a CTA, two CTAs a multiprocessor) or M 128 (two
 *                    warpgroups sharing each K/V tile, one CTA): each
 *                    warpgroup multiplies straight out of shared memory,
 *                    K and V stored in the 128-byte swizzled layout wgmma
 *                    reads; chosen when the device runs that file's sm_90a
 *                    code and the instance passed its start-up check
 *
 * All are f16 in, f32 sums, with the same tiles, masks and softmax, so
 * they agree up to the order of f32 additions inside a product.
 *
 *   grid   (tile of query rows, kv head g, chunk of g's query heads)
 *   block  M / 16 warps; the tile is M "M rows", each a (query row, query
 *          head) pair: the heads of the GQA group are stacked so that one
 *          K/V tile feeds all of them (M 64, group 1: 64 query rows;
 *          group 8: 8 rows x 8 heads; group 7: 9 x 7 = 63 rows used)
 *   warp   16 M rows; Q stays in registers as A fragments (the same
 *          layout for mma.sync and wgmma), pre-scaled by scale * log2(e)
 *          and rounded to f16
 *
 *   per KV tile of 64 consecutive positions of the sequence:
 *     gather K, V rows through the page table into shared memory (any
 *     block_tokens: each 16-byte chunk finds its own block), cp.async,
 *     the next tile's copy in flight while this one is computed
 *     S = Q K^T, mask, online softmax in f32 (exp2)
 *     O = O * alpha + P V with P as f16 A fragments (the S accumulator
 *     layout is the A fragment layout)
 *   finally out = O / l in f32.
 *
 * wgmma M 128 pipelines that loop (as FlashAttention-3 does within a
 * warpgroup): three stages, tile j + 2's copies in flight while S of
 * tile j + 1 and P V of tile j run on the tensor cores, and tile j + 1's
 * softmax runs on the CUDA cores while P V of tile j does.
 *
 * Which keys a row sees (its kv_len, sinks, window, block mask, dense
 * rows) is the same test as the ref backend's.  Two pieces make the cost
 * O(kept keys): every query row keeps the position of the next key it can
 * see (one thread per row; the mask bytes are scanned once per CTA), so
 * the CTA jumps straight to the next KV tile any row needs; and within a
 * tile a 64-bit keep mask per row (two threads per row) zero-fills the
 * copies of positions no row sees and masks scores only where a row's mask
 * is not all ones, which in dense causal prefill is the diagonal tiles.
 * That walk is host code too (tests/kernels/test_cuda_tc_walk.cu runs it
 * against kern.h's rule).
 *
 * Shared memory: K and V in two stages of 64 rows each (three at wgmma
 * M 128), then Q's M rows.  mma.sync: rows of head_dim + 8 halves (the
 * pad puts the 8 rows an ldmatrix reads in 8 different bank groups), 45
 * KiB for d 64, 85 KiB for d 128.  wgmma: K and V unpadded in 128-byte
 * swizzle atoms (8 rows of 64 halves, 16-byte chunk c of row r at chunk
 * c ^ (r % 8), 1024-byte aligned), 42 / 82 KiB (d 64 / 128) at M 64, 67 /
 * 131 KiB at M 128, with the alignment slack.
 */
#ifndef KERN_CUDA_ATTN_TC_CUH
#define KERN_CUDA_ATTN_TC_CUH

#include "cuda_kvq.cuh"

#include <limits.h>
#include <math.h>

/* An instance's CTA has M "M rows" (64 or 128: kern__cuda_tc_m), 16 a
 * warp, two threads a row; its KV tiles are TC_N positions (two 32-bit
 * keep words a row). */
#define TC_N 64
#define TC_END INT_MAX /* "no further key" */
#define TC_WARPS(M) ((M) / 16)
#define TC_THREADS(M) ((M)*2)

/* ------------------------------------------------------------------------ */
/* PTX wrappers (sm_80 and later).                                          */
/* ------------------------------------------------------------------------ */

/* 16 bytes global -> shared, asynchronously; with full false it writes
 * zeros and reads nothing. */
static __device__ __forceinline__ void
tc_cp16(void *smem, const void *gmem, bool full)
{
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    int n = full ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n)
                 : "memory");
}

static __device__ __forceinline__ void
tc_cp_commit(void)
{
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
static __device__ __forceinline__ void
tc_cp_wait(void)
{
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

/* Four 8x8 b16 matrices from shared memory into mma fragments, each
 * transposed on the way with T. */
template <bool T>
static __device__ __forceinline__ void
tc_ldsm4(uint32_t r[4], const __half *p)
{
    unsigned s = (unsigned)__cvta_generic_to_shared(p);
    if constexpr (T)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(s)
                     : "memory");
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(s)
                     : "memory");
}

/* c += a b for one 16x8 tile, k = 16. */
static __device__ __forceinline__ void
tc_mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1)
{
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

/* Two floats as one f16x2 register, lo in the low half (the lower column
 * of an mma fragment). */
static __device__ __forceinline__ uint32_t
tc_pack(float lo, float hi)
{
    union {
        __half2 h;
        uint32_t u;
    } v;
    v.h = __floats2half2_rn(lo, hi);
    return v.u;
}

/* ------------------------------------------------------------------------ */
/* wgmma (sm_90a).  Only cuda_attn_wg.cu, compiled for sm_90a alone, runs   */
/* these; anywhere else their bodies trap.                                  */
/* ------------------------------------------------------------------------ */

/* Orders this thread's earlier register writes (accumulators, A
 * fragments) before the wgmmas that follow. */
static __device__ __forceinline__ void
tc_wg_fence(void)
{
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

/* Closes the wgmmas issued since the last commit into a group. */
static __device__ __forceinline__ void
tc_wg_commit(void)
{
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

/* Waits until at most N of this warpgroup's groups are pending (they
 * finish in order): the older groups' accumulators are readable, their
 * register and shared-memory operands free. */
template <int N>
static __device__ __forceinline__ void
tc_wg_wait(void)
{
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

/* Makes this thread's shared-memory writes (cp.async and plain stores)
 * visible to the tensor cores' reads, which go through the async proxy;
 * a barrier after it publishes them to the whole warpgroup. */
static __device__ __forceinline__ void
tc_wg_proxy_fence(void)
{
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

/* wgmma writes its accumulators asynchronously, which the compiler does
 * not know: an empty asm that reads and writes each of them keeps their
 * other uses on the right side of the fence and the wait. */
template <int N>
static __device__ __forceinline__ void
tc_wg_pin(float (&d)[N][4])
{
#pragma unroll
    for (int i = 0; i < N; i++)
        asm volatile("" : "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3])::"memory");
}

/* The same for A fragments held in registers: written before the fence,
 * and live (not reused) until the wait that frees them. */
template <int N>
static __device__ __forceinline__ void
tc_wg_pin(uint32_t (&a)[N][4])
{
#pragma unroll
    for (int i = 0; i < N; i++)
        asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3])::"memory");
}

/* A shared-memory matrix descriptor, 128-byte swizzle: shared-space
 * start address, leading and stride byte offsets (each a multiple of
 * 16). */
static __host__ __device__ __forceinline__ uint64_t
tc_wg_desc_bits(uint32_t addr, uint32_t lbo, uint32_t sbo)
{
    return (uint64_t)((addr >> 4) & 0x3fffu) | (uint64_t)((lbo >> 4) & 0x3fffu) << 16 |
           (uint64_t)((sbo >> 4) & 0x3fffu) << 32 | (uint64_t)1 << 62;
}

static __device__ __forceinline__ uint64_t
tc_wg_desc(const void *smem, uint32_t lbo, uint32_t sbo)
{
    return tc_wg_desc_bits((uint32_t)__cvta_generic_to_shared(smem), lbo, sbo);
}

/* d (64 x 64 f32 accumulators, the mma C fragment layout per 8 columns)
 * += a (64 x 16, f16 A fragments in registers) b (16 x 64, f16 in shared
 * memory, described by desc; TB 1: b's rows are contiguous). */
template <int TB>
static __device__ __forceinline__ void
tc_wgmma_n64(float d[8][4], const uint32_t a[4], uint64_t desc)
{
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
                 "{"
                 "%0, %1, %2, %3, %4, %5, %6, %7, "
                 "%8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, "
                 "%24, %25, %26, %27, %28, %29, %30, %31"
                 "}, {%32, %33, %34, %35}, %36, p, 1, 1, %38;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),
                   "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]),
                   "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]),
                   "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
                   "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]),
                   "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),
                   "+f"(d[7][2]), "+f"(d[7][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1), "n"(TB)
                 : "memory");
#else
    __trap();
#endif
}

/* d (64 x 128 f32 accumulators, the mma C fragment layout per 8 columns)
 * += a (64 x 16, f16 A fragments in registers) b (16 x 128, f16 in shared
 * memory, described by desc; TB 1: b's rows are contiguous). */
template <int TB>
static __device__ __forceinline__ void
tc_wgmma_n128(float d[16][4], const uint32_t a[4], uint64_t desc)
{
#ifdef __CUDA_ARCH_FEAT_SM90_ALL
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
                 "{"
                 "%0, %1, %2, %3, %4, %5, %6, %7, "
                 "%8, %9, %10, %11, %12, %13, %14, %15, "
                 "%16, %17, %18, %19, %20, %21, %22, %23, "
                 "%24, %25, %26, %27, %28, %29, %30, %31, "
                 "%32, %33, %34, %35, %36, %37, %38, %39, "
                 "%40, %41, %42, %43, %44, %45, %46, %47, "
                 "%48, %49, %50, %51, %52, %53, %54, %55, "
                 "%56, %57, %58, %59, %60, %61, %62, %63"
                 "}, {%64, %65, %66, %67}, %68, p, 1, 1, %70;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]),
                   "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]),
                   "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]),
                   "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]),
                   "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]),
                   "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),
                   "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]),
                   "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]),
                   "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]),
                   "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]),
                   "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]),
                   "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]),
                   "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1), "n"(TB)
                 : "memory");
#else
    __trap();
#endif
}

/* ------------------------------------------------------------------------ */
/* Which keys a row sees.                                                   */
/* ------------------------------------------------------------------------ */

/* The first position >= from that a row sees, or TC_END.  len: the row's
 * kv_len; lo: -1 for a dense row, else the window's first position (len
 * when there is no window); mrow: the row's mask row or NULL.  Mask bytes
 * are read only for blocks that start before lo <= len. */
static __host__ __device__ inline int
tc_next_visible(int from, int len, int lo, const uint8_t *mrow, int sinks, int bt)
{
    if (from >= len)
        return TC_END;
    if (lo < 0 || from < sinks || from >= lo)
        return from;
    if (mrow) {
        for (int b = from / bt;; b++) {
            int pos = b * bt > from ? b * bt : from;
            if (pos >= lo)
                break;
            if (mrow[b])
                return pos;
        }
    }
    return lo < len ? lo : TC_END;
}

/* Minimum over the CTA; every thread gets it.  red: one int a warp, free
 * for writing (a barrier separates this from the previous call's reads). */
template <int M>
static __device__ __forceinline__ int
tc_cta_min(int v, int *red)
{
    v = __reduce_min_sync(0xffffffffu, v);
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x >> 5] = v;
    __syncthreads();
    int m = red[0];
#pragma unroll
    for (int w = 1; w < TC_WARPS(M); w++)
        m = min(m, red[w]);
    return m;
}

/* Row state in shared memory, indexed by query row of the tile. */
template <int M> struct tc_rows {
    int len[M];
    int lo[M];
    int nv[M]; /* next position the row sees, from the row's last look */
    const uint8_t *mrow[M];
};

/* Which of positions j0 .. j0 + 31 a row sees (bit u: j0 + u), given its
 * row state (tc_next_visible's arguments) and nv, the next position it
 * sees from its last look, which was at or before j0: it sees nothing in
 * between. */
static __host__ __device__ inline uint32_t
tc_row_bits(int j0, int len, int lo, int nv, const uint8_t *mrow, int sinks, int bt)
{
    if (j0 >= len || nv >= j0 + 32)
        return 0;
    int n = len - j0 < 32 ? len - j0 : 32;
    if (lo < 0 || j0 >= lo)
        return n == 32 ? 0xffffffffu : (1u << n) - 1u;
    uint32_t bits = 0;
    int b = j0 / bt, o = j0 - b * bt;
    bool mk = mrow && mrow[b];
    for (int u = 0; u < n; u++) {
        int j = j0 + u;
        if (j < sinks || j >= lo || mk)
            bits |= 1u << u;
        if (++o == bt && u + 1 < n) { /* the next position starts a block < len */
            o = 0;
            b++;
            mk = mrow && mrow[b];
        }
    }
    return bits;
}

/* The keep masks of tile t0: thread 2r + h writes row r's bits for
 * positions t0 + 32h .. t0 + 32h + 31 to keep[2r + h], and each warp's OR
 * over its rows to uni[2 warp + h].  Every thread must call this. */
template <int M>
static __device__ __forceinline__ void
tc_bits(int t0, const tc_rows<M> *rs, uint32_t *keep, uint32_t *uni, int sinks, int bt)
{
    int tid = threadIdx.x, r = tid >> 1;
    uint32_t bits =
        tc_row_bits(t0 + 32 * (tid & 1), rs->len[r], rs->lo[r], rs->nv[r], rs->mrow[r], sinks, bt);
    keep[tid] = bits;
    uint32_t u = bits;
#pragma unroll
    for (int off = 2; off < 32; off <<= 1)
        u |= __shfl_xor_sync(0xffffffffu, u, off);
    if ((tid & 31) < 2)
        uni[2 * (tid >> 5) + (tid & 31)] = u;
}

/* ------------------------------------------------------------------------ */
/* The kernel.                                                              */
/* ------------------------------------------------------------------------ */

/* Where 16-byte chunk c of tile row tok goes, in halves from the stage's
 * start: padded rows for mma.sync; for wgmma, 64-half swizzle atoms of the
 * head dimension one after another, each TC_N rows of 128 bytes. */
template <int D, bool WG>
static __host__ __device__ __forceinline__ int
tc_chunk(int tok, int c)
{
    if constexpr (WG)
        return (c >> 3) * (TC_N * 64) + tok * 64 + (((c & 7) ^ (tok & 7)) << 3);
    return tok * (D + 8) + c * 8;
}

/* The wgmma operands in a stage so stored (tests/kernels/
 * test_cuda_wg_layout.cu checks them against PTX's canonical layouts):
 *   S = Q K^T, k16 step kk: B is K "K-major", 16 head dims of every key:
 *     32 bytes into each 128-byte row of an atom, 8-row groups 1024 bytes
 *     apart (the leading offset is unused)
 *   O += P V, k16 step kk: B is V "MN-major" (transposed), 16 keys of
 *     every head dim: 16 rows of 128 bytes further, 8-row groups 1024
 *     bytes apart, the head dimension's atoms TC_N rows apart
 * Starts in halves from the stage's start, offsets in bytes. */
static __host__ __device__ __forceinline__ int
tc_wg_k_at(int kk)
{
    return (kk >> 2) * (TC_N * 64) + (kk & 3) * 16;
}
static __host__ __device__ __forceinline__ int
tc_wg_v_at(int kk)
{
    return kk * 16 * 64;
}
#define TC_WG_K_LBO 16u
#define TC_WG_K_SBO 1024u
#define TC_WG_V_LBO (TC_N * 128u)
#define TC_WG_V_SBO 1024u

/* Queues the copies of KV tile t0 (kv head head0) into stages ks and vs.
 * Positions no row of the CTA sees are zero-filled, so V is finite where P
 * is 0.  A position in a quantized block is decoded (cuda_kvq.cuh) and
 * stored at once, rounded to f16 like q and P; the barrier before the tile
 * is read covers those stores as it covers the copies. */
template <int D, bool WG, int M>
static __device__ __forceinline__ void
tc_load(const __half *kl, const __half *vl, const kern_cuda_kvq_t &kvq, size_t head0, size_t n_kv,
        int bt, int t0, const int32_t *blocks, __half *ks, __half *vs, const uint32_t *uni)
{
    constexpr int CPR = D / 8, TPP = TC_THREADS(M) / CPR, PASSES = TC_N / TPP;
    int tid = threadIdx.x, c = tid % CPR, tok0 = tid / CPR;
    uint32_t u0 = 0, u1 = 0;
#pragma unroll
    for (int w = 0; w < TC_WARPS(M); w++) {
        u0 |= uni[2 * w];
        u1 |= uni[2 * w + 1];
    }
#pragma unroll
    for (int ps = 0; ps < PASSES; ps++) {
        int tok = tok0 + ps * TPP, j = t0 + tok, at = tc_chunk<D, WG>(tok, c);
        bool need = ((tok < 32 ? u0 >> tok : u1 >> (tok - 32)) & 1u) != 0;
        size_t off = 0;
        if (need) { /* some row sees j, so j < its kv_len and blocks[j / bt] exists */
            int b = j / bt;
            uint32_t blk = (uint32_t)blocks[b];
            if (blk >= kvq.n_hot) {
                const uint8_t *kt = kern__cuda_kvq_tile(kvq, false, blk, (uint32_t)n_kv, head0);
                const uint8_t *vt = kern__cuda_kvq_tile(kvq, true, blk, (uint32_t)n_kv, head0);
#pragma unroll
                for (int e = 0; e < 8; e++) {
                    uint32_t t = (uint32_t)(j - b * bt), ch = (uint32_t)(c * 8 + e);
                    ks[at + e] = kern__cuda_f16_sat(
                        kern__kvq_elem(kvq.quant, false, kt, (uint32_t)bt, D, t, ch));
                    vs[at + e] = kern__cuda_f16_sat(
                        kern__kvq_elem(kvq.quant, true, vt, (uint32_t)bt, D, t, ch));
                }
                continue;
            }
            off = (((size_t)blk * n_kv + head0) * (size_t)bt + (size_t)(j - b * bt)) * D +
                  (size_t)c * 8;
        }
        tc_cp16(ks + at, kl + off, need);
        tc_cp16(vs + at, vl + off, need);
    }
}

/* Stages of K/V tiles in shared memory: M 128 on wgmma keeps three, so
 * that tile j + 2 is in flight while tile j + 1's scores and tile j's
 * P V run (the pipelined loop below); the others two. */
template <bool WG, int M>
static __host__ __device__ constexpr int
tc_stages(void)
{
    return WG && M == 128 ? 3 : 2;
}

/* Dynamic shared memory of an instance: K and V stages, Q, and for wgmma
 * the slack that aligns the stages to 1024 bytes. */
template <int D, bool WG, int M>
static constexpr size_t
tc_smem_bytes(void)
{
    return (2 * tc_stages<WG, M>() * TC_N * (WG ? D : D + 8) + M * (D + 8)) * sizeof(__half) +
           (WG ? 1024 : 0);
}

/* A row's next visible position once the CTA is past the tile at
 * `after`: a row that may see something in that tile looks again past
 * it. */
static __host__ __device__ inline int
tc_row_advance(int after, int nv, int len, int lo, const uint8_t *mrow, int sinks, int bt)
{
    return nv < after + TC_N ? tc_next_visible(after + TC_N, len, lo, mrow, sinks, bt) : nv;
}

/* The first KV tile at or before position v (TC_END stays). */
static __host__ __device__ inline int
tc_tile_of(int v)
{
    return v == TC_END ? TC_END : v & ~(TC_N - 1);
}

/* The KV tile after the one at `after`, or TC_END.  Every thread must
 * call this. */
template <int M>
static __device__ __forceinline__ int
tc_advance(int after, int &nv, tc_rows<M> *rs, int *red, int sinks, int bt)
{
    int tid = threadIdx.x;
    if (tid < M) {
        nv = tc_row_advance(after, nv, rs->len[tid], rs->lo[tid], rs->mrow[tid], sinks, bt);
        rs->nv[tid] = nv;
    }
    return tc_tile_of(tc_cta_min<M>(nv, red));
}

/* wgmma issue of S = Q K^T (s += ..., kt: the tile's K stage) and of
 * O += P V (vt: its V stage, P as A fragments), each closed into a group
 * of its own.  The caller fences the registers first; the products run
 * until a tc_wg_wait covers their group, and their operands (s; o and
 * pa) stay untouched until then and are pinned after it. */
template <int D>
static __device__ __forceinline__ void
tc_qk_issue(float (&s)[8][4], const uint32_t (&qf)[D / 16][4], const __half *kt)
{
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++)
        tc_wgmma_n64<0>(s, qf[kk], tc_wg_desc(kt + tc_wg_k_at(kk), TC_WG_K_LBO, TC_WG_K_SBO));
    tc_wg_commit();
}
template <int D>
static __device__ __forceinline__ void
tc_pv_issue(float (&o)[D / 8][4], const uint32_t (&pa)[4][4], const __half *vt)
{
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        uint64_t dv = tc_wg_desc(vt + tc_wg_v_at(kk), TC_WG_V_LBO, TC_WG_V_SBO);
        if constexpr (D == 64)
            tc_wgmma_n64<1>(o, pa[kk], dv);
        else
            tc_wgmma_n128<1>(o, pa[kk], dv);
    }
    tc_wg_commit();
}

template <int N>
static __device__ __forceinline__ void
tc_zero(float (&d)[N][4])
{
#pragma unroll
    for (int i = 0; i < N; i++)
        d[i][0] = d[i][1] = d[i][2] = d[i][3] = 0.0f;
}

/* S = Q K^T for the tile whose K stage is kt.  On wgmma this only issues
 * the products: tc_wg_wait<0> and pin s before reading it. */
template <int D, bool WG>
static __device__ __forceinline__ void
tc_qk(float (&s)[8][4], const uint32_t (&qf)[D / 16][4], const __half *kt, int lane)
{
    constexpr int ROW = D + 8;
    tc_zero(s);
    if constexpr (WG) {
        tc_wg_pin(s);
        tc_wg_fence();
        tc_qk_issue<D>(s, qf, kt);
    } else {
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
            for (int np = 0; np < 4; np++) {
                uint32_t b[4];
                tc_ldsm4<false>(b, kt + (np * 16 + (lane & 7) + (lane >> 4) * 8) * ROW + kk * 16 +
                                       ((lane >> 3) & 1) * 8);
                tc_mma(s[2 * np], qf[kk], b[0], b[1]);
                tc_mma(s[2 * np + 1], qf[kk], b[2], b[3]);
            }
        }
    }
}

/* O += P V for the tile whose V stage is vt.  On wgmma this only issues
 * the products: tc_wg_wait<0> and pin o before touching it. */
template <int D, bool WG>
static __device__ __forceinline__ void
tc_pv(float (&o)[D / 8][4], uint32_t (&pa)[4][4], const __half *vt, int lane)
{
    constexpr int ROW = D + 8;
    if constexpr (WG) {
        tc_wg_pin(o);
        tc_wg_pin(pa);
        tc_wg_fence();
        tc_pv_issue<D>(o, pa, vt);
    } else {
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                uint32_t b[4];
                tc_ldsm4<true>(b, vt + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ROW +
                                      dp * 16 + (lane >> 4) * 8);
                tc_mma(o[2 * dp], pa[kk], b[0], b[1]);
                tc_mma(o[2 * dp + 1], pa[kk], b[2], b[3]);
            }
        }
    }
}

/* One thread's two M rows (a: fragment row lane / 4, b: + 8): whether
 * each is a real (query row, head) and its query row in the tile. */
struct tc_pair {
    int ra, rb;
    bool va, vb;
};

/* Online softmax over one tile's scores s, whose keep masks are kp: masks
 * what a row does not see (invalid M rows see nothing), folds the tile
 * into the running max m and this thread's share of the sum l, turns s
 * into the weights exp2(s - max) and returns in alpha the factors the O
 * so far must be scaled by.  A row's four threads (a quad) share its max. */
static __device__ __forceinline__ void
tc_softmax(float (&s)[8][4], const uint32_t *kp, const tc_pair &pr, int lane, float (&m)[2],
           float (&l)[2], float (&alpha)[2])
{
#pragma unroll
    for (int h = 0; h < 2; h++) {
        bool v = h ? pr.vb : pr.va;
        int r = h ? pr.rb : pr.ra;
        uint32_t w0 = v ? kp[2 * r] : 0u, w1 = v ? kp[2 * r + 1] : 0u;
        if ((w0 & w1) == 0xffffffffu)
            continue;
#pragma unroll
        for (int nt = 0; nt < 8; nt++) {
            uint32_t w = nt < 4 ? w0 : w1;
            int c = (nt & 3) * 8 + 2 * (lane & 3);
            if (!((w >> c) & 1u))
                s[nt][2 * h] = -INFINITY;
            if (!((w >> (c + 1)) & 1u))
                s[nt][2 * h + 1] = -INFINITY;
        }
    }

    float t[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        t[0] = fmaxf(t[0], fmaxf(s[nt][0], s[nt][1]));
        t[1] = fmaxf(t[1], fmaxf(s[nt][2], s[nt][3]));
    }
    float u[2];
#pragma unroll
    for (int h = 0; h < 2; h++) {
        t[h] = fmaxf(t[h], __shfl_xor_sync(0xffffffffu, t[h], 1));
        t[h] = fmaxf(t[h], __shfl_xor_sync(0xffffffffu, t[h], 2));
        float n = fmaxf(m[h], t[h]);
        /* A row that has seen nothing yet keeps max -inf: subtracting 0
         * then gives weights exp2(-inf) = 0 instead of NaN. */
        u[h] = n == -INFINITY ? 0.0f : n;
        alpha[h] = exp2f(m[h] - u[h]);
        m[h] = n;
    }
    float sum[2] = {0.0f, 0.0f};
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
        s[nt][0] = exp2f(s[nt][0] - u[0]);
        s[nt][1] = exp2f(s[nt][1] - u[0]);
        s[nt][2] = exp2f(s[nt][2] - u[1]);
        s[nt][3] = exp2f(s[nt][3] - u[1]);
        sum[0] += s[nt][0] + s[nt][1];
        sum[1] += s[nt][2] + s[nt][3];
    }
    l[0] = l[0] * alpha[0] + sum[0]; /* this thread's share; the quad sums at the end */
    l[1] = l[1] * alpha[1] + sum[1];
}

template <int NT>
static __device__ __forceinline__ void
tc_rescale(float (&o)[NT][4], const float (&alpha)[2])
{
#pragma unroll
    for (int nt = 0; nt < NT; nt++) {
        o[nt][0] *= alpha[0];
        o[nt][1] *= alpha[0];
        o[nt][2] *= alpha[1];
        o[nt][3] *= alpha[1];
    }
}

/* The weights as f16 A fragments: the S accumulator layout is the A
 * fragment layout. */
static __device__ __forceinline__ void
tc_pack_p(const float (&s)[8][4], uint32_t (&pa)[4][4])
{
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        pa[kk][0] = tc_pack(s[2 * kk][0], s[2 * kk][1]);
        pa[kk][1] = tc_pack(s[2 * kk][2], s[2 * kk][3]);
        pa[kk][2] = tc_pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[kk][3] = tc_pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
}

/* M 64: two CTAs a multiprocessor, which overlap one's softmax with the
 * other's products; M 128 (two warpgroups on one K/V tile): one, with
 * half the K/V traffic and copies per FLOP, and within each warpgroup the
 * softmax of one tile overlapping the P V of the one before. */
template <int D, bool WG, int M>
static __global__ void
__launch_bounds__(TC_THREADS(M), M == 64 ? 2 : 1) attn_tc_kernel(const kern_cuda_attn_tc_t p)
{
    constexpr int ROW = D + 8, KSTEPS = D / 16, NT_O = D / 8, NS = tc_stages<WG, M>();
    constexpr int STAGE = TC_N * (WG ? D : ROW); /* halves in one K or V stage */
    extern __shared__ __align__(16) unsigned char tc_dyn[];
    /* The swizzle is a function of address bits 4-9, so a wgmma stage
     * starts on a 1024-byte boundary (each is a multiple of 1024 bytes). */
    unsigned char *dyn = tc_dyn;
    if constexpr (WG)
        dyn += (1024u - ((unsigned)__cvta_generic_to_shared(tc_dyn) & 1023u)) & 1023u;
    __half *ks = (__half *)dyn;   /* [NS][STAGE] */
    __half *vs = ks + NS * STAGE; /* [NS][STAGE] */
    __half *qs = vs + NS * STAGE; /* [M][ROW] */
    __shared__ uint32_t keep[NS][2 * M];
    __shared__ uint32_t uni[NS][2 * TC_WARPS(M)];
    __shared__ int red[TC_WARPS(M)];
    __shared__ tc_rows<M> rs;

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int32_t *tile = p.tiles + 3 * (size_t)blockIdx.x;
    const int row0 = tile[0], n_rows = tile[1];
    const int32_t *blocks = p.blocks + tile[2];
    const uint32_t g = blockIdx.y;
    const int G = (int)p.group, HC = G < M ? G : M, hc0 = (int)blockIdx.z * HC;
    const int sinks = (int)p.sinks, bt = (int)p.block_tokens;
    const __half *kl = (const __half *)p.k, *vl = (const __half *)p.v;
    /* Queues tile t0's keep masks and copies into stage st (not committed). */
    auto fetch = [&](int t0, int st) {
        tc_bits(t0, &rs, keep[st], uni[st], sinks, bt);
        __syncthreads();
        tc_load<D, WG, M>(kl, vl, p.kvq, g, p.n_kv_heads, bt, t0, blocks, ks + st * STAGE,
                          vs + st * STAGE, uni[st]);
    };
    /* Waits for the copies of all but the newest `newer` groups and
     * publishes them to the CTA (and to wgmma's proxy). */
    auto landed = [&](bool newer) {
        if (newer)
            tc_cp_wait<1>();
        else
            tc_cp_wait<0>();
        if constexpr (WG)
            tc_wg_proxy_fence();
        __syncthreads();
    };

    /* Row state: thread r < M owns query row r of the tile (n_rows <=
     * M / HC); rows past the tile see nothing. */
    int nv = TC_END;
    if (tid < M) {
        int len = 0, lo = -1;
        const uint8_t *mrow = NULL;
        if (tid < n_rows) {
            int i = row0 + tid;
            len = p.row_len[i];
            lo = p.row_lo[i];
            if (p.mask && lo >= 0)
                mrow = p.mask + ((size_t)((uint32_t)i / p.mask_q_block) * p.mask_heads +
                                 (p.mask_heads > 1 ? g : 0)) *
                                    p.mask_stride;
            nv = tc_next_visible(0, len, lo, mrow, sinks, bt);
        }
        rs.len[tid] = len;
        rs.lo[tid] = lo;
        rs.nv[tid] = nv;
        rs.mrow[tid] = mrow;
    }
    int cur = tc_tile_of(tc_cta_min<M>(nv, red)), nx1 = TC_END;
    if (cur != TC_END)
        fetch(cur, 0);
    tc_cp_commit();
    if constexpr (NS == 3) {
        if (cur != TC_END)
            nx1 = tc_advance<M>(cur, nv, &rs, red, sinks, bt);
        if (nx1 != TC_END)
            fetch(nx1, 1);
        tc_cp_commit();
    }

    /* Q: M row m is query row m / HC, head hc0 + m % HC of the group. */
    {
        constexpr int F4 = D / 4;
        for (int e = tid; e < M * F4; e += TC_THREADS(M)) {
            int m = e / F4, c4 = e - m * F4;
            int r = m / HC, hh = hc0 + (m - r * HC);
            float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (r < n_rows && hh < G)
                x = *(const float4 *)(p.q +
                                      ((size_t)(row0 + r) * p.n_heads + (size_t)g * G + hh) * D +
                                      c4 * 4);
            /* Clamped, as decoded K and V are: a scaled q past f16's
             * range would make the scores inf (and the row NaN) where the
             * f32 reference stays finite. */
            uint2 h;
            h.x =
                tc_pack(kern__cuda_f16_clamp(x.x * p.qscale), kern__cuda_f16_clamp(x.y * p.qscale));
            h.y =
                tc_pack(kern__cuda_f16_clamp(x.z * p.qscale), kern__cuda_f16_clamp(x.w * p.qscale));
            *(uint2 *)(qs + m * ROW + c4 * 4) = h;
        }
    }
    __syncthreads();
    uint32_t qf[KSTEPS][4];
#pragma unroll
    for (int kk = 0; kk < KSTEPS; kk++)
        tc_ldsm4<false>(qf[kk], qs + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * ROW +
                                    kk * 16 + (lane >> 4) * 8);

    tc_pair pr;
    {
        const int ma = warp * 16 + (lane >> 2), mb = ma + 8;
        pr.ra = ma / HC;
        pr.rb = mb / HC;
        pr.va = pr.ra < n_rows && hc0 + (ma - pr.ra * HC) < G;
        pr.vb = pr.rb < n_rows && hc0 + (mb - pr.rb * HC) < G;
    }

    float o[NT_O][4];
    tc_zero(o);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f}, alpha[2];
    float s[8][4];
    uint32_t pa[4][4];

    if constexpr (NS == 3) {
        /* Each round j issues S of tile j + 1 and then P V of tile j, and
         * runs tile j + 1's softmax while the tensor cores do P V; tile
         * j + 2's copies are in flight meanwhile.  Tile j sits in stage
         * j % 3, whose previous tile's P V every warpgroup waited for
         * before the barrier in the next round's tc_advance. */
        int st = 0;
        if (cur != TC_END) {
            landed(true);
            tc_qk<D, WG>(s, qf, ks, lane);
            tc_wg_wait<0>();
            tc_wg_pin(s);
            tc_softmax(s, keep[0], pr, lane, m, l, alpha);
            tc_pack_p(s, pa);
        }
        /* No branch between the first issue and the waits, or ptxas
         * serializes the products: the last tile's P V comes after. */
        while (nx1 != TC_END) {
            const int s1 = st == 2 ? 0 : st + 1, s2 = s1 == 2 ? 0 : s1 + 1;
            int nx2 = tc_advance<M>(nx1, nv, &rs, red, sinks, bt);
            if (nx2 != TC_END)
                fetch(nx2, s2);
            tc_cp_commit();
            landed(true); /* tile nx1's copies */
            tc_zero(s);
            tc_wg_pin(s);
            tc_wg_pin(o);
            tc_wg_pin(pa);
            tc_wg_fence();
            tc_qk_issue<D>(s, qf, ks + s1 * STAGE);
            tc_pv_issue<D>(o, pa, vs + st * STAGE);
            tc_wg_wait<1>();
            tc_wg_pin(s);
            tc_softmax(s, keep[s1], pr, lane, m, l, alpha);
            tc_wg_wait<0>();
            tc_wg_pin(o);
            tc_wg_pin(pa);
            tc_rescale(o, alpha);
            tc_pack_p(s, pa);
            nx1 = nx2;
            st = s1;
        }
        if (cur != TC_END) {
            tc_pv<D, WG>(o, pa, vs + st * STAGE, lane);
            tc_wg_wait<0>();
            tc_wg_pin(o);
        }
    } else {
        int st = 0;
        while (cur != TC_END) {
            int nxt = tc_advance<M>(cur, nv, &rs, red, sinks, bt);
            if (nxt != TC_END) {
                fetch(nxt, st ^ 1);
                tc_cp_commit();
            }
            landed(nxt != TC_END); /* tile cur's K, V and keep masks */
            tc_qk<D, WG>(s, qf, ks + st * STAGE, lane);
            if constexpr (WG) {
                tc_wg_wait<0>();
                tc_wg_pin(s);
            }
            tc_softmax(s, keep[st], pr, lane, m, l, alpha);
            tc_rescale(o, alpha);
            tc_pack_p(s, pa);
            tc_pv<D, WG>(o, pa, vs + st * STAGE, lane);
            if constexpr (WG) {
                tc_wg_wait<0>();
                tc_wg_pin(o);
            }
            __syncthreads(); /* stage st and keep[st] are refilled next round */
            cur = nxt;
            st ^= 1;
        }
    }

#pragma unroll
    for (int h = 0; h < 2; h++) {
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
        l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
    /* kern.c guarantees every row a key, so l > 0 for valid rows. */
#pragma unroll
    for (int h = 0; h < 2; h++) {
        int r = h ? pr.rb : pr.ra, mr = warp * 16 + (lane >> 2) + 8 * h;
        if (!(h ? pr.vb : pr.va))
            continue;
        float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        float *orow =
            p.out + ((size_t)(row0 + r) * p.n_heads + (size_t)g * G + hc0 + (mr - r * HC)) * D;
#pragma unroll
        for (int nt = 0; nt < NT_O; nt++)
            *(float2 *)(orow + nt * 8 + 2 * (lane & 3)) =
                make_float2(o[nt][2 * h] * inv, o[nt][2 * h + 1] * inv);
    }
}

/* Launches instance (D, WG, M) on p's tiles, cut for M rows. */
template <int D, bool WG, int M>
static int
tc_launch(kern_cuda_t *be, const kern_cuda_attn_tc_t *p)
{
    uint32_t hc = p->group < M ? p->group : M;
    dim3 grid(p->n_tiles, p->n_kv_heads, (p->group + hc - 1) / hc);
    const size_t smem = tc_smem_bytes<D, WG, M>();
    /* Above 48 KiB a kernel must opt in; cheap enough to repeat. */
    KERN_CUDA_TRY(cudaFuncSetAttribute(attn_tc_kernel<D, WG, M>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    attn_tc_kernel<D, WG, M><<<grid, TC_THREADS(M), smem, be->stream>>>(*p);
    KERN_CUDA_LAUNCHED();
    return 0;
}

/* head_dim 64 or 128, else KVS_ENOTSUP. */
template <bool WG, int M>
static int
tc_launch_dim(kern_cuda_t *be, const kern_cuda_attn_tc_t *p)
{
    if (p->n_tiles == 0)
        return 0;
    if (p->head_dim == 64)
        return tc_launch<64, WG, M>(be, p);
    if (p->head_dim == 128)
        return tc_launch<128, WG, M>(be, p);
    return KVS_ENOTSUP;
}

#endif /* KERN_CUDA_ATTN_TC_CUH */
