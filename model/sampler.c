/*
 * model/sampler.c — picks the next token from a row of logits: greedy, or
 * temperature with top-k, top-p (nucleus) and min-p filters and a seeded
 * xoshiro256** generator, so one seed always gives the same tokens; and
 * OpenAI's logit bias and vLLM's repetition, presence and frequency
 * penalties before them.
 * Called by sched/ once per sequence per step (engine thread).
 */
#include "model_int.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct model_sampler {
    model_sampling_t cfg;
    uint32_t n_vocab;
    uint64_t s[4];
    float *prob;  /* [n_vocab] */
    int32_t *idx; /* [n_vocab] candidate ids */
    /* Penalties (pen; NULL until first used): output occurrences and
     * prompt presence per id, the ids seen (each once), the penalized row. */
    bool pen;
    uint32_t *count;
    uint8_t *in_prompt;
    int32_t *seen;
    uint32_t n_seen;
    float *work;       /* the adjusted row (bias or penalties), allocated with them */
    int32_t *bias_ids; /* cfg.bias_ids and cfg.bias point here */
    float *bias;
    int32_t *allowed; /* cfg.allowed points here */
};

static uint64_t
splitmix64(uint64_t *x)
{
    return kvs_mix64(*x += 0x9e3779b97f4a7c15ull);
}

static uint64_t
rotl(uint64_t x, int k)
{
    return (x << k) | (x >> (64 - k));
}

static uint64_t
xoshiro_next(uint64_t *s)
{
    uint64_t r = rotl(s[1] * 5, 7) * 9, t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return r;
}

int
model_sampler_new(const model_sampling_t *cfg, uint32_t n_vocab, model_sampler_t **out)
{
    *out = NULL;
    if (!(cfg->temperature >= 0.0f) || !isfinite(cfg->temperature) || cfg->top_k < 0 ||
        !(cfg->top_p > 0.0f && cfg->top_p <= 1.0f) || !(cfg->min_p >= 0.0f && cfg->min_p <= 1.0f) ||
        !(cfg->repetition_penalty >= 0.0f) || !isfinite(cfg->repetition_penalty) ||
        !(fabsf(cfg->presence_penalty) <= MODEL_PENALTY_MAX) ||
        !(fabsf(cfg->frequency_penalty) <= MODEL_PENALTY_MAX) || n_vocab == 0 ||
        cfg->n_bias > MODEL_MAX_LOGIT_BIAS || (cfg->n_bias && (!cfg->bias_ids || !cfg->bias)))
        return KVS_EINVAL;
    for (uint32_t i = 0; i < cfg->n_bias; i++)
        if (cfg->bias_ids[i] < 0 || (uint32_t)cfg->bias_ids[i] >= n_vocab ||
            !(fabsf(cfg->bias[i]) <= MODEL_LOGIT_BIAS_MAX))
            return KVS_EINVAL;
    if (cfg->n_allowed && cfg->allowed == NULL)
        return KVS_EINVAL;
    for (uint32_t i = 0; i < cfg->n_allowed; i++)
        if (cfg->allowed[i] < 0 || (uint32_t)cfg->allowed[i] >= n_vocab)
            return KVS_EINVAL;
    model_sampler_t *s = calloc(1, sizeof *s);
    if (s == NULL)
        return KVS_ENOMEM;
    s->cfg = *cfg;
    s->cfg.bias_ids = s->bias_ids =
        cfg->n_bias ? kvs_memdup(cfg->bias_ids, cfg->n_bias * sizeof *s->bias_ids) : NULL;
    s->cfg.bias = s->bias =
        cfg->n_bias ? kvs_memdup(cfg->bias, cfg->n_bias * sizeof *s->bias) : NULL;
    s->cfg.allowed = s->allowed =
        cfg->n_allowed ? kvs_memdup(cfg->allowed, cfg->n_allowed * sizeof *s->allowed) : NULL;
    if ((cfg->n_bias && (!s->bias_ids || !s->bias)) || (cfg->n_allowed && !s->allowed)) {
        model_sampler_free(s);
        return KVS_ENOMEM;
    }
    s->n_vocab = n_vocab;
    uint64_t x = cfg->seed;
    for (int i = 0; i < 4; i++)
        s->s[i] = splitmix64(&x);
    if (s->cfg.repetition_penalty == 0.0f)
        s->cfg.repetition_penalty = 1.0f;
    s->pen = s->cfg.repetition_penalty != 1.0f || cfg->presence_penalty != 0.0f ||
             cfg->frequency_penalty != 0.0f;
    *out = s;
    return 0;
}

