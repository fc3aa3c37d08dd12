/*
 * serve/srv_eval.c — `kvserve eval`: long-context retrieval accuracy of a
 * model, the way RULER and needle-in-a-haystack measure it.  For every
 * task x length x depth it builds `samples` prompts (serve/srv_tasks.c)
 * of `length` tokens of the model's vocabulary (srv_task_fit),
 * runs them through the engine with continuous batching (the same batch
 * builder, paged KV cache and forward pass as the server: prefill chunks
 * and decode tokens of different sequences share steps), decodes the
 * answer greedily and scores exact matches.  Prints a table, writes JSON
 * (--json) and an SVG heatmap (--plot).
 *
 * --scenario asks several questions about one document instead, the two
 * shared-context modes of SCBench (algorithms.md section 4.3): the
 * niah-multikey haystack with a question per key, as a conversation with
 * golden answers between turns (multi-turn) or as separate requests that
 * share the context (multi-request).  Each turn resends its whole prompt
 * with prefix caching on, as SCBench's vLLM driver does, so the share of
 * prompt tokens the cache served shows whether the context was reused or
 * recomputed, and accuracy per turn shows what a KV policy chosen for the
 * first question costs the later ones.
 */
#include "srv_int.h"

#include "model/model.h"
#include "sched/sched.h"

#include <getopt.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char eval_usage[] =
    "usage: kvserve eval [--model PATH] [--draft-model PATH] [--task "
    "passkey|niah-multikey|vt|all]\n"
    "                    [--lengths 256,512,1024] [--depths 0,0.25,0.5,0.75,1] [--samples N]\n"
    "                    [--seed S] [--threads N] [--device cpu|ref|cuda] [--max-num-seqs N]\n"
    "                    [--max-num-batched-tokens N] [--block-size N] [--sample-threads N]\n"
    "                    [--kv-cache-dtype f16|f32|bf16|q8_0|fp8|q4] [--kv-sink-tokens N]\n"
    "                    [--kv-policy full|sink-eviction|snapkv|h2o] [--kv-budget N]\n"
    "                    [--kv-evict-sinks N] [--snapkv-window N] [--h2o-recent N]\n"
    "                    [--attention dense|sink-window|delta|block-sparse] [--attn-sinks N]\n"
    "                    [--attn-window N] [--attn-top-k N] [--decode-top-k N]\n"
    "                    [--delta-gamma N] [--no-delta-tail] [--attn-last-dense]\n"
    "                    [--prefill full|speculative] [--keep-ratio R] [--look-ahead N]\n"
    "                    [--spec-chunk N] [--space-in-prompt]\n"
    "                    [--num-speculative-tokens N (0..16) [--speculative-method ngram|draft]\n"
    "                     [--prompt-lookup-max 4] [--prompt-lookup-min 2]\n"
    "                     [--speculative-disable-by-batch-size N]\n"
    "                     [--speculative-acceptance exact|rejection]]\n"
    "                    [--scenario multi-turn|multi-request]  (SCBench's shared context:\n"
    "                     one question per niah-multikey key, prefix caching on)\n"
    "                    [--json FILE] [--plot FILE.svg]\n";

#define MAX_LIST 32

typedef enum scenario {
    SCEN_NONE,
    /* Turn i resends turn i-1's prompt, its golden answer and question i. */
    SCEN_MULTI_TURN,
    /* Every question follows the context alone; the first runs before the
     * others so that they find the context cached. */
    SCEN_MULTI_REQUEST,
} scenario_t;

typedef struct eval_opts {
    const char *model, *draft, *json, *plot;
    srv_engine_opts_t eng;
    bool task_on[SRV_TASK_COUNT];
    uint32_t lengths[MAX_LIST], n_lengths;
    double depths[MAX_LIST];
    uint32_t n_depths;
    uint32_t samples;
    uint64_t seed;
    srv_kv_opts_t kv;
    srv_specdec_opts_t specdec;
    model_attn_policy_t attn;
    model_spec_policy_t spec;
    /* The answer's leading space ends the prompt instead, so the first
     * generated token (sampled from the prompt's last row, the row a sparse
     * prefill computes) is already a digit of the answer. */
    bool space_in_prompt;
    scenario_t scenario;
} eval_opts_t;

typedef struct item {
    srv_task_t task;
    uint32_t li, di; /* length and depth indices */
    int32_t *toks;
    uint32_t n_toks;
    char answer[8], got[8];            /* got: the first bytes of the generated text */
    uint32_t n_answer, n_got, got_len; /* n_got tokens, got_len bytes */
    /* Scenarios: the document and the turn (0-based) it asks, and what
     * the engine reported of its prompt. */
    uint32_t doc, turn;
    uint32_t cached_tokens, preemptions;
    uint64_t dropped_tokens;
} item_t;

/* A scenario's document: its turns are items first .. first + n_turns - 1. */
typedef struct doc {
    uint32_t first, n_turns;
    uint32_t submitted, finished;
} doc_t;

