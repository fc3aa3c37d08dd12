/*
 * serve/srv_metrics.h — Prometheus /metrics for `kvserve serve`: the
 * counters and histograms kept per finished request, their rendering in
 * the text exposition format 0.0.4 (a pure function, tested without a
 * socket), and the libmicrohttpd listener that serves them.
 *
 * Thread: observe on the server's loop thread; the listener renders on
 * libmicrohttpd's own thread, under the same mutex, and reads the engine
 * only through sched_get_load.
 */
#ifndef SRV_METRICS_H
#define SRV_METRICS_H

#include "sched/sched.h"

#include <stdio.h>

/* kvserve_request_success_total's finished_reason, as vLLM names them. */
typedef enum srv_met_finish {
    SRV_MET_STOP,   /* end-of-generation token or a stop string */
    SRV_MET_LENGTH, /* max_tokens or the maximum model length */
    SRV_MET_ABORT,  /* cancelled: client gone, deadline, Abort, drain */
    SRV_MET_ERROR,
    SRV_MET_FINISH_COUNT,
} srv_met_finish_t;

typedef enum srv_met_hist {
    SRV_MET_TTFT,    /* seconds */
    SRV_MET_E2E,     /* seconds */
    SRV_MET_QUEUE,   /* seconds */
    SRV_MET_TPOT,    /* seconds */
    SRV_MET_DENSITY, /* attention density, 0..1 */
    SRV_MET_KEEP,    /* speculative prefill's keep ratio, 0..1 */
    SRV_MET_HIST_COUNT,
} srv_met_hist_t;

enum { SRV_MET_MAX_BUCKETS = 24 };

typedef struct srv_met_histogram {
    /* Per bucket, not cumulative (rendering accumulates); the last used
     * entry, n_bounds, is the +Inf overflow. */
    uint64_t bucket[SRV_MET_MAX_BUCKETS + 1];
    uint64_t count;
    double sum;
} srv_met_histogram_t;

typedef struct srv_met_data {
    uint64_t prompt_tokens, generation_tokens, preemptions, kv_dropped_tokens;
    uint64_t success[SRV_MET_FINISH_COUNT];
    srv_met_histogram_t hist[SRV_MET_HIST_COUNT];
} srv_met_data_t;

/* One finished request.  e2e_ns: arrival to finish; spec: it ran
 * speculative prefill. */
void srv_met_observe(srv_met_data_t *d, srv_met_finish_t fin, const sched_usage_t *u,
                     uint64_t e2e_ns, bool spec);
/* Adds v to histogram h (exposed for tests). */
void srv_met_hist_add(srv_met_data_t *d, srv_met_hist_t h, double v);
/* Writes every family: the per-request ones from d, the engine's gauges
 * and counters from l.  Returns 0 or KVS_EIO (a short write). */
int srv_met_render(const srv_met_data_t *d, const sched_load_t *l, FILE *f);
/* A label value escaped for the exposition format (backslash, double
 * quote, newline), truncated to fit cap with its NUL.  Returns out. */
char *srv_met_escape(const char *s, char *out, size_t cap);

typedef struct srv_metrics srv_metrics_t;

/* Listens on host:port (port 0: any free port) and serves GET /metrics
 * from its own thread.  *bound_port gets the port.  Returns 0, KVS_EINVAL
 * (a host that does not resolve), KVS_EIO (cannot listen) or KVS_ENOMEM. */
int srv_metrics_start(const char *host, uint32_t port, sched_t *sched, srv_metrics_t **out,
                      uint32_t *bound_port);
/* Stops the listener (waits for a scrape in progress).  NULL: no-op. */
void srv_metrics_free(srv_metrics_t *m);
/* srv_met_observe under the listener's mutex.  NULL m: no-op. */
void srv_metrics_finish(srv_metrics_t *m, srv_met_finish_t fin, const sched_usage_t *u,
                        uint64_t e2e_ns, bool spec);

#endif /* SRV_METRICS_H */
