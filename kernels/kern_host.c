/*
 * kernels/kern_host.c — memory functions shared by the backends whose
 * memory is the host's (ref, cpu).  Allocations are 64-byte aligned so SIMD
 * loads of rows and KV blocks never straddle cache lines needlessly.
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