static int
parse_list_f(const char *s, double *out, uint32_t *n)
{
    char *dup = strdup(s), *save = NULL;
    *n = 0;
    for (char *t = strtok_r(dup, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        float v;
        if (*n == MAX_LIST || srv_parse_f32("eval", "--depths", t, 0.0f, 1.0f, &v)) {
            free(dup);
            return KVS_EINVAL;
        }
        out[(*n)++] = v;
    }
    free(dup);
    return *n ? 0 : KVS_EINVAL;
}

static int
parse_opts(int argc, char **argv, eval_opts_t *o)
{
    enum {
        O_MODEL = 256,
        O_DRAFT,
        O_TASK,
        O_LEN,
        O_DEP,
        O_SAMP,
        O_SEED,
        O_JSON,
        O_PLOT,
        O_SPACE,
        O_SCEN,
        O_HELP
    };
    static const struct option lo[] = {
        {"model", 1, 0, O_MODEL},
        {"draft-model", 1, 0, O_DRAFT},
        {"task", 1, 0, O_TASK},
        {"lengths", 1, 0, O_LEN},
        {"depths", 1, 0, O_DEP},
        {"samples", 1, 0, O_SAMP},
        {"seed", 1, 0, O_SEED},
        {"json", 1, 0, O_JSON},
        {"plot", 1, 0, O_PLOT},
        {"help", 0, 0, O_HELP},
        {"space-in-prompt", 0, 0, O_SPACE},
        {"scenario", 1, 0, O_SCEN},
        SRV_ATTN_LONGOPTS,
        SRV_PREFILL_LONGOPTS,
        SRV_KV_LONGOPTS,
        SRV_ENGINE_LONGOPTS,
        SRV_SPECDEC_LONGOPTS,
        {0, 0, 0, 0},
    };
    *o = (eval_opts_t){.eng = SRV_ENGINE_DEFAULT,
                       .attn = SRV_ATTN_DEFAULT,
                       .samples = 10,
                       .kv = SRV_KV_DEFAULT,
                       .seed = 1,
                       .depths = {0.0, 0.25, 0.5, 0.75, 1.0},
                       .n_depths = 5};
    bool any_task = false, other_task = false;
    opterr = 0;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        int rc = 0;
        switch (c) {
        case O_MODEL:
            o->model = optarg;
            break;
        case O_DRAFT:
            o->draft = optarg;
            break;
        case O_TASK: {
            srv_task_t t;
            if (strcmp(optarg, "all") == 0) {
                for (int i = 0; i < SRV_TASK_COUNT; i++)
                    o->task_on[i] = true;
                other_task = true;
            } else if (srv_task_parse(optarg, &t) == 0) {
                o->task_on[t] = true;
                other_task |= t != SRV_TASK_NIAH_MULTIKEY;
            } else {
                fprintf(stderr,
                        "kvserve eval: --task: '%s' is not one of passkey, "
                        "niah-multikey, vt, all\n",
                        optarg);
                rc = KVS_EINVAL;
            }
            any_task = true;
            break;
        }
        case O_LEN:
            if ((rc = srv_parse_u32_list("eval", "--lengths", optarg, 16, 1u << 24, o->lengths,
                                         MAX_LIST, &o->n_lengths)))
                fprintf(stderr, "kvserve eval: --lengths: expected up to %d numbers >= 16\n",
                        MAX_LIST);
            break;
        case O_DEP:
            if ((rc = parse_list_f(optarg, o->depths, &o->n_depths)))
                fprintf(stderr, "kvserve eval: --depths: expected numbers in [0, 1]\n");
            break;
        case O_SAMP:
            rc = srv_parse_u32("eval", "--samples", optarg, 1, 100000, &o->samples);
            break;
        case O_SEED:
            rc = srv_parse_u64("eval", "--seed", optarg, &o->seed);
            break;
        case O_JSON:
            o->json = optarg;
            break;
        case O_PLOT:
            o->plot = optarg;
            break;
        case O_SPACE:
            o->space_in_prompt = true;
            break;
        case O_SCEN:
            if (strcmp(optarg, "multi-turn") == 0)
                o->scenario = SCEN_MULTI_TURN;
            else if (strcmp(optarg, "multi-request") == 0)
                o->scenario = SCEN_MULTI_REQUEST;
            else {
                fprintf(stderr,
                        "kvserve eval: --scenario: '%s' is not one of multi-turn, "
                        "multi-request\n",
                        optarg);
                rc = KVS_EINVAL;
            }
            break;
        case O_HELP:
            fputs(eval_usage, stdout);
            exit(0);
        default:
            if ((rc = srv_attn_opt("eval", c, optarg, &o->attn)) == 1 &&
                (rc = srv_prefill_opt("eval", c, optarg, &o->spec)) == 1 &&
                (rc = srv_kv_opt("eval", c, optarg, &o->kv)) == 1 &&
                (rc = srv_engine_opt("eval", c, optarg, &o->eng)) == 1 &&
                (rc = srv_specdec_opt("eval", c, optarg, &o->specdec)) == 1) {
                fprintf(stderr, "kvserve eval: unknown or incomplete option '%s'\n%s",
                        argv[optind - 1], eval_usage);
                return KVS_EINVAL;
            }
        }
        if (rc) {
            fputs(eval_usage, stderr);
            return rc;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "kvserve eval: unexpected argument '%s'\n%s", argv[optind], eval_usage);
        return KVS_EINVAL;
    }
    if (o->scenario != SCEN_NONE) {
        /* The shared-context documents exist for niah-multikey only: its
         * haystack holds several keys to ask about, one per turn. */
        if (other_task) {
            fprintf(stderr,
                    "kvserve eval: --scenario needs --task niah-multikey (or no --task): its "
                    "haystack is the one with several keys to ask about\n%s",
                    eval_usage);
            return KVS_EINVAL;
        }
        o->task_on[SRV_TASK_NIAH_MULTIKEY] = true;
    } else if (!any_task)
        for (int i = 0; i < SRV_TASK_COUNT; i++)
            o->task_on[i] = true;
    if (srv_attn_finish("eval", &o->attn) ||
        srv_prefill_finish("eval", &o->spec, o->draft != NULL) ||
        srv_kv_finish("eval", &o->kv, o->eng.block_size) ||
        srv_specdec_finish("eval", &o->specdec, o->draft != NULL)) {
        fputs(eval_usage, stderr);
        return KVS_EINVAL;
    }
    return 0;
}

