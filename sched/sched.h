/*
 * sched/sched.h — turns "these sequences advance by these tokens" into one
 * model_batch_t over the paged cache: it reserves KV, assigns slots and
 * positions, and lays out the CSR page table, the per-token visible KV
 * lengths and the logit rows.  The continuous-batching scheduler builds
 * every step through this; offline `kvserve run` and the tests use it
 * directly.
 *
 * Thread: engine.  Depends on cache/ and model/.
 */
#ifndef SCHED_H
#define SCHED_H

#include "base/kvs.h"
#include "cache/kv.h"
#include "model/model.h"

typedef struct sched_seq_step {
    kv_table_t *table;     /* the sequence's KV */
    const int32_t *tokens; /* new tokens to compute */
    uint32_t n_tokens;     /* >= 1 */
    const int32_t *pos;    /* their RoPE positions, or NULL: next_pos, next_pos+1, ... */
    bool want_logits;      /* logits of the last new token */
    uint32_t lead_logits;  /* and of the first lead_logits new tokens (prompt logprobs) */
    const model_attn_policy_t *policy; /* prefill attention, or NULL: dense */
    uint32_t n_prompt;                 /* rows with kv_len <= n_prompt follow the policy */
} sched_seq_step_t;

typedef struct sched_batch sched_batch_t;

int sched_batch_new(sched_batch_t **out);
void sched_batch_free(sched_batch_t *b); /* NULL is a no-op */

/* Reserves KV for every step first (so a KVS_EAGAIN / KVS_ENOSPC answer
 * leaves every table's contents unchanged), then appends the entries and
 * fills the batch.  *out stays valid until the next build or free.
 * Returns 0, KVS_EAGAIN, KVS_ENOSPC, KVS_EINVAL or KVS_ENOMEM. */
int sched_batch_build(sched_batch_t *b, const sched_seq_step_t *steps, uint32_t n_steps,
                      const model_batch_t **out);
/* Asks the last built batch to capture the post-RoPE queries of rows
 * first[s] .. first[s] + count[s] - 1 of each step s (within the step's
 * tokens; count 0: none) into capture_q (see model_batch_t; rows in step
 * order).  Returns how many rows. */
uint32_t sched_batch_capture(sched_batch_t *b, const uint32_t *first, const uint32_t *count,
                             float *capture_q);

/* ======================================================================== */
/* The engine: requests, continuous batching, preemption.                   */
/* ======================================================================== */

typedef enum sched_finish {
    SCHED_FINISH_LENGTH = 1, /* max_tokens or the maximum model length */
    SCHED_FINISH_EOS,        /* end-of-generation token */
    SCHED_FINISH_CANCELLED,
    SCHED_FINISH_ERROR, /* see sched_event_t.error */
    SCHED_FINISH_STOP,  /* the output spelled a whole guided choice or match */
} sched_finish_t;

const char *sched_finish_name(sched_finish_t f); /* "length", "eos", ... */

typedef struct sched_usage {
    uint32_t prompt_tokens;
    uint32_t cached_prompt_tokens;   /* prompt tokens served by the prefix cache */
    uint32_t computed_prompt_tokens; /* prompt tokens run through the model (recompute too) */
    uint32_t completion_tokens;
    uint32_t preemptions;
    uint64_t queue_ns;  /* submit -> first scheduled */
    uint64_t ttft_ns;   /* submit -> first token */
    uint64_t decode_ns; /* first token -> finish */
    /* Prompt rows' attention: keys attended and keys a dense prefill would
     * (their ratio is the density the policy achieved; equal when dense). */
    uint64_t attn_keys, attn_keys_dense;
    /* Speculative prefill: time from the draft's first step to the choice
     * of tokens, and the prompt tokens the main model kept. */
    uint64_t draft_ns;
    uint32_t kept_prompt_tokens;
    /* KV the request's policy let go: entries dropped by sink eviction
     * or by compression at the end of prefill. */
    uint64_t kv_dropped_tokens;
    /* Speculative decoding (sched_cfg_t.num_speculative_tokens): tokens
     * proposed by prompt lookup and verified, and of them the accepted
     * ones (each a decode step saved). */
    uint32_t spec_draft_tokens, spec_accepted_tokens;
} sched_usage_t;

