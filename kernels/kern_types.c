/*
 * kernels/kern_types.c — the ggml type table (block sizes and bytes for
 * every type id a GGUF file may carry), Q8_0 quantization and row
 * conversion to f32.  Used by the GGUF reader to size tensors, by the
 * model writer, and by every backend's scalar paths.
 */
#include "kern_int.h"

#include <math.h>
#include <string.h>

static const kern_type_traits_t type_traits[KERN_DTYPE_COUNT] = {
    [KERN_F32] = {"f32", 1, 4},       [KERN_F16] = {"f16", 1, 2},
    [KERN_Q4_0] = {"q4_0", 32, 18},   [KERN_Q4_1] = {"q4_1", 32, 20},
    [KERN_Q5_0] = {"q5_0", 32, 22},   [KERN_Q5_1] = {"q5_1", 32, 24},
    [KERN_Q8_0] = {"q8_0", 32, 34},   [KERN_Q8_1] = {"q8_1", 32, 36},
    [KERN_Q2_K] = {"q2_k", 256, 84},  [KERN_Q3_K] = {"q3_k", 256, 110},
    [KERN_Q4_K] = {"q4_k", 256, 144}, [KERN_Q5_K] = {"q5_k", 256, 176},
    [KERN_Q6_K] = {"q6_k", 256, 210}, [KERN_Q8_K] = {"q8_k", 256, 292},
    [16] = {"iq2_xxs", 256, 66},      [17] = {"iq2_xs", 256, 74},
    [18] = {"iq3_xxs", 256, 98},      [19] = {"iq1_s", 256, 50},
    [20] = {"iq4_nl", 32, 18},        [21] = {"iq3_s", 256, 110},
    [22] = {"iq2_s", 256, 82},        [23] = {"iq4_xs", 256, 136},
    [KERN_I8] = {"i8", 1, 1},         [KERN_I16] = {"i16", 1, 2},
    [KERN_I32] = {"i32", 1, 4},       [KERN_I64] = {"i64", 1, 8},
    [KERN_F64] = {"f64", 1, 8},       [29] = {"iq1_m", 256, 56},
    [KERN_BF16] = {"bf16", 1, 2},     [34] = {"tq1_0", 256, 54},
    [35] = {"tq2_0", 256, 66},
};

const kern_type_traits_t *
kern_type_traits(uint32_t type)
{
    if (type >= KERN_DTYPE_COUNT || type_traits[type].name == NULL)
        return NULL;
    return &type_traits[type];
}

size_t
kern_row_bytes(uint32_t type, uint64_t n)
{
    const kern_type_traits_t *t = kern_type_traits(type);
    if (t == NULL || n % t->block != 0)
        return 0;
    uint64_t blocks = n / t->block;
    size_t bytes;
    if (blocks > SIZE_MAX || kvs_mul_size((size_t)blocks, t->block_bytes, &bytes))
        return 0;
    return bytes;
}

int
kern_dtype_parse(const char *name, kern_dtype_t *out)
{
    for (uint32_t i = 0; i < KERN_DTYPE_COUNT; i++) {
        if (type_traits[i].name && strcmp(type_traits[i].name, name) == 0) {
            *out = (kern_dtype_t)i;
            return 0;
        }
    }
    return KVS_EINVAL;
}

static float
block_amax(const float *xb)
{
    float amax = 0.0f;
    for (int j = 0; j < KERN_QK8_0; j++) {
        float a = fabsf(xb[j]);
        if (a > amax)
            amax = a;
    }
    return amax;
}

void
kern_quantize_q8_0(const float *x, kern_block_q8_0_t *y, size_t n)
{
    for (size_t b = 0; b < n / KERN_QK8_0; b++) {
        const float *xb = x + b * KERN_QK8_0;
        float d = block_amax(xb) / 127.0f;
        float id = d != 0.0f ? 1.0f / d : 0.0f;
        y[b].d = kvs_f32_to_fp16(d);
        for (int j = 0; j < KERN_QK8_0; j++)
            y[b].qs[j] = (int8_t)roundf(xb[j] * id);
    }
}

void
kern_quantize_x_q8(const float *x, size_t n, int8_t *q, float *d)
{
    for (size_t b = 0; b < n / KERN_QK8_0; b++) {
        const float *xb = x + b * KERN_QK8_0;
        float s = block_amax(xb) / 127.0f, inv = s > 0.0f ? 1.0f / s : 0.0f;
        d[b] = s;
        for (int j = 0; j < KERN_QK8_0; j++)
            q[b * KERN_QK8_0 + j] = (int8_t)lrintf(xb[j] * inv);
    }
}

void
kern_round_x_q8(const float *x, size_t n, float *out)
{
    int8_t q[KERN_QK8_0];
    float d;
    for (size_t b = 0; b < n / KERN_QK8_0; b++) {
        kern_quantize_x_q8(x + b * KERN_QK8_0, KERN_QK8_0, q, &d);
        for (int j = 0; j < KERN_QK8_0; j++)
            out[b * KERN_QK8_0 + j] = (float)q[j] * d;
    }
}

int
kern_row_to_f32(uint32_t type, const void *row, float *y, size_t n)
{
    switch (type) {
    case KERN_F32:
        memcpy(y, row, n * sizeof(float));
        return 0;
    case KERN_F16: {
        const uint16_t *h = row;
        for (size_t i = 0; i < n; i++)
            y[i] = kvs_fp16_to_f32(h[i]);
        return 0;
    }
    case KERN_BF16: {
        const uint16_t *h = row;
        for (size_t i = 0; i < n; i++)
            y[i] = kvs_bf16_to_f32(h[i]);
        return 0;
    }
    case KERN_Q8_0: {
        const kern_block_q8_0_t *b = row;
        for (size_t i = 0; i < n / KERN_QK8_0; i++) {
            float d = kvs_fp16_to_f32(b[i].d);
            for (int j = 0; j < KERN_QK8_0; j++)
                y[i * KERN_QK8_0 + j] = d * (float)b[i].qs[j];
        }
        return 0;
    }
    default:
        return KVS_ENOTSUP;
    }
}

bool
kern__types_supported(kern_op_t op, kern_dtype_t type)
{
    switch (op) {
    case KERN_OP_GET_ROWS:
    case KERN_OP_MATMUL:
        return type == KERN_F32 || type == KERN_F16 || type == KERN_BF16 || type == KERN_Q8_0;
    case KERN_OP_KV_APPEND:
    case KERN_OP_KV_COPY:
    case KERN_OP_ATTN:
        return type == KERN_F32 || type == KERN_F16;
    default:
        return true;
    }
}
