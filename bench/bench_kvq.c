/*
 * bench/bench_kvq.c — what quantized KV and KV policies buy in capacity:
 * how many concurrent sessions of --length tokens (prompt + generated) fit
 * AND run in a fixed KV memory for each KV dtype (f16, bf16, q8_0, fp8,
 * q4) and for each KV policy (sink eviction, SnapKV) combined with some of
 * those dtypes, as a ratio to f16, and the aggregate decode tok/s with
 * that many sessions, all measured in one run through the engine
 * (sched_step).
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
 * Policy rows (--policies, each with every dtype of --policy-dtypes): the
 * same sessions with sched_request_t.kv set, sinks = --sinks.
 *   sink-eviction:B  StreamingLLM: after each step a sequence holding more
 *                    than B entries drops whole middle blocks down to B.  A
 *                    session holds at most B + one block while decoding and
 *                    B + its prefill chunk (at most --max-num-batched-tokens)
 *                    + a block while prefilling.
 *   snapkv:B         the whole prompt while it is prefilled, compacted to B
 *                    entries per layer and KV head at its end (the compacted
 *                    copy is written next to the prompt, then the prompt is
 *                    released), then B + the generated tokens.
 * With a codec the full blocks past the sinks are sealed as for the dtype
 * rows (the prefill chunks are the engine's full-precision staging), so
 * the counts above are split into full-precision and quantized blocks the
 * same way.  N is fitted from the pool geometry as for the dtype rows,
 * with N - 1 sessions at their largest decoding size and one in its
 * prefill transient (or all N at their largest decoding size, if more).
 * Compressed KV is never put in the prefix cache, so priming cannot make
 * the sessions overlap: a policy row runs one wave (prefix cache off) and
 * splits the session into a prompt and a decode long enough that the
 * first session is still decoding when the last one has finished its
 * prefill.  Prefilling all N prompts takes about N * prompt / (T - (N -
 * 1)) steps, T = --max-num-batched-tokens (decodes are served first, so
 * up to N - 1 of them take tokens from the prefill chunks every step: with
 * N a sizeable fraction of T, N * prompt / T would be too few), each step gives
 * each running session one token, so decode = that many steps + 32 and
 * prompt = length - decode (the smallest such decode: the longest prompt);
 * SnapKV's prompt is kept above its budget.  When no split of the session
 * length allows that, the row runs with the longest decode it can and
 * reports the peak it reached ("never all running at once"), as --no-prime
 * does.  Verified: zero preemptions, all finished normally, peak running
 * == N (where the split allows); N - 1 is tried otherwise.  Sessions whose
 * policy dropped less than it should (kv_dropped_tokens below length - 1 -
 * B for eviction, prompt - B for SnapKV: e.g. a compaction that found too
 * few free blocks keeps the prompt whole) are counted and
 * flagged.
 *
 *   bench_kvq [--model F.gguf] [--threads N] [--kv-memory 64M] [--length 2048]
 *             [--decode 32] [--dtypes f16,bf16,q8_0,fp8,q4] [--sinks 4]
 *             [--block-size 16] [--max-num-batched-tokens 512] [--no-prime]
 *             [--policies sink-eviction:512,snapkv:512|none]
 *             [--policy-dtypes f16,q4] [--json FILE]
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
#define MAX_POLICIES 8
#define MAX_ATTEMPTS 4    /* the fitted N, then up to three smaller ones */
#define OVERLAP_MARGIN 32 /* decode steps the first session has left after the last prefill */

typedef struct kind {
    const char *name;
    kern_kvq_t quant;
} kind_t;

typedef struct policy {
    sched_kv_kind_t kind; /* SCHED_KV_SINK_EVICTION or SCHED_KV_SNAPKV */
    uint32_t budget;
} policy_t;

typedef struct opts {
    const char *model, *json;
    uint32_t threads, length, decode, sinks, bt, mnbt;
    uint64_t memory;
    bool prime;
    policy_t policies[MAX_POLICIES];
    uint32_t n_policies;
    const kind_t *pkinds[MAX_DTYPES]; /* --policy-dtypes */
    uint32_t n_pkinds;
} opts_t;

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

/* What one session of a policy row holds, in blocks of each kind (without
 * a codec all are "hot"): at most while decoding, and in its prefill
 * transient (eviction: the budget and a chunk; SnapKV: the prompt and its
 * compacted copy, with a codec both quantized but for their sinks' and
 * tail blocks).  With a codec the prefill chunks (and the block SnapKV's
 * copy is staged through) are the engine's staging. */
