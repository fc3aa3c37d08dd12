/*
 * kernels/cuda/cuda_common.cuh — private to kernels/cuda/: the cuda
 * backend struct, the error macros, the staging and workspace helpers that
 * kern_cuda.cu defines, the entry points of the other .cu files, and small
 * device helpers (element loads, warp and block reductions).
 *
 *   kern_cuda.cu   vtable, device/stream/cuBLAS setup, memory, staging,
 *                  workspaces, the small ops (get_rows, norms, rope, KV)
 *   cuda_matmul.cu  kern__cuda_matmul: cuBLAS and a dequantizing GEMV
 *   cuda_attn.cu    kern__cuda_attention: paged flash-style attention,
 *                   decode rows and the general case
 *   cuda_attn_tc.cu kern__cuda_attention_tc: its F16 prefill tiles on the
 *                   tensor cores (the kernel: cuda_attn_tc.cuh), mma.sync
 *   cuda_attn_wg.cu the same kernel on wgmma, compiled for sm_90a only
 *   cuda_select.cu  KV row gather (SnapKV/H2O), block-sparse prefill's
 *                   Quest bounds and scores, attention mass (SnapKV, H2O,
 *                   speculative prefill)
 *   cuda_dequant.cuh Q4_0 and K-quant block decoding, for get_rows and
 *                   matmul
 *   cuda_kvq.cuh    reading quantized KV tiles value by value
 *   cuda_kvseal.cu  kern__cuda_kv_seal: tiles sealed and reopened, the
 *                   codecs on the host
 *   cuda_graph.cu   kern_graph_run: recording and replaying steps
 *
 * Errors: every CUDA or cuBLAS call goes through KERN_CUDA_TRY or
 * KERN_CUBLAS_TRY, which log the statement, file and line and return
 * KVS_EDEVICE (never abort).  The vtable wrappers in kern_cuda.cu look at
 * every KVS_EDEVICE: when the context is broken (a sticky error, such as an
 * illegal address in a kernel) the backend marks itself dead and every
 * later call answers KVS_EDEVICE without touching the device.
 *
 * The files are compiled separately without relocatable device code, so
 * device functions shared between them live here as static inlines.
 */
#ifndef KERN_CUDA_COMMON_CUH
#define KERN_CUDA_COMMON_CUH

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>

/* base/kvs.h is a C header: its MPSC queue uses C11 _Atomic, which C++
 * does not spell that way.  No CUDA file touches the queue, and on every
 * target we build for an atomic pointer has a plain pointer's size, so the
 * qualifier is dropped for the declarations only. */
#define _Atomic(T) T
extern "C" {
#include "../kern_int.h"
}
#undef _Atomic

/* ------------------------------------------------------------------------ */
/* The backend.                                                             */
/* ------------------------------------------------------------------------ */

/* Pinned host staging slots.  Host arrays handed to ops (ids, slots, page
 * tables) are copied into one slot and sent with an async copy; a slot is
 * reused only after the event recorded behind its copy has fired, so the
 * host can run this many staging ops ahead of the device.  A decoder layer
 * stages twice (kv_append, attention; rope once a step): 16 slots keep the
 * host about eight layers ahead. */
#define KERN_CUDA_PIN_SLOTS 16

typedef struct kern_cuda_pin {
    void *host; /* cudaHostAlloc'ed */
    size_t bytes;
    cudaEvent_t done; /* recorded after the copy out of this slot */
} kern_cuda_pin_t;

/* Device workspaces, each grown on demand and kept.  Separate kinds so one
 * op can hold two at once. */
typedef enum kern_cuda_ws {
    KERN_CUDA_WS_MATMUL_X, /* activations converted to f16/bf16, or rounded for Q8_0 */
    KERN_CUDA_WS_MATMUL_W, /* quantized weight tiles dequantized to f16 */
    KERN_CUDA_WS_ATTN,     /* split-KV partial results */
    KERN_CUDA_WS_MASS_P,   /* kern_attn_mass: a chunk of rows' probabilities */
    KERN_CUDA_WS_MASS_OUT, /* kern_attn_mass: its result, before the copy back */
    KERN_CUDA_WS_SEAL,     /* kern_kv_seal: the device side of its mirror */
    KERN_CUDA_WS_PT,       /* attention's page table, kept for calls of one pt_epoch */
    KERN_CUDA_WS_ROPE,     /* rope's frequencies and positions, kept for one epoch */
    KERN_CUDA_WS_COUNT,
} kern_cuda_ws_t;