typedef struct eval_run {
    model_t *m;
    kern_backend_t *be;
    sched_t *sched;
    item_t *items;
    size_t n_items;
    doc_t *docs;
    size_t n_docs;
    scenario_t scenario;
    model_t *draft;
    model_attn_policy_t attn;
    model_spec_policy_t spec;
    sched_kv_policy_t kv;
} eval_run_t;

/* Every prompt becomes a request of the engine (greedy, as many tokens as
 * the answer has); the engine batches them continuously. */
static int
submit_item(eval_run_t *r, size_t i)
{
    item_t *it = &r->items[i];
    sched_request_t q = {.id = i,
                         .prompt = it->toks,
                         .n_prompt = it->n_toks,
                         .max_tokens = it->n_answer,
                         .ignore_eos = true,
                         .sampling = {.temperature = 0.0f, .top_p = 1.0f},
                         .attn = r->attn,
                         .spec = r->spec,
                         .kv = r->kv};
    return sched_submit(r->sched, &q);
}

/* The answer is text, whatever the tokens that spell it: one per byte in
 * the bundled models, a few bytes each in a BPE vocabulary.  A control
 * token adds none. */
static void
got_token(eval_run_t *r, item_t *it, int32_t token)
{
    uint32_t room = (uint32_t)sizeof it->got - it->got_len;
    if (room > 0) {
        int k = model_token_piece(r->m, token, it->got + it->got_len, room);
        it->got_len += k > 0 ? (uint32_t)k : 0;
    }
    it->n_got++;
}

/* Whether the generated text begins with the answer. */
static bool
item_ok(const item_t *it)
{
    return it->got_len >= it->n_answer && memcmp(it->got, it->answer, it->n_answer) == 0;
}

static int
run_items(eval_run_t *r)
{
    for (size_t i = 0; i < r->n_items; i++) {
        int rc = submit_item(r, i);
        if (rc)
            return rc;
    }
    size_t done = 0;
    while (done < r->n_items) {
        int live = sched_step(r->sched);
        if (live < 0)
            return live;
        sched_event_t *ev;
        while ((ev = sched_poll(r->sched)) != NULL) {
            item_t *it = &r->items[ev->req_id];
            if (ev->kind == SCHED_EV_TOKEN) {
                got_token(r, it, ev->token);
            } else {
                done++;
                if (ev->finish == SCHED_FINISH_ERROR) {
                    int rc = ev->error;
                    sched_event_free(ev);
                    return rc;
                }
            }
            sched_event_free(ev);
        }
        if (live == 0 && done < r->n_items)
            return KVS_EINTERNAL;
    }
    return 0;
}

/* A document's next turns once all it had in flight finished: the next
 * turn (multi-turn), or every other question (multi-request).  Turns are
 * submitted only then because a request matches the prefix cache when it
 * is admitted, and the previous turn's KV is there only once it ran.
 * Returns how many it submitted (0: the document is done) or an error. */
static int
advance_doc(eval_run_t *r, doc_t *d)
{
    uint32_t upto =
        d->submitted == 0 || r->scenario == SCEN_MULTI_TURN ? d->submitted + 1 : d->n_turns;
    int n = 0;
    for (; d->submitted < upto && d->submitted < d->n_turns; d->submitted++, n++) {
        int rc = submit_item(r, d->first + d->submitted);
        if (rc)
            return rc;
    }
    return n;
}

/* Up to max_docs documents at a time, each one's turns in order; a new
 * document starts when one is done, so the cached contexts of the
 * documents in flight fit in the pool beside their running requests. */
