/*
 * bench/bench_kvq.c — what quantized KV buys in capacity: how many
 * concurrent sessions of --length tokens (prompt + generated) fit AND run
 * in a fixed KV memory for each KV dtype (f16, bf16, q8_0, fp8, q4), as a
 * ratio to f16, and the aggregate decode tok/s with that many sessions,
 * all measured in one run through the engine (sched_step).
 *
 * Per dtype: sched_new sizes the pool from --kv-memory (for a codec with
 * its default full-precision staging, which grows with max_num_seqs); the
 * largest N whose pool holds N sessions at full length at once is found by
 * building engines with max_num_seqs = N and reading their pools back.
 * Then N sessions run (distinct random prompts of length - decode tokens,
 * greedy, EOS ignored, `decode` tokens each) and must all finish normally
 * with zero preemptions and with all N running at once; otherwise N - 1
 * is tried (a few times at most).  Decode tok/s is timed from the step in
 * which the last session got its first token until all are done.
 *
 * Chunked prefill admits one token budget of prompt per step, so with
 * short decodes the first sessions finish long before the last start and
 * N would never run at once.  By default a run therefore primes: a first
 * wave prefills every session's prompt (max_tokens 1) with the prefix
 * cache on and a per-session cache salt (no session can share another's
 * KV), then the measured wave submits the full requests, which find their
 * own prompt KV cached (checked: no evictions), are admitted within a step
 * or two and decode together to full length.  --no-prime runs one wave
 * with the prefix cache off and reports the peak it reached.
 *
 *   bench_kvq [--model F.gguf] [--threads N] [--kv-memory 64M] [--length 2048]
 *             [--decode 32] [--dtypes f16,bf16,q8_0,fp8,q4] [--sinks 4]
 *             [--block-size 16] [--max-num-batched-tokens 512] [--no-prime]
 *             [--json FILE]
 *
 * --model defaults to the bundled weights/kvserve-main.gguf (as kvserve
 * run finds it); sizes take K, M or G suffixes (binary).
 */
#include "sched/sched.h"
#include "serve/srv.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_DTYPES 8
#define MAX_ATTEMPTS 4 /* the fitted N, then up to three smaller ones */

typedef struct opts {
    const char *model, *json;
    uint32_t threads, length, decode, sinks, bt, mnbt;
    uint64_t memory;
    bool prime;
} opts_t;

typedef struct kind {
    const char *name;
    kern_kvq_t quant;
} kind_t;

static const kind_t KINDS[] = {{"f16", KERN_KVQ_NONE},
                               {"bf16", KERN_KVQ_BF16},
                               {"q8_0", KERN_KVQ_Q8_0},
                               {"fp8", KERN_KVQ_FP8},
                               {"q4", KERN_KVQ_Q4}};

/* The pool sched_new built for one max_num_seqs, and what a session needs
 * of it at full length. */
typedef struct geom {
    uint32_t n_blocks, n_hot, n_cold; /* without a codec every block is "hot" */
    size_t block_bytes, qblock_bytes; /* a full-precision block, a quantized one (0) */
    uint64_t block_values;            /* K and V values a block holds (all layers) */
    uint32_t hot_per, cold_per;       /* blocks one session holds at full length */
    uint32_t stage;                   /* hot blocks one step's prefill chunks may take */
} geom_t;

typedef struct result {
    const kind_t *kind;
    uint32_t fit, n, attempts;
    geom_t g;
    double decode_tok_s, decode_s, prime_s, run_s;
    uint64_t decode_tokens, decode_steps, sealed, sealed_expected, evictions;
    uint32_t preemptions, peak, cached_short;
    bool verified;
} result_t;

static sched_cfg_t
make_cfg(const opts_t *o, kern_kvq_t q, uint32_t n, bool prefix)
{
    return (sched_cfg_t){.max_num_seqs = n,
                         .max_num_batched_tokens = o->mnbt,
                         .max_model_len = o->length,
                         .block_tokens = o->bt,
                         .kv_cache_bytes = o->memory,
                         .kv_dtype = KERN_F16,
                         .kv_quant = q,
                         .kv_sink_tokens = q != KERN_KVQ_NONE ? o->sinks : 0,
                         .prefix_caching = prefix};
}