/* How ops run (cuda_graph.cu).  EAGER: launched at once, host arrays
 * staged through the pinned slots.  While kern_graph_run records a step,
 * CAPTURE: host arrays staged into the arena, launches recorded into the
 * graph.  While it refreshes a recorded step's arrays, DRY: staged into the
 * arena, nothing launched. */
typedef enum kern_cuda_mode {
    KERN_CUDA_EAGER = 0,
    KERN_CUDA_CAPTURE,
    KERN_CUDA_DRY,
} kern_cuda_mode_t;

/* What kern__cuda_stage_end answers in DRY mode: the op's arrays are
 * staged and it must launch nothing; the vtable wrappers turn it into 0. */
#define KERN_CUDA_DRY_DONE 1

#define KERN_CUDA_GRAPHS 64        /* recorded steps kept, least recently used out */
#define KERN_CUDA_DEC_INSTANCES 24 /* cuda_attn.cu's dec_kernel: 2 types x 3 DPL x 4 HB */

typedef struct kern_cuda_graph {
    uint64_t key;
    cudaGraphExec_t exec; /* NULL: not recorded */
    uint64_t layout;      /* the arena's offsets and sizes when recorded */
    uint64_t used;        /* graph_clock at the last replay; 0: free slot */
    bool broken;          /* recording failed: this key runs eagerly */
    bool retried;         /* one recording failed for a workspace to grow */
} kern_cuda_graph_t;

typedef struct kern_cuda {
    kern_backend_t base;
    int device;
    int n_sm;            /* multiprocessors, for sizing grids */
    size_t max_pitch;    /* the longest row pitch a 2D copy takes */
    cudaStream_t stream; /* every copy, memset, kernel and GEMM runs here */
    cublasHandle_t blas; /* bound to `stream` */

    kern_cuda_pin_t pin[KERN_CUDA_PIN_SLOTS];
    unsigned pin_next;
    void *stage_dev; /* device copy of the latest staged host arrays */
    size_t stage_dev_bytes;

    void *ws[KERN_CUDA_WS_COUNT];
    size_t ws_bytes[KERN_CUDA_WS_COUNT];

    void *host_scratch; /* a bitmap, zero between uses (cuda_host_bitmap) */
    size_t host_scratch_bytes;
    void *seal_host; /* kern_kv_seal's pinned mirror (cuda_kvseal.cu) */
    size_t seal_host_bytes;
    float *seal_x; /* its codec's scratch row */
    size_t seal_x_bytes;

    /* CUDA graphs (cuda_graph.cu): the arena holds every array a recorded
     * step stages, at the offsets recorded, pinned on the host and copied
     * to the device in one piece before each replay. */
    kern_cuda_mode_t mode;
    void *arena_host, *arena_dev;
    size_t arena_host_bytes, arena_dev_bytes, arena_used, arena_pending;
    uint64_t arena_layout;  /* every staging's offset and size, folded */
    cudaEvent_t arena_done; /* after the last copy out of arena_host */
    kern_cuda_graph_t graphs[KERN_CUDA_GRAPHS];
    uint64_t graph_clock;
    void *blas_ws; /* cuBLAS's workspace, set explicitly so GEMMs can be recorded */

    /* The page table attention last uploaded (kern_attn_args_t.pt_epoch):
     * where it is, in which mode it was staged and with how much room. */
    uint64_t pt_epoch;
    const int32_t *pt_dev;
    kern_cuda_mode_t pt_mode;
    size_t pt_room;
    /* The same for rope's frequencies and positions (kern_rope_args_t.epoch). */
    uint64_t rope_epoch;
    const void *rope_dev;
    kern_cuda_mode_t rope_mode;
    uint32_t rope_rows, rope_pairs;
    bool reserved;    /* kern_reserve sized everything: growing later is worth a warning */
    bool pin_refused; /* cudaHostAlloc failed once (kern_host_alloc): warned */
    /* Resident blocks per multiprocessor of each decode-attention
     * instance (cuda_attn.cu), asked once at start. */
    int dec_per_sm[KERN_CUDA_DEC_INSTANCES];
    /* Which kernel takes prefill attention tiles, chosen once at start
     * (kern__cuda_attention_wg_probe). */
    int attn_tc; /* kern_cuda_tc_t */
    /* Block scores in full f32 products rather than TF32
     * (KVS_CUDA_SCORES=f32): blocks then rank as on the host backends, so
     * a device check can compare whole runs of a block-choosing policy. */
    bool scores_f32;
} kern_cuda_t;

