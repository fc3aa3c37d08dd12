/*
 * bench/bench_util.h — what the engine benchmarks share (bench_spec_decode,
 * bench_draws): their list flags and the loop that runs a batch to the end.
 */
#ifndef KVS_BENCH_UTIL_H
#define KVS_BENCH_UTIL_H

#include "sched/sched.h"

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

/* What bench_decode saw of a batch: from t_first, when every request had
 * its first token (decoding alone from there), to the last finish (t_end),
 * the tokens that came out, and the engine's steps as of t_first. */
typedef struct bench_decode {
    uint64_t t_first, t_end, tokens, steps_at_first;
} bench_decode_t;

/* Steps s until its batch requests (ids 0..batch - 1) finish, keeping
 * each one's first max_tokens tokens in out[id * max_tokens ..] (n_out[id]
 * of them, zeroed here).  Returns 0, a failed step's error, or that of a
 * request that ended in error. */
static inline int
bench_decode(sched_t *s, uint32_t batch, uint32_t max_tokens, int32_t *out, uint32_t *n_out,
             bench_decode_t *d)
{
    int rc = 0;
    uint32_t live = batch, started = 0;
    *d = (bench_decode_t){0};
    memset(n_out, 0, batch * sizeof *n_out);
    while (rc == 0 && live > 0) {
        int st = sched_step(s);
        if (st < 0)
            return st;
        sched_event_t *ev;
        while ((ev = sched_poll(s)) != NULL) {
            uint32_t i = (uint32_t)ev->req_id;
            if (ev->kind == SCHED_EV_TOKEN) {
                if (n_out[i] == 0 && ++started == batch) {
                    sched_load_t l;
                    sched_get_load(s, &l);
                    d->t_first = ev->t_ns;
                    d->steps_at_first = l.steps;
                } else if (started == batch) {
                    d->tokens++;
                }
                if (n_out[i] < max_tokens)
                    out[(size_t)i * max_tokens + n_out[i]++] = ev->token;
            } else if (ev->kind == SCHED_EV_FINISH) {
                if (ev->finish == SCHED_FINISH_ERROR)
                    rc = ev->error;
                d->t_end = ev->t_ns;
                live--;
            }
            sched_event_free(ev);
        }
    }
    return rc;
}

#endif
