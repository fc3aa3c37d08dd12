/*
 * bench/bench_matmul.c — throughput of one weight-matrix product on the cpu
 * backend as the number of x rows grows (1 = decode of one stream, 16 =
 * sixteen streams batched), as a ratio to one row measured in the same run.
 * Weights sit in transparent huge pages and are packed as a model load does
 * both (kern_pack_weight), and the matrix is larger than the last-level
 * cache, so one row streams from memory at the rate decode sees.
 *
 *   bench_matmul [--type q8_0|f16|f32] [--rows N] [--cols N] [--threads N]
 *                [--n 1,4,16,64] [--json FILE]
 */
#include "kernels/kern.h"

#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define MAX_N 16
#define REPS 20

static int
parse_list(const char *s, uint32_t *out, int max)
{
    int k = 0;
    while (*s && k < max) {
        char *end;
        unsigned long v = strtoul(s, &end, 10);
        if (end == s || v == 0 || v > 4096)
            return -1;
        out[k++] = (uint32_t)v;
        s = *end == ',' ? end + 1 : end;
        if (*end && *end != ',')
            return -1;
    }
    return k;
}

int
main(int argc, char **argv)
{
    const char *type_name = "q8_0", *json = NULL;
    uint32_t rows = 65536, cols = 2048, threads = 0, ns[MAX_N] = {1, 4, 16, 64};
    int n_ns = 4;
    static const struct option opts[] = {{"type", required_argument, NULL, 't'},
                                         {"rows", required_argument, NULL, 'r'},
                                         {"cols", required_argument, NULL, 'c'},
                                         {"threads", required_argument, NULL, 'j'},
                                         {"n", required_argument, NULL, 'n'},
                                         {"json", required_argument, NULL, 'o'},
                                         {NULL, 0, NULL, 0}};
    int ch;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case 't':
            type_name = optarg;
            break;
        case 'r':
            rows = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'c':
            cols = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'j':
            threads = (uint32_t)strtoul(optarg, NULL, 10);
            break;
        case 'n':
            if ((n_ns = parse_list(optarg, ns, MAX_N)) <= 0) {
                fprintf(stderr, "bench_matmul: --n: expected a list like 1,4,16\n");
                return 2;
            }
            break;
        case 'o':
            json = optarg;
            break;
        default:
            return 2;
        }
    }
    kern_dtype_t type = strcmp(type_name, "q8_0") == 0  ? KERN_Q8_0
                        : strcmp(type_name, "f16") == 0 ? KERN_F16
                        : strcmp(type_name, "f32") == 0 ? KERN_F32
                                                        : (kern_dtype_t)-1;
    if ((int)type < 0 || rows == 0 || cols == 0 || cols % 32) {
        fprintf(stderr, "bench_matmul: --type q8_0|f16|f32, --cols a multiple of 32\n");
        return 2;
    }
    kern_backend_t *be;
    kern_backend_cfg_t cfg = {.n_threads = threads};
    if (kern_backend_new("cpu", &cfg, &be)) {
        fprintf(stderr, "bench_matmul: no cpu backend\n");
        return 1;
    }
    size_t rb = kern_row_bytes(type, cols);
    size_t w_len = (rb * rows + (2u << 20) - 1) & ~(size_t)((2u << 20) - 1);
    uint8_t *w = mmap(NULL, w_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (w == MAP_FAILED)
        w = NULL;
    else
        madvise(w, w_len, MADV_HUGEPAGE);
    float *row = malloc(cols * sizeof(float));
    uint32_t n_max = 0;
    for (int i = 0; i < n_ns; i++)
        n_max = ns[i] > n_max ? ns[i] : n_max;
    float *x = malloc((size_t)n_max * cols * sizeof(float));
    float *y = malloc((size_t)n_max * rows * sizeof(float));
    if (!w || !row || !x || !y) {
        fprintf(stderr, "bench_matmul: out of memory\n");
        return 1;
    }
    srand(1);
    for (uint32_t r = 0; r < rows; r++) {
        for (uint32_t c = 0; c < cols; c++)
            row[c] = (float)rand() / (float)RAND_MAX - 0.5f;
        uint8_t *dst = w + (size_t)r * rb;
        if (type == KERN_Q8_0)
            kern_quantize_q8_0(row, (kern_block_q8_0_t *)dst, cols);
        else if (type == KERN_F16)
            for (uint32_t c = 0; c < cols; c++) {
                uint16_t h = kvs_f32_to_fp16(row[c]);
                memcpy(dst + 2 * c, &h, 2);
            }
        else
            memcpy(dst, row, cols * sizeof(float));
    }
    for (size_t i = 0; i < (size_t)n_max * cols; i++)
        x[i] = (float)rand() / (float)RAND_MAX - 0.5f;
    kern_tensor_t t = {.type = type, .n_cols = cols, .n_rows = rows, .row_bytes = rb, .data = w};
    if (kern_pack_weight(be, &t)) {
        fprintf(stderr, "bench_matmul: packing failed\n");
        return 1;
    }

    double gmac[MAX_N];
    printf("%s %ux%u (%.0f MiB), layout %d\n", type_name, rows, cols, (double)rb * rows / (1 << 20),
           (int)t.layout);
    printf("%-6s %10s %12s %8s\n", "x rows", "best ms", "GMAC/s", "vs 1");
    for (int i = 0; i < n_ns; i++) {
        uint64_t best = UINT64_MAX;
        for (int rep = 0; rep < REPS; rep++) {
            uint64_t t0 = kvs_now_ns();
            if (kern_matmul(be, &t, x, ns[i], NULL, y)) {
                fprintf(stderr, "bench_matmul: matmul failed\n");
                return 1;
            }
            uint64_t d = kvs_now_ns() - t0;
            best = d < best ? d : best;
        }
        gmac[i] = (double)rows * cols * ns[i] / (double)best;
        printf("%-6u %10.3f %12.1f %7.2fx\n", ns[i], best / 1e6, gmac[i], gmac[i] / gmac[0]);
    }
    if (json) {
        FILE *f = fopen(json, "w");
        if (!f) {
            fprintf(stderr, "bench_matmul: cannot write %s\n", json);
            return 1;
        }
        fprintf(f, "{\"type\": \"%s\", \"rows\": %u, \"cols\": %u, \"layout\": %d, \"results\": [",
                type_name, rows, cols, (int)t.layout);
        for (int i = 0; i < n_ns; i++)
            fprintf(f, "%s{\"n\": %u, \"gmac_per_s\": %.2f, \"vs_1\": %.3f}", i ? ", " : "", ns[i],
                    gmac[i], gmac[i] / gmac[0]);
        fprintf(f, "]}\n");
        fclose(f);
        printf("json: %s\n", json);
    }
    munmap(w, w_len);
    kern_backend_free(be);
    free(row);
    free(x);
    free(y);
    return 0;
}
