/*
 * kernels/cuda/kern_cuda.cu — the "cuda" backend: device selection, one
 * non-default stream with a cuBLAS handle bound to it, memory, host-array
 * staging, workspaces, the vtable, and the small ops (get_rows, rmsnorm,
 * rope, swiglu, add, kv_append, kv_copy).  Matrix products live in
 * cuda_matmul.cu, attention in cuda_attn.cu (its tensor-core prefill in
 * cuda_attn_tc.cuh: mma.sync, or wgmma on Hopper), the row gather, Quest
 * bounds and attention mass in
 * cuda_select.cu, KV sealing in cuda_kvseal.cu, graphs in cuda_graph.cu.
 *
 * Callers: kern.c (kern_backend_new("cuda") and every kern_* op after
 * validation).  Thread: the engine thread that created the backend.
 *
 *   kern.c --> cuda_<op> wrapper --> cuda_enter (dead? right device?)
 *                                --> op body: stage host arrays, launch
 *                                --> cuda_leave (KVS_EDEVICE: sticky? -> dead)
 *
 * Ordering: everything is queued on be->stream, so ops run in call order
 * and the host returns before the device finishes; download and sync wait.
 * Host arrays are copied into pinned staging before an op returns, so the
 * caller may reuse them at once.
 */
#include "cuda_common.cuh"
#include "cuda_dequant.cuh"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Errors and the dead state.                                               */
/* ------------------------------------------------------------------------ */

int
kern__cuda_fail(const char *stmt, const char *what, const char *file, int line)
{
    KVS_ERRORF("cuda: %s failed: %s (%s:%d)", stmt, what, file, line);
    return KVS_EDEVICE;
}

/* Every op starts here: a dead backend answers without touching the
 * device, and the calling thread is pointed at our device in case it
 * drives another one too. */
static int
cuda_enter(kern_cuda_t *be)
{
    if (be->base.failed)
        return KVS_EDEVICE;
    int cur = -1;
    if (cudaGetDevice(&cur) != cudaSuccess || cur != be->device)
        KERN_CUDA_TRY(cudaSetDevice(be->device));
    return 0;
}

/* Every op ends here.  A failed call may have left a non-sticky error in
 * the runtime's last-error slot, which the next launch check would report
 * again: clear it.  Then probe the stream: after a sticky error (a fault in
 * a kernel, a lost device) every API call fails, and the backend is of no
 * further use. */
static int
cuda_leave(kern_cuda_t *be, int rc)
{
    /* While recording, querying the stream would end the recording; its
     * failure is kern_graph_run's to handle. */
    if (rc != KVS_EDEVICE || be->base.failed || be->mode == KERN_CUDA_CAPTURE)
        return rc;
    (void)cudaGetLastError();
    cudaError_t probe = cudaStreamQuery(be->stream);
    if (probe != cudaSuccess && probe != cudaErrorNotReady) {
        be->base.failed = true;
        KVS_ERRORF("cuda: device %d is unusable (%s); the cuda backend is now disabled", be->device,
                   cudaGetErrorString(probe));
    }
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Staging, workspaces, host scratch.                                       */
/* ------------------------------------------------------------------------ */

/* Grows pinned slot s to at least `bytes`, once the copy that last read
 * it is done. */
static int
pin_reserve(kern_cuda_t *be, kern_cuda_pin_t *s, size_t bytes)
{
    KERN_CUDA_TRY(cudaEventSynchronize(s->done));
    if (bytes > s->bytes) {
        if (be->reserved)
            KVS_WARNF("cuda: pinned staging grows to %zu bytes beyond the reservation", bytes);
        size_t want = kern__cuda_round_up(bytes > 2 * s->bytes ? bytes : 2 * s->bytes, 4096);
        void *old = s->host;
        s->host = NULL;
        s->bytes = 0;
        if (old)
            KERN_CUDA_TRY(cudaFreeHost(old));
        cudaError_t e = cudaHostAlloc(&s->host, want, cudaHostAllocDefault);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            s->host = NULL;
            KVS_WARNF("cuda: pinned staging of %zu bytes: %s", want, cudaGetErrorString(e));
            return KVS_ENOMEM;
        }
        s->bytes = want;
    }
    return 0;
}

int
kern__cuda_stage_begin(kern_cuda_t *be, size_t bytes, void **host)
{
    if (be->mode != KERN_CUDA_EAGER)
        return kern__cuda_arena_begin(be, bytes, host);
    kern_cuda_pin_t *s = &be->pin[be->pin_next];
    /* The copy that last read this slot must be done before we refill it. */
    int rc = pin_reserve(be, s, bytes);
    if (rc)
        return rc;
    *host = s->host;
    return 0;
}

int
kern__cuda_dev_regrow(kern_cuda_t *be, void **p, size_t *have, size_t want, const char *what)
{
    /* Kernels queued earlier may still use the old buffer. */
    KERN_CUDA_TRY(cudaStreamSynchronize(be->stream));
    void *old = *p;
    *p = NULL;
    *have = 0;
    if (old)
        KERN_CUDA_TRY(cudaFree(old));
    cudaError_t e = cudaMalloc(p, want);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        *p = NULL;
        KVS_WARNF("cuda: %s of %zu bytes: %s", what, want, cudaGetErrorString(e));
        return KVS_ENOMEM;
    }
    *have = want;
    return 0;
}

/* Grows the device side of the staging to at least `bytes`. */
static int
stage_dev_reserve(kern_cuda_t *be, size_t bytes)
{
    if (bytes <= be->stage_dev_bytes)
        return 0;
    if (be->reserved)
        KVS_WARNF("cuda: staging grows to %zu bytes beyond the reservation", bytes);
    return kern__cuda_dev_regrow(be, &be->stage_dev, &be->stage_dev_bytes,
                                 kern__cuda_round_up(bytes, 64 * 1024), "device staging");
}

int
kern__cuda_stage_end(kern_cuda_t *be, size_t bytes, void **dev)
{
    if (be->mode != KERN_CUDA_EAGER)
        return kern__cuda_arena_end(be, bytes, dev);
    kern_cuda_pin_t *s = &be->pin[be->pin_next];
    int rc = stage_dev_reserve(be, bytes);
    if (rc)
        return rc;
    /* Kernels of the previous op that read stage_dev were queued before
     * this copy on the same stream, so overwriting it here is safe. */
    KERN_CUDA_TRY(
        cudaMemcpyAsync(be->stage_dev, s->host, bytes, cudaMemcpyHostToDevice, be->stream));
    KERN_CUDA_TRY(cudaEventRecord(s->done, be->stream));
    be->pin_next = (be->pin_next + 1) % KERN_CUDA_PIN_SLOTS;
    *dev = be->stage_dev;
    return 0;
}

int
kern__cuda_stage_to(kern_cuda_t *be, size_t bytes, void *dst)
{
    kern_cuda_pin_t *s = &be->pin[be->pin_next];
    KERN_CUDA_TRY(cudaMemcpyAsync(dst, s->host, bytes, cudaMemcpyHostToDevice, be->stream));
    KERN_CUDA_TRY(cudaEventRecord(s->done, be->stream));
    be->pin_next = (be->pin_next + 1) % KERN_CUDA_PIN_SLOTS;
    return 0;
}