/* Blocks one session holds once its KV is at full length: length - 1
 * entries (the last sampled token is never written).  With a codec the
 * full blocks past the sinks are sealed; the sink blocks and the tail
 * (partial, or reserved for the next token) stay full precision, and one
 * step's prefill chunks need up to ceil(budget / bt) + 1 more hot blocks
 * until they are sealed at its end. */
static void
session_need(const opts_t *o, kern_kvq_t q, geom_t *g)
{
    uint32_t kv = o->length - 1, bt = o->bt;
    uint32_t full = kv / bt, total = (kv + bt - 1) / bt;
    if (q == KERN_KVQ_NONE) {
        g->hot_per = total;
        g->cold_per = 0;
        g->stage = 0;
        return;
    }
    uint32_t sb = (uint32_t)(((uint64_t)o->sinks + bt - 1) / bt);
    if (sb > full)
        sb = full;
    g->cold_per = full - sb;
    g->hot_per = sb + 1;
    g->stage = (o->mnbt + bt - 1) / bt + 1;
}

static bool
fits(const geom_t *g, uint32_t n)
{
    return (uint64_t)n * g->hot_per + g->stage <= g->n_hot &&
           (uint64_t)n * g->cold_per <= g->n_cold;
}

/* Builds the engine for n sessions as the run would, reads its pool back
 * and frees it. */
static int
probe(model_t *m, const opts_t *o, kern_kvq_t q, uint32_t n, geom_t *g)
{
    sched_cfg_t cfg = make_cfg(o, q, n, false);
    sched_t *s;
    int rc = sched_new(m, &cfg, &s);
    if (rc)
        return rc;
    const sched_cfg_t *c = sched_get_cfg(s);
    kv_pool_t *pool = sched_pool(s);
    const kv_pool_cfg_t *pc = kv_pool_cfg(pool);
    *g = (geom_t){0};
    g->n_blocks = c->n_blocks;
    g->n_hot = q != KERN_KVQ_NONE ? c->kv_hot_blocks : c->n_blocks;
    g->n_cold = g->n_blocks - g->n_hot;
    g->block_bytes = kv_pool_block_bytes(pc);
    g->qblock_bytes = kv_pool_quant_block_bytes(pc);
    g->block_values = (uint64_t)pc->block_tokens * pc->n_kv_heads * pc->head_dim * pc->n_layers * 2;
    /* The pool's own counts of each kind, nothing allocated yet. */
    uint32_t free_hot = kv_pool_n_free_kind(pool, false);
    uint32_t free_cold = q != KERN_KVQ_NONE ? kv_pool_n_free_kind(pool, true) : 0;
    sched_free(s);
    if (free_hot != g->n_hot || free_cold != g->n_cold) {
        fprintf(stderr,
                "bench_kvq: engine problem: sched reports %u hot + %u quantized blocks, "
                "its pool has %u + %u free\n",
                g->n_hot, g->n_cold, free_hot, free_cold);
        return KVS_EINVAL;
    }
    session_need(o, q, g);
    return 0;
}

/* The largest n that fits, by bisection over engines built for it (the
 * hot staging, and so the quantized remainder, depends on n).  *n = 0
 * when not even one session fits; *g is then the one-session pool. */
static int
find_n(model_t *m, const opts_t *o, kern_kvq_t q, uint32_t *n, geom_t *g)
{
    int rc = probe(m, o, q, 1, g);
    if (rc || !fits(g, 1)) {
        *n = 0;
        return rc;
    }
    size_t per = (size_t)g->hot_per * g->block_bytes + (size_t)g->cold_per * g->qblock_bytes;
    uint64_t hi = o->memory / (per ? per : 1) + 2;
    uint32_t lo = 1;
    geom_t gh;
    for (;;) { /* hi must not fit */
        if (hi > UINT32_MAX / 2)
            return KVS_ERANGE;
        rc = probe(m, o, q, (uint32_t)hi, &gh);
        if (rc)
            return rc;
        if (!fits(&gh, (uint32_t)hi))
            break;
        lo = (uint32_t)hi;
        *g = gh;
        hi *= 2;
    }
    while (hi - lo > 1) {
        uint32_t mid = lo + (uint32_t)(hi - lo) / 2;
        rc = probe(m, o, q, mid, &gh);
        if (rc)
            return rc;
        if (fits(&gh, mid)) {
            lo = mid;
            *g = gh;
        } else {
            hi = mid;
        }
    }
    *n = lo;
    return 0;
}

