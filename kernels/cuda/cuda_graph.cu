/*
 * kernels/cuda/cuda_graph.cu — kern_graph_run on the cuda backend: a step
 * (the model's decode forward pass) recorded once as a CUDA graph per
 * key, then replayed.  Called by kern.c for the model (model/forward.c);
 * the staging functions of kern_cuda.cu come here in CAPTURE and DRY mode.
 *
 * A decode step is a few hundred small launches and host-to-device copies
 * (token ids, positions, slots, page tables), each costing microseconds of
 * host time that a batch of one at long context cannot hide.  Replaying
 * records them as one graph launch.  What changes between steps is only
 * what the ops stage, so:
 *
 *   first time a key is seen        every later time
 *   DRY     fn: arrays -> arena     DRY   fn: arrays -> arena
 *   CAPTURE fn: arena offsets and   copy  arena -> device (one copy)
 *           launches -> graph       launch the graph
 *   copy, launch
 *
 * The arena is one pinned host buffer and its device twin; an op's arrays
 * land at the same offset in every pass of one key, because fn makes the
 * same calls with the same shapes (kern.h), and attention under a bound
 * stages its page tables at the bound's size.  Each pass folds its
 * offsets and sizes into a signature: a replay whose arrays would sit
 * elsewhere is recorded again instead.  Kernels read them from the
 * device twin at the recorded addresses, so growing the twin (a longer
 * step) drops every recorded graph.  Workspaces must already be large
 * enough (kern_reserve): one that would grow fails the recording, the
 * step runs eagerly (growing it) and the next step of the key records
 * again; a second failure, or any other, and the key runs eagerly from
 * then on.
 */
#include "cuda_common.cuh"

#include <string.h>

#define ARENA_ALIGN 16 /* every op's arrays start on this, as in stage_dev */

int
kern__cuda_arena_begin(kern_cuda_t *be, size_t bytes, void **host)
{
    const size_t off = kern__cuda_round_up(be->arena_used, ARENA_ALIGN), need = off + bytes;
    if (need > be->arena_host_bytes) {
        /* Only the first pass of a step grows it; recording repeats it. */
        if (be->mode != KERN_CUDA_DRY)
            return KVS_ENOTSUP;
        size_t want = kern__cuda_round_up(
            need > 2 * be->arena_host_bytes ? need : 2 * be->arena_host_bytes, (size_t)1 << 20);
        void *p = NULL;
        cudaError_t e = cudaHostAlloc(&p, want, cudaHostAllocDefault);
        if (e != cudaSuccess) {
            (void)cudaGetLastError();
            KVS_WARNF("cuda: graph arena of %zu bytes: %s", want, cudaGetErrorString(e));
            return KVS_ENOMEM;
        }
        if (be->arena_used)
            memcpy(p, be->arena_host, be->arena_used);
        void *old = be->arena_host;
        be->arena_host = p;
        be->arena_host_bytes = want;
        if (old)
            KERN_CUDA_TRY(cudaFreeHost(old));
    }
    be->arena_pending = off;
    be->arena_layout = kvs_mix64(be->arena_layout ^ ((uint64_t)off << 32 | (uint64_t)bytes));
    *host = (char *)be->arena_host + off;
    return 0;
}

int
kern__cuda_arena_end(kern_cuda_t *be, size_t bytes, void **dev)
{
    be->arena_used = be->arena_pending + bytes;
    if (be->mode == KERN_CUDA_DRY) {
        *dev = NULL;
        return KERN_CUDA_DRY_DONE;
    }
    if (be->arena_used > be->arena_dev_bytes)
        return KVS_ENOTSUP; /* the DRY pass staged less: fn did not repeat itself */
    *dev = (char *)be->arena_dev + be->arena_pending;
    return 0;
}

static void
graph_drop(kern_cuda_graph_t *g)
{
    if (g->exec)
        (void)cudaGraphExecDestroy(g->exec);
    memset(g, 0, sizeof *g);
}

void
kern__cuda_graphs_free(kern_cuda_t *be)
{
    for (int i = 0; i < KERN_CUDA_GRAPHS; i++)
        graph_drop(&be->graphs[i]);
}

void
kern__cuda_graph_note(kern_cuda_t *be, uint64_t choice)
{
    if (be->mode != KERN_CUDA_EAGER)
        be->arena_layout = kvs_mix64(be->arena_layout ^ choice ^ 0x9e3779b97f4a7c15ull);
}

void
kern__cuda_forget_addresses(kern_cuda_t *be)
{
    kern__cuda_graphs_free(be);
    be->pt_epoch = 0;
    be->rope_epoch = 0;
}

/* The key's slot, or NULL. */
static kern_cuda_graph_t *
graph_find(kern_cuda_t *be, uint64_t key)
{
    for (int i = 0; i < KERN_CUDA_GRAPHS; i++)
        if (be->graphs[i].used && be->graphs[i].key == key)
            return &be->graphs[i];
    return NULL;
}

/* A slot for a new key: a free one, else the least recently replayed. */
static kern_cuda_graph_t *
graph_slot(kern_cuda_t *be, uint64_t key)
{
    kern_cuda_graph_t *best = &be->graphs[0];
    for (int i = 0; i < KERN_CUDA_GRAPHS; i++) {
        if (be->graphs[i].used == 0) {
            best = &be->graphs[i];
            break;
        }
        if (be->graphs[i].used < best->used)
            best = &be->graphs[i];
    }
    graph_drop(best);
    best->key = key;
    best->used = ++be->graph_clock;
    best->retried = false;
    return best;
}

