/*
 * sched/sched_engine.c — the engine: the request state machine and one
 * step of continuous batching over the paged KV cache.
 *
 *   submit/cancel (any thread) --MPSC inbox--> sched_step (engine thread)
 *   sched_step: drain inbox -> plan -> reserve KV (preempt) -> forward ->
 *               sample -> TOKEN/FINISH events --MPSC outbox--> consumer
 *
 *   waiting: sorted by (priority, arrival)     running: same order
 *   a request: tokens = prompt + generated; n_computed of them are in KV
 *
 * Planning has no prefill/decode modes: every running request needs
 * n_tokens - n_computed more tokens (1 when decoding).  Decodes are served
 * first, then prefill chunks fill the remaining token budget, then waiting
 * requests are admitted in order while sequences and budget remain.
 *
 * Speculative prefill (model.h) adds a draft phase in front of a request's
 * prefill: admitted with all its draft KV reserved at once (so drafting
 * requests never wait on each other's blocks), it runs the draft model over
 * the prompt (chunks, like a prefill) and look_ahead - 1 greedy tokens
 * (like decodes), capturing the queries that score the prompt; then the
 * draft KV is released, the kept tokens are chosen, and the main model
 * prefills only those, at their original positions, before decoding at
 * position n_prompt as usual.  Draft and main steps share the token budget
 * and run as two forward passes per engine step.  When
 * the pool is full the lowest-priority, latest-arriving running request
 * not yet scheduled this step is preempted by recompute (its blocks
 * released, its tokens kept, back to waiting); if there is none, the
 * request itself waits.  Admission never preempts.  Nothing here locks:
 * only the inbox and outbox cross threads.
 *
 * Speculative decoding by prompt lookup (sched_cfg_t.num_speculative_tokens)
 * turns a decode into a short chunk: the last token and the tokens that
 * followed the latest earlier occurrence of the sequence's last few, all
 * with logits; the request draws from those rows in order while the
 * proposal holds and truncates its KV past what it kept.  Proposals come
 * after the decodes' own tokens in the budget and never preempt.  With
 * the draft model as the proposer (spec_draft_model) every running
 * request keeps the draft's KV of its tokens, and before planning the
 * draft catches up and continues each decoding request greedily: forward
 * passes of their own, batched over requests, like the draft phase's.
 *
 * A step's draws wait until the step's other work is done and then run
 * on the sampling threads (sched_cfg_t.sample_threads), each request on
 * one thread, each token queued as soon as it is drawn.
 *
 * A request of n samples runs as sample 0 until its first logits; then
 * samples 1..n-1 are made from it (req_clone), fork its KV and sample the
 * same row, and from there every sample is a request of its own that
 * shares the id (events and cancellations name the index).
 */
#include "sched.h"

#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

/* H2O's scores start from the last this many rows of a dense phase. */
#define H2O_OBS 32u

enum { MSG_SUBMIT, MSG_CANCEL };
#define ALL_SAMPLES UINT32_MAX

typedef struct msg {
    kvs_mpsc_node_t node;
    int kind;
    uint64_t id;    /* cancel */
    uint32_t index; /* cancel: one sample, or ALL_SAMPLES */
} msg_t;

typedef enum req_state { REQ_WAITING, REQ_RUNNING } req_state_t;

typedef struct req {
    msg_t msg; /* first: the inbox node */
    uint64_t id, seq;
    /* The prefix-cache key of the prompt's blocks and of the blocks that
     * hold generated tokens (key()). */
    uint64_t extra, extra_gen;
    char name[SCHED_NAME_MAX]; /* sched_request_t.name, or the id: for log lines */
    int32_t priority;
    int32_t *tokens;
    uint32_t n_tokens, cap, n_prompt, n_computed, max_tokens;
    bool ignore_eos, cancelled, admitted_once, logprobs;
    uint32_t top_logprobs;
    uint32_t n_forced; /* tokens[n_prompt ..] holds them from submit on */
    uint32_t min_tokens, n_min_ban;
    int32_t *min_ban;   /* copied */
    uint64_t *ban_bits; /* [n_vocab / 64] the ids it may draw less min_tokens' bans, at first use */
    model_sampler_t *sampler;
    /* Samples (sched_request_t.n): this one's index; sample 0 forks the
     * others at its first logits while fork_pending, and holds the
     * cancellations of those not forked yet. */
    uint32_t index, n_samples;
    bool fork_pending;
    uint64_t cancel_mask;
    /* prompt_logprobs: plp_next is the next prompt token to report (from
     * 1), so a recompute after a preemption reports nothing twice. */
    bool plp;
    uint32_t plp_top, plp_next;
    model_choice_t *choice; /* guided_choice, NULL: none */
    model_guide_t *guide;   /* guided_regex / guided_json, NULL: none */
    kv_table_t *table;
    req_state_t state;
    struct req *prev, *next;
    uint32_t n_sched;                /* tokens given this step (0: not scheduled) */
    uint32_t n_spec;                 /* of them, the proposal (at tokens[n_tokens..]), till drawn */
    uint32_t spec_len;               /* the longest proposal it makes now (0: not set yet) */
    uint32_t spec_wait, spec_misses; /* steps to go without one; proposals missed in a row */
    /* Speculative decoding by the draft model: the draft's KV of r's
     * tokens (NULL: none yet).  Its entries below sd_base hold r's tokens;
     * those from sd_base on, the draft's last proposal sd_prop (which the
     * verification may have kept).  sd_n: the proposal made this step. */
    kv_table_t *sd_table;
    uint32_t sd_base, sd_n;
    int32_t sd_prop[SCHED_MAX_SPEC_TOKENS];
    /* With spec_rejection: the draft's distributions this step's proposal
     * was drawn from, [sd_n][n_vocab], rows of the engine's sd_q, for the
     * verification (NULL: a proposal checked exactly). */
    float *sd_q;
    sched_usage_t usage;
    uint64_t t_submit, t_first_token;
    model_attn_policy_t attn;
    sched_kv_policy_t kv;
    uint32_t block_tokens; /* the pool's, for count_keys */
    /* Speculative prefill.  Drafting while spec.on and kept == NULL. */
    model_spec_policy_t spec;
    bool draft_step;     /* this step's tokens go to the draft */
    kv_table_t *d_table; /* the draft's KV while drafting */
    int32_t *d_tokens;   /* prompt + look-ahead tokens, [n_prompt + look_ahead] */
    uint32_t d_n;        /* tokens the draft has to read so far */
    uint32_t d_computed; /* of them, read */
    uint32_t n_a;        /* queries captured */
    float *qs;           /* [look_ahead][draft layers][draft q dim] */
    uint64_t t_draft;    /* first draft step */
    int32_t *kept;       /* the main model's prompt indices, sorted; NULL: all */
    int32_t *kept_tok;   /* their tokens */
    uint32_t n_kept, kept_done;
    /* SnapKV: the last snap_w prompt rows' queries, [n_layer][snap_w][q
     * dim], captured as the prefill computes them; snap_done once the
     * prompt's KV was compressed (or found within budget). */
    float *snap_q;
    uint32_t snap_w;
    bool snap_done;
    /* H2O (h2o_q NULL: off): accumulated scores h2o_a[layer][KV head]
     * [h2o_stride], valid once h2o_live.  They start when the table's
     * dense phase ends at h2o_end entries (the prompt; every token on a
     * recompute), from the last h2o_w rows' queries captured into h2o_q;
     * each decode step then captures its query row there and adds it.
     * Kept here, not in the table, so a swap to the host tier keeps them. */
    float *h2o_q; /* [n_layer][h2o_w or 1][q dim] */
    double *h2o_a;
    uint32_t h2o_w, h2o_end, h2o_stride;
    bool h2o_live;
    bool swapped; /* the table waits in the host tier (preempted) */
} req_t;

typedef struct req_list {
    req_t *head, *tail;
    uint32_t n;
    uint32_t n_preempted; /* of n, preempted at least once (the load snapshot's) */
} req_list_t;

struct sched {
    sched_cfg_t cfg;
    model_t *m;
    kern_backend_t *be;
    uint32_t n_vocab;
    kv_pool_t *pool;
    kv_host_t *host; /* the host tier (NULL: none) */
    model_ctx_t *ctx;
    sched_batch_t *batch;
    float *logits;
    /* SnapKV's captured query rows of a step, grown as needed. */
    uint32_t *cap_first, *cap_count; /* [max_num_seqs] */
    float *cap_q;
    size_t cap_q_rows;
    /* Speculative prefill's draft (NULL when none). */
    model_t *draft;
    kv_pool_t *d_pool;
    model_ctx_t *d_ctx;
    sched_batch_t *d_batch;
    float *d_logits;      /* [max_num_seqs][n_vocab] */
    float *d_capture;     /* [max_num_seqs][draft layers][draft q dim] */
    uint32_t *d_want;     /* [max_num_seqs] rows to capture: 0 or 1, the last */
    uint32_t *d_want_row; /* [max_num_seqs] which row of the step */
    sched_seq_step_t *d_steps;
    req_t **d_reqs;
    model_sampler_t *d_greedy; /* look-ahead tokens */
    /* spec_rejection: the draft's distributions behind the step's
     * proposals, [sd_q_rows][n_vocab], sd_q_used rows handed out. */
    float *sd_q;
    uint32_t sd_q_rows, sd_q_used;
    kvs_mpsc_t inbox, outbox;
    _Atomic uint64_t next_seq;
    req_list_t waiting, running;
    /* per step */
    req_t **sched_reqs;
    sched_seq_step_t *steps;
    uint64_t *step_ids;
    uint32_t n_steps, budget;
    uint32_t plp_left; /* prompt_logprob_rows still free this step */
    uint32_t dec_left; /* decodes planning has still to reach (proposals leave them budget) */
    bool spec_off;     /* spec_disable_batch running requests or more: no proposals */
    /* The step's draws, waiting for its other work (draws_flush). */
    struct draw *draws; /* [max_num_seqs] */
    uint32_t n_draws;
    uint64_t draw_now;
    /* The sampling threads (pool_run; started at first use) and their
     * current jobs. */
    uint32_t n_pool_threads, pool_started;
    pthread_t *pool_th;
    pthread_mutex_t pool_mu;
    pthread_cond_t pool_cv, pool_done;
    uint64_t pool_gen;
    uint32_t pool_busy, pool_n;
    _Atomic uint32_t pool_next;
    bool pool_stop;
    void (*pool_fn)(struct sched *s, uint32_t i);
    /* prompt_logprobs' rows of the current call (plp_job). */
    const float *plp_rows;
    const int32_t *plp_toks;
    sched_logprobs_t *plp_out;
    uint32_t plp_top;
    sched_step_hook_fn hook;
    void *hook_arg;
    sched_logits_hook_fn logits_hook;
    void *logits_arg;
    /* engine thread */
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Atomic bool thread_on;
    bool stop, pending;
    _Atomic bool emitted; /* events queued since the last wake */
    /* Snapshot for other threads (sched_get_load), written after each step. */
    _Atomic uint32_t load_running, load_waiting, load_free, load_cached, load_preempted;
    _Atomic bool load_failed;
    _Atomic uint64_t load_sealed, load_swap_out, load_swap_in, load_pressure_seals, load_snapkv,
        load_h2o;
    _Atomic uint64_t load_steps, load_busy_ns, load_work_steps;
    _Atomic uint64_t load_pfx_queried, load_pfx_hit;
    _Atomic uint64_t load_host_bytes, load_host_hit; /* the host tier's, as the engine sees it */
    _Atomic uint64_t load_spec_draft, load_spec_accepted, load_spec_drafts;
    _Atomic uint64_t load_spec_pos[SCHED_MAX_SPEC_TOKENS];
};

const char *
sched_finish_name(sched_finish_t f)
{
    switch (f) {
    case SCHED_FINISH_LENGTH:
        return "length";
    case SCHED_FINISH_EOS:
        return "eos";
    case SCHED_FINISH_CANCELLED:
        return "cancelled";
    case SCHED_FINISH_ERROR:
        return "error";
    case SCHED_FINISH_STOP:
        return "stop";
    }
    return "?";
}

/* ---- lists ---------------------------------------------------------------- */

static bool
before(const req_t *a, const req_t *b)
{
    return a->priority != b->priority ? a->priority < b->priority : a->seq < b->seq;
}

static void
list_insert_sorted(req_list_t *l, req_t *r)
{
    req_t *at = l->tail;
    while (at && before(r, at))
        at = at->prev;
    r->prev = at;
    r->next = at ? at->next : l->head;
    if (r->next)
        r->next->prev = r;
    else
        l->tail = r;
    if (at)
        at->next = r;
    else
        l->head = r;
    l->n++;
    l->n_preempted += r->usage.preemptions > 0;
}

static void
list_remove(req_list_t *l, req_t *r)
{
    if (r->prev)
        r->prev->next = r->next;
    else
        l->head = r->next;
    if (r->next)
        r->next->prev = r->prev;
    else
        l->tail = r->prev;
    r->prev = r->next = NULL;
    l->n--;
    l->n_preempted -= r->usage.preemptions > 0;
}

/* ---- events ------------------------------------------------------------------ */

static bool
emit(sched_t *s, const sched_event_t *proto)
{
    sched_event_t *ev = malloc(sizeof *ev);
    if (ev == NULL) {
        KVS_ERRORF("sched: out of memory for an event of request %llu",
                   (unsigned long long)proto->req_id);
        return false;
    }
    *ev = *proto;
    ev->t_ns = kvs_now_ns();
    kvs_mpsc_push(&s->outbox, &ev->node);
    /* At once, not at the end of the step: sampling the rest of a large
     * batch takes milliseconds, and this token is ready now. */
    if (s->cfg.wake)
        s->cfg.wake(s->cfg.wake_arg);
    else
        atomic_store(&s->emitted, true);
    return true;
}

sched_event_t *
sched_poll(sched_t *s)
{
    kvs_mpsc_node_t *n = kvs_mpsc_pop(&s->outbox);
    return n ? KVS_CONTAINER_OF(n, sched_event_t, node) : NULL;
}

void
sched_event_free(sched_event_t *ev)
{
    if (ev)
        free(ev->plp);
    free(ev);
}

/* ---- requests ---------------------------------------------------------------- */

static void
req_free(req_t *r)
{
    if (r == NULL)
        return;
    kv_table_free(r->d_table);
    kv_table_free(r->sd_table);
    free(r->d_tokens);
    free(r->qs);
    free(r->kept);
    free(r->kept_tok);
    free(r->snap_q);
    free(r->h2o_q);
    free(r->h2o_a);
    kv_table_free(r->table);
    model_sampler_free(r->sampler);
    model_choice_free(r->choice);
    model_guide_free(r->guide);
    free(r->tokens);
    free(r->min_ban);
    free(r->ban_bits);
    free(r);
}

static bool
drafting(const req_t *r)
{
    return r->spec.on && r->kept == NULL;
}

/* Tokens the request still needs computed (1: a decode step). */
static uint32_t
need_of(const req_t *r)
{
    if (drafting(r))
        return r->d_n - r->d_computed;
    if (r->kept && r->kept_done < r->n_kept)
        return r->n_kept - r->kept_done;
    return r->n_tokens - r->n_computed;
}

/* r's blocks' prefix-cache key: its prompt's under extra, the rest under
 * extra_gen. */
