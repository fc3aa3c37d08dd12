/*
 * serve/srv_metrics.c — see srv_metrics.h.  Names follow vLLM's metrics
 * with underscores for its colons (promtool rejects colons in exported
 * names) and vLLM's histogram buckets, so dashboards and routers built
 * for vLLM need only a rename.
 */
#include "srv_metrics.h"

#include "base/kvs.h"

#include <microhttpd.h>
#include <netdb.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* vLLM's buckets (vllm/v1/metrics/loggers.py). */
static const double b_ttft[] = {0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                                1,     2.5,   5,    7.5,  10,   20,   40,   80,  160,  640, 2560};
static const double b_tpot[] = {0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                                0.75, 1,     2.5,  5,     7.5, 10,   20,  40,  80};
static const double b_req[] = {0.3, 0.5, 0.8, 1,  1.5, 2,   2.5, 5,   10,   15,  20,
                               30,  40,  50,  60, 120, 240, 480, 960, 1920, 7680};
/* Ratios: fine enough at the sparse end, where the policies operate. */
static const double b_ratio[] = {0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1};

#define N_(a) (sizeof(a) / sizeof((a)[0]))

static const struct {
    const char *name, *help;
    const double *bounds;
    size_t n;
} hist_def[SRV_MET_HIST_COUNT] = {
    [SRV_MET_TTFT] = {"kvserve_time_to_first_token_seconds",
                      "Time from arrival to the first generated token.", b_ttft, N_(b_ttft)},
    [SRV_MET_E2E] = {"kvserve_e2e_request_latency_seconds",
                     "Time from arrival to the end of the request.", b_req, N_(b_req)},
    [SRV_MET_QUEUE] = {"kvserve_request_queue_time_seconds",
                       "Time from arrival to the first scheduled step.", b_req, N_(b_req)},
    [SRV_MET_TPOT] = {"kvserve_time_per_output_token_seconds",
                      "Mean time per output token after the first, per request.", b_tpot,
                      N_(b_tpot)},
    [SRV_MET_DENSITY] = {"kvserve_attention_density",
                         "Keys the prompt's attention visited over those a dense prefill "
                         "visits, per request (1: dense).",
                         b_ratio, N_(b_ratio)},
    [SRV_MET_KEEP] = {"kvserve_spec_prefill_keep_ratio",
                      "Prompt tokens speculative prefill kept over prompt tokens, per request.",
                      b_ratio, N_(b_ratio)},
};

static const char *const fin_name[SRV_MET_FINISH_COUNT] = {
    [SRV_MET_STOP] = "stop",
    [SRV_MET_LENGTH] = "length",
    [SRV_MET_ABORT] = "abort",
    [SRV_MET_ERROR] = "error",
};

void
srv_met_hist_add(srv_met_data_t *d, srv_met_hist_t h, double v)
{
    srv_met_histogram_t *x = &d->hist[h];
    size_t i = 0;
    while (i < hist_def[h].n && !(v <= hist_def[h].bounds[i]))
        i++;
    x->bucket[i]++;
    x->count++;
    x->sum += v;
}

void
srv_met_observe(srv_met_data_t *d, srv_met_finish_t fin, const sched_usage_t *u, uint64_t e2e_ns,
                bool spec)
{
    if ((unsigned)fin >= SRV_MET_FINISH_COUNT)
        fin = SRV_MET_ERROR;
    d->success[fin]++;
    d->prompt_tokens += u->prompt_tokens;
    d->generation_tokens += u->completion_tokens;
    d->preemptions += u->preemptions;
    d->kv_dropped_tokens += u->kv_dropped_tokens;
    srv_met_hist_add(d, SRV_MET_E2E, (double)e2e_ns / 1e9);
    /* A request cancelled while queued has no queue time or first token;
     * observing zeros would drag the low buckets. */
    if (u->completion_tokens > 0) {
        srv_met_hist_add(d, SRV_MET_QUEUE, (double)u->queue_ns / 1e9);
        srv_met_hist_add(d, SRV_MET_TTFT, (double)u->ttft_ns / 1e9);
    }
    if (u->completion_tokens > 1)
        srv_met_hist_add(d, SRV_MET_TPOT,
                         (double)u->decode_ns / 1e9 / (double)(u->completion_tokens - 1));
    if (u->attn_keys_dense > 0)
        srv_met_hist_add(d, SRV_MET_DENSITY, (double)u->attn_keys / (double)u->attn_keys_dense);
    if (spec && u->prompt_tokens > 0)
        srv_met_hist_add(d, SRV_MET_KEEP, (double)u->kept_prompt_tokens / (double)u->prompt_tokens);
}