/* The buffers the configuration needs, allocated on first use, so that a
 * queued request holds none (a few bytes per vocabulary entry each:
 * megabytes for a 128K vocabulary). */
static int
ensure(model_sampler_t *s)
{
    uint32_t n = s->n_vocab;
    if (s->pen && s->count == NULL) {
        s->count = calloc(n, sizeof *s->count);
        s->in_prompt = calloc(n, 1);
        s->seen = malloc(n * sizeof *s->seen);
        if (!s->count || !s->in_prompt || !s->seen) {
            free(s->count);
            free(s->in_prompt);
            free(s->seen);
            s->count = NULL;
            s->in_prompt = NULL;
            s->seen = NULL;
            return KVS_ENOMEM;
        }
    }
    if ((s->pen || s->cfg.n_bias || s->cfg.n_allowed) && s->work == NULL &&
        (s->work = malloc(n * sizeof *s->work)) == NULL)
        return KVS_ENOMEM;
    if (s->cfg.temperature > 0.0f && s->prob == NULL) {
        s->prob = malloc(n * sizeof *s->prob);
        s->idx = malloc(n * sizeof *s->idx);
        if (!s->prob || !s->idx) {
            free(s->prob);
            free(s->idx);
            s->prob = NULL;
            s->idx = NULL;
            return KVS_ENOMEM;
        }
    }
    return 0;
}

static void
see(model_sampler_t *s, int32_t t)
{
    if (s->count[t] == 0 && !s->in_prompt[t])
        s->seen[s->n_seen++] = t;
}

int
model_sampler_prompt(model_sampler_t *s, const int32_t *tokens, uint32_t n)
{
    if (!s->pen || s->cfg.repetition_penalty == 1.0f)
        return 0; /* the prompt counts for the repetition penalty alone */
    int rc = ensure(s);
    if (rc)
        return rc;
    for (uint32_t i = 0; i < n; i++) {
        int32_t t = tokens[i];
        if (t >= 0 && (uint32_t)t < s->n_vocab) {
            see(s, t);
            s->in_prompt[t] = 1;
        }
    }
    return 0;
}

int
model_sampler_accept(model_sampler_t *s, int32_t t)
{
    if (!s->pen || t < 0 || (uint32_t)t >= s->n_vocab)
        return 0;
    int rc = ensure(s);
    if (rc)
        return rc;
    see(s, t);
    if (s->count[t] < UINT32_MAX)
        s->count[t]++;
    return 0;
}

/* The row restricted to the allowed ids, with the logit bias added, then
 * the penalties applied to the ids seen, as vLLM orders them: repetition
 * first, then frequency and presence. */
static const float *
penalize(model_sampler_t *s, const float *logits)
{
    const model_sampling_t *c = &s->cfg;
    bool seen = s->count && s->n_seen;
    if (!seen && c->n_bias == 0 && c->n_allowed == 0)
        return logits;
    if (c->n_allowed) {
        for (uint32_t i = 0; i < s->n_vocab; i++)
            s->work[i] = -INFINITY;
        for (uint32_t i = 0; i < c->n_allowed; i++)
            s->work[c->allowed[i]] = logits[c->allowed[i]];
    } else {
        memcpy(s->work, logits, s->n_vocab * sizeof *s->work);
    }
    for (uint32_t i = 0; i < c->n_bias; i++)
        s->work[c->bias_ids[i]] += c->bias[i];
    for (uint32_t i = 0; seen && i < s->n_seen; i++) {
        int32_t t = s->seen[i];
        float x = s->work[t];
        if (c->repetition_penalty != 1.0f)
            x = x > 0.0f ? x / c->repetition_penalty : x * c->repetition_penalty;
        if (s->count[t] > 0)
            x -= c->frequency_penalty * (float)s->count[t] + c->presence_penalty;
        s->work[t] = x;
    }
    return s->work;
}