static kv_prefix_key_t
key(const req_t *r)
{
    return (kv_prefix_key_t){.extra = r->extra, .after = r->extra_gen, .n_first = r->n_prompt};
}

/* Registers the computed full blocks so other requests can share them.
 * After a speculative prefill only the leading run of kept tokens is at
 * its natural positions (kv_prefix_commit stops at the first other block
 * anyway), so just that run is offered. */
static void
commit_prefix(sched_t *s, req_t *r)
{
    if (!s->cfg.prefix_caching || r->table == NULL)
        return;
    uint32_t n = r->n_computed;
    if (r->kept) {
        n = 0;
        while (n < r->kept_done && r->kept[n] == (int32_t)n)
            n++;
    }
    /* After an eviction the table is shorter than what was computed; its
     * entries up to the first dropped block are still tokens 0.. in order. */
    if (n > kv_table_len(r->table))
        n = kv_table_len(r->table);
    if (s->cfg.kv_quant != KERN_KVQ_NONE) {
        /* A cached block is never sealed: past the sinks' blocks (kept
         * full precision anyway), only sealed blocks are offered, or
         * cached blocks of the residual window would hold the full
         * precision ones for good. */
        const int32_t *b = kv_table_blocks(r->table);
        const uint32_t bt = s->cfg.block_tokens, n_hot = kv_pool_cfg(s->pool)->n_hot;
        uint32_t i = (s->cfg.kv_sink_tokens + bt - 1) / bt;
        while (i < n / bt && (uint32_t)b[i] >= n_hot)
            i++;
        if (n > i * bt)
            n = i * bt;
    }
    const kv_prefix_key_t k = key(r);
    if (n > 0)
        kv_prefix_commit_key(r->table, r->tokens, n, &k);
}

/* After a prefix-cache hit of `hit` prompt tokens (re-admission after a
 * preemption): those tokens are in the table with their full KV, so the
 * kept list starts with all of them, and only kept tokens past them are
 * left to prefill. */
static void
kept_rebase(req_t *r, uint32_t hit)
{
    uint32_t j = 0;
    while (j < r->n_kept && r->kept[j] < (int32_t)hit)
        j++;
    memmove(r->kept + hit, r->kept + j, (r->n_kept - j) * sizeof *r->kept);
    for (uint32_t i = 0; i < hit; i++)
        r->kept[i] = (int32_t)i;
    r->n_kept = hit + (r->n_kept - j);
    for (uint32_t i = 0; i < r->n_kept; i++)
        r->kept_tok[i] = r->tokens[r->kept[i]];
    r->kept_done = hit;
}

/* Back to the start of the draft phase: its KV released, captures lost. */
static void
draft_reset(req_t *r)
{
    kv_table_free(r->d_table);
    r->d_table = NULL;
    r->d_n = r->n_prompt;
    r->d_computed = 0;
    r->n_a = 0;
}

/* Sample i of r's request, which was never forked, ends (with `why`,
 * unless it was cancelled). */
static void
finish_unforked(sched_t *s, const req_t *r, uint32_t i, sched_finish_t why, int error)
{
    bool cancelled = r->cancel_mask >> i & 1;
    sched_event_t ev = {.kind = SCHED_EV_FINISH,
                        .req_id = r->id,
                        .index = i,
                        .finish = cancelled ? SCHED_FINISH_CANCELLED : why,
                        .error = cancelled ? KVS_ECANCELED : error,
                        .usage = {.prompt_tokens = r->n_prompt}};
    emit(s, &ev);
}

static void
finish(sched_t *s, req_t *r, sched_finish_t why, int error)
{
    if (r->state == REQ_RUNNING)
        list_remove(&s->running, r);
    else
        list_remove(&s->waiting, r);
    commit_prefix(s, r);
    uint64_t now = kvs_now_ns();
    r->usage.completion_tokens = r->n_tokens - r->n_prompt;
    if (r->t_first_token)
        r->usage.decode_ns = now - r->t_first_token;
    sched_event_t ev = {.kind = SCHED_EV_FINISH,
                        .req_id = r->id,
                        .index = r->index,
                        .finish = why,
                        .error = error,
                        .usage = r->usage};
    emit(s, &ev);
    /* The samples it had still to fork end with it. */
    for (uint32_t i = 1; r->fork_pending && i < r->n_samples; i++)
        finish_unforked(s, r, i, why, error);
    req_free(r);
}

/* H2O's observation rows for a dense phase of n tokens. */
static uint32_t
h2o_window(uint64_t n)
{
    return n < H2O_OBS ? (uint32_t)n : H2O_OBS;
}

/* Floats a window of `rows` captured queries takes, every layer's
 * (SnapKV's snap_q, H2O's h2o_q). */
static size_t
query_floats(const sched_t *s, uint32_t rows)
{
    const model_hparams_t *hp = model_hparams(s->m);
    return (size_t)hp->n_layer * rows * hp->n_head * hp->head_dim;
}

/* The recompute of every token is a prefill: dense, and H2O's scores
 * start again from its last rows' queries. */
static void
h2o_restart(req_t *r)
{
    r->h2o_live = false;
    r->h2o_end = r->n_tokens;
    r->h2o_w = h2o_window(r->n_tokens);
}

/* Drops r's KV: it is recomputed on re-admission. */
static void
drop_kv(req_t *r)
{
    kv_table_free(r->table);
    r->table = NULL;
    r->n_computed = 0;
    r->kept_done = 0;
    r->snap_done = false;
    h2o_restart(r);
    r->swapped = false;
    if (drafting(r))
        draft_reset(r);
}

/* Back to waiting with every token kept.  Its KV goes to the host tier
 * when there is one with room (brought back on re-admission, bit for
 * bit), else it is recomputed later. */
static void
preempt(sched_t *s, req_t *r)
{
    list_remove(&s->running, r);
    commit_prefix(s, r);
    r->n_sched = 0;
    /* The draft's KV is a cache: computed again when r runs. */
    kv_table_free(r->sd_table);
    r->sd_table = NULL;
    r->sd_n = 0;
    int rc = KVS_ENOTSUP;
    if (s->host && r->table && !drafting(r) && kv_table_len(r->table) > 0)
        rc = kv_table_offload(r->table, s->host);
    if (rc == 0) {
        r->swapped = true;
        atomic_fetch_add(&s->load_swap_out, 1);
        KVS_INFOF("sched: request %s preempted, %u KV entries swapped to host memory", r->name,
                  kv_table_len(r->table));
    } else {
        if (s->host && r->table)
            KVS_INFOF("sched: request %s preempted, KV to recompute (host tier: %s)", r->name,
                      kvs_strerror(rc));
        drop_kv(r);
    }
    r->usage.preemptions++;
    r->state = REQ_WAITING;
    list_insert_sorted(&s->waiting, r);
}

static req_t *
find(req_list_t *l, uint64_t id, uint32_t index)
{
    for (req_t *r = l->head; r; r = r->next)
        if (r->id == id && (index == ALL_SAMPLES || r->index == index))
            return r;
    return NULL;
}

/* Cancels request id's sample `index` (ALL_SAMPLES: every one).  Before
 * sample 0 forks the others, one sample's cancellation is only marked
 * there: the samples end when the fork would have started them. */
static void
cancel(sched_t *s, uint64_t id, uint32_t index)
{
    req_t *r;
    if (index != ALL_SAMPLES) {
        if ((r = find(&s->running, id, 0)) == NULL)
            r = find(&s->waiting, id, 0);
        if (r && r->fork_pending) {
            if (index < r->n_samples)
                r->cancel_mask |= 1ull << index;
            return;
        }
    }
    while ((r = find(&s->running, id, index)) != NULL || (r = find(&s->waiting, id, index)))
        finish(s, r, SCHED_FINISH_CANCELLED, KVS_ECANCELED);
}

static void
drain_inbox(sched_t *s)
{
    kvs_mpsc_node_t *n;
    while ((n = kvs_mpsc_pop(&s->inbox)) != NULL) {
        msg_t *m = KVS_CONTAINER_OF(n, msg_t, node);
        if (m->kind == MSG_SUBMIT) {
            req_t *r = (req_t *)m;
            r->state = REQ_WAITING;
            list_insert_sorted(&s->waiting, r);
            continue;
        }
        uint64_t id = m->id;
        uint32_t index = m->index;
        free(m);
        cancel(s, id, index);
    }
}