typedef struct pneed {
    uint32_t hot, cold;     /* decoding, at most */
    uint32_t x_hot, x_cold; /* prefilling, at most */
} pneed_t;

typedef struct result {
    const kind_t *kind;
    const policy_t *pol; /* NULL: a dtype row */
    uint32_t fit, n, attempts;
    uint32_t prompt, decode; /* tokens per session */
    bool overlap;            /* the split lets all N run at once (dtype rows: true) */
    geom_t g;
    pneed_t need; /* policy rows */
    double decode_tok_s, decode_s, prime_s, run_s;
    uint64_t decode_tokens, decode_steps, sealed, sealed_expected, evictions;
    uint64_t dropped, dropped_min, compressions; /* KV the policy let go, summed */
    uint32_t preemptions, peak, cached_short, policy_short;
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

static uint64_t
blocks_of(uint64_t tokens, uint32_t bt)
{
    return (tokens + bt - 1) / bt;
}

/* The shortest decode (so the longest prompt) with which the first of n
 * sessions is still decoding when the last has finished its prefill:
 * decode >= n * prompt / (T - (n - 1)) steps + OVERLAP_MARGIN (T: tokens a
 * step, of which up to n - 1 go to decodes), prompt = length - decode.
 * SnapKV's prompt stays above its budget (when the length allows it), so
 * that there is something to compress.  Returns false when no split does,
 * with *decode the longest one. */
static bool
overlap_split(const opts_t *o, const policy_t *p, uint32_t n, uint32_t *decode)
{
    const uint32_t L = o->length;
    uint32_t min_prompt = 1;
    if (p->kind == SCHED_KV_SNAPKV && (uint64_t)p->budget + 3 <= L)
        min_prompt = p->budget + 1;
    const uint32_t dmax = L - min_prompt; /* >= 2 */
    const int64_t eff = (int64_t)o->mnbt - ((int64_t)n - 1);
    *decode = dmax;
    if (eff <= 0)
        return false;
#define OVERLAPS(d)   \
    ((uint64_t)(d) >= \
     ((uint64_t)n * (L - (d)) + (uint64_t)eff - 1) / (uint64_t)eff + OVERLAP_MARGIN)
    if (!OVERLAPS(dmax))
        return false;
    uint32_t lo = 2, hi = dmax; /* the smallest d that overlaps is in [lo, hi] */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (OVERLAPS(mid))
            hi = mid;
        else
            lo = mid + 1;
    }
#undef OVERLAPS
    *decode = lo;
    return true;
}

/* What one session of policy p holds (see pneed_t), for this split.  KV
 * entries written: prompt + decode - 1 (the last sampled token never is). */
static void
policy_need(const opts_t *o, kern_kvq_t q, const policy_t *p, uint32_t prompt, uint32_t decode,
            pneed_t *nd)
{
    const uint32_t bt = o->bt;
    const uint64_t kv = (uint64_t)prompt + decode - 1;
    uint64_t held, x_held; /* entries: decoding (after a step's append), prefilling */
    uint32_t x_extra = 0;  /* blocks on top of x_held's */
    if (p->kind == SCHED_KV_SINK_EVICTION) {
        /* Evicted down to the budget after each step, then one step's
         * tokens appended: one while decoding, a chunk while prefilling. */
        uint64_t chunk = prompt < o->mnbt ? prompt : o->mnbt;
        held = (uint64_t)p->budget + bt < kv ? (uint64_t)p->budget + bt : kv;
        x_held = (uint64_t)p->budget + chunk;
        if (x_held < kv)
            x_extra = 1; /* a block of slack, as sched_submit counts */
        else
            x_held = kv;
        if (q != KERN_KVQ_NONE) {
            /* Sealed after the eviction: at most the budget's full blocks
             * past the sinks are quantized; the chunks are staging. */
            held = x_held = p->budget < kv ? p->budget : kv;
            x_extra = 0;
        }
    } else {
        uint64_t kept = prompt > p->budget ? p->budget : prompt;
        held = kept + decode - 1;
        x_held = prompt;
        if (prompt > p->budget && q == KERN_KVQ_NONE)
            x_extra = (uint32_t)blocks_of(p->budget, bt); /* the compacted copy */
    }
    if (q == KERN_KVQ_NONE) {
        *nd = (pneed_t){.hot = (uint32_t)blocks_of(held, bt),
                        .x_hot = (uint32_t)blocks_of(x_held, bt) + x_extra};
        return;
    }
    /* As session_need: the sink blocks and the tail stay full precision,
     * the full blocks between them are sealed; SnapKV's copy is written
     * so beside the prompt (kv_table_compact). */
    uint32_t sb = (uint32_t)blocks_of(o->sinks, bt);
    uint32_t full = (uint32_t)(held / bt), x_full = (uint32_t)(x_held / bt);
    uint32_t copy = 0;
    if (p->kind == SCHED_KV_SNAPKV && prompt > p->budget && p->budget / bt > sb)
        copy = p->budget / bt - sb;
    *nd = (pneed_t){.hot = sb + 1,
                    .x_hot = sb + 1,
                    .cold = full > sb ? full - sb : 0,
                    .x_cold = (x_full > sb ? x_full - sb : 0) + copy};
}