/* Session i's prompt: the same for every dtype, different per session. */
static void
fill_prompt(int32_t *p, uint32_t n, uint32_t session, uint32_t vocab)
{
    uint64_t x = 0x9e3779b97f4a7c15ull * (session + 1) ^ 0x6b767100ull;
    for (uint32_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p[i] = (int32_t)(x % vocab);
    }
}

typedef struct wave {
    uint64_t id0;
    uint32_t n, want_tokens, want_cached;
    uint8_t *seen; /* [n]: got its first token */
    uint32_t first, finished, preemptions, cached_short;
    uint64_t tokens;
} wave_t;

static int
drain(sched_t *s, wave_t *w)
{
    int rc = 0;
    sched_event_t *ev;
    while ((ev = sched_poll(s)) != NULL) {
        uint64_t i = ev->req_id - w->id0;
        if (i >= w->n) {
            fprintf(stderr, "bench_kvq: event for unknown request %llu\n",
                    (unsigned long long)ev->req_id);
            rc = -1;
        } else if (ev->kind == SCHED_EV_TOKEN) {
            w->tokens++;
            if (!w->seen[i]) {
                w->seen[i] = 1;
                w->first++;
            }
        } else {
            w->finished++;
            w->preemptions += ev->usage.preemptions;
            if (ev->usage.cached_prompt_tokens < w->want_cached)
                w->cached_short++;
            if (ev->finish == SCHED_FINISH_ERROR) {
                fprintf(stderr, "bench_kvq: request %llu failed: %s\n",
                        (unsigned long long)ev->req_id, kvs_strerror(ev->error));
                rc = -1;
            } else if (ev->finish != SCHED_FINISH_LENGTH ||
                       ev->usage.completion_tokens != w->want_tokens) {
                fprintf(stderr,
                        "bench_kvq: request %llu finished (%s) after %u tokens, expected "
                        "length after %u\n",
                        (unsigned long long)ev->req_id, sched_finish_name(ev->finish),
                        ev->usage.completion_tokens, w->want_tokens);
                rc = -1;
            }
        }
        sched_event_free(ev);
    }
    return rc;
}

/* Steps until the engine is idle; samples the running count after each
 * step, and marks when every session of w has its first token. */
static int
step_all(sched_t *s, wave_t *w, uint32_t *peak, uint64_t *t_all, uint64_t *tok_all,
         uint64_t *steps_all)
{
    for (;;) {
        int live = sched_step(s);
        if (live < 0) {
            fprintf(stderr, "bench_kvq: engine step failed: %s\n", kvs_strerror(live));
            return -1;
        }
        if (drain(s, w))
            return -1;
        sched_load_t ld;
        sched_get_load(s, &ld);
        if (peak && ld.running > *peak)
            *peak = ld.running;
        if (t_all && *t_all == 0 && w->first == w->n) {
            *t_all = kvs_now_ns();
            *tok_all = w->tokens;
            *steps_all = ld.steps;
        }
        if (live == 0)
            break;
    }
    if (w->finished != w->n) {
        fprintf(stderr, "bench_kvq: %u of %u requests finished\n", w->finished, w->n);
        return -1;
    }
    return 0;
}

