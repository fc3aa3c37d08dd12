/*
 * kernels/kern_cuda_stub.c — built instead of kernels/cuda/ when no CUDA
 * compiler was found (or KVS_CUDA=OFF): asking for the cuda backend answers
 * KVS_ENOTSUP so callers can report it and fall back.
 */
#include "kern_int.h"

int
kern__cuda_new(const kern_backend_cfg_t *cfg, kern_backend_t **out)
{
    (void)cfg;
    *out = NULL;
    return KVS_ENOTSUP;
}