char *
srv_met_escape(const char *s, char *out, size_t cap)
{
    size_t n = 0;
    for (; *s; s++) {
        const char *rep = *s == '\\' ? "\\\\" : *s == '"' ? "\\\"" : *s == '\n' ? "\\n" : NULL;
        size_t k = rep ? 2 : 1;
        if (n + k + 1 > cap)
            break;
        if (rep)
            memcpy(out + n, rep, 2);
        else
            out[n] = *s;
        n += k;
    }
    if (cap)
        out[n] = '\0';
    return out;
}

static void
family(FILE *f, const char *name, const char *type, const char *help)
{
    fprintf(f, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void
gauge(FILE *f, const char *name, const char *help, double v)
{
    family(f, name, "gauge", help);
    fprintf(f, "%s %.17g\n", name, v);
}

static void
counter(FILE *f, const char *name, const char *help, uint64_t v)
{
    family(f, name, "counter", help);
    fprintf(f, "%s %llu\n", name, (unsigned long long)v);
}

/* A counter family with one label and one series per value. */
static void
counter_by(FILE *f, const char *name, const char *help, const char *label,
           const char *const *values, const uint64_t *v, size_t n)
{
    family(f, name, "counter", help);
    char esc[128];
    for (size_t i = 0; i < n; i++)
        fprintf(f, "%s{%s=\"%s\"} %llu\n", name, label, srv_met_escape(values[i], esc, sizeof esc),
                (unsigned long long)v[i]);
}

static void
histogram(FILE *f, const srv_met_data_t *d, srv_met_hist_t h)
{
    const char *name = hist_def[h].name;
    const srv_met_histogram_t *x = &d->hist[h];
    family(f, name, "histogram", hist_def[h].help);
    uint64_t cum = 0;
    for (size_t i = 0; i < hist_def[h].n; i++) {
        cum += x->bucket[i];
        fprintf(f, "%s_bucket{le=\"%g\"} %llu\n", name, hist_def[h].bounds[i],
                (unsigned long long)cum);
    }
    fprintf(f, "%s_bucket{le=\"+Inf\"} %llu\n", name, (unsigned long long)x->count);
    fprintf(f, "%s_sum %.17g\n%s_count %llu\n", name, x->sum, name, (unsigned long long)x->count);
}

int
srv_met_render(const srv_met_data_t *d, const sched_load_t *l, FILE *f)
{
    gauge(f, "kvserve_num_requests_running", "Requests in the running batch.", l->running);
    gauge(f, "kvserve_num_requests_waiting", "Requests waiting to be scheduled.", l->waiting);
    gauge(f, "kvserve_num_requests_preempted",
          "Waiting requests that were preempted and wait to resume.", l->preempted);
    /* Not kv_blocks_total: promtool keeps the _total suffix for counters. */
    gauge(f, "kvserve_kv_blocks_capacity", "KV cache blocks in the pool.", l->blocks_total);
    gauge(f, "kvserve_kv_blocks_free",
          "KV cache blocks allocatable now (free, or cached and held by no request).",
          l->blocks_free);
    gauge(f, "kvserve_kv_cache_usage_perc", "KV cache usage: 1 - free blocks / total blocks.",
          l->blocks_total ? 1.0 - (double)l->blocks_free / (double)l->blocks_total : 0.0);
    gauge(f, "kvserve_kv_blocks_cached", "KV cache blocks registered in the prefix cache.",
          l->blocks_cached);
    gauge(f, "kvserve_kv_blocks_full_precision",
          "KV cache blocks kept in the cache dtype rather than a quantized codec.", l->blocks_hot);
    gauge(f, "kvserve_host_kv_bytes_used", "Bytes of the host KV tier in use.",
          (double)l->host_bytes_used);
    gauge(f, "kvserve_device_failed",
          "1 once the compute device failed for good (every request fails; restart).",
          l->device_failed ? 1.0 : 0.0);

    counter(f, "kvserve_prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.",
            l->prefix_queried_tokens);
    counter(f, "kvserve_prefix_cache_hits_total", "Prompt tokens the prefix cache served.",
            l->prefix_hit_tokens);
    counter(f, "kvserve_prompt_tokens_total", "Prompt tokens of finished requests.",
            d->prompt_tokens);
    counter(f, "kvserve_generation_tokens_total", "Tokens generated by finished requests.",
            d->generation_tokens);
    counter_by(f, "kvserve_request_success_total", "Finished requests by finish reason.",
               "finished_reason", fin_name, d->success, SRV_MET_FINISH_COUNT);
    counter(f, "kvserve_num_preemptions_total", "Preemptions of finished requests.",
            d->preemptions);
    counter(f, "kvserve_kv_blocks_sealed_total",
            "KV blocks quantized into the codec, for any reason.", l->blocks_sealed);
    counter(f, "kvserve_kv_pressure_seals_total",
            "Times a short pool quantized residual windows early.", l->pressure_seals);
    static const char *const dirs[] = {"out", "in"};
    const uint64_t swaps[] = {l->swap_outs, l->swap_ins};
    counter_by(f, "kvserve_kv_swaps_total", "Requests whose KV moved to or from the host tier.",
               "direction", dirs, swaps, 2);
    static const char *const pols[] = {"snapkv", "h2o"};
    const uint64_t comps[] = {l->snapkv_compressions, l->h2o_compactions};
    counter_by(f, "kvserve_kv_compactions_total", "KV compressions and compactions by policy.",
               "policy", pols, comps, 2);
    counter(f, "kvserve_kv_dropped_tokens_total", "KV entries finished requests' policies dropped.",
            d->kv_dropped_tokens);
    counter(f, "kvserve_spec_decode_num_draft_tokens_total",
            "Tokens speculative decoding (prompt lookup or the draft model) proposed.",
            l->spec_draft_tokens);
    counter(f, "kvserve_spec_decode_num_accepted_tokens_total",
            "Proposed tokens the model accepted (each a decode step saved).",
            l->spec_accepted_tokens);
    counter(f, "kvserve_spec_decode_num_drafts_total",
            "Proposals verified (accepted tokens / drafts: the mean accepted run).",
            l->spec_drafts);
    if (l->spec_positions) {
        static const char *const pos[SCHED_MAX_SPEC_TOKENS] = {
            "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15"};
        _Static_assert(SCHED_MAX_SPEC_TOKENS == 16, "a label per position");
        counter_by(f, "kvserve_spec_decode_num_accepted_tokens_per_pos_total",
                   "Proposed tokens accepted, by their position in the proposal.", "position", pos,
                   l->spec_accepted_pos,
                   l->spec_positions < SCHED_MAX_SPEC_TOKENS ? l->spec_positions
                                                             : SCHED_MAX_SPEC_TOKENS);
    }
    counter(f, "kvserve_engine_steps_total", "Engine steps that ran the model.", l->steps);
    family(f, "kvserve_engine_busy_seconds_total", "counter",
           "Time the engine spent in steps that ran the model.");
    fprintf(f, "kvserve_engine_busy_seconds_total %.9f\n", (double)l->busy_ns / 1e9);

    for (int h = 0; h < SRV_MET_HIST_COUNT; h++)
        histogram(f, d, (srv_met_hist_t)h);
    return ferror(f) ? KVS_EIO : 0;
}

/* ---- the listener ---------------------------------------------------------- */

struct srv_metrics {
    struct MHD_Daemon *d;
    sched_t *sched;
    pthread_mutex_t mu;
    srv_met_data_t data;
};

static enum MHD_Result
reply(struct MHD_Connection *conn, unsigned status, char *body, size_t len, bool owned,
      const char *ctype)
{
    struct MHD_Response *r = MHD_create_response_from_buffer(
        len, body, owned ? MHD_RESPMEM_MUST_FREE : MHD_RESPMEM_PERSISTENT);
    if (r == NULL) {
        if (owned)
            free(body);
        return MHD_NO;
    }
    MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype);
    if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
        MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
    enum MHD_Result ret = MHD_queue_response(conn, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result
on_request(void *cls, struct MHD_Connection *conn, const char *url, const char *method,
           const char *version, const char *upload, size_t *upload_size, void **con_cls)
{
    srv_metrics_t *m = cls;
    static const char text[] = "text/plain; charset=utf-8";
    if (strcmp(url, "/metrics") != 0)
        return reply(conn, MHD_HTTP_NOT_FOUND, "not found\n", 10, false, text);
    if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0)
        return reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED, "method not allowed\n", 19, false, text);
    /* Copied under the lock so formatting never holds up the loop thread. */
    srv_met_data_t d;
    pthread_mutex_lock(&m->mu);
    d = m->data;
    pthread_mutex_unlock(&m->mu);
    sched_load_t l;
    sched_get_load(m->sched, &l);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    if (f == NULL)
        return MHD_NO;
    int rc = srv_met_render(&d, &l, f);
    if (fclose(f) != 0 || rc != 0) {
        free(buf);
        return MHD_NO;
    }
    return reply(conn, MHD_HTTP_OK, buf, len, true, "text/plain; version=0.0.4; charset=utf-8");
}

int
srv_metrics_start(const char *host, uint32_t port, sched_t *sched, srv_metrics_t **out,
                  uint32_t *bound_port)
{
    *out = NULL;
    char ps[16];
    snprintf(ps, sizeof ps, "%u", port);
    struct addrinfo hints = {
        .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM, .ai_flags = AI_PASSIVE};
    struct addrinfo *ai = NULL;
    if (getaddrinfo(host, ps, &hints, &ai) != 0 || ai == NULL)
        return KVS_EINVAL;
    srv_metrics_t *m = calloc(1, sizeof *m);
    if (m == NULL) {
        freeaddrinfo(ai);
        return KVS_ENOMEM;
    }
    m->sched = sched;
    pthread_mutex_init(&m->mu, NULL);
    unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG;
    if (ai->ai_family == AF_INET6)
        flags |= MHD_USE_IPv6;
    /* A few scrapers at most: keep the connection limit and timeout small
     * so a stuck client cannot pin the thread. */
    m->d = MHD_start_daemon(flags, (uint16_t)port, NULL, NULL, on_request, m, MHD_OPTION_SOCK_ADDR,
                            ai->ai_addr, MHD_OPTION_CONNECTION_LIMIT, 64u,
                            MHD_OPTION_CONNECTION_TIMEOUT, 10u, MHD_OPTION_END);
    freeaddrinfo(ai);
    if (m->d == NULL) {
        pthread_mutex_destroy(&m->mu);
        free(m);
        return KVS_EIO;
    }
    const union MHD_DaemonInfo *di = MHD_get_daemon_info(m->d, MHD_DAEMON_INFO_BIND_PORT);
    *bound_port = di ? di->port : port;
    *out = m;
    return 0;
}

void
srv_metrics_free(srv_metrics_t *m)
{
    if (m == NULL)
        return;
    MHD_stop_daemon(m->d);
    pthread_mutex_destroy(&m->mu);
    free(m);
}

void
srv_metrics_finish(srv_metrics_t *m, srv_met_finish_t fin, const sched_usage_t *u, uint64_t e2e_ns,
                   bool spec)
{
    if (m == NULL)
        return;
    pthread_mutex_lock(&m->mu);
    srv_met_observe(&m->data, fin, u, e2e_ns, spec);
    pthread_mutex_unlock(&m->mu);
}