void
model_sampler_free(model_sampler_t *s)
{
    if (s == NULL)
        return;
    free(s->prob);
    free(s->idx);
    free(s->count);
    free(s->in_prompt);
    free(s->seen);
    free(s->work);
    free(s->bias_ids);
    free(s->bias);
    free(s->allowed);
    free(s);
}

const model_sampling_t *
model_sampler_cfg(const model_sampler_t *s)
{
    return &s->cfg;
}

/* First index of the largest value, NaN never chosen (0 if all are).
 * Sixteen running maxima then a search for the first match: the loop
 * carries no index, so it compiles to vector max over 128k logits per
 * sequence per step instead of a compare chain through memory. */
static int32_t
argmax(const float *x, uint32_t n)
{
    float lane[16];
    for (int k = 0; k < 16; k++)
        lane[k] = -INFINITY;
    uint32_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int k = 0; k < 16; k++)
            lane[k] = x[i + k] > lane[k] ? x[i + k] : lane[k];
    float m = -INFINITY;
    for (; i < n; i++)
        m = x[i] > m ? x[i] : m;
    for (int k = 0; k < 16; k++)
        m = lane[k] > m ? lane[k] : m;
    for (i = 0; i < n; i++)
        if (x[i] == m)
            return (int32_t)i;
    return 0;
}

/* Descending probability; ties broken by id so runs are reproducible
 * whatever the libc sort. */
static int
cmp_desc(const void *a, const void *b, void *arg)
{
    const float *prob = arg;
    int32_t i = *(const int32_t *)a, j = *(const int32_t *)b;
    /* NaN ranks below every number, so the order stays total. */
    bool ni = prob[i] != prob[i], nj = prob[j] != prob[j];
    if (ni != nj)
        return ni ? 1 : -1;
    if (!ni && prob[i] != prob[j])
        return prob[i] > prob[j] ? -1 : 1;
    return i < j ? -1 : (i > j);
}

static bool
heap_less(const float *prob, int32_t a, int32_t b)
{
    return cmp_desc(&a, &b, (void *)prob) > 0; /* a ranks below b */
}

static void
heap_sift_down(int32_t *h, uint32_t k, uint32_t i, const float *prob)
{
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < k && heap_less(prob, h[l], h[m]))
            m = l;
        if (r < k && heap_less(prob, h[r], h[m]))
            m = r;
        if (m == i)
            return;
        int32_t t = h[i];
        h[i] = h[m];
        h[m] = t;
        i = m;
    }
}

/* Leaves the k best of the ids cand[0..n) (NULL: of 0..n-1) in idx[0..k)
 * (unordered; cand may be idx): a min-heap of the best k seen so far,
 * O(n log k).  The ranking is a total order (ties by id), so the k are the
 * same whichever other ids are in. */
static void
select_top(int32_t *idx, const int32_t *cand, uint32_t n, uint32_t k, const float *prob)
{
    for (uint32_t i = 0; i < k; i++)
        idx[i] = cand ? cand[i] : (int32_t)i;
    for (uint32_t i = k / 2; i-- > 0;)
        heap_sift_down(idx, k, i, prob);
    for (uint32_t i = k; i < n; i++) {
        int32_t id = cand ? cand[i] : (int32_t)i;
        if (heap_less(prob, idx[0], id)) {
            idx[0] = id;
            heap_sift_down(idx, k, 0, prob);
        }
    }
}

/* Which of idx[0..m) top-p and min-p keep, left in idx[0..return):
 * top-p's smallest most likely set holding top_p of the mass (ties by id,
 * as one sort of them all would rank them), then min-p's floor.  Rather
 * than sorting the whole vocabulary (20 ms at 102K tokens), the
 * candidates go into buckets of 1/16 octave below the best by their
 * float's exponent and top mantissa bits: every bucket above the one
 * where the mass is reached is kept whole, in the order of idx, and only
 * that one bucket is sorted.  The order depends on idx's order and on
 * the ids' values only, so ids left out (a mask) or in at probability 0
 * draw alike. */
enum { N_BUCKETS = 1024 };