/* Wakes the engine thread if there is one. */
static void
sched__kick(sched_t *s)
{
    if (!s->thread_on)
        return;
    pthread_mutex_lock(&s->mu);
    s->pending = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* ---- planning ---------------------------------------------------------------- */

static void
add_step(sched_t *s, req_t *r, uint32_t n)
{
    r->n_sched = n;
    s->budget -= n;
    s->sched_reqs[s->n_steps++] = r;
}

/* The running request to preempt for `for_r`: lowest priority, latest
 * arrival, not scheduled this step, not for_r itself. */
static req_t *
pick_victim(sched_t *s, const req_t *for_r)
{
    for (req_t *v = s->running.tail; v; v = v->prev)
        if (v != for_r && v->n_sched == 0)
            return v;
    return NULL;
}

/* The first rung of the ladder a short pool climbs before preempting:
 * quantize the residual windows (kv_residual_tokens) of every running
 * request, which frees their full-precision blocks.  Returns true when
 * anything was sealed.  Offloading to the host tier and recomputation
 * follow in preempt(). */
/* Seals every running request's full blocks but its last keep_tail
 * tokens; returns how many blocks it sealed (counted in the load). */
static uint64_t
seal_running(sched_t *s, uint32_t keep_tail)
{
    uint64_t sealed = 0;
    for (req_t *r = s->running.head; r; r = r->next)
        if (r->table && !r->swapped && r->n_spec == 0) { /* no proposal waiting for its draws */
            int rc = kv_table_seal(r->table, s->cfg.kv_sink_tokens, keep_tail);
            sealed += rc > 0 ? (uint64_t)rc : 0;
        }
    atomic_fetch_add(&s->load_sealed, sealed);
    return sealed;
}

static bool
pressure_seal(sched_t *s)
{
    if (s->cfg.kv_quant == KERN_KVQ_NONE || s->cfg.kv_residual_tokens == 0)
        return false;
    uint64_t sealed = seal_running(s, 0);
    if (sealed == 0)
        return false;
    atomic_fetch_add(&s->load_pressure_seals, 1);
    KVS_INFOF("sched: KV pool short: quantized %llu blocks of residual windows",
              (unsigned long long)sealed);
    return true;
}

/* Reserves KV for n more tokens of running request r, preempting others if
 * needed.  Returns true when r got its tokens this step. */
static bool
schedule_running(sched_t *s, req_t *r, uint32_t n)
{
    r->draft_step = drafting(r);
    if (r->draft_step) {
        /* Its whole draft was reserved at admission: this cannot wait. */
        int rc = kv_table_reserve(r->d_table, n);
        if (rc) {
            finish(s, r, SCHED_FINISH_ERROR, rc);
            return false;
        }
        add_step(s, r, n);
        return true;
    }
    for (;;) {
        int rc = kv_table_reserve(r->table, n);
        if (rc == 0) {
            add_step(s, r, n);
            return true;
        }
        if (rc == KVS_ENOSPC) {
            finish(s, r, SCHED_FINISH_ERROR, KVS_ENOSPC);
            return false;
        }
        if (pressure_seal(s))
            continue; /* quantizing freed full-precision blocks: try again */
        req_t *v = pick_victim(s, r);
        if (v == NULL) {
            preempt(s, r);
            return false;
        }
        preempt(s, v);
    }
}

/* ---- speculative decoding by prompt lookup -------------------------------------- */

/* A proposal whose first token missed (or, in a long sequence, a lookup
 * that found nothing): after the second in a row r goes 1, 2, 4, then 8
 * steps without a lookup, so text the sequence does not foretell costs
 * few rows and few scans. */
#define SPEC_SCAN_LONG 8192u
static void
spec_missed(req_t *r, bool missed)
{
    r->spec_misses = missed ? r->spec_misses + 1 : 0;
    r->spec_wait = r->spec_misses < 2 ? 0 : 1u << (r->spec_misses < 5 ? r->spec_misses - 2 : 3);
}

/* Whether r's KV policy rewrites its KV each step (H2O, sink eviction):
 * such a request never speculates, nor keeps draft KV for it. */
static bool
kv_rewritten(const req_t *r)
{
    return r->kv.kind == SCHED_KV_SINK_EVICTION || r->kv.kind == SCHED_KV_H2O;
}

/* Whether r may speculate at all: a decoding request whose policy does
 * not rewrite its KV. */
static bool
spec_can(const sched_t *s, const req_t *r)
{
    return s->cfg.num_speculative_tokens && !kv_rewritten(r) && r->n_tokens > r->n_prompt &&
           r->table && r->n_computed + 1 == r->n_tokens;
}

/* The longest proposal r makes now, before the step's budget: every
 * proposal accepted plus the token drawn after them must stay within
 * max_tokens and the model length. */
static uint32_t
spec_most(const sched_t *s, const req_t *r)
{
    uint64_t end = (uint64_t)r->n_prompt + r->max_tokens;
    if (end > s->cfg.max_model_len)
        end = s->cfg.max_model_len;
    uint64_t room = end > r->n_tokens ? end - r->n_tokens - 1 : 0;
    uint32_t most = r->spec_len ? r->spec_len : s->cfg.num_speculative_tokens;
    return room < most ? (uint32_t)room : most;
}

/* The most tokens decoding request r may propose this step (0: none):
 * spec_most, within the rows still free (token budget, logit rows). */
static uint32_t
spec_room(const sched_t *s, req_t *r)
{
    if (!spec_can(s, r))
        return 0;
    if (r->spec_wait) {
        r->spec_wait--;
        return 0;
    }
    uint32_t room = spec_most(s, r);
    uint32_t spare = s->budget > 1 + s->dec_left ? s->budget - 1 - s->dec_left : 0;
    if (room > spare)
        room = spare;
    if (room > s->plp_left)
        room = s->plp_left;
    return room;
}

/* Prompt lookup (or the forced tokens still due): the longest run of r's last tokens,
 * prompt_lookup_max down to prompt_lookup_min of them, that occurred before (its latest
 * occurrence), and the at most `room` tokens that followed it there,
 * written after r's tokens (nothing reads past n_tokens).  Latest, since
 * an output repeating itself or the text just quoted is the likeliest to
 * go on as it did last.  Returns how many. */
static uint32_t
spec_propose(const sched_t *s, req_t *r, uint32_t room)
{
    int32_t *t = r->tokens;
    const uint32_t n = r->n_tokens, gmax = s->cfg.prompt_lookup_max;
    if (n - r->n_prompt < r->n_forced) {
        /* Forced tokens still due are a proposal that holds: they wait
         * where they will stand (teacher forcing, scored a few a step). */
        uint32_t due = r->n_prompt + r->n_forced - n;
        return due < room ? due : room;
    }
    if (s->spec_off)
        return 0;
    if (s->cfg.spec_draft_model) /* the draft's, made before planning (sd_propose) */
        return r->sd_n < room ? r->sd_n : room;
    uint32_t best = 0, at = 0; /* the match's length, and where what followed it starts */
    for (uint32_t j = n - 1; j >= 1 && best < gmax; j--) {
        if (t[j - 1] != t[n - 1])
            continue;
        uint32_t g = 1;
        while (g < gmax && g < j && t[j - 1 - g] == t[n - 1 - g])
            g++;
        if (g > best) {
            best = g;
            at = j;
        }
    }
    if (best < s->cfg.prompt_lookup_min)
        return 0;
    uint32_t d = n - at < room ? n - at : room;
    memcpy(t + n, t + at, d * sizeof *t); /* at + d <= n: no overlap */
    return d;
}

/* Schedules decoding request r with its proposal, when it has one whose
 * KV fits now: a proposal never preempts anyone (r then decodes one
 * token the usual way).  When free blocks are fewer than the running
 * requests, it stays inside the blocks r holds, so that it takes no block
 * another's decode may need this step (and preempt for). */
static bool
schedule_spec(sched_t *s, req_t *r)
{
    uint32_t room = spec_room(s, r);
    if (room && kv_pool_n_free(s->pool) <= s->running.n) {
        uint64_t held = (uint64_t)kv_table_n_blocks(r->table) * s->cfg.block_tokens;
        uint64_t len = kv_table_len(r->table) + 1; /* with the last token */
        uint64_t inside = held > len ? held - len : 0;
        room = inside < room ? (uint32_t)inside : room;
    }
    if (room == 0)
        return false;
    uint32_t d = spec_propose(s, r, room);
    /* A proposal's verification says whether it missed.  A lookup that
     * found nothing costs no rows, only its scan, which counts once the
     * sequence is long (about 1 us per 1K tokens). */
    if (d == 0 && r->n_tokens >= SPEC_SCAN_LONG && !s->cfg.spec_draft_model && !s->spec_off)
        spec_missed(r, true);
    if (d == 0 || kv_table_reserve(r->table, 1 + d) != 0)
        return false;
    r->draft_step = false;
    r->n_spec = d;
    s->plp_left -= d;
    add_step(s, r, 1 + d);
    return true;
}

/* ---- speculative decoding by the draft model ------------------------------------ */

/* Lets one running request's draft KV go (it computes it again), the
 * youngest's first, as preemption picks, for a speculative prefill that
 * needs the draft pool: the caller asks again after each, so the others
 * keep theirs.  Returns whether any was held. */
static bool
sd_release(sched_t *s)
{
    for (req_t *r = s->running.tail; r; r = r->prev)
        if (r->sd_table) {
            kv_table_free(r->sd_table);
            r->sd_table = NULL;
            return true;
        }
    return false;
}

/* Drops the entries of r's draft KV past the first proposed token the
 * verification did not keep (or past r's tokens, for one not drawn yet). */
static void
sd_sync(req_t *r)
{
    uint32_t len = kv_table_len(r->sd_table), ok = r->sd_base < len ? r->sd_base : len;
    while (ok < len && ok < r->n_tokens && r->tokens[ok] == r->sd_prop[ok - r->sd_base])
        ok++;
    if (ok < len)
        kv_table_truncate(r->sd_table, ok);
}

/* The draft's forward pass over d_steps[0..n) (d_reqs' draft tables);
 * then each step that wanted logits appends the draft's token to its
 * request's proposal: its guess at the token the request's sampler will
 * draw there (model_sampler_predict: greedy, or the draw with the random
 * number the sampler will use), or (sd_q) one drawn by the
 * request's sampler, whose distribution the verification needs.  A
 * failure costs the proposals, not the requests: their draft KV goes (its
 * new entries were never written). */
static int
sd_forward(sched_t *s, uint32_t n)
{
    const model_batch_t *mb;
    int rc = sched_batch_build(s->d_batch, s->d_steps, n, &mb);
    if (rc == 0)
        rc = model_forward(s->d_ctx, kv_pool_kv(s->d_pool), mb, s->d_logits);
    if (rc) {
        KVS_WARNF("sched: draft proposals for %u sequences failed: %s", n, kvs_strerror(rc));
        for (uint32_t i = 0; i < n; i++) {
            req_t *r = s->d_reqs[i];
            kv_table_free(r->sd_table);
            r->sd_table = NULL;
            r->sd_n = 0;
        }
        return rc;
    }
    for (uint32_t i = 0, row = 0; i < n; i++) {
        req_t *r = s->d_reqs[i];
        if (!s->d_steps[i].want_logits)
            continue;
        const float *lg = s->d_logits + (size_t)row++ * s->n_vocab;
        uint32_t j = kv_table_len(r->sd_table) - r->sd_base;
        int32_t tok = r->sd_q
                          ? model_sampler_propose(r->sampler, lg, r->sd_q + (size_t)j * s->n_vocab)
                          : model_sampler_predict(r->sampler, lg, j);
        if (tok < 0) { /* nothing to draw (its allowed ids): the proposal ends */
            r->sd_n = j;
            continue;
        }
        r->sd_prop[j] = r->tokens[r->n_tokens + j] = tok;
        if (model_token_is_eog(s->draft, tok) && !r->ignore_eos && r->sd_n > j + 1)
            r->sd_n = j + 1; /* nothing follows an end the main model draws too */
    }
    return 0;
}

/* r's proposal this step is drawn from the draft's distributions when it
 * samples and rows of sd_q are free: r->sd_q gets *k of them at most
 * (they hold as many proposed tokens as a step can verify; once they are
 * taken, proposals are predicted draws, checked exactly). */
static void
sd_rejects(sched_t *s, req_t *r, uint32_t *k)
{
    uint32_t left = s->sd_q_rows - s->sd_q_used;
    if (model_sampler_cfg(r->sampler)->temperature == 0.0f || left == 0)
        return; /* greedy: the exact check is the same test */
    *k = *k < left ? *k : left;
    r->sd_q = s->sd_q + (size_t)s->sd_q_used * s->n_vocab;
    s->sd_q_used += *k;
}

/* Before planning (prompts false): the draft's proposals for the
 * decoding requests that speculate this step, and its KV brought up to
 * what each running request has computed (a decoding one: all its
 * tokens).  One pass computes what each draft lags (at most
 * max_num_batched_tokens tokens in all) and the first proposed token of
 * those it caught up; each further pass, one more proposed token of each.
 * A request whose proposal must wait (spec_wait) catches up when it next
 * proposes, in one chunk.  After planning (prompts true): the draft
 * computes the prompt chunks the main model is about to, so that its
 * share of a prompt's cost falls in the prefill's step, not between the
 * first tokens. */
static void
sd_propose(sched_t *s, bool prompts)
{
    uint32_t n = 0, budget = s->cfg.max_num_batched_tokens, most = 0;
    for (req_t *r = s->running.head; r && !prompts; r = r->next) {
        r->sd_n = 0;
        r->sd_q = NULL;
    }
    if (!prompts)
        s->sd_q_used = 0;
    if (s->spec_off && !prompts)
        return; /* decoding requests catch up once proposals resume */
    for (req_t *r = s->running.head; r && budget; r = r->next) {
        if (kv_rewritten(r) || !r->table || drafting(r) ||
            (prompts && (r->n_sched == 0 || r->n_computed >= r->n_prompt ||
                         (r->kept && r->kept_done < r->n_kept))))
            continue;
        bool dec = !prompts && spec_can(s, r);
        if (dec && r->spec_wait)
            continue;
        if (r->sd_table == NULL && kv_table_new(s->d_pool, &r->sd_table) != 0)
            continue;
        sd_sync(r);
        /* Forced tokens still due are the proposal themselves. */
        uint32_t k = dec && r->n_tokens - r->n_prompt >= r->n_forced ? spec_most(s, r) : 0;
        uint32_t have = kv_table_len(r->sd_table);
        uint32_t want = prompts ? r->n_computed + r->n_sched : dec ? r->n_tokens : r->n_computed;
        if (have >= want)
            continue;
        uint32_t chunk = want - have;
        if (chunk > budget) {
            chunk = budget;
            k = 0; /* not caught up this step */
        }
        if (kv_table_reserve(r->sd_table, chunk + (k ? k - 1 : 0)) != 0) {
            /* The draft pool is short: no proposal this step (a decoding
             * request backs off like one whose proposal missed). */
            if (dec)
                spec_missed(r, true);
            continue;
        }
        budget -= chunk;
        r->sd_base = have + chunk;
        if (k && s->cfg.spec_rejection)
            sd_rejects(s, r, &k);
        r->sd_n = k;
        most = k > most ? k : most;
        s->d_reqs[n] = r;
        s->d_steps[n++] = (sched_seq_step_t){.table = r->sd_table,
                                             .tokens = r->tokens + have,
                                             .n_tokens = chunk,
                                             .want_logits = k > 0};
    }
    if (n == 0 || sd_forward(s, n) != 0)
        return;
    for (uint32_t j = 1; j < most; j++) {
        uint32_t m = 0;
        for (uint32_t i = 0; i < n; i++) {
            req_t *r = s->d_reqs[i];
            if (r->sd_n <= j)
                continue;
            s->d_reqs[m] = r;
            s->d_steps[m++] = (sched_seq_step_t){.table = r->sd_table,
                                                 .tokens = r->tokens + r->n_tokens + j - 1,
                                                 .n_tokens = 1,
                                                 .want_logits = true};
        }
        if (sd_forward(s, m) != 0)
            return;
        n = m;
    }
}

/* Prompt rows of r's next n tokens whose logits prompt_logprobs reads:
 * those predicting a prompt token (all but the prompt's last row). */
static uint32_t
plp_rows(const req_t *r, uint32_t n)
{
    if (!r->plp || r->n_computed + 1 >= r->n_prompt)
        return 0;
    uint32_t left = r->n_prompt - 1 - r->n_computed;
    return n < left ? n : left;
}

/* The tokens r computes this step, of the n it could.  A SnapKV
 * request's prefill chunk stops at the end of the prompt, so that its KV
 * can be compressed right there (a recompute after a preemption would
 * otherwise run on into generated tokens); a prompt_logprobs request's
 * chunk takes no more logit rows than the step has left (0: none). */
static uint32_t
chunk_of(sched_t *s, const req_t *r, uint32_t n)
{
    if (r->snap_q && !r->snap_done && r->n_computed < r->n_prompt &&
        r->n_computed + n > r->n_prompt)
        n = r->n_prompt - r->n_computed;
    uint32_t rows = plp_rows(r, n);
    if (rows > s->plp_left)
        n = rows = s->plp_left;
    s->plp_left -= rows;
    return n;
}

static void
plan(sched_t *s)
{
    s->n_steps = 0;
    s->budget = s->cfg.max_num_batched_tokens;
    s->plp_left = s->cfg.prompt_logprob_rows;
    /* Snapshot: preemption edits the running list while we walk it. */
    uint32_t n_run = 0;
    req_t **snap = s->sched_reqs + s->cfg.max_num_seqs; /* second half of the array */
    s->dec_left = 0;
    for (req_t *r = s->running.head; r; r = r->next) {
        r->n_sched = 0;
        snap[n_run++] = r;
        s->dec_left += need_of(r) == 1;
    }
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < n_run && s->budget > 0; i++) {
            req_t *r = snap[i];
            if (r == NULL || r->state != REQ_RUNNING || r->n_sched)
                continue;
            uint32_t need = need_of(r);
            if ((pass == 0) != (need == 1))
                continue; /* decodes in pass 0, prefill chunks in pass 1 */
            if (pass == 0) {
                s->dec_left--; /* r itself is being served */
                if (schedule_spec(s, r))
                    continue;
            }
            uint32_t n = chunk_of(s, r, need < s->budget ? need : s->budget);
            if (n && !schedule_running(s, r, n)) {
                /* r was preempted or failed; later snapshot entries may be
                 * stale now, which the state check above catches. */
                for (uint32_t j = 0; j < n_run; j++)
                    if (snap[j] == r)
                        snap[j] = NULL;
            }
        }
        /* Victims left the running list: drop them from the snapshot. */
        for (uint32_t i = 0; i < n_run; i++)
            if (snap[i] && snap[i]->state != REQ_RUNNING)
                snap[i] = NULL;
    }
    /* Admissions, in order; a request that does not fit stops them, so
     * nobody behind it overtakes (no starvation of large requests). */
    while (s->waiting.head && s->budget > 0 && s->running.n < s->cfg.max_num_seqs) {
        req_t *r = s->waiting.head;
        bool restored = false;
        if (plp_rows(r, 1) > s->plp_left)
            break; /* its next chunk needs logit rows this step has not left */
        if (r->swapped) {
            /* Back only when its blocks and the next chunk fit, or it
             * would swap straight out again. */
            uint32_t bt = s->cfg.block_tokens, need = need_of(r);
            uint64_t want = ((uint64_t)kv_table_len(r->table) +
                             (need < s->budget ? need : s->budget) + bt - 1) /
                            bt;
            if (want > kv_pool_n_free(s->pool))
                break;
            int rc = kv_table_restore(r->table, s->host);
            if (rc == KVS_EAGAIN)
                break; /* not now, and nobody overtakes */
            if (rc != 0) {
                drop_kv(r); /* the copies are gone: recompute */
            } else {
                r->swapped = false;
                restored = true;
                atomic_fetch_add(&s->load_swap_in, 1);
            }
        }
        if (r->table == NULL && kv_table_new(s->pool, &r->table) != 0)
            break;
        /* SnapKV and H2O compute their whole prompt, and so does
         * prompt_logprobs (every row's logits): their observation
         * queries must run, and their compressed KV is their own. */
        if (r->n_computed == 0 && r->kept_done == 0 && s->cfg.prefix_caching && !r->snap_q &&
            !r->h2o_q && !r->plp) {
            /* A speculative prefill matches the prompt only: those tokens
             * keep their full KV, and generated ones are recomputed. */
            uint32_t hit = 0, upto = r->spec.on ? r->n_prompt : r->n_tokens;
            /* Sink eviction: no more than its budget, the KV a miss
             * would hold whole (eviction starts past it). */
            if (r->kv.kind == SCHED_KV_SINK_EVICTION && upto > r->kv.budget_tokens)
                upto = r->kv.budget_tokens;
            const kv_prefix_key_t k = key(r);
            kv_prefix_match_key(r->table, r->tokens, upto, &k, &hit);
            if (r->kept)
                kept_rebase(r, hit);
            else
                r->n_computed = hit;
            if (!r->admitted_once)
                r->usage.cached_prompt_tokens = hit < r->n_prompt ? hit : r->n_prompt;
        }
        int rc;
        if (drafting(r)) {
            /* All of the draft's KV now, or wait. */
            rc = r->d_table ? 0 : kv_table_new(s->d_pool, &r->d_table);
            uint32_t want = r->n_prompt + r->spec.look_ahead - 1;
            if (rc == 0)
                rc = kv_table_reserve(r->d_table, want);
            /* Speculative decoding's draft KV gives way (recomputed),
             * a request at a time until it fits. */
            while (rc == KVS_EAGAIN && sd_release(s))
                rc = kv_table_reserve(r->d_table, want);
        } else {
            uint32_t need = need_of(r);
            rc = kv_table_reserve(r->table, need < s->budget ? need : s->budget);
        }
        if (rc == KVS_ENOSPC) {
            finish(s, r, SCHED_FINISH_ERROR, KVS_ENOSPC);
            continue;
        }
        if (rc != 0) {
            /* Not now: give the matched blocks back until it fits; KV
             * restored from the host tier goes back there if it can. */
            if (restored && kv_table_offload(r->table, s->host) == 0) {
                r->swapped = true;
                atomic_fetch_add(&s->load_swap_out, 1);
            } else
                drop_kv(r);
            break;
        }
        uint32_t need = need_of(r);
        uint32_t n = chunk_of(s, r, need < s->budget ? need : s->budget);
        list_remove(&s->waiting, r);
        r->state = REQ_RUNNING;
        list_insert_sorted(&s->running, r);
        if (!r->admitted_once) {
            r->admitted_once = true;
            r->usage.queue_ns = kvs_now_ns() - r->t_submit;
        }
        r->draft_step = drafting(r);
        add_step(s, r, n);
    }
}