static int
run_docs(eval_run_t *r, uint32_t max_docs)
{
    size_t next = 0, done = 0, active = 0;
    while (done < r->n_docs) {
        for (; active < max_docs && next < r->n_docs; next++, active++) {
            int rc = advance_doc(r, &r->docs[next]);
            if (rc < 0)
                return rc;
        }
        int live = sched_step(r->sched);
        if (live < 0)
            return live;
        bool submitted = false;
        sched_event_t *ev;
        while ((ev = sched_poll(r->sched)) != NULL) {
            item_t *it = &r->items[ev->req_id];
            if (ev->kind == SCHED_EV_TOKEN) {
                got_token(r, it, ev->token);
                sched_event_free(ev);
                continue;
            }
            if (ev->finish == SCHED_FINISH_ERROR) {
                int rc = ev->error;
                sched_event_free(ev);
                return rc;
            }
            it->cached_tokens = ev->usage.cached_prompt_tokens;
            it->dropped_tokens = ev->usage.kv_dropped_tokens;
            it->preemptions = ev->usage.preemptions;
            sched_event_free(ev);
            doc_t *d = &r->docs[it->doc];
            if (++d->finished < d->submitted)
                continue;
            int rc = advance_doc(r, d);
            if (rc < 0)
                return rc;
            if (rc > 0) {
                submitted = true;
            } else {
                done++;
                active--;
            }
        }
        /* Idle with turns in flight: the engine lost a request. */
        if (live == 0 && !submitted && active > 0)
            return KVS_EINTERNAL;
    }
    return 0;
}

/* The tokens the prompt's tokenization makes of text, BOS not counted:
 * what srv_task_fit sizes a task by. */
static int
count_tokens(void *m, const char *text, size_t len, size_t *n)
{
    int rc = model_tokenize(m, text, len, false, NULL, 0, n);
    return rc == KVS_ENOSPC ? 0 : rc;
}

/* Tokenizes text into it->toks (BOS first). */
static int
tokenize_item(model_t *m, const char *text, size_t len, item_t *it)
{
    size_t n;
    it->toks = malloc((len + 2) * sizeof *it->toks);
    if (it->toks == NULL || model_tokenize(m, text, len, true, it->toks, len + 2, &n))
        return KVS_ENOMEM;
    it->n_toks = (uint32_t)n;
    return 0;
}

/* The scenario's documents and their turns as items, one document per
 * length x depth x sample. */
static int
build_docs(eval_run_t *r, const eval_opts_t *o)
{
    size_t n_docs = (size_t)o->n_lengths * o->n_depths * o->samples;
    r->docs = calloc(n_docs, sizeof *r->docs);
    r->items = calloc(n_docs * SRV_DOC_MAX_QUESTIONS, sizeof *r->items);
    if (r->docs == NULL || r->items == NULL)
        return KVS_ENOMEM;
    srv_counter_t counter = {count_tokens, r->m};
    for (uint32_t l = 0; l < o->n_lengths; l++) {
        uint32_t hint = 0;
        for (uint32_t d = 0; d < o->n_depths; d++)
            for (uint32_t s = 0; s < o->samples; s++) {
                uint64_t seed = o->seed * 1000003ull + (uint64_t)r->n_docs * 7919ull + 17;
                srv_doc_t doc;
                int rc = srv_task_fit_doc(SRV_TASK_NIAH_MULTIKEY, o->lengths[l], o->depths[d], seed,
                                          &counter, &hint, &doc);
                if (rc) {
                    fprintf(stderr, "kvserve eval: --scenario at length %u: %s\n", o->lengths[l],
                            rc == KVS_ERANGE ? "length too short for the task" : kvs_strerror(rc));
                    return rc;
                }
                doc_t *dc = &r->docs[r->n_docs];
                dc->first = (uint32_t)r->n_items;
                dc->n_turns = doc.n_questions;
                srv_buf_t b = {0};
                srv_buf_puts(&b, doc.context);
                size_t context_len = b.len;
                for (uint32_t t = 0; t < doc.n_questions && rc == 0; t++) {
                    item_t *it = &r->items[r->n_items++];
                    if (r->scenario == SCEN_MULTI_REQUEST && !b.oom) {
                        b.len = context_len;
                        b.p[b.len] = '\0';
                    }
                    srv_buf_puts(&b, doc.question[t]);
                    const char *answer = doc.answer[t];
                    if (o->space_in_prompt && answer[0] == ' ') {
                        srv_buf_puts(&b, " ");
                        answer++;
                    }
                    rc = b.oom ? KVS_ENOMEM : tokenize_item(r->m, b.p, b.len, it);
                    snprintf(it->answer, sizeof it->answer, "%s", answer);
                    it->n_answer = (uint32_t)strlen(it->answer);
                    it->task = SRV_TASK_NIAH_MULTIKEY;
                    it->li = l;
                    it->di = d;
                    it->doc = (uint32_t)r->n_docs;
                    it->turn = t;
                    /* Golden context: the next turn sees the right answer,
                     * whatever the model said. */
                    srv_buf_puts(&b, answer);
                }
                free(b.p);
                srv_doc_free(&doc);
                r->n_docs++;
                if (rc) {
                    fprintf(stderr, "kvserve eval: cannot tokenize a prompt\n");
                    return rc;
                }
            }
    }
    return 0;
}

/* Per length: accuracy per turn, the share of the prompt tokens of turns
 * after the first that the prefix cache served (turn 1 meets its context
 * for the first time), and the KV the policy dropped. */
typedef struct scen_row {
    uint32_t n_turns;
    uint32_t correct[SRV_DOC_MAX_QUESTIONS], asked[SRV_DOC_MAX_QUESTIONS];
    uint64_t later_prompt, later_cached, dropped, preemptions;
} scen_row_t;

typedef struct scen_report {
    scen_row_t rows[MAX_LIST], all; /* all: the sums, n_turns the most turns */
    uint32_t correct, asked;
} scen_report_t;