int
kern__cuda_workspace(kern_cuda_t *be, kern_cuda_ws_t which, size_t bytes, void **out)
{
    if (bytes <= be->ws_bytes[which]) {
        *out = be->ws[which];
        return 0;
    }
    if (be->mode != KERN_CUDA_EAGER)
        return KVS_ENOTSUP; /* a recorded step cannot allocate: kern_graph_run runs it eagerly */
    if (be->reserved)
        KVS_WARNF("cuda: workspace %d grows to %zu bytes beyond the reservation", (int)which,
                  bytes);
    kern__cuda_forget_addresses(be);
    int rc = kern__cuda_dev_regrow(be, &be->ws[which], &be->ws_bytes[which],
                                   kern__cuda_round_up(bytes, 2u << 20), "workspace");
    if (rc)
        return rc;
    *out = be->ws[which];
    return 0;
}

/* A host bitmap of `bits` bits, all zero: its users clear what they set
 * before returning, so it is cleared whole only when it grows. */
static uint8_t *
cuda_host_bitmap(kern_cuda_t *be, size_t bits)
{
    size_t bytes = (bits + 7) / 8;
    if (bytes > be->host_scratch_bytes) {
        void *p = realloc(be->host_scratch, bytes);
        if (p == NULL)
            return NULL;
        memset(p, 0, bytes);
        be->host_scratch = p;
        be->host_scratch_bytes = bytes;
    }
    return (uint8_t *)be->host_scratch;
}

/* Sets bit i; true when it was set already. */
static bool
bit_test_set(uint8_t *map, uint32_t i)
{
    bool was = map[i >> 3] & (1u << (i & 7));
    map[i >> 3] |= (uint8_t)(1u << (i & 7));
    return was;
}

static void
bit_clear(uint8_t *map, uint32_t i)
{
    map[i >> 3] &= (uint8_t) ~(1u << (i & 7));
}

/* ------------------------------------------------------------------------ */
/* Lifecycle.                                                               */
/* ------------------------------------------------------------------------ */

/* Also tears down a half-built backend: every field starts zeroed. */
static void
cuda_destroy(kern_backend_t *base)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    /* Errors are ignored here: after a sticky error every call fails, and
     * the memory goes with the context anyway. */
    (void)cudaSetDevice(be->device);
    if (be->stream)
        (void)cudaStreamSynchronize(be->stream);
    if (be->blas)
        (void)cublasDestroy(be->blas);
    for (int i = 0; i < KERN_CUDA_WS_COUNT; i++)
        if (be->ws[i])
            (void)cudaFree(be->ws[i]);
    if (be->stage_dev)
        (void)cudaFree(be->stage_dev);
    for (int i = 0; i < KERN_CUDA_PIN_SLOTS; i++) {
        if (be->pin[i].host)
            (void)cudaFreeHost(be->pin[i].host);
        if (be->pin[i].done)
            (void)cudaEventDestroy(be->pin[i].done);
    }
    if (be->stream)
        (void)cudaStreamDestroy(be->stream);
    (void)cudaGetLastError();
    kern__cuda_graphs_free(be);
    if (be->arena_host)
        (void)cudaFreeHost(be->arena_host);
    if (be->arena_dev)
        (void)cudaFree(be->arena_dev);
    if (be->arena_done)
        (void)cudaEventDestroy(be->arena_done);
    if (be->blas_ws)
        (void)cudaFree(be->blas_ws);
    if (be->seal_host)
        (void)cudaFreeHost(be->seal_host);
    (void)cudaGetLastError();
    free(be->host_scratch);
    free(be->seal_x);
    free(be);
}

static int
cuda_init(kern_cuda_t *be)
{
    KERN_CUDA_TRY(cudaSetDevice(be->device));
    KERN_CUDA_TRY(cudaDeviceGetAttribute(&be->n_sm, cudaDevAttrMultiProcessorCount, be->device));
    int pitch = 0;
    KERN_CUDA_TRY(cudaDeviceGetAttribute(&pitch, cudaDevAttrMaxPitch, be->device));
    be->max_pitch = pitch > 0 ? (size_t)pitch : 0;
    int rc = kern__cuda_attention_init(be);
    if (rc)
        return rc;
    /* Non-blocking: the legacy default stream, which other libraries in the
     * process may use, must not serialize against ours. */
    KERN_CUDA_TRY(cudaStreamCreateWithFlags(&be->stream, cudaStreamNonBlocking));
    for (int i = 0; i < KERN_CUDA_PIN_SLOTS; i++)
        KERN_CUDA_TRY(cudaEventCreateWithFlags(&be->pin[i].done, cudaEventDisableTiming));
    KERN_CUDA_TRY(cudaEventCreateWithFlags(&be->arena_done, cudaEventDisableTiming));
    KERN_CUBLAS_TRY(cublasCreate(&be->blas));
    KERN_CUBLAS_TRY(cublasSetStream(be->blas, be->stream));
    /* A workspace of our own, so that cuBLAS allocates nothing inside a
     * recorded step (its advice for graphs: 32 MiB on Hopper). */
    const size_t blas_ws = (size_t)32 << 20;
    if (cudaMalloc(&be->blas_ws, blas_ws) == cudaSuccess)
        KERN_CUBLAS_TRY(cublasSetWorkspace(be->blas, be->blas_ws, blas_ws));
    else
        be->blas_ws = NULL;
    (void)cudaGetLastError();

    const char *scores = getenv("KVS_CUDA_SCORES");
    be->scores_f32 = scores && strcmp(scores, "f32") == 0;
    if (scores && *scores && !be->scores_f32 && strcmp(scores, "tf32") != 0)
        KVS_WARNF("cuda: KVS_CUDA_SCORES=%s: not f32 or tf32; ignored", scores);

    cudaDeviceProp prop;
    KERN_CUDA_TRY(cudaGetDeviceProperties(&prop, be->device));
    KVS_INFOF("cuda: device %d: %s, sm_%d%d, %d SMs, %.1f GiB", be->device, prop.name, prop.major,
              prop.minor, be->n_sm, (double)prop.totalGlobalMem / (1u << 30));
    return 0;
}

static bool
cuda_supports(const kern_backend_t *be, kern_op_t op, kern_dtype_t type)
{
    (void)be;
    return kern__types_supported(op, type);
}

/* ------------------------------------------------------------------------ */
/* Memory.                                                                  */
/* ------------------------------------------------------------------------ */

static void *
cuda_alloc(kern_backend_t *base, size_t bytes)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    if (cuda_enter(be) != 0)
        return NULL;
    void *p = NULL;
    cudaError_t e = cudaMalloc(&p, bytes);
    if (e != cudaSuccess) {
        /* Running out is an answer, not a failure of the device: callers
         * size pools by trying.  Log, then check the context is still ok. */
        KVS_WARNF("cuda: cudaMalloc(%zu) failed: %s", bytes, cudaGetErrorString(e));
        cuda_leave(be, KVS_EDEVICE);
        return NULL;
    }
    return p;
}

