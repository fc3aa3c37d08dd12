/*
 * serve/srv_bench_report.c — what `kvserve bench` prints and writes once its
 * calls are done (srv_bench.c calls bench_report): latency percentiles,
 * throughput, endings by status, the --json document with every
 * per-request record and the --plot SVG (latency CDFs, throughput over time).
 */
#include "srv_bench.h"

#include <errno.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct stat5 {
    double mean, p50, p90, p95, p99;
    size_t n;
} stat5_t;

static int
cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Percentiles interpolate between order statistics (numpy's default, as
 * vLLM's benchmark reports them).  Sorts v. */
static stat5_t
stat5(double *v, size_t n)
{
    stat5_t s = {.n = n};
    if (n == 0)
        return s;
    qsort(v, n, sizeof *v, cmp_double);
    double sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += v[i];
    s.mean = sum / (double)n;
    double *out[] = {&s.p50, &s.p90, &s.p95, &s.p99};
    const double q[] = {0.50, 0.90, 0.95, 0.99};
    for (int k = 0; k < 4; k++) {
        double pos = q[k] * (double)(n - 1);
        size_t i = (size_t)pos;
        double f = pos - (double)i;
        *out[k] = i + 1 < n ? v[i] + f * (v[i + 1] - v[i]) : v[i];
    }
    return s;
}

/* The four latency series, sorted (the plot draws their CDFs). */
enum { L_TTFT, L_TPOT, L_ITL, L_E2E, L_COUNT };
static const char *const l_name[L_COUNT] = {"TTFT", "TPOT", "ITL", "E2E"};

typedef struct summary {
    double *v[L_COUNT];
    stat5_t st[L_COUNT];
    uint32_t started, ok, cancelled, deadline, unintended;
    uint64_t out_tokens, in_tokens, cached_tokens;
    uint64_t spec_draft, spec_accepted; /* speculative decoding's, from the usages */
    double duration;
    uint32_t errors[SRV_GRPC_CODES + 1]; /* unintended endings by status */
} summary_t;

/* Per output: the outputs decode side by side. */
static double
req_tpot(const bench_req_t *r)
{
    uint32_t outs = r->n_outs ? r->n_outs : 1;
    return (r->t_end - r->t_first) * 1e3 / ((double)r->tokens / outs - 1);
}

static void
summary_free(summary_t *s)
{
    for (int i = 0; i < L_COUNT; i++)
        free(s->v[i]);
}

static int
bench_summarize(const bench_t *b, summary_t *s)
{
    const bench_opts_t *o = &b->o;
    memset(s, 0, sizeof *s);
    size_t n_itl = 0;
    for (uint32_t k = 0; k < o->n_req; k++)
        n_itl += b->reqs[k].n_itl;
    size_t cap[L_COUNT] = {o->n_req, o->n_req, n_itl, o->n_req}, n[L_COUNT] = {0};
    for (int i = 0; i < L_COUNT; i++)
        if ((s->v[i] = malloc((cap[i] + 1) * sizeof(double))) == NULL) {
            summary_free(s);
            return KVS_ENOMEM;
        }
    for (uint32_t k = 0; k < o->n_req; k++) {
        const bench_req_t *r = &b->reqs[k];
        if (!r->started)
            continue;
        s->started++;
        if (r->t_end > s->duration)
            s->duration = r->t_end;
        if (r->status != GRPC_STATUS_OK) {
            if (bench_intended(r)) {
                *(r->intent == INTENT_CANCEL ? &s->cancelled : &s->deadline) += 1;
            } else {
                s->unintended++;
                s->errors[(unsigned)r->status < SRV_GRPC_CODES ? r->status : SRV_GRPC_CODES]++;
            }
            continue;
        }
        s->ok++;
        s->out_tokens += r->tokens;
        s->in_tokens += r->has_usage ? r->usage_prompt : r->n_prompt;
        s->cached_tokens += r->usage_cached;
        s->spec_draft += r->usage_spec_draft;
        s->spec_accepted += r->usage_spec_accepted;
        s->v[L_E2E][n[L_E2E]++] = (r->t_end - r->t0) * 1e3;
        if (r->tokens) {
            s->v[L_TTFT][n[L_TTFT]++] = (r->t_first - r->t0) * 1e3;
            if (r->tokens > (r->n_outs ? r->n_outs : 1))
                s->v[L_TPOT][n[L_TPOT]++] = req_tpot(r);
        }
        for (size_t i = 0; i < r->n_itl; i++)
            s->v[L_ITL][n[L_ITL]++] = r->itl[i];
    }
    for (int i = 0; i < L_COUNT; i++)
        s->st[i] = stat5(s->v[i], n[i]);
    return 0;
}

static void
print_summary(const bench_t *b, const summary_t *s)
{
    const bench_opts_t *o = &b->o;
    double d = s->duration > 0 ? s->duration : 1e-9;
    printf("============ kvserve bench ============\n");
    if (o->open_loop)
        printf("%-32s %.3g req/s, burstiness %g\n", "Mode:", o->rate, o->burst);
    else
        printf("%-32s closed loop, concurrency %u\n", "Mode:", o->conc);
    if (o->dataset)
        printf("%-32s %s (%u of %u entries)\n", "Dataset:", o->dataset, b->n_data, b->data_total);
    if (o->turns > 1)
        printf("%-32s %u conversations of %u turns, %u new tokens a turn\n",
               "Multi-turn:", b->n_conv, o->turns, o->question_len);
    if (o->n_outputs > 1)
        printf("%-32s %u (sampling.n; TPOT and ITL per output)\n",
               "Outputs per request:", o->n_outputs);
    if (o->guided.regex || o->guided.json || o->guided.grammar)
        printf("%-32s %s\n", "Guided decoding:",
               o->guided.regex  ? "guided_regex"
               : o->guided.json ? "guided_json"
                                : "guided_grammar");
    if (s->started < o->n_req)
        printf("%-32s %u of %u (--duration %gs)\n", "Started requests:", s->started, o->n_req,
               o->duration_s);
    printf("%-32s %u\n", "Successful requests:", s->ok);
    if (o->cancel_frac > 0)
        printf("%-32s %u\n", "Cancelled by the client:", s->cancelled);
    if (o->deadline_frac > 0)
        printf("%-32s %u\n", "Deadline exceeded (intended):", s->deadline);
    printf("%-32s %u\n", "Failed requests:", s->unintended);
    for (unsigned c = 0; c <= SRV_GRPC_CODES; c++)
        if (s->errors[c])
            printf("  %-30s %u\n",
                   c < SRV_GRPC_CODES ? srv_grpc_status_name((grpc_status_code)c) : "OTHER",
                   s->errors[c]);
    printf("%-32s %.3f\n", "Duration (s):", s->duration);
    printf("%-32s %llu\n", "Total input tokens:", (unsigned long long)s->in_tokens);
    printf("%-32s %llu (%.1f%%)\n", "Cached input tokens:", (unsigned long long)s->cached_tokens,
           s->in_tokens ? 100.0 * (double)s->cached_tokens / (double)s->in_tokens : 0.0);
    printf("%-32s %llu\n", "Total output tokens:", (unsigned long long)s->out_tokens);
    if (s->spec_draft) /* the server speculates */
        printf("%-32s %llu of %llu (%.1f%%)\n",
               "Speculative tokens accepted:", (unsigned long long)s->spec_accepted,
               (unsigned long long)s->spec_draft,
               100.0 * (double)s->spec_accepted / (double)s->spec_draft);
    printf("%-32s %.2f\n", "Request throughput (req/s):", s->ok / d);
    printf("%-32s %.2f\n", "Output token throughput (tok/s):", (double)s->out_tokens / d);
    printf("%-32s %u\n", "Peak requests in flight:", b->max_in_flight);
    if (b->cap_hits)
        printf("%-32s %llu arrivals started late\n",
               "In-flight cap hit:", (unsigned long long)b->cap_hits);
    printf("%-8s %10s %10s %10s %10s %10s\n", "(ms)", "mean", "p50", "p90", "p95", "p99");
    for (int i = 0; i < L_COUNT; i++)
        printf("%-8s %10.2f %10.2f %10.2f %10.2f %10.2f\n", l_name[i], s->st[i].mean, s->st[i].p50,
               s->st[i].p90, s->st[i].p95, s->st[i].p99);
    printf("=======================================\n");
}

static void
json_stat(FILE *f, const char *name, const stat5_t *s)
{
    fprintf(f,
            "\"%s\": {\"n\": %zu, \"mean\": %.4f, \"p50\": %.4f, \"p90\": %.4f, \"p95\": %.4f, "
            "\"p99\": %.4f}",
            name, s->n, s->mean, s->p50, s->p90, s->p95, s->p99);
}

static const char *
intent_name(bench_intent_t i)
{
    return i == INTENT_CANCEL ? "cancel" : i == INTENT_DEADLINE ? "deadline" : "none";
}

static void
json_policy(FILE *f, const bench_opts_t *o)
{
    fprintf(f, "\"policy\": {");
    const char *sep = "";
    if (o->has_attn) {
        fprintf(f,
                "\"attention\": \"%s\", \"attn_sinks\": %u, \"attn_window\": %u, "
                "\"decode_top_k\": %u",
                srv_attn_kind_name(o->attn_kind), o->attn.sink_tokens, o->attn.window_tokens,
                o->attn.decode_top_k_blocks);
        sep = ", ";
    }
    if (o->has_prefill) {
        fprintf(f, "%s\"prefill\": \"%s\", \"keep_ratio\": %g", sep,
                o->prefill.kind == KVSERVE__V1__PREFILL_POLICY__KIND__SPECULATIVE ? "speculative"
                                                                                  : "full",
                o->prefill.keep_ratio);
        sep = ", ";
    }
    if (o->has_kv) {
        fprintf(f, "%s\"kv_policy\": \"%s\", \"kv_budget\": %u", sep,
                srv_kv_policy_name(o->kv_kind), o->kv.budget_tokens);
        sep = ", ";
    }
    const char *guided = o->guided.regex     ? "regex"
                         : o->guided.json    ? "json"
                         : o->guided.grammar ? "grammar"
                                             : NULL;
    if (guided)
        fprintf(f, "%s\"guided\": \"%s\"", sep, guided);
    fprintf(f, "}");
}

static int
write_json(const bench_t *b, const summary_t *s)
{
    const bench_opts_t *o = &b->o;
    FILE *f = fopen(o->json, "w");
    if (f == NULL) {
        fprintf(stderr, "kvserve bench: --json: cannot write '%s': %s\n", o->json, strerror(errno));
        return KVS_EIO;
    }
    double d = s->duration > 0 ? s->duration : 1e-9;
    fprintf(f, "{\"config\": {\"addr\": ");
    srv_json_str(f, o->conn.addr, strlen(o->conn.addr));
    fprintf(f,
            ", \"num_requests\": %u, \"mode\": \"%s\", \"concurrency\": %u, "
            "\"request_rate\": %g, \"burstiness\": %g, \"input_len\": %u, "
            "\"input_len_range\": %g, \"output_len\": %u, \"output_len_range\": %g, "
            "\"shared_prefix\": %g, \"seed\": %llu, \"timeout_ms\": %u, \"turns\": %u, "
            "\"question_len\": %u, \"duration_s\": %g, \"cancel_fraction\": %g, "
            "\"cancel_after_ms\": %u, \"deadline_fraction\": %g, \"deadline_ms\": %u, "
            "\"n\": %u, \"temperature\": %g, \"top_p\": %g, ",
            o->n_req, o->open_loop ? "open" : "closed", o->open_loop ? 0 : o->conc,
            o->open_loop ? o->rate : 0.0, o->open_loop ? o->burst : 0.0, o->in_len, o->in_range,
            o->out_len, o->out_range, o->prefix, (unsigned long long)o->seed, o->conn.timeout_ms,
            o->turns, o->turns > 1 ? o->question_len : 0, o->duration_s, o->cancel_frac,
            o->cancel_ms, o->deadline_frac, o->deadline_ms, o->n_outputs, o->temperature, o->top_p);
    if (o->dataset) {
        fprintf(f, "\"dataset\": ");
        srv_json_str(f, o->dataset, strlen(o->dataset));
        fprintf(f,
                ", \"dataset_entries\": %u, \"dataset_examined\": %u, \"dataset_taken\": %u, "
                "\"dataset_too_long\": %u, \"dataset_empty\": %u, \"dataset_unanswered\": %u, ",
                b->data_total, b->data_examined, b->n_data, b->data_too_long, b->data_empty,
                b->data_unanswered);
    }
    json_policy(f, o);
    fprintf(f,
            "},\n\"summary\": {\"started\": %u, \"completed\": %u, \"cancelled\": %u, "
            "\"deadline_exceeded\": %u, \"failed\": %u, \"duration_s\": %.6f, "
            "\"request_throughput\": %.4f, \"output_throughput\": %.4f, "
            "\"total_input_tokens\": %llu, \"cached_input_tokens\": %llu, "
            "\"cached_share\": %.6f, \"total_output_tokens\": %llu, \"max_in_flight\": %u, "
            "\"in_flight_cap_hits\": %llu, \"spec_draft_tokens\": %llu, "
            "\"spec_accepted_tokens\": %llu, ",
            s->started, s->ok, s->cancelled, s->deadline, s->unintended, s->duration, s->ok / d,
            (double)s->out_tokens / d, (unsigned long long)s->in_tokens,
            (unsigned long long)s->cached_tokens,
            s->in_tokens ? (double)s->cached_tokens / (double)s->in_tokens : 0.0,
            (unsigned long long)s->out_tokens, b->max_in_flight, (unsigned long long)b->cap_hits,
            (unsigned long long)s->spec_draft, (unsigned long long)s->spec_accepted);
    fprintf(f, "\"errors\": {");
    bool first = true;
    for (unsigned c = 0; c <= SRV_GRPC_CODES; c++)
        if (s->errors[c]) {
            fprintf(f, "%s\"%s\": %u", first ? "" : ", ",
                    c < SRV_GRPC_CODES ? srv_grpc_status_name((grpc_status_code)c) : "OTHER",
                    s->errors[c]);
            first = false;
        }
    fprintf(f, "}");
    const char *key[L_COUNT] = {"ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"};
    for (int i = 0; i < L_COUNT; i++) {
        fprintf(f, ", ");
        json_stat(f, key[i], &s->st[i]);
    }
    size_t nb = s->duration > 0 ? (size_t)s->duration + 1 : 0;
    if (nb > b->n_bins)
        nb = b->n_bins;
    fprintf(f, "},\n\"timeline\": [");
    for (size_t i = 0; i < nb; i++)
        fprintf(f, "%s{\"t_s\": %zu, \"output_tokens\": %llu, \"completed\": %u}", i ? ", " : "", i,
                (unsigned long long)b->bins[i].tokens, b->bins[i].completed);
    fprintf(f, "],\n\"requests\": [\n");
    first = true;
    for (uint32_t k = 0; k < o->n_req; k++) {
        const bench_req_t *r = &b->reqs[k];
        if (!r->started)
            continue;
        const char *msg = r->message ? r->message : "";
        fprintf(f,
                "%s{\"index\": %u, \"conversation\": %u, \"turn\": %u, \"start_s\": %.6f, "
                "\"ttft_ms\": %.4f, \"e2e_ms\": %.4f, \"tpot_ms\": %.4f, \"output_tokens\": %u, "
                "\"requested_output_tokens\": %u, \"prompt_tokens\": %u, "
                "\"cached_prompt_tokens\": %u, \"intent\": \"%s\", \"status\": %d, "
                "\"status_name\": \"%s\", \"message\": ",
                first ? "" : ",\n", k, k / o->turns, k % o->turns, r->t0,
                r->tokens ? (r->t_first - r->t0) * 1e3 : 0.0, (r->t_end - r->t0) * 1e3,
                r->tokens > (r->n_outs ? r->n_outs : 1) ? req_tpot(r) : 0.0, r->tokens,
                r->out_len * (r->n_outs ? r->n_outs : 1),
                r->has_usage ? r->usage_prompt : r->n_prompt, r->usage_cached,
                intent_name(r->intent), (int)r->status, srv_grpc_status_name(r->status));
        first = false;
        srv_json_str(f, msg, strlen(msg));
        fprintf(f, ", \"itl_ms\": [");
        for (size_t i = 0; i < r->n_itl; i++)
            fprintf(f, "%s%.4f", i ? ", " : "", r->itl[i]);
        fprintf(f, "]}");
    }
    fprintf(f, "\n]}\n");
    if (fclose(f) != 0) {
        fprintf(stderr, "kvserve bench: --json: cannot write '%s': %s\n", o->json, strerror(errno));
        return KVS_EIO;
    }
    return 0;
}

/* ---- the plot ----------------------------------------------------------- */

/* 1, 2, 5 x 10^k: a round tick step for a span. */
static double
nice_step(double span, int ticks)
{
    double raw = span / ticks, p = pow(10.0, floor(log10(raw))), m = raw / p;
    return p * (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10);
}

typedef struct panel {
    int x, y, w, h;
    double x0, x1, y0, y1;
    bool logx;
} panel_t;

static double
px(const panel_t *p, double v)
{
    double a = p->logx ? log10(v) : v, lo = p->logx ? log10(p->x0) : p->x0,
           hi = p->logx ? log10(p->x1) : p->x1;
    return p->x + (a - lo) / (hi - lo) * p->w;
}

static double
py(const panel_t *p, double v)
{
    return p->y + p->h - (v - p->y0) / (p->y1 - p->y0) * p->h;
}

static void
panel_axes(FILE *f, const panel_t *p, const char *title, const char *xlabel, const char *ylabel)
{
    fprintf(f,
            "<text x=\"%d\" y=\"%d\" font-size=\"13\">%s</text>\n"
            "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" fill=\"none\" stroke=\"#888\"/>\n",
            p->x, p->y - 10, title, p->x, p->y, p->w, p->h);
    if (p->logx) {
        for (double d = pow(10.0, floor(log10(p->x0))); d <= p->x1 * 1.0001; d *= 10) {
            if (d < p->x0 * 0.9999)
                continue;
            double x = px(p, d);
            fprintf(f,
                    "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#ddd\"/>\n"
                    "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%g</text>\n",
                    x, p->y, x, p->y + p->h, x, p->y + p->h + 14, d);
        }
    } else {
        double st = nice_step(p->x1 - p->x0, 6);
        for (double v = ceil(p->x0 / st) * st; v <= p->x1 + 1e-9; v += st) {
            double x = px(p, v);
            fprintf(f,
                    "<line x1=\"%.1f\" y1=\"%d\" x2=\"%.1f\" y2=\"%d\" stroke=\"#ddd\"/>\n"
                    "<text x=\"%.1f\" y=\"%d\" text-anchor=\"middle\">%g</text>\n",
                    x, p->y, x, p->y + p->h, x, p->y + p->h + 14, v);
        }
    }
    double st = nice_step(p->y1 - p->y0, 5);
    for (double v = ceil(p->y0 / st) * st; v <= p->y1 + 1e-9; v += st)
        fprintf(f,
                "<line x1=\"%d\" y1=\"%.1f\" x2=\"%d\" y2=\"%.1f\" stroke=\"#ddd\"/>\n"
                "<text x=\"%d\" y=\"%.1f\" text-anchor=\"end\">%g</text>\n",
                p->x, py(p, v), p->x + p->w, py(p, v), p->x - 4, py(p, v) + 4, v);
    fprintf(f,
            "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%s</text>\n"
            "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" "
            "transform=\"rotate(-90 %d %d)\">%s</text>\n",
            p->x + p->w / 2, p->y + p->h + 30, xlabel, p->x - 40, p->y + p->h / 2, p->x - 40,
            p->y + p->h / 2, ylabel);
}

/* Left: the CDF of each latency (log ms); right: output tokens per second
 * and completions per second over the run. */
static int
write_plot(const bench_t *b, const summary_t *s)
{
    const char *path = b->o.plot;
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        fprintf(stderr, "kvserve bench: --plot: cannot write '%s': %s\n", path, strerror(errno));
        return KVS_EIO;
    }
    static const char *const color[L_COUNT] = {"#1f77b4", "#2ca02c", "#9467bd", "#d62728"};
    fprintf(f, "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"980\" height=\"380\" "
               "font-family=\"sans-serif\" font-size=\"11\">\n"
               "<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n");
    /* The positive values' range: each series is sorted (stat5). */
    double lo = INFINITY, hi = 0;
    for (int i = 0; i < L_COUNT; i++) {
        size_t n = s->st[i].n, j = 0;
        while (j < n && !(s->v[i][j] > 0))
            j++;
        if (j < n) {
            lo = fmin(lo, s->v[i][j]);
            hi = fmax(hi, s->v[i][n - 1]);
        }
    }
    if (!(hi > 0)) {
        lo = 0.1;
        hi = 1;
    }
    panel_t c = {70, 40, 360, 280, pow(10, floor(log10(lo))), pow(10, ceil(log10(hi))), 0, 1, true};
    if (c.x1 <= c.x0)
        c.x1 = c.x0 * 10;
    panel_axes(f, &c, "Latency CDFs", "milliseconds (log)", "share of requests (tokens for ITL)");
    for (int i = 0; i < L_COUNT; i++) {
        size_t n = s->st[i].n;
        if (n == 0)
            continue;
        /* At most ~400 points a curve: a long run's ITL has millions. */
        size_t step = n > 400 ? n / 400 : 1;
        fprintf(f, "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" points=\"",
                color[i]);
        for (size_t j = 0; j < n; j += step) {
            double v = s->v[i][j] > c.x0 ? s->v[i][j] : c.x0;
            fprintf(f, "%.1f,%.1f ", px(&c, v), py(&c, (double)(j + 1) / (double)n));
        }
        fprintf(f, "%.1f,%.1f\"/>\n", px(&c, fmax(s->v[i][n - 1], c.x0)), py(&c, 1.0));
        fprintf(f,
                "<line x1=\"%d\" y1=\"%d\" x2=\"%d\" y2=\"%d\" stroke=\"%s\" stroke-width=\"2\"/>"
                "<text x=\"%d\" y=\"%d\">%s p50 %.1f ms</text>\n",
                c.x + 10, c.y + 14 + 16 * i, c.x + 28, c.y + 14 + 16 * i, color[i], c.x + 32,
                c.y + 18 + 16 * i, l_name[i], s->st[i].p50);
    }

    size_t nb = s->duration > 0 ? (size_t)ceil(s->duration) : 1;
    if (nb > b->n_bins)
        nb = b->n_bins;
    double top = 1;
    for (size_t i = 0; i < nb; i++)
        top = fmax(top, (double)b->bins[i].tokens);
    panel_t t = {560, 40, 380, 280, 0, nb > 1 ? (double)nb : 1.0, 0, top * 1.1, false};
    panel_axes(f, &t, "Throughput over time", "seconds since the first request",
               "output tokens per second");
    fprintf(f, "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"1.5\" points=\"");
    for (size_t i = 0; i < nb; i++)
        fprintf(f, "%.1f,%.1f ", px(&t, i + 0.5), py(&t, (double)b->bins[i].tokens));
    fprintf(f, "\"/>\n");
    double cmax = 1;
    for (size_t i = 0; i < nb; i++)
        cmax = fmax(cmax, (double)b->bins[i].completed);
    fprintf(f, "<polyline fill=\"none\" stroke=\"#ff7f0e\" stroke-width=\"1\" "
               "stroke-dasharray=\"4 2\" points=\"");
    for (size_t i = 0; i < nb; i++)
        fprintf(f, "%.1f,%.1f ", px(&t, i + 0.5),
                py(&t, (double)b->bins[i].completed / cmax * top));
    fprintf(f,
            "\"/>\n<text x=\"%d\" y=\"%d\" fill=\"#1f77b4\">output tok/s</text>"
            "<text x=\"%d\" y=\"%d\" fill=\"#ff7f0e\">completions/s (peak %.0f, scaled)</text>\n",
            t.x + 10, t.y + 16, t.x + 10, t.y + 32, cmax);
    fprintf(f, "</svg>\n");
    if (fclose(f) != 0) {
        fprintf(stderr, "kvserve bench: --plot: cannot write '%s': %s\n", path, strerror(errno));
        return KVS_EIO;
    }
    return 0;
}

int
bench_report(const bench_t *b, uint32_t *unintended)
{
    summary_t s;
    int rc = bench_summarize(b, &s);
    if (rc) {
        fprintf(stderr, "kvserve bench: out of memory for the summary\n");
        return rc;
    }
    print_summary(b, &s);
    fflush(stdout);
    *unintended = s.unintended;
    rc = b->o.json ? write_json(b, &s) : 0;
    int prc = b->o.plot ? write_plot(b, &s) : 0;
    rc = rc ? rc : prc;
    summary_free(&s);
    return rc;
}