/* Also adds each cell's accuracy over all its turns to acc, for the
 * heatmap and the "results" of the JSON. */
static void
scen_tally(const eval_run_t *r, const eval_opts_t *o, double *acc, scen_report_t *rep)
{
    *rep = (scen_report_t){0};
    for (size_t i = 0; i < r->n_items; i++) {
        const item_t *it = &r->items[i];
        scen_row_t *w = &rep->rows[it->li];
        bool ok = item_ok(it);
        uint32_t nt = r->docs[it->doc].n_turns;
        w->n_turns = nt > w->n_turns ? nt : w->n_turns;
        w->correct[it->turn] += ok;
        w->asked[it->turn]++;
        if (it->turn > 0) {
            w->later_prompt += it->n_toks;
            w->later_cached += it->cached_tokens;
        }
        w->dropped += it->dropped_tokens;
        w->preemptions += it->preemptions;
        rep->correct += ok;
        rep->asked++;
        acc[((size_t)it->task * o->n_lengths + it->li) * o->n_depths + it->di] +=
            ok ? 1.0 / ((double)o->samples * nt) : 0.0;
    }
    scen_row_t *all = &rep->all;
    for (uint32_t l = 0; l < o->n_lengths; l++) {
        const scen_row_t *w = &rep->rows[l];
        all->n_turns = w->n_turns > all->n_turns ? w->n_turns : all->n_turns;
        all->later_prompt += w->later_prompt;
        all->later_cached += w->later_cached;
        all->dropped += w->dropped;
        all->preemptions += w->preemptions;
    }
}

static double
row_accuracy(const scen_row_t *w)
{
    uint32_t c = 0, a = 0;
    for (uint32_t t = 0; t < w->n_turns; t++)
        c += w->correct[t], a += w->asked[t];
    return a ? (double)c / a : 0.0;
}

/* The cache's share as a percentage, or as a JSON number (null: no turn
 * after the first, where a length fits only one key). */
static void
put_share(FILE *f, const scen_row_t *w, bool json)
{
    if (w->later_prompt == 0)
        fputs(json ? "null" : "       -", f);
    else if (json)
        fprintf(f, "%.4f", (double)w->later_cached / w->later_prompt);
    else
        fprintf(f, "  %5.1f%%", 100.0 * w->later_cached / w->later_prompt);
}

static const char *
scen_name(scenario_t s)
{
    return s == SCEN_MULTI_TURN ? "multi-turn" : "multi-request";
}

static void
scen_print(FILE *tab, const eval_opts_t *o, const scen_report_t *rep)
{
    fprintf(tab, "\nniah-multikey, %s (%s), %u documents per length, prefix caching on\n%8s",
            scen_name(o->scenario),
            o->scenario == SCEN_MULTI_TURN ? "golden answers between turns"
                                           : "one request per question",
            o->n_depths * o->samples, "length");
    for (uint32_t t = 0; t < rep->all.n_turns; t++)
        fprintf(tab, "  turn %u", t + 1);
    fprintf(tab, "    mean  cached  kv dropped\n");
    for (uint32_t l = 0; l < o->n_lengths; l++) {
        const scen_row_t *w = &rep->rows[l];
        fprintf(tab, "%8u", o->lengths[l]);
        for (uint32_t t = 0; t < rep->all.n_turns; t++) {
            if (t < w->n_turns)
                fprintf(tab, "  %5.1f%%", 100.0 * w->correct[t] / w->asked[t]);
            else
                fprintf(tab, "%8s", "-");
        }
        fprintf(tab, "  %5.1f%%", 100.0 * row_accuracy(w));
        put_share(tab, w, false);
        fprintf(tab, "  %10llu\n", (unsigned long long)w->dropped);
    }
    fprintf(tab, "%8s  %5.1f%% overall", "", rep->asked ? 100.0 * rep->correct / rep->asked : 0.0);
    if (rep->all.later_prompt)
        fprintf(tab, "; the prefix cache served %.1f%% of the prompt tokens after turn 1\n",
                100.0 * rep->all.later_cached / rep->all.later_prompt);
    else
        fprintf(tab, "; one question per document at these lengths\n");
    if (rep->all.preemptions)
        fprintf(stderr, "kvserve eval: %llu preemptions (KV recomputed or swapped)\n",
                (unsigned long long)rep->all.preemptions);
}