/* cudaFree or cudaFreeHost (release) of p.  After a sticky error the
 * context is gone and the call may fail: the memory goes with it.
 * forget: p may be device memory a recorded step uses. */
static void
cuda_release(kern_cuda_t *be, cudaError_t (*release)(void *), void *p, bool forget,
             const char *what)
{
    if (be->base.failed) {
        (void)release(p);
        (void)cudaGetLastError();
        return;
    }
    int rc = cuda_enter(be);
    if (rc == 0) {
        if (forget)
            kern__cuda_forget_addresses(be);
        cudaError_t e = release(p);
        if (e != cudaSuccess)
            rc = kern__cuda_fail(what, cudaGetErrorString(e), __FILE__, __LINE__);
    }
    cuda_leave(be, rc);
}

static void
cuda_free(kern_backend_t *base, void *p)
{
    /* cudaFree waits for work still using p. */
    cuda_release((kern_cuda_t *)base, cudaFree, p, true, "cudaFree(p)");
}

static int
cuda_upload_body(kern_cuda_t *be, void *dst, const void *src, size_t bytes)
{
    /* Synchronous: the caller may free `src` when we return. */
    KERN_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, be->stream));
    KERN_CUDA_TRY(cudaStreamSynchronize(be->stream));
    return 0;
}

/* cuda_enter for ops that wait for the device or return data to the
 * host: those cannot be recorded, so inside kern_graph_run's fn they
 * answer KVS_EINVAL (kern.h). */
static int
cuda_enter_eager(kern_cuda_t *be)
{
    return be->mode == KERN_CUDA_EAGER ? cuda_enter(be) : KVS_EINVAL;
}

/* Turns DRY mode's "staged, nothing to launch" into success. */
static int
cuda_done(kern_cuda_t *be, int rc)
{
    return cuda_leave(be, rc == KERN_CUDA_DRY_DONE ? 0 : rc);
}

static int
cuda_upload(kern_backend_t *base, void *dst, const void *src, size_t bytes)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter_eager(be);
    return cuda_leave(be, rc ? rc : cuda_upload_body(be, dst, src, bytes));
}

static int
cuda_download_body(kern_cuda_t *be, void *dst, const void *src, size_t bytes)
{
    KERN_CUDA_TRY(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, be->stream));
    KERN_CUDA_TRY(cudaStreamSynchronize(be->stream));
    return 0;
}

static int
cuda_download(kern_backend_t *base, void *dst, const void *src, size_t bytes)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter_eager(be);
    return cuda_leave(be, rc ? rc : cuda_download_body(be, dst, src, bytes));
}

/* One 2D copy where both pitches are within the device's limit (a layer
 * of a large pool can be several GiB), else a copy per run; one wait. */
static int
cuda_copy_runs_body(kern_cuda_t *be, bool download, void *dst, size_t dpitch, const void *src,
                    size_t spitch, size_t bytes, size_t count)
{
    const cudaMemcpyKind kind = download ? cudaMemcpyDeviceToHost : cudaMemcpyHostToDevice;
    if (count == 1) /* any stride is valid then (kern.h); a 2D copy refuses pitches < bytes */
        dpitch = spitch = bytes;
    if ((dpitch > spitch ? dpitch : spitch) <= be->max_pitch) {
        KERN_CUDA_TRY(cudaMemcpy2DAsync(dst, dpitch, src, spitch, bytes, count, kind, be->stream));
    } else {
        for (size_t i = 0; i < count; i++)
            KERN_CUDA_TRY(cudaMemcpyAsync((unsigned char *)dst + i * dpitch,
                                          (const unsigned char *)src + i * spitch, bytes, kind,
                                          be->stream));
    }
    KERN_CUDA_TRY(cudaStreamSynchronize(be->stream));
    return 0;
}

static int
cuda_copy_runs(kern_backend_t *base, bool download, void *dst, size_t dpitch, const void *src,
               size_t spitch, size_t bytes, size_t count)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter_eager(be);
    return cuda_leave(
        be, rc ? rc : cuda_copy_runs_body(be, download, dst, dpitch, src, spitch, bytes, count));
}

/* Page-locked host memory (kern_host_alloc).  Not while a step is being
 * recorded, and NULL where the driver will not pin more (a warning once):
 * kern.c falls back to pageable memory, which still works. */
static void *
cuda_host_alloc(kern_backend_t *base, size_t bytes)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    if (cuda_enter_eager(be) != 0)
        return NULL;
    void *p = NULL;
    cudaError_t e = cudaHostAlloc(&p, bytes, cudaHostAllocDefault);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (!be->pin_refused)
            KVS_WARNF("cuda: pinning %zu bytes of host memory failed (%s); using pageable "
                      "memory",
                      bytes, cudaGetErrorString(e));
        be->pin_refused = true;
        return NULL;
    }
    return p;
}

static void
cuda_host_free(kern_backend_t *base, void *p)
{
    cuda_release((kern_cuda_t *)base, cudaFreeHost, p, false, "cudaFreeHost(p)");
}

static int
cuda_memset_body(kern_cuda_t *be, void *dst, int value, size_t bytes)
{
    KERN_CUDA_TRY(cudaMemsetAsync(dst, value, bytes, be->stream));
    return 0;
}

static int
cuda_memset(kern_backend_t *base, void *dst, int value, size_t bytes)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    if (be->mode == KERN_CUDA_DRY)
        return 0;
    int rc = cuda_enter(be);
    return cuda_leave(be, rc ? rc : cuda_memset_body(be, dst, value, bytes));
}

static int
cuda_sync_body(kern_cuda_t *be)
{
    KERN_CUDA_TRY(cudaStreamSynchronize(be->stream));
    return 0;
}

static int
cuda_sync(kern_backend_t *base)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter_eager(be);
    return cuda_leave(be, rc ? rc : cuda_sync_body(be));
}

/* ------------------------------------------------------------------------ */
/* get_rows.                                                                */
/* ------------------------------------------------------------------------ */

/* Q4_0 and the K-quants decode 8 values a thread (cuda_dequant.cuh; cols
 * is a multiple of 32), each bit for bit kern_row_to_f32's. */
template <int T>
static __global__ void
get_rows_kernel(const char *w, size_t row_bytes, uint32_t cols, const int32_t *ids, uint32_t n,
                float *out)
{
    for (uint32_t i = blockIdx.x; i < n; i += gridDim.x) {
        const char *row = w + (size_t)ids[i] * row_bytes;
        float *dst = out + (size_t)i * cols;
        if (kern__cuda_is_kq(T)) {
            for (uint32_t c = threadIdx.x * 8; c < cols; c += blockDim.x * 8) {
                float v[8];
                kern__cuda_dq8<T>(row, c, v);
#pragma unroll
                for (int k = 0; k < 8; k++)
                    dst[c + k] = v[k];
            }
        } else {
            for (uint32_t c = threadIdx.x; c < cols; c += blockDim.x)
                dst[c] = kern__cuda_load_elem<T>(row, c);
        }
    }
}

