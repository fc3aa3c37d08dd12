/*
 * kernels/cuda/cuda_attn_tc.cu — kern__cuda_attention_tc, called by
 * kern__cuda_attention (cuda_attn.cu) for its F16 prefill tiles: the
 * wgmma instance (cuda_attn_wg.cu) where kern__cuda_attention_init found
 * the device running it, else the mma.sync instance of the kernel in
 * cuda_attn_tc.cuh, compiled here for every target.
 */
#include "cuda_attn_tc.cuh"

int
kern__cuda_attention_tc(kern_cuda_t *be, const kern_cuda_attn_tc_t *p)
{
    if (be->attn_tc != KERN_CUDA_TC_MMA)
        return kern__cuda_attention_wg(be, be->attn_tc, p);
    return tc_launch_dim<false, 64>(be, p);
}