/* N sessions of one dtype, from submission to the last finish. */
static int
run(model_t *m, const opts_t *o, const kind_t *k, uint32_t n, result_t *res)
{
    const uint32_t P = o->length - o->decode, bt = o->bt;
    const uint32_t cached = (P - 1) / bt * bt; /* what a re-submission can find cached */
    const bool prime = o->prime && cached > 0;
    uint32_t nv = model_hparams(m)->n_vocab;
    nv = nv < 256 ? nv : 256;
    sched_cfg_t cfg = make_cfg(o, k->quant, n, prime);
    sched_t *s;
    int rc = sched_new(m, &cfg, &s);
    if (rc) {
        fprintf(stderr, "bench_kvq: %s: cannot build the engine for %u sessions: %s\n", k->name, n,
                kvs_strerror(rc));
        return -1;
    }
    int32_t *prompts = malloc((size_t)n * P * sizeof *prompts);
    uint8_t *seen = calloc(n, 1);
    if (prompts == NULL || seen == NULL) {
        fprintf(stderr, "bench_kvq: out of memory\n");
        free(prompts);
        free(seen);
        sched_free(s);
        return -1;
    }
    for (uint32_t i = 0; i < n; i++)
        fill_prompt(prompts + (size_t)i * P, P, i, nv);
    res->preemptions = res->peak = res->cached_short = 0;
    res->evictions = res->sealed = 0;
    res->prime_s = 0;
    uint64_t t_start = kvs_now_ns();
    int err = 0;
    if (prime) {
        /* Wave 1: each prompt's leading full blocks into the prefix cache. */
        wave_t w1 = {.id0 = 0, .n = n, .want_tokens = 1, .seen = seen};
        for (uint32_t i = 0; i < n && !err; i++) {
            sched_request_t r = {.id = i,
                                 .prompt = prompts + (size_t)i * P,
                                 .n_prompt = cached,
                                 .max_tokens = 1,
                                 .ignore_eos = true,
                                 .sampling = {.top_p = 1.0f},
                                 .cache_salt = (uint64_t)i + 1};
            if ((rc = sched_submit(s, &r)) != 0) {
                fprintf(stderr, "bench_kvq: %s: submit failed: %s\n", k->name, kvs_strerror(rc));
                err = -1;
            }
        }
        if (!err)
            err = step_all(s, &w1, NULL, NULL, NULL, NULL);
        res->preemptions += w1.preemptions;
        res->prime_s = (double)(kvs_now_ns() - t_start) / 1e9;
        memset(seen, 0, n);
    }
    /* The measured wave: every session at once, to full length. */
    wave_t w = {.id0 = n,
                .n = n,
                .want_tokens = o->decode,
                .want_cached = prime ? cached : 0,
                .seen = seen};
    for (uint32_t i = 0; i < n && !err; i++) {
        sched_request_t r = {.id = (uint64_t)n + i,
                             .prompt = prompts + (size_t)i * P,
                             .n_prompt = P,
                             .max_tokens = o->decode,
                             .ignore_eos = true,
                             .sampling = {.top_p = 1.0f},
                             .cache_salt = (uint64_t)i + 1};
        if ((rc = sched_submit(s, &r)) != 0) {
            fprintf(stderr, "bench_kvq: %s: submit failed: %s\n", k->name, kvs_strerror(rc));
            err = -1;
        }
    }
    uint64_t t_all = 0, tok_all = 0, steps_all = 0, t1 = kvs_now_ns();
    if (!err)
        err = step_all(s, &w, &res->peak, &t_all, &tok_all, &steps_all);
    uint64_t t_end = kvs_now_ns();
    if (!err) {
        sched_load_t ld;
        sched_get_load(s, &ld);
        kv_prefix_stats_t ps;
        kv_pool_prefix_stats(sched_pool(s), &ps);
        res->preemptions += w.preemptions;
        res->cached_short = w.cached_short;
        res->evictions = ps.evictions;
        res->sealed = ld.blocks_sealed;
        res->decode_tokens = w.tokens - tok_all;
        res->decode_steps = ld.steps - steps_all;
        res->decode_s = (double)(t_end - t_all) / 1e9;
        res->decode_tok_s = res->decode_s > 0 ? (double)res->decode_tokens / res->decode_s : 0;
        res->run_s = (double)(t_end - t1) / 1e9;
    }
    free(prompts);
    free(seen);
    sched_free(s);
    return err;
}