/* Element loads assume the natural alignment of the type; cudaMalloc'ed
 * buffers and GGUF's 32-byte tensor alignment give it, odd offsets do not. */
static bool
cuda_tensor_aligned(const kern_tensor_t *w)
{
    uintptr_t need = w->type == KERN_F32 ? 4 : 2;
    return ((uintptr_t)w->data % need) == 0 && (w->row_bytes % need) == 0;
}

static int
cuda_get_rows_body(kern_cuda_t *be, const kern_tensor_t *w, const int32_t *ids, uint32_t n,
                   float *out)
{
    if (!cuda_tensor_aligned(w)) {
        KVS_ERRORF("cuda: get_rows: weight rows are not aligned for %s",
                   kern_type_traits(w->type)->name);
        return KVS_EINVAL;
    }
    size_t bytes = (size_t)n * sizeof(int32_t);
    void *h, *d;
    int rc = kern__cuda_stage_begin(be, bytes, &h);
    if (rc)
        return rc;
    memcpy(h, ids, bytes);
    if ((rc = kern__cuda_stage_end(be, bytes, &d)) != 0)
        return rc;

    unsigned grid = n < 65535 ? n : 65535, threads = 256;
    const char *wd = (const char *)w->data;
    const int32_t *dids = (const int32_t *)d;
    switch (w->type) {
    case KERN_F32:
        get_rows_kernel<KERN_F32>
            <<<grid, threads, 0, be->stream>>>(wd, w->row_bytes, w->n_cols, dids, n, out);
        break;
    case KERN_F16:
        get_rows_kernel<KERN_F16>
            <<<grid, threads, 0, be->stream>>>(wd, w->row_bytes, w->n_cols, dids, n, out);
        break;
    case KERN_BF16:
        get_rows_kernel<KERN_BF16>
            <<<grid, threads, 0, be->stream>>>(wd, w->row_bytes, w->n_cols, dids, n, out);
        break;
    case KERN_Q8_0:
        get_rows_kernel<KERN_Q8_0>
            <<<grid, threads, 0, be->stream>>>(wd, w->row_bytes, w->n_cols, dids, n, out);
        break;
    case KERN_Q4_0:
        get_rows_kernel<KERN_Q4_0>
            <<<grid, threads, 0, be->stream>>>(wd, w->row_bytes, w->n_cols, dids, n, out);
        break;
    case KERN_Q4_K:
        get_rows_kernel<KERN_Q4_K>
            <<<grid, threads, 0, be->stream>>>(wd, w->row_bytes, w->n_cols, dids, n, out);
        break;
    case KERN_Q5_K:
        get_rows_kernel<KERN_Q5_K>
            <<<grid, threads, 0, be->stream>>>(wd, w->row_bytes, w->n_cols, dids, n, out);
        break;
    case KERN_Q6_K:
        get_rows_kernel<KERN_Q6_K>
            <<<grid, threads, 0, be->stream>>>(wd, w->row_bytes, w->n_cols, dids, n, out);
        break;
    default:
        return KVS_ENOTSUP;
    }
    KERN_CUDA_LAUNCHED();
    return 0;
}

/* ------------------------------------------------------------------------ */
/* rmsnorm, swiglu, add.                                                    */
/* ------------------------------------------------------------------------ */

/* One block per row.  Each thread reads and writes the same elements, after
 * the reduction, so y == x is fine, and with RES (kern_add_rmsnorm: x +=
 * res first, as add_kernel adds) y == res. */
template <bool RES>
static __global__ void
rmsnorm_kernel(float *x, const float *res, const float *w, uint32_t n, uint32_t d, float eps,
               float *y)
{
    __shared__ float red[32];
    for (uint32_t i = blockIdx.x; i < n; i += gridDim.x) {
        float *xi = x + (size_t)i * d;
        float *yi = y + (size_t)i * d;
        float ss = 0.0f;
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x) {
            float v = xi[c];
            if constexpr (RES) {
                v += res[(size_t)i * d + c];
                xi[c] = v;
            }
            ss += v * v;
        }
        ss = kern__cuda_block_sum(ss, red);
        float scale = 1.0f / sqrtf(ss / (float)d + eps);
        for (uint32_t c = threadIdx.x; c < d; c += blockDim.x)
            yi[c] = xi[c] * scale * w[c];
    }
}

/* res NULL: x is only read. */
static int
cuda_rmsnorm_body(kern_cuda_t *be, float *x, const float *res, const float *w, uint32_t n,
                  uint32_t d, float eps, float *y)
{
    unsigned threads = d >= 4096 ? 1024 : d >= 1024 ? 512 : 256;
    unsigned grid = n < 65535 ? n : 65535;
    if (res)
        rmsnorm_kernel<true><<<grid, threads, 0, be->stream>>>(x, res, w, n, d, eps, y);
    else
        rmsnorm_kernel<false><<<grid, threads, 0, be->stream>>>(x, NULL, w, n, d, eps, y);
    KERN_CUDA_LAUNCHED();
    return 0;
}

static __global__ void
swiglu_kernel(const float *gate, const float *up, size_t n, float *out)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x) {
        out[i] = kern__cuda_silu_mul(gate[i], up[i]);
    }
}

static int
cuda_swiglu_body(kern_cuda_t *be, const float *gate, const float *up, size_t n, float *out)
{
    swiglu_kernel<<<kern__cuda_grid(be, n, 256), 256, 0, be->stream>>>(gate, up, n, out);
    KERN_CUDA_LAUNCHED();
    return 0;
}

static __global__ void
add_kernel(float *x, const float *y, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] += y[i];
}

static int
cuda_add_body(kern_cuda_t *be, float *x, const float *y, size_t n)
{
    add_kernel<<<kern__cuda_grid(be, n, 256), 256, 0, be->stream>>>(x, y, n);
    KERN_CUDA_LAUNCHED();
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Delta Attention's correction (kern.h).                                   */
/* ------------------------------------------------------------------------ */

/* Two passes, because every block's first output row is both read (for
 * the difference) and corrected: first dense[b] -= out[b * gamma] for every
 * block, then every row adds its block's difference (or, in the tail,
 * takes its dense row). */
static __global__ void
delta_diff_kernel(const float *out, float *dense, uint32_t n_blocks, uint32_t width, uint32_t gamma)
{
    size_t count = (size_t)n_blocks * width;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t b = i / width, k = i % width;
        dense[i] -= out[b * gamma * width + k];
    }
}

static __global__ void
delta_add_kernel(float *out, const float *dense, uint32_t n, uint32_t ns, uint32_t n_blocks,
                 uint32_t width, uint32_t gamma)
{
    size_t count = (size_t)n * width;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < count;
         i += (size_t)gridDim.x * blockDim.x) {
        size_t r = i / width, k = i % width;
        if (r < ns)
            out[i] += dense[(r / gamma) * width + k];
        else
            out[i] = dense[(n_blocks + r - ns) * width + k];
    }
}