/* What a request's KV may lose to save memory (algorithms.md sections 3
 * and 5).  All zero: keep everything. */
typedef enum sched_kv_kind {
    SCHED_KV_FULL = 0,
    /* StreamingLLM: the first `sinks` tokens and the most recent ones,
     * budget_tokens in all, dropping whole middle blocks as the window
     * slides (true positions kept). */
    SCHED_KV_SINK_EVICTION,
    /* SnapKV at the end of prefill: per layer and KV head the
     * budget_tokens keys the last `window` prompt queries attend to most
     * (votes pooled over `kernel` tokens), the window itself included. */
    SCHED_KV_SNAPKV,
    /* H2O in decode: per layer and KV head the `window` most recent
     * entries plus the budget_tokens - window older ones with the most
     * accumulated attention (prefill runs dense; the scores start from the
     * last 32 prompt queries and grow with every decode query).  Compacts
     * once the table passes budget_tokens + block_tokens entries. */
    SCHED_KV_H2O,
} sched_kv_kind_t;

typedef struct sched_kv_policy {
    sched_kv_kind_t kind;
    uint32_t budget_tokens; /* SINK_EVICTION, SNAPKV, H2O: required */
    uint32_t sinks;         /* SINK_EVICTION (0: none) */
    uint32_t window;        /* SNAPKV (0: 32); H2O: recent tokens kept (0: budget / 2) */
    uint32_t kernel;        /* SNAPKV (0: 5; odd) */
} sched_kv_policy_t;

/* A generated token's log-probability under the model (model_logprobs:
 * the log-softmax of its logits), and the n_top most likely tokens',
 * most likely first. */
enum { SCHED_MAX_LOGPROBS = 20, SCHED_MAX_MIN_BAN = 64 };
typedef struct sched_logprobs {
    float logprob;
    uint32_t n_top;
    int32_t top_ids[SCHED_MAX_LOGPROBS];
    float top_lps[SCHED_MAX_LOGPROBS];
} sched_logprobs_t;

enum { SCHED_NAME_MAX = 64 };

typedef struct sched_request {
    uint64_t id; /* caller's; unique among live requests */
    /* What the engine's log lines call it (the API's request_id), copied
     * up to SCHED_NAME_MAX - 1 bytes; NULL or "": the id in decimal. */
    const char *name;
    const int32_t *prompt;
    uint32_t n_prompt;
    uint32_t max_tokens;
    model_sampling_t sampling;
    bool ignore_eos;
    int32_t priority;         /* lower runs first (vLLM's convention); FCFS within */
    uint64_t cache_salt;      /* requests with different salts never share KV */
    model_attn_policy_t attn; /* prefill attention (zero: dense) */
    model_spec_policy_t spec; /* speculative prefill (off: full prefill) */
    sched_kv_policy_t kv;     /* KV eviction or compression (zero: none) */
    /* Each token event carries its sched_logprobs_t, with top_logprobs
     * (at most SCHED_MAX_LOGPROBS) alternatives. */
    bool logprobs;
    uint32_t top_logprobs;
    /* Teacher forcing: the first n_forced output tokens are these (copied)
     * instead of sampled ones, each still reported with its logprobs, so
     * a continuation can be scored under the request's policies (kvserve
     * perplexity).  A forced EOS does not end the request.  n_forced <=
     * max_tokens. */
    const int32_t *forced;
    uint32_t n_forced;
    /* vLLM's min_tokens: until this many tokens are out, the model's
     * end-of-generation tokens and these ids (the caller's stop tokens,
     * copied; at most SCHED_MAX_MIN_BAN) cannot be sampled.  <=
     * max_tokens. */
    uint32_t min_tokens;
    const int32_t *min_ban;
    uint32_t n_min_ban;
    /* vLLM's prompt_logprobs: the log-probability of every prompt token
     * after the first under the model given those before it (the prefill
     * rows' logits, under the request's attention policy), with
     * top_prompt_logprobs (at most SCHED_MAX_LOGPROBS) alternatives, in
     * SCHED_EV_PROMPT_LOGPROBS events before the first token.  The whole
     * prompt is computed (no prefix-cache hit), in chunks of at most
     * sched_cfg_t.prompt_logprob_rows rows a step.  Not with speculative
     * prefill (KVS_EINVAL), whose main model skips prompt tokens. */
    bool prompt_logprobs;
    uint32_t top_prompt_logprobs;
    /* vLLM's guided_choice (model_choice_new, copied): the output spells
     * one of these strings and ends with SCHED_FINISH_STOP when it is a
     * whole one no other extends (or an end-of-generation token follows
     * a whole one).  Not with forced tokens. */
    const char *const *choices;
    uint32_t n_choices;
    /* vLLM's guided_regex and guided_json (serve/ turns a schema into a
     * pattern): the output is a whole match of the guide's pattern and
     * ends with SCHED_FINISH_STOP when nothing can extend it (or an
     * end-of-generation token follows a whole match).  Compiled by the
     * caller, on its thread; sched_submit takes a clone (the caller keeps
     * its own), which must not be in use elsewhere then.  Not with forced
     * tokens or choices. */
    const model_guide_t *guide;
    /* vLLM's n: this many samples of one prompt (0 or 1: one; at most
     * SCHED_MAX_N), each an output of its own with every setting above.
     * The prompt is prefilled once: at its first logits the other samples
     * fork its KV (kv_table_fork: full blocks shared, the partial last
     * one copied) and draw their first tokens from the same row, sample
     * i with seed sched_sample_seed(sampling.seed, i).  A sample that
     * finds no free sequence or block then waits and prefills the prompt
     * itself, prefix cache permitting.  With a KV codec the prompt's
     * blocks are sealed whole before the fork (a shared block is never
     * sealed later), residual window included.  Events carry the sample's
     * index; each sample finishes on its own. */
    uint32_t n;
} sched_request_t;