/* ---- step ---------------------------------------------------------------------- */

/* Samples r's next token with its min_tokens bans in force: the ids it
 * may draw (a guide's mask, or all) less the bans, as a bitmask, so that
 * the row stays the model's (logprobs, the logits hook, and a fork's other
 * samples, which may be drawing from it at the same time, read it). */
static int32_t
sample_banned(const sched_t *s, req_t *r, const float *row, const uint64_t *allow, int32_t x,
              const float *q)
{
    const int32_t *eog;
    uint32_t n_eog = model_vocab_eog(model_vocab(s->m), &eog), n = n_eog + r->n_min_ban;
    size_t words = (s->n_vocab + 63) / 64;
    if (r->ban_bits == NULL && (r->ban_bits = malloc(words * sizeof *r->ban_bits)) == NULL)
        return KVS_ENOMEM;
    if (allow) {
        memcpy(r->ban_bits, allow, words * sizeof *r->ban_bits);
    } else {
        memset(r->ban_bits, 0xff, words * sizeof *r->ban_bits);
        if (s->n_vocab % 64)
            r->ban_bits[words - 1] = (1ull << (s->n_vocab % 64)) - 1;
    }
    for (uint32_t i = 0; i < n; i++) {
        int32_t id = i < n_eog ? eog[i] : r->min_ban[i - n_eog];
        r->ban_bits[id >> 6] &= ~(1ull << (id & 63));
    }
    return q ? model_sampler_verify(r->sampler, row, r->ban_bits, x, q)
             : model_sampler_sample_masked(r->sampler, row, r->ban_bits);
}

static bool
is_finished(const sched_t *s, const req_t *r, int32_t tok, sched_finish_t *why)
{
    /* A forced token is the caller's, not the model's end. */
    if (!r->ignore_eos && r->n_tokens - r->n_prompt > r->n_forced &&
        model_token_is_eog(s->m, tok)) {
        *why = SCHED_FINISH_EOS;
        return true;
    }
    if (r->n_tokens - r->n_prompt >= r->max_tokens || r->n_tokens >= s->cfg.max_model_len) {
        *why = SCHED_FINISH_LENGTH;
        return true;
    }
    return false;
}

/* Keys the prompt rows of one step attend to under r's policy, the way
 * model/forward.c applies it: sinks + window for sparse rows (block-sparse:
 * plus at most top_k selected blocks and the row's own), full rows for
 * Delta's strided and tail rows (blocks and tail per call). */
static void
count_keys(req_t *r, uint32_t first, uint32_t n, uint32_t n_prompt)
{
    const model_attn_policy_t *p = &r->attn;
    /* prompt rows of this step */
    uint32_t np = first >= n_prompt ? 0 : n_prompt - first < n ? n_prompt - first : n;
    uint32_t g = p->gamma ? p->gamma : 1;
    uint32_t tail = p->kind == MODEL_ATTN_DELTA ? model_delta_tail(np, p) : 0;
    for (uint32_t i = 0; i < np; i++) {
        uint64_t L = (uint64_t)first + i + 1; /* the row's causal limit */
        uint64_t kept = (uint64_t)p->sinks + p->window;
        if (p->kind == MODEL_ATTN_BLOCK_SPARSE) /* at most: top_k blocks and the own one */
            kept += ((uint64_t)p->top_k + 1) * r->block_tokens;
        uint64_t sparse = L < kept ? L : kept;
        bool dense = p->kind == MODEL_ATTN_DENSE ||
                     (p->kind == MODEL_ATTN_DELTA && (i >= np - tail || i % g == 0)) ||
                     (p->last_dense && L == n_prompt);
        r->usage.attn_keys_dense += L;
        r->usage.attn_keys += dense ? L : sparse;
        if (p->kind == MODEL_ATTN_DELTA && i % g == 0 && i < np - tail)
            r->usage.attn_keys += sparse; /* the strided rows run both passes */
    }
}

static int
publish_load(sched_t *s)
{
    kv_prefix_stats_t ps;
    kv_pool_prefix_stats(s->pool, &ps);
    atomic_store(&s->load_running, s->running.n);
    atomic_store(&s->load_waiting, s->waiting.n);
    atomic_store(&s->load_preempted, s->waiting.n_preempted);
    atomic_store(&s->load_free, kv_pool_n_free(s->pool));
    atomic_store(&s->load_cached, (uint32_t)ps.cached_blocks);
    atomic_store(&s->load_pfx_queried, ps.queried_tokens);
    atomic_store(&s->load_pfx_hit, ps.hit_tokens);
    if (s->host) {
        kv_host_stats_t hs;
        kv_host_stats(s->host, &hs);
        atomic_store(&s->load_host_bytes, hs.bytes_used);
        atomic_store(&s->load_host_hit, hs.hit_tokens);
    }
    /* The draft model runs on s->be too (sched_new). */
    atomic_store(&s->load_failed, kern_backend_failed(s->be));
    atomic_fetch_add(&s->load_steps, 1);
    return (int)(s->waiting.n + s->running.n);
}

static int step_once(sched_t *s);

int
sched_step(sched_t *s)
{
    uint64_t t0 = kvs_now_ns();
    int rc = step_once(s);
    if (s->n_steps) { /* a step that ran the model */
        atomic_fetch_add(&s->load_busy_ns, kvs_now_ns() - t0);
        atomic_fetch_add(&s->load_work_steps, 1);
    }
    int live = publish_load(s);
    return rc < 0 ? rc : live;
}

/* The draft phase is over for r: score the prompt, choose the kept
 * tokens, release the draft's KV.  The prefix-cache hit (n_computed
 * tokens already in r's main table) is kept whole. */
static void
draft_done(sched_t *s, req_t *r)
{
    const uint32_t N = r->n_prompt;
    float *imp = malloc((size_t)N * sizeof *imp);
    r->kept = malloc((size_t)N * sizeof *r->kept);
    r->kept_tok = malloc((size_t)N * sizeof *r->kept_tok);
    int rc = !imp || !r->kept || !r->kept_tok ? KVS_ENOMEM : 0;
    if (rc == 0)
        rc = model_spec_importance(s->draft, kv_pool_kv(s->d_pool), kv_table_blocks(r->d_table), N,
                                   r->qs, r->n_a, r->spec.pool, imp);
    if (rc) {
        free(imp);
        finish(s, r, SCHED_FINISH_ERROR, rc);
        return;
    }
    r->n_kept =
        model_spec_select(imp, N, r->spec.chunk, r->spec.keep_ratio, r->n_computed, r->kept);
    free(imp);
    for (uint32_t i = 0; i < r->n_kept; i++)
        r->kept_tok[i] = r->tokens[r->kept[i]];
    r->kept_done = r->n_computed;
    if (s->cfg.spec_draft_model && !kv_rewritten(r) && kv_table_truncate(r->d_table, N) == 0) {
        /* The prompt's draft KV is what speculative decoding drafts on. */
        r->sd_table = r->d_table;
        r->sd_base = N;
    } else {
        kv_table_free(r->d_table);
    }
    r->d_table = NULL;
    free(r->qs);
    r->qs = NULL;
    r->usage.draft_ns = kvs_now_ns() - r->t_draft;
    r->usage.kept_prompt_tokens = r->n_kept;
}

/* The draft's forward pass over this step's draft work (d_reqs[0..n)):
 * prompt chunks, then one look-ahead token at a time.  The last prompt
 * token and every look-ahead token capture their queries in every layer
 * and extend the look-ahead greedily from the draft's logits (an
 * end-of-generation token ends it early). */
static int
draft_forward(sched_t *s, uint32_t n)
{
    const model_hparams_t *dh = model_hparams(s->draft);
    const size_t qd = (size_t)dh->n_head * dh->head_dim, L = dh->n_layer;
    uint64_t now = kvs_now_ns();
    for (uint32_t i = 0; i < n; i++) {
        req_t *r = s->d_reqs[i];
        if (r->d_computed == 0)
            r->t_draft = now;
        bool cap = r->d_computed + r->n_sched >= r->n_prompt;
        s->d_want[i] = cap;
        s->d_want_row[i] = r->n_sched - 1;
        s->d_steps[i] = (sched_seq_step_t){.table = r->d_table,
                                           .tokens = r->d_tokens + r->d_computed,
                                           .n_tokens = r->n_sched,
                                           .want_logits = cap};
    }
    const model_batch_t *mb;
    int rc = sched_batch_build(s->d_batch, s->d_steps, n, &mb);
    uint32_t n_cap = 0;
    if (rc == 0) {
        n_cap = sched_batch_capture(s->d_batch, s->d_want_row, s->d_want, s->d_capture);
        rc = model_forward(s->d_ctx, kv_pool_kv(s->d_pool), mb, s->d_logits);
    }
    if (rc) {
        KVS_ERRORF("sched: draft step of %u sequences failed: %s", n, kvs_strerror(rc));
        for (uint32_t i = 0; i < n; i++)
            finish(s, s->d_reqs[i], SCHED_FINISH_ERROR, rc);
        return rc;
    }
    uint32_t ci = 0;
    for (uint32_t i = 0; i < n; i++) {
        req_t *r = s->d_reqs[i];
        r->d_computed += r->n_sched;
        r->n_sched = 0;
        if (!s->d_want[i])
            continue;
        for (size_t l = 0; l < L; l++)
            memcpy(r->qs + ((size_t)r->n_a * L + l) * qd, s->d_capture + (l * n_cap + ci) * qd,
                   qd * sizeof(float));
        const float *row = s->d_logits + (size_t)ci++ * s->n_vocab;
        bool more = ++r->n_a < r->spec.look_ahead;
        if (more) {
            /* Greedy without penalties: no buffers, so no failure. */
            int32_t tok = model_sampler_sample(s->d_greedy, row);
            if (model_token_is_eog(s->draft, tok))
                more = false;
            else
                r->d_tokens[r->d_n++] = tok;
        }
        if (!more)
            draft_done(s, r);
    }
    return 0;
}

/* Quantizes r's full blocks but its last keep_tail tokens (kv_table_seal;
 * the residual window, kv_residual_tokens, as the tail grows).
 * Before commit_prefix: a block the cache holds is never sealed, so
 * sealing first keeps cached blocks compact.  A backend failure fails
 * the request (returns false), not the engine. */
static bool
seal_blocks(sched_t *s, req_t *r, uint32_t keep_tail)
{
    if (s->cfg.kv_quant == KERN_KVQ_NONE || r->table == NULL)
        return true;
    int rc = kv_table_seal(r->table, s->cfg.kv_sink_tokens, keep_tail);
    if (rc >= 0) {
        atomic_fetch_add(&s->load_sealed, (uint64_t)rc);
        return true;
    }
    KVS_ERRORF("sched: sealing KV blocks of request %s failed: %s", r->name, kvs_strerror(rc));
    finish(s, r, SCHED_FINISH_ERROR, rc);
    return false;
}

/* The rows of this step in SnapKV or H2O observation windows (the last
 * snap_w prompt rows of a SnapKV request still to compress; the last h2o_w
 * rows of an H2O request's dense phase, then each decode row): asks the
 * batch to capture their queries.  *n_cap gets how many rows. */
static int
snap_capture(sched_t *s, uint32_t *n_cap)
{
    uint32_t total = 0;
    for (uint32_t i = 0; i < s->n_steps; i++) {
        const req_t *r = s->sched_reqs[i];
        s->cap_first[i] = s->cap_count[i] = 0;
        uint32_t c0 = r->n_computed, c1 = c0 + r->n_sched, w0, w1;
        if (r->h2o_q && r->h2o_live) {
            w0 = c1 - 1; /* a decode step: its query row */
            w1 = c1;
        } else if (r->h2o_q) {
            w0 = r->h2o_end - r->h2o_w;
            w1 = r->h2o_end;
        } else if (r->snap_q && !r->snap_done) {
            w0 = r->n_prompt - r->snap_w;
            w1 = r->n_prompt;
        } else {
            continue;
        }
        uint32_t a = c0 > w0 ? c0 : w0, b = c1 < w1 ? c1 : w1;
        if (a < b) {
            s->cap_first[i] = a - c0;
            s->cap_count[i] = b - a;
            total += b - a;
        }
    }
    *n_cap = 0;
    if (total == 0)
        return 0;
    const model_hparams_t *hp = model_hparams(s->m);
    size_t row = (size_t)hp->n_layer * hp->n_head * hp->head_dim;
    if (total > s->cap_q_rows) {
        float *q = realloc(s->cap_q, total * row * sizeof *q);
        if (q == NULL)
            return KVS_ENOMEM;
        s->cap_q = q;
        s->cap_q_rows = total;
    }
    *n_cap = sched_batch_capture(s->batch, s->cap_first, s->cap_count, s->cap_q);
    return 0;
}

/* Copies the captured rows into each request's window, [layer][row]
 * (an H2O decode row: a window of one). */
static void
snap_store(sched_t *s, uint32_t n_cap)
{
    const model_hparams_t *hp = model_hparams(s->m);
    size_t qd = (size_t)hp->n_head * hp->head_dim;
    uint32_t ci = 0;
    for (uint32_t i = 0; i < s->n_steps; i++) {
        req_t *r = s->sched_reqs[i];
        float *dst = r->h2o_q ? r->h2o_q : r->snap_q;
        uint32_t w = r->h2o_q ? (r->h2o_live ? 1 : r->h2o_w) : r->snap_w;
        uint32_t w1 =
            r->h2o_q ? (r->h2o_live ? r->n_computed + r->n_sched : r->h2o_end) : r->n_prompt;
        for (uint32_t k = 0; k < s->cap_count[i]; k++, ci++) {
            uint32_t at = r->n_computed + s->cap_first[i] + k - (w1 - w);
            for (uint32_t l = 0; l < hp->n_layer; l++)
                memcpy(dst + ((size_t)l * w + at) * qd, s->cap_q + ((size_t)l * n_cap + ci) * qd,
                       qd * sizeof(float));
        }
    }
}

/* A SnapKV policy with the model's defaults filled in. */
static model_snapkv_policy_t
snap_policy(const sched_kv_policy_t *kv)
{
    model_snapkv_policy_t p = {
        .budget = kv->budget_tokens, .window = kv->window, .kernel = kv->kernel};
    model_snapkv_defaults(&p);
    return p;
}

/* H2O's recent share of the budget: window, or half of it. */
static uint32_t
h2o_recent(const sched_kv_policy_t *kv)
{
    return kv->window ? kv->window : kv->budget_tokens / 2;
}

/* kv_table_compact, the blocks past the sinks and the residual window
 * written quantized as seal_blocks would.  Its full-precision blocks may
 * still hold this step's chunks of requests whose turn to be sealed comes
 * later in the step: when short, seal every running request now (what
 * their turn would do) and retry. */
