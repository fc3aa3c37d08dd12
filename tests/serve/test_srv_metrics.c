/*
 * tests/serve/test_srv_metrics.c — /metrics rendering without a socket:
 * what one request adds to each family, cumulative histogram buckets
 * ending in +Inf = _count, label escaping, and the exposition format's
 * structure (one HELP and TYPE per family, before its samples; no
 * duplicate series; counters end in _total; a trailing newline).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "serve/srv_metrics.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *
render(const srv_met_data_t *d, const sched_load_t *l)
{
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    assert_int_equal(srv_met_render(d, l, f), 0);
    assert_int_equal(fclose(f), 0);
    assert_true(len > 0);
    assert_int_equal(buf[len - 1], '\n');
    return buf;
}

/* The value of the sample whose name and labels are exactly `series`. */
static double
sample(const char *text, const char *series)
{
    size_t n = strlen(series);
    for (const char *p = text; *p;) {
        const char *eol = strchr(p, '\n');
        if (strncmp(p, series, n) == 0 && p[n] == ' ')
            return strtod(p + n + 1, NULL);
        p = eol ? eol + 1 : p + strlen(p);
    }
    fail_msg("no sample %s", series);
    return -1;
}

/* Structure every scraper relies on; promtool's checks where they apply. */
static void
check_structure(const char *text)
{
    char *copy = strdup(text);
    char *save = NULL;
    char families[64][96], types[64][16], series[512][160];
    int nf = 0, ns = 0;
    const char *cur = NULL; /* family of the last TYPE */
    for (char *line = strtok_r(copy, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        char name[96], type[16];
        if (strncmp(line, "# HELP ", 7) == 0) {
            assert_int_equal(sscanf(line + 7, "%95s", name), 1);
            for (int i = 0; i < nf; i++)
                assert_string_not_equal(families[i], name);
            assert_true(nf < 64);
            strcpy(families[nf], name);
            types[nf][0] = '\0';
            nf++;
            cur = NULL;
        } else if (strncmp(line, "# TYPE ", 7) == 0) {
            assert_int_equal(sscanf(line + 7, "%95s %15s", name, type), 2);
            assert_true(nf > 0);
            assert_string_equal(families[nf - 1], name);
            assert_string_equal(types[nf - 1], "");
            strcpy(types[nf - 1], type);
            cur = families[nf - 1];
            size_t k = strlen(name);
            bool total = k > 6 && strcmp(name + k - 6, "_total") == 0;
            assert_true(total == (strcmp(type, "counter") == 0));
            assert_null(strchr(name, ':'));
        } else {
            assert_non_null(cur);
            assert_int_equal(strncmp(line, cur, strlen(cur)), 0);
            const char *rest = line + strlen(cur);
            if (strcmp(types[nf - 1], "histogram") == 0)
                assert_true(strncmp(rest, "_bucket{", 8) == 0 || strncmp(rest, "_sum ", 5) == 0 ||
                            strncmp(rest, "_count ", 7) == 0);
            else
                assert_true(*rest == ' ' || *rest == '{');
            const char *sp = strrchr(line, ' ');
            assert_non_null(sp);
            char *end = NULL;
            strtod(sp + 1, &end);
            assert_true(end != sp + 1 && *end == '\0');
            size_t k = (size_t)(sp - line);
            assert_true(k < 160 && ns < 512);
            memcpy(series[ns], line, k);
            series[ns][k] = '\0';
            for (int i = 0; i < ns; i++)
                assert_string_not_equal(series[i], series[ns]);
            ns++;
        }
    }
    for (int i = 0; i < nf; i++)
        assert_string_not_equal(types[i], "");
    free(copy);
}

/* Buckets of `name`: cumulative, ascending le, last +Inf equal to _count. */
static void
check_histogram(const char *text, const char *name, uint64_t want_count)
{
    char pre[128];
    snprintf(pre, sizeof pre, "%s_bucket{le=\"", name);
    size_t n = strlen(pre);
    double prev_le = -1, prev = 0;
    bool inf = false;
    for (const char *p = strstr(text, pre); p; p = strstr(p + 1, pre)) {
        assert_false(inf);
        const char *q = p + n;
        if (strncmp(q, "+Inf\"", 5) == 0) {
            inf = true;
        } else {
            double le = strtod(q, NULL);
            assert_true(le > prev_le);
            prev_le = le;
        }
        const char *v = strchr(q, ' ');
        double c = strtod(v + 1, NULL);
        assert_true(c >= prev);
        prev = c;
    }
    assert_true(inf);
    char s[128];
    snprintf(s, sizeof s, "%s_count", name);
    assert_true(sample(text, s) == prev);
    assert_true(prev == (double)want_count);
}

static void
test_empty(void **state)
{
    (void)state;
    srv_met_data_t d = {0};
    sched_load_t l = {.blocks_total = 100, .blocks_free = 100, .blocks_hot = 100};
    char *t = render(&d, &l);
    check_structure(t);
    assert_true(sample(t, "kvserve_kv_cache_usage_perc") == 0.0);
    assert_true(sample(t, "kvserve_device_failed") == 0);
    assert_true(sample(t, "kvserve_request_success_total{finished_reason=\"stop\"}") == 0.0);
    assert_true(sample(t, "kvserve_spec_decode_num_draft_tokens_total") == 0);
    assert_true(strstr(t, "_per_pos{") == NULL); /* off: no positions */
    check_histogram(t, "kvserve_time_to_first_token_seconds", 0);
    check_histogram(t, "kvserve_spec_prefill_keep_ratio", 0);
    free(t);
}

static void
test_observations(void **state)
{
    (void)state;
    srv_met_data_t d = {0};
    /* 11 tokens: TPOT = 1 s / 10 = 0.1 s; density 0.25. */
    sched_usage_t a = {.prompt_tokens = 40,
                       .completion_tokens = 11,
                       .preemptions = 1,
                       .queue_ns = 2000000,
                       .ttft_ns = 30000000,
                       .decode_ns = 1000000000,
                       .attn_keys = 25,
                       .attn_keys_dense = 100,
                       .kv_dropped_tokens = 7};
    srv_met_observe(&d, SRV_MET_LENGTH, &a, 1200000000ull, false);
    /* Speculative prefill kept 10 of 40. */
    sched_usage_t b = a;
    b.kept_prompt_tokens = 10;
    b.preemptions = 0;
    srv_met_observe(&d, SRV_MET_STOP, &b, 3000000000ull, true);
    /* Cancelled while queued: no TTFT, queue time or TPOT. */
    sched_usage_t c = {.prompt_tokens = 5};
    srv_met_observe(&d, SRV_MET_ABORT, &c, 100000000ull, false);
    sched_load_t l = {.running = 2,
                      .preempted = 1,
                      .waiting = 1,
                      .blocks_total = 200,
                      .blocks_free = 150,
                      .blocks_cached = 9,
                      .blocks_hot = 40,
                      .blocks_sealed = 33,
                      .pressure_seals = 2,
                      .swap_outs = 3,
                      .swap_ins = 1,
                      .snapkv_compressions = 4,
                      .h2o_compactions = 6,
                      .host_bytes_used = 1u << 20,
                      .steps = 77,
                      .busy_ns = 1500000000,
                      .prefix_queried_tokens = 85,
                      .prefix_hit_tokens = 32,
                      .spec_draft_tokens = 50,
                      .spec_accepted_tokens = 31,
                      .spec_drafts = 20,
                      .spec_accepted_pos = {17, 9, 5},
                      .spec_positions = 4,
                      .device_failed = true};
    char *t = render(&d, &l);
    check_structure(t);
    assert_true(sample(t, "kvserve_num_requests_running") == 2);
    assert_true(sample(t, "kvserve_num_requests_waiting") == 1);
    assert_true(sample(t, "kvserve_num_requests_preempted") == 1);
    assert_true(sample(t, "kvserve_kv_cache_usage_perc") == 0.25);
    assert_true(sample(t, "kvserve_kv_blocks_capacity") == 200);
    assert_true(sample(t, "kvserve_kv_blocks_full_precision") == 40);
    assert_true(sample(t, "kvserve_host_kv_bytes_used") == 1048576);
    assert_true(sample(t, "kvserve_device_failed") == 1);
    assert_true(sample(t, "kvserve_prefix_cache_queries_total") == 85);
    assert_true(sample(t, "kvserve_prefix_cache_hits_total") == 32);
    assert_true(sample(t, "kvserve_prompt_tokens_total") == 85);
    assert_true(sample(t, "kvserve_generation_tokens_total") == 22);
    assert_true(sample(t, "kvserve_num_preemptions_total") == 1);
    assert_true(sample(t, "kvserve_kv_dropped_tokens_total") == 14);
    assert_true(sample(t, "kvserve_request_success_total{finished_reason=\"stop\"}") == 1);
    assert_true(sample(t, "kvserve_request_success_total{finished_reason=\"length\"}") == 1);
    assert_true(sample(t, "kvserve_request_success_total{finished_reason=\"abort\"}") == 1);
    assert_true(sample(t, "kvserve_request_success_total{finished_reason=\"error\"}") == 0);
    assert_true(sample(t, "kvserve_kv_blocks_sealed_total") == 33);
    assert_true(sample(t, "kvserve_kv_pressure_seals_total") == 2);
    assert_true(sample(t, "kvserve_kv_swaps_total{direction=\"out\"}") == 3);
    assert_true(sample(t, "kvserve_kv_swaps_total{direction=\"in\"}") == 1);
    assert_true(sample(t, "kvserve_kv_compactions_total{policy=\"snapkv\"}") == 4);
    assert_true(sample(t, "kvserve_kv_compactions_total{policy=\"h2o\"}") == 6);
    assert_true(sample(t, "kvserve_spec_decode_num_draft_tokens_total") == 50);
    assert_true(sample(t, "kvserve_spec_decode_num_accepted_tokens_total") == 31);
    assert_true(sample(t, "kvserve_spec_decode_num_drafts_total") == 20);
    assert_true(
        sample(t, "kvserve_spec_decode_num_accepted_tokens_per_pos_total{position=\"0\"}") == 17);
    assert_true(
        sample(t, "kvserve_spec_decode_num_accepted_tokens_per_pos_total{position=\"2\"}") == 5);
    assert_true(
        sample(t, "kvserve_spec_decode_num_accepted_tokens_per_pos_total{position=\"3\"}") == 0);
    assert_true(strstr(t, "position=\"4\"") == NULL); /* num_speculative_tokens positions */
    assert_true(sample(t, "kvserve_engine_steps_total") == 77);
    assert_true(sample(t, "kvserve_engine_busy_seconds_total") == 1.5);

    check_histogram(t, "kvserve_e2e_request_latency_seconds", 3);
    check_histogram(t, "kvserve_time_to_first_token_seconds", 2);
    check_histogram(t, "kvserve_request_queue_time_seconds", 2);
    check_histogram(t, "kvserve_time_per_output_token_seconds", 2);
    check_histogram(t, "kvserve_attention_density", 2);
    check_histogram(t, "kvserve_spec_prefill_keep_ratio", 1);
    /* le is inclusive: 0.1 s lands in le="0.1", 0.03 s in le="0.04". */
    assert_true(sample(t, "kvserve_time_per_output_token_seconds_bucket{le=\"0.075\"}") == 0);
    assert_true(sample(t, "kvserve_time_per_output_token_seconds_bucket{le=\"0.1\"}") == 2);
    assert_true(sample(t, "kvserve_time_to_first_token_seconds_bucket{le=\"0.02\"}") == 0);
    assert_true(sample(t, "kvserve_time_to_first_token_seconds_bucket{le=\"0.04\"}") == 2);
    assert_true(sample(t, "kvserve_e2e_request_latency_seconds_bucket{le=\"0.3\"}") == 1);
    assert_true(sample(t, "kvserve_e2e_request_latency_seconds_bucket{le=\"1.5\"}") == 2);
    assert_true(sample(t, "kvserve_e2e_request_latency_seconds_bucket{le=\"5\"}") == 3);
    assert_true(fabs(sample(t, "kvserve_e2e_request_latency_seconds_sum") - 4.3) < 1e-9);
    assert_true(sample(t, "kvserve_attention_density_bucket{le=\"0.2\"}") == 0);
    assert_true(sample(t, "kvserve_attention_density_bucket{le=\"0.3\"}") == 2);
    assert_true(sample(t, "kvserve_spec_prefill_keep_ratio_bucket{le=\"0.2\"}") == 0);
    assert_true(sample(t, "kvserve_spec_prefill_keep_ratio_bucket{le=\"0.3\"}") == 1);
    free(t);
}

static void
test_overflow_and_escape(void **state)
{
    (void)state;
    srv_met_data_t d = {0};
    srv_met_hist_add(&d, SRV_MET_TTFT, 5000.0); /* past the last bound */
    srv_met_hist_add(&d, SRV_MET_TTFT, 0.0);
    sched_load_t l = {0};
    char *t = render(&d, &l);
    check_structure(t);
    check_histogram(t, "kvserve_time_to_first_token_seconds", 2);
    assert_true(sample(t, "kvserve_time_to_first_token_seconds_bucket{le=\"2560\"}") == 1);
    assert_true(sample(t, "kvserve_time_to_first_token_seconds_bucket{le=\"0.001\"}") == 1);
    /* An empty pool is not "full". */
    assert_true(sample(t, "kvserve_kv_cache_usage_perc") == 0.0);
    free(t);

    char buf[32];
    assert_string_equal(srv_met_escape("a\"b\\c\nd", buf, sizeof buf), "a\\\"b\\\\c\\nd");
    assert_string_equal(srv_met_escape("plain", buf, sizeof buf), "plain");
    /* Truncation never splits an escape. */
    assert_string_equal(srv_met_escape("ab\"", buf, 4), "ab");
    assert_string_equal(srv_met_escape("abc", buf, 3), "ab");
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_empty),
        cmocka_unit_test(test_observations),
        cmocka_unit_test(test_overflow_and_escape),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