/* Fits, runs, and steps N down while a run does not verify. */
static int
measure(model_t *m, const opts_t *o, const kind_t *k, result_t *res)
{
    *res = (result_t){.kind = k};
    uint32_t n;
    uint32_t hd = model_hparams(m)->head_dim;
    if (k->quant != KERN_KVQ_NONE && (kern_kvq_tile_bytes(k->quant, false, o->bt, hd) == 0 ||
                                      kern_kvq_tile_bytes(k->quant, true, o->bt, hd) == 0)) {
        fprintf(stderr, "bench_kvq: %s cannot store blocks of %u tokens x %u channels\n", k->name,
                o->bt, hd);
        return -1;
    }
    int rc = find_n(m, o, k->quant, &n, &res->g);
    if (rc) {
        fprintf(stderr, "bench_kvq: %s: cannot build the engine: %s\n", k->name, kvs_strerror(rc));
        return -1;
    }
    res->fit = n;
    const geom_t *g = &res->g;
    if (n == 0) {
        fprintf(stderr,
                "bench_kvq: %s: not one session of %u tokens fits in %llu bytes: it needs %u "
                "full-precision blocks (+%u staging) of %u and %u quantized of %u\n",
                k->name, o->length, (unsigned long long)o->memory, g->hot_per, g->stage, g->n_hot,
                g->cold_per, g->n_cold);
        return 0;
    }
    for (uint32_t a = 0; a < MAX_ATTEMPTS && n > 0; a++, n--) {
        if (a > 0 && (rc = probe(m, o, k->quant, n, &res->g)) != 0) {
            fprintf(stderr, "bench_kvq: %s: cannot build the engine: %s\n", k->name,
                    kvs_strerror(rc));
            return -1;
        }
        fprintf(stderr,
                "bench_kvq: %s: %u sessions in %u blocks (%u full precision + %u quantized)...",
                k->name, n, g->n_blocks, g->n_hot, g->n_cold);
        fflush(stderr);
        res->n = n;
        res->attempts = a + 1;
        if (run(m, o, k, n, res))
            return -1;
        res->sealed_expected = (uint64_t)n * g->cold_per;
        fprintf(stderr, " %.1f s: peak %u running, %u preemptions, %llu evictions\n",
                res->prime_s + res->run_s, res->peak, res->preemptions,
                (unsigned long long)res->evictions);
        /* Without priming the peak is what staggered admission allows. */
        res->verified = res->preemptions == 0 && res->evictions == 0 && res->cached_short == 0 &&
                        (res->peak == n || !o->prime);
        if (res->verified)
            return 0;
    }
    fprintf(stderr, "bench_kvq: %s: no run verified after %u attempts\n", k->name, res->attempts);
    return 0;
}