/* ------------------------------------------------------------------------ */
/* Errors.                                                                  */
/* ------------------------------------------------------------------------ */

/* Logs "cuda: <stmt> failed: <what> (file:line)" and returns KVS_EDEVICE. */
int kern__cuda_fail(const char *stmt, const char *what, const char *file, int line);

#define KERN_CUDA_TRY(x)                                                                      \
    do {                                                                                      \
        cudaError_t kern__cuda_e = (x);                                                       \
        if (kern__cuda_e != cudaSuccess)                                                      \
            return kern__cuda_fail(#x, cudaGetErrorString(kern__cuda_e), __FILE__, __LINE__); \
    } while (0)

#define KERN_CUBLAS_TRY(x)                                                                         \
    do {                                                                                           \
        cublasStatus_t kern__cublas_s = (x);                                                       \
        if (kern__cublas_s != CUBLAS_STATUS_SUCCESS)                                               \
            return kern__cuda_fail(#x, cublasGetStatusString(kern__cublas_s), __FILE__, __LINE__); \
    } while (0)

/* After a <<<...>>> launch: catches bad configurations at once and earlier
 * asynchronous faults as soon as they surface. */
#define KERN_CUDA_LAUNCHED() KERN_CUDA_TRY(cudaGetLastError())

/* ------------------------------------------------------------------------ */
/* Staging and workspaces (kern_cuda.cu).                                   */
/* ------------------------------------------------------------------------ */

/* Host arrays to the device, in two steps: stage_begin returns a pinned
 * buffer of at least `bytes` for the caller to fill; stage_end sends the
 * first `bytes` of it to the device staging buffer and returns that
 * buffer's address, valid for kernels queued on the stream until the next
 * stage_end.  Returns 0, KVS_ENOMEM or KVS_EDEVICE. */
int kern__cuda_stage_begin(kern_cuda_t *be, size_t bytes, void **host);
int kern__cuda_stage_end(kern_cuda_t *be, size_t bytes, void **dev);
/* EAGER only: sends the pinned buffer of the last stage_begin to dst, a
 * device buffer of the caller's, instead of the staging buffer. */
int kern__cuda_stage_to(kern_cuda_t *be, size_t bytes, void *dst);

/* Replaces the device buffer *p (*have bytes) by one of `want` bytes once
 * the stream is done with it; the contents go.  KVS_ENOMEM (logged, *p
 * NULL) when the device has no room. */
int kern__cuda_dev_regrow(kern_cuda_t *be, void **p, size_t *have, size_t want, const char *what);
/* A device workspace of at least `bytes`.  Growing it waits for the stream
 * (the old buffer may still be read) and reallocates.  Returns 0,
 * KVS_ENOMEM or KVS_EDEVICE. */
int kern__cuda_workspace(kern_cuda_t *be, kern_cuda_ws_t which, size_t bytes, void **out);

/* n rounded up to a multiple of `to`. */
static inline size_t
kern__cuda_round_up(size_t n, size_t to)
{
    return (n + to - 1) / to * to;
}

/* Grid size for a grid-stride loop over `n` items with `per_block` items
 * per block per step: enough blocks to fill the device, never more than
 * there is work. */
static inline unsigned
kern__cuda_grid(const kern_cuda_t *be, size_t n, unsigned per_block)
{
    size_t blocks = (n + per_block - 1) / per_block;
    size_t cap = (size_t)(be->n_sm > 0 ? be->n_sm : 1) * 32;
    if (blocks > cap)
        blocks = cap;
    return blocks ? (unsigned)blocks : 1;
}

/* ------------------------------------------------------------------------ */
/* Ops in other files.  Arguments were validated by kern.c.                 */
/* ------------------------------------------------------------------------ */

int kern__cuda_matmul(kern_cuda_t *be, const kern_tensor_t *w, const float *x, uint32_t n,
                      const float *bias, float *y);
/* kern_matmul_set: one GEMV launch per weight type for decode-sized n. */
int kern__cuda_matmul_set(kern_cuda_t *be, uint32_t count, const kern_tensor_t *const *w,
                          const float *x, uint32_t n, const float *const *bias, float *const *y);
/* Whether kern__cuda_matmul_glu takes this gate, up and n (one GEMV). */
bool kern__cuda_matmul_fuses(const kern_tensor_t *gate, const kern_tensor_t *up, uint32_t n);
/* y = silu(x gate^T) * (x up^T) in one launch, bit for bit the two
 * products and kern__cuda_silu_mul. */
int kern__cuda_matmul_glu(kern_cuda_t *be, const kern_tensor_t *gate, const kern_tensor_t *up,
                          const float *x, uint32_t n, float *y);
int kern__cuda_attention(kern_cuda_t *be, const kern_attn_args_t *a);
/* The occupancy of attention's decode kernels, for its split plans. */
int kern__cuda_attention_init(kern_cuda_t *be);
/* cuda_select.cu: kern_kv_gather (sources of either kind of block),
 * kern_kv_block_bounds, kern_block_scores and kern_attn_mass. */
int kern__cuda_kv_gather(kern_cuda_t *be, const kern_kv_t *kv, const int32_t *src,
                         const int32_t *dst, uint32_t n);
int kern__cuda_block_bounds(kern_cuda_t *be, const kern_kv_t *kv, uint32_t layer,
                            const int32_t *blocks, uint32_t n, uint16_t *out, bool by_block);
int kern__cuda_block_scores(kern_cuda_t *be, const kern_block_score_args_t *a);
int kern__cuda_block_select(kern_cuda_t *be, const kern_block_select_args_t *a);
int kern__cuda_attn_mass(kern_cuda_t *be, const kern_attn_mass_args_t *a);
/* cuda_graph.cu: kern_graph_run; the arena side of staging (CAPTURE and
 * DRY modes); freeing the recorded graphs and the arena. */
int kern__cuda_graph_run(kern_cuda_t *be, uint64_t key, kern_graph_fn fn, void *arg);
int kern__cuda_arena_begin(kern_cuda_t *be, size_t bytes, void **host);
int kern__cuda_arena_end(kern_cuda_t *be, size_t bytes, void **dev);
void kern__cuda_graphs_free(kern_cuda_t *be);
/* A launch plan chosen from the data (not the shapes) while a step is
 * recorded or refreshed: it becomes part of the step's layout, so a
 * replay whose data chose another plan is recorded again. */
void kern__cuda_graph_note(kern_cuda_t *be, uint64_t choice);
/* Before a device buffer moves or goes: drops what holds its address (the
 * recorded steps and the cached page table). */
void kern__cuda_forget_addresses(kern_cuda_t *be);
/* cuda_kvseal.cu: kern_kv_seal, the codecs on the host. */
int kern__cuda_kv_seal(kern_cuda_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
                       uint32_t n);
/* Sizes its mirrors for calls of up to `blocks` pairs of kv's blocks
 * (kern_reserve); *bytes: the mirror's size, *stage: what such a call
 * stages (the staging is the caller's to size). */
int kern__cuda_kv_seal_reserve(kern_cuda_t *be, const kern_kv_t *kv, uint32_t blocks, size_t *bytes,
                               size_t *stage);
/* What the ops above can ask of the workspaces and staging at most, for
 * the shapes of r (kern_reserve). */
void kern__cuda_matmul_reserve(const kern_reserve_t *r, size_t *x_bytes, size_t *w_bytes);
void kern__cuda_attention_reserve(const kern_cuda_t *be, const kern_reserve_t *r, size_t *ws_bytes,
                                  size_t *stage_bytes, size_t *pt_bytes);
void kern__cuda_attn_mass_reserve(const kern_reserve_t *r, size_t *p_bytes, size_t *out_bytes);

/* One layer's quantized blocks, as kernels take them by value (read
 * through cuda_kvq.cuh). */
typedef struct kern_cuda_kvq {
    const uint8_t *qk, *qv; /* the layer's tiles: [block - n_hot][kv head] */
    size_t qk_tile, qv_tile;
    uint32_t n_hot; /* blocks below are full precision (all: no codec) */
    int quant;      /* kern_kvq_t */
} kern_cuda_kvq_t;

static inline kern_cuda_kvq_t
kern__cuda_kvq(const kern_kv_t *kv, uint32_t layer)
{
    kern_cuda_kvq_t w = {NULL, NULL, 0, 0, kv->n_blocks, KERN_KVQ_NONE};
    if (kv->quant == KERN_KVQ_NONE)
        return w;
    if (kv->n_blocks > kv->n_hot) { /* else no tile is ever read */
        w.qk = (const uint8_t *)kern__kv_tile(kv, false, layer, kv->n_hot, 0);
        w.qv = (const uint8_t *)kern__kv_tile(kv, true, layer, kv->n_hot, 0);
    }
    w.qk_tile = kv->qk_tile;
    w.qv_tile = kv->qv_tile;
    w.n_hot = kv->n_hot;
    w.quant = (int)kv->quant;
    return w;
}

/* The tensor-core prefill kernels (cuda_attn_tc.cuh): mma.sync on every
 * GPU; wgmma on Hopper (cuda_attn_wg.cu) with one warpgroup a CTA or two
 * sharing each K/V tile.  Each takes tiles of M "M rows" (a query row
 * times a head of its GQA group). */
typedef enum kern_cuda_tc {
    KERN_CUDA_TC_MMA,   /* M 64 */
    KERN_CUDA_TC_WG64,  /* M 64 */
    KERN_CUDA_TC_WG128, /* M 128 */
} kern_cuda_tc_t;

static inline uint32_t
kern__cuda_tc_m(int tc)
{
    return tc == KERN_CUDA_TC_WG128 ? 128 : 64;
}

/* The tensor-core prefill kernel's work, staged by kern__cuda_attention.
 * A tile is M / min(group, M) consecutive query rows of one sequence or
 * fewer (M: kern__cuda_tc_m of the kernel that runs it); device arrays. */
typedef struct kern_cuda_attn_tc {
    const float *q;         /* 16-byte aligned */
    float *out;             /* 8-byte aligned */
    const int32_t *tiles;   /* [n_tiles][3]: first row, rows, offset of the sequence in blocks */
    const int32_t *row_len; /* [n_q] kv_len */
    const int32_t *row_lo;  /* [n_q] -1: dense row; else the window's first key (kv_len: none) */
    const int32_t *blocks;  /* page table indices */
    const uint8_t *mask;    /* NULL, or mask rows of mask_stride bytes, mask_heads per row group */
    const void *k;          /* the layer's K, F16, 16-byte aligned */
    const void *v;
    kern_cuda_kvq_t kvq;                /* the layer's quantized blocks, decoded into the tiles */
    uint32_t mask_stride, mask_q_block; /* mask_q_block >= 1 */
    uint32_t mask_heads;                /* 1: one mask for all KV heads; else n_kv_heads */
    uint32_t n_tiles, n_heads, n_kv_heads, group, head_dim, block_tokens, sinks;
    float qscale; /* scale * log2(e) */
} kern_cuda_attn_tc_t;
/* On be->attn_tc's kernel; head_dim 64 or 128 (else KVS_ENOTSUP).
 * Returns 0 or KVS_EDEVICE. */
int kern__cuda_attention_tc(kern_cuda_t *be, const kern_cuda_attn_tc_t *p);
/* The wgmma kernels (cuda_attn_wg.cu): tc is KERN_CUDA_TC_WG64 or _WG128,
 * one that kern__cuda_attention_wg_probe accepted. */
int kern__cuda_attention_wg(kern_cuda_t *be, int tc, const kern_cuda_attn_tc_t *p);
/* The prefill kernel for this device: a wgmma one on compute capability
 * 9.0 when its sm_90a code loaded and it matches mma.sync on a known
 * problem, else KERN_CUDA_TC_MMA.  KVS_CUDA_ATTN=mma|wgmma64|wgmma128 asks
 * for one (the default is wgmma128).  With the start lock held. */
int kern__cuda_attention_wg_probe(kern_cuda_t *be);
/* Takes (true) or drops the lock a backend's start runs under
 * (kern__cuda_new), so that the probe's device reset meets no other start. */
void kern__cuda_start_lock(bool lock);

/* ------------------------------------------------------------------------ */
/* Device helpers.                                                          */
/* ------------------------------------------------------------------------ */

static __device__ __forceinline__ float
kern__cuda_f16(uint16_t h)
{
    return __half2float(__ushort_as_half(h));
}

static __device__ __forceinline__ float
kern__cuda_bf16(uint16_t h)
{
    return __uint_as_float((uint32_t)h << 16);
}

/* A full-precision KV element (F32 or F16 pool) as f32. */
static __device__ __forceinline__ float
kern__cuda_kv_load(const float *p)
{
    return *p;
}

static __device__ __forceinline__ float
kern__cuda_kv_load(const __half *p)
{
    return __half2float(*p);
}

/* An f32 value into a full-precision KV element, rounded to nearest even
 * for F16 as kvs_f32_to_fp16 rounds. */
static __device__ __forceinline__ void
kern__cuda_kv_store(float *dst, float v)
{
    *dst = v;
}

static __device__ __forceinline__ void
kern__cuda_kv_store(__half *dst, float v)
{
    *dst = __float2half_rn(v);
}

/* v within f16's finite range, so that rounding it to f16 stays finite;
 * NaN stays NaN (fminf/fmaxf would turn it into a bound), as the host's
 * store_hot_row keeps it. */
static __device__ __forceinline__ float
kern__cuda_f16_clamp(float v)
{
    return v > 65504.0f ? 65504.0f : v < -65504.0f ? -65504.0f : v;
}

/* A value a codec decoded, as f16: a codec may decode just past f16's
 * largest (65504 rounds up in every codec's grid), which must stay finite,
 * as the host's store_hot_row keeps it. */
static __device__ __forceinline__ __half
kern__cuda_f16_sat(float v)
{
    return __float2half_rn(kern__cuda_f16_clamp(v));
}

/* A decoded value back into full-precision storage. */
static __device__ __forceinline__ void
kern__cuda_kv_store_decoded(float *dst, float v)
{
    *dst = v;
}

static __device__ __forceinline__ void
kern__cuda_kv_store_decoded(__half *dst, float v)
{
    *dst = kern__cuda_f16_sat(v);
}

/* Element c of a weight row of type T (F32, F16, BF16, Q8_0) as f32; Q8_0
 * computes d * q in float, exactly as kern_row_to_f32 does.  Q8_0 blocks
 * are 34 bytes, so only 2-byte alignment may be assumed. */
template <int T>
static __device__ __forceinline__ float
kern__cuda_load_elem(const char *row, uint32_t c)
{
    if (T == KERN_F32)
        return ((const float *)row)[c];
    if (T == KERN_F16)
        return kern__cuda_f16(((const uint16_t *)row)[c]);
    if (T == KERN_BF16)
        return kern__cuda_bf16(((const uint16_t *)row)[c]);
    const char *blk = row + (size_t)(c / KERN_QK8_0) * sizeof(kern_block_q8_0_t);
    float d = kern__cuda_f16(*(const uint16_t *)blk);
    return d * (float)(int8_t)blk[2 + c % KERN_QK8_0];
}

/* SwiGLU's element: kern_swiglu and the fused GEMV share it, so they agree
 * bit for bit. */
static __device__ __forceinline__ float
kern__cuda_silu_mul(float g, float u)
{
    return g / (1.0f + expf(-g)) * u;
}

static __device__ __forceinline__ float
kern__cuda_warp_sum(float v)
{
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

static __device__ __forceinline__ float
kern__cuda_warp_max(float v)
{
#pragma unroll
    for (int off = 16; off > 0; off >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    return v;
}

/* A reduction over the whole block (blockDim.x a multiple of 32, at most
 * 1024) by WARP, `idle` standing in for absent warps; every thread gets
 * the result.  `red` is 32 floats of shared memory. */
template <float (*WARP)(float)>
static __device__ __forceinline__ float
kern__cuda_block_reduce(float v, float *red, float idle)
{
    unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned n_warps = blockDim.x >> 5;
    v = WARP(v);
    __syncthreads(); /* `red` may still be read from a previous call */
    if (lane == 0)
        red[warp] = v;
    __syncthreads();
    v = lane < n_warps ? red[lane] : idle;
    return WARP(v);
}

static __device__ __forceinline__ float
kern__cuda_block_sum(float v, float *red)
{
    return kern__cuda_block_reduce<kern__cuda_warp_sum>(v, red, 0.0f);
}

static __device__ __forceinline__ float
kern__cuda_block_max(float v, float *red)
{
    return kern__cuda_block_reduce<kern__cuda_warp_max>(v, red, -INFINITY);
}

#endif /* KERN_CUDA_COMMON_CUH */