static int
compact_table(sched_t *s, req_t *r, uint32_t n_keep, const int32_t *keep)
{
    const uint32_t head = s->cfg.kv_sink_tokens, tail = s->cfg.kv_residual_tokens;
    int rc = kv_table_compact(r->table, n_keep, keep, head, tail);
    if (rc == KVS_EAGAIN && s->cfg.kv_quant != KERN_KVQ_NONE && seal_running(s, tail) > 0)
        rc = kv_table_compact(r->table, n_keep, keep, head, tail);
    if (rc < 0)
        return rc;
    atomic_fetch_add(&s->load_sealed, (uint64_t)rc);
    return 0;
}

/* SnapKV at the end of r's prefill (the table holds exactly the prompt):
 * keeps the budget's best entries per layer and KV head.  A pool too
 * short for the compacted copy leaves the KV whole (logged).  A backend
 * failure fails the request (returns false). */
static bool
snap_compress(sched_t *s, req_t *r)
{
    r->snap_done = true;
    uint32_t n = kv_table_len(r->table);
    if (n <= r->kv.budget_tokens)
        return true;
    const model_hparams_t *hp = model_hparams(s->m);
    model_snapkv_policy_t p = {
        .budget = r->kv.budget_tokens, .window = r->snap_w, .kernel = r->kv.kernel};
    int32_t *keep = malloc((size_t)hp->n_layer * hp->n_head_kv * p.budget * sizeof *keep);
    int rc = keep ? 0 : KVS_ENOMEM;
    if (rc == 0)
        rc = model_snapkv_select(s->m, kv_pool_kv(s->pool), kv_table_blocks(r->table), n, r->snap_q,
                                 r->snap_w, &p, keep);
    uint32_t k = rc > 0 ? (uint32_t)rc : 0;
    if (rc > 0)
        rc = compact_table(s, r, k, keep);
    free(keep);
    if (rc == 0) {
        r->usage.kv_dropped_tokens += n - k;
        atomic_fetch_add(&s->load_snapkv, 1);
        return true;
    }
    if (rc == KVS_EAGAIN || rc == KVS_ENOSPC) {
        KVS_INFOF("sched: request %s: no room to compact its KV (SnapKV), kept whole", r->name);
        return true;
    }
    KVS_ERRORF("sched: SnapKV compression of request %s failed: %s", r->name, kvs_strerror(rc));
    finish(s, r, SCHED_FINISH_ERROR, rc);
    return false;
}

/* Compacts an H2O table of n entries to its budget: per layer and KV
 * head the recent window plus the best-scored older entries, the scores
 * moved along.  Same failure handling as snap_compress. */
static bool
h2o_compact(sched_t *s, req_t *r, uint32_t n)
{
    const model_hparams_t *hp = model_hparams(s->m);
    const uint32_t n_lists = hp->n_layer * hp->n_head_kv, budget = r->kv.budget_tokens;
    const uint32_t recent = h2o_recent(&r->kv);
    int32_t *keep = malloc((size_t)n_lists * budget * sizeof *keep);
    int rc = keep ? 0 : KVS_ENOMEM;
    if (rc == 0)
        rc = model_h2o_select(r->h2o_a, n_lists, n, r->h2o_stride, budget, recent, keep);
    uint32_t k = rc > 0 ? (uint32_t)rc : 0;
    if (rc > 0)
        rc = compact_table(s, r, k, keep);
    if (rc == 0) {
        /* Lists are ascending, so moving down in place never overwrites
         * a score still to be read. */
        for (uint32_t l = 0; l < n_lists; l++) {
            double *a = r->h2o_a + (size_t)l * r->h2o_stride;
            for (uint32_t i = 0; i < k; i++)
                a[i] = a[keep[(size_t)l * k + i]];
            memset(a + k, 0, (size_t)(r->h2o_stride - k) * sizeof *a);
        }
        r->usage.kv_dropped_tokens += n - k;
        atomic_fetch_add(&s->load_h2o, 1);
    }
    free(keep);
    if (rc == 0)
        return true;
    if (rc == KVS_EAGAIN || rc == KVS_ENOSPC) {
        /* Tried again after the next step (ENOSPC: a pool whose
         * full-precision blocks cannot hold the sinks, the residual window
         * and a staging block beside them). */
        KVS_DEBUGF("sched: request %s: no room to compact its KV (H2O), kept whole", r->name);
        return true;
    }
    KVS_ERRORF("sched: H2O compaction of request %s failed: %s", r->name, kvs_strerror(rc));
    finish(s, r, SCHED_FINISH_ERROR, rc);
    return false;
}

/* H2O after r's step: at the end of the dense phase the scores start from
 * the captured window (SnapKV's votes unpooled: the full causal matrix's
 * column sums, as the reference accumulates them, would cost the
 * prefill's attention again); each decode step adds its row.  Past budget
 * + block_tokens entries the table is compacted, so at most once per
 * block of decode.  A failure fails the request (returns false). */
static bool
h2o_step(sched_t *s, req_t *r)
{
    bool init = !r->h2o_live;
    if (init && r->n_computed < r->h2o_end)
        return true;
    const model_hparams_t *hp = model_hparams(s->m);
    const size_t n_lists = (size_t)hp->n_layer * hp->n_head_kv;
    const uint32_t n = kv_table_len(r->table), bt = s->cfg.block_tokens;
    int rc = 0;
    if (n > r->h2o_stride || init) {
        /* A compaction short of blocks lets the table outgrow its
         * scores; grow them with room for a block more. */
        uint32_t stride = n + bt;
        uint64_t want = (uint64_t)r->kv.budget_tokens + bt + 1;
        if (init && want > stride)
            stride = (uint32_t)want;
        double *a = calloc(n_lists * stride, sizeof *a);
        if (a == NULL) {
            rc = KVS_ENOMEM;
        } else {
            for (size_t l = 0; !init && l < n_lists; l++)
                memcpy(a + l * stride, r->h2o_a + l * r->h2o_stride, r->h2o_stride * sizeof *a);
            free(r->h2o_a);
            r->h2o_a = a;
            r->h2o_stride = stride;
        }
    }
    if (rc == 0)
        rc = model_h2o_scores(s->m, kv_pool_kv(s->pool), kv_table_blocks(r->table), n, r->h2o_q,
                              init ? r->h2o_w : 1, r->h2o_stride, r->h2o_a);
    if (rc == 0) {
        r->h2o_live = true;
        if ((uint64_t)n > (uint64_t)r->kv.budget_tokens + bt)
            return h2o_compact(s, r, n);
        return true;
    }
    KVS_ERRORF("sched: H2O scores of request %s failed: %s", r->name, kvs_strerror(rc));
    finish(s, r, SCHED_FINISH_ERROR, rc);
    return false;
}

/* Draws r's next token from its row of logits (teacher forcing and
 * min_tokens' bans applied), appends it and queues its event.  Touches r
 * and the outbox only, so the draws of different requests may run at
 * once.  Returns the token or a negative error; *chosen is 1 when the
 * token completes r's guided choice or match. */
static int32_t
draw_token(sched_t *s, req_t *r, const float *row, int32_t x, const float *q, uint64_t now,
           int *chosen)
{
    /* The penalties see the prompt before the first token (the
     * sampler's buffers come then, not while the request waits). */
    int rc =
        r->n_tokens == r->n_prompt ? model_sampler_prompt(r->sampler, r->tokens, r->n_prompt) : 0;
    uint32_t k = r->n_tokens - r->n_prompt;
    /* Guided decoding draws through a bitmask of the tokens the choice or
     * guide keeps (the sampler looks at those only); logprobs stay the
     * row's.  Nothing left to draw comes back from the sampler as
     * KVS_EINVAL. */
    const uint64_t *allow = NULL;
    if (rc == 0 && r->choice) {
        if ((allow = model_choice_allowed(r->choice, NULL)) == NULL)
            rc = KVS_ENOMEM;
    } else if (rc == 0 && r->guide) {
        allow = model_guide_allowed(r->guide, NULL, &rc);
    }
    int32_t tok = rc                  ? rc
                  : k < r->n_forced   ? r->tokens[r->n_tokens]
                  : k < r->min_tokens ? sample_banned(s, r, row, allow, x, q)
                  : q                 ? model_sampler_verify(r->sampler, row, allow, x, q)
                  : allow             ? model_sampler_sample_masked(r->sampler, row, allow)
                                      : model_sampler_sample(r->sampler, row);
    rc = tok < 0 ? tok : model_sampler_accept(r->sampler, tok);
    *chosen = rc || k < r->n_forced ? 0
              : r->choice           ? model_choice_accept(r->choice, tok)
              : r->guide            ? model_guide_accept(r->guide, tok)
                                    : 0;
    if (*chosen < 0)
        rc = *chosen;
    if (rc)
        return rc;
    r->tokens[r->n_tokens++] = tok; /* capacity reserved at submit */
    if (r->t_first_token == 0) {
        r->t_first_token = now;
        r->usage.ttft_ns = now - r->t_submit;
    }
    sched_event_t ev = {.kind = SCHED_EV_TOKEN, .req_id = r->id, .index = r->index, .token = tok};
    if (r->logprobs) {
        int n = model_logprobs(row, s->n_vocab, tok, r->top_logprobs, &ev.lp.logprob, ev.lp.top_ids,
                               ev.lp.top_lps);
        ev.has_logprobs = n >= 0;
        ev.lp.n_top = n > 0 ? (uint32_t)n : 0;
    }
    emit(s, &ev);
    return tok;
}

/* After draw_token (tok, or an error): ends r when the draw failed or r is
 * done.  Returns false when r ended (it is freed). */
static bool
drawn(sched_t *s, req_t *r, int32_t tok, int chosen)
{
    sched_finish_t why;
    if (tok < 0) {
        KVS_ERRORF("sched: sampling for request %s failed: %s", r->name, kvs_strerror(tok));
        finish(s, r, SCHED_FINISH_ERROR, tok);
    } else if (chosen == 1) {
        finish(s, r, SCHED_FINISH_STOP, 0);
    } else if (is_finished(s, r, tok, &why)) {
        finish(s, r, why, 0);
    } else {
        return true;
    }
    return false;
}

/* ---- draws of a step, in parallel ------------------------------------------------ */

/* A step's draws wait in s->draws until its other work is done, then run
 * on the engine thread and the sampling threads at once: each touches its
 * own request and the outbox (so each token still goes out as soon as it
 * is drawn), and the engine thread then ends the requests that are done
 * and, after a proposal, lets the rejected entries' KV go.  Until then a
 * request keeps n_spec, so that nothing seals a block holding a proposed
 * entry (seal_running skips it).  With a logits hook (not known to be
 * thread-safe) or one thread, all run on the engine thread, in order. */
typedef void (*pool_fn_t)(sched_t *s, uint32_t i);

typedef struct draw {
    req_t *r;
    const float *rows; /* rows[0..n_spec] */
    uint32_t n_spec;   /* proposed tokens */
    uint32_t kept;     /* of them, accepted */
    int32_t prop[SCHED_MAX_SPEC_TOKENS];
    const float *q; /* the draft's distributions the proposal came from (NULL: exact) */
    int32_t tok;    /* the last token drawn, or an error */
    int chosen;
} draw_t;

/* Draws from each row in turn while the proposal holds: row j's token is
 * plain decoding's, since rows 0..j-1 drew the proposal's tokens (with
 * the draft's distributions q, speculative sampling's test, which keeps
 * plain decoding's distribution, not its draws). */
static void
draw_run(sched_t *s, draw_t *d, uint64_t now)
{
    req_t *r = d->r;
    sched_finish_t why;
    for (uint32_t j = 0;; j++) {
        const float *row = d->rows + (size_t)j * s->n_vocab;
        if (s->logits_hook)
            s->logits_hook(s->logits_arg, r->id, row, s->n_vocab);
        const float *q = d->q && j < d->n_spec ? d->q + (size_t)j * s->n_vocab : NULL;
        d->tok = draw_token(s, r, row, q ? d->prop[j] : -1, q, now, &d->chosen);
        if (d->tok < 0 || d->chosen == 1 || j == d->n_spec || d->tok != d->prop[j] ||
            is_finished(s, r, d->tok, &why))
            return;
        r->n_computed++;
        r->usage.spec_accepted_tokens++;
        atomic_fetch_add(&s->load_spec_accepted, 1);
        atomic_fetch_add(&s->load_spec_pos[j], 1);
        d->kept++;
    }
}

/* Jobs 0..pool_n - 1 of pool_fn, handed out one at a time, to every thread. */
static void
pool_take(sched_t *s)
{
    for (;;) {
        uint32_t i = atomic_fetch_add(&s->pool_next, 1);
        if (i >= s->pool_n)
            return;
        s->pool_fn(s, i);
    }
}

static void *
pool_worker(void *arg)
{
    sched_t *s = arg;
    uint64_t seen = 0;
    pthread_mutex_lock(&s->pool_mu);
    for (;;) {
        while (!s->pool_stop && s->pool_gen == seen)
            pthread_cond_wait(&s->pool_cv, &s->pool_mu);
        if (s->pool_stop)
            break;
        seen = s->pool_gen;
        pthread_mutex_unlock(&s->pool_mu);
        pool_take(s);
        pthread_mutex_lock(&s->pool_mu);
        if (--s->pool_busy == 0)
            pthread_cond_broadcast(&s->pool_done);
    }
    pthread_mutex_unlock(&s->pool_mu);
    return NULL;
}

/* Runs fn(s, 0 .. n - 1) on the engine thread and the sampling threads
 * (started on first use, by the engine thread, whose niceness they take),
 * or on the engine thread alone when there are none, the jobs are few, or
 * (auto, sample_threads 0) they cover fewer than 256K logits in all:
 * waking threads costs tens of microseconds.  Returns when all are done. */
static void
pool_run(sched_t *s, pool_fn_t fn, uint32_t n, uint64_t logits)
{
    bool par = s->n_pool_threads > 0 && n >= 2 && (s->cfg.sample_threads || logits >= 1u << 18);
    if (par && s->pool_th == NULL) {
        s->pool_th = calloc(s->n_pool_threads, sizeof *s->pool_th);
        uint32_t started = 0;
        while (s->pool_th && started < s->n_pool_threads &&
               pthread_create(&s->pool_th[started], NULL, pool_worker, s) == 0)
            started++;
        s->pool_started = started;
    }
    s->pool_fn = fn;
    s->pool_n = n;
    atomic_store(&s->pool_next, 0);
    if (!par || s->pool_started == 0) {
        pool_take(s);
        return;
    }
    pthread_mutex_lock(&s->pool_mu);
    s->pool_busy = s->pool_started;
    s->pool_gen++;
    pthread_cond_broadcast(&s->pool_cv);
    pthread_mutex_unlock(&s->pool_mu);
    pool_take(s);
    pthread_mutex_lock(&s->pool_mu);
    while (s->pool_busy)
        pthread_cond_wait(&s->pool_done, &s->pool_mu);
    pthread_mutex_unlock(&s->pool_mu);
}

/* Draw job i (guided ones too: an automaton is shared only where nothing
 * writes it, the token table is published once, and what a mask walk
 * writes is the guide's own, model.h). */
static void
draw_job(sched_t *s, uint32_t i)
{
    draw_run(s, &s->draws[i], s->draw_now);
}