static int
cuda_delta_apply_body(kern_cuda_t *be, float *out, float *dense, uint32_t n, uint32_t width,
                      uint32_t gamma, uint32_t tail)
{
    uint32_t ns = n - tail, n_blocks = ns ? (ns - 1) / gamma + 1 : 0; /* no wrap at any gamma */
    if (n_blocks) {
        size_t count = (size_t)n_blocks * width;
        delta_diff_kernel<<<kern__cuda_grid(be, count, 256), 256, 0, be->stream>>>(
            out, dense, n_blocks, width, gamma);
        KERN_CUDA_LAUNCHED();
    }
    size_t count = (size_t)n * width;
    delta_add_kernel<<<kern__cuda_grid(be, count, 256), 256, 0, be->stream>>>(
        out, dense, n, ns, n_blocks, width, gamma);
    KERN_CUDA_LAUNCHED();
    return 0;
}

/* ------------------------------------------------------------------------ */
/* rope.                                                                    */
/* ------------------------------------------------------------------------ */

#define ROPE_CHUNK 256 /* rotation pairs whose cos/sin one block caches at a time */

/* One block per row.  The angle of pair i is pos * inv_freq[i], with
 * inv_freq computed on the host in double; the product and the sin/cos run
 * in double too, because at long context pos * inv_freq reaches 1e5 rad
 * and float would be off by up to 1e-2 rad.  Each (row, pair) angle is
 * computed once and applied to every head: x's, then x2's. */
static __global__ void
rope_kernel(float *x, uint32_t n_heads, float *x2, uint32_t n_heads2, uint32_t n_rows,
            uint32_t head_dim, uint32_t n_pairs, const int32_t *pos, const double *inv_freq,
            bool neox)
{
    __shared__ double cs[ROPE_CHUNK][2];
    for (uint32_t r = blockIdx.x; r < n_rows; r += gridDim.x) {
        double p = (double)pos[r];
        float *xr = x + (size_t)r * n_heads * head_dim;
        float *xr2 = x2 ? x2 + (size_t)r * n_heads2 * head_dim : NULL;
        for (uint32_t i0 = 0; i0 < n_pairs; i0 += ROPE_CHUNK) {
            uint32_t m = n_pairs - i0 < ROPE_CHUNK ? n_pairs - i0 : ROPE_CHUNK;
            __syncthreads(); /* the previous chunk is done with cs */
            for (uint32_t i = threadIdx.x; i < m; i += blockDim.x)
                sincos(p * inv_freq[i0 + i], &cs[i][1], &cs[i][0]);
            __syncthreads();
            for (uint32_t t = threadIdx.x; t < m * (n_heads + n_heads2); t += blockDim.x) {
                uint32_t h = t / m, i = t % m;
                float *head = h < n_heads ? xr + (size_t)h * head_dim
                                          : xr2 + (size_t)(h - n_heads) * head_dim;
                /* NORM pairs adjacent dims; NEOX pairs i with i + n_pairs. */
                float *v0 = head + (neox ? i0 + i : 2 * (i0 + i));
                float *v1 = v0 + (neox ? n_pairs : 1);
                double x0 = *v0, x1 = *v1, c = cs[i][0], s = cs[i][1];
                *v0 = (float)(x0 * c - x1 * s);
                *v1 = (float)(x0 * s + x1 * c);
            }
        }
    }
}

/* inv_freq (double, 8-aligned first), then pos, on the device in *d.  A
 * call of the epoch the last one staged (kern_rope_args_t.epoch: the
 * layers of one forward pass) reuses it: eager, it lives in a workspace
 * of its own, which other ops' staging does not overwrite; while a step is
 * recorded or refreshed, in the arena, which holds it for the step. */
static int
rope_stage(kern_cuda_t *be, const kern_rope_args_t *a, const void **d)
{
    const uint32_t n_pairs = a->n_rot / 2;
    if (a->epoch && a->epoch == be->rope_epoch && be->rope_mode == be->mode &&
        be->rope_rows == a->n_rows && be->rope_pairs == n_pairs) {
        *d = be->rope_dev;
        return be->mode == KERN_CUDA_DRY ? KERN_CUDA_DRY_DONE : 0;
    }
    size_t freq_bytes = (size_t)n_pairs * sizeof(double);
    size_t bytes = freq_bytes + (size_t)a->n_rows * sizeof(int32_t);
    void *h, *dev = NULL;
    int rc = kern__cuda_stage_begin(be, bytes, &h);
    if (rc)
        return rc;
    double *inv = (double *)h;
    for (uint32_t i = 0; i < n_pairs; i++) {
        inv[i] = (double)a->freq_scale * pow((double)a->freq_base, -2.0 * i / a->n_rot);
        if (a->freq_factors)
            inv[i] /= a->freq_factors[i];
    }
    memcpy((char *)h + freq_bytes, a->pos, (size_t)a->n_rows * sizeof(int32_t));
    if (be->mode == KERN_CUDA_EAGER && a->epoch) {
        if ((rc = kern__cuda_workspace(be, KERN_CUDA_WS_ROPE, bytes, &dev)) != 0 ||
            (rc = kern__cuda_stage_to(be, bytes, dev)) != 0)
            return rc;
    } else if ((rc = kern__cuda_stage_end(be, bytes, &dev)) != 0 && rc != KERN_CUDA_DRY_DONE) {
        return rc;
    }
    be->rope_epoch = a->epoch;
    be->rope_mode = be->mode;
    be->rope_rows = a->n_rows;
    be->rope_pairs = n_pairs;
    be->rope_dev = dev;
    *d = dev;
    return rc;
}

static int
cuda_rope_body(kern_cuda_t *be, const kern_rope_args_t *a)
{
    const void *d;
    int rc = rope_stage(be, a, &d);
    if (rc)
        return rc; /* KERN_CUDA_DRY_DONE included: nothing to launch */
    uint32_t n_pairs = a->n_rot / 2;
    unsigned grid = a->n_rows < 65535 ? a->n_rows : 65535;
    rope_kernel<<<grid, 128, 0, be->stream>>>(
        a->x, a->n_heads, a->x2, a->n_heads2, a->n_rows, a->head_dim, n_pairs,
        (const int32_t *)((const char *)d + (size_t)n_pairs * sizeof(double)), (const double *)d,
        a->neox);
    KERN_CUDA_LAUNCHED();
    return 0;
}

/* ------------------------------------------------------------------------ */
/* KV append and block copy.                                                */
/* ------------------------------------------------------------------------ */

/* One block per token: its n_kv_heads * head_dim K and V values go to slot
 * (block, off) of every head.  kv_k/kv_v point at the layer.  A negative
 * slot is a token a later one overwrites (cuda_kv_append_body). */
template <typename T>
static __global__ void
kv_append_kernel(T *kv_k, T *kv_v, uint32_t n_kv_heads, uint32_t head_dim, uint32_t block_tokens,
                 const float *k, const float *v, const int32_t *slots, uint32_t n)
{
    uint32_t width = n_kv_heads * head_dim;
    for (uint32_t i = blockIdx.x; i < n; i += gridDim.x) {
        if (slots[i] < 0)
            continue;
        uint32_t blk = (uint32_t)slots[i] / block_tokens, off = (uint32_t)slots[i] % block_tokens;
        const float *ki = k + (size_t)i * width, *vi = v + (size_t)i * width;
        for (uint32_t e = threadIdx.x; e < width; e += blockDim.x) {
            uint32_t h = e / head_dim, c = e % head_dim;
            size_t dst = (((size_t)blk * n_kv_heads + h) * block_tokens + off) * head_dim + c;
            kern__cuda_kv_store(kv_k + dst, ki[e]);
            kern__cuda_kv_store(kv_v + dst, vi[e]);
        }
    }
}