static void
scen_json(FILE *f, const eval_opts_t *o, const scen_report_t *rep)
{
    fprintf(f, ", \"scenario\": {\"mode\": \"%s\", \"task\": \"niah-multikey\", ",
            scen_name(o->scenario));
    if (o->scenario == SCEN_MULTI_TURN)
        fprintf(f, "\"golden_context\": true, ");
    fprintf(f,
            "\"prefix_caching\": true, \"kv_policy\": \"%s\", \"kv_budget\": %u, "
            "\"documents_per_length\": %u, \"accuracy\": %.4f, \"cached_prompt_share\": ",
            srv_kv_policy_name(o->kv.policy.kind), o->kv.policy.budget_tokens,
            o->n_depths * o->samples, rep->asked ? (double)rep->correct / rep->asked : 0.0);
    put_share(f, &rep->all, true);
    fprintf(f, ", \"kv_dropped_tokens\": %llu, \"preemptions\": %llu, \"lengths\": [",
            (unsigned long long)rep->all.dropped, (unsigned long long)rep->all.preemptions);
    for (uint32_t l = 0; l < o->n_lengths; l++) {
        const scen_row_t *w = &rep->rows[l];
        fprintf(f,
                "%s\n  {\"length\": %u, \"documents\": %u, \"turns\": %u, "
                "\"turn_accuracy\": [",
                l ? "," : "", o->lengths[l], o->n_depths * o->samples, w->n_turns);
        for (uint32_t t = 0; t < w->n_turns; t++)
            fprintf(f, "%s%.4f", t ? ", " : "", (double)w->correct[t] / w->asked[t]);
        fprintf(f,
                "], \"accuracy\": %.4f, \"later_prompt_tokens\": %llu, "
                "\"later_cached_prompt_tokens\": %llu, \"cached_prompt_share\": ",
                row_accuracy(w), (unsigned long long)w->later_prompt,
                (unsigned long long)w->later_cached);
        put_share(f, w, true);
        fprintf(f, ", \"kv_dropped_tokens\": %llu}", (unsigned long long)w->dropped);
    }
    fprintf(f, "\n]}");
}

static void
write_plot(const char *path, const eval_opts_t *o, const double *acc)
{
    FILE *f = fopen(path, "w");
    if (f == NULL) {
        fprintf(stderr, "kvserve eval: --plot: cannot write '%s'\n", path);
        return;
    }
    const int cw = 56, ch = 28, left = 70, top = 40, gap = 40;
    int n_tasks = 0;
    for (int t = 0; t < SRV_TASK_COUNT; t++)
        n_tasks += o->task_on[t];
    int pw = left + cw * (int)o->n_depths + gap;
    int W = pw * n_tasks + 20, H = top + ch * (int)o->n_lengths + 50;
    fprintf(f,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
            "font-family=\"sans-serif\" font-size=\"11\">\n<rect width=\"100%%\" "
            "height=\"100%%\" fill=\"white\"/>\n",
            W, H);
    int x0 = 10;
    for (int t = 0; t < SRV_TASK_COUNT; t++) {
        if (!o->task_on[t])
            continue;
        fprintf(f, "<text x=\"%d\" y=\"20\" font-size=\"13\">%s accuracy (length x depth)</text>\n",
                x0, srv_task_name((srv_task_t)t));
        for (uint32_t l = 0; l < o->n_lengths; l++) {
            int y = top + ch * (int)l;
            fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"end\">%u</text>\n", x0 + left - 6,
                    y + ch / 2 + 4, o->lengths[l]);
            for (uint32_t d = 0; d < o->n_depths; d++) {
                double a = acc[((size_t)t * o->n_lengths + l) * o->n_depths + d];
                int red = (int)(220 * (1.0 - a)), green = (int)(180 * a + 40);
                int x = x0 + left + cw * (int)d;
                fprintf(f,
                        "<rect x=\"%d\" y=\"%d\" width=\"%d\" height=\"%d\" "
                        "fill=\"rgb(%d,%d,80)\" stroke=\"white\"/>\n",
                        x, y, cw, ch, red, green);
                fprintf(f,
                        "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\" fill=\"white\">%.0f%%"
                        "</text>\n",
                        x + cw / 2, y + ch / 2 + 4, 100.0 * a);
            }
        }
        for (uint32_t d = 0; d < o->n_depths; d++)
            fprintf(f, "<text x=\"%d\" y=\"%d\" text-anchor=\"middle\">%.2f</text>\n",
                    x0 + left + cw * (int)d + cw / 2, top + ch * (int)o->n_lengths + 16,
                    o->depths[d]);
        fprintf(f, "<text x=\"%d\" y=\"%d\">depth</text>\n", x0 + left,
                top + ch * (int)o->n_lengths + 34);
        x0 += pw;
    }
    fprintf(f, "</svg>\n");
    fclose(f);
}