/* After a proposal's draws: its next length, and the rejected entries'
 * KV let go before sealing, so no quantized block holds one. */
static void
spec_end(sched_t *s, req_t *r, const draw_t *d)
{
    /* The next proposal: one longer than the run that held, two more
     * after a whole one held.  Rows that are thrown away cost a compute-bound
     * model (a small one, or a large batch) nearly what kept ones do, so a
     * lookup that keeps failing proposes one token, not
     * num_speculative_tokens. */
    uint32_t k = s->cfg.num_speculative_tokens, a = d->kept, n = d->n_spec;
    r->n_spec = 0;
    r->spec_len = a < n ? a + 1 : n + 2 < k ? n + 2 : k;
    spec_missed(r, a == 0);
    if (a < n)
        kv_table_truncate(r->table, kv_table_len(r->table) - (n - a));
    if (seal_blocks(s, r, s->cfg.kv_residual_tokens))
        commit_prefix(s, r);
}

/* Runs the step's draws, then ends or keeps each request. */
static void
draws_flush(sched_t *s, uint64_t now)
{
    uint32_t n = s->n_draws;
    if (n == 0)
        return;
    uint64_t rows = 0;
    for (uint32_t i = 0; i < n; i++)
        rows += 1 + s->draws[i].n_spec;
    s->draw_now = now;
    if (s->logits_hook) /* in order, on this thread */
        for (uint32_t i = 0; i < n; i++)
            draw_run(s, &s->draws[i], now);
    else
        pool_run(s, draw_job, n, rows * s->n_vocab);
    s->n_draws = 0;
    for (uint32_t i = 0; i < n; i++) {
        const draw_t *d = &s->draws[i];
        if (!drawn(s, d->r, d->tok, d->chosen))
            continue; /* r ended, its KV with it */
        if (d->n_spec)
            spec_end(s, d->r, d);
        else
            commit_prefix(s, d->r);
    }
}

/* r draws from `row` with the step's other draws (draws_flush). */
static void
draw_later(sched_t *s, req_t *r, const float *row)
{
    s->draws[s->n_draws++] = (draw_t){.r = r, .rows = row};
}

/* r's step computed its last token and its n_spec proposed ones, whose
 * logits are rows[0..n_spec]: they are drawn with the step's other draws. */
static void
spec_draw_later(sched_t *s, req_t *r, const float *rows)
{
    draw_t *d = &s->draws[s->n_draws++];
    *d = (draw_t){.r = r, .rows = rows, .n_spec = r->n_spec, .q = r->sd_q};
    memcpy(d->prop, r->tokens + r->n_tokens, d->n_spec * sizeof *d->prop);
    r->n_computed -= d->n_spec; /* the last token's entry; each accepted proposal adds its own */
    r->usage.spec_draft_tokens += d->n_spec;
    atomic_fetch_add(&s->load_spec_draft, d->n_spec);
    atomic_fetch_add(&s->load_spec_drafts, 1);
}

/* Sample `index` of sample 0's (r's) request, as r's prefill left it:
 * its tokens, its policies' state in buffers of the sizes sched_submit
 * and the draft phase give them, a sampler of its own seed, and no KV
 * yet.  NULL when out of memory. */
static req_t *
req_clone(sched_t *s, const req_t *r, uint32_t index)
{
    const model_hparams_t *hp = model_hparams(s->m);
    const size_t n_lists = (size_t)hp->n_layer * hp->n_head_kv;
    req_t *c = malloc(sizeof *c);
    if (c == NULL)
        return NULL;
    *c = *r;
    memset(&c->msg, 0, sizeof c->msg);
    c->prev = c->next = NULL;
    c->table = c->d_table = c->sd_table = NULL;
    c->sd_q = NULL;
    c->ban_bits = NULL;
    c->sd_n = 0;
    c->sampler = NULL;
    c->d_tokens = NULL; /* drafting is over (the first logits came after it) */
    c->qs = NULL;
    c->index = index;
    c->plp = false; /* the request's, reported by sample 0 */
    c->fork_pending = false;
    c->cancel_mask = 0;
    c->n_sched = 0;
    model_sampling_t sp = *model_sampler_cfg(r->sampler); /* its bias arrays are its own */
    sp.seed = sched_sample_seed(sp.seed, index);
    c->tokens = kvs_memdup(r->tokens, (size_t)r->cap * sizeof *r->tokens);
    c->min_ban = kvs_memdup(r->min_ban, r->n_min_ban * sizeof *r->min_ban);
    c->kept = kvs_memdup(r->kept, (size_t)r->n_prompt * sizeof *r->kept);
    c->kept_tok = kvs_memdup(r->kept_tok, (size_t)r->n_prompt * sizeof *r->kept_tok);
    c->snap_q = kvs_memdup(r->snap_q, query_floats(s, r->snap_w) * sizeof *r->snap_q);
    c->h2o_q = kvs_memdup(r->h2o_q, query_floats(s, h2o_window(r->cap)) * sizeof *r->h2o_q);
    c->h2o_a = kvs_memdup(r->h2o_a, n_lists * r->h2o_stride * sizeof *r->h2o_a);
    bool ok = !c->tokens == !r->tokens && !c->min_ban == !r->min_ban && !c->kept == !r->kept &&
              !c->kept_tok == !r->kept_tok && !c->snap_q == !r->snap_q && !c->h2o_q == !r->h2o_q &&
              !c->h2o_a == !r->h2o_a;
    c->choice = NULL;
    c->guide = NULL;
    if (!ok || model_sampler_new(&sp, s->n_vocab, &c->sampler) != 0 ||
        (r->choice && model_choice_clone(r->choice, &c->choice) != 0) ||
        (r->guide && model_guide_clone(r->guide, &c->guide) != 0)) {
        req_free(c);
        return NULL;
    }
    return c;
}

/* Sample 0 (r) of a request of n has its first logits, in `row`: the
 * other samples start.  Each that finds a free sequence and, when the
 * prompt ends inside a block, a free block for its copy forks r's KV
 * and draws its first token from the row now; the rest wait to prefill
 * the prompt themselves (from the prefix cache where it holds r's
 * blocks).  Returns false when r itself ended. */
static bool
fork_samples(sched_t *s, req_t *r, float *row, uint64_t now)
{
    /* No table seals a block it shares: seal the prompt now, all of it
     * but a partial last block. */
    if (!seal_blocks(s, r, 0))
        return false;
    r->fork_pending = false;
    for (uint32_t i = 1; i < r->n_samples; i++) {
        req_t *c = r->cancel_mask >> i & 1 ? NULL : req_clone(s, r, i);
        if (c == NULL) {
            finish_unforked(s, r, i, SCHED_FINISH_ERROR, KVS_ENOMEM);
            continue;
        }
        int rc =
            s->running.n < s->cfg.max_num_seqs ? kv_table_fork(r->table, &c->table) : KVS_EAGAIN;
        if (rc == 0) {
            /* The prompt's usage is the request's, shared. */
            c->state = REQ_RUNNING;
            list_insert_sorted(&s->running, c);
            draw_later(s, c, row);
            continue;
        }
        drop_kv(c);
        c->usage = (sched_usage_t){.prompt_tokens = r->n_prompt,
                                   .draft_ns = r->usage.draft_ns,
                                   .kept_prompt_tokens = r->usage.kept_prompt_tokens};
        c->admitted_once = false;
        c->state = REQ_WAITING;
        list_insert_sorted(&s->waiting, c);
    }
    if (r->cancel_mask & 1) {
        finish(s, r, SCHED_FINISH_CANCELLED, KVS_ECANCELED);
        return false;
    }
    return true;
}

/* prompt_logprobs' row i of the current call (one job of pool_run). */
static void
plp_job(sched_t *s, uint32_t i)
{
    sched_logprobs_t *lp = &s->plp_out[i];
    int got = model_logprobs(s->plp_rows + (size_t)i * s->n_vocab, s->n_vocab, s->plp_toks[i],
                             s->plp_top, &lp->logprob, lp->top_ids, lp->top_lps);
    lp->n_top = got > 0 ? (uint32_t)got : 0;
}

/* prompt_logprobs for the n rows r computed from prompt position c0 on:
 * row k predicts prompt token c0 + k + 1.  Those not reported before go
 * out in one event.  Out of memory fails r (returns false). */
static bool
prompt_logprobs(sched_t *s, req_t *r, uint32_t c0, uint32_t n, const float *rows)
{
    uint32_t first = c0 + 1, skip = r->plp_next > first ? r->plp_next - first : 0;
    if (skip >= n)
        return true;
    sched_logprobs_t *a = malloc((n - skip) * sizeof *a);
    if (a) {
        s->plp_rows = rows + (size_t)skip * s->n_vocab;
        s->plp_toks = r->tokens + first + skip;
        s->plp_out = a;
        s->plp_top = r->plp_top;
        pool_run(s, plp_job, n - skip, (uint64_t)(n - skip) * s->n_vocab);
    }
    sched_event_t ev = {.kind = SCHED_EV_PROMPT_LOGPROBS,
                        .req_id = r->id,
                        .plp_first = first + skip,
                        .n_plp = n - skip,
                        .plp = a};
    if (a == NULL || !emit(s, &ev)) {
        free(a);
        finish(s, r, SCHED_FINISH_ERROR, KVS_ENOMEM);
        return false;
    }
    r->plp_next = first + n;
    return true;
}

/* The main model's forward pass over sched_reqs[0..n_steps), then
 * sampling and events. */
static int
main_forward(sched_t *s)
{
    for (uint32_t i = 0; i < s->n_steps; i++) {
        req_t *r = s->sched_reqs[i];
        if (r->kept && r->kept_done < r->n_kept) {
            /* A speculative prefill: kept tokens at their own positions.
             * Sample after the last one unless tokens generated before a
             * preemption are still to be recomputed. */
            uint32_t k0 = r->kept_done;
            bool last = k0 + r->n_sched == r->n_kept && r->n_tokens == r->n_prompt;
            s->steps[i] = (sched_seq_step_t){.table = r->table,
                                             .tokens = r->kept_tok + k0,
                                             .n_tokens = r->n_sched,
                                             .pos = r->kept + k0,
                                             .want_logits = last,
                                             .policy = &r->attn,
                                             .n_prompt = r->n_kept};
            count_keys(r, k0, r->n_sched, r->n_kept);
            r->usage.computed_prompt_tokens += r->n_sched;
        } else {
            /* A proposal's rows all want logits: lead rows and the last. */
            bool last = r->n_computed + r->n_sched == r->n_tokens + r->n_spec;
            s->steps[i] =
                (sched_seq_step_t){.table = r->table,
                                   .tokens = r->tokens + r->n_computed,
                                   .n_tokens = r->n_sched,
                                   .want_logits = last,
                                   .lead_logits = r->n_spec ? r->n_spec : plp_rows(r, r->n_sched),
                                   .policy = &r->attn,
                                   .n_prompt = r->kept ? r->n_kept : r->n_prompt};
            if (r->n_computed < r->n_prompt && !r->kept) {
                count_keys(r, r->n_computed, r->n_sched, r->n_prompt);
                uint32_t end = r->n_computed + r->n_sched;
                r->usage.computed_prompt_tokens +=
                    (end < r->n_prompt ? end : r->n_prompt) - r->n_computed;
            }
        }
        s->step_ids[i] = r->id;
    }
    const model_batch_t *mb;
    int rc = sched_batch_build(s->batch, s->steps, s->n_steps, &mb);
    uint32_t n_cap = 0;
    if (rc == 0)
        rc = snap_capture(s, &n_cap);
    if (rc == 0 && s->hook)
        s->hook(s->hook_arg, mb, s->step_ids);
    if (rc == 0)
        rc = model_forward(s->ctx, kv_pool_kv(s->pool), mb, s->logits);
    if (rc) {
        /* A backend failure fails the step's requests, not the engine. */
        KVS_ERRORF("sched: step of %u sequences failed: %s", s->n_steps, kvs_strerror(rc));
        for (uint32_t i = 0; i < s->n_steps; i++)
            finish(s, s->sched_reqs[i], SCHED_FINISH_ERROR, rc);
        return rc;
    }
    if (n_cap)
        snap_store(s, n_cap);
    uint32_t li = 0;
    uint64_t now = kvs_now_ns();
    for (uint32_t i = 0; i < s->n_steps; i++) {
        req_t *r = s->sched_reqs[i];
        uint32_t c0 = r->n_computed, lead = s->steps[i].lead_logits;
        if (r->kept && r->kept_done < r->n_kept) {
            r->kept_done += r->n_sched;
            if (r->kept_done == r->n_kept)
                r->n_computed = r->n_prompt; /* decoding goes on at position n_prompt */
        } else {
            r->n_computed += r->n_sched;
        }
        r->n_sched = 0;
        if (r->n_spec) {
            float *rows = s->logits + (size_t)li * s->n_vocab;
            li += r->n_spec + 1;
            spec_draw_later(s, r, rows);
            continue;
        }
        /* The rows as sched_batch_build lays them out: the lead rows,
         * then the last unless it was one of them. */
        const float *lead_rows = s->logits + (size_t)li * s->n_vocab;
        li += lead;
        float *row = s->steps[i].want_logits && lead < s->steps[i].n_tokens
                         ? s->logits + (size_t)li++ * s->n_vocab
                         : NULL;
        if (lead && !prompt_logprobs(s, r, c0, lead, lead_rows))
            continue;
        if (r->kv.kind == SCHED_KV_SINK_EVICTION)
            r->usage.kv_dropped_tokens +=
                (uint64_t)kv_table_evict(r->table, r->kv.sinks, r->kv.budget_tokens) *
                s->cfg.block_tokens;
        if (!seal_blocks(s, r, s->cfg.kv_residual_tokens))
            continue;
        /* Sealed first, so the compacted copy finds full-precision blocks
         * free (it is written in full precision, and a compaction seals it
         * in turn). */
        if (r->snap_q && !r->snap_done && r->n_computed >= r->n_prompt && !snap_compress(s, r))
            continue;
        if (r->h2o_q && !h2o_step(s, r))
            continue;
        if (row == NULL) {
            commit_prefix(s, r); /* a prefill chunk: share its full blocks early */
            continue;
        }
        if (r->fork_pending && !fork_samples(s, r, row, now))
            continue;
        draw_later(s, r, row);
    }
    draws_flush(s, now);
    return 0;
}

static int
step_once(sched_t *s)
{
    drain_inbox(s);
    s->spec_off = s->cfg.spec_disable_batch && s->running.n >= s->cfg.spec_disable_batch;
    if (s->cfg.spec_draft_model)
        sd_propose(s, false);
    plan(s);
    if (s->cfg.spec_draft_model)
        sd_propose(s, true);
    /* Draft work leaves the main list (compacted in place) for its own
     * forward pass. */
    uint32_t n_main = 0, n_draft = 0;
    for (uint32_t i = 0; i < s->n_steps; i++) {
        req_t *r = s->sched_reqs[i];
        if (r->draft_step)
            s->d_reqs[n_draft++] = r;
        else
            s->sched_reqs[n_main++] = r;
    }
    s->n_steps = n_main;
    int rc = n_main ? main_forward(s) : 0;
    if (rc == 0 && n_draft)
        rc = draft_forward(s, n_draft);
    s->n_steps += n_draft; /* sched_step counts steps that ran a model */
    return rc < 0 ? rc : (int)(s->waiting.n + s->running.n);
}