static int
cuda_kv_append_body(kern_cuda_t *be, const kern_kv_t *kv, uint32_t layer, const float *k,
                    const float *v, const int32_t *slots, uint32_t n)
{
    size_t bytes = (size_t)n * sizeof(int32_t);
    void *h, *d;
    int rc = kern__cuda_stage_begin(be, bytes, &h);
    if (rc)
        return rc;
    /* Tokens are written all at once, in no order, and the contract is the
     * reference's in-order one: a slot named twice keeps the later token.
     * So, walking back, a slot already seen drops the earlier token. */
    uint8_t *map = cuda_host_bitmap(be, (size_t)kv->n_blocks * kv->block_tokens);
    if (map == NULL)
        return KVS_ENOMEM;
    int32_t *hs = (int32_t *)h;
    for (uint32_t i = n; i-- > 0;)
        hs[i] = bit_test_set(map, (uint32_t)slots[i]) ? -1 : slots[i];
    for (uint32_t i = 0; i < n; i++)
        bit_clear(map, (uint32_t)slots[i]);
    if ((rc = kern__cuda_stage_end(be, bytes, &d)) != 0)
        return rc;

    size_t lo = (size_t)layer * kv->layer_bytes;
    unsigned grid = n < 65535 ? n : 65535;
    unsigned threads = kv->n_kv_heads * kv->head_dim >= 256 ? 256 : 128;
    if (kv->dtype == KERN_F16)
        kv_append_kernel<__half><<<grid, threads, 0, be->stream>>>(
            (__half *)((char *)kv->k + lo), (__half *)((char *)kv->v + lo), kv->n_kv_heads,
            kv->head_dim, kv->block_tokens, k, v, (const int32_t *)d, n);
    else
        kv_append_kernel<float><<<grid, threads, 0, be->stream>>>(
            (float *)((char *)kv->k + lo), (float *)((char *)kv->v + lo), kv->n_kv_heads,
            kv->head_dim, kv->block_tokens, k, v, (const int32_t *)d, n);
    KERN_CUDA_LAUNCHED();
    return 0;
}

/* blockIdx.x: pair i of (src, dst) block ids; blockIdx.y: layer; blockIdx.z:
 * 0 for K, 1 for V.  One block of one layer is contiguous (all its heads,
 * slots and dims), block_words words of type W. */
template <typename W>
static __global__ void
kv_copy_kernel(char *k, char *v, size_t layer_bytes, size_t block_words, const int32_t *pairs)
{
    char *base = (blockIdx.z ? v : k) + (size_t)blockIdx.y * layer_bytes;
    const W *src = (const W *)base + (size_t)pairs[2 * blockIdx.x] * block_words;
    W *dst = (W *)base + (size_t)pairs[2 * blockIdx.x + 1] * block_words;
    for (size_t j = threadIdx.x; j < block_words; j += blockDim.x)
        dst[j] = src[j];
}

static int
cuda_kv_copy_launch(kern_cuda_t *be, const kern_kv_t *kv, size_t block_bytes, const int32_t *pairs,
                    uint32_t n)
{
    dim3 grid(n, kv->n_layers, 2);
    /* The widest word that divides every block and layer offset. */
    uintptr_t all = (uintptr_t)kv->k | (uintptr_t)kv->v | kv->layer_bytes | block_bytes;
    char *k = (char *)kv->k, *v = (char *)kv->v;
    if (all % 16 == 0)
        kv_copy_kernel<uint4>
            <<<grid, 256, 0, be->stream>>>(k, v, kv->layer_bytes, block_bytes / 16, pairs);
    else if (all % 4 == 0)
        kv_copy_kernel<uint32_t>
            <<<grid, 256, 0, be->stream>>>(k, v, kv->layer_bytes, block_bytes / 4, pairs);
    else
        kv_copy_kernel<uint16_t>
            <<<grid, 256, 0, be->stream>>>(k, v, kv->layer_bytes, block_bytes / 2, pairs);
    KERN_CUDA_LAUNCHED();
    return 0;
}

static int
cuda_kv_copy_body(kern_cuda_t *be, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
                  uint32_t n)
{
    size_t block_bytes = kern__kv_offset(kv, 0, 1, 0, 0);
    if (kv->n_layers > 65535) {
        KVS_ERRORF("cuda: kv_copy: %u layers exceed the grid limit", kv->n_layers);
        return KVS_ENOTSUP;
    }

    /* All copies run at once, which matches the reference's one-by-one
     * order only when no destination is also a source or repeats.  Copy-on-
     * write (shared source, fresh destination) always qualifies; anything
     * else falls back to one launch per pair, in order. */
    uint8_t *map = cuda_host_bitmap(be, kv->n_blocks);
    if (map == NULL)
        return KVS_ENOMEM;
    bool ordered = false;
    for (uint32_t i = 0; i < n; i++)
        bit_test_set(map, (uint32_t)src[i]);
    for (uint32_t i = 0; i < n && !ordered; i++)
        ordered = bit_test_set(map, (uint32_t)dst[i]); /* a destination is a source, or a repeat */
    for (uint32_t i = 0; i < n; i++) {
        bit_clear(map, (uint32_t)src[i]);
        bit_clear(map, (uint32_t)dst[i]);
    }
    kern__cuda_graph_note(be, ordered);

    size_t bytes = (size_t)n * 2 * sizeof(int32_t);
    void *h, *d;
    int rc = kern__cuda_stage_begin(be, bytes, &h);
    if (rc)
        return rc;
    int32_t *pairs = (int32_t *)h;
    for (uint32_t i = 0; i < n; i++) {
        pairs[2 * i] = src[i];
        pairs[2 * i + 1] = dst[i];
    }
    if ((rc = kern__cuda_stage_end(be, bytes, &d)) != 0)
        return rc;
    const int32_t *dp = (const int32_t *)d;
    if (!ordered)
        return cuda_kv_copy_launch(be, kv, block_bytes, dp, n);
    for (uint32_t i = 0; i < n; i++)
        if ((rc = cuda_kv_copy_launch(be, kv, block_bytes, dp + 2 * i, 1)) != 0)
            return rc;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Vtable wrappers: enter, body, leave.                                     */
/* ------------------------------------------------------------------------ */

static int
cuda_get_rows(kern_backend_t *base, const kern_tensor_t *w, const int32_t *ids, uint32_t n,
              float *out)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter(be);
    return cuda_done(be, rc ? rc : cuda_get_rows_body(be, w, ids, n, out));
}

