/*
 * kernels/kern_host.c — what the backends whose memory is the host's (ref,
 * cpu) share: memory functions and Delta Attention's correction (one
 * simple loop serves both: it moves a few rows per block).  Allocations
 * are 64-byte aligned so SIMD loads of rows and KV blocks never straddle
 * cache lines needlessly.
 */
#include "kern_int.h"

#include <stdlib.h>
#include <string.h>

void *
kern__host_alloc(kern_backend_t *be, size_t bytes)
{
    (void)be;
    size_t rounded = (bytes + 63) & ~(size_t)63;
    if (rounded < bytes)
        return NULL;
    return aligned_alloc(64, rounded);
}

void
kern__host_free(kern_backend_t *be, void *p)
{
    (void)be;
    free(p);
}

int
kern__host_copy(kern_backend_t *be, void *dst, const void *src, size_t bytes)
{
    (void)be;
    memmove(dst, src, bytes);
    return 0;
}

int
kern__host_memset(kern_backend_t *be, void *dst, int value, size_t bytes)
{
    (void)be;
    memset(dst, value, bytes);
    return 0;
}

int
kern__host_sync(kern_backend_t *be)
{
    (void)be;
    return 0;
}

int
kern__host_delta_apply(kern_backend_t *be, float *out, float *dense, uint32_t n, uint32_t width,
                       uint32_t gamma, uint32_t tail)
{
    (void)be;
    const uint32_t ns = n - tail;
    uint32_t i = 0;
    for (uint32_t r = 0; r < ns; r += gamma, i++) {
        /* The dense row becomes the block's difference in place. */
        float *delta = dense + (size_t)i * width;
        const float *os = out + (size_t)r * width;
        for (uint32_t k = 0; k < width; k++)
            delta[k] -= os[k];
        uint32_t end = r + gamma < ns ? r + gamma : ns;
        for (uint32_t row = r; row < end; row++) {
            float *o = out + (size_t)row * width;
            for (uint32_t k = 0; k < width; k++)
                o[k] += delta[k];
        }
    }
    for (uint32_t r = ns; r < n; r++, i++)
        memcpy(out + (size_t)r * width, dense + (size_t)i * width, width * sizeof(float));
    return 0;
}