enum {
    SCHED_MAX_N = 64,
    SCHED_MAX_SPEC_TOKENS = 16,
    SCHED_MAX_SAMPLE_THREADS = 64,
    SCHED_DEFAULT_SAMPLE_THREADS = 8,
    SCHED_MAX_PROMPT_LOOKUP = 64,
    SCHED_DEFAULT_PROMPT_LOOKUP_MAX = 4,
    SCHED_DEFAULT_PROMPT_LOOKUP_MIN = 2,
};

/* The seed sample i of a request draws with: sample 0 the request's own,
 * so n = 1 is unchanged. */
static inline uint64_t
sched_sample_seed(uint64_t seed, uint32_t i)
{
    return i == 0 ? seed : kvs_mix64(seed ^ kvs_mix64(0x6e5eedu + i));
}

typedef enum sched_event_kind {
    SCHED_EV_TOKEN,
    SCHED_EV_FINISH,
    SCHED_EV_PROMPT_LOGPROBS,
} sched_event_kind_t;

/* Leaves the engine through an MPSC queue; the consumer frees it. */
typedef struct sched_event {
    kvs_mpsc_node_t node;
    sched_event_kind_t kind;
    uint64_t req_id;
    uint32_t index;    /* the sample (sched_request_t.n), 0.. n - 1 */
    int32_t token;     /* TOKEN */
    bool has_logprobs; /* TOKEN of a request that asked for them */
    sched_logprobs_t lp;
    sched_finish_t finish; /* FINISH */
    int error;             /* FINISH with ERROR: a KVS_E* code */
    /* PROMPT_LOGPROBS: prompt tokens first .. first + n_plp - 1 (first >=
     * 1), in order, each once; the array is the event's. */
    uint32_t plp_first, n_plp;
    sched_logprobs_t *plp;
    sched_usage_t usage; /* FINISH */
    uint64_t t_ns;       /* when the engine queued it (kvs_now_ns) */
} sched_event_t;

