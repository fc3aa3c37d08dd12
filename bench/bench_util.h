/*
 * bench/bench_util.h — small helpers the engine benchmarks share
 * (bench_spec_decode, bench_draws).
 */
#ifndef KVS_BENCH_UTIL_H
#define KVS_BENCH_UTIL_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* "1,8,32" into v[0..max): how many were read (strtok: s is cut up). */
static inline uint32_t
bench_parse_list(char *s, uint32_t *v, uint32_t max)
{
    uint32_t n = 0;
    for (char *t = strtok(s, ","); t && n < max; t = strtok(NULL, ","))
        v[n++] = (uint32_t)atoi(t);
    return n;
}

#endif