/* ---- public ------------------------------------------------------------------ */

int
sched_check_policy(const sched_t *s, const model_attn_policy_t *attn,
                   const model_spec_policy_t *spec, const sched_kv_policy_t *kv)
{
    if (model_attn_policy_check(attn) || model_spec_policy_check(spec))
        return KVS_EINVAL;
    if (kv && kv->kind != SCHED_KV_FULL) {
        uint32_t bt = s->cfg.block_tokens;
        if (kv->kind > SCHED_KV_H2O || kv->budget_tokens == 0)
            return KVS_EINVAL;
        if (kv->kind == SCHED_KV_SINK_EVICTION &&
            kv->budget_tokens < sched_kv_min_budget(kv->sinks, bt))
            return KVS_EINVAL;
        if (kv->kind == SCHED_KV_SNAPKV) {
            model_snapkv_policy_t p = snap_policy(kv);
            if (model_snapkv_check(&p))
                return KVS_EINVAL;
        }
        if (kv->kind == SCHED_KV_H2O && h2o_recent(kv) >= kv->budget_tokens)
            return KVS_EINVAL;
        if ((kv->kind == SCHED_KV_SNAPKV || kv->kind == SCHED_KV_H2O) && spec->on)
            return KVS_EINVAL; /* its prompt KV is not the prompt's */
    }
    if (spec->on && !s->draft)
        return KVS_ENOTSUP;
    return 0;
}

static bool
in_vocab(const sched_t *s, const int32_t *ids, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (ids[i] < 0 || (uint32_t)ids[i] >= s->n_vocab)
            return false;
    return true;
}

int
sched_submit(sched_t *s, const sched_request_t *q)
{
    if (q->prompt == NULL || q->n_prompt == 0 || q->max_tokens == 0 ||
        q->top_logprobs > SCHED_MAX_LOGPROBS || q->n_forced > q->max_tokens ||
        (q->n_forced > 0 && q->forced == NULL) || q->min_tokens > q->max_tokens ||
        q->n_min_ban > SCHED_MAX_MIN_BAN || (q->n_min_ban > 0 && q->min_ban == NULL) ||
        q->n > SCHED_MAX_N || q->top_prompt_logprobs > SCHED_MAX_LOGPROBS ||
        (q->prompt_logprobs && q->spec.on) || ((q->n_choices || q->guide) && q->n_forced) ||
        (q->n_choices && q->guide))
        return KVS_EINVAL;
    model_spec_policy_t spec = q->spec;
    model_spec_policy_defaults(&spec);
    int rc = sched_check_policy(s, &q->attn, &spec, &q->kv);
    if (rc)
        return rc;
    if (spec.on && ((uint64_t)q->n_prompt + spec.look_ahead - 1 + s->cfg.block_tokens - 1) /
                           s->cfg.block_tokens >
                       kv_pool_cfg(s->d_pool)->n_blocks)
        return KVS_ENOSPC;
    uint64_t total = (uint64_t)q->n_prompt + q->max_tokens;
    if (total > s->cfg.max_model_len)
        return KVS_ERANGE;
    if (!in_vocab(s, q->prompt, q->n_prompt) || !in_vocab(s, q->forced, q->n_forced) ||
        !in_vocab(s, q->min_ban, q->n_min_ban))
        return KVS_EINVAL;
    /* With eviction a sequence holds at most its budget plus one step's
     * tokens (and a block of slack on each side). */
    uint64_t held = total, slack = 0;
    if (q->kv.kind == SCHED_KV_SINK_EVICTION &&
        (uint64_t)q->kv.budget_tokens + s->cfg.max_num_batched_tokens < held) {
        held = (uint64_t)q->kv.budget_tokens + s->cfg.max_num_batched_tokens;
        slack = 1;
    }
    uint64_t blocks = (held + s->cfg.block_tokens - 1) / s->cfg.block_tokens + slack;
    if (blocks > kv_pool_cfg(s->pool)->n_blocks)
        return KVS_ENOSPC;
    req_t *r = calloc(1, sizeof *r);
    if (r == NULL)
        return KVS_ENOMEM;
    rc = model_sampler_new(&q->sampling, s->n_vocab, &r->sampler);
    if (rc == 0 && q->n_choices)
        rc = model_choice_new(s->m, q->choices, q->n_choices, &r->choice);
    if (rc == 0 && q->guide)
        rc = model_guide_clone(q->guide, &r->guide);
    if (rc) {
        req_free(r);
        return rc;
    }
    r->tokens = malloc(total * sizeof *r->tokens);
    if (r->tokens == NULL) {
        req_free(r);
        return KVS_ENOMEM;
    }
    memcpy(r->tokens, q->prompt, q->n_prompt * sizeof *r->tokens);
    if (q->name && q->name[0])
        snprintf(r->name, sizeof r->name, "%s", q->name);
    else
        snprintf(r->name, sizeof r->name, "%llu", (unsigned long long)q->id);
    /* Forced output waits where it will stand; nothing reads past
     * n_tokens. */
    if (q->n_forced > 0)
        memcpy(r->tokens + q->n_prompt, q->forced, q->n_forced * sizeof *r->tokens);
    r->n_forced = q->n_forced;
    r->min_tokens = q->min_tokens;
    if (q->min_tokens > 0 && q->n_min_ban > 0) {
        if ((r->min_ban = malloc(q->n_min_ban * sizeof *r->min_ban)) == NULL) {
            req_free(r);
            return KVS_ENOMEM;
        }
        memcpy(r->min_ban, q->min_ban, q->n_min_ban * sizeof *r->min_ban);
        r->n_min_ban = q->n_min_ban;
    }
    r->spec = spec;
    if (spec.on) {
        const model_hparams_t *dh = model_hparams(s->draft);
        r->d_tokens = malloc(((size_t)q->n_prompt + spec.look_ahead) * sizeof *r->d_tokens);
        r->qs = malloc((size_t)spec.look_ahead * dh->n_layer * dh->n_head * dh->head_dim *
                       sizeof *r->qs);
        if (!r->d_tokens || !r->qs) {
            req_free(r);
            return KVS_ENOMEM;
        }
        memcpy(r->d_tokens, q->prompt, q->n_prompt * sizeof *r->tokens);
        r->d_n = q->n_prompt;
    }
    if (q->kv.kind == SCHED_KV_SNAPKV && q->n_prompt > q->kv.budget_tokens) {
        r->snap_w = snap_policy(&q->kv).window; /* below the budget, so the prompt */
        r->snap_q = malloc(query_floats(s, r->snap_w) * sizeof *r->snap_q);
        if (r->snap_q == NULL) {
            req_free(r);
            return KVS_ENOMEM;
        }
    }
    /* Only a request that can outgrow budget + block_tokens (its last
     * token is never appended) pays for scoring. */
    if (q->kv.kind == SCHED_KV_H2O &&
        total - 1 > (uint64_t)q->kv.budget_tokens + s->cfg.block_tokens) {
        r->h2o_q = malloc(query_floats(s, h2o_window(total)) * sizeof *r->h2o_q);
        if (r->h2o_q == NULL) {
            req_free(r);
            return KVS_ENOMEM;
        }
    }
    r->msg.kind = MSG_SUBMIT;
    r->id = q->id;
    r->seq = atomic_fetch_add(&s->next_seq, 1);
    /* The prefix-cache key: tenants (salt) and anything that changes KV
     * contents (its dtype; a sparse prefill, whose later layers see other
     * hidden states) must never share blocks.  Generated tokens' KV has a
     * key of its own when a prefill of the same tokens, under the same
     * policy, would compute other KV (decode rows attend densely, or by
     * Quest): a later prompt that holds them recomputes them, and a cache
     * hit gives what a miss would.  A Quest request's prompt is prefilled
     * as a dense one's, and shares its blocks. */
    r->extra = kvs_mix64(q->cache_salt ^ kvs_mix64(0x6b76u + (uint64_t)s->cfg.kv_dtype +
                                                   ((uint64_t)s->cfg.kv_quant << 8) +
                                                   ((uint64_t)s->cfg.kv_sink_tokens << 16)));
    if (q->attn.kind != MODEL_ATTN_DENSE)
        r->extra = kvs_mix64(r->extra ^
                             kvs_mix64(((uint64_t)q->attn.kind << 56) ^
                                       ((uint64_t)q->attn.sinks << 32) ^ q->attn.window) ^
                             kvs_mix64(((uint64_t)q->attn.gamma << 2) | (q->attn.no_tail ? 2u : 0) |
                                       (q->attn.last_dense ? 1u : 0)) ^
                             kvs_mix64(0x746f706bull + ((uint64_t)q->attn.top_k << 8)));
    r->extra_gen = r->extra;
    if (q->attn.kind != MODEL_ATTN_DENSE || q->attn.decode_top_k)
        r->extra_gen = kvs_mix64(r->extra ^ kvs_mix64(0x71756573ull + q->attn.decode_top_k));
    r->attn = q->attn;
    r->kv = q->kv;
    r->block_tokens = s->cfg.block_tokens;
    r->priority = q->priority;
    r->n_tokens = r->n_prompt = q->n_prompt;
    h2o_restart(r);
    r->cap = (uint32_t)total;
    r->max_tokens = q->max_tokens;
    r->ignore_eos = q->ignore_eos;
    r->logprobs = q->logprobs;
    r->top_logprobs = q->top_logprobs;
    r->n_samples = q->n ? q->n : 1;
    r->plp = q->prompt_logprobs;
    r->plp_top = q->top_prompt_logprobs;
    r->plp_next = 1;
    r->fork_pending = r->n_samples > 1;
    r->usage.prompt_tokens = q->n_prompt;
    r->t_submit = kvs_now_ns();
    kvs_mpsc_push(&s->inbox, &r->msg.node);
    sched__kick(s);
    return 0;
}

int
sched_cancel_sample(sched_t *s, uint64_t id, uint32_t index)
{
    msg_t *m = calloc(1, sizeof *m);
    if (m == NULL)
        return KVS_ENOMEM;
    m->kind = MSG_CANCEL;
    m->id = id;
    m->index = index;
    kvs_mpsc_push(&s->inbox, &m->node);
    sched__kick(s);
    return 0;
}

int
sched_cancel(sched_t *s, uint64_t id)
{
    return sched_cancel_sample(s, id, ALL_SAMPLES);
}

void
sched_set_step_hook(sched_t *s, sched_step_hook_fn fn, void *arg)
{
    s->hook = fn;
    s->hook_arg = arg;
}

void
sched_set_logits_hook(sched_t *s, sched_logits_hook_fn fn, void *arg)
{
    s->logits_hook = fn;
    s->logits_arg = arg;
}

const sched_cfg_t *
sched_get_cfg(const sched_t *s)
{
    return &s->cfg;
}

kv_pool_t *
sched_pool(sched_t *s)
{
    return s->pool;
}

kv_pool_t *
sched_draft_pool(sched_t *s)
{
    return s->d_pool;
}

void
sched_get_load(const sched_t *s, sched_load_t *out)
{
    sched_t *w = (sched_t *)s; /* atomics only */
    out->running = atomic_load(&w->load_running);
    out->waiting = atomic_load(&w->load_waiting);
    out->preempted = atomic_load(&w->load_preempted);
    out->blocks_total = s->cfg.n_blocks;
    out->blocks_free = atomic_load(&w->load_free);
    out->blocks_cached = atomic_load(&w->load_cached);
    out->blocks_hot = s->cfg.kv_quant != KERN_KVQ_NONE ? s->cfg.kv_hot_blocks : s->cfg.n_blocks;
    out->blocks_sealed = atomic_load(&w->load_sealed);
    out->swap_outs = atomic_load(&w->load_swap_out);
    out->swap_ins = atomic_load(&w->load_swap_in);
    out->pressure_seals = atomic_load(&w->load_pressure_seals);
    out->snapkv_compressions = atomic_load(&w->load_snapkv);
    out->h2o_compactions = atomic_load(&w->load_h2o);
    /* Read on any thread: the engine's snapshot, not the tier itself. */
    out->host_bytes_used = atomic_load(&w->load_host_bytes);
    out->host_hit_tokens = atomic_load(&w->load_host_hit);
    out->steps = atomic_load(&w->load_work_steps);
    out->busy_ns = atomic_load(&w->load_busy_ns);
    out->prefix_queried_tokens = atomic_load(&w->load_pfx_queried);
    out->prefix_hit_tokens = atomic_load(&w->load_pfx_hit);
    out->spec_draft_tokens = atomic_load(&w->load_spec_draft);
    out->spec_accepted_tokens = atomic_load(&w->load_spec_accepted);
    out->spec_drafts = atomic_load(&w->load_spec_drafts);
    out->spec_positions = w->cfg.num_speculative_tokens;
    for (uint32_t i = 0; i < SCHED_MAX_SPEC_TOKENS; i++)
        out->spec_accepted_pos[i] = atomic_load(&w->load_spec_pos[i]);
    out->device_failed = atomic_load(&w->load_failed);
}

bool
sched_device_failed(const sched_t *s)
{
    return atomic_load(&((sched_t *)s)->load_failed); /* atomics only */
}

/* sched_cfg_t's defaults for fields left 0 (sched_new). */
#define DEFAULT_BLOCK_TOKENS 16
#define DEFAULT_BATCHED_TOKENS 2048
#define DEFAULT_PROMPT_LOGPROB_ROWS 256
#define DEFAULT_NUM_SEQS 256

uint32_t
sched_default_hot_blocks(const sched_cfg_t *c)
{
    /* A running request holds at most its sink blocks, its residual
     * window and its tail: a block that fills is sealed in the same step,
     * before the next reserve. */
    uint32_t bt = c->block_tokens ? c->block_tokens : DEFAULT_BLOCK_TOKENS;
    uint32_t batch = c->max_num_batched_tokens ? c->max_num_batched_tokens : DEFAULT_BATCHED_TOKENS;
    uint32_t seqs = c->max_num_seqs ? c->max_num_seqs : DEFAULT_NUM_SEQS;
    uint32_t per_seq =
        (c->kv_sink_tokens + bt - 1) / bt + (c->kv_residual_tokens + bt - 1) / bt + 1;
    return (batch + bt - 1) / bt + per_seq * seqs + 1;
}

static uint32_t
max_u32(uint32_t a, uint32_t b)
{
    return a > b ? a : b;
}

/* The largest step of m's shapes (kern_reserve_t), folded field by field
 * into r. */
static void
reserve_fold(const sched_cfg_t *c, const model_t *m, kern_reserve_t *r)
{
    const model_hparams_t *hp = model_hparams(m);
    uint32_t qd = hp->n_head * hp->head_dim, cols = hp->n_embd;
    cols = max_u32(cols, hp->n_ff);
    cols = max_u32(cols, qd);
    r->max_rows = c->max_num_batched_tokens;
    r->max_cols = max_u32(r->max_cols, cols);
    r->max_seqs = c->max_num_seqs;
    r->max_ctx = c->max_model_len;
    r->block_tokens = c->block_tokens;
    r->n_heads = max_u32(r->n_heads, hp->n_head);
    r->n_kv_heads = max_u32(r->n_kv_heads, hp->n_head_kv);
    r->head_dim = max_u32(r->head_dim, hp->head_dim);
}