static inline uint32_t
bucket(float p, float inv_best)
{
    float q = p * inv_best;
    if (!(q > 0.0f))
        return N_BUCKETS - 1;
    uint32_t u;
    memcpy(&u, &q, sizeof u);
    int e = (int)(u >> 23 & 0xFF) - 127;
    if (e >= 0)
        return 0;
    int64_t b = (int64_t)(-e) * 16 - (int64_t)(u >> 19 & 15);
    return b >= N_BUCKETS ? N_BUCKETS - 1 : (uint32_t)b;
}

static uint32_t
nucleus(model_sampler_t *s, uint32_t m, double total, float best)
{
    const model_sampling_t *c = &s->cfg;
    double mass[N_BUCKETS] = {0};
    float inv = 1.0f / best;
    for (uint32_t i = 0; i < m; i++) {
        float p = s->prob[s->idx[i]];
        mass[bucket(p, inv)] += p;
    }
    uint32_t cut = N_BUCKETS; /* the bucket where top-p's mass is reached */
    double need = c->top_p * total, acc = 0.0;
    if (c->top_p < 1.0f)
        for (cut = 0; cut < N_BUCKETS - 1 && acc + mass[cut] < need; cut++)
            acc += mass[cut];
    /* Buckets above the cut to the front, then the cut's, sorted. */
    uint32_t front = 0, n_cut = 0;
    for (uint32_t i = 0; i < m; i++)
        if (bucket(s->prob[s->idx[i]], inv) < cut) {
            int32_t x = s->idx[i];
            s->idx[i] = s->idx[front];
            s->idx[front++] = x;
        }
    uint32_t keep = front;
    if (cut < N_BUCKETS) {
        for (uint32_t i = front; i < m; i++)
            if (bucket(s->prob[s->idx[i]], inv) == cut) {
                int32_t x = s->idx[i];
                s->idx[i] = s->idx[front + n_cut];
                s->idx[front + n_cut++] = x;
            }
        qsort_r(s->idx + front, n_cut, sizeof *s->idx, cmp_desc, s->prob);
        keep = front + n_cut;
        for (uint32_t i = 0; i < n_cut; i++) {
            acc += s->prob[s->idx[front + i]];
            if (acc >= need) {
                keep = front + i + 1;
                break;
            }
        }
    }
    if (c->min_p > 0.0f) {
        float floor_p = c->min_p * best;
        uint32_t k = 0;
        for (uint32_t i = 0; i < keep; i++)
            if (s->prob[s->idx[i]] >= floor_p)
                s->idx[k++] = s->idx[i];
        keep = k;
    }
    return keep ? keep : 1;
}

/* The distribution a draw takes from the row, over every id or over
 * those set in allow only: the ids left out count as a logit of -inf
 * would (a probability of 0), so both draw the same token from the same
 * generator state, and the masked one touches only the ids it keeps.
 * Returns the best id at temperature 0 (*m 0); otherwise 0 with the kept
 * ids in idx[0..*m) and their weights in prob[] summing to *sum.  A
 * negative error when no id is left. */