int
srv_cmd_eval(int argc, char **argv)
{
    eval_opts_t o;
    if (parse_opts(argc, argv, &o))
        return 2;
    if (o.model == NULL && (o.model = srv_default_model()) == NULL) {
        fprintf(stderr, "kvserve eval: no --model given and no bundled model found "
                        "(weights/kvserve-main.gguf)\n");
        return 2;
    }
    eval_run_t r = {.attn = o.attn, .spec = o.spec, .kv = o.kv.policy, .scenario = o.scenario};
    int status = 1, rc;
    char err[512] = "";
    kern_backend_cfg_t bcfg = {.n_threads = o.eng.threads};
    if ((rc = kern_backend_new(o.eng.device, &bcfg, &r.be))) {
        fprintf(stderr, "kvserve eval: --device %s: %s\n", o.eng.device, kvs_strerror(rc));
        status = 2;
        goto out;
    }
    if ((rc = model_load(o.model, r.be, &r.m, err, sizeof err))) {
        fprintf(stderr, "kvserve eval: cannot load model '%s': %s\n", o.model, err);
        goto out;
    }
    if (o.draft && (rc = srv_load_draft("eval", o.draft, r.m, &r.draft)))
        goto out;
    const model_hparams_t *hp = model_hparams(r.m);
    if (o.n_lengths == 0) {
        for (uint32_t l = 256; l <= hp->n_ctx_train && o.n_lengths < MAX_LIST; l *= 2)
            o.lengths[o.n_lengths++] = l;
        if (o.n_lengths == 0)
            o.lengths[o.n_lengths++] = hp->n_ctx_train;
    }
    for (uint32_t i = 0; i < o.n_lengths; i++) {
        if (o.lengths[i] > hp->n_ctx_train) {
            fprintf(stderr, "kvserve eval: --lengths: %u exceeds the model's context (%u)\n",
                    o.lengths[i], hp->n_ctx_train);
            status = 2;
            goto out;
        }
    }

    /* Build every prompt up front. */
    size_t n_cells = (size_t)SRV_TASK_COUNT * o.n_lengths * o.n_depths;
    if (o.scenario != SCEN_NONE) {
        if ((rc = build_docs(&r, &o))) {
            status = rc == KVS_ERANGE ? 2 : 1;
            goto out;
        }
    } else if ((r.items = calloc(n_cells * o.samples, sizeof *r.items)) == NULL)
        goto out;
    for (int t = 0; t < SRV_TASK_COUNT && o.scenario == SCEN_NONE; t++) {
        if (!o.task_on[t])
            continue;
        srv_counter_t counter = {count_tokens, r.m};
        for (uint32_t l = 0; l < o.n_lengths; l++) {
            uint32_t hint = 0; /* this length's byte size, from its first sample on */
            for (uint32_t d = 0; d < o.n_depths; d++)
                for (uint32_t s = 0; s < o.samples; s++) {
                    item_t *it = &r.items[r.n_items];
                    uint64_t seed = o.seed * 1000003ull + (uint64_t)r.n_items * 7919ull + 17;
                    char *prompt;
                    rc = srv_task_fit((srv_task_t)t, o.lengths[l], o.depths[d], seed, &counter,
                                      &hint, &prompt, it->answer);
                    if (rc) {
                        fprintf(stderr, "kvserve eval: %s at length %u: %s\n",
                                srv_task_name((srv_task_t)t), o.lengths[l],
                                rc == KVS_ERANGE ? "length too short for the task"
                                                 : kvs_strerror(rc));
                        status = rc == KVS_ERANGE ? 2 : 1;
                        goto out;
                    }
                    size_t len = strlen(prompt);
                    if (o.space_in_prompt && it->answer[0] == ' ') {
                        char *p2 = realloc(prompt, len + 2);
                        if (p2 == NULL) {
                            free(prompt);
                            goto out;
                        }
                        prompt = p2;
                        prompt[len++] = ' ';
                        prompt[len] = '\0';
                        memmove(it->answer, it->answer + 1, strlen(it->answer));
                    }
                    rc = tokenize_item(r.m, prompt, len, it);
                    free(prompt);
                    if (rc) {
                        fprintf(stderr, "kvserve eval: cannot tokenize a prompt\n");
                        goto out;
                    }
                    it->n_answer = (uint32_t)strlen(it->answer);
                    it->task = (srv_task_t)t;
                    it->li = l;
                    it->di = d;
                    r.n_items++;
                }
        }
    }

    /* A request's prompt and the most tokens its answer may take (one a
     * byte): BOS + `length` tokens where the answer spells as it did in
     * the sized text, a few more where it takes more tokens than that. */
    uint32_t max_seq = 0;
    for (size_t i = 0; i < r.n_items; i++)
        if (r.items[i].n_toks + r.items[i].n_answer > max_seq)
            max_seq = r.items[i].n_toks + r.items[i].n_answer;
    sched_cfg_t scfg = srv_engine_cfg(&o.eng, &o.kv, max_seq);
    /* A scenario resends each turn's context: the cache is what keeps it
     * from being recomputed. */
    scfg.prefix_caching = o.scenario != SCEN_NONE;
    scfg.reserve_summaries = srv_attn_summaries(&o.attn);
    scfg.draft = o.spec.on || o.specdec.draft ? r.draft : NULL;
    srv_specdec_apply(&o.specdec, &scfg);
    if ((rc = sched_new(r.m, &scfg, &r.sched))) {
        fprintf(stderr, "kvserve eval: setup failed: %s\n", kvs_strerror(rc));
        goto out;
    }
    uint64_t t0 = kvs_now_ns();
    if ((rc = o.scenario != SCEN_NONE ? run_docs(&r, o.eng.max_seqs) : run_items(&r))) {
        fprintf(stderr, "kvserve eval: engine failed: %s\n", kvs_strerror(rc));
        goto out;
    }
    double secs = (double)(kvs_now_ns() - t0) / 1e9;

    /* Per cell: accuracy, and the mean prompt tokens (BOS included; a
     * scenario's are its turns' mean). */
    double *acc = calloc(3 * n_cells, sizeof *acc), *toks = acc + n_cells, *cnt = toks + n_cells;
    if (acc == NULL)
        goto out;
    size_t total_toks = 0;
    scen_report_t rep;
    if (o.scenario != SCEN_NONE)
        scen_tally(&r, &o, acc, &rep);
    for (size_t i = 0; i < r.n_items; i++) {
        item_t *it = &r.items[i];
        total_toks += it->n_toks;
        size_t cell = ((size_t)it->task * o.n_lengths + it->li) * o.n_depths + it->di;
        toks[cell] += it->n_toks;
        cnt[cell]++;
        if (o.scenario != SCEN_NONE)
            continue;
        bool ok = item_ok(it);
        acc[((size_t)it->task * o.n_lengths + it->li) * o.n_depths + it->di] +=
            ok ? 1.0 / o.samples : 0.0;
    }
    char pol[96], pre[96], kvd[96];
    srv_attn_describe(&o.attn, pol, sizeof pol);
    srv_prefill_describe(&o.spec, pre, sizeof pre);
    /* JSON on stdout (--json -) keeps stdout one document: the table goes
     * to stderr then. */
    FILE *tab = o.json && strcmp(o.json, "-") == 0 ? stderr : stdout;
    fprintf(tab, "model: %s\npolicy: attention %s, prefill %s, kv-cache %s\n", o.model, pol, pre,
            srv_kv_describe(&o.kv, kvd, sizeof kvd));
    if (o.scenario != SCEN_NONE)
        scen_print(tab, &o, &rep);
    for (int t = 0; t < SRV_TASK_COUNT && o.scenario == SCEN_NONE; t++) {
        if (!o.task_on[t])
            continue;
        fprintf(tab, "\n%s (%u samples per cell)\n%8s", srv_task_name((srv_task_t)t), o.samples,
                "length");
        for (uint32_t d = 0; d < o.n_depths; d++)
            fprintf(tab, "  d=%.2f", o.depths[d]);
        fprintf(tab, "    mean\n");
        double tsum = 0;
        for (uint32_t l = 0; l < o.n_lengths; l++) {
            double lsum = 0;
            fprintf(tab, "%8u", o.lengths[l]);
            for (uint32_t d = 0; d < o.n_depths; d++) {
                double a = acc[((size_t)t * o.n_lengths + l) * o.n_depths + d];
                lsum += a;
                fprintf(tab, "  %5.1f%%", 100.0 * a);
            }
            fprintf(tab, "  %5.1f%%\n", 100.0 * lsum / o.n_depths);
            tsum += lsum;
        }
        fprintf(tab, "%8s  %5.1f%% overall\n", "", 100.0 * tsum / (o.n_depths * o.n_lengths));
    }
    char docs[80] = "";
    if (o.scenario != SCEN_NONE)
        snprintf(docs, sizeof docs, "%zu documents, ", r.n_docs);
    sched_load_t ld;
    sched_get_load(r.sched, &ld);
    char spec[128];
    fprintf(stderr, "kvserve eval: %s%zu prompts, %zu tokens in %.1f s (%.0f tok/s)%s\n", docs,
            r.n_items, total_toks, secs, secs > 0 ? (double)total_toks / secs : 0.0,
            srv_specdec_summary(&o.specdec, ld.spec_draft_tokens, ld.spec_accepted_tokens, spec,
                                sizeof spec));

    if (o.json) {
        FILE *f = strcmp(o.json, "-") == 0 ? stdout : fopen(o.json, "w");
        if (f == NULL) {
            fprintf(stderr, "kvserve eval: --json: cannot write '%s'\n", o.json);
            free(acc);
            goto out;
        }
        fprintf(f, "{\"model\": ");
        srv_json_str(f, o.model, strlen(o.model));
        fprintf(f,
                ", \"policy\": {\"attention\": \"%s\", \"prefill\": \"%s\", "
                "\"kv_cache_dtype\": \"%s\", \"kv_sink_tokens\": %u}, \"seed\": %llu, "
                "\"samples\": %u, \"results\": [",
                pol, pre, srv_kv_name(&o.kv), o.kv.sink_tokens, (unsigned long long)o.seed,
                o.samples);
        bool first = true;
        for (int t = 0; t < SRV_TASK_COUNT; t++) {
            if (!o.task_on[t])
                continue;
            for (uint32_t l = 0; l < o.n_lengths; l++)
                for (uint32_t d = 0; d < o.n_depths; d++) {
                    size_t cell = ((size_t)t * o.n_lengths + l) * o.n_depths + d;
                    fprintf(f,
                            "%s\n  {\"task\": \"%s\", \"length\": %u, \"depth\": %.4g, "
                            "\"samples\": %u, \"accuracy\": %.4f, \"prompt_tokens\": %.1f}",
                            first ? "" : ",", srv_task_name((srv_task_t)t), o.lengths[l],
                            o.depths[d], o.samples, acc[cell],
                            cnt[cell] > 0 ? toks[cell] / cnt[cell] : 0.0);
                    first = false;
                }
        }
        fprintf(f, "\n]");
        if (o.scenario != SCEN_NONE)
            scen_json(f, &o, &rep);
        fprintf(f, "}\n");
        if (f != stdout)
            fclose(f);
    }
    if (o.plot)
        write_plot(o.plot, &o, acc);
    free(acc);
    status = 0;
out:
    if (r.items) {
        for (size_t i = 0; i < r.n_items; i++)
            free(r.items[i].toks);
        free(r.items);
    }
    free(r.docs);
    sched_free(r.sched);
    model_free(r.draft);
    model_free(r.m);
    kern_backend_free(r.be);
    return status;
}