/* n sessions of a policy row: n - 1 decoding and one prefilling, or all n
 * decoding, whichever holds more; with a codec plus the staging. */
static bool
pfits(const geom_t *g, const pneed_t *nd, uint32_t n)
{
    uint64_t hot = (uint64_t)n * nd->hot, cold = (uint64_t)n * nd->cold;
    uint64_t x_hot = (uint64_t)(n - 1) * nd->hot + nd->x_hot;
    uint64_t x_cold = (uint64_t)(n - 1) * nd->cold + nd->x_cold;
    hot = (hot > x_hot ? hot : x_hot) + g->stage;
    cold = cold > x_cold ? cold : x_cold;
    return n > 0 && hot <= g->n_hot && cold <= g->n_cold;
}

/* A policy row's split and need for n sessions. */
static void
policy_plan(const opts_t *o, kern_kvq_t q, const policy_t *p, uint32_t n, result_t *r)
{
    r->overlap = overlap_split(o, p, n, &r->decode);
    r->prompt = o->length - r->decode;
    policy_need(o, q, p, r->prompt, r->decode, &r->need);
}

static bool
row_fits(const opts_t *o, kern_kvq_t q, const policy_t *p, const geom_t *g, uint32_t n)
{
    if (p == NULL)
        return fits(g, n);
    result_t r = {0};
    policy_plan(o, q, p, n, &r);
    return pfits(g, &r.need, n);
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

/* The largest n that fits (row_fits: p NULL for a dtype row), by
 * bisection over engines built for it (the hot staging, and so the
 * quantized remainder, depends on n; a policy row's split too).  *n = 0
 * when not even one session fits; *g is then the one-session pool. */
static int
find_n(model_t *m, const opts_t *o, kern_kvq_t q, const policy_t *p, uint32_t *n, geom_t *g)
{
    int rc = probe(m, o, q, 1, g);
    if (rc || !row_fits(o, q, p, g, 1)) {
        *n = 0;
        return rc;
    }
    size_t per = (size_t)g->hot_per * g->block_bytes + (size_t)g->cold_per * g->qblock_bytes;
    if (p) {
        result_t r = {0};
        policy_plan(o, q, p, 1, &r);
        per = (size_t)r.need.hot * g->block_bytes + (size_t)r.need.cold * g->qblock_bytes;
    }
    uint64_t hi = o->memory / (per ? per : 1) + 2;
    uint32_t lo = 1;
    geom_t gh;
    for (;;) { /* hi must not fit */
        if (hi > UINT32_MAX / 2)
            return KVS_ERANGE;
        rc = probe(m, o, q, (uint32_t)hi, &gh);
        if (rc)
            return rc;
        if (!row_fits(o, q, p, &gh, (uint32_t)hi))
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
        if (row_fits(o, q, p, &gh, mid)) {
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
    uint64_t want_dropped; /* KV entries each session's policy must let go, at least */
    uint8_t *seen;         /* [n]: got its first token */
    uint32_t first, finished, preemptions, cached_short, policy_short;
    uint64_t tokens, dropped;
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
            w->dropped += ev->usage.kv_dropped_tokens;
            if (ev->usage.kv_dropped_tokens < w->want_dropped)
                w->policy_short++;
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

/* The label of a row: "q4", "q4 + snapkv 512". */
static void
row_name(const result_t *r, char *buf, size_t size)
{
    if (r->pol)
        snprintf(buf, size, "%s + %s %u", r->kind->name, srv_kv_policy_name(r->pol->kind),
                 r->pol->budget);
    else
        snprintf(buf, size, "%s", r->kind->name);
}

/* N sessions of one row (res->prompt + res->decode tokens each; a policy
 * row: with its KV policy, one wave), from submission to the last finish. */
static int
run(model_t *m, const opts_t *o, const kind_t *k, const policy_t *pol, uint32_t n, result_t *res)
{
    const uint32_t P = res->prompt, D = res->decode, bt = o->bt;
    const uint32_t cached = (P - 1) / bt * bt; /* what a re-submission can find cached */
    const bool prime = pol == NULL && o->prime && cached > 0;
    sched_kv_policy_t kv = {0};
    uint64_t want_dropped = 0;
    if (pol) {
        kv = (sched_kv_policy_t){.kind = pol->kind, .budget_tokens = pol->budget};
        if (pol->kind == SCHED_KV_SINK_EVICTION) {
            uint64_t written = (uint64_t)P + D - 1;
            kv.sinks = o->sinks;
            want_dropped = written > pol->budget ? written - pol->budget : 0;
        } else {
            want_dropped = P > pol->budget ? P - pol->budget : 0;
        }
    }
    char name[64];
    row_name(res, name, sizeof name);
    uint32_t nv = model_hparams(m)->n_vocab;
    nv = nv < 256 ? nv : 256;
    sched_cfg_t cfg = make_cfg(o, k->quant, n, prime);
    sched_t *s;
    int rc = sched_new(m, &cfg, &s);
    if (rc) {
        fprintf(stderr, "bench_kvq: %s: cannot build the engine for %u sessions: %s\n", name, n,
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
    res->preemptions = res->peak = res->cached_short = res->policy_short = 0;
    res->evictions = res->sealed = res->dropped = res->compressions = 0;
    res->dropped_min = want_dropped * n;
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
                fprintf(stderr, "bench_kvq: %s: submit failed: %s\n", name, kvs_strerror(rc));
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
                .want_tokens = D,
                .want_cached = prime ? cached : 0,
                .want_dropped = want_dropped,
                .seen = seen};
    for (uint32_t i = 0; i < n && !err; i++) {
        sched_request_t r = {.id = (uint64_t)n + i,
                             .prompt = prompts + (size_t)i * P,
                             .n_prompt = P,
                             .max_tokens = D,
                             .ignore_eos = true,
                             .sampling = {.top_p = 1.0f},
                             .cache_salt = (uint64_t)i + 1,
                             .kv = kv};
        if ((rc = sched_submit(s, &r)) != 0) {
            fprintf(stderr, "bench_kvq: %s: submit failed: %s\n", name, kvs_strerror(rc));
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
        res->policy_short = w.policy_short;
        res->dropped = w.dropped;
        res->compressions = ld.snapkv_compressions;
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

/* Fits, runs, and steps N down while a run does not verify.  pol: NULL
 * for a dtype row. */
static int
measure(model_t *m, const opts_t *o, const kind_t *k, const policy_t *pol, result_t *res)
{
    *res = (result_t){.kind = k,
                      .pol = pol,
                      .overlap = true,
                      .prompt = o->length - o->decode,
                      .decode = o->decode};
    char name[64];
    row_name(res, name, sizeof name);
    uint32_t n;
    uint32_t hd = model_hparams(m)->head_dim;
    if (k->quant != KERN_KVQ_NONE && (kern_kvq_tile_bytes(k->quant, false, o->bt, hd) == 0 ||
                                      kern_kvq_tile_bytes(k->quant, true, o->bt, hd) == 0)) {
        fprintf(stderr, "bench_kvq: %s cannot store blocks of %u tokens x %u channels\n", k->name,
                o->bt, hd);
        return -1;
    }
    int rc = find_n(m, o, k->quant, pol, &n, &res->g);
    if (rc) {
        fprintf(stderr, "bench_kvq: %s: cannot build the engine: %s\n", name, kvs_strerror(rc));
        return -1;
    }
    res->fit = n;
    const geom_t *g = &res->g;
    if (n == 0) {
        if (pol) {
            policy_plan(o, k->quant, pol, 1, res);
            fprintf(stderr,
                    "bench_kvq: %s: not one session of %u tokens fits in %llu bytes: it needs %u "
                    "full-precision blocks (%u prefilling, +%u staging) of %u and %u quantized "
                    "(%u prefilling) of %u\n",
                    name, o->length, (unsigned long long)o->memory, res->need.hot, res->need.x_hot,
                    g->stage, g->n_hot, res->need.cold, res->need.x_cold, g->n_cold);
            return 0;
        }
        fprintf(stderr,
                "bench_kvq: %s: not one session of %u tokens fits in %llu bytes: it needs %u "
                "full-precision blocks (+%u staging) of %u and %u quantized of %u\n",
                k->name, o->length, (unsigned long long)o->memory, g->hot_per, g->stage, g->n_hot,
                g->cold_per, g->n_cold);
        return 0;
    }
    for (uint32_t a = 0; a < MAX_ATTEMPTS && n > 0; a++, n--) {
        if (a > 0 && (rc = probe(m, o, k->quant, n, &res->g)) != 0) {
            fprintf(stderr, "bench_kvq: %s: cannot build the engine: %s\n", name, kvs_strerror(rc));
            return -1;
        }
        if (pol)
            policy_plan(o, k->quant, pol, n, res);
        fprintf(stderr,
                "bench_kvq: %s: %u sessions (%u + %u tokens) in %u blocks (%u full precision + %u "
                "quantized)...",
                name, n, res->prompt, res->decode, g->n_blocks, g->n_hot, g->n_cold);
        fflush(stderr);
        res->n = n;
        res->attempts = a + 1;
        if (run(m, o, k, pol, n, res))
            return -1;
        res->sealed_expected = pol ? 0 : (uint64_t)n * g->cold_per;
        fprintf(stderr, " %.1f s: peak %u running, %u preemptions, %llu evictions",
                res->prime_s + res->run_s, res->peak, res->preemptions,
                (unsigned long long)res->evictions);
        if (pol)
            fprintf(stderr, ", %llu KV entries dropped (%u sessions short)",
                    (unsigned long long)res->dropped, res->policy_short);
        fprintf(stderr, "\n");
        /* Without priming (or an overlapping split) the peak is what
         * staggered admission allows. */
        bool all_at_once = pol ? res->overlap : o->prime;
        res->verified = res->preemptions == 0 && res->evictions == 0 && res->cached_short == 0 &&
                        (res->peak == n || !all_at_once);
        if (res->verified)
            return 0;
    }
    fprintf(stderr, "bench_kvq: %s: no run verified after %u attempts\n", name, res->attempts);
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
                    "                 [--max-num-batched-tokens 512] [--no-prime]\n"
                    "                 [--policies sink-eviction:512,snapkv:512|none] "
                    "[--policy-dtypes f16,q4]\n"
                    "                 [--json FILE]\n");
}

/* A comma-separated list of distinct dtypes into kinds[]. */
static int
parse_kinds(const char *flag, char *arg, const kind_t **kinds, uint32_t *n_kinds)
{
    *n_kinds = 0;
    char *save = NULL;
    for (char *t = strtok_r(arg, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        const kind_t *k = NULL;
        for (size_t i = 0; i < sizeof KINDS / sizeof KINDS[0]; i++)
            if (strcmp(t, KINDS[i].name) == 0)
                k = &KINDS[i];
        for (uint32_t i = 0; k && i < *n_kinds; i++)
            if (kinds[i] == k)
                k = NULL; /* twice */
        if (k == NULL || *n_kinds == MAX_DTYPES) {
            fprintf(stderr,
                    "bench_kvq: %s: '%s' is unknown or repeated (f16, bf16, q8_0, fp8, q4)\n", flag,
                    t);
            return -1;
        }
        kinds[(*n_kinds)++] = k;
    }
    if (*n_kinds == 0) {
        fprintf(stderr, "bench_kvq: %s: empty list\n", flag);
        return -1;
    }
    return 0;
}

/* "none", or a comma-separated list of sink-eviction:BUDGET and
 * snapkv:BUDGET. */
static int
parse_policies(char *arg, opts_t *o)
{
    o->n_policies = 0;
    if (strcmp(arg, "none") == 0)
        return 0;
    char *save = NULL;
    for (char *t = strtok_r(arg, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        char *colon = strchr(t, ':');
        policy_t p = {0};
        if (colon)
            *colon = '\0';
        for (int k = SCHED_KV_SINK_EVICTION; k <= SCHED_KV_SNAPKV; k++)
            if (strcmp(t, srv_kv_policy_name((sched_kv_kind_t)k)) == 0)
                p.kind = (sched_kv_kind_t)k;
        if (p.kind == SCHED_KV_FULL || colon == NULL || o->n_policies == MAX_POLICIES) {
            fprintf(stderr,
                    "bench_kvq: --policies: '%s' is not sink-eviction:BUDGET or snapkv:BUDGET "
                    "(or too many: %d at most)\n",
                    t, MAX_POLICIES);
            return -1;
        }
        if (parse_u32("--policies budget", colon + 1, 1, 1u << 24, &p.budget))
            return -1;
        for (uint32_t i = 0; i < o->n_policies; i++)
            if (o->policies[i].kind == p.kind && o->policies[i].budget == p.budget) {
                fprintf(stderr, "bench_kvq: --policies: %s:%u is repeated\n", t, p.budget);
                return -1;
            }
        o->policies[o->n_policies++] = p;
    }
    if (o->n_policies == 0) {
        fprintf(stderr, "bench_kvq: --policies: empty list (none: no policy rows)\n");
        return -1;
    }
    return 0;
}

static void
write_json(FILE *f, const opts_t *o, const result_t *res, uint32_t n_res, const result_t *pres,
           uint32_t n_pres, const result_t *base)
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
    /* Policy rows: sessions of prompt_tokens + generated_tokens (their own
     * split), decode_tokens/decode_steps/decode_s: the timed window, as
     * in runs.  Blocks per session: decoding at most, and prefilling. */
    fprintf(f, "], \"policies\": [");
    for (uint32_t i = 0; i < n_pres; i++) {
        const result_t *r = &pres[i];
        const geom_t *g = &r->g;
        const pneed_t *nd = &r->need;
        size_t per = (size_t)nd->hot * g->block_bytes + (size_t)nd->cold * g->qblock_bytes;
        size_t x_per = (size_t)nd->x_hot * g->block_bytes + (size_t)nd->x_cold * g->qblock_bytes;
        fprintf(f,
                "%s{\"dtype\": \"%s\", \"policy\": \"%s\", \"budget_tokens\": %u, "
                "\"sinks\": %u, \"sessions\": %u, \"sessions_fit\": %u, \"attempts\": %u, "
                "\"verified\": %s, \"all_at_once_possible\": %s, \"ratio_sessions\": %.4f, "
                "\"prompt_tokens\": %u, \"generated_tokens\": %u, "
                "\"n_blocks\": %u, \"hot_blocks\": %u, \"quant_blocks\": %u, "
                "\"staging_blocks\": %u, \"block_bytes\": %zu, \"quant_block_bytes\": %zu, "
                "\"hot_blocks_per_session\": %u, \"quant_blocks_per_session\": %u, "
                "\"prefill_hot_blocks_per_session\": %u, "
                "\"prefill_quant_blocks_per_session\": %u, "
                "\"kv_bytes_per_session\": %zu, \"prefill_kv_bytes_per_session\": %zu, "
                "\"memory_per_session\": %.1f, "
                "\"decode_tok_s\": %.3f, \"ratio_decode\": %.4f, \"decode_tokens\": %llu, "
                "\"decode_steps\": %llu, \"decode_s\": %.4f, \"run_s\": %.3f, "
                "\"preemptions\": %u, \"peak_running\": %u, \"evictions\": %llu, "
                "\"kv_dropped_tokens\": %llu, \"kv_dropped_tokens_min\": %llu, "
                "\"sessions_policy_short\": %u, \"snapkv_compressions\": %llu, "
                "\"blocks_sealed\": %llu}",
                i ? ", " : "", r->kind->name, srv_kv_policy_name(r->pol->kind), r->pol->budget,
                o->sinks, r->n, r->fit, r->attempts, r->verified ? "true" : "false",
                r->overlap ? "true" : "false", base->n ? (double)r->n / base->n : 0, r->prompt,
                r->decode, g->n_blocks, g->n_hot, g->n_cold, g->stage, g->block_bytes,
                g->qblock_bytes, nd->hot, nd->cold, nd->x_hot, nd->x_cold, per, x_per,
                r->n ? (double)o->memory / r->n : 0, r->decode_tok_s,
                base->decode_tok_s > 0 ? r->decode_tok_s / base->decode_tok_s : 0,
                (unsigned long long)r->decode_tokens, (unsigned long long)r->decode_steps,
                r->decode_s, r->run_s, r->preemptions, r->peak, (unsigned long long)r->evictions,
                (unsigned long long)r->dropped, (unsigned long long)r->dropped_min, r->policy_short,
                (unsigned long long)r->compressions, (unsigned long long)r->sealed);
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
                .prime = true,
                .policies = {{SCHED_KV_SINK_EVICTION, 512}, {SCHED_KV_SNAPKV, 512}},
                .n_policies = 2,
                .pkinds = {&KINDS[0], &KINDS[4]}, /* f16, q4 */
                .n_pkinds = 2};
    const kind_t *kinds[MAX_DTYPES];
    uint32_t n_kinds = 0;
    for (; n_kinds < sizeof KINDS / sizeof KINDS[0]; n_kinds++)
        kinds[n_kinds] = &KINDS[n_kinds];
    static const struct option lo[] = {
        {"model", 1, 0, 'm'},    {"threads", 1, 0, 't'},    {"kv-memory", 1, 0, 'k'},
        {"length", 1, 0, 'l'},   {"decode", 1, 0, 'd'},     {"dtypes", 1, 0, 'q'},
        {"sinks", 1, 0, 's'},    {"block-size", 1, 0, 'b'}, {"max-num-batched-tokens", 1, 0, 'B'},
        {"no-prime", 0, 0, 'P'}, {"policies", 1, 0, 'p'},   {"policy-dtypes", 1, 0, 'Q'},
        {"json", 1, 0, 'j'},     {"help", 0, 0, 'h'},       {0, 0, 0, 0}};
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
        case 'q':
            bad = parse_kinds("--dtypes", optarg, kinds, &n_kinds);
            break;
        case 'Q':
            bad = parse_kinds("--policy-dtypes", optarg, o.pkinds, &o.n_pkinds);
            break;
        case 'p':
            bad = parse_policies(optarg, &o);
            break;
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
    /* Policies the engine refuses (a budget below the sinks' blocks plus a
     * block, SnapKV's budget within its window) fail here, not mid-run. */
    if (o.n_policies) {
        sched_cfg_t cfg = make_cfg(&o, KERN_KVQ_NONE, 1, false);
        sched_t *s = NULL;
        rc = sched_new(m, &cfg, &s);
        if (rc)
            fprintf(stderr, "bench_kvq: cannot build an engine: %s\n", kvs_strerror(rc));
        for (uint32_t i = 0; rc == 0 && i < o.n_policies; i++) {
            const policy_t *p = &o.policies[i];
            sched_kv_policy_t kv = {.kind = p->kind, .budget_tokens = p->budget};
            if (p->kind == SCHED_KV_SINK_EVICTION)
                kv.sinks = o.sinks;
            model_attn_policy_t attn = {0};
            model_spec_policy_t spec = {0};
            int prc = sched_check_policy(s, &attn, &spec, &kv);
            if (prc)
                fprintf(stderr,
                        "bench_kvq: --policies: the engine refuses %s:%u (%u sinks, blocks of "
                        "%u): %s\n",
                        srv_kv_policy_name(p->kind), p->budget, o.sinks, o.bt, kvs_strerror(prc));
            if (prc)
                rc = prc;
        }
        sched_free(s);
        if (rc) {
            model_free(m);
            kern_backend_free(be);
            return 2;
        }
    }

    result_t res[MAX_DTYPES] = {0};
    int status = 0;
    for (uint32_t i = 0; i < n_kinds; i++) {
        if (measure(m, &o, kinds[i], NULL, &res[i])) {
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
    fflush(stdout);

    /* Policy rows: each policy with each --policy-dtypes dtype. */
    result_t pres[MAX_POLICIES * MAX_DTYPES] = {{0}};
    uint32_t n_pres = 0;
    for (uint32_t i = 0; i < o.n_policies; i++)
        for (uint32_t j = 0; j < o.n_pkinds; j++, n_pres++) {
            if (measure(m, &o, o.pkinds[j], &o.policies[i], &pres[n_pres])) {
                model_free(m);
                kern_backend_free(be);
                return 1;
            }
            if (!pres[n_pres].verified)
                status = 1;
        }
    if (n_pres) {
        printf("\n%-24s %8s %8s %13s %13s %8s %11s %5s %11s\n", "dtype + policy", "sessions", vs,
               "prompt+gen", "decode tok/s", vs, "preemptions", "peak", "kv dropped");
        for (uint32_t i = 0; i < n_pres; i++) {
            const result_t *r = &pres[i];
            char name[64], split[32], flags[160] = "";
            row_name(r, name, sizeof name);
            snprintf(split, sizeof split, "%u+%u", r->prompt, r->decode);
            if (r->n == 0)
                snprintf(flags, sizeof flags, "  (does not fit)");
            else if (!r->verified)
                snprintf(flags, sizeof flags, "  (not verified)");
            else if (r->peak < r->n)
                snprintf(flags, sizeof flags, "  (never all running at once%s)",
                         r->overlap ? "" : ": no split of the length overlaps them");
            if (r->n && r->dropped_min == 0) {
                size_t l = strlen(flags);
                snprintf(flags + l, sizeof flags - l, "  (the budget holds the whole KV)");
            }
            if (r->policy_short) {
                size_t l = strlen(flags);
                snprintf(flags + l, sizeof flags - l, "  (%u sessions dropped less than %llu)",
                         r->policy_short, (unsigned long long)(r->n ? r->dropped_min / r->n : 0));
            }
            printf("%-24s %8u %7.2fx %13s %13.1f %7.2fx %11u %5u %11llu%s\n", name, r->n,
                   base->n ? (double)r->n / base->n : 0, split, r->decode_tok_s,
                   base->decode_tok_s > 0 ? r->decode_tok_s / base->decode_tok_s : 0,
                   r->preemptions, r->peak, (unsigned long long)r->dropped, flags);
        }
        printf("\n%-24s %13s %15s %15s %12s %12s %8s\n", "dtype + policy", "hot+quant",
               "blocks/session", "prefilling", "KiB/session", "KiB/(mem/N)", "fit");
        for (uint32_t i = 0; i < n_pres; i++) {
            const result_t *r = &pres[i];
            const geom_t *g = &r->g;
            const pneed_t *nd = &r->need;
            size_t per = (size_t)nd->hot * g->block_bytes + (size_t)nd->cold * g->qblock_bytes;
            char name[64], blocks[32], sess[32], pre[32];
            row_name(r, name, sizeof name);
            snprintf(blocks, sizeof blocks, "%u+%u", g->n_hot, g->n_cold);
            snprintf(sess, sizeof sess, "%u+%u", nd->hot, nd->cold);
            snprintf(pre, sizeof pre, "%u+%u", nd->x_hot, nd->x_cold);
            printf("%-24s %13s %15s %15s %12.1f %12.1f %8u\n", name, blocks, sess, pre,
                   per / 1024.0, r->n ? (double)o.memory / r->n / 1024.0 : 0, r->fit);
        }
        printf(
            "policy rows (%u sinks): one wave, prefix cache off (compressed KV is never cached, so "
            "no priming);\n"
            "  prompt+gen splits the %u tokens so the first session still decodes when the last "
            "has finished its\n"
            "  prefill: gen = N * prompt / (%u - (N - 1)) steps + %d, the rest prompt (snapkv: "
            "prompt > budget)\n"
            "  blocks/session (hot+quant): held at most while decoding (sink-eviction: budget + "
            "a block; snapkv:\n"
            "  budget + generated); prefilling: at most while prefilled (sink-eviction: budget + "
            "a chunk + a block;\n"
            "  snapkv: prompt + its compacted copy); with a codec the chunks are in the "
            "engine's staging,\n"
            "  the rest (the copy too) sealed; fit: N - 1 decoding + 1 prefilling (or N decoding) "
            "in the pool built for N\n"
            "  kv dropped: KV entries the policies let go (usage.kv_dropped_tokens), summed over "
            "the sessions;\n"
            "  decode tok/s: as above, with the row's own split (longer contexts than the dtype "
            "rows')\n",
            o.sinks, o.length, o.mnbt, OVERLAP_MARGIN);
    }
    if (o.json) {
        FILE *f = fopen(o.json, "w");
        if (f == NULL) {
            fprintf(stderr, "bench_kvq: cannot write %s: %s\n", o.json, strerror(errno));
            status = 1;
        } else {
            write_json(f, &o, res, n_kinds, pres, n_pres, base);
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