static int32_t
filter(model_sampler_t *s, const float *logits, const uint64_t *allow, uint32_t *m_out,
       double *sum_out)
{
    const model_sampling_t *c = &s->cfg;
    uint32_t n = s->n_vocab, m = 0;
    *m_out = 0;
    int rc = ensure(s);
    if (rc)
        return rc;
    logits = penalize(s, logits);
    int32_t best = -1;
    float mx = -INFINITY;
    if (allow) {
        for (uint32_t w = 0; w * 64 < n; w++)
            for (uint64_t b = allow[w]; b; b &= b - 1) {
                uint32_t i = w * 64 + (uint32_t)__builtin_ctzll(b);
                if (i >= n)
                    break;
                if (s->idx) /* a greedy sampler has none, and needs none */
                    s->idx[m++] = (int32_t)i;
                if (logits[i] > mx) { /* the first of the largest; NaN never */
                    mx = logits[i];
                    best = (int32_t)i;
                }
            }
    } else {
        best = argmax(logits, n);
        mx = logits[best];
    }
    /* Every token ruled out (allowed ids, bans, a guide): no token to
     * draw, which the caller must hear rather than get id 0. */
    if (!(mx > -INFINITY))
        return KVS_EINVAL;
    if (c->temperature == 0.0f)
        return best;

    double sum = 0.0;
    if (allow) {
        for (uint32_t j = 0; j < m; j++) {
            int32_t i = s->idx[j];
            float p = expf((logits[i] - mx) / c->temperature);
            p = p > 0.0f ? p : 0.0f; /* a NaN logit: never drawn */
            s->prob[i] = p;
            sum += p;
        }
    } else {
        for (uint32_t i = 0; i < n; i++) {
            float p = expf((logits[i] - mx) / c->temperature);
            p = p > 0.0f ? p : 0.0f;
            s->prob[i] = p;
            s->idx[i] = (int32_t)i;
            sum += p;
        }
        m = n;
    }
    bool cut = false;
    if (c->top_k > 0 && (uint32_t)c->top_k < m) {
        select_top(s->idx, s->idx, m, (uint32_t)c->top_k, s->prob);
        m = (uint32_t)c->top_k;
        cut = true;
    }
    /* A top-k the mask already met still sorts, as the whole row would. */
    if (allow && c->top_k > 0 && (uint32_t)c->top_k < n)
        cut = true;
    if (cut) {
        /* Top-k's few, in one order whatever else was in: the filters
         * below walk them from the most likely. */
        qsort_r(s->idx, m, sizeof *s->idx, cmp_desc, s->prob);
        double total = 0.0;
        for (uint32_t i = 0; i < m; i++)
            total += s->prob[s->idx[i]];
        if (c->top_p < 1.0f) {
            double acc = 0.0;
            for (uint32_t i = 0; i < m; i++) {
                acc += s->prob[s->idx[i]];
                if (acc >= c->top_p * total) {
                    m = i + 1;
                    break;
                }
            }
        }
        if (c->min_p > 0.0f) {
            float floor_p = c->min_p * s->prob[s->idx[0]];
            uint32_t keep = 1;
            while (keep < m && s->prob[s->idx[keep]] >= floor_p)
                keep++;
            m = keep;
        }
    } else if (c->top_p < 1.0f || c->min_p > 0.0f) {
        double total = 0.0;
        float best = 0.0f;
        for (uint32_t i = 0; i < m; i++) {
            float p = s->prob[s->idx[i]];
            total += p;
            best = p > best ? p : best;
        }
        m = nucleus(s, m, total, best);
    }
    if (cut || c->top_p < 1.0f || c->min_p > 0.0f) {
        sum = 0.0;
        for (uint32_t i = 0; i < m; i++)
            sum += s->prob[s->idx[i]];
    }
    *m_out = m;
    *sum_out = sum;
    return 0;
}

/* 53 random bits -> uniform in [0, 1). */
static double
to_uniform(uint64_t bits)
{
    return (double)(bits >> 11) * (1.0 / 9007199254740992.0);
}

static double
uniform(model_sampler_t *s)
{
    return to_uniform(xoshiro_next(s->s));
}

/* The id where u in [0, 1) falls among the weights w[idx[0..m)] (s->prob:
 * the filter's), which sum to sum > 0. */
static int32_t
draw_at(const model_sampler_t *s, const float *w, uint32_t m, double sum, double u)
{
    double r = u * sum, acc = 0.0;
    int32_t last = s->idx[m - 1];
    for (uint32_t i = 0; i < m; i++) {
        if (w[s->idx[i]] > 0.0f)
            last = s->idx[i];
        acc += w[s->idx[i]];
        if (r < acc)
            return s->idx[i];
    }
    return last; /* rounding left r past the sum: the last id with weight */
}

static int32_t
draw(model_sampler_t *s, const float *w, uint32_t m, double sum)
{
    return draw_at(s, w, m, sum, uniform(s));
}

static int32_t
sample(model_sampler_t *s, const float *logits, const uint64_t *allow)
{
    uint32_t m;
    double sum;
    int32_t best = filter(s, logits, allow, &m, &sum);
    return best < 0 || m == 0 ? best : draw(s, s->prob, m, sum);
}

int32_t
model_sampler_sample(model_sampler_t *s, const float *logits)
{
    return sample(s, logits, NULL);
}

int32_t
model_sampler_sample_masked(model_sampler_t *s, const float *logits, const uint64_t *allow)
{
    return sample(s, logits, allow);
}