/* Lets a device backend size its buffers for the largest step of m and
 * of the draft model, which runs on the same backend, once before serving
 * starts (kern_reserve; host backends have nothing to do). */
static int
reserve_backend(const sched_cfg_t *c, const model_t *m, kern_backend_t *be, const kv_pool_t *pool,
                const kv_pool_t *d_pool)
{
    kern_reserve_t r = {0};
    reserve_fold(c, m, &r);
    const kv_pool_t *pools[2] = {pool, d_pool};
    for (int i = 0; i < 2; i++)
        if (pools[i] && kv_pool_kv(pools[i])->quant != KERN_KVQ_NONE)
            r.seal_kv[i] = kv_pool_kv(pools[i]);
    r.seal_blocks = KV_SEAL_BATCH;
    uint32_t group = model_hparams(m)->n_head / model_hparams(m)->n_head_kv;
    if (c->draft) {
        reserve_fold(c, c->draft, &r);
        group =
            max_u32(group, model_hparams(c->draft)->n_head / model_hparams(c->draft)->n_head_kv);
    }
    /* Attention sizes its work by heads per KV head: the larger model's
     * group, whatever the folded head counts say. */
    r.n_heads = max_u32(r.n_heads, group * r.n_kv_heads);
    return kern_reserve(be, &r);
}

int
sched_new(model_t *m, const sched_cfg_t *cfg, sched_t **out)
{
    *out = NULL;
    const model_hparams_t *hp = model_hparams(m);
    sched_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return KVS_ENOMEM;
    s->cfg = *cfg;
    sched_cfg_t *c = &s->cfg;
    if (c->max_num_seqs == 0)
        c->max_num_seqs = DEFAULT_NUM_SEQS;
    if (c->max_num_batched_tokens == 0)
        c->max_num_batched_tokens = DEFAULT_BATCHED_TOKENS;
    if (c->prompt_logprob_rows == 0)
        c->prompt_logprob_rows = DEFAULT_PROMPT_LOGPROB_ROWS;
    if (c->prompt_logprob_rows > c->max_num_batched_tokens)
        c->prompt_logprob_rows = c->max_num_batched_tokens;
    if (c->max_model_len == 0)
        c->max_model_len = hp->n_ctx_train;
    if (c->block_tokens == 0)
        c->block_tokens = DEFAULT_BLOCK_TOKENS;
    if (c->kv_dtype != KERN_F32)
        c->kv_dtype = KERN_F16;
    if (c->prompt_lookup_max == 0)
        c->prompt_lookup_max = SCHED_DEFAULT_PROMPT_LOOKUP_MAX;
    if (c->prompt_lookup_min == 0)
        c->prompt_lookup_min = c->prompt_lookup_max < SCHED_DEFAULT_PROMPT_LOOKUP_MIN
                                   ? c->prompt_lookup_max
                                   : SCHED_DEFAULT_PROMPT_LOOKUP_MIN;
    if (c->kv_quant >= KERN_KVQ_COUNT || c->num_speculative_tokens > SCHED_MAX_SPEC_TOKENS ||
        (c->spec_draft_model && (c->draft == NULL || c->num_speculative_tokens == 0)) ||
        (c->spec_rejection && !c->spec_draft_model) ||
        c->prompt_lookup_max > SCHED_MAX_PROMPT_LOOKUP ||
        c->prompt_lookup_min > c->prompt_lookup_max ||
        c->sample_threads > SCHED_MAX_SAMPLE_THREADS) {
        free(s);
        return KVS_EINVAL;
    }
    bool quant = c->kv_quant != KERN_KVQ_NONE;
    if (quant && c->kv_hot_blocks == 0)
        c->kv_hot_blocks = sched_default_hot_blocks(c);
    kv_pool_cfg_t pc = {
        .n_layers = hp->n_layer,
        .n_kv_heads = hp->n_head_kv,
        .head_dim = hp->head_dim,
        .block_tokens = c->block_tokens,
        .n_blocks = c->n_blocks,
        .dtype = c->kv_dtype,
        .prefix_cache = c->prefix_caching,
        .quant = c->kv_quant,
    };
    kv_pool_cfg_t dc = {0};
    if (c->draft) {
        const model_hparams_t *dh = model_hparams(c->draft);
        dc = (kv_pool_cfg_t){.n_layers = dh->n_layer,
                             .n_kv_heads = dh->n_head_kv,
                             .head_dim = dh->head_dim,
                             .block_tokens = c->block_tokens,
                             .n_blocks = c->draft_n_blocks ? c->draft_n_blocks : c->n_blocks,
                             .dtype = c->kv_dtype};
    }
    if (pc.n_blocks == 0) {
        kv_pool_cfg_t one = pc; /* the size of one block of a valid pool */
        one.n_blocks = 1;
        one.n_hot = 1;
        size_t per = kv_pool_block_bytes(&one);
        if (c->draft && dc.n_blocks == 0) {
            /* Both pools get the same number of blocks out of the bytes. */
            kv_pool_cfg_t d1 = dc;
            d1.n_blocks = 1;
            per += kv_pool_block_bytes(&d1);
        }
        size_t bytes = c->kv_cache_bytes ? c->kv_cache_bytes : (size_t)1 << 30;
        if (quant && per) {
            /* The full-precision blocks first, the rest quantized. */
            size_t qper = kv_pool_quant_block_bytes(&one);
            size_t hot = (size_t)c->kv_hot_blocks * per;
            pc.n_blocks = qper && bytes > hot ? c->kv_hot_blocks + (uint32_t)((bytes - hot) / qper)
                                              : (uint32_t)(bytes / per);
        } else {
            pc.n_blocks = per ? (uint32_t)(bytes / per) : 0;
        }
        c->n_blocks = pc.n_blocks;
        if (c->draft && dc.n_blocks == 0)
            dc.n_blocks = pc.n_blocks;
    }
    if (quant) {
        if (c->kv_hot_blocks > pc.n_blocks)
            c->kv_hot_blocks = pc.n_blocks;
        pc.n_hot = c->kv_hot_blocks;
    }
    if (c->draft)
        c->draft_n_blocks = dc.n_blocks;
    s->m = m;
    s->be = model_backend(m);
    s->n_vocab = hp->n_vocab;
    kvs_mpsc_init(&s->inbox);
    kvs_mpsc_init(&s->outbox);
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_mutex_init(&s->pool_mu, NULL);
    pthread_cond_init(&s->pool_cv, NULL);
    pthread_cond_init(&s->pool_done, NULL);
    if (c->sample_threads == 0) {
        uint32_t cpus = kvs_cpu_count();
        uint32_t half = cpus > 2 ? cpus / 2 : 1;
        s->n_pool_threads =
            (half < SCHED_DEFAULT_SAMPLE_THREADS ? half : SCHED_DEFAULT_SAMPLE_THREADS) - 1;
    } else {
        s->n_pool_threads = c->sample_threads - 1;
    }
    /* The draft samples one row per sequence at most. */
    uint32_t d_max_logits =
        c->max_num_seqs < c->max_num_batched_tokens ? c->max_num_seqs : c->max_num_batched_tokens;
    uint64_t want_logits = (uint64_t)c->max_num_seqs + c->prompt_logprob_rows;
    uint32_t max_logits =
        want_logits < c->max_num_batched_tokens ? (uint32_t)want_logits : c->max_num_batched_tokens;
    int rc = pc.n_blocks == 0 ? KVS_EINVAL : kv_pool_new(&pc, s->be, &s->pool);
    if (rc == 0 && quant && !kern_supports(s->be, KERN_OP_KV_SEAL, c->kv_dtype))
        rc = KVS_ENOTSUP; /* the backend reads no quantized blocks */
    if (rc == 0 && c->draft) {
        s->draft = c->draft;
        if (model_hparams(c->draft)->n_vocab != hp->n_vocab || model_backend(c->draft) != s->be)
            rc = KVS_EINVAL;
        if (rc == 0)
            rc = kv_pool_new(&dc, s->be, &s->d_pool);
        if (rc == 0)
            rc = model_ctx_new(c->draft, c->max_num_batched_tokens, d_max_logits, &s->d_ctx);
        if (rc == 0)
            model_ctx_set_graphs(s->d_ctx, c->cuda_graphs);
        if (rc == 0)
            rc = sched_batch_new(&s->d_batch);
        if (rc == 0)
            rc = model_sampler_new(&(model_sampling_t){.top_p = 1.0f}, hp->n_vocab, &s->d_greedy);
        if (rc == 0) {
            const model_hparams_t *dh = model_hparams(c->draft);
            s->d_logits = malloc((size_t)d_max_logits * hp->n_vocab * sizeof(float));
            s->d_capture = malloc((size_t)c->max_num_seqs * dh->n_layer * dh->n_head *
                                  dh->head_dim * sizeof(float));
            s->d_want = calloc(c->max_num_seqs, sizeof *s->d_want);
            s->d_want_row = calloc(c->max_num_seqs, sizeof *s->d_want_row);
            s->d_steps = calloc(c->max_num_seqs, sizeof *s->d_steps);
            s->d_reqs = calloc(c->max_num_seqs, sizeof *s->d_reqs);
            if (!s->d_logits || !s->d_capture || !s->d_want || !s->d_want_row || !s->d_steps ||
                !s->d_reqs)
                rc = KVS_ENOMEM;
        }
    }
    if (rc == 0 && c->spec_rejection) {
        /* A step verifies at most prompt_logprob_rows proposed tokens. */
        uint64_t rows = (uint64_t)c->max_num_seqs * c->num_speculative_tokens;
        s->sd_q_rows = rows < c->prompt_logprob_rows ? (uint32_t)rows : c->prompt_logprob_rows;
        s->sd_q = malloc((size_t)s->sd_q_rows * hp->n_vocab * sizeof *s->sd_q);
        if (s->sd_q == NULL)
            rc = KVS_ENOMEM;
    }
    if (rc == 0 && c->host_kv_bytes)
        rc = kv_host_new(s->pool, c->host_kv_bytes, &s->host);
    if (rc == 0) {
        s->cap_first = calloc(c->max_num_seqs, sizeof *s->cap_first);
        s->cap_count = calloc(c->max_num_seqs, sizeof *s->cap_count);
        if (!s->cap_first || !s->cap_count)
            rc = KVS_ENOMEM;
    }
    if (rc == 0)
        rc = model_ctx_new(m, c->max_num_batched_tokens, max_logits, &s->ctx);
    if (rc == 0)
        model_ctx_set_graphs(s->ctx, c->cuda_graphs);
    /* Device memory is taken once, before serving; host memory may grow
     * when a policy first needs it. */
    if (rc == 0 && !kern_backend_is_host(s->be))
        rc = model_ctx_reserve(s->ctx, c->max_model_len, c->block_tokens,
                               c->reserve_summaries ? kv_pool_kv(s->pool) : NULL);
    if (rc == 0)
        rc = reserve_backend(c, m, s->be, s->pool, s->d_pool);
    if (rc == 0)
        rc = sched_batch_new(&s->batch);
    if (rc == 0) {
        s->logits = malloc((size_t)max_logits * hp->n_vocab * sizeof(float));
        s->sched_reqs =
            calloc(2 * (size_t)c->max_num_seqs + c->max_num_batched_tokens, sizeof *s->sched_reqs);
        s->steps = calloc(c->max_num_seqs, sizeof *s->steps);
        s->step_ids = calloc(c->max_num_seqs, sizeof *s->step_ids);
        s->draws = calloc(c->max_num_seqs, sizeof *s->draws);
        if (!s->logits || !s->sched_reqs || !s->steps || !s->step_ids || !s->draws)
            rc = KVS_ENOMEM;
    }
    if (rc) {
        sched_free(s);
        return rc;
    }
    publish_load(s);
    *out = s;
    return 0;
}

static void
free_list(req_list_t *l)
{
    req_t *r = l->head;
    while (r) {
        req_t *next = r->next;
        req_free(r);
        r = next;
    }
    l->head = l->tail = NULL;
    l->n = l->n_preempted = 0;
}

void
sched_free(sched_t *s)
{
    if (s == NULL)
        return;
    sched_thread_stop(s);
    if (s->pool_th) {
        pthread_mutex_lock(&s->pool_mu);
        s->pool_stop = true;
        pthread_cond_broadcast(&s->pool_cv);
        pthread_mutex_unlock(&s->pool_mu);
        for (uint32_t i = 0; i < s->pool_started; i++)
            pthread_join(s->pool_th[i], NULL);
        free(s->pool_th);
    }
    free(s->draws);
    pthread_mutex_destroy(&s->pool_mu);
    pthread_cond_destroy(&s->pool_cv);
    pthread_cond_destroy(&s->pool_done);
    kvs_mpsc_node_t *n;
    while ((n = kvs_mpsc_pop(&s->inbox)) != NULL) {
        msg_t *m = KVS_CONTAINER_OF(n, msg_t, node);
        if (m->kind == MSG_SUBMIT)
            req_free((req_t *)m);
        else
            free(m);
    }
    free_list(&s->waiting);
    free_list(&s->running);
    while ((n = kvs_mpsc_pop(&s->outbox)) != NULL)
        free(KVS_CONTAINER_OF(n, sched_event_t, node));
    kv_host_free(s->host);
    kv_pool_free(s->pool);
    free(s->cap_first);
    free(s->cap_count);
    free(s->cap_q);
    model_ctx_free(s->ctx);
    sched_batch_free(s->batch);
    kv_pool_free(s->d_pool);
    model_ctx_free(s->d_ctx);
    sched_batch_free(s->d_batch);
    model_sampler_free(s->d_greedy);
    free(s->d_logits);
    free(s->sd_q);
    free(s->d_capture);
    free(s->d_want);
    free(s->d_want_row);
    free(s->d_steps);
    free(s->d_reqs);
    free(s->logits);
    free(s->sched_reqs);
    free(s->steps);
    free(s->step_ids);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    free(s);
}

/* ---- engine thread ------------------------------------------------------------ */

static void *
engine_main(void *arg)
{
    sched_t *s = arg;
    if (s->cfg.thread_nice > 0 &&
        setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), s->cfg.thread_nice) != 0)
        KVS_WARNF("sched: cannot lower the engine thread's priority");
    for (;;) {
        pthread_mutex_lock(&s->mu);
        s->pending = false;
        bool stop = s->stop;
        pthread_mutex_unlock(&s->mu);
        if (stop)
            break;
        int live = sched_step(s);
        if (s->cfg.wake && atomic_exchange(&s->emitted, false))
            s->cfg.wake(s->cfg.wake_arg);
        /* After a failed step (its requests failed) others may be live:
         * step again rather than sleep until the next submission. */
        if (live != 0)
            continue;
        pthread_mutex_lock(&s->mu);
        while (!s->pending && !s->stop)
            pthread_cond_wait(&s->cv, &s->mu);
        pthread_mutex_unlock(&s->mu);
    }
    return NULL;
}

int
sched_thread_start(sched_t *s)
{
    if (s->thread_on)
        return KVS_EINVAL;
    s->stop = false;
    s->thread_on = true;
    if (pthread_create(&s->thread, NULL, engine_main, s) != 0) {
        s->thread_on = false;
        return KVS_ENOMEM;
    }
    return 0;
}

void
sched_thread_stop(sched_t *s)
{
    if (!s->thread_on)
        return;
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_signal(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    s->thread_on = false;
}