static int
cuda_matmul(kern_backend_t *base, const kern_tensor_t *w, const float *x, uint32_t n,
            const float *bias, float *y)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    if (be->mode == KERN_CUDA_DRY)
        return 0; /* stages nothing */
    int rc = cuda_enter(be);
    if (rc == 0 && !cuda_tensor_aligned(w)) {
        KVS_ERRORF("cuda: matmul: weight rows are not aligned for %s",
                   kern_type_traits(w->type)->name);
        return KVS_EINVAL;
    }
    return cuda_leave(be, rc ? rc : kern__cuda_matmul(be, w, x, n, bias, y));
}

/* kern.c checked the weights (as cuda_matmul's alignment check does). */
static int
cuda_matmul_set(kern_backend_t *base, uint32_t count, const kern_tensor_t *const *w, const float *x,
                uint32_t n, const float *const *bias, float *const *y)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    if (be->mode == KERN_CUDA_DRY)
        return 0; /* stages nothing */
    int rc = cuda_enter(be);
    return cuda_leave(be, rc ? rc : kern__cuda_matmul_set(be, count, w, x, n, bias, y));
}

/* The GEMV fuses both products and SwiGLU; other calls run them apart. */
static int
cuda_matmul_swiglu(kern_backend_t *base, const kern_tensor_t *gate, const kern_tensor_t *up,
                   const float *x, uint32_t n, float *tmp, float *y)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    if (!kern__cuda_matmul_fuses(gate, up, n))
        return kern__matmul_swiglu_apart(base, gate, up, x, n, tmp, y);
    if (be->mode == KERN_CUDA_DRY)
        return 0; /* stages nothing */
    int rc = cuda_enter(be);
    return cuda_leave(be, rc ? rc : kern__cuda_matmul_glu(be, gate, up, x, n, y));
}

static int
cuda_rmsnorm(kern_backend_t *base, const float *x, const float *w, uint32_t n, uint32_t d,
             float eps, float *y)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    if (be->mode == KERN_CUDA_DRY)
        return 0; /* stages nothing */
    int rc = cuda_enter(be);
    /* The kernel writes x only when given res. */
    return cuda_leave(be, rc ? rc : cuda_rmsnorm_body(be, (float *)x, NULL, w, n, d, eps, y));
}

static int
cuda_add_rmsnorm(kern_backend_t *base, float *x, const float *res, const float *w, uint32_t n,
                 uint32_t d, float eps, float *y)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    if (be->mode == KERN_CUDA_DRY)
        return 0; /* stages nothing */
    int rc = cuda_enter(be);
    return cuda_leave(be, rc ? rc : cuda_rmsnorm_body(be, x, res, w, n, d, eps, y));
}

static int
cuda_rope(kern_backend_t *base, const kern_rope_args_t *a)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter(be);
    return cuda_done(be, rc ? rc : cuda_rope_body(be, a));
}

static int
cuda_swiglu(kern_backend_t *base, const float *gate, const float *up, size_t n, float *out)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    if (be->mode == KERN_CUDA_DRY)
        return 0; /* stages nothing */
    int rc = cuda_enter(be);
    return cuda_leave(be, rc ? rc : cuda_swiglu_body(be, gate, up, n, out));
}

static int
cuda_add(kern_backend_t *base, float *x, const float *y, size_t n)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    if (be->mode == KERN_CUDA_DRY)
        return 0; /* stages nothing */
    int rc = cuda_enter(be);
    return cuda_leave(be, rc ? rc : cuda_add_body(be, x, y, n));
}

static int
cuda_kv_append(kern_backend_t *base, const kern_kv_t *kv, uint32_t layer, const float *k,
               const float *v, const int32_t *slots, uint32_t n)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter(be);
    return cuda_done(be, rc ? rc : cuda_kv_append_body(be, kv, layer, k, v, slots, n));
}

static int
cuda_kv_copy(kern_backend_t *base, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
             uint32_t n)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter(be);
    return cuda_done(be, rc ? rc : cuda_kv_copy_body(be, kv, src, dst, n));
}

static int
cuda_attention(kern_backend_t *base, const kern_attn_args_t *a)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter(be);
    return cuda_done(be, rc ? rc : kern__cuda_attention(be, a));
}

static int
cuda_delta_apply(kern_backend_t *base, float *out, float *dense, uint32_t n, uint32_t width,
                 uint32_t gamma, uint32_t tail)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    if (be->mode == KERN_CUDA_DRY)
        return 0; /* stages nothing */
    int rc = cuda_enter(be);
    return cuda_leave(be, rc ? rc : cuda_delta_apply_body(be, out, dense, n, width, gamma, tail));
}

static int
cuda_kv_gather(kern_backend_t *base, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
               uint32_t n)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter(be);
    return cuda_done(be, rc ? rc : kern__cuda_kv_gather(be, kv, src, dst, n));
}

static int
cuda_block_bounds(kern_backend_t *base, const kern_kv_t *kv, uint32_t layer, const int32_t *blocks,
                  uint32_t n, uint16_t *out, bool by_block)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter(be);
    return cuda_done(be,
                     rc ? rc : kern__cuda_block_bounds(be, kv, layer, blocks, n, out, by_block));
}

static int
cuda_block_scores(kern_backend_t *base, const kern_block_score_args_t *a)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter(be);
    return cuda_done(be, rc ? rc : kern__cuda_block_scores(be, a));
}

static int
cuda_block_select(kern_backend_t *base, const kern_block_select_args_t *a)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter(be);
    return cuda_done(be, rc ? rc : kern__cuda_block_select(be, a));
}

static int
cuda_attn_mass(kern_backend_t *base, const kern_attn_mass_args_t *a)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter_eager(be);
    return cuda_leave(be, rc ? rc : kern__cuda_attn_mass(be, a));
}

static int
cuda_kv_seal(kern_backend_t *base, const kern_kv_t *kv, const int32_t *src, const int32_t *dst,
             uint32_t n)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter_eager(be);
    return cuda_leave(be, rc ? rc : kern__cuda_kv_seal(be, kv, src, dst, n));
}

/* Sizes every workspace and staging buffer for r's shapes now, so serving
 * allocates nothing (kern_reserve). */