/* From now on the key's steps run without a graph. */
static void
graph_give_up(kern_cuda_t *be, uint64_t key, int why)
{
    kern_cuda_graph_t *g = graph_find(be, key);
    if (g == NULL)
        g = graph_slot(be, key);
    graph_drop(g);
    g->key = key;
    g->used = ++be->graph_clock;
    g->broken = true;
    KVS_WARNF("cuda: step %016llx could not be recorded as a graph (%s); it runs without one",
              (unsigned long long)key, kvs_strerror(why));
}

/* Makes the device twin at least `bytes`; recorded graphs read the old
 * one's addresses, so they go. */
static int
arena_dev_reserve(kern_cuda_t *be, size_t bytes)
{
    if (bytes <= be->arena_dev_bytes)
        return 0;
    kern__cuda_forget_addresses(be);
    return kern__cuda_dev_regrow(be, &be->arena_dev, &be->arena_dev_bytes,
                                 kern__cuda_round_up(bytes + bytes / 2, (size_t)1 << 20),
                                 "graph arena on the device");
}

/* fn's launches into *exec.  `staged`: what the DRY pass staged, which the
 * recording must repeat exactly. */
static int
record(kern_cuda_t *be, kern_graph_fn fn, void *arg, size_t staged, cudaGraphExec_t *exec)
{
    *exec = NULL;
    /* Relaxed: other threads' allocations (a server's) must not abort it. */
    KERN_CUDA_TRY(cudaStreamBeginCapture(be->stream, cudaStreamCaptureModeRelaxed));
    const uint64_t layout = be->arena_layout;
    be->mode = KERN_CUDA_CAPTURE;
    be->arena_used = 0;
    be->arena_layout = 0;
    int rc = fn(arg);
    be->mode = KERN_CUDA_EAGER;
    cudaGraph_t graph = NULL;
    cudaError_t e = cudaStreamEndCapture(be->stream, &graph);
    if (rc == 0 && e != cudaSuccess)
        rc = kern__cuda_fail("cudaStreamEndCapture", cudaGetErrorString(e), __FILE__, __LINE__);
    if (rc == 0 && (be->arena_used != staged || be->arena_layout != layout)) {
        KVS_WARNF("cuda: a recorded step staged %zu bytes, its first pass %zu, or elsewhere",
                  be->arena_used, staged);
        rc = KVS_EINVAL;
    }
    if (rc == 0) {
        e = cudaGraphInstantiate(exec, graph, 0);
        if (e != cudaSuccess) {
            *exec = NULL;
            rc = kern__cuda_fail("cudaGraphInstantiate", cudaGetErrorString(e), __FILE__, __LINE__);
        }
    }
    if (graph)
        (void)cudaGraphDestroy(graph);
    (void)cudaGetLastError(); /* a failed recording leaves nothing sticky */
    return rc;
}

int
kern__cuda_graph_run(kern_cuda_t *be, uint64_t key, kern_graph_fn fn, void *arg)
{
    /* cuda_graph_run (kern_cuda.cu) answered for a failed backend. */
    if (be->mode != KERN_CUDA_EAGER)
        return KVS_EINVAL; /* no step inside a step */
    kern_cuda_graph_t *g = graph_find(be, key);
    if (g && g->broken) {
        g->used = ++be->graph_clock; /* kept, so it is not recorded and refused again */
        return fn(arg);
    }

    /* The last replay's copy out of the arena must be done before the
     * arena is rewritten. */
    KERN_CUDA_TRY(cudaEventSynchronize(be->arena_done));
    be->mode = KERN_CUDA_DRY;
    be->arena_used = 0;
    be->arena_layout = 0;
    int rc = fn(arg);
    be->mode = KERN_CUDA_EAGER;
    /* Room the pass could not get does not stop the step itself, which
     * stages through its own slots: a workspace that must grow (the step
     * grows it), or an arena that could not (memory stays short a while:
     * the key gives up its graph rather than try at every step). */
    if (rc == KVS_ENOMEM || rc == KVS_ENOTSUP) {
        if (rc == KVS_ENOMEM)
            graph_give_up(be, key, rc);
        return fn(arg);
    }
    if (rc)
        return rc;
    const size_t staged = be->arena_used;
    const uint64_t layout = be->arena_layout;
    if ((rc = arena_dev_reserve(be, staged)) != 0) {
        if (rc != KVS_ENOMEM)
            return rc;
        graph_give_up(be, key, rc);
        return fn(arg);
    }
    g = graph_find(be, key); /* growing the twin may have dropped it */
    if (g && g->exec && g->layout != layout) {
        /* The arrays moved (a caller whose staging changed under one
         * key): the recording would read them where they were. */
        graph_drop(g);
        g = NULL;
    }
    if (g == NULL || g->exec == NULL) {
        if (g == NULL)
            g = graph_slot(be, key);
        g->layout = layout;
        rc = record(be, fn, arg, staged, &g->exec);
        if (be->base.failed)
            return KVS_EDEVICE;
        if (rc == KVS_ENOTSUP && !g->retried) {
            /* A workspace to grow first (no kern_reserve, or a longer
             * step): the eager run grows it; the next step records. */
            g->retried = true;
            g->used = ++be->graph_clock;
            return fn(arg);
        }
        if (rc) {
            graph_give_up(be, key, rc);
            return fn(arg);
        }
    }
    g->used = ++be->graph_clock;
    if (staged)
        KERN_CUDA_TRY(cudaMemcpyAsync(be->arena_dev, be->arena_host, staged, cudaMemcpyHostToDevice,
                                      be->stream));
    KERN_CUDA_TRY(cudaEventRecord(be->arena_done, be->stream));
    KERN_CUDA_TRY(cudaGraphLaunch(g->exec, be->stream));
    return 0;
}