typedef struct sched_cfg {
    uint32_t max_num_seqs;           /* running requests per step (default 256) */
    uint32_t max_num_batched_tokens; /* tokens per step (default 2048) */
    uint32_t max_model_len;          /* prompt + completion (0: the model's context) */
    /* Prompt rows whose logits a step computes for prompt_logprobs, over
     * every request (default 256, at most max_num_batched_tokens): each
     * row is n_vocab floats of host memory and of the device's. */
    uint32_t prompt_logprob_rows;
    uint32_t block_tokens; /* KV block size (default 16) */
    uint32_t n_blocks;     /* KV blocks; 0: from kv_cache_bytes */
    size_t kv_cache_bytes; /* used when n_blocks is 0 */
    kern_dtype_t kv_dtype; /* KERN_F16 (default) or KERN_F32 */
    /* Quantized KV (kern.h's codecs; KERN_KVQ_NONE: every block in
     * kv_dtype).  Full blocks are sealed into the codec after each step,
     * except those holding the first kv_sink_tokens tokens of a sequence
     * (0: none), which stay exact.  kv_hot_blocks full-precision blocks
     * take the appends (0: one step's tokens plus the sink blocks and
     * one tail block per running request, and one); the rest of n_blocks (or of kv_cache_bytes) is
     * quantized. */
    kern_kvq_t kv_quant;
    uint32_t kv_sink_tokens;
    uint32_t kv_hot_blocks;
    /* KIVI's residual window: the most recent kv_residual_tokens stay full
     * precision too (0: a block is sealed as soon as it is full).  When
     * the pool runs short they are sealed anyway, before anything is
     * preempted. */
    uint32_t kv_residual_tokens;
    /* Host memory for KV (0: none): a preempted request's blocks are
     * copied there and brought back on re-admission instead of being
     * recomputed, and blocks the prefix cache evicts wait there for a
     * later match. */
    size_t host_kv_bytes;
    bool prefix_caching;
    /* Decode steps recorded as CUDA graphs and replayed
     * (model_ctx_set_graphs); no effect on host backends. */
    bool cuda_graphs;
    /* On a device backend, the key summaries block-sparse prefill and
     * Quest keep for every block of the pool are allocated at start
     * (model_ctx_reserve), an eighth of an F16 pool's bytes on top of
     * kv_cache_bytes; without it, at the first request that needs them.
     * The server sets it where either is the default policy. */
    bool reserve_summaries;
    /* Speculative decoding by prompt lookup (vLLM's "ngram" method,
     * llama.cpp's lookup decoding), 0: off. A decoding request whose last g
     * tokens (g from prompt_lookup_max down to prompt_lookup_min) occurred
     * before in its prompt or output proposes the up to
     * num_speculative_tokens tokens that followed the latest such
     * occurrence; one forward pass computes them with the last token, and
     * the request draws from each row in turn, keeping a proposed token only
     * while it is the token drawn, and the first drawn token that differs.
     * Every token is drawn as plain decoding would draw it (same logits up
     * to batching's rounding, same sampler state, seed included), so outputs
     * and their distribution do not change; only steps are saved. (With a KV
     * codec, rows read blocks sealed at other moments than plain decoding
     * (and prefill chunks, which proposals' budget changes, seal between
     * them): the codec's rounding, not more.) The
     * proposals take token budget and logit rows (prompt_logprob_rows') that
     * every decode's own token leaves, and never preempt: a request whose
     * proposal does not fit decodes one token. Not for requests with H2O or
     * sink eviction. Forced tokens still due are proposed as they are (so
     * teacher forcing scores up to num_speculative_tokens + 1 a step). At
     * most SCHED_MAX_SPEC_TOKENS; the lookup lengths default to 4 and 2. */
    uint32_t num_speculative_tokens;
    uint32_t prompt_lookup_max, prompt_lookup_min;
    /* The proposals come from the draft model instead (vLLM's draft model
     * method; needs `draft`): its continuation of the sequence, up to
     * num_speculative_tokens tokens, each the draw the request's sampler
     * would make from the draft's row with the random number it will use at
     * that position (model_sampler_predict; greedy at temperature 0), so a
     * sampled request's proposal holds about as often as the two
     * distributions agree.  Verified the same way, so outputs stay those of
     * plain decoding, seeds included.  Each running request keeps the draft's KV
     * of its tokens in the draft pool: the draft computes each prompt chunk
     * in the main model's step, and what it lags (after a pause) with its
     * next proposal, at most max_num_batched_tokens tokens a pass.  That KV
     * is released on preemption, or when a speculative prefill needs the
     * draft pool; a request the pool cannot hold proposes nothing until it
     * can.  A step's proposal of k tokens takes the draft k forward passes,
     * batched over the proposing requests.  After a speculative prefill the
     * draft's prompt KV stays for this. */
    bool spec_draft_model;
    /* With the draft model, vLLM's rejection sampler instead of the exact
     * check: a request that samples (temperature > 0) has the draft draw
     * its proposal from the draft's distribution q (under the request's own
     * sampling settings and generator), and keeps a proposed token x with
     * probability min(1, p(x) / q(x)) against the main model's p, drawing
     * from max(0, p - q) where it does not (model_sampler_verify): the
     * most a proposal can hold, sum(min(p, q)), somewhat more than the
     * exact check's shared random number gives, but outputs keep plain
     * decoding's distribution, not its draws: a seed then gives the same
     * tokens only under the same schedule.  Greedy requests are unchanged.  The draft's
     * distributions take min(prompt_logprob_rows, max_num_seqs x num_speculative_tokens) rows of
     * n_vocab floats, allocated here; a step's proposals past them are checked exactly.  Needs
     * spec_draft_model. */
    bool spec_rejection;
    /* vLLM's speculative_disable_by_batch_size: a step that starts with at
     * least this many running requests proposes nothing (forced tokens
     * aside, which always hold), since a large batch makes the model
     * compute-bound and rejected rows cost what kept ones do.  0: never. */
    uint32_t spec_disable_batch;
    /* Threads that draw a step's tokens, the engine thread included: a
     * step's draws (each request's row, or a proposal's rows in turn) run
     * on them at once, each request on one thread with its own sampler, so
     * outputs do not depend on the count.  0: half the cores, at most
     * SCHED_DEFAULT_SAMPLE_THREADS, and only for draws over at least 256K
     * logits in all (fewer finish before the threads wake); a count given
     * uses them from two draws on.  1: the engine thread alone.  At most
     * SCHED_MAX_SAMPLE_THREADS. */
    uint32_t sample_threads;
    /* Speculative prefill's draft model (NULL: none), on the main model's
     * backend with the same vocabulary, and its own KV pool of
     * draft_n_blocks blocks (0: as many blocks as the main pool; when the
     * main pool is sized by kv_cache_bytes, the bytes are split between
     * the two in proportion to their block sizes). */
    model_t *draft;
    uint32_t draft_n_blocks;
    /* Niceness the engine thread takes when started by sched_thread_start
     * (0: inherit).  A server lowers it (and the kernels' workers') so its
     * network threads run as soon as tokens exist. */
    int thread_nice;
    /* Called by whichever thread steps the engine each time it queues an
     * event, so a consumer sees a token as soon as it is sampled (the
     * server binds it to uv_async_send, which coalesces). */
    void (*wake)(void *arg);
    void *wake_arg;
} sched_cfg_t;