static int
cuda_reserve_body(kern_cuda_t *be, const kern_reserve_t *r)
{
    size_t x, w, attn, stage, pt, mass_p, mass_out;
    be->reserved = false; /* growing to a new reservation is not growing past it */
    kern__cuda_matmul_reserve(r, &x, &w);
    kern__cuda_attention_reserve(be, r, &attn, &stage, &pt);
    kern__cuda_attn_mass_reserve(r, &mass_p, &mass_out);
    /* A staging holds one op's arrays at a time: attention's rows, or its
     * page table (through a pinned slot into KERN_CUDA_WS_PT, or the
     * arena), or kv_append's slots and get_rows' ids (one int per row). */
    if (stage < pt)
        stage = pt;
    size_t rows = (size_t)r->max_rows * sizeof(int32_t);
    if (stage < rows)
        stage = rows;
    /* rope's frequencies (at most head_dim / 2) and positions, which it
     * stages too */
    size_t rope = (size_t)r->head_dim / 2 * sizeof(double) + rows;
    if (stage < rope)
        stage = rope;
    /* kv_seal's mirrors, and its segment lists, which it stages */
    int rc = 0;
    size_t seal = 0;
    for (int i = 0; i < 2 && rc == 0; i++) {
        size_t b = 0, st = 0;
        if (r->seal_kv[i])
            rc = kern__cuda_kv_seal_reserve(be, r->seal_kv[i], r->seal_blocks, &b, &st);
        seal = b > seal ? b : seal;
        stage = st > stage ? st : stage;
    }
    if (rc)
        return rc;
    void *p;
    if ((rc = kern__cuda_workspace(be, KERN_CUDA_WS_MATMUL_X, x, &p)) != 0 ||
        (rc = kern__cuda_workspace(be, KERN_CUDA_WS_MATMUL_W, w, &p)) != 0 ||
        (rc = kern__cuda_workspace(be, KERN_CUDA_WS_ATTN, attn, &p)) != 0 ||
        (rc = kern__cuda_workspace(be, KERN_CUDA_WS_MASS_P, mass_p, &p)) != 0 ||
        (rc = kern__cuda_workspace(be, KERN_CUDA_WS_MASS_OUT, mass_out, &p)) != 0 ||
        (rc = kern__cuda_workspace(be, KERN_CUDA_WS_PT, pt, &p)) != 0 ||
        (rc = kern__cuda_workspace(be, KERN_CUDA_WS_ROPE, rope, &p)) != 0 ||
        (rc = stage_dev_reserve(be, stage)) != 0)
        return rc;
    for (unsigned i = 0; i < KERN_CUDA_PIN_SLOTS && rc == 0; i++)
        rc = pin_reserve(be, &be->pin[i], stage);
    be->reserved = rc == 0;
    if (rc == 0)
        KVS_INFOF("cuda: reserved %.1f MiB of workspaces and %u x %.1f MiB of pinned staging",
                  (double)(x + w + attn + mass_p + mass_out + pt + rope + stage + seal) / 1048576.0,
                  KERN_CUDA_PIN_SLOTS, (double)stage / 1048576.0);
    return rc;
}

static int
cuda_reserve(kern_backend_t *base, const kern_reserve_t *r)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter(be);
    return cuda_leave(be, rc ? rc : cuda_reserve_body(be, r));
}

static int
cuda_graph_run(kern_backend_t *base, uint64_t key, kern_graph_fn fn, void *arg)
{
    kern_cuda_t *be = (kern_cuda_t *)base;
    int rc = cuda_enter(be);
    return cuda_leave(be, rc ? rc : kern__cuda_graph_run(be, key, fn, arg));
}

static const kern_ops_t cuda_ops = {
    /* .name = */ "cuda",
    /* .is_host = */ false,
    /* .destroy = */ cuda_destroy,             /* syncs, frees workspaces, stream, handle */
    /* .supports = */ cuda_supports,           /* F32/F16/BF16, Q8_0, Q4_0, K-quants; KV F32/F16 */
    /* .alloc = */ cuda_alloc,                 /* cudaMalloc; NULL (and a warning) when out */
    /* .free = */ cuda_free,                   /* cudaFree, which waits for users of p */
    /* .upload = */ cuda_upload,               /* async copy on the stream, then sync */
    /* .download = */ cuda_download,           /* async copy on the stream, then sync */
    /* .memset = */ cuda_memset,               /* cudaMemsetAsync, not waited for */
    /* .sync = */ cuda_sync,                   /* cudaStreamSynchronize */
    /* .copy_runs = */ cuda_copy_runs,         /* one 2D copy, then sync */
    /* .host_alloc = */ cuda_host_alloc,       /* cudaHostAlloc; NULL when refused */
    /* .host_free = */ cuda_host_free,         /* cudaFreeHost */
    /* .get_rows = */ cuda_get_rows,           /* block per row, converts to f32 */
    /* .matmul = */ cuda_matmul,               /* cuBLAS, or a dequantizing GEMV for n <= 8 */
    /* .matmul_set = */ cuda_matmul_set,       /* one GEMV launch per weight type for n <= 8 */
    /* .matmul_swiglu = */ cuda_matmul_swiglu, /* a GEMV with SwiGLU for n <= 8, else apart */
    /* .rmsnorm = */ cuda_rmsnorm,             /* block per row, f32 sum */
    /* .add_rmsnorm = */ cuda_add_rmsnorm,     /* the same, each row added first */
    /* .rope = */ cuda_rope,                   /* host inv_freq, double angles */
    /* .swiglu = */ cuda_swiglu,               /* elementwise, f32 */
    /* .add = */ cuda_add,                     /* elementwise */
    /* .kv_append = */ cuda_kv_append,         /* block per token, f32 -> KV dtype */
    /* .kv_copy = */ cuda_kv_copy,             /* all pairs at once unless order matters */
    /* .attention = */ cuda_attention,         /* paged flash-style, split-KV for decode */
    /* .delta_apply = */ cuda_delta_apply,     /* two elementwise passes */
    /* .block_bounds = */ cuda_block_bounds,   /* block per (KV block, head), threads on channels */
    /* .block_scores = */ cuda_block_scores,   /* split, TF32 GEMM, group max, per KV head */
    /* .block_select = */ cuda_block_select,   /* radix select, a block per (row, KV head) */
    /* .attn_mass = */ cuda_attn_mass, /* logits, softmax, sum or pooled max; chunks of rows */
    /* .pack_weight = */ NULL,         /* weights stay row-major */
    /* .kv_seal = */ cuda_kv_seal,     /* codecs on the host, bytes moved by two kernels */
    /* .kv_gather = */ cuda_kv_gather, /* a warp per row, every row at once */
    /* .reserve = */ cuda_reserve,     /* every workspace and staging buffer, once */
    /* .graph_run = */ cuda_graph_run, /* record once per key, then replay */
};

/* After the table: C++ has no tentative definitions to declare it earlier. */
extern "C" int
kern__cuda_new(const kern_backend_cfg_t *cfg, kern_backend_t **out)
{
    *out = NULL;
    int count = 0;
    cudaError_t e = cudaGetDeviceCount(&count);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        KVS_INFOF("cuda: no usable device: %s", cudaGetErrorString(e));
        return KVS_EDEVICE;
    }
    if (count <= 0) {
        KVS_INFOF("cuda: no devices");
        return KVS_EDEVICE;
    }
    if (cfg->device < 0 || cfg->device >= count) {
        KVS_WARNF("cuda: device %d out of range (%d device%s)", cfg->device, count,
                  count == 1 ? "" : "s");
        return KVS_EDEVICE;
    }
    kern_cuda_t *be = (kern_cuda_t *)calloc(1, sizeof(*be));
    if (be == NULL)
        return KVS_ENOMEM;
    be->base.ops = &cuda_ops;
    be->device = cfg->device;
    kern__cuda_start_lock(true);
    int rc = cuda_init(be);
    kern__cuda_start_lock(false);
    if (rc) {
        cuda_destroy(&be->base);
        return rc;
    }
    *out = &be->base;
    return 0;
}