int32_t
model_sampler_predict(model_sampler_t *s, const float *logits, uint32_t ahead)
{
    uint32_t m;
    double sum;
    int32_t best = filter(s, logits, NULL, &m, &sum);
    if (best < 0 || m == 0)
        return best;
    uint64_t st[4] = {s->s[0], s->s[1], s->s[2], s->s[3]}, bits = 0;
    for (uint32_t i = 0; i <= ahead; i++)
        bits = xoshiro_next(st);
    return draw_at(s, s->prob, m, sum, to_uniform(bits));
}

int32_t
model_sampler_propose(model_sampler_t *s, const float *logits, float *q)
{
    uint32_t m;
    double sum;
    int32_t best = filter(s, logits, NULL, &m, &sum);
    if (best < 0)
        return best;
    memset(q, 0, s->n_vocab * sizeof *q);
    if (m == 0) {
        q[best] = 1.0f;
        return best;
    }
    for (uint32_t i = 0; i < m; i++)
        q[s->idx[i]] = (float)(s->prob[s->idx[i]] / sum);
    return draw(s, s->prob, m, sum);
}

/* Speculative sampling's test (Leviathan et al. 2023, Chen et al. 2023):
 * x drawn from q stays with probability min(1, p(x) / q(x)); otherwise
 * the token comes from the residual max(0, p - q), renormalised.  Both
 * together draw from p whatever q is.  p lives on the filter's kept ids,
 * so the residual does too, and ids q gave weight outside them never
 * come back. */
int32_t
model_sampler_verify(model_sampler_t *s, const float *logits, const uint64_t *allow, int32_t x,
                     const float *q)
{
    uint32_t m;
    double sum;
    int32_t best = filter(s, logits, allow, &m, &sum);
    if (best < 0 || m == 0)
        return best; /* greedy: x stays only where it is the best */
    double px = 0.0;
    for (uint32_t i = 0; i < m; i++)
        if (s->idx[i] == x) {
            px = s->prob[x] / sum;
            break;
        }
    double qx = x >= 0 && (uint32_t)x < s->n_vocab ? q[x] : 0.0;
    if (px > 0.0 && uniform(s) * qx < px)
        return x;
    double rest = 0.0;
    for (uint32_t i = 0; i < m; i++) {
        double w = s->prob[s->idx[i]] / sum - q[s->idx[i]];
        rest += w > 0.0 ? (float)w : 0.0f;
    }
    if (!(rest > 0.0)) /* p == q but for rounding: a draw from p */
        return draw(s, s->prob, m, sum);
    /* The residual in place of the weights (prob is the filter's scratch,
     * rebuilt at every draw). */
    for (uint32_t i = 0; i < m; i++) {
        int32_t id = s->idx[i];
        double w = s->prob[id] / sum - q[id];
        s->prob[id] = w > 0.0 ? (float)w : 0.0f;
    }
    return draw(s, s->prob, m, rest);
}

int
model_logprobs(const float *logits, uint32_t n_vocab, int32_t token, uint32_t n_top, float *lp,
               int32_t *top_ids, float *top_lps)
{
    if (n_vocab == 0 || token < 0 || (uint32_t)token >= n_vocab)
        return KVS_EINVAL;
    if (n_top > n_vocab)
        n_top = n_vocab;
    /* log-sum-exp about the maximum: expf of a non-positive argument
     * cannot overflow, and the sum in double keeps 128K terms exact
     * enough. */
    float mx = logits[argmax(logits, n_vocab)];
    double sum = 0.0;
    for (uint32_t i = 0; i < n_vocab; i++) {
        float e = expf(logits[i] - mx);
        sum += e > 0.0f ? e : 0.0f; /* NaN logits weigh nothing */
    }
    double lse = (double)mx + log(sum);
    *lp = (float)((double)logits[token] - lse);
    if (n_top > 0) {
        select_top(top_ids, NULL, n_vocab, n_top, logits);
        qsort_r(top_ids, n_top, sizeof *top_ids, cmp_desc, (void *)logits);
        for (uint32_t k = 0; k < n_top; k++)
            top_lps[k] = (float)((double)logits[top_ids[k]] - lse);
    }
    return (int)n_top;
}