static int
parse_u32(const char *flag, const char *s, uint32_t lo, uint32_t hi, uint32_t *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = s && *s >= '0' && *s <= '9' ? strtoull(s, &end, 10) : 0;
    if (end == NULL || errno || *end != '\0' || v < lo || v > hi) {
        fprintf(stderr, "bench_kvq: %s: expected an integer in [%u, %u], got '%s'\n", flag, lo, hi,
                s ? s : "");
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

/* Bytes, with an optional K, M or G (KiB, MiB, GiB) suffix. */
static int
parse_size(const char *flag, const char *s, uint64_t *out)
{
    char *end = NULL;
    errno = 0;
    unsigned long long v = s && *s >= '0' && *s <= '9' ? strtoull(s, &end, 10) : 0;
    uint64_t mul = 1;
    if (end && (*end == 'k' || *end == 'K'))
        mul = 1ull << 10;
    else if (end && (*end == 'm' || *end == 'M'))
        mul = 1ull << 20;
    else if (end && (*end == 'g' || *end == 'G'))
        mul = 1ull << 30;
    if (end && mul > 1 && *++end == 'i')
        end++;
    if (end && *end == 'B')
        end++;
    if (end == NULL || errno || *end != '\0' || v == 0 || v > UINT64_MAX / mul) {
        fprintf(stderr, "bench_kvq: %s: expected a positive size (e.g. 67108864, 64M), got '%s'\n",
                flag, s ? s : "");
        return -1;
    }
    *out = (uint64_t)v * mul;
    return 0;
}

static void
usage(void)
{
    fprintf(stderr, "usage: bench_kvq [--model F.gguf] [--threads N] [--kv-memory 64M] "
                    "[--length 2048] [--decode 32]\n"
                    "                 [--dtypes f16,bf16,q8_0,fp8,q4] [--sinks 4] "
                    "[--block-size 16]\n"
                    "                 [--max-num-batched-tokens 512] [--no-prime] "
                    "[--json FILE]\n");
}

static void
write_json(FILE *f, const opts_t *o, const result_t *res, uint32_t n_res, const result_t *base)
{
    time_t now = time(NULL);
    char date[32] = "";
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", gmtime(&now));
    fprintf(f,
            "{\"bench\": \"kvq\", \"model\": \"%s\", \"date\": %lld, \"date_utc\": \"%s\", "
            "\"kv_memory_bytes\": %llu, \"length\": %u, \"prompt_tokens\": %u, "
            "\"decode_tokens\": %u, \"block_tokens\": %u, \"sink_tokens\": %u, "
            "\"max_num_batched_tokens\": %u, \"threads\": %u, \"primed\": %s, "
            "\"baseline\": \"%s\", \"runs\": [",
            o->model, (long long)now, date, (unsigned long long)o->memory, o->length,
            o->length - o->decode, o->decode, o->bt, o->sinks, o->mnbt, o->threads,
            o->prime ? "true" : "false", base->kind->name);
    for (uint32_t i = 0; i < n_res; i++) {
        const result_t *r = &res[i];
        const geom_t *g = &r->g;
        bool quant = r->kind->quant != KERN_KVQ_NONE;
        size_t vb = quant ? g->qblock_bytes : g->block_bytes;
        size_t per = (size_t)g->hot_per * g->block_bytes + (size_t)g->cold_per * g->qblock_bytes;
        fprintf(f,
                "%s{\"dtype\": \"%s\", \"sessions\": %u, \"sessions_fit\": %u, \"attempts\": %u, "
                "\"verified\": %s, \"ratio_sessions\": %.4f, \"bits_per_value\": %.4f, "
                "\"n_blocks\": %u, \"hot_blocks\": %u, \"quant_blocks\": %u, "
                "\"block_bytes\": %zu, \"quant_block_bytes\": %zu, "
                "\"hot_blocks_per_session\": %u, \"quant_blocks_per_session\": %u, "
                "\"kv_bytes_per_session\": %zu, \"memory_per_session\": %.1f, "
                "\"decode_tok_s\": %.3f, \"ratio_decode\": %.4f, \"decode_tokens\": %llu, "
                "\"decode_steps\": %llu, \"decode_s\": %.4f, \"prime_s\": %.3f, \"run_s\": %.3f, "
                "\"preemptions\": %u, \"peak_running\": %u, \"evictions\": %llu, "
                "\"blocks_sealed\": %llu, \"blocks_sealed_expected\": %llu}",
                i ? ", " : "", r->kind->name, r->n, r->fit, r->attempts,
                r->verified ? "true" : "false", base->n ? (double)r->n / base->n : 0,
                (double)vb * 8 / (double)(g->block_values ? g->block_values : 1), g->n_blocks,
                g->n_hot, g->n_cold, g->block_bytes, g->qblock_bytes, g->hot_per, g->cold_per, per,
                r->n ? (double)o->memory / r->n : 0, r->decode_tok_s,
                base->decode_tok_s > 0 ? r->decode_tok_s / base->decode_tok_s : 0,
                (unsigned long long)r->decode_tokens, (unsigned long long)r->decode_steps,
                r->decode_s, r->prime_s, r->run_s, r->preemptions, r->peak,
                (unsigned long long)r->evictions, (unsigned long long)r->sealed,
                (unsigned long long)r->sealed_expected);
    }
    fprintf(f, "]}\n");
}

int
main(int argc, char **argv)
{
    opts_t o = {.json = "bench/out/kvq.json",
                .length = 2048,
                .decode = 32,
                .sinks = 4,
                .bt = 16,
                .mnbt = 512,
                .memory = 64ull << 20,
                .prime = true};
    const kind_t *kinds[MAX_DTYPES];
    uint32_t n_kinds = 0;
    for (; n_kinds < sizeof KINDS / sizeof KINDS[0]; n_kinds++)
        kinds[n_kinds] = &KINDS[n_kinds];
    static const struct option lo[] = {{"model", 1, 0, 'm'},
                                       {"threads", 1, 0, 't'},
                                       {"kv-memory", 1, 0, 'k'},
                                       {"length", 1, 0, 'l'},
                                       {"decode", 1, 0, 'd'},
                                       {"dtypes", 1, 0, 'q'},
                                       {"sinks", 1, 0, 's'},
                                       {"block-size", 1, 0, 'b'},
                                       {"max-num-batched-tokens", 1, 0, 'B'},
                                       {"no-prime", 0, 0, 'P'},
                                       {"json", 1, 0, 'j'},
                                       {"help", 0, 0, 'h'},
                                       {0, 0, 0, 0}};
    int c, bad = 0;
    while (!bad && (c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (c) {
        case 'm':
            o.model = optarg;
            break;
        case 't':
            bad = parse_u32("--threads", optarg, 0, 4096, &o.threads);
            break;
        case 'k':
            bad = parse_size("--kv-memory", optarg, &o.memory);
            break;
        case 'l':
            bad = parse_u32("--length", optarg, 3, 1u << 24, &o.length);
            break;
        case 'd':
            bad = parse_u32("--decode", optarg, 2, 1u << 24, &o.decode);
            break;
        case 's':
            bad = parse_u32("--sinks", optarg, 0, 1u << 24, &o.sinks);
            break;
        case 'b':
            bad = parse_u32("--block-size", optarg, 1, 1024, &o.bt);
            if (!bad && (o.bt & (o.bt - 1))) {
                fprintf(stderr, "bench_kvq: --block-size: %u is not a power of two\n", o.bt);
                bad = -1;
            }
            break;
        case 'B':
            bad = parse_u32("--max-num-batched-tokens", optarg, 1, 1u << 20, &o.mnbt);
            break;
        case 'P':
            o.prime = false;
            break;
        case 'j':
            o.json = optarg;
            break;
        case 'q': {
            n_kinds = 0;
            char *save = NULL;
            for (char *t = strtok_r(optarg, ",", &save); t && !bad;
                 t = strtok_r(NULL, ",", &save)) {
                const kind_t *k = NULL;
                for (size_t i = 0; i < sizeof KINDS / sizeof KINDS[0]; i++)
                    if (strcmp(t, KINDS[i].name) == 0)
                        k = &KINDS[i];
                for (uint32_t i = 0; k && i < n_kinds; i++)
                    if (kinds[i] == k)
                        k = NULL; /* twice */
                if (k == NULL || n_kinds == MAX_DTYPES) {
                    fprintf(stderr,
                            "bench_kvq: --dtypes: '%s' is unknown or repeated (f16, bf16, q8_0, "
                            "fp8, q4)\n",
                            t);
                    bad = -1;
                } else {
                    kinds[n_kinds++] = k;
                }
            }
            if (!bad && n_kinds == 0) {
                fprintf(stderr, "bench_kvq: --dtypes: empty list\n");
                bad = -1;
            }
            break;
        }
        default:
            bad = -1;
        }
    }
    if (bad || optind < argc) {
        if (optind < argc && !bad)
            fprintf(stderr, "bench_kvq: unexpected argument '%s'\n", argv[optind]);
        usage();
        return 2;
    }
    if (o.decode >= o.length) {
        fprintf(stderr, "bench_kvq: --decode (%u) must be below --length (%u)\n", o.decode,
                o.length);
        return 2;
    }
    if (o.model == NULL && (o.model = srv_default_model()) == NULL) {
        fprintf(stderr, "bench_kvq: no --model given and no bundled weights/kvserve-main.gguf "
                        "found (or set KVSERVE_MODEL)\n");
        return 2;
    }
    kern_backend_t *be;
    kern_backend_cfg_t bc = {.n_threads = o.threads};
    model_t *m;
    char err[512] = "";
    int rc = kern_backend_new("cpu", &bc, &be);
    if (rc) {
        fprintf(stderr, "bench_kvq: cannot start the cpu backend: %s\n", kvs_strerror(rc));
        return 1;
    }
    if (model_load(o.model, be, &m, err, sizeof err)) {
        fprintf(stderr, "bench_kvq: cannot load %s: %s\n", o.model, err);
        kern_backend_free(be);
        return 1;
    }
    const model_hparams_t *hp = model_hparams(m);
    if (o.length > hp->n_ctx_train)
        fprintf(stderr, "bench_kvq: note: --length %u is past the model's context (%u)\n", o.length,
                hp->n_ctx_train);
    printf("model %s (%u layers, %u KV heads x %u), KV memory %.1f MiB, threads %u\n", o.model,
           hp->n_layer, hp->n_head_kv, hp->head_dim, (double)o.memory / (1 << 20), o.threads);
    printf("sessions of %u tokens (%u prompt + %u generated), blocks of %u, %u sinks exact, "
           "%u tokens a step, %s\n",
           o.length, o.length - o.decode, o.decode, o.bt, o.sinks, o.mnbt,
           o.prime ? "prompts primed through the prefix cache" : "one wave, no priming");
    fflush(stdout);

    result_t res[MAX_DTYPES] = {0};
    int status = 0;
    for (uint32_t i = 0; i < n_kinds; i++) {
        if (measure(m, &o, kinds[i], &res[i])) {
            model_free(m);
            kern_backend_free(be);
            return 1;
        }
        if (!res[i].verified)
            status = 1;
    }
    /* Ratios against f16 when it ran, else against the first dtype. */
    const result_t *base = &res[0];
    for (uint32_t i = 0; i < n_kinds; i++)
        if (res[i].kind->quant == KERN_KVQ_NONE)
            base = &res[i];
    char vs[16];
    snprintf(vs, sizeof vs, "vs %s", base->kind->name);
    printf("%-6s %8s %8s %10s %13s %8s %11s %5s %7s\n", "dtype", "sessions", vs, "bits/value",
           "decode tok/s", vs, "preemptions", "peak", "sealed");
    for (uint32_t i = 0; i < n_kinds; i++) {
        const result_t *r = &res[i];
        bool quant = r->kind->quant != KERN_KVQ_NONE;
        double bits = (double)(quant ? r->g.qblock_bytes : r->g.block_bytes) * 8 /
                      (double)(r->g.block_values ? r->g.block_values : 1);
        printf("%-6s %8u %7.2fx %10.2f %13.1f %7.2fx %11u %5u %7llu%s\n", r->kind->name, r->n,
               base->n ? (double)r->n / base->n : 0, bits, r->decode_tok_s,
               base->decode_tok_s > 0 ? r->decode_tok_s / base->decode_tok_s : 0, r->preemptions,
               r->peak, (unsigned long long)r->sealed,
               r->n == 0        ? "  (does not fit)"
               : !r->verified   ? "  (not verified)"
               : r->peak < r->n ? "  (never all running at once)"
                                : "");
    }
    printf("\n%-6s %13s %13s %15s %12s %12s %8s\n", "dtype", "hot+quant", "KiB/block",
           "blocks/session", "KiB/session", "KiB/(mem/N)", "fit");
    for (uint32_t i = 0; i < n_kinds; i++) {
        const result_t *r = &res[i];
        const geom_t *g = &r->g;
        size_t per = (size_t)g->hot_per * g->block_bytes + (size_t)g->cold_per * g->qblock_bytes;
        char blocks[32], kib[32], sess[32];
        snprintf(blocks, sizeof blocks, "%u+%u", g->n_hot, g->n_cold);
        snprintf(kib, sizeof kib, "%.1f/%.1f", g->block_bytes / 1024.0, g->qblock_bytes / 1024.0);
        snprintf(sess, sizeof sess, "%u+%u", g->hot_per, g->cold_per);
        printf("%-6s %13s %13s %15s %12.1f %12.1f %8u\n", r->kind->name, blocks, kib, sess,
               per / 1024.0, r->n ? (double)o.memory / r->n / 1024.0 : 0, r->fit);
    }
    printf("decode tok/s: all sessions' tokens from the step in which the last one got its first "
           "token until all finished\n");
    if (o.json) {
        FILE *f = fopen(o.json, "w");
        if (f == NULL) {
            fprintf(stderr, "bench_kvq: cannot write %s: %s\n", o.json, strerror(errno));
            status = 1;
        } else {
            write_json(f, &o, res, n_kinds, base);
            if (fclose(f) != 0) {
                fprintf(stderr, "bench_kvq: cannot write %s\n", o.json);
                status = 1;
            }
            printf("json: %s\n", o.json);
        }
    }
    model_free(m);
    kern_backend_free(be);
    return status;
}