typedef struct sched sched_t;

/* The full-precision blocks a pool with a codec gets when kv_hot_blocks is
 * 0: one step's tokens, plus per running request its sink blocks, its
 * residual window and its tail (zero fields read as sched_new's defaults). */
uint32_t sched_default_hot_blocks(const sched_cfg_t *c);

/* An engine over a loaded model (and its backend).  Fills defaults for
 * zero fields.  Returns 0, KVS_EINVAL (also: a draft on another backend
 * or with another vocabulary size) or KVS_ENOMEM. */
int sched_new(model_t *m, const sched_cfg_t *cfg, sched_t **out);
/* Frees every request (no events) and the KV pool. NULL is a no-op. */
void sched_free(sched_t *s);
const sched_cfg_t *sched_get_cfg(const sched_t *s);
kv_pool_t *sched_pool(sched_t *s);
kv_pool_t *sched_draft_pool(sched_t *s); /* NULL without a draft */

/* Queues a request (the prompt is copied).  Thread: any.  Returns 0,
 * KVS_EINVAL (empty prompt, token outside the vocabulary, bad sampling or
 * policy), KVS_ENOTSUP (a policy this engine cannot run: speculative
 * prefill without a draft), KVS_ERANGE (prompt + max_tokens longer than
 * the maximum model length) or KVS_ENOSPC (could never fit in the KV pool or the draft's). */
int sched_submit(sched_t *s, const sched_request_t *r);
/* Whether this engine runs requests with these policies (spec with its
 * defaults filled; kv may be NULL for none): 0, KVS_EINVAL or KVS_ENOTSUP,
 * as sched_submit answers. */
int sched_check_policy(const sched_t *s, const model_attn_policy_t *attn,
                       const model_spec_policy_t *spec, const sched_kv_policy_t *kv);
/* The smallest budget sink eviction can keep: eviction drops whole
 * blocks, so the sinks' blocks and one block of recent tokens. */
static inline uint64_t
sched_kv_min_budget(uint32_t sinks, uint32_t block_tokens)
{
    uint64_t bt = block_tokens;
    return (sinks + bt - 1) / bt * bt + bt;
}
/* Asks to cancel request id, every sample of it; each finishes with
 * SCHED_FINISH_CANCELLED (if it had not finished already).  Thread: any. */
int sched_cancel(sched_t *s, uint64_t id);
/* The same for one sample of it (a stop string matched in that output). */
int sched_cancel_sample(sched_t *s, uint64_t id, uint32_t index);

/* Runs one engine step: takes queued submissions and cancellations, plans
 * (decodes first, then prefill chunks, then admissions, within the token
 * and sequence budgets), reserves KV (preempting by recompute when the
 * pool is full), runs the model, samples and queues events.  Returns the
 * number of requests still live (0: idle) or a negative error from the
 * backend, which failed the step's requests (others may still be live:
 * step again until 0).  Thread: engine. */
int sched_step(sched_t *s);
/* What the engine holds, as of its last step (and at creation). */
typedef struct sched_load {
    uint32_t running, waiting;
    uint32_t preempted; /* of the waiting: preempted at least once, to resume */
    uint32_t blocks_total;
    uint32_t blocks_free;   /* allocatable: free plus cached blocks no request holds */
    uint32_t blocks_cached; /* in the prefix cache, held or not */
    uint32_t blocks_hot;    /* with a codec: full-precision blocks (total) */
    uint64_t blocks_sealed; /* with a codec: blocks quantized so far */
    /* What a short pool did, in the order it tries: quantize residual
     * windows, swap a request to the host tier, recompute (preemptions
     * that were not swaps: swap_outs subtracted from the requests'). */
    uint64_t pressure_seals, swap_outs, swap_ins;
    uint64_t snapkv_compressions;
    uint64_t h2o_compactions;
    uint64_t host_bytes_used, host_hit_tokens; /* the host tier's, 0 without one */
    uint64_t steps;                            /* steps that ran the model */
    uint64_t busy_ns;                          /* their total duration */
    /* kv_pool_prefix_stats' counters, mirrored here because the pool is
     * the engine thread's alone. */
    uint64_t prefix_queried_tokens, prefix_hit_tokens;
    /* Speculative decoding: tokens proposed and accepted, all requests;
     * proposals verified (spec_drafts: the mean accepted run is
     * accepted / drafts) and the tokens accepted at each position of a
     * proposal, the first spec_positions (num_speculative_tokens) of them. */
    uint64_t spec_draft_tokens, spec_accepted_tokens, spec_drafts;
    uint64_t spec_accepted_pos[SCHED_MAX_SPEC_TOKENS];
    uint32_t spec_positions;
    /* The device failed for good (kern_backend_failed): every request
     * that reaches a step ends with KVS_EDEVICE. */
    bool device_failed;
} sched_load_t;

/* Thread: any (reads a snapshot the engine publishes after every step). */
void sched_get_load(const sched_t *s, sched_load_t *out);
/* sched_load_t.device_failed alone, for callers that ask at every wake.
 * Thread: any. */
bool sched_device_failed(const sched_t *s);

/* Pops the next event, or NULL.  Thread: the one consumer. */
sched_event_t *sched_poll(sched_t *s);
void sched_event_free(sched_event_t *ev);

/* Observes every step's batch before the forward pass (tests, tracing):
 * req_ids[i] is the request of sequence i.  Thread: engine. */
typedef void (*sched_step_hook_fn)(void *arg, const model_batch_t *b, const uint64_t *req_ids);
void sched_set_step_hook(sched_t *s, sched_step_hook_fn fn, void *arg);

/* Sees each row of logits before it is sampled (offline --logits-out,
 * tests).  Thread: engine. */
typedef void (*sched_logits_hook_fn)(void *arg, uint64_t req_id, const float *logits,
                                     uint32_t n_vocab);
void sched_set_logits_hook(sched_t *s, sched_logits_hook_fn fn, void *arg);

/* Engine thread: loops sched_step while work exists, sleeps otherwise and
 * wakes on submit/cancel.  stop waits for it to exit. */
int sched_thread_start(sched_t *s);
void sched_thread_stop(sched_t *s);

#endif /* SCHED_H */
